//! JSON bodies of the manager's REST API (see docs/api.md), shared by the
//! manager, the CLI, the storage daemons and the gateways.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRegistration {
    /// The disk's uuid, from its superblock.
    pub uuid: String,
    pub path: String,
    pub capacity_bytes: u64,
}

/// `POST /v1/nodes/register`, sent by a storage daemon at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// Stable identity of the daemon (kept in its state directory or derived
    /// from its first disk's uuid).
    pub node_uuid: String,
    /// Internal-protocol address gateways connect to.
    pub addr: String,
    pub metrics_addr: Option<String>,
    pub pid: u32,
    /// Failure-domain path of the node (zone / rack / host); each part is
    /// empty where not given.
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub rack: String,
    pub disks: Vec<DiskRegistration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskAssignment {
    pub uuid: String,
    pub disk_id: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub node_id: u32,
    pub cluster_id: String,
    pub disks: Vec<DiskAssignment>,
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUsage {
    pub disk_id: u32,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub checksum_errors: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeUsage {
    pub volume_id: u64,
    pub allocated_bytes: u64,
}

/// A storage daemon's scrub and repair counters (since it started), sent
/// with each heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubReport {
    /// Placement groups this daemon leads that are being scrubbed now.
    pub running: u32,
    /// The newest scrub request of the manager (`POST /v1/scrub`) this
    /// daemon has completed on every group it led when it got it.
    pub generation_done: u64,
    /// Scrubs of a group completed.
    pub scrubs: u64,
    /// 64 KiB regions compared across copies.
    pub regions: u64,
    /// Copies of regions found bad (a block failing its CRC) or different.
    pub errors: u64,
    /// Copies of extents rewritten from a good copy (scrub and read repair).
    pub repairs: u64,
    /// Repairs that found no good copy.
    pub unrepairable: u64,
}

/// `POST /v1/nodes/{id}/failure`: a storage daemon saw the process of node
/// `id` end (its replication link closed); the manager declares it down
/// once it has also been silent for `FAILURE_REPORT_SILENCE`, without
/// waiting out the whole grace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureReport {
    pub reporter_node_id: u32,
}

/// `POST /v1/nodes/{id}/heartbeat`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    pub disks: Vec<DiskUsage>,
    /// Allocated bytes per volume, summed over this node's disks.
    pub volumes: Vec<VolumeUsage>,
    #[serde(default)]
    pub scrub: ScrubReport,
    /// Recovery and backfill this node runs as primary.
    #[serde(default)]
    pub recovery: RecoveryProgress,
}

/// Recovery work of the groups one node leads, for `tessera status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryProgress {
    /// Bytes pushed to recovering copies since the daemon started (a
    /// counter: the manager derives the rate from it).
    pub bytes_total: u64,
    /// Bytes pushed so far by the recoveries under way.
    pub done_bytes: u64,
    /// Bytes the recoveries under way still have to push (regions known so
    /// far; a full resync adds its regions once both sides are listed).
    pub remaining_bytes: u64,
    /// Copies being recovered (all kinds) and, among them, new members
    /// being backfilled.
    pub copies_recovering: u32,
    pub copies_backfilling: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    pub epoch: u64,
    /// The manager's newest scrub request: a daemon that has not acted on
    /// it scrubs every group it leads.
    #[serde(default)]
    pub scrub_generation: u64,
    /// The manager's heartbeat grace: it declares this daemon down only
    /// after this long without a heartbeat, which bounds the daemon's read
    /// lease (0: an older manager; no lease).
    #[serde(default)]
    pub grace_ms: u64,
    /// The operator paused delta recovery (`norecover`) or backfill
    /// (`nobackfill`): the daemon starts no such push until unset.
    #[serde(default)]
    pub recovery_paused: bool,
    #[serde(default)]
    pub backfill_paused: bool,
}

/// `POST /v1/volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateVolumeRequest {
    pub name: String,
    pub size_bytes: u64,
    #[serde(default)]
    pub block_size: Option<u32>,
    /// Pool name; the `default` pool when absent.
    #[serde(default)]
    pub pool: Option<String>,
}

/// `POST /v1/pgs/clean` carries a list of these: a primary reports that it
/// brought `disk_id`'s copy of `pg` up to date under map `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanReport {
    pub pg: u32,
    pub disk_id: u32,
    pub reporter_disk_id: u32,
    pub epoch: u64,
}

/// `POST /v1/pools`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatePoolRequest {
    pub name: String,
    pub replicas: u32,
    /// Defaults to `replicas - replicas / 2` (3 -> 2, 2 -> 1, 1 -> 1).
    #[serde(default)]
    pub min_replicas: Option<u32>,
    #[serde(default)]
    pub failure_domain: Option<crate::map::FailureDomain>,
    #[serde(default)]
    pub chunk_size_bytes: Option<u64>,
    #[serde(default)]
    pub pg_count: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    pub id: u32,
    pub name: String,
    pub replicas: u32,
    pub min_replicas: u32,
    pub failure_domain: crate::map::FailureDomain,
    pub chunk_size_bytes: u64,
    pub pg_base: u32,
    pub pg_count: u32,
    pub volumes: u32,
}

/// `PATCH /v1/volumes/{name}`: grow only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizeVolumeRequest {
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskShare {
    pub disk_id: u32,
    pub node_id: u32,
    /// How many of the volume's chunks map to this disk.
    pub chunks: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub id: u64,
    pub name: String,
    pub size_bytes: u64,
    pub block_size: u32,
    pub chunk_size_bytes: u64,
    pub chunks: u64,
    /// Bytes allocated on disks, as last reported by the storage daemons
    /// (every copy counted).
    pub allocated_bytes: u64,
    /// Primaries: how many of the volume's chunks each disk leads.
    pub placement: Vec<DiskShare>,
    #[serde(default)]
    pub pool: String,
    #[serde(default)]
    pub replicas: u32,
    /// Every disk holding copies of the volume and their state.
    #[serde(default)]
    pub copies: Vec<CopyInfo>,
}

/// One disk's copies of a volume (its share of the volume's groups).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyInfo {
    pub disk_id: u32,
    pub node_id: u32,
    /// Placement groups of the volume's pool this disk is a member of.
    pub pgs: u32,
    pub up: bool,
    /// `UpToDate`, `Recovering` (up, being brought up to date) or
    /// `Outdated` (down, missing writes).
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: u32,
    pub uuid: String,
    pub addr: String,
    pub metrics_addr: Option<String>,
    pub pid: u32,
    pub up: bool,
    /// Milliseconds since the last heartbeat, `None` if never seen since the
    /// manager started.
    pub last_heartbeat_ms_ago: Option<u64>,
    pub disks: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub id: u32,
    pub node_id: u32,
    pub uuid: String,
    pub path: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub checksum_errors: u64,
    pub up: bool,
    /// Taken out of placement (down past `--down-out-after`).
    #[serde(default)]
    pub out: bool,
}

/// Body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Parse a human size: `4096`, `512K`, `64M`, `1G`, `2T`, with optional
/// `B`/`iB` suffixes (`1GiB`, `1GB`); units are powers of 1024.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err(format!(
            "bad size {s:?}: expected a number with an optional K/M/G/T suffix"
        ));
    }
    let n: u64 = t[..digits_end]
        .parse()
        .map_err(|_| format!("bad size {s:?}: number too large"))?;
    let unit = t[digits_end..].trim().to_ascii_uppercase();
    let mult: u64 = match unit.as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => {
            return Err(format!(
                "bad size {s:?}: unknown unit {unit:?} (use K, M, G or T)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("bad size {s:?}: too large"))
}

/// Parse a duration: `500ms`, `3s`, `10m`, `1h` (a bare number is
/// seconds). Used by `--down-out-after`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err(format!(
            "bad duration {s:?}: expected a number with ms, s, m or h, e.g. 10m"
        ));
    }
    let n: u64 = t[..digits_end]
        .parse()
        .map_err(|_| format!("bad duration {s:?}: number too large"))?;
    let ms: u64 = match &t[digits_end..] {
        "ms" => 1,
        "" | "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        u => {
            return Err(format!(
                "bad duration {s:?}: unknown unit {u:?} (use ms, s, m or h)"
            ));
        }
    };
    n.checked_mul(ms)
        .map(std::time::Duration::from_millis)
        .ok_or_else(|| format!("bad duration {s:?}: too large"))
}

/// Format bytes for people: `1.0 GiB`, `512 MiB`, `4096 B`.
pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The cluster secret: the first line of its file. Never logged.
/// Read by storage daemons and gateways (`--cluster-secret-file`).
pub fn read_cluster_secret(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the cluster secret {}: {e}", path.display()))?;
    let s = text.lines().next().unwrap_or("").trim().to_string();
    if s.is_empty() {
        return Err(format!(
            "the cluster secret file {} is empty",
            path.display()
        ));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves size parsing accepts the documented forms and rejects the rest.
    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999T").is_err());
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(1536), "1.5 KiB");
    }

    // Proves duration parsing accepts the documented units and rejects the rest.
    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3 days").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
    }
}
