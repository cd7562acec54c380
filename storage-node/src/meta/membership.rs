//! Keeps the meta group at full strength: a meta voter silent past
//! `heal.replace_down_after_secs` (or removed from the cluster) is replaced by a spare, a
//! registered meta-role node that is up and not in the group. Without this, a second meta node
//! lost for good would leave the cluster unable to change anything (attach, create, heal).
//!
//! The replacement goes like a PG replica move ([`crate::pg::membership`]), run by the healer
//! on the meta leader one step per tick: the spare joins as a learner (its meta group, started
//! empty at boot, receives the log or a snapshot), and once within [`CATCH_UP_LAG`] entries it
//! takes the dead voter's place by joint consensus. Every step is decided from the group's
//! current membership, so a new meta leader picks up where an old one stopped.

use std::collections::BTreeSet;

use basalt_common::NodeId;
use basalt_raft::NodeInfo;

use super::healer::Health;
use super::state::{ClusterState, Role};
use crate::node::MetaHandle;

/// How close to the leader's log a learner must be before it may vote.
pub const CATCH_UP_LAG: u64 = 64;

/// A replacement to carry out: `dead` leaves the meta group's voters, `spare` takes its place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replacement {
    /// The voter that is gone.
    pub dead: NodeId,
    /// Its replacement.
    pub spare: NodeId,
}

/// The replacement to work on, if a voter is gone and a spare exists. A learner already on
/// its way in (an interrupted replacement) is preferred; otherwise a spare in a
/// failure domain the remaining voters do not use, then the lowest id.
pub fn plan(state: &ClusterState, health: &Health, voters: &BTreeSet<u64>, learners: &BTreeSet<u64>) -> Option<Replacement> {
    let gone = |n: &NodeId| health.dead.contains(n) || state.removed.contains(n);
    let dead = voters.iter().map(|v| NodeId(*v)).find(gone)?;
    let usable = |n: &NodeId| {
        health.up.contains(n) && !gone(n) && !state.draining.contains(n) && state.nodes.get(n).is_some_and(|r| r.roles.contains(&Role::Meta))
    };
    let staying: Vec<NodeId> = voters.iter().map(|v| NodeId(*v)).filter(|v| !gone(v)).collect();
    if let Some(learner) = learners.iter().map(|l| NodeId(*l)).find(usable) {
        return Some(Replacement { dead, spare: learner });
    }
    let level = state.settings.map(|s| s.failure_domain);
    let domain = |n: &NodeId| match (level, state.nodes.get(n)) {
        (Some(level), Some(r)) => r.labels.domain(level),
        _ => String::new(),
    };
    let used: BTreeSet<String> = staying.iter().map(domain).collect();
    state
        .nodes
        .keys()
        .filter(|n| usable(n) && !voters.contains(&n.0))
        .min_by_key(|n| (used.contains(&domain(n)), n.0))
        .map(|spare| Replacement { dead, spare: *spare })
}

/// A learner of the meta group that is gone (dead past the timeout, or removed): a spare that
/// died mid-replacement. It holds no vote but the leader keeps replicating to it, so it goes.
pub fn gone_learner(state: &ClusterState, health: &Health, learners: &BTreeSet<u64>) -> Option<NodeId> {
    learners.iter().map(|l| NodeId(*l)).find(|n| health.dead.contains(n) || state.removed.contains(n))
}

/// Takes the next step of replacing a gone meta voter, if any is due. Run on the meta leader.
pub async fn step(meta: &MetaHandle, state: &ClusterState, health: &Health) {
    let st = meta.group.status();
    if !st.is_leader {
        return;
    }
    if let Some(next) = st.next_voters {
        // A change an earlier leader left half done (joint configuration): finish it first,
        // whatever has happened since (the lost voter may even be back).
        tracing::info!(voters = ?next, "meta group: finishing a half-done voter change");
        if let Err(e) = meta.group.set_voters(next.into_iter().collect()).await {
            tracing::warn!(error = %e, "finishing a half-done meta voter change failed; will retry");
        }
        return;
    }
    let voters: BTreeSet<u64> = st.voters.iter().copied().collect();
    let learners: BTreeSet<u64> = st.learners.iter().copied().collect();
    if let Some(gone) = gone_learner(state, health, &learners) {
        tracing::info!(learner = %gone, "meta group: removing a learner that is gone");
        if let Err(e) = meta.group.remove_learner(gone.0).await {
            tracing::warn!(learner = %gone, error = %e, "removing a gone meta learner failed; will retry");
        }
        return;
    }
    let Some(r) = plan(state, health, &voters, &learners) else { return };
    let mut target = voters.clone();
    target.remove(&r.dead.0);
    target.insert(r.spare.0);
    let result = if !learners.contains(&r.spare.0) {
        let Some(addr) = state.nodes.get(&r.spare).map(|n| n.addr.clone()) else { return };
        tracing::info!(dead = %r.dead, spare = %r.spare, "replacing a lost meta node: adding the spare as a learner");
        meta.group.add_learner(r.spare.0, NodeInfo { addr }).await
    } else if meta.group.matched_index(r.spare.0).is_some_and(|m| st.last_log_index.saturating_sub(m) <= CATCH_UP_LAG) {
        tracing::info!(dead = %r.dead, spare = %r.spare, voters = ?target, "replacing a lost meta node: the spare takes its vote");
        meta.group.set_voters(target).await
    } else {
        return;
    };
    if let Err(e) = result {
        tracing::warn!(dead = %r.dead, spare = %r.spare, error = %e, "a step of replacing a lost meta node failed; will retry");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::fixtures::{cluster_of, health};
    use crate::meta::state::NodeRecord;

    fn node(id: u64, zone: &str, meta: bool) -> NodeRecord {
        let mut n = crate::meta::fixtures::node(id, zone);
        if meta {
            n.roles.insert(Role::Meta);
        }
        n
    }

    fn ids(v: &[u64]) -> BTreeSet<u64> {
        v.iter().copied().collect()
    }

    #[test]
    fn a_dead_meta_voter_is_replaced_by_a_spare_in_a_free_domain() {
        let nodes = vec![node(1, "a", true), node(2, "b", true), node(3, "c", true), node(4, "a", true), node(5, "d", true), node(6, "e", false)];
        let s = cluster_of(nodes, 8);
        let voters = ids(&[1, 2, 3]);
        // Everyone up: nothing to do.
        assert_eq!(plan(&s, &health(&[1, 2, 3, 4, 5, 6], &[]), &voters, &ids(&[])), None);
        // Node 3 dead: node 5 (zone d) beats node 4 (zone a, shared with voter 1); node 6 has no meta role.
        let h = health(&[1, 2, 4, 5, 6], &[3]);
        assert_eq!(plan(&s, &h, &voters, &ids(&[])), Some(Replacement { dead: NodeId(3), spare: NodeId(5) }));
        // A learner already joining is kept, even if another spare looks better.
        assert_eq!(plan(&s, &h, &voters, &ids(&[4])), Some(Replacement { dead: NodeId(3), spare: NodeId(4) }));
        // No spare up: nothing.
        assert_eq!(plan(&s, &health(&[1, 2, 6], &[3, 4, 5]), &voters, &ids(&[])), None);
    }

    #[test]
    fn a_spare_that_died_while_joining_is_dropped_as_learner() {
        let nodes = vec![node(1, "a", true), node(2, "b", true), node(3, "c", true), node(4, "d", true), node(5, "e", true)];
        let mut s = cluster_of(nodes, 8);
        // Learner 4 up: it stays (it may be on its way in).
        assert_eq!(gone_learner(&s, &health(&[1, 2, 4, 5], &[3]), &ids(&[4])), None);
        // Learner 4 dead: it goes, and node 5 can then be planned in node 3's place.
        let h = health(&[1, 2, 5], &[3, 4]);
        assert_eq!(gone_learner(&s, &h, &ids(&[4])), Some(NodeId(4)));
        assert_eq!(plan(&s, &h, &ids(&[1, 2, 3]), &ids(&[])), Some(Replacement { dead: NodeId(3), spare: NodeId(5) }));
        // Removed from the cluster while a learner: it goes too.
        s.removed.insert(NodeId(5));
        assert_eq!(gone_learner(&s, &health(&[1, 2, 3, 5], &[]), &ids(&[5])), Some(NodeId(5)));
    }
}
