//! `basalt cluster|node|volume ...`: admin commands, tables for people, `--json` for scripts.

use std::io::IsTerminal;
use std::time::Duration;

use basalt_common::units::{format_size, parse_size};
use basalt_proto::admin::{
    ClusterInitRequest, ClusterStatusRequest, Node, NodeDrainRequest, NodeListRequest, NodeRemoveRequest, PlacementGroup, Volume,
    VolumeCreateRequest, VolumeDeleteRequest, VolumeListRequest, VolumeResizeRequest, VolumeShowRequest,
};
use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use serde_json::{Value, json};

use crate::admin::Admin;
use crate::exit::CliError;

/// Output mode.
#[derive(Clone, Copy)]
pub struct Out {
    /// Print JSON instead of tables.
    pub json: bool,
}

impl Out {
    /// Prints `value` as JSON, or `human()` as text.
    pub fn print(&self, value: Value, human: impl FnOnce() -> String) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
        } else {
            println!("{}", human());
        }
    }
}

/// A Unix-milliseconds time for people (`none` for 0: never, not yet).
pub fn when(ms: u64, none: &str) -> String {
    if ms == 0 { none.into() } else { basalt_security::identity::format_unix((ms / 1000) as i64) }
}

/// An empty table with `header`.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    t.set_header(header.iter().copied());
    t
}

fn labels(n: &Node) -> String {
    let l = n.labels.clone().unwrap_or_default();
    [("region", l.region), ("zone", l.zone), ("rack", l.rack), ("host", l.host)]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A node as JSON.
pub fn node_json(n: &Node) -> Value {
    let l = n.labels.clone().unwrap_or_default();
    json!({
        "id": n.id, "addr": n.addr, "state": n.state, "roles": n.roles,
        "labels": {"region": l.region, "zone": l.zone, "rack": l.rack, "host": l.host},
        "capacity_bytes": n.capacity_bytes, "used_bytes": n.used_bytes,
        "scrub_pending_bytes": n.scrub_pending_bytes, "last_seen_ms_ago": n.last_seen_ms_ago,
        "metrics_addr": n.metrics_addr, "draining": n.draining, "replicas": n.replicas,
        "cert_not_after": n.cert_not_after,
        "versions": {"min": n.version_min.max(1), "max": n.version_max.max(1)},
    })
}

/// When a node's certificate expires, and how soon.
fn cert_expiry(n: &Node) -> String {
    if n.cert_not_after == 0 {
        return "-".into();
    }
    let now = basalt_security::identity::unix_now();
    let days = (n.cert_not_after - now).div_euclid(86_400);
    let when = basalt_security::identity::format_unix(n.cert_not_after);
    if n.cert_not_after <= now { format!("{when} (EXPIRED)") } else { format!("{when} ({days}d)") }
}

fn node_state(n: &Node) -> String {
    if n.draining { format!("{} (draining)", n.state) } else { n.state.clone() }
}

/// A replica move as JSON (null when the PG is not moving).
fn move_json(p: &PlacementGroup) -> Value {
    if p.moving_to == 0 {
        return Value::Null;
    }
    json!({
        "from": p.moving_from, "to": p.moving_to, "reason": p.move_reason, "phase": p.move_phase,
        "chunks_done": p.move_chunks_done, "chunks_total": p.move_chunks_total,
        "progress_percent": move_percent(p), "running_ms": p.move_started_ms_ago,
    })
}

/// How far a move is: the snapshot's share of chunks sent (a move with no chunks to send is
/// at 0% until it is done).
fn move_percent(p: &PlacementGroup) -> u64 {
    (p.move_chunks_done * 100).checked_div(p.move_chunks_total).map_or(0, |pct| pct.min(100))
}

pub(crate) fn volume_json(v: &Volume) -> Value {
    json!({
        "id": v.id, "name": v.name, "size": v.size, "state": v.state,
        "created_unix_ms": v.created_unix_ms, "pgs_released": v.pgs_released, "pgs_total": v.pgs_total,
        "encrypted": v.encrypted, "key_version": v.key_version,
        "reencrypting": v.reencrypting, "reencrypt_next_block": v.reencrypt_next_block,
        "write_epoch": v.write_epoch, "snapshots": v.snapshots.iter().map(|s| s.name.clone()).collect::<Vec<_>>(),
        "attached_by": v.attached_by, "head_bytes": v.head_bytes, "snapshot_bytes": v.snapshot_bytes,
        "usage_partial": v.usage_partial, "clone_of": v.clone_of, "kept_for_clones": v.kept_for_clones,
        "qos": v.qos.as_ref().map(|q| json!({"iops": q.iops, "bps": q.bps, "burst_ms": q.burst_ms, "own": v.qos_set})),
    })
}

fn volume_state(v: &Volume) -> String {
    if v.kept_for_clones {
        "deleted (kept while clones read it)".into()
    } else if v.state == "deleting" {
        format!("deleting ({}/{} PGs released)", v.pgs_released, v.pgs_total)
    } else {
        v.state.clone()
    }
}

pub(crate) fn size_arg(s: &str) -> Result<u64, CliError> {
    parse_size(s).map_err(|e| CliError::invalid(e.to_string()))
}

/// `basalt cluster init`: writes the first admin token to `token_file` (mode 0600).
pub async fn cluster_init(
    admin: &Admin,
    out: Out,
    pgs: u32,
    extent_size: Option<String>,
    failure_domain: String,
    token_file: &std::path::Path,
) -> Result<(), CliError> {
    let extent_size = match extent_size {
        Some(s) => size_arg(&s)?,
        None => 0,
    };
    // Checked before the cluster is initialized: the token is shown once and must land somewhere.
    if token_file.exists() {
        return Err(CliError { code: 4, message: format!("{} already exists; not replacing it (pass --admin-token-file)", token_file.display()) });
    }
    let req = ClusterInitRequest { pg_count: pgs, extent_size, failure_domain, meta_addrs: admin.addrs().to_vec() };
    let reply = admin
        .call(|mut c| {
            let req = req.clone();
            async move { c.cluster_init(req).await }
        })
        .await?;
    let written = if reply.admin_token.is_empty() {
        None
    } else {
        crate::security::write_secret_file(token_file, &reply.admin_token)?;
        Some(token_file.canonicalize().unwrap_or_else(|_| token_file.to_path_buf()))
    };
    out.print(
        json!({"cluster_id": reply.cluster_id, "pg_count": reply.pg_count, "admin_token_id": reply.admin_token_id, "admin_token_file": written}),
        || {
            let mut text = format!("cluster {} initialized with {} placement groups", reply.cluster_id, reply.pg_count);
            if let Some(p) = &written {
                text.push_str(&format!(
                    "\nthe first admin token ({}) is in {} (mode 0600): export BASALT_TOKEN_FILE={}",
                    reply.admin_token_id,
                    p.display(),
                    p.display()
                ));
            }
            text
        },
    );
    Ok(())
}

/// `basalt cluster status`.
pub async fn cluster_status(admin: &Admin, out: Out) -> Result<(), CliError> {
    let (value, text) = cluster_status_report(admin).await?;
    out.print(value, || text);
    Ok(())
}

/// `cluster status` as JSON and as text.
pub async fn cluster_status_report(admin: &Admin) -> Result<(Value, String), CliError> {
    let s = admin.call(|mut c| async move { c.cluster_status(ClusterStatusRequest {}).await }).await?;
    let healthy = s.pgs.iter().filter(|p| p.leader != 0 && p.live_replicas.len() == p.replicas.len()).count();
    let degraded = s.pgs.iter().filter(|p| p.leader != 0 && p.live_replicas.len() < p.replicas.len()).count();
    let leaderless = s.pgs.iter().filter(|p| p.leader == 0).count();
    let value = json!({
        "initialized": s.initialized, "cluster_id": s.cluster_id, "meta_leader": s.meta_leader,
        "meta_members": s.meta_members, "pg_count": s.pg_count, "extent_size": s.extent_size,
        "failure_domain": s.failure_domain, "volumes": s.volumes, "map_version": s.map_version,
        "encryption_default": s.encryption_default, "cluster_version": s.cluster_version, "per_volume_metrics": s.per_volume_metrics,
        "pgs_healthy": healthy, "pgs_degraded": degraded, "pgs_without_leader": leaderless,
        "nodes": s.nodes.iter().map(node_json).collect::<Vec<_>>(),
        "pgs": s.pgs.iter().map(|p| json!({
            "id": p.id, "replicas": p.replicas, "leader": p.leader, "term": p.term,
            "applied_index": p.applied_index, "live_replicas": p.live_replicas, "move": move_json(p),
        })).collect::<Vec<_>>(),
    });
    let text = {
        let mut text = format!(
            "cluster {}  version {}  meta leader node-{} (members {:?})\nplacement groups: {} ({} healthy, {} degraded, {} without leader), extent size {}, replicas differ by {}\nvolumes: {} (new ones {})\n",
            s.cluster_id,
            s.cluster_version,
            s.meta_leader,
            s.meta_members,
            s.pg_count,
            healthy,
            degraded,
            leaderless,
            format_size(s.extent_size),
            s.failure_domain,
            s.volumes,
            if s.encryption_default { "encrypted by default" } else { "unencrypted unless --encrypt" }
        );
        let mut t = table(&["node", "state", "address", "labels", "roles", "used / capacity", "replicas", "PG leaders", "versions"]);
        for n in &s.nodes {
            let leads = s.pgs.iter().filter(|p| p.leader == n.id).count();
            t.add_row(vec![
                format!("node-{}", n.id),
                node_state(n),
                n.addr.clone(),
                labels(n),
                n.roles.join(","),
                format!("{} / {}", format_size(n.used_bytes), format_size(n.capacity_bytes)),
                n.replicas.to_string(),
                leads.to_string(),
                format!("{}..={}", n.version_min.max(1), n.version_max.max(1)),
            ]);
        }
        text.push_str(&t.to_string());
        let moving: Vec<&PlacementGroup> = s.pgs.iter().filter(|p| p.moving_to != 0).collect();
        if !moving.is_empty() {
            text.push_str(&format!("\nreplica moves in progress: {}\n", moving.len()));
            let mut m = table(&["pg", "from", "to", "reason", "phase", "snapshot", "running"]);
            for p in moving {
                m.add_row(vec![
                    format!("pg-{}", p.id),
                    format!("node-{}", p.moving_from),
                    format!("node-{}", p.moving_to),
                    p.move_reason.clone(),
                    p.move_phase.clone(),
                    format!("{}/{} chunks ({}%)", p.move_chunks_done, p.move_chunks_total, move_percent(p)),
                    format!("{}s", p.move_started_ms_ago / 1000),
                ]);
            }
            text.push_str(&m.to_string());
        }
        text
    };
    Ok((value, text))
}

/// `basalt node list`.
pub async fn node_list(admin: &Admin, out: Out) -> Result<(), CliError> {
    let r = admin.call(|mut c| async move { c.node_list(NodeListRequest {}).await }).await?;
    out.print(json!(r.nodes.iter().map(node_json).collect::<Vec<_>>()), || {
        let mut t = table(&["node", "state", "address", "labels", "roles", "replicas", "used", "capacity", "awaiting scrub", "cert expires"]);
        for n in &r.nodes {
            t.add_row(vec![
                format!("node-{}", n.id),
                node_state(n),
                n.addr.clone(),
                labels(n),
                n.roles.join(","),
                n.replicas.to_string(),
                format_size(n.used_bytes),
                format_size(n.capacity_bytes),
                format_size(n.scrub_pending_bytes),
                cert_expiry(n),
            ]);
        }
        t.to_string()
    });
    Ok(())
}

/// `basalt node drain`: records the drain, then follows the node's replica count down to zero
/// with a progress bar (or percentages when not on a terminal / with `--json`). Says the drain
/// is stuck (exit 7, the drain stays recorded) once nothing has left the node and no move has
/// run in the cluster for `stuck_after`: the healer finds no target for what is left.
pub async fn node_drain(admin: &Admin, out: Out, id: u64, undo: bool, no_wait: bool, stuck_after: Duration) -> Result<(), CliError> {
    let r = admin.call(|mut c| async move { c.node_drain(NodeDrainRequest { id, undo }).await }).await?;
    if undo || no_wait {
        let what = if undo { "no longer draining" } else { "draining" };
        out.print(json!({"node": id, "draining": !undo, "replicas_left": r.replicas_left}), || {
            format!("node-{id} is {what}; it holds {} replica(s)", r.replicas_left)
        });
        return Ok(());
    }
    let total = u64::from(r.replicas_left);
    let tty = std::io::stderr().is_terminal() && !out.json;
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(total.max(1));
        b.set_style(
            indicatif::ProgressStyle::with_template("draining node-{msg} [{bar:30}] {pos}/{len} replicas moved ({elapsed})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message(id.to_string());
        b
    });
    let started = std::time::Instant::now();
    let mut last_pct = u64::MAX;
    let (mut last_left, mut progressed_at) = (u64::MAX, std::time::Instant::now());
    loop {
        let status = admin.call(|mut c| async move { c.cluster_status(ClusterStatusRequest {}).await }).await?;
        let Some(n) = status.nodes.iter().find(|n| n.id == id) else {
            return Err(CliError::other(format!("node-{id} disappeared from the cluster while draining")));
        };
        if !n.draining {
            return Err(CliError::other(format!("node-{id} is no longer draining (undone elsewhere); {} replica(s) left", n.replicas)));
        }
        let left = u64::from(n.replicas);
        let done = total.saturating_sub(left);
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        match &bar {
            Some(b) => b.set_position(done),
            None if pct != last_pct => {
                if out.json {
                    eprintln!("{}", json!({"node": id, "replicas_left": left, "progress_percent": pct}));
                } else {
                    eprintln!("draining node-{id}: {pct}% ({left} replica(s) left)");
                }
                last_pct = pct;
            }
            None => {}
        }
        if left == 0 {
            break;
        }
        // Progress: a replica left, or some move is running (drain moves queue behind rebuilds).
        if left != last_left || status.pgs.iter().any(|p| p.moving_to != 0) {
            (last_left, progressed_at) = (left, std::time::Instant::now());
        } else if progressed_at.elapsed() >= stuck_after {
            if let Some(b) = bar {
                b.abandon();
            }
            let down: Vec<String> = status.nodes.iter().filter(|n| n.state != "up").map(|n| format!("node-{}", n.id)).collect();
            return Err(CliError {
                code: 7,
                message: format!(
                    "node-{id}'s drain is stuck: {left} replica(s) left and no replica has moved for {}s. Each needs a target that is up, not draining, \
                     has free space and is in a {} the PG's other replicas are not in{}. The drain stays recorded and goes on by itself once such a \
                     node is available (add one, or bring a down node back); `basalt node drain {id} --undo` cancels it",
                    stuck_after.as_secs(),
                    if status.failure_domain.is_empty() { "failure domain".to_string() } else { status.failure_domain.clone() },
                    if down.is_empty() { String::new() } else { format!(" (down now: {})", down.join(", ")) }
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let secs = started.elapsed().as_secs_f64();
    out.print(json!({"node": id, "drained": true, "replicas_moved": total, "seconds": secs}), || {
        format!("node-{id} drained: {total} replica(s) moved in {secs:.1}s; remove it with `basalt node remove {id}`")
    });
    Ok(())
}

/// `basalt node remove`.
pub async fn node_remove(admin: &Admin, out: Out, id: u64) -> Result<(), CliError> {
    admin.call(|mut c| async move { c.node_remove(NodeRemoveRequest { id }).await }).await?;
    out.print(json!({"removed": id}), || format!("node-{id} removed from the cluster"));
    Ok(())
}

fn volume_table(vols: &[Volume]) -> String {
    let mut t = table(&["name", "id", "size", "state", "encryption", "snapshots"]);
    for v in vols {
        let enc = match (v.encrypted, v.reencrypting) {
            (false, _) => "none".into(),
            (true, false) => format!("AES-256-GCM, key v{}", v.key_version),
            (true, true) => format!("AES-256-GCM, key v{}, re-encrypting: {}%", v.key_version, crate::rekey::percent(v)),
        };
        t.add_row(vec![v.name.clone(), v.id.to_string(), format_size(v.size), volume_state(v), enc, v.snapshots.len().to_string()]);
    }
    t.to_string()
}

/// `basalt volume create`.
/// `basalt volume create`; with a KEK file, an encrypted volume: its data key is made here and
/// only its wrapped form leaves this host.
pub async fn volume_create(
    admin: &Admin,
    out: Out,
    name: String,
    size: String,
    kek_file: Option<std::path::PathBuf>,
    unencrypted: bool,
    qos: Option<basalt_proto::admin::Qos>,
) -> Result<(), CliError> {
    let size = size_arg(&size)?;
    let wrapped_key = match &kek_file {
        Some(path) => {
            let kek = basalt_volume_client::crypt::Kek::from_file(path).map_err(|e| CliError::invalid(e.to_string()))?;
            let (_, wrapped) = basalt_volume_client::crypt::DataKey::generate(1, &kek, &name).map_err(|e| CliError::other(e.to_string()))?;
            bytes::Bytes::copy_from_slice(wrapped.as_bytes())
        }
        None => bytes::Bytes::new(),
    };
    let r = admin
        .call(|mut c| {
            let (name, wrapped_key) = (name.clone(), wrapped_key.clone());
            async move { c.volume_create(VolumeCreateRequest { name, size, wrapped_key, unencrypted, qos }).await }
        })
        .await?;
    let v = r.volume.unwrap_or_default();
    out.print(volume_json(&v), || {
        let enc = if v.encrypted { ", encrypted: attach it with the same --kek-file" } else { "" };
        format!("created volume {} ({}, id {}{enc})", v.name, format_size(v.size), v.id)
    });
    Ok(())
}

/// `basalt cluster configure`.
pub async fn cluster_configure(
    admin: &Admin,
    out: Out,
    encryption_default: Option<bool>,
    qos_default: Option<basalt_proto::admin::Qos>,
    per_volume_metrics: Option<bool>,
) -> Result<(), CliError> {
    if encryption_default.is_none() && qos_default.is_none() && per_volume_metrics.is_none() {
        return Err(CliError::usage(
            "nothing to change: give --encryption-default on|off, --qos-iops/--qos-bps/--qos-burst and/or --per-volume-metrics on|off",
        ));
    }
    let req = basalt_proto::admin::ClusterConfigureRequest {
        set_encryption_default: encryption_default.is_some(),
        encryption_default: encryption_default.unwrap_or(false),
        qos_default,
        set_per_volume_metrics: per_volume_metrics.is_some(),
        per_volume_metrics: per_volume_metrics.unwrap_or(false),
    };
    let r = admin.call(|mut c| async move { c.cluster_configure(req).await }).await?;
    let qos = r.qos_default.as_ref().map(basalt_proto::view::qos_from_proto).unwrap_or_default();
    let value = json!({
        "encryption_default": r.encryption_default, "qos_default": {"iops": qos.iops, "bps": qos.bps, "burst_ms": qos.burst_ms},
        "per_volume_metrics": r.per_volume_metrics,
    });
    out.print(value, || {
        let enc = if r.encryption_default {
            "new volumes are encrypted by default (volume create needs --encrypt --kek-file FILE, or --no-encrypt)"
        } else {
            "new volumes are unencrypted unless created with --encrypt"
        };
        let per_volume = if r.per_volume_metrics { "storage nodes export series per volume" } else { "no per-volume series on the storage nodes" };
        format!("{enc}; volumes without limits of their own are held to: {}; {per_volume}", qos.describe())
    });
    Ok(())
}

/// `basalt volume list`.
pub async fn volume_list(admin: &Admin, out: Out) -> Result<(), CliError> {
    let r = admin.call(|mut c| async move { c.volume_list(VolumeListRequest {}).await }).await?;
    out.print(json!(r.volumes.iter().map(volume_json).collect::<Vec<_>>()), || {
        if r.volumes.is_empty() { "no volumes".to_string() } else { volume_table(&r.volumes) }
    });
    Ok(())
}

/// `basalt volume show`.
pub async fn volume_show(admin: &Admin, out: Out, name: String) -> Result<(), CliError> {
    let r = admin
        .call(|mut c| {
            let name = name.clone();
            async move { c.volume_show(VolumeShowRequest { name, usage: true }).await }
        })
        .await?;
    let v = r.volume.unwrap_or_default();
    out.print(volume_json(&v), || {
        let mut text = volume_table(std::slice::from_ref(&v));
        let partial = if v.usage_partial { " (partial: a node did not answer)" } else { "" };
        text.push_str(&format!(
            "\nspace (one replica's): {} for the volume as it is, {} kept by {} snapshot(s){partial}",
            format_size(v.head_bytes),
            format_size(v.snapshot_bytes),
            v.snapshots.len()
        ));
        if !v.clone_of.is_empty() {
            text.push_str(&format!("\na clone of {}: reads it where it has not written", v.clone_of));
        }
        text.push_str(&format!("\nQoS: {}", crate::qos::describe(&v)));
        text
    });
    Ok(())
}

/// `basalt volume du [NAME]`: asks the storage nodes, volume by volume.
pub async fn volume_du(admin: &Admin, out: Out, name: Option<String>) -> Result<(), CliError> {
    let names = match name {
        Some(n) => vec![n],
        None => {
            let r = admin.call(|mut c| async move { c.volume_list(VolumeListRequest {}).await }).await?;
            r.volumes.into_iter().filter(|v| v.state == "active").map(|v| v.name).collect()
        }
    };
    let mut vols = Vec::with_capacity(names.len());
    for name in names {
        let r = admin
            .call(|mut c| {
                let name = name.clone();
                async move { c.volume_show(VolumeShowRequest { name, usage: true }).await }
            })
            .await?;
        vols.push(r.volume.unwrap_or_default());
    }
    let row = |v: &Volume| {
        json!({"name": v.name, "provisioned_bytes": v.size, "written_bytes": v.head_bytes, "snapshot_bytes": v.snapshot_bytes,
               "snapshots": v.snapshots.len(), "partial": v.usage_partial, "clone_of": v.clone_of})
    };
    let total = |f: fn(&Volume) -> u64| vols.iter().map(f).sum::<u64>();
    let (provisioned, written, held) = (total(|v| v.size), total(|v| v.head_bytes), total(|v| v.snapshot_bytes));
    let value = json!({
        "volumes": vols.iter().map(row).collect::<Vec<_>>(),
        "total": {"provisioned_bytes": provisioned, "written_bytes": written, "snapshot_bytes": held},
    });
    out.print(value, || {
        let mut t = table(&["volume", "provisioned", "written", "snapshots", "held by snapshots"]);
        for v in &vols {
            let partial = if v.usage_partial { " (partial)" } else { "" };
            t.add_row(vec![
                v.name.clone(),
                format_size(v.size),
                format!("{}{partial}", format_size(v.head_bytes)),
                v.snapshots.len().to_string(),
                format!("{}{partial}", format_size(v.snapshot_bytes)),
            ]);
        }
        if vols.len() > 1 {
            t.add_row(vec!["total".into(), format_size(provisioned), format_size(written), String::new(), format_size(held)]);
        }
        let mut text = t.to_string();
        text.push_str("\nbytes of one replica; each is stored on 3 nodes. A clone's written bytes are its own; what it reads from its source is not counted again.");
        if vols.iter().any(|v| v.usage_partial) {
            text.push_str("\n(partial): a storage node did not answer; the figure is low");
        }
        text
    });
    Ok(())
}

/// `basalt volume resize`.
pub async fn volume_resize(admin: &Admin, out: Out, name: String, size: String) -> Result<(), CliError> {
    let size = size_arg(&size)?;
    let r = admin
        .call(|mut c| {
            let name = name.clone();
            async move { c.volume_resize(VolumeResizeRequest { name, size }).await }
        })
        .await?;
    let v = r.volume.unwrap_or_default();
    out.print(volume_json(&v), || format!("volume {} is now {}", v.name, format_size(v.size)));
    Ok(())
}

/// `basalt volume delete`: marks the volume deleted, then follows the release of its data
/// with a progress bar (or percentages when not on a terminal / with `--json`).
pub async fn volume_delete(admin: &Admin, out: Out, name: String, no_wait: bool) -> Result<(), CliError> {
    let r = admin
        .call(|mut c| {
            let name = name.clone();
            async move { c.volume_delete(VolumeDeleteRequest { name, wait: false }).await }
        })
        .await?;
    let v = r.volume.unwrap_or_default();
    if no_wait {
        out.print(volume_json(&v), || format!("volume {} deleted; its data is being released in the background", v.name));
        return Ok(());
    }
    if v.kept_for_clones {
        out.print(volume_json(&v), || format!("volume {} deleted; its data stays until no clone of it reads it", v.name));
        return Ok(());
    }
    let total = u64::from(r.pgs_total.max(1));
    let tty = std::io::stderr().is_terminal() && !out.json;
    let bar = if tty {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template("releasing data of {msg} [{bar:30}] {pos}/{len} placement groups")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message(v.name.clone());
        Some(b)
    } else {
        None
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let mut last_pct = u64::MAX;
    loop {
        let list = admin.call(|mut c| async move { c.volume_list(VolumeListRequest {}).await }).await?;
        let done = match list.volumes.iter().find(|x| x.id == v.id) {
            None => total,
            Some(x) => u64::from(x.pgs_released),
        };
        let pct = done * 100 / total;
        match &bar {
            Some(b) => b.set_position(done),
            None if pct != last_pct => {
                if out.json {
                    eprintln!("{}", json!({"volume": v.name, "progress_percent": pct}));
                } else {
                    eprintln!("releasing data of {}: {pct}%", v.name);
                }
                last_pct = pct;
            }
            None => {}
        }
        if done >= total {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(CliError::other(format!(
                "volume {} is deleted but releasing its data is still in progress after 5 minutes; check `basalt volume list`",
                v.name
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    out.print(json!({"deleted": v.name, "id": v.id}), || format!("deleted volume {}", v.name));
    Ok(())
}
