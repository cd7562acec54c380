#!/usr/bin/env bash
# Integrity scrub benchmark: how fast a pass reads and checks stored data, and what a pass
# running at the configured rate costs foreground I/O, side by side in one run.
#
#   benches/scrub/run.sh [SECONDS_PER_JOB]        (default 20)
#
# One `basalt dev up` cluster (release build, 3 replicas); 1 GiB of the demo volume written
# with fio, so every node holds 1 GiB. Then:
#   1. a local pass and a deep pass alone, unthrottled (--rate 10GiB): MB/s per node;
#   2. fio jobs (4k random read QD1, 4k random write QD32) without a scrub, then again while a
#      local pass runs at the nodes' configured rate (scrub.integrity_rate, 32 MiB/s by
#      default) and while one runs unthrottled.
# Work files go to $BASALT_BENCH_DIR (default ./bench-work/scrub). Needs fio (nbd engine).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env
secs="${1:-20}"
work="${BASALT_BENCH_DIR:-$PWD/bench-work/scrub}"
rm -rf "$work"; mkdir -p "$work"
cargo build --release --workspace --bins >&2
bin="$CARGO_TARGET_DIR/release"
region=1G

cleanup() {
    [ -n "${dev_pid:-}" ] && kill -INT "$dev_pid" 2>/dev/null && wait "$dev_pid" 2>/dev/null || true
    [ -n "${scrub_pid:-}" ] && kill "$scrub_pid" 2>/dev/null || true
}
trap cleanup EXIT

"$bin/basalt" dev up --dir "$work/dev" --size 4G > "$work/devup.out" 2> "$work/devup.err" &
dev_pid=$!
for _ in $(seq 1 120); do grep -q '^ready$' "$work/devup.out" 2>/dev/null && break; sleep 1; done
grep -q '^ready$' "$work/devup.out" || { echo "basalt dev up did not become ready" >&2; cat "$work/devup.err" >&2; exit 1; }
uri=$(grep '^nbd://' "$work/devup.out" | head -1)
export BASALT_CLUSTER=$(grep -o 'BASALT_CLUSTER=[^ ]*' "$work/devup.out" | head -1 | cut -d= -f2)
[ -n "$BASALT_CLUSTER" ] || { echo "cannot find BASALT_CLUSTER in dev up's output" >&2; cat "$work/devup.out" >&2; exit 1; }

echo "prefilling $region" >&2
fio --name=prefill --ioengine=nbd --uri="$uri" --size="$region" --rw=write --bs=1M --iodepth=8 --output-format=json > "$work/prefill.json"

# 1. Passes alone, unthrottled.
for kind in local deep; do
  flag=""; [ "$kind" = deep ] && flag="--deep"
  echo "$kind pass alone, unthrottled" >&2
  start=$(date +%s.%N)
  "$bin/basalt" --json scrub start $flag --rate 10GiB > "$work/pass-$kind.json" 2> "$work/pass-$kind.err"
  end=$(date +%s.%N)
  echo "$start $end" > "$work/pass-$kind.time"
done

# 2. Foreground jobs without and with a pass running.
jobs=(
  "randread-4k-qd1 --rw=randread --bs=4k --iodepth=1"
  "randwrite-4k-qd32 --rw=randwrite --bs=4k --iodepth=32"
)
run_job() { # name mode args...
  local name=$1 mode=$2; shift 2
  fio --name="$name" --ioengine=nbd --uri="$uri" --size="$region" --time_based --runtime="$secs" \
      --ramp_time=2 --randrepeat=0 --norandommap --output-format=json "$@" > "$work/$mode-$name.json"
}
for job in "${jobs[@]}"; do
  set -- $job; name=$1; shift
  echo "running $name without a scrub" >&2
  run_job "$name" idle "$@"
  for mode in rated unthrottled; do
    rate_flag=""; [ "$mode" = unthrottled ] && rate_flag="--rate 10GiB"
    echo "running $name during a $mode local pass" >&2
    # Keep a pass running for the whole job: start another whenever one finishes.
    ( while true; do "$bin/basalt" --json scrub start $rate_flag > /dev/null 2>&1 || sleep 1; done ) &
    scrub_pid=$!
    sleep 1
    before=$("$bin/basalt" --json scrub status)
    run_job "$name" "$mode" "$@"
    after=$("$bin/basalt" --json scrub status)
    kill "$scrub_pid" 2>/dev/null || true; wait "$scrub_pid" 2>/dev/null || true; scrub_pid=
    python3 -c 'import json,sys; b=json.loads(sys.argv[1]); a=json.loads(sys.argv[2]); print(sum(x["integrity"]["bytes_verified"] for x in a) - sum(x["integrity"]["bytes_verified"] for x in b))' "$before" "$after" > "$work/$mode-$name.scrubbed"
    # Let the running pass finish so the next job starts from idle.
    for _ in $(seq 1 600); do
      "$bin/basalt" --json scrub status | python3 -c 'import json,sys; sys.exit(0 if all(not n["integrity"]["running"] for n in json.load(sys.stdin)) else 1)' && break
      sleep 0.5
    done
  done
done

python3 - "$work" "$secs" <<'PY'
import json, sys, os
work, secs = sys.argv[1], float(sys.argv[2])
def fio(path):
    text = open(path).read()
    j = json.loads(text[text.index("{"):])["jobs"][0]
    side = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    return side["iops"], pct.get("50.000000", 0) / 1e3, pct.get("99.000000", 0) / 1e3
print("Passes alone (unthrottled, every node at once):")
for kind in ["local", "deep"]:
    report = json.load(open(os.path.join(work, f"pass-{kind}.json")))
    start, end = map(float, open(os.path.join(work, f"pass-{kind}.time")).read().split())
    total = sum(n["bytes_verified"] for n in report["nodes"])
    nodes = len([n for n in report["nodes"] if n["bytes_verified"] > 0])
    secs_pass = end - start
    print(f"  {kind:<5}: {total/1e6:8.0f} MB checked in {secs_pass:6.1f} s = {total/1e6/secs_pass:7.1f} MB/s cluster-wide, "
          f"{total/1e6/secs_pass/max(nodes,1):7.1f} MB/s per node ({nodes} nodes reading); "
          f"corrupt {sum(n['corrupt_found'] for n in report['nodes'])}, divergent {sum(n['divergent_found'] for n in report['nodes'])}")
print()
hdr = f"{'job':<18} | {'idle IOPS':>9} {'p50 µs':>7} {'p99 µs':>7} | {'rated IOPS':>10} {'p50':>6} {'p99':>6} {'MB/s':>5} | {'full IOPS':>9} {'p50':>6} {'p99':>6} {'MB/s':>5}"
print("Foreground jobs without a scrub, during a pass at the configured rate, during an unthrottled pass")
print("(MB/s: bytes the scrub checked during the job, all nodes):")
print(hdr); print("-" * len(hdr))
for name in ["randread-4k-qd1", "randwrite-4k-qd32"]:
    i = fio(os.path.join(work, f"idle-{name}.json"))
    cells = []
    for mode in ["rated", "unthrottled"]:
        r = fio(os.path.join(work, f"{mode}-{name}.json"))
        mb = int(open(os.path.join(work, f"{mode}-{name}.scrubbed")).read()) / 1e6 / (secs + 2)
        cells.append(f"{r[0]:>9.0f}{'':1} {r[1]:>6.0f} {r[2]:>6.0f} {mb:>5.0f}")
    print(f"{name:<18} | {i[0]:>9.0f} {i[1]:>7.0f} {i[2]:>7.0f} | {cells[0]} | {cells[1]}")
    for mode in ["rated", "unthrottled"]:
        r = fio(os.path.join(work, f"{mode}-{name}.json"))
        print(f"    {mode}: IOPS ×{r[0]/i[0]:.2f}, p50 ×{r[1]/max(i[1],1e-9):.2f}, p99 ×{r[2]/max(i[2],1e-9):.2f}")
PY
