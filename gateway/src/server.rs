//! The one socket loop: accepts NBD connections, runs the handshake state
//! machine over each, then hands the socket to the transmission session.
//!
//! Limits: at most `connections_max` connections (extra ones are accepted
//! and closed at once, so clients fail fast instead of hanging in the
//! backlog); a handshake must finish within `handshake_timeout`. A
//! misbehaving client only ever loses its own connection.

use crate::metrics::Metrics;
use crate::nbd::codec;
use crate::nbd::handshake::{self, Agreed, ExportInfo, Exports, Handshake, Progress};
use crate::nbd::session;
use crate::volume::{Capabilities, Catalog, Volume};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

/// Default maximum of concurrent NBD connections.
pub const CONNECTIONS_MAX: usize = 256;
/// Default time a client has to finish option haggling.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
const HANDSHAKE_READ_BYTES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub connections_max: usize,
    pub inflight_max: usize,
    pub handshake_timeout_ms: u64,
    /// Advertised maximum payload and TLS mode.
    pub handshake: handshake::Config,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            connections_max: CONNECTIONS_MAX,
            inflight_max: session::INFLIGHT_MAX,
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS,
            handshake: handshake::Config::default(),
        }
    }
}

/// Transmission flags for a volume's capabilities (proto.md "Transmission
/// flags"), before negotiation adds NBD_FLAG_SEND_DF. CAN_MULTI_CONN is only
/// claimed when flush reaches every disk, so a flush on one connection
/// covers writes completed on any other. SEND_CACHE: CACHE is validated and
/// acknowledged (there is no cache to fill). SEND_FAST_ZERO goes with
/// WRITE_ZEROES: a zeroing that would be slow fails fast with ENOTSUP.
pub fn transmission_flags(c: Capabilities) -> u16 {
    let mut f = codec::NBD_FLAG_HAS_FLAGS | codec::NBD_FLAG_SEND_CACHE;
    if c.flush {
        f |= codec::NBD_FLAG_SEND_FLUSH;
    }
    if c.fua {
        f |= codec::NBD_FLAG_SEND_FUA;
    }
    if c.trim {
        f |= codec::NBD_FLAG_SEND_TRIM;
    }
    if c.write_zeroes {
        f |= codec::NBD_FLAG_SEND_WRITE_ZEROES | codec::NBD_FLAG_SEND_FAST_ZERO;
    }
    if c.multi_conn && c.flush {
        f |= codec::NBD_FLAG_CAN_MULTI_CONN;
    }
    f
}

fn export_info(v: &dyn Volume) -> ExportInfo {
    ExportInfo {
        name: v.name().to_string(),
        size_bytes: v.size_bytes(),
        block_size: v.block_size(),
        flags: transmission_flags(v.capabilities()),
        description: Some(v.description().unwrap_or_else(|| {
            format!(
                "Tessera volume {} ({}-byte blocks)",
                v.name(),
                v.block_size()
            )
        })),
    }
}

/// The catalogue seen by the handshake. Remembers the last volume it opened
/// so that GO enters transmission on exactly the volume it described.
struct CatalogExports<'a> {
    catalog: &'a dyn Catalog,
    last: Mutex<Option<Arc<dyn Volume>>>,
}

impl Exports for CatalogExports<'_> {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let v = self.catalog.open(name)?;
        let info = export_info(v.as_ref());
        *self.last.lock().expect("not poisoned") = Some(v);
        Some(info)
    }

    fn names(&self) -> Vec<String> {
        self.catalog.names()
    }
}

/// Accept connections until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    catalog: Arc<dyn Catalog>,
    metrics: Arc<Metrics>,
    config: Config,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(config.connections_max));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: keep serving existing clients.
                tracing::warn!(error = %e, "accept failed");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(%peer, max = config.connections_max, "connection limit reached; closing");
            drop(stream);
            continue;
        };
        let (catalog, metrics) = (Arc::clone(&catalog), Arc::clone(&metrics));
        tokio::spawn(async move {
            metrics.connections.inc();
            let r = connection(stream, catalog.as_ref(), &metrics, config).await;
            tracing::debug!(%peer, outcome = ?r, "connection closed");
            metrics.connections.dec();
            drop(slot);
        });
    }
}

/// Why a connection ended.
#[derive(Debug)]
pub enum Outcome {
    HandshakeFailed(String),
    Aborted,
    Session(session::End),
}

async fn connection(
    mut stream: TcpStream,
    catalog: &dyn Catalog,
    metrics: &Arc<Metrics>,
    config: Config,
) -> Outcome {
    // Replies are small and latency-bound; never wait for Nagle.
    let _ = stream.set_nodelay(true);
    let timeout = Duration::from_millis(config.handshake_timeout_ms);
    let exports = CatalogExports {
        catalog,
        last: Mutex::new(None),
    };
    let hs = handshake(&mut stream, &exports, config.handshake);
    let (agreed, leftover) = match tokio::time::timeout(timeout, hs).await {
        Err(_) => return Outcome::HandshakeFailed("timeout".into()),
        Ok(Err(e)) => return Outcome::HandshakeFailed(e),
        Ok(Ok(None)) => return Outcome::Aborted,
        Ok(Ok(Some(l))) => l,
    };
    tracing::debug!(
        export = %agreed.export.name,
        replies = session::mode_name(agreed.terms.mode),
        block_status = agreed.terms.block_status,
        "transmission phase"
    );
    metrics
        .handshakes
        .with_label_values(&[session::mode_name(agreed.terms.mode)])
        .inc();
    let volume = exports
        .last
        .lock()
        .expect("not poisoned")
        .take()
        .expect("a successful handshake looked its export up");
    let (r, w) = stream.into_split();
    // Bytes the client pipelined after its final option belong to the
    // transmission phase.
    // Buffered, so one receive brings every request the client pipelined.
    let reader = tokio::io::BufReader::with_capacity(
        session::READ_BUFFER_BYTES,
        std::io::Cursor::new(leftover).chain(r),
    );
    Outcome::Session(
        session::run(
            reader,
            w,
            volume,
            Arc::clone(metrics),
            config.inflight_max,
            agreed.terms,
        )
        .await,
    )
}

/// Drive the handshake; `Some((terms, leftover bytes))` when transmission
/// begins, `None` when the client aborted or left.
async fn handshake(
    stream: &mut TcpStream,
    exports: &CatalogExports<'_>,
    config: handshake::Config,
) -> Result<Option<(Agreed, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let mut hs = Handshake::new(&mut out, config);
    let mut buf = Vec::new();
    let mut tmp = [0u8; HANDSHAKE_READ_BYTES];
    loop {
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(|e| e.to_string())?;
            out.clear();
        }
        let n = stream.read(&mut tmp).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&tmp[..n]);
        let (used, progress) = hs
            .advance(&buf, exports, &mut out)
            .map_err(|e| e.to_string())?;
        buf.drain(..used);
        match progress {
            Progress::NeedBytes(_) => {}
            Progress::Done(agreed) => {
                stream.write_all(&out).await.map_err(|e| e.to_string())?;
                return Ok(Some((*agreed, buf)));
            }
            Progress::StartTls => return Err("STARTTLS without a TLS configuration".into()),
            Progress::Abort => {
                let _ = stream.write_all(&out).await;
                let _ = stream.shutdown().await;
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves the advertised flags for a full-featured volume are exactly
    // HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_WRITE_ZEROES|
    // CAN_MULTI_CONN|SEND_CACHE|SEND_FAST_ZERO, and that FAST_ZERO never
    // comes without WRITE_ZEROES.
    #[test]
    fn flags_for_full_volume() {
        assert_eq!(transmission_flags(Capabilities::ALL), 0x0d6d);
        let no_zero = Capabilities {
            write_zeroes: false,
            ..Capabilities::ALL
        };
        assert_eq!(
            transmission_flags(no_zero) & codec::NBD_FLAG_SEND_FAST_ZERO,
            0
        );
    }
}
