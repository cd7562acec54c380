//! The meta group: cluster metadata replicated on the meta-role nodes.
//!
//! - [`state`]: the metadata and its commands (pure).
//! - [`placement`]: which nodes hold each PG (pure).
//! - [`state_machine`]: the Raft state machine around [`state::ClusterState`].
//! - [`service`]: the admin gRPC API, forwarding to the meta leader.

pub mod liveness;
pub mod placement;
pub mod service;
pub mod state;
pub mod state_machine;
