//! Deterministic simulation of the replication protocol: the replicators of
//! several storage daemons, the manager's map changes and clients, driven by
//! one seeded scheduler in one thread with a virtual clock. The network
//! drops, duplicates, delays (so reorders) messages and partitions nodes;
//! disks lose or tear unflushed writes when their node crashes. A node down
//! longer than the seed's down-out delay is taken out as the manager does
//! (`take_out`): its copies are replaced by backfill members on the node
//! that did not hold the group, filled by a full resync; when it comes
//! back it is in again but holds only the groups it kept (its stale data
//! stays on its disk and must never reach a member). Primaries run with a
//! seeded daemon-wide push limit and, in some seeds, a byte budget.
//!
//! Checkers:
//! * no read ever returns data that was never written to that block;
//! * after every fault heals, every client operation completes (I/O resumes)
//!   and every group becomes clean;
//! * then every copy of every block is identical (replicas converge), and
//!   holds the last acknowledged write, or — where a crash may have lost a
//!   write that no FUA or FLUSH made durable — a write no older than the last
//!   durable one (a disk with a volatile write cache may lose exactly those).
//!
//! `TESSERA_SEED=n` replays one seed; `TESSERA_SIM_SEEDS` and
//! `TESSERA_SIM_SECONDS` bound the batch (seeds, wall-clock seconds).

use super::model_log::ModelLog;
use super::*;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use tessera_wire::map::{
    DiskEntry, FailureDomain, NodeEntry, PoolEntry, VolumeEntry, mark_clean, outdate_disk, take_out,
};

const NODES: u32 = 4;
const PGS: u32 = 4;
const CLIENTS: usize = 4;
const BLOCK: u32 = 4096;
const CHUNK_BLOCKS: u32 = 64;
const CHUNK_BYTES: u32 = BLOCK * CHUNK_BLOCKS;
const GRACE_MS: u64 = 2000;
const TICK_MS: u64 = 100;
const FAULT_PHASE_MS: u64 = 10_000;
const HEAL_LIMIT_MS: u64 = 60_000;
const CLIENT_TIMEOUT_MS: u64 = 700;
/// Scrub timer of every node (randomised up to twice this).
const SCRUB_EVERY_MS: u64 = 1500;

/// splitmix64: a tiny seeded PRNG, good enough for a scheduler.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        tessera_wire::map::mix64(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

type Data = Vec<u64>;
type Block = (u32, u32); // (chunk, block)

/// A disk with a volatile cache: writes land in `cache` until a flush (or
/// FUA) moves them to `durable`; a crash keeps a random subset of cached
/// blocks (torn writes at block granularity).
#[derive(Default, Clone)]
struct SimDisk {
    durable: BTreeMap<Block, u64>,
    cache: BTreeMap<Block, u64>,
    /// Durable blocks whose bytes were flipped: a read of one fails its CRC
    /// (unless a cached write covers it), a write over it replaces it.
    corrupt: BTreeSet<Block>,
    /// Group-log entries, durable with their change as in the engine.
    log: ModelLog,
}

impl SimDisk {
    fn get(&self, b: Block) -> u64 {
        self.cache
            .get(&b)
            .or_else(|| self.durable.get(&b))
            .copied()
            .unwrap_or(0)
    }
    /// Whether a read of `b` fails its CRC.
    fn bad(&self, b: Block) -> bool {
        self.corrupt.contains(&b) && !self.cache.contains_key(&b)
    }
    fn put(&mut self, b: Block, v: u64, fua: bool) {
        if fua {
            self.cache.remove(&b);
            self.durable.insert(b, v);
            self.corrupt.remove(&b);
        } else {
            self.cache.insert(b, v);
        }
    }
    fn flush(&mut self) {
        let c = std::mem::take(&mut self.cache);
        for b in c.keys() {
            self.corrupt.remove(b);
        }
        self.durable.extend(c);
        self.log.flushed();
    }
    fn crash(&mut self, rng: &mut Rng) {
        let c = std::mem::take(&mut self.cache);
        for (b, v) in c {
            if rng.chance(500) {
                self.durable.insert(b, v);
                self.corrupt.remove(&b);
            }
        }
        // The engine commits a change's log entry with its mapping, so an
        // entry survives only with its change. This disk tears harder (any
        // subset of cached blocks): keep an entry only if every block still
        // holds what its change wrote.
        let durable = &self.durable;
        self.log
            .crashed(|b, v| durable.get(&b).copied().unwrap_or(0) == v);
    }
    /// What a new process gets back (`Replicator::recover_log`).
    fn recovered_log(&self) -> Vec<(u32, Seq, Extent, Option<u64>)> {
        self.log.recovered()
    }
}

/// The digest of a copy's blocks, as the daemon computes it from a read.
fn digest(disk: &SimDisk, e: &Extent) -> Digest {
    if blocks(e).any(|b| disk.bad(b)) {
        return Digest::Bad;
    }
    Digest::Sum(blocks(e).fold(0x5eed, |h, b| tessera_wire::map::mix64(h ^ disk.get(b))))
}

fn blocks(e: &Extent) -> impl Iterator<Item = Block> + '_ {
    (e.offset / BLOCK..e.end() / BLOCK).map(move |b| (e.chunk_index, b))
}

struct Node {
    alive: bool,
    /// Cut off from everyone.
    partitioned: bool,
    /// Cut off from the manager (and so from new maps) but not from peers
    /// or clients: a deposed primary that does not know it yet.
    isolated: bool,
    incarnation: u64,
    rep: Replicator<Data>,
    /// The seed's daemon-wide push limit and push size (kept across
    /// restarts).
    rep_pushes_max: usize,
    rep_push_regions: u32,
    disk: SimDisk,
}

enum Ev {
    Deliver(Msg<Data>),
    Applied {
        node: u32,
        inc: u64,
        token: u64,
        update: Update<Data>,
        log: Option<LogNote>,
    },
    Read {
        node: u32,
        inc: u64,
        token: u64,
        extent: Extent,
    },
    Flushed {
        node: u32,
        inc: u64,
        token: u64,
    },
    Regions {
        node: u32,
        inc: u64,
        token: u64,
        pg: u32,
    },
    Digest {
        node: u32,
        inc: u64,
        token: u64,
        extent: Extent,
    },
    /// Every node scrubs the groups it leads (a timer in the daemon).
    Scrub,
    Reply {
        client: usize,
        attempt: u64,
        result: ClientResult,
        data: Option<Data>,
    },
    MapTo(u32),
    Tick(u32),
    Health,
    Report {
        pg: u32,
        disk: u32,
        reporter: u32,
        epoch: u64,
    },
    ClientGo(usize),
    ClientTimeout(usize, u64),
    Fault,
}

#[derive(Clone)]
enum COp {
    Write {
        extent: Extent,
        id: u64,
        fua: bool,
    },
    /// COMPARE AND WRITE (FUA) of the shared counter block: from `expect`
    /// to `id`; `id` is also the request's token.
    Cas {
        id: u64,
        expect: u64,
    },
    Read {
        extent: Extent,
    },
    Flush,
}

struct Client {
    op: Option<COp>,
    /// The counter block's value as this client last saw it, and whether
    /// it must read it again (after a miscompare).
    cas_seen: u64,
    cas_refresh: bool,
    attempt: u64,
    done: u64,
    map: Arc<ClusterMap>,
}

/// What the checker knows about one block: writes issued, acknowledged
/// writes in order with their times, and the index of the last one made
/// durable by contract (FUA, or a FLUSH acknowledged after it).
#[derive(Default, Clone)]
struct History {
    /// Write id -> time issued.
    issued: BTreeMap<u64, u64>,
    /// (write id, time issued, time acknowledged).
    acked: Vec<(u64, u64, u64)>,
    /// Writes the client gave up on (a gateway that died mid-write).
    abandoned: Vec<(u64, u64)>,
    durable_upto: Option<usize>,
}

struct World {
    rng: Rng,
    now: u64,
    seq: u64,
    events: BinaryHeap<Reverse<(u64, u64, usize)>>,
    slots: Vec<Option<Ev>>,
    nodes: Vec<Node>,
    map: ClusterMap,
    last_seen: Vec<u64>,
    clients: Vec<Client>,
    history: BTreeMap<Block, History>,
    next_write: u64,
    /// Successful compare-and-writes by the value they replaced.
    cas_from: BTreeMap<u64, u64>,
    cas_ok: u64,
    cas_miscompares: u64,
    drop_pm: u64,
    dup_pm: u64,
    faults: bool,
    crashes: Vec<u64>,
    /// `TESSERA_SIM_VOLATILE_LOGS=1`: a restarted node gets no group-log
    /// entries back (as before the logs were persisted), to compare.
    volatile_logs: bool,
    corruptions: u64,
    log: Vec<String>,
    /// A node down this long (after the grace) is taken out.
    out_after_ms: u64,
    /// Recovery byte budget granted per tick (`None`: no byte limit).
    budget_per_tick: Option<u64>,
    /// Nodes taken out so far.
    outs: u32,
    /// Recoveries started by processes that replaced a crashed one: (delta,
    /// full), summed when each is replaced (`recoveries_by_restarted`).
    restarted_recoveries: (u64, u64),
}

/// The block every client's COMPARE AND WRITE targets: the first of the
/// chunk after the clients' own.
fn counter_block() -> Block {
    (CLIENTS as u32, 0)
}

fn counter_extent() -> Extent {
    Extent {
        volume_id: 1,
        chunk_index: CLIENTS as u32,
        offset: 0,
        length: BLOCK,
    }
}

fn pg_of_chunk(c: u32) -> u32 {
    c % PGS
}

fn initial_map() -> ClusterMap {
    let nodes: Vec<NodeEntry> = (1..=NODES)
        .map(|id| NodeEntry {
            id,
            addr: format!("n{id}"),
            up: true,
            zone: String::new(),
            rack: String::new(),
            host: String::new(),
        })
        .collect();
    let disks = (1..=NODES)
        .map(|id| DiskEntry {
            id,
            node_id: id,
            uuid: format!("d{id}"),
            capacity_bytes: 1 << 30,
            up: true,
            incarnation: 1,
            out: false,
            up_since: None,
        })
        .collect();
    // Three copies of each group over four disks.
    let pgs: Vec<Vec<u32>> = (0..PGS)
        .map(|pg| (0..3).map(|i| (pg + i) % NODES + 1).collect())
        .collect();
    ClusterMap {
        epoch: 1,
        cluster_id: "sim".into(),
        pg_count: PGS,
        nodes,
        disks,
        pg_states: vec![vec![CopyState::UpToDate; 3]; PGS as usize],
        pgs,
        volumes: vec![VolumeEntry {
            id: 1,
            name: "v".into(),
            // One chunk per client, and the counter chunk they share.
            size_bytes: u64::from(CHUNK_BYTES) * (CLIENTS as u64 + 1),
            chunk_size_bytes: u64::from(CHUNK_BYTES),
            block_size: 4096,
            pool_id: 1,
        }],
        next_volume_id: 2,
        pools: vec![PoolEntry {
            id: 1,
            name: "p".into(),
            replicas: 3,
            min_replicas: 2,
            failure_domain: FailureDomain::Host,
            chunk_size_bytes: u64::from(CHUNK_BYTES),
            pg_base: 0,
            pg_count: PGS,
        }],
    }
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = Rng(seed);
        let drop_pm = rng.below(60);
        let dup_pm = rng.below(60);
        let out_after_ms = 500 + rng.below(3000);
        let pushes_max = 1 + rng.below(8) as usize;
        let push_regions = 1 + rng.below(u64::from(PUSH_REGIONS_MAX)) as u32;
        let budget_per_tick = rng
            .chance(300)
            .then(|| (1 + rng.below(4)) * u64::from(REGION_BYTES));
        let mut map = initial_map();
        map.stamp_up_since(None);
        let nodes = (1..=NODES)
            .map(|id| {
                let mut rep = Replicator::new([id]);
                rep.set_pushes_max(pushes_max);
                rep.set_push_regions(push_regions);
                // A fresh cluster: nothing is missing anywhere.
                rep.handle(Input::Map(Arc::new(map.clone())));
                Node {
                    alive: true,
                    partitioned: false,
                    isolated: false,
                    incarnation: 1,
                    rep,
                    rep_pushes_max: pushes_max,
                    rep_push_regions: push_regions,
                    disk: SimDisk::default(),
                }
            })
            .collect();
        let m = Arc::new(map.clone());
        let mut w = World {
            rng,
            now: 0,
            seq: 0,
            events: BinaryHeap::new(),
            slots: Vec::new(),
            nodes,
            map,
            last_seen: vec![0; NODES as usize + 1],
            clients: (0..CLIENTS)
                .map(|_| Client {
                    op: None,
                    cas_seen: 0,
                    cas_refresh: false,
                    attempt: 0,
                    done: 0,
                    map: m.clone(),
                })
                .collect(),
            history: BTreeMap::new(),
            next_write: 1,
            cas_from: BTreeMap::new(),
            cas_ok: 0,
            cas_miscompares: 0,
            drop_pm,
            dup_pm,
            faults: true,
            crashes: Vec::new(),
            volatile_logs: std::env::var("TESSERA_SIM_VOLATILE_LOGS").is_ok_and(|v| v == "1"),
            corruptions: 0,
            log: Vec::new(),
            out_after_ms,
            budget_per_tick,
            outs: 0,
            restarted_recoveries: (0, 0),
        };
        for n in 1..=NODES {
            let fx = w.nodes[n as usize - 1].rep.take_effects();
            w.effects(n, fx);
            let d = w.rng.below(TICK_MS);
            w.at(d, Ev::Tick(n));
        }
        for c in 0..CLIENTS {
            let d = w.rng.below(20);
            w.at(d, Ev::ClientGo(c));
        }
        w.at(TICK_MS, Ev::Health);
        let d = 300 + w.rng.below(500);
        w.at(d, Ev::Fault);
        let d = SCRUB_EVERY_MS + w.rng.below(SCRUB_EVERY_MS);
        w.at(d, Ev::Scrub);
        w
    }

    fn at(&mut self, delay: u64, ev: Ev) {
        self.seq += 1;
        self.slots.push(Some(ev));
        self.events
            .push(Reverse((self.now + delay, self.seq, self.slots.len() - 1)));
    }

    fn node(&mut self, id: u32) -> &mut Node {
        &mut self.nodes[id as usize - 1]
    }

    fn reachable(&self, id: u32) -> bool {
        let n = &self.nodes[id as usize - 1];
        n.alive && !n.partitioned
    }

    /// Whether the node and the manager can talk (heartbeats, maps,
    /// reports).
    fn managed(&self, id: u32) -> bool {
        self.reachable(id) && !self.nodes[id as usize - 1].isolated
    }

    fn bump(&mut self) {
        self.map.epoch += 1;
        // As the manager publishes it: every disk's `up_since`.
        self.map.stamp_up_since(None);
        if trace_block().is_some() {
            println!(
                "{} epoch {} up {:?} states {:?}",
                self.now,
                self.map.epoch,
                self.map.disks.iter().map(|d| d.up).collect::<Vec<_>>(),
                self.map.pg_states[0]
            );
        }
        for n in 1..=NODES {
            if self.managed(n) {
                let d = 1 + self.rng.below(300);
                self.at(d, Ev::MapTo(n));
            }
        }
    }

    /// Route a node's effects into the world.
    fn effects(&mut self, node: u32, fx: Vec<Effect<Data>>) {
        let inc = self.node(node).incarnation;
        for e in fx {
            match e {
                Effect::Send(m) => {
                    if !self.reachable(m.from) || !self.reachable(m.to) {
                        continue;
                    }
                    if self.faults && self.rng.chance(self.drop_pm) {
                        continue;
                    }
                    let copies = if self.faults && self.rng.chance(self.dup_pm) {
                        2
                    } else {
                        1
                    };
                    for _ in 0..copies {
                        let d = 1 + self.rng.below(20);
                        self.at(d, Ev::Deliver(m.clone()));
                    }
                }
                Effect::Apply {
                    token, update, log, ..
                } => {
                    let d = 1 + self.rng.below(10);
                    self.at(
                        d,
                        Ev::Applied {
                            node,
                            inc,
                            token,
                            update,
                            log,
                        },
                    );
                }
                Effect::ForgetLog { pg, .. } => {
                    self.nodes[node as usize - 1].disk.log.forget(pg);
                }
                Effect::LogEntries { pg, entries, .. } => {
                    self.nodes[node as usize - 1].disk.log.add(pg, entries);
                }
                Effect::LogFloor {
                    pg,
                    floor,
                    complete,
                    ..
                } => {
                    self.nodes[node as usize - 1]
                        .disk
                        .log
                        .floor(pg, floor, complete);
                }
                Effect::Read { token, extent, .. } => {
                    let d = 1 + self.rng.below(10);
                    self.at(
                        d,
                        Ev::Read {
                            node,
                            inc,
                            token,
                            extent,
                        },
                    );
                }
                Effect::ListRegions { token, pg, .. } => {
                    let d = 1 + self.rng.below(10);
                    self.at(
                        d,
                        Ev::Regions {
                            node,
                            inc,
                            token,
                            pg,
                        },
                    );
                }
                Effect::Digest { token, extent, .. } => {
                    let d = 1 + self.rng.below(10);
                    self.at(
                        d,
                        Ev::Digest {
                            node,
                            inc,
                            token,
                            extent,
                        },
                    );
                }
                Effect::Flush { token, .. } => {
                    let d = 1 + self.rng.below(20);
                    self.at(d, Ev::Flushed { node, inc, token });
                }
                Effect::Reply { client, mut result } => {
                    // Client tokens: attempt << 8 | client index.
                    let c = (client & 0xff) as usize;
                    let attempt = client >> 8;
                    // A read that waited for a repair reads the copy again
                    // (as the daemon does): the repaired data, or whatever
                    // change came after the repair.
                    let mut data = None;
                    if let Some(COp::Read { extent }) = &self.clients[c].op
                        && self.clients[c].attempt == attempt
                        && result == ClientResult::Ok
                    {
                        let disk = &self.nodes[node as usize - 1].disk;
                        if blocks(extent).any(|b| disk.bad(b)) {
                            result = ClientResult::Retry;
                        } else {
                            data = Some(blocks(extent).map(|b| disk.get(b)).collect());
                        }
                    }
                    if self.reachable(node) {
                        let d = 1 + self.rng.below(5);
                        self.at(
                            d,
                            Ev::Reply {
                                client: c,
                                attempt,
                                result,
                                data,
                            },
                        );
                    }
                }
                Effect::ReportClean { pg, disk, epoch } => {
                    if self.managed(node) {
                        let d = 1 + self.rng.below(20);
                        self.at(
                            d,
                            Ev::Report {
                                pg,
                                disk,
                                reporter: node,
                                epoch,
                            },
                        );
                    }
                }
                // Staging is the driver's optimisation: nothing to model.
                Effect::Stage { .. } => {}
                Effect::NeedMap => {
                    if self.managed(node) {
                        let d = 1 + self.rng.below(20);
                        self.at(d, Ev::MapTo(node));
                    }
                }
            }
        }
    }

    fn feed(&mut self, node: u32, input: Input<Data>) {
        if !self.node(node).alive {
            return;
        }
        let n = self.node(node);
        n.rep.handle(input);
        let fx = n.rep.take_effects();

        // The disk forgets what every member holds durably (the daemon
        // does this once per tick; at once here).
        for (_, pg, t) in n.rep.log_trims() {
            n.disk.log.trim(pg, t);
        }
        self.effects(node, fx);
    }

    fn run(&mut self) -> Result<(), String> {
        let end_faults = FAULT_PHASE_MS;
        let mut healed = false;
        loop {
            let Some(Reverse((t, _, slot))) = self.events.pop() else {
                return Err("no events left".into());
            };
            self.now = t;
            if !healed && t >= end_faults {
                healed = true;
                self.heal();
            }
            if healed && self.quiet() {
                return self.check_final();
            }
            if t > end_faults + HEAL_LIMIT_MS {
                let dirty: Vec<String> = self
                    .map
                    .pg_states
                    .iter()
                    .map(|s| format!("{s:?}"))
                    .collect();
                let mut detail = String::new();
                for pg in 0..PGS {
                    for d in &self.map.pgs[pg as usize] {
                        detail += &format!(
                            "\n  pg {pg} disk {d}: {}",
                            self.nodes[*d as usize - 1].rep.describe(pg, *d)
                        );
                    }
                }
                return Err(format!(
                    "no progress after healing: {detail}\nclients {:?}, states {dirty:?}, up {:?}",
                    self.clients
                        .iter()
                        .map(|c| c.op.is_some())
                        .collect::<Vec<_>>(),
                    self.map.disks.iter().map(|d| d.up).collect::<Vec<_>>()
                ));
            }
            let ev = self.slots[slot].take().expect("event once");
            self.step(ev)?;
        }
    }

    /// Everything healed, every group clean, every client idle after having
    /// done some work since the heal.
    fn quiet(&self) -> bool {
        self.map.disks.iter().all(|d| d.up)
            && self.map.pgs.iter().all(|s| s.len() == 3)
            && self
                .map
                .pg_states
                .iter()
                .all(|s| s.iter().all(|c| *c == CopyState::UpToDate))
            && self.clients.iter().all(|c| c.done >= 3 && c.op.is_none())
            && self
                .nodes
                .iter()
                .all(|n| n.rep.epoch() == self.map.epoch && n.rep.idle())
            && self.nodes.iter().all(|n| n.disk.corrupt.is_empty())
    }

    fn heal(&mut self) {
        self.faults = false;
        self.log.push(format!("{} heal", self.now));
        for id in 1..=NODES {
            let n = self.node(id);
            n.partitioned = false;
            n.isolated = false;
            if !n.alive {
                self.restart(id);
            }
        }
        for c in &mut self.clients {
            c.done = 0;
        }
        for id in 1..=NODES {
            self.at(1, Ev::MapTo(id));
        }
    }

    fn restart(&mut self, id: u32) {
        self.log.push(format!("{} restart {id}", self.now));
        let volatile_logs = self.volatile_logs;
        let n = self.node(id);
        n.alive = true;
        n.incarnation += 1;
        let (pushes_max, push_regions) = (n.rep_pushes_max, n.rep_push_regions);
        // The process being replaced was itself a restarted one.
        let old =
            (n.incarnation > 2).then_some((n.rep.stats.delta_recoveries, n.rep.stats.full_resyncs));
        n.rep = Replicator::new([id]);
        if let Some((d, f)) = old {
            self.restarted_recoveries.0 += d;
            self.restarted_recoveries.1 += f;
        }
        let n = self.node(id);
        if !volatile_logs {
            n.rep.recover_log(id, n.disk.recovered_log());
            for (pg, trim, floor, complete) in n.disk.log.recovered_states() {
                n.rep.recover_log_state(id, pg, trim, floor, complete);
            }
        }
        n.rep.set_pushes_max(pushes_max);
        n.rep.set_push_regions(push_regions);
        let inc = n.incarnation;
        // Registration: a new process lost what was not durable.
        let d = &mut self.map.disks[id as usize - 1];
        d.incarnation = inc;
        d.up = true;
        d.out = false;
        self.map.nodes[id as usize - 1].up = true;
        self.last_seen[id as usize] = self.now;
        let pgs = self.map.pgs.clone();
        outdate_disk(&pgs, &mut self.map.pg_states, id);
        self.bump();
        self.at(TICK_MS, Ev::Tick(id));
    }

    fn step(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::Deliver(m) => {
                let to = m.to;
                if let Some(tb) = trace_block() {
                    let show = match &m.body {
                        Body::Replicate { update, .. } => blocks(&update.extent).any(|b| b == tb),
                        _ => m.pg == tb.0 % PGS,
                    };
                    if show {
                        println!(
                            "{} deliver {} -> {} epoch {} (reachable {}): {:?}",
                            self.now,
                            m.from,
                            to,
                            m.epoch,
                            self.reachable(to) && self.reachable(m.from),
                            match &m.body {
                                Body::Replicate {
                                    update,
                                    committed,
                                    trim,
                                    ..
                                } => format!(
                                    "replicate {:?} {:?} committed {committed:?} trim {trim:?}",
                                    update.seq, update.extent
                                ),
                                b => format!("{b:?}"),
                            }
                        );
                    }
                }
                if self.reachable(to) && self.reachable(m.from) {
                    self.feed(to, Input::Msg(m));
                }
            }
            Ev::Applied {
                node,
                inc,
                token,
                update,
                log,
            } => {
                if self.node(node).alive && self.node(node).incarnation == inc {
                    if let Some(tb) = trace_block()
                        && blocks(&update.extent).any(|b| b == tb)
                    {
                        println!(
                            "{} node {node} applies {:?} seq {:?} fua {} to {tb:?}",
                            self.now,
                            match &update.change {
                                Change::Write(d) => d
                                    .get(((tb.1 * BLOCK - update.extent.offset) / BLOCK) as usize)
                                    .copied(),
                                _ => Some(0),
                            },
                            update.seq,
                            update.fua
                        );
                    }
                    let disk = &mut self.nodes[node as usize - 1].disk;
                    let mut values = Vec::new();
                    for (i, b) in blocks(&update.extent).enumerate() {
                        let v = match &update.change {
                            Change::Write(d) => d[i],
                            Change::Zeroes | Change::Trim => 0,
                        };
                        disk.put(b, v, update.fua);
                        values.push((b, v));
                    }
                    if let Some(note) = log {
                        disk.log
                            .applied(note, update.seq, update.extent, update.fua, values);
                    }
                    self.feed(node, Input::Applied { token, ok: true });
                }
            }
            Ev::Read {
                node,
                inc,
                token,
                extent,
            } => {
                if self.node(node).alive && self.node(node).incarnation == inc {
                    let disk = &self.nodes[node as usize - 1].disk;
                    if blocks(&extent).any(|b| disk.bad(b)) {
                        self.feed(node, Input::ReadFailed { token });
                        return Ok(());
                    }
                    let data: Data = blocks(&extent).map(|b| disk.get(b)).collect();
                    let data = data.iter().any(|v| *v != 0).then_some(data);
                    self.feed(
                        node,
                        Input::ReadDone {
                            token,
                            extent,
                            data,
                        },
                    );
                }
            }
            Ev::Digest {
                node,
                inc,
                token,
                extent,
            } => {
                if self.node(node).alive && self.node(node).incarnation == inc {
                    let d = digest(&self.nodes[node as usize - 1].disk, &extent);
                    self.feed(node, Input::Digested { token, digest: d });
                }
            }
            Ev::Scrub => {
                for n in 1..=NODES {
                    self.feed(n, Input::Scrub { pg: None });
                }
                let d = SCRUB_EVERY_MS + self.rng.below(SCRUB_EVERY_MS);
                self.at(d, Ev::Scrub);
            }
            Ev::Regions {
                node,
                inc,
                token,
                pg,
            } => {
                if self.node(node).alive && self.node(node).incarnation == inc {
                    let disk = &self.nodes[node as usize - 1].disk;
                    let mut regions = BTreeSet::new();
                    for ((c, b), _) in disk.durable.iter().chain(disk.cache.iter()) {
                        if pg_of_chunk(*c) == pg {
                            let e = Extent {
                                volume_id: 1,
                                chunk_index: *c,
                                offset: b * BLOCK,
                                length: BLOCK,
                            };
                            regions.extend(e.regions());
                        }
                    }
                    self.feed(
                        node,
                        Input::Regions {
                            token,
                            regions: regions.into_iter().collect(),
                        },
                    );
                }
            }
            Ev::Flushed { node, inc, token } => {
                if self.node(node).alive && self.node(node).incarnation == inc {
                    if let Some(tb) = trace_block() {
                        println!(
                            "{} node {node} flush (block {:?} cached {:?})",
                            self.now,
                            tb,
                            self.nodes[node as usize - 1].disk.cache.get(&tb)
                        );
                    }
                    self.nodes[node as usize - 1].disk.flush();
                    self.feed(node, Input::Flushed { token, ok: true });
                }
            }
            Ev::MapTo(n) => {
                if self.managed(n) {
                    let m = Arc::new(self.map.clone());
                    self.feed(n, Input::Map(m));
                }
            }
            Ev::Tick(n) => {
                if self.node(n).alive {
                    if let Some(b) = self.budget_per_tick {
                        self.node(n).rep.grant_push_bytes(b, 2 * b);
                    }
                    self.feed(n, Input::Tick);
                    self.at(TICK_MS, Ev::Tick(n));
                }
            }
            Ev::Health => {
                let mut changed = false;
                for id in 1..=NODES {
                    if self.managed(id) {
                        self.last_seen[id as usize] = self.now;
                        if !self.map.disks[id as usize - 1].up {
                            self.map.disks[id as usize - 1].up = true;
                            self.map.disks[id as usize - 1].out = false;
                            self.map.nodes[id as usize - 1].up = true;
                            changed = true;
                        }
                    } else if !self.map.disks[id as usize - 1].up
                        && !self.map.disks[id as usize - 1].out
                        && self.now - self.last_seen[id as usize] >= GRACE_MS + self.out_after_ms
                    {
                        // Down too long: out, its groups re-placed on the
                        // node that is up and not yet a member.
                        let disks = self.map.disks.clone();
                        let moved =
                            take_out(&mut self.map.pgs, &mut self.map.pg_states, id, |_, set| {
                                disks
                                    .iter()
                                    .find(|d| d.up && !d.out && d.id != id && !set.contains(&d.id))
                                    .map(|d| d.id)
                            });
                        self.map.disks[id as usize - 1].out = true;
                        self.outs += 1;
                        self.log
                            .push(format!("{} out {id}: groups {moved:?} re-placed", self.now));
                        changed = true;
                    } else if self.map.disks[id as usize - 1].up
                        && self.now - self.last_seen[id as usize] >= GRACE_MS
                    {
                        self.log.push(format!("{} down {id}", self.now));
                        self.map.disks[id as usize - 1].up = false;
                        self.map.nodes[id as usize - 1].up = false;
                        let pgs = self.map.pgs.clone();
                        outdate_disk(&pgs, &mut self.map.pg_states, id);
                        changed = true;
                    }
                }
                if changed {
                    self.bump();
                }
                self.at(TICK_MS, Ev::Health);
            }
            Ev::Report {
                pg,
                disk,
                reporter,
                epoch,
            } => {
                let map = self.map.clone();
                if mark_clean(&map, &mut self.map.pg_states, pg, disk, reporter, epoch) {
                    self.log
                        .push(format!("{} clean pg {pg} disk {disk}", self.now));
                    self.bump();
                }
            }
            Ev::Fault => self.fault(),
            Ev::ClientGo(c) => self.client_go(c),
            Ev::ClientTimeout(c, attempt) => {
                if self.clients[c].attempt == attempt && self.clients[c].op.is_some() {
                    self.clients[c].attempt += 1;
                    self.clients[c].map = Arc::new(self.map.clone());
                    self.maybe_abandon(c);
                    self.at(1, Ev::ClientGo(c));
                }
            }
            Ev::Reply {
                client,
                attempt,
                result,
                data,
            } => self.client_reply(client, attempt, result, data)?,
        }
        Ok(())
    }

    fn fault(&mut self) {
        if !self.faults {
            return;
        }
        let bad = |n: &Node| !n.alive || n.partitioned || n.isolated;
        let faulty = self.nodes.iter().filter(|n| bad(n)).count();
        let clean = self.map.disks.iter().all(|d| d.up)
            && self
                .map
                .pg_states
                .iter()
                .all(|s| s.iter().all(|c| *c == CopyState::UpToDate));
        let corrupt = self.nodes.iter().any(|n| !n.disk.corrupt.is_empty());
        if faulty == 0 && clean && self.rng.chance(300) {
            self.corrupt_block();
        } else if corrupt {
            // While a copy is corrupt, no other fault: a crash or partition
            // could leave the corrupt copy the only up-to-date one, and then
            // no good copy exists (data loss, not a protocol failure).
        } else {
            self.other_fault(faulty);
        }
        let d = 100 + self.rng.below(1500);
        self.at(d, Ev::Fault);
    }

    /// Flip the bytes of one written block on one copy, where no other copy
    /// of it is corrupt.
    fn corrupt_block(&mut self) {
        let id = 1 + self.rng.below(u64::from(NODES)) as u32;
        let candidates: Vec<Block> = self.nodes[id as usize - 1]
            .disk
            .durable
            .iter()
            .filter(|(b, v)| **v != 0 && self.map.pgs[pg_of_chunk(b.0) as usize].contains(&id))
            .map(|(b, _)| *b)
            .filter(|b| self.nodes.iter().all(|n| !n.disk.corrupt.contains(b)))
            .collect();
        if candidates.is_empty() {
            return;
        }
        let b = candidates[self.rng.below(candidates.len() as u64) as usize];
        self.log.push(format!("{} corrupt {b:?} on {id}", self.now));
        self.node(id).disk.corrupt.insert(b);
        self.corruptions += 1;
    }

    fn other_fault(&mut self, faulty: usize) {
        let bad = |n: &Node| !n.alive || n.partitioned || n.isolated;
        let mut id = 1 + self.rng.below(u64::from(NODES)) as u32;
        if let Some(i) = self.nodes.iter().position(bad)
            && self.rng.chance(600)
        {
            id = i as u32 + 1;
        }
        let n = &self.nodes[id as usize - 1];
        match (n.alive, n.partitioned || n.isolated) {
            (false, _) => self.restart(id),
            (true, true) => {
                self.log.push(format!("{} unpartition {id}", self.now));
                self.node(id).partitioned = false;
                self.node(id).isolated = false;
            }
            // At most one node faulty at a time: with three copies and
            // min_replicas 2 the cluster then always has a quorum to resume.
            (true, false) if faulty == 0 => {
                if self.rng.chance(500) {
                    self.log.push(format!("{} crash {id}", self.now));
                    let mut rng = Rng(self.rng.next());
                    let n = self.node(id);
                    n.alive = false;
                    n.disk.crash(&mut rng);
                    self.crashes.push(self.now);
                    // Its links close: the others notice at once, as the
                    // daemon's peer links do (`Input::MemberLost`).
                    for other in 1..=NODES {
                        if other != id {
                            self.feed(other, Input::MemberLost { disk: id });
                        }
                    }
                    if let Some(tb) = trace_block() {
                        println!(
                            "{} node {id} crash: block {:?} now {}",
                            self.now,
                            tb,
                            self.nodes[id as usize - 1].disk.get(tb)
                        );
                    }
                } else if self.rng.chance(500) {
                    self.log.push(format!("{} partition {id}", self.now));
                    self.node(id).partitioned = true;
                } else {
                    self.log
                        .push(format!("{} isolate {id} from the manager", self.now));
                    self.node(id).isolated = true;
                }
            }
            _ => {}
        }
    }

    fn client_go(&mut self, c: usize) {
        if self.clients[c].op.is_none() {
            let chunk = c as u32;
            let first = self.rng.below(u64::from(CHUNK_BLOCKS)) as u32;
            let n = 1 + self.rng.below(u64::from((CHUNK_BLOCKS - first).min(8))) as u32;
            let extent = Extent {
                volume_id: 1,
                chunk_index: chunk,
                offset: first * BLOCK,
                length: n * BLOCK,
            };
            let r = self.rng.below(100);
            let op = if self.clients[c].cas_refresh {
                self.clients[c].cas_refresh = false;
                COp::Read {
                    extent: counter_extent(),
                }
            } else if r >= 92 {
                let id = self.next_write;
                self.next_write += 1;
                self.history
                    .entry(counter_block())
                    .or_default()
                    .issued
                    .insert(id, self.now);
                COp::Cas {
                    id,
                    expect: self.clients[c].cas_seen,
                }
            } else if r < 60 {
                let id = self.next_write;
                self.next_write += 1;
                for b in blocks(&extent) {
                    self.history
                        .entry(b)
                        .or_default()
                        .issued
                        .insert(id, self.now);
                }
                COp::Write {
                    extent,
                    id,
                    fua: self.rng.chance(200),
                }
            } else if r < 82 {
                COp::Read { extent }
            } else {
                COp::Flush
            };
            self.clients[c].op = Some(op);
        }
        let op = self.clients[c].op.clone().expect("op");
        let attempt = self.clients[c].attempt;
        let token = attempt << 8 | c as u64;
        self.at(CLIENT_TIMEOUT_MS, Ev::ClientTimeout(c, attempt));
        let map = self.clients[c].map.clone();
        match op {
            COp::Flush => {
                // The gateway flushes every disk that is up, directly.
                for id in 1..=NODES {
                    if self.reachable(id) {
                        self.nodes[id as usize - 1].disk.flush();
                    }
                }
                self.at(
                    1,
                    Ev::Reply {
                        client: c,
                        attempt,
                        result: ClientResult::Ok,
                        data: None,
                    },
                );
            }
            COp::Cas { id, expect } => {
                let extent = counter_extent();
                let pg = pg_of_chunk(extent.chunk_index);
                let Some(p) = map.primary(pg) else {
                    return self.retry_later(c);
                };
                if !self.reachable(p) {
                    return;
                }
                self.feed(
                    p,
                    Input::CompareAndWrite {
                        pg,
                        disk: p,
                        client: token,
                        extent,
                        compare: vec![expect],
                        data: vec![id],
                        token: id,
                        fua: true,
                    },
                );
            }
            COp::Write { extent, id, fua } => {
                let pg = pg_of_chunk(extent.chunk_index);
                let Some(p) = map.primary(pg) else {
                    return self.retry_later(c);
                };
                if !self.reachable(p) {
                    return; // connection error: the timeout retries
                }
                let data = vec![id; (extent.length / BLOCK) as usize];
                self.feed(
                    p,
                    Input::Client {
                        pg,
                        disk: p,
                        client: token,
                        extent,
                        change: Change::Write(data),
                        fua,
                    },
                );
            }
            COp::Read { extent } => {
                let pg = pg_of_chunk(extent.chunk_index);
                let Some(p) = map.primary(pg) else {
                    return self.retry_later(c);
                };
                if !self.reachable(p) {
                    return;
                }
                let n = &self.nodes[p as usize - 1];
                if n.rep.read_check(pg, p) == ReadCheck::Retry {
                    self.at(
                        1,
                        Ev::Reply {
                            client: c,
                            attempt,
                            result: ClientResult::Retry,
                            data: None,
                        },
                    );
                } else if blocks(&extent).any(|b| n.disk.bad(b)) {
                    // A block failed its CRC: the daemon asks for a repair
                    // and answers once it is done.
                    self.feed(
                        p,
                        Input::Repair {
                            pg,
                            disk: p,
                            client: token,
                            extent,
                        },
                    );
                } else {
                    let data: Data = blocks(&extent).map(|b| n.disk.get(b)).collect();
                    self.at(
                        1,
                        Ev::Reply {
                            client: c,
                            attempt,
                            result: ClientResult::Ok,
                            data: Some(data),
                        },
                    );
                }
            }
        }
    }

    /// Sometimes a client gives up on a write (its gateway died mid-write)
    /// and moves on: the write may or may not have landed anywhere.
    fn maybe_abandon(&mut self, c: usize) {
        if !self.faults || !self.rng.chance(200) {
            return;
        }
        if let Some(COp::Write { extent, id, .. }) = self.clients[c].op.clone() {
            for b in blocks(&extent) {
                let h = self.history.entry(b).or_default();
                let t = h.issued[&id];
                h.abandoned.push((id, t));
            }
            self.clients[c].op = None;
        }
    }

    fn retry_later(&mut self, c: usize) {
        self.maybe_abandon(c);
        let cl = &mut self.clients[c];
        cl.attempt += 1;
        cl.map = Arc::new(self.map.clone());
        let d = 20 + self.rng.below(50);
        self.at(d, Ev::ClientGo(c));
    }

    fn client_reply(
        &mut self,
        c: usize,
        attempt: u64,
        result: ClientResult,
        data: Option<Data>,
    ) -> Result<(), String> {
        if self.clients[c].attempt != attempt || self.clients[c].op.is_none() {
            return Ok(());
        }
        match result {
            ClientResult::Retry => {
                self.retry_later(c);
                return Ok(());
            }
            ClientResult::Failed => return Err(format!("client {c}: operation failed")),
            ClientResult::Miscompare(_) => {
                let Some(COp::Cas { id, .. }) = self.clients[c].op.take() else {
                    return Err(format!("client {c}: a miscompare without a compare"));
                };
                // Nothing written, except where a resend reached a process
                // that no longer knew the token (a restart) while the
                // first attempt's write stands: the checker lets it be.
                let h = self.history.entry(counter_block()).or_default();
                let t = h.issued[&id];
                h.abandoned.push((id, t));
                self.cas_miscompares += 1;
                let cl = &mut self.clients[c];
                cl.attempt += 1;
                cl.cas_refresh = true;
                let d = self.rng.below(10);
                self.at(d, Ev::ClientGo(c));
                return Ok(());
            }
            ClientResult::Ok => {}
        }
        let op = self.clients[c].op.take().expect("op");
        self.clients[c].attempt += 1;
        self.clients[c].done += 1;
        match op {
            COp::Cas { id, expect } => {
                // Two successful compare-and-writes from one value: one of
                // them overwrote the other's write without seeing it (a
                // FUA write is never lost, and every value is written
                // once).
                if let Some(other) = self.cas_from.insert(expect, id) {
                    return Err(format!(
                        "lost update: compare-and-writes {other} and {id} both replaced {expect}"
                    ));
                }
                self.cas_ok += 1;
                let h = self.history.entry(counter_block()).or_default();
                let issued = h.issued[&id];
                h.acked.push((id, issued, self.now));
                h.durable_upto = Some(h.acked.len() - 1);
                self.clients[c].cas_seen = id;
            }
            COp::Write { extent, id, fua } => {
                for b in blocks(&extent) {
                    let h = self.history.entry(b).or_default();
                    let issued = h.issued[&id];
                    h.acked.push((id, issued, self.now));
                    if fua {
                        h.durable_upto = Some(h.acked.len() - 1);
                    }
                }
            }
            COp::Flush => {
                for h in self.history.values_mut() {
                    if !h.acked.is_empty() {
                        h.durable_upto = Some(h.acked.len() - 1);
                    }
                }
            }
            COp::Read { extent } => {
                let data = data.expect("read data");
                if extent == counter_extent() {
                    self.clients[c].cas_seen = data[0];
                }
                for (b, v) in blocks(&extent).zip(data) {
                    let ok = v == 0
                        || self
                            .history
                            .get(&b)
                            .is_some_and(|h| h.issued.contains_key(&v));
                    if !ok {
                        return Err(format!("read of {b:?} returned {v}, never written there"));
                    }
                }
            }
        }
        let d = self.rng.below(10);
        self.at(d, Ev::ClientGo(c));
        Ok(())
    }

    fn check_final(&self) -> Result<(), String> {
        // Copies that verify should never differ: a scrub that finds one
        // repairs a divergence the protocol let through. Known cause (see
        // docs/replication.md, "Not done yet"): a primary and the replica
        // that logged its last change both crash before the change is
        // acknowledged; logs are in memory, so nobody remembers the change
        // and the old primary's copy keeps it when it returns. Counted and
        // printed; TESSERA_SIM_STRICT_SCRUB=1 fails on it.
        let mismatches = self.mismatches();
        if mismatches > 0 && std::env::var("TESSERA_SIM_STRICT_SCRUB").is_ok() {
            return Err(format!(
                "scrub found {mismatches} copies that verify but differ"
            ));
        }
        for c in 0..=CLIENTS as u32 {
            let pg = pg_of_chunk(c);
            for b in 0..CHUNK_BLOCKS {
                let blk = (c, b);
                let values: Vec<u64> = self.map.pgs[pg as usize]
                    .iter()
                    .map(|d| self.nodes[*d as usize - 1].disk.get(blk))
                    .collect();
                if values.iter().any(|v| *v != values[0]) {
                    return Err(format!("copies of {blk:?} differ: {values:?}"));
                }
                let v = values[0];
                let h = self.history.get(&blk).cloned().unwrap_or_default();
                // A crash after the first write no FUA/FLUSH made durable
                // may lose that write and later ones (volatile cache).
                let first_loose = h.durable_upto.map_or(0, |d| d + 1);
                let loss_possible = h
                    .acked
                    .get(first_loose)
                    .is_some_and(|a| self.crashes.iter().any(|c| *c > a.2));
                // The oldest acknowledged write the block may still hold.
                let base = if loss_possible {
                    h.durable_upto
                } else {
                    h.acked.len().checked_sub(1)
                };
                let base_issued = base.map_or(0, |b| h.acked[b].1);
                // With a loss possible and nothing durable, any acknowledged
                // write may have survived the crash (or none of them).
                let any_acked = loss_possible && h.durable_upto.is_none();
                let allowed = base.is_some_and(|b| h.acked[b..].iter().any(|a| a.0 == v))
                    || any_acked && h.acked.iter().any(|a| a.0 == v)
                    // With no acknowledged write to be newer than, any
                    // abandoned one may stay (even one issued at time 0).
                    || h.abandoned
                        .iter()
                        .any(|(w, t)| *w == v && (base.is_none() || *t > base_issued))
                    || (v == 0 && base.is_none());
                // The shared counter: compare-and-writes run concurrently
                // and one may be answered after a later one replaced its
                // value (a resend answered from its token), so the order of
                // acknowledgements is not the order of the writes. It must
                // hold a value no successful compare-and-write replaced.
                let allowed = if blk == counter_block() {
                    let known = v == 0
                        || h.acked.iter().any(|a| a.0 == v)
                        || h.abandoned.iter().any(|a| a.0 == v);
                    known && !self.cas_from.contains_key(&v)
                } else {
                    allowed
                };
                if !allowed {
                    return Err(format!(
                        "block {blk:?} holds {v}; acknowledged (id, issued, acked) {:?}, durable up to {:?}, abandoned {:?}, crashes at {:?}",
                        h.acked, h.durable_upto, h.abandoned, self.crashes
                    ));
                }
            }
        }
        Ok(())
    }
}

impl World {
    fn mismatches(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| n.rep.stats.scrub_mismatches)
            .sum()
    }
}

/// `TESSERA_SIM_TRACE=chunk:block` prints every change of one block.
fn trace_block() -> Option<Block> {
    static TRACE: std::sync::OnceLock<Option<Block>> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| {
        let s = std::env::var("TESSERA_SIM_TRACE").ok()?;
        let (c, b) = s.split_once(':')?;
        Some((c.parse().ok()?, b.parse().ok()?))
    })
}

/// What one seed exercised: corruptions injected, copies repaired, scrub
/// findings, and copies that verified but differed.
#[derive(Default)]
struct Tally {
    corruptions: u64,
    repairs: u64,
    scrub_errors: u64,
    mismatches: u64,
    seeds_with_mismatches: u64,
    /// Seeds that took a node out and re-placed its groups.
    seeds_with_out: u64,
    /// Seeds in which a restarted last up-to-date copy took changes back
    /// from the other members, and the bytes it took.
    seeds_with_reclaim: u64,
    reclaimed_bytes: u64,
    /// COMPARE AND WRITEs that wrote and that miscompared.
    cas_ok: u64,
    cas_miscompares: u64,
    /// Recoveries of members started by processes that replaced crashed
    /// ones: by delta and by full resync.
    restarted_delta: u64,
    restarted_full: u64,
}

fn run_seed(seed: u64) -> Result<(), String> {
    run_seed_tally(seed, &mut Tally::default())
}

fn run_seed_tally(seed: u64, tally: &mut Tally) -> Result<(), String> {
    let mut w = World::new(seed);
    let r = w.run();
    tally.corruptions += w.corruptions;
    tally.repairs += w.nodes.iter().map(|n| n.rep.stats.repairs).sum::<u64>();
    tally.scrub_errors += w
        .nodes
        .iter()
        .map(|n| n.rep.stats.scrub_errors)
        .sum::<u64>();
    tally.mismatches += w.mismatches();
    tally.seeds_with_mismatches += u64::from(w.mismatches() > 0);
    tally.seeds_with_out += u64::from(w.outs > 0);
    let reclaimed: u64 = w.nodes.iter().map(|n| n.rep.stats.reclaimed_bytes).sum();
    tally.seeds_with_reclaim += u64::from(reclaimed > 0);
    tally.reclaimed_bytes += reclaimed;
    tally.cas_ok += w.cas_ok;
    tally.cas_miscompares += w.cas_miscompares;
    let (mut d, mut f) = w.restarted_recoveries;
    for n in w.nodes.iter().filter(|n| n.incarnation > 1) {
        d += n.rep.stats.delta_recoveries;
        f += n.rep.stats.full_resyncs;
    }
    tally.restarted_delta += d;
    tally.restarted_full += f;
    if std::env::var("TESSERA_SIM_VERBOSE").is_ok() {
        let acked: usize = w.history.values().map(|h| h.acked.len()).sum();
        println!(
            "seed {seed}: t={}ms epoch={} block-acks={acked} recovery={:?} events={:?}",
            w.now,
            w.map.epoch,
            w.nodes
                .iter()
                .map(|n| n.rep.stats.clone())
                .collect::<Vec<_>>(),
            w.log
        );
    }
    r.map_err(|e| {
        let tail: Vec<&String> = w.log.iter().rev().take(30).collect();
        format!("seed {seed}: {e}\nlast events (newest first): {tail:?}")
    })
}

/// Seeds that fail on a protocol bug not fixed yet, skipped by batches
/// (`TESSERA_SEED=n` still replays one; `TESSERA_SIM_KEEP_GOING=1` lists
/// every failing seed of a batch). None now: seed 11149 (a restarted last
/// up-to-date copy resynced its stale block over a write a FLUSH had made
/// durable on the others) passes since restarted primaries take back what
/// the other members vouch for (`Reclaim`, docs/replication.md).
const KNOWN_FAILING: [u64; 0] = [];

// Proves the replication protocol keeps every acknowledged write, never
// returns unwritten data, resumes I/O and converges, over many seeded
// schedules with message loss, duplication, reordering, partitions and
// crashes that lose unflushed writes. A failure prints its seed;
// TESSERA_SEED=<seed> replays exactly that schedule.
#[test]
fn simulation() {
    if let Ok(s) = std::env::var("TESSERA_SEED") {
        let seed: u64 = s.parse().expect("TESSERA_SEED is a number");
        if let Err(e) = run_seed(seed) {
            panic!("{e}");
        }
        return;
    }
    let seeds: u64 = std::env::var("TESSERA_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let budget = std::time::Duration::from_secs(
        std::env::var("TESSERA_SIM_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    );
    let start = std::time::Instant::now();
    let mut ran = 0;
    let mut tally = Tally::default();
    for seed in 0..seeds {
        if start.elapsed() > budget {
            break;
        }
        if KNOWN_FAILING.contains(&seed) {
            println!("seed {seed}: skipped, a known open protocol bug (docs/replication.md)");
            continue;
        }
        let r = run_seed_tally(seed, &mut tally);
        if let Err(e) = &r
            && std::env::var("TESSERA_SIM_KEEP_GOING").is_ok()
        {
            println!("FAIL seed {seed}: {}", e.lines().next().unwrap_or(""));
            ran += 1;
            continue;
        }
        if let Err(e) = r {
            panic!(
                "{e}\nreplay: TESSERA_SEED={seed} cargo test -p tessera-storage --lib replication::sim"
            );
        }
        ran += 1;
    }
    println!(
        "simulation: {ran} seeds passed in {:?}; {} blocks corrupted, {} copies repaired, {} bad copies found by scrubs, {} copies that verified but differed (in {} seeds)",
        start.elapsed(),
        tally.corruptions,
        tally.repairs,
        tally.scrub_errors,
        tally.mismatches,
        tally.seeds_with_mismatches
    );
    println!(
        "simulation: {} seeds took a node out and rebuilt its groups; in {} a restarted last up-to-date copy took back {} bytes from the others",
        tally.seeds_with_out, tally.seeds_with_reclaim, tally.reclaimed_bytes
    );
    println!(
        "simulation: processes restarted from their disks started {} delta recoveries and {} full resyncs of other members",
        tally.restarted_delta, tally.restarted_full
    );
    println!(
        "simulation: {} compare-and-writes wrote, {} miscompared",
        tally.cas_ok, tally.cas_miscompares
    );
    assert!(tally.cas_ok > 0, "no compare-and-write was exercised");
    assert!(
        tally.corruptions > 0 && tally.repairs > 0,
        "no corruption was exercised"
    );
    assert!(ran >= 20, "too few seeds ran in the time budget: {ran}");
    assert!(tally.seeds_with_out > 0, "no seed exercised re-placement");
}
