//! [`RaftGroup`]: one Raft group on this node, behind Basalt's own API.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use basalt_proto::raft::RaftKind;
use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, InitializeError, LinearizableReadError, RaftError as OpenraftError};
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use openraft::storage::Snapshot;
use openraft::{ChangeMembers, Raft, ReadPolicy, ServerState};

use crate::error::RaftError;
use crate::state_machine::{SmAdapter, SnapshotReceiver, SnapshotSink, StateMachine};
use crate::transport::network::{decode, encode};
use crate::transport::server::GroupEndpoint;
use crate::types::{CheckpointRecord, GroupId, NodeId, NodeInfo, SnapshotMeta, TypeConfig, Vote};

/// How far a group's log has been applied, checkpointed and purged on this node: the part of
/// [`GroupStatus`] the checkpointer looks at for every group ten times a second, read without
/// copying the group's membership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogProgress {
    /// The group.
    pub group: GroupId,
    /// Index of the last applied entry (0: none).
    pub applied_index: u64,
    /// Index the last checkpoint (snapshot) covers (0: none).
    pub checkpoint_index: u64,
    /// Index through which the log is purged (0: none).
    pub purged_index: u64,
}

/// What a group looks like from this node right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupStatus {
    /// The group.
    pub group: GroupId,
    /// This node leads the group.
    pub is_leader: bool,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// Current term.
    pub term: u64,
    /// Last log index on this node.
    pub last_log_index: u64,
    /// Last applied index on this node.
    pub applied_index: u64,
    /// Index covered by the last checkpoint (snapshot) on this node.
    pub checkpoint_index: u64,
    /// Highest index purged from this node's log.
    pub purged_index: u64,
    /// Voting members (in a joint configuration, those of both halves).
    pub voters: Vec<NodeId>,
    /// When a voter change is half done (joint configuration): the voters it is changing to.
    pub next_voters: Option<Vec<NodeId>>,
    /// Learners (replicas being filled).
    pub learners: Vec<NodeId>,
    /// Follower, Leader, Candidate, Learner or Shutdown.
    pub state: String,
}

/// A Raft group hosted on this node. Cheap to clone.
pub struct RaftGroup<S: StateMachine> {
    pub(crate) group: GroupId,
    pub(crate) raft: Raft<TypeConfig, SmAdapter<S>>,
}

impl<S: StateMachine> Clone for RaftGroup<S> {
    fn clone(&self) -> Self {
        Self { group: self.group, raft: self.raft.clone() }
    }
}

fn not_leader(group: GroupId, f: &openraft::error::ForwardToLeader<TypeConfig>) -> RaftError {
    RaftError::NotLeader { group, leader: f.leader_id, leader_addr: f.leader_node.as_ref().map(|n| n.addr.clone()) }
}

impl<S: StateMachine> RaftGroup<S> {
    /// The group id.
    pub fn id(&self) -> GroupId {
        self.group
    }

    fn stopped(&self, e: impl std::fmt::Display) -> RaftError {
        RaftError::Stopped { group: self.group, reason: e.to_string() }
    }

    /// Forms the group with `members` as voters. Call on one member only; a group that is
    /// already initialised (e.g. after a restart) is left alone.
    pub async fn initialize(&self, members: BTreeMap<NodeId, NodeInfo>) -> Result<(), RaftError> {
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(OpenraftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(OpenraftError::APIError(e)) => Err(RaftError::Membership { group: self.group, reason: e.to_string() }),
            Err(OpenraftError::Fatal(f)) => Err(self.stopped(f)),
        }
    }

    /// Whether the group has ever been formed on this node.
    pub async fn is_initialized(&self) -> Result<bool, RaftError> {
        self.raft.is_initialized().await.map_err(|e| self.stopped(e))
    }

    /// Replicates `command` and returns the state machine's reply once it is applied.
    pub async fn propose(&self, command: Bytes) -> Result<Bytes, RaftError> {
        match self.raft.client_write(crate::types::Command(command)).await {
            Ok(resp) => Ok(resp.data.0),
            Err(OpenraftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(not_leader(self.group, &f)),
            Err(OpenraftError::APIError(ClientWriteError::LogEntryDiscarded(f))) => Err(RaftError::Unavailable {
                group: self.group,
                reason: format!("leadership changed before the write committed (new leader {:?}); outcome unknown", f.leader_id),
            }),
            Err(OpenraftError::APIError(e)) => Err(RaftError::Unavailable { group: self.group, reason: e.to_string() }),
            Err(OpenraftError::Fatal(f)) => Err(self.stopped(f)),
        }
    }

    /// Returns once this node may serve a linearizable read: it holds a valid leader lease and
    /// has applied everything committed when the read began.
    pub async fn read_barrier(&self) -> Result<(), RaftError> {
        if self.lease_read_ready() {
            return Ok(());
        }
        let result = self.raft.ensure_linearizable(ReadPolicy::LeaseRead).await;
        match result {
            Ok(_) => Ok(()),
            Err(OpenraftError::APIError(LinearizableReadError::ForwardToLeader(f))) => Err(not_leader(self.group, &f)),
            Err(OpenraftError::APIError(e)) => Err(RaftError::Unavailable { group: self.group, reason: e.to_string() }),
            Err(OpenraftError::Fatal(f)) => Err(self.stopped(f)),
        }
    }

    /// The lease-read fast path, answered from the metrics openraft publishes after every
    /// change instead of a message to the group's core task and back per read (that round trip
    /// was most of a 4 KiB read's Raft cost). It checks what `ensure_linearizable(LeaseRead)`
    /// checks:
    /// - the group runs, this node is in the leader state and still a voter;
    /// - the committed vote names this node as leader;
    /// - a quorum acknowledged a message this leader sent less than a lease ago. Followers
    ///   refuse to vote for anyone else for a lease after hearing from the leader, so no other
    ///   leader exists yet. Published metrics may lag, which only makes the acknowledgement
    ///   look older. A tenth of the lease is kept back for clock-rate drift;
    /// - the state machine has applied an entry of this leader's own term, so everything
    ///   earlier leaders committed is applied. Writes this leader acknowledged were applied
    ///   before their reply went out, so no acknowledged write is missing from the read.
    ///
    /// Anything else (a new leader, a stale acknowledgement) takes the slow path.
    fn lease_read_ready(&self) -> bool {
        use openraft::vote::RaftLeaderId;
        let lease = Duration::from_millis(self.raft.config().election_timeout_max) * 9 / 10;
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        // A stopped group keeps publishing its last metrics: the state says whether it runs.
        if m.state != ServerState::Leader || m.running_state.is_err() {
            return false;
        }
        if !m.vote.is_committed() || *m.vote.leader_id().node_id() != m.id {
            return false;
        }
        // A leader that committed its own removal hands over leadership and stays Leader a
        // moment longer with a fresh quorum acknowledgement; openraft's slow path refuses it.
        if !m.membership_config.membership().voter_ids().any(|v| v == m.id) {
            return false;
        }
        let fresh = m.last_quorum_acked.as_ref().is_some_and(|acked| openraft::Instant::elapsed(&**acked) < lease);
        let own_term_applied = m.last_applied.as_ref().is_some_and(|l| *l.committed_leader_id() == m.vote.leader_id().to_committed());
        fresh && own_term_applied
    }

    /// The group as this node sees it.
    pub fn status(&self) -> GroupStatus {
        let m = self.raft.metrics().borrow_watched().clone();
        let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
        let learners = m.membership_config.membership().learner_ids().collect();
        GroupStatus {
            group: self.group,
            is_leader: m.state == ServerState::Leader,
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            checkpoint_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
            voters: voters.into_iter().collect(),
            next_voters: {
                let configs = m.membership_config.membership().get_joint_config();
                (configs.len() > 1).then(|| configs.last().map(|c| c.iter().copied().collect()).unwrap_or_default())
            },
            learners,
            state: format!("{:?}", m.state),
        }
    }

    /// The group's [`LogProgress`], without the copies [`RaftGroup::status`] makes.
    pub fn progress(&self) -> LogProgress {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        LogProgress {
            group: self.group,
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            checkpoint_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
        }
    }

    /// On the leader: every replica of the group, voters then learners (this node included);
    /// `None` when this node does not lead. For per-request checks: unlike
    /// [`RaftGroup::status`] it copies nothing but the ids.
    pub fn replicas_if_leader(&self) -> Option<Vec<NodeId>> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        if m.state != ServerState::Leader {
            return None;
        }
        let membership = m.membership_config.membership();
        Some(membership.voter_ids().chain(membership.learner_ids()).collect())
    }

    /// The address recorded in the group's membership for `node`.
    pub fn member_addr(&self, node: NodeId) -> Option<String> {
        self.raft.metrics().borrow_watched().membership_config.membership().get_node(&node).map(|n| n.addr.clone())
    }

    /// On the leader: the highest log index `node` is known to hold; `None` if it holds
    /// nothing yet (a new learner waiting for a snapshot) or this node does not lead.
    pub fn matched_index(&self, node: NodeId) -> Option<u64> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        m.replication.as_ref()?.get(&node)?.as_ref().map(|l| l.index)
    }

    /// On the leader: how long ago `node` last answered a heartbeat; `None` if it never did or
    /// this node does not lead.
    pub fn heard_from(&self, node: NodeId) -> Option<Duration> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        m.heartbeat.as_ref()?.get(&node)?.as_ref().map(|at| openraft::Instant::elapsed(&**at))
    }

    /// The leader this node knows of.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow_watched().current_leader
    }

    /// Waits until some node is known as leader, up to `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<NodeId> {
        let mut rx = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(l) = rx.borrow_watched().current_leader {
                return Some(l);
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.map(|r| r.is_err()).unwrap_or(true) {
                return rx.borrow_watched().current_leader;
            }
        }
    }

    /// Asks for a checkpoint now (it may be deferred by the state machine).
    pub async fn checkpoint_now(&self) -> Result<(), RaftError> {
        self.raft.trigger().snapshot().await.map_err(|e| self.stopped(e))
    }

    /// Purges this replica's log through `index` (which must be covered by a checkpoint),
    /// ignoring the usual cushion of entries kept after a checkpoint. Asynchronous: watch
    /// [`GroupStatus::purged_index`].
    pub async fn purge_through(&self, index: u64) -> Result<(), RaftError> {
        self.raft.trigger().purge_log(index).await.map_err(|e| self.stopped(e))
    }

    /// Hands leadership to `to` if this node leads.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), RaftError> {
        self.raft.trigger().transfer_leader(to).await.map_err(|e| self.stopped(e))
    }

    /// If this node leads the group, hands leadership to the voter with the most of the log
    /// among those that answered within `heard_within` (a dead heir would leave the group
    /// leaderless until an election); returns the heir. Used when the node stops on purpose:
    /// clients move to the heir at once instead of waiting out an election timeout.
    pub async fn hand_over_leadership(&self, heard_within: Duration) -> Result<Option<NodeId>, RaftError> {
        let st = self.status();
        if !st.is_leader {
            return Ok(None);
        }
        let me = self.raft.metrics().borrow_watched().id;
        let heir = st
            .voters
            .iter()
            .copied()
            .filter(|v| *v != me && self.heard_from(*v).is_some_and(|ago| ago <= heard_within))
            .max_by_key(|v| (self.matched_index(*v).unwrap_or(0), std::cmp::Reverse(*v)));
        if let Some(heir) = heir {
            self.transfer_leader(heir).await?;
        }
        Ok(heir)
    }

    /// Adds `node` as a learner (it receives the log but does not vote).
    pub async fn add_learner(&self, node: NodeId, info: NodeInfo) -> Result<(), RaftError> {
        let mut m = BTreeMap::new();
        m.insert(node, info);
        self.change(ChangeMembers::AddNodes(m)).await
    }

    /// Removes learner `node` from the group.
    pub async fn remove_learner(&self, node: NodeId) -> Result<(), RaftError> {
        self.change(ChangeMembers::RemoveNodes([node].into_iter().collect())).await
    }

    /// Replaces the voters with `voters` (all must be members already).
    pub async fn set_voters(&self, voters: BTreeSet<NodeId>) -> Result<(), RaftError> {
        self.change(ChangeMembers::ReplaceAllVoters(voters)).await
    }

    async fn change(&self, change: ChangeMembers<NodeId, NodeInfo>) -> Result<(), RaftError> {
        match self.raft.change_membership(change, false).await {
            Ok(_) => Ok(()),
            Err(OpenraftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(not_leader(self.group, &f)),
            Err(OpenraftError::APIError(e)) => Err(RaftError::Membership { group: self.group, reason: e.to_string() }),
            Err(OpenraftError::Fatal(f)) => Err(self.stopped(f)),
        }
    }

    /// Stops the group's tasks on this node.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(group = self.group, error = %e, "raft group shutdown failed");
        }
    }
}

/// The transport's view of a group: decodes requests and hands them to openraft.
pub(crate) struct Endpoint<S: StateMachine> {
    pub(crate) group: GroupId,
    pub(crate) raft: Raft<TypeConfig, SmAdapter<S>>,
    pub(crate) receiver: S::Receiver,
}

impl<S: StateMachine> GroupEndpoint for Endpoint<S> {
    fn handle(&self, kind: RaftKind, body: Bytes) -> BoxFuture<'static, Result<Bytes, String>> {
        let raft = self.raft.clone();
        Box::pin(async move {
            match kind {
                RaftKind::Append => {
                    let req: AppendEntriesRequest<TypeConfig> = decode(&body)?;
                    raft.append_entries(req).await.map(|r| encode(&r)).map_err(|e| e.to_string())
                }
                RaftKind::Vote => {
                    let req: VoteRequest<TypeConfig> = decode(&body)?;
                    raft.vote(req).await.map(|r| encode(&r)).map_err(|e| e.to_string())
                }
                RaftKind::PreVote => {
                    let req: VoteRequest<TypeConfig> = decode(&body)?;
                    raft.pre_vote(req).await.map(|r| encode(&r)).map_err(|e| e.to_string())
                }
                RaftKind::TransferLeader => {
                    let req: TransferLeaderRequest<TypeConfig> = decode(&body)?;
                    raft.handle_transfer_leader(req).await.map(|r| encode(&r)).map_err(|e| e.to_string())
                }
                other => Err(format!("unsupported request kind {other:?}")),
            }
        })
    }

    fn stream_append(&self, input: BoxStream<'static, Bytes>) -> BoxStream<'static, Result<Bytes, String>> {
        let group = self.group;
        // A request that does not decode ends the stream: results must stay one per request.
        let requests = input
            .map(move |b| {
                decode::<AppendEntriesRequest<TypeConfig>>(&b)
                    .map_err(|e| tracing::warn!(group, error = %e, "dropping undecodable append stream"))
                    .ok()
            })
            .take_while(|r| futures::future::ready(r.is_some()))
            .filter_map(futures::future::ready);
        Box::pin(self.raft.stream_append(requests).map(|r| r.map(|res| encode(&res)).map_err(|e| e.to_string())))
    }

    fn install_snapshot(&self, header: Bytes, mut chunks: BoxStream<'static, io::Result<Bytes>>) -> BoxFuture<'static, Result<Bytes, String>> {
        let raft = self.raft.clone();
        let receiver = self.receiver.clone();
        let group = self.group;
        Box::pin(async move {
            let (vote, meta): (Vote, SnapshotMeta) = decode(&header)?;
            let record = CheckpointRecord { meta: meta.clone() };
            let mut sink = receiver.begin(&record).await.map_err(|e| format!("group {group}: cannot stage snapshot: {e}"))?;
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(|e| format!("group {group}: snapshot stream broke: {e}"))?;
                if !chunk.is_empty() {
                    sink.write(chunk).await.map_err(|e| format!("group {group}: staging snapshot: {e}"))?;
                }
            }
            let snapshot = sink.finish().await.map_err(|e| format!("group {group}: finishing snapshot: {e}"))?;
            let resp = raft.install_full_snapshot(vote, Snapshot { meta, snapshot }).await.map_err(|e| e.to_string())?;
            Ok(encode(&resp))
        })
    }
}

pub(crate) fn endpoint<S: StateMachine>(group: &RaftGroup<S>, receiver: S::Receiver) -> Arc<dyn GroupEndpoint> {
    Arc::new(Endpoint { group: group.group, raft: group.raft.clone(), receiver })
}
