#!/usr/bin/env bash
# Where the iSCSI gateway spends its CPU: starts `tessera up` (one storage
# daemon, separate gateway; EMBEDDED=1 for the gateway inside the storage
# daemon) in a temporary directory with the iSCSI portal on a free port,
# fills 1 GiB, then for each workload measures server CPU µs per I/O (from
# /proc/PID/stat) and, with PERF=1, records the gateway with
# `perf record -F 1000 --call-graph dwarf,32768` and prints the top of
# `perf report --no-children` (self time by symbol) and the callers of
# memmove/memcpy/memset and CRC32C.
#
#   [PERF=1] [EMBEDDED=1] [OUT=dir] bench/iscsi_profile.sh [RUNTIME=5] [WORKLOADS...]
# A workload is rw:bs:qd with rw one of read, randread (iscsi-perf),
# write, randwrite (fio's libiscsi engine, bench/build_fio_libiscsi.sh;
# FIO_LIBISCSI overrides /var/tmp/fio-libiscsi/fio). Default: read:128k:8
# write:128k:8 randwrite:4k:32 randread:4k:32. Needs release binaries
# (TESSERA_BIN overrides target/release), iscsi-perf, iscsi-ls, fio.
set -euo pipefail
runtime=${1:-5}
shift || true
workloads=("$@")
[ ${#workloads[@]} -gt 0 ] || workloads=(read:128k:8 write:128k:8 randwrite:4k:32 randread:4k:32)
bin=${TESSERA_BIN:-"$(cd "$(dirname "$0")/.." && pwd)/target/release"}
fio_iscsi=${FIO_LIBISCSI:-/var/tmp/fio-libiscsi/fio}
dir=$(mktemp -d /tmp/tessera-iprof.XXXXXX)
# Cleanup from here on (the disk file below is 2 GiB): keep the directory
# only when it holds profiles to read (PERF=1 without OUT).
up=""
trap '[ -n "$up" ] && { kill -TERM $up 2>/dev/null; wait $up 2>/dev/null; }; rm -rf "$dir/data"; [ -n "${PERF:-}" ] && [ -z "${OUT:-}" ] || rm -rf "$dir"' EXIT
out=${OUT:-$dir/out}
mkdir -p "$out" "$dir/data/storage-0"
# A disk file written in full, as a raw device would be (see cpu_per_io.sh).
dd if=/dev/zero of="$dir/data/storage-0/disk0.img" bs=1M count=2048 oflag=direct status=none
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
iport=$(free_port)
"$bin/tessera" up --dir "$dir/data" --storage-daemons 1 --disk-size 2G \
  --nbd-listen 127.0.0.1:0 --manager-listen 127.0.0.1:0 --iscsi-listen 127.0.0.1:$iport \
  --volume bench:1G ${EMBEDDED:+--embedded-gateway} >"$dir/up.log" 2>&1 &
up=$!
for _ in $(seq 300); do grep -q '^ready' "$dir/up.log" && break; sleep 0.1; done
grep -q '^ready' "$dir/up.log" || { cat "$dir/up.log"; exit 1; }
pids=$(sed -n 's/^\(storage-0\|gateway\) pid=\([0-9]*\).*/\2/p' "$dir/up.log" | sort -u | tr '\n' ' ')
gw=$(sed -n 's/^gateway pid=\([0-9]*\).*/\1/p' "$dir/up.log")
[ -n "${EMBEDDED:-}" ] && gw=$(sed -n 's/^storage-0 pid=\([0-9]*\).*/\1/p' "$dir/up.log")
nbd=$(sed -n 's/^gateway .*nbd=\([^ ]*\).*/\1/p' "$dir/up.log")
url=iscsi://127.0.0.1:$iport/iqn.2026-11.io.tessera:bench/0
for _ in $(seq 150); do iscsi-ls -s iscsi://127.0.0.1:$iport 2>/dev/null | grep -q tessera:bench && break; sleep 0.2; done
fio --name=fill --ioengine=nbd --uri=nbd://$nbd/bench --rw=write --bs=1m --iodepth=8 --size=1g >/dev/null 2>&1
tick=$(getconf CLK_TCK)
cpu() { local t=0 p f; for p in $pids; do read -r -a f </proc/$p/stat; t=$((t + f[13] + f[14])); done; echo $t; }
gcpu() { local f; read -r -a f </proc/$gw/stat; echo $((f[13] + f[14])); }
echo "binaries: $bin  gateway pid $gw  load: $(cut -d' ' -f1-3 /proc/loadavg)"
for w in "${workloads[@]}"; do
  IFS=: read -r rw bs qd <<<"$w"
  bytes=$(python3 -c "import sys; s=sys.argv[1]; print(int(s[:-1])*1024 if s[-1]=='k' else int(s))" "$bs")
  perfpid=
  if [ -n "${PERF:-}" ]; then
    perf record -q -F 1000 --call-graph dwarf,32768 -p "$gw" -o "$out/$rw-$bs-$qd.data" >/dev/null 2>&1 &
    perfpid=$!
    sleep 0.5
  fi
  c0=$(cpu); g0=$(gcpu)
  case $rw in
    read|randread)
      r=$(iscsi-perf -t "$runtime" -m "$qd" -b $((bytes / 512)) $([ $rw = randread ] && echo -r) "$url" 2>&1 |
        sed -n 's/.*iops average \([0-9]*\) .*/\1/p' | tail -1)
      ios=$((r * runtime));;
    write|randwrite)
      ios=$("$fio_iscsi" --name=w --ioengine=libiscsi --rw=$rw --bs=$bs --iodepth=$qd --time_based \
        --runtime=$runtime --output-format=json --filename="${url//:/\\:}" 2>/dev/null |
        python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):]); print(j["jobs"][0]["write"]["total_ios"])')
      r=$((ios / runtime));;
  esac
  c1=$(cpu); g1=$(gcpu)
  if [ -n "$perfpid" ]; then kill -INT $perfpid; wait $perfpid || true; fi
  python3 -c '
import sys
rw,bs,qd,iops,ios,c,g,tick=sys.argv[1:]
ios=max(int(ios),1); tick=int(tick)
print(f"{rw} {bs} QD{qd}: {int(iops):,} IOPS, server CPU {int(c)*1e6/tick/ios:.0f} us/IO (gateway {int(g)*1e6/tick/ios:.0f})")
' "$rw" "$bs" "$qd" "$r" "$ios" $((c1 - c0)) $((g1 - g0)) "$tick"
  if [ -n "$perfpid" ]; then
    f="$out/$rw-$bs-$qd.data"
    perf report -i "$f" --no-children --percent-limit 1.5 --stdio -g none 2>/dev/null |
      grep -v '^#' | grep -v '^$' | head -25 > "$out/$rw-$bs-$qd.top.txt"
    perf report -i "$f" --no-children --stdio -g caller,0.5,callee,function,percent \
      -S __memmove_avx_unaligned_erms,__memcpy_avx_unaligned_erms,__memset_avx2_unaligned_erms,__memmove_avx512_unaligned_erms,__memset_avx512_unaligned_erms,crc32c::hw_x86_64::crc32c 2>/dev/null \
      > "$out/$rw-$bs-$qd.copies.txt" || true
    cat "$out/$rw-$bs-$qd.top.txt"
  fi
done
[ -n "${PERF:-}" ] && echo "profiles in $out"
