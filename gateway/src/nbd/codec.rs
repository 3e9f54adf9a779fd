//! NBD wire codec: pure, synchronous encoding and decoding of the messages of
//! the fixed-newstyle handshake and of the transmission phase, in the three
//! reply formats a connection can negotiate (simple, structured, extended).
//!
//! Every constant cites the section of the NBD protocol specification
//! (`doc/proto.md` in NetworkBlockDevice/nbd; the extended-header parts from
//! its `extension-ext-header` branch, which libnbd >= 1.18 and qemu >= 8.2
//! implement) it comes from. Decoders validate every field they can without
//! context; [`check_request`] validates a request against the export and the
//! negotiated terms. Nothing here does I/O or reads a clock.

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
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// Never advertised: we do not implement the BLOCK_STATUS payload form.
pub const NBD_FLAG_BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;

// proto.md "Values / Option types".
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

// proto.md "Values / Option reply types"; errors have bit 31 set.
pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
pub const NBD_REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const NBD_REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const NBD_REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const NBD_REP_ERR_PLATFORM: u32 = (1 << 31) + 4;
pub const NBD_REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
pub const NBD_REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
pub const NBD_REP_ERR_EXT_HEADER_REQD: u32 = (1 << 31) + 10;

// proto.md "Option types / NBD_OPT_INFO and NBD_OPT_GO": information types.
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// proto.md "Transmission / Request message", "Simple reply message",
// "Structured reply chunk message", "Extended reply chunk message".
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
pub const NBD_EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const NBD_EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;
/// Compact request header.
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Extended request header (64-bit length).
pub const EXTENDED_REQUEST_HEADER_BYTES: usize = 32;
pub const SIMPLE_REPLY_BYTES: usize = 16;
pub const STRUCTURED_REPLY_HEADER_BYTES: usize = 20;
pub const EXTENDED_REPLY_HEADER_BYTES: usize = 32;

// proto.md "Structured and extended header reply flags" / "Structured reply
// types".
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const NBD_REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// proto.md "`base:allocation` metadata context".
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const NBD_STATE_HOLE: u32 = 1 << 0;
pub const NBD_STATE_ZERO: u32 = 1 << 1;
/// The id we give `base:allocation` in NBD_REP_META_CONTEXT (any value is
/// allowed; it is the only context we serve).
pub const BASE_ALLOCATION_ID: u32 = 1;
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
/// Extended headers only: `length` is a payload length and that many bytes
/// follow the header (mandatory for WRITE).
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
/// Default largest READ or WRITE one request may carry, advertised as the
/// NBD_INFO_BLOCK_SIZE maximum payload (`--nbd-request-max-bytes` changes
/// it). The routing layer splits larger requests at the internal protocol's
/// limit, so this bounds memory per request, not what storage can take.
pub const REQUEST_MAX_BYTES: u32 = 8 * 1024 * 1024;
/// Upper bound of `--nbd-request-max-bytes`: proto.md "Size constraints"
/// says payloads up to 2^25 bytes SHOULD NOT be treated as an attack.
pub const REQUEST_MAX_BYTES_LIMIT: u32 = 32 * 1024 * 1024;
/// Granularity at which READ replies report zero runs as holes, and the
/// storage daemons' allocation unit (one bit per 4 KiB in BlockStatus).
pub const HOLE_GRANULE_BYTES: u32 = 4096;
/// Most bytes one BLOCK_STATUS request scans (its length is only a hint,
/// proto.md "NBD_CMD_BLOCK_STATUS": the server MAY return less). Bounds the
/// storage requests one client request fans out to (64 chunks of 4 MiB)
/// and keeps every extent length within 32 bits.
pub const BLOCK_STATUS_SCAN_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// "Servers SHOULD NOT send more than 2^20 extents in a single reply chunk".
pub const BLOCK_STATUS_EXTENTS_MAX: usize = 1 << 20;
/// Effect-length commands (TRIM, WRITE_ZEROES, CACHE) longer than this are
/// cut into pieces of at most this size by the session: the volume API takes
/// 32-bit lengths, while extended headers allow 64-bit ones.
pub const EFFECT_PIECE_MAX_BYTES: u64 = 1 << 30;
/// Queries accepted in one LIST/SET_META_CONTEXT (more: NBD_REP_ERR_TOO_BIG).
pub const META_QUERIES_MAX: usize = 64;
/// Preferred block size advertised in NBD_INFO_BLOCK_SIZE.
pub const PREFERRED_BLOCK_BYTES: u32 = 4096;
/// The payload of an oversized WRITE is read and discarded up to this many
/// bytes so the stream stays synchronised; beyond it the connection is
/// closed rather than spending bandwidth on a client that ignored the limit.
pub const WRITE_DISCARD_MAX_BYTES: u32 = 64 * 1024 * 1024;

const _: () = assert!(REQUEST_MAX_BYTES <= REQUEST_MAX_BYTES_LIMIT);
const _: () = assert!(REQUEST_MAX_BYTES_LIMIT <= WRITE_DISCARD_MAX_BYTES);
const _: () = assert!(BLOCK_STATUS_SCAN_MAX_BYTES < 1 << 32);
const _: () = assert!(BLOCK_STATUS_SCAN_MAX_BYTES / HOLE_GRANULE_BYTES as u64 <= 1 << 20);

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

/// Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: proto.md
/// "Option types": export name, then a count of queries, each a 32-bit
/// length and a string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub name: String,
    pub queries: Vec<String>,
}

/// Why meta-context data was refused: malformed (NBD_REP_ERR_INVALID) or
/// more queries than we take (NBD_REP_ERR_TOO_BIG).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaError {
    Invalid(&'static str),
    TooBig,
}

pub fn decode_meta_request(d: &[u8]) -> Result<MetaRequest, MetaError> {
    let mut rest = d;
    let mut take = |n: usize| -> Result<&[u8], MetaError> {
        if rest.len() < n {
            return Err(MetaError::Invalid("meta context data is truncated"));
        }
        let (a, b) = rest.split_at(n);
        rest = b;
        Ok(a)
    };
    let name_len = u32::from_be_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
    let name = decode_string(take(name_len)?).map_err(|_| MetaError::Invalid("bad export name"))?;
    let count = u32::from_be_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
    if count > META_QUERIES_MAX {
        return Err(MetaError::TooBig);
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = u32::from_be_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
        let q = decode_string(take(len)?).map_err(|_| MetaError::Invalid("bad query string"))?;
        // "The syntax of this query is implementation-defined, except that it
        // MUST start with a namespace and a colon."
        match q.split_once(':') {
            Some((ns, _)) if !ns.is_empty() => queries.push(q),
            _ => return Err(MetaError::Invalid("query lacks a namespace and colon")),
        }
    }
    if !rest.is_empty() {
        return Err(MetaError::Invalid("trailing bytes after the queries"));
    }
    Ok(MetaRequest { name, queries })
}

/// NBD_REP_META_CONTEXT data: 32-bit context id, then the context name.
pub fn encode_rep_meta_context(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    encode_option_reply(out, option, NBD_REP_META_CONTEXT, &d);
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

/// A request header: proto.md "Request message". Compact headers (28 bytes)
/// carry a 32-bit length; extended headers (32 bytes, negotiated with
/// NBD_OPT_EXTENDED_HEADERS) a 64-bit one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

impl RequestHeader {
    /// The compact form; the length must fit 32 bits.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let length = u32::try_from(self.length).expect("compact requests have 32-bit lengths");
        let mut b = [0u8; REQUEST_HEADER_BYTES];
        b[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&length.to_be_bytes());
        b
    }

    /// The extended form.
    pub fn encode_extended(&self) -> [u8; EXTENDED_REQUEST_HEADER_BYTES] {
        let mut b = [0u8; EXTENDED_REQUEST_HEADER_BYTES];
        b[0..4].copy_from_slice(&NBD_EXTENDED_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..32].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decode a compact header; a bad magic means the stream is out of sync.
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
            length: u64::from(u32::from_be_bytes(b[24..28].try_into().expect("4 bytes"))),
        })
    }

    /// Decode an extended header. Once extended headers are negotiated the
    /// compact magic is as wrong as any other.
    pub fn decode_extended(
        b: &[u8; EXTENDED_REQUEST_HEADER_BYTES],
    ) -> Result<RequestHeader, CodecError> {
        let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
        if magic != NBD_EXTENDED_REQUEST_MAGIC {
            return Err(CodecError::Magic(u64::from(magic)));
        }
        Ok(RequestHeader {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
            length: u64::from_be_bytes(b[24..32].try_into().expect("8 bytes")),
        })
    }
}

/// How replies are framed on this connection, as negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplyMode {
    /// No NBD_OPT_STRUCTURED_REPLY: 16-byte simple replies only.
    #[default]
    Simple,
    /// NBD_OPT_STRUCTURED_REPLY: READ and BLOCK_STATUS answer in 20-byte
    /// structured chunks; payload-less successes stay simple replies.
    Structured,
    /// NBD_OPT_EXTENDED_HEADERS: 32-byte requests and 32-byte reply chunks
    /// for everything.
    Extended,
}

/// What the handshake agreed for the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    pub mode: ReplyMode,
    /// `base:allocation` was selected (SET_META_CONTEXT) for this export.
    pub block_status: bool,
    /// Largest READ/WRITE payload (the NBD_INFO_BLOCK_SIZE maximum).
    pub request_max_bytes: u32,
}

impl Terms {
    pub const SIMPLE: Terms = Terms {
        mode: ReplyMode::Simple,
        block_status: false,
        request_max_bytes: REQUEST_MAX_BYTES,
    };

    /// Bytes of one request header on this connection.
    pub fn request_header_bytes(&self) -> usize {
        if self.mode == ReplyMode::Extended {
            EXTENDED_REQUEST_HEADER_BYTES
        } else {
            REQUEST_HEADER_BYTES
        }
    }

    /// Decode one request header of this connection's format.
    pub fn decode_request(&self, b: &[u8]) -> Result<RequestHeader, CodecError> {
        assert_eq!(b.len(), self.request_header_bytes());
        if self.mode == ReplyMode::Extended {
            RequestHeader::decode_extended(b.try_into().expect("checked length"))
        } else {
            RequestHeader::decode(b.try_into().expect("checked length"))
        }
    }
}

/// What the session should do, for a request that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        length: u32,
        /// NBD_CMD_FLAG_DF: at most one content chunk.
        df: bool,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u64,
        fua: bool,
        /// NBD_CMD_FLAG_NO_HOLE: the range must end up allocated.
        no_hole: bool,
        /// NBD_CMD_FLAG_FAST_ZERO: fail with ENOTSUP rather than be slow.
        fast: bool,
    },
    Cache {
        offset: u64,
        length: u64,
    },
    BlockStatus {
        offset: u64,
        length: u64,
        /// NBD_CMD_FLAG_REQ_ONE: exactly one extent, within the request.
        req_one: bool,
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
    /// The payload is too large to drain: hard disconnect.
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

/// Bytes of payload that follow a request header on the wire. Compact
/// requests: only WRITE carries one (its length). Extended requests: those
/// with NBD_CMD_FLAG_PAYLOAD_LEN, and WRITE always. The extension says a
/// WRITE "MUST use the flag", but qemu (10.0, as a client) sends extended
/// WRITEs without it, and qemu's own server reads the data regardless; a
/// WRITE always carries its data, so we accept both.
pub fn payload_bytes(h: &RequestHeader, t: &Terms) -> u64 {
    if t.mode == ReplyMode::Extended {
        if h.flags & NBD_CMD_FLAG_PAYLOAD_LEN != 0 || h.kind == NBD_CMD_WRITE {
            h.length
        } else {
            0
        }
    } else if h.kind == NBD_CMD_WRITE {
        h.length
    } else {
        0
    }
}

/// Validate a request against the export and the negotiated terms
/// (proto.md "Request types", "Command flags", "Size constraints", "Error
/// values"). Checks run in a fixed order: payload framing, command, flags,
/// negotiation, size limit, bounds, zero length, alignment.
pub fn check_request(h: &RequestHeader, g: &Geometry, t: &Terms) -> Result<Command, Rejection> {
    assert!(g.block_size.is_power_of_two());
    assert!(t.request_max_bytes <= REQUEST_MAX_BYTES_LIMIT);
    let extended = t.mode == ReplyMode::Extended;
    let payload = payload_bytes(h, t);
    // A rejected request still has its payload on the wire: drain it to
    // stay in sync, unless it is too large to be worth reading.
    let reject = |errno: u32| Rejection {
        errno,
        payload: if payload == 0 {
            Payload::None
        } else if payload <= u64::from(WRITE_DISCARD_MAX_BYTES) {
            Payload::Discard(payload as u32)
        } else {
            Payload::Close
        },
    };
    // Flags each command accepts. FUA: "valid for all commands ... the
    // server MUST accept all commands with this bit set". PAYLOAD_LEN is
    // checked separately below.
    let allowed = match h.kind {
        NBD_CMD_READ if t.mode != ReplyMode::Simple => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF,
        NBD_CMD_READ | NBD_CMD_WRITE | NBD_CMD_FLUSH | NBD_CMD_TRIM | NBD_CMD_DISC
        | NBD_CMD_CACHE => NBD_CMD_FLAG_FUA,
        NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
        NBD_CMD_BLOCK_STATUS => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE,
        // "The server SHOULD return NBD_EINVAL if it receives an unknown
        // command."
        _ => return Err(reject(NBD_EINVAL)),
    };
    let is_write = h.kind == NBD_CMD_WRITE;
    // Any command but WRITE with a payload uses a form we do not implement
    // (we never advertise NBD_FLAG_BLOCK_STATUS_PAYLOAD): consume it, then
    // EINVAL.
    if extended && !is_write && h.flags & NBD_CMD_FLAG_PAYLOAD_LEN != 0 {
        return Err(reject(NBD_EINVAL));
    }
    let flags = h.flags
        & !if extended && is_write {
            NBD_CMD_FLAG_PAYLOAD_LEN
        } else {
            0
        };
    if flags & !allowed != 0 {
        return Err(reject(NBD_EINVAL));
    }
    let fua = flags & NBD_CMD_FLAG_FUA != 0;
    match h.kind {
        NBD_CMD_DISC => return Ok(Command::Disconnect),
        NBD_CMD_FLUSH => {
            // "length and offset are reserved, and MUST be set to all-zero."
            if h.offset != 0 || h.length != 0 {
                return Err(reject(NBD_EINVAL));
            }
            return Ok(Command::Flush);
        }
        // "Servers SHOULD reply with NBD_EINVAL to clients sending
        // NBD_CMD_BLOCK_STATUS without selecting at least one metadata
        // context."
        NBD_CMD_BLOCK_STATUS if !t.block_status => return Err(reject(NBD_EINVAL)),
        _ => {}
    }
    // READ and WRITE move their data in one buffer, bounded by the
    // advertised maximum payload; the others have effect lengths.
    if (h.kind == NBD_CMD_READ || is_write) && h.length > u64::from(t.request_max_bytes) {
        return Err(reject(NBD_EINVAL));
    }
    let end = h.offset.checked_add(h.length);
    if end.is_none_or(|e| e > g.size_bytes) {
        // "The server SHOULD return NBD_ENOSPC if it receives a write
        // request including one or more sectors beyond the size of the
        // device" (also for WRITE_ZEROES); "NBD_EINVAL if it receives a read
        // or trim request" beyond it, and for BLOCK_STATUS "with an effect
        // length exceeding the size of the export".
        let errno = if is_write || h.kind == NBD_CMD_WRITE_ZEROES {
            NBD_ENOSPC
        } else {
            NBD_EINVAL
        };
        return Err(reject(errno));
    }
    if h.length == 0 {
        // A status query must return at least one nonzero extent, which a
        // zero-length query cannot describe.
        if h.kind == NBD_CMD_BLOCK_STATUS {
            return Err(reject(NBD_EINVAL));
        }
        return Ok(Command::Noop);
    }
    let bs = u64::from(g.block_size);
    if !h.offset.is_multiple_of(bs) || !h.length.is_multiple_of(bs) {
        return Err(reject(NBD_EINVAL));
    }
    let (offset, length) = (h.offset, h.length);
    Ok(match h.kind {
        NBD_CMD_READ => Command::Read {
            offset,
            length: length as u32,
            df: flags & NBD_CMD_FLAG_DF != 0,
        },
        NBD_CMD_WRITE => Command::Write {
            offset,
            length: length as u32,
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
            no_hole: flags & NBD_CMD_FLAG_NO_HOLE != 0,
            fast: flags & NBD_CMD_FLAG_FAST_ZERO != 0,
        },
        NBD_CMD_CACHE => Command::Cache { offset, length },
        NBD_CMD_BLOCK_STATUS => Command::BlockStatus {
            offset,
            length,
            req_one: flags & NBD_CMD_FLAG_REQ_ONE != 0,
        },
        _ => unreachable!("command kinds filtered above"),
    })
}

/// One piece of a reply on the wire: bytes encoded here, or a range of the
/// request's data buffer, so READ data is never copied into a reply buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// A range of [`Frames::bytes`].
    Head(std::ops::Range<usize>),
    /// A range of the READ data buffer.
    Data(std::ops::Range<usize>),
}

/// A complete reply to one request, as encoded bytes interleaved with data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frames {
    pub bytes: Vec<u8>,
    pub segments: Vec<Segment>,
}

impl Frames {
    fn head(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        let start = self.bytes.len();
        f(&mut self.bytes);
        let end = self.bytes.len();
        if let Some(Segment::Head(r)) = self.segments.last_mut()
            && r.end == start
        {
            r.end = end;
            return;
        }
        self.segments.push(Segment::Head(start..end));
    }

    fn data(&mut self, r: std::ops::Range<usize>) {
        self.segments.push(Segment::Data(r));
    }

    /// Total bytes on the wire, given the data buffer length is consistent.
    pub fn wire_len(&self) -> usize {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Head(r) | Segment::Data(r) => r.len(),
            })
            .sum()
    }
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

/// A structured (20-byte) or extended (32-byte) reply chunk header:
/// proto.md "Structured reply chunk message" / "Extended reply chunk
/// message". `offset` is the request's offset (extended headers only).
pub fn encode_chunk_header(
    out: &mut Vec<u8>,
    mode: ReplyMode,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u64,
) {
    match mode {
        ReplyMode::Simple => panic!("chunks need structured replies or extended headers"),
        ReplyMode::Structured => {
            let length = u32::try_from(length).expect("structured chunk length fits 32 bits");
            out.extend_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&cookie.to_be_bytes());
            out.extend_from_slice(&length.to_be_bytes());
        }
        ReplyMode::Extended => {
            out.extend_from_slice(&NBD_EXTENDED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&cookie.to_be_bytes());
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&length.to_be_bytes());
        }
    }
}

/// Success without data. Simple replies where allowed ("a simple reply MAY
/// be used as a reply to any request other than NBD_CMD_READ, but only if
/// the reply has no data payload"); otherwise one NBD_REPLY_TYPE_NONE chunk
/// with NBD_REPLY_FLAG_DONE (READ under structured replies, anything under
/// extended headers, which forbid simple replies).
pub fn reply_ok(mode: ReplyMode, kind: u16, cookie: u64, offset: u64) -> Frames {
    let mut f = Frames::default();
    let simple = match mode {
        ReplyMode::Simple => true,
        ReplyMode::Structured => kind != NBD_CMD_READ,
        ReplyMode::Extended => false,
    };
    if simple {
        f.head(|b| b.extend_from_slice(&encode_simple_reply(NBD_OK, cookie)));
    } else {
        f.head(|b| {
            encode_chunk_header(
                b,
                mode,
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_NONE,
                cookie,
                offset,
                0,
            )
        });
    }
    f
}

/// Failure. Simple mode: a simple reply with the errno. Otherwise one
/// NBD_REPLY_TYPE_ERROR chunk with a message ("The server SHOULD prefer
/// sending errors via a structured reply"; for READ it MUST).
pub fn reply_error(mode: ReplyMode, cookie: u64, offset: u64, errno: u32, msg: &str) -> Frames {
    assert_ne!(errno, NBD_OK);
    let mut f = Frames::default();
    if mode == ReplyMode::Simple {
        f.head(|b| b.extend_from_slice(&encode_simple_reply(errno, cookie)));
        return f;
    }
    // "message length MUST NOT exceed the 4096 bytes string length limit".
    let mut end = msg.len().min(STRING_MAX_BYTES);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &msg.as_bytes()[..end];
    f.head(|b| {
        encode_chunk_header(
            b,
            mode,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_ERROR,
            cookie,
            offset,
            6 + msg.len() as u64,
        );
        b.extend_from_slice(&errno.to_be_bytes());
        b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        b.extend_from_slice(msg);
    });
    f
}

/// Whether a buffer is all zero bytes (compared 16 bytes at a time).
fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(16);
    chunks.all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
        && chunks.remainder().iter().all(|x| *x == 0)
}

/// A successful READ of `data` at `offset`. Simple mode: header then data.
/// Structured/extended: OFFSET_DATA chunks for data and OFFSET_HOLE chunks
/// for every run of whole, aligned [`HOLE_GRANULE_BYTES`] blocks that read as
/// zeroes (unallocated ranges read as zeroes without disk I/O on the storage
/// daemons, so every unallocated block becomes part of a hole; an allocated
/// block of zeroes does too, which the spec allows: a hole chunk means
/// "read as all zeroes"). With `df` exactly one OFFSET_DATA chunk. The last
/// chunk carries NBD_REPLY_FLAG_DONE: the data is complete in memory, so no
/// error can follow it.
pub fn reply_read(mode: ReplyMode, cookie: u64, offset: u64, data: &[u8], df: bool) -> Frames {
    let mut f = Frames::default();
    if mode == ReplyMode::Simple {
        f.head(|b| b.extend_from_slice(&encode_simple_reply(NBD_OK, cookie)));
        if !data.is_empty() {
            f.data(0..data.len());
        }
        return f;
    }
    if data.is_empty() {
        return reply_ok(mode, NBD_CMD_READ, cookie, offset);
    }
    // Runs of (is_hole, start, end) in buffer offsets.
    let mut runs: Vec<(bool, usize, usize)> = Vec::new();
    let mut push = |hole: bool, s: usize, e: usize| {
        if s == e {
            return;
        }
        match runs.last_mut() {
            Some(last) if last.0 == hole && last.2 == s => last.2 = e,
            _ => runs.push((hole, s, e)),
        }
    };
    if df {
        push(false, 0, data.len());
    } else {
        let g = HOLE_GRANULE_BYTES as u64;
        // First granule boundary at or after `offset`, as a buffer offset.
        let head = ((g - offset % g) % g).min(data.len() as u64) as usize;
        push(false, 0, head);
        let mut pos = head;
        while pos + HOLE_GRANULE_BYTES as usize <= data.len() {
            let end = pos + HOLE_GRANULE_BYTES as usize;
            push(is_zero(&data[pos..end]), pos, end);
            pos = end;
        }
        push(false, pos, data.len());
    }
    let last = runs.len() - 1;
    for (i, (hole, s, e)) in runs.into_iter().enumerate() {
        let flags = if i == last { NBD_REPLY_FLAG_DONE } else { 0 };
        let at = offset + s as u64;
        if hole {
            f.head(|b| {
                encode_chunk_header(
                    b,
                    mode,
                    flags,
                    NBD_REPLY_TYPE_OFFSET_HOLE,
                    cookie,
                    offset,
                    12,
                );
                b.extend_from_slice(&at.to_be_bytes());
                b.extend_from_slice(&((e - s) as u32).to_be_bytes());
            });
        } else {
            f.head(|b| {
                encode_chunk_header(
                    b,
                    mode,
                    flags,
                    NBD_REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    offset,
                    8 + (e - s) as u64,
                );
                b.extend_from_slice(&at.to_be_bytes());
            });
            f.data(s..e);
        }
    }
    f
}

/// `base:allocation` descriptors (length, status flags) for consecutive
/// extents given as (length, allocated): proto.md "`base:allocation`
/// metadata context". An unallocated extent is a hole that reads as zeroes
/// (NBD_STATE_HOLE | NBD_STATE_ZERO); an allocated one gets 0 (its content
/// is not known to be zero). Neighbours with equal status are merged; with
/// `req_one` only the first descriptor is kept, clipped to `length`.
pub fn allocation_descriptors(
    extents: impl IntoIterator<Item = (u64, bool)>,
    req_one: bool,
    length: u64,
) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    for (len, allocated) in extents {
        if len == 0 {
            continue;
        }
        let flags = if allocated {
            0
        } else {
            NBD_STATE_HOLE | NBD_STATE_ZERO
        };
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += len,
            _ => out.push((len, flags)),
        }
    }
    assert!(!out.is_empty(), "a status reply has at least one extent");
    assert!(out.len() <= BLOCK_STATUS_EXTENTS_MAX);
    if req_one {
        out.truncate(1);
        out[0].0 = out[0].0.min(length);
    }
    out
}

/// A successful BLOCK_STATUS: one status chunk for our one context, final.
/// Structured replies use NBD_REPLY_TYPE_BLOCK_STATUS (32-bit lengths and
/// flags), extended headers NBD_REPLY_TYPE_BLOCK_STATUS_EXT (64-bit, with a
/// descriptor count).
pub fn reply_block_status(
    mode: ReplyMode,
    cookie: u64,
    offset: u64,
    context_id: u32,
    descriptors: &[(u64, u32)],
) -> Frames {
    assert!(!descriptors.is_empty());
    assert!(descriptors.iter().all(|d| d.0 > 0));
    let mut f = Frames::default();
    f.head(|b| match mode {
        ReplyMode::Simple => panic!("block status needs structured replies"),
        ReplyMode::Structured => {
            let len = 4 + 8 * descriptors.len() as u64;
            encode_chunk_header(
                b,
                mode,
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_BLOCK_STATUS,
                cookie,
                offset,
                len,
            );
            b.extend_from_slice(&context_id.to_be_bytes());
            for &(l, flags) in descriptors {
                let l = u32::try_from(l).expect("extents are bounded by the scan maximum");
                b.extend_from_slice(&l.to_be_bytes());
                b.extend_from_slice(&flags.to_be_bytes());
            }
        }
        ReplyMode::Extended => {
            let len = 8 + 16 * descriptors.len() as u64;
            encode_chunk_header(
                b,
                mode,
                NBD_REPLY_FLAG_DONE,
                NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
                cookie,
                offset,
                len,
            );
            b.extend_from_slice(&context_id.to_be_bytes());
            b.extend_from_slice(&(descriptors.len() as u32).to_be_bytes());
            for &(l, flags) in descriptors {
                b.extend_from_slice(&l.to_be_bytes());
                b.extend_from_slice(&u64::from(flags).to_be_bytes());
            }
        }
    });
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEO: Geometry = Geometry {
        size_bytes: 1 << 20,
        block_size: 512,
    };

    fn req(kind: u16, flags: u16, offset: u64, length: u64) -> RequestHeader {
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

    // Proves the compact and extended request headers and the simple reply
    // golden bytes, and that each format refuses the other's magic.
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
        let big = req(NBD_CMD_TRIM, 0, 0x200, 0x1_0000_0400);
        let e = big.encode_extended();
        assert_eq!(&e[0..4], &[0x21, 0xe4, 0x1c, 0x71]);
        assert_eq!(&e[24..32], &[0, 0, 0, 1, 0, 0, 4, 0]);
        assert_eq!(RequestHeader::decode_extended(&e), Ok(big));
        assert!(RequestHeader::decode(b[..].try_into().unwrap()).is_ok());
        assert!(RequestHeader::decode(e[..28].try_into().unwrap()).is_err());
        let mut e2 = [0u8; 32];
        e2[..28].copy_from_slice(&b);
        assert!(RequestHeader::decode_extended(&e2).is_err());
        assert_eq!(
            encode_simple_reply(NBD_EINVAL, 7),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]
        );
    }

    // Proves meta-context option data parsing and each malformed branch.
    #[test]
    fn meta_request() {
        let mut d = vec![0, 0, 0, 1, b'v', 0, 0, 0, 2];
        for q in ["base:allocation", "qemu:dirty-bitmap:x"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        assert_eq!(
            decode_meta_request(&d),
            Ok(MetaRequest {
                name: "v".into(),
                queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()]
            })
        );
        assert!(matches!(
            decode_meta_request(&d[..d.len() - 1]),
            Err(MetaError::Invalid(_))
        ));
        let mut trailing = d.clone();
        trailing.push(0);
        assert!(matches!(
            decode_meta_request(&trailing),
            Err(MetaError::Invalid(_))
        ));
        let no_colon = [0, 0, 0, 1, b'v', 0, 0, 0, 1, 0, 0, 0, 2, b'a', b'b'];
        assert!(matches!(
            decode_meta_request(&no_colon),
            Err(MetaError::Invalid(_))
        ));
        let empty_ns = [0, 0, 0, 1, b'v', 0, 0, 0, 1, 0, 0, 0, 2, b':', b'b'];
        assert!(decode_meta_request(&empty_ns).is_err());
        let many = [0, 0, 0, 1, b'v', 0, 0, 1, 0];
        assert_eq!(decode_meta_request(&many), Err(MetaError::TooBig));
        assert_eq!(
            decode_meta_request(&[0, 0, 0, 1, b'v', 0, 0, 0, 0]),
            Ok(MetaRequest {
                name: "v".into(),
                queries: vec![]
            })
        );
        let mut out = Vec::new();
        encode_rep_meta_context(&mut out, NBD_OPT_SET_META_CONTEXT, 1, "base:allocation");
        assert_eq!(&out[12..16], &NBD_REP_META_CONTEXT.to_be_bytes());
        assert_eq!(&out[16..20], &19u32.to_be_bytes());
        assert_eq!(&out[20..24], &1u32.to_be_bytes());
        assert_eq!(&out[24..], b"base:allocation");
    }

    fn simple() -> Terms {
        Terms::SIMPLE
    }
    fn structured() -> Terms {
        Terms {
            mode: ReplyMode::Structured,
            block_status: true,
            ..Terms::SIMPLE
        }
    }
    fn extended() -> Terms {
        Terms {
            mode: ReplyMode::Extended,
            block_status: true,
            ..Terms::SIMPLE
        }
    }

    // Proves valid requests become the right commands.
    #[test]
    fn accepts_valid_requests() {
        let t = simple();
        assert_eq!(
            check_request(&req(NBD_CMD_READ, 0, 512, 1024), &GEO, &t),
            Ok(Command::Read {
                offset: 512,
                length: 1024,
                df: false
            })
        );
        assert_eq!(
            check_request(&req(NBD_CMD_WRITE_ZEROES, 0x13, 0, 512), &GEO, &t),
            Ok(Command::WriteZeroes {
                offset: 0,
                length: 512,
                fua: true,
                no_hole: true,
                fast: true
            })
        );
        assert_eq!(
            check_request(&req(NBD_CMD_FLUSH, 0, 0, 0), &GEO, &t),
            Ok(Command::Flush)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_DISC, 0, 0, 0), &GEO, &t),
            Ok(Command::Disconnect)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_WRITE, 0, 1 << 20, 0), &GEO, &t),
            Ok(Command::Noop)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_CACHE, 0, 0, 1 << 20), &GEO, &t),
            Ok(Command::Cache {
                offset: 0,
                length: 1 << 20
            })
        );
        let t = structured();
        assert_eq!(
            check_request(&req(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512), &GEO, &t),
            Ok(Command::Read {
                offset: 0,
                length: 512,
                df: true
            })
        );
        assert_eq!(
            check_request(
                &req(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 0, 1 << 20),
                &GEO,
                &t
            ),
            Ok(Command::BlockStatus {
                offset: 0,
                length: 1 << 20,
                req_one: true
            })
        );
        // Extended: WRITE with PAYLOAD_LEN, 64-bit effect lengths.
        let t = extended();
        let geo = Geometry {
            size_bytes: 1 << 40,
            block_size: 512,
        };
        assert_eq!(
            check_request(
                &req(NBD_CMD_WRITE, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 4096),
                &geo,
                &t
            ),
            Ok(Command::Write {
                offset: 0,
                length: 4096,
                fua: false
            })
        );
        assert_eq!(
            check_request(&req(NBD_CMD_TRIM, 0, 0, 1 << 35), &geo, &t),
            Ok(Command::Trim {
                offset: 0,
                length: 1 << 35,
                fua: false
            })
        );
    }

    // Proves each rejection branch of check_request and its payload handling.
    #[test]
    fn rejects_each_bad_request() {
        use Payload::*;
        let t = simple();
        // Unknown command; in compact mode nothing but WRITE has a payload.
        assert_eq!(
            check_request(&req(99, 0, 0, 512), &GEO, &t),
            rej(NBD_EINVAL, None)
        );
        assert_eq!(
            check_request(&req(99, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 512), &GEO, &t),
            rej(NBD_EINVAL, None)
        );
        // BLOCK_STATUS without a selected context.
        assert_eq!(
            check_request(&req(NBD_CMD_BLOCK_STATUS, 0, 0, 512), &GEO, &t),
            rej(NBD_EINVAL, None)
        );
        // Unknown or inapplicable flags; DF needs structured replies.
        assert_eq!(
            check_request(&req(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512), &GEO, &t),
            rej(NBD_EINVAL, None)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_READ, 0x8000, 0, 512), &GEO, &t),
            rej(NBD_EINVAL, None)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 512), &GEO, &t),
            rej(NBD_EINVAL, Discard(512))
        );
        assert_eq!(
            check_request(&req(NBD_CMD_TRIM, NBD_CMD_FLAG_FAST_ZERO, 0, 512), &GEO, &t),
            rej(NBD_EINVAL, None)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_CACHE, NBD_CMD_FLAG_NO_HOLE, 0, 512), &GEO, &t),
            rej(NBD_EINVAL, None)
        );
        assert_eq!(
            check_request(
                &req(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_DF, 0, 512),
                &GEO,
                &structured()
            ),
            rej(NBD_EINVAL, None)
        );
        // Flush with a range.
        assert_eq!(
            check_request(&req(NBD_CMD_FLUSH, 0, 0, 512), &GEO, &t),
            rej(NBD_EINVAL, None)
        );
        // Oversized data requests.
        let max = u64::from(REQUEST_MAX_BYTES);
        let geo = Geometry {
            size_bytes: 1 << 40,
            block_size: 512,
        };
        assert_eq!(
            check_request(&req(NBD_CMD_READ, 0, 0, max + 512), &geo, &t),
            rej(NBD_EINVAL, None)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_WRITE, 0, 0, max + 512), &geo, &t),
            rej(NBD_EINVAL, Discard(REQUEST_MAX_BYTES + 512))
        );
        assert_eq!(
            check_request(&req(NBD_CMD_WRITE, 0, 0, u64::from(u32::MAX)), &geo, &t),
            rej(NBD_EINVAL, Close)
        );
        // A lower configured maximum is enforced.
        let small = Terms {
            request_max_bytes: 65536,
            ..t
        };
        assert_eq!(
            check_request(&req(NBD_CMD_READ, 0, 0, 65536 + 512), &geo, &small),
            rej(NBD_EINVAL, None)
        );
        // Trim may exceed the data maximum.
        assert!(check_request(&req(NBD_CMD_TRIM, 0, 0, max + 512), &geo, &t).is_ok());
        // Beyond the end and offset overflow.
        assert_eq!(
            check_request(&req(NBD_CMD_READ, 0, (1 << 20) - 512, 1024), &GEO, &t),
            rej(NBD_EINVAL, None)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_WRITE, 0, 1 << 20, 512), &GEO, &t),
            rej(NBD_ENOSPC, Discard(512))
        );
        assert_eq!(
            check_request(&req(NBD_CMD_TRIM, 0, u64::MAX - 100, 512), &GEO, &t),
            rej(NBD_EINVAL, None)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_WRITE_ZEROES, 0, 1 << 21, 512), &GEO, &t),
            rej(NBD_ENOSPC, None)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_CACHE, 0, 1 << 20, 512), &GEO, &t),
            rej(NBD_EINVAL, None)
        );
        assert_eq!(
            check_request(
                &req(NBD_CMD_BLOCK_STATUS, 0, 0, (1 << 20) + 512),
                &GEO,
                &structured()
            ),
            rej(NBD_EINVAL, None)
        );
        // Zero-length status query.
        assert_eq!(
            check_request(&req(NBD_CMD_BLOCK_STATUS, 0, 0, 0), &GEO, &structured()),
            rej(NBD_EINVAL, None)
        );
        // Misaligned offset and length.
        assert_eq!(
            check_request(&req(NBD_CMD_READ, 0, 100, 512), &GEO, &t),
            rej(NBD_EINVAL, None)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_WRITE, 0, 0, 100), &GEO, &t),
            rej(NBD_EINVAL, Discard(100))
        );
        let geo4k = Geometry {
            size_bytes: 1 << 20,
            block_size: 4096,
        };
        assert_eq!(
            check_request(&req(NBD_CMD_READ, 0, 512, 4096), &geo4k, &t),
            rej(NBD_EINVAL, None)
        );
    }

    // Proves the extended-header payload rules: WRITE must carry
    // PAYLOAD_LEN or not (qemu omits it), other commands with a payload
    // have it drained before EINVAL, and oversized payloads close the
    // connection.
    #[test]
    fn extended_payload_rules() {
        use Payload::*;
        let t = extended();
        assert_eq!(
            check_request(&req(NBD_CMD_WRITE, 0, 0, 512), &GEO, &t),
            Ok(Command::Write {
                offset: 0,
                length: 512,
                fua: false
            })
        );
        assert_eq!(
            check_request(&req(NBD_CMD_WRITE, 0, 0, 100), &GEO, &t),
            rej(NBD_EINVAL, Discard(100))
        );
        assert_eq!(
            check_request(
                &req(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 12),
                &GEO,
                &t
            ),
            rej(NBD_EINVAL, Discard(12))
        );
        assert_eq!(
            check_request(&req(99, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 512), &GEO, &t),
            rej(NBD_EINVAL, Discard(512))
        );
        assert_eq!(
            check_request(&req(99, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 1 << 40), &GEO, &t),
            rej(NBD_EINVAL, Close)
        );
        assert_eq!(
            check_request(
                &req(NBD_CMD_WRITE, NBD_CMD_FLAG_PAYLOAD_LEN, 0, 1 << 33),
                &GEO,
                &t
            ),
            rej(NBD_EINVAL, Close)
        );
        assert_eq!(
            check_request(
                &req(NBD_CMD_WRITE, NBD_CMD_FLAG_PAYLOAD_LEN, 1 << 20, 512),
                &GEO,
                &t
            ),
            rej(NBD_ENOSPC, Discard(512))
        );
        // Offset + 64-bit length overflowing.
        assert_eq!(
            check_request(&req(NBD_CMD_WRITE_ZEROES, 0, 512, u64::MAX), &GEO, &t),
            rej(NBD_ENOSPC, None)
        );
    }

    /// Split a reply into (magic, flags, type, cookie, offset, payload).
    fn chunks(mode: ReplyMode, f: &Frames, data: &[u8]) -> Vec<(u16, u16, Vec<u8>)> {
        let mut wire = Vec::new();
        for s in &f.segments {
            match s {
                Segment::Head(r) => wire.extend_from_slice(&f.bytes[r.clone()]),
                Segment::Data(r) => wire.extend_from_slice(&data[r.clone()]),
            }
        }
        assert_eq!(wire.len(), f.wire_len());
        let mut out = Vec::new();
        let mut b = &wire[..];
        while !b.is_empty() {
            let (flags, kind) = (
                u16::from_be_bytes([b[4], b[5]]),
                u16::from_be_bytes([b[6], b[7]]),
            );
            let (hdr, len) = match mode {
                ReplyMode::Structured => {
                    assert_eq!(&b[0..4], &NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
                    (
                        20,
                        u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize,
                    )
                }
                _ => {
                    assert_eq!(&b[0..4], &NBD_EXTENDED_REPLY_MAGIC.to_be_bytes());
                    (
                        32,
                        u64::from_be_bytes(b[24..32].try_into().unwrap()) as usize,
                    )
                }
            };
            out.push((flags, kind, b[hdr..hdr + len].to_vec()));
            b = &b[hdr + len..];
        }
        out
    }

    // Proves structured READ replies: data and whole aligned zero blocks
    // alternate as OFFSET_DATA / OFFSET_HOLE with absolute offsets, only the
    // last chunk is DONE, DF forces one data chunk, unaligned edges stay
    // data, and simple mode sends header then the data.
    #[test]
    fn read_reply_holes() {
        let mut data = vec![0u8; 5 * 4096];
        data[0] = 1; // block 0 data
        data[3 * 4096 + 5] = 1; // block 3 data
        let f = reply_read(ReplyMode::Structured, 9, 8192, &data, false);
        let c = chunks(ReplyMode::Structured, &f, &data);
        let kinds: Vec<_> = c.iter().map(|c| (c.0, c.1)).collect();
        assert_eq!(
            kinds,
            [
                (0, NBD_REPLY_TYPE_OFFSET_DATA),
                (0, NBD_REPLY_TYPE_OFFSET_HOLE),
                (0, NBD_REPLY_TYPE_OFFSET_DATA),
                (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_HOLE)
            ]
        );
        assert_eq!(&c[0].2[..8], &8192u64.to_be_bytes());
        assert_eq!(c[0].2.len(), 8 + 4096);
        assert_eq!(
            c[1].2,
            [&(3 * 4096u64).to_be_bytes()[..], &8192u32.to_be_bytes()].concat()
        );
        assert_eq!(&c[2].2[..8], &(5 * 4096u64).to_be_bytes());
        assert_eq!(c[3].2[8..], 4096u32.to_be_bytes());
        // Extended: same chunks, header offset = the request's offset.
        let f = reply_read(ReplyMode::Extended, 9, 8192, &data, false);
        assert_eq!(&f.bytes[16..24], &8192u64.to_be_bytes());
        assert_eq!(chunks(ReplyMode::Extended, &f, &data).len(), 4);
        // DF: one data chunk with the zeroes present.
        let f = reply_read(ReplyMode::Structured, 9, 8192, &data, true);
        let c = chunks(ReplyMode::Structured, &f, &data);
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].0, c[0].1, c[0].2.len()), (1, 1, 8 + data.len()));
        // Unaligned start (512-byte blocks): the partial head stays data.
        let zeros = vec![0u8; 4096 + 512];
        let f = reply_read(ReplyMode::Structured, 1, 3584, &zeros, false);
        let c = chunks(ReplyMode::Structured, &f, &zeros);
        assert_eq!(
            c.iter().map(|c| c.1).collect::<Vec<_>>(),
            [NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE]
        );
        assert_eq!(c[0].2.len(), 8 + 512);
        // All zero: one hole. Empty: a NONE chunk.
        let f = reply_read(ReplyMode::Structured, 1, 0, &zeros[..4096], false);
        assert_eq!(f.bytes.len(), 20 + 12);
        let f = reply_read(ReplyMode::Structured, 1, 0, &[], false);
        assert_eq!(&f.bytes[4..8], &[0, 1, 0, 0]);
        // Simple: header + data segment.
        let f = reply_read(ReplyMode::Simple, 1, 0, &data, false);
        assert_eq!(
            f.segments,
            vec![Segment::Head(0..16), Segment::Data(0..data.len())]
        );
    }

    // Proves the success and error framings per mode: simple replies where
    // allowed, NONE/DONE chunks otherwise, ERROR chunks with a message.
    #[test]
    fn ok_and_error_replies() {
        let f = reply_ok(ReplyMode::Structured, NBD_CMD_WRITE, 5, 0);
        assert_eq!(f.bytes, encode_simple_reply(0, 5));
        let f = reply_ok(ReplyMode::Structured, NBD_CMD_READ, 5, 0);
        assert_eq!(
            f.bytes,
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0
            ]
        );
        let f = reply_ok(ReplyMode::Extended, NBD_CMD_WRITE, 5, 0x200);
        assert_eq!(f.bytes.len(), 32);
        assert_eq!(&f.bytes[0..8], &[0x6e, 0x8a, 0x27, 0x8c, 0, 1, 0, 0]);
        assert_eq!(&f.bytes[16..24], &0x200u64.to_be_bytes());
        let f = reply_error(ReplyMode::Simple, 5, 0, NBD_EIO, "x");
        assert_eq!(f.bytes, encode_simple_reply(NBD_EIO, 5));
        let f = reply_error(ReplyMode::Structured, 5, 0, NBD_EIO, "io");
        assert_eq!(&f.bytes[4..8], &[0, 1, 0x80, 0x01]);
        assert_eq!(&f.bytes[16..20], &8u32.to_be_bytes());
        assert_eq!(&f.bytes[20..], &[0, 0, 0, 5, 0, 2, b'i', b'o']);
        let long = "é".repeat(3000);
        let f = reply_error(ReplyMode::Extended, 5, 0, NBD_EIO, &long);
        let n = u16::from_be_bytes([f.bytes[36], f.bytes[37]]) as usize;
        assert!(n <= STRING_MAX_BYTES);
        assert!(std::str::from_utf8(&f.bytes[38..]).is_ok());
    }

    // Proves allocation extents become merged base:allocation descriptors,
    // REQ_ONE keeps one clipped descriptor, and both status chunk formats
    // have the spec's layout.
    #[test]
    fn block_status_replies() {
        let d = allocation_descriptors(
            [(4096, true), (4096, true), (8192, false), (4096, true)],
            false,
            1 << 20,
        );
        assert_eq!(d, vec![(8192, 0), (8192, 3), (4096, 0)]);
        let d1 = allocation_descriptors([(8192, false), (4096, true)], true, 4096);
        assert_eq!(d1, vec![(4096, 3)]);
        let f = reply_block_status(ReplyMode::Structured, 7, 0, 1, &d);
        assert_eq!(&f.bytes[4..8], &[0, 1, 0, 5]);
        assert_eq!(&f.bytes[16..20], &(4 + 24u32).to_be_bytes());
        assert_eq!(&f.bytes[20..24], &1u32.to_be_bytes());
        assert_eq!(&f.bytes[24..32], &[0, 0, 0x20, 0, 0, 0, 0, 0]);
        assert_eq!(&f.bytes[32..40], &[0, 0, 0x20, 0, 0, 0, 0, 3]);
        let f = reply_block_status(ReplyMode::Extended, 7, 0x1000, 1, &d);
        assert_eq!(&f.bytes[4..8], &[0, 1, 0, 6]);
        assert_eq!(&f.bytes[24..32], &(8 + 48u64).to_be_bytes());
        assert_eq!(&f.bytes[32..40], &[0, 0, 0, 1, 0, 0, 0, 3]);
        assert_eq!(
            &f.bytes[40..56],
            &[0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(f.bytes.len(), 32 + 8 + 48);
    }
}
