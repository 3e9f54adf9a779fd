//! The blocking pread/pwrite engine: every operation runs to completion in
//! `submit`. Slower than io_uring, but simple and obviously right, so the
//! io_uring engine is tested against it.

use super::{Disk, IoDone, IoKind, IoOp, Wait, check_op, doorbell};
use std::os::unix::fs::FileExt;

pub struct SyncDisk {
    file: std::fs::File,
    size: u64,
    done: Vec<IoDone>,
}

impl SyncDisk {
    pub fn new(file: std::fs::File, size: u64) -> SyncDisk {
        SyncDisk {
            file,
            size,
            done: Vec::new(),
        }
    }
}

impl Disk for SyncDisk {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn submit(&mut self, mut op: IoOp) -> Result<(), IoOp> {
        check_op(&op, self.size);
        let result = match op.kind {
            IoKind::Read => {
                let buf = op.buf.as_mut().expect("read buffer");
                self.file.read_exact_at(buf, op.offset)
            }
            IoKind::Write => {
                let buf = op.buf.as_ref().expect("write buffer");
                self.file.write_all_at(buf, op.offset)
            }
            IoKind::Sync => self.file.sync_data(),
        };
        self.done.push(IoDone {
            token: op.token,
            kind: op.kind,
            result: result.map_err(|e| e.raw_os_error().unwrap_or(libc::EIO)),
            buf: op.buf,
        });
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<IoDone>, wait: Wait) {
        if self.done.is_empty()
            && let Wait::Doorbell(fd) = wait
        {
            doorbell::wait_readable(fd);
        }
        out.append(&mut self.done);
    }

    fn inflight(&self) -> usize {
        self.done.len()
    }

    fn inflight_max(&self) -> usize {
        usize::MAX
    }
}
