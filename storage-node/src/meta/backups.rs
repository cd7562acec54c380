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

use super::state::{ClusterState, MetaError, MetaReply};

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
}

/// The attachment holder of a volume being restored from `backup`.
pub fn restore_holder(backup: u64) -> String {
    format!("restore:backup-{backup}")
}

fn refused(message: String) -> MetaReply {
    MetaReply::Error(MetaError::Backup(message))
}

impl ClusterState {
    /// Records a new running backup of `volume`'s snapshot `snapshot`, kept on `nodes`.
    pub(super) fn begin_backup(&mut self, volume: &str, snapshot: &str, nodes: Vec<NodeId>, auto_snapshot: bool, now_unix_ms: u64) -> MetaReply {
        let Some(v) = self.volume_by_name(volume).cloned() else {
            return MetaReply::Error(MetaError::NoSuchVolume(volume.to_string()));
        };
        if self.volume_keys.contains_key(&v.id) {
            return refused(format!("volume {volume} is encrypted: backups of encrypted volumes are not built yet"));
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
        };
        self.backups.records.insert(id, record.clone());
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
        MetaReply::Backup(b)
    }

    /// Creates volume `name` from complete backup `backup`, attached read-write by the restore
    /// that `node` runs.
    pub(super) fn begin_restore(&mut self, backup: u64, name: String, node: NodeId, now_unix_ms: u64) -> MetaReply {
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
        let reply = self.create_volume(name, b.size, now_unix_ms, None);
        let MetaReply::Volume(v) = reply else { return reply };
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

/// A backup state for people.
pub fn describe(state: &BackupState) -> String {
    match state {
        BackupState::Running => "running".into(),
        BackupState::Complete => "complete".into(),
        BackupState::Failed(why) => format!("failed: {why}"),
    }
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
    fn backups_complete_only_when_every_copy_is_written_and_restores_hold_their_volume() {
        let mut s = initialized();
        let b = with_backup_node(&mut s);
        apply(&mut s, MetaCommand::CreateVolume { name: "v".into(), size: 1 << 30, now_unix_ms: 1 });
        apply(&mut s, MetaCommand::CreateSnapshot { volume: "v".into(), name: "s".into(), now_unix_ms: 2 });
        let begin = |s: &mut ClusterState, volume: &str, snapshot: &str, nodes: Vec<NodeId>| {
            apply(s, MetaCommand::BeginBackup { volume: volume.into(), snapshot: snapshot.into(), nodes, auto_snapshot: false, now_unix_ms: 3 })
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
}
