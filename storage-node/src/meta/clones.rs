//! Clones in the meta state: a clone is a writable volume made from a snapshot in O(1). It
//! has its own id and name; its extents are placed like its root ancestor's (so each of its
//! chunks lives in the same PG as the chunk it inherits), and PGs read a chunk it never wrote
//! through its lineage: the parent at the snapshot's epoch, then the parent's own lineage
//! (`basalt_chunk_store::Lineage`; docs/architecture.md, "Clones").
//!
//! What a clone inherits stays stored as long as the clone does: the epochs it reads count
//! as live in its ancestors' releases (a snapshot deleted while clones read it only leaves the
//! listing), and a deleted ancestor releases its data only once no clone reads it.

use std::collections::BTreeSet;

use basalt_common::names::validate_name;
use basalt_common::{PgId, VolumeId};
use serde::{Deserialize, Serialize};

use super::state::{ClusterState, MetaError, MetaReply};

/// Most ancestors a clone may have (a clone of a clone of ...): each is a lookup on reads of
/// chunks the clone never wrote. Matches the PG command limit.
pub const MAX_CLONE_DEPTH: usize = 16;

/// Where a clone came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneOrigin {
    /// The volume it was made from, and that volume's name then (for listings).
    pub parent: VolumeId,
    /// The parent's name when the clone was made.
    pub parent_name: String,
    /// The snapshot it was made from.
    pub snapshot: String,
    /// What it reads where it wrote nothing: ancestors and the epoch each is read at,
    /// nearest first.
    pub lineage: Vec<(VolumeId, u64)>,
    /// The volume whose extent placement it follows (its root ancestor).
    pub placement: VolumeId,
}

impl ClusterState {
    /// Makes volume `name` a clone of `source`'s snapshot `snapshot`.
    pub(super) fn clone_volume(&mut self, source: &str, snapshot: &str, name: String, now_unix_ms: u64) -> MetaReply {
        if let Err(e) = validate_name(&name) {
            return MetaReply::Error(MetaError::InvalidName(e.to_string()));
        }
        let Some(parent) = self.volume_by_name(source).cloned() else {
            return MetaReply::Error(MetaError::NoSuchVolume(source.to_string()));
        };
        if self.volume_keys.contains_key(&parent.id) {
            return MetaReply::Error(MetaError::InvalidSettings(format!(
                "volume {source} is encrypted: clones of encrypted volumes are not built yet (they would need the parent's keys)"
            )));
        }
        let Some(epoch) = self.snapshots.get(&parent.id).and_then(|s| s.snapshots.get(snapshot)).map(|s| s.epoch) else {
            return MetaReply::Error(MetaError::NoSuchSnapshot { volume: source.to_string(), name: snapshot.to_string() });
        };
        let grand = self.clones.get(&parent.id).cloned();
        let mut lineage = vec![(parent.id, epoch)];
        lineage.extend(grand.iter().flat_map(|g| g.lineage.iter().copied()));
        if lineage.len() > MAX_CLONE_DEPTH {
            return MetaReply::Error(MetaError::InvalidSettings(format!(
                "volume {source} is a clone {} levels deep; a clone of it would pass the limit of {MAX_CLONE_DEPTH}",
                lineage.len() - 1
            )));
        }
        let placement = grand.map_or(parent.id, |g| g.placement);
        let reply = self.create_volume(name, parent.size, now_unix_ms, None);
        if let MetaReply::Volume(v) = &reply {
            self.clones.insert(
                v.id,
                CloneOrigin { parent: parent.id, parent_name: parent.name.clone(), snapshot: snapshot.to_string(), lineage, placement },
            );
        }
        reply
    }

    /// The epochs of `volume` that must stay readable: its live snapshots', and those clones
    /// (and their clones) read it at. Ascending.
    pub fn kept_epochs(&self, volume: VolumeId) -> Vec<u64> {
        let mut kept: BTreeSet<u64> = self.snapshots.get(&volume).map(|s| s.live_epochs().into_iter().collect()).unwrap_or_default();
        kept.extend(self.clones.values().flat_map(|c| c.lineage.iter().filter(|(v, _)| *v == volume).map(|(_, e)| *e)));
        kept.into_iter().collect()
    }

    /// Whether some clone reads `volume`'s data.
    pub fn read_by_clones(&self, volume: VolumeId) -> bool {
        self.clones.values().any(|c| c.lineage.iter().any(|(v, _)| *v == volume))
    }

    /// Clone `volume`'s record is gone: its ancestors release what only it read.
    pub(super) fn clone_gone(&mut self, volume: VolumeId) {
        let Some(origin) = self.clones.remove(&volume) else { return };
        let pgs: BTreeSet<PgId> = self.pgs.iter().map(|p| p.id).collect();
        for (ancestor, _) in origin.lineage {
            if let Some(snaps) = self.snapshots.get_mut(&ancestor) {
                snaps.release_generation += 1;
                snaps.release_todo = pgs.clone();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::state::{MetaCommand, tests::initialized};
    use super::*;

    fn apply(s: &mut ClusterState, cmd: MetaCommand) -> MetaReply {
        let index = s.version + 1;
        s.apply(index, cmd)
    }

    fn clone(s: &mut ClusterState, source: &str, snapshot: &str, name: &str) -> MetaReply {
        apply(s, MetaCommand::CloneVolume { source: source.into(), snapshot: snapshot.into(), name: name.into(), now_unix_ms: 9 })
    }

    fn id(s: &ClusterState, name: &str) -> VolumeId {
        s.volume_by_name(name).map(|v| v.id).expect("volume exists")
    }

    #[test]
    fn clones_chain_keep_their_ancestors_epochs_and_defer_their_deletion() {
        let mut s = initialized();
        apply(&mut s, MetaCommand::CreateVolume { name: "base".into(), size: 1 << 30, now_unix_ms: 1 });
        apply(&mut s, MetaCommand::CreateSnapshot { volume: "base".into(), name: "s1".into(), now_unix_ms: 2 });
        let base = id(&s, "base");

        // Bad input: each a clear error.
        assert!(matches!(clone(&mut s, "nope", "s1", "c"), MetaReply::Error(MetaError::NoSuchVolume(_))));
        assert!(matches!(clone(&mut s, "base", "nope", "c"), MetaReply::Error(MetaError::NoSuchSnapshot { .. })));
        assert!(matches!(clone(&mut s, "base", "s1", "base"), MetaReply::Error(MetaError::VolumeExists(_))));
        assert!(matches!(clone(&mut s, "base", "s1", "bad name"), MetaReply::Error(MetaError::InvalidName(_))));

        let MetaReply::Volume(c) = clone(&mut s, "base", "s1", "c") else { panic!("clone") };
        assert_eq!(c.size, 1 << 30);
        let origin = s.clones[&c.id].clone();
        assert_eq!((origin.lineage.clone(), origin.placement), (vec![(base, 1)], base));
        // A clone of the clone reads through both; its placement is the root's.
        apply(&mut s, MetaCommand::CreateSnapshot { volume: "c".into(), name: "cs".into(), now_unix_ms: 3 });
        let MetaReply::Volume(g) = clone(&mut s, "c", "cs", "g") else { panic!("grandchild") };
        assert_eq!(s.clones[&g.id].lineage, vec![(c.id, 1), (base, 1)]);
        assert_eq!(s.clones[&g.id].placement, base);

        // The snapshot goes from the listing, its epoch stays kept.
        apply(&mut s, MetaCommand::DeleteSnapshot { volume: "base".into(), name: "s1".into() });
        assert!(s.snapshots_of(base).snapshots.is_empty());
        assert_eq!(s.kept_epochs(base), vec![1]);

        // The base is deleted: it leaves the namespace, but clones still read it.
        apply(&mut s, MetaCommand::DeleteVolume { name: "base".into() });
        assert!(s.volume_by_name("base").is_none());
        assert!(s.read_by_clones(base));
        // Once both clones are gone, nothing reads it, and the clone's own snapshot epoch
        // that the grandchild read is released.
        for (name, vid) in [("g", g.id), ("c", c.id)] {
            apply(&mut s, MetaCommand::DeleteVolume { name: name.into() });
            for pg in s.pgs.iter().map(|p| p.id).collect::<Vec<_>>() {
                apply(&mut s, MetaCommand::VolumePgReleased { volume: vid, pg });
            }
            assert!(!s.clones.contains_key(&vid));
        }
        assert!(!s.read_by_clones(base));
        assert!(s.kept_epochs(base).is_empty());
    }
}
