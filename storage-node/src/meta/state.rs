//! The cluster metadata the meta group replicates, and the commands that change it.
//!
//! Pure and deterministic: [`ClusterState::apply`] is the meta state machine's whole logic, so
//! every validation that decides an outcome happens here, against the replicated state, and
//! each replica reaches the same answer.

use std::collections::{BTreeMap, BTreeSet};

use basalt_common::names::validate_name;
use basalt_common::qos::QosLimits;
use basalt_common::units::format_size;
use basalt_common::version::{ClusterVersion, VersionMismatch, VersionRange};
use basalt_common::{BLOCK_SIZE, DomainLevel, Labels, Layout, NodeId, PgId, VolumeId};
use basalt_security::audit::{AuditEvent, AuditRecord, ChainAnchor, ChainHash, Outcome};
use basalt_security::{TokenId, TokenRecord};
use serde::{Deserialize, Serialize};

use super::placement::{Candidate, place};

/// Largest volume: 64 TiB.
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;
/// Replicas per placement group.
pub const REPLICAS: usize = 3;

/// What a node does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Holds placement-group replicas.
    Storage,
    /// Member of the meta group.
    Meta,
    /// Holds backups (never a primary replica).
    Backup,
}

impl Role {
    /// The role's name in configs and CLI output.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Storage => "storage",
            Role::Meta => "meta",
            Role::Backup => "backup",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "storage" => Ok(Role::Storage),
            "meta" => Ok(Role::Meta),
            "backup" => Ok(Role::Backup),
            other => Err(format!("unknown role {other:?}; roles are storage, meta, backup")),
        }
    }
}

/// A registered node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Id.
    pub id: NodeId,
    /// gRPC address.
    pub addr: String,
    /// Failure-domain labels.
    pub labels: Labels,
    /// Roles.
    pub roles: BTreeSet<Role>,
    /// Bytes of chunk space.
    pub capacity_bytes: u64,
    /// Prometheus endpoint, `host:port`.
    pub metrics_addr: String,
}

impl NodeRecord {
    /// True if the node holds PG replicas.
    pub fn is_storage(&self) -> bool {
        self.roles.contains(&Role::Storage)
    }
}

/// Cluster-wide settings fixed at init.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// Extent size and PG count.
    pub layout: Layout,
    /// Replicas must differ at this level.
    pub failure_domain: DomainLevel,
}

/// A placement group's replica set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgRecord {
    /// Id.
    pub id: PgId,
    /// Replicas; the first was the initial leader.
    pub replicas: Vec<NodeId>,
    /// A replica being moved, if any (at most one per PG at a time).
    pub moving: Option<PgMove>,
}

/// Why a replica is moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MoveReason {
    /// Its node was down longer than the re-placement timeout.
    NodeDown,
    /// Its node is being drained.
    Drain,
    /// Evens out replica counts (a node was added).
    Rebalance,
}

impl MoveReason {
    /// The reason's name in status output.
    pub fn as_str(self) -> &'static str {
        match self {
            MoveReason::NodeDown => "node-down",
            MoveReason::Drain => "drain",
            MoveReason::Rebalance => "rebalance",
        }
    }
}

/// One replica of a PG moving from one node to another: the new replica joins the PG's Raft
/// group as a learner, is filled by snapshot transfer and log catch-up, becomes a voter in the
/// old one's place (joint consensus), and only then does the map change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgMove {
    /// The replica leaving.
    pub from: NodeId,
    /// The node receiving the new replica.
    pub to: NodeId,
    /// Why.
    pub reason: MoveReason,
    /// When the move was decided (proposer's clock).
    pub started_unix_ms: u64,
}

/// Volume lifecycle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeState {
    /// Usable.
    Active,
    /// Deleted by the operator; PGs are releasing its data. `done` lists PGs finished.
    Deleting {
        /// PGs that have released the volume's data.
        done: BTreeSet<PgId>,
    },
}

/// A volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Id (never reused).
    pub id: VolumeId,
    /// Name (unique among active volumes).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Creation time.
    pub created_unix_ms: u64,
    /// Lifecycle state.
    pub state: VolumeState,
    /// Fencing epoch, raised by every attach and detach.
    pub attach_epoch: u64,
    /// The read-write attachment, if any.
    pub attached_by: Option<String>,
}

/// The replicated cluster metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Set by `InitCluster`.
    pub cluster_id: Option<String>,
    /// Set by `InitCluster`.
    pub settings: Option<ClusterSettings>,
    /// Registered nodes.
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// Placement groups, indexed by id.
    pub pgs: Vec<PgRecord>,
    /// Volumes by id.
    pub volumes: BTreeMap<VolumeId, VolumeRecord>,
    /// Next volume id to assign.
    pub next_volume_id: u64,
    /// Log index of the last change: the cluster map version.
    pub version: u64,
    /// Nodes being drained: their replicas move elsewhere and no new ones arrive.
    pub draining: BTreeSet<NodeId>,
    /// Nodes removed from the cluster; they may not register again under the same id.
    pub removed: BTreeSet<NodeId>,
    /// Bearer tokens (hashes only); revoked ones stay, marked, for listings and the audit trail.
    pub tokens: BTreeMap<TokenId, TokenRecord>,
    /// Where the audit log's hash chain stands (the records are in each meta node's audit file).
    pub audit: AuditHead,
    /// Encrypted volumes' keys (references and digests; the wrapped keys are in each meta
    /// node's key store). Added in snapshot format 3.
    pub volume_keys: BTreeMap<VolumeId, VolumeKeys>,
    /// New volumes must be encrypted unless created explicitly unencrypted. Added in snapshot
    /// format 3.
    pub encrypt_by_default: bool,
    /// Re-encryptions in progress: encrypted volumes whose blocks are being moved to their
    /// current key version. Added in snapshot format 4.
    pub reencrypts: BTreeMap<VolumeId, Reencrypt>,
    /// Volumes' write epochs and snapshots (a volume without an entry: write epoch 1, none).
    /// Added in snapshot format 5.
    pub snapshots: BTreeMap<VolumeId, super::snapshots::VolumeSnapshots>,
    /// Clones: where each came from and what it reads through. Added in snapshot format 6.
    pub clones: BTreeMap<VolumeId, super::clones::CloneOrigin>,
    /// The backup catalog and the restores under way. Added in snapshot format 7.
    pub backups: super::backups::Backups,
    /// Key versions an encrypted volume inherited (a clone from its source), and the volume
    /// whose id the blocks they seal are bound to. Added in snapshot format 8.
    pub inherited_keys: BTreeMap<VolumeId, BTreeMap<u32, VolumeId>>,
    /// Key versions a finished re-encryption no longer needs for the volume's head but its
    /// snapshots may: erased when the volume's last snapshot goes. Added in snapshot format 8.
    pub retired_keys: BTreeMap<VolumeId, BTreeSet<u32>>,
    /// Encrypted volumes' backups: their own copies of the keys (erased with the backup, not
    /// with the volume). Added in snapshot format 8.
    pub backup_keys: BTreeMap<u64, super::backups::BackupKeys>,
    /// Volumes' own QoS limits (explicitly unlimited included). Added in snapshot format 8.
    pub volume_qos: BTreeMap<VolumeId, QosLimits>,
    /// QoS limits of volumes without their own (unlimited unless configured). Added in
    /// snapshot format 8.
    pub qos_default: QosLimits,
    /// The cluster version the cluster runs at (`basalt_common::version`): the newest every
    /// node spoke when it was last raised; never lowered. Added in snapshot format 9 (older
    /// states run at version 1).
    pub cluster_version: ClusterVersion,
    /// The cluster versions each node said it speaks when it last registered. Added in
    /// snapshot format 9.
    pub node_versions: BTreeMap<NodeId, VersionRange>,
    /// Storage nodes export series per volume (requests, bytes, latency, QoS waits): off by
    /// default, since every volume adds dozens of series on each node. Added in snapshot
    /// format 10.
    pub per_volume_metrics: bool,
    /// What the last applied commands did to the audit log, for the state machine to write to
    /// the audit file; never serialised.
    #[serde(skip)]
    pub audit_effects: Vec<AuditEffect>,
    /// Wrapped keys the last applied commands destroyed, for the state machine to erase from
    /// this node's key store; never serialised.
    #[serde(skip)]
    pub key_effects: Vec<KeyEffect>,
}

/// An encrypted volume's keys as the meta group knows them: never a key, only where the
/// wrapped keys are kept (each meta node's key store, `super::key_store`, which can really
/// be erased) and what they must hash to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeKeys {
    /// The volume's key id in the key stores.
    pub key_id: u64,
    /// The version new blocks are sealed with.
    pub current: u32,
    /// SHA-256 of each live version's wrapped key.
    pub digests: BTreeMap<u32, [u8; 32]>,
}

/// A re-encryption in progress: the volume's read-write holder reads every block sealed under
/// an older key version, opens it and seals it again under `to_version` (the volume's current
/// version, which every new write already uses); when it has passed the end, the older
/// versions are erased.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reencrypt {
    /// The version blocks are moved to.
    pub to_version: u32,
    /// Every block before this one is done (sealed under `to_version`, or unwritten).
    pub next_block: u64,
    /// When it started.
    pub started_unix_ms: u64,
    /// The most bytes a second the holder scans.
    pub rate: u64,
}

/// A key-store change an applied command calls for on every meta node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyEffect {
    /// Overwrite every version of this key (its volume was deleted, or its keys rewrapped).
    Erase(u64),
    /// Overwrite one version of this key (a re-encryption moved every block off it).
    EraseVersion(u64, u32),
}

/// The audit log's position: the next sequence number, the last record's hash, and where the
/// records still kept begin (older ones were exported and pruned).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    /// Sequence number the next record gets (0 before the first: treated as 1).
    pub next_seq: u64,
    /// Hash of the last record.
    pub last: ChainHash,
    /// First record kept and the hash before it.
    pub anchor: ChainAnchor,
}

impl AuditHead {
    /// Records kept.
    pub fn kept(&self) -> u64 {
        self.next_seq.max(1) - self.anchor.first_seq.max(1)
    }

    /// The last record's sequence number (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.next_seq.max(1) - 1
    }
}

/// A change to the audit file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditEffect {
    /// New records, in order.
    Append(Vec<AuditRecord>),
    /// Export the records up to `through`, then drop them.
    Prune {
        /// Last record dropped.
        through: u64,
    },
}

/// A change to the cluster metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Creates the cluster and places its PGs on the given nodes.
    InitCluster {
        /// New cluster id.
        cluster_id: String,
        /// Settings.
        settings: ClusterSettings,
        /// Nodes known at init.
        nodes: Vec<NodeRecord>,
    },
    /// Adds a node or updates its address/labels/capacity.
    RegisterNode {
        /// The node.
        node: NodeRecord,
    },
    /// Creates a volume.
    CreateVolume {
        /// Name.
        name: String,
        /// Size in bytes.
        size: u64,
        /// Creation time (chosen by the proposer, so all replicas agree).
        now_unix_ms: u64,
    },
    /// Grows a volume.
    ResizeVolume {
        /// Name.
        name: String,
        /// New size.
        size: u64,
    },
    /// Marks a volume deleted; its PGs then release its data.
    DeleteVolume {
        /// Name.
        name: String,
    },
    /// Records a read-write attachment (raising the fencing epoch).
    AttachVolume {
        /// Volume name.
        name: String,
        /// Who attaches.
        holder: String,
        /// Take over from a current holder (which is fenced).
        force: bool,
    },
    /// Ends the attachment (raising the fencing epoch) if `epoch` is 0 or still current.
    DetachVolume {
        /// Volume name.
        name: String,
        /// Expected epoch (0: any).
        epoch: u64,
    },
    /// One PG has released a deleting volume's data.
    VolumePgReleased {
        /// The volume.
        volume: VolumeId,
        /// The PG.
        pg: PgId,
    },
    /// Starts moving `pg`'s replica on `from` to `to`.
    BeginMove {
        /// The PG.
        pg: PgId,
        /// The replica leaving.
        from: NodeId,
        /// Its new node.
        to: NodeId,
        /// Why.
        reason: MoveReason,
        /// Proposer's clock.
        now_unix_ms: u64,
    },
    /// Records a finished move: the PG's Raft group has `to` as a voter in place of `from`.
    FinishMove {
        /// The PG.
        pg: PgId,
        /// The replica that left.
        from: NodeId,
        /// Its replacement.
        to: NodeId,
    },
    /// Records an abandoned move (its target died while still a learner).
    CancelMove {
        /// The PG.
        pg: PgId,
        /// The replica that was to leave (it stays).
        from: NodeId,
        /// The abandoned target.
        to: NodeId,
    },
    /// Starts draining a node (`drain = false` stops draining it).
    DrainNode {
        /// The node.
        node: NodeId,
        /// Drain or undrain.
        drain: bool,
    },
    /// Removes a node that holds no replicas.
    RemoveNode {
        /// The node.
        node: NodeId,
    },
    /// Creates the cluster with its first admin token (`None` with security off). Replaces
    /// `InitCluster`, which stays for logs written before tokens existed.
    InitClusterWithToken {
        /// New cluster id.
        cluster_id: String,
        /// Settings.
        settings: ClusterSettings,
        /// Nodes known at init.
        nodes: Vec<NodeRecord>,
        /// The first admin token.
        admin: Option<TokenRecord>,
    },
    /// Adds a token.
    CreateToken {
        /// Its record.
        record: TokenRecord,
    },
    /// Revokes a token.
    RevokeToken {
        /// Which.
        id: TokenId,
        /// Proposer's clock.
        now_unix_ms: u64,
    },
    /// Appends events to the audit log.
    AppendAudit {
        /// The events, in order.
        events: Vec<AuditEvent>,
    },
    /// Applies `cmd` and records it, with its outcome, in the audit log: both or neither.
    Audited {
        /// The command.
        cmd: Box<MetaCommand>,
        /// The event; its outcome becomes `failed` (with the error) if the command is refused.
        event: AuditEvent,
    },
    /// Exports the audit records up to `through` on every meta node and drops them.
    PruneAudit {
        /// Last record dropped.
        through: u64,
        /// Its hash (read by the proposer from its audit file): the kept chain's anchor.
        through_hash: ChainHash,
    },
    /// Points an encrypted volume at new copies of its keys (rewrapped under another KEK, stored
    /// under `keys.key_id`); the copies under `replaces` are erased on every meta node.
    RekeyVolume {
        /// The volume.
        name: String,
        /// The key id the volume must still have (a concurrent rekey wins, this one fails).
        replaces: u64,
        /// The new references.
        keys: VolumeKeys,
    },
    /// Starts a re-encryption: like [`MetaCommand::RekeyVolume`], but `keys` also holds a new
    /// data key version (`keys.current`, above every existing one) that new blocks are sealed
    /// with from now on, and the holder moves the existing blocks to it.
    StartReencrypt {
        /// The volume.
        name: String,
        /// The key id the volume must still have.
        replaces: u64,
        /// The new references: every existing version rewrapped, and the new one.
        keys: VolumeKeys,
        /// Proposer's clock.
        now_unix_ms: u64,
        /// The most bytes a second the holder scans.
        rate: u64,
    },
    /// Records a re-encryption's progress, from the volume's current read-write holder; `done`
    /// ends it and erases every older key version.
    ReencryptProgress {
        /// The volume.
        name: String,
        /// The reporting holder's attachment epoch.
        epoch: u64,
        /// The version blocks are moved to.
        to_version: u32,
        /// Every block before this one is done.
        next_block: u64,
        /// It passed the end of the volume.
        done: bool,
    },
    /// Sets whether new volumes are encrypted by default.
    SetEncryptByDefault {
        /// On or off.
        on: bool,
    },
    /// Creates an encrypted volume whose wrapped key the meta nodes' key stores already hold.
    CreateEncryptedVolume {
        /// Name.
        name: String,
        /// Size in bytes.
        size: u64,
        /// Proposer's clock.
        now_unix_ms: u64,
        /// Its keys.
        keys: VolumeKeys,
    },
    /// Takes a snapshot (frozen at once if nobody holds the volume read-write, else asked of
    /// the holder).
    CreateSnapshot {
        /// Volume name.
        volume: String,
        /// Snapshot name.
        name: String,
        /// Proposer's clock.
        now_unix_ms: u64,
    },
    /// The holder cut the pending snapshot: freeze it at the current write epoch.
    CutSnapshot {
        /// Volume name.
        volume: String,
        /// Snapshot name.
        name: String,
        /// The holder's attachment epoch.
        attach_epoch: u64,
        /// Proposer's clock.
        now_unix_ms: u64,
    },
    /// Gives up a pending snapshot.
    CancelSnapshot {
        /// Volume name.
        volume: String,
        /// Snapshot name.
        name: String,
    },
    /// Deletes a snapshot.
    DeleteSnapshot {
        /// Volume name.
        volume: String,
        /// Snapshot name.
        name: String,
    },
    /// One PG released the versions of a volume's deleted snapshots.
    SnapshotsReleased {
        /// The volume.
        volume: VolumeId,
        /// The PG.
        pg: PgId,
        /// The release generation it acted on.
        generation: u64,
    },
    /// Starts rolling a detached volume back to a snapshot.
    RollbackVolume {
        /// Volume name.
        volume: String,
        /// Snapshot name.
        snapshot: String,
    },
    /// One PG applied a volume's rollback.
    RolledBack {
        /// The volume.
        volume: VolumeId,
        /// The PG.
        pg: PgId,
        /// The rollback's write epoch.
        at_epoch: u64,
    },
    /// Creates volume `name` as a clone of `source`'s snapshot `snapshot`.
    CloneVolume {
        /// The volume cloned.
        source: String,
        /// Its snapshot the clone starts as.
        snapshot: String,
        /// The clone's name.
        name: String,
        /// Creation time (proposer's clock).
        now_unix_ms: u64,
    },
    /// Records a new backup of a volume's snapshot, to be copied to `nodes`.
    BeginBackup {
        /// The volume.
        volume: String,
        /// Its snapshot.
        snapshot: String,
        /// The backup nodes to keep it.
        nodes: Vec<NodeId>,
        /// The snapshot was taken for it.
        auto_snapshot: bool,
        /// The schedule taking it.
        schedule: Option<String>,
        /// When it was asked for (proposer's clock).
        now_unix_ms: u64,
    },
    /// A backup node finished (or failed) its copy of a backup.
    BackupCopied {
        /// The backup.
        id: u64,
        /// The node.
        node: NodeId,
        /// What it moved and stored, or why it failed.
        outcome: Result<super::backups::CopyStats, String>,
        /// When (proposer's clock).
        now_unix_ms: u64,
    },
    /// Deletes a backup from the catalog.
    DeleteBackup {
        /// The backup.
        id: u64,
    },
    /// Adds a backup schedule.
    CreateSchedule {
        /// The schedule.
        schedule: super::backups::Schedule,
    },
    /// Removes a backup schedule.
    DeleteSchedule {
        /// Its name.
        name: String,
    },
    /// A schedule's run started.
    ScheduleRan {
        /// Its name.
        name: String,
        /// When (the leader's clock).
        now_unix_ms: u64,
    },
    /// Keeps a backup past its volume's deletion, or lets it expire.
    PinBackup {
        /// The backup.
        id: u64,
        /// Pinned or not.
        pinned: bool,
    },
    /// The leader saw these backups' volumes deleted.
    BackupsOrphaned {
        /// The backups.
        ids: Vec<u64>,
        /// When (the leader's clock).
        now_unix_ms: u64,
    },
    /// Creates a volume from a backup, held by the restore `node` runs.
    BeginRestore {
        /// The backup.
        backup: u64,
        /// The new volume's name.
        name: String,
        /// The backup node that writes it.
        node: NodeId,
        /// When (proposer's clock).
        now_unix_ms: u64,
    },
    /// How far a restore got; `done` ends it (and detaches the volume) unless `error`.
    RestoreProgress {
        /// The volume being restored.
        volume: VolumeId,
        /// Every chunk before it is written.
        next_chunk: u64,
        /// The restore finished.
        done: bool,
        /// Why it stopped.
        error: Option<String>,
    },
    /// Creates volume `name` as a clone of encrypted volume `source`'s snapshot `snapshot`,
    /// with its own copies of the source's key versions and one fresh version (`keys.current`).
    CloneEncryptedVolume {
        /// The volume cloned.
        source: String,
        /// Its snapshot the clone starts as.
        snapshot: String,
        /// The clone's name.
        name: String,
        /// Creation time (proposer's clock).
        now_unix_ms: u64,
        /// The clone's keys (already on a majority of key stores).
        keys: VolumeKeys,
    },
    /// [`MetaCommand::BeginBackup`] of an encrypted volume, with the backup's own copies of
    /// the volume's key versions (the same wrapped bytes under a new key id).
    BeginEncryptedBackup {
        /// The volume.
        volume: String,
        /// Its snapshot.
        snapshot: String,
        /// The backup nodes to keep it.
        nodes: Vec<NodeId>,
        /// The snapshot was taken for it.
        auto_snapshot: bool,
        /// The schedule taking it.
        schedule: Option<String>,
        /// When it was asked for (proposer's clock).
        now_unix_ms: u64,
        /// The copies of the keys (already on a majority of key stores).
        keys: VolumeKeys,
    },
    /// [`MetaCommand::BeginRestore`] of an encrypted volume's backup: the new volume gets the
    /// backup's key versions rewrapped for its name and a fresh version it seals with.
    BeginEncryptedRestore {
        /// The backup.
        backup: u64,
        /// The new volume's name.
        name: String,
        /// The backup node that writes it.
        node: NodeId,
        /// When (proposer's clock).
        now_unix_ms: u64,
        /// The new volume's keys (already on a majority of key stores).
        keys: VolumeKeys,
    },
    /// Sets volume `name`'s QoS limits; `None`: it follows the cluster default.
    SetVolumeQos {
        /// The volume.
        name: String,
        /// Its limits.
        qos: Option<QosLimits>,
    },
    /// Sets the QoS limits of volumes without their own.
    SetQosDefault {
        /// The limits.
        qos: QosLimits,
    },
    /// Creates a volume (`create`: [`MetaCommand::CreateVolume`] or
    /// [`MetaCommand::CreateEncryptedVolume`]) with its own QoS limits, in one step: it is never
    /// seen, nor attached, without them.
    CreateVolumeWithQos {
        /// The creation.
        create: Box<MetaCommand>,
        /// Its limits.
        qos: QosLimits,
    },
    /// Turns the storage nodes' per-volume series on or off.
    SetPerVolumeMetrics {
        /// On.
        on: bool,
    },
    /// Records the cluster versions `node` speaks (from its heartbeat); refused if they do not
    /// include the cluster's version.
    NodeVersions {
        /// The node.
        node: NodeId,
        /// What it speaks.
        range: VersionRange,
    },
    /// Raises the cluster version to `to` (a no-op if it is there already); refused while some
    /// registered node does not speak `to`. Before `cluster init`: the version it starts at.
    RaiseClusterVersion {
        /// The new version.
        to: ClusterVersion,
    },
}

impl MetaCommand {
    /// Whether the command can change the cluster map (nodes, PGs, volumes, tokens): audit-only
    /// commands leave the map's version alone, so nodes polling it are not woken for them.
    fn changes_map(&self) -> bool {
        match self {
            // Progress is asked for by whoever shows it; nodes need not be woken for it.
            MetaCommand::AppendAudit { .. } | MetaCommand::PruneAudit { .. } | MetaCommand::ReencryptProgress { .. } => false,
            // Versions are read by status and the meta leader, not by routing.
            MetaCommand::NodeVersions { .. } | MetaCommand::RaiseClusterVersion { .. } => false,
            MetaCommand::RestoreProgress { done, .. } => *done,
            MetaCommand::ScheduleRan { .. } | MetaCommand::BackupsOrphaned { .. } => false,
            MetaCommand::Audited { cmd, .. } => cmd.changes_map(),
            _ => true,
        }
    }
}

/// Why a command was refused. Carried in the reply, so it must serialise.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MetaError {
    /// The cluster has not been initialised.
    #[error("the cluster is not initialized; run `basalt cluster init`")]
    NotInitialized,
    /// `cluster init` ran before.
    #[error("the cluster is already initialized (cluster id {0})")]
    AlreadyInitialized(String),
    /// A volume with this name exists.
    #[error("a volume named {0:?} already exists")]
    VolumeExists(String),
    /// No such volume.
    #[error("no volume named {0:?}")]
    NoSuchVolume(String),
    /// Bad name.
    #[error("{0}")]
    InvalidName(String),
    /// Bad size.
    #[error("{0}")]
    InvalidSize(String),
    /// Shrinking is not supported.
    #[error("volume {name:?} is {current} bytes ({}); shrinking to {requested} bytes is not supported", format_size(*current))]
    Shrink {
        /// Volume.
        name: String,
        /// Current size.
        current: u64,
        /// Requested size.
        requested: u64,
    },
    /// Bad settings.
    #[error("{0}")]
    InvalidSettings(String),
    /// Placement impossible.
    #[error("{0}")]
    Placement(String),
    /// No such node.
    #[error("{0} is not in the cluster")]
    NoSuchNode(NodeId),
    /// A node and the cluster share no version.
    #[error("{0}")]
    Version(VersionMismatch),
    /// The node was removed and cannot come back under its id.
    #[error("{0} was removed from the cluster; start it with a new id and empty data to add it again")]
    NodeRemoved(NodeId),
    /// The node still holds replicas.
    #[error("{node} still holds {replicas} replica(s){}; drain it first (`basalt node drain {}`)", if *.draining { " and is draining" } else { "" }, .node.0)]
    NodeInUse {
        /// The node.
        node: NodeId,
        /// Replicas it holds or receives.
        replicas: usize,
        /// Whether a drain is under way.
        draining: bool,
    },
    /// A move was refused.
    #[error("{0}")]
    BadMove(String),
    /// No such token.
    #[error("no token with id {0}")]
    NoSuchToken(String),
    /// A token with this id exists (ids are random: a retried proposal).
    #[error("a token with id {0} already exists")]
    TokenExists(String),
    /// Another holder has the volume attached read-write.
    #[error("volume {name:?} is already attached read-write by {holder}; detach it first (`basalt detach {name}`) or take it over with --force")]
    AlreadyAttached {
        /// Volume.
        name: String,
        /// Current holder.
        holder: String,
    },
    /// A snapshot with this name exists.
    #[error("volume {volume:?} already has a snapshot named {name:?}")]
    SnapshotExists {
        /// Volume.
        volume: String,
        /// Snapshot.
        name: String,
    },
    /// No such snapshot.
    #[error("volume {volume:?} has no snapshot named {name:?}")]
    NoSuchSnapshot {
        /// Volume.
        volume: String,
        /// Snapshot.
        name: String,
    },
    /// Another snapshot is being cut.
    #[error("snapshot {name:?} of volume {volume:?} is being taken; try again when it is done")]
    SnapshotPending {
        /// Volume.
        volume: String,
        /// The pending snapshot.
        name: String,
    },
    /// A rollback is under way.
    #[error(
        "volume {volume:?} is being rolled back to snapshot {snapshot:?}; wait until it is done (`basalt volume rollback {volume} {snapshot}` follows it)"
    )]
    RollingBack {
        /// Volume.
        volume: String,
        /// The snapshot.
        snapshot: String,
    },
    /// No such backup.
    #[error("no backup with id {0}")]
    NoSuchBackup(u64),
    /// No such schedule.
    #[error("no schedule named {0:?}")]
    NoSuchSchedule(String),
    /// A schedule with this name exists.
    #[error("a schedule named {0:?} already exists")]
    ScheduleExists(String),
    /// A backup or restore refused.
    #[error("{0}")]
    Backup(String),
    /// The volume is being restored.
    #[error(
        "volume {volume:?} is being restored from backup {backup}; it can be attached once the restore is done (`basalt backup restore {backup} --to {volume}` follows it)"
    )]
    Restoring {
        /// Volume.
        volume: String,
        /// The backup.
        backup: u64,
    },
    /// A rollback of an attached volume.
    #[error("volume {volume:?} is attached read-write by {holder}; detach it before rolling it back (`basalt detach {volume}`)")]
    AttachedForRollback {
        /// Volume.
        volume: String,
        /// Its holder.
        holder: String,
    },
}

/// What applying a command produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaReply {
    /// Done; nothing to return.
    Done,
    /// The volume affected.
    Volume(VolumeRecord),
    /// The token affected.
    Token(TokenRecord),
    /// The backup affected.
    Backup(super::backups::BackupRecord),
    /// Refused.
    Error(MetaError),
}

/// Checks a size for a new or resized volume.
pub fn validate_size(size: u64) -> Result<(), MetaError> {
    if size == 0 {
        return Err(MetaError::InvalidSize("volume size must be greater than zero".into()));
    }
    if !size.is_multiple_of(BLOCK_SIZE) {
        let down = size / BLOCK_SIZE * BLOCK_SIZE;
        return Err(MetaError::InvalidSize(format!(
            "volume size {size} is not a multiple of {BLOCK_SIZE} bytes; use {} or {}",
            down.max(BLOCK_SIZE),
            down + BLOCK_SIZE
        )));
    }
    if size > MAX_VOLUME_SIZE {
        return Err(MetaError::InvalidSize(format!("volume size {} exceeds the maximum of {}", format_size(size), format_size(MAX_VOLUME_SIZE))));
    }
    Ok(())
}

impl ClusterState {
    /// The active volume called `name`.
    pub fn volume_by_name(&self, name: &str) -> Option<&VolumeRecord> {
        self.volumes.values().find(|v| v.name == name && v.state == VolumeState::Active)
    }

    /// Placement candidates: storage nodes at the settings' level.
    fn candidates(&self, level: DomainLevel, nodes: &BTreeMap<NodeId, NodeRecord>) -> Vec<Candidate> {
        nodes
            .values()
            .filter(|n| n.is_storage())
            .map(|n| Candidate { id: n.id, domain: n.labels.domain(level), weight: n.capacity_bytes >> 30 })
            .collect()
    }

    /// Applies one command at log index `index`. Deterministic.
    pub fn apply(&mut self, index: u64, cmd: MetaCommand) -> MetaReply {
        let changes_map = cmd.changes_map();
        let reply = match cmd {
            MetaCommand::InitCluster { cluster_id, settings, nodes } => self.init(cluster_id, settings, nodes, None),
            MetaCommand::InitClusterWithToken { cluster_id, settings, nodes, admin } => self.init(cluster_id, settings, nodes, admin),
            MetaCommand::RegisterNode { node } => {
                if self.cluster_id.is_none() {
                    return MetaReply::Error(MetaError::NotInitialized);
                }
                if self.removed.contains(&node.id) {
                    return MetaReply::Error(MetaError::NodeRemoved(node.id));
                }
                if self.nodes.get(&node.id) == Some(&node) {
                    return MetaReply::Done; // unchanged: keep the version
                }
                self.nodes.insert(node.id, node);
                MetaReply::Done
            }
            MetaCommand::CreateVolume { name, size, now_unix_ms } => self.create_volume(name, size, now_unix_ms, None),
            MetaCommand::CreateEncryptedVolume { name, size, now_unix_ms, keys } => self.create_volume(name, size, now_unix_ms, Some(keys)),
            MetaCommand::RekeyVolume { name, replaces, keys } => self.rekey_volume(&name, replaces, keys),
            MetaCommand::StartReencrypt { name, replaces, keys, now_unix_ms, rate } => self.start_reencrypt(&name, replaces, keys, now_unix_ms, rate),
            MetaCommand::ReencryptProgress { name, epoch, to_version, next_block, done } => {
                self.reencrypt_progress(&name, epoch, to_version, next_block, done)
            }
            MetaCommand::SetEncryptByDefault { on } => {
                if self.cluster_id.is_none() {
                    return MetaReply::Error(MetaError::NotInitialized);
                }
                self.encrypt_by_default = on;
                MetaReply::Done
            }
            MetaCommand::ResizeVolume { name, size } => self.resize_volume(&name, size),
            MetaCommand::DeleteVolume { name } => self.delete_volume(&name),
            MetaCommand::AttachVolume { name, holder, force } => self.attach(&name, holder, force),
            MetaCommand::DetachVolume { name, epoch } => self.detach(&name, epoch),
            MetaCommand::VolumePgReleased { volume, pg } => self.pg_released(volume, pg),
            MetaCommand::BeginMove { pg, from, to, reason, now_unix_ms } => self.begin_move(pg, from, to, reason, now_unix_ms),
            MetaCommand::FinishMove { pg, from, to } => self.finish_move(pg, from, to),
            MetaCommand::CancelMove { pg, from, to } => self.cancel_move(pg, from, to),
            MetaCommand::DrainNode { node, drain } => self.drain_node(node, drain),
            MetaCommand::RemoveNode { node } => self.remove_node(node),
            MetaCommand::CreateToken { record } => self.create_token(record),
            MetaCommand::RevokeToken { id, now_unix_ms } => self.revoke_token(id, now_unix_ms),
            MetaCommand::AppendAudit { events } => {
                self.append_audit(events);
                MetaReply::Done
            }
            MetaCommand::Audited { cmd, mut event } => {
                let reply = self.apply(index, *cmd);
                if let MetaReply::Error(e) = &reply {
                    event.outcome = Outcome::Failed;
                    event.detail = e.to_string();
                }
                self.append_audit(vec![event]);
                return reply;
            }
            MetaCommand::PruneAudit { through, through_hash } => self.prune_audit(through, through_hash),
            MetaCommand::CreateSnapshot { volume, name, now_unix_ms } => self.create_snapshot(&volume, name, now_unix_ms),
            MetaCommand::CutSnapshot { volume, name, attach_epoch, now_unix_ms } => self.cut_snapshot(&volume, name, attach_epoch, now_unix_ms),
            MetaCommand::CancelSnapshot { volume, name } => self.cancel_snapshot(&volume, &name),
            MetaCommand::DeleteSnapshot { volume, name } => self.delete_snapshot(&volume, &name),
            MetaCommand::SnapshotsReleased { volume, pg, generation } => self.snapshots_released(volume, pg, generation),
            MetaCommand::RollbackVolume { volume, snapshot } => self.rollback_volume(&volume, &snapshot),
            MetaCommand::CloneVolume { source, snapshot, name, now_unix_ms } => self.clone_volume(&source, &snapshot, name, now_unix_ms, None),
            MetaCommand::CloneEncryptedVolume { source, snapshot, name, now_unix_ms, keys } => {
                self.clone_volume(&source, &snapshot, name, now_unix_ms, Some(keys))
            }
            MetaCommand::RolledBack { volume, pg, at_epoch } => self.rolled_back(volume, pg, at_epoch),
            MetaCommand::BeginBackup { volume, snapshot, nodes, auto_snapshot, schedule, now_unix_ms } => {
                self.begin_backup(&volume, &snapshot, nodes, auto_snapshot, schedule, now_unix_ms, None)
            }
            MetaCommand::BeginEncryptedBackup { volume, snapshot, nodes, auto_snapshot, schedule, now_unix_ms, keys } => {
                self.begin_backup(&volume, &snapshot, nodes, auto_snapshot, schedule, now_unix_ms, Some(keys))
            }
            MetaCommand::CreateSchedule { schedule } => self.create_schedule(schedule),
            MetaCommand::DeleteSchedule { name } => self.delete_schedule(&name),
            MetaCommand::ScheduleRan { name, now_unix_ms } => self.schedule_ran(&name, now_unix_ms),
            MetaCommand::PinBackup { id, pinned } => self.pin_backup(id, pinned),
            MetaCommand::BackupsOrphaned { ids, now_unix_ms } => self.backups_orphaned(&ids, now_unix_ms),
            MetaCommand::BackupCopied { id, node, outcome, now_unix_ms } => self.backup_copied(id, node, outcome, now_unix_ms),
            MetaCommand::DeleteBackup { id } => self.delete_backup(id),
            MetaCommand::BeginRestore { backup, name, node, now_unix_ms } => self.begin_restore(backup, name, node, now_unix_ms, None),
            MetaCommand::BeginEncryptedRestore { backup, name, node, now_unix_ms, keys } => {
                self.begin_restore(backup, name, node, now_unix_ms, Some(keys))
            }
            MetaCommand::SetVolumeQos { name, qos } => self.set_volume_qos(&name, qos),
            MetaCommand::SetQosDefault { qos } => match qos.validate() {
                Ok(()) => {
                    self.qos_default = qos;
                    MetaReply::Done
                }
                Err(e) => MetaReply::Error(MetaError::InvalidSettings(e)),
            },
            MetaCommand::RestoreProgress { volume, next_chunk, done, error } => self.restore_progress(volume, next_chunk, done, error),
            MetaCommand::CreateVolumeWithQos { create, qos } => match (qos.validate(), &*create) {
                (Err(e), _) => MetaReply::Error(MetaError::InvalidSettings(e)),
                (Ok(()), MetaCommand::CreateVolume { .. } | MetaCommand::CreateEncryptedVolume { .. }) => match self.apply(index, *create) {
                    MetaReply::Volume(v) => {
                        self.volume_qos.insert(v.id, qos);
                        MetaReply::Volume(v)
                    }
                    other => other,
                },
                (Ok(()), other) => MetaReply::Error(MetaError::InvalidSettings(format!("not a volume creation: {other:?}"))),
            },
            MetaCommand::SetPerVolumeMetrics { on } => {
                if self.cluster_id.is_none() {
                    return MetaReply::Error(MetaError::NotInitialized);
                }
                self.per_volume_metrics = on;
                MetaReply::Done
            }
            MetaCommand::NodeVersions { node, range } => self.node_versions_of(node, range),
            MetaCommand::RaiseClusterVersion { to } => self.raise_cluster_version(to),
        };
        if !matches!(reply, MetaReply::Error(_)) && changes_map {
            self.version = index;
        }
        reply
    }

    /// Seals `events` into the chain (numbering and linking them) for the audit file.
    fn append_audit(&mut self, events: Vec<AuditEvent>) {
        if events.is_empty() {
            return;
        }
        let head = &mut self.audit;
        if head.next_seq == 0 {
            head.next_seq = 1;
            head.anchor.first_seq = 1;
        }
        let mut records = Vec::with_capacity(events.len());
        for event in events {
            let record = AuditRecord::seal(head.next_seq, event, head.last);
            head.last = record.hash;
            head.next_seq += 1;
            records.push(record);
        }
        self.audit_effects.push(AuditEffect::Append(records));
    }

    fn prune_audit(&mut self, through: u64, through_hash: ChainHash) -> MetaReply {
        let head = &mut self.audit;
        // Only records still kept, and never the last one (it is the chain's head).
        if through < head.anchor.first_seq.max(1) || through >= head.last_seq() {
            return MetaReply::Done;
        }
        head.anchor = ChainAnchor { first_seq: through + 1, prev: through_hash };
        self.audit_effects.push(AuditEffect::Prune { through });
        MetaReply::Done
    }

    fn create_token(&mut self, record: TokenRecord) -> MetaReply {
        if self.cluster_id.is_none() {
            return MetaReply::Error(MetaError::NotInitialized);
        }
        if self.tokens.contains_key(&record.id) {
            return MetaReply::Error(MetaError::TokenExists(record.id.to_string()));
        }
        self.tokens.insert(record.id, record.clone());
        MetaReply::Token(record)
    }

    fn revoke_token(&mut self, id: TokenId, now_unix_ms: u64) -> MetaReply {
        let Some(t) = self.tokens.get_mut(&id) else {
            return MetaReply::Error(MetaError::NoSuchToken(id.to_string()));
        };
        if t.revoked_unix_ms.is_none() {
            t.revoked_unix_ms = Some(now_unix_ms.max(1));
        }
        MetaReply::Token(t.clone())
    }

    fn init(&mut self, cluster_id: String, settings: ClusterSettings, nodes: Vec<NodeRecord>, admin: Option<TokenRecord>) -> MetaReply {
        if let Some(id) = &self.cluster_id {
            return MetaReply::Error(MetaError::AlreadyInitialized(id.clone()));
        }
        if let Err(e) = settings.layout.validate() {
            return MetaReply::Error(MetaError::InvalidSettings(e));
        }
        let nodes: BTreeMap<NodeId, NodeRecord> = nodes.into_iter().map(|n| (n.id, n)).collect();
        let candidates = self.candidates(settings.failure_domain, &nodes);
        let placement = match place(settings.layout.pg_count, REPLICAS, settings.failure_domain, &candidates) {
            Ok(p) => p,
            Err(e) => return MetaReply::Error(MetaError::Placement(e.to_string())),
        };
        self.cluster_id = Some(cluster_id);
        self.settings = Some(settings);
        self.nodes = nodes;
        self.pgs = placement.into_iter().enumerate().map(|(i, replicas)| PgRecord { id: PgId(i as u32), replicas, moving: None }).collect();
        self.next_volume_id = 1;
        // A version proposed before init (what the nodes known then all speak) stands.
        self.cluster_version = self.cluster_version.max(1);
        if let Some(t) = admin {
            self.tokens.insert(t.id, t);
        }
        MetaReply::Done
    }

    /// What node `node` speaks, as far as the state knows: builds before versions speak 1 only.
    pub fn versions_of(&self, node: NodeId) -> VersionRange {
        self.node_versions.get(&node).copied().unwrap_or(VersionRange { min: 1, max: 1 })
    }

    /// The version every registered node speaks, if higher than the cluster's: what the meta
    /// leader raises the cluster to.
    pub fn raisable_version(&self) -> Option<ClusterVersion> {
        let ranges: Vec<VersionRange> = self.nodes.keys().map(|n| self.versions_of(*n)).collect();
        VersionRange::common_max(&ranges).filter(|v| self.cluster_id.is_some() && *v > self.cluster_version)
    }

    fn node_versions_of(&mut self, node: NodeId, range: VersionRange) -> MetaReply {
        if self.cluster_id.is_none() {
            return MetaReply::Error(MetaError::NotInitialized);
        }
        if let Err(e) = range.check(&node.to_string(), self.cluster_version) {
            return MetaReply::Error(MetaError::Version(e));
        }
        self.node_versions.insert(node, range);
        MetaReply::Done
    }

    fn raise_cluster_version(&mut self, to: ClusterVersion) -> MetaReply {
        if to <= self.cluster_version {
            return MetaReply::Done;
        }
        if let Some((node, range)) = self.nodes.keys().map(|n| (*n, self.versions_of(*n))).find(|(_, r)| !r.contains(to)) {
            return MetaReply::Error(MetaError::Version(VersionMismatch::TooOld { who: node.to_string(), range, cluster: to }));
        }
        self.cluster_version = to;
        MetaReply::Done
    }

    pub(super) fn create_volume(&mut self, name: String, size: u64, now_unix_ms: u64, keys: Option<VolumeKeys>) -> MetaReply {
        if self.cluster_id.is_none() {
            return MetaReply::Error(MetaError::NotInitialized);
        }
        if let Err(e) = validate_name(&name) {
            return MetaReply::Error(MetaError::InvalidName(e.to_string()));
        }
        if let Err(e) = validate_size(size) {
            return MetaReply::Error(e);
        }
        if self.volume_by_name(&name).is_some() {
            return MetaReply::Error(MetaError::VolumeExists(name));
        }
        let id = VolumeId(self.next_volume_id.max(1));
        self.next_volume_id = id.0 + 1;
        if let Some(keys) = &keys
            && (keys.current == 0 || !keys.digests.contains_key(&keys.current))
        {
            return MetaReply::Error(MetaError::InvalidSettings(format!(
                "encrypted volume {name}: no digest for its current key version {}",
                keys.current
            )));
        }
        let v = VolumeRecord { id, name, size, created_unix_ms: now_unix_ms, state: VolumeState::Active, attach_epoch: 0, attached_by: None };
        self.volumes.insert(id, v.clone());
        if let Some(keys) = keys {
            self.volume_keys.insert(id, keys);
        }
        MetaReply::Volume(v)
    }

    fn rekey_volume(&mut self, name: &str, replaces: u64, keys: VolumeKeys) -> MetaReply {
        let Some(v) = self.volume_by_name(name).cloned() else {
            return MetaReply::Error(MetaError::NoSuchVolume(name.to_string()));
        };
        let Some(current) = self.volume_keys.get(&v.id) else {
            return MetaReply::Error(MetaError::InvalidSettings(format!("volume {name} is not encrypted")));
        };
        if current.key_id != replaces {
            return MetaReply::Error(MetaError::InvalidSettings(format!("volume {name}'s keys changed meanwhile (another rekey); try again")));
        }
        if keys.current != current.current || keys.digests.keys().ne(current.digests.keys()) {
            return MetaReply::Error(MetaError::InvalidSettings(format!(
                "a rekey of volume {name} must rewrap exactly its key versions {:?}",
                current.digests.keys()
            )));
        }
        self.key_effects.push(KeyEffect::Erase(replaces));
        self.volume_keys.insert(v.id, keys);
        MetaReply::Volume(v)
    }

    fn start_reencrypt(&mut self, name: &str, replaces: u64, keys: VolumeKeys, now_unix_ms: u64, rate: u64) -> MetaReply {
        let Some(v) = self.volume_by_name(name).cloned() else {
            return MetaReply::Error(MetaError::NoSuchVolume(name.to_string()));
        };
        let Some(old) = self.volume_keys.get(&v.id) else {
            return MetaReply::Error(MetaError::InvalidSettings(format!("volume {name} is not encrypted")));
        };
        if let Some(r) = self.reencrypts.get(&v.id) {
            return MetaReply::Error(MetaError::InvalidSettings(format!(
                "volume {name} is already being re-encrypted to key version {}; it resumes wherever the volume is attached (or run the rekey again to resume it)",
                r.to_version
            )));
        }
        if old.key_id != replaces {
            return MetaReply::Error(MetaError::InvalidSettings(format!("volume {name}'s keys changed meanwhile (another rekey); try again")));
        }
        let Some(&newest) = old.digests.keys().next_back() else {
            return MetaReply::Error(MetaError::InvalidSettings(format!("volume {name} has no key versions")));
        };
        let existing_kept = old.digests.keys().all(|k| keys.digests.contains_key(k));
        if keys.current <= newest || !existing_kept || keys.digests.len() != old.digests.len() + 1 || !keys.digests.contains_key(&keys.current) {
            return MetaReply::Error(MetaError::InvalidSettings(format!(
                "a re-encryption of volume {name} must rewrap its key versions {:?} and add one newer version",
                old.digests.keys().collect::<Vec<_>>()
            )));
        }
        self.key_effects.push(KeyEffect::Erase(replaces));
        self.reencrypts.insert(v.id, Reencrypt { to_version: keys.current, next_block: 0, started_unix_ms: now_unix_ms, rate });
        self.volume_keys.insert(v.id, keys);
        MetaReply::Volume(v)
    }

    fn reencrypt_progress(&mut self, name: &str, epoch: u64, to_version: u32, next_block: u64, done: bool) -> MetaReply {
        let Some(v) = self.volume_by_name(name).cloned() else {
            return MetaReply::Error(MetaError::NoSuchVolume(name.to_string()));
        };
        if v.attached_by.is_none() || v.attach_epoch != epoch {
            return MetaReply::Error(MetaError::InvalidSettings(format!(
                "volume {name} is held by attachment epoch {} now, not {epoch}: this holder no longer moves its blocks",
                v.attach_epoch
            )));
        }
        let Some(r) = self.reencrypts.get_mut(&v.id).filter(|r| r.to_version == to_version) else {
            return MetaReply::Error(MetaError::InvalidSettings(format!("volume {name} is not being re-encrypted to key version {to_version}")));
        };
        // A holder that restarted from an older report only repeats work: the mark never moves back.
        r.next_block = r.next_block.max(next_block);
        if done {
            let older: BTreeSet<u32> =
                self.volume_keys.get(&v.id).map(|k| k.digests.keys().copied().filter(|k| *k != to_version).collect()).unwrap_or_default();
            if self.has_snapshots(v.id) {
                // The head is all `to_version` now, but the snapshots still hold blocks
                // sealed with the older versions: they go with the last snapshot.
                self.retired_keys.entry(v.id).or_default().extend(older);
            } else {
                self.erase_key_versions(v.id, &older);
            }
            self.reencrypts.remove(&v.id);
        }
        MetaReply::Volume(v)
    }

    /// Every set of key references the state holds: each encrypted volume's and each encrypted
    /// backup's, with a label for messages.
    pub fn key_references(&self) -> Vec<(String, VolumeKeys)> {
        let volumes = self.volume_keys.iter().map(|(id, k)| (self.volumes.get(id).map_or_else(|| id.to_string(), |v| v.name.clone()), k.clone()));
        let backups = self.backup_keys.iter().map(|(id, k)| (format!("backup {id}"), k.keys.clone()));
        volumes.chain(backups).collect()
    }

    /// Whether a volume or backup still references key id `key_id`.
    pub fn references_key(&self, key_id: u64) -> bool {
        self.volume_keys.values().any(|k| k.key_id == key_id) || self.backup_keys.values().any(|k| k.keys.key_id == key_id)
    }

    /// The QoS limits volume `id` is held to: its own, else the cluster's default.
    pub fn qos_of(&self, id: VolumeId) -> QosLimits {
        self.volume_qos.get(&id).copied().unwrap_or(self.qos_default)
    }

    fn set_volume_qos(&mut self, name: &str, qos: Option<QosLimits>) -> MetaReply {
        let Some(v) = self.volume_by_name(name).cloned() else {
            return MetaReply::Error(MetaError::NoSuchVolume(name.to_string()));
        };
        match qos {
            Some(q) => {
                if let Err(e) = q.validate() {
                    return MetaReply::Error(MetaError::InvalidSettings(format!("volume {name}: {e}")));
                }
                self.volume_qos.insert(v.id, q);
            }
            None => {
                self.volume_qos.remove(&v.id);
            }
        }
        MetaReply::Volume(v)
    }

    /// Whether `volume` has a snapshot, or one being cut.
    pub(super) fn has_snapshots(&self, volume: VolumeId) -> bool {
        self.snapshots.get(&volume).is_some_and(|s| !s.snapshots.is_empty() || s.pending.is_some())
    }

    /// Key versions a re-encryption kept only for `volume`'s snapshots go once none is left
    /// (deleted, or the one being cut cancelled).
    pub(super) fn erase_retired_keys_if_unneeded(&mut self, volume: VolumeId) {
        if !self.has_snapshots(volume)
            && let Some(retired) = self.retired_keys.get(&volume).cloned()
        {
            self.erase_key_versions(volume, &retired);
        }
    }

    /// Drops key `versions` of `volume` from the state and erases their wrapped copies.
    pub(super) fn erase_key_versions(&mut self, volume: VolumeId, versions: &BTreeSet<u32>) {
        let Some(keys) = self.volume_keys.get_mut(&volume) else { return };
        for version in versions {
            if keys.digests.remove(version).is_some() {
                self.key_effects.push(KeyEffect::EraseVersion(keys.key_id, *version));
            }
        }
        if let Some(inherited) = self.inherited_keys.get_mut(&volume) {
            inherited.retain(|v, _| !versions.contains(v));
            if inherited.is_empty() {
                self.inherited_keys.remove(&volume);
            }
        }
        if let Some(retired) = self.retired_keys.get_mut(&volume) {
            retired.retain(|v| !versions.contains(v));
            if retired.is_empty() {
                self.retired_keys.remove(&volume);
            }
        }
    }

    fn resize_volume(&mut self, name: &str, size: u64) -> MetaReply {
        if let Err(e) = validate_size(size) {
            return MetaReply::Error(e);
        }
        let Some(id) = self.volume_by_name(name).map(|v| v.id) else {
            return MetaReply::Error(MetaError::NoSuchVolume(name.to_string()));
        };
        let v = self.volumes.get_mut(&id).expect("found above");
        if size < v.size {
            return MetaReply::Error(MetaError::Shrink { name: name.to_string(), current: v.size, requested: size });
        }
        v.size = size;
        MetaReply::Volume(v.clone())
    }

    fn delete_volume(&mut self, name: &str) -> MetaReply {
        let Some(id) = self.volume_by_name(name).map(|v| v.id) else {
            return MetaReply::Error(MetaError::NoSuchVolume(name.to_string()));
        };
        let v = self.volumes.get_mut(&id).expect("found above");
        v.state = VolumeState::Deleting { done: BTreeSet::new() };
        let v = v.clone();
        // Crypto-shredding: the key goes with this apply, on every meta node; the
        // blocks left behind open with nothing the cluster holds.
        if let Some(keys) = self.volume_keys.remove(&id) {
            self.key_effects.push(KeyEffect::Erase(keys.key_id));
        }
        self.inherited_keys.remove(&id);
        self.retired_keys.remove(&id);
        self.volume_qos.remove(&id);
        self.reencrypts.remove(&id);
        // Deleting the volume releases every version of every chunk.
        self.snapshots.remove(&id);
        self.restore_gone(id);
        MetaReply::Volume(v)
    }

    fn attach(&mut self, name: &str, holder: String, force: bool) -> MetaReply {
        let Some(id) = self.volume_by_name(name).map(|v| v.id) else {
            return MetaReply::Error(MetaError::NoSuchVolume(name.to_string()));
        };
        if let Some(r) = self.snapshots.get(&id).and_then(|s| s.rollback.as_ref()) {
            return MetaReply::Error(MetaError::RollingBack { volume: name.to_string(), snapshot: r.snapshot.clone() });
        }
        if let Some(r) = self.backups.restores.get(&id) {
            return MetaReply::Error(MetaError::Restoring { volume: name.to_string(), backup: r.backup });
        }
        let v = self.volumes.get_mut(&id).expect("found above");
        // The same holder again (its attach process restarted) reclaims the attachment; the
        // epoch still moves on, fencing whatever its earlier process left in flight.
        if let Some(current) = &v.attached_by
            && !force
            && *current != holder
        {
            return MetaReply::Error(MetaError::AlreadyAttached { name: name.to_string(), holder: current.clone() });
        }
        v.attach_epoch += 1;
        v.attached_by = Some(holder);
        MetaReply::Volume(v.clone())
    }

    fn detach(&mut self, name: &str, epoch: u64) -> MetaReply {
        let Some(id) = self.volume_by_name(name).map(|v| v.id) else {
            return MetaReply::Error(MetaError::NoSuchVolume(name.to_string()));
        };
        if let Some(r) = self.backups.restores.get(&id) {
            // The restore holds it until it is done (`volume delete` stops a restore).
            return MetaReply::Error(MetaError::Restoring { volume: name.to_string(), backup: r.backup });
        }
        let v = self.volumes.get_mut(&id).expect("found above");
        // A holder that was already superseded must not end its successor's attachment.
        if (epoch == 0 || epoch == v.attach_epoch) && v.attached_by.take().is_some() {
            v.attach_epoch += 1;
        }
        MetaReply::Volume(v.clone())
    }

    /// Replicas each node holds or is receiving (moves in progress count for both ends).
    pub fn replica_counts(&self) -> BTreeMap<NodeId, usize> {
        let mut out: BTreeMap<NodeId, usize> = self.nodes.values().filter(|n| n.is_storage()).map(|n| (n.id, 0)).collect();
        for p in &self.pgs {
            for r in p.replicas.iter().chain(p.moving.as_ref().map(|m| &m.to)) {
                *out.entry(*r).or_default() += 1;
            }
        }
        out
    }

    /// Whether `to` may take over `pg`'s replica on `from`: a storage node that is not draining,
    /// not already a replica, and in a failure domain none of the remaining replicas is in.
    pub fn check_move(&self, pg: PgId, from: NodeId, to: NodeId) -> Result<(), MetaError> {
        let bad = |m: String| Err(MetaError::BadMove(m));
        let Some(settings) = self.settings else {
            return Err(MetaError::NotInitialized);
        };
        let Some(rec) = self.pgs.get(pg.0 as usize) else {
            return bad(format!("no placement group {pg}"));
        };
        if let Some(m) = &rec.moving {
            return bad(format!("{pg} is already moving its replica on {} to {}", m.from, m.to));
        }
        if !rec.replicas.contains(&from) {
            return bad(format!("{from} holds no replica of {pg}"));
        }
        if rec.replicas.contains(&to) {
            return bad(format!("{to} already holds a replica of {pg}"));
        }
        let Some(target) = self.nodes.get(&to) else {
            return Err(MetaError::NoSuchNode(to));
        };
        if !target.is_storage() {
            return bad(format!("{to} does not have the storage role"));
        }
        if self.draining.contains(&to) {
            return bad(format!("{to} is draining"));
        }
        let domain = target.labels.domain(settings.failure_domain);
        for r in rec.replicas.iter().filter(|r| **r != from) {
            if self.nodes.get(r).map(|n| n.labels.domain(settings.failure_domain)) == Some(domain.clone()) {
                return bad(format!("{to} shares failure domain {domain} with {r}, another replica of {pg}"));
            }
        }
        Ok(())
    }

    fn begin_move(&mut self, pg: PgId, from: NodeId, to: NodeId, reason: MoveReason, now_unix_ms: u64) -> MetaReply {
        if let Err(e) = self.check_move(pg, from, to) {
            return MetaReply::Error(e);
        }
        let rec = &mut self.pgs[pg.0 as usize];
        rec.moving = Some(PgMove { from, to, reason, started_unix_ms: now_unix_ms });
        MetaReply::Done
    }

    fn finish_move(&mut self, pg: PgId, from: NodeId, to: NodeId) -> MetaReply {
        let Some(rec) = self.pgs.get_mut(pg.0 as usize) else {
            return MetaReply::Error(MetaError::BadMove(format!("no placement group {pg}")));
        };
        match &rec.moving {
            Some(m) if m.from == from && m.to == to => {}
            _ => {
                return MetaReply::Error(MetaError::BadMove(format!("{pg} has no move of its replica on {from} to {to} in progress")));
            }
        }
        // The new replica goes last: the first is only the PG's initial leader.
        rec.replicas.retain(|r| *r != from);
        rec.replicas.push(to);
        rec.moving = None;
        MetaReply::Done
    }

    fn cancel_move(&mut self, pg: PgId, from: NodeId, to: NodeId) -> MetaReply {
        let Some(rec) = self.pgs.get_mut(pg.0 as usize) else {
            return MetaReply::Error(MetaError::BadMove(format!("no placement group {pg}")));
        };
        match &rec.moving {
            Some(m) if m.from == from && m.to == to => {
                rec.moving = None;
                MetaReply::Done
            }
            _ => MetaReply::Error(MetaError::BadMove(format!("{pg} has no move of its replica on {from} to {to} in progress"))),
        }
    }

    fn drain_node(&mut self, node: NodeId, drain: bool) -> MetaReply {
        if self.cluster_id.is_none() {
            return MetaReply::Error(MetaError::NotInitialized);
        }
        if !self.nodes.contains_key(&node) {
            return MetaReply::Error(MetaError::NoSuchNode(node));
        }
        if drain {
            // Refuse a drain that could never finish: every replica on the node needs another
            // node that may take it (by the rules of `check_move`, liveness aside).
            self.draining.insert(node);
            let stuck = self.pgs.iter().find(|p| {
                // (A PG mid-move is judged once that move is done.)
                p.moving.is_none()
                    && p.replicas.contains(&node)
                    && !self.nodes.keys().any(|to| *to != node && self.check_move(p.id, node, *to).is_ok())
            });
            if let Some(p) = stuck.map(|p| p.id) {
                self.draining.remove(&node);
                return MetaReply::Error(MetaError::BadMove(format!(
                    "cannot drain {node}: no other node may hold its replica of {p} (a storage node, not draining, in a failure domain the other replicas are not in); add one first"
                )));
            }
        } else {
            self.draining.remove(&node);
        }
        MetaReply::Done
    }

    fn remove_node(&mut self, node: NodeId) -> MetaReply {
        if !self.nodes.contains_key(&node) {
            return MetaReply::Error(MetaError::NoSuchNode(node));
        }
        if self.nodes.get(&node).is_some_and(|n| n.roles.contains(&Role::Meta)) {
            return MetaReply::Error(MetaError::BadMove(format!("{node} is a meta node; changing the meta group's membership is not supported yet")));
        }
        let held = self.replica_counts().get(&node).copied().unwrap_or(0);
        if held > 0 {
            return MetaReply::Error(MetaError::NodeInUse { node, replicas: held, draining: self.draining.contains(&node) });
        }
        self.nodes.remove(&node);
        self.draining.remove(&node);
        self.node_versions.remove(&node);
        self.removed.insert(node);
        MetaReply::Done
    }

    fn pg_released(&mut self, volume: VolumeId, pg: PgId) -> MetaReply {
        let pg_count = self.pgs.len();
        let Some(v) = self.volumes.get_mut(&volume) else {
            return MetaReply::Done;
        };
        let VolumeState::Deleting { done } = &mut v.state else {
            return MetaReply::Done;
        };
        done.insert(pg);
        let finished = done.len() >= pg_count;
        let snapshot = v.clone();
        if finished {
            self.volumes.remove(&volume);
            self.clone_gone(volume);
        }
        MetaReply::Volume(snapshot)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn node(id: u64, host: &str) -> NodeRecord {
        NodeRecord {
            id: NodeId(id),
            addr: format!("127.0.0.1:{}", 7000 + id),
            labels: format!("zone=z{id},host={host}").parse().unwrap(),
            roles: [Role::Storage, Role::Meta].into_iter().collect(),
            capacity_bytes: 10 << 30,
            metrics_addr: String::new(),
        }
    }

    fn settings(pgs: u32, level: DomainLevel) -> ClusterSettings {
        ClusterSettings { layout: Layout { extent_size: 4 << 20, pg_count: pgs }, failure_domain: level }
    }

    pub(crate) fn initialized() -> ClusterState {
        let mut s = ClusterState::default();
        let r = s.apply(
            1,
            MetaCommand::InitCluster {
                cluster_id: "c1".into(),
                settings: settings(16, DomainLevel::Host),
                nodes: vec![node(1, "a"), node(2, "b"), node(3, "c")],
            },
        );
        assert_eq!(r, MetaReply::Done);
        s
    }

    #[test]
    fn init_places_every_pg_on_three_hosts() {
        let s = initialized();
        assert_eq!(s.pgs.len(), 16);
        for pg in &s.pgs {
            let mut r = pg.replicas.clone();
            r.sort();
            assert_eq!(r, vec![NodeId(1), NodeId(2), NodeId(3)]);
        }
        assert_eq!(s.version, 1);
    }

    #[test]
    fn init_fails_without_enough_domains_and_can_be_retried() {
        let mut s = ClusterState::default();
        let mut n2 = node(2, "a");
        n2.labels = node(1, "a").labels;
        let r =
            s.apply(1, MetaCommand::InitCluster { cluster_id: "c1".into(), settings: settings(8, DomainLevel::Zone), nodes: vec![node(1, "a"), n2] });
        let MetaReply::Error(MetaError::Placement(msg)) = r else { panic!("{r:?}") };
        assert!(msg.contains("zone=z1"), "{msg}");
        assert!(s.cluster_id.is_none());
        assert_eq!(s.version, 0);
        let r = s.apply(
            2,
            MetaCommand::InitCluster {
                cluster_id: "c2".into(),
                settings: settings(8, DomainLevel::Zone),
                nodes: vec![node(1, "a"), node(2, "b"), node(3, "c")],
            },
        );
        assert_eq!(r, MetaReply::Done);
        let r = s.apply(3, MetaCommand::InitCluster { cluster_id: "c3".into(), settings: settings(8, DomainLevel::Zone), nodes: vec![] });
        assert_eq!(r, MetaReply::Error(MetaError::AlreadyInitialized("c2".into())));
    }

    #[test]
    fn volume_lifecycle_and_errors() {
        let mut s = initialized();
        let MetaReply::Volume(v) = s.apply(2, MetaCommand::CreateVolume { name: "demo".into(), size: 4 << 30, now_unix_ms: 5 }) else { panic!() };
        assert_eq!(v.id, VolumeId(1));
        assert_eq!(
            s.apply(3, MetaCommand::CreateVolume { name: "demo".into(), size: 4 << 30, now_unix_ms: 5 }),
            MetaReply::Error(MetaError::VolumeExists("demo".into()))
        );
        assert!(matches!(
            s.apply(4, MetaCommand::CreateVolume { name: "bad name".into(), size: 4096, now_unix_ms: 5 }),
            MetaReply::Error(MetaError::InvalidName(_))
        ));
        assert!(matches!(
            s.apply(5, MetaCommand::CreateVolume { name: "z".into(), size: 0, now_unix_ms: 5 }),
            MetaReply::Error(MetaError::InvalidSize(_))
        ));
        assert!(matches!(
            s.apply(6, MetaCommand::CreateVolume { name: "z".into(), size: 1000, now_unix_ms: 5 }),
            MetaReply::Error(MetaError::InvalidSize(_))
        ));
        assert!(matches!(
            s.apply(7, MetaCommand::CreateVolume { name: "z".into(), size: MAX_VOLUME_SIZE + 4096, now_unix_ms: 5 }),
            MetaReply::Error(MetaError::InvalidSize(_))
        ));
        assert!(matches!(s.apply(8, MetaCommand::ResizeVolume { name: "demo".into(), size: 1 << 30 }), MetaReply::Error(MetaError::Shrink { .. })));
        let MetaReply::Volume(v) = s.apply(9, MetaCommand::ResizeVolume { name: "demo".into(), size: 8 << 30 }) else { panic!() };
        assert_eq!(v.size, 8 << 30);
        assert_eq!(s.version, 9);
        assert!(matches!(s.apply(10, MetaCommand::DeleteVolume { name: "nope".into() }), MetaReply::Error(MetaError::NoSuchVolume(_))));
        s.apply(11, MetaCommand::DeleteVolume { name: "demo".into() });
        assert!(s.volume_by_name("demo").is_none());
        // The name is free again while the old volume's data is released; ids are never reused.
        let MetaReply::Volume(v2) = s.apply(12, MetaCommand::CreateVolume { name: "demo".into(), size: 4096, now_unix_ms: 6 }) else { panic!() };
        assert_eq!(v2.id, VolumeId(2));
        for pg in 0..16 {
            s.apply(13 + pg, MetaCommand::VolumePgReleased { volume: VolumeId(1), pg: PgId(pg as u32) });
        }
        assert!(!s.volumes.contains_key(&VolumeId(1)));
        assert!(s.volumes.contains_key(&VolumeId(2)));
    }

    #[test]
    fn encrypted_volumes_keep_key_references_and_deletion_destroys_the_key() {
        let mut s = initialized();
        let keys = VolumeKeys { key_id: 5, current: 1, digests: [(1, [1u8; 32])].into() };
        let bad = VolumeKeys { key_id: 6, current: 2, digests: [(1, [1u8; 32])].into() };
        assert!(matches!(
            s.apply(2, MetaCommand::CreateEncryptedVolume { name: "x".into(), size: 4096, now_unix_ms: 1, keys: bad }),
            MetaReply::Error(MetaError::InvalidSettings(_))
        ));
        let MetaReply::Volume(v) =
            s.apply(3, MetaCommand::CreateEncryptedVolume { name: "e".into(), size: 4096, now_unix_ms: 1, keys: keys.clone() })
        else {
            panic!()
        };
        assert_eq!(s.volume_keys.get(&v.id), Some(&keys));
        assert!(s.key_effects.is_empty());
        // A rekey swaps the references and destroys the old copies; a stale or partial one fails.
        let rewrapped = VolumeKeys { key_id: 8, current: 1, digests: [(1, [2u8; 32])].into() };
        let stale = MetaCommand::RekeyVolume { name: "e".into(), replaces: 4, keys: rewrapped.clone() };
        assert!(matches!(s.apply(4, stale), MetaReply::Error(MetaError::InvalidSettings(_))));
        let partial = VolumeKeys { key_id: 8, current: 1, digests: [(1, [2u8; 32]), (2, [3u8; 32])].into() };
        assert!(matches!(s.apply(5, MetaCommand::RekeyVolume { name: "e".into(), replaces: 5, keys: partial }), MetaReply::Error(_)));
        assert!(matches!(s.apply(6, MetaCommand::RekeyVolume { name: "e".into(), replaces: 5, keys: rewrapped.clone() }), MetaReply::Volume(_)));
        assert_eq!(s.volume_keys.get(&v.id), Some(&rewrapped));
        assert_eq!(std::mem::take(&mut s.key_effects), vec![KeyEffect::Erase(5)]);
        s.apply(7, MetaCommand::DeleteVolume { name: "e".into() });
        assert!(s.volume_keys.is_empty(), "no reference outlives the volume");
        assert_eq!(s.key_effects, vec![KeyEffect::Erase(8)], "every meta node erases the key as it applies the deletion");
    }

    #[test]
    fn a_reencryption_adds_a_version_takes_progress_from_the_holder_only_and_erases_the_old_versions() {
        let mut s = initialized();
        let keys = VolumeKeys { key_id: 5, current: 1, digests: [(1, [1u8; 32])].into() };
        let MetaReply::Volume(v) = s.apply(2, MetaCommand::CreateEncryptedVolume { name: "e".into(), size: 1 << 20, now_unix_ms: 1, keys }) else {
            panic!()
        };
        let start = |keys: VolumeKeys| MetaCommand::StartReencrypt { name: "e".into(), replaces: 5, keys, now_unix_ms: 2, rate: 9 };
        // The new version must be above every existing one and every existing one rewrapped.
        for bad in [
            VolumeKeys { key_id: 6, current: 1, digests: [(1, [2u8; 32])].into() },
            VolumeKeys { key_id: 6, current: 2, digests: [(2, [3u8; 32])].into() },
            VolumeKeys { key_id: 6, current: 3, digests: [(1, [2u8; 32]), (2, [3u8; 32])].into() },
        ] {
            assert!(matches!(s.apply(3, start(bad)), MetaReply::Error(MetaError::InvalidSettings(_))));
        }
        let two = VolumeKeys { key_id: 6, current: 2, digests: [(1, [2u8; 32]), (2, [3u8; 32])].into() };
        assert!(matches!(s.apply(4, start(two.clone())), MetaReply::Volume(_)));
        assert_eq!(std::mem::take(&mut s.key_effects), vec![KeyEffect::Erase(5)]);
        assert_eq!(s.reencrypts.get(&v.id), Some(&Reencrypt { to_version: 2, next_block: 0, started_unix_ms: 2, rate: 9 }));
        let again = VolumeKeys { key_id: 7, ..two.clone() };
        assert!(matches!(
            s.apply(5, MetaCommand::StartReencrypt { name: "e".into(), replaces: 6, keys: again, now_unix_ms: 2, rate: 9 }),
            MetaReply::Error(_)
        ));
        // Progress only from the current holder, never backwards.
        let progress = |epoch, next_block, done| MetaCommand::ReencryptProgress { name: "e".into(), epoch, to_version: 2, next_block, done };
        assert!(matches!(s.apply(6, progress(0, 10, false)), MetaReply::Error(_)), "not attached");
        s.apply(7, MetaCommand::AttachVolume { name: "e".into(), holder: "h".into(), force: false });
        assert!(matches!(s.apply(8, progress(1, 100, false)), MetaReply::Volume(_)));
        s.apply(9, progress(1, 50, false));
        assert_eq!(s.reencrypts[&v.id].next_block, 100);
        s.apply(10, MetaCommand::AttachVolume { name: "e".into(), holder: "h2".into(), force: true });
        assert!(matches!(s.apply(11, progress(1, 200, true)), MetaReply::Error(_)), "a superseded holder is refused");
        assert!(s.key_effects.is_empty());
        // Done: the older version's reference and copies go; the new one stays.
        assert!(matches!(s.apply(12, progress(2, 256, true)), MetaReply::Volume(_)));
        assert!(s.reencrypts.is_empty());
        assert_eq!(s.volume_keys[&v.id].digests.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(s.key_effects, vec![KeyEffect::EraseVersion(6, 1)]);
    }

    #[test]
    fn a_reencryption_keeps_the_versions_snapshots_need_until_the_last_snapshot_goes() {
        let mut s = initialized();
        let keys = VolumeKeys { key_id: 5, current: 1, digests: [(1, [1u8; 32])].into() };
        let MetaReply::Volume(v) = s.apply(2, MetaCommand::CreateEncryptedVolume { name: "e".into(), size: 1 << 20, now_unix_ms: 1, keys }) else {
            panic!()
        };
        s.apply(3, MetaCommand::CreateSnapshot { volume: "e".into(), name: "s1".into(), now_unix_ms: 2 });
        s.apply(4, MetaCommand::CreateSnapshot { volume: "e".into(), name: "s2".into(), now_unix_ms: 2 });
        let two = VolumeKeys { key_id: 6, current: 2, digests: [(1, [2u8; 32]), (2, [3u8; 32])].into() };
        s.apply(5, MetaCommand::StartReencrypt { name: "e".into(), replaces: 5, keys: two, now_unix_ms: 2, rate: 9 });
        s.apply(6, MetaCommand::AttachVolume { name: "e".into(), holder: "h".into(), force: false });
        s.key_effects.clear();
        let done = MetaCommand::ReencryptProgress { name: "e".into(), epoch: 1, to_version: 2, next_block: 256, done: true };
        assert!(matches!(s.apply(7, done), MetaReply::Volume(_)));
        // The snapshots hold blocks sealed with version 1: it stays, retired.
        assert!(s.reencrypts.is_empty());
        assert_eq!(s.volume_keys[&v.id].digests.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(s.retired_keys[&v.id], [1].into());
        assert!(s.key_effects.is_empty());
        s.apply(8, MetaCommand::DeleteSnapshot { volume: "e".into(), name: "s1".into() });
        assert!(s.key_effects.is_empty(), "s2 still needs it");
        s.apply(9, MetaCommand::DeleteSnapshot { volume: "e".into(), name: "s2".into() });
        assert_eq!(s.key_effects, vec![KeyEffect::EraseVersion(6, 1)]);
        assert_eq!(s.volume_keys[&v.id].digests.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert!(s.retired_keys.is_empty());
    }

    #[test]
    fn a_rollback_unretires_the_versions_its_snapshot_brings_back() {
        let mut s = initialized();
        let keys = VolumeKeys { key_id: 5, current: 1, digests: [(1, [1u8; 32])].into() };
        let MetaReply::Volume(v) = s.apply(2, MetaCommand::CreateEncryptedVolume { name: "e".into(), size: 1 << 20, now_unix_ms: 1, keys }) else {
            panic!()
        };
        s.apply(3, MetaCommand::CreateSnapshot { volume: "e".into(), name: "s1".into(), now_unix_ms: 2 });
        let two = VolumeKeys { key_id: 6, current: 2, digests: [(1, [2u8; 32]), (2, [3u8; 32])].into() };
        s.apply(4, MetaCommand::StartReencrypt { name: "e".into(), replaces: 5, keys: two, now_unix_ms: 2, rate: 9 });
        s.apply(5, MetaCommand::AttachVolume { name: "e".into(), holder: "h".into(), force: false });
        s.apply(6, MetaCommand::ReencryptProgress { name: "e".into(), epoch: 1, to_version: 2, next_block: 256, done: true });
        s.apply(7, MetaCommand::DetachVolume { name: "e".into(), epoch: 1 });
        assert!(matches!(s.apply(8, MetaCommand::RollbackVolume { volume: "e".into(), snapshot: "s1".into() }), MetaReply::Volume(_)));
        s.key_effects.clear();
        s.apply(9, MetaCommand::DeleteSnapshot { volume: "e".into(), name: "s1".into() });
        assert!(s.key_effects.is_empty(), "the head holds version-1 blocks again");
        assert_eq!(s.volume_keys[&v.id].digests.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn a_volume_created_with_limits_has_them_from_its_first_moment() {
        let mut s = initialized();
        let create = |name: &str| Box::new(MetaCommand::CreateVolume { name: name.into(), size: 1 << 20, now_unix_ms: 1 });
        let q = QosLimits { iops: 500, bps: 0, burst_ms: 1000 };
        let MetaReply::Volume(v) = s.apply(2, MetaCommand::CreateVolumeWithQos { create: create("v"), qos: q }) else { panic!() };
        assert_eq!(s.qos_of(v.id), q);
        assert!(s.volume_qos.contains_key(&v.id), "its own limits, not the default");
        // Absurd limits: nothing is created.
        let bad = QosLimits { iops: u64::MAX, bps: 0, burst_ms: 0 };
        assert!(matches!(
            s.apply(3, MetaCommand::CreateVolumeWithQos { create: create("w"), qos: bad }),
            MetaReply::Error(MetaError::InvalidSettings(_))
        ));
        assert!(s.volume_by_name("w").is_none());
        // A failed creation sets nothing; only creations are wrapped.
        assert!(matches!(s.apply(4, MetaCommand::CreateVolumeWithQos { create: create("v"), qos: q }), MetaReply::Error(MetaError::VolumeExists(_))));
        let other = Box::new(MetaCommand::SetQosDefault { qos: q });
        assert!(matches!(s.apply(5, MetaCommand::CreateVolumeWithQos { create: other, qos: q }), MetaReply::Error(_)));
        assert_eq!(s.qos_default, QosLimits::default());
    }

    #[test]
    fn the_cluster_version_rises_only_once_every_node_speaks_it_and_never_falls() {
        let r = |min, max| VersionRange { min, max };
        let mut s = initialized();
        assert_eq!(s.cluster_version, 1);
        // Nodes that never said (older builds) speak 1 only, so nothing rises yet.
        assert_eq!(s.raisable_version(), None);
        assert_eq!(s.apply(2, MetaCommand::NodeVersions { node: NodeId(1), range: r(1, 2) }), MetaReply::Done);
        assert_eq!(s.apply(3, MetaCommand::NodeVersions { node: NodeId(2), range: r(1, 2) }), MetaReply::Done);
        assert_eq!(s.raisable_version(), None, "node-3 still speaks 1 only");
        let MetaReply::Error(e) = s.apply(4, MetaCommand::RaiseClusterVersion { to: 2 }) else { panic!("raised past node-3") };
        assert!(e.to_string().contains("node-3 speaks cluster versions 1..=1"), "{e}");
        // A node that no longer speaks version 1 may not join a cluster still at 1.
        let MetaReply::Error(e) = s.apply(5, MetaCommand::NodeVersions { node: NodeId(3), range: r(2, 2) }) else { panic!("accepted") };
        assert!(e.to_string().contains("still runs at version 1"), "{e}");
        s.apply(6, MetaCommand::NodeVersions { node: NodeId(3), range: r(1, 3) });
        assert_eq!(s.raisable_version(), Some(2));
        assert_eq!(s.apply(7, MetaCommand::RaiseClusterVersion { to: 2 }), MetaReply::Done);
        assert_eq!((s.cluster_version, s.raisable_version()), (2, None));
        // Raising is idempotent and never lowers; an old build may no longer register.
        assert_eq!(s.apply(8, MetaCommand::RaiseClusterVersion { to: 1 }), MetaReply::Done);
        assert_eq!(s.cluster_version, 2);
        let MetaReply::Error(e) = s.apply(9, MetaCommand::NodeVersions { node: NodeId(2), range: r(1, 1) }) else { panic!("downgrade accepted") };
        assert!(e.to_string().contains("runs at version 2"), "{e}");
        assert_eq!(s.versions_of(NodeId(2)), r(1, 2));
        // Version commands leave the map's version alone.
        assert_eq!(s.version, 1);
    }

    #[test]
    fn attach_is_exclusive_and_fences_by_epoch() {
        let mut s = initialized();
        s.apply(2, MetaCommand::CreateVolume { name: "v".into(), size: 4096, now_unix_ms: 0 });
        let MetaReply::Volume(a) = s.apply(3, MetaCommand::AttachVolume { name: "v".into(), holder: "h1".into(), force: false }) else { panic!() };
        assert_eq!(a.attach_epoch, 1);
        assert!(matches!(
            s.apply(4, MetaCommand::AttachVolume { name: "v".into(), holder: "h2".into(), force: false }),
            MetaReply::Error(MetaError::AlreadyAttached { .. })
        ));
        let MetaReply::Volume(b) = s.apply(5, MetaCommand::AttachVolume { name: "v".into(), holder: "h2".into(), force: true }) else { panic!() };
        assert_eq!(b.attach_epoch, 2);
        // The same holder again (its process restarted) reclaims it without --force, fencing
        // its earlier process.
        let MetaReply::Volume(b) = s.apply(6, MetaCommand::AttachVolume { name: "v".into(), holder: "h2".into(), force: false }) else { panic!() };
        assert_eq!((b.attach_epoch, b.attached_by.as_deref()), (3, Some("h2")));
        // The superseded holder detaching does not end the new attachment.
        let MetaReply::Volume(c) = s.apply(7, MetaCommand::DetachVolume { name: "v".into(), epoch: 1 }) else { panic!() };
        assert_eq!(c.attached_by.as_deref(), Some("h2"));
        let MetaReply::Volume(d) = s.apply(8, MetaCommand::DetachVolume { name: "v".into(), epoch: 3 }) else { panic!() };
        assert_eq!((d.attached_by, d.attach_epoch), (None, 4));
    }

    #[test]
    fn commands_before_init_are_refused() {
        let mut s = ClusterState::default();
        assert_eq!(
            s.apply(1, MetaCommand::CreateVolume { name: "a".into(), size: 4096, now_unix_ms: 0 }),
            MetaReply::Error(MetaError::NotInitialized)
        );
        assert_eq!(s.apply(2, MetaCommand::RegisterNode { node: node(1, "a") }), MetaReply::Error(MetaError::NotInitialized));
    }

    /// A storage-only node in zone `z{zone}` on `host`.
    fn storage_only(id: u64, zone: u64, host: &str) -> NodeRecord {
        NodeRecord { roles: [Role::Storage].into_iter().collect(), labels: format!("zone=z{zone},host={host}").parse().unwrap(), ..node(id, host) }
    }

    #[test]
    fn a_move_respects_domains_and_swaps_the_replica_when_finished() {
        let mut s = initialized();
        // Placement is by host: node 4 shares zone z1's host "a" with node 1; node 5 has a host
        // of its own.
        s.apply(2, MetaCommand::RegisterNode { node: storage_only(4, 1, "a") });
        s.apply(3, MetaCommand::RegisterNode { node: storage_only(5, 5, "e") });
        let pg = PgId(3);
        let begin = |from, to| MetaCommand::BeginMove { pg, from: NodeId(from), to: NodeId(to), reason: MoveReason::NodeDown, now_unix_ms: 1 };
        // Replacing node 2 by node 4 would put two replicas on host "a".
        let MetaReply::Error(MetaError::BadMove(msg)) = s.apply(4, begin(2, 4)) else { panic!() };
        assert!(msg.contains("shares failure domain"), "{msg}");
        // Replacing node 1 by node 4 keeps the hosts distinct.
        assert_eq!(s.apply(5, begin(1, 4)), MetaReply::Done);
        assert!(matches!(s.apply(6, begin(2, 5)), MetaReply::Error(MetaError::BadMove(_))), "one move per PG at a time");
        assert_eq!(s.replica_counts()[&NodeId(4)], 1, "a move's target counts as holding the replica");
        assert!(matches!(s.apply(7, MetaCommand::FinishMove { pg, from: NodeId(2), to: NodeId(4) }), MetaReply::Error(MetaError::BadMove(_))));
        // An abandoned move leaves the replicas as they were; the move can start again.
        assert!(matches!(s.apply(8, MetaCommand::CancelMove { pg, from: NodeId(1), to: NodeId(5) }), MetaReply::Error(_)));
        assert_eq!(s.apply(8, MetaCommand::CancelMove { pg, from: NodeId(1), to: NodeId(4) }), MetaReply::Done);
        assert!(s.pgs[3].moving.is_none() && s.pgs[3].replicas.contains(&NodeId(1)));
        assert_eq!(s.apply(8, begin(1, 4)), MetaReply::Done);
        assert_eq!(s.apply(8, MetaCommand::FinishMove { pg, from: NodeId(1), to: NodeId(4) }), MetaReply::Done);
        let r = &s.pgs[3];
        assert!(r.moving.is_none());
        assert!(r.replicas.contains(&NodeId(4)) && !r.replicas.contains(&NodeId(1)) && r.replicas.len() == 3);
        assert_eq!(s.version, 8);
    }

    #[test]
    fn a_node_is_removed_only_when_empty_and_stays_removed() {
        let mut s = initialized();
        let MetaReply::Error(e) = s.apply(2, MetaCommand::DrainNode { node: NodeId(1), drain: true }) else { panic!() };
        assert!(e.to_string().contains("cannot drain node-1"), "three nodes, three domains: nowhere to go: {e}");
        assert!(s.draining.is_empty());
        s.apply(2, MetaCommand::RegisterNode { node: storage_only(4, 4, "d") });
        assert_eq!(s.apply(3, MetaCommand::DrainNode { node: NodeId(4), drain: true }), MetaReply::Done);
        assert!(s.draining.contains(&NodeId(4)));
        assert!(
            matches!(
                s.apply(4, MetaCommand::BeginMove { pg: PgId(0), from: NodeId(1), to: NodeId(4), reason: MoveReason::Rebalance, now_unix_ms: 0 }),
                MetaReply::Error(MetaError::BadMove(_))
            ),
            "nothing moves onto a draining node"
        );
        assert!(matches!(s.apply(5, MetaCommand::RemoveNode { node: NodeId(1) }), MetaReply::Error(MetaError::BadMove(_))), "meta nodes stay");
        assert_eq!(s.apply(6, MetaCommand::DrainNode { node: NodeId(4), drain: false }), MetaReply::Done);
        s.apply(7, MetaCommand::BeginMove { pg: PgId(0), from: NodeId(1), to: NodeId(4), reason: MoveReason::Rebalance, now_unix_ms: 0 });
        let MetaReply::Error(e) = s.apply(8, MetaCommand::RemoveNode { node: NodeId(4) }) else { panic!() };
        assert!(e.to_string().contains("holds 1 replica"), "{e}");
        s.apply(9, MetaCommand::FinishMove { pg: PgId(0), from: NodeId(1), to: NodeId(4) });
        s.apply(10, MetaCommand::DrainNode { node: NodeId(4), drain: true });
        s.apply(11, MetaCommand::BeginMove { pg: PgId(0), from: NodeId(4), to: NodeId(1), reason: MoveReason::Drain, now_unix_ms: 0 });
        s.apply(12, MetaCommand::FinishMove { pg: PgId(0), from: NodeId(4), to: NodeId(1) });
        assert_eq!(s.apply(13, MetaCommand::RemoveNode { node: NodeId(4) }), MetaReply::Done);
        assert!(!s.nodes.contains_key(&NodeId(4)) && !s.draining.contains(&NodeId(4)));
        assert_eq!(s.apply(14, MetaCommand::RegisterNode { node: storage_only(4, 4, "d") }), MetaReply::Error(MetaError::NodeRemoved(NodeId(4))));
        assert_eq!(s.apply(15, MetaCommand::RemoveNode { node: NodeId(9) }), MetaReply::Error(MetaError::NoSuchNode(NodeId(9))));
    }

    fn event(action: &str, target: &str) -> AuditEvent {
        AuditEvent {
            time_unix_ms: 1,
            actor: "token:00".into(),
            source: "127.0.0.1:1".into(),
            action: action.into(),
            target: target.into(),
            outcome: Outcome::Ok,
            detail: String::new(),
        }
    }

    fn sealed(s: &mut ClusterState) -> Vec<AuditRecord> {
        std::mem::take(&mut s.audit_effects).into_iter().flat_map(|e| if let AuditEffect::Append(r) = e { r } else { Vec::new() }).collect()
    }

    #[test]
    fn audited_commands_record_their_outcome_and_chain_without_bumping_the_map() {
        let mut s = initialized();
        let version = s.version;
        s.apply(2, MetaCommand::AppendAudit { events: vec![event("connect.data", ""), event("volume.show", "x")] });
        assert_eq!(s.version, version, "audit-only commands leave the map version alone");
        let ok = MetaCommand::CreateVolume { name: "v".into(), size: 4096, now_unix_ms: 1 };
        assert!(matches!(s.apply(3, MetaCommand::Audited { cmd: Box::new(ok), event: event("volume.create", "v") }), MetaReply::Volume(_)));
        assert_eq!(s.version, 3, "an audited change bumps it like the change alone");
        let dup = MetaCommand::CreateVolume { name: "v".into(), size: 4096, now_unix_ms: 1 };
        assert!(matches!(s.apply(4, MetaCommand::Audited { cmd: Box::new(dup), event: event("volume.create", "v") }), MetaReply::Error(_)));
        let records = sealed(&mut s);
        assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(records[2].event.outcome, Outcome::Ok);
        assert_eq!(records[3].event.outcome, Outcome::Failed, "a refused change is recorded as failed, with why");
        assert!(records[3].event.detail.contains("already exists"), "{:?}", records[3].event);
        let v = basalt_security::audit::verify(ChainAnchor::default(), &records, Some(s.audit.last_seq()));
        assert_eq!((v.problem, v.head), (None, s.audit.last));

        // Pruning moves the anchor to the record after the last one dropped, never past the head.
        let through = records[1].clone();
        s.apply(5, MetaCommand::PruneAudit { through: through.seq, through_hash: through.hash });
        assert_eq!(s.audit.anchor, ChainAnchor { first_seq: 3, prev: through.hash });
        assert_eq!(s.audit.kept(), 2);
        let v = basalt_security::audit::verify(s.audit.anchor, &records[2..], Some(s.audit.last_seq()));
        assert_eq!(v.problem, None);
        let before = s.audit.clone();
        s.apply(6, MetaCommand::PruneAudit { through: 4, through_hash: records[3].hash });
        s.apply(7, MetaCommand::PruneAudit { through: 1, through_hash: records[0].hash });
        assert_eq!(s.audit, before, "the newest record and what is already pruned stay as they are");
    }

    #[test]
    fn tokens_are_created_once_and_revoked_for_good() {
        let mut s = ClusterState::default();
        let token = basalt_security::Token::generate();
        let record = TokenRecord::new(&token, basalt_security::Role::Hypervisor, "test".into(), 1);
        assert_eq!(s.apply(1, MetaCommand::CreateToken { record: record.clone() }), MetaReply::Error(MetaError::NotInitialized));
        let mut s = initialized();
        assert!(matches!(s.apply(2, MetaCommand::CreateToken { record: record.clone() }), MetaReply::Token(_)));
        assert!(matches!(s.apply(3, MetaCommand::CreateToken { record: record.clone() }), MetaReply::Error(MetaError::TokenExists(_))));
        let MetaReply::Token(t) = s.apply(4, MetaCommand::RevokeToken { id: token.id(), now_unix_ms: 50 }) else { panic!() };
        assert_eq!(t.revoked_unix_ms, Some(50));
        let MetaReply::Token(t) = s.apply(5, MetaCommand::RevokeToken { id: token.id(), now_unix_ms: 90 }) else { panic!() };
        assert_eq!(t.revoked_unix_ms, Some(50), "the first revocation's time stays");
        let other = basalt_security::Token::generate().id();
        assert_eq!(s.apply(6, MetaCommand::RevokeToken { id: other, now_unix_ms: 1 }), MetaReply::Error(MetaError::NoSuchToken(other.to_string())));
        assert_eq!(s.version, 5);
    }
}
