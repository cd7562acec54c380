//! Client-side encryption against a real cluster: blocks sealed in the volume client reach no
//! node's disk in plaintext, read back through the key, differ on every write, and are
//! scrubbed and repaired by nodes that hold no key.

use basalt_proto::data::ReadRequest;
use basalt_tests::{TestCluster, find_block, find_marker, seed};
use basalt_volume_client::crypt::{DataKey, Kek, VolumeCipher};
use basalt_volume_client::{ClientError, Volume};
use bytes::Bytes;

/// `len` bytes of `marker` repeated (every 4 KiB block holds whole copies).
fn marked(marker: &[u8], len: usize) -> Bytes {
    let mut block = marker.repeat(4096 / marker.len());
    block.resize(4096, b'.');
    Bytes::from(block.repeat(len.div_ceil(4096)))
}

fn cipher(volume: &Volume, kek: &Kek) -> VolumeCipher {
    let (key, _) = DataKey::generate(1, kek, volume.name()).unwrap();
    VolumeCipher::new(volume.id(), vec![key], 1).unwrap()
}

/// The stored bytes and encryption contexts of the block at `offset`, as its PG leader sends
/// them (what a node holds: ciphertext).
async fn raw_block(cluster: &TestCluster, volume: &Volume, offset: u64) -> (Bytes, Bytes) {
    let (pg, leader, _) = cluster.pg_replicas(volume.name(), offset).await.unwrap();
    let mut data = cluster.data_client(&cluster.node(leader).addr).unwrap();
    let map_version = cluster.client().await.unwrap().map().version;
    let reply = data.read(ReadRequest { pg: pg.0, volume_id: volume.id().0, offset, length: 4096, map_version }).await.unwrap().into_inner();
    assert!(reply.error.is_none(), "{:?}", reply.error);
    (reply.data, reply.crypt)
}

async fn scan(cluster: &TestCluster, marker: &[u8]) -> Vec<(std::path::PathBuf, u64)> {
    let (root, m) = (cluster.path().to_path_buf(), marker.to_vec());
    tokio::task::spawn_blocking(move || find_marker(&root, &m)).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_blocks_reach_no_disk_in_plaintext_and_read_back_through_the_key() {
    let cluster = TestCluster::with_volume("enc", 16 << 20).await.unwrap();
    let (code, _, err) = cluster.cli(&["volume", "create", "plain", "--size", "16MiB"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let client = cluster.client().await.unwrap();
    let kek = Kek::from_bytes(rand::random());
    let attached = client.attach_volume("enc", "test", false).await.unwrap();
    let enc = attached.clone().with_cipher(cipher(&attached, &kek));
    assert!(enc.is_encrypted());
    let plain = client.attach_volume("plain", "test", false).await.unwrap();

    let secret = format!("BASALT-SECRET-{:016x}|", seed()).into_bytes();
    let visible = format!("BASALT-VISIBLE-{:016x}|", seed()).into_bytes();
    // Whole blocks, a write inside one block, one across a block boundary, and unaligned
    // zeroes: the partial ones are merged here, since nodes cannot open a block.
    let big = marked(&secret, 256 << 10);
    enc.write(0, big.clone(), false).await.unwrap();
    let small = Bytes::from(secret[..20].to_vec());
    enc.write((300 << 10) + 100, small.clone(), false).await.unwrap();
    let across = marked(&secret, 8192).slice(0..5000);
    enc.write((400 << 10) + 3000, across.clone(), false).await.unwrap();
    enc.write_zeroes(1000, 6000, false).await.unwrap();
    enc.trim(8192 * 4, 8192).await.unwrap();
    plain.write(0, marked(&visible, 64 << 10), false).await.unwrap();

    let mut want = big.to_vec();
    want[1000..7000].fill(0);
    want[8192 * 4..8192 * 5].fill(0);
    assert_eq!(enc.read(0, 256 << 10).await.unwrap(), Bytes::from(want), "whole blocks, zeroed and trimmed ranges");
    assert_eq!(enc.read((300 << 10) + 100, 20).await.unwrap(), small);
    assert_eq!(enc.read((300 << 10) + 120, 100).await.unwrap(), Bytes::from(vec![0u8; 100]), "the rest of that block reads as zeros");
    assert_eq!(enc.read((400 << 10) + 3000, 5000).await.unwrap(), across);

    // Nothing on any node's disk holds the secret; the unencrypted volume's marker is there.
    assert!(scan(&cluster, &secret).await.is_empty(), "the plaintext of an encrypted volume reached a disk");
    let found = scan(&cluster, &visible).await;
    assert!(found.iter().any(|(p, _)| p.ends_with("chunks.dat")), "the scan finds an unencrypted volume's data: {found:?}");

    // Without the key, or with another one, nothing is returned as data.
    let keyless = client.open_volume("enc").await.unwrap();
    match keyless.read(0, 4096).await {
        Err(ClientError::Crypt(m)) => assert!(m.contains("--kek-file"), "{m}"),
        other => panic!("read without the key: {other:?}"),
    }
    let stranger = keyless.clone().with_cipher(cipher(&attached, &kek));
    match stranger.read(0, 4096).await {
        Err(ClientError::Crypt(m)) => assert!(m.contains("does not authenticate"), "{m}"),
        other => panic!("read with another data key: {other:?}"),
    }

    // The same plaintext written twice to one block is stored as different ciphertext.
    let (c1, ctx1) = raw_block(&cluster, &enc, 128 << 10).await;
    enc.write(128 << 10, big.slice(128 << 10..(128 << 10) + 4096), false).await.unwrap();
    let (c2, ctx2) = raw_block(&cluster, &enc, 128 << 10).await;
    assert_eq!(ctx1.len(), 28, "one encryption context per block travels with it");
    assert_ne!(c1, c2, "a rewrite of the same data must not repeat its ciphertext");
    assert_ne!(ctx1, ctx2);
    assert_eq!(enc.read(128 << 10, 4096).await.unwrap(), big.slice(128 << 10..(128 << 10) + 4096));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_repair_sealed_blocks_without_a_key() {
    let cluster = TestCluster::with_volume("enc", 16 << 20).await.unwrap();
    let client = cluster.client().await.unwrap();
    let kek = Kek::from_bytes(rand::random());
    let attached = client.attach_volume("enc", "test", false).await.unwrap();
    let enc = attached.clone().with_cipher(cipher(&attached, &kek));
    let data = marked(format!("BASALT-REPAIR-{:016x}|", seed()).as_bytes(), 64 << 10);
    enc.write(0, data.clone(), false).await.unwrap();
    let (_, leader, followers) = cluster.pg_replicas("enc", 0).await.unwrap();

    // Rot under the leader's copy of a sealed block: the read is served from a healthy replica
    // and the leader's copy rewritten with its ciphertext and encryption context.
    let (stored, _) = raw_block(&cluster, &enc, 8192).await;
    let at = cluster.locate_block(leader, &stored);
    cluster.flip_bit(leader, at + 17);
    assert_eq!(enc.read(8192, 4096).await.unwrap(), data.slice(8192..12288), "the sealed block opens after the repair");
    cluster.wait_repaired(leader, 1).await;
    assert_eq!(cluster.locate_block(leader, &stored), at, "the ciphertext is back in place");

    // Rot on a follower, found by a scrub pass that holds no key.
    let (stored, _) = raw_block(&cluster, &enc, 16384).await;
    let follower = followers[0];
    let at = cluster.locate_block(follower, &stored);
    cluster.flip_bit(follower, at + 99);
    let out = cluster.basalt_cmd().args(["--json", "scrub", "start", "--node", &follower.to_string()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    cluster.wait_repaired(follower, 1).await;
    assert!(!find_block(&cluster.data_file(follower), &stored).unwrap().is_empty(), "repaired on the follower");
    assert_eq!(enc.read(0, 64 << 10).await.unwrap(), data);
}
