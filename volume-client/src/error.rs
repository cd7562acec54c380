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
    /// No valid credentials: no token, or an unknown, revoked or expired one.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Valid credentials that do not allow this (the role, a volume without a grant).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// No active volume has that name.
    #[error("no volume named {0:?}")]
    NoSuchVolume(String),
    /// The volume has no live snapshot of that name.
    #[error("volume {volume:?} has no snapshot named {snapshot:?}")]
    NoSuchSnapshot {
        /// Volume.
        volume: String,
        /// Snapshot.
        snapshot: String,
    },
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
    /// An encrypted volume's key or block could not be used (wrong KEK, corrupt wrapped key,
    /// a block that does not authenticate): never returned as data.
    #[error("encryption: {0}")]
    Crypt(String),
    /// Anything else the node reported.
    #[error("{0}")]
    Internal(String),
}

impl From<crate::crypt::CryptError> for ClientError {
    fn from(e: crate::crypt::CryptError) -> Self {
        ClientError::Crypt(e.to_string())
    }
}

impl ClientError {
    /// The errno an NBD server would report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            ClientError::OutOfRange { .. } | ClientError::Invalid(_) => libc_einval(),
            ClientError::NoSpace(_) => 28,
            ClientError::Unauthenticated(_) | ClientError::PermissionDenied(_) => 1,
            _ => 5,
        }
    }

    /// An admin call's refusal, keeping credential problems apart.
    pub fn from_status(s: &tonic::Status) -> ClientError {
        match s.code() {
            tonic::Code::Unauthenticated => ClientError::Unauthenticated(s.message().to_string()),
            tonic::Code::PermissionDenied => ClientError::PermissionDenied(s.message().to_string()),
            _ => ClientError::Admin(s.message().to_string()),
        }
    }
}

const fn libc_einval() -> i32 {
    22
}
