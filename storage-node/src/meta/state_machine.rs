//! The meta group's state machine: [`ClusterState`] in memory, serialised whole at each
//! checkpoint into the log database's state-machine records, and the audit log's records in
//! this node's audit file ([`AuditLog`]).
//!
//! A snapshot is [`SNAPSHOT_MAGIC`], a format version (u32, little endian) and then, in formats 2 and 3,
//! the length (u64, little endian) of the bincode of the checkpoint record and the state, that
//! bincode, and the audit file's lines up to the state's head (empty in the stored checkpoint,
//! whose audit records are in the audit file; present in snapshots sent to a new member). In
//! format 1 (before tokens and the audit log) the bincode is all there is. bincode is not
//! self-describing: a field added to [`ClusterState`] changes the format, so such a change
//! raises [`SNAPSHOT_VERSION`] and keeps a decoder for the versions before it
//! (`decode_snapshot`). Snapshots written before the header existed (no magic) are format 1;
//! format 3 added encrypted volumes' key references (`volume_keys`), format 4 re-encryptions in
//! progress (`reencrypts`), format 5 volumes' snapshots and write epochs (`snapshots`), format 6 clones (`clones`), format 7 the backup catalog (`backups`), format 8
//! encrypted volumes' inherited, retired and backup keys and the QoS limits (`inherited_keys`,
//! `retired_keys`, `backup_keys`, `volume_qos`, `qos_default`), format 9 the cluster version
//! and the versions each node speaks (`cluster_version`, `node_versions`; an initialized
//! cluster from an older format ran at version 1), format 10 the per-volume metrics switch
//! (`per_volume_metrics`).
//!
//! Applying a volume's deletion erases its wrapped key from this node's [`KeyStore`] before
//! the apply completes (crypto-shredding; the keys themselves never enter a snapshot or log).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, RwLock};

use basalt_raft::{ApplyItem, CheckpointRecord, SmStore, SnapshotReceiver, SnapshotSink, SnapshotStream, StateMachine};
use bytes::Bytes;
use tokio::sync::watch;

use basalt_common::{NodeId, VolumeId};
use serde::Deserialize;

use super::audit_log::AuditLog;
use super::key_store::KeyStore;
use super::state::{
    AuditEffect, AuditHead, ClusterSettings, ClusterState, KeyEffect, MetaCommand, MetaError, MetaReply, NodeRecord, PgRecord, VolumeKeys,
    VolumeRecord,
};
use basalt_security::{TokenId, TokenRecord};

const SNAPSHOT_KEY: &str = "snapshot";

/// Shared, read-mostly view of the replicated cluster state on this node.
#[derive(Clone)]
pub struct MetaShared {
    state: Arc<RwLock<ClusterState>>,
    version: watch::Sender<u64>,
}

impl Default for MetaShared {
    fn default() -> Self {
        Self { state: Arc::new(RwLock::new(ClusterState::default())), version: watch::channel(0).0 }
    }
}

impl MetaShared {
    /// A copy of the current state.
    pub fn snapshot(&self) -> ClusterState {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs `f` on the current state.
    pub fn with<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        f(&self.state.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Notified whenever the applied state changes version.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn replace(&self, state: ClusterState) {
        let version = state.version;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = state;
        self.version.send_replace(version);
    }
}

/// Opens every meta snapshot this format knows.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"BSLTMETA";

/// The format this binary writes (and the newest it reads).
pub const SNAPSHOT_VERSION: u32 = 10;

/// [`ClusterState`] as format 1 had it, before tokens and the audit log.
#[derive(Deserialize)]
struct ClusterStateV1 {
    cluster_id: Option<String>,
    settings: Option<ClusterSettings>,
    nodes: BTreeMap<NodeId, NodeRecord>,
    pgs: Vec<PgRecord>,
    volumes: BTreeMap<VolumeId, VolumeRecord>,
    next_volume_id: u64,
    version: u64,
    draining: BTreeSet<NodeId>,
    removed: BTreeSet<NodeId>,
}

impl From<ClusterStateV1> for ClusterState {
    fn from(v: ClusterStateV1) -> ClusterState {
        ClusterState {
            cluster_id: v.cluster_id,
            settings: v.settings,
            nodes: v.nodes,
            pgs: v.pgs,
            volumes: v.volumes,
            next_volume_id: v.next_volume_id,
            version: v.version,
            draining: v.draining,
            removed: v.removed,
            ..ClusterState::default()
        }
    }
}

// Each older format is the one before it with fields appended; bincode writes a nested struct
// as its fields in order, so each legacy struct is the previous one plus what its format added.

/// [`ClusterState`] as format 2 had it, before encrypted volumes: format 1, then tokens and the
/// audit log's head.
#[derive(Deserialize)]
struct ClusterStateV2 {
    v1: ClusterStateV1,
    tokens: BTreeMap<TokenId, TokenRecord>,
    audit: AuditHead,
}

impl From<ClusterStateV2> for ClusterState {
    fn from(v: ClusterStateV2) -> ClusterState {
        ClusterState { tokens: v.tokens, audit: v.audit, ..v.v1.into() }
    }
}

/// [`ClusterState`] as format 3 had it, before re-encryptions: format 2, then encrypted volumes'
/// keys and the encryption default.
#[derive(Deserialize)]
struct ClusterStateV3 {
    v2: ClusterStateV2,
    volume_keys: BTreeMap<VolumeId, VolumeKeys>,
    encrypt_by_default: bool,
}

impl From<ClusterStateV3> for ClusterState {
    fn from(v: ClusterStateV3) -> ClusterState {
        ClusterState { volume_keys: v.volume_keys, encrypt_by_default: v.encrypt_by_default, ..v.v2.into() }
    }
}

/// [`ClusterState`] as format 4 had it, before snapshots: format 3, then re-encryptions.
#[derive(Deserialize)]
struct ClusterStateV4 {
    v3: ClusterStateV3,
    reencrypts: BTreeMap<VolumeId, crate::meta::state::Reencrypt>,
}

impl From<ClusterStateV4> for ClusterState {
    fn from(v: ClusterStateV4) -> ClusterState {
        ClusterState { reencrypts: v.reencrypts, ..v.v3.into() }
    }
}

/// [`ClusterState`] as format 5 had it, before clones: format 4, then snapshots.
#[derive(Deserialize)]
struct ClusterStateV5 {
    v4: ClusterStateV4,
    snapshots: BTreeMap<VolumeId, crate::meta::snapshots::VolumeSnapshots>,
}

impl From<ClusterStateV5> for ClusterState {
    fn from(v: ClusterStateV5) -> ClusterState {
        ClusterState { snapshots: v.snapshots, ..v.v4.into() }
    }
}

/// [`ClusterState`] as format 6 had it, before backups: format 5, then clones.
#[derive(Deserialize)]
struct ClusterStateV6 {
    v5: ClusterStateV5,
    clones: BTreeMap<VolumeId, crate::meta::clones::CloneOrigin>,
}

impl From<ClusterStateV6> for ClusterState {
    fn from(v: ClusterStateV6) -> ClusterState {
        ClusterState { clones: v.clones, ..v.v5.into() }
    }
}

/// [`ClusterState`] as format 7 had it, before inherited and retired keys: format 6, then
/// the backup catalog.
#[derive(Deserialize)]
struct ClusterStateV7 {
    v6: ClusterStateV6,
    backups: crate::meta::backups::Backups,
}

impl From<ClusterStateV7> for ClusterState {
    fn from(v: ClusterStateV7) -> ClusterState {
        ClusterState { backups: v.backups, ..v.v6.into() }
    }
}

/// [`ClusterState`] as format 8 had it, before cluster versions: format 7, then inherited,
/// retired and backup keys and QoS limits. It ran at cluster version 1.
#[derive(Deserialize)]
struct ClusterStateV8 {
    v7: ClusterStateV7,
    inherited_keys: BTreeMap<VolumeId, BTreeMap<u32, VolumeId>>,
    retired_keys: BTreeMap<VolumeId, BTreeSet<u32>>,
    backup_keys: BTreeMap<u64, crate::meta::backups::BackupKeys>,
    volume_qos: BTreeMap<VolumeId, basalt_common::qos::QosLimits>,
    qos_default: basalt_common::qos::QosLimits,
}

impl From<ClusterStateV8> for ClusterState {
    fn from(v: ClusterStateV8) -> ClusterState {
        ClusterState {
            inherited_keys: v.inherited_keys,
            retired_keys: v.retired_keys,
            backup_keys: v.backup_keys,
            volume_qos: v.volume_qos,
            qos_default: v.qos_default,
            ..v.v7.into()
        }
    }
}

/// [`ClusterState`] as format 9 had it, before per-volume metrics: format 8, then the cluster
/// version and what each node speaks.
#[derive(Deserialize)]
struct ClusterStateV9 {
    v8: ClusterStateV8,
    cluster_version: basalt_common::version::ClusterVersion,
    node_versions: BTreeMap<basalt_common::NodeId, basalt_common::version::VersionRange>,
}

impl From<ClusterStateV9> for ClusterState {
    fn from(v: ClusterStateV9) -> ClusterState {
        ClusterState { cluster_version: v.cluster_version, node_versions: v.node_versions, ..v.v8.into() }
    }
}

fn encode_snapshot(record: &CheckpointRecord, state: &ClusterState, audit: &[u8]) -> Vec<u8> {
    // Serialising plain structs and maps into a Vec cannot fail.
    let body = bincode::serialize(&(record.encode(), state)).expect("cluster state serialises");
    let mut out = Vec::with_capacity(SNAPSHOT_MAGIC.len() + 12 + body.len() + audit.len());
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(audit);
    out
}

/// Decodes a snapshot into its checkpoint record, state and audit lines.
fn decode_snapshot(bytes: &[u8]) -> io::Result<(CheckpointRecord, ClusterState, &[u8])> {
    let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidData, m);
    let (version, body) = match bytes.strip_prefix(SNAPSHOT_MAGIC.as_slice()) {
        Some(rest) => {
            let (v, body) = rest.split_at_checked(4).ok_or_else(|| invalid("meta snapshot truncated in its header".into()))?;
            let v: [u8; 4] = v.try_into().map_err(|_| invalid("meta snapshot header".into()))?;
            (u32::from_le_bytes(v), body)
        }
        None => (1, bytes),
    };
    let (record, state, audit): (Vec<u8>, ClusterState, &[u8]) = match version {
        1 => {
            let (record, state): (Vec<u8>, ClusterStateV1) =
                bincode::deserialize(body).map_err(|e| invalid(format!("corrupt meta snapshot (format 1): {e}")))?;
            (record, state.into(), &[])
        }
        2..=10 => {
            let (len, rest) = body.split_at_checked(8).ok_or_else(|| invalid("meta snapshot truncated in its header".into()))?;
            let len = u64::from_le_bytes(len.try_into().map_err(|_| invalid("meta snapshot header".into()))?);
            let len = usize::try_from(len).ok().filter(|l| *l <= rest.len()).ok_or_else(|| invalid("meta snapshot truncated in its state".into()))?;
            let (state, audit) = rest.split_at(len);
            let corrupt = |e: bincode::Error| invalid(format!("corrupt meta snapshot (format {version}): {e}"));
            let (record, state): (Vec<u8>, ClusterState) = match version {
                2 => {
                    let (record, state): (Vec<u8>, ClusterStateV2) = bincode::deserialize(state).map_err(corrupt)?;
                    (record, state.into())
                }
                3 => {
                    let (record, state): (Vec<u8>, ClusterStateV3) = bincode::deserialize(state).map_err(corrupt)?;
                    (record, state.into())
                }
                4 => {
                    let (record, state): (Vec<u8>, ClusterStateV4) = bincode::deserialize(state).map_err(corrupt)?;
                    (record, state.into())
                }
                5 => {
                    let (record, state): (Vec<u8>, ClusterStateV5) = bincode::deserialize(state).map_err(corrupt)?;
                    (record, state.into())
                }
                6 => {
                    let (record, state): (Vec<u8>, ClusterStateV6) = bincode::deserialize(state).map_err(corrupt)?;
                    (record, state.into())
                }
                7 => {
                    let (record, state): (Vec<u8>, ClusterStateV7) = bincode::deserialize(state).map_err(corrupt)?;
                    (record, state.into())
                }
                8 => {
                    let (record, state): (Vec<u8>, ClusterStateV8) = bincode::deserialize(state).map_err(corrupt)?;
                    (record, state.into())
                }
                9 => {
                    let (record, state): (Vec<u8>, ClusterStateV9) = bincode::deserialize(state).map_err(corrupt)?;
                    (record, state.into())
                }
                _ => bincode::deserialize(state).map_err(corrupt)?,
            };
            (record, state, audit)
        }
        v => {
            return Err(invalid(format!(
                "meta snapshot format {v} is newer than this binary reads (up to {SNAPSHOT_VERSION}): run the newer basalt-node"
            )));
        }
    };
    let mut state = state;
    if version < 9 && state.cluster_id.is_some() {
        // Clusters from before cluster versions ran at version 1.
        state.cluster_version = 1;
    }
    let record = CheckpointRecord::decode(&record).map_err(|e| invalid(e.to_string()))?;
    Ok((record, state, audit))
}

/// The meta state machine.
pub struct MetaStateMachine {
    shared: MetaShared,
    store: SmStore,
    audit: Arc<AuditLog>,
    keys: Arc<KeyStore>,
}

impl MetaStateMachine {
    /// A state machine publishing into `shared`, checkpointing into `store`, keeping the
    /// audit log's records in `audit` and erasing destroyed keys from `keys`.
    pub fn new(shared: MetaShared, store: SmStore, audit: Arc<AuditLog>, keys: Arc<KeyStore>) -> Self {
        Self { shared, store, audit, keys }
    }

    /// Erases what the applied commands destroyed. A failure is loud but does not stop the
    /// meta group: the key-store sweep erases every key no volume references.
    async fn erase_keys(&self, effects: Vec<KeyEffect>) {
        let keys = self.keys.clone();
        let done = blocking(move || {
            for effect in effects {
                match effect {
                    KeyEffect::Erase(key_id) => {
                        let n = keys.erase(key_id).map_err(io::Error::other)?;
                        tracing::info!(key_id = format!("{key_id:016x}"), slots = n, "erased a volume's wrapped keys");
                    }
                    KeyEffect::EraseVersion(key_id, version) => {
                        keys.erase_version(key_id, version).map_err(io::Error::other)?;
                        tracing::info!(key_id = format!("{key_id:016x}"), version, "erased a data key version no block uses any more");
                    }
                }
            }
            Ok(())
        })
        .await;
        if let Err(e) = done {
            tracing::error!(error = %e, "erasing a wrapped key failed; the key-store sweep will retry");
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Runs blocking audit-file work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(io::Error::other)?
}

/// A serialised meta snapshot.
pub struct MetaSnapshot(Option<Bytes>);

impl SnapshotStream for MetaSnapshot {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        Ok(self.0.take())
    }
}

/// Persists one checkpoint.
pub struct MetaCheckpoint {
    bytes: Vec<u8>,
    store: SmStore,
    audit: Arc<AuditLog>,
}

impl basalt_raft::Checkpoint for MetaCheckpoint {
    type Snapshot = MetaSnapshot;
    async fn run(self) -> io::Result<MetaSnapshot> {
        // The audit records up to the checkpoint must be durable before the log entries that
        // carried them may be purged.
        let audit = self.audit.clone();
        blocking(move || audit.sync()).await?;
        self.store.put(SNAPSHOT_KEY, self.bytes.clone()).await?;
        Ok(MetaSnapshot(Some(Bytes::from(self.bytes))))
    }
}

/// Receives a meta snapshot (small: kept in memory).
#[derive(Clone)]
pub struct MetaReceiver;

/// Accumulates a meta snapshot.
pub struct MetaSink(Vec<u8>);

impl SnapshotReceiver for MetaReceiver {
    type Snapshot = MetaSnapshot;
    type Sink = MetaSink;
    async fn begin(&self, _record: &CheckpointRecord) -> io::Result<MetaSink> {
        Ok(MetaSink(Vec::new()))
    }
}

impl SnapshotSink for MetaSink {
    type Snapshot = MetaSnapshot;
    async fn write(&mut self, chunk: Bytes) -> io::Result<()> {
        if self.0.len() + chunk.len() > 256 << 20 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "meta snapshot larger than 256 MiB"));
        }
        self.0.extend_from_slice(&chunk);
        Ok(())
    }
    async fn finish(self) -> io::Result<MetaSnapshot> {
        Ok(MetaSnapshot(Some(Bytes::from(self.0))))
    }
}

impl StateMachine for MetaStateMachine {
    type Snapshot = MetaSnapshot;
    type Checkpoint = MetaCheckpoint;
    type Receiver = MetaReceiver;

    async fn recover(&mut self) -> io::Result<Option<CheckpointRecord>> {
        let store = self.store.clone();
        let bytes = tokio::task::spawn_blocking(move || store.get_blocking(SNAPSHOT_KEY)).await.map_err(io::Error::other)??;
        let Some(bytes) = bytes else {
            // No checkpoint: the whole log replays, audit records included.
            let audit = self.audit.clone();
            blocking(move || audit.truncate_from(1)).await?;
            return Ok(None);
        };
        let (record, state, _) = decode_snapshot(&bytes)?;
        // Records after the checkpoint come back as the log replays.
        let (audit, next) = (self.audit.clone(), state.audit.next_seq.max(1));
        blocking(move || audit.truncate_from(next)).await?;
        self.shared.replace(state);
        Ok(Some(record))
    }

    async fn apply(&mut self, items: Vec<ApplyItem>) -> io::Result<Vec<Bytes>> {
        let mut replies = Vec::with_capacity(items.len());
        let mut state = self.shared.snapshot();
        for item in items {
            let reply = match item.command {
                None => MetaReply::Done,
                Some(bytes) => match bincode::deserialize::<MetaCommand>(&bytes) {
                    Ok(cmd) => state.apply(item.index, cmd),
                    Err(e) => MetaReply::Error(MetaError::InvalidSettings(format!("undecodable meta command: {e}"))),
                },
            };
            replies.push(Bytes::from(bincode::serialize(&reply).expect("meta reply serialises")));
        }
        let keys = std::mem::take(&mut state.key_effects);
        let effects = std::mem::take(&mut state.audit_effects);
        if !effects.is_empty() {
            let audit = self.audit.clone();
            let written = blocking(move || {
                for effect in effects {
                    match effect {
                        AuditEffect::Append(records) => audit.append(&records)?,
                        AuditEffect::Prune { through } => audit.prune(through)?,
                    }
                }
                Ok(())
            })
            .await;
            // The other meta nodes hold the records; a gap here is what `audit verify` reports.
            // Stopping the meta group over it would be worse.
            if let Err(e) = written {
                tracing::error!(error = %e, "writing the audit file failed; this node's copy of the audit log now has a gap");
            }
        }
        self.shared.replace(state);
        // After the state that no longer names them is published, so a copy healed from a
        // peer meanwhile (key keeper) is either erased here or sees the key unreferenced and
        // erases it itself.
        if !keys.is_empty() {
            self.erase_keys(keys).await;
        }
        Ok(replies)
    }

    fn checkpoint(&mut self, record: CheckpointRecord) -> MetaCheckpoint {
        let bytes = self.shared.with(|s| encode_snapshot(&record, s, &[]));
        MetaCheckpoint { bytes, store: self.store.clone(), audit: self.audit.clone() }
    }

    async fn open_snapshot(&mut self, _record: &CheckpointRecord) -> io::Result<MetaSnapshot> {
        let store = self.store.clone();
        let bytes = tokio::task::spawn_blocking(move || store.get_blocking(SNAPSHOT_KEY)).await.map_err(io::Error::other)??;
        let Some(bytes) = bytes else {
            return Ok(MetaSnapshot(None));
        };
        // A new member needs the audit records the checkpoint covers, from this node's file.
        let (record, state, _) = decode_snapshot(&bytes)?;
        let (audit, next) = (self.audit.clone(), state.audit.next_seq.max(1));
        let lines = blocking(move || audit.bytes_before(next)).await?;
        Ok(MetaSnapshot(Some(Bytes::from(encode_snapshot(&record, &state, &lines)))))
    }

    async fn install(&mut self, record: CheckpointRecord, mut snapshot: MetaSnapshot) -> io::Result<()> {
        let bytes = snapshot.next_chunk().await?.ok_or_else(|| io::Error::other("empty meta snapshot"))?;
        let (_, state, lines) = decode_snapshot(&bytes)?;
        let (audit, lines) = (self.audit.clone(), lines.to_vec());
        blocking(move || audit.replace(&lines)).await?;
        self.store.put(SNAPSHOT_KEY, encode_snapshot(&record, &state, &[])).await?;
        // Deletions this node missed are not in a snapshot: keys no volume references go.
        let (keys, referenced) = (self.keys.clone(), super::key_store::referenced(&state));
        match blocking(move || super::key_store::sweep(&keys, &referenced, now_ms()).map_err(io::Error::other)).await {
            Ok(erased) if !erased.is_empty() => tracing::info!(count = erased.len(), "erased wrapped keys of volumes deleted meanwhile"),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "sweeping the key store after a snapshot failed"),
        }
        self.shared.replace(state);
        Ok(())
    }

    fn receiver(&self) -> MetaReceiver {
        MetaReceiver
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::state::MetaCommand;

    fn sample() -> ClusterState {
        let mut state = ClusterState::default();
        state.apply(1, MetaCommand::CreateVolume { name: "v".into(), size: 1 << 20, now_unix_ms: 7 });
        state.next_volume_id = 42;
        state.version = 9;
        state
    }

    #[test]
    fn snapshots_round_trip_and_older_or_unknown_formats_are_handled() {
        let mut state = sample();
        let token = basalt_security::Token::generate();
        state.tokens.insert(token.id(), basalt_security::TokenRecord::new(&token, basalt_security::Role::Admin, "test".into(), 1));
        state.audit.next_seq = 3;
        let keys = crate::meta::state::VolumeKeys { key_id: 77, current: 1, digests: [(1, [9u8; 32])].into() };
        state.volume_keys.insert(VolumeId(1), keys);
        state.reencrypts.insert(VolumeId(1), crate::meta::state::Reencrypt { to_version: 2, next_block: 5, started_unix_ms: 6, rate: 7 });
        let mut snaps = crate::meta::snapshots::VolumeSnapshots { write_epoch: 4, ..Default::default() };
        snaps.snapshots.insert("s".into(), crate::meta::snapshots::SnapshotRecord { epoch: 3, created_unix_ms: 8 });
        state.snapshots.insert(VolumeId(1), snaps);
        let origin = crate::meta::clones::CloneOrigin {
            parent: VolumeId(1),
            parent_name: "p".into(),
            snapshot: "s".into(),
            lineage: vec![(VolumeId(1), 3)],
            placement: VolumeId(1),
        };
        state.clones.insert(VolumeId(2), origin);
        state.backups.next_id = 5;
        let backup = crate::meta::backups::BackupRecord {
            id: 4,
            volume: VolumeId(1),
            volume_name: "p".into(),
            snapshot: "s".into(),
            epoch: 3,
            size: 1 << 20,
            nodes: vec![basalt_common::NodeId(9)],
            copies: BTreeMap::new(),
            state: crate::meta::backups::BackupState::Running,
            created_unix_ms: 1,
            finished_unix_ms: 0,
            auto_snapshot: true,
            schedule: Some("nightly".into()),
            pinned: true,
            volume_deleted_unix_ms: 3,
        };
        state.backups.records.insert(4, backup);
        let record = CheckpointRecord::default();
        let mut newest = state.clone();
        newest.inherited_keys.insert(VolumeId(2), [(1, VolumeId(1))].into());
        newest.retired_keys.insert(VolumeId(1), [1].into());
        newest.volume_qos.insert(VolumeId(1), basalt_common::qos::QosLimits { iops: 500, bps: 0, burst_ms: 1000 });
        newest.qos_default.iops = 1000;
        newest.cluster_version = 3;
        newest.node_versions.insert(basalt_common::NodeId(1), basalt_common::version::VersionRange { min: 2, max: 4 });
        newest.per_volume_metrics = true;
        let bytes = encode_snapshot(&record, &newest, b"line 1\nline 2\n");
        assert!(bytes.starts_with(SNAPSHOT_MAGIC));
        let (r, s, audit) = decode_snapshot(&bytes).unwrap();
        assert_eq!((r, s, audit), (record.clone(), newest.clone(), &b"line 1\nline 2\n"[..]));

        // Format 1 (before tokens and the audit log), with and without the header.
        let v1 = sample();
        let fields = (&v1.cluster_id, &v1.settings, &v1.nodes, &v1.pgs, &v1.volumes, v1.next_volume_id, v1.version, &v1.draining, &v1.removed);
        let legacy = bincode::serialize(&(record.encode(), fields)).unwrap();
        assert_eq!(decode_snapshot(&legacy).unwrap().1, v1);
        let mut headed = SNAPSHOT_MAGIC.to_vec();
        headed.extend_from_slice(&1u32.to_le_bytes());
        headed.extend_from_slice(&legacy);
        assert_eq!(decode_snapshot(&headed).unwrap().1, v1);

        // Format 2 (before encrypted volumes).
        let v2 = {
            let mut s = state.clone();
            s.volume_keys.clear();
            s.reencrypts.clear();
            s.snapshots.clear();
            s.clones.clear();
            s.backups = Default::default();
            s
        };
        let fields = (
            &v2.cluster_id,
            &v2.settings,
            &v2.nodes,
            &v2.pgs,
            &v2.volumes,
            v2.next_volume_id,
            v2.version,
            &v2.draining,
            &v2.removed,
            &v2.tokens,
            &v2.audit,
        );
        let body = bincode::serialize(&(record.encode(), fields)).unwrap();
        let mut two = SNAPSHOT_MAGIC.to_vec();
        two.extend_from_slice(&2u32.to_le_bytes());
        two.extend_from_slice(&(body.len() as u64).to_le_bytes());
        two.extend_from_slice(&body);
        assert_eq!(decode_snapshot(&two).unwrap().1, v2);

        // Format 3 (before re-encryptions).
        let v3 = {
            let mut s = state.clone();
            s.reencrypts.clear();
            s.snapshots.clear();
            s.clones.clear();
            s.backups = Default::default();
            s
        };
        let fields = (
            &v3.cluster_id,
            &v3.settings,
            &v3.nodes,
            &v3.pgs,
            &v3.volumes,
            v3.next_volume_id,
            v3.version,
            &v3.draining,
            &v3.removed,
            &v3.tokens,
            &v3.audit,
            &v3.volume_keys,
            v3.encrypt_by_default,
        );
        let body = bincode::serialize(&(record.encode(), fields)).unwrap();
        let mut three = SNAPSHOT_MAGIC.to_vec();
        three.extend_from_slice(&3u32.to_le_bytes());
        three.extend_from_slice(&(body.len() as u64).to_le_bytes());
        three.extend_from_slice(&body);
        assert_eq!(decode_snapshot(&three).unwrap().1, v3);

        // Format 4 (before snapshots).
        let v4 = {
            let mut s = state.clone();
            s.snapshots.clear();
            s.clones.clear();
            s.backups = Default::default();
            s
        };
        let fields = (
            &v4.cluster_id,
            &v4.settings,
            &v4.nodes,
            &v4.pgs,
            &v4.volumes,
            v4.next_volume_id,
            v4.version,
            &v4.draining,
            &v4.removed,
            &v4.tokens,
            &v4.audit,
            &v4.volume_keys,
            v4.encrypt_by_default,
            &v4.reencrypts,
        );
        let body = bincode::serialize(&(record.encode(), fields)).unwrap();
        let mut four = SNAPSHOT_MAGIC.to_vec();
        four.extend_from_slice(&4u32.to_le_bytes());
        four.extend_from_slice(&(body.len() as u64).to_le_bytes());
        four.extend_from_slice(&body);
        assert_eq!(decode_snapshot(&four).unwrap().1, v4);

        // Format 5 (before clones).
        let v5 = {
            let mut s = state.clone();
            s.clones.clear();
            s.backups = Default::default();
            s
        };
        let fields = (
            (
                &v5.cluster_id,
                &v5.settings,
                &v5.nodes,
                &v5.pgs,
                &v5.volumes,
                v5.next_volume_id,
                v5.version,
                &v5.draining,
                &v5.removed,
                &v5.tokens,
                &v5.audit,
                &v5.volume_keys,
            ),
            (v5.encrypt_by_default, &v5.reencrypts, &v5.snapshots),
        );
        let body = bincode::serialize(&(record.encode(), fields)).unwrap();
        let mut five = SNAPSHOT_MAGIC.to_vec();
        five.extend_from_slice(&5u32.to_le_bytes());
        five.extend_from_slice(&(body.len() as u64).to_le_bytes());
        five.extend_from_slice(&body);
        assert_eq!(decode_snapshot(&five).unwrap().1, v5);

        // Format 6 (before backups).
        let v6 = ClusterState { backups: Default::default(), ..state.clone() };
        let fields = (
            (
                &v6.cluster_id,
                &v6.settings,
                &v6.nodes,
                &v6.pgs,
                &v6.volumes,
                v6.next_volume_id,
                v6.version,
                &v6.draining,
                &v6.removed,
                &v6.tokens,
                &v6.audit,
                &v6.volume_keys,
            ),
            (v6.encrypt_by_default, &v6.reencrypts, &v6.snapshots, &v6.clones),
        );
        let body = bincode::serialize(&(record.encode(), fields)).unwrap();
        let mut six = SNAPSHOT_MAGIC.to_vec();
        six.extend_from_slice(&6u32.to_le_bytes());
        six.extend_from_slice(&(body.len() as u64).to_le_bytes());
        six.extend_from_slice(&body);
        assert_eq!(decode_snapshot(&six).unwrap().1, v6);

        // Format 7 (before inherited and retired keys).
        let v7 = state.clone();
        let fields = (
            (
                &v7.cluster_id,
                &v7.settings,
                &v7.nodes,
                &v7.pgs,
                &v7.volumes,
                v7.next_volume_id,
                v7.version,
                &v7.draining,
                &v7.removed,
                &v7.tokens,
                &v7.audit,
                &v7.volume_keys,
            ),
            (v7.encrypt_by_default, &v7.reencrypts, &v7.snapshots, &v7.clones, &v7.backups),
        );
        let body = bincode::serialize(&(record.encode(), fields)).unwrap();
        let mut seven = SNAPSHOT_MAGIC.to_vec();
        seven.extend_from_slice(&7u32.to_le_bytes());
        seven.extend_from_slice(&(body.len() as u64).to_le_bytes());
        seven.extend_from_slice(&body);
        assert_eq!(decode_snapshot(&seven).unwrap().1, v7);

        // Format 8 (before cluster versions): an initialized cluster ran at version 1.
        let v8 = ClusterState { cluster_id: Some("c".into()), cluster_version: 1, ..newest.clone() };
        let v8 = ClusterState { node_versions: BTreeMap::new(), per_volume_metrics: false, ..v8 };
        let fields = (
            (
                &v8.cluster_id,
                &v8.settings,
                &v8.nodes,
                &v8.pgs,
                &v8.volumes,
                v8.next_volume_id,
                v8.version,
                &v8.draining,
                &v8.removed,
                &v8.tokens,
                &v8.audit,
                &v8.volume_keys,
            ),
            (v8.encrypt_by_default, &v8.reencrypts, &v8.snapshots, &v8.clones, &v8.backups),
            (&v8.inherited_keys, &v8.retired_keys, &v8.backup_keys, &v8.volume_qos, &v8.qos_default),
        );
        let body = bincode::serialize(&(record.encode(), fields)).unwrap();
        let mut eight = SNAPSHOT_MAGIC.to_vec();
        eight.extend_from_slice(&8u32.to_le_bytes());
        eight.extend_from_slice(&(body.len() as u64).to_le_bytes());
        eight.extend_from_slice(&body);
        assert_eq!(decode_snapshot(&eight).unwrap().1, v8);

        // Format 9 (before per-volume metrics).
        let v9 = ClusterState { per_volume_metrics: false, ..newest.clone() };
        let fields = (
            (
                &v9.cluster_id,
                &v9.settings,
                &v9.nodes,
                &v9.pgs,
                &v9.volumes,
                v9.next_volume_id,
                v9.version,
                &v9.draining,
                &v9.removed,
                &v9.tokens,
                &v9.audit,
                &v9.volume_keys,
            ),
            (v9.encrypt_by_default, &v9.reencrypts, &v9.snapshots, &v9.clones, &v9.backups),
            (&v9.inherited_keys, &v9.retired_keys, &v9.backup_keys, &v9.volume_qos, &v9.qos_default),
            (v9.cluster_version, &v9.node_versions),
        );
        let body = bincode::serialize(&(record.encode(), fields)).unwrap();
        let mut nine = SNAPSHOT_MAGIC.to_vec();
        nine.extend_from_slice(&9u32.to_le_bytes());
        nine.extend_from_slice(&(body.len() as u64).to_le_bytes());
        nine.extend_from_slice(&body);
        assert_eq!(decode_snapshot(&nine).unwrap().1, v9);

        // A newer format is refused by name, not misread.
        let mut newer = SNAPSHOT_MAGIC.to_vec();
        newer.extend_from_slice(&(SNAPSHOT_VERSION + 1).to_le_bytes());
        newer.extend_from_slice(&bytes[12..]);
        let e = decode_snapshot(&newer).unwrap_err();
        assert!(
            e.to_string().contains(&format!("format {} is newer than this binary reads (up to {SNAPSHOT_VERSION})", SNAPSHOT_VERSION + 1)),
            "{e}"
        );

        // Truncated: an error, never a panic. (There is no checksum: a flipped bit inside
        // the body may decode; the log database's own checksums guard the stored copy.)
        for cut in [3, 8, 10, 12, 16, 20, bytes.len() / 2] {
            assert!(decode_snapshot(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
