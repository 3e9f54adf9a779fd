//! iSCSI access control (per-volume initiator ACLs and CHAP credentials)
//! and the persistent-reservation state gateways keep here, as pure rules
//! over the catalogue, plus the [`Manager`] operations the API calls.
//!
//! Where this lives and why: not in the cluster map. The map is served
//! without authentication to every storage daemon and gateway and says
//! where data is; CHAP secrets must reach only gateways. Gateways fetch
//! [`AccessSnapshot`] from a route that requires the cluster secret
//! (`GET /v1/iscsi/access`, see docs/api.md), and store reservation state
//! through another (`PUT .../iscsi/reservations`). None of these changes
//! touches the map, so none bumps the epoch.
//!
//! Secrets are written to the catalogue (redb, in the manager's data
//! directory) because CHAP needs them in clear on both ends; they never
//! appear in logs, metrics or operator-facing answers.

use crate::daemon::{ApiError, Manager};
use crate::store::Catalog;
use tessera_wire::iscsi::{
    AccessSnapshot, AddInitiatorRequest, ChapSecrets, DiscoveryChapInfo, INITIATORS_MAX,
    IscsiAccessInfo, RESERVATION_STATE_BYTES_MAX, ReservationState, StoredReservations,
    VolumeAccess, VolumeAccessEntry, normalize_initiator,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("volume {0:?} not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{iqn} is not in the ACL of volume {volume:?}")]
    NotInAcl { volume: String, iqn: String },
    #[error("the ACL of volume {0:?} already has {INITIATORS_MAX} initiators")]
    AclFull(String),
    #[error("volume {name:?} is now volume id {id}, not {asked}")]
    Replaced { name: String, id: u64, asked: u64 },
    #[error("reservation state larger than {RESERVATION_STATE_BYTES_MAX} bytes")]
    TooLarge,
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        let status = match e {
            Error::NotFound(_) | Error::NotInAcl { .. } => 404,
            Error::Invalid(_) => 400,
            Error::AclFull(_) | Error::Replaced { .. } => 409,
            Error::TooLarge => 413,
        };
        ApiError::new(status, e.to_string())
    }
}

fn volume_id(c: &Catalog, name: &str) -> Result<u64, Error> {
    c.volumes
        .iter()
        .find(|v| v.name == name)
        .map(|v| v.id)
        .ok_or_else(|| Error::NotFound(name.to_string()))
}

fn access_of(c: &Catalog, id: u64) -> VolumeAccess {
    c.iscsi_access.get(&id).cloned().unwrap_or_default()
}

/// Store `a` for volume `id`, dropping the entry when it says nothing.
fn put(c: &mut Catalog, id: u64, a: VolumeAccess) {
    if a.is_default() {
        c.iscsi_access.remove(&id);
    } else {
        c.iscsi_access.insert(id, a);
    }
}

pub fn info(c: &Catalog, name: &str) -> Result<IscsiAccessInfo, Error> {
    let id = volume_id(c, name)?;
    Ok(IscsiAccessInfo::of(name, &access_of(c, id)))
}

/// Add `iqn` to the volume's ACL; returns the new state and whether it
/// changed (adding a present name is not an error).
pub fn add_initiator(
    c: &mut Catalog,
    name: &str,
    iqn: &str,
) -> Result<(IscsiAccessInfo, bool), Error> {
    let id = volume_id(c, name)?;
    let iqn = normalize_initiator(iqn).map_err(Error::Invalid)?;
    let mut a = access_of(c, id);
    let changed = match a.initiators.binary_search(&iqn) {
        Ok(_) => false,
        Err(at) => {
            if a.initiators.len() >= INITIATORS_MAX {
                return Err(Error::AclFull(name.to_string()));
            }
            a.initiators.insert(at, iqn);
            true
        }
    };
    let out = IscsiAccessInfo::of(name, &a);
    put(c, id, a);
    Ok((out, changed))
}

pub fn remove_initiator(c: &mut Catalog, name: &str, iqn: &str) -> Result<IscsiAccessInfo, Error> {
    let id = volume_id(c, name)?;
    let iqn = normalize_initiator(iqn).map_err(Error::Invalid)?;
    let mut a = access_of(c, id);
    let at = a
        .initiators
        .binary_search(&iqn)
        .map_err(|_| Error::NotInAcl {
            volume: name.to_string(),
            iqn: iqn.clone(),
        })?;
    a.initiators.remove(at);
    let out = IscsiAccessInfo::of(name, &a);
    put(c, id, a);
    Ok(out)
}

pub fn set_chap(c: &mut Catalog, name: &str, chap: ChapSecrets) -> Result<IscsiAccessInfo, Error> {
    let id = volume_id(c, name)?;
    chap.validate().map_err(Error::Invalid)?;
    let mut a = access_of(c, id);
    a.chap = Some(chap);
    let out = IscsiAccessInfo::of(name, &a);
    put(c, id, a);
    Ok(out)
}

/// Remove CHAP; returns whether there was any.
pub fn clear_chap(c: &mut Catalog, name: &str) -> Result<(IscsiAccessInfo, bool), Error> {
    let id = volume_id(c, name)?;
    let mut a = access_of(c, id);
    let had = a.chap.take().is_some();
    let out = IscsiAccessInfo::of(name, &a);
    put(c, id, a);
    Ok((out, had))
}

/// Every volume with its access control and reservation state, by name.
pub fn snapshot(c: &Catalog) -> AccessSnapshot {
    let mut volumes: Vec<VolumeAccessEntry> = c
        .volumes
        .iter()
        .map(|v| VolumeAccessEntry {
            id: v.id,
            name: v.name.clone(),
            access: access_of(c, v.id),
            reservations: c.iscsi_reservations.get(&v.id).cloned(),
            reservations_version: c
                .iscsi_reservation_versions
                .get(&v.id)
                .copied()
                .unwrap_or(0),
        })
        .collect();
    volumes.sort_by(|a, b| a.name.cmp(&b.name));
    AccessSnapshot {
        volumes,
        discovery_chap: c.iscsi_discovery_chap.clone(),
        revision: 0,
    }
}

/// Require (`Some`) or stop requiring (`None`) CHAP for discovery sessions;
/// returns whether anything changed.
pub fn set_discovery_chap(c: &mut Catalog, chap: Option<ChapSecrets>) -> Result<bool, Error> {
    if let Some(x) = &chap {
        x.validate().map_err(Error::Invalid)?;
    }
    let changed = c.iscsi_discovery_chap != chap;
    c.iscsi_discovery_chap = chap;
    Ok(changed)
}

/// Replace a volume's reservation state if `expected_version` (when
/// given) is the stored version: `Ok(Ok(new))` and whether the catalogue
/// changed, or `Ok(Err(stored))` when another writer got there first.
#[allow(clippy::type_complexity)]
pub fn store_reservations(
    c: &mut Catalog,
    name: &str,
    req: ReservationState,
) -> Result<(Result<StoredReservations, StoredReservations>, bool), Error> {
    let id = volume_id(c, name)?;
    if id != req.volume_id {
        return Err(Error::Replaced {
            name: name.to_string(),
            id,
            asked: req.volume_id,
        });
    }
    if let Some(s) = &req.state {
        let len = serde_json::to_vec(s).map(|v| v.len()).unwrap_or(usize::MAX);
        if len > RESERVATION_STATE_BYTES_MAX {
            return Err(Error::TooLarge);
        }
    }
    let version = c.iscsi_reservation_versions.get(&id).copied().unwrap_or(0);
    let old = c.iscsi_reservations.get(&id).cloned();
    if req.expected_version.is_some_and(|v| v != version) {
        return Ok((
            Err(StoredReservations {
                version,
                state: old,
                revision: 0,
            }),
            false,
        ));
    }
    if old == req.state {
        return Ok((
            Ok(StoredReservations {
                version,
                state: old,
                revision: 0,
            }),
            false,
        ));
    }
    match &req.state {
        Some(s) => c.iscsi_reservations.insert(id, s.clone()),
        None => c.iscsi_reservations.remove(&id),
    };
    c.iscsi_reservation_versions.insert(id, version + 1);
    Ok((
        Ok(StoredReservations {
            version: version + 1,
            state: req.state,
            revision: 0,
        }),
        true,
    ))
}

/// A deleted volume takes its access control and reservations with it.
pub fn forget_volume(c: &mut Catalog, id: u64) {
    c.iscsi_access.remove(&id);
    c.iscsi_reservations.remove(&id);
    c.iscsi_reservation_versions.remove(&id);
}

impl Manager {
    pub fn iscsi_access(&self, name: &str) -> Result<IscsiAccessInfo, ApiError> {
        Ok(self.read_catalog(|c| info(c, name))?)
    }

    pub fn iscsi_add_initiator(
        &self,
        name: &str,
        req: AddInitiatorRequest,
    ) -> Result<IscsiAccessInfo, ApiError> {
        let out = self.update_catalog(|c| Ok(add_initiator(c, name, &req.iqn)?))?;
        tracing::info!(volume = name, initiator = %req.iqn, "iSCSI ACL: initiator added");
        Ok(out)
    }

    pub fn iscsi_remove_initiator(
        &self,
        name: &str,
        iqn: &str,
    ) -> Result<IscsiAccessInfo, ApiError> {
        let out = self.update_catalog(|c| Ok((remove_initiator(c, name, iqn)?, true)))?;
        tracing::info!(
            volume = name,
            initiator = iqn,
            "iSCSI ACL: initiator removed"
        );
        Ok(out)
    }

    pub fn iscsi_set_chap(
        &self,
        name: &str,
        req: ChapSecrets,
    ) -> Result<IscsiAccessInfo, ApiError> {
        let (user, mutual) = (req.user.clone(), req.mutual_user.clone());
        let out = self.update_catalog(|c| Ok((set_chap(c, name, req)?, true)))?;
        // User names only: the secrets are never logged.
        tracing::info!(volume = name, %user, mutual_user = ?mutual, "iSCSI CHAP set");
        Ok(out)
    }

    pub fn iscsi_clear_chap(&self, name: &str) -> Result<IscsiAccessInfo, ApiError> {
        let out = self.update_catalog(|c| Ok(clear_chap(c, name)?))?;
        tracing::info!(volume = name, "iSCSI CHAP cleared");
        Ok(out)
    }

    pub fn iscsi_discovery_chap(&self) -> DiscoveryChapInfo {
        self.read_catalog(|c| DiscoveryChapInfo::of(c.iscsi_discovery_chap.as_ref()))
    }

    pub fn iscsi_set_discovery_chap(
        &self,
        chap: Option<ChapSecrets>,
    ) -> Result<DiscoveryChapInfo, ApiError> {
        let out = DiscoveryChapInfo::of(chap.as_ref());
        self.update_catalog(|c| Ok(((), set_discovery_chap(c, chap)?)))?;
        tracing::info!(user = ?out.chap_user, mutual_user = ?out.mutual_chap_user, "iSCSI discovery CHAP set");
        Ok(out)
    }

    /// For gateways (the API checks the cluster secret).
    pub fn iscsi_snapshot(&self) -> AccessSnapshot {
        self.iscsi_snapshot_after(None, 0, std::time::Duration::ZERO)
    }

    /// A gateway's long poll: `gateway` holds `revision`; the snapshot as
    /// soon as the catalogue is newer, or after `wait`.
    pub fn iscsi_snapshot_after(
        &self,
        gateway: Option<&str>,
        revision: u64,
        wait: std::time::Duration,
    ) -> AccessSnapshot {
        self.access_after(gateway, revision, wait, |c, rev| AccessSnapshot {
            revision: rev,
            ..snapshot(c)
        })
    }

    /// A gateway stopping: no reservation change waits for it any more.
    pub fn iscsi_gateway_left(&self, gateway: &str) {
        self.forget_gateway(gateway);
        tracing::info!(gateway, "iSCSI gateway left");
    }

    /// For a gateway that stored a reservation change: wait up to `wait`
    /// for every other gateway within its lease to hold `revision`.
    pub fn iscsi_fenced(
        &self,
        gateway: &str,
        revision: u64,
        wait: std::time::Duration,
    ) -> tessera_wire::iscsi::FenceStatus {
        let lagging = self.fenced(gateway, revision, wait);
        if !lagging.is_empty() {
            tracing::warn!(
                ?lagging,
                revision,
                "gateways did not take a reservation change in time"
            );
        }
        tessera_wire::iscsi::FenceStatus {
            fenced: lagging.is_empty(),
            lagging,
        }
    }

    /// For gateways: persist a volume's reservation state before the
    /// gateway answers the PERSISTENT RESERVE OUT that changed it.
    #[allow(clippy::type_complexity)]
    pub fn iscsi_store_reservations(
        &self,
        name: &str,
        req: ReservationState,
    ) -> Result<Result<StoredReservations, StoredReservations>, ApiError> {
        let stored = self.update_catalog(|c| Ok(store_reservations(c, name, req)?))?;
        let revision = self.revision();
        Ok(stored
            .map(|s| StoredReservations { revision, ..s })
            .map_err(|s| StoredReservations { revision, ..s }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_wire::map::VolumeEntry;

    fn catalog() -> Catalog {
        let mut c = Catalog::new(4);
        for (id, name) in [(1, "a"), (2, "b")] {
            c.volumes.push(VolumeEntry {
                id,
                name: name.into(),
                size_bytes: 1 << 30,
                chunk_size_bytes: 4 << 20,
                block_size: 512,
                pool_id: 1,
            });
        }
        c
    }

    fn chap() -> ChapSecrets {
        ChapSecrets {
            user: "u".into(),
            secret: "secret-of-u-1".into(),
            mutual_user: None,
            mutual_secret: None,
        }
    }

    // Proves ACL edits: names normalised and kept sorted, adding twice is
    // not a change, removing an absent name is 404, bad names are 400, and
    // an empty entry disappears from the catalogue.
    #[test]
    fn acl_edits() {
        let mut c = catalog();
        let (i, changed) = add_initiator(&mut c, "a", "IQN.2000-01.x:Two").unwrap();
        assert!(changed);
        assert_eq!(i.initiators, vec!["iqn.2000-01.x:two"]);
        add_initiator(&mut c, "a", "iqn.2000-01.x:one").unwrap();
        let (i, changed) = add_initiator(&mut c, "a", "iqn.2000-01.x:one").unwrap();
        assert!(!changed);
        assert_eq!(i.initiators, vec!["iqn.2000-01.x:one", "iqn.2000-01.x:two"]);
        let e = add_initiator(&mut c, "a", "host1").unwrap_err();
        assert_eq!(ApiError::from(e).status, 400);
        let e = add_initiator(&mut c, "zz", "iqn.2000-01.x:one").unwrap_err();
        assert_eq!(ApiError::from(e).status, 404);
        let e = remove_initiator(&mut c, "a", "iqn.2000-01.x:three").unwrap_err();
        assert_eq!(ApiError::from(e).status, 404);
        remove_initiator(&mut c, "a", "iqn.2000-01.x:ONE").unwrap();
        remove_initiator(&mut c, "a", "iqn.2000-01.x:two").unwrap();
        assert!(c.iscsi_access.is_empty());
    }

    // Proves CHAP is validated, answers carry user names only, the
    // snapshot carries the secrets and lists every volume, and deleting a
    // volume forgets its access control and reservations.
    #[test]
    fn chap_snapshot_and_forget() {
        let mut c = catalog();
        let mut bad = chap();
        bad.secret = "short".into();
        assert_eq!(
            ApiError::from(set_chap(&mut c, "a", bad).unwrap_err()).status,
            400
        );
        let i = set_chap(&mut c, "a", chap()).unwrap();
        assert_eq!(i.chap_user.as_deref(), Some("u"));
        let shown = serde_json::to_string(&i).unwrap();
        assert!(!shown.contains("secret-of-u"), "{shown}");
        let s = snapshot(&c);
        assert_eq!(s.volumes.len(), 2);
        assert_eq!(s.volumes[0].access.chap, Some(chap()));
        assert_eq!(s.volumes[1].access, VolumeAccess::default());
        let st = ReservationState {
            volume_id: 1,
            state: Some(serde_json::json!({"generation": 3})),
            expected_version: Some(0),
        };
        let (r, changed) = store_reservations(&mut c, "a", st.clone()).unwrap();
        assert_eq!((r.unwrap().version, changed), (1, true));
        // The same expected version again: someone else's store won.
        let (r, changed) = store_reservations(&mut c, "a", st.clone()).unwrap();
        assert_eq!(r.unwrap_err().version, 1);
        assert!(!changed);
        let again = ReservationState {
            expected_version: Some(1),
            ..st.clone()
        };
        let (r, changed) = store_reservations(&mut c, "a", again).unwrap();
        assert_eq!((r.unwrap().version, changed), (1, false));
        assert_eq!(snapshot(&c).volumes[0].reservations, st.state);
        assert_eq!(snapshot(&c).volumes[0].reservations_version, 1);
        let wrong = ReservationState { volume_id: 2, ..st };
        assert_eq!(
            ApiError::from(store_reservations(&mut c, "a", wrong).unwrap_err()).status,
            409
        );
        let (_, had) = clear_chap(&mut c, "a").unwrap();
        assert!(had);
        set_chap(&mut c, "a", chap()).unwrap();
        forget_volume(&mut c, 1);
        // Discovery CHAP: validated, in the snapshot, cleared.
        let mut bad = chap();
        bad.secret = "short".into();
        assert!(set_discovery_chap(&mut c, Some(bad)).is_err());
        assert!(set_discovery_chap(&mut c, Some(chap())).unwrap());
        assert!(!set_discovery_chap(&mut c, Some(chap())).unwrap());
        assert_eq!(snapshot(&c).discovery_chap, Some(chap()));
        assert!(set_discovery_chap(&mut c, None).unwrap());
        assert_eq!(snapshot(&c).discovery_chap, None);
        assert!(c.iscsi_access.is_empty() && c.iscsi_reservations.is_empty());
    }

    // Proves a catalogue written before iSCSI access control existed loads
    // with none (the fields default).
    #[test]
    fn old_catalogue_loads() {
        let mut v = serde_json::to_value(catalog()).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("iscsi_access");
        o.remove("iscsi_reservations");
        let c: Catalog = serde_json::from_value(v).unwrap();
        assert!(c.iscsi_access.is_empty());
    }
}
