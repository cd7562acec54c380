//! Connections an NBD listener refused (outside its allow-list, a failed TLS handshake), sent
//! to the cluster's audit log as the attach process's own reports.
//!
//! The listener never waits on the cluster: it drops a refusal into a bounded queue and moves
//! on. The reporter sends each source at most once per [`PER_SOURCE`] and counts the rest, so a
//! flood from one address costs one record per interval, not one per connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use basalt_proto::admin::{AuditReportRequest, RefusedConnection};
use tokio::sync::{mpsc, watch};

use crate::cluster::Cluster;

/// How often one source's refusals are recorded one by one.
pub const PER_SOURCE: Duration = Duration::from_secs(10);
/// Refusals queued between the listener and the reporter.
const QUEUE: usize = 1024;
/// Most refusals in one report (the cluster accepts up to 256).
const BATCH: usize = 128;
/// Sources remembered for rate limiting; beyond this the memory is cleared.
const SOURCES: usize = 4096;

/// One refused connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The peer's address.
    pub peer: String,
    /// Why.
    pub reason: String,
}

/// The listener's side: records refusals without waiting.
#[derive(Debug)]
pub struct RefusalLog {
    tx: mpsc::Sender<Refused>,
    /// Refusals seen (the listener's counter; logged by the reporter).
    pub total: AtomicU64,
    /// Refusals the full queue dropped (reported as a count).
    overflow: AtomicU64,
}

impl RefusalLog {
    /// A log and the receiving end [`run_reporter`] reads.
    pub fn new() -> (Arc<RefusalLog>, mpsc::Receiver<Refused>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Arc::new(RefusalLog { tx, total: AtomicU64::new(0), overflow: AtomicU64::new(0) }), rx)
    }

    /// Records a refusal (and logs it).
    pub fn record(&self, peer: &str, reason: String) {
        tracing::warn!(%peer, %reason, "refused an NBD connection");
        self.total.fetch_add(1, Ordering::Relaxed);
        if self.tx.try_send(Refused { peer: peer.to_string(), reason }).is_err() {
            self.overflow.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Decides which refusals are recorded one by one: each source once per [`PER_SOURCE`].
#[derive(Debug, Default)]
pub struct Limiter {
    last: HashMap<String, Instant>,
}

impl Limiter {
    /// True if a refusal from `peer` at `now` is recorded on its own.
    pub fn admit(&mut self, peer: &str, now: Instant) -> bool {
        // The address without its port: one host's many connections count as one source.
        let source = peer.rsplit_once(':').map_or(peer, |(host, _)| host);
        if self.last.len() >= SOURCES && !self.last.contains_key(source) {
            self.last.retain(|_, t| now.duration_since(*t) < PER_SOURCE);
            if self.last.len() >= SOURCES {
                return false;
            }
        }
        match self.last.get(source) {
            Some(t) if now.duration_since(*t) < PER_SOURCE => false,
            _ => {
                self.last.insert(source.to_string(), now);
                true
            }
        }
    }
}

/// Sends `log`'s refusals for `volume` to the cluster's audit log until `shutdown`; what cannot
/// be sent is logged and dropped (the listener's log line stays).
pub async fn run_reporter(
    cluster: Cluster,
    volume: String,
    log: Arc<RefusalLog>,
    mut rx: mpsc::Receiver<Refused>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut limiter = Limiter::default();
    let mut suppressed = 0u64;
    loop {
        let first = tokio::select! {
            r = rx.recv() => match r { Some(r) => r, None => return },
            _ = shutdown.changed() => return,
        };
        // Gather what arrives with it, briefly, so a burst is one report.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut refused = Vec::new();
        let mut next = Some(first);
        while let Some(r) = next.take() {
            if refused.len() < BATCH && limiter.admit(&r.peer, Instant::now()) {
                refused.push(RefusedConnection { source: r.peer, reason: r.reason });
            } else {
                suppressed += 1;
            }
            next = rx.try_recv().ok();
        }
        suppressed += log.overflow.swap(0, Ordering::Relaxed);
        let req = AuditReportRequest { volume: volume.clone(), refused, suppressed };
        let sent = match cluster.admin(0) {
            Ok(mut admin) => admin.audit_report(req).await.map_err(|s| s.message().to_string()),
            Err(e) => Err(e.to_string()),
        };
        match sent {
            Ok(_) => suppressed = 0,
            Err(e) => tracing::warn!(volume, error = %e, "could not record refused NBD connections in the cluster's audit log"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_record_per_source_and_interval() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        assert!(l.admit("10.0.0.5:4000", t0));
        assert!(!l.admit("10.0.0.5:4001", t0 + Duration::from_secs(1)), "same host, another port");
        assert!(l.admit("10.0.0.6:4000", t0), "another host");
        assert!(l.admit("[::1]:4000", t0));
        assert!(!l.admit("[::1]:4001", t0));
        assert!(l.admit("10.0.0.5:4002", t0 + PER_SOURCE), "after the interval");
    }

    #[test]
    fn a_flood_of_sources_stays_bounded() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        for i in 0..SOURCES {
            assert!(l.admit(&format!("10.{}.{}.{}:1", i >> 16, (i >> 8) & 255, i & 255), t0));
        }
        assert!(!l.admit("192.168.0.1:1", t0), "full of fresh sources: counted, not remembered");
        assert!(l.last.len() <= SOURCES);
        assert!(l.admit("192.168.0.1:1", t0 + PER_SOURCE), "old ones forgotten once stale");
    }

    #[tokio::test]
    async fn the_listener_never_waits() {
        let (log, _rx) = RefusalLog::new();
        for i in 0..QUEUE + 10 {
            log.record(&format!("10.0.0.1:{i}"), "outside the allow-list".into());
        }
        assert_eq!(log.total.load(Ordering::Relaxed), (QUEUE + 10) as u64);
        assert_eq!(log.overflow.load(Ordering::Relaxed), 10);
    }
}
