//! Self-healing, on the meta leader: replicas of nodes that stayed down past the timeout, and of
//! draining nodes, move to other nodes; a node with fewer replicas than its share (a new one)
//! receives some, one PG at a time.
//!
//! The healer decides each move in the meta group (`BeginMove`), drives it on the PG's leader
//! ([`crate::pg::membership::advance`], once a second, idempotent), and records the new replica
//! set (`FinishMove`) once the PG's Raft group has the new voter in place of the old; a move
//! whose target dies while it is still a learner is abandoned (`CancelMove`) and planned
//! again with another target. A moving
//! replica is added before the old one is removed, so no PG drops below two live replicas
//! because of a move; at most `heal.max_moves` drain and rebalance moves run at once (and as
//! many replacements of dead nodes' replicas besides), and every node paces the snapshot
//! data it sends (`heal.rebuild_rate`). Replacing a dead node's replicas (restoring the third
//! copy) has a budget of its own: drains and rebalancing never make it wait.
//!
//! In a settled cluster it also evens out how many PGs each node leads, one hand-over at a
//! time ([`super::leaders`]), and it replaces a lost meta node by a spare
//! ([`super::membership`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use basalt_common::{NodeId, PgId};
use basalt_proto::data::{MoveReplicaRequest, TransferLeaderRequest};
use tokio::sync::watch;

use super::liveness::Liveness;
use super::service::AdminService;
use super::state::{ClusterState, MetaCommand, MetaReply, MoveReason, PgMove};
use crate::node::NodeCtx;

/// How far a move has got, as its PG leader last reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MoveProgress {
    /// "waiting", "adding learner", "snapshot", "catching up", "promoting", "done", or an error.
    pub phase: String,
    /// Snapshot chunks sent.
    pub chunks_done: u64,
    /// Snapshot chunks to send.
    pub chunks_total: u64,
    /// Highest log index the new replica holds.
    pub matched_index: u64,
}

/// Progress of the moves in flight, by PG (kept by the meta leader for `cluster status`).
#[derive(Default)]
pub struct HealProgress {
    moves: Mutex<HashMap<PgId, MoveProgress>>,
}

impl HealProgress {
    /// The last report for `pg`'s move.
    pub fn get(&self, pg: PgId) -> Option<MoveProgress> {
        self.moves.lock().unwrap_or_else(|p| p.into_inner()).get(&pg).cloned()
    }

    fn set(&self, pg: PgId, p: MoveProgress) {
        self.moves.lock().unwrap_or_else(|p| p.into_inner()).insert(pg, p);
    }

    fn retain(&self, keep: impl Fn(&PgId) -> bool) {
        self.moves.lock().unwrap_or_else(|p| p.into_inner()).retain(|pg, _| keep(pg));
    }
}

/// A move the healer wants to start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    /// The PG.
    pub pg: PgId,
    /// Replica leaving.
    pub from: NodeId,
    /// Its new node.
    pub to: NodeId,
    /// Why.
    pub reason: MoveReason,
}

/// Which nodes can be counted on right now, as the healer sees them.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// Heard from recently.
    pub up: BTreeSet<NodeId>,
    /// Silent longer than the re-placement timeout.
    pub dead: BTreeSet<NodeId>,
    /// Reported less than 1/[`TARGET_MIN_FREE_SHARE`] of their chunk space free: they take no
    /// new replicas (a snapshot would not fit, and the PG's writes would be refused for them).
    pub full: BTreeSet<NodeId>,
}

/// A node with less than this share (1/N) of its chunk space free is not a move target.
pub const TARGET_MIN_FREE_SHARE: u64 = 16;

impl Health {
    /// From the leader's liveness records. A node this leader never heard from counts as silent
    /// since the leader took over (a new leader starts with no records).
    pub fn observe(state: &ClusterState, liveness: &Liveness, leader_for: Duration, timeout: Duration) -> Self {
        let mut h = Health::default();
        for id in state.nodes.keys() {
            // Silence counts from when this node took over at the earliest: records from an
            // earlier term as leader are stale (heartbeats went to the other leader since).
            if let Some(r) = liveness.last_report(*id) {
                let free = r.capacity_bytes.saturating_sub(r.used_bytes).saturating_sub(r.scrub_pending_bytes);
                if r.capacity_bytes > 0 && free < r.capacity_bytes / TARGET_MIN_FREE_SHARE {
                    h.full.insert(*id);
                }
            }
            let silent = match liveness.state(*id) {
                ("up", Some(ago)) if ago <= leader_for => {
                    h.up.insert(*id);
                    continue;
                }
                (_, Some(ago)) => ago.min(leader_for),
                (_, None) => leader_for,
            };
            if silent >= timeout {
                h.dead.insert(*id);
            }
        }
        h
    }
}

/// A node's share of replicas relative to others: its capacity in GiB (at least 1), as in
/// initial placement.
fn weight(state: &ClusterState, n: &NodeId) -> u64 {
    state.nodes.get(n).map(|r| r.capacity_bytes >> 30).unwrap_or(1).max(1)
}

/// The node that should receive `pg`'s replica now on `from`: an up storage node, not draining
/// nor full, that passes [`ClusterState::check_move`], with the fewest replicas for its capacity.
fn choose_target(state: &ClusterState, health: &Health, counts: &BTreeMap<NodeId, usize>, pg: PgId, from: NodeId) -> Option<NodeId> {
    let weight = |n: &NodeId| u128::from(weight(state, n));
    state
        .nodes
        .values()
        .filter(|n| n.is_storage() && health.up.contains(&n.id) && !health.full.contains(&n.id) && state.check_move(pg, from, n.id).is_ok())
        .map(|n| n.id)
        .min_by(|a, b| {
            let la = (counts.get(a).copied().unwrap_or(0) as u128 + 1) * weight(b);
            let lb = (counts.get(b).copied().unwrap_or(0) as u128 + 1) * weight(a);
            la.cmp(&lb).then(a.cmp(b))
        })
}

/// Moves to start now, with `max_moves` in flight at most per kind: replicas on dead nodes
/// first, counting only replacements of dead nodes already running (restoring redundancy does
/// not queue behind drains and rebalancing); then replicas on draining nodes and (only when
/// nothing else is moving) one move that evens out replica counts, counting every move running.
/// A PG without two live replicas besides the leaving one is left alone: it could not commit
/// the change, and the move would hold a slot.
pub fn plan(state: &ClusterState, health: &Health, max_moves: usize) -> Vec<Planned> {
    let mut out: Vec<Planned> = Vec::new();
    if state.settings.is_none() {
        return out;
    }
    let running = state.pgs.iter().filter_map(|p| p.moving.as_ref());
    let (running_all, running_down) = running.fold((0, 0), |(a, d), m| (a + 1, d + usize::from(m.reason == MoveReason::NodeDown)));
    let mut counts = state.replica_counts();
    let live = |replicas: &[NodeId], except: NodeId| replicas.iter().filter(|r| **r != except && health.up.contains(r)).count();
    for reason in [MoveReason::NodeDown, MoveReason::Drain] {
        let budget = match reason {
            MoveReason::NodeDown => max_moves.saturating_sub(running_down),
            _ => max_moves.saturating_sub(running_all),
        };
        for rec in state.pgs.iter().filter(|p| p.moving.is_none()) {
            if out.len() >= budget {
                break;
            }
            if out.iter().any(|p| p.pg == rec.id) {
                continue;
            }
            let leaving = rec.replicas.iter().copied().find(|r| match reason {
                MoveReason::NodeDown => health.dead.contains(r),
                _ => state.draining.contains(r),
            });
            let Some(from) = leaving else { continue };
            if live(&rec.replicas, from) < 2 {
                continue;
            }
            if let Some(to) = choose_target(state, health, &counts, rec.id, from) {
                *counts.entry(to).or_default() += 1;
                *counts.entry(from).or_default() -= 1;
                out.push(Planned { pg: rec.id, from, to, reason });
            }
        }
    }
    let moving = state.pgs.iter().any(|p| p.moving.is_some());
    if out.is_empty()
        && !moving
        && health.dead.is_empty()
        && let Some(p) = rebalance_one(state, health, &counts)
    {
        out.push(p);
    }
    out
}

/// One move from the fullest node to the emptiest, if they differ by more than one replica
/// (relative to capacity) and the failure-domain rule allows it.
fn rebalance_one(state: &ClusterState, health: &Health, counts: &BTreeMap<NodeId, usize>) -> Option<Planned> {
    let eligible: Vec<NodeId> = state.nodes.values().filter(|n| n.is_storage() && !state.draining.contains(&n.id)).map(|n| n.id).collect();
    // Only a fully healthy cluster rebalances: a silent node may be on its way to re-placement.
    if eligible.len() < 2 || eligible.iter().any(|n| !health.up.contains(n)) {
        return None;
    }
    let weight = |n: &NodeId| weight(state, n) as f64;
    let total_weight: f64 = eligible.iter().map(weight).sum();
    let total: usize = eligible.iter().map(|n| counts.get(n).copied().unwrap_or(0)).sum();
    // Replicas above (positive) or below (negative) each node's fair share.
    let excess = |n: &NodeId| counts.get(n).copied().unwrap_or(0) as f64 - total as f64 * weight(n) / total_weight;
    let mut by_excess = eligible.clone();
    by_excess.sort_by(|a, b| excess(b).total_cmp(&excess(a)).then(a.cmp(b)));
    let all_up = |replicas: &[NodeId]| replicas.iter().all(|r| health.up.contains(r));
    for to in by_excess.iter().rev() {
        if excess(to) > -1.0 {
            break;
        }
        if health.full.contains(to) {
            continue;
        }
        for from in by_excess.iter().take_while(|f| excess(f) >= 1.0) {
            let pg = state
                .pgs
                .iter()
                .find(|p| p.moving.is_none() && p.replicas.contains(from) && all_up(&p.replicas) && state.check_move(p.id, *from, *to).is_ok());
            if let Some(p) = pg {
                return Some(Planned { pg: p.id, from: *from, to: *to, reason: MoveReason::Rebalance });
            }
        }
    }
    None
}

/// Least time between two leadership hand-overs for balance: the leaders' reports (node
/// heartbeats) must show the last one before the next is planned.
pub const LEADER_BALANCE_INTERVAL: Duration = Duration::from_secs(5);

/// A move whose new replica makes no progress this long is abandoned and planned again.
pub const STUCK_AFTER: Duration = Duration::from_secs(300);

/// Runs the healer until shutdown; it acts only while this node leads the meta group.
pub async fn run(ctx: Arc<NodeCtx>, mut shutdown: watch::Receiver<bool>) {
    let Some(meta) = &ctx.meta else { return };
    let service = AdminService::new(ctx.clone());
    let heal = ctx.config.heal;
    let mut leader_since: Option<Instant> = None;
    // Per move: the new replica's last progress (chunks sent, log index held) and since when.
    let mut stalled: HashMap<PgId, ((u64, u64), Instant)> = HashMap::new();
    let mut last_hand_over: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return,
        }
        if !meta.group.status().is_leader {
            leader_since = None;
            stalled.clear();
            continue;
        }
        let since = *leader_since.get_or_insert_with(Instant::now);
        let state = meta.shared.snapshot();
        if state.settings.is_none() {
            continue;
        }
        let health = Health::observe(&state, &ctx.liveness, since.elapsed(), heal.replace_down_after);
        let moves: Vec<(PgId, PgMove)> = state.pgs.iter().filter_map(|p| p.moving.clone().map(|m| (p.id, m))).collect();
        ctx.heal.retain(|pg| moves.iter().any(|(p, _)| p == pg));
        // Moves whose new replica made no progress for STUCK_AFTER (it cannot take the snapshot,
        // say) are abandoned like those whose target died, and planned again elsewhere.
        stalled.retain(|pg, _| moves.iter().any(|(p, _)| p == pg));
        for (pg, _) in &moves {
            let now = ctx.heal.get(*pg).map(|p| (p.chunks_done, p.matched_index)).unwrap_or_default();
            let seen = stalled.entry(*pg).or_insert((now, Instant::now()));
            if seen.0 != now {
                *seen = (now, Instant::now());
            }
        }
        let stuck = |pg: &PgId| stalled.get(pg).is_some_and(|(_, since)| since.elapsed() >= STUCK_AFTER);
        // A target that died mid-move is abandoned (if it only learns so far) and replanned.
        let steps = moves.iter().map(|(pg, m)| drive(&ctx, &state, *pg, m, health.dead.contains(&m.to) || stuck(pg)));
        for (pg, m, step) in futures::future::join_all(steps).await {
            let cmd = match step {
                Step::Pending => continue,
                Step::Finished => MetaCommand::FinishMove { pg, from: m.from, to: m.to },
                Step::Cancelled => MetaCommand::CancelMove { pg, from: m.from, to: m.to },
            };
            match service.propose(meta, cmd).await {
                Ok(MetaReply::Error(e)) => tracing::warn!(%pg, error = %e, "recording the end of a move was refused"),
                Ok(_) => tracing::info!(%pg, from = %m.from, to = %m.to, reason = m.reason.as_str(), outcome = ?step, "replica move ended"),
                Err(e) => tracing::debug!(%pg, error = %e.message(), "recording the end of a move failed; will retry"),
            }
        }
        // Leaderships are evened out only in a settled cluster: no node lost, nothing moving,
        // and this meta leader has heard every node's reports for a while.
        let settled = moves.is_empty() && health.dead.is_empty() && since.elapsed() >= LEADER_BALANCE_INTERVAL;
        if settled
            && last_hand_over.is_none_or(|t| t.elapsed() >= LEADER_BALANCE_INTERVAL)
            && let Some(t) = super::leaders::plan_transfer(&state, &health, &ctx.liveness.pg_views())
        {
            last_hand_over = Some(Instant::now());
            hand_over(&ctx, &state, t).await;
        }
        super::membership::step(meta, &state, &health).await;
        for p in plan(&state, &health, heal.max_moves as usize) {
            let cmd = MetaCommand::BeginMove { pg: p.pg, from: p.from, to: p.to, reason: p.reason, now_unix_ms: super::service::now_ms() };
            match service.propose(meta, cmd).await {
                Ok(MetaReply::Error(e)) => tracing::warn!(pg = %p.pg, error = %e, "a planned replica move was refused"),
                Ok(_) => tracing::info!(pg = %p.pg, from = %p.from, to = %p.to, reason = p.reason.as_str(), "replica move started"),
                Err(e) => tracing::debug!(pg = %p.pg, error = %e.message(), "starting a replica move failed; will retry"),
            }
        }
    }
}

/// Asks `t.from` to hand `t.pg`'s leadership to `t.to`. Failures are logged only: the next
/// plan, from fresh reports, decides again.
async fn hand_over(ctx: &NodeCtx, state: &ClusterState, t: super::leaders::Transfer) {
    let Some(addr) = state.nodes.get(&t.from).map(|n| n.addr.clone()) else { return };
    let req = TransferLeaderRequest { pg: t.pg.0, to: t.to.0 };
    let outcome = match ctx.clients.data(&addr) {
        Ok(mut client) => match tokio::time::timeout(Duration::from_secs(5), client.transfer_leader(req)).await {
            Ok(Ok(reply)) => reply.into_inner().error.map(|e| e.message),
            Ok(Err(s)) => Some(s.message().to_string()),
            Err(_) => Some("no answer within 5s".to_string()),
        },
        Err(e) => Some(e.to_string()),
    };
    match outcome {
        None => tracing::info!(pg = %t.pg, from = %t.from, to = %t.to, "leadership handed over for balance"),
        Some(e) => tracing::debug!(pg = %t.pg, from = %t.from, to = %t.to, error = %e, "a leadership hand-over for balance failed"),
    }
}

/// Where a move stands after one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Still running.
    Pending,
    /// The PG's voters have the new replica in place of the old.
    Finished,
    /// Abandoned: the PG keeps its old replicas.
    Cancelled,
}

/// One step of a move on the PG's leader (or of abandoning it, if `cancel`).
async fn drive(ctx: &NodeCtx, state: &ClusterState, pg: PgId, m: &PgMove, cancel: bool) -> (PgId, PgMove, Step) {
    let Some(to_addr) = state.nodes.get(&m.to).map(|n| n.addr.clone()) else {
        ctx.heal.set(pg, MoveProgress { phase: format!("waiting: {} is not registered", m.to), ..Default::default() });
        return (pg, m.clone(), Step::Pending);
    };
    // The reported leader first, then every replica (a NotLeader answer names the leader).
    let mut candidates: Vec<NodeId> = Vec::new();
    if let Some(v) = ctx.liveness.pg_views().get(&pg.0).filter(|v| v.leader != 0) {
        candidates.push(NodeId(v.leader));
    }
    if let Some(rec) = state.pgs.get(pg.0 as usize) {
        // The new replica last: once promoted it may lead.
        for r in rec.replicas.iter().chain([&m.to]) {
            if !candidates.contains(r) {
                candidates.push(*r);
            }
        }
    }
    let mut last_error = String::from("no replica answered");
    for node in candidates {
        let Some(addr) = state.nodes.get(&node).map(|n| n.addr.clone()) else { continue };
        let Ok(mut client) = ctx.clients.data(&addr) else { continue };
        let req = MoveReplicaRequest { pg: pg.0, from: m.from.0, to: m.to.0, to_addr: to_addr.clone(), cancel };
        match tokio::time::timeout(Duration::from_secs(20), client.move_replica(req)).await {
            Ok(Ok(reply)) => {
                let r = reply.into_inner();
                match r.error {
                    None => {
                        let progress =
                            MoveProgress { phase: r.phase, chunks_done: r.chunks_done, chunks_total: r.chunks_total, matched_index: r.matched_index };
                        ctx.heal.set(pg, progress);
                        let step = match (r.done, r.cancelled) {
                            (true, true) => Step::Cancelled,
                            (true, false) => Step::Finished,
                            _ => Step::Pending,
                        };
                        return (pg, m.clone(), step);
                    }
                    Some(e) => last_error = format!("{node}: {}", e.message),
                }
            }
            Ok(Err(s)) => last_error = format!("{node}: {}", s.message()),
            Err(_) => last_error = format!("{node}: no answer within 20s"),
        }
    }
    let mut progress = ctx.heal.get(pg).unwrap_or_default();
    progress.phase = format!("retrying ({last_error})");
    ctx.heal.set(pg, progress);
    (pg, m.clone(), Step::Pending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::fixtures::{cluster, health, node};

    #[test]
    fn a_dead_nodes_replicas_go_to_the_spare_within_the_budget() {
        let mut s = cluster(&[(1, "a"), (2, "b"), (3, "c")], 8);
        s.apply(2, MetaCommand::RegisterNode { node: node(4, "d") });
        let h = health(&[1, 2, 4], &[3]);
        let p = plan(&s, &h, 3);
        assert_eq!(p.len(), 3);
        assert!(p.iter().all(|m| m.from == NodeId(3) && m.to == NodeId(4) && m.reason == MoveReason::NodeDown), "{p:?}");
        // With a second node down, PGs lacking two live replicas wait.
        let h = health(&[1, 4], &[2, 3]);
        assert!(plan(&s, &h, 8).is_empty());
    }

    #[test]
    fn no_target_in_a_used_domain() {
        // The spare shares zone "a" with node 1: it can replace node 1 only.
        let mut s = cluster(&[(1, "a"), (2, "b"), (3, "c")], 4);
        s.apply(2, MetaCommand::RegisterNode { node: node(4, "a") });
        assert!(plan(&s, &health(&[1, 2, 4], &[3]), 4).is_empty());
        s.apply(3, MetaCommand::DrainNode { node: NodeId(1), drain: true });
        let p = plan(&s, &health(&[1, 2, 3, 4], &[]), 4);
        assert_eq!(p.len(), 4);
        assert!(p.iter().all(|m| m.from == NodeId(1) && m.to == NodeId(4) && m.reason == MoveReason::Drain), "{p:?}");
    }

    #[test]
    fn a_new_node_gets_its_share_one_move_at_a_time() {
        let mut s = cluster(&[(1, "a"), (2, "b"), (3, "c")], 8);
        s.apply(2, MetaCommand::RegisterNode { node: node(4, "d") });
        let h = health(&[1, 2, 3, 4], &[]);
        let mut moved = 0;
        for i in 0..20 {
            let p = plan(&s, &h, 4);
            if p.is_empty() {
                break;
            }
            assert_eq!(p.len(), 1, "rebalancing moves one PG at a time");
            let m = &p[0];
            assert_eq!((m.to, m.reason), (NodeId(4), MoveReason::Rebalance));
            let base = 10 + i * 2;
            s.apply(base, MetaCommand::BeginMove { pg: m.pg, from: m.from, to: m.to, reason: m.reason, now_unix_ms: 0 });
            assert!(plan(&s, &h, 4).is_empty(), "nothing else starts while it runs");
            s.apply(base + 1, MetaCommand::FinishMove { pg: m.pg, from: m.from, to: m.to });
            moved += 1;
        }
        // 24 replicas over 4 nodes: 6 each.
        let c = s.replica_counts();
        assert_eq!(moved, 6);
        assert!(c.values().all(|n| *n == 6), "{c:?}");
    }

    #[test]
    fn replacing_a_dead_node_does_not_wait_behind_a_drain() {
        let mut s = cluster(&[(1, "a"), (2, "b"), (3, "c"), (4, "d")], 8);
        s.apply(2, MetaCommand::RegisterNode { node: node(5, "e") });
        s.apply(3, MetaCommand::DrainNode { node: NodeId(4), drain: true });
        let drains = plan(&s, &health(&[1, 2, 3, 4, 5], &[]), 4);
        assert_eq!(drains.len(), 4, "{drains:?}");
        for (i, m) in drains.iter().enumerate() {
            s.apply(10 + i as u64, MetaCommand::BeginMove { pg: m.pg, from: m.from, to: m.to, reason: m.reason, now_unix_ms: 0 });
        }
        assert!(plan(&s, &health(&[1, 2, 3, 4, 5], &[]), 4).is_empty(), "the drain uses the whole budget");
        // Node 3 dies with the drain's four moves still running: its replicas are replaced anyway.
        let h = health(&[1, 2, 4, 5], &[3]);
        let p = plan(&s, &h, 4);
        assert!(!p.is_empty() && p.len() <= 4, "{p:?}");
        assert!(p.iter().all(|m| m.from == NodeId(3) && m.reason == MoveReason::NodeDown), "{p:?}");
        for (i, m) in p.iter().enumerate() {
            s.apply(20 + i as u64, MetaCommand::BeginMove { pg: m.pg, from: m.from, to: m.to, reason: m.reason, now_unix_ms: 0 });
        }
        let more = plan(&s, &h, 4);
        assert!(more.len() + p.len() <= 4, "more than max_moves replacements at once: {p:?} then {more:?}");
    }

    #[test]
    fn a_full_node_receives_no_replicas() {
        let mut s = cluster(&[(1, "a"), (2, "b"), (3, "c")], 8);
        s.apply(2, MetaCommand::RegisterNode { node: node(4, "d") });
        s.apply(3, MetaCommand::RegisterNode { node: node(5, "e") });
        let mut h = health(&[1, 2, 4, 5], &[3]);
        h.full.insert(NodeId(4));
        let p = plan(&s, &h, 8);
        assert!(!p.is_empty() && p.iter().all(|m| m.to == NodeId(5)), "{p:?}");
        // Nor does rebalancing fill it.
        let mut h = health(&[1, 2, 3, 4], &[]);
        let mut s = cluster(&[(1, "a"), (2, "b"), (3, "c")], 8);
        s.apply(2, MetaCommand::RegisterNode { node: node(4, "d") });
        assert!(!plan(&s, &h, 4).is_empty());
        h.full.insert(NodeId(4));
        assert!(plan(&s, &h, 4).is_empty(), "a full node was chosen to even out replica counts");
    }
}
