//! A self-contained copy of one chunk version (its written blocks, their metadata and data), the
//! unit in which a placement group's state is streamed to a new or lagging replica.
//!
//! ```text
//! format 2 (tag 0xC2): [tag][volume u64][chunk u64][epoch u64][flags u8: 1 = hole][n u32]
//!                      n × ([block u16][crc u32][crypt flag u8][nonce 12, tag 16 if flag]) [data]
//! format 1 (tag 0xC1): the same without epoch and flags; read as epoch 1, not a hole
//! ```
//! All integers little-endian.

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
    /// The version's snapshot epoch.
    pub epoch: u64,
    /// The version holds no data: the chunk was trimmed whole in this epoch (no blocks).
    pub hole: bool,
    /// Written blocks in ascending order, with their metadata.
    pub blocks: Vec<(u16, BlockMeta)>,
    /// The data of `blocks`, 4 KiB each, concatenated in the same order.
    pub data: Bytes,
}

const TAG: u8 = 0xC2;
const TAG_V1: u8 = 0xC1;
const FLAG_HOLE: u8 = 1;

impl ChunkImage {
    /// Appends the wire encoding to `out`.
    pub fn encode_into(&self, out: &mut BytesMut) {
        out.put_u8(TAG);
        out.put_u64_le(self.volume.0);
        out.put_u64_le(self.chunk);
        out.put_u64_le(self.epoch);
        out.put_u8(if self.hole { FLAG_HOLE } else { 0 });
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
        if buf.remaining() < 21 {
            return Err(bad("missing header"));
        }
        let tag = buf.get_u8();
        if tag != TAG && tag != TAG_V1 {
            return Err(bad(&format!("unknown image format tag {tag:#04x}")));
        }
        let volume = VolumeId(buf.get_u64_le());
        let chunk = buf.get_u64_le();
        let (epoch, hole) = if tag == TAG {
            if buf.remaining() < 13 {
                return Err(bad("missing header"));
            }
            let epoch = buf.get_u64_le();
            let flags = buf.get_u8();
            if flags & !FLAG_HOLE != 0 {
                return Err(bad("unknown flags"));
            }
            (epoch, flags & FLAG_HOLE != 0)
        } else {
            (1, false)
        };
        let count = buf.get_u32_le() as usize;
        if hole && count != 0 {
            return Err(bad("a hole with blocks"));
        }
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
        Ok(Self { volume, chunk, epoch, hole, blocks, data })
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
            epoch: 4,
            hole: false,
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
        // Format 1 (before snapshots) reads as epoch 1.
        let mut v1 = BytesMut::new();
        v1.put_u8(TAG_V1);
        v1.put_u64_le(9);
        v1.put_u64_le(3);
        v1.put_u32_le(0);
        let old = ChunkImage::decode_from(&mut v1.freeze()).unwrap();
        assert_eq!((old.epoch, old.hole, old.blocks.len()), (1, false, 0));
        let mut unknown = full.to_vec();
        unknown[0] = 0xC3;
        assert!(ChunkImage::decode_from(&mut Bytes::from(unknown)).unwrap_err().to_string().contains("0xc3"));
    }
}
