//! `basalt status` against real `basalt-node` processes: healthy on a healthy cluster; a node
//! killed -9 turns it unhealthy (exit 11) with findings that say what is wrong and what to do;
//! healthy again once the node is back.

use std::time::{Duration, Instant};

use basalt_tests::TestCluster;

async fn status(cluster: &TestCluster) -> (Option<i32>, serde_json::Value) {
    let (code, out, err) = cluster.cli(&["--json", "status"]).await.unwrap();
    let json = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    (code, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_what_is_wrong_when_a_node_dies_and_turns_healthy_when_it_returns() {
    let mut cluster = TestCluster::with_volume("v", 16 << 20).await.unwrap();
    let (code, s) = status(&cluster).await;
    assert_eq!((code, s["healthy"].as_bool()), (Some(0), Some(true)), "{s}");
    assert_eq!((s["nodes_up"].as_u64(), s["nodes"].as_u64(), s["volumes"].as_u64()), (Some(3), Some(3), Some(1)), "{s}");
    assert_eq!(s["pgs_healthy"], s["pgs"], "{s}");
    for field in ["cluster_id", "used_bytes", "capacity_bytes", "findings"] {
        assert!(!s[field].is_null(), "{field} in {s}");
    }

    cluster.kill9(3);
    let deadline = Instant::now() + Duration::from_secs(60);
    let s = loop {
        let (code, s) = status(&cluster).await;
        let findings = s["findings"].as_array().cloned().unwrap_or_default();
        let down =
            findings.iter().any(|f| f["area"] == "nodes" && f["severity"] == "critical" && f["what"].as_str().unwrap_or("").contains("node-3"));
        if down {
            assert_eq!(code, Some(11), "unhealthy is exit 11: {s}");
            break s;
        }
        assert!(Instant::now() < deadline, "node-3's death never showed: {s}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(s["healthy"], false, "{s}");
    let findings = s["findings"].as_array().unwrap();
    assert!(findings.iter().all(|f| !f["advice"].as_str().unwrap_or("").is_empty()), "every finding says what to do: {s}");
    assert!(findings.iter().any(|f| f["area"] == "placement groups"), "its placement groups run degraded: {s}");
    let (code, text, _) = cluster.cli(&["status"]).await.unwrap();
    assert_eq!(code, Some(11));
    assert!(text.contains("NEEDS ATTENTION") && text.contains("node-3") && text.contains("→"), "{text}");

    // A support bundle now: everything from the live nodes, node-3 noted as not collected,
    // and no credential anywhere in it.
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = cluster.cli(&["--json", "support-bundle", &dir.path().display().to_string()]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let made: serde_json::Value = serde_json::from_str(&out).unwrap();
    let root = std::path::PathBuf::from(made["bundle"].as_str().unwrap());
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let manifest: serde_json::Value = serde_json::from_str(&read("manifest.json")).unwrap();
    let problems = manifest["problems"].as_array().unwrap();
    assert!(problems.iter().any(|p| p.as_str().unwrap_or("").starts_with("node-3")), "{manifest}");
    let health: serde_json::Value = serde_json::from_str(&read("health.json")).unwrap();
    assert_eq!(health["healthy"], false, "{health}");
    for node in ["node-1", "node-2"] {
        assert!(read(&format!("nodes/{node}/log.txt")).contains("basalt-node started"), "{node}'s log");
        assert!(read(&format!("nodes/{node}/metrics.txt")).contains("basalt_pgs{"), "{node}'s metrics");
        assert!(read(&format!("nodes/{node}/config.toml")).contains("data_dir"), "{node}'s config file");
        assert!(read(&format!("nodes/{node}/settings.txt")).contains("cluster versions 1..=1"), "{node}'s settings");
    }
    assert!(err.contains("progress_percent"), "progress on stderr: {err}");
    let token = std::fs::read_to_string(cluster.admin_token_file()).unwrap();
    let secret = token.trim().rsplit('_').next().unwrap_or(token.trim()).to_string();
    assert!(secret.len() >= 16, "the token's secret part: {token}");
    let leaked = basalt_tests::find_marker(&root, secret.as_bytes());
    assert!(leaked.is_empty(), "the admin token's secret is in the bundle: {leaked:?}");
    let audit = cluster.wait_for_audit("node.diagnostics", |r| r["action"] == "node.diagnostics").await;
    assert_eq!(audit["outcome"], "ok", "{audit}");

    cluster.restart(3).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (code, s) = status(&cluster).await;
        if code == Some(0) {
            assert_eq!(s["healthy"], true, "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "never healthy again: {s}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
