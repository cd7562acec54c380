//! The simulation's transport: every message goes through the same encoding and the same
//! [`GroupEndpoint`] as on a real connection, but between in-process nodes, through filters the
//! nemesis sets: a cut link drops everything, a lossy network drops a fraction of messages
//! (requests or replies), and every message waits a random delay, so messages overtake each
//! other. A node that crashed neither sends nor answers, and a reply to a request made before
//! its sender's crash is lost with it.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use basalt_proto::raft::RaftKind;
use bytes::Bytes;
use openraft::OptionalSend;
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{RPCOption, RPCTypes, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::type_config::alias::SnapshotOf;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::state_machine::{SnapshotStream, StateMachine};
use crate::transport::network::{decode, encode};
use crate::transport::server::GroupEndpoint;
use crate::types::{NodeId, NodeInfo, TypeConfig, Vote};

/// Message delay when the network is healthy (microseconds).
pub(crate) const HEALTHY_DELAY_US: (u64, u64) = (50, 1000);

struct NetState {
    rng: StdRng,
    /// Running nodes: boot number and the group's endpoint.
    nodes: HashMap<NodeId, (u64, Arc<dyn GroupEndpoint>)>,
    /// Directed links that drop everything.
    cut: HashSet<(NodeId, NodeId)>,
    /// Fraction of messages lost.
    loss: f64,
    /// Delay range per message (microseconds).
    delay_us: (u64, u64),
    /// Messages sent and lost, for the report.
    sent: u64,
    lost: u64,
}

/// The filterable in-process network. Cheap to clone.
#[derive(Clone)]
pub(crate) struct SimNet {
    state: Arc<Mutex<NetState>>,
}

impl SimNet {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            state: Arc::new(Mutex::new(NetState {
                rng: StdRng::seed_from_u64(seed),
                nodes: HashMap::new(),
                cut: HashSet::new(),
                loss: 0.0,
                delay_us: HEALTHY_DELAY_US,
                sent: 0,
                lost: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, NetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn register(&self, node: NodeId, boot: u64, endpoint: Arc<dyn GroupEndpoint>) {
        self.lock().nodes.insert(node, (boot, endpoint));
    }

    pub(crate) fn unregister(&self, node: NodeId) {
        self.lock().nodes.remove(&node);
    }

    /// Cuts every link to and from `node`.
    pub(crate) fn isolate(&self, node: NodeId, all: &[NodeId]) {
        let mut st = self.lock();
        for &other in all.iter().filter(|&&o| o != node) {
            st.cut.insert((node, other));
            st.cut.insert((other, node));
        }
    }

    /// Lossy, slow network.
    pub(crate) fn degrade(&self, loss: f64, delay_us: (u64, u64)) {
        let mut st = self.lock();
        st.loss = loss;
        st.delay_us = delay_us;
    }

    /// Everything back to healthy.
    pub(crate) fn heal(&self) {
        let mut st = self.lock();
        st.cut.clear();
        st.loss = 0.0;
        st.delay_us = HEALTHY_DELAY_US;
    }

    /// (messages sent, messages lost).
    pub(crate) fn counts(&self) -> (u64, u64) {
        let st = self.lock();
        (st.sent, st.lost)
    }

    /// One hop from `from` (boot `boot`) to `to`: the endpoint to deliver to and its boot, and
    /// how long the message travels; `None` if it is lost.
    fn hop(&self, from: NodeId, boot: u64, to: NodeId) -> Option<(Arc<dyn GroupEndpoint>, u64, Duration)> {
        let mut st = self.lock();
        st.sent += 1;
        let sender_up = st.nodes.get(&from).is_some_and(|(b, _)| *b == boot);
        let target = st.nodes.get(&to).map(|(b, e)| (e.clone(), *b));
        let loss = st.loss;
        let lost = !sender_up || st.cut.contains(&(from, to)) || (loss > 0.0 && st.rng.random_bool(loss));
        let (lo, hi) = st.delay_us;
        let delay = Duration::from_micros(st.rng.random_range(lo..=hi.max(lo)));
        match target {
            Some((endpoint, to_boot)) if !lost => Some((endpoint, to_boot, delay)),
            _ => {
                st.lost += 1;
                None
            }
        }
    }

    /// Whether a reply from `to` (boot `to_boot`) reaches `from` (boot `boot`); how long it takes.
    fn reply_hop(&self, from: NodeId, boot: u64, to: NodeId, to_boot: u64) -> Option<Duration> {
        let mut st = self.lock();
        let up = |n: NodeId, b: u64| st.nodes.get(&n).is_some_and(|(x, _)| *x == b);
        let ok = up(from, boot) && up(to, to_boot) && !st.cut.contains(&(to, from));
        let loss = st.loss;
        let lost = !ok || (loss > 0.0 && st.rng.random_bool(loss));
        let (lo, hi) = st.delay_us;
        let delay = Duration::from_micros(st.rng.random_range(lo..=hi.max(lo)));
        if lost {
            st.lost += 1;
            return None;
        }
        Some(delay)
    }
}

/// Creates one group's links from node `from` (boot `boot`).
pub(crate) struct SimNetworkFactory<S> {
    pub(crate) net: SimNet,
    pub(crate) from: NodeId,
    pub(crate) boot: u64,
    pub(crate) _sm: PhantomData<fn() -> S>,
}

impl<S: StateMachine> RaftNetworkFactory<TypeConfig> for SimNetworkFactory<S> {
    type Network = SimLink<S>;

    async fn new_client(&mut self, target: NodeId, _node: &NodeInfo) -> Self::Network {
        SimLink { net: self.net.clone(), from: self.from, boot: self.boot, to: target, _sm: PhantomData }
    }
}

/// One group's link to one node.
pub(crate) struct SimLink<S> {
    net: SimNet,
    from: NodeId,
    boot: u64,
    to: NodeId,
    _sm: PhantomData<fn() -> S>,
}

fn unreachable(what: &str) -> Unreachable<TypeConfig> {
    Unreachable::from_string(what.to_string())
}

impl<S: StateMachine> SimLink<S> {
    /// Delivers one request and brings its reply back, or loses one of them.
    async fn exchange(&self, kind: RaftKind, body: Bytes) -> Result<Bytes, RPCError<TypeConfig>> {
        let (endpoint, to_boot, delay) =
            self.net.hop(self.from, self.boot, self.to).ok_or_else(|| RPCError::Unreachable(unreachable("message lost")))?;
        tokio::time::sleep(delay).await;
        let reply = endpoint.handle(kind, body).await.map_err(|e| RPCError::Network(NetworkError::from_string(e)))?;
        let back = self.net.reply_hop(self.from, self.boot, self.to, to_boot).ok_or_else(|| RPCError::Unreachable(unreachable("reply lost")))?;
        tokio::time::sleep(back).await;
        Ok(reply)
    }

    async fn unary<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        kind: RaftKind,
        action: RPCTypes,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let ttl = option.hard_ttl();
        let bytes = match tokio::time::timeout(ttl, self.exchange(kind, encode(req))).await {
            Ok(r) => r?,
            // A lost message looks like silence to the sender: it waits out the timeout.
            Err(_) => return Err(RPCError::Timeout(Timeout { action, id: self.from, target: self.to, timeout: ttl })),
        };
        decode(&bytes).map_err(|e| RPCError::Network(NetworkError::from_string(e)))
    }
}

impl<S: StateMachine> RaftNetworkV2<TypeConfig> for SimLink<S> {
    type SnapshotData = S::Snapshot;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(RaftKind::Append, RPCTypes::AppendEntries, &rpc, &option).await
    }

    async fn vote(&mut self, rpc: VoteRequest<TypeConfig>, option: RPCOption) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(RaftKind::Vote, RPCTypes::Vote, &rpc, &option).await
    }

    async fn pre_vote(&mut self, rpc: VoteRequest<TypeConfig>, option: RPCOption) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(RaftKind::PreVote, RPCTypes::Vote, &rpc, &option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: SnapshotOf<TypeConfig, S::Snapshot>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let transfer = async {
            let header = encode(&(vote, snapshot.meta.clone()));
            let mut data = snapshot.snapshot;
            let mut chunks = Vec::new();
            while let Some(c) = data.next_chunk().await.map_err(|e| StreamingError::Network(NetworkError::from_string(e.to_string())))? {
                chunks.push(Ok(c));
            }
            let (endpoint, to_boot, delay) =
                self.net.hop(self.from, self.boot, self.to).ok_or_else(|| StreamingError::Unreachable(unreachable("snapshot lost")))?;
            tokio::time::sleep(delay).await;
            let reply = endpoint
                .install_snapshot(header, Box::pin(futures::stream::iter(chunks)))
                .await
                .map_err(|e| StreamingError::Network(NetworkError::from_string(e)))?;
            let back = self
                .net
                .reply_hop(self.from, self.boot, self.to, to_boot)
                .ok_or_else(|| StreamingError::Unreachable(unreachable("snapshot reply lost")))?;
            tokio::time::sleep(back).await;
            decode::<SnapshotResponse<TypeConfig>>(&reply).map_err(|e| StreamingError::Network(NetworkError::from_string(e)))
        };
        // Biased: tokio's default random branch order would make runs irreproducible.
        tokio::select! {
            biased;
            closed = cancel => Err(StreamingError::Closed(closed)),
            result = transfer => result,
        }
    }
}
