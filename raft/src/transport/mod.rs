//! Multi-raft transport: every group on a node shares one connection per peer node.
//!
//! - [`frame`][]: the framing of a Raft connection (mutual TLS, one per node pair).
//! - [`peer`][]: one outgoing connection, batching all groups' messages into frames.
//! - [`network`][]: openraft's per-(group, target) network, routed through the shared peers;
//!   pipelined appends and streamed snapshots.
//! - [`server`][]: incoming connections dispatched to the groups hosted here, and the gRPC
//!   service that receives snapshots.
//! - [`space`][]: each node's free space, carried on every frame.

pub mod frame;
pub(crate) mod network;
pub(crate) mod peer;
pub(crate) mod server;
pub mod space;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use server::TransportService;
pub use space::SpaceBook;

use basalt_security::Dialer;

use crate::types::NodeId;
use peer::{CallError, Peer};

/// No delayed ACKs for small messages (votes, acks), and keepalive probes so a peer that
/// vanished without a word (a cut cable, a partition) is noticed in ~11 s.
pub fn tune_socket(stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let keepalive =
        socket2::TcpKeepalive::new().with_time(std::time::Duration::from_secs(5)).with_interval(std::time::Duration::from_secs(2)).with_retries(3);
    socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)
}

/// Outgoing connections of this node, one per peer, shared by all groups.
#[derive(Clone)]
pub struct Router {
    inner: Arc<RouterInner>,
}

struct RouterInner {
    node_id: NodeId,
    queue: usize,
    space: Arc<SpaceBook>,
    dialer: Dialer,
    peers: Mutex<HashMap<NodeId, Arc<Peer>>>,
    addresses: Mutex<HashMap<NodeId, String>>,
}

impl Router {
    /// A router for node `node_id`; `queue` bounds the messages waiting per peer. Frames
    /// carry this node's figure from `space` and record the peers' in it. Connections are
    /// opened by `dialer` (mutual TLS with this node's certificate).
    pub fn new(node_id: NodeId, queue: usize, space: Arc<SpaceBook>, dialer: Dialer) -> Self {
        Self {
            inner: Arc::new(RouterInner { node_id, queue, space, dialer, peers: Mutex::new(HashMap::new()), addresses: Mutex::new(HashMap::new()) }),
        }
    }

    /// This node.
    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// Records where `node` listens (from the cluster map); overrides addresses remembered in
    /// Raft memberships, so a node that moved is found at its new address.
    pub fn set_address(&self, node: NodeId, addr: &str) {
        self.inner.addresses.lock().unwrap_or_else(|p| p.into_inner()).insert(node, addr.to_string());
    }

    pub(crate) fn peer(&self, target: NodeId, fallback_addr: &str) -> Result<Arc<Peer>, CallError> {
        let addr = self.inner.addresses.lock().unwrap_or_else(|p| p.into_inner()).get(&target).cloned().unwrap_or_else(|| fallback_addr.to_string());
        let mut peers = self.inner.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = peers.get(&target)
            && p.addr == addr
        {
            return Ok(p.clone());
        }
        let peer = Arc::new(Peer::new(self.inner.node_id, target, &addr, self.inner.queue, self.inner.space.clone(), self.inner.dialer.clone())?);
        peers.insert(target, peer.clone());
        Ok(peer)
    }
}
