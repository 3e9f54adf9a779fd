//! The iSCSI login phase (RFC 7143 §6.3, §11.12, §11.13): security
//! negotiation (AuthMethod None or CHAP with MD5, one-way or mutual, §12.1.3)
//! and operational negotiation of every key RFC 7143 defines for
//! ErrorRecoveryLevel 0 (§13).
//!
//! A pure state machine: login request PDUs in, login response PDUs out.
//! The CHAP challenge, the CHAP identifier and the TSIH are arguments, so
//! the caller owns randomness. Whether a target exists, whether an
//! initiator may see it and which CHAP secrets apply is asked of a
//! [`Directory`]. Secrets never leave this module except as MD5 digests,
//! and nothing here logs.
//!
//! What it does not do: several connections per session (MaxConnections is
//! negotiated to 1 and a login naming an existing TSIH is refused with
//! "session does not exist"), error recovery levels above 0, and
//! target-initiated offers (the target only answers, so every key the
//! initiator does not offer keeps its RFC default).

use super::pdu::{self, Pdu, op};
use super::text::{self, Pairs};
use md5::{Digest, Md5};

/// Login status classes and details (§11.13.5), as (class << 8) | detail.
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    pub const INITIATOR_ERROR: u16 = 0x0200;
    pub const AUTHENTICATION_FAILURE: u16 = 0x0201;
    pub const AUTHORIZATION_FAILURE: u16 = 0x0202;
    pub const NOT_FOUND: u16 = 0x0203;
    pub const UNSUPPORTED_VERSION: u16 = 0x0205;
    pub const MISSING_PARAMETER: u16 = 0x0207;
    pub const SESSION_TYPE_NOT_SUPPORTED: u16 = 0x0209;
    pub const SESSION_DOES_NOT_EXIST: u16 = 0x020a;
    pub const INVALID_DURING_LOGIN: u16 = 0x020b;
    pub const TARGET_ERROR: u16 = 0x0300;
    pub const SERVICE_UNAVAILABLE: u16 = 0x0301;
}

/// Login stages (§11.12.3 CSG/NSG).
pub const STAGE_SECURITY: u8 = 0;
pub const STAGE_OPERATIONAL: u8 = 1;
pub const STAGE_FULL_FEATURE: u8 = 3;

/// CHAP algorithm 5 = MD5 (RFC 1994, §12.1.3).
pub const CHAP_MD5: &str = "5";
/// Bytes of the CHAP challenge we send (RFC 7143 §12.1.3 recommends at
/// least as long as the digest).
pub const CHAP_CHALLENGE_BYTES: usize = 16;
/// Login text may span several PDUs (C bit); bound what we buffer.
pub const LOGIN_TEXT_BYTES_MAX: usize = 64 * 1024;
/// Login requests in one login; a login that needs more is not converging.
pub const LOGIN_STEPS_MAX: u32 = 32;

/// §13.12-§13.14: data segment and burst lengths are 512 .. 2^24-1.
pub const LENGTH_MIN: u64 = 512;
pub const LENGTH_MAX: u64 = (1 << 24) - 1;

/// CHAP credentials of a target (`user`/`secret` authenticate the
/// initiator; `mutual` the target to the initiator).
#[derive(Clone, PartialEq, Eq)]
pub struct Chap {
    pub user: String,
    pub secret: Vec<u8>,
    pub mutual: Option<(String, Vec<u8>)>,
}

impl std::fmt::Debug for Chap {
    // Secrets never appear in logs, even through Debug.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chap")
            .field("user", &self.user)
            .field("mutual", &self.mutual.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

/// What the directory says about a login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    NotFound,
    Denied,
    /// The target exists but whether this initiator may use it is not
    /// known right now (access control not loaded yet): refused as
    /// "service unavailable" (§11.13.5, 0x0301), which initiators retry.
    Unavailable,
    /// Allowed, with CHAP required when `Some`.
    Allowed(Option<Chap>),
}

pub trait Directory {
    /// May `initiator` log in to `target`, and with which credentials?
    fn access(&self, target: &str, initiator: &str) -> Access;
    /// Credentials for discovery sessions (`None`: no authentication).
    fn discovery_chap(&self) -> Option<Chap> {
        None
    }
}

/// What the target offers; the negotiation result never exceeds these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    pub max_recv_data_segment_bytes: u32,
    pub max_burst_bytes: u32,
    pub first_burst_bytes: u32,
    pub max_outstanding_r2t: u32,
    pub portal_group_tag: u16,
}

impl Default for Offer {
    fn default() -> Self {
        Offer {
            max_recv_data_segment_bytes: 256 * 1024,
            max_burst_bytes: 1024 * 1024,
            first_burst_bytes: 256 * 1024,
            max_outstanding_r2t: 1,
            portal_group_tag: 1,
        }
    }
}

/// Operational parameters in force after login (§13). Defaults are the RFC's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Largest data segment we may send (the initiator's declaration).
    pub initiator_max_recv_data_segment_bytes: u32,
    /// Largest data segment we accept (our declaration).
    pub target_max_recv_data_segment_bytes: u32,
    pub max_burst_bytes: u32,
    pub first_burst_bytes: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub header_digest: bool,
    pub data_digest: bool,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub max_connections: u32,
    pub error_recovery_level: u32,
}

impl Params {
    pub fn rfc_defaults(offer: &Offer) -> Params {
        Params {
            initiator_max_recv_data_segment_bytes: 8192,
            target_max_recv_data_segment_bytes: offer.max_recv_data_segment_bytes,
            max_burst_bytes: 262_144,
            first_burst_bytes: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            header_digest: false,
            data_digest: false,
            default_time2wait: 2,
            default_time2retain: 20,
            max_connections: 1,
            error_recovery_level: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    Discovery,
    Normal,
}

/// A completed login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedIn {
    pub kind: SessionKind,
    pub initiator: String,
    /// The target name of a Normal session.
    pub target: Option<String>,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub params: Params,
    /// ExpCmdSN at the start of the full feature phase: the CmdSN of the
    /// login requests (they are immediate, §6.3).
    pub exp_cmd_sn: u32,
    /// StatSN of the next response on this connection.
    pub stat_sn: u32,
}

/// What to do after a login request.
#[derive(Debug)]
pub enum Step {
    /// Send this response and read the next request.
    Continue(Pdu),
    /// Send this response; the full feature phase starts.
    Done(Pdu, Box<LoggedIn>),
    /// Send this response and close the connection (§6.3.6).
    Fail(Pdu),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChapState {
    /// AuthMethod=CHAP agreed; waiting for CHAP_A.
    WaitAlgorithm,
    /// Challenge sent; waiting for CHAP_N/CHAP_R.
    WaitResponse,
}

/// Commands the target allows ahead of ExpCmdSN during login responses.
const LOGIN_CMD_WINDOW: u32 = 1;

pub struct Login {
    offer: Offer,
    challenge: [u8; CHAP_CHALLENGE_BYTES],
    chap_id: u8,
    tsih: u16,
    stat_sn: u32,
    steps: u32,
    first: Option<First>,
    stage: u8,
    authenticated: bool,
    chap: Option<ChapState>,
    creds: Option<Chap>,
    params: Params,
    /// Operational keys already negotiated (§6.2: no key twice).
    seen: Vec<String>,
    declared_mrdsl: bool,
    pending: Vec<u8>,
}

struct First {
    isid: [u8; 6],
    itt: u32,
    kind: SessionKind,
    initiator: String,
    target: Option<String>,
}

fn md5_chap(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Constant-time comparison, so a wrong CHAP response leaks no timing.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn yes_no(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yn(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

impl Login {
    pub fn new(
        offer: Offer,
        challenge: [u8; CHAP_CHALLENGE_BYTES],
        chap_id: u8,
        tsih: u16,
        stat_sn: u32,
    ) -> Login {
        assert!(tsih != 0, "TSIH 0 is reserved for 'new session' (§11.12.6)");
        Login {
            offer,
            challenge,
            chap_id,
            tsih,
            stat_sn,
            steps: 0,
            first: None,
            stage: STAGE_SECURITY,
            authenticated: false,
            chap: None,
            creds: None,
            params: Params::rfc_defaults(&offer),
            seen: Vec::new(),
            declared_mrdsl: false,
            pending: Vec::new(),
        }
    }

    fn response(&mut self, req: &Pdu, flags: u8, status: u16, tsih: u16, data: Vec<u8>) -> Pdu {
        let mut r = Pdu::new(op::LOGIN_RESPONSE);
        r.set_flags(flags);
        r.bhs[2] = 0; // Version-max
        r.bhs[3] = 0; // Version-active
        r.bhs[8..14].copy_from_slice(&req.bhs[8..14]);
        r.bhs[14..16].copy_from_slice(&tsih.to_be_bytes());
        r.set_itt(req.itt());
        r.set_u32_at(24, self.stat_sn);
        self.stat_sn = self.stat_sn.wrapping_add(1);
        let cmd_sn = req.field24();
        r.set_u32_at(28, cmd_sn);
        r.set_u32_at(32, cmd_sn.wrapping_add(LOGIN_CMD_WINDOW - 1));
        r.bhs[36] = (status >> 8) as u8;
        r.bhs[37] = status as u8;
        r.data = data;
        r
    }

    fn fail(&mut self, req: &Pdu, status: u16) -> Step {
        assert!(status != status::SUCCESS);
        let stage = self.stage;
        Step::Fail(self.response(req, stage << 2, status, 0, Vec::new()))
    }

    /// Handle one login request.
    pub fn step(&mut self, req: &Pdu, dir: &dyn Directory) -> Step {
        self.steps += 1;
        if req.opcode() != op::LOGIN_REQUEST || self.steps > LOGIN_STEPS_MAX {
            return self.fail(req, status::INVALID_DURING_LOGIN);
        }
        let flags = req.flags();
        let transit = flags & pdu::FLAG_TRANSIT != 0;
        let cont = flags & pdu::FLAG_CONTINUE != 0;
        let csg = (flags >> 2) & 3;
        let nsg = flags & 3;
        // §11.12.4: Version-min above what we speak (0x00).
        if req.bhs[3] > 0 {
            return self.fail(req, status::UNSUPPORTED_VERSION);
        }
        // §11.12.3: T and C together, or a transit to a reserved or
        // earlier stage, are protocol errors.
        if transit && (cont || nsg == 2 || nsg <= csg) {
            return self.fail(req, status::INITIATOR_ERROR);
        }
        if csg != self.stage {
            // The first request may start in operational stage (§6.3).
            if self.first.is_none() && csg == STAGE_OPERATIONAL {
                self.stage = STAGE_OPERATIONAL;
            } else {
                return self.fail(req, status::INITIATOR_ERROR);
            }
        }
        let mut isid = [0u8; 6];
        isid.copy_from_slice(&req.bhs[8..14]);
        let tsih_in = u16::from_be_bytes([req.bhs[14], req.bhs[15]]);
        if let Some(f) = &self.first {
            if f.isid != isid || f.itt != req.itt() {
                return self.fail(req, status::INITIATOR_ERROR);
            }
        } else if tsih_in != 0 {
            // Adding a connection to an existing session (MC/S) or
            // reinstating one: not offered (MaxConnections=1).
            return self.fail(req, status::SESSION_DOES_NOT_EXIST);
        }
        if self.pending.len() + req.data.len() > LOGIN_TEXT_BYTES_MAX {
            return self.fail(req, status::INITIATOR_ERROR);
        }
        self.pending.extend_from_slice(&req.data);
        if cont {
            // §11.12.2: more text follows; answer with an empty response.
            let stage = self.stage;
            return Step::Continue(self.response(req, stage << 2, status::SUCCESS, 0, Vec::new()));
        }
        let data = std::mem::take(&mut self.pending);
        let Ok(pairs) = text::parse(&data) else {
            return self.fail(req, status::INITIATOR_ERROR);
        };
        let mut out: Pairs = Vec::new();
        if self.first.is_none() {
            match self.first_request(req, &pairs, isid, dir, &mut out) {
                Ok(()) => {}
                Err(s) => return self.fail(req, s),
            }
        }
        let kind = self.first.as_ref().expect("set").kind;
        for (k, v) in &pairs {
            match k.as_str() {
                "InitiatorName" | "TargetName" | "SessionType" | "InitiatorAlias" => {}
                "AuthMethod" | "CHAP_A" | "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" => {
                    if self.stage != STAGE_SECURITY {
                        return self.fail(req, status::INITIATOR_ERROR);
                    }
                }
                _ => match self.operational(k, v, kind) {
                    Ok(Some(answer)) => out.push((k.clone(), answer)),
                    Ok(None) => {}
                    Err(s) => return self.fail(req, s),
                },
            }
        }
        if self.stage == STAGE_SECURITY
            && let Err(s) = self.security(&pairs, &mut out)
        {
            return self.fail(req, s);
        }
        if self.stage == STAGE_OPERATIONAL && !self.declared_mrdsl {
            // §13.12: declare what we accept; otherwise the initiator
            // assumes 8192.
            self.declared_mrdsl = true;
            out.push((
                "MaxRecvDataSegmentLength".into(),
                self.offer.max_recv_data_segment_bytes.to_string(),
            ));
        }
        // Decide whether we transit.
        let can_leave = self.stage != STAGE_SECURITY || self.authenticated;
        let body = text::encode(&out);
        if transit && can_leave {
            if nsg == STAGE_FULL_FEATURE {
                let mut p = self.params;
                // §13.14: FirstBurstLength never exceeds MaxBurstLength.
                p.first_burst_bytes = p.first_burst_bytes.min(p.max_burst_bytes);
                let stage = self.stage;
                let flags = pdu::FLAG_TRANSIT | (stage << 2) | STAGE_FULL_FEATURE;
                let tsih = self.tsih;
                let resp = self.response(req, flags, status::SUCCESS, tsih, body);
                let f = self.first.as_ref().expect("set");
                let done = LoggedIn {
                    kind: f.kind,
                    initiator: f.initiator.clone(),
                    target: f.target.clone(),
                    isid,
                    tsih,
                    params: p,
                    exp_cmd_sn: req.field24(),
                    stat_sn: self.stat_sn,
                };
                return Step::Done(resp, Box::new(done));
            }
            let stage = self.stage;
            let flags = pdu::FLAG_TRANSIT | (stage << 2) | nsg;
            let resp = self.response(req, flags, status::SUCCESS, 0, body);
            self.stage = nsg;
            return Step::Continue(resp);
        }
        let stage = self.stage;
        Step::Continue(self.response(req, stage << 2, status::SUCCESS, 0, body))
    }

    fn first_request(
        &mut self,
        req: &Pdu,
        pairs: &Pairs,
        isid: [u8; 6],
        dir: &dyn Directory,
        out: &mut Pairs,
    ) -> Result<(), u16> {
        let initiator = text::get(pairs, "InitiatorName").ok_or(status::MISSING_PARAMETER)?;
        if initiator.is_empty() {
            return Err(status::MISSING_PARAMETER);
        }
        let kind = match text::get(pairs, "SessionType") {
            None | Some("Normal") => SessionKind::Normal,
            Some("Discovery") => SessionKind::Discovery,
            Some(_) => return Err(status::SESSION_TYPE_NOT_SUPPORTED),
        };
        let target = text::get(pairs, "TargetName").map(str::to_string);
        let creds = match kind {
            SessionKind::Discovery => dir.discovery_chap(),
            SessionKind::Normal => {
                let t = target.as_deref().ok_or(status::MISSING_PARAMETER)?;
                match dir.access(t, initiator) {
                    Access::NotFound => return Err(status::NOT_FOUND),
                    Access::Denied => return Err(status::AUTHORIZATION_FAILURE),
                    Access::Unavailable => return Err(status::SERVICE_UNAVAILABLE),
                    Access::Allowed(c) => c,
                }
            }
        };
        // Starting in operational stage skips authentication (§6.3): only
        // allowed when none is required.
        if self.stage == STAGE_OPERATIONAL {
            if creds.is_some() {
                return Err(status::AUTHENTICATION_FAILURE);
            }
            self.authenticated = true;
        }
        self.creds = creds;
        if kind == SessionKind::Normal {
            // §13.9: the target declares its portal group tag in the first
            // response of a Normal session.
            out.push((
                "TargetPortalGroupTag".into(),
                self.offer.portal_group_tag.to_string(),
            ));
        }
        self.first = Some(First {
            isid,
            itt: req.itt(),
            kind,
            initiator: initiator.to_string(),
            target,
        });
        Ok(())
    }

    /// Security stage keys (§12).
    fn security(&mut self, pairs: &Pairs, out: &mut Pairs) -> Result<(), u16> {
        if let Some(methods) = text::get(pairs, "AuthMethod") {
            if self.chap.is_some() || self.authenticated {
                return Err(status::INITIATOR_ERROR);
            }
            let offered: Vec<&str> = methods.split(',').collect();
            if self.creds.is_some() {
                if !offered.contains(&"CHAP") {
                    out.push(("AuthMethod".into(), "Reject".into()));
                    return Err(status::AUTHENTICATION_FAILURE);
                }
                out.push(("AuthMethod".into(), "CHAP".into()));
                self.chap = Some(ChapState::WaitAlgorithm);
            } else {
                if !offered.contains(&"None") {
                    return Err(status::AUTHENTICATION_FAILURE);
                }
                out.push(("AuthMethod".into(), "None".into()));
                self.authenticated = true;
            }
            return Ok(());
        }
        match self.chap {
            None => {
                if self.creds.is_some() {
                    // No AuthMethod offered, yet authentication is required.
                    return Err(status::AUTHENTICATION_FAILURE);
                }
                if !self.authenticated {
                    // §12: no AuthMethod at all means none negotiated; with
                    // no credentials required that is acceptable.
                    self.authenticated = true;
                }
                Ok(())
            }
            Some(ChapState::WaitAlgorithm) => {
                let algs = text::get(pairs, "CHAP_A").ok_or(status::AUTHENTICATION_FAILURE)?;
                if !algs.split(',').any(|a| a == CHAP_MD5) {
                    out.push(("CHAP_A".into(), "Reject".into()));
                    return Err(status::AUTHENTICATION_FAILURE);
                }
                out.push(("CHAP_A".into(), CHAP_MD5.into()));
                out.push(("CHAP_I".into(), self.chap_id.to_string()));
                out.push(("CHAP_C".into(), text::encode_hex(&self.challenge)));
                self.chap = Some(ChapState::WaitResponse);
                Ok(())
            }
            Some(ChapState::WaitResponse) => {
                let creds = self.creds.clone().expect("CHAP only with credentials");
                let name = text::get(pairs, "CHAP_N").ok_or(status::AUTHENTICATION_FAILURE)?;
                let resp = text::get(pairs, "CHAP_R")
                    .and_then(text::parse_binary)
                    .ok_or(status::AUTHENTICATION_FAILURE)?;
                let expected = md5_chap(self.chap_id, &creds.secret, &self.challenge);
                if name != creds.user || !same(&resp, &expected) {
                    return Err(status::AUTHENTICATION_FAILURE);
                }
                // Mutual CHAP: the initiator challenges us back.
                match (text::get(pairs, "CHAP_I"), text::get(pairs, "CHAP_C")) {
                    (None, None) => {}
                    (Some(i), Some(c)) => {
                        let id = text::parse_number(i)
                            .filter(|n| *n <= 255)
                            .ok_or(status::AUTHENTICATION_FAILURE)?
                            as u8;
                        let chal = text::parse_binary(c).ok_or(status::AUTHENTICATION_FAILURE)?;
                        // §12.1.3: a target seeing its own challenge
                        // reflected must refuse (reflection attack).
                        if chal == self.challenge {
                            return Err(status::AUTHENTICATION_FAILURE);
                        }
                        let (tuser, tsecret) =
                            creds.mutual.clone().ok_or(status::AUTHENTICATION_FAILURE)?;
                        out.push(("CHAP_N".into(), tuser));
                        out.push((
                            "CHAP_R".into(),
                            text::encode_hex(&md5_chap(id, &tsecret, &chal)),
                        ));
                    }
                    _ => return Err(status::AUTHENTICATION_FAILURE),
                }
                self.chap = None;
                self.authenticated = true;
                Ok(())
            }
        }
    }

    /// One operational key (§13): the answer to send, if any.
    fn operational(
        &mut self,
        key: &str,
        v: &str,
        kind: SessionKind,
    ) -> Result<Option<String>, u16> {
        if self.seen.iter().any(|k| k == key) {
            // §6.2: renegotiating a key in the same login is an error.
            return Err(status::INITIATOR_ERROR);
        }
        self.seen.push(key.to_string());
        let num = |lo: u64, hi: u64| text::parse_number(v).filter(|n| (lo..=hi).contains(n));
        let p = &mut self.params;
        let answer = match key {
            "HeaderDigest" | "DataDigest" => {
                let pick = v.split(',').find(|x| *x == "CRC32C" || *x == "None");
                match pick {
                    Some(x) => {
                        let on = x == "CRC32C";
                        if key == "HeaderDigest" {
                            p.header_digest = on;
                        } else {
                            p.data_digest = on;
                        }
                        x.to_string()
                    }
                    None => "Reject".into(),
                }
            }
            "MaxConnections" => match num(1, 65535) {
                Some(_) => "1".into(),
                None => "Reject".into(),
            },
            // §13.10 InitialR2T: OR; we are happy with unsolicited data.
            "InitialR2T" => match yes_no(v) {
                Some(b) => {
                    p.initial_r2t = b;
                    yn(b)
                }
                None => "Reject".into(),
            },
            // §13.11 ImmediateData: AND; we accept it.
            "ImmediateData" => match yes_no(v) {
                Some(b) => {
                    p.immediate_data = b;
                    yn(b)
                }
                None => "Reject".into(),
            },
            // §13.12: declarative, the initiator's receive limit.
            "MaxRecvDataSegmentLength" => match num(LENGTH_MIN, LENGTH_MAX) {
                Some(n) => {
                    p.initiator_max_recv_data_segment_bytes = n as u32;
                    return Ok(None);
                }
                None => "Reject".into(),
            },
            "MaxBurstLength" => match num(LENGTH_MIN, LENGTH_MAX) {
                Some(n) => {
                    p.max_burst_bytes = (n as u32).min(self.offer.max_burst_bytes);
                    p.max_burst_bytes.to_string()
                }
                None => "Reject".into(),
            },
            "FirstBurstLength" => match num(LENGTH_MIN, LENGTH_MAX) {
                Some(n) => {
                    p.first_burst_bytes = (n as u32).min(self.offer.first_burst_bytes);
                    p.first_burst_bytes.to_string()
                }
                None => "Reject".into(),
            },
            // §13.15/16: Time2Wait is max, Time2Retain min; at ERL 0 we
            // hold no state for reinstatement, so Time2Retain is 0.
            "DefaultTime2Wait" => match num(0, 3600) {
                Some(n) => {
                    p.default_time2wait = n as u32;
                    n.to_string()
                }
                None => "Reject".into(),
            },
            "DefaultTime2Retain" => match num(0, 3600) {
                Some(_) => {
                    p.default_time2retain = 0;
                    "0".into()
                }
                None => "Reject".into(),
            },
            "MaxOutstandingR2T" => match num(1, 65535) {
                Some(n) => {
                    p.max_outstanding_r2t = (n as u32).min(self.offer.max_outstanding_r2t);
                    p.max_outstanding_r2t.to_string()
                }
                None => "Reject".into(),
            },
            // §13.19/20: OR with our Yes, so always Yes.
            "DataPDUInOrder" | "DataSequenceInOrder" => match yes_no(v) {
                Some(_) => "Yes".into(),
                None => "Reject".into(),
            },
            "ErrorRecoveryLevel" => match num(0, 2) {
                Some(_) => "0".into(),
                None => "Reject".into(),
            },
            // §13.25 (RFC 7143 obsoletes markers; answering No is correct).
            "OFMarker" | "IFMarker" => match yes_no(v) {
                Some(_) => "No".into(),
                None => "Reject".into(),
            },
            "OFMarkInt" | "IFMarkInt" => "Irrelevant".into(),
            // §13.23: we offer the basic RFC 3720 behaviour.
            "TaskReporting" => "RFC3720".into(),
            // RFC 7144 §2.1: numeric, we implement level 1 (RFC 7143).
            "iSCSIProtocolLevel" => match num(0, 31) {
                Some(n) => n.min(1).to_string(),
                None => "Reject".into(),
            },
            // Target-declared keys an initiator may not send (§13.9, §13.8).
            "TargetPortalGroupTag" | "TargetAddress" | "TargetAlias" => {
                return Err(status::INITIATOR_ERROR);
            }
            "SendTargets" => "Irrelevant".into(),
            _ => "NotUnderstood".into(),
        };
        // Data-path keys are irrelevant to discovery sessions (§13 "LO").
        let _ = kind;
        Ok(Some(answer))
    }
}

/// The CHAP response an initiator computes; used by tests and tools.
pub fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    md5_chap(id, secret, challenge)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(Access);
    impl Directory for Dir {
        fn access(&self, target: &str, _i: &str) -> Access {
            if target == "iqn.t:vol" {
                self.0.clone()
            } else {
                Access::NotFound
            }
        }
    }

    fn req(flags: u8, pairs: &[(&str, &str)]) -> Pdu {
        let mut p = Pdu::new(op::LOGIN_REQUEST);
        p.set_immediate();
        p.set_flags(flags);
        p.bhs[8..14].copy_from_slice(&[0x80, 0, 0, 1, 0, 0]);
        p.set_itt(9);
        p.set_u32_at(24, 100);
        let v: Pairs = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        p.data = text::encode(&v);
        p
    }

    fn login() -> Login {
        Login::new(Offer::default(), [7u8; 16], 42, 5, 1000)
    }

    fn status_of(p: &Pdu) -> u16 {
        u16::from_be_bytes([p.bhs[36], p.bhs[37]])
    }

    fn pairs(p: &Pdu) -> Pairs {
        text::parse(&p.data).unwrap()
    }

    const SEC_TO_OP: u8 = 0x80 | 1;
    const OP_TO_FF: u8 = 0x80 | (1 << 2) | 3;

    // Proves a no-auth login in two steps (security -> operational -> full
    // feature) negotiates keys by their RFC functions and assigns the TSIH.
    #[test]
    fn no_auth_login() {
        let d = Dir(Access::Allowed(None));
        let mut l = login();
        let Step::Continue(r) = l.step(
            &req(
                SEC_TO_OP,
                &[
                    ("InitiatorName", "iqn.i"),
                    ("TargetName", "iqn.t:vol"),
                    ("AuthMethod", "None"),
                ],
            ),
            &d,
        ) else {
            panic!()
        };
        assert_eq!(r.opcode(), op::LOGIN_RESPONSE);
        assert_eq!(r.flags(), 0x81);
        assert_eq!(status_of(&r), 0);
        assert_eq!(r.field24(), 1000);
        assert_eq!(text::get(&pairs(&r), "AuthMethod"), Some("None"));
        assert_eq!(text::get(&pairs(&r), "TargetPortalGroupTag"), Some("1"));
        let op = req(
            OP_TO_FF,
            &[
                ("HeaderDigest", "CRC32C,None"),
                ("DataDigest", "None"),
                ("MaxBurstLength", "16776192"),
                ("FirstBurstLength", "262144"),
                ("InitialR2T", "No"),
                ("ImmediateData", "Yes"),
                ("MaxRecvDataSegmentLength", "65536"),
                ("MaxOutstandingR2T", "8"),
                ("ErrorRecoveryLevel", "2"),
                ("MaxConnections", "4"),
                ("DefaultTime2Wait", "5"),
                ("X-com.example.foo", "1"),
            ],
        );
        let Step::Done(r, done) = l.step(&op, &d) else {
            panic!()
        };
        assert_eq!(r.flags(), 0x87);
        assert_eq!(u16::from_be_bytes([r.bhs[14], r.bhs[15]]), 5);
        let a = pairs(&r);
        assert_eq!(text::get(&a, "HeaderDigest"), Some("CRC32C"));
        assert_eq!(text::get(&a, "MaxBurstLength"), Some("1048576"));
        assert_eq!(text::get(&a, "FirstBurstLength"), Some("262144"));
        assert_eq!(text::get(&a, "MaxOutstandingR2T"), Some("1"));
        assert_eq!(text::get(&a, "ErrorRecoveryLevel"), Some("0"));
        assert_eq!(text::get(&a, "MaxConnections"), Some("1"));
        assert_eq!(text::get(&a, "X-com.example.foo"), Some("NotUnderstood"));
        assert_eq!(text::get(&a, "MaxRecvDataSegmentLength"), Some("262144"));
        assert!(done.params.header_digest && !done.params.data_digest);
        assert!(!done.params.initial_r2t);
        assert_eq!(done.params.initiator_max_recv_data_segment_bytes, 65536);
        assert_eq!(done.exp_cmd_sn, 100);
        assert_eq!(done.stat_sn, 1002);
        assert_eq!(done.kind, SessionKind::Normal);
    }

    // Proves a discovery session may start directly in operational stage
    // and needs no TargetName.
    #[test]
    fn discovery_from_operational() {
        let d = Dir(Access::Denied);
        let mut l = login();
        let Step::Done(_, done) = l.step(
            &req(
                OP_TO_FF,
                &[("InitiatorName", "iqn.i"), ("SessionType", "Discovery")],
            ),
            &d,
        ) else {
            panic!()
        };
        assert_eq!(done.kind, SessionKind::Discovery);
    }

    fn fails(l: &mut Login, d: &Dir, r: Pdu) -> u16 {
        match l.step(&r, d) {
            Step::Fail(p) => status_of(&p),
            other => panic!("expected failure, got {other:?}"),
        }
    }

    // Proves each login rejection branch returns the right class/detail.
    #[test]
    fn rejections() {
        let ok = Dir(Access::Allowed(None));
        let t = ("TargetName", "iqn.t:vol");
        let i = ("InitiatorName", "iqn.i");
        assert_eq!(
            fails(&mut login(), &ok, req(SEC_TO_OP, &[t])),
            status::MISSING_PARAMETER
        );
        assert_eq!(
            fails(&mut login(), &ok, req(SEC_TO_OP, &[i])),
            status::MISSING_PARAMETER
        );
        assert_eq!(
            fails(
                &mut login(),
                &ok,
                req(SEC_TO_OP, &[i, ("TargetName", "iqn.nope")])
            ),
            status::NOT_FOUND
        );
        assert_eq!(
            fails(&mut login(), &Dir(Access::Denied), req(SEC_TO_OP, &[i, t])),
            status::AUTHORIZATION_FAILURE
        );
        assert_eq!(
            fails(
                &mut login(),
                &Dir(Access::Unavailable),
                req(SEC_TO_OP, &[i, t])
            ),
            status::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            fails(
                &mut login(),
                &ok,
                req(SEC_TO_OP, &[i, ("SessionType", "Bogus")])
            ),
            status::SESSION_TYPE_NOT_SUPPORTED
        );
        let mut v = req(SEC_TO_OP, &[i, t]);
        v.bhs[3] = 1;
        assert_eq!(fails(&mut login(), &ok, v), status::UNSUPPORTED_VERSION);
        let mut v = req(SEC_TO_OP, &[i, t]);
        v.bhs[15] = 3;
        assert_eq!(fails(&mut login(), &ok, v), status::SESSION_DOES_NOT_EXIST);
        // NSG 2 is reserved; T with C is invalid.
        assert_eq!(
            fails(&mut login(), &ok, req(0x82, &[i, t])),
            status::INITIATOR_ERROR
        );
        assert_eq!(
            fails(&mut login(), &ok, req(0xc1, &[i, t])),
            status::INITIATOR_ERROR
        );
        let mut bad = req(SEC_TO_OP, &[]);
        bad.data = b"NoEquals\0".to_vec();
        assert_eq!(fails(&mut login(), &ok, bad), status::INITIATOR_ERROR);
        // Non-login opcode during login.
        let mut nop = req(SEC_TO_OP, &[i, t]);
        nop.bhs[0] = 0x40;
        assert_eq!(fails(&mut login(), &ok, nop), status::INVALID_DURING_LOGIN);
        // Key negotiated twice.
        let mut l = login();
        let _ = l.step(&req(SEC_TO_OP, &[i, t, ("AuthMethod", "None")]), &ok);
        let _ = l.step(&req(1 << 2, &[("MaxBurstLength", "512")]), &ok);
        assert_eq!(
            fails(&mut l, &ok, req(OP_TO_FF, &[("MaxBurstLength", "512")])),
            status::INITIATOR_ERROR
        );
        // Security key in operational stage.
        let mut l = login();
        let _ = l.step(&req(SEC_TO_OP, &[i, t, ("AuthMethod", "None")]), &ok);
        assert_eq!(
            fails(&mut l, &ok, req(OP_TO_FF, &[("AuthMethod", "None")])),
            status::INITIATOR_ERROR
        );
        // Target-only key from the initiator.
        let mut l = login();
        assert_eq!(
            fails(
                &mut l,
                &ok,
                req(OP_TO_FF, &[i, t, ("TargetPortalGroupTag", "1")])
            ),
            status::INITIATOR_ERROR
        );
    }

    // Proves invalid values get key=Reject (§6.2) without failing the login.
    #[test]
    fn reject_values() {
        let ok = Dir(Access::Allowed(None));
        let mut l = login();
        let Step::Done(r, _) = l.step(
            &req(
                OP_TO_FF,
                &[
                    ("InitiatorName", "iqn.i"),
                    ("TargetName", "iqn.t:vol"),
                    ("MaxBurstLength", "12"),
                    ("InitialR2T", "maybe"),
                    ("HeaderDigest", "MD5"),
                ],
            ),
            &ok,
        ) else {
            panic!()
        };
        let a = pairs(&r);
        assert_eq!(text::get(&a, "MaxBurstLength"), Some("Reject"));
        assert_eq!(text::get(&a, "InitialR2T"), Some("Reject"));
        assert_eq!(text::get(&a, "HeaderDigest"), Some("Reject"));
    }

    fn chap_creds(mutual: bool) -> Chap {
        Chap {
            user: "alice".into(),
            secret: b"alice-secret-12".to_vec(),
            mutual: mutual.then(|| ("target".to_string(), b"target-secret-1".to_vec())),
        }
    }

    // Proves one-way and mutual CHAP: the challenge, the MD5 response check,
    // the target's answer to the initiator's challenge.
    #[test]
    fn chap_mutual() {
        let d = Dir(Access::Allowed(Some(chap_creds(true))));
        let mut l = login();
        let i = ("InitiatorName", "iqn.i");
        let t = ("TargetName", "iqn.t:vol");
        let Step::Continue(r) = l.step(&req(SEC_TO_OP, &[i, t, ("AuthMethod", "CHAP,None")]), &d)
        else {
            panic!()
        };
        assert_eq!(r.flags() & 0x80, 0, "no transit before authentication");
        assert_eq!(text::get(&pairs(&r), "AuthMethod"), Some("CHAP"));
        let Step::Continue(r) = l.step(&req(0, &[("CHAP_A", "7,5")]), &d) else {
            panic!()
        };
        let a = pairs(&r);
        assert_eq!(text::get(&a, "CHAP_A"), Some("5"));
        assert_eq!(text::get(&a, "CHAP_I"), Some("42"));
        let chal = text::parse_binary(text::get(&a, "CHAP_C").unwrap()).unwrap();
        assert_eq!(chal, vec![7u8; 16]);
        let resp = text::encode_hex(&chap_response(42, b"alice-secret-12", &chal));
        let Step::Continue(r) = l.step(
            &req(
                SEC_TO_OP,
                &[
                    ("CHAP_N", "alice"),
                    ("CHAP_R", &resp),
                    ("CHAP_I", "3"),
                    ("CHAP_C", "0x0102030405060708"),
                ],
            ),
            &d,
        ) else {
            panic!()
        };
        assert_eq!(r.flags(), 0x81);
        let a = pairs(&r);
        assert_eq!(text::get(&a, "CHAP_N"), Some("target"));
        let want = text::encode_hex(&chap_response(
            3,
            b"target-secret-1",
            &[1, 2, 3, 4, 5, 6, 7, 8],
        ));
        assert_eq!(text::get(&a, "CHAP_R"), Some(want.as_str()));
        assert!(matches!(l.step(&req(OP_TO_FF, &[]), &d), Step::Done(..)));
    }

    // Proves every CHAP rejection: wrong secret, wrong user, no CHAP offered,
    // unsupported algorithm, skipping security, reflected challenge, mutual
    // asked without a target secret.
    #[test]
    fn chap_rejections() {
        let i = ("InitiatorName", "iqn.i");
        let t = ("TargetName", "iqn.t:vol");
        let d = Dir(Access::Allowed(Some(chap_creds(false))));
        let start = |l: &mut Login| {
            l.step(&req(SEC_TO_OP, &[i, t, ("AuthMethod", "CHAP")]), &d);
            l.step(&req(0, &[("CHAP_A", "5")]), &d);
        };
        let good = text::encode_hex(&chap_response(42, b"alice-secret-12", &[7u8; 16]));
        let bad = text::encode_hex(&chap_response(42, b"wrong-secret-1", &[7u8; 16]));
        let mut l = login();
        start(&mut l);
        assert_eq!(
            fails(
                &mut l,
                &d,
                req(SEC_TO_OP, &[("CHAP_N", "alice"), ("CHAP_R", &bad)])
            ),
            status::AUTHENTICATION_FAILURE
        );
        let mut l = login();
        start(&mut l);
        assert_eq!(
            fails(
                &mut l,
                &d,
                req(SEC_TO_OP, &[("CHAP_N", "bob"), ("CHAP_R", &good)])
            ),
            status::AUTHENTICATION_FAILURE
        );
        let mut l = login();
        start(&mut l);
        let reflected = text::encode_hex(&[7u8; 16]);
        assert_eq!(
            fails(
                &mut l,
                &d,
                req(
                    SEC_TO_OP,
                    &[
                        ("CHAP_N", "alice"),
                        ("CHAP_R", &good),
                        ("CHAP_I", "1"),
                        ("CHAP_C", &reflected)
                    ]
                )
            ),
            status::AUTHENTICATION_FAILURE
        );
        let mut l = login();
        start(&mut l);
        assert_eq!(
            fails(
                &mut l,
                &d,
                req(
                    SEC_TO_OP,
                    &[
                        ("CHAP_N", "alice"),
                        ("CHAP_R", &good),
                        ("CHAP_I", "1"),
                        ("CHAP_C", "0x01")
                    ]
                )
            ),
            status::AUTHENTICATION_FAILURE
        );
        assert_eq!(
            fails(
                &mut login(),
                &d,
                req(SEC_TO_OP, &[i, t, ("AuthMethod", "None")])
            ),
            status::AUTHENTICATION_FAILURE
        );
        assert_eq!(
            fails(&mut login(), &d, req(OP_TO_FF, &[i, t])),
            status::AUTHENTICATION_FAILURE
        );
        let mut l = login();
        l.step(&req(SEC_TO_OP, &[i, t, ("AuthMethod", "CHAP")]), &d);
        assert_eq!(
            fails(&mut l, &d, req(0, &[("CHAP_A", "7")])),
            status::AUTHENTICATION_FAILURE
        );
        // A good one-way exchange succeeds.
        let mut l = login();
        start(&mut l);
        assert!(matches!(
            l.step(
                &req(SEC_TO_OP, &[("CHAP_N", "alice"), ("CHAP_R", &good)]),
                &d
            ),
            Step::Continue(_)
        ));
    }

    // Proves Debug output of credentials never contains the secret.
    #[test]
    fn secrets_not_in_debug() {
        let s = format!("{:?}", chap_creds(true));
        assert!(!s.contains("secret-1"));
    }

    // Proves text continued over several PDUs (C bit) is joined.
    #[test]
    fn continuation() {
        let ok = Dir(Access::Allowed(None));
        let mut l = login();
        let mut a = req(0x40 | (1 << 2), &[]);
        a.data = b"InitiatorName=iqn.i\0TargetN".to_vec();
        let Step::Continue(r) = l.step(&a, &ok) else {
            panic!()
        };
        assert!(r.data.is_empty());
        let mut b = req(OP_TO_FF, &[]);
        b.data = b"ame=iqn.t:vol\0".to_vec();
        assert!(matches!(l.step(&b, &ok), Step::Done(..)));
    }
}
