//! Health: which nodes are up. A pure policy of (liveness, clock, grace):
//! a node is up while less than `grace` has passed since its last
//! heartbeat, or since the manager started if it has not been heard from
//! since (so a restarted manager does not declare the whole cluster down
//! before the daemons had a chance to report). A node's disks share its
//! state.
//!
//! Liveness lives in memory only; the caller owns the clock.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tessera_wire::api::HeartbeatRequest;

/// What the manager knows about one node since it started.
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub last_heartbeat: Option<Instant>,
    pub up: bool,
    /// The node's latest heartbeat: disk usage and per-volume allocation.
    pub usage: Option<HeartbeatRequest>,
    /// When it was declared down (the clock of `--down-out-after`).
    pub down_since: Option<Instant>,
    /// Recovery bytes pushed per second, from its last two heartbeats.
    pub recovery_rate: u64,
    /// When a peer last reported the node's process gone (its replication
    /// link closed): `FailureReport`.
    pub reported_failed: Option<Instant>,
}

/// How long a node a peer reported gone must also have been silent before
/// it is declared down without waiting out the grace: a little over two
/// heartbeat intervals (250 ms), so a live node whose link merely closed
/// has heartbeated since and stays up. Why: a daemon killed outright (no
/// supervisor restarting it) used to stall its groups for the whole grace
/// (2 s by default) although its peers knew within milliseconds; Ceph's
/// OSDs report failed peers to the monitors the same way.
pub const FAILURE_REPORT_SILENCE: Duration = Duration::from_millis(600);

impl Live {
    /// A node known from the catalogue but not heard from yet.
    pub fn assumed_up() -> Live {
        Live {
            up: true,
            ..Live::default()
        }
    }
}

/// Whether a node with this liveness is up at `now`.
pub fn is_up(live: &Live, started: Instant, now: Instant, grace: Duration) -> bool {
    let last = live.last_heartbeat.unwrap_or(started);
    let silent = now.saturating_duration_since(last);
    // A report counts only if made after the last heartbeat: a node heard
    // from since is alive whatever a peer saw.
    let reported = live.reported_failed.is_some_and(|t| t > last);
    silent < grace && !(reported && silent >= FAILURE_REPORT_SILENCE.min(grace))
}

/// Whether a node down since `down_since` is due to be taken out at `now`.
pub fn due_out(down_since: Option<Instant>, now: Instant, down_out_after: Duration) -> bool {
    down_since.is_some_and(|t| now.saturating_duration_since(t) >= down_out_after)
}

/// Whether one more disk may be taken out of a cluster of `total` disks of
/// which `in_now` are in: never below `min_in_ratio` of them in afterwards
/// (Ceph's `mon_osd_min_in_ratio`). Why: when much of a cluster goes silent
/// at once (a rack's switch, a power domain, the manager's own network),
/// re-placing everything onto what is left would flood the survivors with
/// backfill and could fill them, while the silent disks most likely come
/// back with their data; their groups stay degraded instead.
pub fn may_take_out(total: usize, in_now: usize, min_in_ratio: f64) -> bool {
    in_now > 0 && total > 0 && (in_now - 1) as f64 >= min_in_ratio * total as f64 - 1e-9
}

/// A `--min-in-ratio` value: a number from 0 to 1.
pub fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a ratio between 0 and 1")),
    }
}

/// Bytes per second between two samples of a byte counter (0 if the
/// counter went back: the daemon restarted).
pub fn rate(prev: (Instant, u64), now: (Instant, u64)) -> u64 {
    let dt = now.0.saturating_duration_since(prev.0).as_secs_f64();
    if dt <= 0.0 || now.1 < prev.1 {
        return 0;
    }
    ((now.1 - prev.1) as f64 / dt) as u64
}

/// The nodes whose state changes at `now`, in id order: (node id, up).
pub fn transitions(
    live: &BTreeMap<u32, Live>,
    started: Instant,
    now: Instant,
    grace: Duration,
) -> Vec<(u32, bool)> {
    live.iter()
        .filter_map(|(id, l)| {
            let up = is_up(l, started, now, grace);
            (up != l.up).then_some((*id, up))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves the grace period decides, counted from the manager's start
    // for nodes never heard from, and that only changes are reported.
    #[test]
    fn grace_period() {
        let t0 = Instant::now();
        let g = Duration::from_secs(5);
        let mut live = BTreeMap::new();
        live.insert(1, Live::assumed_up());
        live.insert(
            2,
            Live {
                last_heartbeat: Some(t0 + Duration::from_secs(4)),
                up: true,
                ..Live::default()
            },
        );
        live.insert(
            3,
            Live {
                last_heartbeat: Some(t0),
                up: false,
                ..Live::default()
            },
        );
        assert_eq!(transitions(&live, t0, t0, g), vec![(3, true)]);
        assert_eq!(
            transitions(&live, t0, t0 + Duration::from_secs(5), g),
            vec![(1, false)]
        );
        assert_eq!(
            transitions(&live, t0, t0 + Duration::from_secs(9), g),
            vec![(1, false), (2, false)]
        );
    }

    // Proves a peer's failure report declares a node down once it has
    // also been silent for FAILURE_REPORT_SILENCE (not the whole grace),
    // and counts only if made after the node's last heartbeat.
    #[test]
    fn failure_reports() {
        let t0 = Instant::now();
        let g = Duration::from_secs(2);
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut l = Live {
            last_heartbeat: Some(t0),
            up: true,
            ..Live::default()
        };
        assert!(is_up(&l, t0, ms(1000), g), "no report: the grace decides");
        l.reported_failed = Some(ms(100));
        assert!(is_up(&l, t0, ms(500), g), "reported, silent only 500 ms");
        assert!(!is_up(&l, t0, ms(600), g), "reported, silent 600 ms: down");
        l.last_heartbeat = Some(ms(550));
        assert!(is_up(&l, t0, ms(1100), g), "heard from after the report");
        assert!(!is_up(&l, t0, ms(2550), g), "the grace still applies");
    }

    // Proves the down-out clock and the recovery rate arithmetic.
    #[test]
    fn down_out_and_rate() {
        let t0 = Instant::now();
        let after = Duration::from_secs(3);
        assert!(!due_out(None, t0 + after, after));
        assert!(!due_out(Some(t0), t0 + Duration::from_secs(2), after));
        assert!(due_out(Some(t0), t0 + after, after));
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(rate((t0, 100), (t1, 1100)), 2000);
        assert_eq!(rate((t0, 100), (t1, 50)), 0);
        assert_eq!(rate((t0, 100), (t0, 200)), 0);
    }

    // Proves the min-in ratio: the last disk that keeps the ratio may go
    // out, the next may not; 0 never refuses, 1 always does.
    #[test]
    fn min_in_ratio() {
        assert!(may_take_out(4, 4, 0.75), "3 of 4 in afterwards");
        assert!(!may_take_out(4, 3, 0.75), "2 of 4 would be in");
        assert!(!may_take_out(3, 3, 0.75), "2 of 3 < 0.75");
        assert!(may_take_out(100, 76, 0.75));
        assert!(!may_take_out(100, 75, 0.75));
        assert!(may_take_out(2, 1, 0.0));
        assert!(!may_take_out(2, 0, 0.0), "nothing left to take out");
        assert!(!may_take_out(5, 5, 1.0));
    }
}
