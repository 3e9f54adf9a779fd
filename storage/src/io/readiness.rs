//! Sleeping on a disk's completions inside the tokio reactor: the io_uring
//! fd polls readable while completions wait, so the engine task can sleep
//! in the same epoll as the sockets instead of on its own thread.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A duplicate of a completion fd, registered with the current reactor.
/// Owning the duplicate keeps the registration valid however the disk is
/// dropped.
pub struct CompletionReady {
    fd: AsyncFd<OwnedFd>,
}

impl CompletionReady {
    /// Must be called inside a tokio runtime with I/O enabled.
    pub fn new(fd: RawFd) -> std::io::Result<CompletionReady> {
        // SAFETY: dup has no memory-safety preconditions; a negative result
        // is checked before the descriptor is used.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `dup` is a fresh descriptor that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        debug_assert_eq!(owned.as_raw_fd(), dup);
        // SAFETY: the AsyncFd owns `owned`, so the descriptor stays open and
        // names the same file description for the AsyncFd's whole life.
        let fd = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(CompletionReady { fd })
    }

    /// Wait until completions may be waiting. Readiness is cleared before
    /// returning, so the caller must reap afterwards: a completion posted
    /// after the clear raises a new edge and wakes the next wait.
    pub async fn wait(&self) -> std::io::Result<()> {
        let mut guard = self.fd.readable().await?;
        guard.clear_ready();
        tessera_gateway::busy_poll::note_work();
        Ok(())
    }
}
