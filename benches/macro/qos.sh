#!/usr/bin/env bash
# Per-volume QoS on a `basalt dev up` cluster (release, TLS on, 64 PGs unless
# $BASALT_BENCH_PGS), both volumes attached read-write by `basalt attach` over NBD:
#   - the noisy neighbour: 4k random writes at QD32 on an unlimited volume alone, then with a
#     second volume limited to 500 IOPS running flat out (two fio jobs at QD32) beside it;
#     the unlimited one's IOPS and p99 latency should stay within 10% of running alone;
#   - what the limited volume got (its limit is 500/s plus a one-second burst).
#
#   benches/macro/qos.sh [SECONDS]     (default 30)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env
. benches/macro/common.sh
secs="${1:-30}"
bench_setup qos

trap bench_cleanup EXIT

dev_up 64MiB

randwrite() { # NAME URI SECONDS JOBS
  fio --name="$1" --ioengine=nbd --uri="$2" --size=1G --time_based --runtime="$3" --numjobs="$4" --group_reporting \
      --randrepeat=0 --norandommap --rw=randwrite --bs=4k --iodepth=32 --output-format=json > "$work/$1.json"
}

attach_prefilled free 1GiB
free=$uri
attach_prefilled limited 1GiB --qos-iops 500
limited=$uri

randwrite alone "$free" "$secs" 1
randwrite limited-alone "$limited" "$secs" 2
randwrite limited-beside "$limited" "$((secs + 4))" 2 &
noisy=$!
sleep 2
randwrite beside "$free" "$secs" 1
wait "$noisy"
randwrite alone-again "$free" "$secs" 1

python3 - "$work" <<'PY'
import json, os, sys
work = sys.argv[1]
def job(name):
    text = open(os.path.join(work, f"{name}.json")).read()
    w = json.loads(text[text.index("{"):])["jobs"][0]["write"]
    return w["iops"], w["clat_ns"]["percentile"]["99.000000"] / 1e6
base_iops, base_p99 = job("alone")
print("| unlimited volume, 4k randwrite QD32 | IOPS | p99 ms | IOPS vs alone | p99 vs alone |")
print("|---|---|---|---|---|")
for name, label in [("alone", "alone"), ("beside", "beside a volume limited to 500 IOPS running flat out"), ("alone-again", "alone again (run-to-run noise)")]:
    i, p = job(name)
    print(f"| {label} | {i:.0f} | {p:.2f} | {i / base_iops:.2f}x | {p / base_p99:.2f}x |")
print()
print("| limited volume (500 IOPS, burst 1 s), 2 jobs x QD32 | IOPS |")
print("|---|---|")
for name, label in [("limited-alone", "alone"), ("limited-beside", "beside the unlimited one")]:
    print(f"| {label} | {job(name)[0]:.0f} |")
PY
