#!/usr/bin/env bash
# What recovery-like traffic does to small client writes on this machine's
# disk, without Tessera: fio (io_uring, O_DIRECT) writes 4 KiB at random,
# paced like the failure benchmark's three copies of 400 writes/s (1,200/s,
# queue depth 8), on one file, beside a second job on another file of the
# same disk:
#   - large reads and writes (a rebuild's pushes) of a given size and rate;
#   - the same with an fdatasync every N writes (a storage engine's metadata
#     commit: data sync, journal write, journal sync);
#   - fdatasync alone.
# Prints the client's write latency (p50/p90/p99) and what the other job did.
# A measurement, not a test; about a minute and a half.
#
# Usage: bench/disk_interference.sh [directory on the disk to measure]
set -euo pipefail
dir=${1:-/tmp}
work=$(mktemp -d "$dir/tessera-interference-XXXXXX")
trap 'rm -rf "$work"' EXIT
for f in client other; do
    fio --name=layout --filename="$work/$f.img" --size=512M --rw=write --bs=1m --direct=1 \
        --ioengine=io_uring --iodepth=8 --output-format=terse >/dev/null
done

run() {
    local what=$1
    shift
    fio --output-format=json --direct=1 --ioengine=io_uring --time_based --runtime=6 \
        --name=client --filename="$work/client.img" --size=512M --rw=randwrite --bs=4k \
        --iodepth=8 --rate_iops=1200 "$@" | python3 -c '
import json, sys
what = sys.argv[1]
jobs = json.load(sys.stdin)["jobs"]
def lat(w):
    p = w["clat_ns"]["percentile"]
    return "/".join(f"{p[k] / 1e6:.2f}" for k in ("50.000000", "90.000000", "99.000000"))
c = jobs[0]["write"]
other = "-"
if len(jobs) > 1:
    o = jobs[1]
    r, w = o["read"]["bw_bytes"] / 1e6, o["write"]["bw_bytes"] / 1e6
    other = f"{r:.0f} MB/s read + {w:.0f} MB/s written"
print(f"| {what} | {lat(c)} | {other} |")
' "$what"
}

echo "| beside the client's 4k writes (1,200/s, QD8) | client write latency p50/p90/p99 ms | other job |"
echo "|---|---|---|"
run "nothing"
run "fdatasync 20/s (4k writes, each synced)" --name=other --filename="$work/other.img" \
    --size=512M --rw=randwrite --bs=4k --iodepth=1 --rate_iops=20 --fdatasync=1
run "fdatasync 200/s" --name=other --filename="$work/other.img" \
    --size=512M --rw=randwrite --bs=4k --iodepth=1 --rate_iops=200 --fdatasync=1
for bs in 64k 256k 1m; do
    run "$bs reads + writes, 150+150 MB/s, QD4" --name=other --filename="$work/other.img" \
        --size=512M --rw=randrw --bs=$bs --iodepth=4 --rate=150m,150m
done
run "1m reads + writes, 45+45 MB/s, QD2" --name=other --filename="$work/other.img" \
    --size=512M --rw=randrw --bs=1m --iodepth=2 --rate=45m,45m
run "1m reads + writes, 45+45 MB/s, fdatasync every 8 writes" --name=other \
    --filename="$work/other.img" --size=512M --rw=randrw --bs=1m --iodepth=2 --rate=45m,45m \
    --fdatasync=8
run "64k reads + writes, 150+150 MB/s, fdatasync every 128 writes (8 MiB)" --name=other \
    --filename="$work/other.img" --size=512M --rw=randrw --bs=64k --iodepth=8 \
    --rate=150m,150m --fdatasync=128
