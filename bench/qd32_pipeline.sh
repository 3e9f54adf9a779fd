#!/usr/bin/env bash
# How 4k random reads at queue depth 32 flow: fio's nbd engine against a
# one-copy `tessera up` (gateway and storage daemon) and, in the same run,
# qemu-nbd (--cache=none --aio=io_uring) on a file of the same disk; for
# each, the disk's queue as sampled from /sys/block/DEV/inflight (share of
# samples per bucket of 4), the disk's own mean read latency
# (/sys/block/DEV/stat), and CPU µs per I/O of each process (servers from
# /proc/PID/stat, fio from its own usr+sys). Shows whether requests reach
# the disk in a stream or in convoys, and who spends the CPU.
#
#   [TESSERA_BIN=dir] bench/qd32_pipeline.sh [RUNTIME=5] [ROUNDS=2]
# Needs release binaries, fio, qemu-nbd, root. Both backing stores are 1 GiB
# files on the disk holding /tmp, written in full first.
set -euo pipefail
. "$(dirname "$0")/cluster_lib.sh"
runtime=${1:-5}
rounds=${2:-2}
bin=${TESSERA_BIN:-"$(cd "$(dirname "$0")/.." && pwd)/target/release"}
dir=$(mktemp -d /tmp/tessera-qd32.XXXXXX)
up=""
qemu=""
trap '[ -n "$qemu" ] && kill $qemu 2>/dev/null; [ -n "$up" ] && { kill -TERM $up 2>/dev/null; wait $up 2>/dev/null; }; rm -rf "$dir"' EXIT
dev=$(lsblk -no pkname "$(df --output=source /tmp | tail -1)" 2>/dev/null | head -1)
[ -n "$dev" ] || dev=$(basename "$(df --output=source /tmp | tail -1)")
dd if=/dev/zero of="$dir/qemu.img" bs=1M count=1024 oflag=direct status=none
port=$((20000 + RANDOM % 20000))
start_up "$bin" "$dir" $port 1 1536
tessera_uri=nbd://127.0.0.1:$port/demo
fio --name=fill --ioengine=nbd --uri=$tessera_uri --rw=write --bs=1m --iodepth=8 --size=1g >/dev/null 2>&1
qport=$((port + 1))
qemu-nbd -f raw --cache=none --aio=io_uring -t --shared=8 -x q -b 127.0.0.1 -p $qport "$dir/qemu.img" 2>/dev/null &
qemu=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$qport) 2>/dev/null && break; sleep 0.1; done
qemu_uri=nbd://127.0.0.1:$qport/q
gw=$(sed -n 's/^gateway pid=\([0-9]*\).*/\1/p' "$dir/up.log")
st=$(sed -n 's/^storage-0 pid=\([0-9]*\).*/\1/p' "$dir/up.log")
echo "disk $dev; $(nproc) CPUs; load $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq "$rounds"); do
  for target in tessera qemu-nbd; do
    if [ $target = tessera ]; then uri=$tessera_uri; pids="$gw $st"; else uri=$qemu_uri; pids=$qemu; fi
    c0=""; for p in $pids; do c0="$c0 $(cpu_ticks $p)"; done
    d0=$(cat /sys/block/$dev/stat)
    python3 - "$dev" "$runtime" >"$dir/hist" <<'PY' &
import sys, time, collections
dev, secs = sys.argv[1], float(sys.argv[2]) - 1
h = collections.Counter(); f = open(f'/sys/block/{dev}/inflight')
time.sleep(0.5); end = time.time() + secs
while time.time() < end:
    f.seek(0); r = int(f.read().split()[0]); h[min(r // 4 * 4, 32)] += 1
    time.sleep(0.0002)
n = sum(h.values())
print(' '.join(f'{f"{k}-{k + 3}" if k < 32 else "32+"}:{100 * v / n:.0f}%' for k, v in sorted(h.items())))
PY
    sampler=$!
    out=$(fio --name=j --ioengine=nbd --uri=$uri --rw=randread --bs=4k --iodepth=32 --size=1g \
      --time_based --runtime=$runtime --output-format=json 2>/dev/null | sed -n '/^{/,$p')
    wait $sampler
    d1=$(cat /sys/block/$dev/stat)
    c1=""; for p in $pids; do c1="$c1 $(cpu_ticks $p)"; done
    python3 - "$target" "$round" "$out" "$d0" "$d1" "$c0" "$c1" "$(getconf CLK_TCK)" "$(cat "$dir/hist")" <<'PY'
import json, sys
target, rnd, out, d0, d1, c0, c1, tck, hist = sys.argv[1:]
j = json.loads(out)['jobs'][0]
ios = j['read']['total_ios']; secs = j['elapsed'] if j.get('elapsed') else None
a, b = [int(x) for x in d0.split()], [int(x) for x in d1.split()]
reads, read_ms = b[0] - a[0], b[3] - a[3]
names = ['gateway', 'storage'] if target == 'tessera' else ['qemu-nbd']
cpu = [(int(y) - int(x)) * 1e6 / int(tck) / ios for x, y in zip(c0.split(), c1.split())]
fio_cpu = (j['usr_cpu'] + j['sys_cpu']) / 100 * j['job_runtime'] * 1e3 / ios
print(f"round {rnd} {target:8s} {j['read']['iops']:8.0f} IOPS mean {j['read']['lat_ns']['mean'] / 1e3:6.0f} us | "
      f"disk reads {reads} at {read_ms * 1e3 / max(reads, 1):.0f} us | CPU us/IO "
      + ' '.join(f'{n} {c:.1f}' for n, c in zip(names, cpu)) + f' fio {fio_cpu:.1f} | disk queue {hist}')
PY
  done
done
