//! Primary-copy replication of placement groups: a pure state machine
//! (inputs in, effects out; no clock, no randomness, no I/O), driven by the
//! storage daemon in production and by a seeded simulation in tests
//! (`sim.rs`). The protocol and why its invariants hold are in
//! docs/replication.md; the short version:
//!
//! * The primary of a group is a pure function of the cluster map (first up,
//!   `UpToDate` member), so one epoch never has two primaries.
//! * The primary orders every change with a sequence number `Seq { term, n }`
//!   whose `term` is the epoch its primacy began in: terms of later primaries
//!   are larger, so their changes always supersede older ones. Overlapping
//!   changes are serialised (a change starts only when every earlier
//!   overlapping one is acknowledged by all its targets), so every copy
//!   applies overlapping changes in the same order.
//! * A client write is applied locally and sent to every member whose disk is
//!   up (the write set) and acknowledged when all of them have it; it is
//!   refused (retry later) while fewer than `min_replicas` members are up.
//! * Replicas accept changes only from the primary of their own map at
//!   exactly their own epoch (fencing): a deposed primary cannot get a write
//!   acknowledged by a member that knows the new map, and the new primary
//!   serves only once it knows the new map.
//! * Every member keeps a log of recent changes (sequence and extent). The
//!   primary piggybacks `committed` (every change up to it is acknowledged by
//!   all targets) and `trim` (every change up to it is durable on every
//!   member, present or not); logs are trimmed at `trim`. A member that was
//!   away therefore missed at most the regions in the primary's log.
//! * Each log entry is made durable with its change (the driver journals it
//!   in the same commit: `Effect::Apply { log }`), and a new process starts
//!   its groups with the entries its disk kept (`recover_log`): applied,
//!   not vouched for, and uncommitted until their own term's primary said
//!   otherwise (`Pg::term_committed`), so a returning copy names the
//!   changes of a failed primary it holds and nobody else logged.
//! * A new primary peers first: it collects the uncommitted log entries of
//!   the other up-to-date members, pushes its own content of those regions
//!   to them (so in-flight writes of the old primary cannot leave copies
//!   diverged), then serves.
//! * A primary whose process is new (a group's last up-to-date copy
//!   restarted: the manager keeps it up to date, but it lost what it had not
//!   flushed) first takes back, from the members that are not up to date,
//!   the content of every change they can vouch for (applied under
//!   consecutive maps in each of which they were up, so no acknowledged
//!   change after it passed them by): a write a FLUSH made durable on them
//!   survives the restart (`Reclaim`).
//! * Outdated members (back after an absence or a restart) receive new
//!   writes at once and, in the background, the primary's content of every
//!   64 KiB region of the changes in its log after the member's durable
//!   point that the member does not hold (it flushes, then lists the
//!   changes it applied: delta recovery), or of every allocated region when
//!   the log cannot tell (full resync); then a flush, then the primary asks
//!   the manager to mark them `UpToDate`.
//! * A member counts as durable up to a flush round's point only if it
//!   answered that round in the incarnation it was asked in (a restarted
//!   process's flush says nothing of what the old one had not flushed).
//! * `Backfill` members (a disk that replaced one taken out) are always
//!   recovered by a full resync: no log can tell what they miss.
//! * A push carries up to `push_regions` (at most `PUSH_REGIONS_MAX`)
//!   contiguous regions to push to one member (one read, one message, one
//!   write).
//! * Recovery pushes are throttled daemon-wide: at most `pushes_max` regions
//!   in flight over all groups (groups that wait get the freed slots in
//!   turn) and, when the driver grants a byte budget, no region is pushed
//!   without 64 KiB of it left. The driver owns the clock and refills the
//!   budget.
//!
//! The type `D` is the data of a write (bytes in the daemon, block labels in
//! the simulation).

pub mod codec;
#[cfg(test)]
mod model_log;
#[cfg(test)]
mod scenario;
#[cfg(test)]
mod sim;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use tessera_wire::map::{ClusterMap, CopyState};

/// Granularity of change tracking and recovery.
pub const REGION_BYTES: u32 = 64 * 1024;
/// Log entries a group keeps before it gives up tracking and falls back to
/// a full resync of returning members.
pub const LOG_ENTRIES_MAX: usize = 1 << 20;
/// Client changes a primary queues (behind conflicts or peering) before it
/// answers "retry later".
pub const QUEUE_MAX: usize = 4096;
/// Recovery pushes in flight per group.
pub const PUSHES_INFLIGHT_MAX: usize = 16;
/// Regions one recovery push may carry (1 MiB): contiguous regions to push
/// to one member go as one read, one message and one write instead of that
/// many round trips of 64 KiB. The daemon picks how many, up to this
/// (`set_push_regions`).
pub const PUSH_REGIONS_MAX: u32 = 16;
/// Bytes one push costs against the byte budget (its region, whatever
/// part of it is allocated).
const PUSH_COST_BYTES: u64 = REGION_BYTES as u64;
/// Messages for a newer epoch held until the map catches up.
pub const FUTURE_MAX: usize = 4096;
/// Ticks a message waits for its answer before it is sent again.
pub const RESEND_TICKS: u64 = 5;
/// Repairs a primary queues per group (read repairs of its own copy or
/// asked by members, and scrub findings) before it refuses new ones.
pub const REPAIRS_MAX: usize = 1024;
/// Read repairs a member has asked its primary for and not heard back on.
pub const ASKS_MAX: usize = 1024;
/// Regions a group's scrub checks at once.
pub const SCRUB_INFLIGHT_MAX: usize = 4;
/// Runs of applied changes a member lists when asked what it holds (the
/// rest are pushed again: harmless).
pub const HOLDS_RUNS_MAX: usize = 65_536;
/// Fetches a restarted primary keeps in flight while it takes back what
/// the other members hold (see `Reclaim`).
pub const RECLAIM_FETCHES_MAX: usize = 16;
/// Bytes of one block: the unit a repair rewrites whole (a partial write of
/// a block whose CRC fails cannot merge into it).
pub const BLOCK_BYTES: u32 = 4096;

/// The order of changes in a placement group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Seq {
    /// Epoch in which the issuing primary's term began.
    pub term: u64,
    pub n: u64,
}

/// A byte range inside one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Extent {
    pub volume_id: u64,
    pub chunk_index: u32,
    pub offset: u32,
    pub length: u32,
}

impl Extent {
    pub fn end(&self) -> u32 {
        self.offset + self.length
    }

    pub fn overlaps(&self, o: &Extent) -> bool {
        self.volume_id == o.volume_id
            && self.chunk_index == o.chunk_index
            && self.offset < o.end()
            && o.offset < self.end()
    }

    /// The smallest block-aligned extent covering this one.
    pub fn blocks(&self) -> Extent {
        let offset = self.offset / BLOCK_BYTES * BLOCK_BYTES;
        let end = self.end().div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        Extent {
            offset,
            length: end - offset,
            ..*self
        }
    }

    /// The 64 KiB regions the extent touches.
    pub fn regions(&self) -> impl Iterator<Item = Region> + '_ {
        let first = self.offset / REGION_BYTES;
        let last = (self.end().max(1) - 1) / REGION_BYTES;
        (first..=last).map(move |index| Region {
            volume_id: self.volume_id,
            chunk_index: self.chunk_index,
            index,
        })
    }
}

/// One 64 KiB-aligned region of a chunk: the unit of recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Region {
    pub volume_id: u64,
    pub chunk_index: u32,
    pub index: u32,
}

impl Region {
    pub fn extent(&self) -> Extent {
        Extent {
            volume_id: self.volume_id,
            chunk_index: self.chunk_index,
            offset: self.index * REGION_BYTES,
            length: REGION_BYTES,
        }
    }
}

/// What a change does to its extent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change<D> {
    Write(D),
    Zeroes,
    Trim,
}

impl<D> Change<D> {
    fn is_write(&self) -> bool {
        matches!(self, Change::Write(_))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update<D> {
    pub seq: Seq,
    pub extent: Extent,
    pub change: Change<D>,
    pub fua: bool,
}

/// A log entry a disk gave back: sequence, extent, COMPARE AND WRITE token.
type Recovered = (Seq, Extent, Option<u64>);

/// A change's entry in its group's log, as `Effect::Apply` gives it to the
/// driver to make durable with the change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogNote {
    pub pg: u32,
    /// The change is a COMPARE AND WRITE's write with this token.
    pub cas: Option<u64>,
}

/// The answer to a replicated change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckResult {
    Ok,
    /// The receiver's map is newer than the sender's epoch.
    Stale,
    /// The sender is not the primary in the receiver's map.
    NotPrimary,
    /// The receiver's disk failed the change.
    Failed,
    /// The change is not whole 4 KiB blocks and a block it had to merge
    /// with failed its CRC on the receiver: nothing was written there. The
    /// primary rewrites that copy's blocks from a good copy (which has the
    /// change) before it answers the client.
    BadBlock,
}

/// A copy's digest of one extent, computed from a read of it that verified
/// every block's own CRC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Digest {
    /// Some block failed its CRC (or the read failed): this copy is bad.
    Bad,
    /// A hash of the content (never-written blocks hash as zeroes, so an
    /// unallocated block equals an allocated block of zeroes).
    Sum(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body<D> {
    /// Primary -> member: apply a change. `committed` and `trim` travel with
    /// it (see the module comment).
    Replicate {
        update: Update<D>,
        committed: Seq,
        trim: Seq,
        /// The token of the COMPARE AND WRITE this change is the write of:
        /// a member that holds the change may answer a resend of it after
        /// a failover (`Pg::cas_pending`).
        cas: Option<u64>,
    },
    Ack {
        seq: Seq,
        result: AckResult,
    },
    /// New primary -> member: your uncommitted log entries (and, when `full`,
    /// every allocated region of the group).
    LogQuery {
        full: bool,
    },
    /// `committed`: the member's commit point (its entries up to it are
    /// not listed; peering trusts the highest commit point it hears of).
    LogReply {
        entries: Vec<(Seq, Extent)>,
        regions: Vec<Region>,
        full: bool,
        committed: Seq,
    },
    /// Primary -> member: make everything durable. `committed` and `trim`
    /// travel with it as with a change (so a quiet member learns that its
    /// last changes were committed).
    Flush {
        round: u64,
        trim: Seq,
        committed: Seq,
    },
    Flushed {
        round: u64,
    },
    /// Member -> primary: a read of my copy of `extent` failed its CRC;
    /// rewrite it from a good copy (in your order of changes).
    RepairReq {
        id: u64,
        extent: Extent,
    },
    /// Primary -> member: the repair asked as `id` is done (`ok`) or no good
    /// copy exists.
    Repaired {
        id: u64,
        ok: bool,
    },
    /// Primary -> member: send me your copy of `extent` (a repair source).
    Fetch {
        id: u64,
        extent: Extent,
    },
    /// `ok` false: the copy failed its CRC. `extent` is the (possibly
    /// clamped) extent read; `data` is `None` when it reads as zeroes.
    Fetched {
        id: u64,
        ok: bool,
        extent: Extent,
        data: Option<D>,
    },
    /// Primary -> member: digest your copy of `extent` (scrub).
    DigestReq {
        id: u64,
        extent: Extent,
    },
    DigestReply {
        id: u64,
        digest: Digest,
    },
    /// Primary -> member being delta-recovered: make what you applied
    /// durable, then say which changes you hold.
    HoldsQuery {
        id: u64,
    },
    /// Member -> primary: every change up to `trim`, and every change in
    /// `runs`, is durable here (`runs` may leave some out, never add one).
    Holds {
        id: u64,
        trim: Seq,
        runs: Vec<SeqRun>,
    },
    /// A primary whose process is new (it may have lost changes it applied
    /// and had not flushed) -> a member that is not up to date: which
    /// changes you applied can you vouch for?
    ReclaimQuery,
    /// Member -> primary: changes applied here such that every change
    /// acknowledged after them reached this copy too (see `Pg::vouched_after`),
    /// so this copy's content of their extents is at least as new as them.
    ReclaimReply {
        entries: Vec<(Seq, Extent)>,
    },
}

/// Changes `first..=last` of one primary term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRun {
    pub term: u64,
    pub first: u64,
    pub last: u64,
}

impl SeqRun {
    pub fn contains(&self, s: Seq) -> bool {
        s.term == self.term && self.first <= s.n && s.n <= self.last
    }
}

/// The runs of consecutive sequences in `set` (in order), at most `max`.
fn runs_of(set: &BTreeSet<Seq>, max: usize) -> Vec<SeqRun> {
    let mut out: Vec<SeqRun> = Vec::new();
    for s in set {
        if let Some(r) = out.last_mut()
            && r.term == s.term
            && r.last + 1 == s.n
        {
            r.last = s.n;
            continue;
        }
        if out.len() == max {
            break;
        }
        out.push(SeqRun {
            term: s.term,
            first: s.n,
            last: s.n,
        });
    }
    out
}

/// A message between two disks about one placement group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg<D> {
    pub pg: u32,
    pub from: u32,
    pub to: u32,
    /// The sender's map epoch.
    pub epoch: u64,
    pub body: Body<D>,
}

/// How a client change ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientResult {
    Ok,
    /// A COMPARE AND WRITE found a difference at this offset of its compare
    /// data (`CompareData::first_difference`) and wrote nothing.
    Miscompare(u32),
    /// Not served here or not now (not primary, peering, too few copies,
    /// deposed mid-flight): the client refreshes its map and retries.
    Retry,
    /// A disk failed the change.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect<D> {
    Send(Msg<D>),
    /// Apply a change to the local disk; answer with `Input::Applied`.
    /// `log: Some(note)`: the change is an entry of group `note.pg`'s log
    /// (`note.cas`: a COMPARE AND WRITE's write with that token); the
    /// driver makes the entry durable exactly when it makes the change
    /// durable (engine `LogTag`), and gives the entries back after a
    /// restart (`Replicator::recover_log`).
    Apply {
        disk: u32,
        token: u64,
        update: Update<D>,
        log: Option<LogNote>,
    },
    /// The group left this disk: the driver forgets its persisted log.
    ForgetLog {
        disk: u32,
        pg: u32,
    },
    /// Add entries to group `pg`'s log on `disk` (changes taken back, whose
    /// content is durable there already): engine `Request::LogAdd`,
    /// journalled with the next commit, in order with `LogFloor`.
    LogEntries {
        disk: u32,
        pg: u32,
        entries: Vec<(Seq, Extent)>,
    },
    /// Persist whether group `pg`'s log on `disk` holds every change above
    /// `floor` (and above its trim point) that the disk holds (engine
    /// `Request::LogFloor`, journalled before any write asked after it): a
    /// process restarted from that disk starts from a complete log, and as
    /// the group's last up-to-date copy recovers the others by delta.
    LogFloor {
        disk: u32,
        pg: u32,
        floor: Seq,
        complete: bool,
    },
    /// A hint, no answer: the primary will `Apply` this change to its own
    /// copy once an up-to-date replica has it (or drop it). The driver may
    /// write the data now, without mapping it, so that the later `Apply`
    /// only maps it (engine `Stage` / `Install`): the primary's disk write
    /// then runs in parallel with the replicas' instead of after them, and
    /// a crash before the `Apply` still leaves nothing of the change on
    /// this copy. A driver that ignores it loses nothing but time; it must
    /// give back what it staged if no `Apply` of `(disk, update.seq,
    /// update.extent)` follows.
    Stage {
        disk: u32,
        update: Update<D>,
    },
    /// Read an extent of the local disk for a recovery push; answer with
    /// `Input::ReadDone` (the driver may clamp the extent to the volume).
    Read {
        disk: u32,
        token: u64,
        extent: Extent,
    },
    /// List the allocated regions of a group on the local disk; answer with
    /// `Input::Regions`.
    ListRegions {
        disk: u32,
        token: u64,
        pg: u32,
    },
    /// Make the local disk durable; answer with `Input::Flushed`.
    Flush {
        disk: u32,
        token: u64,
    },
    Reply {
        client: u64,
        result: ClientResult,
    },
    /// Ask the manager to mark `disk`'s copy of `pg` up to date.
    ReportClean {
        pg: u32,
        disk: u32,
        epoch: u64,
    },
    /// Digest an extent of the local disk, verifying every block's CRC;
    /// answer with `Input::Digested` (the driver may clamp the extent).
    Digest {
        disk: u32,
        token: u64,
        extent: Extent,
    },
    /// A peer has a newer map: fetch it.
    NeedMap,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input<D> {
    /// A client change addressed to `disk` as primary of `pg`.
    Client {
        pg: u32,
        disk: u32,
        client: u64,
        extent: Extent,
        change: Change<D>,
        fua: bool,
    },
    Msg(Msg<D>),
    Applied {
        token: u64,
        ok: bool,
    },
    /// `data` is `None` when the extent reads as zeroes; `extent` is the
    /// (possibly clamped) extent read, empty if the volume is gone.
    ReadDone {
        token: u64,
        extent: Extent,
        data: Option<D>,
    },
    Regions {
        token: u64,
        regions: Vec<Region>,
    },
    Flushed {
        token: u64,
        ok: bool,
    },
    Map(Arc<ClusterMap>),
    Tick,
    /// A `Read` effect failed: a block of the local copy failed its CRC (or
    /// the disk failed the read).
    ReadFailed {
        token: u64,
    },
    Digested {
        token: u64,
        digest: Digest,
    },
    /// A client read of `extent` on `disk` found a block failing its CRC:
    /// repair the copy from a good one, then answer `client` (`Ok`: read
    /// again, the copy is good; `Failed`: no good copy; `Retry`: ask the
    /// primary).
    Repair {
        pg: u32,
        disk: u32,
        client: u64,
        extent: Extent,
    },
    /// Scrub every group this daemon leads (or only `pg`).
    Scrub {
        pg: Option<u32>,
    },
    /// A COMPARE AND WRITE addressed to `disk` as primary of `pg`: if the
    /// copy's content of `extent` equals `compare`, write `data` there as a
    /// client change; nothing overlapping changes in between. `token`
    /// names the request across resends (see `Pg::cas_done`).
    CompareAndWrite {
        pg: u32,
        disk: u32,
        client: u64,
        extent: Extent,
        compare: D,
        data: D,
        token: u64,
        fua: bool,
    },
    /// An `Apply` wrote nothing because the change is not whole 4 KiB
    /// blocks and a block it had to merge with failed its CRC (a corrupt
    /// block): the copy is repaired from a good one, which has the change,
    /// instead of failing the client's write.
    ApplyBadBlock {
        token: u64,
    },
    /// The link to the daemon of `disk` broke (its process died: the kernel
    /// closed its sockets), before any map says so: every group this daemon
    /// leads with `disk` in its write set settles (`Replicator::settle`)
    /// now, not only once the manager's map shows the loss up to a
    /// heartbeat grace later; a member whose primary it was flushes its own
    /// copy. A false alarm costs one flush and the group's pause for it.
    MemberLost {
        disk: u32,
    },
}

/// Whether a read may be served by `disk` for `pg` now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadCheck {
    Ok,
    Retry,
}

/// The view of one group in one map.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct View {
    epoch: u64,
    members: Vec<u32>,
    states: Vec<CopyState>,
    up: Vec<bool>,
    incarnations: Vec<u64>,
    primary: Option<u32>,
    min_replicas: usize,
}

impl View {
    fn of(map: &ClusterMap, pg: u32) -> View {
        let members = map.pgs[pg as usize].clone();
        View {
            epoch: map.epoch,
            states: (0..members.len()).map(|i| map.copy_state(pg, i)).collect(),
            up: members
                .iter()
                .map(|d| map.disk(*d).is_some_and(|d| d.up))
                .collect(),
            incarnations: members
                .iter()
                .map(|d| map.disk(*d).map_or(0, |d| d.incarnation))
                .collect(),
            primary: map.primary(pg),
            min_replicas: map.min_replicas(pg) as usize,
            members,
        }
    }

    fn write_set(&self) -> Vec<u32> {
        self.members
            .iter()
            .zip(&self.up)
            .filter(|(_, up)| **up)
            .map(|(d, _)| *d)
            .collect()
    }

    fn state(&self, disk: u32) -> Option<CopyState> {
        let i = self.members.iter().position(|d| *d == disk)?;
        Some(self.states[i])
    }

    fn incarnation(&self, disk: u32) -> u64 {
        self.members
            .iter()
            .position(|d| *d == disk)
            .map_or(0, |i| self.incarnations[i])
    }
}

/// A change in flight at the primary: a client write or a recovery push.
struct Op<D> {
    update: Update<D>,
    client: Option<u64>,
    /// Members that have not acknowledged yet.
    waiting: BTreeSet<u32>,
    local_pending: bool,
    /// The local apply waits for the first up-to-date replica to have the
    /// change (see `pump`).
    local_started: bool,
    sent_tick: u64,
    /// For a push: the member and the regions (contiguous, as read) being
    /// recovered.
    push: Option<(u32, Extent)>,
    /// A push whose local read has not returned yet.
    reading: bool,
    failed: bool,
    /// A repair (the copies being rewritten are `waiting`, and the local
    /// copy when `local_pending`): counted as repaired when it completes.
    repair: Option<RepairOrigin>,
    /// For a repair: the copies it rewrites.
    repaired: BTreeSet<u32>,
    /// Copies (this one included) that could not apply the change because
    /// a block it merges with failed its CRC: repaired from a good copy
    /// before the client is answered (`AckResult::BadBlock`).
    bad_copies: BTreeSet<u32>,
}

/// Who a repair answers when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RepairOrigin {
    /// A client read on the primary's own copy.
    Client(u64),
    /// A member's `RepairReq { id }`.
    Member(u32, u64),
    /// A scrub finding.
    Scrub,
    /// Our own copy, found bad by a recovery push.
    Internal,
    /// One block of a check split block by block: the `Split` of this id.
    Part(u64),
    /// A client change that some copies could not apply over a corrupt
    /// block (`Op::bad_copies`): its client (if any) is answered when the
    /// repair ends, and until then the commit point stays below it
    /// (`Primary::unsettled`), so a new primary's peering still treats it as
    /// uncertain and makes every copy agree if this one fails first.
    Change { seq: Seq, client: Option<u64> },
}

/// A check whose extent no copy could give whole (each copy failed on some
/// block of it), checked again block by block: every copy's digest of each
/// block names the copies good for that block, so a block with a good copy
/// anywhere is repaired from it. `origin` is answered once every block is
/// done, `ok` only if each was.
struct Split {
    origin: RepairOrigin,
    left: usize,
    ok: bool,
}

/// A repair waiting to start: rewrite `targets`' copies of `extent` from a
/// good copy.
struct RepairJob {
    extent: Extent,
    targets: BTreeSet<u32>,
    origin: RepairOrigin,
}

/// What a check (a repair or a scrub of one region, before its rewrite) is
/// doing. A check holds its extent like a change in flight: no client
/// change overlapping it starts until it ends or becomes a rewrite `Op`, so
/// every copy it reads holds every change acknowledged before it, and no
/// change made after it is overwritten by its rewrite.
enum Stage {
    /// Waiting for the digests of these members (scrub).
    Digest {
        waiting: BTreeSet<u32>,
        digests: BTreeMap<u32, Digest>,
    },
    /// Reading the primary's own copy.
    ReadLocal,
    /// Reading `source`'s copy (the primary's is bad).
    Fetch { source: u32 },
}

struct Check {
    extent: Extent,
    targets: BTreeSet<u32>,
    /// Members that failed as a source.
    tried: BTreeSet<u32>,
    origin: RepairOrigin,
    stage: Stage,
    sent_tick: u64,
}

/// A scrub of one group under way at its primary.
#[derive(Default)]
struct ScrubRun {
    /// Members whose list of allocated regions has not arrived.
    listing: BTreeSet<u32>,
    todo: BTreeSet<Region>,
    inflight: usize,
}

/// A read repair a member asked its primary for.
struct Ask {
    client: u64,
    extent: Extent,
    sent_tick: u64,
}

struct Queued<D> {
    client: u64,
    extent: Extent,
    change: Change<D>,
    fua: bool,
    /// A COMPARE AND WRITE not compared yet: the bytes to compare and the
    /// request's token (`change` is the write).
    compare: Option<(D, u64)>,
    /// The write of a COMPARE AND WRITE that matched: its token, remembered
    /// once the change is acknowledged.
    cas: Option<u64>,
}

impl<D> Queued<D> {
    /// A client's change as it arrives (not compared or matched yet).
    fn new(
        client: u64,
        extent: Extent,
        change: Change<D>,
        fua: bool,
        compare: Option<(D, u64)>,
    ) -> Queued<D> {
        Queued {
            client,
            extent,
            change,
            fua,
            compare,
            cas: None,
        }
    }
}

/// A COMPARE AND WRITE reading the primary's copy to compare. It holds its
/// extent like a change in flight, so the copy it reads holds every change
/// acknowledged before it and nothing overlapping starts until its write
/// (or its miscompare) is decided.
struct Compare<D> {
    client: u64,
    extent: Extent,
    compare: D,
    data: D,
    fua: bool,
    token: u64,
    /// A resend of a write this copy held when its term began: compared
    /// against its own data and, still in place, written again
    /// (`pump`); replaced since, answered `Ok`.
    reassert: bool,
}

/// Data a primary can compare for COMPARE AND WRITE.
pub trait CompareData {
    /// Where `actual` (`None`: the extent reads as zeroes) first differs
    /// from `expected` (in bytes for byte data), or `None` when equal.
    fn first_difference(expected: &Self, actual: Option<&Self>) -> Option<u32>;
}

/// COMPARE AND WRITE tokens a group remembers as written (`Pg::cas_done`).
const CAS_TOKENS_MAX: usize = 1024;

#[derive(Default)]
struct Recovery {
    todo: BTreeSet<Region>,
    /// A delta recovery first asks the member what it holds (the query's
    /// id); meanwhile `entries` are the log entries it may miss (above its
    /// durable point) and nothing is pushed.
    asking: Option<u64>,
    entries: Vec<(Seq, Extent)>,
    /// Outstanding region listings of a full resync (local and remote).
    listing: u8,
    incarnation: u64,
    /// All pushes done and flushed: waiting for the manager.
    done: bool,
    /// A full resync (every allocated region on either side), not a delta.
    full: bool,
    flush_round: Option<u64>,
    bytes: u64,
    /// A delta recovery also asks the member for its uncommitted log
    /// entries (`LogQuery`) and ends only once they came: it may hold a
    /// change of an old primary that was in flight when that primary failed
    /// and that no up-to-date copy got (the old primary writes its own copy
    /// only once an up-to-date replica has a change), which our log cannot
    /// name; their regions are pushed whatever the member holds (`must`).
    entries_asked: bool,
    must: BTreeSet<Region>,
}

struct Round {
    covered: Seq,
    /// Members flushed by the round, with the incarnation the flush was
    /// asked of: they become durable up to `covered` when it ends. A member
    /// that leaves the write set or restarts before it answered is dropped
    /// (the flush of a new process says nothing of what the old one had not
    /// flushed), so it stays at the durable point it had, and the round
    /// ends without it.
    members: BTreeMap<u32, u64>,
    /// Members (and this primary) that have not answered yet.
    waiting: BTreeSet<u32>,
    /// `Some(member)` for the flush that ends a member's recovery.
    recovered: Option<u32>,
    sent_tick: u64,
}

struct Primary<D> {
    term: u64,
    next_n: u64,
    active: bool,
    peering: BTreeSet<u32>,
    /// Uncommitted log entries the peers reported, and the highest commit
    /// point any of them knows.
    peer_entries: Vec<(Seq, Extent)>,
    peer_committed: Seq,
    peer_sent_tick: u64,
    ops: BTreeMap<Seq, Op<D>>,
    queue: VecDeque<Queued<D>>,
    recovering: BTreeMap<u32, Recovery>,
    durable: BTreeMap<u32, Seq>,
    rounds: BTreeMap<u64, Round>,
    pushes: usize,
    checks: BTreeMap<u64, Check>,
    /// Checks split block by block, by the id of the check they replace.
    splits: BTreeMap<u64, Split>,
    /// Changes acknowledged by every copy but not applied by some (a
    /// corrupt block), whose repair has not ended: the commit point stays
    /// below the first (`RepairOrigin::Change`).
    unsettled: BTreeSet<Seq>,
    /// COMPARE AND WRITEs comparing, by the token of their local read.
    compares: BTreeMap<u64, Compare<D>>,
    /// Changes in flight that are a COMPARE AND WRITE's write: their token.
    cas_writes: BTreeMap<Seq, u64>,
    /// Tokens of COMPARE AND WRITE writes this copy held, not known to be
    /// acknowledged, when its term began: its peering makes every copy
    /// agree with its content, so a resend of one is answered `Ok`, but
    /// only once that peering's pushes are done (`commit_floor` cleared):
    /// before, this copy may be the only one holding the write. Dropped
    /// with the term.
    cas_peered: BTreeSet<u64>,
    repairs: VecDeque<RepairJob>,
    scrub: Option<ScrubRun>,
    /// While peering's pushes to up-to-date members are not all done, the
    /// commit point stays where it was when peering ended: the regions it
    /// found uncertain may still differ between copies, and a member told
    /// they are committed would not report them to the next primary if this
    /// one fails first (found by the scrub's checker in the simulation).
    commit_floor: Option<Seq>,
    /// A primary whose process is new takes back, before it serves, what the
    /// members that are not up to date hold of the changes it may have lost.
    reclaim: Option<Reclaim>,
    /// Making this copy durable before the group goes on (`settle`): set
    /// when this primary starts a term or a member of the write set left or
    /// restarted; `Some` token while the flush is in flight (`None` with
    /// `settling`: waiting for local writes in flight, or to be asked again
    /// on the next tick after a failed flush).
    settling: bool,
    settle_token: Option<u64>,
    /// A local write of a change completed after the last flush was asked:
    /// that flush does not cover it, so another one follows.
    settle_dirty: bool,
    /// The trim point the last flush round told the members: once the
    /// log is trimmed past it, one more round tells them the new one (a
    /// member otherwise learns it only with the next change, and its disk
    /// keeps entries a restarted process would push again).
    trim_announced: Seq,
}

/// Taking back the changes a restarted primary may have lost. The manager
/// keeps a group's last up-to-date copy up to date when its daemon restarts
/// (no other copy is known to hold every acknowledged write), but the new
/// process lost whatever the old one had applied and not flushed; the
/// members that are not up to date were in the write set and may hold those
/// changes, durably if a client FLUSH reached them. So the new primary asks
/// each of them for the changes it can vouch for, takes the content of each
/// block from the member holding its newest such change, writes it to its own
/// copy, and only then serves and resyncs the others from its copy.
#[derive(Default)]
struct Reclaim {
    /// Members asked, with their incarnation when asked.
    incarnations: BTreeMap<u32, u64>,
    /// Members asked that have not answered.
    asking: BTreeSet<u32>,
    /// Vouched changes reported: (seq, extent, member).
    entries: Vec<(Seq, Extent, u32)>,
    /// Pieces to fetch, each from the member holding the newest change of
    /// it: (member, extent).
    todo: VecDeque<(u32, Extent)>,
    /// Fetches in flight: id -> (member, extent, tick sent).
    fetching: BTreeMap<u64, (u32, Extent, u64)>,
    /// Local writes of fetched pieces in flight.
    applying: usize,
    /// Regions written here: made to agree on the up-to-date members too.
    regions: BTreeSet<Region>,
    /// The changes taken back, logged in memory at once, and on the disk
    /// (`Effect::LogEntries`) once every piece is written there.
    logged: Vec<(Seq, Extent)>,
}

impl Reclaim {
    fn done(&self) -> bool {
        self.asking.is_empty()
            && self.entries.is_empty()
            && self.todo.is_empty()
            && self.fetching.is_empty()
            && self.applying == 0
    }
}

impl<D> Primary<D> {
    /// Whether a change or check in flight covers part of `e`.
    fn busy(&self, e: &Extent) -> bool {
        self.ops.values().any(|o| o.update.extent.overlaps(e))
            || self.checks.values().any(|c| c.extent.overlaps(e))
            || self.compares.values().any(|c| c.extent.overlaps(e))
    }
}

/// One local disk's membership in one placement group.
struct Pg<D> {
    pg: u32,
    me: u32,
    view: View,
    log: BTreeMap<Seq, Extent>,
    /// Whether `log` holds every change since the higher of `trim` and
    /// `floor` that another copy may lack (each at its own sequence, or
    /// covered by a later entry whose region holds it: a push).
    complete: bool,
    /// Changes up to here may be missing from `log` even when `complete`:
    /// entries the disk dropped before this process started, or the
    /// changes before a log began to be kept. A member not durable up to
    /// here is recovered by a full resync.
    floor: Seq,
    /// Whether the disk's persisted log was last marked complete
    /// (`Effect::LogFloor`): it is not while this copy holds content
    /// without entries (pieces taken back, changes applied after the
    /// in-memory log was cleared).
    disk_complete: bool,
    trim: Seq,
    committed: Seq,
    /// Changes applied here since `trim`: a resent or duplicated change is
    /// acknowledged without applying it again. Exact sequences, not regions:
    /// two changes to different blocks of one region may arrive in either
    /// order, and neither supersedes the other.
    applied: BTreeSet<Seq>,
    /// Replica changes being applied: seq -> (extent, members to ack).
    applying: BTreeMap<Seq, (Extent, Vec<u32>)>,
    /// Read repairs asked of the primary, by id.
    asks: BTreeMap<u64, Ask>,
    primary: Option<Primary<D>>,
    /// This process holds nothing of the group yet: it has applied no change
    /// of it. A new process that leads (the group's last up-to-date copy,
    /// restarted) may have lost changes its old process applied: it takes
    /// them back first (`Reclaim`).
    fresh: bool,
    /// Changes up to this one may have been followed by an acknowledged
    /// change this copy did not get, so it cannot vouch for them. A change
    /// it applied under a run of consecutive maps in each of which it was an
    /// up member (in every write set) was followed by no acknowledged change
    /// it missed: every primary acknowledges a change only once every member
    /// of its write set applied it, at exactly the epoch of the map. So when
    /// a map shows this disk down, or skips epochs without saying (the
    /// disk's `up_since`) that it was up in all of them, every change it
    /// has logged so far becomes unvouched.
    vouched_after: Seq,
    /// Tokens of COMPARE AND WRITEs this process acknowledged as written,
    /// newest last (at most `CAS_TOKENS_MAX`): a gateway that lost the
    /// answer resends the request, which would now find its own write and
    /// miscompare; it is answered `Ok` instead. Kept across terms of this
    /// process; not known to other members (a resend after a failover
    /// compares again).
    cas_done: VecDeque<u64>,
    /// A member's COMPARE AND WRITE writes being applied: seq -> (token,
    /// primary that sent it).
    cas_applying: BTreeMap<Seq, (u64, u32)>,
    /// A member's COMPARE AND WRITE writes applied and not known to be
    /// acknowledged. One becomes done (`cas_done`) when its primary's
    /// commit point passes it (acknowledged, never undone), or when this
    /// copy begins a term (peering makes every copy agree with its content,
    /// which holds the write). Dropped when a change of a newer term
    /// arrives or the map names another primary than the one that sent it
    /// and this copy: that primary may have made the region agree with a
    /// copy that never got the write.
    cas_pending: BTreeMap<Seq, (u64, u32)>,
    /// Changes since `trim` this member could not apply because a block
    /// they merge with failed its CRC (`AckResult::BadBlock`): a duplicate
    /// of one is answered the same, never applied later over newer changes
    /// (the primary repairs this copy's blocks instead).
    refused: BTreeSet<Seq>,
    /// The trim point the driver was last given (`Replicator::log_trims`).
    trim_saved: Seq,
    /// Per term, the highest change this copy knows its own term's primary
    /// committed. `committed` orders commit points across terms, which
    /// says something of an older term's changes only for copies that were
    /// up to date when each later term peered (peering made their
    /// uncertain changes agree); a change this copy applied while outdated,
    /// or got back from its disk's log after a restart, is known committed
    /// only by its own term's commit point. What this copy reports as
    /// uncommitted (`uncommitted`) uses this.
    term_committed: BTreeMap<u64, u64>,
}

enum Token {
    Apply {
        pg: u32,
        disk: u32,
        seq: Seq,
    },
    Read {
        pg: u32,
        disk: u32,
        seq: Seq,
    },
    ListLocal {
        pg: u32,
        disk: u32,
        member: u32,
    },
    ListForQuery {
        pg: u32,
        disk: u32,
        to: u32,
        epoch: u64,
    },
    Flush {
        pg: u32,
        disk: u32,
        round: u64,
    },
    FlushForPeer {
        pg: u32,
        disk: u32,
        to: u32,
        round: u64,
    },
    /// The primary's read of its own copy for check `id`.
    CheckRead {
        pg: u32,
        disk: u32,
        id: u64,
    },
    /// The primary's read of its own copy for COMPARE AND WRITE `id`.
    CompareRead {
        pg: u32,
        disk: u32,
        id: u64,
    },
    /// The primary's digest of its own copy for check `id`.
    CheckDigest {
        pg: u32,
        disk: u32,
        id: u64,
    },
    FetchForPeer {
        pg: u32,
        disk: u32,
        to: u32,
        id: u64,
    },
    DigestForPeer {
        pg: u32,
        disk: u32,
        to: u32,
        id: u64,
    },
    ScrubList {
        pg: u32,
        disk: u32,
    },
    /// A member's flush before it answers `HoldsQuery { id }`, with what it
    /// held when the flush was asked.
    /// A restarted primary's local write of a piece it took back.
    Reclaim {
        pg: u32,
        disk: u32,
    },
    HoldsForPeer {
        pg: u32,
        disk: u32,
        to: u32,
        id: u64,
        trim: Seq,
        runs: Vec<SeqRun>,
    },
    /// The primary's flush of its own copy before the group goes on.
    Settle {
        pg: u32,
        disk: u32,
    },
    /// A member's flush after its primary's process died (nothing waits).
    Durable,
}

/// Counters the daemon turns into metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes and regions pushed to members that are not up to date
    /// (recovery and backfill).
    pub recovery_bytes: u64,
    pub recovery_regions: u64,
    /// Bytes and regions a new primary pushed to up-to-date members to make
    /// the regions of changes that may be missing on some of them agree
    /// (peering), counted apart from recovery.
    pub peering_bytes: u64,
    pub peering_regions: u64,
    pub peerings: u64,
    /// Copies of extents rewritten from a good copy (read repair and scrub).
    pub repairs: u64,
    /// Bytes those rewrites wrote, summed over the copies rewritten.
    pub repair_bytes: u64,
    /// Repairs that found no good copy to take the data from.
    pub unrepairable: u64,
    /// Scrubs of a group completed, and regions they compared.
    pub scrubs: u64,
    pub scrub_regions: u64,
    /// Copies of regions a scrub found bad (a block failing its CRC) or
    /// different from the authoritative copy.
    pub scrub_errors: u64,
    /// Of those, copies whose blocks all verified but whose content differed
    /// from the authority's (never expected: the protocol keeps copies
    /// identical; a corrupt block fails its own CRC instead).
    pub scrub_mismatches: u64,
    /// Scrubs aborted by a change of primary or membership.
    pub scrubs_aborted: u64,
    /// Bytes a restarted primary took back from members before it served
    /// (changes its old process may have lost; see `Reclaim`).
    pub reclaimed_bytes: u64,
    /// Flushes a primary made of its own copy before going on, because a
    /// member of the write set left or restarted or its term began
    /// (`Replicator::settle`).
    pub settles: u64,
    /// Recoveries of a member started: from the log (delta) or of every
    /// allocated region (full resync; backfills included).
    pub delta_recoveries: u64,
    pub full_resyncs: u64,
}

/// Per-group summary for metrics and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PgSummary {
    pub primaries: u32,
    pub degraded: u32,
    pub recovering: u32,
    pub scrubbing: u32,
    /// Led groups filling a `Backfill` member.
    pub backfilling: u32,
}

/// The recoveries this daemon runs as primary, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Bytes pushed so far by the recoveries under way.
    pub done_bytes: u64,
    /// Bytes still to push (regions known so far, pushes in flight).
    pub remaining_bytes: u64,
    pub copies_recovering: u32,
    pub copies_backfilling: u32,
}

/// The replication state of every local disk in every group.
pub struct Replicator<D> {
    disks: BTreeSet<u32>,
    map: Option<Arc<ClusterMap>>,
    pgs: BTreeMap<(u32, u32), Pg<D>>,
    tokens: BTreeMap<u64, Token>,
    next_token: u64,
    next_round: u64,
    tick: u64,
    future: Vec<Msg<D>>,
    effects: Vec<Effect<D>>,
    /// Scrub regions this daemon may start per tick (its rate limit) and
    /// what is left of this tick's allowance.
    scrub_per_tick: usize,
    scrub_budget: usize,
    pub stats: Stats,
    /// Regions of the recovery pushes in flight over all groups, and their
    /// limit.
    pushes_total: usize,
    pushes_max: usize,
    /// Regions one push carries at most.
    push_regions: u32,
    /// Bytes recovery may still push (`None`: no byte limit).
    push_budget: Option<u64>,
    /// Groups with recovery work held back by the daemon-wide limits, in
    /// the order they get freed slots.
    starved: VecDeque<(u32, u32)>,
    /// Bumped whenever the set `active_primaries` returns may have changed
    /// (a new map, a primary done peering), so the driver recomputes it
    /// only then and not after every input.
    active_gen: u64,
    /// Maps older than this are ignored (`set_min_epoch`).
    min_epoch: u64,
    /// The operator's switches: no push to an outdated member (delta
    /// recovery, `norecover`) or to a backfilling one (`nobackfill`).
    pause_recovery: bool,
    pause_backfill: bool,
    /// Log entries the disks kept from this daemon's last process, by
    /// (pg, disk), until the first map (`recover_log`).
    recovered: BTreeMap<(u32, u32), Vec<Recovered>>,
    /// The logs' trim point, floor and completeness, by (pg, disk), until
    /// the first map (`recover_log_state`).
    recovered_state: BTreeMap<(u32, u32), (Seq, Seq, bool)>,
}

impl<D: Clone + CompareData> Replicator<D> {
    /// A replicator for a daemon that owns `disks` and has just started: its
    /// logs are empty and so incomplete (it cannot tell what it missed).
    pub fn new(disks: impl IntoIterator<Item = u32>) -> Replicator<D> {
        Replicator {
            disks: disks.into_iter().collect(),
            map: None,
            pgs: BTreeMap::new(),
            tokens: BTreeMap::new(),
            next_token: 1,
            next_round: 1,
            tick: 0,
            future: Vec::new(),
            effects: Vec::new(),
            scrub_per_tick: 16,
            scrub_budget: 16,
            stats: Stats::default(),
            pushes_total: 0,
            pushes_max: usize::MAX,
            push_regions: PUSH_REGIONS_MAX,
            push_budget: None,
            starved: VecDeque::new(),
            active_gen: 0,
            min_epoch: 0,
            pause_recovery: false,
            pause_backfill: false,
            recovered: BTreeMap::new(),
            recovered_state: BTreeMap::new(),
        }
    }

    /// Before the first map: the group-log entries `disk` kept from the
    /// last process (the changes it durably holds that no trim had
    /// passed; docs/replication.md, "Persistent group logs"). A group
    /// starts with them as logged and applied, none vouched for and none
    /// known committed: a returning copy then names the changes of a
    /// failed primary it holds and nobody else logged (delta recovery asks
    /// for uncommitted entries and pushes their regions), and does not get
    /// pushed what it already holds. Entries of groups the first map does
    /// not place on the disk are forgotten (`Effect::ForgetLog`).
    pub fn recover_log(
        &mut self,
        disk: u32,
        entries: impl IntoIterator<Item = (u32, Seq, Extent, Option<u64>)>,
    ) {
        for (pg, seq, extent, cas) in entries {
            self.recovered
                .entry((pg, disk))
                .or_default()
                .push((seq, extent, cas));
        }
    }

    /// Before the first map, with `recover_log`: group `pg`'s log on
    /// `disk` was trimmed up to `trim` (durable on every member then) and
    /// may lack entries up to `floor`; `complete`: above both it holds
    /// every change the disk holds (`Effect::LogFloor`). A complete group
    /// starts with a complete log: as the last up-to-date copy, restarted,
    /// it recovers the members durable past the floor by delta.
    pub fn recover_log_state(&mut self, disk: u32, pg: u32, trim: Seq, floor: Seq, complete: bool) {
        self.recovered_state
            .insert((pg, disk), (trim, floor, complete));
    }

    /// Groups whose trim point moved since the last call: (disk, pg,
    /// trim). The driver has its disk forget the log entries up to it (at
    /// its leisure: an entry kept too long costs a push, never data).
    pub fn log_trims(&mut self) -> Vec<(u32, u32, Seq)> {
        let mut out = Vec::new();
        for (&(pg, disk), p) in self.pgs.iter_mut() {
            if p.trim > p.trim_saved {
                p.trim_saved = p.trim;
                out.push((disk, pg, p.trim));
            }
        }
        out
    }

    /// Pause (or resume) the pushes of delta recovery (to `Outdated`
    /// members) and of backfill (to `Backfill` members): the operator's
    /// `norecover` and `nobackfill`. Paused members still get every new
    /// change; pushes in flight complete. Groups with recovery work resume
    /// at the next input once unpaused.
    pub fn set_recovery_paused(&mut self, recovery: bool, backfill: bool) {
        let resumed = (self.pause_recovery && !recovery) || (self.pause_backfill && !backfill);
        self.pause_recovery = recovery;
        self.pause_backfill = backfill;
        if resumed {
            for (key, p) in &self.pgs {
                let recovering = p
                    .primary
                    .as_ref()
                    .is_some_and(|pr| !pr.recovering.is_empty());
                if recovering && !self.starved.contains(key) {
                    self.starved.push_back(*key);
                }
            }
        }
    }

    /// The pause switches: (delta recovery, backfill).
    pub fn recovery_paused(&self) -> (bool, bool) {
        (self.pause_recovery, self.pause_backfill)
    }

    /// Ignore maps older than `epoch`: the one in which this process
    /// registered its disks. In an older map a disk is still the previous
    /// process's (its incarnation, its copies' states, the groups it led):
    /// acting on it, a new process led such a group under an epoch already
    /// gone, had a member still at that epoch answer its peering, and
    /// pushed its own stale content over the member's newer writes as
    /// "uncertain regions" — a lost acknowledged write (scenario test
    /// `a_new_process_ignores_the_map_before_its_registration`).
    pub fn set_min_epoch(&mut self, epoch: u64) {
        self.min_epoch = epoch;
    }

    /// Limit the regions (64 KiB) of the recovery pushes in flight over all
    /// groups (at least one).
    pub fn set_pushes_max(&mut self, n: usize) {
        assert!(n >= 1);
        self.pushes_max = n;
    }

    /// Contiguous regions one recovery push carries at most (1 to
    /// `PUSH_REGIONS_MAX`): larger pushes cost fewer round trips, smaller
    /// ones hold a disk that serves one request at a time for less long.
    pub fn set_push_regions(&mut self, n: u32) {
        assert!((1..=PUSH_REGIONS_MAX).contains(&n));
        self.push_regions = n;
    }

    /// Grant recovery `bytes` more to push, keeping at most `cap` unspent
    /// (a burst bound); from the first grant on, pushes need budget. Groups
    /// waiting for budget resume at the next input.
    pub fn grant_push_bytes(&mut self, bytes: u64, cap: u64) {
        let b = self.push_budget.unwrap_or(0);
        self.push_budget = Some(b.saturating_add(bytes).min(cap.max(PUSH_COST_BYTES)));
    }

    /// Whether the daemon-wide limits let one more push start.
    fn push_allowed(&self) -> bool {
        self.pushes_total < self.pushes_max && self.push_budget.is_none_or(|b| b >= PUSH_COST_BYTES)
    }

    /// Regions of the recovery pushes in flight over all groups.
    pub fn pushes_in_flight(&self) -> usize {
        self.pushes_total
    }

    /// The recoveries under way at the groups this daemon leads.
    pub fn progress(&self) -> Progress {
        let mut out = Progress::default();
        for p in self.pgs.values() {
            let Some(pr) = &p.primary else { continue };
            for (m, r) in &pr.recovering {
                if r.done {
                    continue;
                }
                out.copies_recovering += 1;
                if p.view.state(*m) == Some(CopyState::Backfill) {
                    out.copies_backfilling += 1;
                }
                let in_flight: u64 = pr
                    .ops
                    .values()
                    .filter_map(|o| o.push.filter(|(pm, _)| pm == m))
                    .map(|(_, e)| u64::from(e.length))
                    .sum();
                out.done_bytes += r.bytes;
                out.remaining_bytes += r.todo.len() as u64 * PUSH_COST_BYTES + in_flight;
            }
        }
        out
    }

    /// A description of one group's state here, for the simulation's
    /// failure reports.
    #[cfg(test)]
    pub(crate) fn describe(&self, pg: u32, disk: u32) -> String {
        let Some(p) = self.pgs.get(&(pg, disk)) else {
            return "not a member".into();
        };
        let mut out = format!(
            "epoch {} members {:?} states {:?} committed {:?} trim {:?} complete {} log {}",
            p.view.epoch,
            p.view.members,
            p.view.states,
            p.committed,
            p.trim,
            p.complete,
            p.log.len()
        );
        if let Some(pr) = &p.primary {
            out += &format!(
                " | primary term {} active {} peering {:?} ops {} queue {} pushes {} (total {} max {} budget {:?}) starved {:?}",
                pr.term,
                pr.active,
                pr.peering,
                pr.ops.len(),
                pr.queue.len(),
                pr.pushes,
                self.pushes_total,
                self.pushes_max,
                self.push_budget,
                self.starved
            );
            for (m, r) in &pr.recovering {
                out += &format!(
                    " | rec {m}: todo {} listing {} asking {:?} done {} full {} flush {:?}",
                    r.todo.len(),
                    r.listing,
                    r.asking,
                    r.done,
                    r.full,
                    r.flush_round
                );
            }
            for (s, o) in &pr.ops {
                out += &format!(
                    " | op {s:?} waiting {:?} local_pending {} local_started {} reading {} push {:?}",
                    o.waiting, o.local_pending, o.local_started, o.reading, o.push
                );
            }
        }
        out
    }

    /// Entries in `disk`'s log of group `pg`.
    #[cfg(test)]
    pub(crate) fn log_len(&self, pg: u32, disk: u32) -> usize {
        self.pgs.get(&(pg, disk)).map_or(0, |p| p.log.len())
    }

    /// Give freed daemon-wide push slots to the groups waiting for them,
    /// oldest first.
    fn pump_starved(&mut self) {
        for _ in 0..self.starved.len() {
            if !self.push_allowed() {
                return;
            }
            let Some((pg, me)) = self.starved.pop_front() else {
                return;
            };
            self.pump(pg, me);
        }
    }

    /// Scrub regions (64 KiB of every copy) this daemon starts per tick at
    /// most: the scrub's rate limit.
    pub fn set_scrub_rate(&mut self, regions_per_tick: usize) {
        self.scrub_per_tick = regions_per_tick.max(1);
    }

    pub fn set_disks(&mut self, disks: impl IntoIterator<Item = u32>) {
        self.disks = disks.into_iter().collect();
    }

    pub fn take_effects(&mut self) -> Vec<Effect<D>> {
        std::mem::take(&mut self.effects)
    }

    pub fn epoch(&self) -> u64 {
        self.map.as_ref().map_or(0, |m| m.epoch)
    }

    /// Whether `disk` may serve a read for `pg` now: it is the active
    /// primary.
    pub fn read_check(&self, pg: u32, disk: u32) -> ReadCheck {
        match self.pgs.get(&(pg, disk)).and_then(|p| p.primary.as_ref()) {
            Some(p) if p.active => ReadCheck::Ok,
            _ => ReadCheck::Retry,
        }
    }

    /// Whether this daemon has state for `disk`'s copy of group `pg`.
    pub fn holds(&self, pg: u32, disk: u32) -> bool {
        self.pgs.contains_key(&(pg, disk))
    }

    /// Changes whenever `active_primaries` may have changed.
    pub fn active_generation(&self) -> u64 {
        self.active_gen
    }

    /// The (group, disk) pairs this daemon leads and serves now.
    pub fn active_primaries(&self) -> BTreeSet<(u32, u32)> {
        self.pgs
            .iter()
            .filter(|(_, p)| p.primary.as_ref().is_some_and(|pr| pr.active))
            .map(|(k, _)| *k)
            .collect()
    }

    /// Groups this daemon leads, and how many of them are degraded (a member
    /// down or outdated) or recovering.
    pub fn summary(&self) -> PgSummary {
        let mut s = PgSummary::default();
        for p in self.pgs.values() {
            let Some(pr) = &p.primary else { continue };
            s.primaries += 1;
            let degraded = p
                .view
                .states
                .iter()
                .zip(&p.view.up)
                .any(|(st, up)| !up || *st != CopyState::UpToDate);
            s.degraded += u32::from(degraded);
            s.recovering += u32::from(pr.recovering.values().any(|r| !r.done));
            s.scrubbing += u32::from(pr.scrub.is_some());
            s.backfilling += u32::from(
                pr.recovering
                    .iter()
                    .any(|(m, r)| !r.done && p.view.state(*m) == Some(CopyState::Backfill)),
            );
        }
        s
    }

    /// Nothing in flight: no change waiting for a copy, nothing queued, no
    /// peering or recovery under way.
    pub fn idle(&self) -> bool {
        self.pgs.values().all(|p| {
            p.applying.is_empty()
                && p.asks.is_empty()
                && p.primary.as_ref().is_none_or(|pr| {
                    pr.active
                        && pr.ops.is_empty()
                        && pr.queue.is_empty()
                        && pr.checks.is_empty()
                        && pr.compares.is_empty()
                        && pr.repairs.is_empty()
                        && pr.scrub.is_none()
                        && pr.recovering.values().all(|r| {
                            r.done
                                || r.todo.is_empty()
                                    && r.listing == 0
                                    && r.asking.is_none()
                                    && r.flush_round.is_none()
                        })
                })
        })
    }

    fn token(&mut self, t: Token) -> u64 {
        let id = self.next_token;
        self.next_token += 1;
        self.tokens.insert(id, t);
        id
    }

    pub fn handle(&mut self, input: Input<D>) {
        match input {
            Input::Map(m) => self.on_map(m),
            Input::Tick => self.on_tick(),
            Input::MemberLost { disk } => self.on_member_lost(disk),
            Input::Client {
                pg,
                disk,
                client,
                extent,
                change,
                fua,
            } => self.on_client(pg, disk, Queued::new(client, extent, change, fua, None)),
            Input::CompareAndWrite {
                pg,
                disk,
                client,
                extent,
                compare,
                data,
                token,
                fua,
            } => {
                let compare = Some((compare, token));
                let q = Queued::new(client, extent, Change::Write(data), fua, compare);
                self.on_client(pg, disk, q)
            }
            Input::Msg(m) => self.on_msg(m),
            Input::Applied { token, ok } => self.on_applied(token, ok),
            Input::ApplyBadBlock { token } => self.on_apply_bad_block(token),
            Input::ReadDone {
                token,
                extent,
                data,
            } => self.on_read(token, extent, data),
            Input::Regions { token, regions } => self.on_regions(token, regions),
            Input::Flushed { token, ok } => self.on_flushed(token, ok),
            Input::ReadFailed { token } => self.on_read_failed(token),
            Input::Digested { token, digest } => self.on_digested(token, digest),
            Input::Repair {
                pg,
                disk,
                client,
                extent,
            } => self.on_repair(pg, disk, client, extent),
            Input::Scrub { pg } => self.on_scrub(pg),
        }
    }

    // ---- map changes ------------------------------------------------------

    fn on_map(&mut self, map: Arc<ClusterMap>) {
        if self.map.as_ref().is_some_and(|m| m.epoch >= map.epoch) || map.epoch < self.min_epoch {
            return;
        }
        self.active_gen += 1;
        // Groups with a local member.
        let mut keys = BTreeSet::new();
        for (pg, set) in map.pgs.iter().enumerate() {
            for d in set {
                if self.disks.contains(d) {
                    keys.insert((pg as u32, *d));
                }
            }
        }
        // Groups we left entirely (re-placed after this disk was taken
        // out): drop their state; whatever data stays on the disk is
        // garbage to the group now.
        let gone: Vec<(u32, u32)> = self
            .pgs
            .keys()
            .filter(|k| !keys.contains(k))
            .copied()
            .collect();
        for k in gone {
            if let Some(mut p) = self.pgs.remove(&k) {
                self.pushes_total -= step_down(&mut p, &mut self.effects, &mut self.stats);
                self.effects.push(Effect::ForgetLog { disk: k.1, pg: k.0 });
            }
        }
        // Recovered logs of groups this map does not place here: stale.
        let recovered = std::mem::take(&mut self.recovered);
        let recovered_state = std::mem::take(&mut self.recovered_state);
        let stale: BTreeSet<(u32, u32)> = recovered
            .keys()
            .chain(recovered_state.keys())
            .filter(|k| !keys.contains(k))
            .copied()
            .collect();
        for (pg, disk) in stale {
            self.effects.push(Effect::ForgetLog { disk, pg });
        }
        let mut recovered = recovered;
        let mut recovered_state = recovered_state;
        self.map = Some(map.clone());
        for (pg, me) in keys {
            let view = View::of(&map, pg);
            let p = self.pgs.entry((pg, me)).or_insert_with(|| Pg {
                pg,
                me,
                view: View::default(),
                log: BTreeMap::new(),
                complete: false,
                floor: Seq::default(),
                disk_complete: false,
                trim: Seq::default(),
                committed: Seq::default(),
                applied: BTreeSet::new(),
                applying: BTreeMap::new(),
                asks: BTreeMap::new(),
                primary: None,
                fresh: true,
                vouched_after: Seq::default(),
                cas_done: VecDeque::new(),
                cas_applying: BTreeMap::new(),
                cas_pending: BTreeMap::new(),
                refused: BTreeSet::new(),
                trim_saved: Seq::default(),
                term_committed: BTreeMap::new(),
            });
            if let Some(entries) = recovered.remove(&(pg, me)) {
                // Durable here, so applied; logged, above any commit point
                // this process knows; not vouched for (the process is new).
                for (seq, extent, cas) in entries {
                    p.log.insert(seq, extent);
                    p.applied.insert(seq);
                    // A COMPARE AND WRITE's write this copy holds durably:
                    // pending as if it had just applied it, with itself as
                    // the sender, so it counts only if this copy leads and
                    // its peering makes every copy agree with it.
                    if let Some(token) = cas {
                        p.cas_pending.insert(seq, (token, me));
                    }
                }
                let last = p.log.keys().next_back().copied().unwrap_or_default();
                p.vouched_after = p.vouched_after.max(last);
            }
            if let Some((trim, floor, complete)) = recovered_state.remove(&(pg, me)) {
                // The trim point was durable on every member when the disk
                // learnt it. A log the last process vouched for is
                // complete above its floor: what the new process lost
                // (not durable here) is either taken back, named by the
                // members that hold it (uncommitted entries), or held by
                // nobody.
                p.trim = p.trim.max(trim);
                if complete {
                    p.complete = true;
                    p.disk_complete = true;
                    p.floor = floor;
                }
            }
            let was_primary = p.primary.is_some();
            let me_up = view
                .members
                .iter()
                .zip(&view.up)
                .any(|(d, u)| *d == me && *u);
            // Skipped maps hid no acknowledged change from this copy when
            // the map says its disk was up in every one of them (each
            // write set held it, and a primary acknowledges only once its
            // whole write set applied a change at exactly its epoch, which
            // a copy that skipped that epoch refuses as stale) and it is
            // not a backfill member (none of them re-placed the group).
            let up_through = map
                .disk(me)
                .and_then(|d| d.up_since)
                .is_some_and(|s| s <= p.view.epoch)
                && view.state(me) != Some(CopyState::Backfill);
            if p.view.epoch != 0 && (!me_up || (map.epoch != p.view.epoch + 1 && !up_through)) {
                let last = p.log.keys().next_back().copied().unwrap_or_default();
                p.vouched_after = p.vouched_after.max(last);
            }
            // A member of the write set that left it or restarted no longer
            // holds what it had applied and not flushed (a new process lost
            // it; a departed one may never come back as itself).
            let holder_lost = p.view.write_set().iter().any(|m| {
                *m != me
                    && (!view.write_set().contains(m)
                        || view.incarnation(*m) != p.view.incarnation(*m))
            });
            p.view = view;
            // Another primary than the one that sent a pending COMPARE AND
            // WRITE write (and not this copy) may make its region agree
            // with a copy that never got it.
            let primary = p.view.primary;
            p.cas_pending
                .retain(|_, (_, from)| primary == Some(*from) || primary == Some(me));
            p.cas_applying
                .retain(|_, (_, from)| primary == Some(*from) || primary == Some(me));
            // With every copy up and up to date nothing is missing anywhere:
            // from here on this member's log tells what others miss.
            if p.view.up.iter().all(|u| *u)
                && p.view.states.iter().all(|s| *s == CopyState::UpToDate)
            {
                // Nothing before this point is missing anywhere (though
                // maybe not yet durable everywhere: the floor).
                let hw = high_water(p);
                if !p.complete {
                    p.complete = true;
                    p.floor = hw;
                }
                // The disk's log holds an entry for everything this copy
                // holds above the high-water mark: vouch for it.
                if !p.disk_complete {
                    p.disk_complete = true;
                    self.effects.push(Effect::LogFloor {
                        disk: me,
                        pg,
                        floor: hw,
                        complete: true,
                    });
                }
            }
            let leads = p.view.primary == Some(me);
            if was_primary && !leads {
                self.pushes_total -= step_down(p, &mut self.effects, &mut self.stats);
            }
            if !was_primary && leads {
                self.stats.peerings += 1;
                start_term(p, self.tick, &mut self.effects);
                self.settle(pg, me);
                // With no other up-to-date member there is nobody to ask:
                // serve at once (else the group would wait for a map that
                // may never come, its recoveries needing this primary).
                self.check_peering(pg, me);
            } else if leads {
                if holder_lost {
                    self.settle(pg, me);
                }
                self.refresh_primary(pg, me);
            }
        }
        // Messages that waited for this map.
        let future = std::mem::take(&mut self.future);
        for m in future {
            self.on_msg(m);
        }
        let keys: Vec<(u32, u32)> = self.pgs.keys().copied().collect();
        for (pg, me) in keys {
            self.pump(pg, me);
        }
    }

    /// The write set or member states changed under a continuing primary.
    fn refresh_primary(&mut self, pg: u32, me: u32) {
        let tick = self.tick;
        let p = self.pgs.get_mut(&(pg, me)).expect("pg");
        let ws = p.view.write_set();
        let view = p.view.clone();
        let (committed, trim) = (p.committed, p.trim);
        let pr = p.primary.as_mut().expect("primary");
        for op in pr.ops.values_mut() {
            op.waiting.retain(|m| ws.contains(m));
            // What was sent under the old epoch is refused by members that
            // have the new map, and lost by a member that restarted: send
            // it again now rather than after RESEND_TICKS (a failover
            // otherwise stalls writes for that long).
            if op.reading || op.waiting.is_empty() {
                continue;
            }
            op.sent_tick = tick;
            let cas = pr.cas_writes.get(&op.update.seq).copied();
            for m in &op.waiting {
                self.effects.push(Effect::Send(Msg {
                    pg,
                    from: me,
                    to: *m,
                    epoch: view.epoch,
                    body: Body::Replicate {
                        update: op.update.clone(),
                        committed,
                        trim,
                        cas,
                    },
                }));
            }
        }
        pr.peering.retain(|m| ws.contains(m));
        // A member that left or restarted cannot be asked (or read) any more.
        // (A restarted member may have lost the very changes it reported,
        // and its older content must not overwrite ours.)
        if let Some(rc) = pr.reclaim.as_mut() {
            let incs = rc.incarnations.clone();
            let stays = |m: &u32| ws.contains(m) && incs.get(m) == Some(&view.incarnation(*m));
            rc.asking.retain(stays);
            rc.entries.retain(|(_, _, m)| stays(m));
            rc.todo.retain(|(m, _)| stays(m));
            rc.fetching.retain(|_, (m, _, _)| stays(m));
        }
        // Flush rounds forget members that left or restarted before they
        // answered; a round left waiting for nobody ends now (else it
        // would wait forever, and no later round would trim the logs).
        let mut ended = Vec::new();
        for (id, r) in pr.rounds.iter_mut() {
            r.members
                .retain(|m, inc| *m == me || ws.contains(m) && view.incarnation(*m) == *inc);
            r.waiting.retain(|m| r.members.contains_key(m));
            if r.waiting.is_empty() {
                ended.push(*id);
            }
        }
        // Members that left or restarted lose their recovery progress, and
        // so does a delta recovery of a member that is now a backfill
        // member (it left and came back while this primary did not look:
        // only a full resync can tell what it misses).
        pr.recovering.retain(|m, r| {
            ws.contains(m)
                && view.incarnation(*m) == r.incarnation
                && (r.full || view.state(*m) != Some(CopyState::Backfill))
        });
        if pr.active && !pr.settling {
            start_recoveries(
                p,
                &mut self.stats,
                &mut self.effects,
                &mut self.tokens,
                &mut self.next_token,
            );
        }
        for id in ended {
            self.end_round(pg, me, id);
        }
        self.finish_ops(pg, me);
        self.pump_reclaim(pg, me);
        self.check_peering(pg, me);
    }

    // ---- client changes (primary) ------------------------------------------

    fn on_client(&mut self, pg: u32, disk: u32, q: Queued<D>) {
        let retry = Effect::Reply {
            client: q.client,
            result: ClientResult::Retry,
        };
        let Some(p) = self.pgs.get_mut(&(pg, disk)) else {
            self.effects.push(retry);
            return;
        };
        let ws_len = p.view.write_set().len();
        let min = p.view.min_replicas;
        let Some(pr) = p.primary.as_mut() else {
            self.effects.push(retry);
            return;
        };
        if ws_len < min || pr.queue.len() >= QUEUE_MAX {
            self.effects.push(retry);
            return;
        }
        pr.queue.push_back(q);
        self.pump(pg, disk);
    }

    /// Start every queued change that no in-flight change overlaps, in queue
    /// order (a change never overtakes an earlier overlapping one), then
    /// recovery pushes.
    fn pump(&mut self, pg: u32, me: u32) {
        let tick = self.tick;
        let Some(p) = self.pgs.get_mut(&(pg, me)) else {
            return;
        };
        let trim = p.trim;
        let epoch = p.view.epoch;
        let ws = p.view.write_set();
        let ws_states: Vec<(u32, CopyState)> = p
            .view
            .members
            .iter()
            .copied()
            .zip(p.view.states.iter().copied())
            .collect();
        let min = p.view.min_replicas;
        let ws_incs: Vec<(u32, u64)> = p
            .view
            .members
            .iter()
            .copied()
            .zip(p.view.incarnations.iter().copied())
            .collect();
        let Some(pr) = p.primary.as_mut() else {
            return;
        };
        if !pr.active || pr.settling {
            return;
        }
        let mut started: Vec<(Seq, Extent)> = Vec::new();
        let mut blocked: Vec<Extent> = Vec::new();
        let mut keep = VecDeque::new();
        while let Some(q) = pr.queue.pop_front() {
            let busy = pr.busy(&q.extent) || blocked.iter().any(|b| b.overlaps(&q.extent));
            if busy {
                blocked.push(q.extent);
                keep.push_back(q);
                continue;
            }
            if ws.len() < min {
                self.effects.push(Effect::Reply {
                    client: q.client,
                    result: ClientResult::Retry,
                });
                continue;
            }
            let mut reassert = false;
            if let Some((_, token)) = &q.compare {
                let token = *token;
                let peered = pr.cas_peered.contains(&token);
                reassert = peered;
                if peered && pr.commit_floor.is_some() {
                    // Its write may be on this copy only until peering's
                    // pushes are done: the gateway asks again (waiting in
                    // the queue would hold back the very push of its
                    // region).
                    self.effects.push(Effect::Reply {
                        client: q.client,
                        result: ClientResult::Retry,
                    });
                    continue;
                }
                if peered {
                    pr.cas_peered.remove(&token);
                }
                if !peered && p.cas_done.contains(&token) {
                    // A resend of one this process already wrote.
                    self.effects.push(Effect::Reply {
                        client: q.client,
                        result: ClientResult::Ok,
                    });
                    continue;
                }
            }
            if let Some((compare, token)) = q.compare {
                let Change::Write(data) = q.change else {
                    unreachable!("a COMPARE AND WRITE carries a write");
                };
                // A write this copy held when its term began was answered
                // `Ok` by nobody but this copy's peering, which pushed it
                // to the up-to-date members only: an outdated or
                // backfilling member of the write set may lack it, and
                // could later vouch for an older change of the block (a
                // restarted last copy's take-back would undo the write).
                // So the resend writes it again, as a change every member
                // of the write set applies, if it is still in place (a
                // later change replaced it otherwise: then `Ok` at once).
                let compare = if reassert { data.clone() } else { compare };
                let id = self.next_token;
                self.next_token += 1;
                self.tokens
                    .insert(id, Token::CompareRead { pg, disk: me, id });
                self.effects.push(Effect::Read {
                    disk: me,
                    token: id,
                    extent: q.extent,
                });
                pr.compares.insert(
                    id,
                    Compare {
                        client: q.client,
                        extent: q.extent,
                        compare,
                        data,
                        fua: q.fua,
                        token,
                        reassert,
                    },
                );
                blocked.push(q.extent);
                continue;
            }
            let seq = Seq {
                term: pr.term,
                n: pr.next_n,
            };
            pr.next_n += 1;
            let update = Update {
                seq,
                extent: q.extent,
                change: q.change,
                fua: q.fua,
            };
            let waiting: BTreeSet<u32> = ws.iter().copied().filter(|m| *m != me).collect();
            // The primary's own copy is written only once another up-to-date
            // member holds the change in its log: if the primary then dies,
            // the next one finds the change while peering, so no copy can
            // keep a change that the survivors never heard of. With no other
            // up-to-date member there is nobody to peer with (this copy
            // stays the authority), so it is written at once.
            let other_uptodate = waiting
                .iter()
                .any(|m| view_state(&ws_states, *m) == Some(CopyState::UpToDate));
            let local_started = !other_uptodate;
            if local_started {
                let token = self.next_token;
                self.next_token += 1;
                self.tokens
                    .insert(token, Token::Apply { pg, disk: me, seq });
                self.effects.push(Effect::Apply {
                    disk: me,
                    token,
                    update: update.clone(),
                    // Logged below, in this step.
                    log: Some(LogNote { pg, cas: q.cas }),
                });
            } else if matches!(update.change, Change::Write(_)) {
                self.effects.push(Effect::Stage {
                    disk: me,
                    update: update.clone(),
                });
            }
            if let Some(t) = q.cas {
                pr.cas_writes.insert(seq, t);
            }
            pr.ops.insert(
                seq,
                Op {
                    update,
                    client: Some(q.client),
                    waiting,
                    local_pending: true,
                    local_started,
                    sent_tick: tick,
                    push: None,
                    reading: false,
                    failed: false,
                    repair: None,
                    repaired: BTreeSet::new(),
                    bad_copies: BTreeSet::new(),
                },
            );
            started.push((seq, q.extent));
        }
        pr.queue = keep;
        let committed = committed_of(pr);
        for (seq, extent) in &started {
            p.log.insert(*seq, *extent);
            let op = &pr.ops[seq];
            let cas = pr.cas_writes.get(seq).copied();
            for m in &op.waiting {
                self.effects.push(Effect::Send(Msg {
                    pg,
                    from: me,
                    to: *m,
                    epoch,
                    body: Body::Replicate {
                        update: op.update.clone(),
                        committed,
                        trim,
                        cas,
                    },
                }));
            }
        }
        if p.log.len() > LOG_ENTRIES_MAX {
            // Too much to track: whoever is away gets a full resync. The
            // changes in flight are applied here without entries now.
            p.log.clear();
            p.complete = false;
            unmark_disk_log(&mut p.disk_complete, me, pg, &mut self.effects);
        }
        // Recovery pushes: regions nobody is changing, a few at a time, each
        // with the contiguous regions after it (up to PUSH_REGIONS_MAX and
        // the daemon's limits).
        let (pause_recovery, pause_backfill) = (self.pause_recovery, self.pause_backfill);
        let members: Vec<u32> = pr
            .recovering
            .keys()
            .copied()
            .filter(|m| {
                let backfill = ws_states
                    .iter()
                    .any(|(x, st)| x == m && *st == CopyState::Backfill);
                !(if backfill {
                    pause_backfill
                } else {
                    pause_recovery
                })
            })
            .collect();
        let mut starved = false;
        for m in members {
            while pr.pushes < PUSHES_INFLIGHT_MAX {
                let r = pr.recovering.get_mut(&m).expect("member");
                if r.listing > 0 || r.asking.is_some() {
                    break;
                }
                let allowed = self.pushes_total < self.pushes_max
                    && self.push_budget.is_none_or(|b| b >= PUSH_COST_BYTES);
                if !allowed {
                    starved |= !r.todo.is_empty();
                    break;
                }
                let free = |reg: &Region| {
                    let e = reg.extent();
                    !pr.ops.values().any(|o| o.update.extent.overlaps(&e))
                        && !pr.checks.values().any(|c| c.extent.overlaps(&e))
                        && !pr.compares.values().any(|c| c.extent.overlaps(&e))
                        && !pr.queue.iter().any(|q| q.extent.overlaps(&e))
                        && !pr.repairs.iter().any(|j| j.extent.overlaps(&e))
                };
                let Some(first) = r.todo.iter().copied().find(free) else {
                    break;
                };
                // As many regions as the limits leave room for.
                let room = (self.pushes_max - self.pushes_total) as u64;
                let room = self
                    .push_budget
                    .map_or(room, |b| room.min(b / PUSH_COST_BYTES));
                let most = u64::from(self.push_regions).min(room) as u32;
                let mut count = 1;
                while count < most {
                    let next = Region {
                        index: first.index + count,
                        ..first
                    };
                    if !r.todo.contains(&next) || !free(&next) {
                        break;
                    }
                    count += 1;
                }
                let extent = Extent {
                    volume_id: first.volume_id,
                    chunk_index: first.chunk_index,
                    offset: first.index * REGION_BYTES,
                    length: count * REGION_BYTES,
                };
                for reg in extent.regions() {
                    r.todo.remove(&reg);
                }
                self.pushes_total += count as usize;
                if let Some(b) = self.push_budget.as_mut() {
                    *b -= u64::from(count) * PUSH_COST_BYTES;
                }
                let seq = Seq {
                    term: pr.term,
                    n: pr.next_n,
                };
                pr.next_n += 1;
                let token = self.next_token;
                self.next_token += 1;
                self.tokens.insert(token, Token::Read { pg, disk: me, seq });
                self.effects.push(Effect::Read {
                    disk: me,
                    token,
                    extent,
                });
                pr.pushes += 1;
                pr.ops.insert(
                    seq,
                    Op {
                        update: Update {
                            seq,
                            extent,
                            change: Change::Zeroes,
                            fua: false,
                        },
                        client: None,
                        waiting: BTreeSet::from([m]),
                        local_pending: false,
                        local_started: true,
                        sent_tick: tick,
                        push: Some((m, extent)),
                        reading: true,
                        failed: false,
                        repair: None,
                        repaired: BTreeSet::new(),
                        bad_copies: BTreeSet::new(),
                    },
                );
            }
            let r = &pr.recovering[&m];
            if r.listing == 0
                && r.asking.is_none()
                && !r.entries_asked
                && r.todo.is_empty()
                && !r.done
                && r.flush_round.is_none()
                && !pr
                    .ops
                    .values()
                    .any(|o| o.push.is_some_and(|(pm, _)| pm == m))
            {
                // Every push acknowledged: make them durable, then report.
                let round = self.next_round;
                self.next_round += 1;
                pr.rounds.insert(
                    round,
                    Round {
                        covered: Seq::default(),
                        members: BTreeMap::from([(m, inc_of(&ws_incs, m))]),
                        waiting: BTreeSet::from([m]),
                        recovered: Some(m),
                        sent_tick: tick,
                    },
                );
                pr.recovering.get_mut(&m).expect("member").flush_round = Some(round);
                self.effects.push(Effect::Send(Msg {
                    pg,
                    from: me,
                    to: m,
                    epoch,
                    body: Body::Flush {
                        round,
                        trim,
                        committed: committed_of(pr),
                    },
                }));
            }
        }
        if starved && !self.starved.contains(&(pg, me)) {
            self.starved.push_back((pg, me));
        }
        self.start_checks(pg, me);
    }

    /// Complete every op whose copies all answered.
    fn finish_ops(&mut self, pg: u32, me: u32) {
        let Some(p) = self.pgs.get_mut(&(pg, me)) else {
            return;
        };
        let view = p.view.clone();
        let epoch = view.epoch;
        let Some(pr) = p.primary.as_mut() else {
            return;
        };
        // A local apply that waited for an up-to-date replica whose answer
        // will not come (it left the write set): nobody else can hold the
        // change unknown to us now, so write it.
        for (seq, op) in pr.ops.iter_mut() {
            if !op.local_started
                && !op
                    .waiting
                    .iter()
                    .any(|m| view.state(*m) == Some(CopyState::UpToDate))
            {
                op.local_started = true;
                let token = self.next_token;
                self.next_token += 1;
                self.tokens.insert(
                    token,
                    Token::Apply {
                        pg,
                        disk: me,
                        seq: *seq,
                    },
                );
                self.effects.push(Effect::Apply {
                    disk: me,
                    token,
                    update: op.update.clone(),
                    log: p.log.contains_key(seq).then(|| LogNote {
                        pg,
                        cas: pr.cas_writes.get(seq).copied(),
                    }),
                });
            }
        }
        if pr.settling {
            // Answered once this copy is durable (`settle`).
            return;
        }
        let done: Vec<Seq> = pr
            .ops
            .iter()
            .filter(|(_, o)| !o.reading && !o.local_pending && (o.waiting.is_empty() || o.failed))
            .map(|(s, _)| *s)
            .collect();
        if done.is_empty() {
            return;
        }
        for s in done {
            let mut op = pr.ops.remove(&s).expect("op");
            if !op.failed && !op.bad_copies.is_empty() {
                // Copies that could not merge the change with a corrupt
                // block: rewrite their whole blocks from a good copy (which
                // has the change) and answer the client when that is done.
                let extent = op.update.extent.blocks();
                let client = op.client.take();
                if pr.repairs.len() < REPAIRS_MAX {
                    pr.unsettled.insert(s);
                    pr.repairs.push_back(RepairJob {
                        extent,
                        targets: std::mem::take(&mut op.bad_copies),
                        origin: RepairOrigin::Change { seq: s, client },
                    });
                } else if let Some(c) = client {
                    self.effects.push(Effect::Reply {
                        client: c,
                        result: ClientResult::Failed,
                    });
                }
            }
            // Remembered only when answered Ok now: the client of a change
            // with copies to repair is answered by the repair, which may
            // fail (then a resend compares again).
            if let Some(t) = pr.cas_writes.remove(&s)
                && !op.failed
                && op.client.is_some()
            {
                remember_cas(&mut p.cas_done, t);
            }
            if let Some(c) = op.client {
                self.effects.push(Effect::Reply {
                    client: c,
                    result: if op.failed {
                        ClientResult::Failed
                    } else {
                        ClientResult::Ok
                    },
                });
            }
            if let Some(origin) = op.repair {
                let copies = op.repaired.len() as u64;
                if op.failed {
                    self.stats.unrepairable += 1;
                } else {
                    self.stats.repairs += copies;
                    self.stats.repair_bytes += copies * u64::from(op.update.extent.length);
                }
                repair_done(pg, me, epoch, pr, origin, !op.failed, &mut self.effects);
            }
            if let Some((m, pushed)) = op.push {
                let regions = pushed.regions().count() as u64;
                pr.pushes -= 1;
                self.pushes_total -= regions as usize;
                if op.failed {
                    if let Some(r) = pr.recovering.get_mut(&m) {
                        r.todo.extend(pushed.regions());
                    }
                } else if let Some(r) = pr.recovering.get_mut(&m) {
                    // What was read (the volume may end inside the extent).
                    let bytes = u64::from(op.update.extent.length);
                    r.bytes += bytes;
                    if view.state(m) == Some(CopyState::UpToDate) {
                        self.stats.peering_bytes += bytes;
                        self.stats.peering_regions += regions;
                    } else {
                        self.stats.recovery_bytes += bytes;
                        self.stats.recovery_regions += regions;
                    }
                }
            }
        }
        if pr.commit_floor.is_some()
            && pr.recovering.iter().all(|(m, r)| {
                view.state(*m) != Some(CopyState::UpToDate)
                    || r.todo.is_empty()
                        && !pr
                            .ops
                            .values()
                            .any(|o| o.push.is_some_and(|(pm, _)| pm == *m))
            })
        {
            pr.commit_floor = None;
        }
        p.committed = committed_of(pr);
        note_committed(p, p.committed);
        // Slots freed here go first to groups that waited for one.
        self.pump_starved();
        self.pump(pg, me);
    }

    // ---- messages ---------------------------------------------------------

    fn on_msg(&mut self, m: Msg<D>) {
        let epoch = self.epoch();
        if m.epoch > epoch {
            if self.future.len() < FUTURE_MAX {
                self.future.push(m);
            }
            self.effects.push(Effect::NeedMap);
            return;
        }
        match m.body {
            Body::Ack { seq, result } => self.on_ack(m.pg, m.to, m.from, seq, result),
            Body::Flushed { round } => self.on_peer_flushed(m.pg, m.to, m.from, round),
            Body::LogReply {
                entries,
                regions,
                full,
                committed,
            } => self.on_log_reply(m.pg, m.to, m.from, entries, regions, full, committed),
            Body::Replicate {
                update,
                committed,
                trim,
                cas,
            } => self.on_replicate(m.pg, m.to, m.from, m.epoch, update, committed, trim, cas),
            Body::LogQuery { full } => self.on_log_query(m.pg, m.to, m.from, m.epoch, full),
            Body::Flush {
                round,
                trim,
                committed,
            } => self.on_flush_req(m.pg, m.to, m.from, m.epoch, round, trim, committed),
            Body::HoldsQuery { id } => self.on_holds_query(m.pg, m.to, m.from, m.epoch, id),
            Body::ReclaimQuery => self.on_reclaim_query(m.pg, m.to, m.from, m.epoch),
            Body::ReclaimReply { entries } => self.on_reclaim_reply(m.pg, m.to, m.from, entries),
            Body::Holds { id, trim, runs } => self.on_holds(m.pg, m.to, m.from, id, trim, runs),
            Body::RepairReq { id, extent } => self.on_repair_req(m.pg, m.to, m.from, id, extent),
            Body::Repaired { id, ok } => self.on_repaired(m.pg, m.to, m.from, id, ok),
            Body::Fetch { id, extent } => self.on_fetch(m.pg, m.to, m.from, m.epoch, id, extent),
            Body::Fetched {
                id,
                ok,
                extent,
                data,
            } => self.on_fetched(m.pg, m.to, m.from, id, ok, extent, data),
            Body::DigestReq { id, extent } => {
                self.on_digest_req(m.pg, m.to, m.from, m.epoch, id, extent)
            }
            Body::DigestReply { id, digest } => {
                self.on_digest_reply(m.pg, m.to, m.from, id, digest)
            }
        }
    }

    /// Whether a request from `from` at `epoch` is one this member obeys:
    /// exactly our epoch, from our map's primary.
    fn fenced(&self, pg: u32, me: u32, from: u32, epoch: u64) -> Option<AckResult> {
        if epoch < self.epoch() {
            return Some(AckResult::Stale);
        }
        match self.pgs.get(&(pg, me)) {
            Some(p) if p.view.primary == Some(from) => None,
            _ => Some(AckResult::NotPrimary),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_replicate(
        &mut self,
        pg: u32,
        me: u32,
        from: u32,
        epoch: u64,
        update: Update<D>,
        committed: Seq,
        trim: Seq,
        cas: Option<u64>,
    ) {
        let my_epoch = self.epoch();
        let ack = |result| Msg {
            pg,
            from: me,
            to: from,
            epoch: my_epoch,
            body: Body::Ack {
                seq: update.seq,
                result,
            },
        };
        if let Some(why) = self.fenced(pg, me, from, epoch) {
            self.effects.push(Effect::Send(ack(why)));
            return;
        }
        let p = self.pgs.get_mut(&(pg, me)).expect("fenced checked");
        // A change of a newer term: its primary may have made regions
        // agree over changes of older terms this copy applied, so their
        // COMPARE AND WRITE tokens no longer say anything.
        p.cas_pending.retain(|s, _| s.term >= update.seq.term);
        p.cas_applying.retain(|s, _| s.term >= update.seq.term);
        advance(p, committed, trim);
        let seq = update.seq;
        // Overlapping changes are serialised by the primary, so a change
        // applied here before can only come back as a duplicate.
        if seq <= p.trim || p.applied.contains(&seq) {
            self.effects.push(Effect::Send(ack(AckResult::Ok)));
            return;
        }
        if p.refused.contains(&seq) {
            self.effects.push(Effect::Send(ack(AckResult::BadBlock)));
            return;
        }
        if let Some((_, waiters)) = p.applying.get_mut(&seq) {
            if !waiters.contains(&from) {
                waiters.push(from);
            }
            return;
        }
        p.log.insert(seq, update.extent);
        p.applying.insert(seq, (update.extent, vec![from]));
        if let Some(t) = cas {
            p.cas_applying.insert(seq, (t, from));
        }
        let token = self.token(Token::Apply { pg, disk: me, seq });
        self.effects.push(Effect::Apply {
            disk: me,
            token,
            update,
            log: Some(LogNote { pg, cas }),
        });
    }

    /// See `Input::ApplyBadBlock`. A member answers `BadBlock` (it logged
    /// the change but holds it nowhere); the primary counts its own copy
    /// as one to repair. Anything else is a failed apply.
    fn on_apply_bad_block(&mut self, token: u64) {
        let apply = match self.tokens.get(&token) {
            Some(Token::Apply { pg, disk, seq }) => Some((*pg, *disk, *seq)),
            _ => None,
        };
        let Some((pg, disk, seq)) = apply else {
            return self.on_applied(token, false);
        };
        let epoch = self.epoch();
        let Some(p) = self.pgs.get_mut(&(pg, disk)) else {
            self.tokens.remove(&token);
            return;
        };
        if let Some((_, waiters)) = p.applying.remove(&seq) {
            self.tokens.remove(&token);
            p.cas_applying.remove(&seq);
            p.refused.insert(seq);
            let acks = ack_all(pg, disk, epoch, waiters, seq, AckResult::BadBlock);
            self.effects.extend(acks);
            return;
        }
        let Some(op) = p.primary.as_mut().and_then(|pr| pr.ops.get_mut(&seq)) else {
            return self.on_applied(token, false);
        };
        // Only a copy another good copy can be repaired from; with none,
        // the write fails as before.
        if op.repair.is_some() || !op.update.change.is_write() {
            return self.on_applied(token, false);
        }
        self.tokens.remove(&token);
        op.local_pending = false;
        op.bad_copies.insert(disk);
        self.finish_ops(pg, disk);
    }

    fn on_applied(&mut self, token: u64, ok: bool) {
        let (pg, disk, seq) = match self.tokens.remove(&token) {
            Some(Token::Apply { pg, disk, seq }) => (pg, disk, seq),
            Some(Token::Reclaim { pg, disk }) => {
                if let Some(rc) = self
                    .pgs
                    .get_mut(&(pg, disk))
                    .and_then(|p| p.primary.as_mut())
                    .and_then(|pr| pr.reclaim.as_mut())
                {
                    // A failed local write leaves our own content there.
                    rc.applying -= 1;
                }
                return self.pump_reclaim(pg, disk);
            }
            _ => return,
        };
        let epoch = self.epoch();
        let Some(p) = self.pgs.get_mut(&(pg, disk)) else {
            return;
        };
        if let Some((_, waiters)) = p.applying.remove(&seq) {
            // A replica's change.
            let cas = p.cas_applying.remove(&seq);
            if ok {
                p.applied.insert(seq);
                p.fresh = false;
                if let Some(c) = cas {
                    p.cas_pending.insert(seq, c);
                    promote_cas(p);
                }
            }
            let result = if ok { AckResult::Ok } else { AckResult::Failed };
            let acks = ack_all(pg, disk, epoch, waiters, seq, result);
            self.effects.extend(acks);
            return;
        }
        if let Some(pr) = p.primary.as_mut()
            && let Some(op) = pr.ops.get_mut(&seq)
        {
            op.local_pending = false;
            op.failed |= !ok;
            let settle_now = pr.settling && {
                pr.settle_dirty = true;
                pr.settle_token.is_none()
            };
            p.applied.insert(seq);
            if settle_now {
                self.settle(pg, disk);
            }
            self.finish_ops(pg, disk);
        }
    }

    fn on_ack(&mut self, pg: u32, me: u32, from: u32, seq: Seq, result: AckResult) {
        let Some(p) = self.pgs.get_mut(&(pg, me)) else {
            return;
        };
        let from_uptodate = p.view.state(from) == Some(CopyState::UpToDate);
        let Some(pr) = p.primary.as_mut() else {
            return;
        };
        let Some(op) = pr.ops.get_mut(&seq) else {
            return;
        };
        match result {
            // Only a client change's copy is repaired after it; a push or a
            // repair's rewrite that a corrupt block stopped failed.
            AckResult::BadBlock if op.repair.is_some() || op.push.is_some() => {
                op.waiting.remove(&from);
                op.failed = true;
            }
            AckResult::Ok | AckResult::BadBlock => {
                op.waiting.remove(&from);
                if result == AckResult::BadBlock {
                    op.bad_copies.insert(from);
                }
                if !op.local_started && from_uptodate {
                    op.local_started = true;
                    let token = self.next_token;
                    self.next_token += 1;
                    self.tokens
                        .insert(token, Token::Apply { pg, disk: me, seq });
                    self.effects.push(Effect::Apply {
                        disk: me,
                        token,
                        update: op.update.clone(),
                        log: p.log.contains_key(&seq).then(|| LogNote {
                            pg,
                            cas: pr.cas_writes.get(&seq).copied(),
                        }),
                    });
                }
            }
            AckResult::Failed => {
                op.waiting.remove(&from);
                op.failed = true;
            }
            // The member knows a newer map: so will we, then resend.
            AckResult::Stale | AckResult::NotPrimary => {
                self.effects.push(Effect::NeedMap);
                return;
            }
        }
        self.finish_ops(pg, me);
    }

    fn on_read(&mut self, token: u64, extent: Extent, data: Option<D>) {
        let (pg, disk, seq) = match self.tokens.remove(&token) {
            Some(Token::Read { pg, disk, seq }) => (pg, disk, seq),
            Some(Token::CheckRead { pg, disk, id }) => {
                return self.rewrite(pg, disk, id, extent, data);
            }
            Some(Token::CompareRead { pg, disk, id }) => {
                return self.compared(pg, disk, id, extent, Ok(data));
            }
            Some(Token::FetchForPeer { pg, disk, to, id }) => {
                let epoch = self.epoch();
                self.effects.push(Effect::Send(Msg {
                    pg,
                    from: disk,
                    to,
                    epoch,
                    body: Body::Fetched {
                        id,
                        ok: true,
                        extent,
                        data,
                    },
                }));
                return;
            }
            _ => return,
        };
        let Some(p) = self.pgs.get_mut(&(pg, disk)) else {
            return;
        };
        let (trim, committed, epoch) = (p.trim, p.committed, p.view.epoch);
        let Some(pr) = p.primary.as_mut() else {
            return;
        };
        let Some(op) = pr.ops.get_mut(&seq) else {
            return;
        };
        op.reading = false;
        if extent.length == 0 || op.waiting.is_empty() {
            op.waiting.clear();
        } else {
            op.update.extent = extent;
            op.update.change = match data {
                Some(d) => Change::Write(d),
                None => Change::Zeroes,
            };
            let to = *op.waiting.first().expect("push target");
            op.sent_tick = self.tick;
            self.effects.push(Effect::Send(Msg {
                pg,
                from: disk,
                to,
                epoch,
                body: Body::Replicate {
                    update: op.update.clone(),
                    committed,
                    trim,
                    cas: None,
                },
            }));
        }
        self.finish_ops(pg, disk);
    }

    fn on_log_query(&mut self, pg: u32, me: u32, from: u32, epoch: u64, full: bool) {
        if self.fenced(pg, me, from, epoch).is_some() {
            return;
        }
        if full {
            let my_epoch = self.epoch();
            let token = self.token(Token::ListForQuery {
                pg,
                disk: me,
                to: from,
                epoch: my_epoch,
            });
            self.effects.push(Effect::ListRegions {
                disk: me,
                token,
                pg,
            });
            return;
        }
        let p = &self.pgs[&(pg, me)];
        let entries = uncommitted(p);
        let committed = p.committed;
        self.effects.push(Effect::Send(Msg {
            pg,
            from: me,
            to: from,
            epoch: self.epoch(),
            body: Body::LogReply {
                entries,
                regions: Vec::new(),
                full: false,
                committed,
            },
        }));
    }

    #[allow(clippy::too_many_arguments)]
    fn on_log_reply(
        &mut self,
        pg: u32,
        me: u32,
        from: u32,
        entries: Vec<(Seq, Extent)>,
        regions: Vec<Region>,
        full: bool,
        committed: Seq,
    ) {
        let Some(pr) = self.pgs.get_mut(&(pg, me)).and_then(|p| p.primary.as_mut()) else {
            return;
        };
        if full {
            if let Some(r) = pr.recovering.get_mut(&from)
                && r.listing > 0
            {
                r.todo.extend(regions);
                for (_, e) in entries {
                    r.todo.extend(e.regions());
                }
                r.listing -= 1;
            } else if let Some(sc) = pr.scrub.as_mut()
                && sc.listing.remove(&from)
            {
                // A scrub compares every region any copy holds: a region
                // only some copies hold is a missing copy elsewhere.
                sc.todo.extend(regions);
                for (_, e) in entries {
                    sc.todo.extend(e.regions());
                }
            }
        } else if pr.peering.remove(&from) {
            pr.peer_entries.extend(entries);
            pr.peer_committed = pr.peer_committed.max(committed);
        } else if let Some(r) = pr.recovering.get_mut(&from)
            && r.entries_asked
        {
            r.entries_asked = false;
            // Not filtered by this primary's commit point: the member may
            // hold an old term's change it applied while outdated (or got
            // back from its disk's log) that the peerings since never saw
            // (simulation seed 5659 once the logs were persisted).
            let regions: BTreeSet<Region> = entries.iter().flat_map(|(_, e)| e.regions()).collect();
            r.todo.extend(regions.iter().copied());
            r.must.extend(regions);
        }
        self.check_peering(pg, me);
        self.pump(pg, me);
    }

    fn on_regions(&mut self, token: u64, regions: Vec<Region>) {
        match self.tokens.remove(&token) {
            Some(Token::ScrubList { pg, disk }) => {
                if let Some(sc) = self
                    .pgs
                    .get_mut(&(pg, disk))
                    .and_then(|p| p.primary.as_mut())
                    .and_then(|pr| pr.scrub.as_mut())
                    && sc.listing.remove(&disk)
                {
                    sc.todo.extend(regions);
                }
                self.pump(pg, disk);
            }
            Some(Token::ListLocal { pg, disk, member }) => {
                if let Some(r) = self
                    .pgs
                    .get_mut(&(pg, disk))
                    .and_then(|p| p.primary.as_mut())
                    .and_then(|pr| pr.recovering.get_mut(&member))
                    && r.listing > 0
                {
                    r.todo.extend(regions);
                    r.listing -= 1;
                }
                self.pump(pg, disk);
            }
            Some(Token::ListForQuery {
                pg,
                disk,
                to,
                epoch,
            }) => {
                let Some(p) = self.pgs.get(&(pg, disk)) else {
                    return;
                };
                let entries = uncommitted(p);
                let committed = p.committed;
                self.effects.push(Effect::Send(Msg {
                    pg,
                    from: disk,
                    to,
                    epoch,
                    body: Body::LogReply {
                        entries,
                        regions,
                        full: true,
                        committed,
                    },
                }));
            }
            _ => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_flush_req(
        &mut self,
        pg: u32,
        me: u32,
        from: u32,
        epoch: u64,
        round: u64,
        trim: Seq,
        committed: Seq,
    ) {
        if self.fenced(pg, me, from, epoch).is_some() {
            return;
        }
        let p = self.pgs.get_mut(&(pg, me)).expect("fenced checked");
        advance(p, committed, trim);
        let token = self.token(Token::FlushForPeer {
            pg,
            disk: me,
            to: from,
            round,
        });
        self.effects.push(Effect::Flush { disk: me, token });
    }

    /// A restarted primary asks what this member can vouch for: the changes
    /// it applied since its copy last may have missed an acknowledged one
    /// (`Pg::vouched_after`), newest first if there are too many to list.
    fn on_reclaim_query(&mut self, pg: u32, me: u32, from: u32, epoch: u64) {
        if self.fenced(pg, me, from, epoch).is_some() {
            return;
        }
        let p = &self.pgs[&(pg, me)];
        let after = p.vouched_after.max(p.trim);
        let mut entries: Vec<(Seq, Extent)> = p
            .log
            .range(..)
            .rev()
            .filter(|(s, _)| **s > after && p.applied.contains(s))
            .take(codec::LIST_MAX)
            .map(|(s, e)| (*s, *e))
            .collect();
        entries.reverse();
        self.effects.push(Effect::Send(Msg {
            pg,
            from: me,
            to: from,
            epoch: self.epoch(),
            body: Body::ReclaimReply { entries },
        }));
    }

    fn on_reclaim_reply(&mut self, pg: u32, me: u32, from: u32, entries: Vec<(Seq, Extent)>) {
        let Some(rc) = self
            .pgs
            .get_mut(&(pg, me))
            .and_then(|p| p.primary.as_mut())
            .and_then(|pr| pr.reclaim.as_mut())
        else {
            return;
        };
        if !rc.asking.remove(&from) {
            return;
        }
        rc.entries
            .extend(entries.into_iter().map(|(s, e)| (s, e, from)));
        self.pump_reclaim(pg, me);
    }

    /// Start the fetches of pieces to take back, a few at a time; once every
    /// piece is written here, peering goes on.
    fn pump_reclaim(&mut self, pg: u32, me: u32) {
        let tick = self.tick;
        let Some(p) = self.pgs.get_mut(&(pg, me)) else {
            return;
        };
        let epoch = p.view.epoch;
        let (log, applied) = (&mut p.log, &p.applied);
        let Some(rc) = p.primary.as_mut().and_then(|pr| pr.reclaim.as_mut()) else {
            return;
        };
        // Once every member answered (or left), plan the pieces. The
        // changes this copy holds itself (its disk's group log gave them
        // back: durable here) compete too: a piece whose newest change is
        // one of them stays as it is. Without them, a member vouching for
        // an older change of a block took it back over a newer one this
        // copy held durably (simulation seed 14086 once the logs were
        // persisted: an acknowledged COMPARE AND WRITE undone).
        if rc.asking.is_empty() && !rc.entries.is_empty() {
            let mut entries = std::mem::take(&mut rc.entries);
            entries.extend(
                log.iter()
                    .filter(|(s, _)| applied.contains(s))
                    .map(|(s, e)| (*s, *e, me)),
            );
            let pieces = reclaim_pieces(entries.clone(), me);
            // What is taken back is held here from now on: logged, so a
            // delta recovery pushes it to the members that lack it. The
            // disk holds the pieces without entries: until the group is
            // clean again its log is not vouched for.
            for (s, e, _) in entries
                .iter()
                .filter(|(s, _, from)| *from != me && *s > p.trim)
            {
                if !log.contains_key(s) {
                    log.insert(*s, *e);
                    rc.logged.push((*s, *e));
                }
            }
            if pieces.iter().any(|(m, _)| *m != me) {
                unmark_disk_log(&mut p.disk_complete, me, pg, &mut self.effects);
            }
            rc.todo.extend(pieces);
        }
        while rc.fetching.len() + rc.applying < RECLAIM_FETCHES_MAX {
            let Some((m, extent)) = rc.todo.pop_front() else {
                break;
            };
            let id = self.next_token;
            self.next_token += 1;
            rc.fetching.insert(id, (m, extent, tick));
            self.effects.push(Effect::Send(Msg {
                pg,
                from: me,
                to: m,
                epoch,
                body: Body::Fetch { id, extent },
            }));
        }
        if rc.done() {
            // Every piece is durable here (FUA): its changes join the
            // disk's log, which is vouched for again. A crash before that
            // commit leaves it unmarked: a full resync, never a gap.
            let logged = std::mem::take(&mut rc.logged);
            if !logged.is_empty() {
                self.effects.push(Effect::LogEntries {
                    disk: me,
                    pg,
                    entries: logged,
                });
            }
            if p.complete && !p.disk_complete {
                p.disk_complete = true;
                self.effects.push(Effect::LogFloor {
                    disk: me,
                    pg,
                    floor: p.floor,
                    complete: true,
                });
            }
            self.check_peering(pg, me);
        }
    }

    /// A piece taken back arrived: write it here (durably: the members'
    /// copies are resynced from ours next).
    fn reclaim_fetched(
        &mut self,
        pg: u32,
        me: u32,
        id: u64,
        ok: bool,
        extent: Extent,
        data: Option<D>,
    ) {
        let Some(pr) = self.pgs.get_mut(&(pg, me)).and_then(|p| p.primary.as_mut()) else {
            return;
        };
        let term = pr.term;
        let Some(rc) = pr.reclaim.as_mut() else {
            return;
        };
        let Some((_, asked, _)) = rc.fetching.remove(&id) else {
            return;
        };
        // A source may only shorten the extent (the volume's end). A copy
        // that fails its CRC gives nothing back: ours stays.
        let valid = extent.volume_id == asked.volume_id
            && extent.chunk_index == asked.chunk_index
            && extent.offset == asked.offset
            && extent.length <= asked.length;
        if ok && valid && extent.length > 0 {
            rc.applying += 1;
            rc.regions.extend(extent.regions());
            self.stats.reclaimed_bytes += u64::from(extent.length);
            let token = new_token(
                &mut self.tokens,
                &mut self.next_token,
                Token::Reclaim { pg, disk: me },
            );
            self.effects.push(Effect::Apply {
                disk: me,
                token,
                update: Update {
                    seq: Seq { term, n: 0 },
                    extent,
                    change: data.map_or(Change::Zeroes, Change::Write),
                    fua: true,
                },
                log: None,
            });
        }
        self.pump_reclaim(pg, me);
    }

    /// A primary asks what this member holds before it recovers it: flush
    /// (so everything applied here is durable), then list the changes
    /// applied, as they were when the flush was asked.
    fn on_holds_query(&mut self, pg: u32, me: u32, from: u32, epoch: u64, id: u64) {
        if self.fenced(pg, me, from, epoch).is_some() {
            return;
        }
        let p = &self.pgs[&(pg, me)];
        let (trim, runs) = (p.trim, runs_of(&p.applied, HOLDS_RUNS_MAX));
        let token = self.token(Token::HoldsForPeer {
            pg,
            disk: me,
            to: from,
            id,
            trim,
            runs,
        });
        self.effects.push(Effect::Flush { disk: me, token });
    }

    /// What a member being delta-recovered holds: push only the regions of
    /// log entries it does not.
    fn on_holds(&mut self, pg: u32, me: u32, from: u32, id: u64, trim: Seq, runs: Vec<SeqRun>) {
        let Some(r) = self
            .pgs
            .get_mut(&(pg, me))
            .and_then(|p| p.primary.as_mut())
            .and_then(|pr| pr.recovering.get_mut(&from))
        else {
            return;
        };
        if r.asking != Some(id) {
            return;
        }
        r.asking = None;
        let needed: BTreeSet<Region> = std::mem::take(&mut r.entries)
            .iter()
            .filter(|(s, _)| *s > trim && !runs.iter().any(|run| run.contains(*s)))
            .flat_map(|(_, e)| e.regions())
            .collect();
        let must = &r.must;
        r.todo
            .retain(|reg| needed.contains(reg) || must.contains(reg));
        self.pump(pg, me);
    }

    fn on_flushed(&mut self, token: u64, ok: bool) {
        match self.tokens.remove(&token) {
            Some(Token::FlushForPeer {
                pg,
                disk,
                to,
                round,
            }) if ok => {
                let epoch = self.epoch();
                self.effects.push(Effect::Send(Msg {
                    pg,
                    from: disk,
                    to,
                    epoch,
                    body: Body::Flushed { round },
                }));
            }
            Some(Token::Flush { pg, disk, round }) if ok => {
                self.on_peer_flushed(pg, disk, disk, round)
            }
            Some(Token::Settle { pg, disk }) => self.settled(pg, disk, token, ok),
            Some(Token::HoldsForPeer {
                pg,
                disk,
                to,
                id,
                trim,
                runs,
            }) if ok => {
                let epoch = self.epoch();
                self.effects.push(Effect::Send(Msg {
                    pg,
                    from: disk,
                    to,
                    epoch,
                    body: Body::Holds { id, trim, runs },
                }));
            }
            _ => {}
        }
    }

    fn on_peer_flushed(&mut self, pg: u32, me: u32, from: u32, round: u64) {
        let Some(r) = self
            .pgs
            .get_mut(&(pg, me))
            .and_then(|p| p.primary.as_mut())
            .and_then(|pr| pr.rounds.get_mut(&round))
        else {
            return;
        };
        // An answer from a member the round no longer waits for (a
        // duplicate, or one that left or restarted meanwhile) counts for
        // nothing.
        if !r.waiting.remove(&from) || !r.waiting.is_empty() {
            return;
        }
        self.end_round(pg, me, round);
    }

    /// A flush round every remaining member answered: a recovered member is
    /// reported, the members of a trim round become durable up to what it
    /// covered, and logs are cut at the new trim point.
    fn end_round(&mut self, pg: u32, me: u32, round: u64) {
        let Some(p) = self.pgs.get_mut(&(pg, me)) else {
            return;
        };
        let epoch = p.view.epoch;
        let Some(pr) = p.primary.as_mut() else {
            return;
        };
        let Some(r) = pr.rounds.remove(&round) else {
            return;
        };
        if let Some(m) = r.recovered {
            if r.members.contains_key(&m)
                && let Some(rec) = pr.recovering.get_mut(&m)
                && rec.flush_round == Some(round)
            {
                rec.done = true;
                rec.flush_round = None;
                self.effects
                    .push(Effect::ReportClean { pg, disk: m, epoch });
            }
            return;
        }
        // A trim round: everyone in it is durable up to `covered`.
        for m in r.members.into_keys() {
            let d = pr.durable.entry(m).or_default();
            *d = (*d).max(r.covered);
        }
        let trim = p
            .view
            .members
            .iter()
            .map(|m| pr.durable.get(m).copied().unwrap_or(p.trim))
            .min()
            .unwrap_or(p.trim);
        advance(p, Seq::default(), trim);
    }

    // ---- time -------------------------------------------------------------

    fn on_tick(&mut self) {
        self.tick += 1;
        let tick = self.tick;
        let keys: Vec<(u32, u32)> = self.pgs.keys().copied().collect();
        let mut settle_again = Vec::new();
        for (pg, me) in keys {
            let p = self.pgs.get_mut(&(pg, me)).expect("pg");
            let (trim, committed, epoch) = (p.trim, p.committed, p.view.epoch);
            let log_above_trim = p.log.range(..).next_back().is_some_and(|(s, _)| *s > trim);
            let ws = p.view.write_set();
            let Some(pr) = p.primary.as_mut() else {
                continue;
            };
            // Resend what has waited too long (lost messages, new maps).
            for op in pr.ops.values_mut() {
                if op.reading || op.waiting.is_empty() || tick - op.sent_tick < RESEND_TICKS {
                    continue;
                }
                op.sent_tick = tick;
                let cas = pr.cas_writes.get(&op.update.seq).copied();
                for m in &op.waiting {
                    self.effects.push(Effect::Send(Msg {
                        pg,
                        from: me,
                        to: *m,
                        epoch,
                        body: Body::Replicate {
                            update: op.update.clone(),
                            committed,
                            trim,
                            cas,
                        },
                    }));
                }
            }
            if let Some(rc) = pr.reclaim.as_mut()
                && tick - pr.peer_sent_tick >= RESEND_TICKS
            {
                for m in &rc.asking {
                    self.effects.push(Effect::Send(Msg {
                        pg,
                        from: me,
                        to: *m,
                        epoch,
                        body: Body::ReclaimQuery,
                    }));
                }
                for (id, (m, extent, sent)) in rc.fetching.iter_mut() {
                    if tick - *sent >= RESEND_TICKS {
                        *sent = tick;
                        self.effects.push(Effect::Send(Msg {
                            pg,
                            from: me,
                            to: *m,
                            epoch,
                            body: Body::Fetch {
                                id: *id,
                                extent: *extent,
                            },
                        }));
                    }
                }
            }
            if !pr.active && tick - pr.peer_sent_tick >= RESEND_TICKS {
                pr.peer_sent_tick = tick;
                for m in &pr.peering {
                    self.effects.push(Effect::Send(Msg {
                        pg,
                        from: me,
                        to: *m,
                        epoch,
                        body: Body::LogQuery { full: false },
                    }));
                }
            }
            for (id, r) in pr.rounds.iter_mut() {
                if tick - r.sent_tick < RESEND_TICKS {
                    continue;
                }
                r.sent_tick = tick;
                for m in r.waiting.iter().filter(|m| **m != me) {
                    self.effects.push(Effect::Send(Msg {
                        pg,
                        from: me,
                        to: *m,
                        epoch,
                        body: Body::Flush {
                            round: *id,
                            trim,
                            committed,
                        },
                    }));
                }
            }
            // Full-resync listings are asked again too, and so is what a
            // member holds.
            for (m, r) in pr.recovering.iter() {
                if !tick.is_multiple_of(RESEND_TICKS) {
                    continue;
                }
                if r.listing > 0 {
                    self.effects.push(Effect::Send(Msg {
                        pg,
                        from: me,
                        to: *m,
                        epoch,
                        body: Body::LogQuery { full: true },
                    }));
                }
                if r.entries_asked {
                    self.effects.push(Effect::Send(Msg {
                        pg,
                        from: me,
                        to: *m,
                        epoch,
                        body: Body::LogQuery { full: false },
                    }));
                }
                if let Some(id) = r.asking {
                    self.effects.push(Effect::Send(Msg {
                        pg,
                        from: me,
                        to: *m,
                        epoch,
                        body: Body::HoldsQuery { id },
                    }));
                }
            }
            if pr.settling && pr.settle_token.is_none() {
                settle_again.push((pg, me));
            }
            // Advance durability so logs can be trimmed.
            let trim_round = pr.rounds.values().any(|r| r.recovered.is_none());
            if pr.active && (log_above_trim || trim > pr.trim_announced) && !trim_round {
                pr.trim_announced = trim;
                let round = self.next_round;
                self.next_round += 1;
                let covered = committed;
                let mut waiting: BTreeSet<u32> = ws
                    .iter()
                    .copied()
                    .filter(|m| *m == me || p.view.state(*m) == Some(CopyState::UpToDate))
                    .collect();
                waiting.insert(me);
                for m in waiting.iter().filter(|m| **m != me) {
                    self.effects.push(Effect::Send(Msg {
                        pg,
                        from: me,
                        to: *m,
                        epoch,
                        body: Body::Flush {
                            round,
                            trim,
                            committed,
                        },
                    }));
                }
                pr.rounds.insert(
                    round,
                    Round {
                        covered,
                        members: waiting
                            .iter()
                            .map(|m| (*m, p.view.incarnation(*m)))
                            .collect(),
                        waiting,
                        recovered: None,
                        sent_tick: tick,
                    },
                );
                let token = self.next_token;
                self.next_token += 1;
                self.tokens.insert(
                    token,
                    Token::Flush {
                        pg,
                        disk: me,
                        round,
                    },
                );
                self.effects.push(Effect::Flush { disk: me, token });
            }
            // Recovered members the manager has not marked yet: ask again.
            for (m, r) in &pr.recovering {
                if r.done
                    && tick.is_multiple_of(RESEND_TICKS * 2)
                    && p.view.state(*m) != Some(CopyState::UpToDate)
                {
                    self.effects.push(Effect::ReportClean {
                        pg,
                        disk: *m,
                        epoch,
                    });
                }
            }
        }
        for (pg, me) in settle_again {
            self.settle(pg, me);
        }
        self.tick_checks();
        // Budget granted since, or slots freed without a completion.
        self.pump_starved();
    }

    // ---- read repair and scrub ----------------------------------------------
    //
    // Every repair runs at the primary, in its order of changes: a check
    // holds its extent like a change in flight (no overlapping client change
    // starts meanwhile, and it starts only when none is in flight), reads a
    // good copy (its own, or a member's when its own is bad), and becomes a
    // rewrite `Op` of the bad copies under a new sequence number. Every copy
    // it reads therefore holds every change acknowledged before it, and no
    // change acknowledged after it is overwritten (see docs/replication.md).

    fn on_repair(&mut self, pg: u32, disk: u32, client: u64, extent: Extent) {
        let tick = self.tick;
        let retry = Effect::Reply {
            client,
            result: ClientResult::Retry,
        };
        let extent = extent.blocks();
        let Some(p) = self.pgs.get_mut(&(pg, disk)) else {
            self.effects.push(retry);
            return;
        };
        if let Some(pr) = p.primary.as_mut() {
            if !pr.active || pr.repairs.len() >= REPAIRS_MAX {
                self.effects.push(retry);
                return;
            }
            pr.repairs.push_back(RepairJob {
                extent,
                targets: BTreeSet::from([disk]),
                origin: RepairOrigin::Client(client),
            });
            self.pump(pg, disk);
            return;
        }
        // A member: the primary orders the repair (it alone knows which
        // changes of the extent are in flight).
        let prim = p.view.primary;
        let uptodate = p.view.state(disk) == Some(CopyState::UpToDate);
        match prim {
            Some(prim) if prim != disk && uptodate && p.asks.len() < ASKS_MAX => {
                let id = self.next_token;
                self.next_token += 1;
                p.asks.insert(
                    id,
                    Ask {
                        client,
                        extent,
                        sent_tick: tick,
                    },
                );
                self.effects.push(Effect::Send(Msg {
                    pg,
                    from: disk,
                    to: prim,
                    epoch: p.view.epoch,
                    body: Body::RepairReq { id, extent },
                }));
            }
            _ => self.effects.push(retry),
        }
    }

    fn on_repair_req(&mut self, pg: u32, me: u32, from: u32, id: u64, extent: Extent) {
        let Some(p) = self.pgs.get_mut(&(pg, me)) else {
            return;
        };
        if !p.view.members.contains(&from) || from == me {
            return;
        }
        let Some(pr) = p.primary.as_mut().filter(|pr| pr.active) else {
            // Not serving: the member asks again, of the primary of its
            // next map.
            return;
        };
        let origin = RepairOrigin::Member(from, id);
        let known = pr.repairs.iter().any(|j| j.origin == origin)
            || pr.checks.values().any(|c| c.origin == origin)
            || pr.splits.values().any(|s| s.origin == origin)
            || pr.ops.values().any(|o| o.repair == Some(origin));
        if known || pr.repairs.len() >= REPAIRS_MAX {
            return;
        }
        pr.repairs.push_back(RepairJob {
            extent: extent.blocks(),
            targets: BTreeSet::from([from]),
            origin,
        });
        self.pump(pg, me);
    }

    fn on_repaired(&mut self, pg: u32, me: u32, from: u32, id: u64, ok: bool) {
        let Some(p) = self.pgs.get_mut(&(pg, me)) else {
            return;
        };
        if p.view.primary != Some(from) {
            return;
        }
        if let Some(a) = p.asks.remove(&id) {
            self.effects.push(Effect::Reply {
                client: a.client,
                result: if ok {
                    ClientResult::Ok
                } else {
                    ClientResult::Failed
                },
            });
        }
    }

    fn on_fetch(&mut self, pg: u32, me: u32, from: u32, epoch: u64, id: u64, extent: Extent) {
        if self.fenced(pg, me, from, epoch).is_some() {
            return;
        }
        let token = self.token(Token::FetchForPeer {
            pg,
            disk: me,
            to: from,
            id,
        });
        self.effects.push(Effect::Read {
            disk: me,
            token,
            extent,
        });
    }

    fn on_digest_req(&mut self, pg: u32, me: u32, from: u32, epoch: u64, id: u64, extent: Extent) {
        if self.fenced(pg, me, from, epoch).is_some() {
            return;
        }
        let token = self.token(Token::DigestForPeer {
            pg,
            disk: me,
            to: from,
            id,
        });
        self.effects.push(Effect::Digest {
            disk: me,
            token,
            extent,
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn on_fetched(
        &mut self,
        pg: u32,
        me: u32,
        from: u32,
        id: u64,
        ok: bool,
        extent: Extent,
        data: Option<D>,
    ) {
        let reclaiming = self
            .pgs
            .get(&(pg, me))
            .and_then(|p| p.primary.as_ref())
            .and_then(|pr| pr.reclaim.as_ref())
            .and_then(|rc| rc.fetching.get(&id))
            .is_some_and(|(m, _, _)| *m == from);
        if reclaiming {
            return self.reclaim_fetched(pg, me, id, ok, extent, data);
        }
        let Some(c) = self
            .pgs
            .get_mut(&(pg, me))
            .and_then(|p| p.primary.as_mut())
            .and_then(|pr| pr.checks.get_mut(&id))
        else {
            return;
        };
        if !matches!(c.stage, Stage::Fetch { source } if source == from) {
            return;
        }
        if ok {
            // A source may only shorten the extent (the volume's end).
            if extent.volume_id != c.extent.volume_id
                || extent.chunk_index != c.extent.chunk_index
                || extent.offset != c.extent.offset
                || extent.length > c.extent.length
            {
                return;
            }
            self.rewrite(pg, me, id, extent, data);
        } else {
            // The source's copy is bad too: repair it as well.
            c.targets.insert(from);
            c.tried.insert(from);
            self.next_source(pg, me, id);
        }
    }

    fn on_digest_reply(&mut self, pg: u32, me: u32, from: u32, id: u64, digest: Digest) {
        let Some(c) = self
            .pgs
            .get_mut(&(pg, me))
            .and_then(|p| p.primary.as_mut())
            .and_then(|pr| pr.checks.get_mut(&id))
        else {
            return;
        };
        let Stage::Digest { waiting, digests } = &mut c.stage else {
            return;
        };
        if !waiting.remove(&from) {
            return;
        }
        digests.insert(from, digest);
        if waiting.is_empty() {
            self.decide(pg, me, id);
        }
    }

    fn on_read_failed(&mut self, token: u64) {
        match self.tokens.remove(&token) {
            Some(Token::CompareRead { pg, disk, id }) => {
                let e = Extent {
                    volume_id: 0,
                    chunk_index: 0,
                    offset: 0,
                    length: 0,
                };
                self.compared(pg, disk, id, e, Err(()));
            }
            Some(Token::Read { pg, disk, seq }) => {
                // A recovery push found our own copy bad: repair it first
                // (the push is retried after).
                let Some(pr) = self
                    .pgs
                    .get_mut(&(pg, disk))
                    .and_then(|p| p.primary.as_mut())
                else {
                    return;
                };
                let Some(op) = pr.ops.get_mut(&seq) else {
                    return;
                };
                op.reading = false;
                op.failed = true;
                let extent = op.update.extent;
                if pr.repairs.len() < REPAIRS_MAX
                    && !pr.repairs.iter().any(|j| j.extent.overlaps(&extent))
                {
                    pr.repairs.push_back(RepairJob {
                        extent,
                        targets: BTreeSet::from([disk]),
                        origin: RepairOrigin::Internal,
                    });
                }
                self.finish_ops(pg, disk);
            }
            Some(Token::CheckRead { pg, disk, id }) => {
                let Some(c) = self
                    .pgs
                    .get_mut(&(pg, disk))
                    .and_then(|p| p.primary.as_mut())
                    .and_then(|pr| pr.checks.get_mut(&id))
                else {
                    return;
                };
                c.targets.insert(disk);
                self.next_source(pg, disk, id);
            }
            Some(Token::FetchForPeer { pg, disk, to, id }) => {
                let epoch = self.epoch();
                self.effects.push(Effect::Send(Msg {
                    pg,
                    from: disk,
                    to,
                    epoch,
                    body: Body::Fetched {
                        id,
                        ok: false,
                        extent: Extent {
                            volume_id: 0,
                            chunk_index: 0,
                            offset: 0,
                            length: 0,
                        },
                        data: None,
                    },
                }));
            }
            _ => {}
        }
    }

    fn on_digested(&mut self, token: u64, digest: Digest) {
        match self.tokens.remove(&token) {
            Some(Token::DigestForPeer { pg, disk, to, id }) => {
                let epoch = self.epoch();
                self.effects.push(Effect::Send(Msg {
                    pg,
                    from: disk,
                    to,
                    epoch,
                    body: Body::DigestReply { id, digest },
                }));
            }
            Some(Token::CheckDigest { pg, disk, id }) => {
                self.on_digest_reply(pg, disk, disk, id, digest)
            }
            _ => {}
        }
    }

    fn on_scrub(&mut self, only: Option<u32>) {
        let keys: Vec<(u32, u32)> = self.pgs.keys().copied().collect();
        for (pg, me) in keys {
            if only.is_some_and(|o| o != pg) {
                continue;
            }
            let p = self.pgs.get_mut(&(pg, me)).expect("pg");
            let epoch = p.view.epoch;
            let members: BTreeSet<u32> = p
                .view
                .write_set()
                .into_iter()
                .filter(|m| p.view.state(*m) == Some(CopyState::UpToDate))
                .collect();
            let Some(pr) = p.primary.as_mut().filter(|pr| pr.active) else {
                continue;
            };
            if pr.scrub.is_some() {
                continue;
            }
            let mut listing = members.clone();
            listing.insert(me);
            pr.scrub = Some(ScrubRun {
                listing,
                todo: BTreeSet::new(),
                inflight: 0,
            });
            let token = new_token(
                &mut self.tokens,
                &mut self.next_token,
                Token::ScrubList { pg, disk: me },
            );
            self.effects.push(Effect::ListRegions {
                disk: me,
                token,
                pg,
            });
            for m in members.iter().filter(|m| **m != me) {
                self.effects.push(Effect::Send(Msg {
                    pg,
                    from: me,
                    to: *m,
                    epoch,
                    body: Body::LogQuery { full: true },
                }));
            }
        }
    }

    /// Start the repairs that wait and, within the scrub's rate, the next
    /// scrub regions; end a scrub that has nothing left.
    fn start_checks(&mut self, pg: u32, me: u32) {
        let tick = self.tick;
        let Some(p) = self.pgs.get_mut(&(pg, me)) else {
            return;
        };
        let epoch = p.view.epoch;
        let members = compared_members(&p.view, me);
        let Some(pr) = p.primary.as_mut().filter(|pr| pr.active) else {
            return;
        };
        let mut started: Vec<u64> = Vec::new();
        let mut blocked: Vec<Extent> = Vec::new();
        let mut keep = VecDeque::new();
        while let Some(j) = pr.repairs.pop_front() {
            if pr.busy(&j.extent) || blocked.iter().any(|b| b.overlaps(&j.extent)) {
                blocked.push(j.extent);
                keep.push_back(j);
                continue;
            }
            let id = self.next_token;
            self.next_token += 1;
            pr.checks.insert(
                id,
                Check {
                    extent: j.extent,
                    targets: j.targets,
                    tried: BTreeSet::new(),
                    origin: j.origin,
                    stage: Stage::ReadLocal,
                    sent_tick: tick,
                },
            );
            started.push(id);
        }
        pr.repairs = keep;
        let mut scrub_done = false;
        if let Some(sc) = pr.scrub.as_mut() {
            // Only once every copy's list is in: a region compared before a
            // late list names it again would be compared twice.
            while sc.listing.is_empty() && sc.inflight < SCRUB_INFLIGHT_MAX && self.scrub_budget > 0
            {
                // Not a region peering or recovery is about to overwrite:
                // its copies may legitimately differ until then (a change
                // of the old primary that reached some members only).
                let next = sc.todo.iter().copied().find(|reg| {
                    let e = reg.extent();
                    !pr.ops.values().any(|o| o.update.extent.overlaps(&e))
                        && !pr.checks.values().any(|c| c.extent.overlaps(&e))
                        && !pr.compares.values().any(|c| c.extent.overlaps(&e))
                        && !pr.queue.iter().any(|q| q.extent.overlaps(&e))
                        && !pr.repairs.iter().any(|j| j.extent.overlaps(&e))
                        && !pr.recovering.values().any(|r| r.todo.contains(reg))
                });
                let Some(reg) = next else { break };
                sc.todo.remove(&reg);
                sc.inflight += 1;
                self.scrub_budget -= 1;
                let (id, check) = digest_check(
                    pg,
                    me,
                    epoch,
                    tick,
                    &members,
                    reg.extent(),
                    RepairOrigin::Scrub,
                    &mut self.effects,
                    &mut self.tokens,
                    &mut self.next_token,
                );
                pr.checks.insert(id, check);
            }
            scrub_done = sc.listing.is_empty() && sc.todo.is_empty() && sc.inflight == 0;
        }
        if scrub_done {
            pr.scrub = None;
            self.stats.scrubs += 1;
        }
        for id in started {
            self.start_check(pg, me, id);
        }
    }

    /// The primary's copy of a COMPARE AND WRITE's extent was read (`Err`:
    /// the read failed): answer a difference, or queue the write first in
    /// line, so nothing that waited behind the compare overtakes it.
    fn compared(&mut self, pg: u32, me: u32, id: u64, extent: Extent, data: Result<Option<D>, ()>) {
        let Some(p) = self.pgs.get_mut(&(pg, me)) else {
            return;
        };
        let Some(pr) = p.primary.as_mut() else {
            return;
        };
        let Some(c) = pr.compares.remove(&id) else {
            return;
        };
        let result = match data {
            // The copy failed its read (a checksum error or the disk):
            // repair it from a good copy, and let the gateway resend (by
            // then it compares the repaired copy).
            Err(()) => {
                let whole = c.extent.blocks();
                if pr.repairs.len() < REPAIRS_MAX
                    && !pr.repairs.iter().any(|j| j.extent.overlaps(&whole))
                {
                    pr.repairs.push_back(RepairJob {
                        extent: whole,
                        targets: BTreeSet::from([me]),
                        origin: RepairOrigin::Internal,
                    });
                }
                Some(ClientResult::Retry)
            }
            // Nothing read (the engine refused: overloaded, or the volume
            // went away): the gateway tries again (and finds a deleted
            // volume gone).
            Ok(_) if extent.length == 0 => Some(ClientResult::Retry),
            Ok(d) => D::first_difference(&c.compare, d.as_ref()).map(ClientResult::Miscompare),
        };
        let result = match result {
            // A resend whose write a later change replaced: it was
            // written, and that change reached every member.
            Some(ClientResult::Miscompare(_)) if c.reassert => {
                remember_cas(&mut p.cas_done, c.token);
                Some(ClientResult::Ok)
            }
            // Not decided: the next resend compares its own data again.
            Some(ClientResult::Retry) if c.reassert => {
                pr.cas_peered.insert(c.token);
                Some(ClientResult::Retry)
            }
            r => r,
        };
        match result {
            Some(result) => self.effects.push(Effect::Reply {
                client: c.client,
                result,
            }),
            None => pr.queue.push_front(Queued {
                client: c.client,
                extent: c.extent,
                change: Change::Write(c.data),
                fua: c.fua,
                compare: None,
                cas: Some(c.token),
            }),
        }
        self.pump(pg, me);
    }

    /// A repair check begins: read our own copy unless it is a target.
    fn start_check(&mut self, pg: u32, me: u32, id: u64) {
        let Some(c) = self
            .pgs
            .get_mut(&(pg, me))
            .and_then(|p| p.primary.as_mut())
            .and_then(|pr| pr.checks.get_mut(&id))
        else {
            return;
        };
        if c.targets.contains(&me) {
            self.next_source(pg, me, id);
            return;
        }
        c.stage = Stage::ReadLocal;
        let extent = c.extent;
        let token = self.token(Token::CheckRead { pg, disk: me, id });
        self.effects.push(Effect::Read {
            disk: me,
            token,
            extent,
        });
    }

    /// All digests of a scrub region are in: find the bad copies.
    fn decide(&mut self, pg: u32, me: u32, id: u64) {
        let Some(p) = self.pgs.get_mut(&(pg, me)) else {
            return;
        };
        let order = p.view.members.clone();
        let Some(c) = p.primary.as_mut().and_then(|pr| pr.checks.get_mut(&id)) else {
            return;
        };
        let Stage::Digest { digests, .. } = &c.stage else {
            return;
        };
        // The primary's copy is the authority when its blocks verify: it
        // applied every acknowledged change (a member's differing copy can
        // only hold a change never acknowledged, or a lost one). When its
        // own copy is bad, the first member in placement order whose copy
        // verifies is the source.
        let authority = match digests.get(&me) {
            Some(Digest::Sum(x)) => Some(*x),
            _ => order
                .iter()
                .filter_map(|m| match digests.get(m) {
                    Some(Digest::Sum(x)) => Some(*x),
                    _ => None,
                })
                .next(),
        };
        let targets: BTreeSet<u32> = digests
            .iter()
            .filter(|(_, d)| authority.is_none_or(|a| **d != Digest::Sum(a)))
            .map(|(m, _)| *m)
            .collect();
        if c.origin == RepairOrigin::Scrub {
            self.stats.scrub_regions += 1;
            self.stats.scrub_errors += targets.len() as u64;
            self.stats.scrub_mismatches += targets
                .iter()
                .filter(|m| matches!(digests.get(m), Some(Digest::Sum(_))))
                .count() as u64;
        }
        c.targets = targets;
        let mine_good = !c.targets.contains(&me);
        if c.targets.is_empty() {
            self.end_check(pg, me, id, true);
        } else if mine_good {
            self.start_check(pg, me, id);
        } else {
            self.next_source(pg, me, id);
        }
    }

    /// Ask the next member that may hold a good copy for its data, or give
    /// up when none is left.
    fn next_source(&mut self, pg: u32, me: u32, id: u64) {
        let tick = self.tick;
        let Some(p) = self.pgs.get_mut(&(pg, me)) else {
            return;
        };
        let view = p.view.clone();
        let Some(c) = p.primary.as_mut().and_then(|pr| pr.checks.get_mut(&id)) else {
            return;
        };
        let source = view
            .members
            .iter()
            .zip(&view.up)
            .zip(&view.states)
            .find(|((m, up), st)| {
                **m != me
                    && **up
                    && **st == CopyState::UpToDate
                    && !c.targets.contains(m)
                    && !c.tried.contains(m)
            })
            .map(|((m, _), _)| *m);
        let Some(source) = source else {
            if c.extent.length > BLOCK_BYTES && !matches!(c.origin, RepairOrigin::Part(_)) {
                // Every copy failed somewhere in the extent: each block may
                // still have a good copy.
                self.split_check(pg, me, id);
                return;
            }
            // No good copy is left to take the data from.
            self.stats.unrepairable += 1;
            self.end_check(pg, me, id, false);
            return;
        };
        c.stage = Stage::Fetch { source };
        c.sent_tick = tick;
        let extent = c.extent;
        self.effects.push(Effect::Send(Msg {
            pg,
            from: me,
            to: source,
            epoch: view.epoch,
            body: Body::Fetch { id, extent },
        }));
    }

    /// No copy could give a check's whole extent: check it again block by
    /// block (see `Split`). The blocks' checks replace it in the same step,
    /// so the extent stays held against client changes throughout.
    fn split_check(&mut self, pg: u32, me: u32, id: u64) {
        let tick = self.tick;
        let Some(p) = self.pgs.get_mut(&(pg, me)) else {
            return;
        };
        let epoch = p.view.epoch;
        let members = compared_members(&p.view, me);
        let Some(pr) = p.primary.as_mut() else {
            return;
        };
        let Some(c) = pr.checks.remove(&id) else {
            return;
        };
        let blocks: Vec<Extent> = (c.extent.offset..c.extent.end())
            .step_by(BLOCK_BYTES as usize)
            .map(|offset| Extent {
                offset,
                length: BLOCK_BYTES.min(c.extent.end() - offset),
                ..c.extent
            })
            .collect();
        pr.splits.insert(
            id,
            Split {
                origin: c.origin,
                left: blocks.len(),
                ok: true,
            },
        );
        for extent in blocks {
            let (sub, check) = digest_check(
                pg,
                me,
                epoch,
                tick,
                &members,
                extent,
                RepairOrigin::Part(id),
                &mut self.effects,
                &mut self.tokens,
                &mut self.next_token,
            );
            pr.checks.insert(sub, check);
        }
    }

    /// A check ends without a rewrite: nothing to repair (`ok`) or nothing
    /// to repair from.
    fn end_check(&mut self, pg: u32, me: u32, id: u64, ok: bool) {
        let Some(p) = self.pgs.get_mut(&(pg, me)) else {
            return;
        };
        let epoch = p.view.epoch;
        let Some(pr) = p.primary.as_mut() else {
            return;
        };
        let Some(c) = pr.checks.remove(&id) else {
            return;
        };
        repair_done(pg, me, epoch, pr, c.origin, ok, &mut self.effects);
        self.pump(pg, me);
    }

    /// The good content of a check's extent is known: rewrite the bad
    /// copies with it as a change of our order (a new sequence number, so it
    /// comes after every change before it and before every change after
    /// it on every copy).
    fn rewrite(&mut self, pg: u32, me: u32, id: u64, extent: Extent, data: Option<D>) {
        let tick = self.tick;
        let Some(p) = self.pgs.get_mut(&(pg, me)) else {
            return;
        };
        let (epoch, trim) = (p.view.epoch, p.trim);
        let ws = p.view.write_set();
        let Some(pr) = p.primary.as_mut() else {
            return;
        };
        let Some(c) = pr.checks.remove(&id) else {
            return;
        };
        if extent.length == 0 {
            // The volume is gone: nothing to repair.
            repair_done(pg, me, epoch, pr, c.origin, true, &mut self.effects);
            self.pump(pg, me);
            return;
        }
        let seq = Seq {
            term: pr.term,
            n: pr.next_n,
        };
        pr.next_n += 1;
        let update = Update {
            seq,
            extent,
            change: data.map_or(Change::Zeroes, Change::Write),
            // Durable at once: a crash must not bring the bad block back
            // under a copy that was reported repaired.
            fua: true,
        };
        let local = c.targets.contains(&me);
        let waiting: BTreeSet<u32> = c
            .targets
            .iter()
            .copied()
            .filter(|m| *m != me && ws.contains(m))
            .collect();
        let mut repaired = waiting.clone();
        if local {
            repaired.insert(me);
            let token = new_token(
                &mut self.tokens,
                &mut self.next_token,
                Token::Apply { pg, disk: me, seq },
            );
            self.effects.push(Effect::Apply {
                disk: me,
                token,
                update: update.clone(),
                log: p
                    .log
                    .contains_key(&seq)
                    .then_some(LogNote { pg, cas: None }),
            });
        }
        pr.ops.insert(
            seq,
            Op {
                update: update.clone(),
                client: None,
                waiting: waiting.clone(),
                local_pending: local,
                local_started: true,
                sent_tick: tick,
                push: None,
                reading: false,
                failed: false,
                repair: Some(c.origin),
                repaired,
                bad_copies: BTreeSet::new(),
            },
        );
        let committed = committed_of(pr);
        for m in waiting {
            self.effects.push(Effect::Send(Msg {
                pg,
                from: me,
                to: m,
                epoch,
                body: Body::Replicate {
                    update: update.clone(),
                    committed,
                    trim,
                    cas: None,
                },
            }));
        }
        self.finish_ops(pg, me);
    }

    /// Per tick: resend what checks, scrub listings and asked repairs wait
    /// for; refill the scrub's allowance.
    fn tick_checks(&mut self) {
        let tick = self.tick;
        self.scrub_budget = self.scrub_per_tick;
        let keys: Vec<(u32, u32)> = self.pgs.keys().copied().collect();
        for (pg, me) in keys {
            let p = self.pgs.get_mut(&(pg, me)).expect("pg");
            let view = p.view.clone();
            let eligible = |m: u32| {
                m == me
                    || view.write_set().contains(&m) && view.state(m) == Some(CopyState::UpToDate)
            };
            // Asked repairs: again of the current primary, or the client
            // retries when we lead now or are no longer up to date.
            let mut retry = Vec::new();
            for (id, a) in p.asks.iter_mut() {
                if tick - a.sent_tick < RESEND_TICKS {
                    continue;
                }
                match view.primary {
                    Some(prim) if prim != me && view.state(me) == Some(CopyState::UpToDate) => {
                        a.sent_tick = tick;
                        self.effects.push(Effect::Send(Msg {
                            pg,
                            from: me,
                            to: prim,
                            epoch: view.epoch,
                            body: Body::RepairReq {
                                id: *id,
                                extent: a.extent,
                            },
                        }));
                    }
                    _ => retry.push(*id),
                }
            }
            for id in retry {
                let a = p.asks.remove(&id).expect("ask");
                self.effects.push(Effect::Reply {
                    client: a.client,
                    result: ClientResult::Retry,
                });
            }
            let Some(pr) = p.primary.as_mut() else {
                continue;
            };
            if let Some(sc) = pr.scrub.as_mut() {
                sc.listing.retain(|m| eligible(*m));
                if tick.is_multiple_of(RESEND_TICKS) {
                    for m in sc.listing.iter().filter(|m| **m != me) {
                        self.effects.push(Effect::Send(Msg {
                            pg,
                            from: me,
                            to: *m,
                            epoch: view.epoch,
                            body: Body::LogQuery { full: true },
                        }));
                    }
                }
            }
            let mut decide = Vec::new();
            let mut refetch = Vec::new();
            for (id, c) in pr.checks.iter_mut() {
                match &mut c.stage {
                    Stage::Digest { waiting, .. } => {
                        // A member that left is not compared (nor repaired).
                        waiting.retain(|m| eligible(*m));
                        if waiting.is_empty() {
                            decide.push(*id);
                        } else if tick - c.sent_tick >= RESEND_TICKS {
                            c.sent_tick = tick;
                            for m in waiting.iter().filter(|m| **m != me) {
                                self.effects.push(Effect::Send(Msg {
                                    pg,
                                    from: me,
                                    to: *m,
                                    epoch: view.epoch,
                                    body: Body::DigestReq {
                                        id: *id,
                                        extent: c.extent,
                                    },
                                }));
                            }
                        }
                    }
                    Stage::Fetch { source } => {
                        if !eligible(*source) {
                            c.tried.insert(*source);
                            refetch.push(*id);
                        } else if tick - c.sent_tick >= RESEND_TICKS {
                            c.sent_tick = tick;
                            self.effects.push(Effect::Send(Msg {
                                pg,
                                from: me,
                                to: *source,
                                epoch: view.epoch,
                                body: Body::Fetch {
                                    id: *id,
                                    extent: c.extent,
                                },
                            }));
                        }
                    }
                    Stage::ReadLocal => {}
                }
            }
            for id in decide {
                self.decide(pg, me, id);
            }
            for id in refetch {
                self.next_source(pg, me, id);
            }
            self.pump(pg, me);
        }
    }

    fn on_member_lost(&mut self, disk: u32) {
        let led: Vec<(u32, u32)> = self
            .pgs
            .iter()
            .filter(|((_, me), p)| {
                *me != disk && p.primary.is_some() && p.view.write_set().contains(&disk)
            })
            .map(|(k, _)| *k)
            .collect();
        for (pg, me) in led {
            self.settle(pg, me);
        }
        // A member whose primary died holds, in memory, the changes that
        // primary acknowledged and nobody flushed: make them durable now,
        // not a heartbeat grace later when the map names a new primary (and
        // it settles). One flush per local disk; nothing waits for it.
        let mine: BTreeSet<u32> = self
            .pgs
            .iter()
            .filter(|((_, me), p)| {
                *me != disk && p.primary.is_none() && p.view.primary == Some(disk)
            })
            .map(|((_, me), _)| *me)
            .collect();
        for me in mine {
            let token = self.token(Token::Durable);
            self.effects.push(Effect::Flush { disk: me, token });
        }
    }

    /// Make this primary's copy durable before the group goes on. Every
    /// change acknowledged so far was applied by every member of the write
    /// set, but made durable only by the next flush; when a member leaves the
    /// write set or restarts (or this daemon becomes primary because the old
    /// one is gone), this copy may be the only one still holding some of
    /// them, in memory, and nobody could give them back if this process
    /// crashed too (a restarted member vouches only for what its new process
    /// applied). So the primary flushes itself at once, and until the flush
    /// is done it starts no new change, recovery or peering push of the
    /// group and acknowledges nothing: changes already in flight go on
    /// (resent, applied here and by the members) but are answered only once
    /// a flush that began after their local write completed is done
    /// (`settle_dirty`), so each is on this disk when its client hears.
    fn settle(&mut self, pg: u32, me: u32) {
        let Some(pr) = self.pgs.get_mut(&(pg, me)).and_then(|p| p.primary.as_mut()) else {
            return;
        };
        pr.settling = true;
        if pr.settle_token.is_some() {
            // The flush in flight covers every change acknowledged so far
            // (none is acknowledged while settling); local writes that
            // complete meanwhile are caught by `settle_dirty` when it
            // answers. Asking again here would only postpone the end while
            // triggers keep coming (a link that keeps dropping).
            return;
        }
        pr.settle_dirty = false;
        let token = self.token(Token::Settle { pg, disk: me });
        if let Some(pr) = self.pgs.get_mut(&(pg, me)).and_then(|p| p.primary.as_mut()) {
            pr.settle_token = Some(token);
        }
        self.stats.settles += 1;
        self.effects.push(Effect::Flush { disk: me, token });
    }

    fn settled(&mut self, pg: u32, me: u32, token: u64, ok: bool) {
        let Some(p) = self.pgs.get_mut(&(pg, me)) else {
            return;
        };
        let Some(pr) = p.primary.as_mut() else {
            return;
        };
        if pr.settle_token != Some(token) {
            return;
        }
        pr.settle_token = None;
        if !ok {
            // Asked again on the next tick; the group waits meanwhile.
            return;
        }
        if pr.settle_dirty {
            return self.settle(pg, me);
        }
        if pr.ops.values().any(|o| o.local_started && o.local_pending) {
            // Local writes still in flight complete after this flush: the
            // last of them asks for the next one (`on_applied`).
            return;
        }
        pr.settling = false;
        if pr.active {
            start_recoveries(
                p,
                &mut self.stats,
                &mut self.effects,
                &mut self.tokens,
                &mut self.next_token,
            );
            // Answers held while settling go out; then new changes start.
            self.finish_ops(pg, me);
            self.pump(pg, me);
        } else {
            self.finish_ops(pg, me);
            self.check_peering(pg, me);
        }
    }

    fn check_peering(&mut self, pg: u32, me: u32) {
        let Some(p) = self.pgs.get_mut(&(pg, me)) else {
            return;
        };
        let Some(pr) = p.primary.as_mut() else {
            return;
        };
        if pr.active || !pr.peering.is_empty() || pr.settling {
            return;
        }
        if pr.reclaim.as_ref().is_some_and(|rc| !rc.done()) {
            return;
        }
        // What was taken back is ours now; the up-to-date members (if any)
        // get it as uncertain regions below.
        let reclaimed = pr.reclaim.take().map(|rc| rc.regions).unwrap_or_default();
        p.fresh = false;
        // A change up to the highest commit point any up-to-date copy knows
        // of was acknowledged by every target of its primary (or made to
        // agree by a later primary's peering), so it is on every up-to-date
        // copy: only later entries are uncertain. Our own uncommitted
        // entries may be missing elsewhere too.
        let committed = p.committed.max(pr.peer_committed);
        p.committed = committed;
        let mut regions: BTreeSet<Region> = BTreeSet::new();
        for (_, e) in p.log.range(..).filter(|(s, _)| **s > committed) {
            regions.extend(e.regions());
        }
        for (_, e) in std::mem::take(&mut pr.peer_entries)
            .iter()
            .filter(|(s, _)| *s > committed)
        {
            regions.extend(e.regions());
        }
        regions.extend(reclaimed);
        pr.active = true;
        self.active_gen += 1;
        // Make the uncertain regions agree: they become changes of this term
        // (logged, so absent members get them too) pushed to every up-to-date
        // member; outdated members get them through their recovery.
        let uptodate: Vec<u32> = p
            .view
            .write_set()
            .into_iter()
            .filter(|m| *m != me && p.view.state(*m) == Some(CopyState::UpToDate))
            .collect();
        for reg in &regions {
            let seq = Seq {
                term: pr.term,
                n: pr.next_n,
            };
            pr.next_n += 1;
            p.log.insert(seq, reg.extent());
        }
        if !regions.is_empty() && !uptodate.is_empty() {
            pr.commit_floor = Some(p.committed);
        }
        for m in uptodate {
            let inc = p.view.incarnation(m);
            let r = pr.recovering.entry(m).or_default();
            r.incarnation = inc;
            r.todo.extend(regions.iter().copied());
        }
        start_recoveries(
            p,
            &mut self.stats,
            &mut self.effects,
            &mut self.tokens,
            &mut self.next_token,
        );
        self.pump(pg, me);
    }
}

/// The pieces a restarted primary takes back: each byte of every reported
/// change's extent from the member holding the newest change covering it
/// (any vouched change's member holds every acknowledged change after it,
/// so each piece is safe alone; the newest also keeps later changes in
/// flight). Pieces are split at `PUSH_REGIONS_MAX` regions.
fn reclaim_pieces(mut entries: Vec<(Seq, Extent, u32)>, me: u32) -> VecDeque<(u32, Extent)> {
    // Newest first; a change reported by several members is taken once
    // (from this copy itself when it holds it: nothing to fetch).
    entries.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then((a.2 != me).cmp(&(b.2 != me)))
            .then(a.2.cmp(&b.2))
    });
    entries.dedup_by_key(|e| e.0);
    // Per chunk, the byte ranges already taken: start -> end.
    let mut covered: BTreeMap<(u64, u32), BTreeMap<u32, u32>> = BTreeMap::new();
    let mut out = VecDeque::new();
    let most = PUSH_REGIONS_MAX * REGION_BYTES;
    for (_, e, m) in entries {
        if e.length == 0 {
            continue;
        }
        let taken = covered.entry((e.volume_id, e.chunk_index)).or_default();
        let mut at = e.offset;
        let end = e.end();
        // Walk the taken ranges overlapping [at, end): the gaps are new.
        let mut overlapping: Vec<(u32, u32)> = taken
            .range(..=e.offset)
            .next_back()
            .filter(|(_, b)| **b > e.offset)
            .map(|(a, b)| (*a, *b))
            .into_iter()
            .collect();
        overlapping.extend(taken.range(e.offset + 1..end).map(|(a, b)| (*a, *b)));
        let mut gaps = Vec::new();
        for (a, b) in &overlapping {
            if *a > at {
                gaps.push((at, *a));
            }
            at = at.max(*b);
        }
        if at < end {
            gaps.push((at, end));
        }
        // Merge this extent into the taken ranges.
        let (mut lo, mut hi) = (e.offset, end);
        for (a, b) in overlapping {
            taken.remove(&a);
            lo = lo.min(a);
            hi = hi.max(b);
        }
        taken.insert(lo, hi);
        if m == me {
            continue;
        }
        for (a, b) in gaps {
            let mut o = a;
            while o < b {
                let len = (b - o).min(most);
                out.push_back((
                    m,
                    Extent {
                        offset: o,
                        length: len,
                        ..e
                    },
                ));
                o += len;
            }
        }
    }
    out
}

fn view_state(states: &[(u32, CopyState)], disk: u32) -> Option<CopyState> {
    states.iter().find(|(d, _)| *d == disk).map(|(_, s)| *s)
}

fn inc_of(incs: &[(u32, u64)], disk: u32) -> u64 {
    incs.iter().find(|(d, _)| *d == disk).map_or(0, |(_, i)| *i)
}

/// Everything after `committed` in a member's log: what a new primary must
/// reconcile.
fn uncommitted<D>(p: &Pg<D>) -> Vec<(Seq, Extent)> {
    p.log
        .range(..)
        .filter(|(s, _)| **s > p.trim && p.term_committed.get(&s.term).is_none_or(|n| s.n > *n))
        .map(|(s, e)| (*s, *e))
        .collect()
}

/// A commit point heard from (or set by) the primary of its own term.
fn note_committed<D>(p: &mut Pg<D>, c: Seq) {
    let n = p.term_committed.entry(c.term).or_default();
    *n = (*n).max(c.n);
}

/// The primary's commit point: every change before the oldest in flight has
/// been acknowledged by all its targets.
fn committed_of<D>(pr: &Primary<D>) -> Seq {
    let c = match pr.ops.keys().next() {
        Some(s) => Seq {
            term: s.term,
            n: s.n - 1,
        },
        None => Seq {
            term: pr.term,
            n: pr.next_n - 1,
        },
    };
    let c = match pr.unsettled.first() {
        Some(s) => c.min(Seq {
            term: s.term,
            n: s.n - 1,
        }),
        None => c,
    };
    match pr.commit_floor {
        Some(f) => c.min(f),
        None => c,
    }
}

/// Learn a newer commit point and trim point; forget what the trim point
/// makes durable everywhere.
fn advance<D>(p: &mut Pg<D>, committed: Seq, trim: Seq) {
    p.committed = p.committed.max(committed);
    note_committed(p, committed);
    promote_cas(p);
    if trim > p.trim {
        p.trim = trim;
        p.log = p.log.split_off(&Seq {
            term: trim.term,
            n: trim.n + 1,
        });
        p.applied = p.applied.split_off(&Seq {
            term: trim.term,
            n: trim.n + 1,
        });
        p.refused = p.refused.split_off(&Seq {
            term: trim.term,
            n: trim.n + 1,
        });
        p.term_committed = p.term_committed.split_off(&trim.term);
    }
}

/// A member's answers to the primaries waiting for change `seq`.
fn ack_all<D>(
    pg: u32,
    from: u32,
    epoch: u64,
    waiters: Vec<u32>,
    seq: Seq,
    result: AckResult,
) -> impl Iterator<Item = Effect<D>> {
    waiters.into_iter().map(move |to| {
        Effect::Send(Msg {
            pg,
            from,
            to,
            epoch,
            body: Body::Ack { seq, result },
        })
    })
}

/// Pending COMPARE AND WRITE tokens whose change the commit point of the
/// same term passed: acknowledged, so never undone.
fn promote_cas<D>(p: &mut Pg<D>) {
    let c = p.committed;
    let done: Vec<Seq> = p
        .cas_pending
        .range(..=c)
        .filter(|(s, _)| s.term == c.term)
        .map(|(s, _)| *s)
        .collect();
    for s in done {
        let (t, _) = p.cas_pending.remove(&s).expect("pending");
        remember_cas(&mut p.cas_done, t);
    }
}

fn remember_cas(done: &mut VecDeque<u64>, token: u64) {
    if done.len() >= CAS_TOKENS_MAX {
        done.pop_front();
    }
    done.push_back(token);
}

/// Begin a primary term: peer with the other up-to-date members.
fn start_term<D: Clone>(p: &mut Pg<D>, tick: u64, effects: &mut Vec<Effect<D>>) {
    // This copy's content is what peering makes every copy agree with, so
    // the COMPARE AND WRITE writes it applied stand once that is done
    // (`Primary::cas_peered`).
    let cas_peered: BTreeSet<u64> = std::mem::take(&mut p.cas_pending)
        .into_values()
        .map(|(t, _)| t)
        .collect();
    p.cas_applying.clear();
    let me = p.me;
    let term = p.view.epoch;
    let peering: BTreeSet<u32> = p
        .view
        .write_set()
        .into_iter()
        .filter(|m| *m != me && p.view.state(*m) == Some(CopyState::UpToDate))
        .collect();
    for m in &peering {
        effects.push(Effect::Send(Msg {
            pg: p.pg,
            from: me,
            to: *m,
            epoch: p.view.epoch,
            body: Body::LogQuery { full: false },
        }));
    }
    // A new process may have lost changes it applied and had not flushed:
    // the members that are not up to date may hold them (see `Reclaim`).
    let reclaim = p.fresh.then(|| {
        let asking: BTreeSet<u32> = p
            .view
            .write_set()
            .into_iter()
            .filter(|m| *m != me && p.view.state(*m) != Some(CopyState::UpToDate))
            .collect();
        for m in &asking {
            effects.push(Effect::Send(Msg {
                pg: p.pg,
                from: me,
                to: *m,
                epoch: p.view.epoch,
                body: Body::ReclaimQuery,
            }));
        }
        Reclaim {
            incarnations: asking
                .iter()
                .map(|m| (*m, p.view.incarnation(*m)))
                .collect(),
            asking,
            ..Reclaim::default()
        }
    });
    // Members absent now keep the log from the current trim point on.
    let durable = p.view.members.iter().map(|m| (*m, p.trim)).collect();
    p.primary = Some(Primary {
        term,
        next_n: 1,
        active: false,
        peering,
        peer_entries: Vec::new(),
        peer_committed: Seq::default(),
        peer_sent_tick: tick,
        ops: BTreeMap::new(),
        queue: VecDeque::new(),
        recovering: BTreeMap::new(),
        durable,
        rounds: BTreeMap::new(),
        pushes: 0,
        checks: BTreeMap::new(),
        splits: BTreeMap::new(),
        unsettled: BTreeSet::new(),
        compares: BTreeMap::new(),
        cas_writes: BTreeMap::new(),
        cas_peered,
        repairs: VecDeque::new(),
        scrub: None,
        commit_floor: None,
        reclaim,
        settling: false,
        settle_token: None,
        settle_dirty: false,
        trim_announced: Seq::default(),
    });
}

/// This copy now holds content its disk's log of group `pg` has no entry
/// for: the log is no longer vouched complete (said to the disk once).
fn unmark_disk_log<D>(disk_complete: &mut bool, disk: u32, pg: u32, effects: &mut Vec<Effect<D>>) {
    if std::mem::take(disk_complete) {
        effects.push(Effect::LogFloor {
            disk,
            pg,
            floor: Seq::default(),
            complete: false,
        });
    }
}

/// The highest change this copy knows of: applied, logged, issued (as
/// primary), trimmed or committed.
fn high_water<D>(p: &Pg<D>) -> Seq {
    let mut hw = p.trim.max(p.committed);
    if let Some(s) = p.log.keys().next_back() {
        hw = hw.max(*s);
    }
    if let Some(s) = p.applied.iter().next_back() {
        hw = hw.max(*s);
    }
    if let Some(pr) = &p.primary {
        hw = hw.max(Seq {
            term: pr.term,
            n: pr.next_n.saturating_sub(1),
        });
    }
    hw
}

/// Start recovering every outdated member of the write set that is not
/// being recovered yet: the regions of our log, or a full resync when the
/// log cannot tell.
fn start_recoveries<D: Clone>(
    p: &mut Pg<D>,
    stats: &mut Stats,
    effects: &mut Vec<Effect<D>>,
    tokens: &mut BTreeMap<u64, Token>,
    next_token: &mut u64,
) {
    let me = p.me;
    let (pg, epoch) = (p.pg, p.view.epoch);
    let view = &p.view;
    let pr = p.primary.as_mut().expect("primary");
    let new: Vec<u32> = view
        .write_set()
        .into_iter()
        .filter(|m| {
            *m != me
                && view.state(*m) != Some(CopyState::UpToDate)
                && !pr.recovering.contains_key(m)
        })
        .collect();
    for m in new {
        // A backfill member holds nothing a log could describe; one not
        // durable up to the floor may lack a change the log does not name.
        let durable = pr.durable.get(&m).copied().unwrap_or(p.trim).max(p.trim);
        let full = !p.complete || view.state(m) == Some(CopyState::Backfill) || durable < p.floor;
        if full {
            stats.full_resyncs += 1;
        } else {
            stats.delta_recoveries += 1;
        }
        let mut r = Recovery {
            incarnation: view.incarnation(m),
            full,
            ..Recovery::default()
        };
        if !full {
            // The member may miss the changes after its durable point (our
            // log holds every change since the trim point, which is no
            // later). Which of them it holds, it tells first.
            r.entries = p
                .log
                .range(..)
                .filter(|(s, _)| **s > durable)
                .map(|(s, e)| (*s, *e))
                .collect();
            r.todo = r.entries.iter().flat_map(|(_, e)| e.regions()).collect();
            r.entries_asked = true;
            effects.push(Effect::Send(Msg {
                pg,
                from: me,
                to: m,
                epoch,
                body: Body::LogQuery { full: false },
            }));
            if !r.entries.is_empty() {
                let id = *next_token;
                *next_token += 1;
                r.asking = Some(id);
                effects.push(Effect::Send(Msg {
                    pg,
                    from: me,
                    to: m,
                    epoch,
                    body: Body::HoldsQuery { id },
                }));
            }
        } else {
            // The changes in flight were sent to the members of their time
            // only, and the first write of a region may not be on our copy
            // yet when it is listed: push their regions too (once they are
            // done, as every push waits for the changes overlapping it).
            r.todo = pr
                .ops
                .values()
                .filter(|o| o.push.is_none())
                .flat_map(|o| o.update.extent.regions())
                .collect();
            r.listing = 2;
            let token = *next_token;
            *next_token += 1;
            tokens.insert(
                token,
                Token::ListLocal {
                    pg,
                    disk: me,
                    member: m,
                },
            );
            effects.push(Effect::ListRegions {
                disk: me,
                token,
                pg,
            });
            effects.push(Effect::Send(Msg {
                pg,
                from: me,
                to: m,
                epoch,
                body: Body::LogQuery { full: true },
            }));
        }
        pr.recovering.insert(m, r);
    }
}

/// Stop being primary: every client change in flight or queued is told to
/// retry (at the new primary); so is every read waiting for a repair (its
/// gateway reads again at the new primary, which repairs its own copy if it
/// must); repairs asked by members are dropped (they ask the new primary).
/// The log stays. Returns the regions of the recovery pushes that were in
/// flight (they no longer count against the daemon's limit).
fn step_down<D>(p: &mut Pg<D>, effects: &mut Vec<Effect<D>>, stats: &mut Stats) -> usize {
    let Some(pr) = p.primary.take() else {
        return 0;
    };
    let pushes = pr
        .ops
        .values()
        .filter_map(|o| o.push)
        .map(|(_, e)| e.regions().count())
        .sum();
    if pr.scrub.is_some() {
        stats.scrubs_aborted += 1;
    }
    let origins = pr
        .ops
        .values()
        .filter_map(|o| o.repair)
        .chain(pr.checks.values().map(|c| c.origin))
        .chain(pr.splits.values().map(|s| s.origin))
        .chain(pr.repairs.iter().map(|j| j.origin));
    for o in origins {
        if let RepairOrigin::Client(c)
        | RepairOrigin::Change {
            client: Some(c), ..
        } = o
        {
            effects.push(Effect::Reply {
                client: c,
                result: ClientResult::Retry,
            });
        }
    }
    for op in pr.ops.into_values() {
        if let Some(c) = op.client {
            effects.push(Effect::Reply {
                client: c,
                result: ClientResult::Retry,
            });
        }
    }
    for q in pr.queue {
        effects.push(Effect::Reply {
            client: q.client,
            result: ClientResult::Retry,
        });
    }
    for c in pr.compares.into_values() {
        effects.push(Effect::Reply {
            client: c.client,
            result: ClientResult::Retry,
        });
    }
    pushes
}

fn new_token(tokens: &mut BTreeMap<u64, Token>, next: &mut u64, t: Token) -> u64 {
    let id = *next;
    *next += 1;
    tokens.insert(id, t);
    id
}

/// Answer whoever asked for a repair (a block of a split check counts
/// towards its split, which answers its own origin once every block is
/// done).
fn repair_done<D>(
    pg: u32,
    me: u32,
    epoch: u64,
    pr: &mut Primary<D>,
    mut origin: RepairOrigin,
    mut ok: bool,
    effects: &mut Vec<Effect<D>>,
) {
    while let RepairOrigin::Part(id) = origin {
        let Some(s) = pr.splits.get_mut(&id) else {
            return;
        };
        s.left -= 1;
        s.ok &= ok;
        if s.left > 0 {
            return;
        }
        let s = pr.splits.remove(&id).expect("split");
        (origin, ok) = (s.origin, s.ok);
    }
    match origin {
        RepairOrigin::Client(client) => effects.push(Effect::Reply {
            client,
            result: if ok {
                ClientResult::Ok
            } else {
                ClientResult::Failed
            },
        }),
        RepairOrigin::Member(to, id) => effects.push(Effect::Send(Msg {
            pg,
            from: me,
            to,
            epoch,
            body: Body::Repaired { id, ok },
        })),
        RepairOrigin::Scrub => {
            if let Some(sc) = pr.scrub.as_mut() {
                sc.inflight = sc.inflight.saturating_sub(1);
            }
        }
        RepairOrigin::Change { seq, client } => {
            pr.unsettled.remove(&seq);
            if let Some(client) = client {
                effects.push(Effect::Reply {
                    client,
                    result: if ok {
                        ClientResult::Ok
                    } else {
                        ClientResult::Failed
                    },
                });
            }
        }
        RepairOrigin::Internal | RepairOrigin::Part(_) => {}
    }
}

/// The copies a digest check compares: this one and every up-to-date
/// member of the write set.
fn compared_members(view: &View, me: u32) -> BTreeSet<u32> {
    view.write_set()
        .into_iter()
        .filter(|m| *m == me || view.state(*m) == Some(CopyState::UpToDate))
        .collect()
}

/// Start a check of `extent` that compares the digests of `members` (this
/// copy among them): a scrub's region, or a block of a split check.
#[allow(clippy::too_many_arguments)]
fn digest_check<D>(
    pg: u32,
    me: u32,
    epoch: u64,
    tick: u64,
    members: &BTreeSet<u32>,
    extent: Extent,
    origin: RepairOrigin,
    effects: &mut Vec<Effect<D>>,
    tokens: &mut BTreeMap<u64, Token>,
    next_token: &mut u64,
) -> (u64, Check) {
    let id = *next_token;
    *next_token += 1;
    for m in members.iter().filter(|m| **m != me) {
        effects.push(Effect::Send(Msg {
            pg,
            from: me,
            to: *m,
            epoch,
            body: Body::DigestReq { id, extent },
        }));
    }
    let token = new_token(tokens, next_token, Token::CheckDigest { pg, disk: me, id });
    effects.push(Effect::Digest {
        disk: me,
        token,
        extent,
    });
    let check = Check {
        extent,
        targets: BTreeSet::new(),
        tried: BTreeSet::new(),
        origin,
        stage: Stage::Digest {
            waiting: members.clone(),
            digests: BTreeMap::new(),
        },
        sent_tick: tick,
    };
    (id, check)
}

#[cfg(test)]
impl CompareData for Vec<u64> {
    // The simulations' data: one value per block, zero for never written.
    fn first_difference(expected: &Self, actual: Option<&Self>) -> Option<u32> {
        (0..expected.len())
            .find(|i| expected[*i] != actual.map_or(0, |a| a.get(*i).copied().unwrap_or(0)))
            .map(|i| i as u32)
    }
}
