//! Rebuild pacing: one byte budget per node, shared by every outgoing snapshot stream, so
//! filling new replicas after a node loss or during a drain never takes more than its share of
//! disk and network from foreground I/O.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// A byte-rate budget. `pace(n)` returns when `n` more bytes fit under the rate; no credit is
/// saved up while idle, so a burst after a quiet spell is paced too.
#[derive(Debug)]
pub struct Pacer {
    rate: u64,
    next: Mutex<Option<Instant>>,
    /// Bytes paced so far (for metrics).
    pub bytes: AtomicU64,
}

impl Pacer {
    /// A budget of `rate` bytes per second; 0 means unlimited.
    pub fn new(rate: u64) -> Self {
        Self { rate, next: Mutex::new(None), bytes: AtomicU64::new(0) }
    }

    /// Waits until `bytes` more may be sent.
    pub async fn pace(&self, bytes: usize) {
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        if self.rate == 0 {
            return;
        }
        let start = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let start = next.map_or(now, |n| n.max(now));
            *next = Some(start + Duration::from_secs_f64(bytes as f64 / self.rate as f64));
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn paces_to_the_rate_across_callers() {
        let p = std::sync::Arc::new(Pacer::new(4 << 20));
        let t0 = std::time::Instant::now();
        // 8 × 1 MiB at 4 MiB/s from two tasks: the last chunk may start after ~1.75 s.
        let tasks: Vec<_> = (0..2)
            .map(|_| {
                let p = p.clone();
                tokio::spawn(async move {
                    for _ in 0..4 {
                        p.pace(1 << 20).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(1700), "{took:?}");
        assert_eq!(p.bytes.load(Ordering::Relaxed), 8 << 20);
        let unlimited = Pacer::new(0);
        let t0 = std::time::Instant::now();
        unlimited.pace(1 << 30).await;
        assert!(t0.elapsed() < Duration::from_millis(100));
    }
}
