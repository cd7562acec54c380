//! The placement-group state machine: applies block writes to the node's chunk store.
//!
//! Apply writes data without a sync; [`StateMachine::checkpoint`] records the applied position
//! and then syncs data file and index together, and only then may the log be purged. After a
//! crash the group re-applies from the last checkpoint: every command is an idempotent
//! overwrite (or release) of a byte range, so applying it again to state that already has it
//! gives the same result.

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use basalt_chunk_store::{Batch, ChunkCheck, ChunkKey, ChunkStore, ChunkStoreError, Epoch, Lineage};
use basalt_common::{BLOCK_SIZE, CHUNK_SIZE, NodeId, PgId, VolumeId, ZERO_BLOCK_CRC, crc32c};
use basalt_raft::{ApplyItem, CheckpointRecord, StateMachine};
use basalt_scrubber::IntegrityStats;
use bytes::{Bytes, BytesMut};
use tokio::sync::RwLock;

use super::command::{PgCommand, PgReply, pieces};
use super::snapshot::{EPOCH_PREFIX, Fences, PgReceiver, PgSnapshot, TOMBSTONE_PREFIX, WRITE_EPOCH_PREFIX};

/// Shard-state key of the last checkpoint record.
pub(crate) const APPLIED_KEY: &[u8] = b"applied";

/// Shared between the state machine (inside Raft), the read path and snapshot streams.
#[derive(Clone)]
pub struct PgShared {
    /// The PG.
    pub pg: PgId,
    /// This node (for error messages).
    pub node: NodeId,
    /// The node's chunk store.
    pub store: ChunkStore,
    /// Readers and snapshot streams hold it shared; apply holds it exclusively, so a reader
    /// never sees a block half-written.
    pub lock: Arc<RwLock<()>>,
    /// Outgoing snapshot streams in flight (checkpoints wait while any run: the log they need
    /// must stay).
    pub transfers: Arc<AtomicUsize>,
    /// Serialises incoming snapshot transfers (one staging area per PG).
    pub staging: Arc<tokio::sync::Mutex<()>>,
    /// Apply timing, for metrics.
    pub apply_stats: Arc<ApplyStats>,
    /// Payload bytes applied since the last checkpoint began: checkpoints are also triggered
    /// by volume, so large writes do not pile up in the Raft log.
    pub bytes_since_checkpoint: Arc<AtomicU64>,
    /// Log index through which this replica's Raft log should be purged and scrubbed from disk,
    /// because an entry up to there deleted or zeroed data (volume delete, TRIM, write-zeroes):
    /// the entries before it may hold the bytes that were freed. The checkpointer acts on it.
    pub purge_wanted: Arc<AtomicU64>,
    /// Integrity probes applied on this replica: (volume, chunk) → the probe's log index and
    /// the blocks written since. A comparison at the probe leaves those blocks out, and a
    /// repair of one of them is void here (the write replaced whatever was bad; every replica
    /// applies it). Block by block, so a chunk under steady writes can still be repaired. In
    /// memory only: after a restart repairs of older probes are void, which is safe.
    pub probes: Arc<std::sync::Mutex<HashMap<(VolumeId, u64), Probe>>>,
    /// Integrity counters of this node (repairs applied here).
    pub integrity: Arc<IntegrityStats>,
    /// The node's rebuild byte budget, which outgoing snapshot streams draw on.
    pub pacer: Arc<super::pacer::Pacer>,
    /// Progress of the latest outgoing snapshot stream.
    pub transfer: Arc<TransferProgress>,
    /// Set when this replica is being retired (moved elsewhere): its data is going away, so
    /// reads must not be answered from it any more.
    pub retired: Arc<std::sync::atomic::AtomicBool>,
}

/// How far the latest outgoing snapshot of a PG has got, in chunks.
#[derive(Debug, Default)]
pub struct TransferProgress {
    /// Chunks listed when the stream began.
    pub chunks_total: AtomicU64,
    /// Chunks streamed so far.
    pub chunks_sent: AtomicU64,
}

/// An integrity probe as applied on one replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Probe {
    /// Its log index.
    pub index: u64,
    /// Bit per block of the chunk: written since the probe.
    written: [u64; (CHUNK_SIZE / BLOCK_SIZE / 64) as usize],
}

impl Probe {
    fn new(index: u64) -> Self {
        Self { index, written: Default::default() }
    }

    /// Records writes to blocks `first..=last` of the chunk.
    fn mark(&mut self, first: u64, last: u64) {
        for b in first..=last.min(CHUNK_SIZE / BLOCK_SIZE - 1) {
            self.written[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    /// Whether `block` was written since the probe.
    pub fn written(&self, block: u16) -> bool {
        let b = u64::from(block);
        b < CHUNK_SIZE / BLOCK_SIZE && self.written[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    /// The blocks written since the probe.
    pub fn written_blocks(&self) -> Vec<u16> {
        (0..(CHUNK_SIZE / BLOCK_SIZE) as u16).filter(|b| self.written(*b)).collect()
    }
}

/// Most probes remembered per PG; beyond it the oldest are forgotten (their repairs void).
const MAX_PROBES: usize = 1024;

/// How often an apply short of chunk space tries again.
const SPACE_RETRY: std::time::Duration = std::time::Duration::from_millis(250);

/// How much time applying takes on this node (all PGs share one).
#[derive(Debug, Default)]
pub struct ApplyStats {
    /// Apply calls.
    pub batches: std::sync::atomic::AtomicU64,
    /// Commands applied.
    pub commands: std::sync::atomic::AtomicU64,
    /// Time inside apply, microseconds (including waiting for readers to leave).
    pub micros: std::sync::atomic::AtomicU64,
    /// PGs whose apply is waiting for chunk space (`PgStateMachine::apply_singly`).
    pub waiting_for_space: std::sync::atomic::AtomicU64,
}

impl PgShared {
    /// New shared state for `pg`.
    pub fn new(pg: PgId, node: NodeId, store: ChunkStore, apply_stats: Arc<ApplyStats>, integrity: Arc<IntegrityStats>) -> Self {
        Self {
            pg,
            node,
            store,
            lock: Arc::new(RwLock::new(())),
            transfers: Arc::new(AtomicUsize::new(0)),
            staging: Arc::new(tokio::sync::Mutex::new(())),
            apply_stats,
            bytes_since_checkpoint: Arc::new(AtomicU64::new(0)),
            purge_wanted: Arc::new(AtomicU64::new(0)),
            probes: Arc::new(std::sync::Mutex::new(HashMap::new())),
            integrity,
            pacer: Arc::new(super::pacer::Pacer::new(0)),
            transfer: Arc::new(TransferProgress::default()),
            retired: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    fn probes(&self) -> std::sync::MutexGuard<'_, HashMap<(VolumeId, u64), Probe>> {
        self.probes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The probe at `index` for `(volume, chunk)` if it was applied here and not forgotten
    /// since (replaced by a newer probe, evicted, or lost in a restart).
    pub fn probe_at(&self, volume: VolumeId, chunk: u64, index: u64) -> Option<Probe> {
        self.probes().get(&(volume, chunk)).filter(|p| p.index == index).copied()
    }

    /// This replica's copy of a chunk as of the probe at `probe_index`, checked against its
    /// crcs, without the blocks written since the probe (returned separately: they must not
    /// be compared); `Ok(None)` if the probe is not known here. The caller waits until the
    /// probe is applied.
    pub async fn check_at_probe(&self, volume: VolumeId, chunk: u64, probe_index: u64) -> Result<Option<(ChunkCheck, Vec<u16>)>, ChunkStoreError> {
        // Shared lock: no command applies while the chunk is read, so the blocks not written
        // since the probe hold what they held at the probe.
        let _guard = self.lock.read().await;
        let probe = match self.probe_at(volume, chunk, probe_index) {
            Some(p) if !self.retired.load(Ordering::Acquire) => p,
            _ => return Ok(None),
        };
        // The newest version: the one writes change and replicas compare.
        let chunk_key = ChunkKey { shard: self.shard(), volume, chunk, epoch: 0 };
        let key = self.store.head_key(chunk_key).unwrap_or(chunk_key);
        let mut check = self.store.check_chunk(key).await?.unwrap_or(ChunkCheck { key, blocks: Vec::new(), data: Bytes::new() });
        check.blocks.retain(|b| !probe.written(b.block));
        Ok(Some((check, probe.written_blocks())))
    }

    /// Forgets every probe (the PG's data was replaced).
    pub(crate) fn forget_probes(&self) {
        self.probes().clear();
    }

    /// Marks the blocks of `[offset, offset + len)` of `volume` written in the probes of their
    /// chunks. On the write path: looks up the touched chunks' keys rather than scanning the
    /// map, unless the range covers more chunks than the map holds.
    fn touch(&self, volume: VolumeId, offset: u64, len: u64) {
        let mut probes = self.probes();
        if probes.is_empty() {
            return;
        }
        let end = offset.saturating_add(len.max(1)) - 1;
        let (first, last) = (offset / CHUNK_SIZE, end / CHUNK_SIZE);
        let blocks_per_chunk = CHUNK_SIZE / BLOCK_SIZE;
        let span = |c: u64| {
            let lo = if c == first { (offset % CHUNK_SIZE) / BLOCK_SIZE } else { 0 };
            let hi = if c == last { (end % CHUNK_SIZE) / BLOCK_SIZE } else { blocks_per_chunk - 1 };
            (lo, hi)
        };
        if last - first < probes.len() as u64 {
            for c in first..=last {
                if let Some(p) = probes.get_mut(&(volume, c)) {
                    let (lo, hi) = span(c);
                    p.mark(lo, hi);
                }
            }
        } else {
            for ((v, c), p) in probes.iter_mut() {
                if *v == volume && (first..=last).contains(c) {
                    let (lo, hi) = span(*c);
                    p.mark(lo, hi);
                }
            }
        }
    }

    /// The chunk-store shard holding this PG.
    pub fn shard(&self) -> u32 {
        self.pg.0
    }

    /// The shard a snapshot for this PG is staged in before it replaces the PG's data.
    pub fn staging_shard(&self) -> u32 {
        self.pg.0 | 0x8000_0000
    }

    /// Reads block-aligned `[offset, offset+len)` of `volume` (a clone with `lineage`, or
    /// none: empty) as of snapshot epoch `at` (the volume as it is now: `Epoch::MAX`),
    /// verified. Fails if the replica is being retired (checked under the lock, which
    /// retiring takes before it drops the data).
    pub async fn read(
        &self,
        volume: VolumeId,
        lineage: &Lineage,
        at: Epoch,
        offset: u64,
        len: u64,
    ) -> Result<basalt_chunk_store::BlockRead, ChunkStoreError> {
        let _guard = self.lock.read().await;
        if self.retired.load(Ordering::Acquire) {
            return Err(ChunkStoreError::Failed(format!("{} no longer holds a replica of {}", self.node, self.pg)));
        }
        self.store.read_through(self.shard(), volume, lineage, at, offset, len).await
    }
}

/// The state machine of one PG replica.
pub struct PgStateMachine {
    shared: PgShared,
    /// Repairs staged in the batch being built, counted once the batch is on disk.
    staged_repairs: u64,
    tombstones: HashSet<VolumeId>,
    /// Highest attachment epoch applied per volume: commands of lower epochs are refused.
    epochs: HashMap<VolumeId, u64>,
    /// Highest snapshot write epoch applied per volume (1 where absent): writes of lower ones
    /// were issued before a snapshot cut and are refused.
    write_epochs: HashMap<VolumeId, Epoch>,
}

/// Shard-state key of a volume's highest applied attachment epoch.
pub(crate) fn epoch_key(volume: VolumeId) -> Vec<u8> {
    let mut key = EPOCH_PREFIX.to_vec();
    key.extend_from_slice(&volume.0.to_be_bytes());
    key
}

/// Shard-state key of a volume's highest applied snapshot write epoch.
pub(crate) fn write_epoch_key(volume: VolumeId) -> Vec<u8> {
    let mut key = WRITE_EPOCH_PREFIX.to_vec();
    key.extend_from_slice(&volume.0.to_be_bytes());
    key
}

impl PgStateMachine {
    /// A state machine over `shared`.
    pub fn new(shared: PgShared) -> Self {
        Self { shared, staged_repairs: 0, tombstones: HashSet::new(), epochs: HashMap::new(), write_epochs: HashMap::new() }
    }

    /// Applies the snapshot rule to a write of `volume` at `write_epoch`: refused if a write of
    /// a newer epoch applied (it was issued before the snapshot cut that one came after);
    /// otherwise recorded as the newest. The first write of a newer epoch commits what is
    /// staged first: the store copies chunks from versions read before a batch's writes land.
    async fn snapshot_fence(&mut self, batch: &mut Batch, volume: VolumeId, write_epoch: Epoch) -> Result<Option<PgReply>, ChunkStoreError> {
        let newest = self.write_epochs.get(&volume).copied().unwrap_or(1);
        if write_epoch < newest {
            return Ok(Some(PgReply::Fenced(format!(
                "{volume}: a write issued under snapshot epoch {write_epoch} arrived after writes of epoch {newest}: it predates a snapshot and is refused"
            ))));
        }
        if write_epoch > newest {
            self.flush(batch).await?;
            self.write_epochs.insert(volume, write_epoch);
            batch.put_state(self.shared.shard(), &write_epoch_key(volume), write_epoch.to_le_bytes().to_vec());
        }
        Ok(None)
    }

    /// The write epoch the newest version of `volume`'s `chunk` was written in (for repairs,
    /// which rewrite that version in place).
    fn head_epoch(&self, volume: VolumeId, chunk: u64) -> Epoch {
        let key = ChunkKey { shard: self.shared.shard(), volume, chunk, epoch: 0 };
        self.shared.store.head_key(key).map_or_else(|| self.write_epochs.get(&volume).copied().unwrap_or(1), |k| k.epoch)
    }

    /// Applies the fencing rule to a command of `volume` at `epoch`: refused if a newer
    /// attachment has written, otherwise recorded as the newest.
    fn fence(&mut self, batch: &mut Batch, volume: VolumeId, epoch: u64) -> Option<PgReply> {
        let newest = self.epochs.get(&volume).copied().unwrap_or(0);
        if epoch < newest {
            return Some(PgReply::Fenced(format!("{volume}: attachment epoch {epoch} was superseded by epoch {newest}; this writer is fenced")));
        }
        if epoch > newest {
            self.epochs.insert(volume, epoch);
            batch.put_state(self.shared.shard(), &epoch_key(volume), epoch.to_le_bytes().to_vec());
        }
        None
    }

    fn io(e: ChunkStoreError) -> io::Error {
        io::Error::other(e.to_string())
    }

    /// Builds the whole-block write for a write or zero command, reading the partial blocks at
    /// its edges (read-modify-write). `data` is `None` for zeroing.
    async fn aligned(
        &self,
        volume: VolumeId,
        lineage: &Lineage,
        offset: u64,
        len: u64,
        data: Option<&Bytes>,
        crcs: &[u32],
    ) -> Result<(u64, Bytes, Vec<u32>), ChunkStoreError> {
        let start = offset / BLOCK_SIZE * BLOCK_SIZE;
        let end = (offset + len).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        let mut buf = BytesMut::zeroed((end - start) as usize);
        let head_partial = offset != start;
        let tail_partial = offset + len != end;
        if head_partial {
            let old = self.shared.store.read_through(self.shared.shard(), volume, lineage, Epoch::MAX, start, BLOCK_SIZE).await?;
            buf[..BLOCK_SIZE as usize].copy_from_slice(&old.data);
        }
        if tail_partial && (end - BLOCK_SIZE != start || !head_partial) {
            let old = self.shared.store.read_through(self.shared.shard(), volume, lineage, Epoch::MAX, end - BLOCK_SIZE, BLOCK_SIZE).await?;
            let at = (end - BLOCK_SIZE - start) as usize;
            buf[at..].copy_from_slice(&old.data);
        }
        let rel = (offset - start) as usize;
        match data {
            Some(d) => buf[rel..rel + d.len()].copy_from_slice(d),
            None => buf[rel..rel + len as usize].fill(0),
        }
        // Whole pieces keep the client's checksum (end to end); merged blocks get a new one.
        let mut block_crcs = Vec::with_capacity(((end - start) / BLOCK_SIZE) as usize);
        let mut piece_crcs = crcs.iter();
        let mut piece_iter = pieces(offset, len);
        for (i, block) in buf.chunks(BLOCK_SIZE as usize).enumerate() {
            let block_start = start + i as u64 * BLOCK_SIZE;
            let piece = piece_iter.next();
            let client = piece_crcs.next();
            match (data.is_some(), piece, client) {
                (true, Some((p_off, p_len)), Some(c)) if p_off == block_start && p_len == BLOCK_SIZE => block_crcs.push(*c),
                _ => block_crcs.push(crc32c(block)),
            }
        }
        Ok((start, buf.freeze(), block_crcs))
    }

    /// Adds one command to `batch`, committing `batch` first when a read-modify-write needs to
    /// see what earlier commands wrote.
    async fn stage(&mut self, batch: &mut Batch, index: u64, cmd: PgCommand) -> Result<PgReply, ChunkStoreError> {
        let shard = self.shared.shard();
        // A clone's command: the store reads through its lineage. Named again after every
        // flush (a flush starts a new batch).
        let (cmd, lineage) = match cmd {
            PgCommand::OfClone { lineage, command } => (*command, lineage),
            cmd => (cmd, Vec::new()),
        };
        let name_clone = |batch: &mut Batch, volume: VolumeId| {
            if !lineage.is_empty() {
                batch.set_lineage(shard, volume, lineage.clone());
            }
        };
        match cmd {
            PgCommand::Write { volume, epoch, write_epoch, offset, crcs, crypt, data } => {
                self.shared.touch(volume, offset, data.len() as u64);
                if self.tombstones.contains(&volume) {
                    return Ok(PgReply::NoSuchVolume);
                }
                if let Some(refused) = self.fence(batch, volume, epoch) {
                    return Ok(refused);
                }
                if let Some(refused) = self.snapshot_fence(batch, volume, write_epoch).await? {
                    return Ok(refused);
                }
                for ((p_off, p_len), crc) in pieces(offset, data.len() as u64).zip(&crcs) {
                    let at = (p_off - offset) as usize;
                    let actual = crc32c(&data[at..at + p_len as usize]);
                    if actual != *crc {
                        return Ok(PgReply::Invalid(format!(
                            "checksum mismatch in {volume} at offset {p_off}: expected {crc:#010x}, got {actual:#010x}"
                        )));
                    }
                }
                if let Some(crypt) = crypt {
                    // Whole blocks (checked at decode): ciphertext and contexts as sent.
                    name_clone(batch, volume);
                    batch.write_encrypted(shard, volume, write_epoch, offset, data, crcs, crypt)?;
                } else if offset % BLOCK_SIZE == 0 && (data.len() as u64).is_multiple_of(BLOCK_SIZE) {
                    name_clone(batch, volume);
                    batch.write(shard, volume, write_epoch, offset, data, crcs)?;
                } else {
                    self.flush(batch).await?;
                    let (start, buf, block_crcs) = self.aligned(volume, &lineage, offset, data.len() as u64, Some(&data), &crcs).await?;
                    name_clone(batch, volume);
                    batch.write(shard, volume, write_epoch, start, buf, block_crcs)?;
                }
                Ok(PgReply::Ok)
            }
            PgCommand::Zero { volume, epoch, write_epoch, offset, len, keep_allocated } => {
                self.shared.touch(volume, offset, len);
                if self.tombstones.contains(&volume) {
                    return Ok(PgReply::NoSuchVolume);
                }
                if let Some(refused) = self.fence(batch, volume, epoch) {
                    return Ok(refused);
                }
                if let Some(refused) = self.snapshot_fence(batch, volume, write_epoch).await? {
                    return Ok(refused);
                }
                let start = offset.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
                let end = (offset + len) / BLOCK_SIZE * BLOCK_SIZE;
                if start < end {
                    // Whole blocks: large ranges are split to the store's per-call limit.
                    let mut pos = start;
                    while pos < end {
                        let n = (end - pos).min(basalt_chunk_store::MAX_IO_BYTES);
                        name_clone(batch, volume);
                        batch.zero(shard, volume, write_epoch, pos, n, !keep_allocated)?;
                        pos += n;
                    }
                }
                // Partial blocks at the edges are rewritten with zeros in place.
                let edges = [(offset, start.min(offset + len) - offset), (end.max(offset), offset + len - end.max(offset))];
                for (o, l) in edges {
                    if l > 0 && (o % BLOCK_SIZE != 0 || l % BLOCK_SIZE != 0) {
                        self.flush(batch).await?;
                        let (s, buf, crcs) = self.aligned(volume, &lineage, o, l, None, &[]).await?;
                        name_clone(batch, volume);
                        batch.write(shard, volume, write_epoch, s, buf, crcs)?;
                    }
                }
                Ok(PgReply::Ok)
            }
            PgCommand::DeleteVolume { volume } => {
                batch.delete_volume(shard, volume);
                let mut key = TOMBSTONE_PREFIX.to_vec();
                key.extend_from_slice(&volume.0.to_be_bytes());
                batch.put_state(shard, &key, Vec::new());
                self.tombstones.insert(volume);
                self.shared.probes().retain(|(v, _), _| *v != volume);
                Ok(PgReply::Ok)
            }
            PgCommand::ReleaseVersions { volume, live } => {
                if self.tombstones.contains(&volume) {
                    return Ok(PgReply::NoSuchVolume);
                }
                name_clone(batch, volume);
                batch.release_versions(shard, volume, live);
                Ok(PgReply::Ok)
            }
            PgCommand::Rollback { volume, to, at } => {
                if self.tombstones.contains(&volume) {
                    return Ok(PgReply::NoSuchVolume);
                }
                if let Some(refused) = self.snapshot_fence(batch, volume, at).await? {
                    return Ok(refused);
                }
                name_clone(batch, volume);
                batch.rollback(shard, volume, to, at);
                // On its own: it copies chunks, read before the batch's writes land.
                self.flush(batch).await?;
                self.shared.probes().retain(|(v, _), _| *v != volume);
                Ok(PgReply::Ok)
            }
            PgCommand::OfClone { .. } => Ok(PgReply::Invalid("a clone command inside another".into())),
            PgCommand::Probe { volume, chunk } => {
                if self.tombstones.contains(&volume) {
                    return Ok(PgReply::NoSuchVolume);
                }
                let mut probes = self.shared.probes();
                if probes.len() >= MAX_PROBES
                    && !probes.contains_key(&(volume, chunk))
                    && let Some(oldest) = probes.iter().min_by_key(|(_, p)| p.index).map(|(k, _)| *k)
                {
                    probes.remove(&oldest);
                }
                probes.insert((volume, chunk), Probe::new(index));
                Ok(PgReply::Index(index))
            }
            PgCommand::Repair { volume, probe_index, offset, crc, crypt, data } => {
                if self.tombstones.contains(&volume) {
                    return Ok(PgReply::NoSuchVolume);
                }
                let chunk = offset / CHUNK_SIZE;
                let block = ((offset % CHUNK_SIZE) / BLOCK_SIZE) as u16;
                if self.shared.probe_at(volume, chunk, probe_index).is_none_or(|p| p.written(block)) {
                    // The block was written since the comparison (or this replica restarted):
                    // what the repair carries may be older than what is here now.
                    return Ok(PgReply::Ok);
                }
                if crc32c(&data) != crc || data.len() as u64 != BLOCK_SIZE {
                    return Ok(PgReply::Invalid(format!("repair of {volume} at offset {offset} carries data that does not match its crc")));
                }
                self.flush(batch).await?;
                let write_epoch = self.head_epoch(volume, chunk);
                let check = self.shared.store.check_chunk(ChunkKey { shard, volume, chunk, epoch: write_epoch }).await?;
                let here = check.as_ref().and_then(|c| c.blocks.iter().find(|b| b.block == block).copied());
                let bad = match here {
                    Some(b) => !b.is_intact() || b.stored_crc != crc,
                    None => crc != ZERO_BLOCK_CRC,
                };
                if bad {
                    match crypt {
                        Some(c) => batch.write_encrypted(shard, volume, write_epoch, offset, data, vec![crc], vec![c])?,
                        None => batch.write(shard, volume, write_epoch, offset, data, vec![crc])?,
                    }
                    self.staged_repairs += 1;
                    // On its own: the chunk's newest version may be older than the volume's
                    // write epoch, and a batch writes one epoch per volume.
                    self.flush(batch).await?;
                    tracing::warn!(
                        pg = %self.shared.pg, node = %self.shared.node, %volume, chunk, block,
                        stored_crc = here.map(|b| b.stored_crc), actual_crc = here.map(|b| b.actual_crc), repaired_crc = crc,
                        "repaired a bad block from a healthy replica"
                    );
                }
                Ok(PgReply::Ok)
            }
        }
    }

    async fn flush(&mut self, batch: &mut Batch) -> Result<(), ChunkStoreError> {
        let repairs = std::mem::take(&mut self.staged_repairs);
        if batch.is_empty() {
            return Ok(());
        }
        self.shared.store.commit(std::mem::take(batch)).await?;
        // Counted once on disk, so a batch that failed and is applied again counts once.
        self.shared.integrity.blocks_repaired.fetch_add(repairs, Ordering::Relaxed);
        Ok(())
    }

    /// Applies commands one by one, each waiting until the store has room for it (used when a
    /// combined batch ran out of space).
    ///
    /// A committed entry is never skipped for lack of space: the other replicas apply it, and a
    /// replica without it would serve older data than was acknowledged once it led the PG.
    /// Leaders refuse writes a replica could not store (`pg::space`), so this wait means the
    /// space figures were behind; it ends when the scrubber returns freed slots or other PGs
    /// on the node free some, or when this replica is retired.
    async fn apply_singly(&mut self, cmds: Vec<(u64, Option<Result<PgCommand, String>>)>) -> io::Result<Vec<PgReply>> {
        let mut replies = Vec::with_capacity(cmds.len());
        for (index, cmd) in cmds {
            let cmd = match cmd {
                None => {
                    replies.push(PgReply::Ok);
                    continue;
                }
                Some(Err(e)) => {
                    replies.push(PgReply::Invalid(e));
                    continue;
                }
                Some(Ok(c)) => c,
            };
            let mut waited: Option<std::time::Instant> = None;
            let reply = loop {
                let mut batch = Batch::new();
                let result = match self.stage(&mut batch, index, cmd.clone()).await {
                    Ok(r) => self.flush(&mut batch).await.map(|()| r),
                    Err(e) => Err(e),
                };
                match result {
                    Ok(r) => break r,
                    Err(ChunkStoreError::NoSpace { .. }) if !self.shared.retired.load(Ordering::Acquire) => {
                        if waited.is_none() {
                            tracing::error!(pg = %self.shared.pg, node = %self.shared.node, index, "no chunk space to apply a committed entry; waiting for space (this replica's apply stalls until then)");
                            self.shared.apply_stats.waiting_for_space.fetch_add(1, Ordering::Relaxed);
                            waited = Some(std::time::Instant::now());
                        }
                        tokio::time::sleep(SPACE_RETRY).await;
                    }
                    Err(e) => break self.soft_error(e)?,
                }
            };
            if let Some(since) = waited {
                self.shared.apply_stats.waiting_for_space.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!(pg = %self.shared.pg, node = %self.shared.node, index, waited = ?since.elapsed(), "space found; applying again");
            }
            replies.push(reply);
        }
        Ok(replies)
    }

    /// Maps an error staging one command to its reply, or to a fatal error for the group.
    fn soft_error(&self, e: ChunkStoreError) -> io::Result<PgReply> {
        match e {
            ChunkStoreError::NoSpace { .. } => Ok(PgReply::NoSpace(format!("no space on {}", self.shared.node))),
            ChunkStoreError::Invalid(m) => Ok(PgReply::Invalid(m)),
            e @ ChunkStoreError::BadChecksum { .. } => Ok(PgReply::Invalid(e.to_string())),
            e @ ChunkStoreError::Corrupt { .. } => {
                tracing::error!(pg = %self.shared.pg, node = %self.shared.node, error = %e, "stored block needed for a partial write is corrupt");
                Ok(PgReply::Corrupt(format!("{e} on {}", self.shared.node)))
            }
            e => Err(Self::io(e)),
        }
    }
}

impl StateMachine for PgStateMachine {
    type Snapshot = PgSnapshot;
    type Checkpoint = PgCheckpoint;
    type Receiver = PgReceiver;

    async fn recover(&mut self) -> io::Result<Option<CheckpointRecord>> {
        let shard = self.shared.shard();
        let store = &self.shared.store;
        // A transfer that did not finish leaves a staging shard behind: discard it.
        if !store.list_chunks(self.shared.staging_shard()).is_empty() {
            let mut b = Batch::new();
            b.drop_shard(self.shared.staging_shard());
            store.commit(b).await.map_err(Self::io)?;
        }
        let record = match store.get_state(shard, APPLIED_KEY).await.map_err(Self::io)? {
            Some(bytes) => Some(CheckpointRecord::decode(&bytes).map_err(|e| io::Error::other(e.to_string()))?),
            None => None,
        };
        if record.is_none() {
            // Data and fences without a checkpoint record belong to an earlier incarnation of
            // this replica (or to applies a crash cut short before the first checkpoint): the
            // log is applied again from its start. Fences kept from those applies would refuse
            // the replayed writes that come before them (an older attachment's, or a snapshot
            // epoch's), and the replica would lose them.
            let mut b = Batch::new();
            if !store.list_chunks(shard).is_empty() {
                tracing::warn!(pg = %self.shared.pg, "discarding chunks left by an earlier replica of this PG");
                b.drop_shard(shard);
            }
            for prefix in [TOMBSTONE_PREFIX, EPOCH_PREFIX, WRITE_EPOCH_PREFIX] {
                for (name, _) in store.scan_state(shard, prefix).await.map_err(Self::io)? {
                    b.delete_state(shard, &name);
                }
            }
            store.commit(b).await.map_err(Self::io)?;
        }
        for (name, _) in store.scan_state(shard, TOMBSTONE_PREFIX).await.map_err(Self::io)? {
            if let Ok(id) = name[TOMBSTONE_PREFIX.len()..].try_into().map(u64::from_be_bytes) {
                self.tombstones.insert(VolumeId(id));
            }
        }
        for (prefix, map) in [(EPOCH_PREFIX, &mut self.epochs), (WRITE_EPOCH_PREFIX, &mut self.write_epochs)] {
            for (name, value) in store.scan_state(shard, prefix).await.map_err(Self::io)? {
                let id = name[prefix.len()..].try_into().map(u64::from_be_bytes);
                let epoch = value.as_slice().try_into().map(u64::from_le_bytes);
                if let (Ok(id), Ok(epoch)) = (id, epoch) {
                    map.insert(VolumeId(id), epoch);
                }
            }
        }
        Ok(record)
    }

    async fn apply(&mut self, items: Vec<ApplyItem>) -> io::Result<Vec<Bytes>> {
        let started = std::time::Instant::now();
        let stats = self.shared.apply_stats.clone();
        stats.batches.fetch_add(1, Ordering::Relaxed);
        stats.commands.fetch_add(items.len() as u64, Ordering::Relaxed);
        let result = self.apply_inner(items).await;
        stats.micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        result
    }

    fn defer_checkpoint(&self) -> bool {
        self.shared.transfers.load(Ordering::Acquire) > 0
    }

    fn checkpoint(&mut self, record: CheckpointRecord) -> PgCheckpoint {
        self.shared.bytes_since_checkpoint.store(0, Ordering::Relaxed);
        PgCheckpoint { shared: self.shared.clone(), record }
    }

    async fn open_snapshot(&mut self, _record: &CheckpointRecord) -> io::Result<PgSnapshot> {
        Ok(PgSnapshot::outgoing(self.shared.clone()))
    }

    async fn install(&mut self, record: CheckpointRecord, snapshot: PgSnapshot) -> io::Result<()> {
        let Fences { tombstones, epochs, write_epochs } = snapshot.install(&self.shared, &record).await?;
        self.tombstones = tombstones;
        self.epochs = epochs;
        self.write_epochs = write_epochs;
        Ok(())
    }

    fn receiver(&self) -> PgReceiver {
        PgReceiver { shared: self.shared.clone() }
    }
}

impl PgStateMachine {
    async fn apply_inner(&mut self, items: Vec<ApplyItem>) -> io::Result<Vec<Bytes>> {
        let lock = self.shared.lock.clone();
        let _guard = lock.write().await;
        let bytes: u64 = items.iter().filter_map(|i| i.command.as_ref()).map(|c| c.len() as u64).sum();
        self.shared.bytes_since_checkpoint.fetch_add(bytes, Ordering::Relaxed);
        let last_index = items.last().map(|i| i.index).unwrap_or(0);
        let cmds: Vec<(u64, Option<Result<PgCommand, String>>)> = items.into_iter().map(|i| (i.index, i.command.map(PgCommand::decode))).collect();
        // Commands that free data: the log entries before them may hold the freed bytes.
        fn frees(c: &PgCommand) -> bool {
            match c {
                PgCommand::OfClone { command, .. } => frees(command),
                c => matches!(
                    c,
                    PgCommand::Zero { .. } | PgCommand::DeleteVolume { .. } | PgCommand::ReleaseVersions { .. } | PgCommand::Rollback { .. }
                ),
            }
        }
        if cmds.iter().any(|(_, c)| matches!(c, Some(Ok(c)) if frees(c))) {
            self.shared.purge_wanted.fetch_max(last_index, Ordering::Relaxed);
        }
        // Staging changes fencing epochs and tombstones in memory before anything is on disk:
        // if the batch runs out of space they are put back, and the commands staged again one
        // by one see the state before the batch.
        let before = (self.epochs.clone(), self.tombstones.clone(), self.write_epochs.clone());
        let mut batch = Batch::new();
        let mut replies = Vec::with_capacity(cmds.len());
        let mut short = false;
        for (index, cmd) in &cmds {
            let reply = match cmd {
                None => PgReply::Ok,
                Some(Err(e)) => PgReply::Invalid(e.clone()),
                Some(Ok(c)) => match self.stage(&mut batch, *index, c.clone()).await {
                    Ok(r) => r,
                    // A partial-block write flushes what is staged so far to read the blocks
                    // at its edges; that flush found no room.
                    Err(ChunkStoreError::NoSpace { .. }) => {
                        short = true;
                        break;
                    }
                    Err(e) => self.soft_error(e)?,
                },
            };
            replies.push(reply);
        }
        if !short {
            match self.flush(&mut batch).await {
                Ok(()) => return Ok(replies.iter().map(PgReply::encode).collect()),
                Err(ChunkStoreError::NoSpace { .. }) => {}
                Err(e) => return Err(Self::io(e)),
            }
        }
        // One by one, each waiting for room. Re-applying commands whose part of the batch did
        // reach the store (before a partial write's flush) is harmless: they are overwrites.
        (self.epochs, self.tombstones, self.write_epochs) = before;
        self.staged_repairs = 0;
        let single = self.apply_singly(cmds).await?;
        Ok(single.iter().map(PgReply::encode).collect())
    }
}

/// Records the applied position, then syncs data file and index: the position is durable
/// exactly when the data it covers is.
pub struct PgCheckpoint {
    shared: PgShared,
    record: CheckpointRecord,
}

impl basalt_raft::Checkpoint for PgCheckpoint {
    type Snapshot = PgSnapshot;

    async fn run(self) -> io::Result<PgSnapshot> {
        // Everything up to the record's index has been applied (the record was captured on the
        // apply path), so syncing now covers it. Record first, sync second: one sync covers both.
        let mut b = Batch::new();
        b.put_state(self.shared.shard(), APPLIED_KEY, self.record.encode());
        self.shared.store.commit(b).await.map_err(PgStateMachine::io)?;
        self.shared.store.checkpoint().await.map_err(PgStateMachine::io)?;
        Ok(PgSnapshot::outgoing(self.shared))
    }
}

#[cfg(test)]
mod probe_tests {
    use super::*;

    #[test]
    fn a_probe_tracks_written_blocks_one_by_one() {
        let mut p = Probe::new(7);
        assert!(p.written_blocks().is_empty());
        p.mark(3, 3);
        p.mark(63, 65);
        p.mark(250, 1000); // clamped to the chunk's last block
        assert_eq!(p.written_blocks(), vec![3, 63, 64, 65, 250, 251, 252, 253, 254, 255]);
        assert!(p.written(64) && !p.written(4) && !p.written(256));
        assert_eq!(p.index, 7);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use basalt_chunk_store::{Batch, ChunkStore, ChunkStoreConfig, IndexMemory};
    use basalt_common::{CHUNK_SIZE, NodeId, PgId, VolumeId, crc32c};
    use basalt_raft::{ApplyItem, StateMachine};
    use bytes::Bytes;

    use super::{ApplyStats, PgShared, PgStateMachine};
    use crate::pg::command::{PgCommand, PgReply};

    fn write(volume: u64, epoch: u64, offset: u64) -> PgCommand {
        let data = Bytes::from(vec![0x5a; 4096]);
        PgCommand::Write { volume: VolumeId(volume), epoch, write_epoch: 1, offset, crcs: vec![crc32c(&data)], crypt: None, data }
    }

    /// A batch that runs out of chunk space is applied again one command at a time from the
    /// state before the batch: a write of epoch 4 followed by one of epoch 5 must not find
    /// epoch 5 already recorded (and be refused as fenced on this replica only).
    #[tokio::test]
    async fn a_batch_short_of_space_is_reapplied_from_the_state_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(&ChunkStoreConfig {
            data_path: dir.path().join("data"),
            index_dir: dir.path().join("index"),
            capacity: 64 << 20,
            direct_io: true,
            queue_depth: 16,
            index_memory: IndexMemory { cache_bytes: 4 << 20, write_buffer_bytes: 4 << 20 },
        })
        .unwrap();
        // Leave exactly one free chunk slot.
        let mut chunk = 0;
        while store.stats().free_bytes() > CHUNK_SIZE {
            let data = Bytes::from(vec![1u8; 4096]);
            let mut b = Batch::new();
            b.write(5, VolumeId(9), 1, chunk * CHUNK_SIZE, data.clone(), vec![crc32c(&data)]).unwrap();
            store.commit(b).await.unwrap();
            chunk += 1;
        }
        let shared = PgShared::new(PgId(5), NodeId(1), store, Arc::new(ApplyStats::default()), Default::default());
        // Retired: the command that does not fit is answered NoSpace instead of waiting.
        shared.retired.store(true, Ordering::Release);
        let mut sm = PgStateMachine::new(shared);
        let items = vec![
            ApplyItem { index: 1, command: Some(write(1, 4, 0).encode()) },
            ApplyItem { index: 2, command: Some(write(1, 5, 8 * CHUNK_SIZE).encode()) },
        ];
        let replies: Vec<PgReply> = sm.apply(items).await.unwrap().iter().map(|r| PgReply::decode(r)).collect();
        assert_eq!(replies[0], PgReply::Ok, "the first write fits and is not fenced: {replies:?}");
        assert!(matches!(replies[1], PgReply::NoSpace(_)), "{replies:?}");
    }
}
