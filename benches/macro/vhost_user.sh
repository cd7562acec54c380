#!/usr/bin/env bash
# vhost-user-blk against its yardsticks, fio inside a QEMU guest (TCG on machines whose KVM runs
# no stock kernel, so the guest's CPU is emulated and every figure is far below what KVM gives;
# read the ratios, all measured the same way in one run):
#   qsd        qemu-storage-daemon --export type=vhost-user-blk over a local raw file
#              (cache.direct=on, aio=io_uring): one local copy, no network
#   vhost      Basalt's vhost-user-blk (`basalt attach --vhost-user-socket`)
#   nbd        Basalt over NBD (`basalt attach --nbd-listen`, QEMU's NBD client, virtio-blk)
# Basalt runs as `basalt dev up` would (release, TLS on, 64 PGs unless $BASALT_BENCH_PGS), one
# 1 GiB volume, prefilled. In the guest: 4k random read and write at QD32, 1M sequential write
# and read at QD4, libaio, O_DIRECT, SECONDS each (default 20) after a 2 s ramp.
#
#   benches/macro/vhost_user.sh [SECONDS]
# $BASALT_BENCH_ONLY picks targets (default "qsd nbd vhost"), $BASALT_BENCH_JOBS jobs
# (comma-separated, default all four), for quicker comparisons.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env
. benches/macro/common.sh
secs="${1:-20}"
only="${BASALT_BENCH_ONLY:-qsd nbd vhost}"
jobs="${BASALT_BENCH_JOBS:-randread-4k,randwrite-4k,write-1m,read-1m}"
want() { case " $only " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
bench_setup vhost-user
guest=$(scripts/build-guest | tail -1)

cleanup() {
    for p in ${attach_pid:-} ${qsd_pid:-}; do kill -INT "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done
    [ -n "${dev_pid:-}" ] && kill -INT "$dev_pid" 2>/dev/null && wait "$dev_pid" 2>/dev/null || true
    [ "${BASALT_BENCH_KEEP:-0}" = 1 ] || rm -rf "$work/dev" "$work/raw.img"
}
trap cleanup EXIT

# The guest: the test initramfs plus fio and the libraries it loads, and an /init that runs
# the four jobs on /dev/vda and prints each job's JSON between markers.
root="$work/initramfs"
cp -a "$guest/initramfs" "$root"
cp "$(command -v fio)" "$root/bin/fio"
for lib in $(ldd "$(command -v fio)" | awk '/=> \//{print $3} /^[ \t]*\/lib/{print $1}'); do
    mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"
done
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko 2>/dev/null
done
for i in $(seq 1 50); do [ -b /dev/vda ] && break; sleep 0.2; done
secs=$(sed -n 's/.*bench.secs=\([0-9]*\).*/\1/p' /proc/cmdline)
jobs=$(sed -n 's/.*bench.jobs=\([a-z0-9,-]*\).*/\1/p' /proc/cmdline)
run() {
    case ",$jobs," in *",$1,"*) ;; *) return ;; esac
    echo "BASALT-FIO-BEGIN $1"
    /bin/fio --name="$1" --filename=/dev/vda --ioengine=libaio --direct=1 --time_based --runtime="$secs" \
        --ramp_time=2 --randrepeat=0 --norandommap --size=1G --rw="$2" --bs="$3" --iodepth="$4" --output-format=json
    echo "BASALT-FIO-END $1"
}
run randread-4k randread 4k 32
run randwrite-4k randwrite 4k 32
run write-1m write 1M 4
run read-1m read 1M 4
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$work/fio-initramfs.cpio.gz")

cpu_ticks() { # PID: user+system clock ticks it has used
    awk '{print $14 + $15}' "/proc/$1/stat"
}
boot() { # NAME DISK-ARGS...: runs the guest, console to $work/NAME.console; the serving process's
         # CPU time over the run (clock ticks) to $work/NAME.cpu
    local name=$1; shift
    local server=${attach_pid:-${qsd_pid:-}}
    local before; before=$(cpu_ticks "$server")
    echo "guest: $name" >&2
    # $BASALT_BENCH_PERF=1: a 10 s CPU profile of the serving process once the first job runs.
    if [ "${BASALT_BENCH_PERF:-0}" = 1 ]; then
        (sleep 25; perf record -q -g -p "$server" -o "$work/$name.perf.data" -- sleep 10 >/dev/null 2>&1) &
    fi
    timeout $((secs * 8 + 300)) "$guest/qemu-system-x86_64" -machine q35,accel=tcg -cpu max -m 512 -nographic -no-reboot -nic none \
        -kernel "$guest/vmlinuz" -initrd "$work/fio-initramfs.cpio.gz" \
        -append "console=ttyS0 quiet panic=-1 bench.secs=$secs bench.jobs=$jobs" \
        -qmp "unix:$work/$name.qmp,server=on,wait=off" "$@" > "$work/$name.console" 2> "$work/$name.qemu.err"
    echo $(( $(cpu_ticks "$server") - before )) > "$work/$name.cpu"
}
vhost_disk() { # SOCKET
    echo -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
        -chardev socket,id=vu0,path="$1" -device vhost-user-blk-pci,chardev=vu0,num-queues=1
}

# qemu-storage-daemon over a prefilled raw file.
if want qsd; then
head -c 1G /dev/urandom > "$work/raw.img"
qemu-storage-daemon \
    --blockdev driver=file,node-name=file0,filename="$work/raw.img",cache.direct=on,aio=io_uring \
    --export type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path="$work/qsd.sock",writable=on,num-queues=1 \
    2> "$work/qsd.err" &
qsd_pid=$!
for _ in $(seq 1 50); do [ -S "$work/qsd.sock" ] && break; sleep 0.1; done
boot qsd $(vhost_disk "$work/qsd.sock")
kill -INT "$qsd_pid"; wait "$qsd_pid" 2>/dev/null || true; qsd_pid=
fi

# Basalt: one cluster, one prefilled volume, served over vhost-user and then over NBD.
dev_up 64MiB
"$bin/basalt" volume create bench --size 1GiB >&2
"$bin/basalt" attach bench --nbd-listen 127.0.0.1:0 > "$work/attach.out" 2> "$work/attach.err" &
attach_pid=$!
wait_ready "$work/attach.out" "$work/attach.err" 60
fio --name=prefill --ioengine=nbd --uri="$(grep '^nbd://' "$work/attach.out" | head -1)" --size=1G --rw=write --bs=1M \
    --iodepth=8 --output-format=json > "$work/prefill.json"
want nbd && boot nbd -drive "file=$(grep '^nbd://' "$work/attach.out" | head -1),format=raw,if=virtio,cache=none"
kill -INT "$attach_pid"; wait "$attach_pid" 2>/dev/null || true

"$bin/basalt" attach bench --vhost-user-socket "$work/vhost.sock" --queues 1 > "$work/attach.out" 2> "$work/attach.err" &
attach_pid=$!
wait_ready "$work/attach.out" "$work/attach.err" 60
want vhost && boot vhost $(vhost_disk "$work/vhost.sock")

python3 - "$work" <<'PY'
import json, os, re, sys
work = sys.argv[1]
def results(name):
    path = os.path.join(work, f"{name}.console")
    if not os.path.exists(path):
        return {}
    text = open(path, errors="replace").read()
    out = {}
    for job, body in re.findall(r"BASALT-FIO-BEGIN (\S+)\s*(.*?)BASALT-FIO-END \1", text, re.S):
        data = json.loads(body[body.index("{"):body.rindex("}") + 1])["jobs"][0]
        side = "read" if "read" in job else "write"
        out[job] = data[side]["iops"] if "4k" in job else data[side]["bw_bytes"] / 2**20
    return out
qsd, vhost, nbd = results("qsd"), results("vhost"), results("nbd")
hz = os.sysconf("SC_CLK_TCK")
for name in ["qsd", "vhost", "nbd"]:
    if os.path.exists(os.path.join(work, name + ".cpu")):
        print(f"{name}: serving process used {int(open(os.path.join(work, name + '.cpu')).read()) / hz:.1f} CPU s over the guest's run")
print(f"{'workload':14} {'qsd (local)':>12} {'basalt vhost':>13} {'basalt nbd':>11} {'vhost/qsd':>10} {'vhost/nbd':>10}")
for job in ["randread-4k", "randwrite-4k", "write-1m", "read-1m"]:
    unit = "IOPS" if "4k" in job else "MiB/s"
    q, v, n = qsd.get(job, 0), vhost.get(job, 0), nbd.get(job, 0)
    r = lambda a, b: f"{a / b:.2f}" if b else "-"
    print(f"{job + ' ' + unit:14} {q:12.0f} {v:13.0f} {n:11.0f} {r(v, q):>10} {r(v, n):>10}")
PY
