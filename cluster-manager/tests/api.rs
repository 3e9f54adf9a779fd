//! End-to-end tests of the manager's REST API and the `tessera` CLI against
//! the real `tessera-manager` binary: fake storage nodes register and
//! heartbeat over HTTP, volumes go through their whole lifecycle, the
//! manager is killed and restarted on the same data directory, and the CLI's
//! error paths are checked for one line and the right exit code.
//!
//! Every process is started here and killed by its own handle; every wait
//! polls a condition with a deadline.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tessera_wire::api::*;
use tessera_wire::map::ClusterMap;

const DEADLINE: Duration = Duration::from_secs(20);

/// A temp directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "tessera-api-{tag}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `tessera-manager`, killed (by its own handle) on drop.
struct Manager {
    child: Child,
    addr: String,
}

impl Manager {
    fn start(dir: &Path, extra: &[&str]) -> Manager {
        Self::start_env(dir, extra, &[])
    }

    fn start_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Manager {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera-manager"));
        cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(extra)
            .env("TESSERA_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn tessera-manager");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(DEADLINE).expect("READY line");
        let addr = line
            .strip_prefix("READY listen=")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Manager { child, addr }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// (status, body) of any request, errors included.
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let req = ureq::request(method, &self.url(path)).set("Content-Type", "application/json");
        let r = match body {
            Some(b) => req.send_string(b),
            None => req.call(),
        };
        match r {
            Ok(resp) => (resp.status(), resp.into_string().unwrap()),
            Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap()),
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        let (code, body) = self.call("GET", path, None);
        assert_eq!(code, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    fn post<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        want: u16,
    ) -> T {
        let (code, text) = self.call("POST", path, Some(&serde_json::to_string(body).unwrap()));
        assert_eq!(code, want, "POST {path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// Status and error message of a request expected to fail.
    fn fail(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let (code, text) = self.call(method, path, body);
        let e: ErrorBody = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("error body is not {{\"error\"}}: {text}"));
        (code, e.error)
    }

    fn register(&self, node: &str, disks: &[(&str, u64)]) -> RegisterResponse {
        self.post(
            "/v1/nodes/register",
            &RegisterRequest {
                node_uuid: node.into(),
                addr: format!("127.0.0.1:{}", 7000 + node.len()),
                metrics_addr: None,
                pid: 42,
                host: String::new(),
                zone: String::new(),
                rack: String::new(),
                disks: disks
                    .iter()
                    .map(|(uuid, cap)| DiskRegistration {
                        uuid: uuid.to_string(),
                        path: format!("/dev/{uuid}"),
                        capacity_bytes: *cap,
                    })
                    .collect(),
            },
            200,
        )
    }

    fn heartbeat(&self, node_id: u32, volumes: Vec<VolumeUsage>) -> HeartbeatResponse {
        self.post(
            &format!("/v1/nodes/{node_id}/heartbeat"),
            &HeartbeatRequest {
                disks: vec![],
                volumes,
                scrub: Default::default(),
                recovery: Default::default(),
            },
            200,
        )
    }

    /// Status of a POST announcing a 2 MiB body; the manager must refuse it
    /// from the headers alone, so no body is sent.
    fn oversized_post(&self, path: &str) -> u16 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            2 << 20
        )
        .unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        let line = String::from_utf8_lossy(&head);
        line[9..12].parse().unwrap()
    }

    /// Kill -9 and reap: the store must survive a crash, not only a clean stop.
    fn crash(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cli(manager_url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("--manager")
        .arg(manager_url)
        .args(args)
        .env_remove("TESSERA_MANAGER")
        .stdin(Stdio::null())
        .output()
        .expect("run tessera")
}

fn stderr_lines(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr)
        .lines()
        .map(str::to_string)
        .collect()
}

const GIB: u64 = 1 << 30;

// Proves the volume lifecycle over HTTP (create, list, info, resize, delete
// and each documented error), that ids are stable and never reused, and that
// the whole catalogue survives kill -9 and a restart on the same directory.
#[test]
fn volumes_nodes_and_persistence() {
    let dir = TempDir::new("life");
    let m = Manager::start(&dir.0, &["--pg-count", "64"]);

    let (code, e) = m.fail(
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"a","size_bytes":1073741824}"#),
    );
    assert_eq!((code, e.contains("no storage disk")), (503, true), "{e}");

    let n1 = m.register("node-a", &[("disk-a0", 4 * GIB), ("disk-a1", 4 * GIB)]);
    let n2 = m.register("node-b", &[("disk-b0", 4 * GIB)]);
    assert_eq!((n1.node_id, n2.node_id), (1, 2));
    assert_eq!(
        n1.disks.iter().map(|d| d.disk_id).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(n2.disks[0].disk_id, 3);
    // Same uuids again: same ids. A registration is a new process (its
    // disks get a new incarnation, which primaries must see), so it
    // publishes a new epoch.
    let again = m.register("node-a", &[("disk-a0", 4 * GIB), ("disk-a1", 4 * GIB)]);
    assert_eq!(again.node_id, 1);
    assert_eq!(again.disks, n1.disks);
    assert_eq!(again.epoch, n2.epoch + 1);

    let nodes: Vec<NodeInfo> = m.get("/v1/nodes");
    assert_eq!(nodes.len(), 2);
    assert!(nodes.iter().all(|n| n.up));
    let disks: Vec<DiskInfo> = m.get("/v1/disks");
    assert_eq!(
        disks.iter().map(|d| d.id).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );

    let e0 = m.get::<ClusterMap>("/v1/map").epoch;
    let a: VolumeInfo = m.post(
        "/v1/volumes",
        &CreateVolumeRequest {
            name: "a".into(),
            size_bytes: GIB,
            block_size: None,
            pool: None,
        },
        201,
    );
    assert_eq!((a.id, a.block_size, a.chunks), (1, 512, 256));
    assert_eq!(a.placement.iter().map(|p| p.chunks).sum::<u64>(), 256);
    let map: ClusterMap = m.get("/v1/map");
    assert!(map.epoch > e0);
    assert!(map.pgs.iter().all(|s| s.len() == 1));
    map.validate().unwrap();

    for (body, want) in [
        (r#"{"name":"a","size_bytes":512}"#, 409),
        (r#"{"name":"b c","size_bytes":512}"#, 400),
        (r#"{"name":"","size_bytes":512}"#, 400),
        (r#"{"name":"b","size_bytes":0}"#, 400),
        (r#"{"name":"b","size_bytes":1000}"#, 400),
        (r#"{"name":"b","size_bytes":512,"block_size":4096}"#, 400),
        (r#"{"name":"b","size_bytes":4096,"block_size":1024}"#, 400),
        (r#"{"name":"b""#, 400),
        (r#"{"size_bytes":4096}"#, 400),
    ] {
        assert_eq!(m.fail("POST", "/v1/volumes", Some(body)).0, want, "{body}");
    }
    let long = format!(r#"{{"name":"{}","size_bytes":512}}"#, "x".repeat(65));
    assert_eq!(m.fail("POST", "/v1/volumes", Some(&long)).0, 400);
    assert_eq!(m.oversized_post("/v1/volumes"), 413);
    assert_eq!(m.fail("GET", "/v1/nope", None).0, 404);
    assert_eq!(
        m.fail(
            "POST",
            "/v1/nodes/99/heartbeat",
            Some(r#"{"disks":[],"volumes":[]}"#)
        )
        .0,
        404
    );

    let b: VolumeInfo = m.post(
        "/v1/volumes",
        &CreateVolumeRequest {
            name: "b.4k_x-1".into(),
            size_bytes: 64 << 20,
            block_size: Some(4096),
            pool: None,
        },
        201,
    );
    assert_eq!((b.id, b.block_size), (2, 4096));

    // Allocated bytes are the sum of the nodes' latest heartbeats.
    m.heartbeat(
        n1.node_id,
        vec![VolumeUsage {
            volume_id: 1,
            allocated_bytes: 1 << 20,
        }],
    );
    m.heartbeat(
        n2.node_id,
        vec![VolumeUsage {
            volume_id: 1,
            allocated_bytes: 3 << 20,
        }],
    );
    let a: VolumeInfo = m.get("/v1/volumes/a");
    assert_eq!(a.allocated_bytes, 4 << 20);

    let (code, e) = m.fail("PATCH", "/v1/volumes/a", Some(r#"{"size_bytes":512}"#));
    assert_eq!(code, 400, "{e}");
    let (code, _) = m.call(
        "PATCH",
        "/v1/volumes/a",
        Some(r#"{"size_bytes":2147483648}"#),
    );
    assert_eq!(code, 200);
    assert_eq!(m.get::<VolumeInfo>("/v1/volumes/a").size_bytes, 2 * GIB);
    assert_eq!(
        m.fail("PATCH", "/v1/volumes/zz", Some(r#"{"size_bytes":512}"#))
            .0,
        404
    );

    let list: Vec<VolumeInfo> = m.get("/v1/volumes");
    assert_eq!(
        list.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        vec!["a", "b.4k_x-1"]
    );
    assert_eq!(m.call("DELETE", "/v1/volumes/b.4k_x-1", None).0, 204);
    assert_eq!(m.fail("DELETE", "/v1/volumes/b.4k_x-1", None).0, 404);
    assert_eq!(m.fail("GET", "/v1/volumes/b.4k_x-1", None).0, 404);

    let status: serde_json::Value = m.get("/v1/status");
    assert_eq!(status["volumes"], 1);
    assert_eq!(status["nodes_up"], 2);
    assert_eq!(status["pgs_assigned"], 64);
    let (code, metrics) = m.call("GET", "/metrics", None);
    assert_eq!(code, 200);
    assert!(metrics.contains("tessera_manager_volumes 1"), "{metrics}");
    assert!(metrics.contains("tessera_manager_disks 3"), "{metrics}");
    assert!(metrics.contains(r#"route="volume_create""#), "{metrics}");

    let before: ClusterMap = m.get("/v1/map");
    m.crash();

    // A different --pg-count is ignored: it only applies when the cluster is
    // created.
    let m = Manager::start(&dir.0, &["--pg-count", "8"]);
    let after: ClusterMap = m.get("/v1/map");
    assert_eq!(after.cluster_id, before.cluster_id);
    assert_eq!(after.pg_count, 64);
    assert_eq!(after.pgs, before.pgs);
    assert_eq!(after.volumes, before.volumes);
    // All but `up_since`, kept in memory: unknown until the restarted
    // manager's first commit.
    let known = |disks: &[tessera_wire::map::DiskEntry]| {
        disks
            .iter()
            .map(|d| tessera_wire::map::DiskEntry {
                up_since: None,
                ..d.clone()
            })
            .collect::<Vec<_>>()
    };
    assert!(after.disks.iter().all(|d| d.up_since.is_none()));
    assert_eq!(after.disks, known(&before.disks));
    assert_eq!(after.next_volume_id, 3);
    assert!(after.epoch >= before.epoch);
    // Known nodes count as up after a restart until the grace runs out.
    assert!(after.nodes.iter().all(|n| n.up));
    let again = m.register("node-b", &[("disk-b0", 4 * GIB)]);
    assert_eq!((again.node_id, again.disks[0].disk_id), (2, 3));
    // Volume ids are never reused.
    let c: VolumeInfo = m.post(
        "/v1/volumes",
        &CreateVolumeRequest {
            name: "c".into(),
            size_bytes: GIB,
            block_size: None,
            pool: None,
        },
        201,
    );
    assert_eq!(c.id, 3);
    // A new node joins with the next ids.
    let n3 = m.register("node-c", &[("disk-c0", GIB)]);
    assert_eq!((n3.node_id, n3.disks[0].disk_id), (3, 4));
}

// Proves the health check marks a silent node down (new epoch) and that a
// heartbeat brings it back up (another new epoch).
#[test]
fn health_marks_silent_nodes_down_and_back_up() {
    let dir = TempDir::new("health");
    let m = Manager::start(&dir.0, &["--heartbeat-grace-ms", "300"]);
    let n = m.register("node-a", &[("disk-a0", GIB)]);
    let down = poll("node down", || {
        let map: ClusterMap = m.get("/v1/map");
        (!map.nodes[0].up && !map.disks[0].up).then_some(map)
    });
    assert!(down.epoch > n.epoch);
    let r = m.heartbeat(n.node_id, vec![]);
    assert!(r.epoch > down.epoch);
    let map: ClusterMap = m.get("/v1/map");
    assert!(map.nodes[0].up && map.disks[0].up);
}

// Proves the map long poll: `GET /v1/map?after=E` is held until the epoch
// passes E and then answers the new map; more polls than the manager has
// HTTP threads are held at once while other requests are still answered;
// an unchanged map comes back when `wait_ms` runs out; a malformed query
// is a 400.
#[test]
fn map_long_poll_answers_at_the_new_epoch() {
    let dir = TempDir::new("longpoll");
    let m = Manager::start(&dir.0, &[]);
    let n = m.register("node-a", &[("disk-a0", GIB)]);
    let e = n.epoch;
    let polls: Vec<_> = (0..2 * tessera_manager::api::HTTP_THREADS)
        .map(|_| {
            let url = m.url(&format!("/v1/map?after={e}&wait_ms=30000"));
            std::thread::spawn(move || -> ClusterMap {
                ureq::get(&url).call().unwrap().into_json().unwrap()
            })
        })
        .collect();
    // The held polls leave the HTTP threads free.
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    let status = agent.get(&m.url("/v1/status")).call().unwrap();
    assert_eq!(status.status(), 200);
    let _: VolumeInfo = m.post(
        "/v1/volumes",
        &CreateVolumeRequest {
            name: "lp".into(),
            size_bytes: GIB,
            block_size: None,
            pool: None,
        },
        201,
    );
    for p in polls {
        let map = p.join().unwrap();
        assert!(
            map.epoch > e,
            "long poll answered epoch {} <= {e}",
            map.epoch
        );
        assert!(map.volume_by_name("lp").is_some());
    }
    let now: ClusterMap = m.get("/v1/map");
    let same: ClusterMap = m.get(&format!("/v1/map?after={}&wait_ms=0", now.epoch));
    assert_eq!(same.epoch, now.epoch);
    assert_eq!(m.fail("GET", "/v1/map?after=x", None).0, 400);
}

// Proves the manager tells systemd it is ready over NOTIFY_SOCKET.
#[test]
fn notifies_systemd() {
    let dir = TempDir::new("notify");
    let sock_path = dir.0.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    let _m = Manager::start_env(
        &dir.0.join("data"),
        &[],
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).expect("READY=1 datagram");
    assert_eq!(&buf[..n], b"READY=1");
}

// Proves fatal start-up errors exit with the documented environment code (3)
// and name the cause on stderr.
#[test]
fn fatal_errors_exit_3() {
    let dir = TempDir::new("fatal");
    let m = Manager::start(&dir.0.join("a"), &[]);
    let o = Command::new(env!("CARGO_BIN_EXE_tessera-manager"))
        .args(["--listen", &m.addr, "--data-dir"])
        .arg(dir.0.join("b"))
        .env("TESSERA_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    let err = stderr_lines(&o);
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].contains("cannot listen on"), "{err:?}");

    let file = dir.0.join("file");
    std::fs::write(&file, b"x").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_tessera-manager"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&file)
        .env("TESSERA_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(stderr_lines(&o).len(), 1, "{:?}", stderr_lines(&o));

    let o = Command::new(env!("CARGO_BIN_EXE_tessera-manager"))
        .args(["--pg-count", "0"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

// Proves the CLI's happy path (tables and JSON) and that each error is one
// stderr line with exit 1: unknown volume, bad size, unreachable manager.
#[test]
fn cli_commands_and_errors() {
    let dir = TempDir::new("cli");
    let m = Manager::start(&dir.0, &[]);
    let url = format!("http://{}", m.addr);
    m.register("node-a", &[("disk-a0", 4 * GIB)]);

    let o = cli(&url, &["volume", "create", "vol1", "--size", "1G"]);
    assert!(o.status.success(), "{:?}", stderr_lines(&o));
    let o = cli(&url, &["--output", "json", "volume", "info", "vol1"]);
    assert!(o.status.success());
    let v: VolumeInfo = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v.size_bytes, v.block_size), (GIB, 512));
    let o = cli(&url, &["volume", "resize", "vol1", "--size", "2G"]);
    assert!(o.status.success());
    let o = cli(&url, &["volume", "list"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.lines().next().unwrap().starts_with("NAME"), "{out}");
    assert!(out.contains("vol1") && out.contains("2 GiB"), "{out}");
    for args in [
        &["node", "list"][..],
        &["disk", "list"],
        &["status"],
        &["--output", "json", "node", "list"],
    ] {
        let o = cli(&url, args);
        assert!(o.status.success(), "{args:?}: {:?}", stderr_lines(&o));
    }
    let o = cli(&url, &["--output", "json", "disk", "list"]);
    let disks: Vec<DiskInfo> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(disks.len(), 1);

    let o = cli(&url, &["volume", "info", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr_lines(&o),
        vec![r#"tessera: volume "nope" not found"#]
    );

    let o = cli(&url, &["volume", "create", "x", "--size", "abc"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr_lines(&o);
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].starts_with(r#"tessera: bad size "abc""#), "{err:?}");

    let o = cli(&url, &["volume", "create", "vol1", "--size", "1G"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr_lines(&o).len(), 1);

    let o = cli(&url, &["volume", "delete", "vol1"]);
    assert!(o.status.success());

    // A port nobody listens on: the manager we just stopped.
    drop(m);
    let o = cli(&url, &["volume", "list"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr_lines(&o),
        vec![format!(
            "tessera: cannot reach manager at {url}: connection refused"
        )]
    );

    let o = cli(&url, &["volume", "frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
}
