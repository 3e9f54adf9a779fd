//! The io_uring engine: every data read and write of a storage daemon.
//!
//! Safe API over the `io-uring` crate: an operation owns its aligned buffer
//! until its completion hands it back; submission refuses (returns the op)
//! when in-flight operations would exceed the completion queue; the disk is
//! a registered (fixed) file; a probe at start names the cause when
//! io_uring is unavailable.
#![allow(unsafe_code)]

use super::{AlignedBuf, Disk, IoDone, IoKind, IoOp, Wait, check_op};
use io_uring::{IoUring, opcode, squeue, types};
use slab::Slab;
use std::os::fd::{AsRawFd, RawFd};

/// Submission queue entries. The completion queue is twice as large, and
/// in-flight operations are bounded below it, so completions never overflow.
pub const RING_ENTRIES: u32 = 256;
/// Most data operations in flight; one slot stays for the doorbell read.
pub const INFLIGHT_MAX: usize = RING_ENTRIES as usize - 1;
const DOORBELL_TOKEN: u64 = u64::MAX;

struct Slot {
    token: u64,
    kind: IoKind,
    buf: Option<AlignedBuf>,
}

pub struct UringDisk {
    ring: IoUring,
    // Kept open for the ring's registered-file table.
    _file: std::fs::File,
    size: u64,
    inflight: Slab<Slot>,
    doorbell_armed: Option<RawFd>,
    // The doorbell read's target; boxed so its address is stable while the
    // kernel may write to it.
    doorbell_buf: Box<u64>,
    unsubmitted: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum UringError {
    #[error(
        "io_uring is unavailable ({0}); check /proc/sys/kernel/io_uring_disabled and seccomp, or run with --engine sync"
    )]
    Unavailable(std::io::Error),
    #[error("io_uring could not register the disk file: {0}")]
    Register(std::io::Error),
}

impl UringDisk {
    pub fn new(file: std::fs::File, size: u64) -> Result<UringDisk, UringError> {
        let ring = IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 2)
            .build(RING_ENTRIES)
            .map_err(UringError::Unavailable)?;
        ring.submitter()
            .register_files(&[file.as_raw_fd()])
            .map_err(UringError::Register)?;
        Ok(UringDisk {
            ring,
            _file: file,
            size,
            inflight: Slab::with_capacity(INFLIGHT_MAX),
            doorbell_armed: None,
            doorbell_buf: Box::new(0),
            unsubmitted: 0,
        })
    }

    fn push(&mut self, entry: squeue::Entry) {
        loop {
            // SAFETY: every buffer referenced by `entry` is owned by a slot
            // in `self.inflight` (or is `doorbell_buf`) and stays alive and
            // untouched until its completion is reaped.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.unsubmitted += 1;
                return;
            }
            // Submission queue full: hand what we have to the kernel.
            self.ring.submit().expect("io_uring submit");
            self.unsubmitted = 0;
        }
    }
}

impl Disk for UringDisk {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn read_buffer(&self, len: usize) -> AlignedBuf {
        // SAFETY: a read SQE writes the buffer through its raw pointer, and
        // `reap` turns any completion shorter than the buffer into an error,
        // after which the engine never looks at the buffer.
        unsafe { AlignedBuf::for_kernel_read(len) }
    }

    fn submit(&mut self, mut op: IoOp) -> Result<(), IoOp> {
        check_op(&op, self.size);
        if self.inflight.len() >= INFLIGHT_MAX {
            return Err(op);
        }
        let entry = match op.kind {
            IoKind::Read => {
                let buf = op.buf.as_mut().expect("read buffer");
                opcode::Read::new(types::Fixed(0), buf.as_mut_ptr(), buf.len() as u32)
                    .offset(op.offset)
                    .build()
            }
            IoKind::Write => {
                let buf = op.buf.as_ref().expect("write buffer");
                opcode::Write::new(types::Fixed(0), buf.as_ptr(), buf.len() as u32)
                    .offset(op.offset)
                    .build()
            }
            IoKind::Sync => opcode::Fsync::new(types::Fixed(0))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        let key = self.inflight.insert(Slot {
            token: op.token,
            kind: op.kind,
            buf: op.buf,
        });
        self.push(entry.user_data(key as u64));
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<IoDone>, wait: Wait) {
        let mut want = 0;
        if let Wait::Doorbell(fd) = wait {
            if self.doorbell_armed.is_none() {
                let ptr: *mut u64 = &mut *self.doorbell_buf;
                let entry = opcode::Read::new(types::Fd(fd), ptr.cast(), 8)
                    .build()
                    .user_data(DOORBELL_TOKEN);
                self.push(entry);
                self.doorbell_armed = Some(fd);
            }
            want = 1;
        }
        if matches!(wait, Wait::Any) && !self.inflight.is_empty() {
            want = 1;
        }
        if self.unsubmitted > 0 || want > 0 {
            // With a completion already queued this returns at once.
            match self.ring.submit_and_wait(want) {
                Ok(_) => self.unsubmitted = 0,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => panic!("io_uring submit failed: {e}"),
            }
        }
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            if cqe.user_data() == DOORBELL_TOKEN {
                self.doorbell_armed = None;
                continue;
            }
            let slot = self.inflight.remove(cqe.user_data() as usize);
            let res = cqe.result();
            let expected = slot.buf.as_ref().map_or(0, |b| b.len() as i32);
            let result = if res < 0 {
                Err(-res)
            } else if slot.kind != IoKind::Sync && res != expected {
                // O_DIRECT transfers on a disk we sized ourselves are never
                // legitimately short; treat it as an I/O error.
                Err(libc::EIO)
            } else {
                Ok(())
            };
            out.push(IoDone {
                token: slot.token,
                kind: slot.kind,
                result,
                buf: slot.buf,
            });
        }
    }

    fn inflight(&self) -> usize {
        self.inflight.len()
    }

    fn inflight_max(&self) -> usize {
        INFLIGHT_MAX
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.ring.as_raw_fd())
    }
}

impl Drop for UringDisk {
    fn drop(&mut self) {
        // Buffers must outlive the kernel's use of them: wait for every
        // in-flight operation before the slab (and its buffers) is freed.
        while !self.inflight.is_empty() {
            let mut out = Vec::new();
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            let mut cq = self.ring.completion();
            cq.sync();
            for cqe in &mut cq {
                if cqe.user_data() != DOORBELL_TOKEN {
                    let slot = self.inflight.remove(cqe.user_data() as usize);
                    out.push(slot);
                }
            }
        }
    }
}
