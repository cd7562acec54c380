#!/usr/bin/env bash
# What snapshots cost, on a `basalt dev up` cluster (release, TLS on, 64 PGs unless
# $BASALT_BENCH_PGS), volumes attached read-write by `basalt attach` (so every snapshot is cut
# by its holder, the crash-consistent path):
#   - fio 4k random writes at QD32 on a fully written 1 GiB volume with no snapshot, then with
#     10 live snapshots (taken one after another with 2 s of writes to the first 128 MiB
#     between, so each holds copies of what changed): the first run
#     after the tenth pays a 1 MiB copy per chunk on its first write, the second is steady;
#   - `basalt snapshot create` time with 1 GiB and with 4 GiB written, idle and under the fio
#     load (it copies nothing, so it should not grow with the data).
#
#   benches/macro/snapshots.sh [SECONDS]     (default 20)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env
. benches/macro/common.sh
secs="${1:-20}"
bench_setup snapshots

trap bench_cleanup EXIT

dev_up 64MiB

randwrite() { # NAME URI SIZE SECONDS
  fio --name="$1" --ioengine=nbd --uri="$2" --size="$3" --time_based --runtime="$4" \
      --randrepeat=0 --norandommap --rw=randwrite --bs=4k --iodepth=32 --output-format=json > "$work/$1.json"
}
snap() { # VOLUME NAME -> appends "label took_ms" to times
  "$bin/basalt" --json snapshot create "$1" "$2" > "$work/snap-$1-$2.json"
  echo "$3 $(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['took_ms'])" "$work/snap-$1-$2.json")" >> "$work/times"
}

attach_prefilled small 1GiB
small=$uri
snap small idle-1g "idle,1GiB-written"
randwrite none "$small" 1G "$secs"
randwrite none-again "$small" 1G "$secs"
for i in $(seq 1 10); do
  # Within the first 128 MiB, so ten epochs of copies fit this machine's disk.
  randwrite "between-$i" "$small" 128M 2 &
  load=$!
  sleep 1
  snap small "s$i" "under-load,1GiB-written"
  wait "$load"
done
randwrite ten-first "$small" 1G "$secs"
randwrite ten-steady "$small" 1G "$secs"
attach_prefilled big 4GiB
snap big idle-4g "idle,4GiB-written"

python3 - "$work" <<'PY'
import json, os, sys, statistics
work = sys.argv[1]
def iops(name):
    text = open(os.path.join(work, f"{name}.json")).read()
    return json.loads(text[text.index("{"):])["jobs"][0]["write"]["iops"]
base = iops("none")
print("| 4k randwrite QD32, 1 GiB volume | IOPS | vs no snapshot |")
print("|---|---|---|")
for name, label in [("none", "no snapshot"), ("none-again", "no snapshot, again (run-to-run noise)"), ("ten-first", "10 live snapshots, first run (copies each chunk once)"), ("ten-steady", "10 live snapshots, steady")]:
    print(f"| {label} | {iops(name):.0f} | {iops(name) / base:.2f}x |")
times = {}
for line in open(os.path.join(work, "times")):
    label, ms = line.split()
    times.setdefault(label, []).append(int(ms))
print()
print("| snapshot create | runs | median ms | max ms |")
print("|---|---|---|---|")
for label, v in times.items():
    print(f"| {label} | {len(v)} | {statistics.median(v):.0f} | {max(v)} |")
PY
