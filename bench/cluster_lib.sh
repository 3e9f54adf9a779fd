# Shared by the benchmark scripts that start `tessera up` themselves
# (busy_poll.sh, cpu_per_io.sh, qd1_timeline.sh, qd32_pipeline.sh): source
# it, do not run it.

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

# Start `tessera up` from BIN in DIR/data with N storage daemons, each disk
# file MB MiB and written in full first (as a raw device would be; a sparse
# file makes ext4 allocate under every redirected write), NBD on
# 127.0.0.1:PORT, a volume demo:1G and any further arguments; sets `up` to
# its PID (the caller's EXIT trap stops it) and waits for `ready`.
start_up() {
  local bin=$1 dir=$2 port=$3 n=$4 mb=$5 i
  shift 5
  for i in $(seq 0 $((n - 1))); do
    mkdir -p "$dir/data/storage-$i"
    dd if=/dev/zero of="$dir/data/storage-$i/disk0.img" bs=1M count="$mb" oflag=direct status=none
  done
  "$bin/tessera" up --dir "$dir/data" --storage-daemons "$n" --disk-size "${mb}M" \
    --nbd-listen 127.0.0.1:"$port" --manager-listen 127.0.0.1:0 --iscsi-listen none \
    --volume demo:1G "$@" >"$dir/up.log" 2>&1 &
  up=$!
  wait_ready "$dir/up.log"
}
