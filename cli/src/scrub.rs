//! `basalt scrub status`: each node reports its own scrubber, so the CLI asks every node
//! (or the one named) directly; a node that does not answer is shown as unreachable.

use std::time::Duration;

use basalt_common::units::format_size;
use basalt_proto::admin::{NodeListRequest, ScrubStatusReply, ScrubStatusRequest};
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
    })
}

/// `basalt scrub status [--node N]`.
pub async fn status(admin: &Admin, out: Out, only: Option<u64>) -> Result<(), CliError> {
    let nodes = admin.call(|mut c| async move { c.node_list(NodeListRequest {}).await }).await?.nodes;
    let chosen: Vec<_> = nodes.iter().filter(|n| only.is_none_or(|id| n.id == id)).collect();
    if let (Some(id), true) = (only, chosen.is_empty()) {
        let known: Vec<String> = nodes.iter().map(|n| n.id.to_string()).collect();
        return Err(CliError::not_found(format!("no node {id} in the cluster (nodes: {})", known.join(", "))));
    }
    let mut rows: Vec<(u64, Result<ScrubStatusReply, String>)> = Vec::new();
    for n in chosen {
        let mut client = Admin::client(&n.addr)?;
        let answer = match tokio::time::timeout(Duration::from_secs(5), client.scrub_status(ScrubStatusRequest {})).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(s.message().to_string()),
            Err(_) => Err("no answer within 5s".to_string()),
        };
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
        format!("{t}\n(counts since each node started; freed space is overwritten before the allocator reuses it)")
    });
    Ok(())
}
