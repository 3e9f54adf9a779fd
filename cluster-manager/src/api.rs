//! The REST API (docs/api.md): HTTP/1.1 over tiny_http, JSON bodies, every
//! error as `{"error": "..."}` with a 4xx/5xx status, and the Prometheus
//! metrics page.
//!
//! [`route`] is pure with respect to HTTP (method, path and body in; route
//! label, status and body out) so the whole API is testable without
//! sockets. Client input never panics: bodies are capped at
//! [`BODY_MAX_BYTES`] and parsed into typed requests, and every failure is
//! an [`ApiError`].

use crate::daemon::{ApiError, Manager};
use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use serde::Serialize;
use std::io::Read;
use std::sync::Arc;
use tessera_wire::api::ErrorBody;

/// Largest request body the API reads.
pub const BODY_MAX_BYTES: u64 = 1 << 20;
/// Threads answering HTTP requests.
pub const HTTP_THREADS: usize = 4;
/// Longest a `GET /v1/map?after=` long poll is held before it is answered
/// with the unchanged map.
pub const MAP_WAIT_MAX_MS: u64 = 30_000;
/// Hold time of a long poll that names none (`wait_ms`).
pub const MAP_WAIT_DEFAULT_MS: u64 = 10_000;
/// Long polls held at once (one small thread each); above it the map route
/// answers 503 and the client retries later.
pub const MAP_WAITERS_MAX: usize = 256;

/// A map long poll, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapPoll {
    /// The epoch the client has.
    pub after: u64,
    /// How long to hold the request for a newer one.
    pub wait: std::time::Duration,
    /// `next=1`: the map of epoch `after + 1` while the manager still has
    /// it, not the newest (storage daemons process every epoch in order).
    pub next: bool,
}

/// A `GET /v1/map?after=EPOCH[&wait_ms=MS][&next=1]` long poll. `None` for a
/// plain map request; `Err` for a malformed query.
pub fn map_long_poll(url: &str) -> Result<Option<MapPoll>, ApiError> {
    let Some((path, query)) = url.split_once('?') else {
        return Ok(None);
    };
    if path.trim_end_matches('/') != "/v1/map" {
        return Ok(None);
    }
    let (mut after, mut wait_ms, mut next) = (None, MAP_WAIT_DEFAULT_MS, false);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let num = || {
            v.parse::<u64>()
                .map_err(|_| ApiError::new(400, format!("bad {k} {v:?}: not a number")))
        };
        match k {
            "after" => after = Some(num()?),
            "wait_ms" => wait_ms = num()?.min(MAP_WAIT_MAX_MS),
            "next" => next = num()? != 0,
            _ => {}
        }
    }
    Ok(after.map(|a| MapPoll {
        after: a,
        wait: std::time::Duration::from_millis(wait_ms),
        next,
    }))
}

/// Longest an iSCSI access long poll or fence wait is held.
pub const ISCSI_WAIT_MAX_MS: u64 = 10_000;

/// A gateway's held request: `GET /v1/iscsi/access?gateway=ID&revision=R
/// &wait_ms=MS` (the snapshot once newer than `R`; the gateway holds `R`)
/// or `GET /v1/iscsi/fenced?gateway=ID&revision=R&wait_ms=MS` (once every
/// other gateway within its lease holds `R`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IscsiPoll {
    pub fence: bool,
    pub gateway: String,
    pub revision: u64,
    pub wait: std::time::Duration,
}

/// Parse a held iSCSI request; `None` for anything else (a plain `GET
/// /v1/iscsi/access` is answered at once).
pub fn iscsi_long_poll(url: &str) -> Result<Option<IscsiPoll>, ApiError> {
    let Some((path, query)) = url.split_once('?') else {
        return Ok(None);
    };
    let fence = match path.trim_end_matches('/') {
        "/v1/iscsi/access" => false,
        "/v1/iscsi/fenced" => true,
        _ => return Ok(None),
    };
    let (mut gateway, mut revision, mut wait_ms) = (None, None, 0);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let num = || {
            v.parse::<u64>()
                .map_err(|_| ApiError::new(400, format!("bad {k} {v:?}: not a number")))
        };
        match k {
            "gateway" if !v.is_empty() && v.len() <= 64 => gateway = Some(v.to_string()),
            "gateway" => return Err(ApiError::new(400, "bad gateway id")),
            "revision" => revision = Some(num()?),
            "wait_ms" => wait_ms = num()?.min(ISCSI_WAIT_MAX_MS),
            _ => {}
        }
    }
    match (gateway, revision) {
        (Some(gateway), Some(revision)) => Ok(Some(IscsiPoll {
            fence,
            gateway,
            revision,
            wait: std::time::Duration::from_millis(wait_ms),
        })),
        _ if fence => Err(ApiError::new(400, "fenced needs gateway and revision")),
        _ => Ok(None),
    }
}

/// The manager's fixed metric set; labels are bounded (route names are
/// static strings, codes a handful of statuses).
struct Metrics {
    registry: Registry,
    http: IntCounterVec,
    epoch: IntGauge,
    nodes_up: IntGauge,
    nodes_down: IntGauge,
    disks: IntGauge,
    volumes: IntGauge,
    pgs_assigned: IntGauge,
    capacity: IntGauge,
    used: IntGauge,
    disks_held_in: IntGauge,
    /// 1 for each operator switch set, by name (`tessera cluster set`).
    flags: IntGaugeVec,
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
        .expect("valid metric");
        let g = |n: &str, h: &str| IntGauge::new(n, h).expect("valid metric");
        let m = Metrics {
            http,
            epoch: g("tessera_manager_map_epoch", "Current cluster-map epoch"),
            nodes_up: g("tessera_manager_nodes_up", "Storage nodes up"),
            nodes_down: g("tessera_manager_nodes_down", "Storage nodes down"),
            disks: g("tessera_manager_disks", "Disks in the catalogue"),
            volumes: g("tessera_manager_volumes", "Volumes in the catalogue"),
            pgs_assigned: g(
                "tessera_manager_pgs_assigned",
                "Placement groups with a non-empty acting set",
            ),
            capacity: g("tessera_manager_capacity_bytes", "Total disk capacity"),
            used: g(
                "tessera_manager_used_bytes",
                "Bytes used on disks, from heartbeats",
            ),
            disks_held_in: g(
                "tessera_manager_disks_held_in",
                "Disks down past --down-out-after kept in (noout or --min-in-ratio)",
            ),
            flags: IntGaugeVec::new(
                Opts::new(
                    "tessera_manager_flag",
                    "Operator switches: 1 when set (noout, norebalance, norecover, nobackfill)",
                ),
                &["flag"],
            )
            .expect("valid metric"),
            registry,
        };
        m.registry
            .register(Box::new(m.http.clone()))
            .expect("unique metric");
        m.registry
            .register(Box::new(m.flags.clone()))
            .expect("unique metric");
        for x in [
            &m.epoch,
            &m.nodes_up,
            &m.nodes_down,
            &m.disks,
            &m.volumes,
            &m.pgs_assigned,
            &m.capacity,
            &m.used,
            &m.disks_held_in,
        ] {
            m.registry
                .register(Box::new(x.clone()))
                .expect("unique metric");
        }
        m
    }
}

pub struct Api {
    manager: Arc<Manager>,
    metrics: Metrics,
    /// Map long polls being held (at most [`MAP_WAITERS_MAX`]).
    map_waiters: std::sync::atomic::AtomicUsize,
    /// The cluster secret gateways present for the gateway-only routes
    /// (`crate::secret`); without one those routes refuse everyone.
    cluster_secret: Option<String>,
}

type Reply = (u16, Vec<u8>);

fn json<T: Serialize>(status: u16, v: &T) -> Reply {
    (
        status,
        serde_json::to_vec_pretty(v).expect("API types serialise"),
    )
}

fn error_reply(e: ApiError) -> Reply {
    json(e.status, &ErrorBody { error: e.message })
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::new(400, format!("bad JSON body: {e}")))
}

impl Api {
    pub fn new(manager: Arc<Manager>) -> Api {
        Api {
            manager,
            metrics: Metrics::new(),
            map_waiters: std::sync::atomic::AtomicUsize::new(0),
            cluster_secret: None,
        }
    }

    /// Accept `Authorization: Bearer <secret>` for the gateway-only routes.
    pub fn with_cluster_secret(mut self, secret: String) -> Api {
        self.cluster_secret = Some(secret);
        self
    }

    /// Whether an `Authorization` header value carries the cluster secret.
    pub fn is_gateway(&self, authorization: Option<&str>) -> bool {
        match (
            &self.cluster_secret,
            authorization.and_then(|a| a.strip_prefix("Bearer ")),
        ) {
            (Some(s), Some(p)) => crate::secret::matches(p.trim(), s),
            _ => false,
        }
    }

    /// Route one request from a client without the cluster secret.
    pub fn route(&self, method: &str, path: &str, body: &[u8]) -> (&'static str, Reply) {
        self.route_as(method, path, body, false)
    }

    /// Route one request: (route label for metrics, (status, body)).
    /// `gateway`: the request carried the cluster secret.
    pub fn route_as(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        gateway: bool,
    ) -> (&'static str, Reply) {
        let m = &self.manager;
        let gateway_only = || {
            error_reply(ApiError::new(
                401,
                "this route is for gateways: it needs the cluster secret (Authorization: Bearer)",
            ))
        };
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
                    .map_err(|_| ApiError::new(400, format!("bad node id {id:?}")))
                    .and_then(|id| parse(body).and_then(|b| m.heartbeat(id, b)))
                    .map(|x| json(200, &x))),
            ),
            ("POST", ["v1", "nodes", id, "failure"]) => (
                "failure",
                r(id.parse::<u32>()
                    .map_err(|_| ApiError::new(400, format!("bad node id {id:?}")))
                    .and_then(|id| parse(body).and_then(|b| m.report_failure(id, b)))
                    .map(|()| json(200, &serde_json::json!({})))),
            ),
            ("GET", ["v1", "pools"]) => ("pools", json(200, &m.pools())),
            ("POST", ["v1", "scrub"]) => (
                "scrub",
                json(200, &serde_json::json!({ "generation": m.request_scrub() })),
            ),
            ("POST", ["v1", "pgs", "clean"]) => (
                "pg_clean",
                r(parse(body)
                    .and_then(|b| m.report_clean(b))
                    .map(|changed| json(200, &serde_json::json!({ "changed": changed })))),
            ),
            ("POST", ["v1", "pools"]) => (
                "pool_create",
                r(parse(body)
                    .and_then(|b| m.create_pool(b))
                    .map(|x| json(201, &x))),
            ),
            ("GET", ["v1", "volumes"]) => ("volumes", json(200, &m.volumes())),
            ("POST", ["v1", "volumes"]) => (
                "volume_create",
                r(parse(body)
                    .and_then(|b| m.create_volume(b))
                    .map(|x| json(201, &x))),
            ),
            ("GET", ["v1", "volumes", name]) => {
                ("volume_info", r(m.volume(name).map(|x| json(200, &x))))
            }
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
            ("GET", ["v1", "volumes", name, "iscsi"]) => {
                ("iscsi_info", r(m.iscsi_access(name).map(|x| json(200, &x))))
            }
            ("POST", ["v1", "volumes", name, "iscsi", "initiators"]) => (
                "iscsi_acl_add",
                r(parse(body)
                    .and_then(|b| m.iscsi_add_initiator(name, b))
                    .map(|x| json(200, &x))),
            ),
            ("DELETE", ["v1", "volumes", name, "iscsi", "initiators", iqn]) => (
                "iscsi_acl_remove",
                r(m.iscsi_remove_initiator(name, iqn).map(|x| json(200, &x))),
            ),
            ("PUT", ["v1", "volumes", name, "iscsi", "chap"]) => (
                "iscsi_chap_set",
                r(parse(body)
                    .and_then(|b| m.iscsi_set_chap(name, b))
                    .map(|x| json(200, &x))),
            ),
            ("DELETE", ["v1", "volumes", name, "iscsi", "chap"]) => (
                "iscsi_chap_clear",
                r(m.iscsi_clear_chap(name).map(|x| json(200, &x))),
            ),
            ("GET", ["v1", "flags"]) => ("flags", json(200, &m.flags())),
            ("PUT", ["v1", "flags", name]) => {
                ("flag_set", r(m.set_flag(name, true).map(|x| json(200, &x))))
            }
            ("DELETE", ["v1", "flags", name]) => (
                "flag_unset",
                r(m.set_flag(name, false).map(|x| json(200, &x))),
            ),
            ("GET", ["v1", "iscsi", "discovery-chap"]) => {
                ("iscsi_discovery", json(200, &m.iscsi_discovery_chap()))
            }
            ("PUT", ["v1", "iscsi", "discovery-chap"]) => (
                "iscsi_discovery_set",
                r(parse(body)
                    .and_then(|b| m.iscsi_set_discovery_chap(Some(b)))
                    .map(|x| json(200, &x))),
            ),
            ("DELETE", ["v1", "iscsi", "discovery-chap"]) => (
                "iscsi_discovery_clear",
                r(m.iscsi_set_discovery_chap(None).map(|x| json(200, &x))),
            ),
            ("DELETE", ["v1", "iscsi", "gateways", id]) => (
                "iscsi_gateway_left",
                if gateway {
                    m.iscsi_gateway_left(id);
                    (204, Vec::new())
                } else {
                    gateway_only()
                },
            ),
            ("GET", ["v1", "iscsi", "access"]) => (
                "iscsi_access",
                if gateway {
                    json(200, &m.iscsi_snapshot())
                } else {
                    gateway_only()
                },
            ),
            ("PUT", ["v1", "volumes", name, "iscsi", "reservations"]) => (
                "iscsi_reservations",
                if gateway {
                    r(parse(body)
                        .and_then(|b| m.iscsi_store_reservations(name, b))
                        .map(|x| match x {
                            Ok(stored) => json(200, &stored),
                            // Compare-and-swap lost: what is stored.
                            Err(stored) => json(409, &stored),
                        }))
                } else {
                    gateway_only()
                },
            ),
            ("GET", ["metrics"]) => ("metrics", (200, self.metrics_text())),
            (
                _,
                [
                    "v1",
                    "map" | "status" | "nodes" | "disks" | "volumes" | "pools" | "flags",
                ],
            )
            | (_, ["v1", "flags", _])
            | (_, ["v1", "volumes", _])
            | (_, ["v1", "nodes", "register"])
            | (_, ["v1", "nodes", _, "heartbeat"])
            | (_, ["v1", "nodes", _, "failure"])
            | (_, ["v1", "volumes", _, "iscsi"])
            | (
                _,
                [
                    "v1",
                    "volumes",
                    _,
                    "iscsi",
                    "initiators" | "chap" | "reservations",
                ],
            )
            | (_, ["v1", "volumes", _, "iscsi", "initiators", _])
            | (_, ["v1", "iscsi", "access" | "discovery-chap"])
            | (_, ["v1", "pgs", "clean"])
            | (_, ["v1", "scrub"])
            | (_, ["metrics"]) => (
                "bad_method",
                error_reply(ApiError::new(
                    405,
                    format!("method {method} not allowed on {path}"),
                )),
            ),
            _ => (
                "unknown",
                error_reply(ApiError::new(404, format!("no route for {method} {path}"))),
            ),
        }
    }

    fn metrics_text(&self) -> Vec<u8> {
        let s = self.manager.status();
        let m = &self.metrics;
        m.epoch.set(s.epoch as i64);
        m.nodes_up.set(i64::from(s.nodes_up));
        m.nodes_down.set(i64::from(s.nodes_down));
        m.disks.set(i64::from(s.disks));
        m.volumes.set(i64::from(s.volumes));
        m.pgs_assigned.set(i64::from(s.pgs_assigned));
        m.capacity.set(s.capacity_bytes as i64);
        m.used.set(s.used_bytes as i64);
        m.disks_held_in.set(i64::from(s.disks_held_in));
        for f in crate::store::ClusterFlag::ALL {
            m.flags
                .with_label_values(&[f.name()])
                .set(i64::from(s.flags.iter().any(|x| x == f.name())));
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&m.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        out
    }

    /// Hold a map long poll on its own small thread until the epoch
    /// passes `after` or `wait` runs out; the HTTP threads stay free.
    fn hold_map_request(self: &Arc<Self>, req: tiny_http::Request, poll: MapPoll) {
        self.hold(req, "map_wait", move |api| {
            let map = if poll.next {
                api.manager.map_next(poll.after, poll.wait)
            } else {
                api.manager.map_after(poll.after, poll.wait)
            };
            json(200, &map)
        });
    }

    /// Hold a gateway's access long poll or fence wait the same way.
    fn hold_iscsi_request(self: &Arc<Self>, req: tiny_http::Request, poll: IscsiPoll) {
        let label = if poll.fence {
            "iscsi_fenced"
        } else {
            "iscsi_access"
        };
        self.hold(req, label, move |api| {
            if poll.fence {
                let f = api
                    .manager
                    .iscsi_fenced(&poll.gateway, poll.revision, poll.wait);
                json(200, &f)
            } else {
                let s =
                    api.manager
                        .iscsi_snapshot_after(Some(&poll.gateway), poll.revision, poll.wait);
                json(200, &s)
            }
        });
    }

    /// Answer `req` with `answer` on a small thread of its own (at most
    /// [`MAP_WAITERS_MAX`] at once over every kind of long poll; above it,
    /// 503 and the client retries).
    fn hold(
        self: &Arc<Self>,
        req: tiny_http::Request,
        label: &'static str,
        answer: impl FnOnce(&Api) -> Reply + Send + 'static,
    ) {
        use std::sync::atomic::Ordering;
        if self.map_waiters.fetch_add(1, Ordering::SeqCst) >= MAP_WAITERS_MAX {
            self.map_waiters.fetch_sub(1, Ordering::SeqCst);
            let e = ApiError::new(
                503,
                format!("more than {MAP_WAITERS_MAX} long polls held: retry later"),
            );
            self.respond(req, label, error_reply(e));
            return;
        }
        let api = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("long-poll".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let reply = answer(&api);
                api.respond(req, label, reply);
                api.map_waiters.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            // The request went with the closure; the client times out and retries.
            self.map_waiters.fetch_sub(1, Ordering::SeqCst);
            tracing::error!(error = %e, "cannot spawn a long-poll thread");
        }
    }

    /// Send a reply and count it.
    fn respond(&self, req: tiny_http::Request, label: &str, (status, body): Reply) {
        self.metrics
            .http
            .with_label_values(&[label, &status.to_string()])
            .inc();
        let resp = tiny_http::Response::from_data(body)
            .with_status_code(status)
            .with_header(
                tiny_http::Header::from_bytes("Content-Type", "application/json")
                    .expect("static header"),
            );
        // The client may be gone; nothing to do about it.
        let _ = req.respond(resp);
    }

    /// Answer requests from `server` until it is unblocked.
    pub fn serve(self: &Arc<Self>, server: &tiny_http::Server) {
        for mut req in server.incoming_requests() {
            let method = req.method().as_str().to_string();
            let url = req.url().to_string();
            if method == "GET" {
                match map_long_poll(&url) {
                    Ok(Some(poll)) => {
                        self.hold_map_request(req, poll);
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.respond(req, "map_wait", error_reply(e));
                        continue;
                    }
                }
            }
            let declared = req.body_length().unwrap_or(0) as u64;
            let gateway = self.is_gateway(
                req.headers()
                    .iter()
                    .find(|h| h.field.equiv("Authorization"))
                    .map(|h| h.value.as_str()),
            );
            if method == "GET" {
                match iscsi_long_poll(&url) {
                    Ok(Some(_)) if !gateway => {
                        let e = ApiError::new(
                            401,
                            "this route is for gateways: it needs the cluster secret (Authorization: Bearer)",
                        );
                        self.respond(req, "iscsi_access", error_reply(e));
                        continue;
                    }
                    Ok(Some(poll)) => {
                        self.hold_iscsi_request(req, poll);
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.respond(req, "iscsi_access", error_reply(e));
                        continue;
                    }
                }
            }
            let too_large = || {
                (
                    "too_large",
                    error_reply(ApiError::new(
                        413,
                        format!("request body larger than {BODY_MAX_BYTES} bytes"),
                    )),
                )
            };
            let (label, (status, body)) = if declared > BODY_MAX_BYTES {
                too_large()
            } else {
                // Chunked bodies declare no length: cap what is read.
                let mut body = Vec::new();
                match req
                    .as_reader()
                    .take(BODY_MAX_BYTES + 1)
                    .read_to_end(&mut body)
                {
                    Ok(_) if body.len() as u64 > BODY_MAX_BYTES => too_large(),
                    Ok(_) => self.route_as(&method, &url, &body, gateway),
                    Err(e) => (
                        "bad_body",
                        error_reply(ApiError::new(400, format!("cannot read body: {e}"))),
                    ),
                }
            };
            self.metrics
                .http
                .with_label_values(&[label, &status.to_string()])
                .inc();
            if status >= 500 {
                tracing::error!(%method, %url, status, "request failed");
            } else {
                tracing::debug!(%method, %url, status, "request");
            }
            let content_type = if label == "metrics" {
                "text/plain; version=0.0.4"
            } else {
                "application/json"
            };
            let resp = tiny_http::Response::from_data(body)
                .with_status_code(status)
                .with_header(
                    tiny_http::Header::from_bytes("Content-Type", content_type)
                        .expect("static header"),
                );
            // The client may be gone; nothing to do about it.
            let _ = req.respond(resp);
        }
    }
}

#[cfg(test)]
mod tests {

    // Proves the iSCSI long-poll parser: access polls need a gateway and a
    // revision (else a plain snapshot), fence waits need both, wait_ms is
    // capped, bad numbers and ids are 400s.
    #[test]
    fn iscsi_long_poll_query() {
        let p = iscsi_long_poll("/v1/iscsi/access?gateway=g1&revision=7&wait_ms=500")
            .unwrap()
            .unwrap();
        assert_eq!(
            (p.fence, p.gateway.as_str(), p.revision, p.wait.as_millis()),
            (false, "g1", 7, 500)
        );
        assert_eq!(iscsi_long_poll("/v1/iscsi/access").unwrap(), None);
        assert_eq!(
            iscsi_long_poll("/v1/iscsi/access?revision=3").unwrap(),
            None
        );
        let f = iscsi_long_poll("/v1/iscsi/fenced?gateway=g&revision=2&wait_ms=999999")
            .unwrap()
            .unwrap();
        assert!(f.fence);
        assert_eq!(f.wait.as_millis() as u64, ISCSI_WAIT_MAX_MS);
        assert_eq!(
            iscsi_long_poll("/v1/iscsi/fenced?gateway=g")
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            iscsi_long_poll("/v1/iscsi/access?gateway=g&revision=x")
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            iscsi_long_poll("/v1/iscsi/access?gateway=&revision=1")
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(iscsi_long_poll("/v1/map?after=1").unwrap(), None);
    }

    // Proves the long-poll query parser: only `/v1/map` with `after` is a
    // long poll, `wait_ms` defaults and is capped, `next` is off unless
    // asked, bad numbers are 400.
    #[test]
    fn map_long_poll_query() {
        use std::time::Duration as D;
        let poll = |after, ms, next| {
            Some(MapPoll {
                after,
                wait: D::from_millis(ms),
                next,
            })
        };
        assert_eq!(map_long_poll("/v1/map").unwrap(), None);
        assert_eq!(map_long_poll("/v1/map?wait_ms=5").unwrap(), None);
        assert_eq!(map_long_poll("/v1/status?after=3").unwrap(), None);
        assert_eq!(
            map_long_poll("/v1/map?after=7").unwrap(),
            poll(7, MAP_WAIT_DEFAULT_MS, false)
        );
        assert_eq!(
            map_long_poll("/v1/map/?after=7&wait_ms=250&x").unwrap(),
            poll(7, 250, false)
        );
        assert_eq!(
            map_long_poll("/v1/map?wait_ms=99999999&after=0").unwrap(),
            poll(0, MAP_WAIT_MAX_MS, false)
        );
        assert_eq!(
            map_long_poll("/v1/map?after=3&next=1&wait_ms=9").unwrap(),
            poll(3, 9, true)
        );
        assert_eq!(map_long_poll("/v1/map?after=-1").unwrap_err().status, 400);
        assert_eq!(
            map_long_poll("/v1/map?after=1&wait_ms=")
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            map_long_poll("/v1/map?after=1&next=yes")
                .unwrap_err()
                .status,
            400
        );
    }
    use super::*;
    use crate::daemon::Config;
    use std::time::Duration;

    fn api(name: &str) -> (Api, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("tessera-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let m = Manager::open(&Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.clone(),
            pg_count: 16,
            heartbeat_grace: Duration::from_secs(5),
            down_out_after: Duration::from_secs(600),
            min_in_ratio: 0.75,
            replicas: 1,
            min_replicas: 1,
            failure_domain: tessera_wire::map::FailureDomain::Host,
        })
        .unwrap();
        (Api::new(Arc::new(m)), dir)
    }

    fn status(a: &Api, method: &str, path: &str, body: &str) -> u16 {
        a.route(method, path, body.as_bytes()).1.0
    }

    // Proves the router's status for each route and each kind of bad input,
    // and that error bodies are {"error": ...}.
    #[test]
    fn routes_and_errors() {
        let (a, dir) = api("routes");
        let reg = r#"{"node_uuid":"n","addr":"h:1","metrics_addr":null,"pid":1,
            "disks":[{"uuid":"d","path":"/x","capacity_bytes":1073741824}]}"#;
        let vol = r#"{"name":"a","size_bytes":1073741824}"#;
        assert_eq!(status(&a, "POST", "/v1/volumes", vol), 503);
        assert_eq!(status(&a, "POST", "/v1/nodes/register", reg), 200);
        assert_eq!(status(&a, "POST", "/v1/nodes/register", "{}"), 400);
        assert_eq!(status(&a, "POST", "/v1/nodes/register", "\u{0}"), 400);
        let hb = r#"{"disks":[],"volumes":[]}"#;
        assert_eq!(status(&a, "POST", "/v1/nodes/1/heartbeat", hb), 200);
        assert_eq!(status(&a, "POST", "/v1/nodes/x/heartbeat", hb), 400);
        assert_eq!(status(&a, "POST", "/v1/nodes/-1/heartbeat", hb), 400);
        assert_eq!(status(&a, "POST", "/v1/nodes/7/heartbeat", hb), 404);
        assert_eq!(status(&a, "POST", "/v1/volumes", vol), 201);
        assert_eq!(status(&a, "POST", "/v1/volumes", vol), 409);
        assert_eq!(status(&a, "GET", "/v1/volumes/a?x=1", ""), 200);
        assert_eq!(status(&a, "PUT", "/v1/volumes/a", ""), 405);
        assert_eq!(status(&a, "GET", "/v1/volumes/a/b", ""), 404);
        assert_eq!(status(&a, "GET", "/v1/flags", ""), 200);
        assert_eq!(status(&a, "PUT", "/v1/flags/noout", ""), 200);
        assert_eq!(status(&a, "DELETE", "/v1/flags/noout", ""), 200);
        assert_eq!(status(&a, "PUT", "/v1/flags/nodown", ""), 400);
        assert_eq!(status(&a, "POST", "/v1/flags/noout", ""), 405);
        assert_eq!(status(&a, "POST", "/v1/flags", ""), 405);
        assert_eq!(status(&a, "GET", "/", ""), 404);
        assert_eq!(
            status(&a, "PATCH", "/v1/volumes/a", r#"{"size_bytes":-1}"#),
            400
        );
        for p in [
            "/v1/map",
            "/v1/status",
            "/v1/nodes",
            "/v1/disks",
            "/v1/volumes",
        ] {
            assert_eq!(status(&a, "GET", p, ""), 200, "{p}");
        }
        let (_, (code, body)) = a.route("GET", "/v1/volumes/zz", b"");
        assert_eq!(code, 404);
        let e: ErrorBody = serde_json::from_slice(&body).unwrap();
        assert_eq!(e.error, r#"volume "zz" not found"#);
        let (_, (_, text)) = a.route("GET", "/metrics", b"");
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("tessera_manager_volumes 1"), "{text}");
        assert!(text.contains("tessera_manager_pgs_assigned 16"), "{text}");
        drop(a);
        std::fs::remove_dir_all(dir).ok();
    }
}

#[cfg(test)]
mod iscsi_tests {
    use super::*;
    use crate::daemon::Config;
    use std::time::Duration;

    // Proves the iSCSI routes: ACL and CHAP edits answer without secrets,
    // the gateway-only routes refuse requests without the cluster secret
    // (401) and serve the snapshot with the secrets to those that have it,
    // and reservation state round-trips through the snapshot.
    #[test]
    fn iscsi_routes() {
        let dir = std::env::temp_dir().join(format!("tessera-api-iscsi-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let m = Manager::open(&Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.clone(),
            pg_count: 16,
            heartbeat_grace: Duration::from_secs(5),
            down_out_after: Duration::from_secs(600),
            min_in_ratio: 0.75,
            replicas: 1,
            min_replicas: 1,
            failure_domain: tessera_wire::map::FailureDomain::Host,
        })
        .unwrap();
        let a = Api::new(Arc::new(m)).with_cluster_secret("s3cr3t-token".into());
        assert!(a.is_gateway(Some("Bearer s3cr3t-token")));
        assert!(!a.is_gateway(Some("Bearer s3cr3t-tokem")));
        assert!(!a.is_gateway(Some("s3cr3t-token")));
        assert!(!a.is_gateway(None));
        let reg = r#"{"node_uuid":"n","addr":"h:1","metrics_addr":null,"pid":1,
            "disks":[{"uuid":"d","path":"/x","capacity_bytes":1073741824}]}"#;
        let call = |method: &str, path: &str, body: &str, gw: bool| {
            let (_, (code, out)) = a.route_as(method, path, body.as_bytes(), gw);
            (code, String::from_utf8(out).unwrap())
        };
        assert_eq!(call("POST", "/v1/nodes/register", reg, false).0, 200);
        let vol = r#"{"name":"v","size_bytes":1073741824}"#;
        assert_eq!(call("POST", "/v1/volumes", vol, false).0, 201);
        let epoch = a.manager.map().epoch;
        let iqn = r#"{"iqn":"iqn.2000-01.x:Host1"}"#;
        let (code, body) = call("POST", "/v1/volumes/v/iscsi/initiators", iqn, false);
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("iqn.2000-01.x:host1"), "{body}");
        assert_eq!(
            call("POST", "/v1/volumes/v/iscsi/initiators", "{}", false).0,
            400
        );
        assert_eq!(
            call("POST", "/v1/volumes/w/iscsi/initiators", iqn, false).0,
            404
        );
        let chap = r#"{"user":"u","secret":"twelve-bytes","mutual_user":"t","mutual_secret":"other-secret"}"#;
        let (code, body) = call("PUT", "/v1/volumes/v/iscsi/chap", chap, false);
        assert_eq!(code, 200, "{body}");
        assert!(
            !body.contains("twelve") && !body.contains("other-secret"),
            "{body}"
        );
        let (_, info) = call("GET", "/v1/volumes/v/iscsi", "", false);
        assert!(
            info.contains("\"mutual_chap_user\": \"t\"") && !info.contains("twelve"),
            "{info}"
        );
        // Access control is not part of the map: no new epoch, no secret.
        assert_eq!(a.manager.map().epoch, epoch);
        let (_, map) = call("GET", "/v1/map", "", false);
        assert!(!map.contains("twelve") && !map.contains("host1"), "{map}");
        assert_eq!(call("GET", "/v1/iscsi/access", "", false).0, 401);
        let (code, snap) = call("GET", "/v1/iscsi/access", "", true);
        assert_eq!(code, 200);
        let s: tessera_wire::iscsi::AccessSnapshot = serde_json::from_str(&snap).unwrap();
        let c = s.volumes[0].access.chap.as_ref().unwrap();
        assert_eq!((c.secret.as_str(), s.volumes[0].id), ("twelve-bytes", 1));
        let st = r#"{"volume_id":1,"state":{"generation":2}}"#;
        assert_eq!(
            call("PUT", "/v1/volumes/v/iscsi/reservations", st, false).0,
            401
        );
        assert_eq!(
            call("PUT", "/v1/volumes/v/iscsi/reservations", st, true).0,
            200
        );
        let cas = r#"{"volume_id":1,"state":{"generation":3},"expected_version":0}"#;
        let (code, body) = call("PUT", "/v1/volumes/v/iscsi/reservations", cas, true);
        assert_eq!(code, 409);
        assert!(
            body.contains("\"version\": 1") && body.contains("\"generation\": 2"),
            "{body}"
        );
        let stale = r#"{"volume_id":9,"state":null}"#;
        assert_eq!(
            call("PUT", "/v1/volumes/v/iscsi/reservations", stale, true).0,
            409
        );
        let (_, snap) = call("GET", "/v1/iscsi/access", "", true);
        assert!(snap.contains("\"generation\": 2"), "{snap}");
        assert_eq!(
            call(
                "DELETE",
                "/v1/volumes/v/iscsi/initiators/iqn.2000-01.x:host1",
                "",
                false
            )
            .0,
            200
        );
        assert_eq!(
            call(
                "DELETE",
                "/v1/volumes/v/iscsi/initiators/iqn.2000-01.x:host1",
                "",
                false
            )
            .0,
            404
        );
        assert_eq!(call("DELETE", "/v1/volumes/v/iscsi/chap", "", false).0, 200);
        assert_eq!(call("PATCH", "/v1/volumes/v/iscsi/chap", "", false).0, 405);
        assert_eq!(call("POST", "/v1/iscsi/access", "", true).0, 405);
        let (code, body) = call("PUT", "/v1/iscsi/discovery-chap", chap, false);
        assert_eq!(code, 200, "{body}");
        assert!(
            body.contains("\"chap_user\": \"u\"") && !body.contains("twelve"),
            "{body}"
        );
        let (_, snap) = call("GET", "/v1/iscsi/access", "", true);
        let s: tessera_wire::iscsi::AccessSnapshot = serde_json::from_str(&snap).unwrap();
        assert_eq!(s.discovery_chap.unwrap().secret, "twelve-bytes");
        assert_eq!(call("PUT", "/v1/iscsi/discovery-chap", "{}", false).0, 400);
        let (code, body) = call("DELETE", "/v1/iscsi/discovery-chap", "", false);
        assert!(
            code == 200 && body.contains("\"chap_user\": null"),
            "{body}"
        );
        drop(a);
        std::fs::remove_dir_all(dir).ok();
    }
}
