//! Entry points shared by the iSCSI cargo-fuzz targets (`gateway/fuzz/`:
//! `iscsi_pdu`, `iscsi_login`, `iscsi_cdb`) and by the corpus replay test
//! (`gateway/tests/fuzz_corpus.rs`). Each takes arbitrary bytes, drives the
//! pure codec or state machine a connection would, and asserts what must
//! hold for any input: no panic, every PDU we send frames and decodes back
//! to itself, negotiated values stay inside what we offered, decoded
//! commands stay inside the logical unit and the advertised limits.

use super::login::{self, Access, Chap, Directory, Login, Offer, Step};
use super::pdu::{self, Digests, Pdu};
use super::pr::Reservations;
use super::scsi::{self, Command, Geometry, Identity, ModeState, Transfer};
use super::session::{DataIn, Discovery, Effect, Outcome, Session};

/// Largest data segment the fuzz drivers accept (the target's default
/// MaxRecvDataSegmentLength).
const DATA_MAX: usize = 256 * 1024;

/// Every PDU we emit must encode, decode back identically, and consume
/// exactly its encoding.
fn check_sent(p: &Pdu, d: Digests) {
    let bytes = p.to_bytes(d);
    match pdu::decode(&bytes, d, pdu::DATA_SEGMENT_FIELD_MAX) {
        Ok(Some((mut back, used))) => {
            assert_eq!(used, bytes.len(), "encoding not consumed exactly");
            // The encoder fills in the AHS and data segment lengths; the
            // rest must come back as it was.
            assert_eq!(back.data_segment_len(), p.data.len());
            assert_eq!(back.total_ahs_bytes(), p.ahs.len());
            back.bhs[4..8].copy_from_slice(&p.bhs[4..8]);
            assert_eq!(&back, p, "PDU does not survive encode/decode");
        }
        other => panic!("our own PDU does not decode: {other:?}"),
    }
}

/// Data-In PDUs must tile their data in order and each must survive
/// encode/decode like any other PDU; sent in pieces (header, data where it
/// lies, trailer) they must be exactly their encoding.
fn check_data_in(di: &DataIn, d: Digests) {
    let mut at = 0;
    for ((h, r), p) in di.pdus.iter().zip(di.to_pdus()) {
        assert_eq!(r.start, at, "Data-In ranges do not tile the data");
        at = r.end;
        assert!(h.data.is_empty(), "a Data-In header carries its own data");
        check_sent(&p, d);
        let mut split = Vec::new();
        h.encode_header(r.len(), d, &mut split);
        split.extend_from_slice(&di.data[r.clone()]);
        pdu::encode_trailer(&di.data[r.clone()], d, &mut split);
        assert_eq!(split, p.to_bytes(d), "split encoding differs");
    }
    assert_eq!(at, di.data.len(), "Data-In PDUs leave data unsent");
}

struct Targets;

impl Discovery for Targets {
    fn send_targets(&self, _initiator: &str, which: &str) -> Vec<(String, Vec<String>)> {
        ["iqn.2026-11.io.tessera:a", "iqn.2026-11.io.tessera:b"]
            .iter()
            .filter(|t| which == "All" || which == **t)
            .map(|t| (t.to_string(), vec!["127.0.0.1:3260,1".to_string()]))
            .collect()
    }
}

/// Split `input` into PDUs as a connection would (digests chosen by the
/// selector byte) and feed them to a full-feature [`Session`]; commands it
/// asks to run "complete" with an answer sized by the CDB. Data digest
/// errors end the connection, as in the target.
pub fn pdu(data: &[u8]) {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let d = Digests {
        header: sel & 1 != 0,
        data: sel & 2 != 0,
    };
    let mut params = login::Params::rfc_defaults(&Offer::default());
    params.header_digest = d.header;
    params.data_digest = d.data;
    params.immediate_data = sel & 4 != 0;
    params.initial_r2t = sel & 8 != 0;
    params.initiator_max_recv_data_segment_bytes = 512 << (sel >> 4 & 7);
    let discovery = sel & 0x80 != 0;
    let target = (!discovery).then(|| "iqn.2026-11.io.tessera:a".to_string());
    let mut s = Session::new(params, "iqn.fuzz:i".into(), target, 1, 1);
    let g = Geometry {
        block_size: 512,
        blocks: 1 << 16,
    };
    let mut buf = input;
    let mut effects = Vec::new();
    loop {
        let (p, used) = match pdu::decode(buf, d, DATA_MAX) {
            Ok(Some(x)) => x,
            Ok(None) | Err(_) => return,
        };
        assert!(used > 0 && used <= buf.len());
        buf = &buf[used..];
        s.receive(p, &Targets, &mut effects);
        let mut i = 0;
        while i < effects.len() {
            let e = std::mem::replace(&mut effects[i], Effect::Close(""));
            i += 1;
            match e {
                Effect::Send(p) => check_sent(&p, d),
                Effect::DataIn(di) => check_data_in(&di, d),
                Effect::Execute(task) => {
                    assert!(!discovery, "SCSI command run in a discovery session");
                    let (status, data) = match scsi::decode(&task.cdb, &g) {
                        Ok(c) => match c.transfer(&g) {
                            Transfer::In(n) => (0, vec![0u8; n.min(1 << 20) as usize]),
                            _ => (0, Vec::new()),
                        },
                        Err(_) => (2, Vec::new()),
                    };
                    let o = Outcome {
                        status,
                        sense: Vec::new(),
                        data,
                        out_wanted: task.edtl,
                    };
                    let mut more = Vec::new();
                    s.complete(&task, o, &mut more);
                    for m in more {
                        match m {
                            Effect::Send(p) => check_sent(&p, d),
                            Effect::DataIn(di) => check_data_in(&di, d),
                            other => panic!("completing a task gave {other:?}"),
                        }
                    }
                }
                Effect::Reset(_) => {}
                Effect::Close(_) => return,
            }
        }
        effects.clear();
        if let Some(p) = s.ping() {
            check_sent(&p, d);
        }
    }
}

/// What the fuzzed login's directory answers, from the selector byte.
struct Dir(u8);

fn chap(mutual: bool) -> Chap {
    Chap {
        user: "alice".into(),
        secret: b"alice-secret-1".to_vec(),
        mutual: mutual.then(|| ("tgt".to_string(), b"target-secret-2".to_vec())),
    }
}

impl Directory for Dir {
    fn access(&self, target: &str, _initiator: &str) -> Access {
        if !target.starts_with("iqn.2026-11.io.tessera:") {
            return Access::NotFound;
        }
        match self.0 % 5 {
            0 => Access::Allowed(None),
            1 => Access::Allowed(Some(chap(false))),
            2 => Access::Allowed(Some(chap(true))),
            3 => Access::Denied,
            _ => Access::Unavailable,
        }
    }
}

/// Drive the login state machine with arbitrary login PDUs (no digests
/// before login completes). Every answer is a login response that frames;
/// a successful login's parameters never exceed our offer or the RFC's
/// ranges, and it ends in full feature phase.
pub fn login(data: &[u8]) {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let offer = Offer::default();
    let mut l = Login::new(offer, [sel; 16], sel, 1, 1);
    let dir = Dir(sel);
    let mut buf = input;
    for _ in 0..=login::LOGIN_STEPS_MAX + 1 {
        let (p, used) = match pdu::decode(buf, Digests::default(), DATA_MAX) {
            Ok(Some(x)) => x,
            Ok(None) | Err(_) => return,
        };
        buf = &buf[used..];
        match l.step(&p, &dir) {
            Step::Continue(r) => {
                assert_eq!(r.opcode(), pdu::op::LOGIN_RESPONSE);
                assert_eq!(u16::from_be_bytes([r.bhs[36], r.bhs[37]]), 0);
                check_sent(&r, Digests::default());
            }
            Step::Fail(r) => {
                assert_eq!(r.opcode(), pdu::op::LOGIN_RESPONSE);
                assert_ne!(u16::from_be_bytes([r.bhs[36], r.bhs[37]]), 0);
                check_sent(&r, Digests::default());
                return;
            }
            Step::Done(r, done) => {
                check_sent(&r, Digests::default());
                assert_eq!(r.flags() & 0x83, 0x83, "T bit and NSG=3");
                let p = done.params;
                assert!(p.max_burst_bytes <= offer.max_burst_bytes);
                assert!(p.first_burst_bytes <= p.max_burst_bytes);
                assert!(p.max_outstanding_r2t <= offer.max_outstanding_r2t);
                let mrdsl = p.initiator_max_recv_data_segment_bytes as u64;
                assert!((login::LENGTH_MIN..=login::LENGTH_MAX).contains(&mrdsl));
                assert_eq!(p.error_recovery_level, 0);
                assert_eq!(p.max_connections, 1);
                return;
            }
        }
    }
    panic!("the login did not end within its step limit");
}

/// Decode an arbitrary CDB against a geometry picked by the first byte,
/// check the decoded command stays inside the logical unit and our limits,
/// and run the pure answer builders on it; the rest of the input also
/// serves as a parameter list (UNMAP, MODE SELECT, PERSISTENT RESERVE OUT).
pub fn cdb(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let g = Geometry {
        block_size: if sel & 1 == 0 { 512 } else { 4096 },
        blocks: [0u64, 1, 8, 1 << 20, u32::MAX as u64 + 7][(sel as usize >> 1) % 5],
    };
    let cdb_bytes = &rest[..rest.len().min(16)];
    let params = &rest[cdb_bytes.len()..];
    let mut raw = [0u8; 16];
    raw[..cdb_bytes.len()].copy_from_slice(cdb_bytes);
    let id = Identity {
        id: 7,
        serial: "fuzz".into(),
        target_name: "iqn.2026-11.io.tessera:a".into(),
        portal_group_tag: 1,
    };
    let mode = ModeState::default();
    for descriptor in [false, true] {
        // Sense data frames whatever decode said.
        if let Err(s) = scsi::decode(&raw, &g) {
            let e = s.encode(descriptor);
            assert!(e.len() >= 8 && e.len() <= 252);
        }
    }
    let Ok(c) = scsi::decode(&raw, &g) else {
        return;
    };
    let within = |lba: u64, blocks: u64| lba.checked_add(blocks).is_some_and(|e| e <= g.blocks);
    match c {
        Command::Read(r)
        | Command::Write(r)
        | Command::CompareAndWrite(r)
        | Command::OrWrite(r) => {
            assert!(within(r.lba, r.blocks as u64), "{c:?} beyond {g:?}");
            assert!(r.blocks as u64 <= g.transfer_blocks_max());
        }
        Command::Verify { rw, .. } | Command::WriteVerify { rw, .. } => {
            assert!(within(rw.lba, rw.blocks as u64), "{c:?} beyond {g:?}");
        }
        Command::PreFetch { lba, blocks } => assert!(within(lba, blocks as u64)),
        Command::WriteSame { lba, blocks, .. } => {
            assert!(within(lba, blocks), "{c:?} beyond {g:?}");
            assert!(blocks <= g.write_same_blocks_max());
        }
        Command::GetLbaStatus { lba, .. } => assert!(lba < g.blocks),
        Command::Unmap { len } | Command::ModeSelect { len, .. } | Command::PrOut { len, .. } => {
            assert!(len <= scsi::PARAMETER_LIST_BYTES_MAX);
        }
        _ => {}
    }
    match c {
        Command::Inquiry {
            evpd: true, page, ..
        } => {
            if let Some(d) = scsi::inquiry_vpd(page, &id, &g) {
                assert_eq!(d[1], page);
                assert_eq!(u16::from_be_bytes([d[2], d[3]]) as usize, d.len() - 4);
            }
        }
        Command::ModeSense { .. } => {
            let _ = scsi::mode_sense(&c, &g, &mode);
        }
        Command::ModeSelect { ten, .. } => {
            let _ = scsi::mode_select(ten, params, &g, &mode);
        }
        Command::ReportSupportedOpcodes { .. } => {
            let _ = scsi::report_supported_opcodes(&c);
        }
        Command::Unmap { .. } => {
            if let Ok(ranges) = scsi::unmap_ranges(params, &g) {
                for (lba, n) in ranges {
                    assert!(within(lba, n as u64), "UNMAP range beyond {g:?}");
                }
            }
        }
        Command::PrOut {
            action,
            scope,
            kind,
            ..
        } => {
            let mut r = Reservations::default();
            let before = r.clone();
            if r.out("iqn.fuzz:i,i,0x1", action, scope, kind, params)
                .is_err()
            {
                assert_eq!(r, before, "a refused PR OUT changed the state");
            }
            for a in 0..4 {
                let d = r.read(a, super::pr::transport_id);
                assert!(d.len() >= 8);
            }
        }
        Command::ReadCapacity16 { .. } => {
            assert_eq!(scsi::read_capacity16(&g).len(), 32);
        }
        _ => {}
    }
}
