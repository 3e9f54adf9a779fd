//! iSCSI access control and reservation state from the manager: the
//! [`Policy`] (ACLs and CHAP per volume) and [`Persist`] (persistent
//! reservations) the target uses, backed by the manager's gateway-only
//! routes (`GET /v1/iscsi/access`, `PUT /v1/volumes/{name}/iscsi/
//! reservations`, docs/api.md), authenticated with the cluster secret.
//!
//! The snapshot is fetched before the gateway reports ready, then polled
//! every [`POLL_INTERVAL_MS`] (and at once when a login names a volume the
//! snapshot does not know yet). It fails closed: until a snapshot is
//! loaded, and for a volume the snapshot is older than (missing, or listed
//! under another id than the cluster map's), logins are refused with
//! "service unavailable", which initiators retry. A failed poll keeps the
//! last snapshot: the manager being briefly away does not lock everyone
//! out. Access changes apply to new logins; sessions already logged in
//! stay.
//!
//! The decision itself is the pure [`decide`]; this module's I/O is the
//! HTTP polling thread and the reservation store.

use super::exec::{Persist, SaveError, SaveFuture, Stored};
use super::login::{Access, Chap};
use super::pr::Reservations;
use super::target::Policy;
use crate::map::MapHandle;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tessera_wire::iscsi::{
    AccessSnapshot, ChapSecrets, FenceStatus, ReservationState, StoredReservations,
    VolumeAccessEntry,
};

/// How often the access snapshot is fetched again after a failed fetch.
pub const POLL_INTERVAL_MS: u64 = 1000;
/// How long the manager holds a poll that finds nothing newer: the
/// follower long-polls, so a change reaches every gateway at once.
pub const LONG_POLL_MS: u64 = 1000;
/// The gateway's lease on its reservation state: this long after sending
/// its last successful poll, it refuses commands a reservation could fence
/// on logical units with registrations (ABORTED COMMAND, retried) until a
/// poll succeeds again. Shorter than the manager's `GATEWAY_LEASE` (6 s),
/// after which a reservation change stops waiting for this gateway; long
/// enough that a loaded manager answering a poll late does not lapse it.
pub const LEASE_MS: u64 = 4000;
/// How long a PERSISTENT RESERVE OUT waits for the other gateways to hold
/// its change before it is answered anyway: longer than the manager's
/// `GATEWAY_LEASE`, so a silent gateway's lease has run out by then.
pub const FENCE_WAIT_MS: u64 = 8000;
/// One HTTP request to the manager may take at most this long.
pub const REQUEST_TIMEOUT_MS: u64 = 5000;
/// Pause between failed fetches while waiting for the first snapshot.
const STARTUP_RETRY_MS: u64 = 200;

/// The snapshot indexed by volume name.
#[derive(Debug, Default)]
pub struct Index {
    by_name: BTreeMap<String, VolumeAccessEntry>,
    discovery_chap: Option<ChapSecrets>,
}

impl Index {
    pub fn new(s: AccessSnapshot) -> Index {
        Index {
            by_name: s.volumes.into_iter().map(|v| (v.name.clone(), v)).collect(),
            discovery_chap: s.discovery_chap,
        }
    }
}

fn login_chap(c: &ChapSecrets) -> Chap {
    Chap {
        user: c.user.clone(),
        secret: c.secret.as_bytes().to_vec(),
        mutual: c
            .mutual_user
            .clone()
            .zip(c.mutual_secret.as_ref().map(|s| s.as_bytes().to_vec())),
    }
}

/// May `initiator` log in to `volume`, whose id in the cluster map is
/// `map_id`, according to `index` (`None`: no snapshot yet)?
pub fn decide(index: Option<&Index>, volume: &str, map_id: Option<u64>, initiator: &str) -> Access {
    let Some(map_id) = map_id else {
        return Access::NotFound;
    };
    let Some(entry) = index.and_then(|i| i.by_name.get(volume)) else {
        return Access::Unavailable;
    };
    if entry.id != map_id {
        // The volume was deleted and created again; the snapshot is older
        // than the map.
        return Access::Unavailable;
    }
    if !entry.access.admits(initiator) {
        return Access::Denied;
    }
    Access::Allowed(entry.access.chap.as_ref().map(login_chap))
}

/// Access control and reservation state from the manager.
pub struct ManagerAccess {
    manager: String,
    /// `None`: no cluster secret was given; nothing can be fetched.
    secret: Option<String>,
    maps: MapHandle,
    index: RwLock<Option<Arc<Index>>>,
    /// Grows with every snapshot installed (see `Persist::generation`).
    generation: AtomicU64,
    refresh: Option<SyncSender<()>>,
    /// This process's name for the manager (`GatewaySeen`).
    id: String,
    /// The catalogue revision of the snapshot installed.
    revision: AtomicU64,
    /// When the last successful poll was sent, in ms since `born` (0:
    /// none yet).
    last_ok_ms: AtomicU64,
    born: Instant,
    /// Set by `leave`: no more polls.
    leaving: std::sync::atomic::AtomicBool,
}

/// A name for this gateway process, unique enough among a cluster's.
fn gateway_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("gw-{}-{nanos:08x}", std::process::id())
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
        .build()
}

fn url(manager: &str, path: &str) -> String {
    format!("{}{path}", manager.trim_end_matches('/'))
}

fn reason(e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(401, _) => {
            "the manager refused the cluster secret (is --cluster-secret-file the manager's?)"
                .into()
        }
        ureq::Error::Status(code, r) => {
            format!("HTTP {code}: {}", r.into_string().unwrap_or_default())
        }
        ureq::Error::Transport(t) => t.to_string(),
    }
}

/// Fetch the access snapshot once.
pub fn fetch(manager: &str, secret: &str) -> Result<AccessSnapshot, String> {
    fetch_from(manager, secret, "/v1/iscsi/access".to_string())
}

/// Long-poll the access snapshot: `gateway` holds `revision`.
fn fetch_after(
    manager: &str,
    secret: &str,
    gateway: &str,
    revision: u64,
) -> Result<AccessSnapshot, String> {
    fetch_from(
        manager,
        secret,
        format!("/v1/iscsi/access?gateway={gateway}&revision={revision}&wait_ms={LONG_POLL_MS}"),
    )
}

fn fetch_from(manager: &str, secret: &str, path: String) -> Result<AccessSnapshot, String> {
    agent()
        .get(&url(manager, &path))
        .set("Authorization", &format!("Bearer {secret}"))
        .call()
        .map_err(reason)?
        .into_json()
        .map_err(|e| format!("bad access snapshot: {e}"))
}

impl ManagerAccess {
    /// Without a cluster secret: every login to a volume is refused as
    /// "service unavailable" and discovery lists nothing.
    pub fn closed(maps: MapHandle) -> Arc<ManagerAccess> {
        Arc::new(ManagerAccess::new(
            String::new(),
            None,
            maps,
            None,
            Instant::now(),
        ))
    }

    /// Nothing installed yet, no successful poll.
    fn new(
        manager: String,
        secret: Option<String>,
        maps: MapHandle,
        refresh: Option<SyncSender<()>>,
        born: Instant,
    ) -> ManagerAccess {
        ManagerAccess {
            manager,
            secret,
            maps,
            index: RwLock::new(None),
            generation: AtomicU64::new(0),
            refresh,
            id: gateway_id(),
            revision: AtomicU64::new(0),
            last_ok_ms: AtomicU64::new(0),
            born,
            leaving: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Fetch the first snapshot (retrying until `deadline`), then follow
    /// the manager on a background thread.
    pub fn follow(
        manager: String,
        secret: String,
        maps: MapHandle,
        deadline: Instant,
    ) -> Result<Arc<ManagerAccess>, String> {
        let born = Instant::now();
        let first = loop {
            match fetch(&manager, &secret) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline || e.contains("cluster secret") => {
                    return Err(format!("fetching iSCSI access control from {manager}: {e}"));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "iSCSI access control not available yet");
                    std::thread::sleep(Duration::from_millis(STARTUP_RETRY_MS));
                }
            }
        };
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        let me = Arc::new(ManagerAccess::new(
            manager,
            Some(secret),
            maps,
            Some(tx),
            born,
        ));
        me.install(first);
        me.mark_ok(born);
        let weak = Arc::downgrade(&me);
        std::thread::Builder::new()
            .name("iscsi-access".into())
            .spawn(move || {
                // Long polls back to back: the manager answers at once
                // when the catalogue changed since the revision we hold
                // (a refresh asked meanwhile is covered by the next one).
                loop {
                    match rx.try_recv() {
                        Ok(()) | Err(mpsc::TryRecvError::Empty) => {}
                        Err(mpsc::TryRecvError::Disconnected) => return,
                    }
                    let Some(me) = weak.upgrade() else { return };
                    if me.leaving.load(Ordering::Acquire) {
                        return;
                    }
                    let secret = me.secret.as_deref().expect("following with a secret");
                    let sent = Instant::now();
                    let held = me.revision.load(Ordering::Acquire);
                    match fetch_after(&me.manager, secret, &me.id, held) {
                        Ok(s) => {
                            me.install(s);
                            me.mark_ok(sent);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "iSCSI access control refresh failed");
                            drop(me);
                            match rx.recv_timeout(Duration::from_millis(POLL_INTERVAL_MS)) {
                                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                                Err(RecvTimeoutError::Disconnected) => return,
                            }
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start the access follower thread: {e}"))?;
        Ok(me)
    }

    /// This gateway stops (its connections are closed): tell the manager,
    /// so no reservation change waits for its lease to run out. Polls stop
    /// first (one in flight may still register it again: a change then
    /// waits for the lease, as after a crash).
    pub fn leave(&self) {
        self.leaving.store(true, Ordering::Release);
        let Some(secret) = &self.secret else { return };
        let r = ureq::AgentBuilder::new()
            .timeout(Duration::from_millis(1000))
            .build()
            .delete(&url(
                &self.manager,
                &format!("/v1/iscsi/gateways/{}", self.id),
            ))
            .set("Authorization", &format!("Bearer {secret}"))
            .call();
        if let Err(e) = r {
            tracing::warn!(error = %reason(e), "could not tell the manager this gateway stops");
        }
    }

    /// A poll sent at `sent` succeeded: the lease runs from then.
    fn mark_ok(&self, sent: Instant) {
        let ms = sent.saturating_duration_since(self.born).as_millis() as u64 + 1;
        self.last_ok_ms.fetch_max(ms, Ordering::AcqRel);
    }

    fn install(&self, s: AccessSnapshot) {
        let revision = s.revision;
        let mut cur = self.index.write().expect("not poisoned");
        let changed = cur.as_ref().is_none_or(|old| {
            old.by_name.len() != s.volumes.len()
                || old.discovery_chap != s.discovery_chap
                || s.volumes
                    .iter()
                    .any(|v| old.by_name.get(&v.name) != Some(v))
        });
        if changed {
            let guarded = s.volumes.iter().filter(|v| !v.access.is_default()).count();
            tracing::info!(
                volumes = s.volumes.len(),
                with_acl_or_chap = guarded,
                discovery_chap = s.discovery_chap.is_some(),
                "iSCSI access control loaded"
            );
            *cur = Some(Arc::new(Index::new(s)));
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        drop(cur);
        // Only now: the manager takes the revision we report as enforced.
        self.revision.fetch_max(revision, Ordering::AcqRel);
    }

    fn current(&self) -> Option<Arc<Index>> {
        self.index.read().expect("not poisoned").clone()
    }

    fn map_id(&self, volume: &str) -> Option<u64> {
        self.maps.current().volume_by_name(volume).map(|v| v.id)
    }
}

impl Policy for ManagerAccess {
    fn discovery_chap(&self) -> Option<Chap> {
        self.current()?.discovery_chap.as_ref().map(login_chap)
    }

    fn access(&self, volume: &str, initiator: &str) -> Access {
        let a = decide(
            self.current().as_deref(),
            volume,
            self.map_id(volume),
            initiator,
        );
        if a == Access::Unavailable
            && let Some(r) = &self.refresh
        {
            // One pending request is enough.
            let _ = r.try_send(());
        }
        a
    }
}

/// Wait until every other gateway within its lease holds `revision` (the
/// manager's `GET /v1/iscsi/fenced`), at most `FENCE_WAIT_MS`; a gateway
/// that does not is past its lease by then and refuses what it could not
/// check, so this only logs.
fn wait_fenced(manager: &str, secret: &str, gateway: &str, revision: u64, volume: &str) {
    if revision == 0 {
        return; // an older manager: no fencing to wait for
    }
    let path =
        format!("/v1/iscsi/fenced?gateway={gateway}&revision={revision}&wait_ms={FENCE_WAIT_MS}");
    let r = ureq::AgentBuilder::new()
        .timeout(Duration::from_millis(FENCE_WAIT_MS + REQUEST_TIMEOUT_MS))
        .build()
        .get(&url(manager, &path))
        .set("Authorization", &format!("Bearer {secret}"))
        .call()
        .map_err(reason)
        .and_then(|r| {
            r.into_json::<FenceStatus>()
                .map_err(|e| format!("bad fence status: {e}"))
        });
    match r {
        Ok(f) if f.fenced => {}
        Ok(f) => {
            tracing::warn!(volume, lagging = ?f.lagging, "reservation change not yet held by every gateway")
        }
        Err(e) => tracing::warn!(volume, error = %e, "cannot wait for the other gateways"),
    }
}

/// A stored state as the gateway reads it.
fn parse_stored(volume: &str, version: u64, state: Option<serde_json::Value>) -> Stored {
    let state = match state.map(serde_json::from_value::<Reservations>) {
        None => Reservations::default(),
        Some(Ok(r)) => r,
        Some(Err(e)) => {
            tracing::error!(volume, error = %e, "stored reservation state is unreadable; using none");
            Reservations::default()
        }
    };
    Stored { version, state }
}

impl ManagerAccess {
    /// The snapshot's entry for `volume` if it is the volume the map has.
    fn entry(&self, volume: &str) -> Option<(Arc<Index>, u64)> {
        let index = self.current()?;
        let id = index.by_name.get(volume)?.id;
        (Some(id) == self.map_id(volume)).then_some((index, id))
    }
}

impl Persist for ManagerAccess {
    fn load(&self, volume: &str) -> Option<Stored> {
        let (index, _) = self.entry(volume)?;
        let e = &index.by_name[volume];
        Some(parse_stored(
            volume,
            e.reservations_version,
            e.reservations.clone(),
        ))
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn fresh(&self) -> bool {
        let last = self.last_ok_ms.load(Ordering::Acquire);
        last > 0 && (self.born.elapsed().as_millis() as u64) < last - 1 + LEASE_MS
    }

    fn newer(&self, volume: &str, version: u64) -> Option<Stored> {
        let (index, _) = self.entry(volume)?;
        let e = &index.by_name[volume];
        (e.reservations_version > version)
            .then(|| parse_stored(volume, e.reservations_version, e.reservations.clone()))
    }

    fn save(&self, volume: &str, expected: u64, state: &Reservations) -> SaveFuture {
        let (Some(secret), Some(volume_id)) = (self.secret.clone(), self.map_id(volume)) else {
            return Box::pin(async {
                Err(SaveError::Failed(
                    "no cluster secret or volume gone".to_string(),
                ))
            });
        };
        let body = ReservationState {
            volume_id,
            state: Some(serde_json::to_value(state).expect("reservations serialise")),
            expected_version: Some(expected),
        };
        let target = url(
            &self.manager,
            &format!("/v1/volumes/{volume}/iscsi/reservations"),
        );
        let name = volume.to_string();
        let (manager, gateway) = (self.manager.clone(), self.id.clone());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let r = agent()
                    .put(&target)
                    .set("Authorization", &format!("Bearer {secret}"))
                    .send_json(&body);
                match r {
                    Ok(resp) => {
                        let s = resp
                            .into_json::<StoredReservations>()
                            .map_err(|e| SaveError::Failed(e.to_string()))?;
                        // Answer once every other gateway enforces it.
                        wait_fenced(&manager, &secret, &gateway, s.revision, &name);
                        Ok(s.version)
                    }
                    Err(ureq::Error::Status(409, resp)) => match resp
                        .into_json::<StoredReservations>()
                    {
                        Ok(s) => Err(SaveError::Conflict(parse_stored(&name, s.version, s.state))),
                        // A 409 for a volume replaced under the same name.
                        Err(_) => Err(SaveError::Failed("volume replaced".into())),
                    },
                    Err(e) => Err(SaveError::Failed(reason(e))),
                }
            })
            .await
            .map_err(|e| SaveError::Failed(e.to_string()))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_wire::iscsi::{ChapSecrets, VolumeAccess};

    fn index() -> Index {
        let open = VolumeAccessEntry {
            id: 1,
            name: "open".into(),
            access: VolumeAccess::default(),
            reservations: None,
            reservations_version: 0,
        };
        let guarded = VolumeAccessEntry {
            id: 2,
            name: "guarded".into(),
            access: VolumeAccess {
                initiators: vec!["iqn.2000-01.x:good".into()],
                chap: Some(ChapSecrets {
                    user: "u".into(),
                    secret: "secret-of-u-1".into(),
                    mutual_user: Some("t".into()),
                    mutual_secret: Some("secret-of-t-1".into()),
                }),
            },
            reservations: None,
            reservations_version: 0,
        };
        Index::new(AccessSnapshot {
            volumes: vec![open, guarded],
            discovery_chap: None,
            revision: 1,
        })
    }

    // Proves the gateway's lease on its reservation state: none before a
    // successful poll, held for LEASE_MS after the last one was sent, and
    // lapsed after that.
    #[test]
    fn lease_runs_from_the_last_successful_poll() {
        let (maps, _tx) = MapHandle::fixed(crate::map::empty_map(1));
        let a = ManagerAccess::closed(maps);
        assert!(!a.fresh(), "no poll yet");
        a.mark_ok(Instant::now());
        assert!(a.fresh());
        let mut old = ManagerAccess::closed(a.maps.clone());
        let long_ago = Instant::now() - Duration::from_millis(LEASE_MS + 1000);
        Arc::get_mut(&mut old).expect("only owner").born = long_ago;
        old.mark_ok(long_ago);
        assert!(!old.fresh(), "lapsed");
        old.mark_ok(Instant::now());
        assert!(old.fresh(), "renewed");
    }

    // Proves the access decision: fails closed without a snapshot or for a
    // volume the snapshot is older than, refuses initiators outside a
    // non-empty ACL, admits everyone to an open volume, and hands the CHAP
    // credentials (both directions) to the login.
    #[test]
    fn decisions() {
        let i = index();
        assert_eq!(
            decide(None, "open", Some(1), "iqn.a:b"),
            Access::Unavailable
        );
        assert_eq!(decide(Some(&i), "gone", None, "iqn.a:b"), Access::NotFound);
        assert_eq!(
            decide(Some(&i), "new", Some(3), "iqn.a:b"),
            Access::Unavailable
        );
        assert_eq!(
            decide(Some(&i), "open", Some(9), "iqn.a:b"),
            Access::Unavailable
        );
        assert_eq!(
            decide(Some(&i), "open", Some(1), "iqn.a:b"),
            Access::Allowed(None)
        );
        assert_eq!(
            decide(Some(&i), "guarded", Some(2), "iqn.2000-01.x:bad"),
            Access::Denied
        );
        let Access::Allowed(Some(c)) = decide(Some(&i), "guarded", Some(2), "IQN.2000-01.X:GOOD")
        else {
            panic!("expected CHAP credentials")
        };
        assert_eq!(
            (c.user.as_str(), c.secret.as_slice()),
            ("u", &b"secret-of-u-1"[..])
        );
        assert_eq!(c.mutual, Some(("t".into(), b"secret-of-t-1".to_vec())));
    }
}
