//! Round trip of a message between two threads over loopback TCP and over
//! a Unix socket pair: latency and CPU time (both ends) per round trip.
//! The floor under every network hop of the data path on this machine
//! (docs/nbd.md, "Where the time goes"). "polled" is loopback TCP with both
//! ends polling their socket (non-blocking reads, `sched_yield` between
//! tries) instead of sleeping in the kernel: what a wake-up costs
//! (docs/ARCHITECTURE.md, "Polling before sleeping"); "unix polled" the
//! same over a Unix socket pair: what the TCP stack itself costs.
//!
//!   cargo run --release -p tessera-bench --bin loopback_rtt [ROUND_TRIPS=20000]

use std::io::{Read, Write};
use std::time::Instant;

/// Process CPU time (user + system) in µs, from /proc/self/stat.
fn cpu_us() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let f: Vec<&str> = s
        .rsplit(')')
        .next()
        .expect("stat fields")
        .split_whitespace()
        .collect();
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    ticks * 1e6 / 100.0
}

/// (mean round trip µs, CPU µs per round trip) of `n` exchanges of `size`
/// bytes between `a` (this thread) and `b` (an echo thread).
fn ping_pong<S: Read + Write + Send + 'static>(
    mut a: S,
    mut b: S,
    n: usize,
    size: usize,
) -> (f64, f64) {
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0u8; size];
        for _ in 0..n {
            b.read_exact(&mut buf).expect("echo read");
            b.write_all(&buf).expect("echo write");
        }
    });
    let mut buf = vec![1u8; size];
    let (t0, c0) = (Instant::now(), cpu_us());
    for _ in 0..n {
        a.write_all(&buf).expect("write");
        a.read_exact(&mut buf).expect("read");
    }
    let rtt = t0.elapsed().as_secs_f64() * 1e6 / n as f64;
    echo.join().expect("echo thread");
    (rtt, (cpu_us() - c0) / n as f64)
}

/// A non-blocking socket read by polling: never sleeps in the kernel.
struct Polled<S>(S);

impl<S: Read> Read for Polled<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
                r => return r,
            }
        }
    }
}

impl<S: Write> Write for Polled<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            match self.0.write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::yield_now(),
                r => return r,
            }
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn tcp_pair() -> (std::net::TcpStream, std::net::TcpStream) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
    let (b, _) = l.accept().expect("accept");
    a.set_nodelay(true).expect("nodelay");
    b.set_nodelay(true).expect("nodelay");
    (a, b)
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("ROUND_TRIPS: a number"))
        .unwrap_or(20_000);
    // 64 B: a request header; 4160 B: a 4 KiB write with its header.
    for size in [64usize, 4160] {
        let (a, b) = tcp_pair();
        let (tcp, tcp_cpu) = ping_pong(a, b, n, size);
        let (a, b) = tcp_pair();
        a.set_nonblocking(true).expect("nonblocking");
        b.set_nonblocking(true).expect("nonblocking");
        let (polled, polled_cpu) = ping_pong(Polled(a), Polled(b), n, size);
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let (uds, uds_cpu) = ping_pong(a, b, n, size);
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        a.set_nonblocking(true).expect("nonblocking");
        b.set_nonblocking(true).expect("nonblocking");
        let (upolled, upolled_cpu) = ping_pong(Polled(a), Polled(b), n, size);
        println!(
            "{size:>5} B: tcp loopback {tcp:.1} µs, cpu {tcp_cpu:.1} µs | polled {polled:.1} µs, cpu {polled_cpu:.1} µs | unix socket {uds:.1} µs, cpu {uds_cpu:.1} µs | unix polled {upolled:.1} µs, cpu {upolled_cpu:.1} µs"
        );
    }
}
