//! The meta leader's side of backups: the admin calls on the catalog (`super::backups`) and
//! the backup nodes' reports. The copying and restoring run on backup-role nodes
//! (`crate::backup_node`); the leader hands each job to its node and records what comes back.

use std::time::Duration;

use basalt_common::NodeId;
use basalt_proto::admin::{
    Backup, BackupCreateRequest, BackupListReply, BackupListRequest, BackupReply, BackupReportReply, BackupReportRequest, BackupRestoreRequest,
    BackupVerifyReply, CopyBackStats, CopyBackupRequest, CopyRef, JobProgress, ProgressRequest, RestoreStatusReply, RunRestoreRequest,
    VerifyCopyReply,
};
use basalt_security::Action;
use tonic::{Response, Status};

use super::backups::{BackupRecord, BackupState, CopyStats, Restore, describe};
use super::service::{AdminService, now_ms, status_of, volume_in};
use super::state::{ClusterState, MetaCommand, MetaError, MetaReply, Role, VolumeState};
use crate::access::Caller;
use crate::node::MetaHandle;

/// Backup nodes a backup is kept on (fewer if fewer are up).
pub const BACKUP_COPIES: usize = 2;

/// How long the leader waits for a backup node to take a job.
const DISPATCH_WAIT: Duration = Duration::from_secs(5);

/// How long `backup verify` waits for a node to read its copy back.
const VERIFY_WAIT: Duration = Duration::from_secs(3600);

fn copy_proto(node: NodeId, c: &CopyStats) -> CopyBackStats {
    CopyBackStats {
        node: node.0,
        data_bytes: c.data_bytes,
        changed_bytes: c.changed_bytes,
        stored_bytes: c.stored_bytes,
        parent: c.parent,
        duration_ms: c.duration_ms,
    }
}

fn backup_proto(s: &ClusterState, b: &BackupRecord) -> Backup {
    let (state, error) = match &b.state {
        BackupState::Running => ("running", String::new()),
        BackupState::Complete => ("complete", String::new()),
        BackupState::Failed(why) => ("failed", why.clone()),
    };
    Backup {
        id: b.id,
        volume_id: b.volume.0,
        volume: b.volume_name.clone(),
        snapshot: b.snapshot.clone(),
        epoch: b.epoch,
        size: b.size,
        state: state.into(),
        error,
        nodes: b.nodes.iter().map(|n| n.0).collect(),
        copies: b.copies.iter().map(|(n, c)| copy_proto(*n, c)).collect(),
        created_unix_ms: b.created_unix_ms,
        finished_unix_ms: b.finished_unix_ms,
        progress: None,
        volume_deleted: !s.volumes.get(&b.volume).is_some_and(|v| v.state == VolumeState::Active),
        auto_snapshot: b.auto_snapshot,
    }
}

impl AdminService {
    /// Backup-role nodes that are up, by id.
    fn backup_nodes_up(&self, s: &ClusterState) -> Vec<NodeId> {
        s.nodes.values().filter(|n| n.roles.contains(&Role::Backup) && self.ctx.liveness.state(n.id).0 == "up").map(|n| n.id).collect()
    }

    fn node_addr(&self, s: &ClusterState, node: NodeId) -> Result<String, Status> {
        s.nodes.get(&node).map(|n| n.addr.clone()).ok_or_else(|| Status::failed_precondition(format!("{node} is not in the cluster any more")))
    }

    /// A job's progress on `node` (`None` if it does not answer).
    async fn job_progress(&self, s: &ClusterState, node: NodeId, req: ProgressRequest) -> Option<JobProgress> {
        let addr = self.node_addr(s, node).ok()?;
        let mut c = self.ctx.clients.backup(&addr).ok()?;
        tokio::time::timeout(Duration::from_secs(2), c.progress(req)).await.ok()?.ok().map(|r| r.into_inner())
    }

    /// The slowest copy's progress of a running backup.
    async fn backup_with_progress(&self, s: &ClusterState, b: &BackupRecord) -> Backup {
        let mut out = backup_proto(s, b);
        if b.state == BackupState::Running {
            let mut slowest: Option<JobProgress> = None;
            for node in b.nodes.iter().filter(|n| !b.copies.contains_key(n)) {
                if let Some(p) = self.job_progress(s, *node, ProgressRequest { backup: b.id, restore_volume: 0 }).await
                    && slowest.as_ref().is_none_or(|x| p.done * x.total.max(1) < x.done * p.total.max(1))
                {
                    slowest = Some(p);
                }
            }
            out.progress = slowest;
        }
        out
    }

    async fn restore_status(&self, s: &ClusterState, name: &str) -> Result<RestoreStatusReply, Status> {
        let v = s.volume_by_name(name).ok_or_else(|| status_of(&MetaError::NoSuchVolume(name.to_string())))?;
        let Some(r) = s.backups.restores.get(&v.id) else {
            return Ok(RestoreStatusReply { volume: Some(volume_in(s, v)), restoring: false, ..Default::default() });
        };
        let mut progress = self.job_progress(s, r.node, ProgressRequest { backup: 0, restore_volume: v.id.0 }).await;
        if let Some(p) = progress.as_mut()
            && p.error.is_empty()
            && let Some(e) = &r.error
        {
            p.error = e.clone();
        }
        let progress = progress.or_else(|| Some(JobProgress { error: r.error.clone().unwrap_or_default(), ..Default::default() }));
        Ok(RestoreStatusReply { volume: Some(volume_in(s, v)), restoring: true, backup: r.backup, node: r.node.0, progress })
    }

    /// `backup create`: a snapshot (unless one is named), the catalog entry, and the copy
    /// handed to each backup node.
    pub(super) async fn create_backup(&self, meta: &MetaHandle, caller: &Caller, msg: BackupCreateRequest) -> Result<Response<BackupReply>, Status> {
        let s = self.read(meta).await?;
        if s.volume_by_name(&msg.volume).is_none() {
            return Err(status_of(&MetaError::NoSuchVolume(msg.volume.clone())));
        }
        let up = self.backup_nodes_up(&s);
        if up.is_empty() {
            return Err(Status::failed_precondition(
                "no backup-role node is up: backups are kept on backup nodes (start one with roles = [\"backup\"])",
            ));
        }
        let nodes: Vec<NodeId> = up.into_iter().take(BACKUP_COPIES).collect();
        let (snapshot, auto) = if msg.snapshot.is_empty() {
            let name = format!("backup-{}", now_ms());
            let cmd = MetaCommand::CreateSnapshot { volume: msg.volume.clone(), name: name.clone(), now_unix_ms: now_ms() };
            if let MetaReply::Error(e) = self.propose_audited(meta, cmd, caller, Action::SnapshotCreate, &format!("{}@{name}", msg.volume)).await? {
                return Err(status_of(&e));
            }
            self.await_cut(meta, &msg.volume, &name).await?;
            (name, true)
        } else {
            (msg.snapshot.clone(), false)
        };
        let target = format!("{}@{snapshot}", msg.volume);
        let cmd = MetaCommand::BeginBackup { volume: msg.volume.clone(), snapshot, nodes, auto_snapshot: auto, now_unix_ms: now_ms() };
        let record = match self.propose_audited(meta, cmd, caller, Action::BackupCreate, &target).await? {
            MetaReply::Backup(b) => b,
            MetaReply::Error(e) => return Err(status_of(&e)),
            other => return Err(Status::internal(format!("unexpected meta reply {other:?}"))),
        };
        tracing::info!(backup = record.id, of = %target, nodes = ?record.nodes, by = %caller.principal, "backup started");
        let s = meta.shared.snapshot();
        for node in &record.nodes {
            if let Err(e) = self.dispatch_copy(&s, &record, *node).await {
                let outcome = Err(format!("could not hand the copy to it: {}", e.message()));
                self.propose(meta, MetaCommand::BackupCopied { id: record.id, node: *node, outcome, now_unix_ms: now_ms() }).await?;
            }
        }
        let s = meta.shared.snapshot();
        let b = s.backups.records.get(&record.id).unwrap_or(&record);
        Ok(Response::new(BackupReply { backup: Some(self.backup_with_progress(&s, b).await) }))
    }

    async fn dispatch_copy(&self, s: &ClusterState, b: &BackupRecord, node: NodeId) -> Result<(), Status> {
        let addr = self.node_addr(s, node)?;
        let mut c = self.ctx.clients.backup(&addr)?;
        let req = CopyBackupRequest {
            id: b.id,
            volume: b.volume_name.clone(),
            volume_id: b.volume.0,
            snapshot: b.snapshot.clone(),
            epoch: b.epoch,
            size: b.size,
        };
        tokio::time::timeout(DISPATCH_WAIT, c.copy_backup(req)).await.map_err(|_| Status::unavailable(format!("{node} did not answer")))??;
        Ok(())
    }

    async fn dispatch_restore(&self, s: &ClusterState, r: &Restore, volume: &str) -> Result<(), Status> {
        let v = s.volume_by_name(volume).ok_or_else(|| status_of(&MetaError::NoSuchVolume(volume.to_string())))?;
        let addr = self.node_addr(s, r.node)?;
        let mut c = self.ctx.clients.backup(&addr)?;
        let req =
            RunRestoreRequest { backup: r.backup, volume: v.name.clone(), volume_id: v.id.0, attach_epoch: v.attach_epoch, next_chunk: r.next_chunk };
        tokio::time::timeout(DISPATCH_WAIT, c.run_restore(req)).await.map_err(|_| Status::unavailable(format!("{} did not answer", r.node)))??;
        Ok(())
    }

    /// `backup list`.
    pub(super) async fn list_backups(&self, meta: &MetaHandle, caller: &Caller, msg: BackupListRequest) -> Result<Response<BackupListReply>, Status> {
        let s = self.read(meta).await?;
        let mut backups = Vec::new();
        for b in s.backups.records.values() {
            if (!msg.volume.is_empty() && b.volume_name != msg.volume)
                || (msg.running_only && b.state != BackupState::Running)
                || !caller.principal.sees_volume(&b.volume_name)
            {
                continue;
            }
            backups.push(if msg.running_only { self.backup_with_progress(&s, b).await } else { backup_proto(&s, b) });
        }
        let mut restores = Vec::new();
        for (vid, r) in &s.backups.restores {
            let Some(v) = s.volumes.get(vid) else { continue };
            if !caller.principal.sees_volume(&v.name) {
                continue;
            }
            let progress = Some(JobProgress { error: r.error.clone().unwrap_or_default(), done: r.next_chunk, ..Default::default() });
            restores.push(RestoreStatusReply { volume: Some(volume_in(&s, v)), restoring: true, backup: r.backup, node: r.node.0, progress });
        }
        Ok(Response::new(BackupListReply { backups, next_id: s.backups.next_id.max(1), restores }))
    }

    fn record<'a>(&self, s: &'a ClusterState, caller: &Caller, id: u64) -> Result<&'a BackupRecord, Status> {
        s.backups.records.get(&id).filter(|b| caller.principal.sees_volume(&b.volume_name)).ok_or_else(|| status_of(&MetaError::NoSuchBackup(id)))
    }

    /// `backup show`.
    pub(super) async fn show_backup(&self, meta: &MetaHandle, caller: &Caller, id: u64) -> Result<Response<BackupReply>, Status> {
        let s = self.read(meta).await?;
        let b = self.record(&s, caller, id)?;
        Ok(Response::new(BackupReply { backup: Some(self.backup_with_progress(&s, b).await) }))
    }

    /// `backup delete`: the catalog entry goes; each node erases its copy's pieces that no
    /// other backup names (`crate::backup_node`'s sweep).
    pub(super) async fn delete_backup(&self, meta: &MetaHandle, caller: &Caller, id: u64) -> Result<Response<BackupReply>, Status> {
        let s = self.read(meta).await?;
        self.record(&s, caller, id)?;
        let b = match self.propose_audited(meta, MetaCommand::DeleteBackup { id }, caller, Action::BackupDelete, &format!("backup {id}")).await? {
            MetaReply::Backup(b) => b,
            MetaReply::Error(e) => return Err(status_of(&e)),
            other => return Err(Status::internal(format!("unexpected meta reply {other:?}"))),
        };
        tracing::info!(backup = id, by = %caller.principal, "backup deleted; its nodes erase what only it held");
        let s = meta.shared.snapshot();
        for node in &b.nodes {
            if let Ok(addr) = self.node_addr(&s, *node)
                && let Ok(mut c) = self.ctx.clients.backup(&addr)
            {
                // A node that misses this erases the copy at its next sweep.
                let _ = tokio::time::timeout(DISPATCH_WAIT, c.drop_copy(CopyRef { id })).await;
            }
        }
        Ok(Response::new(BackupReply { backup: Some(backup_proto(&s, &b)) }))
    }

    /// `backup verify`: every node keeping the backup reads each of its pieces back.
    pub(super) async fn verify_backup(&self, meta: &MetaHandle, caller: &Caller, id: u64) -> Result<Response<BackupVerifyReply>, Status> {
        let s = self.read(meta).await?;
        let b = self.record(&s, caller, id)?.clone();
        if b.state != BackupState::Complete {
            return Err(status_of(&MetaError::Backup(format!("backup {id} is {}; only complete backups are verified", describe(&b.state)))));
        }
        let mut reply = BackupVerifyReply { backup: Some(backup_proto(&s, &b)), ..Default::default() };
        for node in b.copies.keys() {
            let addr = self.node_addr(&s, *node)?;
            let mut c = self.ctx.clients.backup(&addr)?;
            let copy = match tokio::time::timeout(VERIFY_WAIT, c.verify_copy(CopyRef { id })).await {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(e)) => VerifyCopyReply { bad: vec![format!("{node} could not verify its copy: {}", e.message())], ..Default::default() },
                Err(_) => VerifyCopyReply { bad: vec![format!("{node} did not finish verifying within {VERIFY_WAIT:?}")], ..Default::default() },
            };
            reply.nodes.push(node.0);
            reply.copies.push(copy);
        }
        Ok(Response::new(reply))
    }

    /// `backup restore ID --to NAME`: a new volume held by the restore, filled by a backup
    /// node that keeps the backup; asked again for the same pair, it resumes the restore.
    pub(super) async fn restore_backup(
        &self,
        meta: &MetaHandle,
        caller: &Caller,
        msg: BackupRestoreRequest,
    ) -> Result<Response<RestoreStatusReply>, Status> {
        let s = self.read(meta).await?;
        let b = self.record(&s, caller, msg.id)?.clone();
        if let Some(v) = s.volume_by_name(&msg.to) {
            return match s.backups.restores.get(&v.id) {
                Some(r) if r.backup == msg.id => {
                    if r.error.is_some()
                        || self.job_progress(&s, r.node, ProgressRequest { backup: 0, restore_volume: v.id.0 }).await.is_none_or(|p| !p.running)
                    {
                        tracing::info!(backup = msg.id, volume = %msg.to, "resuming a restore");
                        self.propose(meta, MetaCommand::RestoreProgress { volume: v.id, next_chunk: r.next_chunk, done: false, error: None }).await?;
                        self.dispatch_restore(&s, r, &msg.to).await?;
                    }
                    Ok(Response::new(self.restore_status(&meta.shared.snapshot(), &msg.to).await?))
                }
                _ => Err(status_of(&MetaError::VolumeExists(msg.to.clone()))),
            };
        }
        let up = self.backup_nodes_up(&s);
        let node = b.copies.keys().find(|n| up.contains(n)).copied().ok_or_else(|| {
            Status::unavailable(format!("no node keeping backup {} is up (kept on {:?})", msg.id, b.copies.keys().map(|n| n.0).collect::<Vec<_>>()))
        })?;
        let cmd = MetaCommand::BeginRestore { backup: msg.id, name: msg.to.clone(), node, now_unix_ms: now_ms() };
        let target = format!("backup {} to {}", msg.id, msg.to);
        if let MetaReply::Error(e) = self.propose_audited(meta, cmd, caller, Action::BackupRestore, &target).await? {
            return Err(status_of(&e));
        }
        tracing::info!(backup = msg.id, volume = %msg.to, %node, by = %caller.principal, "restore started");
        let s = meta.shared.snapshot();
        let vid = s.volume_by_name(&msg.to).map(|v| v.id).ok_or_else(|| Status::internal("the restored volume vanished"))?;
        let r = s.backups.restores.get(&vid).cloned().ok_or_else(|| Status::internal("the restore vanished"))?;
        if let Err(e) = self.dispatch_restore(&s, &r, &msg.to).await {
            let error = Some(format!("could not hand the restore to {node}: {}", e.message()));
            self.propose(meta, MetaCommand::RestoreProgress { volume: vid, next_chunk: 0, done: false, error }).await?;
        }
        Ok(Response::new(self.restore_status(&meta.shared.snapshot(), &msg.to).await?))
    }

    /// `RestoreStatus`.
    pub(super) async fn show_restore(&self, meta: &MetaHandle, volume: &str) -> Result<Response<RestoreStatusReply>, Status> {
        let s = self.read(meta).await?;
        Ok(Response::new(self.restore_status(&s, volume).await?))
    }

    /// A backup node's report: a copy's end, or a restore's progress or end.
    pub(super) async fn backup_reported(&self, meta: &MetaHandle, msg: BackupReportRequest) -> Result<Response<BackupReportReply>, Status> {
        let node = NodeId(msg.node);
        if msg.backup != 0 {
            let outcome = if msg.error.is_empty() {
                let st = msg.stats.unwrap_or_default();
                Ok(CopyStats {
                    data_bytes: st.data_bytes,
                    changed_bytes: st.changed_bytes,
                    stored_bytes: st.stored_bytes,
                    parent: st.parent,
                    duration_ms: st.duration_ms,
                })
            } else {
                Err(msg.error.clone())
            };
            let b = match self.propose(meta, MetaCommand::BackupCopied { id: msg.backup, node, outcome, now_unix_ms: now_ms() }).await? {
                MetaReply::Backup(b) => b,
                // Deleted meanwhile: nothing to record.
                MetaReply::Error(MetaError::NoSuchBackup(_)) => return Ok(Response::new(BackupReportReply {})),
                MetaReply::Error(e) => return Err(status_of(&e)),
                other => return Err(Status::internal(format!("unexpected meta reply {other:?}"))),
            };
            match &b.state {
                BackupState::Complete => tracing::info!(backup = b.id, volume = %b.volume_name, "backup complete"),
                BackupState::Failed(why) => tracing::warn!(backup = b.id, volume = %b.volume_name, why, "backup failed"),
                BackupState::Running => {}
            }
            if b.auto_snapshot && b.state != BackupState::Running {
                // The snapshot taken for it has served; the volume may be gone already.
                let cmd = MetaCommand::DeleteSnapshot { volume: b.volume_name.clone(), name: b.snapshot.clone() };
                let _ = self.propose(meta, cmd).await;
            }
        }
        if msg.restore_volume != 0 {
            let error = (!msg.error.is_empty()).then(|| msg.error.clone());
            let volume = basalt_common::VolumeId(msg.restore_volume);
            if let MetaReply::Error(e) =
                self.propose(meta, MetaCommand::RestoreProgress { volume, next_chunk: msg.next_chunk, done: msg.done, error }).await?
            {
                return Err(status_of(&e));
            }
            if msg.done && msg.error.is_empty() {
                tracing::info!(volume = msg.restore_volume, "restore complete; the volume is attachable");
            }
        }
        Ok(Response::new(BackupReportReply {}))
    }
}
