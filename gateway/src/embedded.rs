//! The gateway embedded in a storage daemon (`tessera-storage
//! --nbd-listen`): NBD served by the storage daemon's own event loop, with
//! requests for the daemon's own disks passed through an in-memory stream
//! instead of a loopback TCP connection.
//!
//! Why: with the gateway in its own process every request crosses two TCP
//! connections and wakes two processes (client → gateway → storage daemon
//! and back). On the 2-CPU machines this is measured on, a loopback TCP
//! round trip costs about 45 µs and 23 µs of CPU (docs/nbd.md,
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
use crate::map::MapHandle;
use crate::metrics::Metrics;
use crate::routing::{IO_TIMEOUT_MS_DEFAULT, MapCatalog, Router};
use crate::server;
use std::sync::Arc;
use std::time::Duration;
use tessera_wire::map::ClusterMap;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Serve NBD on `listener` until `shutdown` turns true. `local` is the
/// storage daemon's advertised address and how to open an in-memory
/// connection to it; `initial` is the map the daemon started with (the
/// gateway follows the manager from there on its own thread).
pub async fn serve_nbd(
    listener: TcpListener,
    manager: String,
    initial: ClusterMap,
    local: (String, LocalConnect),
    shutdown: watch::Receiver<bool>,
) {
    let metrics = Metrics::new();
    let cluster_id = initial.cluster_id.clone();
    let router = Arc::new(Router {
        maps: MapHandle::follow(manager, initial),
        pool: Pool::with_local(cluster_id, local.0, local.1),
        io_timeout: Duration::from_millis(IO_TIMEOUT_MS_DEFAULT),
        metrics: Arc::clone(&metrics),
    });
    let catalog = Arc::new(MapCatalog { router });
    server::serve(
        listener,
        catalog,
        metrics,
        server::Config::default(),
        shutdown,
    )
    .await;
}
