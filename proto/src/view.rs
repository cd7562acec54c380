//! The cluster map decoded into the form clients and nodes route with.

use std::collections::HashMap;

use basalt_common::{Layout, NodeId, PgId, VolumeId};

use crate::admin;

/// A volume as routing needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeView {
    /// Id.
    pub id: VolumeId,
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// False while the volume is being deleted.
    pub active: bool,
    /// Current attachment fencing epoch.
    pub attach_epoch: u64,
    /// Blocks are sealed by the client (nodes refuse unsealed writes to it).
    pub encrypted: bool,
    /// The snapshot write epoch writes carry now.
    pub write_epoch: u64,
    /// Live snapshots (name, epoch), oldest first.
    pub snapshots: Vec<(String, u64)>,
    /// A snapshot the read-write holder is asked to cut.
    pub snapshot_pending: Option<String>,
    /// A clone's ancestors and the snapshot epoch it reads each at, nearest first (empty: not
    /// a clone).
    pub lineage: Vec<(VolumeId, u64)>,
    /// The volume whose extent placement this one follows (its own id unless a clone).
    pub placement: VolumeId,
    /// The backup node writing a restore into it: of node certificates, only its writes.
    pub restored_by: Option<NodeId>,
    /// The QoS limits its I/O is held to.
    pub qos: basalt_common::qos::QosLimits,
}

impl VolumeView {
    /// The epoch of live snapshot `name`.
    pub fn snapshot_epoch(&self, name: &str) -> Option<u64> {
        self.snapshots.iter().find(|(n, _)| n == name).map(|(_, e)| *e)
    }
}

/// A node as routing needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// Id.
    pub id: NodeId,
    /// gRPC address.
    pub addr: String,
    /// Has the meta role (a member of the meta group or a spare): admin requests and map
    /// polls can go to it.
    pub meta: bool,
    /// Has the backup role (may read and write volumes for the backup tier).
    pub backup: bool,
}

/// One version of the cluster map.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    /// Map version (meta log index of the last change).
    pub version: u64,
    /// Cluster id; empty before init.
    pub cluster_id: String,
    /// Geometry; `None` before init.
    pub layout: Option<Layout>,
    /// Nodes by id.
    pub nodes: HashMap<NodeId, NodeView>,
    /// Replicas of each PG, by PG id.
    pub pgs: Vec<Vec<NodeId>>,
    /// PGs moving a replica: the node receiving the new one.
    pub incoming: HashMap<PgId, NodeId>,
    /// Volumes by id.
    pub volumes: HashMap<VolumeId, VolumeView>,
    /// Storage nodes export series per volume.
    pub per_volume_metrics: bool,
}

impl ClusterView {
    /// Decodes a map received over the wire.
    pub fn from_proto(map: &admin::ClusterMap) -> Self {
        let layout = (map.pg_count > 0 && map.extent_size > 0).then_some(Layout { extent_size: map.extent_size, pg_count: map.pg_count });
        let mut pgs = vec![Vec::new(); map.pgs.len()];
        let mut incoming = HashMap::new();
        for pg in &map.pgs {
            if let Some(slot) = pgs.get_mut(pg.id as usize) {
                *slot = pg.replicas.iter().map(|r| NodeId(*r)).collect();
            }
            if pg.moving_to != 0 {
                incoming.insert(PgId(pg.id), NodeId(pg.moving_to));
            }
        }
        Self {
            version: map.version,
            cluster_id: map.cluster_id.clone(),
            layout,
            nodes: map
                .nodes
                .iter()
                .map(|n| {
                    (
                        NodeId(n.id),
                        NodeView {
                            id: NodeId(n.id),
                            addr: n.addr.clone(),
                            meta: n.roles.iter().any(|r| r == "meta"),
                            backup: n.roles.iter().any(|r| r == "backup"),
                        },
                    )
                })
                .collect(),
            pgs,
            incoming,
            volumes: map
                .volumes
                .iter()
                .map(|v| {
                    (
                        VolumeId(v.id),
                        VolumeView {
                            id: VolumeId(v.id),
                            name: v.name.clone(),
                            size: v.size,
                            active: v.state == "active",
                            attach_epoch: v.attach_epoch,
                            encrypted: v.encrypted,
                            write_epoch: v.write_epoch.max(1),
                            snapshots: v.snapshots.iter().map(|s| (s.name.clone(), s.epoch)).collect(),
                            snapshot_pending: (!v.snapshot_pending.is_empty()).then(|| v.snapshot_pending.clone()),
                            lineage: v.lineage.iter().map(|a| (VolumeId(a.volume_id), a.epoch)).collect(),
                            placement: VolumeId(if v.placement_id == 0 { v.id } else { v.placement_id }),
                            restored_by: (v.restoring_node != 0).then_some(NodeId(v.restoring_node)),
                            qos: v.qos.as_ref().map(qos_from_proto).unwrap_or_default(),
                        },
                    )
                })
                .collect(),
            per_volume_metrics: map.per_volume_metrics,
        }
    }

    /// The active volume called `name`.
    pub fn volume_by_name(&self, name: &str) -> Option<&VolumeView> {
        self.volumes.values().find(|v| v.name == name && v.active)
    }

    /// Replicas of `pg`.
    pub fn replicas(&self, pg: PgId) -> &[NodeId] {
        self.pgs.get(pg.0 as usize).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Whether `node` should host a replica of `pg`: it holds one or is receiving one.
    pub fn hosts(&self, pg: PgId, node: NodeId) -> bool {
        self.replicas(pg).contains(&node) || self.incoming.get(&pg) == Some(&node)
    }

    /// Address of `node`.
    pub fn addr(&self, node: NodeId) -> Option<&str> {
        self.nodes.get(&node).map(|n| n.addr.as_str())
    }
}

/// QoS limits from the wire.
pub fn qos_from_proto(q: &admin::Qos) -> basalt_common::qos::QosLimits {
    basalt_common::qos::QosLimits { iops: q.iops, bps: q.bps, burst_ms: q.burst_ms }
}

/// QoS limits for the wire.
pub fn qos_to_proto(q: &basalt_common::qos::QosLimits) -> admin::Qos {
    admin::Qos { iops: q.iops, bps: q.bps, burst_ms: q.burst_ms }
}
