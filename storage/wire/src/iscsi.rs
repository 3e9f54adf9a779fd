//! iSCSI access control as the manager keeps it and the gateways fetch it:
//! per-volume initiator ACLs (by iSCSI name) and CHAP credentials, plus the
//! persistent-reservation state a gateway stores in the manager so it
//! survives a gateway restart. JSON bodies of the routes in docs/api.md
//! ("iSCSI access").
//!
//! Secrets travel in exactly two bodies: [`SetChapRequest`] (operator to
//! manager) and [`AccessSnapshot`] (manager to gateway, behind the cluster
//! secret). Every answer meant for operators ([`IscsiAccessInfo`]) carries
//! user names only. `Debug` of every type holding a secret hides it, so a
//! secret cannot reach a log through `{:?}`.

use serde::{Deserialize, Serialize};

/// RFC 7143 §4.2.7.1: iSCSI names are at most 223 bytes.
pub const ISCSI_NAME_BYTES_MAX: usize = 223;
/// Initiators in one volume's ACL.
pub const INITIATORS_MAX: usize = 256;
/// CHAP user names and secrets: at most this many bytes (libiscsi and
/// open-iscsi keep them in 256-byte buffers).
pub const CHAP_FIELD_BYTES_MAX: usize = 255;
/// RFC 7143 §9.2.1 asks for CHAP secrets of at least 96 bits where the
/// login is not protected by IPsec; Windows' initiator refuses shorter ones.
pub const CHAP_SECRET_BYTES_MIN: usize = 12;
/// Largest persistent-reservation state a gateway may store per volume
/// (256 registrations of ~100 bytes fit several times over).
pub const RESERVATION_STATE_BYTES_MAX: usize = 256 * 1024;

/// CHAP credentials of one volume's target. `user`/`secret` authenticate
/// the initiator; `mutual_*` (both or neither) authenticate the target to
/// the initiator.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChapSecrets {
    pub user: String,
    pub secret: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutual_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutual_secret: Option<String>,
}

impl std::fmt::Debug for ChapSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapSecrets")
            .field("user", &self.user)
            .field("mutual_user", &self.mutual_user)
            .finish_non_exhaustive()
    }
}

/// `PUT /v1/volumes/{name}/iscsi/chap`.
pub type SetChapRequest = ChapSecrets;

impl ChapSecrets {
    /// Check lengths, characters and the mutual pair (RFC 7143 §12.1.3:
    /// the secret one side uses must not be the other side's).
    pub fn validate(&self) -> Result<(), String> {
        chap_user(&self.user, "user")?;
        chap_secret(&self.secret, "secret")?;
        match (&self.mutual_user, &self.mutual_secret) {
            (None, None) => Ok(()),
            (Some(u), Some(s)) => {
                chap_user(u, "mutual user")?;
                chap_secret(s, "mutual secret")?;
                if s == &self.secret {
                    return Err(
                        "the mutual secret must differ from the initiator's secret (RFC 7143 §12.1.3)"
                            .into(),
                    );
                }
                Ok(())
            }
            _ => Err("mutual CHAP needs both a mutual user and a mutual secret".into()),
        }
    }
}

fn chap_user(s: &str, what: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > CHAP_FIELD_BYTES_MAX {
        return Err(format!(
            "CHAP {what} must be 1 to {CHAP_FIELD_BYTES_MAX} bytes"
        ));
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "CHAP {what} must be printable ASCII without spaces"
        ));
    }
    Ok(())
}

fn chap_secret(s: &str, what: &str) -> Result<(), String> {
    // The value itself never goes into a message.
    if s.len() < CHAP_SECRET_BYTES_MIN || s.len() > CHAP_FIELD_BYTES_MAX {
        return Err(format!(
            "CHAP {what} must be {CHAP_SECRET_BYTES_MIN} to {CHAP_FIELD_BYTES_MAX} bytes"
        ));
    }
    if !s.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return Err(format!("CHAP {what} must be printable ASCII"));
    }
    Ok(())
}

/// Validate an initiator's iSCSI name (RFC 7143 §4.2.7: `iqn.`, `eui.` or
/// `naa.` format) and return it normalised to lower case (§4.2.7.2: names
/// are case-insensitive and compared after folding). Only ASCII letters,
/// digits, `.`, `-` and `:` are accepted.
pub fn normalize_initiator(name: &str) -> Result<String, String> {
    let n = name.to_ascii_lowercase();
    if n.len() > ISCSI_NAME_BYTES_MAX {
        return Err(format!(
            "iSCSI name longer than {ISCSI_NAME_BYTES_MAX} bytes"
        ));
    }
    let body = ["iqn.", "eui.", "naa."]
        .iter()
        .find_map(|p| n.strip_prefix(p))
        .ok_or_else(|| format!("bad iSCSI name {name:?}: must start with iqn., eui. or naa."))?;
    if body.is_empty()
        || !body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
    {
        return Err(format!(
            "bad iSCSI name {name:?}: use letters, digits, '.', '-' and ':'"
        ));
    }
    Ok(n)
}

/// What the catalogue keeps per volume.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VolumeAccess {
    /// Initiators allowed to log in, normalised and sorted. Empty: every
    /// initiator (that passes CHAP, when set).
    #[serde(default)]
    pub initiators: Vec<String>,
    #[serde(default)]
    pub chap: Option<ChapSecrets>,
}

impl VolumeAccess {
    /// Whether `initiator` passes the ACL.
    pub fn admits(&self, initiator: &str) -> bool {
        self.initiators.is_empty()
            || self
                .initiators
                .iter()
                .any(|i| i.eq_ignore_ascii_case(initiator))
    }

    pub fn is_default(&self) -> bool {
        self.initiators.is_empty() && self.chap.is_none()
    }
}

/// `POST /v1/volumes/{name}/iscsi/initiators`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddInitiatorRequest {
    pub iqn: String,
}

/// `GET /v1/volumes/{name}/iscsi` and the answer to every change: the ACL
/// and the CHAP user names, never the secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IscsiAccessInfo {
    pub volume: String,
    pub initiators: Vec<String>,
    pub chap_user: Option<String>,
    pub mutual_chap_user: Option<String>,
}

impl IscsiAccessInfo {
    pub fn of(volume: &str, a: &VolumeAccess) -> IscsiAccessInfo {
        IscsiAccessInfo {
            volume: volume.to_string(),
            initiators: a.initiators.clone(),
            chap_user: a.chap.as_ref().map(|c| c.user.clone()),
            mutual_chap_user: a.chap.as_ref().and_then(|c| c.mutual_user.clone()),
        }
    }
}

/// One volume in an [`AccessSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeAccessEntry {
    pub id: u64,
    pub name: String,
    #[serde(flatten)]
    pub access: VolumeAccess,
    /// The reservation state a gateway stored (see [`ReservationState`]);
    /// a gateway starts a volume's logical unit from it.
    #[serde(default)]
    pub reservations: Option<serde_json::Value>,
    /// Version of `reservations` (0: never stored); it grows by one with
    /// every store, so a gateway can tell a newer state from its own.
    #[serde(default)]
    pub reservations_version: u64,
}

/// `GET /v1/iscsi/access` (gateways only, behind the cluster secret):
/// every volume of the catalogue with its ACL and CHAP secrets. A volume
/// missing here is one the snapshot is older than.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AccessSnapshot {
    pub volumes: Vec<VolumeAccessEntry>,
    /// CHAP required of every discovery session (cluster-wide), if set.
    #[serde(default)]
    pub discovery_chap: Option<ChapSecrets>,
    /// Grows with every change of the catalogue: a gateway long-polls
    /// `GET /v1/iscsi/access?revision=` with the one it holds.
    #[serde(default)]
    pub revision: u64,
}

/// `GET /v1/iscsi/fenced?gateway=&revision=&wait_ms=`: whether every other
/// gateway that polled within the lease holds `revision` (or newer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceStatus {
    pub fenced: bool,
    /// Gateways within their lease that still hold an older revision.
    pub lagging: Vec<String>,
}

/// `GET`/`PUT`/`DELETE /v1/iscsi/discovery-chap`: user names only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoveryChapInfo {
    pub chap_user: Option<String>,
    pub mutual_chap_user: Option<String>,
}

impl DiscoveryChapInfo {
    pub fn of(c: Option<&ChapSecrets>) -> DiscoveryChapInfo {
        DiscoveryChapInfo {
            chap_user: c.map(|c| c.user.clone()),
            mutual_chap_user: c.and_then(|c| c.mutual_user.clone()),
        }
    }
}

/// `PUT /v1/volumes/{name}/iscsi/reservations` (gateways only): the
/// gateway's persistent-reservation state of a volume, opaque to the
/// manager. `volume_id` guards against a volume deleted and created again
/// under the same name between a gateway's read and its write;
/// `expected_version` makes the store a compare-and-swap, so gateways
/// serving the same volume cannot overwrite each other's changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationState {
    pub volume_id: u64,
    /// `None`: nothing stored yet.
    pub state: Option<serde_json::Value>,
    /// The version the new state was computed from: the store is refused
    /// (409, with the stored state) when the stored version differs.
    /// Absent: stored whatever the version.
    #[serde(default)]
    pub expected_version: Option<u64>,
}

/// The stored state and its version: the answer to a store (200: the new
/// version; 409: what is stored instead).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredReservations {
    pub version: u64,
    pub state: Option<serde_json::Value>,
    /// The catalogue revision once stored (`AccessSnapshot::revision`): the
    /// storing gateway waits for the others to hold it (`FenceStatus`).
    #[serde(default)]
    pub revision: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chap(user: &str, secret: &str) -> ChapSecrets {
        ChapSecrets {
            user: user.into(),
            secret: secret.into(),
            mutual_user: None,
            mutual_secret: None,
        }
    }

    // Proves CHAP validation: lengths, characters, the mutual pair and the
    // rule that the two directions use different secrets; and that Debug
    // never shows a secret.
    #[test]
    fn chap_validation() {
        assert!(chap("alice", "twelve-bytes").validate().is_ok());
        assert!(chap("", "twelve-bytes").validate().is_err());
        assert!(chap("al ice", "twelve-bytes").validate().is_err());
        assert!(chap("alice", "short").validate().is_err());
        assert!(chap("alice", &"x".repeat(256)).validate().is_err());
        assert!(chap("alice", "tab\tin-secret").validate().is_err());
        let mut m = chap("alice", "twelve-bytes");
        m.mutual_user = Some("target".into());
        assert!(m.validate().is_err(), "mutual user without secret");
        m.mutual_secret = Some("twelve-bytes".into());
        assert!(m.validate().is_err(), "same secret both ways");
        m.mutual_secret = Some("another-secret".into());
        assert!(m.validate().is_ok());
        let shown = format!("{m:?}");
        assert!(
            !shown.contains("twelve") && !shown.contains("another"),
            "{shown}"
        );
        let err = chap("alice", "sh0rt-secret!!".repeat(20).as_str())
            .validate()
            .unwrap_err();
        assert!(!err.contains("sh0rt"), "{err}");
    }

    // Proves iSCSI names are normalised to lower case and checked for
    // their prefix, characters and length; the ACL compares folded names
    // and an empty ACL admits everyone.
    #[test]
    fn initiator_names() {
        assert_eq!(
            normalize_initiator("iqn.1994-05.com.RedHat:Host1").unwrap(),
            "iqn.1994-05.com.redhat:host1"
        );
        assert!(normalize_initiator("eui.02004567A425678D").is_ok());
        assert!(normalize_initiator("naa.52004567BA64678D").is_ok());
        for bad in ["", "iqn.", "host1", "iqn.a b", "iqn.a/b", "iqn.é"] {
            assert!(normalize_initiator(bad).is_err(), "{bad:?}");
        }
        assert!(normalize_initiator(&format!("iqn.{}", "a".repeat(220))).is_err());
        let mut a = VolumeAccess::default();
        assert!(a.admits("iqn.x:any") && a.is_default());
        a.initiators.push("iqn.x:one".into());
        assert!(a.admits("IQN.X:ONE"));
        assert!(!a.admits("iqn.x:two"));
    }
}
