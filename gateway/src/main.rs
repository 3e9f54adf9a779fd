//! `tessera-gateway`: the thin binary around the library. Parses the
//! configuration, fetches the cluster map, binds the NBD (and metrics)
//! listeners, announces readiness, and serves until SIGTERM/SIGINT.
//!
//! Exit codes (documented in docs/nbd.md; systemd units rely on them):
//! 0 clean shutdown, 2 bad command line (clap), 3 manager unreachable or map
//! invalid, 4 NBD listen address unusable, 5 metrics listen address
//! unusable, 6 runtime could not start, 7 iSCSI listen address unusable,
//! 8 TLS certificate or key unusable. The cluster secret file being
//! unreadable, or refused by the manager, is exit 3 too.

use clap::Parser;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_gateway::client::Pool;
use tessera_gateway::iscsi::access::ManagerAccess;
use tessera_gateway::map::{self, MapHandle};
use tessera_gateway::metrics::Metrics;
use tessera_gateway::routing::{IO_TIMEOUT_MS_DEFAULT, MapCatalog, Router};
use tessera_gateway::{nbd, server};

/// How long to wait for the manager's first map at start.
const STARTUP_MAP_DEADLINE_MS: u64 = 30_000;

#[derive(Debug, Parser)]
#[command(name = "tessera-gateway", about = "Serve Tessera volumes over NBD")]
struct Args {
    /// Cluster manager base URL.
    #[arg(long, env = "TESSERA_MANAGER", default_value = "http://127.0.0.1:9400")]
    manager: String,
    /// NBD listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:10809")]
    nbd_listen: String,
    /// iSCSI portal address (repeatable: every address is a portal of the
    /// same targets; port 0 picks a free port; "none" disables iSCSI).
    #[arg(long = "iscsi-listen", default_value = "0.0.0.0:3260")]
    iscsi_listen: Vec<String>,
    /// Prometheus /metrics listen address; none when absent.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Give up on a storage request (EIO to the client) after this long.
    #[arg(long, default_value_t = IO_TIMEOUT_MS_DEFAULT)]
    io_timeout_ms: u64,
    /// Threads serving connections. 1 (the default) runs everything on one
    /// event loop, which costs the least CPU per request on small machines;
    /// more spread many busy connections over cores.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Microseconds the event loop keeps polling its sockets after work
    /// before it sleeps (0: sleep at once). A wake-up costs more than a
    /// short poll on virtual machines (docs/ARCHITECTURE.md, "Polling
    /// before sleeping"); with --threads 1 only.
    #[arg(long, env = "TESSERA_BUSY_POLL_US", default_value_t = tessera_gateway::busy_poll::WINDOW_US_DEFAULT,
          value_parser = clap::value_parser!(u32).range(0..=10_000))]
    busy_poll_us: u32,
    /// Most NBD connections at once; extra ones are closed at accept.
    #[arg(long, default_value_t = server::CONNECTIONS_MAX,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    nbd_connections_max: usize,
    /// Most requests in flight per NBD connection (then TCP backpressure).
    #[arg(long, default_value_t = nbd::session::INFLIGHT_MAX,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    nbd_inflight_max: usize,
    /// Largest NBD READ/WRITE payload, advertised in NBD_INFO_BLOCK_SIZE:
    /// a multiple of 4096 from 4096 to 32 MiB.
    #[arg(long, default_value_t = nbd::codec::REQUEST_MAX_BYTES, value_parser = request_max)]
    nbd_request_max_bytes: u32,
    /// PEM certificate chain offered by NBD_OPT_STARTTLS (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Refuse every NBD option but STARTTLS and ABORT until TLS is up.
    #[arg(long, requires = "tls_cert")]
    tls_require: bool,
    /// File holding the cluster secret (the manager's
    /// `<data-dir>/cluster-secret`), needed to read iSCSI access control
    /// and store reservations. Without it every iSCSI login to a volume is
    /// refused ("service unavailable").
    #[arg(long, env = "TESSERA_CLUSTER_SECRET_FILE")]
    cluster_secret_file: Option<std::path::PathBuf>,
    /// Time a client has to finish NBD option haggling.
    #[arg(long, default_value_t = server::HANDSHAKE_TIMEOUT_MS,
          value_parser = clap::value_parser!(u64).range(1..))]
    nbd_handshake_timeout_ms: u64,
}

fn request_max(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|e| format!("{e}"))?;
    let (lo, hi) = (
        nbd::codec::PREFERRED_BLOCK_BYTES,
        nbd::codec::REQUEST_MAX_BYTES_LIMIT,
    );
    if v < lo || v > hi || !v.is_multiple_of(lo) {
        return Err(format!("must be a multiple of {lo} between {lo} and {hi}"));
    }
    Ok(v)
}

/// The documented exit codes.
#[derive(Debug, Clone, Copy)]
enum Exit {
    Manager = 3,
    NbdListen = 4,
    MetricsListen = 5,
    Runtime = 6,
    IscsiListen = 7,
    Tls = 8,
}

fn fatal(code: Exit, msg: String) -> ! {
    eprintln!("tessera-gateway: fatal: {msg}");
    std::process::exit(code as i32);
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if args.io_timeout_ms == 0 {
        fatal(Exit::Runtime, "--io-timeout-ms must be positive".into());
    }
    tracing::info!(?args, "starting");
    let tls = args
        .tls_cert
        .as_ref()
        .zip(args.tls_key.as_ref())
        .map(|(c, k)| {
            server::tls_acceptor(c, k).unwrap_or_else(|e| {
                fatal(Exit::Tls, format!("cannot load the TLS certificate: {e}"))
            })
        });
    let tls_mode = match (&tls, args.tls_require) {
        (None, _) => nbd::handshake::TlsMode::Off,
        (Some(_), false) => nbd::handshake::TlsMode::Optional,
        (Some(_), true) => nbd::handshake::TlsMode::Required,
    };
    let rt = if args.threads == 1 {
        tessera_gateway::busy_poll::runtime(Duration::from_micros(u64::from(args.busy_poll_us)))
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(args.threads))
            .enable_all()
            .build()
    };
    let rt = rt.unwrap_or_else(|e| fatal(Exit::Runtime, format!("cannot start the runtime: {e}")));
    let deadline = Instant::now() + Duration::from_millis(STARTUP_MAP_DEADLINE_MS);
    let initial = map::fetch_until(&args.manager, deadline).unwrap_or_else(|e| {
        fatal(
            Exit::Manager,
            format!("{e} (is tessera-manager running at --manager / TESSERA_MANAGER?)"),
        )
    });
    tracing::info!(
        epoch = initial.epoch,
        volumes = initial.volumes.len(),
        "cluster map fetched"
    );
    let metrics = Metrics::new();
    let metrics_addr = args.metrics_listen.as_ref().map(|a| {
        metrics.serve(a).unwrap_or_else(|e| {
            fatal(
                Exit::MetricsListen,
                format!("cannot listen for metrics on {a}: {e}"),
            )
        })
    });
    let cluster_id = initial.cluster_id.clone();
    let router = Arc::new(Router {
        maps: MapHandle::follow(args.manager.clone(), initial),
        pool: Pool::new(cluster_id),
        io_timeout: Duration::from_millis(args.io_timeout_ms),
        metrics: Arc::clone(&metrics),
    });
    let maps = router.maps.clone();
    let catalog = Arc::new(MapCatalog { router });
    let iscsi_on = args.iscsi_listen.iter().any(|a| a != "none");
    let access = match (&args.cluster_secret_file, iscsi_on) {
        (Some(path), true) => {
            let secret = tessera_wire::api::read_cluster_secret(path)
                .unwrap_or_else(|e| fatal(Exit::Manager, e));
            ManagerAccess::follow(args.manager.clone(), secret, maps, deadline)
                .unwrap_or_else(|e| fatal(Exit::Manager, e))
        }
        (None, true) => {
            tracing::warn!(
                "no --cluster-secret-file: iSCSI access control cannot be read from the manager, \
                 so every iSCSI login to a volume is refused"
            );
            ManagerAccess::closed(maps)
        }
        (_, false) => ManagerAccess::closed(maps),
    };
    let leaving = access.clone();
    let iscsi = tessera_gateway::iscsi::target::Target::with_persist(
        catalog.clone(),
        access.clone(),
        Some(access),
        tessera_gateway::iscsi::target::Config::default(),
    );
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.nbd_listen)
            .await
            .unwrap_or_else(|e| {
                fatal(
                    Exit::NbdListen,
                    format!("cannot listen for NBD on {}: {e}", args.nbd_listen),
                )
            });
        let nbd_addr = listener
            .local_addr()
            .unwrap_or_else(|e| fatal(Exit::NbdListen, format!("listener address: {e}")));
        let mut portals = Vec::new();
        for a in args.iscsi_listen.iter().filter(|a| a.as_str() != "none") {
            let l = tokio::net::TcpListener::bind(a).await.unwrap_or_else(|e| {
                fatal(
                    Exit::IscsiListen,
                    format!("cannot listen for iSCSI on {a}: {e}"),
                )
            });
            let bound = l
                .local_addr()
                .unwrap_or_else(|e| fatal(Exit::IscsiListen, format!("listener address: {e}")));
            iscsi.portals.lock().expect("not poisoned").push(bound);
            portals.push(l);
        }
        let iscsi_text = if portals.is_empty() {
            "none".to_string()
        } else {
            iscsi
                .portals
                .lock()
                .expect("not poisoned")
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let metrics_text = metrics_addr.map_or("none".to_string(), |a| a.to_string());
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "READY nbd={nbd_addr} iscsi={iscsi_text} metrics={metrics_text}"
        );
        let _ = out.flush();
        drop(out);
        notify_ready();
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received; no longer accepting connections");
            let _ = tx.send(true);
        });
        for l in portals {
            tokio::spawn(tessera_gateway::iscsi::target::serve(
                l,
                Arc::clone(&iscsi),
                rx.clone(),
            ));
        }
        let config = server::Config {
            connections_max: args.nbd_connections_max,
            inflight_max: args.nbd_inflight_max,
            handshake_timeout_ms: args.nbd_handshake_timeout_ms,
            handshake: nbd::handshake::Config {
                request_max_bytes: args.nbd_request_max_bytes,
                tls: tls_mode,
            },
            tls,
        };
        server::serve(listener, catalog, metrics, config, rx).await;
    });
    tracing::info!("stopped");
    // Connections still open are dropped with the runtime.
    rt.shutdown_timeout(Duration::from_millis(100));
    // Only now, with no command left to run here: reservation changes stop
    // waiting for this gateway.
    leaving.leave();
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// sd_notify(READY=1) when started by systemd (Type=notify): a datagram to
/// $NOTIFY_SOCKET, where a leading '@' names an abstract socket.
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let r = (|| -> std::io::Result<()> {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(b"READY=1", &addr)?;
        } else {
            sock.send_to(b"READY=1", &path)?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        tracing::warn!(error = %e, socket = %path, "sd_notify failed");
    }
}
