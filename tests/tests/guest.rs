//! The hypervisor case: QEMU boots a small Linux guest (a Debian kernel and a busybox
//! initramfs, built by `scripts/build-guest`) whose virtio disk is a Basalt volume attached
//! over NBD. The guest writes a pattern, reads it back uncached and reports on its console; the
//! test then reads the pattern through the volume client.
//!
//! QEMU runs under KVM when the host allows it, else TCG (these machines' /dev/kvm does not
//! run stock kernels; a 15 s probe decides). Under TCG the boot and pattern check take about
//! 10-30 s.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use basalt_tests::TestCluster;

fn guest_dir() -> PathBuf {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-guest");
    let out = Command::new(&script).stderr(Stdio::inherit()).output().expect("run scripts/build-guest");
    assert!(out.status.success(), "scripts/build-guest failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().lines().last().expect("guest dir"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_guest_writes_and_reads_its_virtio_disk() {
    let guest = guest_dir();
    let cluster = TestCluster::with_volume("vmdisk", 64 << 20).await.unwrap();

    let mut attach = cluster.basalt_cmd().args(["attach", "vmdisk", "--nbd-listen", "127.0.0.1:0"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(attach.stdout.take().unwrap()).lines();
    let uri = lines.next().unwrap().unwrap();
    assert!(uri.starts_with("nbd://"), "{uri}");
    assert_eq!(lines.next().unwrap().unwrap(), "ready");

    let accel = if kvm_boots_a_kernel(&guest) { "kvm" } else { "tcg" };
    let started = Instant::now();
    let mut cmd = Command::new(guest.join("qemu-system-x86_64"));
    cmd.args(["-machine", &format!("q35,accel={accel}"), "-cpu", "max", "-m", "256", "-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join("initramfs.cpio.gz"))
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .args(["-drive", &format!("file={uri},format=raw,if=virtio,cache=none")]);
    let out = run_with_deadline(cmd, Duration::from_secs(300)).expect("the guest did not finish within 5 minutes");
    let console = String::from_utf8_lossy(&out.stdout);
    println!("guest ran {:?} ({accel})", started.elapsed());
    assert!(console.contains("BASALT-GUEST: disk 131072 sectors"), "guest did not see a 64 MiB disk:\n{console}");
    assert!(console.contains("BASALT-GUEST-OK"), "guest pattern check failed:\n{console}\n{}", String::from_utf8_lossy(&out.stderr));

    // The guest's writes are in the volume.
    let client = cluster.client().await.unwrap();
    let vol = client.open_volume("vmdisk").await.unwrap();
    let data = vol.read(8 << 20, 4 << 20).await.unwrap();
    let expected: Vec<u8> = (0..65536).flat_map(|i| format!("basalt-guest-{i:050}\n").into_bytes()).take(4 << 20).collect();
    assert!(data.as_ref() == expected.as_slice(), "the guest's pattern is not in the volume");
    let _ = attach.kill();
    let _ = attach.wait();
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
