//! The group logs of a model disk, as the engine keeps them (shared by the
//! simulation and the scenario harness): an entry is durable with its
//! change (one journal commit makes both durable), a FLUSH makes the
//! cached ones durable, and a crash keeps an entry only if its change
//! survived whole. Trim points and floors (`Effect::LogFloor`) are kept
//! too: a mark of an incomplete log is durable at once (the engine
//! journals it before any write asked after it, and this disk keeps
//! writes at random), a mark of a complete one only from the next flush.

use super::{Extent, LogNote, Seq};
use std::collections::BTreeMap;

type Block = (u32, u32);
/// A log entry's extent and COMPARE AND WRITE token.
type Logged = (Extent, Option<u64>);
/// An entry whose change is cached: group, sequence, entry, and the value
/// the change wrote to each block.
type Cached = (u32, Seq, Logged, Vec<(Block, u64)>);

#[derive(Default, Clone)]
pub struct ModelLog {
    durable: BTreeMap<u32, BTreeMap<Seq, Logged>>,
    /// Entries whose change is cached, with the value it wrote to each
    /// block.
    cached: Vec<Cached>,
    /// Per group: trim point, floor, and whether the log is complete.
    states: BTreeMap<u32, (Seq, Seq, bool)>,
    /// Floors marked complete since the last flush.
    cached_floors: Vec<(u32, Seq)>,
    /// Entries added since the last flush (`Effect::LogEntries`).
    cached_adds: Vec<(u32, Seq, Extent)>,
}

impl ModelLog {
    /// A change was applied with its log entry (`Effect::Apply { log }`).
    pub fn applied(
        &mut self,
        note: LogNote,
        seq: Seq,
        extent: Extent,
        fua: bool,
        values: Vec<(Block, u64)>,
    ) {
        let logged = (extent, note.cas);
        if fua {
            self.durable.entry(note.pg).or_default().insert(seq, logged);
        } else {
            self.cached.push((note.pg, seq, logged, values));
        }
    }

    pub fn flushed(&mut self) {
        for (pg, s, e, _) in std::mem::take(&mut self.cached) {
            self.durable.entry(pg).or_default().insert(s, e);
        }
        for (pg, s, e) in std::mem::take(&mut self.cached_adds) {
            if self.states.get(&pg).is_none_or(|st| s > st.0) {
                self.durable.entry(pg).or_default().insert(s, (e, None));
            }
        }
        for (pg, f) in std::mem::take(&mut self.cached_floors) {
            let st = self.states.entry(pg).or_default();
            st.1 = st.1.max(f);
            st.2 = true;
        }
    }

    /// `Effect::LogEntries`: durable from the next flush, like a floor.
    pub fn add(&mut self, pg: u32, entries: Vec<(Seq, Extent)>) {
        self.cached_adds
            .extend(entries.into_iter().map(|(s, e)| (pg, s, e)));
    }

    /// `Effect::LogFloor`.
    pub fn floor(&mut self, pg: u32, floor: Seq, complete: bool) {
        if complete {
            self.cached_floors.push((pg, floor));
        } else {
            self.cached_floors.retain(|(g, _)| *g != pg);
            let st = self.states.entry(pg).or_default();
            st.1 = st.1.max(floor);
            st.2 = false;
        }
    }

    /// What a new process gets back (`Replicator::recover_log_state`):
    /// (pg, trim, floor, complete).
    pub fn recovered_states(&self) -> Vec<(u32, Seq, Seq, bool)> {
        self.states
            .iter()
            .map(|(pg, (t, f, c))| (*pg, *t, *f, *c))
            .collect()
    }

    /// A crash of a disk that tears writes: an entry survives only if
    /// every block still holds what its change wrote (`holds`).
    pub fn crashed(&mut self, holds: impl Fn(Block, u64) -> bool) {
        self.cached_floors.clear();
        self.cached_adds.clear();
        for (pg, s, e, values) in std::mem::take(&mut self.cached) {
            if !values.is_empty() && values.iter().all(|(b, v)| holds(*b, *v)) {
                self.durable.entry(pg).or_default().insert(s, e);
            }
        }
    }

    /// A crash that loses every cached change.
    pub fn lost_cache(&mut self) {
        self.cached.clear();
        self.cached_floors.clear();
        self.cached_adds.clear();
    }

    /// What a new process gets back (`Replicator::recover_log`).
    pub fn recovered(&self) -> Vec<(u32, Seq, Extent, Option<u64>)> {
        self.durable
            .iter()
            .flat_map(|(pg, l)| l.iter().map(move |(s, (e, c))| (*pg, *s, *e, *c)))
            .collect()
    }

    /// Forget group `pg`'s entries up to `t` (`Replicator::log_trims`).
    pub fn trim(&mut self, pg: u32, t: Seq) {
        if let Some(l) = self.durable.get_mut(&pg) {
            l.retain(|s, _| *s > t);
        }
        let st = self.states.entry(pg).or_default();
        st.0 = st.0.max(t);
        self.cached.retain(|(g, s, _, _)| *g != pg || *s > t);
    }

    /// The group left the disk (`Effect::ForgetLog`).
    pub fn forget(&mut self, pg: u32) {
        self.durable.remove(&pg);
        self.cached.retain(|(g, ..)| *g != pg);
        self.states.remove(&pg);
        self.cached_floors.retain(|(g, _)| *g != pg);
        self.cached_adds.retain(|(g, ..)| *g != pg);
    }
}
