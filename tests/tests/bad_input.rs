//! Bad input gets a clear error, never a crash or bad data: configs, I/O requests, admin
//! requests, CLI arguments, and a corrupted block on disk.

use std::process::Command;
use std::time::Duration;

use basalt_chunk_store::{ChunkKey, ChunkStore, ChunkStoreConfig, IndexMemory};
use basalt_common::{BLOCK_SIZE, ExtentIndex, Layout, VolumeId, crc32c};
use basalt_proto::admin::{VolumeCreateRequest, VolumeResizeRequest};
use basalt_proto::data::data_error::Code;
use basalt_proto::data::{ReadRequest, WriteRequest};
use basalt_proto::wire;
use basalt_security::Protocol;
use basalt_tests::{TestCluster, bin, simple_spec};
use basalt_volume_client::ClientError;
use bytes::Bytes;

#[test]
fn invalid_configs_are_refused_with_the_setting_named() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("id = 1\nlisten = \"127.0.0.1:1\"\n", "data_dir"),
        ("id = 1\nlisten = \"not-an-address\"\ndata_dir = \"/tmp/x\"\nroles = [\"meta\"]\n", "listen"),
        ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/tmp/x\"\nroles = [\"meta\"]\nlabels = \"zone\"\n", "labels"),
        ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/tmp/x\"\nroles = [\"meta\"]\ncapacity = \"-3\"\n", "capacity"),
        ("id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/tmp/x\"\nroles = [\"meta\"]\nbogus = 1\n", "bogus"),
        ("id = [\n", "invalid config file"),
    ];
    for (i, (text, expect)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(bin("basalt-node")).arg("--config").arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "case {i}: {stderr}");
        assert!(stderr.contains(expect), "case {i}: expected {expect:?} in {stderr}");
    }
    let out = Command::new(bin("basalt-node"))
        .args(["--id", "1", "--listen", "127.0.0.1:1", "--data-dir", "/tmp/x", "--roles", "meta", "--direct-io", "maybe"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "bad flag value is a usage error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_node_on_a_data_dir_or_port_is_refused() {
    let cluster = TestCluster::start(simple_spec(1)).await.unwrap();
    let n = cluster.node(1);
    // Same data directory, another port: the directory lock refuses it.
    let out = Command::new(bin("basalt-node"))
        .args(["--id", "1", "--roles", "meta", "--listen", &format!("127.0.0.1:{}", basalt_tests::free_port())])
        .arg("--data-dir")
        .arg(&n.data_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another basalt-node"), "{}", String::from_utf8_lossy(&out.stderr));
    // Same port, another directory.
    let other = cluster.path().join("other");
    let out =
        Command::new(bin("basalt-node")).args(["--id", "9", "--roles", "meta", "--listen", &n.addr]).arg("--data-dir").arg(&other).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen on"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_io_and_admin_requests_get_clear_errors() {
    let cluster = TestCluster::start(simple_spec(3)).await.unwrap();
    cluster.init(8, "zone").await.unwrap();
    let status = cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();
    let mut admin = cluster.admin().await.unwrap();
    let created = admin
        .volume_create(VolumeCreateRequest { name: "v".into(), size: 16 << 20, wrapped_key: Default::default(), unencrypted: false, qos: None })
        .await
        .unwrap()
        .into_inner();
    let vol = created.volume.unwrap();
    // Requests carry the map version they were made against, so a node that has not seen the
    // new volume yet catches up instead of refusing.
    let map_version = created.map_version;

    // Admin: duplicates, zero, huge and unaligned sizes, shrinking, bad names.
    let code = |r: Result<tonic::Response<basalt_proto::admin::VolumeReply>, tonic::Status>| r.unwrap_err();
    let e = code(
        admin
            .volume_create(VolumeCreateRequest { name: "v".into(), size: 4096, wrapped_key: Default::default(), unencrypted: false, qos: None })
            .await,
    );
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
    for size in [0u64, 1000, u64::MAX - 4095] {
        let e = code(
            admin.volume_create(VolumeCreateRequest { name: "w".into(), size, wrapped_key: Default::default(), unencrypted: false, qos: None }).await,
        );
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "size {size}: {e}");
    }
    for name in ["", "has space", "-dash", &"x".repeat(64), "slash/name"] {
        let e = code(
            admin
                .volume_create(VolumeCreateRequest { name: name.into(), size: 4096, wrapped_key: Default::default(), unencrypted: false, qos: None })
                .await,
        );
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "name {name:?}: {e}");
    }
    let e = code(admin.volume_resize(VolumeResizeRequest { name: "v".into(), size: 4096 }).await);
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("shrinking"), "{}", e.message());

    // Data: find a leader, then send bad requests to it.
    let layout = Layout { extent_size: status.extent_size, pg_count: status.pg_count };
    let pg = layout.pg_of(VolumeId(vol.id), ExtentIndex(0));
    let leader = status.pgs.iter().find(|p| p.id == pg.0).unwrap().leader;
    let addr = &status.nodes.iter().find(|n| n.id == leader).unwrap().addr;
    let mut data = cluster.data_client(addr).unwrap();
    let block = Bytes::from(vec![7u8; 4096]);
    let good = WriteRequest {
        pg: pg.0,
        volume_id: vol.id,
        offset: 0,
        data: block.clone(),
        crcs: vec![crc32c(&block)],
        fua: false,
        map_version,
        attach_epoch: 0,
        session: 0,
        connection: 0,
        crypt: Bytes::new(),
        write_epoch: 1,
    };
    assert!(data.write(good.clone()).await.unwrap().into_inner().error.is_none());

    let expect = |code: Code, e: Option<basalt_proto::data::DataError>, what: &str| {
        let e = e.unwrap_or_else(|| panic!("{what}: accepted"));
        assert_eq!(e.code, code as i32, "{what}: {}", e.message);
        e.message
    };
    let w = |f: &dyn Fn(&mut WriteRequest)| {
        let mut r = good.clone();
        f(&mut r);
        r
    };
    expect(Code::Invalid, data.write(w(&|r| r.crcs = vec![])).await.unwrap().into_inner().error, "missing checksums");
    let m = expect(Code::Invalid, data.write(w(&|r| r.write_epoch = 0)).await.unwrap().into_inner().error, "no snapshot write epoch");
    assert!(m.contains("write_epoch"), "{m}");
    expect(Code::BadChecksum, data.write(w(&|r| r.crcs = vec![1])).await.unwrap().into_inner().error, "wrong checksum");
    expect(Code::OutOfRange, data.write(w(&|r| r.offset = (16 << 20) - 100)).await.unwrap().into_inner().error, "past the end");
    expect(Code::OutOfRange, data.write(w(&|r| r.offset = u64::MAX - 10)).await.unwrap().into_inner().error, "overflowing offset");
    expect(Code::NoSuchVolume, data.write(w(&|r| r.volume_id = 999)).await.unwrap().into_inner().error, "unknown volume");
    expect(Code::Invalid, data.write(w(&|r| r.data = Bytes::new())).await.unwrap().into_inner().error, "empty write");
    let other_pg = (pg.0 + 1) % status.pg_count;
    let m = expect(Code::Invalid, data.write(w(&|r| r.pg = other_pg)).await.unwrap().into_inner().error, "wrong pg");
    assert!(m.contains("belongs to"), "{m}");
    let crossing = Bytes::from(vec![1u8; 8192]);
    let m = expect(
        Code::Invalid,
        data.write(w(&|r| {
            r.offset = (4 << 20) - 4096;
            r.data = crossing.clone();
            r.crcs = vec![crc32c(&crossing[..4096]), crc32c(&crossing[4096..])];
        }))
        .await
        .unwrap()
        .into_inner()
        .error,
        "crossing an extent",
    );
    assert!(m.contains("extent boundary"), "{m}");
    expect(Code::OutOfRange, data.write(w(&|r| r.data = Bytes::from(vec![0u8; 40 << 20]))).await.unwrap().into_inner().error, "too large");
    // Sealed blocks go to encrypted volumes only, plaintext to the others; a sealed write has
    // one non-zero encryption context per whole block.
    let ctx = Bytes::from(vec![3u8; 28]);
    let m = expect(Code::Invalid, data.write(w(&|r| r.crypt = ctx.clone())).await.unwrap().into_inner().error, "sealed write to a plain volume");
    assert!(m.contains("not encrypted"), "{m}");
    let kek = basalt_volume_client::crypt::Kek::from_bytes([7u8; 32]);
    let (_, wrapped) = basalt_volume_client::crypt::DataKey::generate(1, &kek, "sealed").unwrap();
    let wrapped_key = Bytes::copy_from_slice(wrapped.as_bytes());
    let sealed = admin
        .volume_create(VolumeCreateRequest { name: "sealed".into(), size: 16 << 20, wrapped_key, unencrypted: false, qos: None })
        .await
        .unwrap()
        .into_inner();
    let (spg, sleader, _) = cluster.pg_replicas("sealed", 0).await.unwrap();
    let mut sdata = cluster.data_client(&cluster.node(sleader).addr).unwrap();
    let sw = |f: &dyn Fn(&mut WriteRequest)| {
        let mut r = WriteRequest { pg: spg.0, volume_id: sealed.volume.as_ref().unwrap().id, map_version: sealed.map_version, ..good.clone() };
        f(&mut r);
        r
    };
    let m = expect(Code::Invalid, sdata.write(sw(&|_| {})).await.unwrap().into_inner().error, "plaintext write to an encrypted volume");
    assert!(m.contains("is encrypted"), "{m}");
    let m = expect(Code::Invalid, sdata.write(sw(&|r| r.crypt = Bytes::from(vec![3u8; 27]))).await.unwrap().into_inner().error, "short context");
    assert!(m.contains("encryption context"), "{m}");
    expect(Code::Invalid, sdata.write(sw(&|r| r.crypt = Bytes::from(vec![0u8; 28]))).await.unwrap().into_inner().error, "all-zero context");
    let part = Bytes::from(vec![1u8; 100]);
    let partial = |r: &mut WriteRequest| {
        r.data = part.clone();
        r.crcs = vec![crc32c(&part)];
        r.crypt = ctx.clone();
    };
    expect(Code::Invalid, sdata.write(sw(&partial)).await.unwrap().into_inner().error, "sealed partial block");
    assert!(sdata.write(sw(&|r| r.crypt = ctx.clone())).await.unwrap().into_inner().error.is_none(), "a well-formed sealed write");
    let read = |offset: u64, length: u32| ReadRequest { pg: pg.0, volume_id: vol.id, offset, length, map_version, snapshot_epoch: 0 };
    expect(Code::Invalid, data.read(read(100, 4096)).await.unwrap().into_inner().error, "unaligned read");
    expect(Code::Invalid, data.read(read(0, 100)).await.unwrap().into_inner().error, "short read");
    expect(Code::OutOfRange, data.read(read(16 << 20, 4096)).await.unwrap().into_inner().error, "read past the end");
    // A write from an older connection of a client session, arriving after one from a newer
    // connection (the client gave the older up and retried there), is refused, not applied.
    let stale = Bytes::from(vec![9u8; 4096]);
    let session =
        |connection: u64, data: &Bytes| WriteRequest { session: 0xb5, connection, data: data.clone(), crcs: vec![crc32c(data)], ..good.clone() };
    assert!(data.write(session(2, &block)).await.unwrap().into_inner().error.is_none());
    let m = expect(Code::Unavailable, data.write(session(1, &stale)).await.unwrap().into_inner().error, "write from a superseded connection");
    assert!(m.contains("superseded"), "{m}");
    // The good data is untouched by all of that.
    let r = data.read(read(0, 4096)).await.unwrap().into_inner();
    assert!(r.error.is_none());
    assert_eq!(r.data, block);

    // Through the client library.
    let client = cluster.client().await.unwrap();
    assert!(matches!(client.open_volume("nope").await, Err(ClientError::NoSuchVolume(_))));
    let v = client.open_volume("v").await.unwrap();
    assert!(matches!(v.write((16 << 20) - 10, Bytes::from(vec![0u8; 20]), false).await, Err(ClientError::OutOfRange { .. })));
    assert!(matches!(v.read(u64::MAX - 5, 10).await, Err(ClientError::OutOfRange { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_exit_codes_mean_something() {
    let cluster = TestCluster::start(simple_spec(3)).await.unwrap();
    cluster.init(8, "zone").await.unwrap();
    cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();
    let seeds = cluster.seeds().join(",");
    let run = |args: &[&str], cluster_env: Option<&str>| {
        let started = std::time::Instant::now();
        let mut c = cluster.basalt_cmd();
        c.args(args).env_remove("BASALT_CLUSTER");
        if let Some(v) = cluster_env {
            c.env("BASALT_CLUSTER", v);
        }
        let out = c.output().unwrap();
        println!("basalt {args:?}: {:?}", started.elapsed());
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let s = Some(seeds.as_str());
    assert_eq!(run(&["volume", "create", "a", "--size", "1GiB"], s).0, Some(0));
    let (code, _, err) = run(&["volume", "create", "a", "--size", "1GiB"], s);
    assert_eq!(code, Some(4), "{err}");
    let (code, _, err) = run(&["volume", "create", "b", "--size", "banana"], s);
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("invalid size"), "{err}");
    let (code, _, err) = run(&["volume", "show", "zzz"], s);
    assert_eq!(code, Some(3), "{err}");
    let (code, _, err) = run(&["volume", "list"], None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("BASALT_CLUSTER"), "{err}");
    let dead = format!("127.0.0.1:{}", basalt_tests::free_port());
    let (code, _, err) = run(&["volume", "list"], Some(&dead));
    assert_eq!(code, Some(6), "{err}");
    let (code, out, _) = run(&["--json", "volume", "show", "a"], s);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["size"], 1u64 << 30);
    let token_out = cluster.path().join("second-init.token");
    let (code, _, err) = run(&["cluster", "init", "--admin-token-file", token_out.to_str().unwrap()], s);
    assert_eq!(code, Some(4), "second init: {err}");
    assert!(!token_out.exists(), "a refused init writes no token file");
    let (code, _, _) = run(&["volume", "nonsense"], s);
    assert_eq!(code, Some(2));
    let (code, _, err) = run(&["scrub", "status", "--node", "99"], s);
    assert_eq!(code, Some(3), "scrub status of an unknown node: {err}");
    assert!(err.contains("no node 99"), "{err}");
    let (code, out, err) = run(&["--json", "scrub", "status"], s);
    assert_eq!(code, Some(0), "{err}");
    let nodes: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(nodes.len(), 3, "{out}");
    assert!(nodes.iter().all(|n| n["reachable"] == true && n["pattern"] == "zeros" && n["passes"] == 1), "{out}");
    let (code, _, err) = run(&["scrub", "start", "--rate", "0"], s);
    assert_eq!(code, Some(5), "a scrub rate of zero: {err}");
    assert!(err.contains("--rate"), "{err}");
    let (code, _, err) = run(&["scrub", "start", "--node", "99"], s);
    assert_eq!(code, Some(3), "scrub start on an unknown node: {err}");
    assert!(err.contains("no node 99"), "{err}");
    // A pass over the (nearly empty) cluster finishes and reports nothing bad.
    let (code, out, err) = run(&["--json", "scrub", "start", "--node", "2"], s);
    assert_eq!(code, Some(0), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["kind"], "local", "{out}");
    assert_eq!(report["nodes"][0]["node"], 2, "{out}");
    assert_eq!(report["nodes"][0]["corrupt_found"], 0, "{out}");
    assert!(err.contains("progress_percent"), "--json progress goes to stderr as JSON lines: {err}");
    // Membership commands: three nodes in three zones leave a drain nowhere to go; removing
    // an unknown node, or a node still holding replicas, is refused with the reason.
    let (code, _, err) = run(&["node", "drain", "1"], s);
    assert_eq!(code, Some(7), "drain with no spare domain: {err}");
    assert!(err.contains("cannot drain node-1"), "{err}");
    let (code, _, err) = run(&["node", "remove", "99"], s);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("node-99 is not in the cluster"), "{err}");
    let (code, _, err) = run(&["node", "remove", "2"], s);
    assert_eq!(code, Some(7), "{err}");
    let (code, out, err) = run(&["--json", "node", "list"], s);
    assert_eq!(code, Some(0), "{err}");
    let nodes: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert!(nodes.iter().all(|n| n["replicas"] == 8 && n["draining"] == false), "{out}");
}

/// Reads one reply frame: (kind, id, body).
async fn wire_reply<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Option<(u8, u64, Bytes)>> {
    let Some(h) = wire::read_header(s).await? else {
        return Ok(None);
    };
    let body = wire::read_body(s, &h).await?;
    Ok(Some((h.kind, h.id, body)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_data_protocol_frames_get_errors_or_a_closed_connection() {
    use tokio::io::AsyncWriteExt;
    let cluster = TestCluster::with_volume("v", 16 << 20).await.unwrap();
    let addr = cluster.node(1).addr.clone();
    let frame = |kind: u8, id: u64, body: &[u8]| {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.push(kind);
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(body);
        f
    };

    // A data connection opens with the magic and a Hello carrying the token.
    let token = cluster.admin_token().unwrap();
    let open = |hello: basalt_proto::data::Hello| {
        let cluster = &cluster;
        let addr = addr.clone();
        async move {
            let mut s = cluster.connect(&addr, Protocol::Data).await.unwrap();
            s.write_all(&wire::MAGIC).await.unwrap();
            s.write_all(&wire::encode(wire::Kind::Hello, 1, &hello)).await.unwrap();
            let (kind, id, body) = wire_reply(&mut s).await.unwrap().unwrap();
            assert_eq!((kind, id), (wire::Kind::HelloReply as u8, 1));
            (s, <basalt_proto::data::HelloReply as prost::Message>::decode(body).unwrap())
        }
    };

    // Unknown kind and an undecodable body: each answered with an error frame for its id, and
    // the connection stays usable.
    let (mut s, hello) = open(basalt_proto::data::Hello { token: token.expose() }).await;
    assert!(hello.error.is_none() && hello.principal.starts_with("token:"), "{hello:?}");
    s.write_all(&frame(0x42, 7, b"hello")).await.unwrap();
    let (kind, id, body) = wire_reply(&mut s).await.unwrap().unwrap();
    assert_eq!((kind, id), (wire::Kind::Error as u8, 7));
    let e = <basalt_proto::data::DataError as prost::Message>::decode(body).unwrap();
    assert!(e.message.contains("unknown request kind"), "{e:?}");
    s.write_all(&frame(wire::Kind::Write as u8, 8, &[0xff; 40])).await.unwrap();
    let (kind, id, _) = wire_reply(&mut s).await.unwrap().unwrap();
    assert_eq!((kind, id), (wire::Kind::Error as u8, 8));
    // A well-formed read of a volume that does not exist: a refusal inside the reply.
    let req = ReadRequest { pg: 0, volume_id: 999_999, offset: 0, length: 4096, map_version: 0, snapshot_epoch: 0 };
    s.write_all(&wire::encode(wire::Kind::Read, 9, &req)).await.unwrap();
    let (kind, id, body) = wire_reply(&mut s).await.unwrap().unwrap();
    assert_eq!((kind, id), (wire::Kind::ReadReply as u8, 9));
    let reply = <basalt_proto::data::ReadReply as prost::Message>::decode(body).unwrap();
    assert!(reply.error.is_some() && reply.data.is_empty(), "{reply:?}");

    // A frame announcing more than the limit: the node closes the connection.
    let mut huge = (u32::MAX).to_be_bytes().to_vec();
    huge.push(wire::Kind::Write as u8);
    huge.extend_from_slice(&1u64.to_be_bytes());
    s.write_all(&huge).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), wire_reply(&mut s)).await.expect("oversized frame: connection left open");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");

    // Wrong magic, the protocol's first version, a first frame that is not a Hello, a Hello
    // without credentials or with a bad token, plaintext, and a connection that vanishes
    // mid-frame: refused or closed, nothing else disturbed.
    for magic in [&b"BOGUSMAG"[..], &wire::MAGIC_V1[..], &wire::MAGIC_V2[..]] {
        let mut s = cluster.connect(&addr, Protocol::Data).await.unwrap();
        s.write_all(magic).await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(10), wire_reply(&mut s)).await.expect("bad magic: connection left open");
        assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    }
    let mut s = cluster.connect(&addr, Protocol::Data).await.unwrap();
    s.write_all(&wire::MAGIC).await.unwrap();
    s.write_all(&wire::encode(wire::Kind::Read, 3, &ReadRequest::default())).await.unwrap();
    let (kind, id, body) = wire_reply(&mut s).await.unwrap().unwrap();
    assert_eq!((kind, id), (wire::Kind::HelloReply as u8, 3));
    let reply = <basalt_proto::data::HelloReply as prost::Message>::decode(body).unwrap();
    assert_eq!(reply.error.unwrap().code, Code::Unauthenticated as i32);
    // The harness's client certificate is no data principal on its own: a token is needed.
    let (_, hello) = open(basalt_proto::data::Hello { token: String::new() }).await;
    let e = hello.error.expect("a client certificate alone opens no data connection");
    assert_eq!(e.code, Code::PermissionDenied as i32, "{e:?}");
    let (_, hello) = open(basalt_proto::data::Hello { token: "bst1_nonsense".into() }).await;
    assert_eq!(hello.error.unwrap().code, Code::Unauthenticated as i32);
    let mut plain = tokio::net::TcpStream::connect(&addr).await.unwrap();
    plain.write_all(&wire::MAGIC).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), wire_reply(&mut plain)).await.expect("plaintext: connection left open");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    let (mut s, _) = open(basalt_proto::data::Hello { token: token.expose() }).await;
    s.write_all(&frame(wire::Kind::Write as u8, 1, &[1u8; 100])[..60]).await.unwrap();
    drop(s);

    let client = cluster.client().await.unwrap();
    let v = client.open_volume("v").await.unwrap();
    v.write(4096, Bytes::from(vec![5u8; 8192]), false).await.unwrap();
    assert_eq!(v.read(4096, 8192).await.unwrap(), Bytes::from(vec![5u8; 8192]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_block_is_an_io_error_naming_volume_extent_node() {
    let mut cluster = TestCluster::start(simple_spec(3)).await.unwrap();
    cluster.init(8, "zone").await.unwrap();
    let status = cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();
    let mut admin = cluster.admin().await.unwrap();
    let vol = admin
        .volume_create(VolumeCreateRequest { name: "rot".into(), size: 16 << 20, wrapped_key: Default::default(), unencrypted: false, qos: None })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let client = cluster.client().await.unwrap();
    let v = client.open_volume("rot").await.unwrap();
    // Block 3 of extent 1 (offset 4 MiB + 12 KiB), plus its neighbour as a control.
    let offset = (4 << 20) + 3 * BLOCK_SIZE;
    v.write(offset, Bytes::from(vec![0xC3u8; 8192]), false).await.unwrap();
    assert_eq!(v.read(offset, 8192).await.unwrap(), Bytes::from(vec![0xC3u8; 8192]));
    // Let the followers apply the write before they stop: one that had not would apply it again
    // from its log on restart, rewriting the block intact, and the read below would then be
    // (rightly) repaired from it. Seen once under a loaded CI run.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Flip one bit of that block in every replica's data file while the nodes are down.
    let layout = Layout { extent_size: status.extent_size, pg_count: status.pg_count };
    let pg = layout.pg_of(VolumeId(vol.id), ExtentIndex(1));
    for id in 1..=3 {
        assert!(cluster.stop(id).await.unwrap().success());
    }
    for id in 1..=3 {
        let node = cluster.node(id);
        let cfg = ChunkStoreConfig {
            data_path: node.data_dir.join("chunks.dat"),
            index_dir: node.data_dir.join("chunk-index"),
            capacity: 4 << 30,
            direct_io: true,
            queue_depth: 8,
            index_memory: IndexMemory { cache_bytes: 4 << 20, write_buffer_bytes: 2 << 20 },
        };
        let store = ChunkStore::open(&cfg).unwrap();
        let chunk = offset / basalt_common::CHUNK_SIZE;
        let slot = store.locate(ChunkKey { shard: pg.0, volume: VolumeId(vol.id), chunk, epoch: 1 }).expect("chunk on every replica");
        drop(store);
        let at = slot + (offset % basalt_common::CHUNK_SIZE) + 100;
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&cfg.data_path).unwrap();
        let mut byte = [0u8; 1];
        f.read_exact_at(&mut byte, at).unwrap();
        byte[0] ^= 0x01;
        f.write_all_at(&byte, at).unwrap();
        f.sync_all().unwrap();
    }
    for id in 1..=3 {
        cluster.restart(id).await.unwrap();
    }
    cluster.wait_healthy(3, Duration::from_secs(60)).await.unwrap();
    let client = cluster.client().await.unwrap();
    let v = client.open_volume("rot").await.unwrap();
    let err = v.read(offset, 4096).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ClientError::Corrupt(_)), "{msg}");
    assert!(msg.contains(&format!("vol-{}", vol.id)) && msg.contains("extent 1") && msg.contains("node-"), "{msg}");
    assert!(msg.contains("no replica holds an intact copy"), "with every copy bad nothing is guessed at: {msg}");
    // The neighbouring block is intact and still readable.
    assert_eq!(v.read(offset + BLOCK_SIZE, 4096).await.unwrap(), Bytes::from(vec![0xC3u8; 4096]));
}
