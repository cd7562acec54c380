//! Per-volume QoS against real `basalt-node` processes: a volume limited to 500 IOPS is held
//! to it (plus its burst) over NBD whatever its queue depth, its connection count and a second,
//! read-only attachment; a live `volume set-qos` takes effect within a second; bad values are
//! refused with clear errors. (The noisy-neighbour figures are a benchmark:
//! `benches/macro/qos.sh`.)

use std::time::{Duration, Instant};

use basalt_tests::TestCluster;

const MIB: u64 = 1 << 20;

/// Runs fio jobs (`args` each: one job's options) against NBD URIs at once for `secs`; returns
/// the operations all of them completed and fio's output.
fn fio_ops(jobs: &[Vec<String>], secs: u64) -> (u64, String) {
    let mut cmd = std::process::Command::new("fio");
    cmd.args(["--output-format=json", "--time_based", &format!("--runtime={secs}"), "--ioengine=nbd", "--bs=4k", "--size=32M"]);
    cmd.args(["--randrepeat=0", "--norandommap"]);
    for job in jobs {
        cmd.args(job);
    }
    let out = cmd.output().expect("fio");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "fio failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap_or(0)..]).unwrap_or_else(|e| panic!("{e}: {text}"));
    let mut ops = 0;
    for job in json["jobs"].as_array().expect("jobs") {
        assert_eq!(job["error"], 0, "{job}");
        ops += job["read"]["total_ios"].as_u64().unwrap_or(0) + job["write"]["total_ios"].as_u64().unwrap_or(0);
    }
    (ops, text)
}

fn job(name: &str, uri: &str, rw: &str, depth: u32) -> Vec<String> {
    vec![format!("--name={name}"), format!("--uri={uri}"), format!("--rw={rw}"), format!("--iodepth={depth}")]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_volume_is_held_to_its_limit_however_it_connects_and_a_live_change_takes_effect() {
    let cluster = TestCluster::with_volume("free", 64 * MIB).await.unwrap();

    // Bad input: each a clear error.
    for (args, want, what) in [
        (vec!["volume", "create", "bad", "--size", "64MiB", "--qos-iops", "-5"], 2, "a negative IOPS limit"),
        (vec!["volume", "create", "bad", "--size", "64MiB", "--qos-iops", "0"], 2, "a zero IOPS limit"),
        (vec!["volume", "create", "bad", "--size", "64MiB", "--qos-iops", "5"], 2, "an IOPS limit below the minimum"),
        (vec!["volume", "create", "bad", "--size", "64MiB", "--qos-iops", "99999999999"], 2, "an absurd IOPS limit"),
        (vec!["volume", "create", "bad", "--size", "64MiB", "--qos-bps", "fast"], 2, "a bandwidth that is no size"),
        (vec!["volume", "create", "bad", "--size", "64MiB", "--qos-burst", "2h"], 2, "a burst longer than a minute"),
        (vec!["volume", "set-qos", "nope", "--qos-iops", "100"], 3, "set-qos on an unknown volume"),
        (vec!["volume", "set-qos", "free", "--qos-iops", "100", "--default"], 2, "limits and --default"),
        (vec!["volume", "set-qos", "free"], 2, "nothing to set"),
    ] {
        let (code, _, err) = cluster.cli(&args).await.unwrap();
        assert_eq!(code, Some(want), "{what}: {err}");
        assert!(!err.trim().is_empty(), "{what}: says why");
    }
    let (_, out, _) = cluster.cli(&["--json", "volume", "list"]).await.unwrap();
    assert!(!out.contains("\"bad\""), "no volume was created by a refused command: {out}");

    let (code, out, err) = cluster.cli(&["--json", "volume", "create", "limited", "--size", "64MiB", "--qos-iops", "500"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["qos"]["iops"].as_u64(), v["qos"]["burst_ms"].as_u64(), v["qos"]["own"].as_bool()), (Some(500), Some(1000), Some(true)), "{v}");
    let (_, out, _) = cluster.cli(&["volume", "show", "free"]).await.unwrap();
    assert!(out.contains("QoS: unlimited (the cluster's default)"), "{out}");

    let (code, _, err) = cluster.cli(&["cluster", "configure", "--per-volume-metrics", "on"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");

    // Two fio jobs (two NBD connections, QD 32 each) on the read-write attachment and a reader
    // on a second, read-only one: together at most 500 a second plus the burst.
    let rw = cluster.attach_nbd("limited", &[]).expect("attach read-write");
    let ro = cluster.attach_nbd("limited", &["--read-only"]).expect("attach read-only");
    const SECS: u64 = 12;
    let jobs = [job("w1", &rw.uri, "randwrite", 32), job("w2", &rw.uri, "randwrite", 32), job("r", &ro.uri, "randread", 32)];
    let started = Instant::now();
    let (ops, text) = tokio::task::spawn_blocking(move || fio_ops(&jobs, SECS)).await.unwrap();
    let took = started.elapsed().as_secs_f64().max(SECS as f64);
    let allowed = 500.0 * took + 500.0;
    eprintln!("limited volume: {ops} operations in {took:.1} s = {:.0}/s (limit 500/s + a 500-operation burst)", ops as f64 / took);
    assert!((ops as f64) <= allowed * 1.03, "{ops} operations in {took:.1} s exceed 500 IOPS + burst:\n{text}");
    assert!(ops as f64 >= 500.0 * SECS as f64 * 0.5, "the limit is not a stall: {ops} operations in {SECS} s:\n{text}");

    // The unlimited volume beside it is not held at all.
    let free = cluster.attach_nbd("free", &[]).expect("attach free");
    let jobs = [job("f", &free.uri, "randwrite", 32)];
    let (free_ops, _) = tokio::task::spawn_blocking(move || fio_ops(&jobs, 4)).await.unwrap();
    eprintln!("unlimited volume: {free_ops} operations in 4 s");
    assert!(free_ops > 500 * 4 * 2, "an unlimited volume runs past another volume's limit: {free_ops} in 4 s");
    // The nodes' per-volume series say which volume waited, and how long.
    let mut waited = std::collections::BTreeMap::new();
    for id in 1..=3 {
        let m = cluster.metrics(id).await.unwrap();
        for volume in ["limited", "free"] {
            let prefix = format!("basalt_data_volume_throttled_seconds_total{{node=\"{id}\",volume=\"{volume}\"}} ");
            *waited.entry(volume).or_insert(0.0) +=
                m.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or(0.0);
        }
    }
    assert!(waited["limited"] > 1.0 && waited["free"] == 0.0, "throttled seconds per volume: {waited:?}");

    // A live change, no reattach: within a second the volume is held to the new limit.
    let (code, out, err) = cluster.cli(&["--json", "volume", "set-qos", "limited", "--qos-iops", "100", "--qos-burst", "0s"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["qos"]["iops"], 100, "{v}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let jobs = [job("w", &rw.uri, "randwrite", 32)];
    let (ops, text) = tokio::task::spawn_blocking(move || fio_ops(&jobs, 5)).await.unwrap();
    eprintln!("after set-qos 100: {ops} operations in 5 s");
    // (At 500 it would be ~2500; shares settle within a heartbeat, hence the margin.)
    assert!(ops <= 600, "{ops} operations in 5 s after lowering the limit to 100/s:\n{text}");

    // Back to the cluster default (unlimited), then a cluster default that holds it.
    let (code, _, err) = cluster.cli(&["volume", "set-qos", "limited", "--default"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = cluster.cli(&["--json", "cluster", "configure", "--qos-iops", "200", "--qos-burst", "0s"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let c: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(c["qos_default"]["iops"], 200, "{c}");
    let (_, out, _) = cluster.cli(&["volume", "show", "limited"]).await.unwrap();
    assert!(out.contains("QoS: 200 IOPS, burst 0 ms (the cluster's default)"), "{out}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let jobs = [job("w", &rw.uri, "randwrite", 32)];
    let (ops, text) = tokio::task::spawn_blocking(move || fio_ops(&jobs, 4)).await.unwrap();
    assert!(ops <= 940, "{ops} operations in 4 s under a 200/s cluster default:\n{text}");
    cluster.wait_for_audit("the QoS change", |r| r["action"] == "volume.qos" && r["target"] == "limited QoS 100 IOPS, burst 0 ms").await;
    drop((rw, ro, free));
}
