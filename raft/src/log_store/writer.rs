//! Group commit: one thread turns every group's pending log writes into one RocksDB write batch
//! and one fsync.
//!
//! Appends from many placement groups arrive on a bounded channel. The thread blocks for the
//! first request, then drains whatever else is already queued (up to a byte budget), writes it
//! all as one synced batch, and only then reports each request durable. While one fsync is in
//! progress the next batch accumulates, so the fsync rate stays flat as load grows and the
//! cost per append falls.
//!
//! A batch that fails because the filesystem is full is retried every [`NO_SPACE_RETRY`] until
//! it is written (RocksDB resumes by itself once space is back) instead of being reported
//! failed: a failed append stops the Raft group for good, and its entries are already promised
//! to the leader's followers. The node's groups stall meanwhile, like a frozen disk. The storage
//! node refuses writes well before this (`pg::space`), so it is a last resort.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use openraft::storage::IOFlushed;
use rocksdb::{DB, WriteBatch, WriteOptions};
use tokio::sync::{mpsc, oneshot};

use crate::types::TypeConfig;

/// Column families of the log database.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Cf {
    Log,
    Meta,
    Sm,
}

impl Cf {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Cf::Log => "log",
            Cf::Meta => "meta",
            Cf::Sm => "sm",
        }
    }
}

/// One mutation.
pub(crate) enum Op {
    Put(Cf, Vec<u8>, Vec<u8>),
    DeleteRange(Cf, Vec<u8>, Vec<u8>),
}

/// What to tell the requester once its ops are durable.
pub(crate) enum Done {
    /// openraft's append callback.
    Flushed(IOFlushed<TypeConfig>),
    /// A waiting caller.
    Signal(oneshot::Sender<io::Result<()>>),
    /// Nobody waits (the write rides along with the next synced batch).
    Nothing,
}

pub(crate) struct Request {
    pub(crate) ops: Vec<Op>,
    pub(crate) bytes: usize,
    pub(crate) done: Done,
    /// After the write: raise this group's flushed index.
    pub(crate) flushed: Option<(Arc<AtomicU64>, u64)>,
}

/// Counters that show group commit at work.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Synced RocksDB writes.
    pub batches: AtomicU64,
    /// Requests those writes carried.
    pub requests: AtomicU64,
    /// Payload bytes written.
    pub bytes: AtomicU64,
    /// Time spent in synced writes, microseconds.
    pub sync_micros: AtomicU64,
    /// A batch is waiting for the filesystem to have space again.
    pub waiting_for_space: AtomicBool,
}

/// How often a batch refused for lack of space is tried again.
pub const NO_SPACE_RETRY: Duration = Duration::from_millis(500);

/// What the writer thread receives.
pub(crate) enum Msg {
    Write(Request),
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
    pub(crate) fn start(db: Arc<DB>, max_batch_bytes: usize, queue: usize) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel(queue);
        let stats = Arc::new(WriterStats::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let (thread_stats, thread_stopping) = (stats.clone(), stopping.clone());
        let thread =
            std::thread::Builder::new().name("raft-log-writer".into()).spawn(move || run(db, rx, max_batch_bytes, thread_stats, thread_stopping))?;
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

fn run(db: Arc<DB>, mut rx: mpsc::Receiver<Msg>, max_batch_bytes: usize, stats: Arc<WriterStats>, stop: Arc<AtomicBool>) {
    let mut opts = WriteOptions::default();
    opts.set_sync(true);
    let mut stopping = false;
    while !stopping {
        let first = match rx.blocking_recv() {
            Some(Msg::Write(r)) => r,
            Some(Msg::Stop) | None => break,
        };
        let mut bytes = first.bytes;
        let mut reqs = vec![first];
        while bytes < max_batch_bytes {
            match rx.try_recv() {
                Ok(Msg::Write(r)) => {
                    bytes += r.bytes;
                    reqs.push(r);
                }
                Ok(Msg::Stop) => {
                    stopping = true;
                    break;
                }
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let mut result = db.write_opt(batch(&db, &reqs), &opts);
        while result.as_ref().is_err_and(is_no_space) && !stop.load(Ordering::Acquire) {
            if !stats.waiting_for_space.swap(true, Ordering::Relaxed) {
                tracing::error!(path = %db.path().display(), "raft log filesystem is full: log writes wait for space (this node's Raft groups stall)");
            }
            std::thread::sleep(NO_SPACE_RETRY);
            result = db.write_opt(batch(&db, &reqs), &opts);
        }
        if stats.waiting_for_space.swap(false, Ordering::Relaxed) && result.is_ok() {
            tracing::info!(path = %db.path().display(), "raft log filesystem has space again: log writes resumed");
        }
        stats.sync_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.requests.fetch_add(reqs.len() as u64, Ordering::Relaxed);
        stats.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
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
    }
}

/// One write batch of every request's ops (rebuilt for each attempt: a write consumes it).
fn batch(db: &DB, reqs: &[Request]) -> WriteBatch {
    let mut wb = WriteBatch::default();
    for op in reqs.iter().flat_map(|r| &r.ops) {
        match op {
            Op::Put(cf, k, v) => {
                let cf = db.cf_handle(cf.name()).expect("column family exists");
                wb.put_cf(&cf, k, v);
            }
            Op::DeleteRange(cf, from, to) => {
                let cf = db.cf_handle(cf.name()).expect("column family exists");
                wb.delete_range_cf(&cf, from, to);
            }
        }
    }
    wb
}

/// RocksDB reports a full filesystem only in its message ("IO error: No space left on
/// device"; the crate has no sub-code for it).
fn is_no_space(e: &rocksdb::Error) -> bool {
    let text = e.to_string();
    text.contains("No space left") || text.contains("NoSpace")
}
