//! The meta leader's side of backups: the admin calls on the catalog (`super::backups`) and
//! the backup nodes' reports. The copying and restoring run on backup-role nodes
//! (`crate::backup_node`); the leader hands each job to its node and records what comes back.

use std::time::Duration;

use basalt_common::{NodeId, VolumeId};
use basalt_proto::admin::{
    Backup, BackupCopyStats, BackupCreateRequest, BackupListReply, BackupListRequest, BackupReply, BackupReportReply, BackupReportRequest,
    BackupRestoreRequest, BackupVerifyReply, CopyBackupRequest, CopyRef, JobProgress, ProgressRequest, RestoreStatusReply, RunRestoreRequest,
    Schedule as ScheduleMsg, ScheduleListReply, ScheduleReply, VerifyCopyReply, VersionedKey, VolumeKeyReply,
};
use basalt_security::audit::Outcome;
use basalt_security::{Action, Principal};
use tonic::{Response, Status};

use super::backups::{BackupRecord, BackupState, CopyStats, Restore, Schedule, describe, retention};
use super::service::{AdminService, now_ms, status_of, volume_in};
use super::state::{ClusterState, MetaCommand, MetaError, MetaReply, Role, VolumeKeys, VolumeState};
use crate::access::Caller;
use crate::node::MetaHandle;

/// How long the leader waits for a backup node to take a job.
const DISPATCH_WAIT: Duration = Duration::from_secs(5);

/// How long `backup verify` waits for a node to read its copy back.
const VERIFY_WAIT: Duration = Duration::from_secs(3600);

fn copy_proto(node: NodeId, c: &CopyStats) -> BackupCopyStats {
    BackupCopyStats {
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
        schedule: b.schedule.clone().unwrap_or_default(),
        pinned: b.pinned,
        volume_deleted_unix_ms: b.volume_deleted_unix_ms,
        encrypted: s.backup_keys.contains_key(&b.id),
    }
}

fn schedule_proto(s: &ClusterState, sc: &Schedule) -> ScheduleMsg {
    ScheduleMsg {
        name: sc.name.clone(),
        volumes: sc.volumes.clone(),
        all: sc.all,
        every_secs: sc.every_secs,
        at: sc.at_minute.map(|m| format!("{:02}:{:02}", m / 60, m % 60)).unwrap_or_default(),
        keep: sc.keep,
        max_age_secs: sc.max_age_secs,
        created_unix_ms: sc.created_unix_ms,
        last_run_unix_ms: sc.last_run_unix_ms,
        next_run_unix_ms: sc.next_due(),
        backups: s.backups.records.values().filter(|b| b.schedule.as_deref() == Some(&sc.name)).count() as u32,
    }
}

/// Whether `caller` sees schedule `sc`: every volume it names (and, for `--all`, every volume).
fn sees_schedule(caller: &Caller, sc: &Schedule) -> bool {
    let unscoped = !matches!(&caller.principal, Principal::Token(t) if !t.volumes.is_empty());
    if sc.all { unscoped } else { sc.volumes.iter().all(|v| caller.principal.sees_volume(v)) }
}

/// Parses `HH:MM` (UTC) into minutes past midnight.
fn parse_at(at: &str) -> Result<Option<u32>, Status> {
    if at.is_empty() {
        return Ok(None);
    }
    let bad = || Status::invalid_argument(format!("--at {at:?} is not a time of day HH:MM (UTC, 00:00 to 23:59)"));
    let (h, m) = at.split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 || at.len() != 5 {
        return Err(bad());
    }
    Ok(Some(h * 60 + m))
}

/// Schedules whose run this leader is still starting (taking snapshots before their backups
/// are recorded as running).
type InFlight = std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>;

/// A running copy whose node is not up this long after the backup began is failed.
const STALLED_AFTER_MS: u64 = 60_000;

/// How often the meta leader looks at schedules and retention.
const SCHEDULER_TICK: Duration = Duration::from_secs(1);

/// Runs schedules and retention while this node leads the meta group (see `scheduler_pass`).
pub async fn run_scheduler(service: AdminService, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let service = std::sync::Arc::new(service);
    let in_flight = InFlight::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SCHEDULER_TICK) => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = service.clone().scheduler_pass(&in_flight).await {
            tracing::debug!(error = %e.message(), "backup scheduler pass deferred");
        }
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
                if let Some(p) = self.job_progress(s, *node, ProgressRequest { backup: b.id, ..Default::default() }).await
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
        let mut progress = self.job_progress(s, r.node, ProgressRequest { restore_volume: v.id.0, ..Default::default() }).await;
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
    pub(super) async fn create_backup(
        &self,
        meta: &MetaHandle,
        caller: &Caller,
        msg: BackupCreateRequest,
        schedule: Option<String>,
    ) -> Result<Response<BackupReply>, Status> {
        let s = self.read(meta).await?;
        let Some(v) = s.volume_by_name(&msg.volume) else {
            return Err(status_of(&MetaError::NoSuchVolume(msg.volume.clone())));
        };
        let vid = v.id;
        if s.backups.restores.contains_key(&v.id) {
            return Err(status_of(&MetaError::Restoring { volume: v.name.clone(), backup: s.backups.restores[&v.id].backup }));
        }
        let up = self.backup_nodes_up(&s);
        if up.is_empty() {
            return Err(Status::failed_precondition(
                "no backup-role node is up: backups are kept on backup nodes (start one with roles = [\"backup\"])",
            ));
        }
        let nodes: Vec<NodeId> = up.into_iter().take(self.ctx.config.backup.copies as usize).collect();
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
        let begun = async {
            let cmd = match self.backup_key_copies(meta, vid, &msg.volume).await? {
                None => MetaCommand::BeginBackup {
                    volume: msg.volume.clone(),
                    snapshot: snapshot.clone(),
                    nodes,
                    auto_snapshot: auto,
                    schedule,
                    now_unix_ms: now_ms(),
                },
                Some(keys) => MetaCommand::BeginEncryptedBackup {
                    volume: msg.volume.clone(),
                    snapshot: snapshot.clone(),
                    nodes,
                    auto_snapshot: auto,
                    schedule,
                    now_unix_ms: now_ms(),
                    keys,
                },
            };
            self.propose_audited(meta, cmd, caller, Action::BackupCreate, &target).await
        };
        let record = match begun.await {
            Ok(MetaReply::Backup(b)) => b,
            other => {
                if auto {
                    let cmd = MetaCommand::DeleteSnapshot { volume: msg.volume.clone(), name: snapshot };
                    let _ = self.propose(meta, cmd).await;
                }
                return Err(match other {
                    Err(status) => status,
                    Ok(MetaReply::Error(e)) => status_of(&e),
                    Ok(other) => Status::internal(format!("unexpected meta reply {other:?}")),
                });
            }
        };
        tracing::info!(backup = record.id, of = %target, nodes = ?record.nodes, by = %caller.principal, "backup started");
        let s = meta.shared.snapshot();
        for node in &record.nodes {
            if let Err(e) = self.dispatch_copy(&s, &record, *node).await {
                let outcome = Err(format!("could not hand the copy to it: {}", e.message()));
                if let MetaReply::Backup(b) =
                    self.propose(meta, MetaCommand::BackupCopied { id: record.id, node: *node, outcome, now_unix_ms: now_ms() }).await?
                {
                    self.copies_ended(meta, &b).await;
                }
                // The backup failed; the other nodes need not copy it.
                break;
            }
        }
        let s = meta.shared.snapshot();
        let b = s.backups.records.get(&record.id).unwrap_or(&record);
        Ok(Response::new(BackupReply { backup: Some(self.backup_with_progress(&s, b).await) }))
    }

    /// An encrypted volume's backup keeps its own copies of the volume's key versions (the
    /// same wrapped bytes under a new key id, on a majority of the key stores): the volume's
    /// own go when it is deleted or re-encrypted, the backup's when the backup is. `None` for a
    /// plain volume.
    async fn backup_key_copies(&self, meta: &MetaHandle, volume: VolumeId, name: &str) -> Result<Option<VolumeKeys>, Status> {
        let Some(theirs) = self.read(meta).await?.volume_keys.get(&volume).cloned() else { return Ok(None) };
        let mut versions = Vec::with_capacity(theirs.digests.len());
        for version in theirs.digests.keys() {
            versions.push((*version, super::keys::fetch(&self.ctx, meta, name, &theirs, *version).await?));
        }
        Ok(Some(super::keys::store_rewrapped(&self.ctx, meta, theirs.current, &versions).await?))
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
            // `done` carries the first chunk not yet written: where the node resumes it.
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
        let b = self.drop_backup(meta, caller, id, "").await?;
        let s = meta.shared.snapshot();
        Ok(Response::new(BackupReply { backup: Some(backup_proto(&s, &b)) }))
    }

    /// Deletes backup `id` from the catalog (audited, `why` in the record's detail) and asks
    /// its nodes to erase their copies.
    async fn drop_backup(&self, meta: &MetaHandle, caller: &Caller, id: u64, why: &str) -> Result<BackupRecord, Status> {
        let cmd = MetaCommand::DeleteBackup { id };
        let event = caller.event(Action::BackupDelete.as_str(), &format!("backup {id}"), basalt_security::audit::Outcome::Ok, why.to_string());
        let b = match self.propose(meta, MetaCommand::Audited { cmd: Box::new(cmd), event }).await? {
            MetaReply::Backup(b) => b,
            MetaReply::Error(e) => return Err(status_of(&e)),
            other => return Err(Status::internal(format!("unexpected meta reply {other:?}"))),
        };
        tracing::info!(backup = id, by = %caller.principal, why, "backup deleted; its nodes erase what only it held");
        let s = meta.shared.snapshot();
        for node in &b.nodes {
            if let Ok(addr) = self.node_addr(&s, *node)
                && let Ok(mut c) = self.ctx.clients.backup(&addr)
            {
                // A node that misses this erases the copy at its next sweep.
                let _ = tokio::time::timeout(DISPATCH_WAIT, c.drop_copy(CopyRef { id })).await;
            }
        }
        Ok(b)
    }

    /// `backup pin ID [--unpin]`.
    pub(super) async fn pin(&self, meta: &MetaHandle, caller: &Caller, id: u64, pinned: bool) -> Result<Response<BackupReply>, Status> {
        self.record(&self.read(meta).await?, caller, id)?;
        let target = format!("backup {id}");
        let b = match self.propose_audited(meta, MetaCommand::PinBackup { id, pinned }, caller, Action::BackupPin, &target).await? {
            MetaReply::Backup(b) => b,
            MetaReply::Error(e) => return Err(status_of(&e)),
            other => return Err(Status::internal(format!("unexpected meta reply {other:?}"))),
        };
        let s = meta.shared.snapshot();
        Ok(Response::new(BackupReply { backup: Some(backup_proto(&s, &b)) }))
    }

    /// `schedule create`.
    pub(super) async fn create_schedule(&self, meta: &MetaHandle, caller: &Caller, msg: ScheduleMsg) -> Result<Response<ScheduleReply>, Status> {
        let schedule = Schedule {
            name: msg.name.clone(),
            volumes: msg.volumes.clone(),
            all: msg.all,
            every_secs: msg.every_secs,
            at_minute: parse_at(&msg.at)?,
            keep: msg.keep,
            max_age_secs: msg.max_age_secs,
            created_unix_ms: now_ms(),
            last_run_unix_ms: 0,
        };
        let s = self.read(meta).await?;
        for v in &schedule.volumes {
            if s.volume_by_name(v).is_none() {
                return Err(status_of(&MetaError::NoSuchVolume(v.clone())));
            }
        }
        let target = format!("schedule {}", msg.name);
        if let MetaReply::Error(e) =
            self.propose_audited(meta, MetaCommand::CreateSchedule { schedule }, caller, Action::BackupCreate, &target).await?
        {
            return Err(status_of(&e));
        }
        let s = meta.shared.snapshot();
        let sc = s.backups.schedules.get(&msg.name).ok_or_else(|| Status::internal("the schedule vanished"))?;
        Ok(Response::new(ScheduleReply { schedule: Some(schedule_proto(&s, sc)) }))
    }

    /// `schedule list`: the schedules of volumes the caller sees (`--all` ones for callers
    /// that see every volume).
    pub(super) async fn list_schedules(&self, meta: &MetaHandle, caller: &Caller) -> Result<Response<ScheduleListReply>, Status> {
        let s = self.read(meta).await?;
        let schedules = s.backups.schedules.values().filter(|sc| sees_schedule(caller, sc)).map(|sc| schedule_proto(&s, sc)).collect();
        Ok(Response::new(ScheduleListReply { schedules }))
    }

    /// `schedule delete`.
    pub(super) async fn delete_schedule(&self, meta: &MetaHandle, caller: &Caller, name: &str) -> Result<Response<ScheduleReply>, Status> {
        let s = self.read(meta).await?;
        let found = s.backups.schedules.get(name).filter(|sc| sees_schedule(caller, sc));
        if found.is_none() {
            return Err(status_of(&MetaError::NoSuchSchedule(name.to_string())));
        }
        let sc = found.map(|sc| schedule_proto(&s, sc));
        let target = format!("schedule {name}");
        let cmd = MetaCommand::DeleteSchedule { name: name.to_string() };
        if let MetaReply::Error(e) = self.propose_audited(meta, cmd, caller, Action::BackupDelete, &target).await? {
            return Err(status_of(&e));
        }
        Ok(Response::new(ScheduleReply { schedule: sc }))
    }

    /// One pass of the scheduler on the meta leader: due schedules run (a backup of each of
    /// their volumes; a schedule whose previous run still has a backup copying waits), then
    /// retention deletes what schedules prune and what expired after its volume's deletion.
    async fn scheduler_pass(self: std::sync::Arc<Self>, in_flight: &InFlight) -> Result<(), Status> {
        let Some(meta) = self.ctx.meta.as_ref() else { return Ok(()) };
        if !meta.group.status().is_leader {
            return Ok(());
        }
        let s = meta.shared.snapshot();
        let now = now_ms();
        let caller = Caller { principal: Principal::Node(self.ctx.config.id.0), source: "backup scheduler".into() };
        for sc in s.backups.schedules.values() {
            if now < sc.next_due() {
                continue;
            }
            let busy = s.backups.records.values().any(|b| b.schedule.as_deref() == Some(&sc.name) && b.state == BackupState::Running)
                || in_flight.lock().unwrap_or_else(|p| p.into_inner()).contains(&sc.name);
            if busy {
                continue;
            }
            // Recorded first: a leader change mid-run does not run it again.
            self.propose(meta, MetaCommand::ScheduleRan { name: sc.name.clone(), now_unix_ms: now }).await?;
            let volumes: Vec<String> = if sc.all {
                s.volumes
                    .values()
                    .filter(|v| v.state == VolumeState::Active && !s.backups.restores.contains_key(&v.id))
                    .map(|v| v.name.clone())
                    .collect()
            } else {
                sc.volumes.clone()
            };
            tracing::info!(schedule = %sc.name, volumes = volumes.len(), "schedule run");
            let (me, name, caller, in_flight) = (self.clone(), sc.name.clone(), caller.clone(), in_flight.clone());
            in_flight.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone());
            tokio::spawn(async move {
                if let Some(meta) = me.ctx.meta.as_ref() {
                    for volume in volumes {
                        let req = BackupCreateRequest { volume: volume.clone(), snapshot: String::new() };
                        if let Err(e) = me.create_backup(meta, &caller, req, Some(name.clone())).await {
                            tracing::warn!(schedule = %name, volume, error = %e.message(), "scheduled backup not taken");
                        }
                    }
                }
                in_flight.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
            });
        }
        // Copies handed to a node that has been down a while will not finish: the backup fails
        // (it can be deleted, and its schedule runs again).
        for b in s.backups.records.values().filter(|b| b.state == BackupState::Running && now.saturating_sub(b.created_unix_ms) > STALLED_AFTER_MS) {
            for node in b.nodes.iter().filter(|n| !b.copies.contains_key(n) && self.ctx.liveness.state(**n).0 != "up") {
                let outcome = Err(format!("{node} is down; the copy cannot finish"));
                if let MetaReply::Backup(b) =
                    self.propose(meta, MetaCommand::BackupCopied { id: b.id, node: *node, outcome, now_unix_ms: now }).await?
                {
                    self.copies_ended(meta, &b).await;
                }
            }
        }
        let (delete, orphaned) = retention(&s, now, self.ctx.config.backup.retain_after_delete.as_millis() as u64);
        if !orphaned.is_empty() {
            self.propose(meta, MetaCommand::BackupsOrphaned { ids: orphaned, now_unix_ms: now }).await?;
        }
        for (id, why) in delete {
            self.drop_backup(meta, &caller, id, &why).await?;
        }
        Ok(())
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

    /// How far a running `backup verify` of `id` got, summed over the nodes keeping it (those
    /// not verifying right now count nothing).
    pub(super) async fn verify_progress(&self, meta: &MetaHandle, caller: &Caller, id: u64) -> Result<Response<JobProgress>, Status> {
        let s = self.read(meta).await?;
        let b = self.record(&s, caller, id)?.clone();
        let mut sum = JobProgress::default();
        for node in b.copies.keys() {
            if let Some(p) = self.job_progress(&s, *node, ProgressRequest { verify: id, ..Default::default() }).await {
                sum.running |= p.running;
                sum.done += p.done;
                sum.total += p.total;
                sum.bytes += p.bytes;
            }
        }
        Ok(Response::new(sum))
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
                        || self
                            .job_progress(&s, r.node, ProgressRequest { restore_volume: v.id.0, ..Default::default() })
                            .await
                            .is_none_or(|p| !p.running)
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
        let cmd = if msg.keys.is_empty() {
            MetaCommand::BeginRestore { backup: msg.id, name: msg.to.clone(), node, now_unix_ms: now_ms() }
        } else {
            // The new volume's keys are on a majority before it exists (copies of a restore
            // that is then refused are swept as unreferenced).
            let theirs = s.backup_keys.get(&msg.id).ok_or_else(|| {
                Status::invalid_argument(format!("backup {} is of a volume that is not encrypted: its restore takes no keys (no --kek-file)", msg.id))
            })?;
            let existing: Vec<u32> = theirs.keys.digests.keys().copied().collect();
            let next = existing.last().copied().unwrap_or(0) + 1;
            let versions: Vec<(u32, Vec<u8>)> = msg.keys.iter().map(|k| (k.version, k.wrapped.to_vec())).collect();
            if next > u32::from(u16::MAX) || versions.iter().map(|(v, _)| *v).ne(existing.iter().copied().chain([next])) {
                return Err(Status::invalid_argument(format!(
                    "a restore of backup {} must carry its key versions {existing:?} rewrapped for {}, then a new version {next}, in order",
                    msg.id, msg.to
                )));
            }
            let keys = super::keys::store_rewrapped(&self.ctx, meta, next, &versions).await?;
            MetaCommand::BeginEncryptedRestore { backup: msg.id, name: msg.to.clone(), node, now_unix_ms: now_ms(), keys }
        };
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

    /// `BackupKey`: the wrapped key copies of an encrypted volume's backup, and the volume each
    /// version's blocks are bound to.
    pub(super) async fn backup_key(&self, meta: &MetaHandle, caller: &Caller, id: u64) -> Result<Response<VolumeKeyReply>, Status> {
        let s = self.read(meta).await?;
        let b = self.record(&s, caller, id)?;
        let keys = s.backup_keys.get(&id).ok_or_else(|| Status::failed_precondition(format!("backup {id} is of a volume that is not encrypted")))?;
        let label = format!("backup {id} of {}", b.volume_name);
        let mut out = Vec::with_capacity(keys.keys.digests.len());
        for version in keys.keys.digests.keys() {
            let wrapped = super::keys::fetch(&self.ctx, meta, &label, &keys.keys, *version).await?;
            let sealed_as = keys.sealed_as.get(version).map_or(b.volume.0, |v| v.0);
            out.push(VersionedKey { version: *version, wrapped: wrapped.into(), sealed_as });
        }
        self.ctx.access.record(caller.event("backup.key", &label, Outcome::Ok, format!("{} wrapped key version(s)", out.len())));
        Ok(Response::new(VolumeKeyReply { volume_id: b.volume.0, current_version: keys.keys.current, keys: out }))
    }

    /// `RestoreStatus`.
    pub(super) async fn show_restore(&self, meta: &MetaHandle, volume: &str) -> Result<Response<RestoreStatusReply>, Status> {
        let s = self.read(meta).await?;
        Ok(Response::new(self.restore_status(&s, volume).await?))
    }

    /// Once no copy of `b` runs any more, deletes the snapshot taken for it (it has served; the
    /// volume may be gone already).
    async fn copies_ended(&self, meta: &MetaHandle, b: &BackupRecord) {
        if b.auto_snapshot && b.state != BackupState::Running {
            let cmd = MetaCommand::DeleteSnapshot { volume: b.volume_name.clone(), name: b.snapshot.clone() };
            let _ = self.propose(meta, cmd).await;
        }
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
            self.copies_ended(meta, &b).await;
        }
        if msg.restore_volume != 0 {
            let error = (!msg.error.is_empty()).then(|| msg.error.clone());
            let volume = basalt_common::VolumeId(msg.restore_volume);
            let runner = meta.shared.with(|s| s.backups.restores.get(&volume).map(|r| r.node));
            if runner.is_some_and(|n| n != node) {
                return Err(Status::permission_denied(format!("the restore into volume {volume} is not node-{}'s", node.0)));
            }
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
