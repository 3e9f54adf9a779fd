//! Replication scenarios with real processes: `tessera up --storage-daemons
//! 3 --replicas 3`, fio with crc32c verification, storage daemons killed
//! with -9 (restarted by `tessera up`) and stopped with SIGSTOP past the
//! heartbeat grace; every copy compared at the end through the internal
//! protocol; the longest I/O stall and the recovery volume reported.

use std::time::{Duration, Instant};
use tessera_tests::*;

/// Client write requests the primaries received (replication traffic is
/// counted under op="repl", not here).
fn write_requests(c: &Cluster) -> f64 {
    c.storage_metrics()
        .iter()
        .flat_map(|m| m.lines().map(str::to_string).collect::<Vec<_>>())
        .filter(|l| l.starts_with("tessera_storage_requests_total{op=\"write\"}"))
        .filter_map(|l| {
            l.split_whitespace()
                .last()
                .and_then(|v| v.parse::<f64>().ok())
        })
        .sum()
}

// Proves that with three copies, fio's crc32c-verified writes complete with
// no error while a storage daemon is killed with -9 (and restarted), killed
// again, killed twice more (the second time before the restart before it
// is recovered), and stopped with SIGSTOP past the heartbeat grace then resumed;
// that every copy is identical once the cluster is clean again; and that
// recovery after the stop copied at most one 64 KiB region per write made
// meanwhile. Prints the longest I/O stall fio saw and the recovery figures.
#[test]
fn three_copies_survive_kill9_and_sigstop() {
    require(&["fio"]);
    let dir = TempDir::new("repl3");
    let opts = ClusterOptions {
        storage_daemons: 3,
        disk_size: "2G",
        volumes: vec![("r".into(), "256M".into())],
    };
    // Over TCP: every other scenario runs the daemons' same-host links over
    // Unix sockets (the default for loopback addresses), this one proves
    // the transport of separate hosts.
    let c = Cluster::start_with_env(
        &dir.path().join("cluster"),
        &opts,
        &[],
        &["--replicas", "3"],
        &[("TESSERA_UNIX_LINKS", "off")],
    );
    let s = status_json(&c);
    assert_eq!(s["pgs_clean"], s["pgs_total"], "{s}");
    let uri = c.uri("r");
    // Paced writes (so the recovery bound is meaningful), verified at the
    // end of the job; the job lasts as long as the faults below.
    let fio = spawn_fio_nbd(
        &uri,
        &[
            "--name=repl",
            "--rw=randwrite",
            "--bs=4k",
            "--size=64m",
            "--iodepth=8",
            "--rate_iops=300",
            "--verify=crc32c",
            "--verify_fatal=1",
        ],
    );
    poll("writes to flow", Duration::from_secs(30), || {
        (write_requests(&c) > 500.0).then_some(())
    });

    // kill -9, restarted by tessera up at once; then again.
    for round in 0..2 {
        let victim = c.pid("storage-1");
        kill(victim, 9);
        poll("storage-1 to be restarted", Duration::from_secs(30), || {
            (c.pid("storage-1") != victim).then_some(())
        });
        wait_clean(&c, Duration::from_secs(60));
        println!("kill -9 round {round}: clean again");
    }

    // Killed again before its restart is recovered: as soon as the new
    // process has registered (its copies outdated, the primaries starting
    // its recovery), kill -9 once more; its next process is recovered
    // anew.
    let m = cluster_map(&c);
    let d1 = daemon_disk(&c, &m, "storage-1");
    let inc = incarnation(&m, d1);
    let pid = c.pid("storage-1");
    kill(pid, 9);
    let m = within(Duration::from_secs(30), || {
        let m = cluster_map(&c);
        (incarnation(&m, d1) > inc && m.disk(d1).expect("disk").up).then_some(m)
    })
    .expect("storage-1's new process to register");
    // `tessera up` prints the new PID once the daemon is ready, which may
    // come just after the manager saw it register.
    let pid = within(Duration::from_secs(30), || {
        let p = c.pid("storage-1");
        (p != pid).then_some(p)
    })
    .expect("storage-1's new PID");
    kill(pid, 9);
    let outdated = (0..m.pgs.len())
        .filter(|pg| copy_state(&m, *pg, d1) != Some(tessera_wire::map::CopyState::UpToDate))
        .count();
    poll(
        "storage-1's third process registered",
        Duration::from_secs(30),
        || (incarnation(&cluster_map(&c), d1) > inc + 1).then_some(()),
    );
    wait_clean(&c, Duration::from_secs(60));
    println!(
        "kill -9 again while {outdated} of its {} groups were still outdated: clean again",
        m.pgs.len()
    );

    // SIGSTOP past the grace (declared down, fails over), then SIGCONT.
    let writes0 = write_requests(&c);
    // Peering pushes (when a copy leads again) count as copied bytes too.
    let copied = |c: &Cluster| {
        storage_metric(c, "tessera_storage_recovery_bytes_total")
            + storage_metric(c, "tessera_storage_peering_bytes_total")
    };
    let recovered0 = copied(&c);
    let stopped = c.pid("storage-2");
    kill(stopped, libc::SIGSTOP);
    let t0 = Instant::now();
    poll("storage-2 declared down", Duration::from_secs(30), || {
        (status_json(&c)["daemons_down"] == 1).then_some(())
    });
    let down_after = t0.elapsed();
    kill(stopped, libc::SIGCONT);
    wait_clean(&c, Duration::from_secs(60));
    let writes = write_requests(&c) - writes0;
    let recovered = copied(&c) - recovered0;
    let bound = writes * 65536.0;
    println!(
        "SIGSTOP: declared down after {down_after:?}; {writes} writes meanwhile, recovery copied {recovered} bytes (bound {bound})"
    );
    assert!(
        recovered <= bound,
        "recovery copied {recovered} bytes, more than {bound}"
    );

    let stall = fio_max_latency_ms(&fio_wait_ok(fio));
    println!("longest I/O stall seen by fio: {stall:.0} ms");
    wait_clean(&c, Duration::from_secs(60));
    let chunks = compare_copies(&c, "r");
    println!("{chunks} chunks identical on all three copies");
    let links = all_link_transports(&c, 3);
    assert!(
        links.len() >= 3 && links.iter().all(|v| v == "tcp"),
        "links: {links:?}"
    );
    c.stop();
}
