#!/usr/bin/env python3
"""libiscsi's iscsi-test-cu against tgtd, run the way
tests/tests/iscsi_conformance.rs runs it against Tessera, for the
side-by-side table in docs/iscsi.md.

tgtd (Debian package tgt) serves thin-provisioned 1 GiB file LUNs
(bstype rdwr, thin_provisioning=1) through two portals, 127.0.0.1 and
127.0.0.2. Every test of the SCSI and iSCSI families runs in its own
process with a 120 s timeout, 4 workers each on its own target; tests that
reset the target or use several paths run alone at the end, each on a fresh
target (as for Tessera). iscsi-test-cu reports skipped tests as passed; a
test whose output has "[SKIPPED]" is counted as skipped.

Usage (as root, tgtd and iscsi-test-cu installed):
  bench/iscsi_tgt_conformance.py [--tessera-table target/debug/iscsi-conformance.txt]
Writes bench/results/iscsi-conformance-<UTC time>.md (and .json): the
totals, with --tessera-table Tessera's beside them and every test whose
verdict differs.
"""

import argparse
import concurrent.futures
import datetime
import json
import os
import re
import socket
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = 4
TIMEOUT_S = 120
LUN_SIZE = 1 << 30
IQN = "iqn.2026-11.io.tessera.bench:tgt"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def list_tests():
    out = subprocess.run(["iscsi-test-cu", "--list"], capture_output=True, text=True).stdout
    return [l.strip() for l in out.splitlines()
            if (l.strip().startswith("SCSI.") or l.strip().startswith("iSCSI."))
            and l.strip().count(".") == 2]


def serial(name):
    return "Reset" in name or "Multipath" in name or "ITNexusLoss" in name


class Tgt:
    def __init__(self, workdir):
        self.dir = workdir
        self.ctl = str(20000 + os.getpid() % 20000)
        self.port = free_port()
        self.log = open(os.path.join(workdir, "tgtd.log"), "w")
        self.proc = subprocess.Popen(
            ["tgtd", "-f", "-C", self.ctl, "--iscsi", f"portal=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 10
        while self.adm("--op", "show", "--mode", "target", check=False).returncode != 0:
            if time.time() > deadline:
                raise RuntimeError("tgtd did not start")
            time.sleep(0.05)
        self.adm("--op", "new", "--mode", "portal", "--param", f"portal=127.0.0.2:{self.port}")
        self.next_tid = 1

    def adm(self, *args, check=True):
        return subprocess.run(["tgtadm", "-C", self.ctl, "--lld", "iscsi", *args],
                              capture_output=True, text=True, check=check)

    def target(self):
        """A fresh target with a fresh thin 1 GiB file as LUN 1; its URLs."""
        tid = self.next_tid
        self.next_tid += 1
        name = f"{IQN}{tid}"
        img = os.path.join(self.dir, f"lun{tid}.img")
        with open(img, "wb") as f:
            f.truncate(LUN_SIZE)
        self.adm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", name)
        self.adm("--op", "new", "--mode", "logicalunit", "--tid", str(tid), "--lun", "1",
                 "-b", img, "--bstype", "rdwr")
        self.adm("--op", "update", "--mode", "logicalunit", "--tid", str(tid), "--lun", "1",
                 "--params", "thin_provisioning=1")
        self.adm("--op", "bind", "--mode", "target", "--tid", str(tid), "-I", "ALL")
        return [f"iscsi://127.0.0.{i}:{self.port}/{name}/1" for i in (1, 2)]

    def stop(self):
        # tgtd ignores SIGTERM while it has targets; ask it to stop.
        self.adm("--op", "delete", "--mode", "system", check=False)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_one(name, urls):
    p = subprocess.run(["timeout", str(TIMEOUT_S), "iscsi-test-cu", "-d", "-n", "-t", name, *urls],
                       capture_output=True, text=True)
    text = p.stdout + p.stderr
    if p.returncode == 124:
        return "Timeout"
    m = re.search(r"^\s*tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", text, re.M)
    if m and int(m.group(4)) == 0 and m.group(2) == m.group(3) and int(m.group(2)) > 0:
        return "Skip" if "[SKIPPED]" in text else "Pass"
    return "Fail"


def read_tessera(path):
    out = {}
    for line in open(path):
        parts = line.split()
        if len(parts) == 2 and parts[1] in ("Pass", "Fail", "Skip", "Timeout"):
            out[parts[0]] = parts[1]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tessera-table", help="iscsi-conformance.txt of a Tessera run")
    a = ap.parse_args()
    tests = list_tests()
    parallel = [t for t in tests if not serial(t)]
    alone = [t for t in tests if serial(t)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="tgt-conf-") as d:
        tgt = Tgt(d)
        try:
            urls = [tgt.target() for _ in range(WORKERS)]
            queue = list(parallel)

            def worker(u):
                while queue:
                    t = queue.pop()
                    results[t] = run_one(t, u)

            with concurrent.futures.ThreadPoolExecutor(WORKERS) as ex:
                list(ex.map(worker, urls))
            for t in alone:
                results[t] = run_one(t, tgt.target())
        finally:
            tgt.stop()
    totals = {v: sum(1 for x in results.values() if x == v) for v in ("Pass", "Fail", "Skip", "Timeout")}
    version = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "tgt"],
                             capture_output=True, text=True).stdout
    lib = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "libiscsi-bin"],
                         capture_output=True, text=True).stdout
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    lines = [f"# iscsi-test-cu: tgtd {version} vs Tessera, {stamp}", "",
             f"Command: `bench/iscsi_tgt_conformance.py"
             + (f" --tessera-table {a.tessera_table}`" if a.tessera_table else "`"), "",
             f"libiscsi-bin {lib}; tgtd: thin 1 GiB file LUNs (bstype rdwr, thin_provisioning=1), "
             "two portals; each test `timeout 120 iscsi-test-cu -d -n -t TEST url1 url2`, "
             "4 workers on their own targets, reset/multipath tests alone on fresh targets.", "",
             "| target | pass | fail | skip | timeout | total |", "|---|---|---|---|---|---|"]
    lines.append(f"| tgtd | {totals['Pass']} | {totals['Fail']} | {totals['Skip']} | "
                 f"{totals['Timeout']} | {len(results)} |")
    tess = read_tessera(a.tessera_table) if a.tessera_table else {}
    if tess:
        tt = {v: sum(1 for x in tess.values() if x == v) for v in ("Pass", "Fail", "Skip", "Timeout")}
        lines.append(f"| Tessera | {tt['Pass']} | {tt['Fail']} | {tt['Skip']} | "
                     f"{tt['Timeout']} | {len(tess)} |")
        lines += ["", "Tests whose verdicts differ:", "", "| test | tgtd | Tessera |", "|---|---|---|"]
        for t in sorted(results):
            if t in tess and tess[t] != results[t]:
                lines.append(f"| {t} | {results[t]} | {tess[t]} |")
    lines += ["", "tgtd failures and timeouts:", ""]
    lines += [f"* {t}: {v}" for t, v in sorted(results.items()) if v in ("Fail", "Timeout")]
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    base = os.path.join(ROOT, "bench", "results", f"iscsi-conformance-{stamp}")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(base + ".json", "w") as f:
        json.dump({"tgt": version, "libiscsi": lib, "tgtd": results, "tessera": tess}, f,
                  indent=1, sort_keys=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
