//! Harness for the real-client tests: starts a whole local cluster with the
//! real `tessera up` (manager, storage daemons, gateway on loopback, every
//! port chosen by the kernel), reads the addresses and PIDs it prints, and
//! stops it — also when a test fails (Drop). Every wait polls a condition
//! against a deadline; nothing sleeps a fixed time.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Directory holding the binaries built with the same profile as this test
/// (`target/ci` under tests/run.sh), found from the test executable's own
/// path (`target/<profile>/deps/...`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first with the test's profile (tests/run.sh does: cargo build --profile ci --workspace --bins)",
        p.display()
    );
    p
}

/// Whether an external tool is installed (tests/run.sh installs them).
/// Assert every tool is installed (tests/run.sh installs them).
pub fn require(tools: &[&str]) {
    for t in tools {
        assert!(
            have(t),
            "{t} is not installed: run the suite through tests/run.sh, which installs it"
        );
    }
}

/// Wait until every placement group is clean and no daemon is down.
pub fn wait_clean(c: &Cluster, timeout: Duration) {
    poll("every placement group clean", timeout, || {
        let s = status_json(c);
        (s["pgs_clean"] == s["pgs_total"] && s["daemons_down"] == 0).then_some(())
    });
}

/// Start fio with its nbd engine on `uri`, a JSON report on stdout, and
/// `args` (job name, workload, verification).
pub fn spawn_fio_nbd(uri: &str, args: &[&str]) -> std::process::Child {
    Command::new("fio")
        .args([
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--output-format=json",
        ])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn fio")
}

/// Wait for a fio started by `spawn_fio_nbd`; asserts it exited with
/// success; returns its stdout.
pub fn fio_wait_ok(child: std::process::Child) -> String {
    let out = child.wait_with_output().expect("fio");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "fio failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stdout
    );
    stdout
}

/// fio's JSON report; asserts its first job reported no error (verify
/// included).
pub fn fio_json(out: &str) -> serde_json::Value {
    let json = &out[out.find('{').expect("fio json")..];
    let v: serde_json::Value = serde_json::from_str(json).expect("fio json");
    assert_eq!(v["jobs"][0]["error"], 0, "fio reported an error");
    v
}

/// fio's JSON report: asserts no error; returns the longest completion
/// latency in ms.
pub fn fio_max_latency_ms(out: &str) -> f64 {
    let v = fio_json(out);
    let job = &v["jobs"][0];
    ["read", "write"]
        .iter()
        .map(|d| job[d]["clat_ns"]["max"].as_f64().unwrap_or(0.0) / 1e6)
        .fold(0.0, f64::max)
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let base = std::env::var_os("TESSERA_TEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("tessera-tests"));
        let p = base.join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create test dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // TESSERA_TEST_KEEP=1 keeps a failed test's directory (disk files,
        // daemon logs) to look at.
        if std::thread::panicking() && std::env::var_os("TESSERA_TEST_KEEP").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Poll `f` until it returns `Some` or the deadline passes.
pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(5);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// Run a command to completion, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

pub fn kill(pid: u32, signal: i32) {
    // Only PIDs this harness started (children of `tessera up` it reported).
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
}

/// A running `tessera up`.
pub struct Cluster {
    child: Option<Child>,
    pub dir: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
    pub nbd: String,
    /// iSCSI portals ("ip:port") of the gateway.
    pub iscsi: Vec<String>,
    pub manager: String,
}

pub struct ClusterOptions {
    pub storage_daemons: u32,
    pub disk_size: &'static str,
    pub volumes: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            storage_daemons: 2,
            disk_size: "2G",
            volumes: vec![("demo".into(), "1G".into())],
        }
    }
}

impl Cluster {
    /// Start with one iSCSI portal on a free loopback port.
    pub fn start(dir: &Path, opts: &ClusterOptions) -> Cluster {
        Cluster::start_with_portals(dir, opts, &["127.0.0.1:0"])
    }

    /// Start with the given gateway iSCSI portals (port 0: a free port).
    pub fn start_with_portals(dir: &Path, opts: &ClusterOptions, iscsi_listen: &[&str]) -> Cluster {
        Cluster::start_with_args(dir, opts, iscsi_listen, &[])
    }

    /// Start with extra `tessera up` arguments (e.g. `--replicas 3`).
    pub fn start_with_args(
        dir: &Path,
        opts: &ClusterOptions,
        iscsi_listen: &[&str],
        extra: &[&str],
    ) -> Cluster {
        Cluster::start_with_env(dir, opts, iscsi_listen, extra, &[])
    }

    /// Start with extra arguments and environment variables for `tessera
    /// up` and the daemons it starts (e.g. `TESSERA_UNIX_LINKS=off`).
    pub fn start_with_env(
        dir: &Path,
        opts: &ClusterOptions,
        iscsi_listen: &[&str],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Cluster {
        let mut cmd = Command::new(bin("tessera"));
        cmd.envs(env.iter().copied());
        cmd.arg("up")
            .arg("--dir")
            .arg(dir)
            .arg("--storage-daemons")
            .arg(opts.storage_daemons.to_string())
            .arg("--disk-size")
            .arg(opts.disk_size)
            .arg("--nbd-listen")
            .arg("127.0.0.1:0")
            .arg("--manager-listen")
            .arg("127.0.0.1:0");
        for (name, size) in &opts.volumes {
            cmd.arg("--volume").arg(format!("{name}:{size}"));
        }
        // Never the default portal (127.0.0.1:3260): tests run in
        // parallel, and two gateways cannot share it.
        let iscsi_listen: &[&str] = if iscsi_listen.is_empty() {
            &["127.0.0.1:0"]
        } else {
            iscsi_listen
        };
        for l in iscsi_listen {
            cmd.arg("--iscsi-listen").arg(l);
        }
        cmd.args(extra);
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn tessera up");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().expect("lines").push(line);
            }
        });
        let mut c = Cluster {
            child: Some(child),
            dir: dir.to_path_buf(),
            lines,
            nbd: String::new(),
            iscsi: Vec::new(),
            manager: String::new(),
        };
        c.wait_line("ready", Duration::from_secs(90), |l| l == "ready");
        let gw = c.line_starting("gateway ");
        c.nbd = field(&gw, "nbd").expect("gateway nbd address");
        c.iscsi = field(&gw, "iscsi")
            .filter(|v| v != "none")
            .map(|v| v.split(',').map(str::to_string).collect())
            .unwrap_or_default();
        let m = c.line_starting("manager ");
        c.manager = format!("http://{}", field(&m, "listen").expect("manager address"));
        c
    }

    fn line_starting(&self, prefix: &str) -> String {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .rev()
            .find(|l| l.starts_with(prefix))
            .cloned()
            .unwrap_or_else(|| panic!("tessera up printed no line starting with {prefix:?}"))
    }

    /// Wait for a line of `tessera up`'s output matching `pred`.
    pub fn wait_line(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        poll(what, timeout, || {
            self.lines
                .lock()
                .expect("lines")
                .iter()
                .find(|l| pred(l))
                .cloned()
        })
    }

    pub fn output(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    pub fn uri(&self, volume: &str) -> String {
        format!("nbd://{}/{volume}", self.nbd)
    }

    /// Current PID of a process `tessera up` supervises (`storage-0`, ...).
    pub fn pid(&self, name: &str) -> u32 {
        let restarted = format!("restarted {name} ");
        let started = format!("{name} ");
        let lines = self.lines.lock().expect("lines");
        let line = lines
            .iter()
            .rev()
            .find(|l| l.starts_with(&restarted) || l.starts_with(&started))
            .unwrap_or_else(|| panic!("no pid line for {name}"));
        field(line, "pid")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("bad pid line {line:?}"))
    }

    /// Run the CLI against this cluster's manager.
    pub fn cli(&self, args: &[&str]) -> String {
        run(Command::new(bin("tessera"))
            .arg("--manager")
            .arg(&self.manager)
            .args(args))
    }

    /// Metrics text of every storage daemon, from `tessera node list`.
    pub fn storage_metrics(&self) -> Vec<String> {
        let nodes: serde_json::Value =
            serde_json::from_str(&self.cli(&["--output", "json", "node", "list"])).expect("json");
        let mut out = Vec::new();
        for n in nodes.as_array().expect("node array") {
            if let Some(addr) = n["metrics_addr"].as_str()
                && let Ok(text) = http_get(&format!("http://{addr}/metrics"))
            {
                out.push(text);
            }
        }
        out
    }

    /// Stop `tessera up` with SIGTERM and wait for it (it stops its children).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(child.id(), 15);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `key=value` from a line of `tessera up` output.
pub fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")).map(str::to_string))
}

/// Minimal HTTP GET over loopback (the tests need nothing more).
pub fn http_get(url: &str) -> Result<String, String> {
    let rest = url.strip_prefix("http://").ok_or("not http")?;
    let (host, path) = rest.split_once('/').map_or((rest, "/"), |(h, p)| (h, p));
    let path = format!("/{}", path.trim_start_matches('/'));
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(host).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
    let (head, body) = buf.split_once("\r\n\r\n").ok_or("bad response")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(head.lines().next().unwrap_or("").to_string());
    }
    Ok(body.to_string())
}

/// Sum of a metric (all label sets) in Prometheus text.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Deterministic pseudo-random bytes (splitmix64), so failures reproduce.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = seed;
    while out.len() < len {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        out.extend_from_slice(&tessera_wire::map::mix64(x).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn files_equal(a: &Path, b: &Path) -> bool {
    match (std::fs::read(a), std::fs::read(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

// ---- replicated clusters: the copies themselves ----------------------------

/// The manager's current cluster map.
pub fn cluster_map(c: &Cluster) -> tessera_wire::map::ClusterMap {
    serde_json::from_str(&http_get(&format!("{}/v1/map", c.manager)).expect("map")).expect("json")
}

/// `tessera status --output json`.
pub fn status_json(c: &Cluster) -> serde_json::Value {
    serde_json::from_str(&c.cli(&["--output", "json", "status"])).expect("status json")
}

/// A metric summed over every storage daemon.
pub fn storage_metric(c: &Cluster, name: &str) -> f64 {
    c.storage_metrics()
        .iter()
        .map(|m| metric_sum(m, name))
        .sum()
}

/// A storage metric summed over the daemons that are up, including
/// everything that completed before the call: the daemons publish their
/// counters in rounds (about every 100 ms), so once every daemon has
/// completed two more rounds, one of them started after the call.
pub fn settled_storage_metric(c: &Cluster, name: &str) -> f64 {
    const ROUNDS: &str = "tessera_storage_metric_publications_total";
    let rounds = |c: &Cluster| -> Vec<f64> {
        c.live_storage_metrics()
            .iter()
            .map(|m| metric_sum(m, ROUNDS))
            .collect()
    };
    let start = rounds(c);
    poll(
        "two publication rounds on every daemon",
        Duration::from_secs(30),
        || {
            let now = rounds(c);
            (now.len() == start.len() && now.iter().zip(&start).all(|(n, s)| *n >= s + 2.0))
                .then_some(())
        },
    );
    c.live_storage_metrics()
        .iter()
        .map(|m| metric_sum(m, name))
        .sum()
}

/// One internal-protocol connection to a storage daemon, for reading a
/// chosen copy.
pub struct StoragePeer(std::net::TcpStream, u64);

impl StoragePeer {
    pub fn connect(addr: &str, cluster_id: &str, epoch: u64) -> StoragePeer {
        use tessera_wire::{Header, Op, Status};
        let s = std::net::TcpStream::connect(addr).expect("connect to storage daemon");
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let mut p = StoragePeer(s, 1);
        let mut hello = cluster_id.as_bytes().to_vec();
        tessera_wire::header::seal_payload(&mut hello);
        let (h, _) = p.call(Header::request(Op::Hello, 0, epoch), &hello);
        assert_eq!(h.status, Status::Ok);
        p
    }

    pub fn call(
        &mut self,
        mut h: tessera_wire::Header,
        payload: &[u8],
    ) -> (tessera_wire::Header, Vec<u8>) {
        use std::io::{Read, Write};
        h.request_id = self.1;
        self.1 += 1;
        h.payload_len = payload.len() as u32;
        self.0.write_all(&h.to_bytes()).expect("send");
        self.0.write_all(payload).expect("send");
        let mut hb = [0u8; tessera_wire::header::HEADER_SIZE];
        self.0.read_exact(&mut hb).expect("reply header");
        let r = tessera_wire::Header::decode(&hb).expect("valid reply");
        let mut p = vec![0u8; r.payload_len as usize];
        self.0.read_exact(&mut p).expect("reply payload");
        (r, p)
    }
}

/// Read one chunk of `volume` from the copy on `disk` through the internal
/// protocol (a read at a copy that is not the primary is served when the
/// map says the copy is up to date).
pub fn read_copy(c: &Cluster, volume: &str, chunk: u32, disk: u32) -> Vec<u8> {
    use tessera_wire::{Header, Op, Status};
    let m = cluster_map(c);
    let v = m.volume_by_name(volume).expect("volume").clone();
    let addr = m
        .node(m.disk(disk).expect("disk").node_id)
        .expect("node")
        .addr
        .clone();
    let mut p = StoragePeer::connect(&addr, &m.cluster_id, m.epoch);
    let len = (v.size_bytes - u64::from(chunk) * v.chunk_size_bytes).min(v.chunk_size_bytes);
    let mut h = Header::request(Op::Read, 0, m.epoch);
    h.volume_id = v.id;
    h.chunk_index = chunk;
    h.disk_id = disk;
    h.length = len as u32;
    let (r, data) = p.call(h, &[]);
    assert_eq!(r.status, Status::Ok, "read chunk {chunk} from disk {disk}");
    tessera_wire::header::open_payload(&data)
        .expect("payload crc")
        .to_vec()
}

/// Read every chunk of `volume` from every member of its group through the
/// internal protocol and assert the copies are identical. Returns the
/// chunks compared. (A copy whose read fails its CRC is repaired before it
/// answers: check `tessera_storage_checksum_errors_total` around the call
/// to know that none did.)
pub fn compare_copies(c: &Cluster, volume: &str) -> u32 {
    use tessera_wire::{Header, Op, Status};
    let m = cluster_map(c);
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
                .or_insert_with(|| StoragePeer::connect(&addr, &m.cluster_id, m.epoch));
            let mut h = Header::request(Op::Read, 0, m.epoch);
            h.volume_id = v.id;
            h.chunk_index = chunk;
            h.disk_id = *disk;
            h.length = len as u32;
            let (r, data) = p.call(h, &[]);
            assert_eq!(r.status, Status::Ok, "read chunk {chunk} from disk {disk}");
            let data = tessera_wire::header::open_payload(&data).expect("payload crc");
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

/// A process stopped with SIGSTOP: to the cluster it is a dead daemon
/// (no heartbeat, no answer), yet `tessera up` does not restart it (it has
/// not exited). Dropping the guard resumes it (SIGCONT), also when a test
/// fails, so the cluster stops without waiting for a SIGKILL.
pub struct Frozen {
    pub pid: u32,
    resumed: bool,
}

impl Frozen {
    pub fn resume(mut self) {
        kill(self.pid, libc::SIGCONT);
        self.resumed = true;
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.resumed {
            kill(self.pid, libc::SIGCONT);
        }
    }
}

impl Cluster {
    /// Stop a supervised process (`storage-1`, ...) with SIGSTOP until the
    /// guard is resumed or dropped.
    pub fn freeze(&self, name: &str) -> Frozen {
        let pid = self.pid(name);
        kill(pid, libc::SIGSTOP);
        Frozen {
            pid,
            resumed: false,
        }
    }

    /// Stop `tessera up` itself with SIGSTOP (its children run on, but a
    /// child that exits is not restarted) until the guard is resumed or
    /// dropped.
    pub fn freeze_supervisor(&self) -> Frozen {
        let pid = self.child.as_ref().expect("tessera up runs").id();
        kill(pid, libc::SIGSTOP);
        Frozen {
            pid,
            resumed: false,
        }
    }

    /// Metrics text of the storage daemons the manager sees up (a stopped
    /// daemon would hold every scrape for the read timeout).
    pub fn live_storage_metrics(&self) -> Vec<String> {
        let nodes: serde_json::Value =
            serde_json::from_str(&self.cli(&["--output", "json", "node", "list"])).expect("json");
        nodes
            .as_array()
            .expect("node array")
            .iter()
            .filter(|n| n["up"] == true)
            .filter_map(|n| n["metrics_addr"].as_str())
            .filter_map(|addr| http_get(&format!("http://{addr}/metrics")).ok())
            .collect()
    }
}

// ---- fault scenarios: which process is which, what fio saw ---------------

/// The `tessera up` name (`storage-N`) of the daemon listening on `addr`.
pub fn daemon_name(c: &Cluster, addr: &str) -> String {
    c.output()
        .iter()
        .find(|l| l.starts_with("storage-") && field(l, "listen").as_deref() == Some(addr))
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| panic!("no storage daemon listens on {addr}"))
}

/// The disk of a supervised storage daemon (`storage-N`; `tessera up`
/// gives each daemon one disk).
pub fn daemon_disk(c: &Cluster, m: &tessera_wire::map::ClusterMap, name: &str) -> u32 {
    let line = c
        .output()
        .into_iter()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("tessera up printed no line for {name}"));
    let addr = field(&line, "listen").expect("listen address");
    let node = m
        .nodes
        .iter()
        .find(|n| n.addr == addr)
        .unwrap_or_else(|| panic!("no node at {addr}"));
    m.disks
        .iter()
        .find(|d| d.node_id == node.id)
        .map(|d| d.id)
        .expect("the daemon's disk")
}

/// Client requests of one kind (`write`, `flush`, ...) the storage daemons
/// the manager sees up have received since they started (replication
/// traffic is counted under `repl`).
pub fn live_requests(c: &Cluster, op: &str) -> f64 {
    let prefix = format!("tessera_storage_requests_total{{op=\"{op}\"}}");
    c.live_storage_metrics()
        .iter()
        .flat_map(|m| m.lines().map(str::to_string).collect::<Vec<_>>())
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// A metric summed over the storage daemons the manager sees up.
pub fn live_storage_metric(c: &Cluster, name: &str) -> f64 {
    c.live_storage_metrics()
        .iter()
        .map(|m| metric_sum(m, name))
        .sum()
}

/// The longest time between two consecutive completions in a fio latency
/// log (`time_ms, latency, ...` per I/O), in ms.
pub fn longest_completion_gap_ms(log: &Path) -> u64 {
    let text = std::fs::read_to_string(log).expect("fio latency log");
    let mut times: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split(',').next()?.trim().parse().ok())
        .collect();
    times.sort_unstable();
    times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
}

/// Metrics text of one supervised storage daemon (`storage-N`), if it
/// answers.
pub fn daemon_metrics(c: &Cluster, name: &str) -> Option<String> {
    let line = c
        .output()
        .into_iter()
        .find(|l| l.starts_with(&format!("{name} ")))?;
    let addr = field(&line, "listen")?;
    let nodes: serde_json::Value =
        serde_json::from_str(&c.cli(&["--output", "json", "node", "list"])).ok()?;
    let metrics = nodes
        .as_array()?
        .iter()
        .find(|n| n["addr"] == addr.as_str())?["metrics_addr"]
        .as_str()?
        .to_string();
    http_get(&format!("http://{metrics}/metrics")).ok()
}

/// The copy state of `disk` in group `pg` (None: not a member).
pub fn copy_state(
    m: &tessera_wire::map::ClusterMap,
    pg: usize,
    disk: u32,
) -> Option<tessera_wire::map::CopyState> {
    let i = m.pgs[pg].iter().position(|d| *d == disk)?;
    Some(
        m.pg_states
            .get(pg)
            .and_then(|s| s.get(i))
            .copied()
            .unwrap_or_default(),
    )
}

pub fn incarnation(m: &tessera_wire::map::ClusterMap, disk: u32) -> u64 {
    m.disk(disk).expect("disk").incarnation
}

/// Poll `f` every 10 ms (no backoff: for short windows) until it returns
/// `Some` or `timeout` passes (then `None`).
pub fn within<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Joins counter-increment workers (each returns the values it saw and
/// replaced by a successful compare-and-write, and its miscompares) and
/// asserts every value from 0 to `total - 1` was replaced exactly once: a
/// lost update shows as a value replaced twice. Returns the miscompares.
pub fn assert_each_increment_once(
    workers: Vec<std::thread::JoinHandle<(Vec<u64>, u64)>>,
    total: u64,
) -> u64 {
    let mut all = Vec::new();
    let mut misses = 0;
    for w in workers {
        let (seen, m) = w.join().expect("worker");
        all.extend(seen);
        misses += m;
    }
    all.sort_unstable();
    let twice: Vec<u64> = all
        .windows(2)
        .filter(|w| w[0] == w[1])
        .map(|w| w[0])
        .collect();
    assert!(
        twice.is_empty(),
        "lost updates: {} increments started from a value another one had already \
         incremented, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(10)]
    );
    assert_eq!(
        all,
        (0..total).collect::<Vec<_>>(),
        "each value incremented once"
    );
    misses
}

/// How the links a process logged were made, from its log under the
/// cluster's `logs/` (`log`: "gateway", "storage-0", ...): "unix", "tcp" or
/// "in-process" for each line containing `what` ("connected to storage
/// daemon" in the gateway's, "replication link to peer daemon" in a storage
/// daemon's).
pub fn link_transports(c: &Cluster, log: &str, what: &str) -> Vec<String> {
    let text = std::fs::read_to_string(c.dir.join(format!("logs/{log}.log"))).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| {
            ["unix", "tcp", "in-process"]
                .into_iter()
                .find(|v| l.contains(&format!("\"{v}\"")))
                .map(str::to_string)
        })
        .collect()
}

/// Every link the gateway and the storage daemons logged, as
/// `link_transports` gives them.
pub fn all_link_transports(c: &Cluster, daemons: u32) -> Vec<String> {
    let mut v = link_transports(c, "gateway", "connected to storage daemon");
    for i in 0..daemons {
        v.extend(link_transports(
            c,
            &format!("storage-{i}"),
            "replication link to peer daemon",
        ));
    }
    v
}
