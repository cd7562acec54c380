//! A storage node's block store.
//!
//! Placement groups keep their data here. The store knows nothing of Raft: it maps
//! `(shard, volume, chunk)` to 1 MiB slots of one data file, stores 4 KiB blocks with a crc32c
//! each (checked on write and on every read), and queues freed slots for overwriting before
//! they can hold anyone else's data.
//!
//! - [`uring`][]: the dedicated io_uring thread all data I/O goes through (O_DIRECT).
//! - [`data_file`][]: the superblock and slot geometry of the data file or raw device.
//! - [`index`][]: the RocksDB index of chunks, per-block metadata, scrub queue and shard state.
//! - [`store`][]: the operations ([`ChunkStore`]).
//! - [`image`][]: the chunk images a PG streams to a new replica.
//! - [`versions`][]: a chunk's versions across snapshot epochs (the copy-on-write rules the
//!   store follows).

/// O_DIRECT buffers (in `basalt-common`, shared with the Raft log).
pub use basalt_common::aligned;
pub mod data_file;
pub mod error;
pub mod image;
pub mod index;
pub mod store;
pub mod uring;
pub mod versions;

pub use error::{ChunkStoreError, Result};
pub use image::ChunkImage;
pub use index::{BlockMeta, ChunkKey, CryptContext, FORMAT_VERSION, FreeReason, FreeRecord, IndexMemory};
pub use store::{
    Batch, BlockCheck, BlockRead, ChunkCheck, ChunkStore, ChunkStoreConfig, FillPattern, Lineage, MAX_IO_BYTES, Scrubbed, SnapshotUsage, StoreStats,
};
pub use versions::Epoch;
