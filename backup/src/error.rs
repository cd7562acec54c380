//! The backup tier's errors, naming the backup, piece or file involved.

use std::path::PathBuf;

use thiserror::Error;

/// What a backup-store operation or job can fail with.
#[derive(Debug, Error)]
pub enum BackupError {
    /// A file of the store could not be used.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A piece is missing or damaged.
    #[error("backup piece {piece} is unreadable: {why}")]
    Piece {
        /// The piece (hex SHA-256 of its bytes).
        piece: String,
        /// What is wrong.
        why: String,
    },
    /// A manifest is damaged or of an unknown format.
    #[error("backup manifest {path}: {why}")]
    Manifest {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// This node holds no whole copy of the backup.
    #[error("this node holds no copy of backup {0}")]
    NoCopy(u64),
    /// Reading from or writing to the cluster failed.
    #[error("volume {volume}: {source}")]
    Cluster {
        /// The volume.
        volume: String,
        /// The client's error.
        #[source]
        source: basalt_volume_client::ClientError,
    },
    /// The snapshot is not the one the backup was asked for.
    #[error("{0}")]
    Changed(String),
    /// A blocking task died.
    #[error("backup store task failed: {0}")]
    Task(String),
}

/// Results of the backup tier.
pub type Result<T> = std::result::Result<T, BackupError>;
