//! The manager daemon: membership (registration), health (heartbeats and
//! the grace period), the volume catalogue, placement, the cluster map, and
//! the REST API over HTTP (docs/api.md).
//!
//! State changes go through [`Manager`], which holds the catalogue under one
//! mutex, persists it before answering, and bumps the epoch whenever the
//! published map changes. Liveness (heartbeat times) is memory only: after a
//! restart every known node counts as up until a grace period passes
//! without a heartbeat.

use crate::placement::{self, Candidate};
use crate::store::{Catalog, Disk, Node, Store};
use prometheus::{Encoder, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessera_wire::api::*;
use tessera_wire::map::{CHUNK_SIZE_DEFAULT_BYTES, ClusterMap, DiskEntry, NodeEntry, VolumeEntry};

/// Largest request body the API reads.
pub const BODY_MAX_BYTES: u64 = 1 << 20;
/// Threads answering HTTP requests.
pub const HTTP_THREADS: usize = 4;
/// Longest volume name.
pub const VOLUME_NAME_MAX: usize = 64;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub pg_count: u32,
    pub heartbeat_grace: Duration,
}

/// Exit codes, relied on by the systemd units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    Ok = 0,
    Config = 2,
    Environment = 3,
}

#[derive(Debug)]
pub struct Fatal {
    pub code: ExitCode,
    pub message: String,
}

/// An API error: HTTP status and a one-line message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

fn err(status: u16, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        message: message.into(),
    }
}

struct Live {
    last_heartbeat: Option<Instant>,
    up: bool,
    usage: Option<HeartbeatRequest>,
}

pub struct Manager {
    store: Store,
    inner: Mutex<Inner>,
    grace: Duration,
    metrics: Metrics,
}

struct Inner {
    catalog: Catalog,
    live: BTreeMap<u32, Live>,
    started: Instant,
}

impl Manager {
    pub fn open(config: &Config) -> Result<Manager, Fatal> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| Fatal {
            code: ExitCode::Environment,
            message: format!("cannot create {}: {e}", config.data_dir.display()),
        })?;
        let env = |e: crate::store::StoreError| Fatal {
            code: ExitCode::Environment,
            message: e.to_string(),
        };
        let store = Store::open(&config.data_dir.join("catalog.redb")).map_err(env)?;
        let catalog = match store.load().map_err(env)? {
            Some(c) => c,
            None => {
                let c = Catalog::new(config.pg_count);
                store.save(&c).map_err(env)?;
                c
            }
        };
        let live = catalog
            .nodes
            .iter()
            .map(|n| {
                (
                    n.id,
                    Live {
                        last_heartbeat: None,
                        up: true,
                        usage: None,
                    },
                )
            })
            .collect();
        Ok(Manager {
            store,
            inner: Mutex::new(Inner {
                catalog,
                live,
                started: Instant::now(),
            }),
            grace: config.heartbeat_grace,
            metrics: Metrics::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("manager lock")
    }

    /// Persist a changed catalogue, bumping the epoch. Called with the lock
    /// held, before the change is answered or published.
    fn commit(&self, inner: &mut Inner) -> Result<(), ApiError> {
        inner.catalog.epoch += 1;
        self.store
            .save(&inner.catalog)
            .map_err(|e| err(500, format!("cannot persist catalogue: {e}")))
    }

    pub fn map(&self) -> ClusterMap {
        let inner = self.lock();
        build_map(&inner)
    }

    pub fn register(&self, req: RegisterRequest) -> Result<RegisterResponse, ApiError> {
        if req.node_uuid.is_empty() || req.addr.is_empty() || req.disks.is_empty() {
            return Err(err(
                400,
                "node_uuid, addr and at least one disk are required",
            ));
        }
        let mut inner = self.lock();
        let c = &mut inner.catalog;
        let before = (c.nodes.clone(), c.disks.clone());
        let node_id = match c.nodes.iter_mut().find(|n| n.uuid == req.node_uuid) {
            Some(n) => {
                n.addr = req.addr.clone();
                n.metrics_addr = req.metrics_addr.clone();
                n.pid = req.pid;
                n.host = req.host.clone();
                n.id
            }
            None => {
                let id = c.next_node_id;
                c.next_node_id += 1;
                c.nodes.push(Node {
                    id,
                    uuid: req.node_uuid.clone(),
                    addr: req.addr.clone(),
                    metrics_addr: req.metrics_addr.clone(),
                    pid: req.pid,
                    host: req.host.clone(),
                });
                id
            }
        };
        let mut assigned = Vec::new();
        for d in &req.disks {
            let id = match c.disks.iter_mut().find(|x| x.uuid == d.uuid) {
                Some(x) => {
                    x.node_id = node_id;
                    x.path = d.path.clone();
                    x.capacity_bytes = d.capacity_bytes;
                    x.id
                }
                None => {
                    let id = c.next_disk_id;
                    c.next_disk_id += 1;
                    c.disks.push(Disk {
                        id,
                        node_id,
                        uuid: d.uuid.clone(),
                        path: d.path.clone(),
                        capacity_bytes: d.capacity_bytes,
                    });
                    id
                }
            };
            assigned.push(DiskAssignment {
                uuid: d.uuid.clone(),
                disk_id: id,
            });
        }
        let changed = before != (c.nodes.clone(), c.disks.clone());
        let live = inner.live.entry(node_id).or_insert(Live {
            last_heartbeat: None,
            up: true,
            usage: None,
        });
        let was_down = !live.up;
        live.up = true;
        live.last_heartbeat = Some(Instant::now());
        if changed || was_down {
            self.commit(&mut inner)?;
        }
        tracing::info!(node_id, addr = %req.addr, disks = req.disks.len(), "node registered");
        Ok(RegisterResponse {
            node_id,
            cluster_id: inner.catalog.cluster_id.clone(),
            disks: assigned,
            epoch: inner.catalog.epoch,
        })
    }

    pub fn heartbeat(
        &self,
        node_id: u32,
        req: HeartbeatRequest,
    ) -> Result<HeartbeatResponse, ApiError> {
        let mut inner = self.lock();
        if !inner.catalog.nodes.iter().any(|n| n.id == node_id) {
            return Err(err(404, format!("node {node_id} is not registered")));
        }
        let live = inner.live.entry(node_id).or_insert(Live {
            last_heartbeat: None,
            up: true,
            usage: None,
        });
        live.last_heartbeat = Some(Instant::now());
        live.usage = Some(req);
        if !live.up {
            live.up = true;
            tracing::info!(node_id, "node is up again");
            self.commit(&mut inner)?;
        }
        Ok(HeartbeatResponse {
            epoch: inner.catalog.epoch,
        })
    }

    /// Mark nodes whose heartbeats stopped as down (health policy: a node is
    /// down once `grace` has passed since its last heartbeat, or since the
    /// manager started if it has not been heard from yet).
    pub fn check_health(&self, now: Instant) {
        let mut inner = self.lock();
        let started = inner.started;
        let mut changed = false;
        for (id, l) in inner.live.iter_mut() {
            let last = l.last_heartbeat.unwrap_or(started);
            let up = now.duration_since(last) < self.grace;
            if up != l.up {
                l.up = up;
                changed = true;
                tracing::warn!(node_id = id, up, "node health changed");
            }
        }
        if changed && let Err(e) = self.commit(&mut inner) {
            tracing::error!(error = %e.message, "cannot persist health change");
        }
    }

    pub fn create_volume(&self, req: CreateVolumeRequest) -> Result<VolumeInfo, ApiError> {
        validate_name(&req.name)?;
        let block_size = req.block_size.unwrap_or(512);
        if block_size != 512 && block_size != 4096 {
            return Err(err(400, "block_size must be 512 or 4096"));
        }
        if req.size_bytes == 0 || req.size_bytes % u64::from(block_size) != 0 {
            return Err(err(
                400,
                format!("size must be a non-zero multiple of the block size ({block_size})"),
            ));
        }
        let mut inner = self.lock();
        if inner.catalog.volumes.iter().any(|v| v.name == req.name) {
            return Err(err(409, format!("volume {:?} already exists", req.name)));
        }
        let candidates = up_disks(&inner);
        if candidates.is_empty() && inner.catalog.pgs.iter().any(|s| s.is_empty()) {
            return Err(err(503, "no storage disk is registered and up"));
        }
        placement::assign(&mut inner.catalog.pgs, &candidates, 1);
        let id = inner.catalog.next_volume_id;
        inner.catalog.next_volume_id += 1;
        inner.catalog.volumes.push(VolumeEntry {
            id,
            name: req.name.clone(),
            size_bytes: req.size_bytes,
            chunk_size_bytes: CHUNK_SIZE_DEFAULT_BYTES,
            block_size,
        });
        self.commit(&mut inner)?;
        tracing::info!(name = %req.name, size = req.size_bytes, "volume created");
        Ok(volume_info(&inner, id))
    }

    pub fn resize_volume(
        &self,
        name: &str,
        req: ResizeVolumeRequest,
    ) -> Result<VolumeInfo, ApiError> {
        let mut inner = self.lock();
        let v = inner
            .catalog
            .volumes
            .iter_mut()
            .find(|v| v.name == name)
            .ok_or_else(|| err(404, format!("volume {name:?} not found")))?;
        if req.size_bytes < v.size_bytes {
            return Err(err(
                400,
                "volumes can only grow (shrinking would lose data)",
            ));
        }
        if req.size_bytes % u64::from(v.block_size) != 0 {
            return Err(err(400, "size must be a multiple of the block size"));
        }
        if req.size_bytes == v.size_bytes {
            let id = v.id;
            return Ok(volume_info(&inner, id));
        }
        v.size_bytes = req.size_bytes;
        let id = v.id;
        self.commit(&mut inner)?;
        Ok(volume_info(&inner, id))
    }

    pub fn delete_volume(&self, name: &str) -> Result<(), ApiError> {
        let mut inner = self.lock();
        let before = inner.catalog.volumes.len();
        inner.catalog.volumes.retain(|v| v.name != name);
        if inner.catalog.volumes.len() == before {
            return Err(err(404, format!("volume {name:?} not found")));
        }
        self.commit(&mut inner)?;
        tracing::info!(name, "volume deleted");
        Ok(())
    }

    pub fn volume(&self, name: &str) -> Result<VolumeInfo, ApiError> {
        let inner = self.lock();
        let v = inner
            .catalog
            .volumes
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| err(404, format!("volume {name:?} not found")))?;
        Ok(volume_info(&inner, v.id))
    }

    pub fn volumes(&self) -> Vec<VolumeInfo> {
        let inner = self.lock();
        let mut ids: Vec<(String, u64)> = inner
            .catalog
            .volumes
            .iter()
            .map(|v| (v.name.clone(), v.id))
            .collect();
        ids.sort();
        ids.into_iter()
            .map(|(_, id)| volume_info(&inner, id))
            .collect()
    }

    pub fn nodes(&self) -> Vec<NodeInfo> {
        let inner = self.lock();
        inner
            .catalog
            .nodes
            .iter()
            .map(|n| {
                let l = inner.live.get(&n.id);
                NodeInfo {
                    id: n.id,
                    uuid: n.uuid.clone(),
                    addr: n.addr.clone(),
                    metrics_addr: n.metrics_addr.clone(),
                    pid: n.pid,
                    up: l.is_some_and(|l| l.up),
                    last_heartbeat_ms_ago: l
                        .and_then(|l| l.last_heartbeat)
                        .map(|t| t.elapsed().as_millis() as u64),
                    disks: inner
                        .catalog
                        .disks
                        .iter()
                        .filter(|d| d.node_id == n.id)
                        .map(|d| d.id)
                        .collect(),
                }
            })
            .collect()
    }

    pub fn disks(&self) -> Vec<DiskInfo> {
        let inner = self.lock();
        inner
            .catalog
            .disks
            .iter()
            .map(|d| {
                let l = inner.live.get(&d.node_id);
                let usage = l
                    .and_then(|l| l.usage.as_ref())
                    .and_then(|u| u.disks.iter().find(|x| x.disk_id == d.id));
                DiskInfo {
                    id: d.id,
                    node_id: d.node_id,
                    uuid: d.uuid.clone(),
                    path: d.path.clone(),
                    capacity_bytes: d.capacity_bytes,
                    used_bytes: usage.map_or(0, |u| u.used_bytes),
                    checksum_errors: usage.map_or(0, |u| u.checksum_errors),
                    up: l.is_some_and(|l| l.up),
                }
            })
            .collect()
    }

    pub fn status(&self) -> Status {
        let inner = self.lock();
        let up = inner.live.values().filter(|l| l.up).count() as u32;
        Status {
            cluster_id: inner.catalog.cluster_id.clone(),
            epoch: inner.catalog.epoch,
            nodes_up: up,
            nodes_down: inner.catalog.nodes.len() as u32 - up.min(inner.catalog.nodes.len() as u32),
            disks: inner.catalog.disks.len() as u32,
            volumes: inner.catalog.volumes.len() as u32,
            pgs_total: inner.catalog.pg_count,
            pgs_assigned: inner.catalog.pgs.iter().filter(|s| !s.is_empty()).count() as u32,
            capacity_bytes: inner.catalog.disks.iter().map(|d| d.capacity_bytes).sum(),
            used_bytes: inner
                .live
                .values()
                .filter_map(|l| l.usage.as_ref())
                .flat_map(|u| u.disks.iter().map(|d| d.used_bytes))
                .sum(),
        }
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Status {
    pub cluster_id: String,
    pub epoch: u64,
    pub nodes_up: u32,
    pub nodes_down: u32,
    pub disks: u32,
    pub volumes: u32,
    pub pgs_total: u32,
    pub pgs_assigned: u32,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
}

fn validate_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= VOLUME_NAME_MAX
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(err(
            400,
            format!("bad volume name {name:?}: use 1-64 characters from A-Z a-z 0-9 . _ -"),
        ))
    }
}

fn up_disks(inner: &Inner) -> Vec<Candidate> {
    inner
        .catalog
        .disks
        .iter()
        .filter(|d| inner.live.get(&d.node_id).is_some_and(|l| l.up))
        .map(|d| Candidate {
            disk_id: d.id,
            node_id: d.node_id,
            capacity_bytes: d.capacity_bytes,
        })
        .collect()
}

fn build_map(inner: &Inner) -> ClusterMap {
    let c = &inner.catalog;
    let up = |node: u32| inner.live.get(&node).is_some_and(|l| l.up);
    ClusterMap {
        epoch: c.epoch,
        cluster_id: c.cluster_id.clone(),
        pg_count: c.pg_count,
        nodes: c
            .nodes
            .iter()
            .map(|n| NodeEntry {
                id: n.id,
                addr: n.addr.clone(),
                up: up(n.id),
            })
            .collect(),
        disks: c
            .disks
            .iter()
            .map(|d| DiskEntry {
                id: d.id,
                node_id: d.node_id,
                uuid: d.uuid.clone(),
                capacity_bytes: d.capacity_bytes,
                up: up(d.node_id),
            })
            .collect(),
        pgs: c.pgs.clone(),
        volumes: c.volumes.clone(),
        next_volume_id: c.next_volume_id,
    }
}

fn volume_info(inner: &Inner, id: u64) -> VolumeInfo {
    let map = build_map(inner);
    let v = map.volume(id).expect("volume exists").clone();
    let mut shares: BTreeMap<u32, (u32, u64)> = BTreeMap::new();
    for chunk in 0..v.chunk_count() {
        if let Some(loc) = map.locate(v.id, chunk as u32) {
            shares.entry(loc.disk_id).or_insert((loc.node_id, 0)).1 += 1;
        }
    }
    let allocated = inner
        .live
        .values()
        .filter_map(|l| l.usage.as_ref())
        .flat_map(|u| u.volumes.iter())
        .filter(|u| u.volume_id == id)
        .map(|u| u.allocated_bytes)
        .sum();
    VolumeInfo {
        id: v.id,
        name: v.name.clone(),
        size_bytes: v.size_bytes,
        block_size: v.block_size,
        chunk_size_bytes: v.chunk_size_bytes,
        chunks: v.chunk_count(),
        allocated_bytes: allocated,
        placement: shares
            .into_iter()
            .map(|(disk_id, (node_id, chunks))| DiskShare {
                disk_id,
                node_id,
                chunks,
            })
            .collect(),
    }
}

// ---- metrics ---------------------------------------------------------------

#[derive(Clone)]
struct Metrics {
    registry: Registry,
    http: IntCounterVec,
    epoch: IntGauge,
    nodes_up: IntGauge,
    nodes_down: IntGauge,
    disks: IntGauge,
    volumes: IntGauge,
    capacity: IntGauge,
    used: IntGauge,
}

impl Metrics {
    fn new() -> Metrics {
        let registry = Registry::new();
        let http = IntCounterVec::new(
            Opts::new(
                "tessera_manager_http_requests_total",
                "API requests by route and status",
            ),
            &["route", "code"],
        )
        .expect("metric");
        let g = |n: &str, h: &str| IntGauge::new(n, h).expect("metric");
        let m = Metrics {
            http,
            epoch: g("tessera_manager_map_epoch", "Current cluster-map epoch"),
            nodes_up: g("tessera_manager_nodes_up", "Storage nodes up"),
            nodes_down: g("tessera_manager_nodes_down", "Storage nodes down"),
            disks: g("tessera_manager_disks", "Disks in the catalogue"),
            volumes: g("tessera_manager_volumes", "Volumes in the catalogue"),
            capacity: g("tessera_manager_capacity_bytes", "Total disk capacity"),
            used: g("tessera_manager_used_bytes", "Total allocated bytes"),
            registry,
        };
        m.registry
            .register(Box::new(m.http.clone()))
            .expect("register");
        for x in [
            &m.epoch,
            &m.nodes_up,
            &m.nodes_down,
            &m.disks,
            &m.volumes,
            &m.capacity,
            &m.used,
        ] {
            m.registry.register(Box::new(x.clone())).expect("register");
        }
        m
    }
}

// ---- HTTP ----------------------------------------------------------------

type Reply = (u16, Vec<u8>);

fn json<T: Serialize>(status: u16, v: &T) -> Reply {
    (status, serde_json::to_vec_pretty(v).expect("serialise"))
}

fn error_reply(e: ApiError) -> Reply {
    json(e.status, &ErrorBody { error: e.message })
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| err(400, format!("bad JSON body: {e}")))
}

/// Route one request. Pure with respect to HTTP: method, path, body in;
/// status and body out.
pub fn route(m: &Manager, method: &str, path: &str, body: &[u8]) -> (&'static str, Reply) {
    let path = path.split('?').next().unwrap_or("");
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let r = |x: Result<Reply, ApiError>| x.unwrap_or_else(error_reply);
    match (method, parts.as_slice()) {
        ("GET", ["v1", "map"]) => ("map", json(200, &m.map())),
        ("GET", ["v1", "status"]) => ("status", json(200, &m.status())),
        ("GET", ["v1", "nodes"]) => ("nodes", json(200, &m.nodes())),
        ("GET", ["v1", "disks"]) => ("disks", json(200, &m.disks())),
        ("POST", ["v1", "nodes", "register"]) => (
            "register",
            r(parse(body)
                .and_then(|b| m.register(b))
                .map(|x| json(200, &x))),
        ),
        ("POST", ["v1", "nodes", id, "heartbeat"]) => (
            "heartbeat",
            r(id.parse::<u32>()
                .map_err(|_| err(400, "bad node id"))
                .and_then(|id| parse(body).and_then(|b| m.heartbeat(id, b)))
                .map(|x| json(200, &x))),
        ),
        ("GET", ["v1", "volumes"]) => ("volumes", json(200, &m.volumes())),
        ("POST", ["v1", "volumes"]) => (
            "volume_create",
            r(parse(body)
                .and_then(|b| m.create_volume(b))
                .map(|x| json(201, &x))),
        ),
        ("GET", ["v1", "volumes", name]) => ("volume", r(m.volume(name).map(|x| json(200, &x)))),
        ("PATCH", ["v1", "volumes", name]) => (
            "volume_resize",
            r(parse(body)
                .and_then(|b| m.resize_volume(name, b))
                .map(|x| json(200, &x))),
        ),
        ("DELETE", ["v1", "volumes", name]) => (
            "volume_delete",
            r(m.delete_volume(name).map(|()| (204, Vec::new()))),
        ),
        ("GET", ["metrics"]) => {
            let s = m.status();
            m.metrics.epoch.set(s.epoch as i64);
            m.metrics.nodes_up.set(i64::from(s.nodes_up));
            m.metrics.nodes_down.set(i64::from(s.nodes_down));
            m.metrics.disks.set(i64::from(s.disks));
            m.metrics.volumes.set(i64::from(s.volumes));
            m.metrics.capacity.set(s.capacity_bytes as i64);
            m.metrics.used.set(s.used_bytes as i64);
            let mut out = Vec::new();
            TextEncoder::new()
                .encode(&m.metrics.registry.gather(), &mut out)
                .expect("encode");
            ("metrics", (200, out))
        }
        _ => (
            "unknown",
            error_reply(err(404, format!("no route for {method} {path}"))),
        ),
    }
}

fn serve_http(m: &Manager, server: &tiny_http::Server) {
    for mut req in server.incoming_requests() {
        let method = req.method().as_str().to_string();
        let url = req.url().to_string();
        let len = req.body_length().unwrap_or(0) as u64;
        let (label, (status, body)) = if len > BODY_MAX_BYTES {
            ("too_large", error_reply(err(413, "request body too large")))
        } else {
            let mut body = Vec::new();
            let read = req
                .as_reader()
                .take(BODY_MAX_BYTES + 1)
                .read_to_end(&mut body);
            if read.is_err() || body.len() as u64 > BODY_MAX_BYTES {
                ("too_large", error_reply(err(413, "request body too large")))
            } else {
                route(m, &method, &url, &body)
            }
        };
        m.metrics
            .http
            .with_label_values(&[label, &status.to_string()])
            .inc();
        let content_type = if label == "metrics" {
            "text/plain; version=0.0.4"
        } else {
            "application/json"
        };
        let resp = tiny_http::Response::from_data(body)
            .with_status_code(status)
            .with_header(
                format!("Content-Type: {content_type}")
                    .parse::<tiny_http::Header>()
                    .expect("header"),
            );
        let _ = req.respond(resp);
    }
}

/// Run the manager until SIGTERM/SIGINT.
pub fn run(config: Config) -> Result<(), Fatal> {
    tracing::info!(?config, "starting tessera-manager");
    let manager = Arc::new(Manager::open(&config)?);
    let server = Arc::new(tiny_http::Server::http(config.listen).map_err(|e| Fatal {
        code: ExitCode::Environment,
        message: format!("cannot listen on {}: {e}", config.listen),
    })?);
    let bound = server
        .server_addr()
        .to_ip()
        .map(|a| a.to_string())
        .unwrap_or_default();
    for _ in 0..HTTP_THREADS {
        let (m, s) = (manager.clone(), server.clone());
        std::thread::spawn(move || serve_http(&m, &s));
    }
    {
        let m = manager.clone();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(250));
                m.check_health(Instant::now());
            }
        });
    }
    println!("READY listen={bound}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    crate::notify_ready();
    crate::wait_for_termination();
    tracing::info!("stopping");
    server.unblock();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manager(name: &str) -> (Manager, PathBuf) {
        let dir = std::env::temp_dir().join(format!("tessera-mgr-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let m = Manager::open(&Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.clone(),
            pg_count: 16,
            heartbeat_grace: Duration::from_secs(5),
        })
        .unwrap();
        (m, dir)
    }

    fn reg(m: &Manager, uuid: &str) -> RegisterResponse {
        m.register(RegisterRequest {
            node_uuid: uuid.into(),
            addr: "127.0.0.1:1".into(),
            metrics_addr: None,
            pid: 1,
            host: String::new(),
            disks: vec![DiskRegistration {
                uuid: format!("{uuid}-d"),
                path: "/x".into(),
                capacity_bytes: 1 << 30,
            }],
        })
        .unwrap()
    }

    // Proves the volume lifecycle through the router, with the errors the
    // API promises, and that every change bumps the epoch.
    #[test]
    fn volume_lifecycle() {
        let (m, dir) = manager("life");
        let body = br#"{"name":"a","size_bytes":1073741824}"#;
        assert_eq!(route(&m, "POST", "/v1/volumes", body).1.0, 503);
        let r1 = reg(&m, "n1");
        let r2 = reg(&m, "n2");
        assert_ne!(r1.disks[0].disk_id, r2.disks[0].disk_id);
        assert_eq!(reg(&m, "n1").node_id, r1.node_id);
        let e0 = m.map().epoch;
        assert_eq!(route(&m, "POST", "/v1/volumes", body).1.0, 201);
        assert!(m.map().epoch > e0);
        assert_eq!(route(&m, "POST", "/v1/volumes", body).1.0, 409);
        assert_eq!(route(&m, "POST", "/v1/volumes", b"{").1.0, 400);
        assert_eq!(
            route(
                &m,
                "POST",
                "/v1/volumes",
                br#"{"name":"b c","size_bytes":512}"#
            )
            .1
            .0,
            400
        );
        assert_eq!(
            route(
                &m,
                "POST",
                "/v1/volumes",
                br#"{"name":"b","size_bytes":100}"#
            )
            .1
            .0,
            400
        );
        let info = m.volume("a").unwrap();
        assert_eq!(info.chunks, 256);
        assert_eq!(info.placement.iter().map(|p| p.chunks).sum::<u64>(), 256);
        assert_eq!(info.placement.len(), 2);
        assert_eq!(
            route(&m, "PATCH", "/v1/volumes/a", br#"{"size_bytes":512}"#)
                .1
                .0,
            400
        );
        assert_eq!(
            route(
                &m,
                "PATCH",
                "/v1/volumes/a",
                br#"{"size_bytes":2147483648}"#
            )
            .1
            .0,
            200
        );
        assert_eq!(route(&m, "GET", "/v1/volumes/zz", b"").1.0, 404);
        assert_eq!(route(&m, "DELETE", "/v1/volumes/a", b"").1.0, 204);
        assert_eq!(route(&m, "DELETE", "/v1/volumes/a", b"").1.0, 404);
        let map = m.map();
        assert!(map.is_deleted_volume(1));
        map.validate().unwrap();
        drop(m);
        std::fs::remove_dir_all(dir).ok();
    }

    // Proves a restarted manager finds everything it had.
    #[test]
    fn persists_across_restart() {
        let (m, dir) = manager("persist");
        reg(&m, "n1");
        m.create_volume(CreateVolumeRequest {
            name: "v".into(),
            size_bytes: 1 << 20,
            block_size: None,
        })
        .unwrap();
        let before = m.map();
        drop(m);
        let m = Manager::open(&Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.clone(),
            pg_count: 99,
            heartbeat_grace: Duration::from_secs(5),
        })
        .unwrap();
        let after = m.map();
        assert_eq!(after.volumes, before.volumes);
        assert_eq!(after.pgs, before.pgs);
        assert_eq!(after.cluster_id, before.cluster_id);
        assert!(after.epoch >= before.epoch);
        drop(m);
        std::fs::remove_dir_all(dir).ok();
    }

    // Proves a silent node goes down after the grace period and comes back
    // with its next heartbeat.
    #[test]
    fn health() {
        let dir = std::env::temp_dir().join(format!("tessera-mgr-health-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let m = Manager::open(&Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.clone(),
            pg_count: 4,
            heartbeat_grace: Duration::from_secs(2),
        })
        .unwrap();
        let r = reg(&m, "n1");
        m.check_health(Instant::now());
        assert!(m.map().nodes[0].up);
        m.check_health(Instant::now() + Duration::from_secs(3));
        assert!(!m.map().nodes[0].up);
        m.heartbeat(
            r.node_id,
            HeartbeatRequest {
                disks: vec![],
                volumes: vec![],
            },
        )
        .unwrap();
        assert!(m.map().nodes[0].up);
        assert_eq!(
            m.heartbeat(
                99,
                HeartbeatRequest {
                    disks: vec![],
                    volumes: vec![]
                }
            )
            .unwrap_err()
            .status,
            404
        );
        drop(m);
        std::fs::remove_dir_all(dir).ok();
    }
}
