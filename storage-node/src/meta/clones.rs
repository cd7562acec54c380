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

use super::state::{ClusterState, MetaError, MetaReply, VolumeKeys};

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
    /// Makes volume `name` a clone of `source`'s snapshot `snapshot`. An encrypted source's
    /// clone comes with `keys`: its own copies of every source version and one fresh version,
    /// the newest, that it seals with (a key shared with the source never seals in the clone,
    /// where its nonces could repeat the source's).
    pub(super) fn clone_volume(&mut self, source: &str, snapshot: &str, name: String, now_unix_ms: u64, keys: Option<VolumeKeys>) -> MetaReply {
        if let Err(e) = validate_name(&name) {
            return MetaReply::Error(MetaError::InvalidName(e.to_string()));
        }
        let Some(parent) = self.volume_by_name(source).cloned() else {
            return MetaReply::Error(MetaError::NoSuchVolume(source.to_string()));
        };
        let parent_keys = self.volume_keys.get(&parent.id).cloned();
        match (&parent_keys, &keys) {
            (Some(_), None) => {
                return MetaReply::Error(MetaError::InvalidSettings(format!(
                    "volume {source} is encrypted: its clone needs its own copies of the source's keys (basalt volume clone --kek-file FILE)"
                )));
            }
            (None, Some(_)) => {
                return MetaReply::Error(MetaError::InvalidSettings(format!("volume {source} is not encrypted: a clone of it takes no keys")));
            }
            (Some(theirs), Some(ours)) => {
                let newest = theirs.digests.keys().next_back().copied().unwrap_or(0);
                let inherited_all = theirs.digests.keys().all(|k| ours.digests.contains_key(k));
                if !inherited_all
                    || ours.digests.len() != theirs.digests.len() + 1
                    || ours.current <= newest
                    || !ours.digests.contains_key(&ours.current)
                {
                    return MetaReply::Error(MetaError::InvalidSettings(format!(
                        "a clone of encrypted volume {source} must carry its key versions {:?} and one newer version",
                        theirs.digests.keys().collect::<Vec<_>>()
                    )));
                }
            }
            (None, None) => {}
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
        let reply = self.create_volume(name, parent.size, now_unix_ms, keys);
        if let MetaReply::Volume(v) = &reply {
            self.clones.insert(
                v.id,
                CloneOrigin { parent: parent.id, parent_name: parent.name.clone(), snapshot: snapshot.to_string(), lineage, placement },
            );
            if let Some(theirs) = parent_keys {
                // Each inherited version opens blocks bound to the volume that sealed them:
                // the source, or whoever the source inherited it from.
                let sealed_in = self.inherited_keys.get(&parent.id).cloned().unwrap_or_default();
                let inherited = theirs.digests.keys().map(|k| (*k, sealed_in.get(k).copied().unwrap_or(parent.id))).collect();
                self.inherited_keys.insert(v.id, inherited);
            }
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

    #[test]
    fn an_encrypted_clone_has_its_own_keys_and_knows_where_each_inherited_one_seals() {
        let mut s = initialized();
        let keys = VolumeKeys { key_id: 5, current: 1, digests: [(1, [1u8; 32])].into() };
        apply(&mut s, MetaCommand::CreateEncryptedVolume { name: "e".into(), size: 1 << 20, now_unix_ms: 1, keys });
        apply(&mut s, MetaCommand::CreateSnapshot { volume: "e".into(), name: "s".into(), now_unix_ms: 2 });
        let e = id(&s, "e");
        let enc_clone = |s: &mut ClusterState, source: &str, name: &str, keys: VolumeKeys| {
            apply(s, MetaCommand::CloneEncryptedVolume { source: source.into(), snapshot: "s".into(), name: name.into(), now_unix_ms: 3, keys })
        };
        // Without keys, with too few, with no newer version: refused.
        assert!(matches!(clone(&mut s, "e", "s", "c"), MetaReply::Error(MetaError::InvalidSettings(m)) if m.contains("--kek-file")));
        for bad in [
            VolumeKeys { key_id: 6, current: 2, digests: [(2, [2u8; 32])].into() },
            VolumeKeys { key_id: 6, current: 1, digests: [(1, [2u8; 32])].into() },
        ] {
            assert!(matches!(enc_clone(&mut s, "e", "c", bad), MetaReply::Error(MetaError::InvalidSettings(_))));
        }
        let ours = VolumeKeys { key_id: 6, current: 2, digests: [(1, [2u8; 32]), (2, [3u8; 32])].into() };
        let MetaReply::Volume(c) = enc_clone(&mut s, "e", "c", ours.clone()) else { panic!("clone") };
        assert_eq!(s.volume_keys[&c.id], ours);
        assert_eq!(s.inherited_keys[&c.id], [(1, e)].into());
        // A clone of the clone: version 1 still seals as `e`, version 2 as `c`.
        apply(&mut s, MetaCommand::CreateSnapshot { volume: "c".into(), name: "s".into(), now_unix_ms: 4 });
        let theirs = VolumeKeys { key_id: 7, current: 3, digests: [(1, [4u8; 32]), (2, [5u8; 32]), (3, [6u8; 32])].into() };
        let MetaReply::Volume(g) = enc_clone(&mut s, "c", "g", theirs) else { panic!("grandchild") };
        assert_eq!(s.inherited_keys[&g.id], [(1, e), (2, c.id)].into());
        // A plain source takes no keys.
        apply(&mut s, MetaCommand::CreateVolume { name: "p".into(), size: 1 << 20, now_unix_ms: 1 });
        apply(&mut s, MetaCommand::CreateSnapshot { volume: "p".into(), name: "s".into(), now_unix_ms: 2 });
        assert!(matches!(enc_clone(&mut s, "p", "pc", ours), MetaReply::Error(MetaError::InvalidSettings(_))));
        // Deleting the source erases its keys, not the clone's.
        s.key_effects.clear();
        apply(&mut s, MetaCommand::DeleteVolume { name: "e".into() });
        assert_eq!(s.key_effects, vec![super::super::state::KeyEffect::Erase(5)]);
        assert!(s.volume_keys.contains_key(&c.id));
        apply(&mut s, MetaCommand::DeleteVolume { name: "g".into() });
        assert!(!s.inherited_keys.contains_key(&g.id));
    }
}
