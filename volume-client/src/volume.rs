//! I/O on one volume: split at extent boundaries, route each piece to its PG's leader, follow
//! leader changes with backoff, and check crc32c end to end (computed here on write, verified
//! here on read).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use basalt_common::layout::ExtentSpan;
use basalt_common::{BLOCK_SIZE, CHUNK_SIZE, CryptContext, NodeId, VolumeId, crc32c};
use basalt_proto::data::data_client::DataClient;
use basalt_proto::data::data_error::Code;
use basalt_proto::data::{ChunkVersionsRequest, DataError, ReadReply, ReadRequest, WriteReply, WriteRequest, ZeroReply, ZeroRequest};
use basalt_proto::wire::Kind;
use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use tokio::sync::Semaphore;

use crate::cluster::Cluster;
use crate::crypt::VolumeCipher;
use crate::data_conn::{ConnectError, DataConn};
use crate::error::ClientError;

/// How long a snapshot cut waits for the writes in flight (below the meta group's wait for
/// the cut, so a stuck drain gives up first).
const CUT_DRAIN_WAIT: Duration = Duration::from_secs(8);

/// Longest wait between two attempts of one request.
const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// Every this many attempts of one request, the cluster map is fetched again.
const MAP_REFRESH_EVERY: u32 = 16;

/// Longest a background map fetch may take (it holds the client's refresh lock meanwhile;
/// long enough to get past a few silent seeds).
const MAP_REFRESH_WAIT: Duration = Duration::from_secs(10);

/// An open volume. Cheap to clone; clones share the in-flight limit.
#[derive(Clone)]
pub struct Volume {
    cluster: Cluster,
    id: VolumeId,
    /// The volume whose extent placement this one follows (a clone's root ancestor; else
    /// `id`): PGs hold a clone's chunks beside the ones it inherits.
    placement: VolumeId,
    name: Arc<str>,
    size: Arc<AtomicU64>,
    /// Attachment epoch sent with writes (0: not attached read-write).
    epoch: Arc<AtomicU64>,
    /// The volume's snapshot write epoch this handle's writes carry, moved on by the snapshot
    /// cuts this holder makes ([`Volume::cut_snapshot`]); 0: follow the cluster map (a handle
    /// without an attachment).
    write_epoch: Arc<AtomicU64>,
    /// Set on a handle that reads a snapshot: its name and epoch. Such a handle never writes.
    snapshot: Option<(Arc<str>, u64)>,
    inflight: Arc<Semaphore>,
    /// Write payload in flight, in KiB.
    inflight_kib: Arc<Semaphore>,
    /// Encrypted volumes: seals blocks before they leave and opens them on arrival.
    cipher: Option<Arc<VolumeCipher>>,
    /// Encrypted volumes: a partial-block write reads, opens, merges and seals its edge blocks
    /// here (nodes cannot); it holds its blocks' stripes exclusively meanwhile, whole-block
    /// writes hold theirs shared, so no write lands between its read and its write.
    stripes: Arc<Stripes>,
    /// Encrypted volumes: fetches the keys again when a block arrives sealed under a version
    /// this process does not hold yet (a re-encryption another process started).
    reloader: Option<Arc<dyn KeyReloader>>,
    /// Open (true) unless writes are held: a standby attachment holds them until write access
    /// is handed to it ([`Volume::hold_writes`]).
    write_gate: Arc<tokio::sync::watch::Sender<bool>>,
    /// What this handle and its clones did (the attach process's `/metrics`).
    metrics: Arc<crate::metrics::VolumeMetrics>,
}

/// Loads an encrypted volume's newer key versions into its cipher (see
/// [`crate::reencrypt::Reloader`]).
pub trait KeyReloader: Send + Sync {
    /// Fetches the volume's keys (unless `version` is held by now) and adds the versions the
    /// cipher lacks.
    fn reload(&self, version: u32) -> futures::future::BoxFuture<'_, Result<(), ClientError>>;
}

/// Stripes of block-range locks (see [`Volume`]'s `stripes`).
struct Stripes {
    locks: Vec<tokio::sync::RwLock<()>>,
}

/// Blocks per stripe (1 MiB: one chunk).
const STRIPE_BLOCKS: u64 = 256;

impl Stripes {
    fn new() -> Stripes {
        Stripes { locks: (0..64).map(|_| tokio::sync::RwLock::new(())).collect() }
    }

    /// The stripes covering blocks `[first, end)`, ascending (everyone takes them in this
    /// order, so two writers never wait on each other in a cycle).
    fn of(&self, first: u64, end: u64) -> Vec<usize> {
        let n = self.locks.len() as u64;
        let (a, b) = (first / STRIPE_BLOCKS, end.saturating_sub(1) / STRIPE_BLOCKS);
        if b - a + 1 >= n {
            return (0..n as usize).collect();
        }
        let mut v: Vec<usize> = (a..=b).map(|s| (s % n) as usize).collect();
        v.sort_unstable();
        v
    }

    async fn shared(&self, first: u64, end: u64) -> Vec<tokio::sync::RwLockReadGuard<'_, ()>> {
        let mut guards = Vec::new();
        for i in self.of(first, end) {
            guards.push(self.locks[i].read().await);
        }
        guards
    }

    async fn exclusive(&self, first: u64, end: u64) -> Vec<tokio::sync::RwLockWriteGuard<'_, ()>> {
        let mut guards = Vec::new();
        for i in self.of(first, end) {
            guards.push(self.locks[i].write().await);
        }
        guards
    }
}

/// What one attempt at a PG produced.
enum Attempt<T> {
    Done(T),
    /// Try again (possibly elsewhere), after `backoff` if set.
    Retry {
        reason: String,
        backoff: bool,
    },
    Fail(ClientError),
}

/// crc32c of `data` (placed at `offset`) cut at 4 KiB volume boundaries.
pub fn piece_crcs(offset: u64, data: &[u8]) -> Vec<u32> {
    let mut out = Vec::with_capacity(data.len() / BLOCK_SIZE as usize + 2);
    let mut pos = 0usize;
    while pos < data.len() {
        let abs = offset + pos as u64;
        let next = ((abs / BLOCK_SIZE) + 1) * BLOCK_SIZE;
        let len = ((next - abs) as usize).min(data.len() - pos);
        out.push(crc32c(&data[pos..pos + len]));
        pos += len;
    }
    out
}

impl Volume {
    pub(crate) fn new(cluster: Cluster, id: VolumeId, placement: VolumeId, name: String, size: u64) -> Self {
        let permits = cluster.inner.options.max_inflight;
        let kib = (cluster.inner.options.max_inflight_bytes / 1024).max(1);
        Self {
            cluster,
            id,
            placement,
            name: name.into(),
            size: Arc::new(AtomicU64::new(size)),
            epoch: Arc::new(AtomicU64::new(0)),
            write_epoch: Arc::new(AtomicU64::new(0)),
            snapshot: None,
            inflight: Arc::new(Semaphore::new(permits)),
            inflight_kib: Arc::new(Semaphore::new(kib)),
            cipher: None,
            stripes: Arc::new(Stripes::new()),
            reloader: None,
            write_gate: Arc::new(tokio::sync::watch::Sender::new(true)),
            metrics: Arc::default(),
        }
    }

    /// What this handle (and its clones) did: requests, bytes, errors, latencies.
    pub fn metrics(&self) -> &Arc<crate::metrics::VolumeMetrics> {
        &self.metrics
    }

    fn measured<T>(
        &self,
        op: crate::metrics::VolumeOp,
        bytes: u64,
        started: std::time::Instant,
        r: Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        self.metrics.record(op, bytes, started.elapsed(), r.is_ok());
        r
    }

    /// Holds every write, zeroing and re-encryption (they wait, they do not fail) until
    /// [`Volume::release_writes`]: a standby attachment before the handover.
    pub fn hold_writes(&self) {
        self.write_gate.send_replace(false);
    }

    /// Lets held and new writes go (with the epoch set by then).
    pub fn release_writes(&self) {
        self.write_gate.send_replace(true);
    }

    /// Refuses writes through a snapshot handle and waits while writes are held.
    async fn writable(&self) -> Result<(), ClientError> {
        self.check_writable()?;
        if !*self.write_gate.borrow() {
            let mut open = self.write_gate.subscribe();
            open.wait_for(|open| *open).await.map_err(|_| ClientError::Internal("client closed".into()))?;
        }
        Ok(())
    }

    /// Reads the volume as snapshot `name` (at `epoch`) froze it; writes are refused.
    pub(crate) fn at_snapshot(mut self, name: &str, epoch: u64) -> Volume {
        self.snapshot = Some((name.into(), epoch));
        self
    }

    /// The name clients know this handle by: the volume's, or `VOLUME@SNAPSHOT` for a snapshot.
    pub fn export_name(&self) -> String {
        match &self.snapshot {
            Some((snap, _)) => format!("{}@{snap}", self.name),
            None => self.name.to_string(),
        }
    }

    /// The snapshot this handle reads (name, epoch), if it reads one.
    pub fn snapshot(&self) -> Option<(&str, u64)> {
        self.snapshot.as_ref().map(|(n, e)| (&**n, *e))
    }

    /// Sets the snapshot write epoch this handle's writes carry (the attachment's, from the
    /// meta group).
    pub fn set_write_epoch(&self, epoch: u64) {
        self.write_epoch.store(epoch, Ordering::Release);
    }

    /// The snapshot write epoch writes carry now.
    pub fn write_epoch(&self) -> u64 {
        match self.write_epoch.load(Ordering::Acquire) {
            0 => self.cluster.map().volumes.get(&self.id).map_or(1, |v| v.write_epoch.max(1)),
            e => e,
        }
    }

    /// Refuses writes through a snapshot handle.
    fn check_writable(&self) -> Result<(), ClientError> {
        match &self.snapshot {
            Some((name, _)) => Err(ClientError::Invalid(format!("{}@{name} is a snapshot: it is read-only", self.name))),
            None => Ok(()),
        }
    }

    /// Cuts snapshot `name`, which the meta group asked of this read-write holder: holds new
    /// I/O back, waits for what is in flight (every permit of the in-flight limit: each
    /// write, zero and re-encryption holds one), has the meta group freeze the current write
    /// epoch, and goes on with the next. Every write acknowledged before is in the snapshot;
    /// none issued after. The guest sees one drain and one meta round of added latency.
    pub async fn cut_snapshot(&self, name: &str) -> Result<u64, ClientError> {
        let permits = self.cluster.inner.options.max_inflight as u32;
        let _all = tokio::time::timeout(CUT_DRAIN_WAIT, self.inflight.acquire_many(permits))
            .await
            .map_err(|_| {
                ClientError::Admin(format!(
                    "snapshot {name} of {}: writes in flight did not finish within {} s; not cut",
                    self.name,
                    CUT_DRAIN_WAIT.as_secs()
                ))
            })?
            .map_err(|_| ClientError::Internal("client closed".into()))?;
        let req = basalt_proto::admin::SnapshotCutRequest { volume: self.name.to_string(), name: name.to_string(), attach_epoch: self.epoch() };
        let cut = self
            .cluster
            .admin_call(|mut c| {
                let req = req.clone();
                async move { c.snapshot_cut(req).await }
            })
            .await;
        let epoch = match cut {
            Ok(reply) => {
                reply.volume.map(|v| v.write_epoch).filter(|e| *e > 0).ok_or_else(|| ClientError::Internal("snapshot cut returned no volume".into()))
            }
            Err(status) => Err(ClientError::from_status(&status)),
        };
        // Whatever the answer said, the map has the truth: a cut that committed while its
        // answer was lost moved the epoch on, and writes of the old one would be refused.
        let epoch = match epoch {
            Ok(e) => Ok(e),
            Err(e) => match self.cluster.refresh(0).await {
                Ok(map) => {
                    let current = map.volumes.get(&self.id).map_or(1, |v| v.write_epoch);
                    self.set_write_epoch(current.max(self.write_epoch()));
                    Err(e)
                }
                Err(_) => Err(e),
            },
        }?;
        self.set_write_epoch(epoch);
        Ok(epoch)
    }

    /// Seals and opens this volume's blocks with `cipher` (an encrypted volume; see
    /// [`crate::crypt`]).
    pub fn with_cipher(mut self, cipher: VolumeCipher) -> Volume {
        self.cipher = Some(Arc::new(cipher));
        self
    }

    /// Fetches the keys again through `reloader` when a block arrives sealed under a key version
    /// the cipher does not hold.
    pub fn with_key_reloader(mut self, reloader: Arc<dyn KeyReloader>) -> Volume {
        self.reloader = Some(reloader);
        self
    }

    /// Before opening `parts`: if a block is sealed under a version the cipher lacks, the keys
    /// are fetched again (once; what still does not open is then an error of its own).
    async fn ensure_keys(&self, parts: &[(Bytes, Bytes)]) -> Result<(), ClientError> {
        let (Some(cipher), Some(reloader)) = (&self.cipher, &self.reloader) else { return Ok(()) };
        let mut known = None;
        for (_, crypt) in parts {
            for ctx in crypt.chunks(CryptContext::LEN).filter_map(CryptContext::get) {
                let v = crate::crypt::block_version(&ctx);
                if known == Some(v) {
                    continue;
                }
                if !cipher.holds(v) {
                    return reloader.reload(v).await;
                }
                known = Some(v);
            }
        }
        Ok(())
    }

    /// True if blocks are sealed here.
    pub fn is_encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    /// True if the cluster map says the volume is encrypted (its blocks are stored sealed),
    /// whether or not this handle holds its keys.
    pub fn stored_sealed(&self) -> bool {
        self.cluster.map().volumes.get(&self.id).is_some_and(|v| v.encrypted)
    }

    fn inflight_kib_total(&self) -> u32 {
        (self.cluster.inner.options.max_inflight_bytes / 1024).max(1) as u32
    }

    /// Sets the attachment epoch this handle's writes carry.
    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Release);
    }

    /// The attachment epoch this handle's writes carry (0: not attached).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The volume id.
    pub fn id(&self) -> VolumeId {
        self.id
    }

    /// The volume name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes as of the last map refresh.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Re-reads the volume's size from the cluster (after a resize).
    pub async fn refresh(&self) -> Result<u64, ClientError> {
        let map = self.cluster.refresh(0).await?;
        let v = map.volumes.get(&self.id).filter(|v| v.active).ok_or(ClientError::VolumeDeleted(self.id))?;
        self.size.store(v.size, Ordering::Release);
        Ok(v.size)
    }

    /// Waits until the cluster map gives the volume a size other than `known`, records it and
    /// returns it: how a running export learns of `basalt volume resize`. Every resize moves
    /// the map on, so this long-polls the map rather than the volume. Fails once the volume
    /// is deleted.
    pub async fn wait_for_resize(&self, known: u64) -> Result<u64, ClientError> {
        const WATCH: Duration = Duration::from_secs(10);
        let mut version = 0;
        loop {
            let map = self.cluster.watch_map(version, WATCH).await;
            let v = map.volumes.get(&self.id).filter(|v| v.active).ok_or(ClientError::VolumeDeleted(self.id))?;
            if v.size != known {
                self.size.store(v.size, Ordering::Release);
                return Ok(v.size);
            }
            if map.version == version {
                // No seed answered (or nothing changed in a whole watch): do not spin.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            version = map.version;
        }
    }

    async fn check_range(&self, op: &'static str, offset: u64, len: u64) -> Result<(), ClientError> {
        let inside = |size: u64| offset.checked_add(len).is_some_and(|end| end <= size);
        if inside(self.size()) {
            return Ok(());
        }
        // Maybe the volume grew since we looked.
        let size = self.refresh().await?;
        if inside(size) {
            return Ok(());
        }
        Err(ClientError::OutOfRange { op, name: self.name.to_string(), offset, len, size })
    }

    fn spans(&self, offset: u64, len: u64) -> Result<Vec<ExtentSpan>, ClientError> {
        let layout = self.cluster.map().layout.ok_or_else(|| ClientError::Admin("the cluster is not initialized".into()))?;
        Ok(layout.split(self.placement, offset, len))
    }

    /// Runs `call` against the leader of `span`'s PG, retrying across leader changes, map
    /// changes and unreachable nodes until it succeeds or the operation deadline passes.
    async fn with_leader<T, F, Fut>(&self, span: &ExtentSpan, mut call: F) -> Result<T, ClientError>
    where
        F: FnMut(String, u64) -> Fut,
        // `Err` is a transport failure: retried like an unreachable node.
        Fut: std::future::Future<Output = Result<Attempt<T>, String>>,
    {
        let opts = &self.cluster.inner.options;
        let deadline = tokio::time::Instant::now() + opts.op_timeout;
        let mut attempts = 0u32;
        let mut rotate = 0usize;
        let mut hints_followed = 0u32;
        // Nodes that failed to answer at all during this request (down, frozen, cut off): the
        // others may still name one as leader until its lease runs out; those hints are ignored.
        let mut silent: Vec<NodeId> = Vec::new();
        let mut backoff = Duration::from_millis(20);
        let mut last = String::from("no attempt made");
        loop {
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Unavailable { volume: self.id, extent: span.extent.0, pg: span.pg.to_string(), attempts, reason: last });
            }
            attempts += 1;
            if attempts.is_multiple_of(MAP_REFRESH_EVERY) {
                // Many failed attempts: the replicas this map lists may have moved on.
                self.refresh_map_in_background();
            }
            let map = self.cluster.map();
            let replicas = map.replicas(span.pg).to_vec();
            if replicas.is_empty() {
                return Err(ClientError::Internal(format!("the cluster map has no replicas for {}", span.pg)));
            }
            let target = match self.cluster.leader_hint(span.pg) {
                Some(l) if !silent.contains(&l) => l,
                _ => replicas[rotate % replicas.len()],
            };
            let Some(addr) = map.addr(target).map(str::to_string) else {
                // A node this map does not know (it joined since the map was fetched, and now
                // leads): fetch a newer map before trying again.
                self.cluster.set_leader_hint(span.pg, None);
                rotate += 1;
                self.refresh_map_in_background();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            };
            let outcome = match tokio::time::timeout(opts.attempt_timeout, call(addr.clone(), map.version)).await {
                Ok(Ok(a)) => a,
                Ok(Err(why)) => {
                    silent.push(target);
                    Attempt::Retry { reason: format!("{target} at {addr}: {why}"), backoff: true }
                }
                Err(_) => {
                    silent.push(target);
                    Attempt::Retry { reason: format!("{target} at {addr}: no answer within {:?}", opts.attempt_timeout), backoff: true }
                }
            };
            match outcome {
                Attempt::Done(v) => {
                    self.cluster.set_leader_hint(span.pg, Some(target));
                    return Ok(v);
                }
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry { reason, backoff: wait } => {
                    last = reason;
                    let hint = self.cluster.leader_hint(span.pg);
                    let wait = if hint.is_some_and(|h| h != target && !silent.contains(&h)) {
                        // The refusal named another leader: go there next. Nodes pointing at
                        // each other (stale views mid-election) get a backoff after a few hops.
                        hints_followed += 1;
                        wait || hints_followed > 2
                    } else {
                        // The target failed: it is not the leader we hoped; try the next replica.
                        self.cluster.set_leader_hint(span.pg, None);
                        rotate += 1;
                        wait
                    };
                    if wait {
                        tokio::time::sleep(backoff).await;
                        // Capped low: during a failover the new leader is usually up within a
                        // few seconds, and a long sleep would add up to itself to the stall.
                        // Each waiting request retries at most 4 times a second.
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
    }

    /// Fetches the cluster map again in the background unless another request's fetch
    /// finishes first; the retrying request goes on meanwhile (a seed may be the node that is
    /// cut off, and waiting for it would add to the stall) and sees the new map when it lands.
    fn refresh_map_in_background(&self) {
        let seen = self.cluster.fetch_count();
        let cluster = self.cluster.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(MAP_REFRESH_WAIT, cluster.refresh_unless_fetched(seen)).await;
        });
    }

    /// The data connection to `addr`; `Err` ends the attempt: a connection failure is retried,
    /// refused credentials fail the request.
    async fn connect<T>(&self, span: &ExtentSpan, addr: &str, retries: &AtomicU32) -> Result<Arc<DataConn>, Result<Attempt<T>, String>> {
        match self.cluster.data_conn(addr).await {
            Ok(c) => Ok(c),
            Err(ConnectError::Failed(e)) => Err(Err(e)),
            Err(ConnectError::Denied(e)) => Err(Ok(self.on_error(span, addr, e, retries).await)),
        }
    }

    /// Interprets a node's refusal.
    async fn on_error<T>(&self, span: &ExtentSpan, node: &str, e: DataError, retries: &AtomicU32) -> Attempt<T> {
        let code = Code::try_from(e.code).unwrap_or(Code::Internal);
        let reason = format!("{node}: {}", e.message);
        match code {
            Code::NotLeader => {
                if e.leader != 0 {
                    self.cluster.set_leader_hint(span.pg, Some(NodeId(e.leader)));
                    // Go straight to the named leader.
                    return Attempt::Retry { reason, backoff: false };
                }
                Attempt::Retry { reason, backoff: true }
            }
            Code::WrongNode => {
                let _ = self.cluster.refresh(0).await;
                Attempt::Retry { reason, backoff: true }
            }
            Code::Unavailable => Attempt::Retry { reason, backoff: true },
            Code::NoSuchVolume => {
                if retries.fetch_add(1, Ordering::Relaxed) >= 2 {
                    return Attempt::Fail(ClientError::VolumeDeleted(self.id));
                }
                let _ = self.cluster.refresh(0).await;
                Attempt::Retry { reason, backoff: true }
            }
            Code::BadChecksum => {
                if retries.fetch_add(1, Ordering::Relaxed) >= 3 {
                    return Attempt::Fail(ClientError::Corrupt(format!(
                        "{} extent {}: data kept arriving corrupted: {reason}",
                        self.id, span.extent.0
                    )));
                }
                Attempt::Retry { reason, backoff: false }
            }
            Code::Corrupt => Attempt::Fail(ClientError::Corrupt(format!("{} extent {}: {reason}", self.id, span.extent.0))),
            Code::NoSpace => Attempt::Fail(ClientError::NoSpace(reason)),
            Code::Fenced => Attempt::Fail(ClientError::Fenced(reason)),
            Code::Unauthenticated => Attempt::Fail(ClientError::Unauthenticated(reason)),
            Code::PermissionDenied => Attempt::Fail(ClientError::PermissionDenied(reason)),
            Code::OutOfRange => Attempt::Fail(ClientError::OutOfRange {
                op: "I/O",
                name: self.name.to_string(),
                offset: span.offset,
                len: span.len,
                size: self.size(),
            }),
            // `Changed` is internal to the integrity scrub and never answers a client.
            Code::Invalid | Code::Internal | Code::Unspecified | Code::Changed => Attempt::Fail(ClientError::Internal(reason)),
        }
    }

    /// Writes `data` at `offset`. Returns once the data is durable on a majority of each
    /// affected PG's replicas (so FUA is always satisfied; `_fua` exists for callers that pass
    /// it through).
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ClientError> {
        let (started, len) = (std::time::Instant::now(), data.len() as u64);
        let r = self.write_unmeasured(offset, data, fua).await;
        self.measured(crate::metrics::VolumeOp::Write, len, started, r)
    }

    async fn write_unmeasured(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), ClientError> {
        if data.is_empty() {
            return Ok(());
        }
        self.writable().await?;
        self.check_range("write", offset, data.len() as u64).await?;
        let _permit = self.inflight.acquire().await.map_err(|_| ClientError::Internal("client closed".into()))?;
        // Read under the permit: a snapshot cut holds every permit while it moves the epoch.
        let write_epoch = self.write_epoch();
        let kib = (data.len().div_ceil(1024) as u32).min(self.inflight_kib_total());
        let _bytes = self.inflight_kib.acquire_many(kib).await.map_err(|_| ClientError::Internal("client closed".into()))?;
        if let Some(cipher) = &self.cipher {
            return self.write_sealed(cipher, offset, data, write_epoch).await;
        }
        let spans = self.spans(offset, data.len() as u64)?;
        try_join_all(spans.iter().map(|span| {
            let piece = data.slice(span.buf_offset as usize..(span.buf_offset + span.len) as usize);
            let crcs = piece_crcs(span.offset, &piece);
            self.write_span(span, piece, crcs, Bytes::new(), write_epoch)
        }))
        .await?;
        Ok(())
    }

    /// An encrypted volume's write: whole blocks, sealed here. A partial block is read, opened
    /// and merged first (the nodes hold only ciphertext and cannot).
    async fn write_sealed(&self, cipher: &VolumeCipher, offset: u64, data: Bytes, write_epoch: u64) -> Result<(), ClientError> {
        let bs = BLOCK_SIZE;
        let end = offset + data.len() as u64;
        let (start, stop) = (offset / bs * bs, end.div_ceil(bs) * bs);
        let (first, last) = (start / bs, stop / bs);
        let partial = start != offset || stop != end;
        let _exclusive = if partial { Some(self.stripes.exclusive(first, last).await) } else { None };
        let _shared = if partial { None } else { Some(self.stripes.shared(first, last).await) };
        // The one copy of the payload: sealing works in place.
        let mut buf = BytesMut::zeroed((stop - start) as usize);
        if start != offset {
            buf[..bs as usize].copy_from_slice(&self.read_opened(cipher, start, bs).await?);
        }
        // The tail block, unless it is the head block just read.
        if stop != end && !(start != offset && stop - bs == start) {
            let at = (stop - bs - start) as usize;
            buf[at..].copy_from_slice(&self.read_opened(cipher, stop - bs, bs).await?);
        }
        buf[(offset - start) as usize..(end - start) as usize].copy_from_slice(&data);
        let contexts = cipher.seal(self.epoch(), first, &mut buf)?;
        let buf = buf.freeze();
        let spans = self.spans(start, stop - start)?;
        try_join_all(spans.iter().map(|span| {
            let piece = buf.slice(span.buf_offset as usize..(span.buf_offset + span.len) as usize);
            let crcs = piece_crcs(span.offset, &piece);
            let b0 = (span.buf_offset / bs) as usize;
            let crypt = CryptContext::encode_all(&contexts[b0..b0 + (span.len / bs) as usize].iter().copied().map(Some).collect::<Vec<_>>());
            self.write_span(span, piece, crcs, crypt.into(), write_epoch)
        }))
        .await?;
        Ok(())
    }

    /// Moves blocks `[first, first + count)` sealed under an older key version to the current
    /// one (a re-encryption): reads them, opens them, seals them again and writes back only
    /// those, holding their stripes exclusively meanwhile so no write lands between the read
    /// and the write-back. Unwritten blocks stay unwritten. Returns how many blocks moved.
    pub async fn reseal(&self, first: u64, count: u64) -> Result<u64, ClientError> {
        let Some(cipher) = &self.cipher else {
            return Err(ClientError::Crypt(format!("volume {} is not encrypted: nothing to re-encrypt", self.name)));
        };
        let bs = BLOCK_SIZE;
        self.writable().await?;
        self.check_range("re-encrypt", first * bs, count * bs).await?;
        // The permit before the stripes, as writes take them: a snapshot cut waiting for every
        // permit must not sit between a writer holding one and the stripes it waits for.
        let _permit = self.inflight.acquire().await.map_err(|_| ClientError::Internal("client closed".into()))?;
        let write_epoch = self.write_epoch();
        let _exclusive = self.stripes.exclusive(first, first + count).await;
        let spans = self.spans(first * bs, count * bs)?;
        let parts = try_join_all(spans.iter().map(|s| self.read_span(s))).await?;
        let current = cipher.current_version();
        let mut writes = Vec::new();
        for (span, (data, crypt)) in spans.iter().zip(parts) {
            if crypt.is_empty() {
                continue;
            }
            let blocks = data.len() / bs as usize;
            let contexts = CryptContext::decode_all(&crypt, blocks)
                .ok_or_else(|| ClientError::Internal(format!("{}: malformed encryption contexts in a read reply", self.id)))?;
            let stale = |i: usize| contexts[i].is_some_and(|c| crate::crypt::block_version(&c) != current);
            let mut i = 0;
            while i < blocks {
                if !stale(i) {
                    i += 1;
                    continue;
                }
                let run = i;
                while i < blocks && stale(i) {
                    i += 1;
                }
                let (offset, len) = (span.offset + run as u64 * bs, (i - run) as u64 * bs);
                let mut buf = BytesMut::from(&data[run * bs as usize..i * bs as usize]);
                cipher.open(offset / bs, &mut buf, &contexts[run..i])?;
                let sealed = cipher.seal(self.epoch(), offset / bs, &mut buf)?;
                let buf = buf.freeze();
                let crcs = piece_crcs(offset, &buf);
                let crypt = CryptContext::encode_all(&sealed.into_iter().map(Some).collect::<Vec<_>>());
                let piece = ExtentSpan { offset, len, buf_offset: 0, ..*span };
                writes.push((piece, buf, crcs, Bytes::from(crypt)));
            }
        }
        let moved = writes.iter().map(|(p, ..)| p.len / bs).sum();
        try_join_all(writes.into_iter().map(|(piece, buf, crcs, crypt)| async move { self.write_span(&piece, buf, crcs, crypt, write_epoch).await }))
            .await?;
        Ok(moved)
    }

    /// The cipher, if the volume is encrypted.
    pub fn cipher(&self) -> Option<&Arc<VolumeCipher>> {
        self.cipher.as_ref()
    }

    /// Whole blocks read and opened (for a partial-block write's merge).
    async fn read_opened(&self, cipher: &VolumeCipher, start: u64, len: u64) -> Result<Bytes, ClientError> {
        let spans = self.spans(start, len)?;
        let parts = try_join_all(spans.iter().map(|s| self.read_span(s))).await?;
        self.ensure_keys(&parts).await?;
        self.assemble_opened(Some(cipher), start, len, parts)
    }

    async fn write_span(&self, span: &ExtentSpan, data: Bytes, crcs: Vec<u32>, crypt: Bytes, write_epoch: u64) -> Result<(), ClientError> {
        let retries = AtomicU32::new(0);
        self.with_leader(span, |addr, map_version| {
            let req = WriteRequest {
                pg: span.pg.0,
                volume_id: self.id.0,
                offset: span.offset,
                data: data.clone(),
                crcs: crcs.clone(),
                fua: true,
                map_version,
                attach_epoch: self.epoch(),
                session: 0,
                connection: 0,
                crypt: crypt.clone(),
                write_epoch,
            };
            let retries = &retries;
            async move {
                let conn = match self.connect(span, &addr, retries).await {
                    Ok(c) => c,
                    Err(attempt) => return attempt,
                };
                let req = WriteRequest { session: conn.session, connection: conn.number, ..req };
                let reply: WriteReply = conn.call(Kind::Write, Kind::WriteReply, &req).await?;
                Ok(match reply.error {
                    None => Attempt::Done(()),
                    Some(e) => self.on_error(span, &addr, e, retries).await,
                })
            }
        })
        .await
    }

    /// Reads `len` bytes at `offset`. Every 4 KiB block is verified against the crc32c stored
    /// with it; a mismatch is an error, never returned as data.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes, ClientError> {
        let started = std::time::Instant::now();
        let r = self.read_unmeasured(offset, len).await;
        self.measured(crate::metrics::VolumeOp::Read, len, started, r)
    }

    async fn read_unmeasured(&self, offset: u64, len: u64) -> Result<Bytes, ClientError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        self.check_range("read", offset, len).await?;
        let _permit = self.inflight.acquire().await.map_err(|_| ClientError::Internal("client closed".into()))?;
        // Nodes serve whole blocks: widen to block boundaries, trim after.
        let start = offset / BLOCK_SIZE * BLOCK_SIZE;
        let end = (offset + len).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        let spans = self.spans(start, end - start)?;
        let parts = try_join_all(spans.iter().map(|s| self.read_span(s))).await?;
        self.ensure_keys(&parts).await?;
        let data = self.assemble_opened(self.cipher.as_deref(), start, end - start, parts)?;
        let rel = (offset - start) as usize;
        Ok(data.slice(rel..rel + len as usize))
    }

    /// Whole blocks at `offset` as stored, without opening them: the ciphertext and each
    /// block's encryption context (`None`: unwritten or zeroed, reads as zeros). What a backup
    /// node copies of an encrypted volume: the backup tier holds no key.
    pub async fn read_sealed(&self, offset: u64, len: u64) -> Result<(Bytes, Vec<Option<CryptContext>>), ClientError> {
        let bs = BLOCK_SIZE;
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(ClientError::Internal(format!("{}: a sealed read takes whole blocks, not {len} bytes at {offset}", self.name)));
        }
        if len == 0 {
            return Ok((Bytes::new(), Vec::new()));
        }
        self.check_range("read", offset, len).await?;
        let _permit = self.inflight.acquire().await.map_err(|_| ClientError::Internal("client closed".into()))?;
        let spans = self.spans(offset, len)?;
        let parts = try_join_all(spans.iter().map(|s| self.read_span(s))).await?;
        let (buf, contexts) = self.join_sealed(len, parts)?;
        Ok((buf.freeze(), contexts))
    }

    /// Joins the spans of a read of whole blocks (`len` bytes) as stored, with each block's
    /// encryption context (`None` where a span carried none).
    fn join_sealed(&self, len: u64, parts: Vec<(Bytes, Bytes)>) -> Result<(BytesMut, Vec<Option<CryptContext>>), ClientError> {
        let mut buf = BytesMut::with_capacity(len as usize);
        let mut contexts = Vec::with_capacity((len / BLOCK_SIZE) as usize);
        for (d, c) in parts {
            let blocks = d.len() / BLOCK_SIZE as usize;
            if c.is_empty() {
                contexts.extend(std::iter::repeat_n(None, blocks));
            } else {
                contexts.extend(
                    CryptContext::decode_all(&c, blocks)
                        .ok_or_else(|| ClientError::Internal(format!("{}: malformed encryption contexts in a read reply", self.id)))?,
                );
            }
            buf.extend_from_slice(&d);
        }
        Ok((buf, contexts))
    }

    /// Writes whole blocks sealed elsewhere, each with its context, as they are (a restore of
    /// an encrypted volume's backup: the ciphertext never opens on the way). A block without a
    /// context must be zeros and is skipped: in the new volume it reads as zeros already.
    pub async fn write_presealed(&self, offset: u64, data: Bytes, contexts: &[Option<CryptContext>]) -> Result<(), ClientError> {
        let bs = BLOCK_SIZE as usize;
        if !(offset as usize).is_multiple_of(bs) || !data.len().is_multiple_of(bs) || contexts.len() != data.len() / bs {
            return Err(ClientError::Internal(format!(
                "{}: a sealed write takes whole blocks with one context each ({} bytes at {offset}, {} contexts)",
                self.name,
                data.len(),
                contexts.len()
            )));
        }
        if let Some(i) = (0..contexts.len()).find(|i| contexts[*i].is_none() && data[i * bs..(i + 1) * bs].iter().any(|b| *b != 0)) {
            return Err(ClientError::Internal(format!(
                "{}: block {} carries data but no encryption context",
                self.name,
                offset / BLOCK_SIZE + i as u64
            )));
        }
        self.writable().await?;
        self.check_range("write", offset, data.len() as u64).await?;
        let _permit = self.inflight.acquire().await.map_err(|_| ClientError::Internal("client closed".into()))?;
        let write_epoch = self.write_epoch();
        let mut writes = Vec::new();
        let mut i = 0;
        while i < contexts.len() {
            if contexts[i].is_none() {
                i += 1;
                continue;
            }
            let run = i;
            while i < contexts.len() && contexts[i].is_some() {
                i += 1;
            }
            let at = offset + (run * bs) as u64;
            for span in self.spans(at, ((i - run) * bs) as u64)? {
                let from = run * bs + span.buf_offset as usize;
                let piece = data.slice(from..from + span.len as usize);
                let b0 = from / bs;
                let crypt = CryptContext::encode_all(&contexts[b0..b0 + span.len as usize / bs]);
                writes.push((span, piece, Bytes::from(crypt)));
            }
        }
        try_join_all(writes.into_iter().map(|(span, piece, crypt)| async move {
            let crcs = piece_crcs(span.offset, &piece);
            self.write_span(&span, piece, crcs, crypt, write_epoch).await
        }))
        .await?;
        Ok(())
    }

    /// The chunks of the snapshot this handle reads that hold data, each with the version it
    /// resolves to — `(chunk index, owner volume, epoch)`, in chunk order — asked of the leader
    /// of every PG the volume's extents live in. A version is never rewritten once a snapshot
    /// froze it, so an incremental backup reads only chunks whose version it has not copied.
    /// Refused on a handle of the volume's head, whose versions move.
    pub async fn chunk_versions(&self) -> Result<Vec<(u64, VolumeId, u64)>, ClientError> {
        let Some((_, epoch)) = self.snapshot.clone() else {
            return Err(ClientError::Invalid(format!("chunk versions are listed for snapshots; {} is the volume's head", self.name)));
        };
        self.list_chunks(epoch, 0, self.size()).await
    }

    /// The chunks overlapping `len` bytes at `offset` that hold data, as the volume is now (or
    /// as this handle's snapshot froze it): what NBD block status reports as data; the rest
    /// reads as zeros.
    pub async fn allocated_chunks(&self, offset: u64, len: u64) -> Result<std::collections::BTreeSet<u64>, ClientError> {
        self.check_range("block status", offset, len).await?;
        let epoch = self.snapshot.as_ref().map_or(0, |(_, e)| *e);
        Ok(self.list_chunks(epoch, offset, len).await?.into_iter().map(|(chunk, _, _)| chunk).collect())
    }

    /// Asks each PG leader holding part of `len` bytes at `offset` which of those chunks hold
    /// data at `epoch` (0: now), one request per PG.
    async fn list_chunks(&self, epoch: u64, offset: u64, len: u64) -> Result<Vec<(u64, VolumeId, u64)>, ClientError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        // Per PG: a span to route by, and the chunks its extents in the range cover.
        let mut by_pg: std::collections::BTreeMap<basalt_common::PgId, (ExtentSpan, u64, u64)> = std::collections::BTreeMap::new();
        for span in self.spans(offset, len)? {
            let (first, end) = (span.offset / CHUNK_SIZE, (span.offset + span.len).div_ceil(CHUNK_SIZE));
            let e = by_pg.entry(span.pg).or_insert((span, first, end));
            e.1 = e.1.min(first);
            e.2 = e.2.max(end);
        }
        let token = self.cluster.inner.options.security.token.clone();
        let lists = try_join_all(by_pg.values().map(|(span, first, end)| {
            let token = token.clone();
            async move {
                let retries = AtomicU32::new(0);
                self.with_leader(span, |addr, map_version| {
                    let req = ChunkVersionsRequest {
                        pg: span.pg.0,
                        volume_id: self.id.0,
                        snapshot_epoch: epoch,
                        map_version,
                        first_chunk: *first,
                        end_chunk: *end,
                    };
                    let (retries, token) = (&retries, token.clone());
                    async move {
                        let channel = self.cluster.channel(&addr).map_err(|e| e.to_string())?;
                        let mut client = DataClient::with_interceptor(channel, basalt_security::grpc::Bearer::new(token.as_ref()))
                            .max_decoding_message_size(basalt_proto::MAX_MESSAGE_BYTES);
                        let reply = match client.chunk_versions(req).await {
                            Ok(r) => r.into_inner(),
                            Err(s) if s.code() == tonic::Code::Unauthenticated => {
                                return Ok(Attempt::Fail(ClientError::Unauthenticated(s.message().to_string())));
                            }
                            Err(s) if s.code() == tonic::Code::PermissionDenied => {
                                return Ok(Attempt::Fail(ClientError::PermissionDenied(s.message().to_string())));
                            }
                            Err(s) => return Err(s.message().to_string()),
                        };
                        if let Some(e) = reply.error {
                            return Ok(self.on_error(span, &addr, e, retries).await);
                        }
                        Ok(Attempt::Done(reply.chunks))
                    }
                })
                .await
            }
        }))
        .await?;
        let mut out: Vec<(u64, VolumeId, u64)> = lists.into_iter().flatten().map(|c| (c.chunk, VolumeId(c.owner), c.epoch)).collect();
        out.sort_unstable();
        out.dedup_by_key(|c| c.0);
        Ok(out)
    }

    /// Joins the spans of a read of whole blocks at `start`, opening them if the volume is
    /// encrypted. Sealed blocks without a cipher are refused, never returned as data.
    fn assemble_opened(&self, cipher: Option<&VolumeCipher>, start: u64, len: u64, parts: Vec<(Bytes, Bytes)>) -> Result<Bytes, ClientError> {
        let sealed = parts.iter().any(|(_, c)| !c.is_empty());
        let Some(cipher) = cipher else {
            if sealed {
                return Err(ClientError::Crypt(format!(
                    "volume {} ({}) holds encrypted blocks: open it with its key-encryption key (--kek-file)",
                    self.name, self.id
                )));
            }
            if parts.len() == 1 {
                return Ok(parts.into_iter().next().map(|(d, _)| d).unwrap_or_default());
            }
            let mut buf = BytesMut::with_capacity(len as usize);
            for (d, _) in parts {
                buf.extend_from_slice(&d);
            }
            return Ok(buf.freeze());
        };
        let (mut buf, contexts) = self.join_sealed(len, parts)?;
        cipher.open(start / BLOCK_SIZE, &mut buf, &contexts)?;
        Ok(buf.freeze())
    }

    /// One span's blocks as stored, and their encryption contexts as sent (empty if none).
    async fn read_span(&self, span: &ExtentSpan) -> Result<(Bytes, Bytes), ClientError> {
        let retries = AtomicU32::new(0);
        self.with_leader(span, |addr, map_version| {
            let req = ReadRequest {
                pg: span.pg.0,
                volume_id: self.id.0,
                offset: span.offset,
                length: span.len as u32,
                map_version,
                snapshot_epoch: self.snapshot.as_ref().map_or(0, |(_, e)| *e),
            };
            let retries = &retries;
            async move {
                let conn = match self.connect(span, &addr, retries).await {
                    Ok(c) => c,
                    Err(attempt) => return attempt,
                };
                let reply: ReadReply = conn.call(Kind::Read, Kind::ReadReply, &req).await?;
                if let Some(e) = reply.error {
                    return Ok(self.on_error(span, &addr, e, retries).await);
                }
                if reply.data.len() as u64 != span.len || reply.crcs.len() as u64 != span.len / BLOCK_SIZE {
                    return Ok(Attempt::Retry { reason: format!("{addr}: short read reply"), backoff: true });
                }
                for (i, (block, crc)) in reply.data.chunks(BLOCK_SIZE as usize).zip(&reply.crcs).enumerate() {
                    let actual = crc32c(block);
                    if actual != *crc {
                        let exhausted = retries.fetch_add(1, Ordering::Relaxed) >= 3;
                        let msg = format!(
                            "{} extent {} offset {}: block from {addr} fails its checksum (crc {actual:#010x}, stored {crc:#010x})",
                            self.id,
                            span.extent.0,
                            span.offset + i as u64 * BLOCK_SIZE
                        );
                        if exhausted {
                            return Ok(Attempt::Fail(ClientError::Corrupt(msg)));
                        }
                        return Ok(Attempt::Retry { reason: msg, backoff: false });
                    }
                }
                Ok(Attempt::Done((reply.data, reply.crypt)))
            }
        })
        .await
    }

    /// Every acknowledged write is already durable on a majority: nothing is buffered here.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.measured(crate::metrics::VolumeOp::Flush, 0, std::time::Instant::now(), Ok(()))
    }

    /// Discards `[offset, offset+len)`: it reads as zeros, its space is released where whole
    /// chunks are covered and overwritten otherwise.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        let started = std::time::Instant::now();
        let r = self.zero(offset, len, false).await;
        self.measured(crate::metrics::VolumeOp::Trim, len, started, r)
    }

    /// Writes zeros over `[offset, offset+len)`; `keep_allocated` keeps the space reserved (NBD
    /// `NO_HOLE`).
    pub async fn write_zeroes(&self, offset: u64, len: u64, keep_allocated: bool) -> Result<(), ClientError> {
        let started = std::time::Instant::now();
        let r = self.zero(offset, len, keep_allocated).await;
        self.measured(crate::metrics::VolumeOp::Zero, len, started, r)
    }

    async fn zero(&self, offset: u64, len: u64, keep_allocated: bool) -> Result<(), ClientError> {
        if len == 0 {
            return Ok(());
        }
        self.writable().await?;
        self.check_range("zero", offset, len).await?;
        if self.cipher.is_some() {
            // Nodes cannot zero part of a sealed block: partial blocks are written here as
            // sealed zeros, whole blocks zeroed by the nodes (and read back as zeros).
            let bs = BLOCK_SIZE;
            let end = offset + len;
            let (inner, inner_end) = (offset.div_ceil(bs) * bs, end / bs * bs);
            if inner >= inner_end {
                return self.write_unmeasured(offset, Bytes::from(vec![0u8; len as usize]), false).await;
            }
            if offset < inner {
                self.write_unmeasured(offset, Bytes::from(vec![0u8; (inner - offset) as usize]), false).await?;
            }
            if inner_end < end {
                self.write_unmeasured(inner_end, Bytes::from(vec![0u8; (end - inner_end) as usize]), false).await?;
            }
            let _shared = self.stripes.shared(inner / bs, inner_end / bs).await;
            return self.zero_blocks(inner, inner_end - inner, keep_allocated).await;
        }
        self.zero_blocks(offset, len, keep_allocated).await
    }

    async fn zero_blocks(&self, offset: u64, len: u64, keep_allocated: bool) -> Result<(), ClientError> {
        let _permit = self.inflight.acquire().await.map_err(|_| ClientError::Internal("client closed".into()))?;
        let write_epoch = self.write_epoch();
        let spans = self.spans(offset, len)?;
        try_join_all(spans.iter().map(|span| async move {
            let retries = AtomicU32::new(0);
            self.with_leader(span, |addr, map_version| {
                let req = ZeroRequest {
                    pg: span.pg.0,
                    volume_id: self.id.0,
                    offset: span.offset,
                    length: span.len,
                    keep_allocated,
                    map_version,
                    attach_epoch: self.epoch(),
                    session: 0,
                    connection: 0,
                    write_epoch,
                };
                let retries = &retries;
                async move {
                    let conn = match self.connect(span, &addr, retries).await {
                        Ok(c) => c,
                        Err(attempt) => return attempt,
                    };
                    let req = ZeroRequest { session: conn.session, connection: conn.number, ..req };
                    let reply: ZeroReply = conn.call(Kind::Zero, Kind::ZeroReply, &req).await?;
                    Ok(match reply.error {
                        None => Attempt::Done(()),
                        Some(e) => self.on_error(span, &addr, e, retries).await,
                    })
                }
            })
            .await
        }))
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_crcs_cut_at_block_boundaries() {
        let data = vec![7u8; 5000];
        let c = piece_crcs(4000, &data);
        assert_eq!(c.len(), 3);
        assert_eq!(c[0], crc32c(&data[..96]));
        assert_eq!(c[1], crc32c(&data[96..96 + 4096]));
        assert_eq!(c[2], crc32c(&data[96 + 4096..]));
        assert_eq!(piece_crcs(0, &[1u8; 8192]).len(), 2);
    }
}
