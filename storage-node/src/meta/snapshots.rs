//! Volume snapshots in the meta state: each volume's write epoch, its live snapshots, the
//! snapshot its read-write holder has been asked to cut, and which PGs still have to release
//! the versions of deleted snapshots (docs/architecture.md, "Snapshots, clones and backups").
//!
//! A snapshot is a name for an epoch. Taking one freezes the volume's current write epoch and
//! moves writes on to the next; nothing is copied, so it costs one meta round. If the volume
//! has a read-write holder, the meta group only records the request ([`PendingSnapshot`]):
//! the holder drains its writes and cuts it ([`super::state::MetaCommand::CutSnapshot`]), so
//! the snapshot holds exactly the writes acknowledged before the cut.
//!
//! A rollback returns a detached volume to a snapshot: each PG makes, for every chunk changed
//! since the snapshot, a version at the current write epoch holding a local copy of what the
//! snapshot reads ([`Rollback`]); the volume cannot be attached or snapshotted until every PG
//! has done so.

use std::collections::{BTreeMap, BTreeSet};

use basalt_common::names::validate_name;
use basalt_common::{PgId, VolumeId};
use serde::{Deserialize, Serialize};

use super::state::{ClusterState, MetaError, MetaReply};

/// Most live snapshots per volume (each can hold a copy of every chunk written since).
pub const MAX_SNAPSHOTS_PER_VOLUME: usize = 256;

/// One snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The write epoch it froze: reads at it see each chunk's newest version no newer.
    pub epoch: u64,
    /// When it was taken (proposer's clock).
    pub created_unix_ms: u64,
}

/// A snapshot the holder has been asked to cut.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingSnapshot {
    /// Its name.
    pub name: String,
    /// When it was asked for.
    pub requested_unix_ms: u64,
    /// The attachment it was asked of: a cut by another one is refused.
    pub attach_epoch: u64,
}

/// A rollback under way: PGs still to apply it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollback {
    /// The snapshot rolled back to.
    pub snapshot: String,
    /// Its epoch: what the volume reads as afterwards.
    pub to_epoch: u64,
    /// The write epoch the rolled-back chunks are written at.
    pub at_epoch: u64,
    /// PGs that have not applied it yet.
    pub todo: BTreeSet<PgId>,
}

/// A volume's snapshot state. A volume without one has write epoch 1 and no snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSnapshots {
    /// The epoch writes carry now.
    pub write_epoch: u64,
    /// Live snapshots by name.
    pub snapshots: BTreeMap<String, SnapshotRecord>,
    /// The snapshot being cut by the holder, if any.
    pub pending: Option<PendingSnapshot>,
    /// Raised by every snapshot deletion; a PG's release counts only for the latest.
    pub release_generation: u64,
    /// PGs that have not yet released the versions no live snapshot reads.
    pub release_todo: BTreeSet<PgId>,
    /// A rollback under way.
    pub rollback: Option<Rollback>,
}

impl Default for VolumeSnapshots {
    fn default() -> Self {
        Self { write_epoch: 1, snapshots: BTreeMap::new(), pending: None, release_generation: 0, release_todo: BTreeSet::new(), rollback: None }
    }
}

impl VolumeSnapshots {
    /// The epochs of the live snapshots, ascending.
    pub fn live_epochs(&self) -> Vec<u64> {
        let mut e: Vec<u64> = self.snapshots.values().map(|s| s.epoch).collect();
        e.sort_unstable();
        e
    }

    /// Snapshots oldest first.
    pub fn by_age(&self) -> Vec<(&String, &SnapshotRecord)> {
        let mut v: Vec<_> = self.snapshots.iter().collect();
        v.sort_by_key(|(_, s)| s.epoch);
        v
    }

    fn freeze(&mut self, name: String, now_unix_ms: u64) {
        self.snapshots.insert(name, SnapshotRecord { epoch: self.write_epoch, created_unix_ms: now_unix_ms });
        self.write_epoch += 1;
        self.pending = None;
    }
}

impl ClusterState {
    /// The snapshot state of volume `id` (the default for one without snapshots).
    pub fn snapshots_of(&self, id: VolumeId) -> VolumeSnapshots {
        self.snapshots.get(&id).cloned().unwrap_or_default()
    }

    /// Takes snapshot `name` of `volume`: frozen at once if nobody holds it read-write,
    /// else asked of the holder. Asking again for the same pending snapshot is not an error.
    pub(super) fn create_snapshot(&mut self, volume: &str, name: String, now_unix_ms: u64) -> MetaReply {
        if let Err(e) = validate_name(&name) {
            return MetaReply::Error(MetaError::InvalidName(format!("snapshot {e}")));
        }
        let Some(v) = self.volume_by_name(volume).cloned() else {
            return MetaReply::Error(MetaError::NoSuchVolume(volume.to_string()));
        };
        if let Some(r) = self.backups.restores.get(&v.id) {
            // A half-restored volume is no image to keep.
            return MetaReply::Error(MetaError::Restoring { volume: volume.to_string(), backup: r.backup });
        }
        let snaps = self.snapshots.entry(v.id).or_default();
        if snaps.snapshots.contains_key(&name) {
            return MetaReply::Error(MetaError::SnapshotExists { volume: volume.to_string(), name });
        }
        if snaps.snapshots.len() >= MAX_SNAPSHOTS_PER_VOLUME {
            return MetaReply::Error(MetaError::InvalidSettings(format!(
                "volume {volume:?} has {MAX_SNAPSHOTS_PER_VOLUME} snapshots, the most it may keep; delete one first"
            )));
        }
        if let Some(r) = &snaps.rollback {
            return MetaReply::Error(MetaError::RollingBack { volume: volume.to_string(), snapshot: r.snapshot.clone() });
        }
        match (&v.attached_by, &snaps.pending) {
            (_, Some(p)) if p.name == name => {}
            (_, Some(p)) => {
                return MetaReply::Error(MetaError::SnapshotPending { volume: volume.to_string(), name: p.name.clone() });
            }
            (None, None) => snaps.freeze(name, now_unix_ms),
            (Some(_), None) => {
                snaps.pending = Some(PendingSnapshot { name, requested_unix_ms: now_unix_ms, attach_epoch: v.attach_epoch });
            }
        }
        MetaReply::Volume(v)
    }

    /// The holder cut the pending snapshot `name`: it is frozen at the current write epoch.
    pub(super) fn cut_snapshot(&mut self, volume: &str, name: String, attach_epoch: u64, now_unix_ms: u64) -> MetaReply {
        let Some(v) = self.volume_by_name(volume).cloned() else {
            return MetaReply::Error(MetaError::NoSuchVolume(volume.to_string()));
        };
        let snaps = self.snapshots.entry(v.id).or_default();
        if snaps.snapshots.contains_key(&name) && snaps.pending.is_none() {
            return MetaReply::Volume(v); // a retried cut
        }
        match &snaps.pending {
            Some(p) if p.name == name && p.attach_epoch == attach_epoch && v.attach_epoch == attach_epoch => {
                snaps.freeze(name, now_unix_ms);
                MetaReply::Volume(v)
            }
            _ => MetaReply::Error(MetaError::NoSuchSnapshot {
                volume: volume.to_string(),
                name: format!("{name} (pending, for attachment {attach_epoch})"),
            }),
        }
    }

    /// Gives up a pending snapshot (its holder did not cut it in time).
    pub(super) fn cancel_snapshot(&mut self, volume: &str, name: &str) -> MetaReply {
        let Some(v) = self.volume_by_name(volume).cloned() else {
            return MetaReply::Error(MetaError::NoSuchVolume(volume.to_string()));
        };
        if let Some(snaps) = self.snapshots.get_mut(&v.id)
            && snaps.pending.as_ref().is_some_and(|p| p.name == name)
        {
            snaps.pending = None;
        }
        self.erase_retired_keys_if_unneeded(v.id);
        MetaReply::Volume(v)
    }

    /// Deletes snapshot `name`; every PG then releases the versions only it held.
    pub(super) fn delete_snapshot(&mut self, volume: &str, name: &str) -> MetaReply {
        let Some(v) = self.volume_by_name(volume).cloned() else {
            return MetaReply::Error(MetaError::NoSuchVolume(volume.to_string()));
        };
        let pgs: BTreeSet<PgId> = self.pgs.iter().map(|p| p.id).collect();
        let Some(snaps) = self.snapshots.get_mut(&v.id).filter(|s| s.snapshots.contains_key(name)) else {
            return MetaReply::Error(MetaError::NoSuchSnapshot { volume: volume.to_string(), name: name.to_string() });
        };
        snaps.snapshots.remove(name);
        snaps.release_generation += 1;
        snaps.release_todo = pgs;
        self.erase_retired_keys_if_unneeded(v.id);
        MetaReply::Volume(v)
    }

    /// Starts rolling `volume` back to snapshot `name`: refused while it is attached read-write
    /// or a snapshot is being cut; asking again for the same rollback is not an error.
    pub(super) fn rollback_volume(&mut self, volume: &str, name: &str) -> MetaReply {
        let Some(v) = self.volume_by_name(volume).cloned() else {
            return MetaReply::Error(MetaError::NoSuchVolume(volume.to_string()));
        };
        if let Some(holder) = &v.attached_by {
            return MetaReply::Error(MetaError::AttachedForRollback { volume: volume.to_string(), holder: holder.clone() });
        }
        let pgs: BTreeSet<PgId> = self.pgs.iter().map(|p| p.id).collect();
        let Some(snaps) = self.snapshots.get_mut(&v.id) else {
            return MetaReply::Error(MetaError::NoSuchSnapshot { volume: volume.to_string(), name: name.to_string() });
        };
        let Some(to_epoch) = snaps.snapshots.get(name).map(|s| s.epoch) else {
            return MetaReply::Error(MetaError::NoSuchSnapshot { volume: volume.to_string(), name: name.to_string() });
        };
        match &snaps.rollback {
            Some(r) if r.snapshot == name => {}
            Some(r) => return MetaReply::Error(MetaError::RollingBack { volume: volume.to_string(), snapshot: r.snapshot.clone() }),
            None => snaps.rollback = Some(Rollback { snapshot: name.to_string(), to_epoch, at_epoch: snaps.write_epoch, todo: pgs }),
        }
        // The head holds the snapshot's blocks again, sealed with whatever versions they were:
        // none of them may be erased with the last snapshot any more.
        self.retired_keys.remove(&v.id);
        MetaReply::Volume(v)
    }

    /// PG `pg` applied the rollback of `volume` at write epoch `at_epoch`.
    pub(super) fn rolled_back(&mut self, volume: VolumeId, pg: PgId, at_epoch: u64) -> MetaReply {
        if let Some(snaps) = self.snapshots.get_mut(&volume)
            && let Some(r) = &mut snaps.rollback
            && r.at_epoch == at_epoch
        {
            r.todo.remove(&pg);
            if r.todo.is_empty() {
                snaps.rollback = None;
            }
        }
        MetaReply::Done
    }

    /// PG `pg` released `volume`'s unneeded versions as of release `generation`.
    pub(super) fn snapshots_released(&mut self, volume: VolumeId, pg: PgId, generation: u64) -> MetaReply {
        if let Some(snaps) = self.snapshots.get_mut(&volume)
            && snaps.release_generation == generation
        {
            snaps.release_todo.remove(&pg);
        }
        MetaReply::Done
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

    fn create(s: &mut ClusterState, name: &str) -> MetaReply {
        apply(s, MetaCommand::CreateSnapshot { volume: "v".into(), name: name.into(), now_unix_ms: 5 })
    }

    #[test]
    fn a_detached_volume_is_snapshotted_at_once_and_names_are_checked() {
        let mut s = initialized();
        apply(&mut s, MetaCommand::CreateVolume { name: "v".into(), size: 1 << 30, now_unix_ms: 1 });
        let id = s.volume_by_name("v").unwrap().id;
        assert_eq!(s.snapshots_of(id).write_epoch, 1);
        assert!(matches!(create(&mut s, "s1"), MetaReply::Volume(_)));
        assert!(matches!(create(&mut s, "s2"), MetaReply::Volume(_)));
        let snaps = s.snapshots_of(id);
        assert_eq!((snaps.write_epoch, snaps.live_epochs()), (3, vec![1, 2]));
        assert_eq!(create(&mut s, "s1"), MetaReply::Error(MetaError::SnapshotExists { volume: "v".into(), name: "s1".into() }));
        assert!(matches!(create(&mut s, "bad name"), MetaReply::Error(MetaError::InvalidName(_))));
        assert!(matches!(
            apply(&mut s, MetaCommand::CreateSnapshot { volume: "nope".into(), name: "x".into(), now_unix_ms: 5 }),
            MetaReply::Error(MetaError::NoSuchVolume(_))
        ));
        // Deleting one asks every PG to release, and only the latest release counts.
        assert!(matches!(apply(&mut s, MetaCommand::DeleteSnapshot { volume: "v".into(), name: "s1".into() }), MetaReply::Volume(_)));
        let snaps = s.snapshots_of(id);
        assert_eq!((snaps.live_epochs(), snaps.release_todo.len(), snaps.release_generation), (vec![2], s.pgs.len(), 1));
        apply(&mut s, MetaCommand::SnapshotsReleased { volume: id, pg: PgId(0), generation: 0 });
        assert_eq!(s.snapshots_of(id).release_todo.len(), s.pgs.len(), "a release of an older generation does not count");
        apply(&mut s, MetaCommand::SnapshotsReleased { volume: id, pg: PgId(0), generation: 1 });
        assert_eq!(s.snapshots_of(id).release_todo.len(), s.pgs.len() - 1);
        assert!(matches!(
            apply(&mut s, MetaCommand::DeleteSnapshot { volume: "v".into(), name: "s1".into() }),
            MetaReply::Error(MetaError::NoSuchSnapshot { .. })
        ));
        // Deleting the volume drops its snapshots.
        apply(&mut s, MetaCommand::DeleteVolume { name: "v".into() });
        assert!(!s.snapshots.contains_key(&id));
    }

    #[test]
    fn a_rollback_waits_for_every_pg_and_blocks_attach_and_snapshots_meanwhile() {
        let mut s = initialized();
        apply(&mut s, MetaCommand::CreateVolume { name: "v".into(), size: 1 << 30, now_unix_ms: 1 });
        let id = s.volume_by_name("v").unwrap().id;
        create(&mut s, "s1");
        create(&mut s, "s2");
        let rollback = |s: &mut ClusterState, name: &str| apply(s, MetaCommand::RollbackVolume { volume: "v".into(), snapshot: name.into() });
        apply(&mut s, MetaCommand::AttachVolume { name: "v".into(), holder: "h".into(), force: false });
        assert!(matches!(rollback(&mut s, "s1"), MetaReply::Error(MetaError::AttachedForRollback { .. })), "refused while attached");
        apply(&mut s, MetaCommand::DetachVolume { name: "v".into(), epoch: 0 });
        assert!(matches!(rollback(&mut s, "nope"), MetaReply::Error(MetaError::NoSuchSnapshot { .. })));
        assert!(matches!(rollback(&mut s, "s1"), MetaReply::Volume(_)));
        assert!(matches!(rollback(&mut s, "s1"), MetaReply::Volume(_)), "asking again is fine");
        assert!(matches!(rollback(&mut s, "s2"), MetaReply::Error(MetaError::RollingBack { .. })));
        let r = s.snapshots_of(id).rollback.unwrap();
        assert_eq!((r.to_epoch, r.at_epoch, r.todo.len()), (1, 3, s.pgs.len()));
        assert!(matches!(
            apply(&mut s, MetaCommand::AttachVolume { name: "v".into(), holder: "h".into(), force: true }),
            MetaReply::Error(MetaError::RollingBack { .. })
        ));
        assert!(matches!(create(&mut s, "s3"), MetaReply::Error(MetaError::RollingBack { .. })));
        let pgs: Vec<PgId> = s.pgs.iter().map(|p| p.id).collect();
        apply(&mut s, MetaCommand::RolledBack { volume: id, pg: pgs[0], at_epoch: 2 });
        assert_eq!(s.snapshots_of(id).rollback.unwrap().todo.len(), pgs.len(), "an older rollback's report does not count");
        for pg in pgs {
            apply(&mut s, MetaCommand::RolledBack { volume: id, pg, at_epoch: 3 });
        }
        assert_eq!(s.snapshots_of(id).rollback, None);
        assert!(matches!(apply(&mut s, MetaCommand::AttachVolume { name: "v".into(), holder: "h".into(), force: false }), MetaReply::Volume(_)));
    }

    #[test]
    fn an_attached_volume_is_cut_by_its_holder_only() {
        let mut s = initialized();
        apply(&mut s, MetaCommand::CreateVolume { name: "v".into(), size: 1 << 30, now_unix_ms: 1 });
        let id = s.volume_by_name("v").unwrap().id;
        apply(&mut s, MetaCommand::AttachVolume { name: "v".into(), holder: "h".into(), force: false });
        let epoch = s.volume_by_name("v").unwrap().attach_epoch;
        assert!(matches!(create(&mut s, "s1"), MetaReply::Volume(_)));
        let snaps = s.snapshots_of(id);
        assert_eq!((snaps.write_epoch, snaps.pending.as_ref().map(|p| p.name.as_str())), (1, Some("s1")), "asked of the holder, not frozen");
        assert!(matches!(create(&mut s, "s1"), MetaReply::Volume(_)), "asking again is fine");
        assert_eq!(create(&mut s, "s2"), MetaReply::Error(MetaError::SnapshotPending { volume: "v".into(), name: "s1".into() }));
        let cut = |s: &mut ClusterState, attach_epoch| {
            apply(s, MetaCommand::CutSnapshot { volume: "v".into(), name: "s1".into(), attach_epoch, now_unix_ms: 9 })
        };
        assert!(matches!(cut(&mut s, epoch - 1), MetaReply::Error(MetaError::NoSuchSnapshot { .. })), "a superseded holder cannot cut");
        assert!(matches!(cut(&mut s, epoch), MetaReply::Volume(_)));
        let snaps = s.snapshots_of(id);
        assert_eq!((snaps.write_epoch, &snaps.pending, snaps.live_epochs()), (2, &None, vec![1]));
        assert!(matches!(cut(&mut s, epoch), MetaReply::Volume(_)), "a retried cut is answered, not applied twice");
        assert_eq!(s.snapshots_of(id).write_epoch, 2);
        // A cut not made in time is cancelled.
        create(&mut s, "s2");
        apply(&mut s, MetaCommand::CancelSnapshot { volume: "v".into(), name: "s2".into() });
        assert_eq!(s.snapshots_of(id).pending, None);
        assert_eq!(s.snapshots_of(id).write_epoch, 2);
    }
}
