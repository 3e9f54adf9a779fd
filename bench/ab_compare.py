#!/usr/bin/env python3
"""A/B benchmark of two builds of Tessera on the same machine, alternated.

Runs `bench/nbd_compare.py` once per round and build (order alternated
every round: A B, B A, A B, ...), each run with its own `TESSERA_BIN`, and
reports the median over rounds of each build's per-run medians, side by
side, with the ratio B / A. Why a separate driver: the effect of one change
on this noisy 2-core machine is a few percent, less than the drift between
two runs made minutes apart; alternating the builds round by round puts
the drift on both sides equally.

Usage (release builds of both revisions, their binaries in two folders):
  bench/ab_compare.py --a /tmp/bin-base --b /tmp/bin-head \\
      --label-a eb85de1 --label-b HEAD --rounds 3 --runtime 5 \\
      --targets tessera-3x3 --workloads randwrite-4k-qd32,randwrite-4k-qd1
The Markdown table and every run's JSON go under bench/results/.
"""

import argparse
import datetime
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("iops", "mean_lat_us", "p99_lat_us", "server_cpu_us_per_io")


def run_once(bindir, args, out):
    env = dict(os.environ, TESSERA_BIN=bindir)
    cmd = [sys.executable, os.path.join(ROOT, "bench", "nbd_compare.py"),
           "--runtime", str(args.runtime), "--rounds", "1", "--size", args.size,
           "--targets", args.targets, "--workloads", args.workloads, "--out", out]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    newest = max(glob.glob(os.path.join(out, "nbd-*.json")), key=os.path.getmtime)
    with open(newest) as f:
        return json.load(f)["summary"]


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="folder with build A's binaries")
    ap.add_argument("--b", required=True, help="folder with build B's binaries")
    ap.add_argument("--label-a", default="A")
    ap.add_argument("--label-b", default="B")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--targets", default="tessera-3x3")
    ap.add_argument("--workloads", default="randwrite-4k-qd32,randwrite-4k-qd1")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args()
    for d in (args.a, args.b):
        if not os.path.isfile(os.path.join(d, "tessera")):
            sys.exit(f"ab_compare: no tessera binary in {d}")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    runs_dir = os.path.join(args.out, f"ab-{stamp}-runs")
    os.makedirs(runs_dir, exist_ok=True)
    runs = {"a": [], "b": []}
    for r in range(args.rounds):
        order = ["a", "b"] if r % 2 == 0 else ["b", "a"]
        for side in order:
            bindir = args.a if side == "a" else args.b
            s = run_once(bindir, args, runs_dir)
            runs[side].append(s)
            print(f"round {r} {side}: " + json.dumps(
                {t: {w: round(v["iops"]) for w, v in ws.items()} for t, ws in s.items()}),
                file=sys.stderr)
    command = "bench/ab_compare.py " + " ".join(sys.argv[1:])
    lines = [f"# A/B benchmark {stamp}", "", f"Command: `{command}`", "",
             f"A = {args.label_a} ({args.a}), B = {args.label_b} ({args.b}); "
             f"{args.rounds} rounds, builds alternated each round, {args.runtime} s per fio "
             "job (`bench/nbd_compare.py`, one round per run); medians over rounds. "
             "CPU: server user+system µs per I/O (gateway and storage daemons).", "",
             "| target | workload | metric | A | B | B / A |", "|---|---|---|---|---|---|"]
    med = {}
    for side in ("a", "b"):
        for s in runs[side]:
            for t, ws in s.items():
                for w, v in ws.items():
                    for k in KEYS:
                        if v.get(k) is not None:
                            med.setdefault((side, t, w, k), []).append(v[k])
    targets = sorted({k[1] for k in med})
    for t in targets:
        for w in args.workloads.split(","):
            for k in KEYS:
                a = med.get(("a", t, w, k))
                b = med.get(("b", t, w, k))
                if not a or not b:
                    continue
                ma, mb = statistics.median(a), statistics.median(b)
                lines.append(f"| {t} | {w} | {k} | {ma:.1f} | {mb:.1f} | "
                             f"{mb / ma if ma else float('nan'):.3f} |")
    lines += ["", "Per round (IOPS), in the order run:", ""]
    for side in ("a", "b"):
        for i, s in enumerate(runs[side]):
            lines.append(f"* {side.upper()} round {i}: " + ", ".join(
                f"{t} {w} {v['iops']:.0f}" for t, ws in s.items() for w, v in ws.items()))
    path = os.path.join(args.out, f"ab-{stamp}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
