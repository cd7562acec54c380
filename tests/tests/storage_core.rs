//! The storage core end to end: real nodes on loopback, the volume client, random I/O with a
//! model to check against, restarts, kill -9, and placement across failure domains.

use std::collections::HashMap;
use std::time::Duration;

use basalt_proto::admin::{VolumeCreateRequest, VolumeDeleteRequest};
use basalt_tests::{NodeSpec, Rng, TestCluster, seed, simple_spec};
use basalt_volume_client::Volume;
use bytes::Bytes;

const VOLUME_SIZE: u64 = 48 << 20;
const EXTENT: u64 = 4 << 20;

/// Random writes, some unaligned, some across extent boundaries, in batches of non-overlapping
/// writes issued concurrently; `model` tracks what the volume must contain.
async fn random_writes(vol: &Volume, model: &mut [u8], rng: &mut Rng, batches: usize) {
    for _ in 0..batches {
        let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
        while batch.len() < 6 {
            let len = match rng.below(6) {
                0 => 512,
                1 => 4096,
                2 => 1 + rng.below(9000),
                3 => 64 * 1024 + rng.below(4096),
                4 => 1 << 20,
                _ => 300,
            };
            // One in three straddles an extent boundary.
            let offset = if rng.below(3) == 0 {
                let boundary = EXTENT * (1 + rng.below(VOLUME_SIZE / EXTENT - 1));
                boundary - 1 - rng.below(len.min(boundary))
            } else {
                rng.below(VOLUME_SIZE - len)
            };
            let offset = offset.min(VOLUME_SIZE - len);
            let overlaps = batch.iter().any(|(o, d)| offset < o + d.len() as u64 && *o < offset + len);
            if !overlaps {
                batch.push((offset, rng.bytes(len as usize)));
            }
        }
        let writes = batch.iter().map(|(o, d)| vol.write(*o, Bytes::from(d.clone()), false));
        for r in futures::future::join_all(writes).await {
            r.expect("write");
        }
        for (o, d) in batch {
            model[o as usize..o as usize + d.len()].copy_from_slice(&d);
        }
    }
}

async fn verify(vol: &Volume, model: &[u8], what: &str) {
    for start in (0..VOLUME_SIZE).step_by(EXTENT as usize) {
        let got = vol.read(start, EXTENT).await.unwrap_or_else(|e| panic!("{what}: read at {start}: {e}"));
        let want = &model[start as usize..(start + EXTENT) as usize];
        if got.as_ref() != want {
            let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            panic!("{what}: data differs at byte {}", start as usize + first);
        }
    }
    // A few unaligned reads across extent boundaries, too.
    for boundary in [EXTENT, 5 * EXTENT, 11 * EXTENT] {
        let got = vol.read(boundary - 777, 2000).await.unwrap_or_else(|e| panic!("{what}: read: {e}"));
        assert_eq!(got.as_ref(), &model[(boundary - 777) as usize..(boundary - 777 + 2000) as usize], "{what}: unaligned read");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_io_survives_restarts_and_kill9() {
    let mut rng = Rng::new(seed());
    let mut cluster = TestCluster::start(simple_spec(3)).await.unwrap();
    cluster.init(16, "zone").await.unwrap();
    cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();
    let mut admin = cluster.admin().await.unwrap();
    admin
        .volume_create(VolumeCreateRequest { name: "vol".into(), size: VOLUME_SIZE, wrapped_key: Default::default(), unencrypted: false, qos: None })
        .await
        .unwrap();

    let client = cluster.client().await.unwrap();
    let vol = client.open_volume("vol").await.unwrap();
    let mut model = vec![0u8; VOLUME_SIZE as usize];
    // Unwritten space reads as zeros.
    verify(&vol, &model, "fresh volume").await;
    random_writes(&vol, &mut model, &mut rng, 12).await;
    verify(&vol, &model, "after writes").await;

    // Restart every node (clean SIGTERM), then everything must still be there.
    for id in 1..=3 {
        let status = cluster.stop(id).await.unwrap();
        assert!(status.success(), "node-{id} did not exit cleanly: {status}\n{}", cluster.logs());
    }
    for id in 1..=3 {
        cluster.restart(id).await.unwrap();
    }
    cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    verify(&vol, &model, "after restarting every node").await;

    // kill -9 one node while writes are in flight, keep writing and reading on two.
    let writer = {
        let vol = vol.clone();
        let mut model = model.clone();
        let mut rng = Rng::new(rng.next_u64());
        tokio::spawn(async move {
            random_writes(&vol, &mut model, &mut rng, 8).await;
            model
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.kill9(2);
    model = writer.await.unwrap();
    random_writes(&vol, &mut model, &mut rng, 4).await;
    verify(&vol, &model, "with node-2 killed").await;

    // It comes back and catches up; then the cluster survives losing another node.
    cluster.restart(2).await.unwrap();
    cluster.wait_healthy(3, Duration::from_secs(90)).await.unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    cluster.kill9(3);
    random_writes(&vol, &mut model, &mut rng, 3).await;
    verify(&vol, &model, "after node-2 rejoined and node-3 was killed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pg_spans_three_failure_domains() {
    // Six nodes in three zones, unevenly: z1 has one node, z2 two, z3 three.
    let zones = ["z1", "z2", "z2", "z3", "z3", "z3"];
    let specs: Vec<NodeSpec> = zones
        .iter()
        .enumerate()
        .map(|(i, z)| NodeSpec {
            id: i as u64 + 1,
            labels: format!("zone={z},host=h{}", i + 1),
            roles: if i < 3 { vec!["storage", "meta"] } else { vec!["storage"] },
        })
        .collect();
    let cluster = TestCluster::start(specs).await.unwrap();
    // The non-meta nodes must have announced themselves before init.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    cluster.init(24, "zone").await.unwrap();
    let status = cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let zone_of: HashMap<u64, String> = status.nodes.iter().map(|n| (n.id, n.labels.clone().unwrap_or_default().zone)).collect();
    assert_eq!(zone_of.len(), 6, "all six nodes registered");
    let mut per_node: HashMap<u64, usize> = HashMap::new();
    for pg in &status.pgs {
        assert_eq!(pg.replicas.len(), 3);
        let mut zones: Vec<&String> = pg.replicas.iter().map(|r| &zone_of[r]).collect();
        zones.sort();
        zones.dedup();
        assert_eq!(zones.len(), 3, "pg-{} replicas {:?} share a zone", pg.id, pg.replicas);
        for r in &pg.replicas {
            *per_node.entry(*r).or_default() += 1;
        }
    }
    // z1's single node holds every PG; z3's three nodes share theirs evenly.
    assert_eq!(per_node[&1], 24);
    for id in 4..=6 {
        assert_eq!(per_node[&id], 8, "{per_node:?}");
    }
}

/// At rest, every placement group keeps its leader and term: heartbeats (sent as one unary
/// call each, on ticks coalesced onto a shared grid) reach the followers before any election
/// timeout, with 64 groups per node as a provider would run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_cluster_keeps_its_leaders() {
    let cluster = TestCluster::start(simple_spec(3)).await.unwrap();
    cluster.init(64, "zone").await.unwrap();
    cluster.wait_healthy(3, Duration::from_secs(90)).await.unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    // Let the reports the status is built from catch up with the first elections.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leaders =
        |s: &basalt_proto::admin::ClusterStatusReply| -> HashMap<u32, (u64, u64)> { s.pgs.iter().map(|p| (p.id, (p.leader, p.term))).collect() };
    let before = leaders(&cluster.status().await.unwrap());
    assert_eq!(before.len(), 64);
    assert!(before.values().all(|(leader, _)| *leader != 0), "{before:?}");
    // More than twice the longest election timeout (3 s).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = leaders(&cluster.status().await.unwrap());
    let changed: Vec<_> = before.iter().filter(|(pg, v)| after.get(pg) != Some(v)).map(|(pg, v)| (pg, v, after.get(pg))).collect();
    assert!(changed.is_empty(), "leader or term changed on an idle cluster (pg, before, after): {changed:?}\n{}", cluster.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_without_enough_domains_names_them() {
    let specs: Vec<NodeSpec> = (1..=3)
        .map(|i| NodeSpec { id: i, labels: format!("zone={},host=h{i}", if i == 3 { "b" } else { "a" }), roles: vec!["storage", "meta"] })
        .collect();
    let cluster = TestCluster::start(specs).await.unwrap();
    let err = cluster.init(8, "zone").await.unwrap_err().to_string();
    assert!(err.contains("found 2 domain(s)") && err.contains("zone=a [node-1, node-2]") && err.contains("zone=b [node-3]"), "{err}");
    // With host-level placement the same nodes are fine.
    cluster.init(8, "host").await.unwrap();
    cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_volume_releases_space_and_refuses_io() {
    let cluster = TestCluster::start(simple_spec(3)).await.unwrap();
    cluster.init(8, "zone").await.unwrap();
    cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();
    let mut admin = cluster.admin().await.unwrap();
    admin
        .volume_create(VolumeCreateRequest { name: "gone".into(), size: 16 << 20, wrapped_key: Default::default(), unencrypted: false, qos: None })
        .await
        .unwrap();
    let client = cluster.client().await.unwrap();
    let vol = client.open_volume("gone").await.unwrap();
    vol.write(0, Bytes::from(vec![0xEEu8; 16 << 20]), false).await.unwrap();
    let used = |s: &basalt_proto::admin::ClusterStatusReply| s.nodes.iter().map(|n| n.used_bytes).sum::<u64>();
    // Heartbeats carry usage; wait for them to reflect the write (3 replicas × 16 MiB).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while used(&cluster.status().await.unwrap()) < 48 << 20 {
        assert!(tokio::time::Instant::now() < deadline, "usage never reached 48 MiB");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reply = admin.volume_delete(VolumeDeleteRequest { name: "gone".into(), wait: true }).await.unwrap().into_inner();
    assert_eq!(reply.pgs_done, reply.pgs_total, "every PG released the volume");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while used(&cluster.status().await.unwrap()) != 0 {
        assert!(tokio::time::Instant::now() < deadline, "chunks still mapped after delete");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let err = vol.write(0, Bytes::from(vec![1u8; 4096]), false).await.unwrap_err();
    assert!(err.to_string().contains("deleted"), "{err}");
    assert!(client.open_volume("gone").await.is_err());
}
