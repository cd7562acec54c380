//! Who may do what. A request's [`Principal`] is a node (its certificate), a named client (its
//! certificate), or a bearer token with a [`Role`], optional per-volume grants, an optional
//! expiry and optional source blocks. [`authorize`] decides an [`Action`] on an optional volume;
//! the meta group stores the [`TokenRecord`]s and every node holds a copy ([`TokenTable`]) so it
//! can decide without a round trip.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;
use crate::identity::format_unix;
use crate::token::{Token, TokenHash, TokenId};

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// Everything.
    Admin,
    /// Cluster, node and scrub operations and read-only volume metadata; no data access.
    Operator,
    /// Attach and block I/O on granted volumes.
    Hypervisor,
    /// Read (snapshot, back up, restore) granted volumes.
    Backup,
    /// Status only.
    Reader,
}

impl Role {
    /// Every role, in order of power.
    pub const ALL: [Role; 5] = [Role::Admin, Role::Operator, Role::Hypervisor, Role::Backup, Role::Reader];

    /// The role's name in the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Hypervisor => "hypervisor",
            Role::Backup => "backup",
            Role::Reader => "reader",
        }
    }

    fn allows(self, action: Action) -> bool {
        use Action::*;
        match self {
            Role::Admin => action != Internal,
            Role::Operator => matches!(
                action,
                NodeInfo
                    | ClusterStatus
                    | NodeList
                    | ScrubStatus
                    | Metrics
                    | ClusterMap
                    | VolumeList
                    | VolumeShow
                    | NodeDrain
                    | NodeRemove
                    | ScrubStart
                    | AuditList
                    | SnapshotList
                    | BackupList
                    | NodeDiagnostics
            ),
            Role::Hypervisor => {
                matches!(action, NodeInfo | ClusterMap | VolumeList | VolumeShow | VolumeAttach | VolumeDetach | DataRead | DataWrite | AuditReport)
            }
            Role::Backup => matches!(
                action,
                NodeInfo
                    | ClusterMap
                    | VolumeList
                    | VolumeShow
                    | DataRead
                    | AuditReport
                    | SnapshotCreate
                    | SnapshotList
                    | SnapshotDelete
                    | BackupCreate
                    | BackupList
                    | BackupVerify
                    | BackupDelete
                    | BackupRestore
            ),
            Role::Reader => matches!(action, NodeInfo | ClusterStatus | NodeList | ScrubStatus | Metrics),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?}; roles are admin, operator, hypervisor, backup, reader"))
    }
}

/// Something a principal asks to do. Volume-scoped actions name the volume to [`authorize`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Which node answers and whether the cluster is initialized.
    NodeInfo,
    /// Cluster health.
    ClusterStatus,
    /// Registered nodes.
    NodeList,
    /// A node's scrubber state.
    ScrubStatus,
    /// Scraping `/metrics`.
    Metrics,
    /// The cluster map (routing data requests).
    ClusterMap,
    /// Listing volumes (filtered to granted ones for tokens with grants).
    VolumeList,
    /// One volume's metadata.
    VolumeShow,
    /// `cluster init`.
    ClusterInit,
    /// Draining a node.
    NodeDrain,
    /// Removing a node.
    NodeRemove,
    /// Starting an integrity pass.
    ScrubStart,
    /// Changing cluster-wide settings.
    ClusterConfigure,
    /// Creating a volume.
    VolumeCreate,
    /// Growing a volume.
    VolumeResize,
    /// Setting a volume's QoS limits.
    VolumeSetQos,
    /// Deleting a volume.
    VolumeDelete,
    /// Rewrapping an encrypted volume's keys under another key-encryption key.
    VolumeRekey,
    /// Taking a volume's read-write attachment.
    VolumeAttach,
    /// Ending a volume's attachment.
    VolumeDetach,
    /// Taking a snapshot of a volume.
    SnapshotCreate,
    /// Listing a volume's snapshots.
    SnapshotList,
    /// Deleting a snapshot.
    SnapshotDelete,
    /// Returning a volume to a snapshot.
    VolumeRollback,
    /// Making a writable volume from a snapshot (authorized on the source volume; the clone's
    /// name must be one the principal may see too).
    VolumeClone,
    /// Copying a volume's snapshot to the backup tier.
    BackupCreate,
    /// Listing and showing backups.
    BackupList,
    /// Reading a backup back and checking every piece.
    BackupVerify,
    /// Deleting a backup.
    BackupDelete,
    /// Restoring a backup into a new volume.
    BackupRestore,
    /// Keeping a backup past its volume's deletion.
    BackupPin,
    /// Reading blocks.
    DataRead,
    /// Writing, trimming and zeroing blocks.
    DataWrite,
    /// Creating a token.
    TokenCreate,
    /// Listing tokens.
    TokenList,
    /// Revoking a token.
    TokenRevoke,
    /// Reading and verifying the audit log.
    AuditList,
    /// Recording connections an attach process refused to one of its exports (NBD allow-list,
    /// TLS): the record names the reporter as actor.
    AuditReport,
    /// A node's diagnostics for a support bundle: the end of its log, its configuration
    /// (redacted), its metrics.
    NodeDiagnostics,
    /// Node-to-node calls: heartbeats, Raft snapshots, replica checks, audit records.
    Internal,
}

impl Action {
    /// The action's name in the audit log.
    pub fn as_str(self) -> &'static str {
        use Action::*;
        match self {
            NodeInfo => "node.info",
            ClusterStatus => "cluster.status",
            NodeList => "node.list",
            ScrubStatus => "scrub.status",
            Metrics => "metrics",
            ClusterMap => "cluster.map",
            VolumeList => "volume.list",
            VolumeShow => "volume.show",
            ClusterInit => "cluster.init",
            NodeDrain => "node.drain",
            NodeRemove => "node.remove",
            ScrubStart => "scrub.start",
            ClusterConfigure => "cluster.configure",
            VolumeCreate => "volume.create",
            VolumeResize => "volume.resize",
            VolumeSetQos => "volume.qos",
            VolumeDelete => "volume.delete",
            VolumeRekey => "volume.rekey",
            VolumeAttach => "volume.attach",
            VolumeDetach => "volume.detach",
            SnapshotCreate => "snapshot.create",
            SnapshotList => "snapshot.list",
            SnapshotDelete => "snapshot.delete",
            VolumeRollback => "volume.rollback",
            VolumeClone => "volume.clone",
            BackupCreate => "backup.create",
            BackupList => "backup.list",
            BackupVerify => "backup.verify",
            BackupDelete => "backup.delete",
            BackupRestore => "backup.restore",
            BackupPin => "backup.pin",
            DataRead => "data.read",
            DataWrite => "data.write",
            TokenCreate => "auth.token.create",
            TokenList => "auth.token.list",
            TokenRevoke => "auth.token.revoke",
            AuditList => "audit.list",
            AuditReport => "audit.report",
            NodeDiagnostics => "node.diagnostics",
            Internal => "internal",
        }
    }
}

/// A token as the cluster stores it: never the token itself, only its hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public id.
    pub id: TokenId,
    /// SHA-256 of the token.
    pub hash: TokenHash,
    /// What it may do.
    pub role: Role,
    /// Volumes it is limited to (by name); empty: every volume its role reaches.
    pub volumes: BTreeSet<String>,
    /// Expiry, Unix milliseconds.
    pub expires_unix_ms: Option<u64>,
    /// Source blocks it may be used from; empty: anywhere the listeners allow.
    pub allow_from: Vec<Cidr>,
    /// A description for people.
    pub name: String,
    /// Creation time, Unix milliseconds.
    pub created_unix_ms: u64,
    /// Who created it.
    pub created_by: String,
    /// When it was revoked, if it was.
    pub revoked_unix_ms: Option<u64>,
}

impl TokenRecord {
    /// The record for a new `token`.
    pub fn new(token: &Token, role: Role, created_by: String, created_unix_ms: u64) -> TokenRecord {
        TokenRecord {
            id: token.id(),
            hash: token.hash(),
            role,
            volumes: BTreeSet::new(),
            expires_unix_ms: None,
            allow_from: Vec::new(),
            name: String::new(),
            created_unix_ms,
            created_by,
            revoked_unix_ms: None,
        }
    }

    /// Whether the token may be used from `source` at `now_ms`; `Err` says why not.
    pub fn usable(&self, source: IpAddr, now_ms: u64) -> Result<(), Denied> {
        if let Some(at) = self.revoked_unix_ms {
            return Err(Denied::unauthenticated(format!("token {} was revoked at {}", self.id, format_unix((at / 1000) as i64))));
        }
        if let Some(at) = self.expires_unix_ms
            && now_ms >= at
        {
            return Err(Denied::unauthenticated(format!("token {} expired at {}", self.id, format_unix((at / 1000) as i64))));
        }
        if !self.allow_from.is_empty() && !self.allow_from.iter().any(|c| c.contains(source)) {
            return Err(Denied::permission(format!("token {} may not be used from {source}", self.id)));
        }
        Ok(())
    }

    /// The actor name in logs and the audit log: `token:<id>` (and its name, if it has one).
    pub fn actor(&self) -> String {
        if self.name.is_empty() { format!("token:{}", self.id) } else { format!("token:{}({})", self.id, self.name) }
    }
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    /// `true`: no valid credentials (gRPC `Unauthenticated`); `false`: valid credentials that
    /// do not allow this (`PermissionDenied`).
    pub unauthenticated: bool,
    /// What was missing or wrong, never the credential itself.
    pub message: String,
}

impl Denied {
    /// No valid credentials.
    pub fn unauthenticated(message: impl Into<String>) -> Denied {
        Denied { unauthenticated: true, message: message.into() }
    }

    /// Not allowed.
    pub fn permission(message: impl Into<String>) -> Denied {
        Denied { unauthenticated: false, message: message.into() }
    }

    /// As a gRPC status.
    pub fn status(&self) -> tonic::Status {
        if self.unauthenticated {
            tonic::Status::unauthenticated(self.message.clone())
        } else {
            tonic::Status::permission_denied(self.message.clone())
        }
    }
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Who is asking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// A node, by its certificate.
    Node(u64),
    /// A named client, by its certificate: status reads and `cluster init`.
    Client(String),
    /// A bearer token.
    Token(Arc<TokenRecord>),
    /// Anyone: security is switched off on this cluster.
    Open,
}

impl Principal {
    /// The actor name in logs and the audit log.
    pub fn actor(&self) -> String {
        match self {
            Principal::Node(id) => format!("node-{id}"),
            Principal::Client(name) => format!("client:{name}"),
            Principal::Token(t) => t.actor(),
            Principal::Open => "anonymous (security off)".into(),
        }
    }

    /// Whether a token limited to volumes lets this principal see `volume`.
    pub fn sees_volume(&self, volume: &str) -> bool {
        match self {
            Principal::Token(t) => t.volumes.is_empty() || t.volumes.contains(volume),
            _ => true,
        }
    }
}

/// A certificate's identity as a principal.
impl From<crate::identity::Identity> for Principal {
    fn from(identity: crate::identity::Identity) -> Principal {
        match identity {
            crate::identity::Identity::Node(n) => Principal::Node(n),
            crate::identity::Identity::Client(c) => Principal::Client(c),
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.actor())
    }
}

/// Decides whether `principal` may do `action` (on `volume`, for volume-scoped actions).
pub fn authorize(principal: &Principal, action: Action, volume: Option<&str>) -> Result<(), Denied> {
    let allowed = match principal {
        Principal::Open => true,
        // Nodes read and write blocks for the backup tier (a backup node copies snapshots out and
        // restores backups into new volumes); a node is a cluster member by its certificate.
        Principal::Node(_) => matches!(
            action,
            Action::Internal
                | Action::DataRead
                | Action::DataWrite
                | Action::BackupList
                | Action::NodeInfo
                | Action::ClusterMap
                | Action::ClusterStatus
                | Action::NodeList
                | Action::ScrubStatus
                | Action::Metrics
        ),
        Principal::Client(_) => matches!(
            action,
            Action::ClusterInit | Action::NodeInfo | Action::ClusterStatus | Action::NodeList | Action::ScrubStatus | Action::Metrics
        ),
        Principal::Token(t) => t.role.allows(action),
    };
    if !allowed {
        let what = match principal {
            Principal::Token(t) => format!("{} (role {})", t.actor(), t.role),
            other => other.actor(),
        };
        return Err(Denied::permission(format!("{what} may not {}", action.as_str())));
    }
    if let (Principal::Token(t), Some(v)) = (principal, volume)
        && !t.volumes.is_empty()
        && !t.volumes.contains(v)
    {
        return Err(Denied::permission(format!("{} has no grant for volume {v}", t.actor())));
    }
    Ok(())
}

/// A node's copy of the cluster's tokens, by id.
#[derive(Clone, Debug, Default)]
pub struct TokenTable {
    tokens: HashMap<TokenId, Arc<TokenRecord>>,
}

impl TokenTable {
    /// A table of `records`.
    pub fn new(records: impl IntoIterator<Item = TokenRecord>) -> TokenTable {
        TokenTable { tokens: records.into_iter().map(|r| (r.id, Arc::new(r))).collect() }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True with no tokens.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The principal a presented token stands for, if it is valid here and now.
    pub fn authenticate(&self, text: &str, source: IpAddr, now_ms: u64) -> Result<Principal, Denied> {
        let token = Token::parse(text).map_err(|e| Denied::unauthenticated(e.to_string()))?;
        let record = self.tokens.get(&token.id()).ok_or_else(|| Denied::unauthenticated(format!("unknown token {}", token.id())))?;
        if !token.matches(&record.hash) {
            return Err(Denied::unauthenticated(format!("token {} does not match its stored hash (wrong secret)", token.id())));
        }
        record.usable(source, now_ms)?;
        Ok(Principal::Token(record.clone()))
    }

    /// Re-checks a principal authenticated earlier (on a long-lived connection) against the
    /// current table: a revoked, expired or deleted token stops working.
    pub fn recheck(&self, principal: &Principal, source: IpAddr, now_ms: u64) -> Result<Principal, Denied> {
        match principal {
            Principal::Token(t) => {
                let current = self.tokens.get(&t.id).ok_or_else(|| Denied::unauthenticated(format!("token {} no longer exists", t.id)))?;
                current.usable(source, now_ms)?;
                Ok(Principal::Token(current.clone()))
            }
            other => Ok(other.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn roles_allow_what_the_design_says() {
        let tok = |role: Role, volumes: &[&str]| {
            let mut r = TokenRecord::new(&Token::generate(), role, "test".into(), 0);
            r.volumes = volumes.iter().map(|v| v.to_string()).collect();
            Principal::Token(Arc::new(r))
        };
        let admin = tok(Role::Admin, &[]);
        assert!(authorize(&admin, Action::TokenCreate, None).is_ok());
        assert!(authorize(&admin, Action::DataWrite, Some("any")).is_ok());
        assert!(authorize(&admin, Action::Internal, None).is_err(), "node-to-node calls are for nodes");
        let op = tok(Role::Operator, &[]);
        assert!(authorize(&op, Action::NodeDrain, None).is_ok());
        assert!(authorize(&op, Action::VolumeShow, Some("v")).is_ok());
        for a in [Action::DataRead, Action::VolumeCreate, Action::TokenCreate, Action::VolumeAttach, Action::VolumeRekey, Action::ClusterConfigure] {
            assert!(authorize(&op, a, Some("v")).is_err(), "{a:?}");
        }
        let hv = tok(Role::Hypervisor, &["vm1"]);
        assert!(authorize(&hv, Action::DataWrite, Some("vm1")).is_ok());
        let e = authorize(&hv, Action::DataWrite, Some("vm2")).unwrap_err();
        assert!(!e.unauthenticated && e.message.contains("no grant for volume vm2"), "{e}");
        assert!(authorize(&hv, Action::NodeDrain, None).is_err());
        assert!(authorize(&hv, Action::AuditReport, Some("vm1")).is_ok(), "reports refusals on its own exports");
        assert!(authorize(&hv, Action::AuditReport, Some("vm2")).is_err(), "and only those");
        assert!(authorize(&op, Action::AuditReport, Some("vm1")).is_err());
        let backup = tok(Role::Backup, &[]);
        assert!(authorize(&backup, Action::DataRead, Some("x")).is_ok());
        assert!(authorize(&backup, Action::DataWrite, Some("x")).is_err());
        let reader = tok(Role::Reader, &[]);
        assert!(authorize(&reader, Action::ClusterStatus, None).is_ok());
        assert!(authorize(&reader, Action::VolumeList, None).is_err());
        assert!(authorize(&Principal::Node(2), Action::Internal, None).is_ok());
        assert!(authorize(&Principal::Node(2), Action::VolumeCreate, None).is_err());
        assert!(authorize(&Principal::Client("ops".into()), Action::ClusterInit, None).is_ok());
        assert!(authorize(&Principal::Client("ops".into()), Action::DataRead, Some("v")).is_err());
        assert!(authorize(&Principal::Open, Action::TokenCreate, None).is_ok());
    }

    #[test]
    fn tokens_authenticate_until_revoked_or_expired_and_only_from_their_blocks() {
        let good = Token::generate();
        let mut rec = TokenRecord::new(&good, Role::Hypervisor, "admin".into(), 0);
        rec.expires_unix_ms = Some(10_000);
        rec.allow_from = vec!["10.0.0.0/8".parse().unwrap()];
        let table = TokenTable::new([rec.clone()]);
        let p = table.authenticate(&good.expose(), ip("10.1.1.1"), 5_000).unwrap();
        assert!(matches!(&p, Principal::Token(t) if t.id == good.id()));
        let e = table.authenticate(&good.expose(), ip("192.168.0.1"), 5_000).unwrap_err();
        assert!(!e.unauthenticated && e.message.contains("may not be used from 192.168.0.1"), "{e}");
        let e = table.authenticate(&good.expose(), ip("10.1.1.1"), 10_000).unwrap_err();
        assert!(e.unauthenticated && e.message.contains("expired"), "{e}");
        let e = table.authenticate(&Token::generate().expose(), ip("10.1.1.1"), 0).unwrap_err();
        assert!(e.unauthenticated && e.message.contains("unknown token"), "{e}");
        // Right id, wrong secret.
        let forged = good.expose()[..good.expose().len() - 4].to_string() + "0000";
        let forged = if forged == good.expose() { good.expose()[..good.expose().len() - 4].to_string() + "1111" } else { forged };
        let e = table.authenticate(&forged, ip("10.1.1.1"), 0).unwrap_err();
        assert!(e.unauthenticated && e.message.contains("wrong secret"), "{e}");
        assert!(!e.message.contains(&forged[20..]), "never echoes the secret");
        let e = table.authenticate("garbage", ip("10.1.1.1"), 0).unwrap_err();
        assert!(e.unauthenticated, "{e}");

        rec.revoked_unix_ms = Some(6_000);
        let revoked = TokenTable::new([rec]);
        let e = revoked.recheck(&p, ip("10.1.1.1"), 7_000).unwrap_err();
        assert!(e.unauthenticated && e.message.contains("revoked"), "{e}");
        let e = TokenTable::default().recheck(&p, ip("10.1.1.1"), 7_000).unwrap_err();
        assert!(e.message.contains("no longer exists"), "{e}");
        assert_eq!(TokenTable::default().recheck(&Principal::Node(3), ip("10.1.1.1"), 0).unwrap(), Principal::Node(3));
    }
}
