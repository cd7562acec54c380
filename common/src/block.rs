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

/// Encryption context of one block of an encrypted volume (AES-256-GCM, see
/// `basalt_volume_client::crypt`): stored beside the block's crc32c, carried on the wire as
/// [`CryptContext::LEN`] bytes (nonce, then tag).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CryptContext {
    /// The 12-byte nonce used for this block's last write.
    pub nonce: [u8; 12],
    /// The 16-byte authentication tag.
    pub tag: [u8; 16],
}

impl CryptContext {
    /// Bytes of one context on the wire.
    pub const LEN: usize = 28;

    /// Appends the wire form.
    pub fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.tag);
    }

    /// Reads one context from exactly [`CryptContext::LEN`] bytes; all zeros is "none" (an
    /// unwritten or zeroed block).
    pub fn get(b: &[u8]) -> Option<CryptContext> {
        if b.len() != Self::LEN || b.iter().all(|x| *x == 0) {
            return None;
        }
        let mut c = CryptContext { nonce: [0; 12], tag: [0; 16] };
        c.nonce.copy_from_slice(&b[..12]);
        c.tag.copy_from_slice(&b[12..]);
        Some(c)
    }

    /// The wire form of `contexts` (none as zeros).
    pub fn encode_all(contexts: &[Option<CryptContext>]) -> Vec<u8> {
        let mut out = Vec::with_capacity(contexts.len() * Self::LEN);
        for c in contexts {
            match c {
                Some(c) => c.put(&mut out),
                None => out.extend_from_slice(&[0; Self::LEN]),
            }
        }
        out
    }

    /// Parses the wire form of `count` contexts; `None` if the length is wrong.
    pub fn decode_all(b: &[u8], count: usize) -> Option<Vec<Option<CryptContext>>> {
        if b.len() != count * Self::LEN {
            return None;
        }
        Some(b.chunks(Self::LEN).map(CryptContext::get).collect())
    }
}

/// True if `value` is a multiple of the block size.
pub fn is_block_aligned(value: u64) -> bool {
    value.is_multiple_of(BLOCK_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypt_contexts_round_trip_and_zeros_mean_none() {
        let c = CryptContext { nonce: [1; 12], tag: [2; 16] };
        let wire = CryptContext::encode_all(&[Some(c), None]);
        assert_eq!(wire.len(), 2 * CryptContext::LEN);
        assert_eq!(CryptContext::decode_all(&wire, 2), Some(vec![Some(c), None]));
        assert_eq!(CryptContext::decode_all(&wire, 3), None, "length must match the block count");
    }

    #[test]
    fn zero_block_crc_matches_constant() {
        assert_eq!(crc32c(&[0u8; BLOCK_SIZE as usize]), ZERO_BLOCK_CRC);
    }
}
