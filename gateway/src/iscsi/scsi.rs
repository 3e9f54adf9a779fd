//! The SCSI command layer, pure parts: CDB decoding and validation
//! (SPC-4, SBC-4), sense data (SPC-4 §4.5), and the data of every answer
//! that does not need the volume's contents (INQUIRY and its VPD pages, READ
//! CAPACITY, MODE SENSE, REPORT LUNS, REPORT SUPPORTED OPERATION CODES, GET
//! LBA STATUS).
//!
//! [`decode`] turns a CDB into a [`Command`] or the sense data to answer
//! with; every out-of-range LBA, reserved bit we check, unsupported field
//! or unknown opcode gets ILLEGAL REQUEST with the right additional sense
//! code. Execution against a volume is in `iscsi::exec`.

/// SAM-5 status codes.
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const CONDITION_MET: u8 = 0x04;
    pub const BUSY: u8 = 0x08;
    pub const RESERVATION_CONFLICT: u8 = 0x18;
    pub const TASK_SET_FULL: u8 = 0x28;
    pub const TASK_ABORTED: u8 = 0x40;
}

/// SPC-4 §4.5.6 sense keys.
pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const ABORTED_COMMAND: u8 = 0xb;
    pub const MISCOMPARE: u8 = 0xe;
}

/// Additional sense code and qualifier pairs (SPC-4 Annex D).
pub mod asc {
    pub const NONE: u16 = 0x0000;
    pub const WRITE_ERROR: u16 = 0x0c00;
    pub const UNRECOVERED_READ_ERROR: u16 = 0x1100;
    pub const PARAMETER_LIST_LENGTH_ERROR: u16 = 0x1a00;
    pub const MISCOMPARE_DURING_VERIFY: u16 = 0x1d00;
    pub const INVALID_OPCODE: u16 = 0x2000;
    pub const LBA_OUT_OF_RANGE: u16 = 0x2100;
    pub const INVALID_FIELD_IN_CDB: u16 = 0x2400;
    pub const LU_NOT_SUPPORTED: u16 = 0x2500;
    pub const INVALID_FIELD_IN_PARAMETER_LIST: u16 = 0x2600;
    pub const INVALID_RELEASE_OF_PR: u16 = 0x2604;
    pub const SPACE_ALLOCATION_FAILED: u16 = 0x2707;
    pub const POWER_ON_RESET: u16 = 0x2900;
    pub const BUS_DEVICE_RESET: u16 = 0x2903;
    pub const MODE_PARAMETERS_CHANGED: u16 = 0x2a01;
    pub const RESERVATIONS_PREEMPTED: u16 = 0x2a03;
    pub const RESERVATIONS_RELEASED: u16 = 0x2a04;
    pub const REGISTRATIONS_PREEMPTED: u16 = 0x2a05;
    pub const COMMANDS_CLEARED_BY_ANOTHER_INITIATOR: u16 = 0x2f00;
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: u16 = 0x3900;
    pub const MEDIUM_NOT_PRESENT: u16 = 0x3a00;
    pub const INTERNAL_TARGET_FAILURE: u16 = 0x4400;
    pub const INVALID_FIELD_IN_INFORMATION_UNIT: u16 = 0x0e03;
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: u16 = 0x5504;
    pub const TIMEOUT_ON_LOGICAL_UNIT: u16 = 0x3e02;
    pub const LU_COMMUNICATION_FAILURE: u16 = 0x0800;
}

/// Sense data to report with CHECK CONDITION.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u16,
    /// INFORMATION field (e.g. the offset of a miscompare), when valid.
    pub info: Option<u64>,
    /// Sense-key specific field pointer (SPC-4 §4.5.2.4.2): the CDB byte
    /// holding the invalid field, when one is named.
    pub field: Option<u16>,
}

impl Sense {
    pub const fn new(key: u8, asc: u16) -> Sense {
        Sense {
            key,
            asc,
            info: None,
            field: None,
        }
    }
    /// INVALID FIELD IN CDB pointing at CDB byte `byte` (C/D=1, no bit
    /// pointer).
    pub const fn invalid_cdb_at(byte: u16) -> Sense {
        let mut s = Sense::invalid_cdb();
        s.field = Some(byte);
        s
    }
    /// A miscompare at byte `offset` of the compared data.
    pub const fn miscompare(offset: u64) -> Sense {
        let mut s = Sense::new(key::MISCOMPARE, asc::MISCOMPARE_DURING_VERIFY);
        s.info = Some(offset);
        s
    }
    /// The three sense-key specific bytes: SKSV, C/D=1, field pointer.
    fn sense_key_specific(&self) -> Option<[u8; 3]> {
        let f = self.field?;
        Some([0x80 | 0x40, (f >> 8) as u8, f as u8])
    }
    pub const fn illegal(asc: u16) -> Sense {
        Sense::new(key::ILLEGAL_REQUEST, asc)
    }
    pub const fn invalid_cdb() -> Sense {
        Sense::illegal(asc::INVALID_FIELD_IN_CDB)
    }

    /// Fixed format (SPC-4 §4.5.3, response code 70h) or descriptor format
    /// (§4.5.2, 72h) as the control mode page's D_SENSE selects.
    pub fn encode(&self, descriptor: bool) -> Vec<u8> {
        if descriptor {
            let mut s = vec![0u8; 8];
            s[0] = 0x72;
            s[1] = self.key;
            s[2] = (self.asc >> 8) as u8;
            s[3] = self.asc as u8;
            if let Some(info) = self.info {
                // Information sense data descriptor (§4.5.2.2).
                s.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
                s.extend_from_slice(&info.to_be_bytes());
            }
            if let Some(sks) = self.sense_key_specific() {
                // Sense key specific sense data descriptor (§4.5.2.4).
                s.extend_from_slice(&[0x02, 0x06, 0, 0]);
                s.extend_from_slice(&sks);
                s.push(0);
            }
            s[7] = (s.len() - 8) as u8;
            s
        } else {
            let mut s = vec![0u8; 18];
            s[0] = 0x70;
            s[2] = self.key;
            if let Some(info) = self.info {
                s[0] |= 0x80; // VALID
                s[3..7].copy_from_slice(&(info.min(u32::MAX as u64) as u32).to_be_bytes());
            }
            s[7] = 10; // additional sense length
            s[12] = (self.asc >> 8) as u8;
            s[13] = self.asc as u8;
            if let Some(sks) = self.sense_key_specific() {
                s[15..18].copy_from_slice(&sks);
            }
            s
        }
    }
}

/// Operation codes (SPC-4 / SBC-4).
pub mod opc {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8a;
    pub const ORWRITE_16: u8 = 0x8b;
    pub const WRITE_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_VERIFY_12: u8 = 0xae;
    pub const VERIFY_12: u8 = 0xaf;
    // Service actions.
    pub const SA_READ_CAPACITY_16: u8 = 0x10;
    pub const SA_GET_LBA_STATUS: u8 = 0x12;
    pub const SA_REPORT_SUPPORTED_OPCODES: u8 = 0x0c;
}

/// What the device looks like to the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u32,
    pub blocks: u64,
}

/// Named limits the device reports in the Block Limits VPD page.
/// Maximum bytes per READ/WRITE (VPD B0h MAXIMUM TRANSFER LENGTH): 32 MiB;
/// the volume splits it into chunk-sized internal requests.
pub const TRANSFER_BYTES_MAX: u64 = 32 * 1024 * 1024;
/// MAXIMUM COMPARE AND WRITE LENGTH (blocks; one byte in the CDB).
pub const COMPARE_AND_WRITE_BLOCKS_MAX: u32 = 255;
/// UNMAP limits: descriptors per command and blocks per command.
pub const UNMAP_DESCRIPTORS_MAX: u32 = 256;
pub const UNMAP_BYTES_MAX: u64 = 256 << 20;
/// WRITE SAME: MAXIMUM WRITE SAME LENGTH in bytes.
pub const WRITE_SAME_BYTES_MAX: u64 = 1 << 30;
/// Parameter lists (UNMAP, MODE SELECT, PR OUT) we accept.
pub const PARAMETER_LIST_BYTES_MAX: u32 = 64 * 1024;

impl Geometry {
    pub fn transfer_blocks_max(&self) -> u64 {
        TRANSFER_BYTES_MAX / self.block_size as u64
    }
    pub fn unmap_blocks_max(&self) -> u64 {
        UNMAP_BYTES_MAX / self.block_size as u64
    }
    pub fn write_same_blocks_max(&self) -> u64 {
        WRITE_SAME_BYTES_MAX / self.block_size as u64
    }
}

/// Data transfer direction and size a command needs (its SPDTL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    None,
    /// Data-In of at most this many bytes (allocation length or blocks).
    In(u32),
    /// Data-Out of exactly this many bytes.
    Out(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rw {
    pub lba: u64,
    pub blocks: u32,
    pub fua: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    TestUnitReady,
    RequestSense {
        descriptor: bool,
        alloc: u32,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc: u32,
    },
    ReadCapacity10,
    ReadCapacity16 {
        alloc: u32,
    },
    Read(Rw),
    Write(Rw),
    /// VERIFY: with `bytchk` the Data-Out is compared to the medium.
    Verify {
        rw: Rw,
        bytchk: bool,
    },
    WriteVerify {
        rw: Rw,
        bytchk: bool,
    },
    SynchronizeCache,
    PreFetch {
        lba: u64,
        blocks: u32,
    },
    WriteSame {
        lba: u64,
        blocks: u64,
        unmap: bool,
        ndob: bool,
    },
    Unmap {
        len: u32,
    },
    GetLbaStatus {
        lba: u64,
        alloc: u32,
    },
    CompareAndWrite(Rw),
    /// ORWRITE(16): OR the Data-Out into the medium, atomically.
    OrWrite(Rw),
    ModeSense {
        ten: bool,
        dbd: bool,
        llbaa: bool,
        pc: u8,
        page: u8,
        subpage: u8,
        alloc: u32,
    },
    ModeSelect {
        ten: bool,
        len: u32,
    },
    StartStopUnit,
    PreventAllow,
    PrIn {
        action: u8,
        alloc: u32,
    },
    PrOut {
        action: u8,
        scope: u8,
        kind: u8,
        len: u32,
    },
    Reserve,
    Release,
    ReportLuns {
        alloc: u32,
    },
    ReportSupportedOpcodes {
        rctd: bool,
        options: u8,
        opcode: u8,
        action: u16,
        alloc: u32,
    },
}

fn be16(b: &[u8]) -> u32 {
    u16::from_be_bytes([b[0], b[1]]) as u32
}
fn be24(b: &[u8]) -> u32 {
    u32::from_be_bytes([0, b[0], b[1], b[2]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// CDB length by opcode group (SPC-4 §4.2.5.1).
pub fn cdb_len(opcode: u8) -> usize {
    match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 16,
    }
}

/// The LBA range check every medium-access command makes (SBC-4 §4.5).
fn check_range(g: &Geometry, lba: u64, blocks: u64) -> Result<(), Sense> {
    if lba > g.blocks || blocks > g.blocks - lba {
        return Err(Sense::illegal(asc::LBA_OUT_OF_RANGE));
    }
    Ok(())
}

fn rw(g: &Geometry, lba: u64, blocks: u32, flags: u8, protect_ok: bool) -> Result<Rw, Sense> {
    // RDPROTECT/WRPROTECT/VRPROTECT (bits 7..5): we have no protection
    // information, so any non-zero value is an invalid field (SBC-4 §5.15).
    if flags >> 5 != 0 && !protect_ok {
        return Err(Sense::invalid_cdb());
    }
    check_range(g, lba, blocks as u64)?;
    if blocks as u64 > g.transfer_blocks_max() {
        return Err(Sense::invalid_cdb());
    }
    Ok(Rw {
        lba,
        blocks,
        fua: flags & 0x08 != 0,
    })
}

/// Decode and validate a CDB (`cdb` is the 16-byte field of the SCSI
/// Command PDU).
pub fn decode(cdb: &[u8], g: &Geometry) -> Result<Command, Sense> {
    assert!(cdb.len() >= 16);
    let op = cdb[0];
    // Control byte: NACA (bit 2) asks for ACA, which we do not support
    // (SAM-5 §5.9; NORMACA=0 in INQUIRY). LINK (bit 0) is obsolete.
    let control = cdb[cdb_len(op) - 1];
    if control & 0x05 != 0 {
        return Err(Sense::invalid_cdb());
    }
    use Command::*;
    Ok(match op {
        opc::TEST_UNIT_READY => TestUnitReady,
        opc::REQUEST_SENSE => RequestSense {
            descriptor: cdb[1] & 1 != 0,
            alloc: cdb[4] as u32,
        },
        opc::INQUIRY => {
            let evpd = cdb[1] & 1 != 0;
            // CMDDT (bit 1) is obsolete: invalid when set.
            if cdb[1] & 0xfe != 0 || (!evpd && cdb[2] != 0) {
                return Err(Sense::invalid_cdb());
            }
            Inquiry {
                evpd,
                page: cdb[2],
                alloc: be16(&cdb[3..]),
            }
        }
        opc::READ_CAPACITY_10 => {
            // PMI (bit 0 of byte 8) with a non-zero LBA is obsolete usage.
            if cdb[8] & 1 == 0 && be32(&cdb[2..]) != 0 {
                return Err(Sense::invalid_cdb());
            }
            ReadCapacity10
        }
        opc::SERVICE_ACTION_IN_16 => match cdb[1] & 0x1f {
            opc::SA_READ_CAPACITY_16 => ReadCapacity16 {
                alloc: be32(&cdb[10..]),
            },
            opc::SA_GET_LBA_STATUS => {
                let lba = be64(&cdb[2..]);
                if lba >= g.blocks {
                    return Err(Sense::illegal(asc::LBA_OUT_OF_RANGE));
                }
                GetLbaStatus {
                    lba,
                    alloc: be32(&cdb[10..]),
                }
            }
            _ => return Err(Sense::invalid_cdb_at(1)),
        },
        opc::READ_6 | opc::WRITE_6 => {
            let lba = (be24(&cdb[1..]) & 0x1f_ffff) as u64;
            // SBC-4 §5.21: a TRANSFER LENGTH of 0 means 256 blocks.
            let blocks = if cdb[4] == 0 { 256 } else { cdb[4] as u32 };
            let r = rw(g, lba, blocks, 0, true)?;
            if op == opc::READ_6 { Read(r) } else { Write(r) }
        }
        opc::READ_10
        | opc::WRITE_10
        | opc::READ_12
        | opc::WRITE_12
        | opc::READ_16
        | opc::WRITE_16 => {
            let (lba, blocks) = match op {
                opc::READ_10 | opc::WRITE_10 => (be32(&cdb[2..]) as u64, be16(&cdb[7..])),
                opc::READ_12 | opc::WRITE_12 => (be32(&cdb[2..]) as u64, be32(&cdb[6..])),
                _ => (be64(&cdb[2..]), be32(&cdb[10..])),
            };
            let r = rw(g, lba, blocks, cdb[1], false)?;
            if matches!(op, opc::READ_10 | opc::READ_12 | opc::READ_16) {
                Read(r)
            } else {
                Write(r)
            }
        }
        opc::ORWRITE_16 => {
            // SBC-4 §5.13: ORPROTECT in bits 7..5, DPO, FUA; no BMOP.
            OrWrite(rw(g, be64(&cdb[2..]), be32(&cdb[10..]), cdb[1], false)?)
        }
        opc::VERIFY_10
        | opc::VERIFY_12
        | opc::VERIFY_16
        | opc::WRITE_VERIFY_10
        | opc::WRITE_VERIFY_12
        | opc::WRITE_VERIFY_16 => {
            let (lba, blocks) = match op {
                opc::VERIFY_10 | opc::WRITE_VERIFY_10 => (be32(&cdb[2..]) as u64, be16(&cdb[7..])),
                opc::VERIFY_12 | opc::WRITE_VERIFY_12 => (be32(&cdb[2..]) as u64, be32(&cdb[6..])),
                _ => (be64(&cdb[2..]), be32(&cdb[10..])),
            };
            let bytchk = (cdb[1] >> 1) & 3;
            let verify = matches!(op, opc::VERIFY_10 | opc::VERIFY_12 | opc::VERIFY_16);
            // BYTCHK 01b compares the Data-Out with the medium; 00b checks
            // the medium only; 11b (one block repeated) and 10b are not
            // offered (SBC-4 §5.34 table 136).
            if bytchk > 1 {
                return Err(Sense::invalid_cdb());
            }
            let mut r = rw(g, lba, blocks, cdb[1], false)?;
            r.fua = false;
            if verify {
                Verify {
                    rw: r,
                    bytchk: bytchk == 1,
                }
            } else {
                WriteVerify {
                    rw: r,
                    bytchk: bytchk == 1,
                }
            }
        }
        opc::SYNCHRONIZE_CACHE_10 | opc::SYNCHRONIZE_CACHE_16 => {
            let (lba, blocks) = if op == opc::SYNCHRONIZE_CACHE_10 {
                (be32(&cdb[2..]) as u64, be16(&cdb[7..]) as u64)
            } else {
                (be64(&cdb[2..]), be32(&cdb[10..]) as u64)
            };
            check_range(g, lba, blocks)?;
            SynchronizeCache
        }
        opc::PRE_FETCH_10 | opc::PRE_FETCH_16 => {
            let (lba, blocks) = if op == opc::PRE_FETCH_10 {
                (be32(&cdb[2..]) as u64, be16(&cdb[7..]))
            } else {
                (be64(&cdb[2..]), be32(&cdb[10..]))
            };
            check_range(g, lba, blocks as u64)?;
            PreFetch { lba, blocks }
        }
        opc::WRITE_SAME_10 | opc::WRITE_SAME_16 => {
            let (lba, blocks) = if op == opc::WRITE_SAME_10 {
                (be32(&cdb[2..]) as u64, be16(&cdb[7..]) as u64)
            } else {
                (be64(&cdb[2..]), be32(&cdb[10..]) as u64)
            };
            let unmap = cdb[1] & 0x08 != 0;
            let anchor = cdb[1] & 0x10 != 0;
            let ndob = op == opc::WRITE_SAME_16 && cdb[1] & 0x01 != 0;
            if cdb[1] >> 5 != 0 || anchor {
                return Err(Sense::invalid_cdb());
            }
            check_range(g, lba, blocks)?;
            // WSNZ=0 in the Block Limits page: 0 blocks means "to the end
            // of the medium" (SBC-4 §5.48).
            let blocks = if blocks == 0 { g.blocks - lba } else { blocks };
            if blocks > g.write_same_blocks_max() {
                return Err(Sense::invalid_cdb());
            }
            WriteSame {
                lba,
                blocks,
                unmap,
                ndob,
            }
        }
        opc::UNMAP => {
            // ANCHOR (byte 1 bit 0) is not supported (ANC_SUP=0).
            if cdb[1] & 1 != 0 {
                return Err(Sense::invalid_cdb());
            }
            Unmap {
                len: be16(&cdb[7..]),
            }
        }
        opc::COMPARE_AND_WRITE => {
            let blocks = cdb[13] as u32;
            if blocks > COMPARE_AND_WRITE_BLOCKS_MAX {
                return Err(Sense::invalid_cdb());
            }
            let r = rw(g, be64(&cdb[2..]), blocks, cdb[1], false)?;
            CompareAndWrite(r)
        }
        opc::MODE_SENSE_6 | opc::MODE_SENSE_10 => {
            let ten = op == opc::MODE_SENSE_10;
            let pc = cdb[2] >> 6;
            if pc == 3 {
                return Err(Sense::illegal(asc::SAVING_PARAMETERS_NOT_SUPPORTED));
            }
            ModeSense {
                ten,
                dbd: cdb[1] & 0x08 != 0,
                llbaa: ten && cdb[1] & 0x10 != 0,
                pc,
                page: cdb[2] & 0x3f,
                subpage: cdb[3],
                alloc: if ten { be16(&cdb[7..]) } else { cdb[4] as u32 },
            }
        }
        opc::MODE_SELECT_6 | opc::MODE_SELECT_10 => {
            let ten = op == opc::MODE_SELECT_10;
            // SP (save pages) is not supported; PF must be 1 (SPC-4 §6.11).
            if cdb[1] & 0x01 != 0 {
                return Err(Sense::illegal(asc::SAVING_PARAMETERS_NOT_SUPPORTED));
            }
            let len = if ten { be16(&cdb[7..]) } else { cdb[4] as u32 };
            if len > 0 && cdb[1] & 0x10 == 0 {
                return Err(Sense::invalid_cdb());
            }
            ModeSelect { ten, len }
        }
        opc::START_STOP_UNIT => {
            // Power conditions other than START_VALID (0) are not offered;
            // LOEJ on a non-removable medium is invalid (SBC-4 §5.25).
            let pc = cdb[4] >> 4;
            if pc != 0 && pc != 1 && pc != 2 && pc != 3 && pc != 7 && pc != 0xa && pc != 0xb {
                return Err(Sense::invalid_cdb());
            }
            StartStopUnit
        }
        opc::PREVENT_ALLOW => {
            if cdb[4] & 0x03 > 1 {
                return Err(Sense::invalid_cdb());
            }
            PreventAllow
        }
        opc::PERSISTENT_RESERVE_IN => {
            let action = cdb[1] & 0x1f;
            if action > 3 {
                return Err(Sense::invalid_cdb());
            }
            PrIn {
                action,
                alloc: be16(&cdb[7..]),
            }
        }
        opc::PERSISTENT_RESERVE_OUT => {
            let action = cdb[1] & 0x1f;
            if action > 7 {
                return Err(Sense::invalid_cdb());
            }
            let len = be32(&cdb[5..]);
            // The one parameter list length field here wide enough to ask
            // for more than PARAMETER_LIST_BYTES_MAX (found by fuzzing; the
            // session's Data-Out cap kept it harmless).
            if len > PARAMETER_LIST_BYTES_MAX {
                return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
            }
            PrOut {
                action,
                scope: cdb[2] >> 4,
                kind: cdb[2] & 0x0f,
                len,
            }
        }
        opc::RESERVE_6 | opc::RESERVE_10 => {
            // Third-party and extent reservations are obsolete.
            if cdb[1] & 0x13 != 0 {
                return Err(Sense::invalid_cdb());
            }
            Reserve
        }
        opc::RELEASE_6 | opc::RELEASE_10 => {
            if cdb[1] & 0x13 != 0 {
                return Err(Sense::invalid_cdb());
            }
            Release
        }
        opc::REPORT_LUNS => {
            let alloc = be32(&cdb[6..]);
            // SPC-4 §6.33: allocation length below 16 is invalid; select
            // reports 0, 1, 2 are defined.
            if alloc < 16 || cdb[2] > 2 {
                return Err(Sense::invalid_cdb());
            }
            ReportLuns { alloc }
        }
        opc::MAINTENANCE_IN => match cdb[1] & 0x1f {
            opc::SA_REPORT_SUPPORTED_OPCODES => {
                let options = cdb[2] & 0x07;
                if options > 3 {
                    return Err(Sense::invalid_cdb_at(2));
                }
                ReportSupportedOpcodes {
                    rctd: cdb[2] & 0x80 != 0,
                    options,
                    opcode: cdb[3],
                    action: be16(&cdb[4..]) as u16,
                    alloc: be32(&cdb[6..]),
                }
            }
            // An unknown service action: the field at byte 1.
            _ => return Err(Sense::invalid_cdb_at(1)),
        },
        _ => return Err(Sense::illegal(asc::INVALID_OPCODE)),
    })
}

impl Command {
    /// The transfer the command needs (SPDTL), given the geometry.
    pub fn transfer(&self, g: &Geometry) -> Transfer {
        let bs = g.block_size;
        use Command::*;
        match *self {
            TestUnitReady
            | ReadCapacity10
            | SynchronizeCache
            | PreFetch { .. }
            | StartStopUnit
            | PreventAllow
            | Reserve
            | Release => match self {
                ReadCapacity10 => Transfer::In(8),
                _ => Transfer::None,
            },
            RequestSense { alloc, .. }
            | Inquiry { alloc, .. }
            | ReadCapacity16 { alloc }
            | GetLbaStatus { alloc, .. }
            | ModeSense { alloc, .. }
            | PrIn { alloc, .. }
            | ReportLuns { alloc }
            | ReportSupportedOpcodes { alloc, .. } => Transfer::In(alloc),
            Read(r) => Transfer::In(r.blocks * bs),
            Write(r) => Transfer::Out(r.blocks * bs),
            Verify { rw, bytchk } => {
                if bytchk {
                    Transfer::Out(rw.blocks * bs)
                } else {
                    Transfer::None
                }
            }
            WriteVerify { rw, .. } => Transfer::Out(rw.blocks * bs),
            WriteSame { ndob, .. } => {
                if ndob {
                    Transfer::None
                } else {
                    Transfer::Out(bs)
                }
            }
            Unmap { len } | ModeSelect { len, .. } | PrOut { len, .. } => Transfer::Out(len),
            CompareAndWrite(r) => Transfer::Out(2 * r.blocks * bs),
            OrWrite(r) => Transfer::Out(r.blocks * bs),
        }
    }

    /// Whether the command modifies the medium (for reservations and
    /// SWP), and whether it reads it.
    pub fn access(&self) -> Access {
        use Command::*;
        match self {
            Write(_)
            | WriteVerify { .. }
            | WriteSame { .. }
            | Unmap { .. }
            | CompareAndWrite(_)
            | OrWrite(_) => Access::Write,
            Read(_) | Verify { .. } | PreFetch { .. } | GetLbaStatus { .. } => Access::Read,
            SynchronizeCache | ModeSelect { .. } | StartStopUnit | PreventAllow => Access::Write,
            ModeSense { .. } | ReadCapacity10 | ReadCapacity16 { .. } | TestUnitReady => {
                Access::Meta
            }
            Inquiry { .. }
            | RequestSense { .. }
            | ReportLuns { .. }
            | ReportSupportedOpcodes { .. }
            | PrIn { .. } => Access::Always,
            PrOut { .. } | Reserve | Release => Access::Reservation,
        }
    }
}

/// Reservation classes of commands (SPC-4 §5.12.1 table 49, simplified to
/// what differs between reservation types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Allowed under any reservation.
    Always,
    /// Reads medium metadata: allowed unless exclusive access.
    Meta,
    Read,
    Write,
    /// Reservation management: checked by the reservation logic itself.
    Reservation,
}

// --- Answers ---------------------------------------------------------------

pub const VENDOR: &[u8; 8] = b"TESSERA ";
pub const PRODUCT: &[u8; 16] = b"VOLUME          ";
pub const REVISION: &[u8; 4] = b"0001";

/// Identity of a logical unit for INQUIRY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Stable 64-bit identifier of the volume (from its name).
    pub id: u64,
    pub serial: String,
    pub target_name: String,
    pub portal_group_tag: u16,
}

/// A stable NAA-6 designator (SPC-4 §7.8.6.6.5): NAA 6, a 24-bit company
/// id (here 0x000000 "locally assigned" use of the vendor-specific field)
/// and the volume's 64-bit id spread over the 100-bit vendor field.
pub fn naa6(id: u64) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0] = 0x60; // NAA=6, OUI high nibble 0
    d[3] = 0x0e; // OUI low nibble + vendor specific start: "Tessera" marker
    d[4..12].copy_from_slice(&id.to_be_bytes());
    d[12..16].copy_from_slice(b"TSRA");
    d
}

/// Standard INQUIRY data (SPC-4 §6.6.2).
pub fn inquiry_standard() -> Vec<u8> {
    let mut d = vec![0u8; 66];
    d[0] = 0x00; // connected, direct access block device
    d[2] = 0x06; // SPC-4
    d[3] = 0x12; // HISUP, response data format 2
    d[5] = 0x08; // 3PC=0, TPGS=0, PROTECT=0; (bit 3: ACC no) - keep SCCS 0
    d[5] = 0x00;
    d[6] = 0x00;
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(VENDOR);
    d[16..32].copy_from_slice(PRODUCT);
    d[32..36].copy_from_slice(REVISION);
    // Version descriptors (SPC-4 §6.6.2 table 141): SAM-5, SPC-4, SBC-3,
    // iSCSI (no version claimed).
    let versions: [u16; 4] = [0x00a0, 0x0460, 0x04c0, 0x0960];
    for (i, v) in versions.iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d[4] = (d.len() - 5) as u8;
    d
}

/// VPD pages we offer, in ascending order (SPC-4 §7.8.13).
pub const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

fn vpd(page: u8, body: Vec<u8>) -> Vec<u8> {
    let mut d = vec![0u8, page];
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend(body);
    d
}

fn designator(code_set: u8, assoc_type: u8, ident: &[u8]) -> Vec<u8> {
    let mut d = vec![code_set, assoc_type, 0, ident.len() as u8];
    d.extend_from_slice(ident);
    d
}

/// An INQUIRY VPD page, or `None` for a page we do not have.
pub fn inquiry_vpd(page: u8, id: &Identity, g: &Geometry) -> Option<Vec<u8>> {
    Some(match page {
        0x00 => vpd(0x00, VPD_PAGES.to_vec()),
        0x80 => vpd(0x80, id.serial.as_bytes().to_vec()),
        0x83 => {
            let mut b = Vec::new();
            // LU: NAA (binary, code set 1; association LU, type 3).
            b.extend(designator(0x01, 0x03, &naa6(id.id)));
            // LU: T10 vendor id (ASCII, code set 2; type 1).
            let mut t10 = VENDOR.to_vec();
            t10.extend_from_slice(id.serial.as_bytes());
            b.extend(designator(0x02, 0x01, &t10));
            // Target port: relative target port 1 (PIV, iSCSI, assoc 01b,
            // type 4) and target port group (type 5).
            b.extend(designator(0x51, 0x94, &[0, 0, 0, 1]));
            b.extend(designator(
                0x51,
                0x95,
                &[0, 0, 0, id.portal_group_tag.min(255) as u8],
            ));
            // Target device: SCSI name string (UTF-8 code set 3, type 8,
            // association 10b), NUL-terminated and padded to 4 bytes.
            let mut name = id.target_name.as_bytes().to_vec();
            name.push(0);
            while !name.len().is_multiple_of(4) {
                name.push(0);
            }
            b.extend(designator(0x53, 0xa8, &name));
            vpd(0x83, b)
        }
        0xb0 => {
            // Block Limits (SBC-4 §6.6.4), page length 0x3c.
            let mut b = vec![0u8; 0x3c];
            b[0] = 0x00; // WSNZ=0: WRITE SAME with 0 blocks means to the end
            b[1] = COMPARE_AND_WRITE_BLOCKS_MAX as u8;
            // Optimal transfer length granularity: one physical block.
            b[2..4].copy_from_slice(&(1u16 << g.lbppbe()).to_be_bytes());
            b[4..8].copy_from_slice(&(g.transfer_blocks_max() as u32).to_be_bytes());
            b[8..12].copy_from_slice(&((1 << 20) / g.block_size).to_be_bytes()); // optimal 1 MiB
            b[12..16].copy_from_slice(&(g.transfer_blocks_max() as u32).to_be_bytes()); // prefetch
            b[16..20].copy_from_slice(&(g.unmap_blocks_max() as u32).to_be_bytes());
            b[20..24].copy_from_slice(&UNMAP_DESCRIPTORS_MAX.to_be_bytes());
            b[24..28].copy_from_slice(&(1u32 << g.lbppbe()).to_be_bytes()); // unmap granularity
            b[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, alignment 0
            b[32..40].copy_from_slice(&g.write_same_blocks_max().to_be_bytes());
            vpd(0xb0, b)
        }
        0xb1 => {
            // Block Device Characteristics: non-rotating medium.
            let mut b = vec![0u8; 0x3c];
            b[0..2].copy_from_slice(&1u16.to_be_bytes());
            vpd(0xb1, b)
        }
        0xb2 => {
            // Logical Block Provisioning (SBC-4 §6.6.6): LBPU, LBPWS,
            // LBPWS10, LBPRZ=1 (unmapped blocks read zeroes), thin.
            vpd(0xb2, vec![0x00, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0x00])
        }
        _ => return None,
    })
}

pub fn read_capacity10(g: &Geometry) -> Vec<u8> {
    let last = g.blocks.saturating_sub(1).min(0xffff_ffff) as u32;
    let mut d = last.to_be_bytes().to_vec();
    d.extend_from_slice(&g.block_size.to_be_bytes());
    d
}

/// The storage daemons keep data in 4 KiB blocks (one CRC32C each, see
/// docs/on-disk-format.md): a write smaller than that is a read-modify-write
/// there, which is what a physical block larger than the logical one means.
pub const PHYSICAL_BLOCK_BYTES: u32 = 4096;

impl Geometry {
    /// LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT (SBC-4 §5.20.2): 3 for
    /// 512-byte volumes (8 logical blocks per 4 KiB physical block), 0 for
    /// 4096-byte ones.
    pub fn lbppbe(&self) -> u8 {
        (PHYSICAL_BLOCK_BYTES / self.block_size)
            .max(1)
            .trailing_zeros() as u8
    }
}

/// READ CAPACITY(16) parameter data (SBC-4 §5.20.2): the physical block
/// exponent, LOWEST ALIGNED LBA 0, LBPME and LBPRZ set (thin provisioned,
/// unmapped blocks read as zeroes).
pub fn read_capacity16(g: &Geometry) -> Vec<u8> {
    let mut d = vec![0u8; 32];
    d[0..8].copy_from_slice(&g.blocks.saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&g.block_size.to_be_bytes());
    d[13] = g.lbppbe();
    d[14] = 0x80 | 0x40;
    d
}

pub fn report_luns() -> Vec<u8> {
    let mut d = vec![0u8; 16];
    d[0..4].copy_from_slice(&8u32.to_be_bytes());
    d
}

/// Mode parameters that can change (MODE SELECT) and are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeState {
    /// Control page D_SENSE: descriptor-format sense data.
    pub d_sense: bool,
    /// Caching page WCE (volatile write cache enabled).
    pub wce: bool,
}

impl Default for ModeState {
    fn default() -> Self {
        ModeState {
            d_sense: false,
            wce: true,
        }
    }
}

/// A mode page by PC (0 current, 1 changeable, 2 default).
fn mode_page(page: u8, pc: u8, m: &ModeState) -> Option<Vec<u8>> {
    let cur = match pc {
        2 => ModeState::default(),
        _ => *m,
    };
    Some(match page {
        // Read-Write Error Recovery (SBC-4 §6.5.8).
        0x01 => {
            let mut p = vec![0u8; 12];
            p[0] = 0x01;
            p[1] = 10;
            if pc != 1 {
                p[2] = 0x80; // AWRE
            }
            p
        }
        // Caching (SBC-4 §6.5.5): WCE changeable.
        0x08 => {
            let mut p = vec![0u8; 20];
            p[0] = 0x08;
            p[1] = 18;
            // Changeable mask (pc 1) and current/default WCE share the bit.
            if pc == 1 || cur.wce {
                p[2] = 0x04;
            }
            p
        }
        // Control (SPC-4 §7.5.8): D_SENSE changeable; QERR 00b; unrestricted
        // reordering (QUEUE ALGORITHM MODIFIER 1); TAS=0; SWP=0.
        0x0a => {
            let mut p = vec![0u8; 12];
            p[0] = 0x0a;
            p[1] = 10;
            if pc == 1 {
                p[2] = 0x04;
            } else {
                p[2] = if cur.d_sense { 0x04 } else { 0 };
                p[3] = 0x10;
                p[8..10].copy_from_slice(&0xffffu16.to_be_bytes()); // busy timeout: unlimited
            }
            p
        }
        _ => return None,
    })
}

/// Pages returned for page code 3Fh, in order.
const MODE_PAGES: [u8; 3] = [0x01, 0x08, 0x0a];

/// MODE SENSE(6)/(10) data (SPC-4 §7.5.4 headers, SBC-4 block descriptor).
pub fn mode_sense(cmd: &Command, g: &Geometry, m: &ModeState) -> Result<Vec<u8>, Sense> {
    let Command::ModeSense {
        ten,
        dbd,
        llbaa,
        pc,
        page,
        subpage,
        ..
    } = *cmd
    else {
        panic!("mode_sense called with {cmd:?}");
    };
    let mut pages = Vec::new();
    if page == 0x3f {
        if subpage != 0 && subpage != 0xff {
            return Err(Sense::invalid_cdb());
        }
        for p in MODE_PAGES {
            pages.extend(mode_page(p, pc, m).expect("listed"));
        }
    } else {
        if subpage != 0 {
            return Err(Sense::invalid_cdb());
        }
        pages.extend(mode_page(page, pc, m).ok_or(Sense::invalid_cdb())?);
    }
    let mut bd = Vec::new();
    if !dbd {
        if llbaa {
            bd.extend_from_slice(&g.blocks.to_be_bytes());
            bd.extend_from_slice(&[0, 0, 0, 0]);
            bd.extend_from_slice(&g.block_size.to_be_bytes());
        } else {
            bd.extend_from_slice(&(g.blocks.min(0xffff_ffff) as u32).to_be_bytes());
            bd.push(0);
            bd.extend_from_slice(&g.block_size.to_be_bytes()[1..]);
        }
    }
    // Device-specific parameter: DPOFUA (bit 4); WP=0.
    let dsp = 0x10;
    let mut d = Vec::new();
    if ten {
        let len = 6 + bd.len() + pages.len();
        d.extend_from_slice(&(len as u16).to_be_bytes());
        d.push(0);
        d.push(dsp);
        d.push(if llbaa && !dbd { 1 } else { 0 });
        d.push(0);
        d.extend_from_slice(&(bd.len() as u16).to_be_bytes());
    } else {
        let len = 3 + bd.len() + pages.len();
        d.push(len.min(255) as u8);
        d.push(0);
        d.push(dsp);
        d.push(bd.len() as u8);
    }
    d.extend(bd);
    d.extend(pages);
    Ok(d)
}

/// Apply a MODE SELECT parameter list (SPC-4 §6.11): only the bits the
/// changeable values allow may differ from the current ones.
pub fn mode_select(
    ten: bool,
    data: &[u8],
    g: &Geometry,
    m: &ModeState,
) -> Result<ModeState, Sense> {
    let bad = Sense::illegal(asc::INVALID_FIELD_IN_PARAMETER_LIST);
    let hdr = if ten { 8 } else { 4 };
    if data.len() < hdr {
        return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    let bdl = if ten {
        u16::from_be_bytes([data[6], data[7]]) as usize
    } else {
        data[3] as usize
    };
    let mut i = hdr;
    if bdl > 0 {
        if data.len() < hdr + bdl || (bdl != 8 && bdl != 16) {
            return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        // The block length in a descriptor must be ours.
        let bl = be24(&data[hdr + bdl - 3..]);
        if bl != g.block_size && bl != 0 {
            return Err(bad);
        }
        i += bdl;
    }
    let mut next = *m;
    while i < data.len() {
        if data.len() < i + 2 {
            return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        let code = data[i] & 0x3f;
        if data[i] & 0x40 != 0 {
            return Err(bad); // SPF: subpages not supported
        }
        let len = data[i + 1] as usize + 2;
        if data.len() < i + len {
            return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        let page = &data[i..i + len];
        let cur = mode_page(code, 0, m).ok_or(bad)?;
        let mask = mode_page(code, 1, m).expect("same page");
        if page.len() != cur.len() {
            return Err(bad);
        }
        for k in 2..cur.len() {
            if (page[k] ^ cur[k]) & !mask[k] != 0 {
                return Err(bad);
            }
        }
        match code {
            0x08 => next.wce = page[2] & 0x04 != 0,
            0x0a => next.d_sense = page[2] & 0x04 != 0,
            _ => {}
        }
        i += len;
    }
    Ok(next)
}

/// Commands we support with their CDB usage masks (SPC-4 §6.35.3): the
/// bits of each CDB byte the device server looks at.
pub fn supported_commands() -> Vec<(u8, Option<u8>, Vec<u8>)> {
    let rw10 = vec![
        0,
        0xe0 | 0x18,
        0xff,
        0xff,
        0xff,
        0xff,
        0x00,
        0xff,
        0xff,
        0x00,
    ];
    let rw12 = vec![
        0, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00,
    ];
    let rw16 = vec![
        0, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00,
    ];
    let with_op = |op: u8, mut m: Vec<u8>| {
        m[0] = op;
        m
    };
    let ver10 = vec![0, 0xf6, 0xff, 0xff, 0xff, 0xff, 0x00, 0xff, 0xff, 0x00];
    let ver12 = vec![
        0, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00,
    ];
    let ver16 = vec![
        0, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00,
    ];
    vec![
        (opc::TEST_UNIT_READY, None, vec![0, 0, 0, 0, 0, 0]),
        (
            opc::REQUEST_SENSE,
            None,
            vec![opc::REQUEST_SENSE, 0x01, 0, 0, 0xff, 0],
        ),
        (
            opc::READ_6,
            None,
            vec![opc::READ_6, 0x1f, 0xff, 0xff, 0xff, 0],
        ),
        (
            opc::WRITE_6,
            None,
            vec![opc::WRITE_6, 0x1f, 0xff, 0xff, 0xff, 0],
        ),
        (
            opc::INQUIRY,
            None,
            vec![opc::INQUIRY, 0x01, 0xff, 0xff, 0xff, 0],
        ),
        (
            opc::MODE_SELECT_6,
            None,
            vec![opc::MODE_SELECT_6, 0x11, 0, 0, 0xff, 0],
        ),
        (opc::RESERVE_6, None, vec![opc::RESERVE_6, 0, 0, 0, 0, 0]),
        (opc::RELEASE_6, None, vec![opc::RELEASE_6, 0, 0, 0, 0, 0]),
        (
            opc::MODE_SENSE_6,
            None,
            vec![opc::MODE_SENSE_6, 0x08, 0xff, 0xff, 0xff, 0],
        ),
        (
            opc::START_STOP_UNIT,
            None,
            vec![opc::START_STOP_UNIT, 0x01, 0, 0x0f, 0xf7, 0],
        ),
        (
            opc::PREVENT_ALLOW,
            None,
            vec![opc::PREVENT_ALLOW, 0, 0, 0, 0x03, 0],
        ),
        (
            opc::READ_CAPACITY_10,
            None,
            vec![
                opc::READ_CAPACITY_10,
                0,
                0xff,
                0xff,
                0xff,
                0xff,
                0,
                0,
                0x01,
                0,
            ],
        ),
        (opc::READ_10, None, with_op(opc::READ_10, rw10.clone())),
        (opc::WRITE_10, None, with_op(opc::WRITE_10, rw10.clone())),
        (
            opc::WRITE_VERIFY_10,
            None,
            with_op(opc::WRITE_VERIFY_10, ver10.clone()),
        ),
        (opc::VERIFY_10, None, with_op(opc::VERIFY_10, ver10)),
        (
            opc::PRE_FETCH_10,
            None,
            vec![
                opc::PRE_FETCH_10,
                0x02,
                0xff,
                0xff,
                0xff,
                0xff,
                0,
                0xff,
                0xff,
                0,
            ],
        ),
        (
            opc::SYNCHRONIZE_CACHE_10,
            None,
            vec![
                opc::SYNCHRONIZE_CACHE_10,
                0x02,
                0xff,
                0xff,
                0xff,
                0xff,
                0,
                0xff,
                0xff,
                0,
            ],
        ),
        (
            opc::WRITE_SAME_10,
            None,
            vec![
                opc::WRITE_SAME_10,
                0xe8,
                0xff,
                0xff,
                0xff,
                0xff,
                0,
                0xff,
                0xff,
                0,
            ],
        ),
        (
            opc::UNMAP,
            None,
            vec![opc::UNMAP, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0],
        ),
        (
            opc::MODE_SELECT_10,
            None,
            vec![opc::MODE_SELECT_10, 0x11, 0, 0, 0, 0, 0, 0xff, 0xff, 0],
        ),
        (
            opc::RESERVE_10,
            None,
            vec![opc::RESERVE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ),
        (
            opc::RELEASE_10,
            None,
            vec![opc::RELEASE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ),
        (
            opc::MODE_SENSE_10,
            None,
            vec![opc::MODE_SENSE_10, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0],
        ),
        (opc::PERSISTENT_RESERVE_IN, Some(0), pr_in_mask(0)),
        (opc::PERSISTENT_RESERVE_IN, Some(1), pr_in_mask(1)),
        (opc::PERSISTENT_RESERVE_IN, Some(2), pr_in_mask(2)),
        (opc::PERSISTENT_RESERVE_IN, Some(3), pr_in_mask(3)),
        (opc::PERSISTENT_RESERVE_OUT, Some(0), pr_out_mask(0)),
        (opc::PERSISTENT_RESERVE_OUT, Some(1), pr_out_mask(1)),
        (opc::PERSISTENT_RESERVE_OUT, Some(2), pr_out_mask(2)),
        (opc::PERSISTENT_RESERVE_OUT, Some(3), pr_out_mask(3)),
        (opc::PERSISTENT_RESERVE_OUT, Some(4), pr_out_mask(4)),
        (opc::PERSISTENT_RESERVE_OUT, Some(5), pr_out_mask(5)),
        (opc::PERSISTENT_RESERVE_OUT, Some(6), pr_out_mask(6)),
        (opc::READ_16, None, with_op(opc::READ_16, rw16.clone())),
        (opc::COMPARE_AND_WRITE, None, {
            let mut m = with_op(opc::COMPARE_AND_WRITE, rw16.clone());
            m[10] = 0;
            m[11] = 0;
            m[12] = 0;
            m[13] = 0xff;
            m
        }),
        (opc::WRITE_16, None, with_op(opc::WRITE_16, rw16.clone())),
        (
            opc::ORWRITE_16,
            None,
            with_op(opc::ORWRITE_16, rw16.clone()),
        ),
        (
            opc::WRITE_VERIFY_16,
            None,
            with_op(opc::WRITE_VERIFY_16, ver16.clone()),
        ),
        (opc::VERIFY_16, None, with_op(opc::VERIFY_16, ver16)),
        (opc::PRE_FETCH_16, None, {
            let mut m = with_op(opc::PRE_FETCH_16, rw16.clone());
            m[1] = 0x02;
            m
        }),
        (opc::SYNCHRONIZE_CACHE_16, None, {
            let mut m = with_op(opc::SYNCHRONIZE_CACHE_16, rw16.clone());
            m[1] = 0x02;
            m
        }),
        (opc::WRITE_SAME_16, None, {
            let mut m = with_op(opc::WRITE_SAME_16, rw16.clone());
            m[1] = 0xe9;
            m
        }),
        (opc::SERVICE_ACTION_IN_16, Some(opc::SA_READ_CAPACITY_16), {
            let mut m = vec![0u8; 16];
            m[0] = opc::SERVICE_ACTION_IN_16;
            m[1] = opc::SA_READ_CAPACITY_16;
            m[10..14].copy_from_slice(&[0xff; 4]);
            m
        }),
        (opc::SERVICE_ACTION_IN_16, Some(opc::SA_GET_LBA_STATUS), {
            let mut m = vec![0u8; 16];
            m[0] = opc::SERVICE_ACTION_IN_16;
            m[1] = opc::SA_GET_LBA_STATUS;
            m[2..14].copy_from_slice(&[0xff; 12]);
            m
        }),
        (
            opc::REPORT_LUNS,
            None,
            vec![
                opc::REPORT_LUNS,
                0,
                0xff,
                0,
                0,
                0,
                0xff,
                0xff,
                0xff,
                0xff,
                0,
                0,
            ],
        ),
        (
            opc::MAINTENANCE_IN,
            Some(opc::SA_REPORT_SUPPORTED_OPCODES),
            vec![
                opc::MAINTENANCE_IN,
                opc::SA_REPORT_SUPPORTED_OPCODES,
                0x87,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0xff,
                0,
                0,
            ],
        ),
        (opc::READ_12, None, with_op(opc::READ_12, rw12.clone())),
        (opc::WRITE_12, None, with_op(opc::WRITE_12, rw12.clone())),
        (
            opc::WRITE_VERIFY_12,
            None,
            with_op(opc::WRITE_VERIFY_12, ver12.clone()),
        ),
        (opc::VERIFY_12, None, with_op(opc::VERIFY_12, ver12)),
    ]
}

fn pr_in_mask(sa: u8) -> Vec<u8> {
    vec![opc::PERSISTENT_RESERVE_IN, sa, 0, 0, 0, 0, 0, 0xff, 0xff, 0]
}
fn pr_out_mask(sa: u8) -> Vec<u8> {
    vec![
        opc::PERSISTENT_RESERVE_OUT,
        sa,
        0xff,
        0,
        0,
        0xff,
        0xff,
        0xff,
        0xff,
        0,
    ]
}

/// REPORT SUPPORTED OPERATION CODES data (SPC-4 §6.35).
pub fn report_supported_opcodes(cmd: &Command) -> Result<Vec<u8>, Sense> {
    let Command::ReportSupportedOpcodes {
        rctd,
        options,
        opcode,
        action,
        ..
    } = *cmd
    else {
        panic!("called with {cmd:?}");
    };
    let all = supported_commands();
    // Command timeouts descriptor (§6.35.4): length 0x0a, no timeouts given.
    let timeouts = |d: &mut Vec<u8>| {
        d.extend_from_slice(&[0x00, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    };
    if options == 0 {
        let mut body = Vec::new();
        for (op, sa, mask) in &all {
            body.push(*op);
            body.push(0);
            body.extend_from_slice(&(sa.unwrap_or(0) as u16).to_be_bytes());
            body.push(0);
            body.push((if rctd { 0x02 } else { 0 }) | if sa.is_some() { 0x01 } else { 0 });
            body.extend_from_slice(&(mask.len() as u16).to_be_bytes());
            if rctd {
                timeouts(&mut body);
            }
        }
        let mut d = (body.len() as u32).to_be_bytes().to_vec();
        d.extend(body);
        return Ok(d);
    }
    // One command: options 1 (no SA), 2 (with SA), 3 (either).
    let has_sa = all.iter().any(|(op, sa, _)| *op == opcode && sa.is_some());
    let found = match options {
        // SPC-4 §6.35.1: asking for the wrong form (with or without a
        // service action) is an invalid REPORTING OPTIONS field (byte 2).
        1 => {
            if has_sa {
                return Err(Sense::invalid_cdb_at(2));
            }
            all.iter().find(|(op, _, _)| *op == opcode)
        }
        2 => {
            if !has_sa && all.iter().any(|(op, _, _)| *op == opcode) {
                return Err(Sense::invalid_cdb_at(2));
            }
            all.iter()
                .find(|(op, sa, _)| *op == opcode && *sa == Some(action as u8) && action < 0x20)
        }
        _ => all
            .iter()
            .find(|(op, sa, _)| *op == opcode && (sa.is_none() || *sa == Some(action as u8))),
    };
    let mut d = vec![0u8, 0, 0, 0];
    match found {
        Some((_, _, mask)) => {
            d[1] = 0x03 | if rctd { 0x80 } else { 0 };
            d[2..4].copy_from_slice(&(mask.len() as u16).to_be_bytes());
            d.extend_from_slice(mask);
            if rctd {
                timeouts(&mut d);
            }
        }
        None => d[1] = 0x01, // not supported
    }
    Ok(d)
}

/// GET LBA STATUS parameter data (SBC-4 §5.6.2): one descriptor per
/// (start LBA, blocks, mapped); provisioning status 0 mapped, 1 deallocated.
pub fn lba_status(descriptors: &[(u64, u32, bool)]) -> Vec<u8> {
    let mut d = vec![0u8; 8];
    for (start, blocks, mapped) in descriptors {
        d.extend_from_slice(&start.to_be_bytes());
        d.extend_from_slice(&blocks.to_be_bytes());
        d.push(if *mapped { 0 } else { 1 });
        d.extend_from_slice(&[0, 0, 0]);
    }
    let len = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&len.to_be_bytes());
    d
}

/// LBA status descriptors for the blocks from `lba` on, from an allocation
/// map in bytes (consecutive extents starting at byte `lba * block_size`).
/// A logical block any byte of which is allocated reports as mapped (the
/// safe answer); runs longer than a descriptor can hold are split; at most
/// `descriptors_max` (at least one) are returned, the first starting at
/// `lba` as SBC-4 §5.6.2 requires.
pub fn lba_runs(
    lba: u64,
    block_size: u32,
    extents: &[crate::volume::Extent],
    descriptors_max: usize,
) -> Vec<(u64, u32, bool)> {
    let bs = block_size as u64;
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let mut byte = lba * bs;
    let mut next = lba; // first block not yet described
    for e in extents {
        let end_byte = byte + e.length;
        byte = end_byte;
        let end = if e.allocated {
            end_byte.div_ceil(bs)
        } else {
            end_byte / bs
        };
        if end <= next {
            continue;
        }
        match runs.last_mut() {
            Some(r) if r.2 == e.allocated => r.1 += end - next,
            _ => runs.push((next, end - next, e.allocated)),
        }
        next = end;
    }
    let mut out = Vec::new();
    let cap = descriptors_max.max(1);
    for (mut start, mut n, mapped) in runs {
        while n > 0 && out.len() < cap {
            let m = n.min(u32::MAX as u64);
            out.push((start, m as u32, mapped));
            start += m;
            n -= m;
        }
    }
    out
}

/// Parse an UNMAP parameter list (SBC-4 §5.30.2) into (lba, blocks) ranges,
/// each checked against the geometry and our limits.
pub fn unmap_ranges(data: &[u8], g: &Geometry) -> Result<Vec<(u64, u32)>, Sense> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    if data.len() < 8 {
        return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    let bdl = u16::from_be_bytes([data[2], data[3]]) as usize;
    let avail = (data.len() - 8).min(bdl) / 16;
    if avail as u32 > UNMAP_DESCRIPTORS_MAX {
        return Err(Sense::invalid_cdb());
    }
    let mut out = Vec::new();
    let mut total: u64 = 0;
    for i in 0..avail {
        let d = &data[8 + 16 * i..8 + 16 * (i + 1)];
        let lba = be64(d);
        let n = be32(&d[8..]);
        check_range(g, lba, n as u64)?;
        total += n as u64;
        if total > g.unmap_blocks_max() {
            return Err(Sense::invalid_cdb());
        }
        if n > 0 {
            out.push((lba, n));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry {
        block_size: 512,
        blocks: 2048,
    };

    fn cdb(bytes: &[u8]) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..bytes.len()].copy_from_slice(bytes);
        c
    }

    // Proves READ CAPACITY(16) reports 8 logical blocks per 4 KiB physical
    // block for 512-byte volumes and 1 for 4096-byte ones, with the thin
    // provisioning bits.
    #[test]
    fn read_capacity16_physical_exponent() {
        let d = read_capacity16(&G);
        assert_eq!(&d[0..8], &2047u64.to_be_bytes());
        assert_eq!(&d[8..12], &512u32.to_be_bytes());
        assert_eq!((d[13], d[14], d[15]), (3, 0xc0, 0));
        let big = Geometry {
            block_size: 4096,
            blocks: 10,
        };
        assert_eq!(read_capacity16(&big)[13], 0);
        let id = Identity {
            id: 1,
            serial: "s".into(),
            target_name: "t".into(),
            portal_group_tag: 1,
        };
        let b0 = inquiry_vpd(0xb0, &id, &G).unwrap();
        assert_eq!(&b0[6..8], &8u16.to_be_bytes()); // optimal granularity
        assert_eq!(&b0[28..32], &8u32.to_be_bytes()); // unmap granularity
    }

    // Proves allocation extents (bytes) become LBA status runs: merged,
    // starting at the requested LBA, a partly allocated block counted as
    // mapped, long runs split at the descriptor's 32-bit count, and the
    // descriptor limit honoured.
    #[test]
    fn lba_runs_from_extents() {
        use crate::volume::Extent;
        let e = |length, allocated| Extent { length, allocated };
        // 512-byte blocks from LBA 8: 4 KiB mapped, 8 KiB hole, 4 KiB
        // mapped, 4 KiB mapped.
        let ext = [e(4096, true), e(8192, false), e(4096, true), e(4096, true)];
        assert_eq!(
            lba_runs(8, 512, &ext, 16),
            vec![(8, 8, true), (16, 16, false), (32, 16, true)]
        );
        assert_eq!(lba_runs(8, 512, &ext, 1), vec![(8, 8, true)]);
        assert_eq!(lba_runs(8, 512, &ext, 0), vec![(8, 8, true)]);
        // A hole that does not cover a whole block stays mapped.
        let ext = [e(100, true), e(400, false), e(12, true), e(512, false)];
        assert_eq!(
            lba_runs(0, 512, &ext, 16),
            vec![(0, 1, true), (1, 1, false)]
        );
        // Runs beyond u32::MAX blocks take several descriptors.
        let huge = (u32::MAX as u64 + 10) * 512;
        assert_eq!(
            lba_runs(0, 512, &[e(huge, false)], 16),
            vec![(0, u32::MAX, false), (u32::MAX as u64, 10, false)]
        );
        let d = lba_status(&[(8, 8, true), (16, 16, false)]);
        assert_eq!(&d[0..4], &36u32.to_be_bytes());
        assert_eq!(&d[8..16], &8u64.to_be_bytes());
        assert_eq!(&d[16..20], &8u32.to_be_bytes());
        assert_eq!((d[20], d[36]), (0, 1));
    }

    // Proves ORWRITE(16) decodes like WRITE(16) (range, FUA, Data-Out of
    // its blocks, a write for reservations), refuses ORPROTECT and ranges
    // beyond the end, and is listed by REPORT SUPPORTED OPERATION CODES.
    #[test]
    fn orwrite() {
        let c = decode(
            &cdb(&[0x8b, 0x08, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 3, 0, 0]),
            &G,
        )
        .unwrap();
        assert_eq!(
            c,
            Command::OrWrite(Rw {
                lba: 5,
                blocks: 3,
                fua: true
            })
        );
        assert_eq!(c.transfer(&G), Transfer::Out(1536));
        assert_eq!(c.access(), Access::Write);
        assert_eq!(
            decode(
                &cdb(&[0x8b, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]),
                &G
            ),
            Err(Sense::invalid_cdb())
        );
        assert_eq!(
            decode(
                &cdb(&[0x8b, 0, 0, 0, 0, 0, 0, 0, 0x08, 0, 0, 0, 0, 1, 0, 0]),
                &G
            ),
            Err(Sense::illegal(asc::LBA_OUT_OF_RANGE))
        );
        assert!(
            supported_commands()
                .iter()
                .any(|(op, sa, m)| *op == 0x8b && sa.is_none() && m[1] & 0x18 == 0x18)
        );
    }

    // Proves golden READ(10)/WRITE(16)/READ(6) CDBs decode to their ranges,
    // including READ(6) length 0 = 256 blocks.
    #[test]
    fn golden_rw() {
        let c = decode(&cdb(&[0x28, 0x08, 0, 0, 0, 10, 0, 0, 4, 0]), &G).unwrap();
        assert_eq!(
            c,
            Command::Read(Rw {
                lba: 10,
                blocks: 4,
                fua: true
            })
        );
        assert_eq!(c.transfer(&G), Transfer::In(2048));
        let c = decode(
            &cdb(&[0x8a, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0]),
            &G,
        )
        .unwrap();
        assert_eq!(
            c,
            Command::Write(Rw {
                lba: 1,
                blocks: 2,
                fua: false
            })
        );
        let c = decode(&cdb(&[0x08, 0, 0, 5, 0, 0]), &G).unwrap();
        assert_eq!(
            c,
            Command::Read(Rw {
                lba: 5,
                blocks: 256,
                fua: false
            })
        );
    }

    // Proves every rejection branch of the decoder gives the right sense.
    #[test]
    fn rejections() {
        let ill = |a| Err(Sense::illegal(a));
        assert_eq!(decode(&cdb(&[0xff]), &G), ill(asc::INVALID_OPCODE));
        // Beyond the end, and exactly at the end.
        assert_eq!(
            decode(&cdb(&[0x28, 0, 0, 0, 0x07, 0xff, 0, 0, 2, 0]), &G),
            ill(asc::LBA_OUT_OF_RANGE)
        );
        assert!(decode(&cdb(&[0x28, 0, 0, 0, 0x07, 0xff, 0, 0, 1, 0]), &G).is_ok());
        assert_eq!(
            decode(&cdb(&[0x28, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 1, 0]), &G),
            ill(asc::LBA_OUT_OF_RANGE)
        );
        // RDPROTECT without protection information.
        assert_eq!(
            decode(&cdb(&[0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0]), &G),
            ill(asc::INVALID_FIELD_IN_CDB)
        );
        // NACA in the control byte.
        assert_eq!(
            decode(&cdb(&[0x00, 0, 0, 0, 0, 0x04]), &G),
            ill(asc::INVALID_FIELD_IN_CDB)
        );
        // INQUIRY page code without EVPD.
        assert_eq!(
            decode(&cdb(&[0x12, 0, 0x80, 0, 0xff, 0]), &G),
            ill(asc::INVALID_FIELD_IN_CDB)
        );
        // REPORT LUNS with allocation length < 16.
        assert_eq!(
            decode(&cdb(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0]), &G),
            ill(asc::INVALID_FIELD_IN_CDB)
        );
        // MODE SENSE saved values.
        assert_eq!(
            decode(&cdb(&[0x1a, 0, 0xff, 0, 0xff, 0]), &G),
            ill(asc::SAVING_PARAMETERS_NOT_SUPPORTED)
        );
        // VERIFY with BYTCHK 10b.
        assert_eq!(
            decode(&cdb(&[0x2f, 0x04, 0, 0, 0, 0, 0, 0, 1, 0]), &G),
            ill(asc::INVALID_FIELD_IN_CDB)
        );
        // Transfer above the maximum.
        let big = (TRANSFER_BYTES_MAX / 512 + 1) as u32;
        let g = Geometry {
            block_size: 512,
            blocks: 1 << 30,
        };
        let mut c = cdb(&[0x88]);
        c[10..14].copy_from_slice(&big.to_be_bytes());
        assert_eq!(decode(&c, &g), ill(asc::INVALID_FIELD_IN_CDB));
        // Unknown service actions.
        assert_eq!(
            decode(&cdb(&[0x9e, 0x1f]), &G),
            Err(Sense::invalid_cdb_at(1))
        );
        assert_eq!(
            decode(&cdb(&[0xa3, 0x1f]), &G),
            Err(Sense::invalid_cdb_at(1))
        );
        // PERSISTENT RESERVE OUT parameter list beyond our limit.
        assert_eq!(
            decode(&cdb(&[0x5f, 0, 0, 0, 0, 0xff, 0, 0, 0, 0]), &G),
            ill(asc::PARAMETER_LIST_LENGTH_ERROR)
        );
        // WRITE SAME with ANCHOR; UNMAP with ANCHOR.
        assert_eq!(
            decode(&cdb(&[0x41, 0x10, 0, 0, 0, 0, 0, 0, 1, 0]), &G),
            ill(asc::INVALID_FIELD_IN_CDB)
        );
        assert_eq!(
            decode(&cdb(&[0x42, 0x01, 0, 0, 0, 0, 0, 0, 24, 0]), &G),
            ill(asc::INVALID_FIELD_IN_CDB)
        );
        // GET LBA STATUS beyond the end.
        let mut c = cdb(&[0x9e, 0x12]);
        c[2..10].copy_from_slice(&2048u64.to_be_bytes());
        assert_eq!(decode(&c, &G), ill(asc::LBA_OUT_OF_RANGE));
    }

    // Proves fixed and descriptor sense formats (SPC-4 §4.5.3, §4.5.2).
    #[test]
    fn sense_formats() {
        let s = Sense::illegal(asc::LBA_OUT_OF_RANGE);
        let f = s.encode(false);
        assert_eq!(f.len(), 18);
        assert_eq!((f[0], f[2], f[7], f[12], f[13]), (0x70, 5, 10, 0x21, 0x00));
        let d = s.encode(true);
        assert_eq!(d, vec![0x72, 5, 0x21, 0, 0, 0, 0, 0]);
        let m = Sense::miscompare(3);
        let f = m.encode(false);
        assert_eq!(f[0], 0xf0);
        assert_eq!(&f[3..7], &[0, 0, 0, 3]);
        assert_eq!(m.encode(true).len(), 20);
        // Field pointer: SKSV and C/D set, CDB byte 2.
        let p = Sense::invalid_cdb_at(2);
        assert_eq!(&p.encode(false)[15..18], &[0xc0, 0, 2]);
        assert_eq!(
            p.encode(true),
            vec![0x72, 5, 0x24, 0, 0, 0, 0, 8, 2, 6, 0, 0, 0xc0, 0, 2, 0]
        );
    }

    // Proves the VPD pages list is sorted and each listed page exists.
    #[test]
    fn vpd_pages() {
        let id = Identity {
            id: 7,
            serial: "abc".into(),
            target_name: "iqn.x:y".into(),
            portal_group_tag: 1,
        };
        let p0 = inquiry_vpd(0, &id, &G).unwrap();
        assert_eq!(&p0[4..], &VPD_PAGES);
        for p in VPD_PAGES {
            let d = inquiry_vpd(p, &id, &G).unwrap();
            assert_eq!(d[1], p);
            assert_eq!(u16::from_be_bytes([d[2], d[3]]) as usize, d.len() - 4);
        }
        assert!(inquiry_vpd(0x99, &id, &G).is_none());
        assert_eq!(inquiry_vpd(0xb0, &id, &G).unwrap().len(), 0x40);
    }

    // Proves MODE SENSE(6) layout with block descriptor and all pages, and
    // that MODE SELECT accepts a D_SENSE change but refuses a fixed bit.
    #[test]
    fn mode_pages() {
        let c = decode(&cdb(&[0x1a, 0, 0x3f, 0, 0xff, 0]), &G).unwrap();
        let m = ModeState::default();
        let d = mode_sense(&c, &G, &m).unwrap();
        assert_eq!(d[0] as usize, d.len() - 1);
        assert_eq!(d[2], 0x10);
        assert_eq!(d[3], 8);
        assert_eq!(&d[4..8], &2048u32.to_be_bytes());
        let c = decode(&cdb(&[0x1a, 0x08, 0x0a, 0, 0xff, 0]), &G).unwrap();
        let d = mode_sense(&c, &G, &m).unwrap();
        let mut sel = d.clone();
        sel[0] = 0;
        sel[4 + 2] |= 0x04;
        let n = mode_select(false, &sel, &G, &m).unwrap();
        assert!(n.d_sense);
        sel[4 + 3] ^= 0x10;
        assert!(mode_select(false, &sel, &G, &m).is_err());
        let c = decode(&cdb(&[0x1a, 0, 0x3e, 0, 0xff, 0]), &G).unwrap();
        assert_eq!(mode_sense(&c, &G, &m), Err(Sense::invalid_cdb()));
    }

    // Proves UNMAP parameter parsing, range checks and short lists.
    #[test]
    fn unmap_lists() {
        let mut d = vec![0u8; 24];
        d[3] = 16;
        d[8..16].copy_from_slice(&10u64.to_be_bytes());
        d[16..20].copy_from_slice(&5u32.to_be_bytes());
        assert_eq!(unmap_ranges(&d, &G).unwrap(), vec![(10, 5)]);
        d[8..16].copy_from_slice(&2047u64.to_be_bytes());
        assert_eq!(
            unmap_ranges(&d, &G),
            Err(Sense::illegal(asc::LBA_OUT_OF_RANGE))
        );
        assert_eq!(
            unmap_ranges(&d[..4], &G),
            Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR))
        );
        assert_eq!(unmap_ranges(&[], &G).unwrap(), vec![]);
    }

    // Proves REPORT SUPPORTED OPERATION CODES for one command and all.
    #[test]
    fn supported_opcodes() {
        let c = decode(&cdb(&[0xa3, 0x0c, 0x01, 0x28, 0, 0, 0, 0, 1, 0, 0, 0]), &G).unwrap();
        let d = report_supported_opcodes(&c).unwrap();
        assert_eq!(d[1] & 7, 3);
        assert_eq!(u16::from_be_bytes([d[2], d[3]]), 10);
        assert_eq!(d[4], 0x28);
        let c = decode(&cdb(&[0xa3, 0x0c, 0x01, 0xee, 0, 0, 0, 0, 1, 0, 0, 0]), &G).unwrap();
        assert_eq!(report_supported_opcodes(&c).unwrap()[1], 1);
        let c = decode(&cdb(&[0xa3, 0x0c, 0x01, 0x5e, 0, 0, 0, 0, 1, 0, 0, 0]), &G).unwrap();
        assert!(report_supported_opcodes(&c).is_err());
        let c = decode(&cdb(&[0xa3, 0x0c, 0x00, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]), &G).unwrap();
        let d = report_supported_opcodes(&c).unwrap();
        assert_eq!(be32(&d) as usize, d.len() - 4);
        assert_eq!((d.len() - 4) % 8, 0);
    }
}
