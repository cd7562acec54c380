//! The admin API. Any node answers it: a request that needs the meta group runs on the meta
//! leader, and other nodes forward it there (at most two hops: a non-meta node forwards to a
//! meta node, which forwards to the leader), so the CLI and clients can talk to any node.
//!
//! The node where a request runs authenticates and authorises it ([`crate::access`]); a node
//! forwarding it passes the caller's token, address and certificate identity along, which the
//! next node believes only because a node's certificate vouches for them. Every administrative
//! change is proposed together with its audit record (`MetaCommand::Audited`), so the change
//! and its record commit or fail together; refusals and node-local actions reach the audit log
//! through the node's audit queue ([`run_audit_shipper`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use basalt_common::version::VersionRange;
use basalt_common::{DomainLevel, Layout, NodeId, PgId, VolumeId};
use basalt_proto::admin::admin_client::AdminClient;
use basalt_proto::admin::admin_server::Admin;
use basalt_proto::admin::{
    Ancestor, AuditAppendReply, AuditAppendRequest, AuditCheckRequest, AuditListReply, AuditListRequest, AuditNodeVerdict, AuditReportRequest,
    AuditVerifyReply, AuditVerifyRequest, BackupCreateRequest, BackupListReply, BackupListRequest, BackupPinRequest, BackupReply, BackupReportReply,
    BackupReportRequest, BackupRestoreRequest, BackupShowRequest, BackupVerifyReply, ClusterConfigureRequest, ClusterInitReply, ClusterInitRequest,
    ClusterMap, ClusterStatusReply, ClusterStatusRequest, GetClusterMapRequest, JobProgress, KeyGetReply, KeyGetRequest, KeyPutReply, KeyPutRequest,
    NodeDiagnosticsReply, NodeDiagnosticsRequest, NodeDrainReply, NodeDrainRequest, NodeHeartbeatReply, NodeHeartbeatRequest, NodeInfoReply,
    NodeInfoRequest, NodeListReply, NodeListRequest, NodeRemoveReply, NodeRemoveRequest, PlacementGroup, QosShare, RestoreStatusReply,
    RestoreStatusRequest, ScheduleCreateRequest, ScheduleDeleteRequest, ScheduleListReply, ScheduleListRequest, ScheduleReply, ScrubStartReply,
    ScrubStartRequest, ScrubStatusReply, ScrubStatusRequest, SnapshotCreateRequest, SnapshotCutRequest, SnapshotDeleteRequest, SnapshotListReply,
    SnapshotListRequest, SnapshotReply, TokenCreateReply, TokenCreateRequest, TokenInfo, TokenListReply, TokenListRequest, TokenRevokeReply,
    TokenRevokeRequest, VersionedKey, Volume, VolumeAttachRequest, VolumeCloneRequest, VolumeCreateRequest, VolumeDeleteReply, VolumeDeleteRequest,
    VolumeDetachRequest, VolumeKeyReply, VolumeKeyRequest, VolumeListReply, VolumeListRequest, VolumeReencryptProgressRequest, VolumeRekeyRequest,
    VolumeReply, VolumeResizeRequest, VolumeRollbackRequest, VolumeSetQosRequest, VolumeShowRequest,
};
use basalt_proto::data::ReleaseVolumeRequest;
use basalt_proto::view::{qos_from_proto, qos_to_proto};
use basalt_raft::{NodeInfo, RaftError};
use basalt_scrubber::{PassKind, StartOutcome};
use basalt_security::audit::{AuditEvent, Outcome};
use basalt_security::policy::Role as AccessRole;
use basalt_security::{Action, Principal, Token, TokenId, TokenRecord};
use bytes::Bytes;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::audit_log::Line;
use super::liveness::record_from_proto;
use super::snapshots::VolumeSnapshots;
use super::state::{
    ClusterSettings, ClusterState, MetaCommand, MetaError, MetaReply, NodeRecord, Reencrypt, Role, VolumeKeys, VolumeRecord, VolumeState,
};
use crate::access::{Access, Caller};
use crate::node::{MetaHandle, NodeCtx};

const HOPS: &str = "x-basalt-hops";
/// Default placement groups for a new cluster.
pub const DEFAULT_PG_COUNT: u32 = 32;

pub(super) fn status_of(e: &MetaError) -> Status {
    match e {
        MetaError::NotInitialized => Status::failed_precondition(e.to_string()),
        MetaError::AlreadyInitialized(_) | MetaError::VolumeExists(_) => Status::already_exists(e.to_string()),
        MetaError::NoSuchVolume(_) => Status::not_found(e.to_string()),
        MetaError::InvalidName(_) | MetaError::InvalidSize(_) | MetaError::Shrink { .. } | MetaError::InvalidSettings(_) => {
            Status::invalid_argument(e.to_string())
        }
        MetaError::Placement(_) => Status::failed_precondition(e.to_string()),
        MetaError::AlreadyAttached { .. } => Status::failed_precondition(e.to_string()),
        MetaError::NoSuchNode(_) | MetaError::NoSuchToken(_) => Status::not_found(e.to_string()),
        MetaError::TokenExists(_) => Status::already_exists(e.to_string()),
        MetaError::NodeRemoved(_) | MetaError::NodeInUse { .. } | MetaError::BadMove(_) => Status::failed_precondition(e.to_string()),
        MetaError::SnapshotExists { .. } => Status::already_exists(e.to_string()),
        MetaError::NoSuchSnapshot { .. } => Status::not_found(e.to_string()),
        MetaError::SnapshotPending { .. } | MetaError::RollingBack { .. } | MetaError::AttachedForRollback { .. } => {
            Status::failed_precondition(e.to_string())
        }
        MetaError::NoSuchBackup(_) | MetaError::NoSuchSchedule(_) => Status::not_found(e.to_string()),
        MetaError::ScheduleExists(_) => Status::already_exists(e.to_string()),
        MetaError::Backup(_) | MetaError::Restoring { .. } => Status::failed_precondition(e.to_string()),
        MetaError::Version(_) => Status::failed_precondition(format!("{}{e}", basalt_proto::VERSION_REFUSED)),
    }
}

/// How long `snapshot create` waits for the read-write holder to cut the snapshot before it
/// gives the snapshot up (the holder drains its writes in flight first).
const SNAPSHOT_CUT_WAIT: Duration = Duration::from_secs(10);

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Converts a volume record for the wire.
pub fn volume_proto(
    v: &VolumeRecord,
    pg_total: usize,
    keys: Option<&VolumeKeys>,
    reencrypt: Option<&Reencrypt>,
    snaps: Option<&VolumeSnapshots>,
) -> Volume {
    let (state, released) = match &v.state {
        VolumeState::Active => ("active", 0),
        VolumeState::Deleting { done } => ("deleting", done.len()),
    };
    Volume {
        id: v.id.0,
        name: v.name.clone(),
        size: v.size,
        state: state.into(),
        created_unix_ms: v.created_unix_ms,
        pgs_released: released as u32,
        pgs_total: pg_total as u32,
        attach_epoch: v.attach_epoch,
        attached_by: v.attached_by.clone().unwrap_or_default(),
        encrypted: keys.is_some(),
        key_version: keys.map_or(0, |k| k.current),
        reencrypting: reencrypt.is_some(),
        reencrypt_next_block: reencrypt.map_or(0, |r| r.next_block),
        reencrypt_rate: reencrypt.map_or(0, |r| r.rate),
        write_epoch: snaps.map_or(1, |s| s.write_epoch),
        snapshots: snaps.map(|s| s.by_age().into_iter().map(|(name, r)| snapshot_proto(name, r)).collect()).unwrap_or_default(),
        snapshot_pending: snaps.and_then(|s| s.pending.as_ref()).map(|p| p.name.clone()).unwrap_or_default(),
        rolling_back_to: snaps.and_then(|s| s.rollback.as_ref()).map(|r| r.snapshot.clone()).unwrap_or_default(),
        rollback_pgs_left: snaps.and_then(|s| s.rollback.as_ref()).map_or(0, |r| r.todo.len() as u32),
        // Filled on request (`fill_usage`): it asks the storage nodes.
        head_bytes: 0,
        snapshot_bytes: 0,
        usage_partial: false,
        // Clone origin and placement: `volume_in` fills them from the state.
        clone_of: String::new(),
        lineage: Vec::new(),
        placement_id: 0,
        kept_for_clones: false,
        restoring_node: 0,
        qos: None,
        qos_set: false,
    }
}

fn snapshot_proto(name: &str, r: &super::snapshots::SnapshotRecord) -> basalt_proto::admin::Snapshot {
    basalt_proto::admin::Snapshot { name: name.to_string(), epoch: r.epoch, created_unix_ms: r.created_unix_ms, exclusive_bytes: 0 }
}

/// `v` for the wire, as `s` has it.
pub(super) fn volume_in(s: &ClusterState, v: &VolumeRecord) -> Volume {
    let mut out = volume_proto(v, s.pgs.len(), s.volume_keys.get(&v.id), s.reencrypts.get(&v.id), s.snapshots.get(&v.id));
    out.placement_id = v.id.0;
    if let Some(origin) = s.clones.get(&v.id) {
        out.clone_of = format!("{}@{}", origin.parent_name, origin.snapshot);
        out.lineage = origin.lineage.iter().map(|(volume, epoch)| Ancestor { volume_id: volume.0, epoch: *epoch }).collect();
        out.placement_id = origin.placement.0;
    }
    out.kept_for_clones = matches!(v.state, VolumeState::Deleting { .. }) && s.read_by_clones(v.id);
    out.restoring_node = s.backups.restores.get(&v.id).map_or(0, |r| r.node.0);
    out.qos = Some(qos_to_proto(&s.qos_of(v.id)));
    out.qos_set = s.volume_qos.contains_key(&v.id);
    out
}

enum Route<'a> {
    Local(&'a MetaHandle),
    Forward(AdminClient<Channel>, u32),
}

/// A request to forward to another node: `hops` counted, and the caller's credentials and
/// origin carried along (see [`crate::access::Access::caller`]).
fn forwarded<T, M>(original: &Request<T>, msg: M, hops: u32) -> Request<M> {
    let mut r = Request::new(msg);
    Access::forward_metadata(original, r.metadata_mut());
    r.metadata_mut().insert(HOPS, hops.into());
    r
}

/// A token's record for the wire; the hash only for nodes.
fn token_proto(t: &TokenRecord, with_hash: bool) -> TokenInfo {
    TokenInfo {
        id: t.id.to_string(),
        role: t.role.as_str().into(),
        volumes: t.volumes.iter().cloned().collect(),
        expires_unix_ms: t.expires_unix_ms.unwrap_or(0),
        allow_from: t.allow_from.iter().map(|c| c.to_string()).collect(),
        name: t.name.clone(),
        created_unix_ms: t.created_unix_ms,
        created_by: t.created_by.clone(),
        revoked_unix_ms: t.revoked_unix_ms.unwrap_or(0),
        hash: if with_hash { Bytes::copy_from_slice(&t.hash) } else { Bytes::new() },
    }
}

/// Decodes a token record received with the cluster map.
pub fn token_from_proto(t: &TokenInfo) -> Option<TokenRecord> {
    let hash: [u8; 32] = t.hash.as_ref().try_into().ok()?;
    Some(TokenRecord {
        id: t.id.parse().ok()?,
        hash,
        role: t.role.parse().ok()?,
        volumes: t.volumes.iter().cloned().collect(),
        expires_unix_ms: (t.expires_unix_ms > 0).then_some(t.expires_unix_ms),
        allow_from: t.allow_from.iter().filter_map(|c| c.parse().ok()).collect(),
        name: t.name.clone(),
        created_unix_ms: t.created_unix_ms,
        created_by: t.created_by.clone(),
        revoked_unix_ms: (t.revoked_unix_ms > 0).then_some(t.revoked_unix_ms),
    })
}

fn event_proto(e: AuditEvent) -> basalt_proto::admin::AuditEvent {
    basalt_proto::admin::AuditEvent {
        time_unix_ms: e.time_unix_ms,
        actor: e.actor,
        source: e.source,
        action: e.action,
        target: e.target,
        outcome: e.outcome.as_str().into(),
        detail: e.detail,
    }
}

/// An event a node shipped; an outcome this build does not know counts as a refusal.
fn event_from_proto(e: basalt_proto::admin::AuditEvent) -> AuditEvent {
    AuditEvent {
        time_unix_ms: e.time_unix_ms,
        actor: e.actor,
        source: e.source,
        action: e.action,
        target: e.target,
        outcome: e.outcome.parse().unwrap_or(Outcome::Denied),
        detail: e.detail,
    }
}

fn audit_proto(r: &basalt_security::audit::AuditRecord) -> basalt_proto::admin::AuditRecord {
    basalt_proto::admin::AuditRecord {
        seq: r.seq,
        event: Some(event_proto(r.event.clone())),
        prev_hash: Bytes::copy_from_slice(&r.prev),
        hash: Bytes::copy_from_slice(&r.hash),
    }
}

/// Longest token lifetime: ten years.
const MAX_TOKEN_SECS: u64 = 10 * 365 * 86_400;

/// The admin gRPC service.
pub struct AdminService {
    pub(super) ctx: Arc<NodeCtx>,
}

impl AdminService {
    /// A service for this node.
    pub fn new(ctx: Arc<NodeCtx>) -> Self {
        Self { ctx }
    }

    /// Where a meta request runs: here if this node leads the meta group, else the leader.
    async fn route<T>(&self, req: &Request<T>) -> Result<Route<'_>, Status> {
        let hops = req.metadata().get(HOPS).and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
        let Some(meta) = &self.ctx.meta else {
            if hops > 0 {
                return Err(Status::unavailable("request forwarded to a node outside the meta group; retry"));
            }
            let target = self.ctx.meta_target().ok_or_else(|| Status::failed_precondition("this node knows no meta nodes (no seeds configured)"))?;
            return Ok(Route::Forward(self.ctx.clients.admin(&target)?, hops + 1));
        };
        if meta.group.status().is_leader {
            return Ok(Route::Local(meta));
        }
        if !meta.group.is_initialized().await.map_err(|e| Status::unavailable(e.to_string()))? {
            return Err(Status::failed_precondition("the cluster is not initialized; run `basalt cluster init`"));
        }
        if hops >= 2 {
            return Err(Status::unavailable("the meta leader is changing; retry"));
        }
        let leader = match meta.group.leader() {
            Some(l) => Some(l),
            None => meta.group.wait_for_leader(Duration::from_secs(3)).await,
        };
        match leader {
            Some(l) if l == self.ctx.config.id.0 => {
                if meta.group.status().is_leader {
                    Ok(Route::Local(meta))
                } else {
                    Err(Status::unavailable("meta leader election in progress; retry"))
                }
            }
            Some(l) => {
                let addr = meta.group.member_addr(l).ok_or_else(|| Status::unavailable(format!("address of meta leader node-{l} unknown")))?;
                Ok(Route::Forward(self.ctx.clients.admin(&addr)?, hops + 1))
            }
            // No leader in sight: an election, or this node is no longer a member (replaced
            // while it was down, it hears from nobody). Another meta node may know the leader.
            None if hops == 0 => match self.ctx.meta_target() {
                Some(target) => Ok(Route::Forward(self.ctx.clients.admin(&target)?, hops + 1)),
                None => Err(Status::unavailable("no meta leader elected yet; retry")),
            },
            None => Err(Status::unavailable("no meta leader elected yet; retry")),
        }
    }

    /// Proposes `cmd` with its audit record: `caller` did `action` on `target`.
    pub(super) async fn propose_audited(
        &self,
        meta: &MetaHandle,
        cmd: MetaCommand,
        caller: &Caller,
        action: Action,
        target: &str,
    ) -> Result<MetaReply, Status> {
        let event = caller.event(action.as_str(), target, Outcome::Ok, String::new());
        self.propose(meta, MetaCommand::Audited { cmd: Box::new(cmd), event }).await
    }

    /// Raises the cluster version once every registered node speaks a newer one (the last
    /// node of a rolling upgrade has just said so).
    async fn raise_cluster_version(&self, meta: &MetaHandle) -> Result<(), Status> {
        let Some(to) = meta.shared.with(|s| s.raisable_version()) else { return Ok(()) };
        match self.propose(meta, MetaCommand::RaiseClusterVersion { to }).await? {
            MetaReply::Error(e) => tracing::warn!(to, error = %e, "cluster version not raised"),
            _ => tracing::info!(to, "every node speaks cluster version {to}: the cluster runs at it now"),
        }
        Ok(())
    }

    /// The cluster status as `s` (this meta leader's state) has it.
    fn status_reply(&self, meta: &MetaHandle, s: &ClusterState) -> ClusterStatusReply {
        let views = self.ctx.liveness.pg_views();
        let settings = s.settings;
        let st = meta.group.status();
        ClusterStatusReply {
            initialized: s.cluster_id.is_some(),
            cluster_id: s.cluster_id.clone().unwrap_or_default(),
            meta_leader: st.leader.unwrap_or(0),
            meta_members: st.voters.clone(),
            pg_count: settings.map(|x| x.layout.pg_count).unwrap_or(0),
            extent_size: settings.map(|x| x.layout.extent_size).unwrap_or(0),
            failure_domain: settings.map(|x| x.failure_domain.to_string()).unwrap_or_default(),
            nodes: s.nodes.values().map(|n| self.node_proto(s, n)).collect(),
            pgs: s
                .pgs
                .iter()
                .map(|p| {
                    let v = views.get(&p.id.0).cloned().unwrap_or_default();
                    PlacementGroup { leader: v.leader, term: v.term, applied_index: v.applied_index, live_replicas: v.live, ..self.pg_proto(p) }
                })
                .collect(),
            volumes: s.volumes.len() as u64,
            map_version: s.version,
            encryption_default: s.encrypt_by_default,
            qos_default: Some(qos_to_proto(&s.qos_default)),
            cluster_version: s.cluster_version,
            per_volume_metrics: s.per_volume_metrics,
        }
    }

    /// Proposes `cmd` to the meta group (this node must lead it) and decodes the reply.
    pub(crate) async fn propose(&self, meta: &MetaHandle, cmd: MetaCommand) -> Result<MetaReply, Status> {
        let bytes = bincode::serialize(&cmd).map_err(|e| Status::internal(format!("encoding meta command: {e}")))?;
        let started = std::time::Instant::now();
        match meta.group.propose(Bytes::from(bytes)).await {
            Ok(reply) => {
                self.ctx.metrics.raft.committed(crate::metrics::GroupKind::Meta, started.elapsed());
                bincode::deserialize(&reply).map_err(|e| Status::internal(format!("decoding meta reply: {e}")))
            }
            Err(RaftError::NotLeader { .. }) => Err(Status::unavailable("meta leadership moved; retry")),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }

    /// Reads the state after confirming leadership (linearizable).
    pub(super) async fn read(&self, meta: &MetaHandle) -> Result<ClusterState, Status> {
        meta.group.read_barrier().await.map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(meta.shared.snapshot())
    }

    fn node_proto(&self, s: &ClusterState, n: &NodeRecord) -> basalt_proto::admin::Node {
        let (state, ago) = self.ctx.liveness.state(n.id);
        let report = self.ctx.liveness.last_report(n.id);
        basalt_proto::admin::Node {
            id: n.id.0,
            addr: n.addr.clone(),
            labels: Some(basalt_proto::admin::Labels {
                region: n.labels.region.clone(),
                zone: n.labels.zone.clone(),
                rack: n.labels.rack.clone(),
                host: n.labels.host.clone(),
            }),
            roles: n.roles.iter().map(|r| r.as_str().to_string()).collect(),
            capacity_bytes: n.capacity_bytes,
            used_bytes: report.as_ref().map(|r| r.used_bytes).unwrap_or(0),
            state: state.into(),
            last_seen_ms_ago: ago.map(|d| d.as_millis() as u64).unwrap_or(0),
            metrics_addr: n.metrics_addr.clone(),
            scrub_pending_bytes: report.as_ref().map(|r| r.scrub_pending_bytes).unwrap_or(0),
            draining: s.draining.contains(&n.id),
            replicas: s.replica_counts().get(&n.id).copied().unwrap_or(0) as u32,
            cert_not_after: report.as_ref().map(|r| r.cert_not_after).unwrap_or(0),
            version_min: s.versions_of(n.id).min,
            version_max: s.versions_of(n.id).max,
        }
    }

    /// A PG for the wire: its replica set, and the move in progress with its progress.
    fn pg_proto(&self, p: &super::state::PgRecord) -> PlacementGroup {
        let mut out = PlacementGroup { id: p.id.0, replicas: p.replicas.iter().map(|r| r.0).collect(), ..Default::default() };
        if let Some(m) = &p.moving {
            let progress = self.ctx.heal.get(p.id).unwrap_or_default();
            out.moving_from = m.from.0;
            out.moving_to = m.to.0;
            out.move_reason = m.reason.as_str().into();
            out.move_phase = if progress.phase.is_empty() { "waiting".into() } else { progress.phase };
            out.move_chunks_done = progress.chunks_done;
            out.move_chunks_total = progress.chunks_total;
            out.move_started_ms_ago = now_ms().saturating_sub(m.started_unix_ms);
        }
        out
    }

    fn map_proto(&self, s: &ClusterState) -> ClusterMap {
        let layout = s.settings.map(|st| st.layout);
        ClusterMap {
            version: s.version,
            cluster_id: s.cluster_id.clone().unwrap_or_default(),
            pg_count: layout.map(|l| l.pg_count).unwrap_or(0),
            extent_size: layout.map(|l| l.extent_size).unwrap_or(0),
            nodes: s.nodes.values().map(|n| self.node_proto(s, n)).collect(),
            pgs: s.pgs.iter().map(|p| self.pg_proto(p)).collect(),
            volumes: s.volumes.values().map(|v| volume_in(s, v)).collect(),
            includes_tokens: false,
            tokens: Vec::new(),
            per_volume_metrics: s.per_volume_metrics,
        }
    }

    fn volume_reply(&self, reply: MetaReply, version: u64) -> Result<Response<basalt_proto::admin::VolumeReply>, Status> {
        match reply {
            MetaReply::Volume(v) => {
                let volume = match self.ctx.meta.as_ref() {
                    Some(m) => m.shared.with(|s| volume_in(s, &v)),
                    None => volume_proto(&v, 0, None, None, None),
                };
                Ok(Response::new(VolumeReply { volume: Some(volume), map_version: version }))
            }
            MetaReply::Error(e) => Err(status_of(&e)),
            MetaReply::Done | MetaReply::Token(_) | MetaReply::Backup(_) => Err(Status::internal("meta group returned no volume")),
        }
    }

    /// The reply to a snapshot command: the volume and snapshot `name` as the state has them.
    fn snapshot_reply(&self, meta: &MetaHandle, volume: &str, name: &str) -> Result<Response<SnapshotReply>, Status> {
        meta.shared.with(|s| {
            let v = s.volume_by_name(volume).ok_or_else(|| status_of(&MetaError::NoSuchVolume(volume.to_string())))?;
            let snapshot = s.snapshots.get(&v.id).and_then(|x| x.snapshots.get(name)).map(|r| snapshot_proto(name, r));
            Ok(Response::new(SnapshotReply { volume: Some(volume_in(s, v)), snapshot, map_version: s.version }))
        })
    }

    /// Asks the storage nodes how `v`'s space is held (each PG counted on its first replica,
    /// with 3 s to answer) and fills it into `out`: head and snapshot bytes, each snapshot's
    /// exclusive bytes, and whether some PG went uncounted.
    async fn fill_usage(&self, s: &ClusterState, v: &VolumeRecord, out: &mut Volume) {
        let live = s.snapshots.get(&v.id).map(|x| x.live_epochs()).unwrap_or_default();
        let mut by_node: BTreeMap<NodeId, Vec<u32>> = BTreeMap::new();
        for pg in &s.pgs {
            if let Some(first) = pg.replicas.first() {
                by_node.entry(*first).or_default().push(pg.id.0);
            }
        }
        let calls = by_node.into_iter().filter_map(|(node, pgs)| {
            let addr = s.nodes.get(&node)?.addr.clone();
            let req = basalt_proto::data::VolumeUsageRequest { volume_id: v.id.0, live_epochs: live.clone(), pgs };
            let ctx = self.ctx.clone();
            Some(async move {
                let mut client = ctx.clients.data(&addr).ok()?;
                tokio::time::timeout(Duration::from_secs(3), client.volume_usage(req)).await.ok()?.ok().map(|r| r.into_inner())
            })
        });
        let mut counted = 0usize;
        let mut exclusive: BTreeMap<u64, u64> = BTreeMap::new();
        for reply in futures::future::join_all(calls).await.into_iter().flatten() {
            out.head_bytes += reply.head_bytes;
            out.snapshot_bytes += reply.snapshot_bytes;
            counted += reply.pgs_counted.len();
            for e in reply.exclusive {
                *exclusive.entry(e.epoch).or_default() += e.bytes;
            }
        }
        out.usage_partial = counted < s.pgs.len();
        for snap in &mut out.snapshots {
            snap.exclusive_bytes = exclusive.get(&snap.epoch).copied().unwrap_or(0);
        }
    }

    /// After a snapshot was asked of the volume's holder: waits until it is cut, or gives it
    /// up after [`SNAPSHOT_CUT_WAIT`] (refusing the command with the holder's name).
    pub(super) async fn await_cut(&self, meta: &MetaHandle, volume: &str, name: &str) -> Result<(), Status> {
        let mut rx = meta.shared.subscribe();
        let deadline = tokio::time::Instant::now() + SNAPSHOT_CUT_WAIT;
        loop {
            // (taken, still pending, holder)
            let (taken, pending, holder) = meta.shared.with(|s| match s.volume_by_name(volume) {
                None => (false, false, None),
                Some(v) => {
                    let snaps = s.snapshots.get(&v.id);
                    let taken = snaps.is_some_and(|x| x.snapshots.contains_key(name));
                    let pending = snaps.and_then(|x| x.pending.as_ref()).is_some_and(|p| p.name == name);
                    (taken, pending, v.attached_by.clone())
                }
            });
            if taken {
                return Ok(());
            }
            if !pending {
                return Err(Status::aborted(format!(
                    "snapshot {name:?} of volume {volume:?} was given up before its holder cut it; nothing was taken"
                )));
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                self.propose(meta, MetaCommand::CancelSnapshot { volume: volume.to_string(), name: name.to_string() }).await?;
                // The cut may have landed just before the cancel.
                let taken = meta
                    .shared
                    .with(|s| s.volume_by_name(volume).and_then(|v| s.snapshots.get(&v.id)).is_some_and(|x| x.snapshots.contains_key(name)));
                if taken {
                    return Ok(());
                }
                // Not DeadlineExceeded: clients retry that, and this is an answer.
                return Err(Status::failed_precondition(format!(
                    "volume {volume:?} is attached read-write by {}, which did not cut snapshot {name:?} within {} s (its writes may be stuck); nothing was taken",
                    holder.unwrap_or_default(),
                    SNAPSHOT_CUT_WAIT.as_secs()
                )));
            }
        }
    }

    fn current_version(&self) -> u64 {
        self.ctx.meta.as_ref().map(|m| m.shared.with(|s| s.version)).unwrap_or(0)
    }

    /// `cluster init` on the meta leader: gathers the known nodes and proposes the cluster with
    /// its first admin token (returned once, here, and stored only as a hash).
    async fn init_on_leader(
        &self,
        meta: &MetaHandle,
        req: ClusterInitRequest,
        members: Vec<NodeRecord>,
        mut versions: Vec<(NodeId, VersionRange)>,
        caller: &Caller,
    ) -> Result<ClusterInitReply, Status> {
        let level: DomainLevel = if req.failure_domain.is_empty() {
            DomainLevel::Host
        } else {
            req.failure_domain.parse().map_err(|e: basalt_common::labels::LabelError| Status::invalid_argument(e.to_string()))?
        };
        let layout = Layout {
            extent_size: if req.extent_size == 0 { basalt_common::layout::DEFAULT_EXTENT_SIZE } else { req.extent_size },
            pg_count: if req.pg_count == 0 { DEFAULT_PG_COUNT } else { req.pg_count },
        };
        layout.validate().map_err(Status::invalid_argument)?;
        let mut nodes: BTreeMap<NodeId, NodeRecord> = BTreeMap::new();
        for n in self.ctx.liveness.recent(Duration::from_secs(30)) {
            nodes.insert(n.id, n);
        }
        for n in members {
            nodes.insert(n.id, n);
        }
        nodes.insert(self.ctx.config.id, self.ctx.self_record());
        // The cluster starts at the newest version every node it starts with speaks.
        versions.extend(self.ctx.liveness.recent_versions(Duration::from_secs(30)));
        versions.push((self.ctx.config.id, self.ctx.config.versions));
        let start = VersionRange::common_max(versions.iter().map(|(_, r)| r)).unwrap_or(1);
        for (node, range) in &versions {
            range.check(&node.to_string(), start).map_err(|e| Status::failed_precondition(format!("cannot start a cluster of these nodes: {e}")))?;
        }
        if let MetaReply::Error(e) = self.propose(meta, MetaCommand::RaiseClusterVersion { to: start }).await? {
            return Err(status_of(&e));
        }
        let cluster_id = format!("{:016x}", rand::random::<u64>());
        let token = self.ctx.access.enabled().then(Token::generate);
        let admin = token.as_ref().map(|t| {
            let mut r = TokenRecord::new(t, AccessRole::Admin, caller.principal.actor(), now_ms());
            r.name = "first admin (cluster init)".into();
            r
        });
        let cmd = MetaCommand::InitClusterWithToken {
            cluster_id: cluster_id.clone(),
            settings: ClusterSettings { layout, failure_domain: level },
            nodes: nodes.into_values().collect(),
            admin,
        };
        match self.propose_audited(meta, cmd, caller, Action::ClusterInit, &cluster_id).await? {
            MetaReply::Error(e) => Err(status_of(&e)),
            _ => {
                tracing::info!(%cluster_id, pgs = layout.pg_count, by = %caller.principal, "cluster initialized");
                Ok(ClusterInitReply {
                    cluster_id,
                    pg_count: layout.pg_count,
                    admin_token_id: token.as_ref().map(|t| t.id().to_string()).unwrap_or_default(),
                    admin_token: token.map(|t| t.expose()).unwrap_or_default(),
                })
            }
        }
    }

    /// The meta state's tokens as seen by `principal`: a token limited to volumes may grant only
    /// a subset of them.
    fn check_grant_subset(caller: &Caller, volumes: &[String]) -> Result<(), Status> {
        if let Principal::Token(t) = &caller.principal
            && !t.volumes.is_empty()
            && (volumes.is_empty() || volumes.iter().any(|v| !t.volumes.contains(v)))
        {
            return Err(Status::permission_denied(format!(
                "{} is limited to volumes {:?}; it can only create tokens limited to some of them",
                t.actor(),
                t.volumes
            )));
        }
        Ok(())
    }

    /// This node's verdict on its own copy of the audit log.
    async fn check_own_audit(&self) -> AuditNodeVerdict {
        let node = self.ctx.config.id.0;
        let Some(meta) = &self.ctx.meta else {
            return AuditNodeVerdict { node, problem: "not a meta node: it holds no audit log".into(), unreachable: true, ..Default::default() };
        };
        let head = meta.shared.with(|s| s.audit.clone());
        let audit = meta.audit.clone();
        let lines = match tokio::task::spawn_blocking(move || audit.read()).await {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                return AuditNodeVerdict { node, problem: format!("cannot read the audit file: {e}"), ..Default::default() };
            }
            Err(e) => {
                return AuditNodeVerdict { node, problem: e.to_string(), ..Default::default() };
            }
        };
        let mut records = Vec::with_capacity(lines.len());
        for l in lines {
            match l {
                Line::Record(r) => records.push(r),
                Line::Bad { line, why } => {
                    let seq = records.last().map(|r: &basalt_security::audit::AuditRecord| r.seq + 1).unwrap_or(head.anchor.first_seq.max(1));
                    return AuditNodeVerdict {
                        node,
                        checked: records.len() as u64,
                        problem: format!("line {line} of the audit file is damaged: {why}"),
                        problem_seq: seq,
                        unreachable: false,
                    };
                }
            }
        }
        // Records beyond the applied head are not there yet (or not any more): judge up to it.
        records.retain(|r| r.seq <= head.last_seq());
        let anchor = basalt_security::audit::ChainAnchor { first_seq: head.anchor.first_seq.max(1), prev: head.anchor.prev };
        let mut verdict = basalt_security::audit::verify(anchor, &records, Some(head.last_seq()));
        if verdict.problem.is_none() && head.last_seq() > 0 && verdict.head != head.last {
            verdict.problem = Some((head.last_seq(), format!("record {} is not the one the meta group sealed", head.last_seq())));
        }
        let (problem_seq, problem) = verdict.problem.unwrap_or_default();
        AuditNodeVerdict { node, checked: verdict.checked, problem, problem_seq, unreachable: false }
    }
}

/// The id and key references of encrypted volume `name`.
fn encrypted_volume(s: &ClusterState, name: &str) -> Result<(VolumeId, VolumeKeys), Status> {
    let v = s.volume_by_name(name).ok_or_else(|| status_of(&MetaError::NoSuchVolume(name.to_string())))?;
    let keys = s.volume_keys.get(&v.id).cloned().ok_or_else(|| Status::failed_precondition(format!("volume {name} is not encrypted")))?;
    Ok((v.id, keys))
}

/// Bytes a second a re-encryption scans unless its rekey says otherwise: a tenth of what one
/// node's disk does sequentially, so the guest keeps the rest.
pub const DEFAULT_REENCRYPT_RATE: u64 = 32 << 20;

/// Most refusals one `AuditReport` may carry.
const MAX_REPORTED: usize = 256;

/// Runs a request on the meta leader: forwards it there, or (here) authorises `$action` on
/// `$volume` for its caller and runs `$local`.
macro_rules! forward_or {
    ($self:ident, $req:ident, $method:ident, $action:expr, $volume:expr, |$meta:ident, $caller:ident, $msg:ident| $local:expr) => {{
        match $self.route(&$req).await? {
            Route::Forward(mut client, hops) => {
                let fwd = forwarded(&$req, $req.get_ref().clone(), hops);
                client.$method(fwd).await
            }
            Route::Local($meta) => {
                let $caller = $self.ctx.access.authorize(&$req, $action, $volume).await?;
                let $msg = $req.into_inner();
                $local
            }
        }
    }};
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn node_info(&self, request: Request<NodeInfoRequest>) -> Result<Response<NodeInfoReply>, Status> {
        self.ctx.access.authorize(&request, Action::NodeInfo, None).await?;
        let (initialized, cluster_id) = match &self.ctx.meta {
            Some(m) => m.shared.with(|s| (s.cluster_id.is_some(), s.cluster_id.clone().unwrap_or_default())),
            None => {
                let map = self.ctx.map.borrow();
                (map.layout.is_some(), map.cluster_id.clone())
            }
        };
        Ok(Response::new(NodeInfoReply { node: Some(self.ctx.self_node()), cluster_initialized: initialized, cluster_id }))
    }

    async fn node_diagnostics(&self, request: Request<NodeDiagnosticsRequest>) -> Result<Response<NodeDiagnosticsReply>, Status> {
        let caller = self.ctx.access.authorize(&request, Action::NodeDiagnostics, None).await?;
        let max = usize::try_from(request.get_ref().log_bytes).unwrap_or(usize::MAX).min(crate::diagnostics::LOG_RING_BYTES);
        let config = &self.ctx.config;
        let config_file = {
            let path = config.config_file.clone();
            tokio::task::spawn_blocking(move || crate::diagnostics::config_file(path.as_deref())).await.unwrap_or_default()
        };
        // Logs and configuration leave the node: recorded, like other privileged reads.
        self.ctx.access.record(caller.event("node.diagnostics", &config.id.to_string(), Outcome::Ok, String::new()));
        Ok(Response::new(NodeDiagnosticsReply {
            node: Some(self.ctx.self_node()),
            config_file,
            settings: format!("{config:#?}"),
            log: crate::diagnostics::log_tail(if max == 0 { crate::diagnostics::LOG_RING_BYTES } else { max }),
            metrics: crate::metrics::render(&self.ctx),
            build: format!("basalt-node {} (cluster versions {})", env!("CARGO_PKG_VERSION"), config.versions),
        }))
    }

    async fn cluster_init(&self, request: Request<ClusterInitRequest>) -> Result<Response<ClusterInitReply>, Status> {
        // Before anything happens, even the meta group's forming.
        let caller = self.ctx.access.authorize(&request, Action::ClusterInit, None).await?;
        let hops = request.metadata().get(HOPS).and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
        let Some(meta) = &self.ctx.meta else {
            if hops > 0 {
                return Err(Status::failed_precondition("cluster init reached a node without the meta role"));
            }
            let target = self.ctx.meta_target().ok_or_else(|| Status::failed_precondition("this node knows no meta nodes"))?;
            let fwd = forwarded(&request, request.get_ref().clone(), hops + 1);
            return self.ctx.clients.admin(&target)?.cluster_init(fwd).await;
        };
        if let Some(id) = meta.shared.with(|s| s.cluster_id.clone()) {
            return Err(Status::already_exists(format!("the cluster is already initialized (cluster id {id})")));
        }
        let req = request.get_ref().clone();
        // The meta group's members: the given addresses (or this node's seeds).
        let addrs: Vec<String> = if req.meta_addrs.is_empty() { self.ctx.seeds() } else { req.meta_addrs.clone() };
        let mut members: Vec<NodeRecord> = Vec::new();
        let mut versions = Vec::new();
        for addr in &addrs {
            let info = if *addr == self.ctx.config.listen.to_string() {
                self.ctx.self_node()
            } else {
                let mut c = self.ctx.clients.admin(addr)?;
                let reply = tokio::time::timeout(Duration::from_secs(5), c.node_info(NodeInfoRequest {}))
                    .await
                    .map_err(|_| Status::unavailable(format!("meta node {addr} did not answer")))?
                    .map_err(|s| Status::unavailable(format!("meta node {addr}: {}", s.message())))?
                    .into_inner();
                reply.node.ok_or_else(|| Status::internal(format!("meta node {addr} sent no identity")))?
            };
            let record = record_from_proto(&info);
            versions.push((record.id, basalt_proto::node_versions(&info).map_err(Status::invalid_argument)?));
            if !record.roles.contains(&Role::Meta) {
                return Err(Status::invalid_argument(format!("{addr} ({}) does not have the meta role", record.id)));
            }
            members.push(record);
        }
        if !members.iter().any(|m| m.id == self.ctx.config.id) {
            return Err(Status::invalid_argument(format!(
                "this node ({}) is not among the meta nodes {addrs:?}; send `cluster init` to one of them",
                self.ctx.config.id
            )));
        }
        let membership: BTreeMap<u64, NodeInfo> = members.iter().map(|m| (m.id.0, NodeInfo { addr: m.addr.clone() })).collect();
        meta.group.initialize(membership).await.map_err(|e| Status::unavailable(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if meta.group.status().is_leader {
                return self.init_on_leader(meta, req, members, versions, &caller).await.map(Response::new);
            }
            if let Some(l) = meta.group.leader()
                && hops < 2
                && let Some(addr) = meta.group.member_addr(l)
            {
                let mut c = self.ctx.clients.admin(&addr)?;
                return c.cluster_init(forwarded(&request, req, hops + 1)).await;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Status::unavailable("the meta group elected no leader within 15s; are the other meta nodes running?"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn cluster_status(&self, request: Request<ClusterStatusRequest>) -> Result<Response<ClusterStatusReply>, Status> {
        forward_or!(self, request, cluster_status, Action::ClusterStatus, None, |meta, _caller, _msg| {
            let s = self.read(meta).await?;
            Ok(Response::new(self.status_reply(meta, &s)))
        })
    }

    async fn cluster_configure(&self, request: Request<ClusterConfigureRequest>) -> Result<Response<ClusterStatusReply>, Status> {
        forward_or!(self, request, cluster_configure, Action::ClusterConfigure, None, |meta, caller, msg| {
            let on_off = |on: bool| if on { "on" } else { "off" };
            // Every change is checked before the first is made; each is audited on its own.
            let mut changes = Vec::new();
            if msg.set_encryption_default {
                let on = msg.encryption_default;
                changes.push((MetaCommand::SetEncryptByDefault { on }, format!("encryption default {}", on_off(on))));
            }
            if let Some(q) = &msg.qos_default {
                let qos = qos_from_proto(q);
                qos.validate().map_err(|e| Status::invalid_argument(format!("QoS default: {e}")))?;
                changes.push((MetaCommand::SetQosDefault { qos }, format!("QoS default {}", qos.describe())));
            }
            if msg.set_per_volume_metrics {
                let on = msg.per_volume_metrics;
                changes.push((MetaCommand::SetPerVolumeMetrics { on }, format!("per-volume metrics {}", on_off(on))));
            }
            for (cmd, target) in changes {
                if let MetaReply::Error(e) = self.propose_audited(meta, cmd, &caller, Action::ClusterConfigure, &target).await? {
                    return Err(status_of(&e));
                }
                tracing::info!(by = %caller.principal, "{target}");
            }
            let s = self.read(meta).await?;
            Ok(Response::new(self.status_reply(meta, &s)))
        })
    }

    async fn node_list(&self, request: Request<NodeListRequest>) -> Result<Response<NodeListReply>, Status> {
        forward_or!(self, request, node_list, Action::NodeList, None, |meta, _caller, _msg| {
            let s = self.read(meta).await?;
            Ok(Response::new(NodeListReply { nodes: s.nodes.values().map(|n| self.node_proto(&s, n)).collect() }))
        })
    }

    async fn node_drain(&self, request: Request<NodeDrainRequest>) -> Result<Response<NodeDrainReply>, Status> {
        forward_or!(self, request, node_drain, Action::NodeDrain, None, |meta, caller, msg| {
            let node = NodeId(msg.id);
            let cmd = MetaCommand::DrainNode { node, drain: !msg.undo };
            let target = if msg.undo { format!("{node} (undo)") } else { node.to_string() };
            match self.propose_audited(meta, cmd, &caller, Action::NodeDrain, &target).await? {
                MetaReply::Error(e) => return Err(status_of(&e)),
                _ => {
                    tracing::info!(%node, drain = !msg.undo, by = %caller.principal, "node drain changed")
                }
            }
            let s = meta.shared.snapshot();
            let record = s.nodes.get(&node).ok_or_else(|| status_of(&MetaError::NoSuchNode(node)))?;
            let left = s.replica_counts().get(&node).copied().unwrap_or(0) as u32;
            Ok(Response::new(NodeDrainReply { node: Some(self.node_proto(&s, record)), replicas_left: left }))
        })
    }

    async fn node_remove(&self, request: Request<NodeRemoveRequest>) -> Result<Response<NodeRemoveReply>, Status> {
        forward_or!(self, request, node_remove, Action::NodeRemove, None, |meta, caller, msg| {
            let node = NodeId(msg.id);
            match self.propose_audited(meta, MetaCommand::RemoveNode { node }, &caller, Action::NodeRemove, &node.to_string()).await? {
                MetaReply::Error(e) => Err(status_of(&e)),
                _ => {
                    tracing::info!(%node, by = %caller.principal, "node removed from the cluster");
                    Ok(Response::new(NodeRemoveReply {}))
                }
            }
        })
    }

    async fn node_heartbeat(&self, request: Request<NodeHeartbeatRequest>) -> Result<Response<NodeHeartbeatReply>, Status> {
        if let Some(meta) = &self.ctx.meta
            && meta.shared.with(|s| s.cluster_id.is_none())
            && !meta.group.status().is_leader
        {
            self.ctx.access.authorize(&request, Action::Internal, None).await?;
            // Before `cluster init`: remember the node so init can place PGs on it.
            let req = request.into_inner();
            if let Some(node) = req.node {
                self.ctx.liveness.record(node, req.pgs);
            }
            return Ok(Response::new(NodeHeartbeatReply { registered: false, map_version: 0, qos_shares: Vec::new() }));
        }
        forward_or!(self, request, node_heartbeat, Action::Internal, None, |meta, caller, msg| {
            let Some(node) = msg.node else {
                return Err(Status::invalid_argument("heartbeat without a node"));
            };
            let record = record_from_proto(&node);
            if record.id.0 == 0 || record.addr.is_empty() {
                return Err(Status::invalid_argument("heartbeat with node id 0 or no address"));
            }
            // A node speaks for itself only.
            if let Principal::Node(n) = caller.principal
                && n != record.id.0
            {
                return Err(Status::permission_denied(format!("node-{n} may not send node-{}'s heartbeat", record.id.0)));
            }
            if meta.shared.with(|s| s.removed.contains(&record.id)) {
                return Err(status_of(&MetaError::NodeRemoved(record.id)));
            }
            let versions = basalt_proto::node_versions(&node).map_err(Status::invalid_argument)?;
            let (cluster_version, known_versions) = meta.shared.with(|s| (s.cluster_version, s.node_versions.get(&record.id).copied()));
            if cluster_version > 0
                && let Err(e) = versions.check(&record.id.to_string(), cluster_version)
            {
                // Before registering: a node that cannot speak the cluster's version never
                // counts as up, and it stops on this answer.
                tracing::warn!(node = %record.id, "{e}");
                return Err(Status::failed_precondition(format!("{}{e}", basalt_proto::VERSION_REFUSED)));
            }
            self.ctx.liveness.record(node, msg.pgs);
            let demand: Vec<(VolumeId, u64, u64)> = msg.qos_demand.iter().map(|d| (VolumeId(d.volume_id), d.ops, d.bytes)).collect();
            let ppm = |f: f64| (f.clamp(0.0, 1.0) * 1e6) as u32;
            let qos_shares = self
                .ctx
                .liveness
                .qos_report(record.id, &demand)
                .into_iter()
                .map(|(v, s)| QosShare { volume_id: v.0, ops_ppm: ppm(s.ops), bytes_ppm: ppm(s.bytes) })
                .collect();
            let (initialized, known) = meta.shared.with(|s| (s.cluster_id.is_some(), s.nodes.get(&record.id) == Some(&record)));
            if initialized && !known {
                match self.propose(meta, MetaCommand::RegisterNode { node: record.clone() }).await? {
                    MetaReply::Error(e) => return Err(status_of(&e)),
                    _ => {
                        tracing::info!(node = %record.id, addr = %record.addr, labels = %record.labels, "node registered")
                    }
                }
            }
            if initialized && known_versions != Some(versions) {
                if let MetaReply::Error(e) = self.propose(meta, MetaCommand::NodeVersions { node: record.id, range: versions }).await? {
                    return Err(Status::failed_precondition(format!("{}{e}", basalt_proto::VERSION_REFUSED)));
                }
                tracing::info!(node = %record.id, %versions, "node speaks cluster versions");
            }
            if initialized {
                // Usually right after the last node of an upgrade said so; checked on every
                // heartbeat so a raise a leader change interrupted still happens.
                self.raise_cluster_version(meta).await?;
            }
            Ok(Response::new(NodeHeartbeatReply { registered: initialized, map_version: self.current_version(), qos_shares }))
        })
    }

    async fn volume_create(&self, request: Request<VolumeCreateRequest>) -> Result<Response<VolumeReply>, Status> {
        let name = request.get_ref().name.clone();
        forward_or!(self, request, volume_create, Action::VolumeCreate, Some(&name), |meta, caller, msg| {
            if !msg.wrapped_key.is_empty() && msg.unencrypted {
                return Err(Status::invalid_argument("a volume is either encrypted (a wrapped key) or explicitly unencrypted, not both"));
            }
            if msg.wrapped_key.is_empty() && !msg.unencrypted && self.read(meta).await?.encrypt_by_default {
                return Err(Status::failed_precondition(format!(
                    "this cluster encrypts new volumes by default: create {} with --encrypt --kek-file FILE, or pass --no-encrypt to opt out",
                    msg.name
                )));
            }
            let cmd = if msg.wrapped_key.is_empty() {
                MetaCommand::CreateVolume { name: msg.name.clone(), size: msg.size, now_unix_ms: now_ms() }
            } else {
                // The key is on a majority of the meta nodes before the volume exists.
                let keys = super::keys::store_new(&self.ctx, meta, &msg.wrapped_key).await?;
                MetaCommand::CreateEncryptedVolume { name: msg.name.clone(), size: msg.size, now_unix_ms: now_ms(), keys }
            };
            let qos = msg.qos.as_ref().map(qos_from_proto);
            if let Some(q) = &qos {
                q.validate().map_err(|e| Status::invalid_argument(format!("volume {}: {e}", msg.name)))?;
            }
            // With limits of its own, the volume is created with them in one step.
            let (cmd, target) = match qos {
                Some(q) => (MetaCommand::CreateVolumeWithQos { create: Box::new(cmd), qos: q }, format!("{} QoS {}", msg.name, q.describe())),
                None => (cmd, msg.name.clone()),
            };
            let reply = self.propose_audited(meta, cmd, &caller, Action::VolumeCreate, &target).await?;
            if let MetaReply::Volume(v) = &reply {
                tracing::info!(volume = %v.name, id = %v.id, size = v.size, by = %caller.principal, "volume created");
            }
            self.volume_reply(reply, self.current_version())
        })
    }

    async fn volume_key(&self, request: Request<VolumeKeyRequest>) -> Result<Response<VolumeKeyReply>, Status> {
        let name = request.get_ref().name.clone();
        forward_or!(self, request, volume_key, Action::DataRead, Some(&name), |meta, caller, msg| {
            let state = self.read(meta).await?;
            let (id, keys) = encrypted_volume(&state, &msg.name)?;
            let inherited = state.inherited_keys.get(&id).cloned().unwrap_or_default();
            let mut out = Vec::new();
            for version in keys.digests.keys() {
                let wrapped = super::keys::fetch(&self.ctx, meta, &msg.name, &keys, *version).await?;
                let sealed_as = inherited.get(version).map_or(0, |v| v.0);
                out.push(VersionedKey { version: *version, wrapped: wrapped.into(), sealed_as });
            }
            // Handing out a key (wrapped) is a privileged access: recorded, like attaching.
            self.ctx.access.record(caller.event("volume.key", &msg.name, Outcome::Ok, format!("{} wrapped key version(s)", out.len())));
            Ok(Response::new(VolumeKeyReply { volume_id: id.0, current_version: keys.current, keys: out }))
        })
    }

    async fn volume_rekey(&self, request: Request<VolumeRekeyRequest>) -> Result<Response<VolumeReply>, Status> {
        let name = request.get_ref().name.clone();
        forward_or!(self, request, volume_rekey, Action::VolumeRekey, Some(&name), |meta, caller, msg| {
            let state = self.read(meta).await?;
            let (id, old) = encrypted_volume(&state, &msg.name)?;
            let versions: Vec<(u32, Vec<u8>)> = msg.keys.iter().map(|k| (k.version, k.wrapped.to_vec())).collect();
            let existing: Vec<u32> = old.digests.keys().copied().collect();
            if !msg.reencrypt {
                if versions.iter().map(|(v, _)| *v).ne(existing.iter().copied()) {
                    return Err(Status::invalid_argument(format!(
                        "a rekey of volume {} must rewrap exactly its key versions {existing:?}, in order",
                        msg.name
                    )));
                }
                // New copies first, on a majority; the old ones go when the change applies.
                let keys = super::keys::store_rewrapped(&self.ctx, meta, old.current, &versions).await?;
                let cmd = MetaCommand::RekeyVolume { name: msg.name.clone(), replaces: old.key_id, keys };
                let reply = self.propose_audited(meta, cmd, &caller, Action::VolumeRekey, &msg.name).await?;
                if let MetaReply::Volume(v) = &reply {
                    tracing::info!(volume = %v.name, by = %caller.principal, "volume keys rewrapped; the old wrapped keys are erased");
                }
                return self.volume_reply(reply, self.current_version());
            }
            if let Some(r) = state.reencrypts.get(&id) {
                return Err(Status::failed_precondition(format!(
                    "volume {} is already being re-encrypted to key version {}; run the same rekey --reencrypt again to follow or resume it",
                    msg.name, r.to_version
                )));
            }
            // The new version is the next one; the nonce has 16 bits for it.
            let next = existing.last().copied().unwrap_or(0) + 1;
            if next > u32::from(u16::MAX) {
                return Err(Status::failed_precondition(format!("volume {} has used every key version (65535)", msg.name)));
            }
            let want: Vec<u32> = existing.iter().copied().chain([next]).collect();
            if versions.iter().map(|(v, _)| *v).ne(want.iter().copied()) {
                return Err(Status::invalid_argument(format!(
                    "a re-encryption of volume {} must rewrap its key versions {existing:?} and add version {next}, in order",
                    msg.name
                )));
            }
            let keys = super::keys::store_rewrapped(&self.ctx, meta, next, &versions).await?;
            let rate = if msg.reencrypt_rate == 0 { DEFAULT_REENCRYPT_RATE } else { msg.reencrypt_rate };
            let cmd = MetaCommand::StartReencrypt { name: msg.name.clone(), replaces: old.key_id, keys, now_unix_ms: now_ms(), rate };
            let target = format!("{} (re-encryption to key version {next})", msg.name);
            let reply = self.propose_audited(meta, cmd, &caller, Action::VolumeRekey, &target).await?;
            if let MetaReply::Volume(v) = &reply {
                tracing::info!(volume = %v.name, version = next, by = %caller.principal, "volume re-encryption started; the old wrapped keys are erased");
            }
            self.volume_reply(reply, self.current_version())
        })
    }

    async fn volume_reencrypt_progress(&self, request: Request<VolumeReencryptProgressRequest>) -> Result<Response<VolumeReply>, Status> {
        let name = request.get_ref().name.clone();
        // The holder reports: whoever may attach the volume (the epoch names the current holder).
        forward_or!(self, request, volume_reencrypt_progress, Action::VolumeAttach, Some(&name), |meta, caller, msg| {
            let cmd = MetaCommand::ReencryptProgress {
                name: msg.name.clone(),
                epoch: msg.attach_epoch,
                to_version: msg.key_version,
                next_block: msg.next_block,
                done: msg.done,
            };
            let reply = if msg.done {
                let target = format!("{} (re-encryption to key version {} finished; older versions erased)", msg.name, msg.key_version);
                let reply = self.propose_audited(meta, cmd, &caller, Action::VolumeRekey, &target).await?;
                if let MetaReply::Volume(v) = &reply {
                    tracing::info!(volume = %v.name, version = msg.key_version, "volume re-encrypted; older key versions erased");
                }
                reply
            } else {
                self.propose(meta, cmd).await?
            };
            self.volume_reply(reply, self.current_version())
        })
    }

    async fn key_put(&self, request: Request<KeyPutRequest>) -> Result<Response<KeyPutReply>, Status> {
        self.ctx.access.authorize_meta_call(&request, "KeyPut").await?;
        let meta = self.ctx.meta.as_ref().ok_or_else(|| Status::failed_precondition("not a meta node"))?;
        let r = request.into_inner();
        super::keys::put(&meta.keys, r.key_id, r.version, r.wrapped.to_vec()).await?;
        Ok(Response::new(KeyPutReply {}))
    }

    async fn key_get(&self, request: Request<KeyGetRequest>) -> Result<Response<KeyGetReply>, Status> {
        self.ctx.access.authorize_meta_call(&request, "KeyGet").await?;
        let meta = self.ctx.meta.as_ref().ok_or_else(|| Status::failed_precondition("not a meta node"))?;
        let r = request.into_inner();
        let wrapped = super::keys::local(&meta.keys, r.key_id, r.version).await?;
        Ok(Response::new(KeyGetReply { wrapped: wrapped.into() }))
    }

    async fn snapshot_create(&self, request: Request<SnapshotCreateRequest>) -> Result<Response<SnapshotReply>, Status> {
        let volume = request.get_ref().volume.clone();
        forward_or!(self, request, snapshot_create, Action::SnapshotCreate, Some(&volume), |meta, caller, msg| {
            let target = format!("{}@{}", msg.volume, msg.name);
            let cmd = MetaCommand::CreateSnapshot { volume: msg.volume.clone(), name: msg.name.clone(), now_unix_ms: now_ms() };
            if let MetaReply::Error(e) = self.propose_audited(meta, cmd, &caller, Action::SnapshotCreate, &target).await? {
                return Err(status_of(&e));
            }
            self.await_cut(meta, &msg.volume, &msg.name).await?;
            tracing::info!(snapshot = %target, by = %caller.principal, "snapshot taken");
            self.snapshot_reply(meta, &msg.volume, &msg.name)
        })
    }

    async fn snapshot_cut(&self, request: Request<SnapshotCutRequest>) -> Result<Response<SnapshotReply>, Status> {
        let volume = request.get_ref().volume.clone();
        forward_or!(self, request, snapshot_cut, Action::VolumeAttach, Some(&volume), |meta, _caller, msg| {
            let cmd = MetaCommand::CutSnapshot {
                volume: msg.volume.clone(),
                name: msg.name.clone(),
                attach_epoch: msg.attach_epoch,
                now_unix_ms: now_ms(),
            };
            if let MetaReply::Error(e) = self.propose(meta, cmd).await? {
                return Err(status_of(&e));
            }
            self.snapshot_reply(meta, &msg.volume, &msg.name)
        })
    }

    async fn snapshot_list(&self, request: Request<SnapshotListRequest>) -> Result<Response<SnapshotListReply>, Status> {
        let volume = request.get_ref().volume.clone();
        let scope = (!volume.is_empty()).then_some(volume.as_str());
        forward_or!(self, request, snapshot_list, Action::SnapshotList, scope, |meta, caller, msg| {
            let s = self.read(meta).await?;
            if !msg.volume.is_empty() && s.volume_by_name(&msg.volume).is_none() {
                return Err(status_of(&MetaError::NoSuchVolume(msg.volume.clone())));
            }
            let mut volumes = Vec::new();
            for v in s.volumes.values() {
                if v.state != VolumeState::Active || !(msg.volume.is_empty() || v.name == msg.volume) || !caller.principal.sees_volume(&v.name) {
                    continue;
                }
                let mut volume = volume_in(&s, v);
                // Only volumes with snapshots cost the nodes a question.
                if !volume.snapshots.is_empty() {
                    self.fill_usage(&s, v, &mut volume).await;
                }
                volumes.push(volume);
            }
            Ok(Response::new(SnapshotListReply { volumes }))
        })
    }

    async fn snapshot_delete(&self, request: Request<SnapshotDeleteRequest>) -> Result<Response<SnapshotReply>, Status> {
        let volume = request.get_ref().volume.clone();
        forward_or!(self, request, snapshot_delete, Action::SnapshotDelete, Some(&volume), |meta, caller, msg| {
            let target = format!("{}@{}", msg.volume, msg.name);
            let deleted = self.snapshot_reply(meta, &msg.volume, &msg.name)?;
            let cmd = MetaCommand::DeleteSnapshot { volume: msg.volume.clone(), name: msg.name.clone() };
            if let MetaReply::Error(e) = self.propose_audited(meta, cmd, &caller, Action::SnapshotDelete, &target).await? {
                return Err(status_of(&e));
            }
            tracing::info!(snapshot = %target, by = %caller.principal, "snapshot deleted; its placement groups release what only it held");
            let mut reply = deleted.into_inner();
            reply.volume = self.snapshot_reply(meta, &msg.volume, &msg.name)?.into_inner().volume;
            reply.map_version = self.current_version();
            Ok(Response::new(reply))
        })
    }

    async fn volume_rollback(&self, request: Request<VolumeRollbackRequest>) -> Result<Response<SnapshotReply>, Status> {
        let volume = request.get_ref().volume.clone();
        forward_or!(self, request, volume_rollback, Action::VolumeRollback, Some(&volume), |meta, caller, msg| {
            let target = format!("{} to {}", msg.volume, msg.snapshot);
            let cmd = MetaCommand::RollbackVolume { volume: msg.volume.clone(), snapshot: msg.snapshot.clone() };
            if let MetaReply::Error(e) = self.propose_audited(meta, cmd, &caller, Action::VolumeRollback, &target).await? {
                return Err(status_of(&e));
            }
            tracing::info!(volume = %msg.volume, snapshot = %msg.snapshot, by = %caller.principal, "volume rollback started");
            self.snapshot_reply(meta, &msg.volume, &msg.snapshot)
        })
    }

    async fn volume_set_qos(&self, request: Request<VolumeSetQosRequest>) -> Result<Response<VolumeReply>, Status> {
        let name = request.get_ref().name.clone();
        forward_or!(self, request, volume_set_qos, Action::VolumeSetQos, Some(&name), |meta, caller, msg| {
            let qos = msg.qos.as_ref().map(qos_from_proto);
            if let Some(q) = &qos {
                q.validate().map_err(|e| Status::invalid_argument(format!("volume {}: {e}", msg.name)))?;
            }
            let target = format!("{} QoS {}", msg.name, qos.map_or_else(|| "the cluster default".to_string(), |q| q.describe()));
            let reply =
                self.propose_audited(meta, MetaCommand::SetVolumeQos { name: msg.name.clone(), qos }, &caller, Action::VolumeSetQos, &target).await?;
            if let MetaReply::Volume(v) = &reply {
                tracing::info!(volume = %v.name, by = %caller.principal, "{target}");
            }
            self.volume_reply(reply, self.current_version())
        })
    }

    async fn volume_clone(&self, request: Request<VolumeCloneRequest>) -> Result<Response<VolumeReply>, Status> {
        let source = request.get_ref().source.clone();
        forward_or!(self, request, volume_clone, Action::VolumeClone, Some(&source), |meta, caller, msg| {
            if !caller.principal.sees_volume(&msg.name) {
                return Err(Status::permission_denied(format!("{} may not create a volume named {:?}", caller.principal, msg.name)));
            }
            let target = format!("{}@{} as {}", msg.source, msg.snapshot, msg.name);
            let cmd = if msg.keys.is_empty() {
                MetaCommand::CloneVolume { source: msg.source.clone(), snapshot: msg.snapshot.clone(), name: msg.name.clone(), now_unix_ms: now_ms() }
            } else {
                // The clone's copies of the keys are on a majority before it exists (copies of
                // a clone that is then refused are swept as unreferenced).
                let (_, theirs) = encrypted_volume(&self.read(meta).await?, &msg.source)?;
                let existing: Vec<u32> = theirs.digests.keys().copied().collect();
                let next = existing.last().copied().unwrap_or(0) + 1;
                let versions: Vec<(u32, Vec<u8>)> = msg.keys.iter().map(|k| (k.version, k.wrapped.to_vec())).collect();
                if next > u32::from(u16::MAX) || versions.iter().map(|(v, _)| *v).ne(existing.iter().copied().chain([next])) {
                    return Err(Status::invalid_argument(format!(
                        "a clone of encrypted volume {} must carry its key versions {existing:?} rewrapped for the clone, then a new version {next}, in order",
                        msg.source
                    )));
                }
                let keys = super::keys::store_rewrapped(&self.ctx, meta, next, &versions).await?;
                MetaCommand::CloneEncryptedVolume {
                    source: msg.source.clone(),
                    snapshot: msg.snapshot.clone(),
                    name: msg.name.clone(),
                    now_unix_ms: now_ms(),
                    keys,
                }
            };
            let reply = self.propose_audited(meta, cmd, &caller, Action::VolumeClone, &target).await?;
            if let MetaReply::Volume(v) = &reply {
                tracing::info!(volume = %v.name, id = %v.id, source = %msg.source, snapshot = %msg.snapshot, by = %caller.principal, "volume cloned");
            }
            self.volume_reply(reply, self.current_version())
        })
    }

    async fn volume_list(&self, request: Request<VolumeListRequest>) -> Result<Response<VolumeListReply>, Status> {
        forward_or!(self, request, volume_list, Action::VolumeList, None, |meta, caller, _msg| {
            let s = self.read(meta).await?;
            let volumes = s.volumes.values().filter(|v| caller.principal.sees_volume(&v.name)).map(|v| volume_in(&s, v)).collect();
            Ok(Response::new(VolumeListReply { volumes }))
        })
    }

    async fn volume_show(&self, request: Request<VolumeShowRequest>) -> Result<Response<VolumeReply>, Status> {
        let name = request.get_ref().name.clone();
        forward_or!(self, request, volume_show, Action::VolumeShow, Some(&name), |meta, _caller, msg| {
            let s = self.read(meta).await?;
            match s.volume_by_name(&msg.name) {
                Some(v) => {
                    let mut volume = volume_in(&s, v);
                    if msg.usage {
                        self.fill_usage(&s, v, &mut volume).await;
                    }
                    Ok(Response::new(VolumeReply { volume: Some(volume), map_version: s.version }))
                }
                None => Err(status_of(&MetaError::NoSuchVolume(msg.name))),
            }
        })
    }

    async fn volume_resize(&self, request: Request<VolumeResizeRequest>) -> Result<Response<VolumeReply>, Status> {
        let name = request.get_ref().name.clone();
        forward_or!(self, request, volume_resize, Action::VolumeResize, Some(&name), |meta, caller, msg| {
            let cmd = MetaCommand::ResizeVolume { name: msg.name.clone(), size: msg.size };
            let reply = self.propose_audited(meta, cmd, &caller, Action::VolumeResize, &format!("{} to {} bytes", msg.name, msg.size)).await?;
            self.volume_reply(reply, self.current_version())
        })
    }

    async fn volume_delete(&self, request: Request<VolumeDeleteRequest>) -> Result<Response<VolumeDeleteReply>, Status> {
        let name = request.get_ref().name.clone();
        forward_or!(self, request, volume_delete, Action::VolumeDelete, Some(&name), |meta, caller, msg| {
            let reply =
                self.propose_audited(meta, MetaCommand::DeleteVolume { name: msg.name.clone() }, &caller, Action::VolumeDelete, &msg.name).await?;
            let v = match reply {
                MetaReply::Volume(v) => v,
                MetaReply::Error(e) => return Err(status_of(&e)),
                _ => return Err(Status::internal("meta group returned no volume")),
            };
            tracing::info!(volume = %v.name, id = %v.id, by = %caller.principal, "volume deleted; releasing its data");
            let total = meta.shared.with(|s| s.pgs.len()) as u32;
            let mut rx = meta.shared.subscribe();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            loop {
                let (done, kept) = meta.shared.with(|s| match s.volumes.get(&v.id) {
                    None => (total, false),
                    Some(VolumeRecord { state: VolumeState::Deleting { done }, .. }) => (done.len() as u32, s.read_by_clones(v.id)),
                    Some(_) => (0, false),
                });
                if !msg.wait || done >= total || kept || tokio::time::Instant::now() > deadline {
                    let mut volume = volume_proto(&v, total as usize, None, None, None);
                    volume.kept_for_clones = kept;
                    return Ok(Response::new(VolumeDeleteReply { volume: Some(volume), pgs_done: done, pgs_total: total }));
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
            }
        })
    }

    async fn volume_attach(&self, request: Request<VolumeAttachRequest>) -> Result<Response<VolumeReply>, Status> {
        let name = request.get_ref().name.clone();
        forward_or!(self, request, volume_attach, Action::VolumeAttach, Some(&name), |meta, caller, msg| {
            if msg.holder.is_empty() {
                return Err(Status::invalid_argument("an attachment needs a holder name"));
            }
            let target = format!("{} by {}{}", msg.name, msg.holder, if msg.force { " (forced)" } else { "" });
            let cmd = MetaCommand::AttachVolume { name: msg.name, holder: msg.holder, force: msg.force };
            let reply = self.propose_audited(meta, cmd, &caller, Action::VolumeAttach, &target).await?;
            if let MetaReply::Volume(v) = &reply {
                tracing::info!(volume = %v.name, epoch = v.attach_epoch, holder = ?v.attached_by, by = %caller.principal, "volume attached");
            }
            self.volume_reply(reply, self.current_version())
        })
    }

    async fn volume_detach(&self, request: Request<VolumeDetachRequest>) -> Result<Response<VolumeReply>, Status> {
        let name = request.get_ref().name.clone();
        forward_or!(self, request, volume_detach, Action::VolumeDetach, Some(&name), |meta, caller, msg| {
            let cmd = MetaCommand::DetachVolume { name: msg.name.clone(), epoch: msg.epoch };
            let reply = self.propose_audited(meta, cmd, &caller, Action::VolumeDetach, &msg.name).await?;
            if let MetaReply::Volume(v) = &reply {
                tracing::info!(volume = %v.name, epoch = v.attach_epoch, by = %caller.principal, "volume detached");
            }
            self.volume_reply(reply, self.current_version())
        })
    }

    async fn scrub_status(&self, request: Request<ScrubStatusRequest>) -> Result<Response<ScrubStatusReply>, Status> {
        self.ctx.access.authorize(&request, Action::ScrubStatus, None).await?;
        use std::sync::atomic::Ordering::Relaxed;
        let store = self.ctx.store.stats();
        let scrub = &self.ctx.scrub;
        let last = scrub.last_log_scrub_unix_ms.load(Relaxed);
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let ago = |t: u64| {
            if t == 0 { 0 } else { now_ms.saturating_sub(t).max(1) }
        };
        let integrity = &self.ctx.integrity;
        Ok(Response::new(ScrubStatusReply {
            node: self.ctx.config.id.0,
            pending_bytes: store.slots_pending_scrub * store.slot_size,
            pending_ranges: store.slots_pending_scrub,
            overwritten_bytes: scrub.overwritten_bytes.load(Relaxed),
            ranges_released: scrub.slots_released.load(Relaxed),
            errors: scrub.errors.load(Relaxed),
            rate_bytes_per_sec: self.ctx.config.overwrite_rate,
            pattern: self.ctx.config.overwrite_pattern.to_string(),
            passes: self.ctx.config.overwrite_passes,
            log_scrubs: scrub.log_scrubs.load(Relaxed),
            last_log_scrub_ms_ago: if last == 0 { 0 } else { now_ms.saturating_sub(last).max(1) },
            integrity_running: integrity.running().map(|k| k.as_str().to_string()).unwrap_or_default(),
            integrity_chunks_done: integrity.chunks_done.load(Relaxed),
            integrity_chunks_total: integrity.chunks_total.load(Relaxed),
            integrity_passes_completed: integrity.passes_completed.load(Relaxed),
            integrity_bytes_verified: integrity.bytes_verified.load(Relaxed),
            corrupt_found: integrity.corrupt_found.load(Relaxed),
            divergent_found: integrity.divergent_found.load(Relaxed),
            repairs_issued: integrity.repairs_issued.load(Relaxed),
            blocks_repaired: integrity.blocks_repaired.load(Relaxed),
            unrepairable: integrity.unrepairable.load(Relaxed),
            integrity_check_errors: integrity.check_errors.load(Relaxed),
            last_local_pass_ms_ago: ago(integrity.last_local_unix_ms.load(Relaxed)),
            last_deep_pass_ms_ago: ago(integrity.last_deep_unix_ms.load(Relaxed)),
            integrity_rate_bytes_per_sec: self.ctx.config.integrity_rate,
            integrity_ticket_served: integrity.tickets_served.load(Relaxed),
        }))
    }

    async fn scrub_start(&self, request: Request<ScrubStartRequest>) -> Result<Response<ScrubStartReply>, Status> {
        let caller = self.ctx.access.authorize(&request, Action::ScrubStart, None).await?;
        let node = self.ctx.config.id;
        let Some(control) = self.ctx.integrity_control.get() else {
            return Err(Status::failed_precondition(format!("{node} has no storage role: it holds no data to scrub")));
        };
        let req = request.into_inner();
        let kind = if req.deep { PassKind::Deep } else { PassKind::Local };
        let running = control.stats().running().map(|k| k.as_str().to_string()).unwrap_or_default();
        let reply = match control.start(kind, Some(req.rate_bytes_per_sec)) {
            StartOutcome::Queued { ticket } => {
                tracing::info!(%node, kind = kind.as_str(), ticket, by = %caller.principal, "integrity scrub pass requested");
                ScrubStartReply { node: node.0, queued: true, running, ticket, kind: kind.as_str().into() }
            }
            StartOutcome::Joined { ticket, kind } => ScrubStartReply { node: node.0, queued: false, running, ticket, kind: kind.as_str().into() },
            StartOutcome::Stopped => {
                return Err(Status::unavailable(format!("{node} is shutting down")));
            }
        };
        self.ctx.access.record(caller.event(Action::ScrubStart.as_str(), &format!("{node} ({})", reply.kind), Outcome::Ok, String::new()));
        Ok(Response::new(reply))
    }

    async fn get_cluster_map(&self, request: Request<GetClusterMapRequest>) -> Result<Response<ClusterMap>, Status> {
        forward_or!(self, request, get_cluster_map, Action::ClusterMap, None, |meta, caller, msg| {
            let mut rx = meta.shared.subscribe();
            let wait = Duration::from_millis(u64::from(msg.wait_ms.min(30_000)));
            let deadline = tokio::time::Instant::now() + wait;
            while meta.shared.with(|s| s.version) <= msg.known_version && meta.shared.with(|s| s.cluster_id.is_some()) {
                if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                    break;
                }
                if !meta.group.status().is_leader {
                    return Err(Status::unavailable("meta leadership moved; retry"));
                }
            }
            let s = self.read(meta).await?;
            if s.cluster_id.is_none() {
                return Err(status_of(&MetaError::NotInitialized));
            }
            let mut map = self.map_proto(&s);
            match &caller.principal {
                // Nodes authenticate without a round trip: they get every token's record.
                Principal::Node(_) | Principal::Open => {
                    map.includes_tokens = true;
                    map.tokens = s.tokens.values().map(|t| token_proto(t, true)).collect();
                }
                // A token limited to some volumes sees only those.
                p => map.volumes.retain(|v| p.sees_volume(&v.name)),
            }
            Ok(Response::new(map))
        })
    }

    async fn token_create(&self, request: Request<TokenCreateRequest>) -> Result<Response<TokenCreateReply>, Status> {
        forward_or!(self, request, token_create, Action::TokenCreate, None, |meta, caller, msg| {
            let role: AccessRole = msg.role.parse().map_err(Status::invalid_argument)?;
            Self::check_grant_subset(&caller, &msg.volumes)?;
            for v in &msg.volumes {
                basalt_common::names::validate_name(v).map_err(|e| Status::invalid_argument(format!("--volume {v:?}: {e}")))?;
            }
            if msg.expires_in_secs > MAX_TOKEN_SECS {
                return Err(Status::invalid_argument(format!("a token may live at most {MAX_TOKEN_SECS} seconds (ten years)")));
            }
            if msg.name.len() > 64 || msg.name.chars().any(char::is_control) {
                return Err(Status::invalid_argument("a token's name is at most 64 printable characters"));
            }
            let allow_from = msg
                .allow_from
                .iter()
                .map(|c| c.parse().map_err(|e: basalt_security::SecurityError| Status::invalid_argument(format!("--allow-from: {e}"))))
                .collect::<Result<Vec<_>, _>>()?;
            let token = Token::generate();
            let now = now_ms();
            let mut record = TokenRecord::new(&token, role, caller.principal.actor(), now);
            record.volumes = msg.volumes.iter().cloned().collect();
            record.expires_unix_ms = (msg.expires_in_secs > 0).then(|| now + msg.expires_in_secs * 1000);
            record.allow_from = allow_from;
            record.name = msg.name.clone();
            let target = format!("{} (role {role})", token.id());
            match self.propose_audited(meta, MetaCommand::CreateToken { record }, &caller, Action::TokenCreate, &target).await? {
                MetaReply::Token(t) => {
                    tracing::info!(token = %t.id, role = %t.role, by = %caller.principal, "token created");
                    Ok(Response::new(TokenCreateReply { info: Some(token_proto(&t, false)), token: token.expose() }))
                }
                MetaReply::Error(e) => Err(status_of(&e)),
                _ => Err(Status::internal("meta group returned no token")),
            }
        })
    }

    async fn token_list(&self, request: Request<TokenListRequest>) -> Result<Response<TokenListReply>, Status> {
        forward_or!(self, request, token_list, Action::TokenList, None, |meta, caller, _msg| {
            let s = self.read(meta).await?;
            self.ctx.access.record(caller.event(Action::TokenList.as_str(), "", Outcome::Ok, String::new()));
            Ok(Response::new(TokenListReply { tokens: s.tokens.values().map(|t| token_proto(t, false)).collect() }))
        })
    }

    async fn token_revoke(&self, request: Request<TokenRevokeRequest>) -> Result<Response<TokenRevokeReply>, Status> {
        forward_or!(self, request, token_revoke, Action::TokenRevoke, None, |meta, caller, msg| {
            let id: TokenId = msg.id.trim().parse().map_err(|e: basalt_security::SecurityError| Status::invalid_argument(e.to_string()))?;
            match self
                .propose_audited(meta, MetaCommand::RevokeToken { id, now_unix_ms: now_ms() }, &caller, Action::TokenRevoke, &id.to_string())
                .await?
            {
                MetaReply::Token(t) => {
                    tracing::info!(token = %t.id, by = %caller.principal, "token revoked");
                    Ok(Response::new(TokenRevokeReply { info: Some(token_proto(&t, false)) }))
                }
                MetaReply::Error(e) => Err(status_of(&e)),
                _ => Err(Status::internal("meta group returned no token")),
            }
        })
    }

    async fn audit_list(&self, request: Request<AuditListRequest>) -> Result<Response<AuditListReply>, Status> {
        forward_or!(self, request, audit_list, Action::AuditList, None, |meta, _caller, msg| {
            let head = self.read(meta).await?.audit;
            let audit = meta.audit.clone();
            let lines = tokio::task::spawn_blocking(move || audit.read())
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(format!("reading the audit log: {e}")))?;
            let limit = if msg.limit == 0 { 1000 } else { msg.limit.min(100_000) } as usize;
            let mut records: Vec<_> = lines
                .into_iter()
                .filter_map(|l| if let Line::Record(r) = l { Some(r) } else { None })
                .filter(|r| r.seq <= head.last_seq())
                .filter(|r| r.event.time_unix_ms >= msg.since_unix_ms)
                .filter(|r| msg.actor.is_empty() || r.event.actor.contains(&msg.actor))
                .filter(|r| msg.action.is_empty() || r.event.action.contains(&msg.action))
                .collect();
            let skip = records.len().saturating_sub(limit);
            records.drain(..skip);
            Ok(Response::new(AuditListReply {
                records: records.iter().map(audit_proto).collect(),
                total: head.kept(),
                first_seq: head.anchor.first_seq.max(1),
            }))
        })
    }

    async fn audit_verify(&self, request: Request<AuditVerifyRequest>) -> Result<Response<AuditVerifyReply>, Status> {
        forward_or!(self, request, audit_verify, Action::AuditList, None, |meta, caller, _msg| {
            let head = self.read(meta).await?.audit;
            let members: Vec<u64> = meta.group.status().voters.clone();
            let mut nodes = Vec::new();
            for id in members {
                let verdict = if id == self.ctx.config.id.0 {
                    self.check_own_audit().await
                } else {
                    match meta.group.member_addr(id).map(|a| self.ctx.clients.admin(&a)) {
                        Some(Ok(mut c)) => match tokio::time::timeout(Duration::from_secs(30), c.audit_check(AuditCheckRequest {})).await {
                            Ok(Ok(r)) => r.into_inner(),
                            Ok(Err(s)) => AuditNodeVerdict { node: id, problem: s.message().to_string(), unreachable: true, ..Default::default() },
                            Err(_) => AuditNodeVerdict { node: id, problem: "no answer within 30s".into(), unreachable: true, ..Default::default() },
                        },
                        _ => AuditNodeVerdict { node: id, problem: "address unknown".into(), unreachable: true, ..Default::default() },
                    }
                };
                nodes.push(verdict);
            }
            let bad = nodes.iter().filter(|n| !n.problem.is_empty()).count();
            let detail = if bad == 0 { String::new() } else { format!("{bad} node(s) report a problem") };
            self.ctx.access.record(caller.event("audit.verify", "", Outcome::Ok, detail));
            Ok(Response::new(AuditVerifyReply { nodes, last_seq: head.last_seq() }))
        })
    }

    async fn audit_append(&self, request: Request<AuditAppendRequest>) -> Result<Response<AuditAppendReply>, Status> {
        forward_or!(self, request, audit_append, Action::Internal, None, |meta, _caller, msg| {
            let events: Vec<AuditEvent> = msg.events.into_iter().map(event_from_proto).collect();
            match self.propose(meta, MetaCommand::AppendAudit { events }).await? {
                MetaReply::Error(e) => Err(status_of(&e)),
                _ => Ok(Response::new(AuditAppendReply {})),
            }
        })
    }

    async fn audit_report(&self, request: Request<AuditReportRequest>) -> Result<Response<AuditAppendReply>, Status> {
        let volume = request.get_ref().volume.clone();
        forward_or!(self, request, audit_report, Action::AuditReport, Some(&volume), |meta, caller, msg| {
            if msg.refused.len() > MAX_REPORTED {
                return Err(Status::invalid_argument(format!("at most {MAX_REPORTED} refusals per report, not {}", msg.refused.len())));
            }
            // The reporter is the actor and the NBD listener's refusal is the action: a
            // reporter can add only records that name itself, about its own exports.
            let clip = |s: &str| s.chars().take(256).collect::<String>();
            let mut events: Vec<AuditEvent> = msg
                .refused
                .iter()
                .map(|r| {
                    let mut e = caller.event(
                        "connect.nbd",
                        &volume,
                        Outcome::Denied,
                        format!("refused by the attach process at {}: {}", caller.source, clip(&r.reason)),
                    );
                    e.source = clip(&r.source);
                    e
                })
                .collect();
            if msg.suppressed > 0 {
                let detail = format!("{} more refused NBD connection(s) not recorded one by one (rate limit per source)", msg.suppressed);
                events.push(caller.event("connect.nbd", &volume, Outcome::Denied, detail));
            }
            if events.is_empty() {
                return Ok(Response::new(AuditAppendReply {}));
            }
            match self.propose(meta, MetaCommand::AppendAudit { events }).await? {
                MetaReply::Error(e) => Err(status_of(&e)),
                _ => Ok(Response::new(AuditAppendReply {})),
            }
        })
    }

    async fn backup_create(&self, request: Request<BackupCreateRequest>) -> Result<Response<BackupReply>, Status> {
        let volume = request.get_ref().volume.clone();
        forward_or!(self, request, backup_create, Action::BackupCreate, Some(&volume), |meta, caller, msg| {
            self.create_backup(meta, &caller, msg, None).await
        })
    }

    async fn backup_list(&self, request: Request<BackupListRequest>) -> Result<Response<BackupListReply>, Status> {
        let volume = request.get_ref().volume.clone();
        let scope = (!volume.is_empty()).then_some(volume.as_str());
        forward_or!(self, request, backup_list, Action::BackupList, scope, |meta, caller, msg| self.list_backups(meta, &caller, msg).await)
    }

    async fn backup_show(&self, request: Request<BackupShowRequest>) -> Result<Response<BackupReply>, Status> {
        forward_or!(self, request, backup_show, Action::BackupList, None, |meta, caller, msg| self.show_backup(meta, &caller, msg.id).await)
    }

    async fn backup_delete(&self, request: Request<BackupShowRequest>) -> Result<Response<BackupReply>, Status> {
        forward_or!(self, request, backup_delete, Action::BackupDelete, None, |meta, caller, msg| self.delete_backup(meta, &caller, msg.id).await)
    }

    async fn backup_verify(&self, request: Request<BackupShowRequest>) -> Result<Response<BackupVerifyReply>, Status> {
        forward_or!(self, request, backup_verify, Action::BackupVerify, None, |meta, caller, msg| self.verify_backup(meta, &caller, msg.id).await)
    }

    async fn backup_verify_progress(&self, request: Request<BackupShowRequest>) -> Result<Response<JobProgress>, Status> {
        forward_or!(self, request, backup_verify_progress, Action::BackupVerify, None, |meta, caller, msg| {
            self.verify_progress(meta, &caller, msg.id).await
        })
    }

    async fn backup_restore(&self, request: Request<BackupRestoreRequest>) -> Result<Response<RestoreStatusReply>, Status> {
        let to = request.get_ref().to.clone();
        forward_or!(self, request, backup_restore, Action::BackupRestore, Some(&to), |meta, caller, msg| {
            self.restore_backup(meta, &caller, msg).await
        })
    }

    async fn backup_key(&self, request: Request<BackupShowRequest>) -> Result<Response<VolumeKeyReply>, Status> {
        forward_or!(self, request, backup_key, Action::BackupRestore, None, |meta, caller, msg| self.backup_key(meta, &caller, msg.id).await)
    }

    async fn restore_status(&self, request: Request<RestoreStatusRequest>) -> Result<Response<RestoreStatusReply>, Status> {
        let volume = request.get_ref().volume.clone();
        forward_or!(self, request, restore_status, Action::BackupList, Some(&volume), |meta, _caller, msg| {
            self.show_restore(meta, &msg.volume).await
        })
    }

    async fn backup_pin(&self, request: Request<BackupPinRequest>) -> Result<Response<BackupReply>, Status> {
        forward_or!(self, request, backup_pin, Action::BackupPin, None, |meta, caller, msg| self.pin(meta, &caller, msg.id, msg.pinned).await)
    }

    async fn schedule_create(&self, request: Request<ScheduleCreateRequest>) -> Result<Response<ScheduleReply>, Status> {
        forward_or!(self, request, schedule_create, Action::BackupCreate, None, |meta, caller, msg| {
            let schedule = msg.schedule.ok_or_else(|| Status::invalid_argument("no schedule given"))?;
            for v in &schedule.volumes {
                self.ctx.access.check(&caller, Action::BackupCreate, Some(v))?;
            }
            // A schedule of every volume is for callers that see every volume.
            if schedule.all && matches!(&caller.principal, basalt_security::Principal::Token(t) if !t.volumes.is_empty()) {
                return Err(Status::permission_denied("a schedule of --all volumes needs a token without volume grants"));
            }
            self.create_schedule(meta, &caller, schedule).await
        })
    }

    async fn schedule_list(&self, request: Request<ScheduleListRequest>) -> Result<Response<ScheduleListReply>, Status> {
        forward_or!(self, request, schedule_list, Action::BackupList, None, |meta, caller, _msg| self.list_schedules(meta, &caller).await)
    }

    async fn schedule_delete(&self, request: Request<ScheduleDeleteRequest>) -> Result<Response<ScheduleReply>, Status> {
        forward_or!(self, request, schedule_delete, Action::BackupDelete, None, |meta, caller, msg| self
            .delete_schedule(meta, &caller, &msg.name)
            .await)
    }

    async fn backup_report(&self, request: Request<BackupReportRequest>) -> Result<Response<BackupReportReply>, Status> {
        forward_or!(self, request, backup_report, Action::Internal, None, |meta, caller, msg| {
            // A node reports only its own jobs.
            if !matches!(caller.principal, basalt_security::Principal::Node(n) if n == msg.node)
                && caller.principal != basalt_security::Principal::Open
            {
                return Err(Status::permission_denied(format!("{} may not report the jobs of node-{}", caller.principal.actor(), msg.node)));
            }
            self.backup_reported(meta, msg).await
        })
    }

    async fn audit_check(&self, request: Request<AuditCheckRequest>) -> Result<Response<AuditNodeVerdict>, Status> {
        self.ctx.access.authorize_meta_call(&request, "AuditCheck").await?;
        Ok(Response::new(self.check_own_audit().await))
    }
}

/// Ships this node's queued audit events to the meta leader, batched; retries for a while when
/// no leader answers, then drops the batch (counted). Also reports refusals the rate limit kept
/// out of the log one by one, as one summary event.
pub async fn run_audit_shipper(ctx: Arc<NodeCtx>, mut rx: tokio::sync::mpsc::Receiver<AuditEvent>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    use std::sync::atomic::Ordering::Relaxed;
    let service = AdminService::new(ctx.clone());
    let mut reported_suppressed = 0u64;
    let mut summary = tokio::time::interval(Duration::from_secs(10));
    loop {
        let mut events = Vec::new();
        tokio::select! {
            e = rx.recv() => match e {
                Some(e) => events.push(e),
                None => return,
            },
            _ = summary.tick() => {}
            _ = shutdown.changed() => return,
        }
        while events.len() < 512 {
            match rx.try_recv() {
                Ok(e) => events.push(e),
                Err(_) => break,
            }
        }
        let suppressed = ctx.access.stats.audit_suppressed.load(Relaxed);
        if suppressed > reported_suppressed {
            events.push(AuditEvent {
                time_unix_ms: now_ms(),
                actor: ctx.config.id.to_string(),
                source: ctx.config.listen.to_string(),
                action: "audit.suppressed".into(),
                target: String::new(),
                outcome: Outcome::Denied,
                detail: format!("{} refusal(s) on this node were not recorded one by one (rate limit per source)", suppressed - reported_suppressed),
            });
            reported_suppressed = suppressed;
        }
        if events.is_empty() {
            continue;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match service.ship(events.clone()).await {
                Ok(()) => break,
                Err(e) if tokio::time::Instant::now() > deadline => {
                    ctx.access.stats.audit_dropped.fetch_add(events.len() as u64, Relaxed);
                    tracing::error!(error = %e.message(), count = events.len(), "audit events could not reach the meta group; dropped");
                    break;
                }
                Err(_) => {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
    }
}

impl AdminService {
    /// Sends audit events to the meta group: proposed here when this node leads it, else to
    /// the meta node the routing finds.
    async fn ship(&self, events: Vec<AuditEvent>) -> Result<(), Status> {
        if let Some(meta) = &self.ctx.meta
            && meta.group.status().is_leader
        {
            return match self.propose(meta, MetaCommand::AppendAudit { events }).await? {
                MetaReply::Error(e) => Err(status_of(&e)),
                _ => Ok(()),
            };
        }
        let events = events.into_iter().map(event_proto).collect();
        let req = Request::new(AuditAppendRequest { events });
        match self.route(&req).await? {
            Route::Forward(mut client, hops) => {
                let mut fwd = Request::new(req.into_inner());
                fwd.metadata_mut().insert(HOPS, hops.into());
                client.audit_append(fwd).await.map(|_| ())
            }
            // Became leader meanwhile: the next attempt proposes directly.
            Route::Local(_) => Err(Status::unavailable("meta leadership changed; retry")),
        }
    }
}

/// On meta nodes: feeds the node's token table and its set of meta-role nodes from the
/// applied meta state as soon as it changes (the map poll feeds them too, and on spare meta
/// nodes alone).
pub async fn run_token_feeder(ctx: Arc<NodeCtx>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let Some(meta) = &ctx.meta else { return };
    let mut rx = meta.shared.subscribe();
    let mut last: Option<BTreeMap<TokenId, TokenRecord>> = None;
    loop {
        let (version, tokens, metas) = meta.shared.with(|s| {
            let metas = s.nodes.values().filter(|n| n.roles.contains(&Role::Meta)).map(|n| n.id.0).collect();
            (s.version, s.tokens.clone(), metas)
        });
        ctx.access.set_meta_nodes(version, metas);
        if last.as_ref() != Some(&tokens) {
            ctx.access.set_tokens(version, basalt_security::TokenTable::new(tokens.values().cloned()));
            last = Some(tokens);
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

/// On the meta leader: keeps the audit log within `audit.max_records` and `audit.max_age_days`,
/// pruning (after export on every meta node) a tenth more than needed at a time.
pub async fn run_audit_pruner(ctx: Arc<NodeCtx>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let Some(meta) = &ctx.meta else { return };
    let service = AdminService::new(ctx.clone());
    let cfg = ctx.config.audit.clone();
    // The count is known from the head; ages only from the file, read every ten minutes.
    let mut last_age_check = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            _ = shutdown.changed() => return,
        }
        if !meta.group.status().is_leader {
            continue;
        }
        let head = meta.shared.with(|s| s.audit.clone());
        if head.kept() <= cfg.max_records && last_age_check.elapsed() < Duration::from_secs(600) {
            continue;
        }
        last_age_check = tokio::time::Instant::now();
        let audit = meta.audit.clone();
        let Ok(Ok(lines)) = tokio::task::spawn_blocking(move || audit.read()).await else {
            continue;
        };
        let records: Vec<_> =
            lines.into_iter().filter_map(|l| if let Line::Record(r) = l { Some(r) } else { None }).filter(|r| r.seq <= head.last_seq()).collect();
        let oldest_allowed = now_ms().saturating_sub(cfg.max_age.as_millis() as u64);
        let Some((through, through_hash)) = super::audit_log::prune_point(&records, cfg.max_records, oldest_allowed) else { continue };
        match service.propose(meta, MetaCommand::PruneAudit { through, through_hash }).await {
            Ok(_) => tracing::info!(through, export = %cfg.export_dir.display(), "audit log pruned after export"),
            Err(e) => {
                tracing::warn!(error = %e.message(), "pruning the audit log failed; will retry")
            }
        }
    }
}

/// On the meta leader: asks every PG to release the data of deleted volumes and records each
/// PG's completion, until the volume record can go; likewise the chunk versions that only
/// deleted snapshots held.
pub async fn run_volume_reaper(ctx: Arc<NodeCtx>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let Some(meta) = &ctx.meta else { return };
    let service = AdminService::new(ctx.clone());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => return,
        }
        if !meta.group.status().is_leader {
            continue;
        }
        // Deleting volumes with the PGs yet to release them, and every PG's replicas.
        type Work = (Vec<(VolumeId, Vec<PgId>)>, Vec<Vec<NodeId>>);
        let (pending, pgs): Work = meta.shared.with(|s| {
            let pending = s
                .volumes
                .values()
                .filter_map(|v| match &v.state {
                    // A deleted volume some clone still reads keeps its data until none does.
                    VolumeState::Deleting { .. } if s.read_by_clones(v.id) => None,
                    VolumeState::Deleting { done } => Some((v.id, s.pgs.iter().map(|p| p.id).filter(|p| !done.contains(p)).collect::<Vec<_>>())),
                    VolumeState::Active => None,
                })
                .collect();
            (pending, s.pgs.iter().map(|p| p.replicas.clone()).collect())
        });
        // Volumes being rolled back, with the PGs yet to apply it.
        type Rollbacks = Vec<(VolumeId, u64, u64, Vec<PgId>)>;
        let rollbacks: Rollbacks = meta.shared.with(|s| {
            s.snapshots
                .iter()
                .filter_map(|(id, x)| x.rollback.as_ref().map(|r| (*id, r.to_epoch, r.at_epoch, r.todo.iter().copied().collect())))
                .collect()
        });
        // Volumes whose deleted snapshots' versions some PGs have yet to release.
        type Releases = Vec<(VolumeId, u64, Vec<u64>, Vec<PgId>)>;
        let releases: Releases = meta.shared.with(|s| {
            s.snapshots
                .iter()
                .filter(|(_, x)| !x.release_todo.is_empty())
                .map(|(id, x)| (*id, x.release_generation, s.kept_epochs(*id), x.release_todo.iter().copied().collect()))
                .collect()
        });
        if pending.is_empty() && releases.is_empty() && rollbacks.is_empty() {
            continue;
        }
        let views = ctx.liveness.pg_views();
        let nodes = meta.shared.with(|s| s.nodes.clone());
        let addrs_of = |pg: PgId| -> Vec<String> {
            let leader = views.get(&pg.0).map(|v| NodeId(v.leader)).filter(|l| l.0 != 0);
            let mut candidates: Vec<NodeId> = leader.into_iter().collect();
            candidates.extend(pgs.get(pg.0 as usize).cloned().unwrap_or_default());
            candidates.iter().filter_map(|n| nodes.get(n).map(|r| r.addr.clone())).collect()
        };
        for (volume, to, at, todo) in rollbacks {
            let req = |pg: PgId| ReleaseVolumeRequest { pg: pg.0, volume_id: volume.0, rollback_to: to, rollback_at: at, ..Default::default() };
            // A PG copies each changed chunk: give it time.
            for pg in ask_pgs(&ctx, &addrs_of, todo, Duration::from_secs(60), req).await {
                if let Err(e) = service.propose(meta, MetaCommand::RolledBack { volume, pg, at_epoch: at }).await {
                    tracing::debug!(%volume, %pg, error = %e.message(), "recording a rollback failed; will retry");
                }
            }
        }
        for (volume, generation, live, todo) in releases {
            let req = |pg: PgId| ReleaseVolumeRequest {
                pg: pg.0,
                volume_id: volume.0,
                versions_only: true,
                live_epochs: live.clone(),
                ..Default::default()
            };
            for pg in ask_pgs(&ctx, &addrs_of, todo, Duration::from_secs(10), req).await {
                if let Err(e) = service.propose(meta, MetaCommand::SnapshotsReleased { volume, pg, generation }).await {
                    tracing::debug!(%volume, %pg, error = %e.message(), "recording a snapshot release failed; will retry");
                }
            }
        }
        for (volume, todo) in pending {
            let req = |pg: PgId| ReleaseVolumeRequest { pg: pg.0, volume_id: volume.0, ..Default::default() };
            for pg in ask_pgs(&ctx, &addrs_of, todo, Duration::from_secs(10), req).await {
                if let Err(e) = service.propose(meta, MetaCommand::VolumePgReleased { volume, pg }).await {
                    tracing::debug!(%volume, %pg, error = %e.message(), "recording release failed; will retry");
                }
            }
        }
    }
}

/// Sends each PG of `todo` its `ReleaseVolumeRequest` (a release, a snapshot release or a
/// rollback), trying the PG's leader first and then its replicas, each call bounded by
/// `timeout`; returns the PGs that applied it.
async fn ask_pgs(
    ctx: &Arc<NodeCtx>,
    addrs_of: &impl Fn(PgId) -> Vec<String>,
    todo: Vec<PgId>,
    timeout: Duration,
    req: impl Fn(PgId) -> ReleaseVolumeRequest,
) -> Vec<PgId> {
    let calls = todo.into_iter().map(|pg| {
        let addrs = addrs_of(pg);
        let req = req(pg);
        async move {
            for addr in addrs {
                let Ok(mut c) = ctx.clients.data(&addr) else {
                    continue;
                };
                if let Ok(Ok(r)) = tokio::time::timeout(timeout, c.release_volume(req.clone())).await
                    && r.into_inner().error.is_none()
                {
                    return Some(pg);
                }
            }
            None
        }
    });
    futures::future::join_all(calls).await.into_iter().flatten().collect()
}
