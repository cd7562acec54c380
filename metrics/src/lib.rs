//! Prometheus exposition shared by `basalt-node` and the attach process.
//!
//! Metrics are read at scrape time from the atomics their owners keep ([`Exposition`]: the
//! families of one scrape), latency distributions are lock-free [`Histogram`]s, and the text
//! is OpenMetrics as `prometheus-client` encodes it (so `_total`, `# EOF` and escaping are the
//! maintained crate's, not ours). Names follow Prometheus conventions: base units (`_bytes`,
//! `_seconds`), counters end in `_total`.

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// The content type of [`Exposition::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of [`Histogram::latency`]'s buckets, in seconds: 50 µs doubling to ~3.3 s
/// (a 4 KiB write on a fast disk to a stalled Raft round).
const LATENCY_BOUNDS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_2, 0.000_4, 0.000_8, 0.001_6, 0.003_2, 0.006_4, 0.012_8, 0.025_6, 0.051_2, 0.102_4, 0.204_8, 0.409_6, 0.819_2, 1.638_4,
    3.276_8,
];

/// A latency distribution: fixed buckets of atomics (no lock on the data path).
#[derive(Debug)]
pub struct Histogram {
    /// One count per bound in [`LATENCY_BOUNDS`], then the overflow (+Inf).
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::latency()
    }
}

impl Histogram {
    /// A histogram of request latencies (50 µs to ~3.3 s, doubling).
    pub fn latency() -> Self {
        Histogram { buckets: std::array::from_fn(|_| AtomicU64::new(0)), sum_nanos: AtomicU64::new(0), count: AtomicU64::new(0) }
    }

    /// Records one observation.
    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let i = LATENCY_BOUNDS.iter().position(|b| secs <= *b).unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(took.as_nanos().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn snapshot(&self) -> HistogramSample {
        let buckets =
            LATENCY_BOUNDS.iter().copied().chain([f64::MAX]).zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed))).collect::<Vec<_>>();
        // The count is the buckets' sum, so a scrape between two increments stays consistent.
        let count = buckets.iter().map(|(_, n)| n).sum();
        HistogramSample { sum: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9, count, buckets }
    }
}

/// Names and help texts of the four families an [`OpStats`] exposes.
#[derive(Clone, Copy, Debug)]
pub struct OpFamilies {
    /// Requests (a counter, `..._requests_total`).
    pub requests: (&'static str, &'static str),
    /// Failed requests (a counter).
    pub errors: (&'static str, &'static str),
    /// Bytes of the requests that succeeded (a counter).
    pub bytes: (&'static str, &'static str),
    /// Latency (a histogram, `..._seconds`).
    pub latency: (&'static str, &'static str),
}

/// Requests, errors, bytes and latency of `N` kinds of operation (the owner names them).
#[derive(Debug)]
pub struct OpStats<const N: usize> {
    requests: [AtomicU64; N],
    errors: [AtomicU64; N],
    bytes: [AtomicU64; N],
    latency: [Histogram; N],
}

impl<const N: usize> Default for OpStats<N> {
    fn default() -> Self {
        let zero = |_| AtomicU64::new(0);
        OpStats {
            requests: std::array::from_fn(zero),
            errors: std::array::from_fn(zero),
            bytes: std::array::from_fn(zero),
            latency: std::array::from_fn(|_| Histogram::latency()),
        }
    }
}

impl<const N: usize> OpStats<N> {
    /// Records one operation of kind `op` (an index below `N`) and `bytes` that took `took`.
    pub fn record(&self, op: usize, bytes: u64, took: Duration, ok: bool) {
        let Some(requests) = self.requests.get(op) else { return };
        requests.fetch_add(1, Ordering::Relaxed);
        self.latency[op].observe(took);
        if ok {
            self.bytes[op].fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.errors[op].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Operations of kind `op` so far.
    pub fn requests(&self, op: usize) -> u64 {
        self.requests.get(op).map_or(0, |r| r.load(Ordering::Relaxed))
    }

    /// Adds the four families to `e`, each sample labelled `op` with its name in `ops`.
    pub fn expose(&self, e: &mut Exposition, names: &OpFamilies, ops: &[&'static str; N]) {
        Self::expose_each(e, names, ops, [(Vec::new(), self)]);
    }

    /// Adds the four families to `e` for several sets of counters at once (one family each,
    /// as the format wants): each sample labelled with its set's `labels`, then `op`.
    pub fn expose_each<'a>(
        e: &mut Exposition,
        names: &OpFamilies,
        ops: &[&'static str; N],
        sets: impl IntoIterator<Item = (Labels, &'a OpStats<N>)>,
    ) {
        let (mut requests, mut errors, mut bytes, mut latency) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (labels, s) in sets {
            for (i, op) in ops.iter().enumerate() {
                let mut l = labels.clone();
                l.push(("op", op.to_string()));
                requests.push((l.clone(), s.requests[i].load(Ordering::Relaxed)));
                errors.push((l.clone(), s.errors[i].load(Ordering::Relaxed)));
                bytes.push((l.clone(), s.bytes[i].load(Ordering::Relaxed)));
                latency.push((l, &s.latency[i]));
            }
        }
        e.counter(names.requests.0, names.requests.1, requests)
            .counter(names.errors.0, names.errors.1, errors)
            .counter(names.bytes.0, names.bytes.1, bytes)
            .histogram(names.latency.0, names.latency.1, latency);
    }
}

#[derive(Clone, Debug)]
struct HistogramSample {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

/// One sample's labels.
pub type Labels = Vec<(&'static str, String)>;

#[derive(Clone, Debug)]
enum Sample {
    Int(u64),
    Float(f64),
    Histogram(HistogramSample),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn metric_type(self) -> MetricType {
        match self {
            Kind::Counter => MetricType::Counter,
            Kind::Gauge => MetricType::Gauge,
            Kind::Histogram => MetricType::Histogram,
        }
    }
}

#[derive(Clone, Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: Vec<(Labels, Sample)>,
}

/// The families of one scrape, in the order they are added.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    families: Vec<Family>,
}

impl Exposition {
    /// A counter family of whole numbers; `name` ends in `_total`.
    pub fn counter(&mut self, name: &'static str, help: &'static str, samples: Vec<(Labels, u64)>) -> &mut Self {
        self.push(name, help, Kind::Counter, samples.into_iter().map(|(l, v)| (l, Sample::Int(v))).collect())
    }

    /// A counter family of fractions (seconds); `name` ends in `_total`.
    pub fn counter_f64(&mut self, name: &'static str, help: &'static str, samples: Vec<(Labels, f64)>) -> &mut Self {
        self.push(name, help, Kind::Counter, samples.into_iter().map(|(l, v)| (l, Sample::Float(v))).collect())
    }

    /// A gauge family of whole numbers.
    pub fn gauge(&mut self, name: &'static str, help: &'static str, samples: Vec<(Labels, u64)>) -> &mut Self {
        self.push(name, help, Kind::Gauge, samples.into_iter().map(|(l, v)| (l, Sample::Int(v))).collect())
    }

    /// A gauge family of fractions.
    pub fn gauge_f64(&mut self, name: &'static str, help: &'static str, samples: Vec<(Labels, f64)>) -> &mut Self {
        self.push(name, help, Kind::Gauge, samples.into_iter().map(|(l, v)| (l, Sample::Float(v))).collect())
    }

    /// A histogram family; `name` ends in the unit (`_seconds`).
    pub fn histogram(&mut self, name: &'static str, help: &'static str, samples: Vec<(Labels, &Histogram)>) -> &mut Self {
        self.push(name, help, Kind::Histogram, samples.into_iter().map(|(l, h)| (l, Sample::Histogram(h.snapshot()))).collect())
    }

    fn push(&mut self, name: &'static str, help: &'static str, kind: Kind, samples: Vec<(Labels, Sample)>) -> &mut Self {
        self.families.push(Family { name, help, kind, samples });
        self
    }

    /// The OpenMetrics text, every sample also labelled with `labels` (the node, say).
    pub fn render(self, labels: Labels) -> String {
        let labels = labels.into_iter().map(|(k, v)| (Cow::Borrowed(k), Cow::Owned(v)));
        let mut registry = Registry::with_labels(labels);
        registry.register_collector(Box::new(Collected(self.families)));
        let mut out = String::new();
        // Writing into a String does not fail; an encoder error would be a bug in a family.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::error!(error = %e, "encoding the metrics failed");
        }
        out
    }
}

#[derive(Debug)]
struct Collected(Vec<Family>);

impl Collector for Collected {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        for f in &self.0 {
            // The encoder adds `_total` to counters' samples.
            let name = if f.kind == Kind::Counter { f.name.strip_suffix("_total").unwrap_or(f.name) } else { f.name };
            let mut family = encoder.encode_descriptor(name, f.help, None, f.kind.metric_type())?;
            for (labels, sample) in &f.samples {
                let metric = family.encode_family(labels)?;
                match (f.kind, sample) {
                    (Kind::Counter, Sample::Int(v)) => ConstCounter::new(*v).encode(metric)?,
                    (Kind::Counter, Sample::Float(v)) => ConstCounter::new(*v).encode(metric)?,
                    (_, Sample::Int(v)) => ConstGauge::new(*v as i64).encode(metric)?,
                    (_, Sample::Float(v)) => ConstGauge::new(*v).encode(metric)?,
                    (_, Sample::Histogram(h)) => {
                        let mut metric = metric;
                        metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(h.sum, h.count, &h.buckets, None)?
                    }
                }
            }
        }
        Ok(())
    }
}

/// Checks a `--metrics-listen` address: an IP address and port on loopback (the attach
/// process's metrics are plain HTTP, for a Prometheus or agent on the same host).
pub fn loopback_listen(addr: &str) -> Result<SocketAddr, String> {
    let parsed: SocketAddr = addr.parse().map_err(|_| format!("metrics listen address {addr:?} is not IP:PORT (e.g. 127.0.0.1:9101)"))?;
    if !parsed.ip().is_loopback() {
        return Err(format!(
            "metrics listen address {addr} is not on loopback: the attach process serves plain HTTP, so it listens on 127.0.0.1 or ::1 only (put a TLS proxy in front to scrape it from elsewhere)"
        ));
    }
    Ok(parsed)
}

/// Serves `GET /metrics` on `listener` (plain HTTP/1.1) with whatever `render` returns, until
/// `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let render = render.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let render = render.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        Response::builder().header("content-type", CONTENT_TYPE).body(Full::new(Bytes::from(render())))
                    } else {
                        Response::builder().status(StatusCode::NOT_FOUND).body(Full::new(Bytes::from_static(b"try /metrics\n")))
                    };
                    resp.map_err(|e| std::io::Error::other(e.to_string()))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(pairs: &[(&'static str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
    }

    #[test]
    fn families_render_as_openmetrics_with_the_common_labels() {
        let h = Histogram::latency();
        h.observe(Duration::from_micros(30));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(10));
        let mut e = Exposition::default();
        e.counter("basalt_x_total", "Xs.", vec![(l(&[("op", "write")]), 2)])
            .counter_f64("basalt_waited_seconds_total", "Waits.", vec![(Vec::new(), 1.5)])
            .gauge("basalt_y_bytes", "Y.", vec![(Vec::new(), 7)])
            .histogram("basalt_lat_seconds", "Latency.", vec![(l(&[("op", "read")]), &h)]);
        let text = e.render(l(&[("node", "3")]));
        for want in [
            "# TYPE basalt_x counter\n",
            "basalt_x_total{node=\"3\",op=\"write\"} 2\n",
            "basalt_waited_seconds_total{node=\"3\"} 1.5\n",
            "# TYPE basalt_y_bytes gauge\n",
            "basalt_y_bytes{node=\"3\"} 7\n",
            "# TYPE basalt_lat_seconds histogram\n",
            "basalt_lat_seconds_count{node=\"3\",op=\"read\"} 3\n",
            "basalt_lat_seconds_bucket{node=\"3\",le=\"0.00005\",op=\"read\"} 1\n",
            "basalt_lat_seconds_bucket{node=\"3\",le=\"+Inf\",op=\"read\"} 3\n",
            "# EOF\n",
        ] {
            assert!(text.contains(want), "{want:?} in:\n{text}");
        }
        assert_eq!(h.count(), 3);
    }

    #[test]
    fn metrics_listen_addresses_must_be_loopback_ip_and_port() {
        assert!(loopback_listen("127.0.0.1:9101").is_ok());
        assert!(loopback_listen("[::1]:9101").is_ok());
        assert!(loopback_listen("0.0.0.0:9101").unwrap_err().contains("loopback"));
        assert!(loopback_listen("localhost").unwrap_err().contains("IP:PORT"));
        assert!(loopback_listen("127.0.0.1").is_err());
    }
}
