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
    let reply = data
        .read(ReadRequest { pg: pg.0, volume_id: volume.id().0, offset, length: 4096, map_version, snapshot_epoch: 0 })
        .await
        .unwrap()
        .into_inner();
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

/// fio's nbd engine with crc32c verify headers (`jobs`: each `--name`, its region and whether
/// it writes, verifies or both); whether fio exited 0 with no error and no bad block, and its
/// output. The shared options come first: fio applies options before the first `--name` to
/// every job, those after it to that job only.
fn fio(uri: &str, jobs: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("fio")
        .args(["--ioengine=nbd", &format!("--uri={uri}"), "--bs=4k", "--iodepth=16", "--rw=randwrite", "--verify=crc32c"])
        .args(["--verify_fatal=1", "--verify_state_save=0", "--group_reporting"])
        .args(jobs)
        .current_dir(std::env::temp_dir())
        .output()
        .expect("fio");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && !text.contains("verify: bad") && text.contains("err= 0"), text)
}

/// The fio jobs of the re-encryption test: each writes (or, with `verify_only`, checks) its
/// own region with its own deterministic pattern.
fn region(name: &str, offset_mib: u64, size_mib: u64) -> Vec<String> {
    vec![format!("--name={name}"), format!("--offset={offset_mib}M"), format!("--size={size_mib}M")]
}

async fn shown(cluster: &TestCluster, name: &str) -> serde_json::Value {
    let (code, out, err) = cluster.cli(&["--json", "volume", "show", name]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    serde_json::from_str(&out).unwrap()
}

/// `volume rekey --reencrypt` while the volume is attached and fio writes and verifies through
/// NBD, with the attach process and a node killed (-9) midway: fio never sees an error or a bad
/// block, the rotation finishes (the restarted attach process resumes it), and afterwards the
/// old data key opens no block, the new one opens every block, and the old wrapped key is in
/// no node's files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reencryption_while_in_use_survives_killing_the_attach_process_and_a_node() {
    let mut cluster = TestCluster::with_volume("plain", 16 << 20).await.unwrap();
    let dir = cluster.path().to_path_buf();
    let old_bytes: [u8; 32] = rand::random();
    let attach_kek = write_file(&dir, "attach.kek", &old_bytes);
    let old_kek = write_file(&dir, "old.kek", &old_bytes);
    let (c, _, err) = cluster.cli(&["volume", "create", "rot", "--size", "64MiB", "--encrypt", "--kek-file", &attach_kek]).await.unwrap();
    assert_eq!(c, Some(0), "{err}");
    let client = cluster.client().await.unwrap();
    let (_, old_keys, _) = client.volume_keys("rot", &[&Kek::from_bytes(old_bytes)]).await.unwrap();
    let old_wrapped = stored_key(&cluster, 1, &old_bytes, "rot");
    let attached = cluster.attach_nbd("rot", &["--kek-file", &attach_kek]).expect("attach");

    // Region A is written under key version 1.
    let a = region("a", 0, 16);
    let (ok, text) = fio(&attached.uri, &[a.as_slice(), &["--do_verify=1".into()]].concat().iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{text}");

    // A second host reads the volume (read-only), through the same KEK file.
    let reader = cluster.attach_nbd("rot", &["--kek-file", &attach_kek, "--read-only"]).expect("read-only attach");

    // The operator installs the new KEK where the attach process reads it, then rotates
    // (slowly, so the kills land midway: 64 MiB at 2 MiB/s).
    let new_bytes: [u8; 32] = rand::random();
    let staged = write_file(&dir, "attach.kek.new", &new_bytes);
    std::fs::rename(&staged, &attach_kek).unwrap();
    // Bad requests change nothing: a wrong old KEK, a plain volume, a rate without --reencrypt.
    let wrong = write_file(&dir, "wrong.kek", &rand::random::<[u8; 32]>());
    for (args, code, says) in [
        (vec!["volume", "rekey", "rot", "--kek-file", &wrong, "--reencrypt"], 5, "wrong --kek-file"),
        (vec!["volume", "rekey", "plain", "--kek-file", &old_kek, "--reencrypt"], 5, "not encrypted"),
        (vec!["volume", "rekey", "rot", "--kek-file", &old_kek, "--new-kek-file", &attach_kek, "--max-rate", "1MiB"], 2, "--reencrypt"),
        (vec!["volume", "rekey", "rot", "--kek-file", &old_kek], 2, "--new-kek-file"),
    ] {
        let (c, _, err) = cluster.cli(&args).await.unwrap();
        assert!(c == Some(code) && err.contains(says), "{args:?}: {c:?} {err}");
    }
    assert_eq!(shown(&cluster, "rot").await["key_version"].as_u64(), Some(1));
    let mut rekey = cluster.basalt_cmd();
    rekey.args(["--json", "volume", "rekey", "rot", "--kek-file", &old_kek, "--new-kek-file", &attach_kek, "--reencrypt", "--max-rate", "2MiB"]);
    let rekey = rekey.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();

    // Region B is written and verified while the blocks move.
    let b = region("b", 24, 16);
    let uri = attached.uri.clone();
    let args: Vec<String> = [b.as_slice(), &["--do_verify=1".into()]].concat();
    let (ok, text) = tokio::task::spawn_blocking(move || fio(&uri, &args.iter().map(String::as_str).collect::<Vec<_>>())).await.unwrap();
    assert!(ok, "fio during the re-encryption: {text}");
    // The attach process has moved some blocks, not all, when it is killed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut attached = attached;
    loop {
        let v = shown(&cluster, "rot").await;
        assert_eq!((v["key_version"].as_u64(), v["reencrypting"].as_bool()), (Some(2), Some(true)), "{v}");
        let next = v["reencrypt_next_block"].as_u64().unwrap();
        if next > 0 {
            assert!(next < (64 << 20) / 4096, "the walk is midway: {v}");
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = attached.child.kill();
            let mut err = String::new();
            let _ = attached.child.stderr.take().map(|mut s| std::io::Read::read_to_string(&mut s, &mut err));
            panic!("the attach process moved no block: {v}\nits stderr: {err}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }

    // kill -9 of the attach process; the same command line (and --force, since the dead
    // process still holds the attachment) resumes the walk with the new KEK.
    drop(attached);
    let attached = cluster.attach_nbd("rot", &["--kek-file", &attach_kek, "--force"]).expect("attach again");
    // kill -9 of a node while fio checks A and B and writes region C.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    cluster.kill9(2);
    let uri = attached.uri.clone();
    let jobs: Vec<String> = [
        a.as_slice(),
        &["--verify_only=1".into()],
        b.as_slice(),
        &["--verify_only=1".into()],
        region("c", 44, 16).as_slice(),
        &["--do_verify=1".into()],
    ]
    .concat();
    let (ok, text) = tokio::task::spawn_blocking(move || fio(&uri, &jobs.iter().map(String::as_str).collect::<Vec<_>>())).await.unwrap();
    assert!(ok, "fio across the kills: {text}\n{}", cluster.logs());
    cluster.restart(2).await.unwrap();

    // The rotation finishes; the rekey command followed it to the end.
    let output = tokio::task::spawn_blocking(move || rekey.wait_with_output()).await.unwrap().unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "rekey: {err}\n{}", cluster.logs());
    assert!(err.contains("\"progress_percent\":100"), "progress shown as percentages: {err}");
    let v = shown(&cluster, "rot").await;
    assert_eq!((v["key_version"].as_u64(), v["reencrypting"].as_bool()), (Some(2), Some(false)), "{v}");

    // Every block fio wrote is intact, through the attach process that resumed the walk.
    let uri = attached.uri.clone();
    let jobs: Vec<String> = [a.as_slice(), &["--verify_only=1".into()], b.as_slice(), &["--verify_only=1".into()]].concat();
    let (ok, text) = tokio::task::spawn_blocking(move || fio(&uri, &jobs.iter().map(String::as_str).collect::<Vec<_>>())).await.unwrap();
    assert!(ok, "fio after the re-encryption: {text}");
    // The reader, started before the rotation, reads the moved blocks too.
    let scratch = tempfile::tempdir().unwrap();
    let (via_reader, via_holder) = (scratch.path().join("reader.raw"), scratch.path().join("holder.raw"));
    for (uri, file) in [(&reader.uri, &via_reader), (&attached.uri, &via_holder)] {
        let copy = std::process::Command::new("nbdcopy").arg(uri).arg(file).output().unwrap();
        assert!(copy.status.success(), "nbdcopy from {uri}: {}", String::from_utf8_lossy(&copy.stderr));
    }
    let (r, h) = (std::fs::read(&via_reader).unwrap(), std::fs::read(&via_holder).unwrap());
    assert!(r == h && r[..16 << 20].iter().any(|b| *b != 0), "the reader sees what the holder sees");
    drop((attached, reader));

    // The new key alone opens the whole volume (no block is left under version 1); the old
    // data key opens nothing that holds data.
    let (id, new_keys, current) = client.volume_keys("rot", &[&Kek::from_bytes(new_bytes)]).await.unwrap();
    assert_eq!((current, new_keys.iter().map(|k| k.version()).collect::<Vec<_>>()), (2, vec![2]), "only the new version is left");
    let new_only = client.open_volume("rot").await.unwrap().with_cipher(VolumeCipher::new(id, new_keys, 2).unwrap());
    let old_only = client.open_volume("rot").await.unwrap().with_cipher(VolumeCipher::new(id, old_keys, 1).unwrap());
    for mib in 0..64u64 {
        new_only.read(mib << 20, 1 << 20).await.unwrap_or_else(|e| panic!("the new key opens MiB {mib}: {e}"));
    }
    for mib in [0u64, 8, 30, 50] {
        let e = old_only.read(mib << 20, 1 << 20).await.expect_err("the old data key opens nothing");
        assert!(e.to_string().contains("key version 2"), "{e}");
    }
    // The old wrapped key (and its rewrapped copy) are erased from every node.
    wait_gone(&cluster, &old_wrapped, "the wrapped key of version 1").await;
    let kek = Kek::from_bytes(new_bytes);
    for id in 1..=3u64 {
        let bytes = std::fs::read(cluster.node(id).data_dir.join("keys/wrapped.keys")).unwrap();
        let versions: Vec<u32> = bytes
            .chunks(256)
            .filter(|s| s.starts_with(b"BKY1"))
            .filter_map(|s| basalt_volume_client::crypt::WrappedKey::parse("rot", &s[26..26 + u16::from_le_bytes([s[24], s[25]]) as usize]).ok())
            .filter(|w| w.unwrap_with(&kek, "rot").is_ok())
            .map(|w| w.version())
            .collect();
        assert_eq!(versions, vec![2], "node-{id} keeps only the new version");
    }
}

/// With nothing attached, `volume rekey --reencrypt` (keeping the KEK) attaches and moves the
/// blocks itself, showing progress, and detaches; afterwards only the new data key is left and
/// it opens the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unattached_volume_is_reencrypted_by_the_rekey_command_itself() {
    let cluster = TestCluster::with_volume("plain", 16 << 20).await.unwrap();
    let enc = encrypted_volume(&cluster, "idle").await;
    let data = marked(b"BEFORE-ROTATION|", 3 << 20);
    enc.write(1 << 20, data.clone(), false).await.unwrap();
    let client = cluster.client().await.unwrap();
    client.detach_volume(&enc).await.unwrap();
    let kek = cluster.path().join("idle.kek");
    let (c, out, err) =
        cluster.cli(&["--json", "volume", "rekey", "idle", "--kek-file", kek.to_str().unwrap(), "--reencrypt", "--max-rate", "64MiB"]).await.unwrap();
    assert_eq!(c, Some(0), "{err}");
    assert!(err.contains("\"progress_percent\":100"), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["key_version"].as_u64(), v["reencrypting"].as_bool(), v["attached_by"].as_str()),
        (Some(2), Some(false), Some("")),
        "no attachment left: {v}"
    );
    let (id, keys, current) = client.volume_keys("idle", &[&Kek::from_bytes(std::fs::read(&kek).unwrap().try_into().unwrap())]).await.unwrap();
    assert_eq!((current, keys.len()), (2, 1));
    let vol = client.open_volume("idle").await.unwrap().with_cipher(VolumeCipher::new(id, keys, 2).unwrap());
    assert_eq!(vol.read(1 << 20, 3 << 20).await.unwrap(), data);
    // As stored: a moved block carries version 2 in its nonce; an unwritten one has no context.
    let (_, moved) = raw_block(&cluster, &vol, 1 << 20).await;
    assert_eq!(&moved[..2], &[0, 2], "{moved:?}");
    let (_, unwritten) = raw_block(&cluster, &vol, 0).await;
    assert!(unwritten.iter().all(|b| *b == 0), "unwritten blocks stay unwritten: {unwritten:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_clone_has_keys_of_its_own_and_snapshots_outlive_a_reencryption() {
    let cluster = TestCluster::with_volume("plain", 16 << 20).await.unwrap();
    let client = cluster.client().await.unwrap();
    let src = encrypted_volume(&cluster, "src").await;
    let data = marked(b"BEFORE-THE-CLONE|", 2 << 20);
    src.write(0, data.clone(), false).await.unwrap();
    client.detach_volume(&src).await.unwrap();
    let (c, _, err) = cluster.cli(&["snapshot", "create", "src", "s1"]).await.unwrap();
    assert_eq!(c, Some(0), "{err}");
    let kek_path = cluster.path().join("src.kek");
    let kek_file = kek_path.to_str().unwrap();
    let kek = Kek::from_bytes(std::fs::read(&kek_path).unwrap().try_into().unwrap());

    // Without the KEK, or with another one: refused, saying why.
    let (c, _, err) = cluster.cli(&["volume", "clone", "src@s1", "c"]).await.unwrap();
    assert!(c != Some(0) && err.contains("--kek-file"), "{c:?} {err}");
    let other = write_file(cluster.path(), "other.kek", &rand::random::<[u8; 32]>());
    let (c, _, err) = cluster.cli(&["volume", "clone", "src@s1", "c", "--kek-file", &other]).await.unwrap();
    assert!(c != Some(0) && err.contains("does not open"), "{c:?} {err}");
    let (c, _, err) = cluster.cli(&["volume", "clone", "plain@nope", "c", "--kek-file", kek_file]).await.unwrap();
    assert!(c != Some(0) && err.contains("not encrypted"), "a plain source takes no keys: {c:?} {err}");
    let (c, out, err) = cluster.cli(&["--json", "volume", "clone", "src@s1", "c", "--kek-file", kek_file]).await.unwrap();
    assert_eq!(c, Some(0), "{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((shown["encrypted"].as_bool(), shown["clone_of"].as_str()), (Some(true), Some("src@s1")), "{shown}");

    // The clone reads the snapshot through its inherited key and seals with a fresh one.
    let clone_cipher = client.volume_cipher("c", &kek).await.unwrap();
    assert_eq!((clone_cipher.current_version(), clone_cipher.versions()), (2, vec![1, 2]));
    let c = client.attach_volume("c", "test", false).await.unwrap().with_cipher(clone_cipher);
    assert_eq!(c.read(0, 2 << 20).await.unwrap(), data);
    let mine = marked(b"WRITTEN-BY-THE-CLONE|", 64 << 10);
    c.write(1 << 20, mine.clone(), false).await.unwrap();
    let mut want = data.to_vec();
    want[1 << 20..(1 << 20) + (64 << 10)].copy_from_slice(&mine);
    assert_eq!(c.read(0, 2 << 20).await.unwrap(), Bytes::from(want.clone()));
    let (_, written) = raw_block(&cluster, &c, 1 << 20).await;
    assert_eq!(&written[..2], &[0, 2], "the clone's own writes use its own key version: {written:?}");
    let (_, copied) = raw_block(&cluster, &c, (1 << 20) + (64 << 10)).await;
    assert_eq!(&copied[..2], &[0, 1], "the rest of the copied chunk is the source's ciphertext: {copied:?}");

    // Re-encrypting the source while a snapshot holds version-1 blocks keeps version 1 until
    // the last snapshot goes; the snapshot reads throughout.
    let (code, _, err) = cluster.cli(&["volume", "rekey", "src", "--kek-file", kek_file, "--reencrypt", "--max-rate", "64MiB"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let (id, keys, current) = client.volume_keys("src", &[&kek]).await.unwrap();
    assert_eq!((current, keys.len()), (2, 2), "version 1 is kept for the snapshot");
    let s1 = client.open_snapshot("src", "s1").await.unwrap().with_cipher(VolumeCipher::new(id, keys, 2).unwrap());
    assert_eq!(s1.read(0, 2 << 20).await.unwrap(), data, "the snapshot still opens after the re-encryption");
    let (code, _, err) = cluster.cli(&["snapshot", "delete", "src", "s1"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let (_, keys, _) = client.volume_keys("src", &[&kek]).await.unwrap();
    assert_eq!(keys.iter().map(|k| k.version()).collect::<Vec<_>>(), vec![2], "the last snapshot took version 1 with it");

    // The source goes, its keys shredded; the clone keeps reading with its own copies.
    let (code, _, err) = cluster.cli(&["volume", "delete", "src"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    client.detach_volume(&c).await.unwrap();
    let cipher = client.volume_cipher("c", &kek).await.unwrap();
    let c = client.open_volume("c").await.unwrap().with_cipher(cipher);
    assert_eq!(c.read(0, 2 << 20).await.unwrap(), Bytes::from(want));
}

fn qemu_io(uri: &str, read_only: bool, cmd: &str) -> (bool, String) {
    let mut c = std::process::Command::new("qemu-io");
    c.args(["-f", "raw"]);
    if read_only {
        c.arg("-r");
    }
    let out = c.args(["-c", cmd, uri]).output().expect("qemu-io");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && !text.contains("failed"), text)
}

/// Live migration of an encrypted volume: the destination's `--standby` attach opens the
/// volume's keys with the same KEK (without one it is refused), reads what the source wrote
/// before the handover, and after `basalt handover` writes and reads through the same data
/// key while the source is fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_volume_hands_over_to_a_standby_that_has_its_kek() {
    let cluster = TestCluster::with_volume("plain", 16 << 20).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kek = write_file(dir.path(), "kek", &rand::random::<[u8; 32]>());
    let (c, _, err) = cluster.cli(&["volume", "create", "enc", "--size", "16MiB", "--encrypt", "--kek-file", &kek]).await.unwrap();
    assert_eq!(c, Some(0), "{err}");
    let source = cluster.attach_nbd("enc", &["--kek-file", &kek]).expect("source attach");
    let (ok, out) = qemu_io(&source.uri, false, "write -P 0x5a 0 1M");
    assert!(ok, "{out}");

    let (code, msg) = cluster.attach_nbd("enc", &["--standby"]).err().expect("a standby without the KEK is refused");
    assert!(msg.contains("--kek-file"), "{code:?} {msg}");
    let standby = cluster.attach_nbd("enc", &["--json", "--standby", "--kek-file", &kek]).expect("standby attach");
    let ready = standby.ready.clone().expect("--json ready line");
    assert_eq!(ready["mode"], "standby", "{ready}");
    let holder = ready["holder"].as_str().expect("the standby's holder").to_string();
    let (ok, out) = qemu_io(&standby.uri, true, "read -P 0x5a 0 1M");
    assert!(ok, "the standby reads the source's writes through the key: {out}");

    let (c, _, err) = cluster.cli(&["handover", "enc", "--to", &holder]).await.unwrap();
    assert_eq!(c, Some(0), "{err}");
    let (ok, out) = qemu_io(&standby.uri, false, "write -P 0x6b 1M 1M");
    assert!(ok, "the new holder writes: {out}");
    let (ok, out) = qemu_io(&standby.uri, true, "read -P 0x5a 0 1M");
    assert!(ok, "{out}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while qemu_io(&source.uri, false, "write -P 0x7c 0 4k").0 {
        assert!(std::time::Instant::now() < deadline, "the source still writes after the handover");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (ok, out) = qemu_io(&standby.uri, true, "read -P 0x5a 0 1M");
    assert!(ok, "a fenced source's write never lands: {out}");
    let (ok, out) = qemu_io(&standby.uri, true, "read -P 0x6b 1M 1M");
    assert!(ok, "{out}");
}
