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
    assert!(
        before.iter().any(|(p, _)| p.components().any(|c| c.as_os_str() == "raft-log")),
        "marker not found in any raft log file: {before:?}"
    );

    let mut admin = cluster.admin().await.unwrap();
    let reply = admin.volume_delete(VolumeDeleteRequest { name: "secret".into(), wait: true }).await.unwrap().into_inner();
    assert_eq!(reply.pgs_done, reply.pgs_total);
    wait_until_gone(&cluster, &marker, "after deleting the volume").await;
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
