//! Admission of writes that need new chunk space, so no replica is asked to apply an entry it
//! cannot store.
//!
//! A committed entry has to be applied by every replica of its PG: a replica that skipped one
//! for lack of space would differ from the others and, once it led the PG, serve data older
//! than what was acknowledged. So the leader decides before proposing, for every replica:
//! - Each node publishes what it can still allocate ([`allocatable`]: free chunk slots less a
//!   reserve) on its Raft frames (`basalt_raft::transport::SpaceBook`), every
//!   [`PUBLISH_EVERY`]; a leader hears its followers' figures with their heartbeat replies.
//! - A write (or a write-zeroes that keeps its blocks allocated) that needs new chunks is
//!   admitted only if, on every replica of its PG, it fits within that replica's figure divided
//!   by the number of nodes holding replicas (the other nodes' leaders may be filling the same
//!   replica at the same time), counting what this node admitted onto that replica until
//!   [`FIGURE_LAG`] after applying it (a follower applies after its leader, and its figure is
//!   refreshed only every [`PUBLISH_EVERY`]). It waits up to [`ADMIT_WAIT`] for this node's
//!   earlier admissions to expire, and is otherwise refused with `NoSpace` (ENOSPC to the NBD
//!   client). Writes into allocated chunks always go. With plenty of room the share is large
//!   and nothing waits.
//! - The reserve covers a follower lagging more than that. Should a replica still run out, its
//!   apply waits for space rather than skip the entry (`state_machine`), so the worst case is a
//!   stalled replica, never a divergent one.
//! - Every write also passes through the Raft log in the node's state directory (with the chunk
//!   index). Each node publishes what that filesystem can still take beyond a reserve
//!   ([`state_reserve`]); a write is refused with `NoSpace` while any replica of its PG has less
//!   than the write's size there ([`SpaceAdmission::admit_log`]). Other files filling the
//!   filesystem are seen within [`PUBLISH_EVERY`]; the reserve absorbs what is in flight, and
//!   writes go again once space is freed. Should the log still run out, its writer retries
//!   rather than fail the Raft group (`basalt_raft::log_store`).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use basalt_chunk_store::StoreStats;
use basalt_common::CHUNK_SIZE;
use tokio::sync::Notify;

use super::manager::PgHandle;
use crate::node::NodeCtx;

/// How often a node refreshes the figure its Raft frames carry.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// A peer's figure older than this is not used (the peer is down or idle; it catches up, and
/// applies, later).
pub const PEER_FIGURE_MAX_AGE: Duration = Duration::from_secs(5);

/// How long a write waits for this node's earlier admissions to expire before it is refused.
/// Below the volume client's stall watchdog (3 s), which would otherwise give the connection
/// up and retry while the first attempt still waits here.
pub const ADMIT_WAIT: Duration = Duration::from_secs(2);

/// How long an admission still counts after the leader applied it: time for the followers to
/// apply it too and for their figures to say so.
pub const FIGURE_LAG: Duration = Duration::from_secs(1);

/// Chunk space kept back from admission: 1/32 of the store, at least 8 chunks.
pub fn reserve(stats: &StoreStats) -> u64 {
    (stats.slots_total * stats.slot_size / 32).max(8 * CHUNK_SIZE)
}

/// What a node may still promise to new data: free slots less the [`reserve`].
pub fn allocatable(stats: &StoreStats) -> u64 {
    stats.free_bytes().saturating_sub(reserve(stats))
}

/// State-directory space kept back from writes: `configured`, or 5% of the filesystem, at least
/// 256 MiB and at most 4 GiB (RocksDB needs room to flush and compact to free log space).
pub fn state_reserve(configured: Option<u64>, filesystem_bytes: u64) -> u64 {
    configured.unwrap_or_else(|| (filesystem_bytes / 20).clamp(256 << 20, 4 << 30))
}

/// Bytes available to this process, and the size, of the filesystem holding `dir`.
pub fn filesystem_space(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and `st` is written by statvfs before it is read.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // fsblkcnt_t and c_ulong are u64 on the 64-bit Linux targets Basalt builds for.
    Ok((st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize))
}

/// What this node's state directory can still take beyond its reserve (0 when it cannot be
/// measured: writes stop rather than risk the Raft log).
fn state_room(dir: &Path, configured_reserve: Option<u64>) -> u64 {
    match filesystem_space(dir) {
        Ok((available, size)) => available.saturating_sub(state_reserve(configured_reserve, size)),
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot measure the state directory's free space; refusing writes");
            0
        }
    }
}

/// Publishes this node's [`allocatable`] figure and its state directory's room on its Raft
/// frames until shutdown.
pub async fn run_publisher(ctx: Arc<NodeCtx>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    let mut was_short = false;
    loop {
        ctx.host.space().set_local(allocatable(&ctx.store.stats()));
        let (dir, reserve) = (ctx.config.data_dir.clone(), ctx.config.state_reserve);
        if let Ok(room) = tokio::task::spawn_blocking(move || state_room(&dir, reserve)).await {
            ctx.host.space().set_local_state(room);
            let short = room < STATE_LOW;
            if short != was_short {
                if short {
                    tracing::warn!(dir = %ctx.config.data_dir.display(), room, "state directory is at its reserve: writes are refused");
                } else {
                    tracing::info!(dir = %ctx.config.data_dir.display(), room, "state directory has room again: writes are accepted");
                }
                was_short = short;
            }
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Below this room in the state directory the node logs that it refuses writes (the largest
/// single write).
const STATE_LOW: u64 = 32 << 20;

/// Chunk space this node's leaders promised to writes, per replica node, until applied (and
/// [`FIGURE_LAG`] after).
#[derive(Default)]
pub struct SpaceAdmission {
    admitted: Mutex<HashMap<u64, u64>>,
    applied: Notify,
}

/// Bytes of chunk space held on each replica of one write's PG; dropped once the write was
/// applied here, it still counts for [`FIGURE_LAG`].
pub struct Admitted {
    owner: Arc<SpaceAdmission>,
    nodes: Vec<u64>,
    bytes: u64,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let (owner, nodes, bytes) = (self.owner.clone(), std::mem::take(&mut self.nodes), self.bytes);
        let release = move || {
            let mut admitted = owner.admitted.lock().unwrap_or_else(|p| p.into_inner());
            for n in &nodes {
                if let Some(held) = admitted.get_mut(n) {
                    *held = held.saturating_sub(bytes);
                    if *held == 0 {
                        admitted.remove(n);
                    }
                }
            }
            drop(admitted);
            owner.applied.notify_waiters();
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    tokio::time::sleep(FIGURE_LAG).await;
                    release();
                });
            }
            Err(_) => release(),
        }
    }
}

impl SpaceAdmission {
    /// Admits `bytes` of write payload into the Raft log of `handle`'s PG, or names the replica
    /// whose state directory has no room beyond its reserve. Nothing to check when this node
    /// does not lead the PG.
    pub fn admit_log(&self, ctx: &NodeCtx, handle: &PgHandle, bytes: u64) -> Result<(), String> {
        let Some(replicas) = handle.group.replicas_if_leader() else { return Ok(()) };
        let book = ctx.host.space();
        let rooms = figures(ctx, &replicas, book.local_state(), |node| book.peer_state(node, PEER_FIGURE_MAX_AGE));
        match rooms.into_iter().find(|(_, room)| *room < bytes) {
            Some((node, room)) => Err(format!(
                "no space in pg-{}: node-{node}'s state directory (Raft log, chunk index) can take {} KiB more before its reserve; writes resume once space is freed there",
                handle.shared.pg.0,
                room >> 10
            )),
            None => Ok(()),
        }
    }

    /// Admits a write to `len` bytes at `offset` of `volume` at snapshot epoch `write_epoch` (a
    /// copy of a chunk a snapshot froze needs a slot too) in `handle`'s PG, or says which
    /// replica has no room. `None` when the write needs no new chunk, or when this node does
    /// not lead the PG (the proposal is refused with "not the leader" then).
    pub async fn admit(
        self: &Arc<Self>,
        ctx: &NodeCtx,
        handle: &PgHandle,
        volume: u64,
        write_epoch: u64,
        offset: u64,
        len: u64,
    ) -> Result<Option<Admitted>, String> {
        let chunks = ctx.store.unallocated_chunks(handle.shared.shard(), basalt_common::VolumeId(volume), write_epoch, offset, len);
        if chunks == 0 {
            return Ok(None);
        }
        let need = chunks * CHUNK_SIZE;
        let deadline = tokio::time::Instant::now() + ADMIT_WAIT;
        loop {
            let applied = self.applied.notified();
            let Some(replicas) = handle.group.replicas_if_leader() else { return Ok(None) };
            let holders = {
                let view = ctx.map.borrow();
                view.pgs.iter().flatten().collect::<HashSet<_>>().len().max(1) as u64
            };
            let book = ctx.host.space();
            let rooms = figures(ctx, &replicas, Some(allocatable(&ctx.store.stats())), |node| book.peer(node, PEER_FIGURE_MAX_AGE));
            // Per replica: what this node's share of its room still allows.
            let mut waiting = false;
            {
                let mut admitted = self.admitted.lock().unwrap_or_else(|p| p.into_inner());
                for &(node, room) in &rooms {
                    let share = room / holders;
                    if need > share {
                        return Err(format!(
                            "no space for {} MiB of new chunks in pg-{}: node-{node} can take {} MiB more (its share for {}'s writes: {} MiB)",
                            need >> 20,
                            handle.shared.pg.0,
                            room >> 20,
                            ctx.config.id,
                            share >> 20
                        ));
                    }
                    waiting |= admitted.get(&node).copied().unwrap_or(0) + need > share;
                }
                if !waiting {
                    let nodes: Vec<u64> = rooms.iter().map(|(n, _)| *n).collect();
                    for n in &nodes {
                        *admitted.entry(*n).or_default() += need;
                    }
                    return Ok(Some(Admitted { owner: self.clone(), nodes, bytes: need }));
                }
            }
            if tokio::time::timeout_at(deadline, applied).await.is_err() {
                return Err(format!(
                    "no space for {} MiB of new chunks in pg-{}: its replicas' room is taken by writes in flight",
                    need >> 20,
                    handle.shared.pg.0
                ));
            }
        }
    }
}

/// Each replica's figure: this node's `own`, the others' from `peer` (a replica without one,
/// not heard from lately, is left out).
fn figures(ctx: &NodeCtx, replicas: &[u64], own: Option<u64>, peer: impl Fn(u64) -> Option<u64>) -> Vec<(u64, u64)> {
    let me = ctx.config.id.0;
    let others = replicas.iter().filter(|n| **n != me).filter_map(|n| peer(*n).map(|room| (*n, room)));
    own.map(|room| (me, room)).into_iter().chain(others).collect()
}
