//! The backup tier (docs/architecture.md, "Backups"): what a backup-role node keeps and how it
//! fills it.
//!
//! ```text
//!  copy:    snapshot ─► chunk versions per PG leader ─► unchanged since the node's previous
//!           backup of the volume? reuse its piece : read the chunk ─► store (dedup, LZ4,
//!           crc) ─► manifest (last, atomic)
//!  restore: manifest ─► pieces in chunk order (each checked) ─► writes into the new volume,
//!           progress checkpointed so a restarted restore goes on where it stopped
//! ```
//!
//! [`store`] is the on-disk store, [`format`] its versioned file formats, [`jobs`] the copy
//! and restore; the node's gRPC service and the catalog in the meta group drive them.

pub mod error;
pub mod format;
pub mod jobs;
pub mod store;

pub use error::{BackupError, Result};
pub use format::{Manifest, ManifestChunk, PieceId};
pub use jobs::{CopyOutcome, Progress};
pub use store::BackupStore;
