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
