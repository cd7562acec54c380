//! The chunk store proper: maps (shard, volume, chunk) to slots of the data file, reads and
//! writes 4 KiB blocks with their crc32c, and keeps freed slots out of use until overwritten.
//!
//! Snapshots: a chunk has a version per snapshot epoch it was written in ([`crate::versions`]
//! holds the rules). A write carries its volume's write epoch; the first write of a newer
//! epoch copies the chunk's newest version into a new slot (data first, index second, and the
//! old slot is only read, so a crash and replay copy again from the same bytes) and writes
//! there. Reads at an epoch see the newest version no newer than it.
//!
//! Clones: a clone is a volume of its own that reads its parent's chunks as a snapshot of the
//! parent saw them until it writes its own. Its ops name its [`Lineage`] (ancestors and the
//! epoch each is read at, nearest first; the clone's chunks live in the same shard as its
//! ancestors'): a chunk the clone never wrote resolves through the lineage, its first write
//! copies what the lineage reads (as a snapshot's first write copies the older version), and
//! a trim of it leaves a hole so the ancestors stop showing through.
//!
//! Concurrency: one [`ChunkStore`] serves every shard (placement group) on the node. Callers
//! serialise mutations of a shard (a PG's state machine applies in order) and keep reads of a
//! shard from racing its mutations; the store itself only guards its shared allocation state
//! with a short mutex, never held across I/O. Disk I/O goes through the io_uring thread;
//! RocksDB calls that may touch disk run on tokio's blocking pool.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use basalt_common::{BLOCK_SIZE, CHUNK_SIZE, VolumeId, ZERO_BLOCK_CRC, crc32c};
use bytes::Bytes;
use rocksdb::WriteBatch;

use crate::aligned::AlignedBuf;
use crate::data_file::DataFile;
use crate::error::{ChunkStoreError, Result};
use crate::image::ChunkImage;
use crate::index::{
    BlockMeta, CF_BLOCKS, CF_CHUNKS, CF_FREE, CF_STATE, ChunkKey, CryptContext, FreeReason, FreeRecord, HOLE, Index, IndexMemory, state_key,
};
use crate::uring::Uring;
use crate::versions::{ChunkVersions, Epoch, Version, WritePlan};

const BLOCKS_PER_CHUNK: u64 = CHUNK_SIZE / BLOCK_SIZE;

/// A clone's ancestors, nearest first: each volume and the snapshot epoch it is read at.
/// Empty for a volume that is not a clone.
pub type Lineage = [(VolumeId, Epoch)];

/// A chunk and the metadata of its written blocks (what moves with a shard).
type ChunkMetas = (ChunkKey, Vec<(u16, BlockMeta)>);
/// Largest single read or write the store accepts.
pub const MAX_IO_BYTES: u64 = 64 * 1024 * 1024;

/// Where the store lives and how much memory it may use.
#[derive(Clone, Debug)]
pub struct ChunkStoreConfig {
    /// The data file or raw block device.
    pub data_path: PathBuf,
    /// The RocksDB index directory.
    pub index_dir: PathBuf,
    /// Bytes of slots to create when formatting a new data file (ignored for existing ones).
    pub capacity: u64,
    /// Open the data file with O_DIRECT (on unless the filesystem cannot do it).
    pub direct_io: bool,
    /// Disk operations in flight on the ring at most.
    pub queue_depth: u32,
    /// RocksDB memory limits.
    pub index_memory: IndexMemory,
}

/// Blocks read from the store, verified against their checksums.
#[derive(Clone, Debug)]
pub struct BlockRead {
    /// The data; unwritten blocks are zeros.
    pub data: Bytes,
    /// One crc32c per block (of the stored bytes).
    pub crcs: Vec<u32>,
    /// Encryption context per block where one was stored.
    pub crypt: Vec<Option<CryptContext>>,
}

/// How the scrubber overwrites a freed slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FillPattern {
    /// All zero bytes.
    Zeros,
    /// One repeated byte.
    Byte(u8),
    /// Fresh random bytes for every pass.
    Random,
}

impl std::fmt::Display for FillPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FillPattern::Zeros => f.write_str("zeros"),
            FillPattern::Byte(b) => write!(f, "{b:#04x}"),
            FillPattern::Random => f.write_str("random"),
        }
    }
}

impl std::str::FromStr for FillPattern {
    type Err = String;

    /// `zeros`, `random`, or one byte written as `0xNN`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "zeros" => Ok(FillPattern::Zeros),
            "random" => Ok(FillPattern::Random),
            other => other
                .strip_prefix("0x")
                .filter(|h| h.len() == 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .map(FillPattern::Byte)
                .ok_or_else(|| format!("{other:?} is not an overwrite pattern: use zeros, random or a byte like 0xff")),
        }
    }
}

/// One written block as an integrity check found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockCheck {
    /// Block within the chunk.
    pub block: u16,
    /// The crc32c the index holds for it (what was written).
    pub stored_crc: u32,
    /// The crc32c of what the data file holds now.
    pub actual_crc: u32,
    /// The block's encryption context (encrypted volumes), as the index holds it.
    pub crypt: Option<CryptContext>,
}

impl BlockCheck {
    /// The data file still holds what was written.
    pub fn is_intact(&self) -> bool {
        self.stored_crc == self.actual_crc
    }
}

/// Every written block of one chunk, checked ([`ChunkStore::check_chunk`]).
#[derive(Clone, Debug)]
pub struct ChunkCheck {
    /// The chunk.
    pub key: ChunkKey,
    /// Written blocks in order; unwritten blocks (which read as zeros) are absent.
    pub blocks: Vec<BlockCheck>,
    /// The chunk's bytes from block 0 through its last written block, as read.
    pub data: Bytes,
}

impl ChunkCheck {
    /// The blocks whose data no longer matches their crc.
    pub fn corrupt(&self) -> impl Iterator<Item = &BlockCheck> {
        self.blocks.iter().filter(|b| !b.is_intact())
    }

    /// The bytes of `block` as read (zeros for a block past the last written one).
    pub fn block_data(&self, block: u16) -> Bytes {
        let at = block as usize * BLOCK_SIZE as usize;
        if at + BLOCK_SIZE as usize <= self.data.len() {
            self.data.slice(at..at + BLOCK_SIZE as usize)
        } else {
            Bytes::from(vec![0u8; BLOCK_SIZE as usize])
        }
    }

    /// Bytes read from the data file.
    pub fn bytes_read(&self) -> u64 {
        self.data.len() as u64
    }
}

/// Space accounting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Slots in the data file.
    pub slots_total: u64,
    /// Slots holding a chunk.
    pub slots_mapped: u64,
    /// Slots freed and waiting to be overwritten.
    pub slots_pending_scrub: u64,
    /// Bytes per slot.
    pub slot_size: u64,
}

impl StoreStats {
    /// Bytes that can take new data right now.
    pub fn free_bytes(&self) -> u64 {
        (self.slots_total - self.slots_mapped - self.slots_pending_scrub) * self.slot_size
    }
}

/// How a volume's slots in one shard are held ([`ChunkStore::snapshot_usage`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotUsage {
    /// Slots of chunks' newest versions: the volume as it is now.
    pub head_slots: u64,
    /// Slots of older versions, which only snapshots read (or nobody, until the next release).
    pub snapshot_slots: u64,
    /// Per live snapshot epoch: slots only that snapshot reads (what deleting it frees).
    pub exclusive_slots: BTreeMap<Epoch, u64>,
}

/// A chunk slot was overwritten and returned to the allocator.
#[derive(Clone, Copy, Debug)]
pub struct Scrubbed {
    /// The queue record that was drained.
    pub record: FreeRecord,
    /// Bytes overwritten (slot size × passes).
    pub bytes: u64,
}

enum Op {
    Write { shard: u32, volume: VolumeId, epoch: Epoch, offset: u64, data: Bytes, crcs: Vec<u32>, crypt: Option<Vec<CryptContext>> },
    Zero { shard: u32, volume: VolumeId, epoch: Epoch, offset: u64, len: u64, deallocate: bool },
    DeleteVolume { shard: u32, volume: VolumeId },
    ReleaseVersions { shard: u32, volume: VolumeId, live: Vec<Epoch> },
    Rollback { shard: u32, volume: VolumeId, to: Epoch, at: Epoch },
    PutImage { shard: u32, image: ChunkImage },
    DropShard { shard: u32 },
    MoveShard { from: u32, to: u32 },
    PutState { shard: u32, name: Vec<u8>, value: Vec<u8> },
    DeleteState { shard: u32, name: Vec<u8> },
}

/// A group of mutations applied together: their disk writes are issued concurrently (in order
/// where they overlap) and their index updates land in one RocksDB write.
#[derive(Default)]
pub struct Batch {
    ops: Vec<Op>,
    /// The lineages of the clones the batch touches, by (shard, volume).
    lineages: HashMap<(u32, VolumeId), Vec<(VolumeId, Epoch)>>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// True if nothing was added.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Names `volume` (in `shard`) a clone with `lineage`: every op of the batch on it reads
    /// through its ancestors where it holds no version of its own. A volume's lineage never
    /// changes, so callers name it with each batch that touches the clone.
    pub fn set_lineage(&mut self, shard: u32, volume: VolumeId, lineage: Vec<(VolumeId, Epoch)>) {
        if lineage.is_empty() {
            self.lineages.remove(&(shard, volume));
        } else {
            self.lineages.insert((shard, volume), lineage);
        }
    }

    fn lineage(&self, shard: u32, volume: VolumeId) -> &Lineage {
        self.lineages.get(&(shard, volume)).map_or(&[], Vec::as_slice)
    }

    /// Writes whole blocks at `offset` (block aligned; `data` a multiple of 4 KiB) in the
    /// volume's write epoch `epoch`, with one crc32c per block which the store verifies before
    /// accepting the data. A chunk whose newest version is older than `epoch` is copied first;
    /// one newer than `epoch` makes the commit fail (callers refuse such writes before).
    pub fn write(&mut self, shard: u32, volume: VolumeId, epoch: Epoch, offset: u64, data: Bytes, crcs: Vec<u32>) -> Result<()> {
        check_range(offset, data.len() as u64)?;
        if crcs.len() as u64 != data.len() as u64 / BLOCK_SIZE {
            return Err(ChunkStoreError::Invalid(format!("{} checksums for {} blocks", crcs.len(), data.len() as u64 / BLOCK_SIZE)));
        }
        for (i, block) in data.chunks(BLOCK_SIZE as usize).enumerate() {
            let actual = crc32c(block);
            if actual != crcs[i] {
                return Err(ChunkStoreError::BadChecksum { volume, offset: offset + i as u64 * BLOCK_SIZE, expected: crcs[i], actual });
            }
        }
        self.ops.push(Op::Write { shard, volume, epoch, offset, data, crcs, crypt: None });
        Ok(())
    }

    /// Like [`Batch::write`] for an encrypted volume: also stores each block's nonce and tag.
    #[allow(clippy::too_many_arguments)]
    pub fn write_encrypted(
        &mut self,
        shard: u32,
        volume: VolumeId,
        epoch: Epoch,
        offset: u64,
        data: Bytes,
        crcs: Vec<u32>,
        crypt: Vec<CryptContext>,
    ) -> Result<()> {
        if crypt.len() != crcs.len() {
            return Err(ChunkStoreError::Invalid("one encryption context per block is required".into()));
        }
        self.write(shard, volume, epoch, offset, data, crcs)?;
        if let Some(Op::Write { crypt: c, .. }) = self.ops.last_mut() {
            *c = Some(crypt);
        }
        Ok(())
    }

    /// Makes a block-aligned range read as zeros in write epoch `epoch`. Whole chunks are
    /// released to the scrub queue when `deallocate` (or, where a snapshot holds an older
    /// version, become a hole in this epoch); other blocks are overwritten with zeros on disk
    /// right away, so freed data never lingers in a slot that stays allocated.
    pub fn zero(&mut self, shard: u32, volume: VolumeId, epoch: Epoch, offset: u64, len: u64, deallocate: bool) -> Result<()> {
        check_range(offset, len)?;
        self.ops.push(Op::Zero { shard, volume, epoch, offset, len, deallocate });
        Ok(())
    }

    /// Releases every chunk (every version) of `volume` in `shard` to the scrub queue.
    pub fn delete_volume(&mut self, shard: u32, volume: VolumeId) {
        self.ops.push(Op::DeleteVolume { shard, volume });
    }

    /// Releases the versions of `volume`'s chunks in `shard` that neither are a chunk's newest
    /// version nor what one of the `live` snapshot epochs resolves to (a snapshot was
    /// deleted). Their slots go to the scrub queue. Idempotent.
    pub fn release_versions(&mut self, shard: u32, volume: VolumeId, live: Vec<Epoch>) {
        self.ops.push(Op::ReleaseVersions { shard, volume, live });
    }

    /// Stores a chunk image (snapshot transfer) into `shard`, replacing that chunk.
    pub fn put_image(&mut self, shard: u32, image: ChunkImage) -> Result<()> {
        if image.data.len() != image.blocks.len() * BLOCK_SIZE as usize {
            return Err(ChunkStoreError::Invalid("chunk image data does not match its block list".into()));
        }
        for ((_, meta), block) in image.blocks.iter().zip(image.data.chunks(BLOCK_SIZE as usize)) {
            let actual = crc32c(block);
            if actual != meta.crc {
                return Err(ChunkStoreError::BadChecksum { volume: image.volume, offset: image.chunk * CHUNK_SIZE, expected: meta.crc, actual });
            }
        }
        self.ops.push(Op::PutImage { shard, image });
        Ok(())
    }

    /// Returns `volume`'s chunks in `shard` to snapshot epoch `to`: each chunk whose newest
    /// version is newer gets a version at write epoch `at` (replacing one already there)
    /// holding a copy of what `to` reads, or a hole. Older versions stay (other snapshots may
    /// read them). Idempotent.
    pub fn rollback(&mut self, shard: u32, volume: VolumeId, to: Epoch, at: Epoch) {
        self.ops.push(Op::Rollback { shard, volume, to, at });
    }

    /// Releases every chunk of `shard` to the scrub queue.
    pub fn drop_shard(&mut self, shard: u32) {
        self.ops.push(Op::DropShard { shard });
    }

    /// Re-labels every chunk of shard `from` as belonging to `to` (which must be empty by then,
    /// e.g. dropped earlier in the same batch). Earlier ops in the batch must not touch `from`.
    pub fn move_shard(&mut self, from: u32, to: u32) {
        self.ops.push(Op::MoveShard { from, to });
    }

    /// Records a small value in the shard's state (made durable by the next checkpoint).
    pub fn put_state(&mut self, shard: u32, name: &[u8], value: Vec<u8>) {
        self.ops.push(Op::PutState { shard, name: name.to_vec(), value });
    }

    /// Removes a value from the shard's state.
    pub fn delete_state(&mut self, shard: u32, name: &[u8]) {
        self.ops.push(Op::DeleteState { shard, name: name.to_vec() });
    }
}

fn check_range(offset: u64, len: u64) -> Result<()> {
    if !offset.is_multiple_of(BLOCK_SIZE) || !len.is_multiple_of(BLOCK_SIZE) {
        return Err(ChunkStoreError::Invalid(format!("offset {offset} and length {len} must be multiples of {BLOCK_SIZE}")));
    }
    if len == 0 || len > MAX_IO_BYTES {
        return Err(ChunkStoreError::Invalid(format!("length {len} must be between 1 block and {MAX_IO_BYTES} bytes")));
    }
    offset.checked_add(len).ok_or_else(|| ChunkStoreError::Invalid("offset + length overflows".into()))?;
    Ok(())
}

/// One chunk's part of a block range.
struct Piece {
    key: ChunkKey,
    first_block: u16,
    blocks: u16,
    /// Offset of the piece within the whole I/O.
    buf_offset: usize,
}

/// The pieces of a range, their keys at `epoch`.
fn pieces(shard: u32, volume: VolumeId, epoch: Epoch, offset: u64, len: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let chunk = pos / CHUNK_SIZE;
        let chunk_end = (chunk + 1) * CHUNK_SIZE;
        let piece_end = end.min(chunk_end);
        out.push(Piece {
            key: ChunkKey { shard, volume, chunk, epoch },
            first_block: ((pos - chunk * CHUNK_SIZE) / BLOCK_SIZE) as u16,
            blocks: ((piece_end - pos) / BLOCK_SIZE) as u16,
            buf_offset: (pos - offset) as usize,
        });
        pos = piece_end;
    }
    out
}

/// Allocation state, rebuilt from the index at open.
struct Mapping {
    chunks: BTreeMap<ChunkKey, u64>,
    used: Vec<u64>,
    used_count: u64,
    slot_count: u64,
    hint: u64,
    queue: BTreeMap<u64, FreeRecord>,
    next_seq: u64,
}

impl Mapping {
    fn is_used(&self, slot: u64) -> bool {
        self.used[(slot / 64) as usize] & (1 << (slot % 64)) != 0
    }

    fn set_used(&mut self, slot: u64, used: bool) {
        let word = &mut self.used[(slot / 64) as usize];
        let bit = 1u64 << (slot % 64);
        if used && *word & bit == 0 {
            *word |= bit;
            self.used_count += 1;
        } else if !used && *word & bit != 0 {
            *word &= !bit;
            self.used_count -= 1;
        }
    }

    fn allocate(&mut self) -> Option<u64> {
        if self.used_count >= self.slot_count {
            return None;
        }
        // Next-fit from the hint keeps consecutive allocations contiguous on disk.
        for i in 0..self.slot_count {
            let slot = (self.hint + i) % self.slot_count;
            if !self.is_used(slot) {
                self.set_used(slot, true);
                self.hint = slot + 1;
                return Some(slot);
            }
        }
        None
    }

    /// Every version of every chunk of `shard` (of `volume` only, if given), in key order.
    fn range(&self, shard: u32, volume: Option<VolumeId>) -> Vec<(ChunkKey, u64)> {
        let (lo, hi) = match volume {
            Some(v) => (ChunkKey { shard, volume: v, chunk: 0, epoch: 0 }, ChunkKey { shard, volume: v, chunk: u64::MAX, epoch: u64::MAX }),
            None => (
                ChunkKey { shard, volume: VolumeId(0), chunk: 0, epoch: 0 },
                ChunkKey { shard, volume: VolumeId(u64::MAX), chunk: u64::MAX, epoch: u64::MAX },
            ),
        };
        self.chunks.range(lo..=hi).map(|(k, s)| (*k, *s)).collect()
    }

    /// The newest version of `key`'s chunk at or before `at` (`key.epoch` is ignored).
    fn resolve(&self, key: ChunkKey, at: Epoch) -> Option<(ChunkKey, u64)> {
        self.chunks.range(key.at(0)..=key.at(at)).next_back().map(|(k, s)| (*k, *s))
    }

    /// The newest version of `key`'s chunk.
    fn head(&self, key: ChunkKey) -> Option<(ChunkKey, u64)> {
        self.resolve(key, Epoch::MAX)
    }

    /// What a clone with `lineage` reads for `key`'s chunk where it holds no version: the
    /// nearest ancestor's version at its epoch, `None` for zeros (none, or a hole).
    fn inherited(&self, key: ChunkKey, lineage: &Lineage) -> Option<(ChunkKey, u64)> {
        for (volume, epoch) in lineage {
            if let Some(found) = self.resolve(ChunkKey { volume: *volume, ..key }, *epoch) {
                return (found.1 != HOLE).then_some(found);
            }
        }
        None
    }

    /// What reads of `key`'s chunk at `at` see: its own newest version no newer than `at`, or
    /// what it inherits; `None` for zeros.
    fn resolve_through(&self, key: ChunkKey, at: Epoch, lineage: &Lineage) -> Option<(ChunkKey, u64)> {
        match self.resolve(key, at) {
            Some((_, HOLE)) => None,
            Some(found) => Some(found),
            None => self.inherited(key, lineage),
        }
    }

    /// Whether `key`'s chunk has a version older than `key.epoch`.
    fn has_older(&self, key: ChunkKey) -> bool {
        key.epoch > 0 && self.chunks.range(key.at(0)..key).next().is_some()
    }

    /// For each chunk of `volume` in `shard` changed since epoch `to` (its newest version is
    /// newer): its newest version and slot, and the version `to` reads (`None`: zeros).
    fn rollback_plan(&self, shard: u32, volume: VolumeId, to: Epoch, lineage: &Lineage) -> Vec<((ChunkKey, u64), Option<ChunkKey>)> {
        let all = self.range(shard, Some(volume));
        all.chunk_by(|a, b| a.0.chunk == b.0.chunk)
            .filter_map(|versions| {
                let head = *versions.last()?;
                (head.0.epoch > to).then(|| (head, self.resolve_through(head.0, to, lineage).map(|(k, _)| k)))
            })
            .collect()
    }

    /// Whether a write to `key` (at its epoch) needs a slot it does not have: a new chunk, a
    /// copy of an older version, or data where a hole is.
    fn needs_slot(&self, key: ChunkKey) -> bool {
        match self.head(key) {
            None => true,
            Some((h, slot)) => h.epoch != key.epoch || slot == HOLE,
        }
    }
}

struct Inner {
    data: DataFile,
    index: Index,
    uring: Uring,
    map: Mutex<Mapping>,
    failed: Mutex<Option<String>>,
}

/// A node's chunk store. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct ChunkStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ChunkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkStore({})", self.inner.data.path.display())
    }
}

/// A planned disk write.
struct PlannedIo {
    offset: u64,
    buf: AlignedBuf,
    /// (slot, first block, blocks) for overlap detection.
    span: (u64, u16, u16),
}

/// A version a write copies before it writes: its block metadata and bytes (block 0 through
/// the last written one; `None` when no block is written).
struct CopySource {
    metas: Vec<(u16, BlockMeta)>,
    buf: Option<AlignedBuf>,
    /// Copies the batch makes of it.
    uses: usize,
}

/// Turns a batch's ops into disk writes and one index batch, updating the in-memory map as it
/// goes (under the map lock: no I/O here).
struct Planner<'a> {
    inner: &'a Inner,
    map: &'a mut Mapping,
    wb: &'a mut WriteBatch,
    ios: &'a mut Vec<PlannedIo>,
    new_free: &'a mut Vec<FreeRecord>,
    copies: &'a mut HashMap<ChunkKey, CopySource>,
    lineages: &'a HashMap<(u32, VolumeId), Vec<(VolumeId, Epoch)>>,
    cf_chunks: &'a rocksdb::ColumnFamily,
    cf_blocks: &'a rocksdb::ColumnFamily,
}

impl<'a> Planner<'a> {
    fn lineage(&self, shard: u32, volume: VolumeId) -> &'a Lineage {
        self.lineages.get(&(shard, volume)).map_or(&[], Vec::as_slice)
    }

    fn op(&mut self, op: Op, moved: &mut impl Iterator<Item = Vec<ChunkMetas>>) -> Result<()> {
        match op {
            Op::Write { shard, volume, epoch, offset, data, crcs, crypt } => {
                for p in pieces(shard, volume, epoch, offset, data.len() as u64) {
                    let slot = self.slot_for(p.key)?;
                    let start = p.buf_offset;
                    let end = start + p.blocks as usize * BLOCK_SIZE as usize;
                    self.ios.push(PlannedIo {
                        offset: self.inner.data.slot_offset(slot) + p.first_block as u64 * BLOCK_SIZE,
                        buf: AlignedBuf::from_slice(&data[start..end]),
                        span: (slot, p.first_block, p.blocks),
                    });
                    for b in 0..p.blocks {
                        let idx = p.buf_offset / BLOCK_SIZE as usize + b as usize;
                        let meta = BlockMeta { crc: crcs[idx], crypt: crypt.as_ref().map(|c| c[idx]) };
                        self.wb.put_cf(self.cf_blocks, p.key.block_key(p.first_block + b), meta.encode());
                    }
                }
            }
            Op::Zero { shard, volume, epoch, offset, len, deallocate } => {
                for p in pieces(shard, volume, epoch, offset, len) {
                    self.zero_piece(&p, deallocate)?;
                }
            }
            Op::DeleteVolume { shard, volume } => {
                for (key, slot) in self.map.range(shard, Some(volume)) {
                    self.drop_version(key, slot, FreeReason::VolumeDeleted);
                }
            }
            Op::ReleaseVersions { shard, volume, live } => {
                let lineage = self.lineage(shard, volume);
                let all = self.map.range(shard, Some(volume));
                for chunk in all.chunk_by(|a, b| a.0.chunk == b.0.chunk) {
                    let versions = ChunkVersions::from_oldest(chunk.iter().map(|(k, slot)| Version { epoch: k.epoch, slot: *slot }))
                        .ok_or_else(|| ChunkStoreError::Failed(format!("{volume} chunk {} has versions out of order", chunk[0].0.chunk)))?;
                    let mut versions = versions;
                    for v in versions.release(&live) {
                        self.drop_version(chunk[0].0.at(v.epoch), v.slot, FreeReason::SnapshotDeleted);
                    }
                    // A hole left alone reads as zeros without its record (unless it hides what
                    // a clone would inherit).
                    if let [only] = versions.all()
                        && only.slot == HOLE
                        && self.map.inherited(chunk[0].0, lineage).is_none()
                    {
                        self.drop_version(chunk[0].0.at(only.epoch), HOLE, FreeReason::SnapshotDeleted);
                    }
                }
            }
            Op::Rollback { shard, volume, to, at } => {
                let lineage = self.lineage(shard, volume);
                for ((head, head_slot), src) in self.map.rollback_plan(shard, volume, to, lineage) {
                    let target = head.at(at);
                    // A version of this epoch (written since the last snapshot) is replaced.
                    if head.epoch == at {
                        self.drop_version(head, head_slot, FreeReason::RolledBack);
                    }
                    match src {
                        Some(src) => {
                            let slot = self.allocate()?;
                            self.set_version(target, slot);
                            self.copy_into(target, slot, src)?;
                        }
                        // The snapshot read zeros here: a hole hides the newer versions (and
                        // what a clone would inherit).
                        None if self.map.has_older(target) || self.map.inherited(target, lineage).is_some() => self.set_version(target, HOLE),
                        None => {}
                    }
                }
            }
            Op::DropShard { shard } => {
                for (key, slot) in self.map.range(shard, None) {
                    self.drop_version(key, slot, FreeReason::ReplicaRemoved);
                }
            }
            Op::PutImage { shard, image } => {
                let key = ChunkKey { shard, volume: image.volume, chunk: image.chunk, epoch: image.epoch };
                if image.hole {
                    if let Some(slot) = self.map.chunks.get(&key).copied() {
                        self.drop_version(key, slot, FreeReason::ReplicaRemoved);
                    }
                    self.set_version(key, HOLE);
                    return Ok(());
                }
                let slot = match self.map.chunks.get(&key).copied() {
                    Some(slot) if slot != HOLE => slot,
                    _ => {
                        let slot = self.allocate()?;
                        self.set_version(key, slot);
                        slot
                    }
                };
                let mut hi = key.encode().to_vec();
                hi.extend_from_slice(&[0xff, 0xff, 0xff]);
                self.wb.delete_range_cf(self.cf_blocks, key.block_key(0).to_vec(), hi);
                // Overwrite the whole slot: blocks absent from the image become zeros.
                let mut buf = AlignedBuf::zeroed(CHUNK_SIZE as usize);
                for (i, (block, meta)) in image.blocks.iter().enumerate() {
                    let dst = *block as usize * BLOCK_SIZE as usize;
                    let src = i * BLOCK_SIZE as usize;
                    buf.as_mut_slice()[dst..dst + BLOCK_SIZE as usize].copy_from_slice(&image.data[src..src + BLOCK_SIZE as usize]);
                    self.wb.put_cf(self.cf_blocks, key.block_key(*block), meta.encode());
                }
                self.ios.push(PlannedIo { offset: self.inner.data.slot_offset(slot), buf, span: (slot, 0, BLOCKS_PER_CHUNK as u16) });
            }
            Op::MoveShard { to, .. } => {
                let metas = moved.next().unwrap_or_default();
                for (key, blocks) in metas {
                    let Some(slot) = self.map.chunks.remove(&key) else { continue };
                    let new_key = ChunkKey { shard: to, ..key };
                    self.map.chunks.insert(new_key, slot);
                    self.wb.delete_cf(self.cf_chunks, key.encode());
                    self.wb.put_cf(self.cf_chunks, new_key.encode(), slot.to_le_bytes());
                    for (block, meta) in blocks {
                        self.wb.delete_cf(self.cf_blocks, key.block_key(block));
                        self.wb.put_cf(self.cf_blocks, new_key.block_key(block), meta.encode());
                    }
                }
            }
            Op::PutState { shard, name, value } => self.wb.put_cf(self.inner.index.cf(CF_STATE), state_key(shard, &name), value),
            Op::DeleteState { shard, name } => self.wb.delete_cf(self.inner.index.cf(CF_STATE), state_key(shard, &name)),
        }
        Ok(())
    }

    /// Zeroes one chunk's part of a range at `p.key.epoch`.
    fn zero_piece(&mut self, p: &Piece, deallocate: bool) -> Result<()> {
        let whole = u64::from(p.blocks) == BLOCKS_PER_CHUNK;
        let head = self.map.head(p.key);
        let lineage = self.lineage(p.key.shard, p.key.volume);
        if !deallocate {
            // Zero-fill that must stay allocated (NBD NO_HOLE): write zeros.
            let slot = self.slot_for(p.key)?;
            self.push_zero_fill(slot, p);
            return Ok(());
        }
        match head {
            // A clone's chunk it never wrote: a hole hides what it inherits; part of it is
            // copied and zeroed.
            None if self.map.inherited(p.key, lineage).is_some() => {
                if whole {
                    self.set_version(p.key, HOLE);
                } else {
                    let slot = self.slot_for(p.key)?;
                    self.zero_blocks(slot, p);
                }
            }
            // Nothing stored, or a hole: reads as zeros already.
            None => {}
            Some((_, HOLE)) => {}
            Some((h, slot)) if h.epoch == p.key.epoch => {
                if !whole {
                    self.zero_blocks(slot, p);
                } else if self.map.has_older(h) || self.map.inherited(h, lineage).is_some() {
                    // A snapshot holds an older version (or a clone's ancestor one): this
                    // epoch's version becomes a hole.
                    self.drop_version(h, slot, FreeReason::Trimmed);
                    self.set_version(h, HOLE);
                } else {
                    self.drop_version(h, slot, FreeReason::Trimmed);
                }
            }
            Some((h, _)) if h.epoch > p.key.epoch => return Err(stale(p.key, h.epoch)),
            // The newest version is frozen by an older epoch.
            Some(_) if whole => self.set_version(p.key, HOLE),
            Some(_) => {
                let slot = self.slot_for(p.key)?;
                self.zero_blocks(slot, p);
            }
        }
        Ok(())
    }

    /// The slot a write to `key` (at its epoch) goes to, following [`crate::versions::plan`]:
    /// in place, a fresh slot, or a fresh slot holding a copy of the older newest version.
    fn slot_for(&mut self, key: ChunkKey) -> Result<u64> {
        let head = self.map.head(key);
        if head.is_none()
            && let Some((from, _)) = self.map.inherited(key, self.lineage(key.shard, key.volume))
        {
            // A clone's first write to a chunk it inherits: a copy of the ancestor's version.
            let slot = self.allocate()?;
            self.set_version(key, slot);
            self.copy_into(key, slot, from)?;
            return Ok(slot);
        }
        let plan = crate::versions::plan(head.map(|(k, slot)| Version { epoch: k.epoch, slot }), key.epoch)
            .map_err(|_| stale(key, head.map_or(0, |(k, _)| k.epoch)))?;
        match plan {
            WritePlan::InPlace(slot) if slot != HOLE => Ok(slot),
            // A hole of this epoch, or no version yet: a fresh slot (unwritten blocks read as
            // zeros; the slot was overwritten before it became free).
            WritePlan::InPlace(_) | WritePlan::Fresh | WritePlan::CopyFrom(HOLE) => {
                let slot = self.allocate()?;
                self.set_version(key, slot);
                Ok(slot)
            }
            WritePlan::CopyFrom(_) => {
                let from = head.map(|(k, _)| k).ok_or_else(|| ChunkStoreError::Failed("a copy without a source".into()))?;
                let slot = self.allocate()?;
                self.set_version(key, slot);
                self.copy_into(key, slot, from)?;
                Ok(slot)
            }
        }
    }

    /// Fills version `key`'s new `slot` with a copy of version `from` (read before the batch).
    fn copy_into(&mut self, key: ChunkKey, slot: u64, from: ChunkKey) -> Result<()> {
        let source =
            self.copies.get_mut(&from).ok_or_else(|| ChunkStoreError::Failed(format!("{from:?} was not read before the batch that copies it")))?;
        source.uses = source.uses.saturating_sub(1);
        // The last (nearly always the only) copy takes the buffer; clones of one parent
        // copying the same version in one batch get their own.
        let buf = match &source.buf {
            Some(b) if source.uses > 0 => Some(AlignedBuf::from_slice(b.as_slice())),
            Some(_) => source.buf.take(),
            // Taken by a copy the plan did not count: refused rather than copying metadata
            // without its blocks.
            None if !source.metas.is_empty() => {
                return Err(ChunkStoreError::Failed(format!("{from:?} was copied more often than the batch planned")));
            }
            None => None,
        };
        if let Some(buf) = buf {
            let blocks = (buf.len() / BLOCK_SIZE as usize) as u16;
            self.ios.push(PlannedIo { offset: self.inner.data.slot_offset(slot), buf, span: (slot, 0, blocks) });
        }
        for (block, meta) in &source.metas {
            self.wb.put_cf(self.cf_blocks, key.block_key(*block), meta.encode());
        }
        Ok(())
    }

    fn allocate(&mut self) -> Result<u64> {
        // `precheck` guaranteed room; running out here means the accounting is wrong.
        self.map.allocate().ok_or_else(|| {
            ChunkStoreError::Failed(format!("allocator ran out of slots mid-batch despite the space check ({} slots)", self.map.slot_count))
        })
    }

    /// Records version `key` at `slot` (or [`HOLE`]).
    fn set_version(&mut self, key: ChunkKey, slot: u64) {
        self.map.chunks.insert(key, slot);
        self.wb.put_cf(self.cf_chunks, key.encode(), slot.to_le_bytes());
    }

    /// Removes version `key`: its records go, its slot (unless a hole) joins the scrub queue.
    fn drop_version(&mut self, key: ChunkKey, slot: u64, reason: FreeReason) {
        self.map.chunks.remove(&key);
        self.wb.delete_cf(self.cf_chunks, key.encode());
        if slot == HOLE {
            return;
        }
        let rec = FreeRecord { seq: self.map.next_seq, slot, reason };
        self.map.next_seq += 1;
        let mut hi = key.encode().to_vec();
        hi.extend_from_slice(&[0xff, 0xff, 0xff]);
        self.wb.delete_range_cf(self.cf_blocks, key.block_key(0).to_vec(), hi);
        self.wb.put_cf(self.inner.index.cf(CF_FREE), rec.seq.to_be_bytes(), rec.encode_value());
        self.new_free.push(rec);
    }

    /// Overwrites `p`'s blocks of `slot` with zeros and forgets them (they read as zeros).
    fn zero_blocks(&mut self, slot: u64, p: &Piece) {
        self.ios.push(PlannedIo {
            offset: self.inner.data.slot_offset(slot) + p.first_block as u64 * BLOCK_SIZE,
            buf: AlignedBuf::zeroed(p.blocks as usize * BLOCK_SIZE as usize),
            span: (slot, p.first_block, p.blocks),
        });
        self.wb.delete_range_cf(
            self.cf_blocks,
            p.key.block_key(p.first_block).to_vec(),
            end_block_key(&p.key, p.first_block as u32 + p.blocks as u32),
        );
    }

    /// Writes zeros over `p`'s blocks of `slot`, which stay allocated and written.
    fn push_zero_fill(&mut self, slot: u64, p: &Piece) {
        self.ios.push(PlannedIo {
            offset: self.inner.data.slot_offset(slot) + p.first_block as u64 * BLOCK_SIZE,
            buf: AlignedBuf::zeroed(p.blocks as usize * BLOCK_SIZE as usize),
            span: (slot, p.first_block, p.blocks),
        });
        let meta = BlockMeta { crc: ZERO_BLOCK_CRC, crypt: None }.encode();
        for b in 0..p.blocks {
            self.wb.put_cf(self.cf_blocks, p.key.block_key(p.first_block + b), &meta);
        }
    }
}

fn stale(key: ChunkKey, head: Epoch) -> ChunkStoreError {
    ChunkStoreError::Invalid(format!(
        "a write to {} chunk {} at epoch {} arrived after one at epoch {head}: it was issued before a snapshot and is refused",
        key.volume, key.chunk, key.epoch
    ))
}

impl ChunkStore {
    /// Opens (formatting if new) the data file and index, and rebuilds the allocation map.
    /// Blocking: call at startup or from a blocking thread.
    pub fn open(config: &ChunkStoreConfig) -> Result<Self> {
        if let Some(parent) = config.data_path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| ChunkStoreError::Io { path: parent.to_path_buf(), source })?;
        }
        let data = DataFile::open(&config.data_path, config.capacity, config.direct_io)?;
        let index = Index::open(&config.index_dir, config.index_memory)?;
        index.bind_uuid(&data.superblock.uuid, &config.data_path)?;
        index.check_format()?;

        let slot_count = data.superblock.slot_count;
        let mut map = Mapping {
            chunks: BTreeMap::new(),
            used: vec![0; slot_count.div_ceil(64) as usize],
            used_count: 0,
            slot_count,
            hint: 0,
            queue: BTreeMap::new(),
            next_seq: 1,
        };
        let bad_slot = |what: String| ChunkStoreError::BadFormat { path: config.index_dir.clone(), reason: what };
        for (key, slot) in index.load_chunks()? {
            if slot == HOLE {
                map.chunks.insert(key, slot);
                continue;
            }
            if slot >= slot_count {
                return Err(bad_slot(format!("chunk {key:?} points at slot {slot} beyond the data file's {slot_count} slots")));
            }
            if map.is_used(slot) {
                return Err(bad_slot(format!("slot {slot} is claimed twice (again by {key:?}); the index is corrupt")));
            }
            map.set_used(slot, true);
            map.chunks.insert(key, slot);
        }
        for rec in index.load_free()? {
            if rec.slot >= slot_count || map.is_used(rec.slot) {
                return Err(bad_slot(format!("scrub queue record {} names slot {} which is out of range or in use", rec.seq, rec.slot)));
            }
            map.set_used(rec.slot, true);
            map.next_seq = map.next_seq.max(rec.seq + 1);
            map.queue.insert(rec.seq, rec);
        }
        let uring = Uring::start(config.queue_depth, "chunks").map_err(|source| ChunkStoreError::Io { path: config.data_path.clone(), source })?;
        tracing::info!(
            data = %config.data_path.display(),
            slots = slot_count,
            chunks = map.chunks.len(),
            scrub_queue = map.queue.len(),
            "chunk store open"
        );
        Ok(Self { inner: Arc::new(Inner { data, index, uring, map: Mutex::new(map), failed: Mutex::new(None) }) })
    }

    fn map(&self) -> MutexGuard<'_, Mapping> {
        self.inner.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_failed(&self) -> Result<()> {
        let failed = self.inner.failed.lock().unwrap_or_else(|p| p.into_inner());
        match &*failed {
            Some(reason) => Err(ChunkStoreError::Failed(reason.clone())),
            None => Ok(()),
        }
    }

    fn fail(&self, err: &ChunkStoreError) {
        tracing::error!(error = %err, "chunk store failed; refusing further writes until restart");
        let mut failed = self.inner.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed.get_or_insert_with(|| err.to_string());
    }

    fn io_err(&self, source: std::io::Error) -> ChunkStoreError {
        ChunkStoreError::Io { path: self.inner.data.path.clone(), source }
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner)).await.map_err(|e| ChunkStoreError::Failed(format!("index task panicked: {e}")))?
    }

    /// Space accounting.
    pub fn stats(&self) -> StoreStats {
        let map = self.map();
        StoreStats {
            slots_total: map.slot_count,
            slots_mapped: map.used_count - map.queue.len() as u64,
            slots_pending_scrub: map.queue.len() as u64,
            slot_size: CHUNK_SIZE,
        }
    }

    /// Applies a batch. Either every op takes effect or the store stops (fail-stop: an I/O
    /// error mid-batch leaves memory ahead of disk, so further writes are refused until a
    /// restart recovers from the index and the Raft log).
    pub async fn commit(&self, mut batch: Batch) -> Result<()> {
        self.check_failed()?;
        if batch.ops.is_empty() {
            return Ok(());
        }
        // Metadata that moves with a shard must be read before the batch changes anything.
        let mut moved_metas: Vec<Vec<ChunkMetas>> = Vec::new();
        for op in &batch.ops {
            if let Op::MoveShard { from, .. } = op {
                let keys: Vec<ChunkKey> = self.map().range(*from, None).into_iter().map(|(k, _)| k).collect();
                let metas = self.blocking(move |inner| keys.iter().map(|k| Ok((*k, inner.index.chunk_metas(k)?))).collect()).await?;
                moved_metas.push(metas);
            }
        }

        self.precheck(&batch)?;
        let mut copies = self.read_copy_sources(&batch).await?;

        let mut wb = WriteBatch::default();
        let mut ios: Vec<PlannedIo> = Vec::new();
        let mut new_free: Vec<FreeRecord> = Vec::new();
        let planned = {
            let mut map = self.map();
            let mut plan = Planner {
                inner: &self.inner,
                map: &mut map,
                wb: &mut wb,
                ios: &mut ios,
                new_free: &mut new_free,
                copies: &mut copies,
                lineages: &batch.lineages,
                cf_chunks: self.inner.index.cf(CF_CHUNKS),
                cf_blocks: self.inner.index.cf(CF_BLOCKS),
            };
            let mut moved = moved_metas.into_iter();
            let ops = std::mem::take(&mut batch.ops);
            ops.into_iter().try_for_each(|op| plan.op(op, &mut moved))
        };
        if let Err(e) = planned {
            // Memory may be ahead of disk now (slots taken, versions recorded).
            self.fail(&e);
            return Err(e);
        }

        // Data first, index second: after a crash the index never points at data that was not
        // written (and Raft replays whatever the index lost).
        if let Err(e) = self.run_ios(ios).await {
            self.fail(&e);
            return Err(e);
        }
        // The index write goes inline when RocksDB can take it without waiting; a thread hop
        // per write cost more CPU than the write itself (context switches dominated profiles).
        let written = match self.inner.index.try_write_now(wb) {
            Ok(None) => Ok(()),
            Ok(Some(wb)) => self.blocking(move |inner| inner.index.write(wb)).await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            self.fail(&e);
            return Err(e);
        }
        // Only now may the scrubber see the freed slots: their queue records are in the index.
        let mut map = self.map();
        for rec in new_free {
            map.queue.insert(rec.seq, rec);
        }
        Ok(())
    }

    /// Reads the versions the batch's writes will copy (a chunk's newest version, older than
    /// the write's epoch; what a rollback returns a chunk to): their block metadata and bytes,
    /// keyed by the version read.
    async fn read_copy_sources(&self, batch: &Batch) -> Result<HashMap<ChunkKey, CopySource>> {
        // (the version made, the version copied), one per version made.
        let mut wanted: Vec<(ChunkKey, ChunkKey)> = Vec::new();
        let mut made: HashSet<ChunkKey> = HashSet::new();
        {
            let map = self.map();
            for op in &batch.ops {
                if let Op::Rollback { shard, volume, to, at } = op {
                    let plan = map.rollback_plan(*shard, *volume, *to, batch.lineage(*shard, *volume));
                    wanted.extend(plan.into_iter().filter_map(|((head, _), src)| src.map(|src| (head.at(*at), src))));
                    continue;
                }
                let (shard, volume, epoch, offset, len) = match op {
                    Op::Write { shard, volume, epoch, offset, data, .. } => (*shard, *volume, *epoch, *offset, data.len() as u64),
                    Op::Zero { shard, volume, epoch, offset, len, .. } => (*shard, *volume, *epoch, *offset, *len),
                    _ => continue,
                };
                let lineage = batch.lineage(shard, volume);
                for p in pieces(shard, volume, epoch, offset, len) {
                    let source = match map.head(p.key) {
                        Some((head, slot)) if head.epoch < epoch && slot != HOLE => Some(head),
                        None => map.inherited(p.key, lineage).map(|(k, _)| k),
                        _ => None,
                    };
                    // A chunk written twice in the batch is copied by the first write only.
                    if let Some(source) = source
                        && made.insert(p.key)
                    {
                        wanted.push((p.key, source));
                    }
                }
            }
        }
        // A source copied into two versions (clones of one parent writing a chunk first in
        // one batch) is read once and used twice.
        let mut out: HashMap<ChunkKey, CopySource> = HashMap::with_capacity(wanted.len());
        for (_, key) in wanted {
            if let Some(source) = out.get_mut(&key) {
                source.uses += 1;
                continue;
            }
            if let Some((metas, buf)) = self.read_written(key).await? {
                out.insert(key, CopySource { metas, buf, uses: 1 });
            }
        }
        Ok(out)
    }

    /// Rejects a batch that cannot complete before anything changes: not enough free slots for
    /// the chunks it would allocate, a shard move onto a shard that is not emptied first, or
    /// writes of one volume at two epochs (a copy is read before the batch's writes land, so
    /// callers commit what they staged before the first write of a newer epoch).
    fn precheck(&self, batch: &Batch) -> Result<()> {
        let map = self.map();
        let frees = batch.ops.iter().any(|op| {
            matches!(
                op,
                Op::DeleteVolume { .. } | Op::DropShard { .. } | Op::Zero { deallocate: true, .. } | Op::ReleaseVersions { .. } | Op::Rollback { .. }
            )
        });
        let mut needed: HashSet<ChunkKey> = HashSet::new();
        let mut dropped: HashSet<u32> = HashSet::new();
        let mut epochs: HashMap<(u32, VolumeId), Epoch> = HashMap::new();
        let mut one_epoch = |shard: u32, volume: VolumeId, epoch: Epoch| match epochs.insert((shard, volume), epoch) {
            Some(other) if other != epoch => {
                Err(ChunkStoreError::Invalid(format!("one batch writes {volume} in shard {shard} at epochs {other} and {epoch}")))
            }
            _ => Ok(()),
        };
        let count = |key: ChunkKey, needed: &mut HashSet<ChunkKey>| {
            // A chunk freed earlier in the batch needs a new slot, so with frees in the batch
            // count every chunk written (conservative).
            if frees || map.needs_slot(key) {
                needed.insert(key);
            }
        };
        // Refused here, before anything changes, so a stale write does not stop the store.
        let not_stale = |key: ChunkKey| match map.head(key) {
            Some((h, _)) if h.epoch > key.epoch => Err(stale(key, h.epoch)),
            _ => Ok(()),
        };
        for op in &batch.ops {
            match op {
                Op::Write { shard, volume, epoch, offset, data, .. } => {
                    one_epoch(*shard, *volume, *epoch)?;
                    for p in pieces(*shard, *volume, *epoch, *offset, data.len() as u64) {
                        not_stale(p.key)?;
                        count(p.key, &mut needed);
                    }
                }
                Op::Zero { shard, volume, epoch, offset, len, deallocate } => {
                    one_epoch(*shard, *volume, *epoch)?;
                    for p in pieces(*shard, *volume, *epoch, *offset, *len) {
                        not_stale(p.key)?;
                        // Deallocating needs a slot only to copy a frozen (or inherited) version
                        // partly zeroed.
                        let frozen = match map.head(p.key) {
                            Some((h, slot)) => h.epoch < p.key.epoch && slot != HOLE,
                            None => map.inherited(p.key, batch.lineage(*shard, *volume)).is_some(),
                        };
                        if !*deallocate || (frozen && u64::from(p.blocks) < BLOCKS_PER_CHUNK) {
                            count(p.key, &mut needed);
                        }
                    }
                }
                Op::PutImage { shard, image } => {
                    let key = ChunkKey { shard: *shard, volume: image.volume, chunk: image.chunk, epoch: image.epoch };
                    if !image.hole && (frees || map.chunks.get(&key).is_none_or(|s| *s == HOLE)) {
                        needed.insert(key);
                    }
                }
                Op::Rollback { shard, volume, to, at } => {
                    one_epoch(*shard, *volume, *at)?;
                    for ((head, _), src) in map.rollback_plan(*shard, *volume, *to, batch.lineage(*shard, *volume)) {
                        not_stale(head.at(*at))?;
                        if src.is_some() {
                            needed.insert(head.at(*at));
                        }
                    }
                }
                Op::DropShard { shard } => {
                    dropped.insert(*shard);
                }
                Op::MoveShard { from, to } if !dropped.contains(to) && !map.range(*to, None).is_empty() => {
                    return Err(ChunkStoreError::Invalid(format!("cannot move shard {from} onto non-empty shard {to}")));
                }
                _ => {}
            }
        }
        let free = map.slot_count - map.used_count;
        if needed.len() as u64 > free {
            return Err(ChunkStoreError::NoSpace { path: self.inner.data.path.clone(), slots: map.slot_count });
        }
        Ok(())
    }

    /// Issues writes concurrently, in waves: an I/O that overlaps one already in the current
    /// wave waits for the wave to finish, so later writes to a block always land last.
    async fn run_ios(&self, ios: Vec<PlannedIo>) -> Result<()> {
        let mut wave = Vec::new();
        let mut touched: HashSet<(u64, u16)> = HashSet::new();
        for io in ios {
            let (slot, first, n) = io.span;
            let overlaps = (first..first + n).any(|b| touched.contains(&(slot, b)));
            if overlaps {
                self.finish_wave(std::mem::take(&mut wave)).await?;
                touched.clear();
            }
            touched.extend((first..first + n).map(|b| (slot, b)));
            wave.push(io);
        }
        self.finish_wave(wave).await
    }

    async fn finish_wave(&self, wave: Vec<PlannedIo>) -> Result<()> {
        let file = &self.inner.data.file;
        let futures = wave.into_iter().map(|io| self.inner.uring.write(file.clone(), io.offset, io.buf));
        for res in futures::future::join_all(futures).await {
            res.map_err(|e| self.io_err(e))?;
        }
        Ok(())
    }

    /// Reads a block-aligned range of the volume as it is now (each chunk's newest version),
    /// verifying every written block's crc32c. Unwritten blocks read as zeros. A mismatch is
    /// an error naming volume, chunk and block; bad data is never returned.
    pub async fn read(&self, shard: u32, volume: VolumeId, offset: u64, len: u64) -> Result<BlockRead> {
        self.read_at(shard, volume, Epoch::MAX, offset, len).await
    }

    /// Like [`ChunkStore::read`], as the volume was at snapshot epoch `at`: each chunk's
    /// newest version no newer than `at`.
    pub async fn read_at(&self, shard: u32, volume: VolumeId, at: Epoch, offset: u64, len: u64) -> Result<BlockRead> {
        self.read_through(shard, volume, &[], at, offset, len).await
    }

    /// Like [`ChunkStore::read_at`] for a clone with `lineage`: a chunk it holds no version
    /// of reads as its nearest ancestor's at that ancestor's epoch.
    pub async fn read_through(&self, shard: u32, volume: VolumeId, lineage: &Lineage, at: Epoch, offset: u64, len: u64) -> Result<BlockRead> {
        check_range(offset, len)?;
        let blocks = (len / BLOCK_SIZE) as usize;
        let parts: Vec<(Piece, Option<u64>)> = {
            let map = self.map();
            pieces(shard, volume, at, offset, len)
                .into_iter()
                .map(|mut p| {
                    let found = map.resolve_through(p.key, at, lineage);
                    // The metadata lookups below are by the version found.
                    if let Some((k, _)) = found {
                        p.key = k;
                    }
                    (p, found.map(|(_, slot)| slot))
                })
                .collect()
        };
        let lookups: Vec<(ChunkKey, u16, u16)> = parts.iter().filter(|(_, s)| s.is_some()).map(|(p, _)| (p.key, p.first_block, p.blocks)).collect();
        // Block metadata is nearly always in the memtables or block cache: look there inline and
        // go to a blocking thread only when RocksDB would need the disk.
        let in_memory: Option<Vec<Vec<Option<BlockMeta>>>> =
            lookups.iter().map(|(k, f, n)| self.inner.index.block_metas_in_memory(k, *f, *n)).collect::<Result<_>>()?;
        let metas: Vec<Vec<Option<BlockMeta>>> = match in_memory {
            Some(metas) => metas,
            None => self.blocking(move |inner| lookups.iter().map(|(k, f, n)| inner.index.block_metas(k, *f, *n)).collect()).await?,
        };

        let mut out = vec![0u8; len as usize];
        let mut crcs = vec![ZERO_BLOCK_CRC; blocks];
        let mut crypt = vec![None; blocks];
        let mut reads = Vec::new();
        let mut metas = metas.into_iter();
        for (p, slot) in &parts {
            let Some(slot) = slot else { continue };
            let m = metas.next().unwrap_or_default();
            let first = m.iter().position(Option::is_some);
            let last = m.iter().rposition(Option::is_some);
            if let (Some(first), Some(last)) = (first, last) {
                let off = self.inner.data.slot_offset(*slot) + (p.first_block as u64 + first as u64) * BLOCK_SIZE;
                let n = (last - first + 1) * BLOCK_SIZE as usize;
                reads.push((p, first, m, self.inner.uring.read(self.inner.data.file.clone(), off, n)));
            }
        }
        let (meta_info, futs): (Vec<_>, Vec<_>) = reads.into_iter().map(|(p, first, m, f)| ((p, first, m), f)).unzip();
        let results = futures::future::join_all(futs).await;
        for ((p, first, m), res) in meta_info.into_iter().zip(results) {
            let buf = res.map_err(|e| self.io_err(e))?;
            for (i, meta) in m.iter().enumerate().skip(first) {
                let Some(meta) = meta else { continue };
                let src = (i - first) * BLOCK_SIZE as usize;
                let data = &buf.as_slice()[src..src + BLOCK_SIZE as usize];
                let actual = crc32c(data);
                if actual != meta.crc {
                    return Err(ChunkStoreError::Corrupt {
                        volume,
                        chunk: p.key.chunk,
                        block: p.first_block as u64 + i as u64,
                        stored: meta.crc,
                        actual,
                    });
                }
                let dst = p.buf_offset + i * BLOCK_SIZE as usize;
                out[dst..dst + BLOCK_SIZE as usize].copy_from_slice(data);
                let block_idx = p.buf_offset / BLOCK_SIZE as usize + i;
                crcs[block_idx] = meta.crc;
                crypt[block_idx] = meta.crypt;
            }
        }
        Ok(BlockRead { data: Bytes::from(out), crcs, crypt })
    }

    /// Makes everything written so far durable: fdatasync of the data file, then a synced WAL
    /// flush of the index. A caller records its applied position (via the state ops) *before*
    /// calling this, so the position is durable exactly when the data it covers is.
    pub async fn checkpoint(&self) -> Result<()> {
        self.check_failed()?;
        self.inner.uring.sync(self.inner.data.file.clone()).await.map_err(|e| self.io_err(e))?;
        self.blocking(|inner| inner.index.sync_wal()).await
    }

    /// A value from a shard's state.
    pub async fn get_state(&self, shard: u32, name: &[u8]) -> Result<Option<Vec<u8>>> {
        let name = name.to_vec();
        self.blocking(move |inner| inner.index.get_state(shard, &name)).await
    }

    /// All values of a shard's state whose names start with `prefix`.
    pub async fn scan_state(&self, shard: u32, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let prefix = prefix.to_vec();
        self.blocking(move |inner| inner.index.scan_state(shard, &prefix)).await
    }

    /// The chunk versions a shard holds, in key order (a chunk's versions oldest first).
    pub fn list_chunks(&self, shard: u32) -> Vec<ChunkKey> {
        self.map().range(shard, None).into_iter().map(|(k, _)| k).collect()
    }

    /// The newest version of a chunk (`chunk.epoch` is ignored), if the shard holds any.
    pub fn head_key(&self, chunk: ChunkKey) -> Option<ChunkKey> {
        self.map().head(chunk).map(|(k, _)| k)
    }

    /// The chunks of `volume` (a clone: with `lineage`) in `range` that hold data as seen at
    /// `at`, in chunk order, each with the version it resolves to (possibly an ancestor's). An
    /// incremental backup compares these with the previous backup's: a version is never
    /// rewritten once a snapshot froze it, so an equal key means equal data.
    pub fn resolved_chunks(&self, shard: u32, volume: VolumeId, lineage: &Lineage, at: Epoch, range: std::ops::Range<u64>) -> Vec<(u64, ChunkKey)> {
        if range.is_empty() {
            return Vec::new();
        }
        let map = self.map();
        let mut chunks: BTreeSet<u64> = BTreeSet::new();
        for owner in std::iter::once(volume).chain(lineage.iter().map(|(v, _)| *v)) {
            let lo = ChunkKey { shard, volume: owner, chunk: range.start, epoch: 0 };
            let hi = ChunkKey { shard, volume: owner, chunk: range.end - 1, epoch: u64::MAX };
            chunks.extend(map.chunks.range(lo..=hi).map(|(k, _)| k.chunk));
        }
        chunks
            .into_iter()
            .filter_map(|chunk| {
                let key = ChunkKey { shard, volume, chunk, epoch: at };
                map.resolve_through(key, at, lineage).map(|(found, _)| (chunk, found))
            })
            .collect()
    }

    /// Slots held per epoch by `volume`'s chunk versions in `shard` (holes hold none).
    pub fn slots_by_epoch(&self, shard: u32, volume: VolumeId) -> BTreeMap<Epoch, u64> {
        let mut out = BTreeMap::new();
        for (k, slot) in self.map().range(shard, Some(volume)) {
            if slot != HOLE {
                *out.entry(k.epoch).or_default() += 1;
            }
        }
        out
    }

    /// How `volume`'s slots in `shard` are held, given its live snapshots' epochs (any
    /// order): see [`SnapshotUsage`].
    pub fn snapshot_usage(&self, shard: u32, volume: VolumeId, live: &[Epoch]) -> SnapshotUsage {
        let mut usage = SnapshotUsage::default();
        let all = self.map().range(shard, Some(volume));
        for chunk in all.chunk_by(|a, b| a.0.chunk == b.0.chunk) {
            let n = chunk.len();
            for (i, (key, slot)) in chunk.iter().enumerate() {
                if *slot == HOLE {
                    continue;
                }
                if i + 1 == n {
                    usage.head_slots += 1;
                    continue;
                }
                // Read by the snapshots from its epoch up to the next version's.
                let until = chunk[i + 1].0.epoch;
                let mut readers = live.iter().filter(|e| **e >= key.epoch && **e < until);
                usage.snapshot_slots += 1;
                if let (Some(only), None) = (readers.next(), readers.next()) {
                    *usage.exclusive_slots.entry(*only).or_default() += 1;
                }
            }
        }
        usage
    }

    /// Shards that hold at least one chunk.
    pub fn shards(&self) -> Vec<u32> {
        let map = self.map();
        let mut out: Vec<u32> = map.chunks.keys().map(|k| k.shard).collect();
        out.dedup();
        out
    }

    /// The index's metadata of one chunk's written blocks, and the bytes of its slot from
    /// block 0 through the last written one (`None` when no block is written); `None` if the
    /// shard does not hold the chunk. Nothing is verified here.
    async fn read_written(&self, key: ChunkKey) -> Result<Option<(Vec<(u16, BlockMeta)>, Option<AlignedBuf>)>> {
        let Some(slot) = self.map().chunks.get(&key).copied() else {
            return Ok(None);
        };
        if slot == HOLE {
            return Ok(Some((Vec::new(), None)));
        }
        let metas = self.blocking(move |inner| inner.index.chunk_metas(&key)).await?;
        let Some(last) = metas.last().map(|(b, _)| *b) else {
            return Ok(Some((metas, None)));
        };
        let buf = self
            .inner
            .uring
            .read(self.inner.data.file.clone(), self.inner.data.slot_offset(slot), (last as usize + 1) * BLOCK_SIZE as usize)
            .await
            .map_err(|e| self.io_err(e))?;
        Ok(Some((metas, Some(buf))))
    }

    /// A verified copy of one chunk version, or `None` if the shard does not hold it.
    pub async fn read_image(&self, key: ChunkKey) -> Result<Option<ChunkImage>> {
        let hole = self.map().chunks.get(&key) == Some(&HOLE);
        let Some((metas, buf)) = self.read_written(key).await? else {
            return Ok(None);
        };
        let Some(buf) = buf else {
            return Ok(Some(ChunkImage { volume: key.volume, chunk: key.chunk, epoch: key.epoch, hole, blocks: Vec::new(), data: Bytes::new() }));
        };
        let mut data = Vec::with_capacity(metas.len() * BLOCK_SIZE as usize);
        for (block, meta) in &metas {
            let src = *block as usize * BLOCK_SIZE as usize;
            let bytes = &buf.as_slice()[src..src + BLOCK_SIZE as usize];
            let actual = crc32c(bytes);
            if actual != meta.crc {
                return Err(ChunkStoreError::Corrupt { volume: key.volume, chunk: key.chunk, block: *block as u64, stored: meta.crc, actual });
            }
            data.extend_from_slice(bytes);
        }
        Ok(Some(ChunkImage { volume: key.volume, chunk: key.chunk, epoch: key.epoch, hole: false, blocks: metas, data: Bytes::from(data) }))
    }

    /// Reads every written block of one chunk and checks it against its stored crc32c, without
    /// failing on a mismatch (the integrity scrub wants all of them). `None` if the shard does
    /// not hold the chunk. The caller keeps writers of the chunk out while this runs, or a
    /// block caught mid-write looks corrupt.
    pub async fn check_chunk(&self, key: ChunkKey) -> Result<Option<ChunkCheck>> {
        let Some((metas, buf)) = self.read_written(key).await? else {
            return Ok(None);
        };
        let data = buf.map(|b| Bytes::copy_from_slice(b.as_slice())).unwrap_or_default();
        let blocks = metas
            .iter()
            .map(|(block, meta)| {
                let at = *block as usize * BLOCK_SIZE as usize;
                BlockCheck { block: *block, stored_crc: meta.crc, actual_crc: crc32c(&data[at..at + BLOCK_SIZE as usize]), crypt: meta.crypt }
            })
            .collect();
        Ok(Some(ChunkCheck { key, blocks, data }))
    }

    /// The scrub queue: slots waiting to be overwritten, oldest first.
    pub fn scrub_queue(&self) -> Vec<FreeRecord> {
        self.map().queue.values().copied().collect()
    }

    /// Overwrites the oldest queued slot `passes` times with `pattern` (O_DIRECT, synced after
    /// each pass), then removes it from the queue and returns it to the allocator. Returns
    /// `None` when the queue is empty.
    pub async fn scrub_next(&self, pattern: FillPattern, passes: u32) -> Result<Option<Scrubbed>> {
        self.check_failed()?;
        let Some(record) = self.map().queue.values().next().copied() else {
            return Ok(None);
        };
        // The record (and the unmapping that produced it) must be durable before the data is
        // destroyed, or a crash could resurrect a mapping that points at scrubbed bytes.
        self.blocking(|inner| inner.index.sync_wal()).await?;
        let offset = self.inner.data.slot_offset(record.slot);
        for _ in 0..passes.max(1) {
            let mut buf = AlignedBuf::zeroed(CHUNK_SIZE as usize);
            match pattern {
                FillPattern::Zeros => {}
                FillPattern::Byte(b) => buf.as_mut_slice().fill(b),
                FillPattern::Random => rand::Rng::fill(&mut rand::rng(), buf.as_mut_slice()),
            }
            self.inner.uring.write(self.inner.data.file.clone(), offset, buf).await.map_err(|e| self.io_err(e))?;
            self.inner.uring.sync(self.inner.data.file.clone()).await.map_err(|e| self.io_err(e))?;
        }
        let seq = record.seq;
        self.blocking(move |inner| {
            let mut wb = WriteBatch::default();
            wb.delete_cf(inner.index.cf(CF_FREE), seq.to_be_bytes());
            inner.index.write(wb)
        })
        .await?;
        let mut map = self.map();
        map.queue.remove(&seq);
        map.set_used(record.slot, false);
        Ok(Some(Scrubbed { record, bytes: CHUNK_SIZE * u64::from(passes.max(1)) }))
    }

    /// The data file path.
    pub fn data_path(&self) -> &std::path::Path {
        &self.inner.data.path
    }

    /// How many chunks of `len` bytes at `offset` of `volume` in `shard` a write at `epoch`
    /// has to allocate a slot for (new chunks, and copies of versions a snapshot froze).
    pub fn unallocated_chunks(&self, shard: u32, volume: VolumeId, epoch: Epoch, offset: u64, len: u64) -> u64 {
        let map = self.map();
        pieces(shard, volume, epoch, offset, len).iter().filter(|p| map.needs_slot(p.key)).count() as u64
    }

    /// Byte offset in the data file of the slot holding version `key`, if any (for tools and
    /// tests that need to find a block on disk).
    pub fn locate(&self, key: ChunkKey) -> Option<u64> {
        self.map().chunks.get(&key).filter(|slot| **slot != HOLE).map(|slot| self.inner.data.slot_offset(*slot))
    }
}

fn end_block_key(key: &ChunkKey, end: u32) -> Vec<u8> {
    if end <= u16::MAX as u32 {
        key.block_key(end as u16).to_vec()
    } else {
        let mut k = key.encode().to_vec();
        k.extend_from_slice(&[0xff, 0xff, 0xff]);
        k
    }
}
