//! Incoming side of the transport: peers' Raft connections ([`super::frame`]) and the
//! `RaftTransport` gRPC service that receives snapshots.
//!
//! Each peer connection gets one task that reads frames and dispatches every message to its group.
//! Unary requests (votes, heartbeats) run concurrently; pipelined appends of one sender stream
//! are fed in order into openraft's `stream_append`, so a follower can have many appends in
//! flight while they still reach its Raft core in log order.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, RwLock};

use basalt_proto::raft::raft_transport_server::RaftTransport;
use basalt_proto::raft::{RaftFrame, RaftKind, RaftMessage, SnapshotChunk, SnapshotReply};
use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::mpsc;
use tokio::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::frame::{self, MAGIC};
use super::space::SpaceBook;

use crate::types::{GroupId, NodeId};

/// How many appends of one stream may wait at the receiver (at least the sender's window).
pub(crate) const PIPELINE_QUEUE: usize = 128;

/// What the transport needs from a group hosted on this node.
pub(crate) trait GroupEndpoint: Send + Sync + 'static {
    /// Handles a unary request (append/heartbeat, vote, pre-vote, transfer-leader).
    fn handle(&self, kind: RaftKind, body: Bytes) -> BoxFuture<'static, Result<Bytes, String>>;
    /// Handles an ordered stream of appends; one result per request until the first failure.
    fn stream_append(&self, input: BoxStream<'static, Bytes>) -> BoxStream<'static, Result<Bytes, String>>;
    /// Receives a snapshot: `header` then data chunks.
    fn install_snapshot(&self, header: Bytes, chunks: BoxStream<'static, io::Result<Bytes>>) -> BoxFuture<'static, Result<Bytes, String>>;
}

/// Groups hosted on this node, by id.
#[derive(Clone, Default)]
pub(crate) struct Registry {
    groups: Arc<RwLock<HashMap<GroupId, Arc<dyn GroupEndpoint>>>>,
}

impl Registry {
    pub(crate) fn insert(&self, group: GroupId, endpoint: Arc<dyn GroupEndpoint>) {
        self.groups.write().unwrap_or_else(|p| p.into_inner()).insert(group, endpoint);
    }

    pub(crate) fn remove(&self, group: GroupId) {
        self.groups.write().unwrap_or_else(|p| p.into_inner()).remove(&group);
    }

    pub(crate) fn get(&self, group: GroupId) -> Option<Arc<dyn GroupEndpoint>> {
        self.groups.read().unwrap_or_else(|p| p.into_inner()).get(&group).cloned()
    }
}

/// The incoming side: serves peers' Raft connections, and as a gRPC service (add it to the
/// node's server) their snapshot transfers.
#[derive(Clone)]
pub struct TransportService {
    pub(crate) registry: Registry,
    pub(crate) space: Arc<SpaceBook>,
    /// Snapshots are taken only from peers with a node certificate (false with security off).
    pub(crate) require_node: bool,
}

/// How long a new connection may take to send [`MAGIC`].
const MAGIC_TIMEOUT: Duration = Duration::from_secs(10);

impl TransportService {
    /// Serves one peer's Raft connection until it closes. The caller accepted it (TLS with a
    /// node certificate naming `peer_node`; `None` with security off) and tuned its socket
    /// ([`super::tune_socket`]); [`MAGIC`] is checked here. Frames claiming to come from another
    /// node than the certificate names end the connection.
    pub async fn serve_connection<S>(&self, stream: S, peer: String, peer_node: Option<NodeId>)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let mut rd = BufReader::with_capacity(256 * 1024, rd);
        let mut magic = [0u8; 8];
        match tokio::time::timeout(MAGIC_TIMEOUT, rd.read_exact(&mut magic)).await {
            Ok(Ok(_)) if magic == MAGIC => {}
            Ok(Ok(_)) if magic == super::frame::MAGIC_V1 => {
                tracing::warn!(%peer, "refusing a raft connection from a node speaking raft protocol version 1 (before snapshots); upgrade it");
                return;
            }
            Ok(Ok(_)) if magic == super::frame::MAGIC_V2 => {
                tracing::warn!(%peer, "refusing a raft connection from a node speaking raft protocol version 2 (before clones); upgrade it");
                return;
            }
            _ => {
                tracing::debug!(%peer, "closing a connection that did not open with the raft protocol magic");
                return;
            }
        }
        let (reply_tx, reply_rx) = mpsc::channel::<RaftMessage>(4096);
        let writer = tokio::spawn(write_replies(BufWriter::with_capacity(256 * 1024, wr), reply_rx, self.space.clone()));
        match serve_pipe(self.registry.clone(), self.space.clone(), rd, reply_tx, peer_node).await {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                tracing::warn!(%peer, error = %e, "raft connection refused")
            }
            Err(e) => tracing::debug!(%peer, error = %e, "raft connection failed"),
            Ok(()) => {}
        }
        // Replies of requests still running go out as they finish; the writer task ends when
        // the last of them has (or at the first failed write).
        drop(writer);
    }
}

/// Sends replies as they complete; whatever is ready leaves in one frame and one flush.
async fn write_replies<W: AsyncWrite + Unpin>(mut wr: BufWriter<W>, mut rx: mpsc::Receiver<RaftMessage>, space: Arc<SpaceBook>) -> io::Result<()> {
    while let Some(first) = rx.recv().await {
        let mut messages = vec![first];
        while messages.len() < frame::MAX_MESSAGES {
            match rx.try_recv() {
                Ok(m) => messages.push(m),
                Err(_) => break,
            }
        }
        let mut reply = RaftFrame { from_node: 0, space_left: None, state_space_left: None, messages };
        space.stamp(&mut reply);
        wr.write_all(&frame::encode(&reply)).await?;
        if rx.is_empty() {
            wr.flush().await?;
        }
    }
    wr.shutdown().await
}

fn reply(id: u64, group: GroupId, result: Result<Bytes, String>) -> RaftMessage {
    match result {
        Ok(body) => RaftMessage { id, group, kind: RaftKind::Reply as i32, stream: 0, body },
        Err(e) => RaftMessage { id, group, kind: RaftKind::Error as i32, stream: 0, body: Bytes::from(e.into_bytes()) },
    }
}

struct PipelineState {
    ids: VecDeque<u64>,
    closed: bool,
}

/// One sender stream's ordered appends into one group. A group can have several at once:
/// the replication stream, and one short stream per heartbeat.
struct Pipeline {
    state: Arc<Mutex<PipelineState>>,
    tx: mpsc::Sender<Bytes>,
    last_used: std::time::Instant,
}

/// A pipeline whose sender went quiet this long is dropped (its sender abandoned it without
/// the end marker, e.g. on an error).
const PIPELINE_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

impl Pipeline {
    fn start(endpoint: Arc<dyn GroupEndpoint>, group: GroupId, replies: mpsc::Sender<RaftMessage>) -> Self {
        let (tx, rx) = mpsc::channel(PIPELINE_QUEUE);
        let state = Arc::new(Mutex::new(PipelineState { ids: VecDeque::new(), closed: false }));
        let mut out = endpoint.stream_append(Box::pin(ReceiverStream::new(rx)));
        let st = state.clone();
        tokio::spawn(async move {
            while let Some(result) = out.next().await {
                let id = st.lock().unwrap_or_else(|p| p.into_inner()).ids.pop_front();
                let Some(id) = id else { break };
                if replies.send(reply(id, group, result)).await.is_err() {
                    break;
                }
            }
            let ids = {
                let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
                s.closed = true;
                std::mem::take(&mut s.ids)
            };
            for id in ids {
                let _ = replies.send(reply(id, group, Err("append stream ended".into()))).await;
            }
        });
        Self { state, tx, last_used: std::time::Instant::now() }
    }

    /// Registers a request id; false if the pipeline already ended.
    fn admit(&self, id: u64) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.closed {
            return false;
        }
        s.ids.push_back(id);
        true
    }
}

async fn serve_pipe<R: AsyncRead + Unpin>(
    registry: Registry,
    space: Arc<SpaceBook>,
    mut incoming: R,
    replies: mpsc::Sender<RaftMessage>,
    peer_node: Option<NodeId>,
) -> io::Result<()> {
    let mut pipelines: HashMap<(GroupId, u64), Pipeline> = HashMap::new();
    let mut swept = std::time::Instant::now();
    while let Some(frame) = frame::read(&mut incoming).await? {
        if let Some(node) = peer_node
            && frame.from_node != 0
            && frame.from_node != node
        {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("frames claim to come from node-{} but the certificate names node-{node}", frame.from_node),
            ));
        }
        space.heard(frame.from_node, &frame);
        if swept.elapsed() >= PIPELINE_IDLE {
            pipelines.retain(|_, p| p.last_used.elapsed() < PIPELINE_IDLE);
            swept = std::time::Instant::now();
        }
        for m in frame.messages {
            let kind = RaftKind::try_from(m.kind).unwrap_or(RaftKind::Unspecified);
            if kind == RaftKind::StreamAppend && m.body.is_empty() {
                // End of a sender stream: close its input; replies to what came before still flow.
                pipelines.remove(&(m.group, m.stream));
                let _ = replies.send(reply(m.id, m.group, Ok(Bytes::new()))).await;
                continue;
            }
            let Some(endpoint) = registry.get(m.group) else {
                let _ = replies.send(reply(m.id, m.group, Err(format!("group {} is not hosted here", m.group)))).await;
                continue;
            };
            match kind {
                RaftKind::StreamAppend => {
                    let pipeline = pipelines.entry((m.group, m.stream)).or_insert_with(|| Pipeline::start(endpoint, m.group, replies.clone()));
                    pipeline.last_used = std::time::Instant::now();
                    if !pipeline.admit(m.id) {
                        let _ = replies.send(reply(m.id, m.group, Err("append stream ended".into()))).await;
                        continue;
                    }
                    // If the pipeline just ended, its drain answers this id.
                    let _ = pipeline.tx.send(m.body).await;
                }
                RaftKind::Append | RaftKind::Vote | RaftKind::PreVote | RaftKind::TransferLeader => {
                    let replies = replies.clone();
                    tokio::spawn(async move {
                        let result = endpoint.handle(kind, m.body).await;
                        let _ = replies.send(reply(m.id, m.group, result)).await;
                    });
                }
                RaftKind::Unspecified | RaftKind::Reply | RaftKind::Error => {
                    let _ = replies.send(reply(m.id, m.group, Err(format!("unexpected message kind {}", m.kind)))).await;
                }
            }
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl RaftTransport for TransportService {
    async fn install_snapshot(&self, request: Request<Streaming<SnapshotChunk>>) -> Result<Response<SnapshotReply>, Status> {
        // The gRPC port also serves clients; only another node may replace a replica's state.
        let peer = request.extensions().get::<basalt_security::PeerInfo>();
        if self.require_node && !matches!(peer.and_then(|p| p.identity.as_ref()), Some(basalt_security::Identity::Node(_))) {
            let who = peer.map(|p| p.addr.to_string()).unwrap_or_else(|| "?".into());
            tracing::warn!(peer = %who, "refused a Raft snapshot from a peer without a node certificate");
            return Err(Status::permission_denied("Raft snapshots are taken from nodes only (a node certificate of the cluster CA)"));
        }
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let endpoint = self.registry.get(first.group).ok_or_else(|| Status::not_found(format!("group {} is not hosted here", first.group)))?;
        let head = futures::stream::once(async move { Ok::<Bytes, io::Error>(first.data) });
        let rest = stream.map(|r| r.map(|c| c.data).map_err(|s| io::Error::other(s.message().to_string())));
        let body = endpoint.install_snapshot(first.header, Box::pin(head.chain(rest))).await.map_err(Status::internal)?;
        Ok(Response::new(SnapshotReply { body }))
    }
}
