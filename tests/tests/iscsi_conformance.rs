//! libiscsi's conformance suite (`iscsi-test-cu`) against the gateway's
//! iSCSI target: every test of the SCSI and iSCSI families, each in its own
//! process with a timeout, through two portals (so the multipath tests
//! run). Workers run in parallel, each on its own volume; tests that reset
//! the target or use several paths run alone at the end, because a reset
//! raises unit attentions on every LUN.
//!
//! iscsi-test-cu reports a skipped test as passed; a test whose output has
//! "[SKIPPED]" is counted as skipped here. The table is written to
//! `target/iscsi-conformance.txt` (next to the binaries) and printed.
//!
//! Also here: iscsi-ls discovery, iscsi-inq, and data written through
//! iSCSI read back through NBD and the other way round.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use tessera_tests::{Cluster, ClusterOptions, TempDir, bin_dir, have, pattern, run};

/// Tests that fail because of libiscsi 1.19 itself (docs/iscsi.md explains
/// each). LUNResetSimpleAsync fails against every target.
/// GetLBAStatus.UnmapSingle asks for the status of LBA i + 1 and expects the
/// first descriptor to start at i + LBPPB, which SBC-4 §5.6 forbids unless
/// LBPPB is 1; our 512-byte volumes report 8 logical blocks per 4 KiB
/// physical block, so it fails on them, and `iscsi_test_cu_conformance`
/// proves it passes on a 4096-byte volume (LBPPB 1).
const KNOWN_BROKEN: &[&str] = &[
    "iSCSI.iSCSITMF.LUNResetSimpleAsync",
    "SCSI.GetLBAStatus.UnmapSingle",
];
/// Known-broken tests that must pass on a 4096-byte-block volume.
const PASS_ON_4K: &[&str] = &["SCSI.GetLBAStatus.UnmapSingle"];
/// Parallel workers (each with its own volume).
const WORKERS: usize = 4;
/// Seconds one test may take.
const TEST_TIMEOUT_S: u32 = 120;
const IQN: &str = "iqn.2026-11.io.tessera:";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Fail,
    Skip,
    Timeout,
}

fn list_tests() -> Vec<String> {
    let out = Command::new("iscsi-test-cu")
        .arg("--list")
        .output()
        .expect("iscsi-test-cu --list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| {
            (l.starts_with("SCSI.") || l.starts_with("iSCSI.")) && l.matches('.').count() == 2
        })
        .map(str::to_string)
        .collect()
}

/// Whether a test must run alone (resets, several paths).
fn serial(name: &str) -> bool {
    name.contains("Reset") || name.contains("Multipath") || name.contains("ITNexusLoss")
}

fn run_one(name: &str, urls: &[String]) -> (Verdict, String) {
    let out = Command::new("timeout")
        .arg(TEST_TIMEOUT_S.to_string())
        .arg("iscsi-test-cu")
        .args(["-d", "-n", "-t", name])
        .args(urls)
        .output()
        .expect("run iscsi-test-cu");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.code() == Some(124) {
        return (Verdict::Timeout, text);
    }
    // "tests  <total> <ran> <passed> <failed> <inactive>"
    let counts: Option<Vec<u32>> = text
        .lines()
        .find(|l| l.trim_start().starts_with("tests "))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|w| w.parse().ok())
                .collect()
        });
    let verdict = match counts.as_deref() {
        Some([_, ran, passed, failed, ..]) if *failed == 0 && ran == passed && *ran > 0 => {
            if text.contains("[SKIPPED]") {
                Verdict::Skip
            } else {
                Verdict::Pass
            }
        }
        _ => Verdict::Fail,
    };
    (verdict, text)
}

// Proves the target passes every libiscsi conformance test of the SCSI and
// iSCSI families except the one broken in libiscsi itself, and records the
// pass/fail/skip table.
#[test]
fn iscsi_test_cu_conformance() {
    if !have("iscsi-test-cu") {
        panic!("iscsi-test-cu is missing: tests/run.sh installs libiscsi-bin");
    }
    let dir = TempDir::new("iscsi-conformance");
    let volumes: Vec<(String, String)> = (0..WORKERS)
        .map(|i| (format!("conf{i}"), "1G".to_string()))
        .collect();
    let opts = ClusterOptions {
        storage_daemons: 1,
        disk_size: "8G",
        volumes: volumes.clone(),
    };
    let cluster = Cluster::start_with_portals(dir.path(), &opts, &["127.0.0.1:0", "127.0.0.2:0"]);
    assert_eq!(cluster.iscsi.len(), 2, "two portals");
    let urls = |vol: &str| -> Vec<String> {
        cluster
            .iscsi
            .iter()
            .map(|p| format!("iscsi://{p}/{IQN}{vol}/0"))
            .collect()
    };
    let tests = list_tests();
    assert!(
        tests.len() > 200,
        "iscsi-test-cu lists {} tests",
        tests.len()
    );
    let (parallel, alone): (Vec<String>, Vec<String>) =
        tests.iter().cloned().partition(|t| !serial(t));
    let queue = Arc::new(Mutex::new(parallel));
    let results: Arc<Mutex<BTreeMap<String, (Verdict, String)>>> = Arc::default();
    std::thread::scope(|s| {
        for (vol, _) in &volumes {
            let (queue, results) = (Arc::clone(&queue), Arc::clone(&results));
            let u = urls(vol);
            s.spawn(move || {
                loop {
                    let Some(t) = queue.lock().unwrap().pop() else {
                        break;
                    };
                    let r = run_one(&t, &u);
                    results.lock().unwrap().insert(t, r);
                }
            });
        }
    });
    // Each of these gets a fresh volume: some libiscsi 1.19 tests assume
    // blocks they never wrote are zero (MultipathIO.CompareAndWrite
    // compares LBA 256 after zeroing only LBAs 0-255), so their outcome
    // would depend on what ran before on the same volume.
    for (i, t) in alone.into_iter().enumerate() {
        let vol = format!("serial{i}");
        cluster.cli(&["volume", "create", &vol, "--size", "1G"]);
        let u = urls(&vol);
        wait_target(&u[0]);
        let r = run_one(&t, &u);
        results.lock().unwrap().insert(t, r);
    }
    let results = results.lock().unwrap();
    let mut table = String::new();
    let mut count = BTreeMap::new();
    let mut unexpected = Vec::new();
    for (name, (v, text)) in results.iter() {
        *count.entry(format!("{v:?}")).or_insert(0) += 1;
        table.push_str(&format!("{name:60} {v:?}\n"));
        let bad = matches!(v, Verdict::Fail | Verdict::Timeout);
        if bad && !KNOWN_BROKEN.contains(&name.as_str()) {
            unexpected.push(format!("==== {name}: {v:?}\n{text}"));
        }
    }
    table.push_str(&format!("totals: {count:?}\n"));
    // The LBPPB-dependent known-broken tests are right on LBPPB 1.
    cluster.cli(&[
        "volume",
        "create",
        "conf4k",
        "--size",
        "256M",
        "--block-size",
        "4096",
    ]);
    let u4k = urls("conf4k");
    wait_target(&u4k[0]);
    for t in PASS_ON_4K {
        let (v, text) = run_one(t, &u4k);
        table.push_str(&format!("{t:60} {v:?} (4096-byte blocks)\n"));
        if v != Verdict::Pass {
            unexpected.push(format!("==== {t} on 4096-byte blocks: {v:?}\n{text}"));
        }
    }
    let _ = std::fs::write(bin_dir().join("iscsi-conformance.txt"), &table);
    println!("{table}");
    assert!(
        unexpected.is_empty(),
        "unexpected failures:\n{}",
        unexpected.join("\n")
    );
}

/// Wait until the gateway serves a volume just created (its map follower
/// polls the manager).
fn wait_target(url: &str) {
    tessera_tests::poll(
        &format!("the gateway to serve {url}"),
        std::time::Duration::from_secs(20),
        || {
            Command::new("iscsi-inq")
                .arg(url)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|_| ())
        },
    );
}

fn iscsi_ls(portal: &str, extra: &[&str]) -> std::process::Output {
    Command::new("timeout")
        .args(["30", "iscsi-ls", "-s"])
        .args(extra)
        .arg(format!("iscsi://{portal}"))
        .output()
        .expect("iscsi-ls")
}

// Proves discovery lists every volume at every portal, iscsi-inq reads the
// standard INQUIRY and a VPD page, and data written through iSCSI (16
// concurrent out-of-order requests on one connection) reads back
// identically through NBD and the other way round.
#[test]
fn iscsi_discovery_inquiry_and_nbd_crosscheck() {
    for tool in ["iscsi-ls", "iscsi-inq", "nbdcopy"] {
        assert!(have(tool), "{tool} is missing: tests/run.sh installs it");
    }
    let dir = TempDir::new("iscsi-cross");
    let opts = ClusterOptions {
        storage_daemons: 2,
        disk_size: "2G",
        volumes: vec![
            ("alpha".into(), "64M".into()),
            ("beta".into(), "64M".into()),
        ],
    };
    let cluster = Cluster::start_with_portals(dir.path(), &opts, &["127.0.0.1:0", "127.0.0.2:0"]);
    let out = iscsi_ls(&cluster.iscsi[0], &[]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "iscsi-ls failed: {text}");
    for vol in ["alpha", "beta"] {
        for portal in &cluster.iscsi {
            assert!(
                text.contains(&format!("Target:{IQN}{vol} Portal:{portal},1")),
                "{vol} at {portal} missing from:\n{text}"
            );
        }
    }
    let url = format!("iscsi://{}/{IQN}alpha/0", cluster.iscsi[1]);
    let inq = run(Command::new("iscsi-inq").arg(&url));
    assert!(
        inq.contains("Vendor:TESSERA") && inq.contains("DIRECT_ACCESS"),
        "{inq}"
    );
    let vpd = run(Command::new("iscsi-inq")
        .args(["-e", "1", "-c", "0x80"])
        .arg(&url));
    assert!(vpd.to_lowercase().contains("serial"), "{vpd}");

    // iSCSI -> NBD: qemu-img (libiscsi block driver) writes through iSCSI,
    // nbdcopy reads back through NBD.
    let src = dir.path().join("src.img");
    std::fs::write(&src, pattern(11, 32 << 20)).unwrap();
    let via_iscsi = qemu_iscsi_write(&src, &url);
    if !via_iscsi {
        panic!("qemu-img could not write through iSCSI (is qemu-block-extra installed?)");
    }
    let back = dir.path().join("back.img");
    run(Command::new("nbdcopy").arg(cluster.uri("alpha")).arg(&back));
    let got = std::fs::read(&back).unwrap();
    assert_eq!(
        &got[..32 << 20],
        &std::fs::read(&src).unwrap()[..],
        "iSCSI write read back via NBD"
    );

    // NBD -> iSCSI.
    let src2 = dir.path().join("src2.img");
    std::fs::write(&src2, pattern(12, 64 << 20)).unwrap();
    run(Command::new("nbdcopy").arg(&src2).arg(cluster.uri("beta")));
    let back2 = dir.path().join("back2.img");
    run(Command::new("qemu-img")
        .args(["convert", "-m", "16", "-f", "raw", "-O", "raw"])
        .arg(format!("iscsi://{}/{IQN}beta/0", cluster.iscsi[0]))
        .arg(&back2));
    assert!(files_same(&src2, &back2), "NBD write read back via iSCSI");
}

/// qemu-img writes with 16 requests in flight, completing out of order
/// (`-m 16 -W`), so the target runs commands of one connection
/// concurrently.
fn qemu_iscsi_write(src: &Path, url: &str) -> bool {
    Command::new("qemu-img")
        .args(["convert", "-n", "-m", "16", "-W", "-f", "raw", "-O", "raw"])
        .arg(src)
        .arg(url)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn files_same(a: &Path, b: &Path) -> bool {
    tessera_tests::files_equal(a, b)
}

/// `qemu-img map --output=json` extents as (start, length, data).
fn qemu_map(url: &str) -> Vec<(u64, u64, bool)> {
    let out = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw"])
        .arg(url));
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map JSON");
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    for e in v.as_array().expect("extent array") {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let data = e["data"].as_bool().unwrap();
        match runs.last_mut() {
            Some(l) if l.2 == data && l.0 + l.1 == start => l.1 += len,
            _ => runs.push((start, len, data)),
        }
    }
    runs
}

// Proves GET LBA STATUS answers from the storage allocation maps: qemu's
// iSCSI driver (which maps a LUN with GET LBA STATUS when LBPME is set)
// sees written ranges as data and never-written or discarded ranges
// (UNMAP through qemu-io, a trim through NBD) as deallocated, at 512-byte
// and 4096-byte block sizes.
#[test]
fn iscsi_get_lba_status_from_allocation() {
    for tool in ["qemu-img", "qemu-io"] {
        assert!(have(tool), "{tool} is missing: tests/run.sh installs it");
    }
    let dir = TempDir::new("iscsi-lbastatus");
    let opts = ClusterOptions {
        storage_daemons: 1,
        disk_size: "2G",
        volumes: vec![("m512".into(), "64M".into())],
    };
    let cluster = Cluster::start(dir.path(), &opts);
    cluster.cli(&[
        "volume",
        "create",
        "m4k",
        "--size",
        "64M",
        "--block-size",
        "4096",
    ]);
    const M: u64 = 1 << 20;
    let src = dir.path().join("src.img");
    std::fs::write(&src, pattern(21, 16 << 20)).unwrap();
    for vol in ["m512", "m4k"] {
        let url = format!("iscsi://{}/{IQN}{vol}/0", cluster.iscsi[0]);
        tessera_tests::poll(
            "the gateway to serve the volume",
            std::time::Duration::from_secs(10),
            || qemu_iscsi_write(&src, &url).then_some(()),
        );
        assert_eq!(
            qemu_map(&url),
            vec![(0, 16 * M, true), (16 * M, 48 * M, false)],
            "{vol} after writing 16 MiB"
        );
        run(Command::new("qemu-io")
            .args(["-f", "raw", "-c", "discard 4M 4M", "-c", "discard 9M 512k"])
            .arg(&url));
        // A trim through NBD shows through iSCSI too.
        run(Command::new("qemu-io")
            .args(["-f", "raw", "-c", "discard 12M 1M"])
            .arg(cluster.uri(vol)));
        assert_eq!(
            qemu_map(&url),
            vec![
                (0, 4 * M, true),
                (4 * M, 4 * M, false),
                (8 * M, M, true),
                (9 * M, M / 2, false),
                (9 * M + M / 2, 2 * M + M / 2, true),
                (12 * M, M, false),
                (13 * M, 3 * M, true),
                (16 * M, 48 * M, false),
            ],
            "{vol} after discards"
        );
    }
}
