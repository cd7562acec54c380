//! NBD attach, proven with real clients: qemu-io, qemu-img, nbdinfo and fio's nbd engine against
//! `basalt attach` on a real cluster; plus hostile input on the raw socket.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use basalt_tests::{Attached, TestCluster};

fn attach(cluster: &TestCluster, volume: &str, extra: &[&str]) -> Result<Attached, (Option<i32>, String)> {
    cluster.attach_nbd(volume, extra)
}

async fn cluster_with_volume(name: &str, size: u64) -> TestCluster {
    TestCluster::with_volume(name, size).await.unwrap()
}

/// Runs qemu-io with `-c` commands; returns (success, combined output).
fn qemu_io(uri: &str, cmds: &[String]) -> (bool, String) {
    qemu_io_opts(uri, &[], cmds)
}

fn qemu_io_opts(uri: &str, opts: &[&str], cmds: &[String]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]).args(opts);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(uri).output().expect("qemu-io (install qemu-utils)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let ok = out.status.success() && !text.contains("Pattern verification failed") && !text.contains("failed:");
    (ok, text)
}

/// `host:port` of an `nbd://` or `nbds://` URI.
fn host_port(uri: &str) -> (String, String) {
    let rest = uri.split("://").nth(1).expect("a URI");
    let addr = rest.split('/').next().expect("an address");
    let (h, p) = addr.rsplit_once(':').expect("host:port");
    (h.to_string(), p.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_and_the_allow_list_guard_the_tcp_listener_and_refusals_are_audited() {
    let cluster = cluster_with_volume("sec", 16 << 20).await;
    let tls = cluster.path().join("nbd-tls");
    let (code, _, err) = cluster.cli(&["cert", "nbd", "--out", tls.to_str().unwrap(), "--host", "127.0.0.1"]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let tls_dir = tls.to_str().unwrap();

    // A plaintext listener off loopback is refused, naming the ways out; a bad TLS directory
    // fails before anything is attached.
    let (code, msg) = attach(&cluster, "sec", &["--nbd-listen", "0.0.0.0:0"]).err().expect("refused");
    assert_eq!(code, Some(2), "{msg}");
    assert!(msg.contains("--nbd-tls-dir") && msg.contains("--insecure-nbd"), "{msg}");
    let missing = cluster.path().join("no-such-dir");
    let (code, msg) = attach(&cluster, "sec", &["--nbd-tls-dir", missing.to_str().unwrap()]).err().expect("refused");
    assert_ne!(code, Some(0));
    assert!(msg.contains("ca-cert.pem"), "names the missing file: {msg}");

    // With TLS required: an nbds:// URI; QEMU and nbdinfo with the client certificate work,
    // a plaintext client is told TLS is required, a client without a certificate is refused.
    let a = attach(&cluster, "sec", &["--nbd-tls-dir", tls_dir]).expect("attach with TLS (nothing was attached by the refused runs)");
    assert!(a.uri.starts_with("nbds://127.0.0.1:"), "{}", a.uri);
    let (host, port) = host_port(&a.uri);
    let object = format!("tls-creds-x509,id=tls0,endpoint=client,dir={tls_dir}");
    let opts = format!("driver=nbd,host={host},port={port},export=sec,tls-creds=tls0");
    let run = |dir_object: &str| {
        let out = Command::new("qemu-io")
            .args(["--object", dir_object, "--image-opts", &opts, "-c", "write -P 0x5c 4096 64k", "-c", "read -P 0x5c 4096 64k"])
            .output()
            .expect("qemu-io");
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let (ok, out) = run(&object);
    assert!(ok && !out.contains("Pattern verification failed"), "QEMU over TLS: {out}");
    let (ok, out) = qemu_io(&format!("nbd://{host}:{port}/sec"), &["read 0 4k".into()]);
    assert!(!ok && out.contains("TLS"), "a plaintext client is told TLS is required: {out}");
    let info = Command::new("nbdinfo").arg(format!("{}?tls-certificates={tls_dir}", a.uri)).output().expect("nbdinfo");
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.status.success() && text.contains("with TLS") && text.contains("16777216"),
        "nbdinfo over TLS: {text}{}",
        String::from_utf8_lossy(&info.stderr)
    );
    let nocert = cluster.path().join("nbd-nocert");
    std::fs::create_dir_all(&nocert).unwrap();
    std::fs::copy(tls.join("ca-cert.pem"), nocert.join("ca-cert.pem")).unwrap();
    let (ok, out) = run(&format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", nocert.display()));
    assert!(!ok, "a client without a certificate is refused: {out}");
    let r = cluster
        .wait_for_audit("the refused TLS handshake", |r| {
            r["action"] == "connect.nbd" && r["detail"].as_str().is_some_and(|d| d.contains("TLS handshake"))
        })
        .await;
    assert_eq!(r["target"], "sec");
    assert_eq!(r["outcome"], "denied");
    assert!(r["actor"].as_str().unwrap().starts_with("token:"), "the attach process's principal reports it: {r}");
    assert!(r["source"].as_str().unwrap().starts_with("127.0.0.1:"), "{r}");
    drop(a);

    // An allow-list that leaves loopback out: the connection is dropped at accept, and recorded.
    let a = attach(&cluster, "sec", &["--force", "--nbd-allow", "10.0.0.0/8"]).expect("attach");
    let (ok, out) = qemu_io(&a.uri, &["read 0 4k".into()]);
    assert!(!ok, "outside the allow-list: {out}");
    let r = cluster
        .wait_for_audit("the allow-list refusal", |r| r["action"] == "connect.nbd" && r["detail"].as_str().is_some_and(|d| d.contains("allow-list")))
        .await;
    assert_eq!(r["target"], "sec");
    assert!(r["detail"].as_str().unwrap().contains("10.0.0.0/8"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_patterns_across_extents_unaligned_and_at_the_end() {
    let size: u64 = 24 << 20;
    let cluster = cluster_with_volume("io", size).await;
    let a = attach(&cluster, "io", &[]).unwrap();
    let mb4 = 4u64 << 20;
    let cmds = vec![
        // Unaligned, inside one block and across block boundaries.
        "write -P 0x11 1 510".to_string(),
        "write -P 0x22 4000 5000".to_string(),
        // Across the boundary between extents 0 and 1 (and thus two placement groups).
        format!("write -P 0x33 {} 3000", mb4 - 1000),
        format!("write -P 0x44 {} {}", 2 * mb4 - 4096, 3 * 4096 + 7),
        // The last block and the last byte.
        format!("write -P 0x55 {} 4096", size - 4096),
        format!("write -P 0x66 {} 1", size - 1),
        "read -P 0x11 1 510".to_string(),
        "read -P 0x22 4000 5000".to_string(),
        format!("read -P 0x33 {} 3000", mb4 - 1000),
        format!("read -P 0x44 {} {}", 2 * mb4 - 4096, 3 * 4096 + 7),
        format!("read -P 0x55 {} 4095", size - 4096),
        format!("read -P 0x66 {} 1", size - 1),
        // Untouched space reads as zeros.
        format!("read -P 0 {} 65536", 3 * mb4),
        "read -P 0 0 1".to_string(),
    ];
    let (ok, out) = qemu_io(&a.uri, &cmds);
    assert!(ok, "{out}");
    // A write past the end is refused, not truncated or applied.
    let (ok, out) = qemu_io(&a.uri, &[format!("write -P 0x77 {} 8192", size - 4096)]);
    assert!(!ok, "write past the end succeeded: {out}");
    let (ok, out) = qemu_io(&a.uri, &[format!("read -P 0x55 {} 4095", size - 4096)]);
    assert!(ok, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_roundtrip_keeps_every_byte() {
    let size: u64 = 256 << 20;
    let cluster = cluster_with_volume("img", size).await;
    let a = attach(&cluster, "img", &[]).unwrap();
    let src = cluster.path().join("src.img");
    let back = cluster.path().join("back.img");
    // Random content, with a hole in the middle that the copy must keep as zeros.
    let mut f = std::fs::File::create(&src).unwrap();
    let mut rng = basalt_tests::Rng::new(7);
    for i in 0..(size >> 20) {
        let chunk = if (100..110).contains(&i) { vec![0u8; 1 << 20] } else { rng.bytes(1 << 20) };
        f.write_all(&chunk).unwrap();
    }
    drop(f);
    let run = |args: &[&str]| {
        let out = Command::new("qemu-img").args(args).output().expect("qemu-img");
        assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["convert", "-n", "-f", "raw", "-O", "raw", src.to_str().unwrap(), &a.uri]);
    run(&["convert", "-f", "raw", "-O", "raw", &a.uri, back.to_str().unwrap()]);
    let sha = |p: &std::path::Path| {
        let out = Command::new("sha256sum").arg(p).output().unwrap();
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
    };
    assert_eq!(sha(&src), sha(&back), "image changed on its way through Basalt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_shows_size_flags_and_block_sizes() {
    let size: u64 = 64 << 20;
    let cluster = cluster_with_volume("info", size).await;
    let a = attach(&cluster, "info", &[]).unwrap();
    let out = Command::new("nbdinfo").args(["--json", &a.uri]).output().expect("nbdinfo (install libnbd-bin)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "info");
    assert_eq!(e["export-size"], size);
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    for flag in ["can_multi_conn", "can_trim", "can_zero", "can_fua", "can_flush", "can_cache", "can_fast_zero"] {
        assert_eq!(e[flag], true, "{flag} in {e}");
    }
    assert_eq!(e["is_read_only"], false);
    let list = Command::new("nbdinfo").args(["--list", &a.uri]).output().unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).contains("info"), "{}", String::from_utf8_lossy(&list.stdout));

    // Resized while attached: a new connection sees the new size, and can use it.
    let (code, _, err) = cluster.cli(&["volume", "resize", "info", "--size", &(2 * size).to_string()]).await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let out = Command::new("nbdinfo").args(["--size", &a.uri]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), (2 * size).to_string(), "{}", String::from_utf8_lossy(&out.stderr));
    let (ok, out) = qemu_io(&a.uri, &[format!("write -P 0x61 {} 4096", 2 * size - 4096), format!("read -P 0x61 {} 4096", 2 * size - 4096)]);
    assert!(ok, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_verify_over_four_connections_at_depth_32() {
    let cluster = cluster_with_volume("fio", 128 << 20).await;
    let a = attach(&cluster, "fio", &[]).unwrap();
    let (ok, text) =
        fio_verify(&a.uri, &["--name=verify", "--bs=4k", "--bsrange=4k-64k", "--iodepth=32", "--numjobs=4", "--size=24M", "--offset_increment=32M"]);
    assert!(ok, "{text}");
    assert!(verified_clean(&text), "{text}");
}

/// Runs fio's nbd engine against `uri`: random writes carrying crc32c verify headers, then a
/// read-back of every block written (fatal on the first bad one). `job` gives the name (first),
/// sizes and depths. Returns whether fio exited 0, and its combined output.
fn fio_verify(uri: &str, job: &[&str]) -> (bool, String) {
    // `job` first: it starts with `--name`, so every option after it belongs to that job.
    let out = Command::new("fio")
        .args(job)
        .args([
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",
            "--group_reporting",
        ])
        .output()
        .expect("fio");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// fio's output reports no I/O error and no bad block.
fn verified_clean(text: &str) -> bool {
    !text.contains("verify: bad") && text.contains("err= 0")
}

/// fio writes with crc32c verify headers while the leader of one of the volume's PGs is killed
/// with -9 and restarted 10 s later; then fio reads every block back and checks it. The guest
/// side must see neither an I/O error nor a bad block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_verify_survives_a_pg_leader_kill_and_restart() {
    let mut cluster = cluster_with_volume("kill", 128 << 20).await;
    let a = attach(&cluster, "kill", &[]).unwrap();
    let uri = a.uri.clone();
    // Rate-limited so the write phase (2 × 4096 blocks) spans the kill, the failover and the
    // restart.
    let fio = tokio::task::spawn_blocking(move || {
        fio_verify(
            &uri,
            &["--name=verify-across-kill", "--bs=4k", "--iodepth=16", "--numjobs=2", "--size=16M", "--offset_increment=64M", "--rate_iops=300"],
        )
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, leader, _) = cluster.pg_replicas("kill", 0).await.unwrap();
    cluster.kill9(leader);
    tokio::time::sleep(Duration::from_secs(10)).await;
    cluster.restart(leader).await.unwrap();
    let (ok, text) = fio.await.unwrap();
    assert!(ok, "fio failed across the kill of node-{leader}:\n{text}\n{}", cluster.logs());
    assert!(verified_clean(&text), "{text}");
    // The write phase really did span the kill.
    assert!(!fio_finished_before(&text, Duration::from_secs(3)), "fio finished before the kill:\n{text}");
}

/// Whether fio's run took less than `d` (from its "run=" summary, in milliseconds).
fn fio_finished_before(text: &str, d: Duration) -> bool {
    text.split("run=").skip(1).filter_map(|t| t.split(|c: char| !c.is_ascii_digit()).next()?.parse::<u64>().ok()).all(|ms| ms < d.as_millis() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_and_write_zeroes_read_back_as_zeros() {
    let cluster = cluster_with_volume("zero", 16 << 20).await;
    let a = attach(&cluster, "zero", &[]).unwrap();
    let cmds = vec![
        "write -P 0xcd 0 3M".to_string(),
        // Trim a whole chunk and an unaligned piece; zero with and without deallocation.
        "discard 1M 1M".to_string(),
        "discard 4000 9000".to_string(),
        "write -z 2500000 5000".to_string(),
        "write -z -u 2600000 70000".to_string(),
        "read -P 0 1M 1M".to_string(),
        "read -P 0 4000 9000".to_string(),
        "read -P 0 2500000 5000".to_string(),
        "read -P 0 2600000 70000".to_string(),
        // Around them the data is intact.
        "read -P 0xcd 0 4000".to_string(),
        "read -P 0xcd 13000 20000".to_string(),
        "read -P 0xcd 2097152 400000".to_string(),
        "read -P 0xcd 2505000 95000".to_string(),
    ];
    let (ok, out) = qemu_io(&a.uri, &cmds);
    assert!(ok, "{out}");
}

/// A full disk: writes beyond the nodes' chunk space fail with ENOSPC on the NBD reply,
/// everything acknowledged before stays readable, and once space is freed (TRIM, then the
/// scrubber overwrites it) writes succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_writes_with_enospc_keeps_data_and_recovers() {
    // 96 MiB of chunk space per node (88 MiB beyond the reserve); every node holds a replica of
    // every PG. Admission is conservative near full: a leader may fill only a third of the room
    // left (three nodes lead PGs onto each replica), so a 4 MiB extent write is refused once
    // less than 12 MiB is left; 48 MiB stays well clear of that (with 64 MiB it once failed in CI).
    let cluster = TestCluster::with_volume_config("full", 256 << 20, "capacity = \"96MiB\"").await.unwrap();
    let a = attach(&cluster, "full", &[]).unwrap();
    let (ok, out) = qemu_io(&a.uri, &["write -P 0x5a 0 48M".to_string()]);
    assert!(ok, "{out}");
    let (ok, out) = qemu_io(&a.uri, &["write -P 0x5b 64M 64M".to_string()]);
    assert!(!ok && out.contains("No space left on device"), "a write past the chunk space must fail with ENOSPC: {out}");
    let (ok, out) = qemu_io(&a.uri, &["read -P 0x5a 0 48M".to_string()]);
    assert!(ok, "acknowledged data must survive a full disk: {out}");
    // Free 32 MiB. The space returns once the scrubber has overwritten it.
    let (ok, out) = qemu_io(&a.uri, &["discard 0 32M".to_string()]);
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, out) = qemu_io(&a.uri, &["write -P 0x5c 64M 16M".to_string()]);
        if ok {
            break;
        }
        assert!(out.contains("No space left on device"), "{out}");
        assert!(Instant::now() < deadline, "writes still fail 60 s after space was freed: {out}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let cmds = ["read -P 0 0 32M", "read -P 0x5a 32M 16M", "read -P 0x5c 64M 16M"].map(String::from);
    let (ok, out) = qemu_io(&a.uri, &cmds);
    assert!(ok, "after recovering: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_read_write_attachment_at_a_time_and_takeover_fences() {
    let cluster = cluster_with_volume("excl", 8 << 20).await;
    let first = attach(&cluster, "excl", &[]).unwrap();
    let (ok, out) = qemu_io(&first.uri, &["write -P 0x01 0 4096".into()]);
    assert!(ok, "{out}");

    // A second read-write attach is refused while the first holds.
    let Err((code, err)) = attach(&cluster, "excl", &[]) else { panic!("second read-write attach succeeded") };
    assert_eq!(code, Some(7), "{err}");
    assert!(err.contains("already attached"), "{err}");

    // Read-only attachments coexist; the export says read-only, so QEMU will not open it for
    // writing (the server refuses writes too: see the request parser's tests).
    let ro = attach(&cluster, "excl", &["--read-only"]).unwrap();
    let (ok, out) = qemu_io_opts(&ro.uri, &["-r"], &["read -P 0x01 0 4096".into()]);
    assert!(ok, "{out}");
    let (ok, out) = qemu_io(&ro.uri, &["write -P 0x02 0 4096".into()]);
    assert!(!ok && out.contains("Permission denied"), "write through a read-only export: {out}");

    // A forced takeover (live-migration handover) fences the first holder.
    let second = attach(&cluster, "excl", &["--force"]).unwrap();
    let (ok, out) = qemu_io(&second.uri, &["write -P 0x03 0 4096".into()]);
    assert!(ok, "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, _) = qemu_io(&first.uri, &["write -P 0x04 0 4096".into()]);
        if !ok {
            break;
        }
        assert!(Instant::now() < deadline, "the superseded attachment can still write");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, out) = qemu_io(&second.uri, &["read -P 0x03 0 4096".into()]);
    assert!(ok, "the fenced writer's data got through: {out}");
}

/// A raw TCP client speaking (bad) NBD.
fn raw(uri: &str) -> TcpStream {
    let addr = uri.trim_start_matches("nbd://").split('/').next().unwrap();
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

fn go(s: &mut TcpStream, name: &str) {
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle + no zeroes
    let mut opt = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes());
    let data_len = 4 + name.len() + 2;
    opt.extend_from_slice(&(data_len as u32).to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).unwrap();
    // Read replies until ACK (type 1).
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        if typ == 1 {
            return;
        }
        assert_eq!(typ, 3, "unexpected option reply {typ:#x}");
    }
}

fn request(typ: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    request_with(typ, 0, handle, offset, len)
}

fn request_with(typ: u16, flags: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&flags.to_be_bytes());
    r.extend_from_slice(&typ.to_be_bytes());
    r.extend_from_slice(&handle.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

fn simple_reply(s: &mut TcpStream) -> (u32, u64) {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(u32::from_be_bytes(r[0..4].try_into().unwrap()), 0x6744_6698);
    (u32::from_be_bytes(r[4..8].try_into().unwrap()), u64::from_be_bytes(r[8..16].try_into().unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_errors_or_a_closed_connection_and_others_keep_working() {
    let size = 8u64 << 20;
    let cluster = cluster_with_volume("tough", size).await;
    let a = attach(&cluster, "tough", &[]).unwrap();

    // Garbage instead of client flags.
    let mut s = raw(&a.uri);
    s.write_all(&[0xff; 64]).unwrap();
    assert!(closed(&mut s), "unknown client flags must close");
    // Truncated handshake: the client vanishes.
    let mut s = raw(&a.uri);
    s.write_all(&[0, 0]).unwrap();
    drop(s);
    // Unknown export via GO gets an error reply, not a hangup.
    let mut s = raw(&a.uri);
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap();
    let mut opt = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&10u32.to_be_bytes());
    opt.extend_from_slice(&4u32.to_be_bytes());
    opt.extend_from_slice(b"nope");
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).unwrap();
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(u32::from_be_bytes(h[12..16].try_into().unwrap()), (1 << 31) + 6, "NBD_REP_ERR_UNKNOWN");

    // Transmission: bad requests get EINVAL, the connection stays usable.
    let mut s = raw(&a.uri);
    go(&mut s, "tough");
    s.write_all(&request(0, 1, size, 4096)).unwrap(); // read past the end
    assert_eq!(simple_reply(&mut s), (22, 1));
    s.write_all(&request(0, 2, 0, 64 << 20)).unwrap(); // read above the maximum
    assert_eq!(simple_reply(&mut s), (22, 2));
    s.write_all(&request(42, 3, 0, 0)).unwrap(); // unknown command
    assert_eq!(simple_reply(&mut s), (22, 3));
    let mut w = request(1, 4, size - 2, 4); // write past the end: ENOSPC, its payload is skipped
    w.extend_from_slice(&[9, 9, 9, 9]);
    s.write_all(&w).unwrap();
    assert_eq!(simple_reply(&mut s), (28, 4));
    s.write_all(&request(0, 5, 0, 512)).unwrap(); // still in sync: a good read works
    assert_eq!(simple_reply(&mut s), (0, 5));
    let mut data = [0u8; 512];
    s.read_exact(&mut data).unwrap();
    // Block status without a metadata context selected: EINVAL. A cache hint: done.
    s.write_all(&request(7, 8, 0, 4096)).unwrap();
    assert_eq!(simple_reply(&mut s), (22, 8));
    s.write_all(&request(5, 9, 0, 1 << 20)).unwrap();
    assert_eq!(simple_reply(&mut s), (0, 9));
    // Fast zero (§ NBD_CMD_FLAG_FAST_ZERO): refused at once (ENOTSUP) when the blocks must stay
    // allocated, done when they may be trimmed.
    s.write_all(&request_with(6, 0x10 | 0x02, 10, 0, 8192)).unwrap();
    assert_eq!(simple_reply(&mut s), (95, 10));
    s.write_all(&request_with(6, 0x10, 11, 0, 8192)).unwrap();
    assert_eq!(simple_reply(&mut s), (0, 11));
    // A write announcing a gigantic payload cannot be skipped safely: the server hangs up.
    s.write_all(&request(1, 6, 0, u32::MAX)).unwrap();
    assert!(closed(&mut s));
    // A client vanishing mid-write leaves no partial write behind.
    let mut s = raw(&a.uri);
    go(&mut s, "tough");
    let mut w = request(1, 7, 1 << 20, 8192);
    w.extend_from_slice(&[0x5a; 4000]);
    s.write_all(&w).unwrap();
    drop(s);
    // Bad request magic: hang up.
    let mut s = raw(&a.uri);
    go(&mut s, "tough");
    s.write_all(&[0x11; 28]).unwrap();
    assert!(closed(&mut s));

    // Through all of that, a real client works and the abandoned write never landed.
    let (ok, out) = qemu_io(&a.uri, &["write -P 0x42 0 8192".into(), "read -P 0x42 0 8192".into(), "read -P 0 1M 8192".into()]);
    assert!(ok, "{out}");
}

/// `base:allocation` (§ Metadata querying, NBD_CMD_BLOCK_STATUS): nbdinfo and qemu-img see the
/// holes of a sparse volume, at the chunk granularity (1 MiB) the cluster allocates in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_shows_holes_to_nbdinfo_and_qemu_img() {
    const MIB: u64 = 1 << 20;
    let cluster = cluster_with_volume("sparse", 64 * MIB).await;
    let a = attach(&cluster, "sparse", &[]).unwrap();
    let (ok, out) = qemu_io(&a.uri, &["write -P 0xab 8M 1M".into(), "write -P 0xcd 40M 512K".into()]);
    assert!(ok, "{out}");
    let want: Vec<(u64, u64)> = vec![(8 * MIB, MIB), (40 * MIB, MIB)];

    let out = Command::new("nbdinfo").args(["--map", "--json", &a.uri]).output().expect("nbdinfo (install libnbd-bin)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let data: Vec<(u64, u64)> =
        map.as_array().unwrap().iter().filter(|e| e["type"] == 0).map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap())).collect();
    assert_eq!(data, want, "nbdinfo --map: {map}");
    let covered: u64 = map.as_array().unwrap().iter().map(|e| e["length"].as_u64().unwrap()).sum();
    assert_eq!(covered, 64 * MIB, "the map covers the export: {map}");

    let out = Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &a.uri]).output().expect("qemu-img");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let data: Vec<(u64, u64)> =
        map.as_array().unwrap().iter().filter(|e| e["data"] == true).map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap())).collect();
    assert_eq!(data, want, "qemu-img map: {map}");

    // The data is what was written; a trimmed chunk becomes a hole again.
    let (ok, out) = qemu_io(&a.uri, &["read -P 0xab 8M 1M".into(), "discard 8M 1M".into()]);
    assert!(ok, "{out}");
    let out = Command::new("nbdinfo").args(["--map", "--json", &a.uri]).output().unwrap();
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let data: Vec<u64> = map.as_array().unwrap().iter().filter(|e| e["type"] == 0).map(|e| e["offset"].as_u64().unwrap()).collect();
    assert_eq!(data, vec![40 * MIB], "after the trim: {map}");
}

/// Bytes the storage nodes served to reads so far (their `basalt_data_bytes_total{op="read"}`).
async fn bytes_read(cluster: &TestCluster) -> u64 {
    let mut total = 0;
    for id in 1..=3 {
        let m = cluster.metrics(id).await.unwrap();
        let prefix = format!("basalt_data_bytes_total{{node=\"{id}\",op=\"read\"}} ");
        total += m.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0);
    }
    total
}

/// nbdcopy of a 4 GiB volume with 64 MiB written reads about 64 MiB from the cluster: block
/// status lets it skip the holes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_of_a_sparse_volume_moves_only_its_data() {
    const MIB: u64 = 1 << 20;
    let cluster = cluster_with_volume("big", 4096 * MIB).await;
    let a = attach(&cluster, "big", &[]).unwrap();
    let (ok, out) = qemu_io(&a.uri, &["write -P 0x5a 1G 32M".into(), "write -P 0xa5 3G 32M".into()]);
    assert!(ok, "{out}");
    let before = bytes_read(&cluster).await;
    let out = Command::new("nbdcopy").args([&a.uri, "null:"]).output().expect("nbdcopy (install libnbd-bin)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let moved = bytes_read(&cluster).await - before;
    eprintln!("nbdcopy of 4 GiB with 64 MiB written read {moved} bytes from the cluster");
    assert!((64 * MIB..=80 * MIB).contains(&moved), "about 64 MiB read, not the 4 GiB export: {moved}");
}

/// A restarted attach process (kill -9, then the same command line) reclaims its own
/// attachment without --force; another holder is still refused, and the data is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_attach_reclaims_its_attachment() {
    let cluster = cluster_with_volume("again", 8 << 20).await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("again.sock");
    let args = ["--nbd-socket", sock.to_str().unwrap()];
    let mut first = attach(&cluster, "again", &args).unwrap();
    let (ok, out) = qemu_io(&first.uri, &["write -P 0x31 0 4096".into()]);
    assert!(ok, "{out}");
    let _ = first.child.kill();
    let _ = first.child.wait();
    // Its socket file is left behind, as after any kill -9.
    let second = attach(&cluster, "again", &args).unwrap_or_else(|(code, err)| panic!("restart refused ({code:?}): {err}"));
    let (ok, out) = qemu_io(&second.uri, &["read -P 0x31 0 4096".into(), "write -P 0x32 4096 4096".into()]);
    assert!(ok, "{out}");
    let other = dir.path().join("other.sock");
    let Err((code, err)) = attach(&cluster, "again", &["--nbd-socket", other.to_str().unwrap()]) else { panic!("another holder got in") };
    assert_eq!(code, Some(7), "{err}");
}
