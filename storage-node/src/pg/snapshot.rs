//! Streaming a placement group's state to a new or lagging replica.
//!
//! The sender streams its live chunks (a "fuzzy" copy taken while writes continue); the
//! receiver stages them in a separate shard and swaps them in only when the transfer completes,
//! inside the state machine's install step, so a half-received snapshot never mixes with live
//! data and never races the apply path. Raft then replays the log from the snapshot's index,
//! which makes the fuzzy copy exact (every command is an idempotent overwrite).
//!
//! Stream format: length-prefixed records, `[len u32 LE][record]`:
//! - `[0x01][n u32][n × volume u64]`: the PG's deleted-volume tombstones (first record);
//! - `[0x02][n u32][n × (volume u64, epoch u64)]`: the highest attachment epoch per volume;
//! - `[0x03][n u32][n × (volume u64, epoch u64)]`: the highest snapshot write epoch per volume;
//! - a [`ChunkImage`] (tag `0xC2`): one chunk version's written blocks.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::Ordering;

use basalt_chunk_store::{Batch, ChunkImage, ChunkKey};
use basalt_common::VolumeId;
use basalt_raft::{CheckpointRecord, SnapshotReceiver, SnapshotSink, SnapshotStream};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::sync::OwnedMutexGuard;

use super::state_machine::{APPLIED_KEY, PgShared};

/// Shard-state key prefix of deleted-volume tombstones.
pub(crate) const TOMBSTONE_PREFIX: &[u8] = b"tomb/";
/// Shard-state key prefix of per-volume attachment epochs.
pub(crate) const EPOCH_PREFIX: &[u8] = b"epoch/";
/// Shard-state key prefix of per-volume snapshot write epochs.
pub(crate) const WRITE_EPOCH_PREFIX: &[u8] = b"wepoch/";
const RECORD_TOMBSTONES: u8 = 0x01;
const RECORD_EPOCHS: u8 = 0x02;
const RECORD_WRITE_EPOCHS: u8 = 0x03;

/// What a PG refuses by, besides its data: deleted volumes, and per volume the newest
/// attachment epoch and snapshot write epoch applied.
#[derive(Debug, Default)]
pub struct Fences {
    /// Deleted volumes.
    pub tombstones: HashSet<VolumeId>,
    /// Highest attachment epoch per volume.
    pub epochs: HashMap<VolumeId, u64>,
    /// Highest snapshot write epoch per volume.
    pub write_epochs: HashMap<VolumeId, u64>,
}
/// Bytes gathered into one transfer chunk.
const CHUNK_TARGET: usize = 2 << 20;

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Counts a transfer in flight while alive. Taken when streaming starts (not when a handle is
/// created: openraft keeps the handle of the last checkpoint around), released at the end of
/// the stream or when the handle is dropped.
struct TransferGuard(PgShared);

impl TransferGuard {
    fn new(shared: &PgShared) -> Self {
        shared.transfers.fetch_add(1, Ordering::AcqRel);
        Self(shared.clone())
    }
}

impl Drop for TransferGuard {
    fn drop(&mut self) {
        self.0.transfers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A PG snapshot: either the live state to stream out, or a received copy waiting in staging.
pub enum PgSnapshot {
    /// Streams the PG's current chunks.
    Outgoing(Box<Outgoing>),
    /// A complete transfer held in the staging shard.
    Staged {
        /// What the sender refused by.
        fences: Fences,
        /// Holds the PG's staging area until installed or dropped.
        _staging: OwnedMutexGuard<()>,
    },
}

/// State of an outgoing stream.
pub struct Outgoing {
    shared: PgShared,
    keys: Option<std::collections::VecDeque<ChunkKey>>,
    guard: Option<TransferGuard>,
}

impl PgSnapshot {
    pub(crate) fn outgoing(shared: PgShared) -> Self {
        PgSnapshot::Outgoing(Box::new(Outgoing { shared, keys: None, guard: None }))
    }

    /// Replaces the PG's data with this snapshot and records `record`; returns the fences
    /// (tombstones, epochs) it carried.
    pub(crate) async fn install(self, shared: &PgShared, record: &CheckpointRecord) -> io::Result<Fences> {
        let staged = match self {
            staged @ PgSnapshot::Staged { .. } => staged,
            outgoing @ PgSnapshot::Outgoing(_) => {
                // A local copy (restore): stage it like a received one.
                let mut outgoing = outgoing;
                let mut sink = PgReceiver { shared: shared.clone() }.begin(record).await?;
                while let Some(chunk) = outgoing.next_chunk().await? {
                    sink.write(chunk).await?;
                }
                drop(outgoing);
                sink.finish().await?
            }
        };
        let PgSnapshot::Staged { fences, _staging } = staged else {
            return Err(io::Error::other("snapshot was not staged"));
        };
        let _guard = shared.lock.write().await;
        // The chunks are replaced wholesale: no earlier integrity probe describes them. Cleared
        // under the lock so no comparison reads the new data as the state at an old probe.
        shared.forget_probes();
        let store = &shared.store;
        let shard = shared.shard();
        let mut b = Batch::new();
        b.drop_shard(shard);
        b.move_shard(shared.staging_shard(), shard);
        for (name, _) in store.scan_state(shard, TOMBSTONE_PREFIX).await.map_err(io_err)? {
            b.delete_state(shard, &name);
        }
        for v in &fences.tombstones {
            let mut key = TOMBSTONE_PREFIX.to_vec();
            key.extend_from_slice(&v.0.to_be_bytes());
            b.put_state(shard, &key, Vec::new());
        }
        for prefix in [EPOCH_PREFIX, WRITE_EPOCH_PREFIX] {
            for (name, _) in store.scan_state(shard, prefix).await.map_err(io_err)? {
                b.delete_state(shard, &name);
            }
        }
        for (v, e) in &fences.epochs {
            b.put_state(shard, &super::state_machine::epoch_key(*v), e.to_le_bytes().to_vec());
        }
        for (v, e) in &fences.write_epochs {
            b.put_state(shard, &super::state_machine::write_epoch_key(*v), e.to_le_bytes().to_vec());
        }
        b.put_state(shard, APPLIED_KEY, record.encode());
        store.commit(b).await.map_err(io_err)?;
        store.checkpoint().await.map_err(io_err)?;
        tracing::info!(pg = %shared.pg, applied = record.applied_index(), chunks = store.list_chunks(shard).len(), "installed snapshot");
        Ok(fences)
    }
}

fn frame(out: &mut BytesMut, record: &[u8]) {
    out.put_u32_le(record.len() as u32);
    out.put_slice(record);
}

impl SnapshotStream for PgSnapshot {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        let PgSnapshot::Outgoing(o) = self else {
            return Err(io::Error::other("a staged snapshot cannot be streamed"));
        };
        let mut out = BytesMut::new();
        if o.keys.is_none() {
            o.guard = Some(TransferGuard::new(&o.shared));
            let shard = o.shared.shard();
            let tombs = o.shared.store.scan_state(shard, TOMBSTONE_PREFIX).await.map_err(io_err)?;
            let mut rec = BytesMut::new();
            rec.put_u8(RECORD_TOMBSTONES);
            rec.put_u32_le(tombs.len() as u32);
            for (name, _) in &tombs {
                let id = name.get(TOMBSTONE_PREFIX.len()..).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0);
                rec.put_u64_le(id);
            }
            frame(&mut out, &rec);
            for (prefix, tag) in [(EPOCH_PREFIX, RECORD_EPOCHS), (WRITE_EPOCH_PREFIX, RECORD_WRITE_EPOCHS)] {
                let epochs = o.shared.store.scan_state(shard, prefix).await.map_err(io_err)?;
                let mut rec = BytesMut::new();
                rec.put_u8(tag);
                rec.put_u32_le(epochs.len() as u32);
                for (name, value) in &epochs {
                    let id = name.get(prefix.len()..).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0);
                    let epoch = value.as_slice().try_into().map(u64::from_le_bytes).unwrap_or(0);
                    rec.put_u64_le(id);
                    rec.put_u64_le(epoch);
                }
                frame(&mut out, &rec);
            }
            let keys = o.shared.store.list_chunks(shard);
            o.shared.transfer.chunks_total.store(keys.len() as u64, Ordering::Relaxed);
            o.shared.transfer.chunks_sent.store(0, Ordering::Relaxed);
            o.keys = Some(keys.into());
        }
        let keys = o.keys.as_mut().expect("listed above");
        while out.len() < CHUNK_TARGET {
            let Some(key) = keys.pop_front() else { break };
            let image = {
                let _read = o.shared.lock.read().await;
                o.shared.store.read_image(key).await.map_err(io_err)?
            };
            // A chunk released since the listing is simply absent: the log replay releases it.
            if let Some(image) = image {
                let mut rec = BytesMut::new();
                image.encode_into(&mut rec);
                frame(&mut out, &rec);
            }
            o.shared.transfer.chunks_sent.fetch_add(1, Ordering::Relaxed);
        }
        if out.is_empty() {
            o.guard = None;
            return Ok(None);
        }
        o.shared.pacer.pace(out.len()).await;
        Ok(Some(out.freeze()))
    }
}

/// Starts staging incoming snapshots of one PG.
#[derive(Clone)]
pub struct PgReceiver {
    pub(crate) shared: PgShared,
}

/// Receives one transfer into the staging shard.
pub struct PgSink {
    shared: PgShared,
    buf: BytesMut,
    fences: Fences,
    guard: OwnedMutexGuard<()>,
}

impl SnapshotReceiver for PgReceiver {
    type Snapshot = PgSnapshot;
    type Sink = PgSink;

    async fn begin(&self, record: &CheckpointRecord) -> io::Result<PgSink> {
        let guard = self.shared.staging.clone().lock_owned().await;
        let staging = self.shared.staging_shard();
        if !self.shared.store.list_chunks(staging).is_empty() {
            let mut b = Batch::new();
            b.drop_shard(staging);
            self.shared.store.commit(b).await.map_err(io_err)?;
        }
        tracing::info!(pg = %self.shared.pg, at = record.applied_index(), "receiving snapshot");
        Ok(PgSink { shared: self.shared.clone(), buf: BytesMut::new(), fences: Fences::default(), guard })
    }
}

impl SnapshotSink for PgSink {
    type Snapshot = PgSnapshot;

    async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        self.buf.extend_from_slice(&chunk);
        let mut batch = Batch::new();
        loop {
            if self.buf.len() < 4 {
                break;
            }
            let len = u32::from_le_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
            if len > 64 << 20 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "snapshot record too large"));
            }
            if self.buf.len() < 4 + len {
                break;
            }
            self.buf.advance(4);
            let mut rec = self.buf.split_to(len).freeze();
            match rec.first() {
                Some(&RECORD_TOMBSTONES) => {
                    rec.advance(1);
                    if rec.remaining() < 4 {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated tombstone record"));
                    }
                    let n = rec.get_u32_le() as usize;
                    if rec.remaining() != n * 8 {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "bad tombstone record length"));
                    }
                    self.fences.tombstones = (0..n).map(|_| VolumeId(rec.get_u64_le())).collect();
                }
                Some(&(tag @ RECORD_EPOCHS | tag @ RECORD_WRITE_EPOCHS)) => {
                    rec.advance(1);
                    if rec.remaining() < 4 {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated epoch record"));
                    }
                    let n = rec.get_u32_le() as usize;
                    if rec.remaining() != n * 16 {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "bad epoch record length"));
                    }
                    let epochs = (0..n).map(|_| (VolumeId(rec.get_u64_le()), rec.get_u64_le())).collect();
                    if tag == RECORD_EPOCHS {
                        self.fences.epochs = epochs;
                    } else {
                        self.fences.write_epochs = epochs;
                    }
                }
                _ => {
                    let image = ChunkImage::decode_from(&mut rec).map_err(io_err)?;
                    batch.put_image(self.shared.staging_shard(), image).map_err(io_err)?;
                }
            }
        }
        if !batch.is_empty() {
            self.shared.store.commit(batch).await.map_err(io_err)?;
        }
        Ok(())
    }

    async fn finish(self) -> io::Result<PgSnapshot> {
        if !self.buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "snapshot stream ended mid-record"));
        }
        Ok(PgSnapshot::Staged { fences: self.fences, _staging: self.guard })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use basalt_chunk_store::{Batch, ChunkStore, ChunkStoreConfig, IndexMemory};
    use basalt_common::{NodeId, PgId, VolumeId, crc32c};
    use basalt_raft::{CheckpointRecord, SnapshotReceiver, SnapshotSink, SnapshotStream};
    use bytes::Bytes;

    use super::PgSnapshot;
    use crate::pg::state_machine::{ApplyStats, PgShared};

    fn store(dir: &std::path::Path) -> ChunkStore {
        ChunkStore::open(&ChunkStoreConfig {
            data_path: dir.join("data"),
            index_dir: dir.join("index"),
            capacity: 64 << 20,
            direct_io: true,
            queue_depth: 16,
            index_memory: IndexMemory { cache_bytes: 4 << 20, write_buffer_bytes: 4 << 20 },
        })
        .unwrap()
    }

    async fn write(s: &ChunkStore, shard: u32, vol: u64, offset: u64, byte: u8, len: usize) {
        let data = Bytes::from(vec![byte; len]);
        let crcs = data.chunks(4096).map(crc32c).collect();
        let mut b = Batch::new();
        b.write(shard, VolumeId(vol), 1, offset, data, crcs).unwrap();
        s.commit(b).await.unwrap();
    }

    /// The leader's PG streamed in small pieces into a follower that holds stale data of its
    /// own: after install the follower holds exactly the leader's chunks and tombstones.
    #[tokio::test]
    async fn stream_stage_install_replaces_the_replica() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (sa, sb) = (store(da.path()), store(db.path()));
        let stats = Arc::new(ApplyStats::default());
        let leader = PgShared::new(PgId(5), NodeId(1), sa.clone(), stats.clone(), Default::default());
        let follower = PgShared::new(PgId(5), NodeId(2), sb.clone(), stats, Default::default());
        write(&sa, 5, 1, 0, 0xA1, 3 << 20).await;
        write(&sa, 5, 2, 8 << 20, 0xA2, 4096).await;
        let mut b = Batch::new();
        b.put_state(5, b"tomb/\0\0\0\0\0\0\0\x09", Vec::new());
        b.put_state(5, &crate::pg::state_machine::epoch_key(VolumeId(1)), 4u64.to_le_bytes().to_vec());
        b.put_state(5, &crate::pg::state_machine::write_epoch_key(VolumeId(1)), 3u64.to_le_bytes().to_vec());
        sa.commit(b).await.unwrap();
        // A snapshot froze epoch 1 of volume 1's first chunk, then epoch 3 changed it.
        let frozen = Bytes::from(vec![0xF1u8; 4096]);
        let mut b = Batch::new();
        b.write(5, VolumeId(1), 3, 0, frozen.clone(), vec![crc32c(&frozen)]).unwrap();
        sa.commit(b).await.unwrap();
        // The follower has stale data the snapshot must remove, and data of another PG it must keep.
        write(&sb, 5, 7, 0, 0xEE, 4096).await;
        write(&sb, 6, 7, 0, 0x66, 4096).await;

        let mut out = PgSnapshot::outgoing(leader.clone());
        let record = CheckpointRecord::default();
        let mut sink = super::PgReceiver { shared: follower.clone() }.begin(&record).await.unwrap();
        while let Some(chunk) = out.next_chunk().await.unwrap() {
            // Deliver in odd-sized pieces: records straddle transfer chunks.
            for piece in chunk.chunks(100_003) {
                sink.write(Bytes::copy_from_slice(piece)).await.unwrap();
            }
        }
        assert_eq!(leader.transfers.load(std::sync::atomic::Ordering::Acquire), 0, "finished stream releases its guard");
        let staged = sink.finish().await.unwrap();
        let fences = staged.install(&follower, &record).await.unwrap();
        assert!(fences.tombstones.contains(&VolumeId(9)));
        assert_eq!(fences.epochs.get(&VolumeId(1)), Some(&4));
        assert_eq!(fences.write_epochs.get(&VolumeId(1)), Some(&3));

        let a = sb.read_at(5, VolumeId(1), 1, 0, 3 << 20).await.unwrap();
        assert!(a.data.iter().all(|b| *b == 0xA1), "the frozen version came along");
        let a = sb.read(5, VolumeId(1), 0, 3 << 20).await.unwrap();
        assert!(a.data[..4096].iter().all(|b| *b == 0xF1) && a.data[4096..].iter().all(|b| *b == 0xA1));
        assert!(sb.read(5, VolumeId(2), 8 << 20, 4096).await.unwrap().data.iter().all(|b| *b == 0xA2));
        assert!(sb.read(5, VolumeId(7), 0, 4096).await.unwrap().data.iter().all(|b| *b == 0), "stale chunk removed");
        assert!(sb.read(6, VolumeId(7), 0, 4096).await.unwrap().data.iter().all(|b| *b == 0x66), "other PG untouched");
        assert!(sb.list_chunks(follower.staging_shard()).is_empty(), "staging emptied");
        assert_eq!(sb.scrub_queue().len(), 1, "the replaced chunk waits for overwriting");
    }

    /// A transfer cut short leaves nothing behind in the live PG.
    #[tokio::test]
    async fn truncated_transfer_is_refused() {
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (sa, sb) = (store(da.path()), store(db.path()));
        let stats = Arc::new(ApplyStats::default());
        let leader = PgShared::new(PgId(1), NodeId(1), sa.clone(), stats.clone(), Default::default());
        let follower = PgShared::new(PgId(1), NodeId(2), sb.clone(), stats, Default::default());
        write(&sa, 1, 1, 0, 0xA1, 1 << 20).await;
        let mut out = PgSnapshot::outgoing(leader);
        let mut sink = super::PgReceiver { shared: follower }.begin(&CheckpointRecord::default()).await.unwrap();
        let chunk = out.next_chunk().await.unwrap().unwrap();
        sink.write(chunk.slice(..chunk.len() - 10)).await.unwrap();
        assert!(sink.finish().await.is_err());
        assert!(sb.list_chunks(1).is_empty());
    }
}
