//! The raft crate's error type.

use thiserror::Error;

use crate::types::{GroupId, NodeId};

/// Errors surfaced by Basalt's Raft layer.
#[derive(Debug, Error)]
pub enum RaftError {
    /// This node is not the group's leader.
    #[error("group {group}: not the leader (leader is {})", leader.map(|l| format!("node-{l}")).unwrap_or_else(|| "unknown".into()))]
    NotLeader {
        /// The group.
        group: GroupId,
        /// The leader, if known.
        leader: Option<NodeId>,
        /// The leader's address, if known.
        leader_addr: Option<String>,
    },
    /// The group could not reach a quorum in time.
    #[error("group {group}: {reason}")]
    Unavailable {
        /// The group.
        group: GroupId,
        /// Why.
        reason: String,
    },
    /// The group stopped (shutdown or a storage failure).
    #[error("group {group} stopped: {reason}")]
    Stopped {
        /// The group.
        group: GroupId,
        /// Why.
        reason: String,
    },
    /// The log store failed.
    #[error("raft log store at {path}: {reason}")]
    Storage {
        /// The store's directory.
        path: String,
        /// What failed.
        reason: String,
    },
    /// Persisted Raft data could not be decoded.
    #[error("corrupt raft data: {0}")]
    Corrupt(String),
    /// A membership change was refused.
    #[error("group {group}: membership change refused: {reason}")]
    Membership {
        /// The group.
        group: GroupId,
        /// Why.
        reason: String,
    },
}
