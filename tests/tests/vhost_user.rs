//! The vhost-user-blk device driven the way a guest drives it, without a VMM: the test plays
//! the driver, laying out a split virtqueue in guest memory it owns, posting crafted descriptor
//! chains and kicking the device (`handle_event`), against a volume on a real cluster. Every
//! malformed chain fails alone with VIRTIO_BLK_S_IOERR / UNSUPP; the device keeps serving.

use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_tests::TestCluster;
use basalt_volume_client::vhost_user::backend::{AtomicMemory, BlkBackend, Device};
use basalt_volume_client::vhost_user::proto::*;
use basalt_volume_client::vhost_user::request::Memory;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

const QUEUE: u16 = 256;
const DESC_TABLE: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const MEM_SIZE: u64 = 8 << 20;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// One descriptor as the driver writes it.
#[derive(Clone, Copy)]
struct D {
    addr: u64,
    len: u32,
    write: bool,
}

fn ro(addr: u64, len: u32) -> D {
    D { addr, len, write: false }
}

fn wr(addr: u64, len: u32) -> D {
    D { addr, len, write: true }
}

/// The driver side of one split virtqueue (virtio 1.2 §2.7).
struct Driver {
    mem: AtomicMemory,
    vring: VringRwLock<AtomicMemory>,
    backend: BlkBackend,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    fn new(device: Arc<Device>) -> Driver {
        let mem = GuestMemoryAtomic::new(Memory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap());
        let vring = VringRwLock::new(mem.clone(), QUEUE).unwrap();
        vring.set_queue_size(QUEUE);
        vring.set_queue_info(DESC_TABLE, AVAIL, USED).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let backend = BlkBackend::new(device, mem.clone());
        backend.set_event_idx(false);
        Driver { mem, vring, backend, next_desc: 0, avail_idx: 0, used_seen: 0 }
    }

    fn m(&self) -> impl std::ops::Deref<Target = Memory> {
        self.mem.memory()
    }

    fn header(&self, at: u64, kind: u32, sector: u64) -> D {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.m().write_slice(&h, GuestAddress(at)).unwrap();
        ro(at, 16)
    }

    /// Writes `descs` into the descriptor table as one chain; returns its head.
    fn write_chain(&mut self, descs: &[D]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let idx = self.next_desc;
            self.next_desc = (self.next_desc + 1) % QUEUE;
            let last = i + 1 == descs.len();
            let flags = if last { 0 } else { F_NEXT } | if d.write { F_WRITE } else { 0 };
            self.put_desc(DESC_TABLE + 16 * u64::from(idx), d.addr, d.len, flags, self.next_desc);
        }
        head
    }

    fn put_desc(&self, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let m = self.m();
        m.write_obj(addr, GuestAddress(at)).unwrap();
        m.write_obj(len, GuestAddress(at + 8)).unwrap();
        m.write_obj(flags, GuestAddress(at + 12)).unwrap();
        m.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// A 4 KiB write of block `i` filled with `i + 1`, from its own buffer at 0x100000 + 8 KiB·i:
    /// writes the data and the chain, returns its head (not yet available).
    fn write_block(&mut self, i: u64) -> u16 {
        let base = 0x100000 + i * 0x2000;
        self.m().write_slice(&[i as u8 + 1; 4096], GuestAddress(base)).unwrap();
        let h = self.header(base + 0x1000, T_OUT, i * 8);
        self.write_chain(&[h, ro(base, 4096), wr(base + 0x1100, 1)])
    }

    /// Makes chain `head` available (§2.7.13).
    fn post(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QUEUE);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let m = self.m();
        m.write_obj(head, GuestAddress(slot)).unwrap();
        m.write_obj(self.avail_idx, GuestAddress(AVAIL + 2)).unwrap();
    }

    /// Posts one chain, kicks, and waits for it to be used: (used length, status byte).
    async fn submit(&mut self, descs: &[D]) -> (u32, u8) {
        let head = self.write_chain(descs);
        self.post(head);
        let (id, len) = self.kick_and_wait().await;
        assert_eq!(id, u32::from(head));
        let last = descs.last().unwrap();
        let status = if last.write && last.len > 0 && last.addr + u64::from(last.len) <= MEM_SIZE {
            self.m().read_obj::<u8>(GuestAddress(last.addr + u64::from(last.len) - 1)).unwrap()
        } else {
            0xff
        };
        (len, status)
    }

    async fn kick_and_wait(&mut self) -> (u32, u32) {
        self.backend.handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let used: u16 = self.m().read_obj(GuestAddress(USED + 2)).unwrap();
            if used != self.used_seen {
                let at = USED + 4 + 8 * u64::from(self.used_seen % QUEUE);
                self.used_seen = self.used_seen.wrapping_add(1);
                let id: u32 = self.m().read_obj(GuestAddress(at)).unwrap();
                let len: u32 = self.m().read_obj(GuestAddress(at + 4)).unwrap();
                return (id, len);
            }
            assert!(Instant::now() < deadline, "the device never completed the request");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Volume `vu` attached read-write, and a one-queue device over it.
async fn attached_device(cluster: &TestCluster) -> (basalt_volume_client::Volume, Arc<Device>) {
    let client = cluster.client().await.unwrap();
    let volume = client.attach_volume("vu", "vhost-user-test", false).await.unwrap();
    let device = Arc::new(Device::new(volume.clone(), false, 1, tokio::runtime::Handle::current()));
    (volume, device)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_chains_against_a_real_volume() {
    let cluster = TestCluster::with_volume("vu", 16 << 20).await.unwrap();
    let (volume, device) = attached_device(&cluster).await;
    let config = device.config();
    assert_eq!(config.capacity, (16 << 20) / 512);
    assert_eq!(config.num_queues, 1);
    let mut drv = Driver::new(device);

    // A write and a read back, the data split over several descriptors.
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    drv.m().write_slice(&pattern, GuestAddress(0x10000)).unwrap();
    let h = drv.header(0x8000, T_OUT, 16);
    assert_eq!(drv.submit(&[h, ro(0x10000, 4096), ro(0x11000, 4096), wr(0x9000, 1)]).await, (1, S_OK));
    let h = drv.header(0x8000, T_IN, 16);
    assert_eq!(drv.submit(&[h, wr(0x20000, 512), wr(0x20200, 7680), wr(0x9000, 1)]).await, (8193, S_OK));
    let mut back = vec![0u8; 8192];
    drv.m().read_slice(&mut back, GuestAddress(0x20000)).unwrap();
    assert!(back == pattern, "read back differs");
    assert_eq!(&volume.read(16 * 512, 8192).await.unwrap()[..], &pattern[..], "not in the volume");

    // The same read through an indirect descriptor table (§2.7.5.3).
    drv.put_desc(0x7000, 0x8000, 16, F_NEXT, 1);
    drv.put_desc(0x7010, 0x30000, 8192, F_NEXT | F_WRITE, 2);
    drv.put_desc(0x7020, 0x9000, 1, F_WRITE, 0);
    let head = drv.next_desc;
    drv.next_desc += 1;
    drv.put_desc(DESC_TABLE + 16 * u64::from(head), 0x7000, 48, F_INDIRECT, 0);
    drv.post(head);
    assert_eq!(drv.kick_and_wait().await, (u32::from(head), 8193));
    drv.m().read_slice(&mut back, GuestAddress(0x30000)).unwrap();
    assert!(back == pattern, "indirect read differs");

    // Flush, GET_ID (the volume id), discard and write-zeroes.
    let h = drv.header(0x8000, T_FLUSH, 0);
    assert_eq!(drv.submit(&[h, wr(0x9000, 1)]).await, (1, S_OK));
    let h = drv.header(0x8000, T_GET_ID, 0);
    assert_eq!(drv.submit(&[h, wr(0x40000, 20), wr(0x9000, 1)]).await, (21, S_OK));
    let mut id = [0u8; 20];
    drv.m().read_slice(&mut id, GuestAddress(0x40000)).unwrap();
    let expected = volume.id().to_string();
    let n = expected.len().min(20);
    assert_eq!(&id[..n], &expected.as_bytes()[..n]);
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&16u64.to_le_bytes());
    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
    drv.m().write_slice(&seg, GuestAddress(0x50000)).unwrap();
    let h = drv.header(0x8000, T_DISCARD, 0);
    assert_eq!(drv.submit(&[h, ro(0x50000, 16), wr(0x9000, 1)]).await, (1, S_OK));
    assert!(volume.read(16 * 512, 4096).await.unwrap().iter().all(|b| *b == 0), "discarded range reads as zeros");
    assert_eq!(&volume.read(24 * 512, 4096).await.unwrap()[..], &pattern[4096..], "discard went past its range");
    seg[0..8].copy_from_slice(&24u64.to_le_bytes());
    seg[12..16].copy_from_slice(&WRITE_ZEROES_FLAG_UNMAP.to_le_bytes());
    drv.m().write_slice(&seg, GuestAddress(0x50000)).unwrap();
    let h = drv.header(0x8000, T_WRITE_ZEROES, 0);
    assert_eq!(drv.submit(&[h, ro(0x50000, 16), wr(0x9000, 1)]).await, (1, S_OK));
    assert!(volume.read(16 * 512, 8192).await.unwrap().iter().all(|b| *b == 0), "write-zeroes");

    // Malformed chains: each fails alone.
    let before = volume.read(0, 65536).await.unwrap();
    // Bad lengths: a short header, a read that is not whole sectors, past the end of the volume.
    assert_eq!(drv.submit(&[ro(0x8000, 8), wr(0x9000, 1)]).await, (1, S_IOERR));
    let h = drv.header(0x8000, T_IN, 0);
    assert_eq!(drv.submit(&[h, wr(0x20000, 100), wr(0x9000, 1)]).await, (1, S_IOERR));
    let h = drv.header(0x8000, T_IN, (16 << 20) / 512);
    assert_eq!(drv.submit(&[h, wr(0x20000, 512), wr(0x9000, 1)]).await, (1, S_IOERR));
    let h = drv.header(0x8000, T_OUT, u64::MAX / 2);
    assert_eq!(drv.submit(&[h, ro(0x10000, 512), wr(0x9000, 1)]).await, (1, S_IOERR));
    // A read into a buffer the driver marked device-readable (the device must not write it).
    let h = drv.header(0x8000, T_IN, 0);
    drv.m().write_slice(&[0xAB; 512], GuestAddress(0x60000)).unwrap();
    assert_eq!(drv.submit(&[h, ro(0x60000, 512), wr(0x9000, 1)]).await, (1, S_IOERR));
    let mut untouched = [0u8; 512];
    drv.m().read_slice(&mut untouched, GuestAddress(0x60000)).unwrap();
    assert!(untouched.iter().all(|b| *b == 0xAB), "the device wrote a device-readable buffer");
    // A write whose data the device would have to read from a device-writable buffer.
    let h = drv.header(0x8000, T_OUT, 0);
    assert_eq!(drv.submit(&[h, wr(0x10000, 512), wr(0x9000, 1)]).await, (1, S_IOERR));
    // Addresses outside guest memory: data, and the header itself.
    let h = drv.header(0x8000, T_IN, 0);
    assert_eq!(drv.submit(&[h, wr(MEM_SIZE - 256, 512), wr(0x9000, 1)]).await, (1, S_IOERR));
    assert_eq!(drv.submit(&[ro(MEM_SIZE + 0x1000, 16), wr(0x9000, 1)]).await, (1, S_IOERR));
    let h = drv.header(0x8000, T_OUT, 0);
    assert_eq!(drv.submit(&[h, ro(u64::MAX - 100, 512), wr(0x9000, 1)]).await, (1, S_IOERR));
    // Unknown request type.
    let h = drv.header(0x8000, 0x77, 0);
    assert_eq!(drv.submit(&[h, wr(0x9000, 1)]).await, (1, S_UNSUPP));
    // No status byte at all (nothing writable, or the status outside guest memory): returned
    // with nothing written.
    let h = drv.header(0x8000, T_FLUSH, 0);
    assert_eq!(drv.submit(&[h]).await.0, 0);
    let h = drv.header(0x8000, T_FLUSH, 0);
    assert_eq!(drv.submit(&[h, wr(MEM_SIZE + 10, 1)]).await.0, 0);
    assert!(volume.read(0, 65536).await.unwrap() == before, "a refused request changed the volume");

    // The device still serves after all that.
    let h = drv.header(0x8000, T_IN, 24);
    assert_eq!(drv.submit(&[h, wr(0x20000, 4096), wr(0x9000, 1)]).await, (4097, S_OK));

    // A read-only device refuses writes, discards and write-zeroes, and still reads.
    let ro_device = Arc::new(Device::new(volume.clone(), true, 1, tokio::runtime::Handle::current()));
    assert_eq!(ro_device.config().max_discard_sectors, 0);
    let mut ro_drv = Driver::new(ro_device);
    let h = ro_drv.header(0x8000, T_OUT, 0);
    assert_eq!(ro_drv.submit(&[h, ro(0x10000, 512), wr(0x9000, 1)]).await, (1, S_IOERR));
    let h = ro_drv.header(0x8000, T_DISCARD, 0);
    assert_eq!(ro_drv.submit(&[h, ro(0x50000, 16), wr(0x9000, 1)]).await, (1, S_IOERR));
    let h = ro_drv.header(0x8000, T_IN, 0);
    assert_eq!(ro_drv.submit(&[h, wr(0x20000, 512), wr(0x9000, 1)]).await, (513, S_OK));
    assert!(volume.read(0, 65536).await.unwrap() == before, "the read-only device changed the volume");
}

/// Many requests posted at once complete, out of order if they like, each exactly once, and
/// GET_VRING_BASE's drain (`stop_vring`) returns only once every one is in the used ring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_complete_once_and_stop_drains() {
    let cluster = TestCluster::with_volume("vu", 16 << 20).await.unwrap();
    let (volume, device) = attached_device(&cluster).await;
    let mut drv = Driver::new(device);
    let n = 64u16;
    let mut heads = Vec::new();
    for i in 0..n {
        let head = drv.write_block(u64::from(i));
        drv.post(head);
        heads.push(head);
    }
    drv.backend.handle_event(0, EventSet::IN, std::slice::from_ref(&drv.vring), 0).unwrap();
    // Blocks (on a thread of its own, as the vhost-user handler does) until all are used.
    let backend = drv.backend.clone();
    tokio::task::spawn_blocking(move || backend.stop_vring(0)).await.unwrap().unwrap();
    let used: u16 = drv.m().read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used, n, "stop_vring returned before every request was in the used ring");
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..n {
        let id: u32 = drv.m().read_obj(GuestAddress(USED + 4 + 8 * u64::from(i))).unwrap();
        assert!(seen.insert(id), "request {id} completed twice");
    }
    assert_eq!(seen, heads.iter().map(|h| u32::from(*h)).collect());
    for i in 0..n {
        let data = volume.read(u64::from(i) * 4096, 4096).await.unwrap();
        assert!(data.iter().all(|b| *b == i as u8 + 1), "block {i}");
    }
}

/// Kicks served on the runtime (`watch_kick`), as with a VMM: the guest's kick is an eventfd
/// write; the device serves it without any call from the test. A stopped queue is not served;
/// watching it again serves what became available meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kicks_are_served_on_the_runtime_and_a_stopped_queue_is_not() {
    use std::os::fd::{FromRawFd, IntoRawFd};
    use vmm_sys_util::event::{EventFlag, new_event_consumer_and_notifier};

    let cluster = TestCluster::with_volume("vu", 16 << 20).await.unwrap();
    let (volume, device) = attached_device(&cluster).await;
    let mut drv = Driver::new(device);
    let (consumer, kick) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).unwrap();
    // SAFETY: the descriptor comes straight from `consumer`, which gives up ownership of it.
    drv.vring.set_kick(Some(unsafe { std::fs::File::from_raw_fd(consumer.into_raw_fd()) }));
    let vring = drv.vring.clone();
    let backend = drv.backend.clone();
    let on = |active: bool| {
        let (backend, vring) = (backend.clone(), vring.clone());
        // The vhost-user message thread offers the kick, outside the runtime.
        std::thread::spawn(move || backend.watch_kick(0, &vring, active)).join().unwrap()
    };
    assert!(on(true), "the device did not take the kick");

    let write = |drv: &mut Driver, i: u64| {
        let head = drv.write_block(i);
        drv.post(head);
    };
    for i in 0..4 {
        write(&mut drv, i);
    }
    kick.notify().unwrap();
    wait_used(&drv, 4).await;

    // Stopped (VHOST_USER_GET_VRING_BASE marks the queue not ready and the crate withdraws the
    // kick): a kick now is not served.
    drv.vring.set_queue_ready(false);
    assert!(on(false));
    write(&mut drv, 4);
    kick.notify().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(used(&drv), 4, "a stopped queue was served");

    // Started again: what is available is served at once, before any new kick.
    drv.vring.set_queue_ready(true);
    assert!(on(true));
    wait_used(&drv, 5).await;
    for i in 0..5u64 {
        let data = volume.read(i * 4096, 4096).await.unwrap();
        assert!(data.iter().all(|b| *b == i as u8 + 1), "block {i}");
    }
    drv.backend.close();
}

fn used(drv: &Driver) -> u16 {
    drv.m().read_obj::<u16>(GuestAddress(USED + 2)).unwrap()
}

/// Waits (20 s at most) until the used ring's index is `n`.
async fn wait_used(drv: &Driver, n: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while used(drv) != n {
        assert!(Instant::now() < deadline, "kicked requests were not served: {} of {n} used", used(drv));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A back end that died with requests in flight, completed out of order: the next one, handed
/// the same inflight area (VHOST_USER_SET_INFLIGHT_FD) and the ring rewound to its used index
/// as QEMU does, resubmits exactly the requests left in flight and none that completed, then
/// serves the ring from where the first one stopped taking requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_back_end_resubmits_exactly_what_was_in_flight() {
    use basalt_volume_client::vhost_user::inflight::InflightArea;
    use vhost::vhost_user::message::VhostUserInflight;

    let cluster = TestCluster::with_volume("vu", 16 << 20).await.unwrap();
    let (volume, device) = attached_device(&cluster).await;
    let mut drv = Driver::new(device.clone());
    let (info, file) = drv.backend.get_inflight_fd(&VhostUserInflight::new(0, 0, 1, QUEUE)).unwrap();
    drv.backend.set_inflight_fd(&info, file.try_clone().unwrap()).unwrap();

    // Four writes, to blocks 0..4, all taken by the first back end (marked in its area); it
    // completed #1 and then #3, and died after putting #3 into the used ring but before
    // clearing its mark.
    let mut heads = Vec::new();
    for i in 0..5u64 {
        heads.push(drv.write_block(i));
    }
    for head in &heads[..4] {
        drv.post(*head);
    }
    let area = InflightArea::open(file.try_clone().unwrap(), 0, info.mmap_size, 1, QUEUE).unwrap();
    for (order, head) in heads[..4].iter().enumerate() {
        area.begin(0, *head, order as u64 + 1);
    }
    let put_used = |drv: &Driver, slot: u64, head: u16| {
        drv.m().write_obj(u32::from(head), GuestAddress(USED + 4 + 8 * slot)).unwrap();
        drv.m().write_obj(1u32, GuestAddress(USED + 8 + 8 * slot)).unwrap();
        drv.m().write_obj(slot as u16 + 1, GuestAddress(USED + 2)).unwrap();
    };
    area.completing(0, heads[1]);
    put_used(&drv, 0, heads[1]);
    area.completed(0, heads[1], 1);
    area.completing(0, heads[3]);
    put_used(&drv, 1, heads[3]);

    // The new back end, on the same ring, which the front end rewound to its used index.
    drv.backend.close();
    let restarted = BlkBackend::new(device, drv.mem.clone());
    restarted.set_event_idx(false);
    restarted.set_inflight_fd(&info, file).unwrap();
    drv.vring.set_queue_next_avail(2);
    drv.vring.set_queue_next_used(2);
    restarted.handle_event(0, EventSet::IN, std::slice::from_ref(&drv.vring), 0).unwrap();
    wait_used(&drv, 4).await;
    let resubmitted: std::collections::BTreeSet<u32> =
        (2..4u64).map(|slot| drv.m().read_obj::<u32>(GuestAddress(USED + 4 + 8 * slot)).unwrap()).collect();
    assert_eq!(resubmitted, [heads[0], heads[2]].iter().map(|h| u32::from(*h)).collect(), "not exactly the requests left in flight");

    // The ring goes on after the four taken: the fifth request is served.
    drv.post(heads[4]);
    restarted.handle_event(0, EventSet::IN, std::slice::from_ref(&drv.vring), 0).unwrap();
    wait_used(&drv, 5).await;
    assert_eq!(drv.m().read_obj::<u32>(GuestAddress(USED + 4 + 8 * 4)).unwrap(), u32::from(heads[4]));
    // Only what ran reached the volume: #1 and #3 "completed" without running here.
    for (i, written) in [(0u64, true), (1, false), (2, true), (3, false), (4, true)] {
        let data = volume.read(i * 4096, 4096).await.unwrap();
        let want = if written { i as u8 + 1 } else { 0 };
        assert!(data.iter().all(|b| *b == want), "block {i}: expected {want}");
    }
    restarted.close();
}
