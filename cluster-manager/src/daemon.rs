//! The manager daemon's state: the catalogue under one mutex, persisted
//! before any change is answered or published, and the in-memory liveness
//! of every node. Each operation applies a pure policy ([`membership`],
//! [`health`], [`map`], [`placement`]) and, when it reports a change, bumps
//! the epoch and commits the catalogue in one redb transaction.
//!
//! Liveness (heartbeat times and usage) is memory only: after a restart
//! every known node counts as up until a grace period passes without a
//! heartbeat.
//!
//! [`placement`]: crate::placement

use crate::health::{self, Live};
use crate::map;
use crate::membership;
use crate::store::{Catalog, ClusterFlag, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tessera_wire::api::*;
use tessera_wire::map::ClusterMap;

/// How often the health thread applies the health policy: a node is
/// declared down at most this long after its grace ran out.
pub const HEALTH_INTERVAL: Duration = Duration::from_millis(50);

/// A catalogue commit slower than this is logged (it delays every map).
const SLOW_COMMIT: Duration = Duration::from_millis(50);

/// The daemon's configuration, validated by clap and logged at start.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Used only when the cluster is created; the catalogue's wins after.
    pub pg_count: u32,
    pub heartbeat_grace: Duration,
    /// A disk down longer than this is taken out and its placement groups
    /// are re-placed and backfilled elsewhere.
    pub down_out_after: Duration,
    /// Disks are taken out only while at least this fraction of all disks
    /// stays in (`health::may_take_out`).
    pub min_in_ratio: f64,
    /// The default pool's policy; used only when the cluster is created.
    pub replicas: u32,
    pub min_replicas: u32,
    pub failure_domain: tessera_wire::map::FailureDomain,
}

/// Exit codes of `tessera-manager`, relied on by the systemd units
/// (`RestartPreventExitStatus=2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// Clean stop on SIGTERM/SIGINT.
    Ok = 0,
    /// Bad flags (clap exits with 2 too): restarting cannot help.
    Config = 2,
    /// The environment refused: data directory, store, or listen address.
    Environment = 3,
}

/// A fatal start-up error: one line for stderr and the exit code.
#[derive(Debug)]
pub struct Fatal {
    pub code: ExitCode,
    pub message: String,
}

/// An operation's failure as the API answers it: status and one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl From<map::Error> for ApiError {
    fn from(e: map::Error) -> ApiError {
        ApiError::new(e.http_status(), e.to_string())
    }
}

impl From<membership::Error> for ApiError {
    fn from(e: membership::Error) -> ApiError {
        ApiError::new(400, e.to_string())
    }
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub cluster_id: String,
    pub epoch: u64,
    pub nodes_up: u32,
    pub nodes_down: u32,
    pub disks: u32,
    pub volumes: u32,
    pub pgs_total: u32,
    pub pgs_assigned: u32,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    /// Storage daemons up / down (same as nodes_up / nodes_down).
    #[serde(default)]
    pub daemons_up: u32,
    #[serde(default)]
    pub daemons_down: u32,
    /// Placed groups whose every copy is up and up to date.
    #[serde(default)]
    pub pgs_clean: u32,
    /// Placed groups with a copy down, outdated or missing.
    #[serde(default)]
    pub pgs_degraded: u32,
    /// Degraded groups with an outdated copy that is up (being recovered).
    #[serde(default)]
    pub pgs_recovering: u32,
    /// The newest scrub request (`POST /v1/scrub`; 0: none since the
    /// manager started).
    #[serde(default)]
    pub scrub_generation: u64,
    /// Up storage daemons that have completed it on every group they led.
    #[serde(default)]
    pub scrub_daemons_done: u32,
    /// Groups being scrubbed now.
    #[serde(default)]
    pub pgs_scrubbing: u32,
    /// Summed over the up daemons' reports (counted since each started):
    /// group scrubs completed, regions compared, copies of regions found
    /// bad or different, copies repaired (scrub and read repair), repairs
    /// without a good copy.
    #[serde(default)]
    pub scrubs: u64,
    #[serde(default)]
    pub scrub_regions: u64,
    #[serde(default)]
    pub scrub_errors: u64,
    #[serde(default)]
    pub repairs: u64,
    #[serde(default)]
    pub unrepairable: u64,
    /// Recovering groups filling a new member (after a disk was taken out).
    #[serde(default)]
    pub pgs_backfilling: u32,
    /// Disks taken out of placement (down past `--down-out-after`).
    #[serde(default)]
    pub disks_out: u32,
    /// Recoveries under way, summed over the primaries' last heartbeats:
    /// bytes pushed so far, bytes known still to push, their ratio in
    /// percent (100 when nothing is under way) and the push rate.
    #[serde(default)]
    pub recovery_done_bytes: u64,
    #[serde(default)]
    pub recovery_remaining_bytes: u64,
    #[serde(default)]
    pub recovery_percent: u32,
    #[serde(default)]
    pub recovery_bytes_per_sec: u64,
    /// Operator switches set (`tessera cluster set`), by name.
    #[serde(default)]
    pub flags: Vec<String>,
    /// Disks down past `--down-out-after` that stay in (`noout` or
    /// `--min-in-ratio`): their groups stay degraded.
    #[serde(default)]
    pub disks_held_in: u32,
}

/// The answer of the flag routes: every switch set, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flags {
    pub flags: Vec<String>,
}

pub struct Manager {
    store: Store,
    inner: Mutex<Inner>,
    /// Notified (with `inner`) at every new epoch: wakes map long-polls.
    epoch_changed: Condvar,
    /// Notified (with `inner`) at every catalogue change and every gateway
    /// poll: wakes access long-polls and fence waits.
    access_changed: Condvar,
    grace: Duration,
    down_out_after: Duration,
    min_in_ratio: f64,
}

/// Maps the manager keeps for daemons that fell behind (`Inner::history`).
pub const MAP_HISTORY: usize = 64;

/// A gateway that has not polled for this long is not waited for by a
/// fence: its lease (`tessera_gateway::iscsi::access::LEASE_MS`, shorter)
/// has run out, so it refuses commands on volumes with reservations.
pub const GATEWAY_LEASE: Duration = Duration::from_millis(6000);
/// Gateways not seen for this long are forgotten.
const GATEWAY_FORGET: Duration = Duration::from_secs(60);

/// When a gateway last polled the access snapshot, and what it held then.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GatewaySeen {
    pub at: Instant,
    pub revision: u64,
}

/// The gateways other than `caller`, within their lease at `now`, that
/// hold a revision older than `revision`.
pub(crate) fn lagging(
    gateways: &BTreeMap<String, GatewaySeen>,
    caller: &str,
    revision: u64,
    now: Instant,
) -> Vec<String> {
    gateways
        .iter()
        .filter(|(g, s)| *g != caller && now - s.at < GATEWAY_LEASE && s.revision < revision)
        .map(|(g, _)| g.clone())
        .collect()
}

struct Inner {
    catalog: Catalog,
    live: BTreeMap<u32, Live>,
    started: Instant,
    /// The last `MAP_HISTORY` maps committed, oldest first, so a storage
    /// daemon that fell behind can process every epoch in turn
    /// (`map_next`). Memory only: after a manager restart a lagging daemon
    /// skips to the current map, as it did before there was a history.
    history: std::collections::VecDeque<ClusterMap>,
    /// The newest scrub request, handed to daemons with heartbeat answers.
    /// Memory only: it starts from the clock (milliseconds since the
    /// epoch) at the first request, so a restarted manager's requests are
    /// still newer than any a daemon has seen.
    scrub_generation: u64,
    /// When rebalancing demoted each group's primary (moved it to the end
    /// of the set). Memory only: a restarted manager waits a grace from its
    /// own start before dropping any demoted primary.
    demoted_at: BTreeMap<u32, Instant>,
    /// Disks down past `--down-out-after` that stay in (`noout`, or
    /// `--min-in-ratio`): said once in the log when a disk starts being
    /// held, not at every health check.
    held_in: BTreeSet<u32>,
    /// The catalogue revision: grows with every change (`commit`,
    /// `update_catalog`).
    revision: u64,
    /// Gateways following the access snapshot, by the id they give.
    gateways: BTreeMap<String, GatewaySeen>,
}

impl Inner {
    fn up(&self, node_id: u32) -> bool {
        self.live.get(&node_id).is_some_and(|l| l.up)
    }

    fn map(&self) -> ClusterMap {
        let mut m = map::build(&self.catalog, |n| self.up(n));
        // Each disk's `up_since` as `commit` published it with this epoch
        // (none before this manager's first commit).
        if let Some(prev) = self.history.back().filter(|p| p.epoch == m.epoch) {
            for d in &mut m.disks {
                d.up_since = prev
                    .disk(d.id)
                    .filter(|b| b.up && d.up)
                    .and_then(|b| b.up_since);
            }
        }
        m
    }

    fn volume_info(&self, map: &ClusterMap, id: u64) -> VolumeInfo {
        let v = map.volume(id).expect("volume exists");
        map::volume_info(map, v, self.live.values().filter_map(|l| l.usage.as_ref()))
    }
}

impl Manager {
    pub fn open(config: &Config) -> Result<Manager, Fatal> {
        let env = |message: String| Fatal {
            code: ExitCode::Environment,
            message,
        };
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| env(format!("cannot create {}: {e}", config.data_dir.display())))?;
        let path = config.data_dir.join("catalog.redb");
        let store_err = |e: StoreError| env(format!("{} ({})", e, path.display()));
        let store = Store::open(&path).map_err(store_err)?;
        // The catalogue holds iSCSI CHAP secrets: owner only.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| env(format!("cannot restrict {}: {e}", path.display())))?;
        }
        let catalog = match store.load().map_err(store_err)? {
            Some(mut c) => {
                if c.migrate() {
                    store.save(&c).map_err(store_err)?;
                    tracing::info!("catalogue migrated: volumes now live in the default pool");
                }
                c
            }
            None => {
                let c = Catalog::with_default_pool(
                    config.pg_count,
                    config.replicas,
                    config.min_replicas,
                    config.failure_domain,
                );
                store.save(&c).map_err(store_err)?;
                tracing::info!(cluster_id = %c.cluster_id, pg_count = c.pg_count, "created cluster");
                c
            }
        };
        let live = catalog
            .nodes
            .iter()
            .map(|n| (n.id, Live::assumed_up()))
            .collect();
        Ok(Manager {
            store,
            epoch_changed: Condvar::new(),
            access_changed: Condvar::new(),
            inner: Mutex::new(Inner {
                catalog,
                live,
                started: Instant::now(),
                history: std::collections::VecDeque::new(),
                demoted_at: BTreeMap::new(),
                held_in: BTreeSet::new(),
                scrub_generation: 0,
                revision: 1,
                gateways: BTreeMap::new(),
            }),
            grace: config.heartbeat_grace,
            down_out_after: config.down_out_after,
            min_in_ratio: config.min_in_ratio,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("manager lock poisoned")
    }

    /// Bump the epoch and persist, with the lock held, before the change is
    /// answered or published. A failed save rolls the in-memory catalogue
    /// back so memory never runs ahead of the disk.
    fn commit(&self, inner: &mut Inner, before: Catalog) -> Result<(), ApiError> {
        inner.catalog.epoch += 1;
        // The map is published only once durable, so the commit (an fsync)
        // is part of every failover's delay: say when it is slow.
        let started = Instant::now();
        let saved = self.store.save(&inner.catalog);
        let took = started.elapsed();
        if took > SLOW_COMMIT {
            tracing::info!(
                epoch = inner.catalog.epoch,
                took_ms = took.as_millis() as u64,
                "slow catalogue commit"
            );
        }
        if let Err(e) = saved {
            inner.catalog = before;
            tracing::error!(error = %e, "cannot persist the catalogue");
            return Err(ApiError::new(500, format!("cannot persist catalogue: {e}")));
        }
        // Each disk's `up_since`, carried from the map published before, so
        // a daemon that skipped maps learns whether it was up in all of
        // them; this manager's first map starts every up disk at its epoch.
        let mut map = map::build(&inner.catalog, |n| inner.up(n));
        map.stamp_up_since(inner.history.back());
        inner.history.push_back(map);
        while inner.history.len() > MAP_HISTORY {
            inner.history.pop_front();
        }
        inner.revision += 1;
        self.epoch_changed.notify_all();
        self.access_changed.notify_all();
        Ok(())
    }

    pub fn map(&self) -> ClusterMap {
        self.lock().map()
    }

    /// The map once its epoch is above `epoch`, or the current one when
    /// `timeout` passes first (the `GET /v1/map?after=` long poll: gateways
    /// and storage daemons learn a new map as soon as it is committed,
    /// not at their next poll).
    /// Like `map_after`, but the map of the epoch right after `epoch` when
    /// the history still holds it, rather than the newest: a storage daemon
    /// that processed every epoch in order knows that no change was
    /// acknowledged without it since it applied one, and can vouch for what
    /// it holds (docs/replication.md, "A restarted last copy takes back").
    pub fn map_next(&self, epoch: u64, timeout: Duration) -> ClusterMap {
        self.wait_map(epoch, timeout, true)
    }

    /// The map once its epoch is above `epoch`, or the current one when
    /// `timeout` passes first (the `GET /v1/map?after=` long poll: gateways
    /// and storage daemons learn a new map as soon as it is committed,
    /// not at their next poll).
    pub fn map_after(&self, epoch: u64, timeout: Duration) -> ClusterMap {
        self.wait_map(epoch, timeout, false)
    }

    fn wait_map(&self, epoch: u64, timeout: Duration, next: bool) -> ClusterMap {
        let inner = self.lock();
        let (inner, _) = self
            .epoch_changed
            .wait_timeout_while(inner, timeout, |i| i.catalog.epoch <= epoch)
            .expect("manager lock poisoned");
        // (`epoch` comes from a client: no overflow on u64::MAX.)
        if next
            && let Some(want) = epoch.checked_add(1)
            && inner.catalog.epoch > want
            && let Some(m) = inner.history.iter().find(|m| m.epoch == want)
        {
            return m.clone();
        }
        inner.map()
    }

    /// Read the catalogue under the lock.
    pub(crate) fn read_catalog<T>(&self, f: impl FnOnce(&Catalog) -> T) -> T {
        f(&self.lock().catalog)
    }

    /// Change the catalogue outside the cluster map (iSCSI access control,
    /// reservation state): `f` returns its answer and whether anything
    /// changed; a change is persisted before the answer, without an epoch
    /// bump, and rolled back if it cannot be.
    pub(crate) fn update_catalog<T>(
        &self,
        f: impl FnOnce(&mut Catalog) -> Result<(T, bool), ApiError>,
    ) -> Result<T, ApiError> {
        let mut inner = self.lock();
        let before = inner.catalog.clone();
        let (out, changed) = match f(&mut inner.catalog) {
            Ok(r) => r,
            Err(e) => {
                inner.catalog = before;
                return Err(e);
            }
        };
        if changed && let Err(e) = self.store.save(&inner.catalog) {
            inner.catalog = before;
            tracing::error!(error = %e, "cannot persist the catalogue");
            return Err(ApiError::new(500, format!("cannot persist catalogue: {e}")));
        }
        if changed {
            inner.revision += 1;
            self.access_changed.notify_all();
        }
        Ok(out)
    }

    /// The catalogue revision (`AccessSnapshot::revision`).
    pub(crate) fn revision(&self) -> u64 {
        self.lock().revision
    }

    /// A gateway's access long poll: note that `gateway` holds `revision`
    /// now, then wait up to `wait` for a newer one; returns the newest.
    pub(crate) fn access_after<T>(
        &self,
        gateway: Option<&str>,
        revision: u64,
        wait: Duration,
        read: impl FnOnce(&Catalog, u64) -> T,
    ) -> T {
        let mut inner = self.lock();
        if let Some(g) = gateway {
            let now = Instant::now();
            inner.gateways.retain(|_, s| now - s.at < GATEWAY_FORGET);
            inner
                .gateways
                .insert(g.to_string(), GatewaySeen { at: now, revision });
            self.access_changed.notify_all();
        }
        let (inner, _) = self
            .access_changed
            .wait_timeout_while(inner, wait, |i| i.revision <= revision)
            .expect("manager lock poisoned");
        read(&inner.catalog, inner.revision)
    }

    /// Stop counting `gateway` in fences (it said it stops).
    pub(crate) fn forget_gateway(&self, gateway: &str) {
        self.lock().gateways.remove(gateway);
        self.access_changed.notify_all();
    }

    /// Wait up to `wait` until every gateway but `caller` that polled
    /// within `GATEWAY_LEASE` holds `revision`; returns the ones that still
    /// do not (empty: fenced).
    pub(crate) fn fenced(&self, caller: &str, revision: u64, wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        let mut inner = self.lock();
        loop {
            let now = Instant::now();
            let behind = lagging(&inner.gateways, caller, revision, now);
            if behind.is_empty() || now >= deadline {
                return behind;
            }
            // Also wake to drop gateways whose lease runs out meanwhile.
            let step = (deadline - now).min(Duration::from_millis(100));
            inner = self
                .access_changed
                .wait_timeout(inner, step)
                .expect("manager lock poisoned")
                .0;
        }
    }

    pub fn flags(&self) -> Flags {
        self.read_catalog(|c| Flags {
            flags: c.flags.iter().map(|f| f.name().to_string()).collect(),
        })
    }

    /// Set (`on`) or unset a switch by name; persisted before the answer.
    /// Not part of the cluster map, so no new epoch: only the manager's
    /// health check reads them, at its next pass.
    pub fn set_flag(&self, name: &str, on: bool) -> Result<Flags, ApiError> {
        let flag = ClusterFlag::parse(name).ok_or_else(|| {
            let known: Vec<&str> = ClusterFlag::ALL.iter().map(|f| f.name()).collect();
            ApiError::new(
                400,
                format!("unknown flag '{name}' (known: {})", known.join(", ")),
            )
        })?;
        let changed = self.update_catalog(|c| {
            let changed = if on {
                c.flags.insert(flag)
            } else {
                c.flags.remove(&flag)
            };
            Ok((changed, changed))
        })?;
        if changed {
            tracing::warn!(
                flag = flag.name(),
                "cluster flag {}",
                if on { "set" } else { "unset" }
            );
        }
        Ok(self.flags())
    }

    pub fn register(&self, req: RegisterRequest) -> Result<RegisterResponse, ApiError> {
        let mut inner = self.lock();
        let before = inner.catalog.clone();
        let r = membership::register(&mut inner.catalog, &req)?;
        // A registration is a new process: whatever it had not made durable
        // is gone, so its copies are outdated until a primary recovers them
        // (the new incarnation tells primaries to start that recovery anew).
        let mut outdated = false;
        for a in &r.disks {
            let c = &mut inner.catalog;
            if let Some(d) = c.disks.iter_mut().find(|d| d.id == a.disk_id) {
                d.incarnation += 1;
                if d.out {
                    // Back, but not in the groups it lost: they were
                    // re-placed. It may receive new copies (as a backfill
                    // member); its old data is garbage.
                    d.out = false;
                    tracing::info!(
                        disk = d.id,
                        "disk taken out earlier is back: in again, holding no group"
                    );
                }
            }
            let pgs = c.pgs.clone();
            outdated |= tessera_wire::map::outdate_disk(&pgs, &mut c.pg_states, a.disk_id);
        }
        let live = inner.live.entry(r.node_id).or_insert_with(Live::assumed_up);
        let was_down = !live.up;
        live.up = true;
        live.last_heartbeat = Some(Instant::now());
        if (r.changed || was_down || outdated || !r.disks.is_empty())
            && let Err(e) = self.commit(&mut inner, before)
        {
            if was_down {
                inner.live.get_mut(&r.node_id).expect("live").up = false;
            }
            return Err(e);
        }
        tracing::info!(node_id = r.node_id, addr = %req.addr, disks = req.disks.len(), "node registered");
        Ok(RegisterResponse {
            node_id: r.node_id,
            cluster_id: inner.catalog.cluster_id.clone(),
            disks: r.disks,
            epoch: inner.catalog.epoch,
        })
    }

    /// A storage daemon saw node `node_id`'s process end
    /// (`FailureReport`). Noted if both nodes are registered and the
    /// reporter is up (a node the manager holds down may be the one cut
    /// off); `check_health` declares the node down once it has also been
    /// silent for `health::FAILURE_REPORT_SILENCE`.
    pub fn report_failure(&self, node_id: u32, report: FailureReport) -> Result<(), ApiError> {
        self.report_failure_at(node_id, report, Instant::now())
    }

    /// `report_failure` at `now` (tests pass their own clock).
    pub fn report_failure_at(
        &self,
        node_id: u32,
        report: FailureReport,
        now: Instant,
    ) -> Result<(), ApiError> {
        let mut inner = self.lock();
        let known = |id: u32| inner.catalog.nodes.iter().any(|n| n.id == id);
        if !known(node_id) || !known(report.reporter_node_id) {
            return Err(ApiError::new(404, "node is not registered"));
        }
        if report.reporter_node_id == node_id {
            return Err(ApiError::new(400, "a node cannot report itself"));
        }
        if !inner
            .live
            .get(&report.reporter_node_id)
            .is_some_and(|l| l.up)
        {
            return Ok(());
        }
        let live = inner.live.entry(node_id).or_insert_with(Live::assumed_up);
        if live.up {
            tracing::info!(
                node_id,
                reporter = report.reporter_node_id,
                "a peer saw the node's process end"
            );
            live.reported_failed = Some(now);
        }
        Ok(())
    }

    pub fn heartbeat(
        &self,
        node_id: u32,
        req: HeartbeatRequest,
    ) -> Result<HeartbeatResponse, ApiError> {
        self.heartbeat_at(node_id, req, Instant::now())
    }

    /// A heartbeat received at `now` (tests pass their own clock).
    pub fn heartbeat_at(
        &self,
        node_id: u32,
        req: HeartbeatRequest,
        now: Instant,
    ) -> Result<HeartbeatResponse, ApiError> {
        let mut inner = self.lock();
        if !inner.catalog.nodes.iter().any(|n| n.id == node_id) {
            return Err(ApiError::new(
                404,
                format!("node {node_id} is not registered"),
            ));
        }
        let before = inner.catalog.clone();
        let live = inner.live.entry(node_id).or_insert_with(Live::assumed_up);
        if let (Some(t), Some(u)) = (live.last_heartbeat, &live.usage) {
            live.recovery_rate =
                health::rate((t, u.recovery.bytes_total), (now, req.recovery.bytes_total));
        }
        live.last_heartbeat = Some(now);
        live.usage = Some(req);
        if !live.up {
            let down_since = live.down_since;
            live.up = true;
            live.down_since = None;
            tracing::info!(node_id, "node is up again");
            for d in inner
                .catalog
                .disks
                .iter_mut()
                .filter(|d| d.node_id == node_id)
            {
                if d.out {
                    d.out = false;
                    tracing::info!(
                        disk = d.id,
                        "disk taken out earlier is back: in again, holding no group"
                    );
                }
            }
            if let Err(e) = self.commit(&mut inner, before) {
                // Still down in the map every client has at this epoch: the
                // next heartbeat tries again.
                let live = inner.live.get_mut(&node_id).expect("live");
                live.up = false;
                live.down_since = down_since;
                return Err(e);
            }
        }
        let flags = &inner.catalog.flags;
        Ok(HeartbeatResponse {
            epoch: inner.catalog.epoch,
            scrub_generation: inner.scrub_generation,
            grace_ms: self.grace.as_millis() as u64,
            recovery_paused: flags.contains(&ClusterFlag::Norecover),
            backfill_paused: flags.contains(&ClusterFlag::Nobackfill),
        })
    }

    /// Ask every storage daemon to scrub the groups it leads now; returns
    /// the request's generation (see `Status::scrub_generation`).
    pub fn request_scrub(&self) -> u64 {
        let mut inner = self.lock();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        inner.scrub_generation = (inner.scrub_generation + 1).max(now_ms);
        tracing::info!(generation = inner.scrub_generation, "scrub requested");
        inner.scrub_generation
    }

    /// Apply the health policy at `now`: nodes silent past the grace go
    /// down (their copies outdated), disks down past `--down-out-after` are
    /// taken out (their groups re-placed), short groups get a backfill
    /// member where a disk is eligible. One new epoch for all changes.
    pub fn check_health(&self, now: Instant) {
        let mut inner = self.lock();
        let changes = health::transitions(&inner.live, inner.started, now, self.grace);
        let before = inner.catalog.clone();
        let mut changed = !changes.is_empty();
        for (id, up) in &changes {
            let live = inner.live.get_mut(id).expect("live");
            live.up = *up;
            live.down_since = (!*up).then_some(now);
            if *up {
                tracing::info!(node_id = id, "node is up");
            } else {
                tracing::warn!(node_id = id, grace = ?self.grace, "node missed its heartbeats: down");
                // Writes go on without its copies: they are outdated now.
                let disks: Vec<u32> = inner
                    .catalog
                    .disks
                    .iter()
                    .filter(|d| d.node_id == *id)
                    .map(|d| d.id)
                    .collect();
                let c = &mut inner.catalog;
                let pgs = c.pgs.clone();
                for d in disks {
                    tessera_wire::map::outdate_disk(&pgs, &mut c.pg_states, d);
                }
            }
        }
        {
            let Inner {
                catalog,
                live,
                demoted_at,
                started,
                held_in,
                ..
            } = &mut *inner;
            let up = |n: u32| live.get(&n).is_some_and(|l| l.up);
            let due: Vec<u32> = catalog
                .disks
                .iter()
                .filter(|d| {
                    !d.out
                        && live.get(&d.node_id).is_some_and(|l| {
                            !l.up && health::due_out(l.down_since, now, self.down_out_after)
                        })
                })
                .map(|d| d.id)
                .collect();
            held_in.retain(|d| due.contains(d));
            for d in due {
                if catalog.flags.contains(&ClusterFlag::Noout) {
                    if held_in.insert(d) {
                        tracing::warn!(
                            disk = d,
                            after = ?self.down_out_after,
                            "disk down too long but stays in: the noout flag is set; its groups stay degraded until it returns or the flag is unset"
                        );
                    }
                    continue;
                }
                let total = catalog.disks.len();
                let in_now = catalog.disks.iter().filter(|d| !d.out).count();
                if !health::may_take_out(total, in_now, self.min_in_ratio) {
                    if held_in.insert(d) {
                        tracing::warn!(
                            disk = d,
                            in_now,
                            total,
                            min_in_ratio = self.min_in_ratio,
                            "disk down too long but stays in: taking it out would leave fewer disks in than --min-in-ratio; its groups stay degraded"
                        );
                    }
                    continue;
                }
                held_in.remove(&d);
                let moved = map::take_out(catalog, d, up);
                tracing::warn!(
                    disk = d,
                    after = ?self.down_out_after,
                    groups = moved.len(),
                    "disk down too long: out; its placement groups are re-placed and backfilled"
                );
                changed = true;
            }
            let topped = map::top_up(catalog, up);
            if !topped.is_empty() {
                tracing::info!(
                    groups = topped.len(),
                    "short placement groups get a backfill member"
                );
                changed = true;
            }
            // A demoted primary leaves the set only once every read lease
            // it could hold under the map where it led has run out (leases
            // last 3/4 of the grace from a heartbeat, and one renewed under
            // the newer map requires the daemon to have it).
            let grace = self.grace;
            let leases_over = |t: &Instant| now.saturating_duration_since(*t) >= grace;
            let may_drop =
                |pg: u32| leases_over(started) && demoted_at.get(&pg).is_none_or(leases_over);
            let mut demoted = Vec::new();
            let moved = if catalog.flags.contains(&ClusterFlag::Norebalance) {
                Vec::new()
            } else {
                map::rebalance(catalog, up, may_drop, &mut demoted)
            };
            for pg in demoted {
                demoted_at.insert(pg, now);
            }
            demoted_at.retain(|_, t| !leases_over(t));
            if !moved.is_empty() {
                tracing::info!(
                    groups = moved.len(),
                    "rebalancing: placement groups gain a backfill member on a disk placement now picks, or drop a copy it no longer picks"
                );
                changed = true;
            }
        }
        if !changed {
            return;
        }
        if self.commit(&mut inner, before.clone()).is_err() {
            // Retried at the next check: the states did not change on disk.
            inner.catalog = before;
            for (id, up) in changes {
                let live = inner.live.get_mut(&id).expect("live");
                live.up = !up;
                live.down_since = None;
            }
        }
    }

    /// Primaries report copies recovered (`POST /v1/pgs/clean`). Each
    /// report is judged against the map as it was before this batch, and is
    /// accepted only under that epoch, from the group's primary: anything
    /// that happened since (a restart, a loss) bumped the epoch. One new
    /// epoch for the whole batch. Returns how many copies changed state.
    pub fn report_clean(&self, reports: Vec<CleanReport>) -> Result<u32, ApiError> {
        let mut inner = self.lock();
        let map = inner.map();
        let before = inner.catalog.clone();
        let mut changed = 0;
        for r in &reports {
            if r.pg < inner.catalog.pg_count
                && tessera_wire::map::mark_clean(
                    &map,
                    &mut inner.catalog.pg_states,
                    r.pg,
                    r.disk_id,
                    r.reporter_disk_id,
                    r.epoch,
                )
            {
                changed += 1;
                tracing::info!(pg = r.pg, disk = r.disk_id, "copy is up to date again");
            }
        }
        if changed > 0 {
            self.commit(&mut inner, before)?;
        }
        Ok(changed)
    }

    pub fn create_pool(&self, req: CreatePoolRequest) -> Result<PoolInfo, ApiError> {
        let mut inner = self.lock();
        let before = inner.catalog.clone();
        let id = map::create_pool(&mut inner.catalog, &req)?;
        self.commit(&mut inner, before)?;
        tracing::info!(name = %req.name, id, replicas = req.replicas, "pool created");
        Ok(map::pool_infos(&inner.catalog)
            .into_iter()
            .find(|p| p.id == id)
            .expect("pool exists"))
    }

    pub fn pools(&self) -> Vec<PoolInfo> {
        map::pool_infos(&self.lock().catalog)
    }

    pub fn create_volume(&self, req: CreateVolumeRequest) -> Result<VolumeInfo, ApiError> {
        let mut inner = self.lock();
        let before = inner.catalog.clone();
        let up_disks = map::up_disks(&inner.catalog, |n| inner.up(n));
        let id = map::create_volume(&mut inner.catalog, &req, &up_disks)?;
        self.commit(&mut inner, before)?;
        tracing::info!(name = %req.name, id, size_bytes = req.size_bytes, "volume created");
        let m = inner.map();
        Ok(inner.volume_info(&m, id))
    }

    pub fn resize_volume(
        &self,
        name: &str,
        req: ResizeVolumeRequest,
    ) -> Result<VolumeInfo, ApiError> {
        let mut inner = self.lock();
        let before = inner.catalog.clone();
        let (id, changed) = map::resize_volume(&mut inner.catalog, name, &req)?;
        if changed {
            self.commit(&mut inner, before)?;
            tracing::info!(name, size_bytes = req.size_bytes, "volume resized");
        }
        let m = inner.map();
        Ok(inner.volume_info(&m, id))
    }

    pub fn delete_volume(&self, name: &str) -> Result<(), ApiError> {
        let mut inner = self.lock();
        let before = inner.catalog.clone();
        let id = map::delete_volume(&mut inner.catalog, name)?;
        crate::iscsi::forget_volume(&mut inner.catalog, id);
        self.commit(&mut inner, before)?;
        tracing::info!(name, id, "volume deleted");
        Ok(())
    }

    pub fn volume(&self, name: &str) -> Result<VolumeInfo, ApiError> {
        let inner = self.lock();
        let m = inner.map();
        let id = m
            .volume_by_name(name)
            .ok_or(map::Error::NotFound(name.to_string()))?
            .id;
        Ok(inner.volume_info(&m, id))
    }

    /// Every volume, sorted by name.
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        let inner = self.lock();
        let m = inner.map();
        let mut ids: Vec<(&str, u64)> = m.volumes.iter().map(|v| (v.name.as_str(), v.id)).collect();
        ids.sort();
        ids.into_iter()
            .map(|(_, id)| inner.volume_info(&m, id))
            .collect()
    }

    pub fn nodes(&self) -> Vec<NodeInfo> {
        let inner = self.lock();
        inner
            .catalog
            .nodes
            .iter()
            .map(|n| {
                let l = inner.live.get(&n.id);
                NodeInfo {
                    id: n.id,
                    uuid: n.uuid.clone(),
                    addr: n.addr.clone(),
                    metrics_addr: n.metrics_addr.clone(),
                    pid: n.pid,
                    up: inner.up(n.id),
                    last_heartbeat_ms_ago: l
                        .and_then(|l| l.last_heartbeat)
                        .map(|t| t.elapsed().as_millis() as u64),
                    disks: inner
                        .catalog
                        .disks
                        .iter()
                        .filter(|d| d.node_id == n.id)
                        .map(|d| d.id)
                        .collect(),
                }
            })
            .collect()
    }

    pub fn disks(&self) -> Vec<DiskInfo> {
        let inner = self.lock();
        inner
            .catalog
            .disks
            .iter()
            .map(|d| {
                let usage = inner
                    .live
                    .get(&d.node_id)
                    .and_then(|l| l.usage.as_ref())
                    .and_then(|u| u.disks.iter().find(|x| x.disk_id == d.id));
                DiskInfo {
                    id: d.id,
                    node_id: d.node_id,
                    uuid: d.uuid.clone(),
                    path: d.path.clone(),
                    capacity_bytes: d.capacity_bytes,
                    used_bytes: usage.map_or(0, |u| u.used_bytes),
                    checksum_errors: usage.map_or(0, |u| u.checksum_errors),
                    up: inner.up(d.node_id),
                    out: d.out,
                }
            })
            .collect()
    }

    pub fn status(&self) -> Status {
        let inner = self.lock();
        let c = &inner.catalog;
        let nodes_up = c.nodes.iter().filter(|n| inner.up(n.id)).count() as u32;
        let map = inner.map();
        let h = map::pg_health(&map);
        let reports: Vec<&tessera_wire::api::ScrubReport> = c
            .nodes
            .iter()
            .filter(|n| inner.up(n.id))
            .filter_map(|n| inner.live.get(&n.id)?.usage.as_ref())
            .map(|u| &u.scrub)
            .collect();
        let sum = |f: fn(&tessera_wire::api::ScrubReport) -> u64| -> u64 {
            reports.iter().map(|r| f(r)).sum()
        };
        let progress = inner
            .live
            .values()
            .filter(|l| l.up)
            .filter_map(|l| l.usage.as_ref().map(|u| (&u.recovery, l.recovery_rate)));
        let (mut done, mut remaining, mut rate) = (0u64, 0u64, 0u64);
        for (p, r) in progress {
            done += p.done_bytes;
            remaining += p.remaining_bytes;
            rate += r;
        }
        Status {
            scrub_generation: inner.scrub_generation,
            scrub_daemons_done: reports
                .iter()
                .filter(|r| r.generation_done >= inner.scrub_generation)
                .count() as u32,
            pgs_scrubbing: reports.iter().map(|r| r.running).sum(),
            scrubs: sum(|r| r.scrubs),
            scrub_regions: sum(|r| r.regions),
            scrub_errors: sum(|r| r.errors),
            repairs: sum(|r| r.repairs),
            unrepairable: sum(|r| r.unrepairable),
            pgs_backfilling: h.backfilling,
            disks_out: c.disks.iter().filter(|d| d.out).count() as u32,
            flags: c.flags.iter().map(|f| f.name().to_string()).collect(),
            disks_held_in: inner.held_in.len() as u32,
            recovery_done_bytes: done,
            recovery_remaining_bytes: remaining,
            // Nothing known to push: done, or still listing regions.
            recovery_percent: (done * 100)
                .checked_div(done + remaining)
                .map_or(if h.recovering > 0 { 0 } else { 100 }, |p| p as u32),
            recovery_bytes_per_sec: rate,
            daemons_up: nodes_up,
            daemons_down: c.nodes.len() as u32 - nodes_up,
            pgs_clean: h.clean,
            pgs_degraded: h.degraded,
            pgs_recovering: h.recovering,
            cluster_id: c.cluster_id.clone(),
            epoch: c.epoch,
            nodes_up,
            nodes_down: c.nodes.len() as u32 - nodes_up,
            disks: c.disks.len() as u32,
            volumes: c.volumes.len() as u32,
            pgs_total: c.pg_count,
            pgs_assigned: c.pgs.iter().filter(|s| !s.is_empty()).count() as u32,
            capacity_bytes: c.disks.iter().map(|d| d.capacity_bytes).sum(),
            used_bytes: inner
                .live
                .values()
                .filter_map(|l| l.usage.as_ref())
                .flat_map(|u| u.disks.iter().map(|d| d.used_bytes))
                .sum(),
        }
    }
}

/// How often the manager opens an empty connection to itself; see
/// [`nudge_connection_pool`].
pub const NUDGE_INTERVAL: Duration = Duration::from_millis(100);

/// tiny_http hands each connection to a pool thread and can lose a wake-up
/// when two connections arrive together while one thread is idle: the
/// second connection then waits in the queue until some other connection
/// ends. Keep-alive connections and held map long polls can keep every
/// thread busy for seconds, and a heartbeat stuck that long would declare
/// a live daemon down. An empty connection every [`NUDGE_INTERVAL`] ends at
/// once, and the thread that served it takes the queued one.
fn nudge_connection_pool(addr: SocketAddr) {
    loop {
        std::thread::sleep(NUDGE_INTERVAL);
        // Refused or failed: the server is stopping or busy; try again later.
        let _ = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1));
    }
}

/// Run the manager until SIGTERM/SIGINT. The caller must have blocked
/// those signals (see [`crate::sys::block_termination_signals`]).
pub fn run(config: Config) -> Result<(), Fatal> {
    tracing::info!(?config, "starting tessera-manager");
    let manager = Arc::new(Manager::open(&config)?);
    let server = Arc::new(tiny_http::Server::http(config.listen).map_err(|e| Fatal {
        code: ExitCode::Environment,
        message: format!(
            "cannot listen on {}: {e} (is another manager running? pick another --listen)",
            config.listen
        ),
    })?);
    let bound = server
        .server_addr()
        .to_ip()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let secret = crate::secret::load_or_create(&config.data_dir.join(crate::secret::FILE_NAME))
        .map_err(|message| Fatal {
            code: ExitCode::Environment,
            message,
        })?;
    let api = Arc::new(crate::api::Api::new(manager.clone()).with_cluster_secret(secret));
    for _ in 0..crate::api::HTTP_THREADS {
        let (a, s) = (api.clone(), server.clone());
        std::thread::spawn(move || a.serve(&s));
    }
    {
        let m = manager.clone();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(HEALTH_INTERVAL);
                m.check_health(Instant::now());
            }
        });
    }
    if let Some(addr) = server.server_addr().to_ip() {
        std::thread::spawn(move || nudge_connection_pool(addr));
    }
    tracing::info!(listen = %bound, "ready");
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "READY listen={bound}");
        let _ = out.flush();
    }
    crate::notify_ready();
    crate::sys::wait_termination(None);
    tracing::info!("stopping");
    server.unblock();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path, grace: Duration) -> Config {
        Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.to_path_buf(),
            pg_count: 16,
            heartbeat_grace: grace,
            down_out_after: Duration::from_secs(600),
            min_in_ratio: 0.75,
            replicas: 1,
            min_replicas: 1,
            failure_domain: tessera_wire::map::FailureDomain::Host,
        }
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tessera-mgr-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn reg(m: &Manager, uuid: &str) -> RegisterResponse {
        m.register(RegisterRequest {
            node_uuid: uuid.into(),
            addr: "127.0.0.1:1".into(),
            metrics_addr: None,
            pid: 1,
            host: String::new(),
            zone: String::new(),
            rack: String::new(),
            disks: vec![DiskRegistration {
                uuid: format!("{uuid}-d"),
                path: "/x".into(),
                capacity_bytes: 1 << 30,
            }],
        })
        .unwrap()
    }

    // Proves a restarted manager finds everything it had, and keeps its
    // pg_count whatever the flag says.
    #[test]
    fn persists_across_restart() {
        let dir = temp("persist");
        let m = Manager::open(&config(&dir, Duration::from_secs(5))).unwrap();
        reg(&m, "n1");
        m.create_volume(CreateVolumeRequest {
            name: "v".into(),
            size_bytes: 1 << 20,
            block_size: None,
            pool: None,
        })
        .unwrap();
        let before = m.map();
        drop(m);
        let mut c = config(&dir, Duration::from_secs(5));
        c.pg_count = 99;
        let m = Manager::open(&c).unwrap();
        // All but `up_since`, which lives in memory: unknown after a
        // restart until the next commit.
        let after = m.map();
        assert!(after.disks.iter().all(|d| d.up_since.is_none()));
        assert!(before.disks.iter().all(|d| d.up_since.is_some()));
        let known = |mut m: ClusterMap| {
            for d in &mut m.disks {
                d.up_since = None;
            }
            m
        };
        assert_eq!(after, known(before));
        drop(m);
        std::fs::remove_dir_all(dir).ok();
    }

    // Proves a lagging daemon's `next` long poll gets every epoch in turn,
    // each the map that was published at it, while the history holds it,
    // and the newest map once the history has rolled past its epoch.
    #[test]
    fn map_next_steps_through_every_epoch() {
        let dir = temp("map-next");
        let m = Manager::open(&config(&dir, Duration::from_secs(5))).unwrap();
        reg(&m, "n1");
        let start = m.map().epoch;
        let mut published = vec![m.map()];
        for i in 0..5 {
            m.create_volume(CreateVolumeRequest {
                name: format!("v{i}"),
                size_bytes: 1 << 20,
                block_size: None,
                pool: None,
            })
            .unwrap();
            published.push(m.map());
        }
        let newest = m.map();
        assert_eq!(newest.epoch, start + 5);
        let zero = Duration::ZERO;
        for e in start..newest.epoch {
            let next = m.map_next(e, zero);
            assert_eq!(next.epoch, e + 1);
            assert_eq!(next, published[(e + 1 - start) as usize]);
            // The plain long poll still answers with the newest.
            assert_eq!(m.map_after(e, zero), newest);
        }
        // Up to date: the current map (after the wait); an epoch from a
        // client at the end of the range does not overflow.
        assert_eq!(m.map_next(newest.epoch, zero), newest);
        assert_eq!(m.map_next(u64::MAX, zero), newest);
        // Past the history: the newest.
        for i in 0..MAP_HISTORY {
            m.create_volume(CreateVolumeRequest {
                name: format!("w{i}"),
                size_bytes: 1 << 20,
                block_size: None,
                pool: None,
            })
            .unwrap();
        }
        let newest = m.map();
        assert_eq!(m.map_next(start, zero), newest);
        let e = newest.epoch - 2;
        assert_eq!(m.map_next(e, zero).epoch, e + 1);
        drop(m);
        std::fs::remove_dir_all(dir).ok();
    }

    // Proves a silent node goes down after the grace period (new epoch)
    // and comes back with its next heartbeat (another one), and that each
    // map says since which epoch a disk has been up without a break.
    #[test]
    fn health() {
        let dir = temp("health");
        let m = Manager::open(&config(&dir, Duration::from_secs(2))).unwrap();
        let r = reg(&m, "n1");
        m.check_health(Instant::now());
        assert!(m.map().nodes[0].up);
        let e0 = m.map().epoch;
        let since = m.map().disks[0]
            .up_since
            .expect("up since its registration");
        assert!(since <= e0);
        m.check_health(Instant::now() + Duration::from_secs(3));
        let down = m.map();
        assert!(!down.nodes[0].up && !down.disks[0].up);
        assert_eq!(down.disks[0].up_since, None);
        assert_eq!(down.epoch, e0 + 1);
        assert_eq!(m.status().nodes_down, 1);
        let hb = || HeartbeatRequest {
            recovery: Default::default(),
            disks: vec![],
            volumes: vec![],
            scrub: Default::default(),
        };
        assert_eq!(m.heartbeat(r.node_id, hb()).unwrap().epoch, e0 + 2);
        assert!(m.map().nodes[0].up);
        assert_eq!(
            m.map().disks[0].up_since,
            Some(e0 + 2),
            "up again from then"
        );
        m.create_volume(CreateVolumeRequest {
            name: "later".into(),
            size_bytes: 1 << 20,
            block_size: None,
            pool: None,
        })
        .unwrap();
        assert_eq!(m.map().epoch, e0 + 3);
        assert_eq!(m.map().disks[0].up_since, Some(e0 + 2), "kept while up");
        assert_eq!(m.heartbeat(99, hb()).unwrap_err().status, 404);
        // The pause switches travel in heartbeat answers.
        let paused = |m: &Manager| {
            let a = m.heartbeat(r.node_id, hb()).unwrap();
            (a.recovery_paused, a.backfill_paused)
        };
        assert_eq!(paused(&m), (false, false));
        m.set_flag("norecover", true).unwrap();
        assert_eq!(paused(&m), (true, false));
        m.set_flag("nobackfill", true).unwrap();
        m.set_flag("norecover", false).unwrap();
        assert_eq!(paused(&m), (false, true));
        drop(m);
        std::fs::remove_dir_all(dir).ok();
    }

    // Proves a replicated pool: three copies per group on three distinct
    // nodes, the pool's own placement-group range, and the refusals (too
    // few failure domains up, unknown pool, bad policy, duplicate name).
    #[test]
    fn replicated_pool() {
        let dir = temp("pool");
        let m = Manager::open(&config(&dir, Duration::from_secs(2))).unwrap();
        let pool = |name: &str, replicas, min| CreatePoolRequest {
            name: name.into(),
            replicas,
            min_replicas: min,
            failure_domain: None,
            chunk_size_bytes: None,
            pg_count: Some(32),
        };
        let p = m.create_pool(pool("triple", 3, None)).unwrap();
        assert_eq!((p.pg_base, p.pg_count, p.min_replicas), (16, 32, 2));
        assert_eq!(
            m.create_pool(pool("triple", 3, None)).unwrap_err().status,
            409
        );
        assert_eq!(
            m.create_pool(pool("bad", 3, Some(4))).unwrap_err().status,
            400
        );
        assert_eq!(m.create_pool(pool("bad", 0, None)).unwrap_err().status, 400);
        let vol = |pool: &str| CreateVolumeRequest {
            name: format!("v-{pool}"),
            size_bytes: 1 << 30,
            block_size: None,
            pool: Some(pool.into()),
        };
        reg(&m, "n1");
        // One failure domain is fewer than min_replicas = 2.
        assert_eq!(m.create_volume(vol("triple")).unwrap_err().status, 503);
        reg(&m, "n2");
        reg(&m, "n3");
        assert_eq!(m.create_volume(vol("nope")).unwrap_err().status, 404);
        let v = m.create_volume(vol("triple")).unwrap();
        assert_eq!((v.pool.as_str(), v.replicas), ("triple", 3));
        let map = m.map();
        map.validate().unwrap();
        for pg in 16..48 {
            let set = &map.pgs[pg];
            assert_eq!(set.len(), 3, "{set:?}");
            let mut nodes: Vec<u32> = set.iter().map(|d| map.disk(*d).unwrap().node_id).collect();
            nodes.sort();
            nodes.dedup();
            assert_eq!(nodes.len(), 3);
        }
        assert!(map.pgs[..16].iter().all(Vec::is_empty));
        for c in 0..256 {
            assert!((16..48).contains(&map.pg_for(v.id, c).unwrap()));
        }
        assert_eq!(m.pools().len(), 2);
        drop(m);
        std::fs::remove_dir_all(dir).ok();
    }

    // Proves the rebuild policy end to end in the manager: a node silent
    // past the grace is down, its disk is taken out once down for
    // --down-out-after, every group that held it gets a backfill member on
    // another node (never two copies per node), status counts the groups
    // backfilling, and the disk, once heard from again, is in but holds no
    // group.
    #[test]
    fn down_out_replaces_copies() {
        let dir = temp("downout");
        let mut cfg = config(&dir, Duration::from_secs(2));
        cfg.down_out_after = Duration::from_secs(2);
        let m = Manager::open(&cfg).unwrap();
        m.create_pool(CreatePoolRequest {
            name: "triple".into(),
            replicas: 3,
            min_replicas: None,
            failure_domain: None,
            chunk_size_bytes: None,
            pg_count: Some(32),
        })
        .unwrap();
        let nodes: Vec<RegisterResponse> = ["n1", "n2", "n3", "n4"]
            .iter()
            .map(|n| reg(&m, n))
            .collect();
        m.create_volume(CreateVolumeRequest {
            name: "v".into(),
            size_bytes: 1 << 30,
            block_size: None,
            pool: Some("triple".into()),
        })
        .unwrap();
        let gone = nodes[0].disks[0].disk_id;
        let before = m.map();
        let held = before.pgs.iter().filter(|s| s.contains(&gone)).count() as u32;
        assert!(held > 0);
        let t0 = Instant::now();
        let hb = || HeartbeatRequest {
            recovery: Default::default(),
            scrub: Default::default(),
            disks: vec![],
            volumes: vec![],
        };
        let beat = |at: Duration| {
            for n in &nodes[1..] {
                m.heartbeat_at(n.node_id, hb(), t0 + at).unwrap();
            }
        };
        beat(Duration::from_millis(2500));
        m.check_health(t0 + Duration::from_secs(3));
        assert_eq!(m.status().daemons_down, 1);
        assert_eq!(m.status().disks_out, 0);
        let down = m.map();
        beat(Duration::from_millis(4500));
        m.check_health(t0 + Duration::from_millis(4900));
        assert_eq!(m.status().disks_out, 0, "not yet: down for 1.9 s");
        m.check_health(t0 + Duration::from_secs(5));
        let after = m.map();
        after.validate().unwrap();
        assert!(after.disk(gone).unwrap().out);
        let s = m.status();
        assert_eq!((s.disks_out, s.pgs_backfilling), (1, held));
        for (pg, set) in after.pgs.iter().enumerate().filter(|(_, s)| !s.is_empty()) {
            assert!(!set.contains(&gone), "pg {pg}: {set:?}");
            assert_eq!(set.len(), 3);
            let mut ns: Vec<u32> = set
                .iter()
                .map(|d| after.disk(*d).unwrap().node_id)
                .collect();
            ns.sort();
            ns.dedup();
            assert_eq!(ns.len(), 3);
            if before.pgs[pg].contains(&gone) {
                assert_eq!(
                    after.pg_states[pg][2],
                    tessera_wire::map::CopyState::Backfill
                );
                assert_eq!(after.primary(pg as u32), down.primary(pg as u32));
            } else {
                assert_eq!(set, &before.pgs[pg]);
            }
        }
        // Back: in again, no group regained.
        m.heartbeat_at(nodes[0].node_id, hb(), t0 + Duration::from_secs(6))
            .unwrap();
        let back = m.map();
        assert!(!back.disk(gone).unwrap().out);
        assert!(back.disk(gone).unwrap().up);
        assert!(back.pgs.iter().all(|s| !s.contains(&gone)));
        assert_eq!(back.pgs, after.pgs);
        drop(m);
        std::fs::remove_dir_all(dir).ok();
    }

    // Proves --min-in-ratio: with four disks and the default 0.75, one
    // disk silent past --down-out-after goes out, a second one stays in
    // (its groups stay degraded rather than all be re-placed onto two).
    #[test]
    fn min_in_ratio_keeps_disks_in() {
        let dir = temp("minin");
        let mut cfg = config(&dir, Duration::from_secs(2));
        cfg.down_out_after = Duration::from_secs(2);
        let m = Manager::open(&cfg).unwrap();
        let nodes: Vec<RegisterResponse> = ["n1", "n2", "n3", "n4"]
            .iter()
            .map(|n| reg(&m, n))
            .collect();
        let t0 = Instant::now();
        let hb = || HeartbeatRequest {
            recovery: Default::default(),
            scrub: Default::default(),
            disks: vec![],
            volumes: vec![],
        };
        for at in [2500, 4500, 6500] {
            for n in &nodes[2..] {
                m.heartbeat_at(n.node_id, hb(), t0 + Duration::from_millis(at))
                    .unwrap();
            }
            m.check_health(t0 + Duration::from_millis(at + 400));
        }
        m.check_health(t0 + Duration::from_secs(7));
        let s = m.status();
        assert_eq!(s.daemons_down, 2);
        assert_eq!(s.disks_out, 1, "the second would leave 2 of 4 in");
        drop(m);
        std::fs::remove_dir_all(dir).ok();
    }

    // Proves failure reports: a node a peer reported gone is declared
    // down (its copies outdated, a new map) once silent for 600 ms, not
    // after the 2 s grace; a report from a node held down, from an unknown
    // node or about the reporter itself changes nothing; a report about a
    // node that heartbeats afterwards does not take it down.
    #[test]
    fn failure_report_declares_down_before_the_grace() {
        let dir = temp("failrep");
        let cfg = config(&dir, Duration::from_secs(2));
        let m = Manager::open(&cfg).unwrap();
        let nodes: Vec<RegisterResponse> = ["n1", "n2", "n3"].iter().map(|n| reg(&m, n)).collect();
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let hb = || HeartbeatRequest {
            recovery: Default::default(),
            scrub: Default::default(),
            disks: vec![],
            volumes: vec![],
        };
        for n in &nodes {
            m.heartbeat_at(n.node_id, hb(), ms(0)).unwrap();
        }
        let (a, b, c) = (nodes[0].node_id, nodes[1].node_id, nodes[2].node_id);
        let by = |reporter| FailureReport {
            reporter_node_id: reporter,
        };
        assert_eq!(
            m.report_failure_at(a, by(a), ms(50)).unwrap_err().status,
            400
        );
        assert_eq!(
            m.report_failure_at(a, by(99), ms(50)).unwrap_err().status,
            404
        );
        m.report_failure_at(b, by(a), ms(100)).unwrap();
        m.check_health(ms(400));
        assert_eq!(m.status().daemons_down, 0, "silent 400 ms only");
        let epoch = m.map().epoch;
        m.heartbeat_at(a, hb(), ms(500)).unwrap();
        m.heartbeat_at(c, hb(), ms(500)).unwrap();
        m.check_health(ms(700));
        assert_eq!(m.status().daemons_down, 1, "reported and silent 700 ms");
        assert!(!m.map().nodes.iter().find(|n| n.id == b).unwrap().up);
        assert!(m.map().epoch > epoch, "a new map outdates its copies");
        // Node c reported by a, but heard from afterwards: stays up.
        m.report_failure_at(c, by(a), ms(750)).unwrap();
        m.heartbeat_at(c, hb(), ms(800)).unwrap();
        m.heartbeat_at(a, hb(), ms(800)).unwrap();
        m.check_health(ms(1300));
        assert_eq!(m.status().daemons_down, 1);
        // A report from the node held down (b) is ignored.
        m.report_failure_at(a, by(b), ms(1350)).unwrap();
        m.heartbeat_at(c, hb(), ms(1400)).unwrap();
        m.check_health(ms(1500));
        assert_eq!(m.status().daemons_down, 1);
        drop(m);
        std::fs::remove_dir_all(dir).ok();
    }

    // Proves `noout`: a disk silent past --down-out-after stays in while
    // the flag is set (counted as held in, its groups degraded), the flag
    // survives a manager restart, and once it is unset the disk goes out
    // at the next health check. Unknown flag names are refused.
    #[test]
    fn noout_keeps_a_down_disk_in() {
        let dir = temp("noout");
        let mut cfg = config(&dir, Duration::from_secs(2));
        cfg.down_out_after = Duration::from_secs(2);
        let m = Manager::open(&cfg).unwrap();
        assert_eq!(m.set_flag("nodown", true).unwrap_err().status, 400);
        assert_eq!(m.set_flag("noout", true).unwrap().flags, vec!["noout"]);
        drop(m);
        let m = Manager::open(&cfg).unwrap();
        assert_eq!(m.flags().flags, vec!["noout"], "persisted");
        let nodes: Vec<RegisterResponse> = ["n1", "n2", "n3", "n4"]
            .iter()
            .map(|n| reg(&m, n))
            .collect();
        let t0 = Instant::now();
        let hb = || HeartbeatRequest {
            recovery: Default::default(),
            scrub: Default::default(),
            disks: vec![],
            volumes: vec![],
        };
        for at in [2500, 4500, 6500] {
            for n in &nodes[1..] {
                m.heartbeat_at(n.node_id, hb(), t0 + Duration::from_millis(at))
                    .unwrap();
            }
            m.check_health(t0 + Duration::from_millis(at + 400));
        }
        let s = m.status();
        assert_eq!((s.daemons_down, s.disks_out, s.disks_held_in), (1, 0, 1));
        assert_eq!(s.flags, vec!["noout"]);
        let epoch = s.epoch;
        assert!(m.set_flag("noout", false).unwrap().flags.is_empty());
        assert_eq!(m.status().epoch, epoch, "flags are not in the map");
        m.check_health(t0 + Duration::from_millis(7000));
        let s = m.status();
        assert_eq!((s.disks_out, s.disks_held_in), (1, 0));
        assert!(m.map().disk(nodes[0].disks[0].disk_id).unwrap().out);
        drop(m);
        std::fs::remove_dir_all(dir).ok();
    }

    // Proves whom a reservation change waits for: every other gateway
    // that polled within the lease and holds an older revision; a gateway
    // silent past the lease is not waited for (it refuses on its own), nor
    // is the caller.
    #[test]
    fn fence_waits_for_gateways_within_their_lease() {
        let now = Instant::now();
        let seen = |ago: Duration, revision| GatewaySeen {
            at: now - ago,
            revision,
        };
        let g: BTreeMap<String, GatewaySeen> = [
            ("me", seen(Duration::ZERO, 1)),
            ("live", seen(Duration::ZERO, 4)),
            ("behind", seen(Duration::from_secs(1), 3)),
            ("gone", seen(GATEWAY_LEASE + Duration::from_millis(1), 1)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(lagging(&g, "me", 4, now), vec!["behind".to_string()]);
        assert!(lagging(&g, "me", 3, now).is_empty());
        assert!(lagging(&g, "me", 4, now + GATEWAY_LEASE).is_empty());

        // Through the manager: a gateway's poll tells what it holds.
        let dir = temp("fence");
        let m = Manager::open(&config(&dir, Duration::from_secs(2))).unwrap();
        let r0 = m.revision();
        m.access_after(Some("g1"), r0, Duration::ZERO, |_, _| ());
        m.access_after(Some("g2"), r0, Duration::ZERO, |_, _| ());
        m.set_flag("noout", true).unwrap();
        let r1 = m.revision();
        assert!(r1 > r0, "a catalogue change moves the revision");
        assert_eq!(m.fenced("g1", r1, Duration::ZERO), vec!["g2".to_string()]);
        // g2 long-polls: it is answered at once with the newer revision,
        // and its next poll says it holds it.
        let got = m.access_after(Some("g2"), r0, Duration::from_secs(5), |_, r| r);
        assert_eq!(got, r1);
        m.access_after(Some("g2"), r1, Duration::ZERO, |_, _| ());
        assert!(m.fenced("g1", r1, Duration::ZERO).is_empty());
        // A gateway that says it stops is not waited for.
        m.set_flag("noout", false).unwrap();
        let r2 = m.revision();
        assert_eq!(m.fenced("g1", r2, Duration::ZERO), vec!["g2".to_string()]);
        m.forget_gateway("g2");
        assert!(m.fenced("g1", r2, Duration::ZERO).is_empty());
        drop(m);
        std::fs::remove_dir_all(dir).ok();
    }

    // Proves `norebalance`: a disk added to a three-copy pool gets no
    // group while the flag is set; unset, rebalancing starts moving
    // groups onto it.
    #[test]
    fn norebalance_holds_groups_in_place() {
        let dir = temp("norebalance");
        let m = Manager::open(&config(&dir, Duration::from_secs(2))).unwrap();
        m.create_pool(CreatePoolRequest {
            name: "triple".into(),
            replicas: 3,
            min_replicas: None,
            failure_domain: None,
            chunk_size_bytes: None,
            pg_count: Some(32),
        })
        .unwrap();
        for n in ["n1", "n2", "n3"] {
            reg(&m, n);
        }
        m.create_volume(CreateVolumeRequest {
            name: "v".into(),
            size_bytes: 1 << 30,
            block_size: None,
            pool: Some("triple".into()),
        })
        .unwrap();
        m.set_flag("norebalance", true).unwrap();
        let added = reg(&m, "n4").disks[0].disk_id;
        let before = m.map().pgs;
        // Past the grace since the manager started, as rebalancing needs.
        let later = Instant::now() + Duration::from_secs(3);
        let hb = HeartbeatRequest {
            recovery: Default::default(),
            scrub: Default::default(),
            disks: vec![],
            volumes: vec![],
        };
        for n in 1..=4 {
            m.heartbeat_at(n, hb.clone(), later).unwrap();
        }
        m.check_health(later);
        assert_eq!(m.map().pgs, before, "nothing moves under norebalance");
        m.set_flag("norebalance", false).unwrap();
        m.check_health(later);
        let after = m.map();
        assert!(
            after.pgs.iter().any(|s| s.contains(&added)),
            "groups start moving onto the new disk once unset"
        );
        drop(m);
        std::fs::remove_dir_all(dir).ok();
    }

    // Proves placement only uses disks that are up when the groups are
    // assigned.
    #[test]
    fn places_on_up_disks_only() {
        let dir = temp("updisks");
        let m = Manager::open(&config(&dir, Duration::from_secs(2))).unwrap();
        reg(&m, "n1");
        m.check_health(Instant::now() + Duration::from_secs(3));
        let r2 = reg(&m, "n2");
        m.create_volume(CreateVolumeRequest {
            name: "v".into(),
            size_bytes: 1 << 30,
            block_size: None,
            pool: None,
        })
        .unwrap();
        let map = m.map();
        assert!(map.pgs.iter().all(|s| s == &vec![r2.disks[0].disk_id]));
        drop(m);
        std::fs::remove_dir_all(dir).ok();
    }
}
