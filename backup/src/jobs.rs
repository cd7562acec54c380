//! A backup node's two jobs: copying a snapshot into the store (incrementally) and restoring
//! a backup into a new volume. Chunk reads and writes run a few at a time, so a copy keeps
//! several PG leaders busy; store calls go to blocking threads.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use basalt_common::CHUNK_SIZE;
use basalt_volume_client::{ClientError, Volume};
use futures::TryStreamExt;

use crate::error::{BackupError, Result};
use crate::format::{Manifest, ManifestChunk, PieceId};
use crate::store::BackupStore;

/// Chunks read or written at once by one job.
const PARALLEL_CHUNKS: usize = 8;

/// How often a restore records how far it got.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

/// A job's progress, shared with whoever shows it.
#[derive(Debug, Default)]
pub struct Progress {
    /// Chunks done.
    pub done: AtomicU64,
    /// Chunks in all.
    pub total: AtomicU64,
    /// Bytes moved (read from the cluster for a copy, written for a restore).
    pub bytes: AtomicU64,
}

/// What a finished copy moved and stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyOutcome {
    /// Bytes of chunks with data.
    pub data_bytes: u64,
    /// Bytes read from the cluster (changed chunks).
    pub changed_bytes: u64,
    /// Bytes of new pieces written.
    pub stored_bytes: u64,
    /// The backup it is incremental to (0: none).
    pub parent: u64,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| BackupError::Task(e.to_string()))?
}

/// What a copy asks for: backup `backup` of `volume`'s snapshot at `epoch`.
#[derive(Clone, Debug)]
pub struct CopyJob {
    /// The backup's id.
    pub backup: u64,
    /// The volume's id and name.
    pub volume_id: u64,
    /// See `volume_id`.
    pub volume: String,
    /// The snapshot and its epoch.
    pub snapshot: String,
    /// See `snapshot`.
    pub epoch: u64,
    /// The volume's size when the backup was asked for (what a restore creates).
    pub size: u64,
}

/// The piece references a copy has taken, and whether the copy was given up. A piece stored
/// on a blocking thread is recorded there, under this lock: if the copy has failed
/// meanwhile (its future dropped, nobody waiting for the store), the reference is dropped at
/// once instead of leaking until the node restarts.
#[derive(Default)]
struct Held {
    pieces: Vec<PieceId>,
    abandoned: bool,
}

impl Held {
    /// Records the reference just taken on `piece`, or drops it if the copy was given up.
    fn keep(held: &std::sync::Mutex<Held>, store: &BackupStore, piece: PieceId) -> Result<()> {
        let mut h = held.lock().unwrap_or_else(|p| p.into_inner());
        if !h.abandoned {
            h.pieces.push(piece);
            return Ok(());
        }
        drop(h);
        store.release([piece]).map(|_| ())
    }

    /// Gives the copy up: drops every reference it took (and, through [`Held::keep`], those
    /// its stores still running take later).
    async fn abandon(held: &Arc<std::sync::Mutex<Held>>, store: &Arc<BackupStore>, backup: u64) {
        let pieces = {
            let mut h = held.lock().unwrap_or_else(|p| p.into_inner());
            h.abandoned = true;
            std::mem::take(&mut h.pieces)
        };
        let store = store.clone();
        if let Err(e) = blocking(move || store.release(pieces)).await {
            tracing::warn!(backup, error = %e, "could not drop a failed copy's pieces; they go when the node restarts");
        }
    }
}

/// Copies the snapshot `snap` (a handle opened on it) into `store` as backup `job.backup`:
/// only chunks whose version this node's previous backup of the volume did not copy are read.
/// The manifest is written last; on an error, the references taken are dropped.
pub async fn copy(snap: &Volume, store: Arc<BackupStore>, job: &CopyJob, progress: &Progress) -> Result<CopyOutcome> {
    let cluster_err = |source: ClientError| BackupError::Cluster { volume: job.volume.clone(), source };
    if snap.snapshot().map(|(_, e)| e) != Some(job.epoch) {
        return Err(BackupError::Changed(format!("snapshot {}@{} is not at epoch {} any more", job.volume, job.snapshot, job.epoch)));
    }
    let versions = snap.chunk_versions().await.map_err(cluster_err)?;
    let sealed = snap.stored_sealed();
    let parent = {
        let store = store.clone();
        let (volume, epoch) = (job.volume_id, job.epoch);
        blocking(move || store.parent_of(volume, epoch)).await?
    };
    // A piece is reused for the same version of the same chunk, at the same length (a grown
    // volume's last chunk is longer now).
    let known: HashMap<(u64, u64, u64, u32), PieceId> =
        parent.iter().flat_map(|m| m.chunks.iter().map(|c| ((c.chunk, c.owner, c.epoch, c.len), c.piece))).collect();
    // Chunks past the size the backup was asked at are not part of it.
    let size = job.size;
    let versions: Vec<_> = versions.into_iter().filter(|(chunk, _, _)| chunk * CHUNK_SIZE < size).collect();
    progress.total.store(versions.len() as u64, Ordering::Relaxed);
    let changed = AtomicU64::new(0);
    let stored = AtomicU64::new(0);
    let held = Arc::new(std::sync::Mutex::new(Held::default()));
    let result: Result<Vec<ManifestChunk>> = futures::stream::iter(versions.into_iter().map(Ok))
        .map_ok(|(chunk, owner, epoch)| {
            let (store, known, changed, stored, held) = (store.clone(), &known, &changed, &stored, &held);
            async move {
                let offset = chunk * CHUNK_SIZE;
                let len = CHUNK_SIZE.min(size.saturating_sub(offset));
                let reused = match known.get(&(chunk, owner.0, epoch, len as u32)) {
                    Some(p) => {
                        let (store, p, held) = (store.clone(), *p, held.clone());
                        blocking(move || {
                            if !store.hold(&p) {
                                return Ok(None);
                            }
                            Held::keep(&held, &store, p)?;
                            Ok(Some(p))
                        })
                        .await?
                    }
                    None => None,
                };
                let piece = match reused {
                    Some(p) => p,
                    None => {
                        let cluster_err = |source| BackupError::Cluster { volume: job.volume.clone(), source };
                        // An encrypted volume's chunk is copied as stored, contexts and all:
                        // the backup tier never holds a key.
                        let data = if sealed {
                            let (data, contexts) = snap.read_sealed(offset, len).await.map_err(cluster_err)?;
                            crate::format::sealed_payload(&data, &contexts).into()
                        } else {
                            snap.read(offset, len).await.map_err(cluster_err)?
                        };
                        changed.fetch_add(len, Ordering::Relaxed);
                        progress.bytes.fetch_add(len, Ordering::Relaxed);
                        let held = held.clone();
                        let (id, written) = blocking(move || {
                            let (id, written) = store.put(&data)?;
                            Held::keep(&held, &store, id)?;
                            Ok((id, written))
                        })
                        .await?;
                        stored.fetch_add(written, Ordering::Relaxed);
                        id
                    }
                };
                progress.done.fetch_add(1, Ordering::Relaxed);
                Ok(ManifestChunk { chunk, owner: owner.0, epoch, piece, len: len as u32 })
            }
        })
        .try_buffered(PARALLEL_CHUNKS)
        .try_collect()
        .await;
    let chunks = match result {
        Ok(c) => c,
        Err(e) => {
            Held::abandon(&held, &store, job.backup).await;
            return Err(e);
        }
    };
    let data_bytes = chunks.iter().map(|c| u64::from(c.len)).sum();
    let manifest = Manifest {
        backup: job.backup,
        volume: job.volume_id,
        volume_name: job.volume.clone(),
        snapshot: job.snapshot.clone(),
        epoch: job.epoch,
        size,
        chunks,
        sealed,
    };
    let committed = {
        let store = store.clone();
        blocking(move || store.commit(&manifest)).await
    };
    if let Err(e) = committed {
        Held::abandon(&held, &store, job.backup).await;
        return Err(e);
    }
    Ok(CopyOutcome { data_bytes, changed_bytes: changed.into_inner(), stored_bytes: stored.into_inner(), parent: parent.map_or(0, |m| m.backup) })
}

/// Writes backup `manifest` into `volume` (a new volume this restore holds), from chunk
/// `from_chunk` on, in chunk order. `checkpoint` is called with the first chunk not yet
/// written at least every [`CHECKPOINT_EVERY`] (where a restarted restore goes on). A damaged
/// piece stops the restore, naming it.
pub async fn restore<F, Fut>(
    volume: &Volume,
    store: Arc<BackupStore>,
    manifest: &Manifest,
    from_chunk: u64,
    progress: &Progress,
    mut checkpoint: F,
) -> Result<()>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let todo: Vec<ManifestChunk> = manifest.chunks.iter().filter(|c| c.chunk >= from_chunk).cloned().collect();
    progress.total.store(manifest.chunks.len() as u64, Ordering::Relaxed);
    progress.done.store((manifest.chunks.len() - todo.len()) as u64, Ordering::Relaxed);
    let name = volume.name().to_string();
    let mut written = futures::stream::iter(todo.into_iter().map(Ok))
        .map_ok(|c| {
            let (store, name) = (store.clone(), name.clone());
            async move {
                let piece = c.piece;
                let data = blocking(move || store.read(&piece)).await?;
                let offset = c.chunk * CHUNK_SIZE;
                let written = if manifest.sealed {
                    let (ciphertext, contexts) = crate::format::split_sealed(&data, c.len as usize)
                        .map_err(|why| BackupError::Piece { piece: piece.to_hex(), why: format!("chunk {}: {why}", c.chunk) })?;
                    volume.write_presealed(offset, data.slice_ref(ciphertext), &contexts).await
                } else {
                    if data.len() != c.len as usize {
                        return Err(BackupError::Piece {
                            piece: piece.to_hex(),
                            why: format!("holds {} bytes, chunk {} needs {}", data.len(), c.chunk, c.len),
                        });
                    }
                    volume.write(offset, data, false).await
                };
                written.map_err(|source| BackupError::Cluster { volume: name, source })?;
                progress.bytes.fetch_add(u64::from(c.len), Ordering::Relaxed);
                progress.done.fetch_add(1, Ordering::Relaxed);
                Ok(c.chunk)
            }
        })
        .try_buffered(PARALLEL_CHUNKS);
    let mut last_checkpoint = Instant::now();
    while let Some(chunk) = written.try_next().await? {
        if last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
            // Completions come in chunk order: everything up to this one is written.
            checkpoint(chunk + 1).await;
            last_checkpoint = Instant::now();
        }
    }
    drop(written);
    volume.flush().await.map_err(|source| BackupError::Cluster { volume: volume.name().to_string(), source })?;
    Ok(())
}

/// Reads every piece of `manifest` back and checks it, counting pieces and bytes in
/// `progress` as it goes; returns the pieces, bytes and one line per bad piece.
pub fn verify(store: &BackupStore, manifest: &Manifest, progress: &Progress) -> (u64, u64, Vec<String>) {
    let mut bad = Vec::new();
    let mut bytes = 0u64;
    let mut seen = std::collections::HashSet::new();
    let pieces: std::collections::HashSet<_> = manifest.chunks.iter().map(|c| (c.piece, c.len)).collect();
    progress.total.store(pieces.len() as u64, Ordering::Relaxed);
    for c in &manifest.chunks {
        if !seen.insert((c.piece, c.len)) {
            continue;
        }
        let checked = store.read(&c.piece);
        progress.done.fetch_add(1, Ordering::Relaxed);
        progress.bytes.fetch_add(checked.as_ref().map(|d| d.len() as u64).unwrap_or(0), Ordering::Relaxed);
        match checked {
            Ok(d) if manifest.sealed => match crate::format::split_sealed(&d, c.len as usize) {
                Ok(_) => bytes += u64::from(c.len),
                Err(why) => bad.push(format!("chunk {} (offset {}): piece {} {why}", c.chunk, c.chunk * CHUNK_SIZE, c.piece.to_hex())),
            },
            Ok(d) if d.len() == c.len as usize => bytes += d.len() as u64,
            Ok(d) => bad.push(format!(
                "chunk {} (offset {}): piece {} holds {} bytes, the chunk {}",
                c.chunk,
                c.chunk * CHUNK_SIZE,
                c.piece.to_hex(),
                d.len(),
                c.len
            )),
            Err(e) => bad.push(format!("chunk {} (offset {}): {e}", c.chunk, c.chunk * CHUNK_SIZE)),
        }
    }
    (seen.len() as u64, bytes, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_piece_stored_after_its_copy_failed_is_released_not_leaked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BackupStore::open(dir.path()).unwrap());
        let held = Arc::new(std::sync::Mutex::new(Held::default()));
        // Stored while the copy runs: kept, and released when the copy fails.
        let (early, _) = store.put(&[1u8; 4096]).unwrap();
        Held::keep(&held, &store, early).unwrap();
        Held::abandon(&held, &store, 1).await;
        assert!(store.read(&early).is_err(), "the failed copy's piece is erased");
        // A store still running on a blocking thread when the copy failed finishes later.
        let (late, _) = store.put(&[2u8; 4096]).unwrap();
        Held::keep(&held, &store, late).unwrap();
        assert!(store.read(&late).is_err(), "a piece stored after the failure is erased too");
        assert_eq!(store.usage().unwrap().0, 0);
    }
}
