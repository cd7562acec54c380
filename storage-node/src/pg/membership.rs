//! Moving one replica of a placement group to another node, driven on the PG's leader.
//!
//! The meta leader decides a move (`from` → `to`) and calls [`advance`] on the PG's leader
//! about once a second until it reports done. Each call looks at the group's membership and
//! takes the next step, so a call may repeat, and a new PG leader picks up where a crashed one
//! stopped:
//! 1. `to` is not a member: add it as a learner. The leader then sends it a snapshot (the PG's
//!    chunks, paced by the node's rebuild budget) and the log after it.
//! 2. `to` is a learner within [`CATCH_UP_LAG`] entries of the leader's log. If this leader is
//!    `from`, it first hands leadership to another voter that stays: a leader that votes
//!    itself out steps down only once the change commits, and the group then waits out an
//!    election timeout (seconds without writes) for a new one. Given up after
//!    [`HANDOVER_WAIT`] (the heir may be down): then `from` promotes `to` itself.
//!    Otherwise make the voters `voters - from + to`. openraft does this through joint consensus, so the group needs a
//!    majority of both the old and the new voters at every step and never has fewer than two
//!    live replicas because of the move.
//! 3. `to` votes and `from` does not: done. The meta leader then records the new replica set.
//!
//! A move whose target dies while it is still a learner is abandoned ([`cancel`]): the learner
//! is removed and the meta leader picks another target.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use basalt_common::NodeId;
use basalt_raft::{NodeInfo, RaftError};

use super::manager::PgHandle;

/// A learner this close to the leader's last log index is promoted: the rest arrives in the
/// next append, and the joint configuration does not wait long on it.
pub const CATCH_UP_LAG: u64 = 64;

/// How long a leaving leader keeps trying to hand leadership over before it promotes the new
/// replica itself (and the group elects a leader after the change).
pub const HANDOVER_WAIT: Duration = Duration::from_secs(10);

/// A leadership hand-over begun for one move.
#[derive(Clone, Copy, Debug)]
pub struct Handover {
    from: NodeId,
    to: NodeId,
    since: Instant,
}

/// Where a move stands after one step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MoveStatus {
    /// `to` votes in place of `from`.
    pub done: bool,
    /// What is happening: "adding learner", "snapshot", "catching up", "handing over
    /// leadership", "promoting", "done".
    pub phase: &'static str,
    /// Chunks of the latest snapshot stream sent so far.
    pub chunks_done: u64,
    /// Chunks in that stream.
    pub chunks_total: u64,
    /// Highest log index `to` holds (0: none yet).
    pub matched_index: u64,
    /// The leader's last log index.
    pub last_index: u64,
    /// The move was abandoned: the learner is gone, the voters unchanged.
    pub cancelled: bool,
}

/// Takes the next step of moving `pg`'s replica on `from` to `to` (at `to_addr`). Must run on
/// the PG's leader; anywhere else it fails with [`RaftError::NotLeader`].
pub async fn advance(handle: &PgHandle, from: NodeId, to: NodeId, to_addr: &str) -> Result<MoveStatus, RaftError> {
    let group = &handle.group;
    // Leadership confirmed first: a deposed leader's view of the membership may be stale.
    group.read_barrier().await?;
    let st = group.status();
    if !st.is_leader {
        let leader_addr = st.leader.and_then(|l| group.member_addr(l));
        return Err(RaftError::NotLeader { group: group.id(), leader: st.leader, leader_addr });
    }
    let voters: BTreeSet<u64> = st.voters.iter().copied().collect();
    let learners: BTreeSet<u64> = st.learners.iter().copied().collect();
    let mut target = voters.clone();
    target.remove(&from.0);
    target.insert(to.0);
    let transfer = &handle.shared.transfer;
    let mut status = MoveStatus {
        chunks_done: transfer.chunks_sent.load(std::sync::atomic::Ordering::Relaxed),
        chunks_total: transfer.chunks_total.load(std::sync::atomic::Ordering::Relaxed),
        last_index: st.last_log_index,
        matched_index: group.matched_index(to.0).unwrap_or(0),
        ..MoveStatus::default()
    };
    if voters == target {
        // Covers a joint configuration left by a leader that crashed mid-change, too: the
        // status lists the voters of both halves, which differ from the target then.
        return Ok(MoveStatus { done: true, phase: "done", ..status });
    }
    if voters.contains(&to.0) {
        // Joint configuration (old and new voters both listed): finish the change.
        status.phase = "promoting";
        group.set_voters(target).await?;
        return Ok(status);
    }
    if !learners.contains(&to.0) {
        tracing::info!(pg = group.id(), %from, %to, "adding learner for a replica move");
        group.add_learner(to.0, NodeInfo { addr: to_addr.to_string() }).await?;
        status.phase = "adding learner";
        return Ok(status);
    }
    let caught_up = group.matched_index(to.0).is_some_and(|m| st.last_log_index.saturating_sub(m) <= CATCH_UP_LAG);
    if !caught_up {
        let streaming = handle.shared.transfers.load(std::sync::atomic::Ordering::Relaxed) > 0;
        status.phase = if status.matched_index == 0 || streaming { "snapshot" } else { "catching up" };
        return Ok(status);
    }
    if st.leader == Some(from.0)
        && let Some(heir) = handover_heir(handle, from, to, &voters, &target)
    {
        tracing::info!(pg = group.id(), %from, %to, heir, "handing leadership over before leaving the group");
        group.transfer_leader(heir).await?;
        status.phase = "handing over leadership";
        return Ok(status);
    }
    tracing::info!(pg = group.id(), %from, %to, voters = ?target, "promoting the new replica");
    status.phase = "promoting";
    group.set_voters(target.clone()).await?;
    let after: BTreeSet<u64> = group.status().voters.into_iter().collect();
    if after == target {
        status.phase = "done";
        status.done = true;
        // A later move with the same ends gets its own hand-over attempt.
        *handle.handover.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
    Ok(status)
}

/// The voter to hand leadership to before `from` (this leader) leaves: one that stays and
/// answered a heartbeat within [`HEIR_HEARD_WITHIN`], the furthest replicated. None once this
/// move's hand-over has been tried for [`HANDOVER_WAIT`].
fn handover_heir(handle: &PgHandle, from: NodeId, to: NodeId, voters: &BTreeSet<u64>, target: &BTreeSet<u64>) -> Option<u64> {
    let mut slot = handle.handover.lock().unwrap_or_else(|p| p.into_inner());
    let began = match *slot {
        Some(h) if h.from == from && h.to == to => h.since,
        _ => slot.insert(Handover { from, to, since: Instant::now() }).since,
    };
    if began.elapsed() >= HANDOVER_WAIT {
        return None;
    }
    let group = &handle.group;
    let alive = |v: &u64| group.heard_from(*v).is_some_and(|ago| ago <= HEIR_HEARD_WITHIN);
    voters
        .iter()
        .copied()
        .filter(|v| *v != from.0 && target.contains(v) && alive(v))
        .max_by_key(|v| (group.matched_index(*v).unwrap_or(0), std::cmp::Reverse(*v)))
}

/// An heir must have answered a heartbeat this recently (heartbeats go every 500 ms): handing
/// leadership to a dead node would leave the group without a leader until an election.
pub const HEIR_HEARD_WITHIN: Duration = Duration::from_secs(2);

/// Abandons the move of `pg`'s replica to `to`: removes `to` if it is only a learner. A target
/// that already votes (the promotion began) is not removed: the move is finished instead, as
/// [`advance`] would.
pub async fn cancel(handle: &PgHandle, from: NodeId, to: NodeId, to_addr: &str) -> Result<MoveStatus, RaftError> {
    // A deposed leader that never saw `to` join must not report the move abandoned while the
    // real leader has it voting.
    handle.group.read_barrier().await?;
    let st = handle.group.status();
    if st.is_leader && !st.voters.contains(&to.0) {
        if st.learners.contains(&to.0) {
            tracing::info!(pg = handle.group.id(), %to, "abandoning a replica move: removing the learner");
            handle.group.remove_learner(to.0).await?;
        }
        return Ok(MoveStatus { done: true, cancelled: true, phase: "cancelled", last_index: st.last_log_index, ..MoveStatus::default() });
    }
    advance(handle, from, to, to_addr).await
}
