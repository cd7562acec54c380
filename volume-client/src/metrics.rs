//! What a volume handle did, for the attach process's `/metrics` (`basalt attach
//! --metrics-listen`): requests, bytes, errors and latency per operation as the guest's I/O
//! reaches the volume client (so the latencies are what the guest waits, minus its transport).

use std::time::Duration;

use basalt_metrics::{Exposition, OpFamilies, OpStats};

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

const FAMILIES: OpFamilies = OpFamilies {
    requests: ("basalt_volume_requests_total", "Guest requests this attachment served."),
    errors: ("basalt_volume_errors_total", "Guest requests that failed."),
    bytes: ("basalt_volume_bytes_total", "Bytes read, written, trimmed or zeroed."),
    latency: (
        "basalt_volume_request_duration_seconds",
        "How long guest requests took in the volume client (cluster round trips, encryption, QoS waits).",
    ),
};

/// Per-operation counters and latency histograms of one volume handle and its clones.
#[derive(Debug, Default)]
pub struct VolumeMetrics {
    ops: OpStats<5>,
}

impl VolumeMetrics {
    /// Records one operation of `bytes` that took `took`.
    pub fn record(&self, op: VolumeOp, bytes: u64, took: Duration, ok: bool) {
        self.ops.record(op as usize, bytes, took, ok);
    }

    /// Operations of kind `op` so far.
    pub fn requests(&self, op: VolumeOp) -> u64 {
        self.ops.requests(op as usize)
    }

    /// Adds this volume's families to `e`.
    pub fn expose(&self, e: &mut Exposition) {
        self.ops.expose(e, &FAMILIES, &OPS);
    }
}
