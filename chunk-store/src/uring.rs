//! The disk I/O engine: one dedicated thread that owns an io_uring instance.
//!
//! Async callers hand it reads, writes and syncs over a bounded channel and await a oneshot
//! reply; the thread keeps up to `queue_depth` operations in flight on the ring. When idle it
//! sleeps in `io_uring_enter` waiting on an eventfd that senders poke, so an idle node burns no
//! CPU on disk polling (Mayastor's mistake).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use io_uring::{IoUring, opcode, squeue, types};
use tokio::sync::{mpsc, oneshot};

use crate::aligned::AlignedBuf;

/// One disk operation.
#[derive(Debug)]
pub enum IoOp {
    /// Fill `buf` from `offset`.
    Read {
        /// Byte offset in the file (aligned).
        offset: u64,
        /// Destination buffer; its length is the read length.
        buf: AlignedBuf,
    },
    /// Write all of `buf` at `offset`.
    Write {
        /// Byte offset in the file (aligned).
        offset: u64,
        /// Source buffer; its length is the write length.
        buf: AlignedBuf,
    },
    /// fdatasync the file.
    Sync,
}

/// What a finished operation hands back: its result and the buffer, if it had one.
pub type IoReply = (io::Result<()>, Option<AlignedBuf>);

struct Request {
    file: Arc<File>,
    op: IoOp,
    reply: oneshot::Sender<IoReply>,
}

struct InFlight {
    req: Request,
    done: usize,
}

const WAKE_TOKEN: u64 = u64::MAX;

/// Handle to the ring thread. Dropping it lets queued work finish, then stops the thread.
pub struct Uring {
    tx: Option<mpsc::Sender<Request>>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl Uring {
    /// Starts the ring thread with `queue_depth` operations in flight at most.
    pub fn start(queue_depth: u32, name: &str) -> io::Result<Self> {
        let queue_depth = queue_depth.clamp(4, 4096);
        // One extra slot for the eventfd read that wakes the thread.
        let ring = IoUring::new((queue_depth + 1).next_power_of_two())?;
        // SAFETY: eventfd returns a new descriptor or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor we own.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let (tx, rx) = mpsc::channel(queue_depth as usize * 2);
        let thread_wake = wake.clone();
        let thread = std::thread::Builder::new().name(format!("uring-{name}")).spawn(move || run(ring, rx, thread_wake, queue_depth as usize))?;
        Ok(Self { tx: Some(tx), wake, thread: Some(thread) })
    }

    /// Submits one operation and waits for it. Waits for queue space when the ring is busy
    /// (backpressure), never blocks the executor.
    pub async fn submit(&self, file: Arc<File>, op: IoOp) -> IoReply {
        let (reply, rx) = oneshot::channel();
        let Some(tx) = &self.tx else {
            return (Err(io::Error::other("io_uring engine stopped")), None);
        };
        if tx.send(Request { file, op, reply }).await.is_err() {
            return (Err(io::Error::other("io_uring engine stopped")), None);
        }
        poke(self.wake.as_raw_fd());
        rx.await.unwrap_or_else(|_| (Err(io::Error::other("io_uring engine stopped")), None))
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, file: Arc<File>, offset: u64, len: usize) -> io::Result<AlignedBuf> {
        let (res, buf) = self.submit(file, IoOp::Read { offset, buf: AlignedBuf::zeroed(len) }).await;
        res?;
        buf.ok_or_else(|| io::Error::other("io_uring read returned no buffer"))
    }

    /// Writes `buf` at `offset`.
    pub async fn write(&self, file: Arc<File>, offset: u64, buf: AlignedBuf) -> io::Result<()> {
        self.submit(file, IoOp::Write { offset, buf }).await.0
    }

    /// fdatasync.
    pub async fn sync(&self, file: Arc<File>) -> io::Result<()> {
        self.submit(file, IoOp::Sync).await.0
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        self.tx = None;
        poke(self.wake.as_raw_fd());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn poke(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writing 8 bytes from a valid u64 to an eventfd.
    unsafe {
        libc::write(fd, (&one as *const u64).cast(), 8);
    }
}

fn sqe_for(slot: usize, inflight: &mut InFlight) -> squeue::Entry {
    let fd = types::Fd(inflight.req.file.as_raw_fd());
    let done = inflight.done;
    match &mut inflight.req.op {
        IoOp::Read { offset, buf } => {
            let len = buf.len() - done;
            // SAFETY: pointer stays valid: the buffer is owned by the in-flight table until the
            // completion for this slot is reaped.
            let ptr = unsafe { buf.as_mut_ptr().add(done) };
            opcode::Read::new(fd, ptr, len as u32).offset(*offset + done as u64).build().user_data(slot as u64)
        }
        IoOp::Write { offset, buf } => {
            let len = buf.len() - done;
            // SAFETY: as above.
            let ptr = unsafe { buf.as_ptr().add(done) };
            opcode::Write::new(fd, ptr, len as u32).offset(*offset + done as u64).build().user_data(slot as u64)
        }
        IoOp::Sync => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build().user_data(slot as u64),
    }
}

fn finish(inflight: InFlight, result: io::Result<()>) {
    let buf = match inflight.req.op {
        IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => Some(buf),
        IoOp::Sync => None,
    };
    let _ = inflight.req.reply.send((result, buf));
}

fn run(mut ring: IoUring, mut rx: mpsc::Receiver<Request>, wake: Arc<OwnedFd>, depth: usize) {
    let mut slots: Vec<Option<InFlight>> = (0..depth).map(|_| None).collect();
    let mut free: Vec<usize> = (0..depth).rev().collect();
    let mut wake_buf = Box::new([0u8; 8]);
    let mut wake_armed = false;
    let mut closed = false;

    loop {
        // Take new work while there is room on the ring.
        while !closed && !free.is_empty() {
            match rx.try_recv() {
                Ok(req) => {
                    let slot = free.pop().expect("checked non-empty");
                    let mut inflight = InFlight { req, done: 0 };
                    let sqe = sqe_for(slot, &mut inflight);
                    slots[slot] = Some(inflight);
                    // SAFETY: the SQE's buffer lives in `slots` until completion.
                    if unsafe { ring.submission().push(&sqe) }.is_err() {
                        let _ = ring.submit();
                        // SAFETY: as above; the queue was just drained by submit.
                        let _ = unsafe { ring.submission().push(&sqe) };
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => closed = true,
            }
        }
        let busy = free.len() < depth;
        if closed && !busy {
            return;
        }
        if !wake_armed && !closed {
            let sqe = opcode::Read::new(types::Fd(wake.as_raw_fd()), wake_buf.as_mut_ptr(), 8).build().user_data(WAKE_TOKEN);
            // SAFETY: wake_buf outlives the ring (declared before use, dropped after return).
            if unsafe { ring.submission().push(&sqe) }.is_ok() {
                wake_armed = true;
            }
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EAGAIN) {
                continue;
            }
            tracing::error!(error = %e, "io_uring_enter failed; failing in-flight I/O");
            for slot in slots.iter_mut() {
                if let Some(inflight) = slot.take() {
                    finish(inflight, Err(io::Error::new(e.kind(), e.to_string())));
                }
            }
            return;
        }
        let completions: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (token, res) in completions {
            if token == WAKE_TOKEN {
                wake_armed = false;
                continue;
            }
            let slot = token as usize;
            let Some(mut inflight) = slots[slot].take() else { continue };
            if res < 0 {
                let errno = -res;
                if errno == libc::EINTR || errno == libc::EAGAIN {
                    let sqe = sqe_for(slot, &mut inflight);
                    slots[slot] = Some(inflight);
                    // SAFETY: buffer owned by `slots`.
                    let _ = unsafe { ring.submission().push(&sqe) };
                    continue;
                }
                free.push(slot);
                finish(inflight, Err(io::Error::from_raw_os_error(errno)));
                continue;
            }
            let total = match &inflight.req.op {
                IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => buf.len(),
                IoOp::Sync => 0,
            };
            inflight.done += res as usize;
            if inflight.done < total {
                if res == 0 {
                    free.push(slot);
                    finish(inflight, Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short I/O past end of data file")));
                    continue;
                }
                // Short transfer: resubmit the rest.
                let sqe = sqe_for(slot, &mut inflight);
                slots[slot] = Some(inflight);
                // SAFETY: buffer owned by `slots`.
                let _ = unsafe { ring.submission().push(&sqe) };
                continue;
            }
            free.push(slot);
            finish(inflight, Ok(()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    #[tokio::test]
    async fn write_read_sync_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).custom_flags(libc::O_DIRECT).open(&path).unwrap();
        file.set_len(1 << 20).unwrap();
        let file = Arc::new(file);
        let ring = Uring::start(16, "test").unwrap();
        let mut tasks = Vec::new();
        let ring = Arc::new(ring);
        for i in 0..64u64 {
            let ring = ring.clone();
            let file = file.clone();
            tasks.push(tokio::spawn(async move {
                let buf = AlignedBuf::from_slice(&[i as u8; 4096]);
                ring.write(file.clone(), i * 4096, buf).await.unwrap();
                let back = ring.read(file, i * 4096, 4096).await.unwrap();
                assert!(back.as_slice().iter().all(|b| *b == i as u8));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        ring.sync(file.clone()).await.unwrap();
        // Reading past the end reports an error instead of hanging or returning garbage.
        let err = ring.read(file, 2 << 20, 4096).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
