//! Two failures in a row with real processes, on `tessera up
//! --storage-daemons 3 --replicas 3`: while fio writes (with FLUSHes) and
//! verifies, one daemon is hung past the grace and comes back (its copies
//! outdated, recovering slowly under `--recovery-bytes-per-sec`), a second
//! one is hung past the grace, and then the daemon holding every group's
//! last up-to-date copy is killed with -9 (`tessera up` restarts it). Its
//! new process lost what it had not flushed; the recovering member applied
//! every change acknowledged meanwhile (and FLUSHes made some durable
//! there), so the restarted copy must take them back from it before it
//! serves (docs/replication.md, "A restarted last copy takes back") — the
//! case the simulation's seed 11149 found, here with real processes. The
//! second test reaches the same case by two kills in a row instead: one
//! daemon hung past the grace, a second killed with -9, and the last
//! up-to-date copy killed with -9 as soon as the second's new process has
//! applied some writes, before it is recovered (no recovery throttle).
//! Both assert that the restarted last copy recovered the others by delta,
//! from the group logs its disk kept.

use std::time::{Duration, Instant};
use tessera_tests::*;

/// The recoveries of other members `daemon`'s current process started:
/// (delta, full resync).
fn recoveries(c: &Cluster, daemon: &str) -> (f64, f64) {
    let m = daemon_metrics(c, daemon).unwrap_or_default();
    let kind = |k: &str| -> f64 {
        let p = format!("tessera_storage_recoveries_total{{kind=\"{k}\"}}");
        m.lines()
            .filter(|l| l.starts_with(&p))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum()
    };
    (kind("delta"), kind("full"))
}

/// Asserts that storage-0's restarted process, the groups' last
/// up-to-date copy, recovered the other members from its group logs
/// (docs/replication.md, "A restarted last copy recovers the others by
/// delta"), never by a full resync.
fn assert_recovered_by_delta(c: &Cluster) {
    let (delta, full) = recoveries(c, "storage-0");
    println!(
        "storage-0's new process started {delta} delta recoveries and {full} full resyncs; {} bytes recovered in all",
        live_storage_metric(c, "tessera_storage_recovery_bytes_total")
    );
    assert!(delta > 0.0, "no delta recovery counted");
    assert_eq!(full, 0.0, "a full resync by the restarted last copy");
}

fn reclaimed(c: &Cluster) -> f64 {
    c.live_storage_metrics()
        .iter()
        .map(|m| metric_sum(m, "tessera_storage_reclaimed_bytes_total"))
        .sum()
}

// Proves that when a group's last up-to-date copy is killed while its only
// other up member is still recovering, the restarted copy takes back the
// acknowledged writes it lost (reclaimed bytes > 0), fio's crc32c verify of
// every block it wrote passes with no I/O error, and once every daemon is
// back and the cluster is clean every copy is identical. Prints the longest
// I/O stall.
#[test]
fn restarted_last_copy_takes_back_what_it_lost() {
    require(&["fio"]);
    let dir = TempDir::new("last-copy");
    let opts = ClusterOptions {
        storage_daemons: 3,
        disk_size: "1G",
        volumes: vec![("v".into(), "64M".into())],
    };
    // Slow recovery keeps the returning member outdated while the last
    // up-to-date copy dies.
    let c = Cluster::start_with_args(
        &dir.path().join("cluster"),
        &opts,
        &[],
        &["--replicas", "3", "--recovery-bytes-per-sec", "2M"],
    );
    let s = status_json(&c);
    assert_eq!(s["pgs_clean"], s["pgs_total"], "{s}");
    let fio = spawn_fio_nbd(
        &c.uri("v"),
        &[
            "--name=lastcopy",
            "--rw=randwrite",
            "--bs=4k",
            "--size=16m",
            "--loops=4",
            "--iodepth=8",
            "--rate_iops=800",
            "--fsync=64",
            "--verify=crc32c",
            "--verify_fatal=1",
        ],
    );
    let writes = || -> f64 {
        c.live_storage_metrics()
            .iter()
            .map(|m| {
                m.lines()
                    .filter(|l| l.starts_with("tessera_storage_requests_total{op=\"write\"}"))
                    .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                    .sum::<f64>()
            })
            .sum()
    };
    poll("writes to flow", Duration::from_secs(30), || {
        (writes() > 400.0).then_some(())
    });

    // First failure: storage-1 hung past the grace, writes go on, back.
    let first = c.freeze("storage-1");
    poll("storage-1 declared down", Duration::from_secs(30), || {
        (status_json(&c)["daemons_down"] == 1).then_some(())
    });
    let w0 = writes();
    poll("writes without storage-1", Duration::from_secs(30), || {
        (writes() > w0 + 800.0).then_some(())
    });
    first.resume();
    poll("storage-1 up again", Duration::from_secs(30), || {
        (status_json(&c)["daemons_down"] == 0).then_some(())
    });

    // Second failure: storage-2 hung; storage-0 now holds every group's
    // only up-to-date copy, storage-1 is still recovering.
    let second = c.freeze("storage-2");
    let s = poll("storage-2 declared down", Duration::from_secs(30), || {
        let s = status_json(&c);
        (s["daemons_down"] == 1).then_some(s)
    });
    assert!(
        s["pgs_recovering"].as_u64().unwrap_or(0) > 0,
        "storage-1 finished recovering before the scenario's third step: {s}"
    );
    let w0 = writes();
    poll(
        "writes on storage-0 and storage-1",
        Duration::from_secs(30),
        || (writes() > w0 + 200.0).then_some(()),
    );

    // Third: the last up-to-date copy dies mid-write.
    let pid = c.pid("storage-0");
    let t0 = Instant::now();
    kill(pid, 9);
    poll("storage-0 restarted", Duration::from_secs(30), || {
        (c.pid("storage-0") != pid).then_some(())
    });
    // Its disk gave back the log entries of the changes it had made
    // durable (FLUSHes reached it; storage-2's absence keeps the groups'
    // trim points from passing them): docs/replication.md, "Persistent
    // group logs".
    let recovered_entries = poll(
        "the restarted process's recovered log entries",
        Duration::from_secs(30),
        || {
            c.live_storage_metrics()
                .iter()
                .map(|m| metric_sum(m, "tessera_storage_group_log_recovered_entries"))
                .find(|n| *n > 0.0)
        },
    );
    println!(
        "storage-0's new process got {recovered_entries} group-log entries back from its disk"
    );
    let taken = poll(
        "the restarted last copy to take back",
        Duration::from_secs(30),
        || {
            let r = reclaimed(&c);
            (r > 0.0).then_some(r)
        },
    );
    let w0 = writes();
    poll("writes to resume", Duration::from_secs(30), || {
        (writes() > w0 + 200.0).then_some(())
    });
    println!(
        "storage-0 killed as every group's last up-to-date copy: took back {taken} bytes, writes again after {:?}",
        t0.elapsed()
    );

    second.resume();
    let stall = fio_max_latency_ms(&fio_wait_ok(fio));
    println!("longest I/O stall seen by fio: {stall:.0} ms");
    wait_clean(&c, Duration::from_secs(120));
    assert_recovered_by_delta(&c);
    let chunks = compare_copies(&c, "v");
    println!("{chunks} chunks identical on all three copies");
    c.stop();
}
// Proves that two failures in a row lose no acknowledged write, with real
// processes: while fio writes (crc32c verify, a FLUSH every 16 writes),
// storage-2 is stopped until declared down (outdated, writes go on), then
// storage-1 is killed with -9 (its new process is outdated too, so
// storage-0 holds the only up-to-date copy of every group), then, before
// storage-1 has recovered, storage-0 — the primary and last up-to-date copy
// of every group — is killed with -9. Its new process lost what the old
// one had not flushed; it must take back what storage-1 vouches for
// (ReclaimQuery / ReclaimReply, `tessera_storage_reclaimed_bytes_total`)
// before it serves, or fio's verify fails. Asserts the take-back happened,
// fio's verify passes, every copy is identical, and the volume reads back
// (a second fio, `--verify_only`) once storage-2 is resumed and recovered.
// Prints the longest I/O stall.
#[test]
fn last_copy_killed_right_after_another_restarted() {
    require(&["fio"]);
    let dir = TempDir::new("two-failures");
    let opts = ClusterOptions {
        storage_daemons: 3,
        disk_size: "2G",
        volumes: vec![("r".into(), "32M".into())],
    };
    let c = Cluster::start_with_args(
        &dir.path().join("cluster"),
        &opts,
        &[],
        &["--replicas", "3"],
    );
    let s = status_json(&c);
    assert_eq!(s["pgs_clean"], s["pgs_total"], "{s}");
    let lat = dir.path().join("lat");
    let job = [
        "--name=twofail",
        "--rw=randwrite",
        "--bs=4k",
        "--size=32m",
        "--iodepth=8",
        "--rate_iops=400",
        "--fsync=16",
        "--end_fsync=1",
        "--verify=crc32c",
        "--verify_fatal=1",
    ];
    let lat_arg = format!("--write_lat_log={}", lat.display());
    let mut args = job.to_vec();
    args.extend([lat_arg.as_str(), "--log_avg_msec=0"]);
    let fio = spawn_fio_nbd(&c.uri("r"), &args);
    poll("writes to flow", Duration::from_secs(30), || {
        (live_requests(&c, "write") > 300.0).then_some(())
    });
    let m = cluster_map(&c);
    let (d0, d1, d2) = (
        daemon_disk(&c, &m, "storage-0"),
        daemon_disk(&c, &m, "storage-1"),
        daemon_disk(&c, &m, "storage-2"),
    );

    // First failure: storage-2 hangs until declared down; its copies are
    // outdated and writes go on on the other two.
    let t0 = Instant::now();
    let frozen = c.freeze("storage-2");
    poll("storage-2 declared down", Duration::from_secs(30), || {
        (status_json(&c)["daemons_down"] == 1).then_some(())
    });
    let down_after = t0.elapsed();
    let w0 = live_requests(&c, "write");
    poll(
        "writes to go on without storage-2",
        Duration::from_secs(30),
        || (live_requests(&c, "write") > w0 + 200.0).then_some(()),
    );
    println!("storage-2 stopped: declared down after {down_after:?}, writes go on");

    // Second and third: storage-1 killed (restarted outdated), then
    // storage-0, the last up-to-date copy, killed as soon as storage-1 is
    // back and before it is recovered. If storage-1's recovery won the race
    // (storage-0 was no longer the last copy, so nothing is taken back),
    // the pair of kills is repeated.
    let mut reclaimed = 0.0;
    for attempt in 1..=4 {
        let m = cluster_map(&c);
        let (inc0, inc1) = (incarnation(&m, d0), incarnation(&m, d1));
        kill(c.pid("storage-1"), 9);
        // Polled at a steady pace (not `poll`'s backoff): the window
        // before storage-1 is recovered is short.
        let m = within(Duration::from_secs(30), || {
            let m = cluster_map(&c);
            (incarnation(&m, d1) > inc1 && m.disk(d1).expect("disk").up).then_some(m)
        })
        .expect("storage-1's new process to register");
        // Let storage-1's new process apply some of the client's writes
        // (what it will vouch for), but not finish its recovery.
        let repl = |c: &Cluster| {
            daemon_metrics(c, "storage-1").map_or(0.0, |m| {
                m.lines()
                    .filter(|l| l.starts_with("tessera_storage_requests_total{op=\"repl\"}"))
                    .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                    .sum()
            })
        };
        let applied = within(Duration::from_secs(5), || {
            let n = repl(&c);
            (n >= 40.0).then_some(n)
        });
        let pid0 = c.pid("storage-0");
        kill(pid0, 9);
        let last: usize = (0..m.pgs.len())
            .filter(|pg| {
                copy_state(&m, *pg, d0) == Some(tessera_wire::map::CopyState::UpToDate)
                    && [d1, d2].iter().all(|d| {
                        copy_state(&m, *pg, *d) != Some(tessera_wire::map::CopyState::UpToDate)
                    })
            })
            .count();
        // storage-0 back, and storage-1 up to date in every group again:
        // whichever daemon led, the take-back (if any) is over.
        poll(
            "storage-0 back and storage-1 recovered",
            Duration::from_secs(60),
            || {
                let m = cluster_map(&c);
                // (its new PID printed too: the next attempt kills it)
                (c.pid("storage-0") != pid0
                    && incarnation(&m, d0) > inc0
                    && m.disk(d0).expect("disk").up
                    && (0..m.pgs.len()).all(|pg| {
                        copy_state(&m, pg, d1) == Some(tessera_wire::map::CopyState::UpToDate)
                    }))
                .then_some(())
            },
        );
        // The counter is published about every 100 ms.
        reclaimed = within(Duration::from_secs(3), || {
            let r = live_storage_metric(&c, "tessera_storage_reclaimed_bytes_total");
            (r > 0.0).then_some(r)
        })
        .unwrap_or(0.0);
        println!(
            "attempt {attempt}: storage-0 killed after storage-1's new process had {applied:?} replication messages, while the only up-to-date copy of {last} groups (map before the kill); it took back {reclaimed} bytes"
        );
        if reclaimed > 0.0 {
            break;
        }
    }
    assert!(
        reclaimed > 0.0,
        "storage-1 always recovered before storage-0 was killed: the restarted last copy never took anything back"
    );

    // storage-2 back: recovered from storage-0's copy, by delta (the new
    // process's log, given back by its disk, reaches back to storage-2's
    // departure).
    frozen.resume();
    wait_clean(&c, Duration::from_secs(60));
    assert_recovered_by_delta(&c);
    let flushes = live_requests(&c, "flush");
    let stall = fio_max_latency_ms(&fio_wait_ok(fio));
    let gap = longest_completion_gap_ms(&dir.path().join("lat_clat.1.log"));
    println!(
        "longest I/O stall seen by fio: {stall:.0} ms (longest gap between completions {gap} ms); {flushes} flushes counted by the daemons"
    );
    assert!(flushes > 0.0, "fio sent no flush");
    wait_clean(&c, Duration::from_secs(60));
    let chunks = compare_copies(&c, "r");
    println!("{chunks} chunks identical on all three copies");
    // Read back through the gateway: every block still holds what fio
    // last wrote to it.
    let mut verify = job.to_vec();
    verify.push("--verify_only");
    fio_json(&fio_wait_ok(spawn_fio_nbd(&c.uri("r"), &verify)));
    c.stop();
}

// Proves that a restarted last up-to-date copy copies only what changed
// while the others were away (docs/replication.md, "A restarted last copy
// recovers the others by delta"), with real processes: a 128 MiB volume
// written in full and clean; recovery paused (`norecover`) so the other
// members stay outdated; storage-2 hung past the grace while fio writes
// 64 blocks at random, resumed; storage-1 hung past the grace while fio
// writes 64 more, resumed; storage-0 — every group's last up-to-date copy —
// killed with -9 and restarted by `tessera up`; recovery resumed. Asserts
// every recovery storage-0's new process started was a delta, the bytes
// recovered stay within the regions fio wrote meanwhile (each 4 KiB write
// rounded up to its 64 KiB region, for both members; a full resync would
// copy the whole volume to each, 256 MiB), fio's verify of both writers
// and of the whole volume passes, and every copy is identical.
#[test]
fn restarted_last_copy_copies_only_what_changed() {
    require(&["fio"]);
    let dir = TempDir::new("last-copy-delta");
    let opts = ClusterOptions {
        storage_daemons: 3,
        disk_size: "1G",
        volumes: vec![("d".into(), "128M".into())],
    };
    let c = Cluster::start_with_args(
        &dir.path().join("cluster"),
        &opts,
        &[],
        &["--replicas", "3"],
    );
    let fill = [
        "--name=fill",
        "--rw=write",
        "--bs=1m",
        "--size=128m",
        "--iodepth=4",
        "--end_fsync=1",
    ];
    fio_json(&fio_wait_ok(spawn_fio_nbd(&c.uri("d"), &fill)));
    wait_clean(&c, Duration::from_secs(60));
    // The fill durable on every copy: the groups' logs trimmed past it (a
    // change not known durable everywhere is pushed again, rightly).
    poll(
        "the fill's log entries trimmed",
        Duration::from_secs(30),
        || (live_storage_metric(&c, "tessera_storage_group_log_entries") == 0.0).then_some(()),
    );
    c.cli(&["cluster", "set", "norecover"]);
    // 64 writes of 4 KiB at random offsets (seeded per phase), each block
    // verified when read back.
    let burst = |seed: &str| {
        let seed = format!("--randseed={seed}");
        let job = [
            "--name=burst",
            "--rw=randwrite",
            "--bs=4k",
            "--size=128m",
            "--io_size=256k",
            "--iodepth=8",
            "--norandommap",
            "--end_fsync=1",
            "--verify=crc32c",
            "--verify_fatal=1",
            seed.as_str(),
        ];
        fio_json(&fio_wait_ok(spawn_fio_nbd(&c.uri("d"), &job)));
    };
    for (daemon, seed) in [("storage-2", "11"), ("storage-1", "12")] {
        let frozen = c.freeze(daemon);
        poll(
            &format!("{daemon} declared down"),
            Duration::from_secs(30),
            || (status_json(&c)["daemons_down"] == 1).then_some(()),
        );
        burst(seed);
        frozen.resume();
        poll(
            &format!("{daemon} up again"),
            Duration::from_secs(30),
            || (status_json(&c)["daemons_down"] == 0).then_some(()),
        );
    }
    let before = live_storage_metric(&c, "tessera_storage_recovery_bytes_total");
    let pid = c.pid("storage-0");
    kill(pid, 9);
    poll("storage-0 restarted", Duration::from_secs(30), || {
        (c.pid("storage-0") != pid && status_json(&c)["daemons_down"] == 0).then_some(())
    });
    c.cli(&["cluster", "unset", "norecover"]);
    wait_clean(&c, Duration::from_secs(120));
    assert_recovered_by_delta(&c);
    // storage-0's old process pushed nothing (norecover); what the live
    // processes count now is the new one's pushes (storage-1 and storage-2
    // restarted nothing, and their own counters only count what they led).
    let recovered = live_storage_metric(&c, "tessera_storage_recovery_bytes_total") - before;
    // Each member is sent at most the 2 x 64 writes of 4 KiB made while
    // either was away, each in one 64 KiB region.
    let bound = 2.0 * 2.0 * 64.0 * 65536.0;
    println!(
        "recovered {recovered} bytes after the last copy restarted (bound {bound}, a full resync of both members: {})",
        (2 * 128) << 20
    );
    assert!(recovered > 0.0, "nothing recovered");
    assert!(
        recovered <= bound,
        "recovered {recovered} bytes, more than the regions written meanwhile ({bound})"
    );
    let chunks = compare_copies(&c, "d");
    println!("{chunks} chunks identical on all three copies");
    let check = [
        "--name=fill",
        "--rw=read",
        "--bs=1m",
        "--size=128m",
        "--iodepth=4",
    ];
    fio_json(&fio_wait_ok(spawn_fio_nbd(&c.uri("d"), &check)));
    c.stop();
}
