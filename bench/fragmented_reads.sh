#!/usr/bin/env bash
# 128 KiB sequential reads (fio's nbd engine, QD8) over a volume before and
# after random 4 KiB writes scatter it (redirect-on-write), with the storage
# daemon's read relocation on and off, on one storage daemon with a separate
# gateway. Prints, per pass, IOPS and the disk reads the machine's disk saw per
# client read (from /sys/block/<disk>/stat).
#
#   bench/fragmented_reads.sh [ROUNDS] [SIZE]     (defaults: 2, 1G)
#   DISK_PERCENT=300 bench/fragmented_reads.sh    (disk file 3x the volume)
#   TESSERA_BIN=target/ci bench/fragmented_reads.sh
#
# Needs fio with the nbd engine (Debian's fio has it).
set -euo pipefail
ROUNDS=${1:-2}
SIZE=${2:-1G}
# The disk file's size in percent of the volume's (150: as bench/nbd_compare.py).
DISK_PERCENT=${DISK_PERCENT:-150}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${TESSERA_BIN:-$ROOT/target/release}
WORK=$(mktemp -d "$ROOT/target/fragmented-reads.XXXXXX")
DEV=$(lsblk -no pkname "$(df --output=source "$WORK" | tail -1)" 2>/dev/null | head -1)
[ -n "$DEV" ] || DEV=$(basename "$(df --output=source "$WORK" | tail -1)")
UP_PID=
cleanup() {
    if [ -n "$UP_PID" ]; then kill "$UP_PID" 2>/dev/null || true; wait "$UP_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

disk_reads() { awk '{print $1}' "/sys/block/$DEV/stat"; }

start() { # $1: on|off
    rm -rf "$WORK/up"
    mkdir -p "$WORK/up/storage-0"
    local bytes=$(( $(numfmt --from=iec "$SIZE") * DISK_PERCENT / 100 / 1048576 * 1048576 ))
    # A disk file written in full, as the NBD benchmark gives every server.
    dd if=/dev/zero of="$WORK/up/storage-0/disk0.img" bs=1M count=$((bytes >> 20)) oflag=direct status=none
    "$BIN/tessera" up --dir "$WORK/up" --storage-daemons 1 --disk-size "$bytes" \
        --nbd-listen 127.0.0.1:0 --manager-listen 127.0.0.1:0 --iscsi-listen none \
        --relocate-reads "$1" --volume "bench:$SIZE" >"$WORK/up.out" 2>"$WORK/up.log" &
    UP_PID=$!
    for _ in $(seq 120); do grep -q '^ready' "$WORK/up.out" && break; sleep 0.5; done
    grep -q '^ready' "$WORK/up.out" || { cat "$WORK/up.log"; exit 1; }
    URI="nbd://$(sed -n 's/^gateway .*nbd=\([^ ]*\).*/\1/p' "$WORK/up.out")/bench"
}

stop() { kill "$UP_PID"; wait "$UP_PID" 2>/dev/null || true; UP_PID=; }

fio_iops() { # fio args...; prints the job's read+write IOPS
    # (fio's nbd engine prints "connected to NBD server" before the JSON.)
    fio --ioengine=nbd --uri="$URI" --size="$SIZE" --output-format=json "$@" |
        sed -n '/^{/,$p' | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(round(j["read"]["iops"]+j["write"]["iops"]))'
}

pass() { # $1: label
    local before after iops
    before=$(disk_reads)
    iops=$(fio_iops --name=r --rw=read --bs=128k --iodepth=8 --time_based --runtime=4)
    after=$(disk_reads)
    python3 -c "import sys; i,d=$iops,$after-$before; print(f'{sys.argv[1]:<10} {sys.argv[2]:<22} {i:>7} {d/(i*4):>10.1f}')" "$MODE" "$1"
}

echo "command: DISK_PERCENT=$DISK_PERCENT bench/fragmented_reads.sh $ROUNDS $SIZE; disk $DEV; $(date -u +%FT%TZ)"
printf '%-10s %-22s %7s %10s\n' relocate pass "IOPS" "disk rd/IO"
for r in $(seq "$ROUNDS"); do
    for MODE in $( [ $((r % 2)) -eq 1 ] && echo "on off" || echo "off on"); do
        start "$MODE"
        fio_iops --name=fill --rw=write --bs=1m --iodepth=8 >/dev/null
        pass "before random writes"
        w=$(fio_iops --name=w --rw=randwrite --bs=4k --iodepth=32 --time_based --runtime=8)
        pass "after ($w w/s): 1st"
        pass "after: 2nd"
        pass "after: 3rd"
        stop
    done
done
