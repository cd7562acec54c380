//! Clones against real `basalt-node` processes: `basalt volume clone VOLUME@SNAPSHOT NAME`
//! makes a writable volume that reads the snapshot where it has not written, copies on its
//! first write to a chunk, leaves its source and the snapshot untouched, can be cloned again,
//! and keeps reading after its source's snapshot and the source itself are deleted.

use std::time::Duration;

use basalt_tests::TestCluster;
use bytes::Bytes;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_share_a_snapshot_copy_on_write_and_outlive_their_source() {
    let cluster = TestCluster::with_volume("base", 32 * MIB).await.unwrap();
    let client = cluster.client().await.unwrap();
    // 16 MiB over several extents (so several PGs), each block distinct.
    let a: Vec<u8> = (0..16 * MIB as u32).map(|i| (i / 4096) as u8 ^ (i % 251) as u8).collect();
    let vol = client.attach_volume("base", "writer", false).await.unwrap();
    vol.write(0, Bytes::from(a.clone()), false).await.unwrap();
    client.detach_volume(&vol).await.unwrap();
    let (code, _, err) = cluster.cli(&["snapshot", "create", "base", "s1"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    // The source moves on after the snapshot.
    let vol = client.attach_volume("base", "writer", false).await.unwrap();
    vol.write(0, Bytes::from(vec![0xEEu8; MIB as usize]), false).await.unwrap();
    client.detach_volume(&vol).await.unwrap();

    // Bad input: each a clear error.
    for (args, want, what) in [
        (vec!["volume", "clone", "base@nope", "c"], 3, "an unknown snapshot"),
        (vec!["volume", "clone", "nope@s1", "c"], 3, "an unknown volume"),
        (vec!["volume", "clone", "base@s1", "base"], 4, "a name in use"),
        (vec!["volume", "clone", "base", "c"], 2, "no snapshot named"),
    ] {
        let (code, _, err) = cluster.cli(&args).await.unwrap();
        assert_eq!(code, Some(want), "{what}: {err}");
        assert!(!err.is_empty(), "{what}: says why");
    }

    let (code, out, err) = cluster.cli(&["--json", "volume", "clone", "base@s1", "c"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["clone_of"], "base@s1", "{json}");
    assert_eq!(json["size"], 32 * MIB, "{json}");

    let c = client.attach_volume("c", "clone-writer", false).await.unwrap();
    assert_eq!(&c.read(0, 16 * MIB).await.unwrap()[..], &a[..], "the clone reads the snapshot, not the source as it is now");
    assert!(c.read(16 * MIB, 16 * MIB).await.unwrap().iter().all(|b| *b == 0));
    // A partial first write (copies its chunk), a whole-chunk trim (hides the snapshot's),
    // a write where the snapshot had nothing.
    let mut expect = a.clone();
    expect.resize(32 * MIB as usize, 0);
    c.write(4096 + 100, Bytes::from(vec![0x77u8; 5000]), false).await.unwrap();
    expect[4196..9196].fill(0x77);
    c.trim(4 * MIB, MIB).await.unwrap();
    expect[4 * MIB as usize..5 * MIB as usize].fill(0);
    c.write(20 * MIB, Bytes::from(vec![0x66u8; 8192]), false).await.unwrap();
    expect[20 * MIB as usize..20 * MIB as usize + 8192].fill(0x66);
    assert!(c.read(0, 32 * MIB).await.unwrap()[..] == expect[..], "the clone holds its writes over the snapshot");

    let s1 = client.open_snapshot("base", "s1").await.unwrap();
    assert_eq!(&s1.read(0, 16 * MIB).await.unwrap()[..], &a[..], "the snapshot is untouched");
    let base = client.open_volume("base").await.unwrap();
    assert!(base.read(0, MIB).await.unwrap().iter().all(|b| *b == 0xEE), "and so is the source");
    assert_eq!(&base.read(MIB, 15 * MIB).await.unwrap()[..], &a[MIB as usize..]);

    // A clone of the clone.
    client.detach_volume(&c).await.unwrap();
    let (code, _, err) = cluster.cli(&["snapshot", "create", "c", "cs"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let (code, _, err) = cluster.cli(&["volume", "clone", "c@cs", "g"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let g = client.attach_volume("g", "grandchild", false).await.unwrap();
    assert!(g.read(0, 32 * MIB).await.unwrap()[..] == expect[..], "the grandchild reads through both");
    g.write(0, Bytes::from(vec![0x55u8; 4096]), false).await.unwrap();
    let (code, out, err) = cluster.cli(&["volume", "show", "g"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("a clone of c@cs"), "{out}");

    // The source's snapshot and then the source go; the clones keep reading.
    let (code, _, err) = cluster.cli(&["snapshot", "delete", "base", "s1"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = cluster.cli(&["volume", "delete", "base"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("until no clone"), "{out}");
    // Long enough for the reaper's rounds (every 500 ms) to have released anything it would.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let c = client.open_volume("c").await.unwrap();
    assert!(c.read(0, 32 * MIB).await.unwrap()[..] == expect[..], "the clone outlives its source");
    expect[..4096].fill(0x55);
    assert!(g.read(0, 32 * MIB).await.unwrap()[..] == expect[..]);

    // With every clone gone, the source's data is released.
    client.detach_volume(&g).await.unwrap();
    for name in ["g", "c"] {
        let (code, _, err) = cluster.cli(&["volume", "delete", name]).await.unwrap();
        assert_eq!(code, Some(0), "deleting {name}: {err}");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, out, _) = cluster.cli(&["--json", "volume", "list"]).await.unwrap();
        if !out.contains("\"base\"") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the source was never released: {out}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
