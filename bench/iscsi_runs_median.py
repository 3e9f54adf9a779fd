#!/usr/bin/env python3
"""Medians over several bench/iscsi_compare.py result files, before vs after.

    bench/iscsi_runs_median.py BEFORE.json... -- AFTER.json...

Prints a markdown table: per workload the median IOPS and server CPU per I/O
over every round of every file, for the separate gateway (tessera), the
embedded one (tessera-embedded) and tgtd, before -> after.
"""
import json,sys,statistics,collections
# args: before files ... -- after files
args=sys.argv[1:]; i=args.index('--'); groups={'before':args[:i],'after':args[i+1:]}
data=collections.defaultdict(list)
for g,fs in groups.items():
    for f in fs:
        for r in json.load(open(f))['rows']:
            for iops,cpu in r['runs']:
                data[(g,r['workload'],r['target'])].append((iops,cpu))
wls=[]
for k in data:
    if k[1] not in wls: wls.append(k[1])
def med(g,w,t,idx):
    v=[x[idx] for x in data[(g,w,t)] if x[idx] is not None]
    return statistics.median(v) if v else None
print("| workload | IOPS sep before → after | IOPS emb before → after | tgtd IOPS (b/a) | CPU µs/IO sep before → after | emb before → after | tgtd (b/a) | emb/tgtd after |")
print("|---|---|---|---|---|---|---|---|")
for w in wls:
    sb,sa=med('before',w,'tessera',0),med('after',w,'tessera',0)
    eb,ea=med('before',w,'tessera-embedded',0),med('after',w,'tessera-embedded',0)
    tb,ta=med('before',w,'tgtd',0),med('after',w,'tgtd',0)
    cb,ca=med('before',w,'tessera',1),med('after',w,'tessera',1)
    ceb,cea=med('before',w,'tessera-embedded',1),med('after',w,'tessera-embedded',1)
    ctb,cta=med('before',w,'tgtd',1),med('after',w,'tgtd',1)
    n=len(data[('after',w,'tessera')]); m=len(data[('before',w,'tessera')])
    print(f"| {w} | {sb:,.0f} → {sa:,.0f} | {eb:,.0f} → {ea:,.0f} | {tb:,.0f} / {ta:,.0f} | {cb:.0f} → {ca:.0f} | {ceb:.0f} → {cea:.0f} | {ctb:.0f} / {cta:.0f} | {ea/ta:.2f}x |")
print(f"runs per cell: before {m}, after {n}")
