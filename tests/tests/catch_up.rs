//! A replica that was away while its placement groups checkpointed and purged their logs
//! catches up — by snapshot transfer where the leader's log no longer reaches back far enough
//! (the leader streams its chunks while writes continue), from the log otherwise — and
//! afterwards holds exactly the data the others do.
//!
//! Whether a given PG needs the snapshot depends on timing: a leader does not purge entries that
//! are in flight to a follower. `pg::snapshot` tests the snapshot path deterministically.

use std::time::Duration;

use basalt_chunk_store::{ChunkStore, ChunkStoreConfig, IndexMemory};
use basalt_common::{ExtentIndex, Layout, VolumeId};
use basalt_proto::admin::VolumeCreateRequest;
use basalt_tests::{Rng, TestCluster, seed, simple_spec};
use bytes::Bytes;

const SIZE: u64 = 32 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_replica_catches_up_exactly() {
    let mut rng = Rng::new(seed());
    // Checkpoint often and keep almost no log after it, so the absent node's entries are gone.
    let mut cluster =
        TestCluster::start_with(simple_spec(3), "[raft]\ncheckpoint_every_entries = 16\nkeep_entries_after_checkpoint = 2\n").await.unwrap();
    cluster.init(4, "zone").await.unwrap();
    let status = cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();
    let mut admin = cluster.admin().await.unwrap();
    let vol = admin
        .volume_create(VolumeCreateRequest { name: "v".into(), size: SIZE, wrapped_key: Default::default(), unencrypted: false, qos: None })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let client = cluster.client().await.unwrap();
    let v = client.open_volume("v").await.unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let write = |v: basalt_volume_client::Volume, model: &mut Vec<u8>, rng: &mut Rng, n: usize| {
        let mut ops = Vec::new();
        for _ in 0..n {
            let len = 512 + rng.below(16 << 10);
            let off = rng.below(SIZE - len);
            let data = rng.bytes(len as usize);
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
            ops.push((off, data));
        }
        async move {
            for (off, data) in ops {
                v.write(off, Bytes::from(data), false).await.expect("write");
            }
        }
    };
    write(v.clone(), &mut model, &mut rng, 50).await;

    // node-3 leaves; enough writes follow for every PG to checkpoint and purge past it. (A
    // leader does not purge entries still in flight to a follower, so first let the requests
    // in flight to node-3 fail.)
    assert!(cluster.stop(3).await.unwrap().success());
    tokio::time::sleep(Duration::from_secs(4)).await;
    write(v.clone(), &mut model, &mut rng, 400).await;
    // It returns and must be brought up to date by snapshot (its log position is purged away).
    cluster.restart(3).await.unwrap();
    // A burst of writes while the transfer may be running: the fuzzy copy plus log replay must
    // still end exact.
    write(v.clone(), &mut model, &mut rng, 100).await;
    cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    // Let the last entries replicate and apply, then look at node-3's disk directly.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let snapshots = std::fs::read_to_string(&cluster.node(3).log).unwrap_or_default().matches("installed snapshot").count();
    println!("node-3 installed {snapshots} snapshot(s) while catching up");
    assert!(cluster.stop(3).await.unwrap().success());
    let node = cluster.node(3);
    let store = ChunkStore::open(&ChunkStoreConfig {
        data_path: node.data_dir.join("chunks.dat"),
        index_dir: node.data_dir.join("chunk-index"),
        capacity: 4 << 30,
        direct_io: true,
        queue_depth: 8,
        index_memory: IndexMemory { cache_bytes: 4 << 20, write_buffer_bytes: 4 << 20 },
    })
    .unwrap();
    let layout = Layout { extent_size: status.extent_size, pg_count: status.pg_count };
    for e in 0..SIZE / layout.extent_size {
        let pg = layout.pg_of(VolumeId(vol.id), ExtentIndex(e));
        let off = e * layout.extent_size;
        let got = store.read(pg.0, VolumeId(vol.id), off, layout.extent_size).await.unwrap();
        let want = &model[off as usize..(off + layout.extent_size) as usize];
        if got.data.as_ref() != want {
            let first = got.data.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            panic!("node-3's replica of extent {e} ({pg}) differs at byte {}\n{}", off as usize + first, cluster.logs());
        }
    }
}
