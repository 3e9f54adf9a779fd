//! The manager's embedded store: one redb file holding the catalogue as a
//! single JSON document, replaced transactionally on every change (redb
//! commits are durable and atomic, so a crash leaves the old or the new
//! catalogue, never a mix). The catalogue is small (nodes, disks, volumes,
//! placement groups); the data never passes through the manager.

use redb::{Database, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tessera_wire::map::VolumeEntry;

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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub id: u32,
    pub node_id: u32,
    pub uuid: String,
    pub path: String,
    pub capacity_bytes: u64,
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
}

impl Catalog {
    pub fn new(pg_count: u32) -> Catalog {
        assert!(pg_count > 0);
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
