//! `basalt status`: is the cluster healthy, and if not, what to do. One screen (or `--json`)
//! from what the meta leader knows (nodes, placement groups, replica moves, space, backups,
//! schedules, certificates) and each storage node's scrubber; exit 11 when something needs
//! attention.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use basalt_common::units::format_size;
use basalt_proto::admin::{Backup, BackupListRequest, ClusterStatusReply, ClusterStatusRequest, Schedule, ScheduleListRequest, ScrubStatusReply};
use serde_json::{Value, json};

use crate::admin::Admin;
use crate::commands::Out;
use crate::exit::CliError;

/// A node's disk this full is a warning; [`SPACE_CRITICAL`] a critical problem.
const SPACE_WARNING: f64 = 0.85;
const SPACE_CRITICAL: f64 = 0.95;
/// A certificate expiring within this is a warning.
const CERT_WARNING: Duration = Duration::from_secs(14 * 86_400);

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Worth knowing; nothing to do.
    Info,
    /// Needs attention soon: redundancy or headroom is reduced.
    Warning,
    /// Needs attention now: I/O stalls, data at risk, or it will soon.
    Critical,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// One finding: what is wrong and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// How bad.
    pub severity: Severity,
    /// What was checked ("nodes", "placement groups", "space", ...).
    pub area: &'static str,
    /// What is the case.
    pub what: String,
    /// What to do.
    pub advice: String,
}

fn finding(severity: Severity, area: &'static str, what: String, advice: impl Into<String>) -> Finding {
    Finding { severity, area, what, advice: advice.into() }
}

/// What the checks look at.
pub struct Inputs<'a> {
    /// The meta leader's view.
    pub cluster: &'a ClusterStatusReply,
    /// Every backup.
    pub backups: &'a [Backup],
    /// Every schedule.
    pub schedules: &'a [Schedule],
    /// Why backups or schedules could not be listed (then they are not checked).
    pub unlisted: &'a [String],
    /// Each storage node's scrubber, or why it did not answer.
    pub scrub: &'a [(u64, Result<ScrubStatusReply, String>)],
    /// Now, Unix milliseconds.
    pub now_ms: u64,
}

/// The findings, worst first. Pure, so each rule is tested on its own.
pub fn check(i: &Inputs<'_>) -> Vec<Finding> {
    let c = i.cluster;
    let mut out = Vec::new();
    if !c.initialized {
        out.push(finding(Severity::Critical, "cluster", "the cluster is not initialized".into(), "run `basalt cluster init`"));
        return out;
    }
    for n in c.nodes.iter().filter(|n| n.state == "unknown") {
        // A meta leader elected a moment ago has not heard every heartbeat yet.
        out.push(finding(
            Severity::Info,
            "nodes",
            format!("node-{} ({}) has not been heard from by this meta leader yet", n.id, n.addr),
            "nothing, unless it stays so: then check that basalt-node runs there",
        ));
    }
    for n in c.nodes.iter().filter(|n| n.state != "up" && n.state != "unknown") {
        out.push(finding(
            Severity::Critical,
            "nodes",
            format!("node-{} ({}) is {}, last seen {} s ago", n.id, n.addr, n.state, n.last_seen_ms_ago / 1000),
            "start basalt-node on it (systemctl start basalt-node); if it is gone for good, `basalt node remove` it and its replicas are rebuilt elsewhere",
        ));
    }
    // A rolling upgrade under way: the cluster stays at the version the oldest node speaks.
    let newest = c.nodes.iter().map(|n| n.version_max.max(1)).max().unwrap_or(1);
    let behind: Vec<String> = c.nodes.iter().filter(|n| n.version_max.max(1) < newest).map(|n| format!("node-{}", n.id)).collect();
    if !behind.is_empty() {
        out.push(finding(
            Severity::Info,
            "upgrade",
            format!("nodes run different builds: the cluster stays at version {} until {} speak a newer one", c.cluster_version, behind.join(", ")),
            "finish the rolling upgrade (docs/operations.md, \"Rolling restarts and upgrades\"); nothing is wrong meanwhile",
        ));
    }
    let leaderless: Vec<u32> = c.pgs.iter().filter(|p| p.leader == 0).map(|p| p.id).collect();
    if !leaderless.is_empty() {
        out.push(finding(
            Severity::Critical,
            "placement groups",
            format!("{} placement group(s) have no leader: I/O to the volumes in them waits (pg {:?})", leaderless.len(), first(&leaderless)),
            "bring their down replicas' nodes back: a placement group needs a majority of its replicas up",
        ));
    }
    let degraded: Vec<u32> = c.pgs.iter().filter(|p| p.leader != 0 && p.live_replicas.len() < p.replicas.len()).map(|p| p.id).collect();
    if !degraded.is_empty() {
        out.push(finding(
            Severity::Warning,
            "placement groups",
            format!(
                "{} placement group(s) run with a replica down (pg {:?}): one more failure in them stops their I/O",
                degraded.len(),
                first(&degraded)
            ),
            "bring the down node back; if it stays down the healer rebuilds its replicas on other nodes",
        ));
    }
    let moving: Vec<_> = c.pgs.iter().filter(|p| p.moving_to != 0).collect();
    if !moving.is_empty() {
        let (done, total) = moving.iter().fold((0, 0), |(d, t), p| (d + p.move_chunks_done, t + p.move_chunks_total));
        let pct = (done * 100).checked_div(total).unwrap_or(0).min(100);
        out.push(finding(
            Severity::Info,
            "rebuild",
            format!("{} replica move(s) in progress, {pct}% of their chunks copied", moving.len()),
            "nothing to do; follow it with `basalt cluster status`",
        ));
    }
    for n in c.nodes.iter().filter(|n| n.capacity_bytes > 0) {
        let used = n.used_bytes as f64 / n.capacity_bytes as f64;
        if used >= SPACE_WARNING {
            let severity = if used >= SPACE_CRITICAL { Severity::Critical } else { Severity::Warning };
            out.push(finding(
                severity,
                "space",
                format!("node-{} is {:.0}% full ({} of {})", n.id, used * 100.0, format_size(n.used_bytes), format_size(n.capacity_bytes)),
                "add a storage node (replicas move to it), or delete volumes, snapshots or backups; writes wait when a node is full",
            ));
        }
    }
    let now_s = (i.now_ms / 1000) as i64;
    for n in c.nodes.iter().filter(|n| n.cert_not_after > 0) {
        let left = n.cert_not_after - now_s;
        if left <= 0 {
            out.push(finding(
                Severity::Critical,
                "certificates",
                format!("node-{}'s certificate expired", n.id),
                "issue a new one (basalt cert node) and restart or reload the node",
            ));
        } else if left < CERT_WARNING.as_secs() as i64 {
            out.push(finding(
                Severity::Warning,
                "certificates",
                format!("node-{}'s certificate expires in {} day(s)", n.id, left / 86_400),
                "issue a new one (basalt cert node); the node reloads changed certificate files",
            ));
        }
    }
    for (node, r) in i.scrub {
        match r {
            Ok(s) if s.unrepairable > 0 => out.push(finding(
                Severity::Critical,
                "scrub",
                format!("node-{node}'s scrubber found {} block(s) no replica holds intact", s.unrepairable),
                "restore the affected volumes from a backup; see `basalt scrub status` and the node's log for which",
            )),
            Ok(s) if s.errors > 0 || s.integrity_check_errors > 0 => out.push(finding(
                Severity::Warning,
                "scrub",
                format!("node-{node}'s scrubber hit {} error(s) overwriting freed space and {} checking blocks", s.errors, s.integrity_check_errors),
                "check the node's disk and log; the scrubber retries",
            )),
            Ok(_) => {}
            Err(e) => {
                out.push(finding(Severity::Warning, "scrub", format!("node-{node}'s scrubber did not answer: {e}"), "check that the node is up"))
            }
        }
    }
    // The newest backup of each volume: failed is a warning.
    let mut newest: std::collections::BTreeMap<&str, &Backup> = std::collections::BTreeMap::new();
    for b in i.backups.iter().filter(|b| !b.volume_deleted) {
        if newest.get(b.volume.as_str()).is_none_or(|n| n.created_unix_ms < b.created_unix_ms) {
            newest.insert(&b.volume, b);
        }
    }
    for b in newest.values().filter(|b| b.state == "failed") {
        out.push(finding(
            Severity::Warning,
            "backups",
            format!("the last backup of {} (backup {}) failed: {}", b.volume, b.id, b.error),
            format!("take it again: basalt backup create {}", b.volume),
        ));
    }
    for s in i.schedules {
        let grace = (s.every_secs * 1000).max(60_000);
        if s.next_run_unix_ms > 0 && i.now_ms > s.next_run_unix_ms + grace {
            out.push(finding(
                Severity::Warning,
                "backups",
                format!("schedule {} is late: its run was due {} s ago", s.name, (i.now_ms - s.next_run_unix_ms) / 1000),
                "the meta leader runs schedules: check that it has backup nodes up (basalt cluster status)",
            ));
        }
    }
    for why in i.unlisted {
        out.push(finding(
            Severity::Warning,
            "backups",
            format!("backups were not checked: {why}"),
            "run `basalt status` with a token that may list backups",
        ));
    }
    out.sort_by_key(|f| std::cmp::Reverse(f.severity));
    out
}

fn first(ids: &[u32]) -> &[u32] {
    &ids[..ids.len().min(8)]
}

/// Healthy: nothing worse than information.
pub fn healthy(findings: &[Finding]) -> bool {
    findings.iter().all(|f| f.severity == Severity::Info)
}

/// `basalt status`.
pub async fn status(admin: &Admin, out: Out) -> Result<(), CliError> {
    let (value, text, ok) = report(admin).await?;
    out.print(value, || text);
    if ok { Ok(()) } else { Err(CliError::unhealthy()) }
}

/// The findings as `status --json` and `status` show them, and whether the cluster is healthy.
pub async fn report(admin: &Admin) -> Result<(Value, String, bool), CliError> {
    let cluster = admin.call(|mut c| async move { c.cluster_status(ClusterStatusRequest {}).await }).await?;
    let mut unlisted = Vec::new();
    let backups = match admin.call(|mut c| async move { c.backup_list(BackupListRequest { volume: String::new(), running_only: false }).await }).await
    {
        Ok(r) => r.backups,
        Err(e) => {
            unlisted.push(format!("backup list: {}", e.message));
            Vec::new()
        }
    };
    let schedules = match admin.call(|mut c| async move { c.schedule_list(ScheduleListRequest {}).await }).await {
        Ok(r) => r.schedules,
        Err(e) => {
            unlisted.push(format!("schedule list: {}", e.message));
            Vec::new()
        }
    };
    let mut scrub = Vec::new();
    for n in cluster.nodes.iter().filter(|n| n.state == "up" && n.roles.iter().any(|r| r == "storage")) {
        scrub.push((n.id, crate::scrub::ask_status(admin, &n.addr).await));
    }
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let findings = check(&Inputs { cluster: &cluster, backups: &backups, schedules: &schedules, scrub: &scrub, unlisted: &unlisted, now_ms });
    let ok = healthy(&findings);
    let up = cluster.nodes.iter().filter(|n| n.state == "up").count();
    let (used, capacity) = cluster.nodes.iter().fold((0, 0), |(u, c), n| (u + n.used_bytes, c + n.capacity_bytes));
    let pgs_ok = cluster.pgs.iter().filter(|p| p.leader != 0 && p.live_replicas.len() == p.replicas.len()).count();
    let value = json!({
        "healthy": ok,
        "cluster_id": cluster.cluster_id,
        "nodes_up": up, "nodes": cluster.nodes.len(),
        "pgs_healthy": pgs_ok, "pgs": cluster.pgs.len(),
        "used_bytes": used, "capacity_bytes": capacity,
        "volumes": cluster.volumes,
        "findings": findings.iter().map(finding_json).collect::<Vec<Value>>(),
    });
    let text = {
        let mut text = format!(
            "cluster {}: {}\n  nodes {up}/{} up, placement groups {pgs_ok}/{} healthy, {} volume(s), {} of {} used\n",
            cluster.cluster_id,
            if ok { "HEALTHY" } else { "NEEDS ATTENTION" },
            cluster.nodes.len(),
            cluster.pgs.len(),
            cluster.volumes,
            format_size(used),
            format_size(capacity)
        );
        for f in &findings {
            text.push_str(&format!("\n{:8} {}: {}\n         → {}", f.severity.as_str().to_uppercase(), f.area, f.what, f.advice));
        }
        text
    };
    Ok((value, text, ok))
}

fn finding_json(f: &Finding) -> Value {
    json!({"severity": f.severity.as_str(), "area": f.area, "what": f.what, "advice": f.advice})
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_proto::admin::{Node, PlacementGroup};

    fn node(id: u64, state: &str) -> Node {
        Node { id, addr: format!("127.0.0.1:{id}"), state: state.into(), roles: vec!["storage".into()], ..Default::default() }
    }

    fn pg(id: u32, leader: u64, live: usize) -> PlacementGroup {
        PlacementGroup { id, leader, replicas: vec![1, 2, 3], live_replicas: vec![1, 2, 3][..live].to_vec(), ..Default::default() }
    }

    fn findings(
        cluster: &ClusterStatusReply,
        backups: &[Backup],
        schedules: &[Schedule],
        scrub: &[(u64, Result<ScrubStatusReply, String>)],
    ) -> Vec<Finding> {
        check(&Inputs { cluster, backups, schedules, scrub, unlisted: &[], now_ms: 1_000_000_000 })
    }

    #[test]
    fn a_healthy_cluster_has_nothing_to_say_and_each_problem_comes_with_advice() {
        let mut c = ClusterStatusReply {
            initialized: true,
            nodes: (1..=3).map(|i| node(i, "up")).collect(),
            pgs: (0..4).map(|i| pg(i, 1, 3)).collect(),
            ..Default::default()
        };
        assert!(findings(&c, &[], &[], &[]).is_empty());

        // A node down: critical; its PGs run degraded (warning) or without a leader (critical).
        c.nodes[1] = node(2, "down");
        c.pgs[0] = pg(0, 1, 2);
        c.pgs[1] = pg(1, 0, 1);
        let f = findings(&c, &[], &[], &[]);
        assert!(!healthy(&f));
        assert_eq!(
            f.iter().map(|f| (f.severity, f.area)).collect::<Vec<_>>(),
            vec![(Severity::Critical, "nodes"), (Severity::Critical, "placement groups"), (Severity::Warning, "placement groups")]
        );
        assert!(f.iter().all(|f| !f.advice.is_empty()));
        assert!(f[0].what.contains("node-2"), "{f:?}");
        // Half-way through a rolling upgrade: information naming the nodes still to upgrade.
        let mut u =
            ClusterStatusReply { initialized: true, cluster_version: 1, nodes: (1..=3).map(|i| node(i, "up")).collect(), ..Default::default() };
        u.nodes[0].version_max = 2;
        u.nodes[1].version_max = 1;
        let f = findings(&u, &[], &[], &[]);
        assert!(healthy(&f) && f.len() == 1 && f[0].area == "upgrade" && f[0].what.contains("node-2, node-3"), "{f:?}");
        u.nodes.iter_mut().for_each(|n| n.version_max = 2);
        assert!(findings(&u, &[], &[], &[]).is_empty(), "every node speaks 2: the leader raises the cluster on its own");
        // Not heard from yet (a new meta leader): information, not a problem.
        c.nodes[1] = node(2, "unknown");
        c.pgs = (0..4).map(|i| pg(i, 1, 3)).collect();
        let f = findings(&c, &[], &[], &[]);
        assert!(healthy(&f) && f.len() == 1, "{f:?}");
        let unlisted = ["backup list: permission denied".to_string()];
        let f = check(&Inputs { cluster: &c, backups: &[], schedules: &[], scrub: &[], unlisted: &unlisted, now_ms: 1 });
        assert!(!healthy(&f) && f.iter().any(|f| f.what.contains("not checked")), "{f:?}");

        // Space, certificates, scrub, backups, schedules.
        let mut c = ClusterStatusReply { initialized: true, nodes: vec![node(1, "up")], ..Default::default() };
        c.nodes[0].capacity_bytes = 100;
        c.nodes[0].used_bytes = 90;
        c.nodes[0].cert_not_after = 1_000_000 + 86_400;
        let scrub = [(1, Ok(ScrubStatusReply { unrepairable: 2, ..Default::default() })), (2, Err("no answer".to_string()))];
        let failed = Backup { id: 4, volume: "v".into(), state: "failed".into(), error: "disk".into(), created_unix_ms: 2, ..Default::default() };
        let older = Backup { id: 3, volume: "v".into(), state: "complete".into(), created_unix_ms: 1, ..Default::default() };
        let late = Schedule { name: "nightly".into(), every_secs: 60, next_run_unix_ms: 1_000_000_000 - 600_000, ..Default::default() };
        let f = findings(&c, &[older, failed.clone()], &[late], &scrub);
        let areas: Vec<_> = f.iter().map(|f| (f.severity, f.area)).collect();
        for want in [
            (Severity::Warning, "space"),
            (Severity::Warning, "certificates"),
            (Severity::Critical, "scrub"),
            (Severity::Warning, "scrub"),
            (Severity::Warning, "backups"),
        ] {
            assert!(areas.contains(&want), "{want:?} in {areas:?}");
        }
        assert_eq!(f.iter().filter(|f| f.area == "backups").count(), 2, "the failed backup and the late schedule: {f:?}");
        // A newer complete backup clears the failed one.
        let newer = Backup { id: 5, created_unix_ms: 3, state: "complete".into(), ..failed };
        let f = findings(&c, &[newer], &[], &[]);
        assert!(f.iter().all(|f| f.area != "backups"), "{f:?}");
        c.nodes[0].used_bytes = 99;
        c.nodes[0].cert_not_after = 10;
        let f = findings(&c, &[], &[], &[]);
        assert!(f.iter().any(|f| f.area == "space" && f.severity == Severity::Critical), "{f:?}");
        assert!(f.iter().any(|f| f.area == "certificates" && f.severity == Severity::Critical), "{f:?}");
    }
}
