//! Same-host links over Unix sockets.
//!
//! A storage daemon whose advertised address is a loopback address
//! (127.0.0.0/8, ::1) is, by definition, on the host of whoever dials it.
//! It also listens on an abstract Unix socket named after that address,
//! and the gateway's storage connections and the daemons' replication
//! links dial that socket first, falling back to TCP when nothing answers.
//! Same protocol, same `Hello`, same checks: only the transport changes.
//!
//! Why: on this kind of machine the loopback TCP stack is a large share of
//! a replicated write's CPU (`tcp_sendmsg` and the receive path it runs
//! inline were ~25 % of the storage daemons' samples under 4k random writes
//! at queue depth 32, 3 daemons x 3 copies); a Unix stream carries the same
//! bytes with no TCP or IP processing (docs/ARCHITECTURE.md, "Same-host
//! links").
//!
//! Why abstract names: they live in the network namespace, exactly like the
//! loopback address they stand for, so a daemon in another namespace (its
//! own "host" in the partition tests) is never reached by this shortcut,
//! and they leave nothing behind on the file system when a process dies.
//! Anyone on the host can connect, as anyone can to a loopback port; the
//! `Hello` with the cluster id is the same gate on both.
//!
//! `TESSERA_UNIX_LINKS=off` (or `0`) makes the dialing side use TCP only,
//! for comparing the two.

use std::net::SocketAddr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::SocketAddr as UnixAddr;

/// The abstract socket name standing for `addr`, when `addr` is a loopback
/// socket address (`None` for anything else, names included).
pub fn name_for(addr: &str) -> Option<String> {
    let a: SocketAddr = addr.parse().ok()?;
    a.ip().is_loopback().then(|| format!("tessera-storage/{a}"))
}

/// Whether dialing may use Unix sockets (`TESSERA_UNIX_LINKS`, default on).
pub fn enabled() -> bool {
    !matches!(
        std::env::var("TESSERA_UNIX_LINKS").as_deref(),
        Ok("0" | "off" | "false" | "no")
    )
}

/// Listen on the abstract socket standing for `advertised`, if it is a
/// loopback address. Must run inside a tokio runtime. `Ok(None)`: not a
/// loopback address, nothing to do.
pub fn listen(advertised: &str) -> std::io::Result<Option<tokio::net::UnixListener>> {
    let Some(name) = name_for(advertised) else {
        return Ok(None);
    };
    let addr = UnixAddr::from_abstract_name(name.as_bytes())?;
    let l = std::os::unix::net::UnixListener::bind_addr(&addr)?;
    l.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(l).map(Some)
}

/// Dial the abstract socket standing for `addr`: `None` when `addr` is not
/// a loopback address, Unix links are off, or nothing listens there (an
/// older daemon, or one in another network namespace); the caller then
/// uses TCP.
pub fn connect(addr: &str) -> Option<tokio::net::UnixStream> {
    if !enabled() {
        return None;
    }
    let name = name_for(addr)?;
    let ua = UnixAddr::from_abstract_name(name.as_bytes()).ok()?;
    // Connecting to a Unix socket does not wait for a network: it succeeds
    // or fails at once (a full backlog fails too, and TCP is then used).
    let s = std::os::unix::net::UnixStream::connect_addr(&ua).ok()?;
    s.set_nonblocking(true).ok()?;
    tokio::net::UnixStream::from_std(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn only_loopback_addresses_have_a_name() {
        assert_eq!(
            name_for("127.0.0.1:7000").as_deref(),
            Some("tessera-storage/127.0.0.1:7000")
        );
        assert!(name_for("127.3.4.5:1").is_some());
        assert_eq!(
            name_for("[::1]:7000").as_deref(),
            Some("tessera-storage/[::1]:7000")
        );
        assert_eq!(name_for("10.0.0.1:7000"), None);
        assert_eq!(name_for("0.0.0.0:7000"), None);
        assert_eq!(name_for("localhost:7000"), None);
        assert_eq!(name_for("garbage"), None);
    }

    /// A listener on a loopback address's name is reached by `connect` and
    /// carries bytes both ways; a name nobody listens on, or a non-loopback
    /// address, gives `None` (the caller falls back to TCP).
    #[test]
    fn connect_reaches_the_listener_or_falls_back() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            // A loopback address nobody else uses while this test runs: a
            // TCP port held for the test's duration, as a daemon holds its
            // own (tests run in parallel with real daemons).
            let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = held.local_addr().expect("addr").to_string();
            let l = listen(&addr).expect("listen").expect("loopback");
            assert!(listen(&addr).is_err(), "a second listener on the same name");
            let mut c = connect(&addr).expect("connects");
            let (mut s, _) = l.accept().await.expect("accept");
            c.write_all(b"ping").await.expect("write");
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await.expect("read");
            assert_eq!(&b, b"ping");
            s.write_all(b"pong").await.expect("write");
            c.read_exact(&mut b).await.expect("read");
            assert_eq!(&b, b"pong");
            drop(l);
            drop(s);
            assert!(connect(&addr).is_none(), "nobody listens any more");
            assert!(connect("10.1.2.3:7000").is_none());
            assert!(listen("10.1.2.3:7000").expect("no-op").is_none());
        });
    }
}
