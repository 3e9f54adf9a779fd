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
    AccessSnapshot, ChapSecrets, ReservationState, StoredReservations, VolumeAccessEntry,
};

/// How often the access snapshot is polled.
pub const POLL_INTERVAL_MS: u64 = 1000;
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
    agent()
        .get(&url(manager, "/v1/iscsi/access"))
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
        Arc::new(ManagerAccess {
            manager: String::new(),
            secret: None,
            maps,
            index: RwLock::new(None),
            generation: AtomicU64::new(0),
            refresh: None,
        })
    }

    /// Fetch the first snapshot (retrying until `deadline`), then follow
    /// the manager on a background thread.
    pub fn follow(
        manager: String,
        secret: String,
        maps: MapHandle,
        deadline: Instant,
    ) -> Result<Arc<ManagerAccess>, String> {
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
        let me = Arc::new(ManagerAccess {
            manager,
            secret: Some(secret),
            maps,
            index: RwLock::new(None),
            generation: AtomicU64::new(0),
            refresh: Some(tx),
        });
        me.install(first);
        let weak = Arc::downgrade(&me);
        std::thread::Builder::new()
            .name("iscsi-access".into())
            .spawn(move || {
                loop {
                    match rx.recv_timeout(Duration::from_millis(POLL_INTERVAL_MS)) {
                        Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                    let Some(me) = weak.upgrade() else { return };
                    let secret = me.secret.as_deref().expect("following with a secret");
                    match fetch(&me.manager, secret) {
                        Ok(s) => me.install(s),
                        Err(e) => tracing::warn!(error = %e, "iSCSI access control refresh failed"),
                    }
                }
            })
            .map_err(|e| format!("cannot start the access follower thread: {e}"))?;
        Ok(me)
    }

    fn install(&self, s: AccessSnapshot) {
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
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let r = agent()
                    .put(&target)
                    .set("Authorization", &format!("Bearer {secret}"))
                    .send_json(&body);
                match r {
                    Ok(resp) => resp
                        .into_json::<StoredReservations>()
                        .map(|s| s.version)
                        .map_err(|e| SaveError::Failed(e.to_string())),
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
        })
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
