//! `basalt support-bundle DIR`: everything support needs to look at a cluster, gathered into
//! one new directory: health and cluster status, volumes, backups and schedules, and from each
//! node the end of its log, its configuration (secret-looking values redacted), its effective
//! settings, its metrics and its scrubber. No token, key or volume data is written; a node that
//! cannot be reached is noted in `manifest.json` and the rest is still collected.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use basalt_proto::admin::{BackupListRequest, ClusterStatusRequest, NodeDiagnosticsRequest, ScheduleListRequest, VolumeListRequest};
use serde_json::{Value, json};

use crate::admin::Admin;
use crate::commands::Out;
use crate::exit::CliError;

/// Log bytes asked of each node.
const LOG_BYTES: u64 = 4 << 20;

/// How long one node may take to answer.
const NODE_WAIT: Duration = Duration::from_secs(20);

/// Environment variables worth recording, and whether their value is secret.
const ENV: [(&str, bool); 6] = [
    ("BASALT_CLUSTER", false),
    ("BASALT_CA", false),
    ("BASALT_TOKEN_FILE", false),
    ("BASALT_TOKEN", true),
    ("BASALT_CERT", false),
    ("BASALT_KEY", false),
];

/// Steps shown as they go: a bar on a terminal, lines on stderr otherwise (JSON with `--json`).
struct Steps {
    bar: Option<indicatif::ProgressBar>,
    json: bool,
    total: u64,
    done: u64,
}

impl Steps {
    fn new(out: Out, total: u64) -> Steps {
        let bar = (std::io::stderr().is_terminal() && !out.json).then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template("collecting [{bar:30}] {pos}/{len} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        Steps { bar, json: out.json, total, done: 0 }
    }

    fn step(&mut self, what: &str) {
        self.done += 1;
        let pct = self.done * 100 / self.total.max(1);
        match &self.bar {
            Some(b) => {
                b.set_message(what.to_string());
                b.set_position(self.done);
            }
            None if self.json => eprintln!("{}", json!({"job": "support-bundle", "progress_percent": pct, "step": what})),
            None => eprintln!("support-bundle: {pct}% {what}"),
        }
    }

    fn end(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

/// Collects into DIR/basalt-support-CLUSTER-UNIXTIME (DIR is created if needed).
pub async fn bundle(admin: &Admin, out: Out, dir: &Path) -> Result<(), CliError> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let cluster = admin.call(|mut c| async move { c.cluster_status(ClusterStatusRequest {}).await }).await?;
    let root = dir.join(format!("basalt-support-{}-{now}", if cluster.cluster_id.is_empty() { "uninitialized" } else { &cluster.cluster_id }));
    std::fs::create_dir_all(root.join("nodes")).map_err(|e| CliError::other(format!("cannot create {}: {e}", root.display())))?;
    let mut files: Vec<String> = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    let mut steps = Steps::new(out, 5 + cluster.nodes.len() as u64);
    let write = |name: &str, text: &str, files: &mut Vec<String>| -> Result<(), CliError> {
        let path = root.join(name);
        std::fs::write(&path, text).map_err(|e| CliError::other(format!("cannot write {}: {e}", path.display())))?;
        files.push(name.to_string());
        Ok(())
    };
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();

    match crate::health::report(admin).await {
        Ok((value, text, _)) => {
            write("health.json", &pretty(&value), &mut files)?;
            write("health.txt", &text, &mut files)?;
        }
        Err(e) => problems.push(format!("health: {}", e.message)),
    }
    steps.step("health");
    match crate::commands::cluster_status_report(admin).await {
        Ok((value, text)) => {
            write("cluster-status.json", &pretty(&value), &mut files)?;
            write("cluster-status.txt", &text, &mut files)?;
        }
        Err(e) => problems.push(format!("cluster status: {}", e.message)),
    }
    steps.step("cluster status");
    match admin.call(|mut c| async move { c.volume_list(VolumeListRequest {}).await }).await {
        Ok(r) => write("volumes.json", &pretty(&json!(r.volumes.iter().map(crate::commands::volume_json).collect::<Vec<_>>())), &mut files)?,
        Err(e) => problems.push(format!("volume list: {}", e.message)),
    }
    steps.step("volumes");
    match admin.call(|mut c| async move { c.backup_list(BackupListRequest { volume: String::new(), running_only: false }).await }).await {
        Ok(r) => write("backups.json", &pretty(&json!(r.backups.iter().map(crate::backup::backup_json).collect::<Vec<_>>())), &mut files)?,
        Err(e) => problems.push(format!("backup list: {}", e.message)),
    }
    match admin.call(|mut c| async move { c.schedule_list(ScheduleListRequest {}).await }).await {
        Ok(r) => {
            let schedules: Vec<Value> =
                r.schedules.iter().map(|s| json!({"name": s.name, "every_secs": s.every_secs, "next_run_unix_ms": s.next_run_unix_ms})).collect();
            write("schedules.json", &pretty(&json!(schedules)), &mut files)?;
        }
        Err(e) => problems.push(format!("schedule list: {}", e.message)),
    }
    steps.step("backups and schedules");

    for n in &cluster.nodes {
        let name = format!("node-{}", n.id);
        let node_dir = format!("nodes/{name}");
        std::fs::create_dir_all(root.join(&node_dir)).map_err(|e| CliError::other(format!("cannot create {node_dir}: {e}")))?;
        let asked = async {
            let mut c = admin.client(&n.addr).map_err(|e| e.message)?;
            match tokio::time::timeout(NODE_WAIT, c.node_diagnostics(NodeDiagnosticsRequest { log_bytes: LOG_BYTES })).await {
                Ok(Ok(r)) => Ok(r.into_inner()),
                Ok(Err(s)) => Err(s.message().to_string()),
                Err(_) => Err(format!("no answer within {NODE_WAIT:?}")),
            }
        };
        match asked.await {
            Ok(d) => {
                write(&format!("{node_dir}/config.toml"), &d.config_file, &mut files)?;
                write(&format!("{node_dir}/settings.txt"), &format!("{}\n{}\n", d.build, d.settings), &mut files)?;
                write(&format!("{node_dir}/log.txt"), &d.log, &mut files)?;
                write(&format!("{node_dir}/metrics.txt"), &d.metrics, &mut files)?;
            }
            Err(e) => problems.push(format!("{name} ({}): {e}", n.addr)),
        }
        if n.roles.iter().any(|r| r == "storage") {
            match crate::scrub::ask_status(admin, &n.addr).await {
                Ok(s) => write(&format!("{node_dir}/scrub.txt"), &format!("{s:#?}\n"), &mut files)?,
                Err(e) => problems.push(format!("{name} scrub status: {e}")),
            }
        }
        steps.step(&name);
    }

    let env: Vec<String> = ENV
        .iter()
        .filter_map(|(k, secret)| std::env::var(k).ok().map(|v| format!("{k}={}", if *secret { "<redacted>" } else { v.as_str() })))
        .collect();
    let about = format!("basalt {} collected at unix time {now}\n{}\n", env!("CARGO_PKG_VERSION"), env.join("\n"));
    write("environment.txt", &about, &mut files)?;
    steps.step("environment");
    let manifest = json!({"created_unix": now, "cluster_id": cluster.cluster_id, "files": files, "problems": problems});
    write("manifest.json", &pretty(&manifest), &mut Vec::new())?;
    steps.end();
    let path: PathBuf = root;
    out.print(json!({"bundle": path.display().to_string(), "files": files.len(), "problems": problems}), || {
        let mut text = format!("support bundle in {} ({} files)", path.display(), files.len());
        for p in &problems {
            text.push_str(&format!("\nnot collected: {p}"));
        }
        text
    });
    Ok(())
}
