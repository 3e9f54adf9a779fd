//! The volume catalogue and the published cluster map, as pure functions
//! of the catalogue: volume rules (names, sizes, block sizes, grow-only
//! resize, ids never reused), building the [`ClusterMap`] the daemons
//! follow, and the per-volume view ([`VolumeInfo`]) the API shows.
//!
//! Placement groups are filled here when a volume is created and some group
//! is still empty (see [`crate::placement`]); they never move afterwards.
//! Nothing here persists or bumps the epoch: the daemon does both after any
//! change these functions report.

use crate::placement::{self, Candidate};
use crate::store::Catalog;
use std::collections::BTreeMap;
use tessera_wire::api::{
    CreateVolumeRequest, DiskShare, HeartbeatRequest, ResizeVolumeRequest, VolumeInfo,
};
use tessera_wire::map::{
    CHUNK_SIZE_DEFAULT_BYTES, ClusterMap, DiskEntry, NodeEntry, VolumeEntry, pg_of,
};

/// Longest volume name.
pub const VOLUME_NAME_MAX: usize = 64;
/// Default logical block size of a new volume.
pub const BLOCK_SIZE_DEFAULT: u32 = 512;
/// Copies of each placement group. One until replication exists.
pub const REPLICAS: usize = 1;
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
}

impl Error {
    /// The HTTP status the API answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            Error::BadName(_)
            | Error::BadBlockSize(_)
            | Error::BadSize(_)
            | Error::TooLarge
            | Error::Shrink { .. } => 400,
            Error::NotFound(_) => 404,
            Error::Exists(_) => 409,
            Error::NoDisk => 503,
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

/// Create a volume, assigning any empty placement group to the disks in
/// `up_disks`. Returns the new volume's id.
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
    if up_disks.is_empty() && c.pgs.iter().any(Vec::is_empty) {
        return Err(Error::NoDisk);
    }
    placement::assign(&mut c.pgs, up_disks, REPLICAS);
    let id = c.next_volume_id;
    c.next_volume_id = id.checked_add(1).expect("volume ids exhausted");
    c.volumes.push(VolumeEntry {
        id,
        name: req.name.clone(),
        size_bytes: req.size_bytes,
        chunk_size_bytes: CHUNK_SIZE_DEFAULT_BYTES,
        block_size,
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
            })
            .collect(),
        pgs: c.pgs.clone(),
        volumes: c.volumes.clone(),
        next_volume_id: c.next_volume_id,
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
        per_pg
            .entry(pg_of(v.id, chunk, map.pg_count))
            .or_insert((chunk, 0))
            .1 += 1;
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
    }
}

/// Disks eligible for new placement groups: those whose node is up.
pub fn up_disks(c: &Catalog, up: impl Fn(u32) -> bool) -> Vec<Candidate> {
    c.disks
        .iter()
        .filter(|d| up(d.node_id))
        .map(|d| Candidate {
            disk_id: d.id,
            node_id: d.node_id,
            capacity_bytes: d.capacity_bytes,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
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
