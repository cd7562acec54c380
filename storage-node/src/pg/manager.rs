//! Hosts the placement groups the cluster map assigns to this node.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use basalt_chunk_store::ChunkStore;
use basalt_common::{NodeId, PgId};
use basalt_proto::view::ClusterView;
use basalt_raft::{GroupStatus, META_GROUP, NodeInfo, RaftError, RaftGroup, RaftHost};
use tokio::sync::watch;

use super::state_machine::{ApplyStats, PgShared, PgStateMachine};
use crate::node::NodeCtx;

/// One hosted PG.
#[derive(Clone)]
pub struct PgHandle {
    /// Read path and shared state.
    pub shared: PgShared,
    /// The Raft group.
    pub group: RaftGroup<PgStateMachine>,
    /// The replica move for which this node, as leader and leaving replica, began handing
    /// leadership over, and when (`pg::membership`).
    pub handover: Arc<std::sync::Mutex<Option<super::membership::Handover>>>,
}

/// Why a replica could not be retired.
#[derive(Debug, thiserror::Error)]
pub enum RetireError {
    /// Deleting its Raft state failed.
    #[error("{pg}: deleting its raft log failed: {reason}")]
    Log {
        /// The PG.
        pg: PgId,
        /// Why.
        reason: String,
    },
    /// Releasing its chunks failed.
    #[error("{pg}: releasing its chunks failed: {reason}")]
    Store {
        /// The PG.
        pg: PgId,
        /// Why.
        reason: String,
    },
}

/// The PGs on this node.
pub struct PgManager {
    node: NodeId,
    host: RaftHost,
    store: ChunkStore,
    groups: RwLock<HashMap<PgId, PgHandle>>,
    starting: tokio::sync::Mutex<()>,
    /// Apply timing across the node's PGs.
    pub apply_stats: Arc<ApplyStats>,
    /// Integrity counters (repairs applied here).
    pub integrity: Arc<basalt_scrubber::IntegrityStats>,
    /// Byte budget of outgoing snapshot streams (filling new replicas elsewhere).
    pub pacer: Arc<super::pacer::Pacer>,
    /// Replicas retired from this node since it started (moved elsewhere).
    pub retired: std::sync::atomic::AtomicU64,
    /// A retired replica's Raft log entries (which carry its data) still sit in the log
    /// database's files until the next log scrub rewrites them.
    pub log_scrub_wanted: std::sync::atomic::AtomicBool,
}

impl PgManager {
    /// An empty manager.
    pub fn new(node: NodeId, host: RaftHost, store: ChunkStore, integrity: Arc<basalt_scrubber::IntegrityStats>, rebuild_rate: u64) -> Self {
        Self {
            node,
            host,
            store,
            groups: RwLock::new(HashMap::new()),
            starting: tokio::sync::Mutex::new(()),
            apply_stats: Arc::new(ApplyStats::default()),
            integrity,
            pacer: Arc::new(super::pacer::Pacer::new(rebuild_rate)),
            retired: std::sync::atomic::AtomicU64::new(0),
            log_scrub_wanted: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The PG, if hosted here.
    pub fn get(&self, pg: PgId) -> Option<PgHandle> {
        self.groups.read().unwrap_or_else(|p| p.into_inner()).get(&pg).cloned()
    }

    /// Status of every hosted PG.
    pub fn statuses(&self) -> Vec<GroupStatus> {
        let groups = self.groups.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<GroupStatus> = groups.values().map(|h| h.group.status()).collect();
        out.sort_by_key(|s| s.group);
        out
    }

    /// Starts `pg` if it is not running yet.
    pub async fn ensure(&self, pg: PgId) -> Result<PgHandle, RaftError> {
        if let Some(h) = self.get(pg) {
            return Ok(h);
        }
        let _guard = self.starting.lock().await;
        if let Some(h) = self.get(pg) {
            return Ok(h);
        }
        let mut shared = PgShared::new(pg, self.node, self.store.clone(), self.apply_stats.clone(), self.integrity.clone());
        shared.pacer = self.pacer.clone();
        let group = self.host.start_group(pg.0, PgStateMachine::new(shared.clone())).await?;
        let handle = PgHandle { shared, group, handover: Arc::default() };
        self.groups.write().unwrap_or_else(|p| p.into_inner()).insert(pg, handle.clone());
        Ok(handle)
    }

    /// Restarts every PG this node has Raft state for, before the cluster map is known, so
    /// its replicas serve again right after a restart.
    pub async fn start_from_disk(&self) -> Result<(), RaftError> {
        for g in self.host.log_engine().groups_on_disk()? {
            if g != META_GROUP {
                self.ensure(PgId(g)).await?;
            }
        }
        Ok(())
    }

    /// Starts the PGs `view` places here (including replicas moving here); the first replica
    /// of a new PG forms its group. Retires the replicas `view` no longer places here.
    pub async fn reconcile(&self, view: &ClusterView) {
        let hosted: Vec<(PgId, bool)> = self
            .groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(pg, h)| (*pg, h.shared.retired.load(std::sync::atomic::Ordering::Acquire)))
            .collect();
        for (pg, retiring) in hosted {
            // Only a map that knows the PG speaks for it; the map changes a replica set only
            // after the PG's own Raft group committed the change, so a replica absent from it
            // was replaced and its group goes on without it. A retirement that failed half-way
            // is finished first even if the PG came back here: it restarts empty below.
            if (retiring || ((pg.0 as usize) < view.pgs.len() && !view.hosts(pg, self.node)))
                && let Err(e) = self.retire(pg).await
            {
                tracing::error!(%pg, error = %e, "cannot retire a replica moved off this node; will retry");
            }
        }
        for (i, replicas) in view.pgs.iter().enumerate() {
            let pg = PgId(i as u32);
            if !view.hosts(pg, self.node) {
                continue;
            }
            let handle = match self.ensure(pg).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::error!(%pg, error = %e, "cannot start placement group");
                    continue;
                }
            };
            if replicas.first() != Some(&self.node) {
                continue;
            }
            match handle.group.is_initialized().await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(%pg, error = %e, "cannot query placement group");
                    continue;
                }
            }
            let members: Option<BTreeMap<u64, NodeInfo>> =
                replicas.iter().map(|n| view.addr(*n).map(|a| (n.0, NodeInfo { addr: a.to_string() }))).collect();
            let Some(members) = members else {
                tracing::warn!(%pg, "a replica's address is unknown; forming the group later");
                continue;
            };
            if let Err(e) = handle.group.initialize(members).await {
                tracing::warn!(%pg, error = %e, "cannot form placement group");
            } else {
                tracing::info!(%pg, replicas = ?replicas, "formed placement group");
            }
        }
    }

    /// Removes this node's replica of `pg`: stops its group, deletes its Raft state, and
    /// releases its chunks to the secure-deletion queue (the scrubber overwrites them before
    /// their space is reused).
    pub async fn retire(&self, pg: PgId) -> Result<(), RetireError> {
        let Some(handle) = self.get(pg) else { return Ok(()) };
        handle.shared.retired.store(true, std::sync::atomic::Ordering::Release);
        self.host.stop_group(&handle.group).await;
        // Chunks and state first, the log last: a replica with a log but no state is restarted
        // empty and retired again, one with state but no log would claim entries it lacks.
        // The handle stays listed until everything is gone, so a failed step is retried.
        let _apply = handle.shared.lock.write().await;
        let shard = handle.shared.shard();
        let store_err = |e: basalt_chunk_store::ChunkStoreError| RetireError::Store { pg, reason: e.to_string() };
        let mut batch = basalt_chunk_store::Batch::new();
        batch.drop_shard(shard);
        batch.drop_shard(handle.shared.staging_shard());
        for (name, _) in self.store.scan_state(shard, b"").await.map_err(store_err)? {
            batch.delete_state(shard, &name);
        }
        let chunks = self.store.list_chunks(shard).len();
        self.store.commit(batch).await.map_err(store_err)?;
        self.store.checkpoint().await.map_err(store_err)?;
        self.host.log_engine().remove_group(pg.0).await.map_err(|e| RetireError::Log { pg, reason: e.to_string() })?;
        self.groups.write().unwrap_or_else(|p| p.into_inner()).remove(&pg);
        self.retired.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.log_scrub_wanted.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(%pg, chunks, "retired this node's replica (moved elsewhere); its chunks are queued for overwrite");
        Ok(())
    }

    /// Checkpoints and stops every PG.
    /// Hands the leadership of every PG this node leads to another live replica (a node
    /// stopping on purpose); returns how many it led and how many it handed over.
    pub async fn hand_over_leadership(&self) -> (usize, usize) {
        let handles: Vec<PgHandle> = self.groups.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let (mut led, mut handed) = (0, 0);
        for h in handles.iter().filter(|h| h.group.status().is_leader) {
            led += 1;
            match h.group.hand_over_leadership(super::membership::HEIR_HEARD_WITHIN).await {
                Ok(Some(_)) => handed += 1,
                Ok(None) => {}
                Err(e) => tracing::warn!(pg = h.group.id(), error = %e, "could not hand leadership over"),
            }
        }
        (led, handed)
    }

    pub async fn shutdown(&self) {
        let handles: Vec<PgHandle> = self.groups.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for h in &handles {
            let st = h.group.progress();
            if st.applied_index > st.checkpoint_index {
                let _ = h.group.checkpoint_now().await;
            }
        }
        // Give the checkpoints a moment to land (they run on the groups' own tasks).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline
            && handles.iter().any(|h| {
                let st = h.group.progress();
                st.applied_index > st.checkpoint_index
            })
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for h in handles {
            self.host.stop_group(&h.group).await;
        }
    }
}

/// Starts PGs as the cluster map assigns them.
pub async fn run_reconciler(ctx: Arc<NodeCtx>, mut shutdown: watch::Receiver<bool>) {
    let mut map = ctx.map.clone();
    loop {
        let view = map.borrow_and_update().clone();
        if view.layout.is_some() {
            ctx.pgs.reconcile(&view).await;
        }
        // Re-check periodically too: forming a group can fail while peers start.
        tokio::select! {
            _ = map.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Bytes applied to a PG after which it checkpoints regardless of the entry count, so large
/// writes do not pile up in the Raft log (and in RocksDB's memtables).
pub const CHECKPOINT_BYTES: u64 = 32 << 20;

/// Share of the Raft log's memtable budget (`memory.log_write_buffer`) that the PGs of a node
/// may fill with un-checkpointed entries together before they are all checkpointed. An entry
/// purged while its memtable is still in memory is dropped at flush; one that outlives it is
/// copied into a blob file first (a second write of every payload, ~6% of a node's CPU under
/// 4 KiB writes spread over 32 PGs). Checkpointing every PG at once costs about one sync: they
/// share the data file and the index.
pub const LIVE_LOG_SHARE_OF_MEMTABLES: u64 = 4;

/// How often the checkpointer looks at the PGs. Short enough that a node writing its log at
/// disk speed does not overshoot [`LIVE_LOG_SHARE_OF_MEMTABLES`] by much between looks.
const CHECKPOINTER_TICK: Duration = Duration::from_millis(100);

/// Least time between two scrubs of the Raft log's files (a flush and a full compaction of
/// the log database: too heavy to run for every TRIM).
pub const LOG_SCRUB_INTERVAL: Duration = Duration::from_secs(5);

/// Checkpoints PGs that applied many bytes, every PG with un-checkpointed entries when together
/// they hold more than their share of the log's memtables, and PGs that went idle with
/// un-checkpointed entries (so their logs get purged and a restart replays little). PGs whose
/// entries keep the log's files above `raft.log_size_target` are checkpointed and purged
/// through the checkpoint.
///
/// It also keeps freed data from lingering in the Raft log: when a PG applied a volume delete,
/// TRIM or write-zeroes, it checkpoints that PG and purges its log through that entry; once the
/// purge has happened, the log engine rewrites its files without the purged entries (at most
/// every [`LOG_SCRUB_INTERVAL`], covering every PG whose purge completed by then — one PG that
/// cannot purge yet never holds back the others).
pub async fn run_checkpointer(ctx: Arc<NodeCtx>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(CHECKPOINTER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let live_log_budget = ctx.config.memory.log_write_buffer as u64 / LIVE_LOG_SHARE_OF_MEMTABLES;
    let mut last_applied: HashMap<u32, (u64, tokio::time::Instant)> = HashMap::new();
    // Per PG: the purge index whose bytes the last log scrub removed.
    let mut scrubbed: HashMap<u32, u64> = HashMap::new();
    let mut last_log_scrub: Option<tokio::time::Instant> = None;
    // PGs seen since start. A crash between a delete's checkpoint and its log scrub loses the
    // in-memory `purge_wanted` (entries up to a checkpoint are not re-applied on restart), so
    // the first pass over each PG treats its whole checkpointed prefix as freed data: one log
    // purge and scrub per node start, and no freed bytes outlive a crash in the log files.
    let mut seen: HashSet<u32> = HashSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let handles: Vec<PgHandle> = ctx.pgs.groups.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        // PGs purged through their wanted index whose files still need scrubbing.
        let mut owed: Vec<(u32, u64)> = Vec::new();
        let unsaved = |h: &PgHandle| h.shared.bytes_since_checkpoint.load(std::sync::atomic::Ordering::Relaxed);
        // PGs streaming a snapshot keep their log (below), so they do not count: they would keep
        // the sum over budget and every other PG checkpointing each tick for a whole rebuild.
        let streaming = |h: &PgHandle| h.shared.transfers.load(std::sync::atomic::Ordering::Acquire) > 0;
        let over_budget = handles.iter().filter(|h| !streaming(h)).map(unsaved).sum::<u64>() > live_log_budget;
        // Groups whose kept entries hold the log's files above their target: checkpointed and
        // purged through the checkpoint (the cushion kept for a briefly absent follower gives
        // way; such a follower gets a snapshot instead).
        let over_target: HashSet<u32> = ctx.host.log_engine().groups_over_target().into_iter().collect();
        for h in handles {
            let st = h.group.progress();
            if seen.insert(st.group) {
                h.shared.purge_wanted.fetch_max(st.checkpoint_index, std::sync::atomic::Ordering::Relaxed);
            }
            let now = tokio::time::Instant::now();
            let entry = last_applied.entry(st.group).or_insert((st.applied_index, now));
            if entry.0 != st.applied_index {
                *entry = (st.applied_index, now);
            }
            let idle = now.duration_since(entry.1) > Duration::from_secs(10);
            let unsaved = unsaved(&h);
            // The budget gives way to a snapshot being streamed (as the entry-count policy
            // does): the log after the snapshot's checkpoint must stay for the receiver.
            let holds_log = over_target.contains(&st.group) && !streaming(&h);
            let big = unsaved > CHECKPOINT_BYTES || (over_budget && unsaved > 0 && !streaming(&h)) || holds_log;
            let wanted = h.shared.purge_wanted.load(std::sync::atomic::Ordering::Relaxed);
            if st.applied_index > st.checkpoint_index && (idle || big || st.checkpoint_index < wanted) {
                let _ = h.group.checkpoint_now().await;
            }
            // A checkpoint asked for above lands later: a later tick purges through it.
            if holds_log
                && st.checkpoint_index > st.purged_index
                && let Err(e) = h.group.purge_through(st.checkpoint_index).await
            {
                tracing::debug!(pg = st.group, error = %e, "purging the log to keep it under its size target failed");
            }
            if wanted > st.purged_index
                && st.checkpoint_index >= wanted
                && let Err(e) = h.group.purge_through(wanted).await
            {
                tracing::debug!(pg = st.group, error = %e, "purging the log after a delete failed");
            }
            if wanted > 0 && st.purged_index >= wanted && scrubbed.get(&st.group).copied().unwrap_or(0) < wanted {
                owed.push((st.group, wanted));
            }
        }
        let due = last_log_scrub.is_none_or(|t| t.elapsed() >= LOG_SCRUB_INTERVAL);
        let retired = ctx.pgs.log_scrub_wanted.load(std::sync::atomic::Ordering::Relaxed);
        if (!owed.is_empty() || retired) && due {
            ctx.pgs.log_scrub_wanted.store(false, std::sync::atomic::Ordering::Relaxed);
            let engine = ctx.host.log_engine().clone();
            let started = std::time::Instant::now();
            match tokio::task::spawn_blocking(move || engine.scrub_purged()).await {
                Ok(Ok(())) => {
                    tracing::info!(
                        pgs = owed.len(),
                        took_ms = started.elapsed().as_millis() as u64,
                        "raft log files rewritten without purged entries"
                    );
                    ctx.scrub.log_scrubs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
                    ctx.scrub.last_log_scrub_unix_ms.store(now_ms, std::sync::atomic::Ordering::Relaxed);
                    scrubbed.extend(owed);
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "scrubbing purged entries from the raft log failed; will retry");
                    ctx.pgs.log_scrub_wanted.fetch_or(retired, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!(error = %e, "raft log scrub task failed; will retry");
                    ctx.pgs.log_scrub_wanted.fetch_or(retired, std::sync::atomic::Ordering::Relaxed);
                }
            }
            last_log_scrub = Some(tokio::time::Instant::now());
        }
    }
}
