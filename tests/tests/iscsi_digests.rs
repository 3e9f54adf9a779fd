//! The iSCSI data path with CRC32C header and data digests, against the
//! real gateway: a raw initiator (libiscsi offers no data digests) logs in
//! asking for both digests, writes 1 MiB through immediate data, an
//! unsolicited Data-Out and R2T-solicited Data-Outs (odd lengths, so pads
//! are digested too), reads it back as Data-In PDUs cut at its own
//! MaxRecvDataSegmentLength, and every PDU the target sends is checked
//! against its digests by the gateway's own codec (`pdu::decode`). The
//! target sends Data-In payloads from where they lie with the digest
//! computed over the slice (`iscsi/stream.rs`), and reads data segments
//! straight into place; this is what proves both on the wire. A PDU with a
//! wrong data digest gets a Reject (data digest error) and the connection
//! ends (ERL 0).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use tessera_gateway::iscsi::pdu::{self, Digests, Pdu, TAG_NONE, op};
use tessera_tests::{Cluster, ClusterOptions, TempDir};

const IQN: &str = "iqn.2026-11.io.tessera:";
const DIGESTS: Digests = Digests {
    header: true,
    data: true,
};
/// What this initiator offers and declares.
const FIRST_BURST: usize = 65536;
const MAX_BURST: usize = 262144;
const OUR_MAX_RECV: usize = 65536;
/// Data-Out PDUs after an R2T: odd, so the pad is digested, and larger than
/// the gateway's read buffer, so the payload is read straight into place.
const DATA_OUT_PDU: usize = 100_003;

struct Session {
    s: TcpStream,
    buf: Vec<u8>,
    digests: Digests,
    itt: u32,
    cmd_sn: u32,
    exp_stat_sn: u32,
}

impl Session {
    /// The next PDU; `None` when the target closed the connection.
    fn recv(&mut self) -> Option<Pdu> {
        loop {
            match pdu::decode(&self.buf, self.digests, 1 << 24) {
                Ok(Some((p, used))) => {
                    self.buf.drain(..used);
                    return Some(p);
                }
                Ok(None) => {}
                Err((e, _)) => panic!("the target sent a bad PDU: {e}"),
            }
            let mut chunk = [0u8; 65536];
            let n = self.s.read(&mut chunk).expect("read from the target");
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn send(&mut self, p: &Pdu) {
        self.s
            .write_all(&p.to_bytes(self.digests))
            .expect("write to the target");
    }

    fn login(portal: &str, volume: &str) -> Session {
        let s = TcpStream::connect(portal).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut me = Session {
            s,
            buf: Vec::new(),
            digests: Digests::default(),
            itt: 1,
            cmd_sn: 1,
            exp_stat_sn: 0,
        };
        let text = format!(
            "InitiatorName=iqn.2020-01.test:digests\0TargetName={IQN}{volume}\0\
             SessionType=Normal\0HeaderDigest=CRC32C,None\0DataDigest=CRC32C,None\0\
             ImmediateData=Yes\0InitialR2T=No\0FirstBurstLength={FIRST_BURST}\0\
             MaxBurstLength={MAX_BURST}\0MaxRecvDataSegmentLength={OUR_MAX_RECV}\0"
        );
        let mut answers = String::new();
        let mut first = true;
        loop {
            let mut p = Pdu::new(op::LOGIN_REQUEST);
            p.set_immediate();
            // T=1, CSG=1 (operational), NSG=3 (full feature).
            p.set_flags(0x80 | (1 << 2) | 3);
            p.bhs[8..14].copy_from_slice(&[0x40, 0, 0, 0, 0, 0xd]);
            p.set_itt(0);
            p.set_u32_at(24, me.cmd_sn);
            p.set_u32_at(28, me.exp_stat_sn);
            if first {
                p.data = text.clone().into_bytes();
                first = false;
            }
            me.send(&p);
            let r = me.recv().expect("login response");
            assert_eq!(r.opcode(), op::LOGIN_RESPONSE);
            let status = u16::from_be_bytes([r.bhs[36], r.bhs[37]]);
            assert_eq!(status, 0, "login status 0x{status:04x}");
            answers.push_str(&String::from_utf8_lossy(&r.data));
            me.exp_stat_sn = r.field24().wrapping_add(1);
            if r.flags() & 0x80 != 0 && r.flags() & 3 == 3 {
                break;
            }
        }
        assert!(answers.contains("HeaderDigest=CRC32C"), "{answers:?}");
        assert!(answers.contains("DataDigest=CRC32C"), "{answers:?}");
        // §13.1: digests start with the first PDU after the login phase.
        me.digests = DIGESTS;
        me
    }

    fn command_pdu(&mut self, cdb: &[u8], flags: u8, edtl: usize) -> Pdu {
        self.itt += 1;
        let mut p = Pdu::new(op::SCSI_COMMAND);
        p.set_flags(flags | 1);
        p.set_itt(self.itt);
        p.set_u32_at(20, edtl as u32);
        p.set_u32_at(24, self.cmd_sn);
        p.set_u32_at(28, self.exp_stat_sn);
        p.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        self.cmd_sn += 1;
        p
    }

    fn data_out(&mut self, ttt: u32, datasn: u32, offset: usize, d: &[u8], fin: bool) {
        let mut p = Pdu::new(op::DATA_OUT);
        p.set_flags(if fin { pdu::FLAG_FINAL } else { 0 });
        p.set_itt(self.itt);
        p.set_u32_at(20, ttt);
        p.set_u32_at(28, self.exp_stat_sn);
        p.set_u32_at(36, datasn);
        p.set_u32_at(40, offset as u32);
        p.data = d.to_vec();
        self.send(&p);
    }

    /// WRITE(10) of `data` at LBA 0: 16 KiB immediate, the rest of the
    /// first burst unsolicited, then whatever the target asks for by R2T.
    fn write(&mut self, data: &[u8]) -> u8 {
        let blocks = (data.len() / 512) as u16;
        let mut cdb = [0x2a, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        let immediate = 16384;
        let mut p = self.command_pdu(&cdb, pdu::FLAG_WRITE, data.len());
        p.data = data[..immediate].to_vec();
        self.send(&p);
        self.data_out(TAG_NONE, 0, immediate, &data[immediate..FIRST_BURST], true);
        loop {
            let r = self.recv().expect("an answer to the write");
            match r.opcode() {
                op::R2T => {
                    let (ttt, at, len) = (r.field20(), r.field40() as usize, r.field44() as usize);
                    let mut sn = 0;
                    let mut off = at;
                    while off < at + len {
                        let end = (off + DATA_OUT_PDU).min(at + len);
                        self.data_out(ttt, sn, off, &data[off..end], end == at + len);
                        sn += 1;
                        off = end;
                    }
                }
                op::SCSI_RESPONSE => {
                    self.exp_stat_sn = r.field24().wrapping_add(1);
                    return r.bhs[3];
                }
                op::NOP_IN => {}
                other => panic!("unexpected PDU 0x{other:02x}"),
            }
        }
    }

    /// A command with Data-In: (status, data, Data-In PDUs seen).
    fn read(&mut self, cdb: &[u8], len: usize) -> (u8, Vec<u8>, usize) {
        let p = self.command_pdu(cdb, pdu::FLAG_FINAL | pdu::FLAG_READ, len);
        self.send(&p);
        let mut data = Vec::new();
        let mut pdus = 0;
        loop {
            let r = self.recv().expect("an answer to the read");
            match r.opcode() {
                op::DATA_IN => {
                    assert!(r.data.len() <= OUR_MAX_RECV, "Data-In beyond our limit");
                    assert_eq!(r.field40() as usize, data.len(), "buffer offset");
                    assert_eq!(r.field36() as usize, pdus, "DataSN");
                    pdus += 1;
                    data.extend_from_slice(&r.data);
                    if r.flags() & pdu::FLAG_STATUS != 0 {
                        self.exp_stat_sn = r.field24().wrapping_add(1);
                        return (r.bhs[3], data, pdus);
                    }
                }
                op::SCSI_RESPONSE => {
                    self.exp_stat_sn = r.field24().wrapping_add(1);
                    return (r.bhs[3], data, pdus);
                }
                op::NOP_IN => {}
                other => panic!("unexpected PDU 0x{other:02x}"),
            }
        }
    }
}

// Proves writes and reads with CRC32C header and data digests: 1 MiB written
// through immediate data, unsolicited and solicited Data-Out (odd PDU
// lengths) reads back identically as 16 Data-In PDUs whose digests check;
// a 37-byte INQUIRY answer (3 pad bytes) checks too; and a WRITE whose
// immediate data has a wrong data digest is rejected with reason 0x02
// before the connection ends.
#[test]
fn digests_on_the_data_path() {
    let dir = TempDir::new("iscsi-digests");
    let opts = ClusterOptions {
        storage_daemons: 1,
        disk_size: "1G",
        volumes: vec![("dig".into(), "64M".into())],
    };
    let cluster = Cluster::start(&dir.0, &opts);
    let portal = cluster.iscsi[0].clone();
    let mut s = Session::login(&portal, "dig");

    let data: Vec<u8> = (0..1usize << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    assert_eq!(s.write(&data), 0, "WRITE(10) of 1 MiB");
    let (status, back, pdus) = s.read(&[0x28, 0, 0, 0, 0, 0, 0, 0x08, 0, 0], data.len());
    assert_eq!(status, 0, "READ(10)");
    assert_eq!(pdus, data.len() / OUR_MAX_RECV);
    assert!(back == data, "read back differs");

    let (status, inq, _) = s.read(&[0x12, 0, 0, 0, 37, 0], 37);
    assert_eq!((status, inq.len()), (0, 37), "INQUIRY");

    // Immediate data with its digest flipped.
    let mut p = s.command_pdu(
        &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        pdu::FLAG_FINAL | pdu::FLAG_WRITE,
        512,
    );
    p.data = vec![0x77; 512];
    let mut bytes = p.to_bytes(DIGESTS);
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    s.s.write_all(&bytes).expect("write");
    let r = loop {
        let r = s.recv().expect("a Reject before the close");
        if r.opcode() != op::NOP_IN {
            break r;
        }
    };
    assert_eq!(r.opcode(), op::REJECT);
    assert_eq!(r.bhs[2], pdu::reject::DATA_DIGEST_ERROR);
    assert_eq!(
        &r.data[..pdu::BHS_BYTES],
        &bytes[..pdu::BHS_BYTES],
        "the rejected header"
    );
    assert!(s.recv().is_none(), "the connection ends (ERL 0)");

    // The bad write changed nothing.
    let mut s = Session::login(&portal, "dig");
    let (status, first, _) = s.read(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], 512);
    assert_eq!(status, 0);
    assert_eq!(first[..], data[..512]);
}
