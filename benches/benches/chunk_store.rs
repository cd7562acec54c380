//! Chunk store: 4 KiB and 1 MiB writes and 4 KiB reads against a real O_DIRECT data file via
//! io_uring, with the RocksDB index. The baseline in the same run is a plain `pwrite` +
//! `fdatasync`-free O_DIRECT write of the same size, so the ratio shows what the store adds.

use std::os::unix::fs::{FileExt, OpenOptionsExt};

use basalt_chunk_store::aligned::AlignedBuf;
use basalt_chunk_store::{Batch, ChunkStore, ChunkStoreConfig, IndexMemory};
use basalt_common::{CHUNK_SIZE, VolumeId, crc32c};
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const SPAN: u64 = 256 << 20;

fn store(dir: &std::path::Path) -> ChunkStore {
    ChunkStore::open(&ChunkStoreConfig {
        data_path: dir.join("chunks.dat"),
        index_dir: dir.join("index"),
        capacity: 1 << 30,
        direct_io: true,
        queue_depth: 64,
        index_memory: IndexMemory { cache_bytes: 32 << 20, write_buffer_bytes: 16 << 20 },
    })
    .expect("open store")
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir_in(std::env::var_os("BASALT_BENCH_DIR").unwrap_or_else(|| ".".into())).expect("temp dir");
    let s = store(dir.path());
    // Pre-fill so writes overwrite allocated chunks (steady state, not first-write allocation).
    rt.block_on(async {
        for chunk in 0..SPAN / CHUNK_SIZE {
            let data = Bytes::from(vec![1u8; CHUNK_SIZE as usize]);
            let crcs = data.chunks(4096).map(crc32c).collect();
            let mut b = Batch::new();
            b.write(0, VolumeId(1), 1, chunk * CHUNK_SIZE, data, crcs).expect("write");
            s.commit(b).await.expect("commit");
        }
        s.checkpoint().await.expect("checkpoint");
    });
    let raw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .custom_flags(libc_o_direct())
        .open(dir.path().join("raw.dat"))
        .expect("raw file");
    raw.set_len(SPAN).expect("size raw file");

    let mut g = c.benchmark_group("chunk_store");
    for size in [4096usize, 1 << 20] {
        let data = Bytes::from(vec![7u8; size]);
        let crcs: Vec<u32> = data.chunks(4096).map(crc32c).collect();
        let mut n = 0u64;
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("write", size), &size, |b, &size| {
            b.iter(|| {
                n = n.wrapping_add(7919);
                let offset = (n * size as u64) % (SPAN - size as u64) / size as u64 * size as u64;
                let mut batch = Batch::new();
                batch.write(0, VolumeId(1), 1, offset, data.clone(), crcs.clone()).expect("write");
                rt.block_on(s.commit(batch)).expect("commit");
            })
        });
        let buf = AlignedBuf::from_slice(&data);
        g.bench_with_input(BenchmarkId::new("baseline_odirect_pwrite", size), &size, |b, &size| {
            b.iter(|| {
                n = n.wrapping_add(7919);
                let offset = (n * size as u64) % (SPAN - size as u64) / size as u64 * size as u64;
                raw.write_all_at(buf.as_slice(), offset).expect("pwrite");
            })
        });
    }
    g.throughput(Throughput::Bytes(4096));
    let mut n = 0u64;
    g.bench_function("read/4096", |b| {
        b.iter(|| {
            n = n.wrapping_add(7919);
            let offset = (n * 4096) % SPAN;
            rt.block_on(s.read(0, VolumeId(1), offset, 4096)).expect("read");
        })
    });
    g.finish();
}

fn libc_o_direct() -> i32 {
    0o40000
}

criterion_group!(benches, bench);
criterion_main!(benches);
