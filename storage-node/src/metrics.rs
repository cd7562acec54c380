//! Prometheus metrics, served at `/metrics` on the configured address (OpenMetrics text
//! through `basalt-metrics`; every sample labelled with the node).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use basalt_metrics::{Exposition, Labels, OpFamilies, OpStats};
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

const DATA_FAMILIES: OpFamilies = OpFamilies {
    requests: ("basalt_data_requests_total", "Data requests served by this node as PG leader."),
    errors: ("basalt_data_errors_total", "Data requests that failed."),
    bytes: ("basalt_data_bytes_total", "Bytes written, read or zeroed."),
    latency: (
        "basalt_data_request_duration_seconds",
        "How long data requests took on this node as PG leader (op: write, read, zero = trim and write-zeroes), QoS waits included.",
    ),
};

/// Data-path counters (lock-free; read at scrape time).
#[derive(Default)]
pub struct Metrics {
    data: OpStats<3>,
    /// Series per volume (when the cluster turned them on).
    pub per_volume: PerVolume,
    /// Raft: commit latencies and what the groups on this node went through.
    pub raft: RaftStats,
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
    /// Bytes of the store on disk (at the last sweep).
    pub store_bytes: AtomicU64,
}

/// Most volumes a node keeps series of; requests to volumes beyond are counted under
/// `volume="(other)"`, so a node's series stay bounded whatever the cluster holds.
pub const MAX_VOLUME_SERIES: usize = 1024;

const VOLUME_FAMILIES: OpFamilies = OpFamilies {
    requests: ("basalt_data_volume_requests_total", "Data requests served by this node as PG leader, per volume (per-volume metrics on)."),
    errors: ("basalt_data_volume_errors_total", "Data requests that failed, per volume."),
    bytes: ("basalt_data_volume_bytes_total", "Bytes written, read or zeroed, per volume."),
    latency: (
        "basalt_data_volume_request_duration_seconds",
        "How long data requests took on this node as PG leader, per volume, QoS waits included.",
    ),
};

/// One volume's series on this node.
#[derive(Default)]
pub struct VolumeSeries {
    ops: OpStats<3>,
    throttled_nanos: AtomicU64,
}

/// Per-volume series, kept while the cluster has them on (`cluster configure
/// --per-volume-metrics on`); bounded by [`MAX_VOLUME_SERIES`].
#[derive(Default)]
pub struct PerVolume {
    series: std::sync::RwLock<std::collections::HashMap<basalt_common::VolumeId, Arc<VolumeSeries>>>,
    other: VolumeSeries,
}

impl PerVolume {
    fn of(&self, volume: basalt_common::VolumeId, f: impl FnOnce(&VolumeSeries)) {
        if let Some(s) = self.series.read().unwrap_or_else(|p| p.into_inner()).get(&volume) {
            return f(s);
        }
        let mut series = self.series.write().unwrap_or_else(|p| p.into_inner());
        if series.len() >= MAX_VOLUME_SERIES && !series.contains_key(&volume) {
            return f(&self.other);
        }
        f(series.entry(volume).or_default())
    }

    /// Records one request to `volume`.
    pub fn record(&self, volume: basalt_common::VolumeId, op: Op, bytes: u64, took: Duration, ok: bool) {
        self.of(volume, |s| s.ops.record(op as usize, bytes, took, ok));
    }

    /// A request to `volume` waited `waited` for its QoS limits.
    pub fn throttled(&self, volume: basalt_common::VolumeId, waited: Duration) {
        self.of(volume, |s| {
            s.throttled_nanos.fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
        });
    }

    /// Adds the per-volume families, named from `names` (volume id to name); forgets volumes no
    /// longer named there (deleted), and everything when `on` is false.
    fn expose(&self, e: &mut Exposition, on: bool, names: &std::collections::HashMap<basalt_common::VolumeId, String>) {
        let mut series = self.series.write().unwrap_or_else(|p| p.into_inner());
        if !on {
            series.clear();
            return;
        }
        series.retain(|v, _| names.contains_key(v));
        let mut sets: Vec<(String, &VolumeSeries)> = series.iter().map(|(v, s)| (names[v].clone(), s.as_ref())).collect();
        sets.sort_by(|a, b| a.0.cmp(&b.0));
        sets.push(("(other)".into(), &self.other));
        OpStats::expose_each(e, &VOLUME_FAMILIES, &OPS, sets.iter().map(|(n, s)| (vec![("volume", n.clone())], &s.ops)));
        e.counter_f64(
            "basalt_data_volume_throttled_seconds_total",
            "Time this node held requests to the volume back for its QoS limits.",
            sets.iter().map(|(n, s)| (vec![("volume", n.clone())], s.throttled_nanos.load(Ordering::Relaxed) as f64 / 1e9)).collect(),
        );
    }
}

/// The kinds of Raft group a node runs, as labelled.
#[derive(Clone, Copy, Debug)]
pub enum GroupKind {
    /// A placement group.
    Pg = 0,
    /// The meta group.
    Meta = 1,
}

const GROUP_KINDS: [&str; 2] = ["pg", "meta"];

/// Raft series: commit latency per kind of group, and elections and leader changes seen in
/// this node's groups. Openraft keeps no such counters; they are derived from each group's
/// term and leader, compared at every scrape with the previous one (an election is a term
/// increase; several leader changes between two scrapes count once).
#[derive(Default)]
pub struct RaftStats {
    commit: [basalt_metrics::Histogram; 2],
    seen: std::sync::Mutex<RaftSeen>,
}

#[derive(Default)]
struct RaftSeen {
    groups: std::collections::HashMap<(usize, u32), (u64, Option<u64>)>,
    elections: [u64; 2],
    leader_changes: [u64; 2],
}

impl RaftStats {
    /// A proposal on this node, as leader of a `kind` group, committed and applied in `took`.
    pub fn committed(&self, kind: GroupKind, took: Duration) {
        self.commit[kind as usize].observe(took);
    }

    /// Compares every group's term and leader with the last scrape's; returns the totals of
    /// elections and leader changes per kind.
    fn observe(&self, groups: impl Iterator<Item = (GroupKind, basalt_raft::GroupStatus)>) -> ([u64; 2], [u64; 2]) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut now = std::collections::HashMap::new();
        for (kind, st) in groups {
            let k = kind as usize;
            let key = (k, st.group);
            if let Some((term, leader)) = seen.groups.get(&key).copied() {
                seen.elections[k] += st.term.saturating_sub(term);
                if st.leader.is_some() && st.leader != leader {
                    seen.leader_changes[k] += 1;
                }
            }
            now.insert(key, (st.term, st.leader.or(seen.groups.get(&key).and_then(|g| g.1))));
        }
        seen.groups = now;
        (seen.elections, seen.leader_changes)
    }
}

impl Metrics {
    /// Records one request.
    pub fn record(&self, op: Op, bytes: u64, took: Duration, ok: bool) {
        self.data.record(op as usize, bytes, took, ok);
    }
}

fn one(v: u64) -> Vec<(Labels, u64)> {
    vec![(Vec::new(), v)]
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Renders every metric in the OpenMetrics text format.
pub fn render(ctx: &NodeCtx) -> String {
    let mut e = Exposition::default();
    let m = &ctx.metrics;
    m.data.expose(&mut e, &DATA_FAMILIES, &OPS);
    let (per_volume, names) = {
        let map = ctx.map.borrow();
        (map.per_volume_metrics, map.volumes.values().filter(|v| v.active).map(|v| (v.id, v.name.clone())).collect())
    };
    m.per_volume.expose(&mut e, per_volume, &names);
    let s = ctx.store.stats();
    e.gauge(
        "basalt_chunk_slots",
        "Chunk slots of the data file by state.",
        vec![
            (vec![("state", "total".into())], s.slots_total),
            (vec![("state", "mapped".into())], s.slots_mapped),
            (vec![("state", "pending_scrub".into())], s.slots_pending_scrub),
        ],
    )
    .gauge("basalt_scrub_pending_bytes", "Freed bytes waiting to be overwritten.", one(s.slots_pending_scrub * s.slot_size))
    .counter("basalt_scrub_overwritten_bytes_total", "Freed bytes overwritten.", one(get(&ctx.scrub.overwritten_bytes)))
    .counter("basalt_scrub_ranges_released_total", "Freed ranges overwritten and returned to the allocator.", one(get(&ctx.scrub.slots_released)))
    .counter("basalt_scrub_errors_total", "Failed overwrites (retried).", one(get(&ctx.scrub.errors)))
    .counter(
        "basalt_scrub_log_rewrites_total",
        "Rewrites of the Raft log's files that removed purged (freed) entries.",
        one(get(&ctx.scrub.log_scrubs)),
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
        e.counter(name, help, one(get(value)));
    }
    let running = integrity.running();
    e.gauge(
        "basalt_scrub_integrity_running",
        "1 while an integrity pass runs (kind label: local or deep).",
        vec![(running.map(|k| vec![("kind", k.as_str().to_string())]).unwrap_or_default(), u64::from(running.is_some()))],
    );
    let log = ctx.host.log_engine().stats();
    e.counter("basalt_raft_log_syncs_total", "Synced Raft log writes (group commits).", one(get(&log.batches)))
        .counter("basalt_raft_log_writes_total", "Raft log write requests carried by those syncs.", one(get(&log.requests)))
        .counter_f64(
            "basalt_raft_log_sync_seconds_total",
            "Time spent in synced Raft log writes.",
            vec![(Vec::new(), get(&log.sync_micros) as f64 / 1e6)],
        )
        .gauge(
            "basalt_raft_log_size_bytes",
            "Bytes of Raft log segment files in use (kept near raft.log_size_target).",
            one(ctx.host.log_engine().size_on_disk()),
        )
        .counter(
            "basalt_raft_log_segments_released_total",
            "Raft log segments released (overwritten with zeros, kept for reuse).",
            one(get(&log.segments_released)),
        )
        .counter(
            "basalt_raft_log_entries_carried_forward_total",
            "Live entries written again at the Raft log's head so its oldest segment could be released.",
            one(get(&log.entries_carried_forward)),
        )
        .gauge(
            "basalt_raft_log_waiting_for_space",
            "1 while a Raft log write waits for its filesystem to have space (this node's Raft groups stall).",
            one(u64::from(log.waiting_for_space.load(Ordering::Relaxed))),
        );
    let space = ctx.host.space();
    e.gauge(
        "basalt_state_room_bytes",
        "What the state directory's filesystem can still take beyond the reserve (writes needing more are refused).",
        one(space.local_state().unwrap_or(0)),
    );
    let a = &ctx.pgs.apply_stats;
    e.counter("basalt_pg_apply_batches_total", "State-machine apply calls.", one(get(&a.batches)))
        .counter("basalt_pg_apply_commands_total", "Commands applied.", one(get(&a.commands)))
        .counter_f64("basalt_pg_apply_seconds_total", "Time spent applying.", vec![(Vec::new(), get(&a.micros) as f64 / 1e6)])
        .gauge(
            "basalt_pg_applies_waiting_for_space",
            "PGs whose apply on this node waits for chunk space (admission let through more than fits; see pg::space).",
            one(get(&a.waiting_for_space)),
        )
        .counter("basalt_replicas_retired_total", "Replicas removed from this node after moving elsewhere.", one(get(&ctx.pgs.retired)))
        .counter(
            "basalt_rebuild_sent_bytes_total",
            "Snapshot bytes sent to fill new replicas (paced by heal.rebuild_rate).",
            one(get(&ctx.pgs.pacer.bytes)),
        );
    let statuses = ctx.pgs.statuses();
    e.gauge("basalt_pgs", "Placement groups hosted on this node.", one(statuses.len() as u64)).gauge(
        "basalt_pg_leaders",
        "Placement groups this node leads.",
        one(statuses.iter().filter(|s| s.is_leader).count() as u64),
    );
    let meta_status = ctx.meta.as_ref().map(|m| m.group.status());
    let groups = statuses.iter().cloned().map(|s| (GroupKind::Pg, s)).chain(meta_status.clone().map(|s| (GroupKind::Meta, s)));
    let (elections, leader_changes) = m.raft.observe(groups);
    let per_kind = |v: [u64; 2]| GROUP_KINDS.iter().zip(v).map(|(k, n)| (vec![("group", k.to_string())], n)).collect::<Vec<_>>();
    e.counter("basalt_raft_elections_total", "Elections in this node's Raft groups (term increases seen; group: pg or meta).", per_kind(elections))
        .counter("basalt_raft_leader_changes_total", "Leader changes seen in this node's Raft groups.", per_kind(leader_changes))
        .histogram(
            "basalt_raft_commit_duration_seconds",
            "Time from a proposal by this node as leader until the command was committed on a majority and applied.",
            GROUP_KINDS.iter().zip(&m.raft.commit).map(|(k, h)| (vec![("group", k.to_string())], h)).collect(),
        )
        .gauge(
            "basalt_raft_meta_leader",
            "1 on the meta group's leader (meta nodes only).",
            if meta_status.is_some() { one(u64::from(meta_status.as_ref().is_some_and(|s| s.is_leader))) } else { Vec::new() },
        );
    access_families(ctx, &mut e);
    if ctx.config.has(crate::meta::state::Role::Backup) {
        backup_node_families(&m.backup, &mut e);
    }
    let (throttled, waited) = m.qos.throttled();
    e.counter("basalt_qos_throttled_requests_total", "Data requests held back by a volume's QoS limits.", one(throttled)).counter_f64(
        "basalt_qos_throttled_seconds_total",
        "Time data requests waited for a volume's QoS limits.",
        vec![(Vec::new(), waited)],
    );
    let v = ctx.config.versions;
    e.gauge(
        "basalt_build_info",
        "1, labelled with this node's build: its package version and the cluster versions it speaks (min, max).",
        vec![(
            vec![
                ("version", env!("CARGO_PKG_VERSION").to_string()),
                ("cluster_version_min", v.min.to_string()),
                ("cluster_version_max", v.max.to_string()),
            ],
            1,
        )],
    );
    backup_catalog_families(ctx, &mut e);
    cluster_families(ctx, &mut e);
    e.render(vec![("node", ctx.config.id.0.to_string())])
}

/// A backup node's families.
fn backup_node_families(b: &BackupMetrics, e: &mut Exposition) {
    let outcome = |ok: &AtomicU64, failed: &AtomicU64| {
        vec![(vec![("outcome", "ok".to_string())], get(ok)), (vec![("outcome", "failed".to_string())], get(failed))]
    };
    e.counter("basalt_backup_copies_total", "Backup copies this node finished or failed (outcome label).", outcome(&b.copies_ok, &b.copies_failed))
        .counter("basalt_backup_read_bytes_total", "Bytes backup copies read from the cluster (changed chunks).", one(get(&b.bytes_read)))
        .counter("basalt_backup_stored_bytes_total", "Bytes of new backup pieces written.", one(get(&b.bytes_stored)))
        .counter(
            "basalt_backup_restores_total",
            "Restores this node finished or that stopped on an error (outcome label).",
            outcome(&b.restores_ok, &b.restores_failed),
        )
        .counter("basalt_backup_restored_bytes_total", "Bytes restores wrote into volumes.", one(get(&b.bytes_restored)))
        .gauge("basalt_backup_store_pieces", "Pieces in this node's backup store.", one(get(&b.store_pieces)))
        .gauge("basalt_backup_store_bytes", "Bytes on disk of this node's backup store.", one(get(&b.store_bytes)));
}

/// The backup catalog's families, from the meta leader only (every meta node holds the
/// catalog; one source keeps sums right): backups by state, and per volume the last complete
/// backup's time and duration.
fn backup_catalog_families(ctx: &NodeCtx, e: &mut Exposition) {
    let Some(meta) = ctx.meta.as_ref().filter(|m| m.group.status().is_leader) else { return };
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
    e.gauge(
        "basalt_backups",
        "Backups in the catalog by state.",
        ["running", "complete", "failed"].iter().zip(states).map(|(state, n)| (vec![("state", state.to_string())], n)).collect(),
    )
    .gauge_f64(
        "basalt_backup_last_success_timestamp_seconds",
        "When each volume's newest complete backup finished.",
        last.iter().map(|(volume, (at, _))| (vec![("volume", volume.clone())], *at as f64 / 1000.0)).collect(),
    )
    .gauge_f64(
        "basalt_backup_last_duration_seconds",
        "How long each volume's newest complete backup took.",
        last.iter().map(|(volume, (_, took))| (vec![("volume", volume.clone())], *took as f64 / 1000.0)).collect(),
    );
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
                            Response::builder().header("content-type", basalt_metrics::CONTENT_TYPE).body(Full::new(Bytes::from(render(&ctx))))
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

/// The cluster as the meta leader sees it (the meta leader only, so sums are not multiplied):
/// nodes and placement groups by state, space, volumes. What alerts and the dashboard's
/// overview are built on.
fn cluster_families(ctx: &NodeCtx, e: &mut Exposition) {
    let Some(meta) = ctx.meta.as_ref().filter(|m| m.group.status().is_leader) else { return };
    let views = ctx.liveness.pg_views();
    let (nodes, pgs, volumes, cluster_version) = meta.shared.with(|s| {
        let nodes: Vec<_> = s.nodes.keys().copied().collect();
        let pgs: Vec<(u32, usize)> = s.pgs.iter().map(|p| (p.id.0, p.replicas.len())).collect();
        (nodes, pgs, s.volumes.len() as u64, s.cluster_version)
    });
    let mut by_state = std::collections::BTreeMap::from([("up", 0u64), ("down", 0), ("unknown", 0)]);
    let (mut used, mut capacity) = (0u64, 0u64);
    for id in &nodes {
        *by_state.entry(ctx.liveness.state(*id).0).or_default() += 1;
        if let Some(n) = ctx.liveness.last_report(*id) {
            used += n.used_bytes;
            capacity += n.capacity_bytes;
        }
    }
    let mut pg_states = [("healthy", 0u64), ("degraded", 0), ("leaderless", 0)];
    for (id, replicas) in pgs {
        let v = views.get(&id).cloned().unwrap_or_default();
        let i = if v.leader == 0 {
            2
        } else if v.live.len() < replicas {
            1
        } else {
            0
        };
        pg_states[i].1 += 1;
    }
    e.gauge(
        "basalt_cluster_nodes",
        "Nodes by state as the meta leader sees them (up, down, unknown).",
        by_state.iter().map(|(s, n)| (vec![("state", s.to_string())], *n)).collect(),
    )
    .gauge(
        "basalt_cluster_pgs",
        "Placement groups by state: healthy, degraded (a replica down), leaderless (their I/O waits).",
        pg_states.iter().map(|(s, n)| (vec![("state", s.to_string())], *n)).collect(),
    )
    .gauge("basalt_cluster_used_bytes", "Bytes the storage nodes report used.", one(used))
    .gauge("basalt_cluster_capacity_bytes", "Bytes the storage nodes report they can hold.", one(capacity))
    .gauge("basalt_cluster_volumes", "Volumes in the cluster.", one(volumes))
    .gauge(
        "basalt_cluster_version",
        "The cluster version the cluster runs at (raised once every node speaks a newer one).",
        one(u64::from(cluster_version)),
    );
}

/// Families describing access control.
fn access_families(ctx: &NodeCtx, e: &mut Exposition) {
    let stats = &ctx.access.stats;
    let mut by_listener: Vec<(Labels, u64)> = {
        let refused = stats.refused.lock().unwrap_or_else(|p| p.into_inner());
        refused.iter().map(|((l, r), n)| (vec![("listener", l.to_string()), ("reason", r.to_string())], *n)).collect()
    };
    by_listener.sort();
    let cert_secs =
        ctx.access.tls().and_then(|t| t.own_certificate()).map(|c| (c.not_after - basalt_security::identity::unix_now()).max(0) as u64).unwrap_or(0);
    e.counter("basalt_connections_refused_total", "Connections refused at accept, handshake or authentication.", by_listener)
        .counter("basalt_requests_denied_total", "Requests refused for missing, bad or insufficient credentials.", one(get(&stats.denied)))
        .counter(
            "basalt_audit_events_suppressed_total",
            "Refusals recorded only in a summary (rate limit per source).",
            one(get(&stats.audit_suppressed)),
        )
        .counter("basalt_audit_events_dropped_total", "Audit events that could not reach the meta group.", one(get(&stats.audit_dropped)))
        .gauge("basalt_tls_certificate_expiry_seconds", "Seconds until this node's TLS certificate expires (0: none or expired).", one(cert_secs))
        .counter(
            "basalt_tls_reloads_total",
            "Certificate file reloads (result label).",
            vec![
                (vec![("result", "ok".to_string())], get(&stats.cert_reloads)),
                (vec![("result", "error".to_string())], get(&stats.cert_reload_errors)),
            ],
        );
}
