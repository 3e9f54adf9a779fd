#!/usr/bin/env bash
# Server CPU time per I/O of a one-copy Tessera (gateway + storage daemon),
# the figure to watch when changing the data path: it moves much less with
# machine noise than IOPS do. Starts `tessera up` with one storage daemon in
# a temporary directory, writes 512 MiB, runs each fio job (nbd engine) for
# RUNTIME seconds and prints IOPS, mean latency and CPU µs per I/O (from
# /proc/PID/stat) and context switches per I/O (every thread's
# voluntary + involuntary switches, /proc/PID/task/*/status), then stops the
# cluster. EMBEDDED=1 runs the gateway inside the storage daemon
# (`tessera up --embedded-gateway`). DAEMONS=3 REPLICAS=3 measures issue 5's
# setting (three storage daemons, three copies, every disk file on this
# disk); CPU and switches are then summed over every daemon.
#
#   [EMBEDDED=1] [DAEMONS=n REPLICAS=n] bench/cpu_per_io.sh [RUNTIME=5] [ROUNDS=2]
# Needs release binaries (cargo build --release --workspace --bins; TESSERA_BIN
# overrides their directory) and fio.
set -euo pipefail
. "$(dirname "$0")/cluster_lib.sh"
runtime=${1:-5}
rounds=${2:-2}
bin=${TESSERA_BIN:-"$(cd "$(dirname "$0")/.." && pwd)/target/release"}
dir=$(mktemp -d /tmp/tessera-cpu.XXXXXX)
# Cleanup from here on: the disk files below are 4 GiB each, and a run
# interrupted while writing them used to leave them behind (13 GB once).
up=""
trap '[ -n "$up" ] && { kill -TERM $up 2>/dev/null; wait $up 2>/dev/null; }; rm -rf "$dir"' EXIT
port=$((20000 + RANDOM % 20000))
# A disk file written in full, as a raw device would be (and as
# nbd_compare.py does): on a sparse or fallocated file every redirected
# write would make ext4 allocate or convert an extent, which io_uring
# cannot do without blocking, so it hands the write to an io-wq worker
# thread (measured here: 1.1 extra context switches per 4k write at QD1).
daemons=${DAEMONS:-1}
for i in $(seq 0 $((daemons - 1))); do
  mkdir -p "$dir/data/storage-$i"
  dd if=/dev/zero of="$dir/data/storage-$i/disk0.img" bs=1M count=4096 oflag=direct status=none
done
"$bin/tessera" up --dir "$dir/data" --storage-daemons "$daemons" --disk-size 4G \
  ${REPLICAS:+--replicas $REPLICAS} \
  --nbd-listen 127.0.0.1:$port --manager-listen 127.0.0.1:0 --volume demo:2G \
  ${EMBEDDED:+--embedded-gateway} >"$dir/up.log" 2>&1 &
up=$!
wait_ready "$dir/up.log"
# The embedded gateway's pid is storage-0's: count it once.
pids=$(server_pids "$dir/up.log")
uri=nbd://127.0.0.1:$port/demo
fio --name=fill --ioengine=nbd --uri=$uri --rw=write --bs=1m --iodepth=8 --size=512m >/dev/null 2>&1
tick=$(getconf CLK_TCK)
cpu() { cpu_ticks $pids; }
ctx() { local p; for p in $pids; do cat /proc/$p/task/*/status 2>/dev/null; done |
  awk '/^(voluntary|nonvoluntary)_ctxt_switches/ {n += $2} END {print n + 0}'; }
for round in $(seq "$rounds"); do
  for job in "randread 4k 1" "randread 4k 32" "randwrite 4k 1" "randwrite 4k 32" "read 128k 8" "write 128k 8"; do
    set -- $job
    c0=$(cpu); x0=$(ctx)
    out=$(fio --name=j --ioengine=nbd --uri=$uri --rw=$1 --bs=$2 --iodepth=$3 --size=512m \
      --time_based --runtime=$runtime --output-format=json 2>/dev/null | sed -n '/^{/,$p')
    c1=$(cpu); x1=$(ctx)
    python3 -c '
import json,sys
j=json.loads(sys.argv[1]); t=int(sys.argv[2]); tick=int(sys.argv[3])
job=j["jobs"][0]; d=job["read"] if job["read"]["total_ios"] else job["write"]
ios=max(d["total_ios"],1)
iops=d["iops"]; mean=d["clat_ns"]["mean"]/1000
print(f"round {sys.argv[4]} {sys.argv[5]:<22} iops={iops:>7.0f} mean_us={mean:>6.0f} cpu_us_per_io={t/tick*1e6/ios:>6.1f} ctx_per_io={int(sys.argv[6])/ios:>5.2f}")
' "$out" $((c1 - c0)) "$tick" "$round" "$1-$2-qd$3" $((x1 - x0))
  done
done
