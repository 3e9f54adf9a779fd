//! The storage daemon's edge: a raw internal-protocol client against a real
//! `tessera-storage` (started by `tessera up`) checks that every field from
//! the network is validated — cluster id, header, epoch, disk, volume, chunk
//! bounds, payload CRC — with the documented status, and that a peer
//! sending garbage loses its connection without disturbing anyone else.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use tessera_tests::*;
use tessera_wire::header::{HEADER_SIZE, open_payload, seal_payload};
use tessera_wire::map::ClusterMap;
use tessera_wire::{Flags, Header, Op, Status};

struct Peer {
    s: TcpStream,
    next_id: u64,
}

impl Peer {
    fn connect(addr: &str) -> Peer {
        let s = TcpStream::connect(addr).expect("connect to storage daemon");
        s.set_read_timeout(Some(Duration::from_secs(10))).ok();
        s.set_nodelay(true).ok();
        Peer { s, next_id: 1 }
    }

    fn send(&mut self, mut h: Header, payload: &[u8]) -> u64 {
        h.request_id = self.next_id;
        self.next_id += 1;
        h.payload_len = payload.len() as u32;
        self.s.write_all(&h.to_bytes()).expect("send header");
        self.s.write_all(payload).expect("send payload");
        h.request_id
    }

    /// The next reply, or `None` if the daemon closed the connection.
    fn recv(&mut self) -> Option<(Header, Vec<u8>)> {
        let mut hb = [0u8; HEADER_SIZE];
        self.s.read_exact(&mut hb).ok()?;
        let h = Header::decode(&hb).expect("daemon sends valid headers");
        let mut p = vec![0u8; h.payload_len as usize];
        self.s.read_exact(&mut p).ok()?;
        Some((h, p))
    }

    fn hello(&mut self, cluster_id: &str, epoch: u64) -> Status {
        let mut p = cluster_id.as_bytes().to_vec();
        seal_payload(&mut p);
        self.send(Header::request(Op::Hello, 0, epoch), &p);
        self.recv().expect("hello reply").0.status
    }

    fn call(&mut self, h: Header, payload: &[u8]) -> (Header, Vec<u8>) {
        let id = self.send(h, payload);
        let (r, p) = self.recv().expect("reply");
        assert_eq!(r.request_id, id);
        assert!(r.reply);
        (r, p)
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

fn map(c: &Cluster) -> ClusterMap {
    let text = http_get(&format!("{}/v1/map", c.manager)).expect("map");
    serde_json::from_str(&text).expect("map json")
}

fn req(m: &ClusterMap, op: Op, chunk: u32, offset: u32, length: u32) -> Header {
    let vol = m.volume_by_name("demo").expect("volume");
    let loc = m.locate(vol.id, chunk).expect("placed");
    let mut h = Header::request(op, 0, m.epoch);
    h.volume_id = vol.id;
    h.chunk_index = chunk;
    h.disk_id = loc.disk_id;
    h.offset = offset;
    h.length = length;
    h
}

// Proves each validation branch at the storage daemon's edge answers with
// its status (or closes a desynchronised stream), and that data written at
// the wire level reads back with its chunk version advancing.
#[test]
fn storage_edge_validation() {
    let dir = TempDir::new("storage-edge");
    let opts = ClusterOptions {
        storage_daemons: 1,
        disk_size: "1G",
        volumes: vec![("demo".into(), "64M".into())],
    };
    let c = Cluster::start(dir.path(), &opts);
    let m = map(&c);
    let vol = m.volume_by_name("demo").expect("volume").clone();
    let addr = m.locate(vol.id, 0).expect("placed").addr;

    // Wrong cluster id: refused, then closed.
    let mut p = Peer::connect(&addr);
    assert_eq!(p.hello("not-this-cluster", m.epoch), Status::Refused);
    assert!(p.closed());

    // A request before Hello: closed.
    let mut p = Peer::connect(&addr);
    p.send(req(&m, Op::Read, 0, 0, 4096), &[]);
    assert!(p.recv().is_none());

    // Garbage instead of a header: closed, and a well-behaved peer on
    // another connection is served meanwhile.
    let mut bad = Peer::connect(&addr);
    let mut good = Peer::connect(&addr);
    assert_eq!(good.hello(&m.cluster_id, m.epoch), Status::Ok);
    bad.s.write_all(&[0xAB; HEADER_SIZE]).expect("send garbage");
    assert!(bad.recv().is_none());
    let (r, _) = good.call(req(&m, Op::Read, 0, 0, 4096), &[]);
    assert_eq!(r.status, Status::Ok);

    // Write then read back at the wire level; the version advances.
    let data = pattern(5, 8192);
    let mut payload = data.clone();
    seal_payload(&mut payload);
    let mut w = req(&m, Op::Write, 1, 4096, 8192);
    w.flags = Flags::FUA;
    let (r, _) = good.call(w, &payload);
    assert_eq!(r.status, Status::Ok);
    let v1 = r.chunk_version;
    assert!(v1 > 0);
    let (r, _) = good.call(w, &payload);
    assert!(r.chunk_version > v1, "chunk version must advance per write");
    let (r, p) = good.call(req(&m, Op::Read, 1, 4096, 8192), &[]);
    assert_eq!(r.status, Status::Ok);
    assert_eq!(open_payload(&p), Some(&data[..]));

    // Allocation bitmap: blocks 1 and 2 of chunk 1 hold data.
    let (r, p) = good.call(req(&m, Op::BlockStatus, 1, 0, 16384), &[]);
    assert_eq!(r.status, Status::Ok);
    assert_eq!(open_payload(&p), Some(&[0b0110u8][..]));

    // A payload whose CRC does not match is refused, nothing written.
    let mut corrupt = payload.clone();
    corrupt[10] ^= 1;
    let (r, _) = good.call(w, &corrupt);
    assert_eq!(r.status, Status::BadPayloadCrc);

    // Stale epoch.
    let mut h = req(&m, Op::Read, 0, 0, 4096);
    h.epoch = m.epoch - 1;
    assert_eq!(good.call(h, &[]).0.status, Status::StaleEpoch);

    // A disk this daemon does not own.
    let mut h = req(&m, Op::Read, 0, 0, 4096);
    h.disk_id = 9999;
    assert_eq!(good.call(h, &[]).0.status, Status::WrongDisk);

    // A volume that does not exist.
    let mut h = req(&m, Op::Read, 0, 0, 4096);
    h.volume_id = 9999;
    assert_eq!(good.call(h, &[]).0.status, Status::UnknownVolume);

    // A chunk beyond the end of the volume (64 MiB = 16 chunks).
    let mut h = req(&m, Op::Read, 0, 0, 4096);
    h.chunk_index = 16;
    assert_eq!(good.call(h, &[]).0.status, Status::Invalid);

    // A range beyond the end of the chunk.
    let h = req(&m, Op::Read, 0, (4 << 20) - 4096, 8192);
    assert_eq!(good.call(h, &[]).0.status, Status::Invalid);

    // COMPARE AND WRITE at the edge: the compare part must match the
    // medium (a difference is answered at its offset and writes nothing);
    // a payload whose CRC does not match is refused; a range beyond the
    // chunk is invalid.
    let caw = |compare: &[u8], write: &[u8]| {
        let mut p = compare.to_vec();
        p.extend_from_slice(write);
        seal_payload(&mut p);
        p
    };
    let new_data = pattern(6, 8192);
    let mut diff = data.clone();
    diff[5000] ^= 0x40;
    let h = req(&m, Op::CompareAndWrite, 1, 4096, 8192);
    let (r, _) = good.call(h, &caw(&diff, &new_data));
    assert_eq!(r.status, Status::Miscompare);
    assert_eq!(r.chunk_version, 5000, "offset of the first difference");
    let mut bad_crc = caw(&data, &new_data);
    bad_crc[100] ^= 1;
    assert_eq!(good.call(h, &bad_crc).0.status, Status::BadPayloadCrc);
    let (r, p) = good.call(req(&m, Op::Read, 1, 4096, 8192), &[]);
    assert_eq!(open_payload(&p), Some(&data[..]), "nothing written");
    assert_eq!(r.status, Status::Ok);
    let beyond = req(&m, Op::CompareAndWrite, 0, (4 << 20) - 4096, 8192);
    let zeros = vec![0u8; 8192];
    assert_eq!(
        good.call(beyond, &caw(&zeros, &zeros)).0.status,
        Status::Invalid
    );
    let (r, _) = good.call(h, &caw(&data, &new_data));
    assert_eq!(r.status, Status::Ok);
    let (_, p) = good.call(req(&m, Op::Read, 1, 4096, 8192), &[]);
    assert_eq!(open_payload(&p), Some(&new_data[..]));
    // Write the old data back for the checks below.
    assert_eq!(good.call(w, &payload).0.status, Status::Ok);

    // Ping and Flush.
    let (r, _) = good.call(req(&m, Op::Ping, 0, 0, 0), &[]);
    assert_eq!(r.status, Status::Ok);
    let (r, _) = good.call(req(&m, Op::Flush, 0, 0, 0), &[]);
    assert_eq!(r.status, Status::Ok);

    // A header that fails its own validation (unaligned offset): the
    // stream cannot be trusted any more, so the daemon closes it.
    let mut h = req(&m, Op::Read, 0, 0, 4096).to_bytes();
    h[48] = 7;
    let crc = tessera_wire::crc32c(&h[0..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    good.s.write_all(&h).expect("send");
    assert!(good.recv().is_none());

    // The daemon still serves new connections after all of this.
    let mut again = Peer::connect(&addr);
    assert_eq!(again.hello(&m.cluster_id, m.epoch), Status::Ok);
    let (r, p) = again.call(req(&m, Op::Read, 1, 4096, 8192), &[]);
    assert_eq!(r.status, Status::Ok);
    assert_eq!(open_payload(&p), Some(&data[..]));
    let errors: f64 = c
        .storage_metrics()
        .iter()
        .map(|t| metric_sum(t, "tessera_storage_protocol_errors_total"))
        .sum();
    assert!(errors >= 3.0, "protocol errors are counted ({errors})");
}
