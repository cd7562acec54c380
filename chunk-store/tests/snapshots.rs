//! Snapshot epochs in the chunk store: copy-on-write, reads at an epoch, holes, releasing
//! versions, persistence and chunk images, against a real data file, io_uring and RocksDB.

use basalt_chunk_store::{Batch, ChunkKey, ChunkStore, ChunkStoreConfig, ChunkStoreError, FreeReason, IndexMemory};
use basalt_common::{BLOCK_SIZE, CHUNK_SIZE, VolumeId, crc32c};
use bytes::Bytes;

fn config(dir: &std::path::Path) -> ChunkStoreConfig {
    ChunkStoreConfig {
        data_path: dir.join("chunks.dat"),
        index_dir: dir.join("chunk-index"),
        capacity: 64 << 20,
        direct_io: true,
        queue_depth: 64,
        index_memory: IndexMemory { cache_bytes: 8 << 20, write_buffer_bytes: 4 << 20 },
    }
}

fn fill(byte: u8, len: u64) -> Bytes {
    Bytes::from(vec![byte; len as usize])
}

async fn write(store: &ChunkStore, epoch: u64, offset: u64, data: Bytes) -> Result<(), ChunkStoreError> {
    let mut b = Batch::new();
    let crcs = data.chunks(BLOCK_SIZE as usize).map(crc32c).collect();
    b.write(1, VolumeId(7), epoch, offset, data, crcs)?;
    store.commit(b).await
}

async fn zero(store: &ChunkStore, epoch: u64, offset: u64, len: u64) {
    let mut b = Batch::new();
    b.zero(1, VolumeId(7), epoch, offset, len, true).unwrap();
    store.commit(b).await.unwrap();
}

async fn read_at(store: &ChunkStore, epoch: u64, offset: u64, len: u64) -> Bytes {
    store.read_at(1, VolumeId(7), epoch, offset, len).await.unwrap().data
}

fn all(data: &[u8], byte: u8) -> bool {
    data.iter().all(|b| *b == byte)
}

const KEY: ChunkKey = ChunkKey { shard: 1, volume: VolumeId(7), chunk: 0, epoch: 0 };

/// The first write of a newer epoch copies the chunk, so the older epoch keeps what it saw,
/// blocks the new write did not touch included; later writes of the epoch go in place.
#[tokio::test]
async fn a_newer_epoch_copies_the_chunk_once_and_the_older_one_stays_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(&config(dir.path())).unwrap();
    write(&store, 1, 0, fill(0xA1, 64 << 10)).await.unwrap();
    assert_eq!(store.stats().slots_mapped, 1);

    write(&store, 2, 4096, fill(0xB2, 4096)).await.unwrap();
    assert_eq!(store.stats().slots_mapped, 2, "one copy");
    write(&store, 2, 8192, fill(0xB3, 4096)).await.unwrap();
    assert_eq!(store.stats().slots_mapped, 2, "in place within the epoch");

    let old = read_at(&store, 1, 0, 64 << 10).await;
    assert!(all(&old, 0xA1), "epoch 1 unchanged");
    let head = store.read(1, VolumeId(7), 0, 64 << 10).await.unwrap().data;
    assert!(all(&head[..4096], 0xA1), "copied block");
    assert!(all(&head[4096..8192], 0xB2) && all(&head[8192..12288], 0xB3));
    assert!(all(&head[12288..], 0xA1), "copied blocks past the writes");
    assert!(all(&read_at(&store, 0, 0, 4096).await, 0), "nothing at epoch 0");
    assert_eq!(store.head_key(KEY).map(|k| k.epoch), Some(2));
    assert_eq!(store.slots_by_epoch(1, VolumeId(7)).into_iter().collect::<Vec<_>>(), vec![(1, 1), (2, 1)]);

    // A write issued before the snapshot that arrives after it is refused without stopping
    // the store; one batch mixing epochs of a volume too.
    assert!(matches!(write(&store, 1, 0, fill(9, 4096)).await, Err(ChunkStoreError::Invalid(m)) if m.contains("epoch 1")));
    let mut b = Batch::new();
    b.write(1, VolumeId(7), 2, 0, fill(1, 4096), vec![crc32c(&[1u8; 4096])]).unwrap();
    b.write(1, VolumeId(7), 3, 1 << 20, fill(1, 4096), vec![crc32c(&[1u8; 4096])]).unwrap();
    assert!(matches!(store.commit(b).await, Err(ChunkStoreError::Invalid(_))));
    write(&store, 2, 0, fill(0xB1, 4096)).await.expect("the store still takes writes");
    assert!(all(&read_at(&store, 1, 0, 4096).await, 0xA1));
}

/// Trimming a whole chunk that a snapshot holds leaves a hole in the new epoch; trimming part
/// of it copies first. Releasing versions frees what no live snapshot reads, through the scrub
/// queue, and everything survives a reopen.
#[tokio::test]
async fn holes_release_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = ChunkStore::open(&config(dir.path())).unwrap();
        write(&store, 1, 0, fill(0xA1, 2 << 20)).await.unwrap();
        // Epoch 2: chunk 0 trimmed whole, chunk 1 trimmed in part.
        zero(&store, 2, 0, CHUNK_SIZE).await;
        zero(&store, 2, CHUNK_SIZE, 8192).await;
        assert!(all(&store.read(1, VolumeId(7), 0, 2 << 20).await.unwrap().data[..CHUNK_SIZE as usize + 8192], 0));
        assert!(all(&store.read(1, VolumeId(7), CHUNK_SIZE + 8192, 4096).await.unwrap().data, 0xA1));
        assert!(all(&read_at(&store, 1, 0, 2 << 20).await, 0xA1), "the snapshot at epoch 1 is whole");
        assert_eq!(store.stats().slots_mapped, 3, "two originals and one copy; a hole holds no slot");
        assert_eq!(store.locate(KEY.at(2)), None, "a hole has no slot");
        // A write into the hole takes a slot again.
        write(&store, 2, 4096, fill(0xC3, 4096)).await.unwrap();
        let head = store.read(1, VolumeId(7), 0, 8192).await.unwrap().data;
        assert!(all(&head[..4096], 0) && all(&head[4096..], 0xC3));
        zero(&store, 2, 0, CHUNK_SIZE).await;
    }
    let store = ChunkStore::open(&config(dir.path())).unwrap();
    assert!(all(&read_at(&store, 1, 0, 2 << 20).await, 0xA1), "versions survive a reopen");
    assert!(all(&store.read(1, VolumeId(7), 0, CHUNK_SIZE).await.unwrap().data, 0), "and so does the hole");

    // The snapshot at epoch 1 is deleted: its versions go to the scrub queue.
    let queued = store.scrub_queue().len();
    let mut b = Batch::new();
    b.release_versions(1, VolumeId(7), vec![]);
    store.commit(b).await.unwrap();
    let freed: Vec<_> = store.scrub_queue().into_iter().skip(queued).collect();
    assert_eq!(freed.len(), 2, "both epoch-1 versions: {freed:?}");
    assert!(freed.iter().all(|r| r.reason == FreeReason::SnapshotDeleted));
    assert_eq!(store.list_chunks(1), vec![ChunkKey { chunk: 1, ..KEY.at(2) }], "the lone hole went too");
    assert!(all(&store.read(1, VolumeId(7), 0, CHUNK_SIZE + 8192).await.unwrap().data, 0));
    assert!(all(&store.read(1, VolumeId(7), CHUNK_SIZE + 8192, 4096).await.unwrap().data, 0xA1));
    // Releasing again frees nothing.
    let mut b = Batch::new();
    b.release_versions(1, VolumeId(7), vec![]);
    store.commit(b).await.unwrap();
    assert_eq!(store.scrub_queue().len(), queued + 2);
}

/// Release keeps what each live snapshot resolves to.
#[tokio::test]
async fn release_keeps_what_live_snapshots_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(&config(dir.path())).unwrap();
    // Snapshots froze epochs 1, 2 and 3; the head is epoch 4.
    for (epoch, byte) in [(1, 0x11), (2, 0x22), (3, 0x33), (4, 0x44)] {
        write(&store, epoch, 0, fill(byte, 4096)).await.unwrap();
    }
    // Before any release: each older version is read by exactly one snapshot.
    let usage = store.snapshot_usage(1, VolumeId(7), &[1, 2, 3]);
    assert_eq!((usage.head_slots, usage.snapshot_slots), (1, 3));
    assert_eq!(usage.exclusive_slots.into_iter().collect::<Vec<_>>(), vec![(1, 1), (2, 1), (3, 1)]);
    // Snapshot 2 deleted: its version is read by nobody until the release frees it.
    let usage = store.snapshot_usage(1, VolumeId(7), &[1, 3]);
    assert_eq!((usage.snapshot_slots, usage.exclusive_slots.len()), (3, 2));
    let mut b = Batch::new();
    b.release_versions(1, VolumeId(7), vec![1, 3]);
    store.commit(b).await.unwrap();
    assert_eq!(store.list_chunks(1).iter().map(|k| k.epoch).collect::<Vec<_>>(), vec![1, 3, 4]);
    for (epoch, byte) in [(1, 0x11), (3, 0x33), (4, 0x44)] {
        assert!(all(&read_at(&store, epoch, 0, 4096).await, byte), "epoch {epoch}");
    }
}

/// A chunk image carries its version: an older version streamed into another shard reads back
/// at its epoch there, and a hole stays a hole.
#[tokio::test]
async fn images_carry_versions_and_holes() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(&config(dir.path())).unwrap();
    write(&store, 1, 0, fill(0xA1, 8192)).await.unwrap();
    zero(&store, 2, 0, CHUNK_SIZE).await;
    let mut b = Batch::new();
    for key in store.list_chunks(1) {
        let image = store.read_image(key).await.unwrap().unwrap();
        assert_eq!((image.epoch, image.hole), (key.epoch, key.epoch == 2));
        b.put_image(9, image).unwrap();
    }
    store.commit(b).await.unwrap();
    assert!(all(&store.read_at(9, VolumeId(7), 1, 0, 8192).await.unwrap().data, 0xA1));
    assert!(all(&store.read(9, VolumeId(7), 0, 8192).await.unwrap().data, 0));
    assert_eq!(store.list_chunks(9).iter().map(|k| k.epoch).collect::<Vec<_>>(), vec![1, 2]);
}

/// A rollback gives each chunk changed since the snapshot a version at the current epoch that
/// holds what the snapshot reads (a copy, or a hole), replacing one written in that epoch; the
/// snapshot and newer ones stay as they were, and rolling back again changes nothing.
#[tokio::test]
async fn rollback_returns_changed_chunks_to_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(&config(dir.path())).unwrap();
    let c = |n: u64| n * CHUNK_SIZE;
    // Epoch 1 (then frozen by a snapshot): chunks 0 and 1.
    write(&store, 1, c(0), fill(0xA1, 64 << 10)).await.unwrap();
    write(&store, 1, c(1), fill(0xA1, 64 << 10)).await.unwrap();
    // Epoch 2 (frozen too): part of chunk 0, and a new chunk 2.
    write(&store, 2, c(0) + 4096, fill(0xB2, 4096)).await.unwrap();
    write(&store, 2, c(2), fill(0xB2, 4096)).await.unwrap();
    // Epoch 3, the current one: chunk 0 trimmed whole, chunk 1 rewritten, a new chunk 3.
    zero(&store, 3, c(0), CHUNK_SIZE).await;
    write(&store, 3, c(1), fill(0xC3, 4096)).await.unwrap();
    write(&store, 3, c(3), fill(0xC3, 4096)).await.unwrap();
    let epoch2 = read_at(&store, 2, 0, c(4)).await;

    for round in 0..2 {
        let mut b = Batch::new();
        b.rollback(1, VolumeId(7), 1, 3);
        store.commit(b).await.unwrap();
        let head = store.read(1, VolumeId(7), 0, c(4)).await.unwrap().data;
        assert_eq!(head, read_at(&store, 1, 0, c(4)).await, "round {round}: the volume reads as the snapshot did");
        assert!(all(&head[..64 << 10], 0xA1) && all(&head[c(1) as usize..c(1) as usize + (64 << 10)], 0xA1));
        assert!(all(&head[c(2) as usize..], 0), "chunks written after the snapshot read as zeros");
        assert_eq!(read_at(&store, 2, 0, c(4)).await, epoch2, "round {round}: the newer snapshot is untouched");
        let versions: Vec<(u64, u64)> = store.list_chunks(1).iter().map(|k| (k.chunk, k.epoch)).collect();
        assert_eq!(versions, vec![(0, 1), (0, 2), (0, 3), (1, 1), (1, 3), (2, 2), (2, 3)], "round {round}: chunk 3 is gone, chunk 2 has a hole");
        assert_eq!(store.locate(ChunkKey { chunk: 2, ..KEY.at(3) }), None);
    }
    // Writes go on at the current epoch, in place.
    write(&store, 3, c(1), fill(0xD3, 4096)).await.unwrap();
    assert!(all(&store.read(1, VolumeId(7), c(1), 4096).await.unwrap().data, 0xD3));
    assert!(all(&read_at(&store, 1, c(1), 4096).await, 0xA1));
}

/// Writes `data` at `offset` of `volume` (a clone when `lineage` is not empty) at `epoch`.
async fn write_clone(store: &ChunkStore, volume: u64, lineage: &[(VolumeId, u64)], epoch: u64, offset: u64, data: Bytes) {
    let mut b = Batch::new();
    b.set_lineage(1, VolumeId(volume), lineage.to_vec());
    let crcs = data.chunks(BLOCK_SIZE as usize).map(crc32c).collect();
    b.write(1, VolumeId(volume), epoch, offset, data, crcs).unwrap();
    store.commit(b).await.unwrap();
}

async fn read_clone(store: &ChunkStore, volume: u64, lineage: &[(VolumeId, u64)], at: u64, offset: u64, len: u64) -> Bytes {
    store.read_through(1, VolumeId(volume), lineage, at, offset, len).await.unwrap().data
}

/// A clone reads its parent's snapshot where it wrote nothing, copies a chunk on its first
/// write to it, hides what it trims with holes, and a clone of a clone reads through both;
/// the parent never changes, two clones copying one chunk in one batch each get a copy, a
/// rollback and a release of the clone keep what its lineage shows, and all of it survives
/// a reopen (the lineage is named by the caller, not stored).
#[tokio::test]
async fn clones_read_through_their_lineage_and_copy_on_first_write() {
    let dir = tempfile::tempdir().unwrap();
    let c = |n: u64| n * CHUNK_SIZE;
    let k64 = 64 << 10;
    const P: u64 = 7;
    const C: u64 = 9;
    let clone_of_p: [(VolumeId, u64); 1] = [(VolumeId(P), 1)];
    let grandchild: [(VolumeId, u64); 2] = [(VolumeId(C), 1), (VolumeId(P), 1)];
    let expect_c = |data: &Bytes| {
        // Chunk 0: blocks 0-1 trimmed, then the parent's; chunk 1: the parent's with block 1
        // written; chunk 2: trimmed whole; chunk 3: nothing anywhere.
        assert!(all(&data[..8192], 0) && all(&data[8192..k64], 0xA1) && all(&data[k64..c(1) as usize], 0));
        let c1 = c(1) as usize;
        assert!(all(&data[c1..c1 + 4096], 0xA1) && all(&data[c1 + 4096..c1 + 8192], 0xC1) && all(&data[c1 + 8192..c1 + k64], 0xA1));
        assert!(all(&data[c(2) as usize..], 0), "the trimmed chunk and the unwritten one read as zeros");
    };
    {
        let store = ChunkStore::open(&config(dir.path())).unwrap();
        for n in 0..3 {
            write(&store, 1, c(n), fill(0xA1, k64 as u64)).await.unwrap();
        }
        // The parent moves on after the snapshot at epoch 1.
        write(&store, 2, c(0), fill(0xB2, k64 as u64)).await.unwrap();
        let parent_slots = store.stats().slots_mapped;

        assert!(all(&read_clone(&store, C, &clone_of_p, u64::MAX, 0, k64 as u64).await, 0xA1), "the snapshot, not the parent's head");
        assert!(all(&read_clone(&store, C, &[], u64::MAX, 0, k64 as u64).await, 0), "without its lineage the clone holds nothing");
        write_clone(&store, C, &clone_of_p, 1, c(1) + 4096, fill(0xC1, 4096)).await;
        assert_eq!(store.stats().slots_mapped, parent_slots + 1, "one copy");
        let mut b = Batch::new();
        b.set_lineage(1, VolumeId(C), clone_of_p.to_vec());
        b.zero(1, VolumeId(C), 1, c(2), CHUNK_SIZE, true).unwrap();
        b.zero(1, VolumeId(C), 1, c(0), 8192, true).unwrap();
        store.commit(b).await.unwrap();
        assert_eq!(store.stats().slots_mapped, parent_slots + 2, "a copy of chunk 0; the whole trim is a hole");
        expect_c(&read_clone(&store, C, &clone_of_p, u64::MAX, 0, c(4)).await);
        assert!(all(&store.read(1, VolumeId(P), c(1), c(2)).await.unwrap().data[..k64], 0xA1), "the parent is untouched");
        assert!(all(&read_at(&store, 1, 0, k64 as u64).await, 0xA1));

        // The clone's epoch 1 is frozen by a snapshot of it, which a grandchild reads.
        write_clone(&store, C, &clone_of_p, 2, c(1), fill(0xC2, CHUNK_SIZE)).await;
        write_clone(&store, C, &clone_of_p, 2, c(3), fill(0xC2, 4096)).await;
        expect_c(&read_clone(&store, 11, &grandchild, u64::MAX, 0, c(4)).await);
        write_clone(&store, 11, &grandchild, 1, c(0) + 8192, fill(0xD1, 4096)).await;
        let g = read_clone(&store, 11, &grandchild, u64::MAX, 0, k64 as u64).await;
        assert!(all(&g[..8192], 0) && all(&g[8192..12288], 0xD1) && all(&g[12288..], 0xA1), "the grandchild copied the clone's copy");

        // Two clones of the parent write chunk 1 first in one batch: each gets a copy.
        let mut b = Batch::new();
        for v in [13u64, 15] {
            b.set_lineage(1, VolumeId(v), clone_of_p.to_vec());
            b.write(1, VolumeId(v), 1, c(1), fill(v as u8, 4096), vec![crc32c(&[v as u8; 4096])]).unwrap();
        }
        store.commit(b).await.unwrap();
        for v in [13u64, 15] {
            let d = read_clone(&store, v, &clone_of_p, u64::MAX, c(1), k64 as u64).await;
            assert!(all(&d[..4096], v as u8) && all(&d[4096..], 0xA1), "clone {v}");
        }

        // The clone rolls back to its epoch 1 (at epoch 3): as it was, lineage included.
        let mut b = Batch::new();
        b.set_lineage(1, VolumeId(C), clone_of_p.to_vec());
        b.rollback(1, VolumeId(C), 1, 3);
        store.commit(b).await.unwrap();
        expect_c(&read_clone(&store, C, &clone_of_p, u64::MAX, 0, c(4)).await);
        // Its snapshot is deleted: the lone hole over chunk 2 stays, the parent shows nowhere.
        let mut b = Batch::new();
        b.set_lineage(1, VolumeId(C), clone_of_p.to_vec());
        b.release_versions(1, VolumeId(C), vec![]);
        store.commit(b).await.unwrap();
        expect_c(&read_clone(&store, C, &clone_of_p, u64::MAX, 0, c(4)).await);
    }
    let store = ChunkStore::open(&config(dir.path())).unwrap();
    expect_c(&read_clone(&store, C, &clone_of_p, u64::MAX, 0, c(4)).await);
    assert!(all(&read_at(&store, 1, 0, c(3)).await[..k64], 0xA1), "the parent's snapshot after a reopen");
}

/// What an incremental backup compares: the chunks holding data at an epoch, each with the
/// version it resolves to (an ancestor's for a clone); holes and unwritten chunks are left out.
#[tokio::test]
async fn resolved_chunks_name_the_version_each_chunk_reads() {
    let dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(&config(dir.path())).unwrap();
    let c = |n: u64| n * CHUNK_SIZE;
    let key = |volume: u64, chunk: u64, epoch: u64| ChunkKey { shard: 1, volume: VolumeId(volume), chunk, epoch };
    for n in 0..3 {
        write(&store, 1, c(n), fill(0xA1, 4096)).await.unwrap();
    }
    write(&store, 2, c(1), fill(0xB2, 4096)).await.unwrap();
    zero(&store, 2, c(2), CHUNK_SIZE).await;
    let all = 0..u64::MAX;
    assert_eq!(store.resolved_chunks(1, VolumeId(7), &[], 1, all.clone()), vec![(0, key(7, 0, 1)), (1, key(7, 1, 1)), (2, key(7, 2, 1))]);
    assert_eq!(
        store.resolved_chunks(1, VolumeId(7), &[], 2, all.clone()),
        vec![(0, key(7, 0, 1)), (1, key(7, 1, 2))],
        "the trimmed chunk holds nothing"
    );
    assert_eq!(store.resolved_chunks(1, VolumeId(7), &[], 1, 1..2), vec![(1, key(7, 1, 1))], "a range");
    assert!(store.resolved_chunks(1, VolumeId(7), &[], 1, 5..5).is_empty());

    // A clone of epoch 1 that wrote chunk 3 and trimmed chunk 0.
    let lineage = [(VolumeId(7), 1)];
    write_clone(&store, 9, &lineage, 1, c(3), fill(0xC3, 4096)).await;
    let mut b = Batch::new();
    b.set_lineage(1, VolumeId(9), lineage.to_vec());
    b.zero(1, VolumeId(9), 1, c(0), CHUNK_SIZE, true).unwrap();
    store.commit(b).await.unwrap();
    assert_eq!(store.resolved_chunks(1, VolumeId(9), &lineage, u64::MAX, all.clone()), vec![(1, key(7, 1, 1)), (2, key(7, 2, 1)), (3, key(9, 3, 1))]);
    assert!(store.resolved_chunks(2, VolumeId(7), &[], 2, all).is_empty(), "another shard holds none of it");
}
