//! NBD wire codec: pure, synchronous encoding and decoding of the messages of
//! the fixed-newstyle handshake and of the transmission phase (simple replies).
//!
//! Every constant cites the section of the NBD protocol specification
//! (`doc/proto.md` in NetworkBlockDevice/nbd) it comes from. Decoders validate
//! every field they can without context; [`check_request`] validates a request
//! against the export it addresses. Nothing here does I/O or reads a clock.
//!
//! Structured replies and extended headers are not negotiated yet; replies are
//! built through [`ReplyMode`] so that a second reply format can be added
//! without touching callers.

use thiserror::Error;

// --- "Newstyle negotiation" -------------------------------------------------
/// proto.md "Newstyle negotiation": first 64 bits the server sends, 'NBDMAGIC'.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// proto.md "Newstyle negotiation": 'IHAVEOPT', second server magic and the
/// prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// proto.md "Fixed newstyle negotiation": magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

// proto.md "Values / Handshake flags" (16 bits, server → client).
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
// proto.md "Values / Client flags" (32 bits, client → server).
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// proto.md "Values / Transmission flags" (16 bits).
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// proto.md "Values / Option types".
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;

// proto.md "Values / Option reply types"; errors have bit 31 set.
pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const NBD_REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const NBD_REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const NBD_REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;

// proto.md "Option types / NBD_OPT_INFO and NBD_OPT_GO": information types.
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// proto.md "Transmission / Request message" and "Simple reply message".
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const REQUEST_HEADER_BYTES: usize = 28;
pub const SIMPLE_REPLY_BYTES: usize = 16;
/// proto.md "Newstyle negotiation": NBDMAGIC + IHAVEOPT + 16-bit flags.
pub const GREETING_BYTES: usize = 18;
/// IHAVEOPT + option + length.
pub const OPTION_HEADER_BYTES: usize = 16;
/// Reserved zeroes after the NBD_OPT_EXPORT_NAME reply unless NO_ZEROES.
pub const EXPORT_NAME_ZEROES: usize = 124;

// proto.md "Values / Command flags".
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers: a payload of `length` bytes follows an otherwise
/// payload-less command. Not negotiated here, so a request carrying it has a
/// payload we cannot frame safely.
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// proto.md "Values / Request types".
pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

// proto.md "Values / Error values".
pub const NBD_OK: u32 = 0;
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// Largest option payload we accept. Export names are at most 4096 bytes
/// (proto.md "Conventions"); INFO/GO adds 6 bytes plus info requests. A
/// larger option is treated as a denial-of-service attempt (hard disconnect,
/// allowed by "Termination of the session during option haggling").
pub const OPTION_DATA_MAX_BYTES: u32 = 16 * 1024;
/// proto.md "Conventions": strings MUST be no longer than 4096 bytes.
pub const STRING_MAX_BYTES: usize = 4096;
/// Largest READ or WRITE one request may carry: the gateway's own limit,
/// advertised as the NBD_INFO_BLOCK_SIZE maximum. It equals the internal
/// protocol's largest request so that no data buffer exceeds what one
/// storage message can carry.
pub const REQUEST_MAX_BYTES: u32 = 8 * 1024 * 1024;
/// Preferred block size advertised in NBD_INFO_BLOCK_SIZE.
pub const PREFERRED_BLOCK_BYTES: u32 = 4096;
/// The payload of an oversized WRITE is read and discarded up to this many
/// bytes so the stream stays synchronised; beyond it the connection is
/// closed rather than spending bandwidth on a client that ignored the limit.
pub const WRITE_DISCARD_MAX_BYTES: u32 = 64 * 1024 * 1024;

const _: () = assert!(REQUEST_MAX_BYTES <= tessera_wire::header::REQUEST_LENGTH_MAX_BYTES);
const _: () = assert!(REQUEST_MAX_BYTES <= WRITE_DISCARD_MAX_BYTES);

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CodecError {
    #[error("bad magic {0:#x}")]
    Magic(u64),
    #[error("unknown client flags {0:#x}")]
    ClientFlags(u32),
    #[error("option data of {0} bytes exceeds the maximum")]
    OptionTooLarge(u32),
    #[error("malformed option data: {0}")]
    OptionData(&'static str),
}

/// The server greeting: proto.md "Newstyle negotiation".
pub fn encode_greeting() -> [u8; GREETING_BYTES] {
    let mut b = [0u8; GREETING_BYTES];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Client flags after the greeting. proto.md "Client flags": the server MUST
/// drop the connection on an unknown flag or one it did not advertise (we
/// advertise both known flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

pub fn decode_client_flags(b: &[u8; 4]) -> Result<ClientFlags, CodecError> {
    let v = u32::from_be_bytes(*b);
    if v & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
        return Err(CodecError::ClientFlags(v));
    }
    Ok(ClientFlags {
        fixed_newstyle: v & NBD_FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: v & NBD_FLAG_C_NO_ZEROES != 0,
    })
}

/// An option header: proto.md "Newstyle negotiation" (generic option format).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

pub fn decode_option_header(b: &[u8; OPTION_HEADER_BYTES]) -> Result<OptionHeader, CodecError> {
    let magic = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
    if magic != IHAVEOPT {
        return Err(CodecError::Magic(magic));
    }
    let option = u32::from_be_bytes(b[8..12].try_into().expect("4 bytes"));
    let length = u32::from_be_bytes(b[12..16].try_into().expect("4 bytes"));
    if length > OPTION_DATA_MAX_BYTES {
        return Err(CodecError::OptionTooLarge(length));
    }
    Ok(OptionHeader { option, length })
}

/// Append one option reply: proto.md "Fixed newstyle negotiation" (reply
/// packet format).
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    let len = u32::try_from(data.len()).expect("option reply fits u32");
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
}

/// NBD_REP_SERVER data: proto.md "Option reply types": 32-bit name length,
/// name.
pub fn encode_rep_server(out: &mut Vec<u8>, name: &str) {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    encode_option_reply(out, NBD_OPT_LIST, NBD_REP_SERVER, &d);
}

/// NBD_REP_INFO / NBD_INFO_EXPORT: 16-bit type, 64-bit size, 16-bit
/// transmission flags.
pub fn encode_info_export(out: &mut Vec<u8>, option: u32, size_bytes: u64, flags: u16) {
    let mut d = [0u8; 12];
    d[0..2].copy_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
    d[2..10].copy_from_slice(&size_bytes.to_be_bytes());
    d[10..12].copy_from_slice(&flags.to_be_bytes());
    encode_option_reply(out, option, NBD_REP_INFO, &d);
}

/// NBD_REP_INFO / NBD_INFO_BLOCK_SIZE: 16-bit type, then minimum, preferred
/// and maximum block sizes (32 bits each).
pub fn encode_info_block_size(out: &mut Vec<u8>, option: u32, min: u32, preferred: u32, max: u32) {
    assert!(min.is_power_of_two());
    assert!(preferred.is_power_of_two());
    assert!(max >= preferred);
    let mut d = [0u8; 14];
    d[0..2].copy_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    d[2..6].copy_from_slice(&min.to_be_bytes());
    d[6..10].copy_from_slice(&preferred.to_be_bytes());
    d[10..14].copy_from_slice(&max.to_be_bytes());
    encode_option_reply(out, option, NBD_REP_INFO, &d);
}

/// NBD_REP_INFO / NBD_INFO_NAME or NBD_INFO_DESCRIPTION: 16-bit type, string.
pub fn encode_info_string(out: &mut Vec<u8>, option: u32, info: u16, s: &str) {
    assert!(info == NBD_INFO_NAME || info == NBD_INFO_DESCRIPTION);
    let mut d = Vec::with_capacity(2 + s.len());
    d.extend_from_slice(&info.to_be_bytes());
    d.extend_from_slice(s.as_bytes());
    encode_option_reply(out, option, NBD_REP_INFO, &d);
}

/// Reply to NBD_OPT_EXPORT_NAME: proto.md "Newstyle negotiation": size,
/// transmission flags, then 124 zero bytes unless NO_ZEROES was negotiated.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size_bytes: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; EXPORT_NAME_ZEROES]);
    }
}

/// Data of NBD_OPT_INFO / NBD_OPT_GO: proto.md "NBD_OPT_INFO and NBD_OPT_GO".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

pub fn decode_info_request(d: &[u8]) -> Result<InfoRequest, CodecError> {
    if d.len() < 6 {
        return Err(CodecError::OptionData("shorter than 6 bytes"));
    }
    let name_len = u32::from_be_bytes(d[0..4].try_into().expect("4 bytes")) as usize;
    // "MUST be no larger than the option data length - 6".
    if name_len > d.len() - 6 {
        return Err(CodecError::OptionData("name length exceeds option data"));
    }
    let name = decode_string(&d[4..4 + name_len])?;
    let rest = &d[4 + name_len..];
    let count = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    let list = &rest[2..];
    if list.len() != count * 2 {
        return Err(CodecError::OptionData("information request count mismatch"));
    }
    let infos = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(InfoRequest { name, infos })
}

/// Data of NBD_OPT_EXPORT_NAME: the whole option data is the name.
pub fn decode_export_name(d: &[u8]) -> Result<String, CodecError> {
    decode_string(d)
}

/// proto.md "Conventions": UTF-8, no NUL, at most 4096 bytes.
fn decode_string(b: &[u8]) -> Result<String, CodecError> {
    if b.len() > STRING_MAX_BYTES {
        return Err(CodecError::OptionData("string longer than 4096 bytes"));
    }
    if b.contains(&0) {
        return Err(CodecError::OptionData("NUL in string"));
    }
    String::from_utf8(b.to_vec()).map_err(|_| CodecError::OptionData("string is not UTF-8"))
}

/// A request header: proto.md "Request message" (28 bytes, big endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut b = [0u8; REQUEST_HEADER_BYTES];
        b[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decode a request header; a bad magic means the stream is out of sync.
    pub fn decode(b: &[u8; REQUEST_HEADER_BYTES]) -> Result<RequestHeader, CodecError> {
        let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
        if magic != NBD_REQUEST_MAGIC {
            return Err(CodecError::Magic(u64::from(magic)));
        }
        Ok(RequestHeader {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
            length: u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")),
        })
    }
}

/// How replies are framed on this connection. Only simple replies exist for
/// now; structured replies (NBD_OPT_STRUCTURED_REPLY) will add a variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplyMode {
    #[default]
    Simple,
}

/// A simple reply header: proto.md "Simple reply message". For a successful
/// READ, `length` bytes of data follow it.
pub fn encode_simple_reply(errno: u32, cookie: u64) -> [u8; SIMPLE_REPLY_BYTES] {
    let mut b = [0u8; SIMPLE_REPLY_BYTES];
    b[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&errno.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// What the session should do, for a request that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Disconnect,
    /// A zero-length data request: succeeds without touching the volume
    /// (proto.md says a server SHOULD NOT disconnect on it). A zero-length
    /// READ replies with no data; a zero-length WRITE has no payload.
    Noop,
}

/// What to do with a request's payload when the request is rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// The request has no payload.
    None,
    /// Read and discard this many bytes, then send the error reply.
    Discard(u32),
    /// The payload cannot be framed or skipped: hard disconnect.
    Close,
}

/// A request rejected at the edge: the errno to reply with and how to keep
/// the stream synchronised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub errno: u32,
    pub payload: Payload,
}

/// The export's current geometry, re-read for every request so that a
/// resize is seen by open sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub size_bytes: u64,
    /// Minimum block size: offsets and lengths must be multiples of it.
    pub block_size: u32,
}

/// Validate a request against the export (proto.md "Request types" and
/// "Block size constraints"). Checks run in a fixed order: command, flags,
/// size limit, bounds, zero length, alignment.
pub fn check_request(h: &RequestHeader, g: &Geometry) -> Result<Command, Rejection> {
    assert!(g.block_size.is_power_of_two());
    let is_write = h.kind == NBD_CMD_WRITE;
    // A rejected WRITE still has its payload on the wire.
    let drain = |errno: u32| Rejection {
        errno,
        payload: if !is_write {
            Payload::None
        } else if h.length <= WRITE_DISCARD_MAX_BYTES {
            Payload::Discard(h.length)
        } else {
            Payload::Close
        },
    };
    let allowed = match h.kind {
        // FUA: "the server MUST accept all commands with this bit set".
        NBD_CMD_READ | NBD_CMD_WRITE | NBD_CMD_FLUSH | NBD_CMD_TRIM | NBD_CMD_DISC => {
            NBD_CMD_FLAG_FUA
        }
        NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
        _ => {
            // An unknown command announcing a payload cannot be skipped
            // without negotiated extended headers: the stream is lost.
            let payload = if h.flags & NBD_CMD_FLAG_PAYLOAD_LEN != 0 {
                Payload::Close
            } else {
                Payload::None
            };
            return Err(Rejection {
                errno: NBD_EINVAL,
                payload,
            });
        }
    };
    if h.flags & !allowed != 0 {
        return Err(drain(NBD_EINVAL));
    }
    let fua = h.flags & NBD_CMD_FLAG_FUA != 0;
    match h.kind {
        NBD_CMD_DISC => return Ok(Command::Disconnect),
        NBD_CMD_FLUSH => {
            // "The values of the length and offset fields in a flush request
            // MUST be zero."
            if h.offset != 0 || h.length != 0 {
                return Err(drain(NBD_EINVAL));
            }
            return Ok(Command::Flush);
        }
        _ => {}
    }
    // Data commands carry their data in one buffer; TRIM and WRITE_ZEROES do
    // not, so only READ and WRITE are bounded by the advertised maximum.
    if (h.kind == NBD_CMD_READ || is_write) && h.length > REQUEST_MAX_BYTES {
        return Err(drain(NBD_EINVAL));
    }
    let end = h.offset.checked_add(u64::from(h.length));
    if end.is_none_or(|e| e > g.size_bytes) {
        // "The server SHOULD return NBD_ENOSPC if it receives a write request
        // including one or more sectors beyond the size of the device";
        // reads beyond the end get NBD_EINVAL.
        let errno = if h.kind == NBD_CMD_READ {
            NBD_EINVAL
        } else {
            NBD_ENOSPC
        };
        return Err(drain(errno));
    }
    if h.length == 0 {
        return Ok(Command::Noop);
    }
    let bs = u64::from(g.block_size);
    if h.offset % bs != 0 || u64::from(h.length) % bs != 0 {
        return Err(drain(NBD_EINVAL));
    }
    let (offset, length) = (h.offset, h.length);
    Ok(match h.kind {
        NBD_CMD_READ => Command::Read { offset, length },
        NBD_CMD_WRITE => Command::Write {
            offset,
            length,
            fua,
        },
        NBD_CMD_TRIM => Command::Trim {
            offset,
            length,
            fua,
        },
        NBD_CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            length,
            fua,
        },
        _ => unreachable!("command kinds filtered above"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEO: Geometry = Geometry {
        size_bytes: 1 << 20,
        block_size: 512,
    };

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            cookie: 0x1122_3344_5566_7788,
            offset,
            length,
        }
    }

    fn rej(errno: u32, payload: Payload) -> Result<Command, Rejection> {
        Err(Rejection { errno, payload })
    }

    // Proves the greeting bytes match proto.md "Newstyle negotiation":
    // "NBDMAGIC", "IHAVEOPT", flags FIXED_NEWSTYLE|NO_ZEROES.
    #[test]
    fn greeting_golden() {
        let g = encode_greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0x00, 0x03]);
    }

    // Proves client flags accept the two known bits and reject any other.
    #[test]
    fn client_flags() {
        assert_eq!(
            decode_client_flags(&[0, 0, 0, 3]),
            Ok(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            })
        );
        assert_eq!(
            decode_client_flags(&[0, 0, 0, 4]),
            Err(CodecError::ClientFlags(4))
        );
    }

    // Proves option headers decode per spec and reject bad magic and
    // oversized data.
    #[test]
    fn option_header() {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(b"IHAVEOPT");
        b[8..12].copy_from_slice(&7u32.to_be_bytes());
        b[12..16].copy_from_slice(&10u32.to_be_bytes());
        assert_eq!(
            decode_option_header(&b),
            Ok(OptionHeader {
                option: 7,
                length: 10
            })
        );
        b[12..16].copy_from_slice(&(OPTION_DATA_MAX_BYTES + 1).to_be_bytes());
        assert!(matches!(
            decode_option_header(&b),
            Err(CodecError::OptionTooLarge(_))
        ));
        b[0] = b'X';
        assert!(matches!(
            decode_option_header(&b),
            Err(CodecError::Magic(_))
        ));
    }

    // Proves the option reply framing: magic 0x3e889045565a9, option, type,
    // length, data.
    #[test]
    fn option_reply_golden() {
        let mut out = Vec::new();
        encode_option_reply(&mut out, NBD_OPT_ABORT, NBD_REP_ACK, &[]);
        assert_eq!(
            out,
            [
                0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0
            ]
        );
        let mut out = Vec::new();
        encode_info_export(&mut out, NBD_OPT_GO, 0x1000, 0x012d);
        assert_eq!(&out[12..16], &NBD_REP_INFO.to_be_bytes());
        assert_eq!(&out[16..20], &12u32.to_be_bytes());
        assert_eq!(&out[20..32], &[0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0x01, 0x2d]);
        let mut out = Vec::new();
        encode_rep_server(&mut out, "ab");
        assert_eq!(&out[12..16], &NBD_REP_SERVER.to_be_bytes());
        assert_eq!(&out[16..], &[0, 0, 0, 6, 0, 0, 0, 2, b'a', b'b']);
        let mut out = Vec::new();
        encode_info_block_size(&mut out, NBD_OPT_GO, 512, 4096, REQUEST_MAX_BYTES);
        assert_eq!(
            &out[20..],
            &[0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 0, 0x80, 0, 0]
        );
        assert_eq!(NBD_REP_ERR_UNSUP, 0x8000_0001);
        assert_eq!(NBD_REP_ERR_UNKNOWN, 0x8000_0006);
    }

    // Proves the EXPORT_NAME reply honours NO_ZEROES.
    #[test]
    fn export_name_reply() {
        let mut a = Vec::new();
        encode_export_name_reply(&mut a, 1, 1, false);
        assert_eq!(a.len(), 8 + 2 + 124);
        let mut b = Vec::new();
        encode_export_name_reply(&mut b, 1, 1, true);
        assert_eq!(b, [0, 0, 0, 0, 0, 0, 0, 1, 0, 1]);
    }

    // Proves INFO/GO data parsing and each malformed-data branch.
    #[test]
    fn info_request() {
        let d = [0, 0, 0, 2, b'v', b'1', 0, 1, 0, 3];
        assert_eq!(
            decode_info_request(&d),
            Ok(InfoRequest {
                name: "v1".into(),
                infos: vec![3]
            })
        );
        assert!(decode_info_request(&[0, 0, 0]).is_err());
        assert!(decode_info_request(&[0, 0, 0, 9, 0, 0]).is_err());
        assert!(decode_info_request(&[0, 0, 0, 0, 0, 2, 0, 3]).is_err());
        assert!(decode_info_request(&[0, 0, 0, 1, 0, 0, 0]).is_err());
        assert!(decode_info_request(&[0, 0, 0, 1, 0xff, 0, 0]).is_err());
    }

    // Proves the request header and simple reply golden bytes.
    #[test]
    fn request_and_reply_golden() {
        let h = req(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 0x200, 0x400);
        let b = h.encode();
        assert_eq!(
            b,
            [
                0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88,
                0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 4, 0
            ]
        );
        assert_eq!(RequestHeader::decode(&b), Ok(h));
        let mut bad = b;
        bad[0] = 0;
        assert!(RequestHeader::decode(&bad).is_err());
        assert_eq!(
            encode_simple_reply(NBD_EINVAL, 7),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]
        );
    }

    // Proves valid requests become the right commands.
    #[test]
    fn accepts_valid_requests() {
        assert_eq!(
            check_request(&req(NBD_CMD_READ, 0, 512, 1024), &GEO),
            Ok(Command::Read {
                offset: 512,
                length: 1024
            })
        );
        assert_eq!(
            check_request(&req(NBD_CMD_WRITE_ZEROES, 3, 0, 512), &GEO),
            Ok(Command::WriteZeroes {
                offset: 0,
                length: 512,
                fua: true
            })
        );
        assert_eq!(
            check_request(&req(NBD_CMD_FLUSH, 0, 0, 0), &GEO),
            Ok(Command::Flush)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_DISC, 0, 0, 0), &GEO),
            Ok(Command::Disconnect)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_WRITE, 0, 1 << 20, 0), &GEO),
            Ok(Command::Noop)
        );
    }

    // Proves each rejection branch of check_request and its payload handling.
    #[test]
    fn rejects_each_bad_request() {
        use Payload::*;
        // Unknown command, with and without an announced payload.
        assert_eq!(
            check_request(&req(99, 0, 0, 512), &GEO),
            rej(NBD_EINVAL, None)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_BLOCK_STATUS, 0, 0, 512), &GEO),
            rej(NBD_EINVAL, None)
        );
        assert_eq!(
            check_request(&req(99, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 512), &GEO),
            rej(NBD_EINVAL, Close)
        );
        // Unknown or inapplicable flags.
        assert_eq!(
            check_request(&req(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512), &GEO),
            rej(NBD_EINVAL, None)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 512), &GEO),
            rej(NBD_EINVAL, Discard(512))
        );
        assert_eq!(
            check_request(
                &req(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 512),
                &GEO
            ),
            rej(NBD_EINVAL, None)
        );
        // Flush with a range.
        assert_eq!(
            check_request(&req(NBD_CMD_FLUSH, 0, 0, 512), &GEO),
            rej(NBD_EINVAL, None)
        );
        // Oversized data requests.
        let big = REQUEST_MAX_BYTES + 512;
        let geo = Geometry {
            size_bytes: 1 << 40,
            block_size: 512,
        };
        assert_eq!(
            check_request(&req(NBD_CMD_READ, 0, 0, big), &geo),
            rej(NBD_EINVAL, None)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_WRITE, 0, 0, big), &geo),
            rej(NBD_EINVAL, Discard(big))
        );
        assert_eq!(
            check_request(&req(NBD_CMD_WRITE, 0, 0, u32::MAX), &geo),
            rej(NBD_EINVAL, Close)
        );
        // Trim may exceed the data maximum.
        assert!(check_request(&req(NBD_CMD_TRIM, 0, 0, big), &geo).is_ok());
        // Beyond the end and offset overflow.
        assert_eq!(
            check_request(&req(NBD_CMD_READ, 0, (1 << 20) - 512, 1024), &GEO),
            rej(NBD_EINVAL, None)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_WRITE, 0, 1 << 20, 512), &GEO),
            rej(NBD_ENOSPC, Discard(512))
        );
        assert_eq!(
            check_request(&req(NBD_CMD_TRIM, 0, u64::MAX - 100, 512), &GEO),
            rej(NBD_ENOSPC, None)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_WRITE_ZEROES, 0, 1 << 21, 512), &GEO),
            rej(NBD_ENOSPC, None)
        );
        // Misaligned offset and length.
        assert_eq!(
            check_request(&req(NBD_CMD_READ, 0, 100, 512), &GEO),
            rej(NBD_EINVAL, None)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_WRITE, 0, 0, 100), &GEO),
            rej(NBD_EINVAL, Discard(100))
        );
        let geo4k = Geometry {
            size_bytes: 1 << 20,
            block_size: 4096,
        };
        assert_eq!(
            check_request(&req(NBD_CMD_READ, 0, 512, 4096), &geo4k),
            rej(NBD_EINVAL, None)
        );
    }
}
