//! A simulated disk for deterministic tests: in memory, with a volatile
//! write cache, completions in a seeded random order, and a crash that keeps
//! every synced write but loses, keeps or tears (per 512-byte sector) each
//! write that was not yet synced — the failure model of a real disk on power
//! loss. Corruption can be injected into the durable image.

use super::{AlignedBuf, Disk, IoDone, IoKind, IoOp, Wait, check_op};
use std::collections::BTreeMap;

const BLOCK: usize = 4096;
const SECTOR: usize = 512;

/// A small deterministic PRNG (splitmix64): tests must replay from a seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        tessera_wire::map::mix64(self.0)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next_u64() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

pub struct SimDisk {
    durable: Vec<u8>,
    /// Completed but unsynced writes, per block: (completion sequence, data).
    cache: BTreeMap<u64, Vec<(u64, Vec<u8>)>>,
    queued: Vec<(u64, IoOp)>,
    seq: u64,
    rng: Rng,
    inflight_max: usize,
}

impl SimDisk {
    pub fn new(size: u64, seed: u64) -> SimDisk {
        SimDisk::from_image(vec![0; size as usize], seed)
    }

    pub fn from_image(durable: Vec<u8>, seed: u64) -> SimDisk {
        assert!(durable.len().is_multiple_of(BLOCK));
        SimDisk {
            durable,
            cache: BTreeMap::new(),
            queued: Vec::new(),
            seq: 0,
            rng: Rng::new(seed),
            inflight_max: 64,
        }
    }

    /// Power loss: what survives is every synced write, and for each write
    /// not yet synced (completed or still in flight) a random outcome: lost,
    /// persisted, or torn at sector granularity. Returns the durable image.
    pub fn crash(mut self) -> Vec<u8> {
        let mut pending: Vec<(u64, Vec<u8>)> = Vec::new();
        for (block, versions) in std::mem::take(&mut self.cache) {
            for (_, data) in versions {
                pending.push((block * BLOCK as u64, data));
            }
        }
        for (_, op) in std::mem::take(&mut self.queued) {
            if op.kind == IoKind::Write {
                pending.push((op.offset, op.buf.expect("write buffer").to_vec()));
            }
        }
        for (offset, data) in pending {
            match self.rng.below(3) {
                0 => {}
                1 => self.put(offset, &data),
                _ => {
                    for s in (0..data.len()).step_by(SECTOR) {
                        if self.rng.chance(50) {
                            self.put(offset + s as u64, &data[s..s + SECTOR]);
                        }
                    }
                }
            }
        }
        self.durable
    }

    fn put(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.durable[o..o + data.len()].copy_from_slice(data);
    }

    /// Flip one byte of the durable image (silent corruption).
    pub fn corrupt(&mut self, offset: u64) {
        self.durable[offset as usize] ^= 0x5A;
    }

    pub fn image(&self) -> &[u8] {
        &self.durable
    }

    fn read_block(&self, block: u64, out: &mut [u8]) {
        if let Some(v) = self.cache.get(&block).and_then(|v| v.last()) {
            out.copy_from_slice(&v.1);
        } else {
            let o = block as usize * BLOCK;
            out.copy_from_slice(&self.durable[o..o + BLOCK]);
        }
    }

    fn execute(&mut self, submit_seq: u64, mut op: IoOp) -> IoDone {
        self.seq += 1;
        let now = self.seq;
        match op.kind {
            IoKind::Read => {
                let buf: &mut AlignedBuf = op.buf.as_mut().expect("read buffer");
                let first = op.offset / BLOCK as u64;
                for (i, chunk) in buf.chunks_mut(BLOCK).enumerate() {
                    let mut tmp = vec![0u8; BLOCK];
                    self.read_block(first + i as u64, &mut tmp);
                    chunk.copy_from_slice(&tmp);
                }
            }
            IoKind::Write => {
                let buf = op.buf.as_ref().expect("write buffer");
                let first = op.offset / BLOCK as u64;
                for (i, chunk) in buf.chunks(BLOCK).enumerate() {
                    self.cache
                        .entry(first + i as u64)
                        .or_default()
                        .push((now, chunk.to_vec()));
                }
            }
            IoKind::Sync => {
                // Durable: every write that completed before this sync was
                // submitted (its latest such version).
                let mut emptied = Vec::new();
                let mut writes = Vec::new();
                for (block, versions) in self.cache.iter_mut() {
                    if let Some(pos) = versions.iter().rposition(|(s, _)| *s < submit_seq) {
                        writes.push((*block, versions[pos].1.clone()));
                        versions.drain(..=pos);
                    }
                    if versions.is_empty() {
                        emptied.push(*block);
                    }
                }
                for (block, data) in writes {
                    self.put(block * BLOCK as u64, &data);
                }
                for b in emptied {
                    self.cache.remove(&b);
                }
            }
        }
        IoDone {
            token: op.token,
            kind: op.kind,
            result: Ok(()),
            buf: op.buf,
        }
    }
}

impl Disk for SimDisk {
    fn size_bytes(&self) -> u64 {
        self.durable.len() as u64
    }

    fn submit(&mut self, op: IoOp) -> Result<(), IoOp> {
        check_op(&op, self.size_bytes());
        if self.queued.len() >= self.inflight_max {
            return Err(op);
        }
        self.seq += 1;
        self.queued.push((self.seq, op));
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<IoDone>, wait: Wait) {
        // Complete a random subset, in random order; at least one when the
        // caller is willing to wait.
        let mut n = if self.queued.is_empty() {
            0
        } else {
            self.rng.below(self.queued.len() as u64 + 1) as usize
        };
        if n == 0 && !matches!(wait, Wait::No) && !self.queued.is_empty() {
            n = 1;
        }
        for _ in 0..n {
            let i = self.rng.below(self.queued.len() as u64) as usize;
            let (submit_seq, op) = self.queued.swap_remove(i);
            let done = self.execute(submit_seq, op);
            out.push(done);
        }
    }

    fn inflight(&self) -> usize {
        self.queued.len()
    }

    fn inflight_max(&self) -> usize {
        self.inflight_max
    }
}
