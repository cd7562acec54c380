//! Background workers that keep the node's promises about data at rest.
//!
//! - [`overwrite`]: freed space is overwritten before the allocator hands it out again.
//! - [`integrity`]: stored blocks are read back and checked at a bounded rate (this node's
//!   copies against their crc32c, and, on PG leaders, all replicas against each other), and
//!   whatever is bad is repaired through the placement group.

pub mod integrity;
pub mod overwrite;

pub use integrity::{ChunkVerdict, IntegrityConfig, IntegrityControl, IntegrityScrubber, IntegrityStats, PassKind, StartOutcome, Verifier};
pub use overwrite::{ScrubStats, Scrubber};
