//! The gateway embedded in a storage daemon (`tessera-storage
//! --nbd-listen`, `--iscsi-listen`): NBD and iSCSI served by the storage daemon's own event loop, with
//! requests for the daemon's own disks passed through an in-memory stream
//! instead of a loopback TCP connection.
//!
//! Why: with the gateway in its own process every request crosses two TCP
//! connections and wakes two processes (client → gateway → storage daemon
//! and back). On the 2-CPU machines this is measured on, a loopback TCP
//! round trip costs about 26 µs and 27 µs of CPU (docs/nbd.md,
//! "Where the time goes"), as much as the disk itself at queue depth 1.
//! Embedded, a request for a local chunk costs one TCP hop (the client's)
//! and runs on one thread from NBD parsing to io_uring and back. Chunks on
//! other daemons still go over TCP, through the same router, so the
//! embedded gateway serves every volume of the cluster.
//!
//! The internal protocol is unchanged on the in-memory stream (same
//! headers, CRCs and validation on both ends): the storage daemon cannot
//! tell it from a remote gateway, and nothing trusts it more.

use crate::client::{LocalConnect, Pool};
use crate::iscsi::access::ManagerAccess;
use crate::iscsi::target::{self, Target};
use crate::map::MapHandle;
use crate::metrics::Metrics;
use crate::routing::{IO_TIMEOUT_MS_DEFAULT, MapCatalog, Router};
use crate::server;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_wire::map::ClusterMap;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What the embedded gateway serves: NBD and/or iSCSI listeners, bound by
/// the daemon before it announces readiness.
pub struct Listeners {
    pub nbd: Option<TcpListener>,
    pub iscsi: Vec<TcpListener>,
}

/// The embedded gateway, ready to serve.
pub struct Embedded {
    catalog: Arc<MapCatalog>,
    metrics: Arc<Metrics>,
    iscsi: Arc<Target>,
    access: Arc<ManagerAccess>,
}

impl Embedded {
    /// Set up routing (following the manager's map on its own thread from
    /// `initial`) and, when `secret` is given, iSCSI access control read
    /// from the manager (blocking until the first snapshot or `deadline`;
    /// call it outside the runtime). `local` is the daemon's advertised
    /// address and how to open an in-memory connection to it.
    pub fn new(
        manager: String,
        initial: ClusterMap,
        local: (String, LocalConnect),
        secret: Option<String>,
        deadline: Instant,
    ) -> Result<Embedded, String> {
        let metrics = Metrics::new();
        let cluster_id = initial.cluster_id.clone();
        let router = Arc::new(Router {
            maps: MapHandle::follow(manager.clone(), initial),
            pool: Pool::with_local(cluster_id, local.0, local.1),
            io_timeout: Duration::from_millis(IO_TIMEOUT_MS_DEFAULT),
            metrics: Arc::clone(&metrics),
        });
        let maps = router.maps.clone();
        let catalog = Arc::new(MapCatalog { router });
        let access = match secret {
            Some(secret) => ManagerAccess::follow(manager, secret, maps, deadline)?,
            None => ManagerAccess::closed(maps),
        };
        let iscsi = Target::with_persist(
            catalog.clone(),
            access.clone(),
            Some(access.clone()),
            target::Config::default(),
        );
        Ok(Embedded {
            catalog,
            metrics,
            iscsi,
            access,
        })
    }

    /// What to tell the manager when the daemon stops, once no command is
    /// left to run (`ManagerAccess::leave`).
    pub fn access(&self) -> Arc<ManagerAccess> {
        Arc::clone(&self.access)
    }

    /// Serve until `shutdown` turns true.
    pub async fn serve(self, listeners: Listeners, shutdown: watch::Receiver<bool>) {
        for l in listeners.iscsi {
            if let Ok(a) = l.local_addr() {
                self.iscsi.portals.lock().expect("not poisoned").push(a);
            }
            tokio::spawn(target::serve(l, Arc::clone(&self.iscsi), shutdown.clone()));
        }
        if let Some(l) = listeners.nbd {
            server::serve(
                l,
                self.catalog,
                self.metrics,
                server::Config::default(),
                shutdown,
            )
            .await;
        }
    }
}

/// The addresses of bound listeners, comma-separated ("none" if empty).
pub fn addresses(ls: &[&TcpListener]) -> String {
    let v: Vec<String> = ls
        .iter()
        .filter_map(|l| l.local_addr().ok().map(|a: SocketAddr| a.to_string()))
        .collect();
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(",")
    }
}
