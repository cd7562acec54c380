//! Integrity scrub against a real cluster: a flipped bit in one replica's data file is served
//! around and repaired (on a client read and by a scrub pass), and a replica whose block
//! differs with a valid checksum is found by a deep scrub and repaired from the majority.

use std::time::Duration;

use basalt_chunk_store::{Batch, ChunkStore, ChunkStoreConfig, IndexMemory};
use basalt_common::crc32c;
use basalt_tests::{TestCluster, find_block, seed};
use bytes::Bytes;

/// A 4 KiB block no other block equals.
fn unique_block(tag: &str) -> Bytes {
    let line = format!("BASALT-INTEGRITY-{tag}-{:016x}|", seed());
    let mut b = line.repeat(4096 / line.len() + 1).into_bytes();
    b.truncate(4096);
    Bytes::from(b)
}

/// `basalt --json scrub start ARGS`, which follows the pass to its end; the parsed report.
fn scrub_start(cluster: &TestCluster, args: &[&str]) -> serde_json::Value {
    let out = cluster.basalt_cmd().args(["--json", "scrub", "start"]).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "scrub start {args:?} failed: {}\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr), cluster.logs());
    serde_json::from_str(&stdout).unwrap()
}

/// Sum of `field` over the report's nodes.
fn total(report: &serde_json::Value, field: &str) -> u64 {
    report["nodes"].as_array().unwrap().iter().map(|n| n[field].as_u64().unwrap()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bits_are_read_around_and_repaired_on_read_and_by_a_scrub() {
    let cluster = TestCluster::with_volume("vol", 16 << 20).await.unwrap();
    let client = cluster.client().await.unwrap();
    let vol = client.open_volume("vol").await.unwrap();
    let (leader_block, follower_block) = (unique_block("LEADER"), unique_block("FOLLOWER"));
    // Two blocks of the same extent, in different chunks, among other data.
    vol.write(0, Bytes::from(vec![0x11u8; 2 << 20]), false).await.unwrap();
    vol.write(64 << 10, leader_block.clone(), false).await.unwrap();
    vol.write((1 << 20) + (8 << 10), follower_block.clone(), false).await.unwrap();
    let (_pg, leader, followers) = cluster.pg_replicas("vol", 0).await.unwrap();
    let follower = followers[0];

    // A clean cluster: a local pass on every node finds nothing.
    let clean = scrub_start(&cluster, &[]);
    assert_eq!(total(&clean, "corrupt_found"), 0, "{clean}");
    assert!(total(&clean, "bytes_verified") >= 3 * (2 << 20), "every replica's copy is read: {clean}");

    // Rot on the PG leader, which serves reads: the client still gets the right bytes, and
    // the leader's copy is rewritten from a follower's.
    let at = cluster.locate_block(leader, &leader_block);
    cluster.flip_bit(leader, at + 1000);
    assert!(find_block(&cluster.data_file(leader), &leader_block).unwrap().is_empty());
    let got = vol.read(64 << 10, 4096).await.unwrap();
    assert_eq!(got, leader_block, "the read returned the wrong bytes");
    cluster.wait_repaired(leader, 1).await;
    assert_eq!(cluster.locate_block(leader, &leader_block), at, "the block is back in place on the leader");
    let st = cluster.scrub_status(leader).await.unwrap();
    assert_eq!((st.corrupt_found, st.repairs_issued), (1, 1), "{st:?}");

    // Rot on a follower: nothing reads it, so the scrub must find it.
    let at = cluster.locate_block(follower, &follower_block);
    cluster.flip_bit(follower, at + 7);
    let report = scrub_start(&cluster, &["--node", &follower.to_string()]);
    assert_eq!(total(&report, "corrupt_found"), 1, "{report}");
    assert_eq!(total(&report, "repairs_issued"), 1, "{report}");
    assert_eq!(total(&report, "unrepairable"), 0, "{report}");
    cluster.wait_repaired(follower, 1).await;
    assert_eq!(cluster.locate_block(follower, &follower_block), at, "the block is back in place on the follower");

    // Everything reads back; a second pass finds nothing left to repair.
    assert_eq!(vol.read((1 << 20) + (8 << 10), 4096).await.unwrap(), follower_block);
    let after = scrub_start(&cluster, &[]);
    assert_eq!(total(&after, "corrupt_found"), 0, "{after}");
    for node in 1..=3 {
        let st = cluster.scrub_status(node).await.unwrap();
        assert_eq!(st.unrepairable, 0, "node-{node}: {st:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_scrub_repairs_a_replica_that_diverged_with_a_valid_checksum() {
    let mut cluster = TestCluster::with_volume("vol", 16 << 20).await.unwrap();
    let client = cluster.client().await.unwrap();
    let vol = client.open_volume("vol").await.unwrap();
    let good = unique_block("GOOD");
    let offset = 3 << 20;
    vol.write(offset, good.clone(), false).await.unwrap();
    let (pg, _leader, followers) = cluster.pg_replicas("vol", offset).await.unwrap();
    let odd = followers[0];

    // Healthy replicas agree.
    let clean = scrub_start(&cluster, &["--deep"]);
    assert_eq!(total(&clean, "divergent_found") + total(&clean, "corrupt_found"), 0, "{clean}");

    // Give one replica a different block with a checksum of its own, as a lost or reordered
    // write would: stop it cleanly, write through its chunk store, start it again.
    cluster.stop(odd).await.unwrap();
    let stale = unique_block("STALE");
    {
        let dir = cluster.node(odd).data_dir.clone();
        let cfg = ChunkStoreConfig {
            data_path: dir.join("chunks.dat"),
            index_dir: dir.join("chunk-index"),
            capacity: 4 << 30,
            direct_io: true,
            queue_depth: 16,
            index_memory: IndexMemory { cache_bytes: 8 << 20, write_buffer_bytes: 4 << 20 },
        };
        let store = tokio::task::spawn_blocking(move || ChunkStore::open(&cfg)).await.unwrap().unwrap();
        let mut b = Batch::new();
        b.write(pg.0, vol.id(), 1, offset, stale.clone(), vec![crc32c(&stale)]).unwrap();
        store.commit(b).await.unwrap();
        store.checkpoint().await.unwrap();
    }
    cluster.restart(odd).await.unwrap();
    cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();
    let at = cluster.locate_block(odd, &stale);
    // The divergent copy passes its own checksum: a local pass cannot see it.
    let local = scrub_start(&cluster, &["--node", &odd.to_string()]);
    assert_eq!(total(&local, "corrupt_found"), 0, "{local}");

    let deep = scrub_start(&cluster, &["--deep"]);
    assert_eq!(total(&deep, "divergent_found"), 1, "{deep}");
    assert_eq!(total(&deep, "repairs_issued"), 1, "{deep}");
    assert_eq!(total(&deep, "unrepairable"), 0, "{deep}");
    cluster.wait_repaired(odd, 1).await;
    assert!(find_block(&cluster.data_file(odd), &stale).unwrap().is_empty(), "the divergent block is still on node-{odd}");
    assert_eq!(cluster.locate_block(odd, &good), at, "the majority's block replaced it in place");
    assert_eq!(vol.read(offset, 4096).await.unwrap(), good);

    let again = scrub_start(&cluster, &["--deep"]);
    assert_eq!(total(&again, "divergent_found"), 0, "{again}");
}
