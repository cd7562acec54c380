//! The RocksDB index beside the data file.
//!
//! Column families (all keys big-endian so related records sort together):
//!
//! | CF       | key                                   | value                         |
//! |----------|---------------------------------------|-------------------------------|
//! | `chunks` | shard u32, volume u64, chunk u64, epoch u64 | slot u64 ([`HOLE`]: reads as zeros) |
//! | `blocks` | shard u32, volume u64, chunk u64, epoch u64, block u16 | [`BlockMeta`]    |
//! | `free`   | sequence u64                          | [`FreeRecord`] (scrub queue)  |
//! | `state`  | shard u32, name bytes                 | opaque bytes owned by the shard's user |
//! | `default`| `superblock-uuid`, `format-version`   | the data file's uuid, [`FORMAT_VERSION`] (u32 LE) |
//!
//! A chunk has one record per *version*: the snapshot epoch it was first written in (see
//! [`crate::versions`]). Format 1 (before snapshots) keyed chunks without the epoch; such an
//! index is rewritten to format 2 at open, every chunk as epoch 1 ([`Index::migrate`]).
//!
//! Writes go to the WAL without a sync: the Raft log above us is the durable record and is
//! replayed from the last checkpoint after a crash, and every operation here is an idempotent
//! overwrite. [`crate::ChunkStore::checkpoint`] syncs data file and WAL together.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use basalt_common::VolumeId;
use rocksdb::{BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions};

use crate::error::{ChunkStoreError, Result};

pub(crate) const CF_CHUNKS: &str = "chunks";
pub(crate) const CF_BLOCKS: &str = "blocks";
pub(crate) const CF_FREE: &str = "free";
pub(crate) const CF_STATE: &str = "state";
const UUID_KEY: &[u8] = b"superblock-uuid";
const FORMAT_KEY: &[u8] = b"format-version";

/// The index format this binary writes, and the newest it reads. 1: chunk keys without an
/// epoch (before snapshots); 2: chunk keys end with the version's epoch.
pub const FORMAT_VERSION: u32 = 2;

/// The slot value of a version that holds no data (a chunk trimmed whole after a snapshot
/// froze its older version): it reads as zeros.
pub const HOLE: u64 = u64::MAX;

/// Length of an encoded chunk key, and of a block key (chunk key + block u16).
const KEY_LEN: usize = 28;
const BLOCK_KEY_LEN: usize = 30;
/// Format 1's key lengths (no epoch), recognised only to migrate them.
const V1_KEY_LEN: usize = 20;
const V1_BLOCK_KEY_LEN: usize = 22;
/// Records rewritten per RocksDB batch while migrating.
const MIGRATE_BATCH: usize = 65_536;

/// Reads of up to this many blocks look up each block's metadata with a point read; longer
/// ones walk an iterator. Building and seeking an iterator (a merge over the memtables and
/// every level) took ~10% of a node's CPU under 4 KiB random reads, where a point read is one
/// memtable probe and, past it, one bloom-filtered lookup per level.
const POINT_LOOKUPS_UP_TO: u16 = 8;

/// One version of a chunk: which shard (placement group) holds it, for which volume, which
/// chunk, and the snapshot epoch the version was first written in. Keys sort by chunk and
/// then by epoch, so a chunk's versions are adjacent, oldest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkKey {
    /// The shard (a PG id, or a staging area for one).
    pub shard: u32,
    /// The volume.
    pub volume: VolumeId,
    /// Chunk index within the volume.
    pub chunk: u64,
    /// The epoch the version was first written in (1 for a volume without snapshots).
    pub epoch: u64,
}

impl ChunkKey {
    pub(crate) fn encode(&self) -> [u8; KEY_LEN] {
        let mut k = [0u8; KEY_LEN];
        k[0..4].copy_from_slice(&self.shard.to_be_bytes());
        k[4..12].copy_from_slice(&self.volume.0.to_be_bytes());
        k[12..20].copy_from_slice(&self.chunk.to_be_bytes());
        k[20..28].copy_from_slice(&self.epoch.to_be_bytes());
        k
    }

    pub(crate) fn decode(k: &[u8]) -> Option<Self> {
        if k.len() < KEY_LEN {
            return None;
        }
        Some(Self {
            shard: u32::from_be_bytes(k[0..4].try_into().ok()?),
            volume: VolumeId(u64::from_be_bytes(k[4..12].try_into().ok()?)),
            chunk: u64::from_be_bytes(k[12..20].try_into().ok()?),
            epoch: u64::from_be_bytes(k[20..28].try_into().ok()?),
        })
    }

    pub(crate) fn block_key(&self, block: u16) -> [u8; BLOCK_KEY_LEN] {
        let mut k = [0u8; BLOCK_KEY_LEN];
        k[0..KEY_LEN].copy_from_slice(&self.encode());
        k[KEY_LEN..].copy_from_slice(&block.to_be_bytes());
        k
    }

    /// The same chunk at another epoch.
    pub fn at(self, epoch: u64) -> Self {
        Self { epoch, ..self }
    }
}

pub use basalt_common::CryptContext;

/// Per-block metadata: the block's crc32c (of what is stored, i.e. ciphertext when encrypted)
/// and room for the encryption context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockMeta {
    /// crc32c of the stored 4 KiB.
    pub crc: u32,
    /// Present for blocks of encrypted volumes.
    pub crypt: Option<CryptContext>,
}

const FLAG_CRYPT: u8 = 1;

impl BlockMeta {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(33);
        v.push(if self.crypt.is_some() { FLAG_CRYPT } else { 0 });
        v.extend_from_slice(&self.crc.to_le_bytes());
        if let Some(c) = &self.crypt {
            v.extend_from_slice(&c.nonce);
            v.extend_from_slice(&c.tag);
        }
        v
    }

    pub(crate) fn decode(key: &[u8], v: &[u8]) -> Result<Self> {
        let bad = |reason: &str| ChunkStoreError::CorruptRecord { key: hex(key), reason: reason.into() };
        if v.len() < 5 {
            return Err(bad("block metadata shorter than 5 bytes"));
        }
        let flags = v[0];
        let crc = u32::from_le_bytes(v[1..5].try_into().expect("4 bytes"));
        let crypt = if flags & FLAG_CRYPT != 0 {
            if v.len() != 33 {
                return Err(bad("encrypted block metadata is not 33 bytes"));
            }
            let mut nonce = [0u8; 12];
            let mut tag = [0u8; 16];
            nonce.copy_from_slice(&v[5..17]);
            tag.copy_from_slice(&v[17..33]);
            Some(CryptContext { nonce, tag })
        } else {
            if v.len() != 5 {
                return Err(bad("block metadata has trailing bytes"));
            }
            None
        };
        if flags & !FLAG_CRYPT != 0 {
            return Err(bad("unknown block metadata flags"));
        }
        Ok(Self { crc, crypt })
    }
}

/// Why a slot entered the scrub queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FreeReason {
    /// Its volume was deleted.
    VolumeDeleted = 1,
    /// The whole chunk was trimmed or zeroed.
    Trimmed = 2,
    /// The replica moved to another node, or a snapshot install replaced it.
    ReplicaRemoved = 3,
    /// A snapshot was deleted and no other one reads this version.
    SnapshotDeleted = 4,
    /// The volume was rolled back to a snapshot and this version is what it undid.
    RolledBack = 5,
}

impl FreeReason {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::VolumeDeleted),
            2 => Some(Self::Trimmed),
            3 => Some(Self::ReplicaRemoved),
            4 => Some(Self::SnapshotDeleted),
            5 => Some(Self::RolledBack),
            _ => None,
        }
    }
}

/// One entry of the persistent scrub queue: a slot that held data and must be overwritten
/// before it can be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreeRecord {
    /// Queue position.
    pub seq: u64,
    /// The slot.
    pub slot: u64,
    /// Why it was freed.
    pub reason: FreeReason,
}

impl FreeRecord {
    pub(crate) fn encode_value(&self) -> [u8; 9] {
        let mut v = [0u8; 9];
        v[0..8].copy_from_slice(&self.slot.to_le_bytes());
        v[8] = self.reason as u8;
        v
    }

    pub(crate) fn decode(key: &[u8], v: &[u8]) -> Result<Self> {
        let bad = |reason: &str| ChunkStoreError::CorruptRecord { key: hex(key), reason: reason.into() };
        let seq = u64::from_be_bytes(key.try_into().map_err(|_| bad("scrub queue key is not 8 bytes"))?);
        if v.len() != 9 {
            return Err(bad("scrub queue record is not 9 bytes"));
        }
        let slot = u64::from_le_bytes(v[0..8].try_into().expect("8 bytes"));
        let reason = FreeReason::from_u8(v[8]).ok_or_else(|| bad("unknown free reason"))?;
        Ok(Self { seq, slot, reason })
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn state_key(shard: u32, name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + name.len());
    k.extend_from_slice(&shard.to_be_bytes());
    k.extend_from_slice(name);
    k
}

/// Memory the index may use, from configuration.
#[derive(Clone, Copy, Debug)]
pub struct IndexMemory {
    /// Shared block cache.
    pub cache_bytes: usize,
    /// All memtables of the index together (RocksDB's write buffer manager enforces it).
    pub write_buffer_bytes: usize,
}

/// The RocksDB handle.
pub(crate) struct Index {
    pub(crate) db: Arc<DB>,
    pub(crate) path: PathBuf,
}

impl Index {
    pub(crate) fn open(path: &Path, mem: IndexMemory) -> Result<Self> {
        let err = |source| ChunkStoreError::Index { path: path.to_path_buf(), source };
        let cache = Cache::new_lru_cache(mem.cache_bytes);
        let wbm = rocksdb::WriteBufferManager::new_write_buffer_manager(mem.write_buffer_bytes, true);
        let cf_opts = || {
            let mut bb = BlockBasedOptions::default();
            bb.set_block_cache(&cache);
            bb.set_cache_index_and_filter_blocks(true);
            bb.set_bloom_filter(10.0, false);
            let mut o = Options::default();
            o.set_block_based_table_factory(&bb);
            o.set_write_buffer_size((mem.write_buffer_bytes / 4).max(1 << 20));
            o.set_max_write_buffer_number(2);
            o
        };
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        db_opts.set_max_open_files(256);
        db_opts.set_keep_log_file_num(4);
        db_opts.set_max_total_wal_size(4 * mem.write_buffer_bytes as u64 + (16 << 20));
        db_opts.set_write_buffer_manager(&wbm);
        let cfs = [CF_CHUNKS, CF_BLOCKS, CF_FREE, CF_STATE].into_iter().map(|name| ColumnFamilyDescriptor::new(name, cf_opts()));
        let db = DB::open_cf_descriptors(&db_opts, path, cfs).map_err(err)?;
        Ok(Self { db: Arc::new(db), path: path.to_path_buf() })
    }

    pub(crate) fn err(&self, source: rocksdb::Error) -> ChunkStoreError {
        ChunkStoreError::Index { path: self.path.clone(), source }
    }

    pub(crate) fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column family created at open")
    }

    /// Checks (or on first use records) that this index belongs to the data file `uuid`.
    pub(crate) fn bind_uuid(&self, uuid: &[u8; 16], data_path: &Path) -> Result<()> {
        match self.db.get(UUID_KEY).map_err(|e| self.err(e))? {
            Some(v) if v.as_slice() == uuid => Ok(()),
            Some(_) => Err(ChunkStoreError::BadFormat {
                path: self.path.clone(),
                reason: format!("this index belongs to a different data file than {}", data_path.display()),
            }),
            None => {
                let has_chunks = self.db.iterator_cf(self.cf(CF_CHUNKS), rocksdb::IteratorMode::Start).next().is_some();
                if has_chunks {
                    return Err(ChunkStoreError::BadFormat {
                        path: self.path.clone(),
                        reason: "index has chunks but no data file identity; refusing to guess".into(),
                    });
                }
                let mut wo = WriteOptions::default();
                wo.set_sync(true);
                self.db.put_opt(UUID_KEY, uuid, &wo).map_err(|e| self.err(e))
            }
        }
    }

    /// Checks the index's format, migrating format 1 to the current one; a new index is
    /// stamped with [`FORMAT_VERSION`]. A newer format is refused by name.
    pub(crate) fn check_format(&self) -> Result<()> {
        let bad = |reason: String| ChunkStoreError::BadFormat { path: self.path.clone(), reason };
        let version = match self.db.get(FORMAT_KEY).map_err(|e| self.err(e))? {
            Some(v) => u32::from_le_bytes(v.as_slice().try_into().map_err(|_| bad("the index's format-version record is not 4 bytes".into()))?),
            // Format 1 carried no version record; an empty index is simply new.
            None => 1,
        };
        match version {
            FORMAT_VERSION => Ok(()),
            1 => {
                self.migrate()?;
                let mut wo = WriteOptions::default();
                wo.set_sync(true);
                self.db.put_opt(FORMAT_KEY, FORMAT_VERSION.to_le_bytes(), &wo).map_err(|e| self.err(e))
            }
            v => Err(bad(format!("chunk index format {v} is newer than this binary reads (up to {FORMAT_VERSION}): run the newer basalt-node"))),
        }
    }

    /// Rewrites format 1's chunk and block keys (no epoch) as epoch 1, in batches. A crash
    /// part way leaves both kinds; running again finishes the job (only old-length keys are
    /// rewritten, and each batch deletes what it rewrote).
    fn migrate(&self) -> Result<()> {
        let mut moved = 0usize;
        for (cf, old_len, at) in [(CF_CHUNKS, V1_KEY_LEN, V1_KEY_LEN), (CF_BLOCKS, V1_BLOCK_KEY_LEN, V1_KEY_LEN)] {
            let mut wb = WriteBatch::default();
            let mut pending = 0;
            for item in self.db.iterator_cf(self.cf(cf), rocksdb::IteratorMode::Start) {
                let (k, v) = item.map_err(|e| self.err(e))?;
                if k.len() != old_len {
                    continue;
                }
                let mut new_key = Vec::with_capacity(k.len() + 8);
                new_key.extend_from_slice(&k[..at]);
                new_key.extend_from_slice(&1u64.to_be_bytes());
                new_key.extend_from_slice(&k[at..]);
                wb.put_cf(self.cf(cf), new_key, v);
                wb.delete_cf(self.cf(cf), k);
                pending += 1;
                if pending == MIGRATE_BATCH {
                    self.write(std::mem::take(&mut wb))?;
                    moved += pending;
                    pending = 0;
                }
            }
            self.write(wb)?;
            moved += pending;
        }
        self.sync_wal()?;
        tracing::info!(index = %self.path.display(), records = moved, "migrated the chunk index from format 1 (every chunk is now a version at epoch 1)");
        Ok(())
    }

    /// All chunk records.
    pub(crate) fn load_chunks(&self) -> Result<Vec<(ChunkKey, u64)>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_CHUNKS), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let key = ChunkKey::decode(&k)
                .filter(|_| k.len() == KEY_LEN)
                .ok_or_else(|| ChunkStoreError::CorruptRecord { key: hex(&k), reason: format!("chunk key is not {KEY_LEN} bytes") })?;
            let slot = u64::from_le_bytes(
                v.as_ref().try_into().map_err(|_| ChunkStoreError::CorruptRecord { key: hex(&k), reason: "chunk record is not 8 bytes".into() })?,
            );
            out.push((key, slot));
        }
        Ok(out)
    }

    /// All scrub queue records, oldest first.
    pub(crate) fn load_free(&self) -> Result<Vec<FreeRecord>> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_FREE), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            out.push(FreeRecord::decode(&k, &v)?);
        }
        Ok(out)
    }

    /// Block metadata for blocks `first..first+count` of `key`; `None` for unwritten blocks.
    pub(crate) fn block_metas(&self, key: &ChunkKey, first: u16, count: u16) -> Result<Vec<Option<BlockMeta>>> {
        self.block_metas_from(key, first, count, rocksdb::ReadTier::All)?
            .ok_or_else(|| ChunkStoreError::Failed("index read with unlimited reach came back incomplete".into()))
    }

    /// Like [`Index::block_metas`], but only from memtables and the block cache: `None` when
    /// answering would need disk I/O. Never blocks, so async callers may use it inline.
    pub(crate) fn block_metas_in_memory(&self, key: &ChunkKey, first: u16, count: u16) -> Result<Option<Vec<Option<BlockMeta>>>> {
        self.block_metas_from(key, first, count, rocksdb::ReadTier::BlockCache)
    }

    /// Looks up `count` blocks' metadata from `first`: point reads for a few blocks, an
    /// iterator for more (see [`POINT_LOOKUPS_UP_TO`]). `None`: `tier` would need disk I/O.
    fn block_metas_from(&self, key: &ChunkKey, first: u16, count: u16, tier: rocksdb::ReadTier) -> Result<Option<Vec<Option<BlockMeta>>>> {
        let mut out = vec![None; count as usize];
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_read_tier(tier);
        if count <= POINT_LOOKUPS_UP_TO {
            for (i, slot) in out.iter_mut().enumerate() {
                let Some(block) = u16::try_from(first as usize + i).ok() else { break };
                let k = key.block_key(block);
                match self.db.get_pinned_cf_opt(self.cf(CF_BLOCKS), k, &ro) {
                    Ok(Some(v)) => *slot = Some(BlockMeta::decode(&k, &v)?),
                    Ok(None) => {}
                    Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => return Ok(None),
                    Err(e) => return Err(self.err(e)),
                }
            }
            return Ok(Some(out));
        }
        let start = key.block_key(first);
        let end = first as u32 + count as u32;
        let upper: Vec<u8> = if end <= u16::MAX as u32 {
            key.block_key(end as u16).to_vec()
        } else {
            let mut k = key.encode().to_vec();
            k.extend_from_slice(&[0xff, 0xff, 0xff]);
            k
        };
        ro.set_iterate_upper_bound(upper);
        let iter = self.db.iterator_cf_opt(self.cf(CF_BLOCKS), ro, rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward));
        for item in iter {
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => return Ok(None),
                Err(e) => return Err(self.err(e)),
            };
            if k.len() != BLOCK_KEY_LEN {
                return Err(ChunkStoreError::CorruptRecord { key: hex(&k), reason: format!("block key is not {BLOCK_KEY_LEN} bytes") });
            }
            let block = u16::from_be_bytes([k[KEY_LEN], k[KEY_LEN + 1]]);
            let idx = (block - first) as usize;
            out[idx] = Some(BlockMeta::decode(&k, &v)?);
        }
        Ok(Some(out))
    }

    /// All block metadata of a chunk, as (block, meta).
    pub(crate) fn chunk_metas(&self, key: &ChunkKey) -> Result<Vec<(u16, BlockMeta)>> {
        let mut ro = rocksdb::ReadOptions::default();
        let mut upper = key.encode().to_vec();
        upper.extend_from_slice(&[0xff, 0xff, 0xff]);
        ro.set_iterate_upper_bound(upper);
        let start = key.block_key(0);
        let mut out = Vec::new();
        let iter = self.db.iterator_cf_opt(self.cf(CF_BLOCKS), ro, rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward));
        for item in iter {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if k.len() != BLOCK_KEY_LEN {
                return Err(ChunkStoreError::CorruptRecord { key: hex(&k), reason: format!("block key is not {BLOCK_KEY_LEN} bytes") });
            }
            out.push((u16::from_be_bytes([k[KEY_LEN], k[KEY_LEN + 1]]), BlockMeta::decode(&k, &v)?));
        }
        Ok(out)
    }

    pub(crate) fn get_state(&self, shard: u32, name: &[u8]) -> Result<Option<Vec<u8>>> {
        self.db.get_cf(self.cf(CF_STATE), state_key(shard, name)).map_err(|e| self.err(e))
    }

    /// All state records of a shard whose name starts with `prefix`.
    pub(crate) fn scan_state(&self, shard: u32, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let start = state_key(shard, prefix);
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(self.cf(CF_STATE), rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward));
        for item in iter {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if !k.starts_with(&start) {
                break;
            }
            out.push((k[4..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    pub(crate) fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        self.db.write_opt(batch, &wo).map_err(|e| self.err(e))
    }

    /// Writes `batch` unless RocksDB would stall it (write-rate delay or memtable limit): then
    /// hands the batch back untouched. Unsynced, so the cost is a memtable insert and a
    /// page-cache append to the WAL — far cheaper than a hop to a blocking thread. It can still
    /// wait briefly as a follower in RocksDB's write group behind another writer (one store per
    /// node, so that is another PG's apply doing the same small write).
    pub(crate) fn try_write_now(&self, batch: WriteBatch) -> Result<Option<WriteBatch>> {
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        wo.set_no_slowdown(true);
        // The batch is consumed by write_opt; keep a copy for the slow path.
        let retry = WriteBatch::from_data(batch.data());
        match self.db.write_opt(batch, &wo) {
            Ok(()) => Ok(None),
            Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => Ok(Some(retry)),
            Err(e) => Err(self.err(e)),
        }
    }

    pub(crate) fn sync_wal(&self) -> Result<()> {
        self.db.flush_wal(true).map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Index {
        Index::open(dir, IndexMemory { cache_bytes: 1 << 20, write_buffer_bytes: 1 << 20 }).unwrap()
    }

    /// A format-1 index (chunk keys without an epoch, no version record) is rewritten at open
    /// with every chunk at epoch 1; a newer format is refused by name.
    #[test]
    fn format_1_is_migrated_and_a_newer_format_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = ChunkKey { shard: 3, volume: VolumeId(9), chunk: 17, epoch: 1 };
        let meta = BlockMeta { crc: 0xfeed, crypt: None };
        {
            let index = open(dir.path());
            let mut wb = WriteBatch::default();
            wb.put_cf(index.cf(CF_CHUNKS), &key.encode()[..V1_KEY_LEN], 42u64.to_le_bytes());
            let mut block = key.encode()[..V1_KEY_LEN].to_vec();
            block.extend_from_slice(&5u16.to_be_bytes());
            wb.put_cf(index.cf(CF_BLOCKS), block, meta.encode());
            index.write(wb).unwrap();
            index.check_format().unwrap();
            assert_eq!(index.load_chunks().unwrap(), vec![(key, 42)]);
            assert_eq!(index.chunk_metas(&key).unwrap(), vec![(5, meta)]);
            // Opening again finds format 2 and changes nothing.
            index.check_format().unwrap();
            assert_eq!(index.load_chunks().unwrap(), vec![(key, 42)]);
            index.db.put(FORMAT_KEY, 7u32.to_le_bytes()).unwrap();
        }
        let err = open(dir.path()).check_format().unwrap_err().to_string();
        assert!(err.contains("format 7") && err.contains("up to 2"), "{err}");
    }
}
