//! Read repair and scrub with real processes: `tessera up --storage-daemons
//! 3 --replicas 3`, data written through NBD with nbdcopy, blocks of one copy
//! overwritten with garbage underneath the running daemon (O_DIRECT pwrite
//! into its disk file), read back through NBD (repaired on the fly from
//! another copy), then blocks of other copies corrupted and a scrub asked
//! for (`tessera pg scrub --wait`); every copy compared at the end. The
//! second test does the same under fio: fio's own blocks corrupted on the
//! primary's and a replica's copy while another fio writes with crc32c
//! verify, read back (`--verify_only`) and scrubbed, the writer's stall
//! reported.

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
fn find_blocks(path: &Path) -> BTreeMap<u64, u64> {
    blocks_by(path, |b| {
        (&b[..16] == TAG).then(|| u64::from_le_bytes(b[16..24].try_into().expect("8")))
    })
    .into_iter()
    .filter_map(|(k, at)| Some((k, *at.last()?)))
    .collect()
}

/// Every 4 KiB block of a disk file that `key` recognises: key -> the byte
/// offsets holding it. Only the data extents of the sparse file are read
/// (SEEK_DATA/SEEK_HOLE).
fn blocks_by(path: &Path, key: impl Fn(&[u8]) -> Option<u64>) -> BTreeMap<u64, Vec<u64>> {
    let f = std::fs::File::open(path).expect("open disk file");
    let size = f.metadata().expect("stat").len() as i64;
    let fd = f.as_raw_fd();
    let mut found: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
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
                if let Some(k) = key(b) {
                    found
                        .entry(k)
                        .or_default()
                        .push(at as u64 + (i * BLOCK) as u64);
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

    let mut data = tagged(VOLUME_BYTES);
    let src = dir.path().join("src.img");
    std::fs::write(&src, &data).expect("write source");
    run(Command::new("nbdcopy").arg(&src).arg(c.uri("r")));

    // 1. Read repair: garbage under the primary of chunk 0, which serves
    // the gateway's reads.
    let (p0, others0) = members(&c, "r", 0);
    let n = corrupt_tagged(&c, p0, &[3, 4, 100, 700]);
    let ck0 = settled_storage_metric(&c, "tessera_storage_checksum_errors_total");
    let back = read_back(&c, dir.path(), "back1.img");
    assert!(back == data, "read back after corruption differs");
    let ck1 = settled_storage_metric(&c, "tessera_storage_checksum_errors_total");
    let repairs1 = settled_storage_metric(&c, "tessera_storage_repairs_total");
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
        settled_storage_metric(&c, "tessera_storage_checksum_errors_total"),
        ck1,
        "the primary's copy still fails its CRC after the repair"
    );
    assert_eq!(
        settled_storage_metric(&c, "tessera_storage_repairs_total"),
        repairs1
    );

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
    let repairs1b = settled_storage_metric(&c, "tessera_storage_repairs_total");
    println!(
        "read repair at a replica (disk {}): repairs {repairs1} -> {repairs1b}",
        others1[0]
    );
    assert!(repairs1b > repairs1, "the replica's read was not repaired");
    assert!(
        settled_storage_metric(&c, "tessera_storage_checksum_errors_total") > ck1,
        "the replica's corrupted blocks were not read"
    );

    // 1c. A write that is not whole 4 KiB blocks over a block that fails
    // its CRC, on the primary's copy of chunk 3 and on a replica's: the
    // copy that cannot merge it is rewritten from a good one (which has the
    // write) before the write is answered, and the write succeeds (it used
    // to fail with EIO).
    let (p3, others3) = members(&c, "r", 3);
    corrupt_tagged(&c, p3, &[3 * CHUNK_BLOCKS + 50]);
    corrupt_tagged(&c, others3[0], &[3 * CHUNK_BLOCKS + 60]);
    let repairs1c = settled_storage_metric(&c, "tessera_storage_repairs_total");
    for blk in [50u64, 60] {
        let off = (3 * CHUNK_BLOCKS + blk) as usize * BLOCK + 1024;
        run(Command::new("qemu-io")
            .args(["-f", "raw", "-c", &format!("write -P 0x5a {off} 512")])
            .arg(c.uri("r")));
        data[off..off + 512].fill(0x5a);
    }
    let back = read_back(&c, dir.path(), "back1c.img");
    assert!(back == data, "read back after the partial writes differs");
    let repairs1c2 = settled_storage_metric(&c, "tessera_storage_repairs_total");
    println!("partial writes over corrupt blocks: repairs {repairs1c} -> {repairs1c2}");
    assert!(repairs1c2 >= repairs1c + 2.0, "both copies were repaired");

    // 1d. Every copy bad somewhere in a read's extent, each block good on
    // one copy: block 300 of chunk 2 under the primary and one replica,
    // block 301 under the other replica. The repair takes each block from
    // a copy good for it (it used to fail the read with EIO).
    let (p2, others2) = members(&c, "r", 2);
    let (b300, b301) = (2 * CHUNK_BLOCKS + 300, 2 * CHUNK_BLOCKS + 301);
    corrupt_tagged(&c, p2, &[b300]);
    corrupt_tagged(&c, others2[0], &[b301]);
    corrupt_tagged(&c, others2[1], &[b300]);
    let repairs1d = settled_storage_metric(&c, "tessera_storage_repairs_total");
    let back = read_back(&c, dir.path(), "back1d.img");
    assert!(back == data, "read back with every copy partly bad differs");
    let repairs1d2 = settled_storage_metric(&c, "tessera_storage_repairs_total");
    println!("every copy partly bad: repairs {repairs1d} -> {repairs1d2}");
    assert!(repairs1d2 > repairs1d, "no repair counted");
    assert_eq!(
        storage_metric(&c, "tessera_storage_unrepairable_total"),
        0.0,
        "a block with a good copy was counted unrepairable"
    );
    // Each copy was rewritten: reading it finds no bad block.
    let ck1d = settled_storage_metric(&c, "tessera_storage_checksum_errors_total");
    for disk in [p2, others2[0], others2[1]] {
        let copy = read_copy(&c, "r", 2, disk);
        assert!(
            copy == data[2 * chunk_bytes..3 * chunk_bytes],
            "disk {disk}'s copy of chunk 2 differs after the repair"
        );
    }
    assert_eq!(
        settled_storage_metric(&c, "tessera_storage_checksum_errors_total"),
        ck1d,
        "a copy of chunk 2 still fails its CRC after the repair"
    );

    // 2. Scrub: garbage under a replica of chunk 0, a replica of chunk 1
    // and the primary of chunk 2 (not read by anyone before the scrub).
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
    let ck = settled_storage_metric(&c, "tessera_storage_checksum_errors_total");
    let repairs = settled_storage_metric(&c, "tessera_storage_repairs_total");
    let chunks = compare_copies(&c, "r");
    assert_eq!(
        settled_storage_metric(&c, "tessera_storage_checksum_errors_total"),
        ck,
        "a copy still failed its CRC after the scrub"
    );
    assert_eq!(
        settled_storage_metric(&c, "tessera_storage_repairs_total"),
        repairs
    );
    println!("{chunks} chunks identical on all three copies after the scrub");
    let back = read_back(&c, dir.path(), "back3.img");
    assert!(back == data, "read back after the scrub differs");
    c.stop();
}

/// fio's verify header (fio's verify.h, `struct verify_header`): the magic
/// 0xacca (a u16 in the machine's order) at byte 0, the length the header
/// covers (u32) at byte 4, and the offset of the block in the target (u64)
/// at byte 16. Returns (offset, length).
fn fio_header(b: &[u8]) -> Option<(u64, u32)> {
    (u16::from_ne_bytes([b[0], b[1]]) == 0xacca).then(|| {
        (
            u64::from_ne_bytes(b[16..24].try_into().expect("8")),
            u32::from_ne_bytes(b[4..8].try_into().expect("4")),
        )
    })
}

// Proves that disk files corrupted under running daemons while fio writes
// (crc32c verify, FLUSHes) are repaired without a client ever seeing an
// error: 16 MiB written by fio first (64 KiB blocks, each with fio's
// header), then, while a second fio writes elsewhere on the volume, the
// header blocks of some of those writes overwritten with garbage on the
// primary's copy (two per chunk) and on a replica's (one per chunk); fio
// reads the 16 MiB back (`--verify_only`: read repair at the primary), a
// scrub runs (the replicas' bad blocks), the writer's verify passes, every
// corrupt copy was rewritten, every copy of every chunk is identical with
// no block failing its CRC, and the 16 MiB read back again. Prints the
// writer's longest I/O stall.
#[test]
fn disk_files_corrupted_while_fio_writes() {
    require(&["fio"]);
    const FILL: u64 = 16 << 20;
    const FILL_BS: u64 = 64 << 10;
    let dir = TempDir::new("repair-fio");
    let opts = ClusterOptions {
        storage_daemons: 3,
        disk_size: "1G",
        volumes: vec![("r".into(), "48M".into())],
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
    let uri = c.uri("r");
    let fill = [
        "--name=fill",
        "--rw=write",
        "--bs=64k",
        "--size=16m",
        "--iodepth=4",
        "--verify=crc32c",
    ];
    let fill_args = |extra: &'static str| {
        let mut a = fill.to_vec();
        a.push(extra);
        a
    };
    fio_json(&fio_wait_ok(spawn_fio_nbd(
        &uri,
        &fill_args("--end_fsync=1"),
    )));

    // A writer on the rest of the volume for the whole test.
    let lat = dir.path().join("lat");
    let w0 = live_requests(&c, "write");
    let mut writer = spawn_fio_nbd(
        &uri,
        &[
            "--name=writer",
            "--rw=randwrite",
            "--bs=4k",
            "--offset=16m",
            "--size=24m",
            "--iodepth=8",
            "--rate_iops=400",
            "--fsync=32",
            "--verify=crc32c",
            "--verify_fatal=1",
            &format!("--write_lat_log={}", lat.display()),
            "--log_avg_msec=0",
        ],
    );
    poll(
        "the writer's writes to flow",
        Duration::from_secs(30),
        || (live_requests(&c, "write") > w0 + 200.0).then_some(()),
    );

    // Garbage under the running daemons: per chunk of the fill, the header
    // blocks of two of fio's writes on the primary's copy and of another
    // on a replica's (never one block on two copies: a good copy remains).
    let m = cluster_map(&c);
    let v = m.volume_by_name("r").expect("volume");
    let mut plan: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for chunk in 0..(FILL / v.chunk_size_bytes) as u32 {
        let (primary, others) = members(&c, "r", chunk);
        let base = u64::from(chunk) * v.chunk_size_bytes;
        let p = plan.entry(primary).or_default();
        p.extend([base + FILL_BS, base + 33 * FILL_BS]);
        plan.entry(others[chunk as usize % others.len()])
            .or_default()
            .push(base + 17 * FILL_BS);
    }
    let mut corrupted = 0;
    for (disk, offsets) in &plan {
        let path = disk_path(&c, *disk);
        let found = blocks_by(&path, |b| {
            fio_header(b)
                .filter(|(off, len)| u64::from(*len) == FILL_BS && *off < FILL)
                .map(|(off, _)| off)
        });
        for off in offsets {
            // A block found at two places (a staged write given back, say)
            // is left alone: which one is the copy is not known.
            match found.get(off).map(Vec::as_slice) {
                Some([at]) => {
                    corrupt(&path, &[*at]);
                    corrupted += 1;
                }
                other => println!("disk {disk}: fio block at {off} found at {other:?}, skipped"),
            }
        }
    }
    assert!(
        corrupted >= 8,
        "only {corrupted} of fio's blocks were found to corrupt"
    );
    let ck0 = settled_storage_metric(&c, "tessera_storage_checksum_errors_total");
    let repairs0 = settled_storage_metric(&c, "tessera_storage_repairs_total");
    let scrub_errors0 = storage_metric(&c, "tessera_storage_scrub_errors_total");

    // Read back through the gateway while the writer runs: the primaries'
    // bad blocks are repaired on the fly.
    fio_json(&fio_wait_ok(spawn_fio_nbd(
        &uri,
        &fill_args("--verify_only"),
    )));
    let ck1 = settled_storage_metric(&c, "tessera_storage_checksum_errors_total");
    let repairs1 = settled_storage_metric(&c, "tessera_storage_repairs_total");
    assert!(ck1 > ck0, "fio's read met no corrupt block");
    assert!(repairs1 > repairs0, "no read repair counted");

    // A scrub while the writer runs: the replicas' bad blocks.
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
    assert_eq!(s["scrub_daemons_done"], s["daemons_up"], "{s}");
    assert_eq!(s["unrepairable"], 0, "{s}");
    let writing = writer.try_wait().expect("fio").is_none();
    let repairs2 = settled_storage_metric(&c, "tessera_storage_repairs_total");
    let scrub_errors = storage_metric(&c, "tessera_storage_scrub_errors_total") - scrub_errors0;
    println!(
        "{corrupted} blocks corrupted; checksum errors met by fio's read {}, read repairs {}, bad copies found by the scrub {scrub_errors} (the writer still writing when it ended: {writing}), repairs in all {}",
        ck1 - ck0,
        repairs1 - repairs0,
        repairs2 - repairs0
    );
    assert!(
        repairs2 - repairs0 >= f64::from(corrupted),
        "{corrupted} copies corrupted, {} repaired",
        repairs2 - repairs0
    );
    assert_eq!(
        storage_metric(&c, "tessera_storage_unrepairable_total"),
        0.0
    );

    let stall = fio_max_latency_ms(&fio_wait_ok(writer));
    let gap = longest_completion_gap_ms(&dir.path().join("lat_clat.1.log"));
    println!(
        "the writer's longest I/O stall: {stall:.0} ms (longest gap between completions {gap} ms)"
    );

    // Every copy identical, none failing its CRC while compared; the fill
    // reads back again.
    wait_clean(&c, Duration::from_secs(60));
    let ck = settled_storage_metric(&c, "tessera_storage_checksum_errors_total");
    let chunks = compare_copies(&c, "r");
    assert_eq!(
        settled_storage_metric(&c, "tessera_storage_checksum_errors_total"),
        ck,
        "a copy still failed its CRC after the repairs"
    );
    println!("{chunks} chunks identical on all three copies");
    fio_json(&fio_wait_ok(spawn_fio_nbd(
        &uri,
        &fill_args("--verify_only"),
    )));
    c.stop();
}
