//! `basalt dev up`: the embedded default the README's quick start runs.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use basalt_security::{Dialer, TlsContext, TlsFiles, Token};
use basalt_tests::{bin, https_get, test_root};

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// Starts `basalt [--json] dev up` on a small cluster in `dir`; its stdout lines arrive on the
/// receiver.
fn dev_up(dir: &std::path::Path, json: bool, size: &str) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut cmd = Command::new(bin("basalt"));
    if json {
        cmd.arg("--json");
    }
    let mut child =
        cmd.args(["dev", "up", "--size", size, "--pgs", "8", "--dir"]).arg(dir).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Ctrl-C to `dev up`; it must exit cleanly within a minute.
fn stop(mut child: std::process::Child) {
    // SAFETY: signalling the child we started.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "dev up did not stop within 60s of Ctrl-C");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "dev up exited with {status}");
}

#[test]
fn dev_up_runs_a_cluster_and_stops_cleanly() {
    let dir = tempfile::Builder::new().prefix("basalt-devup-").tempdir_in(test_root()).unwrap();
    let (mut child, rx) = dev_up(dir.path(), false, "256MiB");
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while lines.last().map(String::as_str) != Some("ready") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => {
                let _ = child.kill();
                panic!("no `ready` line within 120s; got {lines:?}");
            }
        }
    }
    let value = |key: &str| lines.iter().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("no {key} line in {lines:?}")).to_string();
    let seeds = value("BASALT_CLUSTER=");
    assert_eq!(seeds.split(',').count(), 3, "three meta nodes: {seeds}");
    let ca = value("BASALT_CA=");
    let token_file = value("BASALT_TOKEN_FILE=");
    assert!(lines.iter().any(|l| l.starts_with("nbd://127.0.0.1:") && l.ends_with("/demo")), "{lines:?}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777, 0o600, "the admin token file is private");
    let token = Token::parse(&std::fs::read_to_string(&token_file).unwrap()).unwrap();

    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("cluster.json")).unwrap()).unwrap();
    let nodes = json["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 4);
    let mut zones = Vec::new();
    let mut pids = Vec::new();
    for n in nodes {
        let pid = n["pid"].as_u64().unwrap() as u32;
        assert!(alive(pid), "node {} (pid {pid}) not running", n["id"]);
        pids.push(pid);
        zones.push(n["labels"]["zone"].as_str().unwrap().to_string());
        assert!(std::path::Path::new(n["data_dir"].as_str().unwrap()).is_dir());
        assert!(n["grpc_addr"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(n["metrics_url"].as_str().unwrap().ends_with("/metrics"));
    }
    zones.sort();
    zones.dedup();
    assert_eq!(zones.len(), 4, "each node in its own failure domain");
    assert_eq!(nodes.iter().filter(|n| n["roles"].as_array().unwrap().iter().any(|r| r == "backup")).count(), 1);

    // The volume exists and the CLI finds the cluster, its CA and the token through the three
    // printed lines; without the token it is refused.
    let basalt = |with_token: bool| {
        let mut c = Command::new(bin("basalt"));
        c.args(["--json", "volume", "show", "demo"]).env("BASALT_CLUSTER", &seeds).env("BASALT_CA", &ca).env_remove("BASALT_TOKEN");
        if with_token {
            c.env("BASALT_TOKEN_FILE", &token_file);
        } else {
            c.env_remove("BASALT_TOKEN_FILE");
        }
        c.output().unwrap()
    };
    let out = basalt(true);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["size"], 256u64 << 20);
    let out = basalt(false);
    assert_eq!(out.status.code(), Some(8), "no token: {}", String::from_utf8_lossy(&out.stderr));

    // Metrics are served over HTTPS, to a token.
    let metrics_url = nodes[0]["metrics_url"].as_str().unwrap();
    assert!(metrics_url.starts_with("https://"), "{metrics_url}");
    let metrics_addr = metrics_url.trim_start_matches("https://").trim_end_matches("/metrics").to_string();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dialer = Dialer::new(Some(std::sync::Arc::new(TlsContext::load(TlsFiles { ca: ca.clone().into(), cert: None, key: None }).unwrap())));
    let body = runtime.block_on(https_get(&dialer, &metrics_addr, "/metrics", Some(&token))).unwrap();
    assert!(body.contains("basalt_pgs{node=\"1\"} 8"), "{body}");
    let body = runtime.block_on(https_get(&dialer, &metrics_addr, "/metrics", None)).unwrap();
    assert!(body.starts_with("HTTP/1.1 401"), "no credentials: {body}");

    // Ctrl-C stops everything cleanly.
    stop(child);
    for pid in pids {
        assert!(!alive(pid), "node pid {pid} still running after dev up stopped");
    }
}

/// With `--json`, `dev up` says `ready` in one JSON line: the exports and the environment a
/// script needs, and where cluster.json is.
#[test]
fn dev_up_json_says_ready_in_one_line() {
    let dir = tempfile::Builder::new().prefix("basalt-devup-").tempdir_in(test_root()).unwrap();
    let (mut child, rx) = dev_up(dir.path(), true, "64MiB");
    let line = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(l) => l,
        Err(_) => {
            let _ = child.kill();
            panic!("no ready line within 120s");
        }
    };
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(ready["event"], "ready", "{ready}");
    let export = ready["exports"][0].as_str().unwrap_or_default();
    assert!(export.starts_with("nbd://127.0.0.1:") && export.ends_with("/demo"), "{ready}");
    assert_eq!(ready["env"]["BASALT_CLUSTER"].as_str().map(|s| s.split(',').count()), Some(3), "{ready}");
    for key in ["BASALT_CA", "BASALT_TOKEN_FILE"] {
        assert!(std::path::Path::new(ready["env"][key].as_str().unwrap_or_default()).is_file(), "{key}: {ready}");
    }
    let cluster_json = ready["cluster_json"].as_str().unwrap_or_default();
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(cluster_json).unwrap()).unwrap();
    assert_eq!(json["cluster_id"], ready["cluster_id"], "{json}");
    stop(child);
}
