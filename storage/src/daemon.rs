//! The storage daemon: disks on their engine threads, the internal-protocol
//! server, the manager client (registration, heartbeats, map) and metrics.
//!
//! Threads: one thread runs a single-threaded tokio runtime with the
//! network server and one engine task per disk (each owns its disk's
//! io_uring, whose fd sleeps in the same epoll as the sockets); small std
//! threads run the manager client and metrics.
//!
//! Every field of every request is validated here, at the edge, before the
//! engine sees it: header (by `Header::decode`), epoch, disk, volume, chunk
//! bounds, placement ownership and payload CRC.

use crate::engine::{self, ChunkKey, Completion, Engine, EngineError, Reply, Request};
use crate::io::{self, Disk, Payload, ReadData, Wait};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use slab::Slab;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tessera_gateway::frameio::{Gather, read_payload};
use tessera_wire::api::{
    DiskRegistration, DiskUsage, HeartbeatRequest, HeartbeatResponse, RegisterRequest,
    RegisterResponse, ScrubReport, VolumeUsage,
};
use tessera_wire::header::{HEADER_SIZE, PAYLOAD_MAX_BYTES, open_payload};
use tessera_wire::map::{CHUNK_SIZE_DEFAULT_BYTES, ClusterMap};
use tessera_wire::{Flags, Header, Op, Status};
use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc as tmpsc, watch};

/// Requests one connection may have in flight; the reader stops reading
/// the socket above it (backpressure).
pub const INFLIGHT_PER_CONNECTION_MAX: usize = 512;
/// Connections the daemon serves at once.
pub const CONNECTIONS_MAX: usize = 1024;
/// Buffer of each direction of the embedded gateway's in-memory stream
/// (like a socket buffer: a few large requests).
const LOCAL_STREAM_BYTES: usize = 1 << 20;
/// Heartbeats are frequent so that the manager's grace (default 2 s,
/// counted from the last heartbeat it received) is what decides how soon a
/// dead daemon is declared down: detection comes between grace minus this
/// interval and the grace.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);
/// How long the manager may hold one map long poll (`GET /v1/map?after=`)
/// before answering with an unchanged map.
const MAP_LONG_POLL_WAIT: Duration = Duration::from_millis(10_000);
/// Pause after a failed map fetch (manager down or restarting), cut short
/// by a refresh request.
const MAP_RETRY_INTERVAL: Duration = Duration::from_millis(200);
const STATS_INTERVAL: Duration = Duration::from_millis(200);

/// Exit codes, relied on by the systemd units (`RestartPreventExitStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum ExitCode {
    Ok = 0,
    /// Bad flags or configuration: restarting will not help.
    Config = 2,
    /// The environment refused: disk missing or foreign, port taken,
    /// io_uring unavailable, manager unreachable at start.
    Environment = 3,
}

#[derive(Debug)]
pub struct Fatal {
    pub code: ExitCode,
    pub message: String,
}

impl Fatal {
    fn env(message: impl Into<String>) -> Fatal {
        Fatal {
            code: ExitCode::Environment,
            message: message.into(),
        }
    }
    pub fn config(message: impl Into<String>) -> Fatal {
        Fatal {
            code: ExitCode::Config,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    Uring,
    Sync,
}

#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub create_size: Option<u64>,
}

impl DiskSpec {
    /// Parse `PATH[,size=SIZE]`.
    pub fn parse(s: &str) -> Result<DiskSpec, String> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or("empty disk path")?;
        let mut create_size = None;
        for opt in parts {
            match opt.split_once('=') {
                Some(("size", v)) => create_size = Some(tessera_wire::api::parse_size(v)?),
                _ => return Err(format!("unknown disk option {opt:?} (expected size=SIZE)")),
            }
        }
        Ok(DiskSpec {
            path: PathBuf::from(path),
            create_size,
        })
    }
}

/// The daemon's configuration, validated and logged at start.
#[derive(Debug, Clone)]
pub struct Config {
    pub manager: String,
    pub listen: SocketAddr,
    /// Address registered with the manager (defaults to the bound address).
    pub advertise: Option<String>,
    pub disks: Vec<DiskSpec>,
    pub metrics_listen: Option<SocketAddr>,
    /// Serve NBD here with an embedded gateway (`tessera_gateway::embedded`).
    pub nbd_listen: Option<SocketAddr>,
    /// iSCSI portals of the embedded gateway.
    pub iscsi_listen: Vec<SocketAddr>,
    /// The cluster secret (first line of the file): the embedded gateway
    /// needs it to read iSCSI access control and store reservations.
    pub cluster_secret_file: Option<PathBuf>,
    pub engine: EngineKind,
    pub host: String,
    pub zone: String,
    pub rack: String,
    /// Scrub every group this daemon leads this often (`None`: only when
    /// asked through the manager).
    pub scrub_interval: Option<Duration>,
    /// Bytes of each copy a scrub reads per second, at most.
    pub scrub_rate_bytes: u64,
    /// Recovery pushes in flight at most over all led groups, in 64 KiB
    /// regions.
    pub recovery_pushes_max: usize,
    /// Bytes one recovery push carries at most (a multiple of 64 KiB, 64 KiB
    /// to 1 MiB).
    pub recovery_push_bytes: u32,
    /// Recovery bytes per second at most (0: no byte limit).
    pub recovery_bytes_per_sec: u64,
    /// Adaptive recovery throttle: while this daemon's led groups recover,
    /// keep its client writes' p90 latency under this multiple of their p90
    /// without recovery (0: off). See `Driver::adapt_rate`.
    pub recovery_latency_factor: f64,
    /// Rewrite scattered reads contiguously (`Engine::set_relocation`).
    pub relocate_reads: bool,
    /// How long the event loop polls after work before it sleeps.
    pub busy_poll: Duration,
}

/// One decision of the adaptive recovery throttle (`Driver::adapt_rate`):
/// the next rate from the current one (None: recovery just began), the
/// window's p90 client write latency (None: too few writes to judge), the
/// baseline p90 and the factor allowed over it.
fn adapt_step(rate: Option<u64>, p90: Option<f64>, base: f64, factor: f64, ceiling: u64) -> u64 {
    let r = rate.unwrap_or(ADAPT_START.min(ceiling));
    match p90 {
        Some(p) if p > factor * base => ((r as f64 * 0.6) as u64).max(ADAPT_FLOOR.min(ceiling)),
        _ => ((r as f64 * 1.25) as u64 + ADAPT_STEP).min(ceiling),
    }
}

/// Parse `--recovery-latency-factor`: `0` or `off` (no adaptation), or a
/// multiple of at least 1.
pub fn parse_latency_factor(s: &str) -> Result<f64, String> {
    if s == "off" {
        return Ok(0.0);
    }
    match s.parse::<f64>() {
        Ok(f) if f == 0.0 || (f.is_finite() && f >= 1.0) => Ok(f),
        _ => Err(format!("'{s}' is not 0, off or a number of at least 1")),
    }
}

/// Parse a duration: `0` or `off` (none), or a number with `s`, `m`, `h` or
/// `d`.
pub fn parse_interval(s: &str) -> Result<Option<Duration>, String> {
    if s == "0" || s == "off" {
        return Ok(None);
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad interval {s:?}: expected e.g. 30s, 10m, 24h, 7d or off"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("bad interval unit in {s:?} (s, m, h or d)")),
    };
    if secs == 0 {
        return Ok(None);
    }
    Ok(Some(Duration::from_secs(secs)))
}

/// Default of `--recovery-pushes-max`: 64 KiB regions in flight over all
/// the groups a daemon leads (1 MiB), enough to keep a rebuild at disk
/// speed on the machines measured without starving client I/O.
pub const RECOVERY_PUSHES_DEFAULT: u32 = 16;
/// Largest `--recovery-pushes-max`.
pub const RECOVERY_PUSHES_MAX: u32 = 1024;
/// Default of `--recovery-push-size` (256 KiB): on the disk measured
/// (docs/replication.md, "Failure benchmark"), rebuilds ran as fast with
/// 64 KiB or 256 KiB pushes and 12 % slower with 1 MiB ones, and a disk
/// serving one large request makes small client writes wait behind it
/// (their p99 beside 150 MB/s of reads and writes: 0.5 ms with 64 KiB
/// requests, 1.3 ms with 256 KiB, 3.3 ms with 1 MiB).
pub const RECOVERY_PUSH_BYTES_DEFAULT: u32 = 4 * repl::REGION_BYTES;

/// Parse `--recovery-push-size`: a size from 64 KiB to 1 MiB, in whole
/// 64 KiB regions.
pub fn parse_push_size(s: &str) -> Result<u32, String> {
    let n = tessera_wire::api::parse_size(s)?;
    let region = u64::from(repl::REGION_BYTES);
    let most = region * u64::from(repl::PUSH_REGIONS_MAX);
    if n < region || n > most || n % region != 0 {
        return Err(format!(
            "recovery push size {s:?}: a multiple of 64K from 64K to {}K",
            most / 1024
        ));
    }
    Ok(n as u32)
}

// ---- engine tasks --------------------------------------------------------

/// Where a completion goes: back to a connection, or nowhere (internal
/// requests such as dropping a deleted volume).
enum Route {
    Net {
        header: Header,
        tx: tmpsc::UnboundedSender<Outgoing>,
        permit: tokio::sync::OwnedSemaphorePermit,
        started: Instant,
        /// A read of a replicated group: a checksum error goes to the
        /// replication driver for a read repair instead of to the client.
        repair: Option<RepairRoute>,
    },
    Internal,
    /// A step of a request run by a task of its own (a single-copy COMPARE
    /// AND WRITE): the result goes back to it.
    Task(tokio::sync::oneshot::Sender<Result<Reply, EngineError>>),
    /// A request of the replication driver: the completion goes back to it.
    Repl {
        token: u64,
        kind: ReplKind,
        tx: ReplTx,
    },
}

/// Where a read's checksum error goes for repair.
struct RepairRoute {
    pg: u32,
    /// Reads of this request so far (each failed one is repaired once).
    attempt: u32,
    tx: ReplTx,
}

/// Reads of one request that may find a checksum error and be repaired:
/// a copy corrupted again between the repair and the read again is
/// repaired again, but not forever.
const READ_REPAIR_ATTEMPTS_MAX: u32 = 3;

// Nearly every message is a request: boxing it to shrink the one-off
// `Shutdown` would cost an allocation per I/O.
#[allow(clippy::large_enum_variant)]
enum EngineMsg {
    Request(Request, Route),
    Shutdown,
}

struct Outgoing {
    header: Header,
    /// Read replies carry the engine's disk buffer as is.
    data: ReadData,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Requests waiting for a disk's engine task. Senders are connection tasks
/// on the same thread (the common case, where notifying is a queue push)
/// and the map follower thread.
struct EngineQueue {
    msgs: Mutex<std::collections::VecDeque<EngineMsg>>,
    notify: tokio::sync::Notify,
}

struct DiskHandle {
    queue: Arc<EngineQueue>,
    stats: Arc<Mutex<engine::Stats>>,
    uuid: String,
    path: String,
    capacity_bytes: u64,
    chunk_bytes: u64,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Single-copy COMPARE AND WRITEs by token (see `compare_and_write`).
    cas: Mutex<CasTokens>,
    /// The group-log entries the disk kept from the last process, taken
    /// by the replication driver when it starts (`Replicator::recover_log`).
    recovered_log: Mutex<Vec<engine::LogEntry>>,
    /// The groups' log trim points and floors, taken with `recovered_log`
    /// (`Replicator::recover_log_state`).
    recovered_states: Mutex<Vec<engine::GroupLogState>>,
}

impl DiskHandle {
    fn send(&self, msg: EngineMsg) {
        self.queue.msgs.lock().expect("engine queue").push_back(msg);
        self.queue.notify.notify_one();
    }
}

fn open_disk(spec: &DiskSpec, kind: EngineKind) -> Result<Box<dyn Disk>, Fatal> {
    let (file, size) = io::open_direct(&spec.path, spec.create_size)
        .map_err(|e| Fatal::env(format!("cannot open disk {}: {e}", spec.path.display())))?;
    let disk: Box<dyn Disk> = match kind {
        EngineKind::Uring => {
            Box::new(io::uring::UringDisk::new(file, size).map_err(|e| Fatal::env(e.to_string()))?)
        }
        EngineKind::Sync => Box::new(io::sync::SyncDisk::new(file, size)),
    };
    Ok(disk)
}

impl Disk for Box<dyn Disk> {
    fn size_bytes(&self) -> u64 {
        (**self).size_bytes()
    }
    fn submit(&mut self, op: io::IoOp) -> Result<(), io::IoOp> {
        (**self).submit(op)
    }
    fn reap(&mut self, out: &mut Vec<io::IoDone>, wait: Wait) {
        (**self).reap(out, wait)
    }
    fn inflight(&self) -> usize {
        (**self).inflight()
    }
    fn inflight_max(&self) -> usize {
        (**self).inflight_max()
    }
    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        (**self).completion_fd()
    }
    fn read_buffer(&self, len: usize) -> io::AlignedBuf {
        (**self).read_buffer(len)
    }
}

/// Open (formatting when blank) one disk's engine.
fn open_engine(
    spec: &DiskSpec,
    kind: EngineKind,
    cluster_id: &str,
) -> Result<Engine<Box<dyn Disk>>, Fatal> {
    let mut disk = open_disk(spec, kind)?;
    let shown = spec.path.display();
    match Engine::probe(&mut disk) {
        Ok(sb) => {
            if sb.cluster_id != cluster_id {
                return Err(Fatal::env(format!(
                    "disk {shown} belongs to cluster {} but the manager runs cluster {cluster_id}; refusing to touch it",
                    sb.cluster_id
                )));
            }
            Engine::open(disk).map_err(|e| Fatal::env(format!("cannot recover disk {shown}: {e}")))
        }
        Err(engine::OpenError::Format(engine::format::FormatError::Blank)) => {
            let uuid = *uuid::Uuid::new_v4().as_bytes();
            let format_id =
                u64::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..8].try_into().expect("8"));
            tracing::info!(disk = %shown, "blank disk: formatting");
            Engine::format(disk, cluster_id, CHUNK_SIZE_DEFAULT_BYTES, uuid, format_id)
                .map_err(|e| Fatal::env(format!("cannot format disk {shown}: {e}")))
        }
        Err(e) => Err(Fatal::env(format!(
            "disk {shown} is not a usable Tessera disk ({e}); refusing to format over it"
        ))),
    }
}

/// Start a disk's engine as a task on `rt`. The engine shares the network
/// thread: a request goes from the socket to the io_uring and its reply
/// back to the socket without crossing threads, which on a small machine
/// is most of the cost of an I/O (measured in docs/ARCHITECTURE.md).
fn spawn_engine(
    rt: &tokio::runtime::Runtime,
    engine: Engine<Box<dyn Disk>>,
    spec: &DiskSpec,
    metrics: Metrics,
) -> DiskHandle {
    let queue = Arc::new(EngineQueue {
        msgs: Mutex::new(std::collections::VecDeque::new()),
        notify: tokio::sync::Notify::new(),
    });
    let stats = Arc::new(Mutex::new(engine.stats()));
    let sb = engine.superblock().clone();
    let recovered_log = engine.group_log();
    let recovered_states = engine.group_log_states();
    // Tokens of COMPARE AND WRITEs the last process wrote: a resend is
    // answered from them, not compared against its own write.
    let cas = CasTokens {
        done: engine.cas_tokens().into(),
        running: HashMap::new(),
    };
    let capacity_bytes = sb.data_blocks * engine::format::BLOCK_BYTES as u64;
    let task = {
        let (queue, stats) = (queue.clone(), stats.clone());
        let _guard = rt.enter();
        tokio::spawn(engine_task(engine, queue, stats, metrics))
    };
    DiskHandle {
        cas: Mutex::new(cas),
        recovered_log: Mutex::new(recovered_log),
        recovered_states: Mutex::new(recovered_states),
        queue,
        stats,
        uuid: sb.uuid_string(),
        path: spec.path.display().to_string(),
        capacity_bytes,
        chunk_bytes: sb.chunk_bytes,
        task: Mutex::new(Some(task)),
    }
}

/// One disk's event loop: take queued requests, drive the engine until it
/// makes no more progress, deliver completions, then sleep until a request
/// is queued or the io_uring has completions.
async fn engine_task(
    mut engine: Engine<Box<dyn Disk>>,
    queue: Arc<EngineQueue>,
    stats: Arc<Mutex<engine::Stats>>,
    metrics: Metrics,
) {
    let ring = engine.completion_fd().map(|fd| {
        io::readiness::CompletionReady::new(fd).expect("register the io_uring fd with the reactor")
    });
    let mut routes: Slab<Route> = Slab::with_capacity(engine::OPS_MAX);
    let mut done: Vec<Completion> = Vec::new();
    let mut batch = std::collections::VecDeque::new();
    let mut last_stats = Instant::now();
    let mut dirty = false;
    loop {
        std::mem::swap(&mut batch, &mut *queue.msgs.lock().expect("engine queue"));
        let mut shutting = false;
        for msg in batch.drain(..) {
            match msg {
                EngineMsg::Request(req, route) => {
                    let tag = routes.insert(route) as u64;
                    engine.submit(tag, req);
                    dirty = true;
                }
                EngineMsg::Shutdown => shutting = true,
            }
        }
        if shutting {
            engine.drop_holds();
            engine.quiesce();
            engine.take_completions(&mut done);
            deliver(&mut routes, &mut done, &metrics);
            *stats.lock().expect("stats lock") = engine.stats();
            return;
        }
        // Each pass submits what the previous one queued (writes after
        // their read-modify-write reads, journal pages after data); stop
        // when a pass reaps nothing, so nothing is left unsubmitted.
        loop {
            engine.take_completions(&mut done);
            if !done.is_empty() {
                dirty = true;
                deliver(&mut routes, &mut done, &metrics);
            }
            if engine.drive(Wait::No) == 0 {
                engine.take_completions(&mut done);
                if !done.is_empty() {
                    dirty = true;
                    deliver(&mut routes, &mut done, &metrics);
                }
                break;
            }
        }
        let idle = !engine.busy();
        // Publish stats at most every STATS_INTERVAL while busy, and always
        // before going idle, so an idle daemon never reports stale ones.
        if dirty && (idle || last_stats.elapsed() >= STATS_INTERVAL) {
            last_stats = Instant::now();
            dirty = false;
            *stats.lock().expect("stats lock") = engine.stats();
        }
        match &ring {
            Some(ring) if engine.ops_inflight() > 0 || !idle => {
                tokio::select! {
                    _ = queue.notify.notified() => {}
                    r = ring.wait() => r.expect("io_uring fd readiness"),
                }
            }
            Some(_) => queue.notify.notified().await,
            None if !idle => tokio::task::yield_now().await,
            None => queue.notify.notified().await,
        }
    }
}

fn deliver(routes: &mut Slab<Route>, done: &mut Vec<Completion>, metrics: &Metrics) {
    for c in done.drain(..) {
        let route = routes.remove(c.tag as usize);
        let route = match route {
            Route::Repl { token, kind, tx } => {
                let _ = tx.send(ReplIn::Engine {
                    token,
                    kind,
                    result: c.result,
                });
                continue;
            }
            Route::Task(tx) => {
                let _ = tx.send(c.result);
                continue;
            }
            r => r,
        };
        let Route::Net {
            header,
            tx,
            permit,
            started,
            repair,
        } = route
        else {
            continue;
        };
        if let (Err(EngineError::Checksum), Some(r)) = (&c.result, &repair)
            && r.attempt < READ_REPAIR_ATTEMPTS_MAX
        {
            let pending = PendingReply {
                header,
                tx,
                permit,
                started,
            };
            let m = ReplIn::ReadRepair {
                pg: r.pg,
                attempt: r.attempt,
                reply: pending,
            };
            if let Err(tmpsc::error::SendError(ReplIn::ReadRepair { reply, .. })) = r.tx.send(m) {
                // The driver is gone (stopping): answer the error as is.
                let h = reply.header.reply_to(Status::Checksum, 0, 0);
                let _ = reply.tx.send(Outgoing {
                    header: h,
                    data: ReadData::default(),
                    _permit: Some(reply.permit),
                });
            }
            continue;
        }
        let (status, data) = match c.result {
            Ok(Reply::Done) | Ok(Reply::Allocated(_)) => (Status::Ok, ReadData::default()),
            Ok(Reply::Data(d)) => (Status::Ok, d),
            Ok(Reply::Allocation(d)) => (Status::Ok, d.into()),
            Err(e) => (status_of(e), ReadData::default()),
        };
        let op_label = op_name(header.op);
        metrics
            .latency
            .with_label_values(&[op_label])
            .observe(started.elapsed().as_secs_f64());
        if status != Status::Ok {
            metrics
                .errors
                .with_label_values(&[status_name(status)])
                .inc();
        } else if header.op == Op::Read {
            metrics
                .bytes
                .with_label_values(&["read"])
                .inc_by(data.len() as u64);
        }
        let payload_len = if data.is_empty() && status != Status::Ok {
            0
        } else if matches!(header.op, Op::Read | Op::BlockStatus) {
            data.len() as u32 + 4
        } else {
            0
        };
        let mut reply = header.reply_to(status, 0, payload_len);
        reply.chunk_version = c.chunk_version;
        let _ = tx.send(Outgoing {
            header: reply,
            data,
            _permit: Some(permit),
        });
    }
}

/// The one mapping from engine errors to wire status.
fn status_of(e: EngineError) -> Status {
    match e {
        EngineError::Io(_) | EngineError::Failed => Status::Io,
        EngineError::Checksum => Status::Checksum,
        EngineError::Invalid(_) => Status::Invalid,
        EngineError::NoSpace => Status::NoSpace,
        EngineError::Overloaded => Status::Busy,
    }
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Hello => "hello",
        Op::Read => "read",
        Op::Write => "write",
        Op::Flush => "flush",
        Op::Trim => "trim",
        Op::WriteZeroes => "write_zeroes",
        Op::BlockStatus => "block_status",
        Op::Ping => "ping",
        Op::Repl => "repl",
        Op::CompareAndWrite => "compare_and_write",
    }
}

fn status_name(s: Status) -> &'static str {
    match s {
        Status::Ok => "ok",
        Status::Io => "io",
        Status::Checksum => "checksum",
        Status::Invalid => "invalid",
        Status::StaleEpoch => "stale_epoch",
        Status::WrongDisk => "wrong_disk",
        Status::NoSpace => "no_space",
        Status::UnknownVolume => "unknown_volume",
        Status::Busy => "busy",
        Status::BadPayloadCrc => "bad_payload_crc",
        Status::ShuttingDown => "shutting_down",
        Status::Refused => "refused",
        Status::Miscompare => "miscompare",
    }
}

// ---- metrics -------------------------------------------------------------

#[derive(Clone)]
struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    errors: IntCounterVec,
    bytes: IntCounterVec,
    latency: HistogramVec,
    connections: IntGauge,
    checksum_errors: IntGaugeVec,
    relocated: IntGaugeVec,
    log_entries: IntGaugeVec,
    log_recovered: IntGaugeVec,
    capacity: IntGaugeVec,
    used: IntGaugeVec,
    protocol_errors: IntCounter,
    pgs_primary: IntGauge,
    pgs_degraded: IntGauge,
    pgs_recovering: IntGauge,
    pgs_backfilling: IntGauge,
    recovery_bytes: IntCounter,
    peering_bytes: IntCounter,
    reclaimed_bytes: IntCounter,
    settles: IntCounter,
    recoveries: IntCounterVec,
    /// COMPARE AND WRITEs by outcome.
    compare_and_writes: IntCounterVec,
    /// The primary's staged writes by outcome (parallel primary write).
    staged: IntCounterVec,
    pgs_scrubbing: IntGauge,
    repairs: IntCounter,
    repair_bytes: IntCounter,
    unrepairable: IntCounter,
    scrubs: IntCounter,
    /// Rounds of the replication driver's metric publication: a scraper
    /// that sees it advance twice knows the counters include everything
    /// that completed before it started watching.
    publications: IntCounter,
    purged_chunks: IntCounter,
    scrub_regions: IntCounter,
    scrub_errors: IntCounter,
    recovery_remaining: IntGauge,
    recovery_rate: IntGauge,
    /// The adaptive recovery throttle's current limit (0: none).
    recovery_limit: IntGauge,
    recovery_paused: IntGaugeVec,
    recovery_pushes: IntGauge,
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tessera_storage_requests_total",
                "Requests received, by operation",
            ),
            &["op"],
        )
        .expect("metric");
        let errors = IntCounterVec::new(
            Opts::new(
                "tessera_storage_request_errors_total",
                "Requests answered with an error, by status",
            ),
            &["status"],
        )
        .expect("metric");
        let bytes = IntCounterVec::new(
            Opts::new("tessera_storage_bytes_total", "Data bytes read and written"),
            &["direction"],
        )
        .expect("metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "tessera_storage_request_seconds",
                "Request latency inside the daemon",
            )
            .buckets(prometheus::exponential_buckets(10e-6, 2.0, 18).expect("buckets")),
            &["op"],
        )
        .expect("metric");
        let connections = IntGauge::new("tessera_storage_connections", "Open client connections")
            .expect("metric");
        let checksum_errors = IntGaugeVec::new(
            Opts::new(
                "tessera_storage_checksum_errors_total",
                "Blocks that failed their CRC32C check on read",
            ),
            &["disk"],
        )
        .expect("metric");
        let relocated = IntGaugeVec::new(
            Opts::new(
                "tessera_storage_relocated_blocks_total",
                "Blocks of scattered reads rewritten contiguously",
            ),
            &["disk"],
        )
        .expect("metric");
        let log_entries = IntGaugeVec::new(
            Opts::new(
                "tessera_storage_group_log_entries",
                "Group-log entries the disk keeps (changes not yet durable on every member of their group)",
            ),
            &["disk"],
        )
        .expect("metric");
        let log_recovered = IntGaugeVec::new(
            Opts::new(
                "tessera_storage_group_log_recovered_entries",
                "Group-log entries the disk gave back when this process started",
            ),
            &["disk"],
        )
        .expect("metric");
        let capacity = IntGaugeVec::new(
            Opts::new(
                "tessera_storage_disk_capacity_bytes",
                "Data capacity of each disk",
            ),
            &["disk"],
        )
        .expect("metric");
        let used = IntGaugeVec::new(
            Opts::new(
                "tessera_storage_disk_used_bytes",
                "Allocated bytes on each disk",
            ),
            &["disk"],
        )
        .expect("metric");
        let protocol_errors = IntCounter::new(
            "tessera_storage_protocol_errors_total",
            "Connections closed for malformed messages",
        )
        .expect("metric");
        let g = |n: &str, h: &str| IntGauge::new(n, h).expect("metric");
        let pgs_primary = g(
            "tessera_storage_pgs_primary",
            "Replicated placement groups this daemon leads",
        );
        let pgs_degraded = g(
            "tessera_storage_pgs_degraded",
            "Led placement groups with a copy down or outdated",
        );
        let pgs_recovering = g(
            "tessera_storage_pgs_recovering",
            "Led placement groups recovering a copy",
        );
        let recovery_bytes = IntCounter::new(
            "tessera_storage_recovery_bytes_total",
            "Bytes pushed to outdated and backfilling copies by recovery",
        )
        .expect("metric");
        let peering_bytes = IntCounter::new(
            "tessera_storage_peering_bytes_total",
            "Bytes a new primary pushed to up-to-date copies to make the regions of changes \
             that may be missing on some of them agree",
        )
        .expect("metric");
        let reclaimed_bytes = IntCounter::new(
            "tessera_storage_reclaimed_bytes_total",
            "Bytes a restarted last up-to-date copy took back from the other members \
             (writes its crash lost that they held) before leading",
        )
        .expect("metric");
        let recoveries = IntCounterVec::new(
            Opts::new(
                "tessera_storage_recoveries_total",
                "Recoveries of a copy this daemon's primaries started: delta (the regions of \
                 the changes in the group's log) or full (every allocated region: the log \
                 cannot tell, or a backfill)",
            ),
            &["kind"],
        )
        .expect("metric");
        let settles = IntCounter::new(
            "tessera_storage_primary_settles_total",
            "Flushes a primary made of its own copy before going on, because a member of the \
             write set left or restarted, or its term began",
        )
        .expect("metric");
        let compare_and_writes = IntCounterVec::new(
            Opts::new(
                "tessera_storage_compare_and_writes_total",
                "COMPARE AND WRITEs this daemon decided (as the chunk's primary) by outcome: \
                 written, miscompare (nothing written: the medium differed), failed (any \
                 other answer, including retries the gateway resends)",
            ),
            &["outcome"],
        )
        .expect("metric");
        let staged = IntCounterVec::new(
            Opts::new(
                "tessera_storage_staged_writes_total",
                "A primary's writes of its own copy made in parallel with its replicas' by \
                 outcome: installed (mapped when a replica had the change), late (the change \
                 came while the data was still being written; mapped once written), \
                 fallback (staging failed while the change waited: written the ordinary \
                 way), discarded (no apply came within 5 s: a later one writes the ordinary \
                 way)",
            ),
            &["outcome"],
        )
        .expect("metric");
        let c = |n: &str, h: &str| IntCounter::new(n, h).expect("metric");
        let pgs_scrubbing = g(
            "tessera_storage_pgs_scrubbing",
            "Led placement groups being scrubbed",
        );
        let repairs = c(
            "tessera_storage_repairs_total",
            "Copies of extents rewritten from a good copy (read repair and scrub)",
        );
        let repair_bytes = c(
            "tessera_storage_repair_bytes_total",
            "Bytes rewritten by repairs, summed over the copies rewritten",
        );
        let unrepairable = c(
            "tessera_storage_unrepairable_total",
            "Repairs that found no good copy (the client read got an error)",
        );
        let scrubs = c(
            "tessera_storage_scrubs_total",
            "Scrubs of a led placement group completed",
        );
        let publications = c(
            "tessera_storage_metric_publications_total",
            "Rounds in which the replication and disk counters were published",
        );
        let purged_chunks = c(
            "tessera_storage_purged_chunks_total",
            "Chunks freed because their placement group left this disk (re-placement, rebalancing)",
        );
        let scrub_regions = c(
            "tessera_storage_scrub_regions_total",
            "64 KiB regions compared across copies by scrubs",
        );
        let scrub_errors = c(
            "tessera_storage_scrub_errors_total",
            "Copies of regions a scrub found bad or different",
        );
        let pgs_backfilling = g(
            "tessera_storage_pgs_backfilling",
            "Led placement groups filling a new member (re-placement)",
        );
        let recovery_remaining = g(
            "tessera_storage_recovery_remaining_bytes",
            "Bytes the recoveries under way still have to push",
        );
        let recovery_limit = g(
            "tessera_storage_recovery_limit_bytes_per_second",
            "The recovery byte rate this daemon allows itself now: \
             --recovery-bytes-per-sec, or lower while the adaptive throttle \
             (--recovery-latency-factor) protects client writes (0: no limit)",
        );
        let recovery_paused = IntGaugeVec::new(
            Opts::new(
                "tessera_storage_recovery_paused",
                "1 while the operator's norecover (kind=recovery) or nobackfill \
                 (kind=backfill) switch holds this daemon's pushes",
            ),
            &["kind"],
        )
        .expect("metric");
        let recovery_rate = g(
            "tessera_storage_recovery_bytes_per_second",
            "Recovery bytes pushed per second over the last second",
        );
        let recovery_pushes = g(
            "tessera_storage_recovery_pushes_in_flight",
            "Recovery pushes in flight (bounded by --recovery-pushes-max)",
        );
        for m in [
            Box::new(pgs_primary.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(pgs_scrubbing.clone()),
            Box::new(repairs.clone()),
            Box::new(repair_bytes.clone()),
            Box::new(unrepairable.clone()),
            Box::new(scrubs.clone()),
            Box::new(publications.clone()),
            Box::new(purged_chunks.clone()),
            Box::new(scrub_regions.clone()),
            Box::new(scrub_errors.clone()),
            Box::new(pgs_backfilling.clone()),
            Box::new(recovery_remaining.clone()),
            Box::new(recovery_rate.clone()),
            Box::new(recovery_limit.clone()),
            Box::new(recovery_paused.clone()),
            Box::new(recovery_pushes.clone()),
            Box::new(pgs_degraded.clone()),
            Box::new(pgs_recovering.clone()),
            Box::new(recovery_bytes.clone()),
            Box::new(peering_bytes.clone()),
            Box::new(reclaimed_bytes.clone()),
            Box::new(settles.clone()),
            Box::new(recoveries.clone()),
            Box::new(compare_and_writes.clone()),
            Box::new(staged.clone()),
            Box::new(requests.clone()),
            Box::new(errors.clone()),
            Box::new(bytes.clone()),
            Box::new(latency.clone()),
            Box::new(connections.clone()),
            Box::new(checksum_errors.clone()),
            Box::new(relocated.clone()),
            Box::new(log_entries.clone()),
            Box::new(log_recovered.clone()),
            Box::new(capacity.clone()),
            Box::new(used.clone()),
            Box::new(protocol_errors.clone()),
        ] {
            registry.register(m).expect("register metric");
        }
        Metrics {
            registry,
            requests,
            errors,
            bytes,
            latency,
            connections,
            checksum_errors,
            relocated,
            log_entries,
            log_recovered,
            capacity,
            used,
            protocol_errors,
            pgs_primary,
            pgs_degraded,
            pgs_recovering,
            pgs_backfilling,
            recovery_bytes,
            peering_bytes,
            reclaimed_bytes,
            settles,
            recoveries,
            compare_and_writes,
            staged,
            pgs_scrubbing,
            repairs,
            repair_bytes,
            unrepairable,
            scrubs,
            publications,
            purged_chunks,
            scrub_regions,
            scrub_errors,
            recovery_remaining,
            recovery_rate,
            recovery_limit,
            recovery_paused,
            recovery_pushes,
        }
    }

    fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encode metrics");
        out
    }
}

// ---- manager client ------------------------------------------------------

/// A read lease (docs/replication.md, "Read leases"): a copy of a
/// replicated group serves reads only while the manager cannot yet have
/// declared this daemon down and published a map in which another copy
/// took its place, i.e. before `until`, and only once its map is at least
/// the epoch the manager answered the renewing heartbeat with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lease {
    pub until: Option<Instant>,
    pub epoch: u64,
}

/// Part of the manager's grace a lease lasts, counted from when the
/// renewing heartbeat was sent: the rest absorbs clock-rate differences
/// and scheduling delays between the two processes.
const LEASE_GRACE_NUM: u32 = 3;
const LEASE_GRACE_DEN: u32 = 4;

impl Lease {
    /// The lease a heartbeat sent at `sent` and answered `(epoch, grace)`
    /// gives: the manager received it after `sent`, and declares the daemon
    /// down no sooner than `grace` after the last heartbeat it received.
    pub fn renewed(sent: Instant, epoch: u64, grace: Duration) -> Lease {
        Lease {
            until: Some(sent + grace * LEASE_GRACE_NUM / LEASE_GRACE_DEN),
            epoch,
        }
    }

    /// Whether reads may be served at `now` under a map of `map_epoch`.
    pub fn allows(&self, now: Instant, map_epoch: u64) -> bool {
        self.until.is_some_and(|u| now < u) && map_epoch >= self.epoch
    }
}

struct Shared {
    config: Config,
    /// The read lease of replicated groups, renewed by heartbeats.
    lease: Mutex<Lease>,
    map: RwLock<Arc<ClusterMap>>,
    epoch_tx: watch::Sender<u64>,
    refresh_tx: Mutex<mpsc::Sender<()>>,
    disks: RwLock<BTreeMap<u32, Arc<DiskHandle>>>,
    metrics: Metrics,
    node_id: Mutex<u32>,
    stopping: AtomicBool,
    advertise: String,
    metrics_addr: Option<String>,
    all: Vec<Arc<DiskHandle>>,
    /// (group, disk) pairs whose replicated groups this daemon serves as
    /// active primary (published by the replication driver).
    active: RwLock<std::collections::BTreeSet<(u32, u32)>>,
    /// The replication driver's input, once started.
    repl: Mutex<Option<ReplTx>>,
    /// Scrub counters for the heartbeat, kept by the driver.
    scrub_state: Mutex<ScrubReport>,
    /// The manager's newest scrub request (from heartbeat answers).
    scrub_requested: std::sync::atomic::AtomicU64,
    /// The operator's `norecover` / `nobackfill` switches (from heartbeat
    /// answers; the driver applies them at its next tick).
    recovery_paused: std::sync::atomic::AtomicBool,
    backfill_paused: std::sync::atomic::AtomicBool,
    /// Recovery progress of the led groups (published by the driver, sent
    /// with every heartbeat).
    recovery: Mutex<tessera_wire::api::RecoveryProgress>,
}

impl Shared {
    fn map(&self) -> Arc<ClusterMap> {
        self.map.read().expect("map lock").clone()
    }
}

fn http() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .build()
}

fn fetch_map(agent: &ureq::Agent, manager: &str) -> Result<ClusterMap, String> {
    parse_map(agent.get(&format!("{manager}/v1/map")).call())
}

/// Long poll: the map of the epoch right after `epoch` (`next=1`: while
/// the manager still keeps it, else the newest), or the current one once
/// the manager has held the request for `wait`. Processing every epoch in
/// order lets this daemon vouch for the changes it applied when a
/// restarted last up-to-date copy asks (`Pg::vouched_after` in
/// `replication`: a skipped epoch could have acknowledged a change without
/// it).
fn fetch_map_after(manager: &str, epoch: u64, wait: Duration) -> Result<ClusterMap, String> {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(2))
        .timeout(wait + Duration::from_secs(5))
        .build();
    let url = format!(
        "{manager}/v1/map?after={epoch}&next=1&wait_ms={}",
        wait.as_millis()
    );
    parse_map(agent.get(&url).call())
}

fn parse_map(r: Result<ureq::Response, ureq::Error>) -> Result<ClusterMap, String> {
    let map: ClusterMap = r
        .map_err(|e| e.to_string())?
        .into_json()
        .map_err(|e| e.to_string())?;
    map.validate()?;
    Ok(map)
}

fn register(agent: &ureq::Agent, shared: &Shared) -> Result<RegisterResponse, String> {
    let disks = shared.disks.read().expect("disks").clone();
    let pending = shared.pending_disks();
    let req = RegisterRequest {
        node_uuid: pending
            .first()
            .map(|d| d.uuid.clone())
            .or_else(|| disks.values().next().map(|d| d.uuid.clone()))
            .unwrap_or_default(),
        addr: shared.advertise.clone(),
        metrics_addr: shared.metrics_addr.clone(),
        pid: std::process::id(),
        host: shared.config.host.clone(),
        zone: shared.config.zone.clone(),
        rack: shared.config.rack.clone(),
        disks: pending
            .iter()
            .map(|d| DiskRegistration {
                uuid: d.uuid.clone(),
                path: d.path.clone(),
                capacity_bytes: d.capacity_bytes,
            })
            .collect(),
    };
    agent
        .post(&format!("{}/v1/nodes/register", shared.config.manager))
        .send_json(&req)
        .map_err(|e| e.to_string())?
        .into_json()
        .map_err(|e| e.to_string())
}

impl Shared {
    /// Every disk of this daemon, in the order given on the command line.
    fn pending_disks(&self) -> Vec<Arc<DiskHandle>> {
        self.all.clone()
    }
}

fn apply_registration(shared: &Shared, resp: &RegisterResponse) -> Result<(), String> {
    let all = shared.pending_disks();
    let mut by_id = BTreeMap::new();
    for a in &resp.disks {
        let d = all
            .iter()
            .find(|d| d.uuid == a.uuid)
            .ok_or_else(|| format!("manager assigned unknown disk {}", a.uuid))?;
        by_id.insert(a.disk_id, d.clone());
    }
    *shared.disks.write().expect("disks") = by_id;
    *shared.node_id.lock().expect("node id") = resp.node_id;
    Ok(())
}

fn publish_map(shared: &Shared, map: ClusterMap) {
    let current = shared.map();
    if map.epoch < current.epoch {
        return;
    }
    // Free the data of deleted volumes.
    for d in shared.disks.read().expect("disks").values() {
        let vols: Vec<u64> = d
            .stats
            .lock()
            .expect("stats")
            .volumes
            .keys()
            .copied()
            .collect();
        for v in vols {
            if map.is_deleted_volume(v) {
                d.send(EngineMsg::Request(
                    Request::DropVolume { volume_id: v },
                    Route::Internal,
                ));
            }
        }
    }
    let epoch = map.epoch;
    let map = Arc::new(map);
    *shared.map.write().expect("map lock") = map.clone();
    shared.epoch_tx.send_replace(epoch);
    if let Some(tx) = shared.repl.lock().expect("repl").as_ref() {
        let _ = tx.send(ReplIn::Input(ReplInput::Map(map)));
    }
}

/// Follow the map by long polls: the manager answers as soon as it commits
/// a newer epoch, so every daemon learns a failover within a round trip.
/// Refresh requests (a peer or client showed a newer epoch) are answered by
/// the poll in flight; after a failed fetch they start the next at once.
fn map_follower(shared: Arc<Shared>, refresh_rx: mpsc::Receiver<()>) {
    let mut failed = false;
    loop {
        if shared.stopping.load(Ordering::Relaxed) {
            return;
        }
        if failed {
            let _ = refresh_rx.recv_timeout(MAP_RETRY_INTERVAL);
        }
        while refresh_rx.try_recv().is_ok() {}
        let epoch = shared.map().epoch;
        match fetch_map_after(&shared.config.manager, epoch, MAP_LONG_POLL_WAIT) {
            Ok(map) => {
                failed = false;
                publish_map(&shared, map);
            }
            Err(e) => {
                failed = true;
                tracing::debug!(error = %e, "map fetch failed");
            }
        }
    }
}

fn heartbeat_loop(shared: Arc<Shared>) {
    let agent = http();
    loop {
        std::thread::sleep(HEARTBEAT_INTERVAL);
        if shared.stopping.load(Ordering::Relaxed) {
            return;
        }
        let disks = shared.disks.read().expect("disks").clone();
        let mut volumes: BTreeMap<u64, u64> = BTreeMap::new();
        let mut usage = Vec::new();
        for (id, d) in &disks {
            let s = d.stats.lock().expect("stats").clone();
            for (v, blocks) in &s.volumes {
                *volumes.entry(*v).or_default() += blocks * engine::format::BLOCK_BYTES as u64;
            }
            let label = id.to_string();
            shared
                .metrics
                .capacity
                .with_label_values(&[&label])
                .set(d.capacity_bytes as i64);
            let used = s.used_blocks * engine::format::BLOCK_BYTES as u64;
            shared
                .metrics
                .used
                .with_label_values(&[&label])
                .set(used as i64);
            shared
                .metrics
                .checksum_errors
                .with_label_values(&[&label])
                .set(s.checksum_errors as i64);
            shared
                .metrics
                .relocated
                .with_label_values(&[&label])
                .set(s.relocated_blocks as i64);
            shared
                .metrics
                .log_entries
                .with_label_values(&[&label])
                .set(s.log_entries as i64);
            usage.push(DiskUsage {
                disk_id: *id,
                used_bytes: used,
                capacity_bytes: d.capacity_bytes,
                checksum_errors: s.checksum_errors,
            });
        }
        let body = HeartbeatRequest {
            scrub: shared.scrub_state.lock().expect("scrub state").clone(),
            recovery: shared.recovery.lock().expect("recovery").clone(),
            disks: usage,
            volumes: volumes
                .into_iter()
                .map(|(volume_id, allocated_bytes)| VolumeUsage {
                    volume_id,
                    allocated_bytes,
                })
                .collect(),
        };
        let node = *shared.node_id.lock().expect("node id");
        let sent = Instant::now();
        let r = agent
            .post(&format!(
                "{}/v1/nodes/{node}/heartbeat",
                shared.config.manager
            ))
            .send_json(&body);
        match r {
            Ok(resp) => {
                if let Ok(hb) = resp.into_json::<HeartbeatResponse>() {
                    shared
                        .scrub_requested
                        .fetch_max(hb.scrub_generation, Ordering::Relaxed);
                    shared
                        .recovery_paused
                        .store(hb.recovery_paused, Ordering::Relaxed);
                    shared
                        .backfill_paused
                        .store(hb.backfill_paused, Ordering::Relaxed);
                    if hb.grace_ms > 0 {
                        let l = Lease::renewed(sent, hb.epoch, Duration::from_millis(hb.grace_ms));
                        *shared.lease.lock().expect("lease") = l;
                        if shared.map().epoch < hb.epoch {
                            // The lease needs that map: fetch it now.
                            let _ = shared.refresh_tx.lock().expect("refresh").send(());
                        }
                    }
                }
            }
            Err(ureq::Error::Status(404, _)) => {
                tracing::warn!("manager does not know this node; registering again");
                match register(&agent, &shared).and_then(|resp| apply_registration(&shared, &resp))
                {
                    Ok(()) => {}
                    Err(e) => tracing::warn!(error = %e, "re-registration failed"),
                }
            }
            Err(e) => tracing::debug!(error = %e, "heartbeat failed"),
        }
    }
}

fn metrics_server(listener: tiny_http::Server, metrics: Metrics) {
    for req in listener.incoming_requests() {
        let resp = if req.url() == "/metrics" {
            tiny_http::Response::from_data(metrics.render()).with_header(
                "Content-Type: text/plain; version=0.0.4"
                    .parse::<tiny_http::Header>()
                    .expect("header"),
            )
        } else {
            tiny_http::Response::from_data(b"not found\n".to_vec()).with_status_code(404)
        };
        let _ = req.respond(resp);
    }
}

/// Tell systemd (Type=notify) that the daemon is ready, when run under it.
pub fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let p = path.to_string_lossy().to_string();
    let r = if let Some(name) = p.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|a| sock.send_to_addr(b"READY=1", &a))
    } else {
        sock.send_to(b"READY=1", &p)
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

// ---- the network server --------------------------------------------------

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    let (rd, wr) = stream.into_split();
    serve_stream(rd, wr, peer, shared).await;
}

/// A connection accepted by the daemon's listeners.
enum Incoming {
    Tcp(TcpStream),
    Unix(tokio::net::UnixStream),
}

/// The next connection on the Unix listener; never, when there is none.
async fn accept_unix(
    l: Option<&tokio::net::UnixListener>,
) -> std::io::Result<(tokio::net::UnixStream, tokio::net::unix::SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// A connection from this host over the daemon's Unix socket
/// (`tessera_gateway::unix_link`): served like a TCP one.
async fn serve_unix_connection(stream: tokio::net::UnixStream, shared: Arc<Shared>) {
    let (rd, wr) = stream.into_split();
    serve_stream(rd, wr, None, shared).await;
}

/// Serve one connection of the internal protocol: a TCP or Unix socket
/// connection, or the in-memory stream of the gateway embedded in this
/// process (same protocol, same checks).
async fn serve_stream<R, W>(rd: R, wr: W, peer: Option<std::net::SocketAddr>, shared: Arc<Shared>)
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut rd = BufReader::with_capacity(
        tessera_gateway::frameio::READ_BUFFER_BYTES,
        tessera_gateway::busy_poll::Noted(rd),
    );
    let (tx, mut rx) = tmpsc::unbounded_channel::<Outgoing>();
    let writer = tokio::spawn(async move {
        let mut wr = wr;
        let mut batch: Vec<(Outgoing, [u8; HEADER_SIZE], [u8; 4])> = Vec::new();
        let mut scratch = Vec::new();
        while let Some(first) = rx.recv().await {
            // Let the engine finish delivering what is ready so one send
            // carries it all; returns at once when nothing else is ready.
            tokio::task::yield_now().await;
            let mut next = Some(first);
            while let Some(o) = next.take() {
                let crc = if o.header.payload_len > 0 {
                    o.data.crc32c().to_le_bytes()
                } else {
                    [0; 4]
                };
                let head = o.header.to_bytes();
                batch.push((o, head, crc));
                if batch.len() < REPLY_BATCH_MAX {
                    next = rx.try_recv().ok();
                }
            }
            // One writev for the batch; payloads are not copied into a
            // write buffer on the way (tessera_gateway::frameio).
            let mut g = Gather::new(scratch);
            for (o, head, crc) in &batch {
                g.push(head);
                if o.header.payload_len > 0 {
                    for piece in o.data.slices() {
                        g.push(piece);
                    }
                    g.push(crc);
                }
            }
            match g.write_to(&mut wr).await {
                Ok(s) => scratch = s,
                Err(_) => return,
            }
            batch.clear();
        }
    });
    let sem = Arc::new(Semaphore::new(INFLIGHT_PER_CONNECTION_MAX));
    let mut hello = false;
    let result = async {
        loop {
            let mut hb = [0u8; HEADER_SIZE];
            rd.read_exact(&mut hb).await.map_err(|_| "closed")?;
            let h = Header::decode(&hb).map_err(|_| "malformed header")?;
            if h.reply {
                return Err("reply sent as a request");
            }
            let mut payload = Vec::new();
            // A write's data goes into an aligned buffer the disk write is
            // issued from, its per-block CRCs computed once (they check the
            // wire CRC and go into the block map). `None` after a bad CRC.
            let mut write_data = None;
            let mut repl_msg = None;
            if h.op == Op::Write {
                // The header was validated: payload_len = length + 4 > 4.
                let n = h.length as usize;
                let (data, crc) = Payload::read_from(&mut rd, n)
                    .await
                    .map_err(|_| "closed mid-payload")?;
                let mut sent = [0u8; 4];
                rd.read_exact(&mut sent)
                    .await
                    .map_err(|_| "closed mid-payload")?;
                if crc == u32::from_le_bytes(sent) {
                    write_data = Some(data);
                }
            } else if h.op == Op::Repl {
                repl_msg = read_repl(&mut rd, h.payload_len as usize)
                    .await
                    .map_err(|_| "closed mid-payload")?;
            } else if h.payload_len > 0 {
                assert!(h.payload_len <= PAYLOAD_MAX_BYTES);
                payload = read_payload(&mut rd, h.payload_len as usize, 0)
                    .await
                    .map_err(|_| "closed mid-payload")?;
            }
            let permit = sem.clone().acquire_owned().await.expect("semaphore");
            if h.op == Op::Hello {
                let ok = open_payload(&payload)
                    .map(|id| id == shared.map().cluster_id.as_bytes())
                    .unwrap_or(false);
                hello = ok;
                let status = if ok { Status::Ok } else { Status::Refused };
                let _ = tx.send(Outgoing {
                    header: h.reply_to(status, shared.map().epoch, 0),
                    data: ReadData::default(),
                    _permit: Some(permit),
                });
                if !ok {
                    return Err("hello refused");
                }
                continue;
            }
            if !hello {
                return Err("request before hello");
            }
            shared
                .metrics
                .requests
                .with_label_values(&[op_name(h.op)])
                .inc();
            if h.op == Op::Repl {
                // Replication messages are one-way: an accepted one gets no
                // reply (the sender would only read and drop it, and each
                // reply cost a send here and a receive there per message).
                // A refused one is answered, so the refusal shows on the
                // wire, and counted.
                let status = accept_repl(&shared, &h, repl_msg.take());
                if status != Status::Ok {
                    shared
                        .metrics
                        .errors
                        .with_label_values(&[status_name(status)])
                        .inc();
                    let _ = tx.send(Outgoing {
                        header: h.reply_to(status, shared.map().epoch, 0),
                        data: ReadData::default(),
                        _permit: Some(permit),
                    });
                }
                continue;
            }
            match admit(&shared, &h, write_data, &payload).await {
                Ok(Admitted::Engine(disk, req, repair_pg)) => {
                    let repair = repair_pg.and_then(|pg| {
                        let tx = shared.repl.lock().expect("repl").clone()?;
                        Some(RepairRoute { pg, attempt: 0, tx })
                    });
                    disk.send(EngineMsg::Request(
                        req,
                        Route::Net {
                            header: h,
                            tx: tx.clone(),
                            permit,
                            started: Instant::now(),
                            repair,
                        },
                    ))
                }
                Ok(Admitted::Replicated {
                    pg,
                    extent,
                    change,
                    fua,
                }) => {
                    let reply = PendingReply {
                        header: h,
                        tx: tx.clone(),
                        permit,
                        started: Instant::now(),
                    };
                    to_driver(
                        &shared,
                        ReplIn::Client {
                            pg,
                            disk: h.disk_id,
                            extent,
                            change,
                            fua,
                            reply,
                        },
                    );
                }
                Ok(Admitted::CompareAndWrite {
                    disk,
                    pg: None,
                    extent,
                    compare,
                    data,
                    fua,
                }) => {
                    let tx = tx.clone();
                    let shared = Arc::clone(&shared);
                    tokio::spawn(async move {
                        let started = Instant::now();
                        let (status, at) =
                            compare_and_write(disk, extent, compare, data, fua, h.chunk_version)
                                .await;
                        count_answer(&shared.metrics, h.op, status, started.elapsed());
                        let mut reply = h.reply_to(status, shared.map().epoch, 0);
                        reply.chunk_version = at;
                        let _ = tx.send(Outgoing {
                            header: reply,
                            data: ReadData::default(),
                            _permit: Some(permit),
                        });
                    });
                }
                Ok(Admitted::CompareAndWrite {
                    pg: Some(pg),
                    extent,
                    compare,
                    data,
                    fua,
                    ..
                }) => {
                    let reply = PendingReply {
                        header: h,
                        tx: tx.clone(),
                        permit,
                        started: Instant::now(),
                    };
                    to_driver(
                        &shared,
                        ReplIn::CompareAndWrite {
                            pg,
                            disk: h.disk_id,
                            extent,
                            compare,
                            data,
                            token: h.chunk_version,
                            fua,
                            reply,
                        },
                    );
                }
                Err(status) => {
                    shared
                        .metrics
                        .errors
                        .with_label_values(&[status_name(status)])
                        .inc();
                    let _ = tx.send(Outgoing {
                        header: h.reply_to(status, shared.map().epoch, 0),
                        data: ReadData::default(),
                        _permit: Some(permit),
                    });
                }
            }
        }
        #[allow(unreachable_code)]
        Ok::<(), &'static str>(())
    }
    .await;
    if let Err(why) = result
        && why != "closed"
    {
        shared.metrics.protocol_errors.inc();
        tracing::warn!(?peer, why, "closing connection");
    }
    drop(tx);
    let _ = writer.await;
}

/// Replies written by one `writev` at most (each is 1-3 iovec entries).
const REPLY_BATCH_MAX: usize = 128;

/// Validate a replication message from a peer daemon and hand it to the
/// replication driver. Epoch and primacy are judged by the state machine
/// (it fences old epochs and holds newer ones until the map catches up).
/// `msg` is the body and its data (read apart), `None` when the payload's
/// CRC did not match.
fn accept_repl(shared: &Shared, h: &Header, msg: Option<(Vec<u8>, Option<Payload>)>) -> Status {
    if shared.stopping.load(Ordering::Relaxed) {
        return Status::ShuttingDown;
    }
    let Some((body, data)) = msg else {
        return Status::BadPayloadCrc;
    };
    if !shared.disks.read().expect("disks").contains_key(&h.disk_id) {
        return Status::WrongDisk;
    }
    let msg = match repl::codec::decode_with(&body, data, h.disk_id, h.epoch) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "malformed replication message");
            return Status::Invalid;
        }
    };
    let extent = match &msg.body {
        repl::Body::Replicate { update, .. } => Some(update.extent),
        repl::Body::RepairReq { extent, .. }
        | repl::Body::Fetch { extent, .. }
        | repl::Body::DigestReq { extent, .. } => Some(*extent),
        repl::Body::Fetched {
            extent, ok: true, ..
        } => Some(*extent),
        _ => None,
    };
    if let Some(e) = &extent {
        let chunk_ok = shared
            .disks
            .read()
            .expect("disks")
            .get(&h.disk_id)
            .is_some_and(|d| u64::from(e.end()) <= d.chunk_bytes);
        if !chunk_ok || e.offset % 512 != 0 || e.length % 512 != 0 {
            return Status::Invalid;
        }
    }
    match shared.repl.lock().expect("repl").as_ref() {
        Some(tx) if tx.send(ReplIn::Input(ReplInput::Msg(msg))).is_ok() => Status::Ok,
        _ => Status::Busy,
    }
}

/// Read an `Op::Repl` payload of `n` bytes (body and CRC). The data a
/// message ends with (a write for a replica, fetched blocks) goes straight
/// into an aligned buffer the replica's disk write is issued from, its
/// per-block CRCs computed in the same pass that checks the frame's CRC;
/// the rest of the body into a vector. `None` when the CRC does not match.
async fn read_repl<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    n: usize,
) -> std::io::Result<Option<(Vec<u8>, Option<Payload>)>> {
    let mut body = Vec::new();
    let mut data = None;
    let mut crc = 0;
    if n >= repl::codec::KIND_BYTES + 4 {
        body.resize(repl::codec::KIND_BYTES, 0);
        rd.read_exact(&mut body).await?;
        if let Some(head) = repl::codec::head_bytes(&body)
            && head + 4 <= n
        {
            body.resize(head, 0);
            rd.read_exact(&mut body[repl::codec::KIND_BYTES..]).await?;
            if let Some(len) = repl::codec::data_len(&body)
                && len > 0
                && head + len + 4 <= n
            {
                // The CRC continues over the data from its block CRCs.
                let (d, _) = Payload::read_from(rd, len).await?;
                crc = d.crc_append(tessera_wire::crc32c(&body));
                data = Some(d);
            }
        }
    }
    if data.is_none() {
        crc = tessera_wire::crc32c(&body);
    }
    let at = body.len() + data.as_ref().map_or(0, |d| d.len());
    let rest = read_payload(rd, n.saturating_sub(at), 0).await?;
    if rest.len() < 4 {
        return Ok(None);
    }
    let (tail, sent) = rest.split_at(rest.len() - 4);
    crc = tessera_wire::crc32c_append(crc, tail);
    if crc.to_le_bytes() != sent {
        return Ok(None);
    }
    body.extend_from_slice(tail);
    Ok(Some((body, data)))
}

/// Where an admitted request goes.
enum Admitted {
    /// Straight to one disk's engine (reads, single-copy pools, flushes);
    /// with the group of a replicated read (repaired on a checksum error).
    Engine(Arc<DiskHandle>, Request, Option<u32>),
    /// A change to a replicated group this disk leads: through the
    /// replication driver.
    Replicated {
        pg: u32,
        extent: repl::Extent,
        change: repl::Change<Data>,
        fua: bool,
    },
    /// A COMPARE AND WRITE: through the replication driver for a
    /// replicated group (`pg`), else run by a task against the engine.
    CompareAndWrite {
        disk: Arc<DiskHandle>,
        pg: Option<u32>,
        extent: repl::Extent,
        compare: Payload,
        data: Payload,
        fua: bool,
    },
}

/// Validate a request against the daemon's map and turn it into an engine
/// request for one of its disks.
/// `write` is a write's data, `None` when its CRC did not match; `payload`
/// the payload section of other ops (data and CRC).
async fn admit(
    shared: &Shared,
    h: &Header,
    write: Option<Payload>,
    payload: &[u8],
) -> Result<Admitted, Status> {
    if shared.stopping.load(Ordering::Relaxed) {
        return Err(Status::ShuttingDown);
    }
    let mut map = shared.map();
    if h.epoch > map.epoch {
        // The sender has seen a newer map: catch up before judging.
        let _ = shared.refresh_tx.lock().expect("refresh").send(());
        let mut rx = shared.epoch_tx.subscribe();
        let wait = rx.wait_for(|e| *e >= h.epoch);
        if tokio::time::timeout(Duration::from_secs(2), wait)
            .await
            .is_err()
        {
            return Err(Status::Busy);
        }
        map = shared.map();
    }
    if h.epoch < map.epoch {
        return Err(Status::StaleEpoch);
    }
    let disk = shared
        .disks
        .read()
        .expect("disks")
        .get(&h.disk_id)
        .cloned()
        .ok_or(Status::WrongDisk)?;
    if h.op == Op::Ping {
        // Answered here, without the engine: an Ok reply with no payload.
        return Err(Status::Ok);
    }
    if h.op == Op::Flush {
        return Ok(Admitted::Engine(disk, Request::Flush, None));
    }
    if !h.op.is_ranged() {
        return Err(Status::Invalid);
    }
    let vol = map.volume(h.volume_id).ok_or(Status::UnknownVolume)?;
    if vol.chunk_size_bytes != disk.chunk_bytes {
        return Err(Status::Invalid);
    }
    let chunk_start = u64::from(h.chunk_index) * vol.chunk_size_bytes;
    let end = u64::from(h.offset) + u64::from(h.length);
    if u64::from(h.chunk_index) >= vol.chunk_count()
        || end > vol.chunk_size_bytes
        || chunk_start + end > vol.size_bytes
    {
        return Err(Status::Invalid);
    }
    if !map.disk_holds(h.disk_id, h.volume_id, h.chunk_index) {
        return Err(Status::WrongDisk);
    }
    // Replicated groups: only their active primary serves, and changes go
    // through replication.
    let pg = map
        .pg_for(h.volume_id, h.chunk_index)
        .ok_or(Status::UnknownVolume)?;
    let replicated = map.pool_of_pg(pg).is_some_and(|p| p.replicas > 1);
    let repair_pg = (replicated && h.op == Op::Read).then_some(pg);
    if replicated {
        let changes = matches!(
            h.op,
            Op::Write | Op::WriteZeroes | Op::Trim | Op::CompareAndWrite
        );
        let is_primary = map.primary(pg) == Some(h.disk_id);
        let active = shared
            .active
            .read()
            .expect("active")
            .contains(&(pg, h.disk_id));
        // Changes only at the serving primary. Reads also at any copy the map
        // says is up to date: it applied every acknowledged change before
        // the primary acknowledged it.
        let uptodate = map.pgs[pg as usize]
            .iter()
            .position(|d| *d == h.disk_id)
            .is_some_and(|i| map.copy_state(pg, i) == tessera_wire::map::CopyState::UpToDate);
        let ok = if is_primary {
            active
        } else {
            !changes && uptodate
        };
        if !ok {
            return Err(Status::WrongDisk);
        }
        // A read must not come from a copy the manager may already have
        // replaced (a daemon cut off from the manager, or hung, then back
        // before it learnt of the new map): only under a valid lease. The
        // gateway backs off and retries, and by then has the new map. A
        // COMPARE AND WRITE reads too: its miscompare would report data.
        if (!changes || h.op == Op::CompareAndWrite)
            && !shared
                .lease
                .lock()
                .expect("lease")
                .allows(Instant::now(), map.epoch)
        {
            return Err(Status::Busy);
        }
        let extent = repl::Extent {
            volume_id: h.volume_id,
            chunk_index: h.chunk_index,
            offset: h.offset,
            length: h.length,
        };
        let fua = h.flags.contains(Flags::FUA);
        if h.op == Op::CompareAndWrite {
            let (compare, data) = compare_payload(h, payload)?;
            return Ok(Admitted::CompareAndWrite {
                disk,
                pg: Some(pg),
                extent,
                compare,
                data,
                fua,
            });
        }
        if matches!(h.op, Op::Write | Op::WriteZeroes | Op::Trim) {
            let change = match h.op {
                Op::Write => {
                    let data = write.ok_or(Status::BadPayloadCrc)?;
                    shared
                        .metrics
                        .bytes
                        .with_label_values(&["write"])
                        .inc_by(data.len() as u64);
                    repl::Change::Write(data)
                }
                Op::WriteZeroes => repl::Change::Zeroes,
                _ => repl::Change::Trim,
            };
            return Ok(Admitted::Replicated {
                pg,
                extent,
                change,
                fua,
            });
        }
    }
    let key = ChunkKey {
        volume_id: h.volume_id,
        chunk_index: h.chunk_index,
    };
    let fua = h.flags.contains(Flags::FUA);
    if h.op == Op::CompareAndWrite {
        let (compare, data) = compare_payload(h, payload)?;
        return Ok(Admitted::CompareAndWrite {
            disk,
            pg: None,
            extent: repl::Extent {
                volume_id: h.volume_id,
                chunk_index: h.chunk_index,
                offset: h.offset,
                length: h.length,
            },
            compare,
            data,
            fua,
        });
    }
    let req = match h.op {
        Op::Read => Request::Read {
            key,
            offset: h.offset,
            length: h.length,
        },
        Op::Write => {
            let data = write.ok_or(Status::BadPayloadCrc)?;
            shared
                .metrics
                .bytes
                .with_label_values(&["write"])
                .inc_by(data.len() as u64);
            Request::Write {
                key,
                offset: h.offset,
                data,
                fua,
                log: None,
            }
        }
        Op::Trim => Request::Trim {
            key,
            offset: h.offset,
            length: h.length,
            log: None,
        },
        Op::WriteZeroes => Request::WriteZeroes {
            key,
            offset: h.offset,
            length: h.length,
            fua,
            log: None,
        },
        Op::BlockStatus => Request::BlockStatus {
            key,
            offset: h.offset,
            length: h.length,
        },
        _ => return Err(Status::Invalid),
    };
    Ok(Admitted::Engine(disk, req, repair_pg))
}

/// A COMPARE AND WRITE's payload: what to compare, what to write (the
/// header was validated: the data is twice `length`).
fn compare_payload(h: &Header, payload: &[u8]) -> Result<(Payload, Payload), Status> {
    let data = open_payload(payload).ok_or(Status::BadPayloadCrc)?;
    let n = h.length as usize;
    if data.len() != 2 * n {
        return Err(Status::Invalid);
    }
    let compare = Payload::copy_from(&data[..n]);
    let mut write = Payload::copy_from(&data[n..]);
    write.compute_block_crcs();
    Ok((compare, write))
}

impl repl::CompareData for Payload {
    fn first_difference(expected: &Self, actual: Option<&Self>) -> Option<u32> {
        first_difference(expected, actual.map(|a| &a[..]))
    }
}

/// Where `actual` (`None`: zeroes) first differs from `expected`, in bytes.
fn first_difference(expected: &[u8], actual: Option<&[u8]>) -> Option<u32> {
    let at = match actual {
        Some(a) => expected
            .iter()
            .zip(a.iter().chain(std::iter::repeat(&0)))
            .position(|(x, y)| x != y),
        None => expected.iter().position(|x| *x != 0),
    };
    at.map(|i| i as u32)
}

/// Count a request's answer: its latency, an error unless it is Ok or a
/// miscompare (an answer, not a failure: ATS locking contends by design),
/// and a COMPARE AND WRITE's outcome.
fn count_answer(m: &Metrics, op: Op, status: Status, took: Duration) {
    m.latency
        .with_label_values(&[op_name(op)])
        .observe(took.as_secs_f64());
    if !matches!(status, Status::Ok | Status::Miscompare) {
        m.errors.with_label_values(&[status_name(status)]).inc();
    }
    if op == Op::CompareAndWrite {
        m.compare_and_writes
            .with_label_values(&[caw_outcome(status)])
            .inc();
    }
}

/// Hand a client request to the replication driver. When it is starting or
/// stopping, the reply (and its permit) goes with the failed send; the
/// gateway times out and retries.
fn to_driver(shared: &Shared, m: ReplIn) {
    let sent = shared
        .repl
        .lock()
        .expect("repl")
        .as_ref()
        .map(|r| r.send(m).is_ok());
    if sent != Some(true) {
        tracing::warn!("replication driver unavailable");
    }
}

fn caw_outcome(s: Status) -> &'static str {
    match s {
        Status::Ok => "written",
        Status::Miscompare => "miscompare",
        _ => "failed",
    }
}

/// Hold ids of single-copy COMPARE AND WRITEs (unique per daemon).
static NEXT_HOLD: AtomicU64 = AtomicU64::new(1);

/// A single-copy COMPARE AND WRITE: hold the range in the engine (writes
/// to it wait; the hold itself waits for writes in flight on it), read,
/// compare, and end the hold with the write or without it. Several
/// gateways may write the volume; the engine sees every write of this
/// disk, so the compare and the write are atomic against all of them.
/// Returns the reply's status and, for a miscompare, the offset of the
/// first difference.
async fn compare_and_write(
    disk: Arc<DiskHandle>,
    extent: repl::Extent,
    compare: Payload,
    data: Payload,
    fua: bool,
    token: u64,
) -> (Status, u64) {
    if token == 0 {
        return compare_and_write_once(&disk, extent, compare, data, fua, 0).await;
    }
    // One attempt per token: a resend (the gateway lost the connection or
    // gave up waiting) while the first attempt runs gets that attempt's
    // answer; after it wrote, `Ok` (comparing again would find its own
    // write and miscompare).
    let (tx, mut rx) = tokio::sync::watch::channel(None);
    let first = {
        let mut t = disk.cas.lock().expect("cas");
        if t.done.contains(&token) {
            return (Status::Ok, 0);
        }
        match t.running.get(&token) {
            Some(r) => {
                rx = r.clone();
                false
            }
            None => {
                t.running.insert(token, rx.clone());
                true
            }
        }
    };
    if !first {
        return match rx.wait_for(|r| r.is_some()).await {
            Ok(r) => r.expect("some"),
            Err(_) => (Status::Busy, 0),
        };
    }
    let result = compare_and_write_once(&disk, extent, compare, data, fua, token).await;
    {
        let mut t = disk.cas.lock().expect("cas");
        t.running.remove(&token);
        if result.0 == Status::Ok {
            if t.done.len() >= CAS_TOKENS_MAX {
                t.done.pop_front();
            }
            t.done.push_back(token);
        }
    }
    let _ = tx.send(Some(result));
    result
}

/// Single-copy COMPARE AND WRITE tokens of one disk: written ones (newest
/// last, at most `CAS_TOKENS_MAX`) and those being run, with the channel
/// their answer comes on.
#[derive(Default)]
struct CasTokens {
    done: VecDeque<u64>,
    running: HashMap<u64, tokio::sync::watch::Receiver<Option<(Status, u64)>>>,
}

async fn compare_and_write_once(
    disk: &DiskHandle,
    extent: repl::Extent,
    compare: Payload,
    data: Payload,
    fua: bool,
    token: u64,
) -> (Status, u64) {
    let step = |req: Request| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        disk.send(EngineMsg::Request(req, Route::Task(tx)));
        async move { rx.await.unwrap_or(Err(EngineError::Failed)) }
    };
    let key = ChunkKey {
        volume_id: extent.volume_id,
        chunk_index: extent.chunk_index,
    };
    let id = NEXT_HOLD.fetch_add(1, Ordering::Relaxed);
    let hold = Request::Hold {
        key,
        offset: extent.offset,
        length: extent.length,
        id,
    };
    if let Err(e) = step(hold).await {
        return (status_of(e), 0);
    }
    let read = Request::Read {
        key,
        offset: extent.offset,
        length: extent.length,
    };
    let (write, outcome) = match step(read).await {
        Ok(Reply::Data(d)) => {
            let actual = d.into_vec();
            match first_difference(&compare, Some(&actual)) {
                Some(at) => (None, Err((Status::Miscompare, u64::from(at)))),
                None => (Some((data, fua)), Ok(())),
            }
        }
        Ok(_) => (None, Err((Status::Io, 0))),
        Err(e) => (None, Err((status_of(e), 0))),
    };
    // Always ends the hold, whatever the read found.
    let token = (token != 0).then_some(token);
    let released = step(Request::Release { id, write, token }).await;
    if let Err(r) = outcome {
        return r;
    }
    match released {
        Ok(_) => (Status::Ok, 0),
        Err(e) => (status_of(e), 0),
    }
}

/// Single-copy COMPARE AND WRITE tokens a disk remembers as written.
const CAS_TOKENS_MAX: usize = 1024;

/// Run the daemon until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), Fatal> {
    if config.disks.is_empty() {
        return Err(Fatal::config("no --disk given"));
    }
    tracing::info!(?config, "starting tessera-storage");
    let agent = http();
    // The cluster id comes from the manager; new disks are stamped with it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let map = loop {
        match fetch_map(&agent, &config.manager) {
            Ok(m) => break m,
            Err(e) if Instant::now() < deadline => {
                tracing::info!(error = %e, manager = %config.manager, "waiting for the manager");
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => {
                return Err(Fatal::env(format!(
                    "cannot reach the manager at {}: {e}",
                    config.manager
                )));
            }
        }
    };
    let metrics = Metrics::new();
    // One thread runs the network and every disk's engine: on the machines
    // this is measured on, crossing threads per request cost more CPU than
    // the request itself (docs/ARCHITECTURE.md, "Threads").
    let rt = tessera_gateway::busy_poll::runtime(config.busy_poll)
        .map_err(|e| Fatal::env(format!("cannot start runtime: {e}")))?;
    let mut handles = Vec::new();
    for spec in &config.disks {
        let mut engine = open_engine(spec, config.engine, &map.cluster_id)?;
        engine.set_relocation(config.relocate_reads);
        tracing::info!(disk = %spec.path.display(), stats = ?engine.stats(), "disk open");
        handles.push(Arc::new(spawn_engine(&rt, engine, spec, metrics.clone())));
    }
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(config.listen))
        .map_err(|e| Fatal::env(format!("cannot listen on {}: {e}", config.listen)))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Fatal::env(e.to_string()))?;
    let metrics_server_handle = match config.metrics_listen {
        Some(addr) => {
            let server = tiny_http::Server::http(addr)
                .map_err(|e| Fatal::env(format!("cannot listen for metrics on {addr}: {e}")))?;
            let a = server.server_addr().to_ip().map(|a| a.to_string());
            let m = metrics.clone();
            std::thread::spawn(move || metrics_server(server, m));
            a
        }
        None => None,
    };
    let (epoch_tx, _) = watch::channel(map.epoch);
    let (refresh_tx, refresh_rx) = mpsc::channel();
    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| bound.to_string());
    // Peers on this host reach an advertised loopback address over a Unix
    // socket too (cheaper than loopback TCP; `unix_link`). Taken (another
    // process of this address still running?) or refused: TCP only.
    let unix_listener = {
        let _guard = rt.enter();
        match tessera_gateway::unix_link::listen(&advertise) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(%advertise, error = %e, "no Unix socket for same-host peers; TCP only");
                None
            }
        }
    };
    let shared = Arc::new(Shared {
        config: config.clone(),
        map: RwLock::new(Arc::new(map)),
        epoch_tx,
        refresh_tx: Mutex::new(refresh_tx),
        disks: RwLock::new(BTreeMap::new()),
        metrics: metrics.clone(),
        node_id: Mutex::new(0),
        stopping: AtomicBool::new(false),
        advertise,
        metrics_addr: metrics_server_handle.clone(),
        all: handles.clone(),
        active: RwLock::new(std::collections::BTreeSet::new()),
        repl: Mutex::new(None),
        scrub_state: Mutex::new(ScrubReport::default()),
        scrub_requested: std::sync::atomic::AtomicU64::new(0),
        recovery_paused: std::sync::atomic::AtomicBool::new(false),
        backfill_paused: std::sync::atomic::AtomicBool::new(false),
        lease: Mutex::new(Lease::default()),
        recovery: Mutex::new(Default::default()),
    });
    let resp = register(&agent, &shared)
        .map_err(|e| Fatal::env(format!("registration with the manager failed: {e}")))?;
    apply_registration(&shared, &resp).map_err(Fatal::env)?;
    // The replicator starts with this process's (empty) logs, after the
    // registration told the manager that a new process owns the disks.
    let repl_tx = start_driver(shared.clone(), rt.handle().clone(), resp.epoch);
    // The map fetched before registering is not fed to it: in that map
    // this disk is the old process's (its incarnation, its copies' states,
    // the groups it led), and the new process must not act as it (the
    // replicator also ignores maps older than the registration:
    // `set_min_epoch`). Its first map is the one fetched next.
    *shared.repl.lock().expect("repl") = Some(repl_tx);
    if let Ok(m) = fetch_map(&agent, &config.manager) {
        publish_map(&shared, m);
    }
    {
        let s = shared.clone();
        std::thread::spawn(move || map_follower(s, refresh_rx));
        let s = shared.clone();
        std::thread::spawn(move || heartbeat_loop(s));
    }
    // The embedded gateway: bound before READY so the addresses are in it.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut nbd_text = "none".to_string();
    let mut iscsi_text = "none".to_string();
    let mut leaving = None;
    if config.nbd_listen.is_some() || !config.iscsi_listen.is_empty() {
        let bind = |addr: SocketAddr, what: &str| {
            rt.block_on(tokio::net::TcpListener::bind(addr))
                .map_err(|e| Fatal::env(format!("cannot listen for {what} on {addr}: {e}")))
        };
        let nbd = config.nbd_listen.map(|a| bind(a, "NBD")).transpose()?;
        let iscsi = config
            .iscsi_listen
            .iter()
            .map(|a| bind(*a, "iSCSI"))
            .collect::<Result<Vec<_>, _>>()?;
        nbd_text = tessera_gateway::embedded::addresses(&nbd.iter().collect::<Vec<_>>());
        iscsi_text = tessera_gateway::embedded::addresses(&iscsi.iter().collect::<Vec<_>>());
        let secret = match &config.cluster_secret_file {
            Some(p) => Some(tessera_wire::api::read_cluster_secret(p).map_err(Fatal::env)?),
            None => {
                if !iscsi.is_empty() {
                    tracing::warn!(
                        "no --cluster-secret-file: every iSCSI login to a volume is refused"
                    );
                }
                None
            }
        };
        let s = shared.clone();
        // Each connection of the embedded gateway to this daemon is an
        // in-memory stream served like a TCP connection.
        let connect: tessera_gateway::client::LocalConnect = Arc::new(move || {
            let (ours, theirs) = tokio::io::duplex(LOCAL_STREAM_BYTES);
            let (rd, wr) = tokio::io::split(ours);
            let s = s.clone();
            tokio::spawn(async move {
                s.metrics.connections.inc();
                serve_stream(rd, wr, None, s.clone()).await;
                s.metrics.connections.dec();
            });
            theirs
        });
        let gw = tessera_gateway::embedded::Embedded::new(
            config.manager.clone(),
            (*shared.map()).clone(),
            (shared.advertise.clone(), connect),
            secret,
            Instant::now() + Duration::from_secs(30),
        )
        .map_err(Fatal::env)?;
        leaving = Some(gw.access());
        rt.spawn(gw.serve(tessera_gateway::embedded::Listeners { nbd, iscsi }, stop_rx));
    }
    println!(
        "READY listen={bound} node_id={} metrics={} nbd={nbd_text} iscsi={iscsi_text}",
        resp.node_id,
        metrics_server_handle.as_deref().unwrap_or("none"),
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    notify_ready();

    let s = shared.clone();
    rt.block_on(async move {
        let conns = Arc::new(Semaphore::new(CONNECTIONS_MAX));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        loop {
            let conn = tokio::select! {
                r = listener.accept() => r.map(|(c, _)| Incoming::Tcp(c)),
                r = accept_unix(unix_listener.as_ref()) => r.map(|(c, _)| Incoming::Unix(c)),
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            };
            let Ok(conn) = conn else { continue };
            let Ok(permit) = conns.clone().try_acquire_owned() else {
                tracing::warn!("connection limit reached; refusing");
                continue;
            };
            let s = s.clone();
            s.metrics.connections.inc();
            tokio::spawn(async move {
                match conn {
                    Incoming::Tcp(c) => serve_connection(c, s.clone()).await,
                    Incoming::Unix(c) => serve_unix_connection(c, s.clone()).await,
                }
                s.metrics.connections.dec();
                drop(permit);
            });
        }
    });
    let _ = stop_tx.send(true);
    tracing::info!("stopping: committing metadata");
    shared.stopping.store(true, Ordering::Relaxed);
    for h in handles {
        h.send(EngineMsg::Shutdown);
    }
    let tasks: Vec<_> = shared
        .all
        .iter()
        .filter_map(|h| h.task.lock().expect("task").take())
        .collect();
    rt.block_on(async {
        for t in tasks {
            let _ = t.await;
        }
    });
    rt.shutdown_timeout(Duration::from_millis(500));
    // The embedded gateway's connections went with the runtime: reservation
    // changes stop waiting for it.
    if let Some(a) = leaving {
        a.leave();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves the adaptive recovery throttle's rule: it starts at
    // ADAPT_START, cuts by 40 % while client writes' p90 is above the
    // factor times the baseline (never below the floor), grows when under
    // it or when there are too few writes to judge, and never passes the
    // ceiling (--recovery-bytes-per-sec when set). And the flag's parser.
    #[test]
    fn adaptive_recovery_throttle() {
        let base = 0.002;
        let slow = Some(0.010);
        let fine = Some(0.004);
        let first = adapt_step(None, slow, base, 3.0, ADAPT_CEILING);
        assert_eq!(first, (ADAPT_START as f64 * 0.6) as u64);
        let mut r = first;
        for _ in 0..30 {
            r = adapt_step(Some(r), slow, base, 3.0, ADAPT_CEILING);
        }
        assert_eq!(r, ADAPT_FLOOR, "down to the floor, not below");
        let up = adapt_step(Some(r), fine, base, 3.0, ADAPT_CEILING);
        assert!(up > r);
        assert!(adapt_step(Some(r), None, base, 3.0, ADAPT_CEILING) > r);
        let mut r = up;
        for _ in 0..100 {
            r = adapt_step(Some(r), fine, base, 3.0, 100 << 20);
        }
        assert_eq!(r, 100 << 20, "capped by --recovery-bytes-per-sec");
        assert_eq!(adapt_step(None, slow, base, 3.0, 1 << 20), 1 << 20);
        assert_eq!(parse_latency_factor("off"), Ok(0.0));
        assert_eq!(parse_latency_factor("0"), Ok(0.0));
        assert_eq!(parse_latency_factor("2.5"), Ok(2.5));
        assert!(parse_latency_factor("0.5").is_err());
        assert!(parse_latency_factor("x").is_err());
        assert!(parse_latency_factor("inf").is_err());
    }

    // Proves a read lease lasts three quarters of the grace from the
    // heartbeat's sending, never longer, and needs the answered epoch's map.
    #[test]
    fn read_lease() {
        let t0 = Instant::now();
        let grace = Duration::from_millis(2000);
        assert!(
            !Lease::default().allows(t0, 100),
            "no heartbeat yet: no lease"
        );
        let l = Lease::renewed(t0, 7, grace);
        assert!(l.allows(t0, 7));
        assert!(l.allows(t0 + Duration::from_millis(1499), 8));
        assert!(!l.allows(t0 + Duration::from_millis(1500), 7), "expired");
        assert!(!l.allows(t0 + grace, 7));
        assert!(!l.allows(t0, 6), "map older than the manager's answer");
    }

    // Proves a replication frame built from pieces (header and fields, the
    // shared data, the CRC) reads back as the message sent, its data read
    // apart into an aligned buffer whatever the reader's buffering, and a
    // flipped byte anywhere in the payload is a CRC failure that leaves
    // the stream at the next frame.
    #[test]
    fn repl_frames_round_trip() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let bytes: Vec<u8> = (0..3 * 4096 + 512u32)
            .map(|i| (i * 31 % 253) as u8)
            .collect();
        let extent = |length: u32| repl::Extent {
            volume_id: 7,
            chunk_index: 3,
            offset: 8192,
            length,
        };
        let seq = repl::Seq { term: 2, n: 9 };
        let write = |d: Payload| repl::Body::Replicate {
            update: repl::Update {
                seq,
                extent: extent(d.len() as u32),
                change: repl::Change::Write(d),
                fua: false,
            },
            committed: seq,
            trim: seq,
            cas: Some(77),
        };
        let mut with_crcs = Payload::copy_from(&bytes);
        with_crcs.compute_block_crcs();
        let bodies = vec![
            write(Payload::copy_from(&bytes)),
            write(with_crcs),
            repl::Body::Fetched {
                id: 4,
                ok: true,
                extent: extent(8192),
                data: Some(Payload::copy_from(&bytes[..8192])),
            },
            repl::Body::Ack {
                seq,
                result: repl::AckResult::Ok,
            },
        ];
        for body in bodies {
            let m = repl::Msg {
                pg: 1,
                from: 2,
                to: 3,
                epoch: 11,
                body,
            };
            let f = repl_frame(&m);
            let mut wire = f.head.clone();
            if let Some(d) = &f.data {
                wire.extend_from_slice(d);
            }
            wire.extend_from_slice(&f.crc);
            let h = Header::decode(wire[..HEADER_SIZE].try_into().expect("header")).expect("valid");
            assert_eq!(h.payload_len as usize, wire.len() - HEADER_SIZE);
            let flips = [
                None,
                Some(HEADER_SIZE + 9),
                Some(wire.len().saturating_sub(100).max(HEADER_SIZE)),
                Some(wire.len() - 1),
            ];
            for cap in [64, 32 * 1024] {
                for flip in flips {
                    let mut w = wire.clone();
                    if let Some(at) = flip {
                        w[at] ^= 0x10;
                    }
                    w.extend_from_slice(b"next");
                    rt.block_on(async {
                        let mut rd = BufReader::with_capacity(cap, &w[HEADER_SIZE..]);
                        let got = read_repl(&mut rd, h.payload_len as usize)
                            .await
                            .unwrap_or_else(|e| {
                                panic!("{e} flip {flip:?} cap {cap} len {}", w.len())
                            });
                        match (flip, got) {
                            (None, Some((body, data))) => {
                                let d = repl::codec::decode_with(&body, data, 3, 11);
                                assert_eq!(d.expect("decodes"), m);
                            }
                            (Some(_), None) => {}
                            (flip, got) => panic!("flip {flip:?}: {:?}", got.map(|g| g.0.len())),
                        }
                        let mut rest = Vec::new();
                        rd.read_to_end(&mut rest).await.expect("rest");
                        assert_eq!(rest, b"next");
                    });
                }
            }
        }
    }

    // Proves --disk parsing accepts PATH and PATH,size=SIZE and rejects the rest.
    #[test]
    fn disk_spec() {
        let d = DiskSpec::parse("/tmp/a.img,size=4G").expect("valid");
        assert_eq!(d.create_size, Some(4 << 30));
        assert_eq!(
            DiskSpec::parse("/dev/sdb").expect("valid").create_size,
            None
        );
        assert!(DiskSpec::parse("").is_err());
        assert!(DiskSpec::parse("/x,color=red").is_err());
        assert!(DiskSpec::parse("/x,size=lots").is_err());
    }
}

// ---- replication driver ----------------------------------------------------
//
// One thread owns the `Replicator` of this daemon's disks and turns its
// effects into engine requests, messages to peer daemons, replies to
// gateways and reports to the manager. Everything reaches it through one
// channel (`ReplIn`), so the state machine sees a single ordered stream of
// inputs, exactly as in the simulation.

use crate::replication::{
    self as repl, ClientResult, Effect as ReplEffect, Input as ReplInput, Replicator,
};

/// How often the replication state machine is ticked (resends, flush
/// rounds that trim logs).
const REPL_TICK: Duration = Duration::from_millis(100);
/// Messages queued towards one peer daemon before new ones are dropped
/// (the state machine resends what is not answered).
const PEER_QUEUE_MAX: usize = 8192;

type Data = Payload;

/// What an engine request of the driver was for.
#[derive(Debug, Clone, Copy)]
enum ReplKind {
    Apply,
    Read(repl::Extent),
    Digest,
    List(u32),
    Flush,
    /// The driver's own listing of a disk, for chunks of groups it left.
    Purge(u32),
    /// A trim of such a chunk (nothing to do with the answer).
    Purged,
    /// A primary's staged write (`Effect::Stage`).
    Stage(StageKey),
    /// Giving back a staged write no `Apply` came for.
    Discarded,
    /// A disk forgetting group-log entries (`Request::TrimLog`) or
    /// marking a group's log floor (`Request::LogFloor`).
    LogTrimmed,
}

/// A primary's change as `Effect::Stage` and its later `Effect::Apply`
/// name it: (disk, sequence, volume, chunk). Sequences are per group and a
/// chunk belongs to one group, so this is unique on the daemon.
type StageKey = (u32, repl::Seq, u64, u32);

fn stage_key(disk: u32, u: &repl::Update<Data>) -> StageKey {
    (disk, u.seq, u.extent.volume_id, u.extent.chunk_index)
}

/// The engine's name for a change's entry in group `pg`'s log.
fn log_tag(note: Option<repl::LogNote>, u: &repl::Update<Data>) -> Option<engine::LogTag> {
    note.map(|note| engine::LogTag {
        pg: note.pg,
        term: u.seq.term,
        n: u.seq.n,
        cas: note.cas,
    })
}

/// A staged write of this daemon's own copy (the parallel primary write,
/// docs/replication.md).
struct StageSlot {
    /// The engine's name for it.
    id: u64,
    /// What was staged: an `Apply` of another extent under the same key
    /// (none is expected) writes the ordinary way.
    extent: repl::Extent,
    /// The `Apply` that came while the data was still being written: it
    /// maps the data once written (or writes it the ordinary way if the
    /// staging failed).
    apply: Option<(u64, repl::Update<Data>, Option<repl::LogNote>)>,
    written: bool,
    at: Instant,
}

/// How often the adaptive recovery throttle decides, and over how many
/// client writes at least (`Driver::adapt_rate`).
const ADAPT_EVERY: Duration = Duration::from_millis(500);
const LAT_SAMPLES_MIN: usize = 20;
const LAT_SAMPLES_MAX: usize = 65_536;
/// Its rates: where it starts when recovery begins, its floor, its step up
/// and its ceiling without `--recovery-bytes-per-sec`.
const ADAPT_START: u64 = 64 << 20;
const ADAPT_FLOOR: u64 = 8 << 20;
const ADAPT_STEP: u64 = 4 << 20;
const ADAPT_CEILING: u64 = 4 << 30;

/// A staged write whose `Apply` has not come by then is given back (the
/// primary dropped the change, or it waited that long for a replica; a late
/// `Apply` then writes the data the ordinary way).
const STAGE_TTL: Duration = Duration::from_secs(5);

/// A gateway request waiting for the replication of its change.
struct PendingReply {
    header: Header,
    tx: tmpsc::UnboundedSender<Outgoing>,
    permit: tokio::sync::OwnedSemaphorePermit,
    started: Instant,
}

/// The driver's input channel. The driver is a task of the daemon's one
/// runtime thread, next to the sockets and the engines, so a replicated
/// write crosses no thread on its way through a daemon (the driver was a
/// thread of its own: 4 wake-ups of another thread per copy and per write,
/// most of the cost of a three-copy write on a 2-core machine, measured in
/// docs/replication.md).
type ReplTx = tmpsc::UnboundedSender<ReplIn>;

enum ReplIn {
    Input(ReplInput<Data>),
    Client {
        pg: u32,
        disk: u32,
        extent: repl::Extent,
        change: repl::Change<Data>,
        fua: bool,
        reply: PendingReply,
    },
    Engine {
        token: u64,
        kind: ReplKind,
        result: Result<Reply, EngineError>,
    },
    CompareAndWrite {
        pg: u32,
        disk: u32,
        extent: repl::Extent,
        compare: Data,
        data: Data,
        token: u64,
        fua: bool,
        reply: PendingReply,
    },
    /// The link to the peer daemon at this address broke.
    PeerLost(String),
    /// A client read of a replicated group found a block failing its CRC.
    ReadRepair {
        pg: u32,
        attempt: u32,
        reply: PendingReply,
    },
}

/// Connections to peer daemons for one-way replication messages.
struct Peers {
    rt: tokio::runtime::Handle,
    /// The driver's input, told when a link breaks (`ReplIn::PeerLost`).
    driver: ReplTx,
    cluster_id: String,
    conns: Mutex<BTreeMap<String, tmpsc::Sender<PeerFrame>>>,
}

/// One frame for a peer daemon: header and message fields, the message's
/// data as the shared buffer it lies in (a write sent to two replicas is
/// never copied: the socket writer gathers the pieces), and the CRC.
struct PeerFrame {
    head: Vec<u8>,
    data: Option<Payload>,
    crc: [u8; 4],
}

impl PeerFrame {
    /// Header `h` (its payload length set here), `body`, then `data`, and
    /// the CRC over body and data (over the data from its per-block CRCs
    /// when they were computed on arrival).
    fn new(mut h: Header, body: &[u8], data: Option<Payload>) -> PeerFrame {
        let mut crc = tessera_wire::crc32c(body);
        let mut len = body.len();
        if let Some(d) = &data {
            crc = d.crc_append(crc);
            len += d.len();
        }
        h.payload_len = (len + 4) as u32;
        let mut head = Vec::with_capacity(HEADER_SIZE + body.len());
        head.extend_from_slice(&h.to_bytes());
        head.extend_from_slice(body);
        PeerFrame {
            head,
            data,
            crc: crc.to_le_bytes(),
        }
    }
}

impl Peers {
    fn send(&self, addr: &str, frame: PeerFrame) {
        let mut conns = self.conns.lock().expect("peers");
        let tx = match conns.get(addr) {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let (tx, rx) = tmpsc::channel(PEER_QUEUE_MAX);
                let (a, id) = (addr.to_string(), self.cluster_id.clone());
                self.rt.spawn(peer_task(a, id, rx, self.driver.clone()));
                conns.insert(addr.to_string(), tx.clone());
                tx
            }
        };
        // Full or closed: the message is lost, as on a broken link; the
        // state machine sends it again.
        let _ = tx.try_send(frame);
    }
}

async fn peer_task(
    addr: String,
    cluster_id: String,
    rx: tmpsc::Receiver<PeerFrame>,
    driver: ReplTx,
) {
    // A peer on this host over its Unix socket, else TCP (`unix_link`).
    if let Some(stream) = tessera_gateway::unix_link::connect(&addr) {
        let (rd, wr) = stream.into_split();
        return peer_link(addr, "unix", cluster_id, rx, driver, rd, wr).await;
    }
    let connect = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(&addr));
    let Ok(Ok(stream)) = connect.await else {
        tracing::debug!(%addr, "cannot reach peer daemon");
        return;
    };
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    peer_link(addr, "tcp", cluster_id, rx, driver, rd, wr).await
}

/// Send `rx`'s frames to a peer over a connected stream until either end
/// closes it.
async fn peer_link<R, W>(
    addr: String,
    via: &str,
    cluster_id: String,
    mut rx: tmpsc::Receiver<PeerFrame>,
    driver: ReplTx,
    mut rd: R,
    wr: W,
) where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin,
{
    tracing::info!(%addr, via, "replication link to peer daemon");
    // The peer answers only a message it refused (a stale epoch, a bad
    // CRC): read and drop those. The peer's end closing (its process
    // died, or it dropped the link) says at once that
    // whatever it held in memory is gone: the driver settles the groups it
    // was a member of (`Input::MemberLost`), once per link, and the link
    // ends so the next frame for that peer connects again.
    let mut reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    let mut wr = wr;
    let hello = Header::request(Op::Hello, 0, 0);
    let mut frames = vec![PeerFrame::new(hello, cluster_id.as_bytes(), None)];
    let mut scratch = Vec::new();
    let lost = loop {
        // Every frame ready goes in one writev (no copy into a buffer).
        while frames.len() < REPLY_BATCH_MAX
            && let Ok(f) = rx.try_recv()
        {
            frames.push(f);
        }
        let mut g = Gather::new(scratch);
        for f in &frames {
            g.push(&f.head);
            if let Some(d) = &f.data {
                g.push(d);
            }
            g.push(&f.crc);
        }
        match g.write_to(&mut wr).await {
            Ok(s) => scratch = s,
            Err(_) => break true,
        }
        frames.clear();
        tokio::select! {
            f = rx.recv() => match f {
                Some(f) => frames.push(f),
                // This side dropped the link (shutting down).
                None => break false,
            },
            _ = &mut reader => break true,
        }
    };
    reader.abort();
    if lost {
        let _ = driver.send(ReplIn::PeerLost(addr));
    }
}

/// A copy's digest of an extent it read (every block's CRC verified): its
/// CRC32C in the high half xored with FNV-1a over 64-bit words. CRCs are
/// linear (two contents whose difference is a multiple of the polynomial
/// collide whatever the seed), the multiply of FNV is not, so the two
/// together collide far less often than either. Stable across builds and
/// machines, as every copy must compute the same digest.
fn digest_of(data: &[u8]) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        h = (h ^ u64::from_le_bytes(w.try_into().expect("8"))).wrapping_mul(FNV_PRIME);
    }
    for b in words.remainder() {
        h = (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME);
    }
    h ^ (u64::from(tessera_wire::crc32c(data)) << 32) ^ data.len() as u64
}

/// The take-back of a restarted last up-to-date copy, message by message
/// (rare: once per group at such a restart): what each member vouched for,
/// what was fetched and what came back. Summaries at info, each entry and
/// piece at debug (`TESSERA_LOG=info,tessera_storage::daemon=debug`).
fn trace_reclaim(m: &repl::Msg<Data>) {
    match &m.body {
        repl::Body::ReclaimQuery => {
            tracing::info!(
                pg = m.pg,
                from = m.from,
                to = m.to,
                epoch = m.epoch,
                "reclaim: asking"
            );
        }
        repl::Body::ReclaimReply { entries } => {
            tracing::info!(
                pg = m.pg,
                from = m.from,
                to = m.to,
                epoch = m.epoch,
                entries = entries.len(),
                first = ?entries.first().map(|e| e.0),
                last = ?entries.last().map(|e| e.0),
                "reclaim: vouching"
            );
            for (seq, e) in entries {
                tracing::debug!(
                    pg = m.pg,
                    ?seq,
                    chunk = e.chunk_index,
                    offset = e.offset,
                    length = e.length,
                    "reclaim: vouched"
                );
            }
        }
        repl::Body::Fetch { id, extent } => {
            tracing::debug!(
                pg = m.pg,
                to = m.to,
                id,
                chunk = extent.chunk_index,
                offset = extent.offset,
                length = extent.length,
                "fetch"
            );
        }
        repl::Body::Fetched {
            id,
            ok,
            extent,
            data,
        } => {
            tracing::debug!(
                pg = m.pg,
                to = m.to,
                id,
                ok,
                chunk = extent.chunk_index,
                offset = extent.offset,
                length = extent.length,
                zero = data.is_none(),
                "fetched"
            );
        }
        _ => {}
    }
}

/// One `Op::Repl` frame: header, body, the message's data, CRC.
fn repl_frame(m: &repl::Msg<Data>) -> PeerFrame {
    let (body, data) = repl::codec::encode_parts(m);
    let mut h = Header::request(Op::Repl, 0, m.epoch);
    h.disk_id = m.to;
    PeerFrame::new(h, &body, data)
}

struct Driver {
    shared: Arc<Shared>,
    rep: Replicator<Data>,
    tx: ReplTx,
    peers: Peers,
    pending: BTreeMap<u64, PendingReply>,
    /// Client reads waiting for the repair of their copy.
    repair_reads: BTreeMap<u64, (PendingReply, u32, u32)>,
    next_client: u64,
    reports: mpsc::Sender<(u32, u32, u32, u64)>,
    /// Nodes whose process a replication link saw end, for the manager
    /// (`failure_loop`).
    failures: mpsc::Sender<u32>,
    local: std::collections::VecDeque<ReplInput<Data>>,
    /// Counters as last published to the metrics.
    reported: repl::Stats,
    /// The state machine's `active_generation` last published.
    active_published: u64,
    /// (group, disk) pairs of this daemon in the last map seen, and whether
    /// one was lost since the last purge of orphaned chunks (true at start:
    /// groups may have left while the daemon was away).
    held: std::collections::BTreeSet<(u32, u32)>,
    purge_due: bool,
    /// When the next timed scrub starts.
    next_scrub: Option<Instant>,
    /// The manager's scrub request last acted on.
    scrub_generation: u64,
    /// When the byte budget was last refilled (`--recovery-bytes-per-sec`).
    budget_at: Instant,
    /// Recovery bytes counter at the start of the current rate window.
    rate_sample: (Instant, u64),
    /// Staged writes of changes this daemon leads, until their `Apply`.
    staged: HashMap<StageKey, StageSlot>,
    next_stage_id: u64,
    /// Client write latencies completed here since the last throttle
    /// decision (the adaptive recovery throttle).
    write_lat: Vec<Duration>,
    /// p90 of client write latency while no led group recovers (EWMA over
    /// decision windows), seconds.
    lat_baseline: Option<f64>,
    /// The adaptive throttle's current rate while recovering.
    adaptive_rate: Option<u64>,
    /// When the throttle last decided.
    adapt_at: Instant,
    /// Whether a byte budget was ever granted (from then on pushes need
    /// one, so it must keep being granted).
    budget_granted: bool,
}

fn status_of_client(r: ClientResult) -> Status {
    match r {
        ClientResult::Ok => Status::Ok,
        // Not the primary (any more), still peering or too few copies: the
        // gateway refreshes its map and tries again, so clients see a pause.
        ClientResult::Retry => Status::WrongDisk,
        ClientResult::Failed => Status::Io,
        ClientResult::Miscompare(_) => Status::Miscompare,
    }
}

impl Driver {
    async fn run(mut self, mut rx: tmpsc::UnboundedReceiver<ReplIn>) {
        let mut next_tick = Instant::now() + REPL_TICK;
        loop {
            let deadline = tokio::time::Instant::from_std(next_tick);
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => {
                        self.input(m);
                        // What is already queued goes through in the same
                        // turn, but not without end: the engines and the
                        // sockets share this thread.
                        for _ in 0..256 {
                            let Ok(m) = rx.try_recv() else { break };
                            self.input(m);
                        }
                    }
                    None => return,
                },
                _ = tokio::time::sleep_until(deadline) => {}
            }
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + REPL_TICK;
                self.schedule_scrub();
                self.refill_budget();
                self.apply_pauses();
                self.expire_stages();
                self.feed(ReplInput::Tick);
                self.trim_logs();
                self.publish_stats();
            }
            self.publish_active();
        }
    }

    fn input(&mut self, m: ReplIn) {
        match m {
            ReplIn::Input(ReplInput::Map(map)) => {
                let held = self.held_in(&map);
                if self.held.iter().any(|k| !held.contains(k)) {
                    self.purge_due = true;
                }
                self.held = held;
                self.feed(ReplInput::Map(map));
                if self.purge_due {
                    self.purge_due = false;
                    self.start_purge();
                }
            }
            ReplIn::Input(i) => self.feed(i),
            ReplIn::Client {
                pg,
                disk,
                extent,
                change,
                fua,
                reply,
            } => {
                let client = self.next_client;
                self.next_client += 1;
                self.pending.insert(client, reply);
                self.feed(ReplInput::Client {
                    pg,
                    disk,
                    client,
                    extent,
                    change,
                    fua,
                });
            }
            ReplIn::CompareAndWrite {
                pg,
                disk,
                extent,
                compare,
                data,
                token,
                fua,
                reply,
            } => {
                let client = self.next_client;
                self.next_client += 1;
                self.pending.insert(client, reply);
                self.feed(ReplInput::CompareAndWrite {
                    pg,
                    disk,
                    client,
                    extent,
                    compare,
                    data,
                    token,
                    fua,
                });
            }
            ReplIn::Engine {
                kind: ReplKind::Purge(disk),
                result,
                ..
            } => {
                if let Ok(Reply::Allocated(list)) = result {
                    self.purge(disk, list);
                }
            }
            ReplIn::Engine {
                kind: ReplKind::Purged | ReplKind::Discarded | ReplKind::LogTrimmed,
                ..
            } => {}
            ReplIn::Engine {
                kind: ReplKind::Stage(k),
                result,
                ..
            } => self.staged_done(k, result.is_ok()),
            ReplIn::Engine {
                token,
                kind,
                result,
            } => {
                let input = match kind {
                    ReplKind::Purge(_)
                    | ReplKind::Purged
                    | ReplKind::Stage(_)
                    | ReplKind::Discarded
                    | ReplKind::LogTrimmed => unreachable!("handled above"),
                    // A checksum error on a write: a partial block's merge
                    // read a corrupt block (nothing was written); the state
                    // machine repairs the copy from a good one.
                    ReplKind::Apply if matches!(result, Err(EngineError::Checksum)) => {
                        ReplInput::ApplyBadBlock { token }
                    }
                    ReplKind::Apply => ReplInput::Applied {
                        token,
                        ok: result.is_ok(),
                    },
                    ReplKind::Flush => ReplInput::Flushed {
                        token,
                        ok: result.is_ok(),
                    },
                    ReplKind::Read(extent) => match result {
                        Ok(Reply::Data(d)) => {
                            let zero = d.slices().all(|s| s.iter().all(|b| *b == 0));
                            ReplInput::ReadDone {
                                token,
                                extent,
                                data: (!zero).then(|| Payload::from_read(d)),
                            }
                        }
                        // A block failed its CRC (or the disk the read):
                        // the state machine repairs this copy.
                        Err(EngineError::Checksum) | Err(EngineError::Io(_)) => {
                            ReplInput::ReadFailed { token }
                        }
                        // Refused (the volume went away meanwhile):
                        // nothing read.
                        _ => ReplInput::ReadDone {
                            token,
                            extent: repl::Extent {
                                length: 0,
                                ..extent
                            },
                            data: None,
                        },
                    },
                    ReplKind::Digest => ReplInput::Digested {
                        token,
                        digest: match result {
                            Ok(Reply::Data(d)) => repl::Digest::Sum(digest_of(&d.into_vec())),
                            _ => repl::Digest::Bad,
                        },
                    },
                    ReplKind::List(pg) => {
                        let map = self.shared.map();
                        let mut regions = Vec::new();
                        if let Ok(Reply::Allocated(list)) = result {
                            for (k, mask) in list {
                                if map.pg_for(k.volume_id, k.chunk_index) != Some(pg) {
                                    continue;
                                }
                                for i in 0..64 {
                                    if mask & (1 << i) != 0 {
                                        regions.push(repl::Region {
                                            volume_id: k.volume_id,
                                            chunk_index: k.chunk_index,
                                            index: i,
                                        });
                                    }
                                }
                            }
                        }
                        ReplInput::Regions { token, regions }
                    }
                };
                self.feed(input);
            }
            ReplIn::PeerLost(addr) => {
                let map = self.shared.map();
                for n in map.nodes.iter().filter(|n| n.addr == addr && n.up) {
                    let _ = self.failures.send(n.id);
                }
                let disks: Vec<u32> = map
                    .nodes
                    .iter()
                    .filter(|n| n.addr == addr)
                    .flat_map(|n| map.disks.iter().filter(move |d| d.node_id == n.id))
                    .map(|d| d.id)
                    .collect();
                for disk in disks {
                    self.feed(ReplInput::MemberLost { disk });
                }
            }
            ReplIn::ReadRepair { pg, attempt, reply } => {
                let client = self.next_client;
                self.next_client += 1;
                let h = reply.header;
                self.repair_reads.insert(client, (reply, pg, attempt));
                self.feed(ReplInput::Repair {
                    pg,
                    disk: h.disk_id,
                    client,
                    extent: repl::Extent {
                        volume_id: h.volume_id,
                        chunk_index: h.chunk_index,
                        offset: h.offset,
                        length: h.length,
                    },
                });
            }
        }
    }

    /// The (group, disk) pairs of this daemon's disks in `map`.
    fn held_in(&self, map: &ClusterMap) -> std::collections::BTreeSet<(u32, u32)> {
        let disks = self.shared.disks.read().expect("disks");
        map.pgs
            .iter()
            .enumerate()
            .flat_map(|(pg, set)| {
                set.iter()
                    .filter(|d| disks.contains_key(d))
                    .map(move |d| (pg as u32, *d))
            })
            .collect()
    }

    /// List every disk's chunks; `purge` frees those of groups the disk no
    /// longer holds.
    fn start_purge(&mut self) {
        let disks: Vec<u32> = self
            .shared
            .disks
            .read()
            .expect("disks")
            .keys()
            .copied()
            .collect();
        for disk in disks {
            self.engine(disk, 0, ReplKind::Purge(disk), Request::ListAllocated);
        }
    }

    /// Trim every chunk of `list` whose group `disk` holds neither in the
    /// newest map this daemon knows nor in its state machine: a group that
    /// left it (taken out, rebalanced away) while its chunks stayed. Safe
    /// because the map only moves forward and the manager removes a copy
    /// only when other up-to-date copies exist; if the group comes back
    /// later, it comes back as a backfill member (a full resync that
    /// rewrites every region), and its changes can reach the engine only
    /// after the map that adds it, so after these trims in the engine's
    /// queue. Chunks of volumes the map does not know are left alone
    /// (deleted volumes are dropped by their own path).
    fn purge(&mut self, disk: u32, list: Vec<(ChunkKey, u64)>) {
        let map = self.shared.map();
        let mut freed = 0u64;
        for (key, _) in list {
            let Some(pg) = map.pg_for(key.volume_id, key.chunk_index) else {
                continue;
            };
            let Some(v) = map.volume(key.volume_id) else {
                continue;
            };
            if map.disk_holds(disk, key.volume_id, key.chunk_index)
                || self.rep.holds(pg, disk)
                || self.held.contains(&(pg, disk))
            {
                continue;
            }
            let Ok(length) = u32::try_from(v.chunk_size_bytes) else {
                continue;
            };
            self.engine(
                disk,
                0,
                ReplKind::Purged,
                Request::Trim {
                    key,
                    offset: 0,
                    length,
                    log: None,
                },
            );
            freed += 1;
        }
        if freed > 0 {
            self.shared.metrics.purged_chunks.inc_by(freed);
            tracing::info!(
                disk,
                chunks = freed,
                "freed the chunks of placement groups this disk no longer holds"
            );
        }
    }

    /// Let each disk forget the group-log entries every member holds
    /// durably (once per tick: a late trim only keeps an entry longer).
    fn trim_logs(&mut self) {
        for (disk, pg, t) in self.rep.log_trims() {
            let req = Request::TrimLog {
                pg,
                term: t.term,
                n: t.n,
            };
            self.engine(disk, 0, ReplKind::LogTrimmed, req);
        }
    }

    fn feed(&mut self, input: ReplInput<Data>) {
        self.local.push_back(input);
        while let Some(i) = self.local.pop_front() {
            self.rep.handle(i);
            // A primary's own staged write goes to the disk after the
            // changes to its replicas are on their way: the replicas' write
            // and the round trip are the longer path, so they start first.
            // Safe to reorder: a stage only writes free blocks, and the
            // `Apply` that installs it comes from a later input.
            let mut staged = Vec::new();
            for e in self.rep.take_effects() {
                if matches!(e, ReplEffect::Stage { .. }) {
                    staged.push(e);
                } else {
                    self.effect(e);
                }
            }
            for e in staged {
                self.effect(e);
            }
        }
    }

    /// Clamp an extent to its volume: the last chunk may end mid-region
    /// (empty when the volume is gone).
    fn clamp(&self, extent: repl::Extent) -> repl::Extent {
        let map = self.shared.map();
        let end = map.volume(extent.volume_id).map_or(0, |v| {
            let chunk_start = u64::from(extent.chunk_index) * v.chunk_size_bytes;
            v.size_bytes
                .saturating_sub(chunk_start)
                .min(u64::from(extent.end()))
        });
        let length = end.saturating_sub(u64::from(extent.offset)) as u32;
        repl::Extent { length, ..extent }
    }

    /// A read repair ended: read the repaired copy again for the client, or
    /// answer the error.
    fn after_repair(&mut self, p: PendingReply, pg: u32, attempt: u32, result: ClientResult) {
        let h = p.header;
        let status = match result {
            ClientResult::Ok => match self.disk(h.disk_id) {
                Some(d) => {
                    d.send(EngineMsg::Request(
                        Request::Read {
                            key: ChunkKey {
                                volume_id: h.volume_id,
                                chunk_index: h.chunk_index,
                            },
                            offset: h.offset,
                            length: h.length,
                        },
                        Route::Net {
                            header: h,
                            tx: p.tx,
                            permit: p.permit,
                            started: p.started,
                            repair: Some(RepairRoute {
                                pg,
                                attempt: attempt + 1,
                                tx: self.tx.clone(),
                            }),
                        },
                    ));
                    return;
                }
                None => Status::WrongDisk,
            },
            // Not the place to repair (any more): the gateway refreshes its
            // map and reads at the primary.
            ClientResult::Retry => Status::WrongDisk,
            // No copy holds good data: the error stands. (A repair never
            // answers a miscompare.)
            ClientResult::Failed | ClientResult::Miscompare(_) => Status::Checksum,
        };
        let m = &self.shared.metrics;
        m.errors.with_label_values(&[status_name(status)]).inc();
        let _ = p.tx.send(Outgoing {
            header: h.reply_to(status, 0, 0),
            data: ReadData::default(),
            _permit: Some(p.permit),
        });
    }

    fn disk(&self, id: u32) -> Option<Arc<DiskHandle>> {
        self.shared.disks.read().expect("disks").get(&id).cloned()
    }

    fn engine(&self, disk: u32, token: u64, kind: ReplKind, req: Request) -> bool {
        let Some(d) = self.disk(disk) else {
            return false;
        };
        d.send(EngineMsg::Request(
            req,
            Route::Repl {
                token,
                kind,
                tx: self.tx.clone(),
            },
        ));
        true
    }

    /// Map a staged write as the `Apply` of `token` (its answer is the
    /// `Applied` of that token).
    fn install(&mut self, disk: u32, token: u64, id: u64, fua: bool, log: Option<engine::LogTag>) {
        let req = Request::Install {
            stage: id,
            fua,
            log,
        };
        if !self.engine(disk, token, ReplKind::Apply, req) {
            self.local
                .push_back(ReplInput::Applied { token, ok: false });
        }
    }

    /// A staged write is on disk (or failed).
    fn staged_done(&mut self, k: StageKey, ok: bool) {
        let disk = k.0;
        let Some(mut slot) = self.staged.remove(&k) else {
            return;
        };
        let outcome = |o: &str| self.shared.metrics.staged.with_label_values(&[o]).inc();
        match slot.apply.take() {
            Some((token, update, log)) if ok => {
                outcome("late");
                self.install(disk, token, slot.id, update.fua, log_tag(log, &update))
            }
            // Write it the ordinary way.
            Some((token, update, log)) => {
                outcome("fallback");
                self.effect(ReplEffect::Apply {
                    disk,
                    token,
                    update,
                    log,
                })
            }
            None if ok => {
                slot.written = true;
                self.staged.insert(k, slot);
            }
            // The `Apply`, if it comes, writes the ordinary way.
            None => {}
        }
    }

    /// Give back staged writes whose `Apply` did not come within
    /// `STAGE_TTL` (not those still being written: their completion finds
    /// them).
    fn expire_stages(&mut self) {
        let now = Instant::now();
        let old: Vec<StageKey> = self
            .staged
            .iter()
            .filter(|(_, s)| s.written && now.duration_since(s.at) >= STAGE_TTL)
            .map(|(k, _)| *k)
            .collect();
        for k in old {
            let slot = self.staged.remove(&k).expect("listed");
            self.shared
                .metrics
                .staged
                .with_label_values(&["discarded"])
                .inc();
            self.engine(
                k.0,
                0,
                ReplKind::Discarded,
                Request::Discard { stage: slot.id },
            );
        }
    }

    fn effect(&mut self, e: ReplEffect<Data>) {
        let key = |e: &repl::Extent| ChunkKey {
            volume_id: e.volume_id,
            chunk_index: e.chunk_index,
        };
        match e {
            ReplEffect::Send(m) => {
                trace_reclaim(&m);
                if self.shared.disks.read().expect("disks").contains_key(&m.to) {
                    self.local.push_back(ReplInput::Msg(m));
                    return;
                }
                let map = self.shared.map();
                let Some(addr) = map
                    .disk(m.to)
                    .and_then(|d| map.node(d.node_id))
                    .map(|n| n.addr.clone())
                else {
                    return;
                };
                self.peers.send(&addr, repl_frame(&m));
            }
            ReplEffect::Stage { disk, update } => {
                let repl::Change::Write(data) = &update.change else {
                    return;
                };
                let aligned = |v: u32| v.is_multiple_of(repl::BLOCK_BYTES);
                if !aligned(update.extent.offset) || !aligned(update.extent.length) {
                    return;
                }
                let k = stage_key(disk, &update);
                let id = self.next_stage_id;
                self.next_stage_id += 1;
                let req = Request::Stage {
                    key: key(&update.extent),
                    offset: update.extent.offset,
                    data: data.clone(),
                    id,
                };
                if self.engine(disk, 0, ReplKind::Stage(k), req) {
                    self.staged.insert(
                        k,
                        StageSlot {
                            id,
                            extent: update.extent,
                            apply: None,
                            written: false,
                            at: Instant::now(),
                        },
                    );
                }
            }
            ReplEffect::LogEntries { disk, pg, entries } => {
                let entries = entries
                    .into_iter()
                    .map(|(s, e)| {
                        let key = engine::ChunkKey {
                            volume_id: e.volume_id,
                            chunk_index: e.chunk_index,
                        };
                        (s.term, s.n, key, e.offset, e.length)
                    })
                    .collect();
                self.engine(
                    disk,
                    0,
                    ReplKind::LogTrimmed,
                    Request::LogAdd { pg, entries },
                );
            }
            ReplEffect::LogFloor {
                disk,
                pg,
                floor,
                complete,
            } => {
                let req = Request::LogFloor {
                    pg,
                    term: floor.term,
                    n: floor.n,
                    complete,
                };
                self.engine(disk, 0, ReplKind::LogTrimmed, req);
            }
            ReplEffect::ForgetLog { disk, pg } => {
                let (term, n) = engine::LOG_FORGET;
                self.engine(
                    disk,
                    0,
                    ReplKind::LogTrimmed,
                    Request::TrimLog { pg, term, n },
                );
            }
            ReplEffect::Apply {
                disk,
                token,
                update,
                log,
            } => {
                let k = stage_key(disk, &update);
                let matching = self.staged.get(&k).is_some_and(|slot| {
                    slot.extent == update.extent && matches!(update.change, repl::Change::Write(_))
                });
                if !matching && let Some(slot) = self.staged.remove(&k) {
                    // Not the staged change (none is expected): give it
                    // back once written, write this one the ordinary way.
                    if slot.written {
                        self.engine(
                            k.0,
                            0,
                            ReplKind::Discarded,
                            Request::Discard { stage: slot.id },
                        );
                    } else {
                        self.staged.insert(
                            k,
                            StageSlot {
                                apply: None,
                                ..slot
                            },
                        );
                    }
                }
                let staged = if matching {
                    self.staged.remove(&k)
                } else {
                    None
                };
                if let Some(mut slot) = staged {
                    if slot.written {
                        self.shared
                            .metrics
                            .staged
                            .with_label_values(&["installed"])
                            .inc();
                        self.install(disk, token, slot.id, update.fua, log_tag(log, &update));
                    } else {
                        // Still being written: mapped when it is.
                        slot.apply = Some((token, update, log));
                        self.staged
                            .insert(stage_key(disk, &slot.apply.as_ref().expect("set").1), slot);
                    }
                    return;
                }
                let k = key(&update.extent);
                let log = log_tag(log, &update);
                let req = match update.change {
                    repl::Change::Write(d) => Request::Write {
                        key: k,
                        offset: update.extent.offset,
                        data: d,
                        fua: update.fua,
                        log,
                    },
                    repl::Change::Zeroes => Request::WriteZeroes {
                        key: k,
                        offset: update.extent.offset,
                        length: update.extent.length,
                        fua: update.fua,
                        log,
                    },
                    repl::Change::Trim => Request::Trim {
                        key: k,
                        offset: update.extent.offset,
                        length: update.extent.length,
                        log,
                    },
                };
                if !self.engine(disk, token, ReplKind::Apply, req) {
                    self.local
                        .push_back(ReplInput::Applied { token, ok: false });
                }
            }
            ReplEffect::Read {
                disk,
                token,
                extent,
            } => {
                let extent = self.clamp(extent);
                let length = extent.length;
                let sent = length > 0
                    && self.engine(
                        disk,
                        token,
                        ReplKind::Read(extent),
                        Request::Read {
                            key: key(&extent),
                            offset: extent.offset,
                            length,
                        },
                    );
                if !sent {
                    self.local.push_back(ReplInput::ReadDone {
                        token,
                        extent: repl::Extent {
                            length: 0,
                            ..extent
                        },
                        data: None,
                    });
                }
            }
            ReplEffect::Digest {
                disk,
                token,
                extent,
            } => {
                let extent = self.clamp(extent);
                let sent = extent.length > 0
                    && self.engine(
                        disk,
                        token,
                        ReplKind::Digest,
                        Request::Read {
                            key: key(&extent),
                            offset: extent.offset,
                            length: extent.length,
                        },
                    );
                if !sent {
                    // Nothing of the volume there (or no such disk): every
                    // copy digests it alike.
                    self.local.push_back(ReplInput::Digested {
                        token,
                        digest: repl::Digest::Sum(digest_of(&[])),
                    });
                }
            }
            ReplEffect::ListRegions { disk, token, pg } => {
                if !self.engine(disk, token, ReplKind::List(pg), Request::ListAllocated) {
                    self.local.push_back(ReplInput::Regions {
                        token,
                        regions: Vec::new(),
                    });
                }
            }
            ReplEffect::Flush { disk, token } => {
                if !self.engine(disk, token, ReplKind::Flush, Request::Flush) {
                    self.local
                        .push_back(ReplInput::Flushed { token, ok: false });
                }
            }
            ReplEffect::Reply { client, result } => {
                if let Some((p, pg, attempt)) = self.repair_reads.remove(&client) {
                    self.after_repair(p, pg, attempt, result);
                    return;
                }
                if let Some(p) = self.pending.remove(&client) {
                    let status = status_of_client(result);
                    let took = p.started.elapsed();
                    if p.header.op == Op::Write && self.write_lat.len() < LAT_SAMPLES_MAX {
                        self.write_lat.push(took);
                    }
                    count_answer(&self.shared.metrics, p.header.op, status, took);
                    let mut header = p.header.reply_to(status, 0, 0);
                    if let ClientResult::Miscompare(at) = result {
                        header.chunk_version = u64::from(at);
                    }
                    let _ = p.tx.send(Outgoing {
                        header,
                        data: ReadData::default(),
                        _permit: Some(p.permit),
                    });
                }
            }
            ReplEffect::ReportClean { pg, disk, epoch } => {
                let map = self.shared.map();
                if let Some(reporter) = map.primary(pg) {
                    let _ = self.reports.send((pg, disk, reporter, epoch));
                }
            }
            ReplEffect::NeedMap => {
                let _ = self.shared.refresh_tx.lock().expect("refresh").send(());
            }
        }
    }

    /// Start a scrub when the manager asked for one or the interval
    /// passed; note a requested scrub done once no group scrubs any more.
    fn schedule_scrub(&mut self) {
        let wanted = self.shared.scrub_requested.load(Ordering::Relaxed);
        let timed = self.next_scrub.is_some_and(|t| Instant::now() >= t);
        if timed {
            self.next_scrub = self
                .shared
                .config
                .scrub_interval
                .map(|i| Instant::now() + i);
        }
        let asked = wanted > self.scrub_generation;
        if asked || timed {
            self.feed(ReplInput::Scrub { pg: None });
        }
        if asked {
            self.scrub_generation = wanted;
        }
        if self.rep.summary().scrubbing == 0 {
            let mut st = self.shared.scrub_state.lock().expect("scrub state");
            st.generation_done = st.generation_done.max(self.scrub_generation);
        }
    }

    /// Let the network side know which groups may serve reads here.
    fn publish_active(&mut self) {
        let generation = self.rep.active_generation();
        if generation == self.active_published {
            return;
        }
        self.active_published = generation;
        let active = self.rep.active_primaries();
        let mut cur = self.shared.active.write().expect("active");
        if *cur != active {
            *cur = active;
        }
    }

    /// The operator's `norecover` / `nobackfill` switches, as the last
    /// heartbeat answer gave them.
    fn apply_pauses(&mut self) {
        let recovery = self.shared.recovery_paused.load(Ordering::Relaxed);
        let backfill = self.shared.backfill_paused.load(Ordering::Relaxed);
        if self.rep.recovery_paused() != (recovery, backfill) {
            tracing::info!(recovery, backfill, "recovery pause switches changed");
            self.rep.set_recovery_paused(recovery, backfill);
        }
        let m = &self.shared.metrics.recovery_paused;
        m.with_label_values(&["recovery"]).set(i64::from(recovery));
        m.with_label_values(&["backfill"]).set(i64::from(backfill));
    }

    /// The recovery byte budget grows with the time passed, at the rate
    /// `adapt_rate` allows (`--recovery-bytes-per-sec`, or less while the
    /// adaptive throttle protects client writes), bounded to a fifth of a
    /// second's worth (so an idle spell does not allow a burst).
    fn refill_budget(&mut self) {
        let now = Instant::now();
        let dt = now.saturating_duration_since(self.budget_at);
        self.budget_at = now;
        let rate = self.adapt_rate(now);
        self.shared
            .metrics
            .recovery_limit
            .set(rate.map_or(0, |r| r as i64));
        match rate {
            Some(rate) => {
                self.budget_granted = true;
                let grant = (rate as f64 * dt.as_secs_f64()) as u64;
                self.rep.grant_push_bytes(grant, rate / 5);
            }
            // No limit now, but pushes need budget once one was granted.
            None if self.budget_granted => {
                self.rep.grant_push_bytes(u64::MAX / 4, u64::MAX / 4);
            }
            None => {}
        }
    }

    /// The recovery rate this daemon allows itself now (None: no limit).
    ///
    /// Adaptive throttle (`--recovery-latency-factor F`; off by default):
    /// a backfill (the rebuild of a disk taken out, or a rebalance) shares
    /// the disks with client writes for minutes, and a small write waits
    /// behind large pushes and the syncs that end them (docs/replication.md,
    /// "Where recovery time goes"). So every `ADAPT_EVERY`, from the client
    /// writes this daemon answered as primary meanwhile: with no led group
    /// backfilling, their p90 latency feeds the baseline (EWMA); while some
    /// backfill, a p90 above F x the
    /// baseline cuts the rate (x0.6, not below `ADAPT_FLOOR`, so recovery
    /// always progresses) and one below raises it (x1.25 + `ADAPT_STEP`, up
    /// to `--recovery-bytes-per-sec` or `ADAPT_CEILING`). Too few writes to
    /// judge (none to protect) raise it too. Without a baseline yet (a
    /// daemon that recovers as soon as it starts) it does not throttle.
    /// Measured, not a guarantee: the replicas' disks are shared too.
    fn adapt_rate(&mut self, now: Instant) -> Option<u64> {
        let limit = self.shared.config.recovery_bytes_per_sec;
        let configured = (limit > 0).then_some(limit);
        let factor = self.shared.config.recovery_latency_factor;
        if factor <= 0.0 {
            return configured;
        }
        if now.saturating_duration_since(self.adapt_at) < ADAPT_EVERY {
            return self.adaptive_rate.or(configured);
        }
        self.adapt_at = now;
        let p90 = (self.write_lat.len() >= LAT_SAMPLES_MIN).then(|| {
            let mut v = std::mem::take(&mut self.write_lat);
            let i = (v.len() * 9 / 10).min(v.len() - 1);
            let (_, x, _) = v.select_nth_unstable(i);
            x.as_secs_f64()
        });
        self.write_lat.clear();
        // Backfill only: a rebuild runs for minutes and can wait; a delta
        // recovery (a daemon back after a short absence) restores
        // redundancy in seconds and goes at full speed.
        let s = self.rep.summary();
        if s.backfilling == 0 {
            if let Some(p) = p90 {
                self.lat_baseline = Some(self.lat_baseline.map_or(p, |b| b * 0.8 + p * 0.2));
            }
            self.adaptive_rate = None;
            return configured;
        }
        let Some(base) = self.lat_baseline else {
            return configured;
        };
        let r = adapt_step(
            self.adaptive_rate,
            p90,
            base,
            factor,
            configured.unwrap_or(ADAPT_CEILING),
        );
        self.adaptive_rate = Some(r);
        Some(r)
    }

    fn publish_stats(&mut self) {
        let s = self.rep.summary();
        let m = &self.shared.metrics;
        m.pgs_primary.set(i64::from(s.primaries));
        m.pgs_degraded.set(i64::from(s.degraded));
        m.pgs_recovering.set(i64::from(s.recovering));
        m.pgs_scrubbing.set(i64::from(s.scrubbing));
        m.pgs_backfilling.set(i64::from(s.backfilling));
        let (now, was) = (&self.rep.stats, &self.reported);
        m.recovery_bytes
            .inc_by(now.recovery_bytes.saturating_sub(was.recovery_bytes));
        m.peering_bytes
            .inc_by(now.peering_bytes.saturating_sub(was.peering_bytes));
        m.reclaimed_bytes
            .inc_by(now.reclaimed_bytes.saturating_sub(was.reclaimed_bytes));
        m.settles.inc_by(now.settles.saturating_sub(was.settles));
        m.recoveries
            .with_label_values(&["delta"])
            .inc_by(now.delta_recoveries.saturating_sub(was.delta_recoveries));
        m.recoveries
            .with_label_values(&["full"])
            .inc_by(now.full_resyncs.saturating_sub(was.full_resyncs));
        m.repairs.inc_by(now.repairs.saturating_sub(was.repairs));
        m.repair_bytes
            .inc_by(now.repair_bytes.saturating_sub(was.repair_bytes));
        m.unrepairable
            .inc_by(now.unrepairable.saturating_sub(was.unrepairable));
        m.scrubs.inc_by(now.scrubs.saturating_sub(was.scrubs));
        m.scrub_regions
            .inc_by(now.scrub_regions.saturating_sub(was.scrub_regions));
        m.scrub_errors
            .inc_by(now.scrub_errors.saturating_sub(was.scrub_errors));
        self.reported = now.clone();
        // Checksum errors are the reason for repairs: publish them as often
        // as the repair counters (the heartbeat does too, every second).
        for (id, d) in self.shared.disks.read().expect("disks").iter() {
            let errors = d.stats.lock().expect("stats").checksum_errors;
            m.checksum_errors
                .with_label_values(&[&id.to_string()])
                .set(errors as i64);
        }
        let mut st = self.shared.scrub_state.lock().expect("scrub state");
        st.running = s.scrubbing;
        st.scrubs = now.scrubs;
        st.regions = now.scrub_regions;
        st.errors = now.scrub_errors;
        st.repairs = now.repairs;
        st.unrepairable = now.unrepairable;
        drop(st);
        m.publications.inc();
        let bytes = self.rep.stats.recovery_bytes;
        let p = self.rep.progress();
        m.recovery_remaining.set(p.remaining_bytes as i64);
        m.recovery_pushes.set(self.rep.pushes_in_flight() as i64);
        let t = Instant::now();
        let window = t.saturating_duration_since(self.rate_sample.0);
        if window >= Duration::from_secs(1) {
            let rate = bytes.saturating_sub(self.rate_sample.1) as f64 / window.as_secs_f64();
            m.recovery_rate.set(rate as i64);
            self.rate_sample = (t, bytes);
        }
        *self.shared.recovery.lock().expect("recovery") = tessera_wire::api::RecoveryProgress {
            bytes_total: bytes,
            done_bytes: p.done_bytes,
            remaining_bytes: p.remaining_bytes,
            copies_recovering: p.copies_recovering,
            copies_backfilling: p.copies_backfilling,
        };
    }
}

/// Reports recovered copies to the manager (blocking HTTP, off the driver).
fn report_loop(shared: Arc<Shared>, rx: mpsc::Receiver<(u32, u32, u32, u64)>) {
    let agent = http();
    while let Ok(first) = rx.recv() {
        // Everything pending goes in one request: the manager judges a
        // batch against one epoch, so reports do not void each other.
        let mut batch = vec![first];
        std::thread::sleep(Duration::from_millis(20));
        batch.extend(rx.try_iter());
        let body: Vec<tessera_wire::api::CleanReport> = batch
            .iter()
            .map(
                |&(pg, disk, reporter, epoch)| tessera_wire::api::CleanReport {
                    pg,
                    disk_id: disk,
                    reporter_disk_id: reporter,
                    epoch,
                },
            )
            .collect();
        let r = agent
            .post(&format!("{}/v1/pgs/clean", shared.config.manager))
            .send_json(&body);
        match r {
            Ok(_) => tracing::info!(copies = body.len(), "reported copies recovered"),
            Err(e) => tracing::debug!(error = %e, "recovery report refused"),
        }
    }
}

/// Tells the manager of peers whose process ended (blocking HTTP, off the
/// driver): `POST /v1/nodes/{id}/failure`. The manager declares such a node
/// down once it has also missed a little over two heartbeats, instead of
/// waiting out the whole grace (docs/replication.md, "Failure reports").
fn failure_loop(shared: Arc<Shared>, rx: mpsc::Receiver<u32>) {
    let agent = http();
    while let Ok(node) = rx.recv() {
        let me = *shared.node_id.lock().expect("node id");
        if me == 0 || node == me {
            continue;
        }
        let body = tessera_wire::api::FailureReport {
            reporter_node_id: me,
        };
        let r = agent
            .post(&format!(
                "{}/v1/nodes/{node}/failure",
                shared.config.manager
            ))
            .send_json(&body);
        match r {
            Ok(_) => tracing::info!(node, "reported a peer's process gone"),
            Err(e) => tracing::debug!(node, error = %e, "failure report refused"),
        }
    }
}

/// Start the driver for this daemon's disks; returns its input channel.
fn start_driver(shared: Arc<Shared>, rt: tokio::runtime::Handle, registered: u64) -> ReplTx {
    let (tx, rx) = tmpsc::unbounded_channel();
    let (rtx, rrx) = mpsc::channel();
    let (ftx, frx) = mpsc::channel();
    let disks: Vec<u32> = shared
        .disks
        .read()
        .expect("disks")
        .keys()
        .copied()
        .collect();
    let mut rep = Replicator::new(disks.iter().copied());
    for id in &disks {
        let Some(d) = shared.disks.read().expect("disks").get(id).cloned() else {
            continue;
        };
        let entries = std::mem::take(&mut *d.recovered_log.lock().expect("recovered log"));
        let states = std::mem::take(&mut *d.recovered_states.lock().expect("recovered log"));
        tracing::info!(
            disk = id,
            entries = entries.len(),
            groups = states.len(),
            complete = states.iter().filter(|s| s.complete).count(),
            "group-log entries recovered"
        );
        for s in states {
            let seq = |(term, n)| repl::Seq { term, n };
            rep.recover_log_state(*id, s.pg, seq(s.trim), seq(s.floor), s.complete);
        }
        shared
            .metrics
            .log_recovered
            .with_label_values(&[&id.to_string()])
            .set(entries.len() as i64);
        rep.recover_log(
            *id,
            entries.into_iter().map(|e| {
                let seq = repl::Seq {
                    term: e.term,
                    n: e.n,
                };
                let extent = repl::Extent {
                    volume_id: e.key.volume_id,
                    chunk_index: e.key.chunk_index,
                    offset: e.offset,
                    length: e.length,
                };
                (e.pg, seq, extent, e.cas)
            }),
        );
    }
    // The rate limit in 64 KiB regions per tick of the state machine.
    let per_tick = shared.config.scrub_rate_bytes as f64 * REPL_TICK.as_secs_f64()
        / f64::from(repl::REGION_BYTES);
    rep.set_scrub_rate(per_tick.ceil() as usize);
    rep.set_pushes_max(shared.config.recovery_pushes_max);
    rep.set_min_epoch(registered);
    rep.set_push_regions(shared.config.recovery_push_bytes / repl::REGION_BYTES);
    let driver = Driver {
        shared: shared.clone(),
        rep,
        tx: tx.clone(),
        peers: Peers {
            rt: rt.clone(),
            driver: tx.clone(),
            cluster_id: shared.map().cluster_id.clone(),
            conns: Mutex::new(BTreeMap::new()),
        },
        pending: BTreeMap::new(),
        repair_reads: BTreeMap::new(),
        next_client: 1,
        reports: rtx,
        failures: ftx,
        local: std::collections::VecDeque::new(),
        reported: repl::Stats::default(),
        active_published: u64::MAX,
        held: std::collections::BTreeSet::new(),
        purge_due: true,
        next_scrub: shared.config.scrub_interval.map(|i| Instant::now() + i),
        scrub_generation: 0,
        budget_at: Instant::now(),
        rate_sample: (Instant::now(), 0),
        staged: HashMap::new(),
        next_stage_id: 1,
        write_lat: Vec::new(),
        lat_baseline: None,
        adaptive_rate: None,
        adapt_at: Instant::now(),
        budget_granted: false,
    };
    {
        let s = shared.clone();
        std::thread::spawn(move || report_loop(s, rrx));
        let s = shared.clone();
        std::thread::spawn(move || failure_loop(s, frx));
    }
    rt.spawn(driver.run(rx));
    tx
}
