//! `basalt dev up`: a real local cluster of separate `basalt-node` processes on loopback —
//! three storage+meta nodes in three failure domains and one backup node — with a volume, a
//! `cluster.json` describing it, and a clean stop on Ctrl-C.
//!
//! Contract lines go to stdout (`nbd://...` per export, then `BASALT_CLUSTER=...`,
//! `BASALT_CA=...`, `BASALT_TOKEN_FILE=...`, then `ready`); progress goes to stderr.
//!
//! Security is on, as in production: `DIR/tls` holds a cluster CA and each node's certificate,
//! every link is TLS, listeners accept loopback addresses only, `cluster init` authenticates with
//! a client certificate and writes the first admin token to `DIR/admin.token` (mode 0600).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use basalt_common::units::{format_size, parse_size};
use basalt_proto::admin::{ClusterInitRequest, ClusterStatusRequest, NodeInfoRequest, VolumeCreateRequest, VolumeShowRequest};
use serde::{Deserialize, Serialize};

use basalt_security::certs::{self, Validity};
use basalt_security::{Dialer, Identity, TlsContext, TlsFiles, Token};

use crate::admin::{Admin, Credentials};
use crate::exit::CliError;

/// The client certificate `dev up` initializes the cluster with.
const DEV_CLIENT: &str = "dev-admin";

/// Creates the CA and certificates `dev up` needs in `tls` (keeping those of an earlier run
/// that are still valid for a month).
fn ensure_certificates(tls: &Path, node_ids: &[u64]) -> Result<(), CliError> {
    let err = |e: basalt_security::SecurityError| CliError::other(format!("TLS material in {}: {e}", tls.display()));
    if !tls.join(certs::CA_CERT).exists() {
        certs::init_ca(tls, certs::CA_DAYS).map_err(err)?;
        say(format!("created a cluster CA in {}", tls.display()));
    }
    let month_ahead = basalt_security::identity::unix_now() + 30 * 86_400;
    let wanted = node_ids.iter().map(|id| Identity::Node(*id)).chain([Identity::Client(DEV_CLIENT.into())]);
    for identity in wanted {
        let cert = tls.join(format!("{}.pem", certs::file_stem(&identity)));
        let fresh = certs::summarize_file(&cert).map(|s| s.not_after > month_ahead).unwrap_or(false);
        if !fresh {
            certs::issue(tls, &identity, Validity::days(certs::CERT_DAYS), tls, &["127.0.0.1".to_string()]).map_err(err)?;
        }
    }
    Ok(())
}

/// Credentials from the dev CA, with the client certificate or a token (plaintext, with
/// security off).
fn dev_credentials(tls: &Path, token: Option<Token>, security_off: bool) -> Result<Credentials, CliError> {
    if security_off {
        return Ok(Credentials { dialer: Dialer::new(None), token: None });
    }
    let stem = certs::file_stem(&Identity::Client(DEV_CLIENT.into()));
    let files = TlsFiles {
        ca: tls.join(certs::CA_CERT),
        cert: token.is_none().then(|| tls.join(format!("{stem}.pem"))),
        key: token.is_none().then(|| tls.join(format!("{stem}.key"))),
    };
    let ctx = TlsContext::load(files).map_err(|e| CliError::other(e.to_string()))?;
    Ok(Credentials { dialer: Dialer::new(Some(std::sync::Arc::new(ctx))), token })
}

/// Options of `basalt dev up`.
pub struct DevUp {
    /// Where everything lives.
    pub dir: PathBuf,
    /// Size of the `demo` volume.
    pub size: String,
    /// Placement groups.
    pub pgs: u32,
    /// The node binary (default: next to this one).
    pub node_bin: Option<PathBuf>,
    /// Run the nodes with security off (plaintext, no authentication).
    pub security_off: bool,
    /// Say `ready` as one JSON line (with the exports and environment) instead of text lines.
    pub json: bool,
}

/// One node in `cluster.json`.
#[derive(Serialize, Deserialize, Clone)]
pub struct DevNode {
    /// Node id.
    pub id: u64,
    /// Process id (of the current run).
    pub pid: u32,
    /// gRPC address.
    pub grpc_addr: String,
    /// Prometheus URL.
    pub metrics_url: String,
    /// Failure-domain labels.
    pub labels: BTreeMap<String, String>,
    /// Roles.
    pub roles: Vec<String>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Log file.
    pub log: PathBuf,
}

/// `DIR/cluster.json`.
#[derive(Serialize, Deserialize)]
pub struct DevCluster {
    /// Cluster id.
    pub cluster_id: String,
    /// `BASALT_CLUSTER` value.
    pub basalt_cluster: String,
    /// Nodes.
    pub nodes: Vec<DevNode>,
    /// Volumes created by `dev up`.
    pub volumes: Vec<String>,
    /// NBD exports served by `dev up`.
    #[serde(default)]
    pub exports: Vec<String>,
}

fn free_port() -> Result<u16, CliError> {
    basalt_common::ports::free_local_port().map_err(|e| CliError::other(format!("cannot find a free port: {e}")))
}

fn node_binary(explicit: Option<PathBuf>) -> Result<PathBuf, CliError> {
    if let Some(p) = explicit.or_else(|| std::env::var_os("BASALT_NODE_BIN").map(PathBuf::from)) {
        return Ok(p);
    }
    if let Ok(me) = std::env::current_exe() {
        let sibling = me.with_file_name("basalt-node");
        if sibling.exists() {
            return Ok(sibling);
        }
    }
    Err(CliError::other("cannot find the basalt-node binary next to basalt; pass --node-bin or set BASALT_NODE_BIN"))
}

fn say(msg: impl AsRef<str>) {
    eprintln!("basalt dev: {}", msg.as_ref());
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

struct Running {
    children: Vec<(DevNode, Child)>,
}

impl Running {
    /// SIGTERM everyone, wait up to 20 s, then SIGKILL what is left.
    fn stop(&mut self) {
        for (_, child) in &self.children {
            // SAFETY: signalling our own child processes by pid.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        for (node, child) in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                    _ => {
                        say(format!("node-{} did not stop in time; killing it", node.id));
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
    }

    fn check_alive(&mut self) -> Result<(), CliError> {
        for (node, child) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(CliError::other(format!(
                    "node-{} exited ({status}) during startup; last lines of {}:\n{}",
                    node.id,
                    node.log.display(),
                    tail(&node.log)
                )));
            }
        }
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.children.iter_mut().any(|(_, c)| matches!(c.try_wait(), Ok(None))) {
            self.stop();
        }
    }
}

/// Runs `basalt dev up` until Ctrl-C / SIGTERM.
pub async fn up(opts: DevUp) -> Result<(), CliError> {
    let size = parse_size(&opts.size).map_err(|e| CliError::invalid(e.to_string()))?;
    let bin = node_binary(opts.node_bin)?;
    let dir =
        if opts.dir.is_absolute() { opts.dir.clone() } else { std::env::current_dir().map_err(|e| CliError::other(e.to_string()))?.join(&opts.dir) };
    std::fs::create_dir_all(&dir).map_err(|e| CliError::other(format!("cannot create {}: {e}", dir.display())))?;
    let json_path = dir.join("cluster.json");
    // A previous run's ports and ids are reused, so its data comes back as it was.
    let previous: Option<DevCluster> = std::fs::read(&json_path).ok().and_then(|b| serde_json::from_slice(&b).ok());

    let tls = dir.join("tls");
    if !opts.security_off {
        ensure_certificates(&tls, &[1, 2, 3, 4])?;
    }
    let scheme = if opts.security_off { "http" } else { "https" };
    let token_path = dir.join("admin.token");
    let mut specs: Vec<DevNode> = Vec::new();
    for id in 1..=4u64 {
        let prev = previous.as_ref().and_then(|p| p.nodes.iter().find(|n| n.id == id)).cloned();
        let grpc_addr = match &prev {
            Some(n) => n.grpc_addr.clone(),
            None => format!("127.0.0.1:{}", free_port()?),
        };
        let metrics_url = match &prev {
            Some(n) => format!("{scheme}://{}", n.metrics_url.split("://").nth(1).unwrap_or_default()),
            None => format!("{scheme}://127.0.0.1:{}/metrics", free_port()?),
        };
        let (roles, zone) =
            if id <= 3 { (vec!["storage".to_string(), "meta".to_string()], format!("z{id}")) } else { (vec!["backup".to_string()], "z4".into()) };
        let mut labels = BTreeMap::new();
        labels.insert("zone".to_string(), zone);
        labels.insert("host".to_string(), format!("h{id}"));
        let data_dir = dir.join(format!("node-{id}"));
        specs.push(DevNode { id, pid: 0, grpc_addr, metrics_url, labels, roles, log: data_dir.join("node.log"), data_dir });
    }
    let meta_addrs: Vec<String> = specs.iter().filter(|n| n.roles.iter().any(|r| r == "meta")).map(|n| n.grpc_addr.clone()).collect();
    // Data files are sparse: capacity costs disk only when written.
    let capacity = (size.saturating_mul(2)).max(16 << 30);

    let mut running = Running { children: Vec::new() };
    for spec in &specs {
        std::fs::create_dir_all(&spec.data_dir).map_err(|e| CliError::other(format!("cannot create {}: {e}", spec.data_dir.display())))?;
        let labels = spec.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        let metrics_listen = spec.metrics_url.split("://").nth(1).unwrap_or_default().trim_end_matches("/metrics").to_string();
        let config = format!(
            "# Written by `basalt dev up`.\nid = {}\nlisten = \"{}\"\nmetrics_listen = \"{}\"\ndata_dir = \"{}\"\nlabels = \"{}\"\nroles = [{}]\nseeds = [{}]\ncapacity = \"{}\"\n# Writes are refused when the disk under the nodes has less free.\nstate_reserve = \"256MiB\"\n\n[memory]\nindex_cache = \"32MiB\"\nlog_cache = \"16MiB\"\nwrite_buffer = \"32MiB\"\nlog_write_buffer = \"64MiB\"\n\n{security}\n# Every listener of this cluster is on loopback.\n[security.allow]\nadmin = [\"127.0.0.0/8\"]\ndata = [\"127.0.0.0/8\"]\nraft = [\"127.0.0.0/8\"]\nmetrics = [\"127.0.0.0/8\"]\n",
            spec.id,
            spec.grpc_addr,
            metrics_listen,
            spec.data_dir.display(),
            labels,
            spec.roles.iter().map(|r| format!("\"{r}\"")).collect::<Vec<_>>().join(", "),
            meta_addrs.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", "),
            capacity,
            security = if opts.security_off {
                "# Plaintext, no authentication: `basalt dev up --security-off`, for measuring what security costs.\n[security]\noff = true\n"
                    .to_string()
            } else {
                format!(
                    "[security]\nca = \"{tls}/ca.pem\"\ncert = \"{tls}/node-{id}.pem\"\nkey = \"{tls}/node-{id}.key\"\n",
                    tls = tls.display(),
                    id = spec.id
                )
            },
        );
        let config_path = spec.data_dir.join("node.toml");
        std::fs::write(&config_path, config).map_err(|e| CliError::other(format!("cannot write {}: {e}", config_path.display())))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .map_err(|e| CliError::other(format!("cannot open {}: {e}", spec.log.display())))?;
        let log_err = log.try_clone().map_err(|e| CliError::other(e.to_string()))?;
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| CliError::other(format!("cannot start {}: {e}", bin.display())))?;
        let mut node = spec.clone();
        node.pid = child.id();
        say(format!("started node-{} (pid {}) on {} [{}], log {}", node.id, node.pid, node.grpc_addr, labels, node.log.display()));
        running.children.push((node, child));
    }

    // Wait for every node to answer (authenticating with the dev client certificate).
    if opts.security_off {
        say("SECURITY IS OFF: plaintext, no authentication (--security-off)");
    }
    let cert_creds = dev_credentials(&tls, None, opts.security_off)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let nodes: Vec<DevNode> = running.children.iter().map(|(n, _)| n.clone()).collect();
    for node in nodes {
        let admin = Admin::new(Some(node.grpc_addr.clone()), cert_creds.clone())?;
        loop {
            running.check_alive()?;
            let ok = tokio::time::timeout(Duration::from_secs(2), admin.call(|mut c| async move { c.node_info(NodeInfoRequest {}).await })).await;
            if matches!(ok, Ok(Ok(_))) {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(CliError::other(format!("node-{} did not come up within 60s; see {}", node.id, node.log.display())));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let admin = Admin::new(Some(meta_addrs.join(",")), cert_creds)?;
    let info = admin.call(|mut c| async move { c.node_info(NodeInfoRequest {}).await }).await?;
    if !info.cluster_initialized {
        say("initializing the cluster");
        let req = ClusterInitRequest { pg_count: opts.pgs, extent_size: 0, failure_domain: "zone".into(), meta_addrs: meta_addrs.clone() };
        let reply = admin
            .call(|mut c| {
                let req = req.clone();
                async move { c.cluster_init(req).await }
            })
            .await?;
        // A token file from an earlier cluster in this directory is of no use any more.
        let _ = std::fs::remove_file(&token_path);
        if !reply.admin_token.is_empty() {
            crate::security::write_secret_file(&token_path, &reply.admin_token)?;
            say(format!("wrote the first admin token ({}) to {}", reply.admin_token_id, token_path.display()));
        }
    }
    let token = if opts.security_off {
        None
    } else {
        let text = std::fs::read_to_string(&token_path)
            .map_err(|e| CliError::other(format!("cannot read {} (the admin token of this cluster): {e}", token_path.display())))?;
        Some(Token::parse(&text).map_err(|e| CliError::other(format!("{}: {e}", token_path.display())))?)
    };
    let creds = dev_credentials(&tls, token, opts.security_off)?;
    let admin = Admin::new(Some(meta_addrs.join(",")), creds.clone())?;

    // Every placement group needs a leader and all three replicas before we call it ready.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        running.check_alive()?;
        let s = admin.call(|mut c| async move { c.cluster_status(ClusterStatusRequest {}).await }).await?;
        let ready = s.pgs.iter().filter(|p| p.leader != 0 && p.live_replicas.len() == p.replicas.len()).count();
        if !s.pgs.is_empty() && ready == s.pgs.len() {
            break s;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(CliError::other(format!("only {ready} of {} placement groups became healthy within 120s", s.pgs.len())));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    say(format!("{} placement groups healthy", status.pgs.len()));

    let exists = admin.call(|mut c| async move { c.volume_show(VolumeShowRequest { name: "demo".into(), usage: false }).await }).await.ok();
    match exists {
        Some(r) => say(format!("volume demo exists ({})", format_size(r.volume.map(|v| v.size).unwrap_or(0)))),
        None => {
            admin
                .call(|mut c| async move {
                    c.volume_create(VolumeCreateRequest { name: "demo".into(), size, wrapped_key: Default::default(), unencrypted: false, qos: None })
                        .await
                })
                .await?;
            say(format!("created volume demo ({})", format_size(size)));
        }
    }

    // Attach demo and serve it over NBD from this process (same port as last time if any).
    let nbd_addr = previous
        .as_ref()
        .and_then(|p| p.exports.first())
        .and_then(|u| u.strip_prefix("nbd://"))
        .and_then(|u| u.split('/').next())
        .map(str::to_string)
        .unwrap_or_else(|| "127.0.0.1:0".to_string());
    let (nbd_tx, nbd_rx) = tokio::sync::watch::channel(false);
    let (nbd_cluster, nbd_volume) = crate::attach::open(&meta_addrs, &creds, "demo", false, true, "basalt dev up", None).await?;
    // Loopback only, like the nodes (`attach` refuses a plaintext NBD listener elsewhere).
    crate::attach::check_nbd_address(&nbd_addr, false, false)?;
    let loopback = basalt_security::cidr::AllowList::parse(&["127.0.0.0/8", "::1/128"]).map_err(|e| CliError::other(e.to_string()))?;
    let (refusal_log, refusals) = basalt_volume_client::nbd::refusals::RefusalLog::new();
    tokio::spawn(basalt_volume_client::nbd::refusals::run_reporter(
        nbd_cluster.clone(),
        "demo".into(),
        refusal_log.clone(),
        refusals,
        nbd_rx.clone(),
    ));
    // The read-write holder cuts snapshots (and so backups) of demo between its writes.
    tokio::spawn(basalt_volume_client::snapshot_cut::run_snapshot_cutter(
        nbd_cluster.clone(),
        nbd_volume.clone(),
        |e| match e {
            basalt_volume_client::snapshot_cut::CutEvent::Cut { name, write_epoch } => {
                say(format!("demo: snapshot {name} cut (writes now at epoch {write_epoch})"))
            }
            basalt_volume_client::snapshot_cut::CutEvent::Failed { name, reason } => say(format!("demo: snapshot {name} not cut: {reason}")),
        },
        nbd_rx.clone(),
    ));
    let listen = crate::attach::Listen::Tcp(nbd_addr);
    let (uri, nbd_task) = crate::attach::serve(nbd_volume.clone(), false, &listen, None, loopback, Some(refusal_log), nbd_rx).await?;
    say(format!("serving demo over NBD at {uri}"));

    let cluster = DevCluster {
        cluster_id: status.cluster_id.clone(),
        basalt_cluster: meta_addrs.join(","),
        nodes: running.children.iter().map(|(n, _)| n.clone()).collect(),
        volumes: vec!["demo".into()],
        exports: vec![uri.clone()],
    };
    let text = serde_json::to_string_pretty(&cluster).map_err(|e| CliError::other(e.to_string()))?;
    std::fs::write(&json_path, text).map_err(|e| CliError::other(format!("cannot write {}: {e}", json_path.display())))?;
    say(format!("wrote {}", json_path.display()));
    if opts.json {
        let mut env = serde_json::json!({"BASALT_CLUSTER": cluster.basalt_cluster});
        if !opts.security_off {
            env["BASALT_CA"] = tls.join(certs::CA_CERT).display().to_string().into();
            env["BASALT_TOKEN_FILE"] = token_path.display().to_string().into();
        }
        let ready = serde_json::json!({
            "event": "ready", "cluster_id": cluster.cluster_id, "exports": cluster.exports, "env": env,
            "cluster_json": json_path.display().to_string(),
        });
        println!("{ready}");
    } else {
        println!("{uri}");
        println!("BASALT_CLUSTER={}", cluster.basalt_cluster);
        if !opts.security_off {
            println!("BASALT_CA={}", tls.join(certs::CA_CERT).display());
            println!("BASALT_TOKEN_FILE={}", token_path.display());
        }
        println!("ready");
    }

    // Run until told to stop; report (but survive) nodes that die meanwhile, e.g. killed by a test.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|e| CliError::other(e.to_string()))?;
    let mut reported = std::collections::HashSet::new();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                for (node, child) in &mut running.children {
                    if let Ok(Some(status)) = child.try_wait()
                        && reported.insert(node.id) {
                            say(format!("node-{} exited ({status}); see {}", node.id, node.log.display()));
                        }
                }
            }
        }
    }
    say("stopping");
    let _ = nbd_tx.send(true);
    let _ = nbd_task.await;
    if let Err(e) = nbd_cluster.detach_volume(&nbd_volume).await {
        say(format!("detaching demo failed: {e}"));
    }
    running.stop();
    say("stopped");
    Ok(())
}
