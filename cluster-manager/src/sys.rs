//! The few system calls the manager and `tessera up` need that std lacks:
//! waiting for SIGTERM/SIGINT without a signal handler (the signals are
//! blocked in every thread and collected with sigtimedwait), sending a
//! signal to a child we started, and making children die with their parent.
#![allow(unsafe_code)]

use std::time::Duration;

fn term_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Block SIGTERM and SIGINT in the calling thread and every thread it
/// spawns afterwards. Call first thing in `main`.
pub fn block_termination_signals() {
    let set = term_set();
    // SAFETY: set is initialised; a null old-set pointer is allowed.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Wait up to `timeout` (forever if `None`) for SIGTERM or SIGINT.
/// Returns whether one arrived.
pub fn wait_termination(timeout: Option<Duration>) -> bool {
    let set = term_set();
    loop {
        let r = match timeout {
            None => {
                let mut sig = 0;
                // SAFETY: set and sig are valid for the call.
                let r = unsafe { libc::sigwait(&set, &mut sig) };
                if r == 0 { sig } else { -1 }
            }
            Some(t) => {
                let ts = libc::timespec {
                    tv_sec: t.as_secs() as libc::time_t,
                    tv_nsec: t.subsec_nanos() as libc::c_long,
                };
                // SAFETY: set and ts are valid; a null siginfo is allowed.
                unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) }
            }
        };
        if r > 0 {
            return true;
        }
        let errno = std::io::Error::last_os_error().raw_os_error();
        if timeout.is_some() && errno == Some(libc::EAGAIN) {
            return false;
        }
        if errno != Some(libc::EINTR) {
            return false;
        }
    }
}

/// Send `signal` to a process this program started.
pub fn kill(pid: u32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Prepare a child: it receives SIGTERM if this process dies (even by
/// SIGKILL), so a killed `tessera up` never leaves daemons behind; and the
/// signal mask blocked by [`block_termination_signals`], which exec would
/// otherwise pass on, is cleared so the child can be stopped with SIGTERM.
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let set = term_set();
    // SAFETY: the closure only calls prctl and pthread_sigmask, both
    // async-signal-safe, on a set prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
