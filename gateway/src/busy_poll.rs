//! Polling before sleeping: a runtime thread that has just done work keeps
//! polling its sockets and rings for a short window before it blocks.
//!
//! Why: on the VMs this is measured on, a thread that blocks and is woken
//! again costs more than a short poll (an idle vCPU halts; waking it is an
//! inter-processor interrupt through the hypervisor). A loopback TCP round
//! trip between two threads took 109 µs and 77 µs of CPU when both blocked,
//! 12 µs and 24 µs of CPU when both polled (`cargo run --release -p
//! tessera-bench --bin loopback_rtt`): polling cost *less* CPU. A
//! replicated write at queue depth 1 crosses seven such wake-ups one after the other (client -> gateway ->
//! primary -> replicas -> disk -> primary -> gateway -> client). Polling
//! only while work is likely to follow (the window after the last bytes or
//! completions arrived) bounds what an idle thread burns; each empty turn
//! yields the CPU (`sched_yield`), so a poller never keeps a runnable
//! thread of another process off its core. docs/ARCHITECTURE.md, "Polling
//! before sleeping", has the measurements.
//!
//! How: tokio's current-thread scheduler calls `on_thread_park` before it
//! blocks in the reactor; when that hook wakes a task, the scheduler polls
//! the reactor without blocking instead (`epoll_wait` with a zero timeout)
//! and comes back. [`runtime`] builds a runtime with the hook and spawns
//! [`spinner`], the task it wakes. Readers of sockets ([`Noted`]) and of
//! completion rings ([`note_work`]) mark that work arrived, which restarts
//! the window.

use std::cell::{Cell, RefCell};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, ReadBuf};

/// The default window, in microseconds.
pub const WINDOW_US_DEFAULT: u32 = 200;

thread_local! {
    static WORKED: Cell<bool> = const { Cell::new(false) };
    static STATE: RefCell<State> = const { RefCell::new(State::new(Duration::ZERO)) };
    /// Times the spinner ran on this thread (tests watch it).
    static SPINS: Cell<u64> = const { Cell::new(0) };
}

/// The window a thread starts growing from (as the kernel's haltpoll
/// governor does: its `guest_halt_poll_grow_start` is 50 µs).
const WINDOW_START: Duration = Duration::from_micros(50);

/// The polling policy of one thread, adapted to how soon work follows
/// work: the window doubles (from [`WINDOW_START`] up to the configured
/// most) when the thread blocked and was woken soon enough that a longer
/// window would have caught the wake, and ends (zero) when it slept longer
/// than the most. So a thread whose work comes in sparse bursts polls
/// little past each burst, and one serving requests back to back polls
/// through the gaps. (Halving the window after a long sleep, as haltpoll
/// does, kept a thread polling through most of the idle gaps of a paced
/// light load.)
struct State {
    max: Duration,
    window: Duration,
    /// When this thread last found work (bytes or completions).
    last: Option<Instant>,
    /// When it last went to sleep in the reactor, if it did.
    slept: Option<Instant>,
    /// The spinner's waker, taken by each wake.
    waker: Option<Waker>,
}

impl State {
    const fn new(max: Duration) -> State {
        State {
            max,
            window: Duration::ZERO,
            last: None,
            slept: None,
            waker: None,
        }
    }

    /// Before the thread would block: `true` to poll once more instead.
    fn before_park(&mut self, worked: bool, now: Instant) -> bool {
        if worked {
            self.last = Some(now);
        }
        let poll = matches!(self.last, Some(t) if now.saturating_duration_since(t) < self.window);
        self.slept = if poll { None } else { Some(now) };
        poll
    }

    /// After the reactor returned: adapt the window to how long the
    /// thread slept, if it did.
    fn after_unpark(&mut self, now: Instant) {
        let Some(t) = self.slept.take() else { return };
        let slept = now.saturating_duration_since(t);
        if self.window + slept <= self.max {
            self.window = (self.window * 2).clamp(WINDOW_START, self.max);
        } else if slept > self.max {
            self.window = Duration::ZERO;
        }
    }
}

/// Work arrived on this thread: bytes from a socket, completions from a
/// ring. Cheap (a thread-local flag), so it can be called per read.
pub fn note_work() {
    WORKED.with(|w| w.set(true));
}

/// A current-thread runtime (I/O and time enabled) whose thread, after
/// work, polls for up to `max` before it blocks (the window adapts, see
/// [`State`]); with a zero `max` an ordinary one.
pub fn runtime(max: Duration) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_current_thread();
    b.enable_all();
    if max.is_zero() {
        return b.build();
    }
    let rt = b
        .on_thread_park(move || before_park(max))
        .on_thread_unpark(|| STATE.with(|s| s.borrow_mut().after_unpark(Instant::now())))
        .build()?;
    rt.spawn(spinner());
    Ok(rt)
}

fn before_park(max: Duration) {
    let now = Instant::now();
    let worked = WORKED.with(|w| w.replace(false));
    let waker = STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.max = max;
        if s.before_park(worked, now) {
            s.waker.take()
        } else {
            None
        }
    });
    if let Some(w) = waker {
        // Another process's runnable thread on this core goes first; with
        // none, this returns at once.
        std::thread::yield_now();
        // Wakes a task of this thread: the scheduler then polls the
        // reactor without blocking and calls this hook again.
        w.wake();
    }
}

/// The task the hook of [`runtime`] wakes to keep its thread polling.
/// Never ends; spawned once per runtime that polls.
async fn spinner() {
    std::future::poll_fn(|cx: &mut Context<'_>| {
        SPINS.with(|n| n.set(n.get() + 1));
        STATE.with(|s| s.borrow_mut().waker = Some(cx.waker().clone()));
        Poll::<()>::Pending
    })
    .await
}

/// A reader that marks work whenever bytes arrive ([`note_work`]).
pub struct Noted<R>(pub R);

impl<R: AsyncRead + Unpin> AsyncRead for Noted<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.0).poll_read(cx, buf);
        if buf.filled().len() > before {
            note_work();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    // Proves the policy: no polling before any work; after work, polling
    // only within the window; the window grows while wakes come soon after
    // the thread blocked, up to the most, and falls to nothing when the
    // thread sleeps longer than the most.
    #[test]
    fn the_window_grows_while_work_follows_soon_and_vanishes_when_it_does_not() {
        let t0 = Instant::now();
        let mut s = State::new(us(400));
        assert!(!s.before_park(false, t0), "no work yet: block");
        s.after_unpark(t0 + us(1000));
        assert_eq!(s.window, Duration::ZERO, "a long sleep keeps it at nothing");

        // Work every 150 µs: the thread polls through its window, blocks,
        // and is woken by the next work, sooner than a longer window would
        // have polled.
        let mut t = t0;
        let mut windows = Vec::new();
        for _ in 0..3 {
            t += us(150);
            if s.before_park(true, t) {
                assert!(!s.before_park(false, t + s.window), "the window passed");
            }
            s.after_unpark(t + us(150));
            windows.push(s.window.as_micros());
        }
        assert_eq!(windows, vec![50, 100, 200]);
        // Once the window covers the gap, work arrives while polling: no
        // sleep, no change.
        t += us(150);
        assert!(s.before_park(true, t));
        assert!(s.before_park(false, t + us(149)));
        assert!(s.before_park(true, t + us(150)));
        assert_eq!(s.window, us(200));
        // A gap of 350 µs (as a replicated write's) grows it to the most.
        t += us(150);
        assert!(!s.before_park(false, t + us(200)));
        s.after_unpark(t + us(350));
        assert_eq!(s.window, us(400));

        // Within the window after work: poll, and polling is not sleeping.
        assert!(s.before_park(true, t));
        assert!(s.before_park(false, t + us(399)));
        s.after_unpark(t + us(399));
        assert_eq!(s.window, us(400), "a poll is not a sleep");
        // Past it: block.
        assert!(!s.before_park(false, t + us(400)));

        // A sleep longer than the most ends polling.
        s.after_unpark(t + us(400) + us(401));
        assert_eq!(s.window, Duration::ZERO);
        assert!(!s.before_park(true, t + us(801)));
    }

    // Proves the runtime integration: on a current-thread runtime with the
    // hook, bytes arriving through a `Noted` reader keep the thread polling
    // (the spinner runs again and again instead of the thread blocking),
    // and once the window has passed with no more work it blocks (the
    // spinner stops running).
    #[test]
    fn a_runtime_polls_after_bytes_arrive_and_then_sleeps() {
        use tokio::io::AsyncReadExt;
        let rt = runtime(Duration::from_millis(20)).expect("runtime");
        let spins = || SPINS.with(|n| n.get());
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = l.local_addr().expect("addr");
            let writer = std::thread::spawn(move || {
                use std::io::Write;
                let mut c = std::net::TcpStream::connect(addr).expect("connect");
                c.write_all(b"work").expect("write");
                c
            });
            let (s, _) = l.accept().await.expect("accept");
            let mut r = Noted(s);
            let mut buf = [0u8; 4];
            r.read_exact(&mut buf).await.expect("read");
            let at_work = spins();
            // Polling: the spinner keeps running while the thread waits
            // for a timer it would otherwise sleep through.
            let deadline = Instant::now() + Duration::from_secs(10);
            while spins() < at_work + 10 {
                assert!(
                    Instant::now() < deadline,
                    "the thread never polled after work"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // Then it sleeps: across a whole window and more, the spinner
            // stays still.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let before = spins();
                tokio::time::sleep(Duration::from_millis(100)).await;
                if spins() == before {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the thread kept polling without work"
                );
            }
            drop(writer.join().expect("writer"));
        });
    }

    // Proves the hook wakes the spinner (so the scheduler polls instead of
    // blocking) only after work, and at most once per stored waker.
    #[test]
    fn the_hook_wakes_the_spinner_only_after_work() {
        let woken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        struct Count(std::sync::Arc<std::sync::atomic::AtomicUsize>);
        impl std::task::Wake for Count {
            fn wake(self: std::sync::Arc<Self>) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let waker = Waker::from(std::sync::Arc::new(Count(woken.clone())));
        let count = || woken.load(std::sync::atomic::Ordering::SeqCst);
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            *s = State::new(Duration::from_secs(3600));
            s.window = Duration::from_secs(3600);
            s.waker = Some(waker.clone());
        });
        before_park(Duration::from_secs(3600));
        assert_eq!(count(), 0, "no work yet: the thread may block");
        note_work();
        before_park(Duration::from_secs(3600));
        assert_eq!(count(), 1, "work just arrived: keep polling");
        before_park(Duration::from_secs(3600));
        assert_eq!(count(), 1, "the waker was taken: nothing to wake");
    }
}
