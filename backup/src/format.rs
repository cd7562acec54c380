//! The backup tier's on-disk formats, each with a magic and a version: a file of an unknown
//! version is refused by name, never misread.
//!
//! ```text
//! piece:    "BSLTPIE\0" | version u32 | codec u8 | plain len u32 | stored len u32 | crc32c(stored) u32 | stored bytes
//! manifest: "BSLTMAN\0" | version u32 | body len u64 | bincode(Manifest) | crc32c(body) u32
//! ```
//! All integers little endian. Codec 0 stores the bytes as they are, 1 LZ4 (block format).
//!
//! A backup of an encrypted volume (`Manifest::sealed`) stores each chunk as the nodes hold it:
//! its ciphertext, then one 28-byte encryption context (nonce, tag) per 4 KiB block, zeros for
//! an unwritten one ([`sealed_payload`]). No key is needed to copy, verify or restore it.
//! Manifest format 2 added `sealed`; format 1 (plain backups only) still reads.

use serde::{Deserialize, Serialize};

const PIECE_MAGIC: &[u8; 8] = b"BSLTPIE\0";
const MANIFEST_MAGIC: &[u8; 8] = b"BSLTMAN\0";
/// The piece format this build writes and reads.
pub const PIECE_VERSION: u32 = 1;
/// The manifest format this build writes (it reads 1 too).
pub const MANIFEST_VERSION: u32 = 2;
const PIECE_HEADER: usize = 8 + 4 + 1 + 4 + 4 + 4;
/// Blocks in a chunk.
const CHUNK_BLOCKS: usize = (basalt_common::CHUNK_SIZE / basalt_common::BLOCK_SIZE) as usize;
/// Largest piece: one chunk, with its encryption contexts if sealed.
const MAX_PIECE: usize = basalt_common::CHUNK_SIZE as usize + CHUNK_BLOCKS * CryptContext::LEN;

use basalt_common::{BLOCK_SIZE, CryptContext};

/// A sealed chunk's piece bytes: the ciphertext, then each block's context.
pub fn sealed_payload(data: &[u8], contexts: &[Option<CryptContext>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + contexts.len() * CryptContext::LEN);
    out.extend_from_slice(data);
    out.extend_from_slice(&CryptContext::encode_all(contexts));
    out
}

/// Splits a sealed chunk's piece bytes back into the `len` bytes of ciphertext and the
/// contexts; `Err` if the piece does not have that shape.
pub fn split_sealed(payload: &[u8], len: usize) -> Result<(&[u8], Vec<Option<CryptContext>>), String> {
    let blocks = len / BLOCK_SIZE as usize;
    if !len.is_multiple_of(BLOCK_SIZE as usize) || payload.len() != len + blocks * CryptContext::LEN {
        return Err(format!("holds {} bytes, a sealed chunk of {len} bytes needs {}", payload.len(), len + blocks * CryptContext::LEN));
    }
    let (data, contexts) = payload.split_at(len);
    let contexts = CryptContext::decode_all(contexts, blocks).ok_or_else(|| "malformed encryption contexts".to_string())?;
    Ok((data, contexts))
}

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
    /// The volume is encrypted: each piece is a sealed chunk ([`sealed_payload`]). Added in
    /// manifest format 2.
    pub sealed: bool,
}

/// [`Manifest`] as format 1 had it (plain backups only).
#[derive(Deserialize)]
struct ManifestV1 {
    backup: u64,
    volume: u64,
    volume_name: String,
    snapshot: String,
    epoch: u64,
    size: u64,
    chunks: Vec<ManifestChunk>,
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
        if version != MANIFEST_VERSION && version != 1 {
            return Err(format!("manifest format {version} is not one this build reads (1 to {MANIFEST_VERSION})"));
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
        if version == 1 {
            let v: ManifestV1 = bincode::deserialize(body).map_err(|e| format!("corrupt manifest: {e}"))?;
            let ManifestV1 { backup, volume, volume_name, snapshot, epoch, size, chunks } = v;
            return Ok(Manifest { backup, volume, volume_name, snapshot, epoch, size, chunks, sealed: false });
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
            sealed: true,
        };
        let enc = m.encode();
        assert_eq!(Manifest::decode(&enc).unwrap(), m);
        // Format 1: the same without `sealed` (plain).
        let body = bincode::serialize(&(3u64, 1u64, "v", "s", 2u64, 4096u64, &m.chunks)).unwrap();
        let mut v1 = MANIFEST_MAGIC.to_vec();
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&(body.len() as u64).to_le_bytes());
        v1.extend_from_slice(&body);
        v1.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        assert_eq!(Manifest::decode(&v1).unwrap(), Manifest { sealed: false, ..m.clone() });

        // A sealed chunk's payload splits back; a wrong shape is refused.
        let ctx = CryptContext { nonce: [1; 12], tag: [2; 16] };
        let payload = sealed_payload(&[5u8; 8192], &[Some(ctx), None]);
        let (data, contexts) = split_sealed(&payload, 8192).unwrap();
        assert_eq!((data, contexts), (&[5u8; 8192][..], vec![Some(ctx), None]));
        assert!(split_sealed(&payload, 4096).is_err());
        assert!(split_sealed(&payload[1..], 8192).is_err());
        let piece = Piece::encode(&sealed_payload(&vec![7u8; basalt_common::CHUNK_SIZE as usize], &vec![Some(ctx); CHUNK_BLOCKS]));
        assert_eq!(Piece::decode(&piece).unwrap().len(), MAX_PIECE, "a whole sealed chunk fits a piece");
        let mut newer = enc.clone();
        newer[8] = 9;
        assert!(Manifest::decode(&newer).unwrap_err().contains("format 9"));
        let mut flipped = enc.clone();
        flipped[30] ^= 1;
        assert!(Manifest::decode(&flipped).is_err());
        assert!(Manifest::decode(&enc[..enc.len() - 1]).is_err());
    }
}
