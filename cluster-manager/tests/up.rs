//! `tessera up` end to end with the real manager and stand-in storage and
//! gateway daemons (small shell scripts that speak the same flags, register
//! and heartbeat through the real API, and print the same READY lines), so
//! the supervisor is tested without depending on the other crates' builds:
//! start-up and its output lines, volume creation, restart of a killed
//! child, a clean stop on SIGTERM, a second `up` finding the data, and no
//! child outliving a SIGKILLed `up`.
//!
//! Needs bash and curl; every wait polls with a deadline.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);

const FAKE_STORAGE: &str = r#"#!/bin/bash
# Stand-in for tessera-storage: same flags, registers, heartbeats.
while [ $# -gt 0 ]; do
  case "$1" in
    --manager) M=$2; shift;;
    --listen) L=$2; shift;;
    --disk) D=$2; shift;;
  esac
  shift
done
[ "$L" = "127.0.0.1:0" ] && L="127.0.0.1:$((20000 + RANDOM % 20000))"
P=${D%%,*}
mkdir -p "$(dirname "$P")" && touch "$P"
U=$(echo "$P" | md5sum | cut -c1-16)
R=$(curl -sf -X POST "$M/v1/nodes/register" -d "{\"node_uuid\":\"$U\",\"addr\":\"$L\",\"metrics_addr\":null,\"pid\":$$,\"disks\":[{\"uuid\":\"d$U\",\"path\":\"$P\",\"capacity_bytes\":1073741824}]}") || exit 1
ID=$(echo "$R" | tr -d ' \n' | sed -n 's/.*"node_id":\([0-9]*\).*/\1/p')
echo "READY listen=$L node_id=$ID metrics=none"
trap 'exit 0' TERM
while true; do
  curl -sf -X POST "$M/v1/nodes/$ID/heartbeat" -d '{"disks":[],"volumes":[]}' >/dev/null
  sleep 0.2
done
"#;

const FAKE_GATEWAY: &str = r#"#!/bin/bash
# Stand-in for tessera-gateway: same flags, READY line, then idles.
while [ $# -gt 0 ]; do
  case "$1" in --nbd-listen) N=$2; shift;; esac
  shift
done
[ "$N" = "127.0.0.1:0" ] && N="127.0.0.1:$((20000 + RANDOM % 20000))"
echo "READY nbd=$N metrics=none"
exec sleep 1000
"#;

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A directory holding copies of our binaries beside the stand-ins, as
/// `tessera up` looks for siblings of its own executable.
fn install(root: &Path) -> PathBuf {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for (name, src) in [
        ("tessera", env!("CARGO_BIN_EXE_tessera")),
        ("tessera-manager", env!("CARGO_BIN_EXE_tessera-manager")),
    ] {
        std::fs::copy(src, bin.join(name)).unwrap();
    }
    for (name, text) in [
        ("tessera-storage", FAKE_STORAGE),
        ("tessera-gateway", FAKE_GATEWAY),
    ] {
        let p = bin.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

/// A running `tessera up` and its stdout lines; killed on drop.
struct Up {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Up {
    fn start(bin: &Path, data: &Path) -> Up {
        let mut child = Command::new(bin.join("tessera"))
            .arg("up")
            .arg("--dir")
            .arg(data)
            .args([
                "--storage-daemons",
                "2",
                "--manager-listen",
                "127.0.0.1:0",
                "--nbd-listen",
                "127.0.0.1:0",
                "--volume",
                "v1:64M",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out: ChildStdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                let _ = tx.send(l);
            }
        });
        Up {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// The next line satisfying `f`, with a deadline.
    fn wait_line(&mut self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if f(&l) {
                        return l;
                    }
                }
                Err(_) => panic!("no {what} line; saw {:?}", self.seen),
            }
        }
    }

    fn pids(&self) -> Vec<u32> {
        self.seen
            .iter()
            .filter_map(|l| field(l, "pid"))
            .map(|p| p.parse().unwrap())
            .collect()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
}

fn signal(pid: u32, sig: &str) {
    let s = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(s.success());
}

/// Whether `pid` still runs (a zombie does not count).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn wait_gone(pids: &[u32]) {
    let deadline = Instant::now() + DEADLINE;
    while pids.iter().any(|&p| alive(p)) {
        assert!(Instant::now() < deadline, "children still alive: {pids:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "tessera up did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// Proves the whole `tessera up` life: READY lines parsed and reported,
// the volume created, a killed child restarted, SIGTERM stops everything
// with exit 0, a second `up` keeps the existing volume, and SIGKILL of `up`
// takes every child with it (PR_SET_PDEATHSIG).
#[test]
fn up_supervises_and_stops_cleanly() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("skipping: curl not installed");
        return;
    }
    let root = TempDir(std::env::temp_dir().join(format!(
        "tessera-up-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    )));
    let bin = install(&root.0);
    let data = root.0.join("data");

    let mut up = Up::start(&bin, &data);
    let manager = up.wait_line("manager", |l| l.starts_with("manager pid="));
    let maddr = field(&manager, "listen").unwrap();
    up.wait_line("storage-0", |l| l.starts_with("storage-0 pid="));
    let s1 = up.wait_line("storage-1", |l| l.starts_with("storage-1 pid="));
    assert!(field(&s1, "listen").unwrap().starts_with("127.0.0.1:"));
    let gw = up.wait_line("gateway", |l| l.starts_with("gateway pid="));
    let nbd = field(&gw, "nbd").unwrap();
    up.wait_line("ready", |l| l == "ready");
    up.wait_line("hint", |l| l.contains(&format!("nbdinfo nbd://{nbd}/v1")));

    let vol: serde_json::Value = ureq::get(&format!("http://{maddr}/v1/volumes/v1"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(vol["size_bytes"], 64 << 20);

    // kill -9 one storage daemon: it comes back under a new pid.
    let old: u32 = field(
        up.seen
            .iter()
            .find(|l| l.starts_with("storage-0 "))
            .unwrap(),
        "pid",
    )
    .unwrap()
    .parse()
    .unwrap();
    signal(old, "-KILL");
    let r = up.wait_line("restart", |l| l.starts_with("restarted storage-0 pid="));
    assert_ne!(field(&r, "pid").unwrap(), old.to_string());

    let pids = up.pids();
    signal(up.child.id(), "-TERM");
    assert_eq!(wait_exit(&mut up.child).code(), Some(0));
    wait_gone(&pids);
    drop(up);

    // Same directory again: the volume is found, not recreated.
    let mut up = Up::start(&bin, &data);
    up.wait_line("exists", |l| l.contains("volume v1 exists"));
    up.wait_line("ready", |l| l == "ready");
    let pids = up.pids();
    assert_eq!(pids.len(), 4, "{:?}", up.seen);
    up.child.kill().unwrap();
    up.child.wait().unwrap();
    wait_gone(&pids);
}
