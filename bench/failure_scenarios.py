#!/usr/bin/env python3
"""Failure benchmark: issue 5's failover, delta-recovery and rebuild figures.

Every copy lives on this machine's one disk (disk files under --workdir).
Clients are fio's nbd engine through the gateway; every fio logs the total
latency of each I/O with its completion time (Unix ms) and offset
(`--write_lat_log --log_avg_msec=0 --log_offset=1 --log_unix_epoch=1`).

0. Sequential write bandwidth of the disk: fio, io_uring, O_DIRECT, 1M
   writes at queue depth 8 on a file laid out first (the yardstick for
   "disk speed"). Also the disk's copy bandwidth: 256k random reads and
   writes, half each, at queue depth 16 on one file (what a recovery or
   rebuild does when its source and destination share the one disk: every
   byte copied is read once and written once), for comparison only.
1. Failover, on `tessera up --storage-daemons 3 --replicas 3` (default 2 s
   heartbeat grace): fio writes 4k at random, paced (--rate-iops), queue
   depth 8. The daemon that received the most client writes over two
   seconds (the primary of the busiest groups) is killed with -9 (`tessera
   up` restarts it after 200 ms) or stopped with SIGSTOP (hung: silent,
   connections open) until it is declared down and the others have done
   200 writes without it, then resumed. Each repetition is its own fio; the
   stall is the longest I/O latency fio saw (also given: the longest gap
   between two completions, and the longest latency before the event as
   the noise floor), as tests/tests/failover.rs measures it.
2. Delta recovery, same cluster: a daemon stopped with SIGSTOP for
   --stop-seconds under the same paced random writes over the whole
   volume, then resumed. Recovered bytes are the storage daemons'
   `tessera_storage_recovery_bytes_total` and
   `tessera_storage_peering_bytes_total` summed (after - before); the
   bound is the distinct 64 KiB regions written while the daemon was away
   (fio's log: writes in flight between the stop, less 250 ms for the last
   flush round, and the moment the map had it up again, plus 250 ms)
   x 64 KiB; the test's looser bound (client write requests x 64 KiB, from
   `tessera_storage_requests_total{op="write"}`) is given too. Recovery
   time: from the resume to every placement group clean (manager status,
   polled every 100 ms); rate: recovered bytes / (clean - up again).
3. Rebuild onto a fourth daemon: `tessera up --storage-daemons 4 --replicas
   3 --down-out-after 3s`, the volume written sequentially in full first,
   then paced 4k random writes (latency logged). A daemon is stopped with
   SIGSTOP for good (`tessera up` restarts a killed daemon, so a dead one
   that stays dead is a stopped one, as in tests/tests/rebuild.rs); the
   manager takes its disk out, its groups are backfilled onto the others.
   Rebuild bandwidth: recovery bytes of the live daemons / (clean - out);
   fio's p99 write latency before the stop vs between the out and clean.

Disk files are written in full before each cluster starts (as
bench/nbd_compare.py does: zeroes read as a blank disk, and writes then
overwrite allocated blocks, as on a block device); --sparse-disks skips it.

Results: JSON with every parameter and sample, and a Markdown table, under
bench/results/failure-<UTC time>.{json,md}. A benchmark, not a test: CI
never runs it. Takes about 4 minutes with the defaults on a 2-core VM;
--quick is a short smoke run (about 1.5 minutes).

Usage (from the repository root, after `cargo build --release --workspace`):
  TESSERA_BIN=target/release bench/failure_scenarios.py [--reps 5] [--quick]
  (scratch files go to a new directory under --workdir, /tmp by default,
  removed at the end; keep it on the disk being measured)
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TESSERA_BIN overrides (e.g. target/ci for the CI profile).
BIN = os.environ.get("TESSERA_BIN", os.path.join(ROOT, "target", "release"))

REGION = 64 << 10  # recovery granularity (docs/replication.md)
FIO_TIMEOUT_S = 600  # no fio runs longer than this, whatever happens
HTTP_TIMEOUT_S = 3


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(s):
    s = s.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s and s[-1] in mult:
        return int(s[:-1]) * mult[s[-1]]
    return int(s)


def http_json(url):
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as r:
        return json.loads(r.read())


def http_text(url):
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as r:
        return r.read().decode()


def metric_sum(text, name, labels=None):
    """Sum of a metric in Prometheus text (all label sets, or the line
    with exactly `labels`, e.g. '{op="write"}')."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        rest = line[len(name):]
        if labels is not None:
            if not rest.startswith(labels + " "):
                continue
        elif not (rest.startswith(" ") or rest.startswith("{")):
            continue
        try:
            total += float(rest.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            pass
    return total


def poll(what, timeout, f, interval=0.1):
    deadline = time.time() + timeout
    while True:
        v = f()
        if v:
            return v
        if time.time() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def prewrite(path, size):
    """A disk file written in full with zeroes (O_DIRECT)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    subprocess.run(["dd", "if=/dev/zero", "of=" + path, "bs=1M", f"count={size >> 20}",
                    "oflag=direct", "status=none"], check=True, timeout=600)


class Cluster:
    """A `tessera up` of this run: its output lines, the PIDs it printed,
    the daemons this run stopped (resumed before it is stopped)."""

    def __init__(self, work, name, daemons, disk_size, volume, volume_size, extra, sparse):
        self.dir = os.path.join(work, name)
        self.volume = volume
        self.lines = []
        self.frozen = set()
        if not sparse:
            for i in range(daemons):
                prewrite(os.path.join(self.dir, f"storage-{i}", "disk0.img"), disk_size)
        self.cmd = [os.path.join(BIN, "tessera"), "up", "--dir", self.dir,
                    "--storage-daemons", str(daemons), "--disk-size", str(disk_size),
                    "--nbd-listen", "127.0.0.1:0", "--manager-listen", "127.0.0.1:0",
                    "--iscsi-listen", "none", "--volume", f"{volume}:{volume_size}"] + extra
        self.log = open(os.path.join(work, name + "-up.log"), "w")
        self.p = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        ready = threading.Event()

        def reader():
            for line in self.p.stdout:
                self.lines.append(line.strip())
                if line.strip() == "ready":
                    ready.set()
            ready.set()

        threading.Thread(target=reader, daemon=True).start()
        if not ready.wait(120) or "ready" not in self.lines:
            raise RuntimeError(f"tessera up did not become ready: {self.lines}")
        gw = self.field(self.line("gateway "), "nbd")
        self.uri = f"nbd://{gw}/{volume}"
        self.manager = "http://" + self.field(self.line("manager "), "listen")

    @staticmethod
    def field(line, key):
        for w in line.split():
            if w.startswith(key + "="):
                return w.split("=", 1)[1]
        return None

    def line(self, prefix):
        for l in reversed(self.lines):
            if l.startswith(prefix):
                return l
        raise RuntimeError(f"no line starting with {prefix!r}")

    def pid(self, name):
        """Current PID of `storage-N` (the last start or restart line)."""
        for l in reversed(self.lines):
            if l.startswith(name + " ") or l.startswith(f"restarted {name} "):
                return int(self.field(l, "pid"))
        raise RuntimeError(f"no pid line for {name}")

    def name_of(self, pid):
        for l in self.lines:
            w = l.split()
            n = w[1] if l.startswith("restarted ") else w[0]
            if n.startswith("storage-") and self.field(l, "pid") == str(pid):
                return n
        raise RuntimeError(f"pid {pid} is no storage daemon of this cluster")

    def status(self):
        """The manager's status: the JSON `tessera status --output json` prints."""
        return http_json(self.manager + "/v1/status")

    def nodes(self):
        return http_json(self.manager + "/v1/nodes")

    def metrics(self, skip=()):
        """{pid: metrics text} of the storage daemons the manager sees up
        (a stopped daemon would hold a scrape until the timeout)."""
        out = {}
        for n in self.nodes():
            if n.get("up") and n.get("metrics_addr") and n.get("pid") not in skip:
                try:
                    out[n["pid"]] = http_text(f"http://{n['metrics_addr']}/metrics")
                except OSError:
                    pass
        return out

    def per_daemon(self, name, labels=None, skip=()):
        return {pid: metric_sum(t, name, labels) for pid, t in self.metrics(skip).items()}

    def writes(self, skip=()):
        """Client write requests received by each daemon (as primary)."""
        return self.per_daemon("tessera_storage_requests_total", '{op="write"}', skip)

    def clean(self, s=None):
        s = s or self.status()
        return s["pgs_clean"] == s["pgs_total"] and s["daemons_down"] == 0

    def freeze(self, pid):
        os.kill(pid, signal.SIGSTOP)
        self.frozen.add(pid)

    def thaw(self, pid):
        os.kill(pid, signal.SIGCONT)
        self.frozen.discard(pid)

    def stop(self):
        for pid in list(self.frozen):
            try:
                self.thaw(pid)
            except OSError:
                pass
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()


class Fio:
    """A fio with the nbd engine, stopped with SIGINT (fio then finishes
    its job normally: JSON report and logs written)."""

    def __init__(self, work, tag, uri, args):
        self.prefix = os.path.join(work, tag)
        self.cmd = ["fio", "--name=" + tag, "--ioengine=nbd", "--uri=" + uri,
                    "--output-format=json", "--write_lat_log=" + self.prefix,
                    "--log_avg_msec=0", "--log_offset=1", "--log_unix_epoch=1"] + args
        self.out = open(self.prefix + ".json", "w+")
        self.err = open(self.prefix + ".err", "w+")
        self.p = subprocess.Popen(self.cmd, stdout=self.out, stderr=self.err)

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            # The nbd engine can spin on a dead connection (docs/replication.md).
            self.p.kill()
            self.p.wait()
        self.out.seek(0)
        self.err.seek(0)
        text, err = self.out.read(), self.err.read()
        self.out.close()
        self.err.close()
        try:
            job = json.loads(text[text.index("{"):])["jobs"][0]
        except (ValueError, KeyError, IndexError):
            return {"error": f"no fio report (exit {self.p.returncode}): {err.strip()[-300:]}"}
        w = job["write"]
        return {"fio_error": job["error"], "exit": self.p.returncode, "ios": w["total_ios"],
                "iops": w["iops"], "max_lat_ms": w["lat_ns"]["max"] / 1e6,
                "stderr": "\n".join(l for l in err.splitlines()
                                    if "connected to NBD" not in l and "terminating" not in l)}

    def samples(self):
        """Per-I/O (completion ms, latency ns, offset, length) of the writes."""
        out = []
        try:
            with open(self.prefix + "_lat.1.log") as f:
                for line in f:
                    v = [x.strip() for x in line.split(",")]
                    if len(v) >= 5 and v[2] == "1":
                        out.append((int(v[0]), int(v[1]), int(v[4]), int(v[3])))
        except OSError:
            pass
        return out

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def paced_writes(args, size):
    return ["--rw=randwrite", "--bs=4k", f"--size={size}", "--iodepth=8",
            f"--rate_iops={args.rate_iops}", "--randrepeat=0", "--time_based=1",
            f"--runtime={FIO_TIMEOUT_S}"]


def p99_ms(lats_ns):
    if not lats_ns:
        return None
    v = sorted(lats_ns)
    return v[max(0, -(-len(v) * 99 // 100) - 1)] / 1e6


def window(samples, t0, t1):
    """Latencies (ns) of the I/Os completed in [t0, t1) (seconds)."""
    a, b = t0 * 1000, t1 * 1000
    return [lat for t, lat, _, _ in samples if a <= t < b]


def longest_gap_ms(samples):
    t = sorted(s[0] for s in samples)
    return max((y - x for x, y in zip(t, t[1:])), default=0)


def wait_writes(c, n, skip=(), timeout=30):
    """Wait until the daemons (those not in skip) received n more client writes."""
    w0 = sum(c.writes(skip).values())
    poll(f"{n} client writes", timeout, lambda: sum(c.writes(skip).values()) >= w0 + n, 0.1)


def busiest(c, seconds=2.0):
    """The daemon that received the most client writes over `seconds`
    (as primary), and its share of them."""
    w0 = c.writes()
    time.sleep(seconds)
    w1 = c.writes()
    d = {pid: w1.get(pid, 0) - w0.get(pid, 0) for pid in w0}
    pid = max(d, key=lambda p: d[p])
    return pid, d[pid] / max(1, sum(d.values()))


# ---- 0: the disk's sequential write bandwidth -------------------------------

def seq_bandwidth(work, args):
    path = os.path.join(work, "seq.img")
    base = ["fio", "--name=seq", "--filename=" + path, "--rw=write", "--bs=1m", "--iodepth=8",
            "--size=" + args.seq_size, "--direct=1", "--ioengine=io_uring", "--output-format=json"]
    subprocess.run(base, check=True, stdout=subprocess.DEVNULL, timeout=FIO_TIMEOUT_S)  # lay out
    cmd = base + ["--time_based=1", f"--runtime={args.seq_runtime}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=FIO_TIMEOUT_S)
    bw = json.loads(out.stdout)["jobs"][0]["write"]["bw_bytes"]
    os.unlink(path)
    return {"mb_s": bw / 1e6, "command": " ".join(cmd)}


def copy_bandwidth(work, args):
    path = os.path.join(work, "copy.img")
    base = ["fio", "--name=copy", "--filename=" + path, "--bs=256k", "--iodepth=16",
            "--size=" + args.seq_size, "--direct=1", "--ioengine=io_uring", "--output-format=json"]
    subprocess.run(base + ["--rw=write"], check=True, stdout=subprocess.DEVNULL,
                   timeout=FIO_TIMEOUT_S)  # lay out
    cmd = base + ["--rw=randrw", "--rwmixread=50", "--time_based=1",
                  f"--runtime={args.seq_runtime}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=FIO_TIMEOUT_S)
    j = json.loads(out.stdout)["jobs"][0]
    os.unlink(path)
    r, w = j["read"]["bw_bytes"] / 1e6, j["write"]["bw_bytes"] / 1e6
    return {"read_mb_s": r, "write_mb_s": w, "mb_s": min(r, w), "command": " ".join(cmd)}


# ---- 1: failover ------------------------------------------------------------

def failover_rep(c, work, args, kind, rep):
    fio = Fio(work, f"failover-{kind}-{rep}", c.uri, paced_writes(args, args.volume_size))
    try:
        wait_writes(c, 200)
        pid, share = busiest(c)
        name = c.name_of(pid)
        r = {"event": kind, "rep": rep, "victim": name, "victim_write_share": share}
        t_event = time.time()
        if kind == "kill9":
            os.kill(pid, signal.SIGKILL)
            poll("the killed daemon restarted", 30, lambda: c.pid(name) != pid)
            r["restarted_after_s"] = time.time() - t_event
        else:
            c.freeze(pid)
            poll("the hung daemon declared down", 30, lambda: c.status()["daemons_down"] >= 1, 0.05)
            r["declared_down_after_s"] = time.time() - t_event
            wait_writes(c, 200, skip=(pid,))
            r["writes_resumed_after_s"] = time.time() - t_event
            c.thaw(pid)
        poll("every group clean", 120, c.clean)
        r["clean_after_s"] = time.time() - t_event
        time.sleep(args.tail)
    finally:
        res = fio.stop()
    r.update(res)
    s = fio.samples()
    r["stall_ms"] = max((lat for _, lat, _, _ in s), default=0) / 1e6
    r["longest_gap_ms"] = longest_gap_ms(s)
    r["max_lat_before_ms"] = max(window(s, 0, t_event), default=0) / 1e6
    r["command"] = " ".join(fio.cmd)
    log(f"failover {kind} #{rep}: {name} (led {share:.0%} of writes): stall {r['stall_ms']:.0f} ms, "
        f"gap {r['longest_gap_ms']} ms, before {r['max_lat_before_ms']:.0f} ms, "
        f"clean after {r['clean_after_s']:.2f} s, fio error {r.get('fio_error')}")
    return r


# ---- 2: delta recovery ------------------------------------------------------

def delta_recovery(c, work, args):
    fio = Fio(work, "delta", c.uri, paced_writes(args, args.volume_size))
    samples_status = []
    try:
        wait_writes(c, 200)
        pid, share = busiest(c)
        name = c.name_of(pid)
        rec0 = c.per_daemon("tessera_storage_recovery_bytes_total")
        peer0 = c.per_daemon("tessera_storage_peering_bytes_total")
        w0 = c.writes()
        t_stop = time.time()
        c.freeze(pid)
        poll("the stopped daemon declared down", 30, lambda: c.status()["daemons_down"] >= 1, 0.05)
        t_down = time.time()
        time.sleep(max(0.0, t_stop + args.stop_seconds - time.time()))
        w1 = c.writes(skip=(pid,))
        w1[pid] = w0.get(pid, 0)  # it received nothing while stopped
        t_resume = time.time()
        c.thaw(pid)
        t_up = t_map_up = None
        disk = next(n["disks"][0] for n in c.nodes() if n["pid"] == pid)
        deadline = time.time() + 300
        while True:
            s = c.status()
            now = time.time()
            if t_map_up is None and any(d["id"] == disk and d["up"] for d in
                                        http_json(c.manager + "/v1/map")["disks"]):
                t_map_up = time.time()
            samples_status.append({"t": now - t_resume, **{k: s.get(k) for k in (
                "daemons_down", "pgs_clean", "pgs_recovering", "recovery_done_bytes",
                "recovery_remaining_bytes", "recovery_bytes_per_sec")}})
            if t_up is None and s["daemons_down"] == 0:
                t_up = now
            if c.clean(s):
                break
            if now > deadline:
                raise RuntimeError("recovery did not finish in 300 s")
            time.sleep(0.1)
        t_clean = time.time()
        rec1 = c.per_daemon("tessera_storage_recovery_bytes_total")
        peer1 = c.per_daemon("tessera_storage_peering_bytes_total")
        time.sleep(1)
    finally:
        res = fio.stop()
    s = fio.samples()

    def regions(t0, t1):
        """Distinct 64 KiB regions of the writes in flight at some time in
        [t0, t1] (issue = completion - latency)."""
        a, b = t0 * 1000, t1 * 1000
        out = set()
        for t, lat, off, ln in s:
            if t >= a and t - lat / 1e6 <= b:
                out.update(range(off // REGION, (off + ln - 1) // REGION + 1))
        return out

    # The absence as the cluster sees it: from the member's last durable
    # point (one flush round, ~100 ms, before the stop: 250 ms allowed) to
    # the map that has it up again (the primaries add it back to their
    # write sets as soon as they see that map: 250 ms allowed).
    strict = regions(t_stop, t_resume)
    absent = regions(t_stop - 0.25, t_map_up + 0.25)
    writes_meanwhile = sum(w1.values()) - sum(w0.values())
    # Copied bytes: recovery pushes to the outdated copy plus the pushes of
    # peering (a new primary making the regions of changes in flight agree
    # on the up-to-date copies: at the failover, and when the returning
    # daemon leads its groups again), counted apart by the daemons.
    by_daemon = {c.name_of(pid): rec1.get(pid, 0) - rec0.get(pid, 0)
                 + peer1.get(pid, 0) - peer0.get(pid, 0) for pid in rec0}
    peering = sum(peer1.get(pid, 0) - peer0.get(pid, 0) for pid in rec0)
    recovered = sum(by_daemon.values())
    # What the primaries planned to push when the recoveries began (done +
    # remaining in their heartbeats, first second after the resume).
    planned = max((x["recovery_done_bytes"] or 0) + (x["recovery_remaining_bytes"] or 0)
                  for x in samples_status if x["t"] <= 1.0)
    r = {"victim": name, "victim_write_share": share, "stopped_s": t_resume - t_stop,
         "declared_down_after_s": t_down - t_stop, "up_again_after_resume_s": t_up - t_resume,
         "map_up_after_resume_s": t_map_up - t_resume,
         "t_stop": t_stop, "t_resume": t_resume, "t_up": t_up, "t_map_up": t_map_up,
         "t_clean": t_clean,
         "recovery_time_s": t_clean - t_resume, "recovered_bytes": recovered,
         "peering_bytes": peering,
         "recovered_by_daemon": by_daemon, "planned_at_start_bytes": planned,
         "fio_writes_in_window": sum(1 for t, lat, _, _ in s
                                     if t >= (t_stop - 0.25) * 1000
                                     and t - lat / 1e6 <= (t_map_up + 0.25) * 1000),
         "regions_strict": len(strict), "bound_strict_bytes": len(strict) * REGION,
         "regions_absent": len(absent), "bound_bytes": len(absent) * REGION,
         "write_requests_meanwhile": writes_meanwhile,
         "bound_requests_bytes": writes_meanwhile * REGION,
         "recovery_rate_mb_s": recovered / max(1e-3, t_clean - t_map_up) / 1e6,
         "status_rate_max_mb_s": max((x["recovery_bytes_per_sec"] or 0 for x in samples_status),
                                     default=0) / 1e6,
         "status_samples": samples_status, "command": " ".join(fio.cmd)}
    r.update(res)
    log(f"delta: {name} stopped {r['stopped_s']:.1f} s; recovered {recovered / 1e6:.1f} MB, "
        f"bound {r['bound_bytes'] / 1e6:.1f} MB ({len(absent)} regions; strict "
        f"{r['bound_strict_bytes'] / 1e6:.1f} MB); clean {r['recovery_time_s']:.2f} s after "
        f"the resume, {r['recovery_rate_mb_s']:.1f} MB/s")
    return r


# ---- 3: rebuild onto the fourth daemon --------------------------------------

def rebuild(c, work, args):
    size = args.rebuild_volume
    fill = ["fio", "--name=fill", "--ioengine=nbd", "--uri=" + c.uri, "--rw=write", "--bs=1m",
            "--iodepth=4", "--size=" + size, "--output-format=json"]
    t = time.time()
    subprocess.run(fill, check=True, capture_output=True, timeout=FIO_TIMEOUT_S)
    fill_s = time.time() - t
    log(f"rebuild: filled {size} in {fill_s:.1f} s")
    fio = Fio(work, "rebuild", c.uri, paced_writes(args, size))
    status_samples = []
    try:
        wait_writes(c, 200)
        t_before = time.time()
        time.sleep(args.before)
        name = "storage-1"
        pid = c.pid(name)
        rec0 = sum(c.per_daemon("tessera_storage_recovery_bytes_total", skip=(pid,)).values())
        disk = next(n["disks"][0] for n in c.nodes() if n["pid"] == pid)
        m = http_json(c.manager + "/v1/map")
        held = sum(1 for s in m["pgs"] if disk in s)
        t_stop = time.time()
        c.freeze(pid)
        t_out = t_clean = None
        deadline = time.time() + 600
        while True:
            s = c.status()
            now = time.time()
            status_samples.append({"t": now - t_stop, **{k: s.get(k) for k in (
                "daemons_down", "disks_out", "pgs_clean", "pgs_backfilling",
                "recovery_done_bytes", "recovery_remaining_bytes", "recovery_percent",
                "recovery_bytes_per_sec")}})
            if t_out is None and s["disks_out"] >= 1:
                t_out = now
                rec_out = sum(c.per_daemon("tessera_storage_recovery_bytes_total",
                                           skip=(pid,)).values())
            if t_out and s["pgs_clean"] == s["pgs_total"] and s["pgs_backfilling"] == 0:
                t_clean = now
                break
            if now > deadline:
                raise RuntimeError("the rebuild did not finish in 600 s")
            time.sleep(0.1)
        rec1 = sum(c.per_daemon("tessera_storage_recovery_bytes_total", skip=(pid,)).values())
        time.sleep(args.tail)
    finally:
        res = fio.stop()
    s = fio.samples()
    before = window(s, t_before, t_stop)
    during = window(s, t_out, t_clean)
    failover = window(s, t_stop, t_out)
    secs = t_clean - t_out
    r = {"victim": name, "victim_disk": disk, "groups_held": held, "groups_total": len(m["pgs"]),
         "fill_s": fill_s, "fill_command": " ".join(fill),
         "out_after_s": t_out - t_stop, "rebuild_s": secs,
         "recovered_bytes": rec1 - rec0, "recovered_before_out_bytes": rec_out - rec0,
         "rebuild_mb_s": (rec1 - rec0) / secs / 1e6,
         "status_rate_max_mb_s": max((x["recovery_bytes_per_sec"] or 0 for x in status_samples),
                                     default=0) / 1e6,
         "p99_before_ms": p99_ms(before), "n_before": len(before),
         "p99_during_ms": p99_ms(during), "n_during": len(during),
         "max_during_ms": max(during, default=0) / 1e6,
         "p99_stop_to_out_ms": p99_ms(failover), "max_stop_to_out_ms": max(failover, default=0) / 1e6,
         "status_samples": status_samples, "command": " ".join(fio.cmd)}
    r.update(res)
    log(f"rebuild: {name} (disk {disk}, {held} groups) out after {r['out_after_s']:.1f} s; "
        f"{r['recovered_bytes'] / 1e6:.0f} MB in {secs:.1f} s = {r['rebuild_mb_s']:.1f} MB/s; "
        f"p99 {r['p99_before_ms']} ms before, {r['p99_during_ms']} ms during")
    return r


# ---- report -----------------------------------------------------------------

def med(v):
    return statistics.median(v) if v else None


def report(doc):
    f = lambda v, d=0: "-" if v is None else f"{v:,.{d}f}"
    yes = lambda ok: "**yes**" if ok else "**no**"
    pct = lambda v, seq: f"{v / seq['mb_s'] * 100:.0f}%" if seq else "-"
    a = doc["args"]
    L = [f"# Failure benchmark {doc['date']}", "", f"Command: `{doc['command']}`", "",
         f"Binaries: `{doc['bin']}`. Machine: {doc['machine']['cpus']} CPUs, kernel "
         f"{doc['machine']['kernel']}, load average {doc['machine']['loadavg_at_start'][0]:.2f} "
         f"at the start, {doc['machine']['loadavg_at_end'][0]:.2f} at the end (shared with "
         f"other work); run took {doc['elapsed_s']:.0f} s; every disk file on the same disk "
         f"({'sparse' if a['sparse_disks'] else 'written in full first'}). Clients: fio nbd "
         f"engine, 4k random writes at queue depth 8 paced to {a['rate_iops']} IOPS, per-I/O "
         "latency logs. Default heartbeat grace (2 s).", ""]
    seq = doc.get("seq")
    if seq:
        L += [f"Sequential write bandwidth of the disk (fio io_uring O_DIRECT 1M QD8, "
              f"{a['seq_runtime']} s): **{seq['mb_s']:.0f} MB/s** (`{seq['command']}`)", ""]
    cp = doc.get("copy")
    if cp:
        L += [f"Copy bandwidth of the disk (reads and writes of 256k, half each, QD16, "
              f"{a['seq_runtime']} s: what a copy from and to this one disk can reach): "
              f"**{cp['mb_s']:.0f} MB/s** copied ({cp['read_mb_s']:.0f} MB/s read + "
              f"{cp['write_mb_s']:.0f} MB/s written; `{cp['command']}`)", ""]
    fo = doc.get("failover", [])
    if fo:
        L += [f"## Failover: `tessera up --storage-daemons 3 --replicas 3`, volume "
              f"{a['volume_size']}", "",
              "Victim: the daemon that received the most client writes over 2 s (primary of "
              "the busiest groups). kill9: `kill -9`, `tessera up` restarts it after 200 ms. "
              "sigstop: SIGSTOP until declared down and 200 writes went through the others, "
              "then SIGCONT. Stall: the longest write latency fio saw in the repetition.", "",
              f"Cluster: `{doc['clusters'].get('three')}`", "",
              f"fio (one per repetition): `{fo[0].get('command')}`", "",
              "| event | rep | victim (share of writes) | stall ms | longest gap ms | "
              "max before event ms | down (sigstop) / restarted (kill9) s | clean after s | fio error |",
              "|" + "---|" * 9]
        for r in fo:
            L.append(f"| {r['event']} | {r['rep']} | {r['victim']} ({r['victim_write_share']:.0%}) | "
                     f"{f(r['stall_ms'])} | {f(r['longest_gap_ms'])} | {f(r['max_lat_before_ms'])} | "
                     f"{f(r.get('declared_down_after_s', r.get('restarted_after_s')), 2)} | "
                     f"{f(r['clean_after_s'], 2)} | "
                     f"{r.get('fio_error', r.get('error'))} |")
        L.append("")
        for k, v in doc["summary"]["failover"].items():
            L.append(f"- {k}: stall max {f(v['max_ms'])} ms, median {f(v['median_ms'])} ms "
                     f"over {v['n']} repetitions")
        L.append("")
    d = doc.get("delta")
    if d:
        L += [f"## Delta recovery: SIGSTOP for {a['stop_seconds']} s under the paced writes "
              f"over the whole {a['volume_size']} volume", "",
              f"fio: `{d['command']}`", "",
              "| stopped s | writes in the absence | 64 KiB regions | bound MB | recovered MB | "
              "recovered / bound | bound MB (stop..resume only) | bound MB (requests x 64 KiB) | "
              "recovery s (from resume) | rate MB/s | rate / seq bw | rate / copy bw |",
              "|" + "---|" * 12,
              f"| {f(d['stopped_s'], 1)} | {f(d['fio_writes_in_window'])} | {f(d['regions_absent'])} | "
              f"{f(d['bound_bytes'] / 1e6, 1)} | {f(d['recovered_bytes'] / 1e6, 1)} | "
              f"{f(d['recovered_bytes'] / d['bound_bytes'] if d['bound_bytes'] else None, 2)} | "
              f"{f(d['bound_strict_bytes'] / 1e6, 1)} | {f(d['bound_requests_bytes'] / 1e6, 1)} | "
              f"{f(d['recovery_time_s'], 2)} | {f(d['recovery_rate_mb_s'], 1)} | "
              f"{pct(d['recovery_rate_mb_s'], seq)} | {pct(d['recovery_rate_mb_s'], cp)} |", "",
              f"Victim {d['victim']}; declared down {d['declared_down_after_s']:.2f} s after the "
              f"stop, up again in the map {d['map_up_after_resume_s']:.2f} s after the resume. "
              "The bound counts the distinct 64 KiB regions of fio's writes in flight at any "
              "time from 250 ms before the stop (the last flush round before it) to 250 ms "
              "after the map had the daemon up again; \"stop..resume only\" leaves out both "
              "margins; \"requests x 64 KiB\" is the looser bound tests/tests/replication.rs "
              "asserts. Recovered bytes are `tessera_storage_recovery_bytes_total` plus "
              "`tessera_storage_peering_bytes_total` (pushes of peering, at the failover and "
              f"when the returning daemon leads its groups again: "
              f"{d.get('peering_bytes', 0) / 1e6:,.1f} MB of them). "
              "The rate is recovered bytes / (clean - up again in the map). Planned at the "
              f"start (done + remaining in the first second's status): "
              f"{d['planned_at_start_bytes'] / 1e6:,.1f} MB; pushed by daemon (MB): "
              + ", ".join(f"{k} {v / 1e6:,.1f}" for k, v in sorted(d["recovered_by_daemon"].items()))
              + ". fio error: " + str(d.get("fio_error", d.get("error"))), ""]
    rb = doc.get("rebuild")
    if rb:
        L += [f"## Rebuild onto a fourth daemon: `tessera up --storage-daemons 4 --replicas 3 "
              f"--down-out-after {a['down_out_after']}`, volume {a['rebuild_volume']} written in "
              "full first", "",
              f"Cluster: `{doc['clusters'].get('four')}`", "",
              f"Fill: `{rb['fill_command']}`; writes: `{rb['command']}`", "",
              "| groups rebuilt | out after s | rebuilt MB | rebuild s | MB/s | % of seq bw | "
              "% of copy bw | p99 before ms | p99 during ms | during / before | max during ms | "
              "fio error |",
              "|" + "---|" * 12,
              f"| {rb['groups_held']} of {rb['groups_total']} | {f(rb['out_after_s'], 1)} | "
              f"{f(rb['recovered_bytes'] / 1e6)} | {f(rb['rebuild_s'], 1)} | "
              f"{f(rb['rebuild_mb_s'], 1)} | "
              f"{pct(rb['rebuild_mb_s'], seq)} | {pct(rb['rebuild_mb_s'], cp)} | "
              f"{f(rb['p99_before_ms'], 2)} ({rb['n_before']} writes) | "
              f"{f(rb['p99_during_ms'], 2)} ({rb['n_during']} writes) | "
              f"{f(rb['p99_during_ms'] / rb['p99_before_ms'] if rb['p99_before_ms'] and rb['p99_during_ms'] else None, 1)}x | "
              f"{f(rb['max_during_ms'])} | {rb.get('fio_error', rb.get('error'))} |", "",
              f"{rb['victim']} stopped with SIGSTOP for good. \"during\" is from the out to every "
              "group clean; the failover between the stop and the out (p99 "
              f"{f(rb['p99_stop_to_out_ms'], 1)} ms, longest {f(rb['max_stop_to_out_ms'])} ms) "
              "is in neither window.", ""]
    notes = [(r.get("event", k), r["stderr"]) for k, v in
             (("failover", doc.get("failover", [])), ("delta", [d] if d else []),
              ("rebuild", [rb] if rb else [])) for r in v if r.get("stderr")]
    if notes:
        L += ["fio's messages:", ""] + [f"- {k}: `{m[:300]}`" for k, m in notes] + [""]
    L += ["## Targets (issue 5)", "", "| target | measured | met? |", "|---|---|---|"]
    for t in doc["summary"]["targets"]:
        L.append(f"| {t['target']} | {t['measured']} | {yes(t['met'])} |")
    return "\n".join(L) + "\n"


def summarize(doc):
    targets = []
    fo = {}
    for kind in ("kill9", "sigstop"):
        v = [r["stall_ms"] for r in doc.get("failover", []) if r["event"] == kind and "stall_ms" in r]
        if v:
            fo[kind] = {"max_ms": max(v), "median_ms": med(v), "n": len(v)}
            targets.append({"target": f"failover stall <= 3 s ({kind})",
                            "measured": f"max {max(v):,.0f} ms, median {med(v):,.0f} ms",
                            "met": max(v) <= 3000})
    seq = doc.get("seq", {}).get("mb_s")
    d = doc.get("delta")
    if d:
        targets.append({"target": "delta recovery: bytes copied <= bytes written meanwhile in "
                                  "64 KiB regions",
                        "measured": f"{d['recovered_bytes'] / 1e6:,.1f} MB copied, bound "
                                    f"{d['bound_bytes'] / 1e6:,.1f} MB",
                        "met": d["recovered_bytes"] <= d["bound_bytes"]})
        if seq:
            targets.append({"target": "delta recovery at disk speed (taken as >= half the "
                                      "sequential write bandwidth)",
                            "measured": f"{d['recovery_rate_mb_s']:,.1f} MB/s vs {seq:,.0f} MB/s",
                            "met": d["recovery_rate_mb_s"] >= seq / 2})
    rb = doc.get("rebuild")
    if rb:
        if seq:
            targets.append({"target": "rebuild >= half the sequential write bandwidth",
                            "measured": f"{rb['rebuild_mb_s']:,.1f} MB/s vs {seq:,.0f} MB/s",
                            "met": rb["rebuild_mb_s"] >= seq / 2})
        if rb["p99_before_ms"] and rb["p99_during_ms"]:
            targets.append({"target": "fio p99 during the rebuild <= 3x before",
                            "measured": f"{rb['p99_during_ms']:,.2f} ms vs "
                                        f"{rb['p99_before_ms']:,.2f} ms",
                            "met": rb["p99_during_ms"] <= 3 * rb["p99_before_ms"]})
    return {"failover": fo, "targets": targets}


def main():
    # SIGTERM behaves like Ctrl-C: stop every process this run started.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="repetitions of each failover event")
    ap.add_argument("--stop-seconds", type=float, default=30, help="absence for delta recovery")
    ap.add_argument("--rate-iops", type=int, default=400, help="pace of fio's 4k random writes")
    ap.add_argument("--volume-size", default="1G", help="volume of the 3-daemon cluster")
    ap.add_argument("--disk-size", default="2G", help="disk file of each storage daemon")
    ap.add_argument("--rebuild-volume", default="1G", help="volume of the rebuild cluster")
    ap.add_argument("--down-out-after", default="3s")
    ap.add_argument("--before", type=float, default=10, help="seconds of writes before the "
                    "rebuild's daemon is stopped (the p99 'before' window)")
    ap.add_argument("--tail", type=float, default=2, help="seconds of writes after clean")
    ap.add_argument("--seq-size", default="1G")
    ap.add_argument("--seq-runtime", type=int, default=8)
    ap.add_argument("--sparse-disks", action="store_true",
                    help="leave the disk files sparse instead of writing them in full first")
    ap.add_argument("--scenarios", default="seq,failover,delta,rebuild")
    ap.add_argument("--up-args", default="",
                    help="more arguments for every `tessera up`, e.g. '--recovery-pushes-max 64'")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 repetition, 8 s absence, 256M volumes, short windows")
    ap.add_argument("--workdir", default="/tmp",
                    help="scratch directory (on the disk being measured)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the scratch directory (fio logs) for inspection")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args()
    if args.quick:
        args.reps, args.stop_seconds, args.before, args.tail = 1, 8, 4, 1
        args.volume_size = args.rebuild_volume = "256M"
        args.disk_size, args.seq_size, args.seq_runtime = "1G", "256M", 3
    scen = args.scenarios.split(",")
    for tool in ("fio", "dd"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed")
    work = tempfile.mkdtemp(prefix="tessera-failure-", dir=args.workdir)
    command = " ".join([f"TESSERA_BIN={os.environ['TESSERA_BIN']}"] * ("TESSERA_BIN" in os.environ)
                       + ["bench/failure_scenarios.py"] + sys.argv[1:])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    doc = {"command": command, "date": stamp, "bin": BIN, "args": vars(args),
           "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release,
                       "loadavg_at_start": os.getloadavg()}, "clusters": {}}
    disk = parse_size(args.disk_size)
    c = None
    t_run = time.time()
    try:
        if "seq" in scen:
            doc["seq"] = seq_bandwidth(work, args)
            log(f"sequential write: {doc['seq']['mb_s']:.0f} MB/s")
            doc["copy"] = copy_bandwidth(work, args)
            log(f"copy (read + write, half each): {doc['copy']['mb_s']:.0f} MB/s")
        if "failover" in scen or "delta" in scen:
            log("starting 3 daemons x 3 copies")
            c = Cluster(work, "three", 3, disk, "v", args.volume_size,
                        ["--replicas", "3"] + args.up_args.split(), args.sparse_disks)
            doc["clusters"]["three"] = " ".join(c.cmd)
            poll("every group clean", 60, c.clean)
            if "failover" in scen:
                doc["failover"] = []
                for kind in ("kill9", "sigstop"):
                    for rep in range(args.reps):
                        doc["failover"].append(failover_rep(c, work, args, kind, rep))
            if "delta" in scen:
                doc["delta"] = delta_recovery(c, work, args)
            c.stop()
            c = None
            shutil.rmtree(os.path.join(work, "three"), ignore_errors=True)
        if "rebuild" in scen:
            log("starting 4 daemons x 3 copies")
            c = Cluster(work, "four", 4, disk, "r", args.rebuild_volume,
                        ["--replicas", "3", "--down-out-after", args.down_out_after]
                        + args.up_args.split(), args.sparse_disks)
            doc["clusters"]["four"] = " ".join(c.cmd)
            poll("every group clean", 60, c.clean)
            doc["rebuild"] = rebuild(c, work, args)
            c.stop()
            c = None
    finally:
        if c is not None:
            c.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    doc["elapsed_s"] = time.time() - t_run
    doc["machine"]["loadavg_at_end"] = os.getloadavg()
    doc["summary"] = summarize(doc)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"failure-{stamp}")
    with open(base + ".json", "w") as fh:
        json.dump(doc, fh, indent=1)
    md = report(doc)
    with open(base + ".md", "w") as fh:
        fh.write(md)
    print(md)
    log(f"wrote {base}.json and {base}.md in {doc['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
