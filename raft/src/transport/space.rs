//! How many bytes each node can still take, carried on every Raft frame.
//!
//! A PG leader must not accept a write that one of its followers cannot store: a committed entry
//! has to be applied everywhere, so a follower without room would have to stop applying. Every
//! frame (requests and replies alike) carries its sender's figure, so a leader knows its
//! followers' room about as freshly as their last heartbeat reply. This crate only carries the
//! number; the storage node sets it and decides what to refuse.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::types::NodeId;

/// "Not set": a node without a chunk store (meta-only) says nothing.
const UNSET: u64 = u64::MAX;

/// This node's figure and the latest heard from each peer.
#[derive(Debug)]
pub struct SpaceBook {
    local: AtomicU64,
    peers: Mutex<HashMap<NodeId, (u64, Instant)>>,
}

impl Default for SpaceBook {
    fn default() -> Self {
        Self { local: AtomicU64::new(UNSET), peers: Mutex::new(HashMap::new()) }
    }
}

impl SpaceBook {
    /// Sets the bytes this node can still allocate for new data (sent on every frame).
    pub fn set_local(&self, bytes: u64) {
        self.local.store(bytes.min(UNSET - 1), Ordering::Relaxed);
    }

    /// What this node sends: `None` until [`SpaceBook::set_local`] was called.
    pub(crate) fn local(&self) -> Option<u64> {
        Some(self.local.load(Ordering::Relaxed)).filter(|b| *b != UNSET)
    }

    /// Records a frame's figure from `node` (`None`: the frame carried none).
    pub(crate) fn heard(&self, node: NodeId, bytes: Option<u64>) {
        if let Some(bytes) = bytes {
            self.peers.lock().unwrap_or_else(|p| p.into_inner()).insert(node, (bytes, Instant::now()));
        }
    }

    /// The latest figure heard from `node`, if heard within `max_age`.
    pub fn peer(&self, node: NodeId, max_age: Duration) -> Option<u64> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.get(&node).filter(|(_, at)| at.elapsed() <= max_age).map(|(b, _)| *b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_stale_and_fresh_figures() {
        let book = SpaceBook::default();
        assert_eq!(book.local(), None);
        book.set_local(5 << 20);
        assert_eq!(book.local(), Some(5 << 20));
        book.heard(2, None);
        assert_eq!(book.peer(2, Duration::from_secs(5)), None);
        book.heard(2, Some(7));
        assert_eq!(book.peer(2, Duration::from_secs(5)), Some(7));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(book.peer(2, Duration::from_millis(10)), None, "a stale figure is not used");
    }
}
