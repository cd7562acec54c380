//! Group commit: one thread turns every group's pending log records into one write-ahead batch
//! ([`crate::wal`]): one write and one `fdatasync`, whatever the number of groups.
//!
//! Requests from many placement groups arrive on a bounded channel. The thread blocks for the
//! first, then drains whatever else is already queued (up to a byte budget), appends it all as
//! one batch, records where each record landed in the [`Index`], and only then reports each
//! request durable. While one sync is in progress the next batch accumulates, so the sync rate
//! stays flat as load grows and the cost per append falls.
//!
//! Segments are released (overwritten with zeros, then reused) once nothing in them is needed:
//! no live entry of any group lies in them, and every group's metadata (vote, commit index,
//! purge point, state-machine records) has been written again since — a checkpoint of all of it
//! opens every new segment.
//!
//! A batch that fails because the filesystem is full (a new segment could not be made) is
//! retried every [`NO_SPACE_RETRY`] until it is written instead of being reported failed: a
//! failed append stops the Raft group for good, and its entries are already promised to the
//! leader's followers. The node's groups stall meanwhile, like a frozen disk. The storage node
//! refuses writes well before this (`pg::space`), so it is a last resort.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use openraft::storage::IOFlushed;
use tokio::sync::{mpsc, oneshot};

use crate::types::{GroupId, TypeConfig};
use crate::wal::{Location, Record, Wal, WalError};

/// Record kinds in the write-ahead log (the payload layouts are in [`Op`]'s constructors).
pub(crate) const KIND_ENTRY: u8 = 1;
pub(crate) const KIND_VOTE: u8 = 2;
pub(crate) const KIND_COMMITTED: u8 = 3;
pub(crate) const KIND_PURGE: u8 = 4;
pub(crate) const KIND_TRUNCATE: u8 = 5;
pub(crate) const KIND_SM: u8 = 6;
pub(crate) const KIND_REMOVE: u8 = 7;

/// One record to write for a group.
pub(crate) struct Op {
    pub(crate) kind: u8,
    pub(crate) payload: Vec<u8>,
}

impl Op {
    /// An entry: index u64 LE, then the encoded entry.
    pub(crate) fn entry(index: u64, encoded: &[u8]) -> Op {
        let mut payload = Vec::with_capacity(8 + encoded.len());
        payload.extend_from_slice(&index.to_le_bytes());
        payload.extend_from_slice(encoded);
        Op { kind: KIND_ENTRY, payload }
    }

    /// An entry encoded straight into the record (one copy of its payload fewer than
    /// [`Op::entry`]).
    pub(crate) fn entry_of<T: serde::Serialize>(index: u64, entry: &T) -> Op {
        let len = bincode::serialized_size(entry).unwrap_or(0) as usize;
        let mut payload = Vec::with_capacity(8 + len);
        payload.extend_from_slice(&index.to_le_bytes());
        bincode::serialize_into(&mut payload, entry).expect("raft types serialise");
        Op { kind: KIND_ENTRY, payload }
    }

    /// The vote (encoded).
    pub(crate) fn vote(encoded: Vec<u8>) -> Op {
        Op { kind: KIND_VOTE, payload: encoded }
    }

    /// The commit index (encoded `Option<LogId>`).
    pub(crate) fn committed(encoded: Vec<u8>) -> Op {
        Op { kind: KIND_COMMITTED, payload: encoded }
    }

    /// Entries up to `upto` are gone: upto u64 LE, then the encoded purged `Option<LogId>`.
    pub(crate) fn purge(upto: u64, encoded: &[u8]) -> Op {
        let mut payload = upto.to_le_bytes().to_vec();
        payload.extend_from_slice(encoded);
        Op { kind: KIND_PURGE, payload }
    }

    /// Entries from `from` on are gone: from u64 LE.
    pub(crate) fn truncate(from: u64) -> Op {
        Op { kind: KIND_TRUNCATE, payload: from.to_le_bytes().to_vec() }
    }

    /// A state-machine record: name length u16 LE, name, value.
    pub(crate) fn sm(name: &str, value: &[u8]) -> Op {
        let mut payload = (name.len() as u16).to_le_bytes().to_vec();
        payload.extend_from_slice(name.as_bytes());
        payload.extend_from_slice(value);
        Op { kind: KIND_SM, payload }
    }

    /// Everything of the group is gone.
    pub(crate) fn remove() -> Op {
        Op { kind: KIND_REMOVE, payload: Vec::new() }
    }
}

/// What the log holds of one group, as written (entries by where they are on disk).
#[derive(Default)]
pub(crate) struct GroupDisk {
    /// Live entries: where each entry's encoded bytes are.
    pub(crate) entries: BTreeMap<u64, Location>,
    pub(crate) vote: Option<Vec<u8>>,
    pub(crate) committed: Option<Vec<u8>>,
    /// Purge point (index) and its encoded `Option<LogId>`.
    pub(crate) purged: Option<(u64, Vec<u8>)>,
    pub(crate) sm: BTreeMap<String, Vec<u8>>,
}

/// Every group's state as written; shared by the writer (which updates it once a batch is
/// durable) and the readers.
pub(crate) type Index = Arc<Mutex<HashMap<GroupId, GroupDisk>>>;

fn bad(group: GroupId, what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("raft log: group {group}: {what}"))
}

fn le_u64(b: &[u8]) -> Option<u64> {
    b.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
}

/// Applies one record (read back at open, or just written at `at`) to the index.
pub(crate) fn apply(index: &mut HashMap<GroupId, GroupDisk>, group: GroupId, kind: u8, payload: &[u8], at: Location) -> io::Result<()> {
    if kind == KIND_REMOVE {
        index.remove(&group);
        return Ok(());
    }
    let g = index.entry(group).or_default();
    match kind {
        KIND_ENTRY => {
            let i = le_u64(payload).ok_or_else(|| bad(group, "an entry record without an index"))?;
            g.entries.insert(i, Location { offset: at.offset + 8, len: at.len - 8, ..at });
        }
        KIND_VOTE => g.vote = Some(payload.to_vec()),
        KIND_COMMITTED => g.committed = Some(payload.to_vec()),
        KIND_PURGE => {
            let upto = le_u64(payload).ok_or_else(|| bad(group, "a purge record without an index"))?;
            g.entries = g.entries.split_off(&upto.saturating_add(1));
            g.purged = Some((upto, payload[8..].to_vec()));
        }
        KIND_TRUNCATE => {
            let from = le_u64(payload).ok_or_else(|| bad(group, "a truncate record without an index"))?;
            g.entries.split_off(&from);
        }
        KIND_SM => {
            let n = payload.get(..2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize).ok_or_else(|| bad(group, "a short state-machine record"))?;
            let name = payload.get(2..2 + n).ok_or_else(|| bad(group, "a short state-machine record"))?;
            let name = String::from_utf8(name.to_vec()).map_err(|_| bad(group, "a state-machine record name is not UTF-8"))?;
            g.sm.insert(name, payload[2 + n..].to_vec());
        }
        other => return Err(bad(group, &format!("record kind {other} is unknown to this binary: run the newer basalt-node"))),
    }
    Ok(())
}

/// What to tell the requester once its records are durable.
pub(crate) enum Done {
    /// openraft's append callback.
    Flushed(IOFlushed<TypeConfig>),
    /// A waiting caller.
    Signal(oneshot::Sender<io::Result<()>>),
    /// Nobody waits (the write rides along with the next synced batch).
    Nothing,
}

pub(crate) struct Request {
    pub(crate) group: GroupId,
    pub(crate) ops: Vec<Op>,
    pub(crate) bytes: usize,
    pub(crate) done: Done,
    /// After the write: raise this group's flushed index.
    pub(crate) flushed: Option<(Arc<AtomicU64>, u64)>,
}

/// Counters that show group commit at work.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Synced batches.
    pub batches: AtomicU64,
    /// Requests those batches carried.
    pub requests: AtomicU64,
    /// Payload bytes written.
    pub bytes: AtomicU64,
    /// Time spent in synced writes, microseconds.
    pub sync_micros: AtomicU64,
    /// A batch is waiting for the filesystem to have space again.
    pub waiting_for_space: AtomicBool,
    /// Segments released (overwritten with zeros for reuse).
    pub segments_released: AtomicU64,
    /// Id of the segment appends go to.
    pub active_segment: AtomicU64,
    /// Id of the oldest segment still in the log.
    pub oldest_segment: AtomicU64,
    /// Entries written again at the log's head to release the oldest segment.
    pub entries_carried_forward: AtomicU64,
}

/// How often a batch refused for lack of space is tried again.
pub const NO_SPACE_RETRY: Duration = Duration::from_millis(500);

/// What the writer thread receives.
pub(crate) enum Msg {
    Write(Request),
    /// Move every live entry out of the older segments and release them all.
    Compact(oneshot::Sender<io::Result<()>>),
    /// Finish what came before, then exit (dropping the queue, so later senders fail fast).
    Stop,
}

pub(crate) struct Writer {
    pub(crate) tx: mpsc::Sender<Msg>,
    thread: Option<JoinHandle<()>>,
    pub(crate) stats: Arc<WriterStats>,
    /// Set when stopping: a batch waiting for space gives up (reported failed).
    stopping: Arc<AtomicBool>,
}

impl Writer {
    pub(crate) fn start(wal: Wal, index: Index, max_batch_bytes: usize, size_target: u64, queue: usize) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel(queue);
        let stats = Arc::new(WriterStats::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let mut state = State { wal, index, stats: stats.clone(), stop: stopping.clone(), checkpoint_segment: 0, max_batch_bytes, size_target };
        // Every group's metadata is written again at the head of the log: segments before it
        // hold nothing but entries from now on.
        state.checkpoint().and_then(|_| state.maintain()).map_err(|e| io::Error::other(e.to_string()))?;
        let thread = std::thread::Builder::new().name("raft-log-writer".into()).spawn(move || run(state, rx))?;
        Ok(Self { tx, thread: Some(thread), stats, stopping })
    }

    /// Writes everything queued so far, then stops the thread.
    pub(crate) fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stopping.store(true, Ordering::Release);
            // Not `blocking_send`: this may run inside the runtime (drop of the last handle).
            let mut msg = Msg::Stop;
            while let Err(mpsc::error::TrySendError::Full(m)) = self.tx.try_send(msg) {
                msg = m;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let _ = t.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

struct State {
    wal: Wal,
    index: Index,
    stats: Arc<WriterStats>,
    stop: Arc<AtomicBool>,
    /// The segment the last checkpoint of every group's metadata went to.
    checkpoint_segment: u64,
    max_batch_bytes: usize,
    /// Past this many bytes of segments, [`State::carry_forward`] runs.
    size_target: u64,
}

impl State {
    fn index(&self) -> std::sync::MutexGuard<'_, HashMap<GroupId, GroupDisk>> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `records` (group, op), retrying while the filesystem is full, and applies them to
    /// the index once durable.
    fn write(&mut self, records: &[(GroupId, &Op)]) -> Result<(), WalError> {
        let batch: Vec<Record<'_>> = records.iter().map(|(g, op)| Record { kind: op.kind, group: *g, payload: &op.payload }).collect();
        let mut result = self.wal.append(&batch);
        while result.as_ref().is_err_and(WalError::is_no_space) && !self.stop.load(Ordering::Acquire) {
            if !self.stats.waiting_for_space.swap(true, Ordering::Relaxed) {
                tracing::error!("raft log filesystem is full: log writes wait for space (this node's Raft groups stall)");
            }
            std::thread::sleep(NO_SPACE_RETRY);
            result = self.wal.append(&batch);
        }
        if self.stats.waiting_for_space.swap(false, Ordering::Relaxed) && result.is_ok() {
            tracing::info!("raft log filesystem has space again: log writes resumed");
        }
        let pos = result?;
        let mut index = self.index();
        for ((group, op), at) in records.iter().zip(pos.records) {
            // Records were checked as they were made; a failure here is a bug worth a log line.
            if let Err(e) = apply(&mut index, *group, op.kind, &op.payload, at) {
                tracing::error!(error = %e, "raft log index update failed");
            }
        }
        Ok(())
    }

    /// [`State::write`] of records this thread made itself.
    fn write_owned(&mut self, records: &[(GroupId, Op)]) -> Result<(), WalError> {
        let refs: Vec<(GroupId, &Op)> = records.iter().map(|(g, o)| (*g, o)).collect();
        self.write(&refs)
    }

    /// Writes every group's metadata again (vote, commit index, purge point, state-machine
    /// records), so no older segment is needed for it.
    fn checkpoint(&mut self) -> Result<(), WalError> {
        let ops: Vec<(GroupId, Op)> = {
            let index = self.index();
            let mut ops = Vec::new();
            for (group, g) in index.iter() {
                if let Some(v) = &g.vote {
                    ops.push((*group, Op::vote(v.clone())));
                }
                if let Some(c) = &g.committed {
                    ops.push((*group, Op::committed(c.clone())));
                }
                if let Some((upto, p)) = &g.purged {
                    ops.push((*group, Op::purge(*upto, p)));
                }
                for (name, value) in &g.sm {
                    ops.push((*group, Op::sm(name, value)));
                }
            }
            ops
        };
        let segment = self.wal.active_segment();
        self.write_owned(&ops)?;
        // If the checkpoint itself rolled over, it is whole in the segment it ended in.
        self.checkpoint_segment = self.wal.active_segment().max(segment);
        Ok(())
    }

    /// After a batch: a checkpoint if a new segment began, then releases what nothing needs.
    fn maintain(&mut self) -> Result<(), WalError> {
        if self.wal.active_segment() != self.checkpoint_segment {
            self.checkpoint()?;
        }
        let needed = self.needed_segment();
        let mut released = self.wal.release_before(needed)?;
        if self.wal.size_on_disk() > self.size_target && self.carry_forward()? {
            released += self.wal.release_before(self.needed_segment())?;
        }
        self.stats.segments_released.fetch_add(released as u64, Ordering::Relaxed);
        self.stats.oldest_segment.store(self.wal.oldest_segment(), Ordering::Relaxed);
        self.stats.active_segment.store(self.wal.active_segment(), Ordering::Relaxed);
        Ok(())
    }

    /// The oldest segment something still needs: a live entry, or the last metadata checkpoint.
    /// A group's entries lie in segment order by index (appends come in index order, and
    /// [`State::carry_forward`] and [`State::compact`] move a group's entries all together), so
    /// its first entry is in its oldest segment.
    fn needed_segment(&self) -> u64 {
        let oldest_entry = self.index().values().filter_map(|g| g.entries.values().next().map(|l| l.segment)).min();
        oldest_entry.unwrap_or(u64::MAX).min(self.checkpoint_segment)
    }

    /// With the log past its size target: if the groups with entries in the oldest segment
    /// have few live entries in all (at most a sixteenth of a segment), writes those groups'
    /// entries again at the head of the log so the segment can be released. Those are the
    /// entries idle groups keep after their last checkpoint (and the meta group's), which would
    /// otherwise hold that segment and every later one for good. Busy groups have more; the
    /// node checkpoints and purges them instead (`LogEngine::groups_over_target`). A group's
    /// entries move all together, so they stay in segment order. Returns whether it moved any.
    fn carry_forward(&mut self) -> Result<bool, WalError> {
        let oldest = self.wal.oldest_segment();
        if oldest == self.wal.active_segment() {
            return Ok(false);
        }
        let limit = self.max_batch_bytes.min(self.wal.segment_bytes() as usize / 16);
        let live: Vec<(GroupId, u64, Location)> = {
            let index = self.index();
            let mut live = Vec::new();
            let mut bytes = 0;
            for (group, disk) in index.iter().filter(|(_, d)| d.entries.values().next().is_some_and(|l| l.segment == oldest)) {
                for (i, at) in &disk.entries {
                    bytes += at.len as usize;
                    if bytes > limit {
                        return Ok(false);
                    }
                    live.push((*group, *i, *at));
                }
            }
            live
        };
        if live.is_empty() {
            return Ok(false);
        }
        let moved = live.len() as u64;
        self.rewrite(live)?;
        self.stats.entries_carried_forward.fetch_add(moved, Ordering::Relaxed);
        Ok(true)
    }

    /// Writes `live` entries again at the head of the log, in batches of at most
    /// `max_batch_bytes` (the index then points at the new copies).
    fn rewrite(&mut self, live: Vec<(GroupId, u64, Location)>) -> Result<(), WalError> {
        let reader = self.wal.reader();
        let mut pending: Vec<(GroupId, Op)> = Vec::new();
        let mut bytes = 0;
        for (group, i, at) in live {
            let encoded = reader.read(at)?;
            bytes += encoded.len();
            pending.push((group, Op::entry(i, &encoded)));
            if bytes >= self.max_batch_bytes {
                self.write_owned(&pending)?;
                pending.clear();
                bytes = 0;
            }
        }
        if !pending.is_empty() {
            self.write_owned(&pending)?;
        }
        Ok(())
    }

    /// Moves every live entry out of the segments before a fresh one and releases them all:
    /// no byte of a purged entry is left anywhere in the log's files.
    fn compact(&mut self) -> Result<(), WalError> {
        self.wal.roll_now()?;
        self.checkpoint()?;
        let fresh = self.checkpoint_segment;
        let live: Vec<(GroupId, u64, Location)> =
            self.index().iter().flat_map(|(g, d)| d.entries.iter().filter(|(_, l)| l.segment < fresh).map(move |(i, l)| (*g, *i, *l))).collect();
        self.rewrite(live)?;
        self.maintain()?;
        // The scrub's promise is that the purged bytes are gone from the files: wait for the
        // released segments' zeros.
        self.wal.wait_recycled()
    }
}

fn run(mut state: State, mut rx: mpsc::Receiver<Msg>) {
    let mut stopping = false;
    while !stopping {
        let first = match rx.blocking_recv() {
            Some(Msg::Write(r)) => r,
            Some(Msg::Compact(tx)) => {
                let _ = tx.send(state.compact().map_err(|e| io::Error::other(e.to_string())));
                continue;
            }
            Some(Msg::Stop) | None => break,
        };
        let mut bytes = first.bytes;
        let mut reqs = vec![first];
        let mut compact = None;
        while bytes < state.max_batch_bytes {
            match rx.try_recv() {
                Ok(Msg::Write(r)) => {
                    bytes += r.bytes;
                    reqs.push(r);
                }
                Ok(Msg::Compact(tx)) => {
                    compact = Some(tx);
                    break;
                }
                Ok(Msg::Stop) => {
                    stopping = true;
                    break;
                }
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let records: Vec<(GroupId, &Op)> = reqs.iter().flat_map(|r| r.ops.iter().map(move |op| (r.group, op))).collect();
        let result = state.write(&records);
        drop(records);
        state.stats.sync_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        state.stats.batches.fetch_add(1, Ordering::Relaxed);
        state.stats.requests.fetch_add(reqs.len() as u64, Ordering::Relaxed);
        state.stats.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        if let Err(e) = &result {
            tracing::error!(error = %e, "raft log write failed");
        }
        for req in reqs {
            let res = result.as_ref().map(|_| ()).map_err(|e| io::Error::other(e.to_string()));
            if res.is_ok()
                && let Some((flushed, index)) = &req.flushed
            {
                flushed.fetch_max(*index, Ordering::Release);
            }
            match req.done {
                Done::Flushed(cb) => cb.io_completed(res),
                Done::Signal(tx) => {
                    let _ = tx.send(res);
                }
                Done::Nothing => {}
            }
        }
        if result.is_ok()
            && let Err(e) = state.maintain()
        {
            tracing::error!(error = %e, "raft log segment maintenance failed");
        }
        if let Some(tx) = compact {
            let _ = tx.send(state.compact().map_err(|e| io::Error::other(e.to_string())));
        }
    }
}
