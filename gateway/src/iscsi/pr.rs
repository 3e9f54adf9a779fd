//! Reservations of one logical unit: SPC-4 persistent reservations
//! (§5.12, PERSISTENT RESERVE IN/OUT §6.15/§6.16) and SPC-2 RESERVE /
//! RELEASE. Pure: commands in, new state plus the answer out.
//!
//! An I_T nexus is named by the iSCSI initiator port name
//! "<InitiatorName>,i,0x<ISID>" (RFC 7143 §4.2.7.1); the target has one
//! port. REGISTER AND MOVE, SPEC_I_PT and APTPL are not offered (REPORT
//! CAPABILITIES says so). The state is `serde`-serialisable so the manager
//! can keep it across gateway restarts.

use super::scsi::{Access, Sense, asc};
use serde::{Deserialize, Serialize};

/// Registrations per logical unit.
pub const REGISTRATIONS_MAX: usize = 256;
/// PR OUT parameter list without SPEC_I_PT (SPC-4 §6.16.3).
pub const PR_OUT_PARAMETER_BYTES: u32 = 24;

pub mod kind {
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 3;
    pub const WRITE_EXCLUSIVE_RO: u8 = 5;
    pub const EXCLUSIVE_ACCESS_RO: u8 = 6;
    pub const WRITE_EXCLUSIVE_AR: u8 = 7;
    pub const EXCLUSIVE_ACCESS_AR: u8 = 8;
}

fn valid_kind(k: u8) -> bool {
    matches!(k, 1 | 3 | 5 | 6 | 7 | 8)
}
fn all_registrants(k: u8) -> bool {
    matches!(k, kind::WRITE_EXCLUSIVE_AR | kind::EXCLUSIVE_ACCESS_AR)
}
fn registrants_only(k: u8) -> bool {
    matches!(k, 5..=8)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub nexus: String,
    pub key: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Reservations {
    pub generation: u32,
    pub registrations: Vec<Registration>,
    /// Persistent reservation: holder nexus and type.
    pub holder: Option<(String, u8)>,
    /// SPC-2 RESERVE holder (not persistent: cleared by reset and logout).
    #[serde(skip)]
    pub spc2: Option<String>,
}

/// Why a reservation command did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Conflict,
    Sense(Sense),
}

impl Reservations {
    fn key_of(&self, nexus: &str) -> Option<u64> {
        self.registrations
            .iter()
            .find(|r| r.nexus == nexus)
            .map(|r| r.key)
    }

    fn is_holder(&self, nexus: &str) -> bool {
        match &self.holder {
            Some((h, k)) => {
                if all_registrants(*k) {
                    self.key_of(nexus).is_some()
                } else {
                    h == nexus
                }
            }
            None => false,
        }
    }

    /// Whether `nexus` may run a command of class `access` now (SPC-4
    /// §5.12.1 table 49; SPC-2 reservations conflict with everything but
    /// the commands that are always allowed).
    pub fn allows(&self, nexus: &str, access: Access) -> bool {
        if let Some(h) = &self.spc2
            && h != nexus
            && access != Access::Always
        {
            return false;
        }
        let Some((_, k)) = &self.holder else {
            return true;
        };
        if access == Access::Always || access == Access::Reservation || self.is_holder(nexus) {
            return true;
        }
        let registered = self.key_of(nexus).is_some();
        let exclusive_access = matches!(
            *k,
            kind::EXCLUSIVE_ACCESS | kind::EXCLUSIVE_ACCESS_RO | kind::EXCLUSIVE_ACCESS_AR
        );
        if registrants_only(*k) && registered {
            return true;
        }
        match access {
            Access::Read | Access::Meta => !exclusive_access,
            _ => false,
        }
    }

    pub fn reserve_spc2(&mut self, nexus: &str) -> Result<(), Refusal> {
        if self.holder.is_some() {
            return Err(Refusal::Conflict);
        }
        match &self.spc2 {
            Some(h) if h != nexus => Err(Refusal::Conflict),
            _ => {
                self.spc2 = Some(nexus.to_string());
                Ok(())
            }
        }
    }

    pub fn release_spc2(&mut self, nexus: &str) -> Result<(), Refusal> {
        if self.holder.is_some() {
            return Err(Refusal::Conflict);
        }
        if self.spc2.as_deref() == Some(nexus) {
            self.spc2 = None;
        }
        Ok(())
    }

    /// The I_T nexus ended (logout, connection loss): SPC-2 reservations go.
    pub fn nexus_lost(&mut self, nexus: &str) {
        if self.spc2.as_deref() == Some(nexus) {
            self.spc2 = None;
        }
    }

    /// Whether any I_T nexus is registered (a reservation can fence only
    /// then).
    pub fn has_registrations(&self) -> bool {
        !self.registrations.is_empty()
    }

    /// Whether the persistent part (what is serialised) equals `other`'s.
    pub fn same_persistent(&self, other: &Reservations) -> bool {
        self.generation == other.generation
            && self.registrations == other.registrations
            && self.holder == other.holder
    }

    /// Take the persistent part of `next` (computed from a copy of this
    /// state and stored elsewhere), keeping this state's SPC-2 holder.
    pub fn adopt_persistent(&mut self, next: Reservations) {
        self.generation = next.generation;
        self.registrations = next.registrations;
        self.holder = next.holder;
    }

    /// LUN or target reset: SPC-2 reservations go; persistent ones stay.
    pub fn reset(&mut self) {
        self.spc2 = None;
    }

    /// PERSISTENT RESERVE IN data (SPC-4 §6.15).
    pub fn read(&self, action: u8, tpgt_transport: impl Fn(&str) -> Vec<u8>) -> Vec<u8> {
        let mut d = self.generation.to_be_bytes().to_vec();
        match action {
            0 => {
                let keys: Vec<u8> = self
                    .registrations
                    .iter()
                    .flat_map(|r| r.key.to_be_bytes())
                    .collect();
                d.extend_from_slice(&(keys.len() as u32).to_be_bytes());
                d.extend(keys);
            }
            1 => match &self.holder {
                None => d.extend_from_slice(&0u32.to_be_bytes()),
                Some((h, k)) => {
                    d.extend_from_slice(&16u32.to_be_bytes());
                    let key = if all_registrants(*k) {
                        0
                    } else {
                        self.key_of(h).unwrap_or(0)
                    };
                    d.extend_from_slice(&key.to_be_bytes());
                    d.extend_from_slice(&[0, 0, 0, 0, 0, *k, 0, 0]);
                }
            },
            2 => {
                // REPORT CAPABILITIES (§6.15.4): length 8; CRH=1 (RESERVE
                // conflicts under PR), ATP_C=1; TMV=1 with the type mask.
                d = vec![
                    0,
                    8,
                    0x10 | 0x04,
                    0x80,
                    0x80 | 0x40 | 0x20 | 0x08 | 0x02,
                    0x01,
                    0,
                    0,
                ];
            }
            _ => {
                let mut body = Vec::new();
                for r in &self.registrations {
                    body.extend_from_slice(&r.key.to_be_bytes());
                    body.extend_from_slice(&[0; 4]);
                    let holder = self.is_holder(&r.nexus);
                    body.push(0x02 | if holder { 0x01 } else { 0 });
                    body.push(if holder {
                        self.holder.as_ref().map_or(0, |(_, k)| *k)
                    } else {
                        0
                    });
                    body.extend_from_slice(&[0; 4]);
                    body.extend_from_slice(&1u16.to_be_bytes()); // relative target port
                    let tid = tpgt_transport(&r.nexus);
                    body.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                    body.extend(tid);
                }
                d.extend_from_slice(&(body.len() as u32).to_be_bytes());
                d.extend(body);
            }
        }
        d
    }

    /// PERSISTENT RESERVE OUT (SPC-4 §6.16, §5.12.5-§5.12.11).
    pub fn out(
        &mut self,
        nexus: &str,
        action: u8,
        scope: u8,
        k: u8,
        params: &[u8],
    ) -> Result<(), Refusal> {
        let bad_list = Refusal::Sense(Sense::illegal(asc::INVALID_FIELD_IN_PARAMETER_LIST));
        let bad_cdb = Refusal::Sense(Sense::invalid_cdb());
        if action == 7 {
            return Err(bad_cdb); // REGISTER AND MOVE not offered
        }
        if params.len() != PR_OUT_PARAMETER_BYTES as usize {
            return Err(Refusal::Sense(Sense::illegal(
                asc::PARAMETER_LIST_LENGTH_ERROR,
            )));
        }
        let res_key = u64::from_be_bytes(params[0..8].try_into().expect("8"));
        let sa_key = u64::from_be_bytes(params[8..16].try_into().expect("8"));
        let flags = params[20];
        // SPEC_I_PT and APTPL are not offered (REPORT CAPABILITIES).
        if flags & 0x08 != 0 || flags & 0x01 != 0 {
            return Err(bad_list);
        }
        if self.spc2.as_ref().is_some_and(|h| h != nexus) {
            return Err(Refusal::Conflict);
        }
        let mine = self.key_of(nexus);
        match action {
            0 | 6 => {
                match mine {
                    None => {
                        if action == 0 && res_key != 0 {
                            return Err(Refusal::Conflict);
                        }
                        if sa_key == 0 {
                            return Ok(());
                        }
                        if self.registrations.len() >= REGISTRATIONS_MAX {
                            return Err(Refusal::Sense(Sense::illegal(
                                asc::INSUFFICIENT_REGISTRATION_RESOURCES,
                            )));
                        }
                        self.registrations.push(Registration {
                            nexus: nexus.to_string(),
                            key: sa_key,
                        });
                    }
                    Some(key) => {
                        if action == 0 && res_key != key {
                            return Err(Refusal::Conflict);
                        }
                        if sa_key == 0 {
                            self.unregister(nexus);
                        } else {
                            for r in &mut self.registrations {
                                if r.nexus == nexus {
                                    r.key = sa_key;
                                }
                            }
                        }
                    }
                }
                self.generation = self.generation.wrapping_add(1);
                Ok(())
            }
            1 => {
                if mine != Some(res_key) {
                    return Err(Refusal::Conflict);
                }
                if scope != 0 || !valid_kind(k) {
                    return Err(bad_cdb);
                }
                match &self.holder {
                    None => {
                        self.holder = Some((nexus.to_string(), k));
                        Ok(())
                    }
                    Some((_, hk)) if self.is_holder(nexus) && *hk == k => Ok(()),
                    Some(_) => Err(Refusal::Conflict),
                }
            }
            2 => {
                if mine != Some(res_key) {
                    return Err(Refusal::Conflict);
                }
                let Some((_, hk)) = self.holder.clone() else {
                    return Ok(());
                };
                if !self.is_holder(nexus) {
                    return Ok(());
                }
                if scope != 0 || hk != k {
                    return Err(Refusal::Sense(Sense::illegal(asc::INVALID_RELEASE_OF_PR)));
                }
                self.holder = None;
                Ok(())
            }
            3 => {
                if mine != Some(res_key) {
                    return Err(Refusal::Conflict);
                }
                self.registrations.clear();
                self.holder = None;
                self.generation = self.generation.wrapping_add(1);
                Ok(())
            }
            4 | 5 => {
                if mine != Some(res_key) {
                    return Err(Refusal::Conflict);
                }
                match self.holder.clone() {
                    Some((_, hk)) if all_registrants(hk) => {
                        if sa_key == 0 {
                            if scope != 0 || !valid_kind(k) {
                                return Err(bad_cdb);
                            }
                            self.registrations.retain(|r| r.nexus == nexus);
                            self.holder = Some((nexus.to_string(), k));
                        } else if !self.remove_key(sa_key, nexus) {
                            return Err(Refusal::Conflict);
                        }
                    }
                    Some((h, _)) if self.key_of(&h) == Some(sa_key) => {
                        if scope != 0 || !valid_kind(k) {
                            return Err(bad_cdb);
                        }
                        self.remove_key(sa_key, nexus);
                        self.holder = Some((nexus.to_string(), k));
                    }
                    _ => {
                        if sa_key == 0 {
                            return Err(bad_list);
                        }
                        if !self.remove_key(sa_key, nexus) {
                            return Err(Refusal::Conflict);
                        }
                    }
                }
                self.generation = self.generation.wrapping_add(1);
                Ok(())
            }
            _ => Err(bad_cdb),
        }
    }

    /// Remove registrations with `key` other than `keep`'s; true if any.
    fn remove_key(&mut self, key: u64, keep: &str) -> bool {
        let before = self.registrations.len();
        let holder_removed: Vec<String> = self
            .registrations
            .iter()
            .filter(|r| r.key == key && r.nexus != keep)
            .map(|r| r.nexus.clone())
            .collect();
        self.registrations
            .retain(|r| !(r.key == key && r.nexus != keep));
        if let Some((h, k)) = &self.holder
            && !all_registrants(*k)
            && holder_removed.contains(h)
        {
            self.holder = None;
        }
        before != self.registrations.len()
    }

    fn unregister(&mut self, nexus: &str) {
        self.registrations.retain(|r| r.nexus != nexus);
        if let Some((h, k)) = &self.holder {
            let gone = if all_registrants(*k) {
                self.registrations.is_empty()
            } else {
                h == nexus
            };
            if gone {
                self.holder = None;
            }
        }
    }
}

/// iSCSI TransportID (SPC-4 §7.6.4.6, format 01b with ISID) of a nexus
/// named "<iqn>,i,0x<isid>".
pub fn transport_id(nexus: &str) -> Vec<u8> {
    let mut name = nexus.as_bytes().to_vec();
    name.push(0);
    while !name.len().is_multiple_of(4) {
        name.push(0);
    }
    let mut d = vec![0x40 | 0x05, 0];
    d.extend_from_slice(&(name.len() as u16).to_be_bytes());
    d.extend(name);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(res: u64, sa: u64) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&res.to_be_bytes());
        p[8..16].copy_from_slice(&sa.to_be_bytes());
        p
    }

    // Proves register / reserve / access / release for Write Exclusive.
    #[test]
    fn register_reserve_release() {
        let mut r = Reservations::default();
        assert_eq!(r.out("a", 0, 0, 0, &params(1, 5)), Err(Refusal::Conflict));
        r.out("a", 0, 0, 0, &params(0, 5)).unwrap();
        r.out("b", 0, 0, 0, &params(0, 6)).unwrap();
        assert_eq!(r.generation, 2);
        r.out("a", 1, 0, kind::WRITE_EXCLUSIVE, &params(5, 0))
            .unwrap();
        assert_eq!(
            r.out("b", 1, 0, kind::WRITE_EXCLUSIVE, &params(6, 0)),
            Err(Refusal::Conflict)
        );
        assert!(r.allows("b", Access::Read));
        assert!(!r.allows("b", Access::Write));
        assert!(r.allows("a", Access::Write));
        assert_eq!(
            r.out("a", 2, 0, kind::EXCLUSIVE_ACCESS, &params(5, 0)),
            Err(Refusal::Sense(Sense::illegal(asc::INVALID_RELEASE_OF_PR)))
        );
        r.out("a", 2, 0, kind::WRITE_EXCLUSIVE, &params(5, 0))
            .unwrap();
        assert!(r.allows("b", Access::Write));
    }

    // Proves all-registrants and registrants-only access and preempt.
    #[test]
    fn registrants_and_preempt() {
        let mut r = Reservations::default();
        r.out("a", 0, 0, 0, &params(0, 5)).unwrap();
        r.out("b", 0, 0, 0, &params(0, 6)).unwrap();
        r.out("a", 1, 0, kind::EXCLUSIVE_ACCESS_AR, &params(5, 0))
            .unwrap();
        assert!(r.allows("b", Access::Write));
        assert!(!r.allows("c", Access::Read));
        // PREEMPT with key 0 under AR takes the reservation and drops others.
        r.out("b", 4, 0, kind::WRITE_EXCLUSIVE, &params(6, 0))
            .unwrap();
        assert_eq!(r.registrations.len(), 1);
        assert_eq!(r.holder, Some(("b".into(), kind::WRITE_EXCLUSIVE)));
        // Preempting an unknown key conflicts.
        assert_eq!(r.out("b", 4, 0, 1, &params(6, 99)), Err(Refusal::Conflict));
        r.out("b", 3, 0, 0, &params(6, 0)).unwrap();
        assert!(r.registrations.is_empty() && r.holder.is_none());
    }

    // Proves SPC-2 reservations conflict with others and with PR.
    #[test]
    fn spc2() {
        let mut r = Reservations::default();
        r.reserve_spc2("a").unwrap();
        assert_eq!(r.reserve_spc2("b"), Err(Refusal::Conflict));
        assert!(!r.allows("b", Access::Read));
        assert!(r.allows("b", Access::Always));
        r.release_spc2("b").unwrap();
        assert_eq!(r.spc2.as_deref(), Some("a"));
        r.nexus_lost("a");
        assert!(r.spc2.is_none());
    }

    // Proves rejections: bad list length, SPEC_I_PT/APTPL, bad type.
    #[test]
    fn rejections() {
        let mut r = Reservations::default();
        assert!(matches!(
            r.out("a", 0, 0, 0, &[0; 20]),
            Err(Refusal::Sense(_))
        ));
        let mut p = params(0, 1);
        p[20] = 0x01;
        assert!(matches!(r.out("a", 0, 0, 0, &p), Err(Refusal::Sense(_))));
        r.out("a", 0, 0, 0, &params(0, 1)).unwrap();
        assert!(matches!(
            r.out("a", 1, 0, 2, &params(1, 0)),
            Err(Refusal::Sense(_))
        ));
        assert!(matches!(
            r.out("a", 7, 0, 1, &params(1, 0)),
            Err(Refusal::Sense(_))
        ));
    }
}
