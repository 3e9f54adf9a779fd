//! Replays the committed cargo-fuzz corpus (gateway/fuzz/corpus) through
//! the same entry points the fuzz targets use, so every CI run covers it
//! without cargo-fuzz or a nightly toolchain.

use std::path::Path;
use tessera_gateway::iscsi::fuzz as iscsi;
use tessera_gateway::nbd::fuzz;

fn replay(target: &str, f: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for p in entries {
        let data = std::fs::read(&p).expect("read corpus file");
        // A panic names the input that caused it.
        let r = std::panic::catch_unwind(|| f(&data));
        assert!(r.is_ok(), "{} panicked", p.display());
        n += 1;
    }
    n
}

// Proves every handshake corpus input runs without violating an invariant.
#[test]
fn handshake_corpus() {
    assert!(replay("handshake", fuzz::handshake) >= 10);
}

// Proves every request corpus input runs without violating an invariant.
#[test]
fn requests_corpus() {
    assert!(replay("requests", fuzz::requests) >= 10);
}

// Proves every iSCSI PDU/session corpus input runs without violating an
// invariant.
#[test]
fn iscsi_pdu_corpus() {
    assert!(replay("iscsi_pdu", iscsi::pdu) >= 5);
}

// Proves every iSCSI login corpus input runs without violating an
// invariant.
#[test]
fn iscsi_login_corpus() {
    assert!(replay("iscsi_login", iscsi::login) >= 5);
}

// Proves every CDB corpus input runs without violating an invariant.
#[test]
fn iscsi_cdb_corpus() {
    assert!(replay("iscsi_cdb", iscsi::cdb) >= 10);
}
