//! The one socket loop: accepts NBD connections, runs the handshake state
//! machine over each, then hands the socket to the transmission session.
//!
//! Limits: at most `connections_max` connections (extra ones are accepted
//! and closed at once, so clients fail fast instead of hanging in the
//! backlog); a handshake must finish within `handshake_timeout`. A
//! misbehaving client only ever loses its own connection.

use crate::busy_poll::Noted;
use crate::metrics::Metrics;
use crate::nbd::codec;
use crate::nbd::handshake::{self, Agreed, ExportInfo, Exports, Handshake, Progress};
use crate::nbd::session;
use crate::volume::{Capabilities, Catalog, Volume};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

/// Default maximum of concurrent NBD connections.
pub const CONNECTIONS_MAX: usize = 256;
/// Default time a client has to finish option haggling.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
const HANDSHAKE_READ_BYTES: usize = 4096;

#[derive(Clone)]
pub struct Config {
    pub connections_max: usize,
    pub inflight_max: usize,
    pub handshake_timeout_ms: u64,
    /// Advertised maximum payload and TLS mode.
    pub handshake: handshake::Config,
    /// The certificate for NBD_OPT_STARTTLS; `Some` exactly when
    /// `handshake.tls` is not `TlsMode::Off`.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            connections_max: CONNECTIONS_MAX,
            inflight_max: session::INFLIGHT_MAX,
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS,
            handshake: handshake::Config::default(),
            tls: None,
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
    assert_eq!(
        config.tls.is_some(),
        config.handshake.tls != handshake::TlsMode::Off
    );
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
        let (catalog, metrics, config) =
            (Arc::clone(&catalog), Arc::clone(&metrics), config.clone());
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

/// The connection's byte stream after the handshake: plain TCP, or TLS
/// after NBD_OPT_STARTTLS.
enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<Prefixed<TcpStream>>>),
}

async fn connection(
    stream: TcpStream,
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
    let hs = negotiate(stream, &exports, &config);
    let (agreed, leftover, transport) = match tokio::time::timeout(timeout, hs).await {
        Err(_) => return Outcome::HandshakeFailed("timeout".into()),
        Ok(Err(e)) => return Outcome::HandshakeFailed(e),
        Ok(Ok(None)) => return Outcome::Aborted,
        Ok(Ok(Some(l))) => l,
    };
    tracing::debug!(
        export = %agreed.export.name,
        replies = session::mode_name(agreed.terms.mode),
        block_status = agreed.terms.block_status,
        tls = agreed.tls,
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
    let (metrics, inflight, terms) = (Arc::clone(metrics), config.inflight_max, agreed.terms);
    // Bytes the client pipelined after its final option belong to the
    // transmission phase.
    // Buffered, so one receive brings every request the client pipelined.
    let prefix = std::io::Cursor::new(leftover);
    let end = match transport {
        Transport::Plain(s) => {
            let (r, w) = s.into_split();
            let reader = tokio::io::BufReader::with_capacity(
                session::READ_BUFFER_BYTES,
                prefix.chain(Noted(r)),
            );
            session::run(reader, w, volume, metrics, inflight, terms).await
        }
        Transport::Tls(s) => {
            let (r, w) = tokio::io::split(*s);
            let reader = tokio::io::BufReader::with_capacity(
                session::READ_BUFFER_BYTES,
                prefix.chain(Noted(r)),
            );
            session::run(reader, w, volume, metrics, inflight, terms).await
        }
    };
    Outcome::Session(end)
}

/// Run the handshake, upgrading to TLS when the state machine says so.
/// `Some((agreed, leftover bytes, transport))` when transmission begins,
/// `None` when the client aborted or left.
async fn negotiate(
    mut stream: TcpStream,
    exports: &CatalogExports<'_>,
    config: &Config,
) -> Result<Option<(Agreed, Vec<u8>, Transport)>, String> {
    let mut out = Vec::new();
    let mut hs = Handshake::new(&mut out, config.handshake);
    let leftover = match drive(&mut stream, &mut hs, exports, out).await? {
        Driven::Gone => return Ok(None),
        Driven::Done(a, left) => return Ok(Some((a, left, Transport::Plain(stream)))),
        Driven::StartTls(left) => left,
    };
    let acceptor = config
        .tls
        .clone()
        .ok_or("STARTTLS acknowledged without a TLS configuration")?;
    // Anything read past the STARTTLS option is the start of the TLS
    // handshake.
    let mut tls = acceptor
        .accept(Prefixed::new(leftover, stream))
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    match drive(&mut tls, &mut hs, exports, Vec::new()).await? {
        Driven::Gone => Ok(None),
        Driven::Done(a, left) => Ok(Some((a, left, Transport::Tls(Box::new(tls))))),
        // The state machine refuses a second STARTTLS.
        Driven::StartTls(_) => Err("second STARTTLS".into()),
    }
}

enum Driven {
    Done(Agreed, Vec<u8>),
    StartTls(Vec<u8>),
    Gone,
}

/// Feed the handshake from `stream` until it ends or asks for TLS; `out`
/// holds bytes to send first (the greeting).
async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    hs: &mut Handshake,
    exports: &CatalogExports<'_>,
    mut out: Vec<u8>,
) -> Result<Driven, String> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; HANDSHAKE_READ_BYTES];
    loop {
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(|e| e.to_string())?;
            stream.flush().await.map_err(|e| e.to_string())?;
            out.clear();
        }
        let n = stream.read(&mut tmp).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(Driven::Gone);
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
                stream.flush().await.map_err(|e| e.to_string())?;
                return Ok(Driven::Done(*agreed, buf));
            }
            Progress::StartTls => {
                stream.write_all(&out).await.map_err(|e| e.to_string())?;
                stream.flush().await.map_err(|e| e.to_string())?;
                return Ok(Driven::StartTls(buf));
            }
            Progress::Abort => {
                let _ = stream.write_all(&out).await;
                let _ = stream.shutdown().await;
                return Ok(Driven::Gone);
            }
        }
    }
}

/// A stream whose first reads return `prefix`: bytes already read from the
/// socket that belong to the next layer (the TLS handshake).
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Prefixed<S> {
        Prefixed {
            prefix,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Load a PEM certificate chain and private key into a TLS acceptor
/// (rustls, TLS 1.2 and 1.3, no client certificates).
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves a prefixed stream yields the prefix first, in pieces as small
    // as the reader asks for, then the inner stream, and passes writes
    // through: the TLS acceptor sees bytes read before STARTTLS completed.
    #[tokio::test]
    async fn prefixed_stream() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(64);
        let mut p = Prefixed::new(b"hello ".to_vec(), a);
        b.write_all(b"world").await.unwrap();
        drop(b);
        let mut first = [0u8; 3];
        p.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"hel");
        let mut rest = Vec::new();
        p.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"lo world");
        let (a, mut b) = tokio::io::duplex(64);
        let mut p = Prefixed::new(Vec::new(), a);
        p.write_all(b"x").await.unwrap();
        let mut got = [0u8; 1];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"x");
    }

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
