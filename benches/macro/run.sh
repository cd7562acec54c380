#!/usr/bin/env bash
# The macro benchmark: the same fio jobs (fio's nbd engine) against
#   (a) qemu-nbd --cache=none --aio=io_uring exporting a raw file on the same disk (what
#       hypervisors run in production: the baseline), and qemu-nbd with default settings (page
#       cache, for reference), and
#   (b) a Basalt dev cluster volume (3 replicas, `basalt dev up`, release build, TLS and
#       authentication on, 64 placement groups unless $BASALT_BENCH_PGS says otherwise),
# in one run, then a table with IOPS, MB/s, p50/p99 latency, CPU per operation (summed over
# the serving processes: qemu-nbd, or every basalt-node plus the process serving NBD) and the
# Basalt/baseline ratio.
#
#   benches/macro/run.sh [SECONDS_PER_JOB]        (default 20)
#
# Work files go to $BASALT_BENCH_DIR (default ./bench-work; the clusters' data is removed at the
# end unless BASALT_BENCH_KEEP=1); $BASALT_BENCH_PGS sets the dev
# cluster's placement-group count (default 64: production-like; a real cluster has tens to
# hundreds of PGs per node, and fewer hide per-group costs). BASALT_BENCH_TLS_AB=1 also runs
# the same jobs against a second dev cluster with security off (`dev up --security-off`:
# plaintext, no authentication) and adds its numbers and the on/off ratio: what TLS and
# authentication cost. BASALT_BENCH_ENCRYPT_AB=1 also runs them against an encrypted volume of
# the same cluster (`volume create --encrypt`, served by `basalt attach --kek-file`) and adds the
# encrypted/plain ratio. Needs fio (with the nbd engine), qemu-nbd and qemu-img.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env
. benches/macro/common.sh
secs="${1:-20}"
bench_setup
size=4G
region=1G

cleanup() {
    [ -n "${qemu_pid:-}" ] && kill "$qemu_pid" 2>/dev/null || true
    [ -n "${qdef_pid:-}" ] && kill "$qdef_pid" 2>/dev/null || true
    [ -n "${dev_pid:-}" ] && kill -INT "$dev_pid" 2>/dev/null && wait "$dev_pid" 2>/dev/null || true
    [ -n "${plain_pid:-}" ] && kill -INT "$plain_pid" 2>/dev/null && wait "$plain_pid" 2>/dev/null || true
    [ -n "${enc_pid:-}" ] && kill -INT "$enc_pid" 2>/dev/null && wait "$enc_pid" 2>/dev/null || true
    [ -n "${rss_pid:-}" ] && kill "$rss_pid" 2>/dev/null || true
    # The clusters' data and the baseline image are gigabytes: gone unless asked to keep them
    # (the fio results and logs stay).
    if [ "${BASALT_BENCH_KEEP:-0}" != 1 ]; then
        rm -rf "$work/dev" "$work/dev-plain" "$work/base.img" "$work/default.img"
    fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# (a) qemu-nbd on a raw file: O_DIRECT and io_uring (the baseline), and default settings.
qemu-img create -q -f raw "$work/base.img" "$size"
qport=$(free_port)
qemu-nbd -f raw -x bench -b 127.0.0.1 -p "$qport" --persistent --shared=16 --cache=none --aio=io_uring "$work/base.img" &
qemu_pid=$!
qemu_uri="nbd://127.0.0.1:$qport/bench"
qemu-img create -q -f raw "$work/default.img" "$size"
dport=$(free_port)
qemu-nbd -f raw -x bench -b 127.0.0.1 -p "$dport" --persistent --shared=16 "$work/default.img" &
qdef_pid=$!
qdef_uri="nbd://127.0.0.1:$dport/bench"

# (b) Basalt.
"$bin/basalt" dev up --dir "$work/dev" --size "$size" --pgs "$pgs" > "$work/devup.out" 2> "$work/devup.err" &
dev_pid=$!
wait_ready "$work/devup.out" "$work/devup.err" 120
basalt_uri=$(grep '^nbd://' "$work/devup.out" | head -1)

# Peak RSS of the Basalt nodes while the jobs run.
( while true; do
    for p in $(pgrep -f "basalt-node --config $work/dev" || true); do ps -o rss= -p "$p" 2>/dev/null; done | sort -n | tail -1 >> "$work/rss.log"
    sleep 1
  done ) &
rss_pid=$!

jobs=(
  "seqwrite-1M-qd8 --rw=write --bs=1M --iodepth=8"
  "seqread-1M-qd8 --rw=read --bs=1M --iodepth=8"
  "randwrite-4k-qd32 --rw=randwrite --bs=4k --iodepth=32"
  "randread-4k-qd32 --rw=randread --bs=4k --iodepth=32"
  "randwrite-4k-qd1 --rw=randwrite --bs=4k --iodepth=1"
  "randread-4k-qd1 --rw=randread --bs=4k --iodepth=1"
  "writeflush-4k-qd1 --rw=randwrite --bs=4k --iodepth=1 --fsync=1"
)
targets="qemu qemu-default basalt"
[ "${BASALT_BENCH_ENCRYPT_AB:-0}" = 1 ] && targets="$targets basalt-enc"
[ "${BASALT_BENCH_TLS_AB:-0}" = 1 ] && targets="$targets basalt-plain"
# CPU time (clock ticks) used so far by the processes serving $1: qemu-nbd, or every
# basalt-node and the process serving NBD.
serving_pids() {
  case "$1" in
    qemu) echo "$qemu_pid" ;;
    qemu-default) echo "$qdef_pid" ;;
    basalt) echo "$dev_pid"; pgrep -f "basalt-node --config $work/dev/" || true ;;
    basalt-enc) echo "$dev_pid $enc_pid"; pgrep -f "basalt-node --config $work/dev/" || true ;;
    basalt-plain) echo "$plain_pid"; pgrep -f "basalt-node --config $work/dev-plain/" || true ;;
  esac
}
cpu_ticks() {
  local total=0 p v
  for p in $(serving_pids "$1"); do
    # utime and stime, fields 14 and 15 (after the parenthesised command name).
    v=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}' || true)
    total=$(( total + ${v:-0} ))
  done
  echo "$total"
}

# Idle CPU of the Basalt nodes (after startup settled), per node.
sleep 5
nodes=$(pgrep -f "basalt-node --config $work/dev/" | wc -l)
before=$(cpu_ticks basalt)
sleep 10
echo "$(( $(cpu_ticks basalt) - before )) $nodes 10" > "$work/idle.cpu"

for target in $targets; do
  uri=$qemu_uri; [ "$target" = basalt ] && uri=$basalt_uri; [ "$target" = qemu-default ] && uri=$qdef_uri
  if [ "$target" = basalt-enc ]; then
    # An encrypted volume of the same size in the same cluster, served by its own attach.
    export $(grep -E '^BASALT_(CLUSTER|CA|TOKEN_FILE)=' "$work/devup.out" | xargs)
    (umask 077; head -c 32 /dev/urandom > "$work/enc.kek")
    "$bin/basalt" volume create enc --size "$size" --encrypt --kek-file "$work/enc.kek" >&2
    "$bin/basalt" attach enc --nbd-listen 127.0.0.1:0 --kek-file "$work/enc.kek" > "$work/enc.out" 2> "$work/enc.err" &
    enc_pid=$!
    wait_ready "$work/enc.out" "$work/enc.err" 60
    uri=$(grep '^nbd://' "$work/enc.out" | head -1)
  fi
  if [ "$target" = basalt-plain ]; then
    # One Basalt cluster at a time: the TLS one stops before the plaintext one starts.
    if [ -n "${enc_pid:-}" ]; then kill -INT "$enc_pid"; wait "$enc_pid" 2>/dev/null || true; enc_pid=; fi
    kill -INT "$dev_pid"; wait "$dev_pid" 2>/dev/null || true; dev_pid=
    "$bin/basalt" dev up --security-off --dir "$work/dev-plain" --size "$size" --pgs "$pgs" > "$work/plain.out" 2> "$work/plain.err" &
    plain_pid=$!
    wait_ready "$work/plain.out" "$work/plain.err" 120
    uri=$(grep '^nbd://' "$work/plain.out" | head -1)
  fi
  # Write the whole region once first, so reads hit stored data on both sides (a thin Basalt
  # volume answers unwritten blocks with zeros without touching a disk).
  echo "prefilling $region of $target" >&2
  fio --name=prefill --ioengine=nbd --uri="$uri" --size="$region" --rw=write --bs=1M --iodepth=8 \
      --output-format=json > "$work/$target-prefill.json"
  for job in "${jobs[@]}"; do
    set -- $job
    name=$1; shift
    echo "running $name against $target" >&2
    before=$(cpu_ticks "$target")
    fio --name="$name" --ioengine=nbd --uri="$uri" --size="$region" --time_based --runtime="$secs" \
        --ramp_time=2 --randrepeat=0 --norandommap --output-format=json "$@" > "$work/$target-$name.json"
    echo $(( $(cpu_ticks "$target") - before )) > "$work/$target-$name.cpu"
  done
done

python3 - "$work" "${BASALT_BENCH_TLS_AB:-0}" "${BASALT_BENCH_ENCRYPT_AB:-0}" "$secs" "$pgs" <<'PY'
import json, sys, os
work = sys.argv[1]
ab = sys.argv[2] == "1"
enc = sys.argv[3] == "1"
names = ["randwrite-4k-qd32", "randread-4k-qd32", "seqwrite-1M-qd8", "seqread-1M-qd8", "randwrite-4k-qd1", "randread-4k-qd1", "writeflush-4k-qd1"]
secs = float(sys.argv[4])
tick = os.sysconf("SC_CLK_TCK")
def stats(path):
    text = open(path).read()
    # fio's nbd engine prints "fio: connected to NBD server" before the JSON.
    j = json.loads(text[text.index("{"):])["jobs"][0]
    side = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    return side["iops"], side["bw_bytes"] / 1e6, pct.get("50.000000", 0) / 1e3, pct.get("99.000000", 0) / 1e3
def cpu_per_op(prefix, n, iops):
    """CPU µs per operation of the serving processes (over the job and its 2 s ramp)."""
    try:
        ticks = int(open(os.path.join(work, f"{prefix}-{n}.cpu")).read())
    except (OSError, ValueError):
        return 0
    ops = iops * (secs + 2)
    return ticks / tick * 1e6 / ops if ops else 0
hdr = (f"{'workload':<18} | {'qemu-nbd IOPS':>13} {'MB/s':>7} {'p50 µs':>7} {'p99 µs':>7} {'CPU µs/op':>9} | "
       f"{'basalt IOPS':>11} {'MB/s':>7} {'p50 µs':>7} {'p99 µs':>7} {'CPU µs/op':>9} | {'ratio':>5} {'p50 ×':>5} | {'default IOPS':>12} {'p50 µs':>7}")
print("qemu-nbd: --cache=none --aio=io_uring (baseline); default: qemu-nbd with default settings; ratio = basalt/baseline IOPS, p50 × = basalt/baseline p50")
print(hdr); print("-" * len(hdr))
for n in names:
    q = stats(os.path.join(work, f"qemu-{n}.json")); b = stats(os.path.join(work, f"basalt-{n}.json"))
    d = stats(os.path.join(work, f"qemu-default-{n}.json"))
    ratio = b[0] / q[0] if q[0] else 0
    lat = b[2] / q[2] if q[2] else 0
    print(f"{n:<18} | {q[0]:>13.0f} {q[1]:>7.1f} {q[2]:>7.0f} {q[3]:>7.0f} {cpu_per_op('qemu', n, q[0]):>9.0f} | "
          f"{b[0]:>11.0f} {b[1]:>7.1f} {b[2]:>7.0f} {b[3]:>7.0f} {cpu_per_op('basalt', n, b[0]):>9.0f} | {ratio:>5.2f} {lat:>5.1f} | {d[0]:>12.0f} {d[2]:>7.0f}")
def ratio_table(cols, a, b, label):
    """IOPS and p50 of runs `a` and `b` (file prefixes) side by side, and a/b."""
    print()
    hdr = f"{'workload':<18} | {cols[0] + ' IOPS':>17} {'p50 µs':>8} | {cols[1] + ' IOPS':>17} {'p50 µs':>8} | {label:>9}"
    print(hdr); print("-" * len(hdr))
    for n in names:
        x = stats(os.path.join(work, f"{a}-{n}.json")); y = stats(os.path.join(work, f"{b}-{n}.json"))
        print(f"{n:<18} | {x[0]:>17.0f} {x[2]:>8.0f} | {y[0]:>17.0f} {y[2]:>8.0f} | {x[0] / y[0] if y[0] else 0:>9.2f}")
if ab:
    ratio_table(("security on", "security off"), "basalt", "basalt-plain", "on/off")
if enc:
    ratio_table(("encrypted", "plain"), "basalt-enc", "basalt", "enc/plain")
rss = [int(x) for x in open(os.path.join(work, "rss.log")).read().split() if x.strip()]
if rss:
    print(f"\npeak basalt-node RSS during the run: {max(rss)/1024:.0f} MiB")
print(f"placement groups: {sys.argv[5]}")
try:
    ticks, nodes, idle_secs = (int(x) for x in open(os.path.join(work, "idle.cpu")).read().split())
    print(f"idle CPU (basalt-node processes and the NBD server, 10 s): {ticks / tick / idle_secs / max(nodes, 1) * 100:.1f}% of a core per node")
except (OSError, ValueError):
    pass
PY
