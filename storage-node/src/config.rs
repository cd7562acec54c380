//! `basalt-node` configuration: a TOML file, every setting also a command-line flag (flags
//! win). Validation turns both into a [`NodeConfig`] or an error that names the setting.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use basalt_common::units::parse_size;
use basalt_common::{Labels, NodeId};
use basalt_security::TlsFiles;
use basalt_security::cidr::AllowList;
use clap::Parser;
use serde::Deserialize;
use thiserror::Error;

use crate::meta::state::Role;

/// Why a configuration was rejected.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Parser message (names the key and line).
        message: String,
    },
    /// A setting is missing or has a bad value.
    #[error("invalid setting `{key}`: {message}")]
    Invalid {
        /// The setting.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

/// Settings as they appear in the TOML file; all optional so flags can fill them in.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    id: Option<u64>,
    listen: Option<String>,
    metrics_listen: Option<String>,
    data_dir: Option<PathBuf>,
    data_device: Option<PathBuf>,
    labels: Option<String>,
    roles: Option<Vec<String>>,
    seeds: Option<Vec<String>>,
    capacity: Option<String>,
    direct_io: Option<bool>,
    state_reserve: Option<String>,
    #[serde(default)]
    memory: MemoryFile,
    #[serde(default)]
    raft: RaftFile,
    #[serde(default)]
    scrub: ScrubFile,
    #[serde(default)]
    heal: HealFile,
    #[serde(default)]
    backup: BackupFile,
    #[serde(default)]
    security: SecurityFile,
    #[serde(default)]
    audit: AuditFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecurityFile {
    off: Option<bool>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    reload_secs: Option<u64>,
    #[serde(default)]
    allow: AllowFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowFile {
    admin: Option<Vec<String>>,
    data: Option<Vec<String>>,
    raft: Option<Vec<String>>,
    metrics: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditFile {
    max_records: Option<u64>,
    max_age_days: Option<u64>,
    export_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealFile {
    replace_down_after_secs: Option<u64>,
    max_moves: Option<u32>,
    rebuild_rate: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupFile {
    copies: Option<u32>,
    retain_after_delete: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryFile {
    index_cache: Option<String>,
    log_cache: Option<String>,
    write_buffer: Option<String>,
    log_write_buffer: Option<String>,
    raft_tail_per_group: Option<String>,
    inflight_writes: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RaftFile {
    heartbeat_ms: Option<u64>,
    election_timeout_min_ms: Option<u64>,
    election_timeout_max_ms: Option<u64>,
    checkpoint_every_entries: Option<u64>,
    keep_entries_after_checkpoint: Option<u64>,
    log_size_target: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScrubFile {
    overwrite_rate: Option<String>,
    overwrite_pattern: Option<String>,
    overwrite_passes: Option<u32>,
    integrity_rate: Option<String>,
    integrity_interval_hours: Option<u64>,
    deep_interval_hours: Option<u64>,
}

/// Command-line flags. Each overrides the file setting of the same name.
#[derive(Debug, Parser)]
#[command(name = "basalt-node", version, about = "A Basalt storage node")]
pub struct Flags {
    /// TOML configuration file.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Node id (unique in the cluster, > 0).
    #[arg(long)]
    pub id: Option<u64>,
    /// gRPC listen address, e.g. 127.0.0.1:7001.
    #[arg(long)]
    pub listen: Option<String>,
    /// Prometheus /metrics listen address.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Directory for the node's state.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Data file or raw block device for chunks (default: DATA_DIR/chunks.dat).
    #[arg(long)]
    pub data_device: Option<PathBuf>,
    /// Failure-domain labels, e.g. zone=z1,rack=r2,host=h3.
    #[arg(long)]
    pub labels: Option<String>,
    /// Roles, comma separated: storage, meta, backup.
    #[arg(long, value_delimiter = ',')]
    pub roles: Option<Vec<String>>,
    /// Meta nodes' gRPC addresses, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub seeds: Option<Vec<String>>,
    /// Size of the chunk data file when it is created, e.g. 100GiB.
    #[arg(long)]
    pub capacity: Option<String>,
    /// Use O_DIRECT for the data file (true/false).
    #[arg(long)]
    pub direct_io: Option<bool>,
    /// Free space kept on the state directory's filesystem: writes are refused below it, e.g.
    /// 1GiB (default: 5% of the filesystem, at least 256MiB, at most 4GiB).
    #[arg(long)]
    pub state_reserve: Option<String>,
    /// RocksDB block cache of the chunk index.
    #[arg(long)]
    pub index_cache: Option<String>,
    /// RocksDB block cache of the Raft log.
    #[arg(long)]
    pub log_cache: Option<String>,
    /// Memtable memory of the chunk index (all column families together).
    #[arg(long)]
    pub write_buffer: Option<String>,
    /// Memtable memory of the Raft log database.
    #[arg(long)]
    pub log_write_buffer: Option<String>,
    /// Write payload bytes a node accepts in flight as leader before callers wait.
    #[arg(long)]
    pub inflight_writes: Option<String>,
    /// Recent Raft entries kept in memory per group.
    #[arg(long)]
    pub raft_tail_per_group: Option<String>,
    /// Raft heartbeat interval in milliseconds.
    #[arg(long)]
    pub heartbeat_ms: Option<u64>,
    /// Raft election timeout, lower bound (ms).
    #[arg(long)]
    pub election_timeout_min_ms: Option<u64>,
    /// Raft election timeout, upper bound (ms).
    #[arg(long)]
    pub election_timeout_max_ms: Option<u64>,
    /// Checkpoint a placement group after this many entries.
    #[arg(long)]
    pub checkpoint_every_entries: Option<u64>,
    /// Log entries kept after a checkpoint, so a briefly absent replica catches up from the log.
    #[arg(long)]
    pub keep_entries_after_checkpoint: Option<u64>,
    /// Size of Raft log segment files the node keeps to, e.g. 1GiB: placement groups whose
    /// kept entries hold older segments are checkpointed and purged.
    #[arg(long)]
    pub log_size_target: Option<String>,
    /// Rate at which freed space is overwritten, per second, e.g. 64MiB.
    #[arg(long)]
    pub overwrite_rate: Option<String>,
    /// What freed space is overwritten with: zeros, random, or a byte like 0xff.
    #[arg(long)]
    pub overwrite_pattern: Option<String>,
    /// Overwrite passes per freed range (1 to 16), each synced before the next.
    #[arg(long)]
    pub overwrite_passes: Option<u32>,
    /// Seconds a node may stay silent before its replicas are re-placed elsewhere.
    #[arg(long)]
    pub replace_down_after_secs: Option<u64>,
    /// Replica moves in flight at once, cluster-wide.
    #[arg(long)]
    pub max_moves: Option<u32>,
    /// Bytes per second this node sends to fill new replicas, e.g. 64MiB (0: unlimited).
    #[arg(long)]
    pub rebuild_rate: Option<String>,
    /// The cluster CA bundle (default: DATA_DIR/tls/ca.pem).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// This node's certificate (default: DATA_DIR/tls/node-<id>.pem).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// This node's private key (default: DATA_DIR/tls/node-<id>.key).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Plaintext and no authentication: anyone who reaches a port may do anything. For
    /// benchmarks that measure what security costs; never for a cluster holding data.
    #[arg(long)]
    pub security_off: bool,
}

/// Memory limits (all bounded by configuration, not load).
#[derive(Clone, Debug)]
pub struct MemoryConfig {
    /// Chunk index block cache.
    pub index_cache: usize,
    /// Raft log block cache.
    pub log_cache: usize,
    /// Memtables of the chunk index, all column families together.
    pub write_buffer: usize,
    /// Memtables of the Raft log database.
    pub log_write_buffer: usize,
    /// Recent Raft entries in memory per group.
    pub raft_tail_per_group: usize,
    /// Write payload bytes in flight at most (admission control on the data API).
    pub inflight_writes: usize,
}

/// Default `raft.log_size_target`: 16 segments. Without a target, the entries each placement
/// group keeps after a checkpoint (`keep_entries_after_checkpoint`, counted in entries) held
/// 64 × 1 MiB per group under large writes: gigabytes of log at 64 groups, every segment made
/// and zeroed on the way.
pub const DEFAULT_LOG_SIZE_TARGET: u64 = 1 << 30;

/// A validated node configuration.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Node id.
    pub id: NodeId,
    /// The cluster versions this node speaks: this build's, unless a rolling-upgrade test
    /// overrides them (`basalt_common::version::TEST_OVERRIDE_ENV`).
    pub versions: basalt_common::version::VersionRange,
    /// The configuration file it was read from (shown, redacted, in support bundles).
    pub config_file: Option<PathBuf>,
    /// gRPC address.
    pub listen: SocketAddr,
    /// Metrics address.
    pub metrics_listen: Option<SocketAddr>,
    /// State directory.
    pub data_dir: PathBuf,
    /// Chunk data file or device.
    pub data_device: PathBuf,
    /// Labels (host defaults to `node-<id>`).
    pub labels: Labels,
    /// Roles.
    pub roles: BTreeSet<Role>,
    /// Meta nodes.
    pub seeds: Vec<String>,
    /// Data file size when created.
    pub capacity: u64,
    /// O_DIRECT.
    pub direct_io: bool,
    /// Free space kept on the state directory's filesystem (`None`: derived from its size, see
    /// `pg::space::state_reserve`).
    pub state_reserve: Option<u64>,
    /// Memory limits.
    pub memory: MemoryConfig,
    /// Raft timing.
    pub raft: basalt_raft::RaftTuning,
    /// Bytes of Raft log segments the node keeps to (`raft.log_size_target`).
    pub log_size_target: u64,
    /// Scrub overwrite rate, bytes per second.
    pub overwrite_rate: u64,
    /// What freed space is overwritten with.
    pub overwrite_pattern: basalt_chunk_store::FillPattern,
    /// Overwrite passes per freed range.
    pub overwrite_passes: u32,
    /// Integrity scrub read rate, bytes per second.
    pub integrity_rate: u64,
    /// Time between local integrity passes (`None`: on demand only).
    pub integrity_interval: Option<std::time::Duration>,
    /// Time between deep (cross-replica) passes (`None`: on demand only).
    pub deep_interval: Option<std::time::Duration>,
    /// Self-healing (acted on by the meta leader).
    pub heal: HealConfig,
    /// The backup tier's settings (the meta leader's decide).
    pub backup: BackupConfig,
    /// TLS, allow-lists.
    pub security: SecurityConfig,
    /// Audit log retention (acted on by the meta leader).
    pub audit: AuditConfig,
}

/// Who may connect to this node's listeners, and with what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityConfig {
    /// TLS material; `None`: security is off (plaintext, no authentication).
    pub tls: Option<TlsFiles>,
    /// How often certificate and CA files are checked for changes.
    pub reload: std::time::Duration,
    /// Source-address allow-lists per listener.
    pub allow: AllowLists,
}

/// Source-address allow-lists, one per listener (empty: any address).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowLists {
    /// The admin gRPC API.
    pub admin: AllowList,
    /// The framed data protocol.
    pub data: AllowList,
    /// The Raft transport (and Raft snapshots, which ride on gRPC: also checked against `admin`).
    pub raft: AllowList,
    /// The metrics endpoint.
    pub metrics: AllowList,
}

/// Audit log retention: past either bound, the oldest records are exported to JSON lines in
/// `export_dir` and dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditConfig {
    /// Records kept at most.
    pub max_records: u64,
    /// Age kept at most.
    pub max_age: std::time::Duration,
    /// Where pruned records are exported.
    pub export_dir: PathBuf,
}

/// Self-healing settings. The meta leader's own settings decide re-placement; every node's
/// `rebuild_rate` paces the snapshots it sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealConfig {
    /// A node silent this long has its replicas re-placed on other nodes.
    pub replace_down_after: std::time::Duration,
    /// Drain and rebalance moves in flight at once, cluster-wide; replacements of dead nodes'
    /// replicas have a budget of the same size of their own.
    pub max_moves: u32,
    /// Bytes per second this node sends to fill new replicas (0: unlimited).
    pub rebuild_rate: u64,
}

/// Backup settings. The meta leader's own settings decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackupConfig {
    /// Backup nodes each backup is kept on (fewer if fewer are up).
    pub copies: u32,
    /// A deleted volume's backups expire this long after the deletion, unless pinned.
    pub retain_after_delete: std::time::Duration,
}

/// The longest a deleted volume's backups are kept: four weeks, what providers promise.
pub const MAX_RETAIN_AFTER_DELETE: std::time::Duration = std::time::Duration::from_secs(28 * 86_400);

impl Default for BackupConfig {
    fn default() -> Self {
        Self { copies: 2, retain_after_delete: MAX_RETAIN_AFTER_DELETE }
    }
}

impl Default for HealConfig {
    fn default() -> Self {
        Self { replace_down_after: std::time::Duration::from_secs(600), max_moves: 4, rebuild_rate: 64 << 20 }
    }
}

fn size(key: &'static str, value: Option<String>, default: u64) -> Result<u64, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => parse_size(&v).map_err(|e| invalid(key, e.to_string())),
    }
}

fn addr(key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| invalid(key, format!("{value:?} is not an address like 127.0.0.1:7001")))
}

impl NodeConfig {
    /// Loads the file named by `--config` (if any) and applies the flags over it.
    pub fn load(flags: Flags) -> Result<Self, ConfigError> {
        let file = match &flags.config {
            Some(path) => Self::read_file(path)?,
            None => FileConfig::default(),
        };
        Self::merge(file, flags)
    }

    /// Parses a TOML file.
    pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })
    }

    /// Combines file settings and flags (flags win) and validates the result.
    pub fn merge(file: FileConfig, f: Flags) -> Result<Self, ConfigError> {
        let id = f.id.or(file.id).ok_or_else(|| invalid("id", "required (a positive integer unique in the cluster)"))?;
        if id == 0 {
            return Err(invalid("id", "must be greater than 0"));
        }
        let listen = f.listen.or(file.listen).ok_or_else(|| invalid("listen", "required, e.g. 127.0.0.1:7001"))?;
        let listen = addr("listen", &listen)?;
        let metrics_listen = match f.metrics_listen.or(file.metrics_listen) {
            Some(a) if !a.is_empty() => Some(addr("metrics_listen", &a)?),
            _ => None,
        };
        let data_dir = f.data_dir.or(file.data_dir).ok_or_else(|| invalid("data_dir", "required"))?;
        let data_device = f.data_device.or(file.data_device).unwrap_or_else(|| data_dir.join("chunks.dat"));
        let mut labels: Labels = match f.labels.or(file.labels) {
            Some(l) => l.parse().map_err(|e: basalt_common::labels::LabelError| invalid("labels", e.to_string()))?,
            None => Labels::default(),
        };
        if labels.host.is_empty() {
            labels.host = format!("node-{id}");
        }
        let roles_raw = f.roles.or(file.roles).unwrap_or_else(|| vec!["storage".into()]);
        let mut roles = BTreeSet::new();
        for r in roles_raw.iter().map(|r| r.trim()).filter(|r| !r.is_empty()) {
            roles.insert(r.parse::<Role>().map_err(|e| invalid("roles", e))?);
        }
        if roles.is_empty() {
            return Err(invalid("roles", "at least one of storage, meta, backup"));
        }
        let seeds: Vec<String> = f.seeds.or(file.seeds).unwrap_or_default().into_iter().filter(|s| !s.is_empty()).collect();
        for s in &seeds {
            addr("seeds", s)?;
        }
        if seeds.is_empty() && !roles.contains(&Role::Meta) {
            return Err(invalid("seeds", "a node without the meta role needs the meta nodes' addresses"));
        }
        let capacity = size("capacity", f.capacity.or(file.capacity), 10 << 30)?;
        if capacity < 64 << 20 {
            return Err(invalid("capacity", "must be at least 64MiB"));
        }
        let state_reserve = match f.state_reserve.or(file.state_reserve) {
            Some(text) => Some(size("state_reserve", Some(text), 0)?),
            None => None,
        };
        let memory = MemoryConfig {
            index_cache: size("memory.index_cache", f.index_cache.or(file.memory.index_cache), 32 << 20)? as usize,
            log_cache: size("memory.log_cache", f.log_cache.or(file.memory.log_cache), 16 << 20)? as usize,
            write_buffer: size("memory.write_buffer", f.write_buffer.or(file.memory.write_buffer), 32 << 20)? as usize,
            log_write_buffer: size("memory.log_write_buffer", f.log_write_buffer.or(file.memory.log_write_buffer), 64 << 20)? as usize,
            raft_tail_per_group: size("memory.raft_tail_per_group", f.raft_tail_per_group.or(file.memory.raft_tail_per_group), 2 << 20)? as usize,
            inflight_writes: size("memory.inflight_writes", f.inflight_writes.or(file.memory.inflight_writes), 64 << 20)? as usize,
        };
        if memory.inflight_writes < 32 << 20 {
            return Err(invalid("memory.inflight_writes", "must be at least 32MiB (the largest single write)"));
        }
        if memory.log_write_buffer < 4 << 20 {
            return Err(invalid("memory.log_write_buffer", "must be at least 4MiB"));
        }
        if memory.write_buffer < 4 << 20 {
            return Err(invalid("memory.write_buffer", "must be at least 4MiB"));
        }
        let mut raft = basalt_raft::RaftTuning::default();
        if let Some(v) = f.heartbeat_ms.or(file.raft.heartbeat_ms) {
            raft.heartbeat_ms = v;
        }
        if let Some(v) = f.election_timeout_min_ms.or(file.raft.election_timeout_min_ms) {
            raft.election_timeout_min_ms = v;
        }
        if let Some(v) = f.election_timeout_max_ms.or(file.raft.election_timeout_max_ms) {
            raft.election_timeout_max_ms = v;
        }
        if let Some(v) = f.checkpoint_every_entries.or(file.raft.checkpoint_every_entries) {
            raft.checkpoint_every_entries = v;
        }
        if let Some(v) = f.keep_entries_after_checkpoint.or(file.raft.keep_entries_after_checkpoint) {
            raft.keep_entries_after_checkpoint = v;
        }
        if raft.heartbeat_ms == 0 || raft.election_timeout_min_ms <= raft.heartbeat_ms * 2 {
            return Err(invalid("raft.election_timeout_min_ms", "must be more than twice raft.heartbeat_ms (and the heartbeat above 0)"));
        }
        if raft.election_timeout_max_ms <= raft.election_timeout_min_ms {
            return Err(invalid("raft.election_timeout_max_ms", "must be greater than raft.election_timeout_min_ms"));
        }
        if raft.checkpoint_every_entries == 0 {
            return Err(invalid("raft.checkpoint_every_entries", "must be greater than 0"));
        }
        let log_size_target = size("raft.log_size_target", f.log_size_target.or(file.raft.log_size_target), DEFAULT_LOG_SIZE_TARGET)?;
        if log_size_target < 2 * basalt_raft::log_store::DEFAULT_SEGMENT_BYTES {
            return Err(invalid("raft.log_size_target", "must be at least two log segments (128MiB)"));
        }
        let overwrite_rate = size("scrub.overwrite_rate", f.overwrite_rate.or(file.scrub.overwrite_rate), 64 << 20)?;
        if overwrite_rate == 0 {
            return Err(invalid("scrub.overwrite_rate", "must be greater than 0 (freed space must eventually be overwritten)"));
        }
        let overwrite_pattern = match f.overwrite_pattern.or(file.scrub.overwrite_pattern) {
            None => basalt_chunk_store::FillPattern::Zeros,
            Some(p) => p.parse().map_err(|e: String| invalid("scrub.overwrite_pattern", e))?,
        };
        let overwrite_passes = f.overwrite_passes.or(file.scrub.overwrite_passes).unwrap_or(1);
        if !(1..=16).contains(&overwrite_passes) {
            return Err(invalid("scrub.overwrite_passes", format!("{overwrite_passes} is outside 1..=16")));
        }
        let integrity_rate = size("scrub.integrity_rate", file.scrub.integrity_rate, 32 << 20)?;
        if integrity_rate == 0 {
            return Err(invalid("scrub.integrity_rate", "must be greater than 0 (use integrity_interval_hours = 0 to scrub only on demand)"));
        }
        let hours = |key: &'static str, v: Option<u64>, default: u64| -> Result<Option<std::time::Duration>, ConfigError> {
            match v.unwrap_or(default) {
                0 => Ok(None),
                h if h > 24 * 365 * 10 => Err(invalid(key, format!("{h} hours is more than ten years"))),
                h => Ok(Some(std::time::Duration::from_secs(h * 3600))),
            }
        };
        let integrity_interval = hours("scrub.integrity_interval_hours", file.scrub.integrity_interval_hours, 7 * 24)?;
        let deep_interval = hours("scrub.deep_interval_hours", file.scrub.deep_interval_hours, 30 * 24)?;
        let mut heal = HealConfig::default();
        if let Some(secs) = f.replace_down_after_secs.or(file.heal.replace_down_after_secs) {
            if !(1..=30 * 24 * 3600).contains(&secs) {
                return Err(invalid("heal.replace_down_after_secs", format!("{secs} is outside 1..=2592000 (30 days)")));
            }
            heal.replace_down_after = std::time::Duration::from_secs(secs);
        }
        if let Some(n) = f.max_moves.or(file.heal.max_moves) {
            if !(1..=1024).contains(&n) {
                return Err(invalid("heal.max_moves", format!("{n} is outside 1..=1024")));
            }
            heal.max_moves = n;
        }
        heal.rebuild_rate = size("heal.rebuild_rate", f.rebuild_rate.or(file.heal.rebuild_rate), heal.rebuild_rate)?;
        let mut backup = BackupConfig::default();
        if let Some(n) = file.backup.copies {
            if !(1..=8).contains(&n) {
                return Err(invalid("backup.copies", format!("{n} is outside 1..=8")));
            }
            backup.copies = n;
        }
        if let Some(d) = file.backup.retain_after_delete {
            let secs = basalt_common::units::parse_duration(&d).map_err(|e| invalid("backup.retain_after_delete", e))?;
            let d = std::time::Duration::from_secs(secs);
            if secs == 0 || d > MAX_RETAIN_AFTER_DELETE {
                return Err(invalid(
                    "backup.retain_after_delete",
                    format!("{secs} s is outside 1 s..=28 days (a deleted volume's backups are never kept longer)"),
                ));
            }
            backup.retain_after_delete = d;
        }
        let security_off = f.security_off || file.security.off.unwrap_or(false);
        let tls_dir = data_dir.join("tls");
        let tls = (!security_off).then(|| TlsFiles {
            ca: f.ca.or(file.security.ca).unwrap_or_else(|| tls_dir.join("ca.pem")),
            cert: Some(f.cert.or(file.security.cert).unwrap_or_else(|| tls_dir.join(format!("node-{id}.pem")))),
            key: Some(f.key.or(file.security.key).unwrap_or_else(|| tls_dir.join(format!("node-{id}.key")))),
        });
        let reload_secs = file.security.reload_secs.unwrap_or(5);
        if !(1..=3600).contains(&reload_secs) {
            return Err(invalid("security.reload_secs", format!("{reload_secs} is outside 1..=3600")));
        }
        let list = |key: &'static str, v: Option<Vec<String>>| AllowList::parse(&v.unwrap_or_default()).map_err(|e| invalid(key, e.to_string()));
        let allow = AllowLists {
            admin: list("security.allow.admin", file.security.allow.admin)?,
            data: list("security.allow.data", file.security.allow.data)?,
            raft: list("security.allow.raft", file.security.allow.raft)?,
            metrics: list("security.allow.metrics", file.security.allow.metrics)?,
        };
        let max_records = file.audit.max_records.unwrap_or(100_000);
        if !(1_000..=10_000_000).contains(&max_records) {
            return Err(invalid("audit.max_records", format!("{max_records} is outside 1000..=10000000")));
        }
        let max_age_days = file.audit.max_age_days.unwrap_or(365);
        if !(1..=36_500).contains(&max_age_days) {
            return Err(invalid("audit.max_age_days", format!("{max_age_days} is outside 1..=36500")));
        }
        let audit = AuditConfig {
            max_records,
            max_age: std::time::Duration::from_secs(max_age_days * 86_400),
            export_dir: file.audit.export_dir.unwrap_or_else(|| data_dir.join("audit").join("export")),
        };
        let versions = basalt_common::version::VersionRange::of_this_process().map_err(|e| invalid(basalt_common::version::TEST_OVERRIDE_ENV, e))?;
        Ok(Self {
            id: NodeId(id),
            versions,
            config_file: f.config.clone(),
            listen,
            metrics_listen,
            data_dir,
            data_device,
            labels,
            roles,
            seeds,
            capacity,
            direct_io: f.direct_io.or(file.direct_io).unwrap_or(true),
            state_reserve,
            memory,
            raft,
            log_size_target,
            overwrite_rate,
            overwrite_pattern,
            overwrite_passes,
            integrity_rate,
            integrity_interval,
            deep_interval,
            heal,
            backup,
            security: SecurityConfig { tls, reload: std::time::Duration::from_secs(reload_secs), allow },
            audit,
        })
    }

    /// True if the node has `role`.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> Flags {
        let mut v = vec!["basalt-node"];
        v.extend_from_slice(args);
        Flags::parse_from(v)
    }

    #[test]
    fn file_and_flags_merge_with_flags_winning() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        std::fs::write(
            &path,
            "id = 4\nlisten = \"127.0.0.1:7004\"\ndata_dir = \"/tmp/x\"\nlabels = \"zone=z1\"\nroles = [\"storage\", \"meta\"]\n[memory]\nindex_cache = \"8MiB\"\n",
        )
        .unwrap();
        let cfg = NodeConfig::load(flags(&["--config", path.to_str().unwrap(), "--listen", "127.0.0.1:7999"])).unwrap();
        assert_eq!(cfg.id, NodeId(4));
        assert_eq!(cfg.listen.port(), 7999);
        assert_eq!(cfg.labels.zone, "z1");
        assert_eq!(cfg.labels.host, "node-4", "missing host label defaults to the node id");
        assert_eq!(cfg.memory.index_cache, 8 << 20);
        assert!(cfg.has(Role::Meta));
        let tls = cfg.security.tls.expect("security is on by default");
        assert_eq!(tls.cert, Some(PathBuf::from("/tmp/x/tls/node-4.pem")), "TLS material defaults to DATA_DIR/tls");
        assert_eq!(tls.ca, PathBuf::from("/tmp/x/tls/ca.pem"));
        let off = NodeConfig::load(flags(&["--config", path.to_str().unwrap(), "--security-off"])).unwrap();
        assert_eq!(off.security.tls, None);
    }

    #[test]
    fn bad_configs_name_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let cases: &[(&str, &str)] = &[
            ("listen = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nroles=[\"meta\"]", "`id`"),
            ("id = 0\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nroles=[\"meta\"]", "`id`"),
            ("id = 1\nlisten = \"nope\"\ndata_dir = \"/x\"\nroles=[\"meta\"]", "`listen`"),
            ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nroles=[\"chef\"]", "`roles`"),
            ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nlabels=\"planet=mars\"\nroles=[\"meta\"]", "`labels`"),
            ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\ncapacity=\"lots\"\nroles=[\"meta\"]", "`capacity`"),
            ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nroles=[\"storage\"]", "`seeds`"),
            ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nstate_reserve=\"some\"\nroles=[\"meta\"]", "`state_reserve`"),
            ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nroles=[\"meta\"]\n[raft]\nheartbeat_ms = 2000", "election_timeout_min_ms"),
            ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nroles=[\"meta\"]\n[scrub]\noverwrite_rate = \"0\"", "overwrite_rate"),
            ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nroles=[\"meta\"]\n[scrub]\noverwrite_pattern = \"ones\"", "overwrite_pattern"),
            ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nroles=[\"meta\"]\n[scrub]\noverwrite_passes = 0", "overwrite_passes"),
            ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nroles=[\"meta\"]\n[scrub]\nintegrity_rate = \"0\"", "integrity_rate"),
            ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nroles=[\"meta\"]\n[scrub]\ndeep_interval_hours = 99999999", "deep_interval_hours"),
            ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nroles=[\"meta\"]\n[heal]\nreplace_down_after_secs = 0", "replace_down_after_secs"),
            ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nroles=[\"meta\"]\n[heal]\nmax_moves = 0", "max_moves"),
            ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nroles=[\"meta\"]\n[heal]\nrebuild_rate = \"fast\"", "rebuild_rate"),
            (
                "id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nroles=[\"meta\"]\n[security.allow]\ndata = [\"10.0.0.1/8\"]",
                "security.allow.data",
            ),
            ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nroles=[\"meta\"]\n[security]\nreload_secs = 0", "security.reload_secs"),
            ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nroles=[\"meta\"]\n[security]\ntls = true", "tls"),
            ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nroles=[\"meta\"]\n[audit]\nmax_records = 5", "audit.max_records"),
            ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nroles=[\"meta\"]\n[backup]\ncopies = 0", "backup.copies"),
            ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nroles=[\"meta\"]\n[backup]\nretain_after_delete = \"29d\"", "never kept longer"),
            (
                "id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nroles=[\"meta\"]\n[backup]\nretain_after_delete = \"soon\"",
                "backup.retain_after_delete",
            ),
        ];
        for (i, (text, expect)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("{i}.toml"));
            std::fs::write(&path, text).unwrap();
            let err = NodeConfig::load(flags(&["--config", path.to_str().unwrap()])).unwrap_err().to_string();
            assert!(err.contains(expect), "case {i}: {err}");
        }
        let path = dir.path().join("typo.toml");
        std::fs::write(&path, "id = 1\nlisten = \"127.0.0.1:1\"\ndata_dri = \"/x\"").unwrap();
        let err = NodeConfig::load(flags(&["--config", path.to_str().unwrap()])).unwrap_err().to_string();
        assert!(err.contains("data_dri"), "unknown keys are named: {err}");
        let err = NodeConfig::load(flags(&["--config", "/nonexistent/n.toml"])).unwrap_err().to_string();
        assert!(err.contains("cannot read config file"), "{err}");
    }
}
