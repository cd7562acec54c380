//! A backup node's store: pieces and manifests in a directory.
//!
//! ```text
//! DIR/pieces/ab/abcdef…   one chunk's data, named by the SHA-256 of its plain bytes
//! DIR/manifests/N         backup N: which piece holds each chunk (written last, atomically)
//! ```
//!
//! A piece is stored once however many chunks and backups hold the same bytes (deduplication
//! within and across a volume's backups), LZ4-compressed when that is smaller, with a crc32c
//! of the stored bytes; reading it checks that crc and the SHA-256 of what it decompresses to.
//! Pieces are counted by the manifests that name them (and by copies in flight); a piece no
//! longer counted is overwritten with zeros and synced before it is unlinked, so pruned
//! backup data is gone from the disk, not just from the directory. A copy killed before its
//! manifest leaves pieces nothing counts: [`BackupStore::open`] overwrites them.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::error::{BackupError, Result};
use crate::format::{Manifest, Piece, PieceId};

/// Bytes overwritten per write when a piece is erased.
const ERASE_BUF: usize = 1 << 20;

/// A backup node's pieces and manifests.
pub struct BackupStore {
    dir: PathBuf,
    /// References to each piece: manifest entries plus copies in flight.
    refs: Mutex<HashMap<PieceId, u64>>,
}

fn io(path: &Path, source: std::io::Error) -> BackupError {
    BackupError::Io { path: path.to_path_buf(), source }
}

/// Writes `bytes` to `path` through a temporary file, synced, renamed into place, directory
/// synced: after a crash the file is either absent or whole.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    // Unique: two copies may store the same piece at once.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.{n}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).map_err(|e| io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io(&tmp, e))?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io(path, e))?;
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))?;
    }
    Ok(())
}

/// Overwrites `path` with zeros, syncs, and unlinks it.
fn erase(path: &Path) -> Result<()> {
    let mut f = match OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(path, e)),
    };
    let len = f.metadata().map_err(|e| io(path, e))?.len();
    let zeros = vec![0u8; ERASE_BUF];
    let mut left = len;
    while left > 0 {
        let n = left.min(ERASE_BUF as u64) as usize;
        f.write_all(&zeros[..n]).map_err(|e| io(path, e))?;
        left -= n as u64;
    }
    f.sync_all().map_err(|e| io(path, e))?;
    fs::remove_file(path).map_err(|e| io(path, e))
}

impl BackupStore {
    /// Opens (creating) the store in `dir`: counts the pieces its manifests name and erases
    /// the pieces and temporary files nothing names (a copy that died before its manifest).
    pub fn open(dir: &Path) -> Result<BackupStore> {
        for sub in ["pieces", "manifests"] {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(|e| io(&p, e))?;
        }
        let store = BackupStore { dir: dir.to_path_buf(), refs: Mutex::new(HashMap::new()) };
        let mut refs = HashMap::new();
        let mut unreadable = 0;
        // One at a time: a large volume's manifest is tens of MB.
        for id in store.backup_ids()? {
            match store.manifest(id) {
                Ok(Some(m)) => {
                    for c in &m.chunks {
                        *refs.entry(c.piece).or_insert(0u64) += 1;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "a backup manifest is unreadable; its backup cannot be restored from this node");
                    unreadable += 1;
                }
            }
        }
        let mut erased = 0u64;
        // With a manifest unreadable, which pieces it names is unknown: none is erased.
        for path in store.piece_files()?.into_iter().filter(|_| unreadable == 0) {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let named = PieceId::from_hex(name).is_some_and(|id| refs.contains_key(&id));
            if !named {
                erase(&path)?;
                erased += 1;
            }
        }
        for entry in fs::read_dir(dir.join("manifests")).map_err(|e| io(dir, e))? {
            let path = entry.map_err(|e| io(dir, e))?.path();
            if path.extension().is_some_and(|e| e == "tmp") || path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.parse::<u64>().is_err()) {
                erase(&path)?;
            }
        }
        if erased > 0 {
            tracing::info!(dir = %dir.display(), erased, "erased backup pieces no complete backup names (a copy stopped before it finished)");
        }
        *store.refs.lock().unwrap_or_else(|p| p.into_inner()) = refs;
        Ok(store)
    }

    fn piece_path(&self, id: &PieceId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join("pieces").join(&hex[..2]).join(hex)
    }

    fn manifest_path(&self, backup: u64) -> PathBuf {
        self.dir.join("manifests").join(backup.to_string())
    }

    fn piece_files(&self) -> Result<Vec<PathBuf>> {
        let root = self.dir.join("pieces");
        let mut out = Vec::new();
        for d in fs::read_dir(&root).map_err(|e| io(&root, e))? {
            let d = d.map_err(|e| io(&root, e))?.path();
            if !d.is_dir() {
                continue;
            }
            for f in fs::read_dir(&d).map_err(|e| io(&d, e))? {
                out.push(f.map_err(|e| io(&d, e))?.path());
            }
        }
        Ok(out)
    }

    /// Stores `data` as a piece (unless an identical one is stored) and takes a reference to
    /// it for the caller's copy. Returns its id and the bytes written (0 if it was held).
    pub fn put(&self, data: &[u8]) -> Result<(PieceId, u64)> {
        let id = PieceId(Sha256::digest(data).into());
        if self.hold(&id) {
            return Ok((id, 0));
        }
        let encoded = Piece::encode(data);
        let path = self.piece_path(&id);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        write_atomic(&path, &encoded)?;
        let mut refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
        // A release erases under this lock: the same bytes may have been erased as a deleted
        // backup's between the write and now.
        if !path.exists() {
            write_atomic(&path, &encoded)?;
        }
        *refs.entry(id).or_insert(0) += 1;
        Ok((id, encoded.len() as u64))
    }

    /// Takes a reference to piece `id` if it is stored (a chunk unchanged since the previous
    /// backup, or bytes seen before).
    pub fn hold(&self, id: &PieceId) -> bool {
        let mut refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
        match refs.get_mut(id) {
            Some(n) if *n > 0 => {
                *n += 1;
                true
            }
            _ => false,
        }
    }

    /// Drops references taken by [`BackupStore::put`] and [`BackupStore::hold`] (a copy that
    /// failed, or a deleted manifest's); pieces no longer referenced are erased.
    pub fn release(&self, pieces: impl IntoIterator<Item = PieceId>) -> Result<u64> {
        // Erased under the lock, so a `put` of the same bytes sees the file gone and writes
        // it again (deletions are rare; copies rarely wait on this).
        let mut refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
        let mut gone = 0;
        for id in pieces {
            if let Some(n) = refs.get_mut(&id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    refs.remove(&id);
                    erase(&self.piece_path(&id))?;
                    gone += 1;
                }
            }
        }
        Ok(gone)
    }

    /// Reads piece `id` back, checking its stored crc and the SHA-256 of its bytes.
    pub fn read(&self, id: &PieceId) -> Result<Bytes> {
        let path = self.piece_path(id);
        let mut raw = Vec::new();
        File::open(&path).and_then(|mut f| f.read_to_end(&mut raw)).map_err(|e| BackupError::Piece { piece: id.to_hex(), why: e.to_string() })?;
        let data = Piece::decode(&raw).map_err(|why| BackupError::Piece { piece: id.to_hex(), why })?;
        let actual = PieceId(Sha256::digest(&data).into());
        if actual != *id {
            return Err(BackupError::Piece { piece: id.to_hex(), why: format!("its bytes hash to {}", actual.to_hex()) });
        }
        Ok(Bytes::from(data))
    }

    /// Writes backup `m.backup`'s manifest: from now on it is a whole copy. The references
    /// its copy took become the manifest's. A second copy of the same backup is refused (its
    /// references would never be dropped).
    pub fn commit(&self, m: &Manifest) -> Result<()> {
        let path = self.manifest_path(m.backup);
        if path.exists() {
            return Err(BackupError::Changed(format!("backup {} is already held whole on this node", m.backup)));
        }
        write_atomic(&path, &m.encode())
    }

    /// Whether this store holds a whole copy of backup `backup` (without reading it).
    pub fn has(&self, backup: u64) -> bool {
        self.manifest_path(backup).exists()
    }

    /// Backup `backup`'s manifest, if this store holds a whole copy of it.
    pub fn manifest(&self, backup: u64) -> Result<Option<Manifest>> {
        let path = self.manifest_path(backup);
        match fs::read(&path) {
            Ok(bytes) => Manifest::decode(&bytes).map(Some).map_err(|why| BackupError::Manifest { path, why }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path, e)),
        }
    }

    /// The backups this store holds a whole copy of, ascending (without reading them).
    pub fn backup_ids(&self) -> Result<Vec<u64>> {
        let dir = self.dir.join("manifests");
        let mut ids: Vec<u64> = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| io(&dir, e))? {
            let path = entry.map_err(|e| io(&dir, e))?.path();
            if let Some(id) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse().ok()) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// The newest whole backup of `volume` older than `epoch`: what a new one is incremental
    /// to. Manifests are read one at a time; an unreadable one is passed over (a full copy is
    /// the safe side).
    pub fn parent_of(&self, volume: u64, epoch: u64) -> Result<Option<Manifest>> {
        let mut best: Option<Manifest> = None;
        for id in self.backup_ids()?.into_iter().rev() {
            let m = match self.manifest(id) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "passing over an unreadable backup manifest");
                    continue;
                }
            };
            if m.volume == volume && m.epoch < epoch && best.as_ref().is_none_or(|b| (m.epoch, m.backup) > (b.epoch, b.backup)) {
                best = Some(m);
            }
        }
        Ok(best)
    }

    /// Deletes backup `backup`'s copy: its manifest goes, and the pieces nothing else names are
    /// overwritten and unlinked. Returns the pieces erased.
    pub fn delete(&self, backup: u64) -> Result<u64> {
        // Claimed by a rename first: of two deletes at once, one releases the pieces; a crash
        // after it leaves a file `open` erases (and the pieces it named, nothing else names).
        let path = self.manifest_path(backup);
        let mut claimed = path.as_os_str().to_owned();
        claimed.push(".deleting");
        let claimed = PathBuf::from(claimed);
        match fs::rename(&path, &claimed) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io(&path, e)),
        }
        let bytes = fs::read(&claimed).map_err(|e| io(&claimed, e))?;
        let m = Manifest::decode(&bytes).map_err(|why| BackupError::Manifest { path: claimed.clone(), why })?;
        let erased = self.release(m.chunks.iter().map(|c| c.piece))?;
        erase(&claimed)?;
        Ok(erased)
    }

    /// Pieces stored and their bytes on disk.
    pub fn usage(&self) -> Result<(u64, u64)> {
        let files = self.piece_files()?;
        let bytes = files.iter().filter_map(|p| p.metadata().ok()).map(|m| m.len()).sum();
        Ok((files.len() as u64, bytes))
    }

    /// The file piece `id` is stored in (for tests that damage one).
    pub fn piece_file(&self, id: &PieceId) -> PathBuf {
        self.piece_path(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ManifestChunk;

    fn manifest(backup: u64, epoch: u64, chunks: &[(u64, PieceId)]) -> Manifest {
        Manifest {
            backup,
            volume: 7,
            volume_name: "v".into(),
            snapshot: format!("s{backup}"),
            epoch,
            size: 64 << 20,
            chunks: chunks.iter().map(|(c, p)| ManifestChunk { chunk: *c, owner: 7, epoch, piece: *p, len: 1 << 20 }).collect(),
            sealed: false,
        }
    }

    fn grep(dir: &Path, needle: &[u8]) -> bool {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if fs::read(&p).unwrap().windows(needle.len()).any(|w| w == needle) {
                    return true;
                }
            }
        }
        false
    }

    #[test]
    fn pieces_dedup_verify_and_are_erased_when_no_backup_names_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = BackupStore::open(dir.path()).unwrap();
        let mut a = vec![0u8; 1 << 20];
        a[..16].copy_from_slice(b"MARKER-IN-PIECE!");
        // splitmix64: bytes LZ4 cannot shrink.
        let b: Vec<u8> = (0..(1u64 << 17))
            .flat_map(|i| {
                let mut z = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                (z ^ (z >> 31)).to_le_bytes()
            })
            .collect();
        let (pa, wa) = store.put(&a).unwrap();
        let (pa2, wa2) = store.put(&a).unwrap();
        assert_eq!((pa, wa2), (pa2, 0), "identical bytes are stored once");
        assert!(wa < 64 << 10, "mostly-zero data compresses ({wa} bytes)");
        let (pb, wb) = store.put(&b).unwrap();
        assert!(wb >= 1 << 20, "incompressible data is stored as is");
        assert_eq!(store.read(&pa).unwrap(), Bytes::from(a.clone()));
        let first = manifest(1, 3, &[(0, pa), (5, pa2), (9, pb)]);
        store.commit(&first).unwrap();
        // Verifying reads each distinct piece once, counting as it goes.
        let progress = crate::jobs::Progress::default();
        let (pieces, bytes, bad) = crate::jobs::verify(&store, &first, &progress);
        assert_eq!((pieces, bytes, bad.len()), (2, 2 << 20, 0));
        let counted = |p: &crate::jobs::Progress| [&p.done, &p.total, &p.bytes].map(|a| a.load(std::sync::atomic::Ordering::Relaxed));
        assert_eq!(counted(&progress), [2, 2, 2 << 20]);
        // A second backup holds the marker piece again; the first is deleted.
        assert!(store.hold(&pa));
        store.commit(&manifest(2, 5, &[(0, pa)])).unwrap();
        assert_eq!(store.parent_of(7, 6).unwrap().map(|m| m.backup), Some(2));
        assert_eq!(store.parent_of(7, 5).unwrap().map(|m| m.backup), Some(1));
        assert_eq!(store.delete(1).unwrap(), 1, "only the piece no other backup names goes");
        assert!(store.read(&pb).is_err());
        assert!(grep(dir.path(), b"MARKER-IN-PIECE!"), "the marker is stored (LZ4 keeps literals)");

        // Reopening counts what the manifests name; a copy that died leaves nothing behind.
        drop(store);
        let store = BackupStore::open(dir.path()).unwrap();
        let (orphan, _) = store.put(&b).unwrap();
        drop(store);
        let store = BackupStore::open(dir.path()).unwrap();
        assert!(store.read(&orphan).is_err(), "a piece no manifest names is erased at open");
        assert_eq!(store.read(&pa).unwrap().len(), 1 << 20);

        // A damaged piece is named by its read.
        let path = store.piece_file(&pa);
        let mut raw = fs::read(&path).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 0xFF;
        fs::write(&path, raw).unwrap();
        let e = store.read(&pa).unwrap_err().to_string();
        assert!(e.contains(&pa.to_hex()), "{e}");
        store.delete(2).unwrap();
        assert_eq!(store.usage().unwrap().0, 0);
        assert!(!grep(dir.path(), b"MARKER-IN-PIECE!"), "erased pieces leave no data behind");
    }
}
