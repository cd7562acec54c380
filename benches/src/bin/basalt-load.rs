//! `basalt-load`: drives a volume of a running cluster through the volume client and reports
//! IOPS, bandwidth and latency percentiles. End-to-end numbers before (and beside) the NBD path.
//!
//! ```sh
//! basalt-load --cluster $BASALT_CLUSTER --volume demo --pattern randwrite --bs 4KiB --depth 32 --seconds 20
//! ```
//!
//! It finds the cluster's CA and its token where the CLI does (`BASALT_CA`, `BASALT_TOKEN_FILE`);
//! without a CA it talks plaintext, to a cluster running with security off.

use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_common::units::{format_size, parse_size};
use basalt_security::{Dialer, TlsContext, TlsFiles, Token};
use basalt_volume_client::{ClientOptions, ClientSecurity, Cluster};
use bytes::Bytes;
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Nodes' gRPC addresses.
    #[arg(long, env = "BASALT_CLUSTER")]
    cluster: String,
    /// Volume name.
    #[arg(long, default_value = "demo")]
    volume: String,
    /// randwrite, randread, write (sequential) or read (sequential).
    #[arg(long, default_value = "randwrite")]
    pattern: String,
    /// Block size.
    #[arg(long, default_value = "4KiB")]
    bs: String,
    /// Requests in flight.
    #[arg(long, default_value_t = 32)]
    depth: usize,
    /// Duration.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Bytes of the volume to use (default: all of it).
    #[arg(long)]
    span: Option<String>,
    /// The cluster CA (absent: plaintext, for a cluster with security off).
    #[arg(long, env = "BASALT_CA")]
    ca: Option<std::path::PathBuf>,
    /// A file holding the token.
    #[arg(long, env = "BASALT_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let bs = parse_size(&args.bs)?;
    let seeds: Vec<String> = args.cluster.split(',').map(str::to_string).collect();
    let tls = match &args.ca {
        Some(ca) => Some(Arc::new(TlsContext::load(TlsFiles { ca: ca.clone(), cert: None, key: None })?)),
        None => None,
    };
    let token = match &args.token_file {
        Some(p) => Some(Token::parse(&std::fs::read_to_string(p)?)?),
        None => None,
    };
    let security = ClientSecurity { dialer: Dialer::new(tls), token };
    let cluster = Cluster::connect_with(&seeds, ClientOptions { max_inflight: args.depth.max(1) * 2, security, ..Default::default() }).await?;
    let vol = cluster.open_volume(&args.volume).await?;
    let span = match &args.span {
        Some(s) => parse_size(s)?.min(vol.size()),
        None => vol.size(),
    } / bs
        * bs;
    let write = args.pattern.contains("write");
    let random = args.pattern.starts_with("rand");
    let data = Bytes::from((0..bs).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..args.depth {
        let vol = vol.clone();
        let data = data.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1);
            while Instant::now() < deadline {
                let offset = if random {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % (span / bs)) * bs
                } else {
                    (next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % (span / bs)) * bs
                };
                let started = Instant::now();
                let r = if write { vol.write(offset, data.clone(), false).await.map(|_| ()) } else { vol.read(offset, bs).await.map(|_| ()) };
                if let Err(e) = r {
                    return Err(e.to_string());
                }
                lat.push(started.elapsed().as_micros() as u64);
            }
            Ok(lat)
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?.map_err(|e| format!("I/O failed: {e}"))?);
    }
    let elapsed = started.elapsed().as_secs_f64().max(args.seconds as f64);
    all.sort_unstable();
    let pct = |p: f64| all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0);
    let iops = all.len() as f64 / elapsed;
    println!(
        "{{\"pattern\":\"{}\",\"bs\":{bs},\"depth\":{},\"ops\":{},\"iops\":{iops:.0},\"mb_per_s\":{:.1},\"p50_us\":{},\"p99_us\":{}}}",
        args.pattern,
        args.depth,
        all.len(),
        iops * bs as f64 / 1e6,
        pct(0.50),
        pct(0.99)
    );
    eprintln!(
        "{} {} QD{}: {iops:.0} IOPS, {}/s, p50 {} µs, p99 {} µs",
        args.pattern,
        format_size(bs),
        args.depth,
        format_size((iops * bs as f64) as u64),
        pct(0.50),
        pct(0.99)
    );
    Ok(())
}
