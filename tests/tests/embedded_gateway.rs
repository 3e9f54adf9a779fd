//! The gateway embedded in a storage daemon (`tessera up
//! --embedded-gateway`, i.e. `tessera-storage --nbd-listen`): real NBD
//! clients against it, with a volume whose chunks are spread over two
//! storage daemons so that requests go both through the in-memory stream
//! (storage-0's own chunks) and over TCP (storage-1's), and a kill -9 of
//! the daemon that is also the gateway.

use std::process::Command;
use std::time::Duration;
use tessera_tests::*;

// Proves the embedded gateway serves a volume spread over its own daemon
// and another one: iscsi-ls lists its target and iscsi-inq gets an
// INQUIRY answer, nbdinfo sees it, 128 MiB copied in with nbdcopy reads
// back identically, fio writes with verify pass, both daemons served
// chunk requests, and after storage-0 (the gateway itself) is killed with
// -9 and restarted by `tessera up`, the flushed data reads back unchanged
// on the same address.
#[test]
fn embedded_gateway_serves_local_and_remote_chunks() {
    require(&["nbdinfo", "nbdcopy", "fio", "iscsi-ls", "iscsi-inq"]);
    let dir = TempDir::new("embedded-gw");
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    std::fs::write(&src, pattern(7, 128 << 20)).expect("write source");
    let opts = ClusterOptions {
        storage_daemons: 2,
        disk_size: "1G",
        volumes: vec![("emb".into(), "256M".into())],
    };
    let c = Cluster::start_with_args(
        &dir.path().join("cluster"),
        &opts,
        &[],
        &["--embedded-gateway"],
    );
    assert_eq!(
        c.pid("gateway"),
        c.pid("storage-0"),
        "the gateway runs inside storage-0"
    );
    // iSCSI from the same daemon: the target is listed and answers
    // INQUIRY (access control arrives with the next snapshot poll).
    assert_eq!(c.iscsi.len(), 1, "one portal");
    let portal = &c.iscsi[0];
    let ls = poll(
        "iscsi-ls to list the target",
        Duration::from_secs(30),
        || {
            let out = Command::new("iscsi-ls")
                .arg("-s")
                .arg(format!("iscsi://{portal}"))
                .output()
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.contains("iqn.2026-11.io.tessera:emb").then_some(text)
        },
    );
    assert!(ls.contains("iqn.2026-11.io.tessera:emb"), "{ls}");
    let inq = run(
        Command::new("iscsi-inq").arg(format!("iscsi://{portal}/iqn.2026-11.io.tessera:emb/0"))
    );
    assert!(inq.to_lowercase().contains("tessera"), "{inq}");
    let json = run(Command::new("nbdinfo").arg("--json").arg(c.uri("emb")));
    let v: serde_json::Value = serde_json::from_str(&json).expect("nbdinfo json");
    assert_eq!(v["exports"][0]["export-size"].as_u64(), Some(256 << 20));

    run(Command::new("nbdcopy")
        .arg("--flush")
        .arg(&src)
        .arg(c.uri("emb")));
    run(Command::new("nbdcopy").arg(c.uri("emb")).arg(&back));
    let source = std::fs::read(&src).expect("read source");
    let read = std::fs::read(&back).expect("read copy");
    assert_eq!(read.len(), 256 << 20);
    assert!(
        read[..128 << 20] == source[..] && read[128 << 20..].iter().all(|b| *b == 0),
        "nbdcopy read back different data"
    );
    // Both daemons wrote chunks: the local path and the TCP path were used.
    let metrics = c.storage_metrics();
    assert_eq!(metrics.len(), 2);
    for (i, m) in metrics.iter().enumerate() {
        let written = metric_sum(m, "tessera_storage_bytes_total{direction=\"write\"}");
        assert!(written > 0.0, "storage-{i} wrote nothing: {written}");
    }

    // fio with verify over the second half (the copy above stays intact
    // in the first half).
    let out = run(Command::new("fio")
        .args(["--name=v", "--ioengine=nbd", "--rw=randwrite", "--bs=4k"])
        .args([
            "--iodepth=16",
            "--offset=128m",
            "--size=64m",
            "--verify=crc32c",
        ])
        .args(["--do_verify=1", "--output-format=terse"])
        .arg(format!("--uri={}", c.uri("emb"))));
    assert!(!out.contains("verify:"), "fio verify failed: {out}");

    // Kill -9 the daemon that is also the gateway; `tessera up` restarts
    // it on the same addresses and the flushed copy reads back.
    let old = c.pid("storage-0");
    kill(old, 9);
    poll("storage-0 to restart", Duration::from_secs(60), || {
        (!alive(old) && c.pid("storage-0") != old).then_some(())
    });
    let again = dir.path().join("again.img");
    poll(
        "the restarted gateway to serve",
        Duration::from_secs(60),
        || {
            Command::new("nbdcopy")
                .arg(c.uri("emb"))
                .arg(&again)
                .status()
                .ok()
                .filter(|s| s.success())
        },
    );
    let head = std::fs::read(&again).expect("read copy");
    assert!(
        head[..128 << 20] == source[..],
        "data changed across the restart"
    );
}
