//! Read repair and scrub with real processes: `tessera up --storage-daemons
//! 3 --replicas 3`, data written through NBD with nbdcopy, blocks of one copy
//! overwritten with garbage underneath the running daemon (O_DIRECT pwrite
//! into its disk file), read back through NBD (repaired on the fly from
//! another copy), then blocks of other copies corrupted and a scrub asked
//! for (`tessera pg scrub --wait`); every copy compared at the end.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tessera_tests::*;

const TAG: &[u8; 16] = b"tessera-repair\0\0";
const BLOCK: usize = 4096;
const VOLUME_BYTES: usize = 16 << 20;
const CHUNK_BLOCKS: u64 = 1024;

/// The test data: every 4 KiB block starts with TAG and its index, so its
/// physical place on a disk file can be found by a scan.
fn tagged(len: usize) -> Vec<u8> {
    let mut d = pattern(42, len);
    for (i, b) in d.chunks_mut(BLOCK).enumerate() {
        b[..16].copy_from_slice(TAG);
        b[16..24].copy_from_slice(&(i as u64).to_le_bytes());
    }
    d
}

/// Where each tagged block lies in a disk file: block index -> byte offset.
/// Only the data extents of the sparse file are read (SEEK_DATA/SEEK_HOLE).
fn find_blocks(path: &Path) -> BTreeMap<u64, u64> {
    let f = std::fs::File::open(path).expect("open disk file");
    let size = f.metadata().expect("stat").len() as i64;
    let fd = f.as_raw_fd();
    let mut found = BTreeMap::new();
    let mut pos: i64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while pos < size {
        let data = lseek(fd, pos, libc::SEEK_DATA);
        if data < 0 {
            break;
        }
        let hole = lseek(fd, data, libc::SEEK_HOLE).max(data);
        let mut at = data - data % BLOCK as i64;
        while at < hole {
            let n = ((hole - at) as usize).min(buf.len());
            let n = n - n % BLOCK;
            if n == 0 {
                break;
            }
            f.read_exact_at(&mut buf[..n], at as u64)
                .expect("read disk file");
            for (i, b) in buf[..n].chunks(BLOCK).enumerate() {
                if &b[..16] == TAG {
                    let idx = u64::from_le_bytes(b[16..24].try_into().expect("8"));
                    found.insert(idx, at as u64 + (i * BLOCK) as u64);
                }
            }
            at += n as i64;
        }
        pos = hole.max(at);
    }
    found
}

/// lseek(2): std has no SEEK_DATA / SEEK_HOLE.
fn lseek(fd: i32, off: i64, whence: i32) -> i64 {
    #[allow(unsafe_code)]
    // SAFETY: lseek on a valid, open descriptor owned by the caller; it
    // reads no memory of ours.
    unsafe {
        libc::lseek(fd, off, whence)
    }
}

/// Overwrite whole 4 KiB blocks of a disk file with garbage, with O_DIRECT
/// (as the daemon reads), underneath the running daemon.
fn corrupt(path: &Path, offsets: &[u64]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("open disk file O_DIRECT");
    let mut raw = vec![0u8; 2 * BLOCK];
    let start = raw.as_ptr().align_offset(BLOCK);
    let buf = &mut raw[start..start + BLOCK];
    buf.copy_from_slice(&pattern(0xbad, BLOCK));
    for off in offsets {
        assert_eq!(off % BLOCK as u64, 0);
        f.write_all_at(buf, *off).expect("pwrite garbage");
    }
}

/// The disk file of a disk id.
fn disk_path(c: &Cluster, disk: u32) -> PathBuf {
    let disks: serde_json::Value =
        serde_json::from_str(&c.cli(&["--output", "json", "disk", "list"])).expect("json");
    let d = disks
        .as_array()
        .expect("disk array")
        .iter()
        .find(|d| d["id"] == disk)
        .expect("disk listed");
    PathBuf::from(d["path"].as_str().expect("path"))
}

/// Members of the group holding `chunk` of `volume`: (primary, others).
fn members(c: &Cluster, volume: &str, chunk: u32) -> (u32, Vec<u32>) {
    let m = cluster_map(c);
    let v = m.volume_by_name(volume).expect("volume");
    let pg = m.pg_for(v.id, chunk).expect("pg");
    let primary = m.primary(pg).expect("primary");
    let others = m.pgs[pg as usize]
        .iter()
        .copied()
        .filter(|d| *d != primary)
        .collect();
    (primary, others)
}

/// Corrupt the given tagged blocks on `disk`'s file; returns how many.
fn corrupt_tagged(c: &Cluster, disk: u32, blocks: &[u64]) -> usize {
    let path = disk_path(c, disk);
    let found = find_blocks(&path);
    let offsets: Vec<u64> = blocks
        .iter()
        .map(|b| {
            *found
                .get(b)
                .unwrap_or_else(|| panic!("block {b} not found on disk {disk}"))
        })
        .collect();
    corrupt(&path, &offsets);
    offsets.len()
}

/// A storage metric including everything that completed before the call:
/// the daemons publish their counters in rounds (about every 100 ms), so
/// once every daemon has completed two more rounds, one of them started
/// after the call.
fn settled(c: &Cluster, name: &str) -> f64 {
    const ROUNDS: &str = "tessera_storage_metric_publications_total";
    let rounds = |c: &Cluster| -> Vec<f64> {
        c.storage_metrics()
            .iter()
            .map(|m| metric_sum(m, ROUNDS))
            .collect()
    };
    let start = rounds(c);
    poll(
        "two publication rounds on every daemon",
        Duration::from_secs(30),
        || {
            let now = rounds(c);
            (now.len() == start.len() && now.iter().zip(&start).all(|(n, s)| *n >= s + 2.0))
                .then_some(())
        },
    );
    storage_metric(c, name)
}

fn read_back(c: &Cluster, dir: &Path, name: &str) -> Vec<u8> {
    let out = dir.join(name);
    run(Command::new("nbdcopy").arg(c.uri("r")).arg(&out));
    std::fs::read(&out).expect("read copy")
}

// Proves that a checksum error found by a client read is repaired from
// another copy and the client gets the correct data with no error (counted
// in the repair metrics), at the primary (through NBD) and at another copy
// (through the internal protocol), and that a scrub finds and repairs corrupt blocks
// on other copies (primary's and replicas'), leaving every copy of every
// chunk identical and readable without a checksum error.
#[test]
fn read_repair_and_scrub() {
    assert!(
        have("nbdcopy"),
        "nbdcopy is required (tests/run.sh installs it)"
    );
    let dir = TempDir::new("repair");
    let opts = ClusterOptions {
        storage_daemons: 3,
        disk_size: "1G",
        volumes: vec![("r".into(), "16M".into())],
    };
    let c = Cluster::start_with_args(
        &dir.path().join("cluster"),
        &opts,
        &["127.0.0.1:0"],
        &[
            "--replicas",
            "3",
            "--scrub-interval",
            "off",
            "--scrub-rate",
            "256M",
        ],
    );
    let s = status_json(&c);
    assert_eq!(s["pgs_clean"], s["pgs_total"], "{s}");

    let data = tagged(VOLUME_BYTES);
    let src = dir.path().join("src.img");
    std::fs::write(&src, &data).expect("write source");
    run(Command::new("nbdcopy").arg(&src).arg(c.uri("r")));

    // 1. Read repair: garbage under the primary of chunk 0, which serves
    // the gateway's reads.
    let (p0, others0) = members(&c, "r", 0);
    let n = corrupt_tagged(&c, p0, &[3, 4, 100, 700]);
    let ck0 = settled(&c, "tessera_storage_checksum_errors_total");
    let back = read_back(&c, dir.path(), "back1.img");
    assert!(back == data, "read back after corruption differs");
    let ck1 = settled(&c, "tessera_storage_checksum_errors_total");
    let repairs1 = settled(&c, "tessera_storage_repairs_total");
    let repair_bytes1 = storage_metric(&c, "tessera_storage_repair_bytes_total");
    let unrepairable1 = storage_metric(&c, "tessera_storage_unrepairable_total");
    println!(
        "read repair: {n} blocks corrupted on disk {p0}; checksum errors {ck0} -> {ck1}; repairs {repairs1} ({repair_bytes1} bytes), unrepairable {unrepairable1}"
    );
    assert!(ck1 > ck0, "the corrupted blocks were not read");
    assert!(repairs1 >= 1.0, "no repair counted");
    assert_eq!(unrepairable1, 0.0);
    // The copy was rewritten: reading again finds no bad block.
    let back = read_back(&c, dir.path(), "back2.img");
    assert!(back == data, "second read back differs");
    assert_eq!(
        settled(&c, "tessera_storage_checksum_errors_total"),
        ck1,
        "the primary's copy still fails its CRC after the repair"
    );
    assert_eq!(settled(&c, "tessera_storage_repairs_total"), repairs1);

    // 1b. Read repair at a copy that is not the primary (reads may be
    // served by any up-to-date copy): the member asks the primary to
    // rewrite its copy, then answers.
    let (_, others1) = members(&c, "r", 1);
    corrupt_tagged(&c, others1[0], &[CHUNK_BLOCKS + 200, CHUNK_BLOCKS + 201]);
    let chunk_bytes = CHUNK_BLOCKS as usize * BLOCK;
    let copy = read_copy(&c, "r", 1, others1[0]);
    assert!(
        copy == data[chunk_bytes..2 * chunk_bytes],
        "the replica's read of chunk 1 differs"
    );
    let repairs1b = settled(&c, "tessera_storage_repairs_total");
    println!(
        "read repair at a replica (disk {}): repairs {repairs1} -> {repairs1b}",
        others1[0]
    );
    assert!(repairs1b > repairs1, "the replica's read was not repaired");
    assert!(
        settled(&c, "tessera_storage_checksum_errors_total") > ck1,
        "the replica's corrupted blocks were not read"
    );

    // 2. Scrub: garbage under a replica of chunk 0, a replica of chunk 1
    // and the primary of chunk 2 (not read by anyone before the scrub).
    let (p2, _) = members(&c, "r", 2);
    corrupt_tagged(&c, others0[0], &[10, 11]);
    corrupt_tagged(&c, others1[1], &[CHUNK_BLOCKS + 500]);
    corrupt_tagged(&c, p2, &[2 * CHUNK_BLOCKS + 17, 2 * CHUNK_BLOCKS + 900]);
    let errors0 = storage_metric(&c, "tessera_storage_scrub_errors_total");
    let out = c.cli(&[
        "--output",
        "json",
        "pg",
        "scrub",
        "--wait",
        "--timeout",
        "120",
    ]);
    let s: serde_json::Value = serde_json::from_str(&out).expect("scrub status json");
    println!("scrub: {s}");
    assert_eq!(s["scrub_daemons_done"], s["daemons_up"], "{s}");
    assert_eq!(s["unrepairable"], 0, "{s}");
    // Every 64 KiB region of the 16 MiB volume compared once (all written).
    assert_eq!(s["scrub_regions"], VOLUME_BYTES / 65536, "{s}");
    // Four 64 KiB regions hold a corrupt copy (10 and 11 share one).
    let found = storage_metric(&c, "tessera_storage_scrub_errors_total") - errors0;
    assert!(
        found >= 4.0,
        "scrub found {found} bad copies of regions, expected 4"
    );
    let text = c.cli(&["status"]);
    assert!(
        text.contains("scrub "),
        "status shows no scrub line: {text}"
    );

    // Every copy identical, and none failed its CRC while compared.
    let ck = settled(&c, "tessera_storage_checksum_errors_total");
    let repairs = settled(&c, "tessera_storage_repairs_total");
    let chunks = compare_copies(&c, "r");
    assert_eq!(
        settled(&c, "tessera_storage_checksum_errors_total"),
        ck,
        "a copy still failed its CRC after the scrub"
    );
    assert_eq!(settled(&c, "tessera_storage_repairs_total"), repairs);
    println!("{chunks} chunks identical on all three copies after the scrub");
    let back = read_back(&c, dir.path(), "back3.img");
    assert!(back == data, "read back after the scrub differs");
    c.stop();
}
