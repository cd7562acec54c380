//! Per-volume QoS where it cannot be bypassed: on the PG leaders, which every read and write
//! of a volume passes through whichever connection or attachment sent it.
//!
//! Each node holds a volume to its share of the limits. Nodes tell the meta leader in their
//! heartbeat how many requests (and bytes) of each limited volume reached them since the
//! previous one; the leader answers each with its share: its part of all the volume's
//! requests lately ([`QosActivity`]). A client spreads its requests over the nodes by where
//! the blocks live, not by how fast each node answers, so these parts are the ones the whole
//! limit is used at, whatever the skew. Until a node hears, it takes an equal share with every
//! storage node, so the shares add up to at most the limits, plus a short overlap while a node
//! joins a volume's traffic.
//!
//! A token bucket per volume and dimension (operations, bytes), filled at the share's rate up
//! to the burst allowance. A request takes its tokens at once, going into debt if it must,
//! and waits out the debt: throttled requests wait in arrival order and never fail.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use basalt_common::qos::QosLimits;
use basalt_common::{NodeId, VolumeId};

/// How long a node's buckets of a volume without requests are kept (and its debt with them).
const KEEP_IDLE: Duration = Duration::from_secs(10);

/// The longest one request is held. A client gives a connection up when nothing comes back for
/// 3 s (`volume-client`'s `STALL_AFTER`) and sends the request again; a hold far below that
/// keeps replies flowing on every connection whatever the limit. Past it the request goes
/// (its tokens are still taken): a queue deeper than the limit allows in a second gets up to
/// its depth a second until the shares settle, never an error.
pub const MAX_HOLD: Duration = Duration::from_secs(1);

/// A node's share of a volume's limits: fractions of its operations and of its bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Share {
    /// Of the operations a second.
    pub ops: f64,
    /// Of the bytes a second.
    pub bytes: f64,
}

/// One token bucket: `tokens` at `at`; negative is debt that requests are waiting out.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes `amount` at `rate` a second with room for `cap`; returns how long the taker
    /// waits.
    fn take(&mut self, now: Instant, rate: f64, cap: f64, amount: f64) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(cap);
        self.at = now;
        // Debt beyond what `MAX_HOLD` pays off is not carried: requests past it go anyway.
        self.tokens = (self.tokens - amount).max(-rate * MAX_HOLD.as_secs_f64());
        if self.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-self.tokens / rate).min(MAX_HOLD) }
    }
}

#[derive(Debug)]
struct VolumeBuckets {
    ops: Bucket,
    bytes: Bucket,
    last: Instant,
    /// Requests and bytes since the last heartbeat.
    arrived_ops: u64,
    arrived_bytes: u64,
}

/// A storage node's QoS state: buckets of the limited volumes it serves, and its shares.
#[derive(Debug, Default)]
pub struct QosLimiter {
    volumes: Mutex<HashMap<VolumeId, VolumeBuckets>>,
    /// This node's shares, as the meta leader last said.
    shares: Mutex<HashMap<VolumeId, Share>>,
    /// Requests that waited, and the time they waited (nanoseconds).
    throttled: AtomicU64,
    throttled_ns: AtomicU64,
}

impl QosLimiter {
    /// Holds a request of `bytes` to `volume`'s `limits` (`storage_nodes`: the share to
    /// assume before the meta leader says): waits its turn, never refuses. Returns the wait.
    pub async fn admit(&self, volume: VolumeId, limits: QosLimits, bytes: u64, storage_nodes: u32) -> Duration {
        let wait = self.reserve(volume, limits, bytes, storage_nodes, Instant::now());
        if !wait.is_zero() {
            self.throttled.fetch_add(1, Ordering::Relaxed);
            self.throttled_ns.fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
        }
        wait
    }

    /// Takes the request's tokens at `now`; how long it must wait.
    fn reserve(&self, volume: VolumeId, limits: QosLimits, bytes: u64, storage_nodes: u32, now: Instant) -> Duration {
        if limits.is_unlimited() {
            return Duration::ZERO;
        }
        let equal = 1.0 / f64::from(storage_nodes.max(1));
        let share = self.shares.lock().unwrap_or_else(|p| p.into_inner()).get(&volume).copied().unwrap_or(Share { ops: equal, bytes: equal });
        let burst = limits.burst_ms as f64 / 1000.0;
        let mut volumes = self.volumes.lock().unwrap_or_else(|p| p.into_inner());
        // A volume seen for the first time (or again after a while) starts with its burst.
        let v = volumes.entry(volume).or_insert_with(|| VolumeBuckets {
            ops: Bucket { tokens: limits.iops as f64 * share.ops * burst, at: now },
            bytes: Bucket { tokens: limits.bps as f64 * share.bytes * burst, at: now },
            last: now,
            arrived_ops: 0,
            arrived_bytes: 0,
        });
        // New limits or a new share apply from now (the rates below): allowance above the new
        // burst is dropped by the cap, debt carries over.
        v.arrived_ops += 1;
        v.arrived_bytes += bytes;
        v.last = now;
        let mut wait = Duration::ZERO;
        // A share too small to pass one request a minute is a node that saw none lately.
        if limits.iops != 0 {
            let rate = (limits.iops as f64 * share.ops).max(1.0 / 60.0);
            wait = wait.max(v.ops.take(now, rate, (rate * burst).max(1.0), 1.0));
        }
        if limits.bps != 0 {
            let rate = (limits.bps as f64 * share.bytes).max(1.0);
            wait = wait.max(v.bytes.take(now, rate, (rate * burst).max(bytes as f64), bytes as f64));
        }
        wait
    }

    /// The requests and bytes of each limited volume since the last call (for the heartbeat);
    /// forgets volumes idle for a while.
    pub fn demand(&self) -> Vec<(VolumeId, u64, u64)> {
        let now = Instant::now();
        let mut volumes = self.volumes.lock().unwrap_or_else(|p| p.into_inner());
        volumes.retain(|_, v| now.saturating_duration_since(v.last) < KEEP_IDLE);
        volumes
            .iter_mut()
            .filter(|(_, v)| v.arrived_ops > 0)
            .map(|(id, v)| (*id, std::mem::take(&mut v.arrived_ops), std::mem::take(&mut v.arrived_bytes)))
            .collect()
    }

    /// The meta leader's answer: this node's share of each volume it reported.
    pub fn set_shares(&self, shares: impl IntoIterator<Item = (VolumeId, Share)>) {
        *self.shares.lock().unwrap_or_else(|p| p.into_inner()) = shares.into_iter().collect();
    }

    /// Requests that waited, and their total wait in seconds.
    pub fn throttled(&self) -> (u64, f64) {
        (self.throttled.load(Ordering::Relaxed), self.throttled_ns.load(Ordering::Relaxed) as f64 / 1e9)
    }
}

/// The meta leader's view of where each limited volume's requests go (from heartbeats; not
/// replicated: a new leader knows within a heartbeat).
#[derive(Debug, Default)]
pub struct QosActivity {
    seen: Mutex<HashMap<VolumeId, Seen>>,
}

/// Reports of one volume, and when the first of this run of them came.
#[derive(Debug)]
struct Seen {
    since: Instant,
    nodes: HashMap<NodeId, Report>,
}

/// How long after a volume's first report the leader hands out shares: by then every node
/// serving it has reported (heartbeats are a second apart), so the shares add up to one; until
/// then each node keeps its equal share.
const SETTLE: Duration = Duration::from_millis(1200);

/// A node's last report of a volume: when, requests, bytes.
type Report = (Instant, u64, u64);

/// How long a node's report counts.
const REPORT_COUNTS: Duration = Duration::from_millis(2500);

impl QosActivity {
    /// Node `node` saw `demand` (volume, requests, bytes) since its previous report; returns
    /// its share of each of those volumes.
    pub fn report(&self, node: NodeId, demand: &[(VolumeId, u64, u64)]) -> Vec<(VolumeId, Share)> {
        self.report_at(node, demand, Instant::now())
    }

    fn report_at(&self, node: NodeId, demand: &[(VolumeId, u64, u64)], now: Instant) -> Vec<(VolumeId, Share)> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, s| {
            s.nodes.retain(|_, (at, _, _)| now.saturating_duration_since(*at) < REPORT_COUNTS);
            !s.nodes.is_empty()
        });
        for (v, ops, bytes) in demand {
            seen.entry(*v).or_insert_with(|| Seen { since: now, nodes: HashMap::new() }).nodes.insert(node, (now, *ops, *bytes));
        }
        demand
            .iter()
            .filter(|(v, _, _)| seen.get(v).is_some_and(|s| now.saturating_duration_since(s.since) >= SETTLE))
            .map(|(v, ops, bytes)| {
                let nodes = seen.get(v).map(|s| s.nodes.values().map(|(_, o, b)| (*o, *b)).collect::<Vec<_>>()).unwrap_or_default();
                let part = |mine: u64, all: Vec<u64>| {
                    // Smoothed, so a node with few requests keeps a little of the limit.
                    let total: u64 = all.iter().sum();
                    let floor = (total as f64 * 0.02).max(1.0);
                    (mine as f64 + floor) / all.iter().map(|x| *x as f64 + floor).sum::<f64>()
                };
                let share = Share { ops: part(*ops, nodes.iter().map(|n| n.0).collect()), bytes: part(*bytes, nodes.iter().map(|n| n.1).collect()) };
                (*v, share)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: VolumeId = VolumeId(7);

    /// Requests admitted in `secs` seconds when each is sent as soon as the previous one's
    /// wait is over.
    fn admitted(l: &QosLimiter, limits: QosLimits, share: u32, secs: f64, bytes: u64) -> u64 {
        let start = Instant::now();
        let mut at = start;
        let mut n = 0;
        loop {
            let wait = l.reserve(V, limits, bytes, share, at);
            at += wait;
            if at.duration_since(start).as_secs_f64() > secs {
                return n;
            }
            n += 1;
        }
    }

    #[test]
    fn a_volume_gets_its_limit_plus_its_burst_and_waits_in_turn() {
        let limits = QosLimits { iops: 500, bps: 0, burst_ms: 1000 };
        let l = QosLimiter::default();
        // Idle at first: the burst (500) at once, then 500 a second.
        let n = admitted(&l, limits, 1, 10.0, 4096);
        assert!((5490..=5510).contains(&n), "{n}");
        // Unlimited volumes never wait.
        assert_eq!(l.reserve(VolumeId(8), QosLimits::UNLIMITED, 1 << 20, 1, Instant::now()), Duration::ZERO);
    }

    #[test]
    fn a_node_is_held_to_its_share_of_the_limit() {
        let limits = QosLimits { iops: 600, bps: 0, burst_ms: 0 };
        let l = QosLimiter::default();
        // Before the leader says: every one of three storage nodes might serve it.
        let n = admitted(&l, limits, 3, 10.0, 4096);
        assert!((1990..=2010).contains(&n), "a third of 600 a second: {n}");
        // The leader says this node gets 70% of the volume's requests: 70% of the limit.
        let l = QosLimiter::default();
        l.set_shares([(V, Share { ops: 0.7, bytes: 0.7 })]);
        let n = admitted(&l, limits, 3, 10.0, 4096);
        assert!((4190..=4210).contains(&n), "{n}");
        // What it reports for the next heartbeat, once.
        let demand = l.demand();
        assert_eq!(demand.len(), 1);
        assert_eq!((demand[0].0, demand[0].2), (V, demand[0].1 * 4096));
        assert!(l.demand().is_empty());
    }

    #[test]
    fn bandwidth_limits_hold_large_requests_too() {
        let limits = QosLimits { iops: 0, bps: 8 << 20, burst_ms: 0 };
        let l = QosLimiter::default();
        // 1 MiB requests at 8 MiB/s: 8 a second; one larger than the bucket still passes.
        let n = admitted(&l, limits, 1, 10.0, 1 << 20);
        assert!((79..=81).contains(&n), "{n}");
        let wait = l.reserve(V, limits, 32 << 20, 1, Instant::now() + Duration::from_secs(60));
        assert!(wait < Duration::from_secs(5), "{wait:?}");
    }

    #[test]
    fn the_leader_shares_a_volume_by_where_its_requests_go() {
        let a = QosActivity::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Until every node serving it has had a heartbeat to report, each keeps its equal share.
        assert_eq!(a.report_at(NodeId(1), &[(V, 700, 700 << 12)], at(0)), vec![]);
        assert_eq!(a.report_at(NodeId(2), &[(V, 300, 300 << 12)], at(500)), vec![]);
        let alone = a.report_at(NodeId(3), &[(VolumeId(9), 5, 0)], at(1300));
        assert_eq!(alone, vec![], "volume 9 is new");
        let shares = a.report_at(NodeId(2), &[(V, 300, 300 << 12), (VolumeId(9), 5, 0)], at(1500));
        let (v, s) = shares[0];
        assert_eq!(v, V);
        assert!((s.ops - 0.3).abs() < 0.02 && (s.bytes - 0.3).abs() < 0.02, "{s:?}");
        // Shares of one moment add up to the whole.
        let again = a.report_at(NodeId(1), &[(V, 700, 700 << 12)], at(1600));
        assert!((again[0].1.ops + s.ops - 1.0).abs() < 1e-9, "{again:?} {s:?}");
        // Volume 9 is served by nodes 2 and 3; once node 2's report is stale, node 3 alone
        // gets it all.
        let both = a.report_at(NodeId(3), &[(VolumeId(9), 5, 0)], at(2600));
        assert!((both[0].1.ops - 0.5).abs() < 1e-9, "{both:?}");
        let nine = a.report_at(NodeId(3), &[(VolumeId(9), 5, 0)], at(4050));
        assert_eq!(nine, vec![(VolumeId(9), Share { ops: 1.0, bytes: 1.0 })], "node 2's report of it is stale");
        assert_eq!(a.report_at(NodeId(3), &[], at(4100)), vec![]);
    }

    #[test]
    fn no_request_is_held_past_the_clients_patience() {
        let limits = QosLimits { iops: 10, bps: 0, burst_ms: 0 };
        let l = QosLimiter::default();
        // A hundred requests at once against 10 a second: the first ones wait their turn, none
        // longer than MAX_HOLD.
        let now = Instant::now();
        let waits: Vec<Duration> = (0..100).map(|_| l.reserve(V, limits, 4096, 1, now)).collect();
        assert_eq!(waits[0], Duration::from_millis(100));
        assert!(waits.iter().all(|w| *w <= MAX_HOLD), "{waits:?}");
        assert_eq!(*waits.last().unwrap(), MAX_HOLD);
    }
}
