#!/usr/bin/env bash
# What a re-encryption costs: an encrypted 1 GiB volume of a `basalt dev up` cluster (release,
# TLS on, 64 PGs unless $BASALT_BENCH_PGS), fully written, attached over NBD; fio 4k random
# writes at QD32 for SECONDS with no re-encryption and then while `volume rekey --reencrypt`
# runs at its default rate; then how long re-encrypting the whole volume takes unthrottled
# (--max-rate 4GiB) with no guest load.
#
#   benches/macro/reencrypt.sh [SECONDS]     (default 20)
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env
. benches/macro/common.sh
secs="${1:-20}"
bench_setup reencrypt

cleanup() {
    [ -n "${attach_pid:-}" ] && kill -INT "$attach_pid" 2>/dev/null && wait "$attach_pid" 2>/dev/null || true
    [ -n "${dev_pid:-}" ] && kill -INT "$dev_pid" 2>/dev/null && wait "$dev_pid" 2>/dev/null || true
    [ "${BASALT_BENCH_KEEP:-0}" = 1 ] || rm -rf "$work/dev"
}
trap cleanup EXIT

dev_up 64MiB
(umask 077; head -c 32 /dev/urandom > "$work/enc.kek")
"$bin/basalt" volume create enc --size 1GiB --encrypt --kek-file "$work/enc.kek" >&2
"$bin/basalt" attach enc --nbd-listen 127.0.0.1:0 --kek-file "$work/enc.kek" > "$work/attach.out" 2> "$work/attach.err" &
attach_pid=$!
wait_ready "$work/attach.out" "$work/attach.err" 60
uri=$(grep '^nbd://' "$work/attach.out" | head -1)
fio --name=prefill --ioengine=nbd --uri="$uri" --size=1G --rw=write --bs=1M --iodepth=8 --output-format=json > "$work/prefill.json"

job() {
  fio --name="$1" --ioengine=nbd --uri="$uri" --size=1G --time_based --runtime="$secs" --ramp_time=2 \
      --randrepeat=0 --norandommap --rw=randwrite --bs=4k --iodepth=32 --output-format=json > "$work/$1.json"
}
job quiet
start=$(date +%s.%N)
"$bin/basalt" --json volume rekey enc --kek-file "$work/enc.kek" --reencrypt > "$work/rekey1.out" 2> "$work/rekey1.err" &
rekey_pid=$!
sleep 3
job during
wait "$rekey_pid"
throttled=$(python3 -c "import time; print(time.time() - $start)")
start=$(date +%s.%N)
"$bin/basalt" --json volume rekey enc --kek-file "$work/enc.kek" --reencrypt --max-rate 4GiB > "$work/rekey2.out" 2> "$work/rekey2.err"
unthrottled=$(python3 -c "import time; print(time.time() - $start)")

python3 - "$work" "$throttled" "$unthrottled" <<'PY'
import json, sys, os
work, throttled, unthrottled = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
def iops(name):
    text = open(os.path.join(work, f"{name}.json")).read()
    return json.loads(text[text.index("{"):])["jobs"][0]["write"]["iops"]
q, d = iops("quiet"), iops("during")
print(f"4k random write QD32: {q:.0f} IOPS alone, {d:.0f} during a default-rate re-encryption: {d / q:.2f}")
print(f"re-encrypting 1 GiB: {throttled:.0f} s at the default rate (under load), {unthrottled:.1f} s unthrottled ({1024 / unthrottled:.0f} MiB/s)")
PY
