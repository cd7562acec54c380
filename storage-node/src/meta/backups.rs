//! The backup catalog in the meta state: which backups exist, which backup nodes keep each,
//! and the restores under way (docs/architecture.md, "Backups").
//!
//! A backup is listed as complete only once every node asked to keep it reported its copy
//! written whole (the node writes its manifest last, so a node killed mid-copy holds nothing
//! the catalog calls complete). The pieces themselves live on the backup nodes
//! (`basalt_backup::store`); a node drops the copies of backups this catalog no longer lists.

use std::collections::BTreeMap;

use basalt_common::names::validate_name;
use basalt_common::{NodeId, VolumeId};
use serde::{Deserialize, Serialize};

use super::state::{ClusterState, KeyEffect, MetaError, MetaReply, VolumeKeys};

/// Where a backup stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackupState {
    /// Nodes are copying it.
    Running,
    /// Every node asked to keep it holds a whole copy.
    Complete,
    /// A copy failed (the first node's reason); the backup can be deleted and taken again.
    Failed(String),
}

/// What one node's copy of a backup moved and stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyStats {
    /// Bytes of the volume that hold data (chunks the snapshot has written).
    pub data_bytes: u64,
    /// Bytes read from the storage nodes: chunks changed since the node's previous backup of
    /// the volume (all of them for the first).
    pub changed_bytes: u64,
    /// Bytes of new pieces written (compressed); pieces already held are not written again.
    pub stored_bytes: u64,
    /// The backup this one is incremental to on that node (0: a full copy).
    pub parent: u64,
    /// How long the copy took.
    pub duration_ms: u64,
}

/// One backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRecord {
    /// Id (never reused).
    pub id: u64,
    /// The volume it was taken of (the backup outlives it).
    pub volume: VolumeId,
    /// The volume's name then.
    pub volume_name: String,
    /// The snapshot it copies, and that snapshot's epoch.
    pub snapshot: String,
    /// The snapshot's epoch.
    pub epoch: u64,
    /// The volume's size.
    pub size: u64,
    /// The backup nodes asked to keep a copy.
    pub nodes: Vec<NodeId>,
    /// The copies finished, by node.
    pub copies: BTreeMap<NodeId, CopyStats>,
    /// Where it stands.
    pub state: BackupState,
    /// When it was asked for.
    pub created_unix_ms: u64,
    /// When its last copy finished (0 while running).
    pub finished_unix_ms: u64,
    /// The snapshot was taken for this backup (and is deleted once the copies are done).
    pub auto_snapshot: bool,
    /// The schedule that took it.
    pub schedule: Option<String>,
    /// Kept past its volume's deletion until unpinned (an admin's decision).
    pub pinned: bool,
    /// When the meta leader saw its volume deleted (0: not deleted); it expires
    /// `backup.retain_after_delete` later unless pinned.
    pub volume_deleted_unix_ms: u64,
}

/// A restore under way: a new volume being filled from a backup by a backup node, attached
/// read-write by that restore until it is done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restore {
    /// The backup.
    pub backup: u64,
    /// The backup node that writes it.
    pub node: NodeId,
    /// Every chunk before this one is written (where a restarted restore goes on).
    pub next_chunk: u64,
    /// When it started.
    pub started_unix_ms: u64,
    /// Why it stopped, if it failed (`backup restore` again resumes it).
    pub error: Option<String>,
}

/// The catalog.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backups {
    /// Backups by id.
    pub records: BTreeMap<u64, BackupRecord>,
    /// The next id to assign (ids start at 1).
    pub next_id: u64,
    /// Restores under way, by the volume being written.
    pub restores: BTreeMap<VolumeId, Restore>,
    /// Backup schedules, by name.
    pub schedules: BTreeMap<String, Schedule>,
}

/// Most backups a schedule keeps per volume.
pub const MAX_KEEP: u32 = 10_000;

/// Shortest schedule interval.
pub const MIN_EVERY_SECS: u64 = 1;

/// Longest schedule interval (a year).
pub const MAX_EVERY_SECS: u64 = 366 * 86_400;

/// Longest `--max-age` (a hundred years: "keep them").
pub const MAX_AGE_SECS: u64 = 100 * 366 * 86_400;

const DAY_MS: u64 = 86_400_000;

/// A backup schedule: every `every_secs` (aligned to `at_minute` past midnight UTC if set),
/// a backup of each of its volumes; its backups are pruned to `keep` per volume and to
/// `max_age_secs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// Name.
    pub name: String,
    /// The volumes, by name (`all`: every volume, including ones created later).
    pub volumes: Vec<String>,
    /// See `volumes`.
    pub all: bool,
    /// The interval.
    pub every_secs: u64,
    /// Minutes past midnight UTC the runs are aligned to.
    pub at_minute: Option<u32>,
    /// Backups kept per volume.
    pub keep: u32,
    /// Backups older than this are pruned.
    pub max_age_secs: u64,
    /// When it was created.
    pub created_unix_ms: u64,
    /// When its last run started (0: never).
    pub last_run_unix_ms: u64,
}

impl Schedule {
    /// Checks the schedule's settings; `Err` says what is impossible.
    pub fn validate(&self) -> Result<(), String> {
        validate_name(&self.name).map_err(|e| e.to_string())?;
        if !(MIN_EVERY_SECS..=MAX_EVERY_SECS).contains(&self.every_secs) {
            return Err(format!("an interval of {} s is outside {MIN_EVERY_SECS} s..=366 days", self.every_secs));
        }
        if self.at_minute.is_some_and(|m| m >= 24 * 60) {
            return Err("--at must be a time of day, HH:MM from 00:00 to 23:59".into());
        }
        if !(1..=MAX_KEEP).contains(&self.keep) {
            return Err(format!("--keep {} is outside 1..={MAX_KEEP}", self.keep));
        }
        if self.max_age_secs > MAX_AGE_SECS {
            return Err(format!("--max-age of {} s is more than 100 years", self.max_age_secs));
        }
        if self.max_age_secs < self.every_secs {
            return Err(format!(
                "--max-age ({} s) is shorter than the interval ({} s): every backup would be pruned before the next one is taken",
                self.max_age_secs, self.every_secs
            ));
        }
        if self.volumes.is_empty() != self.all {
            return Err("name the volumes (--volume V, repeatable) or --all, not both or neither".into());
        }
        Ok(())
    }

    /// When the next run is due (Unix ms): right after creation (or the first `--at` time
    /// after it), then every interval after the last run (on the `--at` grid). However long
    /// the leader was away, a due run happens once: the next one counts from it.
    pub fn next_due(&self) -> u64 {
        let every = self.every_secs * 1000;
        let Some(minute) = self.at_minute else {
            return if self.last_run_unix_ms == 0 { self.created_unix_ms } else { self.last_run_unix_ms + every };
        };
        let day = self.created_unix_ms / DAY_MS * DAY_MS;
        let mut anchor = day + u64::from(minute) * 60_000;
        if anchor < self.created_unix_ms {
            anchor += DAY_MS;
        }
        if self.last_run_unix_ms < anchor {
            return anchor;
        }
        // The first grid point after the last run.
        anchor + ((self.last_run_unix_ms - anchor) / every + 1) * every
    }
}

/// The attachment holder of a volume being restored from `backup`.
pub fn restore_holder(backup: u64) -> String {
    format!("restore:backup-{backup}")
}

fn refused(message: String) -> MetaReply {
    MetaReply::Error(MetaError::Backup(message))
}

impl ClusterState {
    /// Adds schedule `schedule`.
    pub(super) fn create_schedule(&mut self, schedule: Schedule) -> MetaReply {
        if let Err(e) = schedule.validate() {
            return MetaReply::Error(MetaError::InvalidSettings(e));
        }
        if self.backups.schedules.contains_key(&schedule.name) {
            return MetaReply::Error(MetaError::ScheduleExists(schedule.name));
        }
        self.backups.schedules.insert(schedule.name.clone(), schedule);
        MetaReply::Done
    }

    /// Removes schedule `name` (its backups stay, pruned no more).
    pub(super) fn delete_schedule(&mut self, name: &str) -> MetaReply {
        match self.backups.schedules.remove(name) {
            Some(_) => MetaReply::Done,
            None => MetaReply::Error(MetaError::NoSuchSchedule(name.to_string())),
        }
    }

    /// Schedule `name`'s run started at `now_unix_ms`.
    pub(super) fn schedule_ran(&mut self, name: &str, now_unix_ms: u64) -> MetaReply {
        match self.backups.schedules.get_mut(name) {
            Some(s) => {
                s.last_run_unix_ms = s.last_run_unix_ms.max(now_unix_ms);
                MetaReply::Done
            }
            None => MetaReply::Error(MetaError::NoSuchSchedule(name.to_string())),
        }
    }

    /// Pins (or unpins) backup `id`.
    pub(super) fn pin_backup(&mut self, id: u64, pinned: bool) -> MetaReply {
        match self.backups.records.get_mut(&id) {
            Some(b) => {
                b.pinned = pinned;
                MetaReply::Backup(b.clone())
            }
            None => MetaReply::Error(MetaError::NoSuchBackup(id)),
        }
    }

    /// The meta leader saw the volumes of backups `ids` deleted at `now_unix_ms`.
    pub(super) fn backups_orphaned(&mut self, ids: &[u64], now_unix_ms: u64) -> MetaReply {
        for id in ids {
            if let Some(b) = self.backups.records.get_mut(id)
                && b.volume_deleted_unix_ms == 0
            {
                b.volume_deleted_unix_ms = now_unix_ms;
            }
        }
        MetaReply::Done
    }

    /// Records a new running backup of `volume`'s snapshot `snapshot`, kept on `nodes`. An
    /// encrypted volume's backup comes with `keys`: copies of exactly the volume's key versions
    /// (its blocks stay sealed on the backup nodes; these open them at a restore).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn begin_backup(
        &mut self,
        volume: &str,
        snapshot: &str,
        nodes: Vec<NodeId>,
        auto_snapshot: bool,
        schedule: Option<String>,
        now_unix_ms: u64,
        keys: Option<VolumeKeys>,
    ) -> MetaReply {
        let Some(v) = self.volume_by_name(volume).cloned() else {
            return MetaReply::Error(MetaError::NoSuchVolume(volume.to_string()));
        };
        match (self.volume_keys.get(&v.id), &keys) {
            (Some(_), None) => return refused(format!("volume {volume} is encrypted: its backup needs copies of its keys")),
            (None, Some(_)) => return refused(format!("volume {volume} is not encrypted: its backup takes no keys")),
            (Some(theirs), Some(ours)) if theirs.digests != ours.digests => {
                return refused(format!("volume {volume}'s keys changed as the backup began (a rekey or re-encryption); take it again"));
            }
            _ => {}
        }
        if self.backups.restores.contains_key(&v.id) {
            return refused(format!("volume {volume} is being restored; back it up once the restore is done"));
        }
        let Some(epoch) = self.snapshots.get(&v.id).and_then(|s| s.snapshots.get(snapshot)).map(|s| s.epoch) else {
            return MetaReply::Error(MetaError::NoSuchSnapshot { volume: volume.to_string(), name: snapshot.to_string() });
        };
        if nodes.is_empty() || nodes.iter().any(|n| !self.nodes.get(n).is_some_and(|r| r.roles.contains(&super::state::Role::Backup))) {
            return refused(format!("backups are kept on backup-role nodes; {nodes:?} are not all such nodes"));
        }
        let id = self.backups.next_id.max(1);
        self.backups.next_id = id + 1;
        let record = BackupRecord {
            id,
            volume: v.id,
            volume_name: v.name.clone(),
            snapshot: snapshot.to_string(),
            epoch,
            size: v.size,
            nodes,
            copies: BTreeMap::new(),
            state: BackupState::Running,
            created_unix_ms: now_unix_ms,
            finished_unix_ms: 0,
            auto_snapshot,
            schedule,
            pinned: false,
            volume_deleted_unix_ms: 0,
        };
        self.backups.records.insert(id, record.clone());
        if let Some(keys) = keys {
            let inherited = self.inherited_keys.get(&v.id);
            let sealed_as = keys.digests.keys().map(|k| (*k, inherited.and_then(|i| i.get(k)).copied().unwrap_or(v.id))).collect();
            self.backup_keys.insert(id, BackupKeys { keys, sealed_as });
        }
        MetaReply::Backup(record)
    }

    /// Records a node's copy of backup `id` as finished (`Ok`) or failed.
    pub(super) fn backup_copied(&mut self, id: u64, node: NodeId, outcome: Result<CopyStats, String>, now_unix_ms: u64) -> MetaReply {
        let Some(b) = self.backups.records.get_mut(&id) else {
            return MetaReply::Error(MetaError::NoSuchBackup(id));
        };
        if !b.nodes.contains(&node) {
            return refused(format!("{node} was not asked to keep backup {id}"));
        }
        if b.state != BackupState::Running {
            // A report repeated after a leader change, or a late one for a failed backup.
            return MetaReply::Backup(b.clone());
        }
        match outcome {
            Ok(stats) => {
                b.copies.insert(node, stats);
                if b.nodes.iter().all(|n| b.copies.contains_key(n)) {
                    b.state = BackupState::Complete;
                    b.finished_unix_ms = now_unix_ms;
                }
            }
            Err(why) => {
                b.state = BackupState::Failed(format!("{node}: {why}"));
                b.finished_unix_ms = now_unix_ms;
            }
        }
        MetaReply::Backup(b.clone())
    }

    /// Deletes backup `id` from the catalog; its nodes then drop their copies.
    pub(super) fn delete_backup(&mut self, id: u64) -> MetaReply {
        let Some(b) = self.backups.records.get(&id) else {
            return MetaReply::Error(MetaError::NoSuchBackup(id));
        };
        if b.state == BackupState::Running {
            return refused(format!("backup {id} is still being copied; delete it once it has finished"));
        }
        if let Some(r) = self.backups.restores.values().find(|r| r.backup == id) {
            let into = self.volumes.iter().find(|(v, _)| self.backups.restores.get(v) == Some(r)).map(|(_, v)| v.name.clone()).unwrap_or_default();
            return refused(format!("backup {id} is being restored into volume {into}; delete it once that restore is done"));
        }
        let b = self.backups.records.remove(&id).expect("found above");
        // Its keys go with it: what is left on the backup nodes opens with nothing.
        if let Some(k) = self.backup_keys.remove(&id) {
            self.key_effects.push(KeyEffect::Erase(k.keys.key_id));
        }
        MetaReply::Backup(b)
    }

    /// Creates volume `name` from complete backup `backup`, attached read-write by the restore
    /// that `node` runs. An encrypted volume's backup is restored into an encrypted volume
    /// with `keys`: the backup's key versions rewrapped for `name` (they open the restored
    /// blocks, which stay bound to the volume that sealed them) and one newer version that the
    /// new volume seals with.
    pub(super) fn begin_restore(&mut self, backup: u64, name: String, node: NodeId, now_unix_ms: u64, keys: Option<VolumeKeys>) -> MetaReply {
        let Some(b) = self.backups.records.get(&backup).cloned() else {
            return MetaReply::Error(MetaError::NoSuchBackup(backup));
        };
        if b.state != BackupState::Complete {
            return refused(format!("backup {backup} is not complete ({}); restore a complete one", describe(&b.state)));
        }
        if !b.copies.contains_key(&node) {
            return refused(format!("{node} holds no copy of backup {backup}"));
        }
        if let Err(e) = validate_name(&name) {
            return MetaReply::Error(MetaError::InvalidName(e.to_string()));
        }
        let backup_keys = self.backup_keys.get(&backup).cloned();
        match (&backup_keys, &keys) {
            (Some(_), None) => {
                return refused(format!(
                    "backup {backup} is of encrypted volume {}: restore it with --kek-file FILE (the KEK that opened that volume)",
                    b.volume_name
                ));
            }
            (None, Some(_)) => return refused(format!("backup {backup} is of a volume that is not encrypted: its restore takes no keys")),
            (Some(theirs), Some(ours)) => {
                let newest = theirs.keys.digests.keys().next_back().copied().unwrap_or(0);
                if !theirs.keys.digests.keys().all(|k| ours.digests.contains_key(k))
                    || ours.digests.len() != theirs.keys.digests.len() + 1
                    || ours.current <= newest
                    || !ours.digests.contains_key(&ours.current)
                {
                    return refused(format!(
                        "a restore of backup {backup} must carry its key versions {:?} and one newer version",
                        theirs.keys.digests.keys().collect::<Vec<_>>()
                    ));
                }
            }
            (None, None) => {}
        }
        let reply = self.create_volume(name, b.size, now_unix_ms, keys);
        let MetaReply::Volume(v) = reply else { return reply };
        if let Some(theirs) = backup_keys {
            self.inherited_keys.insert(v.id, theirs.sealed_as);
        }
        let v = self.volumes.get_mut(&v.id).expect("just created");
        v.attach_epoch += 1;
        v.attached_by = Some(restore_holder(backup));
        let v = v.clone();
        self.backups.restores.insert(v.id, Restore { backup, node, next_chunk: 0, started_unix_ms: now_unix_ms, error: None });
        MetaReply::Volume(v)
    }

    /// Records how far the restore into `volume` got, or its end: done (`error` `None` with
    /// `done`) detaches the volume and makes it an ordinary one.
    pub(super) fn restore_progress(&mut self, volume: VolumeId, next_chunk: u64, done: bool, error: Option<String>) -> MetaReply {
        let Some(r) = self.backups.restores.get_mut(&volume) else {
            return refused(format!("no restore into volume {volume} is under way"));
        };
        r.next_chunk = r.next_chunk.max(next_chunk);
        r.error = error;
        if done && r.error.is_none() {
            self.backups.restores.remove(&volume);
            if let Some(v) = self.volumes.get_mut(&volume)
                && v.attached_by.take().is_some()
            {
                v.attach_epoch += 1;
            }
        }
        match self.volumes.get(&volume) {
            Some(v) => MetaReply::Volume(v.clone()),
            None => MetaReply::Done,
        }
    }

    /// A volume being deleted stops its restore.
    pub(super) fn restore_gone(&mut self, volume: VolumeId) {
        self.backups.restores.remove(&volume);
    }
}

/// An encrypted volume's backup's keys: copies of every key version its snapshot's blocks may
/// be sealed with, in the meta nodes' key stores under their own key id (erased with the
/// backup, not with the volume), and the volume each version's blocks are bound to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupKeys {
    /// The copies.
    pub keys: VolumeKeys,
    /// For each version, the volume whose id its blocks' associated data names.
    pub sealed_as: BTreeMap<u32, VolumeId>,
}

/// A backup state for people.
pub fn describe(state: &BackupState) -> String {
    match state {
        BackupState::Running => "running".into(),
        BackupState::Complete => "complete".into(),
        BackupState::Failed(why) => format!("failed: {why}"),
    }
}

/// What a leader's pass over the catalog should do: backups to delete (by schedule pruning or
/// expiry after their volume's deletion), backups whose volume it sees deleted for the first
/// time. Pure, so the rules are tested on their own.
pub fn retention(s: &ClusterState, now_unix_ms: u64, retain_after_delete_ms: u64) -> (Vec<(u64, String)>, Vec<u64>) {
    let mut delete = Vec::new();
    let mut orphaned = Vec::new();
    let restoring: std::collections::BTreeSet<u64> = s.backups.restores.values().map(|r| r.backup).collect();
    for b in s.backups.records.values() {
        let volume_active = s.volumes.get(&b.volume).is_some_and(|v| v.state == super::state::VolumeState::Active);
        if volume_active || b.state == BackupState::Running {
            continue;
        }
        if b.volume_deleted_unix_ms == 0 {
            orphaned.push(b.id);
        } else if !b.pinned && now_unix_ms >= b.volume_deleted_unix_ms + retain_after_delete_ms && !restoring.contains(&b.id) {
            delete.push((b.id, format!("its volume {} was deleted more than {} s ago", b.volume_name, retain_after_delete_ms / 1000)));
        }
    }
    for sched in s.backups.schedules.values() {
        let mut by_volume: BTreeMap<VolumeId, Vec<&BackupRecord>> = BTreeMap::new();
        for b in s.backups.records.values().filter(|b| b.schedule.as_deref() == Some(&sched.name) && b.state != BackupState::Running) {
            by_volume.entry(b.volume).or_default().push(b);
        }
        for list in by_volume.values_mut() {
            list.sort_by_key(|b| std::cmp::Reverse((b.created_unix_ms, b.id)));
            let mut complete = 0u32;
            for b in list.iter() {
                if restoring.contains(&b.id) || delete.iter().any(|(id, _)| *id == b.id) {
                    continue;
                }
                let why = match &b.state {
                    // A failed run is dropped once a later one completed.
                    BackupState::Failed(_) if complete > 0 => Some(format!("schedule {}: a later backup completed", sched.name)),
                    BackupState::Failed(_) => None,
                    _ => {
                        complete += 1;
                        if complete > sched.keep {
                            Some(format!("schedule {} keeps {}", sched.name, sched.keep))
                        } else if now_unix_ms.saturating_sub(b.created_unix_ms) > sched.max_age_secs.saturating_mul(1000) {
                            Some(format!("schedule {} keeps backups for {} s", sched.name, sched.max_age_secs))
                        } else {
                            None
                        }
                    }
                };
                if let Some(why) = why {
                    delete.push((b.id, why));
                }
            }
        }
    }
    (delete, orphaned)
}

#[cfg(test)]
mod tests {
    use super::super::state::{MetaCommand, NodeRecord, Role, tests::initialized};
    use super::*;

    fn apply(s: &mut ClusterState, cmd: MetaCommand) -> MetaReply {
        let index = s.version + 1;
        s.apply(index, cmd)
    }

    fn with_backup_node(s: &mut ClusterState) -> NodeId {
        let mut n: NodeRecord = s.nodes.values().next().cloned().expect("a node");
        n.id = NodeId(40);
        n.addr = "127.0.0.1:7040".into();
        n.roles = [Role::Backup].into_iter().collect();
        s.nodes.insert(n.id, n);
        NodeId(40)
    }

    #[test]
    fn schedules_run_once_per_interval_on_their_grid_and_refuse_impossible_settings() {
        let base = Schedule {
            name: "nightly".into(),
            volumes: vec!["v".into()],
            all: false,
            every_secs: 3600,
            at_minute: None,
            keep: 3,
            max_age_secs: 86_400,
            created_unix_ms: 10 * DAY_MS + 5_000,
            last_run_unix_ms: 0,
        };
        assert_eq!(base.validate(), Ok(()));
        assert_eq!(base.next_due(), base.created_unix_ms, "the first run right away");
        let ran = Schedule { last_run_unix_ms: base.created_unix_ms + 10 * DAY_MS, ..base.clone() };
        assert_eq!(ran.next_due(), ran.last_run_unix_ms + 3_600_000, "an outage of days: one run, then every hour from it");
        let at = Schedule { at_minute: Some(2 * 60 + 30), every_secs: 86_400, ..base.clone() };
        assert_eq!(at.next_due(), 10 * DAY_MS + 150 * 60_000, "the first 02:30 after creation");
        let at_ran = Schedule { last_run_unix_ms: 13 * DAY_MS + 160 * 60_000, ..at.clone() };
        assert_eq!(at_ran.next_due(), 14 * DAY_MS + 150 * 60_000, "a late run keeps the grid");
        for (bad, what) in [
            (Schedule { every_secs: 0, ..base.clone() }, "a zero interval"),
            (Schedule { every_secs: 400 * 86_400, max_age_secs: 500 * 86_400, ..base.clone() }, "more than a year"),
            (Schedule { at_minute: Some(24 * 60), ..base.clone() }, "no such time of day"),
            (Schedule { keep: 0, ..base.clone() }, "keeping nothing"),
            (Schedule { max_age_secs: 60, ..base.clone() }, "pruned before the next run"),
            (Schedule { max_age_secs: u64::MAX / 10, ..base.clone() }, "an age that overflows"),
            (Schedule { volumes: vec![], ..base.clone() }, "no volumes"),
            (Schedule { all: true, ..base.clone() }, "volumes and --all"),
            (Schedule { name: "bad name".into(), ..base.clone() }, "a bad name"),
        ] {
            assert!(bad.validate().is_err(), "{what}");
        }
    }

    #[test]
    fn retention_prunes_by_count_and_age_and_expires_deleted_volumes_backups_unless_pinned() {
        let mut s = initialized();
        let b = with_backup_node(&mut s);
        apply(&mut s, MetaCommand::CreateVolume { name: "v".into(), size: 1 << 20, now_unix_ms: 1 });
        let sched = Schedule {
            name: "hourly".into(),
            volumes: vec!["v".into()],
            all: false,
            every_secs: 10,
            at_minute: None,
            keep: 2,
            max_age_secs: 100,
            created_unix_ms: 1,
            last_run_unix_ms: 0,
        };
        assert_eq!(apply(&mut s, MetaCommand::CreateSchedule { schedule: sched.clone() }), MetaReply::Done);
        assert!(matches!(apply(&mut s, MetaCommand::CreateSchedule { schedule: sched }), MetaReply::Error(MetaError::ScheduleExists(_))));
        let mut ids = Vec::new();
        for (i, failed) in [(0u64, false), (1, true), (2, false), (3, false)] {
            let name = format!("s{i}");
            apply(&mut s, MetaCommand::CreateSnapshot { volume: "v".into(), name: name.clone(), now_unix_ms: 2 });
            let cmd = MetaCommand::BeginBackup {
                volume: "v".into(),
                snapshot: name,
                nodes: vec![b],
                auto_snapshot: true,
                schedule: Some("hourly".into()),
                now_unix_ms: 1000 + i * 10_000,
            };
            let MetaReply::Backup(r) = apply(&mut s, cmd) else { panic!("begin") };
            let outcome = if failed { Err("x".to_string()) } else { Ok(CopyStats::default()) };
            apply(&mut s, MetaCommand::BackupCopied { id: r.id, node: b, outcome, now_unix_ms: 2000 + i * 10_000 });
            ids.push(r.id);
        }
        let (delete, orphaned) = retention(&s, 40_000, 1000);
        let deleted: Vec<u64> = delete.iter().map(|(id, _)| *id).collect();
        assert_eq!(deleted, vec![ids[1], ids[0]], "the failed run (a later one completed) and the oldest beyond keep 2: {delete:?}");
        assert!(orphaned.is_empty());
        let (delete, _) = retention(&s, 1000 + 2 * 10_000 + 100_001, 1000);
        assert!(delete.iter().any(|(id, why)| *id == ids[2] && why.contains("100 s")), "too old: {delete:?}");

        // The volume goes: its backups are seen orphaned, then expire unless pinned.
        apply(&mut s, MetaCommand::DeleteVolume { name: "v".into() });
        apply(&mut s, MetaCommand::DeleteSchedule { name: "hourly".into() });
        let (delete, orphaned) = retention(&s, 50_000, 1000);
        assert!(delete.is_empty());
        assert_eq!(orphaned.len(), 4);
        apply(&mut s, MetaCommand::BackupsOrphaned { ids: orphaned, now_unix_ms: 50_000 });
        apply(&mut s, MetaCommand::PinBackup { id: ids[3], pinned: true });
        assert!(retention(&s, 50_999, 1000).0.is_empty(), "not yet");
        let (delete, _) = retention(&s, 51_000, 1000);
        let mut deleted: Vec<u64> = delete.iter().map(|(id, _)| *id).collect();
        deleted.sort_unstable();
        assert_eq!(deleted, vec![ids[0], ids[1], ids[2]], "expired, the pinned one kept");
    }

    #[test]
    fn backups_complete_only_when_every_copy_is_written_and_restores_hold_their_volume() {
        let mut s = initialized();
        let b = with_backup_node(&mut s);
        apply(&mut s, MetaCommand::CreateVolume { name: "v".into(), size: 1 << 30, now_unix_ms: 1 });
        apply(&mut s, MetaCommand::CreateSnapshot { volume: "v".into(), name: "s".into(), now_unix_ms: 2 });
        let begin = |s: &mut ClusterState, volume: &str, snapshot: &str, nodes: Vec<NodeId>| {
            apply(
                s,
                MetaCommand::BeginBackup {
                    volume: volume.into(),
                    snapshot: snapshot.into(),
                    nodes,
                    auto_snapshot: false,
                    schedule: None,
                    now_unix_ms: 3,
                },
            )
        };
        assert!(matches!(begin(&mut s, "nope", "s", vec![b]), MetaReply::Error(MetaError::NoSuchVolume(_))));
        assert!(matches!(begin(&mut s, "v", "nope", vec![b]), MetaReply::Error(MetaError::NoSuchSnapshot { .. })));
        let storage = *s.nodes.keys().next().expect("a node");
        assert!(matches!(begin(&mut s, "v", "s", vec![storage]), MetaReply::Error(MetaError::Backup(_))), "not a backup node");
        let MetaReply::Backup(r) = begin(&mut s, "v", "s", vec![b]) else { panic!("begin") };
        assert_eq!((r.id, r.epoch, r.state.clone()), (1, 1, BackupState::Running));
        // Running: neither restorable nor deletable.
        assert!(matches!(apply(&mut s, MetaCommand::BeginRestore { backup: 1, name: "r".into(), node: b, now_unix_ms: 4 }), MetaReply::Error(_)));
        assert!(matches!(apply(&mut s, MetaCommand::DeleteBackup { id: 1 }), MetaReply::Error(MetaError::Backup(_))));
        let stats = CopyStats { data_bytes: 10, ..Default::default() };
        let MetaReply::Backup(r) = apply(&mut s, MetaCommand::BackupCopied { id: 1, node: b, outcome: Ok(stats), now_unix_ms: 5 }) else { panic!() };
        assert_eq!(r.state, BackupState::Complete);

        // A restore makes a volume held by it; attaching it meanwhile is refused.
        assert!(matches!(
            apply(&mut s, MetaCommand::BeginRestore { backup: 1, name: "v".into(), node: b, now_unix_ms: 6 }),
            MetaReply::Error(MetaError::VolumeExists(_))
        ));
        let MetaReply::Volume(rv) = apply(&mut s, MetaCommand::BeginRestore { backup: 1, name: "r".into(), node: b, now_unix_ms: 6 }) else {
            panic!("restore")
        };
        assert_eq!((rv.size, rv.attached_by.clone()), (1 << 30, Some(restore_holder(1))));
        assert!(matches!(
            apply(&mut s, MetaCommand::AttachVolume { name: "r".into(), holder: "h".into(), force: true }),
            MetaReply::Error(MetaError::Restoring { .. })
        ));
        assert!(matches!(apply(&mut s, MetaCommand::DeleteBackup { id: 1 }), MetaReply::Error(MetaError::Backup(_))), "being restored");
        apply(&mut s, MetaCommand::RestoreProgress { volume: rv.id, next_chunk: 7, done: false, error: None });
        assert_eq!(s.backups.restores[&rv.id].next_chunk, 7);
        let MetaReply::Volume(done) = apply(&mut s, MetaCommand::RestoreProgress { volume: rv.id, next_chunk: 9, done: true, error: None }) else {
            panic!()
        };
        assert_eq!(done.attached_by, None);
        assert!(s.backups.restores.is_empty());

        // The backup outlives its volume; a failed copy fails the backup.
        apply(&mut s, MetaCommand::DeleteVolume { name: "v".into() });
        assert!(s.backups.records.contains_key(&1));
        apply(&mut s, MetaCommand::CreateVolume { name: "w".into(), size: 1 << 20, now_unix_ms: 7 });
        apply(&mut s, MetaCommand::CreateSnapshot { volume: "w".into(), name: "s".into(), now_unix_ms: 8 });
        let MetaReply::Backup(w) = begin(&mut s, "w", "s", vec![b]) else { panic!() };
        let MetaReply::Backup(w) = apply(&mut s, MetaCommand::BackupCopied { id: w.id, node: b, outcome: Err("disk".into()), now_unix_ms: 9 }) else {
            panic!()
        };
        assert!(matches!(w.state, BackupState::Failed(_)));
        assert!(matches!(apply(&mut s, MetaCommand::DeleteBackup { id: w.id }), MetaReply::Backup(_)));
        assert!(matches!(apply(&mut s, MetaCommand::DeleteBackup { id: w.id }), MetaReply::Error(MetaError::NoSuchBackup(_))));
    }

    #[test]
    fn an_encrypted_volumes_backup_keeps_its_own_keys_and_restores_into_an_encrypted_volume() {
        let mut s = initialized();
        let b = with_backup_node(&mut s);
        let keys = VolumeKeys { key_id: 5, current: 1, digests: [(1, [1u8; 32])].into() };
        apply(&mut s, MetaCommand::CreateEncryptedVolume { name: "e".into(), size: 1 << 20, now_unix_ms: 1, keys });
        apply(&mut s, MetaCommand::CreateSnapshot { volume: "e".into(), name: "s".into(), now_unix_ms: 2 });
        let e = s.volume_by_name("e").map(|v| v.id).expect("e");
        let begin = |s: &mut ClusterState, keys: Option<VolumeKeys>| {
            let (volume, snapshot, nodes, now_unix_ms) = ("e".to_string(), "s".to_string(), vec![b], 3);
            apply(
                s,
                match keys {
                    None => MetaCommand::BeginBackup { volume, snapshot, nodes, auto_snapshot: false, schedule: None, now_unix_ms },
                    Some(keys) => {
                        MetaCommand::BeginEncryptedBackup { volume, snapshot, nodes, auto_snapshot: false, schedule: None, now_unix_ms, keys }
                    }
                },
            )
        };
        // Without copies of the keys, or with copies of other keys: refused.
        assert!(matches!(begin(&mut s, None), MetaReply::Error(MetaError::Backup(_))));
        let other = VolumeKeys { key_id: 6, current: 1, digests: [(1, [9u8; 32])].into() };
        assert!(matches!(begin(&mut s, Some(other)), MetaReply::Error(MetaError::Backup(m)) if m.contains("changed")));
        let copies = VolumeKeys { key_id: 6, current: 1, digests: [(1, [1u8; 32])].into() };
        let MetaReply::Backup(r) = begin(&mut s, Some(copies.clone())) else { panic!("begin") };
        assert_eq!(s.backup_keys[&r.id], BackupKeys { keys: copies, sealed_as: [(1, e)].into() });
        apply(&mut s, MetaCommand::BackupCopied { id: r.id, node: b, outcome: Ok(CopyStats::default()), now_unix_ms: 4 });

        // The volume's deletion erases its own keys, not the backup's.
        s.key_effects.clear();
        apply(&mut s, MetaCommand::DeleteVolume { name: "e".into() });
        assert_eq!(s.key_effects, vec![KeyEffect::Erase(5)]);
        assert!(s.references_key(6));

        // A restore needs the keys rewrapped plus one newer version.
        let restore = |s: &mut ClusterState, name: &str, keys: Option<VolumeKeys>| {
            let (backup, name, node, now_unix_ms) = (r.id, name.to_string(), b, 5);
            apply(
                s,
                match keys {
                    None => MetaCommand::BeginRestore { backup, name, node, now_unix_ms },
                    Some(keys) => MetaCommand::BeginEncryptedRestore { backup, name, node, now_unix_ms, keys },
                },
            )
        };
        assert!(matches!(restore(&mut s, "r", None), MetaReply::Error(MetaError::Backup(m)) if m.contains("--kek-file")));
        let same = VolumeKeys { key_id: 7, current: 1, digests: [(1, [2u8; 32])].into() };
        assert!(matches!(restore(&mut s, "r", Some(same)), MetaReply::Error(MetaError::Backup(_))));
        let ours = VolumeKeys { key_id: 7, current: 2, digests: [(1, [2u8; 32]), (2, [3u8; 32])].into() };
        let MetaReply::Volume(rv) = restore(&mut s, "r", Some(ours.clone())) else { panic!("restore") };
        assert_eq!(s.volume_keys[&rv.id], ours);
        assert_eq!(s.inherited_keys[&rv.id], [(1, e)].into(), "the restored blocks open as the source's");

        // Deleting the backup erases its keys.
        apply(&mut s, MetaCommand::RestoreProgress { volume: rv.id, next_chunk: 1, done: true, error: None });
        s.key_effects.clear();
        assert!(matches!(apply(&mut s, MetaCommand::DeleteBackup { id: r.id }), MetaReply::Backup(_)));
        assert_eq!(s.key_effects, vec![KeyEffect::Erase(6)]);
        assert!(!s.references_key(6) && s.references_key(7));
    }
}
