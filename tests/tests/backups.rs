//! Backups against real `basalt-node` processes (three storage+meta nodes and a backup node):
//! `basalt backup create` copies a snapshot to the backup node, a second backup reads and
//! stores only what changed, `backup restore` gives back the same bytes (also after the
//! volume is deleted), a damaged piece is named by `backup verify` and by a restore, deleted
//! backups leave no trace on the backup node, and a backup node killed -9 mid-copy or
//! mid-restore leaves nothing half-made listed as complete.

use std::path::Path;
use std::time::{Duration, Instant};

use basalt_tests::{NodeSpec, TestCluster, simple_spec};
use bytes::Bytes;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
const BACKUP_NODE: u64 = 4;

async fn cluster_with_backup_node() -> TestCluster {
    let mut specs = simple_spec(3);
    specs.push(NodeSpec { id: BACKUP_NODE, labels: "zone=z4,host=h4".into(), roles: vec!["backup"] });
    let cluster = TestCluster::start(specs).await.unwrap();
    cluster.init(8, "zone").await.unwrap();
    cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();
    cluster
}

async fn create_volume(cluster: &TestCluster, name: &str, size: u64) {
    let (code, _, err) = cluster.cli(&["volume", "create", name, "--size", &size.to_string()]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
}

/// Runs the CLI with `--json`, expects exit 0, returns the JSON.
async fn json(cluster: &TestCluster, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (code, out, err) = cluster.cli(&all).await.unwrap();
    assert_eq!(code, Some(0), "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// Chunk `i`'s bytes in generation `gen`: every 4 KiB block distinct (nothing deduplicates
/// by accident), compressible like real data is only in part.
fn chunk(i: u64, generation: u8) -> Vec<u8> {
    let mut out = vec![0u8; MIB as usize];
    let mut state = (i << 8 | u64::from(generation)).wrapping_add(0x9E37_79B9_7F4A_7C15);
    for (n, word) in out.chunks_mut(8).enumerate() {
        // splitmix64 for the first half of each block, a constant run for the second.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let v = if (n * 8) % 4096 < 2048 { z } else { u64::from_le_bytes([(n * 8 / 4096) as u8 ^ i as u8; 8]) };
        word.copy_from_slice(&v.to_le_bytes());
    }
    out
}

fn files_containing(dir: &Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p).is_ok_and(|data| data.windows(needle.len()).any(|w| w == needle)) {
                found.push(p);
            }
        }
    }
    found
}

/// Creates volume `name` of `size` bytes, writes every chunk of it (generation `generation`)
/// and detaches; returns its bytes.
async fn filled_volume(cluster: &TestCluster, name: &str, size: u64, generation: u8) -> Vec<u8> {
    create_volume(cluster, name, size).await;
    let client = cluster.client().await.unwrap();
    let vol = client.attach_volume(name, "writer", false).await.unwrap();
    let mut image = vec![0u8; size as usize];
    for i in 0..size / MIB {
        let data = chunk(i, generation);
        image[(i * MIB) as usize..((i + 1) * MIB) as usize].copy_from_slice(&data);
        vol.write(i * MIB, Bytes::from(data), false).await.unwrap();
    }
    client.detach_volume(&vol).await.unwrap();
    image
}

async fn read_all(cluster: &TestCluster, name: &str, size: u64) -> Vec<u8> {
    let client = cluster.client().await.unwrap();
    let v = client.open_volume(name).await.unwrap();
    let mut out = Vec::with_capacity(size as usize);
    for off in (0..size).step_by(16 * MIB as usize) {
        out.extend_from_slice(&v.read(off, (16 * MIB).min(size - off)).await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_copy_only_changed_chunks_restore_the_same_bytes_and_leave_no_trace_when_deleted() {
    let cluster = cluster_with_backup_node().await;
    const SIZE: u64 = 256 * MIB;
    const WRITTEN: u64 = 100;
    create_volume(&cluster, "v", SIZE).await;
    let client = cluster.client().await.unwrap();
    let vol = client.attach_volume("v", "writer", false).await.unwrap();
    let mut image = vec![0u8; SIZE as usize];
    for i in 0..WRITTEN {
        let mut data = chunk(i, 0);
        if i == 7 {
            data[100..124].copy_from_slice(b"BACKUP-MARKER-7f3a9c21e5");
        }
        image[(i * MIB) as usize..((i + 1) * MIB) as usize].copy_from_slice(&data);
        vol.write(i * MIB, Bytes::from(data), false).await.unwrap();
    }
    client.detach_volume(&vol).await.unwrap();

    // Bad input: each a clear error with its exit code.
    for (args, want, what) in [
        (vec!["backup", "create", "nope"], 3, "an unknown volume"),
        (vec!["backup", "create", "v", "--snapshot", "nope"], 3, "an unknown snapshot"),
        (vec!["backup", "show", "99"], 3, "an unknown backup"),
        (vec!["backup", "restore", "99", "--to", "x"], 3, "restoring an unknown backup"),
        (vec!["backup", "delete", "99"], 3, "deleting an unknown backup"),
        (vec!["backup", "show", "one"], 2, "a backup id that is no number"),
    ] {
        let (code, _, err) = cluster.cli(&args).await.unwrap();
        assert_eq!(code, Some(want), "{what}: {err}");
        assert!(!err.trim().is_empty(), "{what}: says why");
    }

    // The first backup reads every chunk with data; its snapshot goes once it is copied.
    let first = json(&cluster, &["backup", "create", "v"]).await;
    assert_eq!(first["state"], "complete", "{first}");
    let copy = &first["copies"][0];
    assert_eq!(copy["node"], BACKUP_NODE, "{first}");
    assert_eq!(copy["changed_bytes"], WRITTEN * MIB, "{first}");
    assert_eq!(copy["data_bytes"], WRITTEN * MIB, "{first}");
    assert_eq!(copy["incremental_to"], 0, "{first}");
    let stored_first = copy["stored_bytes"].as_u64().unwrap();
    assert!(stored_first > WRITTEN * MIB / 4 && stored_first < WRITTEN * MIB, "compressed, not empty: {stored_first}");
    let snaps = json(&cluster, &["snapshot", "list", "v"]).await;
    assert_eq!(snaps.as_array().map(Vec::len), Some(0), "the snapshot taken for the backup is deleted: {snaps}");
    let backups_dir = cluster.node(BACKUP_NODE).data_dir.join("backups");
    assert!(!files_containing(&backups_dir, b"BACKUP-MARKER-7f3a9c21e5").is_empty(), "the marker is stored on the backup node");

    // 1% of the written chunks change: the second backup reads and stores about that much.
    let vol = client.attach_volume("v", "writer", false).await.unwrap();
    let data = chunk(50, 1);
    image[(50 * MIB) as usize..(51 * MIB) as usize].copy_from_slice(&data);
    vol.write(50 * MIB, Bytes::from(data), false).await.unwrap();
    client.detach_volume(&vol).await.unwrap();
    let (code, _, err) = cluster.cli(&["snapshot", "create", "v", "mine"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let second = json(&cluster, &["backup", "create", "v", "--snapshot", "mine"]).await;
    let copy = &second["copies"][0];
    let id2 = second["id"].as_u64().unwrap();
    assert_eq!(copy["incremental_to"], first["id"], "{second}");
    assert_eq!(copy["changed_bytes"], MIB, "one chunk of {WRITTEN} read: {second}");
    assert_eq!(copy["data_bytes"], WRITTEN * MIB, "{second}");
    let stored = copy["stored_bytes"].as_u64().unwrap();
    assert!(stored > 0 && stored <= MIB + 4096, "about 1% stored: {stored} bytes (first backup {stored_first})");
    eprintln!("backup figures: first {} read, {stored_first} stored; second {} read, {stored} stored", WRITTEN * MIB, MIB);
    let snaps = json(&cluster, &["snapshot", "list", "v"]).await;
    assert_eq!(snaps.as_array().map(Vec::len), Some(1), "a named snapshot stays: {snaps}");
    let listed = json(&cluster, &["backup", "list", "v"]).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    let verified = json(&cluster, &["backup", "verify", &id2.to_string()]).await;
    assert_eq!(verified["ok"], true, "{verified}");
    // Between verifications nothing is running; an unknown backup is named.
    let mut admin = cluster.admin().await.unwrap();
    let idle = admin.backup_verify_progress(basalt_proto::admin::BackupShowRequest { id: id2 }).await.unwrap().into_inner();
    assert!(!idle.running && idle.done == 0, "{idle:?}");
    let unknown = admin.backup_verify_progress(basalt_proto::admin::BackupShowRequest { id: 999 }).await.unwrap_err();
    assert!(unknown.message().contains("999"), "{unknown:?}");

    // Metrics: the backup node's counters, and per volume the last success on the meta leader.
    let m = cluster.metrics(BACKUP_NODE).await.unwrap();
    assert!(m.contains(&format!("basalt_backup_copies_total{{node=\"{BACKUP_NODE}\",outcome=\"ok\"}} 2")), "{m}");
    assert!(m.contains(&format!("basalt_backup_read_bytes_total{{node=\"{BACKUP_NODE}\"}} {}", (WRITTEN + 1) * MIB)), "{m}");
    assert!(m.contains("# TYPE basalt_backup_store_bytes gauge"), "{m}");
    let mut leader_metrics = String::new();
    for id in 1..=3 {
        let m = cluster.metrics(id).await.unwrap();
        if m.contains("basalt_backup_last_success_timestamp_seconds{") {
            leader_metrics = m;
        }
    }
    assert!(leader_metrics.contains("volume=\"v\""), "the meta leader reports the volume's last backup: {leader_metrics}");
    assert!(leader_metrics.contains("state=\"complete\"} 2"), "{leader_metrics}");

    // The backup outlives its volume; the restore gives back the snapshot's bytes.
    let (code, _, err) = cluster.cli(&["volume", "delete", "v"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let shown = json(&cluster, &["backup", "show", &id2.to_string()]).await;
    assert_eq!(shown["volume_deleted"], true, "{shown}");
    let restored = json(&cluster, &["backup", "restore", &id2.to_string(), "--to", "r"]).await;
    assert_eq!((restored["restoring"].as_bool(), restored["size"].as_u64()), (Some(false), Some(SIZE)), "{restored}");
    let back = read_all(&cluster, "r", SIZE).await;
    assert_eq!(Sha256::digest(&back), Sha256::digest(&image), "sha256 of the restored volume equals the snapshot's");
    let (code, _, err) = cluster.cli(&["backup", "restore", &id2.to_string(), "--to", "r"]).await.unwrap();
    assert_eq!(code, Some(4), "restoring onto an existing volume is refused: {err}");
    // The restored volume is an ordinary one: attachable.
    let r = client.attach_volume("r", "after-restore", false).await.unwrap();
    client.detach_volume(&r).await.unwrap();

    // Nodes read volumes only as backup nodes: another node certificate opens none.
    let (pg, leader, _) = cluster.pg_replicas("r", 0).await.unwrap();
    let mut internal = cluster.internal_data_client(&cluster.node(leader).addr).unwrap();
    let req = basalt_proto::data::ReadRequest { pg: pg.0, volume_id: r.id().0, offset: 0, length: 4096, map_version: 0, snapshot_epoch: 0 };
    let reply = internal.read(req).await.unwrap().into_inner();
    let refused = reply.error.expect("refused");
    assert_eq!(refused.code, basalt_proto::data::data_error::Code::PermissionDenied as i32, "{refused:?}");
    assert!(refused.message.contains("not a backup node"), "{refused:?}");
    // The backup node's own certificate reads, but writes only into a volume it is restoring.
    let mut as_backup = cluster.data_client_as_node(&cluster.node(leader).addr, BACKUP_NODE).unwrap();
    let map_version = client.map().version;
    let write = basalt_proto::data::WriteRequest {
        pg: pg.0,
        volume_id: r.id().0,
        offset: 0,
        data: Bytes::from(vec![1u8; 4096]),
        crcs: vec![basalt_common::crc32c(&[1u8; 4096])],
        fua: true,
        map_version,
        attach_epoch: r.epoch() + 1,
        write_epoch: 1,
        ..Default::default()
    };
    let refused = as_backup.write(write).await.unwrap().into_inner().error.expect("refused");
    assert_eq!(refused.code, basalt_proto::data::data_error::Code::PermissionDenied as i32, "{refused:?}");
    assert!(refused.message.contains("it is restoring"), "{refused:?}");
    // Orders only the meta leader gives are refused from any other node's certificate: a
    // backup node's, or a storage node's, cannot move leaderships or read wrapped keys.
    let order = basalt_proto::data::TransferLeaderRequest { pg: pg.0, to: leader };
    let refused = as_backup.transfer_leader(order).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains(&format!("TransferLeader is called by the meta leader only; node-{BACKUP_NODE} is not a meta node")),
        "{refused:?}"
    );
    let meta_addr = cluster.node(1).addr.clone();
    let key_get = basalt_proto::admin::KeyGetRequest { key_id: 1, version: 1 };
    let mut stranger = cluster.admin_as_node(&meta_addr, 9999).unwrap();
    let refused = stranger.key_get(key_get).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    // A damaged piece: `backup verify` names it (exit 10), and so does a restore.
    let pieces = files_containing(&backups_dir, b"BACKUP-MARKER-7f3a9c21e5");
    let piece = pieces.iter().find(|p| p.to_string_lossy().contains("/pieces/")).expect("the marker's piece").clone();
    let name = piece.file_name().unwrap().to_string_lossy().to_string();
    let mut raw = std::fs::read(&piece).unwrap();
    let at = raw.len() - 10;
    raw[at] ^= 0x40;
    std::fs::write(&piece, raw).unwrap();
    let (code, _, err) = cluster.cli(&["backup", "verify", &id2.to_string()]).await.unwrap();
    assert_eq!(code, Some(10), "{err}");
    assert!(err.contains(&name), "verify names the damaged piece: {err}");
    let (code, _, err) = cluster.cli(&["backup", "restore", &id2.to_string(), "--to", "r2"]).await.unwrap();
    assert_ne!(code, Some(0), "a restore from a damaged piece fails");
    assert!(err.contains(&name), "the restore names the damaged piece: {err}");
    let (code, _, err) = cluster.cli(&["backup", "delete", &id2.to_string()]).await.unwrap();
    assert_eq!(code, Some(7), "a backup being restored is not deleted: {err}");
    let (code, _, err) = cluster.cli(&["volume", "delete", "r2"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");

    // Deleted backups leave nothing on the backup node.
    for id in [first["id"].as_u64().unwrap(), id2] {
        let (code, _, err) = cluster.cli(&["backup", "delete", &id.to_string()]).await.unwrap();
        assert_eq!(code, Some(0), "{err}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !files_containing(&backups_dir, b"BACKUP-MARKER-7f3a9c21e5").is_empty() {
        assert!(Instant::now() < deadline, "the marker is still on the backup node");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let left = json(&cluster, &["backup", "list"]).await;
    assert_eq!(left.as_array().map(Vec::len), Some(0), "{left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_node_killed_mid_copy_or_mid_restore_leaves_nothing_half_made() {
    let mut cluster = cluster_with_backup_node().await;
    const SIZE: u64 = 192 * MIB;
    let image = filled_volume(&cluster, "v", SIZE, 3).await;

    // Killed as soon as the copy has begun: it either finished first (and is whole) or is
    // reported failed once the node is back, and a new backup then completes.
    let started = json(&cluster, &["backup", "create", "v", "--no-wait"]).await;
    let id = started["id"].as_u64().unwrap();
    cluster.kill9(BACKUP_NODE);
    cluster.restart(BACKUP_NODE).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let outcome = loop {
        let b = json(&cluster, &["backup", "show", &id.to_string()]).await;
        if b["state"] != "running" {
            break b;
        }
        assert!(Instant::now() < deadline, "backup {id} still running a minute after its node restarted: {b}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    eprintln!("backup killed mid-copy ended {}: {}", outcome["state"], outcome["error"]);
    let whole = match outcome["state"].as_str() {
        Some("failed") => {
            assert!(outcome["error"].as_str().unwrap_or_default().contains("restarted"), "a clear reason: {outcome}");
            let again = json(&cluster, &["backup", "create", "v"]).await;
            assert_eq!(again["state"], "complete", "the retry completes: {again}");
            again["id"].as_u64().unwrap()
        }
        _ => {
            assert_eq!(outcome["state"], "complete", "{outcome}");
            id
        }
    };
    let verified = json(&cluster, &["backup", "verify", &whole.to_string()]).await;
    assert_eq!(verified["ok"], true, "{verified}");

    // Killed mid-restore: the restarted node resumes it from its last checkpoint.
    let started = json(&cluster, &["backup", "restore", &whole.to_string(), "--to", "r", "--no-wait"]).await;
    assert_eq!(started["restoring"], true, "{started}");
    let (code, _, err) = cluster.cli(&["attach", "r", "--nbd-socket", "/tmp/basalt-never.sock"]).await.unwrap();
    assert_ne!(code, Some(0), "a volume being restored is not attachable");
    assert!(err.contains("being restored"), "{err}");
    cluster.kill9(BACKUP_NODE);
    let mid = json(&cluster, &["backup", "list"]).await;
    eprintln!("restore killed at: {}", mid);
    cluster.restart(BACKUP_NODE).await.unwrap();
    let done = json(&cluster, &["backup", "restore", &whole.to_string(), "--to", "r"]).await;
    assert_eq!(done["restoring"], false, "{done}");
    let back = read_all(&cluster, "r", SIZE).await;
    assert_eq!(Sha256::digest(&back), Sha256::digest(&image), "the resumed restore gives back the backup's bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_keep_their_newest_backups_and_a_deleted_volumes_backups_expire_without_a_trace() {
    let mut specs = simple_spec(3);
    specs.push(NodeSpec { id: BACKUP_NODE, labels: "zone=z4,host=h4".into(), roles: vec!["backup"] });
    let cluster = TestCluster::start_with(specs, "[backup]\nretain_after_delete = \"3s\"\n").await.unwrap();
    cluster.init(8, "zone").await.unwrap();
    cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();
    create_volume(&cluster, "s", 16 * MIB).await;
    let client = cluster.client().await.unwrap();
    let vol = client.attach_volume("s", "writer", false).await.unwrap();
    let mut data = chunk(2, 9);
    data[4000..4024].copy_from_slice(b"SCHEDULE-MARKER-58e1c0d2");
    vol.write(2 * MIB, Bytes::from(data), false).await.unwrap();
    client.detach_volume(&vol).await.unwrap();

    // Impossible or malformed schedules: each a clear error.
    for (args, want, what) in [
        (vec!["--every", "0", "--keep", "3", "--max-age", "1h", "--volume", "s"], 5, "a zero interval"),
        (vec!["--every", "1h", "--keep", "3", "--max-age", "10m", "--volume", "s"], 5, "pruned before the next run"),
        (vec!["--every", "1d", "--at", "25:00", "--keep", "3", "--max-age", "7d", "--volume", "s"], 5, "no such time of day"),
        (vec!["--every", "1h", "--keep", "0", "--max-age", "1d", "--volume", "s"], 5, "keeping nothing"),
        (vec!["--every", "soon", "--keep", "3", "--max-age", "1d", "--volume", "s"], 5, "an interval that is no duration"),
        (vec!["--every", "1h", "--keep", "3", "--max-age", "1d"], 2, "neither volumes nor --all"),
        (vec!["--every", "1h", "--keep", "3", "--max-age", "1d", "--volume", "nope"], 3, "an unknown volume"),
    ] {
        let mut full = vec!["schedule", "create", "bad"];
        full.extend_from_slice(&args);
        let (code, _, err) = cluster.cli(&full).await.unwrap();
        assert_eq!(code, Some(want), "{what}: {err}");
        assert!(!err.trim().is_empty(), "{what}: says why");
    }
    let (code, _, err) = cluster.cli(&["schedule", "delete", "nope"]).await.unwrap();
    assert_eq!(code, Some(3), "{err}");

    // Every 2 s, keep 3: after six runs, the three newest backups are left.
    let args = ["schedule", "create", "often", "--volume", "s", "--every", "2s", "--keep", "3", "--max-age", "1h"];
    let created = json(&cluster, &args).await;
    assert_eq!(created["keep"], 3, "{created}");
    let (code, _, err) = cluster.cli(&args).await.unwrap();
    assert_eq!(code, Some(4), "a duplicate name: {err}");
    // Seen while the schedule runs: six runs or more, three backups kept, the newest ones.
    let deadline = Instant::now() + Duration::from_secs(90);
    let kept = loop {
        let list = json(&cluster, &["backup", "list", "s"]).await;
        let list = list.as_array().unwrap().clone();
        let ids: Vec<u64> = list.iter().filter_map(|b| b["id"].as_u64()).collect();
        let newest = ids.iter().copied().max().unwrap_or(0);
        if newest >= 6 && list.len() == 3 && list.iter().all(|b| b["state"] == "complete") {
            assert_eq!(ids, vec![newest - 2, newest - 1, newest], "the three newest are kept: {list:?}");
            break list;
        }
        assert!(Instant::now() < deadline, "six scheduled runs pruned to three within 90 s: {list:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (code, _, err) = cluster.cli(&["schedule", "delete", "often"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(kept[2]["copies"][0]["changed_bytes"], 0, "nothing changed between runs, nothing read: {kept:?}");
    assert!(kept.iter().all(|b| b["schedule"] == "often"), "{kept:?}");
    let backups_dir = cluster.node(BACKUP_NODE).data_dir.join("backups");
    assert!(!files_containing(&backups_dir, b"SCHEDULE-MARKER-58e1c0d2").is_empty(), "the marker is stored on the backup node");

    // The volume is deleted: its backups expire after retain_after_delete (3 s here), except a
    // pinned one, which goes once unpinned; then the marker is in no file on the backup node.
    let pinned = kept[0]["id"].as_u64().unwrap().to_string();
    let shown = json(&cluster, &["backup", "pin", &pinned]).await;
    assert_eq!(shown["pinned"], true, "{shown}");
    let (code, _, err) = cluster.cli(&["volume", "delete", "s"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let wait_for = |n: usize| {
        let cluster = &cluster;
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let list = json(cluster, &["backup", "list"]).await;
                if list.as_array().map(Vec::len) == Some(n) {
                    return list;
                }
                assert!(Instant::now() < deadline, "expected {n} backup(s) left: {list}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    let left = wait_for(1).await;
    assert_eq!(left[0]["id"].as_u64().map(|i| i.to_string()), Some(pinned.clone()), "the pinned one stays: {left}");
    assert!(left[0]["volume_deleted_unix_ms"].as_u64().unwrap_or(0) > 0, "{left}");
    json(&cluster, &["backup", "pin", &pinned, "--unpin"]).await;
    wait_for(0).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !files_containing(&backups_dir, b"SCHEDULE-MARKER-58e1c0d2").is_empty() {
        assert!(Instant::now() < deadline, "the expired backups' marker is still on the backup node");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let audit = cluster.audit_records().await;
    assert!(
        audit.iter().any(|r| r["action"] == "backup.delete" && r["detail"].as_str().unwrap_or_default().contains("was deleted more than")),
        "expiry is in the audit log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_are_kept_on_two_backup_nodes_and_a_restore_rides_out_a_storage_node_kill() {
    let mut specs = simple_spec(3);
    for id in [4, 5] {
        specs.push(NodeSpec { id, labels: format!("zone=z{id},host=h{id}"), roles: vec!["backup"] });
    }
    let mut cluster = TestCluster::start(specs).await.unwrap();
    cluster.init(8, "zone").await.unwrap();
    cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();
    cluster
        .wait_status("both backup nodes up", Duration::from_secs(30), |s| {
            [4, 5].iter().all(|id| s.nodes.iter().any(|n| n.id == *id && n.state == "up"))
        })
        .await
        .unwrap();
    const SIZE: u64 = 96 * MIB;
    let image = filled_volume(&cluster, "v", SIZE, 5).await;

    // backup.copies defaults to 2: both backup nodes keep a whole copy.
    let b = json(&cluster, &["backup", "create", "v"]).await;
    assert_eq!(b["state"], "complete", "{b}");
    let mut nodes: Vec<u64> = b["copies"].as_array().unwrap().iter().filter_map(|c| c["node"].as_u64()).collect();
    nodes.sort_unstable();
    assert_eq!(nodes, vec![4, 5], "{b}");
    let id = b["id"].as_u64().unwrap().to_string();
    for node in [4, 5] {
        assert!(cluster.node(node).data_dir.join("backups/manifests").join(&id).exists(), "node-{node} holds the manifest");
    }

    // One backup node gone: the restore is served by the other, and a storage node killed
    // mid-restore does not stop it.
    cluster.kill9(4);
    cluster.wait_status("node-4 seen down", Duration::from_secs(30), |s| s.nodes.iter().any(|n| n.id == 4 && n.state == "down")).await.unwrap();
    let started = json(&cluster, &["backup", "restore", &id, "--to", "r", "--no-wait"]).await;
    assert_eq!(started["restoring"], true, "{started}");
    cluster.kill9(2);
    // Followed to its end; node-2 may have led the meta group, so a call can meet an election.
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = loop {
        let (code, out, err) = cluster.cli(&["--json", "backup", "restore", &id, "--to", "r"]).await.unwrap();
        if code == Some(0) {
            break serde_json::from_str::<serde_json::Value>(&out).unwrap();
        }
        assert!(Instant::now() < deadline && code == Some(6), "the restore goes on through the failover: {err}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(done["restoring"], false, "{done}");
    let back = read_all(&cluster, "r", SIZE).await;
    assert_eq!(Sha256::digest(&back), Sha256::digest(&image), "restored from node-5 through a storage-node failover");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_volumes_backup_stays_ciphertext_and_restores_with_its_kek() {
    use basalt_proto::admin::BackupShowRequest;
    use basalt_volume_client::crypt::Kek;
    const SIZE: u64 = 16 * MIB;
    let cluster = cluster_with_backup_node().await;
    let kek_bytes: [u8; 32] = rand::random();
    let kek_path = cluster.path().join("e.kek");
    std::fs::write(&kek_path, kek_bytes).unwrap();
    let kek_file = kek_path.to_str().unwrap();
    let kek = Kek::from_bytes(kek_bytes);
    let (code, _, err) = cluster.cli(&["volume", "create", "e", "--size", "16MiB", "--encrypt", "--kek-file", kek_file]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let client = cluster.client().await.unwrap();
    let attach = |name: &'static str| {
        let (client, kek) = (client.clone(), &kek);
        async move { client.attach_volume(name, "writer", false).await.unwrap().with_cipher(client.volume_cipher(name, kek).await.unwrap()) }
    };
    // Eight whole chunks (one carries a marker) and part of a ninth (its other blocks stay
    // unwritten: no context, zeros).
    let marker = b"SEALED-BACKUP-MARKER-51c0e7";
    let mut image = vec![0u8; SIZE as usize];
    let vol = attach("e").await;
    for i in 0..8 {
        let mut data = chunk(i, 0);
        if i == 3 {
            data[100..100 + marker.len()].copy_from_slice(marker);
        }
        image[(i * MIB) as usize..((i + 1) * MIB) as usize].copy_from_slice(&data);
        vol.write(i * MIB, Bytes::from(data), false).await.unwrap();
    }
    let part = chunk(9, 0)[..64 << 10].to_vec();
    image[(9 * MIB) as usize..(9 * MIB) as usize + part.len()].copy_from_slice(&part);
    vol.write(9 * MIB, Bytes::from(part), false).await.unwrap();
    client.detach_volume(&vol).await.unwrap();

    let first = json(&cluster, &["backup", "create", "e"]).await;
    assert_eq!((first["state"].as_str(), first["encrypted"].as_bool()), (Some("complete"), Some(true)), "{first}");
    assert_eq!(first["copies"][0]["changed_bytes"], 9 * MIB, "{first}");
    let backups_dir = cluster.node(BACKUP_NODE).data_dir.join("backups");
    assert!(files_containing(&backups_dir, marker).is_empty(), "the backup node holds the volume's plaintext");
    let id1 = first["id"].as_u64().unwrap();
    assert_eq!(json(&cluster, &["backup", "verify", &id1.to_string()]).await["ok"], true);

    // Incremental as for a plain volume: one changed chunk is read.
    let vol = attach("e").await;
    let data = chunk(2, 1);
    image[(2 * MIB) as usize..(3 * MIB) as usize].copy_from_slice(&data);
    vol.write(2 * MIB, Bytes::from(data), false).await.unwrap();
    client.detach_volume(&vol).await.unwrap();
    let second = json(&cluster, &["backup", "create", "e"]).await;
    assert_eq!(second["copies"][0]["changed_bytes"], MIB, "{second}");
    assert_eq!(second["copies"][0]["incremental_to"], id1, "{second}");
    let id2 = second["id"].as_u64().unwrap();
    let wrapped = client
        .admin_call(|mut c| async move { c.backup_key(BackupShowRequest { id: id2 }).await })
        .await
        .unwrap()
        .keys
        .into_iter()
        .map(|k| k.wrapped.to_vec())
        .collect::<Vec<_>>();
    assert_eq!(wrapped.len(), 1);

    // The volume is deleted (its keys shredded); the backup keeps its own copies.
    let (code, _, err) = cluster.cli(&["volume", "delete", "e"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = cluster.cli(&["backup", "restore", &id2.to_string(), "--to", "r"]).await.unwrap();
    assert!(code != Some(0) && err.contains("--kek-file"), "{code:?} {err}");
    let other = cluster.path().join("other.kek");
    std::fs::write(&other, rand::random::<[u8; 32]>()).unwrap();
    let (code, _, err) = cluster.cli(&["backup", "restore", &id2.to_string(), "--to", "r", "--kek-file", other.to_str().unwrap()]).await.unwrap();
    assert!(code != Some(0) && err.contains("does not open"), "{code:?} {err}");
    let restored = json(&cluster, &["backup", "restore", &id2.to_string(), "--to", "r", "--kek-file", kek_file]).await;
    assert_eq!(restored["restoring"], false, "{restored}");
    let r = attach("r").await;
    let back = r.read(0, SIZE).await.unwrap();
    assert_eq!(Sha256::digest(&back), Sha256::digest(&image), "sha256 of the restored volume equals the snapshot's");
    // The restored volume seals its own writes with a key of its own.
    r.write(0, Bytes::from(vec![0x5Au8; 4096]), false).await.unwrap();
    assert_eq!(r.cipher().map(|c| c.current_version()), Some(2));
    assert_eq!(r.read(0, 4096).await.unwrap(), Bytes::from(vec![0x5Au8; 4096]));
    client.detach_volume(&r).await.unwrap();

    // Deleting the backups erases their keys from every meta node's key store.
    for id in [id1, id2] {
        let (code, _, err) = cluster.cli(&["backup", "delete", &id.to_string()]).await.unwrap();
        assert_eq!(code, Some(0), "{err}");
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left: Vec<_> = (1..=3).flat_map(|n| files_containing(&cluster.node(n).data_dir, &wrapped[0])).collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the backup's wrapped key is still in {left:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
