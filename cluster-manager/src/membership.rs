//! Membership: storage daemons joining the catalogue. A pure function of
//! (catalogue, registration): the same node uuid always maps to the same
//! node id and the same disk uuid to the same disk id, forever; a known
//! node re-registering only updates its address, pid and disk facts.
//!
//! Liveness is not decided here (see [`crate::health`]), and nothing is
//! persisted here (the daemon commits the catalogue after a change).

use crate::store::{Catalog, Disk, Node};
use tessera_wire::api::{DiskAssignment, RegisterRequest};

/// Longest node uuid, address or disk path accepted.
pub const FIELD_MAX: usize = 256;
/// Most disks one node may register.
pub const NODE_DISKS_MAX: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("node_uuid, addr and at least one disk are required")]
    Missing,
    #[error("{0} is longer than {FIELD_MAX} bytes")]
    TooLong(&'static str),
    #[error("a node may register at most {NODE_DISKS_MAX} disks")]
    TooManyDisks,
    #[error("disk {0:?} is listed twice")]
    DuplicateDisk(String),
}

/// What registration decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub node_id: u32,
    pub disks: Vec<DiskAssignment>,
    /// Whether the catalogue (and so the published map) changed.
    pub changed: bool,
}

/// Add or update a node and its disks in `c`.
pub fn register(c: &mut Catalog, req: &RegisterRequest) -> Result<Registered, Error> {
    if req.node_uuid.is_empty() || req.addr.is_empty() || req.disks.is_empty() {
        return Err(Error::Missing);
    }
    if req.node_uuid.len() > FIELD_MAX {
        return Err(Error::TooLong("node_uuid"));
    }
    if req.addr.len() > FIELD_MAX {
        return Err(Error::TooLong("addr"));
    }
    if req.host.len() > FIELD_MAX || req.zone.len() > FIELD_MAX || req.rack.len() > FIELD_MAX {
        return Err(Error::TooLong("zone, rack or host"));
    }
    if req.disks.len() > NODE_DISKS_MAX {
        return Err(Error::TooManyDisks);
    }
    for (i, d) in req.disks.iter().enumerate() {
        if d.uuid.is_empty() {
            return Err(Error::Missing);
        }
        if d.uuid.len() > FIELD_MAX || d.path.len() > FIELD_MAX {
            return Err(Error::TooLong("disk uuid or path"));
        }
        if req.disks[..i].iter().any(|e| e.uuid == d.uuid) {
            return Err(Error::DuplicateDisk(d.uuid.clone()));
        }
    }
    let before = (c.nodes.clone(), c.disks.clone());
    let node_id = match c.nodes.iter_mut().find(|n| n.uuid == req.node_uuid) {
        Some(n) => {
            n.addr = req.addr.clone();
            n.metrics_addr = req.metrics_addr.clone();
            n.pid = req.pid;
            n.host = req.host.clone();
            n.zone = req.zone.clone();
            n.rack = req.rack.clone();
            n.id
        }
        None => {
            let id = c.next_node_id;
            c.next_node_id = id.checked_add(1).expect("node ids exhausted");
            c.nodes.push(Node {
                id,
                uuid: req.node_uuid.clone(),
                addr: req.addr.clone(),
                metrics_addr: req.metrics_addr.clone(),
                pid: req.pid,
                host: req.host.clone(),
                zone: req.zone.clone(),
                rack: req.rack.clone(),
            });
            id
        }
    };
    let mut disks = Vec::with_capacity(req.disks.len());
    for d in &req.disks {
        // A disk moved to another node keeps its id: its data moved with it.
        let id = match c.disks.iter_mut().find(|x| x.uuid == d.uuid) {
            Some(x) => {
                x.node_id = node_id;
                x.path = d.path.clone();
                x.capacity_bytes = d.capacity_bytes;
                x.id
            }
            None => {
                let id = c.next_disk_id;
                c.next_disk_id = id.checked_add(1).expect("disk ids exhausted");
                c.disks.push(Disk {
                    id,
                    node_id,
                    uuid: d.uuid.clone(),
                    path: d.path.clone(),
                    capacity_bytes: d.capacity_bytes,
                    incarnation: 0,
                    out: false,
                });
                id
            }
        };
        disks.push(DiskAssignment {
            uuid: d.uuid.clone(),
            disk_id: id,
        });
    }
    let changed = before != (c.nodes.clone(), c.disks.clone());
    Ok(Registered {
        node_id,
        disks,
        changed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_wire::api::DiskRegistration;

    fn req(node: &str, addr: &str, disks: &[&str]) -> RegisterRequest {
        RegisterRequest {
            node_uuid: node.into(),
            addr: addr.into(),
            metrics_addr: None,
            pid: 7,
            host: String::new(),
            zone: String::new(),
            rack: String::new(),
            disks: disks
                .iter()
                .map(|u| DiskRegistration {
                    uuid: u.to_string(),
                    path: format!("/dev/{u}"),
                    capacity_bytes: 1 << 30,
                })
                .collect(),
        }
    }

    // Proves ids start at 1, are stable per uuid, and that only real
    // changes are reported as changes.
    #[test]
    fn stable_ids() {
        let mut c = Catalog::new(4);
        let a = register(&mut c, &req("n1", "h:1", &["d1", "d2"])).unwrap();
        assert_eq!(a.node_id, 1);
        assert_eq!(
            a.disks.iter().map(|d| d.disk_id).collect::<Vec<_>>(),
            [1, 2]
        );
        assert!(a.changed);
        let b = register(&mut c, &req("n2", "h:2", &["d3"])).unwrap();
        assert_eq!((b.node_id, b.disks[0].disk_id), (2, 3));
        let again = register(&mut c, &req("n1", "h:1", &["d2", "d1"])).unwrap();
        assert_eq!(again.node_id, 1);
        assert_eq!(again.disks[0].disk_id, 2);
        assert!(!again.changed);
        let moved = register(&mut c, &req("n1", "h:9", &["d1"])).unwrap();
        assert!(moved.changed);
        assert_eq!(c.nodes[0].addr, "h:9");
        assert_eq!(c.disks.len(), 3);
    }

    // Proves each rejection branch.
    #[test]
    fn rejects_bad_registrations() {
        let mut c = Catalog::new(4);
        assert_eq!(register(&mut c, &req("", "a", &["d"])), Err(Error::Missing));
        assert_eq!(register(&mut c, &req("n", "", &["d"])), Err(Error::Missing));
        assert_eq!(register(&mut c, &req("n", "a", &[])), Err(Error::Missing));
        assert_eq!(register(&mut c, &req("n", "a", &[""])), Err(Error::Missing));
        let long = "x".repeat(FIELD_MAX + 1);
        assert!(matches!(
            register(&mut c, &req(&long, "a", &["d"])),
            Err(Error::TooLong(_))
        ));
        assert!(matches!(
            register(&mut c, &req("n", "a", &["d", "d"])),
            Err(Error::DuplicateDisk(_))
        ));
        assert!(c.nodes.is_empty() && c.disks.is_empty());
    }
}
