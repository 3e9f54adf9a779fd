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
    #[arg(long, default_value_t = 5000)]
    heartbeat_grace_ms: u64,
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
    };
    match daemon::run(config) {
        Ok(()) => std::process::exit(0),
        Err(f) => {
            eprintln!("tessera-manager: {}", f.message);
            std::process::exit(f.code as i32);
        }
    }
}
