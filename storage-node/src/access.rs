//! Who may connect to this node and what they may do.
//!
//! ```text
//!  accept ─► source address in some listener's allow-list? ─► TLS ClientHello: protocol (ALPN)
//!         ─► that protocol's allow-list ─► handshake (cluster CA; Raft: node certificate)
//!  request ─► Caller: token (bearer / data Hello) or certificate ─► authorize(action, volume)
//!  refusals ─► counted, logged and audited, rate-limited per source so a flood cannot fill
//!              the log; audit events ─► bounded queue ─► meta leader (meta::service shipper)
//! ```
//!
//! [`Access`] holds the few things these decisions need: the TLS context, the allow-lists,
//! this node's copy of the token table (fed by the meta state on meta nodes, by the map poll
//! elsewhere) and the audit queue. With security off (`security.off`) every caller is
//! [`Principal::Open`] and connections are plaintext.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use basalt_security::audit::{AuditEvent, Outcome};
use basalt_security::{Action, Denied, Dialer, Identity, PeerInfo, Principal, Protocol, TlsContext, TokenTable, authorize};
use tokio::sync::{mpsc, watch};
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::config::AllowLists;

/// Metadata a node adds when it forwards a request: the original caller's address.
pub const FORWARDED_SOURCE: &str = "x-basalt-source";
/// Metadata a node adds when it forwards a request: the original caller's certificate
/// identity (`node-3`, `client:ops`), when it authenticated by certificate.
pub const FORWARDED_PEER: &str = "x-basalt-peer";

/// How long a request carrying a token this node does not know yet waits for its token table
/// to catch up (a token created a moment ago on the meta leader).
const UNKNOWN_TOKEN_WAIT: Duration = Duration::from_secs(2);

/// Audit events queued for the meta leader at most; more are dropped (and counted).
const AUDIT_QUEUE: usize = 4096;

/// Where a request comes from: its peer, or — when the peer is a node that forwarded it, the
/// only kind of peer believed — the origin that node reported.
#[derive(Clone, Debug)]
pub struct Origin {
    /// The caller's address.
    pub source: String,
    /// The caller's certificate identity, if it presented a certificate.
    pub identity: Option<Identity>,
    /// Whether a node forwarded the request.
    pub forwarded: bool,
}

impl Origin {
    /// The origin of `request`.
    pub fn of<T>(request: &Request<T>) -> Origin {
        let peer = request.extensions().get::<PeerInfo>();
        let md = request.metadata();
        let via_node = matches!(peer.and_then(|p| p.identity.as_ref()), Some(Identity::Node(_)));
        match meta_str(md, FORWARDED_SOURCE) {
            Some(source) if via_node => Origin { source, identity: meta_str(md, FORWARDED_PEER).and_then(|p| p.parse().ok()), forwarded: true },
            _ => Origin {
                source: peer.map(|p| p.addr).or_else(|| request.remote_addr()).map(|a| a.to_string()).unwrap_or_else(|| "unknown".into()),
                identity: peer.and_then(|p| p.identity.clone()),
                forwarded: false,
            },
        }
    }

    /// The caller's IP address (unspecified if the source does not parse).
    pub fn ip(&self) -> IpAddr {
        source_ip(&self.source)
    }
}

/// The IP address of a `host:port` or bare address source (unspecified if neither).
fn source_ip(source: &str) -> IpAddr {
    source.parse::<SocketAddr>().map(|a| a.ip()).or_else(|_| source.parse::<IpAddr>()).unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

/// Who is calling, and from where.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The principal.
    pub principal: Principal,
    /// The original caller's address (through a forwarding node: the address it reported).
    pub source: String,
}

impl Caller {
    /// An audit event of this caller.
    pub fn event(&self, action: &str, target: &str, outcome: Outcome, detail: String) -> AuditEvent {
        AuditEvent {
            time_unix_ms: crate::meta::service::now_ms(),
            actor: self.principal.actor(),
            source: self.source.clone(),
            action: action.into(),
            target: target.into(),
            outcome,
            detail,
        }
    }
}

/// Counters of refusals, for `/metrics`.
#[derive(Default)]
pub struct AccessStats {
    /// Connections refused at accept or handshake, by listener (admin, data, raft, metrics, port).
    pub refused: Mutex<HashMap<(&'static str, &'static str), u64>>,
    /// Requests refused for credentials or permissions.
    pub denied: AtomicU64,
    /// Refusals not audited one by one (rate limit).
    pub audit_suppressed: AtomicU64,
    /// Audit events dropped because the queue to the meta leader was full.
    pub audit_dropped: AtomicU64,
    /// Certificate reloads that succeeded / failed.
    pub cert_reloads: AtomicU64,
    /// Certificate reloads that failed.
    pub cert_reload_errors: AtomicU64,
}

/// Per-source token buckets for refusal logging and auditing.
struct Limiter {
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl Limiter {
    /// Refusals recorded one by one per source: a burst of 30, then 5 per second (an operator
    /// fumbling tokens is recorded in full; a flood is summarised).
    const BURST: f64 = 30.0;
    /// Refill per second.
    const RATE: f64 = 5.0;

    fn allow(&mut self, ip: IpAddr) -> bool {
        if self.buckets.len() > 10_000 {
            // A flood from many addresses: forget them all rather than grow.
            self.buckets.clear();
        }
        let now = Instant::now();
        let (tokens, last) = self.buckets.entry(ip).or_insert((Self::BURST, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * Self::RATE).min(Self::BURST);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// This node's access control.
pub struct Access {
    tls: Option<Arc<TlsContext>>,
    allow: AllowLists,
    /// The token table and the cluster-map version it is from.
    tokens: watch::Sender<(u64, Arc<TokenTable>)>,
    /// The meta-role nodes (members and spares) and the cluster-map version they are from:
    /// the only nodes whose calls the meta leader alone makes are taken from.
    meta_nodes: watch::Sender<(u64, Arc<std::collections::BTreeSet<u64>>)>,
    audit: mpsc::Sender<AuditEvent>,
    limiter: Mutex<Limiter>,
    /// Refusal counters.
    pub stats: AccessStats,
}

impl Access {
    /// Access control with `tls` (`None`: security off) and `allow`; returns the receiving end
    /// of the audit queue for the shipper.
    pub fn new(tls: Option<Arc<TlsContext>>, allow: AllowLists) -> (Access, mpsc::Receiver<AuditEvent>) {
        let (audit, rx) = mpsc::channel(AUDIT_QUEUE);
        let access = Access {
            tls,
            allow,
            tokens: watch::channel((0, Arc::new(TokenTable::default()))).0,
            meta_nodes: watch::channel((0, Arc::new(Default::default()))).0,
            audit,
            limiter: Mutex::new(Limiter { buckets: HashMap::new() }),
            stats: AccessStats::default(),
        };
        (access, rx)
    }

    /// Whether security is on.
    pub fn enabled(&self) -> bool {
        self.tls.is_some()
    }

    /// The TLS context, if security is on.
    pub fn tls(&self) -> Option<&Arc<TlsContext>> {
        self.tls.as_ref()
    }

    /// A dialer for this node's outgoing connections (presenting its node certificate).
    pub fn dialer(&self) -> Dialer {
        Dialer::new(self.tls.clone())
    }

    /// Replaces this node's token table with `table`, from cluster-map version `version`,
    /// unless the table held is from a newer one. Meta nodes are fed by their applied meta
    /// state and by the map poll (a spare meta node has no meta state of its own).
    pub fn set_tokens(&self, version: u64, table: TokenTable) {
        self.tokens.send_if_modified(|current| {
            if version < current.0 {
                return false;
            }
            *current = (version, Arc::new(table));
            true
        });
    }

    /// Replaces the set of meta-role nodes with `nodes`, from cluster-map version `version`,
    /// unless the set held is from a newer one (fed like [`Access::set_tokens`]).
    pub fn set_meta_nodes(&self, version: u64, nodes: std::collections::BTreeSet<u64>) {
        self.meta_nodes.send_if_modified(|current| {
            if version < current.0 || *current.1 == nodes {
                return false;
            }
            *current = (version, Arc::new(nodes));
            true
        });
    }

    /// Authorises a call only the meta leader makes (key store, backup jobs, replica moves,
    /// leadership and release orders): a node certificate is not enough, the node must have
    /// the meta role in the current cluster map. A storage or backup node's certificate,
    /// stolen or misused, cannot read wrapped keys or order replicas about.
    pub async fn authorize_meta_call<T>(&self, request: &Request<T>, action: &'static str) -> Result<Caller, Status> {
        let caller = self.authorize(request, Action::Internal, None).await?;
        match caller.principal {
            Principal::Open => Ok(caller),
            Principal::Node(n) if self.meta_nodes.borrow().1.contains(&n) => Ok(caller),
            _ => {
                let denied =
                    Denied::permission(format!("{action} is called by the meta leader only; {} is not a meta node", caller.principal.actor()));
                self.record_denial(caller.principal.actor(), &caller.source, Action::Internal, action, &denied);
                Err(denied.status())
            }
        }
    }

    /// The current token table.
    pub fn tokens(&self) -> Arc<TokenTable> {
        self.tokens.borrow().1.clone()
    }

    /// Whether `ip` is in any allow-list of the node's port (checked at accept, before TLS).
    pub fn admit_address(&self, ip: IpAddr) -> bool {
        let a = &self.allow;
        a.admin.allows(ip) || a.data.allows(ip) || a.raft.allows(ip)
    }

    /// Whether `ip` may speak `protocol` (checked on the ClientHello, before key exchange).
    /// gRPC carries node-to-node calls too, so the Raft list admits it as well as the admin list.
    pub fn admit_protocol(&self, protocol: Protocol, ip: IpAddr) -> Result<(), String> {
        let a = &self.allow;
        let ok = match protocol {
            Protocol::Data => a.data.allows(ip),
            Protocol::Raft => a.raft.allows(ip),
            Protocol::Grpc => a.admin.allows(ip) || a.raft.allows(ip),
            Protocol::Http => return Err("metrics are served on the metrics port".into()),
        };
        if ok { Ok(()) } else { Err(format!("{ip} is not in the {} allow-list", protocol.as_str())) }
    }

    /// Whether `ip` may scrape metrics.
    pub fn admit_metrics(&self, ip: IpAddr) -> bool {
        self.allow.metrics.allows(ip)
    }

    /// Records a refused connection: counted always; logged and audited up to a rate per source.
    pub fn refuse_connection(&self, listener: &'static str, reason: &'static str, peer: SocketAddr, detail: &str) {
        *self.stats.refused.lock().unwrap_or_else(|p| p.into_inner()).entry((listener, reason)).or_default() += 1;
        if !self.limiter.lock().unwrap_or_else(|p| p.into_inner()).allow(peer.ip()) {
            self.stats.audit_suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        tracing::warn!(%peer, listener, "refused a connection: {detail}");
        self.record(AuditEvent {
            time_unix_ms: crate::meta::service::now_ms(),
            actor: "unauthenticated".into(),
            source: peer.to_string(),
            action: format!("connect.{listener}"),
            target: String::new(),
            outcome: Outcome::Denied,
            detail: detail.to_string(),
        });
    }

    /// Queues an audit event for the meta leader (dropped and counted if the queue is full).
    pub fn record(&self, event: AuditEvent) {
        if self.audit.try_send(event).is_err() {
            self.stats.audit_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records a refused request, rate-limited per source like refused connections.
    fn record_denial(&self, actor: String, source: &str, action: Action, target: &str, denied: &Denied) {
        self.stats.denied.fetch_add(1, Ordering::Relaxed);
        let ip = source_ip(source);
        if !self.limiter.lock().unwrap_or_else(|p| p.into_inner()).allow(ip) {
            self.stats.audit_suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        tracing::info!(%actor, source, action = action.as_str(), target, "refused: {}", denied.message);
        self.record(AuditEvent {
            time_unix_ms: crate::meta::service::now_ms(),
            actor,
            source: source.to_string(),
            action: action.as_str().into(),
            target: target.into(),
            outcome: Outcome::Denied,
            detail: denied.message.clone(),
        });
    }

    /// Authenticates a token, waiting briefly for the token table if it does not know the
    /// token's id yet.
    pub async fn authenticate_token(&self, token: &str, ip: IpAddr) -> Result<Principal, Denied> {
        let deadline = tokio::time::Instant::now() + UNKNOWN_TOKEN_WAIT;
        let mut rx = self.tokens.subscribe();
        loop {
            let result = rx.borrow_and_update().1.authenticate(token, ip, crate::meta::service::now_ms());
            match result {
                Err(d) if d.message.starts_with("unknown token") => {
                    if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                        return Err(d);
                    }
                }
                other => return other,
            }
        }
    }

    /// Re-checks a connection's principal against the current table (revocation, expiry).
    pub fn recheck(&self, principal: &Principal, ip: IpAddr) -> Result<Principal, Denied> {
        self.tokens.borrow().1.recheck(principal, ip, crate::meta::service::now_ms())
    }

    /// Who is calling a gRPC method: its bearer token, else its certificate ([`Origin`]).
    pub async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, (Denied, String)> {
        let origin = Origin::of(request);
        if !self.enabled() {
            return Ok(Caller { principal: Principal::Open, source: origin.source });
        }
        let principal = match basalt_security::grpc::bearer(request.metadata()) {
            Err(m) => Err(Denied::unauthenticated(m)),
            Ok(Some(token)) => self.authenticate_token(token, origin.ip()).await,
            Ok(None) => origin.identity.clone().map(Principal::from).ok_or_else(no_credentials),
        };
        match principal {
            Ok(principal) => Ok(Caller { principal, source: origin.source }),
            Err(d) => Err((d, origin.source)),
        }
    }

    /// Authenticates the caller of a request for `action` (on `volume`); a refusal is audited
    /// and comes back as `Unauthenticated`.
    pub async fn authenticate<T>(&self, request: &Request<T>, action: Action, volume: Option<&str>) -> Result<Caller, Status> {
        self.caller(request).await.map_err(|(denied, source)| {
            self.record_denial("unauthenticated".into(), &source, action, volume.unwrap_or(""), &denied);
            denied.status()
        })
    }

    /// Authenticates the caller and authorises `action` (on `volume`); refusals are audited and
    /// come back as `Unauthenticated` / `PermissionDenied`.
    pub async fn authorize<T>(&self, request: &Request<T>, action: Action, volume: Option<&str>) -> Result<Caller, Status> {
        let caller = self.authenticate(request, action, volume).await?;
        self.check(&caller, action, volume)?;
        Ok(caller)
    }

    /// Authorises `action` for a caller already authenticated; refusals are audited.
    pub fn check(&self, caller: &Caller, action: Action, volume: Option<&str>) -> Result<(), Status> {
        authorize(&caller.principal, action, volume).map_err(|denied| {
            self.record_denial(caller.principal.actor(), &caller.source, action, volume.unwrap_or(""), &denied);
            denied.status()
        })
    }

    /// Authorises a data request on a connection whose principal was authenticated at its
    /// Hello: re-checked against the current token table (revocation, expiry) first.
    pub fn check_data(&self, principal: &Principal, peer: SocketAddr, write: bool, volume: &str) -> Result<Principal, Denied> {
        let action = if write { Action::DataWrite } else { Action::DataRead };
        let current = self.recheck(principal, peer.ip());
        let result = current.and_then(|p| authorize(&p, action, Some(volume)).map(|()| p));
        if let Err(d) = &result {
            self.record_denial(principal.actor(), &peer.to_string(), action, volume, d);
        }
        result
    }

    /// Copies `request`'s credentials and [`Origin`] onto `to`, a request being forwarded to
    /// another node.
    pub fn forward_metadata<T>(request: &Request<T>, to: &mut MetadataMap) {
        let origin = Origin::of(request);
        if let Some(v) = request.metadata().get(basalt_security::grpc::AUTHORIZATION) {
            to.insert(basalt_security::grpc::AUTHORIZATION, v.clone());
        }
        if let Ok(v) = origin.source.parse() {
            to.insert(FORWARDED_SOURCE, v);
        }
        if let Some(Ok(v)) = origin.identity.map(|i| i.to_string().parse()) {
            to.insert(FORWARDED_PEER, v);
        }
    }
}

fn no_credentials() -> Denied {
    Denied::unauthenticated("no credentials: pass a token (--token-file, BASALT_TOKEN_FILE or BASALT_TOKEN)")
}

fn meta_str(md: &MetadataMap, key: &str) -> Option<String> {
    md.get(key).and_then(|v| v.to_str().ok()).map(str::to_string)
}

/// Re-reads the node's certificate and CA files when they change, until shutdown.
pub async fn run_cert_reloader(access: Arc<Access>, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let Some(tls) = access.tls.clone() else {
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let tls2 = tls.clone();
        match tokio::task::spawn_blocking(move || tls2.reload_if_changed()).await {
            Ok(Ok(true)) => {
                access.stats.cert_reloads.fetch_add(1, Ordering::Relaxed);
                let until = tls.own_certificate().map(|c| basalt_security::identity::format_unix(c.not_after)).unwrap_or_default();
                tracing::info!(valid_until = %until, "reloaded TLS certificate files; new connections use them");
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                access.stats.cert_reload_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "changed TLS files could not be loaded; keeping the certificate in use");
            }
            Err(e) => tracing::error!(error = %e, "certificate reload task failed"),
        }
    }
}
