//! Executes decoded SCSI commands against a [`Volume`]: the async half of
//! the SCSI layer. Decoding, sense data and answer layouts are in
//! [`super::scsi`]; reservations in [`super::pr`].
//!
//! [`Lun`] is the state one logical unit shares between every session of
//! this gateway: reservations, mode parameters, and the lock that makes
//! COMPARE AND WRITE atomic against every other write through this gateway
//! (writes take it shared, COMPARE AND WRITE exclusive). Atomicity across
//! several gateways is not provided (see docs/iscsi.md).

use super::pr::{self, Refusal, Reservations};
use super::scsi::{
    self, Command, Geometry, Identity, ModeState, Sense, Transfer, asc, key, status,
};
use super::session::{Outcome, Task};
use crate::volume::{Volume, VolumeError};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Largest single trim/write-zeroes request handed to the volume.
const RANGE_BYTES_MAX: u64 = 1 << 30;
/// WRITE SAME with data is written in pieces of at most this many bytes.
const WRITE_SAME_PIECE_BYTES: u64 = 1 << 20;

/// GET LBA STATUS looks at most this far ahead (64 chunks of 4 MiB, asked
/// of the storage daemons in parallel).
const LBA_STATUS_SCAN_BYTES: u64 = 256 << 20;
/// Times an ORWRITE reads, ORs and compares-and-writes before it gives up
/// on blocks other writers keep changing (ABORTED COMMAND: retried).
const ORWRITE_ATTEMPTS: usize = 64;
/// Pause after an ORWRITE's n-th miscompare: n times this, at most
/// [`ORWRITE_BACKOFF_MAX`]. Without it a writer whose read-to-compare
/// round trip is longer (through another gateway) could lose to faster
/// writers of the same block every time until it gave up (the likely
/// cause of one CHECK CONDITION in a full test run, sense not recorded:
/// four sessions on two gateways setting bits of one block); pausing lets
/// the others finish and bounds the retries' load.
const ORWRITE_BACKOFF: std::time::Duration = std::time::Duration::from_micros(100);
const ORWRITE_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_millis(2);

/// Unit attentions kept per I_T nexus; older ones are dropped beyond this.
pub const UNIT_ATTENTIONS_MAX: usize = 8;

/// Shared state of one logical unit.
#[derive(Default)]
pub struct Lun {
    pub reservations: Mutex<Reservations>,
    /// Held by PERSISTENT RESERVE OUT across storing its result, and by
    /// SPC-2 RESERVE/RELEASE, so changes are stored in the order they are
    /// made and none is computed from a state another is replacing.
    pub pr_serial: tokio::sync::Mutex<()>,
    /// Version of the stored reservation state `reservations` matches.
    pub pr_version: AtomicU64,
    /// The store's change counter when this LU last compared versions.
    pr_seen: AtomicU64,
    pub mode: Mutex<ModeState>,
    pub atomic: tokio::sync::RwLock<()>,
    /// Connected I_T nexuses and their pending unit attentions (SAM-5
    /// §5.14), reported on their next command.
    nexuses: Mutex<BTreeMap<String, VecDeque<Sense>>>,
}

impl Lun {
    /// A logical unit starting from stored reservation state.
    pub fn with_reservations(s: Stored) -> Lun {
        Lun {
            reservations: Mutex::new(s.state),
            pr_version: AtomicU64::new(s.version),
            ..Lun::default()
        }
    }

    /// Take a stored state (newer than ours, or what a lost
    /// compare-and-swap found) in place of the persistent part.
    fn adopt(&self, s: Stored) {
        self.reservations
            .lock()
            .expect("not poisoned")
            .adopt_persistent(s.state);
        self.pr_version.store(s.version, Ordering::Release);
    }

    /// Take a state another gateway stored since ours, if the store has
    /// one (cheap when nothing changed: one counter compared).
    fn refresh(&self, volume: &str, p: &dyn Persist) {
        let generation = p.generation();
        if self.pr_seen.swap(generation, Ordering::AcqRel) == generation {
            return;
        }
        if let Some(s) = p.newer(volume, self.pr_version.load(Ordering::Acquire)) {
            self.adopt(s);
        }
    }

    pub fn attach(&self, nexus: &str) {
        self.nexuses
            .lock()
            .expect("not poisoned")
            .entry(nexus.to_string())
            .or_default();
    }
    pub fn detach(&self, nexus: &str) {
        self.nexuses.lock().expect("not poisoned").remove(nexus);
    }
    /// Queue a unit attention for every connected nexus.
    pub fn unit_attention(&self, s: Sense) {
        for q in self.nexuses.lock().expect("not poisoned").values_mut() {
            if q.len() == UNIT_ATTENTIONS_MAX {
                q.pop_front();
            }
            q.push_back(s);
        }
    }
    fn take_unit_attention(&self, nexus: &str) -> Option<Sense> {
        self.nexuses
            .lock()
            .expect("not poisoned")
            .get_mut(nexus)?
            .pop_front()
    }
}

/// Reservation state as stored, with its version (it grows by one per
/// store).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stored {
    pub version: u64,
    pub state: Reservations,
}

/// Why a store did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaveError {
    /// Another writer (another gateway serving the volume) stored first:
    /// this is what is stored now.
    Conflict(Stored),
    Failed(String),
}

/// A boxed future of a store operation: the new version.
pub type SaveFuture = Pin<Box<dyn Future<Output = Result<u64, SaveError>> + Send>>;

/// Where persistent-reservation state lives beyond this gateway's memory
/// (the manager): it survives a gateway restart and is shared by every
/// gateway serving the volume.
pub trait Persist: Send + Sync {
    /// The stored state of `volume`, read when its logical unit is first
    /// used in this gateway.
    fn load(&self, volume: &str) -> Option<Stored>;
    /// A counter that changes whenever `newer` may answer differently.
    fn generation(&self) -> u64 {
        0
    }
    /// The stored state of `volume` if it is newer than `version`.
    fn newer(&self, _volume: &str, _version: u64) -> Option<Stored> {
        None
    }
    /// Whether this gateway's view of the stored state is within its lease
    /// (a store shared with other gateways, heard from recently).
    fn fresh(&self) -> bool {
        true
    }
    /// Store `state`, computed from stored version `expected`, after a
    /// PERSISTENT RESERVE OUT changed it (a compare-and-swap); the command
    /// is answered GOOD only once this succeeds.
    fn save(&self, volume: &str, expected: u64, state: &Reservations) -> SaveFuture;
}

/// A PERSISTENT RESERVE OUT whose store keeps losing compare-and-swaps
/// (other gateways changing the same volume's reservations) gives up after
/// this many tries, retryably.
pub const PR_STORE_ATTEMPTS: u32 = 4;

fn good(data: Vec<u8>) -> Outcome {
    Outcome {
        status: status::GOOD,
        sense: Vec::new(),
        data,
        out_wanted: 0,
    }
}

fn conflict() -> Outcome {
    Outcome {
        status: status::RESERVATION_CONFLICT,
        sense: Vec::new(),
        data: Vec::new(),
        out_wanted: 0,
    }
}

/// Map a volume error to sense data: the only place this mapping exists.
pub fn sense_of(e: &VolumeError, write: bool) -> Sense {
    match e {
        VolumeError::Io | VolumeError::Checksum => Sense::new(
            key::MEDIUM_ERROR,
            if write {
                asc::WRITE_ERROR
            } else {
                asc::UNRECOVERED_READ_ERROR
            },
        ),
        VolumeError::Invalid(_) => Sense::illegal(asc::LBA_OUT_OF_RANGE),
        VolumeError::NoSpace => Sense::new(key::DATA_PROTECT, asc::SPACE_ALLOCATION_FAILED),
        VolumeError::Timeout => Sense::new(key::ABORTED_COMMAND, asc::TIMEOUT_ON_LOGICAL_UNIT),
        VolumeError::ShuttingDown => Sense::new(key::ABORTED_COMMAND, asc::NONE),
        VolumeError::Gone => Sense::new(key::NOT_READY, asc::MEDIUM_NOT_PRESENT),
        VolumeError::NotSupported => Sense::illegal(asc::INVALID_OPCODE),
        VolumeError::Miscompare(at) => Sense::miscompare(*at),
    }
}

struct Ctx<'a> {
    vol: &'a dyn Volume,
    lun: &'a Lun,
    g: Geometry,
    descriptor: bool,
}

impl Ctx<'_> {
    fn check(&self, s: Sense) -> Outcome {
        Outcome {
            status: status::CHECK_CONDITION,
            sense: s.encode(self.descriptor),
            data: Vec::new(),
            out_wanted: 0,
        }
    }
    fn bs(&self) -> u64 {
        self.g.block_size as u64
    }
    async fn zero(&self, mut off: u64, mut len: u64) -> Result<(), VolumeError> {
        while len > 0 {
            let n = len.min(RANGE_BYTES_MAX);
            self.vol.write_zeroes(off, n as u32, false).await?;
            off += n;
            len -= n;
        }
        Ok(())
    }
    /// Write `data` at byte `off`; a tail shorter than a block (a write
    /// truncated by EDTL) is merged with the block's current contents.
    async fn write_bytes(&self, off: u64, data: &[u8], fua: bool) -> Result<(), VolumeError> {
        self.write_vec(off, data.to_vec(), fua).await
    }

    /// [`Ctx::write_bytes`] of a buffer we own: whole blocks are handed to
    /// the volume as they are (the Data-Out as the connection read it: no
    /// copy), only a partial tail is copied.
    async fn write_vec(&self, off: u64, mut data: Vec<u8>, fua: bool) -> Result<(), VolumeError> {
        let bs = self.bs() as usize;
        let whole = data.len() / bs * bs;
        let tail = data.split_off(whole);
        if whole > 0 {
            self.vol.write(off, data, fua).await?;
        }
        if !tail.is_empty() {
            let at = off + whole as u64;
            let mut block = self.vol.read(at, bs as u32).await?;
            block[..tail.len()].copy_from_slice(&tail);
            self.vol.write(at, block, fua).await?;
        }
        Ok(())
    }
}

fn first_mismatch(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn truncated(mut d: Vec<u8>, alloc: u32) -> Vec<u8> {
    d.truncate(alloc as usize);
    d
}

/// Run one task. `nexus` names the I_T nexus for reservations. A WRITE
/// takes the task's Data-Out (`task.data` is empty afterwards).
pub async fn execute(
    vol: &dyn Volume,
    lun: &Lun,
    id: &Identity,
    nexus: &str,
    persist: Option<&dyn Persist>,
    task: &mut Task,
) -> Outcome {
    let bs = vol.block_size();
    let g = Geometry {
        block_size: bs,
        blocks: vol.size_bytes() / bs as u64,
    };
    let descriptor = lun.mode.lock().expect("not poisoned").d_sense;
    let cx = Ctx {
        vol,
        lun,
        g,
        descriptor,
    };
    let cmd = match scsi::decode(&task.cdb, &g) {
        Ok(c) => c,
        Err(s) => return cx.check(s),
    };
    if task.lun != 0 {
        // SPC-4 §4.6.3: only INQUIRY, REPORT LUNS and REQUEST SENSE answer
        // for an unknown LUN.
        return match cmd {
            Command::Inquiry {
                evpd: false, alloc, ..
            } => {
                let mut d = scsi::inquiry_standard();
                d[0] = 0x7f; // peripheral qualifier 011b, type 1Fh
                good(truncated(d, alloc))
            }
            Command::ReportLuns { alloc } => good(truncated(scsi::report_luns(), alloc)),
            Command::RequestSense { descriptor, alloc } => good(truncated(
                Sense::illegal(asc::LU_NOT_SUPPORTED).encode(descriptor),
                alloc,
            )),
            _ => cx.check(Sense::illegal(asc::LU_NOT_SUPPORTED)),
        };
    }
    // SAM-5 §5.14: a pending unit attention is reported (and cleared) by
    // the next command, except INQUIRY and REPORT LUNS; REQUEST SENSE
    // returns it as data.
    match cmd {
        Command::Inquiry { .. } | Command::ReportLuns { .. } => {}
        Command::RequestSense { descriptor, alloc } => {
            if let Some(ua) = lun.take_unit_attention(nexus) {
                return good(truncated(ua.encode(descriptor), alloc));
            }
        }
        _ => {
            if let Some(ua) = lun.take_unit_attention(nexus) {
                return cx.check(ua);
            }
        }
    }
    let access = cmd.access();
    if let Some(p) = persist {
        lun.refresh(vol.name(), p);
        // Past the lease another gateway may have fenced this initiator
        // without our knowing: refuse, retryably, what a reservation
        // could forbid, where there are registrations to fence with.
        if !matches!(access, scsi::Access::Always | scsi::Access::Reservation)
            && !p.fresh()
            && lun
                .reservations
                .lock()
                .expect("not poisoned")
                .has_registrations()
        {
            return cx.check(Sense::new(
                key::ABORTED_COMMAND,
                asc::LU_COMMUNICATION_FAILURE,
            ));
        }
    }
    if access != scsi::Access::Reservation
        && !lun
            .reservations
            .lock()
            .expect("not poisoned")
            .allows(nexus, access)
    {
        return conflict();
    }
    let out_wanted = match cmd.transfer(&g) {
        Transfer::Out(n) => n,
        _ => 0,
    };
    let mut o = run(&cx, id, nexus, persist, cmd, task).await;
    if task.write {
        o.out_wanted = out_wanted;
    }
    o
}

async fn run(
    cx: &Ctx<'_>,
    id: &Identity,
    nexus: &str,
    persist: Option<&dyn Persist>,
    cmd: Command,
    task: &mut Task,
) -> Outcome {
    let g = cx.g;
    let bs = cx.bs();
    let vol = cx.vol;
    // Data-Out available to the command: what the initiator sent, at most
    // what the command wants (SPDTL), §4.3.5 of SAM-5 overflow rules.
    let want_out = match cmd.transfer(&g) {
        Transfer::Out(n) => n as usize,
        _ => 0,
    };
    // A WRITE's Data-Out goes on to the volume in the buffer it was read
    // into; every other command looks at it in place.
    let mut write_data = match cmd {
        Command::Write(_) => std::mem::take(&mut task.data),
        _ => Vec::new(),
    };
    write_data.truncate(want_out);
    let data: &[u8] = &task.data[..task.data.len().min(want_out)];
    let io = |e: VolumeError, write: bool| cx.check(sense_of(&e, write));
    use Command::*;
    match cmd {
        TestUnitReady | StartStopUnit | PreventAllow | PreFetch { .. } => good(Vec::new()),
        RequestSense { descriptor, alloc } => good(truncated(
            Sense::new(key::NO_SENSE, asc::NONE).encode(descriptor),
            alloc,
        )),
        Inquiry {
            evpd: false, alloc, ..
        } => good(truncated(scsi::inquiry_standard(), alloc)),
        Inquiry { page, alloc, .. } => match scsi::inquiry_vpd(page, id, &g) {
            Some(d) => good(truncated(d, alloc)),
            None => cx.check(Sense::invalid_cdb()),
        },
        ReadCapacity10 => good(scsi::read_capacity10(&g)),
        ReadCapacity16 { alloc } => good(truncated(scsi::read_capacity16(&g), alloc)),
        ReportLuns { alloc } => good(truncated(scsi::report_luns(), alloc)),
        ReportSupportedOpcodes { alloc, .. } => match scsi::report_supported_opcodes(&cmd) {
            Ok(d) => good(truncated(d, alloc)),
            Err(s) => cx.check(s),
        },
        ModeSense { alloc, .. } => {
            let m = *cx.lun.mode.lock().expect("not poisoned");
            match scsi::mode_sense(&cmd, &g, &m) {
                Ok(d) => good(truncated(d, alloc)),
                Err(s) => cx.check(s),
            }
        }
        ModeSelect { ten, .. } => {
            let mut m = cx.lun.mode.lock().expect("not poisoned");
            match scsi::mode_select(ten, data, &g, &m) {
                Ok(n) => {
                    *m = n;
                    good(Vec::new())
                }
                Err(s) => cx.check(s),
            }
        }
        Read(r) => {
            if r.blocks == 0 {
                return good(Vec::new());
            }
            match vol.read(r.lba * bs, r.blocks * bs as u32).await {
                Ok(d) => good(d),
                Err(e) => io(e, false),
            }
        }
        Write(r) => {
            if write_data.is_empty() {
                return good(Vec::new());
            }
            let _shared = cx.lun.atomic.read().await;
            match cx.write_vec(r.lba * bs, write_data, r.fua).await {
                Ok(()) => good(Vec::new()),
                Err(e) => io(e, true),
            }
        }
        Verify { rw, bytchk } => {
            if rw.blocks == 0 {
                return good(Vec::new());
            }
            let medium = match vol.read(rw.lba * bs, rw.blocks * bs as u32).await {
                Ok(d) => d,
                Err(e) => return io(e, false),
            };
            if bytchk {
                if data.len() < medium.len() {
                    return cx.check(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
                }
                if let Some(at) = first_mismatch(data, &medium) {
                    return cx.check(Sense::miscompare(at as u64));
                }
            }
            good(Vec::new())
        }
        WriteVerify { rw, .. } => {
            if data.is_empty() {
                return good(Vec::new());
            }
            let _shared = cx.lun.atomic.read().await;
            if let Err(e) = cx.write_bytes(rw.lba * bs, data, true).await {
                return io(e, true);
            }
            // Verify: read back what was written and compare.
            let back = match vol
                .read(
                    rw.lba * bs,
                    data.len().div_ceil(bs as usize) as u32 * bs as u32,
                )
                .await
            {
                Ok(d) => d,
                Err(e) => return io(e, false),
            };
            if let Some(at) = first_mismatch(data, &back) {
                return cx.check(Sense::miscompare(at as u64));
            }
            good(Vec::new())
        }
        SynchronizeCache => match vol.flush().await {
            Ok(()) => good(Vec::new()),
            Err(e) => io(e, true),
        },
        WriteSame {
            lba,
            blocks,
            unmap,
            ndob,
        } => {
            if !ndob && task.data.len() != bs as usize {
                // The Data-Out must be exactly one block.
                return cx.check(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
            }
            // With UNMAP the blocks are deallocated whatever the data
            // (LBPRZ=1: they then read as zeroes), as initiators expect.
            let zero = ndob || unmap || data.iter().all(|b| *b == 0);
            let (off, len) = (lba * bs, blocks * bs);
            let _shared = cx.lun.atomic.read().await;
            let r = if zero {
                // Write-zeroes deallocates whole storage blocks and zeroes
                // partial ones, so it both unmaps and keeps LBPRZ=1 true
                // (a plain trim skips partial blocks).
                cx.zero(off, len).await
            } else {
                let per = (WRITE_SAME_PIECE_BYTES / bs).max(1);
                let mut piece = Vec::with_capacity((per * bs) as usize);
                for _ in 0..per {
                    piece.extend_from_slice(data);
                }
                let mut done = 0u64;
                let mut r = Ok(());
                while done < blocks {
                    let n = (blocks - done).min(per);
                    if let Err(e) = vol
                        .write(off + done * bs, piece[..(n * bs) as usize].to_vec(), false)
                        .await
                    {
                        r = Err(e);
                        break;
                    }
                    done += n;
                }
                r
            };
            match r {
                Ok(()) => good(Vec::new()),
                Err(e) => io(e, true),
            }
        }
        Unmap { len } => {
            if (task.data.len() as u32) < len {
                return cx.check(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
            }
            let ranges = match scsi::unmap_ranges(data, &g) {
                Ok(r) => r,
                Err(s) => return cx.check(s),
            };
            let _shared = cx.lun.atomic.read().await;
            for (lba, n) in ranges {
                // Write-zeroes rather than trim: see WRITE SAME above.
                if let Err(e) = cx.zero(lba * bs, n as u64 * bs).await {
                    return io(e, true);
                }
            }
            good(Vec::new())
        }
        GetLbaStatus { lba, alloc } => {
            // From the storage daemons' allocation maps, over at most
            // LBA_STATUS_SCAN_BYTES: SBC-4 §5.6 lets the answer end early;
            // the initiator asks again from where it ends.
            let scan = ((g.blocks - lba) * bs).min(LBA_STATUS_SCAN_BYTES / bs * bs);
            let room = (alloc.saturating_sub(8) / 16) as usize;
            match vol.allocation(lba * bs, scan).await {
                Ok(extents) => {
                    let runs = scsi::lba_runs(lba, g.block_size, &extents, room);
                    good(truncated(scsi::lba_status(&runs), alloc))
                }
                Err(e) => io(e, false),
            }
        }
        CompareAndWrite(r) => {
            let n = (r.blocks as u64 * bs) as usize;
            if r.blocks == 0 {
                // Nothing to compare; Data-Out with it is inconsistent.
                if task.data.is_empty() {
                    return good(Vec::new());
                }
                return cx.check(Sense::invalid_cdb());
            }
            if task.data.len() != 2 * n {
                return cx.check(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
            }
            // At the primary of the blocks' chunk, which sees every write
            // to them through any gateway (shared here: a fallback below
            // through this gateway must not interleave with it).
            {
                let _shared = cx.lun.atomic.read().await;
                let (compare, write) = (data[..n].to_vec(), data[n..].to_vec());
                match vol
                    .compare_and_write(r.lba * bs, compare, write, r.fua)
                    .await
                {
                    Ok(()) => return good(Vec::new()),
                    Err(VolumeError::Miscompare(at)) => {
                        return cx.check(Sense::miscompare(at));
                    }
                    Err(VolumeError::NotSupported) => {}
                    Err(e) => return io(e, true),
                }
            }
            // The volume cannot (a range across chunks, an in-memory
            // volume): atomic against this gateway's writes only.
            let _exclusive = cx.lun.atomic.write().await;
            let medium = match vol.read(r.lba * bs, n as u32).await {
                Ok(d) => d,
                Err(e) => return io(e, false),
            };
            if let Some(at) = first_mismatch(&data[..n], &medium) {
                return cx.check(Sense::miscompare(at as u64));
            }
            match vol.write(r.lba * bs, data[n..].to_vec(), r.fua).await {
                Ok(()) => good(Vec::new()),
                Err(e) => io(e, true),
            }
        }
        OrWrite(r) => {
            if data.is_empty() {
                return good(Vec::new());
            }
            // SBC-4 §5.13: an uninterrupted read, modify and write. Read,
            // OR, and write only if the medium still holds what was read:
            // a COMPARE AND WRITE at the chunk's primary, which sees every
            // write through any gateway; another writer in between makes it
            // miscompare, and the OR is done again on what it wrote.
            let span = data.len().div_ceil(bs as usize) * bs as usize;
            {
                let _shared = cx.lun.atomic.read().await;
                let mut supported = true;
                for attempt in 1..=ORWRITE_ATTEMPTS as u32 {
                    let medium = match vol.read(r.lba * bs, span as u32).await {
                        Ok(d) => d,
                        Err(e) => return io(e, false),
                    };
                    let mut next = medium.clone();
                    for (m, d) in next.iter_mut().zip(data) {
                        *m |= *d;
                    }
                    match vol.compare_and_write(r.lba * bs, medium, next, r.fua).await {
                        Ok(()) => return good(Vec::new()),
                        Err(VolumeError::Miscompare(_)) => {
                            let pause = (ORWRITE_BACKOFF * attempt).min(ORWRITE_BACKOFF_MAX);
                            tokio::time::sleep(pause).await;
                            continue;
                        }
                        Err(VolumeError::NotSupported) => supported = false,
                        Err(e) => return io(e, true),
                    }
                    break;
                }
                if supported {
                    // Other writers changed the blocks at every attempt:
                    // the initiator retries an aborted command.
                    return cx.check(Sense::new(
                        key::ABORTED_COMMAND,
                        asc::LU_COMMUNICATION_FAILURE,
                    ));
                }
            }
            // The volume cannot (a range across chunks or longer than a
            // compare may be, an in-memory volume): atomic against every
            // other write through this gateway only.
            let _exclusive = cx.lun.atomic.write().await;
            let mut medium = match vol.read(r.lba * bs, span as u32).await {
                Ok(d) => d,
                Err(e) => return io(e, false),
            };
            for (m, d) in medium.iter_mut().zip(data) {
                *m |= *d;
            }
            match vol.write(r.lba * bs, medium, r.fua).await {
                Ok(()) => good(Vec::new()),
                Err(e) => io(e, true),
            }
        }
        PrIn { action, alloc } => {
            let d = cx
                .lun
                .reservations
                .lock()
                .expect("not poisoned")
                .read(action, pr::transport_id);
            good(truncated(d, alloc))
        }
        PrOut {
            action,
            scope,
            kind,
            len,
        } => {
            if (task.data.len() as u32) < len {
                return cx.check(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
            }
            // The change is computed on a copy, stored (compare-and-swap
            // against the version it was computed from), and only then
            // installed: commands checked against the reservations never
            // see a state that was not stored, a failed store leaves
            // everything as it was, and when another gateway stored first
            // the command is evaluated again on what it stored.
            let _serial = cx.lun.pr_serial.lock().await;
            let aborted = || {
                // Retryable: the initiator sends it again.
                cx.check(Sense::new(
                    key::ABORTED_COMMAND,
                    asc::LU_COMMUNICATION_FAILURE,
                ))
            };
            for _ in 0..PR_STORE_ATTEMPTS {
                let version = cx.lun.pr_version.load(Ordering::Acquire);
                let mut next = cx.lun.reservations.lock().expect("not poisoned").clone();
                if let Err(r) = next.out(nexus, action, scope, kind, data) {
                    return match r {
                        Refusal::Conflict => conflict(),
                        Refusal::Sense(s) => cx.check(s),
                    };
                }
                let changed = !cx
                    .lun
                    .reservations
                    .lock()
                    .expect("not poisoned")
                    .same_persistent(&next);
                let Some(p) = persist.filter(|_| changed) else {
                    cx.lun.adopt(Stored {
                        version,
                        state: next,
                    });
                    return good(Vec::new());
                };
                match p.save(vol.name(), version, &next).await {
                    Ok(v) => {
                        cx.lun.adopt(Stored {
                            version: v,
                            state: next,
                        });
                        return good(Vec::new());
                    }
                    Err(SaveError::Conflict(stored)) => cx.lun.adopt(stored),
                    Err(SaveError::Failed(e)) => {
                        tracing::warn!(volume = vol.name(), error = %e,
                            "cannot store reservations; PERSISTENT RESERVE OUT not done");
                        return aborted();
                    }
                }
            }
            tracing::warn!(
                volume = vol.name(),
                "reservations changed by other gateways {PR_STORE_ATTEMPTS} times in a row; \
                 PERSISTENT RESERVE OUT not done"
            );
            aborted()
        }
        Reserve => {
            let _serial = cx.lun.pr_serial.lock().await;
            match cx
                .lun
                .reservations
                .lock()
                .expect("not poisoned")
                .reserve_spc2(nexus)
            {
                Ok(()) => good(Vec::new()),
                Err(_) => conflict(),
            }
        }
        Release => {
            let _serial = cx.lun.pr_serial.lock().await;
            match cx
                .lun
                .reservations
                .lock()
                .expect("not poisoned")
                .release_spc2(nexus)
            {
                Ok(()) => good(Vec::new()),
                Err(_) => conflict(),
            }
        }
    }
}
