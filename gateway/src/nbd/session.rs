//! The NBD transmission phase over an async byte stream.
//!
//! One reader (this task) parses and validates requests; each accepted
//! request runs as its own task so requests complete concurrently; replies
//! go through one writer task, in completion order (proto.md "Transmission":
//! "Replies need not be sent in the same order as requests").
//!
//! Limits: at most `inflight_max` requests per connection. A request holds a
//! permit from the moment its header is read until its reply is written, so
//! when the limit is reached the reader stops reading and TCP backpressure
//! reaches the client.
//!
//! Closing: NBD_CMD_DISC waits for in-flight requests and flushes their
//! replies (proto.md "NBD_CMD_DISC": "The server MUST handle all outstanding
//! requests"). A bad request magic, an unframeable payload or the client
//! going away ends the connection at once and aborts in-flight requests;
//! writes are idempotent, so an aborted one is like a write cut by a crash.

use super::codec::{self, Command, Geometry, Payload, RequestHeader};
use crate::metrics::Metrics;
use crate::volume::{Volume, VolumeError};
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;

/// Default in-flight requests per connection.
pub const INFLIGHT_MAX: usize = 128;
/// Buffer of the reply writer: small replies are batched into one send.
const WRITE_BUFFER_BYTES: usize = 256 * 1024;

/// Map a volume error to an NBD errno (proto.md "Error values"). The only
/// place this mapping exists.
pub fn errno_of(e: &VolumeError) -> u32 {
    match e {
        VolumeError::Io | VolumeError::Checksum | VolumeError::Timeout | VolumeError::Gone => {
            codec::NBD_EIO
        }
        VolumeError::Invalid(_) => codec::NBD_EINVAL,
        VolumeError::NoSpace => codec::NBD_ENOSPC,
        VolumeError::NotSupported => codec::NBD_ENOTSUP,
        VolumeError::ShuttingDown => codec::NBD_ESHUTDOWN,
    }
}

/// A bounded label value for an errno.
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        codec::NBD_EPERM => "EPERM",
        codec::NBD_EIO => "EIO",
        codec::NBD_ENOMEM => "ENOMEM",
        codec::NBD_EINVAL => "EINVAL",
        codec::NBD_ENOSPC => "ENOSPC",
        codec::NBD_EOVERFLOW => "EOVERFLOW",
        codec::NBD_ENOTSUP => "ENOTSUP",
        codec::NBD_ESHUTDOWN => "ESHUTDOWN",
        _ => "other",
    }
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// NBD_CMD_DISC: every reply was sent.
    Disconnect,
    /// The client closed or reset the connection.
    ClientGone,
    /// The client broke the protocol (bad magic, unframeable payload).
    ProtocolError,
}

struct Reply {
    cookie: u64,
    errno: u32,
    data: Option<Vec<u8>>,
    /// Released once the reply is written: bounds in-flight work and memory.
    _permit: OwnedSemaphorePermit,
}

/// Serve the transmission phase until the client disconnects.
pub async fn run<R, W>(
    mut reader: R,
    writer: W,
    volume: Arc<dyn Volume>,
    metrics: Arc<Metrics>,
    inflight_max: usize,
) -> End
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    assert!(inflight_max > 0);
    let permits = Arc::new(Semaphore::new(inflight_max));
    let (tx, rx) = mpsc::channel::<Reply>(inflight_max);
    let writer_task = tokio::spawn(write_replies(writer, rx));
    let mut tasks = JoinSet::new();
    let end = loop {
        // Reap finished request tasks so the set does not grow.
        while tasks.try_join_next().is_some() {}
        let permit = Arc::clone(&permits)
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let mut hb = [0u8; codec::REQUEST_HEADER_BYTES];
        if reader.read_exact(&mut hb).await.is_err() {
            break End::ClientGone;
        }
        let Ok(h) = RequestHeader::decode(&hb) else {
            tracing::debug!("bad request magic; closing");
            break End::ProtocolError;
        };
        let geometry = Geometry {
            size_bytes: volume.size_bytes(),
            block_size: volume.block_size(),
        };
        let cmd = match codec::check_request(&h, &geometry) {
            Ok(cmd) => cmd,
            Err(rej) => {
                match rej.payload {
                    Payload::None => {}
                    Payload::Discard(n) => {
                        if discard(&mut reader, n).await.is_err() {
                            break End::ClientGone;
                        }
                    }
                    Payload::Close => break End::ProtocolError,
                }
                metrics.requests.with_label_values(&["rejected"]).inc();
                metrics
                    .errors
                    .with_label_values(&[errno_name(rej.errno)])
                    .inc();
                let reply = Reply {
                    cookie: h.cookie,
                    errno: rej.errno,
                    data: None,
                    _permit: permit,
                };
                if tx.send(reply).await.is_err() {
                    break End::ClientGone;
                }
                continue;
            }
        };
        let payload = match cmd {
            Command::Disconnect => break End::Disconnect,
            Command::Write { length, .. } => {
                let mut data = vec![0u8; length as usize];
                if reader.read_exact(&mut data).await.is_err() {
                    break End::ClientGone;
                }
                Some(data)
            }
            _ => None,
        };
        let (vol, tx, metrics) = (Arc::clone(&volume), tx.clone(), Arc::clone(&metrics));
        tasks.spawn(async move {
            metrics.inflight.inc();
            let started = Instant::now();
            let label = label_of(&cmd);
            let (errno, data) = execute(vol.as_ref(), cmd, payload, &metrics).await;
            metrics.requests.with_label_values(&[label]).inc();
            metrics
                .latency
                .with_label_values(&[label])
                .observe(started.elapsed().as_secs_f64());
            if errno != codec::NBD_OK {
                metrics.errors.with_label_values(&[errno_name(errno)]).inc();
            }
            metrics.inflight.dec();
            // A closed channel means the connection is gone: nothing to do.
            let _ = tx
                .send(Reply {
                    cookie: h.cookie,
                    errno,
                    data,
                    _permit: permit,
                })
                .await;
        });
    };
    if end == End::Disconnect {
        while tasks.join_next().await.is_some() {}
        drop(tx);
        let _ = writer_task.await;
    } else {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        writer_task.abort();
    }
    end
}

fn label_of(cmd: &Command) -> &'static str {
    match cmd {
        Command::Read { .. } => "read",
        Command::Write { .. } => "write",
        Command::Flush => "flush",
        Command::Trim { .. } => "trim",
        Command::WriteZeroes { .. } => "write_zeroes",
        Command::Disconnect => "disc",
        Command::Noop => "noop",
    }
}

/// Run one validated command against the volume.
async fn execute(
    vol: &dyn Volume,
    cmd: Command,
    payload: Option<Vec<u8>>,
    metrics: &Metrics,
) -> (u32, Option<Vec<u8>>) {
    let r = match cmd {
        Command::Read { offset, length } => match vol.read(offset, length).await {
            Ok(data) => {
                // A short or long buffer would desynchronise the stream.
                assert_eq!(data.len(), length as usize);
                metrics.bytes_read.inc_by(u64::from(length));
                return (codec::NBD_OK, Some(data));
            }
            Err(e) => Err(e),
        },
        Command::Write { offset, fua, .. } => {
            let data = payload.expect("write has a payload");
            let n = data.len() as u64;
            let r = vol.write(offset, data, fua).await;
            if r.is_ok() {
                metrics.bytes_written.inc_by(n);
            }
            r
        }
        Command::Flush => vol.flush().await,
        Command::Trim {
            offset,
            length,
            fua,
        } => vol.trim(offset, length, fua).await,
        Command::WriteZeroes {
            offset,
            length,
            fua,
        } => vol.write_zeroes(offset, length, fua).await,
        Command::Noop => Ok(()),
        Command::Disconnect => unreachable!("handled by the reader"),
    };
    match r {
        Ok(()) => (codec::NBD_OK, None),
        Err(e) => {
            tracing::debug!(error = %e, "request failed");
            (errno_of(&e), None)
        }
    }
}

/// Read and drop `n` payload bytes of a rejected write.
async fn discard<R: AsyncRead + Unpin>(reader: &mut R, n: u32) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut reader.take(u64::from(n)), &mut tokio::io::sink()).await?;
    if copied != u64::from(n) {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// The single writer: replies in completion order, batched while more are
/// queued, flushed when the queue is momentarily empty.
async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::Receiver<Reply>,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER_BYTES, writer);
    while let Some(r) = rx.recv().await {
        write_one(&mut w, &r).await?;
        while let Ok(r) = rx.try_recv() {
            write_one(&mut w, &r).await?;
        }
        w.flush().await?;
    }
    w.shutdown().await
}

async fn write_one<W: AsyncWrite + Unpin>(w: &mut W, r: &Reply) -> std::io::Result<()> {
    // proto.md "Simple reply message": data follows only a successful READ.
    assert!(r.data.is_none() || r.errno == codec::NBD_OK);
    w.write_all(&codec::encode_simple_reply(r.errno, r.cookie))
        .await?;
    if let Some(d) = &r.data {
        w.write_all(d).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves the one errno mapping covers every volume error as documented.
    #[test]
    fn errno_mapping() {
        assert_eq!(errno_of(&VolumeError::Io), codec::NBD_EIO);
        assert_eq!(errno_of(&VolumeError::Checksum), codec::NBD_EIO);
        assert_eq!(errno_of(&VolumeError::Timeout), codec::NBD_EIO);
        assert_eq!(errno_of(&VolumeError::Gone), codec::NBD_EIO);
        assert_eq!(
            errno_of(&VolumeError::Invalid("x".into())),
            codec::NBD_EINVAL
        );
        assert_eq!(errno_of(&VolumeError::NoSpace), codec::NBD_ENOSPC);
        assert_eq!(errno_of(&VolumeError::NotSupported), codec::NBD_ENOTSUP);
        assert_eq!(errno_of(&VolumeError::ShuttingDown), codec::NBD_ESHUTDOWN);
    }
}
