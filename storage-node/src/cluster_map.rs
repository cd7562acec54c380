//! This node's copy of the cluster map, kept current by long-polling the meta group, and of
//! the token table that comes with it to nodes.

use std::sync::Arc;
use std::time::Duration;

use basalt_proto::admin::GetClusterMapRequest;
use basalt_proto::view::ClusterView;
use tokio::sync::watch;

use crate::node::NodeCtx;

/// Waits until the local map has at least `version`, up to `timeout`. Returns the map.
pub async fn wait_for_version(ctx: &NodeCtx, version: u64, timeout: Duration) -> Arc<ClusterView> {
    let mut rx = ctx.map.clone();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let current = rx.borrow_and_update().clone();
        if current.version >= version {
            return current;
        }
        if tokio::time::timeout_at(deadline, rx.changed()).await.map(|r| r.is_err()).unwrap_or(true) {
            return rx.borrow().clone();
        }
    }
}

/// Keeps `tx` current: asks a meta node for a map newer than the one held, waiting server-side
/// for changes (long poll), and rotates over the meta nodes ([`NodeCtx::meta_addrs`]) when one
/// fails. The one that answered is remembered as [`NodeCtx::meta_contact`].
pub async fn run_watcher(ctx: Arc<NodeCtx>, tx: watch::Sender<Arc<ClusterView>>, mut shutdown: watch::Receiver<bool>) {
    if ctx.seeds().is_empty() {
        return;
    }
    let mut idx = 0usize;
    let mut known = 0u64;
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let seeds = ctx.meta_addrs();
        let seed = &seeds[idx % seeds.len()];
        let req = GetClusterMapRequest { known_version: known, wait_ms: 10_000 };
        let result = match ctx.clients.admin(seed) {
            Ok(mut c) => {
                tokio::select! {
                    r = tokio::time::timeout(Duration::from_secs(15), c.get_cluster_map(req)) => r.map_err(|_| tonic::Status::deadline_exceeded("map poll timed out")).and_then(|r| r),
                    _ = shutdown.changed() => return,
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(resp) => {
                backoff = Duration::from_millis(100);
                *ctx.meta_contact.lock().unwrap_or_else(|p| p.into_inner()) = Some(seed.clone());
                let map = resp.into_inner();
                // Versions only grow: an older map (from a lagging meta node) is ignored, since
                // replicas are retired on what the map says.
                if map.version > known || tx.borrow().cluster_id.is_empty() {
                    if map.includes_tokens {
                        let records = map.tokens.iter().filter_map(crate::meta::service::token_from_proto);
                        ctx.access.set_tokens(map.version, basalt_security::TokenTable::new(records));
                    }
                    let view = ClusterView::from_proto(&map);
                    ctx.access.set_meta_nodes(map.version, view.nodes.values().filter(|n| n.meta).map(|n| n.id.0).collect());
                    for n in view.nodes.values() {
                        ctx.host.router().set_address(n.id.0, &n.addr);
                    }
                    known = map.version;
                    tx.send_replace(Arc::new(view));
                }
            }
            Err(status) => {
                if status.code() != tonic::Code::FailedPrecondition {
                    tracing::debug!(seed, error = %status.message(), "cluster map poll failed");
                    idx += 1;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}
