//! virtio-blk constants and the device configuration space (virtio 1.2, §5.2 "Block Device").
//! Values come from `virtio-bindings` (the Linux UAPI headers); the configuration layout is
//! written out here so its byte offsets can be read against §5.2.4.

use virtio_bindings::virtio_blk as blk;

/// The unit of `sector` fields, whatever the advertised block size (§5.2.6).
pub const SECTOR: u64 = 512;
/// Size of the request header every chain starts with: type, reserved, sector (§5.2.6).
pub const HEADER_LEN: usize = 16;
/// Bytes of a `virtio_blk_get_id` answer (§5.2.6: "20 bytes").
pub const ID_LEN: usize = 20;
/// Size of one `virtio_blk_discard_write_zeroes` segment (§5.2.6).
pub const RANGE_LEN: usize = 16;

/// Request types (§5.2.6).
pub const T_IN: u32 = blk::VIRTIO_BLK_T_IN;
/// Write.
pub const T_OUT: u32 = blk::VIRTIO_BLK_T_OUT;
/// Flush.
pub const T_FLUSH: u32 = blk::VIRTIO_BLK_T_FLUSH;
/// Device id string.
pub const T_GET_ID: u32 = blk::VIRTIO_BLK_T_GET_ID;
/// Discard.
pub const T_DISCARD: u32 = blk::VIRTIO_BLK_T_DISCARD;
/// Write zeroes.
pub const T_WRITE_ZEROES: u32 = blk::VIRTIO_BLK_T_WRITE_ZEROES;

/// Request status: done (§5.2.6).
pub const S_OK: u8 = blk::VIRTIO_BLK_S_OK as u8;
/// Request status: failed.
pub const S_IOERR: u8 = blk::VIRTIO_BLK_S_IOERR as u8;
/// Request status: not supported.
pub const S_UNSUPP: u8 = blk::VIRTIO_BLK_S_UNSUPP as u8;

/// The only flag of a write-zeroes segment: the range may be deallocated (§5.2.6).
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding: 60 bytes
/// (§5.2.4). Fields past it (secure erase, zoned) belong to features this device does not offer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment (VIRTIO_BLK_F_SIZE_MAX).
    pub size_max: u32,
    /// Most segments per request (VIRTIO_BLK_F_SEG_MAX).
    pub seg_max: u32,
    /// Logical block size (VIRTIO_BLK_F_BLK_SIZE).
    pub blk_size: u32,
    /// Physical block = logical block << this (VIRTIO_BLK_F_TOPOLOGY).
    pub physical_block_exp: u8,
    /// Suggested minimum I/O, in logical blocks (TOPOLOGY).
    pub min_io_size: u16,
    /// Optimal I/O, in logical blocks (TOPOLOGY).
    pub opt_io_size: u32,
    /// Number of request queues (VIRTIO_BLK_F_MQ).
    pub num_queues: u16,
    /// Largest discard, in sectors (VIRTIO_BLK_F_DISCARD).
    pub max_discard_sectors: u32,
    /// Most discard segments per request.
    pub max_discard_seg: u32,
    /// Discard alignment, in sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes, in sectors (VIRTIO_BLK_F_WRITE_ZEROES).
    pub max_write_zeroes_sectors: u32,
    /// Most write-zeroes segments per request.
    pub max_write_zeroes_seg: u32,
    /// Write-zeroes may deallocate (honours VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP).
    pub write_zeroes_may_unmap: bool,
}

/// Length of the configuration space this device exposes.
pub const CONFIG_LEN: usize = 60;

impl BlkConfig {
    /// The little-endian configuration space (virtio 1.x devices are little-endian, §2.5).
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        b[8..12].copy_from_slice(&self.size_max.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        // 16..20: geometry (cylinders, heads, sectors) — not offered.
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b[24] = self.physical_block_exp;
        // 25: alignment_offset = 0.
        b[26..28].copy_from_slice(&self.min_io_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.opt_io_size.to_le_bytes());
        // 32: wce, 33: unused — no writeback-cache toggle (CONFIG_WCE not offered).
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = u8::from(self.write_zeroes_may_unmap);
        b
    }

    /// The `size` bytes at `offset` of the configuration space, as a VHOST_USER_GET_CONFIG
    /// answer: a read past the end gets only what exists (empty if nothing does).
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.to_bytes();
        let start = (offset as usize).min(CONFIG_LEN);
        let end = start.saturating_add(size as usize).min(CONFIG_LEN);
        bytes[start..end].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_space_offsets_follow_the_spec() {
        let c = BlkConfig {
            capacity: 0x0102_0304_0506_0708,
            seg_max: 254,
            blk_size: 4096,
            num_queues: 4,
            max_write_zeroes_seg: 7,
            write_zeroes_may_unmap: true,
            ..Default::default()
        };
        let b = c.to_bytes();
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 0x0102_0304_0506_0708);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(b[52..56].try_into().unwrap()), 7);
        assert_eq!(b[56], 1);
        // The layout matches the kernel header's offsets.
        assert_eq!(std::mem::offset_of!(blk::virtio_blk_config, num_queues), 34);
        assert_eq!(std::mem::offset_of!(blk::virtio_blk_config, write_zeroes_may_unmap), 56);
        assert_eq!(c.read(0, 8), b[0..8].to_vec());
        assert_eq!(c.read(56, 100), b[56..60].to_vec());
        assert!(c.read(200, 4).is_empty());
    }
}
