#!/usr/bin/env python3
"""Side-by-side NBD benchmark: Tessera against the servers people use today.

In one run, on the same disk, it serves a backing store with:
  * tessera   - `tessera up` (manager, storage daemon(s), gateway), one copy
  * qemu-nbd  - a raw file, --cache=none --aio=io_uring
  * nbdkit    - file plugin (cache=none where supported)
  * nbd-server- a raw file
  * nbdkit-null - nbdkit's null plugin, no disk: not a competitor but the
                ceiling of the client (fio's nbd engine) and loopback TCP
and measures each with fio's nbd engine, plus the local limit: fio with
io_uring and O_DIRECT on a file on the same disk. Workloads: 4k random read
and write at queue depth 1 and 32, 128k sequential read and write at queue
depth 8. Rounds rotate the order of targets; the report gives medians.

Server CPU time per I/O comes from /proc/PID/stat (utime+stime of every
server process, before and after each job). Results: JSON with every
parameter and a Markdown table under bench/results/.

Usage (from the repository root, after `cargo build --release --workspace`):
  bench/nbd_compare.py [--runtime 10] [--rounds 3] [--size 2G] [--targets ...]
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TESSERA_BIN overrides (e.g. target/ci for the CI profile).
BIN = os.environ.get("TESSERA_BIN", os.path.join(ROOT, "target", "release"))
CLK_TCK = os.sysconf("SC_CLK_TCK")

WORKLOADS = [
    # name, rw, bs, iodepth
    ("randread-4k-qd1", "randread", "4k", 1),
    ("randread-4k-qd32", "randread", "4k", 32),
    ("randwrite-4k-qd1", "randwrite", "4k", 1),
    ("randwrite-4k-qd32", "randwrite", "4k", 32),
    ("read-128k-qd8", "read", "128k", 8),
    ("write-128k-qd8", "write", "128k", 8),
]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            # utime, stime, and cutime, cstime of reaped children
            # (nbd-server serves each connection in a child process).
            # Threads are included in the process totals.
            total += sum(int(x) for x in fields[11:15])
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def rss_bytes(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class Target:
    name = "?"
    pids = []

    def fio_args(self):
        raise NotImplementedError

    def stop(self):
        pass


class Local(Target):
    """fio with io_uring and O_DIRECT on a file: the machine's limit."""

    name = "local"

    def __init__(self, work, size):
        self.path = os.path.join(work, "local.img")
        prefill(["--filename=" + self.path, "--ioengine=io_uring", "--direct=1"], size)
        self.pids = []

    def fio_args(self):
        return ["--filename=" + self.path, "--ioengine=io_uring", "--direct=1"]


def prefill(args, size):
    """Write the whole store once so reads hit allocated data everywhere."""
    subprocess.run(
        ["fio", "--name=prefill", "--rw=write", "--bs=1m", "--iodepth=8",
         "--size=" + size, "--output-format=terse"] + args,
        check=True, stdout=subprocess.DEVNULL)


class Nbd(Target):
    def fio_args(self):
        return ["--ioengine=nbd", f"--uri=nbd://127.0.0.1:{self.port}/{self.export}"]

    def stop(self):
        for p in getattr(self, "procs", []):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


class Tessera(Nbd):
    name = "tessera"
    extra = []
    daemons = 1

    def __init__(self, work, size):
        d = os.path.join(work, self.name)
        disk = int(parse_size(size) * 1.5) // (1 << 20) * (1 << 20)
        # The storage daemon writes every block to a fresh place
        # (redirect-on-write), so on a sparse file each write would also pay
        # for the filesystem allocating blocks. The other servers overwrite
        # a file the prefill wrote in full; give Tessera the same: a disk
        # file written in full (zeroes read as a blank disk), as a real
        # block device would be.
        for i in range(self.daemons):
            disk_path = os.path.join(d, f"storage-{i}", "disk0.img")
            os.makedirs(os.path.dirname(disk_path), exist_ok=True)
            subprocess.run(["dd", "if=/dev/zero", "of=" + disk_path, "bs=1M",
                            f"count={disk >> 20}", "oflag=direct", "status=none"], check=True)
        cmd = [os.path.join(BIN, "tessera"), "up", "--dir", d,
               "--storage-daemons", str(self.daemons), "--disk-size", str(disk),
               "--nbd-listen", "127.0.0.1:0", "--manager-listen", "127.0.0.1:0",
               # No iSCSI portal: its default port may be taken by another
               # cluster on this machine, and NBD is what is measured.
               "--iscsi-listen", "none",
               "--volume", f"bench:{size}"] + self.extra
        self.log = open(os.path.join(work, self.name + "-up.log"), "w")
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.procs = [p]
        self.pids = []
        deadline = time.time() + 120
        for line in p.stdout:
            line = line.strip()
            f = dict(w.split("=", 1) for w in line.split() if "=" in w)
            # The embedded gateway's pid is storage-0's: count it once.
            if line.startswith(("storage-", "gateway ")) and "pid" in f \
                    and int(f["pid"]) not in self.pids:
                self.pids.append(int(f["pid"]))
            if line.startswith("gateway "):
                self.port = int(f["nbd"].rsplit(":", 1)[1])
            if line == "ready":
                break
            if time.time() > deadline:
                raise RuntimeError("tessera up did not become ready")
        else:
            raise RuntimeError(f"tessera up exited before ready: see {self.log.name}")
        self.export = "bench"
        # Keep draining stdout so the supervisor never blocks on a pipe.
        import threading
        threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
        prefill(self.fio_args(), size)


class TesseraEmbedded(Tessera):
    """The gateway inside the storage daemon (`tessera up --embedded-gateway`)."""
    name = "tessera-embedded"
    extra = ["--embedded-gateway"]


class TesseraReplicated(Tessera):
    """Issue 5's setting: 3 storage daemons, 3 copies of every chunk, all on
    this machine's one disk (each client write costs three disk writes)."""
    name = "tessera-3x3"
    daemons = 3
    extra = ["--replicas", "3"]


class TesseraNoPoll(Tessera):
    """One copy with the event loops sleeping as soon as they run out of
    work (`--busy-poll-us 0`, the behaviour before polling before sleeping)."""
    name = "tessera-nopoll"
    extra = ["--busy-poll-us", "0"]


class TesseraReplicatedNoPoll(TesseraReplicated):
    """Three copies, `--busy-poll-us 0`."""
    name = "tessera-3x3-nopoll"
    extra = TesseraReplicated.extra + ["--busy-poll-us", "0"]


class QemuNbd(Nbd):
    name = "qemu-nbd"

    def __init__(self, work, size):
        path = os.path.join(work, "qemu.img")
        subprocess.run(["truncate", "-s", size, path], check=True)
        self.port = free_port()
        self.export = "bench"
        p = subprocess.Popen(["qemu-nbd", "-f", "raw", "--cache=none", "--aio=io_uring",
                              "-t", "--shared=8", "-x", "bench", "-b", "127.0.0.1",
                              "-p", str(self.port), path],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs = [p]
        self.pids = [p.pid]
        wait_port(self.port)
        prefill(self.fio_args(), size)


class Nbdkit(Nbd):
    name = "nbdkit"

    def __init__(self, work, size):
        path = os.path.join(work, "nbdkit.img")
        subprocess.run(["truncate", "-s", size, path], check=True)
        self.port = free_port()
        self.export = ""
        args = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(self.port), "file", path]
        help_text = subprocess.run(["nbdkit", "file", "--help"], capture_output=True,
                                   text=True).stdout
        if "cache=" in help_text:
            args.append("cache=none")
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs = [p]
        self.pids = [p.pid]
        wait_port(self.port)
        prefill(self.fio_args(), size)


class NbdkitNull(Nbd):
    """nbdkit's null plugin: no disk at all (reads are zeroes, writes are
    dropped). Not a competitor: the ceiling of fio's nbd engine, libnbd and
    loopback TCP on this machine, which bounds every NBD server here."""

    name = "nbdkit-null"

    def __init__(self, work, size):
        self.port = free_port()
        self.export = ""
        p = subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(self.port),
                              "null", "size=" + size],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs = [p]
        self.pids = [p.pid]
        wait_port(self.port)


class NbdServer(Nbd):
    name = "nbd-server"

    def __init__(self, work, size):
        path = os.path.join(work, "nbd-server.img")
        subprocess.run(["truncate", "-s", size, path], check=True)
        self.port = free_port()
        self.export = "bench"
        conf = os.path.join(work, "nbd-server.conf")
        with open(conf, "w") as f:
            f.write(f"[generic]\nlistenaddr = 127.0.0.1\nport = {self.port}\n"
                    f"allowlist = true\nuser = root\ngroup = root\n"
                    f"[bench]\nexportname = {path}\n")
        # nbd-server daemonises and serves each client in a child process
        # (its -d mode serves a single connection), so find the daemon by
        # its unique config path; children's CPU time is reaped into it.
        subprocess.run(["nbd-server", "-C", conf], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        self.daemon_pid = min(pid for pid in pids_with_arg(conf))
        self.procs = []
        self.pids = [self.daemon_pid]
        prefill(self.fio_args(), size)


def _stop_nbd_server(self):
    try:
        os.kill(self.daemon_pid, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


NbdServer.stop = _stop_nbd_server

TARGETS = {"local": Local, "tessera": Tessera, "tessera-embedded": TesseraEmbedded,
           "tessera-3x3": TesseraReplicated, "tessera-nopoll": TesseraNoPoll,
           "tessera-3x3-nopoll": TesseraReplicatedNoPoll, "qemu-nbd": QemuNbd,
           "nbdkit": Nbdkit, "nbdkit-null": NbdkitNull, "nbd-server": NbdServer}


def pids_with_arg(arg):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if arg.encode() in f.read().split(b"\0"):
                        out.append(int(d))
            except OSError:
                pass
    return out


def parse_size(s):
    s = s.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s and s[-1] in mult:
        return int(s[:-1]) * mult[s[-1]]
    return int(s)


def run_fio(target, wl, runtime, size):
    name, rw, bs, qd = wl
    pids = target.pids
    cpu0 = cpu_seconds(pids)
    cmd = ["fio", "--name=" + name, "--rw=" + rw, "--bs=" + bs, f"--iodepth={qd}",
           "--size=" + size, "--time_based=1", f"--runtime={runtime}",
           "--ramp_time=1", "--randrepeat=0", "--norandommap=1",
           "--output-format=json"] + target.fio_args()
    out = subprocess.run(cmd, capture_output=True, text=True)
    cpu1 = cpu_seconds(pids)
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-500:]}
    # fio's nbd engine prints a line before the JSON document.
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    side = job["read"] if rw in ("read", "randread") else job["write"]
    ios = side["total_ios"]
    lat = side["clat_ns"]
    p99 = lat.get("percentile", {}).get("99.000000", 0)
    # fio's total_ios excludes the ramp; CPU includes it: scale by runtime.
    ramp_scale = runtime / (runtime + 1)
    return {
        "iops": side["iops"],
        "mb_s": side["bw_bytes"] / 1e6,
        "mean_lat_us": side["lat_ns"]["mean"] / 1000,
        "p99_lat_us": p99 / 1000,
        "server_cpu_us_per_io": ((cpu1 - cpu0) * ramp_scale * 1e6 / ios) if ios and pids else None,
        "server_rss_mib": rss_bytes(pids) / (1 << 20) if pids else None,
        "command": " ".join(cmd),
    }


def main():
    # SIGTERM behaves like Ctrl-C: stop every server this run started.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="2G", help="size of each backing store")
    ap.add_argument("--targets",
                    default="local,tessera,tessera-embedded,qemu-nbd,nbdkit,nbd-server")
    ap.add_argument("--workloads", default=",".join(w[0] for w in WORKLOADS))
    ap.add_argument("--workdir", default=os.path.join(ROOT, "target", "bench"),
                    help="scratch directory (must be on the disk being measured)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args()

    names = [t for t in args.targets.split(",") if t]
    wls = [w for w in WORKLOADS if w[0] in args.workloads.split(",")]
    os.makedirs(args.workdir, exist_ok=True)
    work = tempfile.mkdtemp(dir=args.workdir)
    targets = {}
    results = {n: {w[0]: [] for w in wls} for n in names}
    try:
        for n in names:
            tool = {"qemu-nbd": "qemu-nbd", "nbdkit": "nbdkit", "nbdkit-null": "nbdkit",
                    "nbd-server": "nbd-server"}.get(n)
            if tool and not shutil.which(tool):
                print(f"skipping {n}: {tool} not installed", file=sys.stderr)
                continue
            print(f"starting {n}", file=sys.stderr)
            targets[n] = TARGETS[n](work, args.size)
        for r in range(args.rounds):
            order = list(targets)
            k = r % len(order)
            order = order[k:] + order[:k]
            for wl in wls:
                for n in order:
                    res = run_fio(targets[n], wl, args.runtime, args.size)
                    print(f"round {r} {wl[0]:18} {n:10} {res.get('iops', 0):10.0f} IOPS "
                          f"{res.get('mean_lat_us', 0):8.1f} us", file=sys.stderr)
                    results[n][wl[0]].append(res)
    finally:
        for t in targets.values():
            t.stop()
        shutil.rmtree(work, ignore_errors=True)

    summary = {}
    for n in targets:
        summary[n] = {}
        for wl in wls:
            runs = [x for x in results[n][wl[0]] if "iops" in x]
            if not runs:
                continue
            med = lambda k: statistics.median([x[k] for x in runs if x[k] is not None]) \
                if any(x[k] is not None for x in runs) else None
            summary[n][wl[0]] = {k: med(k) for k in
                                 ("iops", "mb_s", "mean_lat_us", "p99_lat_us",
                                  "server_cpu_us_per_io", "server_rss_mib")}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    os.makedirs(args.out, exist_ok=True)
    command = "bench/nbd_compare.py " + " ".join(sys.argv[1:])
    doc = {"command": command, "date": stamp, "runtime_s": args.runtime, "rounds": args.rounds,
           "size": args.size, "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release},
           "summary": summary, "runs": results}
    base = os.path.join(args.out, f"nbd-{stamp}")
    with open(base + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    lines = [f"# NBD benchmark {stamp}", "", f"Command: `{command}`", "",
             f"fio nbd engine; {args.rounds} round(s) of {args.runtime} s per job, order rotated; "
             f"medians. Backing stores of {args.size} on the same disk, written in full first. "
             "`local` is fio with io_uring + O_DIRECT on a file (the limit). CPU is server "
             "user+system time per I/O (tessera: gateway + storage daemon).", ""]
    hdr = "| workload | target | IOPS | MB/s | mean µs | p99 µs | CPU µs/IO | RSS MiB | vs local | vs qemu-nbd |"
    lines += [hdr, "|" + "---|" * 10]
    for wl in wls:
        for n in targets:
            s = summary[n].get(wl[0])
            if not s:
                continue
            loc = summary.get("local", {}).get(wl[0], {}).get("iops")
            q = summary.get("qemu-nbd", {}).get(wl[0], {}).get("iops")
            f = lambda v, d=0: "-" if v is None else f"{v:.{d}f}"
            lines.append(f"| {wl[0]} | {n} | {f(s['iops'])} | {f(s['mb_s'], 1)} | "
                         f"{f(s['mean_lat_us'], 1)} | {f(s['p99_lat_us'], 1)} | "
                         f"{f(s['server_cpu_us_per_io'], 1)} | {f(s['server_rss_mib'], 0)} | "
                         f"{f(s['iops'] / loc * 100 if loc else None, 0)}% | "
                         f"{f(s['iops'] / q if q else None, 2)}x |")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {base}.json and {base}.md", file=sys.stderr)


if __name__ == "__main__":
    main()
