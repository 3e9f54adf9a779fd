//! The manager's embedded store: one redb file holding the catalogue as a
//! single JSON document, replaced transactionally on every change (redb
//! commits are durable and atomic, so a crash leaves the old or the new
//! catalogue, never a mix). The catalogue is small (nodes, disks, volumes,
//! placement groups); the data never passes through the manager.

use redb::{Database, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use tessera_wire::iscsi::{ChapSecrets, VolumeAccess};
use tessera_wire::map::{
    CHUNK_SIZE_DEFAULT_BYTES, CopyState, FailureDomain, PoolEntry, VolumeEntry,
};

const TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("catalog");
const KEY: &str = "catalog";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: u32,
    pub uuid: String,
    pub addr: String,
    pub metrics_addr: Option<String>,
    pub pid: u32,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub rack: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub id: u32,
    pub node_id: u32,
    pub uuid: String,
    pub path: String,
    pub capacity_bytes: u64,
    /// Bumped each time the disk's daemon registers as a new process.
    #[serde(default)]
    pub incarnation: u64,
    /// Taken out of placement after staying down past `--down-out-after`
    /// (its groups were re-placed); cleared when it is heard from again,
    /// which makes it eligible for new placements, not for the groups it
    /// lost.
    #[serde(default)]
    pub out: bool,
}

/// Everything the manager must not lose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub cluster_id: String,
    pub epoch: u64,
    pub pg_count: u32,
    pub pgs: Vec<Vec<u32>>,
    pub nodes: Vec<Node>,
    pub disks: Vec<Disk>,
    pub volumes: Vec<VolumeEntry>,
    pub next_node_id: u32,
    pub next_disk_id: u32,
    pub next_volume_id: u64,
    /// Pools; their placement-group ranges tile `0..pg_count`.
    #[serde(default)]
    pub pools: Vec<PoolEntry>,
    /// Copy state of every acting-set member (parallel to `pgs`).
    #[serde(default)]
    pub pg_states: Vec<Vec<CopyState>>,
    /// iSCSI ACLs and CHAP credentials by volume id (absent: open, no
    /// CHAP); see `crate::iscsi`. Never part of the cluster map.
    #[serde(default)]
    pub iscsi_access: BTreeMap<u64, VolumeAccess>,
    /// Persistent-reservation state by volume id, as gateways stored it
    /// (opaque here).
    #[serde(default)]
    pub iscsi_reservations: BTreeMap<u64, serde_json::Value>,
    /// Version of each volume's reservation state (absent: 0).
    #[serde(default)]
    pub iscsi_reservation_versions: BTreeMap<u64, u64>,
    /// CHAP required of iSCSI discovery sessions (none: discovery is open).
    #[serde(default)]
    pub iscsi_discovery_chap: Option<ChapSecrets>,
    /// Operator switches that suspend automatic data movement (`tessera
    /// cluster set`), kept across manager restarts like the rest.
    #[serde(default)]
    pub flags: BTreeSet<ClusterFlag>,
}

/// An operator switch, as Ceph's `noout` / `norebalance`: set before
/// planned maintenance so the manager does not start moving data that will
/// be back in place shortly, unset afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterFlag {
    /// A disk down past `--down-out-after` stays in: its groups stay
    /// degraded (writes go on with the other copies, which recover it by
    /// delta when it returns) instead of being re-placed and rebuilt
    /// elsewhere in full.
    Noout,
    /// No group is moved because placement now prefers other disks (new or
    /// re-weighted disks): groups short of copies after a disk went out are
    /// still topped up, since that restores redundancy.
    Norebalance,
    /// Storage daemons start no delta-recovery push (copies back from an
    /// absence or a restart stay outdated; they still get every new write).
    Norecover,
    /// Storage daemons start no backfill push (new copies of re-placed or
    /// rebalanced groups wait): a rebuild paused, e.g. during peak hours.
    Nobackfill,
}

impl ClusterFlag {
    pub const ALL: [ClusterFlag; 4] = [
        ClusterFlag::Noout,
        ClusterFlag::Norebalance,
        ClusterFlag::Norecover,
        ClusterFlag::Nobackfill,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ClusterFlag::Noout => "noout",
            ClusterFlag::Norebalance => "norebalance",
            ClusterFlag::Norecover => "norecover",
            ClusterFlag::Nobackfill => "nobackfill",
        }
    }

    /// Parse a flag name as the API and CLI spell it.
    pub fn parse(name: &str) -> Option<ClusterFlag> {
        ClusterFlag::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// The id and name of the pool every cluster starts with.
pub const DEFAULT_POOL_ID: u32 = 1;
pub const DEFAULT_POOL: &str = "default";

/// `min_replicas` when none is given: a majority of the copies.
pub fn default_min_replicas(replicas: u32) -> u32 {
    replicas - replicas / 2
}

impl Catalog {
    /// A new cluster whose default pool keeps one copy.
    pub fn new(pg_count: u32) -> Catalog {
        Catalog::with_default_pool(pg_count, 1, 1, FailureDomain::Host)
    }

    /// A new cluster with its default pool.
    pub fn with_default_pool(
        pg_count: u32,
        replicas: u32,
        min_replicas: u32,
        failure_domain: FailureDomain,
    ) -> Catalog {
        assert!(pg_count > 0);
        assert!(min_replicas >= 1 && min_replicas <= replicas);
        let mut c = Catalog::legacy(pg_count);
        c.pools.push(PoolEntry {
            id: DEFAULT_POOL_ID,
            name: DEFAULT_POOL.into(),
            replicas,
            min_replicas,
            failure_domain,
            chunk_size_bytes: CHUNK_SIZE_DEFAULT_BYTES,
            pg_base: 0,
            pg_count,
        });
        c
    }

    /// Bring a catalogue written before pools existed up to date: its
    /// placement groups become the single-copy default pool. Returns whether
    /// anything changed.
    pub fn migrate(&mut self) -> bool {
        let mut changed = false;
        if self.pools.is_empty() {
            self.pools.push(PoolEntry {
                id: DEFAULT_POOL_ID,
                name: DEFAULT_POOL.into(),
                replicas: 1,
                min_replicas: 1,
                failure_domain: FailureDomain::Host,
                chunk_size_bytes: CHUNK_SIZE_DEFAULT_BYTES,
                pg_base: 0,
                pg_count: self.pg_count,
            });
            changed = true;
        }
        for v in &mut self.volumes {
            if v.pool_id == 0 {
                v.pool_id = DEFAULT_POOL_ID;
                changed = true;
            }
        }
        // Copy states arrived with replication: every placed copy of an
        // older catalogue is as good as the single copy it was.
        let shaped = self.pg_states.len() == self.pgs.len()
            && self
                .pg_states
                .iter()
                .zip(&self.pgs)
                .all(|(s, m)| s.len() == m.len());
        if !shaped {
            self.pg_states = self
                .pgs
                .iter()
                .map(|m| vec![CopyState::UpToDate; m.len()])
                .collect();
            changed = true;
        }
        changed
    }

    fn legacy(pg_count: u32) -> Catalog {
        Catalog {
            cluster_id: uuid::Uuid::new_v4().to_string(),
            epoch: 1,
            pg_count,
            pgs: vec![Vec::new(); pg_count as usize],
            nodes: Vec::new(),
            disks: Vec::new(),
            volumes: Vec::new(),
            next_node_id: 1,
            next_disk_id: 1,
            next_volume_id: 1,
            pools: Vec::new(),
            pg_states: vec![Vec::new(); pg_count as usize],
            iscsi_access: BTreeMap::new(),
            iscsi_reservations: BTreeMap::new(),
            iscsi_reservation_versions: BTreeMap::new(),
            iscsi_discovery_chap: None,
            flags: BTreeSet::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("catalogue store: {0}")]
    Db(String),
    #[error("catalogue is corrupt: {0}")]
    Corrupt(String),
}

fn db<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

pub struct Store {
    db: Database,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Ok(Store {
            db: Database::create(path).map_err(db)?,
        })
    }

    pub fn load(&self) -> Result<Option<Catalog>, StoreError> {
        let tx = self.db.begin_read().map_err(db)?;
        let table = match tx.open_table(TABLE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(db(e)),
        };
        let Some(v) = table.get(KEY).map_err(db)? else {
            return Ok(None);
        };
        let c: Catalog =
            serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(Some(c))
    }

    pub fn save(&self, c: &Catalog) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(c).expect("catalog serialises");
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut t = tx.open_table(TABLE).map_err(db)?;
            t.insert(KEY, bytes.as_slice()).map_err(db)?;
        }
        tx.commit().map_err(db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves the catalogue survives closing and reopening the store.
    #[test]
    fn roundtrip() {
        let dir = std::env::temp_dir().join(format!("tessera-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("catalog.redb");
        let _ = std::fs::remove_file(&path);
        let mut c = Catalog::new(8);
        c.volumes.push(VolumeEntry {
            id: 1,
            name: "v".into(),
            size_bytes: 1 << 30,
            chunk_size_bytes: 4 << 20,
            block_size: 512,
            pool_id: 1,
        });
        {
            let s = Store::open(&path).unwrap();
            assert_eq!(s.load().unwrap(), None);
            s.save(&c).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.load().unwrap(), Some(c));
        std::fs::remove_dir_all(dir).ok();
    }
}
