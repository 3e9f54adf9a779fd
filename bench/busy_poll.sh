#!/usr/bin/env bash
# Polling before sleeping (--busy-poll-us) side by side: for each round and
# each window in WINDOWS (alternated, so machine noise hits both alike),
# starts `tessera up` with that window in a temporary directory, writes
# 512 MiB, and runs fio's nbd engine: 4k random writes and reads at queue
# depth 1 and 32 for RUNTIME seconds, then 4k random writes paced at 200
# and 1,000 per second (what polling costs a lightly loaded cluster).
# Prints IOPS, mean and p99 latency, and server CPU µs per I/O (gateway and
# every storage daemon, /proc/PID/stat), then stops the cluster.
#
#   [DAEMONS=3 REPLICAS=3] [WINDOWS="500 0"] bench/busy_poll.sh [RUNTIME=5] [ROUNDS=2]
# Needs release binaries (cargo build --release --workspace --bins; TESSERA_BIN
# overrides their directory) and fio.
set -euo pipefail
. "$(dirname "$0")/cluster_lib.sh"
runtime=${1:-5}
rounds=${2:-2}
windows=${WINDOWS:-"500 0"}
daemons=${DAEMONS:-1}
bin=${TESSERA_BIN:-"$(cd "$(dirname "$0")/.." && pwd)/target/release"}
dir=$(mktemp -d /tmp/tessera-poll.XXXXXX)
up=""
stop() { [ -n "$up" ] && { kill -TERM "$up" 2>/dev/null; wait "$up" 2>/dev/null || true; }; up=""; }
trap 'stop; rm -rf "$dir"' EXIT
tick=$(getconf CLK_TCK)
for round in $(seq "$rounds"); do
  for w in $windows; do
    rm -rf "$dir/data"
    for i in $(seq 0 $((daemons - 1))); do
      mkdir -p "$dir/data/storage-$i"
      # Written in full, as a raw device would be (see cpu_per_io.sh).
      dd if=/dev/zero of="$dir/data/storage-$i/disk0.img" bs=1M count=2048 oflag=direct status=none
    done
    port=$((20000 + RANDOM % 20000))
    "$bin/tessera" up --dir "$dir/data" --storage-daemons "$daemons" --disk-size 2G \
      ${REPLICAS:+--replicas $REPLICAS} --busy-poll-us "$w" --iscsi-listen none \
      --nbd-listen 127.0.0.1:$port --manager-listen 127.0.0.1:0 --volume demo:1G >"$dir/up.log" 2>&1 &
    up=$!
    wait_ready "$dir/up.log"
    pids=$(server_pids "$dir/up.log")
    uri=nbd://127.0.0.1:$port/demo
    fio --name=fill --ioengine=nbd --uri=$uri --rw=write --bs=1m --iodepth=8 --size=512m >/dev/null 2>&1
    cpu() { cpu_ticks $pids; }
    for job in "randwrite 1 0" "randread 1 0" "randwrite 32 0" "randread 32 0" "randwrite 1 200" "randwrite 1 1000"; do
      set -- $job
      c0=$(cpu)
      out=$(fio --name=j --ioengine=nbd --uri=$uri --rw=$1 --bs=4k --iodepth=$2 --size=512m \
        $( [ "$3" != 0 ] && echo --rate_iops=$3 ) \
        --time_based --runtime="$runtime" --output-format=json 2>/dev/null | sed -n '/^{/,$p')
      c1=$(cpu)
      python3 -c '
import json,sys
j=json.loads(sys.argv[1]); t=int(sys.argv[2]); tick=int(sys.argv[3])
job=j["jobs"][0]; d=job["read"] if job["read"]["total_ios"] else job["write"]
ios=max(d["total_ios"],1); c=d["clat_ns"]
iops=d["iops"]; mean=c["mean"]/1000; p99=c["percentile"]["99.000000"]/1000
name=sys.argv[5] + ("" if sys.argv[6]=="0" else "@"+sys.argv[6]+"/s")
print(f"round {sys.argv[4]} poll={sys.argv[7]:>4}us {name:<22} iops={iops:>7.0f} mean_us={mean:>6.0f} p99_us={p99:>6.0f} cpu_us_per_io={t/tick*1e6/ios:>6.1f}")
' "$out" $((c1 - c0)) "$tick" "$round" "$1-4k-qd$2" "$3" "$w"
    done
    stop
  done
done
