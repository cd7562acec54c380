#!/usr/bin/env bash
# Backup and restore throughput on a `basalt dev up` cluster (release, TLS on, 64 PGs unless
# $BASALT_BENCH_PGS; three storage nodes and one backup node on this machine), beside
# `qemu-img convert` of the same bytes between two local raw files:
#   - a volume of $1 GiB (default 1) written whole by fio (half-compressible buffers, like
#     real data), attached read-write by `basalt attach`;
#   - `basalt backup create` (full: every chunk read, compressed, stored), then one after 1%
#     of the volume changed (incremental: only the changed chunks travel), then
#     `basalt backup restore` into a new volume;
#   - baselines: the volume's bytes copied to a raw file, then `qemu-img convert` raw to raw
#     (default cache, and -t none -T none) and to compressed qcow2.
#
#   benches/macro/backup.sh [GiB]
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env
. benches/macro/common.sh
gib="${1:-1}"
bench_setup backup

cleanup() {
    [ -n "${attach_pid:-}" ] && kill -INT "$attach_pid" 2>/dev/null && wait "$attach_pid" 2>/dev/null || true
    [ -n "${dev_pid:-}" ] && kill -INT "$dev_pid" 2>/dev/null && wait "$dev_pid" 2>/dev/null || true
    [ "${BASALT_BENCH_KEEP:-0}" = 1 ] || rm -rf "$work/dev" "$work"/*.raw "$work"/*.qcow2
}
trap cleanup EXIT

dev_up 64MiB
size=$((gib << 30))
"$bin/basalt" volume create bk --size "$size" >&2
"$bin/basalt" attach bk --nbd-listen 127.0.0.1:0 > "$work/attach.out" 2> "$work/attach.err" &
attach_pid=$!
wait_ready "$work/attach.out" "$work/attach.err" 60
uri=$(grep '^nbd://' "$work/attach.out" | head -1)
fio --name=fill --ioengine=nbd --uri="$uri" --size="$size" --rw=write --bs=1M --iodepth=8 \
    --refill_buffers --buffer_compress_percentage=50 --output-format=json > "$work/fill.json"

now_ms() { date +%s%3N; }
timed() { # LABEL CMD... -> appends "LABEL wall_ms" to $work/times, output in $work/LABEL.json
  local label=$1; shift
  local t0; t0=$(now_ms)
  "$@" > "$work/$label.json"
  echo "$label $(( $(now_ms) - t0 ))" >> "$work/times"
}

timed full "$bin/basalt" --json backup create bk
# 1% of the volume, in whole chunks at random places.
fio --name=change --ioengine=nbd --uri="$uri" --size="$size" --io_size=$((size / 100)) --rw=randwrite --bs=1M \
    --randrepeat=0 --refill_buffers --buffer_compress_percentage=50 --output-format=json > "$work/change.json"
timed incremental "$bin/basalt" --json backup create bk
id=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['id'])" "$work/incremental.json")
timed restore "$bin/basalt" --json backup restore "$id" --to restored

# The same bytes as local files for qemu-img.
nbdcopy "$uri" "$work/src.raw"
timed qemu-img-raw qemu-img convert -f raw -O raw "$work/src.raw" "$work/dst.raw"
rm -f "$work/dst.raw"
timed qemu-img-raw-direct qemu-img convert -t none -T none -f raw -O raw "$work/src.raw" "$work/dst.raw"
rm -f "$work/dst.raw"
timed qemu-img-qcow2-compressed qemu-img convert -f raw -O qcow2 -c "$work/src.raw" "$work/dst.qcow2"
qcow2_bytes=$(stat -c %s "$work/dst.qcow2")

python3 - "$work" "$size" "$qcow2_bytes" <<'EOF'
import json, sys
work, size, qcow2 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
times = dict(line.split() for line in open(f"{work}/times"))
mb = lambda b, ms: b / 1e6 / (int(ms) / 1000)
full = json.load(open(f"{work}/full.json"))["copies"][0]
inc = json.load(open(f"{work}/incremental.json"))["copies"][0]
base = mb(size, times["qemu-img-raw"])
direct = mb(size, times["qemu-img-raw-direct"])
rows = [
    ("backup create (full)", full["data_bytes"], times["full"], f"read {full['changed_bytes']>>20} MiB, stored {full['stored_bytes']>>20} MiB"),
    ("backup create (1% changed)", inc["data_bytes"], times["incremental"], f"read {inc['changed_bytes']>>20} MiB, stored {inc['stored_bytes']>>20} MiB"),
    ("backup restore", size, times["restore"], "into a new volume (3 replicas)"),
    ("qemu-img convert raw->raw", size, times["qemu-img-raw"], "default cache"),
    ("qemu-img convert raw->raw -t none -T none", size, times["qemu-img-raw-direct"], "O_DIRECT"),
    ("qemu-img convert raw->qcow2 -c", size, times["qemu-img-qcow2-compressed"], f"{qcow2>>20} MiB written"),
]
print(f"{'operation':45} {'MB/s':>8} {'vs raw':>7} {'vs direct':>9}  note")
for name, b, ms, note in rows:
    r = mb(b, ms)
    print(f"{name:45} {r:8.1f} {r/base:7.2f} {r/direct:9.2f}  {note} ({int(ms)} ms)")
EOF
