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
