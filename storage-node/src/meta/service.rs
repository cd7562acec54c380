//! The admin API. Any node answers it: a request that needs the meta group runs on the meta
//! leader, and other nodes forward it there (at most two hops: a non-meta node forwards to a
//! meta node, which forwards to the leader), so the CLI and clients can talk to any node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use basalt_common::{DomainLevel, Layout, NodeId, PgId, VolumeId};
use basalt_proto::admin::admin_client::AdminClient;
use basalt_proto::admin::admin_server::Admin;
use basalt_proto::admin::{
    ClusterInitReply, ClusterInitRequest, ClusterMap, ClusterStatusReply, ClusterStatusRequest, GetClusterMapRequest, NodeDrainReply,
    NodeDrainRequest, NodeHeartbeatReply, NodeHeartbeatRequest, NodeInfoReply, NodeInfoRequest, NodeListReply, NodeListRequest, NodeRemoveReply,
    NodeRemoveRequest, PlacementGroup, ScrubStartReply, ScrubStartRequest, ScrubStatusReply, ScrubStatusRequest, Volume, VolumeAttachRequest,
    VolumeCreateRequest, VolumeDeleteReply, VolumeDeleteRequest, VolumeDetachRequest, VolumeListReply, VolumeListRequest, VolumeReply,
    VolumeResizeRequest, VolumeShowRequest,
};
use basalt_proto::data::ReleaseVolumeRequest;
use basalt_raft::{NodeInfo, RaftError};
use basalt_scrubber::{PassKind, StartOutcome};
use bytes::Bytes;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::liveness::record_from_proto;
use super::state::{ClusterSettings, ClusterState, MetaCommand, MetaError, MetaReply, NodeRecord, Role, VolumeRecord, VolumeState};
use crate::node::{MetaHandle, NodeCtx};

const HOPS: &str = "x-basalt-hops";
/// Default placement groups for a new cluster.
pub const DEFAULT_PG_COUNT: u32 = 32;

fn status_of(e: &MetaError) -> Status {
    match e {
        MetaError::NotInitialized => Status::failed_precondition(e.to_string()),
        MetaError::AlreadyInitialized(_) | MetaError::VolumeExists(_) => Status::already_exists(e.to_string()),
        MetaError::NoSuchVolume(_) => Status::not_found(e.to_string()),
        MetaError::InvalidName(_) | MetaError::InvalidSize(_) | MetaError::Shrink { .. } | MetaError::InvalidSettings(_) => {
            Status::invalid_argument(e.to_string())
        }
        MetaError::Placement(_) => Status::failed_precondition(e.to_string()),
        MetaError::AlreadyAttached { .. } => Status::failed_precondition(e.to_string()),
        MetaError::NoSuchNode(_) => Status::not_found(e.to_string()),
        MetaError::NodeRemoved(_) | MetaError::NodeInUse { .. } | MetaError::BadMove(_) => Status::failed_precondition(e.to_string()),
    }
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Converts a volume record for the wire.
pub fn volume_proto(v: &VolumeRecord, pg_total: usize) -> Volume {
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
    }
}

enum Route<'a> {
    Local(&'a MetaHandle),
    Forward(AdminClient<Channel>, u32),
}

fn forwarded<T>(msg: T, hops: u32) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(HOPS, hops.into());
    r
}

/// The admin gRPC service.
pub struct AdminService {
    ctx: Arc<NodeCtx>,
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

    /// Proposes `cmd` to the meta group (this node must lead it) and decodes the reply.
    pub(crate) async fn propose(&self, meta: &MetaHandle, cmd: MetaCommand) -> Result<MetaReply, Status> {
        let bytes = bincode::serialize(&cmd).map_err(|e| Status::internal(format!("encoding meta command: {e}")))?;
        match meta.group.propose(Bytes::from(bytes)).await {
            Ok(reply) => bincode::deserialize(&reply).map_err(|e| Status::internal(format!("decoding meta reply: {e}"))),
            Err(RaftError::NotLeader { .. }) => Err(Status::unavailable("meta leadership moved; retry")),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }

    /// Reads the state after confirming leadership (linearizable).
    async fn read(&self, meta: &MetaHandle) -> Result<ClusterState, Status> {
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
            volumes: s.volumes.values().map(|v| volume_proto(v, s.pgs.len())).collect(),
        }
    }

    fn volume_reply(&self, reply: MetaReply, version: u64) -> Result<Response<basalt_proto::admin::VolumeReply>, Status> {
        match reply {
            MetaReply::Volume(v) => {
                let pgs = self.ctx.meta.as_ref().map(|m| m.shared.with(|s| s.pgs.len())).unwrap_or(0);
                Ok(Response::new(VolumeReply { volume: Some(volume_proto(&v, pgs)), map_version: version }))
            }
            MetaReply::Error(e) => Err(status_of(&e)),
            MetaReply::Done => Err(Status::internal("meta group returned no volume")),
        }
    }

    fn current_version(&self) -> u64 {
        self.ctx.meta.as_ref().map(|m| m.shared.with(|s| s.version)).unwrap_or(0)
    }

    /// `cluster init` on the meta leader: gathers the known nodes and proposes the cluster.
    async fn init_on_leader(&self, meta: &MetaHandle, req: ClusterInitRequest, members: Vec<NodeRecord>) -> Result<ClusterInitReply, Status> {
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
        let cluster_id = format!("{:016x}", rand::random::<u64>());
        let cmd = MetaCommand::InitCluster {
            cluster_id: cluster_id.clone(),
            settings: ClusterSettings { layout, failure_domain: level },
            nodes: nodes.into_values().collect(),
        };
        match self.propose(meta, cmd).await? {
            MetaReply::Done => {
                tracing::info!(%cluster_id, pgs = layout.pg_count, "cluster initialized");
                Ok(ClusterInitReply { cluster_id, pg_count: layout.pg_count })
            }
            MetaReply::Error(e) => Err(status_of(&e)),
            MetaReply::Volume(_) => Err(Status::internal("unexpected reply to cluster init")),
        }
    }
}

macro_rules! forward_or {
    ($self:ident, $req:ident, $method:ident, |$meta:ident, $msg:ident| $local:expr) => {{
        match $self.route(&$req).await? {
            Route::Forward(mut client, hops) => client.$method(forwarded($req.into_inner(), hops)).await,
            Route::Local($meta) => {
                let $msg = $req.into_inner();
                $local
            }
        }
    }};
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn node_info(&self, _request: Request<NodeInfoRequest>) -> Result<Response<NodeInfoReply>, Status> {
        let (initialized, cluster_id) = match &self.ctx.meta {
            Some(m) => m.shared.with(|s| (s.cluster_id.is_some(), s.cluster_id.clone().unwrap_or_default())),
            None => {
                let map = self.ctx.map.borrow();
                (map.layout.is_some(), map.cluster_id.clone())
            }
        };
        Ok(Response::new(NodeInfoReply { node: Some(self.ctx.self_node()), cluster_initialized: initialized, cluster_id }))
    }

    async fn cluster_init(&self, request: Request<ClusterInitRequest>) -> Result<Response<ClusterInitReply>, Status> {
        let hops = request.metadata().get(HOPS).and_then(|v| v.to_str().ok()).and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
        let Some(meta) = &self.ctx.meta else {
            if hops > 0 {
                return Err(Status::failed_precondition("cluster init reached a node without the meta role"));
            }
            let target = self.ctx.meta_target().ok_or_else(|| Status::failed_precondition("this node knows no meta nodes"))?;
            return self.ctx.clients.admin(&target)?.cluster_init(forwarded(request.into_inner(), hops + 1)).await;
        };
        if let Some(id) = meta.shared.with(|s| s.cluster_id.clone()) {
            return Err(Status::already_exists(format!("the cluster is already initialized (cluster id {id})")));
        }
        let req = request.into_inner();
        // The meta group's members: the given addresses (or this node's seeds).
        let addrs: Vec<String> = if req.meta_addrs.is_empty() { self.ctx.seeds() } else { req.meta_addrs.clone() };
        let mut members: Vec<NodeRecord> = Vec::new();
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
                return self.init_on_leader(meta, req, members).await.map(Response::new);
            }
            if let Some(l) = meta.group.leader() {
                if hops < 2 {
                    if let Some(addr) = meta.group.member_addr(l) {
                        let mut c = self.ctx.clients.admin(&addr)?;
                        return c.cluster_init(forwarded(req, hops + 1)).await;
                    }
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Status::unavailable("the meta group elected no leader within 15s; are the other meta nodes running?"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn cluster_status(&self, request: Request<ClusterStatusRequest>) -> Result<Response<ClusterStatusReply>, Status> {
        forward_or!(self, request, cluster_status, |meta, _msg| {
            let s = self.read(meta).await?;
            let views = self.ctx.liveness.pg_views();
            let settings = s.settings;
            let st = meta.group.status();
            Ok(Response::new(ClusterStatusReply {
                initialized: s.cluster_id.is_some(),
                cluster_id: s.cluster_id.clone().unwrap_or_default(),
                meta_leader: st.leader.unwrap_or(0),
                meta_members: st.voters.clone(),
                pg_count: settings.map(|x| x.layout.pg_count).unwrap_or(0),
                extent_size: settings.map(|x| x.layout.extent_size).unwrap_or(0),
                failure_domain: settings.map(|x| x.failure_domain.to_string()).unwrap_or_default(),
                nodes: s.nodes.values().map(|n| self.node_proto(&s, n)).collect(),
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
            }))
        })
    }

    async fn node_list(&self, request: Request<NodeListRequest>) -> Result<Response<NodeListReply>, Status> {
        forward_or!(self, request, node_list, |meta, _msg| {
            let s = self.read(meta).await?;
            Ok(Response::new(NodeListReply { nodes: s.nodes.values().map(|n| self.node_proto(&s, n)).collect() }))
        })
    }

    async fn node_drain(&self, request: Request<NodeDrainRequest>) -> Result<Response<NodeDrainReply>, Status> {
        forward_or!(self, request, node_drain, |meta, msg| {
            let node = NodeId(msg.id);
            match self.propose(meta, MetaCommand::DrainNode { node, drain: !msg.undo }).await? {
                MetaReply::Error(e) => return Err(status_of(&e)),
                _ => tracing::info!(%node, drain = !msg.undo, "node drain changed"),
            }
            let s = meta.shared.snapshot();
            let record = s.nodes.get(&node).ok_or_else(|| status_of(&MetaError::NoSuchNode(node)))?;
            let left = s.replica_counts().get(&node).copied().unwrap_or(0) as u32;
            Ok(Response::new(NodeDrainReply { node: Some(self.node_proto(&s, record)), replicas_left: left }))
        })
    }

    async fn node_remove(&self, request: Request<NodeRemoveRequest>) -> Result<Response<NodeRemoveReply>, Status> {
        forward_or!(self, request, node_remove, |meta, msg| {
            let node = NodeId(msg.id);
            match self.propose(meta, MetaCommand::RemoveNode { node }).await? {
                MetaReply::Error(e) => Err(status_of(&e)),
                _ => {
                    tracing::info!(%node, "node removed from the cluster");
                    Ok(Response::new(NodeRemoveReply {}))
                }
            }
        })
    }

    async fn node_heartbeat(&self, request: Request<NodeHeartbeatRequest>) -> Result<Response<NodeHeartbeatReply>, Status> {
        if let Some(meta) = &self.ctx.meta {
            if meta.shared.with(|s| s.cluster_id.is_none()) && !meta.group.status().is_leader {
                // Before `cluster init`: remember the node so init can place PGs on it.
                let req = request.into_inner();
                if let Some(node) = req.node {
                    self.ctx.liveness.record(node, req.pgs);
                }
                return Ok(Response::new(NodeHeartbeatReply { registered: false, map_version: 0 }));
            }
        }
        forward_or!(self, request, node_heartbeat, |meta, msg| {
            let Some(node) = msg.node else { return Err(Status::invalid_argument("heartbeat without a node")) };
            let record = record_from_proto(&node);
            if record.id.0 == 0 || record.addr.is_empty() {
                return Err(Status::invalid_argument("heartbeat with node id 0 or no address"));
            }
            if meta.shared.with(|s| s.removed.contains(&record.id)) {
                return Err(status_of(&MetaError::NodeRemoved(record.id)));
            }
            self.ctx.liveness.record(node, msg.pgs);
            let (initialized, known) = meta.shared.with(|s| (s.cluster_id.is_some(), s.nodes.get(&record.id) == Some(&record)));
            if initialized && !known {
                match self.propose(meta, MetaCommand::RegisterNode { node: record.clone() }).await? {
                    MetaReply::Error(e) => return Err(status_of(&e)),
                    _ => tracing::info!(node = %record.id, addr = %record.addr, labels = %record.labels, "node registered"),
                }
            }
            Ok(Response::new(NodeHeartbeatReply { registered: initialized, map_version: self.current_version() }))
        })
    }

    async fn volume_create(&self, request: Request<VolumeCreateRequest>) -> Result<Response<VolumeReply>, Status> {
        forward_or!(self, request, volume_create, |meta, msg| {
            let reply = self.propose(meta, MetaCommand::CreateVolume { name: msg.name, size: msg.size, now_unix_ms: now_ms() }).await?;
            if let MetaReply::Volume(v) = &reply {
                tracing::info!(volume = %v.name, id = %v.id, size = v.size, "volume created");
            }
            self.volume_reply(reply, self.current_version())
        })
    }

    async fn volume_list(&self, request: Request<VolumeListRequest>) -> Result<Response<VolumeListReply>, Status> {
        forward_or!(self, request, volume_list, |meta, _msg| {
            let s = self.read(meta).await?;
            Ok(Response::new(VolumeListReply { volumes: s.volumes.values().map(|v| volume_proto(v, s.pgs.len())).collect() }))
        })
    }

    async fn volume_show(&self, request: Request<VolumeShowRequest>) -> Result<Response<VolumeReply>, Status> {
        forward_or!(self, request, volume_show, |meta, msg| {
            let s = self.read(meta).await?;
            match s.volume_by_name(&msg.name) {
                Some(v) => Ok(Response::new(VolumeReply { volume: Some(volume_proto(v, s.pgs.len())), map_version: s.version })),
                None => Err(status_of(&MetaError::NoSuchVolume(msg.name))),
            }
        })
    }

    async fn volume_resize(&self, request: Request<VolumeResizeRequest>) -> Result<Response<VolumeReply>, Status> {
        forward_or!(self, request, volume_resize, |meta, msg| {
            let reply = self.propose(meta, MetaCommand::ResizeVolume { name: msg.name, size: msg.size }).await?;
            self.volume_reply(reply, self.current_version())
        })
    }

    async fn volume_delete(&self, request: Request<VolumeDeleteRequest>) -> Result<Response<VolumeDeleteReply>, Status> {
        forward_or!(self, request, volume_delete, |meta, msg| {
            let reply = self.propose(meta, MetaCommand::DeleteVolume { name: msg.name.clone() }).await?;
            let v = match reply {
                MetaReply::Volume(v) => v,
                MetaReply::Error(e) => return Err(status_of(&e)),
                MetaReply::Done => return Err(Status::internal("meta group returned no volume")),
            };
            tracing::info!(volume = %v.name, id = %v.id, "volume deleted; releasing its data");
            let total = meta.shared.with(|s| s.pgs.len()) as u32;
            let mut rx = meta.shared.subscribe();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            loop {
                let done = meta.shared.with(|s| match s.volumes.get(&v.id) {
                    None => total,
                    Some(VolumeRecord { state: VolumeState::Deleting { done }, .. }) => done.len() as u32,
                    Some(_) => 0,
                });
                if !msg.wait || done >= total || tokio::time::Instant::now() > deadline {
                    return Ok(Response::new(VolumeDeleteReply { volume: Some(volume_proto(&v, total as usize)), pgs_done: done, pgs_total: total }));
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
            }
        })
    }

    async fn volume_attach(&self, request: Request<VolumeAttachRequest>) -> Result<Response<VolumeReply>, Status> {
        forward_or!(self, request, volume_attach, |meta, msg| {
            if msg.holder.is_empty() {
                return Err(Status::invalid_argument("an attachment needs a holder name"));
            }
            let reply = self.propose(meta, MetaCommand::AttachVolume { name: msg.name, holder: msg.holder, force: msg.force }).await?;
            if let MetaReply::Volume(v) = &reply {
                tracing::info!(volume = %v.name, epoch = v.attach_epoch, holder = ?v.attached_by, "volume attached");
            }
            self.volume_reply(reply, self.current_version())
        })
    }

    async fn volume_detach(&self, request: Request<VolumeDetachRequest>) -> Result<Response<VolumeReply>, Status> {
        forward_or!(self, request, volume_detach, |meta, msg| {
            let reply = self.propose(meta, MetaCommand::DetachVolume { name: msg.name, epoch: msg.epoch }).await?;
            if let MetaReply::Volume(v) = &reply {
                tracing::info!(volume = %v.name, epoch = v.attach_epoch, "volume detached");
            }
            self.volume_reply(reply, self.current_version())
        })
    }

    async fn scrub_status(&self, _request: Request<ScrubStatusRequest>) -> Result<Response<ScrubStatusReply>, Status> {
        use std::sync::atomic::Ordering::Relaxed;
        let store = self.ctx.store.stats();
        let scrub = &self.ctx.scrub;
        let last = scrub.last_log_scrub_unix_ms.load(Relaxed);
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let ago = |t: u64| if t == 0 { 0 } else { now_ms.saturating_sub(t).max(1) };
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
        let node = self.ctx.config.id;
        let Some(control) = self.ctx.integrity_control.get() else {
            return Err(Status::failed_precondition(format!("{node} has no storage role: it holds no data to scrub")));
        };
        let req = request.into_inner();
        let kind = if req.deep { PassKind::Deep } else { PassKind::Local };
        let running = control.stats().running().map(|k| k.as_str().to_string()).unwrap_or_default();
        let reply = match control.start(kind, Some(req.rate_bytes_per_sec)) {
            StartOutcome::Queued { ticket } => {
                tracing::info!(%node, kind = kind.as_str(), ticket, "integrity scrub pass requested");
                ScrubStartReply { node: node.0, queued: true, running, ticket, kind: kind.as_str().into() }
            }
            StartOutcome::Joined { ticket, kind } => ScrubStartReply { node: node.0, queued: false, running, ticket, kind: kind.as_str().into() },
            StartOutcome::Stopped => return Err(Status::unavailable(format!("{node} is shutting down"))),
        };
        Ok(Response::new(reply))
    }

    async fn get_cluster_map(&self, request: Request<GetClusterMapRequest>) -> Result<Response<ClusterMap>, Status> {
        forward_or!(self, request, get_cluster_map, |meta, msg| {
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
            Ok(Response::new(self.map_proto(&s)))
        })
    }
}

/// On the meta leader: asks every PG to release the data of deleted volumes and records each
/// PG's completion, until the volume record can go.
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
        let (pending, pgs): (Vec<(VolumeId, Vec<PgId>)>, Vec<Vec<NodeId>>) = meta.shared.with(|s| {
            let pending = s
                .volumes
                .values()
                .filter_map(|v| match &v.state {
                    VolumeState::Deleting { done } => Some((v.id, s.pgs.iter().map(|p| p.id).filter(|p| !done.contains(p)).collect::<Vec<_>>())),
                    VolumeState::Active => None,
                })
                .collect();
            (pending, s.pgs.iter().map(|p| p.replicas.clone()).collect())
        });
        if pending.is_empty() {
            continue;
        }
        let views = ctx.liveness.pg_views();
        let nodes = meta.shared.with(|s| s.nodes.clone());
        for (volume, todo) in pending {
            let calls = todo.into_iter().map(|pg| {
                let ctx = ctx.clone();
                let leader = views.get(&pg.0).map(|v| NodeId(v.leader)).filter(|l| l.0 != 0);
                let mut candidates: Vec<NodeId> = leader.into_iter().collect();
                candidates.extend(pgs.get(pg.0 as usize).cloned().unwrap_or_default());
                let addrs: Vec<String> = candidates.iter().filter_map(|n| nodes.get(n).map(|r| r.addr.clone())).collect();
                async move {
                    for addr in addrs {
                        let Ok(mut c) = ctx.clients.data(&addr) else { continue };
                        let req = ReleaseVolumeRequest { pg: pg.0, volume_id: volume.0 };
                        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(10), c.release_volume(req)).await {
                            if r.into_inner().error.is_none() {
                                return Some(pg);
                            }
                        }
                    }
                    None
                }
            });
            for pg in futures::future::join_all(calls).await.into_iter().flatten() {
                if let Err(e) = service.propose(meta, MetaCommand::VolumePgReleased { volume, pg }).await {
                    tracing::debug!(%volume, %pg, error = %e.message(), "recording release failed; will retry");
                }
            }
        }
    }
}
