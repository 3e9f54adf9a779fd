//! Rebuild with real processes: `tessera up --storage-daemons 4 --replicas
//! 3 --down-out-after 3s`, fio writing with crc32c verification while one
//! storage daemon dies for good (SIGSTOP: no heartbeat, no answer, and
//! `tessera up` does not restart it); the manager takes its disk out, every
//! group that held it gets the fourth daemon's disk as a backfill member,
//! the primaries fill it (throttled), and the cluster is clean again on the
//! three live daemons with every copy identical. Then the daemon comes back:
//! it frees the chunks of the groups it lost, and rebalancing gives it back
//! the groups placement picks it for, under verified writes. Reports the
//! rebuild bandwidth, fio's p99 latency before and during the rebuild, and
//! the time rebalancing took.

use std::time::{Duration, Instant};
use tessera_tests::*;

/// Client write requests the primaries received.
fn write_requests(c: &Cluster) -> f64 {
    c.live_storage_metrics()
        .iter()
        .flat_map(|m| m.lines().map(str::to_string).collect::<Vec<_>>())
        .filter(|l| l.starts_with("tessera_storage_requests_total{op=\"write\"}"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

fn recovered_bytes(c: &Cluster) -> f64 {
    c.live_storage_metrics()
        .iter()
        .map(|m| metric_sum(m, "tessera_storage_recovery_bytes_total"))
        .sum()
}

/// Wait for fio; asserts success and no error (verify included).
fn fio_ok(child: std::process::Child) -> serde_json::Value {
    fio_json(&fio_wait_ok(child))
}

/// The writes of fio's completion-latency log (lines `time ms, latency
/// ns, direction, ...`; direction 1 is a write, 0 the verify reads).
fn lat_log(path: &std::path::Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(',').map(str::trim);
            let t = f.next()?.parse().ok()?;
            let lat = f.next()?.parse().ok()?;
            (f.next()? == "1").then_some((t, lat))
        })
        .collect()
}

/// The 99th percentile (ms) of the latencies logged in [from, to) ms, and
/// how many there were.
fn p99(log: &[(u64, u64)], from: u64, to: u64) -> (f64, usize) {
    let mut v: Vec<u64> = log
        .iter()
        .filter(|(t, _)| *t >= from && *t < to)
        .map(|(_, l)| *l)
        .collect();
    if v.is_empty() {
        return (0.0, 0);
    }
    v.sort_unstable();
    let i = ((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1;
    (v[i] as f64 / 1e6, v.len())
}

// Proves that a storage daemon that stops answering for good is taken out
// after --down-out-after, that its groups are rebuilt onto the fourth
// daemon from the surviving copies while fio keeps writing (zero verify
// errors), that the cluster becomes clean without it with every copy of
// every chunk identical in the new acting sets, and that the daemon, when
// it answers again, is not put back into the groups it lost.
/// Read back and verify the 320 MiB written sequentially at the start.
fn verify_fill(uri: &str) {
    fio_ok(spawn_fio_nbd(
        uri,
        &[
            "--name=fill",
            "--rw=write",
            "--bs=1m",
            "--offset=64m",
            "--size=320m",
            "--iodepth=4",
            "--verify=crc32c",
            "--verify_only",
        ],
    ));
}

#[test]
fn dead_daemon_is_rebuilt_on_the_fourth() {
    require(&["fio"]);
    let dir = TempDir::new("rebuild");
    let opts = ClusterOptions {
        storage_daemons: 4,
        disk_size: "2G",
        volumes: vec![("r".into(), "384M".into())],
    };
    let c = Cluster::start_with_args(
        &dir.path().join("cluster"),
        &opts,
        &["127.0.0.1:0"],
        &["--replicas", "3", "--down-out-after", "3s"],
    );
    let s = status_json(&c);
    assert_eq!(s["pgs_clean"], s["pgs_total"], "{s}");
    let uri = c.uri("r");

    // Data for the rebuild to move: 320 MiB written and verified.
    let fill = spawn_fio_nbd(
        &uri,
        &[
            "--name=fill",
            "--rw=write",
            "--bs=1m",
            "--offset=64m",
            "--size=320m",
            "--iodepth=4",
            "--verify=crc32c",
            "--verify_fatal=1",
        ],
    );
    fio_ok(fill);

    // Paced 4k random writes across the whole failure, verified at the end,
    // every completion latency logged.
    let lat = dir.path().join("lat");
    let t0 = Instant::now();
    let writer = spawn_fio_nbd(
        &uri,
        &[
            "--name=during",
            "--rw=randwrite",
            "--bs=4k",
            "--offset=0",
            "--size=32m",
            "--iodepth=8",
            "--rate_iops=400",
            "--verify=crc32c",
            "--verify_fatal=1",
            &format!("--write_lat_log={}", lat.display()),
            "--log_avg_msec=0",
        ],
    );
    let ms = |t: Instant| t.duration_since(t0).as_millis() as u64;
    // Let the writes run a while on the healthy cluster (fio writes its
    // latency log only at the end: count the daemons' write requests).
    let writes0 = write_requests(&c);
    poll("writes to flow", Duration::from_secs(30), || {
        (write_requests(&c) - writes0 > 1600.0).then_some(())
    });

    // One daemon dies for good.
    let victim_name = "storage-1";
    let victim_pid = c.pid(victim_name);
    let nodes: serde_json::Value =
        serde_json::from_str(&c.cli(&["--output", "json", "node", "list"])).expect("json");
    let victim_disk = nodes
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["pid"] == victim_pid)
        .and_then(|n| n["disks"][0].as_u64())
        .expect("victim's disk") as u32;
    let recovered0 = recovered_bytes(&c);
    let held_pgs: Vec<usize> = cluster_map(&c)
        .pgs
        .iter()
        .enumerate()
        .filter(|(_, s)| s.contains(&victim_disk))
        .map(|(pg, _)| pg)
        .collect();
    let held = held_pgs.len();
    let frozen = c.freeze(victim_name);
    let t_stop = Instant::now();
    poll("the disk taken out", Duration::from_secs(60), || {
        (status_json(&c)["disks_out"] == 1).then_some(())
    });
    let t_out = Instant::now();
    println!(
        "storage-1 (disk {victim_disk}, in {held} groups) stopped; out after {:?}",
        t_out - t_stop
    );
    let mut seen_backfilling = 0;
    poll("the rebuild to finish", Duration::from_secs(240), || {
        let s = status_json(&c);
        if s["pgs_backfilling"].as_u64().unwrap_or(0) > 0 {
            seen_backfilling += 1;
            if seen_backfilling % 10 == 1 {
                println!(
                    "  rebuilding: {} pgs backfilling, {}% ({} of {} bytes), {} B/s",
                    s["pgs_backfilling"],
                    s["recovery_percent"],
                    s["recovery_done_bytes"],
                    s["recovery_done_bytes"].as_u64().unwrap_or(0)
                        + s["recovery_remaining_bytes"].as_u64().unwrap_or(0),
                    s["recovery_bytes_per_sec"]
                );
            }
        }
        (s["pgs_clean"] == s["pgs_total"] && s["pgs_backfilling"] == 0).then_some(())
    });
    let t_clean = Instant::now();
    let recovered = recovered_bytes(&c) - recovered0;
    let secs = (t_clean - t_out).as_secs_f64();
    println!(
        "rebuild: {recovered:.0} bytes in {secs:.1} s after the out = {:.1} MB/s",
        recovered / secs / 1e6
    );

    let out = fio_ok(writer);
    let t_end = Instant::now();
    let log = lat_log(&dir.path().join("lat_clat.1.log"));
    let (before, n_before) = p99(&log, 0, ms(t_stop));
    let (during, n_during) = p99(&log, ms(t_out), ms(t_clean).min(ms(t_end)));
    println!(
        "fio p99: {before:.2} ms before ({n_before} writes), {during:.2} ms during the rebuild ({n_during} writes); longest {:.0} ms",
        out["jobs"][0]["write"]["clat_ns"]["max"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e6
    );

    // The new acting sets: three live disks, none of them the dead one,
    // every copy identical.
    let m = cluster_map(&c);
    assert!(m.disk(victim_disk).expect("disk").out);
    for set in m.pgs.iter().filter(|s| !s.is_empty()) {
        assert_eq!(set.len(), 3, "{set:?}");
        assert!(!set.contains(&victim_disk), "{set:?}");
    }
    let chunks = compare_copies(&c, "r");
    println!("{chunks} chunks identical on all three copies of the new acting sets");

    // The data written before the failure reads back intact.
    verify_fill(&uri);

    // Back from the dead: in again, and rebalancing gives it back exactly
    // the groups placement picks it for (the ones it held: straw2 over the
    // same four disks), each through a backfill while the three copies stay,
    // under verified writes; no other group moves.
    let sets_before: Vec<Vec<u32>> = cluster_map(&c).pgs.clone();
    let writer = spawn_fio_nbd(
        &uri,
        &[
            "--name=rebalance",
            "--rw=randwrite",
            "--bs=4k",
            "--offset=0",
            "--size=32m",
            "--io_size=12m",
            "--iodepth=8",
            "--rate_iops=400",
            "--verify=crc32c",
            "--verify_fatal=1",
        ],
    );
    let t_resume = Instant::now();
    frozen.resume();
    let mut max_members = 0;
    poll(
        "rebalancing onto storage-1",
        Duration::from_secs(240),
        || {
            let m = cluster_map(&c);
            max_members = max_members.max(m.pgs.iter().map(Vec::len).max().unwrap_or(0));
            let s = status_json(&c);
            let holds: Vec<usize> = m
                .pgs
                .iter()
                .enumerate()
                .filter(|(_, s)| s.contains(&victim_disk))
                .map(|(pg, _)| pg)
                .collect();
            (s["daemons_down"] == 0
                && s["pgs_clean"] == s["pgs_total"]
                && m.pgs.iter().all(|s| s.is_empty() || s.len() == 3)
                && holds == held_pgs)
                .then_some(())
        },
    );
    println!(
        "rebalanced {held} groups back onto storage-1 in {:.1} s (at most {max_members} copies of a group during the move)",
        t_resume.elapsed().as_secs_f64()
    );
    let m = cluster_map(&c);
    assert!(!m.disk(victim_disk).expect("disk").out);
    for (pg, (now, was)) in m.pgs.iter().zip(&sets_before).enumerate() {
        if !held_pgs.contains(&pg) {
            assert_eq!(now, was, "group {pg} moved without reason");
        }
    }
    fio_ok(writer);
    let chunks = compare_copies(&c, "r");
    println!("{chunks} chunks identical on all three copies after rebalancing");
    // The copies that left a disk (storage-1's while it was out, the
    // fourth's when rebalancing took them back) were freed there.
    let purged: f64 = poll("orphaned chunks freed", Duration::from_secs(30), || {
        let n: f64 = c
            .live_storage_metrics()
            .iter()
            .map(|m| metric_sum(m, "tessera_storage_purged_chunks_total"))
            .sum();
        (n > 0.0).then_some(n)
    });
    println!("{purged} chunks of groups that left their disk were freed");
    verify_fill(&uri);
    c.stop();
}
