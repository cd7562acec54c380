//! The shipped alert rules and Grafana dashboard against a real Prometheus (Debian's
//! `prometheus` package): `promtool check rules` accepts the rules; a Prometheus scraping a
//! cluster's nodes over HTTPS (client certificate) and an attach process loads them, evaluates
//! every rule without error, and answers every query of the dashboard without error.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use basalt_tests::{TestCluster, free_port};

const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus/basalt-alerts.yml");
const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/basalt-dashboard.json");

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET `path` with `query` (URL-encoded by curl) from Prometheus's HTTP API; the JSON.
fn api(port: u16, path: &str, query: Option<&str>) -> serde_json::Value {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "-G", &format!("http://127.0.0.1:{port}{path}")]);
    if let Some(q) = query {
        cmd.args(["--data-urlencode", &format!("query={q}")]);
    }
    let out = cmd.output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} {query:?}: {e}: {text}{}", String::from_utf8_lossy(&out.stderr)))
}

/// Every PromQL expression of the dashboard's panels.
fn dashboard_queries() -> Vec<(String, String)> {
    let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().map(Vec::as_slice).unwrap_or_default() {
            out.push((p["title"].as_str().unwrap_or("").to_string(), t["expr"].as_str().unwrap().to_string()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_loads_the_rules_scrapes_a_cluster_and_answers_every_dashboard_query() {
    let check = Command::new("promtool").args(["check", "rules", RULES]).output().expect("promtool (Debian package prometheus)");
    assert!(check.status.success(), "promtool check rules: {}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    let queries = dashboard_queries();
    assert!(queries.len() >= 30, "{queries:?}");

    let cluster = TestCluster::with_volume("v", 16 << 20).await.unwrap();
    let attached = cluster.attach_nbd("v", &["--metrics-listen", "127.0.0.1:0"]).expect("attach");
    let attach_metrics = attached.metrics.clone().expect("metrics URL");
    let attach_addr = attach_metrics.trim_start_matches("http://").trim_end_matches("/metrics").to_string();
    let io = Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "read -P 0x11 0 1M", &attached.uri]).output().unwrap();
    assert!(io.status.success(), "{}", String::from_utf8_lossy(&io.stderr));

    let tls = cluster.client_tls_files();
    let nodes: Vec<String> = (1..=3).map(|id| format!("'{}'", cluster.node(id).metrics_addr)).collect();
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: ['{RULES}']\nscrape_configs:\n  - job_name: basalt-nodes\n    scheme: https\n    tls_config: {{ca_file: '{}', cert_file: '{}', key_file: '{}'}}\n    static_configs: [{{targets: [{}]}}]\n  - job_name: basalt-attach\n    static_configs: [{{targets: ['{attach_addr}']}}]\n",
        tls.ca.display(),
        tls.cert.as_ref().unwrap().display(),
        tls.key.as_ref().unwrap().display(),
        nodes.join(", ")
    );
    let dir = cluster.path().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("prometheus.yml"), &config).unwrap();
    let check = Command::new("promtool").args(["check", "config"]).arg(dir.join("prometheus.yml")).output().unwrap();
    assert!(check.status.success(), "{config}\n{}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    let port = free_port();
    let _prometheus = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus"),
    );

    // Every target up.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = std::panic::catch_unwind(|| api(port, "/api/v1/query", Some("up"))).ok();
        let up = ok.as_ref().and_then(|r| r["data"]["result"].as_array().cloned()).unwrap_or_default();
        if up.len() == 4 && up.iter().all(|s| s["value"][1] == "1") {
            break;
        }
        let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
        let targets = std::panic::catch_unwind(|| api(port, "/api/v1/targets", None)).ok();
        assert!(Instant::now() < deadline, "targets not all up: {up:?}\n{targets:?}\n{log}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A few scrapes, so rates have two points and every rule was evaluated.
    tokio::time::sleep(Duration::from_secs(6)).await;

    let r = api(port, "/api/v1/query", Some("max(basalt_cluster_nodes{state=\"up\"})"));
    assert_eq!(r["data"]["result"][0]["value"][1], "3", "the meta leader reports three nodes up: {r}");
    let r = api(port, "/api/v1/query", Some("sum(basalt_volume_requests_total{op=\"write\"})"));
    assert_ne!(r["data"]["result"][0]["value"][1], "0", "the attach process's writes: {r}");
    for (title, expr) in &queries {
        let r = api(port, "/api/v1/query", Some(expr));
        assert_eq!(r["status"], "success", "panel {title:?}: {expr}: {r}");
    }
    let rules = api(port, "/api/v1/rules", None);
    let groups = rules["data"]["groups"].as_array().cloned().unwrap_or_default();
    assert!(groups.len() >= 5, "the rule groups are loaded: {rules}");
    for g in &groups {
        for rule in g["rules"].as_array().unwrap() {
            assert_eq!(rule["health"], "ok", "rule {} in {}: {rule}", rule["name"], g["name"]);
        }
    }
    // A healthy cluster fires none of the critical alerts.
    let alerts = api(port, "/api/v1/alerts", None);
    let firing: Vec<_> = alerts["data"]["alerts"].as_array().unwrap().iter().filter(|a| a["labels"]["severity"] == "critical").collect();
    assert!(firing.is_empty(), "{firing:?}");
    drop(attached);
}
