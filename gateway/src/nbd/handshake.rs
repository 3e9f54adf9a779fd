//! The NBD fixed-newstyle handshake as a pure state machine: bytes in,
//! reply bytes and a verdict out. It never touches a socket or a clock; the
//! server feeds it what it reads and writes what it produces (and performs
//! the TLS upgrade when told to).
//!
//! Policy (proto.md "Fixed newstyle negotiation", "Option types", "TLS
//! support"):
//! * the export name "" is not a default export: it is unknown;
//! * an unknown export gets NBD_REP_ERR_UNKNOWN for INFO/GO/META_CONTEXT and
//!   a hard disconnect for EXPORT_NAME, which cannot return an error;
//! * unknown options get NBD_REP_ERR_UNSUP and the haggling goes on;
//! * INFO and GO send the same replies for the same state: NBD_INFO_EXPORT,
//!   NAME, DESCRIPTION and BLOCK_SIZE, whether requested or not;
//! * STRUCTURED_REPLY and EXTENDED_HEADERS each succeed once; extended
//!   headers take precedence (a later STRUCTURED_REPLY gets
//!   NBD_REP_ERR_EXT_HEADER_REQD) and forbid EXPORT_NAME;
//! * META_CONTEXT options need structured replies or extended headers first;
//!   the only context is `base:allocation`;
//! * STARTTLS: NBD_REP_ERR_POLICY when no certificate is configured; with
//!   one, ACK then upgrade, forgetting every negotiated option; with TLS
//!   required (FORCEDTLS) every other option but ABORT gets
//!   NBD_REP_ERR_TLS_REQD until TLS is up, and EXPORT_NAME hard-disconnects;
//! * a client that did not set NBD_FLAG_C_FIXED_NEWSTYLE may only send
//!   NBD_OPT_EXPORT_NAME (plain newstyle has no option replies).

use super::codec::{self, CodecError, MetaError, OptionHeader, ReplyMode, Terms};
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
    /// Transmission flags that do not depend on negotiation (proto.md
    /// "Transmission flags"); the handshake adds NBD_FLAG_SEND_DF when
    /// structured replies or extended headers are on.
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

/// Whether TLS is offered, and whether it is required.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No certificate: STARTTLS gets NBD_REP_ERR_POLICY (proto.md "NOTLS").
    #[default]
    Off,
    /// STARTTLS accepted, plain text allowed too.
    Optional,
    /// Everything but STARTTLS and ABORT needs TLS first ("FORCEDTLS").
    Required,
}

/// Handshake settings fixed for the server's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Advertised maximum payload (NBD_INFO_BLOCK_SIZE).
    pub request_max_bytes: u32,
    pub tls: TlsMode,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            request_max_bytes: codec::REQUEST_MAX_BYTES,
            tls: TlsMode::Off,
        }
    }
}

/// The outcome of a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreed {
    /// The export, with the transmission flags as sent to the client.
    pub export: ExportInfo,
    pub terms: Terms,
    /// TLS was negotiated on this connection.
    pub tls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Feed at least this many unconsumed bytes before calling again.
    NeedBytes(usize),
    /// Enter the transmission phase (after `out` is sent).
    Done(Box<Agreed>),
    /// The client aborted; send `out` then close.
    Abort,
    /// NBD_OPT_STARTTLS was acknowledged: send `out`, run the TLS handshake
    /// on the connection (any unconsumed input is the start of it), then
    /// keep feeding this handshake with the decrypted bytes.
    StartTls,
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
    #[error("NBD_OPT_EXPORT_NAME after extended headers were negotiated")]
    ExportNameWithExtendedHeaders,
    #[error("NBD_OPT_EXPORT_NAME without TLS while TLS is required")]
    TlsRequired,
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
    config: Config,
    fixed_newstyle: bool,
    no_zeroes: bool,
    options: u32,
    structured: bool,
    extended: bool,
    /// Export the last SET_META_CONTEXT selected `base:allocation` for.
    meta_export: Option<String>,
    tls_active: bool,
}

impl Handshake {
    /// Start a handshake; the server greeting is appended to `out`.
    pub fn new(out: &mut Vec<u8>, config: Config) -> Handshake {
        assert!(config.request_max_bytes >= codec::PREFERRED_BLOCK_BYTES);
        assert!(config.request_max_bytes <= codec::REQUEST_MAX_BYTES_LIMIT);
        out.extend_from_slice(&codec::encode_greeting());
        Handshake {
            state: State::ClientFlags,
            config,
            fixed_newstyle: false,
            no_zeroes: false,
            options: 0,
            structured: false,
            extended: false,
            meta_export: None,
            tls_active: false,
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
                    match self.option(h.option, &rest[..len], exports, out)? {
                        None => {}
                        Some(Progress::StartTls) => return Ok((used, Progress::StartTls)),
                        Some(p) => {
                            self.state = State::Finished;
                            return Ok((used, p));
                        }
                    }
                }
            }
        }
    }

    fn mode(&self) -> ReplyMode {
        if self.extended {
            ReplyMode::Extended
        } else if self.structured {
            ReplyMode::Structured
        } else {
            ReplyMode::Simple
        }
    }

    /// Transmission flags as sent for `e` in the current state.
    fn flags(&self, e: &ExportInfo) -> u16 {
        // "The server MUST set this transmission flag to 1 if the
        // NBD_CMD_READ request supports the NBD_CMD_FLAG_DF flag, and MUST
        // leave this flag clear if neither structured replies nor extended
        // headers have been negotiated."
        let df = if self.mode() == ReplyMode::Simple {
            0
        } else {
            codec::NBD_FLAG_SEND_DF
        };
        (e.flags & !codec::NBD_FLAG_SEND_DF) | df
    }

    fn agreed(&self, mut e: ExportInfo) -> Progress {
        e.flags = self.flags(&e);
        let block_status =
            self.mode() != ReplyMode::Simple && self.meta_export.as_deref() == Some(&e.name);
        Progress::Done(Box::new(Agreed {
            export: e,
            terms: Terms {
                mode: self.mode(),
                block_status,
                request_max_bytes: self.config.request_max_bytes,
            },
            tls: self.tls_active,
        }))
    }

    /// Handle one complete option; `Some` ends the handshake or starts TLS.
    fn option(
        &mut self,
        option: u32,
        data: &[u8],
        exports: &dyn Exports,
        out: &mut Vec<u8>,
    ) -> Result<Option<Progress>, HandshakeError> {
        let tls_missing = self.config.tls == TlsMode::Required && !self.tls_active;
        if tls_missing {
            match option {
                codec::NBD_OPT_STARTTLS | codec::NBD_OPT_ABORT => {}
                // "If the server receives a request to enter transmission
                // mode via NBD_OPT_EXPORT_NAME when TLS has not been
                // initiated, then as this request cannot error, it MUST
                // terminate the session."
                codec::NBD_OPT_EXPORT_NAME => return Err(HandshakeError::TlsRequired),
                _ => {
                    error_reply(out, option, codec::NBD_REP_ERR_TLS_REQD, "TLS is required");
                    return Ok(None);
                }
            }
        }
        match option {
            codec::NBD_OPT_EXPORT_NAME => {
                if self.extended {
                    return Err(HandshakeError::ExportNameWithExtendedHeaders);
                }
                let name = codec::decode_export_name(data)?;
                let Some(e) = lookup(exports, &name) else {
                    return Err(HandshakeError::UnknownExport(name));
                };
                codec::encode_export_name_reply(out, e.size_bytes, self.flags(&e), self.no_zeroes);
                Ok(Some(self.agreed(e)))
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
                ack(out, option);
                Ok(None)
            }
            codec::NBD_OPT_STARTTLS => {
                if self.config.tls == TlsMode::Off {
                    error_reply(
                        out,
                        option,
                        codec::NBD_REP_ERR_POLICY,
                        "TLS is not configured on this gateway",
                    );
                } else if self.tls_active {
                    error_reply(out, option, codec::NBD_REP_ERR_INVALID, "TLS already on");
                } else if !data.is_empty() {
                    error_reply(
                        out,
                        option,
                        codec::NBD_REP_ERR_INVALID,
                        "STARTTLS takes no data",
                    );
                } else {
                    ack(out, option);
                    // "the server MUST NOT preserve any negotiation state
                    // ... issued before this command."
                    self.tls_active = true;
                    self.structured = false;
                    self.extended = false;
                    self.meta_export = None;
                    return Ok(Some(Progress::StartTls));
                }
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
                // The same replies for INFO and GO, whatever was requested
                // (the server "MAY send information requests back which are
                // not explicitly requested"; clients ignore what they do not
                // understand).
                codec::encode_info_export(out, option, e.size_bytes, self.flags(&e));
                codec::encode_info_string(out, option, codec::NBD_INFO_NAME, &e.name);
                if let Some(d) = &e.description {
                    codec::encode_info_string(out, option, codec::NBD_INFO_DESCRIPTION, d);
                }
                codec::encode_info_block_size(
                    out,
                    option,
                    e.block_size,
                    codec::PREFERRED_BLOCK_BYTES.max(e.block_size),
                    self.config.request_max_bytes,
                );
                ack(out, option);
                Ok((option == codec::NBD_OPT_GO).then(|| self.agreed(e)))
            }
            codec::NBD_OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    error_reply(out, option, codec::NBD_REP_ERR_INVALID, "takes no data");
                } else if self.extended {
                    // "The client has already successfully negotiated
                    // extended headers, which takes precedence."
                    error_reply(
                        out,
                        option,
                        codec::NBD_REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    );
                } else if self.structured {
                    error_reply(
                        out,
                        option,
                        codec::NBD_REP_ERR_INVALID,
                        "already negotiated",
                    );
                } else {
                    self.structured = true;
                    ack(out, option);
                }
                Ok(None)
            }
            codec::NBD_OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    error_reply(out, option, codec::NBD_REP_ERR_INVALID, "takes no data");
                } else if self.extended {
                    error_reply(
                        out,
                        option,
                        codec::NBD_REP_ERR_INVALID,
                        "already negotiated",
                    );
                } else {
                    self.extended = true;
                    ack(out, option);
                }
                Ok(None)
            }
            codec::NBD_OPT_LIST_META_CONTEXT | codec::NBD_OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, exports, out);
                Ok(None)
            }
            _ => {
                error_reply(out, option, codec::NBD_REP_ERR_UNSUP, "unsupported option");
                Ok(None)
            }
        }
    }

    /// LIST_META_CONTEXT / SET_META_CONTEXT (proto.md "Metadata querying",
    /// "The `base:` metadata namespace").
    fn meta_context(&mut self, option: u32, data: &[u8], exports: &dyn Exports, out: &mut Vec<u8>) {
        let set = option == codec::NBD_OPT_SET_META_CONTEXT;
        if set {
            // "Issuing this command replaces all previously-set metadata
            // contexts (including when this command fails)".
            self.meta_export = None;
        }
        if self.mode() == ReplyMode::Simple {
            error_reply(
                out,
                option,
                codec::NBD_REP_ERR_INVALID,
                "negotiate structured replies or extended headers first",
            );
            return;
        }
        let req = match codec::decode_meta_request(data) {
            Ok(r) => r,
            Err(MetaError::Invalid(why)) => {
                error_reply(out, option, codec::NBD_REP_ERR_INVALID, why);
                return;
            }
            Err(MetaError::TooBig) => {
                error_reply(out, option, codec::NBD_REP_ERR_TOO_BIG, "too many queries");
                return;
            }
        };
        if lookup(exports, &req.name).is_none() {
            error_reply(out, option, codec::NBD_REP_ERR_UNKNOWN, "unknown export");
            return;
        }
        // `base:allocation` is matched by its own name, and when listing
        // also by "base:" and by an empty query list. "base:" selects
        // nothing; unknown leaves and namespaces are ignored.
        let selected = if req.queries.is_empty() {
            !set
        } else {
            req.queries
                .iter()
                .any(|q| q == codec::BASE_ALLOCATION || (!set && q == "base:"))
        };
        if selected {
            let id = if set { codec::BASE_ALLOCATION_ID } else { 0 };
            codec::encode_rep_meta_context(out, option, id, codec::BASE_ALLOCATION);
            if set {
                self.meta_export = Some(req.name);
            }
        }
        ack(out, option);
    }
}

/// "" is never a default export here.
fn lookup(exports: &dyn Exports, name: &str) -> Option<ExportInfo> {
    if name.is_empty() {
        return None;
    }
    exports.lookup(name)
}

fn ack(out: &mut Vec<u8>, option: u32) {
    codec::encode_option_reply(out, option, codec::NBD_REP_ACK, &[]);
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
                description: Some(format!("volume {name}")),
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

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            v.extend_from_slice(&(q.len() as u32).to_be_bytes());
            v.extend_from_slice(q.as_bytes());
        }
        v
    }

    /// Run a whole input through a fresh handshake.
    fn run_with(
        input: &[u8],
        config: Config,
    ) -> (Result<(usize, Progress), HandshakeError>, Vec<u8>) {
        let mut out = Vec::new();
        let mut h = Handshake::new(&mut out, config);
        out.clear();
        let r = h.advance(input, &Two, &mut out);
        (r, out)
    }

    fn run(input: &[u8]) -> (Result<(usize, Progress), HandshakeError>, Vec<u8>) {
        run_with(input, Config::default())
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

    fn types(out: &[u8]) -> Vec<u32> {
        replies(out).iter().map(|r| r.1).collect()
    }

    fn agreed(p: Progress) -> Agreed {
        match p {
            Progress::Done(a) => *a,
            other => panic!("expected Done, got {other:?}"),
        }
    }

    const FIXED: [u8; 4] = [0, 0, 0, 3];

    // Proves the state machine asks for more bytes at every boundary and
    // produces the greeting first.
    #[test]
    fn partial_input_needs_bytes() {
        let mut out = Vec::new();
        let mut h = Handshake::new(&mut out, Config::default());
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

    // Proves INFO and GO send byte-identical information (EXPORT, NAME,
    // DESCRIPTION, BLOCK_SIZE whatever was requested), GO ends the
    // handshake with simple replies and no block status.
    #[test]
    fn info_then_go() {
        let mut input = FIXED.to_vec();
        input.extend(opt(NBD_OPT_INFO, &info_data("a", &[NBD_INFO_NAME])));
        input.extend(opt(NBD_OPT_GO, &info_data("a", &[])));
        let (r, out) = run(&input);
        let (used, p) = r.unwrap();
        assert_eq!(used, input.len());
        let a = agreed(p);
        assert_eq!(a.export.name, "a");
        assert_eq!(a.terms, Terms::SIMPLE);
        let rs = replies(&out);
        assert_eq!(rs.len(), 10);
        let info: Vec<_> = rs[..5].iter().map(|r| (r.1, r.2.clone())).collect();
        let go: Vec<_> = rs[5..].iter().map(|r| (r.1, r.2.clone())).collect();
        assert_eq!(info, go, "INFO and GO must agree");
        assert!(rs[..5].iter().all(|r| r.0 == NBD_OPT_INFO));
        assert!(rs[5..].iter().all(|r| r.0 == NBD_OPT_GO));
        let kinds: Vec<_> = info
            .iter()
            .map(|i| i.1.get(..2).unwrap_or(&[]).to_vec())
            .collect();
        assert_eq!(
            kinds,
            [vec![0, 0], vec![0, 1], vec![0, 2], vec![0, 3], vec![]]
        );
        assert_eq!(
            info[0].1[10..12],
            (NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH).to_be_bytes()
        );
        assert_eq!(info[1].1[2..], *b"a");
        assert_eq!(info[2].1[2..], *b"volume a");
        assert_eq!(
            info[3].1[2..],
            [
                &512u32.to_be_bytes()[..],
                &4096u32.to_be_bytes(),
                &REQUEST_MAX_BYTES.to_be_bytes()
            ]
            .concat()
        );
        assert_eq!(info[4].0, NBD_REP_ACK);
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
        assert_eq!(
            types(&out),
            [
                NBD_REP_ERR_UNKNOWN,
                NBD_REP_ERR_UNKNOWN,
                NBD_REP_ERR_INVALID
            ]
        );
    }

    // Proves unknown options get NBD_REP_ERR_UNSUP and haggling continues,
    // STARTTLS without TLS configured gets NBD_REP_ERR_POLICY, and ABORT is
    // acknowledged.
    #[test]
    fn unsupported_then_abort() {
        let mut input = FIXED.to_vec();
        input.extend(opt(0x7777, b"junk"));
        input.extend(opt(NBD_OPT_STARTTLS, &[]));
        input.extend(opt(NBD_OPT_ABORT, &[]));
        let (r, out) = run(&input);
        assert_eq!(r, Ok((input.len(), Progress::Abort)));
        assert_eq!(
            types(&out),
            [NBD_REP_ERR_UNSUP, NBD_REP_ERR_POLICY, NBD_REP_ACK]
        );
    }

    // Proves STRUCTURED_REPLY and EXTENDED_HEADERS negotiation: each once,
    // data rejected, extended takes precedence, the agreed terms and the DF
    // flag follow, and EXPORT_NAME after extended headers hard-disconnects.
    #[test]
    fn structured_and_extended() {
        let mut input = FIXED.to_vec();
        input.extend(opt(NBD_OPT_STRUCTURED_REPLY, b"x"));
        input.extend(opt(NBD_OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(NBD_OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(NBD_OPT_GO, &info_data("a", &[])));
        let (r, out) = run(&input);
        let a = agreed(r.unwrap().1);
        assert_eq!(a.terms.mode, ReplyMode::Structured);
        assert_ne!(a.export.flags & NBD_FLAG_SEND_DF, 0);
        assert_eq!(
            &types(&out)[..3],
            [NBD_REP_ERR_INVALID, NBD_REP_ACK, NBD_REP_ERR_INVALID]
        );
        let mut input = FIXED.to_vec();
        input.extend(opt(NBD_OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(NBD_OPT_EXTENDED_HEADERS, &[]));
        input.extend(opt(NBD_OPT_EXTENDED_HEADERS, &[]));
        input.extend(opt(NBD_OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(NBD_OPT_GO, &info_data("b", &[])));
        let (r, out) = run(&input);
        assert_eq!(agreed(r.unwrap().1).terms.mode, ReplyMode::Extended);
        assert_eq!(
            &types(&out)[..4],
            [
                NBD_REP_ACK,
                NBD_REP_ACK,
                NBD_REP_ERR_INVALID,
                NBD_REP_ERR_EXT_HEADER_REQD
            ]
        );
        let mut input = FIXED.to_vec();
        input.extend(opt(NBD_OPT_EXTENDED_HEADERS, &[]));
        input.extend(opt(NBD_OPT_EXPORT_NAME, b"a"));
        assert_eq!(
            run(&input).0,
            Err(HandshakeError::ExportNameWithExtendedHeaders)
        );
    }

    // Proves LIST/SET_META_CONTEXT: refused before structured replies,
    // base:allocation listed for "base:" and for no query, selected only by
    // its name, unknown namespaces ignored, unknown export refused, and that
    // block status is agreed only for the export it was selected for.
    #[test]
    fn meta_contexts() {
        let mut input = FIXED.to_vec();
        input.extend(opt(
            NBD_OPT_SET_META_CONTEXT,
            &meta_data("a", &[BASE_ALLOCATION]),
        ));
        input.extend(opt(NBD_OPT_STRUCTURED_REPLY, &[]));
        input.extend(opt(NBD_OPT_LIST_META_CONTEXT, &meta_data("a", &[])));
        input.extend(opt(NBD_OPT_LIST_META_CONTEXT, &meta_data("a", &["base:"])));
        input.extend(opt(
            NBD_OPT_LIST_META_CONTEXT,
            &meta_data("a", &["x-foo:bar"]),
        ));
        input.extend(opt(
            NBD_OPT_SET_META_CONTEXT,
            &meta_data("zz", &[BASE_ALLOCATION]),
        ));
        input.extend(opt(NBD_OPT_SET_META_CONTEXT, &meta_data("a", &["base:"])));
        input.extend(opt(
            NBD_OPT_SET_META_CONTEXT,
            &meta_data("a", &["qemu:dirty-bitmap:x", BASE_ALLOCATION]),
        ));
        input.extend(opt(NBD_OPT_GO, &info_data("a", &[])));
        let (r, out) = run(&input);
        assert!(agreed(r.unwrap().1).terms.block_status);
        let rs = replies(&out);
        let t: Vec<u32> = rs.iter().map(|r| r.1).collect();
        assert_eq!(
            &t[..12],
            [
                NBD_REP_ERR_INVALID,
                NBD_REP_ACK,
                NBD_REP_META_CONTEXT,
                NBD_REP_ACK,
                NBD_REP_META_CONTEXT,
                NBD_REP_ACK,
                NBD_REP_ACK,
                NBD_REP_ERR_UNKNOWN,
                NBD_REP_ACK,
                NBD_REP_META_CONTEXT,
                NBD_REP_ACK,
                NBD_REP_INFO,
            ]
        );
        assert_eq!(
            rs[2].2,
            [&[0u8, 0, 0, 0][..], BASE_ALLOCATION.as_bytes()].concat()
        );
        assert_eq!(
            rs[9].2,
            [
                &BASE_ALLOCATION_ID.to_be_bytes()[..],
                BASE_ALLOCATION.as_bytes()
            ]
            .concat()
        );
        // Selected for "a", transmission on "b": no block status. A failed
        // SET clears an earlier selection.
        for tail in [
            opt(NBD_OPT_GO, &info_data("b", &[])),
            [
                opt(
                    NBD_OPT_SET_META_CONTEXT,
                    &meta_data("zz", &[BASE_ALLOCATION]),
                ),
                opt(NBD_OPT_GO, &info_data("a", &[])),
            ]
            .concat(),
        ] {
            let mut input = FIXED.to_vec();
            input.extend(opt(NBD_OPT_STRUCTURED_REPLY, &[]));
            input.extend(opt(
                NBD_OPT_SET_META_CONTEXT,
                &meta_data("a", &[BASE_ALLOCATION]),
            ));
            input.extend(tail);
            let (r, _) = run(&input);
            assert!(!agreed(r.unwrap().1).terms.block_status);
        }
    }

    // Proves FORCEDTLS: options before STARTTLS get NBD_REP_ERR_TLS_REQD,
    // EXPORT_NAME hard-disconnects, STARTTLS is acknowledged once (data or a
    // repeat is invalid) and resets negotiated state.
    #[test]
    fn tls_required() {
        let config = Config {
            tls: TlsMode::Required,
            ..Config::default()
        };
        let mut input = FIXED.to_vec();
        input.extend(opt(NBD_OPT_LIST, &[]));
        input.extend(opt(NBD_OPT_GO, &info_data("a", &[])));
        input.extend(opt(NBD_OPT_STARTTLS, b"x"));
        input.extend(opt(NBD_OPT_STARTTLS, &[]));
        let mut out = Vec::new();
        let mut h = Handshake::new(&mut out, config);
        out.clear();
        let (used, p) = h.advance(&input, &Two, &mut out).unwrap();
        assert_eq!((used, p), (input.len(), Progress::StartTls));
        assert_eq!(
            types(&out),
            [
                NBD_REP_ERR_TLS_REQD,
                NBD_REP_ERR_TLS_REQD,
                NBD_REP_ERR_INVALID,
                NBD_REP_ACK
            ]
        );
        // After the upgrade: a second STARTTLS is invalid, GO works.
        out.clear();
        let mut input = opt(NBD_OPT_STARTTLS, &[]);
        input.extend(opt(NBD_OPT_GO, &info_data("a", &[])));
        let (_, p) = h.advance(&input, &Two, &mut out).unwrap();
        assert!(agreed(p).tls);
        assert_eq!(types(&out)[0], NBD_REP_ERR_INVALID);
        let mut input = FIXED.to_vec();
        input.extend(opt(NBD_OPT_EXPORT_NAME, b"a"));
        assert_eq!(run_with(&input, config).0, Err(HandshakeError::TlsRequired));
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
