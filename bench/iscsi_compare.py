#!/usr/bin/env python3
"""Side-by-side iSCSI benchmark: Tessera's gateway against tgtd.

In one run, on the same disk:
  * tessera - `tessera up` (manager, one storage daemon, gateway), one copy,
              a 512-byte-block volume written in full first
  * tessera-embedded - the same with `--embedded-gateway` (the gateway
              inside the storage daemon)
  * tessera-nopoll - `tessera` with `--busy-poll-us 0` (event loops that
              sleep as soon as they run out of work)
  * tgtd    - a file LUN of the same size, written in full first, with
              `--bstype aio` (which opens the file O_DIRECT itself; tgtd
              refuses `--bsoflags direct` for aio), one portal
  * local   - fio with io_uring and O_DIRECT on tgtd's file (the limit)
and measures reads with libiscsi's `iscsi-perf` (4k random at queue depth
1 and 32, 128k sequential at queue depth 8) and the same workloads as
writes with fio's libiscsi engine (Debian's fio has none: build it with
bench/build_fio_libiscsi.sh; without it, reads only). Rounds rotate the order of targets; the
report gives medians. Server CPU time per I/O comes from /proc/PID/stat
(gateway + storage daemon for Tessera, tgtd).

Usage (root, from the repository root, after
`cargo build --release --workspace --bins`; TESSERA_BIN overrides the
binaries' directory):
  bench/iscsi_compare.py [--runtime 5] [--rounds 3] [--size 2G]
Writes bench/results/iscsi-<UTC time>.json and .md.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("TESSERA_BIN", os.path.join(ROOT, "target", "release"))
CLK_TCK = os.sysconf("SC_CLK_TCK")
BLOCK = 512

WORKLOADS = [
    # name, random, bytes per I/O, queue depth
    ("randread-4k-qd1", True, 4096, 1),
    ("randread-4k-qd32", True, 4096, 32),
    ("read-128k-qd8", False, 131072, 8),
]
# Writes need fio's libiscsi engine (bench/build_fio_libiscsi.sh); without
# it they are left out.
WRITE_WORKLOADS = [
    ("randwrite-4k-qd1", True, 4096, 1),
    ("randwrite-4k-qd32", True, 4096, 32),
    ("write-128k-qd8", False, 131072, 8),
]
FIO_LIBISCSI = os.environ.get("FIO_LIBISCSI", "/var/tmp/fio-libiscsi/fio")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total


def rss_mib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total // 1024


def parse_size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


class Tessera:
    name = "tessera"
    extra = []

    def __init__(self, work, size):
        self.dir = os.path.join(work, self.name)
        self.log = open(os.path.join(work, self.name + "-up.log"), "w")
        # A disk file written in full, as a raw device would be (see
        # nbd_compare.py): redirect-on-write on a sparse file would make
        # every write allocate filesystem blocks, which io_uring hands to a
        # worker thread.
        disk = os.path.join(self.dir, "storage-0", "disk0.img")
        os.makedirs(os.path.dirname(disk), exist_ok=True)
        subprocess.run(["dd", "if=/dev/zero", "of=" + disk, "bs=1M",
                        f"count={size * 2 >> 20}", "oflag=direct", "status=none"], check=True)
        self.proc = subprocess.Popen(
            [os.path.join(BIN, "tessera"), "up", "--dir", self.dir, "--storage-daemons", "1",
             "--disk-size", str(size * 2 // (1 << 20)) + "M", "--nbd-listen", "127.0.0.1:0",
             "--manager-listen", "127.0.0.1:0", "--iscsi-listen", "127.0.0.1:0",
             "--volume", f"bench:{size // (1 << 20)}M"] + self.extra,
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        lines = []
        try:
            while True:
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError("tessera up ended: " + "".join(lines))
                lines.append(line)
                if line.strip() == "ready":
                    break
        except Exception:
            self.stop()
            raise
        text = "".join(lines)
        # The embedded gateway's pid is storage-0's: count it once.
        self.pids = sorted({int(p) for p in
                            re.findall(r"^(?:storage-0|gateway) pid=(\d+)", text, re.M)})
        self.nbd = re.search(r"^gateway .*nbd=(\S+)", text, re.M).group(1)
        portal = re.search(r"^gateway .*iscsi=(\S+)", text, re.M).group(1).split(",")[0]
        self.url = f"iscsi://{portal}/iqn.2026-11.io.tessera:bench/0"
        # iSCSI access control reaches an embedded gateway with its next
        # snapshot poll (about a second): wait until the target is listed.
        deadline = time.time() + 30
        while "iqn.2026-11.io.tessera:bench" not in subprocess.run(
                ["iscsi-ls", "-s", f"iscsi://{portal}"], capture_output=True, text=True).stdout:
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("the iSCSI target never appeared")
            time.sleep(0.2)
        subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri=nbd://{self.nbd}/bench",
                        "--rw=write", "--bs=1m", "--iodepth=8", f"--size={size}"],
                       check=True, capture_output=True)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class TesseraEmbedded(Tessera):
    """The gateway inside the storage daemon (`tessera up --embedded-gateway`)."""
    name = "tessera-embedded"
    extra = ["--embedded-gateway"]


class TesseraNoPoll(Tessera):
    """One copy with the event loops sleeping as soon as they run out of
    work (`--busy-poll-us 0`, as before polling before sleeping)."""
    name = "tessera-nopoll"
    extra = ["--busy-poll-us", "0"]


class Tgt:
    name = "tgtd"

    def __init__(self, work, size):
        self.file = os.path.join(work, "tgt.img")
        subprocess.run(["fio", "--name=fill", "--ioengine=io_uring", "--direct=1", "--rw=write",
                        "--bs=1m", "--iodepth=8", f"--size={size}", f"--filename={self.file}"],
                       check=True, capture_output=True)
        # tgtd's control port (-C) must stay below 32768.
        self.start(work, str(100 + os.getpid() % 16000), "iqn.2026-11.io.tessera.bench:tgt",
                   self.file, "aio")

    def start(self, work, ctl, iqn, backing, bstype):
        """Run tgtd with one target, LUN 1 on `backing` (tgtd's `--bstype`)."""
        self.ctl = ctl
        port = free_port()
        self.log = open(os.path.join(work, f"{self.name}.log"), "w")
        self.proc = subprocess.Popen(["tgtd", "-f", "-C", self.ctl, "--iscsi",
                                      f"portal=127.0.0.1:{port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 30
            while self.adm("--op", "show", "--mode", "target", check=False).returncode != 0:
                if time.time() > deadline:
                    raise RuntimeError("tgtd did not start")
                time.sleep(0.05)
            self.adm("--op", "new", "--mode", "target", "--tid", "1", "-T", iqn)
            self.adm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1",
                     "-b", backing, "--bstype", bstype)
            self.adm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
        except Exception:
            self.proc.kill()
            self.proc.wait()
            raise
        self.pids = [self.proc.pid]
        self.url = f"iscsi://127.0.0.1:{port}/{iqn}/1"

    def adm(self, *args, check=True):
        return subprocess.run(["tgtadm", "-C", self.ctl, "--lld", "iscsi", *args],
                              capture_output=True, text=True, check=check)

    def stop(self):
        # tgtd ignores SIGTERM while it has targets: remove them, then stop it.
        self.adm("--op", "delete", "--mode", "target", "--tid", "1", "--force", check=False)
        self.adm("--op", "delete", "--mode", "system", check=False)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class TgtNull(Tgt):
    """tgtd with `--bstype null` (no disk: reads return nothing read,
    writes are dropped). Not a competitor: the ceiling of the initiator
    (iscsi-perf / fio's libiscsi engine) and loopback TCP on this machine,
    which bounds every iSCSI target here."""
    name = "tgtd-null"

    def __init__(self, work, size):
        self.file = None
        self.start(work, str(16200 + os.getpid() % 16000),
                   "iqn.2026-11.io.tessera.bench:tgt-null", "null", "null")


def iscsi_perf(url, random, nbytes, qd, runtime):
    cmd = ["iscsi-perf", "-t", str(runtime), "-m", str(qd), "-b", str(nbytes // BLOCK)]
    if random:
        cmd.append("-r")
    out = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=runtime + 60)
    m = re.findall(r"iops average (\d+) \((\d+) MB/s\)", out.stdout)
    if out.returncode != 0 or not m or "finished." not in out.stdout:
        raise RuntimeError(f"iscsi-perf failed: {cmd} {out.stdout[-500:]} {out.stderr[-500:]}")
    return int(m[-1][0]), " ".join(cmd + ["URL"])


def fio_iscsi(url, random, nbytes, qd, runtime):
    """Writes through fio's libiscsi engine (a userspace initiator)."""
    cmd = [FIO_LIBISCSI, "--name=w", "--ioengine=libiscsi",
           f"--rw={'randwrite' if random else 'write'}", f"--bs={nbytes}", f"--iodepth={qd}",
           "--time_based", f"--runtime={runtime}", "--output-format=json"]
    # fio splits --filename at colons unless they are escaped.
    out = subprocess.run(cmd + ["--filename=" + url.replace(":", "\\:")],
                         capture_output=True, text=True, timeout=runtime + 60)
    if out.returncode != 0 or "{" not in out.stdout:
        raise RuntimeError(f"fio libiscsi failed: {cmd} {out.stdout[-500:]} {out.stderr[-500:]}")
    j = json.loads(out.stdout[out.stdout.index("{"):])
    return round(j["jobs"][0]["write"]["iops"]), " ".join(cmd + ["--filename=URL"])


def fio_local(path, random, nbytes, qd, runtime, write=False):
    rw = ("randwrite" if random else "write") if write else ("randread" if random else "read")
    cmd = ["fio", "--name=local", "--ioengine=io_uring", "--direct=1", f"--filename={path}",
           f"--rw={rw}", f"--bs={nbytes}", f"--iodepth={qd}",
           "--time_based", f"--runtime={runtime}", "--output-format=json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    j = json.loads(out[out.index("{"):])
    return round(j["jobs"][0]["write" if write else "read"]["iops"]), " ".join(cmd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="2G")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a new one in /var/tmp)")
    ap.add_argument("--null", action="store_true",
                    help="also measure tgtd-null (no disk): the initiator's own ceiling")
    a = ap.parse_args()
    size = parse_size(a.size)
    for tool in ("iscsi-perf", "tgtd", "tgtadm", "fio"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing (apt-get install libiscsi-bin tgt fio)")
    work = a.dir or tempfile.mkdtemp(prefix="tessera-iscsi-bench-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    have_fio = os.access(FIO_LIBISCSI, os.X_OK)
    workloads = WORKLOADS + (WRITE_WORKLOADS if have_fio else [])
    writes = {w[0] for w in WRITE_WORKLOADS}
    if not have_fio:
        print(f"no fio with libiscsi at {FIO_LIBISCSI} (bench/build_fio_libiscsi.sh): reads only")
    load_start = os.getloadavg()
    targets = []
    results = {}  # (workload, target) -> list of (iops, cpu_us_per_io)
    commands = {}
    try:
        targets.append(Tessera(work, size))
        targets.append(TesseraEmbedded(work, size))
        targets.append(TesseraNoPoll(work, size))
        targets.append(Tgt(work, size))
        tgt = targets[-1]
        order = ["tessera", "tessera-embedded", "tessera-nopoll", "tgtd", "local"]
        if a.null:
            targets.append(TgtNull(work, size))
            order.append("tgtd-null")
        for r in range(a.rounds):
            rot = order[r % len(order):] + order[:r % len(order)]
            for wl, random, nbytes, qd in workloads:
                write = wl in writes
                for name in rot:
                    if name == "local":
                        iops, cmd = fio_local(tgt.file, random, nbytes, qd, a.runtime, write)
                        cpu = None
                    else:
                        t = next(x for x in targets if x.name == name)
                        c0, t0 = cpu_ticks(t.pids), time.time()
                        run = fio_iscsi if write else iscsi_perf
                        iops, cmd = run(t.url, random, nbytes, qd, a.runtime)
                        c1 = cpu_ticks(t.pids)
                        ios = max(iops * a.runtime, 1)
                        cpu = (c1 - c0) / CLK_TCK * 1e6 / ios
                    results.setdefault((wl, name), []).append((iops, cpu))
                    commands[(wl, name)] = cmd
        rss = {t.name: rss_mib(t.pids) for t in targets}
    finally:
        for t in targets:
            t.stop()
        if not a.dir:
            shutil.rmtree(work, ignore_errors=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    rows = []
    for wl, _, nbytes, _ in workloads:
        med = {}
        for name in order:
            runs = results[(wl, name)]
            iops = statistics.median(x[0] for x in runs)
            cpus = [x[1] for x in runs if x[1] is not None]
            med[name] = (iops, statistics.median(cpus) if cpus else None)
        for name in order:
            iops, cpu = med[name]
            rows.append({
                "workload": wl, "target": name, "iops": iops,
                "mb_s": round(iops * nbytes / 1e6, 1),
                "cpu_us_per_io": None if cpu is None else round(cpu, 1),
                "rss_mib": rss.get(name),
                "vs_local": round(iops / med["local"][0], 3),
                "vs_tgtd": round(iops / med["tgtd"][0], 3),
                "runs": results[(wl, name)],
                "command": commands[(wl, name)],
            })
    meta = {"binaries": BIN, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
            "runtime_s": a.runtime, "rounds": a.rounds, "size": a.size, "stamp": stamp,
            "kernel": os.uname().release, "cpus": os.cpu_count(),
            "tgt": subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "tgt"],
                                  capture_output=True, text=True).stdout,
            "libiscsi": subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "libiscsi-bin"],
                                       capture_output=True, text=True).stdout}
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    base = os.path.join(ROOT, "bench", "results", f"iscsi-{stamp}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# iSCSI benchmark {stamp}", "",
             f"Command: `bench/iscsi_compare.py --runtime {a.runtime} --rounds {a.rounds} --size {a.size}"
             f"{' --null' if a.null else ''}`",
             "",
             f"Tessera binaries: `{BIN}`. Load average (1/5/15 min) at the start "
             f"{' / '.join(f'{x:.1f}' for x in meta['loadavg_start'])}, at the end "
             f"{' / '.join(f'{x:.1f}' for x in meta['loadavg_end'])}.",
             "",
             f"Reads: iscsi-perf (libiscsi {meta['libiscsi']}); writes: "
             f"{'fio libiscsi engine' if have_fio else 'not measured (no fio with libiscsi)'}; "
             f"{a.rounds} round(s) of "
             f"{a.runtime} s per job, order rotated; medians. Tessera: one storage daemon, one "
             f"copy, 512-byte blocks; tgtd {meta['tgt']}: file LUN, bstype aio, O_DIRECT. Both "
             f"written in full first, on the same disk. `local` is fio io_uring + O_DIRECT on "
             f"tgtd's file. CPU is server user+system time per I/O (tessera: gateway + storage "
             f"daemon). {meta['cpus']} CPUs, kernel {meta['kernel']}; the client (iscsi-perf) "
             f"shares them.", "",
             "| workload | target | IOPS | MB/s | CPU µs/IO | RSS MiB | vs local | vs tgtd |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cpu = "-" if r["cpu_us_per_io"] is None else r["cpu_us_per_io"]
        lines.append(f"| {r['workload']} | {r['target']} | {r['iops']:.0f} | {r['mb_s']} | {cpu} | "
                     f"{r['rss_mib'] if r['rss_mib'] is not None else '-'} | "
                     f"{r['vs_local']:.0%} | {r['vs_tgtd']:.2f}x |")
    lines += ["", "Commands per job (URL elided):", ""]
    for (wl, name), cmd in sorted(commands.items()):
        lines.append(f"* {wl} {name}: `{cmd}`")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
