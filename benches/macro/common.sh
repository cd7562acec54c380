# Shared by the macro benchmarks (sourced, from the repository root).

# Sets $pgs ($BASALT_BENCH_PGS, default 64), $work ($BASALT_BENCH_DIR or ./bench-work, then
# /$1 if given; emptied) and $bin after a release build.
bench_setup() {
  pgs="${BASALT_BENCH_PGS:-64}"
  work="${BASALT_BENCH_DIR:-$PWD/bench-work}${1:+/$1}"
  rm -rf "$work"; mkdir -p "$work"
  cargo build --release --workspace --bins >&2
  bin="$CARGO_TARGET_DIR/release"
}

# Waits (up to $3 seconds) for the process writing $1 to print `ready`; fails showing its
# stderr ($2) otherwise.
wait_ready() {
  for _ in $(seq 1 "$3"); do grep -q '^ready$' "$1" 2>/dev/null && return 0; sleep 1; done
  echo "$1: not ready after $3 s" >&2; cat "$2" >&2; exit 1
}

# Starts `basalt dev up` in $work/dev ($pgs placement groups, $1 per node), waits until it
# serves, exports its BASALT_CLUSTER/CA/TOKEN_FILE and sets $dev_pid (for the caller's cleanup).
dev_up() {
  "$bin/basalt" dev up --dir "$work/dev" --size "$1" --pgs "$pgs" > "$work/devup.out" 2> "$work/devup.err" &
  dev_pid=$!
  wait_ready "$work/devup.out" "$work/devup.err" 120
  export $(grep -E '^BASALT_(CLUSTER|CA|TOKEN_FILE)=' "$work/devup.out" | xargs)
}

# Stops the attach processes in $attach_pids and the `dev up` of $dev_pid, and removes the
# cluster's directory unless BASALT_BENCH_KEEP=1 (an EXIT trap).
bench_cleanup() {
  for p in ${attach_pids:-}; do kill -INT "$p" 2>/dev/null && wait "$p" 2>/dev/null || true; done
  [ -n "${dev_pid:-}" ] && kill -INT "$dev_pid" 2>/dev/null && wait "$dev_pid" 2>/dev/null || true
  [ "${BASALT_BENCH_KEEP:-0}" = 1 ] || rm -rf "$work/dev"
}

# Creates volume $1 of size $2 (further arguments go to `volume create`), attaches it over NBD
# (its pid added to $attach_pids), writes it whole with fio and sets $uri.
attach_prefilled() {
  local name=$1 size=$2; shift 2
  "$bin/basalt" volume create "$name" --size "$size" "$@" >&2
  "$bin/basalt" attach "$name" --nbd-listen 127.0.0.1:0 > "$work/attach-$name.out" 2> "$work/attach-$name.err" &
  attach_pids="${attach_pids:-} $!"
  wait_ready "$work/attach-$name.out" "$work/attach-$name.err" 60
  uri=$(grep '^nbd://' "$work/attach-$name.out" | head -1)
  fio --name=prefill --ioengine=nbd --uri="$uri" --size="$size" --rw=write --bs=1M --iodepth=8 --output-format=json > "$work/prefill-$name.json"
}
