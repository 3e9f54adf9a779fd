#!/usr/bin/env bash
# Where a replicated 4 KiB write at queue depth 1 spends its time, hop by
# hop: starts `tessera up --storage-daemons 3 --replicas 3` (every disk file
# written in full first), runs fio's nbd engine (4k random writes, QD1) for
# 4 s, records syscall and block tracepoints system-wide for 0.3 s in the
# middle (`perf record -a`), and prints bench/qd1_timeline.py's table of
# each step's mean and median (fio -> gateway -> primary -> replicas ->
# their disks -> primary -> gateway -> fio). Tracing costs a few µs per
# event: compare steps, and builds under the same tracing.
#
#   [TESSERA_BIN=dir] bench/qd1_timeline.sh
# Needs release binaries, fio and perf (Debian: linux-perf), root.
set -euo pipefail
. "$(dirname "$0")/cluster_lib.sh"
bin=${TESSERA_BIN:-"$(cd "$(dirname "$0")/.." && pwd)/target/release"}
dir=$(mktemp -d /tmp/tessera-timeline.XXXXXX)
up=""
fio_pid=""
trap '[ -n "$fio_pid" ] && kill $fio_pid 2>/dev/null; [ -n "$up" ] && { kill -TERM $up 2>/dev/null; wait $up 2>/dev/null; }; rm -rf "$dir"' EXIT
port=$((20000 + RANDOM % 20000))
start_up "$bin" "$dir" $port 3 2048 --replicas 3
uri=nbd://127.0.0.1:$port/demo
fio --name=fill --ioengine=nbd --uri=$uri --rw=write --bs=1m --iodepth=8 --size=1g >/dev/null 2>&1
fio --name=qd1 --ioengine=nbd --uri=$uri --rw=randwrite --bs=4k --iodepth=1 --size=1g \
  --time_based --runtime=4 >/dev/null 2>&1 &
fio_pid=$!
sleep 1.5
perf record -a -o "$dir/perf.data" \
  -e syscalls:sys_exit_recvfrom,syscalls:sys_enter_writev,syscalls:sys_enter_sendto \
  -e syscalls:sys_enter_io_uring_enter,block:block_rq_issue,block:block_rq_complete \
  -- sleep 0.3 >/dev/null 2>&1
wait $fio_pid
fio_pid=""
perf script -i "$dir/perf.data" -F comm,pid,tid,time,event,trace >"$dir/trace.txt" 2>/dev/null
echo "binaries: $bin"
python3 "$(dirname "$0")/qd1_timeline.py" "$dir/trace.txt"
