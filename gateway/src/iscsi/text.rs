//! iSCSI text key=value pairs (RFC 7143 §6.1): the data segment of Login
//! and Text PDUs is a sequence of `key=value` strings each ended by NUL.
//!
//! Pure parsing and encoding with the spec's limits: keys at most 63 bytes
//! of `[A-Za-z0-9.\-+@_]` (§6.1), values at most 255 bytes except the few
//! keys the RFC allows longer (we accept up to 8192, the default
//! MaxRecvDataSegmentLength), no key twice in one negotiation (§6.2).

use thiserror::Error;

/// §6.1: "key-name ... up to 63 bytes".
pub const KEY_BYTES_MAX: usize = 63;
/// §6.1: values are at most 255 bytes unless a key says otherwise; CHAP
/// challenges and responses in hex may exceed that, so allow up to 8 KiB.
pub const VALUE_BYTES_MAX: usize = 8192;
/// Pairs in one negotiation; far above the ~25 keys RFC 7143 defines.
pub const PAIRS_MAX: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Error {
    #[error("text is not NUL-terminated")]
    Unterminated,
    #[error("text pair without '='")]
    NoEquals,
    #[error("bad key")]
    BadKey,
    #[error("value too long")]
    ValueTooLong,
    #[error("text is not UTF-8")]
    NotUtf8,
    #[error("key {0} given twice")]
    Duplicate(String),
    #[error("too many keys")]
    TooMany,
}

/// Ordered key=value pairs.
pub type Pairs = Vec<(String, String)>;

fn key_ok(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= KEY_BYTES_MAX
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.+@_".contains(&b))
}

/// Parse a complete text (all continuation PDUs joined). Empty input is no
/// pairs. Trailing NUL padding (more than one NUL) is tolerated, as some
/// initiators pad.
pub fn parse(data: &[u8]) -> Result<Pairs, Error> {
    let mut out: Pairs = Vec::new();
    if data.is_empty() {
        return Ok(out);
    }
    if *data.last().expect("not empty") != 0 {
        return Err(Error::Unterminated);
    }
    for raw in data.split(|b| *b == 0) {
        if raw.is_empty() {
            continue;
        }
        let s = std::str::from_utf8(raw).map_err(|_| Error::NotUtf8)?;
        let (k, v) = s.split_once('=').ok_or(Error::NoEquals)?;
        if !key_ok(k) {
            return Err(Error::BadKey);
        }
        if v.len() > VALUE_BYTES_MAX {
            return Err(Error::ValueTooLong);
        }
        if out.iter().any(|(x, _)| x == k) {
            return Err(Error::Duplicate(k.to_string()));
        }
        if out.len() == PAIRS_MAX {
            return Err(Error::TooMany);
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

pub fn encode(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

pub fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// §6.1 numeric values: decimal, or hex with 0x (we accept both).
pub fn parse_number(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        v.parse().ok()
    } else {
        None
    }
}

/// §6.1 binary values for CHAP: `0x` hex or `0b` base64.
pub fn parse_binary(v: &str) -> Option<Vec<u8>> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.is_empty() || h.len() % 2 != 0 && h.len() > 1 {
            // Odd length: a leading nibble is implied (§6.1 "hex-constant").
            let padded = format!("0{h}");
            return decode_hex(&padded);
        }
        decode_hex(h)
    } else if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        decode_base64(b)
    } else {
        None
    }
}

fn decode_hex(h: &str) -> Option<Vec<u8>> {
    if h.is_empty() || !h.len().is_multiple_of(2) {
        return None;
    }
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
        .collect()
}

pub fn encode_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + b.len() * 2);
    s.push_str("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    };
    let s = s.trim_end_matches('=');
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    if out.is_empty() { None } else { Some(out) }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Proves parsing of a golden login text and its re-encoding.
    #[test]
    fn golden() {
        let t = b"InitiatorName=iqn.x:y\0SessionType=Normal\0";
        let p = parse(t).unwrap();
        assert_eq!(get(&p, "InitiatorName"), Some("iqn.x:y"));
        assert_eq!(get(&p, "SessionType"), Some("Normal"));
        assert_eq!(encode(&p), t.to_vec());
        assert_eq!(parse(b"").unwrap(), vec![]);
        assert_eq!(parse(b"A=1\0\0\0").unwrap().len(), 1);
    }

    // Proves every rejection branch.
    #[test]
    fn rejections() {
        assert_eq!(parse(b"A=1"), Err(Error::Unterminated));
        assert_eq!(parse(b"A\0"), Err(Error::NoEquals));
        assert_eq!(parse(b"=1\0"), Err(Error::BadKey));
        assert_eq!(parse(b"A B=1\0"), Err(Error::BadKey));
        let long = format!("{}=1\0", "K".repeat(64));
        assert_eq!(parse(long.as_bytes()), Err(Error::BadKey));
        let v = format!("A={}\0", "v".repeat(VALUE_BYTES_MAX + 1));
        assert_eq!(parse(v.as_bytes()), Err(Error::ValueTooLong));
        assert_eq!(parse(b"A=\xff\0"), Err(Error::NotUtf8));
        assert_eq!(parse(b"A=1\0A=2\0"), Err(Error::Duplicate("A".into())));
        let many: String = (0..=PAIRS_MAX).map(|i| format!("K{i}=1\0")).collect();
        assert_eq!(parse(many.as_bytes()), Err(Error::TooMany));
    }

    // Proves numbers and binary values in both encodings.
    #[test]
    fn values() {
        assert_eq!(parse_number("8192"), Some(8192));
        assert_eq!(parse_number("0x10"), Some(16));
        assert_eq!(parse_number("-1"), None);
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_binary("0x0a0B"), Some(vec![10, 11]));
        assert_eq!(parse_binary("0xabc"), Some(vec![0x0a, 0xbc]));
        assert_eq!(parse_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(parse_binary("0xzz"), None);
        assert_eq!(parse_binary("12"), None);
        assert_eq!(encode_hex(&[1, 0xff]), "0x01ff");
    }
}
