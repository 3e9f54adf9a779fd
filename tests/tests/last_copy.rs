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
//! case the simulation's seed 11149 found, here with real processes.

use std::time::{Duration, Instant};
use tessera_tests::*;

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
    let chunks = compare_copies(&c, "v");
    println!("{chunks} chunks identical on all three copies");
    c.stop();
}
