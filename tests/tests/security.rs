//! Nobody gets in who should not: TLS on every port, tokens with roles and grants, allow-lists,
//! the audit log. Real node processes, the real CLI.

use std::time::{Duration, Instant};

use basalt_proto::admin::{NodeInfoRequest, VolumeCreateRequest};
use basalt_security::certs::{self, Validity};
use basalt_security::{Dialer, Expect, Identity, Protocol, TlsContext, TlsFiles, Token};
use basalt_tests::{NodeSpec, TestCluster};
use basalt_volume_client::ClientError;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A dialer presenting `identity`'s certificate from the CA in `ca_dir`, trusting that CA.
fn dialer_of(ca_dir: &std::path::Path, identity: &Identity, validity: Validity) -> Dialer {
    let files = certs::issue(ca_dir, identity, validity, ca_dir, &[]).unwrap();
    let tls = TlsFiles { ca: ca_dir.join(certs::CA_CERT), cert: Some(files.cert), key: Some(files.key) };
    Dialer::new(Some(std::sync::Arc::new(TlsContext::load(tls).unwrap())))
}

/// Whether a plaintext connection to `addr` is closed without a byte of answer.
async fn plaintext_is_closed(addr: &str, first: &[u8]) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return true };
    let _ = s.write_all(first).await;
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf)).await, Ok(Ok(0)) | Ok(Err(_)))
}

/// Whether a TLS connection attempt was refused: its handshake failed, or — TLS 1.3 reports a
/// refused client certificate only then — the first read after sending `first` finds it closed.
async fn refused<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(attempt: std::io::Result<S>, first: &[u8]) -> bool {
    let Ok(mut s) = attempt else { return true };
    let _ = s.write_all(first).await;
    let mut buf = [0u8; 16];
    matches!(tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await, Ok(Ok(0)) | Ok(Err(_)))
}

/// Waits until `log` holds a line containing every one of `needles`.
async fn wait_for_log(log: &std::path::Path, needles: &[&str], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: no log line with {needles:?} in {}", log.display());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `basalt auth token create ARGS --out DIR/FILE`; the token file and the token.
async fn create_token(cluster: &TestCluster, args: &[&str], file: &str) -> (std::path::PathBuf, Token) {
    let path = cluster.path().join(file);
    let mut all = vec!["auth", "token", "create", "--out", path.to_str().unwrap()];
    all.extend_from_slice(args);
    let (code, out, err) = cluster.cli(&all).await.unwrap();
    assert_eq!(code, Some(0), "token create {all:?}: {err}");
    assert!(!out.contains("bst1_"), "a token written to a file is not printed: {out}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let token = Token::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
    (path, token)
}

/// When node `id`'s certificate expires, as `basalt node list` says.
async fn cert_expiry(cluster: &TestCluster, id: u64) -> i64 {
    let (_, out, _) = cluster.cli(&["--json", "node", "list"]).await.unwrap();
    let nodes: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    nodes.iter().find(|n| n["id"] == id).unwrap()["cert_not_after"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_foreign_ca_peers_are_refused_on_every_port() {
    let mut cluster = TestCluster::with_volume("v", 16 << 20).await.unwrap();
    let other = tempfile::tempdir().unwrap();
    certs::init_ca(other.path(), 30).unwrap();
    let node = cluster.node(1).addr.clone();
    let metrics = cluster.node(1).metrics_addr.clone();

    // Plaintext: the data protocol's magic, the Raft magic, an HTTP/2 preface, HTTP/1.
    for (port, first) in [
        (&node, &basalt_proto::wire::MAGIC[..]),
        (&node, &b"RAFTBSL1"[..]),
        (&node, &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..]),
        (&metrics, &b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"[..]),
    ] {
        assert!(plaintext_is_closed(port, first).await, "a plaintext {:?} to {port} was answered", String::from_utf8_lossy(first));
    }
    wait_for_log(&cluster.node(1).log, &["refused a connection", "127.0.0.1:", "plaintext"], "plaintext").await;

    // A client of another CA: it cannot verify the nodes, and they refuse its certificate.
    let foreign = dialer_of(other.path(), &Identity::Client("intruder".into()), Validity::days(1));
    for (addr, protocol) in [(&node, Protocol::Data), (&node, Protocol::Grpc), (&node, Protocol::Raft), (&metrics, Protocol::Http)] {
        let e = foreign.connect(addr, Expect::AnyNode, protocol).await.err().unwrap_or_else(|| panic!("{protocol:?} to {addr} accepted another CA"));
        assert!(e.to_string().contains("certificate"), "{protocol:?}: {e}");
    }
    // Trusting our CA but presenting another CA's node certificate: refused by the node.
    let mixed_dir = tempfile::tempdir().unwrap();
    let files = certs::issue(other.path(), &Identity::Node(2), Validity::days(1), mixed_dir.path(), &[]).unwrap();
    let mixed = Dialer::new(Some(std::sync::Arc::new(
        TlsContext::load(TlsFiles { ca: cluster.ca_path(), cert: Some(files.cert), key: Some(files.key) }).unwrap(),
    )));
    for (addr, protocol) in [(&node, Protocol::Raft), (&node, Protocol::Grpc), (&metrics, Protocol::Http)] {
        assert!(
            refused(mixed.connect(addr, Expect::AnyNode, protocol).await, b"x").await,
            "{protocol:?} to {addr} accepted a certificate of another CA"
        );
    }
    wait_for_log(&cluster.node(1).log, &["refused a connection", "UnknownIssuer"], "foreign certificate").await;
    // A client certificate of our CA is no node: the Raft transport refuses it.
    let ours = cluster.connect(&node, Protocol::Raft).await.map_err(std::io::Error::other);
    assert!(refused(ours, b"RAFTBSL1").await, "the Raft transport served a client certificate");
    wait_for_log(&cluster.node(1).log, &["refused a connection", "node certificates only"], "client certificate on Raft").await;
    let text = cluster.metrics(1).await.unwrap();
    let refused: u64 =
        text.lines().filter(|l| l.starts_with("basalt_connections_refused_total{")).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum();
    assert!(refused >= 8, "refusals are counted:\n{text}");

    // A node of another cluster cannot join: its heartbeats and Raft connections are refused,
    // and it never appears in the node list.
    cluster.add_foreign_node(NodeSpec { id: 4, labels: "zone=z4,host=h4".into(), roles: vec!["storage"] }, other.path()).unwrap();
    wait_for_log(&cluster.node(1).log, &["refused a connection", "UnknownIssuer"], "foreign node").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let status = cluster.status().await.unwrap();
    assert!(status.nodes.iter().all(|n| n.id != 4), "a node of another CA registered: {:?}", status.nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_checked_and_every_refusal_is_audited() {
    let cluster = TestCluster::with_volume("a", 16 << 20).await.unwrap();
    let mut admin = cluster.admin().await.unwrap();
    admin
        .volume_create(VolumeCreateRequest { name: "b".into(), size: 16 << 20, wrapped_key: Default::default(), unencrypted: false, qos: None })
        .await
        .unwrap();
    let dir = cluster.path().to_path_buf();
    let (reader, _) = create_token(&cluster, &["--role", "reader", "--name", "dash"], "reader.token").await;
    let (hv_a, hv_a_token) = create_token(&cluster, &["--role", "hypervisor", "--volume", "a"], "hv-a.token").await;
    let (revoked, revoked_token) = create_token(&cluster, &["--role", "admin"], "revoked.token").await;
    let (expiring, _) = create_token(&cluster, &["--role", "admin", "--expires", "2s"], "expiring.token").await;
    let (elsewhere, _) = create_token(&cluster, &["--role", "admin", "--allow-from", "10.9.0.0/16"], "elsewhere.token").await;
    let (code, _, err) = cluster.cli(&["auth", "token", "revoke", &revoked_token.id().to_string()]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let wrong = dir.join("wrong.token");
    std::fs::write(&wrong, format!("{}\n", Token::generate().expose())).unwrap();
    let forged = dir.join("forged.token");
    // The revoked token's id with another secret.
    let text = revoked_token.expose();
    std::fs::write(&forged, format!("{}{}\n", &text[..text.len() - 8], if text.ends_with("00000000") { "11111111" } else { "00000000" })).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await; // `expiring` is past its 2 s now.

    // (token file or none, command, expected exit code, expected message part)
    let no_token = dir.join("none");
    let cases: Vec<(&std::path::Path, Vec<&str>, i32, &str)> = vec![
        (&no_token, vec!["volume", "list"], 8, "no credentials"),
        (&wrong, vec!["volume", "list"], 8, "unknown token"),
        (&forged, vec!["volume", "list"], 8, "wrong secret"),
        (&revoked, vec!["volume", "list"], 8, "revoked"),
        (&expiring, vec!["volume", "list"], 8, "expired"),
        (&elsewhere, vec!["volume", "list"], 9, "may not be used from 127.0.0.1"),
        (&reader, vec!["volume", "create", "c", "--size", "1MiB"], 9, "may not volume.create"),
        (&reader, vec!["auth", "token", "list"], 9, "may not auth.token.list"),
        (&hv_a, vec!["volume", "show", "b"], 9, "no grant for volume b"),
        (&hv_a, vec!["detach", "b"], 9, "no grant for volume b"),
        (&hv_a, vec!["node", "drain", "1"], 9, "may not node.drain"),
    ];
    for (file, args, expect, part) in &cases {
        let mut cmd = cluster.basalt_cmd();
        if file.exists() {
            cmd.env("BASALT_TOKEN_FILE", file);
        } else {
            cmd.env_remove("BASALT_TOKEN_FILE");
        }
        let out = cmd.args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(*expect), "{args:?} with {}: {err}", file.display());
        assert!(err.contains(part), "{args:?} with {}: {err}", file.display());
        if let Ok(t) = std::fs::read_to_string(file) {
            assert!(!err.contains(t.trim()), "the message repeats the token: {err}");
            assert!(!err.contains(&t.trim()[22..]), "the message repeats the token's secret: {err}");
        }
    }
    // A token given in BASALT_TOKEN that is not a token at all.
    let out = cluster.basalt_cmd().env_remove("BASALT_TOKEN_FILE").env("BASALT_TOKEN", "hunter2hunter2").args(["volume", "list"]).output().unwrap();
    assert_eq!(out.status.code(), Some(8));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("hunter2"), "{}", String::from_utf8_lossy(&out.stderr));

    // The hypervisor token works for its own volume, also for data.
    let client = cluster.client_with(Some(hv_a_token.clone())).await.unwrap();
    let a = client.attach_volume("a", "host-1", false).await.unwrap();
    a.write(0, Bytes::from(vec![7u8; 4096]), false).await.unwrap();
    assert_eq!(a.read(0, 4096).await.unwrap(), Bytes::from(vec![7u8; 4096]));
    assert!(matches!(client.open_volume("b").await, Err(ClientError::PermissionDenied(_))));
    // A volume of the map it was not granted is not even listed to it.
    assert!(client.map().volume_by_name("b").is_none(), "a token limited to volume a sees volume b in the map");

    // Every refusal is in the audit log, with the actor, the source and the reason.
    let records = cluster.audit_records().await;
    let denied: Vec<&serde_json::Value> = records.iter().filter(|r| r["outcome"] == "denied").collect();
    for (file, args, _, part) in &cases {
        let found =
            denied.iter().any(|r| r["detail"].as_str().unwrap_or("").contains(part) && r["source"].as_str().unwrap_or("").starts_with("127.0.0.1"));
        assert!(found, "no denied audit record for {args:?} with {} ({part}); denied records: {denied:#?}", file.display());
    }
    let detach = denied.iter().find(|r| r["action"] == "volume.detach").expect("the refused detach is audited");
    assert_eq!(detach["actor"], format!("token:{}", hv_a_token.id()));
    assert_eq!(detach["target"], "b");
    // And what was done is there too: token creation and revocation, the attach, by whom.
    let admin_actor = format!("token:{}", cluster.admin_token().unwrap().id());
    for (action, target) in
        [("auth.token.revoke", revoked_token.id().to_string()), ("volume.attach", "a by host-1".into()), ("volume.create", "b".into())]
    {
        let r = records.iter().find(|r| r["action"] == action && r["target"].as_str().unwrap_or("").starts_with(&target));
        let r = r.unwrap_or_else(|| panic!("no audit record of {action} {target}"));
        assert_eq!(r["outcome"], "ok", "{r}");
        if action != "volume.attach" {
            assert!(r["actor"].as_str().unwrap().starts_with(&admin_actor), "{r}");
        }
    }
    assert!(records.iter().any(|r| r["action"] == "cluster.init" && r["actor"] == "client:test-admin"), "cluster init is audited");
    let text = serde_json::to_string(&records).unwrap();
    for t in [&hv_a_token, &revoked_token] {
        assert!(!text.contains(&t.expose()), "a token appears in the audit log");
    }
    // Even an admin token cannot feed a replica a Raft snapshot: that takes a node certificate.
    let channel = basalt_security::grpc::channel(&cluster.node(1).addr, &cluster.dialer().unwrap(), Expect::AnyNode, |ep| ep).unwrap();
    let mut raft = basalt_proto::raft::raft_transport_client::RaftTransportClient::with_interceptor(
        channel,
        basalt_security::grpc::Bearer::new(cluster.admin_token().as_ref()),
    );
    let chunk = basalt_proto::raft::SnapshotChunk { group: 0, header: Bytes::new(), data: Bytes::new(), from_node: 1 };
    let e = raft.install_snapshot(futures::stream::iter(vec![chunk])).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    // Nothing is listed about tokens but their hashes' owners: `token list` shows no secret.
    let (code, out, _) = cluster.cli(&["--json", "auth", "token", "list"]).await.unwrap();
    assert_eq!(code, Some(0));
    assert!(!out.contains("bst1_"), "{out}");
    assert!(out.contains(&revoked_token.id().to_string()) && out.contains("\"revoked_unix_ms\""), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_while_its_data_connection_is_open_loses_access_within_seconds() {
    let cluster = TestCluster::with_volume("vm", 16 << 20).await.unwrap();
    let path = cluster.path().join("hv.token");
    let (code, _, err) =
        cluster.cli(&["auth", "token", "create", "--role", "hypervisor", "--volume", "vm", "--out", path.to_str().unwrap()]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let token = Token::parse(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let client = cluster.client_with(Some(token.clone())).await.unwrap();
    let vol = client.attach_volume("vm", "host-1", false).await.unwrap();
    let writer = tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            let block = Bytes::from(vec![(n % 251) as u8; 4096]);
            match vol.write((n % 1024) * 4096, block, false).await {
                Ok(()) => n += 1,
                Err(e) => return (n, e, Instant::now()),
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let revoked_at = Instant::now();
    let (code, _, err) = cluster.cli(&["auth", "token", "revoke", &token.id().to_string()]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let (writes, e, failed_at) = tokio::time::timeout(Duration::from_secs(30), writer).await.expect("writes went on after revocation").unwrap();
    let took = failed_at.saturating_duration_since(revoked_at);
    println!("{writes} writes before revocation; refused {took:?} after `token revoke` began: {e}");
    assert!(writes > 10, "the writer was writing before the revocation");
    assert!(matches!(e, ClientError::Unauthenticated(_)), "{e}");
    assert!(e.to_string().contains("revoked"), "{e}");
    assert!(took < Duration::from_secs(5), "access lasted {took:?} after revocation");
    cluster
        .wait_for_audit("the refused write", |r| {
            r["action"] == "data.write" && r["outcome"] == "denied" && r["actor"].as_str().unwrap_or("").contains(&token.id().to_string())
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_refusals_are_counted_and_audited() {
    // Data only from 127.0.0.2; the harness connects from 127.0.0.1.
    let cluster = TestCluster::with_volume_config("v", 16 << 20, "security.allow.data = [\"127.0.0.2/32\"]\n").await.unwrap();
    let client = cluster.client().await.unwrap();
    let vol = client.open_volume("v").await.unwrap();
    // Admin works (its list is open); data connections are refused before any key exchange,
    // which to the client looks like a network that drops them: it retries until it gives up.
    let read = tokio::time::timeout(Duration::from_secs(5), vol.read(0, 4096)).await;
    assert!(!matches!(read, Ok(Ok(_))), "a read from outside the data allow-list succeeded");
    let mut counted = 0;
    for id in 1..=3 {
        let text = cluster.metrics(id).await.unwrap();
        counted += text
            .lines()
            .filter(|l| l.starts_with("basalt_connections_refused_total{") && l.contains("reason=\"refused\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>();
    }
    assert!(counted > 0, "allow-list refusals are counted");
    let r = cluster
        .wait_for_audit("an allow-list refusal", |r| {
            r["outcome"] == "denied" && r["detail"].as_str().unwrap_or("").contains("not in the data allow-list")
        })
        .await;
    assert!(r["source"].as_str().unwrap().starts_with("127.0.0.1:"), "{r}");
    assert_eq!(r["action"], "connect.port");
    // A flood is not recorded one by one: two hundred refused connections leave a burst of
    // records and a summary.
    let dialer = cluster.anonymous_dialer().unwrap();
    let addr = cluster.node(1).addr.clone();
    let refused_one_by_one =
        |records: &[serde_json::Value]| records.iter().filter(|r| r["detail"].as_str().unwrap_or("").contains("not in the data allow-list")).count();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = refused_one_by_one(&cluster.audit_records().await);
    for _ in 0..200 {
        let _ = dialer.connect(&addr, Expect::AnyNode, Protocol::Data).await;
    }
    let summary = cluster.wait_for_audit("the suppressed refusals", |r| r["action"] == "audit.suppressed").await;
    println!("{summary}");
    let one_by_one = refused_one_by_one(&cluster.audit_records().await) - before;
    println!("{one_by_one} of 200 refused connections recorded one by one");
    assert!(one_by_one < 100, "{one_by_one} refusals recorded one by one out of 200 (rate limit)");
    // NodeInfo still answers: other protocols are unaffected.
    let mut admin = cluster.admin_at(&addr).unwrap();
    admin.node_info(NodeInfoRequest {}).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_survives_a_lost_meta_leader_and_verify_finds_edits_and_deletions() {
    // Frequent checkpoints, so the records tampered with below are behind one (records after
    // a node's checkpoint are written again from its Raft log when it restarts).
    let mut cluster = TestCluster::with_volume_config("v", 16 << 20, "[raft]\ncheckpoint_every_entries = 8\n").await.unwrap();
    for i in 0..6 {
        let (code, _, err) = cluster.cli(&["volume", "create", &format!("x{i}"), "--size", "1MiB"]).await.unwrap();
        assert_eq!(code, Some(0), "{err}");
    }
    let (code, out, err) = cluster.cli(&["--json", "audit", "verify"]).await.unwrap();
    assert_eq!(code, Some(0), "an untouched log verifies: {err}\n{out}");

    // kill -9 the meta leader: everything recorded stays, and recording goes on.
    let leader = cluster.status().await.unwrap().meta_leader;
    cluster.kill9(leader);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, _, err) = cluster.cli(&["volume", "create", "after", "--size", "1MiB"]).await.unwrap();
        if code == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "no volume created after the meta leader's loss: {err}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let records = cluster.audit_records().await;
    for i in 0..6 {
        assert!(records.iter().any(|r| r["action"] == "volume.create" && r["target"] == format!("x{i}")), "record of x{i} lost with the leader");
    }
    assert!(records.iter().any(|r| r["action"] == "volume.create" && r["target"] == "after"));
    cluster.restart(leader).await.unwrap();
    cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, out, err) = cluster.cli(&["--json", "audit", "verify"]).await.unwrap();
        if code == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "the log does not verify after the leader's return: {err}\n{out}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Let every node checkpoint past the records below.
    for i in 0..10 {
        let _ = cluster.cli(&["volume", "create", &format!("y{i}"), "--size", "1MiB"]).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Edit one record in a stopped node's copy: verify names the node and the record.
    let edited_node = 2;
    assert!(cluster.stop(edited_node).await.unwrap().success());
    let file = cluster.node(edited_node).data_dir.join("audit").join("audit.jsonl");
    let text = std::fs::read_to_string(&file).unwrap();
    let line = text.lines().find(|l| l.contains("\"action\":\"volume.create\"") && l.contains("\"target\":\"x1\"")).unwrap().to_string();
    let seq = serde_json::from_str::<serde_json::Value>(&line).unwrap()["seq"].as_u64().unwrap();
    std::fs::write(&file, text.replace(&line, &line.replace("\"target\":\"x1\"", "\"target\":\"x9\""))).unwrap();
    // Delete another in a third node's copy.
    let deleted_node = if leader == 3 { 1 } else { 3 };
    assert!(cluster.stop(deleted_node).await.unwrap().success());
    let file3 = cluster.node(deleted_node).data_dir.join("audit").join("audit.jsonl");
    let text3 = std::fs::read_to_string(&file3).unwrap();
    let gone = text3.lines().find(|l| l.contains("\"target\":\"x3\"")).unwrap().to_string();
    let gone_seq = serde_json::from_str::<serde_json::Value>(&gone).unwrap()["seq"].as_u64().unwrap();
    std::fs::write(&file3, text3.replace(&format!("{gone}\n"), "")).unwrap();
    cluster.restart(edited_node).await.unwrap();
    cluster.restart(deleted_node).await.unwrap();
    cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();

    let (code, out, err) = cluster.cli(&["--json", "audit", "verify"]).await.unwrap();
    assert_eq!(code, Some(10), "tampering goes unnoticed: {out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let verdict = |id: u64| v["nodes"].as_array().unwrap().iter().find(|n| n["node"] == id).unwrap().clone();
    let edited = verdict(edited_node);
    assert_eq!(edited["problem_seq"], seq, "{v}");
    assert!(edited["problem"].as_str().unwrap().contains("altered"), "{v}");
    let deleted = verdict(deleted_node);
    assert_eq!(deleted["problem_seq"], gone_seq, "{v}");
    assert!(deleted["problem"].as_str().unwrap().contains("missing"), "{v}");
    let untouched = 6 - edited_node - deleted_node;
    assert_eq!(verdict(untouched)["ok"], true, "{v}");
    assert!(err.contains(&format!("node-{edited_node}")) && err.contains(&format!("node-{deleted_node}")), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_a_restart_and_expired_ones_are_refused() {
    let cluster = TestCluster::with_volume_config("v", 16 << 20, "security.reload_secs = 1\n").await.unwrap();
    let client = cluster.client().await.unwrap();
    let vol = client.open_volume("v").await.unwrap();
    let io = tokio::spawn(async move {
        let mut n = 0u64;
        let stop = Instant::now() + Duration::from_secs(12);
        while Instant::now() < stop {
            let block = Bytes::from(vec![(n % 251) as u8; 4096]);
            vol.write((n % 512) * 4096, block.clone(), false).await.map_err(|e| format!("write {n}: {e}"))?;
            if vol.read((n % 512) * 4096, 4096).await.map_err(|e| format!("read {n}: {e}"))? != block {
                return Err(format!("read {n} returned other data"));
            }
            n += 1;
        }
        Ok::<u64, String>(n)
    });
    let before = cert_expiry(&cluster, 2).await;
    assert!(before > basalt_security::identity::unix_now(), "node list shows the certificate's expiry");
    // Replace node 2's certificate on disk with a shorter-lived one, under I/O.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let node2_tls = cluster.node(2).data_dir.join("tls");
    certs::issue(cluster.tls_dir(), &Identity::Node(2), Validity::days(7), &node2_tls, &["127.0.0.1".into()]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = cert_expiry(&cluster, 2).await;
        if now != before {
            assert!(now < before, "the new certificate is the 7-day one");
            break;
        }
        assert!(Instant::now() < deadline, "node 2 never picked up its new certificate");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_for_log(&cluster.node(2).log, &["reloaded TLS certificate files"], "reload").await;
    // New connections to node 2 get the new certificate.
    let mut s = cluster.connect(&cluster.node(2).addr, Protocol::Grpc).await.unwrap();
    let _ = s.shutdown().await;

    // An expired replacement is refused by name; the node keeps serving with the one it has.
    let past = Validity {
        from: time::OffsetDateTime::now_utc() - time::Duration::days(3),
        until: time::OffsetDateTime::now_utc() - time::Duration::days(1),
    };
    let node3_tls = cluster.node(3).data_dir.join("tls");
    certs::issue(cluster.tls_dir(), &Identity::Node(3), past, &node3_tls, &[]).unwrap();
    wait_for_log(&cluster.node(3).log, &["could not be loaded", "expired at"], "expired replacement").await;
    let writes = io.await.unwrap().unwrap_or_else(|e| panic!("I/O failed during rotation: {e}"));
    println!("{writes} writes and reads through the rotation");
    let text = cluster.metrics(3).await.unwrap();
    assert!(text.lines().any(|l| l.starts_with("basalt_tls_reloads_total") && l.contains("error") && !l.ends_with(" 0")), "{text}");

    // A client presenting an expired certificate is refused, and the node says why.
    let old = tempfile::tempdir().unwrap();
    let files = certs::issue(cluster.tls_dir(), &Identity::Client("stale".into()), past, old.path(), &[]).unwrap();
    // The client side refuses to load it, so present it through a raw rustls config.
    assert!(
        TlsContext::load(TlsFiles { ca: cluster.ca_path(), cert: Some(files.cert.clone()), key: Some(files.key.clone()) })
            .unwrap_err()
            .to_string()
            .contains("expired")
    );
    let chain = basalt_security::tls::read_certs(&files.cert).unwrap();
    let key = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::PrivateKeyDer::from_pem_slice(&std::fs::read(&files.key).unwrap()).unwrap()
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in basalt_security::tls::read_certs(&cluster.ca_path()).unwrap() {
        roots.add(c).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(basalt_security::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(&cluster.node(1).addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("node-1.basalt").unwrap();
    let attempt = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await;
    assert!(refused(attempt, b"x").await, "an expired client certificate was accepted");
    wait_for_log(&cluster.node(1).log, &["refused a connection", "xpired"], "expired client certificate").await;
    // Nothing else was disturbed: the cluster still serves.
    let mut admin = cluster.admin().await.unwrap();
    admin
        .volume_create(VolumeCreateRequest { name: "still".into(), size: 1 << 20, wrapped_key: Default::default(), unencrypted: false, qos: None })
        .await
        .unwrap();
    // A node whose own certificate has expired does not start, and says why.
    let mut cluster = cluster;
    assert!(cluster.stop(3).await.unwrap().success());
    let e = cluster.restart(3).await.unwrap_err().to_string();
    assert!(e.contains("expired at"), "{e}");
}
