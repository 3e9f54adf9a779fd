//! End-to-end NBD tests: the real server loop on a real TCP socket
//! (127.0.0.1:0), backed by an in-memory `Volume` test double, driven by a
//! hand-written raw NBD client and, when installed, by libnbd's nbdinfo and
//! nbdcopy. The storage path behind the gateway is tested elsewhere.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessera_gateway::metrics::Metrics;
use tessera_gateway::nbd::codec::*;
use tessera_gateway::server;
use tessera_gateway::volume::{Capabilities, Catalog, VolFuture, Volume, VolumeError};
use tokio::sync::Semaphore;

const MIB: u64 = 1 << 20;
/// Reads at this offset wait for the test to open the gate: used to force
/// out-of-order completion.
const SLOW_OFFSET: u64 = 64 * 1024;
const IO_DEADLINE: Duration = Duration::from_secs(10);

struct MemVolume {
    name: String,
    data: Mutex<Vec<u8>>,
    gate: Arc<Semaphore>,
}

impl Volume for MemVolume {
    fn name(&self) -> &str {
        &self.name
    }
    fn size_bytes(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }
    fn read(&self, offset: u64, length: u32) -> VolFuture<'_, Vec<u8>> {
        Box::pin(async move {
            if offset == SLOW_OFFSET {
                self.gate.acquire().await.unwrap().forget();
            }
            let d = self.data.lock().unwrap();
            Ok(d[offset as usize..offset as usize + length as usize].to_vec())
        })
    }
    fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> VolFuture<'_, ()> {
        Box::pin(async move {
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            Ok(())
        })
    }
    fn flush(&self) -> VolFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    fn trim(&self, offset: u64, length: u32, fua: bool) -> VolFuture<'_, ()> {
        self.write_zeroes(offset, length, fua)
    }
    fn write_zeroes(&self, offset: u64, length: u32, _fua: bool) -> VolFuture<'_, ()> {
        Box::pin(async move {
            if offset == 3 * MIB {
                // An injected storage failure, to see the errno path.
                return Err(VolumeError::Io);
            }
            let mut d = self.data.lock().unwrap();
            d[offset as usize..offset as usize + length as usize].fill(0);
            Ok(())
        })
    }
}

struct MemCatalog(Vec<Arc<MemVolume>>);

impl Catalog for MemCatalog {
    fn names(&self) -> Vec<String> {
        self.0.iter().map(|v| v.name.clone()).collect()
    }
    fn open(&self, name: &str) -> Option<Arc<dyn Volume>> {
        self.0
            .iter()
            .find(|v| v.name == name)
            .map(|v| Arc::clone(v) as Arc<dyn Volume>)
    }
}

struct Fixture {
    addr: SocketAddr,
    gate: Arc<Semaphore>,
    _rt: tokio::runtime::Runtime,
}

fn start() -> Fixture {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let vol = |name: &str, size: u64| {
        Arc::new(MemVolume {
            name: name.into(),
            data: Mutex::new(vec![0u8; size as usize]),
            gate: Arc::clone(&gate),
        })
    };
    let catalog = Arc::new(MemCatalog(vec![vol("vol", 4 * MIB), vol("copy", 4 * MIB)]));
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(false);
    rt.spawn(async move {
        let _keep = _tx;
        server::serve(
            listener,
            catalog,
            Metrics::new(),
            server::Config::default(),
            rx,
        )
        .await
    });
    Fixture {
        addr,
        gate,
        _rt: rt,
    }
}

fn connect(f: &Fixture) -> TcpStream {
    let s = TcpStream::connect(f.addr).unwrap();
    s.set_read_timeout(Some(IO_DEADLINE)).unwrap();
    s
}

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

fn greet(s: &mut TcpStream, client_flags: u32) {
    let g = read_n(s, 18);
    assert_eq!(&g[0..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&client_flags.to_be_bytes()).unwrap();
}

fn send_opt(s: &mut TcpStream, opt: u32, data: &[u8]) {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    s.write_all(&v).unwrap();
}

fn read_opt_reply(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let h = read_n(s, 20);
    assert_eq!(&h[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    (opt, kind, read_n(s, len))
}

fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// Send INFO or GO and collect the NBD_REP_INFO payloads up to the final
/// reply, whose type is returned.
fn info_or_go(s: &mut TcpStream, opt: u32, name: &str, infos: &[u16]) -> (u32, Vec<Vec<u8>>) {
    send_opt(s, opt, &info_data(name, infos));
    let mut v = Vec::new();
    loop {
        let (o, kind, data) = read_opt_reply(s);
        assert_eq!(o, opt);
        if kind != NBD_REP_INFO {
            return (kind, v);
        }
        v.push(data);
    }
}

/// A connection in transmission phase on `name`.
fn open(f: &Fixture, name: &str) -> TcpStream {
    let mut s = connect(f);
    greet(&mut s, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    let (kind, _) = info_or_go(&mut s, NBD_OPT_GO, name, &[]);
    assert_eq!(kind, NBD_REP_ACK);
    s
}

fn request(s: &mut TcpStream, kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
    let h = RequestHeader {
        flags,
        kind,
        cookie,
        offset,
        length: u64::from(length),
    };
    s.write_all(&h.encode()).unwrap();
}

fn reply(s: &mut TcpStream) -> (u32, u64) {
    let b = read_n(s, 16);
    assert_eq!(&b[0..4], &NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    (
        u32::from_be_bytes(b[4..8].try_into().unwrap()),
        u64::from_be_bytes(b[8..16].try_into().unwrap()),
    )
}

fn write(s: &mut TcpStream, cookie: u64, offset: u64, data: &[u8], flags: u16) -> u32 {
    request(s, NBD_CMD_WRITE, flags, cookie, offset, data.len() as u32);
    s.write_all(data).unwrap();
    let (errno, c) = reply(s);
    assert_eq!(c, cookie);
    errno
}

fn read(s: &mut TcpStream, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    request(s, NBD_CMD_READ, 0, cookie, offset, len);
    let (errno, c) = reply(s);
    assert_eq!((errno, c), (0, cookie));
    read_n(s, len as usize)
}

/// Whether the server closed the connection (EOF or reset) before the
/// deadline; any data read first is ignored.
fn closed(s: &mut TcpStream) -> bool {
    let deadline = Instant::now() + IO_DEADLINE;
    let mut b = [0u8; 256];
    while Instant::now() < deadline {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
    false
}

// Proves the option haggling end to end: LIST, INFO (with block size and
// name), unknown option, unknown export, "" export, then GO on the same
// export with identical size/flags.
#[test]
fn handshake_options() {
    let f = start();
    let mut s = connect(&f);
    greet(&mut s, NBD_FLAG_C_FIXED_NEWSTYLE);
    send_opt(&mut s, NBD_OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (_, kind, data) = read_opt_reply(&mut s);
        if kind == NBD_REP_ACK {
            break;
        }
        assert_eq!(kind, NBD_REP_SERVER);
        names.push(String::from_utf8(data[4..].to_vec()).unwrap());
    }
    assert_eq!(names, ["vol", "copy"]);
    send_opt(&mut s, 0x1234, b"whatever");
    assert_eq!(read_opt_reply(&mut s).1, NBD_REP_ERR_UNSUP);
    let (kind, _) = info_or_go(&mut s, NBD_OPT_INFO, "nope", &[]);
    assert_eq!(kind, NBD_REP_ERR_UNKNOWN);
    let (kind, _) = info_or_go(&mut s, NBD_OPT_GO, "", &[]);
    assert_eq!(kind, NBD_REP_ERR_UNKNOWN);
    let (kind, info) = info_or_go(
        &mut s,
        NBD_OPT_INFO,
        "vol",
        &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME],
    );
    assert_eq!(kind, NBD_REP_ACK);
    let export = info.iter().find(|d| d[0..2] == [0, 0]).unwrap().clone();
    assert_eq!(&export[2..10], &(4 * MIB).to_be_bytes());
    assert_eq!(&export[10..12], &0x0d6du16.to_be_bytes());
    let bs = info.iter().find(|d| d[0..2] == [0, 3]).unwrap();
    assert_eq!(bs[2..6], 512u32.to_be_bytes());
    assert_eq!(bs[6..10], 4096u32.to_be_bytes());
    assert_eq!(bs[10..14], REQUEST_MAX_BYTES.to_be_bytes());
    let (kind, go) = info_or_go(&mut s, NBD_OPT_GO, "vol", &[]);
    assert_eq!(kind, NBD_REP_ACK);
    assert_eq!(go.iter().find(|d| d[0..2] == [0, 0]).unwrap(), &export);
    // Transmission works right away.
    assert_eq!(read(&mut s, 1, 0, 512), vec![0u8; 512]);
}

// Proves ABORT is acknowledged then closed, EXPORT_NAME of an unknown (or
// empty) export is a hard close, and EXPORT_NAME of a known export replies
// size+flags+124 zeroes when NO_ZEROES is not negotiated.
#[test]
fn abort_and_export_name() {
    let f = start();
    let mut s = connect(&f);
    greet(&mut s, NBD_FLAG_C_FIXED_NEWSTYLE);
    send_opt(&mut s, NBD_OPT_ABORT, &[]);
    assert_eq!(read_opt_reply(&mut s).1, NBD_REP_ACK);
    assert!(closed(&mut s));
    for name in [&b"nope"[..], b""] {
        let mut s = connect(&f);
        greet(&mut s, NBD_FLAG_C_FIXED_NEWSTYLE);
        send_opt(&mut s, NBD_OPT_EXPORT_NAME, name);
        assert!(closed(&mut s));
    }
    let mut s = connect(&f);
    greet(&mut s, NBD_FLAG_C_FIXED_NEWSTYLE);
    send_opt(&mut s, NBD_OPT_EXPORT_NAME, b"vol");
    let r = read_n(&mut s, 10 + 124);
    assert_eq!(&r[0..8], &(4 * MIB).to_be_bytes());
    assert!(r[10..].iter().all(|b| *b == 0));
    assert_eq!(read(&mut s, 1, 512, 512), vec![0u8; 512]);
}

// Proves data commands: write (plain and FUA), read back, flush, trim and
// write-zeroes read back as zeroes, a storage failure surfaces as EIO, and
// DISC closes after answering.
#[test]
fn read_write_flush_trim_zero() {
    let f = start();
    let mut s = open(&f, "vol");
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(write(&mut s, 1, 4096, &pattern, 0), 0);
    assert_eq!(write(&mut s, 2, MIB, &pattern, NBD_CMD_FLAG_FUA), 0);
    assert_eq!(read(&mut s, 3, 4096, 8192), pattern);
    assert_eq!(read(&mut s, 4, MIB, 8192), pattern);
    request(&mut s, NBD_CMD_FLUSH, 0, 5, 0, 0);
    assert_eq!(reply(&mut s), (0, 5));
    request(&mut s, NBD_CMD_TRIM, 0, 6, 4096, 4096);
    assert_eq!(reply(&mut s), (0, 6));
    request(
        &mut s,
        NBD_CMD_WRITE_ZEROES,
        NBD_CMD_FLAG_NO_HOLE,
        7,
        MIB,
        512,
    );
    assert_eq!(reply(&mut s), (0, 7));
    let mut want = pattern.clone();
    want[..4096].fill(0);
    assert_eq!(read(&mut s, 8, 4096, 8192), want);
    let mut want = pattern.clone();
    want[..512].fill(0);
    assert_eq!(read(&mut s, 9, MIB, 8192), want);
    request(&mut s, NBD_CMD_WRITE_ZEROES, 0, 10, 3 * MIB, 512);
    assert_eq!(reply(&mut s), (NBD_EIO, 10));
    request(&mut s, NBD_CMD_DISC, 0, 11, 0, 0);
    assert!(closed(&mut s));
}

// Proves requests complete out of order: a read held at the volume does not
// block a later read, whose reply arrives first.
#[test]
fn out_of_order_completion() {
    let f = start();
    let mut s = open(&f, "vol");
    request(&mut s, NBD_CMD_READ, 0, 100, SLOW_OFFSET, 512);
    request(&mut s, NBD_CMD_READ, 0, 200, 0, 512);
    assert_eq!(reply(&mut s), (0, 200));
    read_n(&mut s, 512);
    f.gate.add_permits(1);
    assert_eq!(reply(&mut s), (0, 100));
    read_n(&mut s, 512);
}

// Proves every rejection branch over the wire, and that the connection stays
// synchronised after each (payloads of rejected writes are skipped).
#[test]
fn rejections_keep_connection() {
    let f = start();
    let mut s = open(&f, "vol");
    let end = 4 * MIB;
    let cases: &[(u16, u16, u64, u32, bool, u32)] = &[
        // kind, flags, offset, length, sends payload, expected errno
        (42, 0, 0, 512, false, NBD_EINVAL),
        (NBD_CMD_BLOCK_STATUS, 0, 0, 512, false, NBD_EINVAL),
        (NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512, false, NBD_EINVAL),
        (NBD_CMD_READ, 0x8000, 0, 512, false, NBD_EINVAL),
        (
            NBD_CMD_WRITE,
            NBD_CMD_FLAG_NO_HOLE,
            0,
            512,
            true,
            NBD_EINVAL,
        ),
        (NBD_CMD_READ, 0, end - 512, 1024, false, NBD_EINVAL),
        (NBD_CMD_READ, 0, u64::MAX - 511, 512, false, NBD_EINVAL),
        (NBD_CMD_WRITE, 0, end, 512, true, NBD_ENOSPC),
        (NBD_CMD_TRIM, 0, end, 512, false, NBD_EINVAL),
        (NBD_CMD_CACHE, 0, end, 512, false, NBD_EINVAL),
        (
            NBD_CMD_WRITE_ZEROES,
            NBD_CMD_FLAG_FAST_ZERO,
            0,
            512,
            false,
            NBD_ENOTSUP,
        ),
        (
            NBD_CMD_WRITE_ZEROES,
            NBD_CMD_FLAG_DF,
            0,
            512,
            false,
            NBD_EINVAL,
        ),
        (NBD_CMD_WRITE_ZEROES, 0, end - 512, 1024, false, NBD_ENOSPC),
        (
            NBD_CMD_READ,
            0,
            0,
            REQUEST_MAX_BYTES + 512,
            false,
            NBD_EINVAL,
        ),
        (
            NBD_CMD_WRITE,
            0,
            0,
            REQUEST_MAX_BYTES + 512,
            true,
            NBD_EINVAL,
        ),
        (NBD_CMD_READ, 0, 100, 512, false, NBD_EINVAL),
        (NBD_CMD_WRITE, 0, 0, 100, true, NBD_EINVAL),
        (NBD_CMD_FLUSH, 0, 0, 512, false, NBD_EINVAL),
    ];
    for (i, &(kind, flags, offset, length, payload, errno)) in cases.iter().enumerate() {
        let cookie = 1000 + i as u64;
        request(&mut s, kind, flags, cookie, offset, length);
        if payload {
            s.write_all(&vec![0xAB; length as usize]).unwrap();
        }
        assert_eq!(reply(&mut s), (errno, cookie), "case {i}");
    }
    // Zero-length requests succeed without data.
    request(&mut s, NBD_CMD_READ, 0, 7, 0, 0);
    assert_eq!(reply(&mut s), (0, 7));
    // Still in sync: a real read works and nothing was written.
    assert_eq!(read(&mut s, 8, 0, 512), vec![0u8; 512]);
    // Bad magic: the stream is unsynchronised, so the server closes.
    s.write_all(&[0xde; 28]).unwrap();
    assert!(closed(&mut s));
    // An absurdly large write payload is not drained: closed.
    let mut s = open(&f, "vol");
    request(&mut s, NBD_CMD_WRITE, 0, 1, 0, u32::MAX);
    assert!(closed(&mut s));
}

// Proves a misbehaving client (garbage handshake, bad magic, vanishing
// mid-write) costs only its own connection: another client is served
// throughout.
#[test]
fn misbehaving_client_does_not_affect_others() {
    let f = start();
    let mut good = open(&f, "vol");
    let mut garbage = connect(&f);
    read_n(&mut garbage, 18);
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(closed(&mut garbage));
    assert_eq!(read(&mut good, 1, 0, 512), vec![0u8; 512]);
    // A client that disappears halfway through a write payload and while a
    // read is held in flight.
    let mut gone = open(&f, "vol");
    request(&mut gone, NBD_CMD_READ, 0, 1, SLOW_OFFSET, 512);
    request(&mut gone, NBD_CMD_WRITE, 0, 2, 0, 4096);
    gone.write_all(&[1u8; 100]).unwrap();
    drop(gone);
    assert_eq!(write(&mut good, 2, 8192, &[5u8; 512], 0), 0);
    assert_eq!(read(&mut good, 3, 8192, 512), vec![5u8; 512]);
    // A silent client that never finishes the handshake does not block
    // accepting.
    let _silent = connect(&f);
    let mut other = open(&f, "copy");
    assert_eq!(read(&mut other, 1, 0, 512), vec![0u8; 512]);
}

fn tool(name: &str) -> Option<std::path::PathBuf> {
    let p = std::path::Path::new("/usr/bin").join(name);
    if p.exists() {
        return Some(p);
    }
    println!("skipping: {name} is not installed");
    None
}

// Proves real libnbd clients interoperate: nbdinfo sees the size and flags
// of the export and lists both exports.
#[test]
fn nbdinfo_reports_size_and_flags() {
    let Some(nbdinfo) = tool("nbdinfo") else {
        return;
    };
    let f = start();
    let uri = format!("nbd://{}/vol", f.addr);
    let out = std::process::Command::new(&nbdinfo)
        .args(["--json", &uri])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], 4 * MIB);
    for (k, want) in [
        ("is_read_only", false),
        ("can_flush", true),
        ("can_fua", true),
        ("can_trim", true),
        ("can_zero", true),
        ("can_multi_conn", true),
    ] {
        assert_eq!(e[k], want, "{k} in {e}");
    }
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_maximum"], REQUEST_MAX_BYTES);
    let out = std::process::Command::new(&nbdinfo)
        .args(["--list", "--json", &format!("nbd://{}", f.addr)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<_> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["vol", "copy"]);
}

// Proves an nbdcopy round trip of 4 MiB (multi-connection, many requests in
// flight) returns exactly the bytes written.
#[test]
fn nbdcopy_round_trip() {
    let Some(nbdcopy) = tool("nbdcopy") else {
        return;
    };
    let f = start();
    let dir = std::env::temp_dir().join(format!("tessera-gw-nbdcopy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("src.img");
    let dst = dir.join("dst.img");
    let data: Vec<u8> = (0..4 * MIB as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let uri = format!("nbd://{}/copy", f.addr);
    for (a, b) in [
        (src.to_str().unwrap(), uri.as_str()),
        (uri.as_str(), dst.to_str().unwrap()),
    ] {
        let out = std::process::Command::new(&nbdcopy)
            .args([a, b])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nbdcopy {a} {b}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(std::fs::read(&dst).unwrap() == data, "round trip differs");
    let _ = std::fs::remove_dir_all(&dir);
}
