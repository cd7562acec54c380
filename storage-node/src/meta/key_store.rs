//! The key store: a meta node's copies of encrypted volumes' wrapped data keys, kept out of
//! the Raft log and RocksDB (whose old files keep their bytes on the device after compaction
//! unlinks them) in one file of fixed slots that are overwritten in place, so a destroyed key
//! is gone from the disk the moment [`KeyStore::erase`] returns (crypto-shredding).
//!
//! The meta group's state names each encrypted volume's key id, current version and the
//! SHA-256 of every version's wrapped key ([`super::state::VolumeKeys`]); the wrapped keys
//! themselves travel between meta nodes over TLS (`KeyPut`/`KeyGet`), never through a log.
//!
//! `DATA_DIR/keys/wrapped.keys`, [`SLOT`] bytes per slot, all zeros when free:
//!
//! ```text
//! magic "BKY1" (format 1) | key id u64 | version u32 | created unix ms u64 | len u16
//! | wrapped key [len] | zeros | crc32c u32 of the bytes before it (last 4 bytes of the slot)
//! ```
//! All integers little-endian. A slot of another format is refused by name at open; a slot
//! whose crc does not match is reported corrupt (and healed from another meta node by the
//! caller), never read as a key.
//!
//! This relies on the filesystem overwriting a file's blocks in place (ext4, XFS), as the
//! scrubber does for data; a copy-on-write filesystem would keep the old blocks.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use basalt_common::crc32c;
use thiserror::Error;

/// Bytes per slot.
pub const SLOT: usize = 256;
/// Slot magic, carrying the format version.
const MAGIC: &[u8; 4] = b"BKY1";
/// Longest wrapped key a slot holds.
pub const MAX_WRAPPED: usize = SLOT - 4 - 8 - 4 - 8 - 2 - 4;

/// Why the key store failed.
#[derive(Debug, Error)]
pub enum KeyStoreError {
    /// Reading or writing the file failed.
    #[error("key store {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A slot of a format this binary does not read.
    #[error("key store {path}: slot {slot} is in format {magic:?}, which this binary does not read (it reads {MAGIC:?}): run the newer basalt-node")]
    Format {
        /// The file.
        path: PathBuf,
        /// Slot number.
        slot: usize,
        /// Its magic.
        magic: String,
    },
    /// The slot holding this key fails its checksum.
    #[error("key store {path}: the wrapped key {key_id:016x} v{version} in slot {slot} is corrupt (checksum mismatch)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Key id.
        key_id: u64,
        /// Version.
        version: u32,
        /// Slot number.
        slot: usize,
    },
    /// A wrapped key too long for a slot.
    #[error("a wrapped key of {0} bytes does not fit a key-store slot (at most {MAX_WRAPPED})")]
    TooLong(usize),
}

/// One stored key, as listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stored {
    /// Key id.
    pub key_id: u64,
    /// Version.
    pub version: u32,
    /// When it was stored here.
    pub created_unix_ms: u64,
}

#[derive(Default)]
struct Slots {
    /// Good slots by (key id, version).
    by_key: BTreeMap<(u64, u32), (usize, u64)>,
    /// Slots whose checksum failed, by (key id, version) as far as readable.
    corrupt: BTreeMap<(u64, u32), usize>,
    /// Free slots.
    free: BTreeSet<usize>,
    /// Slots in the file.
    count: usize,
}

/// A meta node's key store.
pub struct KeyStore {
    path: PathBuf,
    file: File,
    slots: Mutex<Slots>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyStore({})", self.path.display())
    }
}

fn encode(key_id: u64, version: u32, created_unix_ms: u64, wrapped: &[u8]) -> [u8; SLOT] {
    let mut s = [0u8; SLOT];
    s[0..4].copy_from_slice(MAGIC);
    s[4..12].copy_from_slice(&key_id.to_le_bytes());
    s[12..16].copy_from_slice(&version.to_le_bytes());
    s[16..24].copy_from_slice(&created_unix_ms.to_le_bytes());
    s[24..26].copy_from_slice(&(wrapped.len() as u16).to_le_bytes());
    s[26..26 + wrapped.len()].copy_from_slice(wrapped);
    let crc = crc32c(&s[..SLOT - 4]);
    s[SLOT - 4..].copy_from_slice(&crc.to_le_bytes());
    s
}

/// What a slot holds.
enum Slot {
    /// Nothing (all zeros).
    Free,
    /// A key.
    Key(Stored, Vec<u8>),
    /// Something that fails its checksum, naming whatever key id and version it says.
    Damaged(u64, u32),
}

fn decode(s: &[u8]) -> Slot {
    if s.iter().all(|b| *b == 0) {
        return Slot::Free;
    }
    let u64_at = |i: usize| u64::from_le_bytes(s[i..i + 8].try_into().unwrap_or_default());
    let key = (u64_at(4), u32::from_le_bytes(s[12..16].try_into().unwrap_or_default()));
    let crc = u32::from_le_bytes(s[SLOT - 4..].try_into().unwrap_or_default());
    let len = u16::from_le_bytes([s[24], s[25]]) as usize;
    if crc32c(&s[..SLOT - 4]) != crc || len > MAX_WRAPPED {
        return Slot::Damaged(key.0, key.1);
    }
    Slot::Key(Stored { key_id: key.0, version: key.1, created_unix_ms: u64_at(16) }, s[26..26 + len].to_vec())
}

impl KeyStore {
    /// Opens (creating) the key store in `dir`.
    pub fn open(dir: &Path) -> Result<KeyStore, KeyStoreError> {
        let path = dir.join("wrapped.keys");
        let io_err = |source: io::Error| KeyStoreError::Io { path: path.clone(), source };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io_err)?;
        let bytes = std::fs::read(&path).map_err(io_err)?;
        let mut slots = Slots { count: bytes.len() / SLOT, ..Default::default() };
        for (i, s) in bytes.chunks_exact(SLOT).enumerate() {
            if !s.iter().all(|b| *b == 0) && &s[0..4] != MAGIC {
                return Err(KeyStoreError::Format { path, slot: i, magic: String::from_utf8_lossy(&s[0..4]).into_owned() });
            }
            match decode(s) {
                Slot::Free => {
                    slots.free.insert(i);
                }
                Slot::Key(stored, _) => {
                    slots.by_key.insert((stored.key_id, stored.version), (i, stored.created_unix_ms));
                }
                Slot::Damaged(key_id, version) => {
                    tracing::error!(path = %path.display(), slot = i, "a key-store slot fails its checksum; the key it held is taken from another meta node when asked for");
                    slots.corrupt.insert((key_id, version), i);
                }
            }
        }
        Ok(KeyStore { path, file, slots: Mutex::new(slots) })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write_slot(&self, slot: usize, bytes: &[u8; SLOT]) -> Result<(), KeyStoreError> {
        let io_err = |source: io::Error| KeyStoreError::Io { path: self.path.clone(), source };
        self.file.write_all_at(bytes, (slot * SLOT) as u64).map_err(io_err)?;
        self.file.sync_data().map_err(io_err)
    }

    /// Stores (or replaces, in place) version `version` of key `key_id`; durable on return.
    pub fn put(&self, key_id: u64, version: u32, wrapped: &[u8], now_unix_ms: u64) -> Result<(), KeyStoreError> {
        if wrapped.len() > MAX_WRAPPED {
            return Err(KeyStoreError::TooLong(wrapped.len()));
        }
        let mut slots = self.lock();
        let slot = match slots.by_key.get(&(key_id, version)).map(|(s, _)| *s).or_else(|| slots.corrupt.remove(&(key_id, version))) {
            Some(s) => s,
            None => match slots.free.pop_first() {
                Some(s) => s,
                None => {
                    slots.count += 1;
                    slots.count - 1
                }
            },
        };
        self.write_slot(slot, &encode(key_id, version, now_unix_ms, wrapped))?;
        slots.by_key.insert((key_id, version), (slot, now_unix_ms));
        Ok(())
    }

    /// Version `version` of key `key_id`, if stored here.
    pub fn get(&self, key_id: u64, version: u32) -> Result<Option<Vec<u8>>, KeyStoreError> {
        let slots = self.lock();
        if let Some(slot) = slots.corrupt.get(&(key_id, version)) {
            return Err(KeyStoreError::Corrupt { path: self.path.clone(), key_id, version, slot: *slot });
        }
        let Some((slot, _)) = slots.by_key.get(&(key_id, version)).copied() else {
            return Ok(None);
        };
        let mut buf = [0u8; SLOT];
        self.file.read_exact_at(&mut buf, (slot * SLOT) as u64).map_err(|source| KeyStoreError::Io { path: self.path.clone(), source })?;
        match decode(&buf) {
            Slot::Key(s, wrapped) if (s.key_id, s.version) == (key_id, version) => Ok(Some(wrapped)),
            _ => Err(KeyStoreError::Corrupt { path: self.path.clone(), key_id, version, slot }),
        }
    }

    /// Overwrites every version of key `key_id` with zeros, durably; returns how many slots.
    pub fn erase(&self, key_id: u64) -> Result<usize, KeyStoreError> {
        let mut slots = self.lock();
        let doomed: Vec<((u64, u32), usize)> = slots
            .by_key
            .iter()
            .map(|(k, (s, _))| (*k, *s))
            .chain(slots.corrupt.iter().map(|(k, s)| (*k, *s)))
            .filter(|((id, _), _)| *id == key_id)
            .collect();
        for (key, slot) in &doomed {
            self.write_slot(*slot, &[0u8; SLOT])?;
            slots.by_key.remove(key);
            slots.corrupt.remove(key);
            slots.free.insert(*slot);
        }
        Ok(doomed.len())
    }

    /// Overwrites one version of key `key_id` with zeros, durably.
    pub fn erase_version(&self, key_id: u64, version: u32) -> Result<bool, KeyStoreError> {
        let mut slots = self.lock();
        let Some(slot) = slots.by_key.get(&(key_id, version)).map(|(s, _)| *s).or_else(|| slots.corrupt.get(&(key_id, version)).copied()) else {
            return Ok(false);
        };
        self.write_slot(slot, &[0u8; SLOT])?;
        slots.by_key.remove(&(key_id, version));
        slots.corrupt.remove(&(key_id, version));
        slots.free.insert(slot);
        Ok(true)
    }

    /// Every key stored here (good slots).
    pub fn entries(&self) -> Vec<Stored> {
        self.lock()
            .by_key
            .iter()
            .map(|((key_id, version), (_, created))| Stored { key_id: *key_id, version: *version, created_unix_ms: *created })
            .collect()
    }
}

/// How long a stored key no volume references is kept: a volume being created has its key
/// stored on the meta nodes before the meta group records the volume.
pub const ORPHAN_GRACE_MS: u64 = 10 * 60 * 1000;

/// What the meta state references: each key id in use and its live versions.
pub type Referenced = BTreeMap<u64, BTreeSet<u32>>;

/// The keys `state` references.
pub fn referenced(state: &super::state::ClusterState) -> Referenced {
    state.key_references().into_iter().map(|(_, k)| (k.key_id, k.digests.keys().copied().collect())).collect()
}

/// Erases every key in `store` that no volume references (`referenced`) and that is older
/// than [`ORPHAN_GRACE_MS`] (keys of volumes deleted while this node was away — it got a
/// snapshot instead of the deletion — or of creations that failed), and at once every version
/// a referenced key no longer has (a re-encryption finished while this node was away).
/// Returns the slots erased, as (key id, version).
pub fn sweep(store: &KeyStore, referenced: &Referenced, now_unix_ms: u64) -> Result<Vec<(u64, u32)>, KeyStoreError> {
    let mut erased = Vec::new();
    for s in store.entries() {
        let doomed = match referenced.get(&s.key_id) {
            Some(versions) => !versions.contains(&s.version),
            None => now_unix_ms.saturating_sub(s.created_unix_ms) >= ORPHAN_GRACE_MS,
        };
        if doomed && store.erase_version(s.key_id, s.version)? {
            erased.push((s.key_id, s.version));
        }
    }
    Ok(erased)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stored_replaced_and_erased_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::open(dir.path()).unwrap();
        let (a, b) = (vec![0xA5u8; 73], vec![0x5Au8; 73]);
        ks.put(1, 1, &a, 10).unwrap();
        ks.put(2, 1, &b, 11).unwrap();
        ks.put(1, 2, &b, 12).unwrap();
        assert_eq!(ks.get(1, 1).unwrap(), Some(a.clone()));
        assert_eq!(ks.get(3, 1).unwrap(), None);
        // Reopened: the same keys.
        drop(ks);
        let ks = KeyStore::open(dir.path()).unwrap();
        assert_eq!(ks.entries().len(), 3);
        assert_eq!(ks.get(1, 2).unwrap(), Some(b.clone()));
        // Replacing rewrites the same slot: the old bytes are gone from the file.
        ks.put(1, 1, &[0x11u8; 73], 13).unwrap();
        let file = std::fs::read(ks.path()).unwrap();
        assert_eq!(file.len(), 3 * SLOT, "no slot added");
        assert!(!file.windows(73).any(|w| w == a.as_slice()), "the replaced key's bytes are gone");
        // Erasing overwrites every version, and the slots are reused.
        assert_eq!(ks.erase(1).unwrap(), 2);
        let file = std::fs::read(ks.path()).unwrap();
        assert!(!file.windows(8).any(|w| w == [0x11u8; 8]), "erased key bytes are gone");
        assert_eq!(file.iter().filter(|x| **x == 0x5A).count(), 73, "only key 2 is left");
        ks.put(9, 1, &a, 14).unwrap();
        assert_eq!(std::fs::read(ks.path()).unwrap().len(), 3 * SLOT);
        assert!(ks.erase_version(2, 1).unwrap());
        assert!(!ks.erase_version(2, 1).unwrap());
        assert!(matches!(ks.put(5, 1, &[1u8; MAX_WRAPPED + 1], 0), Err(KeyStoreError::TooLong(_))));
    }

    #[test]
    fn the_sweep_erases_old_unreferenced_keys_only() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::open(dir.path()).unwrap();
        ks.put(1, 1, &[1u8; 73], 0).unwrap();
        ks.put(2, 1, &[2u8; 73], 0).unwrap();
        ks.put(3, 1, &[3u8; 73], ORPHAN_GRACE_MS).unwrap();
        ks.put(1, 2, &[4u8; 73], ORPHAN_GRACE_MS).unwrap();
        let mut referenced: Referenced = [(1, [1, 2].into())].into();
        assert_eq!(sweep(&ks, &referenced, ORPHAN_GRACE_MS).unwrap(), vec![(2, 1)], "3 is young, 1 is in use");
        assert_eq!(ks.entries().iter().map(|s| (s.key_id, s.version)).collect::<Vec<_>>(), vec![(1, 1), (1, 2), (3, 1)]);
        // A version the state dropped (a finished re-encryption) goes at once, young or not.
        referenced.insert(1, [2].into());
        assert_eq!(sweep(&ks, &referenced, ORPHAN_GRACE_MS).unwrap(), vec![(1, 1)]);
        assert_eq!(sweep(&ks, &referenced, 2 * ORPHAN_GRACE_MS).unwrap(), vec![(3, 1)]);
    }

    #[test]
    fn damaged_slots_are_reported_and_unknown_formats_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ks = KeyStore::open(dir.path()).unwrap();
        ks.put(7, 1, &[3u8; 73], 1).unwrap();
        ks.put(8, 1, &[4u8; 73], 1).unwrap();
        let path = ks.path().to_path_buf();
        drop(ks);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[40] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let ks = KeyStore::open(dir.path()).unwrap();
        let e = ks.get(7, 1).unwrap_err();
        assert!(matches!(e, KeyStoreError::Corrupt { key_id: 7, .. }), "{e}");
        assert_eq!(ks.get(8, 1).unwrap(), Some(vec![4u8; 73]));
        // A healthy copy from elsewhere replaces the damaged slot in place.
        ks.put(7, 1, &[3u8; 73], 2).unwrap();
        assert_eq!(ks.get(7, 1).unwrap(), Some(vec![3u8; 73]));
        drop(ks);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[SLOT..SLOT + 4].copy_from_slice(b"BKY9");
        std::fs::write(&path, &bytes).unwrap();
        let e = KeyStore::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("BKY9"), "{e}");
    }
}
