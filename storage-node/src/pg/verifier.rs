//! The node's side of the integrity scrub ([`basalt_scrubber::Verifier`]): which chunks a pass
//! covers and how one is checked.
//!
//! A local pass reads each chunk of every PG replica on this node under the PG's read lock (so
//! no block is caught half-written) and checks it against its crcs; a bad block is handed to
//! the PG leader, which compares all replicas and repairs through the log ([`super::repair`]).
//! A deep pass runs that comparison for every chunk of the PGs this node leads.

use std::sync::Arc;
use std::time::Duration;

use basalt_chunk_store::ChunkKey;
use basalt_common::{NodeId, PgId, VolumeId};
use basalt_proto::data::RepairChunkRequest;
use basalt_proto::data::data_error::Code;
use basalt_scrubber::{ChunkVerdict, PassKind, Verifier};

use super::manager::PgHandle;
use super::repair::{self, RepairError};
use crate::node::NodeCtx;

/// Attempts at getting a bad chunk compared and repaired (leader changes, concurrent writes).
const REPAIR_ATTEMPTS: u32 = 4;

/// Checks this node's chunks for the integrity scrubber.
pub struct NodeVerifier {
    ctx: Arc<NodeCtx>,
}

impl NodeVerifier {
    /// A verifier over the node's PGs.
    pub fn new(ctx: Arc<NodeCtx>) -> Self {
        Self { ctx }
    }

    /// Gets `chunk` compared and repaired by the PG leader (this node or another).
    async fn repair(&self, handle: &PgHandle, volume: VolumeId, chunk: u64) -> Result<ChunkVerdict, String> {
        let pg = handle.shared.pg.0;
        let mut last = String::new();
        for attempt in 0..REPAIR_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
            }
            let status = handle.group.status();
            if status.is_leader {
                match repair::check_and_repair(&self.ctx, handle, volume, chunk).await {
                    Ok(v) => return Ok(v),
                    Err(e @ (RepairError::Changed { .. } | RepairError::NotLeader { .. })) => last = e.to_string(),
                    Err(e) => return Err(e.to_string()),
                }
                continue;
            }
            let Some(leader) = status.leader.map(NodeId) else {
                last = format!("pg-{pg} has no leader");
                continue;
            };
            let Some(addr) = self.ctx.addr_of(handle, leader) else {
                last = format!("address of {leader} unknown");
                continue;
            };
            let mut client = self.ctx.clients.data(&addr).map_err(|e| e.to_string())?;
            let req = RepairChunkRequest { pg, volume_id: volume.0, chunk };
            match tokio::time::timeout(Duration::from_secs(30), client.repair_chunk(req)).await {
                Ok(Ok(reply)) => {
                    let r = reply.into_inner();
                    match r.error {
                        None => {
                            return Ok(ChunkVerdict {
                                bytes_read: 0,
                                corrupt: r.corrupt,
                                divergent: r.divergent,
                                repaired: r.repaired,
                                unrepairable: r.unrepairable,
                                errors: 0,
                            });
                        }
                        Some(e) if e.code == Code::NotLeader as i32 || e.code == Code::Changed as i32 || e.code == Code::Unavailable as i32 => {
                            last = format!("{leader}: {}", e.message);
                        }
                        Some(e) => return Err(format!("{leader}: {}", e.message)),
                    }
                }
                Ok(Err(status)) => last = format!("{leader}: {}", status.message()),
                Err(_) => last = format!("{leader} did not answer within 30 s"),
            }
        }
        Err(format!("{volume} chunk {chunk} in pg-{pg}: gave up after {REPAIR_ATTEMPTS} attempts: {last}"))
    }
}

impl Verifier for NodeVerifier {
    fn chunks(&self, kind: PassKind) -> Vec<ChunkKey> {
        self.ctx
            .pgs
            .statuses()
            .into_iter()
            .filter(|s| kind == PassKind::Local || s.is_leader)
            .flat_map(|s| self.ctx.store.list_chunks(s.group))
            .collect()
    }

    async fn verify(&self, key: ChunkKey, kind: PassKind) -> Result<ChunkVerdict, String> {
        // The PG may have moved off this node since the pass listed its chunks.
        let Some(handle) = self.ctx.pgs.get(PgId(key.shard)) else { return Ok(ChunkVerdict::default()) };
        match kind {
            PassKind::Deep => {
                if !handle.group.status().is_leader {
                    // Leadership moved: the new leader's deep pass covers this PG.
                    return Ok(ChunkVerdict::default());
                }
                if self.ctx.store.head_key(key) != Some(key) {
                    // Replicas are compared by their newest versions: the chunk's other
                    // versions would repeat the same comparison.
                    return Ok(ChunkVerdict::default());
                }
                self.repair(&handle, key.volume, key.chunk).await
            }
            PassKind::Local => {
                let check = {
                    let _guard = handle.shared.lock.read().await;
                    self.ctx.store.check_chunk(key).await.map_err(|e| e.to_string())?
                };
                let Some(check) = check else { return Ok(ChunkVerdict::default()) };
                let corrupt = check.corrupt().count() as u64;
                let mut verdict = ChunkVerdict { bytes_read: check.bytes_read(), corrupt, ..Default::default() };
                if corrupt > 0 {
                    for b in check.corrupt() {
                        tracing::error!(
                            pg = key.shard, volume = %key.volume, chunk = key.chunk, block = b.block,
                            stored_crc = b.stored_crc, actual_crc = b.actual_crc,
                            "integrity scrub: block fails its checksum; asking the PG leader to repair it"
                        );
                    }
                    match self.repair(&handle, key.volume, key.chunk).await {
                        Ok(v) => {
                            verdict.divergent = v.divergent;
                            verdict.repaired = v.repaired;
                            verdict.unrepairable = v.unrepairable;
                        }
                        Err(e) => {
                            // Not unrepairable: the leader or a replica may answer next pass.
                            verdict.errors += 1;
                            tracing::error!(pg = key.shard, volume = %key.volume, chunk = key.chunk, error = %e, "repair of a corrupt chunk failed; the next pass tries again");
                        }
                    }
                }
                Ok(verdict)
            }
        }
    }
}
