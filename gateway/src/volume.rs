//! The `Volume` trait: what a protocol front end (NBD now, iSCSI later) needs
//! from a block device, and the `Catalog` that names volumes.
//!
//! A volume's size may change while it is open (volumes grow through the
//! cluster map), so callers re-read `size_bytes` for every request. Ranges
//! passed in are already validated against size and block size by the
//! protocol layer; implementations still refuse what they cannot serve.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use thiserror::Error;

/// A boxed, sendable future: trait objects need it, and request tasks run on
/// a multi-threaded runtime.
pub type VolFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, VolumeError>> + Send + 'a>>;

/// Failures a volume operation can end with. Protocol layers map them to
/// their own error codes in one place each (`nbd::session::errno_of`).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VolumeError {
    #[error("I/O error")]
    Io,
    #[error("checksum mismatch that could not be repaired")]
    Checksum,
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("no space left")]
    NoSpace,
    #[error("I/O did not complete within the I/O timeout")]
    Timeout,
    #[error("the volume no longer exists")]
    Gone,
    #[error("operation not supported")]
    NotSupported,
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// COMPARE AND WRITE only: the medium differs from the compare data at
    /// this byte offset of it; nothing was written.
    #[error("miscompare at byte {0}")]
    Miscompare(u64),
}

/// Which optional operations a volume implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub flush: bool,
    pub fua: bool,
    pub trim: bool,
    pub write_zeroes: bool,
    /// Flush and FUA results are visible through every connection.
    pub multi_conn: bool,
}

impl Capabilities {
    pub const ALL: Capabilities = Capabilities {
        flush: true,
        fua: true,
        trim: true,
        write_zeroes: true,
        multi_conn: true,
    };
}

/// A run of consecutive bytes with one allocation state (see
/// [`Volume::allocation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// Backed by storage. Unallocated ranges read as zeroes.
    pub allocated: bool,
}

pub trait Volume: Send + Sync {
    fn name(&self) -> &str;
    /// Current size; may grow while the volume is open.
    fn size_bytes(&self) -> u64;
    /// Logical block size: 512 or 4096.
    fn block_size(&self) -> u32;
    fn capabilities(&self) -> Capabilities;
    fn read(&self, offset: u64, length: u32) -> VolFuture<'_, Vec<u8>>;
    /// Write `data` at `offset`; with `fua` it is durable when this returns.
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> VolFuture<'_, ()>;
    /// Make every completed write durable.
    fn flush(&self) -> VolFuture<'_, ()>;
    fn trim(&self, offset: u64, length: u32, fua: bool) -> VolFuture<'_, ()>;
    fn write_zeroes(&self, offset: u64, length: u32, fua: bool) -> VolFuture<'_, ()>;

    /// If `[offset, offset + compare.len())` holds exactly `compare`,
    /// write `data` (the same length) there, atomically against every other
    /// write of the volume, through any gateway: SCSI COMPARE AND WRITE.
    /// A difference is `Err(Miscompare(at))`. `NotSupported` (the default,
    /// or a range this volume cannot do so) leaves it to the caller.
    fn compare_and_write(
        &self,
        _offset: u64,
        _compare: Vec<u8>,
        _data: Vec<u8>,
        _fua: bool,
    ) -> VolFuture<'_, ()> {
        Box::pin(async { Err(VolumeError::NotSupported) })
    }

    /// Allocation map of `[offset, offset + length)`: consecutive extents
    /// that cover exactly that range, in order. Protocols use it for NBD
    /// BLOCK_STATUS (`base:allocation`) and SCSI GET LBA STATUS. The default
    /// reports everything allocated, which is always a safe answer (it
    /// claims nothing about the content).
    fn allocation(&self, _offset: u64, length: u64) -> VolFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            Ok(vec![Extent {
                length,
                allocated: true,
            }])
        })
    }

    /// Whether `write_zeroes` is cheaper than writing zeroes as data (it
    /// deallocates instead of writing blocks). NBD answers
    /// NBD_CMD_FLAG_FAST_ZERO with ENOTSUP when this is false.
    fn zeroes_are_fast(&self) -> bool {
        false
    }

    /// A short human-readable description (NBD_INFO_DESCRIPTION).
    fn description(&self) -> Option<String> {
        None
    }
}

/// Named volumes, looked up when a client picks an export.
pub trait Catalog: Send + Sync {
    /// Volume names in a stable (sorted) order.
    fn names(&self) -> Vec<String>;
    fn open(&self, name: &str) -> Option<Arc<dyn Volume>>;
}
