//! `tessera-storage`: parse flags, set up logging, run the daemon, exit with
//! the documented code.
#![deny(unsafe_code)]

use clap::Parser;
use std::net::SocketAddr;
use tessera_storage::daemon::{self, Config, DiskSpec, EngineKind};

/// Tessera storage daemon: owns disks and serves chunk I/O to gateways.
#[derive(Parser, Debug)]
#[command(name = "tessera-storage", version)]
struct Args {
    /// Manager URL.
    #[arg(long, env = "TESSERA_MANAGER", default_value = "http://127.0.0.1:9400")]
    manager: String,
    /// Internal-protocol listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// Address registered with the manager, if not the listen address.
    #[arg(long)]
    advertise: Option<String>,
    /// A disk: block device or file, `PATH[,size=SIZE]` (size creates a
    /// sparse file when PATH does not exist). Repeatable.
    #[arg(long = "disk", required = true, value_parser = DiskSpec::parse)]
    disks: Vec<DiskSpec>,
    /// Prometheus metrics listen address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Also serve every volume over NBD on this address, with the gateway
    /// embedded in this daemon: requests for chunks on this daemon's disks
    /// skip the gateway-to-storage TCP hop (docs/nbd.md). Port 0 picks a
    /// free port.
    #[arg(long)]
    nbd_listen: Option<SocketAddr>,
    /// iSCSI portal of the embedded gateway (repeatable; port 0 picks a
    /// free port).
    #[arg(long = "iscsi-listen")]
    iscsi_listen: Vec<SocketAddr>,
    /// File holding the cluster secret (the manager's
    /// `<data-dir>/cluster-secret`): the embedded gateway reads iSCSI
    /// access control and stores reservations with it.
    #[arg(long, env = "TESSERA_CLUSTER_SECRET_FILE")]
    cluster_secret_file: Option<std::path::PathBuf>,
    /// Disk I/O engine.
    #[arg(long, value_enum, default_value = "uring")]
    engine: EngineKind,
    /// Failure-domain host name of this daemon (empty: the daemon is its
    /// own host).
    #[arg(long, default_value = "")]
    host: String,
    /// Failure-domain rack of this daemon.
    #[arg(long, default_value = "")]
    rack: String,
    /// Failure-domain zone of this daemon.
    #[arg(long, default_value = "")]
    zone: String,
    /// Scrub every placement group this daemon leads this often (30s, 10m,
    /// 24h, 7d; `off`: only when asked with `tessera pg scrub`).
    #[arg(long, default_value = "24h")]
    scrub_interval: String,
    /// Bytes of each copy a scrub reads per second, at most (K, M, G).
    #[arg(long, default_value = "16M", value_parser = tessera_wire::api::parse_size)]
    scrub_rate: u64,
    /// Recovery and backfill pushes (64 KiB regions) in flight at most,
    /// over every group this daemon leads: the throttle that keeps client
    /// latency while a copy is rebuilt.
    #[arg(long, default_value_t = daemon::RECOVERY_PUSHES_DEFAULT,
          value_parser = clap::value_parser!(u32).range(1..=daemon::RECOVERY_PUSHES_MAX as i64))]
    recovery_pushes_max: u32,
    /// Bytes one recovery push carries at most (64K to 1M, whole 64K
    /// regions): contiguous regions to recover go in one read, message and
    /// write; smaller pushes hold a disk that serves one request at a time
    /// for less long.
    #[arg(long, default_value_t = daemon::RECOVERY_PUSH_BYTES_DEFAULT,
          value_parser = daemon::parse_push_size)]
    recovery_push_size: u32,
    /// Recovery bytes pushed per second at most (e.g. 100M; 0: no limit
    /// besides --recovery-pushes-max).
    #[arg(long, default_value = "0", value_parser = tessera_wire::api::parse_size)]
    recovery_bytes_per_sec: u64,
    /// Adaptive backfill throttle: while groups this daemon leads backfill
    /// (a rebuild or a rebalance), slow pushes down whenever its client
    /// writes' p90 latency exceeds this multiple of their p90 without
    /// backfill (e.g. 3; 0 or off: no adaptation, the default: measured on a
    /// one-disk machine it cut the rebuild rate 5x for half the latency
    /// inflation, docs/replication.md). Delta recovery is never slowed.
    #[arg(long, default_value = "off", value_parser = daemon::parse_latency_factor)]
    recovery_latency_factor: f64,
    /// Rewrite the blocks of a read that finds them scattered over many
    /// short physical runs (after random writes) contiguously, so the next
    /// sequential read of them is one disk read (on or off).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    relocate_reads: String,
    /// Microseconds the event loop keeps polling its sockets and disks
    /// after work before it sleeps (0: sleep at once). A wake-up costs more
    /// than a short poll on virtual machines (docs/ARCHITECTURE.md,
    /// "Polling before sleeping").
    #[arg(long, env = "TESSERA_BUSY_POLL_US", default_value_t = tessera_gateway::busy_poll::WINDOW_US_DEFAULT,
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    busy_poll_us: u32,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TESSERA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let scrub_interval = match daemon::parse_interval(&a.scrub_interval) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("tessera-storage: --scrub-interval: {e}");
            std::process::exit(daemon::ExitCode::Config as i32);
        }
    };
    let config = Config {
        manager: a.manager.trim_end_matches('/').to_string(),
        listen: a.listen,
        advertise: a.advertise,
        disks: a.disks,
        metrics_listen: a.metrics_listen,
        nbd_listen: a.nbd_listen,
        iscsi_listen: a.iscsi_listen,
        cluster_secret_file: a.cluster_secret_file,
        engine: a.engine,
        host: a.host,
        zone: a.zone,
        rack: a.rack,
        scrub_interval,
        scrub_rate_bytes: a.scrub_rate,
        recovery_pushes_max: a.recovery_pushes_max as usize,
        recovery_push_bytes: a.recovery_push_size,
        recovery_bytes_per_sec: a.recovery_bytes_per_sec,
        recovery_latency_factor: a.recovery_latency_factor,
        relocate_reads: a.relocate_reads == "on",
        busy_poll: std::time::Duration::from_micros(u64::from(a.busy_poll_us)),
    };
    match daemon::run(config) {
        Ok(()) => std::process::exit(daemon::ExitCode::Ok as i32),
        Err(f) => {
            eprintln!("tessera-storage: {}", f.message);
            std::process::exit(f.code as i32);
        }
    }
}
