//! `tessera-manager`: flags, logging, run, exit with the documented code.
#![deny(unsafe_code)]

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tessera_manager::daemon::{self, Config};

/// Tessera cluster manager: membership, placement, volume catalogue, cluster map.
#[derive(Parser, Debug)]
#[command(name = "tessera-manager", version)]
struct Args {
    /// REST API listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:9400")]
    listen: SocketAddr,
    /// Directory of the catalogue store.
    #[arg(long, default_value = "/var/lib/tessera/manager")]
    data_dir: PathBuf,
    /// Placement groups, fixed when the cluster is created.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pg_count: u32,
    /// A node without heartbeat for this long is marked down.
    #[arg(long, default_value_t = 2000)]
    heartbeat_grace_ms: u64,
    /// A disk down for longer than this (e.g. 10m, 30s, 500ms) is taken
    /// out: its placement groups are re-placed on other disks and rebuilt.
    #[arg(long, default_value = "10m", value_parser = tessera_wire::api::parse_duration)]
    down_out_after: Duration,
    /// Disks are taken out only while at least this fraction of all disks
    /// stays in (like Ceph's mon_osd_min_in_ratio): when much of the
    /// cluster goes silent at once, its groups stay degraded instead of
    /// all being re-placed onto the rest. 0 disables the limit.
    #[arg(long, default_value_t = 0.75, value_parser = tessera_manager::health::parse_ratio)]
    min_in_ratio: f64,
    /// Copies kept by the default pool (used when the cluster is created).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    replicas: u32,
    /// The default pool's min_replicas (default: a majority of --replicas).
    #[arg(long)]
    min_replicas: Option<u32>,
    /// The default pool's failure domain: zone, rack, host or disk.
    #[arg(long, default_value = "host", value_parser = tessera_wire::map::FailureDomain::parse)]
    failure_domain: tessera_wire::map::FailureDomain,
}

fn main() {
    tessera_manager::sys::block_termination_signals();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TESSERA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    let config = Config {
        listen: a.listen,
        data_dir: a.data_dir,
        pg_count: a.pg_count,
        heartbeat_grace: Duration::from_millis(a.heartbeat_grace_ms),
        down_out_after: a.down_out_after,
        min_in_ratio: a.min_in_ratio,
        replicas: a.replicas,
        min_replicas: a
            .min_replicas
            .unwrap_or_else(|| tessera_manager::store::default_min_replicas(a.replicas)),
        failure_domain: a.failure_domain,
    };
    if config.min_replicas == 0 || config.min_replicas > config.replicas {
        eprintln!("tessera-manager: --min-replicas must be between 1 and --replicas");
        std::process::exit(daemon::ExitCode::Config as i32);
    }
    match daemon::run(config) {
        Ok(()) => std::process::exit(0),
        Err(f) => {
            eprintln!("tessera-manager: {}", f.message);
            std::process::exit(f.code as i32);
        }
    }
}
