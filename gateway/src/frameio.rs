//! Moving frames between sockets and memory with as few copies as the
//! kernel allows. Used by every stream that carries block data: NBD
//! (client <-> gateway), the internal protocol on both ends (gateway <->
//! storage daemon, and storage daemon <-> storage daemon).
//!
//! Why: profiles of 128 KiB reads showed user-space copies as the largest
//! cost after the kernel's own (storage daemon and gateway each spent about
//! a quarter of their samples in `memmove`): every payload went through a
//! read buffer on the way in and a write buffer on the way out. Here a
//! large payload is read straight from the socket into its final vector,
//! and written with `writev` straight from where it lies; small pieces
//! (headers, 4 KiB payloads) are still gathered so one system call carries
//! a whole batch.

use std::io::IoSlice;
use std::ops::Range;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// Read buffer of every framed stream. Small enough that a large payload is
/// mostly read straight into place (a buffer fill takes whatever the socket
/// holds, so with 256 KiB most of a 128 KiB payload landed in the buffer
/// and was copied out: 9 % of the gateway's samples), large enough that one
/// receive still brings several 4 KiB frames.
pub const READ_BUFFER_BYTES: usize = 32 * 1024;

/// Payload bytes still to read above which they bypass the read buffer: a
/// direct read costs a system call of its own, which a 4 KiB payload would
/// not repay, while a 128 KiB one saves its copy.
pub const DIRECT_READ_MIN: usize = 16 * 1024;

/// Pieces at least this long are written from where they lie; shorter ones
/// are copied into the batch's staging buffer (an iovec entry costs about
/// what copying a few hundred bytes does).
pub const BORROW_MIN: usize = 2048;

/// At most this many iovec entries per `writev` (Linux's IOV_MAX is 1024).
const IOVECS_MAX: usize = 512;

/// Read exactly `n` bytes into a new vector with room for `spare` more (a
/// caller that appends a trailer, like the internal protocol's payload CRC,
/// then never reallocates). What the buffer already holds is copied from
/// it; a large remainder is read from the socket straight into the vector.
/// Never reads past the `n` bytes, so the next frame stays in the buffer.
pub async fn read_payload<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    n: usize,
    spare: usize,
) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::with_capacity(n + spare);
    while v.len() < n {
        let buffered = rd.buffer();
        if !buffered.is_empty() {
            let k = buffered.len().min(n - v.len());
            v.extend_from_slice(&buffered[..k]);
            rd.consume(k);
            continue;
        }
        let left = n - v.len();
        let got = if left >= DIRECT_READ_MIN {
            // The buffer is empty: nothing is skipped by reading around it.
            (&mut *rd.get_mut())
                .take(left as u64)
                .read_buf(&mut v)
                .await?
        } else {
            let more = rd.fill_buf().await?;
            let k = more.len().min(left);
            v.extend_from_slice(&more[..k]);
            rd.consume(k);
            k
        };
        if got == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(v)
}

/// One batch of frames for a single `writev`: small pieces copied into a
/// staging buffer, large ones borrowed from their owners.
pub struct Gather<'a> {
    staged: Vec<u8>,
    parts: Vec<Part<'a>>,
    open: usize,
}

enum Part<'a> {
    Staged(Range<usize>),
    Borrowed(&'a [u8]),
}

impl<'a> Gather<'a> {
    /// `staged` is scratch memory reused across batches (it is cleared).
    pub fn new(mut staged: Vec<u8>) -> Gather<'a> {
        staged.clear();
        Gather {
            staged,
            parts: Vec::new(),
            open: 0,
        }
    }

    /// Append `b` to the batch.
    pub fn push(&mut self, b: &'a [u8]) {
        if b.len() >= BORROW_MIN {
            self.close();
            self.parts.push(Part::Borrowed(b));
        } else {
            self.staged.extend_from_slice(b);
        }
    }

    fn close(&mut self) {
        if self.staged.len() > self.open {
            self.parts.push(Part::Staged(self.open..self.staged.len()));
            self.open = self.staged.len();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty() && self.staged.is_empty()
    }

    /// Write the whole batch, then hand the staging buffer back for reuse.
    pub async fn write_to<W: AsyncWrite + Unpin>(mut self, w: &mut W) -> std::io::Result<Vec<u8>> {
        self.close();
        let mut slices: Vec<IoSlice<'_>> = self
            .parts
            .iter()
            .map(|p| match p {
                Part::Staged(r) => IoSlice::new(&self.staged[r.clone()]),
                Part::Borrowed(b) => IoSlice::new(b),
            })
            .collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let k = rest.len().min(IOVECS_MAX);
            let n = w.write_vectored(&rest[..k]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut rest, n);
        }
        w.flush().await?;
        drop(slices);
        Ok(self.staged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves read_payload returns exactly the payload whatever mix of
    // buffered and direct reads it takes, leaves the next frame in the
    // buffer, and reserves the spare room.
    #[tokio::test]
    async fn read_payload_splits_frames_exactly() {
        for n in [
            0usize,
            1,
            4096,
            DIRECT_READ_MIN - 1,
            DIRECT_READ_MIN,
            200_000,
        ] {
            for cap in [8usize, 4096, 64 * 1024] {
                let mut stream: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
                stream.extend_from_slice(b"NEXT");
                let mut rd = BufReader::with_capacity(cap, &stream[..]);
                // Put part of the payload into the buffer first, as a
                // header read would.
                let _ = rd.fill_buf().await.unwrap();
                let v = read_payload(&mut rd, n, 4).await.unwrap();
                assert_eq!(v[..], stream[..n], "n={n} cap={cap}");
                assert!(v.capacity() >= n + 4);
                let mut next = Vec::new();
                rd.read_to_end(&mut next).await.unwrap();
                assert_eq!(next, b"NEXT");
            }
        }
        let mut rd = BufReader::new(&b"short"[..]);
        assert!(read_payload(&mut rd, 6, 0).await.is_err());
    }

    // Proves a gathered batch writes every piece, in order, whatever the
    // sizes, even through a writer that takes a few bytes at a time.
    #[tokio::test]
    async fn gather_writes_pieces_in_order() {
        let big: Vec<u8> = (0..100_000).map(|i| (i % 253) as u8).collect();
        let pieces: Vec<&[u8]> = vec![b"head", &big[..5000], b"x", &big, b"", b"tail"];
        let mut g = Gather::new(Vec::new());
        for p in &pieces {
            g.push(p);
        }
        let (mut a, mut b) = tokio::io::duplex(100);
        let want: Vec<u8> = pieces.concat();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            got
        });
        let scratch = g.write_to(&mut a).await.unwrap();
        drop(a);
        assert_eq!(reader.await.unwrap(), want);
        // Many small pieces: more than one writev's worth of iovecs.
        let smalls: Vec<Vec<u8>> = (0..2000).map(|i| vec![i as u8; 3000]).collect();
        let mut g = Gather::new(scratch);
        for s in &smalls {
            g.push(s);
        }
        let mut out = Vec::new();
        g.write_to(&mut out).await.unwrap();
        assert_eq!(out, smalls.concat());
    }
}
