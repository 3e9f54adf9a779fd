//! Page-aligned I/O buffers, as O_DIRECT requires.
//!
//! An [`AlignedBuf`] owns its memory; an I/O operation takes the buffer by
//! value and its completion hands it back, so the kernel never writes into
//! memory that Rust code can reach meanwhile.
#![allow(unsafe_code)]

use std::alloc::{Layout, alloc, alloc_zeroed, dealloc};
use std::mem::MaybeUninit;
use std::ptr::NonNull;
use std::sync::Arc;
use tokio::io::{AsyncRead, BufReader, ReadBuf};

/// Alignment of every buffer and of every disk offset used with O_DIRECT.
pub const ALIGN: usize = 4096;

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// `None`: the buffer owns its allocation. `Some`: a read-only view of
    /// part of a shared [`Payload`] buffer (so a write goes to the disk
    /// straight from the bytes that came from the socket); the view never
    /// hands out `&mut` and frees nothing itself.
    owner: Option<Arc<AlignedBuf>>,
}

// SAFETY: AlignedBuf uniquely owns its allocation, like a Box<[u8]>, or is
// a read-only view kept alive by an `Arc` of its owner.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes; `len` must be a non-zero multiple of
    /// [`ALIGN`].
    pub fn zeroed(len: usize) -> AlignedBuf {
        assert!(len > 0);
        assert!(len.is_multiple_of(ALIGN));
        let layout = Layout::from_size_align(len, ALIGN).expect("valid layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            len,
            owner: None,
        }
    }

    /// A buffer for the kernel to fill, not zeroed first (zeroing 128 KiB
    /// per read showed as 4-6 % of a daemon's samples).
    ///
    /// # Safety
    /// The contents are uninitialised: the caller must hand the buffer to
    /// an operation that writes every byte through its raw pointer (an
    /// io_uring read) and must not look at it (no `Deref`) unless that
    /// operation completed successfully with its full length.
    pub unsafe fn for_kernel_read(len: usize) -> AlignedBuf {
        assert!(len > 0);
        assert!(len.is_multiple_of(ALIGN));
        let layout = Layout::from_size_align(len, ALIGN).expect("valid layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            len,
            owner: None,
        }
    }

    /// A buffer holding `parts` one after another, written once (no
    /// zeroing first: this is the write path's only copy of the data). The
    /// total length must be a non-zero multiple of [`ALIGN`].
    pub fn from_parts(parts: &[&[u8]]) -> AlignedBuf {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        assert!(len > 0);
        assert!(len.is_multiple_of(ALIGN));
        let layout = Layout::from_size_align(len, ALIGN).expect("valid layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        let mut at = 0;
        for p in parts {
            // SAFETY: `at + p.len() <= len` (the parts sum to len), the
            // regions do not overlap (fresh allocation), and every byte of
            // the allocation is written before the buffer is returned.
            unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), raw.add(at), p.len()) };
            at += p.len();
        }
        debug_assert_eq!(at, len);
        AlignedBuf {
            ptr,
            len,
            owner: None,
        }
    }

    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(data.len().next_multiple_of(ALIGN).max(ALIGN));
        b[..data.len()].copy_from_slice(data);
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// # Panics
    /// On a view of a shared buffer (read-only).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        assert!(self.owner.is_none(), "a shared view is read-only");
        self.ptr.as_ptr()
    }

    /// Read exactly `len` bytes from `rd` into a new buffer (its length
    /// rounded up to [`ALIGN`], the padding zeroed), without zeroing it
    /// first and without a copy through the reader's buffer beyond what it
    /// already holds: tokio's `BufReader` reads a request larger than its
    /// buffer straight into the destination.
    pub async fn read_exact_from<R: AsyncRead + Unpin>(
        rd: &mut BufReader<R>,
        len: usize,
    ) -> std::io::Result<AlignedBuf> {
        let size = len.next_multiple_of(ALIGN).max(ALIGN);
        // SAFETY: nothing reads the buffer before every byte is written:
        // the socket fills `..len` (or the function returns an error and
        // drops the buffer unread), the padding is zeroed below.
        let mut buf = unsafe { AlignedBuf::for_kernel_read(size) };
        // SAFETY: ptr is valid for `size` bytes and uniquely owned; viewing
        // uninitialised memory as MaybeUninit is always sound.
        let dst: &mut [MaybeUninit<u8>] = unsafe {
            std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<MaybeUninit<u8>>(), size)
        };
        let mut rb = ReadBuf::uninit(&mut dst[..len]);
        while rb.remaining() > 0 {
            let before = rb.filled().len();
            std::future::poll_fn(|cx| std::pin::Pin::new(&mut *rd).poll_read(cx, &mut rb)).await?;
            if rb.filled().len() == before {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        for b in &mut dst[len..] {
            b.write(0);
        }
        Ok(buf)
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes, initialised (zeroed or fully
        // written at allocation),
        // and uniquely owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        assert!(self.owner.is_none(), "a shared view is read-only");
        // SAFETY: as in deref, and &mut self guarantees exclusivity (an
        // owned buffer: views are refused above).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.owner.is_some() {
            return; // a view: the owner frees the memory
        }
        let layout = Layout::from_size_align(self.len, ALIGN).expect("valid layout");
        // SAFETY: allocated in `zeroed` or `from_parts` with this exact layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// The data of a write on its way to the disk: one aligned buffer shared
/// (by reference count) by everyone who needs the bytes — the local engine,
/// the links to the replicas, a write deferred behind another — so an
/// O_DIRECT write goes to the disk straight from the bytes read off the
/// socket. Copying each 128 KiB write into an aligned buffer was 7 % of a
/// storage daemon's samples, and checking the wire CRC and computing the
/// per-block CRCs were two passes over the data where one does: the
/// per-4 KiB CRCs are computed once, kept here, and the whole payload's
/// CRC is combined from them.
#[derive(Clone, Default)]
pub struct Payload {
    buf: Option<Arc<AlignedBuf>>,
    len: usize,
    /// CRC32C of each whole 4 KiB block of the data from its start, when
    /// computed.
    block_crcs: Option<Arc<[u32]>>,
}

impl Payload {
    /// Wrap a buffer holding `len` bytes of data (the rest is padding).
    pub fn new(buf: AlignedBuf, len: usize) -> Payload {
        assert!(len <= buf.len());
        assert!(buf.owner.is_none());
        Payload {
            buf: (len > 0).then(|| Arc::new(buf)),
            len,
            block_crcs: None,
        }
    }

    /// A copy of `data` in an aligned buffer.
    pub fn copy_from(data: &[u8]) -> Payload {
        if data.is_empty() {
            return Payload::default();
        }
        Payload::new(AlignedBuf::from_slice(data), data.len())
    }

    /// A read's bytes as a payload: the disk buffer itself when the read
    /// filled one from its start (a recovery push of contiguous blocks:
    /// no copy), else one copy into a new aligned buffer.
    pub fn from_read(mut data: ReadData) -> Payload {
        if data.is_empty() {
            return Payload::default();
        }
        let len = data.len();
        if let [Piece::Disk { start: 0, .. }] = data.pieces[..]
            && let Some(Piece::Disk { buf, .. }) = data.pieces.pop()
            && buf.owner.is_none()
        {
            return Payload::new(buf, len);
        }
        let mut buf = AlignedBuf::zeroed(len.next_multiple_of(ALIGN));
        let mut at = 0;
        for s in data.slices() {
            buf[at..at + s.len()].copy_from_slice(s);
            at += s.len();
        }
        Payload::new(buf, len)
    }

    /// Read exactly `len` bytes of data from `rd` into a new payload
    /// (`AlignedBuf::read_exact_from`), computing its per-block CRCs; also
    /// returns the CRC of the whole data, combined from them.
    pub async fn read_from<R: AsyncRead + Unpin>(
        rd: &mut BufReader<R>,
        len: usize,
    ) -> std::io::Result<(Payload, u32)> {
        let mut p = Payload::new(AlignedBuf::read_exact_from(rd, len).await?, len);
        let crc = p.compute_block_crcs();
        Ok((p, crc))
    }

    /// Compute the CRC32C of every whole 4 KiB block (one pass over the
    /// data) and return the CRC of the whole data, combined from them and
    /// the tail's.
    pub fn compute_block_crcs(&mut self) -> u32 {
        let whole = self.len / ALIGN;
        let crcs: Arc<[u32]> = self.chunks_exact(ALIGN).map(tessera_wire::crc32c).collect();
        debug_assert_eq!(crcs.len(), whole);
        self.block_crcs = Some(crcs);
        let crc = self.crc_append(0);
        debug_assert_eq!(crc, tessera_wire::crc32c(self));
        crc
    }

    /// Continue the CRC32C `acc` over the data: from the per-block CRCs
    /// when they were computed (no pass over the data), else over it.
    pub fn crc_append(&self, acc: u32) -> u32 {
        match &self.block_crcs {
            Some(crcs) => {
                let crc = crcs
                    .iter()
                    .fold(acc, |a, c| tessera_wire::crc32c_append_4k(a, *c));
                tessera_wire::crc32c_append(crc, &self[crcs.len() * ALIGN..])
            }
            None => tessera_wire::crc32c_append(acc, self),
        }
    }

    /// The CRC32C of the 4 KiB block at byte `at` of the data, from the
    /// ones computed earlier when `at` is block-aligned, else computed now.
    pub fn block_crc(&self, at: usize) -> u32 {
        if at.is_multiple_of(ALIGN)
            && let Some(c) = self.block_crcs.as_ref().and_then(|c| c.get(at / ALIGN))
        {
            return *c;
        }
        tessera_wire::crc32c(&self[at..at + ALIGN])
    }

    /// A read-only view of `len` bytes from `start` for a disk write, with
    /// no copy; `None` unless both are multiples of [`ALIGN`] (O_DIRECT).
    pub fn view(&self, start: usize, len: usize) -> Option<AlignedBuf> {
        let buf = self.buf.as_ref()?;
        if !start.is_multiple_of(ALIGN)
            || !len.is_multiple_of(ALIGN)
            || len == 0
            || start + len > buf.len()
        {
            return None;
        }
        // SAFETY: in bounds of the owner's allocation (checked above).
        let ptr = unsafe { NonNull::new_unchecked(buf.ptr.as_ptr().add(start)) };
        Some(AlignedBuf {
            ptr,
            len,
            owner: Some(buf.clone()),
        })
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.buf {
            Some(b) => &b[..self.len],
            None => &[],
        }
    }
}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Payload {
        Payload::copy_from(&v)
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        **self == **other
    }
}

impl Eq for Payload {}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Payload({} bytes)", self.len)
    }
}

/// The bytes a read returns, as a list of pieces in order: slices of the
/// disk buffers the reads filled (no zeroed vector and no copy into one:
/// for 128 KiB reads that copy of data fresh from the disk was a quarter
/// of the daemon's time), runs of zeroes for holes, or a vector. The
/// socket writer hands the pieces to one `writev`, so the kernel's own
/// copy into the socket is the only one. Also, when the engine could
/// derive it from the blocks' stored CRCs, the CRC32C of the bytes (so the
/// wire's payload CRC needs no second pass over them).
pub struct ReadData {
    pieces: Vec<Piece>,
    len: usize,
    crc: Option<u32>,
}

pub enum Piece {
    Vec(Vec<u8>),
    Disk {
        buf: AlignedBuf,
        start: usize,
        len: usize,
    },
    Zeroes(usize),
}

/// Shared source of zeroes for holes.
static ZEROES: [u8; 128 * 1024] = [0; 128 * 1024];

impl Piece {
    fn len(&self) -> usize {
        match self {
            Piece::Vec(v) => v.len(),
            Piece::Disk { len, .. } | Piece::Zeroes(len) => *len,
        }
    }
}

impl ReadData {
    pub fn from_pieces(pieces: Vec<Piece>) -> ReadData {
        for p in &pieces {
            if let Piece::Disk { buf, start, len } = p {
                assert!(start + len <= buf.len());
            }
        }
        let len = pieces.iter().map(Piece::len).sum();
        ReadData {
            pieces,
            len,
            crc: None,
        }
    }

    pub fn zeroes(len: usize) -> ReadData {
        ReadData::from_pieces(vec![Piece::Zeroes(len)])
    }

    /// Record the bytes' CRC32C, computed by the caller without reading
    /// them again. Checked in debug builds.
    pub fn with_crc(mut self, crc: u32) -> ReadData {
        debug_assert_eq!(crc, self.computed_crc());
        self.crc = Some(crc);
        self
    }

    /// The CRC32C of the bytes: the one recorded, or computed over them.
    pub fn crc32c(&self) -> u32 {
        self.crc.unwrap_or_else(|| self.computed_crc())
    }

    fn computed_crc(&self) -> u32 {
        // Continuing from the CRC of nothing (0) is the CRC of the slices.
        self.slices().fold(0, tessera_wire::crc32c_append)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes as consecutive slices (holes as slices of a shared zero
    /// buffer), for a vectored write.
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> {
        self.pieces.iter().flat_map(|p| {
            let (whole, zero): (&[u8], usize) = match p {
                Piece::Vec(v) => (v, 0),
                Piece::Disk { buf, start, len } => (&buf[*start..*start + *len], 0),
                Piece::Zeroes(n) => (&[], *n),
            };
            let zeroes = (0..zero.div_ceil(ZEROES.len())).map(move |i| {
                let n = (zero - i * ZEROES.len()).min(ZEROES.len());
                &ZEROES[..n]
            });
            std::iter::once(whole)
                .filter(|w| !w.is_empty())
                .chain(zeroes)
        })
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len);
        for s in self.slices() {
            v.extend_from_slice(s);
        }
        v
    }

    pub fn into_vec(mut self) -> Vec<u8> {
        if self.pieces.len() == 1
            && let Piece::Vec(v) = &mut self.pieces[0]
        {
            return std::mem::take(v);
        }
        self.to_vec()
    }
}

impl Default for ReadData {
    fn default() -> ReadData {
        Vec::new().into()
    }
}

impl From<Vec<u8>> for ReadData {
    fn from(v: Vec<u8>) -> ReadData {
        ReadData::from_pieces(vec![Piece::Vec(v)])
    }
}

impl PartialEq for ReadData {
    fn eq(&self, other: &ReadData) -> bool {
        self.len == other.len && self.to_vec() == other.to_vec()
    }
}

impl Eq for ReadData {}

impl std::fmt::Debug for ReadData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ReadData({} bytes in {} pieces)",
            self.len,
            self.pieces.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves buffers are aligned, zeroed and sized as asked.
    #[test]
    fn aligned_and_zeroed() {
        let b = AlignedBuf::zeroed(8192);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
        let p = AlignedBuf::from_parts(&[&[1u8; 4096][..], &[2u8; 4096][..]]);
        assert_eq!(p.len(), 8192);
        assert_eq!(p.as_ptr() as usize % ALIGN, 0);
        assert!(p[..4096].iter().all(|&x| x == 1) && p[4096..].iter().all(|&x| x == 2));
        let c = AlignedBuf::from_slice(b"abc");
        assert_eq!(c.len(), 4096);
        assert_eq!(&c[..3], b"abc");
        // A view into a disk buffer compares by content with a vector.
        // Pieces of disk buffers and holes read as one run of bytes.
        let d = ReadData::from_pieces(vec![
            Piece::Disk {
                buf: p,
                start: 4000,
                len: 200,
            },
            Piece::Zeroes(300_000),
            Piece::Vec(vec![7, 8]),
        ]);
        let mut want = vec![1u8; 96];
        want.extend_from_slice(&[2u8; 104]);
        want.extend_from_slice(&vec![0u8; 300_000]);
        want.extend_from_slice(&[7, 8]);
        assert_eq!(d.len(), want.len());
        assert_eq!(d.crc32c(), tessera_wire::crc32c(&want));
        assert_eq!(d, ReadData::from(want.clone()));
        assert_eq!(d.into_vec(), want);
    }

    // Proves a payload read from a stream holds exactly the bytes sent,
    // whether they came through the reader's buffer, straight from the
    // stream, or both, with its padding zeroed, and that the next frame's
    // bytes stay in the reader.
    #[test]
    fn payload_reads_exactly_its_bytes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let data: Vec<u8> = (0..70_000u32).map(|i| (i * 7 + i / 4096) as u8).collect();
        for cap in [16, 4096, 65536, 200_000] {
            for n in [1, 512, 4096, 5000, 65536, 70_000 - 3] {
                rt.block_on(async {
                    let mut stream = data.clone();
                    stream.extend_from_slice(b"next");
                    // A prefix already buffered, as after reading a header.
                    let mut rd = BufReader::with_capacity(cap, &stream[..]);
                    let buf = AlignedBuf::read_exact_from(&mut rd, n).await.expect("read");
                    assert_eq!(&buf[..n], &data[..n]);
                    assert!(buf[n..].iter().all(|b| *b == 0));
                    assert_eq!(buf.len(), n.next_multiple_of(ALIGN));
                    let mut p = Payload::new(buf, n);
                    assert_eq!(p.compute_block_crcs(), tessera_wire::crc32c(&data[..n]));
                    let mut rest = Vec::new();
                    tokio::io::AsyncReadExt::read_to_end(&mut rd, &mut rest)
                        .await
                        .expect("rest");
                    assert_eq!(&rest[..], &[&data[n..], &b"next"[..]].concat()[..]);
                });
            }
        }
        // A stream that ends early is an error, never a short payload.
        rt.block_on(async {
            let mut rd = BufReader::with_capacity(64, &data[..100]);
            assert!(AlignedBuf::read_exact_from(&mut rd, 4096).await.is_err());
        });
    }

    // Proves views share the payload's bytes, refuse unaligned ranges and
    // are read-only, and block CRCs match a direct computation.
    #[test]
    fn payload_views_and_block_crcs() {
        let data: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i % 251) as u8).collect();
        let mut p = Payload::copy_from(&data);
        assert_eq!(&p[..], &data[..]);
        assert_eq!(p.block_crc(4096), tessera_wire::crc32c(&data[4096..8192]));
        p.compute_block_crcs();
        for at in [0, 4096, 8192, 512] {
            assert_eq!(p.block_crc(at), tessera_wire::crc32c(&data[at..at + 4096]));
        }
        assert_eq!(p.crc_append(7), tessera_wire::crc32c_append(7, &data));
        let v = p.view(4096, 8192).expect("aligned view");
        assert_eq!(&v[..], &data[4096..12288]);
        assert_eq!(v.as_ptr() as usize % ALIGN, 0);
        assert!(p.view(512, 4096).is_none());
        assert!(p.view(0, 100).is_none());
        assert!(p.view(8192, 12288).is_none(), "past the buffer");
        drop(p); // the view keeps the bytes alive
        assert_eq!(&v[..4096], &data[4096..8192]);
        let mut v = v;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| v[0] = 1));
        assert!(r.is_err(), "a view is read-only");
        assert!(Payload::default().is_empty());
    }

    // Proves a read that filled one disk buffer from its start becomes a
    // payload without a copy (same memory), and any other read is copied
    // with the same bytes.
    #[test]
    fn payload_from_read() {
        let disk = AlignedBuf::from_parts(&[&[5u8; 4096][..], &[6u8; 4096][..]]);
        let at = disk.as_ptr();
        let whole = ReadData::from_pieces(vec![Piece::Disk {
            buf: disk,
            start: 0,
            len: 6000,
        }]);
        let want = whole.to_vec();
        let p = Payload::from_read(whole);
        assert_eq!(&p[..], &want[..]);
        assert_eq!(p.as_ptr(), at, "no copy");
        let mixed = ReadData::from_pieces(vec![
            Piece::Disk {
                buf: AlignedBuf::from_parts(&[&[7u8; 4096][..]]),
                start: 100,
                len: 200,
            },
            Piece::Zeroes(300),
        ]);
        let want = mixed.to_vec();
        assert_eq!(&Payload::from_read(mixed)[..], &want[..]);
        assert!(Payload::from_read(ReadData::default()).is_empty());
    }
}
