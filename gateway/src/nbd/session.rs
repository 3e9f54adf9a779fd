//! The NBD transmission phase over an async byte stream.
//!
//! One reader (this task) parses and validates requests; each accepted
//! request runs as its own task so requests complete concurrently; replies
//! go through one writer task, in completion order (proto.md "Transmission":
//! "Replies need not be sent in the same order as requests"). Replies are
//! framed as the handshake agreed ([`Terms`]): simple, structured or
//! extended.
//!
//! Limits: at most `inflight_max` requests per connection. A request holds a
//! permit from the moment its header is read until its reply is written, so
//! when the limit is reached the reader stops reading and TCP backpressure
//! reaches the client.
//!
//! Closing: NBD_CMD_DISC waits for in-flight requests and flushes their
//! replies (proto.md "NBD_CMD_DISC": "The server MUST handle all outstanding
//! requests"). A bad request magic, an undrainable payload or the client
//! going away ends the connection at once and aborts in-flight requests;
//! writes are idempotent, so an aborted one is like a write cut by a crash.

use super::codec::{self, Command, Frames, Geometry, Payload, ReplyMode, Segment, Terms};
use crate::metrics::Metrics;
use crate::volume::{Volume, VolumeError};
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;

/// Default in-flight requests per connection.
pub const INFLIGHT_MAX: usize = 128;
/// How long queued replies may take to drain after a protocol error.
const PROTOCOL_ERROR_FLUSH_MS: u64 = 1000;
/// Receive buffer of a connection: see `frameio::READ_BUFFER_BYTES` (write
/// payloads larger than what it holds are read straight into place).
pub const READ_BUFFER_BYTES: usize = crate::frameio::READ_BUFFER_BYTES;
/// WRITE_ZEROES with NO_HOLE writes real zero blocks, this many bytes per
/// volume write (the storage daemons' zeroing would deallocate them).
const ZERO_WRITE_PIECE_BYTES: u64 = 1 << 20;

/// Map a volume error to an NBD errno (proto.md "Error values"). The only
/// place this mapping exists.
pub fn errno_of(e: &VolumeError) -> u32 {
    match e {
        VolumeError::Io
        | VolumeError::Checksum
        | VolumeError::Timeout
        | VolumeError::Gone
        | VolumeError::Miscompare(_) => codec::NBD_EIO,
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

/// The message sent with an error chunk (structured and extended replies).
fn errno_message(errno: u32) -> &'static str {
    match errno {
        codec::NBD_EPERM => "operation not permitted",
        codec::NBD_EIO => "I/O error",
        codec::NBD_EINVAL => "invalid request",
        codec::NBD_ENOSPC => "beyond the end of the export or no space left",
        codec::NBD_EOVERFLOW => "request too large",
        codec::NBD_ENOTSUP => "not supported (zeroing would not be fast)",
        codec::NBD_ESHUTDOWN => "the gateway is shutting down",
        _ => "error",
    }
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// NBD_CMD_DISC: every reply was sent.
    Disconnect,
    /// The client closed or reset the connection.
    ClientGone,
    /// The client broke the protocol (bad magic, undrainable payload).
    ProtocolError,
}

struct Reply {
    frames: Frames,
    /// READ data the frames' `Segment::Data` ranges refer to.
    data: Option<Vec<u8>>,
    /// Released once the reply is written: bounds in-flight work and memory.
    _permit: OwnedSemaphorePermit,
}

/// What a command produced, before framing.
enum Outcome {
    Done,
    Data(Vec<u8>),
    /// `base:allocation` descriptors.
    Status(Vec<(u64, u32)>),
}

/// Serve the transmission phase until the client disconnects.
pub async fn run<R, W>(
    mut reader: tokio::io::BufReader<R>,
    writer: W,
    volume: Arc<dyn Volume>,
    metrics: Arc<Metrics>,
    inflight_max: usize,
    terms: Terms,
) -> End
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    assert!(inflight_max > 0);
    let permits = Arc::new(Semaphore::new(inflight_max));
    let (tx, rx) = mpsc::channel::<Reply>(inflight_max);
    let mut writer_task = tokio::spawn(write_replies(writer, rx));
    let mut tasks = JoinSet::new();
    let header_bytes = terms.request_header_bytes();
    let end = loop {
        // Reap finished request tasks so the set does not grow.
        while tasks.try_join_next().is_some() {}
        let permit = Arc::clone(&permits)
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let mut hb = [0u8; codec::EXTENDED_REQUEST_HEADER_BYTES];
        let hb = &mut hb[..header_bytes];
        if reader.read_exact(hb).await.is_err() {
            break End::ClientGone;
        }
        let Ok(h) = terms.decode_request(hb) else {
            tracing::debug!("bad request magic; closing");
            break End::ProtocolError;
        };
        let geometry = Geometry {
            size_bytes: volume.size_bytes(),
            block_size: volume.block_size(),
        };
        let cmd = match codec::check_request(&h, &geometry, &terms) {
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
                let frames = codec::reply_error(
                    terms.mode,
                    h.cookie,
                    h.offset,
                    rej.errno,
                    errno_message(rej.errno),
                );
                let reply = Reply {
                    frames,
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
                // Room for the internal protocol's payload CRC, so a write
                // that stays in one chunk is sent on without a copy.
                let payload = crate::frameio::read_payload(&mut reader, length as usize, 4).await;
                let Ok(data) = payload else {
                    break End::ClientGone;
                };
                Some(data)
            }
            _ => None,
        };
        let (vol, tx, metrics) = (Arc::clone(&volume), tx.clone(), Arc::clone(&metrics));
        tasks.spawn(async move {
            metrics.inflight.inc();
            let started = Instant::now();
            let label = label_of(&cmd);
            let r = execute(vol.as_ref(), cmd, payload, &metrics).await;
            metrics.requests.with_label_values(&[label]).inc();
            metrics
                .latency
                .with_label_values(&[label])
                .observe(started.elapsed().as_secs_f64());
            let mode = terms.mode;
            let (frames, data) = match r {
                Ok(Outcome::Done) => (codec::reply_ok(mode, h.kind, h.cookie, h.offset), None),
                Ok(Outcome::Data(d)) => {
                    let df = matches!(cmd, Command::Read { df: true, .. });
                    let f = codec::reply_read(mode, h.cookie, h.offset, &d, df);
                    (f, Some(d))
                }
                Ok(Outcome::Status(s)) => {
                    let f = codec::reply_block_status(
                        mode,
                        h.cookie,
                        h.offset,
                        codec::BASE_ALLOCATION_ID,
                        &s,
                    );
                    (f, None)
                }
                Err(errno) => {
                    metrics.errors.with_label_values(&[errno_name(errno)]).inc();
                    let f =
                        codec::reply_error(mode, h.cookie, h.offset, errno, errno_message(errno));
                    (f, None)
                }
            };
            metrics.inflight.dec();
            // A closed channel means the connection is gone: nothing to do.
            let _ = tx
                .send(Reply {
                    frames,
                    data,
                    _permit: permit,
                })
                .await;
        });
    };
    match end {
        End::Disconnect => {
            while tasks.join_next().await.is_some() {}
            drop(tx);
            let _ = writer_task.await;
        }
        End::ProtocolError => {
            // Replies already queued (say, the EINVAL of the request before
            // the garbage) still go out, briefly, so the client can tell why
            // it was cut off.
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            drop(tx);
            let grace = std::time::Duration::from_millis(PROTOCOL_ERROR_FLUSH_MS);
            if tokio::time::timeout(grace, &mut writer_task).await.is_err() {
                writer_task.abort();
            }
        }
        End::ClientGone => {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            writer_task.abort();
        }
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
        Command::Cache { .. } => "cache",
        Command::BlockStatus { .. } => "block_status",
        Command::Disconnect => "disc",
        Command::Noop => "noop",
    }
}

/// Cut an effect range into pieces the volume API takes (32-bit lengths),
/// each a multiple of the block size.
fn effect_pieces(offset: u64, length: u64, piece_max: u64) -> impl Iterator<Item = (u64, u32)> {
    assert!(piece_max > 0 && piece_max <= u64::from(u32::MAX));
    let end = offset + length;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let n = (end - pos).min(piece_max);
        let p = (pos, n as u32);
        pos += n;
        Some(p)
    })
}

/// Run one validated command against the volume; `Err` is an NBD errno.
async fn execute(
    vol: &dyn Volume,
    cmd: Command,
    payload: Option<Vec<u8>>,
    metrics: &Metrics,
) -> Result<Outcome, u32> {
    let failed = |e: VolumeError| {
        tracing::debug!(error = %e, "request failed");
        errno_of(&e)
    };
    match cmd {
        Command::Read { offset, length, .. } => {
            let data = vol.read(offset, length).await.map_err(failed)?;
            // A short or long buffer would desynchronise the stream.
            assert_eq!(data.len(), length as usize);
            metrics.bytes_read.inc_by(u64::from(length));
            Ok(Outcome::Data(data))
        }
        Command::Write { offset, fua, .. } => {
            let data = payload.expect("write has a payload");
            let n = data.len() as u64;
            vol.write(offset, data, fua).await.map_err(failed)?;
            metrics.bytes_written.inc_by(n);
            Ok(Outcome::Done)
        }
        Command::Flush => {
            vol.flush().await.map_err(failed)?;
            Ok(Outcome::Done)
        }
        Command::Trim {
            offset,
            length,
            fua,
        } => {
            for (o, l) in effect_pieces(offset, length, codec::EFFECT_PIECE_MAX_BYTES) {
                vol.trim(o, l, fua).await.map_err(failed)?;
            }
            Ok(Outcome::Done)
        }
        Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole,
            fast,
        } => {
            // Storage zeroing deallocates whole blocks, so NO_HOLE means
            // writing zero blocks as data: as slow as a WRITE, hence
            // ENOTSUP under FAST_ZERO ("MUST fail quickly with NBD_ENOTSUP
            // unless the request can be serviced in less time than a
            // corresponding NBD_CMD_WRITE"), before touching anything.
            if fast && (no_hole || !vol.zeroes_are_fast()) {
                return Err(codec::NBD_ENOTSUP);
            }
            if no_hole {
                for (o, l) in effect_pieces(offset, length, ZERO_WRITE_PIECE_BYTES) {
                    vol.write(o, vec![0u8; l as usize], fua)
                        .await
                        .map_err(failed)?;
                }
            } else {
                for (o, l) in effect_pieces(offset, length, codec::EFFECT_PIECE_MAX_BYTES) {
                    vol.write_zeroes(o, l, fua).await.map_err(failed)?;
                }
            }
            Ok(Outcome::Done)
        }
        // The gateway holds no data and the storage daemons read with
        // O_DIRECT: there is no cache to warm. "Even when this command
        // reports success, there is no guarantee of an actual performance
        // gain"; the range was validated.
        Command::Cache { .. } => Ok(Outcome::Done),
        Command::BlockStatus {
            offset,
            length,
            req_one,
        } => {
            // The length is a hint: scan at most BLOCK_STATUS_SCAN_MAX_BYTES.
            let scan = length.min(codec::BLOCK_STATUS_SCAN_MAX_BYTES);
            let extents = vol.allocation(offset, scan).await.map_err(failed)?;
            let covered: u64 = extents.iter().map(|e| e.length).sum();
            if covered != scan {
                tracing::warn!(covered, scan, "allocation map does not cover the range");
                return Err(codec::NBD_EIO);
            }
            Ok(Outcome::Status(codec::allocation_descriptors(
                extents.iter().map(|e| (e.length, e.allocated)),
                req_one,
                length,
            )))
        }
        Command::Noop => Ok(Outcome::Done),
        Command::Disconnect => unreachable!("handled by the reader"),
    }
}

/// Read and drop `n` payload bytes of a rejected request.
async fn discard<R: AsyncRead + Unpin>(reader: &mut R, n: u32) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut reader.take(u64::from(n)), &mut tokio::io::sink()).await?;
    if copied != u64::from(n) {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// The single writer: replies in completion order, batched while more are
/// queued, written with one `writev` per batch (payloads are not copied
/// into a write buffer) when the queue is momentarily empty.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Reply>,
) -> std::io::Result<()> {
    let mut batch: Vec<Reply> = Vec::new();
    let mut scratch = Vec::new();
    while let Some(r) = rx.recv().await {
        batch.push(r);
        // Let the request tasks that are ready finish first, so one send
        // carries every reply they produce: on loopback a send costs more
        // than the request itself. Returns at once when nothing else is
        // ready, so a lone request is not delayed.
        tokio::task::yield_now().await;
        while batch.len() < BATCH_REPLIES_MAX
            && let Ok(r) = rx.try_recv()
        {
            batch.push(r);
        }
        let mut g = crate::frameio::Gather::new(scratch);
        for r in &batch {
            gather_one(&mut g, r);
        }
        scratch = g.write_to(&mut w).await?;
        // Dropping the replies releases their permits.
        batch.clear();
    }
    w.shutdown().await
}

/// Replies written by one `writev` at most (each is 1-3 iovec entries).
const BATCH_REPLIES_MAX: usize = 128;

fn gather_one<'a>(g: &mut crate::frameio::Gather<'a>, r: &'a Reply) {
    for s in &r.frames.segments {
        match s {
            Segment::Head(range) => g.push(&r.frames.bytes[range.clone()]),
            Segment::Data(range) => {
                let d = r.data.as_ref().expect("data segments come with data");
                g.push(&d[range.clone()]);
            }
        }
    }
}

/// The reply format is fixed per connection; exposed for the server's logs.
pub fn mode_name(m: ReplyMode) -> &'static str {
    match m {
        ReplyMode::Simple => "simple",
        ReplyMode::Structured => "structured",
        ReplyMode::Extended => "extended",
    }
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

    // Proves 64-bit effect ranges are cut into contiguous pieces that fit
    // the volume API and cover the range exactly.
    #[test]
    fn effect_ranges_are_split() {
        let p: Vec<_> = effect_pieces(512, 3 << 30, 1 << 30).collect();
        assert_eq!(
            p,
            vec![
                (512, 1 << 30),
                (512 + (1 << 30), 1 << 30),
                (512 + (2 << 30), 1 << 30)
            ]
        );
        assert_eq!(effect_pieces(0, 4096, 1 << 20).count(), 1);
        assert_eq!(effect_pieces(0, 0, 1 << 20).count(), 0);
    }
}
