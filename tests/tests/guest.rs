//! The hypervisor case: QEMU boots a small Linux guest (a Debian kernel and a busybox
//! initramfs with e2fsprogs, built by `scripts/build-guest`) whose virtio disk is a Basalt
//! volume, attached over NBD or served by `basalt attach --vhost-user-socket` as a
//! vhost-user-blk device. The guest's task comes from its kernel command line (see the script):
//! it makes an ext4 file system and writes a file, "reboots" (a second QEMU on the same
//! attachment) and checks the file system and the file, then writes a raw pattern the test
//! reads back through the volume client. The restart tests kill -9 the attach process under a
//! guest doing I/O and start it again: the guest must see no I/O error.
//!
//! QEMU runs under KVM when the host allows it, else TCG (these machines' /dev/kvm does not
//! run stock kernels; a 15 s probe decides). Under TCG a boot takes about 10-30 s.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use basalt_tests::TestCluster;

fn guest_dir() -> PathBuf {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-guest");
    let out = Command::new(&script).stderr(Stdio::inherit()).output().expect("run scripts/build-guest");
    assert!(out.status.success(), "scripts/build-guest failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().lines().last().expect("guest dir"))
}

/// An attach process, killed (-9) when dropped: a failing test leaves none behind.
struct Attach(Child);

impl Attach {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Attach {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `basalt attach ARGS...`; returns the process and the URI it printed once ready.
fn attach(cluster: &TestCluster, args: &[&str]) -> (Attach, String) {
    let mut child = Attach(cluster.basalt_cmd().arg("attach").args(args).stdout(Stdio::piped()).spawn().unwrap());
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let uri = lines.next().expect("attach printed nothing").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    (child, uri)
}

/// QEMU arguments for a vhost-user-blk disk on `socket`: guest RAM must be shareable (memfd)
/// so the back end can map it. `reconnect=1` makes QEMU reconnect within a second after the
/// back end goes away (QEMU 9.2+ spells it `reconnect-ms=1000`).
fn vhost_user_disk(socket: &Path, queues: u16) -> Vec<String> {
    vec![
        "-object".into(),
        "memory-backend-memfd,id=mem,size=256M,share=on".into(),
        "-numa".into(),
        "node,memdev=mem".into(),
        "-chardev".into(),
        format!("socket,id=vu0,path={},reconnect=1", socket.display()),
        "-device".into(),
        format!("vhost-user-blk-pci,chardev=vu0,num-queues={queues}"),
    ]
}

/// ext4 made, written, and checked after a reboot; then the raw pattern, checked in the volume.
/// Returns the first boot's console.
async fn ext4_reboot_and_pattern(guest: &Path, cluster: &TestCluster, disk: &[String]) -> String {
    let first = boot(guest, disk, "basalt=ext4-write");
    assert!(first.contains("BASALT-GUEST: disk 131072 sectors"), "guest did not see a 64 MiB disk:\n{first}");
    assert!(first.contains("BASALT-GUEST-EXT4-WRITTEN"), "guest could not make and write ext4:\n{first}");
    let second = boot(guest, disk, "basalt=ext4-verify");
    assert!(second.contains("BASALT-GUEST-EXT4-OK"), "after the reboot the file system or file was bad:\n{second}");
    let third = boot(guest, disk, "basalt=pattern");
    assert!(third.contains("BASALT-GUEST-OK"), "guest pattern check failed:\n{third}");
    for console in [&first, &second, &third] {
        assert!(!console.contains("I/O error"), "the guest saw an I/O error:\n{console}");
    }
    assert_pattern_in_volume(cluster).await;
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_guest_ext4_over_nbd() {
    let guest = guest_dir();
    let cluster = TestCluster::with_volume("vmdisk", 64 << 20).await.unwrap();
    let (_attach, uri) = attach(&cluster, &["vmdisk", "--nbd-listen", "127.0.0.1:0"]);
    assert!(uri.starts_with("nbd://"), "{uri}");
    let disk = vec!["-drive".to_string(), format!("file={uri},format=raw,if=virtio,cache=none")];
    ext4_reboot_and_pattern(&guest, &cluster, &disk).await;
}

/// The same over vhost-user-blk: QEMU shares the guest's memory with the attach process,
/// which serves the virtqueues itself. Each boot is a new front-end connection on the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_guest_ext4_over_vhost_user_blk() {
    let guest = guest_dir();
    let cluster = TestCluster::with_volume("vmdisk", 64 << 20).await.unwrap();
    let socket = cluster.path().join("vmdisk.vhost.sock");
    let (_attach, uri) = attach(&cluster, &["vmdisk", "--queues", "2", "--vhost-user-socket", socket.to_str().unwrap()]);
    assert_eq!(uri, format!("vhost-user:{}", socket.display()));
    let disk = vhost_user_disk(&socket, 2);
    let console = ext4_reboot_and_pattern(&guest, &cluster, &disk).await;
    // GET_ID: the guest's serial is the volume id.
    let id = cluster.client().await.unwrap().open_volume("vmdisk").await.unwrap().id().to_string();
    assert!(console.contains(&format!("BASALT-GUEST: serial {}", &id[..id.len().min(20)])), "serial is not the volume id {id}:\n{console}");
}

/// `basalt volume resize` under a running vhost-user-blk guest: the attach process announces
/// the new capacity (a config-change message), the guest's disk grows without a reboot, and the
/// guest writes into the new space and reads it back; the write is in the volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_guest_sees_a_resize_over_vhost_user_blk() {
    let guest = guest_dir();
    let cluster = TestCluster::with_volume("vmdisk", 64 << 20).await.unwrap();
    let socket = cluster.path().join("vmdisk.vhost.sock");
    let (_attach, _) = attach(&cluster, &["vmdisk", "--vhost-user-socket", socket.to_str().unwrap()]);
    let mut vm = Running::boot(&guest, &vhost_user_disk(&socket, 1), "basalt=grow");
    vm.wait_for("BASALT-GUEST: waiting to grow", Duration::from_secs(240));
    let (code, out, err) = cluster.cli(&["volume", "resize", "vmdisk", "--size", "96MiB"]).await.unwrap();
    assert_eq!(code, Some(0), "resize: {out}{err}");
    let resized = Instant::now();
    vm.wait_for("BASALT-GUEST: grew to", Duration::from_secs(120));
    println!("the guest saw the resize after {:?}", resized.elapsed());
    let console = vm.finish(Duration::from_secs(120));
    assert!(console.contains("BASALT-GUEST: grew to 196608 sectors"), "the guest did not see 96 MiB:\n{console}");
    assert!(console.contains("BASALT-GUEST-GROW-OK"), "the guest could not use the new space:\n{console}");
    assert!(!console.contains("I/O error"), "the guest saw an I/O error:\n{console}");
    let vol = cluster.client().await.unwrap().open_volume("vmdisk").await.unwrap();
    let data = vol.read(64 << 20, 1 << 20).await.unwrap();
    assert!(data.as_ref() == guest_pattern(1 << 20).as_slice(), "the guest's write past the old end is not in the volume");
}

/// kill -9 of the attach process under a guest writing and reading, then the same command
/// again: it reclaims its attachment, QEMU reconnects, the guest's I/O resumes with no error.
async fn guest_survives_attach_restart(cluster: &TestCluster, attach_args: &[&str], disk: &[String]) {
    let guest = guest_dir();
    let (mut first, _) = attach(cluster, attach_args);
    // Four loops at once: requests are in flight together, and complete out of order, when the
    // attach process dies (vhost-user: the new one resubmits them from QEMU's inflight area).
    let mut vm = Running::boot(&guest, disk, "basalt=soak basalt.rounds=40 basalt.workers=4");
    vm.wait_for("BASALT-GUEST: round 10", Duration::from_secs(240));
    first.kill();
    let killed_at = Instant::now();
    let (_second, _) = attach(cluster, attach_args);
    println!("attach restarted in {:?}", killed_at.elapsed());
    let console = vm.finish(Duration::from_secs(300));
    assert!(console.contains("BASALT-GUEST-SOAK-OK"), "the guest's I/O failed across the restart:\n{console}");
    assert!(!console.contains("I/O error"), "the guest saw an I/O error:\n{console}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_guest_survives_vhost_user_attach_restart() {
    let cluster = TestCluster::with_volume("vmdisk", 64 << 20).await.unwrap();
    let socket = cluster.path().join("vmdisk.vhost.sock");
    let args = ["vmdisk", "--queues", "1", "--vhost-user-socket", socket.to_str().unwrap()];
    guest_survives_attach_restart(&cluster, &args, &vhost_user_disk(&socket, 1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_guest_survives_nbd_attach_restart() {
    let cluster = TestCluster::with_volume("vmdisk", 64 << 20).await.unwrap();
    // A fixed port: the restarted attach listens where QEMU reconnects, and is the same holder.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let args = ["vmdisk", "--nbd-listen", addr.as_str()];
    // QEMU's NBD client holds requests for up to reconnect-delay seconds while it reconnects.
    let disk = vec![
        "-blockdev".to_string(),
        format!("driver=nbd,node-name=d0,server.type=inet,server.host=127.0.0.1,server.port={port},export=vmdisk,reconnect-delay=30"),
        "-device".to_string(),
        "virtio-blk-pci,drive=d0".to_string(),
    ];
    guest_survives_attach_restart(&cluster, &args, &disk).await;
}

/// Live migration between two QEMUs on this machine, each with its own vhost-user-blk attach
/// process: the destination's is a `--standby`; when QEMU reports the migration complete, `basalt
/// handover` moves write access to it. The guest writes and reads its pattern throughout and
/// sees no I/O error; a write with the source's epoch afterwards is refused (fenced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_live_migration_hands_over_write_access() {
    let guest = guest_dir();
    let cluster = TestCluster::with_volume("vmdisk", 64 << 20).await.unwrap();
    let dir = cluster.path();
    let (src_sock, dst_sock) = (dir.join("src.vhost.sock"), dir.join("dst.vhost.sock"));
    let (src_qmp, dst_qmp) = (dir.join("src.qmp"), dir.join("dst.qmp"));
    let (_source, _) = attach(&cluster, &["vmdisk", "--queues", "1", "--vhost-user-socket", src_sock.to_str().unwrap()]);
    let (_standby, _) = attach(&cluster, &["vmdisk", "--queues", "1", "--standby", "--vhost-user-socket", dst_sock.to_str().unwrap()]);
    let client = cluster.client().await.unwrap();
    let (holder, source_epoch, _) = client.attachment("vmdisk").await.unwrap();
    assert!(holder.is_some_and(|h| h.ends_with(&format!("vhost-user:{}", src_sock.display()))), "the standby took the attachment");

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let task = "basalt=soak basalt.rounds=120";
    let with_qmp = |sock: &Path, qmp: &Path, extra: &[&str]| {
        let mut args = vhost_user_disk(sock, 1);
        args.extend(["-qmp".to_string(), format!("unix:{},server=on,wait=off", qmp.display())]);
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let mut source = Running::boot(&guest, &with_qmp(&src_sock, &src_qmp, &[]), task);
    let incoming = format!("tcp:127.0.0.1:{port}");
    let destination = Running::boot(&guest, &with_qmp(&dst_sock, &dst_qmp, &["-incoming", &incoming]), task);
    source.wait_for("BASALT-GUEST: round 10", Duration::from_secs(240));

    let mut qmp = Qmp::connect(&src_qmp);
    // QEMU 7.2 migrates at 32 MiB/s unless told otherwise; loopback takes far more.
    qmp.execute(r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":4294967296}}"#);
    qmp.execute(&format!(r#"{{"execute":"migrate","arguments":{{"uri":"{incoming}"}}}}"#));
    let started = Instant::now();
    loop {
        let status = qmp.execute(r#"{"execute":"query-migrate"}"#)["return"]["status"].as_str().unwrap_or("").to_string();
        match status.as_str() {
            "completed" => break,
            "failed" | "cancelled" => panic!("migration {status}:\n{}", source.text()),
            _ => assert!(started.elapsed() < Duration::from_secs(120), "migration still {status} after 2 minutes"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("migrated in {:?}", started.elapsed());
    // The switch-over: the destination's guest runs, its writes waiting for write access.
    let to = format!("{}:vhost-user:{}", hostname(), dst_sock.display());
    let (code, out, err) = cluster.cli(&["handover", "vmdisk", "--to", &to]).await.unwrap();
    assert_eq!(code, Some(0), "handover: {out}{err}");
    let console = destination.finish(Duration::from_secs(300));
    assert!(console.contains("BASALT-GUEST-SOAK-OK"), "the guest's I/O failed across the migration:\n{console}");
    assert!(!console.contains("I/O error"), "the guest saw an I/O error after the migration:\n{console}");
    assert!(!source.text().contains("I/O error"), "the guest saw an I/O error before the migration:\n{}", source.text());
    let (holder, epoch, _) = client.attachment("vmdisk").await.unwrap();
    assert_eq!(holder.as_deref(), Some(to.as_str()));
    assert!(epoch > source_epoch);

    // The source is fenced: a write carrying its epoch is refused.
    let stale = client.open_attached("vmdisk", source_epoch).await.unwrap();
    let err = stale.write(0, bytes::Bytes::from(vec![7u8; 4096]), false).await.expect_err("a fenced source wrote");
    assert!(err.to_string().contains("fenc") || err.to_string().contains("epoch"), "{err}");
    let _ = source.child.kill();
}

/// This host's name as `basalt attach` puts it in a holder.
fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into())
}

/// A QMP client (QEMU docs/interop/qmp-spec.rst): one command at a time, events skipped.
struct Qmp {
    reader: BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => panic!("QMP socket {}: {e}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let mut qmp = Qmp { reader: BufReader::new(stream.try_clone().unwrap()), writer: stream };
        let mut greeting = String::new();
        qmp.reader.read_line(&mut greeting).unwrap();
        assert!(greeting.contains("QMP"), "{greeting}");
        qmp.execute(r#"{"execute":"qmp_capabilities"}"#);
        qmp
    }

    fn execute(&mut self, command: &str) -> serde_json::Value {
        use std::io::Write;
        writeln!(self.writer, "{command}").unwrap();
        loop {
            let mut line = String::new();
            assert!(self.reader.read_line(&mut line).unwrap() > 0, "QMP closed");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if v.get("event").is_some() {
                continue;
            }
            assert!(v.get("error").is_none(), "{command}: {v}");
            return v;
        }
    }
}

fn accel(guest: &Path) -> &'static str {
    static ACCEL: OnceLock<&'static str> = OnceLock::new();
    ACCEL.get_or_init(|| if kvm_boots_a_kernel(guest) { "kvm" } else { "tcg" })
}

fn qemu(guest: &Path, disk: &[String], task: &str) -> Command {
    let mut cmd = Command::new(guest.join("qemu-system-x86_64"));
    cmd.args(["-machine", &format!("q35,accel={}", accel(guest)), "-cpu", "max", "-m", "256", "-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join("initramfs.cpio.gz"))
        .args(["-append", &format!("console=ttyS0 quiet panic=-1 {task}")])
        .args(disk);
    cmd
}

/// Boots the guest with `disk` arguments and task `task`; returns its console (and QEMU's
/// stderr) once it powered off.
fn boot(guest: &Path, disk: &[String], task: &str) -> String {
    let started = Instant::now();
    let out = run_with_deadline(qemu(guest, disk, task), Duration::from_secs(300)).expect("the guest did not finish within 5 minutes");
    println!("guest ({task}) ran {:?} ({})", started.elapsed(), accel(guest));
    format!("{}\n--- qemu stderr ---\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A guest running while the test does something to its disk.
struct Running {
    child: Child,
    console: Arc<Mutex<String>>,
}

impl Running {
    fn boot(guest: &Path, disk: &[String], task: &str) -> Running {
        let mut child = qemu(guest, disk, task).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn qemu");
        let console = Arc::new(Mutex::new(String::new()));
        for pipe in [Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>, Box::new(child.stderr.take().unwrap())] {
            let console = console.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut c = console.lock().unwrap();
                    c.push_str(&line);
                    c.push('\n');
                }
            });
        }
        Running { child, console }
    }

    fn text(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    fn wait_for(&mut self, needle: &str, deadline: Duration) {
        let start = Instant::now();
        while !self.text().contains(needle) {
            if start.elapsed() > deadline || self.child.try_wait().unwrap().is_some() {
                let _ = self.child.kill();
                panic!("the guest never printed {needle:?}:\n{}", self.text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the guest to power off; its console.
    fn finish(mut self, deadline: Duration) -> String {
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            if start.elapsed() > deadline {
                let _ = self.child.kill();
                panic!("the guest did not finish:\n{}", self.text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(200));
        self.text()
    }
}

/// The guest's 4 MiB pattern at 8 MiB is in the volume.
async fn assert_pattern_in_volume(cluster: &TestCluster) {
    let client = cluster.client().await.unwrap();
    let vol = client.open_volume("vmdisk").await.unwrap();
    let data = vol.read(8 << 20, 4 << 20).await.unwrap();
    assert!(data.as_ref() == guest_pattern(4 << 20).as_slice(), "the guest's pattern is not in the volume");
}

/// The first `len` bytes of the pattern the guest's init writes (`/tmp/pat` in scripts/build-guest).
fn guest_pattern(len: usize) -> Vec<u8> {
    (0..65536).flat_map(|i| format!("basalt-guest-{i:050}\n").into_bytes()).take(len).collect()
}

/// Whether KVM really runs a stock kernel here: boot the kernel with no root file system and
/// see it reach its panic (and exit, given `-no-reboot`) quickly. On hosts whose /dev/kvm
/// opens but cannot run such a guest, QEMU spins instead, so a deadline decides.
fn kvm_boots_a_kernel(guest: &std::path::Path) -> bool {
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        return false;
    }
    let mut cmd = Command::new(guest.join("qemu-system-x86_64"));
    cmd.args(["-machine", "q35,accel=kvm", "-cpu", "max", "-m", "128", "-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .args(["-append", "console=ttyS0 panic=-1"]);
    match run_with_deadline(cmd, Duration::from_secs(15)) {
        Some(out) => String::from_utf8_lossy(&out.stdout).contains("Kernel panic"),
        None => false,
    }
}

/// Runs `cmd` to completion with its output captured, or kills it at `deadline` (None).
fn run_with_deadline(mut cmd: Command, deadline: Duration) -> Option<std::process::Output> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn qemu-system-x86_64");
    // Drain the pipes on threads so a chatty child never blocks on a full pipe.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut buf);
        buf
    });
    let err_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut buf);
        buf
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for qemu") {
            break Some(status);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    status.map(|status| std::process::Output { status, stdout, stderr })
}
