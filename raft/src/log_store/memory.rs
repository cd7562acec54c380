//! An in-memory Raft log engine with the durability contract of [`super::LogEngine`], for the
//! deterministic simulation ([`crate::sim`]) and fast tests.
//!
//! A [`MemLogDisk`] stands for a node's device: it survives a simulated crash. Each boot opens
//! a [`MemLogEngine`] on it (an incarnation). Every write is visible at once to the groups of
//! that incarnation, as openraft requires, and becomes durable only when a simulated `fdatasync`
//! covering it completes: a flusher task takes whatever is pending, waits a seeded "sync
//! latency" and then moves it to the disk image, in order, as one group-commit batch. A crash
//! (opening a new incarnation) throws away everything not yet synced, exactly what a power loss
//! does to the real log's unsynced tail, and handles of the dead incarnation fail every call.
//!
//! [`MemLogConfig::ack_before_durable`] plants a bug for the simulation to find: appends are
//! reported flushed when they are handed over instead of when they are durable, so a majority
//! may acknowledge an entry that a power loss then erases.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use openraft::OptionalSend;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{Notify, oneshot};

use super::RaftLogEngine;
use crate::error::RaftError;
use crate::types::{Entry, GroupId, LogId, TypeConfig, Vote};

/// How the in-memory log behaves.
#[derive(Clone, Debug)]
pub struct MemLogConfig {
    /// Seeds the simulated sync latencies.
    pub seed: u64,
    /// Range of the simulated `fdatasync` latency (microseconds).
    pub sync_latency_us: (u64, u64),
    /// The planted bug: report appends flushed before they are durable.
    pub ack_before_durable: bool,
}

impl Default for MemLogConfig {
    fn default() -> Self {
        Self { seed: 0, sync_latency_us: (50, 500), ack_before_durable: false }
    }
}

/// One group's log as stored: what survives on the disk image, or what the running
/// incarnation sees.
#[derive(Clone, Debug, Default)]
struct GroupImage {
    vote: Option<Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
    entries: BTreeMap<u64, Entry>,
}

impl GroupImage {
    fn last(&self) -> Option<LogId> {
        self.entries.last_key_value().map(|(_, e)| e.log_id).or(self.purged)
    }

    fn apply(&mut self, op: &MemOp) {
        match op {
            MemOp::Vote(v) => self.vote = Some(*v),
            MemOp::Committed(c) => self.committed = *c,
            MemOp::Append(entries) => {
                for e in entries {
                    self.entries.insert(e.log_id.index, e.clone());
                }
            }
            MemOp::Truncate(from) => drop(self.entries.split_off(from)),
            MemOp::Purge(log_id) => {
                self.entries = self.entries.split_off(&(log_id.index + 1));
                self.purged = Some(*log_id);
            }
        }
    }
}

enum MemOp {
    Vote(Vote),
    Committed(Option<LogId>),
    Append(Vec<Entry>),
    Truncate(u64),
    Purge(LogId),
}

enum Done {
    Nothing,
    Flushed(IOFlushed<TypeConfig>),
    Signal(oneshot::Sender<()>),
}

struct Pending {
    group: GroupId,
    op: MemOp,
    done: Done,
}

#[derive(Default)]
struct DiskState {
    /// Bumped at every boot; handles of older incarnations are dead.
    incarnation: u64,
    /// What is durable.
    durable: HashMap<GroupId, GroupImage>,
    /// What the running incarnation sees (durable plus pending).
    live: HashMap<GroupId, GroupImage>,
    /// Writes handed over but not yet synced, in order.
    pending: VecDeque<Pending>,
    /// Syncs completed (for tests and reports).
    syncs: u64,
}

/// A node's simulated device: the durable part of its Raft log. Survives crashes; cheap to clone.
#[derive(Clone, Default)]
pub struct MemLogDisk {
    state: Arc<Mutex<DiskState>>,
}

impl MemLogDisk {
    fn lock(&self) -> MutexGuard<'_, DiskState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Power loss: what was not synced is gone, and the running boot's handles fail from now on.
    pub fn power_off(&self) {
        let mut st = self.lock();
        st.incarnation += 1;
        st.pending.clear();
        st.live = st.durable.clone();
    }

    /// Simulated syncs completed so far, over all incarnations.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }
}

struct EngineInner {
    disk: MemLogDisk,
    incarnation: u64,
    config: MemLogConfig,
    rng: Mutex<StdRng>,
    wake: Notify,
}

/// One boot's view of a [`MemLogDisk`]. Cheap to clone.
#[derive(Clone)]
pub struct MemLogEngine {
    inner: Arc<EngineInner>,
}

impl MemLogEngine {
    /// Boots on `disk`: whatever was not synced when the previous incarnation died is gone, and
    /// that incarnation's handles fail from now on. Starts the flusher task (needs a tokio
    /// runtime).
    pub fn open(disk: &MemLogDisk, config: MemLogConfig) -> Self {
        // Booting starts where a power loss leaves the device.
        disk.power_off();
        let incarnation = disk.lock().incarnation;
        let rng = Mutex::new(StdRng::seed_from_u64(config.seed ^ incarnation.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        let inner = Arc::new(EngineInner { disk: disk.clone(), incarnation, config, rng, wake: Notify::new() });
        tokio::spawn(flusher(inner.clone()));
        Self { inner }
    }
}

impl RaftLogEngine for MemLogEngine {
    type Group = MemGroupLog;

    fn group(&self, group: GroupId) -> Result<MemGroupLog, RaftError> {
        Ok(MemGroupLog { engine: self.inner.clone(), group })
    }
}

/// Syncs pending writes, one batch per simulated `fdatasync`, until the incarnation dies.
async fn flusher(inner: Arc<EngineInner>) {
    loop {
        inner.wake.notified().await;
        loop {
            let queued = {
                let st = inner.disk.lock();
                if st.incarnation != inner.incarnation {
                    return;
                }
                st.pending.len()
            };
            if queued == 0 {
                break;
            }
            let (lo, hi) = inner.config.sync_latency_us;
            let latency = inner.rng.lock().unwrap_or_else(|p| p.into_inner()).random_range(lo..=hi.max(lo));
            tokio::time::sleep(Duration::from_micros(latency)).await;
            // The sync covers what was handed over before it started.
            let batch: Vec<Pending> = {
                let mut st = inner.disk.lock();
                if st.incarnation != inner.incarnation {
                    return;
                }
                let n = queued.min(st.pending.len());
                let batch: Vec<Pending> = st.pending.drain(..n).collect();
                for p in &batch {
                    st.durable.entry(p.group).or_default().apply(&p.op);
                }
                st.syncs += 1;
                batch
            };
            for p in batch {
                match p.done {
                    Done::Nothing => {}
                    Done::Flushed(cb) => cb.io_completed(Ok(())),
                    Done::Signal(tx) => drop(tx.send(())),
                }
            }
        }
    }
}

/// One group's log in a [`MemLogEngine`].
#[derive(Clone)]
pub struct MemGroupLog {
    engine: Arc<EngineInner>,
    group: GroupId,
}

impl MemGroupLog {
    fn dead(&self) -> io::Error {
        io::Error::other(format!("group {}: the node crashed; this log handle belongs to an earlier boot", self.group))
    }

    /// Runs `f` on the live image of this group, if this incarnation still runs.
    fn with_live<T>(&self, f: impl FnOnce(&mut GroupImage) -> T) -> io::Result<T> {
        let mut st = self.engine.disk.lock();
        if st.incarnation != self.engine.incarnation {
            return Err(self.dead());
        }
        Ok(f(st.live.entry(self.group).or_default()))
    }

    /// Applies `op` to the live image and queues it for the next sync.
    fn write(&self, op: MemOp, done: Done) -> io::Result<()> {
        {
            let mut st = self.engine.disk.lock();
            if st.incarnation != self.engine.incarnation {
                return Err(self.dead());
            }
            st.live.entry(self.group).or_default().apply(&op);
            st.pending.push_back(Pending { group: self.group, op, done });
        }
        self.engine.wake.notify_one();
        Ok(())
    }

    /// Writes `op` and waits until it is durable.
    async fn write_synced(&self, op: MemOp) -> io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.write(op, Done::Signal(tx))?;
        rx.await.map_err(|_| self.dead())
    }
}

impl RaftLogReader<TypeConfig> for MemGroupLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(&mut self, range: RB) -> Result<Vec<Entry>, io::Error> {
        let range = (range.start_bound().cloned(), range.end_bound().cloned());
        self.with_live(|g| g.entries.range::<u64, (Bound<u64>, Bound<u64>)>(range).map(|(_, e)| e.clone()).collect())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.with_live(|g| g.vote)
    }
}

impl RaftLogStorage<TypeConfig> for MemGroupLog {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        self.with_live(|g| LogState { last_purged_log_id: g.purged, last_log_id: g.last() })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.write_synced(MemOp::Vote(*vote)).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // As in the real log: it rides with the next sync.
        self.write(MemOp::Committed(committed), Done::Nothing)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        self.with_live(|g| g.committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if self.engine.config.ack_before_durable {
            self.write(MemOp::Append(entries), Done::Nothing)?;
            callback.io_completed(Ok(()));
            return Ok(());
        }
        self.write(MemOp::Append(entries), Done::Flushed(callback))
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index + 1).unwrap_or(0);
        self.write_synced(MemOp::Truncate(from)).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        self.write_synced(MemOp::Purge(log_id)).await
    }
}

#[cfg(test)]
mod tests {
    use openraft::StorageError;
    use openraft::testing::log::{StoreBuilder, Suite};

    use super::*;
    use crate::state_machine::SmAdapter;
    use crate::state_machine::test_sm::Counter;

    struct Builder;

    impl StoreBuilder<TypeConfig, MemGroupLog, SmAdapter<Counter>, ()> for Builder {
        async fn build(&self) -> Result<((), MemGroupLog, SmAdapter<Counter>), StorageError<TypeConfig>> {
            let engine = MemLogEngine::open(&MemLogDisk::default(), MemLogConfig::default());
            let store = engine.group(7).expect("group store");
            let sm = SmAdapter::new(Counter::default()).await.expect("state machine");
            Ok(((), store, sm))
        }
    }

    /// The in-memory log passes the same conformance suite as the real one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn openraft_storage_suite() {
        Suite::test_all(Builder).await.expect("openraft storage suite");
    }

    fn entry(index: u64) -> Entry {
        use openraft::entry::RaftEntry;
        Entry::new_blank(openraft::testing::log_id::<TypeConfig>(1, 1, index))
    }

    /// A crash keeps exactly what was synced; the dead boot's handles fail.
    #[tokio::test(start_paused = true)]
    async fn a_crash_loses_only_what_was_not_synced() {
        use openraft::type_config::TypeConfigExt;
        let disk = MemLogDisk::default();
        let engine = MemLogEngine::open(&disk, MemLogConfig::default());
        let mut log = engine.group(1).expect("group");
        let (tx, rx) = TypeConfig::oneshot();
        log.append([entry(1), entry(2)], IOFlushed::signal(tx)).await.expect("append");
        rx.await.expect("flushed").expect("durable");
        // Handed over, never synced: the crash comes first.
        log.append([entry(3)], IOFlushed::noop()).await.expect("append");
        assert_eq!(log.get_log_state().await.expect("state").last_log_id.map(|l| l.index), Some(3));

        let engine = MemLogEngine::open(&disk, MemLogConfig::default());
        assert!(log.get_log_state().await.is_err(), "the dead boot's handle must fail");
        let mut log = engine.group(1).expect("group");
        assert_eq!(log.get_log_state().await.expect("state").last_log_id.map(|l| l.index), Some(2));
    }
}
