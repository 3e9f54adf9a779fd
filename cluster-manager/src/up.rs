//! `tessera up`: a whole cluster on this machine, in the foreground.
//!
//! Starts the manager, N storage daemons (one sparse-file disk each under
//! DIR) and one gateway, each waiting for the child's `READY ...` line;
//! creates the requested volumes; prints `<name> pid=... <addr>` lines,
//! `ready` and how to connect; then supervises: a child that exits is
//! restarted with the same arguments (and the same addresses, so clients
//! and the map keep working) after a backoff. SIGINT/SIGTERM stop every
//! child (SIGTERM, then SIGKILL after 10 s). Children get PR_SET_PDEATHSIG,
//! so even a SIGKILLed `tessera up` leaves nothing running.

use crate::cli::Client;
use crate::sys;
use clap::Args;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tessera_wire::api::{CreateVolumeRequest, NodeInfo, parse_size};

/// Longest wait for a child's READY line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Set once SIGINT/SIGTERM was collected while a child was starting: the
/// start-up error it causes is a requested stop, not a failure.
static STOPPING: AtomicBool = AtomicBool::new(false);

#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    /// Directory for the manager's store, the disk files and the logs.
    #[arg(long, default_value = "./tessera-data")]
    pub dir: PathBuf,
    /// Storage daemons to start (one disk each).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub storage_daemons: u32,
    /// Size of each storage daemon's sparse disk file.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    pub disk_size: u64,
    /// NBD listen address of the gateway.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub nbd_listen: String,
    /// iSCSI portal addresses of the gateway (repeatable: each is a portal
    /// of the same targets, e.g. 127.0.0.1:3260 and 127.0.0.2:3260 for two
    /// paths; "none" disables iSCSI).
    #[arg(long = "iscsi-listen", default_value = "127.0.0.1:3260")]
    pub iscsi_listen: Vec<String>,
    /// Manager REST API listen address.
    #[arg(long, default_value = "127.0.0.1:9400")]
    pub manager_listen: String,
    /// Volumes to create if missing, NAME:SIZE (repeatable; default demo:1G).
    #[arg(long = "volume", value_parser = parse_volume)]
    pub volumes: Vec<(String, u64)>,
    /// Copies of each chunk in the default pool (used when the cluster is
    /// created; each storage daemon is its own failure domain).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub replicas: u32,
    /// Writes continue while this many copies are reachable (default: a
    /// majority of --replicas).
    #[arg(long)]
    pub min_replicas: Option<u32>,
    /// A storage daemon without heartbeats for this long is declared down
    /// and its placement groups fail over.
    #[arg(long, default_value_t = 2000)]
    pub heartbeat_grace_ms: u64,
    /// Run the gateway inside storage-0 instead of as its own process (NBD
    /// on --nbd-listen, iSCSI on --iscsi-listen): requests for storage-0's
    /// chunks skip the gateway-to-storage TCP hop (docs/nbd.md).
    #[arg(long)]
    pub embedded_gateway: bool,
    /// Each storage daemon scrubs the placement groups it leads this often
    /// (30s, 10m, 24h, 7d or off; `tessera pg scrub` scrubs now).
    #[arg(long, default_value = "24h")]
    pub scrub_interval: String,
    /// Bytes of each copy a scrub reads per second, at most.
    #[arg(long, default_value = "16M")]
    pub scrub_rate: String,
    /// A storage daemon's disk down for longer than this (e.g. 10m, 3s,
    /// 500ms) is taken out: its placement groups are re-placed on the other
    /// disks and backfilled there.
    #[arg(long, default_value = "10m", value_parser = tessera_wire::api::parse_duration)]
    pub down_out_after: Duration,
    /// Disks are taken out only while at least this fraction of all disks
    /// stays in (0 to 1; the manager's default is 0.75).
    #[arg(long, value_parser = crate::health::parse_ratio)]
    pub min_in_ratio: Option<f64>,
    /// Recovery pushes (64 KiB regions) each storage daemon keeps in flight
    /// at most, over all the groups it leads: the backfill throttle.
    #[arg(long)]
    pub recovery_pushes_max: Option<u32>,
    /// Recovery bytes per second each storage daemon pushes at most
    /// (e.g. 200M; 0 = unlimited).
    #[arg(long, value_parser = parse_size)]
    pub recovery_bytes_per_sec: Option<u64>,
    /// Adaptive backfill throttle of every storage daemon: keep client
    /// writes' p90 latency during a rebuild under this multiple of their
    /// p90 without it (e.g. 3; 0 or off: no adaptation, the default).
    #[arg(long, value_parser = parse_latency_factor)]
    pub recovery_latency_factor: Option<String>,
    /// Bytes one recovery push carries at most (64K to 1M, whole 64K
    /// regions); passed to every storage daemon.
    #[arg(long)]
    pub recovery_push_size: Option<String>,
    /// Whether storage daemons rewrite a read's scattered blocks
    /// contiguously (on, the default, or off); passed to every storage
    /// daemon.
    #[arg(long, value_parser = ["on", "off"])]
    pub relocate_reads: Option<String>,
    /// Microseconds the storage daemons' and the gateway's event loops
    /// keep polling after work before they sleep (0: sleep at once);
    /// passed to each.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub busy_poll_us: Option<u32>,
}

/// `--busy-poll-us N` for a child, when given.
fn busy_poll(a: &UpArgs) -> impl Iterator<Item = OsString> {
    a.busy_poll_us
        .into_iter()
        .flat_map(|n| [OsString::from("--busy-poll-us"), n.to_string().into()])
}

pub fn parse_volume(s: &str) -> Result<(String, u64), String> {
    let (name, size) = s
        .split_once(':')
        .ok_or_else(|| format!("bad volume {s:?}: expected NAME:SIZE, e.g. demo:1G"))?;
    if name.is_empty() {
        return Err(format!("bad volume {s:?}: empty name"));
    }
    Ok((name.to_string(), parse_size(size)?))
}

/// `key=value` from a `READY ...` line.
pub fn ready_field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
}

struct Proc {
    name: String,
    bin: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
    child: Option<Child>,
    /// Flags whose value is replaced by the address from the first READY
    /// line (flag, READY key), so a restart keeps the same address.
    pin: Vec<(&'static str, &'static str)>,
    restart_at: Option<Instant>,
    backoff: Duration,
    ready: String,
}

impl Proc {
    /// Start the child and wait for its READY line.
    fn start(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("cannot open log {}: {e}", self.log.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        sys::die_with_parent(&mut cmd);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.bin.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("READY") {
                    let _ = tx.send(line);
                }
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        let line = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) => break l,
                Err(_) => {
                    // Ctrl-C while a child starts: stop now, not after the
                    // READY deadline.
                    if sys::wait_termination(Some(Duration::ZERO)) {
                        STOPPING.store(true, Ordering::Relaxed);
                        sys::kill(child.id(), libc::SIGKILL);
                        let _ = child.wait();
                        return Err(format!("interrupted while starting {}", self.name));
                    }
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(format!(
                            "{} exited before it was ready ({status}); last log lines:\n{}",
                            self.name,
                            tail(&self.log, 10)
                        ));
                    }
                    if Instant::now() > deadline {
                        sys::kill(child.id(), libc::SIGKILL);
                        let _ = child.wait();
                        return Err(format!(
                            "{} was not ready after {}s; last log lines:\n{}",
                            self.name,
                            READY_TIMEOUT.as_secs(),
                            tail(&self.log, 10)
                        ));
                    }
                }
            }
        };
        for (flag, key) in &self.pin {
            // A repeated flag gets the comma-separated values in order.
            if let Some(v) = ready_field(&line, key).filter(|v| v != "none") {
                let at: Vec<usize> = (0..self.args.len())
                    .filter(|i| self.args[*i] == *flag)
                    .collect();
                for (i, val) in at.into_iter().zip(v.split(',')) {
                    self.args[i + 1] = val.into();
                }
            }
        }
        self.ready = line;
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn sibling(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
    let p = exe.with_file_name(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "{} not found next to {} (build all binaries: cargo build --release --workspace --bins)",
            name,
            exe.display()
        ))
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub fn run(mut a: UpArgs) -> Result<(), String> {
    // Before any thread exists, so every thread inherits the mask and the
    // signals queue for `sys::wait_termination` instead of killing us.
    sys::block_termination_signals();
    if a.volumes.is_empty() {
        a.volumes.push(("demo".into(), 1 << 30));
    }
    let dir = &a.dir;
    std::fs::create_dir_all(dir.join("logs"))
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", dir.display()))?;
    let mut procs: Vec<Proc> = Vec::new();
    let result = start_all(&a, &dir, &mut procs);
    if let Err(e) = result {
        stop_all(&mut procs);
        if STOPPING.load(Ordering::Relaxed) {
            return Ok(());
        }
        return Err(e);
    }
    supervise(&mut procs);
    stop_all(&mut procs);
    Ok(())
}

fn start_all(a: &UpArgs, dir: &Path, procs: &mut Vec<Proc>) -> Result<(), String> {
    let logs = dir.join("logs");
    let mut manager = Proc {
        name: "manager".into(),
        bin: sibling("tessera-manager")?,
        args: vec![
            "--listen".into(),
            a.manager_listen.clone().into(),
            "--data-dir".into(),
            dir.join("manager").into(),
            "--replicas".into(),
            a.replicas.to_string().into(),
            "--heartbeat-grace-ms".into(),
            a.heartbeat_grace_ms.to_string().into(),
            "--down-out-after".into(),
            format!("{}ms", a.down_out_after.as_millis()).into(),
        ]
        .into_iter()
        .chain(
            a.min_in_ratio
                .map(|r| ["--min-in-ratio".into(), r.to_string().into()])
                .into_iter()
                .flatten(),
        )
        .chain(
            a.min_replicas
                .map(|m| ["--min-replicas".into(), m.to_string().into()])
                .into_iter()
                .flatten(),
        )
        .collect(),
        log: logs.join("manager.log"),
        child: None,
        pin: vec![("--listen", "listen")],
        restart_at: None,
        backoff: BACKOFF_MIN,
        ready: String::new(),
    };
    manager.start()?;
    let maddr = ready_field(&manager.ready, "listen").ok_or("manager printed no address")?;
    let murl = format!("http://{maddr}");
    say(&format!("manager pid={} listen={maddr}", manager.pid()));
    procs.push(manager);

    let mut embedded: Option<(u32, String, String)> = None;
    for i in 0..a.storage_daemons {
        let disk = dir.join(format!("storage-{i}")).join("disk0.img");
        let gateway_here = a.embedded_gateway && i == 0;
        let mut p = Proc {
            name: format!("storage-{i}"),
            bin: sibling("tessera-storage")?,
            args: vec![
                "--manager".into(),
                murl.clone().into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--disk".into(),
                format!("{},size={}", disk.display(), a.disk_size).into(),
                "--metrics-listen".into(),
                "127.0.0.1:0".into(),
            ]
            .into_iter()
            .chain(a.recovery_pushes_max.into_iter().flat_map(|n| {
                [
                    OsString::from("--recovery-pushes-max"),
                    n.to_string().into(),
                ]
            }))
            .chain(a.recovery_bytes_per_sec.into_iter().flat_map(|n| {
                [
                    OsString::from("--recovery-bytes-per-sec"),
                    n.to_string().into(),
                ]
            }))
            .chain(a.recovery_latency_factor.iter().flat_map(|f| {
                [
                    OsString::from("--recovery-latency-factor"),
                    OsString::from(f),
                ]
            }))
            .chain(
                a.recovery_push_size
                    .iter()
                    .flat_map(|s| [OsString::from("--recovery-push-size"), s.into()]),
            )
            .chain(
                a.relocate_reads
                    .iter()
                    .flat_map(|s| [OsString::from("--relocate-reads"), s.into()]),
            )
            .chain(busy_poll(a))
            .collect(),
            log: logs.join(format!("storage-{i}.log")),
            child: None,
            pin: vec![
                ("--listen", "listen"),
                ("--metrics-listen", "metrics"),
                ("--nbd-listen", "nbd"),
                ("--iscsi-listen", "iscsi"),
            ],
            restart_at: None,
            backoff: BACKOFF_MIN,
            ready: String::new(),
        };
        if gateway_here {
            p.args.push("--nbd-listen".into());
            p.args.push(a.nbd_listen.clone().into());
            for l in a.iscsi_listen.iter().filter(|l| l.as_str() != "none") {
                p.args.push("--iscsi-listen".into());
                p.args.push(l.into());
            }
            p.args.push("--cluster-secret-file".into());
            p.args.push(
                dir.join("manager")
                    .join(crate::secret::FILE_NAME)
                    .into_os_string(),
            );
        }
        p.start()?;
        if gateway_here {
            embedded = Some((
                p.pid(),
                ready_field(&p.ready, "nbd").unwrap_or_default(),
                ready_field(&p.ready, "iscsi").unwrap_or_else(|| "none".into()),
            ));
        }
        say(&format!(
            "storage-{i} pid={} listen={}",
            p.pid(),
            ready_field(&p.ready, "listen").unwrap_or_default()
        ));
        procs.push(p);
    }

    let client = Client::new(&murl);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let nodes: Vec<NodeInfo> = client.get("/v1/nodes").map_err(|e| e.message)?;
        if nodes.iter().filter(|n| n.up).count() >= a.storage_daemons as usize {
            break;
        }
        if Instant::now() > deadline {
            return Err("storage daemons did not all come up in time".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (name, size) in &a.volumes {
        let r: Result<serde_json::Value, _> = client.post(
            "/v1/volumes",
            serde_json::to_value(CreateVolumeRequest {
                name: name.clone(),
                size_bytes: *size,
                block_size: None,
                pool: None,
            })
            .expect("json"),
        );
        match r {
            Ok(_) => {}
            // Created meanwhile by someone else counts as existing too.
            Err(e) if e.status == Some(409) => {
                say(&format!("volume {name} exists; keeping it as it is"));
            }
            Err(e) => return Err(format!("cannot create volume {name}: {}", e.message)),
        }
    }

    let (nbd, iscsi) = if let Some((pid, nbd, iscsi)) = embedded {
        // The gateway is storage-0's embedded one (restarted with it). It
        // started before the volumes existed and learns of them from its
        // next map poll: "ready" waits until it lists them.
        let names: Vec<String> = a.volumes.iter().map(|(n, _)| n.clone()).collect();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match nbd_list(&nbd) {
                Ok(listed) if names.iter().all(|n| listed.contains(n)) => break,
                r if Instant::now() > deadline => {
                    return Err(format!(
                        "the embedded gateway on {nbd} does not list the volumes: {r:?}"
                    ));
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        say(&format!(
            "gateway pid={pid} nbd={nbd} iscsi={iscsi} embedded=storage-0"
        ));
        (nbd, iscsi)
    } else {
        let mut gw = Proc {
            name: "gateway".into(),
            bin: sibling("tessera-gateway")?,
            args: vec![
                "--manager".into(),
                murl.clone().into(),
                "--nbd-listen".into(),
                a.nbd_listen.clone().into(),
                "--metrics-listen".into(),
                "127.0.0.1:0".into(),
                // The manager created it in its data directory; the gateway
                // needs it to read iSCSI access control.
                "--cluster-secret-file".into(),
                dir.join("manager")
                    .join(crate::secret::FILE_NAME)
                    .into_os_string(),
            ]
            .into_iter()
            .chain(
                a.iscsi_listen
                    .iter()
                    .flat_map(|l| [OsString::from("--iscsi-listen"), l.into()]),
            )
            .chain(busy_poll(a))
            .collect(),
            log: logs.join("gateway.log"),
            child: None,
            pin: vec![
                ("--nbd-listen", "nbd"),
                ("--metrics-listen", "metrics"),
                ("--iscsi-listen", "iscsi"),
            ],
            restart_at: None,
            backoff: BACKOFF_MIN,
            ready: String::new(),
        };
        gw.start()?;
        let nbd = ready_field(&gw.ready, "nbd").unwrap_or_default();
        let iscsi = ready_field(&gw.ready, "iscsi").unwrap_or_else(|| "none".into());
        say(&format!("gateway pid={} nbd={nbd} iscsi={iscsi}", gw.pid()));
        procs.push(gw);
        (nbd, iscsi)
    };
    say("ready");
    for (name, _) in &a.volumes {
        say(&format!("  nbdinfo nbd://{nbd}/{name}"));
    }
    let first = &a.volumes[0].0;
    say(&format!("  qemu-img info nbd://{nbd}/{first}"));
    if let Some(portal) = iscsi.split(',').next().filter(|p| *p != "none") {
        say(&format!("  iscsi-ls -s iscsi://{portal}"));
        say(&format!(
            "  iscsi-inq iscsi://{portal}/iqn.2026-11.io.tessera:{first}/0"
        ));
    }
    say(&format!(
        "  fio --name=t --ioengine=nbd --uri=nbd://{nbd}/{first} --rw=randwrite --bs=4k --size=256m"
    ));
    say(&format!("  tessera --manager {murl} volume list"));
    say(&format!(
        "logs in {}; Ctrl-C stops the cluster",
        logs.display()
    ));
    Ok(())
}

fn supervise(procs: &mut [Proc]) {
    loop {
        if STOPPING.load(Ordering::Relaxed)
            || sys::wait_termination(Some(Duration::from_millis(100)))
        {
            return;
        }
        for p in procs.iter_mut() {
            if let Some(child) = p.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                say(&format!("exited {} pid={} ({status})", p.name, child.id()));
                p.child = None;
                p.restart_at = Some(Instant::now() + p.backoff);
            }
            if p.child.is_none()
                && let Some(at) = p.restart_at
                && Instant::now() >= at
            {
                match p.start() {
                    Ok(()) => {
                        p.restart_at = None;
                        say(&format!("restarted {} pid={}", p.name, p.pid()));
                        // A child that stays up earns a fast restart next time.
                        p.backoff = BACKOFF_MIN;
                    }
                    Err(e) => {
                        eprintln!("tessera up: restarting {} failed: {e}", p.name);
                        p.backoff = (p.backoff * 2).min(BACKOFF_MAX);
                        p.restart_at = Some(Instant::now() + p.backoff);
                    }
                }
            }
        }
    }
}

/// Stop children in reverse start order (gateway first, manager last).
fn stop_all(procs: &mut [Proc]) {
    for p in procs.iter().rev() {
        if let Some(c) = &p.child {
            sys::kill(c.id(), libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    for p in procs.iter_mut().rev() {
        if let Some(mut c) = p.child.take() {
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    sys::kill(c.id(), libc::SIGKILL);
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// `--recovery-latency-factor`, checked here so a mistake is one line
/// before anything starts (the storage daemons parse it again).
fn parse_latency_factor(s: &str) -> Result<String, String> {
    match s {
        "off" => Ok(s.into()),
        _ => match s.parse::<f64>() {
            Ok(f) if f == 0.0 || (f.is_finite() && f >= 1.0) => Ok(s.into()),
            _ => Err(format!("'{s}' is not 0, off or a number of at least 1")),
        },
    }
}

/// The export names an NBD server lists (fixed newstyle, NBD_OPT_LIST, then
/// NBD_OPT_ABORT; NetworkBlockDevice/nbd doc/proto.md).
fn nbd_list(addr: &str) -> Result<Vec<String>, String> {
    use std::io::{Read, Write};
    const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    const OPT_ABORT: u32 = 2;
    const OPT_LIST: u32 = 3;
    const REP_ACK: u32 = 1;
    const REP_SERVER: u32 = 2;
    let e = |e: std::io::Error| e.to_string();
    let mut s = std::net::TcpStream::connect(addr).map_err(e)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(e)?;
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).map_err(e)?;
    // Client flags: FIXED_NEWSTYLE | NO_ZEROES.
    let mut out = 3u32.to_be_bytes().to_vec();
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&OPT_LIST.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    s.write_all(&out).map_err(e)?;
    let mut names = Vec::new();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).map_err(e)?;
        let magic = u64::from_be_bytes(h[0..8].try_into().expect("8 bytes"));
        let kind = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes")) as usize;
        if magic != REPLY_MAGIC || len > 1 << 16 {
            return Err("not an NBD option reply".into());
        }
        let mut data = vec![0u8; len];
        s.read_exact(&mut data).map_err(e)?;
        match kind {
            REP_SERVER if len >= 4 => {
                let n = (u32::from_be_bytes(data[0..4].try_into().expect("4 bytes")) as usize)
                    .min(len - 4);
                names.push(String::from_utf8_lossy(&data[4..4 + n]).into_owned());
            }
            REP_ACK => break,
            _ => return Err(format!("NBD_OPT_LIST answered with reply type {kind}")),
        }
    }
    let mut abort = IHAVEOPT.to_be_bytes().to_vec();
    abort.extend_from_slice(&OPT_ABORT.to_be_bytes());
    abort.extend_from_slice(&0u32.to_be_bytes());
    let _ = s.write_all(&abort);
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves --volume parsing and READY-line parsing.
    #[test]
    fn parsing() {
        assert_eq!(parse_volume("demo:1G"), Ok(("demo".into(), 1 << 30)));
        assert!(parse_volume("demo").is_err());
        assert!(parse_volume(":1G").is_err());
        assert!(parse_volume("x:big").is_err());
        let l = "READY listen=127.0.0.1:5 node_id=3 metrics=none";
        assert_eq!(ready_field(l, "listen").as_deref(), Some("127.0.0.1:5"));
        assert_eq!(ready_field(l, "node_id").as_deref(), Some("3"));
        assert_eq!(ready_field(l, "nope"), None);
    }
}
