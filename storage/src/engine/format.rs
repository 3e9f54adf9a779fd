//! On-disk format: superblock, metadata pages and records (see
//! docs/on-disk-format.md for the whole picture).
//!
//! Every structure here is a fixed-size, little-endian, CRC32C-protected
//! 4 KiB block, so a torn or stale write is detected on read. Encoding and
//! decoding are pure functions.

use tessera_wire::crc32c;

pub const BLOCK_BYTES: usize = 4096;
pub const SB_MAGIC: [u8; 8] = *b"TESSERA1";
/// Version 2 adds the group-log records (`LogExtent`, `LogSeq`, `LogTrim`,
/// `LogCas`) and `CasDone`; version 3 adds `LogFloor`.
/// An older disk opens as is and is marked with the current version at
/// open, before any new record is written (an older binary then refuses it
/// rather than stop its journal replay at the first record it does not
/// know). A version 2 disk's groups have no `LogFloor`: their logs count
/// as incomplete, which costs a full resync where one was needed before.
pub const FORMAT_VERSION: u32 = 3;
/// The oldest version this binary opens.
pub const FORMAT_VERSION_MIN: u32 = 1;
pub const PAGE_MAGIC_JOURNAL: u32 = 0x4A53_5354; // "TSSJ"
pub const PAGE_MAGIC_CKPT: u32 = 0x4353_5354; // "TSSC"
pub const CKPT_HEADER_MAGIC: u32 = 0x4853_5354; // "TSSH"
pub const RECORD_BYTES: usize = 32;
pub const PAGE_HEADER_BYTES: usize = 32;
/// Records per metadata page.
pub const RECORDS_PER_PAGE: usize = (BLOCK_BYTES - PAGE_HEADER_BYTES) / RECORD_BYTES;
/// Reserved physical block number meaning "not allocated".
pub const PHYS_NONE: u32 = u32::MAX;
pub const CLUSTER_ID_MAX_BYTES: usize = 64;

const _: () = assert!(RECORDS_PER_PAGE == 127);

/// Static description of a formatted disk; written once, twice (blocks 0
/// and 1), so one torn copy leaves the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// The version found on disk (`encode` always writes the current one).
    pub version: u32,
    pub disk_uuid: [u8; 16],
    /// Random per format; stamped on every metadata page so pages left by an
    /// earlier format of the same device are never replayed.
    pub format_id: u64,
    pub cluster_id: String,
    pub disk_bytes: u64,
    pub chunk_bytes: u64,
    pub journal_start: u64,
    pub journal_blocks: u64,
    pub ckpt_start: [u64; 2],
    pub ckpt_blocks: u64,
    pub data_start: u64,
    pub data_blocks: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("no Tessera superblock (blank device)")]
    Blank,
    #[error("not a Tessera disk (unknown magic)")]
    Magic,
    #[error("superblock checksum mismatch")]
    Crc,
    #[error("unsupported format version {0}")]
    Version(u32),
    #[error("superblock fields are inconsistent: {0}")]
    Geometry(&'static str),
    #[error("disk of {0} bytes is too small for Tessera")]
    TooSmall(u64),
}

impl Superblock {
    /// Lay out a disk of `disk_bytes`: superblocks, journal, two checkpoint
    /// areas, then data.
    pub fn layout(
        disk_bytes: u64,
        chunk_bytes: u64,
        cluster_id: &str,
        disk_uuid: [u8; 16],
        format_id: u64,
    ) -> Result<Superblock, FormatError> {
        assert!(cluster_id.len() <= CLUSTER_ID_MAX_BYTES);
        assert!(chunk_bytes.is_multiple_of(BLOCK_BYTES as u64));
        let total = disk_bytes / BLOCK_BYTES as u64;
        if total < 4096 {
            return Err(FormatError::TooSmall(disk_bytes));
        }
        // The journal: 1/64 of the disk, between 64 pages and 64 MiB.
        let journal_blocks = (total / 64).clamp(64, 16384);
        // A checkpoint holds at most one record per data block, plus its
        // header page; sized on the whole disk, which over-counts a little.
        let ckpt_blocks = 1 + total.div_ceil(RECORDS_PER_PAGE as u64);
        let journal_start = 2;
        let ckpt_a = journal_start + journal_blocks;
        let ckpt_b = ckpt_a + ckpt_blocks;
        let data_start = ckpt_b + ckpt_blocks;
        if data_start + 64 > total {
            return Err(FormatError::TooSmall(disk_bytes));
        }
        let data_blocks = (total - data_start).min(u64::from(PHYS_NONE) - 1);
        Ok(Superblock {
            version: FORMAT_VERSION,
            disk_uuid,
            format_id,
            cluster_id: cluster_id.to_string(),
            disk_bytes,
            chunk_bytes,
            journal_start,
            journal_blocks,
            ckpt_start: [ckpt_a, ckpt_b],
            ckpt_blocks,
            data_start,
            data_blocks,
        })
    }

    pub fn blocks_per_chunk(&self) -> usize {
        (self.chunk_bytes / BLOCK_BYTES as u64) as usize
    }

    pub fn uuid_string(&self) -> String {
        let u = &self.disk_uuid;
        format!(
            "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            u[0],
            u[1],
            u[2],
            u[3],
            u[4],
            u[5],
            u[6],
            u[7],
            u[8],
            u[9],
            u[10],
            u[11],
            u[12],
            u[13],
            u[14],
            u[15]
        )
    }

    pub fn encode(&self) -> [u8; BLOCK_BYTES] {
        let mut b = [0u8; BLOCK_BYTES];
        b[0..8].copy_from_slice(&SB_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(BLOCK_BYTES as u32).to_le_bytes());
        b[16..32].copy_from_slice(&self.disk_uuid);
        let mut o = 32;
        for v in [
            self.format_id,
            self.disk_bytes,
            self.chunk_bytes,
            self.journal_start,
            self.journal_blocks,
            self.ckpt_start[0],
            self.ckpt_start[1],
            self.ckpt_blocks,
            self.data_start,
            self.data_blocks,
        ] {
            b[o..o + 8].copy_from_slice(&v.to_le_bytes());
            o += 8;
        }
        let id = self.cluster_id.as_bytes();
        b[o] = id.len() as u8;
        b[o + 1..o + 1 + id.len()].copy_from_slice(id);
        let crc = crc32c(&b[..BLOCK_BYTES - 4]);
        b[BLOCK_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Superblock, FormatError> {
        assert_eq!(b.len(), BLOCK_BYTES);
        if b.iter().all(|&x| x == 0) {
            return Err(FormatError::Blank);
        }
        if b[0..8] != SB_MAGIC {
            return Err(FormatError::Magic);
        }
        let crc = u32::from_le_bytes(b[BLOCK_BYTES - 4..].try_into().expect("4"));
        if crc32c(&b[..BLOCK_BYTES - 4]) != crc {
            return Err(FormatError::Crc);
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4"));
        if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version) {
            return Err(FormatError::Version(version));
        }
        if u32::from_le_bytes(b[12..16].try_into().expect("4")) != BLOCK_BYTES as u32 {
            return Err(FormatError::Geometry("block size"));
        }
        let mut disk_uuid = [0u8; 16];
        disk_uuid.copy_from_slice(&b[16..32]);
        let u = |i: usize| u64::from_le_bytes(b[32 + i * 8..40 + i * 8].try_into().expect("8"));
        let o = 32 + 10 * 8;
        let id_len = b[o] as usize;
        if id_len > CLUSTER_ID_MAX_BYTES {
            return Err(FormatError::Geometry("cluster id length"));
        }
        let cluster_id = std::str::from_utf8(&b[o + 1..o + 1 + id_len])
            .map_err(|_| FormatError::Geometry("cluster id is not UTF-8"))?
            .to_string();
        let sb = Superblock {
            version,
            disk_uuid,
            format_id: u(0),
            disk_bytes: u(1),
            chunk_bytes: u(2),
            journal_start: u(3),
            journal_blocks: u(4),
            ckpt_start: [u(5), u(6)],
            ckpt_blocks: u(7),
            data_start: u(8),
            data_blocks: u(9),
            cluster_id,
        };
        sb.check()?;
        Ok(sb)
    }

    fn check(&self) -> Result<(), FormatError> {
        let total = self.disk_bytes / BLOCK_BYTES as u64;
        if self.chunk_bytes == 0 || !self.chunk_bytes.is_multiple_of(BLOCK_BYTES as u64) {
            return Err(FormatError::Geometry("chunk size"));
        }
        if self.blocks_per_chunk() > usize::from(u16::MAX) + 1 {
            return Err(FormatError::Geometry("chunk too large"));
        }
        if self.journal_start < 2
            || self.ckpt_start[0] < self.journal_start + self.journal_blocks
            || self.ckpt_start[1] < self.ckpt_start[0] + self.ckpt_blocks
            || self.data_start < self.ckpt_start[1] + self.ckpt_blocks
            || self.data_start + self.data_blocks > total
        {
            return Err(FormatError::Geometry("regions overlap or exceed the disk"));
        }
        Ok(())
    }
}

/// One metadata change. Journal pages and checkpoints are sequences of
/// records; replaying them in order rebuilds the block map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// Block `block` of the chunk now lives at physical block `phys` and
    /// its content has CRC32C `crc`.
    Map {
        volume_id: u64,
        chunk_index: u32,
        block: u16,
        phys: u32,
        crc: u32,
        version: u64,
    },
    /// Block `block` of the chunk is deallocated (reads as zeroes).
    Unmap {
        volume_id: u64,
        chunk_index: u32,
        block: u16,
        version: u64,
    },
    /// Every chunk of the volume is gone (the volume was deleted).
    DropVolume { volume_id: u64 },
    /// An entry of a replicated placement group's log (docs/replication.md,
    /// "Persistent group logs"), committed with the mapping switch of the
    /// change it names: its extent. Always followed, in the same commit, by
    /// the `LogSeq` that completes it.
    LogExtent {
        pg: u32,
        volume_id: u64,
        chunk_index: u32,
        offset: u32,
        length: u32,
    },
    /// The sequence of the `LogExtent` just before it.
    LogSeq { term: u64, n: u64 },
    /// Group `pg`'s entries up to `(term, n)` are durable on every member:
    /// forgotten.
    LogTrim { pg: u32, term: u64, n: u64 },
    /// The change of the `LogSeq` just before it is a COMPARE AND WRITE's
    /// write, with this token.
    LogCas { token: u64 },
    /// A single-copy COMPARE AND WRITE with this token wrote (committed
    /// with its write's mapping).
    CasDone { token: u64 },
    /// Group `pg`'s log may lack entries up to `(term, n)` (entries the
    /// engine dropped to bound its memory, or a point the replication
    /// layer named); with `complete`, it holds every change above that
    /// point this disk holds (docs/replication.md, "A restarted last copy
    /// recovers the others by delta").
    LogFloor {
        pg: u32,
        term: u64,
        n: u64,
        complete: bool,
    },
}

impl Record {
    pub fn encode(&self, out: &mut [u8]) {
        assert_eq!(out.len(), RECORD_BYTES);
        out.fill(0);
        let put32 =
            |out: &mut [u8], o: usize, v: u32| out[o..o + 4].copy_from_slice(&v.to_le_bytes());
        let put64 =
            |out: &mut [u8], o: usize, v: u64| out[o..o + 8].copy_from_slice(&v.to_le_bytes());
        match *self {
            Record::LogExtent {
                pg,
                volume_id,
                chunk_index,
                offset,
                length,
            } => {
                out[0] = 4;
                put32(out, 4, chunk_index);
                put64(out, 8, volume_id);
                put32(out, 16, offset);
                put32(out, 20, length);
                put32(out, 24, pg);
                return;
            }
            Record::LogSeq { term, n } => {
                out[0] = 5;
                put64(out, 8, term);
                put64(out, 16, n);
                return;
            }
            Record::LogTrim { pg, term, n } => {
                out[0] = 6;
                put32(out, 4, pg);
                put64(out, 8, term);
                put64(out, 16, n);
                return;
            }
            Record::LogCas { token } => {
                out[0] = 7;
                put64(out, 8, token);
                return;
            }
            Record::CasDone { token } => {
                out[0] = 8;
                put64(out, 8, token);
                return;
            }
            Record::LogFloor {
                pg,
                term,
                n,
                complete,
            } => {
                out[0] = 9;
                out[1] = u8::from(complete);
                put32(out, 4, pg);
                put64(out, 8, term);
                put64(out, 16, n);
                return;
            }
            _ => {}
        }
        let (kind, vol, chunk, block, phys, crc, version) = match *self {
            Record::Map {
                volume_id,
                chunk_index,
                block,
                phys,
                crc,
                version,
            } => (1u8, volume_id, chunk_index, block, phys, crc, version),
            Record::Unmap {
                volume_id,
                chunk_index,
                block,
                version,
            } => (2, volume_id, chunk_index, block, 0, 0, version),
            Record::DropVolume { volume_id } => (3, volume_id, 0, 0, 0, 0, 0),
            Record::LogExtent { .. }
            | Record::LogSeq { .. }
            | Record::LogTrim { .. }
            | Record::LogCas { .. }
            | Record::CasDone { .. }
            | Record::LogFloor { .. } => unreachable!("encoded above"),
        };
        out[0] = kind;
        out[2..4].copy_from_slice(&block.to_le_bytes());
        out[4..8].copy_from_slice(&chunk.to_le_bytes());
        out[8..16].copy_from_slice(&vol.to_le_bytes());
        out[16..20].copy_from_slice(&phys.to_le_bytes());
        out[20..24].copy_from_slice(&crc.to_le_bytes());
        out[24..32].copy_from_slice(&version.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> Option<Record> {
        assert_eq!(b.len(), RECORD_BYTES);
        let block = u16::from_le_bytes([b[2], b[3]]);
        let chunk_index = u32::from_le_bytes(b[4..8].try_into().expect("4"));
        let volume_id = u64::from_le_bytes(b[8..16].try_into().expect("8"));
        let phys = u32::from_le_bytes(b[16..20].try_into().expect("4"));
        let crc = u32::from_le_bytes(b[20..24].try_into().expect("4"));
        let version = u64::from_le_bytes(b[24..32].try_into().expect("8"));
        match b[0] {
            1 => Some(Record::Map {
                volume_id,
                chunk_index,
                block,
                phys,
                crc,
                version,
            }),
            2 => Some(Record::Unmap {
                volume_id,
                chunk_index,
                block,
                version,
            }),
            3 => Some(Record::DropVolume { volume_id }),
            4 => Some(Record::LogExtent {
                pg: u32::from_le_bytes(b[24..28].try_into().expect("4")),
                volume_id,
                chunk_index,
                offset: phys,
                length: crc,
            }),
            5 => Some(Record::LogSeq {
                term: volume_id,
                n: u64::from_le_bytes(b[16..24].try_into().expect("8")),
            }),
            6 => Some(Record::LogTrim {
                pg: chunk_index,
                term: volume_id,
                n: u64::from_le_bytes(b[16..24].try_into().expect("8")),
            }),
            7 => Some(Record::LogCas { token: volume_id }),
            8 => Some(Record::CasDone { token: volume_id }),
            9 if b[1] <= 1 => Some(Record::LogFloor {
                pg: chunk_index,
                term: volume_id,
                n: u64::from_le_bytes(b[16..24].try_into().expect("8")),
                complete: b[1] == 1,
            }),
            _ => None,
        }
    }
}

/// Where a page sits in the batch of pages written by one commit. Replay
/// accepts a batch only when all its pages are valid, so pages left over
/// from a torn batch can never be mistaken for the continuation of a newer
/// one written over its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    pub index: u32,
    pub len: u32,
}

/// A decoded metadata page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub seq: u64,
    pub batch: Batch,
    pub records: Vec<Record>,
}

/// Encode a metadata page: header (magic, count, format id, sequence, batch
/// position, CRC) followed by up to [`RECORDS_PER_PAGE`] records.
pub fn encode_page(
    magic: u32,
    format_id: u64,
    seq: u64,
    batch: Batch,
    records: &[Record],
    out: &mut [u8],
) {
    assert!(records.len() <= RECORDS_PER_PAGE);
    assert!(batch.index < batch.len);
    assert!(batch.len <= u32::from(u16::MAX));
    assert_eq!(out.len(), BLOCK_BYTES);
    out.fill(0);
    out[0..4].copy_from_slice(&magic.to_le_bytes());
    out[4..6].copy_from_slice(&(records.len() as u16).to_le_bytes());
    out[8..16].copy_from_slice(&format_id.to_le_bytes());
    out[16..24].copy_from_slice(&seq.to_le_bytes());
    out[24..28].copy_from_slice(&batch.index.to_le_bytes());
    out[6..8].copy_from_slice(&(batch.len as u16).to_le_bytes());
    for (i, r) in records.iter().enumerate() {
        let o = PAGE_HEADER_BYTES + i * RECORD_BYTES;
        r.encode(&mut out[o..o + RECORD_BYTES]);
    }
    let crc = page_crc(out);
    out[28..32].copy_from_slice(&crc.to_le_bytes());
}

fn page_crc(page: &[u8]) -> u32 {
    let c = crc32c(&page[0..28]);
    tessera_wire::crc32c_append(c, &page[PAGE_HEADER_BYTES..])
}

/// Decode a metadata page, or `None` if it is not a valid page of this
/// format with this magic.
pub fn decode_page(magic: u32, format_id: u64, page: &[u8]) -> Option<Page> {
    assert_eq!(page.len(), BLOCK_BYTES);
    if u32::from_le_bytes(page[0..4].try_into().expect("4")) != magic {
        return None;
    }
    if u64::from_le_bytes(page[8..16].try_into().expect("8")) != format_id {
        return None;
    }
    if u32::from_le_bytes(page[28..32].try_into().expect("4")) != page_crc(page) {
        return None;
    }
    let count = u16::from_le_bytes([page[4], page[5]]) as usize;
    if count > RECORDS_PER_PAGE {
        return None;
    }
    let seq = u64::from_le_bytes(page[16..24].try_into().expect("8"));
    let batch = Batch {
        index: u32::from_le_bytes(page[24..28].try_into().expect("4")),
        len: u32::from(u16::from_le_bytes([page[6], page[7]])),
    };
    if batch.index >= batch.len {
        return None;
    }
    let mut records = Vec::with_capacity(count);
    for i in 0..count {
        let o = PAGE_HEADER_BYTES + i * RECORD_BYTES;
        records.push(Record::decode(&page[o..o + RECORD_BYTES])?);
    }
    Some(Page {
        seq,
        batch,
        records,
    })
}

/// Header of a checkpoint area: which checkpoint it holds and where the
/// journal continues after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CkptHeader {
    pub ckpt_seq: u64,
    /// Journal page index at which replay starts.
    pub journal_pos: u64,
    /// Sequence number the page at `journal_pos` must carry.
    pub journal_seq: u64,
    /// Record pages following the header.
    pub pages: u64,
    /// CRC32C over all record pages, so a half-written checkpoint is
    /// rejected as a whole.
    pub pages_crc: u32,
}

impl CkptHeader {
    pub fn encode(&self, format_id: u64, out: &mut [u8]) {
        assert_eq!(out.len(), BLOCK_BYTES);
        out.fill(0);
        out[0..4].copy_from_slice(&CKPT_HEADER_MAGIC.to_le_bytes());
        out[8..16].copy_from_slice(&format_id.to_le_bytes());
        out[16..24].copy_from_slice(&self.ckpt_seq.to_le_bytes());
        out[24..32].copy_from_slice(&self.journal_pos.to_le_bytes());
        out[32..40].copy_from_slice(&self.journal_seq.to_le_bytes());
        out[40..48].copy_from_slice(&self.pages.to_le_bytes());
        out[48..52].copy_from_slice(&self.pages_crc.to_le_bytes());
        let crc = crc32c(&out[..BLOCK_BYTES - 4]);
        out[BLOCK_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
    }

    pub fn decode(format_id: u64, b: &[u8]) -> Option<CkptHeader> {
        assert_eq!(b.len(), BLOCK_BYTES);
        if u32::from_le_bytes(b[0..4].try_into().expect("4")) != CKPT_HEADER_MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[BLOCK_BYTES - 4..].try_into().expect("4"));
        if crc32c(&b[..BLOCK_BYTES - 4]) != crc {
            return None;
        }
        if u64::from_le_bytes(b[8..16].try_into().expect("8")) != format_id {
            return None;
        }
        let u = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        Some(CkptHeader {
            ckpt_seq: u(16),
            journal_pos: u(24),
            journal_seq: u(32),
            pages: u(40),
            pages_crc: u32::from_le_bytes(b[48..52].try_into().expect("4")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sb() -> Superblock {
        Superblock::layout(1 << 30, 4 << 20, "cluster-x", [7; 16], 99).expect("layout")
    }

    // Proves the superblock round-trips and its layout regions are ordered.
    #[test]
    fn superblock_roundtrip() {
        let s = sb();
        assert_eq!(Superblock::decode(&s.encode()), Ok(s.clone()));
        assert!(s.data_start > s.ckpt_start[1]);
        assert_eq!(s.blocks_per_chunk(), 1024);
    }

    // Proves a version 1 superblock (before the group-log records) still
    // opens, reports its version, and is written back as the current one;
    // a version from the future is refused.
    #[test]
    fn superblock_versions() {
        let s = sb();
        let mut b = s.encode();
        let mut with_version = |v: u32| {
            b[8..12].copy_from_slice(&v.to_le_bytes());
            let crc = crc32c(&b[..BLOCK_BYTES - 4]);
            b[BLOCK_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
            Superblock::decode(&b)
        };
        let old = with_version(1).expect("version 1 opens");
        assert_eq!(old.version, 1);
        assert_eq!(Superblock::decode(&old.encode()), Ok(s.clone()));
        assert_eq!(
            with_version(FORMAT_VERSION + 1),
            Err(FormatError::Version(FORMAT_VERSION + 1))
        );
    }

    // Proves a torn or foreign superblock is detected, never trusted.
    #[test]
    fn superblock_rejections() {
        let mut b = sb().encode();
        assert_eq!(
            Superblock::decode(&[0u8; BLOCK_BYTES]),
            Err(FormatError::Blank)
        );
        b[100] ^= 1;
        assert_eq!(Superblock::decode(&b), Err(FormatError::Crc));
        let mut b = sb().encode();
        b[0] = b'X';
        assert_eq!(Superblock::decode(&b), Err(FormatError::Magic));
        // A torn write: first half new, second half zero.
        let mut b = sb().encode();
        b[2048..].fill(0);
        assert_eq!(Superblock::decode(&b), Err(FormatError::Crc));
        assert!(matches!(
            Superblock::layout(1 << 20, 4 << 20, "", [0; 16], 1),
            Err(FormatError::TooSmall(_))
        ));
    }

    // Proves pages of another format or with a flipped bit are rejected.
    #[test]
    fn page_rejections() {
        let recs = [Record::DropVolume { volume_id: 3 }];
        let mut p = vec![0u8; BLOCK_BYTES];
        let batch = Batch { index: 1, len: 3 };
        encode_page(PAGE_MAGIC_JOURNAL, 5, 9, batch, &recs, &mut p);
        assert_eq!(
            decode_page(PAGE_MAGIC_JOURNAL, 5, &p),
            Some(Page {
                seq: 9,
                batch,
                records: recs.to_vec()
            })
        );
        assert_eq!(decode_page(PAGE_MAGIC_JOURNAL, 6, &p), None);
        assert_eq!(decode_page(PAGE_MAGIC_CKPT, 5, &p), None);
        p[3000] ^= 1;
        assert_eq!(decode_page(PAGE_MAGIC_JOURNAL, 5, &p), None);
    }

    #[test]
    fn ckpt_header_roundtrip() {
        let h = CkptHeader {
            ckpt_seq: 4,
            journal_pos: 17,
            journal_seq: 300,
            pages: 2,
            pages_crc: 0xdead,
        };
        let mut b = vec![0u8; BLOCK_BYTES];
        h.encode(11, &mut b);
        assert_eq!(CkptHeader::decode(11, &b), Some(h));
        assert_eq!(CkptHeader::decode(12, &b), None);
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        prop_oneof![
            (
                any::<u64>(),
                any::<u32>(),
                any::<u16>(),
                any::<u32>(),
                any::<u32>(),
                any::<u64>()
            )
                .prop_map(|(v, c, b, p, crc, ver)| Record::Map {
                    volume_id: v,
                    chunk_index: c,
                    block: b,
                    phys: p,
                    crc,
                    version: ver
                }),
            (any::<u64>(), any::<u32>(), any::<u16>(), any::<u64>()).prop_map(|(v, c, b, ver)| {
                Record::Unmap {
                    volume_id: v,
                    chunk_index: c,
                    block: b,
                    version: ver,
                }
            }),
            any::<u64>().prop_map(|v| Record::DropVolume { volume_id: v }),
            (
                any::<u32>(),
                any::<u64>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>()
            )
                .prop_map(|(pg, v, c, o, l)| Record::LogExtent {
                    pg,
                    volume_id: v,
                    chunk_index: c,
                    offset: o,
                    length: l
                }),
            (any::<u64>(), any::<u64>()).prop_map(|(term, n)| Record::LogSeq { term, n }),
            (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(pg, term, n)| Record::LogTrim {
                pg,
                term,
                n
            }),
            any::<u64>().prop_map(|token| Record::LogCas { token }),
            any::<u64>().prop_map(|token| Record::CasDone { token }),
            (any::<u32>(), any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
                |(pg, term, n, complete)| Record::LogFloor {
                    pg,
                    term,
                    n,
                    complete
                }
            ),
        ]
    }

    proptest! {
        // Proves decode(encode(page)) == page for any records.
        #[test]
        fn page_roundtrip(recs in proptest::collection::vec(arb_record(), 0..=RECORDS_PER_PAGE), seq: u64) {
            let mut p = vec![0u8; BLOCK_BYTES];
            let batch = Batch { index: 0, len: 1 };
            encode_page(PAGE_MAGIC_CKPT, 1, seq, batch, &recs, &mut p);
            prop_assert_eq!(decode_page(PAGE_MAGIC_CKPT, 1, &p), Some(Page { seq, batch, records: recs }));
        }
    }
}
