#!/usr/bin/env bash
# The macro benchmark: the same fio jobs (fio's nbd engine) against
#   (a) qemu-nbd exporting a raw file on the same disk, and
#   (b) a Basalt dev cluster volume (3 replicas, `basalt dev up`, release build),
# in one run, then a table with IOPS, MB/s, p50/p99 latency and the Basalt/qemu-nbd ratio.
#
#   benches/macro/run.sh [SECONDS_PER_JOB]        (default 20)
#
# Work files go to $BASALT_BENCH_DIR (default ./bench-work; the clusters' data is removed at the
# end unless BASALT_BENCH_KEEP=1); $BASALT_BENCH_PGS sets the dev
# cluster's placement-group count (default: `basalt dev up`'s). BASALT_BENCH_TLS_AB=1 also runs
# the same jobs against a second dev cluster with security off (`dev up --security-off`:
# plaintext, no authentication) and adds its numbers and the on/off ratio: what TLS and
# authentication cost. BASALT_BENCH_ENCRYPT_AB=1 also runs them against an encrypted volume of
# the same cluster (`volume create --encrypt`, served by `basalt attach --kek-file`) and adds the
# encrypted/plain ratio. Needs fio (with the nbd engine), qemu-nbd and qemu-img.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env
secs="${1:-20}"
work="${BASALT_BENCH_DIR:-$PWD/bench-work}"
rm -rf "$work"; mkdir -p "$work"
cargo build --release --workspace --bins >&2
bin="$CARGO_TARGET_DIR/release"
size=4G
region=1G

cleanup() {
    [ -n "${qemu_pid:-}" ] && kill "$qemu_pid" 2>/dev/null || true
    [ -n "${dev_pid:-}" ] && kill -INT "$dev_pid" 2>/dev/null && wait "$dev_pid" 2>/dev/null || true
    [ -n "${plain_pid:-}" ] && kill -INT "$plain_pid" 2>/dev/null && wait "$plain_pid" 2>/dev/null || true
    [ -n "${enc_pid:-}" ] && kill -INT "$enc_pid" 2>/dev/null && wait "$enc_pid" 2>/dev/null || true
    [ -n "${rss_pid:-}" ] && kill "$rss_pid" 2>/dev/null || true
    # The clusters' data and the baseline image are gigabytes: gone unless asked to keep them
    # (the fio results and logs stay).
    if [ "${BASALT_BENCH_KEEP:-0}" != 1 ]; then
        rm -rf "$work/dev" "$work/dev-plain" "$work/base.img"
    fi
}
trap cleanup EXIT

# (a) qemu-nbd on a raw file, default settings (what a user would run).
qemu-img create -q -f raw "$work/base.img" "$size"
qport=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
qemu-nbd -f raw -x bench -b 127.0.0.1 -p "$qport" --persistent --shared=16 "$work/base.img" &
qemu_pid=$!
qemu_uri="nbd://127.0.0.1:$qport/bench"

# Waits (up to $3 seconds) for the process writing $1 to print `ready`; fails showing its
# stderr ($2) otherwise.
wait_ready() {
  for _ in $(seq 1 "$3"); do grep -q '^ready$' "$1" 2>/dev/null && return 0; sleep 1; done
  echo "$1: not ready after $3 s" >&2; cat "$2" >&2; exit 1
}

# (b) Basalt.
"$bin/basalt" dev up --dir "$work/dev" --size "$size" ${BASALT_BENCH_PGS:+--pgs "$BASALT_BENCH_PGS"} > "$work/devup.out" 2> "$work/devup.err" &
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
)
targets="qemu basalt"
[ "${BASALT_BENCH_ENCRYPT_AB:-0}" = 1 ] && targets="$targets basalt-enc"
[ "${BASALT_BENCH_TLS_AB:-0}" = 1 ] && targets="$targets basalt-plain"
for target in $targets; do
  uri=$qemu_uri; [ "$target" = basalt ] && uri=$basalt_uri
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
    "$bin/basalt" dev up --security-off --dir "$work/dev-plain" --size "$size" ${BASALT_BENCH_PGS:+--pgs "$BASALT_BENCH_PGS"} > "$work/plain.out" 2> "$work/plain.err" &
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
    fio --name="$name" --ioengine=nbd --uri="$uri" --size="$region" --time_based --runtime="$secs" \
        --ramp_time=2 --randrepeat=0 --norandommap --output-format=json "$@" > "$work/$target-$name.json"
  done
done

python3 - "$work" "${BASALT_BENCH_TLS_AB:-0}" "${BASALT_BENCH_ENCRYPT_AB:-0}" <<'PY'
import json, sys, os
work = sys.argv[1]
ab = sys.argv[2] == "1"
enc = sys.argv[3] == "1"
names = ["randwrite-4k-qd32", "randread-4k-qd32", "seqwrite-1M-qd8", "seqread-1M-qd8", "randwrite-4k-qd1", "randread-4k-qd1"]
def stats(path):
    text = open(path).read()
    # fio's nbd engine prints "fio: connected to NBD server" before the JSON.
    j = json.loads(text[text.index("{"):])["jobs"][0]
    side = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    return side["iops"], side["bw_bytes"] / 1e6, pct.get("50.000000", 0) / 1e3, pct.get("99.000000", 0) / 1e3
hdr = f"{'workload':<18} | {'qemu-nbd IOPS':>13} {'MB/s':>7} {'p50 µs':>8} {'p99 µs':>8} | {'basalt IOPS':>11} {'MB/s':>7} {'p50 µs':>8} {'p99 µs':>8} | {'ratio':>5}"
print(hdr); print("-" * len(hdr))
for n in names:
    q = stats(os.path.join(work, f"qemu-{n}.json")); b = stats(os.path.join(work, f"basalt-{n}.json"))
    ratio = b[0] / q[0] if q[0] else 0
    print(f"{n:<18} | {q[0]:>13.0f} {q[1]:>7.1f} {q[2]:>8.0f} {q[3]:>8.0f} | {b[0]:>11.0f} {b[1]:>7.1f} {b[2]:>8.0f} {b[3]:>8.0f} | {ratio:>5.2f}")
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
PY
