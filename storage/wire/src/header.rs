//! The fixed-size header of every internal protocol message.
//!
//! Layout (little endian, 64 bytes, `HEADER_SIZE`):
//!
//! | off | size | field          | notes                                           |
//! |-----|------|----------------|-------------------------------------------------|
//! | 0   | 2    | magic          | `MAGIC`                                         |
//! | 2   | 1    | version        | `VERSION`; a peer refuses any other             |
//! | 3   | 1    | op             | [`Op`]; replies have `REPLY_BIT` set            |
//! | 4   | 2    | flags          | [`Flags`]                                       |
//! | 6   | 2    | status         | [`Status`]; zero in requests                    |
//! | 8   | 8    | request_id     | echoed in the reply                             |
//! | 16  | 8    | epoch          | sender's cluster-map epoch                      |
//! | 24  | 8    | volume_id      |                                                 |
//! | 32  | 8    | chunk_version  | per-chunk version (replication orders by it)    |
//! | 40  | 4    | chunk_index    |                                                 |
//! | 44  | 4    | disk_id        | the disk the request is addressed to            |
//! | 48  | 4    | offset         | byte offset inside the chunk                    |
//! | 52  | 4    | length         | bytes addressed by the request                  |
//! | 56  | 4    | payload_len    | bytes of payload that follow this header        |
//! | 60  | 4    | header_crc     | CRC32C of bytes 0..60                           |
//!
//! A payload, when present, follows the header and is protected by its own
//! CRC32C carried as the last 4 bytes of the payload section (`payload_len`
//! includes those 4 bytes), so a receiver can validate the header before it
//! has read the payload, and the payload before it uses it.
//!
//! Decoding validates every field that can be checked without context
//! (magic, version, op, flags, status, sizes, alignment); the receiver then
//! validates the rest (epoch, volume, disk, chunk bounds) against its map.

use thiserror::Error;

pub const MAGIC: u16 = 0x5453; // "TS"
pub const VERSION: u8 = 1;
pub const HEADER_SIZE: usize = 64;
/// Replies carry the request's op with this bit set.
pub const REPLY_BIT: u8 = 0x80;
/// Largest payload a peer accepts in one message (data plus its CRC).
/// Bounds the memory one in-flight request can pin.
pub const PAYLOAD_MAX_BYTES: u32 = 8 * 1024 * 1024 + 4;
/// Largest `length` a request may address. Reads return this many bytes,
/// so it must fit in a payload together with the trailing CRC.
pub const REQUEST_LENGTH_MAX_BYTES: u32 = 8 * 1024 * 1024;
/// Largest range one COMPARE AND WRITE addresses: its payload holds the
/// range twice (what to compare, what to write).
pub const COMPARE_LENGTH_MAX_BYTES: u32 = 1024 * 1024;
/// The unit in which offsets and lengths of data requests must be aligned.
pub const SECTOR_BYTES: u32 = 512;

const _: () = assert!(HEADER_SIZE == 64);
const _: () = assert!(REQUEST_LENGTH_MAX_BYTES + 4 <= PAYLOAD_MAX_BYTES);
const _: () = assert!(2 * COMPARE_LENGTH_MAX_BYTES + 4 <= PAYLOAD_MAX_BYTES);

/// Operations of the internal protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// First message on a connection: payload is the cluster id (UTF-8).
    Hello = 1,
    Read = 2,
    Write = 3,
    /// Make every write this disk has completed durable.
    Flush = 4,
    /// Deallocate the range; it reads back as zeroes.
    Trim = 5,
    /// Make the range read as zeroes, deallocating where whole blocks allow.
    WriteZeroes = 6,
    /// Reply payload: one bit per 4 KiB block of the range, 1 = allocated.
    BlockStatus = 7,
    Ping = 8,
    /// Storage daemon to storage daemon: one replication message about one
    /// placement group (payload: `tessera_storage::replication::codec`),
    /// addressed to `disk_id`, sent under the sender's `epoch`. One-way: the
    /// reply only acknowledges receipt.
    Repl = 9,
    /// Gateway to the primary of a chunk: compare the range with the first
    /// `length` bytes of the payload and, only if they are equal, write the
    /// next `length` bytes there, atomically against every other change of
    /// the range (SCSI COMPARE AND WRITE, which VMware's ATS locking relies
    /// on: only the primary sees every write to a chunk, whichever gateway
    /// sent it). `chunk_version` carries the request's token (unique per
    /// gateway process and request): a resent request whose first attempt
    /// wrote is answered `Ok` again instead of comparing against its own
    /// write. A difference is answered `Miscompare`.
    CompareAndWrite = 10,
}

impl Op {
    pub fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Hello,
            2 => Op::Read,
            3 => Op::Write,
            4 => Op::Flush,
            5 => Op::Trim,
            6 => Op::WriteZeroes,
            7 => Op::BlockStatus,
            8 => Op::Ping,
            9 => Op::Repl,
            10 => Op::CompareAndWrite,
            _ => return None,
        })
    }

    /// Ops that address a byte range of a chunk.
    pub fn is_ranged(self) -> bool {
        matches!(
            self,
            Op::Read
                | Op::Write
                | Op::Trim
                | Op::WriteZeroes
                | Op::BlockStatus
                | Op::CompareAndWrite
        )
    }
}

/// Request flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Flags(pub u16);

impl Flags {
    /// Force unit access: the write is durable before it is acknowledged.
    pub const FUA: Flags = Flags(1);
    pub const ALL: u16 = 1;

    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
}

/// Reply status codes. Zero is success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Status {
    Ok = 0,
    /// The disk returned an I/O error.
    Io = 1,
    /// A block failed its CRC32C check on read; no data is returned.
    Checksum = 2,
    /// The request was malformed or out of range.
    Invalid = 3,
    /// The request was sent under an epoch older than the daemon's.
    StaleEpoch = 4,
    /// This disk does not hold the chunk's placement group in the daemon's map.
    WrongDisk = 5,
    NoSpace = 6,
    UnknownVolume = 7,
    /// Too many requests in flight; retry later.
    Busy = 8,
    /// The payload did not match its CRC32C.
    BadPayloadCrc = 9,
    ShuttingDown = 10,
    /// The peer belongs to another cluster or speaks another version.
    Refused = 11,
    /// COMPARE AND WRITE found a difference and wrote nothing; the reply's
    /// `chunk_version` is the byte offset of the first difference within
    /// the compared range.
    Miscompare = 12,
}

impl Status {
    pub fn from_u16(v: u16) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::Io,
            2 => Status::Checksum,
            3 => Status::Invalid,
            4 => Status::StaleEpoch,
            5 => Status::WrongDisk,
            6 => Status::NoSpace,
            7 => Status::UnknownVolume,
            8 => Status::Busy,
            9 => Status::BadPayloadCrc,
            10 => Status::ShuttingDown,
            11 => Status::Refused,
            12 => Status::Miscompare,
            _ => return None,
        })
    }

    /// Whether a client should retry the same request (possibly after
    /// refreshing its map or reconnecting).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Status::StaleEpoch
                | Status::WrongDisk
                | Status::Busy
                | Status::BadPayloadCrc
                | Status::ShuttingDown
        )
    }
}

/// A decoded, validated header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    pub op: Op,
    pub reply: bool,
    pub flags: Flags,
    pub status: Status,
    pub request_id: u64,
    pub epoch: u64,
    pub volume_id: u64,
    pub chunk_version: u64,
    pub chunk_index: u32,
    pub disk_id: u32,
    pub offset: u32,
    pub length: u32,
    pub payload_len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HeaderError {
    #[error("bad magic {0:#06x}")]
    Magic(u16),
    #[error("unsupported protocol version {0}")]
    Version(u8),
    #[error("header checksum mismatch")]
    HeaderCrc,
    #[error("unknown op {0}")]
    Op(u8),
    #[error("unknown flags {0:#x}")]
    Flags(u16),
    #[error("unknown status {0}")]
    Status(u16),
    #[error("status set in a request")]
    StatusInRequest,
    #[error("payload of {0} bytes exceeds the maximum")]
    PayloadTooLarge(u32),
    #[error("request length {0} exceeds the maximum")]
    LengthTooLarge(u32),
    #[error("offset or length not aligned to 512 bytes")]
    Unaligned,
    #[error("payload length does not match the operation")]
    PayloadMismatch,
    #[error("zero-length ranged request")]
    ZeroLength,
}

impl Header {
    /// A request header with every optional field zeroed.
    pub fn request(op: Op, request_id: u64, epoch: u64) -> Header {
        Header {
            op,
            reply: false,
            flags: Flags::default(),
            status: Status::Ok,
            request_id,
            epoch,
            volume_id: 0,
            chunk_version: 0,
            chunk_index: 0,
            disk_id: 0,
            offset: 0,
            length: 0,
            payload_len: 0,
        }
    }

    /// The reply to `self`, with the addressing fields echoed.
    pub fn reply_to(&self, status: Status, epoch: u64, payload_len: u32) -> Header {
        Header {
            reply: true,
            status,
            epoch,
            payload_len,
            flags: Flags::default(),
            ..*self
        }
    }

    pub fn encode(&self, out: &mut [u8; HEADER_SIZE]) {
        out[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        out[2] = VERSION;
        out[3] = self.op as u8 | if self.reply { REPLY_BIT } else { 0 };
        out[4..6].copy_from_slice(&self.flags.0.to_le_bytes());
        out[6..8].copy_from_slice(&(self.status as u16).to_le_bytes());
        out[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        out[16..24].copy_from_slice(&self.epoch.to_le_bytes());
        out[24..32].copy_from_slice(&self.volume_id.to_le_bytes());
        out[32..40].copy_from_slice(&self.chunk_version.to_le_bytes());
        out[40..44].copy_from_slice(&self.chunk_index.to_le_bytes());
        out[44..48].copy_from_slice(&self.disk_id.to_le_bytes());
        out[48..52].copy_from_slice(&self.offset.to_le_bytes());
        out[52..56].copy_from_slice(&self.length.to_le_bytes());
        out[56..60].copy_from_slice(&self.payload_len.to_le_bytes());
        let crc = crate::crc32c(&out[0..60]);
        out[60..64].copy_from_slice(&crc.to_le_bytes());
    }

    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        self.encode(&mut b);
        b
    }

    /// Decode and validate a header received from the network.
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Result<Header, HeaderError> {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));

        let magic = u16_at(0);
        if magic != MAGIC {
            return Err(HeaderError::Magic(magic));
        }
        if b[2] != VERSION {
            return Err(HeaderError::Version(b[2]));
        }
        if crate::crc32c(&b[0..60]) != u32_at(60) {
            return Err(HeaderError::HeaderCrc);
        }
        let reply = b[3] & REPLY_BIT != 0;
        let op = Op::from_u8(b[3] & !REPLY_BIT).ok_or(HeaderError::Op(b[3]))?;
        let flags = u16_at(4);
        if flags & !Flags::ALL != 0 {
            return Err(HeaderError::Flags(flags));
        }
        let status_raw = u16_at(6);
        let status = Status::from_u16(status_raw).ok_or(HeaderError::Status(status_raw))?;
        if !reply && status != Status::Ok {
            return Err(HeaderError::StatusInRequest);
        }
        let h = Header {
            op,
            reply,
            flags: Flags(flags),
            status,
            request_id: u64_at(8),
            epoch: u64_at(16),
            volume_id: u64_at(24),
            chunk_version: u64_at(32),
            chunk_index: u32_at(40),
            disk_id: u32_at(44),
            offset: u32_at(48),
            length: u32_at(52),
            payload_len: u32_at(56),
        };
        h.validate()?;
        Ok(h)
    }

    /// Checks that hold for any well-formed message, whatever the receiver's
    /// state.
    fn validate(&self) -> Result<(), HeaderError> {
        if self.payload_len > PAYLOAD_MAX_BYTES {
            return Err(HeaderError::PayloadTooLarge(self.payload_len));
        }
        if self.op.is_ranged() {
            if self.length > REQUEST_LENGTH_MAX_BYTES
                || self.op == Op::CompareAndWrite && self.length > COMPARE_LENGTH_MAX_BYTES
            {
                return Err(HeaderError::LengthTooLarge(self.length));
            }
            if self.length == 0 {
                return Err(HeaderError::ZeroLength);
            }
            if !self.offset.is_multiple_of(SECTOR_BYTES)
                || !self.length.is_multiple_of(SECTOR_BYTES)
            {
                return Err(HeaderError::Unaligned);
            }
        }
        let expected = self.expected_payload_len();
        if let Some(n) = expected
            && n != self.payload_len
        {
            return Err(HeaderError::PayloadMismatch);
        }
        Ok(())
    }

    /// The payload size this header implies, when it is fixed by the op.
    /// `None` for payloads whose size is free (Hello) or depends on status.
    pub fn expected_payload_len(&self) -> Option<u32> {
        let with_crc = |n: u32| n + 4;
        match (self.op, self.reply) {
            (Op::Hello, _) | (Op::Repl, false) => None,
            (Op::Write, false) => Some(with_crc(self.length)),
            (Op::CompareAndWrite, false) => Some(with_crc(2 * self.length)),
            (Op::Read, true) if self.status == Status::Ok => Some(with_crc(self.length)),
            (Op::BlockStatus, true) if self.status == Status::Ok => {
                Some(with_crc(block_status_bytes(self.length)))
            }
            _ => Some(0),
        }
    }
}

/// Bytes of the BlockStatus bitmap for a range of `length` bytes: one bit
/// per 4 KiB block touched (rounded up), padded to whole bytes.
pub fn block_status_bytes(length: u32) -> u32 {
    let blocks = length.div_ceil(4096);
    blocks.div_ceil(8)
}

/// Append the payload CRC to `data`, producing the wire payload section.
pub fn seal_payload(data: &mut Vec<u8>) {
    let crc = crate::crc32c(data);
    data.extend_from_slice(&crc.to_le_bytes());
}

/// Check a received payload section (data followed by its CRC32C) and
/// return the data part.
pub fn open_payload(section: &[u8]) -> Option<&[u8]> {
    if section.len() < 4 {
        return None;
    }
    let (data, crc) = section.split_at(section.len() - 4);
    let crc = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    (crate::crc32c(data) == crc).then_some(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Header {
        let mut h = Header::request(Op::Write, 7, 3);
        h.volume_id = 42;
        h.chunk_index = 9;
        h.disk_id = 2;
        h.offset = 4096;
        h.length = 8192;
        h.payload_len = 8196;
        h.flags = Flags::FUA;
        h
    }

    // Proves the golden layout: field offsets are what the module table says.
    #[test]
    fn golden_bytes() {
        let b = sample().to_bytes();
        assert_eq!(&b[0..2], &[0x53, 0x54]);
        assert_eq!(b[2], 1);
        assert_eq!(b[3], 3);
        assert_eq!(&b[4..6], &[1, 0]);
        assert_eq!(&b[8..16], &7u64.to_le_bytes());
        assert_eq!(&b[16..24], &3u64.to_le_bytes());
        assert_eq!(&b[24..32], &42u64.to_le_bytes());
        assert_eq!(&b[40..44], &9u32.to_le_bytes());
        assert_eq!(&b[44..48], &2u32.to_le_bytes());
        assert_eq!(&b[48..52], &4096u32.to_le_bytes());
        assert_eq!(&b[52..56], &8192u32.to_le_bytes());
        assert_eq!(&b[56..60], &8196u32.to_le_bytes());
        assert_eq!(Header::decode(&b), Ok(sample()));
    }

    fn reencode(mut f: impl FnMut(&mut [u8; HEADER_SIZE])) -> [u8; HEADER_SIZE] {
        let mut b = sample().to_bytes();
        f(&mut b);
        let crc = crate::crc32c(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    // Proves every rejection branch of decode is reachable and named.
    #[test]
    fn rejects_each_malformed_field() {
        let mut b = sample().to_bytes();
        b[0] = 0;
        assert!(matches!(Header::decode(&b), Err(HeaderError::Magic(_))));
        let b = reencode(|b| b[2] = 9);
        assert_eq!(Header::decode(&b), Err(HeaderError::Version(9)));
        let mut b = sample().to_bytes();
        b[30] ^= 1;
        assert_eq!(Header::decode(&b), Err(HeaderError::HeaderCrc));
        let b = reencode(|b| b[3] = 77);
        assert_eq!(Header::decode(&b), Err(HeaderError::Op(77)));
        let b = reencode(|b| b[4] = 0x10);
        assert_eq!(Header::decode(&b), Err(HeaderError::Flags(0x10)));
        let b = reencode(|b| b[6] = 200);
        assert_eq!(Header::decode(&b), Err(HeaderError::Status(200)));
        let b = reencode(|b| b[6] = 1);
        assert_eq!(Header::decode(&b), Err(HeaderError::StatusInRequest));
        let b = reencode(|b| b[56..60].copy_from_slice(&(PAYLOAD_MAX_BYTES + 1).to_le_bytes()));
        assert!(matches!(
            Header::decode(&b),
            Err(HeaderError::PayloadTooLarge(_))
        ));
        let b = reencode(|b| {
            b[52..56].copy_from_slice(&(REQUEST_LENGTH_MAX_BYTES + 512).to_le_bytes())
        });
        assert!(matches!(
            Header::decode(&b),
            Err(HeaderError::LengthTooLarge(_))
        ));
        let b = reencode(|b| b[52..56].copy_from_slice(&0u32.to_le_bytes()));
        assert_eq!(Header::decode(&b), Err(HeaderError::ZeroLength));
        let b = reencode(|b| b[48..52].copy_from_slice(&100u32.to_le_bytes()));
        assert_eq!(Header::decode(&b), Err(HeaderError::Unaligned));
        let b = reencode(|b| b[56..60].copy_from_slice(&10u32.to_le_bytes()));
        assert_eq!(Header::decode(&b), Err(HeaderError::PayloadMismatch));
    }

    // Proves a COMPARE AND WRITE carries its range twice and is bounded by
    // its own, smaller, length limit.
    #[test]
    fn compare_and_write_sizes() {
        let mut h = Header::request(Op::CompareAndWrite, 1, 1);
        h.length = 4096;
        h.payload_len = 2 * 4096 + 4;
        assert_eq!(Header::decode(&h.to_bytes()), Ok(h));
        h.payload_len = 4096 + 4;
        assert_eq!(
            Header::decode(&h.to_bytes()),
            Err(HeaderError::PayloadMismatch)
        );
        h.length = COMPARE_LENGTH_MAX_BYTES + 512;
        h.payload_len = 2 * h.length + 4;
        assert!(matches!(
            Header::decode(&h.to_bytes()),
            Err(HeaderError::LengthTooLarge(_))
        ));
        let mut r = Header::request(Op::CompareAndWrite, 1, 1).reply_to(Status::Miscompare, 1, 0);
        r.length = 512;
        r.chunk_version = 17;
        assert_eq!(Header::decode(&r.to_bytes()), Ok(r));
    }

    #[test]
    fn payload_seal_and_open() {
        let mut p = b"hello".to_vec();
        seal_payload(&mut p);
        assert_eq!(open_payload(&p), Some(&b"hello"[..]));
        p[0] ^= 1;
        assert_eq!(open_payload(&p), None);
        assert_eq!(open_payload(&[1, 2]), None);
    }

    fn arb_header() -> impl Strategy<Value = Header> {
        (
            1u8..=10,
            any::<bool>(),
            0u16..=1,
            0u16..=12,
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            0u32..1_000_000,
            1u32..=(REQUEST_LENGTH_MAX_BYTES / 512),
        )
            .prop_map(
                |(op, reply, flags, status, rid, epoch, vol, ver, chunk, disk, off, len)| {
                    let op = Op::from_u8(op).expect("valid op");
                    let len = if op == Op::CompareAndWrite {
                        len.min(COMPARE_LENGTH_MAX_BYTES / 512)
                    } else {
                        len
                    };
                    let status = if reply {
                        Status::from_u16(status).expect("valid")
                    } else {
                        Status::Ok
                    };
                    let mut h = Header {
                        op,
                        reply,
                        flags: Flags(flags),
                        status,
                        request_id: rid,
                        epoch,
                        volume_id: vol,
                        chunk_version: ver,
                        chunk_index: chunk,
                        disk_id: disk,
                        offset: off * 512,
                        length: len * 512,
                        payload_len: 0,
                    };
                    h.payload_len = h.expected_payload_len().unwrap_or(17);
                    h
                },
            )
    }

    proptest! {
        // Proves decode(encode(h)) == h for every valid header.
        #[test]
        fn roundtrip(h in arb_header()) {
            prop_assert_eq!(Header::decode(&h.to_bytes()), Ok(h));
        }

        // Proves decode never panics on arbitrary bytes.
        #[test]
        fn decode_total(bytes in proptest::collection::vec(any::<u8>(), HEADER_SIZE)) {
            let b: [u8; HEADER_SIZE] = bytes.try_into().expect("64 bytes");
            let _ = Header::decode(&b);
        }
    }
}
