//! Basalt's wire protocol, generated from `proto/*.proto` by tonic.
//!
//! - [`raft`][]: node-to-node Raft transport (one pipe per node pair, batched frames).
//! - [`admin`][]: the admin API (cluster, nodes, volumes, cluster map) every node serves.
//! - [`data`][]: block I/O from volume clients to placement-group leaders.
//! - [`wire`][]: the same block-I/O messages framed directly on TCP (the fast path).

#![allow(missing_docs, clippy::all)]

/// Raft transport.
pub mod raft {
    tonic::include_proto!("basalt.raft.v1");
}

/// Admin API.
pub mod admin {
    tonic::include_proto!("basalt.admin.v1");
}

/// Block I/O.
pub mod data {
    tonic::include_proto!("basalt.data.v1");
}

/// Largest gRPC message any Basalt service accepts or sends: a 64 MiB I/O plus framing.
pub const MAX_MESSAGE_BYTES: usize = 80 * 1024 * 1024;

/// Start of the message of a heartbeat refused because the node and the cluster share no
/// cluster version (`basalt_common::version`): a node told this stops rather than run.
pub const VERSION_REFUSED: &str = "refused by cluster version: ";

/// The cluster versions a heartbeat's node speaks: builds from before versions sent none and
/// speak version 1 only.
pub fn node_versions(n: &admin::Node) -> Result<basalt_common::version::VersionRange, String> {
    match (n.version_min, n.version_max) {
        (0, 0) => Ok(basalt_common::version::VersionRange { min: 1, max: 1 }),
        (min, max) if min >= 1 && min <= max => Ok(basalt_common::version::VersionRange { min, max }),
        (min, max) => Err(format!("node-{} sent cluster versions {min}..={max}, not a range", n.id)),
    }
}

pub mod view;
pub mod wire;
