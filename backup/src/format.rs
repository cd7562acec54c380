//! The backup tier's on-disk formats, each with a magic and a version: a file of an unknown
//! version is refused by name, never misread.
//!
//! ```text
//! piece:    "BSLTPIE\0" | version u32 | codec u8 | plain len u32 | stored len u32 | crc32c(stored) u32 | stored bytes
//! manifest: "BSLTMAN\0" | version u32 | body len u64 | bincode(Manifest) | crc32c(body) u32
//! ```
//! All integers little endian. Codec 0 stores the bytes as they are, 1 LZ4 (block format).

use serde::{Deserialize, Serialize};

const PIECE_MAGIC: &[u8; 8] = b"BSLTPIE\0";
const MANIFEST_MAGIC: &[u8; 8] = b"BSLTMAN\0";
/// The piece format this build writes and reads.
pub const PIECE_VERSION: u32 = 1;
/// The manifest format this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
const PIECE_HEADER: usize = 8 + 4 + 1 + 4 + 4 + 4;
/// Largest piece: one chunk.
const MAX_PIECE: usize = basalt_common::CHUNK_SIZE as usize;

/// A piece's name: the SHA-256 of its plain bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PieceId(pub [u8; 32]);

impl PieceId {
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`PieceId::to_hex`]'s output.
    pub fn from_hex(s: &str) -> Option<PieceId> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(PieceId(out))
    }
}

/// The piece file format.
pub struct Piece;

impl Piece {
    /// Encodes `data` (at most one chunk), compressed when that is smaller.
    pub fn encode(data: &[u8]) -> Vec<u8> {
        let compressed = lz4_flex::block::compress(data);
        let (codec, stored) = if compressed.len() < data.len() { (1u8, compressed.as_slice()) } else { (0u8, data) };
        let mut out = Vec::with_capacity(PIECE_HEADER + stored.len());
        out.extend_from_slice(PIECE_MAGIC);
        out.extend_from_slice(&PIECE_VERSION.to_le_bytes());
        out.push(codec);
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&(stored.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(stored).to_le_bytes());
        out.extend_from_slice(stored);
        out
    }

    /// Decodes a piece file, checking its header and stored crc; `Err` says what is wrong.
    pub fn decode(raw: &[u8]) -> Result<Vec<u8>, String> {
        if raw.len() < PIECE_HEADER || &raw[..8] != PIECE_MAGIC {
            return Err(format!("not a piece file ({} bytes, no piece header)", raw.len()));
        }
        let u32_at = |at: usize| u32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
        let version = u32_at(8);
        if version != PIECE_VERSION {
            return Err(format!("piece format {version} is not one this build reads ({PIECE_VERSION})"));
        }
        let codec = raw[12];
        let (plain, stored_len, crc) = (u32_at(13) as usize, u32_at(17) as usize, u32_at(21));
        if plain > MAX_PIECE {
            return Err(format!("piece claims {plain} bytes, more than a chunk"));
        }
        let stored = &raw[PIECE_HEADER..];
        if stored.len() != stored_len {
            return Err(format!("piece holds {} bytes, its header says {stored_len}", stored.len()));
        }
        let actual = crc32c::crc32c(stored);
        if actual != crc {
            return Err(format!("stored bytes fail their checksum (crc32c {actual:#010x}, recorded {crc:#010x})"));
        }
        match codec {
            0 if stored_len == plain => Ok(stored.to_vec()),
            1 => lz4_flex::block::decompress(stored, plain)
                .map_err(|e| format!("does not decompress: {e}"))
                .and_then(|d| if d.len() == plain { Ok(d) } else { Err(format!("decompresses to {} bytes, not {plain}", d.len())) }),
            c => Err(format!("unknown codec {c} (or a raw piece of the wrong length)")),
        }
    }
}

/// One chunk of a backup: where it lies, the version it was copied from, and its piece.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestChunk {
    /// Chunk index within the volume.
    pub chunk: u64,
    /// The volume and epoch of the version copied (an ancestor's, for a clone): a later
    /// backup finding the same version reuses the piece without reading it.
    pub owner: u64,
    /// See `owner`.
    pub epoch: u64,
    /// The piece holding its bytes.
    pub piece: PieceId,
    /// Its length (a volume's last chunk may be short).
    pub len: u32,
}

/// A whole copy of one backup on one node. Chunks not listed read as zeros.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The backup's id.
    pub backup: u64,
    /// The volume's id and name when it was taken.
    pub volume: u64,
    /// See `volume`.
    pub volume_name: String,
    /// The snapshot copied and its epoch.
    pub snapshot: String,
    /// See `snapshot`.
    pub epoch: u64,
    /// The volume's size.
    pub size: u64,
    /// Chunks with data, in chunk order.
    pub chunks: Vec<ManifestChunk>,
}

impl Manifest {
    /// The manifest file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        // A struct of plain fields and vectors always serialises.
        let body = bincode::serialize(self).expect("manifest serialises");
        let mut out = Vec::with_capacity(body.len() + 24);
        out.extend_from_slice(MANIFEST_MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        out
    }

    /// Decodes a manifest file; `Err` says what is wrong.
    pub fn decode(raw: &[u8]) -> Result<Manifest, String> {
        if raw.len() < 24 || &raw[..8] != MANIFEST_MAGIC {
            return Err("not a backup manifest (no manifest header)".into());
        }
        let version = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        if version != MANIFEST_VERSION {
            return Err(format!("manifest format {version} is not one this build reads ({MANIFEST_VERSION})"));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&raw[12..20]);
        let len = usize::try_from(u64::from_le_bytes(len)).map_err(|_| "manifest length overflows".to_string())?;
        if raw.len() != 20 + len + 4 {
            return Err(format!("manifest is {} bytes, its header says {}", raw.len(), 20 + len + 4));
        }
        let body = &raw[20..20 + len];
        let crc = u32::from_le_bytes([raw[20 + len], raw[21 + len], raw[22 + len], raw[23 + len]]);
        if crc32c::crc32c(body) != crc {
            return Err("manifest fails its checksum".into());
        }
        bincode::deserialize(body).map_err(|e| format!("corrupt manifest: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_round_trip_and_refuse_damage_and_unknown_versions() {
        let data: Vec<u8> = b"abc".repeat(1000);
        let enc = Piece::encode(&data);
        assert_eq!(Piece::decode(&enc).unwrap(), data);
        let mut newer = enc.clone();
        newer[8] = 2;
        assert!(Piece::decode(&newer).unwrap_err().contains("piece format 2"));
        for cut in [0, 5, PIECE_HEADER, enc.len() - 1] {
            assert!(Piece::decode(&enc[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = enc.clone();
        flipped[PIECE_HEADER + 1] ^= 1;
        assert!(Piece::decode(&flipped).unwrap_err().contains("checksum"));
        let mut huge = enc;
        huge[13..17].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Piece::decode(&huge).is_err());

        let id = PieceId([7; 32]);
        assert_eq!(PieceId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(PieceId::from_hex("zz"), None);
        let m = Manifest {
            backup: 3,
            volume: 1,
            volume_name: "v".into(),
            snapshot: "s".into(),
            epoch: 2,
            size: 4096,
            chunks: vec![ManifestChunk { chunk: 0, owner: 1, epoch: 2, piece: id, len: 4096 }],
        };
        let enc = m.encode();
        assert_eq!(Manifest::decode(&enc).unwrap(), m);
        let mut newer = enc.clone();
        newer[8] = 9;
        assert!(Manifest::decode(&newer).unwrap_err().contains("format 9"));
        let mut flipped = enc.clone();
        flipped[30] ^= 1;
        assert!(Manifest::decode(&flipped).is_err());
        assert!(Manifest::decode(&enc[..enc.len() - 1]).is_err());
    }
}
