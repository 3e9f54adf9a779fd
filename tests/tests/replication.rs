//! Replication scenarios with real processes: `tessera up --storage-daemons
//! 3 --replicas 3`, fio with crc32c verification, storage daemons killed
//! with -9 (restarted by `tessera up`) and stopped with SIGSTOP past the
//! heartbeat grace; every copy compared at the end through the internal
//! protocol; the longest I/O stall and the recovery volume reported.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tessera_tests::*;
use tessera_wire::header::{HEADER_SIZE, open_payload, seal_payload};
use tessera_wire::map::ClusterMap;
use tessera_wire::{Header, Op, Status};

fn require(tools: &[&str]) {
    for t in tools {
        assert!(have(t), "{t} is required (tests/run.sh installs it)");
    }
}

fn map(c: &Cluster) -> ClusterMap {
    serde_json::from_str(&http_get(&format!("{}/v1/map", c.manager)).expect("map")).expect("json")
}

fn status(c: &Cluster) -> serde_json::Value {
    serde_json::from_str(&c.cli(&["--output", "json", "status"])).expect("status json")
}

fn metric(c: &Cluster, name: &str) -> f64 {
    c.storage_metrics()
        .iter()
        .map(|m| metric_sum(m, name))
        .sum()
}

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

/// One internal-protocol connection, for reading a chosen copy.
struct Peer(TcpStream, u64);

impl Peer {
    fn connect(addr: &str, cluster_id: &str, epoch: u64) -> Peer {
        let s = TcpStream::connect(addr).expect("connect to storage daemon");
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let mut p = Peer(s, 1);
        let mut hello = cluster_id.as_bytes().to_vec();
        seal_payload(&mut hello);
        let (h, _) = p.call(Header::request(Op::Hello, 0, epoch), &hello);
        assert_eq!(h.status, Status::Ok);
        p
    }

    fn call(&mut self, mut h: Header, payload: &[u8]) -> (Header, Vec<u8>) {
        h.request_id = self.1;
        self.1 += 1;
        h.payload_len = payload.len() as u32;
        self.0.write_all(&h.to_bytes()).expect("send");
        self.0.write_all(payload).expect("send");
        let mut hb = [0u8; HEADER_SIZE];
        self.0.read_exact(&mut hb).expect("reply header");
        let r = Header::decode(&hb).expect("valid reply");
        let mut p = vec![0u8; r.payload_len as usize];
        self.0.read_exact(&mut p).expect("reply payload");
        (r, p)
    }
}

/// Read every chunk of `volume` from every member of its group and assert
/// the copies are identical. Returns the chunks compared.
fn compare_copies(c: &Cluster, volume: &str) -> u32 {
    let m = map(c);
    let v = m.volume_by_name(volume).expect("volume").clone();
    let mut peers = std::collections::BTreeMap::new();
    let mut compared = 0;
    for chunk in 0..v.chunk_count() as u32 {
        let pg = m.pg_for(v.id, chunk).expect("pg");
        let len = (v.size_bytes - u64::from(chunk) * v.chunk_size_bytes).min(v.chunk_size_bytes);
        let mut first: Option<(u32, u32)> = None;
        for disk in &m.pgs[pg as usize] {
            let addr = m
                .node(m.disk(*disk).expect("disk").node_id)
                .expect("node")
                .addr
                .clone();
            let p = peers
                .entry(addr.clone())
                .or_insert_with(|| Peer::connect(&addr, &m.cluster_id, m.epoch));
            let mut h = Header::request(Op::Read, 0, m.epoch);
            h.volume_id = v.id;
            h.chunk_index = chunk;
            h.disk_id = *disk;
            h.length = len as u32;
            let (r, data) = p.call(h, &[]);
            assert_eq!(r.status, Status::Ok, "read chunk {chunk} from disk {disk}");
            let data = open_payload(&data).expect("payload crc");
            let crc = tessera_wire::crc32c(data);
            match first {
                None => first = Some((*disk, crc)),
                Some((d0, c0)) => assert_eq!(
                    c0, crc,
                    "chunk {chunk}: copy on disk {disk} differs from disk {d0}"
                ),
            }
        }
        compared += 1;
    }
    compared
}

/// The longest completion latency fio saw, in ms, from its JSON output.
fn fio_max_latency_ms(out: &str) -> f64 {
    let json = &out[out.find('{').expect("fio json")..];
    let v: serde_json::Value = serde_json::from_str(json).expect("fio json");
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "fio reported an error");
    ["read", "write"]
        .iter()
        .map(|d| job[d]["clat_ns"]["max"].as_f64().unwrap_or(0.0) / 1e6)
        .fold(0.0, f64::max)
}

fn wait_clean(c: &Cluster, timeout: Duration) {
    poll("every placement group clean", timeout, || {
        let s = status(c);
        (s["pgs_clean"] == s["pgs_total"] && s["daemons_down"] == 0).then_some(())
    });
}

// Proves that with three copies, fio's crc32c-verified writes complete with
// no error while a storage daemon is killed with -9 (and restarted), killed
// again, and stopped with SIGSTOP past the heartbeat grace then resumed;
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
    let c = Cluster::start_with_args(
        &dir.path().join("cluster"),
        &opts,
        &[],
        &["--replicas", "3"],
    );
    let s = status(&c);
    assert_eq!(s["pgs_clean"], s["pgs_total"], "{s}");
    let uri = c.uri("r");
    // Paced writes (so the recovery bound is meaningful), verified at the
    // end of the job; the job lasts as long as the faults below.
    let fio = Command::new("fio")
        .args([
            "--name=repl",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=64m",
            "--iodepth=8",
            "--rate_iops=300",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--output-format=json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fio");
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

    // SIGSTOP past the grace (declared down, fails over), then SIGCONT.
    let writes0 = write_requests(&c);
    let recovered0 = metric(&c, "tessera_storage_recovery_bytes_total");
    let stopped = c.pid("storage-2");
    kill(stopped, libc::SIGSTOP);
    let t0 = Instant::now();
    poll("storage-2 declared down", Duration::from_secs(30), || {
        (status(&c)["daemons_down"] == 1).then_some(())
    });
    let down_after = t0.elapsed();
    kill(stopped, libc::SIGCONT);
    wait_clean(&c, Duration::from_secs(60));
    let writes = write_requests(&c) - writes0;
    let recovered = metric(&c, "tessera_storage_recovery_bytes_total") - recovered0;
    let bound = writes * 65536.0;
    println!(
        "SIGSTOP: declared down after {down_after:?}; {writes} writes meanwhile, recovery copied {recovered} bytes (bound {bound})"
    );
    assert!(
        recovered <= bound,
        "recovery copied {recovered} bytes, more than {bound}"
    );

    let out = fio.wait_with_output().expect("fio");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "fio failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stdout
    );
    let stall = fio_max_latency_ms(&stdout);
    println!("longest I/O stall seen by fio: {stall:.0} ms");
    wait_clean(&c, Duration::from_secs(60));
    let chunks = compare_copies(&c, "r");
    println!("{chunks} chunks identical on all three copies");
    c.stop();
}
