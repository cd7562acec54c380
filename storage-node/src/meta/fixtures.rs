//! Test fixtures shared by the meta planners' unit tests (healer, leaders, membership).

use basalt_common::{DomainLevel, Layout, NodeId};

use super::healer::Health;
use super::state::{ClusterSettings, ClusterState, MetaCommand, MetaReply, NodeRecord, Role};

/// A storage node `id` in zone `zone` (host `h{id}`), 10 GiB.
pub fn node(id: u64, zone: &str) -> NodeRecord {
    NodeRecord {
        id: NodeId(id),
        addr: format!("127.0.0.1:{}", 7000 + id),
        labels: format!("zone={zone},host=h{id}").parse().expect("fixture labels parse"),
        roles: [Role::Storage].into_iter().collect(),
        capacity_bytes: 10 << 30,
        metrics_addr: String::new(),
    }
}

/// A cluster initialised with `nodes`, `pgs` PGs, replicas differing by zone.
pub fn cluster_of(nodes: Vec<NodeRecord>, pgs: u32) -> ClusterState {
    let mut s = ClusterState::default();
    let settings = ClusterSettings { layout: Layout { extent_size: 4 << 20, pg_count: pgs }, failure_domain: DomainLevel::Zone };
    assert_eq!(s.apply(1, MetaCommand::InitCluster { cluster_id: "c".into(), settings, nodes }), MetaReply::Done);
    s
}

/// A cluster of storage nodes `(id, zone)` with `pgs` PGs.
pub fn cluster(nodes: &[(u64, &str)], pgs: u32) -> ClusterState {
    cluster_of(nodes.iter().map(|(id, z)| node(*id, z)).collect(), pgs)
}

/// Nodes `up` heard from, nodes `dead` silent past the timeout.
pub fn health(up: &[u64], dead: &[u64]) -> Health {
    Health { up: up.iter().map(|i| NodeId(*i)).collect(), dead: dead.iter().map(|i| NodeId(*i)).collect(), ..Default::default() }
}
