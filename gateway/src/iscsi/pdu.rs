//! iSCSI PDU codec (RFC 7143 §11): framing of the 48-byte Basic Header
//! Segment, Additional Header Segments, data segment with padding, and the
//! optional CRC32C header and data digests (§13.1).
//!
//! Pure and synchronous: bytes in, [`Pdu`] out, and back. A [`Pdu`] keeps
//! its BHS as raw bytes with typed accessors per field, so that a PDU can be
//! echoed verbatim in a Reject (§11.17.1 "the complete header of the bad
//! PDU"). Field validation that needs session state (sequence numbers,
//! negotiated lengths) belongs to the session; here only framing limits are
//! enforced: the data segment may not exceed `data_max` and the AHS length
//! is whatever the one-byte field says (at most 1020 bytes).

use thiserror::Error;

/// §11.2.1: every PDU starts with a 48-byte Basic Header Segment.
pub const BHS_BYTES: usize = 48;
/// §13.1: CRC32C digests are 4 bytes.
pub const DIGEST_BYTES: usize = 4;
/// §11.2.1.5: DataSegmentLength is 24 bits.
pub const DATA_SEGMENT_FIELD_MAX: usize = (1 << 24) - 1;
/// The ITT/TTT value meaning "reserved / none" (§11.2.1.8, §11.18.2).
pub const TAG_NONE: u32 = 0xffff_ffff;

/// Opcodes (§11.2.1.2). Initiator opcodes 0x00-0x1f, target 0x20-0x3f.
pub mod op {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MGMT_REQUEST: u8 = 0x02;
    pub const LOGIN_REQUEST: u8 = 0x03;
    pub const TEXT_REQUEST: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQUEST: u8 = 0x06;
    pub const SNACK_REQUEST: u8 = 0x10;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MGMT_RESPONSE: u8 = 0x22;
    pub const LOGIN_RESPONSE: u8 = 0x23;
    pub const TEXT_RESPONSE: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MESSAGE: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (§11.17.1).
pub mod reject {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const SNACK_REJECT: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    pub const INVALID_DATA_ACK: u8 = 0x08;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const LONG_OP_REJECT: u8 = 0x0a;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

// Flag bits of byte 1.
/// F (final) bit of most PDUs (§11.2.1.3 opcode-specific).
pub const FLAG_FINAL: u8 = 0x80;
/// SCSI Command R bit (§11.3.1).
pub const FLAG_READ: u8 = 0x40;
/// SCSI Command W bit (§11.3.2).
pub const FLAG_WRITE: u8 = 0x20;
/// Text/Login C (continue) bit (§11.10.2, §11.12.2).
pub const FLAG_CONTINUE: u8 = 0x40;
/// Login T (transit) bit (§11.12.1).
pub const FLAG_TRANSIT: u8 = 0x80;
/// Data-In A (acknowledge) bit (§11.7.2).
pub const FLAG_ACK: u8 = 0x40;
/// Residual overflow O (§11.4.5.1).
pub const FLAG_OVERFLOW: u8 = 0x04;
/// Residual underflow U (§11.4.5.1).
pub const FLAG_UNDERFLOW: u8 = 0x02;
/// Data-In S (status) bit (§11.7.3).
pub const FLAG_STATUS: u8 = 0x01;
/// I (immediate) bit in byte 0 (§11.2.1.1).
pub const IMMEDIATE: u8 = 0x40;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Error {
    /// §13.1: the header digest did not match; the connection cannot trust
    /// its framing any more and must close (ERL 0).
    #[error("header digest mismatch")]
    HeaderDigest,
    /// §13.1: the data digest did not match; the PDU header is still good.
    #[error("data digest mismatch")]
    DataDigest,
    #[error("data segment of {0} bytes exceeds the negotiated maximum")]
    DataTooLong(usize),
}

/// Which digests are in force on a connection (§13.1, §6.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// A PDU: raw BHS plus AHS and the data segment without padding or digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: [u8; BHS_BYTES],
    pub ahs: Vec<u8>,
    pub data: Vec<u8>,
}

/// §11.2.1.5: bytes padding a data segment of `n` bytes to a word.
pub fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

pub fn crc32c(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

impl Pdu {
    /// A zeroed PDU with the given opcode in byte 0.
    pub fn new(opcode: u8) -> Pdu {
        let mut bhs = [0u8; BHS_BYTES];
        bhs[0] = opcode & 0x3f;
        Pdu {
            bhs,
            ahs: Vec::new(),
            data: Vec::new(),
        }
    }

    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }
    pub fn immediate(&self) -> bool {
        self.bhs[0] & IMMEDIATE != 0
    }
    pub fn set_immediate(&mut self) {
        self.bhs[0] |= IMMEDIATE;
    }
    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }
    pub fn set_flags(&mut self, f: u8) {
        self.bhs[1] = f;
    }
    pub fn final_bit(&self) -> bool {
        self.bhs[1] & FLAG_FINAL != 0
    }
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_be_bytes(self.bhs[off..off + 4].try_into().expect("4 bytes"))
    }
    pub fn set_u32_at(&mut self, off: usize, v: u32) {
        self.bhs[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }
    /// §11.2.1.4: TotalAHSLength in 4-byte words.
    pub fn total_ahs_bytes(&self) -> usize {
        self.bhs[4] as usize * 4
    }
    /// §11.2.1.5: DataSegmentLength, 24 bits.
    pub fn data_segment_len(&self) -> usize {
        u32::from_be_bytes([0, self.bhs[5], self.bhs[6], self.bhs[7]]) as usize
    }
    /// §11.2.1.6: LUN field (8 bytes).
    pub fn lun(&self) -> u64 {
        u64::from_be_bytes(self.bhs[8..16].try_into().expect("8 bytes"))
    }
    pub fn set_lun(&mut self, lun: u64) {
        self.bhs[8..16].copy_from_slice(&lun.to_be_bytes());
    }
    /// §11.2.1.8: Initiator Task Tag.
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    pub fn set_itt(&mut self, v: u32) {
        self.set_u32_at(16, v)
    }
    /// Bytes 20..24: TTT (Data-Out, NOP, Text, R2T), EDTL (SCSI Command),
    /// Referenced Task Tag (TMF).
    pub fn field20(&self) -> u32 {
        self.u32_at(20)
    }
    /// Bytes 24..28: CmdSN (requests) / StatSN (responses).
    pub fn field24(&self) -> u32 {
        self.u32_at(24)
    }
    /// Bytes 28..32: ExpStatSN (requests) / ExpCmdSN (responses).
    pub fn field28(&self) -> u32 {
        self.u32_at(28)
    }
    /// Bytes 32..36: RefCmdSN (TMF) / MaxCmdSN (responses).
    pub fn field32(&self) -> u32 {
        self.u32_at(32)
    }
    /// Bytes 36..40: DataSN / R2TSN / ExpDataSN.
    pub fn field36(&self) -> u32 {
        self.u32_at(36)
    }
    /// Bytes 40..44: Buffer Offset.
    pub fn field40(&self) -> u32 {
        self.u32_at(40)
    }
    pub fn field44(&self) -> u32 {
        self.u32_at(44)
    }
    /// SCSI Command CDB (§11.3.5), bytes 32..48.
    pub fn cdb(&self) -> &[u8] {
        &self.bhs[32..48]
    }

    /// Encode with the given digests: BHS, AHS, header digest, data, pad,
    /// data digest (§11.1). Sets TotalAHSLength and DataSegmentLength.
    pub fn encode(&self, digests: Digests, out: &mut Vec<u8>) {
        self.encode_header(self.data.len(), digests, out);
        out.extend_from_slice(&self.data);
        encode_trailer(&self.data, digests, out);
    }

    /// Encode the header part only (BHS, AHS, header digest) for a data
    /// segment of `data_len` bytes that the caller sends from where it lies
    /// (`self.data` is ignored), followed by [`encode_trailer`] of that
    /// segment: together the same bytes as [`Pdu::encode`] with that data.
    pub fn encode_header(&self, data_len: usize, digests: Digests, out: &mut Vec<u8>) {
        assert!(
            self.ahs.len().is_multiple_of(4),
            "AHS is a whole number of words"
        );
        assert!(self.ahs.len() / 4 <= 255);
        assert!(data_len <= DATA_SEGMENT_FIELD_MAX);
        let start = out.len();
        let mut bhs = self.bhs;
        bhs[4] = (self.ahs.len() / 4) as u8;
        let dl = (data_len as u32).to_be_bytes();
        bhs[5..8].copy_from_slice(&dl[1..4]);
        out.extend_from_slice(&bhs);
        out.extend_from_slice(&self.ahs);
        if digests.header {
            let crc = crc32c(&out[start..]);
            out.extend_from_slice(&crc.to_le_bytes());
        }
    }

    pub fn to_bytes(&self, digests: Digests) -> Vec<u8> {
        let mut v = Vec::with_capacity(BHS_BYTES + self.data.len() + 12);
        self.encode(digests, &mut v);
        v
    }
}

/// §11.2.1.5 / §13.1: what follows a data segment of `data`: the pad to a
/// 4-byte boundary and, when negotiated, the data digest (computed over the
/// segment where it lies, then the pad). Nothing for an empty segment.
pub fn encode_trailer(data: &[u8], digests: Digests, out: &mut Vec<u8>) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(&[0u8; 3][..pad4(data.len())]);
    if digests.data {
        out.extend_from_slice(&data_digest(data).to_le_bytes());
    }
}

/// §13.1: the DataDigest of a data segment we send: CRC32C over the data
/// and its pad bytes (zeroes).
pub fn data_digest(data: &[u8]) -> u32 {
    data_digest_padded(data, &[0u8; 3][..pad4(data.len())])
}

/// The DataDigest of a received segment: over the data and the pad bytes
/// as they came (§11.2.1.5 asks senders for zeroes; the digest covers what
/// was sent).
pub fn data_digest_padded(data: &[u8], pad: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c(data), pad)
}

/// Bytes after a data segment of `data_len` bytes: pad, and data digest
/// when negotiated (0 for an empty segment).
pub fn trailer_len(data_len: usize, digests: Digests) -> usize {
    if data_len == 0 {
        return 0;
    }
    pad4(data_len) + if digests.data { DIGEST_BYTES } else { 0 }
}

/// Total bytes of the PDU whose BHS starts `buf` (which must hold at least
/// [`BHS_BYTES`]), with the given digests.
pub fn frame_len(bhs: &[u8], digests: Digests) -> usize {
    assert!(bhs.len() >= BHS_BYTES);
    let ahs = bhs[4] as usize * 4;
    let dl = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
    let mut n = BHS_BYTES + ahs;
    if digests.header {
        n += DIGEST_BYTES;
    }
    if dl > 0 {
        n += dl + pad4(dl);
        if digests.data {
            n += DIGEST_BYTES;
        }
    }
    n
}

/// Check the header part of a PDU as soon as its BHS (+AHS + digest) is
/// there: the header digest, then the data length limit. Returns the full
/// frame length. `buf` must hold the header and its digest.
pub fn check_header(buf: &[u8], digests: Digests, data_max: usize) -> Result<usize, Error> {
    let ahs = buf[4] as usize * 4;
    if digests.header {
        let h = BHS_BYTES + ahs;
        let got = u32::from_le_bytes(buf[h..h + 4].try_into().expect("4 bytes"));
        if crc32c(&buf[..h]) != got {
            return Err(Error::HeaderDigest);
        }
    }
    let dl = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]) as usize;
    if dl > data_max {
        return Err(Error::DataTooLong(dl));
    }
    Ok(frame_len(buf, digests))
}

/// Bytes of the header part (BHS + AHS + header digest) of the PDU whose BHS
/// starts `bhs`.
pub fn header_len(bhs: &[u8], digests: Digests) -> usize {
    BHS_BYTES + bhs[4] as usize * 4 + if digests.header { DIGEST_BYTES } else { 0 }
}

/// Decode one PDU from the front of `buf`. `Ok(None)`: more bytes needed.
/// On [`Error::DataDigest`] the frame length is still known, so the caller
/// can reject that PDU and go on: the error carries it through `used`.
pub fn decode(
    buf: &[u8],
    digests: Digests,
    data_max: usize,
) -> Result<Option<(Pdu, usize)>, (Error, usize)> {
    if buf.len() < BHS_BYTES {
        return Ok(None);
    }
    let hl = header_len(buf, digests);
    if buf.len() < hl {
        return Ok(None);
    }
    let total = check_header(buf, digests, data_max).map_err(|e| (e, 0))?;
    if buf.len() < total {
        return Ok(None);
    }
    let mut bhs = [0u8; BHS_BYTES];
    bhs.copy_from_slice(&buf[..BHS_BYTES]);
    let ahs_len = buf[4] as usize * 4;
    let ahs = buf[BHS_BYTES..BHS_BYTES + ahs_len].to_vec();
    let dl = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]) as usize;
    let data = buf[hl..hl + dl].to_vec();
    if dl > 0 && digests.data {
        let padded = dl + pad4(dl);
        let got = u32::from_le_bytes(buf[hl + padded..hl + padded + 4].try_into().expect("4"));
        if crc32c(&buf[hl..hl + padded]) != got {
            return Err((Error::DataDigest, total));
        }
    }
    Ok(Some((Pdu { bhs, ahs, data }, total)))
}

/// 32-bit serial number arithmetic (RFC 1982, as §4.2.2.1 requires for
/// CmdSN, StatSN and friends): `a < b`.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && (b.wrapping_sub(a) as i32) > 0
}

pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nop_out() -> Pdu {
        let mut p = Pdu::new(op::NOP_OUT);
        p.set_immediate();
        p.set_flags(FLAG_FINAL);
        p.set_itt(0x1234);
        p.set_u32_at(20, TAG_NONE);
        p.set_u32_at(24, 7);
        p.data = b"ping!".to_vec();
        p
    }

    // Proves the golden encoding of a NOP-Out with 5 data bytes: opcode with
    // I bit, F bit, DataSegmentLength 5, and 3 pad bytes (§11.18).
    #[test]
    fn golden_nop_out() {
        let b = nop_out().to_bytes(Digests::default());
        assert_eq!(b.len(), 48 + 8);
        assert_eq!(&b[0..8], &[0x40, 0x80, 0, 0, 0, 0, 0, 5]);
        assert_eq!(&b[16..24], &[0, 0, 0x12, 0x34, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(&b[48..56], b"ping!\0\0\0");
    }

    // Proves decode(encode(x)) == x with and without digests, and that the
    // frame length accounts for each part.
    #[test]
    fn roundtrip_with_digests() {
        for d in [
            Digests::default(),
            Digests {
                header: true,
                data: false,
            },
            Digests {
                header: false,
                data: true,
            },
            Digests {
                header: true,
                data: true,
            },
        ] {
            let p = nop_out();
            let b = p.to_bytes(d);
            assert_eq!(frame_len(&b, d), b.len());
            let (q, used) = decode(&b, d, 8192).expect("ok").expect("complete");
            assert_eq!(used, b.len());
            assert_eq!(q.data, p.data);
            assert_eq!(&q.bhs[8..], &p.bhs[8..]);
            // Partial input asks for more.
            assert_eq!(decode(&b[..b.len() - 1], d, 8192), Ok(None));
        }
    }

    // Proves the CRC32C digest is the Castagnoli CRC of the header sent
    // little-endian: the RFC 3720 B.4 test vector (32 bytes of zeroes gives
    // 0x8a9136aa) is the check value we rely on.
    #[test]
    fn crc32c_vector() {
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        let b = nop_out().to_bytes(Digests {
            header: true,
            data: false,
        });
        let crc = crc32c(&b[..48]);
        assert_eq!(&b[48..52], &crc.to_le_bytes());
    }

    // Proves each rejection branch: header digest, data digest (with the
    // frame length so the caller can skip it), oversized data segment.
    #[test]
    fn rejections() {
        let d = Digests {
            header: true,
            data: true,
        };
        let mut b = nop_out().to_bytes(d);
        b[20] ^= 1;
        assert_eq!(decode(&b, d, 8192), Err((Error::HeaderDigest, 0)));
        let mut b = nop_out().to_bytes(d);
        let n = b.len();
        b[n - 5] ^= 1;
        assert_eq!(decode(&b, d, 8192), Err((Error::DataDigest, n)));
        let b = nop_out().to_bytes(Digests::default());
        assert_eq!(
            decode(&b, Digests::default(), 4),
            Err((Error::DataTooLong(5), 0))
        );
    }

    // Proves a PDU sent in pieces (header, the data from where it lies,
    // trailer) is byte for byte what encode makes, for every digest setting
    // and pad length, and that the data digest covers data and pad.
    #[test]
    fn split_encoding_matches() {
        for d in [
            Digests::default(),
            Digests {
                header: true,
                data: true,
            },
            Digests {
                header: false,
                data: true,
            },
        ] {
            for n in [0usize, 1, 2, 3, 4, 5, 4096, 8191] {
                let mut p = nop_out();
                p.data = (0..n).map(|i| (i * 13 % 256) as u8).collect();
                let whole = p.to_bytes(d);
                let mut split = Vec::new();
                p.encode_header(p.data.len(), d, &mut split);
                split.extend_from_slice(&p.data);
                encode_trailer(&p.data, d, &mut split);
                assert_eq!(split, whole, "{d:?} {n}");
                assert_eq!(header_len(&whole, d) + n + trailer_len(n, d), whole.len());
                let mut padded = p.data.clone();
                padded.resize(n + pad4(n), 0);
                assert_eq!(data_digest(&p.data), crc32c(&padded));
            }
        }
    }

    // Proves AHS bytes are framed and kept (§11.2.1.4).
    #[test]
    fn ahs_framing() {
        let mut p = nop_out();
        p.ahs = vec![0, 5, 2, 0, 1, 2, 3, 4];
        let b = p.to_bytes(Digests::default());
        assert_eq!(b[4], 2);
        let (q, _) = decode(&b, Digests::default(), 8192).unwrap().unwrap();
        assert_eq!(q.ahs, p.ahs);
    }

    // Proves serial number arithmetic wraps (RFC 1982).
    #[test]
    fn serial_numbers() {
        assert!(sn_lt(1, 2));
        assert!(sn_lt(0xffff_fff0, 3));
        assert!(!sn_lt(3, 0xffff_fff0));
        assert!(sn_le(5, 5));
        assert!(!sn_lt(5, 5));
    }
}
