//! Tessera cluster manager and the `tessera` CLI.
//!
//! Policies are pure functions of (state, config), tested beside the code:
//! * [`membership`]: nodes and disks joining; stable ids per uuid.
//! * [`health`]: which nodes are up, from heartbeat times and a grace.
//! * [`placement`]: placement groups onto disks.
//! * [`map`]: the volume catalogue rules and the published cluster map.
//! * [`iscsi`]: iSCSI ACLs, CHAP credentials and reservation state.
//!
//! Around them:
//! * [`store`]: the embedded catalogue store (redb).
//! * [`daemon`]: the manager's state (catalogue + liveness under one lock),
//!   persistence and epoch bumps, and `run`.
//! * [`api`]: the REST API and metrics over HTTP.
//! * [`secret`]: the cluster secret gateways present to the manager.
//! * [`sys`]: the few system calls std lacks (signals, PDEATHSIG).
//! * [`cli`]: the `tessera` commands (tables and JSON) over the REST API.
//! * [`up`]: `tessera up`, a whole local cluster under one supervisor.
#![deny(unsafe_code)]

pub mod api;
pub mod cli;
pub mod daemon;
pub mod health;
pub mod iscsi;
pub mod map;
pub mod membership;
pub mod placement;
pub mod secret;
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
