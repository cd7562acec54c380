//! The volume client's error type.

use basalt_common::VolumeId;
use thiserror::Error;

/// What a volume operation can fail with. Messages name the volume, extent and node involved.
#[derive(Debug, Error, Clone)]
pub enum ClientError {
    /// No seed node answered.
    #[error("cannot reach the cluster at {seeds}: {reason}")]
    Unreachable {
        /// The addresses tried.
        seeds: String,
        /// The last error.
        reason: String,
    },
    /// The cluster refused an admin request.
    #[error("{0}")]
    Admin(String),
    /// No active volume has that name.
    #[error("no volume named {0:?}")]
    NoSuchVolume(String),
    /// The volume disappeared (deleted) while in use.
    #[error("volume {0} was deleted")]
    VolumeDeleted(VolumeId),
    /// The request lies (partly) outside the volume.
    #[error("{op} of {len} bytes at offset {offset} is outside volume {name:?} ({size} bytes)")]
    OutOfRange {
        /// read/write/trim.
        op: &'static str,
        /// Volume name.
        name: String,
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Volume size.
        size: u64,
    },
    /// A malformed request.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Data failed its checksum: stored data on the node, or data received by the client.
    #[error("I/O error: {0}")]
    Corrupt(String),
    /// A replica is out of space.
    #[error("no space: {0}")]
    NoSpace(String),
    /// This attachment was superseded (the volume was attached elsewhere or detached).
    #[error("fenced: {0}")]
    Fenced(String),
    /// The PG could not be reached in time (no leader, nodes down).
    #[error("{volume} extent {extent} ({pg}): unavailable after {attempts} attempts: {reason}")]
    Unavailable {
        /// Volume.
        volume: VolumeId,
        /// Extent index.
        extent: u64,
        /// PG.
        pg: String,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        reason: String,
    },
    /// Anything else the node reported.
    #[error("{0}")]
    Internal(String),
}

impl ClientError {
    /// The errno an NBD server would report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            ClientError::OutOfRange { .. } | ClientError::Invalid(_) => libc_einval(),
            ClientError::NoSpace(_) => 28,
            _ => 5,
        }
    }
}

const fn libc_einval() -> i32 {
    22
}
