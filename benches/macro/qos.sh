#!/usr/bin/env bash
# Per-volume QoS on a `basalt dev up` cluster (release, TLS on, 64 PGs unless
# $BASALT_BENCH_PGS), both volumes attached read-write by `basalt attach` over NBD:
#   - the noisy neighbour: 4k random writes at QD32 on an unlimited volume alone, then with a
#     second volume limited to 500 IOPS running flat out (two fio jobs at QD32) beside it;
#     the unlimited one's IOPS and p99 latency should stay within 10% of running alone;
#   - what the limited volume got (its limit is 500/s plus a one-second burst);
#   - where the machine's CPU went in each phase (the storage nodes, each attach process, fio),
#     which bounds what the unlimited volume can keep on a machine whose cores are all busy.
#
#   benches/macro/qos.sh [SECONDS]     (default 30)
# $BASALT_BENCH_PERF=1: also a 10 s whole-machine `perf record -a -g` of the unlimited volume
# alone ($work/alone.perf), with a split by thread and the nodes' hottest functions printed.
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

node_pids=$(pgrep -f "basalt-node --config $work/dev/" | xargs)
free_pid=$(echo $attach_pids | cut -d' ' -f1)
limited_pid=$(echo $attach_pids | cut -d' ' -f2)
snap() { # FILE: the machine's CPU jiffies (busy, all), then each watched process's ticks
  { awk '/^cpu /{b=$2+$3+$4+$7+$8; print b, b+$5+$6}' /proc/stat
    for group in "nodes:$node_pids" "attach-free:$free_pid" "attach-limited:$limited_pid"; do
      t=0; for p in ${group#*:}; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
      echo "${group%%:*} $t"
    done; } > "$1"
}

snap "$work/alone.cpu0"
if [ "${BASALT_BENCH_PERF:-0}" = 1 ]; then
  (sleep 3; perf record -q -g -a -o "$work/alone.perf" -- sleep 10 >/dev/null 2>&1) &
fi
randwrite alone "$free" "$secs" 1; snap "$work/alone.cpu1"
randwrite limited-alone "$limited" "$secs" 2
randwrite limited-beside "$limited" "$((secs + 4))" 2 &
noisy=$!
sleep 2
snap "$work/beside.cpu0"; randwrite beside "$free" "$secs" 1; snap "$work/beside.cpu1"
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

# Where the CPU went: jiffies and ticks are both 1/CLK_TCK s; fio reports its own share.
hz = os.sysconf("SC_CLK_TCK")
def cpu(phase):
    def read(i):
        lines = open(os.path.join(work, f"{phase}.cpu{i}")).read().split("\n")
        busy, total = map(int, lines[0].split())
        return busy, total, {l.split()[0]: int(l.split()[1]) for l in lines[1:] if l.strip()}
    b0, t0, p0 = read(0)
    b1, t1, p1 = read(1)
    return (b1 - b0) / (t1 - t0), (t1 - t0) / hz, {k: (p1[k] - p0[k]) / hz for k in p0}
def fio_cpu(name):
    text = open(os.path.join(work, f"{name}.json")).read()
    d = json.loads(text[text.index("{"):])
    j = d["jobs"][0]
    return (j["usr_cpu"] + j["sys_cpu"]) / 100 * j["job_runtime"] / 1000
print()
print("| phase | machine busy | nodes CPU s | attach (unlimited) CPU s | attach (limited) CPU s | fio (unlimited) CPU s |")
print("|---|---|---|---|---|---|")
for phase, label in [("alone", "unlimited alone"), ("beside", "beside the limited volume")]:
    busy, wall, procs = cpu(phase)
    print(f"| {label} | {busy:.0%} of {os.cpu_count()} cores over {wall / os.cpu_count():.0f} s | {procs['nodes']:.1f} | {procs['attach-free']:.1f} | {procs['attach-limited']:.1f} | {fio_cpu(phase):.1f} |")
PY
if [ -f "$work/alone.perf" ]; then
  echo; echo "CPU by thread, unlimited volume alone (perf, 10 s):"
  perf report -i "$work/alone.perf" --no-children --sort comm --stdio -g none 2>/dev/null | grep '%' | head -8
  echo; echo "hottest functions in the nodes' runtime threads:"
  perf report -i "$work/alone.perf" --no-children --comm basalt-node --sort symbol --stdio -g none 2>/dev/null | grep '%' | head -15 | cut -c1-120
fi
