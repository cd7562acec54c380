//! A self-contained copy of one chunk (its written blocks, their metadata and data), the unit in
//! which a placement group's state is streamed to a new or lagging replica.

use basalt_common::{BLOCK_SIZE, VolumeId};
use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{ChunkStoreError, Result};
use crate::index::{BlockMeta, CryptContext};

/// One chunk's written blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkImage {
    /// Volume.
    pub volume: VolumeId,
    /// Chunk index.
    pub chunk: u64,
    /// Written blocks in ascending order, with their metadata.
    pub blocks: Vec<(u16, BlockMeta)>,
    /// The data of `blocks`, 4 KiB each, concatenated in the same order.
    pub data: Bytes,
}

const TAG: u8 = 0xC1;

impl ChunkImage {
    /// Appends the wire encoding to `out`.
    pub fn encode_into(&self, out: &mut BytesMut) {
        out.put_u8(TAG);
        out.put_u64_le(self.volume.0);
        out.put_u64_le(self.chunk);
        out.put_u32_le(self.blocks.len() as u32);
        for (block, meta) in &self.blocks {
            out.put_u16_le(*block);
            out.put_u32_le(meta.crc);
            match &meta.crypt {
                Some(c) => {
                    out.put_u8(1);
                    out.put_slice(&c.nonce);
                    out.put_slice(&c.tag);
                }
                None => out.put_u8(0),
            }
        }
        out.put_slice(&self.data);
    }

    /// Decodes one image from the front of `buf`, advancing it. Validates every length so a
    /// truncated or hostile stream is an error, not a panic.
    pub fn decode_from(buf: &mut Bytes) -> Result<Self> {
        let bad = |what: &str| ChunkStoreError::Invalid(format!("malformed chunk image: {what}"));
        if buf.remaining() < 21 || buf.get_u8() != TAG {
            return Err(bad("missing header"));
        }
        let volume = VolumeId(buf.get_u64_le());
        let chunk = buf.get_u64_le();
        let count = buf.get_u32_le() as usize;
        if count > (basalt_common::CHUNK_SIZE / BLOCK_SIZE) as usize {
            return Err(bad("too many blocks"));
        }
        let mut blocks = Vec::with_capacity(count);
        let mut last: Option<u16> = None;
        for _ in 0..count {
            if buf.remaining() < 7 {
                return Err(bad("truncated block list"));
            }
            let block = buf.get_u16_le();
            if block as u64 >= basalt_common::CHUNK_SIZE / BLOCK_SIZE || last.is_some_and(|l| l >= block) {
                return Err(bad("block index out of range or out of order"));
            }
            last = Some(block);
            let crc = buf.get_u32_le();
            let crypt = match buf.get_u8() {
                0 => None,
                1 => {
                    if buf.remaining() < 28 {
                        return Err(bad("truncated crypt context"));
                    }
                    let mut nonce = [0u8; 12];
                    let mut tag = [0u8; 16];
                    buf.copy_to_slice(&mut nonce);
                    buf.copy_to_slice(&mut tag);
                    Some(CryptContext { nonce, tag })
                }
                _ => return Err(bad("bad crypt flag")),
            };
            blocks.push((block, BlockMeta { crc, crypt }));
        }
        let data_len = count * BLOCK_SIZE as usize;
        if buf.remaining() < data_len {
            return Err(bad("truncated data"));
        }
        let data = buf.split_to(data_len);
        Ok(Self { volume, chunk, blocks, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_truncation() {
        let img = ChunkImage {
            volume: VolumeId(9),
            chunk: 3,
            blocks: vec![
                (1, BlockMeta { crc: 5, crypt: None }),
                (7, BlockMeta { crc: 6, crypt: Some(CryptContext { nonce: [1; 12], tag: [2; 16] }) }),
            ],
            data: Bytes::from(vec![3u8; 8192]),
        };
        let mut out = BytesMut::new();
        img.encode_into(&mut out);
        let full = out.freeze();
        let mut b = full.clone();
        assert_eq!(ChunkImage::decode_from(&mut b).unwrap(), img);
        assert!(b.is_empty());
        for cut in [0, 10, 25, 40, full.len() - 1] {
            let mut t = full.slice(..cut);
            assert!(ChunkImage::decode_from(&mut t).is_err(), "cut at {cut}");
        }
    }
}
