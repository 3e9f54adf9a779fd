//! Real NBD clients (nbdinfo, nbdcopy, qemu-img, fio) against a real local
//! cluster started with `tessera up`, plus the failure scenarios: kill -9 of
//! a storage daemon mid-write, and a corrupted block on disk.

use std::process::Command;
use std::time::Duration;
use tessera_tests::*;

// Proves the handshake a real client sees: export size, the capabilities the
// gateway advertises, and the export list.
#[test]
fn nbdinfo_sees_volume_and_capabilities() {
    require(&["nbdinfo"]);
    let dir = TempDir::new("nbdinfo");
    let opts = ClusterOptions {
        volumes: vec![
            ("demo".into(), "1G".into()),
            ("second".into(), "64M".into()),
        ],
        ..Default::default()
    };
    let c = Cluster::start(dir.path(), &opts);
    let json = run(Command::new("nbdinfo").arg("--json").arg(c.uri("demo")));
    let v: serde_json::Value = serde_json::from_str(&json).expect("nbdinfo json");
    let export = &v["exports"][0];
    assert_eq!(export["export-size"].as_u64(), Some(1 << 30));
    for cap in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(export[cap].as_bool(), Some(true), "{cap} in {json}");
    }
    assert_eq!(export["is_read_only"].as_bool(), Some(false));
    let list = run(Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd://{}", c.nbd)));
    assert!(
        list.contains("export=\"demo\"") || list.contains("demo"),
        "{list}"
    );
    assert!(list.contains("second"), "{list}");
    // An unknown export is an error, never a silent default.
    let out = Command::new("nbdinfo")
        .arg(c.uri("nope"))
        .output()
        .expect("run nbdinfo");
    assert!(!out.status.success());
}

// Proves 256 MiB of random data copied in with nbdcopy reads back
// identically with nbdcopy and qemu-img compare, and survives a full
// restart of the cluster on the same directory.
#[test]
fn nbdcopy_roundtrip_and_restart() {
    require(&["nbdcopy", "qemu-img"]);
    let dir = TempDir::new("nbdcopy");
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    std::fs::write(&src, pattern(42, 256 << 20)).expect("write source");
    let data = dir.path().join("cluster");
    let opts = ClusterOptions {
        volumes: vec![("data".into(), "256M".into())],
        ..Default::default()
    };
    let c = Cluster::start(&data, &opts);
    run(Command::new("nbdcopy")
        .arg("--flush")
        .arg(&src)
        .arg(c.uri("data")));
    run(Command::new("nbdcopy").arg(c.uri("data")).arg(&back));
    assert!(files_equal(&src, &back), "nbdcopy read back different data");
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(c.uri("data")));
    c.stop();

    // A second `tessera up` on the same directory finds the data.
    let c = Cluster::start(&data, &opts);
    std::fs::remove_file(&back).expect("remove");
    run(Command::new("nbdcopy").arg(c.uri("data")).arg(&back));
    assert!(files_equal(&src, &back), "data changed across a restart");
    let info = c.cli(&["--output", "json", "volume", "info", "data"]);
    let v: serde_json::Value = serde_json::from_str(&info).expect("json");
    assert_eq!(v["size_bytes"].as_u64(), Some(256 << 20));
    c.stop();
}

fn fio(uri: &str, args: &[&str]) -> String {
    let mut cmd = Command::new("fio");
    cmd.arg("--name=t")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .arg("--output-format=terse")
        // fio saves a verify state file in its working directory; keep the
        // source tree clean.
        .arg("--verify_state_save=0")
        .args(args);
    run(&mut cmd)
}

// Proves fio's nbd engine writes random 4 KiB (and 512 B) blocks that verify
// with crc32c, both in the writing job and in a separate read-back pass.
#[test]
fn fio_random_write_verify() {
    require(&["fio"]);
    let dir = TempDir::new("fio");
    let c = Cluster::start(dir.path(), &ClusterOptions::default());
    let uri = c.uri("demo");
    let common = [
        "--rw=randwrite",
        "--size=64m",
        "--iodepth=16",
        "--verify=crc32c",
        "--randseed=7",
    ];
    fio(&uri, &[&common[..], &["--bs=4k", "--do_verify=1"]].concat());
    fio(
        &uri,
        &[&common[..], &["--bs=4k", "--verify_only=1"]].concat(),
    );
    fio(
        &uri,
        &[
            &common[..],
            &["--bs=512", "--size=4m", "--offset=128m", "--do_verify=1"],
        ]
        .concat(),
    );
}

// Proves the durability promise across a crash: data flushed before a
// storage daemon is killed with -9 in the middle of writes reads back
// exactly after `tessera up` restarts it, and a full read of the volume
// finds no checksum error.
#[test]
fn kill9_storage_daemon_mid_write() {
    require(&["nbdcopy", "fio"]);
    let dir = TempDir::new("kill9");
    let src = dir.path().join("src.img");
    std::fs::write(&src, pattern(9, 64 << 20)).expect("write source");
    let opts = ClusterOptions {
        volumes: vec![("crash".into(), "512M".into())],
        ..Default::default()
    };
    let c = Cluster::start(&dir.path().join("cluster"), &opts);
    let uri = c.uri("crash");
    // Flushed data in the first 64 MiB.
    run(Command::new("nbdcopy").arg("--flush").arg(&src).arg(&uri));
    // Random writes over the rest while a storage daemon dies.
    let mut writer = Command::new("fio")
        .arg("--name=bg")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .args([
            "--rw=randwrite",
            "--bs=4k",
            "--offset=128m",
            "--size=256m",
            "--iodepth=8",
            "--time_based=1",
            "--runtime=6",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn fio");
    // Kill once the writes are flowing (the daemon's write counter moves).
    poll(
        "writes to reach the storage daemons",
        Duration::from_secs(30),
        || {
            let total: f64 = c
                .storage_metrics()
                .iter()
                .map(|m| metric_sum(m, "tessera_storage_bytes_total"))
                .sum();
            (total > (70 << 20) as f64).then_some(())
        },
    );
    let victim = c.pid("storage-0");
    kill(victim, 9);
    c.wait_line("storage-0 to be restarted", Duration::from_secs(30), |l| {
        l.starts_with("restarted storage-0 ")
    });
    let status = writer.wait().expect("fio exit");
    assert!(
        status.success(),
        "fio saw I/O errors across the restart: {status}"
    );
    let back = dir.path().join("back.img");
    // A full read of the whole volume: must succeed (no checksum error).
    run(Command::new("nbdcopy").arg(&uri).arg(&back));
    let got = std::fs::read(&back).unwrap_or_default();
    let want = std::fs::read(&src).expect("src");
    assert!(
        got.len() >= want.len(),
        "read back only {} bytes",
        got.len()
    );
    assert!(
        got[..want.len()] == want[..],
        "flushed data changed after kill -9"
    );
    // The full read above found no checksum errors.
    let errors: f64 = c
        .storage_metrics()
        .iter()
        .map(|m| metric_sum(m, "tessera_storage_checksum_errors_total"))
        .sum();
    assert_eq!(errors, 0.0);
}

// Proves a block corrupted on disk is reported as an error, never returned
// as data, and counted in the storage daemon's checksum metric.
#[test]
fn corrupted_block_is_an_error_and_counted() {
    require(&["nbdcopy"]);
    let dir = TempDir::new("corrupt");
    let opts = ClusterOptions {
        storage_daemons: 1,
        disk_size: "1G",
        volumes: vec![("c".into(), "64M".into())],
    };
    let data_dir = dir.path().join("cluster");
    let c = Cluster::start(&data_dir, &opts);
    let block = pattern(1234, 4096);
    let src = dir.path().join("block.img");
    std::fs::write(&src, &block).expect("write");
    run(Command::new("nbdcopy")
        .arg("--flush")
        .arg(&src)
        .arg(c.uri("c")));
    // Find the block in the disk file and flip a byte of it.
    let disk = find_disk_image(&data_dir);
    let offset = find_block(&disk, &block).expect("written block is on the disk");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .expect("open disk");
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, offset + 17).expect("read");
        b[0] ^= 0xFF;
        f.write_all_at(&b, offset + 17).expect("corrupt");
        f.sync_all().expect("sync");
    }
    let out = dir.path().join("out.img");
    let r = Command::new("nbdcopy")
        .arg(c.uri("c"))
        .arg(&out)
        .output()
        .expect("run nbdcopy");
    assert!(!r.status.success(), "reading a corrupted block must fail");
    let mut corrupted = block.clone();
    corrupted[17] ^= 0xFF;
    if let Ok(got) = std::fs::read(&out) {
        assert!(
            !got.chunks(4096).any(|w| w == &corrupted[..]),
            "corrupted data was returned to the client"
        );
    }
    poll(
        "checksum error to be counted",
        Duration::from_secs(10),
        || {
            let n: f64 = c
                .storage_metrics()
                .iter()
                .map(|m| metric_sum(m, "tessera_storage_checksum_errors_total"))
                .sum();
            (n >= 1.0).then_some(())
        },
    );
}

fn find_disk_image(dir: &std::path::Path) -> std::path::PathBuf {
    for entry in walk(dir) {
        if entry.extension().is_some_and(|e| e == "img") {
            return entry;
        }
    }
    panic!("no disk image under {}", dir.display());
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Offset of the 4 KiB block equal to `block` in a (sparse) disk image.
fn find_block(path: &std::path::Path, block: &[u8]) -> Option<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut buf = vec![0u8; 1 << 20];
    let mut base = 0u64;
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        for (i, w) in buf[..n].chunks(4096).enumerate() {
            if w == block {
                return Some(base + (i * 4096) as u64);
            }
        }
        base += n as u64;
    }
}
