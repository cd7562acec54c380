//! Types every Basalt crate shares.
//!
//! Kept deliberately small and free of I/O: identifiers, the block/extent/chunk geometry,
//! size parsing, name validation, failure-domain labels, and the 4 KiB-aligned buffer both
//! O_DIRECT writers (the chunk store and the Raft log) use. Anything that needs a runtime lives
//! in the crate that owns it.

pub mod aligned;
pub mod block;
pub mod ids;
pub mod labels;
pub mod layout;
pub mod names;
pub mod ports;
pub mod qos;
pub mod units;
pub mod version;

pub use block::{BLOCK_SIZE, CHUNK_SIZE, CryptContext, ZERO_BLOCK_CRC, crc32c};
pub use ids::{ChunkIndex, ExtentIndex, NodeId, PgId, VolumeId};
pub use labels::{DomainLevel, Labels};
pub use layout::Layout;
