//! Persistent reservations survive a gateway restart: two initiators
//! register and one reserves through a small raw iSCSI initiator (no
//! userspace tool sends PERSISTENT RESERVE OUT without a kernel SCSI
//! device), the gateway is killed with SIGKILL and restarted by `tessera
//! up`, and READ FULL STATUS, READ RESERVATION and the conflict a
//! non-holder's WRITE gets show the same state. The raw initiator uses the
//! gateway's own PDU codec only for framing; login, commands and parsing
//! of answers follow RFC 7143 / SPC-4 here.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tessera_gateway::iscsi::pdu::{self, Digests, Pdu, op};
use tessera_tests::{
    Cluster, ClusterOptions, TempDir, alive, assert_each_increment_once, bin, field, kill, poll,
};

const IQN: &str = "iqn.2026-11.io.tessera:";
const GOOD: u8 = 0x00;
const RESERVATION_CONFLICT: u8 = 0x18;

/// One logged-in session on one connection.
struct Session {
    s: TcpStream,
    buf: Vec<u8>,
    itt: u32,
    cmd_sn: u32,
    exp_stat_sn: u32,
}

/// What a SCSI command came back with.
struct Answer {
    status: u8,
    data: Vec<u8>,
    /// The SCSI Response's data segment: sense length (2 bytes), sense.
    sense: Vec<u8>,
}

impl Session {
    fn recv(&mut self) -> Pdu {
        loop {
            if let Some((p, used)) =
                pdu::decode(&self.buf, Digests::default(), 1 << 24).expect("valid PDU")
            {
                self.buf.drain(..used);
                return p;
            }
            let mut chunk = [0u8; 65536];
            let n = self.s.read(&mut chunk).expect("read from the target");
            assert!(n > 0, "the target closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn send(&mut self, p: &Pdu) {
        self.s
            .write_all(&p.to_bytes(Digests::default()))
            .expect("write to the target");
    }

    /// Log in straight into the operational stage (no authentication
    /// configured) and on to full feature phase.
    fn login(
        portal: &str,
        initiator: &str,
        isid: [u8; 6],
        volume: &str,
    ) -> Result<Session, String> {
        let s = TcpStream::connect(portal).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut me = Session {
            s,
            buf: Vec::new(),
            itt: 1,
            cmd_sn: 1,
            exp_stat_sn: 0,
        };
        let text = format!(
            "InitiatorName={initiator}\0TargetName={IQN}{volume}\0SessionType=Normal\0\
             HeaderDigest=None\0DataDigest=None\0ImmediateData=Yes\0InitialR2T=No\0\
             MaxRecvDataSegmentLength=262144\0"
        );
        let mut first = true;
        loop {
            let mut p = Pdu::new(op::LOGIN_REQUEST);
            p.set_immediate();
            // T=1, CSG=1 (operational), NSG=3 (full feature).
            p.set_flags(0x80 | (1 << 2) | 3);
            p.bhs[8..14].copy_from_slice(&isid);
            p.set_itt(0);
            p.set_u32_at(24, me.cmd_sn);
            p.set_u32_at(28, me.exp_stat_sn);
            if first {
                p.data = text.clone().into_bytes();
                first = false;
            }
            me.send(&p);
            let r = me.recv();
            assert_eq!(r.opcode(), op::LOGIN_RESPONSE);
            let status = u16::from_be_bytes([r.bhs[36], r.bhs[37]]);
            if status != 0 {
                return Err(format!("login status 0x{status:04x}"));
            }
            me.exp_stat_sn = r.field24().wrapping_add(1);
            if r.flags() & 0x80 != 0 && r.flags() & 3 == 3 {
                return Ok(me);
            }
        }
    }

    /// Run one command with `out` as immediate data (at most
    /// FirstBurstLength) and up to `in_len` bytes of Data-In.
    fn command(&mut self, cdb: &[u8], out: &[u8], in_len: u32) -> Answer {
        self.itt += 1;
        let mut p = Pdu::new(op::SCSI_COMMAND);
        let rw = if out.is_empty() { 0 } else { pdu::FLAG_WRITE }
            | if in_len > 0 { pdu::FLAG_READ } else { 0 };
        p.set_flags(pdu::FLAG_FINAL | rw | 1);
        p.set_lun(0);
        p.set_itt(self.itt);
        p.set_u32_at(
            20,
            if out.is_empty() {
                in_len
            } else {
                out.len() as u32
            },
        );
        p.set_u32_at(24, self.cmd_sn);
        p.set_u32_at(28, self.exp_stat_sn);
        p.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        p.data = out.to_vec();
        self.cmd_sn += 1;
        self.send(&p);
        let mut data = Vec::new();
        loop {
            let r = self.recv();
            match r.opcode() {
                op::DATA_IN => {
                    data.extend_from_slice(&r.data);
                    if r.flags() & pdu::FLAG_STATUS != 0 {
                        self.exp_stat_sn = r.field24().wrapping_add(1);
                        return Answer {
                            status: r.bhs[3],
                            data,
                            sense: Vec::new(),
                        };
                    }
                }
                op::SCSI_RESPONSE => {
                    self.exp_stat_sn = r.field24().wrapping_add(1);
                    return Answer {
                        status: r.bhs[3],
                        data,
                        sense: r.data,
                    };
                }
                op::NOP_IN => {}
                other => panic!("unexpected PDU 0x{other:02x}"),
            }
        }
    }

    /// PERSISTENT RESERVE OUT (SPC-4 §6.16), 24-byte parameter list.
    fn pr_out(&mut self, action: u8, kind: u8, key: u64, sa_key: u64) -> u8 {
        let mut params = [0u8; 24];
        params[0..8].copy_from_slice(&key.to_be_bytes());
        params[8..16].copy_from_slice(&sa_key.to_be_bytes());
        let cdb = [0x5f, action, kind, 0, 0, 0, 0, 0, 24, 0];
        self.command(&cdb, &params, 0).status
    }

    /// PERSISTENT RESERVE IN (SPC-4 §6.15).
    fn pr_in(&mut self, action: u8) -> Vec<u8> {
        let cdb = [0x5e, action, 0, 0, 0, 0, 0, 0x10, 0, 0];
        let a = self.command(&cdb, &[], 4096);
        assert_eq!(a.status, GOOD, "PERSISTENT RESERVE IN");
        a.data
    }

    /// WRITE(10) of one 512-byte block at LBA 0.
    fn write_block(&mut self) -> u8 {
        self.write_block_sense().0
    }

    /// WRITE(10) of one 512-byte block at LBA 0: the status and, for a
    /// CHECK CONDITION, the sense key.
    fn write_block_sense(&mut self) -> (u8, Option<u8>) {
        let cdb = [0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        let a = self.command(&cdb, &[0x5a; 512], 0);
        // Fixed format (0x70/0x71): key in byte 2; descriptor: byte 1.
        let key = match a.sense.get(2) {
            Some(0x70 | 0x71) => a.sense.get(4).map(|k| k & 0x0f),
            Some(0x72 | 0x73) => a.sense.get(3).map(|k| k & 0x0f),
            _ => None,
        };
        (a.status, key)
    }
}

/// READ FULL STATUS (§6.15.5) as (key, holder, type, transport id text).
fn full_status(d: &[u8]) -> Vec<(u64, bool, u8, String)> {
    let len = u32::from_be_bytes(d[4..8].try_into().unwrap()) as usize;
    let mut out = Vec::new();
    let mut at = 8;
    while at + 24 <= 8 + len {
        let key = u64::from_be_bytes(d[at..at + 8].try_into().unwrap());
        let holder = d[at + 12] & 1 != 0;
        let kind = d[at + 13] & 0x0f;
        let tid_len = u32::from_be_bytes(d[at + 20..at + 24].try_into().unwrap()) as usize;
        // iSCSI TransportID, format 01b (§7.6.4.6): a 4-byte header, then
        // "<initiator>,i,0x<ISID>"; keep the initiator name.
        let tid = String::from_utf8_lossy(&d[at + 28..at + 24 + tid_len])
            .trim_end_matches('\0')
            .split(",i,")
            .next()
            .unwrap_or("")
            .to_string();
        out.push((key, holder, kind, tid));
        at += 24 + tid_len;
    }
    out
}

const A: &str = "iqn.2020-01.test:node-a";
const B: &str = "iqn.2020-01.test:node-b";
const ISID_A: [u8; 6] = [0x40, 0, 0, 0, 0, 0xa];
const ISID_B: [u8; 6] = [0x40, 0, 0, 0, 0, 0xb];
const KEY_A: u64 = 0xaaaa_0000_0000_0001;
const KEY_B: u64 = 0xbbbb_0000_0000_0002;
const WRITE_EXCLUSIVE: u8 = 1;

// Proves persistent reservations are kept by the manager: registrations and
// a WRITE EXCLUSIVE reservation made before the gateway is killed with
// SIGKILL are reported identically by READ FULL STATUS and READ
// RESERVATION after `tessera up` restarts it, still fence the other
// initiator's writes, and still let the holder write.
#[test]
fn reservations_survive_gateway_restart() {
    let dir = TempDir::new("iscsi-pr-restart");
    let opts = ClusterOptions {
        storage_daemons: 1,
        disk_size: "1G",
        volumes: vec![("prv".into(), "64M".into())],
    };
    let cluster = Cluster::start(&dir.0, &opts);
    let portal = cluster.iscsi[0].clone();
    let mut a = Session::login(&portal, A, ISID_A, "prv").expect("login A");
    let mut b = Session::login(&portal, B, ISID_B, "prv").expect("login B");
    assert_eq!(a.pr_out(0x00, 0, 0, KEY_A), GOOD, "A registers");
    assert_eq!(b.pr_out(0x00, 0, 0, KEY_B), GOOD, "B registers");
    assert_eq!(
        a.pr_out(0x01, WRITE_EXCLUSIVE, KEY_A, 0),
        GOOD,
        "A reserves"
    );
    assert_eq!(b.write_block(), RESERVATION_CONFLICT, "B fenced");
    assert_eq!(a.write_block(), GOOD, "A writes");
    let before = full_status(&a.pr_in(0x03));
    let reservation = a.pr_in(0x01);
    assert_eq!(before.len(), 2, "{before:?}");
    assert!(
        before.contains(&(KEY_A, true, WRITE_EXCLUSIVE, A.to_string()))
            && before.contains(&(KEY_B, false, 0, B.to_string())),
        "{before:?}"
    );
    drop((a, b));

    let old = cluster.pid("gateway");
    kill(old, 9);
    poll("the gateway to restart", Duration::from_secs(60), || {
        (!alive(old) && cluster.pid("gateway") != old).then_some(())
    });
    let mut b = poll("a login after the restart", Duration::from_secs(30), || {
        Session::login(&portal, B, ISID_B, "prv").ok()
    });
    let after = full_status(&b.pr_in(0x03));
    assert_eq!(after, before, "READ FULL STATUS after the restart");
    assert_eq!(
        b.pr_in(0x01),
        reservation,
        "READ RESERVATION after the restart"
    );
    assert_eq!(b.write_block(), RESERVATION_CONFLICT, "B still fenced");
    let mut a = Session::login(&portal, A, ISID_A, "prv").expect("login A again");
    assert_eq!(a.write_block(), GOOD, "the holder still writes");
    // A release is stored too: after another restart nobody holds it.
    assert_eq!(
        a.pr_out(0x02, WRITE_EXCLUSIVE, KEY_A, 0),
        GOOD,
        "A releases"
    );
    drop((a, b));
    let old = cluster.pid("gateway");
    kill(old, 9);
    poll(
        "the gateway to restart again",
        Duration::from_secs(60),
        || (!alive(old) && cluster.pid("gateway") != old).then_some(()),
    );
    let mut b = poll(
        "a login after the second restart",
        Duration::from_secs(30),
        || Session::login(&portal, B, ISID_B, "prv").ok(),
    );
    let last = full_status(&b.pr_in(0x03));
    assert!(last.iter().all(|r| !r.1), "nobody holds it: {last:?}");
    assert_eq!(last.len(), 2, "both still registered: {last:?}");
    assert_eq!(b.write_block(), GOOD, "B writes once released");
}

/// A second gateway of the same cluster, stopped (SIGKILL) when dropped.
struct Gateway {
    child: Child,
    iscsi: String,
}

impl Gateway {
    fn start(cluster: &Cluster) -> Gateway {
        let mut child = Command::new(bin("tessera-gateway"))
            .arg("--manager")
            .arg(&cluster.manager)
            .args(["--nbd-listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(["--iscsi-listen", "127.0.0.1:0"])
            .arg("--cluster-secret-file")
            .arg(cluster.dir.join("manager").join("cluster-secret"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn a second gateway");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = loop {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("READY ") => break l,
                Some(Ok(_)) => {}
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the second gateway exited before READY");
                }
            }
        };
        // Keep draining stdout so the gateway never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let iscsi = field(&ready, "iscsi").expect("iscsi address in READY");
        Gateway { child, iscsi }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// Proves two gateways serving one volume share its persistent reservations
// without losing each other's changes: initiators register through
// different gateways (each store is a compare-and-swap on the manager's
// versioned state, so the second registration is evaluated again on the
// first one's state instead of overwriting it), READ FULL STATUS through
// either gateway lists both, a reservation taken through one gateway
// fences the other initiator's writes through the other gateway as soon as
// it is answered (each change waits for the other gateway to hold it), and
// its release there lets them through at once.
#[test]
fn reservations_shared_by_two_gateways() {
    let dir = TempDir::new("iscsi-pr-two-gateways");
    let opts = ClusterOptions {
        storage_daemons: 1,
        disk_size: "1G",
        volumes: vec![("prv".into(), "64M".into())],
    };
    let cluster = Cluster::start(&dir.0, &opts);
    let second = Gateway::start(&cluster);
    let mut a = Session::login(&cluster.iscsi[0], A, ISID_A, "prv").expect("login A, gateway 1");
    let mut b = Session::login(&second.iscsi, B, ISID_B, "prv").expect("login B, gateway 2");
    // Both logical units exist (and loaded the empty state) before either
    // registration: gateway 2's registration is computed from a state
    // that lacks A's, so only the compare-and-swap keeps A's.
    assert!(full_status(&a.pr_in(0x03)).is_empty());
    assert!(full_status(&b.pr_in(0x03)).is_empty());
    assert_eq!(a.pr_out(0x00, 0, 0, KEY_A), GOOD, "A registers");
    assert_eq!(b.pr_out(0x00, 0, 0, KEY_B), GOOD, "B registers");
    let both = |st: &[(u64, bool, u8, String)]| {
        st.len() == 2
            && st.iter().any(|r| r.0 == KEY_A && r.3 == A)
            && st.iter().any(|r| r.0 == KEY_B && r.3 == B)
    };
    let via_b = full_status(&b.pr_in(0x03));
    assert!(
        both(&via_b),
        "gateway 2 after both registrations: {via_b:?}"
    );
    // Each change is answered only once the other gateway holds it: no
    // waiting here.
    let via_a = full_status(&a.pr_in(0x03));
    assert!(
        both(&via_a),
        "gateway 1 after both registrations: {via_a:?}"
    );

    assert_eq!(
        a.pr_out(0x01, WRITE_EXCLUSIVE, KEY_A, 0),
        GOOD,
        "A reserves through gateway 1"
    );
    assert_eq!(
        b.write_block(),
        RESERVATION_CONFLICT,
        "gateway 2 fences B as soon as the reservation is answered"
    );
    let via_b = full_status(&b.pr_in(0x03));
    assert!(
        via_b.contains(&(KEY_A, true, WRITE_EXCLUSIVE, A.to_string())),
        "{via_b:?}"
    );
    assert_eq!(a.write_block(), GOOD, "the holder writes");

    // A reservation conflict through gateway 2 is judged on the stored
    // state: B cannot reserve while A holds it.
    assert_eq!(
        b.pr_out(0x01, WRITE_EXCLUSIVE, KEY_B, 0),
        RESERVATION_CONFLICT,
        "B reserves while A holds it"
    );
    assert_eq!(
        a.pr_out(0x02, WRITE_EXCLUSIVE, KEY_A, 0),
        GOOD,
        "A releases through gateway 1"
    );
    assert_eq!(
        b.write_block(),
        GOOD,
        "gateway 2 lets B write as soon as the release is answered"
    );
    drop((a, b, second));
}

const CHECK_CONDITION: u8 = 0x02;
/// The block the counter of `compare_and_write_through_two_gateways` lives in.
const COUNTER_LBA: u32 = 8;

impl Session {
    /// READ(10) of the 512-byte block at `lba`.
    fn read_block_at(&mut self, lba: u32) -> Vec<u8> {
        let l = lba.to_be_bytes();
        let cdb = [0x28, 0, l[0], l[1], l[2], l[3], 0, 0, 1, 0];
        let a = self.command(&cdb, &[], 512);
        assert_eq!(a.status, GOOD, "READ(10)");
        a.data
    }

    /// ORWRITE(16) of one block at `lba`: the status.
    fn or_write(&mut self, lba: u32, data: &[u8]) -> u8 {
        let l = u64::from(lba).to_be_bytes();
        let mut cdb = [0u8; 16];
        cdb[0] = 0x8b;
        cdb[2..10].copy_from_slice(&l);
        cdb[13] = 1;
        self.command(&cdb, data, 0).status
    }

    /// COMPARE AND WRITE(16) of one block at `lba`: the status.
    fn compare_and_write(&mut self, lba: u32, compare: &[u8], data: &[u8]) -> u8 {
        let l = u64::from(lba).to_be_bytes();
        let mut cdb = [0u8; 16];
        cdb[0] = 0x89;
        cdb[2..10].copy_from_slice(&l);
        cdb[13] = 1;
        let mut out = compare.to_vec();
        out.extend_from_slice(data);
        self.command(&cdb, &out, 0).status
    }
}

/// A one-daemon cluster serving `volume` (64 MiB) through two gateway
/// processes, and four threads each running `work(i, session)` on its own
/// session, alternately through the first and the second gateway (ISIDs
/// differ by `tag` between tests).
#[allow(clippy::type_complexity)]
fn on_two_gateways<T: Send + 'static>(
    volume: &str,
    tag: u8,
    work: impl Fn(usize, Session) -> T + Send + Sync + 'static,
) -> (TempDir, Cluster, Gateway, Vec<std::thread::JoinHandle<T>>) {
    let dir = TempDir::new(&format!("iscsi-{volume}-two-gateways"));
    let opts = ClusterOptions {
        storage_daemons: 1,
        disk_size: "1G",
        volumes: vec![(volume.into(), "64M".into())],
    };
    let cluster = Cluster::start(&dir.0, &opts);
    let second = Gateway::start(&cluster);
    let portals = [
        cluster.iscsi[0].clone(),
        second.iscsi.clone(),
        cluster.iscsi[0].clone(),
        second.iscsi.clone(),
    ];
    let work = std::sync::Arc::new(work);
    let workers = portals
        .into_iter()
        .enumerate()
        .map(|(i, portal)| {
            let (work, volume) = (std::sync::Arc::clone(&work), volume.to_string());
            std::thread::spawn(move || {
                let name = format!("iqn.2020-01.test:{volume}-{i}");
                let isid = [0x40, 0, 0, 0, tag, i as u8];
                let s = Session::login(&portal, &name, isid, &volume).expect("login");
                work(i, s)
            })
        })
        .collect();
    (dir, cluster, second, workers)
}

// Proves COMPARE AND WRITE is atomic across gateways: initiators logged in
// to two gateway processes of one cluster increment a counter in one block
// by READ + COMPARE AND WRITE, retrying on a miscompare (CHECK CONDITION),
// and every increment lands exactly once (a lost update would let two of
// them start from the same value). Before the compare moved to the storage
// daemon, each gateway only locked against its own writes.
#[test]
fn compare_and_write_through_two_gateways() {
    const PER_SESSION: u64 = 30;
    let (_dir, cluster, _second, workers) = on_two_gateways("cawv", 1, |i, mut s| {
        let mut seen = Vec::new();
        let mut misses = 0u64;
        while (seen.len() as u64) < PER_SESSION {
            let cur = s.read_block_at(COUNTER_LBA);
            let v = u64::from_le_bytes(cur[..8].try_into().expect("8 bytes"));
            let mut next = vec![i as u8; 512];
            next[..8].copy_from_slice(&(v + 1).to_le_bytes());
            match s.compare_and_write(COUNTER_LBA, &cur, &next) {
                GOOD => seen.push(v),
                CHECK_CONDITION => misses += 1,
                other => panic!("COMPARE AND WRITE status 0x{other:02x}"),
            }
        }
        (seen, misses)
    });
    let misses = assert_each_increment_once(workers, 4 * PER_SESSION);
    eprintln!(
        "{} increments through two gateways, {misses} miscompares",
        4 * PER_SESSION
    );
    let mut check = Session::login(&cluster.iscsi[0], A, ISID_A, "cawv").expect("login");
    let last = check.read_block_at(COUNTER_LBA);
    assert_eq!(
        u64::from_le_bytes(last[..8].try_into().unwrap()),
        4 * PER_SESSION
    );
}

/// The block `or_write_through_two_gateways` sets bits in.
const BITS_LBA: u32 = 16;

// Proves ORWRITE is atomic across gateways: initiators logged in to two
// gateway processes of one cluster each set their own 30 bits of one block
// with ORWRITE, one bit per command, and every bit is set at the end (a
// read-OR-write that another gateway's interleaves with loses the other's
// bits). Before ORWRITE went through the storage daemon's compare and
// write, each gateway locked only against its own writes.
#[test]
fn or_write_through_two_gateways() {
    const PER_SESSION: usize = 30;
    let (_dir, cluster, second, workers) = on_two_gateways("orw", 2, |i, mut s| {
        for k in 0..PER_SESSION {
            let bit = i * PER_SESSION + k;
            let mut d = vec![0u8; 512];
            d[bit / 8] = 1 << (bit % 8);
            assert_eq!(s.or_write(BITS_LBA, &d), GOOD, "ORWRITE of bit {bit}");
        }
    });
    for w in workers {
        w.join().expect("worker");
    }
    let mut check = Session::login(&cluster.iscsi[0], A, ISID_A, "orw").expect("login");
    let block = check.read_block_at(BITS_LBA);
    let missing: Vec<usize> = (0..4 * PER_SESSION)
        .filter(|b| block[b / 8] & (1 << (b % 8)) == 0)
        .collect();
    assert!(missing.is_empty(), "bits lost: {missing:?}");
    assert!(
        block[(4 * PER_SESSION).div_ceil(8)..]
            .iter()
            .all(|b| *b == 0),
        "bits set that nobody wrote"
    );
    drop(second);
}

const ABORTED_COMMAND: u8 = 0x0b;

// Proves a gateway's lease on its reservation state: once it has not
// heard from the manager for longer than its lease (the manager stopped),
// it refuses a write to a logical unit with registrations with ABORTED
// COMMAND (another gateway may have fenced this initiator meanwhile), and
// serves it again once the manager answers.
#[test]
fn a_gateway_cut_off_from_the_manager_refuses_fenceable_writes() {
    let dir = TempDir::new("iscsi-pr-lease");
    let opts = ClusterOptions {
        storage_daemons: 1,
        disk_size: "1G",
        volumes: vec![("lease".into(), "64M".into())],
    };
    let cluster = Cluster::start(&dir.0, &opts);
    let mut a = Session::login(&cluster.iscsi[0], A, ISID_A, "lease").expect("login");
    assert_eq!(a.pr_out(0x00, 0, 0, KEY_A), GOOD, "A registers");
    assert_eq!(a.write_block(), GOOD);
    let frozen = cluster.freeze("manager");
    let refused = poll(
        "the gateway's lease to lapse",
        Duration::from_secs(30),
        || {
            let (status, key) = a.write_block_sense();
            (status == CHECK_CONDITION).then_some(key)
        },
    );
    assert_eq!(refused, Some(ABORTED_COMMAND));
    frozen.resume();
    poll(
        "writes again once the manager answers",
        Duration::from_secs(30),
        || (a.write_block() == GOOD).then_some(()),
    );
}
