//! The payload of `Op::Repl` messages: one [`Msg`] body, little endian.
//! The header carries `to` (`disk_id`) and `epoch`; the payload section is
//! this encoding followed by the usual CRC32C.
//!
//! ```text
//! pg u32 | from u32 | kind u8 | pad 3
//! 1 Replicate: seq 16 | committed 16 | trim 16 | extent 20 | change u8 | fua u8 | pad 2 | cas u64 | data
//! 2 Ack:       seq 16 | result u8
//! 3 LogQuery:  full u8
//! 4 LogReply:  full u8 | pad 3 | committed 16 | n u32 | n x (seq 16 | extent 20) | m u32 | m x region 16
//! 5 Flush:     round u64 | trim 16 | committed 16
//! 6 Flushed:   round u64
//! 7 RepairReq: id u64 | extent 20
//! 8 Repaired:  id u64 | ok u8
//! 9 Fetch:     id u64 | extent 20
//! 10 Fetched:  id u64 | ok u8 | has data u8 | pad 2 | extent 20 | data (extent length, when has data)
//! 11 DigestReq: id u64 | extent 20
//! 12 DigestReply: id u64 | bad 0 / sum 1 u8 | pad 7 | sum u64
//! 13 HoldsQuery: id u64
//! 14 Holds:    id u64 | trim 16 | n u32 | n x (term u64 | first u64 | last u64)
//! 15 ReclaimQuery: (nothing)
//! 16 ReclaimReply: n u32 | n x (seq 16 | extent 20)
//! seq = term u64 | n u64; extent = volume u64 | chunk u32 | offset u32 | length u32;
//! region = volume u64 | chunk u32 | index u32
//! ```
//!
//! Decoding is total: any byte string yields a message or an error, never a
//! panic; lengths are checked against the remaining bytes and the named
//! limits before anything is allocated.

use super::*;
use crate::io::Payload;

/// Most log entries or regions one reply may carry (bounded by the payload
/// limit of the internal protocol).
pub const LIST_MAX: usize = 200_000;
const _: () = assert!(HOLDS_RUNS_MAX <= LIST_MAX);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("replication message truncated")]
    Short,
    #[error("unknown replication message kind {0}")]
    Kind(u8),
    #[error("bad field in replication message: {0}")]
    Field(&'static str),
    #[error("trailing bytes after replication message")]
    Trailing,
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Short);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn seq(&mut self) -> Result<Seq, DecodeError> {
        Ok(Seq {
            term: self.u64()?,
            n: self.u64()?,
        })
    }
    fn extent(&mut self) -> Result<Extent, DecodeError> {
        let e = Extent {
            volume_id: self.u64()?,
            chunk_index: self.u32()?,
            offset: self.u32()?,
            length: self.u32()?,
        };
        if e.offset.checked_add(e.length).is_none() {
            return Err(DecodeError::Field("extent overflows"));
        }
        Ok(e)
    }
    fn nonempty_extent(&mut self) -> Result<Extent, DecodeError> {
        let e = self.extent()?;
        if e.length == 0 {
            return Err(DecodeError::Field("empty extent"));
        }
        Ok(e)
    }
    fn flag(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Field(what)),
        }
    }
    fn count(&mut self, each: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n > LIST_MAX || n * each > self.0.len() {
            return Err(DecodeError::Field("list length"));
        }
        Ok(n)
    }
}

fn put_seq(out: &mut Vec<u8>, s: Seq) {
    out.extend_from_slice(&s.term.to_le_bytes());
    out.extend_from_slice(&s.n.to_le_bytes());
}

fn put_extent(out: &mut Vec<u8>, e: &Extent) {
    out.extend_from_slice(&e.volume_id.to_le_bytes());
    out.extend_from_slice(&e.chunk_index.to_le_bytes());
    out.extend_from_slice(&e.offset.to_le_bytes());
    out.extend_from_slice(&e.length.to_le_bytes());
}

/// Encode a message body (without header and CRC).
pub fn encode(m: &Msg<Payload>) -> Vec<u8> {
    let (mut out, data) = encode_parts(m);
    if let Some(d) = data {
        out.extend_from_slice(&d);
    }
    out
}

/// Bytes before a message's data: the fixed fields of the two kinds that
/// end with data (Replicate with a write, Fetched with data), whose data
/// starts right after them.
const REPLICATE_HEAD_BYTES: usize = 12 + 16 * 3 + 20 + 4 + 8;
/// Where a Replicate's extent length and change kind lie in its head.
const REPLICATE_LENGTH_AT: usize = 12 + 16 * 3 + 16;
const REPLICATE_CHANGE_AT: usize = REPLICATE_LENGTH_AT + 4;
const FETCHED_HEAD_BYTES: usize = 12 + 8 + 4 + 20;
/// Bytes that name a message's kind.
pub const KIND_BYTES: usize = 12;

/// Encode a message body as the bytes before its data and the data (a
/// shared buffer, so sending a write to the replicas copies nothing: the
/// socket writer gathers the pieces).
pub fn encode_parts(m: &Msg<Payload>) -> (Vec<u8>, Option<Payload>) {
    let mut data = None;
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(&m.pg.to_le_bytes());
    out.extend_from_slice(&m.from.to_le_bytes());
    match &m.body {
        Body::Replicate {
            update,
            committed,
            trim,
            cas,
        } => {
            out.extend_from_slice(&[1, 0, 0, 0]);
            put_seq(&mut out, update.seq);
            put_seq(&mut out, *committed);
            put_seq(&mut out, *trim);
            put_extent(&mut out, &update.extent);
            let change = match &update.change {
                Change::Write(_) => 1,
                Change::Zeroes => 2,
                Change::Trim => 3,
            };
            out.extend_from_slice(&[change, u8::from(update.fua), 0, 0]);
            out.extend_from_slice(&cas.unwrap_or(0).to_le_bytes());
            if let Change::Write(d) = &update.change {
                debug_assert_eq!(out.len(), REPLICATE_HEAD_BYTES);
                data = Some(d.clone());
            }
        }
        Body::Ack { seq, result } => {
            out.extend_from_slice(&[2, 0, 0, 0]);
            put_seq(&mut out, *seq);
            out.push(match result {
                AckResult::Ok => 0,
                AckResult::Stale => 1,
                AckResult::NotPrimary => 2,
                AckResult::Failed => 3,
                AckResult::BadBlock => 4,
            });
        }
        Body::LogQuery { full } => {
            out.extend_from_slice(&[3, 0, 0, 0, u8::from(*full)]);
        }
        Body::LogReply {
            entries,
            regions,
            full,
            committed,
        } => {
            out.extend_from_slice(&[4, 0, 0, 0, u8::from(*full), 0, 0, 0]);
            put_seq(&mut out, *committed);
            out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
            for (s, e) in entries {
                put_seq(&mut out, *s);
                put_extent(&mut out, e);
            }
            out.extend_from_slice(&(regions.len() as u32).to_le_bytes());
            for r in regions {
                out.extend_from_slice(&r.volume_id.to_le_bytes());
                out.extend_from_slice(&r.chunk_index.to_le_bytes());
                out.extend_from_slice(&r.index.to_le_bytes());
            }
        }
        Body::Flush {
            round,
            trim,
            committed,
        } => {
            out.extend_from_slice(&[5, 0, 0, 0]);
            out.extend_from_slice(&round.to_le_bytes());
            put_seq(&mut out, *trim);
            put_seq(&mut out, *committed);
        }
        Body::Flushed { round } => {
            out.extend_from_slice(&[6, 0, 0, 0]);
            out.extend_from_slice(&round.to_le_bytes());
        }
        Body::RepairReq { id, extent } => {
            out.extend_from_slice(&[7, 0, 0, 0]);
            out.extend_from_slice(&id.to_le_bytes());
            put_extent(&mut out, extent);
        }
        Body::Repaired { id, ok } => {
            out.extend_from_slice(&[8, 0, 0, 0]);
            out.extend_from_slice(&id.to_le_bytes());
            out.push(u8::from(*ok));
        }
        Body::Fetch { id, extent } => {
            out.extend_from_slice(&[9, 0, 0, 0]);
            out.extend_from_slice(&id.to_le_bytes());
            put_extent(&mut out, extent);
        }
        Body::Fetched {
            id,
            ok,
            extent,
            data: data_of_fetch,
        } => {
            out.extend_from_slice(&[10, 0, 0, 0]);
            let data_of_fetch = data_of_fetch.as_ref();
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&[u8::from(*ok), u8::from(data_of_fetch.is_some()), 0, 0]);
            put_extent(&mut out, extent);
            if let Some(d) = data_of_fetch {
                assert_eq!(d.len(), extent.length as usize, "fetched data length");
                debug_assert_eq!(out.len(), FETCHED_HEAD_BYTES);
                data = Some(d.clone());
            }
        }
        Body::DigestReq { id, extent } => {
            out.extend_from_slice(&[11, 0, 0, 0]);
            out.extend_from_slice(&id.to_le_bytes());
            put_extent(&mut out, extent);
        }
        Body::DigestReply { id, digest } => {
            out.extend_from_slice(&[12, 0, 0, 0]);
            out.extend_from_slice(&id.to_le_bytes());
            let (kind, sum) = match digest {
                Digest::Bad => (0, 0),
                Digest::Sum(x) => (1, *x),
            };
            out.extend_from_slice(&[kind, 0, 0, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&sum.to_le_bytes());
        }
        Body::HoldsQuery { id } => {
            out.extend_from_slice(&[13, 0, 0, 0]);
            out.extend_from_slice(&id.to_le_bytes());
        }
        Body::Holds { id, trim, runs } => {
            assert!(runs.len() <= HOLDS_RUNS_MAX, "holds runs");
            out.extend_from_slice(&[14, 0, 0, 0]);
            out.extend_from_slice(&id.to_le_bytes());
            put_seq(&mut out, *trim);
            out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
            for r in runs {
                out.extend_from_slice(&r.term.to_le_bytes());
                out.extend_from_slice(&r.first.to_le_bytes());
                out.extend_from_slice(&r.last.to_le_bytes());
            }
        }
        Body::ReclaimQuery => out.extend_from_slice(&[15, 0, 0, 0]),
        Body::ReclaimReply { entries } => {
            assert!(entries.len() <= LIST_MAX, "reclaim entries");
            out.extend_from_slice(&[16, 0, 0, 0]);
            out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
            for (s, e) in entries {
                put_seq(&mut out, *s);
                put_extent(&mut out, e);
            }
        }
    }
    (out, data)
}

/// Given the first [`KIND_BYTES`] of a body, how many bytes precede its
/// data when its kind may end with data.
pub fn head_bytes(kind: &[u8]) -> Option<usize> {
    match kind.get(8) {
        Some(1) => Some(REPLICATE_HEAD_BYTES),
        Some(10) => Some(FETCHED_HEAD_BYTES),
        _ => None,
    }
}

/// Given the bytes before a body's data (as [`head_bytes`] counts them),
/// the length of the data that follows, if any. Only a hint for reading
/// the data into place: [`decode_with`] checks everything again.
pub fn data_len(head: &[u8]) -> Option<usize> {
    if head_bytes(head) != Some(head.len()) {
        return None;
    }
    let length =
        |at: usize| u32::from_le_bytes(head[at..at + 4].try_into().expect("4 bytes")) as usize;
    match head[8] {
        // Extent (20 bytes, length last) then change (1 = write).
        1 if head[REPLICATE_CHANGE_AT] == 1 => Some(length(REPLICATE_LENGTH_AT)),
        // ok, has data, pad, then the extent.
        10 if head[20] == 1 && head[21] == 1 => Some(length(FETCHED_HEAD_BYTES - 4)),
        _ => None,
    }
}

/// Decode a message body received for disk `to` under `epoch`.
pub fn decode(b: &[u8], to: u32, epoch: u64) -> Result<Msg<Payload>, DecodeError> {
    decode_with(b, None, to, epoch)
}

/// Decode a body whose trailing data, when `data` is given, was read
/// separately (into an aligned buffer): `b` is the body without it.
pub fn decode_with(
    b: &[u8],
    mut data: Option<Payload>,
    to: u32,
    epoch: u64,
) -> Result<Msg<Payload>, DecodeError> {
    let mut r = Reader(b);
    // The trailing data: the separate buffer (its length must be the
    // extent's) or the next bytes of the body.
    let mut take_data = |r: &mut Reader, n: usize| match data.take() {
        Some(d) if d.len() == n => Ok(d),
        Some(_) => Err(DecodeError::Field("data length")),
        None => Ok(Payload::copy_from(r.take(n)?)),
    };
    let pg = r.u32()?;
    let from = r.u32()?;
    let kind = r.u8()?;
    r.take(3)?;
    let body = match kind {
        1 => {
            let seq = r.seq()?;
            let committed = r.seq()?;
            let trim = r.seq()?;
            let extent = r.extent()?;
            if extent.length == 0 {
                return Err(DecodeError::Field("empty extent"));
            }
            let change = r.u8()?;
            let fua = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(DecodeError::Field("fua")),
            };
            r.take(2)?;
            let cas = match r.u64()? {
                0 => None,
                t => Some(t),
            };
            let change = match change {
                1 => Change::Write(take_data(&mut r, extent.length as usize)?),
                2 => Change::Zeroes,
                3 => Change::Trim,
                _ => return Err(DecodeError::Field("change")),
            };
            Body::Replicate {
                update: Update {
                    seq,
                    extent,
                    change,
                    fua,
                },
                committed,
                trim,
                cas,
            }
        }
        2 => {
            let seq = r.seq()?;
            let result = match r.u8()? {
                0 => AckResult::Ok,
                1 => AckResult::Stale,
                2 => AckResult::NotPrimary,
                3 => AckResult::Failed,
                4 => AckResult::BadBlock,
                _ => return Err(DecodeError::Field("ack result")),
            };
            Body::Ack { seq, result }
        }
        3 => Body::LogQuery {
            full: match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(DecodeError::Field("full")),
            },
        },
        4 => {
            let full = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(DecodeError::Field("full")),
            };
            r.take(3)?;
            let committed = r.seq()?;
            let n = r.count(36)?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                entries.push((r.seq()?, r.extent()?));
            }
            let m = r.count(16)?;
            let mut regions = Vec::with_capacity(m);
            for _ in 0..m {
                regions.push(Region {
                    volume_id: r.u64()?,
                    chunk_index: r.u32()?,
                    index: r.u32()?,
                });
            }
            Body::LogReply {
                entries,
                regions,
                full,
                committed,
            }
        }
        5 => Body::Flush {
            round: r.u64()?,
            trim: r.seq()?,
            committed: r.seq()?,
        },
        6 => Body::Flushed { round: r.u64()? },
        7 => Body::RepairReq {
            id: r.u64()?,
            extent: r.nonempty_extent()?,
        },
        8 => Body::Repaired {
            id: r.u64()?,
            ok: r.flag("ok")?,
        },
        9 => Body::Fetch {
            id: r.u64()?,
            extent: r.nonempty_extent()?,
        },
        10 => {
            let id = r.u64()?;
            let ok = r.flag("ok")?;
            let has = r.flag("has data")?;
            r.take(2)?;
            let extent = r.extent()?;
            if has && !ok {
                return Err(DecodeError::Field("data of a failed fetch"));
            }
            let data = if has {
                Some(take_data(&mut r, extent.length as usize)?)
            } else {
                None
            };
            Body::Fetched {
                id,
                ok,
                extent,
                data,
            }
        }
        11 => Body::DigestReq {
            id: r.u64()?,
            extent: r.nonempty_extent()?,
        },
        12 => {
            let id = r.u64()?;
            let kind = r.u8()?;
            r.take(7)?;
            let sum = r.u64()?;
            let digest = match (kind, sum) {
                (0, 0) => Digest::Bad,
                (1, x) => Digest::Sum(x),
                _ => return Err(DecodeError::Field("digest")),
            };
            Body::DigestReply { id, digest }
        }
        13 => Body::HoldsQuery { id: r.u64()? },
        14 => {
            let id = r.u64()?;
            let trim = r.seq()?;
            let n = r.count(24)?;
            if n > HOLDS_RUNS_MAX {
                return Err(DecodeError::Field("holds runs"));
            }
            let mut runs = Vec::with_capacity(n);
            for _ in 0..n {
                let run = SeqRun {
                    term: r.u64()?,
                    first: r.u64()?,
                    last: r.u64()?,
                };
                if run.first > run.last {
                    return Err(DecodeError::Field("holds run"));
                }
                runs.push(run);
            }
            Body::Holds { id, trim, runs }
        }
        15 => Body::ReclaimQuery,
        16 => {
            let n = r.count(36)?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                entries.push((r.seq()?, r.nonempty_extent()?));
            }
            Body::ReclaimReply { entries }
        }
        k => return Err(DecodeError::Kind(k)),
    };
    if !r.0.is_empty() || data.is_some() {
        return Err(DecodeError::Trailing);
    }
    Ok(Msg {
        pg,
        from,
        to,
        epoch,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Msg<Payload>> {
        let e = Extent {
            volume_id: 7,
            chunk_index: 3,
            offset: 4096,
            length: 8,
        };
        let s = Seq { term: 5, n: 9 };
        let bodies = vec![
            Body::Replicate {
                update: Update {
                    seq: s,
                    extent: e,
                    change: Change::Write(vec![1, 2, 3, 4, 5, 6, 7, 8].into()),
                    fua: true,
                },
                committed: Seq { term: 5, n: 3 },
                trim: Seq { term: 4, n: 1 },
                cas: Some(0xfeed),
            },
            Body::Replicate {
                update: Update {
                    seq: s,
                    extent: e,
                    change: Change::Zeroes,
                    fua: false,
                },
                committed: s,
                trim: s,
                cas: None,
            },
            Body::Ack {
                seq: s,
                result: AckResult::NotPrimary,
            },
            Body::Ack {
                seq: s,
                result: AckResult::BadBlock,
            },
            Body::LogQuery { full: true },
            Body::LogReply {
                entries: vec![(s, e)],
                regions: vec![Region {
                    volume_id: 1,
                    chunk_index: 2,
                    index: 3,
                }],
                full: false,
                committed: Seq { term: 5, n: 2 },
            },
            Body::Flush {
                round: 77,
                trim: s,
                committed: Seq { term: 5, n: 8 },
            },
            Body::HoldsQuery { id: 31 },
            Body::Holds {
                id: 31,
                trim: Seq { term: 4, n: 1 },
                runs: vec![
                    SeqRun {
                        term: 4,
                        first: 2,
                        last: 9,
                    },
                    SeqRun {
                        term: 5,
                        first: 1,
                        last: 1,
                    },
                ],
            },
            Body::Holds {
                id: 32,
                trim: s,
                runs: Vec::new(),
            },
            Body::Flushed { round: 78 },
            Body::ReclaimQuery,
            Body::ReclaimReply {
                entries: vec![(s, e), (Seq { term: 6, n: 1 }, e)],
            },
            Body::ReclaimReply {
                entries: Vec::new(),
            },
            Body::RepairReq { id: 5, extent: e },
            Body::Repaired { id: 5, ok: true },
            Body::Fetch { id: 6, extent: e },
            Body::Fetched {
                id: 6,
                ok: true,
                extent: e,
                data: Some(vec![9; 8].into()),
            },
            Body::Fetched {
                id: 6,
                ok: false,
                extent: e,
                data: None,
            },
            Body::DigestReq { id: 7, extent: e },
            Body::DigestReply {
                id: 7,
                digest: Digest::Sum(0xdead_beef_0123),
            },
            Body::DigestReply {
                id: 7,
                digest: Digest::Bad,
            },
        ];
        bodies
            .into_iter()
            .map(|body| Msg {
                pg: 12,
                from: 3,
                to: 4,
                epoch: 99,
                body,
            })
            .collect()
    }

    // Proves decode(encode(m)) == m for every kind, and that truncation,
    // trailing bytes and unknown kinds are refused.
    #[test]
    fn roundtrip_and_rejections() {
        for m in samples() {
            let b = encode(&m);
            assert_eq!(decode(&b, 4, 99), Ok(m.clone()));
            for cut in 0..b.len() {
                assert!(
                    decode(&b[..cut], 4, 99).is_err(),
                    "cut {cut} of {:?}",
                    m.body
                );
            }
            let mut long = b.clone();
            long.push(0);
            assert_eq!(decode(&long, 4, 99), Err(DecodeError::Trailing));
            // The same message with its data read apart from the rest, as
            // a daemon reads writes into an aligned buffer; the head alone
            // tells where the data starts and how long it is.
            let (head, data) = encode_parts(&m);
            let expect_len = data.as_ref().map(|d| d.len());
            match head_bytes(&head[..KIND_BYTES]) {
                Some(n) if expect_len.is_some() => {
                    assert_eq!(n, head.len());
                    assert_eq!(data_len(&head), expect_len);
                }
                _ => assert_eq!(expect_len, None, "{:?}", m.body),
            }
            if head_bytes(&head[..KIND_BYTES]) == Some(head.len()) && data.is_none() {
                assert_eq!(data_len(&head), None);
            }
            assert_eq!(decode_with(&head, data.clone(), 4, 99), Ok(m.clone()));
            if let Some(d) = data {
                // Data of another length, or data where the body has none.
                let short = Payload::copy_from(&d[..d.len() - 1]);
                assert!(decode_with(&head, Some(short), 4, 99).is_err());
                assert!(decode_with(&b, Some(d), 4, 99).is_err());
            }
        }
        let mut b = encode(&samples()[0]);
        b[8] = 42;
        assert_eq!(decode(&b, 4, 99), Err(DecodeError::Kind(42)));
        // A run whose first change comes after its last.
        let holds = samples()
            .into_iter()
            .find(|m| matches!(&m.body, Body::Holds { runs, .. } if !runs.is_empty()))
            .expect("holds sample");
        let mut b = encode(&holds);
        // kind 4 + id 8 + trim 16 + n 4 + term 8: `first` of the first run.
        b[8 + 4 + 8 + 16 + 4 + 8..][..8].copy_from_slice(&100u64.to_le_bytes());
        assert_eq!(decode(&b, 4, 99), Err(DecodeError::Field("holds run")));
    }

    proptest! {
        // Proves decode never panics on arbitrary bytes.
        #[test]
        fn decode_total(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes, 1, 1);
        }
    }
}
