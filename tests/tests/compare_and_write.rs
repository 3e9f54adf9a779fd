//! COMPARE AND WRITE at the storage daemons (`Op::CompareAndWrite`): the
//! primary of a chunk compares and writes with nothing else changing the
//! range in between, whichever connection (whichever gateway) the other
//! writes come from. Several raw internal-protocol connections stand for
//! several gateways: each increments a counter in one block by compare and
//! write, retrying on a miscompare, and not one increment may be lost. Run
//! on a single-copy cluster (the engine holds the range) and on three copies
//! (the replication primary holds it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tessera_tests::*;
use tessera_wire::header::{open_payload, seal_payload};
use tessera_wire::map::ClusterMap;
use tessera_wire::{Header, Op, Status};

const WRITERS: u64 = 8;
const INCREMENTS: u64 = 50;
/// The block the counter lives in: 512 bytes inside chunk 1.
const OFFSET: u32 = 8192 + 512;
const LEN: u32 = 512;

fn header(m: &ClusterMap, op: Op, length: u32) -> (String, Header) {
    let vol = m.volume_by_name("demo").expect("volume");
    let loc = m.locate(vol.id, 1).expect("placed");
    let mut h = Header::request(op, 0, m.epoch);
    h.volume_id = vol.id;
    h.chunk_index = 1;
    h.disk_id = loc.disk_id;
    h.offset = OFFSET;
    h.length = length;
    (loc.addr, h)
}

/// A client of the primary that follows the map when the daemon asks it
/// to (not serving yet, a newer map).
struct Client {
    c_manager: String,
    map: Option<ClusterMap>,
    peer: Option<(String, StoragePeer)>,
}

impl Client {
    fn new(c: &Cluster) -> Client {
        Client {
            c_manager: c.manager.clone(),
            map: None,
            peer: None,
        }
    }

    fn refresh(&mut self) {
        let text = http_get(&format!("{}/v1/map", self.c_manager)).expect("map");
        self.map = Some(serde_json::from_str(&text).expect("map json"));
    }

    /// Send `op` (with `token` for a compare and write) until the daemon
    /// gives an answer that is not "retry" (the map is fetched again after
    /// one).
    fn call(&mut self, op: Op, token: u64, payload: &[u8]) -> (Header, Vec<u8>) {
        let what = format!("a {op:?} answer other than retry");
        poll(&what, Duration::from_secs(30), || {
            if self.map.is_none() {
                self.refresh();
            }
            let m = self.map.as_ref().expect("map");
            let (addr, mut h) = header(m, op, LEN);
            h.chunk_version = token;
            if self.peer.as_ref().is_none_or(|(a, _)| *a != addr) {
                let p = StoragePeer::connect(&addr, &m.cluster_id, m.epoch);
                self.peer = Some((addr.clone(), p));
            }
            let (_, p) = self.peer.as_mut().expect("peer");
            let (r, data) = p.call(h, payload);
            if r.status.is_retryable() {
                self.map = None;
                return None;
            }
            Some((r, data))
        })
    }

    fn read(&mut self) -> Vec<u8> {
        let (r, data) = self.call(Op::Read, 0, &[]);
        assert_eq!(r.status, Status::Ok, "read");
        open_payload(&data).expect("payload crc").to_vec()
    }

    /// `Ok(())` when written, `Err(offset)` on a miscompare.
    fn compare_and_write(&mut self, token: u64, compare: &[u8], data: &[u8]) -> Result<(), u64> {
        let mut p = compare.to_vec();
        p.extend_from_slice(data);
        seal_payload(&mut p);
        let (r, _) = self.call(Op::CompareAndWrite, token, &p);
        match r.status {
            Status::Ok => Ok(()),
            Status::Miscompare => Err(r.chunk_version),
            s => panic!("compare and write answered {s:?}"),
        }
    }
}

/// The counter block: the value, then the writer and the increment that
/// wrote it, repeated to fill the block.
fn block(value: u64, writer: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(LEN as usize);
    while b.len() < LEN as usize {
        b.extend_from_slice(&value.to_le_bytes());
        b.extend_from_slice(&writer.to_le_bytes());
    }
    b
}

fn value_of(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

static TOKENS: AtomicU64 = AtomicU64::new(1);

fn token() -> u64 {
    // Distinct per test process run (both tests share the counter).
    (u64::from(std::process::id()) << 32) | TOKENS.fetch_add(1, Ordering::Relaxed)
}

fn exercise(c: &Cluster) {
    let mut first = Client::new(c);
    // A never-written block reads as zeroes and compares equal to them.
    assert_eq!(
        first.compare_and_write(token(), &vec![0u8; LEN as usize], &block(0, 0)),
        Ok(())
    );

    // A difference is reported at its byte offset and writes nothing.
    let mut wrong = block(0, 0);
    wrong[300] ^= 1;
    assert_eq!(
        first.compare_and_write(token(), &wrong, &block(99, 0)),
        Err(300)
    );
    assert_eq!(value_of(&first.read()), 0);

    // Racing writers: every increment lands exactly once.
    let writers: Vec<_> = (1..=WRITERS)
        .map(|w| {
            let mut cl = Client::new(c);
            std::thread::spawn(move || {
                let mut misses = 0u64;
                let mut seen = Vec::new();
                for _ in 0..INCREMENTS {
                    loop {
                        let cur = cl.read();
                        let v = value_of(&cur);
                        if cl
                            .compare_and_write(token(), &cur, &block(v + 1, w))
                            .is_ok()
                        {
                            seen.push(v);
                            break;
                        }
                        misses += 1;
                    }
                }
                (seen, misses)
            })
        })
        .collect();
    let misses = assert_each_increment_once(writers, WRITERS * INCREMENTS);
    assert_eq!(value_of(&first.read()), WRITERS * INCREMENTS);
    eprintln!(
        "{} increments by {WRITERS} writers, {misses} miscompares",
        WRITERS * INCREMENTS
    );

    // A resent request whose first attempt wrote is answered Ok and does
    // not write again (it would undo the write that came after it).
    let n = WRITERS * INCREMENTS;
    let t = token();
    let a = first.read();
    assert_eq!(first.compare_and_write(t, &a, &block(n + 1, 9)), Ok(()));
    assert_eq!(
        first.compare_and_write(token(), &block(n + 1, 9), &block(n + 2, 9)),
        Ok(())
    );
    assert_eq!(
        first.compare_and_write(t, &a, &block(n + 1, 9)),
        Ok(()),
        "the resend"
    );
    assert_eq!(value_of(&first.read()), n + 2, "the resend wrote nothing");

    // The primaries count what they decided.
    let count = |outcome: &str| -> f64 {
        let name = format!("tessera_storage_compare_and_writes_total{{outcome=\"{outcome}\"}}");
        c.storage_metrics()
            .iter()
            .map(|t| metric_sum(t, &name))
            .sum()
    };
    assert!(
        count("written") >= (n + 3) as f64,
        "written {}",
        count("written")
    );
    assert!(
        count("miscompare") >= 1.0,
        "miscompare {}",
        count("miscompare")
    );
}

// Proves compare and write is atomic at a single copy's storage daemon
// against writes from other connections, reports the first difference,
// and answers a resend of a written request Ok without writing again,
// also after the daemon was killed with -9 and restarted.
#[test]
fn compare_and_write_single_copy() {
    let dir = TempDir::new("caw-single");
    let opts = ClusterOptions {
        storage_daemons: 1,
        disk_size: "1G",
        volumes: vec![("demo".into(), "256M".into())],
    };
    let c = Cluster::start_with_args(dir.path(), &opts, &["none"], &[]);
    exercise(&c);
    // A resend that reaches the daemon after a restart: the token was
    // committed with the write (engine `CasDone`), so the new process
    // answers Ok instead of comparing again and finding its own write.
    let mut cl = Client::new(&c);
    let t = token();
    let a = cl.read();
    let next = block(value_of(&a) + 1, 7);
    assert_eq!(cl.compare_and_write(t, &a, &next), Ok(()));
    let (r, _) = cl.call(Op::Flush, 0, &[]);
    assert_eq!(r.status, Status::Ok, "flush");
    let pid = c.pid("storage-0");
    kill(pid, 9);
    poll("storage-0 restarted", Duration::from_secs(30), || {
        (c.pid("storage-0") != pid).then_some(())
    });
    let mut cl = Client::new(&c);
    assert_eq!(
        cl.compare_and_write(t, &a, &next),
        Ok(()),
        "the resend after a restart"
    );
    assert_eq!(cl.read(), next);
    c.stop();
}

// Proves the same at the primary of a three-copy group, and that every copy
// ends identical.
#[test]
fn compare_and_write_three_copies() {
    let dir = TempDir::new("caw-three");
    let opts = ClusterOptions {
        storage_daemons: 3,
        disk_size: "1G",
        volumes: vec![("demo".into(), "256M".into())],
    };
    let c = Cluster::start_with_args(dir.path(), &opts, &["none"], &["--replicas", "3"]);
    exercise(&c);
    assert!(compare_copies(&c, "demo") > 0);
    c.stop();
}
