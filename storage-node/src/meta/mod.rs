//! The meta group: cluster metadata replicated on the meta-role nodes.
//!
//! - [`state`][]: the metadata and its commands (pure); [`snapshots`][] and [`clones`][] its
//!   snapshot and clone parts.
//! - [`placement`][]: which nodes hold each PG (pure).
//! - [`state_machine`][]: the Raft state machine around [`state::ClusterState`].
//! - [`service`][]: the admin gRPC API, forwarding to the meta leader.
//! - [`liveness`][]: the meta leader's view of which nodes are up.
//! - [`healer`][]: re-places replicas of dead and draining nodes, rebalances onto new ones.
//! - [`leaders`][]: evens out how many PGs each node leads.
//! - [`membership`][]: replaces a lost meta node by a spare meta-role node.
//! - [`audit_log`][]: this meta node's copy of the audit log.
//! - [`key_store`][]: this meta node's copies of encrypted volumes' wrapped keys, erasable.
//! - [`keys`][]: those keys across the meta nodes (stored on a majority, fetched, healed).

pub mod audit_log;
pub mod backup_admin;
pub mod backups;
pub mod clones;
#[cfg(test)]
mod fixtures;
pub mod healer;
pub mod key_store;
pub mod keys;
pub mod leaders;
pub mod liveness;
pub mod membership;
pub mod placement;
pub mod service;
pub mod snapshots;
pub mod state;
pub mod state_machine;
