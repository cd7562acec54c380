//! Raft log store: appends of 4 KiB entries, each waited on until durable, from 1 group and
//! from 64 groups at once. With group commit the 64-group case shares fsyncs, so its cost per
//! append falls far below the single-group case; the report prints syncs per append.
//!
//! Beside it, in the same run: the write-ahead segments of the coming own log engine
//! (`basalt_raft::wal`), one 4 KiB record per synced batch and 64 per batch, and the floor under
//! both, one 4 KiB `pwrite` + `fdatasync` on a preallocated file.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use basalt_raft::log_store::harness::append_durable;
use basalt_raft::{LogEngine, LogEngineConfig};
use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn engine(dir: &std::path::Path) -> LogEngine {
    LogEngine::open(&LogEngineConfig {
        dir: dir.join("log"),
        segment_bytes: 64 << 20,
        tail_bytes_per_group: 1 << 20,
        max_batch_bytes: 16 << 20,
        size_target: u64::MAX,
    })
    .expect("open log")
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir_in(std::env::var_os("BASALT_BENCH_DIR").unwrap_or_else(|| ".".into())).expect("temp dir");
    let payload = Bytes::from(vec![9u8; 4096]);
    let mut g = c.benchmark_group("log_store_append_4k");
    g.measurement_time(Duration::from_secs(5));

    for groups in [1u32, 64] {
        let e = engine(&dir.path().join(format!("g{groups}")));
        let stores: Vec<_> = (0..groups).map(|g| e.group(g).expect("group")).collect();
        let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1));
        g.throughput(Throughput::Elements(u64::from(groups)));
        let before = (e.stats().batches.load(Ordering::Relaxed), e.stats().requests.load(Ordering::Relaxed));
        g.bench_function(format!("{groups}_groups"), |b| {
            b.iter_custom(|iters| {
                let started = Instant::now();
                rt.block_on(async {
                    for _ in 0..iters {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let tasks = stores.iter().cloned().map(|mut s| {
                            let p = payload.clone();
                            tokio::spawn(async move { append_durable(&mut s, index, p).await })
                        });
                        for t in futures_join(tasks.collect()).await {
                            t.expect("append");
                        }
                    }
                });
                started.elapsed()
            })
        });
        let after = (e.stats().batches.load(Ordering::Relaxed), e.stats().requests.load(Ordering::Relaxed));
        let (syncs, appends) = (after.0 - before.0, after.1 - before.1);
        println!("{groups} group(s): {appends} appends in {syncs} syncs = {:.3} syncs per append", syncs as f64 / appends.max(1) as f64);
    }
    g.finish();

    let mut g = c.benchmark_group("wal_append_4k");
    g.measurement_time(Duration::from_secs(5));
    for per_batch in [1u32, 64] {
        let cfg = basalt_raft::wal::WalConfig { dir: dir.path().join(format!("wal{per_batch}")), segment_bytes: 64 << 20 };
        let (mut wal, _) = basalt_raft::wal::Wal::open(cfg).expect("open wal");
        let records: Vec<_> = (0..per_batch).map(|group| basalt_raft::wal::Record { kind: 1, group, payload: &payload }).collect();
        g.throughput(Throughput::Elements(u64::from(per_batch)));
        g.bench_function(format!("{per_batch}_records_per_batch"), |b| {
            b.iter(|| {
                let pos = wal.append(&records).expect("append");
                // Keep a few segments: release what is two behind.
                if pos.records[0].offset < 8192 {
                    wal.release_before(pos.segment.saturating_sub(1)).expect("release");
                }
            })
        });
    }
    // The floor: one aligned 4 KiB write and fdatasync on a preallocated (written) file.
    let path = dir.path().join("raw.img");
    std::fs::write(&path, vec![0u8; 64 << 20]).expect("preallocate");
    let file = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
    let mut at = 0u64;
    g.throughput(Throughput::Elements(1));
    g.bench_function("raw_pwrite_fdatasync", |b| {
        b.iter(|| {
            use std::os::unix::fs::FileExt;
            file.write_all_at(&payload, at).expect("write");
            file.sync_data().expect("sync");
            at = (at + 4096) % (64 << 20);
        })
    });
    g.finish();
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>) -> Vec<std::io::Result<()>> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| Err(std::io::Error::other(e.to_string()))));
    }
    out
}

criterion_group!(benches, bench);
criterion_main!(benches);
