//! `basalt scrub status` and `basalt scrub start`: each node reports and runs its own
//! scrubbers, so the CLI asks every node (or the one named) directly; a node that does not
//! answer is shown as unreachable.

use std::io::IsTerminal;
use std::time::Duration;

use basalt_common::units::format_size;
use basalt_proto::admin::{Node, NodeListRequest, ScrubStartRequest, ScrubStatusReply, ScrubStatusRequest};
use serde_json::{Value, json};

use crate::admin::Admin;
use crate::commands::{Out, table};
use crate::exit::CliError;

fn reply_json(r: &ScrubStatusReply) -> Value {
    json!({
        "node": r.node, "reachable": true,
        "pending_bytes": r.pending_bytes, "pending_ranges": r.pending_ranges,
        "overwritten_bytes": r.overwritten_bytes, "ranges_released": r.ranges_released, "errors": r.errors,
        "rate_bytes_per_sec": r.rate_bytes_per_sec, "pattern": r.pattern, "passes": r.passes,
        "log_scrubs": r.log_scrubs, "last_log_scrub_ms_ago": r.last_log_scrub_ms_ago,
        "integrity": {
            "running": if r.integrity_running.is_empty() { Value::Null } else { json!(r.integrity_running) },
            "chunks_done": r.integrity_chunks_done, "chunks_total": r.integrity_chunks_total,
            "passes_completed": r.integrity_passes_completed, "bytes_verified": r.integrity_bytes_verified,
            "corrupt_found": r.corrupt_found, "divergent_found": r.divergent_found,
            "repairs_issued": r.repairs_issued, "blocks_repaired": r.blocks_repaired,
            "unrepairable": r.unrepairable, "check_errors": r.integrity_check_errors,
            "last_local_pass_ms_ago": r.last_local_pass_ms_ago, "last_deep_pass_ms_ago": r.last_deep_pass_ms_ago,
            "rate_bytes_per_sec": r.integrity_rate_bytes_per_sec,
        },
    })
}

/// The nodes `only` selects (all when `None`), or exit 3 naming the known ones.
async fn select_nodes(admin: &Admin, only: Option<u64>) -> Result<Vec<Node>, CliError> {
    let nodes = admin.call(|mut c| async move { c.node_list(NodeListRequest {}).await }).await?.nodes;
    let chosen: Vec<Node> = nodes.iter().filter(|n| only.is_none_or(|id| n.id == id)).cloned().collect();
    if let (Some(id), true) = (only, chosen.is_empty()) {
        let known: Vec<String> = nodes.iter().map(|n| n.id.to_string()).collect();
        return Err(CliError::not_found(format!("no node {id} in the cluster (nodes: {})", known.join(", "))));
    }
    Ok(chosen)
}

pub(crate) async fn ask_status(admin: &Admin, addr: &str) -> Result<ScrubStatusReply, String> {
    let mut client = admin.client(addr).map_err(|e| e.message)?;
    match tokio::time::timeout(Duration::from_secs(5), client.scrub_status(ScrubStatusRequest {})).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(s.message().to_string()),
        Err(_) => Err("no answer within 5s".to_string()),
    }
}

fn ago(ms: u64) -> String {
    match ms {
        0 => "never".into(),
        ms if ms < 120_000 => format!("{}s ago", ms / 1000),
        ms if ms < 7_200_000 => format!("{}m ago", ms / 60_000),
        ms if ms < 172_800_000 => format!("{}h ago", ms / 3_600_000),
        ms => format!("{}d ago", ms / 86_400_000),
    }
}

/// `basalt scrub status [--node N]`.
pub async fn status(admin: &Admin, out: Out, only: Option<u64>) -> Result<(), CliError> {
    let chosen = select_nodes(admin, only).await?;
    let mut rows: Vec<(u64, Result<ScrubStatusReply, String>)> = Vec::new();
    for n in chosen {
        let answer = ask_status(admin, &n.addr).await;
        rows.push((n.id, answer));
    }
    let as_json = rows
        .iter()
        .map(|(id, r)| match r {
            Ok(r) => reply_json(r),
            Err(e) => json!({"node": id, "reachable": false, "error": e}),
        })
        .collect::<Vec<_>>();
    out.print(json!(as_json), || {
        let mut t = table(&["node", "awaiting overwrite", "overwritten", "ranges released", "errors", "rate", "pattern", "log rewrites"]);
        for (id, r) in &rows {
            match r {
                Ok(r) => {
                    let log = match r.last_log_scrub_ms_ago {
                        0 => format!("{}", r.log_scrubs),
                        ms => format!("{} (last {}s ago)", r.log_scrubs, ms / 1000),
                    };
                    t.add_row(vec![
                        format!("node-{id}"),
                        format!("{} ({} ranges)", format_size(r.pending_bytes), r.pending_ranges),
                        format_size(r.overwritten_bytes),
                        r.ranges_released.to_string(),
                        r.errors.to_string(),
                        format!("{}/s", format_size(r.rate_bytes_per_sec)),
                        format!("{} × {}", r.pattern, r.passes),
                        log,
                    ]);
                }
                Err(e) => {
                    t.add_row(vec![format!("node-{id}"), format!("unreachable: {e}")]);
                }
            }
        }
        let mut i = table(&["node", "integrity pass", "last local", "last deep", "checked", "corrupt", "divergent", "repaired here", "unrepairable", "rate"]);
        for (id, r) in &rows {
            if let Ok(r) = r {
                let running = if r.integrity_running.is_empty() {
                    "idle".to_string()
                } else {
                    format!("{} {}/{} chunks", r.integrity_running, r.integrity_chunks_done, r.integrity_chunks_total)
                };
                i.add_row(vec![
                    format!("node-{id}"),
                    running,
                    ago(r.last_local_pass_ms_ago),
                    ago(r.last_deep_pass_ms_ago),
                    format_size(r.integrity_bytes_verified),
                    r.corrupt_found.to_string(),
                    r.divergent_found.to_string(),
                    r.blocks_repaired.to_string(),
                    r.unrepairable.to_string(),
                    format!("{}/s", format_size(r.integrity_rate_bytes_per_sec)),
                ]);
            }
        }
        format!(
            "Freed space (overwritten before the allocator reuses it):\n{t}\n\nIntegrity (stored blocks read back and checked; repaired from healthy replicas):\n{i}\n(counts since each node started)"
        )
    });
    Ok(())
}

/// `basalt scrub start [--deep] [--node N]`: starts an integrity pass on the storage nodes
/// (or the one named) and follows it with a progress bar (percentages without a terminal or
/// with `--json`), then prints what it found.
pub async fn start(admin: &Admin, out: Out, only: Option<u64>, deep: bool, rate: Option<String>, no_wait: bool) -> Result<(), CliError> {
    let rate = match rate {
        None => 0,
        Some(r) => match basalt_common::units::parse_size(&r) {
            Ok(0) => return Err(CliError::invalid("--rate must be greater than 0")),
            Ok(v) => v,
            Err(e) => return Err(CliError::invalid(format!("--rate {r:?}: {e}"))),
        },
    };
    let chosen: Vec<Node> = select_nodes(admin, only).await?.into_iter().filter(|n| n.roles.iter().any(|r| r == "storage")).collect();
    if chosen.is_empty() {
        return Err(CliError::invalid(match only {
            Some(id) => format!("node {id} has no storage role: it holds no data to scrub"),
            None => "the cluster has no storage nodes".to_string(),
        }));
    }
    let kind = if deep { "deep" } else { "local" };
    // Per node: address, counters before the pass, the request's ticket.
    let mut followed: Vec<(u64, String, ScrubStatusReply, u64)> = Vec::new();
    let mut failures = Vec::new();
    for n in &chosen {
        let before = match ask_status(admin, &n.addr).await {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("node-{}: {e}", n.id));
                continue;
            }
        };
        let mut client = admin.client(&n.addr)?;
        match tokio::time::timeout(Duration::from_secs(5), client.scrub_start(ScrubStartRequest { deep, rate_bytes_per_sec: rate })).await {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                if !r.queued {
                    eprintln!("node-{}: a requested {} pass was already waiting to run; following it", n.id, r.kind);
                } else if !r.running.is_empty() {
                    eprintln!("node-{}: the pass starts once the {} pass running now ends", n.id, r.running);
                }
                followed.push((n.id, n.addr.clone(), before, r.ticket));
            }
            Ok(Err(s)) => failures.push(format!("node-{}: {}", n.id, s.message())),
            Err(_) => failures.push(format!("node-{}: no answer within 5s", n.id)),
        }
    }
    if no_wait || followed.is_empty() {
        let started: Vec<u64> = followed.iter().map(|(id, _, _, _)| *id).collect();
        out.print(json!({"kind": kind, "started_on": started, "failed": failures}), || {
            format!("{kind} integrity pass started on {} node(s)", started.len())
        });
        return finish(failures);
    }

    let tty = std::io::stderr().is_terminal() && !out.json;
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(1);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} chunks ({elapsed})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message(format!("{kind} integrity scrub"));
        b
    });
    let mut last_pct = u64::MAX;
    let mut latest: Vec<Option<ScrubStatusReply>> = vec![None; followed.len()];
    let mut silent_since: Vec<Option<tokio::time::Instant>> = vec![None; followed.len()];
    loop {
        let (mut done, mut total, mut finished) = (0u64, 0u64, 0usize);
        for (i, (id, addr, _, ticket)) in followed.iter().enumerate() {
            if latest[i].as_ref().is_some_and(|r| r.integrity_ticket_served >= *ticket) {
                let n = latest[i].as_ref().map(|r| r.integrity_chunks_total).unwrap_or(0);
                done += n;
                total += n;
                finished += 1;
                continue;
            }
            match ask_status(admin, addr).await {
                Ok(r) => {
                    silent_since[i] = None;
                    if r.integrity_ticket_served >= *ticket {
                        finished += 1;
                        done += r.integrity_chunks_total;
                    } else {
                        done += r.integrity_chunks_done;
                    }
                    total += r.integrity_chunks_total;
                    latest[i] = Some(r);
                }
                Err(e) => {
                    let since = *silent_since[i].get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() > Duration::from_secs(30) {
                        if let Some(b) = &bar {
                            b.abandon();
                        }
                        return Err(CliError::unreachable(format!("node-{id} stopped answering during the scrub: {e}")));
                    }
                }
            }
        }
        let pct = done * 100 / total.max(1);
        match &bar {
            Some(b) => {
                b.set_length(total.max(1));
                b.set_position(done);
            }
            None if pct != last_pct => {
                if out.json {
                    eprintln!("{}", json!({"scrub": kind, "progress_percent": pct, "chunks_done": done, "chunks_total": total}));
                } else {
                    eprintln!("{kind} integrity scrub: {pct}% ({done}/{total} chunks)");
                }
                last_pct = pct;
            }
            None => {}
        }
        if finished == followed.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }

    let delta = |f: fn(&ScrubStatusReply) -> u64, before: &ScrubStatusReply, after: &ScrubStatusReply| f(after).saturating_sub(f(before));
    let results: Vec<Value> = followed
        .iter()
        .zip(&latest)
        .filter_map(|((id, _, before, _), after)| after.as_ref().map(|a| (id, before, a)))
        .map(|(id, b, a)| {
            json!({
                "node": id,
                "chunks": a.integrity_chunks_total,
                "bytes_verified": delta(|r| r.integrity_bytes_verified, b, a),
                "corrupt_found": delta(|r| r.corrupt_found, b, a),
                "divergent_found": delta(|r| r.divergent_found, b, a),
                "repairs_issued": delta(|r| r.repairs_issued, b, a),
                "unrepairable": delta(|r| r.unrepairable, b, a),
                "check_errors": delta(|r| r.integrity_check_errors, b, a),
            })
        })
        .collect();
    out.print(json!({"kind": kind, "nodes": results, "failed": failures}), || {
        let mut t = table(&["node", "chunks", "checked", "corrupt", "divergent", "repairs", "unrepairable", "errors"]);
        for r in &results {
            let n = |k: &str| r[k].as_u64().unwrap_or(0);
            t.add_row(vec![
                format!("node-{}", n("node")),
                n("chunks").to_string(),
                format_size(n("bytes_verified")),
                n("corrupt_found").to_string(),
                n("divergent_found").to_string(),
                n("repairs_issued").to_string(),
                n("unrepairable").to_string(),
                n("check_errors").to_string(),
            ]);
        }
        format!("{kind} integrity scrub finished:\n{t}")
    });
    finish(failures)
}

fn finish(failures: Vec<String>) -> Result<(), CliError> {
    if failures.is_empty() { Ok(()) } else { Err(CliError::unreachable(format!("the scrub did not start on every node: {}", failures.join("; ")))) }
}
