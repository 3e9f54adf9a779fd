//! Routes volume I/O to storage daemons: a byte range is split at chunk
//! boundaries (and at the internal protocol's request limit), each piece is
//! located through `ClusterMap::locate` (chunk → placement group → primary
//! disk → node address) and sent over the `client` pool, with retries.
//!
//! Retry policy (a plain function of the reply, see `classify`):
//! StaleEpoch / WrongDisk → refresh the map and retry as soon as the newer
//! map the daemon has arrives (at the daemon's own epoch: back off); Busy,
//! ShuttingDown, BadPayloadCrc, a lost or refused connection, or a chunk with
//! no disk yet → back off and retry; all until the I/O timeout, then EIO. A
//! backoff pause ends early when a newer map arrives, since a failover or a
//! daemon's return is exactly what a retry waits for.
//! Io / Checksum / Invalid / NoSpace are final. Writes are idempotent, so
//! resending one is safe.

use crate::client::{ConnError, Pool};
use crate::map::MapHandle;
use crate::metrics::Metrics;
use crate::volume::{Capabilities, Catalog, Extent, VolFuture, Volume, VolumeError};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tessera_wire::header::{COMPARE_LENGTH_MAX_BYTES, REQUEST_LENGTH_MAX_BYTES, seal_payload};
use tessera_wire::map::ClusterMap;
use tessera_wire::{Flags, Header, Op, Status};
use tokio::task::JoinSet;
use tokio::time::Instant;

pub const IO_TIMEOUT_MS_DEFAULT: u64 = 30_000;
const BACKOFF_MIN_MS: u64 = 5;
const BACKOFF_MAX_MS: u64 = 500;

/// One chunk-local piece of a volume range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub chunk_index: u32,
    /// Byte offset inside the chunk.
    pub offset: u32,
    pub length: u32,
    /// Offset of this piece in the request's buffer.
    pub buf_offset: usize,
}

/// Split `[offset, offset+length)` of a volume with `chunk_size` byte chunks
/// into pieces that never cross a chunk boundary nor exceed the internal
/// protocol's request length. `None` if a chunk index or in-chunk offset
/// does not fit the wire's 32-bit fields.
pub fn split(chunk_size: u64, offset: u64, length: u64) -> Option<Vec<Piece>> {
    assert!(chunk_size > 0);
    let mut pieces = Vec::with_capacity((length / chunk_size + 2) as usize);
    let (mut pos, end) = (offset, offset.checked_add(length)?);
    while pos < end {
        let chunk = pos / chunk_size;
        let in_chunk = pos % chunk_size;
        let n = (chunk_size - in_chunk)
            .min(end - pos)
            .min(u64::from(REQUEST_LENGTH_MAX_BYTES));
        pieces.push(Piece {
            chunk_index: u32::try_from(chunk).ok()?,
            offset: u32::try_from(in_chunk).ok()?,
            length: n as u32,
            buf_offset: (pos - offset) as usize,
        });
        pos += n;
    }
    Some(pieces)
}

/// Unit of the storage daemons' allocation bitmaps (`Op::BlockStatus`).
const ALLOCATION_BLOCK_BYTES: u64 = 4096;

/// Extents of one chunk piece from its storage `BlockStatus` bitmap: bit
/// `i` (least significant first within byte `i / 8`) says whether 4 KiB
/// block `offset / 4096 + i` of the chunk is allocated. The extents cover
/// exactly `[offset, offset + length)`. `None` if the bitmap is too short.
pub fn bitmap_extents(offset: u32, length: u32, bits: &[u8]) -> Option<Vec<Extent>> {
    let (start, end) = (u64::from(offset), u64::from(offset) + u64::from(length));
    let first = start / ALLOCATION_BLOCK_BYTES;
    let mut out: Vec<Extent> = Vec::new();
    let mut pos = start;
    while pos < end {
        let i = pos / ALLOCATION_BLOCK_BYTES - first;
        let allocated = (bits.get((i / 8) as usize)? >> (i % 8)) & 1 == 1;
        let next = ((pos / ALLOCATION_BLOCK_BYTES + 1) * ALLOCATION_BLOCK_BYTES).min(end);
        match out.last_mut() {
            Some(e) if e.allocated == allocated => e.length += next - pos,
            _ => out.push(Extent {
                length: next - pos,
                allocated,
            }),
        }
        pos = next;
    }
    Some(out)
}

/// What to do after one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Done,
    /// The map is stale: refresh it, then retry.
    RefreshAndRetry,
    /// Transient: back off, then retry.
    Backoff(&'static str),
    Fail(VolumeError),
}

/// Retry policy for a reply status.
pub fn classify(status: Status, volume_in_map: bool) -> Verdict {
    match status {
        Status::Ok => Verdict::Done,
        Status::StaleEpoch | Status::WrongDisk => Verdict::RefreshAndRetry,
        Status::Busy => Verdict::Backoff("busy"),
        Status::ShuttingDown => Verdict::Backoff("shutting_down"),
        Status::BadPayloadCrc => Verdict::Backoff("payload_crc"),
        // A daemon may learn of a new volume after us.
        Status::UnknownVolume if volume_in_map => Verdict::RefreshAndRetry,
        Status::UnknownVolume => Verdict::Fail(VolumeError::Gone),
        Status::Io => Verdict::Fail(VolumeError::Io),
        Status::Checksum => Verdict::Fail(VolumeError::Checksum),
        Status::Invalid => Verdict::Fail(VolumeError::Invalid("refused by storage".into())),
        Status::NoSpace => Verdict::Fail(VolumeError::NoSpace),
        Status::Refused => Verdict::Fail(VolumeError::Io),
        // The offset is in the reply's `chunk_version` (`Router::call`).
        Status::Miscompare => Verdict::Fail(VolumeError::Miscompare(0)),
    }
}

/// Where an attempt goes, resolved from the current map.
enum Target {
    Send {
        addr: String,
        header: Header,
    },
    /// Nothing left to do (e.g. the disk to flush left the map).
    Skip,
    /// No disk holds the chunk right now.
    Unplaced,
    Gone,
}

/// Shared routing state: the map, the storage connections, the timeout.
pub struct Router {
    pub maps: MapHandle,
    pub pool: Pool,
    pub io_timeout: Duration,
    pub metrics: Arc<Metrics>,
}

impl Router {
    /// Run one storage request to completion under the I/O timeout.
    async fn call(
        &self,
        volume_id: Option<u64>,
        target: impl Fn(&ClusterMap) -> Target,
        payload: Option<Arc<Vec<u8>>>,
    ) -> Result<Option<Vec<u8>>, VolumeError> {
        let deadline = Instant::now() + self.io_timeout;
        let mut backoff = Duration::from_millis(BACKOFF_MIN_MS);
        loop {
            let map = self.maps.current();
            let reason = match target(&map) {
                Target::Skip => return Ok(None),
                Target::Gone => return Err(VolumeError::Gone),
                Target::Unplaced => {
                    self.maps.request_refresh();
                    "unplaced"
                }
                Target::Send { addr, header } => {
                    let disk_id = header.disk_id;
                    let attempt = async {
                        let conn = self.pool.get(&addr, map.epoch).await?;
                        conn.call(header, payload.clone()).await
                    };
                    let attempt = tokio::time::timeout_at(deadline, attempt);
                    tokio::pin!(attempt);
                    // A daemon that hangs (stopped, partitioned) never
                    // answers and its connection does not break: when a
                    // newer map sends this request elsewhere, abandon the
                    // attempt and retry there (a resent write is safe: the
                    // old primary is fenced by the new epoch).
                    let mut seen = map.epoch;
                    let outcome = loop {
                        tokio::select! {
                            r = &mut attempt => break Some(r),
                            newer = self.maps.wait_newer(seen, deadline.saturating_duration_since(Instant::now())) => {
                                let now = self.maps.current();
                                seen = now.epoch;
                                let same = matches!(
                                    target(&now),
                                    Target::Send { addr: ref a, header: ref h } if *a == addr && h.disk_id == disk_id
                                );
                                if newer && !same {
                                    break None;
                                }
                                if !newer {
                                    // The deadline passed: the attempt's own timeout answers.
                                    break Some((&mut attempt).await);
                                }
                            }
                        }
                    };
                    let Some(outcome) = outcome else {
                        self.metrics
                            .storage_retries
                            .with_label_values(&["moved"])
                            .inc();
                        backoff = Duration::from_millis(BACKOFF_MIN_MS);
                        continue;
                    };
                    match outcome {
                        Err(_) => return Err(VolumeError::Timeout),
                        Ok(Err(ConnError::Refused)) => return Err(VolumeError::Io),
                        Ok(Err(e)) => {
                            tracing::debug!(%addr, error = %e, "storage request failed");
                            self.maps.request_refresh();
                            if matches!(e, ConnError::PayloadCrc) {
                                "payload_crc"
                            } else {
                                "connection"
                            }
                        }
                        Ok(Ok(reply)) => {
                            let in_map = volume_id.is_some_and(|v| map.volume(v).is_some());
                            match classify(reply.header.status, in_map) {
                                Verdict::Done => return Ok(reply.data),
                                Verdict::Fail(VolumeError::Miscompare(_)) => {
                                    return Err(VolumeError::Miscompare(
                                        reply.header.chunk_version,
                                    ));
                                }
                                Verdict::Fail(e) => return Err(e),
                                Verdict::Backoff(r) => r,
                                Verdict::RefreshAndRetry => {
                                    self.metrics
                                        .storage_retries
                                        .with_label_values(&["stale_map"])
                                        .inc();
                                    self.maps.request_refresh();
                                    // The daemon has a newer map: retry as soon
                                    // as we have it too. At our own epoch it is
                                    // not ready yet (a new primary peering):
                                    // back off, woken by any newer map.
                                    if reply.header.epoch > map.epoch {
                                        let wait = deadline
                                            .saturating_duration_since(Instant::now())
                                            .min(Duration::from_millis(BACKOFF_MAX_MS));
                                        if self.maps.wait_newer(map.epoch, wait).await {
                                            backoff = Duration::from_millis(BACKOFF_MIN_MS);
                                            continue;
                                        }
                                        "stale_map_wait"
                                    } else {
                                        "not_ready"
                                    }
                                }
                            }
                        }
                    }
                }
            };
            self.metrics
                .storage_retries
                .with_label_values(&[reason])
                .inc();
            let now = Instant::now();
            if now >= deadline {
                return Err(VolumeError::Timeout);
            }
            // A newer map (a failover, a daemon back) ends the pause at once.
            let pause = backoff.min(deadline - now);
            if self.maps.wait_newer(map.epoch, pause).await {
                backoff = Duration::from_millis(BACKOFF_MIN_MS);
            } else {
                backoff = (backoff * 2).min(Duration::from_millis(BACKOFF_MAX_MS));
            }
        }
    }

    /// One chunk piece of a ranged op.
    /// `token` goes in `chunk_version` (a COMPARE AND WRITE's; 0 otherwise).
    async fn piece(
        self: Arc<Self>,
        op: Op,
        volume_id: u64,
        piece: Piece,
        fua: bool,
        payload: Option<Arc<Vec<u8>>>,
        token: u64,
    ) -> Result<Option<Vec<u8>>, VolumeError> {
        let payload_len = payload.as_ref().map_or(0, |p| p.len() as u32);
        let target = |map: &ClusterMap| {
            if map.volume(volume_id).is_none() {
                return Target::Gone;
            }
            let Some(loc) = map.locate(volume_id, piece.chunk_index) else {
                return Target::Unplaced;
            };
            let mut h = Header::request(op, 0, map.epoch);
            h.volume_id = volume_id;
            h.chunk_index = piece.chunk_index;
            h.disk_id = loc.disk_id;
            h.offset = piece.offset;
            h.length = piece.length;
            h.payload_len = payload_len;
            h.chunk_version = token;
            if fua {
                h.flags = Flags::FUA;
            }
            Target::Send {
                addr: loc.addr,
                header: h,
            }
        };
        self.call(Some(volume_id), target, payload).await
    }

    /// Flush one disk, if it is still in the map.
    async fn flush_disk(self: Arc<Self>, disk_id: u32) -> Result<Option<Vec<u8>>, VolumeError> {
        let target = |map: &ClusterMap| {
            // Down disks are skipped: their copies are outdated and will be
            // recovered; every acting (up) copy is flushed.
            let in_acting_set = map.pgs.iter().any(|s| s.contains(&disk_id))
                && map.disk(disk_id).is_some_and(|d| d.up);
            let node = map.disk(disk_id).and_then(|d| map.node(d.node_id));
            match node {
                Some(n) if in_acting_set => {
                    let mut h = Header::request(Op::Flush, 0, map.epoch);
                    h.disk_id = disk_id;
                    Target::Send {
                        addr: n.addr.clone(),
                        header: h,
                    }
                }
                _ => Target::Skip,
            }
        };
        self.call(None, target, None).await
    }
}

/// A token for a COMPARE AND WRITE, unique per request of this process
/// and, through a random start, among gateway processes (0 is never used:
/// it means "no token").
fn next_cas_token() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static BASE: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(|| {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    });
    match base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) {
        0 => base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)),
        t => t,
    }
}

/// In-flight pieces of one request: each yields its buffer offset and, for
/// reads, its data.
type Pieces = JoinSet<Result<(usize, Option<Vec<u8>>), VolumeError>>;

/// Run every future of `set`; the first error wins, the rest are dropped
/// (and aborted with the set).
async fn join_all(
    mut set: Pieces,
    mut each: impl FnMut(usize, Vec<u8>),
) -> Result<(), VolumeError> {
    while let Some(r) = set.join_next().await {
        let (at, data) = r.map_err(|_| VolumeError::ShuttingDown)??;
        if let Some(d) = data {
            each(at, d);
        }
    }
    Ok(())
}

/// The pieces of a read, in volume order, as one buffer. A read within one
/// chunk is a single piece and is returned as it came (no zeroing, no
/// copy). Pieces must tile the request exactly: a gap or an overlap (a
/// daemon answering with the wrong length) is an I/O error, never zeroes.
fn assemble(mut parts: Vec<(usize, Vec<u8>)>, len: usize) -> Result<Vec<u8>, VolumeError> {
    if parts.len() == 1 && parts[0].0 == 0 && parts[0].1.len() == len {
        return Ok(parts.pop().expect("one piece").1);
    }
    parts.sort_unstable_by_key(|p| p.0);
    let mut buf = Vec::with_capacity(len);
    for (at, d) in parts {
        if at != buf.len() {
            return Err(VolumeError::Io);
        }
        buf.extend_from_slice(&d);
    }
    if buf.len() != len {
        return Err(VolumeError::Io);
    }
    Ok(buf)
}

/// A volume served through the cluster: size and geometry come from the
/// newest map, I/O goes to storage daemons.
pub struct RoutedVolume {
    router: Arc<Router>,
    id: u64,
    name: String,
    block_size: u32,
}

impl RoutedVolume {
    fn chunk_size(&self) -> Result<u64, VolumeError> {
        self.router
            .maps
            .current()
            .volume(self.id)
            .map(|v| v.chunk_size_bytes)
            .ok_or(VolumeError::Gone)
    }

    fn ranged(
        &self,
        op: Op,
        offset: u64,
        length: u64,
        fua: bool,
        mut data: Option<Vec<u8>>,
    ) -> Result<Pieces, VolumeError> {
        let pieces = split(self.chunk_size()?, offset, length)
            .ok_or_else(|| VolumeError::Invalid("range beyond addressable chunks".into()))?;
        let single = pieces.len() == 1;
        let mut set = JoinSet::new();
        for p in pieces {
            let payload = data.as_mut().map(|d| {
                if single {
                    // The whole write is this piece: seal it where it lies
                    // (the NBD reader left room for the CRC) instead of
                    // copying it.
                    let mut v = std::mem::take(d);
                    seal_payload(&mut v);
                    return Arc::new(v);
                }
                let mut v = Vec::with_capacity(p.length as usize + 4);
                v.extend_from_slice(&d[p.buf_offset..p.buf_offset + p.length as usize]);
                seal_payload(&mut v);
                Arc::new(v)
            });
            let router = Arc::clone(&self.router);
            let id = self.id;
            set.spawn(async move {
                let r = router.piece(op, id, p, fua, payload, 0).await?;
                Ok((p.buf_offset, r))
            });
        }
        Ok(set)
    }
}

impl Volume for RoutedVolume {
    fn name(&self) -> &str {
        &self.name
    }

    fn size_bytes(&self) -> u64 {
        // A deleted volume has no bytes: every request is out of range.
        self.router
            .maps
            .current()
            .volume(self.id)
            .map_or(0, |v| v.size_bytes)
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn capabilities(&self) -> Capabilities {
        // FLUSH reaches every disk of every acting set, so it covers writes
        // completed through any connection: multi-conn is safe.
        Capabilities::ALL
    }

    fn read(&self, offset: u64, length: u32) -> VolFuture<'_, Vec<u8>> {
        Box::pin(async move {
            let set = self.ranged(Op::Read, offset, u64::from(length), false, None)?;
            let mut parts = Vec::new();
            join_all(set, |at, d| parts.push((at, d))).await?;
            assemble(parts, length as usize)
        })
    }

    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> VolFuture<'_, ()> {
        Box::pin(async move {
            let set = self.ranged(Op::Write, offset, data.len() as u64, fua, Some(data))?;
            join_all(set, |_, _| {}).await
        })
    }

    fn flush(&self) -> VolFuture<'_, ()> {
        Box::pin(async move {
            let map = self.router.maps.current();
            let disks: BTreeSet<u32> = map.pgs.iter().flatten().copied().collect();
            let mut set = JoinSet::new();
            for d in disks {
                let router = Arc::clone(&self.router);
                set.spawn(async move { router.flush_disk(d).await.map(|_| (0, None)) });
            }
            join_all(set, |_, _| {}).await
        })
    }

    fn trim(&self, offset: u64, length: u32, fua: bool) -> VolFuture<'_, ()> {
        Box::pin(async move {
            let set = self.ranged(Op::Trim, offset, u64::from(length), fua, None)?;
            join_all(set, |_, _| {}).await
        })
    }

    fn write_zeroes(&self, offset: u64, length: u32, fua: bool) -> VolFuture<'_, ()> {
        Box::pin(async move {
            let set = self.ranged(Op::WriteZeroes, offset, u64::from(length), fua, None)?;
            join_all(set, |_, _| {}).await
        })
    }

    fn allocation(&self, offset: u64, length: u64) -> VolFuture<'_, Vec<Extent>> {
        Box::pin(self.allocation_map(offset, length))
    }

    fn compare_and_write(
        &self,
        offset: u64,
        compare: Vec<u8>,
        data: Vec<u8>,
        fua: bool,
    ) -> VolFuture<'_, ()> {
        Box::pin(async move {
            if compare.len() != data.len() {
                return Err(VolumeError::Invalid(
                    "compare and write lengths differ".into(),
                ));
            }
            let pieces = split(self.chunk_size()?, offset, data.len() as u64)
                .ok_or_else(|| VolumeError::Invalid("range beyond addressable chunks".into()))?;
            // One chunk, one primary: atomic there. Across chunks two
            // primaries would have to agree; the caller falls back.
            let [piece] = pieces[..] else {
                return Err(VolumeError::NotSupported);
            };
            if piece.length > COMPARE_LENGTH_MAX_BYTES {
                return Err(VolumeError::NotSupported);
            }
            let mut payload = compare;
            payload.reserve(data.len() + 4);
            payload.extend_from_slice(&data);
            seal_payload(&mut payload);
            let token = next_cas_token();
            // The compare bytes then the write bytes, one CRC; `token`
            // names the request across resends (`Op::CompareAndWrite`).
            Arc::clone(&self.router)
                .piece(
                    Op::CompareAndWrite,
                    self.id,
                    piece,
                    fua,
                    Some(Arc::new(payload)),
                    token,
                )
                .await
                .map(|_| ())
        })
    }

    fn zeroes_are_fast(&self) -> bool {
        // Storage WriteZeroes unmaps whole 4 KiB blocks (metadata only) and
        // rewrites at most the two partial blocks at the edges.
        true
    }
}

impl RoutedVolume {
    /// The allocation map, from one storage `BlockStatus` per chunk piece
    /// (sent in parallel), stitched in volume order.
    async fn allocation_map(&self, offset: u64, length: u64) -> Result<Vec<Extent>, VolumeError> {
        let pieces = split(self.chunk_size()?, offset, length)
            .ok_or_else(|| VolumeError::Invalid("range beyond addressable chunks".into()))?;
        let set = self.ranged(Op::BlockStatus, offset, length, false, None)?;
        let mut maps: Vec<(usize, Vec<u8>)> = Vec::with_capacity(pieces.len());
        join_all(set, |at, d| maps.push((at, d))).await?;
        maps.sort_by_key(|m| m.0);
        if maps.len() != pieces.len() {
            tracing::warn!("a storage BlockStatus reply carried no bitmap");
            return Err(VolumeError::Io);
        }
        let mut out: Vec<Extent> = Vec::new();
        for (p, (at, bits)) in pieces.iter().zip(&maps) {
            assert_eq!(p.buf_offset, *at);
            let Some(extents) = bitmap_extents(p.offset, p.length, bits) else {
                tracing::warn!("a storage BlockStatus bitmap is too short");
                return Err(VolumeError::Io);
            };
            for e in extents {
                match out.last_mut() {
                    Some(l) if l.allocated == e.allocated => l.length += e.length,
                    _ => out.push(e),
                }
            }
        }
        Ok(out)
    }
}

/// Exports are the volumes of the current map, looked up by name at
/// handshake time.
pub struct MapCatalog {
    pub router: Arc<Router>,
}

impl Catalog for MapCatalog {
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .router
            .maps
            .current()
            .volumes
            .iter()
            .map(|v| v.name.clone())
            .collect();
        v.sort();
        v
    }

    fn open(&self, name: &str) -> Option<Arc<dyn Volume>> {
        if name.is_empty() {
            return None;
        }
        let map = self.router.maps.current();
        let v = map.volume_by_name(name)?;
        Some(Arc::new(RoutedVolume {
            router: Arc::clone(&self.router),
            id: v.id,
            name: v.name.clone(),
            block_size: v.block_size,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    // Proves a range is cut exactly at chunk boundaries, pieces are
    // contiguous and buffer offsets follow them.
    #[test]
    fn split_at_chunk_boundaries() {
        let p = split(4 * MIB, 4 * MIB - 4096, 8192 + 4 * MIB).unwrap();
        assert_eq!(
            p,
            vec![
                Piece {
                    chunk_index: 0,
                    offset: (4 * MIB - 4096) as u32,
                    length: 4096,
                    buf_offset: 0
                },
                Piece {
                    chunk_index: 1,
                    offset: 0,
                    length: (4 * MIB) as u32,
                    buf_offset: 4096
                },
                Piece {
                    chunk_index: 2,
                    offset: 0,
                    length: 4096,
                    buf_offset: (4 * MIB + 4096) as usize
                },
            ]
        );
        assert_eq!(split(4 * MIB, 512, 512).unwrap().len(), 1);
        assert!(split(4 * MIB, 0, 0).unwrap().is_empty());
    }

    // Proves pieces of a large-chunk volume never exceed the wire's request
    // length, and unaddressable chunk indexes are refused.
    #[test]
    fn split_limits() {
        let p = split(64 * MIB, 0, 20 * MIB).unwrap();
        assert!(p.iter().all(|p| p.length <= REQUEST_LENGTH_MAX_BYTES));
        assert_eq!(p.iter().map(|p| u64::from(p.length)).sum::<u64>(), 20 * MIB);
        assert!(split(4096, 4096 * (1 << 32), 4096).is_none());
        assert!(split(4096, u64::MAX, 1).is_none());
    }

    // Proves storage allocation bitmaps become extents clipped to the
    // piece, merged by state, with unaligned edges and short bitmaps.
    #[test]
    fn bitmap_to_extents() {
        let e = |length, allocated| Extent { length, allocated };
        // Blocks 0..8: allocated 0,1,4.
        let bits = [0b0001_0011u8];
        assert_eq!(
            bitmap_extents(0, 8 * 4096, &bits).unwrap(),
            vec![
                e(8192, true),
                e(8192, false),
                e(4096, true),
                e(12288, false)
            ]
        );
        // Starting mid-block at 512 within block 1 (bit 0 = block 1).
        assert_eq!(
            bitmap_extents(4096 + 512, 4096, &[0b01]).unwrap(),
            vec![e(3584, true), e(512, false)]
        );
        assert_eq!(bitmap_extents(0, 9 * 4096, &[0xff]), None);
        assert_eq!(
            bitmap_extents(8 * 4096, 4096, &[0]).unwrap(),
            vec![e(4096, false)]
        );
    }

    // Proves the retry policy for every status.
    #[test]
    fn classify_statuses() {
        assert_eq!(classify(Status::Ok, true), Verdict::Done);
        assert_eq!(classify(Status::StaleEpoch, true), Verdict::RefreshAndRetry);
        assert_eq!(classify(Status::WrongDisk, true), Verdict::RefreshAndRetry);
        assert!(matches!(classify(Status::Busy, true), Verdict::Backoff(_)));
        assert!(matches!(
            classify(Status::ShuttingDown, true),
            Verdict::Backoff(_)
        ));
        assert!(matches!(
            classify(Status::BadPayloadCrc, true),
            Verdict::Backoff(_)
        ));
        assert_eq!(
            classify(Status::UnknownVolume, true),
            Verdict::RefreshAndRetry
        );
        assert_eq!(
            classify(Status::UnknownVolume, false),
            Verdict::Fail(VolumeError::Gone)
        );
        assert_eq!(classify(Status::Io, true), Verdict::Fail(VolumeError::Io));
        assert_eq!(
            classify(Status::Checksum, true),
            Verdict::Fail(VolumeError::Checksum)
        );
        assert!(matches!(
            classify(Status::Invalid, true),
            Verdict::Fail(VolumeError::Invalid(_))
        ));
        assert_eq!(
            classify(Status::NoSpace, true),
            Verdict::Fail(VolumeError::NoSpace)
        );
        assert_eq!(
            classify(Status::Refused, true),
            Verdict::Fail(VolumeError::Io)
        );
    }
}
