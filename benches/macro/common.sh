# Shared by the macro benchmarks (sourced, from the repository root).

# Waits (up to $3 seconds) for the process writing $1 to print `ready`; fails showing its
# stderr ($2) otherwise.
wait_ready() {
  for _ in $(seq 1 "$3"); do grep -q '^ready$' "$1" 2>/dev/null && return 0; sleep 1; done
  echo "$1: not ready after $3 s" >&2; cat "$2" >&2; exit 1
}
