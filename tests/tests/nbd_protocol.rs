//! The NBD protocol of the gateway, proven against a real cluster started
//! with `tessera up`: real clients (nbdinfo, qemu-img, qemu-io, nbdcopy,
//! fio's nbd engine, the rust `nbd` crate) for every advertised feature,
//! and a raw TcpStream client for every rejection branch, each time checking
//! that another client keeps being served.

use std::process::Command;
use tessera_tests::*;

fn require(tools: &[&str]) {
    for t in tools {
        assert!(
            have(t),
            "{t} is not installed: run the suite through tests/run.sh, which installs it"
        );
    }
}

fn output(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// `nbdinfo --map --json`: (offset, length, type) per extent.
fn map(uri: &str) -> Vec<(u64, u64, u64)> {
    let json = run(Command::new("nbdinfo").args(["--map", "--json", uri]));
    let v: serde_json::Value = serde_json::from_str(&json).expect("nbdinfo --map json");
    v.as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().expect("offset"),
                e["length"].as_u64().expect("length"),
                e["type"].as_u64().expect("type"),
            )
        })
        .collect()
}

const MIB: u64 = 1 << 20;

// Proves every capability the gateway advertises is seen by nbdinfo
// (--can for each, structured replies, base:allocation among the
// contexts), and that nothing it does not implement is claimed.
#[test]
fn nbdinfo_can_every_capability() {
    require(&["nbdinfo"]);
    let dir = TempDir::new("nbdproto-can");
    let opts = ClusterOptions {
        storage_daemons: 1,
        disk_size: "1G",
        volumes: vec![("caps".into(), "64M".into())],
    };
    let c = Cluster::start(dir.path(), &opts);
    let uri = c.uri("caps");
    for cap in [
        "connect",
        "read",
        "write",
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "cache",
        "multi-conn",
        "structured-reply",
        "df",
    ] {
        let (ok, out, err) = output(Command::new("nbdinfo").args(["--can", cap, &uri]));
        assert!(ok, "nbdinfo --can {cap}: {out}{err}");
    }
    for not in ["read-only", "rotational", "tls"] {
        let (ok, _, _) = output(Command::new("nbdinfo").args(["--is", not, &uri]));
        assert!(!ok, "nbdinfo --is {not} should be false");
    }
    let json = run(Command::new("nbdinfo").args(["--json", &uri]));
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    let e = &v["exports"][0];
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .expect("contexts")
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert!(contexts.contains(&"base:allocation"), "{json}");
    assert_eq!(e["export-size"].as_u64(), Some(64 * MIB));
    assert_eq!(e["block_size_minimum"].as_u64(), Some(512));
    assert_eq!(e["block_size_preferred"].as_u64(), Some(4096));
    assert_eq!(e["block_size_maximum"].as_u64(), Some(8 * MIB));
    assert!(
        e["description"]
            .as_str()
            .is_some_and(|d| d.contains("caps")),
        "{json}"
    );
    let list = run(Command::new("nbdinfo").args(["--list", "--json", &format!("nbd://{}", c.nbd)]));
    let v: serde_json::Value = serde_json::from_str(&list).expect("json");
    let names: Vec<&str> = v["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .filter_map(|e| e["export-name"].as_str())
        .collect();
    assert_eq!(names, ["caps"], "{list}");
    // An unknown export is an error reply, never a silent default.
    let (ok, _, err) = output(Command::new("nbdinfo").arg(c.uri("nope")));
    assert!(!ok, "nbdinfo on an unknown export succeeded");
    assert!(!err.is_empty());
}

// Proves BLOCK_STATUS answers from the storage daemons' allocation maps:
// a fresh volume is one hole, written ranges become data (nbdinfo --map
// and qemu-img map agree), and trimmed ranges turn back into holes.
#[test]
fn map_shows_data_and_holes() {
    require(&["nbdinfo", "qemu-io", "qemu-img"]);
    let dir = TempDir::new("nbdproto-map");
    let opts = ClusterOptions {
        storage_daemons: 2,
        disk_size: "1G",
        volumes: vec![("m".into(), "64M".into())],
    };
    let c = Cluster::start(dir.path(), &opts);
    let uri = c.uri("m");
    assert_eq!(map(&uri), vec![(0, 64 * MIB, 3)]);
    // Data at 8 MiB (1 MiB) and at 40 MiB - 4 KiB (8 KiB, across a chunk
    // boundary), through qemu-io.
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 8M 1M",
        "-c",
        "write -P 0xcd 40956k 8k",
        &uri,
    ]));
    let want = vec![
        (0, 8 * MIB, 3),
        (8 * MIB, MIB, 0),
        (9 * MIB, 40 * MIB - 4096 - 9 * MIB, 3),
        (40 * MIB - 4096, 8192, 0),
        (40 * MIB + 4096, 24 * MIB - 4096, 3),
    ];
    assert_eq!(map(&uri), want);
    let json = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    let v: serde_json::Value = serde_json::from_str(&json).expect("qemu-img map json");
    let got: Vec<(u64, u64, bool)> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().expect("start"),
                e["length"].as_u64().expect("length"),
                e["data"].as_bool().expect("data"),
            )
        })
        .collect();
    let want_qemu: Vec<(u64, u64, bool)> = want.iter().map(|w| (w.0, w.1, w.2 == 0)).collect();
    assert_eq!(got, want_qemu, "{json}");
    // Discard the first half of the 1 MiB: it reads as a hole again.
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "discard 8M 512k", &uri]));
    let m = map(&uri);
    assert_eq!(m[0], (0, 8 * MIB + 512 * 1024, 3));
    assert_eq!(m[1], (8 * MIB + 512 * 1024, 512 * 1024, 0));
}

/// A second gateway started by the test against the cluster's manager,
/// with its own flags (limits, TLS), port 0 and a metrics endpoint; killed
/// on drop.
struct Gateway {
    child: std::process::Child,
    nbd: String,
    metrics: String,
}

impl Gateway {
    fn start(c: &Cluster, extra: &[&str]) -> Gateway {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(bin("tessera-gateway"))
            .args(["--manager", &c.manager])
            .args([
                "--nbd-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn tessera-gateway");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        // The READY line comes once the map is fetched; the gateway exits
        // (EOF) on a fatal error.
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("gateway stdout");
        let g = Gateway {
            nbd: field(&line, "nbd").unwrap_or_default(),
            metrics: field(&line, "metrics").unwrap_or_default(),
            child,
        };
        assert!(
            line.starts_with("READY "),
            "gateway did not start: {line:?}"
        );
        g
    }

    fn uri(&self, volume: &str) -> String {
        format!("nbd://{}/{volume}", self.nbd)
    }

    fn metric(&self, name: &str, label: &str) -> f64 {
        let text = http_get(&format!("http://{}/metrics", self.metrics)).expect("metrics");
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha256(path: &std::path::Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    out.split_whitespace().next().expect("digest").to_string()
}

// Proves nbdcopy copies an image with data and a zero hole into the export
// and back out with identical checksums (multi-connection, structured
// reads with holes, fast zeroing of the hole).
#[test]
fn nbdcopy_in_and_out_with_checksums() {
    require(&["nbdcopy", "sha256sum"]);
    let dir = TempDir::new("nbdproto-copy");
    let c = Cluster::start(
        &dir.path().join("cluster"),
        &ClusterOptions {
            storage_daemons: 2,
            disk_size: "1G",
            volumes: vec![("cp".into(), "64M".into())],
        },
    );
    let src = dir.path().join("src.img");
    let mut data = pattern(77, (64 * MIB) as usize);
    data[(16 * MIB) as usize..(40 * MIB) as usize].fill(0);
    std::fs::write(&src, &data).expect("write source");
    run(Command::new("nbdcopy")
        .arg("--flush")
        .arg(&src)
        .arg(c.uri("cp")));
    let back = dir.path().join("back.img");
    run(Command::new("nbdcopy").arg(c.uri("cp")).arg(&back));
    assert_eq!(sha256(&src), sha256(&back));
}

// Proves fio's nbd engine writes and verifies (crc32c) at 512 B, 4 KiB and
// 1 MiB blocks, the verify pass reading back through structured replies.
#[test]
fn fio_verify_512_4k_1m() {
    require(&["fio"]);
    let dir = TempDir::new("nbdproto-fio");
    let c = Cluster::start(
        dir.path(),
        &ClusterOptions {
            storage_daemons: 2,
            disk_size: "1G",
            volumes: vec![("f".into(), "256M".into())],
        },
    );
    for (bs, size, offset) in [
        ("512", "4m", "0"),
        ("4k", "32m", "16m"),
        ("1m", "64m", "64m"),
    ] {
        run(Command::new("fio")
            .args(["--name=v", "--ioengine=nbd", "--output-format=terse"])
            .arg(format!("--uri={}", c.uri("f")))
            .args([
                "--rw=randwrite",
                "--iodepth=16",
                "--verify=crc32c",
                "--do_verify=1",
                // No verify state file in the working directory.
                "--verify_state_save=0",
            ])
            .arg(format!("--bs={bs}"))
            .arg(format!("--size={size}"))
            .arg(format!("--offset={offset}")));
    }
}

// Proves several connections writing disjoint ranges at once (fio, 4 jobs,
// one connection each) all verify, with multi-conn advertised.
#[test]
fn concurrent_connections_disjoint_ranges() {
    require(&["fio"]);
    let dir = TempDir::new("nbdproto-multi");
    let c = Cluster::start(
        dir.path(),
        &ClusterOptions {
            storage_daemons: 2,
            disk_size: "1G",
            volumes: vec![("mc".into(), "128M".into())],
        },
    );
    run(Command::new("fio")
        .args(["--name=mc", "--ioengine=nbd", "--output-format=terse"])
        .arg(format!("--uri={}", c.uri("mc")))
        .args([
            "--numjobs=4",
            "--size=16m",
            "--offset_increment=32m",
            "--rw=randwrite",
            "--bs=16k",
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_state_save=0",
        ]));
}

// Proves qemu (10.x) negotiates extended headers with the gateway and that
// qemu-img convert in and out plus compare work over them.
#[test]
fn qemu_img_over_extended_headers() {
    require(&["qemu-img"]);
    let dir = TempDir::new("nbdproto-qemu");
    let c = Cluster::start(
        &dir.path().join("cluster"),
        &ClusterOptions {
            storage_daemons: 1,
            disk_size: "1G",
            volumes: vec![("q".into(), "32M".into())],
        },
    );
    let gw = Gateway::start(&c, &[]);
    let src = dir.path().join("src.img");
    let mut data = pattern(5, (32 * MIB) as usize);
    data[..(8 * MIB) as usize].fill(0);
    std::fs::write(&src, &data).expect("write source");
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(gw.uri("q")));
    let back = dir.path().join("back.img");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(gw.uri("q"))
        .arg(&back));
    assert!(files_equal(&src, &back), "qemu-img round trip differs");
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(gw.uri("q")));
    let version = run(Command::new("qemu-img").arg("--version"));
    let extended = gw.metric(
        "tessera_gateway_nbd_handshakes_total",
        "replies=\"extended\"",
    );
    // qemu >= 8.2 asks for extended headers; older ones must at least use
    // structured replies.
    let major: u32 = version
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.split('.').next()?.parse().ok())
        .unwrap_or(0);
    if major >= 9 {
        assert!(extended >= 3.0, "qemu {major} did not use extended headers");
    } else {
        println!("qemu-img {major}: extended headers not expected");
    }
}

// Proves the rust `nbd` crate (NBD_OPT_EXPORT_NAME, simple replies) reads
// and writes the export: the path older clients take keeps working.
#[test]
fn rust_nbd_crate_export_name() {
    use std::io::{Read, Seek, SeekFrom, Write};
    let dir = TempDir::new("nbdproto-crate");
    let c = Cluster::start(
        dir.path(),
        &ClusterOptions {
            storage_daemons: 1,
            disk_size: "1G",
            volumes: vec![("old".into(), "16M".into())],
        },
    );
    let mut tcp = std::net::TcpStream::connect(&c.nbd).expect("connect");
    let export = nbd::client::handshake(&mut tcp, b"old").expect("handshake");
    assert_eq!(export.size, 16 * MIB);
    let mut client = nbd::client::NbdClient::new(&mut tcp, &export);
    let data = pattern(3, 64 * 1024);
    client.seek(SeekFrom::Start(MIB)).expect("seek");
    client.write_all(&data).expect("write");
    client.flush().expect("flush");
    let mut back = vec![0u8; data.len()];
    client.seek(SeekFrom::Start(MIB)).expect("seek");
    client.read_exact(&mut back).expect("read");
    assert!(back == data, "nbd crate read back different data");
    // Unknown export over EXPORT_NAME: the server must hang up.
    let mut tcp = std::net::TcpStream::connect(&c.nbd).expect("connect");
    assert!(nbd::client::handshake(&mut tcp, b"nope").is_err());
}

/// A hand-written NBD client over a TcpStream, for the rejection branches
/// real clients never exercise.
mod raw {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};
    pub use tessera_gateway::nbd::codec::*;

    pub const DEADLINE: Duration = Duration::from_secs(10);

    pub fn connect(addr: &str) -> TcpStream {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(DEADLINE)).expect("timeout");
        s
    }

    pub fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        s.read_exact(&mut b).expect("read");
        b
    }

    pub fn greet(s: &mut TcpStream) {
        let g = read_n(s, 18);
        assert_eq!(&g[0..16], b"NBDMAGICIHAVEOPT");
        s.write_all(&3u32.to_be_bytes()).expect("flags");
    }

    pub fn send_opt(s: &mut TcpStream, opt: u32, data: &[u8]) {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        s.write_all(&v).expect("option");
    }

    /// (option, reply type, data)
    pub fn opt_reply(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
        let h = read_n(s, 20);
        assert_eq!(&h[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        (
            u32::from_be_bytes(h[8..12].try_into().unwrap()),
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            read_n(s, len),
        )
    }

    pub fn name_data(name: &str) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v
    }

    /// GO on `name`; returns the final reply type.
    pub fn go(s: &mut TcpStream, name: &str) -> u32 {
        let mut d = name_data(name);
        d.extend_from_slice(&0u16.to_be_bytes());
        send_opt(s, NBD_OPT_GO, &d);
        loop {
            let (_, t, _) = opt_reply(s);
            if t != NBD_REP_INFO {
                return t;
            }
        }
    }

    /// A connection in transmission on `name`: simple, structured (with
    /// base:allocation) or extended (with base:allocation).
    pub fn open(addr: &str, name: &str, mode: ReplyMode) -> TcpStream {
        let mut s = connect(addr);
        greet(&mut s);
        let opt = match mode {
            ReplyMode::Simple => None,
            ReplyMode::Structured => Some(NBD_OPT_STRUCTURED_REPLY),
            ReplyMode::Extended => Some(NBD_OPT_EXTENDED_HEADERS),
        };
        if let Some(o) = opt {
            send_opt(&mut s, o, &[]);
            assert_eq!(opt_reply(&mut s).1, NBD_REP_ACK);
            let mut d = name_data(name);
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&name_data(BASE_ALLOCATION));
            send_opt(&mut s, NBD_OPT_SET_META_CONTEXT, &d);
            assert_eq!(opt_reply(&mut s).1, NBD_REP_META_CONTEXT);
            assert_eq!(opt_reply(&mut s).1, NBD_REP_ACK);
        }
        assert_eq!(go(&mut s, name), NBD_REP_ACK);
        s
    }

    pub fn request(
        s: &mut TcpStream,
        ext: bool,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u64,
    ) {
        let h = RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            length,
        };
        if ext {
            s.write_all(&h.encode_extended()).expect("request");
        } else {
            s.write_all(&h.encode()).expect("request");
        }
    }

    /// One simple reply: (errno, cookie).
    pub fn simple_reply(s: &mut TcpStream) -> (u32, u64) {
        let b = read_n(s, 16);
        assert_eq!(&b[0..4], &NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u32::from_be_bytes(b[4..8].try_into().unwrap()),
            u64::from_be_bytes(b[8..16].try_into().unwrap()),
        )
    }

    /// One structured or extended chunk: (flags, type, cookie, payload).
    pub fn chunk(s: &mut TcpStream, ext: bool) -> (u16, u16, u64, Vec<u8>) {
        let n = if ext { 32 } else { 20 };
        let b = read_n(s, n);
        let len = if ext {
            assert_eq!(&b[0..4], &NBD_EXTENDED_REPLY_MAGIC.to_be_bytes());
            u64::from_be_bytes(b[24..32].try_into().unwrap()) as usize
        } else {
            assert_eq!(&b[0..4], &NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
            u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize
        };
        (
            u16::from_be_bytes([b[4], b[5]]),
            u16::from_be_bytes([b[6], b[7]]),
            u64::from_be_bytes(b[8..16].try_into().unwrap()),
            read_n(s, len),
        )
    }

    /// Whether the server closed the connection before the deadline.
    pub fn closed(s: &mut TcpStream) -> bool {
        let deadline = Instant::now() + DEADLINE;
        let mut b = [0u8; 512];
        while Instant::now() < deadline {
            match s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return false;
                }
                Err(_) => return true,
            }
        }
        false
    }
}

/// A reference client that must keep being served: writes a marker at a
/// fixed place once, then re-reads it after every bad client.
struct Witness {
    s: std::net::TcpStream,
    cookie: u64,
}

impl Witness {
    fn new(addr: &str) -> Witness {
        use std::io::Write;
        let mut s = raw::open(addr, "w", raw::ReplyMode::Simple);
        raw::request(&mut s, false, raw::NBD_CMD_WRITE, 0, 1, 0, 4096);
        s.write_all(&[0x5a; 4096]).expect("payload");
        assert_eq!(raw::simple_reply(&mut s), (0, 1));
        Witness { s, cookie: 1 }
    }

    fn still_served(&mut self, after: &str) {
        self.cookie += 1;
        raw::request(
            &mut self.s,
            false,
            raw::NBD_CMD_READ,
            0,
            self.cookie,
            0,
            4096,
        );
        assert_eq!(
            raw::simple_reply(&mut self.s),
            (0, self.cookie),
            "after {after}"
        );
        assert_eq!(
            raw::read_n(&mut self.s, 4096),
            vec![0x5a; 4096],
            "after {after}"
        );
    }
}

fn raw_cluster(dir: &TempDir) -> Cluster {
    Cluster::start(
        dir.path(),
        &ClusterOptions {
            storage_daemons: 1,
            disk_size: "1G",
            volumes: vec![("w".into(), "16M".into()), ("r".into(), "16M".into())],
        },
    )
}

// Proves every handshake rejection branch against the real gateway:
// garbage instead of a handshake, bad client flags, bad option magic,
// oversized option, unknown option (ERR_UNSUP, connection kept and usable),
// unknown export via GO/INFO (ERR_UNKNOWN, kept) and via EXPORT_NAME
// (closed), meta contexts before structured replies (ERR_INVALID), and that
// a witness client is served after each.
#[test]
fn raw_handshake_rejections() {
    use raw::*;
    use std::io::Write;
    let dir = TempDir::new("nbdproto-rawhs");
    let c = raw_cluster(&dir);
    let mut w = Witness::new(&c.nbd);

    let mut s = connect(&c.nbd);
    read_n(&mut s, 18);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("garbage");
    assert!(closed(&mut s));
    w.still_served("garbage handshake");

    let mut s = connect(&c.nbd);
    read_n(&mut s, 18);
    s.write_all(&0x8000_0003u32.to_be_bytes()).expect("flags");
    assert!(closed(&mut s));
    w.still_served("unknown client flags");

    let mut s = connect(&c.nbd);
    greet(&mut s);
    s.write_all(b"IHAVEOPX\0\0\0\x03\0\0\0\0")
        .expect("bad magic");
    assert!(closed(&mut s));
    w.still_served("bad option magic");

    let mut s = connect(&c.nbd);
    greet(&mut s);
    let mut o = IHAVEOPT.to_be_bytes().to_vec();
    o.extend_from_slice(&0x99u32.to_be_bytes());
    o.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&o).expect("oversized option");
    assert!(closed(&mut s));
    w.still_served("oversized option");

    // Unknown option, unknown export, meta context too early: errors, and
    // the same connection then enters transmission and reads.
    let mut s = connect(&c.nbd);
    greet(&mut s);
    send_opt(&mut s, 0x4242, b"what is this");
    assert_eq!(opt_reply(&mut s).1, NBD_REP_ERR_UNSUP);
    assert_eq!(go(&mut s, "nope"), NBD_REP_ERR_UNKNOWN);
    assert_eq!(go(&mut s, ""), NBD_REP_ERR_UNKNOWN);
    let mut d = name_data("r");
    d.extend_from_slice(&0u32.to_be_bytes());
    send_opt(&mut s, NBD_OPT_LIST_META_CONTEXT, &d);
    assert_eq!(opt_reply(&mut s).1, NBD_REP_ERR_INVALID);
    send_opt(&mut s, NBD_OPT_STARTTLS, &[]);
    assert_eq!(opt_reply(&mut s).1, NBD_REP_ERR_POLICY);
    assert_eq!(go(&mut s, "r"), NBD_REP_ACK);
    request(&mut s, false, NBD_CMD_READ, 0, 9, 0, 512);
    assert_eq!(simple_reply(&mut s), (0, 9));
    assert_eq!(read_n(&mut s, 512), vec![0u8; 512]);
    w.still_served("unknown option and export");

    for name in [&b"nope"[..], b""] {
        let mut s = connect(&c.nbd);
        greet(&mut s);
        send_opt(&mut s, NBD_OPT_EXPORT_NAME, name);
        assert!(closed(&mut s));
    }
    w.still_served("EXPORT_NAME of an unknown export");

    // A client that connects and vanishes in the middle of an option.
    let mut s = connect(&c.nbd);
    greet(&mut s);
    s.write_all(&IHAVEOPT.to_be_bytes()).expect("half option");
    drop(s);
    w.still_served("client gone mid-option");
}

// Proves every transmission rejection branch against the real gateway, in
// compact and extended mode: bad magic (closed), unknown command, unknown
// and inapplicable flags, out-of-range and overflowing offsets, length over
// the advertised maximum (each an errno, connection kept in sync), a client
// disconnecting mid-payload; and that a witness client is served after
// each.
#[test]
fn raw_transmission_rejections() {
    use raw::*;
    use std::io::Write;
    let dir = TempDir::new("nbdproto-rawtx");
    let c = raw_cluster(&dir);
    let mut w = Witness::new(&c.nbd);
    let end = 16 * MIB;
    let max = u64::from(REQUEST_MAX_BYTES);
    // kind, flags, offset, length, payload bytes sent, errno
    let cases: &[(u16, u16, u64, u64, u64, u32)] = &[
        (42, 0, 0, 512, 0, NBD_EINVAL),
        (NBD_CMD_BLOCK_STATUS, 0, 0, 512, 0, NBD_EINVAL),
        (NBD_CMD_READ, 0x8000, 0, 512, 0, NBD_EINVAL),
        (NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512, 0, NBD_EINVAL),
        (NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 512, 512, NBD_EINVAL),
        (NBD_CMD_READ, 0, end - 512, 1024, 0, NBD_EINVAL),
        (NBD_CMD_READ, 0, u64::MAX - 511, 512, 0, NBD_EINVAL),
        (NBD_CMD_WRITE, 0, end, 512, 512, NBD_ENOSPC),
        (NBD_CMD_WRITE, 0, u64::MAX - 511, 512, 512, NBD_ENOSPC),
        (NBD_CMD_TRIM, 0, end, 512, 0, NBD_EINVAL),
        (NBD_CMD_WRITE_ZEROES, 0, end - 512, 1024, 0, NBD_ENOSPC),
        (NBD_CMD_CACHE, 0, end, 4096, 0, NBD_EINVAL),
        (NBD_CMD_READ, 0, 0, max + 512, 0, NBD_EINVAL),
        (NBD_CMD_WRITE, 0, 0, max + 512, max + 512, NBD_EINVAL),
        (NBD_CMD_READ, 0, 100, 512, 0, NBD_EINVAL),
        (NBD_CMD_FLUSH, 0, 0, 512, 0, NBD_EINVAL),
    ];
    let mut s = open(&c.nbd, "r", ReplyMode::Simple);
    for (i, &(kind, flags, offset, length, payload, errno)) in cases.iter().enumerate() {
        let cookie = 100 + i as u64;
        request(&mut s, false, kind, flags, cookie, offset, length);
        s.write_all(&vec![0xAB; payload as usize]).expect("payload");
        assert_eq!(simple_reply(&mut s), (errno, cookie), "case {i}");
        w.still_served(&format!("case {i}"));
    }
    // Still in sync and nothing was written by the rejected writes.
    request(&mut s, false, NBD_CMD_READ, 0, 1, 0, 512);
    assert_eq!(simple_reply(&mut s), (0, 1));
    assert_eq!(read_n(&mut s, 512), vec![0u8; 512]);
    // Bad magic: the stream cannot be resynchronised.
    s.write_all(&[0xde; 28]).expect("garbage");
    assert!(closed(&mut s));
    w.still_served("bad request magic");

    // Structured replies: a rejected READ is an ERROR chunk, never simple.
    let mut s = open(&c.nbd, "r", ReplyMode::Structured);
    request(&mut s, false, NBD_CMD_READ, 0, 5, end, 512);
    let (flags, kind, cookie, p) = chunk(&mut s, false);
    assert_eq!(
        (flags, kind, cookie),
        (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 5)
    );
    assert_eq!(&p[0..4], &NBD_EINVAL.to_be_bytes());

    // Extended headers: 64-bit lengths, payload on a non-WRITE drained.
    let mut s = open(&c.nbd, "r", ReplyMode::Extended);
    request(&mut s, true, NBD_CMD_TRIM, 0, 6, 0, 1 << 40);
    let (_, kind, _, p) = chunk(&mut s, true);
    assert_eq!(
        (kind, &p[0..4]),
        (NBD_REPLY_TYPE_ERROR, &NBD_EINVAL.to_be_bytes()[..])
    );
    request(
        &mut s,
        true,
        NBD_CMD_FLUSH,
        NBD_CMD_FLAG_PAYLOAD_LEN,
        7,
        0,
        16,
    );
    s.write_all(&[0u8; 16]).expect("payload");
    let (_, kind, cookie, _) = chunk(&mut s, true);
    assert_eq!((kind, cookie), (NBD_REPLY_TYPE_ERROR, 7));
    request(&mut s, true, NBD_CMD_READ, 0, 8, 4096, 4096);
    let (flags, kind, cookie, p) = chunk(&mut s, true);
    assert_eq!(
        (flags, kind, cookie),
        (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_HOLE, 8)
    );
    assert_eq!(
        p,
        [&4096u64.to_be_bytes()[..], &4096u32.to_be_bytes()].concat()
    );
    w.still_served("extended rejections");

    // Client gone in the middle of a write payload.
    let mut s = open(&c.nbd, "r", ReplyMode::Simple);
    request(&mut s, false, NBD_CMD_WRITE, 0, 1, 0, 65536);
    s.write_all(&[7u8; 1000]).expect("partial payload");
    drop(s);
    w.still_served("client gone mid-payload");
    // The torn write never became visible as data.
    let mut s = open(&c.nbd, "r", ReplyMode::Simple);
    request(&mut s, false, NBD_CMD_READ, 0, 2, 0, 4096);
    assert_eq!(simple_reply(&mut s), (0, 2));
    assert_eq!(read_n(&mut s, 4096), vec![0u8; 4096]);
}

// Proves structured reads and BLOCK_STATUS over the raw protocol in both
// reply formats: a write shows up as OFFSET_DATA and as an allocated
// extent, the rest as holes; REQ_ONE returns one extent within the
// request; FAST_ZERO is honoured without NO_HOLE and refused (ENOTSUP)
// with it, and NO_HOLE zeroing leaves the range allocated.
#[test]
fn raw_structured_reads_and_block_status() {
    use raw::*;
    use std::io::Write;
    let dir = TempDir::new("nbdproto-rawbs");
    let c = raw_cluster(&dir);
    for (ext, mode) in [(false, ReplyMode::Structured), (true, ReplyMode::Extended)] {
        let vol = if ext { "w" } else { "r" };
        let mut s = open(&c.nbd, vol, mode);
        let wflags = if ext { NBD_CMD_FLAG_PAYLOAD_LEN } else { 0 };
        request(&mut s, ext, NBD_CMD_WRITE, wflags, 1, 8192, 8192);
        s.write_all(&[9u8; 8192]).expect("payload");
        let ok = if ext {
            let (f, t, ck, _) = chunk(&mut s, true);
            assert_eq!((f, t), (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE));
            ck
        } else {
            let (e, ck) = simple_reply(&mut s);
            assert_eq!(e, 0);
            ck
        };
        assert_eq!(ok, 1);
        request(&mut s, ext, NBD_CMD_READ, 0, 2, 0, 4 * 4096);
        let mut kinds = Vec::new();
        loop {
            let (f, t, _, p) = chunk(&mut s, ext);
            let at = u64::from_be_bytes(p[0..8].try_into().unwrap());
            kinds.push((t, at));
            if f & NBD_REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        assert_eq!(
            kinds,
            [
                (NBD_REPLY_TYPE_OFFSET_HOLE, 0),
                (NBD_REPLY_TYPE_OFFSET_DATA, 8192),
            ],
            "{mode:?}"
        );
        request(&mut s, ext, NBD_CMD_BLOCK_STATUS, 0, 3, 0, MIB);
        let (f, t, _, p) = chunk(&mut s, ext);
        assert_eq!(f, NBD_REPLY_FLAG_DONE);
        let desc: Vec<(u64, u64)> = if ext {
            assert_eq!(t, NBD_REPLY_TYPE_BLOCK_STATUS_EXT);
            assert_eq!(&p[0..4], &BASE_ALLOCATION_ID.to_be_bytes());
            p[8..]
                .chunks(16)
                .map(|d| {
                    (
                        u64::from_be_bytes(d[0..8].try_into().unwrap()),
                        u64::from_be_bytes(d[8..16].try_into().unwrap()),
                    )
                })
                .collect()
        } else {
            assert_eq!(t, NBD_REPLY_TYPE_BLOCK_STATUS);
            p[4..]
                .chunks(8)
                .map(|d| {
                    (
                        u64::from(u32::from_be_bytes(d[0..4].try_into().unwrap())),
                        u64::from(u32::from_be_bytes(d[4..8].try_into().unwrap())),
                    )
                })
                .collect()
        };
        assert_eq!(desc, [(8192, 3), (8192, 0), (MIB - 16384, 3)], "{mode:?}");
        request(
            &mut s,
            ext,
            NBD_CMD_BLOCK_STATUS,
            NBD_CMD_FLAG_REQ_ONE,
            4,
            0,
            4096,
        );
        let (_, _, _, p) = chunk(&mut s, ext);
        assert_eq!(p.len(), if ext { 8 + 16 } else { 4 + 8 });
        // FAST_ZERO without NO_HOLE: fast (deallocates), succeeds.
        request(
            &mut s,
            ext,
            NBD_CMD_WRITE_ZEROES,
            NBD_CMD_FLAG_FAST_ZERO,
            5,
            8192,
            4096,
        );
        let e = if ext {
            chunk(&mut s, true).1
        } else {
            simple_reply(&mut s).0 as u16
        };
        assert_eq!(e, 0);
        // FAST_ZERO with NO_HOLE: would write data, so ENOTSUP at once.
        request(
            &mut s,
            ext,
            NBD_CMD_WRITE_ZEROES,
            NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_NO_HOLE,
            6,
            MIB,
            4096,
        );
        let (_, t, _, p) = chunk(&mut s, ext);
        assert_eq!(
            (t, &p[0..4]),
            (NBD_REPLY_TYPE_ERROR, &NBD_ENOTSUP.to_be_bytes()[..])
        );
        // NO_HOLE: allocated zeroes.
        request(
            &mut s,
            ext,
            NBD_CMD_WRITE_ZEROES,
            NBD_CMD_FLAG_NO_HOLE,
            7,
            MIB,
            4096,
        );
        let e = if ext {
            chunk(&mut s, true).1
        } else {
            simple_reply(&mut s).0 as u16
        };
        assert_eq!(e, 0);
        request(&mut s, ext, NBD_CMD_BLOCK_STATUS, 0, 8, 0, 2 * MIB);
        let (_, _, _, p) = chunk(&mut s, ext);
        let n = if ext {
            (p.len() - 8) / 16
        } else {
            (p.len() - 4) / 8
        };
        // hole 0..12k, data 12k..16k, hole .. 1M, data 1M..1M+4k, hole.
        assert_eq!(n, 5, "{mode:?}");
        // CACHE in range: acknowledged.
        request(&mut s, ext, NBD_CMD_CACHE, 0, 9, 0, MIB);
        let e = if ext {
            chunk(&mut s, true).1
        } else {
            simple_reply(&mut s).0 as u16
        };
        assert_eq!(e, 0);
    }
}

// Proves the named limits given as gateway flags are advertised and
// enforced: the maximum payload in NBD_INFO_BLOCK_SIZE and on READ, the
// connection limit (an extra connection is closed at once, the others keep
// working), and a small in-flight limit that pipelined requests get through
// (backpressure, no deadlock).
#[test]
fn limits_from_flags() {
    use raw::*;
    use std::io::Write;
    require(&["nbdinfo"]);
    let dir = TempDir::new("nbdproto-limits");
    let c = raw_cluster(&dir);
    let gw = Gateway::start(
        &c,
        &[
            "--nbd-connections-max",
            "2",
            "--nbd-inflight-max",
            "2",
            "--nbd-request-max-bytes",
            "65536",
        ],
    );
    let json = run(std::process::Command::new("nbdinfo").args(["--json", &gw.uri("r")]));
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["exports"][0]["block_size_maximum"].as_u64(), Some(65536));
    let mut a = open(&gw.nbd, "r", ReplyMode::Simple);
    request(&mut a, false, NBD_CMD_READ, 0, 1, 0, 65536 + 4096);
    assert_eq!(simple_reply(&mut a), (NBD_EINVAL, 1));
    // 16 pipelined reads with 2 in flight at most.
    for i in 0..16 {
        request(&mut a, false, NBD_CMD_READ, 0, 10 + i, i * 4096, 4096);
    }
    let mut seen = Vec::new();
    for _ in 0..16 {
        let (e, ck) = simple_reply(&mut a);
        assert_eq!(e, 0);
        read_n(&mut a, 4096);
        seen.push(ck);
    }
    seen.sort();
    assert_eq!(seen, (10..26).collect::<Vec<u64>>());
    let mut b = connect(&gw.nbd);
    greet(&mut b);
    // A third connection is over the limit: closed without a greeting.
    let mut third = std::net::TcpStream::connect(&gw.nbd).expect("connect");
    third.set_read_timeout(Some(DEADLINE)).expect("timeout");
    assert!(closed(&mut third));
    assert_eq!(go(&mut b, "r"), NBD_REP_ACK);
    drop(a);
    // A slot frees up once a client leaves.
    poll(
        "a connection slot",
        std::time::Duration::from_secs(10),
        || {
            let mut s = std::net::TcpStream::connect(&gw.nbd).ok()?;
            s.set_read_timeout(Some(DEADLINE)).ok()?;
            let mut g = [0u8; 18];
            use std::io::Read;
            s.read_exact(&mut g).ok().map(|_| ())
        },
    );
    b.write_all(&[0u8; 0]).expect("still open");
    request(&mut b, false, NBD_CMD_READ, 0, 2, 0, 512);
    assert_eq!(simple_reply(&mut b), (0, 2));
    // Out-of-range flag values are refused at start (exit code 2).
    let st = std::process::Command::new(bin("tessera-gateway"))
        .args(["--manager", &c.manager, "--nbd-request-max-bytes", "1000"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run gateway");
    assert_eq!(st.code(), Some(2));
}

/// A self-signed certificate for 127.0.0.1/localhost, made with the
/// openssl CLI, in `dir` as cert.pem, key.pem and (for libnbd, which loads
/// `<dir>/ca-cert.pem` as its trust anchor) ca-cert.pem.
fn self_signed(dir: &std::path::Path) {
    run(std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stderr(std::process::Stdio::null()));
    std::fs::copy(dir.join("cert.pem"), dir.join("ca-cert.pem")).expect("ca-cert");
}

// Proves NBD_OPT_STARTTLS with a self-signed certificate: nbdinfo and
// nbdcopy over nbds:// (TLS verified against the certificate) read and
// write; with --tls-require plain clients are refused (TLS_REQD, EXPORT_NAME
// closed) while TLS clients are served; without a certificate STARTTLS is
// refused (POLICY).
#[test]
fn tls_with_self_signed_certificate() {
    use raw::*;
    require(&["nbdinfo", "nbdcopy", "openssl"]);
    let dir = TempDir::new("nbdproto-tls");
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).expect("certs dir");
    self_signed(&certs);
    let c = Cluster::start(
        &dir.path().join("cluster"),
        &ClusterOptions {
            storage_daemons: 1,
            disk_size: "1G",
            volumes: vec![("t".into(), "16M".into())],
        },
    );
    let cert = certs.join("cert.pem");
    let key = certs.join("key.pem");
    let tls_args = [
        "--tls-cert",
        cert.to_str().expect("utf8"),
        "--tls-key",
        key.to_str().expect("utf8"),
    ];
    let query = format!("?tls-certificates={}", certs.display());
    for require_tls in [false, true] {
        let mut args = tls_args.to_vec();
        if require_tls {
            args.push("--tls-require");
        }
        let gw = Gateway::start(&c, &args);
        let nbds = format!("nbds://{}/t{query}", gw.nbd);
        let (ok, out, err) =
            output(std::process::Command::new("nbdinfo").args(["--is", "tls", &nbds]));
        assert!(ok, "nbdinfo --is tls: {out}{err}");
        let json = run(std::process::Command::new("nbdinfo").args(["--json", &nbds]));
        assert!(json.contains("\"export-size\": 16777216"), "{json}");
        let src = dir.path().join("src.img");
        std::fs::write(&src, pattern(11, (16 * MIB) as usize)).expect("src");
        run(std::process::Command::new("nbdcopy")
            .arg("--flush")
            .arg(&src)
            .arg(&nbds));
        let back = dir.path().join("back.img");
        run(std::process::Command::new("nbdcopy").arg(&nbds).arg(&back));
        assert!(files_equal(&src, &back), "TLS round trip differs");
        let plain = gw.uri("t");
        let (ok, _, _) = output(std::process::Command::new("nbdinfo").arg(&plain));
        assert_eq!(
            ok, !require_tls,
            "plain client with --tls-require={require_tls}"
        );
        if require_tls {
            let mut s = connect(&gw.nbd);
            greet(&mut s);
            send_opt(&mut s, NBD_OPT_LIST, &[]);
            assert_eq!(opt_reply(&mut s).1, NBD_REP_ERR_TLS_REQD);
            send_opt(&mut s, NBD_OPT_EXPORT_NAME, b"t");
            assert!(closed(&mut s));
        }
    }
    let gw = Gateway::start(&c, &[]);
    let mut s = connect(&gw.nbd);
    greet(&mut s);
    send_opt(&mut s, NBD_OPT_STARTTLS, &[]);
    assert_eq!(opt_reply(&mut s).1, NBD_REP_ERR_POLICY);
    // A missing key file is a fatal start error (exit code 8).
    let st = std::process::Command::new(bin("tessera-gateway"))
        .args(["--manager", &c.manager])
        .args(["--tls-cert", cert.to_str().expect("utf8")])
        .args(["--tls-key", "/nonexistent/key.pem"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run gateway");
    assert_eq!(st.code(), Some(8));
}
