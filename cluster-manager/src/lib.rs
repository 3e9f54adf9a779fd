//! Tessera cluster manager and the `tessera` CLI.
//!
//! * [`server`]: the manager daemon — membership, health, volume catalogue,
//!   placement, the cluster map and the REST API.
//! * [`store`]: the embedded catalogue store (redb).
//! * [`placement`]: placement groups onto disks, a pure function.
//! * [`cli`]: the `tessera` commands (tables and JSON) over the REST API.
//! * [`up`]: `tessera up`, a whole local cluster under one supervisor.
#![deny(unsafe_code)]

pub mod cli;
pub mod placement;
pub mod server;
pub mod store;
pub mod sys;
pub mod up;

/// Tell systemd (Type=notify) that the daemon is ready, when run under it.
pub fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let p = path.to_string_lossy().to_string();
    let r = if let Some(name) = p.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|a| sock.send_to_addr(b"READY=1", &a))
    } else {
        sock.send_to(b"READY=1", &p)
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// Block until SIGTERM or SIGINT (they must have been blocked with
/// [`sys::block_termination_signals`] at the start of `main`).
pub fn wait_for_termination() {
    sys::wait_termination(None);
}
