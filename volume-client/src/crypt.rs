//! Client-side encryption at rest: an encrypted volume's blocks are sealed here, on the
//! hypervisor host, before they leave it; storage nodes, their disks and Raft logs only ever
//! hold ciphertext.
//!
//! Keys:
//! - the **key-encryption key** (KEK, [`Kek`]): 32 random bytes in a file only the attaching host
//!   holds (`--kek-file`); never sent anywhere;
//! - the volume's **data key** ([`DataKey`], per key version): 32 random bytes made by the client
//!   that creates the volume (or rotates its key), stored by the cluster only wrapped by the KEK
//!   ([`WrappedKey`]).
//!
//! Blocks: AES-256-GCM per 4 KiB block, in place, tag detached ([`CryptContext`] beside the
//! block's crc32c, which covers the ciphertext so scrub and repair need no key).
//!
//! ```text
//! nonce (12 bytes, big-endian):  key version u16 | writer's attach epoch u32 | counter u48
//! associated data (21 bytes):    format u8 = 1 | volume id u64 | block index u64 | key version u32
//! ```
//!
//! A nonce never repeats under one key: the attach epoch is unique to one read-write
//! attachment (the meta group raises it on every attach), the counter counts every block this
//! process seals and never goes back, and a writer that would exhaust either refuses to write
//! (rotate the key: a new key version starts fresh). The key version in the nonce tells a
//! reader which data key opens the block. The associated data binds a block to its volume and
//! address and to its key version, so a block copied elsewhere or relabelled does not open.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use basalt_common::{BLOCK_SIZE, CryptContext, VolumeId};
use sha2::{Digest, Sha256};
use thiserror::Error;
use zeroize::Zeroizing;

/// Length of a KEK and of a data key.
pub const KEY_LEN: usize = 32;

/// Version of the wrapped-key format ([`WrappedKey`]).
pub const WRAPPED_FORMAT: u8 = 1;

/// Length of a wrapped key: format, key version, KEK fingerprint, nonce, key, tag.
pub const WRAPPED_LEN: usize = 1 + 4 + 8 + 12 + KEY_LEN + 16;

/// Version of the block format (nonce layout and associated data).
const BLOCK_FORMAT: u8 = 1;

/// Largest counter value a nonce holds (48 bits).
const MAX_COUNTER: u64 = (1 << 48) - 1;

/// Why a key or block could not be used.
#[derive(Debug, Error)]
pub enum CryptError {
    /// The KEK file could not be read.
    #[error("key-encryption key {path}: {source}")]
    KekFile {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The KEK file does not hold exactly 32 bytes.
    #[error("key-encryption key {path} holds {len} bytes; a KEK is exactly 32 random bytes (head -c 32 /dev/urandom > FILE)")]
    KekLength {
        /// The file.
        path: String,
        /// Its length.
        len: u64,
    },
    /// The KEK is not the one the data key was wrapped with.
    #[error(
        "the key-encryption key does not open volume {volume}'s data key (version {version}): wrong --kek-file (it has fingerprint {given}, the key was wrapped with {wanted})"
    )]
    WrongKek {
        /// The volume.
        volume: String,
        /// Key version.
        version: u32,
        /// Fingerprint of the KEK given.
        given: String,
        /// Fingerprint of the KEK that wrapped the key.
        wanted: String,
    },
    /// The stored wrapped key is damaged (the right KEK, by its fingerprint, does not open it).
    #[error("volume {volume}'s stored data key (version {version}) is corrupt: {reason}")]
    CorruptKey {
        /// The volume.
        volume: String,
        /// Key version (0 if unreadable).
        version: u32,
        /// What is wrong.
        reason: String,
    },
    /// A block does not open: altered, moved, or sealed under a key this client does not have.
    #[error("{volume} block {block}: {reason}")]
    Block {
        /// The volume.
        volume: VolumeId,
        /// Block index in the volume.
        block: u64,
        /// What failed.
        reason: String,
    },
    /// This writer cannot seal more blocks without risking a repeated nonce.
    #[error("{0}")]
    Exhausted(String),
}

/// A key-encryption key, wiped from memory on drop.
pub struct Kek {
    key: Zeroizing<[u8; KEY_LEN]>,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kek({})", self.fingerprint_hex())
    }
}

impl Kek {
    /// Reads a KEK file: exactly 32 bytes.
    pub fn from_file(path: &Path) -> Result<Kek, CryptError> {
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| CryptError::KekFile { path: shown.clone(), source })?;
        if meta.len() != KEY_LEN as u64 {
            return Err(CryptError::KekLength { path: shown, len: meta.len() });
        }
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| CryptError::KekFile { path: shown.clone(), source })?);
        let key: [u8; KEY_LEN] = bytes.as_slice().try_into().map_err(|_| CryptError::KekLength { path: shown, len: bytes.len() as u64 })?;
        Ok(Kek { key: Zeroizing::new(key) })
    }

    /// A KEK from raw bytes (tests, tools).
    pub fn from_bytes(key: [u8; KEY_LEN]) -> Kek {
        Kek { key: Zeroizing::new(key) }
    }

    /// Identifies the KEK without revealing it: the first 8 bytes of SHA-256 over a label and
    /// the key (a 256-bit random key cannot be recovered from it).
    pub fn fingerprint(&self) -> [u8; 8] {
        let mut h = Sha256::new();
        h.update(b"basalt kek fingerprint v1");
        h.update(self.key.as_slice());
        let d = h.finalize();
        let mut out = [0u8; 8];
        out.copy_from_slice(&d[..8]);
        out
    }

    fn fingerprint_hex(&self) -> String {
        hex(&self.fingerprint())
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(self.key.as_slice().into())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Associated data of a wrapped key: binds it to its volume (by name: the id is assigned after
/// the key is made) and key version.
fn wrap_aad(volume: &str, version: u32) -> Vec<u8> {
    let mut aad = b"basalt data key v1\0".to_vec();
    aad.extend_from_slice(&version.to_be_bytes());
    aad.extend_from_slice(volume.as_bytes());
    aad
}

/// A data key wrapped by a KEK, as the cluster stores it (never the key itself):
/// `format u8 | key version u32 | KEK fingerprint [8] | nonce [12] | sealed key [32] | tag [16]`.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey(Vec<u8>);

impl std::fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WrappedKey(v{}, {} bytes)", self.version(), self.0.len())
    }
}

impl WrappedKey {
    /// Parses stored bytes, refusing an unknown format by name.
    pub fn parse(volume: &str, bytes: &[u8]) -> Result<WrappedKey, CryptError> {
        let corrupt = |reason: String| CryptError::CorruptKey { volume: volume.to_string(), version: 0, reason };
        match bytes.first() {
            None => return Err(corrupt("it is empty".into())),
            Some(&WRAPPED_FORMAT) => {}
            Some(other) => return Err(corrupt(format!("wrapped-key format {other} is unknown to this client (it reads format {WRAPPED_FORMAT})"))),
        }
        if bytes.len() != WRAPPED_LEN {
            return Err(corrupt(format!("{} bytes where format {WRAPPED_FORMAT} has {WRAPPED_LEN}", bytes.len())));
        }
        Ok(WrappedKey(bytes.to_vec()))
    }

    /// The stored bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The key version it holds.
    pub fn version(&self) -> u32 {
        self.0.get(1..5).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes).unwrap_or(0)
    }

    /// Fingerprint of the KEK that wrapped it.
    pub fn kek_fingerprint(&self) -> [u8; 8] {
        let mut f = [0u8; 8];
        f.copy_from_slice(&self.0[5..13]);
        f
    }

    /// Opens it with `kek`.
    pub fn unwrap_with(&self, kek: &Kek, volume: &str) -> Result<DataKey, CryptError> {
        let key = self.open(kek, volume)?;
        Ok(DataKey::from_bytes(self.version(), &key))
    }

    /// The raw data key, opened with `kek` (which must be the one that wrapped it).
    fn open(&self, kek: &Kek, volume: &str) -> Result<Zeroizing<[u8; KEY_LEN]>, CryptError> {
        let version = self.version();
        if kek.fingerprint() != self.kek_fingerprint() {
            return Err(CryptError::WrongKek {
                volume: volume.to_string(),
                version,
                given: kek.fingerprint_hex(),
                wanted: hex(&self.kek_fingerprint()),
            });
        }
        let nonce = Nonce::from_slice(&self.0[13..25]);
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        key.copy_from_slice(&self.0[25..25 + KEY_LEN]);
        let tag = Tag::from_slice(&self.0[25 + KEY_LEN..]);
        kek.cipher().decrypt_in_place_detached(nonce, &wrap_aad(volume, version), key.as_mut_slice(), tag).map_err(|_| CryptError::CorruptKey {
            volume: volume.to_string(),
            version,
            reason: "it does not authenticate under the key-encryption key that wrapped it (by fingerprint)".into(),
        })?;
        Ok(key)
    }
}

/// One version of a volume's data key, wiped from memory on drop (the cipher's key schedule
/// too: `aes-gcm`'s `zeroize` feature).
pub struct DataKey {
    version: u32,
    /// The volume whose id its blocks' associated data names, when that is not the volume
    /// holding the key: a key a clone (or a restored volume) inherited opens blocks that were
    /// sealed in the source volume. Such a key never seals.
    sealed_as: Option<VolumeId>,
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataKey(v{})", self.version)
    }
}

impl DataKey {
    fn from_bytes(version: u32, key: &[u8; KEY_LEN]) -> DataKey {
        DataKey { version, sealed_as: None, cipher: Aes256Gcm::new(key.into()) }
    }

    /// The same key, marked as opening blocks sealed in volume `source` (an inherited key).
    pub fn inherited_from(self, source: VolumeId) -> DataKey {
        DataKey { sealed_as: Some(source), ..self }
    }

    /// A fresh random data key of `version`, and the same key wrapped by `kek` for `volume`.
    pub fn generate(version: u32, kek: &Kek, volume: &str) -> Result<(DataKey, WrappedKey), CryptError> {
        if version == 0 || version > u32::from(u16::MAX) {
            return Err(CryptError::Exhausted(format!("key version {version} is outside 1..=65535")));
        }
        let key = Zeroizing::new(rand::random::<[u8; KEY_LEN]>());
        let wrapped = wrap(kek, volume, version, &key)?;
        Ok((DataKey::from_bytes(version, &key), wrapped))
    }

    /// The key version.
    pub fn version(&self) -> u32 {
        self.version
    }
}

fn wrap(kek: &Kek, volume: &str, version: u32, key: &[u8; KEY_LEN]) -> Result<WrappedKey, CryptError> {
    let nonce: [u8; 12] = rand::random();
    let mut sealed = Zeroizing::new(*key);
    let tag = kek
        .cipher()
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), &wrap_aad(volume, version), sealed.as_mut_slice())
        .map_err(|_| CryptError::CorruptKey { volume: volume.to_string(), version, reason: "AES-GCM refused to wrap it".into() })?;
    let mut out = Vec::with_capacity(WRAPPED_LEN);
    out.push(WRAPPED_FORMAT);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&kek.fingerprint());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(sealed.as_slice());
    out.extend_from_slice(tag.as_slice());
    Ok(WrappedKey(out))
}

/// Wraps the data key `wrapped` holds again under `new` (the data key and its blocks are
/// unchanged): what `volume rekey` without `--reencrypt` does.
pub fn rewrap(wrapped: &WrappedKey, old: &Kek, new: &Kek, volume: &str) -> Result<WrappedKey, CryptError> {
    let key = wrapped.open(old, volume)?;
    wrap(new, volume, wrapped.version(), &key)
}

/// Wraps the data key that `wrapped` holds for volume `from` again, under the same KEK, for
/// volume `to`: a clone (or a restore) gets its own copy of every key its inherited blocks
/// were sealed with, so deleting the source (which erases the source's copies) leaves it able
/// to read them.
pub fn rewrap_for(wrapped: &WrappedKey, kek: &Kek, from: &str, to: &str) -> Result<WrappedKey, CryptError> {
    let key = wrapped.open(kek, from)?;
    wrap(kek, to, wrapped.version(), &key)
}

fn block_aad(volume: VolumeId, block: u64, version: u32) -> [u8; 21] {
    let mut aad = [0u8; 21];
    aad[0] = BLOCK_FORMAT;
    aad[1..9].copy_from_slice(&volume.0.to_be_bytes());
    aad[9..17].copy_from_slice(&block.to_be_bytes());
    aad[17..21].copy_from_slice(&version.to_be_bytes());
    aad
}

/// Seals and opens one volume's blocks. Key versions can be added while it is in use (a
/// re-encryption makes a new version current).
#[derive(Debug)]
pub struct VolumeCipher {
    volume: VolumeId,
    keys: RwLock<BTreeMap<u32, Arc<DataKey>>>,
    /// The version new blocks are sealed with.
    current: AtomicU32,
    /// Blocks sealed by this process so far (the nonce counter).
    counter: AtomicU64,
}

/// The key version a block was sealed with (it leads the nonce).
pub fn block_version(ctx: &CryptContext) -> u32 {
    u32::from(u16::from_be_bytes([ctx.nonce[0], ctx.nonce[1]]))
}

impl VolumeCipher {
    /// A cipher for `volume` holding `keys`, sealing with version `current`.
    pub fn new(volume: VolumeId, keys: Vec<DataKey>, current: u32) -> Result<VolumeCipher, CryptError> {
        let keys: BTreeMap<u32, Arc<DataKey>> = keys.into_iter().map(|k| (k.version, Arc::new(k))).collect();
        if !keys.contains_key(&current) {
            return Err(CryptError::Exhausted(format!("{volume}: no data key of the current version {current}")));
        }
        Ok(VolumeCipher { volume, keys: RwLock::new(keys), current: AtomicU32::new(current), counter: AtomicU64::new(0) })
    }

    /// The version new blocks are sealed with.
    pub fn current_version(&self) -> u32 {
        self.current.load(Ordering::Acquire)
    }

    /// True if it holds key version `version`.
    pub fn holds(&self, version: u32) -> bool {
        self.keys_read().contains_key(&version)
    }

    /// The key versions held.
    pub fn versions(&self) -> Vec<u32> {
        self.keys_read().keys().copied().collect()
    }

    /// Adds key versions (known ones are kept) and seals with `current` from now on; a block
    /// being sealed meanwhile may still get the previous version.
    pub fn update(&self, keys: Vec<DataKey>, current: u32) -> Result<(), CryptError> {
        let mut held = self.keys.write().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            held.entry(k.version).or_insert_with(|| Arc::new(k));
        }
        if !held.contains_key(&current) {
            return Err(CryptError::Exhausted(format!("{}: no data key of the current version {current}", self.volume)));
        }
        self.current.store(current, Ordering::Release);
        Ok(())
    }

    /// Forgets every key version but the current one (a re-encryption finished: no block
    /// needs them).
    pub fn retire_older(&self) {
        let current = self.current_version();
        self.keys.write().unwrap_or_else(|p| p.into_inner()).retain(|v, _| *v == current);
    }

    fn keys_read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u32, Arc<DataKey>>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    fn key(&self, version: u32) -> Option<Arc<DataKey>> {
        self.keys_read().get(&version).cloned()
    }

    /// Seals whole blocks in place; `first_block` is the volume block index of `data`'s first
    /// block. `epoch` is the writer's attachment epoch (part of every nonce).
    pub fn seal(&self, epoch: u64, first_block: u64, data: &mut [u8]) -> Result<Vec<CryptContext>, CryptError> {
        let bs = BLOCK_SIZE as usize;
        if !data.len().is_multiple_of(bs) {
            return Err(CryptError::Exhausted(format!("{}: sealing {} bytes, not whole blocks", self.volume, data.len())));
        }
        let epoch = u32::try_from(epoch).ok().filter(|e| *e != 0).ok_or_else(|| {
            CryptError::Exhausted(format!(
                "{}: attachment epoch {epoch} cannot seal blocks (only a read-write attachment with an epoch below 2^32 writes)",
                self.volume
            ))
        })?;
        let current = self.current_version();
        let key = self.key(current).ok_or_else(|| CryptError::Exhausted(format!("{}: no data key of the current version {current}", self.volume)))?;
        if let Some(source) = key.sealed_as {
            // Its nonces belong to the source volume's writers; sealing here could repeat one.
            return Err(CryptError::Exhausted(format!("{}: key version {current} was inherited from {source} and only opens blocks", self.volume)));
        }
        let n = (data.len() / bs) as u64;
        let start = self.counter.fetch_add(n, Ordering::Relaxed);
        if start.saturating_add(n) > MAX_COUNTER {
            return Err(CryptError::Exhausted(format!(
                "{}: this attachment sealed 2^48 blocks under key version {current}; attach again (a new epoch) or rotate the key",
                self.volume
            )));
        }
        let mut out = Vec::with_capacity(n as usize);
        for (i, block) in data.chunks_mut(bs).enumerate() {
            let count = start + i as u64;
            let mut nonce = [0u8; 12];
            nonce[0..2].copy_from_slice(&(current as u16).to_be_bytes());
            nonce[2..6].copy_from_slice(&epoch.to_be_bytes());
            nonce[6..12].copy_from_slice(&count.to_be_bytes()[2..8]);
            let index = first_block + i as u64;
            let tag = key
                .cipher
                .encrypt_in_place_detached(Nonce::from_slice(&nonce), &block_aad(self.volume, index, current), block)
                .map_err(|_| CryptError::Block { volume: self.volume, block: index, reason: "AES-GCM refused to seal".into() })?;
            let mut t = [0u8; 16];
            t.copy_from_slice(tag.as_slice());
            out.push(CryptContext { nonce, tag: t });
        }
        Ok(out)
    }

    /// Opens whole blocks in place. A block without a context must read as zeros (unwritten or
    /// zeroed); it stays zeros.
    pub fn open(&self, first_block: u64, data: &mut [u8], contexts: &[Option<CryptContext>]) -> Result<(), CryptError> {
        let bs = BLOCK_SIZE as usize;
        let mut last: Option<(u32, Arc<DataKey>)> = None;
        for (i, block) in data.chunks_mut(bs).enumerate() {
            let index = first_block + i as u64;
            let fail = |reason: String| CryptError::Block { volume: self.volume, block: index, reason };
            let Some(ctx) = contexts.get(i).copied().flatten() else {
                if block.iter().any(|b| *b != 0) {
                    return Err(fail("stored without an encryption context in an encrypted volume".into()));
                }
                continue;
            };
            let version = block_version(&ctx);
            // One lookup per run of blocks of the same version.
            let key = match &last {
                Some((v, k)) if *v == version => k.clone(),
                _ => {
                    let k = self.key(version).ok_or_else(|| fail(format!("sealed with key version {version}, which this client does not hold")))?;
                    last = Some((version, k.clone()));
                    k
                }
            };
            key.cipher
                .decrypt_in_place_detached(
                    Nonce::from_slice(&ctx.nonce),
                    &block_aad(key.sealed_as.unwrap_or(self.volume), index, version),
                    block,
                    Tag::from_slice(&ctx.tag),
                )
                .map_err(|_| fail(format!("does not authenticate under key version {version} (altered, or not this block's)")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek(b: u8) -> Kek {
        Kek::from_bytes([b; 32])
    }

    #[test]
    fn a_wrapped_key_opens_with_its_kek_only_and_names_what_is_wrong() {
        let (_, w) = DataKey::generate(1, &kek(1), "vol").unwrap();
        assert_eq!(w.as_bytes().len(), WRAPPED_LEN);
        assert_eq!(w.version(), 1);
        let parsed = WrappedKey::parse("vol", w.as_bytes()).unwrap();
        assert_eq!(parsed.unwrap_with(&kek(1), "vol").unwrap().version(), 1);
        let e = parsed.unwrap_with(&kek(2), "vol").unwrap_err();
        assert!(matches!(e, CryptError::WrongKek { .. }), "{e}");
        assert!(e.to_string().contains("wrong --kek-file"), "{e}");
        // Bound to its volume: the same bytes under another name do not open.
        assert!(matches!(parsed.unwrap_with(&kek(1), "other").unwrap_err(), CryptError::CorruptKey { .. }));
        // A flipped bit in the sealed key: corrupt, by name.
        let mut bad = w.as_bytes().to_vec();
        bad[30] ^= 1;
        let e = WrappedKey::parse("vol", &bad).unwrap().unwrap_with(&kek(1), "vol").unwrap_err();
        assert!(matches!(e, CryptError::CorruptKey { .. }), "{e}");
        // Unknown format and wrong length refused by name.
        let mut v2 = w.as_bytes().to_vec();
        v2[0] = 2;
        assert!(WrappedKey::parse("vol", &v2).unwrap_err().to_string().contains("format 2 is unknown"));
        assert!(WrappedKey::parse("vol", &w.as_bytes()[..40]).is_err());
        assert!(WrappedKey::parse("vol", &[]).is_err());
        // Rewrapping keeps the data key.
        let re = rewrap(&w, &kek(1), &kek(3), "vol").unwrap();
        assert_ne!(re.as_bytes(), w.as_bytes());
        assert!(re.unwrap_with(&kek(1), "vol").is_err());
        let (a, b) = (w.unwrap_with(&kek(1), "vol").unwrap(), re.unwrap_with(&kek(3), "vol").unwrap());
        let ca = VolumeCipher::new(VolumeId(1), vec![a], 1).unwrap();
        let cb = VolumeCipher::new(VolumeId(1), vec![b], 1).unwrap();
        let mut block = vec![7u8; 4096];
        let ctx = ca.seal(5, 0, &mut block).unwrap();
        cb.open(0, &mut block, &[Some(ctx[0])]).unwrap();
        assert_eq!(block, vec![7u8; 4096]);
        assert!(rewrap(&w, &kek(9), &kek(3), "vol").is_err());
    }

    #[test]
    fn a_clone_opens_its_source_blocks_with_inherited_keys_and_seals_only_with_its_own() {
        let (k1, w1) = DataKey::generate(1, &kek(1), "parent").unwrap();
        let parent = VolumeCipher::new(VolumeId(3), vec![k1], 1).unwrap();
        let mut block = vec![9u8; 4096];
        let ctx = parent.seal(4, 6, &mut block).unwrap();
        // The clone's copy of version 1 is wrapped for its own name; the parent's name no
        // longer opens it, and another KEK does not rewrap it.
        let copy = rewrap_for(&w1, &kek(1), "parent", "clone").unwrap();
        assert!(copy.unwrap_with(&kek(1), "parent").is_err());
        assert!(rewrap_for(&w1, &kek(2), "parent", "clone").is_err());
        let inherited = copy.unwrap_with(&kek(1), "clone").unwrap().inherited_from(VolumeId(3));
        let (own, _) = DataKey::generate(2, &kek(1), "clone").unwrap();
        let clone = VolumeCipher::new(VolumeId(8), vec![inherited, own], 2).unwrap();
        let mut read = block.clone();
        clone.open(6, &mut read, &[Some(ctx[0])]).unwrap();
        assert_eq!(read, vec![9u8; 4096]);
        // Its own writes: version 2, bound to its own id.
        let mut mine = vec![1u8; 4096];
        let c2 = clone.seal(1, 6, &mut mine).unwrap();
        assert_eq!(block_version(&c2[0]), 2);
        assert!(parent.open(6, &mut mine.clone(), &[Some(c2[0])]).is_err());
        // An inherited key never seals (its nonces are the parent's).
        let only_inherited =
            VolumeCipher::new(VolumeId(8), vec![copy.unwrap_with(&kek(1), "clone").unwrap().inherited_from(VolumeId(3))], 1).unwrap();
        assert!(only_inherited.seal(1, 0, &mut vec![0u8; 4096]).unwrap_err().to_string().contains("inherited"));
    }

    #[test]
    fn kek_files_must_hold_exactly_32_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kek");
        std::fs::write(&p, [1u8; 32]).unwrap();
        assert_eq!(Kek::from_file(&p).unwrap().fingerprint(), kek(1).fingerprint());
        std::fs::write(&p, [1u8; 33]).unwrap();
        assert!(Kek::from_file(&p).unwrap_err().to_string().contains("holds 33 bytes"));
        assert!(matches!(Kek::from_file(&dir.path().join("none")), Err(CryptError::KekFile { .. })));
    }

    #[test]
    fn blocks_round_trip_never_repeat_and_do_not_open_elsewhere() {
        let (k1, _) = DataKey::generate(1, &kek(1), "v").unwrap();
        let c = VolumeCipher::new(VolumeId(7), vec![k1], 1).unwrap();
        let plain: Vec<u8> = (0..8192).map(|i| (i % 251) as u8).collect();
        let mut a = plain.clone();
        let ca = c.seal(3, 10, &mut a).unwrap();
        assert_ne!(a, plain);
        let mut b = plain.clone();
        let cb = c.seal(3, 10, &mut b).unwrap();
        assert_ne!(a, b, "the same data sealed twice differs");
        assert_ne!(ca[0].nonce, cb[0].nonce);
        assert_eq!(&ca[0].nonce[0..2], &[0, 1], "key version leads the nonce");
        assert_eq!(&ca[0].nonce[2..6], &3u32.to_be_bytes(), "then the epoch");
        let mut opened = a.clone();
        c.open(10, &mut opened, &[Some(ca[0]), Some(ca[1])]).unwrap();
        assert_eq!(opened, plain);
        // At another address, or with blocks swapped: refused.
        let mut moved = a.clone();
        assert!(c.open(11, &mut moved, &[Some(ca[0]), Some(ca[1])]).is_err());
        let mut swapped = [&a[4096..], &a[..4096]].concat();
        assert!(c.open(10, &mut swapped, &[Some(ca[1]), Some(ca[0])]).is_err());
        // Another volume with the same key: refused.
        let (k1b, _) = DataKey::generate(1, &kek(1), "v").unwrap();
        let other = VolumeCipher::new(VolumeId(8), vec![k1b], 1).unwrap();
        let mut x = a.clone();
        assert!(other.open(10, &mut x, &[Some(ca[0]), Some(ca[1])]).is_err());
        // A flipped bit: refused.
        let mut flipped = a.clone();
        flipped[100] ^= 4;
        let e = c.open(10, &mut flipped, &[Some(ca[0]), Some(ca[1])]).unwrap_err();
        assert!(e.to_string().contains("block 10"), "{e}");
        // Unwritten blocks stay zeros; plaintext without a context is refused.
        let mut zeros = vec![0u8; 4096];
        c.open(0, &mut zeros, &[None]).unwrap();
        let mut plain_block = vec![1u8; 4096];
        assert!(c.open(0, &mut plain_block, &[None]).is_err());
        // Epoch 0 (not attached) cannot seal.
        assert!(c.seal(0, 0, &mut vec![0u8; 4096]).is_err());
        assert!(c.seal(1 << 32, 0, &mut vec![0u8; 4096]).is_err());
    }

    #[test]
    fn blocks_of_an_older_key_version_open_while_new_ones_use_the_new_one() {
        let (k1, w1) = DataKey::generate(1, &kek(1), "v").unwrap();
        let (k2, _) = DataKey::generate(2, &kek(1), "v").unwrap();
        let old = VolumeCipher::new(VolumeId(1), vec![k1], 1).unwrap();
        let mut a = vec![5u8; 4096];
        let ca = old.seal(1, 0, &mut a).unwrap();
        let both = VolumeCipher::new(VolumeId(1), vec![w1.unwrap_with(&kek(1), "v").unwrap(), k2], 2).unwrap();
        let mut b = vec![6u8; 4096];
        let cb = both.seal(2, 1, &mut b).unwrap();
        assert_eq!(&cb[0].nonce[0..2], &[0, 2]);
        let mut a2 = a.clone();
        both.open(0, &mut a2, &[Some(ca[0])]).unwrap();
        assert_eq!(a2, vec![5u8; 4096]);
        let mut b2 = b.clone();
        assert!(old.open(1, &mut b2, &[Some(cb[0])]).unwrap_err().to_string().contains("key version 2"));
        assert!(VolumeCipher::new(VolumeId(1), vec![], 1).is_err());
    }

    #[test]
    fn a_cipher_takes_new_versions_while_in_use_and_drops_the_old_ones() {
        let (k1, w1) = DataKey::generate(1, &kek(1), "v").unwrap();
        let (k2, _) = DataKey::generate(2, &kek(2), "v").unwrap();
        let c = VolumeCipher::new(VolumeId(1), vec![k1], 1).unwrap();
        let mut a = vec![5u8; 4096];
        let ca = c.seal(1, 0, &mut a).unwrap();
        assert!(c.update(vec![], 2).is_err(), "no key for the version");
        c.update(vec![w1.unwrap_with(&kek(1), "v").unwrap(), k2], 2).unwrap();
        assert_eq!((c.current_version(), c.versions()), (2, vec![1, 2]));
        let mut b = vec![6u8; 4096];
        let cb = c.seal(1, 1, &mut b).unwrap();
        assert_eq!(block_version(&cb[0]), 2);
        let mut a2 = a.clone();
        c.open(0, &mut a2, &[Some(ca[0])]).unwrap();
        c.retire_older();
        assert_eq!(c.versions(), vec![2]);
        let mut a3 = a.clone();
        assert!(c.open(0, &mut a3, &[Some(ca[0])]).unwrap_err().to_string().contains("key version 1"));
        let mut b2 = b.clone();
        c.open(1, &mut b2, &[Some(cb[0])]).unwrap();
        assert_eq!(b2, vec![6u8; 4096]);
    }
}
