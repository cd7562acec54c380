//! Overwrites released segments with zeros on a thread of its own, so the log writer never
//! waits behind a segment's worth of zeros between two batches (under large sequential writes
//! a node releases a 64 MiB segment every few hundred milliseconds; zeroing one on the writer
//! thread stalled every group's appends for that long).
//!
//! The writer renames a released segment to `zeroing-<n>.seg` and syncs the directory before
//! handing it here (so a crash can never leave a half-zeroed file under a segment's name); this
//! thread overwrites it, syncs it and renames it `free-<n>.seg`, ready for reuse. A crash in
//! between leaves a `zeroing-` file, which [`super::Wal::open`] finishes.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::{WalError, io_err, zero_file};

/// The segments being overwritten and the ones ready for reuse.
pub(super) struct Recycler {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled whenever a segment has been overwritten (or failed) and when work arrives.
    changed: Condvar,
    segment_bytes: u64,
}

#[derive(Default)]
struct State {
    /// Released segments to overwrite: the `zeroing-` path, and the `free-` path it becomes.
    queue: VecDeque<(PathBuf, PathBuf)>,
    /// Overwritten segment files, ready for reuse.
    free: Vec<PathBuf>,
    /// A segment is being overwritten now.
    busy: bool,
    /// Finish the queue, then exit.
    stop: bool,
    /// An overwrite that failed, reported by the next [`Recycler::take`] or
    /// [`Recycler::wait_idle`]. Its `zeroing-` file stays and is finished at the next open.
    failed: Option<(PathBuf, io::Error)>,
}

impl Recycler {
    /// Starts the thread with `free` (already zeroed) segment files in the pool.
    pub(super) fn start(free: Vec<PathBuf>, segment_bytes: u64) -> Result<Self, WalError> {
        let shared = Arc::new(Shared { state: Mutex::new(State { free, ..State::default() }), changed: Condvar::new(), segment_bytes });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("raft-log-zeroer".into())
            .spawn(move || worker.run())
            .map_err(|source| WalError::Io { path: PathBuf::from("raft-log-zeroer thread"), source })?;
        Ok(Self { shared, thread: Some(thread) })
    }

    /// Queues a released segment (already renamed to `zeroing`, the rename synced) to be
    /// overwritten and then renamed to `free`.
    pub(super) fn release(&self, zeroing: PathBuf, free: PathBuf) {
        self.shared.lock().queue.push_back((zeroing, free));
        self.shared.changed.notify_all();
    }

    /// A zeroed segment file to reuse. If none is ready but one is being overwritten, waits for
    /// it (as long as making a new file would take, and the log does not grow); `None` if
    /// there is none to wait for.
    pub(super) fn take(&self) -> Result<Option<PathBuf>, WalError> {
        let mut st = self.shared.lock();
        loop {
            if let Some((path, source)) = st.failed.take() {
                return Err(WalError::Io { path, source });
            }
            if let Some(free) = st.free.pop() {
                return Ok(Some(free));
            }
            if st.queue.is_empty() && !st.busy {
                return Ok(None);
            }
            st = self.shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits until every released segment has been overwritten.
    pub(super) fn wait_idle(&self) -> Result<(), WalError> {
        let mut st = self.shared.lock();
        while !st.queue.is_empty() || st.busy {
            st = self.shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        match st.failed.take() {
            Some((path, source)) => Err(WalError::Io { path, source }),
            None => Ok(()),
        }
    }
}

impl Drop for Recycler {
    /// Finishes overwriting what was released, then stops the thread.
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&self) {
        let mut st = self.lock();
        loop {
            let Some((zeroing, free)) = st.queue.pop_front() else {
                if st.stop {
                    return;
                }
                st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            st.busy = true;
            drop(st);
            let done = zero_file(&zeroing, self.segment_bytes).and_then(|_| std::fs::rename(&zeroing, &free).map_err(io_err(&zeroing))).map(|_| free);
            st = self.lock();
            st.busy = false;
            match done {
                Ok(free) => st.free.push(free),
                Err(WalError::Io { path, source }) => {
                    tracing::error!(segment = %path.display(), error = %source, "overwriting a released raft log segment failed");
                    st.failed = Some((path, source));
                }
                Err(other) => st.failed = Some((zeroing, io::Error::other(other.to_string()))),
            }
            self.changed.notify_all();
        }
    }
}
