#!/usr/bin/env python3
"""Where a replicated 4 KiB write at queue depth 1 spends its time, hop by hop.

Reads `perf script -F comm,pid,tid,time,event,trace` output of syscall and
block tracepoints recorded system-wide while fio's nbd engine writes at
queue depth 1 to `tessera up --storage-daemons 3 --replicas 3`
(bench/qd1_timeline.sh records it), follows each write through the
processes by the sizes of what they send and receive, and prints the mean
and median of each step in microseconds:

  fio sends (header 28 B + data)      -> gateway receives 4,124 B
  gateway sends                        -> primary receives 4,164 B
  primary receives                     -> first send to a replica / its own staged write
  primary sends                        -> each replica receives 4,256 B
  replica receives -> disk write issued -> completed (block tracepoints) -> ack sent
  primary receives the last ack (97 B) -> reply sent (64 B)
  primary replies -> gateway receives 64 B -> fio receives 16 B

Tracing costs a few microseconds per event, so the total is longer than
fio's own mean; compare steps, and builds under the same tracing.
"""
import collections
import re
import statistics
import sys

LINE = re.compile(r'\s*(\S+)\s+(\d+)/(\d+)\s+([\d.]+):\s+(\S+):\s*(.*)')


def load(path):
    ev = []
    for line in open(path):
        m = LINE.match(line)
        if m:
            comm, pid, _tid, t, name, rest = m.groups()
            ev.append((float(t) * 1e6, comm, int(pid), name, rest.strip()))
    return ev


def cycles(ev):
    """Events between one fio request header and the next."""
    cur = None
    for x in ev:
        t, comm, _pid, name, rest = x
        if comm == 'fio' and name.endswith('sys_enter_sendto') and 'len: 0x0000001c' in rest:
            if cur:
                yield cur
            cur = (t, [])
        elif cur:
            cur[1].append(x)


def is_gw(x):
    return x[1].startswith('tessera-gatew')


def is_st(x):
    return x[1].startswith('tessera-stor')


def rx(x, n):
    return 'sys_exit_recvfrom' in x[3] and x[4] == n


def analyse(ev):
    segs = collections.defaultdict(list)
    for t0, e in cycles(ev):
        def first(pred, after=0.0):
            return next((x for x in e if x[0] >= after and pred(x)), None)
        gw_rx = first(lambda x: is_gw(x) and rx(x, '0x101c'))
        p_rx = gw_rx and first(lambda x: is_st(x) and rx(x, '0x1044'), gw_rx[0])
        if not p_rx:
            continue
        P = p_rx[2]
        p_send = first(lambda x: x[2] == P and 'sys_enter_writev' in x[3] and 'vlen: 0x00000003' in x[4], p_rx[0])
        p_stage = first(lambda x: x[2] == P and 'sys_enter_io_uring_enter' in x[3], p_rx[0])
        r_rx = sorted(x for x in e if is_st(x) and x[2] != P and rx(x, '0x10a0'))[:2]
        p_reply = first(lambda x: x[2] == P and 'sys_enter_writev' in x[3] and 'vlen: 0x00000001' in x[4], p_rx[0])
        acks = [x for x in e if x[2] == P and rx(x, '0x61') and p_reply and x[0] < p_reply[0]]
        gw_rx2 = p_reply and first(lambda x: is_gw(x) and rx(x, '0x40'), p_reply[0])
        fio_rx = gw_rx2 and first(lambda x: x[1] == 'fio' and rx(x, '0x10'), gw_rx2[0])
        if not (p_send and p_stage and len(r_rx) == 2 and acks and fio_rx):
            continue
        segs['fio -> gateway'].append(gw_rx[0] - t0)
        segs['gateway -> primary'].append(p_rx[0] - gw_rx[0])
        segs['primary: received -> sends to replicas'].append(p_send[0] - p_rx[0])
        segs['primary: received -> stages its own write'].append(p_stage[0] - p_rx[0])
        for k, r in enumerate(r_rx):
            R = r[2]
            name = ('first', 'second')[k]
            segs[f'primary sends -> {name} replica receives'].append(r[0] - p_send[0])
            iss = first(lambda x: x[2] == R and 'block_rq_issue' in x[3], r[0])
            ack = first(lambda x: x[2] == R and 'sys_enter_writev' in x[3], r[0])
            if not (iss and ack):
                continue
            sector = iss[4].split('()')[1].split('+')[0].strip()
            done = first(lambda x: 'block_rq_complete' in x[3] and f'() {sector} +' in x[4], iss[0])
            if not done:
                continue
            segs[f'{name} replica: received -> disk write issued'].append(iss[0] - r[0])
            segs[f'{name} replica: disk write'].append(done[0] - iss[0])
            segs[f'{name} replica: write done -> ack sent'].append(ack[0] - done[0])
        segs['primary: last ack -> reply sent'].append(p_reply[0] - acks[-1][0])
        segs['primary -> gateway'].append(gw_rx2[0] - p_reply[0])
        segs['gateway -> fio'].append(fio_rx[0] - gw_rx2[0])
        segs['primary: received -> reply sent'].append(p_reply[0] - p_rx[0])
        segs['total (fio sends -> fio receives)'].append(fio_rx[0] - t0)
    return segs


def main():
    segs = analyse(load(sys.argv[1]))
    n = len(segs.get('total (fio sends -> fio receives)', []))
    print(f'{n} writes followed\n')
    print('| step | mean µs | median µs |')
    print('|---|---|---|')
    for k, v in segs.items():
        print(f'| {k} | {statistics.mean(v):.1f} | {statistics.median(v):.1f} |')


if __name__ == '__main__':
    main()
