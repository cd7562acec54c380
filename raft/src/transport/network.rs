//! Outgoing side as openraft sees it: one `RaftNetworkV2` per (group, target) that routes
//! through the node's shared [`Router`](super::Router).

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use basalt_proto::raft::raft_transport_client::RaftTransportClient;
use basalt_proto::raft::{RaftKind, SnapshotChunk};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use openraft::OptionalSend;
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable};
use openraft::network::v2::RaftNetworkV2;
use openraft::network::{RPCOption, RPCTypes, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, TransferLeaderRequest, TransferLeaderResponse, VoteRequest,
    VoteResponse,
};
use openraft::type_config::alias::SnapshotOf;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Router;
use super::peer::{CallError, Peer};
use crate::state_machine::{SnapshotStream, StateMachine};
use crate::types::{GroupId, NodeId, NodeInfo, TypeConfig, Vote};

/// Appends of one stream in flight to a follower at once.
pub(crate) const PIPELINE_WINDOW: usize = 64;

static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);

pub(crate) fn encode<T: Serialize>(v: &T) -> Bytes {
    Bytes::from(bincode::serialize(v).expect("raft messages serialise"))
}

pub(crate) fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    bincode::deserialize(b).map_err(|e| format!("undecodable raft message: {e}"))
}

/// Creates the per-target networks of one group.
pub(crate) struct NetworkFactory<S> {
    pub(crate) router: Router,
    pub(crate) group: GroupId,
    pub(crate) _sm: PhantomData<fn() -> S>,
}

impl<S: StateMachine> RaftNetworkFactory<TypeConfig> for NetworkFactory<S> {
    type Network = GroupNetwork<S>;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Self::Network {
        GroupNetwork { router: self.router.clone(), group: self.group, target, addr: node.addr.clone(), _sm: PhantomData }
    }
}

/// One group's link to one target node.
pub(crate) struct GroupNetwork<S> {
    router: Router,
    group: GroupId,
    target: NodeId,
    addr: String,
    _sm: PhantomData<fn() -> S>,
}

fn rpc_err(e: CallError) -> RPCError<TypeConfig> {
    match e {
        CallError::Unreachable(..) => RPCError::Unreachable(Unreachable::from_string(e.to_string())),
        CallError::Remote(..) => RPCError::Network(NetworkError::from_string(e.to_string())),
    }
}

impl<S: StateMachine> GroupNetwork<S> {
    fn peer(&self) -> Result<Arc<Peer>, RPCError<TypeConfig>> {
        self.router.peer(self.target, &self.addr).map_err(rpc_err)
    }

    async fn unary<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        kind: RaftKind,
        action: RPCTypes,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<TypeConfig>> {
        let peer = self.peer()?;
        let ttl = option.hard_ttl();
        let call = peer.call(self.group, kind, encode(req));
        let bytes = match tokio::time::timeout(ttl, call).await {
            Ok(r) => r.map_err(rpc_err)?,
            Err(_) => {
                return Err(RPCError::Timeout(Timeout { action, id: self.router.node_id(), target: self.target, timeout: ttl }));
            }
        };
        decode(&bytes).map_err(|e| RPCError::Network(NetworkError::from_string(e)))
    }
}

impl<S: StateMachine> RaftNetworkV2<TypeConfig> for GroupNetwork<S> {
    type SnapshotData = S::Snapshot;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(RaftKind::Append, RPCTypes::AppendEntries, &rpc, &option).await
    }

    /// Pipelined replication: requests are queued on the peer connection in order (so they reach
    /// the follower's Raft core in order) while up to [`PIPELINE_WINDOW`] await their replies.
    ///
    /// A stream that says it holds exactly one request (openraft sends each heartbeat so) goes
    /// as one unary `Append` call instead: one message each way, where a stream costs two (the
    /// request and the end marker) and a pipeline task on the receiver. Heartbeats are most of
    /// what an idle node sends (64 PGs of three replicas: ~85 a second from each node).
    fn stream_append<'s, St>(
        &'s mut self,
        mut input: St,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>, RPCError<TypeConfig>>>
    where
        St: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        Box::pin(async move {
            if input.size_hint() == (1, Some(1)) {
                let Some(req) = input.next().await else {
                    return Ok(Box::pin(futures::stream::empty()) as BoxStream<'s, _>);
                };
                let prev = req.prev_log_id;
                let last = req.entries.last().map(|e| e.log_id).or(prev);
                let result = self.append_entries(req, option).await.map(|resp| resp.into_stream_result(prev, last));
                return Ok(Box::pin(futures::stream::once(async move { result })) as BoxStream<'s, _>);
            }
            let peer = self.peer()?;
            let group = self.group;
            let stream_id = NEXT_STREAM.fetch_add(1, Ordering::Relaxed);
            // After the last request, an empty message tells the receiver this stream is over
            // (a group has several: replication, and one per heartbeat).
            let results = input
                .map(Some)
                .chain(futures::stream::once(async { None }))
                .then(move |req| {
                    let peer = peer.clone();
                    async move {
                        match req {
                            Some(req) => Some(peer.send(group, RaftKind::StreamAppend, stream_id, encode(&req)).await),
                            None => {
                                drop(peer.send(group, RaftKind::StreamAppend, stream_id, Bytes::new()).await);
                                None
                            }
                        }
                    }
                })
                .filter_map(futures::future::ready)
                .map(|rx| async move {
                    match rx.await {
                        Ok(Ok(bytes)) => {
                            decode::<StreamAppendResult<TypeConfig>>(&bytes).map_err(|e| RPCError::Network(NetworkError::from_string(e)))
                        }
                        Ok(Err(e)) => Err(rpc_err(e)),
                        Err(_) => Err(RPCError::Unreachable(Unreachable::from_string("connection closed"))),
                    }
                })
                .buffered(PIPELINE_WINDOW)
                // The stream ends after the first failure or conflict, as openraft expects.
                .scan(false, |stopped, item| {
                    if *stopped {
                        return futures::future::ready(None);
                    }
                    *stopped = !matches!(item, Ok(Ok(_)));
                    futures::future::ready(Some(item))
                });
            let boxed: BoxStream<'s, _> = Box::pin(results);
            Ok(boxed)
        })
    }

    async fn vote(&mut self, rpc: VoteRequest<TypeConfig>, option: RPCOption) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(RaftKind::Vote, RPCTypes::Vote, &rpc, &option).await
    }

    async fn pre_vote(&mut self, rpc: VoteRequest<TypeConfig>, option: RPCOption) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(RaftKind::PreVote, RPCTypes::Vote, &rpc, &option).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(RaftKind::TransferLeader, RPCTypes::TransferLeader, &req, &option).await
    }

    /// Streams a snapshot over its own call on the peer's connection. The data comes from the
    /// state machine's snapshot handle piece by piece, so a large placement group is never held
    /// in memory.
    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: SnapshotOf<TypeConfig, S::Snapshot>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let peer = self.peer().map_err(|e| match e {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            other => StreamingError::Network(NetworkError::from_string(other.to_string())),
        })?;
        let group = self.group;
        let from = self.router.node_id();
        let header = encode(&(vote, snapshot.meta.clone()));
        let mut data = snapshot.snapshot;
        let (tx, rx) = tokio::sync::mpsc::channel::<SnapshotChunk>(4);
        let producer = async move {
            if tx.send(SnapshotChunk { group, header, data: Bytes::new(), from_node: from }).await.is_err() {
                return Ok(());
            }
            while let Some(chunk) = data.next_chunk().await? {
                if tx.send(SnapshotChunk { group, header: Bytes::new(), data: chunk, from_node: from }).await.is_err() {
                    break;
                }
            }
            Ok::<(), std::io::Error>(())
        };
        let mut client = RaftTransportClient::new(peer.channel())
            .max_decoding_message_size(basalt_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(basalt_proto::MAX_MESSAGE_BYTES);
        let call = client.install_snapshot(tokio_stream::wrappers::ReceiverStream::new(rx));
        let transfer = async {
            let (sent, reply) = tokio::join!(producer, call);
            sent.map_err(|e| StreamingError::Network(NetworkError::from_string(format!("reading snapshot: {e}"))))?;
            let reply = reply
                .map_err(|s| StreamingError::Unreachable(Unreachable::from_string(format!("snapshot to node-{}: {}", self.target, s.message()))))?;
            decode::<SnapshotResponse<TypeConfig>>(&reply.into_inner().body).map_err(|e| StreamingError::Network(NetworkError::from_string(e)))
        };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            result = transfer => result,
        }
    }
}
