//! The versions of one chunk across a volume's snapshot epochs: the rules of copy-on-write
//! snapshots at chunk granularity (docs/architecture.md, "Snapshots, clones and backups").
//!
//! A volume's writes carry its *write epoch*; a snapshot freezes the current epoch and the
//! volume moves on to the next. A chunk keeps one version (a slot) per epoch it was written
//! in. A write in the head's epoch goes in place; the first write of a newer epoch copies the
//! head into a new slot first, so the older version stays as the snapshot saw it. A read at
//! epoch `e` sees the newest version no newer than `e`. This module holds only those rules,
//! on plain values, so they are tested on their own; the store keeps a [`ChunkVersions`] per
//! chunk (as the adjacent keys of its versions) and does the I/O they call for.

use std::fmt;

/// A volume's write epoch: 1 for a volume without snapshots, raised by each snapshot.
pub type Epoch = u64;

/// One stored version of a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    /// The epoch the version was first written in.
    pub epoch: Epoch,
    /// Its slot in the data file.
    pub slot: u64,
}

/// What a write at some epoch must do to a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePlan {
    /// The chunk has no version: take a fresh slot (unwritten blocks read as zeros).
    Fresh,
    /// The head was written in this epoch: write into its slot.
    InPlace(u64),
    /// The head belongs to an older epoch, which a snapshot may hold: take a new slot, copy
    /// the head's written blocks from this slot into it, then write.
    CopyFrom(u64),
}

/// A write or version that would change what a frozen epoch sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    /// A write issued under an epoch older than the chunk's newest version: it was issued
    /// before a snapshot cut and arrived after a write issued after it. Applying it would put
    /// it in a frozen version (or lose it); it is refused.
    #[error("a write at epoch {epoch} arrived after one at epoch {head}: it was issued before a snapshot and is refused")]
    StaleEpoch {
        /// The write's epoch.
        epoch: Epoch,
        /// The chunk's newest version's epoch.
        head: Epoch,
    },
}

/// What a write at `epoch` must do to a chunk whose newest version is `head`
/// ([`ChunkVersions::plan_write`] on the head alone, for callers that keep versions elsewhere).
pub fn plan(head: Option<Version>, epoch: Epoch) -> Result<WritePlan, VersionError> {
    match head {
        None => Ok(WritePlan::Fresh),
        Some(h) if h.epoch == epoch => Ok(WritePlan::InPlace(h.slot)),
        Some(h) if h.epoch < epoch => Ok(WritePlan::CopyFrom(h.slot)),
        Some(h) => Err(VersionError::StaleEpoch { epoch, head: h.epoch }),
    }
}

/// A chunk's versions, newest first (epochs strictly decreasing).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ChunkVersions {
    newest_first: Vec<Version>,
}

impl fmt::Debug for ChunkVersions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.newest_first.iter().map(|v| (v.epoch, v.slot))).finish()
    }
}

impl ChunkVersions {
    /// The newest version: what the live volume reads.
    pub fn head(&self) -> Option<Version> {
        self.newest_first.first().copied()
    }

    /// The versions given oldest first (as the index sorts them); `None` if two share an
    /// epoch or they are out of order.
    pub fn from_oldest(oldest_first: impl IntoIterator<Item = Version>) -> Option<Self> {
        let mut v = ChunkVersions::default();
        for version in oldest_first {
            v.push(version).ok()?;
        }
        Some(v)
    }

    /// Every version, newest first.
    pub fn all(&self) -> &[Version] {
        &self.newest_first
    }

    /// The version a read at `epoch` sees: the newest written at or before it. `None`: the
    /// chunk was not written by then (it reads as zeros).
    pub fn resolve(&self, epoch: Epoch) -> Option<Version> {
        self.newest_first.iter().find(|v| v.epoch <= epoch).copied()
    }

    /// What a write at `epoch` must do. A head from an older epoch is copied even if the
    /// snapshot that froze it was deleted since: the replica learns of deletions only through
    /// [`ChunkVersions::release`], and copying is the safe side (the next release frees it).
    pub fn plan_write(&self, epoch: Epoch) -> Result<WritePlan, VersionError> {
        plan(self.head(), epoch)
    }

    /// Records the new slot a [`WritePlan::Fresh`] or [`WritePlan::CopyFrom`] write took.
    pub fn push(&mut self, version: Version) -> Result<(), VersionError> {
        if let Some(h) = self.head()
            && h.epoch >= version.epoch
        {
            return Err(VersionError::StaleEpoch { epoch: version.epoch, head: h.epoch });
        }
        self.newest_first.insert(0, version);
        Ok(())
    }

    /// Drops the versions nobody can read any more, given the epochs of the volume's live
    /// snapshots (any order): a version stays while it is the head or what some live snapshot
    /// resolves to. Returns the dropped versions, whose slots go to the overwrite queue.
    pub fn release(&mut self, live_snapshots: &[Epoch]) -> Vec<Version> {
        let mut dropped = Vec::new();
        // Each version is what epochs in [its epoch, the next newer version's) resolve to.
        let mut until = Epoch::MAX;
        let all = std::mem::take(&mut self.newest_first);
        for (i, v) in all.into_iter().enumerate() {
            let needed = i == 0 || live_snapshots.iter().any(|&s| s >= v.epoch && s < until);
            until = v.epoch;
            if needed { self.newest_first.push(v) } else { dropped.push(v) }
        }
        dropped
    }

    /// Whether the chunk as seen at `new` differs from what `old` saw (`None`: nothing before,
    /// as for a volume's first backup): what an incremental backup from `old` to `new` sends.
    pub fn changed_between(&self, old: Option<Epoch>, new: Epoch) -> bool {
        let now = self.resolve(new);
        match old {
            None => now.is_some(),
            Some(old) => now.map(|v| v.epoch) != self.resolve(old).map(|v| v.epoch),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn versions(list: &[(Epoch, u64)]) -> ChunkVersions {
        let mut v = ChunkVersions::default();
        for &(epoch, slot) in list.iter().rev() {
            v.push(Version { epoch, slot }).unwrap();
        }
        v
    }

    #[test]
    fn a_read_sees_the_newest_version_no_newer_than_its_epoch() {
        let v = versions(&[(5, 50), (3, 30), (1, 10)]);
        assert_eq!(v.resolve(0), None, "not written yet at epoch 0");
        assert_eq!(v.resolve(1).map(|v| v.slot), Some(10));
        assert_eq!(v.resolve(2).map(|v| v.slot), Some(10));
        assert_eq!(v.resolve(4).map(|v| v.slot), Some(30));
        assert_eq!(v.resolve(9).map(|v| v.slot), Some(50));
        assert_eq!(v.head().map(|v| v.slot), Some(50));
    }

    #[test]
    fn writes_go_in_place_copy_on_a_newer_epoch_and_refuse_an_older_one() {
        assert_eq!(ChunkVersions::default().plan_write(1), Ok(WritePlan::Fresh));
        let v = versions(&[(3, 30), (1, 10)]);
        assert_eq!(v.plan_write(3), Ok(WritePlan::InPlace(30)));
        assert_eq!(v.plan_write(4), Ok(WritePlan::CopyFrom(30)));
        assert_eq!(v.plan_write(2), Err(VersionError::StaleEpoch { epoch: 2, head: 3 }));
        let mut v = v;
        assert!(v.push(Version { epoch: 3, slot: 99 }).is_err(), "two versions of one epoch");
        assert_eq!(v.all().len(), 2);
    }

    #[test]
    fn release_keeps_the_head_and_what_live_snapshots_resolve_to() {
        // Versions at epochs 1, 3, 5, 7; snapshots were taken at epochs 2, 4 and 6.
        let mut v = versions(&[(7, 70), (5, 50), (3, 30), (1, 10)]);
        // Snapshot 4 deleted: version 3 served only it.
        assert_eq!(v.release(&[6, 2]), vec![Version { epoch: 3, slot: 30 }]);
        assert_eq!(v.resolve(2).map(|v| v.slot), Some(10));
        assert_eq!(v.resolve(6).map(|v| v.slot), Some(50));
        // Every snapshot gone: only the head is left.
        assert_eq!(v.release(&[]), vec![Version { epoch: 5, slot: 50 }, Version { epoch: 1, slot: 10 }]);
        assert_eq!(v.all(), &[Version { epoch: 7, slot: 70 }]);
        // Releasing again frees nothing.
        assert!(v.release(&[]).is_empty());
    }

    #[test]
    fn changed_between_is_what_an_incremental_backup_sends() {
        let v = versions(&[(5, 50), (1, 10)]);
        assert!(v.changed_between(None, 1), "a first backup sends every written chunk");
        assert!(!v.changed_between(None, 0));
        assert!(!v.changed_between(Some(2), 4), "not written between the two snapshots");
        assert!(v.changed_between(Some(4), 6));
        assert!(!v.changed_between(Some(6), 8));
    }

    /// The rules against a model: per epoch, the content the chunk had when that epoch was
    /// frozen. Random writes, snapshots and snapshot deletions, by seed.
    #[test]
    fn versions_match_a_model_of_frozen_epochs() {
        for seed in 0..64u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut v = ChunkVersions::default();
            // What each slot holds (a write counter), and the model: content per frozen epoch.
            let mut slots: BTreeMap<u64, u64> = BTreeMap::new();
            let mut next_slot = 0;
            let mut live: Vec<Epoch> = Vec::new();
            let mut frozen: BTreeMap<Epoch, Option<u64>> = BTreeMap::new();
            let (mut epoch, mut head, mut writes) = (1, None::<u64>, 0);
            for _ in 0..200 {
                match rng.random_range(0..10) {
                    0..=5 => {
                        writes += 1;
                        let slot = match v.plan_write(epoch).unwrap() {
                            WritePlan::InPlace(s) => s,
                            WritePlan::Fresh | WritePlan::CopyFrom(_) => {
                                next_slot += 1;
                                v.push(Version { epoch, slot: next_slot }).unwrap();
                                next_slot
                            }
                        };
                        slots.insert(slot, writes);
                        head = Some(writes);
                    }
                    6..=7 => {
                        frozen.insert(epoch, head);
                        live.push(epoch);
                        epoch += 1;
                    }
                    _ if !live.is_empty() => {
                        let gone = live.swap_remove(rng.random_range(0..live.len()));
                        frozen.remove(&gone);
                        for d in v.release(&live) {
                            slots.remove(&d.slot);
                        }
                        assert!(v.all().len() <= live.len() + 1, "seed {seed}: {} versions for {} snapshots", v.all().len(), live.len());
                    }
                    _ => {}
                }
                let read = |e: Epoch| v.resolve(e).map(|ver| slots[&ver.slot]);
                for (&e, want) in &frozen {
                    assert_eq!(read(e), *want, "seed {seed}: snapshot at epoch {e} changed");
                }
                assert_eq!(v.head().map(|h| slots[&h.slot]), head, "seed {seed}: head");
            }
        }
    }
}
