//! Basalt's Raft layer: openraft behind Basalt's own API.
//!
//! The rest of Basalt sees [`RaftHost`] (one per node), [`RaftGroup`] (one per hosted group)
//! and the [`StateMachine`] contract; openraft's types stay inside this crate, so a version
//! bump touches only it.
//!
//! ```text
//!  propose ──► RaftGroup ──► openraft core ──► GroupLogStore ──► writer thread ─► WAL segments (1 write + 1 sync / batch, all groups)
//!                                   │                                              
//!                                   ├──► GroupNetwork ──► Router/Peer ══ one TCP connection per node pair ══► TransportService ──► peer's group
//!                                   └──► SmAdapter ──► StateMachine::apply / checkpoint / install
//! ```
//!
//! - [`log_store`][]: the log store shared by all groups, with group commit, over [`wal`].
//! - [`transport`][]: batched multi-raft transport, pipelined appends, streamed snapshots.
//! - [`state_machine`][]: the [`StateMachine`] trait and its openraft adapter.
//! - [`group`][]: [`RaftGroup`].
//! - [`host`][]: [`RaftHost`] and [`RaftTuning`].
//! - [`wal`][]: write-ahead segments: the log's on-disk format.
//! - [`log_store::memory`][]: the in-memory log engine (same contract, simulated syncs).
//! - [`runtime`][]: tokio as openraft's runtime, with election timeouts that can be seeded.
//! - `sim` (feature `sim`, on in this crate's tests): the deterministic simulation of a
//!   group's three replicas under faults, with a history checker.

pub mod error;
pub mod group;
pub mod host;
pub mod log_store;
pub mod runtime;
#[cfg(feature = "sim")]
pub mod sim;
pub mod state_machine;
pub mod transport;
pub mod types;
pub mod wal;

pub use error::RaftError;
pub use group::{GroupStatus, LogProgress, RaftGroup};
pub use host::{RaftHost, RaftTuning};
pub use log_store::{LogEngine, LogEngineConfig, RaftLogEngine, SmStore};
pub use state_machine::{Checkpoint, SnapshotReceiver, SnapshotSink, SnapshotStream, StateMachine};
pub use transport::Router;
pub use types::{ApplyItem, CheckpointRecord, GroupId, META_GROUP, NodeId, NodeInfo};
