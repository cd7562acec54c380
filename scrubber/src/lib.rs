//! Background workers that keep the node's promises about data at rest.
//!
//! - [`overwrite`][]: freed space is overwritten before the allocator hands it out again.
//! - [`integrity`][]: stored blocks are read back and checked at a bounded rate (this node's
//!   copies against their crc32c, and, on PG leaders, all replicas against each other), and
//!   whatever is bad is repaired through the placement group.

pub mod integrity;
pub mod overwrite;

pub use integrity::{ChunkVerdict, IntegrityConfig, IntegrityControl, IntegrityScrubber, IntegrityStats, PassKind, StartOutcome, Verifier};
pub use overwrite::{ScrubStats, Scrubber};

/// A small real chunk store for the unit tests of both workers.
#[cfg(test)]
mod test_store {
    use basalt_chunk_store::{ChunkStore, ChunkStoreConfig, IndexMemory};

    /// A 16 MiB store (O_DIRECT, io_uring) under `dir`, and its configuration.
    pub(crate) fn small(dir: &std::path::Path) -> (ChunkStore, ChunkStoreConfig) {
        let cfg = ChunkStoreConfig {
            data_path: dir.join("data"),
            index_dir: dir.join("index"),
            capacity: 16 << 20,
            direct_io: true,
            queue_depth: 16,
            index_memory: IndexMemory { cache_bytes: 4 << 20, write_buffer_bytes: 2 << 20 },
        };
        let store = ChunkStore::open(&cfg).expect("open a test chunk store");
        (store, cfg)
    }
}
