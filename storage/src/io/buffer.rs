//! Page-aligned I/O buffers, as O_DIRECT requires.
//!
//! An [`AlignedBuf`] owns its memory; an I/O operation takes the buffer by
//! value and its completion hands it back, so the kernel never writes into
//! memory that Rust code can reach meanwhile.
#![allow(unsafe_code)]

use std::alloc::{Layout, alloc, alloc_zeroed, dealloc};
use std::ptr::NonNull;

/// Alignment of every buffer and of every disk offset used with O_DIRECT.
pub const ALIGN: usize = 4096;

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf uniquely owns its allocation, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes; `len` must be a non-zero multiple of
    /// [`ALIGN`].
    pub fn zeroed(len: usize) -> AlignedBuf {
        assert!(len > 0);
        assert!(len % ALIGN == 0);
        let layout = Layout::from_size_align(len, ALIGN).expect("valid layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
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
        assert!(len % ALIGN == 0);
        let layout = Layout::from_size_align(len, ALIGN).expect("valid layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    /// A buffer holding `parts` one after another, written once (no
    /// zeroing first: this is the write path's only copy of the data). The
    /// total length must be a non-zero multiple of [`ALIGN`].
    pub fn from_parts(parts: &[&[u8]]) -> AlignedBuf {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        assert!(len > 0);
        assert!(len % ALIGN == 0);
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
        AlignedBuf { ptr, len }
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

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
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
        // SAFETY: as in deref, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
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
}
