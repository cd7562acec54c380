//! The vhost-user-blk device: a [`VhostUserBackend`] whose queues feed the tokio volume client.
//!
//! Path of one request: the guest's kick wakes the queue's kick task on the tokio runtime
//! (the kick eventfd is registered with tokio, not with the vhost-user crate's worker threads,
//! so no thread stands between the guest and the volume client); it pops the chain, parses it
//! ([`super::request`]) and spawns its I/O; the task copies between guest memory and the volume
//! client (one copy each way, as for NBD) and hands the completion to the queue's completer
//! task, which puts every completion waiting into the used ring and then notifies the guest
//! once (EVENT_IDX decides whether it must). Requests run concurrently within and across
//! queues; the virtqueue's size bounds how many a queue has in flight, so nothing here queues
//! without bound.
//!
//! Every request taken from a ring is marked in the inflight area the front end keeps
//! ([`super::inflight`]) until its completion is in the used ring, so a back end started after
//! this one died resubmits exactly what was left in flight.
//!
//! One [`BlkBackend`] serves one front-end connection. When it ends, completions still in
//! flight are dropped instead of written to a used ring the next connection owns (after a
//! reconnect QEMU re-submits what was never completed).

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use std::os::fd::AsRawFd;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk as blk;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{Bytes as _, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier};

use super::inflight::InflightArea;
use super::proto::*;
use super::request::{Desc, Limits, Memory, Op, Parsed, chain_at, gather, parse, scatter, total};
use crate::Volume;

/// The handler's swappable view of guest memory (replaced on VHOST_USER_SET_MEM_TABLE).
pub type AtomicMemory = GuestMemoryAtomic<Memory>;

/// Largest queue the device accepts (the driver picks its size up to this).
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Largest read or write (the same bound NBD clients are given).
pub const MAX_TRANSFER: u64 = crate::nbd::MAX_REQUEST as u64;
/// Segments per discard / write-zeroes request.
const MAX_RANGES: u32 = 32;
/// Largest discard / write-zeroes segment: 1 GiB.
const MAX_RANGE_BYTES: u64 = 1 << 30;
/// Segments per request the driver may use (QEMU's choice for a 256-entry queue).
const SEG_MAX: u32 = 254;
/// How long VHOST_USER_GET_VRING_BASE waits for a queue's requests to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// What every connection to one export shares: the volume and how it is offered.
pub struct Device {
    volume: Volume,
    read_only: bool,
    queues: u16,
    runtime: tokio::runtime::Handle,
    id: [u8; ID_LEN],
    /// The connected front end's back-end channel (VHOST_USER_SET_BACKEND_REQ_FD), through
    /// which the device announces a configuration change; None between connections.
    front_end: Mutex<Option<Backend>>,
}

impl Device {
    /// A device for `volume` with `queues` request queues, running its I/O on `runtime`.
    pub fn new(volume: Volume, read_only: bool, queues: u16, runtime: tokio::runtime::Handle) -> Device {
        // GET_ID answers the volume id: what `basalt volume show` prints, so a guest's
        // /sys/block/vdX/serial names its volume.
        let mut id = [0u8; ID_LEN];
        let text = volume.id().to_string();
        let n = text.len().min(ID_LEN);
        id[..n].copy_from_slice(&text.as_bytes()[..n]);
        Device { volume, read_only, queues: queues.max(1), runtime, id, front_end: Mutex::new(None) }
    }

    /// The volume served.
    pub fn volume(&self) -> &Volume {
        &self.volume
    }

    /// The runtime the device's I/O runs on.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// The configuration space as of now (capacity follows the volume's size).
    pub fn config(&self) -> BlkConfig {
        // An encrypted volume seals whole 4 KiB blocks: smaller writes cost a read-modify-write,
        // so the guest is told its logical block is 4 KiB.
        let blk_size: u32 = if self.volume.is_encrypted() { 4096 } else { 512 };
        let write_ops = !self.read_only;
        let range_sectors = (MAX_RANGE_BYTES / SECTOR) as u32;
        BlkConfig {
            capacity: self.volume.size() / SECTOR,
            size_max: 0,
            seg_max: SEG_MAX,
            blk_size,
            physical_block_exp: (4096 / blk_size).trailing_zeros() as u8,
            min_io_size: (4096 / blk_size) as u16,
            opt_io_size: 0,
            num_queues: self.queues,
            max_discard_sectors: if write_ops { range_sectors } else { 0 },
            max_discard_seg: if write_ops { MAX_RANGES } else { 0 },
            discard_sector_alignment: (4096 / SECTOR) as u32,
            max_write_zeroes_sectors: if write_ops { range_sectors } else { 0 },
            max_write_zeroes_seg: if write_ops { MAX_RANGES } else { 0 },
            write_zeroes_may_unmap: write_ops,
        }
    }

    /// virtio feature bits offered (§5.2.3), plus VHOST_USER_F_PROTOCOL_FEATURES.
    pub fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << blk::VIRTIO_BLK_F_SEG_MAX)
            | (1 << blk::VIRTIO_BLK_F_BLK_SIZE)
            | (1 << blk::VIRTIO_BLK_F_TOPOLOGY)
            | (1 << blk::VIRTIO_BLK_F_FLUSH)
            | (1 << blk::VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            // Dirty-page logging: QEMU migrates a VM only if its vhost back ends log writes.
            | VhostUserVirtioFeatures::LOG_ALL.bits();
        if self.read_only {
            f |= 1 << blk::VIRTIO_BLK_F_RO;
        } else {
            f |= (1 << blk::VIRTIO_BLK_F_DISCARD) | (1 << blk::VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    /// Tells the connected front end the configuration changed (the capacity after a resize):
    /// VHOST_USER_BACKEND_CONFIG_CHANGE_MSG. QEMU re-reads the configuration space and raises
    /// the guest's configuration interrupt (virtio §2.5.1). Blocking: the front end acknowledges
    /// on the same channel. False when no front end is connected or it gave no channel; a
    /// front end connecting later reads the new configuration anyway.
    pub fn announce_config_change(&self) -> Result<bool, io::Error> {
        let Some(channel) = self.front_end.lock().unwrap_or_else(|e| e.into_inner()).clone() else { return Ok(false) };
        channel.handle_config_change().map(|_| true)
    }

    fn limits(&self) -> Limits {
        Limits {
            capacity: self.volume.size(),
            read_only: self.read_only,
            max_transfer: MAX_TRANSFER,
            max_ranges: MAX_RANGES,
            max_range_bytes: MAX_RANGE_BYTES,
        }
    }
}

/// A finished request: its chain's head and the bytes written into its buffers.
#[derive(Clone, Copy, Debug)]
struct Completion {
    head: u16,
    len: u32,
}

/// Per-queue bookkeeping.
#[derive(Default)]
struct QueueState {
    /// Feeds the queue's completer; started at the queue's first kick, dropped at close.
    completions: Mutex<Option<mpsc::Sender<Completion>>>,
    /// Requests popped and not yet in the used ring.
    inflight: Mutex<usize>,
    idle: Condvar,
    /// The task serving this queue's kicks (replaced when the kick or the queue's state changes).
    kicks: Mutex<Option<JoinHandle<()>>>,
    /// Order in which requests were taken from the ring (the inflight area's counter).
    taken: AtomicU64,
    /// Set when the front end hands over an inflight area: the next kick first resubmits
    /// what the area says a previous back end left in flight.
    resubmit: AtomicBool,
}

impl QueueState {
    fn begin(&self, n: usize) {
        *self.inflight.lock().unwrap_or_else(|e| e.into_inner()) += n;
    }

    fn stop_kicks(&self) {
        if let Some(task) = self.kicks.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }

    fn finish(&self, n: usize) {
        let mut count = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        *count = count.saturating_sub(n);
        if *count == 0 {
            self.idle.notify_all();
        }
    }

    /// Waits until nothing of this queue is in flight (or `timeout` passes). True if drained.
    fn drain(&self, timeout: Duration) -> bool {
        let count = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        let (count, _) = self.idle.wait_timeout_while(count, timeout, |n| *n > 0).unwrap_or_else(|e| e.into_inner());
        *count == 0
    }
}

struct Connection {
    device: Arc<Device>,
    mem: Mutex<AtomicMemory>,
    event_idx: AtomicBool,
    queues: Vec<QueueState>,
    /// False once the front end is gone: completions are no longer written to the used ring.
    open: RwLock<bool>,
    /// Malformed chains seen (logged sparingly: a guest can send millions).
    malformed: AtomicU64,
    /// Where requests in flight are marked (VHOST_USER_SET_INFLIGHT_FD), if the front end
    /// keeps one.
    inflight: RwLock<Option<Arc<InflightArea>>>,
}

/// The vhost-user-blk back end of one front-end connection.
#[derive(Clone)]
pub struct BlkBackend {
    conn: Arc<Connection>,
}

impl BlkBackend {
    /// A back end for one connection to `device`, over the handler's guest memory `mem`.
    pub fn new(device: Arc<Device>, mem: AtomicMemory) -> BlkBackend {
        let queues = (0..device.queues).map(|_| QueueState::default()).collect();
        BlkBackend {
            conn: Arc::new(Connection {
                device,
                mem: Mutex::new(mem),
                event_idx: AtomicBool::new(false),
                queues,
                open: RwLock::new(true),
                malformed: AtomicU64::new(0),
                inflight: RwLock::new(None),
            }),
        }
    }

    /// The connection is over: completions still in flight are dropped rather than written
    /// to rings the next connection will own, and the completers end once they drain.
    pub fn close(&self) {
        *self.conn.open.write().unwrap_or_else(|e| e.into_inner()) = false;
        self.conn.device.front_end.lock().unwrap_or_else(|e| e.into_inner()).take();
        for q in &self.conn.queues {
            q.stop_kicks();
            q.completions.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }

    /// Serves a kick of queue `q`: pops and starts every available chain; with EVENT_IDX,
    /// keeps popping until re-enabling notifications finds nothing new (§2.7.10), since a
    /// chain made available in between would otherwise wait for the next kick.
    fn serve_kick(&self, q: usize, vring: &VringRwLock<AtomicMemory>) {
        if self.conn.queues[q].resubmit.swap(false, Ordering::AcqRel) {
            self.resubmit(q, vring);
        }
        if !self.conn.event_idx.load(Ordering::Acquire) {
            self.process_queue(q, vring);
            return;
        }
        loop {
            if let Err(e) = vring.disable_notification() {
                tracing::warn!(queue = q, "vhost-user-blk: {e}");
            }
            self.process_queue(q, vring);
            match vring.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(queue = q, "vhost-user-blk: {e}");
                    break;
                }
            }
        }
    }

    /// Starts the task that serves queue `q`'s kicks on the runtime, in place of any before.
    fn watch_kicks(&self, q: usize, vring: &VringRwLock<AtomicMemory>) -> io::Result<()> {
        let state = &self.conn.queues[q];
        let mut slot = state.kicks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = slot.take() {
            task.abort();
        }
        if !*self.conn.open.read().unwrap_or_else(|e| e.into_inner()) {
            return Ok(());
        }
        // A duplicate of the kick: the vhost-user crate may close its own when the front end
        // replaces it, and this task is then replaced too.
        let Some(kick) = vring.get_ref().get_kick().as_ref().map(EventConsumer::try_clone).transpose()? else { return Ok(()) };
        set_nonblocking(&kick)?;
        let _runtime = self.conn.device.runtime.enter();
        // SAFETY: `kick` owns its descriptor (a File inside) and the AsyncFd owns `kick`, so
        // the descriptor stays open, and the same, for the AsyncFd's whole life.
        let kick = unsafe { AsyncFd::register_with_interest(kick, tokio::io::Interest::READABLE) }?;
        let (backend, vring) = (self.clone(), vring.clone());
        *slot = Some(self.conn.device.runtime.spawn(async move {
            // Kicks that came before this task watched (while the queue was disabled, say).
            backend.serve_kick(q, &vring);
            loop {
                let mut ready = match kick.readable().await {
                    Ok(ready) => ready,
                    Err(e) => {
                        tracing::warn!(volume = backend.conn.device.volume.name(), queue = q, "vhost-user-blk: cannot wait for kicks: {e}");
                        return;
                    }
                };
                // Reading the eventfd resets its count (eventfd(2)); WouldBlock: nothing new.
                match ready.try_io(|kick| kick.get_ref().consume()) {
                    Ok(Ok(())) => backend.serve_kick(q, &vring),
                    Ok(Err(e)) => {
                        tracing::warn!(volume = backend.conn.device.volume.name(), queue = q, "vhost-user-blk: cannot read a kick: {e}");
                        return;
                    }
                    Err(_would_block) => {}
                }
            }
        }));
        Ok(())
    }

    /// Pops every available chain of queue `q` and starts it.
    fn process_queue(&self, q: usize, vring: &VringRwLock<AtomicMemory>) {
        let conn = &self.conn;
        let mem = conn.mem.lock().unwrap_or_else(|e| e.into_inner()).memory();
        let chains: Vec<_> = {
            let mut state = vring.get_mut();
            // A stopped queue (VHOST_USER_GET_VRING_BASE) or a disabled one is not served.
            if !state.get_queue().ready() || !state.is_enabled() {
                return;
            }
            let queue = state.get_queue_mut();
            let chains: Vec<_> = std::iter::from_fn(|| queue.pop_descriptor_chain(mem.clone())).collect();
            // Counted under the ring's lock: a stop that drains the queue sees every chain
            // taken from the ring before it.
            conn.queues[q].begin(chains.len());
            chains
        };
        if chains.is_empty() {
            return;
        }
        let area = conn.inflight.read().unwrap_or_else(|e| e.into_inner()).clone();
        let chains = chains.into_iter().map(|chain| {
            let head = chain.head_index();
            if let Some(area) = &area {
                area.begin(q as u16, head, conn.queues[q].taken.fetch_add(1, Ordering::Relaxed));
            }
            (head, chain.map(|d| Desc { addr: d.addr().0, len: d.len(), writable: d.is_write_only() }).collect())
        });
        self.start(q, vring, chains.collect(), mem.into_inner());
    }

    /// Resubmits what the inflight area says a previous back end took from queue `q` and
    /// never completed, oldest first, and moves the ring past those requests: the front end
    /// rewound it to the used index, and the requests taken number the used entries plus
    /// those in flight (vhost-user spec, "Inflight I/O tracking").
    fn resubmit(&self, q: usize, vring: &VringRwLock<AtomicMemory>) {
        let conn = &self.conn;
        let Some(area) = conn.inflight.read().unwrap_or_else(|e| e.into_inner()).clone() else { return };
        let used = match vring.queue_used_idx() {
            Ok(used) => used,
            Err(e) => {
                tracing::warn!(volume = conn.device.volume.name(), queue = q, "vhost-user-blk: cannot read the used index to resubmit requests: {e}");
                return;
            }
        };
        let (heads, next) = area.recover(q as u16, used);
        conn.queues[q].taken.fetch_max(next, Ordering::Relaxed);
        if heads.is_empty() {
            return;
        }
        let mem = conn.mem.lock().unwrap_or_else(|e| e.into_inner()).memory();
        let (desc_table, size) = {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            queue.set_next_avail(used.wrapping_add(heads.len() as u16));
            queue.set_next_used(used);
            (queue.desc_table(), queue.size())
        };
        conn.queues[q].begin(heads.len());
        tracing::info!(
            volume = conn.device.volume.name(),
            queue = q,
            requests = heads.len(),
            "vhost-user-blk: resubmitting requests a previous back end left in flight"
        );
        let chains = heads
            .into_iter()
            .map(|head| {
                let descs = chain_at(&mem, desc_table, size, head).unwrap_or_else(|reason| {
                    self.log_malformed(q, &format!("in-flight request {head}: {reason}"));
                    Vec::new()
                });
                (head, descs)
            })
            .collect();
        self.start(q, vring, chains, mem.into_inner());
    }

    /// Parses chains taken from queue `q` (already counted in flight) and starts their I/O.
    fn start(&self, q: usize, vring: &VringRwLock<AtomicMemory>, chains: Vec<(u16, Vec<Desc>)>, mem: Arc<Memory>) {
        let conn = &self.conn;
        let Some(tx) = self.completer(q, vring) else {
            conn.queues[q].finish(chains.len());
            return;
        };
        let limits = conn.device.limits();
        let mut requests = Vec::with_capacity(chains.len());
        for (head, descs) in chains {
            match parse(&descs, &mem, &limits) {
                Parsed::Request(req) => requests.push((head, req)),
                Parsed::Fail { status, code, reason } => {
                    self.log_malformed(q, &reason);
                    let _ = mem.write_obj(code, GuestAddress(status));
                    // Never full: at most a queue's worth of completions exist at once.
                    let _ = tx.try_send(Completion { head, len: 1 });
                }
                Parsed::NoStatus { reason } => {
                    self.log_malformed(q, &reason);
                    let _ = tx.try_send(Completion { head, len: 0 });
                }
            }
        }
        if requests.is_empty() {
            return;
        }
        let device = conn.device.clone();
        let start = move || {
            for (head, req) in requests {
                let (device, mem, tx) = (device.clone(), mem.clone(), tx.clone());
                tokio::spawn(async move {
                    let (code, written) = execute(&device, &mem, req.op).await;
                    // The status location was checked at parse time.
                    let _ = mem.write_obj(code, GuestAddress(req.status));
                    let _ = tx.send(Completion { head, len: written.saturating_add(1) }).await;
                });
            }
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // The kick task: spawns from inside the runtime are local and cheap.
            start();
        } else {
            // The crate's worker thread (a kick tokio could not register) or a test calling
            // `handle_event`: one hand-over to the runtime for the whole batch, since each
            // spawn from outside the runtime can wake one of its threads.
            conn.device.runtime.spawn(async move { start() });
        }
    }

    fn log_malformed(&self, q: usize, reason: &str) {
        let n = self.conn.malformed.fetch_add(1, Ordering::Relaxed);
        if n < 16 || n.is_power_of_two() {
            tracing::warn!(volume = self.conn.device.volume.name(), queue = q, seen = n + 1, "vhost-user-blk: malformed request: {reason}");
        }
    }

    /// The sender of queue `q`'s completer, starting it on first use (None once closed).
    fn completer(&self, q: usize, vring: &VringRwLock<AtomicMemory>) -> Option<mpsc::Sender<Completion>> {
        if !*self.conn.open.read().unwrap_or_else(|e| e.into_inner()) {
            return None;
        }
        let mut slot = self.conn.queues[q].completions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = slot.as_ref() {
            return Some(tx.clone());
        }
        let (tx, rx) = mpsc::channel(MAX_QUEUE_SIZE);
        *slot = Some(tx.clone());
        self.conn.device.runtime.spawn(complete(self.conn.clone(), q, vring.clone(), rx));
        Some(tx)
    }
}

/// Puts completions into queue `q`'s used ring in batches: all that are waiting, then one
/// notification if the driver asked for it (EVENT_IDX, §2.7.10).
async fn complete(conn: Arc<Connection>, q: usize, vring: VringRwLock<AtomicMemory>, mut rx: mpsc::Receiver<Completion>) {
    let mut batch = Vec::with_capacity(64);
    while rx.recv_many(&mut batch, MAX_QUEUE_SIZE).await > 0 {
        {
            let open = conn.open.read().unwrap_or_else(|e| e.into_inner());
            if *open {
                let area = conn.inflight.read().unwrap_or_else(|e| e.into_inner()).clone();
                for c in &batch {
                    if let Some(area) = &area {
                        area.completing(q as u16, c.head);
                    }
                    if let Err(e) = vring.add_used(c.head, c.len) {
                        tracing::warn!(volume = conn.device.volume.name(), queue = q, "vhost-user-blk: cannot complete request {}: {e}", c.head);
                    } else if let Some(area) = &area {
                        area.completed(q as u16, c.head, vring.get_ref().get_queue().next_used());
                    }
                }
                let notify = vring.needs_notification().unwrap_or(true);
                if notify && let Err(e) = vring.signal_used_queue() {
                    tracing::debug!(queue = q, "vhost-user-blk: cannot notify the guest: {e}");
                }
            }
        }
        conn.queues[q].finish(batch.len());
        batch.clear();
    }
}

/// Carries out one request against the volume. Returns the status and the data bytes written
/// into the guest's buffers.
async fn execute(device: &Device, mem: &Memory, op: Op) -> (u8, u32) {
    let volume = &device.volume;
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        tracing::warn!(volume = volume.name(), "vhost-user-blk: {what} failed: {e}");
        (S_IOERR, 0)
    };
    match op {
        Op::Read { offset, len, into } => {
            if len == 0 {
                return (S_OK, 0);
            }
            match volume.read(offset, len).await {
                Ok(data) if scatter(mem, &into, &data) => (S_OK, len as u32),
                Ok(_) => (S_IOERR, 0),
                Err(e) => failed(&format!("read of {len} bytes at {offset}"), &e),
            }
        }
        Op::Write { offset, len, from } => {
            let mut buf = vec![0u8; len as usize];
            if !gather(mem, &from, 0, &mut buf) {
                return (S_IOERR, 0);
            }
            match volume.write(offset, Bytes::from(buf), false).await {
                Ok(()) => (S_OK, 0),
                Err(e) => failed(&format!("write of {len} bytes at {offset}"), &e),
            }
        }
        Op::Flush => match volume.flush().await {
            Ok(()) => (S_OK, 0),
            Err(e) => failed("flush", &e),
        },
        Op::GetId { into } => {
            let n = total(&into) as usize;
            if scatter(mem, &into, &device.id[..n]) { (S_OK, n as u32) } else { (S_IOERR, 0) }
        }
        Op::Discard(ranges) | Op::WriteZeroes(ranges) => {
            for r in ranges {
                // Unmapped ranges give their space back; the others stay allocated (NO_HOLE).
                if let Err(e) = volume.write_zeroes(r.offset, r.len, !r.unmap).await {
                    return failed(&format!("zeroing {} bytes at {}", r.len, r.offset), &e);
                }
            }
            (S_OK, 0)
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = VringRwLock<AtomicMemory>;

    fn num_queues(&self) -> usize {
        usize::from(self.conn.device.queues)
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.conn.device.features()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD
            // The back-end channel: how a resize reaches a running guest.
            | VhostUserProtocolFeatures::BACKEND_REQ
            // Requests in flight survive this process: resubmitted after a restart.
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
    }

    fn get_inflight_fd(&self, info: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        let (area, file, size) = InflightArea::create(info.num_queues, info.queue_size).map_err(io::Error::other)?;
        *self.conn.inflight.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(area));
        Ok((VhostUserInflight::new(size, 0, info.num_queues, info.queue_size), file))
    }

    fn set_inflight_fd(&self, info: &VhostUserInflight, file: File) -> io::Result<()> {
        let area = InflightArea::open(file, info.mmap_offset, info.mmap_size, info.num_queues, info.queue_size).map_err(|e| {
            tracing::warn!(volume = self.conn.device.volume.name(), "vhost-user-blk: refusing the front end's inflight area: {e}");
            io::Error::other(e)
        })?;
        tracing::info!(
            volume = self.conn.device.volume.name(),
            queues = area.queues(),
            queue_size = area.queue_size(),
            "vhost-user-blk: requests in flight are tracked in the front end's inflight area"
        );
        *self.conn.inflight.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(area));
        for q in &self.conn.queues {
            q.resubmit.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn set_backend_req_fd(&self, channel: Backend) {
        *self.conn.device.front_end.lock().unwrap_or_else(|e| e.into_inner()) = Some(channel);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.conn.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.conn.device.config().read(offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Nothing in the configuration is driver-writable (no CONFIG_WCE).
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "the virtio-blk configuration is read-only"))
    }

    fn update_memory(&self, mem: AtomicMemory) -> io::Result<()> {
        *self.conn.mem.lock().unwrap_or_else(|e| e.into_inner()) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // Kicks are served on the runtime (`watch_kick`); the crate's one worker thread only
        // serves what the crate itself hands to `handle_event`.
        vec![(0..self.conn.device.queues).fold(0u64, |mask, q| mask | 1 << q)]
    }

    fn watch_kick(&self, index: u16, vring: &Self::Vring, active: bool) -> bool {
        let q = usize::from(index);
        let Some(state) = self.conn.queues.get(q) else { return false };
        if !active {
            state.stop_kicks();
            return true;
        }
        match self.watch_kicks(q, vring) {
            Ok(()) => true,
            Err(e) => {
                // The crate's worker thread serves this queue instead (one more thread hop).
                tracing::warn!(volume = self.conn.device.volume.name(), queue = q, "vhost-user-blk: serving kicks on the crate's thread: {e}");
                false
            }
        }
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Lets the handler stop its worker threads when the connection ends.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE (a stop, a migration): every request taken from the ring must be in
        // the used ring before the front end reads the ring's position.
        if let Some(q) = self.conn.queues.get(queue_index as usize)
            && !q.drain(DRAIN_TIMEOUT)
        {
            return Err(io::Error::new(io::ErrorKind::TimedOut, format!("queue {queue_index}: requests still in flight after {DRAIN_TIMEOUT:?}")));
        }
        Ok(())
    }

    fn handle_event(&self, device_event: u16, evset: EventSet, vrings: &[Self::Vring], _thread_id: usize) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let q = usize::from(device_event);
        if let Some(vring) = vrings.get(q) {
            self.serve_kick(q, vring);
        }
        Ok(())
    }
}

/// Makes `kick` non-blocking: a wake-up with nothing to read must never block a runtime thread.
fn set_nonblocking(kick: &EventConsumer) -> io::Result<()> {
    let fd = kick.as_raw_fd();
    // SAFETY: fcntl on a descriptor `kick` owns for the duration of the call; no memory is
    // passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
