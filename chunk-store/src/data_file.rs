//! The data file (or raw block device): a superblock, then fixed-size chunk slots.
//!
//! ```text
//! offset 0        4 KiB superblock (magic, version, geometry, uuid, crc32c)
//! offset 1 MiB    slot 0 | slot 1 | ... | slot N-1      (each CHUNK_SIZE bytes)
//! ```
//! A regular file is created sparse (`ftruncate`), so a slot takes disk space only once written;
//! on a raw device every slot is real. All I/O is O_DIRECT through the io_uring thread.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use basalt_common::{CHUNK_SIZE, crc32c};

use crate::aligned::AlignedBuf;
use crate::error::{ChunkStoreError, Result};

const MAGIC: &[u8; 8] = b"BASALTCS";
const VERSION: u32 = 1;
/// Byte offset of slot 0.
pub const SLOT_BASE: u64 = 1024 * 1024;
const SUPERBLOCK_LEN: usize = 4096;

/// Geometry and identity read from (or written to) the superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Bytes per slot (the chunk size).
    pub slot_size: u64,
    /// Number of slots.
    pub slot_count: u64,
    /// Random identity tying the data file to its index.
    pub uuid: [u8; 16],
}

impl Superblock {
    fn encode(&self) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(SUPERBLOCK_LEN);
        let b = buf.as_mut_slice();
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..20].copy_from_slice(&self.slot_size.to_le_bytes());
        b[20..28].copy_from_slice(&self.slot_count.to_le_bytes());
        b[28..36].copy_from_slice(&SLOT_BASE.to_le_bytes());
        b[36..52].copy_from_slice(&self.uuid);
        let crc = crc32c(&b[0..52]);
        b[52..56].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    fn decode(path: &Path, b: &[u8]) -> Result<Self> {
        let bad = |reason: &str| ChunkStoreError::BadFormat { path: path.to_path_buf(), reason: reason.to_string() };
        if &b[0..8] != MAGIC {
            return Err(bad("not a Basalt data file (bad magic); refusing to use it"));
        }
        let crc = u32::from_le_bytes(b[52..56].try_into().expect("4 bytes"));
        if crc != crc32c(&b[0..52]) {
            return Err(bad("superblock checksum mismatch: the data file header is corrupt"));
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(bad(&format!("unsupported data file version {version} (this build reads {VERSION})")));
        }
        let slot_size = u64::from_le_bytes(b[12..20].try_into().expect("8 bytes"));
        let slot_count = u64::from_le_bytes(b[20..28].try_into().expect("8 bytes"));
        let base = u64::from_le_bytes(b[28..36].try_into().expect("8 bytes"));
        if slot_size != CHUNK_SIZE || base != SLOT_BASE {
            return Err(bad(&format!("unsupported geometry: slot size {slot_size}, slot base {base}")));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[36..52]);
        Ok(Self { slot_size, slot_count, uuid })
    }
}

/// The open data file.
pub struct DataFile {
    /// Path, for error messages.
    pub path: PathBuf,
    /// The O_DIRECT descriptor used for all data I/O.
    pub file: std::sync::Arc<File>,
    /// Its superblock.
    pub superblock: Superblock,
}

impl DataFile {
    /// Opens `path`, formatting it first if it is new (a missing or empty regular file) with room
    /// for `capacity` bytes of slots. A raw block device is used whole and must be formatted
    /// explicitly by being zero in its first 8 bytes (never silently reformatted otherwise).
    pub fn open(path: &Path, capacity: u64, direct_io: bool) -> Result<Self> {
        let io_err = |source: io::Error| ChunkStoreError::Io { path: path.to_path_buf(), source };
        let is_device = std::fs::metadata(path).map(|m| m.file_type().is_block_device()).unwrap_or(false);
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if !is_device {
            opts.create(true);
        }
        // Buffered handle for the superblock; created first so O_DIRECT errors are distinguishable.
        let mut plain = opts.open(path).map_err(io_err)?;
        let len = if is_device { plain.seek(SeekFrom::End(0)).map_err(io_err)? } else { plain.metadata().map_err(io_err)?.len() };

        let mut header = vec![0u8; SUPERBLOCK_LEN];
        let fresh = if len == 0 {
            true
        } else {
            plain.seek(SeekFrom::Start(0)).map_err(io_err)?;
            plain.read_exact(&mut header).map_err(io_err)?;
            header[0..8] == [0u8; 8]
        };

        let superblock = if fresh {
            let slot_count = if is_device { (len.saturating_sub(SLOT_BASE)) / CHUNK_SIZE } else { capacity / CHUNK_SIZE };
            if slot_count == 0 {
                return Err(ChunkStoreError::BadFormat {
                    path: path.to_path_buf(),
                    reason: format!("capacity {capacity} bytes is too small: need at least {} bytes", CHUNK_SIZE),
                });
            }
            let sb = Superblock { slot_size: CHUNK_SIZE, slot_count, uuid: rand::random() };
            if !is_device {
                plain.set_len(SLOT_BASE + slot_count * CHUNK_SIZE).map_err(io_err)?;
            }
            plain.seek(SeekFrom::Start(0)).map_err(io_err)?;
            plain.write_all(sb.encode().as_slice()).map_err(io_err)?;
            plain.sync_all().map_err(io_err)?;
            tracing::info!(path = %path.display(), slots = slot_count, "formatted new data file");
            sb
        } else {
            let sb = Superblock::decode(path, &header)?;
            let needed = SLOT_BASE + sb.slot_count * CHUNK_SIZE;
            if len < needed {
                return Err(ChunkStoreError::BadFormat {
                    path: path.to_path_buf(),
                    reason: format!("data file is {len} bytes but its superblock describes {needed}: it was truncated"),
                });
            }
            sb
        };
        drop(plain);

        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if direct_io {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path).map_err(|source| {
            if source.raw_os_error() == Some(libc::EINVAL) {
                ChunkStoreError::BadFormat {
                    path: path.to_path_buf(),
                    reason: "the filesystem does not support O_DIRECT (tmpfs?); put the data file on a real filesystem or set direct_io = false"
                        .into(),
                }
            } else {
                io_err(source)
            }
        })?;
        Ok(Self { path: path.to_path_buf(), file: std::sync::Arc::new(file), superblock })
    }

    /// Byte offset of `slot` in the file.
    pub fn slot_offset(&self, slot: u64) -> u64 {
        SLOT_BASE + slot * CHUNK_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_then_reopens_and_rejects_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let a = DataFile::open(&path, 64 << 20, true).unwrap();
        assert_eq!(a.superblock.slot_count, 64);
        drop(a);
        let b = DataFile::open(&path, 999, true).unwrap();
        assert_eq!(b.superblock.slot_count, 64, "existing geometry wins over config");

        let foreign = dir.path().join("foreign");
        std::fs::write(&foreign, vec![0xabu8; 8192]).unwrap();
        let err = DataFile::open(&foreign, 64 << 20, true).err().unwrap();
        assert!(err.to_string().contains("not a Basalt data file"), "{err}");

        // Corrupt one byte of the superblock: detected by its checksum.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&path, &bytes[..SUPERBLOCK_LEN + 4096]).unwrap();
        let err = DataFile::open(&path, 64 << 20, true).err().unwrap();
        assert!(err.to_string().contains("checksum"), "{err}");
    }
}
