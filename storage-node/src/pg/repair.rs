//! Comparing the replicas of one chunk and repairing bad copies through the placement group.
//!
//! Runs on the PG leader, for the integrity scrub (a deep pass, or a replica that found a bad
//! block in its own copy) and for a client read that met a bad block:
//! 1. The leader proposes a [`PgCommand::Probe`] for the chunk. Once a replica has applied it,
//!    its copy is the state at that log position, the same on every replica.
//! 2. Each replica reports, per written block, the crc recorded at write time and whether its
//!    bytes still match (the leader itself directly, followers over the `ChunkCheck` RPC),
//!    leaving out the blocks written after the probe and naming them. Those blocks are left
//!    out of the comparison on every replica rather than compare different versions: the
//!    writes that replaced them reach every replica through the log.
//! 3. Per block, the value to keep is the crc that a majority of the answering replicas
//!    recorded when they wrote it, provided at least one of them still holds it intact (so
//!    copies rotted on two of three nodes are recovered from the third, and a replica that
//!    holds a different, self-consistent block is outvoted). A block without such a value is
//!    reported, never guessed at.
//! 4. Each bad block is proposed as a [`PgCommand::Repair`] carrying an intact copy. A replica
//!    applies it only where its own copy is bad, and only if nothing wrote that block since the
//!    probe, so a repair can never put older data over a newer write.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use basalt_chunk_store::ChunkCheck;
use basalt_common::{BLOCK_SIZE, CHUNK_SIZE, CryptContext, NodeId, VolumeId, ZERO_BLOCK_CRC, crc32c};
use basalt_proto::data::data_error::Code;
use basalt_proto::data::{ChunkCheckRequest, DataError};
use basalt_scrubber::ChunkVerdict;
use bytes::Bytes;
use thiserror::Error;

use super::command::{PgCommand, PgReply};
use super::manager::PgHandle;
use super::service::err;
use crate::node::NodeCtx;

/// How long a replica waits to apply a probe before it answers that it cannot.
pub const PROBE_APPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a chunk could not be compared or repaired.
#[derive(Debug, Error)]
pub enum RepairError {
    /// Only the PG leader compares and repairs.
    #[error("{node} is not the leader of pg-{pg}")]
    NotLeader {
        /// The PG.
        pg: u32,
        /// This node.
        node: NodeId,
        /// The leader's address, if known.
        leader_addr: Option<String>,
    },
    /// The chunk was written while it was being compared; try again later.
    #[error("{volume} chunk {chunk} in pg-{pg} was written during the comparison")]
    Changed {
        /// The PG.
        pg: u32,
        /// The volume.
        volume: VolumeId,
        /// The chunk.
        chunk: u64,
    },
    /// Anything else (Raft, I/O, too few replicas answering), with what was being done.
    #[error("checking {volume} chunk {chunk} in pg-{pg}: {reason}")]
    Failed {
        /// The PG.
        pg: u32,
        /// The volume.
        volume: VolumeId,
        /// The chunk.
        chunk: u64,
        /// What went wrong.
        reason: String,
    },
}

/// One replica's copy of the chunk: block → (stored crc, intact). Absent blocks read as zeros.
type ReplicaView = BTreeMap<u16, (u32, bool)>;

fn view_of(check: &ChunkCheck) -> ReplicaView {
    check.blocks.iter().map(|b| (b.block, (b.stored_crc, b.is_intact()))).collect()
}

/// What the comparison decided for one block that is not healthy everywhere.
#[derive(Debug, PartialEq, Eq)]
struct BlockPlan {
    block: u16,
    /// The crc to keep (`None`: no replica can be trusted; left alone and reported).
    keep: Option<u32>,
    /// Replicas holding `keep` intact.
    sources: Vec<NodeId>,
    /// Replicas to rewrite.
    bad: Vec<NodeId>,
    /// Copies failing their own crc.
    corrupt: u64,
    /// Intact copies that differ from `keep` (or from each other when nothing is kept).
    divergent: u64,
}

/// Compares the replicas' views block by block (see the module docs for the rule); `voters`
/// is the size of the PG, so a majority means a majority of all replicas, not of those that
/// answered.
fn compare(views: &[(NodeId, ReplicaView)], voters: usize) -> Vec<BlockPlan> {
    let blocks: BTreeSet<u16> = views.iter().flat_map(|(_, v)| v.keys().copied()).collect();
    let n = voters.max(views.len());
    let mut plans = Vec::new();
    for block in blocks {
        let copies: Vec<(NodeId, u32, bool)> = views
            .iter()
            .map(|(node, v)| {
                let (crc, ok) = v.get(&block).copied().unwrap_or((ZERO_BLOCK_CRC, true));
                (*node, crc, ok)
            })
            .collect();
        let first = copies[0].1;
        if copies.iter().all(|(_, crc, ok)| *ok && *crc == first) {
            continue;
        }
        // Votes go by the crc each replica recorded at write time (index metadata, which rot
        // in the data file does not touch); the winner needs a majority and an intact copy.
        let mut recorded: HashMap<u32, usize> = HashMap::new();
        for (_, crc, _) in &copies {
            *recorded.entry(*crc).or_default() += 1;
        }
        let keep =
            recorded.iter().filter(|(crc, count)| **count * 2 > n && copies.iter().any(|(_, c, ok)| *ok && c == *crc)).map(|(crc, _)| *crc).next();
        let intact_values: BTreeSet<u32> = copies.iter().filter(|(_, _, ok)| *ok).map(|(_, crc, _)| *crc).collect();
        let corrupt = copies.iter().filter(|(_, _, ok)| !ok).count() as u64;
        let (sources, bad, divergent) = match keep {
            Some(keep) => {
                let sources = copies.iter().filter(|(_, crc, ok)| *ok && *crc == keep).map(|(n, _, _)| *n).collect();
                let bad = copies.iter().filter(|(_, crc, ok)| !(*ok && *crc == keep)).map(|(n, _, _)| *n).collect();
                let divergent = copies.iter().filter(|(_, crc, ok)| *ok && *crc != keep).count() as u64;
                (sources, bad, divergent)
            }
            None => (Vec::new(), Vec::new(), intact_values.len().saturating_sub(1) as u64),
        };
        plans.push(BlockPlan { block, keep, sources, bad, corrupt, divergent });
    }
    plans
}

impl NodeCtx {
    /// The address of `node`, a member of `handle`'s PG: from the group's membership, else
    /// from the cluster map.
    pub(crate) fn addr_of(&self, handle: &PgHandle, node: NodeId) -> Option<String> {
        handle.group.member_addr(node.0).or_else(|| self.map.borrow().addr(node).map(str::to_string))
    }
}

/// A replica's answer at a probe: its view of the blocks not written since, the fetched
/// blocks' data, and the blocks written since.
type RemoteCopy = (ReplicaView, Vec<(Bytes, Option<CryptContext>)>, Vec<u16>);

/// Asks replica `node` for its copy of the chunk at the probe; `Ok(None)` if it no longer
/// knows the probe.
async fn remote_check(
    ctx: &NodeCtx,
    handle: &PgHandle,
    node: NodeId,
    volume: VolumeId,
    chunk: u64,
    probe_index: u64,
    fetch: Vec<u16>,
) -> Result<Option<RemoteCopy>, String> {
    let addr = ctx.addr_of(handle, node).ok_or_else(|| format!("address of {node} unknown"))?;
    let mut client = ctx.clients.data(&addr).map_err(|e| e.to_string())?;
    let req = ChunkCheckRequest {
        pg: handle.shared.pg.0,
        volume_id: volume.0,
        chunk,
        probe_index,
        fetch_blocks: fetch.iter().map(|b| u32::from(*b)).collect(),
    };
    let reply = tokio::time::timeout(PROBE_APPLY_TIMEOUT + Duration::from_secs(5), client.chunk_check(req))
        .await
        .map_err(|_| format!("{node} did not answer in time"))?
        .map_err(|s| format!("{node}: {}", s.message()))?
        .into_inner();
    if let Some(e) = reply.error {
        if e.code == Code::Changed as i32 {
            return Ok(None);
        }
        return Err(format!("{node}: {}", e.message));
    }
    let mut view = ReplicaView::new();
    let mut crypts = BTreeMap::new();
    for b in reply.blocks {
        let block = u16::try_from(b.block)
            .ok()
            .filter(|b| u64::from(*b) < CHUNK_SIZE / BLOCK_SIZE)
            .ok_or_else(|| format!("{node} reported block {} of a {}-block chunk", b.block, CHUNK_SIZE / BLOCK_SIZE))?;
        view.insert(block, (b.stored_crc, b.intact));
        if !b.crypt.is_empty() {
            let c = CryptContext::get(&b.crypt).ok_or_else(|| format!("{node} reported a malformed encryption context for block {block}"))?;
            crypts.insert(block, c);
        }
    }
    let want = fetch.len() * BLOCK_SIZE as usize;
    if reply.data.len() != want {
        return Err(format!("{node} returned {} bytes for {} blocks", reply.data.len(), fetch.len()));
    }
    let blocks = fetch
        .iter()
        .enumerate()
        .map(|(i, b)| (reply.data.slice(i * BLOCK_SIZE as usize..(i + 1) * BLOCK_SIZE as usize), crypts.get(b).copied()))
        .collect();
    let written = reply.written_since_probe.iter().filter_map(|b| u16::try_from(*b).ok()).collect();
    Ok(Some((view, blocks, written)))
}

/// Compares every replica's copy of `chunk` of `volume` and repairs the bad ones (the module
/// docs have the protocol). This node must lead the PG.
pub async fn check_and_repair(ctx: &NodeCtx, handle: &PgHandle, volume: VolumeId, chunk: u64) -> Result<ChunkVerdict, RepairError> {
    let pg = handle.shared.pg.0;
    let me = ctx.config.id;
    let failed = |reason: String| RepairError::Failed { pg, volume, chunk, reason };
    let status = handle.group.status();
    if !status.is_leader {
        let leader_addr = status.leader.and_then(|l| ctx.addr_of(handle, NodeId(l)));
        return Err(RepairError::NotLeader { pg, node: me, leader_addr });
    }
    // One comparison at a time on this node: concurrent ones for the same chunk would void each
    // other's probes, and repairs are rare enough that one at a time costs nothing.
    let _one_at_a_time = ctx.repair_lock.lock().await;
    let raft_error = |what: &str, e: basalt_raft::RaftError| match e {
        basalt_raft::RaftError::NotLeader { leader_addr, .. } => RepairError::NotLeader { pg, node: me, leader_addr },
        e => failed(format!("{what}: {e}")),
    };
    let reply = handle.group.propose(PgCommand::Probe { volume, chunk }.encode()).await.map_err(|e| raft_error("probe", e))?;
    let probe = match PgReply::decode(&reply) {
        PgReply::Index(i) => i,
        PgReply::NoSuchVolume => return Ok(ChunkVerdict::default()),
        other => return Err(failed(format!("probe refused: {other:?}"))),
    };
    // propose() returns once the leader applied the probe.
    let local = handle.shared.check_at_probe(volume, chunk, probe).await.map_err(|e| failed(e.to_string()))?;
    let Some((local, written)) = local else { return Err(RepairError::Changed { pg, volume, chunk }) };
    // Blocks written since the probe on any replica are left out: they hold newer data than
    // the probe, and the write that replaced them reaches every replica through the log.
    let mut excluded: BTreeSet<u16> = written.into_iter().collect();
    let mut views = vec![(me, view_of(&local))];
    for peer in status.voters.iter().map(|n| NodeId(*n)).filter(|n| *n != me) {
        match remote_check(ctx, handle, peer, volume, chunk, probe, Vec::new()).await {
            Ok(Some((view, _, written))) => {
                excluded.extend(written);
                views.push((peer, view));
            }
            Ok(None) => return Err(RepairError::Changed { pg, volume, chunk }),
            // Compare the replicas that answer; an absent one catches up through Raft.
            Err(e) => tracing::warn!(pg, %volume, chunk, error = %e, "a replica did not report its copy for the integrity comparison"),
        }
    }
    if views.len() < 2 {
        return Err(failed("no other replica answered; nothing to compare against".into()));
    }
    for (_, view) in &mut views {
        view.retain(|block, _| !excluded.contains(block));
    }

    let mut verdict = ChunkVerdict { bytes_read: local.bytes_read(), ..Default::default() };
    for plan in compare(&views, status.voters.len()) {
        verdict.corrupt += plan.corrupt;
        verdict.divergent += plan.divergent;
        let Some(keep) = plan.keep else {
            verdict.unrepairable += 1;
            let copies: Vec<String> = views
                .iter()
                .map(|(n, v)| match v.get(&plan.block) {
                    Some((crc, ok)) => format!("{n}: crc {crc:#010x} {}", if *ok { "intact" } else { "corrupt" }),
                    None => format!("{n}: unwritten"),
                })
                .collect();
            tracing::error!(pg, %volume, chunk, block = plan.block, copies = ?copies, "no replica can vouch for this block; left as is");
            continue;
        };
        let Some((data, crypt)) = fetch_intact(ctx, handle, &local, &plan, keep, volume, chunk, probe).await? else {
            // Written on the source since the probe: that write replaces the bad copies too.
            continue;
        };
        let offset = chunk * CHUNK_SIZE + u64::from(plan.block) * BLOCK_SIZE;
        let cmd = PgCommand::Repair { volume, probe_index: probe, offset, crc: keep, crypt, data };
        let reply = handle.group.propose(cmd.encode()).await.map_err(|e| raft_error("repair", e))?;
        match PgReply::decode(&reply) {
            PgReply::Ok | PgReply::NoSuchVolume => {}
            other => return Err(failed(format!("repair of block {} refused: {other:?}", plan.block))),
        }
        tracing::warn!(pg, %volume, chunk, block = plan.block, crc = keep, bad = ?plan.bad, "proposed a repair of a bad block");
        verdict.repaired += plan.bad.len() as u64;
    }
    Ok(verdict)
}

/// An intact copy of the plan's block with crc `keep` and its encryption context (encrypted
/// volumes): this node's own if it has one, else a source replica's (checked again on
/// arrival); `None` if the block was written since the probe meanwhile.
#[allow(clippy::too_many_arguments)]
async fn fetch_intact(
    ctx: &NodeCtx,
    handle: &PgHandle,
    local: &ChunkCheck,
    plan: &BlockPlan,
    keep: u32,
    volume: VolumeId,
    chunk: u64,
    probe: u64,
) -> Result<Option<(Bytes, Option<CryptContext>)>, RepairError> {
    let pg = handle.shared.pg.0;
    if plan.sources.contains(&ctx.config.id) {
        let crypt = local.blocks.iter().find(|b| b.block == plan.block).and_then(|b| b.crypt);
        return Ok(Some((local.block_data(plan.block), crypt)));
    }
    let mut why = Vec::new();
    for source in &plan.sources {
        match remote_check(ctx, handle, *source, volume, chunk, probe, vec![plan.block]).await {
            Ok(Some((_, _, written))) if written.contains(&plan.block) => return Ok(None),
            Ok(Some((_, mut blocks, _))) => {
                let (data, crypt) = blocks.pop().unwrap_or_default();
                if crc32c(&data) == keep {
                    return Ok(Some((data, crypt)));
                }
                why.push(format!("{source}: copy arrived with the wrong crc"));
            }
            Ok(None) => return Err(RepairError::Changed { pg, volume, chunk }),
            Err(e) => why.push(e),
        }
    }
    Err(RepairError::Failed { pg, volume, chunk, reason: format!("no intact copy of block {} could be fetched: {}", plan.block, why.join("; ")) })
}

/// Waits until this replica has applied `index` (bounded).
pub async fn wait_applied(handle: &PgHandle, index: u64) -> bool {
    let deadline = tokio::time::Instant::now() + PROBE_APPLY_TIMEOUT;
    loop {
        if handle.group.status().applied_index >= index {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The reply to a `ChunkCheck` from this replica (the RPC handler's body).
pub async fn answer_check(ctx: &NodeCtx, req: ChunkCheckRequest) -> Result<(Vec<basalt_proto::data::BlockState>, Bytes, Vec<u32>), DataError> {
    let node = ctx.config.id;
    let Some(handle) = ctx.pgs.get(basalt_common::PgId(req.pg)) else {
        return Err(err(Code::WrongNode, format!("{node} holds no replica of pg-{}", req.pg)));
    };
    if req.fetch_blocks.iter().any(|b| u64::from(*b) >= CHUNK_SIZE / BLOCK_SIZE) || req.fetch_blocks.len() > (CHUNK_SIZE / BLOCK_SIZE) as usize {
        return Err(err(Code::Invalid, "fetch_blocks names blocks outside one chunk"));
    }
    if !wait_applied(&handle, req.probe_index).await {
        return Err(err(Code::Unavailable, format!("{node} has not applied index {} of pg-{} yet", req.probe_index, req.pg)));
    }
    let volume = VolumeId(req.volume_id);
    match handle.shared.check_at_probe(volume, req.chunk, req.probe_index).await {
        Ok(None) => Err(err(Code::Changed, format!("{volume} chunk {} changed on {node} since probe {}", req.chunk, req.probe_index))),
        Ok(Some((check, written))) => {
            let blocks = check
                .blocks
                .iter()
                .map(|b| basalt_proto::data::BlockState {
                    block: u32::from(b.block),
                    stored_crc: b.stored_crc,
                    intact: b.is_intact(),
                    crypt: b.crypt.map(|c| CryptContext::encode_all(&[Some(c)]).into()).unwrap_or_default(),
                })
                .collect();
            let mut data = bytes::BytesMut::with_capacity(req.fetch_blocks.len() * BLOCK_SIZE as usize);
            for b in &req.fetch_blocks {
                data.extend_from_slice(&check.block_data(*b as u16));
            }
            Ok((blocks, data.freeze(), written.into_iter().map(u32::from).collect()))
        }
        Err(e) => Err(err(Code::Internal, format!("{e} (on {node})"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(blocks: &[(u16, u32, bool)]) -> ReplicaView {
        blocks.iter().map(|(b, c, ok)| (*b, (*c, *ok))).collect()
    }

    #[test]
    fn healthy_replicas_need_nothing() {
        let v = view(&[(0, 1, true), (5, 2, true)]);
        assert!(compare(&[(NodeId(1), v.clone()), (NodeId(2), v.clone()), (NodeId(3), v)], 3).is_empty());
    }

    #[test]
    fn a_corrupt_copy_is_rewritten_from_the_intact_ones() {
        let good = view(&[(3, 7, true)]);
        let plans = compare(&[(NodeId(1), good.clone()), (NodeId(2), view(&[(3, 7, false)])), (NodeId(3), good)], 3);
        assert_eq!(
            plans,
            vec![BlockPlan { block: 3, keep: Some(7), sources: vec![NodeId(1), NodeId(3)], bad: vec![NodeId(2)], corrupt: 1, divergent: 0 }]
        );
    }

    #[test]
    fn two_rotten_copies_are_recovered_from_the_third_when_all_record_the_same_crc() {
        let plans = compare(&[(NodeId(1), view(&[(0, 7, false)])), (NodeId(2), view(&[(0, 7, true)])), (NodeId(3), view(&[(0, 7, false)]))], 3);
        assert_eq!(plans[0].keep, Some(7));
        assert_eq!(plans[0].bad, vec![NodeId(1), NodeId(3)]);
        assert_eq!(plans[0].corrupt, 2);
    }

    #[test]
    fn a_divergent_copy_with_a_valid_crc_loses_to_the_majority() {
        let plans = compare(&[(NodeId(1), view(&[(9, 7, true)])), (NodeId(2), view(&[(9, 8, true)])), (NodeId(3), view(&[(9, 7, true)]))], 3);
        assert_eq!(
            plans,
            vec![BlockPlan { block: 9, keep: Some(7), sources: vec![NodeId(1), NodeId(3)], bad: vec![NodeId(2)], corrupt: 0, divergent: 1 }]
        );
    }

    #[test]
    fn an_unwritten_block_counts_as_zeros() {
        // Two replicas never wrote block 4; the third holds something else there.
        let plans = compare(&[(NodeId(1), view(&[])), (NodeId(2), view(&[(4, 99, true)])), (NodeId(3), view(&[]))], 3);
        assert_eq!(plans[0].keep, Some(ZERO_BLOCK_CRC));
        assert_eq!(plans[0].bad, vec![NodeId(2)]);
    }

    #[test]
    fn nothing_is_guessed_without_a_majority() {
        // Two replicas answered and disagree, both intact: no way to tell which is right.
        let plans = compare(&[(NodeId(1), view(&[(1, 5, true)])), (NodeId(2), view(&[(1, 6, true)]))], 3);
        assert_eq!(plans[0].keep, None);
        assert!(plans[0].bad.is_empty());
        // Three-way disagreement, likewise.
        let plans = compare(&[(NodeId(1), view(&[(1, 5, true)])), (NodeId(2), view(&[(1, 6, true)])), (NodeId(3), view(&[(1, 7, true)]))], 3);
        assert_eq!(plans[0].keep, None);
        // Four voters (mid membership change), two answering alike: not a majority of the PG.
        let plans = compare(&[(NodeId(1), view(&[(1, 5, true)])), (NodeId(2), view(&[(1, 5, false)]))], 4);
        assert_eq!(plans[0].keep, None);
        // Every copy corrupt: nothing intact to copy from.
        let plans = compare(&[(NodeId(1), view(&[(1, 5, false)])), (NodeId(2), view(&[(1, 5, false)]))], 2);
        assert_eq!(plans[0].keep, None);
    }

    #[test]
    fn a_rotten_copy_still_votes_for_what_it_recorded() {
        // Replica 2 rotted, replica 3 diverged: two of three recorded 7, and 1 holds it intact.
        let plans = compare(&[(NodeId(1), view(&[(0, 7, true)])), (NodeId(2), view(&[(0, 7, false)])), (NodeId(3), view(&[(0, 8, true)]))], 3);
        assert_eq!(plans[0].keep, Some(7));
        assert_eq!(plans[0].bad, vec![NodeId(2), NodeId(3)]);
        assert_eq!((plans[0].corrupt, plans[0].divergent), (1, 1));
    }

    #[test]
    fn with_one_replica_down_a_corrupt_copy_is_still_repaired_from_the_other() {
        let plans = compare(&[(NodeId(1), view(&[(2, 7, false)])), (NodeId(2), view(&[(2, 7, true)]))], 3);
        assert_eq!(plans[0].keep, Some(7));
        assert_eq!(plans[0].bad, vec![NodeId(1)]);
    }
}
