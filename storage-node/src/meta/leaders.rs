//! Leader balancing, on the meta leader: every PG's leader serves all of its reads and drives
//! all of its writes, so a node that leads more PGs than the others does more of the work. A
//! node that comes back after a failure leads nothing (the others took its PGs over), and
//! initial placement's even spread is lost; the healer therefore hands one leadership at a
//! time from the node leading the most to one leading at least two fewer, until counts differ
//! by at most one.

use std::collections::BTreeMap;

use basalt_common::{NodeId, PgId};

use super::healer::Health;
use super::liveness::PgView;
use super::state::ClusterState;

/// A new leader is only picked among replicas whose last reported applied index is this
/// close to the leader's: the hand-over waits until the heir holds the leader's whole log,
/// and the group takes no writes meanwhile. Reports are up to a heartbeat apart.
pub const HEIR_MAX_LAG: u64 = 2048;

/// One leadership to hand over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// The PG.
    pub pg: PgId,
    /// Its leader now.
    pub from: NodeId,
    /// The replica that should lead it.
    pub to: NodeId,
}

/// The next hand-over that evens out leaderships, if any. Only up storage nodes that are not
/// draining take part, and only PGs with no replica move in flight are handed over.
pub fn plan_transfer(state: &ClusterState, health: &Health, views: &BTreeMap<u32, PgView>) -> Option<Transfer> {
    let eligible = |n: &NodeId| state.nodes.get(n).is_some_and(|r| r.is_storage()) && health.up.contains(n) && !state.draining.contains(n);
    let mut led: BTreeMap<NodeId, Vec<PgId>> = state.nodes.keys().filter(|n| eligible(n)).map(|n| (*n, Vec::new())).collect();
    for rec in &state.pgs {
        let Some(view) = views.get(&rec.id.0).filter(|v| v.leader != 0) else { continue };
        if let Some(pgs) = led.get_mut(&NodeId(view.leader)) {
            pgs.push(rec.id);
        }
    }
    let count = |n: &NodeId| led.get(n).map_or(0, Vec::len);
    let mut by_count: Vec<NodeId> = led.keys().copied().collect();
    by_count.sort_by(|a, b| count(b).cmp(&count(a)).then(a.cmp(b)));
    for from in &by_count {
        for pg in &led[from] {
            let Some(rec) = state.pgs.get(pg.0 as usize).filter(|r| r.moving.is_none()) else { continue };
            let view = &views[&pg.0];
            let leader_applied = view.applied.get(&from.0).copied().unwrap_or(0);
            let heir = rec
                .replicas
                .iter()
                .filter(|r| *r != from && eligible(r) && count(r) + 2 <= count(from))
                .filter(|r| view.applied.get(&r.0).is_some_and(|a| a.saturating_add(HEIR_MAX_LAG) >= leader_applied))
                .min_by(|a, b| count(a).cmp(&count(b)).then(a.cmp(b)));
            if let Some(to) = heir {
                return Some(Transfer { pg: *pg, from: *from, to: *to });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::fixtures;
    use crate::meta::state::{MetaCommand, MetaReply};

    fn cluster(nodes: u64, pgs: u32) -> ClusterState {
        fixtures::cluster_of((1..=nodes).map(|id| fixtures::node(id, &format!("z{id}"))).collect(), pgs)
    }

    fn up(ids: &[u64]) -> Health {
        fixtures::health(ids, &[])
    }

    /// Every PG led by `leader(pg)`, every replica live and caught up to `applied`.
    fn views(s: &ClusterState, leader: impl Fn(&[NodeId]) -> NodeId, applied: u64) -> BTreeMap<u32, PgView> {
        s.pgs
            .iter()
            .map(|p| {
                let live: Vec<u64> = p.replicas.iter().map(|r| r.0).collect();
                let view = PgView {
                    leader: leader(&p.replicas).0,
                    term: 2,
                    applied_index: applied,
                    applied: live.iter().map(|n| (*n, applied)).collect(),
                    live,
                };
                (p.id.0, view)
            })
            .collect()
    }

    fn leaders(v: &BTreeMap<u32, PgView>) -> BTreeMap<u64, usize> {
        let mut c = BTreeMap::new();
        for view in v.values() {
            *c.entry(view.leader).or_default() += 1;
        }
        c
    }

    /// Applies planned hand-overs until there are none; the leader counts after.
    fn settle(s: &ClusterState, h: &Health, v: &mut BTreeMap<u32, PgView>) -> BTreeMap<u64, usize> {
        for _ in 0..=v.len() {
            let Some(t) = plan_transfer(s, h, v) else { return leaders(v) };
            assert_eq!(v[&t.pg.0].leader, t.from.0);
            v.get_mut(&t.pg.0).unwrap().leader = t.to.0;
        }
        panic!("balancing does not converge: {:?}", leaders(v));
    }

    #[test]
    fn a_returning_node_gets_its_share_of_leaderships_back() {
        let s = cluster(3, 8);
        // Node 3 came back: nodes 1 and 2 lead everything.
        let mut v = views(&s, |r| *r.iter().find(|n| n.0 != 3).unwrap(), 500);
        let c = settle(&s, &up(&[1, 2, 3]), &mut v);
        assert!(c.values().all(|n| (2..=3).contains(n)), "{c:?}");
        assert_eq!(c.len(), 3, "{c:?}");
    }

    #[test]
    fn no_hand_over_to_a_lagging_down_or_draining_replica() {
        let s = cluster(3, 6);
        let lead_1_or_2 = |r: &[NodeId]| *r.iter().find(|n| n.0 != 3).unwrap();
        // Node 3 is far behind on every PG (say, still taking a snapshot).
        let mut v = views(&s, lead_1_or_2, 10_000);
        for view in v.values_mut() {
            view.applied.insert(3, 10);
        }
        assert_eq!(settle(&s, &up(&[1, 2, 3]), &mut v).get(&3), None, "node 3 must not lead");
        // Caught up, but down as the healer sees it.
        let mut v = views(&s, lead_1_or_2, 10_000);
        assert_eq!(settle(&s, &up(&[1, 2]), &mut v).get(&3), None, "node 3 must not lead");
        // Balanced already (2 each): nothing to do.
        let balanced = views(&s, |r| r[0], 10);
        let c = leaders(&balanced);
        assert!(c.values().all(|n| *n == 2), "initial placement spreads leaders: {c:?}");
        assert_eq!(plan_transfer(&s, &up(&[1, 2, 3]), &balanced), None);
        // Draining (a fourth node to drain to).
        let mut s = cluster(4, 8);
        assert_eq!(s.apply(2, MetaCommand::DrainNode { node: NodeId(4), drain: true }), MetaReply::Done);
        let mut v = views(&s, |r| *r.iter().find(|n| n.0 != 4).unwrap(), 10_000);
        assert_eq!(settle(&s, &up(&[1, 2, 3, 4]), &mut v).get(&4), None, "node 4 must not lead");
    }
}
