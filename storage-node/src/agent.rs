//! Heartbeats: every node tells the meta group it is alive, what it looks like and what its
//! placement groups are doing, once a second.

use std::sync::Arc;
use std::time::Duration;

use basalt_proto::admin::{NodeHeartbeatRequest, QosDemand, QosShare};
use tokio::sync::watch;

use crate::node::NodeCtx;
use crate::qos::Share;

/// Interval between heartbeats.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// Sends heartbeats until shutdown. Before the cluster exists every seed gets them (so whichever
/// meta node runs `cluster init` knows this node); afterwards one meta node
/// ([`NodeCtx::meta_addrs`]), rotating on failure. If the meta leader refuses this node because
/// it speaks none of the cluster's versions, says why on `refused` and stops.
pub async fn run(ctx: Arc<NodeCtx>, refused: watch::Sender<Option<String>>, mut shutdown: watch::Receiver<bool>) {
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
        let qos_demand = ctx.metrics.qos.demand().into_iter().map(|(v, ops, bytes)| QosDemand { volume_id: v.0, ops, bytes }).collect();
        let req = NodeHeartbeatRequest { node: Some(ctx.self_node()), pgs: ctx.pg_reports(), qos_demand };
        let initialized = ctx.map.borrow().layout.is_some();
        let targets: Vec<&String> = if initialized { vec![&seeds[idx % seeds.len()]] } else { seeds.iter().collect() };
        for seed in targets {
            let reply = match ctx.clients.admin(seed) {
                Ok(mut c) => match tokio::time::timeout(Duration::from_secs(2), c.node_heartbeat(req.clone())).await {
                    Ok(Err(status)) if status.message().starts_with(basalt_proto::VERSION_REFUSED) => {
                        tracing::error!("{}", status.message());
                        let _ = refused.send(Some(status.message().to_string()));
                        return;
                    }
                    reply => reply.ok().and_then(Result::ok),
                },
                Err(_) => None,
            };
            let ok = reply.is_some();
            if let Some(r) = reply
                && initialized
            {
                // The leader says this node's share of each limited volume it serves.
                let share = |s: &QosShare| Share { ops: f64::from(s.ops_ppm) / 1e6, bytes: f64::from(s.bytes_ppm) / 1e6 };
                ctx.metrics.qos.set_shares(r.into_inner().qos_shares.iter().map(|s| (basalt_common::VolumeId(s.volume_id), share(s))));
            }
            if !ok && initialized {
                idx += 1;
            }
        }
    }
}
