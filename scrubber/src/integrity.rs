//! Integrity scrub: every stored block is read back at a bounded rate and checked.
//!
//! Two kinds of pass, both driven by [`IntegrityScrubber`]:
//! - [`PassKind::Local`] checks each of this node's chunks against the crc32c recorded when
//!   its blocks were written (bit rot, misdirected or torn writes).
//! - [`PassKind::Deep`] runs on placement-group leaders and compares the replicas of each chunk
//!   with each other, which also finds a replica whose block differs but carries a valid crc
//!   (a write lost or reordered on one node).
//!
//! What a check does with a bad block (repair through the placement group) is the node's
//! business: it implements [`Verifier`]. This module schedules passes (every N hours, or on
//! demand), paces them to a byte rate so foreground I/O keeps its latency, and keeps the
//! counters `basalt scrub status` and `/metrics` show.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use basalt_chunk_store::ChunkKey;
use tokio::sync::{mpsc, watch};

/// What a pass checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassKind {
    /// This node's copies against their stored crc32c.
    Local,
    /// All replicas of the chunks of PGs this node leads, against each other.
    Deep,
}

impl PassKind {
    /// "local" or "deep".
    pub fn as_str(self) -> &'static str {
        match self {
            PassKind::Local => "local",
            PassKind::Deep => "deep",
        }
    }

    fn code(self) -> u8 {
        match self {
            PassKind::Local => 1,
            PassKind::Deep => 2,
        }
    }
}

/// What checking one chunk found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChunkVerdict {
    /// Bytes read from this node's data file.
    pub bytes_read: u64,
    /// Blocks whose data failed their crc (on any replica compared).
    pub corrupt: u64,
    /// Blocks whose replicas disagree although each matches its own crc.
    pub divergent: u64,
    /// Block copies rewritten from a healthy replica.
    pub repaired: u64,
    /// Bad blocks no healthy replica could vouch for (reported, never guessed at).
    pub unrepairable: u64,
    /// Steps of the check that failed and may succeed later (a replica or the PG leader
    /// unreachable, the chunk written meanwhile).
    pub errors: u64,
}

/// The node side of a pass: which chunks to check and how to check (and repair) one.
pub trait Verifier: Send + Sync + 'static {
    /// The chunks a pass of `kind` covers, listed when it starts.
    fn chunks(&self, kind: PassKind) -> Vec<ChunkKey>;

    /// Checks one chunk, repairing what it can. An error is counted and the pass goes on.
    fn verify(&self, key: ChunkKey, kind: PassKind) -> impl Future<Output = Result<ChunkVerdict, String>> + Send;
}

/// Rates and schedules.
#[derive(Clone, Debug)]
pub struct IntegrityConfig {
    /// Bytes per second a pass may read from this node's data file.
    pub rate: u64,
    /// A local pass starts this long after the previous one finished (`None`: on demand only).
    pub interval: Option<Duration>,
    /// The same for deep passes.
    pub deep_interval: Option<Duration>,
    /// Where the finish times of the last passes are kept, so a restart does not reset the
    /// schedule.
    pub state_file: Option<PathBuf>,
}

/// Counters for `basalt scrub status` and metrics. Totals count since the node started.
#[derive(Debug, Default)]
pub struct IntegrityStats {
    running: AtomicU8,
    /// Chunks the running (or last) pass covers.
    pub chunks_total: AtomicU64,
    /// Chunks it has checked.
    pub chunks_done: AtomicU64,
    /// Bytes read and checked.
    pub bytes_verified: AtomicU64,
    /// Corrupt blocks found.
    pub corrupt_found: AtomicU64,
    /// Divergent blocks found.
    pub divergent_found: AtomicU64,
    /// Repairs the checks on this node issued.
    pub repairs_issued: AtomicU64,
    /// Bad blocks left unrepaired.
    pub unrepairable: AtomicU64,
    /// Chunk checks that failed (replica unreachable, I/O error).
    pub check_errors: AtomicU64,
    /// Passes finished.
    pub passes_completed: AtomicU64,
    /// The newest on-demand request ([`IntegrityControl::start`]) whose pass has finished.
    pub tickets_served: AtomicU64,
    /// Blocks of this node rewritten by a repair (whichever node's check found them).
    pub blocks_repaired: AtomicU64,
    /// When the last local pass finished, ms since the Unix epoch (0: never).
    pub last_local_unix_ms: AtomicU64,
    /// When the last deep pass finished (0: never).
    pub last_deep_unix_ms: AtomicU64,
}

impl IntegrityStats {
    /// The kind of pass running now, if any.
    pub fn running(&self) -> Option<PassKind> {
        match self.running.load(Ordering::Relaxed) {
            1 => Some(PassKind::Local),
            2 => Some(PassKind::Deep),
            _ => None,
        }
    }

    /// Adds what one check found to the totals.
    pub fn record(&self, v: &ChunkVerdict) {
        self.bytes_verified.fetch_add(v.bytes_read, Ordering::Relaxed);
        self.corrupt_found.fetch_add(v.corrupt, Ordering::Relaxed);
        self.divergent_found.fetch_add(v.divergent, Ordering::Relaxed);
        self.repairs_issued.fetch_add(v.repaired, Ordering::Relaxed);
        self.unrepairable.fetch_add(v.unrepairable, Ordering::Relaxed);
        self.check_errors.fetch_add(v.errors, Ordering::Relaxed);
    }
}

/// The answer to a request for a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartOutcome {
    /// A pass of the requested kind will run next (now, or once the running one ends); it is
    /// done when [`IntegrityStats::tickets_served`] reaches `ticket`.
    Queued {
        /// The request's number.
        ticket: u64,
    },
    /// A requested pass was already waiting to run; this request joins it.
    Joined {
        /// That request's number.
        ticket: u64,
        /// Its kind.
        kind: PassKind,
    },
    /// The scrubber has stopped (the node is shutting down).
    Stopped,
}

/// An on-demand pass waiting to run.
#[derive(Clone, Copy, Debug)]
struct Request {
    kind: PassKind,
    rate: Option<u64>,
    ticket: u64,
}

/// Starts passes on demand (cheap to clone).
#[derive(Clone)]
pub struct IntegrityControl {
    tx: mpsc::Sender<Request>,
    stats: Arc<IntegrityStats>,
    /// The last ticket issued and its kind; held while queueing so tickets stay in queue order.
    issued: Arc<std::sync::Mutex<(u64, PassKind)>>,
}

impl IntegrityControl {
    /// Asks for a pass of `kind`, reading at `rate` bytes/s instead of the configured rate if
    /// given. It runs after the pass running now, if any.
    pub fn start(&self, kind: PassKind, rate: Option<u64>) -> StartOutcome {
        let mut issued = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        let ticket = issued.0 + 1;
        match self.tx.try_send(Request { kind, rate: rate.filter(|r| *r > 0), ticket }) {
            Ok(()) => {
                *issued = (ticket, kind);
                StartOutcome::Queued { ticket }
            }
            // One request is already waiting to be picked up: it will run.
            Err(mpsc::error::TrySendError::Full(_)) => StartOutcome::Joined { ticket: issued.0, kind: issued.1 },
            Err(mpsc::error::TrySendError::Closed(_)) => StartOutcome::Stopped,
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<IntegrityStats> {
        &self.stats
    }
}

/// Runs integrity passes for one node.
pub struct IntegrityScrubber<V: Verifier> {
    verifier: Arc<V>,
    config: IntegrityConfig,
    stats: Arc<IntegrityStats>,
    requests: mpsc::Receiver<Request>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl<V: Verifier> IntegrityScrubber<V> {
    /// A scrubber and the handle that starts passes on demand.
    pub fn new(verifier: Arc<V>, config: IntegrityConfig, stats: Arc<IntegrityStats>) -> (Self, IntegrityControl) {
        let (tx, requests) = mpsc::channel(1);
        let control = IntegrityControl { tx, stats: stats.clone(), issued: Arc::new(std::sync::Mutex::new((0, PassKind::Local))) };
        (Self { verifier, config: IntegrityConfig { rate: config.rate.max(1), ..config }, stats, requests }, control)
    }

    /// Loads the last passes' finish times; a node without any starts its schedule now rather
    /// than reading its whole disk the moment it first comes up.
    fn load_schedule(&self) {
        let now = now_ms();
        let (mut local, mut deep) = (now, now);
        if let Some(path) = &self.config.state_file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    let mut fields = text.split_whitespace().map(str::parse::<u64>);
                    match (fields.next(), fields.next()) {
                        (Some(Ok(l)), Some(Ok(d))) => (local, deep) = (l, d),
                        _ => tracing::warn!(path = %path.display(), "integrity scrub schedule file is unreadable; starting the schedule now"),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot read the integrity scrub schedule; starting it now"),
            }
        }
        self.stats.last_local_unix_ms.store(local, Ordering::Relaxed);
        self.stats.last_deep_unix_ms.store(deep, Ordering::Relaxed);
        self.save_schedule();
    }

    fn save_schedule(&self) {
        let Some(path) = &self.config.state_file else { return };
        let text = format!("{} {}\n", self.stats.last_local_unix_ms.load(Ordering::Relaxed), self.stats.last_deep_unix_ms.load(Ordering::Relaxed));
        // Write-then-rename so a crash never leaves a torn file.
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path)) {
            tracing::warn!(path = %path.display(), error = %e, "cannot save the integrity scrub schedule");
        }
    }

    /// The next scheduled pass and how long until it is due.
    fn next_due(&self) -> Option<(PassKind, Duration)> {
        let now = now_ms();
        let due = |last: &AtomicU64, every: Option<Duration>| {
            every.map(|e| Duration::from_millis((last.load(Ordering::Relaxed) + e.as_millis() as u64).saturating_sub(now)))
        };
        let local = due(&self.stats.last_local_unix_ms, self.config.interval).map(|d| (PassKind::Local, d));
        let deep = due(&self.stats.last_deep_unix_ms, self.config.deep_interval).map(|d| (PassKind::Deep, d));
        match (local, deep) {
            (Some(l), Some(d)) => Some(if d.1 <= l.1 { d } else { l }),
            (l, d) => l.or(d),
        }
    }

    /// Runs scheduled and requested passes until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        self.load_schedule();
        loop {
            if *shutdown.borrow() {
                return;
            }
            // Sleep at most an hour at a time so a clock change is noticed.
            let (scheduled, wait) = match self.next_due() {
                Some((kind, wait)) => (Some(kind), wait.min(Duration::from_secs(3600))),
                None => (None, Duration::from_secs(3600)),
            };
            let req = tokio::select! {
                req = self.requests.recv() => match req {
                    Some(req) => Some(req),
                    None => return,
                },
                _ = tokio::time::sleep(wait) => match scheduled {
                    Some(kind) if self.next_due().is_some_and(|(k, w)| k == kind && w.is_zero()) => None,
                    _ => continue,
                },
                _ = shutdown.changed() => return,
            };
            let (kind, rate) = match req {
                Some(r) => (r.kind, r.rate.unwrap_or(self.config.rate)),
                None => match scheduled {
                    Some(kind) => (kind, self.config.rate),
                    None => continue,
                },
            };
            if !self.pass(kind, rate, &mut shutdown).await {
                return;
            }
            if let Some(r) = req {
                self.stats.tickets_served.fetch_max(r.ticket, Ordering::Relaxed);
            }
        }
    }

    /// One pass; false if it stopped for shutdown.
    async fn pass(&self, kind: PassKind, rate: u64, shutdown: &mut watch::Receiver<bool>) -> bool {
        let stats = &self.stats;
        stats.chunks_done.store(0, Ordering::Relaxed);
        stats.chunks_total.store(0, Ordering::Relaxed);
        stats.running.store(kind.code(), Ordering::Relaxed);
        let chunks = self.verifier.chunks(kind);
        stats.chunks_total.store(chunks.len() as u64, Ordering::Relaxed);
        let started = Instant::now();
        let mut found = ChunkVerdict::default();
        let mut errors = 0u64;
        let mut logged_percent = 0u64;
        tracing::info!(kind = kind.as_str(), chunks = chunks.len(), rate, "integrity scrub pass started");
        let total = chunks.len() as u64;
        for (i, key) in chunks.into_iter().enumerate() {
            if *shutdown.borrow() {
                stats.running.store(0, Ordering::Relaxed);
                return false;
            }
            let t = Instant::now();
            match self.verifier.verify(key, kind).await {
                Ok(v) => {
                    stats.record(&v);
                    found.bytes_read += v.bytes_read;
                    found.corrupt += v.corrupt;
                    found.divergent += v.divergent;
                    found.repaired += v.repaired;
                    found.unrepairable += v.unrepairable;
                    errors += v.errors;
                    if v.corrupt + v.divergent > 0 {
                        tracing::warn!(
                            kind = kind.as_str(), shard = key.shard, volume = %key.volume, chunk = key.chunk,
                            corrupt = v.corrupt, divergent = v.divergent, repaired = v.repaired, unrepairable = v.unrepairable,
                            "integrity scrub found bad blocks"
                        );
                    }
                    // Pace to the configured rate.
                    let budget = Duration::from_secs_f64(v.bytes_read as f64 / rate as f64);
                    if let Some(rest) = budget.checked_sub(t.elapsed()) {
                        tokio::select! {
                            _ = tokio::time::sleep(rest) => {}
                            _ = shutdown.changed() => {}
                        }
                    }
                }
                Err(e) => {
                    errors += 1;
                    stats.check_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(kind = kind.as_str(), shard = key.shard, volume = %key.volume, chunk = key.chunk, error = %e, "integrity check of a chunk failed");
                }
            }
            let done = i as u64 + 1;
            stats.chunks_done.store(done, Ordering::Relaxed);
            let percent = done * 100 / total.max(1);
            if percent >= logged_percent + 10 {
                logged_percent = percent / 10 * 10;
                tracing::info!(kind = kind.as_str(), percent, chunks_done = done, chunks_total = total, "integrity scrub progress");
            }
        }
        let finished = now_ms();
        match kind {
            PassKind::Local => stats.last_local_unix_ms.store(finished, Ordering::Relaxed),
            PassKind::Deep => stats.last_deep_unix_ms.store(finished, Ordering::Relaxed),
        }
        self.save_schedule();
        stats.passes_completed.fetch_add(1, Ordering::Relaxed);
        stats.running.store(0, Ordering::Relaxed);
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            kind = kind.as_str(),
            chunks = total,
            mb = found.bytes_read as f64 / 1e6,
            mb_per_sec = found.bytes_read as f64 / 1e6 / secs.max(1e-3),
            corrupt = found.corrupt,
            divergent = found.divergent,
            repaired = found.repaired,
            unrepairable = found.unrepairable,
            errors,
            "integrity scrub pass finished"
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_chunk_store::{Batch, ChunkStore};
    use basalt_common::{BLOCK_SIZE, VolumeId, crc32c};
    use bytes::Bytes;

    /// Checks a real chunk store's chunks locally (no replicas to repair from).
    struct LocalOnly(ChunkStore);

    impl Verifier for LocalOnly {
        fn chunks(&self, _kind: PassKind) -> Vec<ChunkKey> {
            self.0.list_chunks(1)
        }

        async fn verify(&self, key: ChunkKey, _kind: PassKind) -> Result<ChunkVerdict, String> {
            let check = self.0.check_chunk(key).await.map_err(|e| e.to_string())?;
            let Some(check) = check else { return Ok(ChunkVerdict::default()) };
            let corrupt = check.corrupt().count() as u64;
            Ok(ChunkVerdict { bytes_read: check.bytes_read(), corrupt, unrepairable: corrupt, ..Default::default() })
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_requested_pass_finds_a_flipped_bit_and_reports_progress() {
        let dir = tempfile::tempdir().unwrap();
        let (store, cfg) = crate::test_store::small(dir.path());
        let mut b = Batch::new();
        for c in 0..4u64 {
            let data = Bytes::from(vec![c as u8 + 1; 64 * BLOCK_SIZE as usize]);
            let crcs = data.chunks(4096).map(crc32c).collect();
            b.write(1, VolumeId(1), 1, c << 20, data, crcs).unwrap();
        }
        store.commit(b).await.unwrap();
        store.checkpoint().await.unwrap();
        let at = store.locate(ChunkKey { shard: 1, volume: VolumeId(1), chunk: 2, epoch: 1 }).unwrap() + 5 * BLOCK_SIZE + 100;
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&cfg.data_path).unwrap();
            f.write_all_at(&[0xEE], at).unwrap();
            f.sync_all().unwrap();
        }

        let stats = Arc::new(IntegrityStats::default());
        let state_file = dir.path().join("schedule");
        let config = IntegrityConfig { rate: 1 << 20, interval: None, deep_interval: None, state_file: Some(state_file.clone()) };
        let (scrubber, control) = IntegrityScrubber::new(Arc::new(LocalOnly(store.clone())), config, stats.clone());
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(scrubber.run(rx));
        assert_eq!(control.start(PassKind::Local, None), StartOutcome::Queued { ticket: 1 });
        // 4 × 256 KiB at 1 MiB/s: the pass takes about a second, so it is seen running.
        let deadline = Instant::now() + Duration::from_secs(5);
        while stats.running().is_none() && stats.passes_completed.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "pass never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // While it runs, a request queues behind it; another joins the queued one.
        assert_eq!(control.start(PassKind::Deep, None), StartOutcome::Queued { ticket: 2 });
        assert_eq!(control.start(PassKind::Local, None), StartOutcome::Joined { ticket: 2, kind: PassKind::Deep });
        let started = Instant::now();
        while stats.tickets_served.load(Ordering::Relaxed) < 1 {
            assert!(Instant::now() < deadline + Duration::from_secs(5), "pass never finished");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(started.elapsed() >= Duration::from_millis(500), "rate limit not applied: {:?}", started.elapsed());
        assert!(stats.corrupt_found.load(Ordering::Relaxed) >= 1);
        // The queued second pass (ticket 2) runs too (it may already have begun).
        while stats.tickets_served.load(Ordering::Relaxed) < 2 {
            assert!(Instant::now() < deadline + Duration::from_secs(10), "second pass never finished");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(stats.passes_completed.load(Ordering::Relaxed), 2);
        assert_eq!(stats.chunks_done.load(Ordering::Relaxed), 4);
        assert_eq!(stats.chunks_total.load(Ordering::Relaxed), 4);
        assert_eq!(stats.bytes_verified.load(Ordering::Relaxed), 2 * 4 * 64 * BLOCK_SIZE);
        assert_eq!(stats.corrupt_found.load(Ordering::Relaxed), 2, "both passes found the flipped bit");
        assert_eq!(stats.unrepairable.load(Ordering::Relaxed), 2);
        assert!(stats.running().is_none());
        tx.send(true).unwrap();
        task.await.unwrap();
        // The finish time survives for the schedule.
        let saved = std::fs::read_to_string(&state_file).unwrap();
        let local: u64 = saved.split_whitespace().next().unwrap().parse().unwrap();
        assert_eq!(local, stats.last_local_unix_ms.load(Ordering::Relaxed));
    }
}
