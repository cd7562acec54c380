//! Chunk store behaviour against a real data file, io_uring and RocksDB.

use basalt_chunk_store::{Batch, ChunkKey, ChunkStore, ChunkStoreConfig, ChunkStoreError, FillPattern, IndexMemory};
use basalt_common::{BLOCK_SIZE, CHUNK_SIZE, VolumeId, ZERO_BLOCK_CRC, crc32c};
use bytes::Bytes;

fn config(dir: &std::path::Path, capacity: u64) -> ChunkStoreConfig {
    ChunkStoreConfig {
        data_path: dir.join("chunks.dat"),
        index_dir: dir.join("chunk-index"),
        capacity,
        direct_io: true,
        queue_depth: 64,
        index_memory: IndexMemory { cache_bytes: 8 << 20, write_buffer_bytes: 4 << 20 },
    }
}

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from((0..len).map(|i| seed.wrapping_add((i / 4096) as u8).wrapping_mul(31) ^ (i as u8)).collect::<Vec<_>>())
}

fn crcs(data: &[u8]) -> Vec<u32> {
    data.chunks(BLOCK_SIZE as usize).map(crc32c).collect()
}

async fn write(store: &ChunkStore, shard: u32, vol: u64, offset: u64, data: Bytes) {
    let mut b = Batch::new();
    let c = crcs(&data);
    b.write(shard, VolumeId(vol), 1, offset, data, c).unwrap();
    store.commit(b).await.unwrap();
}

#[tokio::test]
async fn write_read_across_chunks_and_unwritten_blocks_read_zero() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(&config(dir.path(), 64 << 20)).unwrap();
    // Spans the boundary between chunk 0 and chunk 1.
    let data = pattern(1, 3 * 4096);
    write(&store, 1, 7, CHUNK_SIZE - 4096, data.clone()).await;

    let r = store.read(1, VolumeId(7), CHUNK_SIZE - 8192, 5 * 4096).await.unwrap();
    assert_eq!(&r.data[..4096], &[0u8; 4096][..]);
    assert_eq!(&r.data[4096..4 * 4096], &data[..]);
    assert_eq!(&r.data[4 * 4096..], &[0u8; 4096][..]);
    assert_eq!(r.crcs[0], ZERO_BLOCK_CRC);
    assert_eq!(r.crcs[1], crc32c(&data[..4096]));
    // Other shards and volumes do not see it.
    assert!(store.read(2, VolumeId(7), CHUNK_SIZE - 4096, 4096).await.unwrap().data.iter().all(|b| *b == 0));
    assert!(store.read(1, VolumeId(8), CHUNK_SIZE - 4096, 4096).await.unwrap().data.iter().all(|b| *b == 0));
    assert_eq!(store.stats().slots_mapped, 2);
}

#[tokio::test]
async fn rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(&config(dir.path(), 16 << 20)).unwrap();
    let mut b = Batch::new();
    let data = pattern(2, 4096);
    assert!(matches!(b.write(1, VolumeId(1), 1, 100, data.clone(), crcs(&data)), Err(ChunkStoreError::Invalid(_))));
    assert!(matches!(b.write(1, VolumeId(1), 1, 0, data.slice(..100), vec![0]), Err(ChunkStoreError::Invalid(_))));
    assert!(matches!(b.write(1, VolumeId(1), 1, 0, data.clone(), vec![1]), Err(ChunkStoreError::BadChecksum { .. })));
    assert!(matches!(b.write(1, VolumeId(1), 1, 0, data.clone(), vec![]), Err(ChunkStoreError::Invalid(_))));
    assert!(matches!(store.read(1, VolumeId(1), 0, 0).await, Err(ChunkStoreError::Invalid(_))));
    assert!(matches!(store.read(1, VolumeId(1), 512, 4096).await, Err(ChunkStoreError::Invalid(_))));
    assert!(matches!(store.read(1, VolumeId(1), u64::MAX - 4095, 4096).await, Err(ChunkStoreError::Invalid(_))));
}

#[tokio::test]
async fn detects_bit_rot_and_names_the_block() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 16 << 20);
    let store = ChunkStore::open(&cfg).unwrap();
    write(&store, 3, 5, 2 * 4096, pattern(3, 4096)).await;
    store.checkpoint().await.unwrap();
    let offset = store.locate(ChunkKey { shard: 3, volume: VolumeId(5), chunk: 0, epoch: 1 }).unwrap() + 2 * 4096 + 17;
    drop(store);

    let mut bytes = std::fs::read(&cfg.data_path).unwrap();
    bytes[offset as usize] ^= 0x40;
    std::fs::write(&cfg.data_path, &bytes).unwrap();

    let store = ChunkStore::open(&cfg).unwrap();
    let err = store.read(3, VolumeId(5), 0, 4 * 4096).await.unwrap_err();
    assert!(err.is_corruption(), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("vol-5") && msg.contains("chunk 0") && msg.contains("block 2"), "{msg}");

    // The integrity check reports every written block and singles out the flipped one.
    let key = ChunkKey { shard: 3, volume: VolumeId(5), chunk: 0, epoch: 1 };
    let check = store.check_chunk(key).await.unwrap().expect("chunk is held");
    assert_eq!(check.blocks.iter().map(|b| b.block).collect::<Vec<_>>(), vec![2]);
    let bad: Vec<_> = check.corrupt().collect();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].block, 2);
    assert_eq!(bad[0].stored_crc, crc32c(&pattern(3, 4096)));
    assert_ne!(bad[0].actual_crc, bad[0].stored_crc);
    assert_eq!(check.block_data(0), Bytes::from(vec![0u8; 4096]), "unwritten block reads as zeros");
    assert!(store.check_chunk(ChunkKey { shard: 3, volume: VolumeId(5), chunk: 9, epoch: 1 }).await.unwrap().is_none());

    // Rewriting the block heals it.
    write(&store, 3, 5, 2 * 4096, pattern(3, 4096)).await;
    let check = store.check_chunk(key).await.unwrap().unwrap();
    assert_eq!(check.corrupt().count(), 0);
    assert_eq!(check.block_data(2), pattern(3, 4096));
}

#[tokio::test]
async fn a_corrupt_scrub_queue_record_is_a_clear_error_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 16 << 20);
    let store = ChunkStore::open(&cfg).unwrap();
    write(&store, 1, 1, 0, pattern(1, 4096)).await;
    let mut b = Batch::new();
    b.delete_volume(1, VolumeId(1));
    store.commit(b).await.unwrap();
    assert_eq!(store.scrub_queue().len(), 1);
    drop(store);

    // Damage the queued record's value in the index (as a torn or bit-rotted SST would).
    {
        let opts = rocksdb::Options::default();
        let cfs = rocksdb::DB::list_cf(&opts, &cfg.index_dir).unwrap();
        let db = rocksdb::DB::open_cf(&opts, &cfg.index_dir, &cfs).unwrap();
        let cf = db.cf_handle("free").unwrap();
        let keys: Vec<Box<[u8]>> = db.iterator_cf(cf, rocksdb::IteratorMode::Start).map(|r| r.unwrap().0).collect();
        assert_eq!(keys.len(), 1);
        db.put_cf(cf, &keys[0], [0xde, 0xad]).unwrap();
        db.flush_cf(cf).unwrap();
    }
    let err = ChunkStore::open(&cfg).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ChunkStoreError::CorruptRecord { .. }), "{msg}");
    assert!(msg.contains("scrub queue record"), "the error should say which record is bad: {msg}");
}

#[tokio::test]
async fn survives_reopen_and_zero_overwrites_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 16 << 20);
    let store = ChunkStore::open(&cfg).unwrap();
    let data = pattern(4, 8 * 4096);
    write(&store, 1, 1, 0, data.clone()).await;
    let mut b = Batch::new();
    b.put_state(1, b"applied", b"42".to_vec());
    store.commit(b).await.unwrap();
    store.checkpoint().await.unwrap();
    drop(store);

    let store = ChunkStore::open(&cfg).unwrap();
    assert_eq!(store.read(1, VolumeId(1), 0, 8 * 4096).await.unwrap().data, data);
    assert_eq!(store.get_state(1, b"applied").await.unwrap().as_deref(), Some(&b"42"[..]));

    // Trim two blocks in the middle of an allocated chunk: they read as zeros and the old
    // bytes are gone from the slot on disk.
    let slot_off = store.locate(ChunkKey { shard: 1, volume: VolumeId(1), chunk: 0, epoch: 1 }).unwrap();
    let mut b = Batch::new();
    b.zero(1, VolumeId(1), 1, 2 * 4096, 2 * 4096, true).unwrap();
    store.commit(b).await.unwrap();
    store.checkpoint().await.unwrap();
    let r = store.read(1, VolumeId(1), 0, 8 * 4096).await.unwrap();
    assert!(r.data[2 * 4096..4 * 4096].iter().all(|b| *b == 0));
    assert_eq!(&r.data[4 * 4096..], &data[4 * 4096..]);
    let raw = std::fs::read(&cfg.data_path).unwrap();
    let s = slot_off as usize;
    assert!(raw[s + 2 * 4096..s + 4 * 4096].iter().all(|b| *b == 0), "trimmed bytes still on disk");
    assert_eq!(&raw[s..s + 2 * 4096], &data[..2 * 4096]);
}

#[tokio::test]
async fn freed_slots_are_scrubbed_before_reuse_and_queue_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 4 << 20); // four slots
    let store = ChunkStore::open(&cfg).unwrap();
    for c in 0..4 {
        write(&store, 1, 1, c * CHUNK_SIZE, Bytes::from(vec![0xAB; CHUNK_SIZE as usize])).await;
    }
    // Full: a new chunk does not fit, and the failed batch changed nothing.
    let mut b = Batch::new();
    let d = Bytes::from(vec![1u8; 4096]);
    b.write(1, VolumeId(2), 1, 0, d.clone(), crcs(&d)).unwrap();
    assert!(matches!(store.commit(b).await, Err(ChunkStoreError::NoSpace { .. })));
    assert_eq!(store.read(1, VolumeId(1), 0, 4096).await.unwrap().data[0], 0xAB);

    let mut b = Batch::new();
    b.delete_volume(1, VolumeId(1));
    store.commit(b).await.unwrap();
    assert_eq!(store.scrub_queue().len(), 4);
    assert_eq!(store.stats().free_bytes(), 0, "freed slots are not reusable before scrubbing");
    let mut b = Batch::new();
    b.write(1, VolumeId(2), 1, 0, d.clone(), crcs(&d)).unwrap();
    assert!(matches!(store.commit(b).await, Err(ChunkStoreError::NoSpace { .. })));

    // Scrub one, then "crash" (drop without checkpoint) and reopen: the rest are still queued.
    store.scrub_next(FillPattern::Zeros, 1).await.unwrap().unwrap();
    drop(store);
    let store = ChunkStore::open(&cfg).unwrap();
    assert_eq!(store.scrub_queue().len(), 3);
    while store.scrub_next(FillPattern::Zeros, 1).await.unwrap().is_some() {}
    let raw = std::fs::read(&cfg.data_path).unwrap();
    assert!(!raw.windows(2).any(|w| w == [0xAB, 0xAB]), "old volume bytes survive scrubbing");

    write(&store, 1, 2, 0, d.clone()).await;
    assert_eq!(store.read(1, VolumeId(2), 0, 4096).await.unwrap().data, d);
    // The new chunk's unwritten blocks read as zeros, never the old volume's bytes.
    assert!(store.read(1, VolumeId(2), 4096, CHUNK_SIZE - 4096).await.unwrap().data.iter().all(|b| *b == 0));
}

#[tokio::test]
async fn staging_images_then_moving_a_shard_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(&config(dir.path(), 32 << 20)).unwrap();
    let a = pattern(5, 3 * 4096);
    write(&store, 1, 9, 4096, a.clone()).await;
    write(&store, 1, 9, 5 * CHUNK_SIZE, pattern(6, 4096)).await;
    write(&store, 2, 9, 0, pattern(7, 4096)).await; // old contents of the target shard

    let mut b = Batch::new();
    for key in store.list_chunks(1) {
        let img = store.read_image(key).await.unwrap().unwrap();
        b.put_image(100, img).unwrap();
    }
    store.commit(b).await.unwrap();

    let mut b = Batch::new();
    b.drop_shard(2);
    b.move_shard(100, 2);
    store.commit(b).await.unwrap();

    assert_eq!(store.read(2, VolumeId(9), 4096, 3 * 4096).await.unwrap().data, a);
    assert!(store.read(2, VolumeId(9), 0, 4096).await.unwrap().data.iter().all(|b| *b == 0));
    assert_eq!(store.list_chunks(2).len(), 2);
    assert!(store.list_chunks(100).is_empty());
    assert_eq!(store.scrub_queue().len(), 1, "the replaced chunk of shard 2 waits for scrubbing");
}

#[tokio::test]
async fn batch_with_overlapping_writes_keeps_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(&config(dir.path(), 16 << 20)).unwrap();
    let mut b = Batch::new();
    for i in 0..8u8 {
        let d = Bytes::from(vec![i; 8192]);
        b.write(1, VolumeId(1), 1, 4096, d.clone(), crcs(&d)).unwrap();
    }
    store.commit(b).await.unwrap();
    assert!(store.read(1, VolumeId(1), 4096, 8192).await.unwrap().data.iter().all(|b| *b == 7));
}
