//! Follows the cluster manager's map: fetch `GET {manager}/v1/map` at start
//! (retrying until a deadline), then long-poll `GET /v1/map?after=EPOCH` on
//! a background thread (ureq is blocking): the manager holds the request
//! until it commits a newer epoch (or `LONG_POLL_WAIT_MS` passes), so a new
//! map reaches the gateway as soon as it exists, not at the next poll.
//! Each newer map is published through a `tokio::sync::watch` channel.
//! Epochs only grow: an older or equal epoch is never published. Callers
//! that learn the map is stale (StaleEpoch, WrongDisk from a storage
//! daemon) may ask for a refresh; it matters only after a failed fetch
//! (the next attempt starts at once), since a held long poll already
//! answers the moment a newer map is committed.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TryRecvError};
use std::time::{Duration, Instant};
use tessera_wire::map::ClusterMap;
use thiserror::Error;
use tokio::sync::watch;

/// How long the manager may hold one long poll before answering with an
/// unchanged map.
pub const LONG_POLL_WAIT_MS: u64 = 10_000;
/// One HTTP fetch of the map may take at most this long (beyond the long
/// poll's hold time).
pub const FETCH_TIMEOUT_MS: u64 = 2000;
/// Pause between failed fetches (manager down or restarting), cut short by
/// a refresh request.
const RETRY_MS: u64 = 200;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MapError {
    #[error("fetching the map from {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("the manager served an invalid map: {0}")]
    Invalid(String),
}

fn map_url(manager: &str) -> String {
    format!("{}/v1/map", manager.trim_end_matches('/'))
}

/// Fetch and validate the map once.
pub fn fetch(manager: &str) -> Result<ClusterMap, MapError> {
    get(map_url(manager), Duration::from_millis(FETCH_TIMEOUT_MS))
}

/// Long poll: the first map with an epoch above `epoch`, or the current one
/// once the manager has held the request for `wait`.
pub fn fetch_after(manager: &str, epoch: u64, wait: Duration) -> Result<ClusterMap, MapError> {
    let url = format!(
        "{}?after={epoch}&wait_ms={}",
        map_url(manager),
        wait.as_millis()
    );
    get(url, wait + Duration::from_millis(FETCH_TIMEOUT_MS))
}

fn get(url: String, timeout: Duration) -> Result<ClusterMap, MapError> {
    let agent = ureq::AgentBuilder::new().timeout(timeout).build();
    let map: ClusterMap = agent
        .get(&url)
        .call()
        .map_err(|e| MapError::Fetch {
            url: url.clone(),
            reason: e.to_string(),
        })?
        .into_json()
        .map_err(|e| MapError::Fetch {
            url: url.clone(),
            reason: e.to_string(),
        })?;
    map.validate().map_err(MapError::Invalid)?;
    Ok(map)
}

/// Fetch the map, retrying until `deadline` passes; returns the last error.
pub fn fetch_until(manager: &str, deadline: Instant) -> Result<ClusterMap, MapError> {
    loop {
        match fetch(manager) {
            Ok(m) => return Ok(m),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "map not available yet");
                std::thread::sleep(Duration::from_millis(RETRY_MS));
            }
        }
    }
}

/// A cheap, cloneable view of the newest map.
#[derive(Clone)]
pub struct MapHandle {
    rx: watch::Receiver<Arc<ClusterMap>>,
    refresh: Option<SyncSender<()>>,
}

impl MapHandle {
    /// Follow `manager`, starting from `initial`.
    pub fn follow(manager: String, initial: ClusterMap) -> MapHandle {
        let (tx, rx) = watch::channel(Arc::new(initial));
        // One pending refresh request is enough: it fetches the newest map.
        let (refresh_tx, refresh_rx) = mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("map-follower".into())
            .spawn(move || {
                let mut failed = false;
                loop {
                    if failed {
                        match refresh_rx.recv_timeout(Duration::from_millis(RETRY_MS)) {
                            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                            Err(RecvTimeoutError::Disconnected) => return,
                        }
                    }
                    // A long poll answers every refresh asked so far.
                    loop {
                        match refresh_rx.try_recv() {
                            Ok(()) => {}
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Disconnected) => return,
                        }
                    }
                    if tx.is_closed() {
                        return;
                    }
                    let epoch = tx.borrow().epoch;
                    let wait = Duration::from_millis(LONG_POLL_WAIT_MS);
                    match fetch_after(&manager, epoch, wait) {
                        Ok(m) => {
                            failed = false;
                            publish(&tx, m);
                        }
                        Err(e) => {
                            failed = true;
                            tracing::warn!(error = %e, "map refresh failed");
                        }
                    }
                }
            })
            .expect("spawning the map follower thread");
        MapHandle {
            rx,
            refresh: Some(refresh_tx),
        }
    }

    /// A handle over a map that changes only through the returned sender
    /// (tests, tools).
    pub fn fixed(map: ClusterMap) -> (MapHandle, watch::Sender<Arc<ClusterMap>>) {
        let (tx, rx) = watch::channel(Arc::new(map));
        (MapHandle { rx, refresh: None }, tx)
    }

    pub fn current(&self) -> Arc<ClusterMap> {
        Arc::clone(&self.rx.borrow())
    }

    /// Ask the follower to fetch now rather than at the next poll.
    pub fn request_refresh(&self) {
        if let Some(r) = &self.refresh {
            let _ = r.try_send(());
        }
    }

    /// Wait until a map newer than `epoch` is published or `timeout` passes.
    pub async fn wait_newer(&self, epoch: u64, timeout: Duration) -> bool {
        let mut rx = self.rx.clone();
        tokio::time::timeout(timeout, rx.wait_for(|m| m.epoch > epoch))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Publish `m` if it is newer than the current map. Returns whether it was.
pub fn publish(tx: &watch::Sender<Arc<ClusterMap>>, m: ClusterMap) -> bool {
    tx.send_if_modified(|cur| {
        if m.epoch > cur.epoch {
            tracing::info!(epoch = m.epoch, "new cluster map");
            *cur = Arc::new(m);
            true
        } else {
            false
        }
    })
}

/// An empty map at `epoch` (tests).
#[cfg(test)]
pub(crate) fn empty_map(epoch: u64) -> ClusterMap {
    ClusterMap {
        epoch,
        cluster_id: "c".into(),
        pg_count: 0,
        nodes: vec![],
        disks: vec![],
        pgs: vec![],
        volumes: vec![],
        next_volume_id: 1,
        pools: vec![],
        pg_states: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(epoch: u64) -> ClusterMap {
        empty_map(epoch)
    }

    // Proves epochs only grow: older and equal maps are not published.
    #[test]
    fn epochs_only_grow() {
        let (h, tx) = MapHandle::fixed(map(5));
        assert!(!publish(&tx, map(4)));
        assert!(!publish(&tx, map(5)));
        assert_eq!(h.current().epoch, 5);
        assert!(publish(&tx, map(6)));
        assert_eq!(h.current().epoch, 6);
    }

    // Proves an unreachable manager is reported with its URL once the
    // deadline passes.
    #[test]
    fn fetch_until_reports_unreachable() {
        let e = fetch_until("http://127.0.0.1:1", Instant::now()).unwrap_err();
        assert!(matches!(e, MapError::Fetch { ref url, .. } if url == "http://127.0.0.1:1/v1/map"));
    }
}
