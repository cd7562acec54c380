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

/// A cipher for `volume` with a fresh data key of its own (not the volume's).
fn stranger_cipher(volume: &Volume) -> VolumeCipher {
    let (key, _) = DataKey::generate(1, &Kek::from_bytes(rand::random()), volume.name()).unwrap();
    VolumeCipher::new(volume.id(), vec![key], 1).unwrap()
}

/// Creates encrypted volume `name` (16 MiB) with a fresh KEK through the CLI and attaches it
/// read-write with its cipher.
async fn encrypted_volume(cluster: &TestCluster, name: &str) -> Volume {
    let kek: [u8; 32] = rand::random();
    let path = cluster.path().join(format!("{name}.kek"));
    std::fs::write(&path, kek).unwrap();
    let (code, _, err) =
        cluster.cli(&["volume", "create", name, "--size", "16MiB", "--encrypt", "--kek-file", path.to_str().unwrap()]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let client = cluster.client().await.unwrap();
    let cipher = client.volume_cipher(name, &Kek::from_bytes(kek)).await.unwrap();
    client.attach_volume(name, "test", false).await.unwrap().with_cipher(cipher)
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
    let cluster = TestCluster::with_volume("plain", 16 << 20).await.unwrap();
    let client = cluster.client().await.unwrap();
    let enc = encrypted_volume(&cluster, "enc").await;
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

    // A plaintext write to the encrypted volume (a client without its key) is refused, and a
    // sealed one to a plain volume.
    match client.attach_volume("enc", "intruder", true).await.unwrap().write(0, Bytes::from(vec![1u8; 4096]), false).await {
        Err(ClientError::Internal(m)) => assert!(m.contains("is encrypted"), "{m}"),
        other => panic!("plaintext write to an encrypted volume: {other:?}"),
    }
    let enc = {
        // Take the attachment back for the rest (the intruder fenced it).
        let cipher =
            client.volume_cipher("enc", &Kek::from_bytes(std::fs::read(cluster.path().join("enc.kek")).unwrap().try_into().unwrap())).await.unwrap();
        client.attach_volume("enc", "test", true).await.unwrap().with_cipher(cipher)
    };
    match plain.clone().with_cipher(stranger_cipher(&plain)).write(0, Bytes::from(vec![1u8; 4096]), false).await {
        Err(ClientError::Internal(m)) => assert!(m.contains("not encrypted"), "{m}"),
        other => panic!("sealed write to a plain volume: {other:?}"),
    }

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
    let stranger = keyless.clone().with_cipher(stranger_cipher(&keyless));
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

    // A cluster that encrypts by default refuses an unencrypted volume unless asked plainly.
    let (c, _, err) = cluster.cli(&["cluster", "configure", "--encryption-default", "on"]).await.unwrap();
    assert_eq!(c, Some(0), "{err}");
    let (_, out, _) = cluster.cli(&["--json", "cluster", "status"]).await.unwrap();
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["encryption_default"], true);
    let (c, _, err) = cluster.cli(&["volume", "create", "loose", "--size", "16MiB"]).await.unwrap();
    assert!(c == Some(7) && err.contains("--no-encrypt"), "{c:?} {err}");
    let (c, _, err) = cluster.cli(&["volume", "create", "loose", "--size", "16MiB", "--no-encrypt"]).await.unwrap();
    assert_eq!(c, Some(0), "{err}");
    cluster.wait_for_audit("the settings change", |r| r["action"] == "cluster.configure" && r["target"] == "encryption default on").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_repair_sealed_blocks_without_a_key() {
    let cluster = TestCluster::with_volume("plain", 16 << 20).await.unwrap();
    let enc = encrypted_volume(&cluster, "enc").await;
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

/// The wrapped key of volume `name` under `kek` in node `id`'s key store (slots of format 1,
/// see storage-node `meta::key_store`; the wrapping binds the volume name).
fn stored_key(cluster: &TestCluster, id: u64, kek: &[u8; 32], name: &str) -> Vec<u8> {
    let bytes = std::fs::read(cluster.node(id).data_dir.join("keys/wrapped.keys")).unwrap();
    let kek = Kek::from_bytes(*kek);
    bytes
        .chunks(256)
        .filter(|s| s.starts_with(b"BKY1"))
        .map(|s| s[26..26 + u16::from_le_bytes([s[24], s[25]]) as usize].to_vec())
        .find(|w| basalt_volume_client::crypt::WrappedKey::parse(name, w).is_ok_and(|k| k.unwrap_with(&kek, name).is_ok()))
        .unwrap_or_else(|| panic!("no key of {name} in node-{id}'s key store"))
}

/// Polls (10 s) until no file under the cluster holds `bytes`.
async fn wait_gone(cluster: &TestCluster, bytes: &[u8], what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = scan(cluster, bytes).await;
        if left.is_empty() {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what} is still in {left:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Flips a bit inside the stored copy of `wrapped` on nodes `ids`, in place (rewriting the
/// whole file would leave the old blocks, other keys included, in the device's free space).
fn damage_key(cluster: &TestCluster, ids: &[u64], wrapped: &[u8]) {
    use std::os::unix::fs::FileExt;
    for id in ids {
        let path = cluster.node(*id).data_dir.join("keys/wrapped.keys");
        let bytes = std::fs::read(&path).unwrap();
        let at = bytes.windows(wrapped.len()).position(|w| w == wrapped).expect("the key is stored here") + 40;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[bytes[at] ^ 0x10], at as u64).unwrap();
        f.sync_all().unwrap();
    }
}

fn write_file(dir: &std::path::Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_needs_the_kek_and_delete_shreds_the_key_from_the_device() {
    let image = basalt_tests::Ext4Image::mount(3 << 30).expect("a loop-mounted ext4 image");
    let cluster = TestCluster::with_volume_in(&image.mount, "plain", 16 << 20, "capacity = \"256MiB\"\n").await.unwrap();
    let kek_bytes: [u8; 32] = rand::random();
    let dir = cluster.path().to_path_buf();
    let good = write_file(&dir, "kek", &kek_bytes);
    let wrong = write_file(&dir, "wrong.kek", &rand::random::<[u8; 32]>());
    let short = write_file(&dir, "short.kek", &[1u8; 31]);

    // Creation: the KEK is required and must be 32 bytes; the volume says it is encrypted.
    for (args, code, says) in [
        (vec!["volume", "create", "x", "--size", "16MiB", "--encrypt"], 2, "--kek-file"),
        (vec!["volume", "create", "x", "--size", "16MiB", "--encrypt", "--kek-file", &short], 5, "holds 31 bytes"),
        (vec!["volume", "create", "x", "--size", "16MiB", "--kek-file", &good], 2, "--encrypt"),
    ] {
        let (c, _, err) = cluster.cli(&args).await.unwrap();
        assert_eq!(c, Some(code), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    for name in ["enc", "enc2"] {
        let (c, _, err) = cluster.cli(&["volume", "create", name, "--size", "16MiB", "--encrypt", "--kek-file", &good]).await.unwrap();
        assert_eq!(c, Some(0), "{err}");
    }
    let (_, out, _) = cluster.cli(&["--json", "volume", "show", "enc"]).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["encrypted"].as_bool(), v["key_version"].as_u64()), (Some(true), Some(1)), "{v}");

    // Attaching needs the right KEK; refused attempts attach nothing (no --force needed after).
    let (code, msg) = cluster.attach_nbd("enc", &[]).err().expect("refused without a KEK");
    assert_eq!(code, Some(5), "{msg}");
    assert!(msg.contains("is encrypted"), "{msg}");
    let (code, msg) = cluster.attach_nbd("enc", &["--kek-file", &wrong]).err().expect("refused with the wrong KEK");
    assert_eq!(code, Some(5), "{msg}");
    assert!(msg.contains("wrong --kek-file"), "{msg}");
    let (code, msg) = cluster.attach_nbd("plain", &["--kek-file", &good]).err().expect("a KEK for a plain volume is a mistake");
    assert_eq!(code, Some(5), "{msg}");
    let attached = cluster.attach_nbd("enc", &["--kek-file", &good]).expect("attach with the KEK");

    // Data through NBD: back in the clear through the attach, nowhere in the clear on the
    // nodes' files or the raw device.
    let marker = format!("BASALT-SHRED-{:016x}|", seed()).into_bytes();
    let data = marked(&marker, 1 << 20);
    // Scratch files off the image: the test must not put plaintext on the device itself.
    let scratch = tempfile::tempdir().unwrap();
    let src = write_file(scratch.path(), "marker.raw", &data);
    let copy = std::process::Command::new("nbdcopy").args([&src, &attached.uri]).output().unwrap();
    assert!(copy.status.success(), "nbdcopy: {}", String::from_utf8_lossy(&copy.stderr));
    let back = scratch.path().join("back.raw");
    let copy = std::process::Command::new("nbdcopy").arg(&attached.uri).arg(&back).output().unwrap();
    assert!(copy.status.success(), "nbdcopy: {}", String::from_utf8_lossy(&copy.stderr));
    assert_eq!(&std::fs::read(&back).unwrap()[..data.len()], &data[..], "read back through the KEK");
    drop(attached);
    image.sync();
    let in_files: Vec<_> = scan(&cluster, &marker).await;
    assert!(in_files.is_empty(), "plaintext in {in_files:?}");
    let raw = image.image_dir.path().to_path_buf();
    let m = marker.clone();
    assert!(tokio::task::spawn_blocking(move || find_marker(&raw, &m)).await.unwrap().is_empty(), "plaintext on the raw device");

    // The wrapped key lives in the three meta nodes' key stores and nowhere else.
    let wrapped = stored_key(&cluster, 1, &kek_bytes, "enc");
    let homes = scan(&cluster, &wrapped).await;
    assert_eq!(homes.len(), 3, "{homes:?}");
    assert!(homes.iter().all(|(p, n)| p.ends_with("keys/wrapped.keys") && *n == 1), "{homes:?}");

    // Rekey: the same data key under a new KEK; the old wrapped key is erased everywhere, the
    // old KEK no longer opens the volume, the new one opens its data.
    let new_bytes: [u8; 32] = rand::random();
    let new_kek = write_file(&dir, "new.kek", &new_bytes);
    let (c, _, err) = cluster.cli(&["volume", "rekey", "enc", "--kek-file", &wrong, "--new-kek-file", &new_kek]).await.unwrap();
    assert!(c == Some(5) && err.contains("wrong --kek-file"), "{c:?} {err}");
    let (c, _, err) = cluster.cli(&["volume", "rekey", "enc", "--kek-file", &good, "--new-kek-file", &new_kek]).await.unwrap();
    assert_eq!(c, Some(0), "{err}");
    wait_gone(&cluster, &wrapped, "the wrapped key a rekey replaced").await;
    let rewrapped = stored_key(&cluster, 2, &new_bytes, "enc");
    let (code, msg) = cluster.attach_nbd("enc", &["--kek-file", &good]).err().expect("the old KEK no longer opens it");
    assert!(code == Some(5) && msg.contains("wrong --kek-file"), "{code:?} {msg}");
    let attached = cluster.attach_nbd("enc", &["--kek-file", &new_kek, "--force"]).expect("the new KEK opens it");
    let copy = std::process::Command::new("nbdcopy").arg(&attached.uri).arg(&back).output().unwrap();
    assert!(copy.status.success(), "nbdcopy: {}", String::from_utf8_lossy(&copy.stderr));
    assert_eq!(&std::fs::read(&back).unwrap()[..data.len()], &data[..], "the same data after the rekey");
    drop(attached);

    // A damaged copy is healed from another meta node; with every copy damaged the attach
    // fails saying so, and writes nothing.
    let (_, out, _) = cluster.cli(&["--json", "volume", "show", "enc2"]).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["encrypted"], true, "{v}");
    let wrapped2 = stored_key(&cluster, 1, &kek_bytes, "enc2");
    damage_key(&cluster, &[1, 2], &wrapped2);
    let a = cluster.attach_nbd("enc2", &["--kek-file", &good]).expect("one intact copy is enough");
    drop(a);
    let intact: Vec<u64> = (1..=3)
        .filter(|id| std::fs::read(cluster.node(*id).data_dir.join("keys/wrapped.keys")).unwrap().windows(73).any(|w| w == wrapped2))
        .collect();
    damage_key(&cluster, &intact, &wrapped2);
    let (code, msg) = cluster.attach_nbd("enc2", &["--kek-file", &good, "--force"]).err().expect("every copy damaged");
    assert_eq!(code, Some(5), "{msg}");
    assert!(msg.contains("corrupt"), "{msg}");

    // Deleting shreds the key: gone from every file and from the raw device, and the
    // ciphertext left for the scrubber opens with nothing the cluster holds.
    let (c, _, err) = cluster.cli(&["volume", "delete", "enc"]).await.unwrap();
    assert_eq!(c, Some(0), "{err}");
    wait_gone(&cluster, &rewrapped, "the deleted volume's wrapped key").await;
    image.sync();
    for (what, key) in [("the deleted volume's wrapped key", &rewrapped), ("the key its rekey replaced", &wrapped)] {
        let (raw, w) = (image.image_dir.path().to_path_buf(), key.clone());
        let left = tokio::task::spawn_blocking(move || find_marker(&raw, &w)).await.unwrap();
        assert!(left.is_empty(), "{what} is still on the raw device: {left:?}");
    }
    let (code, msg) = cluster.attach_nbd("enc", &["--kek-file", &new_kek]).err().expect("deleted");
    assert_eq!(code, Some(3), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meta_node_down_at_creation_gets_its_copy_of_the_key() {
    let mut cluster = TestCluster::with_volume("plain", 16 << 20).await.unwrap();
    cluster.kill9(3);
    let kek: [u8; 32] = rand::random();
    let path = write_file(cluster.path(), "late.kek", &kek);
    // Two of three meta nodes are a majority: creation goes ahead.
    let (c, _, err) = cluster.cli(&["volume", "create", "late", "--size", "16MiB", "--encrypt", "--kek-file", &path]).await.unwrap();
    assert_eq!(c, Some(0), "{err}");
    let wrapped = stored_key(&cluster, 1, &kek, "late");
    let store_3 = cluster.node(3).data_dir.join("keys/wrapped.keys");
    let on_3 = || std::fs::read(&store_3).unwrap_or_default().windows(wrapped.len()).any(|w| w == wrapped);
    assert!(!on_3(), "node-3 was down");
    cluster.restart(3).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    while !on_3() {
        assert!(std::time::Instant::now() < deadline, "node-3 never got its copy of the key:\n{}", cluster.logs());
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    // With the two others' copies damaged, node-3's copy alone opens the volume.
    damage_key(&cluster, &[1, 2], &wrapped);
    assert!(cluster.attach_nbd("late", &["--kek-file", &path]).is_ok(), "node-3's copy serves the key");
}
