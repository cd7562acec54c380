# Shared by the macro benchmarks (sourced, from the repository root).

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
