//! A running node: opens its stores, starts its Raft groups, serves gRPC and runs the
//! background tasks, and stops them all in order.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use basalt_chunk_store::{ChunkStore, ChunkStoreConfig, ChunkStoreError, IndexMemory};
use basalt_proto::admin;
use basalt_proto::admin::admin_server::AdminServer;
use basalt_proto::data::data_server::DataServer;
use basalt_proto::view::ClusterView;
use basalt_raft::{LogEngineConfig, META_GROUP, RaftError, RaftGroup, RaftHost};
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::access::Access;
use crate::clients::Clients;
use crate::config::NodeConfig;
use crate::meta::audit_log::AuditLog;
use crate::meta::key_store::KeyStore;
use crate::meta::liveness::Liveness;
use crate::meta::service::AdminService;
use crate::meta::state::{NodeRecord, Role};
use crate::meta::state_machine::{MetaShared, MetaStateMachine};
use crate::metrics::Metrics;
use crate::pg::manager::PgManager;
use crate::pg::service::DataService;

/// Why a node could not start.
#[derive(Debug, Error)]
pub enum NodeError {
    /// A file or directory could not be used.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Another process uses the data directory.
    #[error("data directory {0} is in use by another basalt-node process")]
    Locked(PathBuf),
    /// The chunk store could not open.
    #[error("chunk store: {0}")]
    Store(#[from] ChunkStoreError),
    /// The key store could not open.
    #[error("{0}")]
    Keys(#[from] crate::meta::key_store::KeyStoreError),
    /// Raft could not start.
    #[error("raft: {0}")]
    Raft(#[from] RaftError),
    /// The TLS material could not be loaded.
    #[error("TLS: {0} (create it with `basalt cert init` and `basalt cert issue --node N`, or see docs/operations.md)")]
    Security(#[from] basalt_security::SecurityError),
    /// The backup store could not open.
    #[error("backup store: {0}")]
    Backup(String),
    /// The node's data says the cluster runs at a version this build does not speak.
    #[error("{0}")]
    Version(#[from] basalt_common::version::VersionMismatch),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The meta group, on meta-role nodes.
pub struct MetaHandle {
    /// The Raft group.
    pub group: RaftGroup<MetaStateMachine>,
    /// The replicated state as applied on this node.
    pub shared: MetaShared,
    /// This node's copy of the audit log.
    pub audit: Arc<AuditLog>,
    /// This node's copies of encrypted volumes' wrapped keys.
    pub keys: Arc<KeyStore>,
}

/// Everything the services and background tasks of a node share.
pub struct NodeCtx {
    /// Configuration.
    pub config: NodeConfig,
    /// Raft on this node.
    pub host: RaftHost,
    /// The chunk store.
    pub store: ChunkStore,
    /// The meta group, if this is a meta node.
    pub meta: Option<MetaHandle>,
    /// Placement groups hosted here.
    pub pgs: Arc<PgManager>,
    /// The latest cluster map.
    pub map: watch::Receiver<Arc<ClusterView>>,
    /// Clients to other nodes.
    pub clients: Clients,
    /// Who may connect and what they may do.
    pub access: Arc<Access>,
    /// The meta leader's live view of nodes (meaningful on the meta leader).
    pub liveness: Liveness,
    /// Counters and gauges.
    pub metrics: Metrics,
    /// Freed-space overwriting.
    pub scrub: Arc<basalt_scrubber::ScrubStats>,
    /// Integrity scrub counters.
    pub integrity: Arc<basalt_scrubber::IntegrityStats>,
    /// Starts integrity passes on demand (set once the scrubber runs; storage nodes only).
    pub integrity_control: std::sync::OnceLock<basalt_scrubber::IntegrityControl>,
    /// Serialises replica comparisons and repairs led by this node (`pg::repair`).
    pub repair_lock: tokio::sync::Mutex<()>,
    /// Progress of replica moves (meaningful on the meta leader).
    pub heal: crate::meta::healer::HealProgress,
    /// The meta node this node's last map poll succeeded on: where admin requests are
    /// forwarded first.
    pub meta_contact: std::sync::Mutex<Option<String>>,
}

impl NodeCtx {
    /// Meta nodes to talk to: the configured seeds, or this node alone if it is a meta node
    /// configured without any.
    pub fn seeds(&self) -> Vec<String> {
        if self.config.seeds.is_empty() && self.config.has(Role::Meta) { vec![self.config.listen.to_string()] } else { self.config.seeds.clone() }
    }

    /// Meta nodes to try, in order: the configured seeds, then the meta-role nodes of the
    /// current cluster map (so a node keeps finding the meta group after the seeds it was
    /// configured with are gone and spares took their place).
    pub fn meta_addrs(&self) -> Vec<String> {
        let mut addrs = self.seeds();
        let map = self.map.borrow();
        let mut extra: Vec<(u64, &String)> = map.nodes.values().filter(|n| n.meta).map(|n| (n.id.0, &n.addr)).collect();
        extra.sort_unstable();
        for (_, addr) in extra {
            if !addrs.contains(addr) {
                addrs.push(addr.clone());
            }
        }
        addrs
    }

    /// Where to forward an admin request: the meta node the last map poll succeeded on, else the
    /// first of [`NodeCtx::meta_addrs`]; never this node itself.
    pub fn meta_target(&self) -> Option<String> {
        let me = self.config.listen.to_string();
        let contact = self.meta_contact.lock().unwrap_or_else(|p| p.into_inner()).clone();
        contact.into_iter().chain(self.meta_addrs()).find(|a| *a != me)
    }

    /// This node as the registry records it.
    pub fn self_record(&self) -> NodeRecord {
        NodeRecord {
            id: self.config.id,
            addr: self.config.listen.to_string(),
            labels: self.config.labels.clone(),
            roles: self.config.roles.clone(),
            capacity_bytes: if self.config.has(Role::Storage) { self.store.stats().slots_total * self.store.stats().slot_size } else { 0 },
            metrics_addr: self.config.metrics_listen.map(|a| a.to_string()).unwrap_or_default(),
        }
    }

    /// This node as heartbeats describe it.
    pub fn self_node(&self) -> admin::Node {
        let stats = self.store.stats();
        let l = &self.config.labels;
        admin::Node {
            id: self.config.id.0,
            addr: self.config.listen.to_string(),
            labels: Some(admin::Labels { region: l.region.clone(), zone: l.zone.clone(), rack: l.rack.clone(), host: l.host.clone() }),
            roles: self.config.roles.iter().map(|r| r.as_str().to_string()).collect(),
            capacity_bytes: self.self_record().capacity_bytes,
            used_bytes: stats.slots_mapped * stats.slot_size,
            state: "up".into(),
            last_seen_ms_ago: 0,
            metrics_addr: self.config.metrics_listen.map(|a| a.to_string()).unwrap_or_default(),
            scrub_pending_bytes: stats.slots_pending_scrub * stats.slot_size,
            cert_not_after: self.access.tls().and_then(|t| t.own_certificate()).map(|c| c.not_after).unwrap_or(0),
            version_min: self.config.versions.min,
            version_max: self.config.versions.max,
            ..Default::default()
        }
    }

    /// What this node knows of its placement groups.
    pub fn pg_reports(&self) -> Vec<admin::PlacementGroup> {
        self.pgs
            .statuses()
            .into_iter()
            .map(|s| admin::PlacementGroup {
                id: s.group,
                replicas: s.voters.clone(),
                leader: s.leader.unwrap_or(0),
                term: s.term,
                applied_index: s.applied_index,
                ..Default::default()
            })
            .collect()
    }
}

/// The longest a stopping node spends handing its leaderships over.
pub const HANDOVER_WAIT: Duration = Duration::from_secs(5);

/// A running node.
pub struct Node {
    ctx: Arc<NodeCtx>,
    shutdown: watch::Sender<bool>,
    refused: watch::Receiver<Option<String>>,
    tasks: Vec<JoinHandle<()>>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    _lock: File,
}

fn lock_dir(dir: &std::path::Path) -> Result<File, NodeError> {
    let path = dir.join("LOCK");
    let file = File::create(&path).map_err(|source| NodeError::Io { path: path.clone(), source })?;
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(NodeError::Locked(dir.to_path_buf()));
    }
    Ok(file)
}

impl Node {
    /// Starts a node from its configuration.
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| NodeError::Io { path: config.data_dir.clone(), source })?;
        let lock = lock_dir(&config.data_dir)?;
        let listener = tokio::net::TcpListener::bind(config.listen).await.map_err(|source| NodeError::Bind { addr: config.listen, source })?;

        let store_cfg = ChunkStoreConfig {
            data_path: config.data_device.clone(),
            index_dir: config.data_dir.join("chunk-index"),
            capacity: config.capacity,
            direct_io: config.direct_io,
            queue_depth: 128,
            index_memory: IndexMemory { cache_bytes: config.memory.index_cache, write_buffer_bytes: config.memory.write_buffer },
        };
        let store = tokio::task::spawn_blocking(move || ChunkStore::open(&store_cfg))
            .await
            .map_err(|e| NodeError::Io { path: config.data_dir.clone(), source: std::io::Error::other(e.to_string()) })??;
        let log_cfg = LogEngineConfig {
            dir: config.data_dir.join("raft-log"),
            segment_bytes: basalt_raft::log_store::DEFAULT_SEGMENT_BYTES,
            tail_bytes_per_group: config.memory.raft_tail_per_group,
            max_batch_bytes: 16 << 20,
            size_target: config.log_size_target,
        };
        let tls = match config.security.tls.clone() {
            Some(files) => {
                let tls = tokio::task::spawn_blocking(move || basalt_security::TlsContext::load(files))
                    .await
                    .map_err(|e| NodeError::Io { path: config.data_dir.clone(), source: std::io::Error::other(e.to_string()) })??;
                let own = tls.own_certificate();
                if own.as_ref().and_then(|c| c.identity.clone()) != Some(basalt_security::Identity::Node(config.id.0)) {
                    return Err(NodeError::Security(basalt_security::SecurityError::Certificate {
                        what: config.security.tls.as_ref().and_then(|t| t.cert.clone()).map(|p| p.display().to_string()).unwrap_or_default(),
                        message: format!(
                            "names {} but this is node-{}",
                            own.and_then(|c| c.identity).map(|i| i.to_string()).unwrap_or_else(|| "no Basalt identity".into()),
                            config.id.0
                        ),
                    }));
                }
                Some(Arc::new(tls))
            }
            None => {
                tracing::warn!(
                    "security is OFF (security.off): plaintext, no authentication; anyone who reaches this node's ports may read and write every volume"
                );
                None
            }
        };
        let (access, audit_rx) = Access::new(tls, config.security.allow.clone());
        let access = Arc::new(access);
        let host = RaftHost::open(config.id.0, &log_cfg, &config.raft, access.dialer())?;

        let meta = if config.has(Role::Meta) {
            let shared = MetaShared::default();
            let audit_dir = config.data_dir.join("audit");
            let audit = Arc::new(AuditLog::open(&audit_dir, &config.audit.export_dir).map_err(|source| NodeError::Io { path: audit_dir, source })?);
            let keys_dir = config.data_dir.join("keys");
            let keys = Arc::new(KeyStore::open(&keys_dir)?);
            let sm = MetaStateMachine::new(shared.clone(), host.log_engine().sm_store(META_GROUP), audit.clone(), keys.clone());
            let group = host.start_group(META_GROUP, sm).await?;
            // The meta state this node kept says which version the cluster runs at: a build
            // that does not speak it stops before reading more of the log.
            let cluster_version = shared.with(|s| s.cluster_version);
            if cluster_version > 0
                && let Err(e) = config.versions.check(&config.id.to_string(), cluster_version)
            {
                group.shutdown().await;
                return Err(e.into());
            }
            Some(MetaHandle { group, shared, audit, keys })
        } else {
            None
        };
        let integrity = Arc::new(basalt_scrubber::IntegrityStats::default());
        let pgs = Arc::new(PgManager::new(config.id, host.clone(), store.clone(), integrity.clone(), config.heal.rebuild_rate));
        if config.has(Role::Storage) {
            pgs.start_from_disk().await?;
        }

        let (map_tx, map_rx) = watch::channel(Arc::new(ClusterView::default()));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let ctx = Arc::new(NodeCtx {
            config: config.clone(),
            host: host.clone(),
            store: store.clone(),
            meta,
            pgs: pgs.clone(),
            map: map_rx,
            clients: Clients::new(access.dialer()),
            access: access.clone(),
            liveness: Liveness::default(),
            metrics: Metrics::default(),
            scrub: Arc::new(basalt_scrubber::ScrubStats::default()),
            integrity,
            integrity_control: std::sync::OnceLock::new(),
            repair_lock: tokio::sync::Mutex::new(()),
            heal: Default::default(),
            meta_contact: Default::default(),
        });

        let admin = AdminServer::new(AdminService::new(ctx.clone()))
            .max_decoding_message_size(basalt_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(basalt_proto::MAX_MESSAGE_BYTES);
        let data_service = Arc::new(DataService::new(ctx.clone(), access.clone()));
        let data = DataServer::from_arc(data_service.clone())
            .max_decoding_message_size(basalt_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(basalt_proto::MAX_MESSAGE_BYTES);
        let backup_node = if config.has(Role::Backup) {
            let dir = config.data_dir.join("backups");
            let service =
                crate::backup_node::BackupNodeService::open(config.id, dir.clone(), ctx.meta_addrs(), access.clone(), ctx.metrics.backup.clone())
                    .map_err(|e| NodeError::Backup(e.to_string()))?;
            Some(service)
        } else {
            None
        };
        let backup_server = backup_node.clone().map(|s| {
            basalt_proto::admin::backup_node_server::BackupNodeServer::new(crate::backup_node::BackupNodeApi(s))
                .max_decoding_message_size(basalt_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(basalt_proto::MAX_MESSAGE_BYTES)
        });
        let mut srv_shutdown = shutdown_rx.clone();
        // Our own accept loop (the listener was bound early to fail fast) splits the port
        // between the framed data protocol, the Raft transport and gRPC; it sets TCP_NODELAY on every connection.
        let (grpc_tx, grpc_rx) = tokio::sync::mpsc::channel(64);
        let accept = tokio::spawn(crate::listener::run(listener, access.clone(), data_service, host.transport(), grpc_tx, shutdown_rx.clone()));
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .initial_stream_window_size(Some(8 << 20))
                .initial_connection_window_size(Some(32 << 20))
                .concurrency_limit_per_connection(256)
                .add_service(admin)
                .add_service(data)
                .add_service(host.transport_service())
                .add_optional_service(backup_server)
                .serve_with_incoming_shutdown(tokio_stream::wrappers::ReceiverStream::new(grpc_rx), async move {
                    let _ = srv_shutdown.changed().await;
                }),
        );

        let mut tasks = vec![accept];
        tasks.push(tokio::spawn(crate::access::run_cert_reloader(access.clone(), config.security.reload, shutdown_rx.clone())));
        tasks.push(tokio::spawn(crate::meta::service::run_audit_shipper(ctx.clone(), audit_rx, shutdown_rx.clone())));
        tasks.push(tokio::spawn(crate::cluster_map::run_watcher(ctx.clone(), map_tx, shutdown_rx.clone())));
        let (refused_tx, refused) = watch::channel(None);
        tasks.push(tokio::spawn(crate::agent::run(ctx.clone(), refused_tx, shutdown_rx.clone())));
        if config.has(Role::Meta) {
            tasks.push(tokio::spawn(crate::meta::backup_admin::run_scheduler(AdminService::new(ctx.clone()), shutdown_rx.clone())));
        }
        if let Some(b) = backup_node {
            tasks.push(tokio::spawn(b.run_sweeper(shutdown_rx.clone())));
        }
        if config.has(Role::Storage) {
            tasks.push(tokio::spawn(crate::pg::manager::run_reconciler(ctx.clone(), shutdown_rx.clone())));
            tasks.push(tokio::spawn(crate::pg::manager::run_checkpointer(ctx.clone(), shutdown_rx.clone())));
            tasks.push(tokio::spawn(crate::pg::space::run_publisher(ctx.clone(), shutdown_rx.clone())));
            let scrubber = basalt_scrubber::Scrubber::new(store.clone(), config.overwrite_rate, ctx.scrub.clone())
                .with_pattern(config.overwrite_pattern, config.overwrite_passes);
            tasks.push(tokio::spawn(scrubber.run(shutdown_rx.clone())));
            let (integrity, control) = basalt_scrubber::IntegrityScrubber::new(
                Arc::new(crate::pg::verifier::NodeVerifier::new(ctx.clone())),
                basalt_scrubber::IntegrityConfig {
                    rate: config.integrity_rate,
                    interval: config.integrity_interval,
                    deep_interval: config.deep_interval,
                    state_file: Some(config.data_dir.join("integrity-schedule")),
                },
                ctx.integrity.clone(),
            );
            let _ = ctx.integrity_control.set(control);
            tasks.push(tokio::spawn(integrity.run(shutdown_rx.clone())));
        }
        if ctx.meta.is_some() {
            tasks.push(tokio::spawn(crate::meta::service::run_token_feeder(ctx.clone(), shutdown_rx.clone())));
            tasks.push(tokio::spawn(crate::meta::service::run_audit_pruner(ctx.clone(), shutdown_rx.clone())));
            tasks.push(tokio::spawn(crate::meta::keys::run_key_keeper(ctx.clone(), shutdown_rx.clone())));
            tasks.push(tokio::spawn(crate::meta::service::run_volume_reaper(ctx.clone(), shutdown_rx.clone())));
            tasks.push(tokio::spawn(crate::meta::healer::run(ctx.clone(), shutdown_rx.clone())));
        }
        if let Some(addr) = config.metrics_listen {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => tasks.push(tokio::spawn(crate::metrics::serve(ctx.clone(), l, shutdown_rx.clone()))),
                Err(source) => return Err(NodeError::Bind { addr, source }),
            }
        }
        tracing::info!(
            node = %config.id,
            listen = %config.listen,
            roles = ?config.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
            labels = %config.labels,
            "basalt-node started"
        );
        Ok(Node { ctx, shutdown, refused, tasks, server, _lock: lock })
    }

    /// Before stopping: hands every group this node leads to another replica and waits (a
    /// few seconds at most) until it leads none, so a restart costs clients a leader change
    /// rather than an election timeout. Leaderships the balancer hands back meanwhile are
    /// handed on again.
    async fn hand_over_leadership(&self) {
        let started = tokio::time::Instant::now();
        let deadline = started + HANDOVER_WAIT;
        let mut tries = 0;
        loop {
            let (mut led, mut handed) = self.ctx.pgs.hand_over_leadership().await;
            if let Some(meta) = &self.ctx.meta
                && meta.group.status().is_leader
            {
                led += 1;
                match meta.group.hand_over_leadership(crate::pg::membership::HEIR_HEARD_WITHIN).await {
                    Ok(Some(_)) => handed += 1,
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "could not hand the meta leadership over"),
                }
            }
            if tries == 0 && led > 0 {
                tracing::info!(groups = led, heirs = handed, "handing leadership over before stopping");
            }
            tries += 1;
            if led == 0 || handed == 0 || tokio::time::Instant::now() >= deadline {
                if led > 0 {
                    tracing::warn!(groups = led, "stopping while still leading (no live heir, or the hand-over took too long)");
                } else if tries > 1 {
                    tracing::info!(took = ?started.elapsed(), "leaderships handed over");
                }
                return;
            }
            // An heir takes over after one election round among the up-to-date replicas.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Waits until the cluster refuses this node (it speaks no version the cluster runs at)
    /// and says why; the node should then stop.
    pub async fn refused(&self) -> String {
        let mut rx = self.refused.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            // The agent is gone (shutting down): never refused.
            Err(_) => std::future::pending().await,
        }
    }

    /// Shared state (for tests and embedding).
    pub fn ctx(&self) -> &Arc<NodeCtx> {
        &self.ctx
    }

    /// Stops serving, checkpoints and stops every group, and closes the stores.
    pub async fn shutdown(self) {
        tracing::info!(node = %self.ctx.config.id, "shutting down");
        self.hand_over_leadership().await;
        let _ = self.shutdown.send(true);
        for mut t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(5), &mut t).await.is_err() {
                t.abort();
            }
        }
        self.ctx.pgs.shutdown().await;
        if let Some(meta) = &self.ctx.meta {
            meta.group.shutdown().await;
        }
        if let Err(e) = self.ctx.store.checkpoint().await {
            tracing::warn!(error = %e, "final chunk store sync failed");
        }
        self.ctx.host.log_engine().close();
        // Graceful gRPC shutdown waits for open streams, and peers' Raft pipes never end on
        // their own: give in-flight requests a moment, then close.
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(2), &mut server).await.is_err() {
            server.abort();
        }
        tracing::info!(node = %self.ctx.config.id, "stopped");
    }
}
