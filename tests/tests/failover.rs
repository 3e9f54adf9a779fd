//! Failover scenarios with real processes on `tessera up --storage-daemons 3
//! --replicas 3`: the primary of the busiest placement groups killed with -9
//! and, later, hung with SIGSTOP past the heartbeat grace while fio writes
//! with crc32c verification; and the gateway killed with -9 in the middle of
//! pipelined writes and restarted, with every write the client saw
//! acknowledged read back afterwards. Each ends with every copy compared and
//! prints the longest I/O stall it measured.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessera_tests::*;

fn replicated(name: &str, volume_size: &str, extra: &[&str]) -> (TempDir, Cluster) {
    let dir = TempDir::new(name);
    let opts = ClusterOptions {
        storage_daemons: 3,
        disk_size: "2G",
        volumes: vec![("v".into(), volume_size.into())],
    };
    let args: Vec<&str> = ["--replicas", "3"].iter().chain(extra).copied().collect();
    let c = Cluster::start_with_args(&dir.path().join("cluster"), &opts, &[], &args);
    let s = status_json(&c);
    assert_eq!(s["pgs_clean"], s["pgs_total"], "{s}");
    (dir, c)
}

/// Client writes received by the primaries of the daemons the manager
/// says are up (a stopped daemon would not answer its metrics page).
fn writes_on_up_daemons(c: &Cluster) -> f64 {
    let nodes: serde_json::Value =
        serde_json::from_str(&c.cli(&["--output", "json", "node", "list"])).expect("json");
    let mut total = 0.0;
    for n in nodes.as_array().expect("node array") {
        if n["up"] != true {
            continue;
        }
        let Some(addr) = n["metrics_addr"].as_str() else {
            continue;
        };
        if let Ok(text) = http_get(&format!("http://{addr}/metrics")) {
            total += text
                .lines()
                .filter(|l| l.starts_with("tessera_storage_requests_total{op=\"write\"}"))
                .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                .sum::<f64>();
        }
    }
    total
}

/// The daemon that is primary for the most chunks of `volume` in its first
/// `bytes`, and how many of those chunks it leads.
fn busiest_primary(c: &Cluster, volume: &str, bytes: u64) -> (String, usize) {
    let m = cluster_map(c);
    let v = m.volume_by_name(volume).expect("volume");
    let mut led: BTreeMap<String, usize> = BTreeMap::new();
    for chunk in 0..bytes.div_ceil(v.chunk_size_bytes) as u32 {
        let pg = m.pg_for(v.id, chunk).expect("pg");
        let disk = m.primary(pg).expect("every group has a primary");
        let node = m.disk(disk).expect("disk").node_id;
        let addr = m.node(node).expect("node").addr.clone();
        *led.entry(daemon_name(c, &addr)).or_default() += 1;
    }
    led.into_iter()
        .max_by_key(|(name, n)| (*n, std::cmp::Reverse(name.clone())))
        .expect("some chunk")
}

// Proves that the primary of the busiest placement groups can die (kill -9,
// restarted by `tessera up`) and later hang (SIGSTOP, kept stopped until
// writes have clearly resumed on the other copies, then SIGCONT) while fio
// writes with crc32c verification: fio sees no error and its verify
// passes, writes resume while the old primary is still hung, and every copy
// is identical once the cluster is clean. Prints the longest I/O stall.
#[test]
fn busiest_primary_killed_then_hung() {
    require(&["fio"]);
    const SPAN: u64 = 48 << 20;
    let (dir, c) = replicated("failover-primary", "256M", &[]);
    let lat = dir.path().join("lat");
    let fio = spawn_fio_nbd(
        &c.uri("v"),
        &[
            "--name=primary",
            "--rw=randwrite",
            "--bs=4k",
            &format!("--size={SPAN}"),
            "--iodepth=8",
            "--rate_iops=400",
            "--verify=crc32c",
            "--verify_fatal=1",
            &format!("--write_lat_log={}", lat.display()),
            "--log_avg_msec=0",
        ],
    );
    poll("writes to flow", Duration::from_secs(30), || {
        (writes_on_up_daemons(&c) > 300.0).then_some(())
    });

    // Dead: kill -9 the busiest primary; tessera up restarts it at once.
    let (victim, led) = busiest_primary(&c, "v", SPAN);
    let pid = c.pid(&victim);
    let t0 = Instant::now();
    kill(pid, 9);
    poll(
        "the killed primary to be restarted",
        Duration::from_secs(30),
        || (c.pid(&victim) != pid).then_some(()),
    );
    wait_clean(&c, Duration::from_secs(60));
    println!(
        "kill -9 of {victim} (primary of {led} busy chunks): clean again after {:?}",
        t0.elapsed()
    );

    // Hung: SIGSTOP the busiest primary now, past the grace; the others
    // take over its groups and writes go on while it stays stopped.
    let (hung, led) = busiest_primary(&c, "v", SPAN);
    let pid = c.pid(&hung);
    kill(pid, libc::SIGSTOP);
    let t0 = Instant::now();
    poll(
        "the hung primary declared down",
        Duration::from_secs(30),
        || (status_json(&c)["daemons_down"] == 1).then_some(()),
    );
    let down_after = t0.elapsed();
    let w0 = writes_on_up_daemons(&c);
    poll(
        "writes to resume while the old primary is hung",
        Duration::from_secs(30),
        || (writes_on_up_daemons(&c) > w0 + 200.0).then_some(()),
    );
    let resumed_after = t0.elapsed();
    kill(pid, libc::SIGCONT);
    println!(
        "SIGSTOP of {hung} (primary of {led} busy chunks): declared down after {down_after:?}, 200 writes done by the others after {resumed_after:?}"
    );
    wait_clean(&c, Duration::from_secs(60));

    let stall = fio_max_latency_ms(&fio_wait_ok(fio));
    let gap = longest_completion_gap_ms(&dir.path().join("lat_clat.1.log"));
    println!(
        "longest I/O stall seen by fio: {stall:.0} ms (longest gap between completions {gap} ms)"
    );
    wait_clean(&c, Duration::from_secs(60));
    let chunks = compare_copies(&c, "v");
    println!("{chunks} chunks identical on all three copies");
    // Same-host links over Unix sockets (the default for loopback
    // addresses); replication.rs runs its scenario over TCP.
    let links = all_link_transports(&c, 3);
    assert!(
        links.len() >= 3 && links.iter().all(|v| v == "unix"),
        "links: {links:?}"
    );
    c.stop();
}

const BLOCK: u64 = 4096;
/// Writers of the gateway scenario: each has its own connection (so writes
/// are in flight at once, as with a queue depth) and its own blocks.
const WRITERS: u64 = 8;

/// The content of version `version` of block `block`: the block number and
/// version in its first 16 bytes (so a mismatch says what the block holds),
/// pseudo-random bytes after.
fn block_data(block: u64, version: u64) -> Vec<u8> {
    let mut d = pattern(block << 20 | version, BLOCK as usize);
    d[..8].copy_from_slice(&block.to_le_bytes());
    d[8..16].copy_from_slice(&version.to_le_bytes());
    d
}

/// What one writer saw: the last acknowledged version of each block it
/// wrote, and the writes left in flight by a
/// broken connection that no later acknowledged write of their block
/// superseded (they may or may not have reached the copies).
#[derive(Default)]
struct Seen {
    acked: BTreeMap<u64, u64>,
    unknown: BTreeMap<u64, u64>,
    writes: u64,
}

fn nbd_connect(addr: &str, export: &str) -> std::io::Result<(TcpStream, nbd::Export)> {
    let mut tcp = TcpStream::connect(addr)?;
    // The crate sends a request's header and data in two writes.
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(60)))?;
    let export = nbd::client::handshake(&mut tcp, export.as_bytes())?;
    Ok((tcp, export))
}

/// Writer `w`: rewrites its blocks (every WRITERS-th of `blocks`, in a
/// pseudo-random order, each time with a new version) until the connection
/// breaks or `stop` is set.
fn writer(addr: String, w: u64, blocks: u64, stop: Arc<Mutex<bool>>, seen: Arc<Mutex<Seen>>) {
    let Ok((mut tcp, export)) = nbd_connect(&addr, "v") else {
        return;
    };
    let mut client = nbd::client::NbdClient::new(&mut tcp, &export);
    let mine = blocks / WRITERS;
    let mut x = w;
    loop {
        if *stop.lock().expect("stop") {
            return;
        }
        x = tessera_wire::map::mix64(x.wrapping_add(0x9E37_79B9_7F4A_7C15));
        let block = (x % mine) * WRITERS + w;
        let version = seen
            .lock()
            .expect("seen")
            .acked
            .get(&block)
            .map_or(1, |v| v + 1);
        let ok = client.seek(SeekFrom::Start(block * BLOCK)).is_ok()
            && client.write_all(&block_data(block, version)).is_ok();
        let mut s = seen.lock().expect("seen");
        if !ok {
            s.unknown.insert(block, version);
            return;
        }
        s.acked.insert(block, version);
        s.unknown.remove(&block);
        s.writes += 1;
    }
}

// Proves that a gateway killed with -9 in the middle of pipelined writes
// (eight connections, each with a write in flight) loses no write its
// client saw acknowledged: after `tessera up` restarts it on the same
// address, every block reads back as the last version acknowledged for it
// (or, for the write in flight at the kill, possibly that version), writes
// work again through the new gateway, and every copy is identical. Prints
// the client's stall (kill to first acknowledged write after the restart).
#[test]
fn gateway_killed_mid_write_and_restarted() {
    const VOLUME: u64 = 64 << 20;
    let (_dir, c) = replicated("failover-gateway", "64M", &[]);
    let blocks = VOLUME / BLOCK;
    let run = |seen: &Vec<Arc<Mutex<Seen>>>| {
        let stop = Arc::new(Mutex::new(false));
        let handles: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (addr, stop, seen) = (c.nbd.clone(), stop.clone(), seen[w as usize].clone());
                std::thread::spawn(move || writer(addr, w, blocks, stop, seen))
            })
            .collect();
        (stop, handles)
    };
    let total = |seen: &Vec<Arc<Mutex<Seen>>>| -> u64 {
        seen.iter().map(|s| s.lock().expect("seen").writes).sum()
    };
    let seen: Vec<Arc<Mutex<Seen>>> = (0..WRITERS).map(|_| Arc::default()).collect();

    // Phase 1: writes flow, then the gateway dies under them.
    let (_stop, handles) = run(&seen);
    poll("writes to flow", Duration::from_secs(30), || {
        (total(&seen) > 3000).then_some(())
    });
    let gateway = c.pid("gateway");
    kill(gateway, 9);
    let killed = Instant::now();
    for h in handles {
        h.join().expect("writer");
    }
    let before = total(&seen);
    let in_flight: usize = seen
        .iter()
        .map(|s| s.lock().expect("seen").unknown.len())
        .sum();
    println!(
        "gateway killed after {before} acknowledged writes; {in_flight} writes were in flight"
    );

    // The restarted gateway serves the same address.
    poll(
        "the gateway to be restarted",
        Duration::from_secs(30),
        || (c.pid("gateway") != gateway).then_some(()),
    );
    poll("the new gateway to serve", Duration::from_secs(30), || {
        nbd_connect(&c.nbd, "v").ok().map(|_| ())
    });

    // Phase 2: writes go on through the new gateway.
    let (stop, handles) = run(&seen);
    poll("writes after the restart", Duration::from_secs(30), || {
        (total(&seen) > before).then_some(())
    });
    let stall = killed.elapsed();
    poll(
        "more writes after the restart",
        Duration::from_secs(60),
        || (total(&seen) > before + 2000).then_some(()),
    );
    *stop.lock().expect("stop") = true;
    for h in handles {
        h.join().expect("writer");
    }
    println!(
        "client stall across the gateway restart: {stall:?} (kill to first acknowledged write); {} writes after it",
        total(&seen) - before
    );

    // Every acknowledged write reads back; the one in flight may or may
    // not have landed.
    let (mut tcp, export) = nbd_connect(&c.nbd, "v").expect("connect");
    let mut client = nbd::client::NbdClient::new(&mut tcp, &export);
    let mut checked = 0;
    for s in &seen {
        let s = s.lock().expect("seen");
        for (&block, &version) in &s.acked {
            let mut got = vec![0u8; BLOCK as usize];
            client.seek(SeekFrom::Start(block * BLOCK)).expect("seek");
            client.read_exact(&mut got).expect("read");
            let held = u64::from_le_bytes(got[8..16].try_into().expect("8 bytes"));
            let unknown = s.unknown.get(&block).copied();
            let allowed = got == block_data(block, version)
                || unknown == Some(held) && got == block_data(block, held);
            assert!(
                allowed,
                "block {block}: acknowledged version {version}, reads back version {held} (in flight at the kill: {unknown:?})"
            );
            checked += 1;
        }
        // A block whose only write was in flight at the kill holds that
        // write or nothing.
        for (&block, &version) in s.unknown.iter().filter(|(b, _)| !s.acked.contains_key(b)) {
            let mut got = vec![0u8; BLOCK as usize];
            client.seek(SeekFrom::Start(block * BLOCK)).expect("seek");
            client.read_exact(&mut got).expect("read");
            assert!(
                got.iter().all(|b| *b == 0) || got == block_data(block, version),
                "block {block}: never acknowledged, holds data that is neither zeroes nor its write in flight"
            );
            checked += 1;
        }
    }
    println!("{checked} blocks read back as acknowledged");
    drop(tcp);
    wait_clean(&c, Duration::from_secs(60));
    let chunks = compare_copies(&c, "v");
    println!("{chunks} chunks identical on all three copies");
    c.stop();
}

// Proves failure reports (docs/replication.md, "Failure reports"): a
// storage daemon killed outright, with nothing restarting it (the
// supervisor is stopped), is declared down on its peers' report once it
// has missed a little over two heartbeats, long before a grace set to 30 s
// here would run out. Its peers' replication links closed when it died;
// the manager counts their reports (route `failure`). Prints how long the
// manager took.
#[test]
fn a_daemon_killed_outright_is_declared_down_on_its_peers_report() {
    require(&["fio"]);
    let (_dir, c) = replicated("failrep", "64M", &["--heartbeat-grace-ms", "30000"]);
    // Replication links are open once writes flow to every group.
    let fio = spawn_fio_nbd(
        &c.uri("v"),
        &[
            "--name=failrep",
            "--rw=randwrite",
            "--bs=4k",
            "--size=16m",
            "--iodepth=4",
            "--rate_iops=200",
            "--time_based",
            "--runtime=20",
        ],
    );
    poll("writes to flow", Duration::from_secs(30), || {
        (writes_on_up_daemons(&c) > 300.0).then_some(())
    });
    let supervisor = c.freeze_supervisor();
    let victim = c.pid("storage-2");
    let t0 = Instant::now();
    kill(victim, 9);
    // Well inside the 30 s grace: only a report can explain it.
    poll("storage-2 declared down", Duration::from_secs(15), || {
        (status_json(&c)["daemons_down"] == 1).then_some(())
    });
    println!(
        "killed daemon declared down after {:?} (grace 30 s)",
        t0.elapsed()
    );
    let reports = http_get(&format!("{}/metrics", c.manager))
        .map(|t| {
            t.lines()
                .filter(|l| l.contains("route=\"failure\"") && l.contains("code=\"200\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        })
        .unwrap_or(0.0);
    assert!(reports > 0.0, "the manager received failure reports");
    supervisor.resume();
    fio_wait_ok(fio);
    wait_clean(&c, Duration::from_secs(60));
    c.stop();
}
