#!/usr/bin/env bash
# Runs every Tessera test on a fresh Debian machine: installs the real
# clients the tests drive (when missing), builds once in release mode, and
# runs the whole suite (unit, property, simulation, real-client scenarios).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v fio >/dev/null || need+=(fio)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v nbdfuse >/dev/null || need+=(nbdfuse)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v losetup >/dev/null || need+=(mount)
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v curl >/dev/null || need+=(curl)
command -v openssl >/dev/null || need+=(openssl)
command -v iscsi-test-cu >/dev/null || need+=(libiscsi-bin)
block_extra=0
[ -e /usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so ] || block_extra=1
if [ ${#need[@]} -gt 0 ] || [ $block_extra = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null || true
  if [ $block_extra = 1 ]; then
    # qemu-block-extra must match qemu-utils' version exactly. A machine
    # may come with a newer qemu-utils than its apt sources carry (a
    # backport): apt then satisfies the dependency with qemu-system-x86 and
    # removes qemu-utils (no more qemu-img). Install the pair at the
    # version the sources have.
    v=$(apt-cache policy qemu-block-extra | awk '/Candidate:/ {print $2}')
    rest=()
    for p in "${need[@]}"; do [ "$p" = qemu-utils ] || rest+=("$p"); done
    need=("${rest[@]}" qemu-block-extra "qemu-utils=$v")
  fi
  echo "tests/run.sh: installing ${need[*]}"
  apt-get install -y -q --no-install-recommends --allow-downgrades "${need[@]}" >/dev/null
fi
command -v qemu-img >/dev/null || { echo "tests/run.sh: qemu-img missing after install" >&2; exit 1; }

# Build every binary once (profile `ci`: optimised, no LTO; see Cargo.toml);
# the real-client tests start them from target/ci.
cargo build --profile ci --workspace --bins
# Unit, property, simulation and real-client tests, optimised so the
# crash-consistency simulation covers many seeds in little time.
cargo test --profile ci --workspace -- --test-threads="${TESSERA_TEST_THREADS:-4}"
