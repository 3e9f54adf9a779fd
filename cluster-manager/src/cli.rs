//! The `tessera` CLI: commands over the manager's REST API, with aligned
//! tables for people and `--output json` for scripts. Every failure is one
//! line on stderr and a non-zero exit (1 for API and user errors; clap
//! exits with 2 for usage errors).

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::de::DeserializeOwned;
use std::time::Duration;
use tessera_wire::api::{
    CreatePoolRequest, CreateVolumeRequest, DiskInfo, ErrorBody, NodeInfo, PoolInfo,
    ResizeVolumeRequest, VolumeInfo, format_size, parse_size,
};
use tessera_wire::iscsi::{
    AddInitiatorRequest, ChapSecrets, DiscoveryChapInfo, IscsiAccessInfo, normalize_initiator,
};
use tessera_wire::map::FailureDomain;

#[derive(Parser, Debug)]
#[command(name = "tessera", version, about = "Administer a Tessera cluster")]
pub struct Cli {
    /// Manager URL.
    #[arg(
        long,
        global = true,
        env = "TESSERA_MANAGER",
        default_value = "http://127.0.0.1:9400"
    )]
    pub manager: String,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "table")]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start a whole local cluster (manager, storage daemons, gateway) in
    /// the foreground; Ctrl-C stops it.
    // Boxed: by far the largest variant (clippy::large_enum_variant).
    Up(Box<crate::up::UpArgs>),
    /// Storage nodes.
    Node {
        #[command(subcommand)]
        command: ListOnly,
    },
    /// Disks.
    Disk {
        #[command(subcommand)]
        command: ListOnly,
    },
    /// Volumes.
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// Pools: replication policies over the disks.
    Pool {
        #[command(subcommand)]
        command: PoolCommand,
    },
    /// Cluster-wide iSCSI settings.
    Iscsi {
        #[command(subcommand)]
        command: IscsiCommand,
    },
    /// Placement groups.
    Pg {
        #[command(subcommand)]
        command: PgCommand,
    },
    /// Cluster summary.
    Status,
    /// Cluster-wide switches that suspend automatic data movement, for
    /// planned maintenance (as Ceph's `ceph osd set noout`).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Set a switch: `noout` (a disk down past --down-out-after stays in,
    /// its groups degraded, instead of being re-placed and rebuilt
    /// elsewhere), `norebalance` (no group moves because placement now
    /// prefers other disks; short groups are still topped up), `norecover`
    /// (no delta-recovery push starts) or `nobackfill` (no backfill push
    /// starts: a rebuild or rebalance paused).
    Set { flag: FlagArg },
    /// Unset a switch: the manager acts on what it held back at its next
    /// health check (a disk long down goes out at once).
    Unset { flag: FlagArg },
    /// List the switches set.
    Flags,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagArg {
    Noout,
    Norebalance,
    Norecover,
    Nobackfill,
}

impl FlagArg {
    fn name(self) -> &'static str {
        use crate::store::ClusterFlag;
        match self {
            FlagArg::Noout => ClusterFlag::Noout.name(),
            FlagArg::Norebalance => ClusterFlag::Norebalance.name(),
            FlagArg::Norecover => ClusterFlag::Norecover.name(),
            FlagArg::Nobackfill => ClusterFlag::Nobackfill.name(),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum PgCommand {
    /// Scrub every placement group now: each primary compares its copies'
    /// checksums and repairs bad or missing ones (see `tessera status`).
    Scrub {
        /// Wait until every up storage daemon has finished.
        #[arg(long)]
        wait: bool,
        /// Longest wait, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum IscsiCommand {
    /// CHAP for discovery sessions (SendTargets), on every gateway.
    DiscoveryChap {
        #[command(subcommand)]
        command: DiscoveryChapCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum DiscoveryChapCommand {
    /// Require CHAP for discovery; secrets as for `volume chap set`.
    Set(DiscoveryChapArgs),
    /// Discovery without authentication again.
    Clear,
    Show,
}

#[derive(Args, Debug)]
pub struct DiscoveryChapArgs {
    #[arg(long)]
    pub user: String,
    #[arg(long)]
    pub secret_file: Option<std::path::PathBuf>,
    #[arg(long, requires = "mutual_user")]
    pub mutual_secret_file: Option<std::path::PathBuf>,
    #[arg(long)]
    pub mutual_user: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum ListOnly {
    List,
}

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    Create(CreateArgs),
    List,
    Info {
        name: String,
    },
    /// Grow a volume.
    Resize {
        name: String,
        /// New size, e.g. 20G (parsed by `parse_size`, so a bad size is one
        /// line and exit 1 like every other user error).
        #[arg(long)]
        size: String,
    },
    Delete {
        name: String,
    },
    /// iSCSI initiators allowed to log in to the volume (an empty list
    /// admits every initiator).
    Acl {
        #[command(subcommand)]
        command: AclCommand,
    },
    /// iSCSI CHAP credentials of the volume's target.
    Chap {
        #[command(subcommand)]
        command: ChapCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum AclCommand {
    /// Allow an initiator (its iSCSI name, e.g. iqn.1994-05.com.redhat:host1).
    Add {
        name: String,
        iqn: String,
    },
    /// Stop allowing an initiator.
    Remove {
        name: String,
        iqn: String,
    },
    List {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ChapCommand {
    /// Require CHAP. Secrets are read from files (`-` for stdin) or the
    /// environment, never from the command line, where every user of the
    /// machine could read them.
    Set(ChapSetArgs),
    /// Stop requiring CHAP.
    Clear { name: String },
}

#[derive(Args, Debug)]
pub struct ChapSetArgs {
    pub name: String,
    /// CHAP user name the initiator presents (CHAP_N).
    #[arg(long)]
    pub user: String,
    /// File holding the initiator's secret (first line; `-` reads stdin).
    /// Default: $TESSERA_CHAP_SECRET.
    #[arg(long)]
    pub secret_file: Option<std::path::PathBuf>,
    /// Mutual CHAP: the user name the target answers with.
    #[arg(long, requires = "mutual_user")]
    pub mutual_secret_file: Option<std::path::PathBuf>,
    /// Mutual CHAP: the target's user name. Its secret comes from
    /// --mutual-secret-file or $TESSERA_CHAP_MUTUAL_SECRET.
    #[arg(long)]
    pub mutual_user: Option<String>,
}

/// Environment variables the CHAP secrets may come from.
pub const CHAP_SECRET_ENV: &str = "TESSERA_CHAP_SECRET";
pub const CHAP_MUTUAL_SECRET_ENV: &str = "TESSERA_CHAP_MUTUAL_SECRET";

/// A secret from a file's first line (`-`: stdin) or else an environment
/// variable. The value never appears in an error message.
fn read_secret(file: Option<&std::path::Path>, env: &str, what: &str) -> Result<String, CliError> {
    use std::io::Read;
    let text = match file {
        Some(p) if p.as_os_str() == "-" => {
            let mut t = String::new();
            std::io::stdin()
                .take(4096)
                .read_to_string(&mut t)
                .map_err(|e| CliError::new(format!("cannot read the {what} from stdin: {e}")))?;
            t
        }
        Some(p) => std::fs::read_to_string(p).map_err(|e| {
            CliError::new(format!("cannot read the {what} from {}: {e}", p.display()))
        })?,
        None => std::env::var(env).map_err(|_| {
            CliError::new(format!(
                "no {what}: give it with a file option (- for stdin) or in ${env}"
            ))
        })?,
    };
    let line = text.lines().next().unwrap_or("").to_string();
    if line.is_empty() {
        return Err(CliError::new(format!("the {what} is empty")));
    }
    Ok(line)
}

#[derive(Subcommand, Debug)]
pub enum PoolCommand {
    Create(PoolCreateArgs),
    List,
}

#[derive(Args, Debug)]
pub struct PoolCreateArgs {
    pub name: String,
    /// Copies of each chunk, each in a different failure domain.
    #[arg(long, default_value_t = 3)]
    pub replicas: u32,
    /// Writes continue while at least this many copies are reachable
    /// (default: a majority of the replicas).
    #[arg(long)]
    pub min_replicas: Option<u32>,
    /// The level copies must not share: zone, rack, host or disk.
    #[arg(long, default_value = "host", value_parser = FailureDomain::parse)]
    pub failure_domain: FailureDomain,
    /// Chunk size, e.g. 4M (the disks' format supports 4M only for now).
    #[arg(long, default_value = "4M")]
    pub chunk_size: String,
    /// Placement groups of the pool.
    #[arg(long, default_value_t = 128)]
    pub pgs: u32,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    pub name: String,
    /// Size, e.g. 10G.
    #[arg(long)]
    pub size: String,
    /// Logical block size advertised to clients.
    #[arg(long, default_value_t = 512, value_parser = parse_block_size)]
    pub block_size: u32,
    /// Pool to create the volume in.
    #[arg(long, default_value = "default")]
    pub pool: String,
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!("bad block size {s:?}: use 512 or 4096")),
    }
}

/// A one-line CLI error, with the HTTP status when the manager answered.
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    pub status: Option<u16>,
}

impl CliError {
    pub fn new(message: impl Into<String>) -> CliError {
        CliError {
            message: message.into(),
            status: None,
        }
    }
}

fn size(s: &str) -> Result<u64, CliError> {
    parse_size(s).map_err(CliError::new)
}

/// Why a request never reached the manager, in a few words: the innermost
/// I/O error ("connection refused") rather than ureq's generic kind.
fn transport_reason(t: &ureq::Transport) -> String {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(t);
    while let Some(e) = src {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
                std::io::ErrorKind::TimedOut => "timed out".into(),
                _ => io.to_string(),
            };
        }
        src = e.source();
    }
    t.message()
        .map(str::to_string)
        .unwrap_or_else(|| t.kind().to_string())
}

pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(3))
                .timeout(Duration::from_secs(10))
                .build(),
        }
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Option<T>, CliError> {
        let url = format!("{}{path}", self.base);
        let req = self.agent.request(method, &url);
        let r = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match r {
            Ok(resp) if resp.status() == 204 => Ok(None),
            Ok(resp) => resp
                .into_json::<T>()
                .map(Some)
                .map_err(|e| CliError::new(format!("bad response from the manager: {e}"))),
            Err(ureq::Error::Status(code, resp)) => {
                let msg = resp
                    .into_json::<ErrorBody>()
                    .map(|b| b.error)
                    .unwrap_or_else(|_| format!("HTTP {code}"));
                Err(CliError {
                    message: msg,
                    status: Some(code),
                })
            }
            Err(ureq::Error::Transport(t)) => Err(CliError::new(format!(
                "cannot reach manager at {}: {}",
                self.base,
                transport_reason(&t)
            ))),
        }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        self.call("GET", path, None)?
            .ok_or_else(|| CliError::new("empty response from the manager"))
    }

    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<T, CliError> {
        self.call("POST", path, Some(body))?
            .ok_or_else(|| CliError::new("empty response from the manager"))
    }
}

/// Print rows as an aligned table.
fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialise"));
}

fn volume_rows(vs: &[VolumeInfo]) -> Vec<Vec<String>> {
    vs.iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.id.to_string(),
                format_size(v.size_bytes),
                format_size(v.allocated_bytes),
                v.block_size.to_string(),
                v.chunks.to_string(),
            ]
        })
        .collect()
}

pub fn run(cli: Cli) -> Result<(), CliError> {
    let c = Client::new(&cli.manager);
    let json = cli.output == Output::Json;
    match cli.command {
        Command::Up(args) => crate::up::run(*args).map_err(CliError::new),
        Command::Status => {
            let s: crate::daemon::Status = c.get("/v1/status")?;
            if json {
                print_json(&s);
            } else {
                println!("cluster   {}", s.cluster_id);
                println!("epoch     {}", s.epoch);
                println!("nodes     {} up, {} down", s.nodes_up, s.nodes_down);
                println!("disks     {}", s.disks);
                println!("volumes   {}", s.volumes);
                println!("pgs       {} ({} assigned)", s.pgs_total, s.pgs_assigned);
                println!(
                    "          {} clean, {} degraded, {} recovering ({} backfilling), {} scrubbing",
                    s.pgs_clean,
                    s.pgs_degraded,
                    s.pgs_recovering,
                    s.pgs_backfilling,
                    s.pgs_scrubbing
                );
                let last = if s.scrub_generation == 0 {
                    "none requested".to_string()
                } else {
                    format!(
                        "last request done on {} of {} daemons",
                        s.scrub_daemons_done, s.daemons_up
                    )
                };
                println!(
                    "scrub     {last}; {} group scrubs, {} regions, {} bad copies found, {} repaired, {} unrepairable",
                    s.scrubs, s.scrub_regions, s.scrub_errors, s.repairs, s.unrepairable
                );
                if s.disks_out > 0 {
                    println!("          {} disk(s) out", s.disks_out);
                }
                if s.disks_held_in > 0 {
                    println!(
                        "          {} disk(s) down past --down-out-after but kept in (noout or --min-in-ratio)",
                        s.disks_held_in
                    );
                }
                if !s.flags.is_empty() {
                    println!("flags     {}", s.flags.join(","));
                }
                if s.recovery_remaining_bytes > 0 || s.recovery_bytes_per_sec > 0 {
                    println!(
                        "recovery  {}% ({} of {}), {}/s",
                        s.recovery_percent,
                        format_size(s.recovery_done_bytes),
                        format_size(s.recovery_done_bytes + s.recovery_remaining_bytes),
                        format_size(s.recovery_bytes_per_sec)
                    );
                }
                println!(
                    "capacity  {} used of {}",
                    format_size(s.used_bytes),
                    format_size(s.capacity_bytes)
                );
            }
            Ok(())
        }
        Command::Node { .. } => {
            let nodes: Vec<NodeInfo> = c.get("/v1/nodes")?;
            if json {
                print_json(&nodes);
            } else {
                table(
                    &["ID", "ADDRESS", "STATE", "PID", "DISKS", "LAST HEARTBEAT"],
                    nodes
                        .iter()
                        .map(|n| {
                            vec![
                                n.id.to_string(),
                                n.addr.clone(),
                                if n.up { "up" } else { "down" }.into(),
                                n.pid.to_string(),
                                n.disks
                                    .iter()
                                    .map(u32::to_string)
                                    .collect::<Vec<_>>()
                                    .join(","),
                                n.last_heartbeat_ms_ago.map_or("-".into(), |ms| {
                                    format!("{:.1}s ago", ms as f64 / 1000.0)
                                }),
                            ]
                        })
                        .collect(),
                );
            }
            Ok(())
        }
        Command::Disk { .. } => {
            let disks: Vec<DiskInfo> = c.get("/v1/disks")?;
            if json {
                print_json(&disks);
            } else {
                table(
                    &[
                        "ID",
                        "NODE",
                        "STATE",
                        "CAPACITY",
                        "USED",
                        "CSUM ERRORS",
                        "PATH",
                    ],
                    disks
                        .iter()
                        .map(|d| {
                            vec![
                                d.id.to_string(),
                                d.node_id.to_string(),
                                match (d.up, d.out) {
                                    (true, _) => "up",
                                    (false, true) => "down,out",
                                    (false, false) => "down",
                                }
                                .into(),
                                format_size(d.capacity_bytes),
                                format_size(d.used_bytes),
                                d.checksum_errors.to_string(),
                                d.path.clone(),
                            ]
                        })
                        .collect(),
                );
            }
            Ok(())
        }
        Command::Volume { command } => volume(&c, json, command),
        Command::Pool { command } => pool(&c, json, command),
        Command::Pg {
            command: PgCommand::Scrub { wait, timeout },
        } => scrub(&c, json, wait, Duration::from_secs(timeout)),
        Command::Iscsi { command } => iscsi(&c, json, command),
        Command::Cluster { command } => {
            let flags: crate::daemon::Flags = match command {
                ClusterCommand::Set { flag } => c
                    .call("PUT", &format!("/v1/flags/{}", flag.name()), None)?
                    .ok_or_else(|| CliError::new("empty response from the manager"))?,
                ClusterCommand::Unset { flag } => c
                    .call("DELETE", &format!("/v1/flags/{}", flag.name()), None)?
                    .ok_or_else(|| CliError::new("empty response from the manager"))?,
                ClusterCommand::Flags => c.get("/v1/flags")?,
            };
            if json {
                print_json(&flags);
            } else if flags.flags.is_empty() {
                println!("flags     none");
            } else {
                println!("flags     {}", flags.flags.join(","));
            }
            Ok(())
        }
    }
}

const POOL_HEADERS: [&str; 8] = [
    "NAME", "ID", "REPLICAS", "MIN", "DOMAIN", "CHUNK", "PGS", "VOLUMES",
];

/// Ask for a scrub; with `wait`, poll the status until every up daemon has
/// completed it (a daemon reports it once no group it leads is scrubbing).
fn scrub(c: &Client, json: bool, wait: bool, timeout: Duration) -> Result<(), CliError> {
    let r: serde_json::Value = c.post("/v1/scrub", serde_json::json!({}))?;
    let generation = r["generation"].as_u64().unwrap_or(0);
    let deadline = std::time::Instant::now() + timeout;
    let mut s: crate::daemon::Status = c.get("/v1/status")?;
    while wait && (s.scrub_generation > generation || s.scrub_daemons_done < s.daemons_up) {
        if s.scrub_generation > generation {
            // A newer request replaced ours: it covers ours.
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(CliError::new(format!(
                "scrub not finished after {}s: {} of {} daemons done",
                timeout.as_secs(),
                s.scrub_daemons_done,
                s.daemons_up
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
        s = c.get("/v1/status")?;
    }
    if json {
        print_json(&s);
    } else {
        println!("scrub {generation} requested");
        if wait {
            println!(
                "done on {} daemons: {} regions compared, {} bad copies found, {} repaired, {} unrepairable (since the daemons started)",
                s.scrub_daemons_done, s.scrub_regions, s.scrub_errors, s.repairs, s.unrepairable
            );
        }
    }
    Ok(())
}

fn pool_rows(ps: &[PoolInfo]) -> Vec<Vec<String>> {
    ps.iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.id.to_string(),
                p.replicas.to_string(),
                p.min_replicas.to_string(),
                p.failure_domain.name().to_string(),
                format_size(p.chunk_size_bytes),
                p.pg_count.to_string(),
                p.volumes.to_string(),
            ]
        })
        .collect()
}

fn pool(c: &Client, json: bool, cmd: PoolCommand) -> Result<(), CliError> {
    let ps: Vec<PoolInfo> = match cmd {
        PoolCommand::Create(a) => {
            let p: PoolInfo = c.post(
                "/v1/pools",
                serde_json::to_value(CreatePoolRequest {
                    name: a.name,
                    replicas: a.replicas,
                    min_replicas: a.min_replicas,
                    failure_domain: Some(a.failure_domain),
                    chunk_size_bytes: Some(size(&a.chunk_size)?),
                    pg_count: Some(a.pgs),
                })
                .expect("json"),
            )?;
            if json {
                print_json(&p);
                return Ok(());
            }
            vec![p]
        }
        PoolCommand::List => {
            let ps: Vec<PoolInfo> = c.get("/v1/pools")?;
            if json {
                print_json(&ps);
                return Ok(());
            }
            ps
        }
    };
    table(&POOL_HEADERS, pool_rows(&ps));
    Ok(())
}

const VOLUME_HEADERS: [&str; 6] = ["NAME", "ID", "SIZE", "ALLOCATED", "BLOCK", "CHUNKS"];

fn volume(c: &Client, json: bool, cmd: VolumeCommand) -> Result<(), CliError> {
    let show = |v: &VolumeInfo| {
        if json {
            print_json(v);
        } else {
            table(&VOLUME_HEADERS, volume_rows(std::slice::from_ref(v)));
        }
    };
    match cmd {
        VolumeCommand::Create(a) => {
            let v: VolumeInfo = c.post(
                "/v1/volumes",
                serde_json::to_value(CreateVolumeRequest {
                    name: a.name,
                    size_bytes: size(&a.size)?,
                    block_size: Some(a.block_size),
                    pool: Some(a.pool),
                })
                .expect("json"),
            )?;
            show(&v);
        }
        VolumeCommand::List => {
            let vs: Vec<VolumeInfo> = c.get("/v1/volumes")?;
            if json {
                print_json(&vs);
            } else {
                table(&VOLUME_HEADERS, volume_rows(&vs));
            }
        }
        VolumeCommand::Info { name } => {
            let v: VolumeInfo = c.get(&format!("/v1/volumes/{}", path_segment(&name)?))?;
            if json {
                print_json(&v);
            } else {
                println!("name        {}", v.name);
                println!("id          {}", v.id);
                println!(
                    "size        {} ({} bytes)",
                    format_size(v.size_bytes),
                    v.size_bytes
                );
                println!("allocated   {}", format_size(v.allocated_bytes));
                println!("block size  {}", v.block_size);
                println!(
                    "chunks      {} of {}",
                    v.chunks,
                    format_size(v.chunk_size_bytes)
                );
                println!("pool        {} ({} replicas)", v.pool, v.replicas);
                println!("copies:");
                table(
                    &["  DISK", "NODE", "STATE", "UP", "PGS"],
                    v.copies
                        .iter()
                        .map(|c| {
                            vec![
                                format!("  {}", c.disk_id),
                                c.node_id.to_string(),
                                c.state.clone(),
                                if c.up { "up" } else { "down" }.into(),
                                c.pgs.to_string(),
                            ]
                        })
                        .collect(),
                );
                println!("placement (primaries):");
                table(
                    &["  DISK", "NODE", "CHUNKS"],
                    v.placement
                        .iter()
                        .map(|p| {
                            vec![
                                format!("  {}", p.disk_id),
                                p.node_id.to_string(),
                                p.chunks.to_string(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        VolumeCommand::Resize { name, size } => {
            let v: VolumeInfo = c
                .call(
                    "PATCH",
                    &format!("/v1/volumes/{}", path_segment(&name)?),
                    Some(
                        serde_json::to_value(ResizeVolumeRequest {
                            size_bytes: self::size(&size)?,
                        })
                        .expect("json"),
                    ),
                )?
                .ok_or_else(|| CliError::new("empty response from the manager"))?;
            show(&v);
        }
        VolumeCommand::Acl { command } => {
            let i: IscsiAccessInfo = match command {
                AclCommand::Add { name, iqn } => c.post(
                    &format!("/v1/volumes/{}/iscsi/initiators", path_segment(&name)?),
                    serde_json::to_value(AddInitiatorRequest { iqn }).expect("json"),
                )?,
                AclCommand::Remove { name, iqn } => {
                    let iqn = normalize_initiator(&iqn).map_err(CliError::new)?;
                    c.call(
                        "DELETE",
                        &format!(
                            "/v1/volumes/{}/iscsi/initiators/{iqn}",
                            path_segment(&name)?
                        ),
                        None,
                    )?
                    .ok_or_else(|| CliError::new("empty response from the manager"))?
                }
                AclCommand::List { name } => {
                    c.get(&format!("/v1/volumes/{}/iscsi", path_segment(&name)?))?
                }
            };
            show_access(&i, json);
        }
        VolumeCommand::Chap { command } => {
            let i: IscsiAccessInfo = match command {
                ChapCommand::Set(a) => {
                    let req = chap_secrets(
                        a.user,
                        a.secret_file.as_deref(),
                        a.mutual_user,
                        a.mutual_secret_file.as_deref(),
                    )?;
                    c.call(
                        "PUT",
                        &format!("/v1/volumes/{}/iscsi/chap", path_segment(&a.name)?),
                        Some(serde_json::to_value(&req).expect("json")),
                    )?
                    .ok_or_else(|| CliError::new("empty response from the manager"))?
                }
                ChapCommand::Clear { name } => c
                    .call(
                        "DELETE",
                        &format!("/v1/volumes/{}/iscsi/chap", path_segment(&name)?),
                        None,
                    )?
                    .ok_or_else(|| CliError::new("empty response from the manager"))?,
            };
            show_access(&i, json);
        }
        VolumeCommand::Delete { name } => {
            c.call::<serde_json::Value>(
                "DELETE",
                &format!("/v1/volumes/{}", path_segment(&name)?),
                None,
            )?;
            if !json {
                println!("deleted {name}");
            }
        }
    }
    Ok(())
}

/// CHAP credentials from the user names and the secret sources, checked
/// locally (so nothing the manager would refuse is sent).
fn chap_secrets(
    user: String,
    secret_file: Option<&std::path::Path>,
    mutual_user: Option<String>,
    mutual_secret_file: Option<&std::path::Path>,
) -> Result<ChapSecrets, CliError> {
    let stdin = Some(std::path::Path::new("-"));
    if mutual_user.is_some() && secret_file == stdin && mutual_secret_file == stdin {
        return Err(CliError::new("only one of the secrets can come from stdin"));
    }
    let secret = read_secret(secret_file, CHAP_SECRET_ENV, "CHAP secret")?;
    let mutual_secret = match &mutual_user {
        None => None,
        Some(_) => Some(read_secret(
            mutual_secret_file,
            CHAP_MUTUAL_SECRET_ENV,
            "mutual CHAP secret",
        )?),
    };
    let req = ChapSecrets {
        user,
        secret,
        mutual_user,
        mutual_secret,
    };
    req.validate().map_err(CliError::new)?;
    Ok(req)
}

fn iscsi(c: &Client, json: bool, cmd: IscsiCommand) -> Result<(), CliError> {
    let IscsiCommand::DiscoveryChap { command } = cmd;
    let i: DiscoveryChapInfo = match command {
        DiscoveryChapCommand::Set(a) => {
            let req = chap_secrets(
                a.user,
                a.secret_file.as_deref(),
                a.mutual_user,
                a.mutual_secret_file.as_deref(),
            )?;
            c.call(
                "PUT",
                "/v1/iscsi/discovery-chap",
                Some(serde_json::to_value(&req).expect("json")),
            )?
            .ok_or_else(|| CliError::new("empty response from the manager"))?
        }
        DiscoveryChapCommand::Clear => c
            .call("DELETE", "/v1/iscsi/discovery-chap", None)?
            .ok_or_else(|| CliError::new("empty response from the manager"))?,
        DiscoveryChapCommand::Show => c.get("/v1/iscsi/discovery-chap")?,
    };
    if json {
        print_json(&i);
    } else {
        match (&i.chap_user, &i.mutual_chap_user) {
            (None, _) => println!("discovery chap  none"),
            (Some(u), None) => println!("discovery chap  user {u}"),
            (Some(u), Some(m)) => println!("discovery chap  user {u}, mutual user {m}"),
        }
    }
    Ok(())
}

fn show_access(i: &IscsiAccessInfo, json: bool) {
    if json {
        print_json(i);
        return;
    }
    println!("volume      {}", i.volume);
    if i.initiators.is_empty() {
        println!("initiators  any");
    } else {
        for (n, iqn) in i.initiators.iter().enumerate() {
            println!(
                "{}  {iqn}",
                if n == 0 { "initiators" } else { "          " }
            );
        }
    }
    match (&i.chap_user, &i.mutual_chap_user) {
        (None, _) => println!("chap        none"),
        (Some(u), None) => println!("chap        user {u}"),
        (Some(u), Some(m)) => println!("chap        user {u}, mutual user {m}"),
    }
}

/// Volume names go into URL paths: refuse anything that is not a valid
/// name rather than escaping it.
fn path_segment(name: &str) -> Result<&str, CliError> {
    if !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        Ok(name)
    } else {
        Err(CliError::new(format!(
            "volume {name:?} not found (names use A-Z a-z 0-9 . _ -)"
        )))
    }
}
