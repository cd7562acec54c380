//! The data API a volume client talks to: writes, reads and zeroing on placement-group
//! leaders, and the internal release of a deleted volume's data.
//!
//! Every request is checked against this node's cluster map before it reaches Raft: the PG
//! must be hosted here, the volume active, its requester allowed to read or write it, the range
//! inside the volume and inside one extent of that PG, the payload consistent with its
//! checksums. Refusals travel as a [`DataError`] with a code the client acts on (retry
//! elsewhere, refresh the map, give up). The internal calls (release, checks, repairs, moves,
//! leader hand-overs) are for nodes only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use basalt_chunk_store::ChunkStoreError;
use basalt_common::{BLOCK_SIZE, CHUNK_SIZE, CryptContext, ExtentIndex, PgId, VolumeId, crc32c};
use basalt_proto::data::data_error::Code;
use basalt_proto::data::data_server::Data;
use basalt_proto::data::{
    ChunkCheckReply, ChunkCheckRequest, DataError, MoveReplicaReply, MoveReplicaRequest, ReadReply, ReadRequest, ReleaseVolumeReply,
    ReleaseVolumeRequest, RepairChunkReply, RepairChunkRequest, TransferLeaderReply, TransferLeaderRequest, WriteReply, WriteRequest, ZeroReply,
    ZeroRequest,
};
use basalt_proto::data::{ChunkVersion, ChunkVersionsReply, ChunkVersionsRequest, EpochBytes, VolumeUsageReply, VolumeUsageRequest};
use basalt_raft::RaftError;
use basalt_scrubber::ChunkVerdict;
use basalt_security::{Action, Principal};
use tonic::{Request, Response, Status};

use super::command::{PgCommand, PgReply, piece_count, pieces};
use super::manager::PgHandle;
use super::repair;
use super::sessions::Sessions;
use super::space::SpaceAdmission;
use super::wire::denied_error;
use crate::access::Access;
use crate::cluster_map::wait_for_version;
use crate::metrics::Op;
use crate::node::NodeCtx;

/// Largest single request.
pub const MAX_IO: u64 = 32 * 1024 * 1024;

/// Payload (KiB) of requests held by QoS at once on a node: throttled writes are held before
/// they take a share of the node's in-flight budget (so they do not slow other volumes), and
/// this bounds the memory they keep meanwhile.
const QOS_HELD_KIB: u32 = 256 * 1024;

/// A refusal with `code` (no leader hint).
pub(crate) fn err(code: Code, message: impl Into<String>) -> DataError {
    DataError { code: code as i32, message: message.into(), leader: 0, leader_addr: String::new() }
}

/// Of nodes, only backup-role ones read and write blocks as clients (copying snapshots out,
/// restoring backups in), and a backup node writes only into a volume it is restoring; a
/// storage or meta node's certificate opens no volume.
fn backup_node_only(
    view: &basalt_proto::view::ClusterView,
    principal: &Principal,
    volume: &basalt_proto::view::VolumeView,
    write: bool,
) -> Result<(), DataError> {
    match principal {
        Principal::Node(id) if !view.nodes.get(&basalt_common::NodeId(*id)).is_some_and(|n| n.backup) => {
            Err(err(Code::PermissionDenied, format!("node-{id} is not a backup node; nodes read and write volumes only for the backup tier")))
        }
        Principal::Node(id) if write && volume.restored_by != Some(basalt_common::NodeId(*id)) => {
            Err(err(Code::PermissionDenied, format!("node-{id} writes only into volumes it is restoring a backup into; {} is not one", volume.name)))
        }
        _ => Ok(()),
    }
}

/// Who sent a data request: the principal its connection authenticated as, and from where.
pub struct Requester {
    /// The principal.
    pub principal: Principal,
    /// The connection's peer.
    pub peer: SocketAddr,
}

/// The data gRPC service.
pub struct DataService {
    ctx: Arc<NodeCtx>,
    access: Arc<Access>,
    /// Write payload admitted and not yet answered, in KiB units: the node's memory for
    /// in-flight data is bounded by configuration, not by how hard clients push.
    inflight: Arc<tokio::sync::Semaphore>,
    /// Chunk space promised to writes in flight (`pg::space`).
    space: Arc<SpaceAdmission>,
    /// Each client session's newest connection (`pg::sessions`).
    sessions: Sessions,
    /// Payload of the requests QoS holds (KiB, [`QOS_HELD_KIB`]).
    qos_held: tokio::sync::Semaphore,
}

impl DataService {
    /// A service over the node's PGs, admitting what `access` allows.
    pub fn new(ctx: Arc<NodeCtx>, access: Arc<Access>) -> Self {
        let kib = (ctx.config.memory.inflight_writes / 1024).max(1);
        Self {
            ctx,
            access,
            inflight: Arc::new(tokio::sync::Semaphore::new(kib)),
            space: Arc::default(),
            sessions: Sessions::default(),
            qos_held: tokio::sync::Semaphore::new(QOS_HELD_KIB as usize),
        }
    }

    /// The requester of a gRPC data call (the framed protocol authenticates once per connection).
    async fn grpc_requester<T>(&self, request: &Request<T>) -> Result<Requester, Status> {
        // What the caller may do with which volume is decided per request, in `route`.
        let caller = self.access.authenticate(request, Action::DataRead, None).await?;
        let peer = request.remote_addr().or_else(|| request.extensions().get::<basalt_security::PeerInfo>().map(|p| p.addr));
        Ok(Requester { principal: caller.principal, peer: peer.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))) })
    }

    /// Holds a request of `bytes` to volume `volume`'s QoS limits (a share of them on this
    /// node, `crate::qos`; at most `qos::MAX_HOLD`); returns at once for an unlimited volume.
    /// Held payload is bounded node-wide (`qos_held`): past it, requests wait to be held.
    async fn throttle(&self, volume: u64, bytes: u64) {
        let (limits, storage_nodes) = {
            let view = self.ctx.map.borrow();
            let Some(limits) = view.volumes.get(&VolumeId(volume)).map(|v| v.qos).filter(|q| !q.is_unlimited()) else { return };
            let nodes: std::collections::BTreeSet<_> = view.pgs.iter().flatten().copied().collect();
            (limits, nodes.len().max(1) as u32)
        };
        let kib = bytes.div_ceil(1024).clamp(1, u64::from(u32::MAX)) as u32;
        let Ok(_held) = self.qos_held.acquire_many(kib.min(QOS_HELD_KIB)).await else { return };
        let waited = self.ctx.metrics.qos.admit(VolumeId(volume), limits, bytes, storage_nodes).await;
        if !waited.is_zero() && self.ctx.map.borrow().per_volume_metrics {
            self.ctx.metrics.per_volume.throttled(VolumeId(volume), waited);
        }
    }

    fn raft_error(&self, e: RaftError) -> DataError {
        match e {
            RaftError::NotLeader { leader, ref leader_addr, .. } => {
                let leader_addr = leader_addr.clone();
                let addr =
                    leader.and_then(|l| self.ctx.map.borrow().addr(basalt_common::NodeId(l)).map(str::to_string)).or(leader_addr).unwrap_or_default();
                DataError { code: Code::NotLeader as i32, message: e.to_string(), leader: leader.unwrap_or(0), leader_addr: addr }
            }
            RaftError::Unavailable { .. } | RaftError::Stopped { .. } => err(Code::Unavailable, format!("{e} (on {})", self.ctx.config.id)),
            other => err(Code::Internal, format!("{other} (on {})", self.ctx.config.id)),
        }
    }

    /// Finds the PG and checks the request against the cluster map and `who` may do it. `epoch`
    /// is the writer's attachment epoch (`None` for reads): a writer older than the volume's
    /// current attachment is fenced here already, before its write reaches the log.
    #[allow(clippy::too_many_arguments)]
    async fn route(
        &self,
        who: &Requester,
        pg: u32,
        volume: u64,
        offset: u64,
        len: u64,
        map_version: u64,
        epoch: Option<u64>,
    ) -> Result<(PgHandle, Vec<(VolumeId, u64)>), DataError> {
        let node = self.ctx.config.id;
        let Some(handle) = self.ctx.pgs.get(PgId(pg)) else {
            return Err(err(Code::WrongNode, format!("{node} holds no replica of pg-{pg}")));
        };
        let mut view = self.ctx.map.borrow().clone();
        if view.version < map_version {
            // The client saw a newer map (a volume just created or grown): catch up first.
            // Kept under the client's 3 s stall watchdog, which would retry meanwhile.
            view = wait_for_version(&self.ctx, map_version, Duration::from_secs(2)).await;
        }
        let Some(layout) = view.layout else {
            return Err(err(Code::Unavailable, format!("{node} has no cluster map yet")));
        };
        let Some(vol) = view.volumes.get(&VolumeId(volume)).filter(|v| v.active) else {
            return Err(err(Code::NoSuchVolume, format!("no active volume with id {volume}")));
        };
        self.access.check_data(&who.principal, who.peer, epoch.is_some(), &vol.name).map_err(|d| denied_error(&d))?;
        backup_node_only(&view, &who.principal, vol, epoch.is_some())?;
        if let Some(epoch) = epoch
            && epoch < vol.attach_epoch
        {
            return Err(err(
                Code::Fenced,
                format!("volume {:?} was attached again (epoch {}); writes of epoch {epoch} are refused", vol.name, vol.attach_epoch),
            ));
        }
        if len == 0 {
            return Err(err(Code::Invalid, "zero-length request"));
        }
        let end = offset.checked_add(len).ok_or_else(|| err(Code::OutOfRange, "offset + length overflows"))?;
        if end > vol.size {
            return Err(err(Code::OutOfRange, format!("range {offset}..{end} is beyond the end of volume {:?} ({} bytes)", vol.name, vol.size)));
        }
        let first = offset / layout.extent_size;
        if (end - 1) / layout.extent_size != first {
            return Err(err(Code::Invalid, format!("range {offset}..{end} crosses an extent boundary; split it per extent")));
        }
        // A clone's extents are placed like its root ancestor's, so what it inherits is local.
        let owner = layout.pg_of(vol.placement, ExtentIndex(first));
        if owner.0 != pg {
            return Err(err(Code::Invalid, format!("extent {first} of volume {volume} belongs to {owner}, not pg-{pg}")));
        }
        Ok((handle, vol.lineage.clone()))
    }

    /// Checks a write's snapshot write epoch against the map: 0 is no epoch (an old client);
    /// one below the volume's current epoch was issued before a snapshot cut (the holder
    /// drains its writes before it cuts, so only a fenced writer's could arrive now).
    fn check_write_epoch(&self, volume: u64, write_epoch: u64) -> Result<(), DataError> {
        if write_epoch == 0 {
            return Err(err(Code::Invalid, "a write must carry the volume's snapshot write epoch (write_epoch); this client is too old"));
        }
        let current = self.ctx.map.borrow().volumes.get(&VolumeId(volume)).map_or(1, |v| v.write_epoch);
        if write_epoch < current {
            return Err(err(
                Code::Fenced,
                format!(
                    "volume {volume}: a write of snapshot epoch {write_epoch} arrived after the volume moved on to epoch {current}; it predates a snapshot and is refused"
                ),
            ));
        }
        Ok(())
    }

    /// The epoch a read sees: the volume as it is now (`snapshot_epoch` 0), or a live
    /// snapshot's (a deleted one's versions may be gone already).
    fn read_epoch(&self, volume: u64, snapshot_epoch: u64) -> Result<basalt_chunk_store::Epoch, DataError> {
        if snapshot_epoch == 0 {
            return Ok(basalt_chunk_store::Epoch::MAX);
        }
        let view = self.ctx.map.borrow();
        let live = view.volumes.get(&VolumeId(volume)).is_some_and(|v| v.snapshots.iter().any(|(_, e)| *e == snapshot_epoch));
        if !live {
            return Err(err(Code::NoSuchVolume, format!("volume {volume} has no live snapshot at epoch {snapshot_epoch}")));
        }
        Ok(snapshot_epoch)
    }

    async fn propose(&self, handle: &PgHandle, cmd: PgCommand) -> Option<DataError> {
        let started = Instant::now();
        let reply = match handle.group.propose(cmd.encode()).await {
            Ok(reply) => reply,
            Err(e) => return Some(self.raft_error(e)),
        };
        self.ctx.metrics.raft.committed(crate::metrics::GroupKind::Pg, started.elapsed());
        match PgReply::decode(&reply) {
            PgReply::Ok | PgReply::Index(_) => None,
            PgReply::NoSuchVolume => Some(err(Code::NoSuchVolume, "the volume was deleted")),
            PgReply::Invalid(m) => Some(err(Code::Invalid, m)),
            PgReply::NoSpace(m) => Some(err(Code::NoSpace, m)),
            PgReply::Corrupt(m) => Some(err(Code::Corrupt, m)),
            PgReply::Fenced(m) => Some(err(Code::Fenced, m)),
        }
    }

    fn done(&self, op: Op, volume: u64, bytes: u64, started: Instant, error: &Option<DataError>) {
        let took = started.elapsed();
        self.ctx.metrics.record(op, bytes, took, error.is_none());
        if self.ctx.map.borrow().per_volume_metrics {
            self.ctx.metrics.per_volume.record(VolumeId(volume), op, bytes, took, error.is_none());
        }
    }
}

impl DataService {
    /// The refusal for a mutation about to be proposed whose connection closed, or is older
    /// than one its client has written through since (`pg::sessions`): either way the client
    /// sends it again, and this copy must not land after that one.
    fn given_up(&self, gone: Option<&AtomicBool>, session: u64, connection: u64) -> Option<DataError> {
        if gone.is_some_and(|g| g.load(std::sync::atomic::Ordering::Acquire)) {
            return Some(err(Code::Unavailable, "the client's connection closed before this was proposed; not applied"));
        }
        self.sessions.superseded(session, connection).then(|| {
            err(
                Code::Unavailable,
                format!("connection {connection} of client session {session:#x} was superseded by a newer one before this was proposed; not applied"),
            )
        })
    }

    /// Validates and proposes a write; the reply carries any refusal. `gone` is set once the
    /// client's connection closed: a write not yet proposed by then is dropped (the client
    /// retries it on another connection, and this copy must not land after the retry).
    pub async fn serve_write(&self, req: WriteRequest, who: &Requester, gone: Option<&AtomicBool>) -> WriteReply {
        let started = Instant::now();
        let len = req.data.len() as u64;
        let volume = req.volume_id;
        self.sessions.seen(req.session, req.connection);
        let error = async {
            if len > MAX_IO {
                return Some(err(Code::OutOfRange, format!("write of {len} bytes exceeds the {MAX_IO}-byte limit")));
            }
            let (handle, lineage) = match self.route(who, req.pg, req.volume_id, req.offset, len, req.map_version, Some(req.attach_epoch)).await {
                Ok(h) => h,
                Err(e) => return Some(e),
            };
            // Held to the volume's QoS before taking a share of the node's in-flight budget,
            // so a throttled volume's queue does not hold back the others.
            self.throttle(req.volume_id, len).await;
            let Ok(_admitted) = self.inflight.acquire_many(len.div_ceil(1024).max(1) as u32).await else {
                return Some(err(Code::Unavailable, "node is shutting down"));
            };
            if let Err(e) = self.check_write_epoch(req.volume_id, req.write_epoch) {
                return Some(e);
            }
            if req.crcs.len() != piece_count(req.offset, len) {
                return Some(err(
                    Code::Invalid,
                    format!("{} checksums for a write with {} 4 KiB pieces", req.crcs.len(), piece_count(req.offset, len)),
                ));
            }
            for ((p_off, p_len), crc) in pieces(req.offset, len).zip(&req.crcs) {
                let at = (p_off - req.offset) as usize;
                let actual = crc32c(&req.data[at..at + p_len as usize]);
                if actual != *crc {
                    return Some(err(
                        Code::BadChecksum,
                        format!("data for volume {} at offset {p_off} arrived corrupted (crc {actual:#010x}, expected {crc:#010x})", req.volume_id),
                    ));
                }
            }
            if let Err(m) = self.space.admit_log(&self.ctx, &handle, len) {
                return Some(err(Code::NoSpace, m));
            }
            let _space = match self.space.admit(&self.ctx, &handle, req.volume_id, req.write_epoch, req.offset, len).await {
                Ok(admitted) => admitted,
                Err(m) => return Some(err(Code::NoSpace, m)),
            };
            if let Some(e) = self.given_up(gone, req.session, req.connection) {
                return Some(e);
            }
            // An encrypted volume takes only sealed blocks, and only it does: a client without
            // the key must not store plaintext in it.
            let encrypted = self.ctx.map.borrow().volumes.get(&VolumeId(req.volume_id)).is_some_and(|v| v.encrypted);
            if encrypted == req.crypt.is_empty() {
                let why = if encrypted {
                    "is encrypted: its blocks must be sealed by the client (attach with --kek-file)"
                } else {
                    "is not encrypted: sealed blocks are refused"
                };
                return Some(err(Code::Invalid, format!("volume {} {why}", req.volume_id)));
            }
            let crypt = if req.crypt.is_empty() {
                None
            } else {
                let blocks = req.crcs.len();
                let whole = req.offset.is_multiple_of(BLOCK_SIZE) && len.is_multiple_of(BLOCK_SIZE);
                match CryptContext::decode_all(&req.crypt, blocks).and_then(|c| c.into_iter().collect::<Option<Vec<_>>>()) {
                    Some(c) if whole => Some(c),
                    _ => {
                        return Some(err(
                            Code::Invalid,
                            format!(
                                "an encrypted write needs whole blocks and one encryption context per block ({blocks} blocks, {} context bytes)",
                                req.crypt.len()
                            ),
                        ));
                    }
                }
            };
            let cmd = PgCommand::Write {
                volume: VolumeId(req.volume_id),
                epoch: req.attach_epoch,
                write_epoch: req.write_epoch,
                offset: req.offset,
                crcs: req.crcs,
                crypt,
                data: req.data,
            };
            self.propose(&handle, cmd.of_clone(&lineage)).await
        }
        .await;
        self.done(Op::Write, volume, len, started, &error);
        WriteReply { error }
    }

    /// Serves a linearizable read from this PG leader's replica.
    pub async fn serve_read(&self, req: ReadRequest, who: &Requester) -> ReadReply {
        let started = Instant::now();
        let len = u64::from(req.length);
        let volume = req.volume_id;
        let result: Result<(bytes::Bytes, Vec<u32>, Vec<u8>), DataError> = async {
            if !req.offset.is_multiple_of(BLOCK_SIZE) || len % BLOCK_SIZE != 0 {
                return Err(err(Code::Invalid, format!("reads must be 4 KiB aligned (offset {}, length {len})", req.offset)));
            }
            if len > MAX_IO {
                return Err(err(Code::OutOfRange, format!("read of {len} bytes exceeds the {MAX_IO}-byte limit")));
            }
            let (handle, lineage) = self.route(who, req.pg, req.volume_id, req.offset, len, req.map_version, None).await?;
            self.throttle(req.volume_id, len).await;
            let at = self.read_epoch(req.volume_id, req.snapshot_epoch)?;
            handle.group.read_barrier().await.map_err(|e| self.raft_error(e))?;
            // A bad block on this replica is repaired from the others through the PG, then the
            // read runs again; each round repairs one chunk of the range.
            let mut rounds = 0;
            loop {
                match handle.shared.read(VolumeId(req.volume_id), &lineage, at, req.offset, len).await {
                    Ok(r) => {
                        // Contexts go out only when some block has one (encrypted volumes).
                        let crypt = if r.crypt.iter().any(Option::is_some) { CryptContext::encode_all(&r.crypt) } else { Vec::new() };
                        return Ok((r.data, r.crcs, crypt));
                    }
                    Err(_) if handle.shared.retired.load(std::sync::atomic::Ordering::Acquire) => {
                        // The replica moved elsewhere while the read waited: the client asks
                        // the PG's current replicas instead.
                        return Err(err(Code::WrongNode, format!("{} no longer holds a replica of pg-{}", self.ctx.config.id, req.pg)));
                    }
                    Err(e) => {
                        let ChunkStoreError::Corrupt { volume, chunk, .. } = &e else {
                            return Err(err(Code::Internal, format!("{e} (on {})", self.ctx.config.id)));
                        };
                        let (volume, chunk) = (*volume, *chunk);
                        let extent = self.ctx.map.borrow().layout.map(|l| req.offset / l.extent_size).unwrap_or(0);
                        let what = format!("{e}, in extent {extent} of pg-{} on {}", req.pg, self.ctx.config.id);
                        rounds += 1;
                        if rounds > MAX_READ_REPAIRS {
                            return Err(err(Code::Corrupt, what));
                        }
                        tracing::error!(pg = req.pg, extent, error = %what, "read hit a corrupt block; repairing it from the other replicas");
                        match repair::check_and_repair(&self.ctx, &handle, volume, chunk).await {
                            Ok(verdict) => {
                                self.ctx.integrity.record(&ChunkVerdict { bytes_read: 0, ..verdict });
                                if verdict.unrepairable > 0 {
                                    return Err(err(Code::Corrupt, format!("{what}; no replica holds an intact copy to repair it from")));
                                }
                            }
                            // Written meanwhile: the write may have replaced the bad block.
                            Err(repair::RepairError::Changed { .. }) => {}
                            Err(repair_error) => {
                                return Err(err(Code::Corrupt, format!("{what}; repair failed: {repair_error}")));
                            }
                        }
                    }
                }
            }
        }
        .await;
        let reply = match result {
            Ok((data, crcs, crypt)) => ReadReply { error: None, data, crcs, crypt: crypt.into() },
            Err(e) => ReadReply { error: Some(e), data: bytes::Bytes::new(), crcs: Vec::new(), crypt: Default::default() },
        };
        self.done(Op::Read, volume, len, started, &reply.error);
        reply
    }

    /// Validates and proposes a TRIM / WRITE_ZEROES (`gone` as for [`DataService::serve_write`]).
    pub async fn serve_zero(&self, req: ZeroRequest, who: &Requester, gone: Option<&AtomicBool>) -> ZeroReply {
        let started = Instant::now();
        let (volume, length) = (req.volume_id, req.length);
        self.sessions.seen(req.session, req.connection);
        let error = async {
            let (handle, lineage) =
                match self.route(who, req.pg, req.volume_id, req.offset, req.length, req.map_version, Some(req.attach_epoch)).await {
                    Ok(h) => h,
                    Err(e) => return Some(e),
                };
            // A zero or trim is one operation; it moves no payload.
            self.throttle(req.volume_id, 0).await;
            if let Err(e) = self.check_write_epoch(req.volume_id, req.write_epoch) {
                return Some(e);
            }
            // Zeroes that keep their blocks allocated need chunk space like a write.
            let _space = if req.keep_allocated {
                match self.space.admit(&self.ctx, &handle, req.volume_id, req.write_epoch, req.offset, req.length).await {
                    Ok(admitted) => admitted,
                    Err(m) => return Some(err(Code::NoSpace, m)),
                }
            } else {
                None
            };
            if let Some(e) = self.given_up(gone, req.session, req.connection) {
                return Some(e);
            }
            let cmd = PgCommand::Zero {
                volume: VolumeId(req.volume_id),
                epoch: req.attach_epoch,
                write_epoch: req.write_epoch,
                offset: req.offset,
                len: req.length,
                keep_allocated: req.keep_allocated,
            };
            self.propose(&handle, cmd.of_clone(&lineage)).await
        }
        .await;
        self.done(Op::Zero, volume, length, started, &error);
        ZeroReply { error }
    }
}

/// Chunks one read may repair before it gives up and reports the corruption.
const MAX_READ_REPAIRS: usize = 4;

/// The gRPC face of the service (the framed protocol in [`super::wire`] is the fast path).
#[tonic::async_trait]
impl Data for DataService {
    async fn write(&self, request: Request<WriteRequest>) -> Result<Response<WriteReply>, Status> {
        let who = self.grpc_requester(&request).await?;
        Ok(Response::new(self.serve_write(request.into_inner(), &who, None).await))
    }

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadReply>, Status> {
        let who = self.grpc_requester(&request).await?;
        Ok(Response::new(self.serve_read(request.into_inner(), &who).await))
    }

    async fn zero(&self, request: Request<ZeroRequest>) -> Result<Response<ZeroReply>, Status> {
        let who = self.grpc_requester(&request).await?;
        Ok(Response::new(self.serve_zero(request.into_inner(), &who, None).await))
    }

    async fn release_volume(&self, request: Request<ReleaseVolumeRequest>) -> Result<Response<ReleaseVolumeReply>, Status> {
        self.access.authorize_meta_call(&request, "ReleaseVolume").await?;
        let req = request.into_inner();
        // A clone's rollback and release read through its lineage (the map keeps a deleted
        // volume's entry until every PG released it).
        let lineage = self.ctx.map.borrow().volumes.get(&VolumeId(req.volume_id)).map(|v| v.lineage.clone()).unwrap_or_default();
        let error = match self.ctx.pgs.get(PgId(req.pg)) {
            None => Some(err(Code::WrongNode, format!("{} holds no replica of pg-{}", self.ctx.config.id, req.pg))),
            Some(handle) if req.rollback_at != 0 => {
                let cmd = PgCommand::Rollback { volume: VolumeId(req.volume_id), to: req.rollback_to, at: req.rollback_at };
                self.propose(&handle, cmd.of_clone(&lineage)).await
            }
            Some(handle) if req.versions_only => {
                let cmd = PgCommand::ReleaseVersions { volume: VolumeId(req.volume_id), live: req.live_epochs };
                self.propose(&handle, cmd.of_clone(&lineage)).await
            }
            Some(handle) => self.propose(&handle, PgCommand::DeleteVolume { volume: VolumeId(req.volume_id) }).await,
        };
        Ok(Response::new(ReleaseVolumeReply { error }))
    }

    async fn chunk_check(&self, request: Request<ChunkCheckRequest>) -> Result<Response<ChunkCheckReply>, Status> {
        self.access.authorize(&request, Action::Internal, None).await?;
        Ok(Response::new(match repair::answer_check(&self.ctx, request.into_inner()).await {
            Ok((blocks, data, written)) => ChunkCheckReply { error: None, blocks, data, written_since_probe: written },
            Err(e) => ChunkCheckReply { error: Some(e), ..Default::default() },
        }))
    }

    async fn repair_chunk(&self, request: Request<RepairChunkRequest>) -> Result<Response<RepairChunkReply>, Status> {
        self.access.authorize(&request, Action::Internal, None).await?;
        let req = request.into_inner();
        let Some(handle) = self.ctx.pgs.get(PgId(req.pg)) else {
            let error = err(Code::WrongNode, format!("{} holds no replica of pg-{}", self.ctx.config.id, req.pg));
            return Ok(Response::new(RepairChunkReply { error: Some(error), ..Default::default() }));
        };
        let reply = match repair::check_and_repair(&self.ctx, &handle, VolumeId(req.volume_id), req.chunk).await {
            Ok(v) => RepairChunkReply { error: None, corrupt: v.corrupt, divergent: v.divergent, repaired: v.repaired, unrepairable: v.unrepairable },
            Err(e) => {
                let error = match &e {
                    repair::RepairError::NotLeader { leader_addr, .. } => DataError {
                        code: Code::NotLeader as i32,
                        message: e.to_string(),
                        leader: 0,
                        leader_addr: leader_addr.clone().unwrap_or_default(),
                    },
                    repair::RepairError::Changed { .. } => err(Code::Changed, e.to_string()),
                    repair::RepairError::Failed { .. } => err(Code::Unavailable, e.to_string()),
                };
                RepairChunkReply { error: Some(error), ..Default::default() }
            }
        };
        Ok(Response::new(reply))
    }

    async fn volume_usage(&self, request: Request<VolumeUsageRequest>) -> Result<Response<VolumeUsageReply>, Status> {
        self.access.authorize_meta_call(&request, "VolumeUsage").await?;
        let req = request.into_inner();
        let mut reply = VolumeUsageReply::default();
        let mut exclusive: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
        for pg in req.pgs {
            if self.ctx.pgs.get(PgId(pg)).is_none() {
                continue;
            }
            let usage = self.ctx.store.snapshot_usage(pg, VolumeId(req.volume_id), &req.live_epochs);
            reply.head_bytes += usage.head_slots * CHUNK_SIZE;
            reply.snapshot_bytes += usage.snapshot_slots * CHUNK_SIZE;
            for (epoch, slots) in usage.exclusive_slots {
                *exclusive.entry(epoch).or_default() += slots * CHUNK_SIZE;
            }
            reply.pgs_counted.push(pg);
        }
        reply.exclusive = exclusive.into_iter().map(|(epoch, bytes)| EpochBytes { epoch, bytes }).collect();
        Ok(Response::new(reply))
    }

    async fn chunk_versions(&self, request: Request<ChunkVersionsRequest>) -> Result<Response<ChunkVersionsReply>, Status> {
        let who = self.grpc_requester(&request).await?;
        let req = request.into_inner();
        let node = self.ctx.config.id;
        let result: Result<Vec<ChunkVersion>, DataError> = async {
            let Some(handle) = self.ctx.pgs.get(PgId(req.pg)) else {
                return Err(err(Code::WrongNode, format!("{node} holds no replica of pg-{}", req.pg)));
            };
            let mut view = self.ctx.map.borrow().clone();
            if view.version < req.map_version {
                view = wait_for_version(&self.ctx, req.map_version, Duration::from_secs(2)).await;
            }
            let Some(vol) = view.volumes.get(&VolumeId(req.volume_id)).filter(|v| v.active) else {
                return Err(err(Code::NoSuchVolume, format!("no active volume with id {}", req.volume_id)));
            };
            self.access.check_data(&who.principal, who.peer, false, &vol.name).map_err(|d| denied_error(&d))?;
            backup_node_only(&view, &who.principal, vol, false)?;
            let at = self.read_epoch(req.volume_id, req.snapshot_epoch)?;
            // Linearizable like a read: every write acknowledged before the snapshot is applied here.
            handle.group.read_barrier().await.map_err(|e| self.raft_error(e))?;
            // A walk of the volume's index entries in this PG: off the async workers.
            let (store, pg, volume, lineage) = (self.ctx.store.clone(), req.pg, VolumeId(req.volume_id), vol.lineage.clone());
            let range = req.first_chunk..if req.end_chunk == 0 { u64::MAX } else { req.end_chunk };
            let chunks = tokio::task::spawn_blocking(move || store.resolved_chunks(pg, volume, &lineage, at, range))
                .await
                .map_err(|e| err(Code::Internal, format!("listing chunk versions: {e}")))?;
            Ok(chunks.into_iter().map(|(chunk, version)| ChunkVersion { chunk, owner: version.volume.0, epoch: version.epoch }).collect())
        }
        .await;
        Ok(Response::new(match result {
            Ok(chunks) => ChunkVersionsReply { error: None, chunks },
            Err(error) => ChunkVersionsReply { error: Some(error), chunks: Vec::new() },
        }))
    }

    async fn transfer_leader(&self, request: Request<TransferLeaderRequest>) -> Result<Response<TransferLeaderReply>, Status> {
        self.access.authorize_meta_call(&request, "TransferLeader").await?;
        let req = request.into_inner();
        let Some(handle) = self.ctx.pgs.get(PgId(req.pg)) else {
            let error = err(Code::WrongNode, format!("{} holds no replica of pg-{}", self.ctx.config.id, req.pg));
            return Ok(Response::new(TransferLeaderReply { error: Some(error) }));
        };
        let st = handle.group.status();
        if !st.voters.contains(&req.to) || req.to == self.ctx.config.id.0 {
            let error = err(Code::Invalid, format!("node {} is not another voter of pg-{} (voters {:?})", req.to, req.pg, st.voters));
            return Ok(Response::new(TransferLeaderReply { error: Some(error) }));
        }
        if !st.is_leader {
            let e = RaftError::NotLeader { group: req.pg, leader: st.leader, leader_addr: st.leader.and_then(|l| handle.group.member_addr(l)) };
            return Ok(Response::new(TransferLeaderReply { error: Some(self.raft_error(e)) }));
        }
        tracing::info!(pg = req.pg, to = req.to, "handing leadership over (leader balancing)");
        let error = handle.group.transfer_leader(req.to).await.err().map(|e| self.raft_error(e));
        Ok(Response::new(TransferLeaderReply { error }))
    }

    async fn move_replica(&self, request: Request<MoveReplicaRequest>) -> Result<Response<MoveReplicaReply>, Status> {
        self.access.authorize_meta_call(&request, "MoveReplica").await?;
        let req = request.into_inner();
        let Some(handle) = self.ctx.pgs.get(PgId(req.pg)) else {
            let error = err(Code::WrongNode, format!("{} holds no replica of pg-{}", self.ctx.config.id, req.pg));
            return Ok(Response::new(MoveReplicaReply { error: Some(error), ..Default::default() }));
        };
        if req.to == 0 || req.from == 0 || req.to == req.from || req.to_addr.is_empty() {
            let error = err(Code::Invalid, "a move needs distinct, non-zero from and to nodes and the new node's address");
            return Ok(Response::new(MoveReplicaReply { error: Some(error), ..Default::default() }));
        }
        let (from, to) = (basalt_common::NodeId(req.from), basalt_common::NodeId(req.to));
        let step = if req.cancel {
            super::membership::cancel(&handle, from, to, &req.to_addr).await
        } else {
            super::membership::advance(&handle, from, to, &req.to_addr).await
        };
        let reply = match step {
            Ok(m) => MoveReplicaReply {
                error: None,
                done: m.done,
                phase: m.phase.to_string(),
                chunks_done: m.chunks_done,
                chunks_total: m.chunks_total,
                matched_index: m.matched_index,
                last_index: m.last_index,
                cancelled: m.cancelled,
            },
            Err(e) => MoveReplicaReply { error: Some(self.raft_error(e)), ..Default::default() },
        };
        Ok(Response::new(reply))
    }
}
