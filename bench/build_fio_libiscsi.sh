#!/usr/bin/env bash
# Build fio with its libiscsi engine (Debian's fio package is built without
# it) from Debian's own source package, for bench/iscsi_compare.py's write
# workloads. Needs root and the Debian archive (deb-src is added in its own
# file, /etc/apt/sources.list.d/tessera-deb-src.sources).
#
#   bench/build_fio_libiscsi.sh [DIR=/var/tmp/fio-libiscsi]
# Prints the path of the fio binary; iscsi_compare.py looks for it there
# (or in $FIO_LIBISCSI).
set -euo pipefail
dir=${1:-/var/tmp/fio-libiscsi}
if [ -x "$dir/fio" ] && "$dir/fio" --enghelp=libiscsi >/dev/null 2>&1; then
  echo "$dir/fio"; exit 0
fi
src=/etc/apt/sources.list.d/tessera-deb-src.sources
if ! grep -qs deb-src "$src"; then
  . /etc/os-release
  cat >"$src" <<EOT
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: $VERSION_CODENAME
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOT
fi
apt-get update -qq
apt-get install -y -qq libiscsi-dev dpkg-dev build-essential >/dev/null
mkdir -p "$dir/src"
cd "$dir/src"
apt-get source -qq fio >/dev/null 2>&1
cd fio-*/
# Captured first: `grep -q` stops reading at its match, and under pipefail
# the configure script's SIGPIPE would fail the build.
conf=$(./configure --enable-libiscsi --disable-native)
grep -q 'iscsi engine *yes' <<<"$conf" \
  || { echo "fio's configure did not enable the libiscsi engine" >&2; exit 1; }
make -j"$(nproc)" fio >/dev/null
./fio --enghelp=libiscsi >/dev/null
cp fio "$dir/fio"
echo "$dir/fio"
