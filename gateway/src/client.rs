//! Connections to storage daemons over the internal protocol
//! (`tessera_wire::header`).
//!
//! A connection opens with `Op::Hello` carrying the cluster id; then requests
//! are pipelined and replies arrive in any order, matched by request id. Each
//! connection has one writer task and one reader task; in-flight requests
//! live in a preallocated `Slab` of at most `STORAGE_INFLIGHT_MAX` entries.
//! A request id is `generation << 32 | slab key`, so a late reply to a
//! cancelled request can never be delivered to the request that reused its
//! slot. Every reply header is decoded with `Header::decode` and checked
//! against the request (op, id, length); read payloads are CRC-checked.
//!
//! Any framing or I/O failure kills the connection and fails every request
//! on it with `ConnError::Lost`; the `Pool` reconnects on next use. Retry
//! policy lives in `routing`, not here.

use slab::Slab;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tessera_wire::header::{HEADER_SIZE, open_payload, seal_payload};
use tessera_wire::{Header, Op, Status};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Requests in flight on one storage connection.
pub const STORAGE_INFLIGHT_MAX: usize = 512;
pub const CONNECT_TIMEOUT_MS: u64 = 2000;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConnError {
    #[error("connecting to {0}: {1}")]
    Connect(String, String),
    #[error("storage daemon refused the hello (other cluster or version)")]
    Refused,
    #[error("connection lost: {0}")]
    Lost(String),
    #[error("read payload failed its CRC32C")]
    PayloadCrc,
}

impl ConnError {
    /// Whether the same request may succeed on a new connection.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, ConnError::Refused)
    }
}

/// A validated reply: the header and, for a successful read, the data
/// (without its CRC).
#[derive(Debug)]
pub struct Reply {
    pub header: Header,
    pub data: Option<Vec<u8>>,
}

struct Pending {
    generation: u32,
    op: Op,
    length: u32,
    tx: oneshot::Sender<Result<Reply, ConnError>>,
}

struct Inflight {
    slab: Slab<Pending>,
    /// Set once, under the lock, when the connection dies.
    dead: Option<String>,
}

struct Outgoing {
    header: [u8; HEADER_SIZE],
    payload: Option<Arc<Vec<u8>>>,
}

pub struct Conn {
    addr: String,
    inflight: Mutex<Inflight>,
    generation: AtomicU32,
    permits: Semaphore,
    out: mpsc::Sender<Outgoing>,
}

/// Removes a request's slab entry if its caller gives up (timeout, client
/// gone) before the reply arrives.
struct SlotGuard<'a> {
    conn: &'a Conn,
    key: usize,
    generation: u32,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut g = self.conn.inflight.lock().expect("not poisoned");
        if g.slab
            .get(self.key)
            .is_some_and(|p| p.generation == self.generation)
        {
            g.slab.remove(self.key);
        }
    }
}

impl Conn {
    /// Connect, say Hello, and start the reader and writer tasks.
    /// A daemon on this host (a loopback address) is dialed over its Unix
    /// socket first (`unix_link`).
    pub async fn connect(addr: &str, cluster_id: &str, epoch: u64) -> Result<Arc<Conn>, ConnError> {
        let cerr = |e: String| ConnError::Connect(addr.to_string(), e);
        if let Some(mut stream) = crate::unix_link::connect(addr) {
            hello(addr, &mut stream, cluster_id, epoch).await?;
            let (rd, wr) = stream.into_split();
            return Ok(Conn::start(addr, "unix", rd, wr));
        }
        let mut stream = tokio::time::timeout(
            Duration::from_millis(CONNECT_TIMEOUT_MS),
            TcpStream::connect(addr),
        )
        .await
        .map_err(|_| cerr("timeout".into()))?
        .map_err(|e| cerr(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        hello(addr, &mut stream, cluster_id, epoch).await?;
        // The owned halves of a TCP stream need no lock between them.
        let (rd, wr) = stream.into_split();
        Ok(Conn::start(addr, "tcp", rd, wr))
    }

    /// Talk to a storage daemon in this process over an in-memory stream
    /// (`Local`): the same protocol, validation and tasks as over TCP, but
    /// no socket, no system call and no thread switch per request.
    pub async fn over_local(
        addr: &str,
        mut stream: tokio::io::DuplexStream,
        cluster_id: &str,
        epoch: u64,
    ) -> Result<Arc<Conn>, ConnError> {
        hello(addr, &mut stream, cluster_id, epoch).await?;
        let (rd, wr) = tokio::io::split(stream);
        Ok(Conn::start(addr, "in-process", rd, wr))
    }

    fn start<R, W>(addr: &str, via: &str, rd: R, wr: W) -> Arc<Conn>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(STORAGE_INFLIGHT_MAX);
        let conn = Arc::new(Conn {
            addr: addr.to_string(),
            inflight: Mutex::new(Inflight {
                slab: Slab::with_capacity(STORAGE_INFLIGHT_MAX),
                dead: None,
            }),
            generation: AtomicU32::new(1),
            permits: Semaphore::new(STORAGE_INFLIGHT_MAX),
            out: tx,
        });
        // The tasks hold weak references so that dropping the last handle
        // closes the connection.
        let weak = Arc::downgrade(&conn);
        tokio::spawn(async move {
            let e = read_replies(rd, &weak).await;
            if let Some(c) = weak.upgrade() {
                c.fail_all(e);
            }
        });
        let weak = Arc::downgrade(&conn);
        tokio::spawn(async move {
            if let Err(e) = write_requests(wr, rx).await
                && let Some(c) = weak.upgrade()
            {
                c.fail_all(format!("write: {e}"));
            }
        });
        tracing::info!(addr, via, "connected to storage daemon");
        conn
    }

    pub fn is_dead(&self) -> bool {
        self.inflight.lock().expect("not poisoned").dead.is_some()
    }

    fn fail_all(&self, why: String) {
        let mut g = self.inflight.lock().expect("not poisoned");
        if g.dead.is_none() {
            tracing::warn!(addr = %self.addr, reason = %why, "storage connection lost");
            g.dead = Some(why.clone());
        }
        for p in g.slab.drain() {
            let _ = p.tx.send(Err(ConnError::Lost(why.clone())));
        }
    }

    /// Send one request and wait for its validated reply. `header.request_id`
    /// is assigned here. `payload` is a sealed payload section (data + CRC).
    pub async fn call(
        &self,
        mut header: Header,
        payload: Option<Arc<Vec<u8>>>,
    ) -> Result<Reply, ConnError> {
        assert_eq!(
            payload.as_ref().map_or(0, |p| p.len()),
            header.payload_len as usize
        );
        let _permit = self.permits.acquire().await.expect("never closed");
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let key = {
            let mut g = self.inflight.lock().expect("not poisoned");
            if let Some(why) = &g.dead {
                return Err(ConnError::Lost(why.clone()));
            }
            // The permit bounds the slab: it never grows past its capacity.
            assert!(g.slab.len() < STORAGE_INFLIGHT_MAX);
            g.slab.insert(Pending {
                generation,
                op: header.op,
                length: header.length,
                tx,
            })
        };
        let _guard = SlotGuard {
            conn: self,
            key,
            generation,
        };
        header.request_id = (u64::from(generation) << 32) | key as u64;
        let msg = Outgoing {
            header: header.to_bytes(),
            payload,
        };
        if self.out.send(msg).await.is_err() {
            return Err(ConnError::Lost("writer stopped".into()));
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(ConnError::Lost("connection closed".into())),
        }
    }
}

/// Say Hello (cluster id) and check the daemon's answer.
async fn hello<S: AsyncRead + AsyncWrite + Unpin>(
    addr: &str,
    stream: &mut S,
    cluster_id: &str,
    epoch: u64,
) -> Result<(), ConnError> {
    let cerr = |e: String| ConnError::Connect(addr.to_string(), e);
    let mut payload = cluster_id.as_bytes().to_vec();
    seal_payload(&mut payload);
    let mut h = Header::request(Op::Hello, 0, epoch);
    h.payload_len = payload.len() as u32;
    let exchange = async {
        stream.write_all(&h.to_bytes()).await?;
        stream.write_all(&payload).await?;
        stream.flush().await?;
        let mut b = [0u8; HEADER_SIZE];
        stream.read_exact(&mut b).await?;
        let mut skip = vec![];
        let r = Header::decode(&b).map_err(std::io::Error::other)?;
        skip.resize(r.payload_len as usize, 0);
        stream.read_exact(&mut skip).await?;
        Ok::<Header, std::io::Error>(r)
    };
    let r = tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), exchange)
        .await
        .map_err(|_| cerr("hello timeout".into()))?
        .map_err(|e| cerr(e.to_string()))?;
    if r.op != Op::Hello || !r.reply {
        return Err(cerr(format!("unexpected hello reply {:?}", r.op)));
    }
    if r.status != Status::Ok {
        return Err(ConnError::Refused);
    }
    Ok(())
}

async fn write_requests<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Outgoing>,
) -> std::io::Result<()> {
    let mut batch: Vec<Outgoing> = Vec::new();
    let mut scratch = Vec::new();
    while let Some(m) = rx.recv().await {
        batch.push(m);
        // Gather what other ready tasks are about to send (see
        // nbd::session::write_replies).
        tokio::task::yield_now().await;
        while batch.len() < BATCH_MAX
            && let Ok(m) = rx.try_recv()
        {
            batch.push(m);
        }
        let mut g = crate::frameio::Gather::new(scratch);
        for m in &batch {
            g.push(&m.header);
            if let Some(p) = &m.payload {
                g.push(p);
            }
        }
        scratch = g.write_to(&mut w).await?;
        batch.clear();
    }
    Ok(())
}

/// Requests written by one `writev` at most.
const BATCH_MAX: usize = 256;

/// Read replies until the connection fails; returns why it did.
async fn read_replies<R: AsyncRead + Unpin>(rd: R, conn: &std::sync::Weak<Conn>) -> String {
    // One receive brings every reply the daemon sent together.
    let mut rd = tokio::io::BufReader::with_capacity(
        crate::frameio::READ_BUFFER_BYTES,
        crate::busy_poll::Noted(rd),
    );
    loop {
        let mut b = [0u8; HEADER_SIZE];
        if let Err(e) = rd.read_exact(&mut b).await {
            return format!("read: {e}");
        }
        let h = match Header::decode(&b) {
            Ok(h) => h,
            Err(e) => return format!("bad reply header: {e}"),
        };
        if !h.reply {
            return "request header where a reply was expected".into();
        }
        // decode bounded payload_len by PAYLOAD_MAX_BYTES.
        let mut section =
            match crate::frameio::read_payload(&mut rd, h.payload_len as usize, 0).await {
                Ok(v) => v,
                Err(e) => return format!("read payload: {e}"),
            };
        let Some(conn) = conn.upgrade() else {
            return "connection dropped".into();
        };
        let key = (h.request_id & 0xffff_ffff) as usize;
        let generation = (h.request_id >> 32) as u32;
        let mut g = conn.inflight.lock().expect("not poisoned");
        let matches = g.slab.get(key).is_some_and(|p| p.generation == generation);
        if !matches {
            // The caller gave up on this request; its reply is dropped.
            continue;
        }
        let p = g.slab.remove(key);
        drop(g);
        if h.op != p.op || (p.op.is_ranged() && h.length != p.length) {
            let why = format!(
                "reply {:?}/{} does not match request {:?}/{}",
                h.op, h.length, p.op, p.length
            );
            let _ = p.tx.send(Err(ConnError::Lost(why.clone())));
            return why;
        }
        // Read data and BlockStatus bitmaps are the payloads replies carry.
        let result = if matches!(h.op, Op::Read | Op::BlockStatus) && h.status == Status::Ok {
            match open_payload(&section) {
                Some(data) => {
                    let n = data.len();
                    section.truncate(n);
                    Ok(Reply {
                        header: h,
                        data: Some(section),
                    })
                }
                None => Err(ConnError::PayloadCrc),
            }
        } else {
            Ok(Reply {
                header: h,
                data: None,
            })
        };
        let _ = p.tx.send(result);
    }
}

/// The connection to one address; the async lock serialises reconnects.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<Conn>>>>;

/// Opens an in-memory connection to a storage daemon in this process.
pub type LocalConnect = Arc<dyn Fn() -> tokio::io::DuplexStream + Send + Sync>;

/// One connection per storage daemon address, (re)connected on demand.
pub struct Pool {
    cluster_id: String,
    conns: Mutex<HashMap<String, Slot>>,
    /// The address of a storage daemon in this process (the gateway
    /// embedded in `tessera-storage --nbd-listen`) and how to reach it
    /// without a socket.
    local: Option<(String, LocalConnect)>,
}

impl Pool {
    pub fn new(cluster_id: String) -> Pool {
        Pool {
            cluster_id,
            conns: Mutex::new(HashMap::new()),
            local: None,
        }
    }

    /// A pool that reaches the storage daemon advertised as `addr` through
    /// `connect` (in memory) and every other one over TCP.
    pub fn with_local(cluster_id: String, addr: String, connect: LocalConnect) -> Pool {
        Pool {
            local: Some((addr, connect)),
            ..Pool::new(cluster_id)
        }
    }

    /// A live connection to `addr`, connecting if there is none. Concurrent
    /// callers for one address share one connection attempt.
    pub async fn get(&self, addr: &str, epoch: u64) -> Result<Arc<Conn>, ConnError> {
        let slot = Arc::clone(
            self.conns
                .lock()
                .expect("not poisoned")
                .entry(addr.to_string())
                .or_default(),
        );
        let mut g = slot.lock().await;
        if let Some(c) = g.as_ref()
            && !c.is_dead()
        {
            return Ok(Arc::clone(c));
        }
        *g = None;
        let c = match &self.local {
            Some((local, connect)) if local == addr => {
                Conn::over_local(addr, connect(), &self.cluster_id, epoch).await?
            }
            _ => Conn::connect(addr, &self.cluster_id, epoch).await?,
        };
        *g = Some(Arc::clone(&c));
        Ok(c)
    }
}
