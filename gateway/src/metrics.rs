//! The gateway's Prometheus metrics: a fixed set with bounded label values
//! (command names and errno names only), and the `/metrics` HTTP endpoint on
//! its own thread so scraping never competes with the I/O runtime.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use std::net::SocketAddr;
use std::sync::Arc;

pub struct Metrics {
    pub registry: Registry,
    /// NBD requests by command (read, write, flush, trim, write_zeroes, ...).
    pub requests: IntCounterVec,
    pub bytes_read: IntCounter,
    pub bytes_written: IntCounter,
    /// Request latency in seconds by command.
    pub latency: HistogramVec,
    /// Error replies by errno name.
    pub errors: IntCounterVec,
    pub connections: IntGauge,
    pub inflight: IntGauge,
    /// Internal-protocol retries by reason.
    pub storage_retries: IntCounterVec,
    /// NBD handshakes that reached transmission, by reply format
    /// (simple, structured, extended).
    pub handshakes: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new_custom(Some("tessera_gateway".into()), None)
            .expect("valid registry prefix");
        let requests = IntCounterVec::new(
            Opts::new("nbd_requests_total", "NBD requests by command"),
            &["cmd"],
        )
        .expect("valid metric");
        let bytes_read =
            IntCounter::new("nbd_read_bytes_total", "Bytes read by NBD clients").expect("valid");
        let bytes_written =
            IntCounter::new("nbd_written_bytes_total", "Bytes written by NBD clients")
                .expect("valid");
        let latency = HistogramVec::new(
            HistogramOpts::new("nbd_request_seconds", "NBD request latency by command").buckets(
                vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
            ),
            &["cmd"],
        )
        .expect("valid metric");
        let errors = IntCounterVec::new(
            Opts::new("nbd_errors_total", "NBD error replies by errno"),
            &["errno"],
        )
        .expect("valid metric");
        let connections =
            IntGauge::new("nbd_connections", "Open NBD connections").expect("valid metric");
        let inflight =
            IntGauge::new("nbd_inflight_requests", "NBD requests in flight").expect("valid metric");
        let storage_retries = IntCounterVec::new(
            Opts::new(
                "storage_retries_total",
                "Storage requests retried, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let handshakes = IntCounterVec::new(
            Opts::new(
                "nbd_handshakes_total",
                "NBD handshakes that reached transmission, by reply format",
            ),
            &["replies"],
        )
        .expect("valid metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(bytes_read.clone()),
            Box::new(bytes_written.clone()),
            Box::new(latency.clone()),
            Box::new(errors.clone()),
            Box::new(connections.clone()),
            Box::new(inflight.clone()),
            Box::new(storage_retries.clone()),
            Box::new(handshakes.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Arc::new(Metrics {
            registry,
            requests,
            bytes_read,
            bytes_written,
            latency,
            errors,
            connections,
            inflight,
            storage_retries,
            handshakes,
        })
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("exposition is UTF-8")
    }

    /// Serve `/metrics` on `addr` from a background thread; returns the bound
    /// address (port 0 allowed).
    pub fn serve(self: &Arc<Self>, addr: &str) -> std::io::Result<SocketAddr> {
        let server = tiny_http::Server::http(addr).map_err(std::io::Error::other)?;
        let bound = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| std::io::Error::other("metrics listener has no IP address"))?;
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for req in server.incoming_requests() {
                    let resp = if req.url() == "/metrics" {
                        let h = tiny_http::Header::from_bytes(
                            &b"Content-Type"[..],
                            &b"text/plain; version=0.0.4"[..],
                        )
                        .expect("valid header");
                        tiny_http::Response::from_string(me.render()).with_header(h)
                    } else {
                        tiny_http::Response::from_string("not found\n").with_status_code(404)
                    };
                    let _ = req.respond(resp);
                }
            })?;
        Ok(bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves every metric is registered and rendered under the gateway prefix.
    #[test]
    fn renders() {
        let m = Metrics::new();
        m.requests.with_label_values(&["read"]).inc();
        m.errors.with_label_values(&["EIO"]).inc();
        m.latency.with_label_values(&["read"]).observe(0.001);
        let text = m.render();
        assert!(text.contains("tessera_gateway_nbd_requests_total{cmd=\"read\"} 1"));
        assert!(text.contains("tessera_gateway_nbd_connections 0"));
        assert!(text.contains("tessera_gateway_nbd_errors_total{errno=\"EIO\"} 1"));
    }
}
