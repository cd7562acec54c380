//! Heartbeats: every node tells the meta group it is alive, what it looks like and what its
//! placement groups are doing, once a second.

use std::sync::Arc;
use std::time::Duration;

use basalt_proto::admin::NodeHeartbeatRequest;
use tokio::sync::watch;

use crate::node::NodeCtx;

/// Interval between heartbeats.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// Sends heartbeats until shutdown. Before the cluster exists every seed gets them (so whichever
/// meta node runs `cluster init` knows this node); afterwards one meta node
/// ([`NodeCtx::meta_addrs`]), rotating on failure.
pub async fn run(ctx: Arc<NodeCtx>, mut shutdown: watch::Receiver<bool>) {
    let mut idx = 0usize;
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let seeds = ctx.meta_addrs();
        if seeds.is_empty() {
            continue;
        }
        let req = NodeHeartbeatRequest { node: Some(ctx.self_node()), pgs: ctx.pg_reports() };
        let initialized = ctx.map.borrow().layout.is_some();
        let targets: Vec<&String> = if initialized { vec![&seeds[idx % seeds.len()]] } else { seeds.iter().collect() };
        for seed in targets {
            let ok = match ctx.clients.admin(seed) {
                Ok(mut c) => tokio::time::timeout(Duration::from_secs(2), c.node_heartbeat(req.clone())).await.map(|r| r.is_ok()).unwrap_or(false),
                Err(_) => false,
            };
            if !ok && initialized {
                idx += 1;
            }
        }
    }
}
