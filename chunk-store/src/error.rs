//! The chunk store's error type.

use std::io;
use std::path::PathBuf;

use basalt_common::VolumeId;
use thiserror::Error;

/// Everything that can go wrong in the chunk store. Each variant names what it concerns
/// (file, volume, chunk, block) so the message is useful on its own in a log line.
#[derive(Debug, Error)]
pub enum ChunkStoreError {
    /// An I/O error on the data file.
    #[error("I/O error on data file {path}: {source}")]
    Io {
        /// The data file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An error from the RocksDB index.
    #[error("chunk index error in {path}: {source}")]
    Index {
        /// The index directory.
        path: PathBuf,
        /// The RocksDB error.
        #[source]
        source: rocksdb::Error,
    },
    /// A stored block does not match its checksum: bit rot or a torn write.
    #[error("checksum mismatch reading {volume} chunk {chunk} block {block} (stored crc {stored:#010x}, data crc {actual:#010x})")]
    Corrupt {
        /// Volume the block belongs to.
        volume: VolumeId,
        /// Chunk index within the volume.
        chunk: u64,
        /// Block index within the chunk.
        block: u64,
        /// The crc recorded when the block was written.
        stored: u32,
        /// The crc of what was read.
        actual: u32,
    },
    /// Data handed to the store does not match the checksum that came with it.
    #[error("checksum mismatch in data for {volume} at offset {offset}: expected {expected:#010x}, got {actual:#010x}")]
    BadChecksum {
        /// Volume being written.
        volume: VolumeId,
        /// Byte offset of the block in the volume.
        offset: u64,
        /// The crc sent with the data.
        expected: u32,
        /// The crc of the data.
        actual: u32,
    },
    /// Every chunk slot is in use or waiting to be scrubbed.
    #[error("no free space: all {slots} chunk slots of {path} are in use or waiting to be overwritten")]
    NoSpace {
        /// The data file.
        path: PathBuf,
        /// Total slots.
        slots: u64,
    },
    /// A request the store cannot serve (misaligned, too long, inconsistent arguments).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The data file or index is not a Basalt chunk store, or belongs to another one.
    #[error("{path}: {reason}")]
    BadFormat {
        /// The file or directory at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A record in the index could not be decoded.
    #[error("corrupt index record {key}: {reason}")]
    CorruptRecord {
        /// Hex of the key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// An earlier I/O failure left memory and disk out of step; the store refuses further
    /// writes until the node restarts and recovers from its index and Raft log.
    #[error("chunk store stopped after an earlier failure ({0}); restart the node to recover")]
    Failed(String),
}

/// Result alias.
pub type Result<T, E = ChunkStoreError> = std::result::Result<T, E>;

impl ChunkStoreError {
    /// True when the error is bad data at rest (a checksum mismatch), which a replica can repair.
    pub fn is_corruption(&self) -> bool {
        matches!(self, Self::Corrupt { .. })
    }
}
