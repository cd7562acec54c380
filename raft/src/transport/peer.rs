//! One outgoing connection to a peer node, shared by every group that talks to it.
//!
//! Messages from all groups queue on one bounded channel; a task drains the queue into frames
//! (many messages per frame, so a burst of heartbeats for a hundred groups is one write) over a
//! single long-lived mutual-TLS connection ([`super::frame`]) that verifies the peer is the node
//! it should be, and a reader task matches replies to
//! callers by id. The connection is opened on first use and re-opened after failures with
//! backoff; callers see failures as `Unreachable` and let openraft back off.
//!
//! A connection whose peer stops answering is given up after [`STALL_TIMEOUT`] (a frozen
//! process still ACKs at the TCP level), and TCP keepalive finds a peer that vanished.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use basalt_proto::raft::{RaftFrame, RaftKind, RaftMessage};
use basalt_security::{ClientStream, Dialer, Expect, Protocol};
use bytes::Bytes;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter, ReadHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::frame::{self, MAGIC};
use super::space::SpaceBook;
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

/// Payload bytes after which a frame takes no more messages.
const FRAME_BYTES: usize = 8 << 20;

/// Time allowed to open a connection to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection with calls outstanding and nothing received for this long is given up: the
/// peer is frozen or cut off. Healthy peers answer heartbeats every few hundred milliseconds.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Calls awaiting replies on the current connection.
struct Inflight {
    calls: HashMap<u64, oneshot::Sender<CallResult>>,
    /// Last reply received, or when calls became outstanding after none were.
    last_progress: Instant,
}

type Pending = Arc<Mutex<Inflight>>;

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
    pub(crate) fn new(from: NodeId, target: NodeId, addr: &str, queue: usize, space: Arc<SpaceBook>, dialer: Dialer) -> Result<Self, CallError> {
        let dialer = dialer.with_connect_timeout(CONNECT_TIMEOUT);
        // Snapshots keep a gRPC streaming call of their own (flow control suits bulk transfer).
        let channel = basalt_security::grpc::channel(addr, &dialer, Expect::Node(target), |ep| {
            ep.connect_timeout(CONNECT_TIMEOUT)
                .keep_alive_timeout(Duration::from_secs(20))
                .initial_stream_window_size(Some(8 << 20))
                .initial_connection_window_size(Some(32 << 20))
        })
        .map_err(|e| CallError::Unreachable(target, e))?;
        let (tx, rx) = mpsc::channel(queue);
        let task = tokio::spawn(run(from, target, addr.to_string(), rx, space, dialer));
        Ok(Self { target, addr: addr.to_string(), tx, channel, task })
    }

    /// An HTTP/2 channel to the peer, for snapshot transfers.
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

async fn run(from: NodeId, target: NodeId, addr: String, mut rx: mpsc::Receiver<Outgoing>, space: Arc<SpaceBook>, dialer: Dialer) {
    let mut next_id: u64 = 1;
    let mut backoff = Duration::from_millis(50);
    loop {
        // Connect only when there is something to send: an idle peer costs nothing.
        let Some(first) = rx.recv().await else { return };
        let stream = match connect(&dialer, target, &addr).await {
            Ok(s) => s,
            Err(e) => {
                let reason = format!("cannot open raft connection to {addr}: {e}");
                let _ = first.reply.send(Err(CallError::Unreachable(target, reason.clone())));
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
        let (rd, wr) = tokio::io::split(stream);
        let mut wr = BufWriter::with_capacity(256 * 1024, wr);
        // Replies are matched by a task of their own, so a peer slow to take our requests
        // never keeps us from taking its replies.
        let pending: Pending = Arc::new(Mutex::new(Inflight { calls: HashMap::new(), last_progress: Instant::now() }));
        let mut reader = tokio::spawn(read_replies(target, BufReader::with_capacity(256 * 1024, rd), pending.clone(), space.clone()));
        let mut watchdog = tokio::time::interval(Duration::from_secs(1));
        let mut next = Some(first);
        let reason = loop {
            let msg = match next.take() {
                Some(m) => m,
                None => tokio::select! {
                    msg = rx.recv() => match msg {
                        Some(m) => m,
                        None => {
                            reader.abort();
                            return;
                        }
                    },
                    r = &mut reader => break r.unwrap_or_else(|e| format!("raft reply reader failed: {e}")),
                    _ = watchdog.tick() => {
                        let p = pending.lock().unwrap_or_else(|p| p.into_inner());
                        if !p.calls.is_empty() && p.last_progress.elapsed() > STALL_TIMEOUT {
                            reader.abort();
                            break format!("no reply from node-{target} for {STALL_TIMEOUT:?}");
                        }
                        continue;
                    }
                },
            };
            if rx.is_empty() {
                // Let the tasks already runnable go first: groups whose ticks ended together
                // queue their heartbeats (and concurrent writes their appends) behind this one,
                // and all leave in one frame, one write and one wake-up of the peer. Without
                // it this task, woken by the first message, runs straight after its sender.
                tokio::task::yield_now().await;
            }
            let frame = build_frame(from, &space, msg, &mut rx, &pending, &mut next_id);
            let written = async {
                wr.write_all(&frame::encode(&frame)).await?;
                // Whatever queued meanwhile goes into the same flush (one syscall under load).
                if rx.is_empty() {
                    wr.flush().await?;
                }
                Ok::<(), std::io::Error>(())
            };
            if let Err(e) = written.await {
                reader.abort();
                break format!("raft connection to {addr} failed: {e}");
            }
        };
        tracing::debug!(target_node = target, %reason, "raft connection lost; reconnecting on next message");
        fail_all(&pending, target, &reason);
    }
}

/// Opens the connection to node `target` (TLS verifies it is that node) and says which
/// protocol version it speaks.
async fn connect(dialer: &Dialer, target: NodeId, addr: &str) -> std::io::Result<ClientStream> {
    let mut stream = dialer.connect(addr, Expect::Node(target), Protocol::Raft).await?;
    super::tune_socket(stream.tcp())?;
    stream.write_all(&MAGIC).await?;
    Ok(stream)
}

/// Hands each reply to its caller until the connection ends; returns why it ended.
async fn read_replies(target: NodeId, mut rd: BufReader<ReadHalf<ClientStream>>, pending: Pending, space: Arc<SpaceBook>) -> String {
    loop {
        match frame::read(&mut rd).await {
            Ok(Some(frame)) => {
                space.heard(target, &frame);
                let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
                p.last_progress = Instant::now();
                for m in frame.messages {
                    if let Some(reply) = p.calls.remove(&m.id) {
                        let result = if m.kind == RaftKind::Error as i32 {
                            Err(CallError::Remote(target, String::from_utf8_lossy(&m.body).into_owned()))
                        } else {
                            Ok(m.body)
                        };
                        let _ = reply.send(result);
                    }
                }
            }
            Ok(None) => return "peer closed the raft connection".to_string(),
            Err(e) => return format!("raft connection failed: {e}"),
        }
    }
}

/// Takes `first` and whatever else is queued (within the frame limits) into one frame,
/// registering each message's reply slot before the frame is written: a reply can arrive as
/// soon as it is.
fn build_frame(
    from: NodeId,
    space: &SpaceBook,
    first: Outgoing,
    rx: &mut mpsc::Receiver<Outgoing>,
    pending: &Pending,
    next_id: &mut u64,
) -> RaftFrame {
    let mut messages = Vec::new();
    let mut bytes = 0;
    let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
    if p.calls.is_empty() {
        p.last_progress = Instant::now();
    }
    let mut next = Some(first);
    while let Some(m) = next.take() {
        let id = *next_id;
        *next_id += 1;
        bytes += m.body.len();
        p.calls.insert(id, m.reply);
        messages.push(RaftMessage { id, group: m.group, kind: m.kind as i32, stream: m.stream, body: m.body });
        if messages.len() < frame::MAX_MESSAGES && bytes < FRAME_BYTES {
            next = rx.try_recv().ok();
        }
    }
    let mut frame = RaftFrame { from_node: from, space_left: None, state_space_left: None, messages };
    space.stamp(&mut frame);
    frame
}

fn fail_all(pending: &Pending, target: NodeId, reason: &str) {
    let failed: Vec<_> = pending.lock().unwrap_or_else(|p| p.into_inner()).calls.drain().map(|(_, r)| r).collect();
    for reply in failed {
        let _ = reply.send(Err(CallError::Unreachable(target, reason.to_string())));
    }
}
