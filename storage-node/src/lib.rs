//! The Basalt storage node.
//!
//! ```text
//!  port ──► listener: framed data protocol ──► pg::wire ──► pg::service
//!                     HTTP/2 ──► gRPC:
//!  gRPC ──► meta::service (admin API, forwards to the meta leader) ──► meta group (Raft) ──► meta::state
//!       ──► pg::service (data API) ──► pg::manager ──► PG groups (Raft) ──► pg::state_machine ──► chunk store
//!       ──► raft transport (peers)
//!       ──► backup_node (backup-role nodes: copies and restores, `basalt_backup` store)
//!  background: cluster_map watcher, agent (heartbeats), PG reconciler and checkpointer,
//!              volume reaper (meta leader), scrubber, /metrics
//! ```

pub mod access;
pub mod agent;
pub mod backup_node;
pub mod clients;
pub mod cluster_map;
pub mod config;
pub mod diagnostics;
pub mod listener;
pub mod meta;
pub mod metrics;
pub mod node;
pub mod pg;
pub mod qos;

pub use config::{ConfigError, Flags, NodeConfig};
pub use node::{Node, NodeError};
