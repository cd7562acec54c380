//! How many bytes each node can still take, carried on every Raft frame.
//!
//! A PG leader must not accept a write that one of its followers cannot store: a committed entry
//! has to be applied everywhere, so a follower without room would have to stop applying. Every
//! frame (requests and replies alike) carries its sender's two figures, so a leader knows its
//! followers' room about as freshly as their last heartbeat reply:
//! - chunk space: bytes of new chunks the node can still allocate;
//! - state space: bytes its state directory's filesystem (the Raft log, the chunk index) can
//!   still take beyond a reserve. Every write passes through the Raft log, so this one bounds
//!   overwrites too.
//!
//! This crate only carries the numbers; the storage node sets them and decides what to refuse.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use basalt_proto::raft::RaftFrame;

use crate::types::NodeId;

/// "Not set": a node without a chunk store (meta-only) says nothing.
const UNSET: u64 = u64::MAX;

/// A peer's figures as last heard.
#[derive(Clone, Copy, Debug)]
struct Heard {
    chunks: Option<u64>,
    state: Option<u64>,
    at: Instant,
}

/// This node's figures and the latest heard from each peer.
#[derive(Debug)]
pub struct SpaceBook {
    local_chunks: AtomicU64,
    local_state: AtomicU64,
    peers: Mutex<HashMap<NodeId, Heard>>,
}

impl Default for SpaceBook {
    fn default() -> Self {
        Self { local_chunks: AtomicU64::new(UNSET), local_state: AtomicU64::new(UNSET), peers: Mutex::new(HashMap::new()) }
    }
}

fn figure(cell: &AtomicU64) -> Option<u64> {
    Some(cell.load(Ordering::Relaxed)).filter(|b| *b != UNSET)
}

impl SpaceBook {
    /// Sets the bytes of new chunks this node can still allocate (sent on every frame).
    pub fn set_local(&self, bytes: u64) {
        self.local_chunks.store(bytes.min(UNSET - 1), Ordering::Relaxed);
    }

    /// Sets the bytes this node's state directory can still take beyond its reserve (sent on
    /// every frame).
    pub fn set_local_state(&self, bytes: u64) {
        self.local_state.store(bytes.min(UNSET - 1), Ordering::Relaxed);
    }

    /// This node's chunk figure: `None` until [`SpaceBook::set_local`] was called.
    pub fn local(&self) -> Option<u64> {
        figure(&self.local_chunks)
    }

    /// This node's state figure: `None` until [`SpaceBook::set_local_state`] was called.
    pub fn local_state(&self) -> Option<u64> {
        figure(&self.local_state)
    }

    /// Writes this node's figures into an outgoing frame.
    pub(crate) fn stamp(&self, frame: &mut RaftFrame) {
        frame.space_left = self.local();
        frame.state_space_left = self.local_state();
    }

    /// Records the figures a frame from `node` carried (frames of nodes without a chunk store,
    /// or of older versions, carry none; an absent figure forgets nothing already heard).
    pub(crate) fn heard(&self, node: NodeId, frame: &RaftFrame) {
        if frame.space_left.is_none() && frame.state_space_left.is_none() {
            return;
        }
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let entry = peers.entry(node).or_insert(Heard { chunks: None, state: None, at: Instant::now() });
        entry.chunks = frame.space_left.or(entry.chunks);
        entry.state = frame.state_space_left.or(entry.state);
        entry.at = Instant::now();
    }

    fn peer_figure(&self, node: NodeId, max_age: Duration, pick: impl Fn(&Heard) -> Option<u64>) -> Option<u64> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.get(&node).filter(|h| h.at.elapsed() <= max_age).and_then(pick)
    }

    /// The latest chunk figure heard from `node`, if heard within `max_age`.
    pub fn peer(&self, node: NodeId, max_age: Duration) -> Option<u64> {
        self.peer_figure(node, max_age, |h| h.chunks)
    }

    /// The latest state figure heard from `node`, if heard within `max_age`.
    pub fn peer_state(&self, node: NodeId, max_age: Duration) -> Option<u64> {
        self.peer_figure(node, max_age, |h| h.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(chunks: Option<u64>, state: Option<u64>) -> RaftFrame {
        RaftFrame { from_node: 2, messages: vec![], space_left: chunks, state_space_left: state }
    }

    #[test]
    fn unset_stale_and_fresh_figures() {
        let book = SpaceBook::default();
        assert_eq!(book.local(), None);
        assert_eq!(book.local_state(), None);
        book.set_local(5 << 20);
        book.set_local_state(9 << 20);
        let mut out = frame(None, None);
        book.stamp(&mut out);
        assert_eq!((out.space_left, out.state_space_left), (Some(5 << 20), Some(9 << 20)));
        book.heard(2, &frame(None, None));
        assert_eq!(book.peer(2, Duration::from_secs(5)), None);
        book.heard(2, &frame(Some(7), Some(11)));
        assert_eq!(book.peer(2, Duration::from_secs(5)), Some(7));
        assert_eq!(book.peer_state(2, Duration::from_secs(5)), Some(11));
        book.heard(2, &frame(Some(8), None));
        assert_eq!(book.peer_state(2, Duration::from_secs(5)), Some(11), "a frame without a state figure keeps the last one");
        assert_eq!(book.peer(2, Duration::from_secs(5)), Some(8));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(book.peer(2, Duration::from_millis(10)), None, "a stale figure is not used");
        assert_eq!(book.peer_state(2, Duration::from_millis(10)), None, "a stale figure is not used");
    }
}
