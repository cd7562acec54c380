//! Metrics against real processes: every metric docs/operations.md lists is exported (by the
//! storage+meta nodes, the backup node or an attach process), node and attach latency
//! histograms count the requests made, the text is OpenMetrics, and a bad `--metrics-listen`
//! is refused before anything is attached.

use std::time::Duration;

use basalt_tests::{NodeSpec, TestCluster, simple_spec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET /metrics` over plain HTTP/1.1 from `url` (http://IP:PORT/metrics).
async fn http_get(url: &str) -> String {
    let addr = url.strip_prefix("http://").and_then(|r| r.strip_suffix("/metrics")).expect("a metrics URL");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to the metrics listener");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("application/openmetrics-text"), "{out}");
    out
}

/// The value of the sample line starting with `prefix` (labels included), if any.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(prefix)).and_then(|v| v.trim().parse().ok())
}

/// The metric names docs/operations.md's "Metrics" section lists.
fn documented() -> Vec<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md")).unwrap();
    let section = doc.split("\n## Metrics").nth(1).and_then(|s| s.split("\n## ").next()).expect("a Metrics section");
    let mut names: Vec<String> = section
        .lines()
        .filter(|l| l.starts_with("| `basalt_"))
        .flat_map(|l| l.split('`').filter(|t| t.starts_with("basalt_")).map(|t| t.split('{').next().unwrap_or(t).to_string()).collect::<Vec<_>>())
        .collect();
    names.sort();
    names.dedup();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_exported_and_latencies_are_histograms() {
    let mut specs = simple_spec(3);
    specs.push(NodeSpec { id: 4, labels: "zone=z4,host=h4".into(), roles: vec!["backup"] });
    let cluster = TestCluster::start(specs).await.unwrap();
    cluster.init(8, "zone").await.unwrap();
    cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();
    let (code, _, err) = cluster.cli(&["volume", "create", "v", "--size", "16MiB"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    // Per-volume series are off until turned on for the cluster.
    assert!(!cluster.metrics(1).await.unwrap().contains("basalt_data_volume_requests_total"));
    let (code, out, err) = cluster.cli(&["--json", "cluster", "configure", "--per-volume-metrics", "on"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"per_volume_metrics\": true"), "{out}");

    // Bad listen addresses: refused before the volume is attached.
    for (addr, why) in [("0.0.0.0:9101", "loopback"), ("nonsense", "IP:PORT"), ("127.0.0.1", "IP:PORT")] {
        let (code, err) = cluster.attach_nbd("v", &["--metrics-listen", addr]).err().expect("refused");
        assert_eq!(code, Some(2), "{addr}: {err}");
        assert!(err.contains(why) && err.contains("--metrics-listen"), "{addr}: {err}");
    }
    let (_, out, _) = cluster.cli(&["--json", "volume", "show", "v"]).await.unwrap();
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["attached_by"], "", "a refused attach attached nothing: {shown}");

    // With --json, attach says `ready` in one JSON line (export, metrics URL, mode, epoch).
    let attached = cluster.attach_nbd("v", &["--json", "--metrics-listen", "127.0.0.1:0"]).expect("attach with metrics");
    let url = attached.metrics.clone().expect("the metrics URL before ready");
    let io = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M", "-c", "flush", "-c", "discard 0 64k", &attached.uri])
        .output()
        .expect("qemu-io");
    assert!(io.status.success(), "{}", String::from_utf8_lossy(&io.stderr));
    let attach = http_get(&url).await;
    for op in ["write", "read", "flush", "trim"] {
        let n = sample(&attach, &format!("basalt_volume_requests_total{{volume=\"v\",op=\"{op}\"}} ")).unwrap_or(0.0);
        assert!(n >= 1.0, "{op} counted: {attach}");
        let h = sample(&attach, &format!("basalt_volume_request_duration_seconds_count{{volume=\"v\",op=\"{op}\"}} ")).unwrap_or(0.0);
        assert_eq!(h, n, "every {op} is in the histogram: {attach}");
    }
    assert!(attach.contains("basalt_volume_request_duration_seconds_bucket{volume=\"v\",le=\"+Inf\",op=\"write\"}"), "{attach}");
    assert!(attach.trim_end().ends_with("# EOF"), "{attach}");

    // The nodes: write latencies in a histogram on whichever nodes led the writes.
    let mut all = attach.clone();
    let mut writes = 0.0;
    for id in 1..=4 {
        let m = cluster.metrics(id).await.unwrap();
        writes += sample(&m, &format!("basalt_data_request_duration_seconds_count{{node=\"{id}\",op=\"write\"}} ")).unwrap_or(0.0);
        assert!(m.trim_end().ends_with("# EOF"), "node-{id}: {m}");
        all.push_str(&m);
    }
    assert!(writes >= 1.0, "the nodes' write histograms counted the writes: {all}");
    // ...and, per volume, the same writes under the volume's name.
    let per_volume: f64 = (1..=3)
        .map(|id| {
            sample(&all, &format!("basalt_data_volume_request_duration_seconds_count{{node=\"{id}\",volume=\"v\",op=\"write\"}} ")).unwrap_or(0.0)
        })
        .sum();
    assert!(per_volume >= 1.0 && per_volume <= writes, "per-volume series count the writes ({per_volume} of {writes}): {all}");

    let missing: Vec<String> =
        documented().into_iter().filter(|n| !all.contains(&format!("# TYPE {} ", n.strip_suffix("_total").unwrap_or(n)))).collect();
    assert!(missing.is_empty(), "documented but not exported: {missing:?}");
    assert!(documented().len() > 40, "the doc's table was read: {:?}", documented());

    // Turned off, the series go at the next scrape.
    let (code, _, err) = cluster.cli(&["cluster", "configure", "--per-volume-metrics", "off"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cluster.metrics(1).await.unwrap().contains("basalt_data_volume_requests_total") {
        assert!(std::time::Instant::now() < deadline, "per-volume series still exported after being turned off");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // `volume du`: the 1 MiB written is one chunk of one replica; nothing is held by snapshots.
    let (code, out, err) = cluster.cli(&["--json", "volume", "du"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let du: serde_json::Value = serde_json::from_str(&out).unwrap();
    let v = &du["volumes"][0];
    assert_eq!((v["name"].as_str(), v["written_bytes"].as_u64(), v["snapshot_bytes"].as_u64()), (Some("v"), Some(1 << 20), Some(0)), "{du}");
    assert_eq!(v["provisioned_bytes"], shown["size"], "{du}");
    assert_eq!(du["total"]["written_bytes"], 1 << 20, "{du}");
    let (code, _, err) = cluster.cli(&["volume", "du", "nope"]).await.unwrap();
    assert_eq!(code, Some(3), "an unknown volume: {err}");
    // `detach --json` answers in JSON too.
    let (code, out, err) = cluster.cli(&["--json", "detach", "v"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let detached: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((detached["volume"].as_str(), detached["detached"].as_bool()), (Some("v"), Some(true)), "{out}");
    assert!(detached["epoch"].as_u64() > Some(1), "{out}");
    drop(attached);
}
