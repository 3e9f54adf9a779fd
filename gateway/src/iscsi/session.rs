//! The full feature phase of one iSCSI connection (RFC 7143 §4, §11): a
//! pure state machine. PDUs in, [`Effect`]s out (PDUs to send, SCSI tasks to
//! execute, resets, close).
//!
//! It owns the command window (CmdSN/ExpCmdSN/MaxCmdSN, §4.2.2.1: commands
//! outside the window are silently dropped, gaps are held until filled),
//! StatSN, Data-Out collection (immediate data, unsolicited Data-Out up to
//! FirstBurstLength, then one R2T at a time of at most MaxBurstLength with
//! DataSN and buffer offset checks, §11.7, §11.8), Data-In generation with
//! phase-collapsed status (§11.7.3), NOP-Out/NOP-In both ways (§11.18,
//! §11.19), Text requests with SendTargets (§12.3 of RFC 7143 Appendix C),
//! Logout (§11.14), task management (§11.5) and Reject (§11.17).
//!
//! It does not execute SCSI commands: it hands a complete [`Task`] (CDB plus
//! all Data-Out) to the caller and formats the [`Outcome`] it gets back.
//! Errors of the initiator that break the protocol at ERL 0 (wrong DataSN,
//! offset or TTT, data beyond the burst) end the connection, which is what
//! ERL 0 allows (§7.1.5); malformed or unsupported PDUs get a Reject.

use super::login::Params;
use super::pdu::{self, Pdu, TAG_NONE, op, reject, sn_le, sn_lt};
use super::text;
use std::collections::BTreeMap;
use std::ops::Range;

/// Commands accepted ahead of ExpCmdSN (MaxCmdSN - ExpCmdSN + 1).
pub const CMD_WINDOW: u32 = 64;
/// Largest Data-Out (EDTL) of one command: the largest transfer (a WRITE
/// of 32 MiB, `scsi::TRANSFER_BYTES_MAX`) plus slack.
pub const DATA_OUT_BYTES_MAX: u32 = 33 * 1024 * 1024;
/// Data-Out buffered for all commands of a connection at once; a command
/// that would exceed it is answered TASK SET FULL (SAM-5 §5.3.1).
pub const DATA_OUT_BUFFERED_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Commands waiting for Data-Out at once (bounded by the window anyway).
pub const WRITES_MAX: usize = CMD_WINDOW as usize;
/// Ping data echoed in a NOP-In (bounded by MaxRecvDataSegmentLength too).
pub const PING_BYTES_MAX: usize = 64 * 1024;
/// Room left after a command's Data-Out buffer for a trailer its consumer
/// appends (the internal protocol's payload CRC), so that handing the
/// buffer on to the storage client never reallocates (copies) it.
pub const DATA_OUT_SPARE_BYTES: usize = 4;

/// TMF function codes (§11.5.1) and responses (§11.6.1).
pub mod tmf {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_ACA: u8 = 3;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LUN_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
    pub const TASK_REASSIGN: u8 = 8;
    pub const COMPLETE: u8 = 0;
    pub const NO_TASK: u8 = 1;
    pub const NO_LUN: u8 = 2;
    pub const REASSIGN_NOT_SUPPORTED: u8 = 4;
    pub const NOT_SUPPORTED: u8 = 5;
    pub const REJECTED: u8 = 255;
}

/// A SCSI command with all its Data-Out, ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub itt: u32,
    pub lun: u64,
    pub cdb: [u8; 16],
    /// Expected Data Transfer Length from the initiator (§11.3.4).
    pub edtl: u32,
    pub read: bool,
    pub write: bool,
    pub data: Vec<u8>,
}

/// What executing a task produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: u8,
    /// Sense data (already encoded) with CHECK CONDITION.
    pub sense: Vec<u8>,
    /// Data-In, before truncation to EDTL.
    pub data: Vec<u8>,
    /// For writes: the bytes the command wanted (SPDTL), to compute the
    /// residual against EDTL.
    pub out_wanted: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reset {
    Lun,
    TargetWarm,
    TargetCold,
}

/// The Data-In PDUs of one task (§11.7), with their payload left where it
/// lies: the connection sends each header, then its range of `data`, then
/// pad and digest, in one gathered write, instead of copying the data into
/// every PDU.
#[derive(Debug, PartialEq, Eq)]
pub struct DataIn {
    /// What the command read, already cut to EDTL.
    pub data: Vec<u8>,
    /// Each PDU's header (its own `data` is empty) and the range of `data`
    /// that is its data segment, in order.
    pub pdus: Vec<(Pdu, Range<usize>)>,
}

impl DataIn {
    /// The PDUs with their data segments filled in (a copy: for tests and
    /// the fuzz checks, not the data path).
    pub fn to_pdus(&self) -> Vec<Pdu> {
        self.pdus
            .iter()
            .map(|(p, r)| {
                let mut p = p.clone();
                p.data = self.data[r.clone()].to_vec();
                p
            })
            .collect()
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    Send(Pdu),
    /// Data-In PDUs of one task (before its status, when that is not
    /// collapsed into the last of them).
    DataIn(DataIn),
    Execute(Task),
    /// A task management reset: the caller clears reservations and the
    /// like; this connection's own tasks are already dropped.
    Reset(Reset),
    /// End the connection (after sending what came before).
    Close(&'static str),
}

/// What the session needs to answer discovery.
pub trait Discovery {
    /// (target name, addresses "ip:port,tpgt") visible to `initiator`;
    /// `which` is "All" or one target name.
    fn send_targets(&self, initiator: &str, which: &str) -> Vec<(String, Vec<String>)>;
}

#[derive(Debug)]
struct Burst {
    ttt: u32,
    /// Offset and length of the data this burst carries.
    offset: u32,
    len: u32,
    next_datasn: u32,
    received: u32,
}

#[derive(Debug)]
struct Write {
    task: Task,
    cmd_sn: u32,
    /// Bytes received in order so far.
    received: u32,
    /// The unsolicited burst still expected (§11.3.3 F bit = 0).
    unsolicited: Option<Burst>,
    r2t: Option<Burst>,
    r2tsn: u32,
}

pub struct Session {
    params: Params,
    initiator: String,
    /// Target of a Normal session; discovery sessions have none.
    target: Option<String>,
    exp_cmd_sn: u32,
    stat_sn: u32,
    /// Commands received ahead of ExpCmdSN.
    held: BTreeMap<u32, Pdu>,
    writes: Vec<Write>,
    next_ttt: u32,
    /// Our outstanding NOP-In ping (its TTT).
    ping: Option<u32>,
    /// A long SendTargets answer sent in pieces (TTT, remaining bytes).
    text_rest: Option<(u32, Vec<u8>)>,
    /// Logout accepted: nothing more is processed.
    closing: bool,
}

impl Session {
    pub fn new(
        params: Params,
        initiator: String,
        target: Option<String>,
        exp_cmd_sn: u32,
        stat_sn: u32,
    ) -> Session {
        Session {
            params,
            initiator,
            target,
            exp_cmd_sn,
            stat_sn,
            held: BTreeMap::new(),
            writes: Vec::new(),
            next_ttt: 1,
            ping: None,
            text_rest: None,
            closing: false,
        }
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    fn max_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn.wrapping_add(CMD_WINDOW - 1)
    }

    fn ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == TAG_NONE {
            self.next_ttt = 1;
        }
        t
    }

    /// Fill StatSN/ExpCmdSN/MaxCmdSN of a target PDU; `advance` for PDUs
    /// that carry status (§4.2.2.2).
    fn seal(&mut self, p: &mut Pdu, advance: bool) {
        p.set_u32_at(24, self.stat_sn);
        if advance {
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
        p.set_u32_at(28, self.exp_cmd_sn);
        p.set_u32_at(32, self.max_cmd_sn());
    }

    fn reject(&mut self, bad: &Pdu, reason: u8, out: &mut Vec<Effect>) {
        let mut r = Pdu::new(op::REJECT);
        r.set_flags(pdu::FLAG_FINAL);
        r.bhs[2] = reason;
        r.set_itt(TAG_NONE);
        self.seal(&mut r, false);
        r.data = bad.bhs.to_vec();
        out.push(Effect::Send(r));
    }

    /// A NOP-In ping for an idle initiator (§11.19: TTT set, ITT reserved).
    /// `None` while a previous ping is unanswered: the caller then closes.
    pub fn ping(&mut self) -> Option<Pdu> {
        if self.ping.is_some() {
            return None;
        }
        let ttt = self.ttt();
        self.ping = Some(ttt);
        let mut p = Pdu::new(op::NOP_IN);
        p.set_flags(pdu::FLAG_FINAL);
        p.set_itt(TAG_NONE);
        p.set_u32_at(20, ttt);
        self.seal(&mut p, false);
        Some(p)
    }

    pub fn ping_outstanding(&self) -> bool {
        self.ping.is_some()
    }

    /// Handle one PDU from the initiator.
    pub fn receive(&mut self, p: Pdu, disc: &dyn Discovery, out: &mut Vec<Effect>) {
        if self.closing {
            return;
        }
        match p.opcode() {
            op::DATA_OUT => return self.data_out(p, out),
            op::SNACK_REQUEST => {
                // SNACK needs ERL >= 1 (§11.16).
                return self.reject(&p, reject::PROTOCOL_ERROR, out);
            }
            op::NOP_OUT
            | op::SCSI_COMMAND
            | op::TASK_MGMT_REQUEST
            | op::TEXT_REQUEST
            | op::LOGOUT_REQUEST => {}
            op::LOGIN_REQUEST => {
                // §6.3: a login request in full feature phase is a
                // protocol error.
                return self.reject(&p, reject::PROTOCOL_ERROR, out);
            }
            _ => return self.reject(&p, reject::COMMAND_NOT_SUPPORTED, out),
        }
        // A NOP-Out answering our ping carries ITT 0xffffffff and is
        // immediate; it consumes no CmdSN (§11.18.1).
        if p.opcode() == op::NOP_OUT && p.itt() == TAG_NONE {
            if !p.immediate() {
                return self.reject(&p, reject::PROTOCOL_ERROR, out);
            }
            if self.ping == Some(p.field20()) {
                self.ping = None;
            }
            return;
        }
        let cmd_sn = p.field24();
        if p.immediate() {
            // §4.2.2.1: immediate commands are delivered at once; their
            // CmdSN is ExpCmdSN and does not advance it.
            return self.deliver(p, cmd_sn, disc, out);
        }
        if cmd_sn == self.exp_cmd_sn {
            self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
            self.deliver(p, cmd_sn, disc, out);
            while let Some(next) = self.held.remove(&self.exp_cmd_sn) {
                let sn = self.exp_cmd_sn;
                self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
                self.deliver(next, sn, disc, out);
            }
        } else if sn_lt(self.exp_cmd_sn, cmd_sn) && sn_le(cmd_sn, self.max_cmd_sn()) {
            self.held.insert(cmd_sn, p);
        }
        // Outside the window: silently ignored (§4.2.2.1).
    }

    fn deliver(&mut self, p: Pdu, cmd_sn: u32, disc: &dyn Discovery, out: &mut Vec<Effect>) {
        match p.opcode() {
            op::NOP_OUT => self.nop_out(p, out),
            op::SCSI_COMMAND => self.command(p, cmd_sn, out),
            op::TASK_MGMT_REQUEST => self.task_management(p, out),
            op::TEXT_REQUEST => self.text(p, disc, out),
            op::LOGOUT_REQUEST => self.logout(p, out),
            _ => unreachable!("filtered in receive"),
        }
    }

    fn nop_out(&mut self, p: Pdu, out: &mut Vec<Effect>) {
        let mut r = Pdu::new(op::NOP_IN);
        r.set_flags(pdu::FLAG_FINAL);
        r.bhs[8..16].copy_from_slice(&p.bhs[8..16]);
        r.set_itt(p.itt());
        r.set_u32_at(20, TAG_NONE);
        self.seal(&mut r, true);
        let max = (self.params.initiator_max_recv_data_segment_bytes as usize).min(PING_BYTES_MAX);
        r.data = p.data[..p.data.len().min(max)].to_vec();
        out.push(Effect::Send(r));
    }

    fn command(&mut self, mut p: Pdu, cmd_sn: u32, out: &mut Vec<Effect>) {
        if self.target.is_none() {
            // Discovery sessions carry no SCSI commands (§4.3).
            return self.reject(&p, reject::PROTOCOL_ERROR, out);
        }
        let flags = p.flags();
        let read = flags & pdu::FLAG_READ != 0;
        let write = flags & pdu::FLAG_WRITE != 0;
        let edtl = p.field20();
        let mut cdb = [0u8; 16];
        cdb.copy_from_slice(p.cdb());
        let task = Task {
            itt: p.itt(),
            lun: p.lun(),
            cdb,
            edtl,
            read,
            write,
            data: Vec::new(),
        };
        let immediate = p.data.len() as u32;
        // §11.3.1: data without W, W with EDTL 0 and data, immediate data
        // beyond FirstBurstLength or EDTL, or unsolicited data promised
        // while InitialR2T=Yes, are protocol errors.
        let unsolicited_follows = flags & pdu::FLAG_FINAL == 0;
        if (immediate > 0 && (!write || !self.params.immediate_data))
            || immediate > edtl
            || immediate > self.params.first_burst_bytes
            || (unsolicited_follows && (!write || self.params.initial_r2t))
        {
            return self.reject(&p, reject::PROTOCOL_ERROR, out);
        }
        if self.writes.iter().any(|w| w.task.itt == task.itt) {
            return self.reject(&p, reject::TASK_IN_PROGRESS, out);
        }
        if !write || edtl == 0 {
            return out.push(Effect::Execute(task));
        }
        let buffered: u64 = self.writes.iter().map(|w| w.task.edtl as u64).sum();
        if buffered + edtl as u64 > DATA_OUT_BUFFERED_BYTES_MAX || self.writes.len() >= WRITES_MAX {
            let o = Outcome {
                status: super::scsi::status::TASK_SET_FULL,
                sense: Vec::new(),
                data: Vec::new(),
                out_wanted: edtl,
            };
            return self.complete(&task, o, out);
        }
        if edtl > DATA_OUT_BYTES_MAX {
            // Too large to buffer: answer at once; unsolicited data that
            // still arrives for this ITT is dropped (unknown ITT, TTT none).
            let o = Outcome {
                status: super::scsi::status::CHECK_CONDITION,
                sense: super::scsi::Sense::invalid_cdb().encode(false),
                data: Vec::new(),
                out_wanted: edtl,
            };
            return self.complete(&task, o, out);
        }
        let mut w = Write {
            task,
            cmd_sn,
            received: immediate,
            unsolicited: None,
            r2t: None,
            r2tsn: 0,
        };
        // The immediate data is kept where the connection read it (when
        // more follows, the first Data-Out grows the buffer to the whole
        // transfer once).
        w.task.data = std::mem::take(&mut p.data);
        if unsolicited_follows {
            let first = self.params.first_burst_bytes.min(edtl);
            if first > immediate {
                w.unsolicited = Some(Burst {
                    ttt: TAG_NONE,
                    offset: immediate,
                    len: first - immediate,
                    next_datasn: 0,
                    received: 0,
                });
            }
        }
        self.writes.push(w);
        let i = self.writes.len() - 1;
        self.advance_write(i, out);
    }

    /// After data arrived for write `i`: run it when complete, else solicit
    /// the next burst when nothing is outstanding.
    fn advance_write(&mut self, i: usize, out: &mut Vec<Effect>) {
        let w = &self.writes[i];
        if w.received == w.task.edtl {
            let w = self.writes.remove(i);
            out.push(Effect::Execute(w.task));
            return;
        }
        if w.unsolicited.is_some() || w.r2t.is_some() {
            return;
        }
        let ttt = self.ttt();
        let w = &mut self.writes[i];
        let len = (w.task.edtl - w.received).min(self.params.max_burst_bytes);
        let mut r = Pdu::new(op::R2T);
        r.set_flags(pdu::FLAG_FINAL);
        r.set_lun(w.task.lun);
        r.set_itt(w.task.itt);
        r.set_u32_at(20, ttt);
        r.set_u32_at(36, w.r2tsn);
        r.set_u32_at(40, w.received);
        r.set_u32_at(44, len);
        w.r2tsn += 1;
        w.r2t = Some(Burst {
            ttt,
            offset: w.received,
            len,
            next_datasn: 0,
            received: 0,
        });
        self.seal(&mut r, false);
        out.push(Effect::Send(r));
    }

    fn data_out(&mut self, mut p: Pdu, out: &mut Vec<Effect>) {
        let itt = p.itt();
        let ttt = p.field20();
        let Some(i) = self.writes.iter().position(|w| w.task.itt == itt) else {
            // Unsolicited data for a command already answered (or aborted)
            // is dropped; solicited data for an unknown task is an error.
            if ttt == TAG_NONE {
                return;
            }
            return self.reject(&p, reject::INVALID_PDU_FIELD, out);
        };
        let w = &mut self.writes[i];
        let burst = if ttt == TAG_NONE {
            w.unsolicited.as_mut()
        } else {
            w.r2t.as_mut().filter(|b| b.ttt == ttt)
        };
        // §11.7.4 DataSN counts from 0 in each sequence; with
        // DataPDUInOrder=Yes the offset must be the next byte, and F ends
        // the burst exactly. A Data-Out breaking these is rejected and its
        // command fails (the initiator sees the Reject); the connection
        // stays up for the other tasks.
        let len = p.data.len() as u32;
        let ok = burst.as_ref().is_some_and(|b| {
            p.field36() == b.next_datasn
                && p.field40() == b.offset + b.received
                && b.received + len <= b.len
                && p.final_bit() == (b.received + len == b.len)
        });
        if !ok {
            self.writes.remove(i);
            return self.reject(&p, reject::PROTOCOL_ERROR, out);
        }
        let b = burst.expect("checked");
        b.next_datasn += 1;
        b.received += len;
        let done = b.received == b.len;
        if w.received == 0 && len == w.task.edtl {
            // One Data-Out carries the whole transfer: keep its buffer.
            w.task.data = std::mem::take(&mut p.data);
        } else {
            // Appended: one copy of each Data-Out after the first PDU
            // (reading them straight into place would need the reader to
            // know the session's tasks).
            let whole = w.task.edtl as usize + DATA_OUT_SPARE_BYTES;
            if w.task.data.capacity() < whole {
                w.task.data.reserve_exact(whole - w.task.data.len());
            }
            w.task.data.extend_from_slice(&p.data);
        }
        w.received += len;
        if done {
            if ttt == TAG_NONE {
                w.unsolicited = None;
            } else {
                w.r2t = None;
            }
            self.advance_write(i, out);
        }
    }

    /// Format the answer to a task: Data-In PDUs (status collapsed into the
    /// last one when GOOD) or a SCSI Response (§11.4, §11.7).
    pub fn complete(&mut self, task: &Task, o: Outcome, out: &mut Vec<Effect>) {
        let edtl = task.edtl;
        let (mut flags, mut residual) = (0u8, 0u32);
        let mut data = o.data;
        if task.write && !task.read {
            if o.out_wanted > edtl {
                flags |= pdu::FLAG_OVERFLOW;
                residual = o.out_wanted - edtl;
            } else if o.out_wanted < edtl {
                flags |= pdu::FLAG_UNDERFLOW;
                residual = edtl - o.out_wanted;
            }
            data.clear();
        } else {
            let want = data.len() as u32;
            if want > edtl {
                flags |= pdu::FLAG_OVERFLOW;
                residual = want - edtl;
                data.truncate(edtl as usize);
            } else if want < edtl {
                flags |= pdu::FLAG_UNDERFLOW;
                residual = edtl - want;
            }
            if !task.read {
                // No Data-In possible without R: all of it is residual.
                data.clear();
            }
        }
        let collapse = o.status == super::scsi::status::GOOD && o.sense.is_empty();
        let seg = self.params.initiator_max_recv_data_segment_bytes.max(512) as usize;
        let burst = self.params.max_burst_bytes.max(512) as usize;
        let n = data.len();
        let mut datasn = 0u32;
        let mut off = 0usize;
        let mut pdus = Vec::with_capacity(n.div_ceil(seg));
        while off < n {
            let end = (off + seg).min(n).min((off / burst + 1) * burst);
            let last = end == n;
            let mut d = Pdu::new(op::DATA_IN);
            let mut f = 0u8;
            if last || end.is_multiple_of(burst) {
                f |= pdu::FLAG_FINAL;
            }
            d.set_lun(task.lun);
            d.set_itt(task.itt);
            d.set_u32_at(20, TAG_NONE);
            d.set_u32_at(36, datasn);
            d.set_u32_at(40, off as u32);
            if last && collapse {
                f |= pdu::FLAG_FINAL | pdu::FLAG_STATUS | flags;
                d.bhs[3] = o.status;
                d.set_u32_at(44, residual);
                d.set_flags(f);
                self.seal(&mut d, true);
                pdus.push((d, off..end));
                out.push(Effect::DataIn(DataIn { data, pdus }));
                return;
            }
            d.set_flags(f);
            self.seal(&mut d, false);
            pdus.push((d, off..end));
            datasn += 1;
            off = end;
        }
        if !pdus.is_empty() {
            out.push(Effect::DataIn(DataIn { data, pdus }));
        }
        let mut r = Pdu::new(op::SCSI_RESPONSE);
        r.set_flags(pdu::FLAG_FINAL | flags);
        r.bhs[2] = 0; // command completed at target
        r.bhs[3] = o.status;
        r.set_itt(task.itt);
        r.set_u32_at(36, datasn);
        r.set_u32_at(44, residual);
        if !o.sense.is_empty() {
            let mut seg = (o.sense.len() as u16).to_be_bytes().to_vec();
            seg.extend_from_slice(&o.sense);
            r.data = seg;
        }
        self.seal(&mut r, true);
        out.push(Effect::Send(r));
    }

    fn task_management(&mut self, p: Pdu, out: &mut Vec<Effect>) {
        let function = p.flags() & 0x7f;
        let rtt = p.field20();
        let ref_cmd_sn = p.field32();
        let lun = p.lun();
        let mut response = tmf::COMPLETE;
        let mut effect = None;
        match function {
            tmf::ABORT_TASK => {
                let before = self.writes.len();
                self.writes.retain(|w| w.task.itt != rtt);
                let held_before = self.held.len();
                self.held
                    .retain(|_, q| !(q.opcode() == op::SCSI_COMMAND && q.itt() == rtt));
                if before == self.writes.len() && held_before == self.held.len() {
                    // §11.6.1 b/c: unknown task; "complete" when RefCmdSN
                    // is in the window and older than this request.
                    let tmf_sn = p.field24();
                    // A completed command's CmdSN is below ExpCmdSN, so
                    // outside the window: "task does not exist".
                    let in_window = sn_le(self.exp_cmd_sn, ref_cmd_sn)
                        && sn_le(ref_cmd_sn, self.max_cmd_sn())
                        && sn_lt(ref_cmd_sn, tmf_sn);
                    response = if in_window {
                        tmf::COMPLETE
                    } else {
                        tmf::NO_TASK
                    };
                }
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET => {
                if lun != 0 {
                    response = tmf::NO_LUN;
                } else {
                    self.writes.clear();
                    self.held.retain(|_, q| q.opcode() != op::SCSI_COMMAND);
                }
            }
            tmf::CLEAR_ACA => response = tmf::NOT_SUPPORTED,
            tmf::LUN_RESET => {
                if lun != 0 {
                    response = tmf::NO_LUN;
                } else {
                    self.writes.clear();
                    self.held.retain(|_, q| q.opcode() != op::SCSI_COMMAND);
                    effect = Some(Reset::Lun);
                }
            }
            tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                self.writes.clear();
                self.held.retain(|_, q| q.opcode() != op::SCSI_COMMAND);
                effect = Some(if function == tmf::TARGET_WARM_RESET {
                    Reset::TargetWarm
                } else {
                    Reset::TargetCold
                });
            }
            tmf::TASK_REASSIGN => response = tmf::REASSIGN_NOT_SUPPORTED,
            _ => response = tmf::REJECTED,
        }
        if let Some(e) = effect {
            out.push(Effect::Reset(e));
        }
        let mut r = Pdu::new(op::TASK_MGMT_RESPONSE);
        r.set_flags(pdu::FLAG_FINAL);
        r.bhs[2] = response;
        r.set_itt(p.itt());
        self.seal(&mut r, true);
        out.push(Effect::Send(r));
        if effect == Some(Reset::TargetCold) {
            // SAM-5 §5.11.8: a cold reset ends every I_T nexus.
            out.push(Effect::Close("target cold reset"));
        }
    }

    fn text(&mut self, p: Pdu, disc: &dyn Discovery, out: &mut Vec<Effect>) {
        let ttt = p.field20();
        let mut answer: Vec<u8>;
        if ttt != TAG_NONE {
            // Continuation of a long answer (§11.10.4).
            match self.text_rest.take() {
                Some((t, rest)) if t == ttt => answer = rest,
                _ => return self.reject(&p, reject::INVALID_PDU_FIELD, out),
            }
        } else {
            self.text_rest = None;
            if p.flags() & pdu::FLAG_CONTINUE != 0 {
                // Multi-PDU text requests are not needed by any key we
                // support.
                return self.reject(&p, reject::COMMAND_NOT_SUPPORTED, out);
            }
            let Ok(pairs) = text::parse(&p.data) else {
                return self.reject(&p, reject::PROTOCOL_ERROR, out);
            };
            let mut resp: Vec<(String, String)> = Vec::new();
            for (k, v) in &pairs {
                if k == "SendTargets" {
                    // §C: "All" only in discovery sessions; empty means the
                    // session's own target.
                    let which = match (v.as_str(), &self.target) {
                        ("All", None) => "All".to_string(),
                        ("All", Some(_)) => continue,
                        ("", Some(t)) => t.clone(),
                        ("", None) => continue,
                        (name, _) => name.to_string(),
                    };
                    for (name, addrs) in disc.send_targets(&self.initiator, &which) {
                        resp.push(("TargetName".into(), name));
                        for a in addrs {
                            resp.push(("TargetAddress".into(), a));
                        }
                    }
                } else {
                    resp.push((k.clone(), "NotUnderstood".into()));
                }
            }
            answer = text::encode(&resp);
        }
        let max = self.params.initiator_max_recv_data_segment_bytes as usize;
        let mut r = Pdu::new(op::TEXT_RESPONSE);
        r.set_itt(p.itt());
        r.bhs[8..16].copy_from_slice(&p.bhs[8..16]);
        if answer.len() > max {
            let rest = answer.split_off(max);
            let t = self.ttt();
            self.text_rest = Some((t, rest));
            r.set_flags(pdu::FLAG_CONTINUE);
            r.set_u32_at(20, t);
        } else {
            r.set_flags(pdu::FLAG_FINAL);
            r.set_u32_at(20, TAG_NONE);
        }
        r.data = answer;
        self.seal(&mut r, true);
        out.push(Effect::Send(r));
    }

    fn logout(&mut self, p: Pdu, out: &mut Vec<Effect>) {
        let reason = p.flags() & 0x7f;
        // §11.15.1: 0 success; 2 connection recovery not supported (ERL 0).
        let response = match reason {
            0 | 1 => 0,
            2 => 2,
            _ => return self.reject(&p, reject::INVALID_PDU_FIELD, out),
        };
        let mut r = Pdu::new(op::LOGOUT_RESPONSE);
        r.set_flags(pdu::FLAG_FINAL);
        r.bhs[2] = response;
        r.set_itt(p.itt());
        self.seal(&mut r, true);
        out.push(Effect::Send(r));
        if response == 0 {
            self.closing = true;
            self.writes.clear();
            out.push(Effect::Close("logout"));
        }
    }

    /// Commands waiting for Data-Out (for tests and metrics).
    pub fn writes_pending(&self) -> usize {
        self.writes.len()
    }

    /// CmdSN of the oldest command waiting for data (diagnostics).
    pub fn oldest_write_cmd_sn(&self) -> Option<u32> {
        self.writes.first().map(|w| w.cmd_sn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::login::Offer;

    struct NoDisc;
    impl Discovery for NoDisc {
        fn send_targets(&self, _i: &str, which: &str) -> Vec<(String, Vec<String>)> {
            if which == "All" || which == "iqn.t:a" {
                vec![("iqn.t:a".into(), vec!["127.0.0.1:3260,1".into()])]
            } else {
                vec![]
            }
        }
    }

    fn params() -> Params {
        let mut p = Params::rfc_defaults(&Offer::default());
        p.initial_r2t = false;
        p.first_burst_bytes = 1024;
        p.max_burst_bytes = 2048;
        p.initiator_max_recv_data_segment_bytes = 1024;
        p
    }

    fn session() -> Session {
        Session::new(params(), "iqn.i".into(), Some("iqn.t:a".into()), 10, 100)
    }

    fn cmd(cmd_sn: u32, itt: u32, flags: u8, edtl: u32, data: usize) -> Pdu {
        let mut p = Pdu::new(op::SCSI_COMMAND);
        p.set_flags(flags);
        p.set_itt(itt);
        p.set_u32_at(20, edtl);
        p.set_u32_at(24, cmd_sn);
        p.bhs[32] = 0x2a;
        p.data = vec![0xaa; data];
        p
    }

    fn data_out(itt: u32, ttt: u32, datasn: u32, offset: u32, len: usize, fin: bool) -> Pdu {
        let mut p = Pdu::new(op::DATA_OUT);
        p.set_flags(if fin { pdu::FLAG_FINAL } else { 0 });
        p.set_itt(itt);
        p.set_u32_at(20, ttt);
        p.set_u32_at(36, datasn);
        p.set_u32_at(40, offset);
        p.data = vec![0xbb; len];
        p
    }

    fn run(s: &mut Session, p: Pdu) -> Vec<Effect> {
        let mut out = Vec::new();
        s.receive(p, &NoDisc, &mut out);
        out
    }

    // Proves the window: in-order commands run, a gap is held until filled,
    // and CmdSN outside [ExpCmdSN, MaxCmdSN] is silently ignored.
    #[test]
    fn command_window() {
        let mut s = session();
        assert_eq!(run(&mut s, cmd(11, 2, 0x80 | 0x40, 0, 0)).len(), 0, "held");
        let e = run(&mut s, cmd(10, 1, 0x80 | 0x40, 0, 0));
        assert!(
            matches!(&e[..], [Effect::Execute(a), Effect::Execute(b)] if a.itt == 1 && b.itt == 2)
        );
        assert!(
            run(&mut s, cmd(12 + CMD_WINDOW, 3, 0xc0, 0, 0)).is_empty(),
            "too high"
        );
        assert!(run(&mut s, cmd(5, 4, 0xc0, 0, 0)).is_empty(), "too low");
        let mut imm = cmd(99, 5, 0xc0, 0, 0);
        imm.set_immediate();
        assert_eq!(run(&mut s, imm).len(), 1, "immediate ignores the window");
    }

    // Proves immediate + unsolicited + solicited data are gathered in order:
    // 256 immediate, unsolicited to FirstBurstLength (1024), then R2Ts of at
    // most MaxBurstLength (2048) with R2TSN counting.
    #[test]
    fn write_with_r2t() {
        let mut s = session();
        let e = run(&mut s, cmd(10, 7, pdu::FLAG_WRITE, 4096, 256));
        assert!(e.is_empty());
        let e = run(&mut s, data_out(7, TAG_NONE, 0, 256, 768, true));
        let [Effect::Send(r2t)] = &e[..] else {
            panic!("{e:?}")
        };
        assert_eq!(r2t.opcode(), op::R2T);
        assert_eq!(
            (r2t.field36(), r2t.field40(), r2t.field44()),
            (0, 1024, 2048)
        );
        let ttt = r2t.field20();
        let e = run(&mut s, data_out(7, ttt, 0, 1024, 1024, false));
        assert!(e.is_empty());
        let e = run(&mut s, data_out(7, ttt, 1, 2048, 1024, true));
        let [Effect::Send(r2)] = &e[..] else { panic!() };
        assert_eq!((r2.field36(), r2.field40(), r2.field44()), (1, 3072, 1024));
        let e = run(&mut s, data_out(7, r2.field20(), 0, 3072, 1024, true));
        let [Effect::Execute(t)] = &e[..] else {
            panic!()
        };
        assert_eq!(t.data.len(), 4096);
        assert_eq!(t.data[0], 0xaa);
        assert_eq!(t.data[300], 0xbb);
    }

    // Proves a write's data is not copied when one PDU carries all of it:
    // immediate data, or a single Data-Out after an R2T, reach the task in
    // the buffer they were read into.
    #[test]
    fn write_data_kept_in_place() {
        let mut s = session();
        let p = cmd(10, 7, pdu::FLAG_WRITE | pdu::FLAG_FINAL, 512, 512);
        let at = p.data.as_ptr();
        let e = run(&mut s, p);
        let [Effect::Execute(t)] = &e[..] else {
            panic!("{e:?}")
        };
        assert_eq!(t.data.as_ptr(), at);
        let e = run(
            &mut s,
            cmd(11, 8, pdu::FLAG_WRITE | pdu::FLAG_FINAL, 2048, 0),
        );
        let [Effect::Send(r2t)] = &e[..] else {
            panic!("{e:?}")
        };
        let d = data_out(8, r2t.field20(), 0, 0, 2048, true);
        let at = d.data.as_ptr();
        let e = run(&mut s, d);
        let [Effect::Execute(t)] = &e[..] else {
            panic!("{e:?}")
        };
        assert_eq!((t.data.as_ptr(), t.data.len()), (at, 2048));
    }

    // Proves a wrong DataSN, a wrong offset or F bit reject the Data-Out and
    // fail its command, and unsolicited data for an unknown task is dropped.
    #[test]
    fn data_out_checks() {
        let mut s = session();
        run(&mut s, cmd(10, 7, pdu::FLAG_WRITE, 1024, 0));
        let e = run(&mut s, data_out(7, TAG_NONE, 1, 0, 512, false));
        assert!(matches!(&e[..], [Effect::Send(r)] if r.opcode() == op::REJECT));
        assert_eq!(s.writes_pending(), 0, "the command failed");
        let mut s = session();
        run(&mut s, cmd(10, 7, pdu::FLAG_WRITE, 1024, 0));
        let e = run(&mut s, data_out(7, TAG_NONE, 0, 512, 512, false));
        assert!(matches!(&e[..], [Effect::Send(r)] if r.opcode() == op::REJECT));
        let mut s = session();
        run(&mut s, cmd(10, 7, pdu::FLAG_WRITE, 1024, 0));
        let e = run(&mut s, data_out(7, TAG_NONE, 0, 0, 512, true));
        assert!(
            matches!(&e[..], [Effect::Send(r)] if r.opcode() == op::REJECT),
            "early F bit"
        );
        let mut s = session();
        assert!(run(&mut s, data_out(9, TAG_NONE, 0, 0, 512, true)).is_empty());
        let e = run(&mut s, data_out(9, 1234, 0, 0, 512, true));
        assert!(matches!(&e[..], [Effect::Send(r)] if r.opcode() == op::REJECT));
    }

    // Proves Data-In splitting at MaxRecvDataSegmentLength, F at each burst
    // end, and phase-collapsed status with underflow residual on the last.
    #[test]
    fn data_in_collapsed() {
        let mut s = session();
        let t = Task {
            itt: 3,
            lun: 0,
            cdb: [0; 16],
            edtl: 3000,
            read: true,
            write: false,
            data: vec![],
        };
        let mut out = Vec::new();
        s.complete(
            &t,
            Outcome {
                status: 0,
                sense: vec![],
                data: vec![1; 2500],
                out_wanted: 0,
            },
            &mut out,
        );
        let [Effect::DataIn(di)] = &out[..] else {
            panic!("{out:?}")
        };
        let pdus = di.to_pdus();
        assert_eq!(pdus.len(), 3);
        assert_eq!(pdus[0].data.len(), 1024);
        assert_eq!(pdus[2].data.len(), 2500 - 2048);
        assert_eq!(
            pdus[1].flags() & pdu::FLAG_FINAL,
            pdu::FLAG_FINAL,
            "burst end at 2048"
        );
        let last = &pdus[2];
        assert_eq!(
            last.flags(),
            pdu::FLAG_FINAL | pdu::FLAG_STATUS | pdu::FLAG_UNDERFLOW
        );
        assert_eq!(last.field44(), 500);
        assert_eq!(last.field36(), 2);
        assert_eq!(last.field24(), 100, "StatSN only on the status PDU");
    }

    // Proves CHECK CONDITION goes in a SCSI Response with SenseLength and
    // overflow residual when the command wanted more than EDTL.
    #[test]
    fn check_condition_response() {
        let mut s = session();
        let t = Task {
            itt: 3,
            lun: 0,
            cdb: [0; 16],
            edtl: 512,
            read: false,
            write: true,
            data: vec![],
        };
        let mut out = Vec::new();
        s.complete(
            &t,
            Outcome {
                status: 2,
                sense: vec![0x70, 0, 5],
                data: vec![],
                out_wanted: 1024,
            },
            &mut out,
        );
        let [Effect::Send(r)] = &out[..] else {
            panic!()
        };
        assert_eq!(r.opcode(), op::SCSI_RESPONSE);
        assert_eq!(r.bhs[3], 2);
        assert_eq!(r.flags(), 0x80 | pdu::FLAG_OVERFLOW);
        assert_eq!(r.field44(), 512);
        assert_eq!(&r.data[..], &[0, 3, 0x70, 0, 5]);
    }

    // Proves NOP-Out ping echo, our own ping and its answer.
    #[test]
    fn nops() {
        let mut s = session();
        let mut p = Pdu::new(op::NOP_OUT);
        p.set_immediate();
        p.set_flags(0x80);
        p.set_itt(5);
        p.set_u32_at(20, TAG_NONE);
        p.set_u32_at(24, 10);
        p.data = b"hello".to_vec();
        let e = run(&mut s, p);
        let [Effect::Send(r)] = &e[..] else { panic!() };
        assert_eq!(
            (r.opcode(), r.itt(), &r.data[..]),
            (op::NOP_IN, 5, &b"hello"[..])
        );
        let ping = s.ping().unwrap();
        assert!(s.ping().is_none());
        let mut a = Pdu::new(op::NOP_OUT);
        a.set_immediate();
        a.set_itt(TAG_NONE);
        a.set_u32_at(20, ping.field20());
        assert!(run(&mut s, a).is_empty());
        assert!(!s.ping_outstanding());
    }

    // Proves SendTargets in a discovery session and NotUnderstood keys.
    #[test]
    fn send_targets() {
        let mut s = Session::new(params(), "iqn.i".into(), None, 1, 1);
        let mut p = Pdu::new(op::TEXT_REQUEST);
        p.set_immediate();
        p.set_flags(0x80);
        p.set_itt(1);
        p.set_u32_at(20, TAG_NONE);
        p.data = b"SendTargets=All\0X-foo=1\0".to_vec();
        let e = run(&mut s, p);
        let [Effect::Send(r)] = &e[..] else { panic!() };
        let pairs = text::parse(&r.data).unwrap();
        assert_eq!(text::get(&pairs, "TargetName"), Some("iqn.t:a"));
        assert_eq!(text::get(&pairs, "TargetAddress"), Some("127.0.0.1:3260,1"));
        assert_eq!(text::get(&pairs, "X-foo"), Some("NotUnderstood"));
    }

    // Proves ABORT TASK drops a write waiting for data, and answers "task
    // does not exist" for a tag outside the window; LUN RESET signals reset.
    #[test]
    fn task_management() {
        let mut s = session();
        run(&mut s, cmd(10, 7, pdu::FLAG_WRITE, 4096, 0));
        assert_eq!(s.writes_pending(), 1);
        let mut t = Pdu::new(op::TASK_MGMT_REQUEST);
        t.set_immediate();
        t.set_flags(0x80 | tmf::ABORT_TASK);
        t.set_itt(8);
        t.set_u32_at(20, 7);
        t.set_u32_at(24, 11);
        t.set_u32_at(32, 10);
        let e = run(&mut s, t.clone());
        let [Effect::Send(r)] = &e[..] else { panic!() };
        assert_eq!(r.bhs[2], tmf::COMPLETE);
        assert_eq!(s.writes_pending(), 0);
        t.set_u32_at(32, 5000);
        let e = run(&mut s, t.clone());
        let [Effect::Send(r)] = &e[..] else { panic!() };
        assert_eq!(r.bhs[2], tmf::NO_TASK);
        t.set_flags(0x80 | tmf::LUN_RESET);
        let e = run(&mut s, t);
        assert!(matches!(
            &e[..],
            [Effect::Reset(Reset::Lun), Effect::Send(_)]
        ));
    }

    // Proves unsupported opcodes and SNACK get a Reject carrying the header,
    // and Logout closes after its response.
    #[test]
    fn reject_and_logout() {
        let mut s = session();
        let bad = Pdu::new(0x1c);
        let e = run(&mut s, bad.clone());
        let [Effect::Send(r)] = &e[..] else { panic!() };
        assert_eq!(
            (r.opcode(), r.bhs[2]),
            (op::REJECT, reject::COMMAND_NOT_SUPPORTED)
        );
        assert_eq!(&r.data[..], &bad.bhs[..]);
        let mut l = Pdu::new(op::LOGOUT_REQUEST);
        l.set_immediate();
        l.set_flags(0x80);
        l.set_itt(1);
        let e = run(&mut s, l);
        assert!(matches!(&e[..], [Effect::Send(_), Effect::Close("logout")]));
    }
}
