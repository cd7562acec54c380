//! Placement groups: the data path on a storage node.
//!
//! - [`command`][]: what a PG's log carries.
//! - [`state_machine`][]: applies it to the chunk store; checkpoints.
//! - [`snapshot`][]: streams a PG to a new replica.
//! - [`repair`][]: compares a chunk's replicas and repairs bad copies (integrity scrub).
//! - [`verifier`][]: the integrity scrub's passes over this node's chunks.
//! - [`pacer`][]: the node's byte budget for filling new replicas.
//! - [`space`][]: refuses writes a replica of the PG could not store.
//! - [`membership`][]: moves a replica to another node (on the PG's leader).
//! - [`manager`][]: starts the PGs the cluster map places here, retires those it moved away.
//! - [`service`][]: the data API clients write and read through (gRPC face included).
//! - [`sessions`][]: the newest data connection of each client, so a write given up on cannot
//!   land after its retry.
//! - [`wire`][]: the same API over the framed protocol of [`basalt_proto::wire`].

pub mod command;
pub mod manager;
pub mod membership;
pub mod pacer;
pub mod repair;
pub mod service;
pub mod sessions;
pub mod snapshot;
pub mod space;
pub mod state_machine;
pub mod verifier;
pub mod wire;
