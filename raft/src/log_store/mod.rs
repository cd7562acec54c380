//! The Raft log store: one RocksDB per node holds every group's log, vote and commit index,
//! and a dedicated writer thread commits appends from all groups together (see [`writer`]).
//!
//! Layout (keys big-endian so a group's entries are contiguous and ordered):
//!
//! | CF     | key                      | value                                  |
//! |--------|--------------------------|----------------------------------------|
//! | `log`  | group u32, index u64     | bincode entry                          |
//! | `meta` | group u32, tag u8        | bincode vote / committed / last purged |
//! | `sm`   | group u32, name          | state-machine owned records            |
//!
//! Appended entries stay in a per-group in-memory tail until they are both durable and beyond
//! the tail's byte budget, so replication reads recent entries without touching RocksDB and
//! entries are readable the moment `append` returns, as openraft requires.

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
use rocksdb::{BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, ReadOptions};
use tokio::sync::oneshot;

use crate::error::RaftError;
use crate::types::{Entry, GroupId, LogId, TypeConfig, Vote};
pub use writer::WriterStats;
use writer::{Cf, Done, Msg, Op, Request, Writer};

/// Payload bytes one replication message carries at most (a single larger entry still goes).
const MAX_REPLICATION_BYTES: usize = 4 << 20;

/// Share of the oldest blob files that ordinary compactions garbage-collect (RocksDB's
/// default); [`LogEngine::scrub_purged`] raises it to all of them for one compaction.
const BLOB_GC_AGE_CUTOFF: &str = "0.25";

const TAG_VOTE: u8 = 1;
const TAG_COMMITTED: u8 = 2;
const TAG_PURGED: u8 = 3;

/// Sizing of the log database.
#[derive(Clone, Debug)]
pub struct LogEngineConfig {
    /// Directory of the RocksDB instance.
    pub dir: PathBuf,
    /// Block cache.
    pub cache_bytes: usize,
    /// All memtables of the log database together (RocksDB's write buffer manager enforces it).
    pub write_buffer_bytes: usize,
    /// Per-group budget for recent entries kept in memory.
    pub tail_bytes_per_group: usize,
    /// Upper bound of one group-commit batch.
    pub max_batch_bytes: usize,
}

fn entry_key(group: GroupId, index: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[0..4].copy_from_slice(&group.to_be_bytes());
    k[4..12].copy_from_slice(&index.to_be_bytes());
    k
}

fn meta_key(group: GroupId, tag: u8) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[0..4].copy_from_slice(&group.to_be_bytes());
    k[4] = tag;
    k
}

fn sm_key(group: GroupId, name: &str) -> Vec<u8> {
    let mut k = group.to_be_bytes().to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

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
    db: Arc<DB>,
    path: PathBuf,
    writer: Mutex<Writer>,
    tx: tokio::sync::mpsc::Sender<Msg>,
    stats: Arc<WriterStats>,
    groups: Mutex<HashMap<GroupId, Arc<GroupLog>>>,
    tail_budget: usize,
}

/// The node's log database. Cheap to clone.
#[derive(Clone)]
pub struct LogEngine {
    inner: Arc<EngineInner>,
}

impl LogEngine {
    /// Opens (creating if needed) the log database and starts the group-commit writer.
    pub fn open(cfg: &LogEngineConfig) -> Result<Self, RaftError> {
        let err = |e: rocksdb::Error| RaftError::Storage { path: cfg.dir.display().to_string(), reason: e.to_string() };
        let cache = Cache::new_lru_cache(cfg.cache_bytes);
        let wbm = rocksdb::WriteBufferManager::new_write_buffer_manager(cfg.write_buffer_bytes, true);
        let cf_opts = |write_buffer: usize| {
            let mut bb = BlockBasedOptions::default();
            bb.set_block_cache(&cache);
            let mut o = Options::default();
            o.set_block_based_table_factory(&bb);
            o.set_write_buffer_size(write_buffer);
            o.set_max_write_buffer_number(3);
            o
        };
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        db_opts.set_keep_log_file_num(4);
        db_opts.set_max_open_files(256);
        db_opts.set_write_buffer_manager(&wbm);
        // Entry payloads (block data) live in blob files: written once when a memtable is
        // flushed, never rewritten by compactions, dropped when every entry in a file is purged.
        let mut log_opts = cf_opts((cfg.write_buffer_bytes / 2).max(1 << 20));
        log_opts.set_enable_blob_files(true);
        log_opts.set_min_blob_size(1024);
        log_opts.set_enable_blob_gc(true);
        log_opts.set_blob_file_size(64 << 20);
        let cfs = vec![
            ColumnFamilyDescriptor::new(Cf::Log.name(), log_opts),
            ColumnFamilyDescriptor::new(Cf::Meta.name(), cf_opts(2 << 20)),
            ColumnFamilyDescriptor::new(Cf::Sm.name(), cf_opts(2 << 20)),
        ];
        let db = Arc::new(DB::open_cf_descriptors(&db_opts, &cfg.dir, cfs).map_err(err)?);
        let writer = Writer::start(db.clone(), cfg.max_batch_bytes, 1024)
            .map_err(|e| RaftError::Storage { path: cfg.dir.display().to_string(), reason: e.to_string() })?;
        let tx = writer.tx.clone();
        let stats = writer.stats.clone();
        Ok(Self {
            inner: Arc::new(EngineInner {
                db,
                path: cfg.dir.clone(),
                writer: Mutex::new(writer),
                tx,
                stats,
                groups: Mutex::new(HashMap::new()),
                tail_budget: cfg.tail_bytes_per_group,
            }),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Removes the bytes of purged entries from every file under the log directory, so data
    /// a client deleted does not outlive its log entries: flushes every memtable (the WAL files
    /// that held the entries become obsolete and RocksDB deletes them), then compacts the log
    /// column family with blob garbage collection over all blob files (files that held purged
    /// payloads are rewritten without them, or deleted). Heavy and blocking: call it from a
    /// blocking thread, and rarely.
    pub fn scrub_purged(&self) -> Result<(), RaftError> {
        let db = &self.inner.db;
        let cf = |c: Cf| db.cf_handle(c.name()).expect("cf exists");
        for c in [Cf::Log, Cf::Meta, Cf::Sm] {
            db.flush_cf(&cf(c)).map_err(|e| self.storage_err(e))?;
        }
        let log = cf(Cf::Log);
        // Every blob file is eligible for garbage collection during this one compaction.
        db.set_options_cf(&log, &[("blob_garbage_collection_age_cutoff", "1.0")]).map_err(|e| self.storage_err(e))?;
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        db.compact_range_cf_opt(&log, None::<&[u8]>, None::<&[u8]>, &opts);
        db.set_options_cf(&log, &[("blob_garbage_collection_age_cutoff", BLOB_GC_AGE_CUTOFF)]).map_err(|e| self.storage_err(e))?;
        Ok(())
    }

    /// Group-commit counters.
    pub fn stats(&self) -> &WriterStats {
        &self.inner.stats
    }

    /// Groups that have any Raft state on disk (to restart them after a node restart).
    pub fn groups_on_disk(&self) -> Result<Vec<GroupId>, RaftError> {
        let cf = self.inner.db.cf_handle(Cf::Meta.name()).expect("cf exists");
        let mut out = Vec::new();
        for item in self.inner.db.iterator_cf(&cf, IteratorMode::Start) {
            let (k, _) = item.map_err(|e| self.storage_err(e))?;
            if k.len() == 5 && k[4] == TAG_VOTE {
                out.push(u32::from_be_bytes(k[0..4].try_into().expect("4 bytes")));
            }
        }
        Ok(out)
    }

    fn storage_err(&self, e: impl std::fmt::Display) -> RaftError {
        RaftError::Storage { path: self.inner.path.display().to_string(), reason: e.to_string() }
    }

    /// The log store of one group (loaded from disk the first time).
    pub fn group(&self, group: GroupId) -> Result<GroupLogStore, RaftError> {
        let mut groups = self.inner.groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = groups.get(&group) {
            return Ok(GroupLogStore { engine: self.inner.clone(), log: g.clone() });
        }
        let db = &self.inner.db;
        let meta = db.cf_handle(Cf::Meta.name()).expect("cf exists");
        let get = |tag| db.get_cf(&meta, meta_key(group, tag)).map_err(|e| self.storage_err(e));
        let vote: Option<Vote> = get(TAG_VOTE)?.map(|v| decode("vote", group, &v)).transpose().map_err(|e| self.storage_err(e))?;
        // Both are stored as `Option<LogId>` (what openraft hands us).
        let committed: Option<LogId> =
            get(TAG_COMMITTED)?.map(|v| decode::<Option<LogId>>("committed", group, &v)).transpose().map_err(|e| self.storage_err(e))?.flatten();
        let last_purged: Option<LogId> =
            get(TAG_PURGED)?.map(|v| decode::<Option<LogId>>("purged", group, &v)).transpose().map_err(|e| self.storage_err(e))?.flatten();
        let log_cf = db.cf_handle(Cf::Log.name()).expect("cf exists");
        let mut iter = db.iterator_cf(&log_cf, IteratorMode::From(&entry_key(group, u64::MAX), Direction::Reverse));
        let last_entry: Option<LogId> = match iter.next() {
            Some(Ok((k, v))) if k.len() == 12 && k[0..4] == group.to_be_bytes() => {
                let e: Entry = decode("entry", group, &v).map_err(|e| self.storage_err(e))?;
                Some(e.log_id)
            }
            Some(Err(e)) => return Err(self.storage_err(e)),
            _ => None,
        };
        let last_log = match (&last_entry, &last_purged) {
            (Some(e), _) => Some(*e),
            (None, p) => *p,
        };
        let flushed = last_log.as_ref().map(|l| l.index).unwrap_or(0);
        let log = Arc::new(GroupLog {
            group,
            state: Mutex::new(GroupState { vote, committed, last_purged, last_log, tail: BTreeMap::new(), tail_bytes: 0 }),
            flushed: Arc::new(AtomicU64::new(flushed)),
        });
        groups.insert(group, log.clone());
        Ok(GroupLogStore { engine: self.inner.clone(), log })
    }

    /// Deletes everything a group has in the log database (its replica left this node).
    pub async fn remove_group(&self, group: GroupId) -> Result<(), RaftError> {
        self.inner.groups.lock().unwrap_or_else(|p| p.into_inner()).remove(&group);
        let lo = group.to_be_bytes().to_vec();
        let hi = (u64::from(group) + 1).to_be_bytes()[4..8].to_vec();
        let hi = if group == u32::MAX { vec![0xff; 13] } else { hi };
        let ops = vec![
            Op::DeleteRange(Cf::Log, lo.clone(), hi.clone()),
            Op::DeleteRange(Cf::Meta, lo.clone(), hi.clone()),
            Op::DeleteRange(Cf::Sm, lo, hi),
        ];
        submit_wait(&self.inner, ops).await.map_err(|e| self.storage_err(e))
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

async fn submit_wait(engine: &EngineInner, ops: Vec<Op>) -> io::Result<()> {
    let (tx, rx) = oneshot::channel();
    let bytes = ops.iter().map(op_bytes).sum();
    engine
        .tx
        .send(Msg::Write(Request { ops, bytes, done: Done::Signal(tx), flushed: None }))
        .await
        .map_err(|_| io::Error::other("raft log writer stopped"))?;
    rx.await.map_err(|_| io::Error::other("raft log writer stopped"))?
}

fn op_bytes(op: &Op) -> usize {
    match op {
        Op::Put(_, k, v) => k.len() + v.len(),
        Op::DeleteRange(_, a, b) => a.len() + b.len(),
    }
}

/// Durable small records of one group's state machine.
#[derive(Clone)]
pub struct SmStore {
    engine: Arc<EngineInner>,
    group: GroupId,
}

impl SmStore {
    /// Reads a record (blocking RocksDB read: call from a blocking context or at startup).
    pub fn get_blocking(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let cf = self.engine.db.cf_handle(Cf::Sm.name()).expect("cf exists");
        self.engine.db.get_cf(&cf, sm_key(self.group, name)).map_err(io::Error::other)
    }

    /// Writes a record and waits until it is durable.
    pub async fn put(&self, name: &str, value: Vec<u8>) -> io::Result<()> {
        submit_wait(&self.engine, vec![Op::Put(Cf::Sm, sm_key(self.group, name), value)]).await
    }
}

/// One group's view of the log database; implements openraft's log storage traits.
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

    fn read_db(&self, start: u64, end: u64, limit: usize) -> io::Result<Vec<Entry>> {
        let db = &self.engine.db;
        let cf = db.cf_handle(Cf::Log.name()).expect("cf exists");
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(entry_key(self.log.group, end).to_vec());
        let mut out = Vec::new();
        let mut expect = start;
        for item in db.iterator_cf_opt(&cf, ro, IteratorMode::From(&entry_key(self.log.group, start), Direction::Forward)) {
            let (k, v) = item.map_err(io::Error::other)?;
            let index = u64::from_be_bytes(k[4..12].try_into().map_err(|_| io::Error::other("bad log key"))?);
            if index != expect && !out.is_empty() {
                return Err(io::Error::other(format!("group {}: hole in raft log at index {expect}", self.log.group)));
            }
            expect = index + 1;
            out.push(decode("entry", self.log.group, &v)?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Reads `[start, end)`, at most `limit` entries; with `byte_limit`, stops once that many
    /// payload bytes are collected (always returning at least one entry).
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
        let db_end = tail_first.map(|f| f.min(end)).unwrap_or(end);
        let this = self.clone();
        let mut out = tokio::task::spawn_blocking(move || this.read_db(start, db_end, limit))
            .await
            .map_err(|e| io::Error::other(format!("log read task failed: {e}")))??;
        // The tail continues the database range only if the database had every entry up to it;
        // entries missing at the start of the range were purged, which the caller tolerates.
        let reaches_tail = out.last().map(|e| e.log_id.index + 1 == db_end).unwrap_or(true);
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
        let bytes = ops.iter().map(op_bytes).sum();
        let flushed = flushed.map(|i| (self.log.flushed.clone(), i));
        self.engine.tx.send(Msg::Write(Request { ops, bytes, done, flushed })).await.map_err(|_| io::Error::other("raft log writer stopped"))
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
        self.submit(vec![Op::Put(Cf::Meta, meta_key(self.log.group, TAG_VOTE).to_vec(), encode(vote))], Done::Signal(tx), None).await?;
        rx.await.map_err(|_| io::Error::other("raft log writer stopped"))?
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.log.state().committed = committed;
        // Not awaited: it rides with the next synced batch, which follows within one append.
        self.submit(vec![Op::Put(Cf::Meta, meta_key(self.log.group, TAG_COMMITTED).to_vec(), encode(&committed))], Done::Nothing, None).await
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
                let value = encode(&entry);
                let index = entry.log_id.index;
                let size = value.len();
                ops.push(Op::Put(Cf::Log, entry_key(self.log.group, index).to_vec(), value));
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
        let ops = vec![Op::DeleteRange(Cf::Log, entry_key(self.log.group, from).to_vec(), entry_key(self.log.group, u64::MAX).to_vec())];
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
        let ops = vec![
            Op::DeleteRange(Cf::Log, entry_key(self.log.group, 0).to_vec(), entry_key(self.log.group, upto + 1).to_vec()),
            Op::Put(Cf::Meta, meta_key(self.log.group, TAG_PURGED).to_vec(), encode(&Some(log_id))),
        ];
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
                cache_bytes: 8 << 20,
                write_buffer_bytes: 4 << 20,
                tail_bytes_per_group: 1 << 20,
                max_batch_bytes: 4 << 20,
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
            cache_bytes: 8 << 20,
            write_buffer_bytes: 4 << 20,
            tail_bytes_per_group: 1024,
            max_batch_bytes: 4 << 20,
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
            cache_bytes: 8 << 20,
            write_buffer_bytes: 4 << 20,
            tail_bytes_per_group: 1 << 20,
            max_batch_bytes: 4 << 20,
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
        // RocksDB clears its "no space" error itself, polling every 5 s, once the filesystem has
        // room for its write buffers again (64 MiB here): the ballast frees more than that.
        let fs = SmallFs::mount("160m");
        let ballast = fs.path.join("ballast");
        std::fs::write(&ballast, vec![1u8; 96 << 20]).unwrap();
        let cfg = LogEngineConfig {
            dir: fs.path.join("log"),
            cache_bytes: 8 << 20,
            write_buffer_bytes: 4 << 20,
            tail_bytes_per_group: 1 << 20,
            max_batch_bytes: 4 << 20,
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
