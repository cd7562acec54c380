//! The Raft log store: one write-ahead log per node ([`crate::wal`]) holds every group's
//! entries, vote, commit index, purge point and state-machine records, and a dedicated writer
//! thread appends the records of all groups together, one write and one `fdatasync` per batch
//! (see [`writer`]).
//!
//! The index of what is on disk ([`writer::GroupDisk`]: where each live entry is, the latest
//! vote, commit index, purge point and state-machine records of each group) is in memory,
//! rebuilt at open by reading the log. Appended entries also stay in a per-group in-memory tail
//! until they are both durable and beyond the tail's byte budget, so replication reads recent
//! entries without touching the disk and entries are readable the moment `append` returns, as
//! openraft requires. Older entries are read back from their segment.
//!
//! Record payloads (format 1 of the log's records, inside the WAL's versioned batches):
//! entries are `index u64 LE | bincode(Entry)`; the vote, commit index and purge point are
//! bincode; see [`writer::Op`]. A log directory holding the RocksDB log of earlier versions is
//! refused by name.

pub mod memory;
pub(crate) mod writer;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{OptionalSend, RaftTypeConfig};
use tokio::sync::oneshot;

use crate::error::RaftError;
use crate::types::{Entry, GroupId, LogId, TypeConfig, Vote};
use crate::wal::{Wal, WalConfig, WalReader};
pub use writer::WriterStats;
use writer::{Done, Index, Msg, Op, Request, Writer};

/// Payload bytes one replication message carries at most (a single larger entry still goes).
const MAX_REPLICATION_BYTES: usize = 4 << 20;

/// Sizing of the log.
#[derive(Clone, Debug)]
pub struct LogEngineConfig {
    /// Directory of the segment files.
    pub dir: PathBuf,
    /// Bytes per segment file (preallocated).
    pub segment_bytes: u64,
    /// Per-group budget for recent entries kept in memory.
    pub tail_bytes_per_group: usize,
    /// Upper bound of one group-commit batch.
    pub max_batch_bytes: usize,
    /// Size of segment files the log keeps to: past it, the writer carries the few live entries
    /// of the oldest segment forward ([`writer`]) and [`LogEngine::groups_over_target`] names
    /// the groups whose entries must be purged.
    pub size_target: u64,
}

/// A node's Raft log engine as the groups it hosts see it: one openraft log store per group.
/// [`LogEngine`] (segment files on disk) and [`memory::MemLogEngine`] (the simulation's) are
/// the two implementations.
pub trait RaftLogEngine: Clone + Send + Sync + 'static {
    /// One group's log.
    type Group: RaftLogStorage<TypeConfig>;
    /// The log of `group` (created empty if new).
    fn group(&self, group: GroupId) -> Result<Self::Group, RaftError>;
}

impl RaftLogEngine for LogEngine {
    type Group = GroupLogStore;

    fn group(&self, group: GroupId) -> Result<GroupLogStore, RaftError> {
        LogEngine::group(self, group)
    }
}

/// Default segment size: large enough that rolling over (one extra checkpoint batch) is rare.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

fn decode<T: serde::de::DeserializeOwned>(what: &str, group: GroupId, bytes: &[u8]) -> io::Result<T> {
    bincode::deserialize(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("group {group}: corrupt {what}: {e}")))
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    bincode::serialize(value).expect("raft types serialise")
}

struct GroupState {
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
    last_log: Option<LogId>,
    /// Recent entries by index, contiguous, ending at `last_log`.
    tail: BTreeMap<u64, (Entry, usize)>,
    tail_bytes: usize,
}

struct GroupLog {
    group: GroupId,
    state: Mutex<GroupState>,
    /// Highest index known durable (entries at or below it may leave the tail).
    flushed: Arc<AtomicU64>,
}

impl GroupLog {
    fn state(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct EngineInner {
    index: Index,
    reader: WalReader,
    path: PathBuf,
    writer: Mutex<Writer>,
    tx: tokio::sync::mpsc::Sender<Msg>,
    stats: Arc<WriterStats>,
    groups: Mutex<HashMap<GroupId, Arc<GroupLog>>>,
    tail_budget: usize,
    segment_bytes: u64,
    size_target: u64,
}

impl EngineInner {
    fn index(&self) -> MutexGuard<'_, HashMap<GroupId, writer::GroupDisk>> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The node's Raft log. Cheap to clone.
#[derive(Clone)]
pub struct LogEngine {
    inner: Arc<EngineInner>,
}

impl LogEngine {
    /// Opens (creating if needed) the log, rebuilds its index and starts the group-commit writer.
    pub fn open(cfg: &LogEngineConfig) -> Result<Self, RaftError> {
        let storage = |reason: String| RaftError::Storage { path: cfg.dir.display().to_string(), reason };
        if cfg.dir.join("CURRENT").exists() {
            return Err(storage(
                "this directory holds a RocksDB Raft log written by a basalt-node before the write-ahead log (WAL format 1), which this binary \
                 does not read. Drain the node with the version that wrote it (`basalt node drain`), then start this version on an empty data directory"
                    .into(),
            ));
        }
        let (wal, records) = Wal::open(WalConfig { dir: cfg.dir.clone(), segment_bytes: cfg.segment_bytes }).map_err(|e| storage(e.to_string()))?;
        let index: Index = Arc::default();
        {
            let mut map = index.lock().unwrap_or_else(|p| p.into_inner());
            for r in &records {
                writer::apply(&mut map, r.group, r.kind, &r.payload, r.at).map_err(|e| storage(e.to_string()))?;
            }
        }
        let reader = wal.reader();
        let writer = Writer::start(wal, index.clone(), cfg.max_batch_bytes, cfg.size_target, 1024).map_err(|e| storage(e.to_string()))?;
        let tx = writer.tx.clone();
        let stats = writer.stats.clone();
        Ok(Self {
            inner: Arc::new(EngineInner {
                index,
                reader,
                path: cfg.dir.clone(),
                writer: Mutex::new(writer),
                tx,
                stats,
                groups: Mutex::new(HashMap::new()),
                tail_budget: cfg.tail_bytes_per_group,
                segment_bytes: cfg.segment_bytes,
                size_target: cfg.size_target,
            }),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Removes the bytes of purged entries from every file of the log, so data a client
    /// deleted does not outlive its log entries: the writer starts a fresh segment, writes the
    /// live entries of the older ones into it, and overwrites the older ones with zeros.
    /// Blocking: call it from a blocking thread, and rarely.
    pub fn scrub_purged(&self) -> Result<(), RaftError> {
        let (tx, rx) = oneshot::channel();
        self.inner.tx.blocking_send(Msg::Compact(tx)).map_err(|_| self.storage_err("raft log writer stopped"))?;
        rx.blocking_recv().map_err(|_| self.storage_err("raft log writer stopped"))?.map_err(|e| self.storage_err(e))
    }

    /// Group-commit counters.
    pub fn stats(&self) -> &WriterStats {
        &self.inner.stats
    }

    /// Bytes of segment files the log spans now (from its oldest segment to the active one).
    pub fn size_on_disk(&self) -> u64 {
        let (oldest, active) = (self.inner.stats.oldest_segment.load(Ordering::Relaxed), self.inner.stats.active_segment.load(Ordering::Relaxed));
        (active.saturating_sub(oldest) + 1) * self.inner.segment_bytes
    }

    /// Groups whose live entries hold the log above its size target: each has an entry in one of
    /// the oldest segments beyond the newest target's worth. A segment is released only once no
    /// group has a live entry in it, so one group's kept entries hold the log for all; purging
    /// these groups' logs (after a checkpoint) brings it back under the target.
    pub fn groups_over_target(&self) -> Vec<GroupId> {
        // Asked several times a second: under the target, leave the writer's index unlocked.
        if self.size_on_disk() <= self.inner.size_target {
            return Vec::new();
        }
        let keep = (self.inner.size_target / self.inner.segment_bytes).max(2);
        let Some(first_kept) = self.inner.stats.active_segment.load(Ordering::Relaxed).checked_sub(keep - 1) else {
            return Vec::new();
        };
        self.inner.index().iter().filter(|(_, g)| g.entries.values().next().is_some_and(|l| l.segment < first_kept)).map(|(id, _)| *id).collect()
    }

    /// Groups that have any Raft state on disk (to restart them after a node restart).
    pub fn groups_on_disk(&self) -> Result<Vec<GroupId>, RaftError> {
        Ok(self.inner.index().iter().filter(|(_, g)| g.vote.is_some()).map(|(id, _)| *id).collect())
    }

    fn storage_err(&self, e: impl std::fmt::Display) -> RaftError {
        RaftError::Storage { path: self.inner.path.display().to_string(), reason: e.to_string() }
    }

    /// The log store of one group (loaded from the index the first time).
    pub fn group(&self, group: GroupId) -> Result<GroupLogStore, RaftError> {
        let mut groups = self.inner.groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = groups.get(&group) {
            return Ok(GroupLogStore { engine: self.inner.clone(), log: g.clone() });
        }
        let (vote, committed, purged, last) = {
            let index = self.inner.index();
            match index.get(&group) {
                Some(g) => (g.vote.clone(), g.committed.clone(), g.purged.clone(), g.entries.last_key_value().map(|(_, l)| *l)),
                None => (None, None, None, None),
            }
        };
        let err = |e: io::Error| self.storage_err(e);
        let vote: Option<Vote> = vote.map(|v| decode("vote", group, &v)).transpose().map_err(err)?;
        // Both are stored as `Option<LogId>` (what openraft hands us).
        let committed: Option<LogId> = committed.map(|v| decode::<Option<LogId>>("committed", group, &v)).transpose().map_err(err)?.flatten();
        let last_purged: Option<LogId> = purged.map(|(_, v)| decode::<Option<LogId>>("purged", group, &v)).transpose().map_err(err)?.flatten();
        let last_entry: Option<LogId> = match last {
            Some(at) => {
                let bytes = self.inner.reader.read(at).map_err(|e| self.storage_err(e))?;
                let e: Entry = decode("entry", group, &bytes).map_err(err)?;
                Some(e.log_id)
            }
            None => None,
        };
        let last_log = last_entry.or(last_purged);
        let flushed = last_log.as_ref().map(|l| l.index).unwrap_or(0);
        let log = Arc::new(GroupLog {
            group,
            state: Mutex::new(GroupState { vote, committed, last_purged, last_log, tail: BTreeMap::new(), tail_bytes: 0 }),
            flushed: Arc::new(AtomicU64::new(flushed)),
        });
        groups.insert(group, log.clone());
        Ok(GroupLogStore { engine: self.inner.clone(), log })
    }

    /// Deletes everything a group has in the log (its replica left this node).
    pub async fn remove_group(&self, group: GroupId) -> Result<(), RaftError> {
        self.inner.groups.lock().unwrap_or_else(|p| p.into_inner()).remove(&group);
        submit_wait(&self.inner, group, vec![Op::remove()]).await.map_err(|e| self.storage_err(e))
    }

    /// Small durable records for state machines that keep their state in memory (the meta
    /// group keeps its snapshot here).
    pub fn sm_store(&self, group: GroupId) -> SmStore {
        SmStore { engine: self.inner.clone(), group }
    }

    /// Stops the writer after it has written everything queued.
    pub fn close(&self) {
        self.inner.writer.lock().unwrap_or_else(|p| p.into_inner()).stop();
    }
}

async fn submit_wait(engine: &EngineInner, group: GroupId, ops: Vec<Op>) -> io::Result<()> {
    let (tx, rx) = oneshot::channel();
    let bytes = ops.iter().map(|o| o.payload.len()).sum();
    engine
        .tx
        .send(Msg::Write(Request { group, ops, bytes, done: Done::Signal(tx), flushed: None }))
        .await
        .map_err(|_| io::Error::other("raft log writer stopped"))?;
    rx.await.map_err(|_| io::Error::other("raft log writer stopped"))?
}

/// Durable small records of one group's state machine.
#[derive(Clone)]
pub struct SmStore {
    engine: Arc<EngineInner>,
    group: GroupId,
}

impl SmStore {
    /// Reads a record (from memory: the log's index holds every state-machine record).
    pub fn get_blocking(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        Ok(self.engine.index().get(&self.group).and_then(|g| g.sm.get(name).cloned()))
    }

    /// Writes a record and waits until it is durable.
    pub async fn put(&self, name: &str, value: Vec<u8>) -> io::Result<()> {
        submit_wait(&self.engine, self.group, vec![Op::sm(name, &value)]).await
    }
}

/// One group's view of the log; implements openraft's log storage traits.
#[derive(Clone)]
pub struct GroupLogStore {
    engine: Arc<EngineInner>,
    log: Arc<GroupLog>,
}

impl GroupLogStore {
    fn bounds<RB: RangeBounds<u64>>(range: &RB) -> (u64, u64) {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => e.saturating_add(1),
            Bound::Excluded(e) => *e,
            Bound::Unbounded => u64::MAX,
        };
        (start, end)
    }

    /// Entries `[start, end)` from their segments (blocking reads), at most `limit`.
    fn read_disk(&self, start: u64, end: u64, limit: usize) -> io::Result<Vec<Entry>> {
        // A segment released between the lookup and the read (its entries were purged or moved
        // by a compaction meanwhile): look again.
        for _ in 0..3 {
            let locations: Vec<(u64, crate::wal::Location)> = self
                .engine
                .index()
                .get(&self.log.group)
                .map(|g| g.entries.range(start..end).take(limit).map(|(i, l)| (*i, *l)).collect())
                .unwrap_or_default();
            let mut out = Vec::with_capacity(locations.len());
            let mut expect = start;
            let mut released = false;
            for (index, at) in locations {
                if index != expect && !out.is_empty() {
                    return Err(io::Error::other(format!("group {}: hole in raft log at index {expect}", self.log.group)));
                }
                expect = index + 1;
                match self.engine.reader.read(at) {
                    Ok(bytes) => out.push(decode("entry", self.log.group, &bytes)?),
                    Err(crate::wal::WalError::Released(_)) => {
                        released = true;
                        break;
                    }
                    Err(e) => return Err(io::Error::other(e.to_string())),
                }
            }
            if !released {
                return Ok(out);
            }
        }
        Err(io::Error::other(format!("group {}: raft log segments kept being released under a read", self.log.group)))
    }

    /// Reads `[start, end)`, at most `limit` entries.
    async fn read_range(&mut self, start: u64, end: u64, limit: usize) -> io::Result<Vec<Entry>> {
        if start >= end {
            return Ok(Vec::new());
        }
        let (cached, tail_first) = {
            let st = self.log.state();
            let first = st.tail.keys().next().copied();
            match first {
                Some(first) if start >= first => {
                    let v: Vec<Entry> = st.tail.range(start..end).take(limit).map(|(_, (e, _))| e.clone()).collect();
                    return Ok(v);
                }
                Some(first) if first < end => (st.tail.range(first..end).map(|(_, (e, _))| e.clone()).collect::<Vec<_>>(), Some(first)),
                Some(first) => (Vec::new(), Some(first)),
                None => (Vec::new(), None),
            }
        };
        let disk_end = tail_first.map(|f| f.min(end)).unwrap_or(end);
        let this = self.clone();
        let mut out = tokio::task::spawn_blocking(move || this.read_disk(start, disk_end, limit))
            .await
            .map_err(|e| io::Error::other(format!("log read task failed: {e}")))??;
        // The tail continues the disk range only if the disk had every entry up to it; entries
        // missing at the start of the range were purged, which the caller tolerates.
        let reaches_tail = out.last().map(|e| e.log_id.index + 1 == disk_end).unwrap_or(true);
        if reaches_tail && out.len() < limit {
            let room = limit - out.len();
            out.extend(cached.into_iter().take(room));
        }
        Ok(out)
    }

    fn evict(&self, st: &mut GroupState) {
        let flushed = self.log.flushed.load(Ordering::Acquire);
        while st.tail_bytes > self.engine.tail_budget {
            let Some((&index, _)) = st.tail.iter().next() else { break };
            if index > flushed {
                break;
            }
            if let Some((_, size)) = st.tail.remove(&index) {
                st.tail_bytes -= size;
            }
        }
    }

    async fn submit(&self, ops: Vec<Op>, done: Done, flushed: Option<u64>) -> io::Result<()> {
        let bytes = ops.iter().map(|o| o.payload.len()).sum();
        let flushed = flushed.map(|i| (self.log.flushed.clone(), i));
        let req = Request { group: self.log.group, ops, bytes, done, flushed };
        self.engine.tx.send(Msg::Write(req)).await.map_err(|_| io::Error::other("raft log writer stopped"))
    }
}

impl RaftLogReader<TypeConfig> for GroupLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(&mut self, range: RB) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = Self::bounds(&range);
        self.read_range(start, end, usize::MAX).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.log.state().vote)
    }

    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, io::Error> {
        // Bound a replication message by count and bytes: enough to amortise, small enough not
        // to stall other groups or hold much memory.
        let mut entries = self.read_range(start, end, 256).await?;
        let mut bytes = 0usize;
        let keep = entries
            .iter()
            .position(|e| {
                bytes += match &e.payload {
                    openraft::EntryPayload::Normal(c) => c.0.len(),
                    _ => 64,
                };
                bytes > MAX_REPLICATION_BYTES
            })
            .map(|i| i.max(1))
            .unwrap_or(entries.len());
        entries.truncate(keep);
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for GroupLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let st = self.log.state();
        Ok(LogState { last_purged_log_id: st.last_purged, last_log_id: st.last_log })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.log.state().vote = Some(*vote);
        let (tx, rx) = oneshot::channel();
        self.submit(vec![Op::vote(encode(vote))], Done::Signal(tx), None).await?;
        rx.await.map_err(|_| io::Error::other("raft log writer stopped"))?
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.log.state().committed = committed;
        // Not awaited: it rides with the next synced batch, which follows within one append.
        self.submit(vec![Op::committed(encode(&committed))], Done::Nothing, None).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.log.state().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut ops = Vec::new();
        let mut last_index = None;
        {
            let mut st = self.log.state();
            for entry in entries {
                let index = entry.log_id.index;
                let op = Op::entry_of(index, &entry);
                let size = op.payload.len() - 8;
                ops.push(op);
                st.last_log = Some(entry.log_id);
                if let Some((_, old)) = st.tail.insert(index, (entry, size)) {
                    st.tail_bytes -= old;
                }
                st.tail_bytes += size;
                last_index = Some(index);
            }
            self.evict(&mut st);
        }
        if ops.is_empty() {
            callback.io_completed(Ok(()));
            return Ok(());
        }
        self.submit(ops, Done::Flushed(callback), last_index).await
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.as_ref().map(|l| l.index + 1).unwrap_or(0);
        {
            let mut st = self.log.state();
            let removed: Vec<u64> = st.tail.range(from..).map(|(i, _)| *i).collect();
            for i in removed {
                if let Some((_, size)) = st.tail.remove(&i) {
                    st.tail_bytes -= size;
                }
            }
            // Truncating past the end changes nothing; otherwise the log now ends at the given id
            // (or at the purge point when everything goes).
            let current_end = st.last_log.as_ref().map(|l| l.index + 1).unwrap_or(0);
            if from < current_end {
                st.last_log = match last_log_id {
                    Some(l) => Some(l),
                    None => st.last_purged,
                };
            }
        }
        let (tx, rx) = oneshot::channel();
        let ops = vec![Op::truncate(from)];
        self.submit(ops, Done::Signal(tx), None).await?;
        rx.await.map_err(|_| io::Error::other("raft log writer stopped"))??;
        // Every earlier append has completed (the writer is FIFO): lower the durable mark so
        // re-appended entries stay in the tail until they are flushed again.
        self.log.flushed.fetch_min(from.saturating_sub(1), Ordering::AcqRel);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let upto = log_id.index;
        {
            let mut st = self.log.state();
            let removed: Vec<u64> = st.tail.range(..=upto).map(|(i, _)| *i).collect();
            for i in removed {
                if let Some((_, size)) = st.tail.remove(&i) {
                    st.tail_bytes -= size;
                }
            }
            if st.last_log.as_ref().map(|l| l.index).unwrap_or(0) < upto || st.last_log.is_none() {
                st.last_log = Some(log_id);
            }
            st.last_purged = Some(log_id);
        }
        let (tx, rx) = oneshot::channel();
        let ops = vec![Op::purge(upto, &encode(&Some(log_id)))];
        self.submit(ops, Done::Signal(tx), None).await?;
        rx.await.map_err(|_| io::Error::other("raft log writer stopped"))?
    }
}

// Keep the openraft trait bound visible for readers: the store serves exactly this config.
const _: fn() = || {
    fn assert_storage<S: RaftLogStorage<C>, C: RaftTypeConfig>() {}
    assert_storage::<GroupLogStore, TypeConfig>();
};

#[cfg(test)]
mod tests {
    use openraft::StorageError;
    use openraft::testing::log::{StoreBuilder, Suite};

    use super::*;
    use crate::state_machine::SmAdapter;
    use crate::state_machine::test_sm::Counter;
    use crate::types::Command;

    struct Builder;

    async fn append_synced(store: &mut GroupLogStore, entry: Entry) {
        use openraft::type_config::TypeConfigExt;
        let (tx, rx) = TypeConfig::oneshot();
        store.append([entry], IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
    }

    impl StoreBuilder<TypeConfig, GroupLogStore, SmAdapter<Counter>, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, GroupLogStore, SmAdapter<Counter>), StorageError<TypeConfig>> {
            let dir = tempfile::tempdir().expect("temp dir");
            let engine = LogEngine::open(&LogEngineConfig {
                dir: dir.path().join("log"),
                segment_bytes: 8 << 20,
                tail_bytes_per_group: 1 << 20,
                max_batch_bytes: 4 << 20,
                size_target: u64::MAX,
            })
            .expect("open log engine");
            let store = engine.group(7).expect("group store");
            let sm = SmAdapter::new(Counter::default()).await.expect("state machine");
            Ok((dir, store, sm))
        }
    }

    /// openraft's own conformance suite for log stores, run against ours.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openraft_storage_suite() {
        Suite::test_all(Builder).await.expect("openraft storage suite");
    }

    /// Entries written before a restart are all there after it, with vote and purge point.
    #[tokio::test]
    async fn restart_keeps_log_vote_and_purge_point() {
        use openraft::testing::{blank_ent, log_id};
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogEngineConfig {
            dir: dir.path().join("log"),
            segment_bytes: 8 << 20,
            tail_bytes_per_group: 1024,
            max_batch_bytes: 4 << 20,
            size_target: u64::MAX,
        };
        {
            let engine = LogEngine::open(&cfg).unwrap();
            let mut a = engine.group(1).unwrap();
            let mut b = engine.group(2).unwrap();
            for i in 1..=50u64 {
                append_synced(&mut a, blank_ent::<TypeConfig>(1, 1, i)).await;
                append_synced(&mut b, blank_ent::<TypeConfig>(2, 3, i)).await;
            }
            a.purge(log_id::<TypeConfig>(1, 1, 10)).await.unwrap();
            a.save_vote(&Vote::new(4, 1)).await.unwrap();
            engine.close();
        }
        let engine = LogEngine::open(&cfg).unwrap();
        let mut groups = engine.groups_on_disk().unwrap();
        groups.sort();
        assert_eq!(groups, vec![1]);
        let mut a = engine.group(1).unwrap();
        let st = a.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id.unwrap().index, 10);
        assert_eq!(st.last_log_id.unwrap().index, 50);
        assert_eq!(a.read_vote().await.unwrap(), Some(Vote::new(4, 1)));
        let entries = a.try_get_log_entries(5..=20).await.unwrap();
        assert_eq!(entries.first().unwrap().log_id.index, 11, "purged entries are gone");
        assert_eq!(entries.len(), 10);
        let mut b = engine.group(2).unwrap();
        assert_eq!(b.try_get_log_entries(..).await.unwrap().len(), 50);
    }

    /// Many groups appending at once share fsyncs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_from_many_groups_share_syncs() {
        use openraft::testing::blank_ent;
        let dir = tempfile::tempdir().unwrap();
        let engine = LogEngine::open(&LogEngineConfig {
            dir: dir.path().join("log"),
            segment_bytes: 8 << 20,
            tail_bytes_per_group: 1 << 20,
            max_batch_bytes: 4 << 20,
            size_target: u64::MAX,
        })
        .unwrap();
        let mut tasks = Vec::new();
        for g in 0..64u32 {
            let mut store = engine.group(g).unwrap();
            tasks.push(tokio::spawn(async move {
                for i in 1..=20u64 {
                    append_synced(&mut store, blank_ent::<TypeConfig>(1, 1, i)).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let batches = engine.stats().batches.load(Ordering::Relaxed);
        let requests = engine.stats().requests.load(Ordering::Relaxed);
        assert_eq!(requests, 64 * 20);
        assert!(batches < requests / 2, "group commit should merge appends: {batches} syncs for {requests} appends");
    }

    fn small_segments(dir: &Path) -> LogEngineConfig {
        LogEngineConfig {
            dir: dir.join("log"),
            segment_bytes: 1 << 20,
            tail_bytes_per_group: 64 << 10,
            max_batch_bytes: 4 << 20,
            size_target: u64::MAX,
        }
    }

    fn marked(index: u64) -> bytes::Bytes {
        bytes::Bytes::from(format!("PURGED-MARKER-{index:08}|").repeat(400))
    }

    fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| std::fs::read(p).unwrap().windows(needle.len()).any(|w| w == needle))
            .collect()
    }

    /// Purged entries' segments are released (overwritten, reused) as the log moves on, and a
    /// scrub moves the live entries out of the older segments so no byte of a purged entry is
    /// left in any file; the state read back after a restart is the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn purged_entries_leave_no_bytes_behind_and_segments_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_segments(dir.path());
        let engine = LogEngine::open(&cfg).unwrap();
        let (mut a, mut b) = (engine.group(1).unwrap(), engine.group(2).unwrap());
        a.save_vote(&Vote::new(3, 1)).await.unwrap();
        engine.sm_store(1).put("snapshot", b"state".to_vec()).await.unwrap();
        // Group 2 keeps one early entry live the whole time (it pins the oldest segment until
        // the scrub moves it).
        harness::append_durable(&mut b, 1, bytes::Bytes::from_static(b"kept")).await.unwrap();
        for i in 1..=400u64 {
            harness::append_durable(&mut a, i, marked(i)).await.unwrap();
            if i % 50 == 0 {
                a.purge(openraft::testing::log_id::<TypeConfig>(1, 1, i - 10)).await.unwrap();
            }
        }
        let log_dir = cfg.dir.clone();
        assert!(!files_holding(&log_dir, b"PURGED-MARKER-00000005").is_empty(), "group 2's entry pins the first segment");
        let files = std::fs::read_dir(&log_dir).unwrap().count();
        let engine2 = engine.clone();
        tokio::task::spawn_blocking(move || engine2.scrub_purged()).await.unwrap().unwrap();
        for i in [1u64, 5, 200, 390] {
            let needle = format!("PURGED-MARKER-{i:08}");
            assert!(files_holding(&log_dir, needle.as_bytes()).is_empty(), "purged entry {i} is still in a file");
        }
        assert!(!files_holding(&log_dir, b"PURGED-MARKER-00000395").is_empty(), "live entries stay");
        assert!(engine.stats().segments_released.load(Ordering::Relaxed) > 0);
        assert!(std::fs::read_dir(&log_dir).unwrap().count() <= files + 1, "released segments are reused, not multiplied");
        engine.close();
        drop((a, b, engine));

        let engine = LogEngine::open(&cfg).unwrap();
        let mut a = engine.group(1).unwrap();
        let st = a.get_log_state().await.unwrap();
        assert_eq!((st.last_purged_log_id.unwrap().index, st.last_log_id.unwrap().index), (390, 400));
        assert_eq!(a.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
        let entries = a.try_get_log_entries(391..=400).await.unwrap();
        assert_eq!(entries.len(), 10);
        assert!(matches!(&entries[0].payload, openraft::EntryPayload::Normal(Command(d)) if *d == marked(391)));
        assert_eq!(engine.sm_store(1).get_blocking("snapshot").unwrap(), Some(b"state".to_vec()));
        let mut b = engine.group(2).unwrap();
        assert!(matches!(&b.try_get_log_entries(..).await.unwrap()[0].payload, openraft::EntryPayload::Normal(Command(d)) if &d[..] == b"kept"));
        let mut groups = engine.groups_on_disk().unwrap();
        groups.sort();
        assert_eq!(groups, vec![1]);
    }

    /// Past its size target the log stays bounded: the few entries an idle group keeps in the
    /// oldest segment are carried forward to the head (so that segment and the later ones can
    /// be released), a busy group whose kept entries hold old segments is named by
    /// `groups_over_target` until it purges, and every live entry reads back after a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_log_keeps_to_its_size_target() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogEngineConfig { size_target: 4 << 20, ..small_segments(dir.path()) };
        let engine = LogEngine::open(&cfg).unwrap();
        let (mut busy, mut idle) = (engine.group(1).unwrap(), engine.group(2).unwrap());
        harness::append_durable(&mut idle, 1, bytes::Bytes::from_static(b"kept")).await.unwrap();
        // ~20 segments' worth of entries, with no purge: the busy group holds the log.
        for i in 1..=2000u64 {
            harness::append_durable(&mut busy, i, marked(i)).await.unwrap();
            if i == 1000 {
                // The idle group's entries span segments: they must move together.
                harness::append_durable(&mut idle, 2, bytes::Bytes::from_static(b"kept too")).await.unwrap();
            }
        }
        assert!(engine.groups_over_target().contains(&1), "the busy group's entries hold segments beyond the target");
        // It purges (what the node's checkpointer does for the groups named).
        busy.purge(openraft::testing::log_id::<TypeConfig>(1, 1, 1990)).await.unwrap();
        for i in 2001..=2100u64 {
            harness::append_durable(&mut busy, i, marked(i)).await.unwrap();
        }
        assert!(engine.groups_over_target().is_empty());
        assert!(engine.size_on_disk() <= cfg.size_target + cfg.segment_bytes, "log spans {} bytes", engine.size_on_disk());
        assert!(engine.stats().entries_carried_forward.load(Ordering::Relaxed) >= 1, "the idle group's entry was moved");
        let segment_files =
            std::fs::read_dir(&cfg.dir).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("wal-")).count();
        assert!(segment_files as u64 <= (cfg.size_target / cfg.segment_bytes) + 1, "{segment_files} segments");
        engine.close();
        drop((busy, idle, engine));

        let engine = LogEngine::open(&cfg).unwrap();
        let mut idle = engine.group(2).unwrap();
        let kept = idle.try_get_log_entries(..).await.unwrap();
        assert_eq!(kept.len(), 2);
        assert!(matches!(&kept[0].payload, openraft::EntryPayload::Normal(Command(d)) if &d[..] == b"kept"));
        assert!(matches!(&kept[1].payload, openraft::EntryPayload::Normal(Command(d)) if &d[..] == b"kept too"));
        let mut busy = engine.group(1).unwrap();
        let entries = busy.try_get_log_entries(1991..=2100).await.unwrap();
        assert_eq!(entries.len(), 110);
        assert!(matches!(&entries[109].payload, openraft::EntryPayload::Normal(Command(d)) if *d == marked(2100)));
    }

    /// A directory holding the RocksDB log of an earlier version is refused by name.
    #[test]
    fn an_old_rocksdb_log_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_segments(dir.path());
        std::fs::create_dir_all(&cfg.dir).unwrap();
        std::fs::write(cfg.dir.join("CURRENT"), b"MANIFEST-000005\n").unwrap();
        let e = LogEngine::open(&cfg).err().expect("refused");
        assert!(e.to_string().contains("RocksDB Raft log") && e.to_string().contains("node drain"), "{e}");
    }

    /// A small tmpfs, unmounted when dropped (the tests run as root; `.ci/run` too).
    struct SmallFs {
        path: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl SmallFs {
        fn mount(size: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("fs");
            std::fs::create_dir(&path).unwrap();
            let status = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(&path).status();
            assert!(status.is_ok_and(|s| s.success()), "mounting a {size} tmpfs at {} (needs root)", path.display());
            SmallFs { path, _dir: dir }
        }
    }

    impl Drop for SmallFs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }

    fn payload(index: u64) -> bytes::Bytes {
        bytes::Bytes::from(vec![(index % 251) as u8; 256 << 10])
    }

    /// A full filesystem stalls appends instead of failing them (a failed append stops the Raft
    /// group for good); they go on once space is freed, and every acknowledged entry is there
    /// after a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_filesystem_stalls_appends_until_space_is_freed() {
        use std::sync::atomic::AtomicBool;
        // The log fills what the ballast leaves; a new segment cannot be made until the ballast
        // goes.
        let fs = SmallFs::mount("160m");
        let ballast = fs.path.join("ballast");
        std::fs::write(&ballast, vec![1u8; 96 << 20]).unwrap();
        let cfg = LogEngineConfig {
            dir: fs.path.join("log"),
            segment_bytes: 8 << 20,
            tail_bytes_per_group: 1 << 20,
            max_batch_bytes: 4 << 20,
            size_target: u64::MAX,
        };
        let engine = LogEngine::open(&cfg).unwrap();
        let durable = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let appender = {
            let (mut store, durable, stop) = (engine.group(1).unwrap(), durable.clone(), stop.clone());
            tokio::spawn(async move {
                let mut index = 1;
                while !stop.load(Ordering::Relaxed) && index < 2000 {
                    harness::append_durable(&mut store, index, payload(index)).await?;
                    durable.store(index, Ordering::Relaxed);
                    index += 1;
                }
                io::Result::Ok(())
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !engine.stats().waiting_for_space.load(Ordering::Relaxed) {
            assert!(!appender.is_finished(), "appends ended before the filesystem filled: {:?}", appender.await);
            assert!(std::time::Instant::now() < deadline, "the 160 MiB filesystem never filled");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let stuck_at = durable.load(Ordering::Relaxed);
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert!(durable.load(Ordering::Relaxed) <= stuck_at + 1, "appends should wait while the filesystem is full");
        assert!(!appender.is_finished(), "a full filesystem must not fail the append: {:?}", appender.await);

        std::fs::remove_file(&ballast).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while durable.load(Ordering::Relaxed) < stuck_at + 4 {
            assert!(!appender.is_finished(), "appends ended after space was freed: {:?}", appender.await);
            assert!(std::time::Instant::now() < deadline, "appends did not resume within 60 s of space being freed (stuck at {stuck_at})");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(!engine.stats().waiting_for_space.load(Ordering::Relaxed));
        stop.store(true, Ordering::Relaxed);
        appender.await.unwrap().unwrap();
        let last = durable.load(Ordering::Relaxed);
        engine.close();
        drop(engine);

        let engine = LogEngine::open(&cfg).unwrap();
        let mut store = engine.group(1).unwrap();
        let entries = store.try_get_log_entries(1..=last).await.unwrap();
        assert_eq!(entries.len() as u64, last, "every acknowledged entry survives");
        for e in entries {
            match e.payload {
                openraft::EntryPayload::Normal(Command(data)) => assert_eq!(data, payload(e.log_id.index), "entry {}", e.log_id.index),
                other => panic!("entry {} has payload {other:?}", e.log_id.index),
            }
        }
    }
}

/// Helpers for benchmarks and tools outside this crate: append application entries and wait
/// until they are durable, without exposing openraft's types.
pub mod harness {
    use std::io;

    use bytes::Bytes;
    use openraft::EntryPayload;
    use openraft::storage::{IOFlushed, RaftLogStorage};
    use openraft::type_config::TypeConfigExt;

    use super::GroupLogStore;
    use crate::types::{Command, Entry, TypeConfig};

    /// Appends one entry carrying `payload` at `index` (term 1) and waits until it is durable.
    pub async fn append_durable(store: &mut GroupLogStore, index: u64, payload: Bytes) -> io::Result<()> {
        let entry = Entry { log_id: openraft::testing::log_id::<TypeConfig>(1, 1, index), payload: EntryPayload::Normal(Command(payload)) };
        let (tx, rx) = TypeConfig::oneshot();
        store.append([entry], IOFlushed::signal(tx)).await?;
        rx.await.map_err(|_| io::Error::other("flush callback dropped"))?
    }
}
