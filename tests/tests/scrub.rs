//! Freed data leaves the disks: after a volume is deleted or a range is trimmed, no file under
//! any node's data directory — data file, Raft log (WAL and blob files), RocksDB files — still
//! holds its bytes, once the scrub queue and the log scrub have run.

use std::time::Duration;

use basalt_proto::admin::VolumeDeleteRequest;
use basalt_tests::{TestCluster, find_marker, seed};
use bytes::Bytes;

/// `len` bytes of `marker` repeated (padded so every 4 KiB block holds whole copies).
fn marked(marker: &[u8], len: usize) -> Bytes {
    let per_block = 4096 / marker.len();
    let mut block = marker.repeat(per_block);
    block.resize(4096, b'.');
    Bytes::from(block.repeat(len / 4096))
}

/// Every file under the cluster's directory that holds `marker`.
async fn scan(cluster: &TestCluster, marker: &[u8]) -> Vec<(std::path::PathBuf, u64)> {
    let root = cluster.path().to_path_buf();
    let m = marker.to_vec();
    tokio::task::spawn_blocking(move || find_marker(&root, &m)).await.unwrap()
}

/// Polls until no file under the cluster holds `marker`, or fails naming the files that do.
async fn wait_until_gone(cluster: &TestCluster, marker: &[u8], what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = scan(cluster, marker).await;
        if left.is_empty() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: the marker is still on disk after 60 s in {left:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_volume_leaves_no_copy_in_any_file() {
    let cluster = TestCluster::with_volume("secret", 16 << 20).await.unwrap();
    let client = cluster.client().await.unwrap();
    let vol = client.open_volume("secret").await.unwrap();
    let marker = format!("BASALT-DELETE-MARKER-{:016x}|", seed()).into_bytes();
    for i in 0..4u64 {
        vol.write(i * (4 << 20), marked(&marker, 4 << 20), false).await.unwrap();
    }

    // The scan sees the data where it lives: data files and the Raft log on every replica.
    let before = scan(&cluster, &marker).await;
    assert!(before.iter().any(|(p, _)| p.ends_with("chunks.dat")), "marker not found in any data file: {before:?}");
    assert!(before.iter().any(|(p, _)| p.components().any(|c| c.as_os_str() == "raft-log")), "marker not found in any raft log file: {before:?}");

    let mut admin = cluster.admin().await.unwrap();
    let reply = admin.volume_delete(VolumeDeleteRequest { name: "secret".into(), wait: true }).await.unwrap().into_inner();
    assert_eq!(reply.pgs_done, reply.pgs_total);
    wait_until_gone(&cluster, &marker, "after deleting the volume").await;
}

/// Deleted means gone at the device, not only in files: the nodes run on a loop-mounted ext4
/// image, and after a 64 MiB marker volume is deleted and scrubbed, a byte-by-byte search of the
/// whole image — free blocks included, as whoever holds the disk would read it — finds no copy
/// (data file, Raft log segments, indexes, free space).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_volume_leaves_no_copy_on_the_device() {
    let image = basalt_tests::Ext4Image::mount(3 << 30).expect("a loop-mounted ext4 image");
    let cluster = TestCluster::with_volume_in(&image.mount, "secret", 64 << 20, "capacity = \"256MiB\"\n").await.unwrap();
    let client = cluster.client().await.unwrap();
    let vol = client.open_volume("secret").await.unwrap();
    let marker = format!("BASALT-DEVICE-MARKER-{:016x}|", seed()).into_bytes();
    for i in 0..16u64 {
        vol.write(i * (4 << 20), marked(&marker, 4 << 20), false).await.unwrap();
    }
    image.sync();
    let raw = image.image_dir.path().to_path_buf();
    let on_device = |m: Vec<u8>| {
        let raw = raw.clone();
        tokio::task::spawn_blocking(move || find_marker(&raw, &m))
    };
    let before = on_device(marker.clone()).await.unwrap();
    assert!(!before.is_empty(), "the marker is on the device before the delete");

    let mut admin = cluster.admin().await.unwrap();
    let reply = admin.volume_delete(VolumeDeleteRequest { name: "secret".into(), wait: true }).await.unwrap().into_inner();
    assert_eq!(reply.pgs_done, reply.pgs_total);
    wait_until_gone(&cluster, &marker, "after deleting the volume").await;
    image.sync();
    let left = on_device(marker.clone()).await.unwrap();
    assert!(left.is_empty(), "{} copies of the marker are still on the device, e.g. {:?}", left.len(), &left[..left.len().min(5)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimmed_range_leaves_no_copy_and_the_rest_stays() {
    let cluster = TestCluster::with_volume("disk", 16 << 20).await.unwrap();
    let client = cluster.client().await.unwrap();
    let vol = client.open_volume("disk").await.unwrap();
    let s = seed();
    let trimmed = format!("BASALT-TRIMMED-MARKER-{s:016x}|").into_bytes();
    let kept = format!("BASALT-KEPT-MARKER-{s:016x}|").into_bytes();
    vol.write(0, marked(&trimmed, 8 << 20), false).await.unwrap();
    vol.write(8 << 20, marked(&kept, 8 << 20), false).await.unwrap();
    assert!(!scan(&cluster, &trimmed).await.is_empty());

    vol.trim(0, 8 << 20).await.unwrap();
    wait_until_gone(&cluster, &trimmed, "after TRIM").await;

    // The rest of the volume is untouched: on disk and through the client.
    let kept_files = scan(&cluster, &kept).await;
    assert!(kept_files.iter().any(|(p, _)| p.ends_with("chunks.dat")), "the untrimmed range vanished: {kept_files:?}");
    assert_eq!(vol.read(8 << 20, 8 << 20).await.unwrap(), marked(&kept, 8 << 20));
    assert!(vol.read(0, 8 << 20).await.unwrap().iter().all(|b| *b == 0), "trimmed range does not read as zeros");
}

/// Overwriting slow enough that a test can act while freed ranges are still queued: a 16 MiB
/// volume leaves 16 one-MiB ranges per node, about 16 s of overwriting.
const SLOW_SCRUB: &str = "[scrub]\noverwrite_rate = \"1MiB\"";

/// Waits until every node's queue of freed ranges is empty; returns the nodes' reports.
async fn wait_queues_drained(cluster: &TestCluster) -> Vec<basalt_proto::admin::ScrubStatusReply> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let mut all = Vec::new();
        for id in 1..=3 {
            all.push(cluster.scrub_status(id).await.unwrap());
        }
        if all.iter().all(|s| s.pending_ranges == 0) {
            return all;
        }
        assert!(tokio::time::Instant::now() < deadline, "scrub queues not drained after 90 s: {all:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_resumes_after_kill9_and_leaves_no_copy() {
    let mut cluster = TestCluster::with_volume_config("secret", 16 << 20, SLOW_SCRUB).await.unwrap();
    let client = cluster.client().await.unwrap();
    let vol = client.open_volume("secret").await.unwrap();
    let marker = format!("BASALT-KILL9-MARKER-{:016x}|", seed()).into_bytes();
    vol.write(0, marked(&marker, 16 << 20), false).await.unwrap();
    assert!(!scan(&cluster, &marker).await.is_empty());

    let mut admin = cluster.admin().await.unwrap();
    admin.volume_delete(VolumeDeleteRequest { name: "secret".into(), wait: true }).await.unwrap();

    // Kill node 1 in the middle of its overwriting: some ranges done, some still queued.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let at_kill = loop {
        let st = cluster.scrub_status(1).await.unwrap();
        if st.overwritten_bytes > 0 && st.pending_ranges > 0 {
            break st;
        }
        assert!(tokio::time::Instant::now() < deadline, "node 1 never was mid-scrub: {st:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    cluster.kill9(1);
    println!("killed node 1 with {} ranges queued ({} bytes overwritten)", at_kill.pending_ranges, at_kill.overwritten_bytes);
    cluster.restart(1).await.unwrap();

    wait_until_gone(&cluster, &marker, "after kill -9 mid-scrub and restart").await;
    let done = wait_queues_drained(&cluster).await;
    // Counters restart with the process: what node 1 overwrote now is what the queue kept.
    assert!(done[0].overwritten_bytes > 0, "node 1 did not resume the queued overwrites: {:?}", done[0]);
    assert_eq!(done[0].errors, 0, "{:?}", done[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freed_space_is_not_reused_before_it_is_overwritten() {
    let cluster = TestCluster::with_volume_config("old", 16 << 20, SLOW_SCRUB).await.unwrap();
    let client = cluster.client().await.unwrap();
    let old = client.open_volume("old").await.unwrap();
    let s = seed();
    let old_marker = format!("BASALT-OLD-TENANT-{s:016x}|").into_bytes();
    old.write(0, marked(&old_marker, 16 << 20), false).await.unwrap();

    let mut admin = cluster.admin().await.unwrap();
    admin.volume_delete(VolumeDeleteRequest { name: "old".into(), wait: true }).await.unwrap();
    admin
        .volume_create(basalt_proto::admin::VolumeCreateRequest {
            name: "new".into(),
            size: 16 << 20,
            wrapped_key: Default::default(),
            unencrypted: false,
            qos: None,
        })
        .await
        .unwrap();
    let mut queued = 0;
    for id in 1..=3 {
        queued += cluster.scrub_status(id).await.unwrap().pending_ranges;
    }
    assert!(queued > 0, "the old volume's ranges were already overwritten: the test would not overlap reuse with scrubbing");

    // The new tenant sees zeros everywhere, also around the blocks it writes (one 4 KiB block
    // at the start of every 1 MiB chunk, so each chunk gets a slot that is only partly written).
    let new = client.open_volume("new").await.unwrap();
    let fresh = new.read(0, 16 << 20).await.unwrap();
    assert!(fresh.iter().all(|b| *b == 0), "a new volume reads bytes it never wrote");
    let new_marker = format!("BASALT-NEW-TENANT-{s:016x}|").into_bytes();
    let block = marked(&new_marker, 4096);
    for chunk in 0..16u64 {
        new.write(chunk << 20, block.clone(), false).await.unwrap();
    }
    let got = new.read(0, 16 << 20).await.unwrap();
    for chunk in 0..16usize {
        let c = &got[chunk << 20..(chunk + 1) << 20];
        assert_eq!(&c[..4096], &block[..], "chunk {chunk}: written block");
        assert!(c[4096..].iter().all(|b| *b == 0), "chunk {chunk}: unwritten part of a new chunk is not zeros");
    }

    // The old bytes are overwritten in the end, and overwriting never touched the new volume.
    wait_until_gone(&cluster, &old_marker, "after deleting the old volume").await;
    wait_queues_drained(&cluster).await;
    assert_eq!(new.read(0, 16 << 20).await.unwrap(), got);
}
