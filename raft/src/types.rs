//! The one openraft type configuration every Basalt Raft group shares, and the few openraft
//! types the rest of Basalt sees through our own names.

use std::fmt;

use bytes::Bytes;
use openraft::type_config::alias::{EntryOf, LogIdOf, SnapshotMetaOf, StoredMembershipOf, VoteOf};
use serde::{Deserialize, Serialize};

use crate::error::RaftError;

/// A storage node, as Raft sees it.
pub type NodeId = u64;

/// A Raft group on a node: a placement group id, or [`META_GROUP`].
pub type GroupId = u32;

/// The meta group's id (placement groups count up from 0).
pub const META_GROUP: GroupId = u32::MAX;

/// How to reach a member of a group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The member's gRPC address (`host:port`).
    pub addr: String,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr)
    }
}

/// An application command carried in a log entry: opaque bytes the state machine decodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command(pub Bytes);

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "command({} bytes)", self.0.len())
    }
}

/// A state machine's reply to one command.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply(pub Bytes);

openraft::declare_raft_types!(
    /// Type configuration shared by the meta group and every placement group.
    pub TypeConfig:
        D = Command,
        R = Reply,
        NodeId = NodeId,
        Node = NodeInfo,
        AsyncRuntime = crate::runtime::BasaltRuntime,
);

pub(crate) type LogId = LogIdOf<TypeConfig>;
pub(crate) type Vote = VoteOf<TypeConfig>;
pub(crate) type Entry = EntryOf<TypeConfig>;
pub(crate) type SnapshotMeta = SnapshotMetaOf<TypeConfig>;
pub(crate) type StoredMembership = StoredMembershipOf<TypeConfig>;

/// Where a state machine stands: the last applied log position and the membership as of it.
/// State machines store it (opaque) beside their own state when they checkpoint, and hand it
/// back at startup; it doubles as the metadata of the snapshot that checkpoint produces.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub(crate) meta: SnapshotMeta,
}

impl CheckpointRecord {
    pub(crate) fn new(last_applied: Option<LogId>, membership: StoredMembership) -> Self {
        Self { meta: SnapshotMeta { last_log_id: last_applied, last_membership: membership } }
    }

    /// Index of the last applied entry (0 if none).
    pub fn applied_index(&self) -> u64 {
        self.meta.last_log_id.as_ref().map(|l| l.index).unwrap_or(0)
    }

    /// Voting members as of this record.
    pub fn voters(&self) -> Vec<NodeId> {
        self.meta.last_membership.membership().voter_ids().collect()
    }

    /// Serialises for storage.
    pub fn encode(&self) -> Vec<u8> {
        bincode::serialize(self).expect("checkpoint record serialises")
    }

    /// Parses what [`CheckpointRecord::encode`] produced.
    pub fn decode(bytes: &[u8]) -> Result<Self, RaftError> {
        bincode::deserialize(bytes).map_err(|e| RaftError::Corrupt(format!("checkpoint record: {e}")))
    }
}

/// One committed log entry handed to a state machine.
#[derive(Clone, Debug)]
pub struct ApplyItem {
    /// Log index.
    pub index: u64,
    /// The command, or `None` for entries Raft uses internally (blank, membership), which the
    /// state machine only has to count as applied.
    pub command: Option<Bytes>,
}
