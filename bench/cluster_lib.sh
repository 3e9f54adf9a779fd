# Shared by the benchmark scripts that start `tessera up` themselves
# (busy_poll.sh, cpu_per_io.sh): source it, do not run it.

# Wait up to 30 s for `tessera up` (its output in LOG) to print `ready`;
# on a timeout print the log and exit 1.
wait_ready() {
  local log=$1
  for _ in $(seq 300); do grep -q '^ready' "$log" && break; sleep 0.1; done
  grep -q '^ready' "$log" || { cat "$log"; exit 1; }
}

# The PIDs of the gateway and storage daemons `tessera up` printed in LOG,
# each once (an embedded gateway's PID is storage-0's).
server_pids() {
  sed -n 's/^\(storage-[0-9]*\|gateway\) pid=\([0-9]*\).*/\2/p' "$1" | sort -u | tr '\n' ' '
}

# User + system CPU time, in clock ticks, of the processes PID... so far.
cpu_ticks() {
  local t=0 p f
  for p in "$@"; do read -r -a f </proc/"$p"/stat; t=$((t + f[13] + f[14])); done
  echo $t
}
