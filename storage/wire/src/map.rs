//! The cluster map: the epoch-numbered description of the cluster that the
//! manager publishes and every gateway and storage daemon follows.
//!
//! Invariants (checked by [`ClusterMap::validate`]): the epoch only grows;
//! `pgs.len() == pg_count`; every disk id named by a placement group exists;
//! volume ids and names are unique; pools own disjoint, contiguous ranges of
//! placement-group ids (`pg_base .. pg_base + pg_count`); `pg_states`, when
//! present, has one state per acting-set member.
//!
//! Placement groups are numbered cluster-wide, so a PG id alone names one
//! replication group on every daemon. A volume's chunk maps to
//! `pool.pg_base + pg_of(volume, chunk, pool.pg_count)`. Maps written before
//! pools existed have none: every volume then uses all `pg_count` groups.
//!
//! The primary of a placement group is a pure function of the map (the
//! first member, in acting-set order, whose disk is up and whose copy is
//! `UpToDate`), so there is never more than one primary per group in one
//! epoch.

use serde::{Deserialize, Serialize};

/// Default chunk size: the unit of placement (and, later, replication).
pub const CHUNK_SIZE_DEFAULT_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub id: u32,
    /// Address of the node's internal-protocol listener (host:port).
    pub addr: String,
    pub up: bool,
    /// Failure-domain path of the node, empty where not given.
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub rack: String,
    #[serde(default)]
    pub host: String,
}

/// The level of the failure-domain tree whose members a pool's copies must
/// not share.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum FailureDomain {
    Zone,
    Rack,
    #[default]
    Host,
    Disk,
}

impl FailureDomain {
    pub fn parse(s: &str) -> Result<FailureDomain, String> {
        match s {
            "zone" => Ok(FailureDomain::Zone),
            "rack" => Ok(FailureDomain::Rack),
            "host" => Ok(FailureDomain::Host),
            "disk" => Ok(FailureDomain::Disk),
            _ => Err(format!(
                "bad failure domain {s:?}: use zone, rack, host or disk"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FailureDomain::Zone => "zone",
            FailureDomain::Rack => "rack",
            FailureDomain::Host => "host",
            FailureDomain::Disk => "disk",
        }
    }
}

/// A replication policy over the cluster's disks, owning a contiguous range
/// of placement groups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolEntry {
    pub id: u32,
    pub name: String,
    /// Copies of each chunk.
    pub replicas: u32,
    /// Writes are acknowledged only while at least this many copies take them.
    pub min_replicas: u32,
    pub failure_domain: FailureDomain,
    pub chunk_size_bytes: u64,
    /// First placement-group id of the pool.
    pub pg_base: u32,
    pub pg_count: u32,
}

/// The state of one copy of a placement group (`linstor`'s disk states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum CopyState {
    /// Holds every acknowledged write: may serve reads and become primary.
    #[default]
    UpToDate,
    /// Missed writes while it was away (or restarted); receives new writes
    /// but must be recovered before it serves or leads.
    Outdated,
    /// Being brought up to date by the primary.
    Recovering,
    /// A member that joined the group by re-placement (its disk replaces
    /// one taken out): it holds none of the group's data it can vouch for,
    /// so the primary fills it by a full resync of every allocated region
    /// (never a delta from its log). Receives new writes meanwhile; counts
    /// as a copy only once the manager marks it `UpToDate`.
    Backfill,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskEntry {
    pub id: u32,
    pub node_id: u32,
    pub uuid: String,
    pub capacity_bytes: u64,
    pub up: bool,
    /// Bumped whenever the disk's daemon starts again (a new process has
    /// lost whatever was not durable): primaries recover such copies anew.
    #[serde(default)]
    pub incarnation: u64,
    /// Taken out of placement: it stayed down past the manager's
    /// `--down-out-after`, and its groups were re-placed on other disks.
    #[serde(default)]
    pub out: bool,
    /// While `up`: the epoch of the first map of the run of maps in which
    /// it has been up without a break, when the manager knows it (`None`:
    /// not known, as after the manager restarted). A daemon that skipped
    /// maps learns from it whether it was up in the ones it missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_since: Option<u64>,
}

impl ClusterMap {
    /// For a map about to be published as `self.epoch`, its disks' `up_since`
    /// carried over from the one published before it (`before`, or the
    /// disks' own fields when `None`): a disk up without one is up from this
    /// map on; a disk down has none.
    pub fn stamp_up_since(&mut self, before: Option<&ClusterMap>) {
        for i in 0..self.disks.len() {
            let d = &self.disks[i];
            let was = match before {
                Some(b) => b
                    .disk(d.id)
                    .and_then(|b| if b.up { b.up_since } else { None }),
                None => d.up_since,
            };
            let up = d.up;
            self.disks[i].up_since = up.then(|| was.unwrap_or(self.epoch));
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeEntry {
    pub id: u64,
    pub name: String,
    pub size_bytes: u64,
    pub chunk_size_bytes: u64,
    /// Logical block size the volume advertises to clients (512 or 4096).
    pub block_size: u32,
    /// The pool the volume lives in (0 in maps written before pools: the
    /// volume then spreads over every placement group).
    #[serde(default)]
    pub pool_id: u32,
}

impl VolumeEntry {
    pub fn chunk_count(&self) -> u64 {
        self.size_bytes.div_ceil(self.chunk_size_bytes)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    pub epoch: u64,
    pub cluster_id: String,
    pub pg_count: u32,
    pub nodes: Vec<NodeEntry>,
    pub disks: Vec<DiskEntry>,
    /// For each placement group, its acting set of disk ids, primary first.
    /// Empty while no disk is available for it.
    pub pgs: Vec<Vec<u32>>,
    pub volumes: Vec<VolumeEntry>,
    /// Volume ids are never reused: every id below this one that is absent
    /// from `volumes` belongs to a deleted volume whose data may be freed.
    pub next_volume_id: u64,
    #[serde(default)]
    pub pools: Vec<PoolEntry>,
    /// For each placement group, the state of each member of `pgs[pg]`
    /// (same order). Missing entries mean `UpToDate`.
    #[serde(default)]
    pub pg_states: Vec<Vec<CopyState>>,
}

/// Where one chunk lives, resolved from the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkLocation {
    pub pg: u32,
    pub disk_id: u32,
    pub node_id: u32,
    pub addr: String,
}

impl ClusterMap {
    pub fn volume_by_name(&self, name: &str) -> Option<&VolumeEntry> {
        self.volumes.iter().find(|v| v.name == name)
    }

    pub fn volume(&self, id: u64) -> Option<&VolumeEntry> {
        self.volumes.iter().find(|v| v.id == id)
    }

    pub fn disk(&self, id: u32) -> Option<&DiskEntry> {
        self.disks.iter().find(|d| d.id == id)
    }

    pub fn node(&self, id: u32) -> Option<&NodeEntry> {
        self.nodes.iter().find(|n| n.id == id)
    }

    pub fn pool(&self, id: u32) -> Option<&PoolEntry> {
        self.pools.iter().find(|p| p.id == id)
    }

    pub fn pool_by_name(&self, name: &str) -> Option<&PoolEntry> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// The pool of a placement group.
    pub fn pool_of_pg(&self, pg: u32) -> Option<&PoolEntry> {
        self.pools
            .iter()
            .find(|p| pg >= p.pg_base && pg - p.pg_base < p.pg_count)
    }

    /// The placement group of a chunk of a volume (`None` if the volume is
    /// unknown).
    pub fn pg_for(&self, volume_id: u64, chunk_index: u32) -> Option<u32> {
        let v = self.volume(volume_id)?;
        Some(match self.pool(v.pool_id) {
            Some(p) => p.pg_base + pg_of(volume_id, chunk_index, p.pg_count),
            None => pg_of(volume_id, chunk_index, self.pg_count),
        })
    }

    /// The state of member `i` of a placement group's acting set.
    pub fn copy_state(&self, pg: u32, i: usize) -> CopyState {
        self.pg_states
            .get(pg as usize)
            .and_then(|s| s.get(i))
            .copied()
            .unwrap_or_default()
    }

    fn disk_up(&self, disk_id: u32) -> bool {
        self.disk(disk_id).is_some_and(|d| d.up)
    }

    /// The primary of a placement group: the first member whose disk is up
    /// and whose copy is up to date. A pure function of the map, so every
    /// follower of one epoch agrees on it.
    pub fn primary(&self, pg: u32) -> Option<u32> {
        let set = self.pgs.get(pg as usize)?;
        set.iter()
            .enumerate()
            .find(|&(i, d)| self.disk_up(*d) && self.copy_state(pg, i) == CopyState::UpToDate)
            .map(|(_, d)| *d)
    }

    /// The members a primary sends writes to (itself included): every member
    /// whose disk is up, whatever its copy state, so an outdated copy keeps
    /// up with new writes while it is recovered.
    pub fn write_set(&self, pg: u32) -> Vec<u32> {
        self.pgs
            .get(pg as usize)
            .map(|s| s.iter().copied().filter(|d| self.disk_up(*d)).collect())
            .unwrap_or_default()
    }

    /// Copies required for a write to be acknowledged in this group.
    pub fn min_replicas(&self, pg: u32) -> u32 {
        self.pool_of_pg(pg).map_or(1, |p| p.min_replicas.max(1))
    }

    /// The primary disk of the chunk's placement group and how to reach it.
    pub fn locate(&self, volume_id: u64, chunk_index: u32) -> Option<ChunkLocation> {
        let pg = self.pg_for(volume_id, chunk_index)?;
        let disk_id = self.primary(pg)?;
        let disk = self.disk(disk_id)?;
        let node = self.node(disk.node_id)?;
        Some(ChunkLocation {
            pg,
            disk_id,
            node_id: node.id,
            addr: node.addr.clone(),
        })
    }

    /// Whether the chunk's placement group has `disk_id` in its acting set.
    pub fn disk_holds(&self, disk_id: u32, volume_id: u64, chunk_index: u32) -> bool {
        let Some(pg) = self.pg_for(volume_id, chunk_index) else {
            return false;
        };
        self.pgs
            .get(pg as usize)
            .is_some_and(|set| set.contains(&disk_id))
    }

    /// Whether a volume id names a volume that was deleted.
    pub fn is_deleted_volume(&self, volume_id: u64) -> bool {
        volume_id < self.next_volume_id && self.volume(volume_id).is_none()
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.pgs.len() != self.pg_count as usize {
            return Err(format!(
                "map has {} placement groups, pg_count says {}",
                self.pgs.len(),
                self.pg_count
            ));
        }
        for (i, set) in self.pgs.iter().enumerate() {
            for d in set {
                if self.disk(*d).is_none() {
                    return Err(format!("placement group {i} names unknown disk {d}"));
                }
            }
        }
        for (i, v) in self.volumes.iter().enumerate() {
            if self.volumes[..i]
                .iter()
                .any(|w| w.id == v.id || w.name == v.name)
            {
                return Err(format!("duplicate volume {} ({})", v.name, v.id));
            }
            if v.id >= self.next_volume_id {
                return Err(format!("volume id {} not below next_volume_id", v.id));
            }
            if v.chunk_size_bytes == 0 || v.chunk_size_bytes % 4096 != 0 {
                return Err(format!("volume {} has a bad chunk size", v.name));
            }
            if v.pool_id != 0 && self.pool(v.pool_id).is_none() {
                return Err(format!(
                    "volume {} names unknown pool {}",
                    v.name, v.pool_id
                ));
            }
        }
        for (i, p) in self.pools.iter().enumerate() {
            let end = u64::from(p.pg_base) + u64::from(p.pg_count);
            if p.pg_count == 0 || end > u64::from(self.pg_count) {
                return Err(format!("pool {} has a bad placement-group range", p.name));
            }
            if p.replicas == 0 || p.min_replicas == 0 || p.min_replicas > p.replicas {
                return Err(format!("pool {} has bad replica counts", p.name));
            }
            let overlaps = self.pools[..i].iter().any(|q| {
                q.id == p.id
                    || q.name == p.name
                    || (p.pg_base < q.pg_base + q.pg_count && q.pg_base < p.pg_base + p.pg_count)
            });
            if overlaps {
                return Err(format!("pool {} overlaps another pool", p.name));
            }
        }
        if !self.pg_states.is_empty() {
            if self.pg_states.len() != self.pgs.len() {
                return Err("pg_states does not match pgs".into());
            }
            for (i, (s, m)) in self.pg_states.iter().zip(&self.pgs).enumerate() {
                if s.len() != m.len() {
                    return Err(format!("placement group {i}: states do not match members"));
                }
            }
        }
        Ok(())
    }
}

/// The manager's copy-state policy when `disk` is lost (declared down, or
/// restarted as a new process that lost what was not durable): each of its
/// up-to-date copies becomes `Outdated`, except a group's last up-to-date
/// copy, which stays `UpToDate` (the group then waits for it: no other copy
/// is known to hold every acknowledged write). `states` is parallel to
/// `pgs`. Returns whether anything changed.
pub fn outdate_disk(pgs: &[Vec<u32>], states: &mut [Vec<CopyState>], disk: u32) -> bool {
    let mut changed = false;
    for (set, st) in pgs.iter().zip(states.iter_mut()) {
        let Some(i) = set.iter().position(|d| *d == disk) else {
            continue;
        };
        let others = st
            .iter()
            .enumerate()
            .any(|(j, s)| j != i && *s == CopyState::UpToDate);
        if st[i] == CopyState::UpToDate && others {
            st[i] = CopyState::Outdated;
            changed = true;
        }
    }
    changed
}

/// The manager's answer to a primary reporting `disk`'s copy of `pg`
/// recovered: accepted only at the current epoch (a restart or loss since
/// bumps the epoch and voids the report), from the group's primary, for a
/// member that is up. Returns whether the state changed.
pub fn mark_clean(
    map: &ClusterMap,
    states: &mut [Vec<CopyState>],
    pg: u32,
    disk: u32,
    reporter: u32,
    epoch: u64,
) -> bool {
    if epoch != map.epoch || map.primary(pg) != Some(reporter) {
        return false;
    }
    if !map.disk(disk).is_some_and(|d| d.up) {
        return false;
    }
    let Some(set) = map.pgs.get(pg as usize) else {
        return false;
    };
    let Some(i) = set.iter().position(|d| *d == disk) else {
        return false;
    };
    let st = &mut states[pg as usize];
    if st[i] == CopyState::UpToDate {
        return false;
    }
    st[i] = CopyState::UpToDate;
    true
}

/// The manager's re-placement policy when `disk` is taken out (down past
/// `--down-out-after`): in every group holding it, its copy leaves the
/// acting set and `pick(pg, remaining members)` names the disk that joins
/// in its place (appended, so the primary does not change), as a
/// [`CopyState::Backfill`] copy. A group whose last up-to-date copy is
/// `disk` keeps it (nobody else is known to hold every acknowledged write:
/// the group waits for that disk rather than lose it). `pick` may return
/// `None` (no eligible disk): the group then just shrinks. Returns the
/// groups that changed, in order.
pub fn take_out(
    pgs: &mut [Vec<u32>],
    states: &mut [Vec<CopyState>],
    disk: u32,
    mut pick: impl FnMut(u32, &[u32]) -> Option<u32>,
) -> Vec<u32> {
    let mut changed = Vec::new();
    for (pg, (set, st)) in pgs.iter_mut().zip(states.iter_mut()).enumerate() {
        let Some(i) = set.iter().position(|d| *d == disk) else {
            continue;
        };
        let others_uptodate = st
            .iter()
            .enumerate()
            .any(|(j, s)| j != i && *s == CopyState::UpToDate);
        if !others_uptodate {
            continue;
        }
        set.remove(i);
        st.remove(i);
        if let Some(new) = pick(pg as u32, set) {
            assert!(!set.contains(&new), "replacement already a member");
            assert!(new != disk, "replacement is the disk taken out");
            set.push(new);
            st.push(CopyState::Backfill);
        }
        changed.push(pg as u32);
    }
    changed
}

/// The placement group of a chunk: a stable hash of (volume id, chunk index).
/// Stable across releases: changing it moves every chunk.
pub fn pg_of(volume_id: u64, chunk_index: u32, pg_count: u32) -> u32 {
    assert!(pg_count > 0);
    let h = mix64(volume_id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(chunk_index));
    (h % u64::from(pg_count)) as u32
}

/// splitmix64's finaliser: a fast, well-distributed 64-bit mixer.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves the placement hash is stable (golden values) and spreads chunks.
    #[test]
    fn pg_of_is_stable_and_spread() {
        assert_eq!(pg_of(1, 0, 256), pg_of(1, 0, 256));
        let mut counts = vec![0u32; 64];
        for c in 0..64_000u32 {
            counts[pg_of(3, c, 64) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 850 && *max < 1150, "uneven spread {min}..{max}");
    }

    fn two_pool_map() -> ClusterMap {
        let disk = |id, node_id, up| DiskEntry {
            id,
            node_id,
            uuid: format!("d{id}"),
            capacity_bytes: 1 << 30,
            up,
            incarnation: 0,
            out: false,
            up_since: None,
        };
        let pool = |id, name: &str, pg_base, pg_count| PoolEntry {
            id,
            name: name.into(),
            replicas: 3,
            min_replicas: 2,
            failure_domain: FailureDomain::Host,
            chunk_size_bytes: CHUNK_SIZE_DEFAULT_BYTES,
            pg_base,
            pg_count,
        };
        ClusterMap {
            epoch: 3,
            cluster_id: "c".into(),
            pg_count: 6,
            nodes: (1..=3)
                .map(|id| NodeEntry {
                    id,
                    addr: format!("n{id}:1"),
                    up: id != 1,
                    zone: String::new(),
                    rack: String::new(),
                    host: String::new(),
                })
                .collect(),
            disks: vec![disk(1, 1, false), disk(2, 2, true), disk(3, 3, true)],
            pgs: vec![vec![1, 2, 3]; 6],
            pg_states: vec![
                vec![
                    CopyState::UpToDate,
                    CopyState::Outdated,
                    CopyState::UpToDate
                ];
                6
            ],
            volumes: vec![VolumeEntry {
                id: 1,
                name: "v".into(),
                size_bytes: 1 << 30,
                chunk_size_bytes: CHUNK_SIZE_DEFAULT_BYTES,
                block_size: 512,
                pool_id: 2,
            }],
            next_volume_id: 2,
            pools: vec![pool(1, "default", 0, 2), pool(2, "fast", 2, 4)],
        }
    }

    // Proves a volume's chunks stay inside its pool's placement-group range
    // and that the primary is the first up, up-to-date member.
    #[test]
    fn pools_primary_and_write_set() {
        let m = two_pool_map();
        m.validate().unwrap();
        for c in 0..100 {
            let pg = m.pg_for(1, c).unwrap();
            assert!((2..6).contains(&pg), "pg {pg}");
            assert!(m.disk_holds(3, 1, c));
        }
        // Disk 1 is down, disk 2 outdated: disk 3 leads.
        assert_eq!(m.primary(2), Some(3));
        assert_eq!(m.write_set(2), vec![2, 3]);
        assert_eq!(m.min_replicas(2), 2);
        assert_eq!(m.locate(1, 0).unwrap().disk_id, 3);
        assert_eq!(m.pool_of_pg(1).unwrap().name, "default");
        assert!(m.pg_for(9, 0).is_none());
    }

    // Proves taking a disk out replaces its copy by a backfill member at the
    // end of the set (primary unchanged), leaves groups without it alone,
    // and keeps a group's last up-to-date copy.
    #[test]
    fn take_out_replaces_member() {
        use CopyState::*;
        let mut pgs = vec![vec![1, 2, 3], vec![2, 3, 4], vec![3, 1, 2]];
        let mut states = vec![
            vec![Outdated, UpToDate, UpToDate],
            vec![UpToDate; 3],
            vec![Outdated, UpToDate, Outdated],
        ];
        let changed = take_out(&mut pgs, &mut states, 1, |_, set| {
            (1..=5).find(|d| *d != 1 && !set.contains(d))
        });
        assert_eq!(changed, vec![0]);
        assert_eq!(pgs[0], vec![2, 3, 4]);
        assert_eq!(states[0], vec![UpToDate, UpToDate, Backfill]);
        assert_eq!(pgs[1], vec![2, 3, 4]);
        // Disk 1 holds group 2's only up-to-date copy: kept.
        assert_eq!(pgs[2], vec![3, 1, 2]);
        // No eligible disk: the group shrinks.
        let changed = take_out(&mut pgs, &mut states, 4, |_, _| None);
        assert_eq!(changed, vec![0, 1]);
        assert_eq!(pgs[0], vec![2, 3]);
        assert_eq!(states[0], vec![UpToDate, UpToDate]);
    }

    // Proves validate rejects overlapping pools and mismatched states.
    #[test]
    fn validate_pools() {
        let mut m = two_pool_map();
        m.pools[1].pg_base = 1;
        assert!(m.validate().is_err());
        let mut m = two_pool_map();
        m.pg_states[0].pop();
        assert!(m.validate().is_err());
        let mut m = two_pool_map();
        m.pools[1].min_replicas = 4;
        assert!(m.validate().is_err());
        let mut m = two_pool_map();
        m.volumes[0].pool_id = 7;
        assert!(m.validate().is_err());
    }
}
