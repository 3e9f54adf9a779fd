//! Disk I/O engines behind one completion-based trait.
//!
//! * [`uring::UringDisk`]: the production engine, io_uring with O_DIRECT.
//! * [`sync::SyncDisk`]: blocking pread/pwrite, for comparison tests and for
//!   kernels without io_uring.
//! * [`sim::SimDisk`]: an in-memory disk with a volatile write cache that can
//!   crash (losing or tearing unsynced writes), for deterministic tests.
//!
//! Every operation owns its buffer until its completion hands it back.

pub mod buffer;
pub mod doorbell;
pub mod readiness;
pub mod sim;
pub mod sync;
pub mod uring;

pub use buffer::{ALIGN, AlignedBuf, Payload, Piece, ReadData};

use std::os::fd::RawFd;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Fill the buffer from `offset`.
    Read,
    /// Write the whole buffer at `offset`.
    Write,
    /// Make every completed write durable (fdatasync).
    Sync,
}

#[derive(Debug)]
pub struct IoOp {
    /// Caller's tag, returned with the completion.
    pub token: u64,
    pub kind: IoKind,
    pub offset: u64,
    /// Read target or write source; `None` for Sync.
    pub buf: Option<AlignedBuf>,
}

#[derive(Debug)]
pub struct IoDone {
    pub token: u64,
    pub kind: IoKind,
    /// `Err(errno)` when the operation failed or was short.
    pub result: Result<(), i32>,
    pub buf: Option<AlignedBuf>,
}

/// How [`Disk::reap`] may block.
#[derive(Debug, Clone, Copy)]
pub enum Wait {
    /// Return at once with whatever has completed.
    No,
    /// Block until at least one operation completes (something must be in
    /// flight).
    Any,
    /// Block until at least one operation completes or the doorbell (an
    /// eventfd) is rung; with nothing in flight, block on the doorbell alone.
    Doorbell(RawFd),
}

pub trait Disk: Send {
    fn size_bytes(&self) -> u64;
    /// Queue an operation. When the engine's queue is full the operation is
    /// handed back untouched.
    fn submit(&mut self, op: IoOp) -> Result<(), IoOp>;
    /// Collect completions into `out`.
    fn reap(&mut self, out: &mut Vec<IoDone>, wait: Wait);
    fn inflight(&self) -> usize;
    /// The most operations that may be in flight at once.
    fn inflight_max(&self) -> usize;
    /// A descriptor that polls readable while completions wait to be
    /// reaped (an io_uring's own fd), so an event loop can sleep on it
    /// beside its sockets. `None` when every operation completes inside
    /// `submit` (the sync engine, the simulator).
    fn completion_fd(&self) -> Option<RawFd> {
        None
    }
    /// A buffer for a read of `len` bytes. Zeroed by default; a disk whose
    /// reads write every byte through the raw pointer and fail unless
    /// complete (io_uring) skips the zeroing.
    fn read_buffer(&self, len: usize) -> AlignedBuf {
        AlignedBuf::zeroed(len)
    }
}

/// Validate an operation's geometry; a violation is a bug in the caller.
pub(crate) fn check_op(op: &IoOp, size_bytes: u64) {
    match op.kind {
        IoKind::Sync => assert!(op.buf.is_none()),
        IoKind::Read | IoKind::Write => {
            let buf = op.buf.as_ref().expect("read/write carry a buffer");
            assert!(op.offset.is_multiple_of(ALIGN as u64));
            assert!(op.offset + buf.len() as u64 <= size_bytes);
        }
    }
}

/// Open (creating when asked) a disk file or block device with O_DIRECT,
/// returning the file and its size. `create_size` makes a sparse file of
/// that size when the path does not exist.
pub fn open_direct(
    path: &std::path::Path,
    create_size: Option<u64>,
) -> std::io::Result<(std::fs::File, u64)> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let exists = path.exists();
    if !exists {
        let Some(size) = create_size else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "{} does not exist (add ,size=4G to create it)",
                    path.display()
                ),
            ));
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(path)?;
        f.set_len(size)?;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let meta = file.metadata()?;
    let size = if meta.file_type().is_block_device() {
        use std::io::Seek;
        let mut f = &file;
        f.seek(std::io::SeekFrom::End(0))?
    } else {
        meta.len()
    };
    Ok((file, size - size % ALIGN as u64))
}
