//! Test harness: real `basalt-node` processes on 127.0.0.1, in a temporary directory, started,
//! stopped, killed (`SIGKILL`, by PID — only processes this harness started) and restarted at
//! will. Tests talk to them through the real gRPC API and the volume client.
//!
//! Security is on, as in production: each cluster gets its own CA, every node a certificate in
//! its data directory's `tls/`, and the harness a client certificate (`test-admin`) it runs
//! `cluster init` with; the admin token init returns is what the harness's clients, and the
//! CLI it runs, authenticate with afterwards.
//!
//! The binaries come from the same target directory as the test executable; `cargo nextest run
//! --workspace` (or `cargo build --workspace`) builds them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use basalt_proto::admin::admin_client::AdminClient;
use basalt_proto::admin::{ClusterInitRequest, ClusterStatusReply, ClusterStatusRequest, NodeInfoRequest};
use basalt_proto::data::data_client::DataClient;
use basalt_security::certs::{self, Validity};
use basalt_security::grpc::{AuthChannel, Bearer};
use basalt_security::{Dialer, Expect, Identity, Protocol, TlsContext, TlsFiles, Token};
use basalt_volume_client::{ClientOptions, ClientSecurity, Cluster};

/// The client certificate the harness initializes clusters with.
pub const TEST_CLIENT: &str = "test-admin";

/// Directory holding the workspace's binaries (next to the test executable's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps dir");
    if deps.ends_with("deps") { deps.parent().expect("profile dir").to_path_buf() } else { deps.to_path_buf() }
}

/// Path of a workspace binary, e.g. `basalt-node`.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} not built; run `cargo build --workspace` (nextest --workspace builds it)", p.display());
    p
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    basalt_common::ports::free_local_port().expect("free port")
}

/// How to start one node.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// Node id.
    pub id: u64,
    /// Labels, e.g. `zone=z1,host=h1`.
    pub labels: String,
    /// Roles.
    pub roles: Vec<&'static str>,
}

/// One node of a test cluster.
pub struct TestNode {
    /// Spec.
    pub spec: NodeSpec,
    /// gRPC address.
    pub addr: String,
    /// Metrics address.
    pub metrics_addr: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Config file.
    pub config: PathBuf,
    /// Log file.
    pub log: PathBuf,
    /// Runs as this user (root when `None`); see [`TestCluster::run_as`].
    pub uid: Option<u32>,
    /// Extra environment for the process (e.g. the cluster-version override a rolling-upgrade
    /// test starts a "newer build" with).
    pub env: BTreeMap<String, String>,
    child: Option<Child>,
}

impl TestNode {
    /// A node of a cluster in `cluster_dir`, not started: its data directory is created and its
    /// ports chosen.
    fn new(cluster_dir: &Path, spec: NodeSpec) -> Result<Self> {
        let data_dir = cluster_dir.join(format!("node-{}", spec.id));
        std::fs::create_dir_all(&data_dir)?;
        Ok(TestNode {
            addr: format!("127.0.0.1:{}", free_port()),
            metrics_addr: format!("127.0.0.1:{}", free_port()),
            config: data_dir.join("node.toml"),
            log: data_dir.join("node.log"),
            data_dir,
            spec,
            uid: None,
            env: BTreeMap::new(),
            child: None,
        })
    }

    /// PID of the running process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Last lines of the log (for failure messages).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// A cluster of real node processes.
pub struct TestCluster {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// Nodes by id.
    pub nodes: BTreeMap<u64, TestNode>,
    extra_config: String,
    /// Extra top-level TOML keys for single nodes (before `extra_config`, which may open tables).
    node_config: BTreeMap<u64, String>,
    /// The cluster's CA and the harness's client certificate.
    tls_dir: PathBuf,
    /// The admin token `cluster init` returned.
    admin_token: std::sync::Mutex<Option<Token>>,
}

/// `n` storage+meta nodes, node i in zone `z{i}` and host `h{i}`.
pub fn simple_spec(n: u64) -> Vec<NodeSpec> {
    (1..=n).map(|i| NodeSpec { id: i, labels: format!("zone=z{i},host=h{i}"), roles: vec!["storage", "meta"] }).collect()
}

/// A running `basalt attach` process.
pub struct Attached {
    /// The process.
    pub child: Child,
    /// The URI it printed.
    pub uri: String,
    /// Its metrics URL, with `--metrics-listen`.
    pub metrics: Option<String>,
    /// With `--json`: its ready line (export, holder, mode, epoch...).
    pub ready: Option<serde_json::Value>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TestCluster {
    /// Starts `basalt attach VOLUME` with `extra` arguments (on `--nbd-listen 127.0.0.1:0` unless
    /// they name a listener or a socket) and waits for `ready`; the exit code and stderr if it fails.
    pub fn attach_nbd(&self, volume: &str, extra: &[&str]) -> std::result::Result<Attached, (Option<i32>, String)> {
        let cluster = self;
        let mut cmd = cluster.basalt_cmd();
        cmd.args(["attach", volume]);
        if !extra.contains(&"--nbd-listen") && !extra.contains(&"--nbd-socket") {
            cmd.args(["--nbd-listen", "127.0.0.1:0"]);
        }
        let mut child = cmd.args(extra).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn basalt attach");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let (mut uri, mut metrics) = (None, None);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) if l.starts_with("nbd://") || l.starts_with("nbds://") || l.starts_with("nbd+unix://") => uri = Some(l),
                Ok(l) if l.starts_with("http://") => metrics = Some(l),
                Ok(l) if l == "ready" => {
                    return Ok(Attached { child, uri: uri.expect("uri before ready"), metrics, ready: None });
                }
                // With --json: one line saying it all.
                Ok(l) if l.starts_with('{') => {
                    let v: serde_json::Value = serde_json::from_str(&l).expect("attach --json prints JSON lines");
                    assert_eq!(v["event"], "ready", "{l}");
                    let uri = v["export"].as_str().expect("export in the ready line").to_string();
                    return Ok(Attached { child, uri, metrics: v["metrics_url"].as_str().map(String::from), ready: Some(v) });
                }
                Ok(_) => {}
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        let mut err = String::new();
                        let _ = child.stderr.take().map(|mut s| std::io::Read::read_to_string(&mut s, &mut err));
                        return Err((status.code(), err));
                    }
                    assert!(std::time::Instant::now() < deadline, "basalt attach did not become ready");
                }
            }
        }
    }

    /// Three storage+meta nodes in three zones, 8 PGs, healthy, with volume `name` created.
    pub async fn with_volume(name: &str, size: u64) -> Result<Self> {
        Self::with_volume_config(name, size, "").await
    }

    /// Like [`TestCluster::with_volume`] with extra TOML in every node's config.
    pub async fn with_volume_config(name: &str, size: u64, extra_config: &str) -> Result<Self> {
        Self::with_volume_in(&test_root(), name, size, extra_config).await
    }

    /// Like [`TestCluster::with_volume_config`], the cluster's directory under `root` (a
    /// filesystem a test inspects raw, say).
    pub async fn with_volume_in(root: &Path, name: &str, size: u64, extra_config: &str) -> Result<Self> {
        let cluster = Self::start_in(root, simple_spec(3), extra_config, &[]).await?;
        cluster.init(8, "zone").await?;
        cluster.wait_healthy(3, Duration::from_secs(60)).await?;
        let mut admin = cluster.admin().await?;
        admin
            .volume_create(basalt_proto::admin::VolumeCreateRequest {
                name: name.into(),
                size,
                wrapped_key: Default::default(),
                unencrypted: false,
                qos: None,
            })
            .await?;
        Ok(cluster)
    }

    /// Starts nodes per `specs`; the meta-role ones are everyone's seeds.
    pub async fn start(specs: Vec<NodeSpec>) -> Result<Self> {
        Self::start_with(specs, "").await
    }

    /// Like [`TestCluster::start`] with extra TOML appended to every node's config.
    pub async fn start_with(specs: Vec<NodeSpec>, extra_config: &str) -> Result<Self> {
        Self::start_with_node_config(specs, extra_config, &[]).await
    }

    /// Like [`TestCluster::start_with`], plus extra top-level TOML keys for single nodes
    /// (`(id, toml)`), e.g. a smaller `capacity` for one of them, or a `data_dir` elsewhere
    /// (the node's config and log stay in [`TestNode::data_dir`]).
    pub async fn start_with_node_config(specs: Vec<NodeSpec>, extra_config: &str, node_config: &[(u64, &str)]) -> Result<Self> {
        Self::start_in(&test_root(), specs, extra_config, node_config).await
    }

    async fn start_in(root: &Path, specs: Vec<NodeSpec>, extra_config: &str, node_config: &[(u64, &str)]) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("basalt-test-").tempdir_in(root)?;
        let tls_dir = dir.path().join("tls");
        certs::init_ca(&tls_dir, 30)?;
        certs::issue(&tls_dir, &Identity::Client(TEST_CLIENT.into()), Validity::days(30), &tls_dir, &[])?;
        let mut nodes = BTreeMap::new();
        for spec in specs {
            let node = TestNode::new(dir.path(), spec)?;
            issue_node_certificate(&tls_dir, &node)?;
            nodes.insert(node.spec.id, node);
        }
        let node_config = node_config.iter().map(|(id, toml)| (*id, toml.to_string())).collect();
        let mut cluster =
            TestCluster { dir, nodes, extra_config: extra_config.to_string(), node_config, tls_dir, admin_token: std::sync::Mutex::new(None) };
        cluster.write_configs()?;
        let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
        for id in ids {
            cluster.spawn(id)?;
        }
        for id in cluster.nodes.keys().copied().collect::<Vec<_>>() {
            cluster.wait_up(id).await?;
        }
        Ok(cluster)
    }

    /// Starts one more node per `spec` and waits until it answers. A meta-role node added
    /// after `cluster init` is a spare: the meta group keeps its members until one is lost.
    pub async fn add_node(&mut self, spec: NodeSpec) -> Result<()> {
        if self.nodes.contains_key(&spec.id) {
            bail!("node {} exists", spec.id);
        }
        let id = spec.id;
        let node = TestNode::new(self.dir.path(), spec)?;
        issue_node_certificate(&self.tls_dir, &node)?;
        self.nodes.insert(id, node);
        self.write_configs()?;
        self.spawn(id)?;
        self.wait_up(id).await
    }

    /// Starts one more node whose certificate (and trusted CA) come from the CA in `ca_dir`
    /// instead of this cluster's: another cluster's node. Does not wait for it to answer (this
    /// cluster's clients could not verify it).
    pub fn add_foreign_node(&mut self, spec: NodeSpec, ca_dir: &Path) -> Result<()> {
        let id = spec.id;
        let node = TestNode::new(self.dir.path(), spec)?;
        issue_node_certificate(ca_dir, &node)?;
        self.nodes.insert(id, node);
        self.write_configs()?;
        self.spawn(id)
    }

    /// Polls the cluster status until `done` holds for it; fails after `timeout`, naming `what`.
    pub async fn wait_status(&self, what: &str, timeout: Duration, mut done: impl FnMut(&ClusterStatusReply) -> bool) -> Result<ClusterStatusReply> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let s = self.status().await?;
            if done(&s) {
                return Ok(s);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{what}: not reached within {timeout:?}; last status: {s:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn write_configs(&self) -> Result<()> {
        let seeds: Vec<String> = self.nodes.values().filter(|n| n.spec.roles.contains(&"meta")).map(|n| format!("\"{}\"", n.addr)).collect();
        for n in self.nodes.values() {
            let roles: Vec<String> = n.spec.roles.iter().map(|r| format!("\"{r}\"")).collect();
            let own = self.node_config.get(&n.spec.id).map(String::as_str).unwrap_or("");
            let tls = n.data_dir.join("tls");
            let text = format!(
                "id = {}\nlisten = \"{}\"\nmetrics_listen = \"{}\"\nsecurity.ca = \"{}\"\nsecurity.cert = \"{}\"\nsecurity.key = \"{}\"\n{}labels = \"{}\"\nroles = [{}]\nseeds = [{}]\n{}{}\n{}\n[memory]\nindex_cache = \"16MiB\"\nlog_cache = \"8MiB\"\nwrite_buffer = \"8MiB\"\n",
                n.spec.id,
                n.addr,
                n.metrics_addr,
                tls.join(certs::CA_CERT).display(),
                tls.join(format!("node-{}.pem", n.spec.id)).display(),
                tls.join(format!("node-{}.key", n.spec.id)).display(),
                // The node's own directory (config, log) unless its own config names another.
                if own.contains("data_dir =") { String::new() } else { format!("data_dir = \"{}\"\n", n.data_dir.display()) },
                n.spec.labels,
                roles.join(", "),
                seeds.join(", "),
                // 4 GiB of chunk space unless the extra config sets its own.
                if self.extra_config.contains("capacity =") || own.contains("capacity =") { "" } else { "capacity = \"4GiB\"\n" },
                own,
                self.extra_config,
            );
            std::fs::write(&n.config, text)?;
        }
        Ok(())
    }

    fn spawn(&mut self, id: u64) -> Result<()> {
        let node = self.nodes.get_mut(&id).ok_or_else(|| anyhow!("no node {id}"))?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
        let uid = node.uid;
        let mut cmd = match uid {
            Some(uid) => {
                let mut c = Command::new(self.dir.path().join("bin").join("basalt-node"));
                std::os::unix::process::CommandExt::uid(&mut c, uid);
                c
            }
            None => Command::new(bin("basalt-node")),
        };
        let child = cmd
            .envs(&node.env)
            .arg("--config")
            .arg(&node.config)
            .env("RUST_LOG", std::env::var("BASALT_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting basalt-node")?;
        node.child = Some(child);
        Ok(())
    }

    /// Waits until node `id` answers NodeInfo.
    pub async fn wait_up(&mut self, id: u64) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let node = self.nodes.get_mut(&id).ok_or_else(|| anyhow!("no node {id}"))?;
            if let Some(child) = node.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("node-{id} exited with {status} during startup:\n{}", node.log_tail());
            }
            let addr = node.addr.clone();
            // The client certificate alone: a node just added may not know the token yet.
            if let Ok(mut c) = self.admin_with(&addr, None)
                && c.node_info(NodeInfoRequest {}).await.is_ok()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("node-{id} did not answer within 30s:\n{}", self.node(id).log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Addresses of the meta nodes.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.values().filter(|n| n.spec.roles.contains(&"meta")).map(|n| n.addr.clone()).collect()
    }

    /// The node with `id`.
    pub fn node(&self, id: u64) -> &TestNode {
        &self.nodes[&id]
    }

    /// The harness's dialer: TLS against the cluster CA, presenting its client certificate.
    pub fn dialer(&self) -> Result<Dialer> {
        Ok(Dialer::new(Some(std::sync::Arc::new(TlsContext::load(self.client_tls_files())?))))
    }

    /// The cluster CA and the harness's client certificate and key (for third-party clients:
    /// a Prometheus scraping the nodes, say).
    pub fn client_tls_files(&self) -> TlsFiles {
        let stem = certs::file_stem(&Identity::Client(TEST_CLIENT.into()));
        TlsFiles {
            ca: self.tls_dir.join(certs::CA_CERT),
            cert: Some(self.tls_dir.join(format!("{stem}.pem"))),
            key: Some(self.tls_dir.join(format!("{stem}.key"))),
        }
    }

    /// A dialer trusting the cluster CA without a client certificate (a client that has only
    /// a token, like a hypervisor host).
    pub fn anonymous_dialer(&self) -> Result<Dialer> {
        let files = TlsFiles { ca: self.tls_dir.join(certs::CA_CERT), cert: None, key: None };
        Ok(Dialer::new(Some(std::sync::Arc::new(TlsContext::load(files)?))))
    }

    /// The cluster CA certificate.
    pub fn ca_path(&self) -> PathBuf {
        self.tls_dir.join(certs::CA_CERT)
    }

    /// The CA directory (to issue further certificates from).
    pub fn tls_dir(&self) -> &Path {
        &self.tls_dir
    }

    /// The admin token `cluster init` returned (`None` before init).
    pub fn admin_token(&self) -> Option<Token> {
        self.admin_token.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Where the admin token is written for the CLI.
    pub fn admin_token_file(&self) -> PathBuf {
        self.dir.path().join("admin.token")
    }

    /// An admin client to `addr` with the harness's credentials (its client certificate, and
    /// the admin token once the cluster is initialized).
    pub fn admin_at(&self, addr: &str) -> Result<AdminClient<AuthChannel>> {
        self.admin_with(addr, self.admin_token().as_ref())
    }

    /// An admin client to `addr` sending `token` (and the harness's client certificate).
    pub fn admin_with(&self, addr: &str, token: Option<&Token>) -> Result<AdminClient<AuthChannel>> {
        let channel = basalt_security::grpc::channel(addr, &self.dialer()?, Expect::AnyNode, |ep| {
            ep.connect_timeout(Duration::from_secs(2)).timeout(Duration::from_secs(30))
        })
        .map_err(|e| anyhow!(e))?;
        Ok(AdminClient::with_interceptor(channel, Bearer::new(token))
            .max_decoding_message_size(basalt_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(basalt_proto::MAX_MESSAGE_BYTES))
    }

    /// An admin client to any running meta node.
    pub async fn admin(&self) -> Result<AdminClient<AuthChannel>> {
        for n in self.nodes.values().filter(|n| n.child.is_some() && n.spec.roles.contains(&"meta")) {
            let mut c = self.admin_at(&n.addr)?;
            if c.node_info(NodeInfoRequest {}).await.is_ok() {
                return Ok(c);
            }
        }
        bail!("no meta node reachable")
    }

    /// A client of node `addr`'s gRPC data API (block I/O sent straight to one node, with no
    /// volume-client routing), with the admin token, sized for the largest messages a node takes.
    pub fn data_client(&self, addr: &str) -> Result<DataClient<AuthChannel>> {
        let channel = basalt_security::grpc::channel(addr, &self.dialer()?, Expect::AnyNode, |ep| ep).map_err(|e| anyhow!(e))?;
        Ok(DataClient::with_interceptor(channel, Bearer::new(self.admin_token().as_ref()))
            .max_decoding_message_size(basalt_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(basalt_proto::MAX_MESSAGE_BYTES))
    }

    /// A client of node `addr`'s gRPC data API authenticated as a node (a certificate for node
    /// 9999 of the cluster CA), for the node-to-node calls (leader hand-over, replica checks).
    pub fn internal_data_client(&self, addr: &str) -> Result<DataClient<tonic::transport::Channel>> {
        self.data_client_as_node(addr, 9999)
    }

    /// A client of node `addr`'s gRPC data API with node `node`'s identity (a certificate of
    /// the cluster CA), as that node's own calls would be.
    pub fn data_client_as_node(&self, addr: &str, node: u64) -> Result<DataClient<tonic::transport::Channel>> {
        let channel = basalt_security::grpc::channel(addr, &self.dialer_as_node(node)?, Expect::AnyNode, |ep| ep).map_err(|e| anyhow!(e))?;
        Ok(DataClient::new(channel))
    }

    /// A client of node `addr`'s admin API with node `node`'s identity, as that node's own
    /// calls would be.
    pub fn admin_as_node(&self, addr: &str, node: u64) -> Result<AdminClient<tonic::transport::Channel>> {
        let channel = basalt_security::grpc::channel(addr, &self.dialer_as_node(node)?, Expect::AnyNode, |ep| ep).map_err(|e| anyhow!(e))?;
        Ok(AdminClient::new(channel))
    }

    /// A dialer presenting a certificate of the cluster CA for node `node` (issued on first use).
    pub fn dialer_as_node(&self, node: u64) -> Result<Dialer> {
        let identity = Identity::Node(node);
        let stem = certs::file_stem(&identity);
        if !self.tls_dir.join(format!("{stem}.pem")).exists() {
            certs::issue(&self.tls_dir, &identity, Validity::days(30), &self.tls_dir, &[])?;
        }
        let files = TlsFiles {
            ca: self.tls_dir.join(certs::CA_CERT),
            cert: Some(self.tls_dir.join(format!("{stem}.pem"))),
            key: Some(self.tls_dir.join(format!("{stem}.key"))),
        };
        Ok(Dialer::new(Some(std::sync::Arc::new(TlsContext::load(files)?))))
    }

    /// A TLS connection to node `addr` speaking `protocol`, with the harness's client certificate.
    pub async fn connect(&self, addr: &str, protocol: Protocol) -> Result<basalt_security::ClientStream> {
        Ok(self.dialer()?.connect(addr, Expect::AnyNode, protocol).await?)
    }

    /// Node `id`'s `/metrics` page, over HTTPS with the harness's client certificate.
    pub async fn metrics(&self, id: u64) -> Result<String> {
        https_get(&self.dialer()?, &self.node(id).metrics_addr, "/metrics", None).await
    }

    /// `cluster init` with `pgs` placement groups, replicas differing at `failure_domain`.
    /// Retries while the new meta group settles its leadership ("retry" answers); an attempt
    /// that committed before its answer was lost shows up as "already initialized".
    pub async fn init(&self, pgs: u32, failure_domain: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut retried = false;
        loop {
            let mut admin = self.admin().await?;
            let req = ClusterInitRequest { pg_count: pgs, extent_size: 0, failure_domain: failure_domain.into(), meta_addrs: self.seeds() };
            match admin.cluster_init(req).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    let token = Token::parse(&reply.admin_token).context("cluster init returned no admin token")?;
                    std::fs::write(self.admin_token_file(), format!("{}\n", token.expose()))?;
                    *self.admin_token.lock().unwrap_or_else(|p| p.into_inner()) = Some(token);
                    return Ok(());
                }
                Err(s) if retried && s.code() == tonic::Code::AlreadyExists => return Ok(()),
                Err(s) if s.code() == tonic::Code::Unavailable && tokio::time::Instant::now() < deadline => {
                    retried = true;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(s) => bail!("cluster init: {}", s.message()),
            }
        }
    }

    /// Cluster status from the meta leader (retrying through elections).
    pub async fn status(&self) -> Result<ClusterStatusReply> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let result = match self.admin().await {
                Ok(mut a) => a.cluster_status(ClusterStatusRequest {}).await.map(|r| r.into_inner()).map_err(|s| anyhow!("{}", s.message())),
                Err(e) => Err(e),
            };
            match result {
                Ok(s) => return Ok(s),
                Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Waits until every PG has a leader and at least `min_live` following replicas.
    pub async fn wait_healthy(&self, min_live: usize, timeout: Duration) -> Result<ClusterStatusReply> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(s) = self.status().await {
                let ok = s.pgs.iter().filter(|p| p.leader != 0 && p.live_replicas.len() >= min_live).count();
                if !s.pgs.is_empty() && ok == s.pgs.len() {
                    return Ok(s);
                }
                if tokio::time::Instant::now() > deadline {
                    bail!("only {ok}/{} PGs healthy (leader and {min_live} live replicas) after {timeout:?}", s.pgs.len());
                }
            } else if tokio::time::Instant::now() > deadline {
                bail!("cluster status unavailable after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A volume client connected through the seeds, with the admin token.
    pub async fn client(&self) -> Result<Cluster> {
        self.client_with(self.admin_token()).await
    }

    /// A volume client connected through the seeds, authenticating with `token` only (no
    /// client certificate), as a hypervisor host would.
    pub async fn client_with(&self, token: Option<Token>) -> Result<Cluster> {
        let security = ClientSecurity { dialer: self.anonymous_dialer()?, token };
        let opts = ClientOptions { op_timeout: Duration::from_secs(60), security, ..Default::default() };
        Ok(Cluster::connect_with(&self.seeds(), opts).await?)
    }

    /// Node `id`'s own scrubber report.
    pub async fn scrub_status(&self, id: u64) -> Result<basalt_proto::admin::ScrubStatusReply> {
        let mut admin = self.admin_at(&self.node(id).addr)?;
        Ok(admin.scrub_status(basalt_proto::admin::ScrubStatusRequest {}).await?.into_inner())
    }

    /// Node `node`'s chunk data file.
    pub fn data_file(&self, node: u64) -> PathBuf {
        self.node(node).data_dir.join("chunks.dat")
    }

    /// Where `block` sits in `node`'s data file; panics unless it is there exactly once.
    pub fn locate_block(&self, node: u64, block: &[u8]) -> u64 {
        let at = find_block(&self.data_file(node), block).expect("read the data file");
        assert_eq!(at.len(), 1, "expected the block once in node-{node}'s data file, found it at {at:?}");
        at[0]
    }

    /// Flips one bit of the byte at `offset` of `node`'s data file, behind the node's back.
    pub fn flip_bit(&self, node: u64, offset: u64) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(self.data_file(node)).expect("open the data file");
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, offset).expect("read a byte");
        byte[0] ^= 0x08;
        f.write_all_at(&byte, offset).expect("write it back flipped");
        f.sync_all().expect("sync the data file");
    }

    /// Waits (up to 20 s) until `node` has rewritten exactly `n` blocks from healthy replicas.
    pub async fn wait_repaired(&self, node: u64, n: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let st = self.scrub_status(node).await.expect("scrub status");
            if st.blocks_repaired >= n {
                assert_eq!(st.blocks_repaired, n, "node-{node} repaired more blocks than were bad");
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "node-{node} repaired {} of {n} blocks:\n{}", st.blocks_repaired, self.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// (PG, leader, followers) of the extent holding `offset` of volume `name`, once the PG
    /// has a leader (waits up to 30 s).
    pub async fn pg_replicas(&self, name: &str, offset: u64) -> Result<(basalt_common::PgId, u64, Vec<u64>)> {
        let client = self.client().await?;
        let map = client.map();
        let layout = map.layout.ok_or_else(|| anyhow!("the cluster is not initialized"))?;
        let vol = map.volume_by_name(name).ok_or_else(|| anyhow!("no volume {name}"))?;
        let pg = layout.pg_of(vol.id, basalt_common::ExtentIndex(offset / layout.extent_size));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let status = self.status().await?;
            if let Some(p) = status.pgs.iter().find(|p| p.id == pg.0 && p.leader != 0) {
                let followers = p.replicas.iter().copied().filter(|r| *r != p.leader).collect();
                return Ok((pg, p.leader, followers));
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{pg} has no leader after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `kill -9` node `id` (a process this harness started).
    pub fn kill9(&mut self, id: u64) {
        if let Some(node) = self.nodes.get_mut(&id)
            && let Some(mut child) = node.child.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops node `id` with SIGTERM and waits for it to exit; returns its exit status.
    pub async fn stop(&mut self, id: u64) -> Result<std::process::ExitStatus> {
        let node = self.nodes.get_mut(&id).ok_or_else(|| anyhow!("no node {id}"))?;
        let Some(mut child) = node.child.take() else { bail!("node-{id} is not running") };
        // SAFETY: signalling a child process we started, by its pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.kill();
                bail!("node-{id} did not stop within 30s of SIGTERM:\n{}", node.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Restarts node `id` (SIGTERM, then start) as user `uid`, with its data directory and log
    /// handed over to that user: its packets can then be told apart from the others' (see
    /// [`Isolation`]).
    pub async fn run_as(&mut self, id: u64, uid: u32) -> Result<()> {
        self.stop(id).await?;
        // Also opens the cluster directory (private to root by default) to the node.
        self.shared_bin("basalt-node")?;
        let node = self.nodes.get_mut(&id).ok_or_else(|| anyhow!("no node {id}"))?;
        let status = Command::new("chown").arg("-R").arg(uid.to_string()).arg(&node.data_dir).status()?;
        if !status.success() {
            bail!("chown -R {uid} {} failed", node.data_dir.display());
        }
        node.uid = Some(uid);
        self.restart(id).await
    }

    /// The `basalt` CLI set up for this cluster: its seeds in `BASALT_CLUSTER`, its CA in
    /// `BASALT_CA`, the admin token in `BASALT_TOKEN_FILE` (once initialized).
    pub fn basalt_cmd(&self) -> Command {
        self.basalt_command(bin("basalt"))
    }

    /// Like [`TestCluster::basalt_cmd`] for a copy of the binary at `program`.
    pub fn basalt_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("BASALT_CLUSTER", self.seeds().join(","))
            .env("BASALT_CA", self.ca_path())
            .env_remove("BASALT_TOKEN")
            .env_remove("BASALT_CERT")
            .env_remove("BASALT_KEY");
        if self.admin_token().is_some() {
            cmd.env("BASALT_TOKEN_FILE", self.admin_token_file());
        } else {
            cmd.env_remove("BASALT_TOKEN_FILE");
        }
        cmd
    }

    /// Runs the `basalt` CLI against this cluster ([`TestCluster::basalt_cmd`]); returns the
    /// exit code, stdout and stderr.
    pub async fn cli(&self, args: &[&str]) -> Result<(Option<i32>, String, String)> {
        let mut cmd = self.basalt_cmd();
        cmd.args(args);
        let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
        Ok((out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned()))
    }

    /// `basalt --json audit list` records.
    pub async fn audit_records(&self) -> Vec<serde_json::Value> {
        let (code, out, err) = self.cli(&["--json", "audit", "list", "--limit", "100000"]).await.expect("run basalt audit list");
        assert_eq!(code, Some(0), "audit list: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("audit list --json is JSON");
        v["records"].as_array().cloned().unwrap_or_default()
    }

    /// Waits (up to 20 s) until the audit log holds a record matching `pred`; panics naming
    /// `what` and the last records otherwise.
    pub async fn wait_for_audit(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let records = self.audit_records().await;
            if let Some(r) = records.iter().find(|r| pred(r)) {
                return r.clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no audit record for {what}; last records: {:#?}",
                &records[records.len().saturating_sub(10)..]
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// A copy of binary `name` that any user may run (the build directory may sit in root's
    /// private home), in the cluster directory.
    pub fn shared_bin(&self, name: &str) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.dir.path().join("bin");
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        let path = dir.join(name);
        if !path.exists() {
            std::fs::copy(bin(name), &path).with_context(|| format!("copying {name} to {}", path.display()))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(path)
    }

    /// Starts node `id` (stopped) and waits up to `timeout` for it to exit on its own, as a node
    /// the cluster refuses does; returns its exit status and log tail.
    pub async fn start_expecting_exit(&mut self, id: u64, timeout: Duration) -> Result<(std::process::ExitStatus, String)> {
        self.spawn(id)?;
        let deadline = tokio::time::Instant::now() + timeout;
        let node = self.nodes.get_mut(&id).ok_or_else(|| anyhow!("no node {id}"))?;
        loop {
            let child = node.child.as_mut().ok_or_else(|| anyhow!("node-{id} has no process"))?;
            if let Some(status) = child.try_wait()? {
                node.child = None;
                return Ok((status, node.log_tail()));
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                node.child = None;
                bail!("node-{id} still ran {timeout:?} after it started:\n{}", node.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts node `id` again from its data directory.
    pub async fn restart(&mut self, id: u64) -> Result<()> {
        self.spawn(id)?;
        self.wait_up(id).await
    }

    /// Logs of every node, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes.values().map(|n| format!("--- node-{} ---\n{}", n.spec.id, n.log_tail())).collect::<Vec<_>>().join("\n")
    }

    /// The cluster's directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::env::var_os("BASALT_TEST_KEEP").is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
            eprintln!("keeping test cluster directory {}", dir.keep().display());
        }
    }
}

/// Where test clusters live: `BASALT_TEST_DIR`, else the system temp dir.
pub fn test_root() -> PathBuf {
    std::env::var_os("BASALT_TEST_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir)
}

/// GETs `path` from `addr` over HTTPS through `dialer`, with a bearer `token` if given; returns
/// the whole response, status line and headers included.
pub async fn https_get(dialer: &Dialer, addr: &str, path: &str, token: Option<&Token>) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = dialer.connect(addr, Expect::AnyNode, Protocol::Http).await?;
    let auth = token.map(|t| format!("Authorization: Bearer {}\r\n", t.expose())).unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: basalt\r\n{auth}Connection: close\r\n\r\n").as_bytes()).await?;
    s.flush().await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    Ok(text)
}

/// Issues `node`'s certificate into its data directory's `tls/`, with a copy of the CA: the
/// node reads them from there (also when it runs as another user, see [`TestCluster::run_as`]).
fn issue_node_certificate(tls_dir: &Path, node: &TestNode) -> Result<()> {
    let dir = node.data_dir.join("tls");
    certs::issue(tls_dir, &Identity::Node(node.spec.id), Validity::days(30), &dir, &["127.0.0.1".to_string()])?;
    std::fs::copy(tls_dir.join(certs::CA_CERT), dir.join(certs::CA_CERT))?;
    Ok(())
}

/// A deterministic pseudo-random generator for workloads; tests print the seed they use.
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// The seed for a randomized test: `BASALT_TEST_SEED` or the clock. Printed so a failure can
/// be replayed.
pub fn seed() -> u64 {
    let seed = std::env::var("BASALT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1));
    println!("BASALT_TEST_SEED={seed}");
    seed
}

/// Calls `f(offset, bytes)` for the data regions of a (sparse) file, in pieces of at most
/// 8 MiB that start 4 KiB-aligned when the regions do (SEEK_DATA/SEEK_HOLE skip the holes).
/// Pieces of one region follow each other; `f` gets `true` as the last argument at the start
/// of a new region.
fn for_each_data_piece(file: &std::fs::File, size: u64, mut f: impl FnMut(u64, &[u8], bool)) {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    let size = size as i64;
    let mut pos: i64 = 0;
    while pos < size {
        // SAFETY: lseek on a file descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { size } else { hole.min(size) };
        let mut off = data;
        let mut first = true;
        while off < end {
            let n = ((end - off) as usize).min(8 << 20);
            let mut buf = vec![0u8; n];
            let Ok(got) = file.read_at(&mut buf, off as u64) else {
                break;
            };
            if got == 0 {
                break;
            }
            f(off as u64, &buf[..got], first);
            first = false;
            off += got as i64;
        }
        pos = end;
    }
}

/// Every file under `root` that contains `marker`, with the number of occurrences. Reads only
/// the data regions of sparse files, in bounded pieces, so multi-GiB data files scan quickly
/// and without holding them in memory.
pub fn find_marker(root: &Path, marker: &[u8]) -> Vec<(PathBuf, u64)> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            // Files may vanish mid-scan (RocksDB deletes obsolete ones): skip them.
            let Ok(file) = std::fs::File::open(&path) else {
                continue;
            };
            let mut hits = 0u64;
            let mut carry: Vec<u8> = Vec::new();
            for_each_data_piece(&file, meta.len(), |_, buf, new_region| {
                if new_region {
                    carry.clear();
                }
                let mut window = std::mem::take(&mut carry);
                window.extend_from_slice(buf);
                hits += window.windows(marker.len()).filter(|w| *w == marker).count() as u64;
                carry = window[window.len().saturating_sub(marker.len() - 1)..].to_vec();
            });
            if hits > 0 {
                found.push((path, hits));
            }
        }
    }
    found.sort();
    found
}

/// A fresh ext4 filesystem on a loop-mounted image file, for tests that search the raw device
/// (free blocks included) for bytes that must be gone. Unmounted on drop.
pub struct Ext4Image {
    /// Holds the image file alone (scan this directory to scan the raw device).
    pub image_dir: tempfile::TempDir,
    /// Where the filesystem is mounted.
    pub mount: PathBuf,
    _mount_parent: tempfile::TempDir,
}

impl Ext4Image {
    /// Creates a sparse image of `size` bytes, makes ext4 on it and mounts it (needs root).
    pub fn mount(size: u64) -> Result<Ext4Image> {
        let image_dir = tempfile::Builder::new().prefix("basalt-image-").tempdir_in(test_root())?;
        let parent = tempfile::Builder::new().prefix("basalt-mnt-").tempdir_in(test_root())?;
        let image = image_dir.path().join("ext4.img");
        std::fs::File::create(&image)?.set_len(size)?;
        let run = |cmd: &mut Command| -> Result<()> {
            let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
            if !out.status.success() {
                bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        };
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))?;
        let mount = parent.path().join("fs");
        std::fs::create_dir(&mount)?;
        run(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&mount))
            .context("mounting a loop image (this test needs root and loop devices)")?;
        Ok(Ext4Image { image_dir, mount, _mount_parent: parent })
    }

    /// Flushes every filesystem's dirty data to its device, so the image holds what the
    /// mounted filesystem holds.
    pub fn sync(&self) {
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
    }
}

impl Drop for Ext4Image {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).output();
    }
}

/// Byte offsets in the data file `path` of every 4 KiB-aligned block equal to `block`.
pub fn find_block(path: &Path, block: &[u8]) -> std::io::Result<Vec<u64>> {
    let file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    let mut at = Vec::new();
    for_each_data_piece(&file, size, |off, buf, _| {
        // Data regions of a file written in 4 KiB blocks start and end block-aligned.
        for (i, b) in buf.chunks(4096).enumerate() {
            if b == block {
                at.push(off + i as u64 * 4096);
            }
        }
    });
    Ok(at)
}

/// A network partition on loopback between the processes of user `uid` (an isolated node
/// started with [`TestCluster::run_as`], and optionally clients run as that user) and everyone
/// else. Packets those processes send to the node's port, and the node's replies, pass; every
/// other packet they send is dropped, and so is every packet anyone else sends to the node's
/// port. Lifted on drop. Uses an nftables table of its own (needs root and `nft`).
pub struct Isolation {
    table: String,
}

impl Isolation {
    /// Cuts off the node listening on `port` and running as `uid` (with its same-user clients).
    pub fn start(port: u16, uid: u32) -> Result<Self> {
        let table = format!("basalt_test_{}", std::process::id());
        let script = format!(
            "add table inet {table}\n\
             add chain inet {table} out {{ type filter hook output priority 0 ; }}\n\
             add rule inet {table} out meta skuid {uid} tcp dport {port} accept\n\
             add rule inet {table} out meta skuid {uid} tcp sport {port} accept\n\
             add rule inet {table} out meta skuid {uid} drop\n\
             add rule inet {table} out tcp dport {port} drop\n"
        );
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nft (install nftables; partitions need root)")?;
        if let Some(stdin) = child.stdin.as_mut() {
            std::io::Write::write_all(stdin, script.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft refused the partition rules: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Self { table })
    }
}

impl Drop for Isolation {
    fn drop(&mut self) {
        let _ = Command::new("nft").args(["delete", "table", "inet", &self.table]).status();
    }
}
