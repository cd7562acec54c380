//! What a volume handle did, for the attach process's `/metrics` (`basalt attach
//! --metrics-listen`): requests, bytes, errors and latency per operation as the guest's I/O
//! reaches the volume client (so the latencies are what the guest waits, minus its transport).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use basalt_metrics::{Exposition, Histogram, Labels};

/// An operation on a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeOp {
    /// Read.
    Read = 0,
    /// Write.
    Write = 1,
    /// Flush (every acknowledged write is durable already: this measures the round trip).
    Flush = 2,
    /// Trim (discard).
    Trim = 3,
    /// Write zeroes.
    Zero = 4,
}

const OPS: [&str; 5] = ["read", "write", "flush", "trim", "zero"];

/// Per-operation counters and latency histograms of one volume handle and its clones.
#[derive(Debug, Default)]
pub struct VolumeMetrics {
    requests: [AtomicU64; 5],
    errors: [AtomicU64; 5],
    bytes: [AtomicU64; 5],
    latency: [Histogram; 5],
}

impl VolumeMetrics {
    /// Records one operation of `bytes` that took `took`.
    pub fn record(&self, op: VolumeOp, bytes: u64, took: Duration, ok: bool) {
        let i = op as usize;
        self.requests[i].fetch_add(1, Ordering::Relaxed);
        self.latency[i].observe(took);
        if ok {
            self.bytes[i].fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Operations of kind `op` so far.
    pub fn requests(&self, op: VolumeOp) -> u64 {
        self.requests[op as usize].load(Ordering::Relaxed)
    }

    /// Adds this volume's families to `e`.
    pub fn expose(&self, e: &mut Exposition) {
        let per_op = |a: &[AtomicU64; 5]| -> Vec<(Labels, u64)> {
            OPS.iter().zip(a).map(|(op, v)| (vec![("op", op.to_string())], v.load(Ordering::Relaxed))).collect()
        };
        e.counter("basalt_volume_requests_total", "Guest requests this attachment served.", per_op(&self.requests))
            .counter("basalt_volume_errors_total", "Guest requests that failed.", per_op(&self.errors))
            .counter("basalt_volume_bytes_total", "Bytes read, written, trimmed or zeroed.", per_op(&self.bytes))
            .histogram(
                "basalt_volume_request_duration_seconds",
                "How long guest requests took in the volume client (cluster round trips, encryption, QoS waits).",
                OPS.iter().zip(&self.latency).map(|(op, h)| (vec![("op", op.to_string())], h)).collect(),
            );
    }
}
