//! Prometheus metrics, served at `/metrics` on the configured address.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use crate::node::NodeCtx;

/// A data operation.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// Write.
    Write = 0,
    /// Read.
    Read = 1,
    /// Trim / write-zeroes.
    Zero = 2,
}

const OPS: [&str; 3] = ["write", "read", "zero"];

/// Data-path counters (lock-free; read at scrape time).
#[derive(Default)]
pub struct Metrics {
    requests: [AtomicU64; 3],
    errors: [AtomicU64; 3],
    bytes: [AtomicU64; 3],
    micros: [AtomicU64; 3],
    /// The backup node's counters (backup-role nodes).
    pub backup: Arc<BackupMetrics>,
    /// Per-volume QoS on this node (its throttling counters are exported here).
    pub qos: Arc<crate::qos::QosLimiter>,
}

/// A backup node's counters and its store's size.
#[derive(Debug, Default)]
pub struct BackupMetrics {
    /// Copies finished.
    pub copies_ok: AtomicU64,
    /// Copies failed.
    pub copies_failed: AtomicU64,
    /// Bytes read from the cluster by copies (changed chunks).
    pub bytes_read: AtomicU64,
    /// Bytes of new pieces written.
    pub bytes_stored: AtomicU64,
    /// Restores finished.
    pub restores_ok: AtomicU64,
    /// Restores stopped by an error.
    pub restores_failed: AtomicU64,
    /// Bytes written into volumes by restores.
    pub bytes_restored: AtomicU64,
    /// Pieces in the store (at the last sweep).
    pub store_pieces: AtomicU64,
    /// Bytes of pieces in the store (at the last sweep).
    pub store_bytes: AtomicU64,
}

impl Metrics {
    /// Records one request.
    pub fn record(&self, op: Op, bytes: u64, took: Duration, ok: bool) {
        let i = op as usize;
        self.requests[i].fetch_add(1, Ordering::Relaxed);
        self.micros[i].fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        if ok {
            self.bytes[i].fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Renders every metric in the Prometheus text format.
pub fn render(ctx: &NodeCtx) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let node = ctx.config.id.0;
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let sep = if labels.is_empty() { "" } else { "," };
            let _ = writeln!(out, "{name}{{node=\"{node}\"{sep}{labels}}} {v}");
        }
    };
    let per_op = |a: &[AtomicU64; 3]| OPS.iter().enumerate().map(|(i, op)| (format!("op=\"{op}\""), a[i].load(Ordering::Relaxed))).collect();
    let m = &ctx.metrics;
    family("basalt_data_requests_total", "counter", "Data requests served by this node as PG leader.", per_op(&m.requests));
    family("basalt_data_errors_total", "counter", "Data requests that failed.", per_op(&m.errors));
    family("basalt_data_bytes_total", "counter", "Bytes written, read or zeroed.", per_op(&m.bytes));
    family("basalt_data_latency_microseconds_total", "counter", "Sum of data request latencies.", per_op(&m.micros));
    let s = ctx.store.stats();
    family(
        "basalt_chunk_slots",
        "gauge",
        "Chunk slots of the data file by state.",
        vec![
            ("state=\"total\"".into(), s.slots_total),
            ("state=\"mapped\"".into(), s.slots_mapped),
            ("state=\"pending_scrub\"".into(), s.slots_pending_scrub),
        ],
    );
    family(
        "basalt_scrub_pending_bytes",
        "gauge",
        "Freed bytes waiting to be overwritten.",
        vec![(String::new(), s.slots_pending_scrub * s.slot_size)],
    );
    family(
        "basalt_scrub_overwritten_bytes_total",
        "counter",
        "Freed bytes overwritten.",
        vec![(String::new(), ctx.scrub.overwritten_bytes.load(Ordering::Relaxed))],
    );
    family(
        "basalt_scrub_ranges_released_total",
        "counter",
        "Freed ranges overwritten and returned to the allocator.",
        vec![(String::new(), ctx.scrub.slots_released.load(Ordering::Relaxed))],
    );
    family("basalt_scrub_errors_total", "counter", "Failed overwrites (retried).", vec![(String::new(), ctx.scrub.errors.load(Ordering::Relaxed))]);
    family(
        "basalt_scrub_log_rewrites_total",
        "counter",
        "Rewrites of the Raft log's files that removed purged (freed) entries.",
        vec![(String::new(), ctx.scrub.log_scrubs.load(Ordering::Relaxed))],
    );
    let integrity = &ctx.integrity;
    for (name, help, value) in [
        ("basalt_scrub_integrity_bytes_total", "Bytes read back and checked by integrity scrub passes.", &integrity.bytes_verified),
        ("basalt_scrub_integrity_passes_total", "Integrity scrub passes finished.", &integrity.passes_completed),
        ("basalt_scrub_corrupt_blocks_total", "Block copies found failing their checksum.", &integrity.corrupt_found),
        (
            "basalt_scrub_divergent_blocks_total",
            "Block copies found differing from the other replicas with a valid checksum.",
            &integrity.divergent_found,
        ),
        ("basalt_scrub_repairs_issued_total", "Block repairs this node's checks proposed.", &integrity.repairs_issued),
        ("basalt_scrub_blocks_repaired_total", "Blocks of this node rewritten from a healthy replica.", &integrity.blocks_repaired),
        ("basalt_scrub_unrepairable_blocks_total", "Bad blocks no healthy replica could vouch for.", &integrity.unrepairable),
        ("basalt_scrub_integrity_check_errors_total", "Chunk checks that failed (replica unreachable, I/O error).", &integrity.check_errors),
    ] {
        family(name, "counter", help, vec![(String::new(), value.load(Ordering::Relaxed))]);
    }
    family(
        "basalt_scrub_integrity_running",
        "gauge",
        "1 while an integrity pass runs (kind label: local or deep).",
        vec![(integrity.running().map(|k| format!("kind=\"{}\"", k.as_str())).unwrap_or_default(), u64::from(integrity.running().is_some()))],
    );
    let log = ctx.host.log_engine().stats();
    family(
        "basalt_raft_log_syncs_total",
        "counter",
        "Synced Raft log writes (group commits).",
        vec![(String::new(), log.batches.load(Ordering::Relaxed))],
    );
    family(
        "basalt_raft_log_writes_total",
        "counter",
        "Raft log write requests carried by those syncs.",
        vec![(String::new(), log.requests.load(Ordering::Relaxed))],
    );
    family(
        "basalt_raft_log_sync_microseconds_total",
        "counter",
        "Time spent in synced Raft log writes.",
        vec![(String::new(), log.sync_micros.load(Ordering::Relaxed))],
    );
    family(
        "basalt_raft_log_size_bytes",
        "gauge",
        "Bytes of Raft log segment files in use (kept near raft.log_size_target).",
        vec![(String::new(), ctx.host.log_engine().size_on_disk())],
    );
    family(
        "basalt_raft_log_segments_released_total",
        "counter",
        "Raft log segments released (overwritten with zeros, kept for reuse).",
        vec![(String::new(), log.segments_released.load(Ordering::Relaxed))],
    );
    family(
        "basalt_raft_log_entries_carried_forward_total",
        "counter",
        "Live entries written again at the Raft log's head so its oldest segment could be released.",
        vec![(String::new(), log.entries_carried_forward.load(Ordering::Relaxed))],
    );
    family(
        "basalt_raft_log_waiting_for_space",
        "gauge",
        "1 while a Raft log write waits for its filesystem to have space (this node's Raft groups stall).",
        vec![(String::new(), u64::from(log.waiting_for_space.load(Ordering::Relaxed)))],
    );
    let space = ctx.host.space();
    family(
        "basalt_state_room_bytes",
        "gauge",
        "What the state directory's filesystem can still take beyond the reserve (writes needing more are refused).",
        vec![(String::new(), space.local_state().unwrap_or(0))],
    );
    let a = &ctx.pgs.apply_stats;
    family("basalt_pg_apply_batches_total", "counter", "State-machine apply calls.", vec![(String::new(), a.batches.load(Ordering::Relaxed))]);
    family("basalt_pg_apply_commands_total", "counter", "Commands applied.", vec![(String::new(), a.commands.load(Ordering::Relaxed))]);
    family("basalt_pg_apply_microseconds_total", "counter", "Time spent applying.", vec![(String::new(), a.micros.load(Ordering::Relaxed))]);
    family(
        "basalt_pg_applies_waiting_for_space",
        "gauge",
        "PGs whose apply on this node waits for chunk space (admission let through more than fits; see pg::space).",
        vec![(String::new(), a.waiting_for_space.load(Ordering::Relaxed))],
    );
    family(
        "basalt_replicas_retired_total",
        "counter",
        "Replicas removed from this node after moving elsewhere.",
        vec![(String::new(), ctx.pgs.retired.load(Ordering::Relaxed))],
    );
    family(
        "basalt_rebuild_sent_bytes_total",
        "counter",
        "Snapshot bytes sent to fill new replicas (paced by heal.rebuild_rate).",
        vec![(String::new(), ctx.pgs.pacer.bytes.load(Ordering::Relaxed))],
    );
    let statuses = ctx.pgs.statuses();
    family("basalt_pgs", "gauge", "Placement groups hosted on this node.", vec![(String::new(), statuses.len() as u64)]);
    family(
        "basalt_pg_leaders",
        "gauge",
        "Placement groups this node leads.",
        vec![(String::new(), statuses.iter().filter(|s| s.is_leader).count() as u64)],
    );
    for (name, kind, help, samples) in access_families(ctx) {
        family(name, kind, help, samples);
    }
    if ctx.config.has(crate::meta::state::Role::Backup) {
        for (name, kind, help, samples) in backup_node_families(&m.backup) {
            family(name, kind, help, samples);
        }
    }
    let (throttled, waited) = m.qos.throttled();
    let _ = writeln!(out, "# HELP basalt_qos_throttled_requests_total Data requests held back by a volume's QoS limits.");
    let _ = writeln!(out, "# TYPE basalt_qos_throttled_requests_total counter");
    let _ = writeln!(out, "basalt_qos_throttled_requests_total{{node=\"{node}\"}} {throttled}");
    let _ = writeln!(out, "# HELP basalt_qos_throttled_seconds_total Time data requests waited for a volume's QoS limits.");
    let _ = writeln!(out, "# TYPE basalt_qos_throttled_seconds_total counter");
    let _ = writeln!(out, "basalt_qos_throttled_seconds_total{{node=\"{node}\"}} {waited:.6}");
    backup_catalog_families(ctx, &mut out);
    out
}

/// A backup node's families.
fn backup_node_families(b: &BackupMetrics) -> Vec<Family> {
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    vec![
        (
            "basalt_backup_copies_total",
            "counter",
            "Backup copies this node finished or failed (outcome label).",
            vec![("outcome=\"ok\"".into(), get(&b.copies_ok)), ("outcome=\"failed\"".into(), get(&b.copies_failed))],
        ),
        (
            "basalt_backup_read_bytes_total",
            "counter",
            "Bytes backup copies read from the cluster (changed chunks).",
            vec![(String::new(), get(&b.bytes_read))],
        ),
        ("basalt_backup_stored_bytes_total", "counter", "Bytes of new backup pieces written.", vec![(String::new(), get(&b.bytes_stored))]),
        (
            "basalt_backup_restores_total",
            "counter",
            "Restores this node finished or that stopped on an error (outcome label).",
            vec![("outcome=\"ok\"".into(), get(&b.restores_ok)), ("outcome=\"failed\"".into(), get(&b.restores_failed))],
        ),
        ("basalt_backup_restored_bytes_total", "counter", "Bytes restores wrote into volumes.", vec![(String::new(), get(&b.bytes_restored))]),
        ("basalt_backup_store_pieces", "gauge", "Pieces in this node's backup store.", vec![(String::new(), get(&b.store_pieces))]),
        ("basalt_backup_store_bytes", "gauge", "Bytes on disk of this node's backup store.", vec![(String::new(), get(&b.store_bytes))]),
    ]
}

/// The backup catalog's families, from the meta leader only (every meta node holds the
/// catalog; one source keeps sums right): backups by state, and per volume the last complete
/// backup's time and duration.
fn backup_catalog_families(ctx: &NodeCtx, out: &mut String) {
    use std::fmt::Write;
    let Some(meta) = ctx.meta.as_ref().filter(|m| m.group.status().is_leader) else { return };
    let node = ctx.config.id.0;
    let (states, last) = meta.shared.with(|s| {
        let mut states = [0u64; 3];
        let mut last: std::collections::BTreeMap<String, (u64, u64)> = std::collections::BTreeMap::new();
        for b in s.backups.records.values() {
            use crate::meta::backups::BackupState;
            let i = match b.state {
                BackupState::Running => 0,
                BackupState::Complete => 1,
                BackupState::Failed(_) => 2,
            };
            states[i] += 1;
            if b.state == BackupState::Complete {
                let took = b.finished_unix_ms.saturating_sub(b.created_unix_ms);
                let e = last.entry(b.volume_name.clone()).or_insert((0, 0));
                if b.finished_unix_ms > e.0 {
                    *e = (b.finished_unix_ms, took);
                }
            }
        }
        (states, last)
    });
    let _ = writeln!(out, "# HELP basalt_backups Backups in the catalog by state.\n# TYPE basalt_backups gauge");
    for (state, n) in ["running", "complete", "failed"].iter().zip(states) {
        let _ = writeln!(out, "basalt_backups{{node=\"{node}\",state=\"{state}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP basalt_backup_last_success_timestamp_seconds When each volume's newest complete backup finished.\n# TYPE basalt_backup_last_success_timestamp_seconds gauge"
    );
    for (volume, (at, _)) in &last {
        let _ = writeln!(out, "basalt_backup_last_success_timestamp_seconds{{node=\"{node}\",volume=\"{volume}\"}} {}", *at as f64 / 1000.0);
    }
    let _ = writeln!(
        out,
        "# HELP basalt_backup_last_duration_seconds How long each volume's newest complete backup took.\n# TYPE basalt_backup_last_duration_seconds gauge"
    );
    for (volume, (_, took)) in &last {
        let _ = writeln!(out, "basalt_backup_last_duration_seconds{{node=\"{node}\",volume=\"{volume}\"}} {}", *took as f64 / 1000.0);
    }
}

/// Serves `/metrics` until shutdown: HTTPS with security on, to a client certificate of the
/// cluster CA or a bearer token allowed to read metrics, from addresses in `security.allow.metrics`.
pub async fn serve(ctx: Arc<NodeCtx>, listener: tokio::net::TcpListener, mut shutdown: watch::Receiver<bool>) {
    while let Some((tcp, peer)) = crate::listener::accept(&listener, &mut shutdown, "metrics").await {
        let access = ctx.access.clone();
        if !access.admit_metrics(peer.ip()) {
            access.refuse_connection("metrics", "allow-list", peer, &format!("{} is not in the metrics allow-list", peer.ip()));
            continue;
        }
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let (stream, identity) = match access.tls().cloned() {
                None => (basalt_security::stream::Stream::Plain(tcp), None),
                Some(tls) => {
                    let admit = |p| {
                        if p == basalt_security::Protocol::Http { Ok(()) } else { Err("this is the metrics port; it speaks HTTP/1.1".to_string()) }
                    };
                    match tls.accept(tcp, admit).await {
                        Ok(a) => (basalt_security::stream::Stream::Tls(Box::new(a.stream)), a.identity),
                        Err(e) => {
                            access.refuse_connection("metrics", crate::listener::refusal_reason(&e), peer, &e.to_string());
                            return;
                        }
                    }
                }
            };
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (ctx, identity) = (ctx.clone(), identity.clone());
                async move {
                    let resp = match authorize_scrape(&ctx, &req, identity, peer).await {
                        Err((status, why)) => Response::builder().status(status).body(Full::new(Bytes::from(format!("{why}\n")))),
                        Ok(()) if req.uri().path() == "/metrics" => {
                            Response::builder().header("content-type", "text/plain; version=0.0.4").body(Full::new(Bytes::from(render(&ctx))))
                        }
                        Ok(()) => Response::builder().status(StatusCode::NOT_FOUND).body(Full::new(Bytes::from_static(b"try /metrics\n"))),
                    };
                    resp.map_err(|e| std::io::Error::other(e.to_string()))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// A scrape is allowed with a certificate of the cluster CA or a token whose role reads metrics.
async fn authorize_scrape(
    ctx: &NodeCtx,
    req: &Request<hyper::body::Incoming>,
    identity: Option<basalt_security::Identity>,
    peer: std::net::SocketAddr,
) -> Result<(), (StatusCode, String)> {
    use basalt_security::{Action, Principal};
    if !ctx.access.enabled() {
        return Ok(());
    }
    let bearer = req.headers().get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let principal = match (bearer, identity) {
        (Some(token), _) => ctx.access.authenticate_token(token.trim(), peer.ip()).await,
        (None, Some(identity)) => Ok(Principal::from(identity)),
        (None, None) => Err(basalt_security::Denied::unauthenticated("no credentials: present a client certificate or a bearer token")),
    };
    let result = principal.and_then(|p| basalt_security::authorize(&p, Action::Metrics, None).map(|()| p));
    result.map(|_| ()).map_err(|d| {
        ctx.access.refuse_connection("metrics", "credentials", peer, &d.message);
        (if d.unauthenticated { StatusCode::UNAUTHORIZED } else { StatusCode::FORBIDDEN }, d.message)
    })
}

/// A metric family: name, type, help, samples (labels, value).
type Family = (&'static str, &'static str, &'static str, Vec<(String, u64)>);

/// Families describing access control.
fn access_families(ctx: &NodeCtx) -> Vec<Family> {
    let stats = &ctx.access.stats;
    let refused = stats.refused.lock().unwrap_or_else(|p| p.into_inner());
    let mut by_listener: Vec<(String, u64)> = refused.iter().map(|((l, r), n)| (format!("listener=\"{l}\",reason=\"{r}\""), *n)).collect();
    by_listener.sort();
    let cert_days =
        ctx.access.tls().and_then(|t| t.own_certificate()).map(|c| (c.not_after - basalt_security::identity::unix_now()).max(0) as u64).unwrap_or(0);
    vec![
        ("basalt_connections_refused_total", "counter", "Connections refused at accept, handshake or authentication.", by_listener),
        (
            "basalt_requests_denied_total",
            "counter",
            "Requests refused for missing, bad or insufficient credentials.",
            vec![(String::new(), stats.denied.load(Ordering::Relaxed))],
        ),
        (
            "basalt_audit_events_suppressed_total",
            "counter",
            "Refusals recorded only in a summary (rate limit per source).",
            vec![(String::new(), stats.audit_suppressed.load(Ordering::Relaxed))],
        ),
        (
            "basalt_audit_events_dropped_total",
            "counter",
            "Audit events that could not reach the meta group.",
            vec![(String::new(), stats.audit_dropped.load(Ordering::Relaxed))],
        ),
        (
            "basalt_tls_certificate_expiry_seconds",
            "gauge",
            "Seconds until this node's TLS certificate expires (0: none or expired).",
            vec![(String::new(), cert_days)],
        ),
        (
            "basalt_tls_reloads_total",
            "counter",
            "Certificate file reloads (result label).",
            vec![
                ("result=\"ok\"".into(), stats.cert_reloads.load(Ordering::Relaxed)),
                ("result=\"error\"".into(), stats.cert_reload_errors.load(Ordering::Relaxed)),
            ],
        ),
    ]
}
