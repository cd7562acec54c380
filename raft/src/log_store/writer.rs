//! Group commit: one thread turns every group's pending log writes into one RocksDB write batch
//! and one fsync.
//!
//! Appends from many placement groups arrive on a bounded channel. The thread blocks for the
//! first request, then drains whatever else is already queued (up to a byte budget), writes it
//! all as one synced batch, and only then reports each request durable. While one fsync is in
//! progress the next batch accumulates, so the fsync rate stays flat as load grows and the
//! cost per append falls.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

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
}

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
}

impl Writer {
    pub(crate) fn start(db: Arc<DB>, max_batch_bytes: usize, queue: usize) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel(queue);
        let stats = Arc::new(WriterStats::default());
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || run(db, rx, max_batch_bytes, thread_stats))?;
        Ok(Self { tx, thread: Some(thread), stats })
    }

    /// Writes everything queued so far, then stops the thread.
    pub(crate) fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
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

fn run(db: Arc<DB>, mut rx: mpsc::Receiver<Msg>, max_batch_bytes: usize, stats: Arc<WriterStats>) {
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
        let mut wb = WriteBatch::default();
        for req in &reqs {
            for op in &req.ops {
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
        }
        let started = std::time::Instant::now();
        let result = db.write_opt(wb, &opts);
        stats.sync_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.requests.fetch_add(reqs.len() as u64, Ordering::Relaxed);
        stats.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        if let Err(e) = &result {
            tracing::error!(error = %e, "raft log write failed");
        }
        for req in reqs {
            let res = result.as_ref().map(|_| ()).map_err(|e| io::Error::other(e.to_string()));
            if res.is_ok() {
                if let Some((flushed, index)) = &req.flushed {
                    flushed.fetch_max(*index, Ordering::Release);
                }
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
