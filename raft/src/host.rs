//! [`RaftHost`]: everything Raft on one node — the shared log database, the outgoing router,
//! the incoming service and the groups hosted here.

use std::marker::PhantomData;
use std::sync::Arc;

use basalt_proto::raft::raft_transport_server::RaftTransportServer;

use crate::error::RaftError;
use crate::group::{RaftGroup, endpoint};
use crate::log_store::{LogEngine, LogEngineConfig};
use crate::state_machine::{SmAdapter, StateMachine};
use crate::transport::network::NetworkFactory;
use crate::transport::server::Registry;
use crate::transport::{Router, SpaceBook, TransportService};
use crate::types::{GroupId, NodeId};

/// Timing and sizing of every group on the node.
#[derive(Clone, Debug)]
pub struct RaftTuning {
    /// Leader heartbeat interval. Long on purpose: hundreds of groups per node must idle cheaply.
    pub heartbeat_ms: u64,
    /// Election timeout range.
    pub election_timeout_min_ms: u64,
    /// Election timeout range.
    pub election_timeout_max_ms: u64,
    /// Checkpoint after this many applied entries.
    pub checkpoint_every_entries: u64,
    /// Entries kept after a checkpoint, so a briefly absent follower catches up from the log.
    pub keep_entries_after_checkpoint: u64,
    /// Entries per replication message.
    pub max_payload_entries: u64,
    /// Client proposals queued per group before callers wait (backpressure).
    pub api_queue: u64,
    /// Messages queued per peer connection before senders wait.
    pub peer_queue: usize,
}

impl Default for RaftTuning {
    fn default() -> Self {
        Self {
            heartbeat_ms: 500,
            election_timeout_min_ms: 1500,
            election_timeout_max_ms: 3000,
            checkpoint_every_entries: 1024,
            keep_entries_after_checkpoint: 64,
            max_payload_entries: 256,
            api_queue: 1024,
            peer_queue: 8192,
        }
    }
}

impl RaftTuning {
    pub(crate) fn openraft_config(&self) -> Result<openraft::Config, RaftError> {
        let cfg = openraft::Config {
            cluster_name: "basalt".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            install_snapshot_timeout: 600_000,
            max_payload_entries: self.max_payload_entries,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.checkpoint_every_entries),
            max_in_snapshot_log_to_keep: self.keep_entries_after_checkpoint,
            replication_lag_threshold: self.checkpoint_every_entries * 4,
            api_channel_size: Some(self.api_queue),
            notification_channel_size: Some(4096),
            state_machine_channel_size: Some(256),
            enable_pre_vote: Some(true),
            // Replicate an entry as soon as it is handed to the log store, so the leader's fsync
            // and the followers' overlap instead of running one after the other.
            broadcast_submitted_on_append: Some(true),
            // A restarted leader must win an election again. With openraft's default (restore
            // leadership from the stored vote) a leader killed before its own log flushed came
            // back leading the same term without the entries its followers had committed: it
            // served reads missing acknowledged writes and re-used their log ids for new entries,
            // so replicas diverged (found by the simulation, `crate::sim`, seed 1).
            enable_leader_restore: Some(false),
            ..Default::default()
        };
        cfg.validate().map_err(|e| RaftError::Membership { group: 0, reason: format!("invalid raft tuning: {e}") })
    }
}

/// Raft on one node.
#[derive(Clone)]
pub struct RaftHost {
    node_id: NodeId,
    engine: LogEngine,
    router: Router,
    registry: Registry,
    space: Arc<SpaceBook>,
    config: Arc<openraft::Config>,
    /// Security is on: peers must present node certificates.
    require_node: bool,
}

impl RaftHost {
    /// Opens the log database and prepares the transport, whose connections `dialer` opens.
    pub fn open(node_id: NodeId, log: &LogEngineConfig, tuning: &RaftTuning, dialer: basalt_security::Dialer) -> Result<Self, RaftError> {
        let engine = LogEngine::open(log)?;
        let space = Arc::new(SpaceBook::default());
        let require_node = dialer.tls().is_some();
        Ok(Self {
            require_node,
            node_id,
            engine,
            router: Router::new(node_id, tuning.peer_queue, space.clone(), dialer),
            space,
            registry: Registry::default(),
            config: Arc::new(tuning.openraft_config()?),
        })
    }

    /// This node.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The shared log database.
    pub fn log_engine(&self) -> &LogEngine {
        &self.engine
    }

    /// Outgoing connections.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Serves peers' Raft connections (those that open with [`crate::transport::frame::MAGIC`]).
    pub fn transport(&self) -> TransportService {
        TransportService { registry: self.registry.clone(), space: self.space.clone(), require_node: self.require_node }
    }

    /// This node's free space as told to peers, and theirs as heard on Raft frames.
    pub fn space(&self) -> &Arc<SpaceBook> {
        &self.space
    }

    /// The gRPC service peers send snapshots to.
    pub fn transport_service(&self) -> RaftTransportServer<TransportService> {
        RaftTransportServer::new(self.transport())
            .max_decoding_message_size(basalt_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(basalt_proto::MAX_MESSAGE_BYTES)
    }

    /// Starts (or restarts from disk) group `group` with state machine `sm` and makes it
    /// reachable by peers.
    pub async fn start_group<S: StateMachine>(&self, group: GroupId, sm: S) -> Result<RaftGroup<S>, RaftError> {
        let log = self.engine.group(group)?;
        let receiver = sm.receiver();
        let adapter = SmAdapter::new(sm).await.map_err(|e| RaftError::Stopped { group, reason: format!("state machine recovery failed: {e}") })?;
        let network = NetworkFactory::<S> { router: self.router.clone(), group, _sm: PhantomData };
        let raft = openraft::Raft::new(self.node_id, self.config.clone(), network, log, adapter)
            .await
            .map_err(|e| RaftError::Stopped { group, reason: e.to_string() })?;
        let handle = RaftGroup { group, raft };
        self.registry.insert(group, endpoint(&handle, receiver));
        Ok(handle)
    }

    /// Stops routing to `group` and shuts it down.
    pub async fn stop_group<S: StateMachine>(&self, group: &RaftGroup<S>) {
        self.registry.remove(group.id());
        group.shutdown().await;
    }
}
