//! Block and chunk geometry, and the checksum every block carries.

/// Every volume is addressed in 4 KiB blocks; each carries its own crc32c.
pub const BLOCK_SIZE: u64 = 4096;

/// The unit in which a storage node allocates space on disk (thin provisioning granularity).
/// An extent (the unit of placement) is a whole number of chunks.
pub const CHUNK_SIZE: u64 = 1024 * 1024;

/// Blocks per chunk.
pub const BLOCKS_PER_CHUNK: u64 = CHUNK_SIZE / BLOCK_SIZE;

/// crc32c of a 4 KiB block of zeros: what an unwritten block reads as.
pub const ZERO_BLOCK_CRC: u32 = 0x98f9_4189;

/// crc32c (Castagnoli), hardware accelerated where the CPU has it.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// True if `value` is a multiple of the block size.
pub fn is_block_aligned(value: u64) -> bool {
    value.is_multiple_of(BLOCK_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_block_crc_matches_constant() {
        assert_eq!(crc32c(&[0u8; BLOCK_SIZE as usize]), ZERO_BLOCK_CRC);
    }
}
