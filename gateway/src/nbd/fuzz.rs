//! Entry points shared by the cargo-fuzz targets (`gateway/fuzz/`) and by
//! the corpus replay test (`gateway/tests/fuzz_corpus.rs`), so CI covers the
//! corpus without cargo-fuzz. Each takes arbitrary bytes, drives one pure
//! state machine or codec, and asserts the invariants that must hold for
//! any input: no panic, replies that frame correctly, validated commands
//! that stay inside the export and the advertised limits.

use super::codec::{self, Command, Geometry, Payload, ReplyMode, Segment, Terms};
use super::handshake::{Config, ExportInfo, Exports, Handshake, HandshakeError, Progress, TlsMode};

/// Two fixed exports, one with 4 KiB blocks.
struct FuzzExports;

impl Exports for FuzzExports {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let block_size = match name {
            "a" => 512,
            "b" => 4096,
            _ => return None,
        };
        Some(ExportInfo {
            name: name.into(),
            size_bytes: 1 << 30,
            block_size,
            flags: codec::NBD_FLAG_HAS_FLAGS | codec::NBD_FLAG_SEND_FLUSH,
            description: Some("fuzz".into()),
        })
    }

    fn names(&self) -> Vec<String> {
        vec!["a".into(), "b".into()]
    }
}

/// Check that `out` is a sequence of well-formed option replies (after an
/// optional EXPORT_NAME reply, which has no framing and ends the stream).
fn check_option_replies(mut out: &[u8], ends_with_export_name: bool) {
    while out.len() >= 20 && out[0..8] == codec::OPTION_REPLY_MAGIC.to_be_bytes() {
        let len = u32::from_be_bytes(out[16..20].try_into().expect("4 bytes")) as usize;
        assert!(out.len() >= 20 + len, "truncated option reply");
        out = &out[20 + len..];
    }
    if ends_with_export_name {
        assert!(out.len() == 10 || out.len() == 10 + codec::EXPORT_NAME_ZEROES);
    } else {
        assert!(out.is_empty(), "unframed bytes in the option replies");
    }
}

/// Drive a handshake with arbitrary client bytes. The first byte picks the
/// TLS mode and how the input is cut into reads; the rest is the client's
/// stream.
pub fn handshake(data: &[u8]) {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let tls = match sel % 3 {
        0 => TlsMode::Off,
        1 => TlsMode::Optional,
        _ => TlsMode::Required,
    };
    let step = usize::from(sel / 3 % 16) + 1;
    let config = Config {
        tls,
        ..Config::default()
    };
    let mut out = Vec::new();
    let mut hs = Handshake::new(&mut out, config);
    assert_eq!(out.len(), codec::GREETING_BYTES);
    out.clear();
    let mut buf: Vec<u8> = Vec::new();
    for piece in input.chunks(step) {
        buf.extend_from_slice(piece);
        let before = out.len();
        match hs.advance(&buf, &FuzzExports, &mut out) {
            Ok((used, progress)) => {
                assert!(used <= buf.len());
                buf.drain(..used);
                match progress {
                    Progress::NeedBytes(n) => assert!(n > 0),
                    Progress::StartTls => {
                        assert_ne!(tls, TlsMode::Off);
                        check_option_replies(&out[before..], false);
                    }
                    Progress::Abort => return,
                    Progress::Done(agreed) => {
                        let t = agreed.terms;
                        assert!(agreed.export.size_bytes > 0);
                        assert_eq!(t.request_max_bytes, codec::REQUEST_MAX_BYTES);
                        assert!(!t.block_status || t.mode != ReplyMode::Simple);
                        let df = agreed.export.flags & codec::NBD_FLAG_SEND_DF != 0;
                        assert_eq!(df, t.mode != ReplyMode::Simple);
                        if tls == TlsMode::Required {
                            assert!(agreed.tls);
                        }
                        // Once done, the machine refuses more input.
                        assert_eq!(
                            hs.advance(&[0], &FuzzExports, &mut Vec::new()),
                            Err(HandshakeError::Finished)
                        );
                        return;
                    }
                }
            }
            Err(_) => return,
        }
    }
    check_option_replies(&out, false);
}

/// Parse arbitrary bytes as a stream of requests under terms picked by the
/// first byte, validate each, and encode the replies the session would
/// send. Asserts that accepted commands lie inside the export, respect the
/// limits and alignment, and that every reply frames to its own length.
pub fn requests(data: &[u8]) {
    let Some((&sel, mut rest)) = data.split_first() else {
        return;
    };
    let mode = match sel % 3 {
        0 => ReplyMode::Simple,
        1 => ReplyMode::Structured,
        _ => ReplyMode::Extended,
    };
    let terms = Terms {
        mode,
        block_status: mode != ReplyMode::Simple && sel & 4 != 0,
        request_max_bytes: if sel & 8 != 0 {
            65536
        } else {
            codec::REQUEST_MAX_BYTES
        },
    };
    let geometry = Geometry {
        size_bytes: if sel & 16 != 0 { 1 << 20 } else { 1 << 40 },
        block_size: if sel & 32 != 0 { 4096 } else { 512 },
    };
    let n = terms.request_header_bytes();
    while rest.len() >= n {
        let (hb, tail) = rest.split_at(n);
        rest = tail;
        let Ok(h) = terms.decode_request(hb) else {
            // Bad magic: the session closes the connection.
            continue;
        };
        match codec::check_request(&h, &geometry, &terms) {
            Ok(cmd) => check_command(&cmd, &h, &geometry, &terms, rest),
            Err(rej) => {
                assert_ne!(rej.errno, codec::NBD_OK);
                let payload = codec::payload_bytes(&h, &terms);
                match rej.payload {
                    Payload::None => assert_eq!(payload, 0),
                    Payload::Discard(k) => assert_eq!(u64::from(k), payload),
                    Payload::Close => assert!(payload > u64::from(codec::WRITE_DISCARD_MAX_BYTES)),
                }
                let f = codec::reply_error(mode, h.cookie, h.offset, rej.errno, "fuzz");
                assert_eq!(f.wire_len(), f.bytes.len());
            }
        }
    }
}

fn check_command(cmd: &Command, h: &codec::RequestHeader, g: &Geometry, t: &Terms, rest: &[u8]) {
    let inside = |offset: u64, length: u64| {
        assert!(
            offset
                .checked_add(length)
                .is_some_and(|e| e <= g.size_bytes)
        );
        assert_eq!(offset % u64::from(g.block_size), 0);
        assert_eq!(length % u64::from(g.block_size), 0);
        assert!(length > 0);
    };
    match *cmd {
        Command::Read { offset, length, df } => {
            inside(offset, u64::from(length));
            assert!(length <= t.request_max_bytes);
            assert!(!df || t.mode != ReplyMode::Simple);
            // Reply with data taken from the input (zeros past its end).
            let len = (length as usize).min(1 << 16);
            let mut data = vec![0u8; len];
            let k = len.min(rest.len());
            data[..k].copy_from_slice(&rest[..k]);
            let f = codec::reply_read(t.mode, h.cookie, offset, &data, df);
            let data_bytes: usize = f
                .segments
                .iter()
                .map(|s| match s {
                    Segment::Data(r) => {
                        assert!(r.end <= data.len());
                        r.len()
                    }
                    Segment::Head(r) => {
                        assert!(r.end <= f.bytes.len());
                        0
                    }
                })
                .sum();
            assert!(data_bytes <= data.len());
        }
        Command::Write { offset, length, .. } => {
            inside(offset, u64::from(length));
            assert!(length <= t.request_max_bytes);
        }
        Command::Trim { offset, length, .. }
        | Command::WriteZeroes { offset, length, .. }
        | Command::Cache { offset, length } => inside(offset, length),
        Command::BlockStatus {
            offset,
            length,
            req_one,
        } => {
            inside(offset, length);
            assert!(t.block_status);
            // Extents from the input bits, 4 KiB each, covering the scan.
            let scan = length.min(codec::BLOCK_STATUS_SCAN_MAX_BYTES);
            let mut extents = Vec::new();
            let mut left = scan;
            let mut i = 0;
            while left > 0 {
                let l = left.min(4096 * (1 + u64::from(rest.get(i).copied().unwrap_or(0) % 8)));
                extents.push((l, rest.get(i).is_some_and(|b| b & 1 == 1)));
                left -= l;
                i += 1;
            }
            let d = codec::allocation_descriptors(extents, req_one, length);
            if req_one {
                assert_eq!(d.len(), 1);
                assert!(d[0].0 <= length);
            } else {
                assert_eq!(d.iter().map(|x| x.0).sum::<u64>(), scan);
            }
            let f =
                codec::reply_block_status(t.mode, h.cookie, offset, codec::BASE_ALLOCATION_ID, &d);
            assert_eq!(f.wire_len(), f.bytes.len());
        }
        Command::Flush => assert_eq!((h.offset, h.length), (0, 0)),
        Command::Disconnect | Command::Noop => {}
    }
    if !matches!(cmd, Command::Read { .. } | Command::BlockStatus { .. }) {
        let f = codec::reply_ok(t.mode, h.kind, h.cookie, h.offset);
        assert_eq!(f.wire_len(), f.bytes.len());
    }
}
