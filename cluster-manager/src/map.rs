//! The volume catalogue and the published cluster map, as pure functions
//! of the catalogue: volume rules (names, sizes, block sizes, grow-only
//! resize, ids never reused), building the [`ClusterMap`] the daemons
//! follow, and the per-volume view ([`VolumeInfo`]) the API shows.
//!
//! Pools own contiguous placement-group ranges; a pool's groups are filled
//! when a volume is first created in it and some group is still empty (see
//! [`crate::placement`]). A group moves only when one of its disks is taken
//! out ([`take_out`]: the departed copy is replaced by a backfill member)
//! or it is short of copies ([`top_up`]).
//! Nothing here persists or bumps the epoch: the daemon does both after any
//! change these functions report.

use crate::placement::{self, Candidate, Placer};
use crate::store::{Catalog, DEFAULT_POOL, default_min_replicas};
use std::collections::BTreeMap;
use tessera_wire::api::{
    CreatePoolRequest, CreateVolumeRequest, DiskShare, HeartbeatRequest, PoolInfo,
    ResizeVolumeRequest, VolumeInfo,
};
use tessera_wire::map::{
    CHUNK_SIZE_DEFAULT_BYTES, ClusterMap, CopyState, DiskEntry, NodeEntry, PoolEntry, VolumeEntry,
};

/// Longest volume name.
pub const VOLUME_NAME_MAX: usize = 64;
/// Default logical block size of a new volume.
pub const BLOCK_SIZE_DEFAULT: u32 = 512;
/// Most copies a pool may keep.
pub const REPLICAS_MAX: u32 = 8;
/// Most placement groups in one pool, and in the whole cluster: the map
/// carries one acting set per group, so this bounds its size.
pub const POOL_PGS_MAX: u32 = 65_536;
pub const PGS_TOTAL_MAX: u32 = 1 << 20;
/// Placement groups of a new pool when none is asked for.
pub const POOL_PGS_DEFAULT: u32 = 128;
/// Largest volume, 256 TiB: far below the u32 chunk-index limit of the
/// wire (16 PiB at 4 MiB chunks), and small enough that counting a volume's
/// chunks per disk for [`volume_info`] stays well under a second.
pub const VOLUME_SIZE_MAX_BYTES: u64 = 1 << 48;
const _: () = assert!(VOLUME_SIZE_MAX_BYTES / CHUNK_SIZE_DEFAULT_BYTES <= u32::MAX as u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("bad volume name {0:?}: use 1-64 characters from A-Z a-z 0-9 . _ -")]
    BadName(String),
    #[error("block_size must be 512 or 4096, not {0}")]
    BadBlockSize(u32),
    #[error("size must be a non-zero multiple of the block size ({0} bytes)")]
    BadSize(u32),
    #[error("size is larger than the maximum of {VOLUME_SIZE_MAX_BYTES} bytes")]
    TooLarge,
    #[error("volumes can only grow (shrinking would lose data): {name:?} is {size_bytes} bytes")]
    Shrink { name: String, size_bytes: u64 },
    #[error("volume {0:?} already exists")]
    Exists(String),
    #[error("volume {0:?} not found")]
    NotFound(String),
    #[error("no storage disk is registered and up")]
    NoDisk,
    #[error(
        "pool {pool:?} needs {needed} distinct {level} failure domains with an up disk, only {have} are up"
    )]
    TooFewDomains {
        pool: String,
        needed: u32,
        have: u32,
        level: &'static str,
    },
    #[error("bad pool name {0:?}: use 1-64 characters from A-Z a-z 0-9 . _ -")]
    BadPoolName(String),
    #[error("bad pool: {0}")]
    BadPool(String),
    #[error("pool {0:?} already exists")]
    PoolExists(String),
    #[error("pool {0:?} not found")]
    PoolNotFound(String),
}

impl Error {
    /// The HTTP status the API answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            Error::BadName(_)
            | Error::BadBlockSize(_)
            | Error::BadSize(_)
            | Error::TooLarge
            | Error::Shrink { .. }
            | Error::BadPoolName(_)
            | Error::BadPool(_) => 400,
            Error::NotFound(_) | Error::PoolNotFound(_) => 404,
            Error::Exists(_) | Error::PoolExists(_) => 409,
            Error::NoDisk | Error::TooFewDomains { .. } => 503,
        }
    }
}

pub fn validate_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= VOLUME_NAME_MAX
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_string()))
    }
}

fn validate_size(size_bytes: u64, block_size: u32) -> Result<(), Error> {
    if size_bytes == 0 || !size_bytes.is_multiple_of(u64::from(block_size)) {
        return Err(Error::BadSize(block_size));
    }
    if size_bytes > VOLUME_SIZE_MAX_BYTES {
        return Err(Error::TooLarge);
    }
    Ok(())
}

/// Create a pool: validate its policy and give it the next placement-group
/// range. Its groups are placed when its first volume is created.
pub fn create_pool(c: &mut Catalog, req: &CreatePoolRequest) -> Result<u32, Error> {
    if validate_name(&req.name).is_err() {
        return Err(Error::BadPoolName(req.name.clone()));
    }
    if c.pools.iter().any(|p| p.name == req.name) {
        return Err(Error::PoolExists(req.name.clone()));
    }
    let bad = |m: String| Err(Error::BadPool(m));
    if req.replicas == 0 || req.replicas > REPLICAS_MAX {
        return bad(format!("replicas must be 1-{REPLICAS_MAX}"));
    }
    let min = req
        .min_replicas
        .unwrap_or_else(|| default_min_replicas(req.replicas));
    if min == 0 || min > req.replicas {
        return bad(format!("min_replicas must be 1-{}", req.replicas));
    }
    let chunk = req.chunk_size_bytes.unwrap_or(CHUNK_SIZE_DEFAULT_BYTES);
    if chunk != CHUNK_SIZE_DEFAULT_BYTES {
        // Disks are formatted with one chunk size (on-disk format v1).
        return bad(format!(
            "chunk size must be {CHUNK_SIZE_DEFAULT_BYTES} bytes (the disks' format)"
        ));
    }
    let pg_count = req.pg_count.unwrap_or(POOL_PGS_DEFAULT);
    if pg_count == 0 || pg_count > POOL_PGS_MAX {
        return bad(format!("pg count must be 1-{POOL_PGS_MAX}"));
    }
    if u64::from(c.pg_count) + u64::from(pg_count) > u64::from(PGS_TOTAL_MAX) {
        return bad(format!(
            "the cluster may hold at most {PGS_TOTAL_MAX} placement groups"
        ));
    }
    let id = c.pools.iter().map(|p| p.id).max().unwrap_or(0) + 1;
    c.pools.push(PoolEntry {
        id,
        name: req.name.clone(),
        replicas: req.replicas,
        min_replicas: min,
        failure_domain: req.failure_domain.unwrap_or_default(),
        chunk_size_bytes: chunk,
        pg_base: c.pg_count,
        pg_count,
    });
    c.pgs.extend((0..pg_count).map(|_| Vec::new()));
    c.pg_states.extend((0..pg_count).map(|_| Vec::new()));
    c.pg_count += pg_count;
    Ok(id)
}

pub fn pool_infos(c: &Catalog) -> Vec<PoolInfo> {
    c.pools
        .iter()
        .map(|p| PoolInfo {
            id: p.id,
            name: p.name.clone(),
            replicas: p.replicas,
            min_replicas: p.min_replicas,
            failure_domain: p.failure_domain,
            chunk_size_bytes: p.chunk_size_bytes,
            pg_base: p.pg_base,
            pg_count: p.pg_count,
            volumes: c.volumes.iter().filter(|v| v.pool_id == p.id).count() as u32,
        })
        .collect()
}

/// Place the pool's empty placement groups on `up_disks`. Refuses when
/// fewer failure domains are up than the pool's `min_replicas`: such groups
/// could never take a write.
fn place_pool(c: &mut Catalog, pool: &PoolEntry, up_disks: &[Candidate]) -> Result<(), Error> {
    let range = pool.pg_base..pool.pg_base + pool.pg_count;
    if !c.pgs[range.start as usize..range.end as usize]
        .iter()
        .any(Vec::is_empty)
    {
        return Ok(());
    }
    if up_disks.is_empty() {
        return Err(Error::NoDisk);
    }
    let placer = Placer::new(up_disks, pool.failure_domain);
    let have = placer.domains() as u32;
    if have < pool.min_replicas {
        return Err(Error::TooFewDomains {
            pool: pool.name.clone(),
            needed: pool.min_replicas,
            have,
            level: pool.failure_domain.name(),
        });
    }
    placement::fill(&mut c.pgs, range.clone(), &placer, pool.replicas as usize);
    for pg in range {
        let n = c.pgs[pg as usize].len();
        if c.pg_states[pg as usize].len() != n {
            c.pg_states[pg as usize] = vec![CopyState::UpToDate; n];
        }
    }
    Ok(())
}

/// Create a volume in its pool, placing any empty placement group of the
/// pool on the disks in `up_disks`. Returns the new volume's id.
pub fn create_volume(
    c: &mut Catalog,
    req: &CreateVolumeRequest,
    up_disks: &[Candidate],
) -> Result<u64, Error> {
    validate_name(&req.name)?;
    let block_size = req.block_size.unwrap_or(BLOCK_SIZE_DEFAULT);
    if block_size != 512 && block_size != 4096 {
        return Err(Error::BadBlockSize(block_size));
    }
    validate_size(req.size_bytes, block_size)?;
    if c.volumes.iter().any(|v| v.name == req.name) {
        return Err(Error::Exists(req.name.clone()));
    }
    let pool_name = req.pool.as_deref().unwrap_or(DEFAULT_POOL);
    let pool = c
        .pools
        .iter()
        .find(|p| p.name == pool_name)
        .cloned()
        .ok_or_else(|| Error::PoolNotFound(pool_name.to_string()))?;
    place_pool(c, &pool, up_disks)?;
    let id = c.next_volume_id;
    c.next_volume_id = id.checked_add(1).expect("volume ids exhausted");
    c.volumes.push(VolumeEntry {
        id,
        name: req.name.clone(),
        size_bytes: req.size_bytes,
        chunk_size_bytes: pool.chunk_size_bytes,
        block_size,
        pool_id: pool.id,
    });
    Ok(id)
}

/// Grow a volume. Returns (id, whether the size changed).
pub fn resize_volume(
    c: &mut Catalog,
    name: &str,
    req: &ResizeVolumeRequest,
) -> Result<(u64, bool), Error> {
    let v = c
        .volumes
        .iter_mut()
        .find(|v| v.name == name)
        .ok_or_else(|| Error::NotFound(name.to_string()))?;
    if req.size_bytes < v.size_bytes {
        return Err(Error::Shrink {
            name: name.to_string(),
            size_bytes: v.size_bytes,
        });
    }
    validate_size(req.size_bytes, v.block_size)?;
    let changed = req.size_bytes != v.size_bytes;
    v.size_bytes = req.size_bytes;
    Ok((v.id, changed))
}

/// Remove a volume from the catalogue. Its id stays used forever, so the
/// storage daemons can tell its leftover blocks are garbage.
pub fn delete_volume(c: &mut Catalog, name: &str) -> Result<u64, Error> {
    let i = c
        .volumes
        .iter()
        .position(|v| v.name == name)
        .ok_or_else(|| Error::NotFound(name.to_string()))?;
    Ok(c.volumes.remove(i).id)
}

/// The published map; `up(node_id)` is the health verdict.
pub fn build(c: &Catalog, up: impl Fn(u32) -> bool) -> ClusterMap {
    ClusterMap {
        epoch: c.epoch,
        cluster_id: c.cluster_id.clone(),
        pg_count: c.pg_count,
        nodes: c
            .nodes
            .iter()
            .map(|n| NodeEntry {
                id: n.id,
                addr: n.addr.clone(),
                up: up(n.id),
                zone: n.zone.clone(),
                rack: n.rack.clone(),
                host: n.host.clone(),
            })
            .collect(),
        disks: c
            .disks
            .iter()
            .map(|d| DiskEntry {
                id: d.id,
                node_id: d.node_id,
                uuid: d.uuid.clone(),
                capacity_bytes: d.capacity_bytes,
                up: up(d.node_id),
                incarnation: d.incarnation,
                out: d.out,
                up_since: None,
            })
            .collect(),
        pgs: c.pgs.clone(),
        volumes: c.volumes.clone(),
        next_volume_id: c.next_volume_id,
        pools: c.pools.clone(),
        pg_states: c.pg_states.clone(),
    }
}

/// The API's view of one volume: where its chunks live (counted through
/// [`ClusterMap::locate`], exactly as a gateway would route them) and what
/// the storage daemons last reported as allocated.
pub fn volume_info<'a>(
    map: &ClusterMap,
    v: &VolumeEntry,
    usage: impl Iterator<Item = &'a HeartbeatRequest>,
) -> VolumeInfo {
    let chunks = v.chunk_count();
    assert!(chunks <= u64::from(u32::MAX));
    // Count chunks per placement group with the cheap hash, then resolve
    // each group once through `locate` (first chunk seen stands for the
    // group): the same answer as locating every chunk, without a linear
    // disk search per chunk.
    let mut per_pg: BTreeMap<u32, (u32, u64)> = BTreeMap::new();
    for chunk in 0..chunks as u32 {
        let Some(pg) = map.pg_for(v.id, chunk) else {
            break;
        };
        per_pg.entry(pg).or_insert((chunk, 0)).1 += 1;
    }
    let mut shares: BTreeMap<u32, (u32, u64)> = BTreeMap::new();
    for (first_chunk, n) in per_pg.into_values() {
        if let Some(loc) = map.locate(v.id, first_chunk) {
            shares.entry(loc.disk_id).or_insert((loc.node_id, 0)).1 += n;
        }
    }
    let allocated_bytes = usage
        .flat_map(|u| u.volumes.iter())
        .filter(|u| u.volume_id == v.id)
        .map(|u| u.allocated_bytes)
        .sum();
    VolumeInfo {
        id: v.id,
        name: v.name.clone(),
        size_bytes: v.size_bytes,
        block_size: v.block_size,
        chunk_size_bytes: v.chunk_size_bytes,
        chunks,
        allocated_bytes,
        placement: shares
            .into_iter()
            .map(|(disk_id, (node_id, chunks))| DiskShare {
                disk_id,
                node_id,
                chunks,
            })
            .collect(),
        pool: map
            .pool(v.pool_id)
            .map_or_else(String::new, |p| p.name.clone()),
        replicas: map.pool(v.pool_id).map_or(1, |p| p.replicas),
        copies: copies(map, v),
    }
}

/// Placement-group health counted from the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PgHealth {
    pub clean: u32,
    pub degraded: u32,
    pub recovering: u32,
    /// Recovering groups with a new member being filled (re-placement).
    pub backfilling: u32,
}

pub fn pg_health(map: &ClusterMap) -> PgHealth {
    let mut h = PgHealth::default();
    for (pg, set) in map.pgs.iter().enumerate() {
        if set.is_empty() {
            continue;
        }
        let pg = pg as u32;
        let want = map.pool_of_pg(pg).map_or(1, |p| p.replicas as usize);
        let up = |d: &u32| map.disk(*d).is_some_and(|d| d.up);
        let clean = set.len() >= want
            && set
                .iter()
                .enumerate()
                .all(|(i, d)| up(d) && map.copy_state(pg, i) == CopyState::UpToDate);
        if clean {
            h.clean += 1;
            continue;
        }
        h.degraded += 1;
        let recovering = set
            .iter()
            .enumerate()
            .any(|(i, d)| up(d) && map.copy_state(pg, i) != CopyState::UpToDate);
        h.recovering += u32::from(recovering);
        let backfilling = set
            .iter()
            .enumerate()
            .any(|(i, d)| up(d) && map.copy_state(pg, i) == CopyState::Backfill);
        h.backfilling += u32::from(backfilling);
    }
    h
}

/// Per disk holding copies of `v`: how many of its groups the disk is in
/// and the state of its copies (`UpToDate` when all are; otherwise
/// `Recovering` when the disk is up, `Outdated` when it is down).
pub fn copies(map: &ClusterMap, v: &VolumeEntry) -> Vec<tessera_wire::api::CopyInfo> {
    let (base, count) = match map.pool(v.pool_id) {
        Some(p) => (p.pg_base, p.pg_count),
        None => (0, map.pg_count),
    };
    let mut per: BTreeMap<u32, (u32, bool)> = BTreeMap::new();
    for pg in base..base + count {
        for (i, d) in map.pgs[pg as usize].iter().enumerate() {
            let e = per.entry(*d).or_insert((0, true));
            e.0 += 1;
            e.1 &= map.copy_state(pg, i) == CopyState::UpToDate;
        }
    }
    per.into_iter()
        .map(|(disk_id, (pgs, uptodate))| {
            let disk = map.disk(disk_id);
            let up = disk.is_some_and(|d| d.up);
            tessera_wire::api::CopyInfo {
                disk_id,
                node_id: disk.map_or(0, |d| d.node_id),
                pgs,
                up,
                state: if uptodate {
                    "UpToDate"
                } else if up {
                    "Recovering"
                } else {
                    "Outdated"
                }
                .into(),
            }
        })
        .collect()
}

/// Disks eligible for new placement groups: those whose node is up and
/// that are not out.
pub fn up_disks(c: &Catalog, up: impl Fn(u32) -> bool) -> Vec<Candidate> {
    let mut v = all_disks(c);
    v.retain(|d| up(d.node_id) && !c.disks.iter().any(|x| x.id == d.disk_id && x.out));
    v
}

/// Every disk of the catalogue as a placement candidate.
fn all_disks(c: &Catalog) -> Vec<Candidate> {
    c.disks
        .iter()
        .map(|d| {
            let node = c.nodes.iter().find(|n| n.id == d.node_id);
            let label =
                |f: fn(&crate::store::Node) -> &String| node.map(f).cloned().unwrap_or_default();
            Candidate {
                disk_id: d.id,
                node_id: d.node_id,
                capacity_bytes: d.capacity_bytes,
                zone: label(|n| &n.zone),
                rack: label(|n| &n.rack),
                host: label(|n| &n.host),
            }
        })
        .collect()
}

/// Take `disk` out of placement: in every group holding it, its copy is
/// replaced by the disk straw2 placement picks next among the disks that
/// are up and in (a `Backfill` member, filled by the group's primary), in
/// a failure domain no other member uses. Groups whose last up-to-date
/// copy is on `disk` keep it (see [`tessera_wire::map::take_out`]).
/// Returns the groups that changed.
pub fn take_out(c: &mut Catalog, disk: u32, up: impl Fn(u32) -> bool) -> Vec<u32> {
    let Some(d) = c.disks.iter_mut().find(|d| d.id == disk) else {
        return Vec::new();
    };
    d.out = true;
    let eligible = eligible_disks(c, &up);
    let all = all_disks(c);
    let mut changed = Vec::new();
    for pool in c.pools.clone() {
        let placer = Placer::new(&all, pool.failure_domain);
        let range = pool.pg_base as usize..(pool.pg_base + pool.pg_count) as usize;
        let base = pool.pg_base;
        let moved = tessera_wire::map::take_out(
            &mut c.pgs[range.clone()],
            &mut c.pg_states[range],
            disk,
            |pg, members| placer.replacement(base + pg, members, |d| eligible.contains(&d)),
        );
        changed.extend(moved.into_iter().map(|pg| pg + base));
    }
    changed
}

/// Add a `Backfill` member to every placed group that has fewer members
/// than its pool's copies (a disk was taken out when no replacement was
/// eligible) and still has an up-to-date copy to fill it from, when an
/// eligible disk exists now. Returns the groups that changed.
pub fn top_up(c: &mut Catalog, up: impl Fn(u32) -> bool) -> Vec<u32> {
    let eligible = eligible_disks(c, &up);
    if eligible.is_empty() {
        return Vec::new();
    }
    let all = all_disks(c);
    let mut changed = Vec::new();
    for pool in c.pools.clone() {
        let placer = Placer::new(&all, pool.failure_domain);
        for pg in pool.pg_base..pool.pg_base + pool.pg_count {
            let (set, st) = (&mut c.pgs[pg as usize], &mut c.pg_states[pg as usize]);
            if set.is_empty()
                || set.len() >= pool.replicas as usize
                || !st.contains(&CopyState::UpToDate)
            {
                continue;
            }
            if let Some(new) = placer.replacement(pg, set, |d| eligible.contains(&d)) {
                set.push(new);
                st.push(CopyState::Backfill);
                changed.push(pg);
            }
        }
    }
    changed
}

/// Placement groups moving to a new disk at once (each one is a backfill
/// of the group's data onto the new disk, throttled again by each
/// primary's `--recovery-pushes-max`); Ceph's `osd_max_backfills` plays the
/// same role.
pub const REBALANCE_PGS_MAX: usize = 8;

/// Move placement groups towards their placement over the disks in now (a
/// disk was added, or one came back in): each group whose acting set is
/// not what straw2 picks over every disk that is in gets the first missing
/// disk as a `Backfill` member (one more copy than the pool's, so the group
/// keeps every copy it had while the new one fills); a group with more
/// members than its pool's copies, all of them up to date (its backfill is
/// done), drops the members placement no longer picks. Nothing moves while
/// a disk that is in is down (that is failure handling's business:
/// outdated copies, then `--down-out-after`), and at most
/// [`REBALANCE_PGS_MAX`] groups are growing at once. Because straw2 draws
/// per (group, disk), only groups whose placement now includes the new disk
/// move, which is the minimum (`placement::tests` measures it). Pools of one
/// copy are not rebalanced. A primary placement no longer picks is first
/// demoted (moved to the end of the set; its group is added to `demoted`)
/// and dropped only when `may_drop(pg)`. Returns the groups that changed.
pub fn rebalance(
    c: &mut Catalog,
    up: impl Fn(u32) -> bool,
    may_drop: impl Fn(u32) -> bool,
    demoted: &mut Vec<u32>,
) -> Vec<u32> {
    let in_disks: Vec<&crate::store::Disk> = c.disks.iter().filter(|d| !d.out).collect();
    if in_disks.is_empty() || in_disks.iter().any(|d| !up(d.node_id)) {
        return Vec::new();
    }
    let candidates = up_disks(c, &up);
    let mut changed = Vec::new();
    let mut growing = 0;
    for pool in &c.pools {
        for pg in pool.pg_base..pool.pg_base + pool.pg_count {
            let set = &c.pgs[pg as usize];
            let st = &c.pg_states[pg as usize];
            if set.len() > pool.replicas as usize || st.contains(&CopyState::Backfill) {
                growing += 1;
            }
        }
    }
    // Single-copy pools do not move: their groups bypass replication (the
    // storage daemon serves them straight from its engine), so nothing
    // would fill a backfill member.
    for pool in c.pools.clone().into_iter().filter(|p| p.replicas > 1) {
        let placer = Placer::new(&candidates, pool.failure_domain);
        let copies = pool.replicas as usize;
        for pg in pool.pg_base..pool.pg_base + pool.pg_count {
            let (set, st) = (&mut c.pgs[pg as usize], &mut c.pg_states[pg as usize]);
            if set.is_empty() || st.iter().any(|s| *s != CopyState::UpToDate) {
                continue;
            }
            let ideal = placer.place(pg, copies);
            if ideal.len() < copies.min(set.len()) {
                continue;
            }
            if set.len() > copies {
                // The new copy is up to date: drop those placement no
                // longer picks. Never the primary straight away: it may
                // still serve reads under its lease before it sees the map
                // that drops it, while the next primary acknowledges writes
                // without it. It first moves to the end of the set (the
                // next member leads; it stays in the write set, so no write
                // is acknowledged without it until it has seen that map),
                // and is dropped only once `may_drop` says every lease it
                // got under the older map has run out.
                if !ideal.contains(&set[0]) {
                    let (d, s0) = (set.remove(0), st.remove(0));
                    set.push(d);
                    st.push(s0);
                    demoted.push(pg);
                    changed.push(pg);
                    continue;
                }
                if !may_drop(pg) {
                    continue;
                }
                let before = set.len();
                let mut i = 0;
                while set.len() > copies && i < set.len() {
                    if ideal.contains(&set[i]) {
                        i += 1;
                    } else {
                        set.remove(i);
                        st.remove(i);
                    }
                }
                if set.len() != before {
                    changed.push(pg);
                }
                continue;
            }
            if growing >= REBALANCE_PGS_MAX {
                continue;
            }
            if let Some(new) = ideal.iter().copied().find(|d| !set.contains(d)) {
                set.push(new);
                st.push(CopyState::Backfill);
                growing += 1;
                changed.push(pg);
            }
        }
    }
    changed
}

/// Ids of the disks that may receive a copy: up and not out.
fn eligible_disks(c: &Catalog, up: &impl Fn(u32) -> bool) -> Vec<u32> {
    c.disks
        .iter()
        .filter(|d| !d.out && up(d.node_id) && d.capacity_bytes > 0)
        .map(|d| d.id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use tessera_wire::api::VolumeUsage;

    /// A catalogue with two nodes of one 1 GiB disk each.
    fn catalog(pg_count: u32) -> Catalog {
        let mut c = Catalog::new(pg_count);
        for n in ["n1", "n2"] {
            crate::membership::register(
                &mut c,
                &tessera_wire::api::RegisterRequest {
                    node_uuid: n.into(),
                    addr: format!("{n}:1"),
                    metrics_addr: None,
                    pid: 1,
                    host: String::new(),
                    zone: String::new(),
                    rack: String::new(),
                    disks: vec![tessera_wire::api::DiskRegistration {
                        uuid: format!("{n}-d"),
                        path: "/x".into(),
                        capacity_bytes: 1 << 30,
                    }],
                },
            )
            .unwrap();
        }
        c
    }

    /// A catalogue of `n` one-disk nodes with a three-copy default pool.
    fn triple(n: u32, pg_count: u32) -> Catalog {
        let mut c =
            Catalog::with_default_pool(pg_count, 3, 2, tessera_wire::map::FailureDomain::Host);
        for i in 1..=n {
            register_node(&mut c, &format!("n{i}"));
        }
        c
    }

    /// A 1 GiB volume `v` placed on the disks that are up.
    fn create_gib_volume(c: &mut Catalog) {
        let all = up_disks(c, |_| true);
        create_volume(
            c,
            &CreateVolumeRequest {
                name: "v".into(),
                size_bytes: 1 << 30,
                block_size: None,
                pool: None,
            },
            &all,
        )
        .unwrap();
    }

    fn register_node(c: &mut Catalog, name: &str) {
        crate::membership::register(
            c,
            &tessera_wire::api::RegisterRequest {
                node_uuid: name.into(),
                addr: format!("{name}:1"),
                metrics_addr: None,
                pid: 1,
                host: String::new(),
                zone: String::new(),
                rack: String::new(),
                disks: vec![tessera_wire::api::DiskRegistration {
                    uuid: format!("{name}-d"),
                    path: "/x".into(),
                    capacity_bytes: 1 << 30,
                }],
            },
        )
        .unwrap();
    }

    // Proves taking a disk out moves only the groups that held it, each to
    // a disk that is up and in, as a backfill member at the end of the set,
    // never two copies on one node; and that a group left short (no
    // eligible disk) is topped up once a disk is available again.
    #[test]
    fn take_out_and_top_up() {
        let mut c = triple(4, 64);
        create_gib_volume(&mut c);
        let before = c.pgs.clone();
        let changed = take_out(&mut c, 1, |n| n != 1);
        assert!(c.disks[0].out);
        let held: Vec<u32> = (0..64)
            .filter(|pg| before[*pg as usize].contains(&1))
            .collect();
        assert_eq!(changed, held);
        for (pg, was) in before.iter().enumerate() {
            if !was.contains(&1) {
                assert_eq!(&c.pgs[pg], was);
                continue;
            }
            let kept: Vec<u32> = was.iter().copied().filter(|d| *d != 1).collect();
            assert_eq!(c.pgs[pg][..2], kept[..]);
            assert_eq!(c.pgs[pg].len(), 3);
            assert!(!c.pgs[pg].contains(&1));
            assert_eq!(c.pg_states[pg][2], CopyState::Backfill);
        }
        build(&c, |_| true).validate().unwrap();
        let h = pg_health(&build(&c, |n| n != 1));
        assert_eq!(h.backfilling, held.len() as u32);
        // Out disks are not candidates for new groups.
        assert!(up_disks(&c, |_| true).iter().all(|d| d.disk_id != 1));

        // Three nodes: nothing eligible, the groups shrink; a fourth node
        // arriving tops them up.
        let mut c = triple(3, 16);
        create_gib_volume(&mut c);
        assert_eq!(take_out(&mut c, 2, |n| n != 2).len(), 16);
        assert!(c.pgs.iter().all(|s| s.len() == 2));
        assert!(top_up(&mut c, |n| n != 2).is_empty());
        register_node(&mut c, "n4");
        assert_eq!(top_up(&mut c, |n| n != 2).len(), 16);
        assert!(c.pgs.iter().all(|s| s.len() == 3 && s[2] == 4));
        assert!(top_up(&mut c, |n| n != 2).is_empty());
    }

    /// Run rebalancing rounds until nothing changes, the primaries filling
    /// every backfill member between rounds and a demoted primary dropped
    /// only a round after its demotion. Checks on the way: never more than
    /// one extra copy, at most REBALANCE_PGS_MAX groups growing, a grown
    /// group keeps every copy it had and its new one is backfilling, a
    /// demoted primary moves to the end and stays a member for that round.
    /// Returns the groups that grew and those whose primary was demoted.
    fn rebalance_until_done(c: &mut Catalog) -> (BTreeSet<u32>, BTreeSet<u32>) {
        let n = c.pgs.len();
        let (mut grown, mut all_demoted) = (BTreeSet::new(), BTreeSet::new());
        let mut demoted: Vec<u32> = Vec::new();
        for _ in 0..4 * n {
            let recent = std::mem::take(&mut demoted);
            let was = c.pgs.clone();
            let changed = rebalance(c, |_| true, |pg| !recent.contains(&pg), &mut demoted);
            if changed.is_empty() {
                assert!(demoted.is_empty());
                return (grown, all_demoted);
            }
            let growing = c.pgs.iter().filter(|s| s.len() > 3).count();
            assert!(growing <= REBALANCE_PGS_MAX, "{growing} groups growing");
            for pg in changed {
                let (set, st, old) = (
                    &c.pgs[pg as usize],
                    &c.pg_states[pg as usize],
                    &was[pg as usize],
                );
                assert!(set.len() <= 4, "{set:?}");
                if demoted.contains(&pg) {
                    assert_eq!(set[3], old[0]);
                    assert_eq!(set[..3], old[1..]);
                    all_demoted.insert(pg);
                } else if set.len() > old.len() {
                    assert_eq!(set[..old.len()], old[..]);
                    assert_eq!(st[old.len()], CopyState::Backfill);
                    grown.insert(pg);
                } else {
                    assert!(set.iter().all(|d| old.contains(d)), "a drop only removes");
                    assert!(!recent.is_empty() || set[0] == old[0]);
                }
            }
            for st in c.pg_states.iter_mut() {
                st.iter_mut().for_each(|s| *s = CopyState::UpToDate);
            }
            build(c, |_| true).validate().unwrap();
        }
        panic!("rebalancing did not settle");
    }

    fn assert_placed(c: &Catalog) {
        let placer = Placer::new(
            &up_disks(c, |_| true),
            tessera_wire::map::FailureDomain::Host,
        );
        for pg in 0..c.pgs.len() as u32 {
            let mut want = placer.place(pg, 3);
            let mut have = c.pgs[pg as usize].clone();
            want.sort();
            have.sort();
            assert_eq!(have, want, "pg {pg}");
        }
    }

    // Proves a disk added to a placed cluster receives exactly the groups
    // whose placement now picks it (no other group moves), each through a
    // backfill member added while every old copy stays, at most
    // REBALANCE_PGS_MAX at once, the copy it replaces dropped only once the
    // new one is up to date; nothing moves while a disk is down; the end
    // state is the placement over all disks. One added disk never displaces
    // a primary (straw2: it displaces the lowest draw); three added at once
    // do, and each such primary is demoted before it is dropped.
    #[test]
    fn rebalance_onto_added_disks() {
        let mut c = triple(3, 64);
        create_gib_volume(&mut c);
        let mut none = Vec::new();
        assert!(rebalance(&mut c, |_| true, |_| true, &mut none).is_empty());
        register_node(&mut c, "n4");
        assert!(
            rebalance(&mut c, |n| n != 2, |_| true, &mut none).is_empty(),
            "a disk is down"
        );
        let placer = Placer::new(
            &up_disks(&c, |_| true),
            tessera_wire::map::FailureDomain::Host,
        );
        let should_move: BTreeSet<u32> = (0..64)
            .filter(|pg| placer.place(*pg, 3).contains(&4))
            .collect();
        let (grown, demoted) = rebalance_until_done(&mut c);
        assert_eq!(grown, should_move);
        assert!(demoted.is_empty());
        assert_placed(&c);

        let before = c.pgs.clone();
        for n in ["n5", "n6", "n7"] {
            register_node(&mut c, n);
        }
        let placer = Placer::new(
            &up_disks(&c, |_| true),
            tessera_wire::map::FailureDomain::Host,
        );
        let should_move: BTreeSet<u32> = (0..64)
            .filter(|pg| placer.place(*pg, 3).iter().any(|d| *d >= 5))
            .collect();
        let (grown, demoted) = rebalance_until_done(&mut c);
        assert_eq!(grown, should_move);
        assert!(!demoted.is_empty(), "no primary was displaced");
        for pg in &demoted {
            assert!(!c.pgs[*pg as usize].contains(&before[*pg as usize][0]));
        }
        assert_placed(&c);
    }

    fn disks() -> Vec<Candidate> {
        up_disks(&catalog(1), |_| true)
    }

    fn create(c: &mut Catalog, name: &str, size: u64, bs: Option<u32>) -> Result<u64, Error> {
        create_volume(
            c,
            &CreateVolumeRequest {
                name: name.into(),
                size_bytes: size,
                block_size: bs,
                pool: None,
            },
            &disks(),
        )
    }

    // Proves one rejection per rule, with the HTTP status the API promises.
    #[test]
    fn volume_rules() {
        let mut c = catalog(8);
        let none = CreateVolumeRequest {
            name: "a".into(),
            size_bytes: 512,
            block_size: None,
            pool: None,
        };
        assert_eq!(create_volume(&mut c, &none, &[]), Err(Error::NoDisk));
        assert_eq!(create(&mut c, "a", 1 << 30, None), Ok(1));
        assert!(c.pgs.iter().all(|s| s.len() == 1));
        let cases = [
            (create(&mut c, "a", 512, None), 409),
            (create(&mut c, "", 512, None), 400),
            (create(&mut c, "a/b", 512, None), 400),
            (create(&mut c, &"x".repeat(65), 512, None), 400),
            (create(&mut c, "b", 0, None), 400),
            (create(&mut c, "b", 513, None), 400),
            (create(&mut c, "b", 512, Some(4096)), 400),
            (create(&mut c, "b", 4096, Some(1024)), 400),
            (create(&mut c, "b", VOLUME_SIZE_MAX_BYTES + 4096, None), 400),
        ];
        for (i, (r, status)) in cases.into_iter().enumerate() {
            assert_eq!(r.unwrap_err().http_status(), status, "case {i}");
        }
        assert!(create(&mut c, &"x".repeat(64), 512, None).is_ok());
        // Once every group is assigned, creating needs no disk.
        let ok = CreateVolumeRequest {
            name: "later".into(),
            size_bytes: 4096,
            block_size: Some(4096),
            pool: None,
        };
        assert!(create_volume(&mut c, &ok, &[]).is_ok());
    }

    // Proves resize grows only and delete never frees the id.
    #[test]
    fn resize_and_delete() {
        let mut c = catalog(8);
        create(&mut c, "a", 1 << 20, None).unwrap();
        let grow = |s| ResizeVolumeRequest { size_bytes: s };
        assert_eq!(resize_volume(&mut c, "a", &grow(2 << 20)), Ok((1, true)));
        assert_eq!(resize_volume(&mut c, "a", &grow(2 << 20)), Ok((1, false)));
        assert_eq!(
            resize_volume(&mut c, "a", &grow(1 << 20))
                .unwrap_err()
                .http_status(),
            400
        );
        assert_eq!(
            resize_volume(&mut c, "a", &grow((2 << 20) + 1))
                .unwrap_err()
                .http_status(),
            400
        );
        assert_eq!(
            resize_volume(&mut c, "zz", &grow(1)),
            Err(Error::NotFound("zz".into()))
        );
        assert_eq!(delete_volume(&mut c, "a"), Ok(1));
        assert_eq!(delete_volume(&mut c, "a"), Err(Error::NotFound("a".into())));
        assert_eq!(create(&mut c, "a", 1 << 20, None), Ok(2));
        let map = build(&c, |_| true);
        assert!(map.is_deleted_volume(1));
        map.validate().unwrap();
    }

    // Proves the volume view counts every chunk once and sums the nodes'
    // reported allocation.
    #[test]
    fn info_counts_chunks_and_usage() {
        let mut c = catalog(16);
        create(&mut c, "a", 1 << 30, None).unwrap();
        let map = build(&c, |_| true);
        let hb = |n| HeartbeatRequest {
            recovery: Default::default(),
            disks: vec![],
            volumes: vec![
                VolumeUsage {
                    volume_id: 1,
                    allocated_bytes: n,
                },
                VolumeUsage {
                    volume_id: 9,
                    allocated_bytes: 1000,
                },
            ],
            scrub: Default::default(),
        };
        let usage = [hb(5), hb(7)];
        let info = volume_info(&map, &c.volumes[0], usage.iter());
        assert_eq!(info.chunks, 256);
        // Same answer as locating every chunk one by one.
        let mut slow: BTreeMap<u32, u64> = BTreeMap::new();
        for chunk in 0..256 {
            *slow
                .entry(map.locate(1, chunk).unwrap().disk_id)
                .or_default() += 1;
        }
        let fast: BTreeMap<u32, u64> = info
            .placement
            .iter()
            .map(|s| (s.disk_id, s.chunks))
            .collect();
        assert_eq!(fast, slow);
        assert_eq!(info.placement.iter().map(|s| s.chunks).sum::<u64>(), 256);
        assert_eq!(info.placement.len(), 2);
        assert_eq!(info.allocated_bytes, 12);
        let down = build(&c, |n| n != 2);
        assert!(!down.disks[1].up && down.disks[0].up);
    }
}
