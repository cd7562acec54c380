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
//! - a [`ChunkImage`] (tag `0xC1`): one chunk's written blocks.

use std::collections::HashSet;
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
const RECORD_TOMBSTONES: u8 = 0x01;
/// Bytes gathered into one transfer chunk.
const CHUNK_TARGET: usize = 2 << 20;

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Counts a transfer in flight while alive.
struct TransferGuard(PgShared);

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
        /// Deleted volumes the sender knew of.
        tombstones: HashSet<VolumeId>,
        /// Holds the PG's staging area until installed or dropped.
        _staging: OwnedMutexGuard<()>,
    },
}

/// State of an outgoing stream.
pub struct Outgoing {
    shared: PgShared,
    keys: Option<std::collections::VecDeque<ChunkKey>>,
    _guard: TransferGuard,
}

impl PgSnapshot {
    pub(crate) fn outgoing(shared: PgShared) -> Self {
        shared.transfers.fetch_add(1, Ordering::AcqRel);
        PgSnapshot::Outgoing(Box::new(Outgoing { shared: shared.clone(), keys: None, _guard: TransferGuard(shared) }))
    }

    /// Replaces the PG's data with this snapshot and records `record`; returns the tombstones.
    pub(crate) async fn install(self, shared: &PgShared, record: &CheckpointRecord) -> io::Result<HashSet<VolumeId>> {
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
        let PgSnapshot::Staged { tombstones, _staging } = staged else { unreachable!("staged above") };
        let _guard = shared.lock.write().await;
        let store = &shared.store;
        let shard = shared.shard();
        let mut b = Batch::new();
        b.drop_shard(shard);
        b.move_shard(shared.staging_shard(), shard);
        for (name, _) in store.scan_state(shard, TOMBSTONE_PREFIX).await.map_err(io_err)? {
            b.delete_state(shard, &name);
        }
        for v in &tombstones {
            let mut key = TOMBSTONE_PREFIX.to_vec();
            key.extend_from_slice(&v.0.to_be_bytes());
            b.put_state(shard, &key, Vec::new());
        }
        b.put_state(shard, APPLIED_KEY, record.encode());
        store.commit(b).await.map_err(io_err)?;
        store.checkpoint().await.map_err(io_err)?;
        tracing::info!(pg = %shared.pg, applied = record.applied_index(), chunks = store.list_chunks(shard).len(), "installed snapshot");
        Ok(tombstones)
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
            o.keys = Some(o.shared.store.list_chunks(shard).into());
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
        }
        Ok(if out.is_empty() { None } else { Some(out.freeze()) })
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
    tombstones: HashSet<VolumeId>,
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
        Ok(PgSink { shared: self.shared.clone(), buf: BytesMut::new(), tombstones: HashSet::new(), guard })
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
                    self.tombstones = (0..n).map(|_| VolumeId(rec.get_u64_le())).collect();
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
        Ok(PgSnapshot::Staged { tombstones: self.tombstones, _staging: self.guard })
    }
}
