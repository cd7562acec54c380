//! What the meta leader knows of nodes between log entries: when each was last heard from,
//! its current usage and its placement groups' state. Kept in memory, rebuilt within a heartbeat
//! interval by any new leader; nothing here needs to survive a failover.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use basalt_common::NodeId;
use basalt_proto::admin;

use super::state::NodeRecord;

/// A node is "down" after this long without a heartbeat.
pub const DOWN_AFTER: Duration = Duration::from_secs(5);

struct Seen {
    at: Instant,
    node: admin::Node,
    pgs: Vec<admin::PlacementGroup>,
}

/// The leader's live view of nodes.
#[derive(Default)]
pub struct Liveness {
    seen: Mutex<HashMap<NodeId, Seen>>,
    /// Which nodes serve which QoS-limited volumes.
    qos: crate::qos::QosActivity,
}

/// A PG as the replicas report it.
#[derive(Clone, Debug, Default)]
pub struct PgView {
    /// Leader reported with the highest term.
    pub leader: u64,
    /// That term.
    pub term: u64,
    /// Applied index reported by the leader.
    pub applied_index: u64,
    /// Replicas that report following that leader in that term.
    pub live: Vec<u64>,
    /// Applied index each of `live` reported (the leader's too), by node.
    pub applied: BTreeMap<u64, u64>,
}

/// Converts a heartbeat's node description into a registry record.
pub fn record_from_proto(n: &admin::Node) -> NodeRecord {
    let l = n.labels.clone().unwrap_or_default();
    NodeRecord {
        id: NodeId(n.id),
        addr: n.addr.clone(),
        labels: basalt_common::Labels { region: l.region, zone: l.zone, rack: l.rack, host: l.host },
        roles: n.roles.iter().filter_map(|r| r.parse().ok()).collect(),
        capacity_bytes: n.capacity_bytes,
        metrics_addr: n.metrics_addr.clone(),
    }
}

impl Liveness {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Seen>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Node `node` saw `demand` (volume, requests, bytes) of QoS-limited volumes since its
    /// previous heartbeat; its share of each.
    pub fn qos_report(&self, node: NodeId, demand: &[(basalt_common::VolumeId, u64, u64)]) -> Vec<(basalt_common::VolumeId, crate::qos::Share)> {
        self.qos.report(node, demand)
    }

    /// Records a heartbeat.
    pub fn record(&self, node: admin::Node, pgs: Vec<admin::PlacementGroup>) {
        self.lock().insert(NodeId(node.id), Seen { at: Instant::now(), node, pgs });
    }

    /// "up", "down" or "unknown", and how long ago the node was heard from.
    pub fn state(&self, id: NodeId) -> (&'static str, Option<Duration>) {
        match self.lock().get(&id) {
            Some(s) if s.at.elapsed() < DOWN_AFTER => ("up", Some(s.at.elapsed())),
            Some(s) => ("down", Some(s.at.elapsed())),
            None => ("unknown", None),
        }
    }

    /// The last heartbeat's node description.
    pub fn last_report(&self, id: NodeId) -> Option<admin::Node> {
        self.lock().get(&id).map(|s| s.node.clone())
    }

    /// Nodes heard from within `max_age` (used to build the node list at `cluster init`).
    pub fn recent(&self, max_age: Duration) -> Vec<NodeRecord> {
        self.lock().values().filter(|s| s.at.elapsed() < max_age).map(|s| record_from_proto(&s.node)).collect()
    }

    /// The cluster versions of nodes heard from within `max_age` (before `cluster init`).
    pub fn recent_versions(&self, max_age: Duration) -> Vec<(NodeId, basalt_common::version::VersionRange)> {
        self.lock()
            .values()
            .filter(|s| s.at.elapsed() < max_age)
            .filter_map(|s| basalt_proto::node_versions(&s.node).ok().map(|r| (NodeId(s.node.id), r)))
            .collect()
    }

    /// Each PG's leader, term and following replicas, from live nodes' reports.
    pub fn pg_views(&self) -> BTreeMap<u32, PgView> {
        let seen = self.lock();
        let mut out: BTreeMap<u32, PgView> = BTreeMap::new();
        for s in seen.values().filter(|s| s.at.elapsed() < DOWN_AFTER) {
            for pg in &s.pgs {
                let v = out.entry(pg.id).or_default();
                if pg.leader != 0 && pg.term > v.term {
                    *v = PgView { leader: pg.leader, term: pg.term, ..PgView::default() };
                }
            }
        }
        for s in seen.values().filter(|s| s.at.elapsed() < DOWN_AFTER) {
            for pg in &s.pgs {
                if let Some(v) = out.get_mut(&pg.id)
                    && pg.leader == v.leader
                    && pg.term == v.term
                    && v.leader != 0
                {
                    v.live.push(s.node.id);
                    v.applied.insert(s.node.id, pg.applied_index);
                    if s.node.id == v.leader {
                        v.applied_index = pg.applied_index;
                    }
                }
            }
        }
        for v in out.values_mut() {
            v.live.sort_unstable();
        }
        out
    }
}
