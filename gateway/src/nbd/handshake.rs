//! The NBD fixed-newstyle handshake as a pure state machine: bytes in,
//! reply bytes and a verdict out. It never touches a socket or a clock; the
//! server feeds it what it reads and writes what it produces.
//!
//! Policy (proto.md "Fixed newstyle negotiation", "Option types"):
//! * the export name "" is not a default export: it is unknown;
//! * an unknown export gets NBD_REP_ERR_UNKNOWN for INFO/GO and a hard
//!   disconnect for EXPORT_NAME, which cannot return an error;
//! * unknown options get NBD_REP_ERR_UNSUP and the haggling goes on;
//! * INFO and GO report the same size and flags, and GO always includes
//!   NBD_INFO_BLOCK_SIZE;
//! * a client that did not set NBD_FLAG_C_FIXED_NEWSTYLE may only send
//!   NBD_OPT_EXPORT_NAME (plain newstyle has no option replies).

use super::codec::{self, CodecError, OptionHeader};
use thiserror::Error;

/// Options one connection may send before it is cut off: haggling forever is
/// a denial of service (proto.md lets the server hard-disconnect then).
pub const OPTIONS_MAX: u32 = 4096;

/// What the server tells a client about one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub size_bytes: u64,
    /// Minimum block size (512 or 4096).
    pub block_size: u32,
    /// Transmission flags (proto.md "Transmission flags").
    pub flags: u16,
    pub description: Option<String>,
}

/// The export catalogue as the handshake sees it, read at the moment each
/// option is processed.
pub trait Exports {
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// Export names in a stable order.
    fn names(&self) -> Vec<String>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Feed at least this many unconsumed bytes before calling again.
    NeedBytes(usize),
    /// Enter the transmission phase on this export (after `out` is sent).
    Done(ExportInfo),
    /// The client aborted; send `out` then close.
    Abort,
}

/// Reasons to hard-disconnect during the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("option {0} sent without fixed newstyle")]
    NotFixedNewstyle(u32),
    #[error("NBD_OPT_EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
    #[error("more than {OPTIONS_MAX} options")]
    TooManyOptions,
    #[error("handshake already finished")]
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData(OptionHeader),
    Finished,
}

#[derive(Debug)]
pub struct Handshake {
    state: State,
    fixed_newstyle: bool,
    no_zeroes: bool,
    options: u32,
}

impl Handshake {
    /// Start a handshake; the server greeting is appended to `out`.
    pub fn new(out: &mut Vec<u8>) -> Handshake {
        out.extend_from_slice(&codec::encode_greeting());
        Handshake {
            state: State::ClientFlags,
            fixed_newstyle: false,
            no_zeroes: false,
            options: 0,
        }
    }

    /// Consume as much of `input` as possible, appending replies to `out`.
    /// Returns the bytes consumed and what happens next.
    pub fn advance(
        &mut self,
        input: &[u8],
        exports: &dyn Exports,
        out: &mut Vec<u8>,
    ) -> Result<(usize, Progress), HandshakeError> {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match self.state {
                State::Finished => return Err(HandshakeError::Finished),
                State::ClientFlags => {
                    let Some(b) = rest.first_chunk::<4>() else {
                        return Ok((used, Progress::NeedBytes(4)));
                    };
                    let f = codec::decode_client_flags(b)?;
                    self.fixed_newstyle = f.fixed_newstyle;
                    self.no_zeroes = f.no_zeroes;
                    used += 4;
                    self.state = State::OptionHeader;
                }
                State::OptionHeader => {
                    let Some(b) = rest.first_chunk::<{ codec::OPTION_HEADER_BYTES }>() else {
                        return Ok((used, Progress::NeedBytes(codec::OPTION_HEADER_BYTES)));
                    };
                    let h = codec::decode_option_header(b)?;
                    self.options += 1;
                    if self.options > OPTIONS_MAX {
                        return Err(HandshakeError::TooManyOptions);
                    }
                    if !self.fixed_newstyle && h.option != codec::NBD_OPT_EXPORT_NAME {
                        return Err(HandshakeError::NotFixedNewstyle(h.option));
                    }
                    used += codec::OPTION_HEADER_BYTES;
                    self.state = State::OptionData(h);
                }
                State::OptionData(h) => {
                    let len = h.length as usize;
                    if rest.len() < len {
                        return Ok((used, Progress::NeedBytes(len)));
                    }
                    used += len;
                    self.state = State::OptionHeader;
                    if let Some(p) = self.option(h.option, &rest[..len], exports, out)? {
                        self.state = State::Finished;
                        return Ok((used, p));
                    }
                }
            }
        }
    }

    /// Handle one complete option; `Some` ends the handshake.
    fn option(
        &mut self,
        option: u32,
        data: &[u8],
        exports: &dyn Exports,
        out: &mut Vec<u8>,
    ) -> Result<Option<Progress>, HandshakeError> {
        match option {
            codec::NBD_OPT_EXPORT_NAME => {
                let name = codec::decode_export_name(data)?;
                let Some(e) = lookup(exports, &name) else {
                    return Err(HandshakeError::UnknownExport(name));
                };
                codec::encode_export_name_reply(out, e.size_bytes, e.flags, self.no_zeroes);
                Ok(Some(Progress::Done(e)))
            }
            codec::NBD_OPT_ABORT => {
                // "The server MUST reply with NBD_REP_ACK"; data is ignored.
                codec::encode_option_reply(out, option, codec::NBD_REP_ACK, &[]);
                Ok(Some(Progress::Abort))
            }
            codec::NBD_OPT_LIST => {
                if !data.is_empty() {
                    error_reply(
                        out,
                        option,
                        codec::NBD_REP_ERR_INVALID,
                        "LIST takes no data",
                    );
                    return Ok(None);
                }
                for name in exports.names() {
                    codec::encode_rep_server(out, &name);
                }
                codec::encode_option_reply(out, option, codec::NBD_REP_ACK, &[]);
                Ok(None)
            }
            codec::NBD_OPT_INFO | codec::NBD_OPT_GO => {
                let req = match codec::decode_info_request(data) {
                    Ok(r) => r,
                    Err(CodecError::OptionData(why)) => {
                        error_reply(out, option, codec::NBD_REP_ERR_INVALID, why);
                        return Ok(None);
                    }
                    Err(e) => return Err(e.into()),
                };
                let Some(e) = lookup(exports, &req.name) else {
                    error_reply(out, option, codec::NBD_REP_ERR_UNKNOWN, "unknown export");
                    return Ok(None);
                };
                codec::encode_info_export(out, option, e.size_bytes, e.flags);
                let go = option == codec::NBD_OPT_GO;
                if go || req.infos.contains(&codec::NBD_INFO_BLOCK_SIZE) {
                    codec::encode_info_block_size(
                        out,
                        option,
                        e.block_size,
                        codec::PREFERRED_BLOCK_BYTES.max(e.block_size),
                        codec::REQUEST_MAX_BYTES,
                    );
                }
                if req.infos.contains(&codec::NBD_INFO_NAME) {
                    codec::encode_info_string(out, option, codec::NBD_INFO_NAME, &e.name);
                }
                if let Some(d) = &e.description
                    && req.infos.contains(&codec::NBD_INFO_DESCRIPTION)
                {
                    codec::encode_info_string(out, option, codec::NBD_INFO_DESCRIPTION, d);
                }
                codec::encode_option_reply(out, option, codec::NBD_REP_ACK, &[]);
                Ok(go.then_some(Progress::Done(e)))
            }
            _ => {
                // STARTTLS, STRUCTURED_REPLY, META_CONTEXT, ... are not
                // supported yet; the client may go on without them.
                error_reply(out, option, codec::NBD_REP_ERR_UNSUP, "unsupported option");
                Ok(None)
            }
        }
    }
}

/// "" is never a default export here.
fn lookup(exports: &dyn Exports, name: &str) -> Option<ExportInfo> {
    if name.is_empty() {
        return None;
    }
    exports.lookup(name)
}

/// Error replies may carry a human-readable message (proto.md "Option reply
/// types").
fn error_reply(out: &mut Vec<u8>, option: u32, reply: u32, msg: &str) {
    assert!(reply & (1 << 31) != 0);
    codec::encode_option_reply(out, option, reply, msg.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::codec::*;

    struct Two;
    impl Exports for Two {
        fn lookup(&self, name: &str) -> Option<ExportInfo> {
            (name == "a" || name == "b").then(|| ExportInfo {
                name: name.into(),
                size_bytes: 1 << 20,
                block_size: 512,
                flags: NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH,
                description: None,
            })
        }
        fn names(&self) -> Vec<String> {
            vec!["a".into(), "b".into()]
        }
    }

    fn opt(option: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }

    /// Run a whole input through a fresh handshake.
    fn run(input: &[u8]) -> (Result<(usize, Progress), HandshakeError>, Vec<u8>) {
        let mut out = Vec::new();
        let mut h = Handshake::new(&mut out);
        out.clear();
        let r = h.advance(input, &Two, &mut out);
        (r, out)
    }

    /// Split a reply stream into (option, type, data) triples.
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            assert_eq!(&b[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
            let o = u32::from_be_bytes(b[8..12].try_into().unwrap());
            let t = u32::from_be_bytes(b[12..16].try_into().unwrap());
            let l = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
            v.push((o, t, b[20..20 + l].to_vec()));
            b = &b[20 + l..];
        }
        v
    }

    const FIXED: [u8; 4] = [0, 0, 0, 3];

    // Proves the state machine asks for more bytes at every boundary and
    // produces the greeting first.
    #[test]
    fn partial_input_needs_bytes() {
        let mut out = Vec::new();
        let mut h = Handshake::new(&mut out);
        assert_eq!(out, encode_greeting());
        out.clear();
        assert_eq!(
            h.advance(&[0, 0], &Two, &mut out),
            Ok((0, Progress::NeedBytes(4)))
        );
        assert_eq!(
            h.advance(&FIXED, &Two, &mut out),
            Ok((4, Progress::NeedBytes(16)))
        );
        let o = opt(NBD_OPT_LIST, &[]);
        assert_eq!(
            h.advance(&o[..10], &Two, &mut out),
            Ok((0, Progress::NeedBytes(16)))
        );
        assert!(out.is_empty());
    }

    // Proves LIST returns one NBD_REP_SERVER per export then ACK, and that
    // LIST with data gets NBD_REP_ERR_INVALID.
    #[test]
    fn list() {
        let mut input = FIXED.to_vec();
        input.extend(opt(NBD_OPT_LIST, &[]));
        input.extend(opt(NBD_OPT_LIST, b"x"));
        let (r, out) = run(&input);
        assert_eq!(r, Ok((input.len(), Progress::NeedBytes(16))));
        let rs = replies(&out);
        assert_eq!(rs.len(), 4);
        assert_eq!(
            rs[0],
            (NBD_OPT_LIST, NBD_REP_SERVER, vec![0, 0, 0, 1, b'a'])
        );
        assert_eq!(rs[1].2, vec![0, 0, 0, 1, b'b']);
        assert_eq!((rs[2].1, rs[2].2.len()), (NBD_REP_ACK, 0));
        assert_eq!(rs[3].1, NBD_REP_ERR_INVALID);
    }

    // Proves INFO and GO report identical export info, GO adds the block
    // size, and GO ends the handshake.
    #[test]
    fn info_then_go() {
        let mut input = FIXED.to_vec();
        input.extend(opt(NBD_OPT_INFO, &info_data("a", &[NBD_INFO_NAME])));
        input.extend(opt(NBD_OPT_GO, &info_data("a", &[])));
        let (r, out) = run(&input);
        let (used, p) = r.unwrap();
        assert_eq!(used, input.len());
        assert!(matches!(p, Progress::Done(ref e) if e.name == "a"));
        let rs = replies(&out);
        let kinds: Vec<_> = rs
            .iter()
            .map(|r| (r.0, r.1, r.2.get(..2).unwrap_or(&[]).to_vec()))
            .collect();
        assert_eq!(kinds[0], (NBD_OPT_INFO, NBD_REP_INFO, vec![0, 0]));
        assert_eq!(kinds[1], (NBD_OPT_INFO, NBD_REP_INFO, vec![0, 1]));
        assert_eq!(rs[1].2[2..], *b"a");
        assert_eq!(rs[2].1, NBD_REP_ACK);
        assert_eq!(kinds[3], (NBD_OPT_GO, NBD_REP_INFO, vec![0, 0]));
        assert_eq!(rs[0].2, rs[3].2, "INFO and GO must agree");
        assert_eq!(kinds[4], (NBD_OPT_GO, NBD_REP_INFO, vec![0, 3]));
        assert_eq!(rs[5].1, NBD_REP_ACK);
        assert_eq!(rs.len(), 6);
    }

    // Proves unknown and empty export names get NBD_REP_ERR_UNKNOWN for
    // INFO/GO, and malformed INFO data gets NBD_REP_ERR_INVALID.
    #[test]
    fn unknown_export_and_bad_info() {
        let mut input = FIXED.to_vec();
        input.extend(opt(NBD_OPT_GO, &info_data("zz", &[])));
        input.extend(opt(NBD_OPT_INFO, &info_data("", &[])));
        input.extend(opt(NBD_OPT_GO, &[0, 0, 0, 50, 0, 0]));
        let (r, out) = run(&input);
        assert_eq!(r, Ok((input.len(), Progress::NeedBytes(16))));
        let t: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(
            t,
            [
                NBD_REP_ERR_UNKNOWN,
                NBD_REP_ERR_UNKNOWN,
                NBD_REP_ERR_INVALID
            ]
        );
    }

    // Proves unknown options get NBD_REP_ERR_UNSUP and haggling continues,
    // and ABORT is acknowledged.
    #[test]
    fn unsupported_then_abort() {
        let mut input = FIXED.to_vec();
        input.extend(opt(NBD_OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(0x7777, b"junk"));
        input.extend(opt(NBD_OPT_ABORT, &[]));
        let (r, out) = run(&input);
        assert_eq!(r, Ok((input.len(), Progress::Abort)));
        let t: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(t, [NBD_REP_ERR_UNSUP, NBD_REP_ERR_UNSUP, NBD_REP_ACK]);
    }

    // Proves EXPORT_NAME replies size+flags (+zeroes unless NO_ZEROES) and
    // that an unknown name, including "", is a hard disconnect.
    #[test]
    fn export_name() {
        let mut input = vec![0, 0, 0, 1];
        input.extend(opt(NBD_OPT_EXPORT_NAME, b"b"));
        let (r, out) = run(&input);
        assert!(matches!(r, Ok((_, Progress::Done(_)))));
        assert_eq!(out.len(), 8 + 2 + 124);
        let mut input = FIXED.to_vec();
        input.extend(opt(NBD_OPT_EXPORT_NAME, b"b"));
        assert_eq!(run(&input).1.len(), 10);
        for name in [&b"nope"[..], b""] {
            let mut input = FIXED.to_vec();
            input.extend(opt(NBD_OPT_EXPORT_NAME, name));
            assert!(matches!(
                run(&input).0,
                Err(HandshakeError::UnknownExport(_))
            ));
        }
    }

    // Proves each hard-disconnect branch: garbage client flags, bad option
    // magic, oversized option, non-fixed client sending other options.
    #[test]
    fn hard_disconnects() {
        assert!(matches!(
            run(b"GET / HTTP/1.1\r\n").0,
            Err(HandshakeError::Codec(_))
        ));
        let mut input = FIXED.to_vec();
        input.extend(b"XHAVEOPT\0\0\0\x03\0\0\0\0");
        assert!(matches!(
            run(&input).0,
            Err(HandshakeError::Codec(CodecError::Magic(_)))
        ));
        let mut input = FIXED.to_vec();
        let mut o = opt(0x99, &[]);
        o[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        input.extend(o);
        assert!(matches!(
            run(&input).0,
            Err(HandshakeError::Codec(CodecError::OptionTooLarge(_)))
        ));
        let mut input = vec![0, 0, 0, 0];
        input.extend(opt(NBD_OPT_LIST, &[]));
        assert_eq!(
            run(&input).0,
            Err(HandshakeError::NotFixedNewstyle(NBD_OPT_LIST))
        );
    }

    // Proves the option-count limit cuts off endless haggling.
    #[test]
    fn too_many_options() {
        let mut input = FIXED.to_vec();
        for _ in 0..=OPTIONS_MAX {
            input.extend(opt(0x99, &[]));
        }
        assert_eq!(run(&input).0, Err(HandshakeError::TooManyOptions));
    }
}
