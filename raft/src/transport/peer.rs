//! One outgoing connection to a peer node, shared by every group that talks to it.
//!
//! Messages from all groups queue on one bounded channel; a task drains the queue into frames
//! (many messages per HTTP/2 data frame, so a burst of heartbeats for a hundred groups is one
//! write) over a single long-lived `Pipe` stream, and matches replies to callers by id. The
//! connection is opened on first use and re-opened after failures with backoff; callers see
//! failures as `Unreachable` and let openraft back off.

use std::collections::HashMap;
use std::time::Duration;

use basalt_proto::raft::raft_transport_client::RaftTransportClient;
use basalt_proto::raft::{RaftFrame, RaftKind, RaftMessage};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::types::{GroupId, NodeId};

/// Why a call to a peer failed.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum CallError {
    /// The peer could not be reached or the connection dropped.
    #[error("node-{0} unreachable: {1}")]
    Unreachable(NodeId, String),
    /// The peer answered with an error.
    #[error("node-{0} refused: {1}")]
    Remote(NodeId, String),
}

pub(crate) type CallResult = Result<Bytes, CallError>;

pub(crate) struct Outgoing {
    pub(crate) group: GroupId,
    pub(crate) kind: RaftKind,
    pub(crate) stream: u64,
    pub(crate) body: Bytes,
    pub(crate) reply: oneshot::Sender<CallResult>,
}

/// Limits of one frame.
const FRAME_MESSAGES: usize = 512;
const FRAME_BYTES: usize = 8 << 20;

pub(crate) struct Peer {
    pub(crate) target: NodeId,
    pub(crate) addr: String,
    tx: mpsc::Sender<Outgoing>,
    channel: Channel,
    task: JoinHandle<()>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Peer {
    pub(crate) fn new(from: NodeId, target: NodeId, addr: &str, queue: usize) -> Result<Self, CallError> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| CallError::Unreachable(target, format!("bad address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20));
        let channel = endpoint.connect_lazy();
        let (tx, rx) = mpsc::channel(queue);
        let task = tokio::spawn(run(from, target, channel.clone(), rx));
        Ok(Self { target, addr: addr.to_string(), tx, channel, task })
    }

    /// The shared HTTP/2 channel (snapshots use it for their own call).
    pub(crate) fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Queues a message in order and returns where its reply will arrive. Waits for queue space.
    pub(crate) async fn send(&self, group: GroupId, kind: RaftKind, stream: u64, body: Bytes) -> oneshot::Receiver<CallResult> {
        let (reply, rx) = oneshot::channel();
        let msg = Outgoing { group, kind, stream, body, reply };
        if let Err(mpsc::error::SendError(msg)) = self.tx.send(msg).await {
            let _ = msg.reply.send(Err(CallError::Unreachable(self.target, "connection task stopped".into())));
        }
        rx
    }

    /// Sends a message and waits for its reply.
    pub(crate) async fn call(&self, group: GroupId, kind: RaftKind, body: Bytes) -> CallResult {
        let rx = self.send(group, kind, 0, body).await;
        rx.await.unwrap_or_else(|_| Err(CallError::Unreachable(self.target, "connection closed".into())))
    }
}

async fn run(from: NodeId, target: NodeId, channel: Channel, mut rx: mpsc::Receiver<Outgoing>) {
    let mut next_id: u64 = 1;
    let mut backoff = Duration::from_millis(50);
    let mut carry: Option<Outgoing> = None;
    loop {
        // Connect only when there is something to send: an idle peer costs nothing.
        let first = match carry.take() {
            Some(m) => m,
            None => match rx.recv().await {
                Some(m) => m,
                None => return,
            },
        };
        let mut client = RaftTransportClient::new(channel.clone())
            .max_decoding_message_size(basalt_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(basalt_proto::MAX_MESSAGE_BYTES);
        let (frame_tx, frame_rx) = mpsc::channel::<RaftFrame>(64);
        let mut pending: HashMap<u64, oneshot::Sender<CallResult>> = HashMap::new();
        let frame = build_frame(from, first, &mut rx, &mut pending, &mut next_id);
        let _ = frame_tx.send(frame).await;
        let mut responses = match client.pipe(ReceiverStream::new(frame_rx)).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                let reason = format!("cannot open raft pipe: {}", status.message());
                fail_all(&mut pending, target, &reason);
                // Fail what queued meanwhile too, so callers back off instead of waiting.
                while let Ok(m) = rx.try_recv() {
                    let _ = m.reply.send(Err(CallError::Unreachable(target, reason.clone())));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let reason = loop {
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { return };
                    let frame = build_frame(0, msg, &mut rx, &mut pending, &mut next_id);
                    if frame_tx.send(frame).await.is_err() {
                        break "connection closed".to_string();
                    }
                }
                frame = responses.message() => match frame {
                    Ok(Some(frame)) => {
                        for m in frame.messages {
                            if let Some(reply) = pending.remove(&m.id) {
                                let result = if m.kind == RaftKind::Error as i32 {
                                    Err(CallError::Remote(target, String::from_utf8_lossy(&m.body).into_owned()))
                                } else {
                                    Ok(m.body)
                                };
                                let _ = reply.send(result);
                            }
                        }
                    }
                    Ok(None) => break "peer closed the raft pipe".to_string(),
                    Err(status) => break format!("raft pipe failed: {}", status.message()),
                },
            }
        };
        tracing::debug!(target_node = target, %reason, "raft pipe lost; reconnecting on next message");
        fail_all(&mut pending, target, &reason);
    }
}

fn build_frame(
    from: NodeId,
    first: Outgoing,
    rx: &mut mpsc::Receiver<Outgoing>,
    pending: &mut HashMap<u64, oneshot::Sender<CallResult>>,
    next_id: &mut u64,
) -> RaftFrame {
    let mut messages = Vec::new();
    let mut bytes = 0;
    let mut next = Some(first);
    while let Some(m) = next.take() {
        let id = *next_id;
        *next_id += 1;
        bytes += m.body.len();
        pending.insert(id, m.reply);
        messages.push(RaftMessage { id, group: m.group, kind: m.kind as i32, stream: m.stream, body: m.body });
        if messages.len() < FRAME_MESSAGES && bytes < FRAME_BYTES {
            next = rx.try_recv().ok();
        }
    }
    RaftFrame { from_node: from, messages }
}

fn fail_all(pending: &mut HashMap<u64, oneshot::Sender<CallResult>>, target: NodeId, reason: &str) {
    for (_, reply) in pending.drain() {
        let _ = reply.send(Err(CallError::Unreachable(target, reason.to_string())));
    }
}
