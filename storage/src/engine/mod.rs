//! The storage engine of one disk: thin-provisioned chunks of 4 KiB blocks,
//! redirect-on-write, a metadata journal and checkpoints (the format and the
//! reasoning are in docs/on-disk-format.md).
//!
//! The engine is a single-threaded state machine over a [`Disk`]: requests
//! and disk completions go in, disk operations and request completions come
//! out. It never blocks except inside `Disk::reap` when asked to wait, and
//! reads no clock and no random source, so the simulated disk drives it
//! deterministically.
//!
//! Invariants:
//! * A block's data is never overwritten in place: every write goes to a
//!   free physical block, so after a crash a block reads back as its old
//!   or its new content, never a mix.
//! * A physical block superseded by a write (or freed by TRIM) returns to
//!   the allocator only after the metadata commit that stops referencing it
//!   is durable, and after every read that might still be reading it.
//! * Metadata pages reference only data that was synced before the pages
//!   were written (data sync, then journal write, then journal sync).
//! * Every mapped block's CRC32C is checked on every read.
//! * Relocating a block (a scattered read rewritten contiguously) changes
//!   where its content lies, never the content, its CRC or the chunk's
//!   version; it takes effect only if the block still maps to what was
//!   read when the copy is written.

pub mod format;

use crate::io::{ALIGN, AlignedBuf, Disk, IoDone, IoKind, IoOp, Payload, Piece, ReadData, Wait};
use bitvec::prelude::*;
use format::*;
use slab::Slab;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::BuildHasherDefault;
use tessera_wire::crc32c;

/// Most requests the engine holds at once (in progress or deferred behind
/// a conflicting write); the daemon applies backpressure above it.
pub const OPS_MAX: usize = 4096;
/// Journal pages of pending metadata records that trigger a commit even
/// without a FLUSH, so superseded blocks are recycled and memory stays
/// bounded: an eighth of the journal, between 16 and 256 pages (2,032 to
/// 32,512 records; the upper bound on any disk of 2 GiB or more). Each
/// commit costs two `fdatasync`s, and a small write waits behind them:
/// with 16 pages (a commit every 8 MiB of 4 KiB writes), fio's p99 for 4k
/// random writes at QD32 was 6.4-8.5 ms against 1.2-1.5 ms with 256
/// (docs/on-disk-format.md, "Cost").
pub const COMMIT_BATCH_PAGES_MIN: usize = 16;
pub const COMMIT_BATCH_PAGES_MAX: usize = 256;
const BLOCK: usize = BLOCK_BYTES;
const ENTRY_NONE: u64 = u64::MAX;
const COMMIT_TOKEN: u64 = 1 << 63;
const SUB_BITS: u32 = 24;
/// A read of at least this many mapped blocks whose runs average fewer
/// than `RELOCATE_RUN_BLOCKS` blocks is rewritten contiguously
/// (`maybe_relocate`): after random 4 KiB writes, redirect-on-write leaves
/// a 128 KiB range in ~30 physical pieces, and sequential reads of it ran
/// at half the speed of the same reads before the writes
/// (docs/on-disk-format.md, "Relocating scattered reads").
/// It also takes at least `RELOCATE_MIN_RUNS` runs: a range split by a
/// few rewritten blocks costs a few extra disk reads, not worth a rewrite.
const RELOCATE_MIN_BLOCKS: usize = 8;
const RELOCATE_RUN_BLOCKS: usize = 8;
const RELOCATE_MIN_RUNS: usize = 4;
/// Blocks being relocated at once (16 MiB of copies in memory): enough to
/// keep up with 128 KiB reads at queue depth 8, bounded for large reads.
const RELOCATE_BLOCKS_MAX: usize = 4096;
/// Relocation takes blocks only while more than this fraction of the data
/// blocks (1/n) is free, so it never competes with client writes for space.
const RELOCATE_FREE_DIVISOR: u64 = 4;

/// Group-log entries the engine keeps in memory (and in its checkpoints)
/// over all groups: past it, the oldest entries of the largest group are
/// forgotten. A forgotten entry costs a returning copy some pushes it
/// could have skipped, never data (docs/replication.md, "Persistent group
/// logs"); the newest entries, the ones a peering needs, are kept.
pub const LOG_KEPT_MAX: usize = 1 << 18;

/// A change's place in a replicated group's log: the engine records it in
/// the same journal commit as the change's mapping switch, so after a
/// crash the log names exactly the changes this disk durably holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogTag {
    pub pg: u32,
    pub term: u64,
    pub n: u64,
    /// The change is a COMPARE AND WRITE's write with this token.
    pub cas: Option<u64>,
}

/// A group's log state on a disk (`Engine::group_log_states`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLogState {
    pub pg: u32,
    /// Entries up to here were forgotten: durable on every member.
    pub trim: (u64, u64),
    /// Entries up to here may be missing.
    pub floor: (u64, u64),
    /// The log holds an entry for every change above both points that
    /// this disk holds.
    pub complete: bool,
}

/// An entry of a group's log: a change this disk durably holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogEntry {
    pub pg: u32,
    pub term: u64,
    pub n: u64,
    pub key: ChunkKey,
    pub offset: u32,
    pub length: u32,
    pub cas: Option<u64>,
}

/// Single-copy COMPARE AND WRITE tokens a disk keeps as written (journalled
/// with the write, in checkpoints, given back at open): a resend after a
/// restart is answered from them instead of comparing against its own
/// write.
pub const CAS_TOKENS_KEPT: usize = 1024;

/// What a write's commit records besides its mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Note {
    None,
    Log(LogTag),
    Cas(u64),
}

/// One group's log in memory: (term, n) -> (chunk, offset, length,
/// COMPARE AND WRITE token).
type GroupLog = BTreeMap<(u64, u64), (ChunkKey, u32, u32, Option<u64>)>;

/// The trim point that makes the engine forget a group's log altogether
/// (the group left this disk).
pub const LOG_FORGET: (u64, u64) = (u64::MAX, u64::MAX);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkKey {
    pub volume_id: u64,
    pub chunk_index: u32,
}

#[derive(Debug)]
pub enum Request {
    Read {
        key: ChunkKey,
        offset: u32,
        length: u32,
    },
    /// `log`: the change is an entry of a group's log (`LogTag`).
    Write {
        key: ChunkKey,
        offset: u32,
        data: Payload,
        fua: bool,
        log: Option<LogTag>,
    },
    WriteZeroes {
        key: ChunkKey,
        offset: u32,
        length: u32,
        fua: bool,
        log: Option<LogTag>,
    },
    Trim {
        key: ChunkKey,
        offset: u32,
        length: u32,
        log: Option<LogTag>,
    },
    /// Write whole 4 KiB blocks to free physical blocks without mapping
    /// them (the copy does not change); answered `Done` once on disk.
    /// `id` (the caller's choice, unique among staged writes held) names it
    /// for `Install` / `Discard`.
    /// Why: a replicated group's primary writes its data at once, in
    /// parallel with its replicas, and makes it part of its copy only when
    /// a replica has the change (docs/replication.md, "Parallel primary
    /// write"); until then a crash loses it without a trace, since nothing
    /// maps the blocks (the free map is rebuilt from the mappings at open).
    Stage {
        key: ChunkKey,
        offset: u32,
        data: Payload,
        id: u64,
    },
    /// Map the blocks of a staged write, as a write completing now would
    /// (new chunk version, journal records; with `fua`, answered once
    /// durable). `Invalid` if no such staged write is held.
    Install {
        stage: u64,
        fua: bool,
        log: Option<LogTag>,
    },
    /// Group `pg`'s log entries up to `(term, n)` are durable on every
    /// member of the group: forget them (`LOG_FORGET`: the whole log).
    /// Journalled with the next commit; answered at once.
    TrimLog { pg: u32, term: u64, n: u64 },
    /// Group `pg`'s log may lack entries up to `(term, n)`; with
    /// `complete`, it holds an entry for every change above that point
    /// (and above its trim point) that this disk holds; without, the
    /// replication layer no longer vouches for that. The point only rises
    /// (the engine's own drops raise it too). Journalled with the next
    /// commit, so before any write asked after it; answered at once.
    LogFloor {
        pg: u32,
        term: u64,
        n: u64,
        complete: bool,
    },
    /// Add entries to group `pg`'s log for changes this disk already holds
    /// durably (written without a `LogTag`: pieces a restarted primary took
    /// back from other copies): `(term, n, chunk, offset, length)`.
    /// Journalled with the next commit; answered at once.
    LogAdd {
        pg: u32,
        entries: Vec<(u64, u64, ChunkKey, u32, u32)>,
    },
    /// Give a staged write's blocks back.
    Discard { stage: u64 },
    /// Claim the blocks of a range as a write in flight would, so no write,
    /// write-zeroes or trim touching them starts until `Release`; answered
    /// `Done` once every earlier such request on them has completed.
    /// Reads go on. `id` (the caller's choice, unique among holds) names
    /// it. Why: a single-copy COMPARE AND WRITE reads, compares and writes
    /// with nothing else changing the range in between.
    Hold {
        key: ChunkKey,
        offset: u32,
        length: u32,
        id: u64,
    },
    /// End hold `id`; with `write`, write that data at the held range in
    /// the same step, before anything that waited for the range (it must
    /// be exactly the held length).
    /// `token`: the write is a COMPARE AND WRITE's with this token, kept
    /// with it (`Engine::cas_tokens`).
    Release {
        id: u64,
        write: Option<(Payload, bool)>,
        token: Option<u64>,
    },
    /// Make every completed write durable.
    Flush,
    /// One bit per 4 KiB block of the range: allocated or not.
    BlockStatus {
        key: ChunkKey,
        offset: u32,
        length: u32,
    },
    /// Free every chunk of a deleted volume.
    DropVolume { volume_id: u64 },
    /// Every chunk holding data, with one bit per 64 KiB region (bit i =
    /// region i holds at least one mapped block): what a full resync of a
    /// replica must compare.
    ListAllocated,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Done,
    Data(ReadData),
    Allocation(Vec<u8>),
    Allocated(Vec<(ChunkKey, u64)>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("disk I/O error (errno {0})")]
    Io(i32),
    #[error("block checksum mismatch")]
    Checksum,
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    #[error("no space left on disk")]
    NoSpace,
    #[error("too many requests in flight")]
    Overloaded,
    #[error("engine stopped after a metadata write failure")]
    Failed,
}

#[derive(Debug)]
pub struct Completion {
    pub tag: u64,
    pub result: Result<Reply, EngineError>,
    /// The chunk's version after the request (0 for requests without a chunk).
    pub chunk_version: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("superblock: {0}")]
    Format(#[from] FormatError),
    #[error("disk I/O error during recovery (errno {0})")]
    Io(i32),
    #[error("no valid checkpoint found: metadata is corrupt")]
    NoCheckpoint,
    #[error("metadata is inconsistent: {0}")]
    Corrupt(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub data_blocks: u64,
    /// Blocks not available for allocation (mapped, or awaiting reuse).
    pub used_blocks: u64,
    pub mapped_blocks: u64,
    pub checksum_errors: u64,
    pub io_errors: u64,
    pub commits: u64,
    pub checkpoints: u64,
    /// Blocks moved by relocation (scattered reads rewritten contiguously).
    pub relocated_blocks: u64,
    /// Group-log entries kept (`LogEntry`).
    pub log_entries: u64,
    /// Mapped blocks per volume.
    pub volumes: BTreeMap<u64, u64>,
}

fn entry(phys: u32, crc: u32) -> u64 {
    (u64::from(phys) << 32) | u64::from(crc)
}
fn entry_phys(e: u64) -> u32 {
    (e >> 32) as u32
}
fn entry_crc(e: u64) -> u32 {
    e as u32
}

struct Chunk {
    version: u64,
    blocks: Box<[u64]>,
    mapped: u32,
}

impl Chunk {
    fn new(blocks: usize) -> Chunk {
        Chunk {
            version: 0,
            blocks: vec![ENTRY_NONE; blocks].into_boxed_slice(),
            mapped: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    Data,
    Zero,
    Trim,
}

struct Run {
    phys: u32,
    /// Index (within the chunk) of the first block of the run.
    first_block: usize,
    crcs: Vec<u32>,
}

struct ReadOp {
    tag: u64,
    key: ChunkKey,
    offset: u32,
    length: u32,
    runs: Vec<Run>,
    /// Each run's buffer once its read completed (same order as `runs`):
    /// the reply is made of slices of them, not of a copy.
    bufs: Vec<Option<AlignedBuf>>,
    pending: usize,
    error: Option<EngineError>,
    read_seq: u64,
    version: u64,
}

/// A completed read's bytes: its runs' buffers in block order, trimmed to
/// the request, with the holes between them as zeroes.
fn read_pieces(op: ReadOp) -> ReadData {
    let (start, end) = (op.offset as usize, (op.offset + op.length) as usize);
    let mut pieces = Vec::with_capacity(2 * op.runs.len() + 1);
    let mut at = start;
    for (run, buf) in op.runs.iter().zip(op.bufs) {
        let buf = buf.expect("every run completed");
        let (rs, re) = (
            run.first_block * BLOCK,
            (run.first_block + run.crcs.len()) * BLOCK,
        );
        let (s, e) = (rs.max(start), re.min(end));
        if s > at {
            pieces.push(Piece::Zeroes(s - at));
        }
        pieces.push(Piece::Disk {
            buf,
            start: s - rs,
            len: e - s,
        });
        at = e;
    }
    if end > at {
        pieces.push(Piece::Zeroes(end - at));
    }
    ReadData::from_pieces(pieces)
}

/// The CRC32C of a block-aligned read's bytes, from the CRCs the mapping
/// keeps (verified against the content by the read itself) and the CRC of
/// a zero block for holes; `None` for reads of partial blocks.
fn payload_crc(op: &ReadOp) -> Option<u32> {
    let (offset, length) = (op.offset as usize, op.length as usize);
    if offset % BLOCK != 0 || length % BLOCK != 0 || length == 0 {
        return None;
    }
    static ZERO_BLOCK_CRC: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let zero = *ZERO_BLOCK_CRC.get_or_init(|| crc32c(&[0u8; BLOCK]));
    let (first, last) = (offset / BLOCK, (offset + length) / BLOCK);
    let mut runs = op.runs.iter().peekable();
    let mut crc: Option<u32> = None;
    for b in first..last {
        while runs
            .peek()
            .is_some_and(|r| r.first_block + r.crcs.len() <= b)
        {
            runs.next();
        }
        let block = match runs.peek() {
            Some(r) if r.first_block <= b => r.crcs[b - r.first_block],
            _ => zero,
        };
        crc = Some(match crc {
            None => block,
            Some(c) => tessera_wire::crc32c_append_4k(c, block),
        });
    }
    crc
}

struct WriteOp {
    tag: u64,
    key: ChunkKey,
    offset: u32,
    length: u32,
    fill: Fill,
    data: Payload,
    fua: bool,
    /// A `Stage` (its id): kept unmapped in `Engine::staged` when done.
    stage: Option<u64>,
    note: Note,
    first: usize,
    last: usize,
    /// Blocks reserved from the allocator for this op.
    reserved: u64,
    pending: usize,
    writing: bool,
    /// Old content of partially written blocks, read for the merge.
    rmw: Vec<(usize, Option<AlignedBuf>, u32)>,
    read_seq: Option<u64>,
    /// New placement of written blocks: (block in chunk, phys, crc).
    placed: Vec<(usize, u32, u32)>,
    unmaps: Vec<usize>,
    error: Option<EngineError>,
}

enum Op {
    Read(ReadOp),
    Write(WriteOp),
    Relocate(RelocateOp),
}

/// A scattered read's blocks being written to one contiguous place.
struct RelocateOp {
    key: ChunkKey,
    /// (block in chunk, its mapping entry when read, new physical block).
    blocks: Vec<(usize, u64, u32)>,
    pending: usize,
    failed: bool,
}

/// A staged write: its blocks are written and marked used, nothing maps
/// them.
struct Staged {
    key: ChunkKey,
    first: usize,
    last: usize,
    /// (block in chunk, phys, crc), as `WriteOp::placed`.
    placed: Vec<(usize, u32, u32)>,
}

struct Waiter {
    needed: u64,
    tag: u64,
    version: u64,
    /// A FUA write keeps its blocks claimed until it is durable, so writes
    /// to the same blocks complete in the order they take effect.
    claims: Option<(ChunkKey, usize, usize)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CommitPhase {
    SyncData,
    WriteMeta,
    SyncMeta,
}

struct Commit {
    phase: CommitPhase,
    pending: usize,
    upto: u64,
    frees: Vec<u32>,
    /// Metadata writes to issue after the data sync: (disk offset, bytes).
    writes: Vec<(u64, AlignedBuf)>,
    /// For a checkpoint: the area written and its header.
    ckpt: Option<(usize, CkptHeader)>,
    journal_pages: u64,
}

pub struct Engine<D: Disk> {
    disk: D,
    sb: Superblock,
    chunks: BTreeMap<ChunkKey, Chunk>,
    used: BitVec,
    free_count: u64,
    cursor: usize,
    ops: Slab<Op>,
    /// Staged writes on disk, not mapped yet, by the id of their `Stage`.
    staged: HashMap<u64, Staged, BuildHasherDefault<FxHasher>>,
    /// Ranges claimed by `Hold`, by id: (chunk, offset, length).
    holds: HashMap<u64, (ChunkKey, u32, u32), BuildHasherDefault<FxHasher>>,
    deferred: VecDeque<(u64, Request)>,
    claims: HashSet<(ChunkKey, usize), BuildHasherDefault<FxHasher>>,
    backlog: VecDeque<IoOp>,
    completions: Vec<Completion>,
    // Metadata state.
    pending_records: Vec<Record>,
    pending_free: Vec<u32>,
    record_seq: u64,
    durable_seq: u64,
    /// Requests waiting for durability: (record seq needed, tag, chunk
    /// version, blocks a FUA write keeps claimed until it completes).
    waiters: Vec<Waiter>,
    commit: Option<Commit>,
    journal_head: u64,
    journal_seq: u64,
    journal_used: u64,
    ckpt_area: usize,
    ckpt_seq: u64,
    quarantine: VecDeque<(u64, Vec<u32>)>,
    reads_inflight: BTreeSet<u64>,
    next_read_seq: u64,
    dropped: BTreeSet<u64>,
    failed: bool,
    stats: Stats,
    done_buf: Vec<IoDone>,
    /// Blocks being relocated, and whether scattered reads are relocated.
    relocating: usize,
    relocate: bool,
    /// Group logs: pg -> (term, n) -> (chunk, offset, length), and each
    /// group's trim point; `log_len` counts the entries of all groups.
    logs: BTreeMap<u32, GroupLog>,
    log_trims: BTreeMap<u32, (u64, u64)>,
    /// Per group: the point up to which its log may lack entries (the
    /// engine's drops, `Request::LogFloor`) and whether the replication
    /// layer vouches that it holds every change above it.
    log_floors: BTreeMap<u32, ((u64, u64), bool)>,
    log_len: usize,
    /// During replay: the `LogExtent` waiting for its `LogSeq`, and the
    /// entry a `LogCas` belongs to.
    log_half: Option<(u32, ChunkKey, u32, u32)>,
    log_last: Option<(u32, (u64, u64))>,
    /// Single-copy COMPARE AND WRITE tokens written (`cas_tokens`).
    cas_tokens: VecDeque<u64>,
}

impl<D: Disk> Engine<D> {
    /// Format a blank disk and open it.
    pub fn format(
        mut disk: D,
        cluster_id: &str,
        chunk_bytes: u64,
        disk_uuid: [u8; 16],
        format_id: u64,
    ) -> Result<Engine<D>, OpenError> {
        let sb = Superblock::layout(
            disk.size_bytes(),
            chunk_bytes,
            cluster_id,
            disk_uuid,
            format_id,
        )?;
        let mut head = AlignedBuf::zeroed(2 * BLOCK);
        let enc = sb.encode();
        head[..BLOCK].copy_from_slice(&enc);
        head[BLOCK..].copy_from_slice(&enc);
        sync_io(&mut disk, IoKind::Write, 0, Some(head))?;
        let mut h = AlignedBuf::zeroed(BLOCK);
        CkptHeader {
            ckpt_seq: 1,
            journal_pos: 0,
            journal_seq: 1,
            pages: 0,
            pages_crc: crc32c(&[]),
        }
        .encode(sb.format_id, &mut h);
        sync_io(
            &mut disk,
            IoKind::Write,
            sb.ckpt_start[0] * BLOCK as u64,
            Some(h),
        )?;
        // The other area's header is cleared so no stale checkpoint of an
        // earlier life of the device competes (format_id also guards).
        sync_io(
            &mut disk,
            IoKind::Write,
            sb.ckpt_start[1] * BLOCK as u64,
            Some(AlignedBuf::zeroed(BLOCK)),
        )?;
        sync_io(&mut disk, IoKind::Sync, 0, None)?;
        Engine::open(disk)
    }

    /// Read the superblock only: whether the disk is blank, ours, or
    /// something else.
    pub fn probe(disk: &mut D) -> Result<Superblock, OpenError> {
        let buf = sync_io(disk, IoKind::Read, 0, Some(AlignedBuf::zeroed(2 * BLOCK)))?;
        let a = Superblock::decode(&buf[..BLOCK]);
        let b = Superblock::decode(&buf[BLOCK..]);
        match (a, b) {
            (Ok(s), _) | (Err(_), Ok(s)) => Ok(s),
            (Err(e), Err(_)) => Err(e.into()),
        }
    }

    /// Open a formatted disk, recovering its metadata: the newest valid
    /// checkpoint, then every valid journal page after it.
    pub fn open(mut disk: D) -> Result<Engine<D>, OpenError> {
        let mut sb = Engine::probe(&mut disk)?;
        if sb.version < FORMAT_VERSION {
            // Mark the disk with the version whose records this process
            // may write, before it writes any (format.rs, FORMAT_VERSION).
            let mut head = AlignedBuf::zeroed(2 * BLOCK);
            let enc = sb.encode();
            head[..BLOCK].copy_from_slice(&enc);
            head[BLOCK..].copy_from_slice(&enc);
            sync_io(&mut disk, IoKind::Write, 0, Some(head))?;
            sync_io(&mut disk, IoKind::Sync, 0, None)?;
            sb.version = FORMAT_VERSION;
        }
        let mut best: Option<(usize, CkptHeader, AlignedBuf)> = None;
        for area in 0..2 {
            let off = sb.ckpt_start[area] * BLOCK as u64;
            let hb = sync_io(
                &mut disk,
                IoKind::Read,
                off,
                Some(AlignedBuf::zeroed(BLOCK)),
            )?;
            let Some(h) = CkptHeader::decode(sb.format_id, &hb) else {
                continue;
            };
            if h.pages + 1 > sb.ckpt_blocks || h.journal_pos >= sb.journal_blocks {
                continue;
            }
            let pages = if h.pages == 0 {
                AlignedBuf::zeroed(BLOCK)
            } else {
                sync_io(
                    &mut disk,
                    IoKind::Read,
                    off + BLOCK as u64,
                    Some(AlignedBuf::zeroed(h.pages as usize * BLOCK)),
                )?
            };
            let body = if h.pages == 0 { &[][..] } else { &pages[..] };
            if crc32c(body) != h.pages_crc {
                continue;
            }
            if best
                .as_ref()
                .is_none_or(|(_, b, _)| h.ckpt_seq > b.ckpt_seq)
            {
                best = Some((area, h, pages));
            }
        }
        let (area, header, pages) = best.ok_or(OpenError::NoCheckpoint)?;
        let blocks_per_chunk = sb.blocks_per_chunk();
        let mut e = Engine {
            used: bitvec![0; sb.data_blocks as usize],
            free_count: 0,
            cursor: 0,
            ops: Slab::with_capacity(OPS_MAX),
            staged: HashMap::default(),
            holds: HashMap::default(),
            deferred: VecDeque::new(),
            claims: HashSet::default(),
            backlog: VecDeque::new(),
            completions: Vec::new(),
            pending_records: Vec::new(),
            pending_free: Vec::new(),
            record_seq: 0,
            durable_seq: 0,
            waiters: Vec::new(),
            commit: None,
            journal_head: header.journal_pos,
            journal_seq: header.journal_seq,
            journal_used: 0,
            ckpt_area: area,
            ckpt_seq: header.ckpt_seq,
            quarantine: VecDeque::new(),
            reads_inflight: BTreeSet::new(),
            next_read_seq: 1,
            dropped: BTreeSet::new(),
            failed: false,
            stats: Stats::default(),
            done_buf: Vec::new(),
            relocating: 0,
            relocate: true,
            logs: BTreeMap::new(),
            log_trims: BTreeMap::new(),
            log_floors: BTreeMap::new(),
            log_len: 0,
            log_half: None,
            log_last: None,
            cas_tokens: VecDeque::new(),
            chunks: BTreeMap::new(),
            sb,
            disk,
        };
        for p in 0..header.pages as usize {
            let page = decode_page(
                PAGE_MAGIC_CKPT,
                e.sb.format_id,
                &pages[p * BLOCK..(p + 1) * BLOCK],
            )
            .ok_or_else(|| OpenError::Corrupt(format!("checkpoint page {p}")))?;
            if page.seq != p as u64 {
                return Err(OpenError::Corrupt(format!(
                    "checkpoint page {p} out of order"
                )));
            }
            for r in page.records {
                e.replay(r, blocks_per_chunk)?;
            }
        }
        // Journal: read it whole, then follow the sequence from the
        // checkpoint's position until the first page that is not the next.
        let jbytes = e.sb.journal_blocks as usize * BLOCK;
        let mut journal = AlignedBuf::zeroed(jbytes);
        let step = 1 << 20;
        let mut done = 0;
        while done < jbytes {
            let n = step.min(jbytes - done);
            let part = sync_io(
                &mut e.disk,
                IoKind::Read,
                e.sb.journal_start * BLOCK as u64 + done as u64,
                Some(AlignedBuf::zeroed(n)),
            )?;
            journal[done..done + n].copy_from_slice(&part);
            done += n;
        }
        // A batch (one commit's pages) is replayed only if every page of it
        // is valid: a commit whose pages did not all land was never
        // acknowledged.
        let jblocks = e.sb.journal_blocks;
        let page_at = |pos: u64| {
            let pos = (pos % jblocks) as usize;
            decode_page(
                PAGE_MAGIC_JOURNAL,
                e.sb.format_id,
                &journal[pos * BLOCK..(pos + 1) * BLOCK],
            )
        };
        let mut batches = Vec::new();
        let (mut head, mut seq, mut used) = (e.journal_head, e.journal_seq, 0u64);
        'replay: while let Some(first) = page_at(head) {
            if first.seq != seq || first.batch.index != 0 {
                break;
            }
            let n = u64::from(first.batch.len);
            if used + n > jblocks {
                break;
            }
            let mut pages = vec![first];
            for i in 1..n {
                match page_at(head + i) {
                    Some(p)
                        if p.seq == seq + i
                            && p.batch.index as u64 == i
                            && p.batch.len == pages[0].batch.len =>
                    {
                        pages.push(p)
                    }
                    _ => break 'replay,
                }
            }
            batches.push(pages);
            head = (head + n) % jblocks;
            seq += n;
            used += n;
        }
        for pages in batches {
            for p in pages {
                for r in p.records {
                    e.replay(r, blocks_per_chunk)?;
                }
            }
        }
        e.journal_head = head;
        e.journal_seq = seq;
        e.journal_used = used;
        e.log_half = None;
        e.log_last = None;
        e.bound_logs(LOG_KEPT_MAX);
        e.rebuild_allocator()?;
        Ok(e)
    }

    fn replay(&mut self, r: Record, blocks_per_chunk: usize) -> Result<(), OpenError> {
        match r {
            Record::Map {
                volume_id,
                chunk_index,
                block,
                phys,
                crc,
                version,
            } => {
                if usize::from(block) >= blocks_per_chunk || u64::from(phys) >= self.sb.data_blocks
                {
                    return Err(OpenError::Corrupt(format!(
                        "record maps block {block} to physical block {phys}"
                    )));
                }
                let c = self
                    .chunks
                    .entry(ChunkKey {
                        volume_id,
                        chunk_index,
                    })
                    .or_insert_with(|| Chunk::new(blocks_per_chunk));
                c.blocks[usize::from(block)] = entry(phys, crc);
                c.version = c.version.max(version);
            }
            Record::Unmap {
                volume_id,
                chunk_index,
                block,
                version,
            } => {
                if usize::from(block) >= blocks_per_chunk {
                    return Err(OpenError::Corrupt(format!("record unmaps block {block}")));
                }
                if let Some(c) = self.chunks.get_mut(&ChunkKey {
                    volume_id,
                    chunk_index,
                }) {
                    c.blocks[usize::from(block)] = ENTRY_NONE;
                    c.version = c.version.max(version);
                }
            }
            Record::DropVolume { volume_id } => {
                self.chunks.retain(|k, _| k.volume_id != volume_id);
            }
            Record::LogExtent {
                pg,
                volume_id,
                chunk_index,
                offset,
                length,
            } => {
                let key = ChunkKey {
                    volume_id,
                    chunk_index,
                };
                self.log_half = Some((pg, key, offset, length));
            }
            Record::LogSeq { term, n } => {
                let Some((pg, key, offset, length)) = self.log_half.take() else {
                    // Only ever written right after its extent.
                    return Err(OpenError::Corrupt("log sequence without its extent".into()));
                };
                let chunk = self.sb.chunk_bytes;
                if u64::from(offset) + u64::from(length) > chunk || length == 0 {
                    return Err(OpenError::Corrupt(format!(
                        "log entry of group {pg} outside its chunk ({offset}+{length})"
                    )));
                }
                self.log_last = None;
                if self.log_trims.get(&pg).is_none_or(|t| (term, n) > *t) {
                    self.keep_log_entry(pg, (term, n), (key, offset, length, None));
                    self.log_last = Some((pg, (term, n)));
                }
            }
            Record::LogCas { token } => {
                // Right after its entry's `LogSeq` (an entry trimmed
                // meanwhile is not kept, nor its token).
                if let Some((pg, seq)) = self.log_last.take()
                    && let Some(e) = self.logs.get_mut(&pg).and_then(|l| l.get_mut(&seq))
                {
                    e.3 = Some(token);
                }
            }
            Record::CasDone { token } => self.keep_cas_token(token),
            Record::LogTrim { pg, term, n } => self.apply_log_trim(pg, (term, n)),
            Record::LogFloor {
                pg,
                term,
                n,
                complete,
            } => {
                self.set_log_floor(pg, (term, n), complete);
            }
        }
        Ok(())
    }

    fn rebuild_allocator(&mut self) -> Result<(), OpenError> {
        self.stats.volumes.clear();
        self.stats.mapped_blocks = 0;
        for (k, c) in self.chunks.iter_mut() {
            c.mapped = 0;
            for &e in c.blocks.iter() {
                if e == ENTRY_NONE {
                    continue;
                }
                let p = entry_phys(e) as usize;
                if self.used[p] {
                    return Err(OpenError::Corrupt(format!(
                        "physical block {p} is mapped twice"
                    )));
                }
                self.used.set(p, true);
                c.mapped += 1;
            }
            *self.stats.volumes.entry(k.volume_id).or_default() += u64::from(c.mapped);
            self.stats.mapped_blocks += u64::from(c.mapped);
        }
        self.chunks.retain(|_, c| c.mapped > 0);
        self.stats.volumes.retain(|_, n| *n > 0);
        self.free_count = self.sb.data_blocks - self.stats.mapped_blocks;
        self.stats.data_blocks = self.sb.data_blocks;
        Ok(())
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.used_blocks = self.sb.data_blocks - self.free_count;
        s.log_entries = self.log_len as u64;
        s
    }

    /// Current version of a chunk (0 if it holds nothing).
    pub fn chunk_version(&self, key: ChunkKey) -> u64 {
        self.chunks.get(&key).map_or(0, |c| c.version)
    }

    /// Whether scattered reads are rewritten contiguously (on by default).
    pub fn set_relocation(&mut self, on: bool) {
        self.relocate = on;
    }

    /// Requests accepted and not yet completed.
    pub fn ops_inflight(&self) -> usize {
        self.ops.len() + self.deferred.len() + self.waiters.len()
    }

    /// Whether anything is in progress (requests, commits or disk I/O).
    pub fn busy(&self) -> bool {
        !self.ops.is_empty()
            || !self.deferred.is_empty()
            || !self.waiters.is_empty()
            || self.commit.is_some()
            || self.disk.inflight() > 0
            || !self.backlog.is_empty()
    }

    pub fn take_completions(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.completions);
    }

    fn complete(&mut self, tag: u64, result: Result<Reply, EngineError>, chunk_version: u64) {
        self.completions.push(Completion {
            tag,
            result,
            chunk_version,
        });
    }

    // ---- request intake -------------------------------------------------

    pub fn submit(&mut self, tag: u64, req: Request) {
        // Ending a hold is never refused (not for overload, not on a failed
        // engine): a hold left behind would stall every write to its
        // blocks for good.
        let req = match req {
            Request::Release { id, write, token } => return self.release(tag, id, write, token),
            r => r,
        };
        if self.failed {
            self.complete(tag, Err(EngineError::Failed), 0);
            return;
        }
        if self.ops_inflight() >= OPS_MAX {
            self.complete(tag, Err(EngineError::Overloaded), 0);
            return;
        }
        if let Err(e) = self.validate(&req) {
            self.complete(tag, Err(e), 0);
            return;
        }
        self.start(tag, req);
    }

    fn validate(&self, req: &Request) -> Result<(), EngineError> {
        let range = match req {
            Request::Read { offset, length, .. }
            | Request::WriteZeroes { offset, length, .. }
            | Request::Trim { offset, length, .. }
            | Request::BlockStatus { offset, length, .. } => Some((*offset, *length)),
            Request::Hold {
                offset, length, id, ..
            } => {
                if self.holds.contains_key(id) {
                    return Err(EngineError::Invalid("hold id in use"));
                }
                Some((*offset, *length))
            }
            Request::Write { offset, data, .. } => {
                let len =
                    u32::try_from(data.len()).map_err(|_| EngineError::Invalid("too long"))?;
                Some((*offset, len))
            }
            Request::Stage {
                offset, data, id, ..
            } => {
                if self.staged.contains_key(id) {
                    return Err(EngineError::Invalid("staged write id in use"));
                }
                let len =
                    u32::try_from(data.len()).map_err(|_| EngineError::Invalid("too long"))?;
                if !offset.is_multiple_of(BLOCK as u32) || !len.is_multiple_of(BLOCK as u32) {
                    return Err(EngineError::Invalid("a staged write is whole blocks"));
                }
                Some((*offset, len))
            }
            Request::Flush
            | Request::DropVolume { .. }
            | Request::ListAllocated
            | Request::Install { .. }
            | Request::TrimLog { .. }
            | Request::LogFloor { .. }
            | Request::LogAdd { .. }
            | Request::Discard { .. }
            | Request::Release { .. } => None,
        };
        if let Some((offset, length)) = range {
            if length == 0 {
                return Err(EngineError::Invalid("zero length"));
            }
            if offset % 512 != 0 || length % 512 != 0 {
                return Err(EngineError::Invalid("not 512-byte aligned"));
            }
            if u64::from(offset) + u64::from(length) > self.sb.chunk_bytes {
                return Err(EngineError::Invalid("range beyond the chunk"));
            }
        }
        Ok(())
    }

    fn start(&mut self, tag: u64, req: Request) {
        match req {
            Request::Read {
                key,
                offset,
                length,
            } => self.start_read(tag, key, offset, length),
            Request::Write {
                key,
                offset,
                data,
                fua,
                log,
            } => {
                let length = data.len() as u32;
                let note = log.map_or(Note::None, Note::Log);
                self.start_write(tag, key, offset, length, Fill::Data, data, fua, None, note)
            }
            Request::Stage {
                key,
                offset,
                data,
                id,
            } => {
                let length = data.len() as u32;
                self.start_write(
                    tag,
                    key,
                    offset,
                    length,
                    Fill::Data,
                    data,
                    false,
                    Some(id),
                    Note::None,
                )
            }
            Request::Install { stage, fua, log } => self.install(tag, stage, fua, log),
            Request::TrimLog { pg, term, n } => {
                self.trim_log(pg, (term, n));
                self.complete(tag, Ok(Reply::Done), 0);
            }
            Request::LogAdd { pg, entries } => {
                for (term, n, key, offset, length) in entries {
                    let chunk = self.sb.chunk_bytes;
                    if length == 0 || u64::from(offset) + u64::from(length) > chunk {
                        continue;
                    }
                    let t = LogTag {
                        pg,
                        term,
                        n,
                        cas: None,
                    };
                    self.log_change(t, key, offset, length);
                }
                self.complete(tag, Ok(Reply::Done), 0);
            }
            Request::LogFloor {
                pg,
                term,
                n,
                complete,
            } => {
                let ((term, n), complete) = self.set_log_floor(pg, (term, n), complete);
                self.push_record(Record::LogFloor {
                    pg,
                    term,
                    n,
                    complete,
                });
                self.complete(tag, Ok(Reply::Done), 0);
            }
            Request::Discard { stage } => {
                if let Some(st) = self.staged.remove(&stage) {
                    self.free_staged(&st);
                }
                self.complete(tag, Ok(Reply::Done), 0);
            }
            Request::Hold {
                key,
                offset,
                length,
                id,
            } => {
                if held_blocks(offset, length).any(|b| self.claims.contains(&(key, b))) {
                    self.deferred.push_back((
                        tag,
                        Request::Hold {
                            key,
                            offset,
                            length,
                            id,
                        },
                    ));
                    return;
                }
                for b in held_blocks(offset, length) {
                    self.claims.insert((key, b));
                }
                self.holds.insert(id, (key, offset, length));
                self.complete(tag, Ok(Reply::Done), 0);
            }
            Request::Release { id, write, token } => self.release(tag, id, write, token),
            Request::WriteZeroes {
                key,
                offset,
                length,
                fua,
                log,
            } => self.start_write(
                tag,
                key,
                offset,
                length,
                Fill::Zero,
                Payload::default(),
                fua,
                None,
                log.map_or(Note::None, Note::Log),
            ),
            Request::Trim {
                key,
                offset,
                length,
                log,
            } => self.start_write(
                tag,
                key,
                offset,
                length,
                Fill::Trim,
                Payload::default(),
                false,
                None,
                log.map_or(Note::None, Note::Log),
            ),
            Request::Flush => self.when_durable(tag, 0, None),
            Request::BlockStatus {
                key,
                offset,
                length,
            } => {
                let first = offset as usize / BLOCK;
                let last = (offset + length - 1) as usize / BLOCK;
                let mut bits = vec![0u8; (last - first + 1).div_ceil(8)];
                let mut version = 0;
                if let Some(c) = self.chunks.get(&key) {
                    version = c.version;
                    for b in first..=last {
                        if c.blocks[b] != ENTRY_NONE {
                            let i = b - first;
                            bits[i / 8] |= 1 << (i % 8);
                        }
                    }
                }
                self.complete(tag, Ok(Reply::Allocation(bits)), version);
            }
            Request::DropVolume { volume_id } => {
                self.drop_volume(volume_id);
                self.complete(tag, Ok(Reply::Done), 0);
            }
            Request::ListAllocated => {
                // 64 KiB regions of 4 KiB blocks; a u64 covers a 4 MiB chunk.
                const BLOCKS_PER_REGION: usize = 16;
                let list = self
                    .chunks
                    .iter()
                    .filter(|(k, c)| c.mapped > 0 && !self.dropped.contains(&k.volume_id))
                    .map(|(k, c)| {
                        let mut mask = 0u64;
                        for (i, b) in c.blocks.iter().enumerate() {
                            if *b != ENTRY_NONE {
                                mask |= 1 << (i / BLOCKS_PER_REGION).min(63);
                            }
                        }
                        (*k, mask)
                    })
                    .collect();
                self.complete(tag, Ok(Reply::Allocated(list)), 0);
            }
        }
    }

    fn drop_volume(&mut self, volume_id: u64) {
        self.dropped.insert(volume_id);
        let keys: Vec<ChunkKey> = self
            .chunks
            .range(
                ChunkKey {
                    volume_id,
                    chunk_index: 0,
                }..=ChunkKey {
                    volume_id,
                    chunk_index: u32::MAX,
                },
            )
            .map(|(k, _)| *k)
            .collect();
        if keys.is_empty() {
            return;
        }
        for k in keys {
            let c = self.chunks.remove(&k).expect("chunk listed");
            for &e in c.blocks.iter() {
                if e != ENTRY_NONE {
                    self.pending_free.push(entry_phys(e));
                }
            }
            self.stats.mapped_blocks -= u64::from(c.mapped);
        }
        self.stats.volumes.remove(&volume_id);
        self.push_record(Record::DropVolume { volume_id });
        self.maybe_commit();
    }

    fn start_read(&mut self, tag: u64, key: ChunkKey, offset: u32, length: u32) {
        let mut op = ReadOp {
            tag,
            key,
            offset,
            length,
            runs: Vec::new(),
            bufs: Vec::new(),
            pending: 0,
            error: None,
            read_seq: 0,
            version: 0,
        };
        if let Some(c) = self.chunks.get(&key) {
            op.version = c.version;
            let first = offset as usize / BLOCK;
            let last = (offset + length - 1) as usize / BLOCK;
            for b in first..=last {
                let e = c.blocks[b];
                if e == ENTRY_NONE {
                    continue;
                }
                let (p, crc) = (entry_phys(e), entry_crc(e));
                match op.runs.last_mut() {
                    Some(r)
                        if r.first_block + r.crcs.len() == b
                            && r.phys as usize + r.crcs.len() == p as usize =>
                    {
                        r.crcs.push(crc)
                    }
                    _ => op.runs.push(Run {
                        phys: p,
                        first_block: b,
                        crcs: vec![crc],
                    }),
                }
            }
        }
        if op.runs.is_empty() {
            // Never written: zeroes, without touching the disk.
            let zeroes = ReadData::zeroes(length as usize);
            self.complete(tag, Ok(Reply::Data(zeroes)), op.version);
            return;
        }
        op.bufs = op.runs.iter().map(|_| None).collect();
        op.read_seq = self.begin_read();
        op.pending = op.runs.len();
        let reads: Vec<(u64, usize)> = op
            .runs
            .iter()
            .map(|r| (self.phys_offset(r.phys), r.crcs.len()))
            .collect();
        let id = self.ops.insert(Op::Read(op));
        for (sub, (off, n)) in reads.into_iter().enumerate() {
            self.issue(IoOp {
                token: op_token(id, sub),
                kind: IoKind::Read,
                offset: off,
                buf: Some(self.disk.read_buffer(n * BLOCK)),
            });
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_write(
        &mut self,
        tag: u64,
        key: ChunkKey,
        offset: u32,
        length: u32,
        fill: Fill,
        data: Payload,
        fua: bool,
        stage: Option<u64>,
        note: Note,
    ) {
        let first = offset as usize / BLOCK;
        // What a deferred request is rebuilt with. A `Cas` note comes only
        // from `release`, which takes its write back out of `deferred` and
        // defers the whole `Release` (token included) instead.
        let log = match note {
            Note::Log(t) => Some(t),
            _ => None,
        };
        let last = (offset + length - 1) as usize / BLOCK;
        let req = || match fill {
            Fill::Data if stage.is_some() => Request::Stage {
                key,
                offset,
                data: data.clone(),
                id: stage.expect("staged"),
            },
            Fill::Data => Request::Write {
                key,
                offset,
                data: data.clone(),
                fua,
                log,
            },
            Fill::Zero => Request::WriteZeroes {
                key,
                offset,
                length,
                fua,
                log,
            },
            Fill::Trim => Request::Trim {
                key,
                offset,
                length,
                log,
            },
        };
        // Writes touching a block another write is changing wait for it:
        // a partial-block write reads, merges and rewrites the whole block.
        if (first..=last).any(|b| self.claims.contains(&(key, b))) {
            self.deferred.push_back((tag, req()));
            return;
        }
        let reserve = if fill == Fill::Data {
            (last - first + 1) as u64
        } else {
            // Zeroing rewrites at most the two partial edge blocks.
            2.min((last - first + 1) as u64)
        };
        if self.free_count < reserve {
            if self.commit.is_some() || !self.pending_free.is_empty() || !self.quarantine.is_empty()
            {
                // Space is on its way back; wait for the commit.
                self.deferred.push_back((tag, req()));
                self.maybe_commit();
            } else {
                self.complete(tag, Err(EngineError::NoSpace), 0);
            }
            return;
        }
        self.free_count -= reserve;
        for b in first..=last {
            self.claims.insert((key, b));
        }
        let end = offset as usize + length as usize;
        let mut rmw = Vec::new();
        let chunk = self.chunks.get(&key);
        for b in [first, last] {
            if rmw
                .iter()
                .any(|(x, _, _): &(usize, Option<AlignedBuf>, u32)| *x == b)
            {
                continue;
            }
            let full = offset as usize <= b * BLOCK && end >= (b + 1) * BLOCK;
            if full || fill == Fill::Trim {
                continue;
            }
            let e = chunk.map_or(ENTRY_NONE, |c| c.blocks[b]);
            rmw.push((b, None, if e == ENTRY_NONE { 0 } else { entry_crc(e) }));
        }
        let mut op = WriteOp {
            tag,
            key,
            offset,
            length,
            fill,
            data,
            fua,
            stage,
            note,
            first,
            last,
            reserved: reserve,
            pending: 0,
            writing: false,
            rmw: Vec::new(),
            read_seq: None,
            placed: Vec::new(),
            unmaps: Vec::new(),
            error: None,
        };
        let mut reads = Vec::new();
        for (b, _, crc) in rmw {
            let e = chunk.map_or(ENTRY_NONE, |c| c.blocks[b]);
            if e != ENTRY_NONE {
                reads.push((op.rmw.len(), self.phys_offset(entry_phys(e))));
            }
            op.rmw.push((b, None, crc));
        }
        if !reads.is_empty() {
            op.read_seq = Some(self.begin_read());
        }
        op.pending = reads.len();
        let id = self.ops.insert(Op::Write(op));
        if reads.is_empty() {
            self.write_phase(id);
        } else {
            for (sub, off) in reads {
                self.issue(IoOp {
                    token: op_token(id, sub),
                    kind: IoKind::Read,
                    offset: off,
                    buf: Some(AlignedBuf::zeroed(BLOCK)),
                });
            }
        }
    }

    /// Build the new content of every block the write changes, place it on
    /// free physical blocks and issue the writes.
    fn write_phase(&mut self, id: usize) {
        let Op::Write(op) = &mut self.ops[id] else {
            unreachable!("write op");
        };
        op.writing = true;
        if let Some(seq) = op.read_seq.take() {
            self.reads_inflight.remove(&seq);
        }
        if op.error.is_some() {
            self.finish_write(id);
            return;
        }
        let start = op.offset as usize;
        let end = start + op.length as usize;
        // Each changed block's new content: a slice of the client's data for
        // whole blocks (copied once, straight into the write buffer), or a
        // merged 4 KiB block for partial edges and zeroed ranges.
        enum Content {
            Data(usize),
            Merged(AlignedBuf),
        }
        let mut contents: Vec<(usize, Content)> = Vec::new();
        for b in op.first..=op.last {
            let (bs, be) = (b * BLOCK, (b + 1) * BLOCK);
            let full = start <= bs && end >= be;
            match op.fill {
                Fill::Trim | Fill::Zero if full => op.unmaps.push(b),
                Fill::Trim => {}
                Fill::Data if full => contents.push((b, Content::Data(bs - start))),
                Fill::Zero | Fill::Data => {
                    let base = op.rmw.iter_mut().find(|(x, _, _)| *x == b);
                    let mut block = match base {
                        Some((_, Some(buf), _)) => {
                            std::mem::replace(buf, AlignedBuf::zeroed(BLOCK))
                        }
                        Some((_, None, _)) if op.fill == Fill::Zero => continue, // unmapped: already zero
                        _ => AlignedBuf::zeroed(BLOCK),
                    };
                    let (s, e) = (start.max(bs), end.min(be));
                    if op.fill == Fill::Data {
                        block[s - bs..e - bs].copy_from_slice(&op.data[s - start..e - start]);
                    } else {
                        block[s - bs..e - bs].fill(0);
                    }
                    contents.push((b, Content::Merged(block)));
                }
            }
        }
        op.rmw.clear();
        // Place blocks in as few contiguous physical runs as possible.
        let n = contents.len() as u64;
        assert!(n <= op.reserved);
        let runs = alloc_runs(&mut self.used, &mut self.cursor, n as usize);
        let unused = op.reserved - n;
        self.free_count += unused;
        op.reserved = n;
        let mut writes = Vec::new();
        let mut it = contents.iter();
        for (phys, len) in runs {
            let run: Vec<&(usize, Content)> = it.by_ref().take(len).collect();
            assert_eq!(run.len(), len, "one content per placed block");
            // A run of whole blocks that lie one after another, aligned, in
            // the client's data is written straight from it (no copy).
            let view = match run[0].1 {
                Content::Data(at0)
                    if run.iter().enumerate().all(
                        |(i, (_, c))| matches!(c, Content::Data(at) if *at == at0 + i * BLOCK),
                    ) =>
                {
                    op.data.view(at0, len * BLOCK)
                }
                _ => None,
            };
            let mut parts: Vec<&[u8]> = Vec::with_capacity(len);
            for (i, (b, content)) in run.iter().enumerate() {
                let (bytes, crc): (&[u8], u32) = match content {
                    Content::Data(at) => (&op.data[*at..*at + BLOCK], op.data.block_crc(*at)),
                    Content::Merged(buf) => (buf, crc32c(buf)),
                };
                op.placed.push((*b, phys + i as u32, crc));
                parts.push(bytes);
            }
            let buf = view.unwrap_or_else(|| AlignedBuf::from_parts(&parts));
            writes.push((u64::from(phys), buf));
        }
        drop(contents);
        op.data = Payload::default();
        op.pending = writes.len();
        if writes.is_empty() {
            self.finish_write(id);
            return;
        }
        let data_start = self.sb.data_start;
        for (sub, (phys, buf)) in writes.into_iter().enumerate() {
            self.issue(IoOp {
                token: op_token(id, sub),
                kind: IoKind::Write,
                offset: (data_start + phys) * BLOCK as u64,
                buf: Some(buf),
            });
        }
    }

    /// All I/O of a write is done: publish the new mapping (or give the
    /// blocks back on error), release claims, reply.
    fn finish_write(&mut self, id: usize) {
        let Op::Write(op) = self.ops.remove(id) else {
            unreachable!("write op");
        };
        let keep_claims = op.fua && op.error.is_none();
        if !keep_claims {
            for b in op.first..=op.last {
                self.claims.remove(&(op.key, b));
            }
        }
        let mut version = self.chunk_version(op.key);
        let dropped = self.dropped.contains(&op.key.volume_id);
        if op.error.is_some() || dropped {
            // Never referenced by any record: free at once.
            for &(_, p, _) in &op.placed {
                self.used.set(p as usize, false);
            }
            self.free_count += op.placed.len() as u64;
        } else if let Some(id) = op.stage {
            // On disk, mapped only by `Install`.
            self.staged.insert(
                id,
                Staged {
                    key: op.key,
                    first: op.first,
                    last: op.last,
                    placed: op.placed,
                },
            );
            self.complete(op.tag, Ok(Reply::Done), version);
            self.maybe_commit();
            self.retry_deferred();
            return;
        } else {
            if let Some(v) = self.publish(op.key, &op.placed, &op.unmaps) {
                version = v;
            }
            match op.note {
                Note::Log(t) => self.log_change(t, op.key, op.offset, op.length),
                Note::Cas(token) => self.cas_written(token),
                Note::None => {}
            }
        }
        match op.error {
            Some(e) => self.complete(op.tag, Err(e), version),
            None if op.fua => self.when_durable(op.tag, version, Some((op.key, op.first, op.last))),
            None => self.complete(op.tag, Ok(Reply::Done), version),
        }
        self.maybe_commit();
        self.retry_deferred();
    }

    /// Map a staged write's blocks (`Request::Install`).
    fn install(&mut self, tag: u64, stage: u64, fua: bool, log: Option<LogTag>) {
        let Some(st) = self.staged.get(&stage) else {
            self.complete(tag, Err(EngineError::Invalid("no such staged write")), 0);
            return;
        };
        // A FUA write of the same blocks still waiting to be durable keeps
        // them claimed: install after it, in the order they take effect.
        if (st.first..=st.last).any(|b| self.claims.contains(&(st.key, b))) {
            self.deferred
                .push_back((tag, Request::Install { stage, fua, log }));
            return;
        }
        let st = self.staged.remove(&stage).expect("staged");
        if self.dropped.contains(&st.key.volume_id) {
            self.free_staged(&st);
            self.complete(tag, Ok(Reply::Done), 0);
            return;
        }
        let version = self
            .publish(st.key, &st.placed, &[])
            .unwrap_or_else(|| self.chunk_version(st.key));
        if let Some(t) = log {
            let (first, last) = (st.first as u32, st.last as u32);
            let length = (last - first + 1) * BLOCK as u32;
            self.log_change(t, st.key, first * BLOCK as u32, length);
        }
        if fua {
            for b in st.first..=st.last {
                self.claims.insert((st.key, b));
            }
            self.when_durable(tag, version, Some((st.key, st.first, st.last)));
        } else {
            self.complete(tag, Ok(Reply::Done), version);
        }
        self.maybe_commit();
        self.retry_deferred();
    }

    /// Give back the blocks of a staged write nothing maps (no read can be
    /// reading them: free at once).
    fn free_staged(&mut self, st: &Staged) {
        for &(_, p, _) in &st.placed {
            self.used.set(p as usize, false);
        }
        self.free_count += st.placed.len() as u64;
    }

    /// Switch the mapping of `key`'s blocks to their new placement and
    /// unmap `unmaps`: new chunk version, journal records, the replaced
    /// blocks freed once no read can use them. Returns the new version, or
    /// None when nothing changed.
    fn publish(
        &mut self,
        key: ChunkKey,
        placed: &[(usize, u32, u32)],
        unmaps: &[usize],
    ) -> Option<u64> {
        let version;
        if !placed.is_empty() || unmaps.iter().any(|b| self.is_mapped(key, *b)) {
            let bpc = self.sb.blocks_per_chunk();
            let c = self.chunks.entry(key).or_insert_with(|| Chunk::new(bpc));
            c.version += 1;
            version = c.version;
            let mut records = Vec::new();
            let mut freed = Vec::new();
            let mut delta: i64 = 0;
            for &(b, p, crc) in placed {
                let old = c.blocks[b];
                if old == ENTRY_NONE {
                    delta += 1;
                } else {
                    freed.push(entry_phys(old));
                }
                c.blocks[b] = entry(p, crc);
                records.push(Record::Map {
                    volume_id: key.volume_id,
                    chunk_index: key.chunk_index,
                    block: b as u16,
                    phys: p,
                    crc,
                    version,
                });
            }
            for &b in unmaps {
                let old = c.blocks[b];
                if old == ENTRY_NONE {
                    continue;
                }
                freed.push(entry_phys(old));
                delta -= 1;
                c.blocks[b] = ENTRY_NONE;
                records.push(Record::Unmap {
                    volume_id: key.volume_id,
                    chunk_index: key.chunk_index,
                    block: b as u16,
                    version,
                });
            }
            c.mapped = (i64::from(c.mapped) + delta) as u32;
            let vol = self.stats.volumes.entry(key.volume_id).or_default();
            *vol = (*vol as i64 + delta) as u64;
            self.stats.mapped_blocks = (self.stats.mapped_blocks as i64 + delta) as u64;
            self.pending_free.extend(freed);
            for r in records {
                self.push_record(r);
            }
            Some(version)
        } else {
            None
        }
    }

    /// Complete `tag` once every metadata record written so far is durable
    /// (FLUSH, and FUA writes).
    fn when_durable(&mut self, tag: u64, version: u64, claims: Option<(ChunkKey, usize, usize)>) {
        let needed = self.record_seq;
        let w = Waiter {
            needed,
            tag,
            version,
            claims,
        };
        if self.durable_seq >= needed {
            self.wake(w, Ok(Reply::Done));
        } else {
            self.waiters.push(w);
            self.maybe_commit();
        }
    }

    fn wake(&mut self, w: Waiter, result: Result<Reply, EngineError>) {
        if let Some((key, first, last)) = w.claims {
            for b in first..=last {
                self.claims.remove(&(key, b));
            }
        }
        self.complete(w.tag, result, w.version);
    }

    fn is_mapped(&self, key: ChunkKey, b: usize) -> bool {
        self.chunks
            .get(&key)
            .is_some_and(|c| c.blocks[b] != ENTRY_NONE)
    }

    /// End a hold, writing its range first when asked (see
    /// `Request::Release`).
    fn release(&mut self, tag: u64, id: u64, write: Option<(Payload, bool)>, token: Option<u64>) {
        let Some((key, offset, length)) = self.holds.remove(&id) else {
            self.complete(tag, Err(EngineError::Invalid("no such hold")), 0);
            return;
        };
        for b in held_blocks(offset, length) {
            self.claims.remove(&(key, b));
        }
        match write {
            Some(_) if self.failed => self.complete(tag, Err(EngineError::Failed), 0),
            Some((data, fua)) if data.len() == length as usize => {
                // Started in this step, so it claims the blocks before any
                // request deferred behind the hold is retried.
                let before = self.deferred.len();
                self.start_write(
                    tag,
                    key,
                    offset,
                    length,
                    Fill::Data,
                    data.clone(),
                    fua,
                    None,
                    token.map_or(Note::None, Note::Cas),
                );
                if self.deferred.len() > before {
                    // It waits for space (the blocks were free): keep
                    // holding them meanwhile, so no write that waited
                    // behind the hold starts first, and try again later.
                    self.deferred.pop_back();
                    for b in held_blocks(offset, length) {
                        self.claims.insert((key, b));
                    }
                    self.holds.insert(id, (key, offset, length));
                    let again = Request::Release {
                        id,
                        write: Some((data, fua)),
                        token,
                    };
                    self.deferred.push_back((tag, again));
                    return;
                }
            }
            Some(_) => self.complete(
                tag,
                Err(EngineError::Invalid("length differs from the hold")),
                0,
            ),
            None => self.complete(tag, Ok(Reply::Done), 0),
        }
        self.retry_deferred();
    }

    /// End every hold without writing (the daemon is stopping: the tasks
    /// that would release them are going away), so what waits behind them
    /// can finish.
    pub fn drop_holds(&mut self) {
        for (_, (key, offset, length)) in std::mem::take(&mut self.holds) {
            for b in held_blocks(offset, length) {
                self.claims.remove(&(key, b));
            }
        }
        self.retry_deferred();
    }

    fn retry_deferred(&mut self) {
        let n = self.deferred.len();
        for _ in 0..n {
            let Some((tag, req)) = self.deferred.pop_front() else {
                break;
            };
            self.start(tag, req);
        }
    }

    /// Record a change's log entry, in the journal commit that makes its
    /// mapping switch durable (the records are pushed right after it).
    fn log_change(&mut self, t: LogTag, key: ChunkKey, offset: u32, length: u32) {
        if self
            .log_trims
            .get(&t.pg)
            .is_some_and(|tr| (t.term, t.n) <= *tr)
        {
            return;
        }
        self.push_record(Record::LogExtent {
            pg: t.pg,
            volume_id: key.volume_id,
            chunk_index: key.chunk_index,
            offset,
            length,
        });
        self.push_record(Record::LogSeq {
            term: t.term,
            n: t.n,
        });
        if let Some(token) = t.cas {
            self.push_record(Record::LogCas { token });
        }
        self.keep_log_entry(t.pg, (t.term, t.n), (key, offset, length, t.cas));
        self.bound_logs(LOG_KEPT_MAX);
    }

    /// A single-copy COMPARE AND WRITE's write, published: its token is
    /// committed with it.
    fn cas_written(&mut self, token: u64) {
        self.push_record(Record::CasDone { token });
        self.keep_cas_token(token);
    }

    fn keep_cas_token(&mut self, token: u64) {
        if self.cas_tokens.len() >= CAS_TOKENS_KEPT {
            self.cas_tokens.pop_front();
        }
        self.cas_tokens.push_back(token);
    }

    /// The single-copy COMPARE AND WRITE tokens this disk keeps as written
    /// (oldest first): after `open`, those of the last process.
    pub fn cas_tokens(&self) -> Vec<u64> {
        self.cas_tokens.iter().copied().collect()
    }

    fn keep_log_entry(&mut self, pg: u32, seq: (u64, u64), e: (ChunkKey, u32, u32, Option<u64>)) {
        if self.logs.entry(pg).or_default().insert(seq, e).is_none() {
            self.log_len += 1;
        }
    }

    /// Forget the oldest entries of the largest groups until at most `max`
    /// are kept.
    fn bound_logs(&mut self, max: usize) {
        if self.log_len <= max {
            return;
        }
        while self.log_len > max {
            let Some((pg, log)) = self.logs.iter_mut().max_by_key(|(_, l)| l.len()) else {
                break;
            };
            let excess = (self.log_len - max).min(log.len());
            let mut last = None;
            for _ in 0..excess {
                last = log.pop_first().map(|(s, _)| s);
            }
            self.log_len -= excess;
            // The log no longer holds these: its floor rises past them. In
            // memory only: the dropped entries stay on disk (journal or
            // checkpoint) until the next checkpoint, which writes the
            // floors; a crash before it replays them and drops them again.
            if let Some(last) = last {
                let f = self.log_floors.entry(*pg).or_insert(((0, 0), false));
                f.0 = f.0.max(last);
            }
        }
        self.logs.retain(|_, l| !l.is_empty());
    }

    fn trim_log(&mut self, pg: u32, upto: (u64, u64)) {
        let forget = upto == LOG_FORGET;
        if !forget && self.log_trims.get(&pg).is_some_and(|t| upto <= *t) {
            return;
        }
        self.push_record(Record::LogTrim {
            pg,
            term: upto.0,
            n: upto.1,
        });
        self.apply_log_trim(pg, upto);
    }

    fn apply_log_trim(&mut self, pg: u32, upto: (u64, u64)) {
        if upto == LOG_FORGET {
            self.log_trims.remove(&pg);
            self.log_floors.remove(&pg);
            if let Some(l) = self.logs.remove(&pg) {
                self.log_len -= l.len();
            }
            return;
        }
        let t = self.log_trims.entry(pg).or_default();
        *t = (*t).max(upto);
        if let Some(l) = self.logs.get_mut(&pg) {
            let before = l.len();
            *l = l.split_off(&(upto.0, upto.1.saturating_add(1)));
            self.log_len -= before - l.len();
            if l.is_empty() {
                self.logs.remove(&pg);
            }
        }
    }

    /// Raise group `pg`'s log floor to at least `floor` and set whether the
    /// log is vouched complete above it; returns the floor now.
    fn set_log_floor(&mut self, pg: u32, floor: (u64, u64), complete: bool) -> ((u64, u64), bool) {
        let f = self.log_floors.entry(pg).or_insert(((0, 0), false));
        f.0 = f.0.max(floor);
        f.1 = complete;
        *f
    }

    /// Per group with a log state on this disk: its trim point, its floor
    /// and whether its log is complete above the higher of the two (after
    /// `open`: as the last process left them). A group without a floor
    /// record counts as incomplete.
    pub fn group_log_states(&self) -> Vec<GroupLogState> {
        let pgs: BTreeSet<u32> = self
            .logs
            .keys()
            .chain(self.log_trims.keys())
            .chain(self.log_floors.keys())
            .copied()
            .collect();
        pgs.into_iter()
            .map(|pg| {
                let (floor, complete) = self.log_floors.get(&pg).copied().unwrap_or_default();
                GroupLogState {
                    pg,
                    trim: self.log_trims.get(&pg).copied().unwrap_or_default(),
                    floor,
                    complete,
                }
            })
            .collect()
    }

    /// Every group-log entry this disk holds: after `open`, the changes
    /// its last process made durable and had not seen trimmed.
    pub fn group_log(&self) -> Vec<LogEntry> {
        let mut out = Vec::with_capacity(self.log_len);
        for (pg, log) in &self.logs {
            for (&(term, n), &(key, offset, length, cas)) in log {
                out.push(LogEntry {
                    pg: *pg,
                    term,
                    n,
                    key,
                    offset,
                    length,
                    cas,
                });
            }
        }
        out
    }

    fn push_record(&mut self, r: Record) {
        self.pending_records.push(r);
        self.record_seq += 1;
    }

    fn begin_read(&mut self) -> u64 {
        let s = self.next_read_seq;
        self.next_read_seq += 1;
        self.reads_inflight.insert(s);
        s
    }

    fn phys_offset(&self, phys: u32) -> u64 {
        (self.sb.data_start + u64::from(phys)) * BLOCK as u64
    }

    // ---- disk I/O --------------------------------------------------------

    fn issue(&mut self, op: IoOp) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(op);
            return;
        }
        if let Err(op) = self.disk.submit(op) {
            self.backlog.push_back(op);
        }
    }

    /// Submit queued I/O, collect completions and advance every operation.
    /// Submit queued I/O and process completions; returns how many disk
    /// completions were processed (0 means nothing new happened).
    pub fn drive(&mut self, wait: Wait) -> usize {
        while let Some(op) = self.backlog.pop_front() {
            if let Err(op) = self.disk.submit(op) {
                self.backlog.push_front(op);
                break;
            }
        }
        let wait = match wait {
            Wait::Any if self.disk.inflight() == 0 => Wait::No,
            w => w,
        };
        let mut done = std::mem::take(&mut self.done_buf);
        self.disk.reap(&mut done, wait);
        let reaped = done.len();
        for d in done.drain(..) {
            self.on_io(d);
        }
        self.done_buf = done;
        // Completions may have freed queue slots.
        while let Some(op) = self.backlog.pop_front() {
            if let Err(op) = self.disk.submit(op) {
                self.backlog.push_front(op);
                break;
            }
        }
        reaped
    }

    /// See [`Disk::completion_fd`].
    pub fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.disk.completion_fd()
    }

    fn on_io(&mut self, d: IoDone) {
        if let Err(errno) = d.result {
            self.stats.io_errors += 1;
            tracing::error!(errno, kind = ?d.kind, "disk I/O error");
        }
        if d.token & COMMIT_TOKEN != 0 {
            self.on_commit_io(d);
            return;
        }
        let id = (d.token >> SUB_BITS) as usize;
        let sub = (d.token & ((1 << SUB_BITS) - 1)) as usize;
        match &mut self.ops[id] {
            Op::Read(op) => {
                let run = &op.runs[sub];
                let buf = d.buf.expect("read buffer");
                match d.result {
                    Err(e) => op.error = Some(EngineError::Io(e)),
                    Ok(()) => {
                        for (i, &crc) in run.crcs.iter().enumerate() {
                            let content = &buf[i * BLOCK..(i + 1) * BLOCK];
                            if crc32c(content) != crc {
                                op.error = Some(EngineError::Checksum);
                                self.stats.checksum_errors += 1;
                                tracing::warn!(
                                    volume = op.key.volume_id,
                                    chunk = op.key.chunk_index,
                                    block = run.first_block + i,
                                    "checksum mismatch on read"
                                );
                            }
                        }
                        op.bufs[sub] = Some(buf);
                    }
                }
                op.pending -= 1;
                if op.pending == 0 {
                    let Op::Read(op) = self.ops.remove(id) else {
                        unreachable!()
                    };
                    self.reads_inflight.remove(&op.read_seq);
                    let (tag, version) = (op.tag, op.version);
                    let result = match op.error {
                        Some(e) => Err(e),
                        None => {
                            self.maybe_relocate(&op);
                            let crc = payload_crc(&op);
                            let data = read_pieces(op);
                            Ok(Reply::Data(match crc {
                                Some(c) => data.with_crc(c),
                                None => data,
                            }))
                        }
                    };
                    self.complete(tag, result, version);
                    self.release_quarantine();
                }
            }
            Op::Write(op) => {
                if let Err(e) = d.result {
                    op.error = Some(EngineError::Io(e));
                }
                if !op.writing {
                    let slot = &mut op.rmw[sub];
                    let buf = d.buf.expect("read buffer");
                    if d.result.is_ok() && crc32c(&buf) != slot.2 {
                        op.error = Some(EngineError::Checksum);
                        self.stats.checksum_errors += 1;
                    }
                    slot.1 = Some(buf);
                }
                op.pending -= 1;
                if op.pending == 0 {
                    if op.writing {
                        self.finish_write(id);
                    } else {
                        self.write_phase(id);
                        self.release_quarantine();
                    }
                }
            }
            Op::Relocate(op) => {
                op.failed |= d.result.is_err();
                op.pending -= 1;
                if op.pending == 0 {
                    self.finish_relocate(id);
                }
            }
        }
    }

    // ---- relocation -----------------------------------------------------

    /// A read completed whose blocks lie in many short physical runs:
    /// write them, as just read and verified, to one contiguous place
    /// (next fit from the allocator's cursor, so a sequential pass over
    /// scattered data lays it out sequentially again). Nothing changes for
    /// readers until `finish_relocate` switches the mapping.
    fn maybe_relocate(&mut self, op: &ReadOp) {
        let mapped: usize = op.runs.iter().map(|r| r.crcs.len()).sum();
        if !self.relocate
            || self.failed
            || mapped < RELOCATE_MIN_BLOCKS
            || self.relocating + mapped > RELOCATE_BLOCKS_MAX
            || op.runs.len() < RELOCATE_MIN_RUNS
            || op.runs.len() * RELOCATE_RUN_BLOCKS <= mapped
            || self.free_count <= self.sb.data_blocks / RELOCATE_FREE_DIVISOR + mapped as u64
            || self.dropped.contains(&op.key.volume_id)
        {
            return;
        }
        let cursor = self.cursor;
        let runs = alloc_runs(&mut self.used, &mut self.cursor, mapped);
        if runs.len() * 2 > op.runs.len() {
            // Free space is as scattered as the data: moving gains little.
            // Undo the allocation whole, cursor included, so client writes
            // are placed as if it never happened.
            for (p, n) in runs {
                self.used[p as usize..p as usize + n].fill(false);
            }
            self.cursor = cursor;
            return;
        }
        self.free_count -= mapped as u64;
        let mut blocks = Vec::with_capacity(mapped);
        let mut parts: Vec<&[u8]> = Vec::with_capacity(mapped);
        for (run, buf) in op.runs.iter().zip(&op.bufs) {
            let buf = buf.as_ref().expect("every run completed");
            for (i, &crc) in run.crcs.iter().enumerate() {
                blocks.push((run.first_block + i, entry(run.phys + i as u32, crc), 0));
                parts.push(&buf[i * BLOCK..(i + 1) * BLOCK]);
            }
        }
        let mut writes = Vec::with_capacity(runs.len());
        let mut at = 0;
        for (phys, n) in runs {
            for (i, b) in blocks[at..at + n].iter_mut().enumerate() {
                b.2 = phys + i as u32;
            }
            let buf = AlignedBuf::from_parts(&parts[at..at + n]);
            writes.push(((self.sb.data_start + u64::from(phys)) * BLOCK as u64, buf));
            at += n;
        }
        drop(parts);
        self.relocating += mapped;
        let id = self.ops.insert(Op::Relocate(RelocateOp {
            key: op.key,
            blocks,
            pending: writes.len(),
            failed: false,
        }));
        for (sub, (offset, buf)) in writes.into_iter().enumerate() {
            self.issue(IoOp {
                token: op_token(id, sub),
                kind: IoKind::Write,
                offset,
                buf: Some(buf),
            });
        }
    }

    /// A relocation's copies are written: each block that still maps to
    /// what was read now maps to its copy (same CRC, same chunk version, a
    /// `Map` record joining the next commit; the old block is freed like a
    /// superseded one, after that commit and after the reads still reading
    /// it); a block changed meanwhile keeps its mapping and its copy is
    /// freed at once (no record names it).
    fn finish_relocate(&mut self, id: usize) {
        let Op::Relocate(op) = self.ops.remove(id) else {
            unreachable!("relocate op");
        };
        self.relocating -= op.blocks.len();
        let mut unused = Vec::new();
        let mut records = Vec::new();
        let chunk = self
            .chunks
            .get_mut(&op.key)
            .filter(|_| !op.failed && !self.dropped.contains(&op.key.volume_id));
        match chunk {
            Some(c) => {
                for &(b, was, new) in &op.blocks {
                    if c.blocks[b] != was {
                        unused.push(new);
                        continue;
                    }
                    c.blocks[b] = entry(new, entry_crc(was));
                    self.pending_free.push(entry_phys(was));
                    records.push(Record::Map {
                        volume_id: op.key.volume_id,
                        chunk_index: op.key.chunk_index,
                        block: b as u16,
                        phys: new,
                        crc: entry_crc(was),
                        version: c.version,
                    });
                }
            }
            None => unused.extend(op.blocks.iter().map(|b| b.2)),
        }
        for p in unused {
            self.used.set(p as usize, false);
            self.free_count += 1;
        }
        self.stats.relocated_blocks += records.len() as u64;
        for r in records {
            self.push_record(r);
        }
        self.maybe_commit();
        self.retry_deferred();
    }

    // ---- metadata commits ------------------------------------------------

    /// Start a commit when one is needed: a FLUSH or FUA write is waiting,
    /// or enough records or freed blocks have piled up.
    fn maybe_commit(&mut self) {
        if self.commit.is_some() || self.failed || self.pending_records.is_empty() {
            return;
        }
        let waiting = self.waiters.iter().any(|w| w.needed > self.durable_seq);
        let batch_pages = (self.sb.journal_blocks as usize / 8)
            .clamp(COMMIT_BATCH_PAGES_MIN, COMMIT_BATCH_PAGES_MAX);
        let pressure = self.pending_records.len() >= batch_pages * RECORDS_PER_PAGE
            || self.pending_free.len() as u64 > self.free_count / 4
            || !self.deferred.is_empty();
        if !(waiting || pressure) {
            return;
        }
        self.start_commit();
    }

    fn start_commit(&mut self) {
        let records = std::mem::take(&mut self.pending_records);
        let frees = std::mem::take(&mut self.pending_free);
        let pages_needed = records.len().div_ceil(RECORDS_PER_PAGE) as u64;
        let format_id = self.sb.format_id;
        let mut commit = Commit {
            phase: CommitPhase::SyncData,
            pending: 1,
            upto: self.record_seq,
            frees,
            writes: Vec::new(),
            ckpt: None,
            journal_pages: 0,
        };
        if self.journal_used + pages_needed > self.sb.journal_blocks / 2 {
            // Journal half full: write the whole map as a checkpoint into
            // the other area instead; the journal restarts after it.
            let area = 1 - self.ckpt_area;
            let mut recs = Vec::new();
            for (k, c) in &self.chunks {
                for (b, &e) in c.blocks.iter().enumerate() {
                    if e != ENTRY_NONE {
                        recs.push(Record::Map {
                            volume_id: k.volume_id,
                            chunk_index: k.chunk_index,
                            block: b as u16,
                            phys: entry_phys(e),
                            crc: entry_crc(e),
                            version: c.version,
                        });
                    }
                }
            }
            // The group logs follow, as many entries as the area has room
            // for beside the map (it is sized for a full disk's map).
            let room = (self.sb.ckpt_blocks as usize - 1) * RECORDS_PER_PAGE;
            // A drop below may add a floor: count one per group.
            let fixed = recs.len()
                + self.log_trims.len()
                + self.log_floors.len().max(self.logs.len())
                + self.cas_tokens.len();
            // An entry takes two records, three with a token.
            let fit = room.saturating_sub(fixed) / 3;
            self.bound_logs(fit);
            for (&pg, &(term, n)) in &self.log_trims {
                recs.push(Record::LogTrim { pg, term, n });
            }
            for (&pg, &((term, n), complete)) in &self.log_floors {
                recs.push(Record::LogFloor {
                    pg,
                    term,
                    n,
                    complete,
                });
            }
            for (&pg, log) in &self.logs {
                for (&(term, n), &(key, offset, length, cas)) in log {
                    recs.push(Record::LogExtent {
                        pg,
                        volume_id: key.volume_id,
                        chunk_index: key.chunk_index,
                        offset,
                        length,
                    });
                    recs.push(Record::LogSeq { term, n });
                    if let Some(token) = cas {
                        recs.push(Record::LogCas { token });
                    }
                }
            }
            for &token in &self.cas_tokens {
                recs.push(Record::CasDone { token });
            }
            let pages = recs.len().div_ceil(RECORDS_PER_PAGE);
            assert!((pages as u64) < self.sb.ckpt_blocks);
            let mut buf = AlignedBuf::zeroed((pages + 1) * BLOCK);
            for (i, part) in recs.chunks(RECORDS_PER_PAGE).enumerate() {
                encode_page(
                    PAGE_MAGIC_CKPT,
                    format_id,
                    i as u64,
                    Batch {
                        index: i as u32,
                        len: pages as u32,
                    },
                    part,
                    &mut buf[(i + 1) * BLOCK..(i + 2) * BLOCK],
                );
            }
            let header = CkptHeader {
                ckpt_seq: self.ckpt_seq + 1,
                journal_pos: self.journal_head,
                journal_seq: self.journal_seq,
                pages: pages as u64,
                pages_crc: crc32c(&buf[BLOCK..]),
            };
            header.encode(format_id, &mut buf[..BLOCK]);
            commit
                .writes
                .push((self.sb.ckpt_start[area] * BLOCK as u64, buf));
            commit.ckpt = Some((area, header));
            self.stats.checkpoints += 1;
        } else {
            let n = pages_needed as usize;
            let mut pages = AlignedBuf::zeroed(n * BLOCK);
            for (i, part) in records.chunks(RECORDS_PER_PAGE).enumerate() {
                encode_page(
                    PAGE_MAGIC_JOURNAL,
                    format_id,
                    self.journal_seq + i as u64,
                    Batch {
                        index: i as u32,
                        len: n as u32,
                    },
                    part,
                    &mut pages[i * BLOCK..(i + 1) * BLOCK],
                );
            }
            // The journal is circular: split the write where it wraps.
            let head = self.journal_head as usize;
            let room = self.sb.journal_blocks as usize - head;
            let jstart = self.sb.journal_start * BLOCK as u64;
            if n <= room {
                commit.writes.push((jstart + (head * BLOCK) as u64, pages));
            } else {
                let mut a = AlignedBuf::zeroed(room * BLOCK);
                a.copy_from_slice(&pages[..room * BLOCK]);
                let mut b = AlignedBuf::zeroed((n - room) * BLOCK);
                b.copy_from_slice(&pages[room * BLOCK..]);
                commit.writes.push((jstart + (head * BLOCK) as u64, a));
                commit.writes.push((jstart, b));
            }
            commit.journal_pages = pages_needed;
            self.stats.commits += 1;
        }
        self.commit = Some(commit);
        self.issue(IoOp {
            token: COMMIT_TOKEN,
            kind: IoKind::Sync,
            offset: 0,
            buf: None,
        });
    }

    fn on_commit_io(&mut self, d: IoDone) {
        if let Err(errno) = d.result {
            // The disk cannot make metadata durable: stop accepting work
            // rather than acknowledge writes we cannot keep.
            tracing::error!(errno, "metadata commit failed; engine stops");
            self.fail_all(EngineError::Io(errno));
            return;
        }
        let commit = self.commit.as_mut().expect("commit in progress");
        commit.pending -= 1;
        if commit.pending > 0 {
            return;
        }
        match commit.phase {
            CommitPhase::SyncData => {
                commit.phase = CommitPhase::WriteMeta;
                let writes = std::mem::take(&mut commit.writes);
                commit.pending = writes.len();
                for (i, (off, buf)) in writes.into_iter().enumerate() {
                    self.issue(IoOp {
                        token: COMMIT_TOKEN | i as u64,
                        kind: IoKind::Write,
                        offset: off,
                        buf: Some(buf),
                    });
                }
            }
            CommitPhase::WriteMeta => {
                commit.phase = CommitPhase::SyncMeta;
                commit.pending = 1;
                self.issue(IoOp {
                    token: COMMIT_TOKEN,
                    kind: IoKind::Sync,
                    offset: 0,
                    buf: None,
                });
            }
            CommitPhase::SyncMeta => {
                let commit = self.commit.take().expect("commit");
                if let Some((area, header)) = commit.ckpt {
                    self.ckpt_area = area;
                    self.ckpt_seq = header.ckpt_seq;
                    self.journal_used = 0;
                } else {
                    self.journal_head =
                        (self.journal_head + commit.journal_pages) % self.sb.journal_blocks;
                    self.journal_seq += commit.journal_pages;
                    self.journal_used += commit.journal_pages;
                }
                self.durable_seq = commit.upto;
                self.quarantine
                    .push_back((self.next_read_seq, commit.frees));
                self.release_quarantine();
                let durable = self.durable_seq;
                let (ready, waiting): (Vec<Waiter>, Vec<Waiter>) =
                    std::mem::take(&mut self.waiters)
                        .into_iter()
                        .partition(|w| w.needed <= durable);
                self.waiters = waiting;
                for w in ready {
                    self.wake(w, Ok(Reply::Done));
                }
                self.maybe_commit();
                self.retry_deferred();
            }
        }
    }

    /// Return superseded blocks to the allocator once no read that started
    /// before their release can still be reading them.
    fn release_quarantine(&mut self) {
        let oldest_read = self.reads_inflight.first().copied().unwrap_or(u64::MAX);
        while let Some((barrier, _)) = self.quarantine.front() {
            if *barrier > oldest_read {
                break;
            }
            let (_, blocks) = self.quarantine.pop_front().expect("front");
            for p in blocks {
                assert!(self.used[p as usize], "freeing a free block");
                self.used.set(p as usize, false);
                self.free_count += 1;
            }
        }
    }

    fn fail_all(&mut self, e: EngineError) {
        self.failed = true;
        self.commit = None;
        for w in std::mem::take(&mut self.waiters) {
            self.wake(w, Err(e));
        }
        for (tag, _) in std::mem::take(&mut self.deferred) {
            self.complete(tag, Err(e), 0);
        }
    }

    /// Wait for everything in flight to finish and commit all metadata.
    /// Used at shutdown and by tests.
    pub fn quiesce(&mut self) {
        let t = u64::MAX - 1;
        self.submit(t, Request::Flush);
        loop {
            self.drive(Wait::Any);
            if !self.busy() {
                break;
            }
        }
        self.completions.retain(|c| c.tag != t);
    }

    /// Give the disk back (tests crash it).
    pub fn into_disk(self) -> D {
        self.disk
    }
}

/// The blocks a hold of `[offset, offset + length)` claims.
fn held_blocks(offset: u32, length: u32) -> std::ops::RangeInclusive<usize> {
    offset as usize / BLOCK..=(offset + length - 1) as usize / BLOCK
}

fn op_token(id: usize, sub: usize) -> u64 {
    assert!(sub < (1 << SUB_BITS));
    ((id as u64) << SUB_BITS) | sub as u64
}

/// Take `n` free blocks in as few contiguous runs as possible, scanning
/// from the cursor (next fit), so sequential writes land sequentially.
fn alloc_runs(used: &mut BitVec, cursor: &mut usize, n: usize) -> Vec<(u32, usize)> {
    let mut runs = Vec::new();
    let mut need = n;
    let total = used.len();
    let mut scanned_wrap = false;
    while need > 0 {
        if *cursor >= total {
            *cursor = 0;
        }
        let Some(start) = used[*cursor..].first_zero().map(|i| i + *cursor) else {
            assert!(!scanned_wrap, "allocator ran out despite reservation");
            scanned_wrap = true;
            *cursor = 0;
            continue;
        };
        // Look no further than the blocks still needed: on a mostly free
        // disk an unbounded search for the next used block walks the whole
        // bitmap on every write (it was 7 % of a storage daemon's CPU).
        let end = (start + need).min(total);
        let take = used[start..end].first_one().unwrap_or(end - start);
        used[start..start + take].fill(true);
        runs.push((start as u32, take));
        need -= take;
        *cursor = start + take;
    }
    runs
}

/// Run one I/O to completion (used only at format and open time).
fn sync_io<D: Disk>(
    disk: &mut D,
    kind: IoKind,
    offset: u64,
    buf: Option<AlignedBuf>,
) -> Result<AlignedBuf, OpenError> {
    assert!(buf.as_ref().is_none_or(|b| b.len() % ALIGN == 0));
    let token = u64::MAX;
    let mut op = IoOp {
        token,
        kind,
        offset,
        buf,
    };
    loop {
        match disk.submit(op) {
            Ok(()) => break,
            Err(back) => {
                op = back;
                let mut sink = Vec::new();
                disk.reap(&mut sink, Wait::Any);
                assert!(sink.is_empty(), "sync_io runs alone");
            }
        }
    }
    let mut out = Vec::new();
    loop {
        disk.reap(&mut out, Wait::Any);
        if let Some(d) = out.pop() {
            assert_eq!(d.token, token);
            d.result.map_err(OpenError::Io)?;
            return Ok(d.buf.unwrap_or_else(|| AlignedBuf::zeroed(BLOCK)));
        }
    }
}

#[cfg(test)]
mod tests;

/// The Firefox/rustc multiply-rotate hash: the write path inserts and
/// removes one claim per 4 KiB block, and SipHash (the std default, built to
/// resist hash flooding by untrusted keys) showed in profiles. Claim keys
/// are validated (volume, chunk, block) numbers, not attacker-chosen bytes
/// that could be made to collide in bulk, and a collision only slows a
/// lookup.
#[derive(Default, Clone, Copy)]
struct FxHasher {
    hash: u64,
}

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.hash = (self.hash.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn finish(&self) -> u64 {
        self.hash
    }
}
