//! Scripted scenarios of the replication state machine: three daemons, a
//! manager that changes the map when told to, a network that delivers in
//! order and holds everything to and from a stopped daemon (SIGSTOP), and
//! disks with a volatile cache. Unlike the simulation (`sim.rs`), nothing is
//! random: each test builds one exact schedule and checks what recovery
//! pushed, not only that the copies converged.

use super::model_log::ModelLog;
use super::*;
use tessera_wire::map::{
    DiskEntry, FailureDomain, NodeEntry, PoolEntry, VolumeEntry, mark_clean, outdate_disk,
};

/// Daemons; the groups are placed on the first `MEMBERS`, the last one is
/// a spare (a disk a group may grow onto).
const NODES: u32 = 4;
const MEMBERS: u32 = 3;
const PGS: u32 = 3;
const BLOCK: u32 = 4096;
/// 16 regions of 64 KiB per chunk.
const CHUNK_BYTES: u32 = 16 * REGION_BYTES;
const CHUNKS: u32 = 12;

type Data = Vec<u64>;
type Block = (u32, u32); // (chunk, block)

/// A disk with a volatile cache (a crash loses it).
#[derive(Default)]
struct Disk {
    durable: BTreeMap<Block, u64>,
    cache: BTreeMap<Block, u64>,
    /// Blocks that fail their CRC: a read of them fails, and so does a
    /// write that is not whole blocks and has to merge with one.
    bad: BTreeSet<Block>,
    /// Group-log entries, durable with their change as in the engine.
    log: ModelLog,
}

impl Disk {
    /// A crash (or kill -9) of the daemon: the cache is lost.
    fn lose_cache(&mut self) {
        self.cache.clear();
        self.log.lost_cache();
    }

    fn flush(&mut self) {
        let c = std::mem::take(&mut self.cache);
        self.durable.extend(c);
        self.log.flushed();
    }

    /// What a new process gets back (`Replicator::recover_log`).
    fn recovered_log(&self) -> Vec<(u32, Seq, Extent, Option<u64>)> {
        self.log.recovered()
    }

    fn get(&self, b: Block) -> u64 {
        self.cache
            .get(&b)
            .or_else(|| self.durable.get(&b))
            .copied()
            .unwrap_or(0)
    }
}

struct Node {
    rep: Replicator<Data>,
    disk: Disk,
    stopped: bool,
    /// Inputs that reached it while stopped, in order.
    held: VecDeque<Input<Data>>,
}

impl Node {
    /// The disk forgets the log entries every member holds durably (the
    /// daemon does this once per tick; at once here).
    fn trim_logs(&mut self) {
        for (_, pg, t) in self.rep.log_trims() {
            self.disk.log.trim(pg, t);
        }
    }
}

/// Chunk `c` belongs to group `c % PGS`.
fn pg_of_chunk(c: u32) -> u32 {
    c % PGS
}

/// The blocks an extent touches (a partial block counts whole: the model
/// keeps one value per block).
fn blocks(e: &Extent) -> impl Iterator<Item = Block> + '_ {
    (e.offset / BLOCK..e.end().div_ceil(BLOCK)).map(move |b| (e.chunk_index, b))
}

/// The region `index` of chunk `chunk`, as a 4 KiB write extent at its start.
fn block_of(chunk: u32, index: u32) -> Extent {
    Extent {
        volume_id: 1,
        chunk_index: chunk,
        offset: index * REGION_BYTES,
        length: BLOCK,
    }
}

fn region(chunk: u32, index: u32) -> Region {
    Region {
        volume_id: 1,
        chunk_index: chunk,
        index,
    }
}

/// Four disks, three groups; group `g` is placed on disks `g+1, g+2, g+3`
/// (mod 3), so each of disks 1-3 leads one group and is second and third in
/// the others; disk 4 holds no group.
fn initial_map() -> ClusterMap {
    ClusterMap {
        epoch: 1,
        cluster_id: "scenario".into(),
        pg_count: PGS,
        nodes: (1..=NODES)
            .map(|id| NodeEntry {
                id,
                addr: format!("n{id}"),
                up: true,
                zone: String::new(),
                rack: String::new(),
                host: String::new(),
            })
            .collect(),
        disks: (1..=NODES)
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
            .collect(),
        pgs: (0..PGS)
            .map(|pg| (0..MEMBERS).map(|i| (pg + i) % MEMBERS + 1).collect())
            .collect(),
        pg_states: vec![vec![CopyState::UpToDate; MEMBERS as usize]; PGS as usize],
        volumes: vec![VolumeEntry {
            id: 1,
            name: "v".into(),
            size_bytes: u64::from(CHUNK_BYTES) * u64::from(CHUNKS),
            chunk_size_bytes: u64::from(CHUNK_BYTES),
            block_size: 4096,
            pool_id: 1,
        }],
        next_volume_id: 2,
        pools: vec![PoolEntry {
            id: 1,
            name: "p".into(),
            replicas: MEMBERS,
            min_replicas: 2,
            failure_domain: FailureDomain::Host,
            chunk_size_bytes: u64::from(CHUNK_BYTES),
            pg_base: 0,
            pg_count: PGS,
        }],
    }
}

struct Cluster {
    nodes: Vec<Node>,
    map: ClusterMap,
    /// Inputs to deliver, in order: (node, input).
    queue: VecDeque<(u32, Input<Data>)>,
    replies: BTreeMap<u64, ClientResult>,
    next_client: u64,
    next_value: u64,
    /// Extents each node read for pushes (recovery and peering; nothing
    /// else reads in these scenarios), in order.
    pushed: Vec<(u32, Extent)>,
}

impl Cluster {
    fn new() -> Cluster {
        let mut map = initial_map();
        map.stamp_up_since(None);
        let mut c = Cluster {
            nodes: (1..=NODES)
                .map(|id| Node {
                    rep: Replicator::new([id]),
                    disk: Disk::default(),
                    stopped: false,
                    held: VecDeque::new(),
                })
                .collect(),
            map,
            queue: VecDeque::new(),
            replies: BTreeMap::new(),
            next_client: 1,
            next_value: 1,
            pushed: Vec::new(),
        };
        c.publish();
        c.run();
        c
    }

    fn node(&mut self, id: u32) -> &mut Node {
        &mut self.nodes[id as usize - 1]
    }

    /// The manager publishes the current map to every daemon (a stopped
    /// one gets it when it resumes, as a long poll would return then).
    fn publish(&mut self) {
        let m = Arc::new(self.map.clone());
        for id in 1..=NODES {
            self.queue.push_back((id, Input::Map(m.clone())));
        }
    }

    fn bump(&mut self) {
        self.map.epoch += 1;
        self.map.stamp_up_since(None);
        self.publish();
    }

    /// Deliver the first queued input only (to a running daemon).
    fn step(&mut self) {
        if let Some((id, input)) = self.queue.pop_front() {
            let n = self.node(id);
            if n.stopped {
                n.held.push_back(input);
                return;
            }
            n.rep.handle(input);
            let fx = n.rep.take_effects();
            n.trim_logs();
            for e in fx {
                self.effect(id, e);
            }
        }
    }

    /// Deliver everything queued, and what that causes, until nothing moves.
    fn run(&mut self) {
        while let Some((id, input)) = self.queue.pop_front() {
            let n = self.node(id);
            if n.stopped {
                n.held.push_back(input);
                continue;
            }
            n.rep.handle(input);
            let fx = n.rep.take_effects();
            n.trim_logs();
            for e in fx {
                self.effect(id, e);
            }
        }
    }

    fn effect(&mut self, id: u32, e: Effect<Data>) {
        match e {
            Effect::Send(m) => {
                // What a stopped daemon sends is still in its socket buffers
                // when it resumes, and so is what others send to it.
                self.queue.push_back((m.to, Input::Msg(m)));
            }
            Effect::ForgetLog { pg, .. } => {
                self.node(id).disk.log.forget(pg);
            }
            Effect::LogEntries { pg, entries, .. } => {
                self.node(id).disk.log.add(pg, entries);
            }
            Effect::LogFloor {
                pg,
                floor,
                complete,
                ..
            } => {
                self.node(id).disk.log.floor(pg, floor, complete);
            }
            Effect::Apply {
                token, update, log, ..
            } => {
                let disk = &mut self.node(id).disk;
                let partial =
                    update.extent.offset % BLOCK != 0 || update.extent.length % BLOCK != 0;
                if partial && blocks(&update.extent).any(|b| disk.bad.contains(&b)) {
                    self.queue.push_back((id, Input::ApplyBadBlock { token }));
                    return;
                }
                let mut values = Vec::new();
                for (i, b) in blocks(&update.extent).enumerate() {
                    if !partial {
                        disk.bad.remove(&b);
                    }
                    let v = match &update.change {
                        Change::Write(d) => d[i],
                        Change::Zeroes | Change::Trim => 0,
                    };
                    if update.fua {
                        disk.cache.remove(&b);
                        disk.durable.insert(b, v);
                    } else {
                        disk.cache.insert(b, v);
                    }
                    values.push((b, v));
                }
                if let Some(note) = log {
                    disk.log
                        .applied(note, update.seq, update.extent, update.fua, values);
                }
                self.queue
                    .push_back((id, Input::Applied { token, ok: true }));
            }
            Effect::Read { token, extent, .. } => {
                self.pushed.push((id, extent));
                let disk = &self.node(id).disk;
                if blocks(&extent).any(|b| disk.bad.contains(&b)) {
                    self.queue.push_back((id, Input::ReadFailed { token }));
                    return;
                }
                let data: Data = blocks(&extent).map(|b| disk.get(b)).collect();
                let data = data.iter().any(|v| *v != 0).then_some(data);
                self.queue.push_back((
                    id,
                    Input::ReadDone {
                        token,
                        extent,
                        data,
                    },
                ));
            }
            Effect::ListRegions { token, pg, .. } => {
                let disk = &self.node(id).disk;
                let regions: BTreeSet<Region> = disk
                    .durable
                    .keys()
                    .chain(disk.cache.keys())
                    .filter(|(c, _)| pg_of_chunk(*c) == pg)
                    .map(|(c, b)| region(*c, b * BLOCK / REGION_BYTES))
                    .collect();
                self.queue.push_back((
                    id,
                    Input::Regions {
                        token,
                        regions: regions.into_iter().collect(),
                    },
                ));
            }
            Effect::Flush { token, .. } => {
                self.node(id).disk.flush();
                self.queue
                    .push_back((id, Input::Flushed { token, ok: true }));
            }
            Effect::Digest { token, extent, .. } => {
                let disk = &self.node(id).disk;
                let digest = if blocks(&extent).any(|b| disk.bad.contains(&b)) {
                    Digest::Bad
                } else {
                    Digest::Sum(
                        blocks(&extent)
                            .fold(0x5eed, |h, b| tessera_wire::map::mix64(h ^ disk.get(b))),
                    )
                };
                self.queue
                    .push_back((id, Input::Digested { token, digest }));
            }
            Effect::Reply { client, result } => {
                self.replies.insert(client, result);
            }
            Effect::ReportClean { pg, disk, epoch } => {
                let map = self.map.clone();
                if mark_clean(&map, &mut self.map.pg_states, pg, disk, id, epoch) {
                    self.bump();
                }
            }
            // Staging is the driver's optimisation: nothing to model.
            Effect::Stage { .. } => {}
            Effect::NeedMap => {
                let m = Arc::new(self.map.clone());
                self.queue.push_back((id, Input::Map(m)));
            }
        }
    }

    /// Write one block at the start of region `index` of `chunk` through
    /// the group's primary (as the gateway would); returns the client id.
    fn write(&mut self, chunk: u32, index: u32) -> u64 {
        let pg = pg_of_chunk(chunk);
        let primary = self.map.primary(pg).expect("a primary");
        let client = self.next_client;
        self.next_client += 1;
        let v = self.next_value;
        self.next_value += 1;
        self.queue.push_back((
            primary,
            Input::Client {
                pg,
                disk: primary,
                client,
                extent: block_of(chunk, index),
                change: Change::Write(vec![v]),
                fua: false,
            },
        ));
        self.run();
        client
    }

    /// One tick (100 ms) of every daemon that runs.
    fn tick(&mut self) {
        for id in 1..=NODES {
            self.queue.push_back((id, Input::Tick));
        }
        self.run();
    }

    fn ticks(&mut self, n: usize) {
        for _ in 0..n {
            self.tick();
        }
    }

    fn stop(&mut self, id: u32) {
        self.node(id).stopped = true;
    }

    fn resume(&mut self, id: u32) {
        let n = self.node(id);
        n.stopped = false;
        let held = std::mem::take(&mut n.held);
        for input in held.into_iter().rev() {
            self.queue.push_front((id, input));
        }
        self.run();
    }

    /// The manager declares `id` down: its copies become outdated.
    fn declare_down(&mut self, id: u32) {
        self.map.disks[id as usize - 1].up = false;
        self.map.nodes[id as usize - 1].up = false;
        let pgs = self.map.pgs.clone();
        outdate_disk(&pgs, &mut self.map.pg_states, id);
        self.bump();
        self.run();
    }

    /// Its heartbeats arrive again: up, copies still outdated.
    fn declare_up(&mut self, id: u32) {
        self.map.disks[id as usize - 1].up = true;
        self.map.nodes[id as usize - 1].up = true;
        self.bump();
        self.run();
    }

    /// The daemon crashes (its disk loses what was not flushed) and starts
    /// again as a new process, which registers: a new incarnation, its
    /// copies outdated.
    fn crash_and_restart(&mut self, id: u32) {
        self.restart_unpublished(id, true);
        self.bump();
        self.run();
    }

    /// `crash_and_restart` up to the map that says so (`bump` publishes
    /// it): the new process gets its disk's log entries back only with
    /// `recover` (without: the logs as they were, in memory only).
    fn restart_unpublished(&mut self, id: u32, recover: bool) {
        let n = self.node(id);
        n.disk.lose_cache();
        n.held.clear();
        n.stopped = false;
        n.rep = Replicator::new([id]);
        if recover {
            n.rep.recover_log(id, n.disk.recovered_log());
            for (pg, trim, floor, complete) in n.disk.log.recovered_states() {
                n.rep.recover_log_state(id, pg, trim, floor, complete);
            }
        }
        self.queue.retain(|(to, _)| *to != id);
        let d = &mut self.map.disks[id as usize - 1];
        d.incarnation += 1;
        d.up = true;
        let pgs = self.map.pgs.clone();
        outdate_disk(&pgs, &mut self.map.pg_states, id);
    }

    /// The daemon's process dies (its disk loses what was not flushed) and
    /// nobody has told the manager yet: the map does not change.
    fn die(&mut self, id: u32) {
        let n = self.node(id);
        n.disk.lose_cache();
        n.held.clear();
        n.stopped = true;
        self.queue.retain(|(to, _)| *to != id);
    }

    /// A cluster whose every chunk was written and flushed everywhere.
    fn primed() -> Cluster {
        let mut c = Cluster::new();
        for ch in 0..CHUNKS {
            c.write(ch, 0);
        }
        c.ticks(3);
        c
    }

    /// Node 2 away while every group changes, then node 3 restarted (both
    /// outdated, no recovery push allowed), so node 1 is every group's only
    /// up-to-date copy; then a write to group 0 acknowledged by all three
    /// and flushed on nodes 2 and 3 only (node 1 is about to crash). Its
    /// value.
    fn last_copy_with_a_write_flushed_only_elsewhere(&mut self) -> u64 {
        for ch in 0..CHUNKS {
            self.write(ch, 0);
        }
        self.ticks(3);
        // No recovery push may run (a byte budget of nothing): outdated
        // copies stay outdated.
        for id in 1..=MEMBERS {
            self.node(id).rep.grant_push_bytes(0, 0);
        }
        self.stop(2);
        self.declare_down(2);
        for ch in 0..CHUNKS {
            self.write(ch, 1);
        }
        self.resume(2);
        self.declare_up(2);
        self.crash_and_restart(3);
        for pg in 0..PGS {
            assert_eq!(self.map.primary(pg), Some(1));
            assert_eq!(
                self.map.pg_states[pg as usize]
                    .iter()
                    .filter(|s| **s == CopyState::UpToDate)
                    .count(),
                1
            );
        }
        let v = self.next_value;
        let id = self.write(0, 5);
        assert_eq!(self.replies.get(&id), Some(&ClientResult::Ok));
        // The client's FLUSH reaches nodes 2 and 3, not node 1.
        for id in [2, 3] {
            let disk = &mut self.node(id).disk;
            let cache = std::mem::take(&mut disk.cache);
            disk.durable.extend(cache);
        }
        v
    }

    /// Node 3 away, then one write of group 0 acknowledged by its primary
    /// (node 1) and node 2, flushed nowhere: its value and block.
    fn unflushed_write_without_node_3(&mut self) -> (u64, Block) {
        self.stop(3);
        self.declare_down(3);
        let v = self.next_value;
        let id = self.write(0, 5);
        assert_eq!(self.replies.get(&id), Some(&ClientResult::Ok));
        (v, (0, 5 * REGION_BYTES / BLOCK))
    }

    /// Node 3 back, everything recovered: every copy of `b` holds `v`.
    fn heal_and_expect(&mut self, b: Block, v: u64) {
        self.resume(3);
        self.declare_up(3);
        self.settle();
        self.assert_converged();
        for id in 1..=MEMBERS {
            assert_eq!(
                self.nodes[id as usize - 1].disk.get(b),
                v,
                "node {id} lost the acknowledged write of {b:?}"
            );
        }
    }

    fn clean(&self) -> bool {
        self.map.disks.iter().all(|d| d.up)
            && self
                .map
                .pg_states
                .iter()
                .all(|s| s.iter().all(|c| *c == CopyState::UpToDate))
    }

    /// Tick until every copy is up to date and every daemon idle.
    fn settle(&mut self) {
        for _ in 0..200 {
            if self.clean()
                && self
                    .nodes
                    .iter()
                    .all(|n| n.rep.idle() && n.rep.epoch() == self.map.epoch)
            {
                return;
            }
            self.tick();
        }
        let mut detail = String::new();
        for pg in 0..PGS {
            for d in &self.map.pgs[pg as usize] {
                detail += &format!(
                    "\n  pg {pg} disk {d}: {}",
                    self.nodes[*d as usize - 1].rep.describe(pg, *d)
                );
            }
        }
        panic!(
            "the cluster did not settle: states {:?}{detail}",
            self.map.pg_states
        );
    }

    /// The distinct regions pushed since `from` (an index into `pushed`).
    fn pushed_since(&self, from: usize) -> BTreeSet<Region> {
        self.pushed[from..]
            .iter()
            .flat_map(|(_, e)| e.regions())
            .collect()
    }

    fn recovery_regions(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| n.rep.stats.recovery_regions)
            .sum()
    }

    /// Every copy of every block written holds the same value.
    fn assert_converged(&self) {
        let mut all: BTreeSet<Block> = BTreeSet::new();
        for n in &self.nodes {
            all.extend(n.disk.durable.keys().chain(n.disk.cache.keys()));
        }
        for b in all {
            let members = &self.map.pgs[pg_of_chunk(b.0) as usize];
            let v: Vec<(u32, u64)> = members
                .iter()
                .map(|m| (*m, self.nodes[*m as usize - 1].disk.get(b)))
                .collect();
            assert!(
                v.iter().all(|x| x.1 == v[0].1),
                "copies of {b:?} differ (disk, value): {v:?}"
            );
        }
    }
}

// Proves the scenario harness itself: writes reach every copy, and a
// stopped replica is recovered once it is back.
#[test]
fn harness_writes_and_recovers() {
    let mut c = Cluster::new();
    for ch in 0..CHUNKS {
        let id = c.write(ch, 0);
        assert_eq!(c.replies.get(&id), Some(&ClientResult::Ok));
    }
    c.stop(2);
    c.declare_down(2);
    for ch in 0..CHUNKS {
        c.write(ch, 1);
    }
    c.resume(2);
    c.declare_up(2);
    c.settle();
    c.assert_converged();
    assert!(c.recovery_regions() >= u64::from(CHUNKS));
}

// Proves delta recovery pushes only the regions a member that was stopped
// (SIGSTOP) missed: not the regions it had applied before it stopped, even
// when no flush round made them durable on it yet (it flushes before it
// says what it holds), neither in the groups whose primary stayed nor in
// the group it led (whose new primary knows only the trim point the old
// one last sent it). The one exception is inherent: the last change of the
// group it led, whose commit the survivors could not know, is made to agree
// by the new primary's peering as a change of its own, which the returning
// member then gets too.
#[test]
fn delta_recovery_pushes_only_what_a_stopped_member_missed() {
    let mut c = Cluster::new();
    // Written and made durable everywhere by flush rounds.
    for ch in 0..CHUNKS {
        c.write(ch, 0);
    }
    c.ticks(3);
    // Written and applied on every copy just before the stop; no flush
    // round covers them yet.
    for ch in 0..CHUNKS {
        c.write(ch, 1);
    }
    c.stop(2);
    c.ticks(2);
    let from = c.pushed.len();
    let rec0 = c.recovery_regions();
    let peer0: u64 = c.nodes.iter().map(|n| n.rep.stats.peering_regions).sum();
    c.declare_down(2);
    // Written while node 2 is away: what it misses.
    for ch in 0..CHUNKS {
        let id = c.write(ch, 2);
        assert_eq!(c.replies.get(&id), Some(&ClientResult::Ok));
    }
    c.ticks(3);
    c.resume(2);
    c.declare_up(2);
    c.settle();
    c.assert_converged();
    // Group 1 (chunks 1, 4, 7, 10) was led by node 2: chunk 10 was its last
    // change before the stop.
    let uncertain = region(10, 1);
    let mut expected: BTreeSet<Region> = (0..CHUNKS).map(|ch| region(ch, 2)).collect();
    expected.insert(uncertain);
    let pushed = c.pushed_since(from);
    let peering = c
        .nodes
        .iter()
        .map(|n| n.rep.stats.peering_regions)
        .sum::<u64>()
        - peer0;
    assert_eq!(pushed, expected);
    assert_eq!(c.recovery_regions() - rec0, u64::from(CHUNKS) + 1);
    // Pushed to node 3's fellow survivor when node 3 took over group 1;
    // nothing when node 2 took group 1 back.
    assert_eq!(peering, 1);
}

// Proves a member that restarts while a flush round waits for it is not
// counted durable by that round: the new process's flush says nothing of
// what the old one had not flushed, so the changes it may have lost stay
// in the primary's log and are recovered, even when its recovery has to
// start over (a second restart) after the new process answered the round.
#[test]
fn a_restarted_member_is_not_credited_by_the_round_it_missed() {
    let mut c = Cluster::new();
    for ch in 0..CHUNKS {
        c.write(ch, 0);
    }
    c.ticks(3);
    // Group 0 (primary 1, then 2, 3): a change applied on node 3's cache.
    c.write(0, 1);
    c.stop(3);
    c.tick(); // a flush round starts; nodes 1 and 2 answer, 3 does not
    // No recovery push may run for now (a byte budget of nothing).
    c.node(1).rep.grant_push_bytes(0, 0);
    c.crash_and_restart(3); // the change is lost with node 3's cache
    c.ticks(6); // the round is sent again; the new process answers it
    c.crash_and_restart(3); // its recovery starts over
    c.node(1).rep.grant_push_bytes(u64::MAX / 2, u64::MAX / 2);
    c.settle();
    c.assert_converged();
}

// Proves logs are still trimmed after a member left the write set while a
// flush round waited for it (the round ends without it, and it stays
// where it was durable), so a later absence recovers only what it missed.
#[test]
fn logs_are_trimmed_after_a_member_left_mid_round() {
    let mut c = Cluster::new();
    for ch in 0..CHUNKS {
        c.write(ch, 0);
    }
    c.ticks(3);
    for ch in 0..CHUNKS {
        c.write(ch, 1);
    }
    c.stop(2);
    c.tick();
    c.declare_down(2);
    for ch in 0..CHUNKS {
        c.write(ch, 2);
    }
    // Node 2 comes back as a new process (it never answers the round).
    c.crash_and_restart(2);
    c.settle();
    for ch in 0..CHUNKS {
        c.write(ch, 3);
    }
    c.ticks(3);
    for pg in 0..PGS {
        let p = c.map.primary(pg).expect("primary");
        assert_eq!(
            c.nodes[p as usize - 1].rep.log_len(pg, p),
            0,
            "group {pg}: log not trimmed at its primary {p}"
        );
    }
    // A later absence of node 3 recovers only what it missed.
    c.stop(3);
    c.declare_down(3);
    let from = c.pushed.len();
    for ch in 0..CHUNKS {
        c.write(ch, 4);
    }
    c.ticks(2);
    c.resume(3);
    c.declare_up(3);
    c.settle();
    c.assert_converged();
    let missed: BTreeSet<Region> = (0..CHUNKS).map(|ch| region(ch, 4)).collect();
    assert_eq!(c.pushed_since(from), missed);
}

// Proves a member that becomes primary again once recovered (it is first
// in placement) does not push regions whose changes were acknowledged
// everywhere: peering reconciles only changes that may be missing on some
// up-to-date copy.
#[test]
fn failback_peering_pushes_nothing_when_nothing_was_in_flight() {
    let mut c = Cluster::new();
    for ch in 0..CHUNKS {
        c.write(ch, 0);
    }
    c.ticks(3);
    c.stop(1);
    c.declare_down(1);
    for ch in 0..CHUNKS {
        c.write(ch, 1);
    }
    c.resume(1);
    c.declare_up(1);
    c.settle();
    // Node 1 leads group 0 again.
    assert_eq!(c.map.primary(0), Some(1));
    let peering: u64 = c.nodes.iter().map(|n| n.rep.stats.peering_regions).sum();
    assert_eq!(peering, 0, "peering pushed {peering} regions");
    c.assert_converged();
}

// Proves contiguous regions to push to one member go in one push (one
// read, one message, one write) of at most PUSH_REGIONS_MAX regions, and
// never more regions in flight than the daemon's limit.
#[test]
fn contiguous_regions_go_in_one_push() {
    for limit in [usize::MAX, 3] {
        let mut c = Cluster::new();
        c.node(1).rep.set_pushes_max(limit);
        c.stop(2);
        c.declare_down(2);
        // Group 0 (primary 1): 20 contiguous regions of chunk 0, and one of
        // chunk 3.
        for i in 0..20 {
            c.write(0, i);
        }
        c.write(3, 5);
        let from = c.pushed.len();
        c.resume(2);
        c.declare_up(2);
        c.settle();
        c.assert_converged();
        let reads: Vec<Extent> = c.pushed[from..]
            .iter()
            .filter(|(n, _)| *n == 1)
            .map(|(_, e)| *e)
            .collect();
        let most = (PUSH_REGIONS_MAX as usize).min(limit) as u32;
        for e in &reads {
            assert!(e.length <= most * REGION_BYTES, "{e:?} over {most} regions");
            assert_eq!(e.offset % REGION_BYTES, 0);
        }
        let pushed: BTreeSet<Region> = reads.iter().flat_map(|e| e.regions()).collect();
        let expected: BTreeSet<Region> = (0..20)
            .map(|i| region(0, i))
            .chain([region(3, 5)])
            .collect();
        assert_eq!(pushed, expected);
        // 20 regions in pushes of `most`, plus the lone one.
        assert_eq!(reads.len() as u32, 20u32.div_ceil(most) + 1, "{reads:?}");
    }
}

// Proves a member added to a group (backfill) while a client change is in
// flight still gets it: the change was sent only to the members of its
// time, and when it is the first write of its region the primary's own
// copy may not hold it yet when the full resync lists the regions to
// push, so the resync pushes the regions of the changes in flight too.
#[test]
fn a_backfill_member_gets_a_change_in_flight_when_it_joins() {
    let mut c = Cluster::new();
    for ch in 0..CHUNKS {
        c.write(ch, 0);
    }
    c.ticks(3);
    // Group 0: disks 1 (primary), 2, 3. Both replicas hold their messages,
    // so the change stays in flight and the primary has not written its
    // own copy (it waits for an up-to-date replica to log the change).
    c.stop(2);
    c.stop(3);
    let id = c.write(0, 9); // a region never written before
    assert_eq!(c.replies.get(&id), None);
    // The manager grows group 0 onto disk 4 (rebalancing).
    c.map.pgs[0].push(4);
    c.map.pg_states[0].push(CopyState::Backfill);
    c.bump();
    c.run();
    c.resume(2);
    c.resume(3);
    c.settle();
    assert_eq!(c.replies.get(&id), Some(&ClientResult::Ok));
    assert_eq!(c.map.pgs[0], vec![1, 2, 3, 4]);
    c.assert_converged();
}

// Proves a group's last up-to-date copy that restarts, losing a write it had
// applied but not flushed, takes back what the other members hold before it
// leads: the two others were outdated (recovering, in the write set), applied
// the write with it, and a client FLUSH made it durable on them (it reached
// them, not the crashed primary). The restarted copy stays up to date (the
// manager keeps a group's last one) and used to lead with an empty log and
// resync its stale block over theirs (simulation seed 11149).
#[test]
fn a_restarted_last_copy_takes_back_a_write_a_flush_made_durable_elsewhere() {
    let mut c = Cluster::new();
    let v = c.last_copy_with_a_write_flushed_only_elsewhere();
    c.crash_and_restart(1);
    assert_eq!(c.map.primary(0), Some(1));
    c.node(2).rep.grant_push_bytes(u64::MAX / 2, u64::MAX / 2);
    c.settle();
    c.assert_converged();
    let b = (0, 5 * REGION_BYTES / BLOCK);
    for id in 1..=MEMBERS {
        assert_eq!(
            c.nodes[id as usize - 1].disk.get(b),
            v,
            "node {id} lost the flushed write of {b:?}"
        );
    }
}

// Proves a restarted last up-to-date copy whose disk vouched for its group
// logs (`Effect::LogFloor`) recovers the others by delta: node 2 is away
// while every chunk changes, node 3 restarts, and node 1, now every
// group's only up-to-date copy, crashes and restarts too. Its new process
// starts from the logs its disk kept (complete above the trim point every
// member reached), so it pushes the regions written since then and nothing
// else; before, a restarted process could not tell and resynced every
// allocated region. The same restart with a disk whose logs are not
// vouched for (marked incomplete) falls back to full resyncs.
#[test]
fn a_restarted_last_copy_recovers_the_others_by_delta() {
    for vouched in [true, false] {
        let mut c = Cluster::new();
        // Four regions of every chunk, durable everywhere (trimmed).
        for ch in 0..CHUNKS {
            for i in 0..4 {
                c.write(ch, i);
            }
        }
        c.ticks(3);
        for id in 1..=MEMBERS {
            c.node(id).rep.grant_push_bytes(0, 0);
        }
        c.stop(2);
        c.declare_down(2);
        for ch in 0..CHUNKS {
            c.write(ch, 5);
        }
        c.ticks(3);
        c.resume(2);
        c.declare_up(2);
        c.crash_and_restart(3);
        for ch in 0..CHUNKS {
            c.write(ch, 6);
        }
        if !vouched {
            for pg in 0..PGS {
                c.node(1).disk.log.floor(pg, Seq::default(), false);
            }
        }
        let from = c.pushed.len();
        c.crash_and_restart(1);
        for pg in 0..PGS {
            assert_eq!(c.map.primary(pg), Some(1));
        }
        for id in 1..=MEMBERS {
            c.node(id).rep.grant_push_bytes(u64::MAX / 2, u64::MAX / 2);
        }
        c.settle();
        c.assert_converged();
        let s = c.nodes[0].rep.stats.clone();
        let pushed = c.pushed_since(from);
        if vouched {
            assert_eq!(
                (s.full_resyncs, s.delta_recoveries),
                (0, 2 * u64::from(PGS))
            );
            // Regions 5 and 6, never 0-3 (durable everywhere: every
            // member learnt the trim point past them).
            for r in &pushed {
                assert!(
                    r.index >= 5,
                    "only what changed since the trim point: {r:?}"
                );
            }
            assert!(pushed.len() >= CHUNKS as usize);
            assert!(pushed.len() < CHUNKS as usize * 6, "{}", pushed.len());
        } else {
            assert_eq!(
                (s.full_resyncs, s.delta_recoveries),
                (2 * u64::from(PGS), 0)
            );
            assert!(
                pushed.iter().any(|r| r.index < 4),
                "a full resync: {pushed:?}"
            );
        }
    }
}

// Proves that what a restarted last up-to-date copy took back joins its
// disk's log (`Effect::LogEntries`) once the pieces are durable there, so a
// second restart before the group is clean again still recovers the others
// by delta and keeps the write: the same failures as
// `a_restarted_last_copy_takes_back_a_write_a_flush_made_durable_elsewhere`,
// then node 1 crashes and restarts again while the others are still
// outdated.
#[test]
fn a_last_copy_restarted_twice_still_recovers_by_delta() {
    let mut c = Cluster::new();
    let v = c.last_copy_with_a_write_flushed_only_elsewhere();
    c.crash_and_restart(1);
    c.ticks(2);
    assert!(
        c.nodes[0].rep.stats.reclaimed_bytes > 0,
        "the first restart took the write back"
    );
    // The disk commits the entries (and the mark) with its next flush.
    c.node(1).disk.flush();
    c.crash_and_restart(1);
    assert_eq!(c.map.primary(0), Some(1));
    for id in 1..=MEMBERS {
        c.node(id).rep.grant_push_bytes(u64::MAX / 2, u64::MAX / 2);
    }
    c.settle();
    c.assert_converged();
    let s = c.nodes[0].rep.stats.clone();
    assert_eq!(s.full_resyncs, 0, "{s:?}");
    assert!(s.delta_recoveries > 0, "{s:?}");
    let b = (0, 5 * REGION_BYTES / BLOCK);
    for id in 1..=MEMBERS {
        assert_eq!(
            c.nodes[id as usize - 1].disk.get(b),
            v,
            "node {id} lost the flushed write of {b:?}"
        );
    }
}

// Proves a restarted last up-to-date copy takes back nothing a member cannot
// vouch for: a member that was away (it missed a change acknowledged
// without it) and came back seeing only the newest map still logs the
// older change of that block; taking its content would undo the newer
// acknowledged, flushed write the restarted copy holds durably.
#[test]
fn a_restarted_last_copy_takes_nothing_back_from_a_member_that_missed_a_change() {
    let mut c = Cluster::new();
    for ch in 0..CHUNKS {
        c.write(ch, 0);
    }
    c.ticks(3);
    for id in 1..=MEMBERS {
        c.node(id).rep.grant_push_bytes(0, 0);
    }
    // Group 0 (primary 1): an older write everywhere, then node 3 away
    // while a newer write of the same block is acknowledged and flushed.
    c.write(0, 5);
    c.stop(3);
    c.declare_down(3);
    let v = c.next_value;
    let id = c.write(0, 5);
    assert_eq!(c.replies.get(&id), Some(&ClientResult::Ok));
    for id in [1, 2] {
        let disk = &mut c.node(id).disk;
        let cache = std::mem::take(&mut disk.cache);
        disk.durable.extend(cache);
    }
    // Node 3 resumes and, like a long poll, gets only the newest map.
    c.node(3).held.retain(|i| !matches!(i, Input::Map(_)));
    c.resume(3);
    c.declare_up(3);
    // Node 2 restarts (its log is gone), then node 1, the last up-to-date
    // copy of group 0.
    c.crash_and_restart(2);
    c.crash_and_restart(1);
    assert_eq!(c.map.primary(0), Some(1));
    for id in 1..=MEMBERS {
        c.node(id).rep.grant_push_bytes(u64::MAX / 2, u64::MAX / 2);
    }
    c.settle();
    c.assert_converged();
    let b = (0, 5 * REGION_BYTES / BLOCK);
    for id in 1..=MEMBERS {
        assert_eq!(
            c.nodes[id as usize - 1].disk.get(b),
            v,
            "node {id} lost the newer flushed write of {b:?}"
        );
    }
}

// Proves a new primary makes a change of the old one agree everywhere when
// only a member that is not up to date got it: the old primary sent it to
// an outdated member (recovering, in the write set) and to the one other
// up-to-date copy, which never got it; the old primary had not written it
// yet (it waits for an up-to-date replica) and crashed. The new primary's
// log does not know the change, and a delta recovery pushes only the
// regions of its log, so the recovering member kept it and the copies
// differed in that region (simulation seeds 312, 331, 1087, ... with
// TESSERA_SIM_STRICT_SCRUB=1). A delta recovery now asks the member for its
// uncommitted entries and pushes their regions.
#[test]
fn a_change_only_an_outdated_member_got_is_made_to_agree() {
    let mut c = Cluster::new();
    for ch in 0..CHUNKS {
        c.write(ch, 0);
    }
    c.ticks(3);
    // Node 3 away while group 0 (primary 1, then 2, 3) changes: outdated,
    // with a delta to recover that no push may start yet.
    c.node(1).rep.grant_push_bytes(0, 0);
    c.stop(3);
    c.declare_down(3);
    for ch in 0..CHUNKS {
        c.write(ch, 1);
    }
    c.resume(3);
    c.declare_up(3);
    assert_eq!(
        c.map.pg_states[0],
        vec![
            CopyState::UpToDate,
            CopyState::UpToDate,
            CopyState::Outdated
        ]
    );
    // A change of group 0 reaches node 3; node 2 (stopped) never gets it,
    // so node 1 does not write its own copy yet.
    c.stop(2);
    let id = c.write(0, 7);
    assert_eq!(c.replies.get(&id), None);
    let b = (0, 7 * REGION_BYTES / BLOCK);
    assert_ne!(c.nodes[2].disk.get(b), 0, "node 3 applied the change");
    assert_eq!(c.nodes[0].disk.get(b), 0);
    c.node(2)
        .held
        .retain(|i| !matches!(i, Input::Msg(m) if matches!(m.body, Body::Replicate { .. })));
    // Node 1 fails (it stays away); node 2 leads group 0 and recovers node
    // 3, which stays last in the group's order (so no peering of its own
    // hides a difference).
    c.stop(1);
    c.declare_down(1);
    c.resume(2);
    assert_eq!(c.map.primary(0), Some(2));
    for _ in 0..100 {
        if c.map.pg_states[0][2] == CopyState::UpToDate {
            break;
        }
        c.tick();
    }
    assert_eq!(c.map.pg_states[0][2], CopyState::UpToDate);
    assert_eq!(c.map.primary(0), Some(2));
    assert_eq!(
        c.nodes[1].disk.get(b),
        c.nodes[2].disk.get(b),
        "primary 2 and recovered node 3 differ in {b:?}"
    );
    c.node(1).rep.grant_push_bytes(u64::MAX / 2, u64::MAX / 2);
    c.resume(1);
    c.declare_up(1);
    c.settle();
    c.assert_converged();
}

// Proves a primary makes its own copy durable as soon as a member of the
// write set restarts: a change acknowledged by the primary and one replica
// (neither had flushed it) is held only in the primary's memory once that
// replica's process is gone, so a crash of the primary right after would
// lose it (nobody can give it back: the replica's new process never had
// it). Found by `tests/tests/last_copy.rs` (storage-0 killed while
// storage-1's new process was being recovered; fio's verify read zeros).
#[test]
fn a_primary_flushes_its_copy_when_a_holder_restarts() {
    let mut c = Cluster::primed();
    // Node 3 away: group 0's write set is nodes 1 (primary) and 2.
    let (v, b) = c.unflushed_write_without_node_3();
    assert!(!c.nodes[0].disk.durable.contains_key(&b), "not flushed yet");
    // Node 2 restarts (its cache and its log are gone; its recovery cannot
    // push yet), and node 1, now the only holder of the change, crashes
    // before any tick.
    c.node(1).rep.grant_push_bytes(0, 0);
    c.crash_and_restart(2);
    c.crash_and_restart(1);
    assert_eq!(c.map.primary(0), Some(1));
    c.heal_and_expect(b, v);
}

// Proves a primary settles as soon as its link to a member breaks, before
// the map shows the member gone: node 2 (a replica holding an acknowledged,
// unflushed change with primary node 1) dies; node 1 sees its link close
// (`Input::MemberLost`) and flushes; node 2's new process registers, and
// node 1 is killed before it processed that map. Without the early settle
// the change was only in node 1's memory at that point and was lost.
#[test]
fn a_primary_settles_when_its_link_to_a_member_breaks() {
    let mut c = Cluster::primed();
    let (v, b) = c.unflushed_write_without_node_3();
    c.node(1).rep.grant_push_bytes(0, 0);
    c.die(2);
    c.queue.push_back((1, Input::MemberLost { disk: 2 }));
    c.run();
    assert!(
        c.nodes[0].disk.durable.get(&b) == Some(&v),
        "node 1 flushed the change when its link to node 2 broke"
    );
    // Node 2 comes back as a new process; node 1 dies before it sees that
    // map, and restarts.
    c.stop(1);
    c.crash_and_restart(2);
    c.crash_and_restart(1);
    assert_eq!(c.map.primary(0), Some(1));
    c.heal_and_expect(b, v);
}

// Proves a change in flight when the primary starts settling is answered
// only once it is on the primary's disk: the primary learns that its
// replica died (the link closed) before the replica's acknowledgement of
// the change reaches it (two connections, no order between them); its
// settle flush is asked before it writes the change itself, so that
// flush does not cover it, and the answer must wait for another one.
#[test]
fn a_change_in_flight_while_settling_is_answered_once_durable() {
    let mut c = Cluster::primed();
    c.stop(3);
    c.declare_down(3);
    // Group 0: primary 1, replica 2. Node 1 takes the client's write and
    // sends it to node 2, then stops taking input for a moment.
    let client = 999;
    let v = 4242;
    c.queue.push_back((
        1,
        Input::Client {
            pg: 0,
            disk: 1,
            client,
            extent: block_of(0, 5),
            change: Change::Write(vec![v]),
            fua: false,
        },
    ));
    c.step();
    c.stop(1);
    c.run();
    // Node 2 applied it and its acknowledgement waits in node 1's socket;
    // node 2 dies; node 1 sees the link close first.
    c.die(2);
    c.node(1).held.push_front(Input::MemberLost { disk: 2 });
    c.resume(1);
    let b = (0, 5 * REGION_BYTES / BLOCK);
    assert_eq!(c.replies.get(&client), Some(&ClientResult::Ok));
    assert_eq!(
        c.nodes[0].disk.durable.get(&b),
        Some(&v),
        "the change was answered before it was on the primary's disk"
    );
}

// Proves a member flushes its copy as soon as its link to its primary
// closes: it holds, in memory, the changes that primary acknowledged, and
// the map naming a new primary (which settles then) comes only a heartbeat
// grace later.
#[test]
fn a_member_flushes_when_its_primary_dies() {
    let mut c = Cluster::primed();
    let v = c.next_value;
    let id = c.write(0, 5);
    assert_eq!(c.replies.get(&id), Some(&ClientResult::Ok));
    let b = (0, 5 * REGION_BYTES / BLOCK);
    assert!(!c.nodes[1].disk.durable.contains_key(&b), "not flushed yet");
    c.die(1);
    c.queue.push_back((2, Input::MemberLost { disk: 1 }));
    c.queue.push_back((3, Input::MemberLost { disk: 1 }));
    c.run();
    for id in [2, 3] {
        assert_eq!(
            c.nodes[id as usize - 1].disk.durable.get(&b),
            Some(&v),
            "node {id} flushed when its primary's link closed"
        );
    }
}

// Proves a restarted daemon does not act on a map older than its
// registration: in the map it fetched before registering its disk is still
// the old process's, primary of group 0. Acting on it, the new process
// (whose cache lost an acknowledged change) led the group under that gone
// epoch; the replica, still at it, answered its peering with the change as
// uncertain, and the new process pushed its own stale content of that
// region over it: the write was lost on every copy, as fio's verify saw in
// `tests/tests/last_copy.rs::last_copy_killed_right_after_another_restarted`
// (the likely cause there; docs/replication.md, "A lost write, found
// late"). Now the state machine ignores maps older than its registration
// (`Replicator::set_min_epoch`).
#[test]
fn a_new_process_ignores_the_map_before_its_registration() {
    let mut c = Cluster::primed();
    let (v, b) = c.unflushed_write_without_node_3();
    // Node 1 (group 0's primary) crashes; its new process starts with the
    // map it fetched before registering.
    let before = Arc::new(c.map.clone());
    let registered = c.map.epoch + 1;
    {
        let n = c.node(1);
        n.disk.lose_cache();
        n.held.clear();
        n.rep = Replicator::new([1]);
        n.rep.recover_log(1, n.disk.recovered_log());
        for (pg, trim, floor, complete) in n.disk.log.recovered_states() {
            n.rep.recover_log_state(1, pg, trim, floor, complete);
        }
        n.rep.set_min_epoch(registered);
    }
    c.queue.retain(|(to, _)| *to != 1);
    c.queue.push_back((1, Input::Map(before)));
    c.run();
    // Its registration: a new incarnation, its copies outdated (node 2 is
    // up to date).
    c.map.disks[0].incarnation += 1;
    let pgs = c.map.pgs.clone();
    outdate_disk(&pgs, &mut c.map.pg_states, 1);
    c.bump();
    assert_eq!(c.map.epoch, registered);
    c.run();
    c.heal_and_expect(b, v);
}

impl Cluster {
    /// Queue (without running) a compare and write of the block at the
    /// start of region `index` of `chunk` at the group's primary: if it
    /// holds `compare`, write `data`. Returns the client id.
    fn compare_and_write(
        &mut self,
        chunk: u32,
        index: u32,
        compare: u64,
        data: u64,
        token: u64,
    ) -> u64 {
        let pg = pg_of_chunk(chunk);
        let primary = self.map.primary(pg).expect("a primary");
        let client = self.next_client;
        self.next_client += 1;
        self.queue.push_back((
            primary,
            Input::CompareAndWrite {
                pg,
                disk: primary,
                client,
                extent: block_of(chunk, index),
                compare: vec![compare],
                data: vec![data],
                token,
                fua: false,
            },
        ));
        client
    }

    /// Queue (without running) a write of `v` to the block at the start of
    /// region `index` of `chunk`. Returns the client id.
    fn queue_write(&mut self, chunk: u32, index: u32, v: u64) -> u64 {
        self.queue_change(block_of(chunk, index), v, false)
    }

    /// Queue a write of value `v` over `extent` (one value per block: a
    /// partial block counts whole) at its group's primary; returns the
    /// client id.
    fn queue_change(&mut self, extent: Extent, v: u64, fua: bool) -> u64 {
        let pg = pg_of_chunk(extent.chunk_index);
        let primary = self.map.primary(pg).expect("a primary");
        let client = self.next_client;
        self.next_client += 1;
        self.queue.push_back((
            primary,
            Input::Client {
                pg,
                disk: primary,
                client,
                extent,
                change: Change::Write(vec![v]),
                fua,
            },
        ));
        client
    }

    /// `queue_change` with the next value; returns (client id, value).
    fn queue_client(&mut self, extent: Extent, fua: bool) -> (u64, u64) {
        let v = self.next_value;
        self.next_value += 1;
        (self.queue_change(extent, v, fua), v)
    }

    /// Step until every one of `holders` holds `v` at `b` and has no
    /// apply completing (their acknowledgements not yet delivered),
    /// losing every change sent to `lost_to` on the way.
    fn step_until_held(&mut self, b: Block, v: u64, holders: &[u32], lost_to: Option<u32>) {
        for _ in 0..1000 {
            self.queue.retain(|(to, i)| {
                !(Some(*to) == lost_to
                    && matches!(i, Input::Msg(m) if matches!(m.body, Body::Replicate { .. })))
            });
            let applied = holders
                .iter()
                .all(|h| self.nodes[*h as usize - 1].disk.get(b) == v);
            let completing = self
                .queue
                .iter()
                .any(|(to, i)| holders.contains(to) && matches!(i, Input::Applied { .. }));
            if applied && !completing {
                return;
            }
            self.step();
        }
    }

    fn copies_of(&self, b: Block) -> Vec<u64> {
        (1..=MEMBERS)
            .map(|id| self.nodes[id as usize - 1].disk.get(b))
            .collect()
    }
}

// Proves a COMPARE AND WRITE at the primary holds its block from its
// compare to its write: a write and another compare and write queued right
// behind it wait, so the first matches and writes, the write lands after
// it, and the second compares against that write (a miscompare); every
// copy ends with the write. A resend of the first (same token) is answered
// Ok without writing again.
#[test]
fn compare_and_write_holds_its_block_until_written() {
    let mut c = Cluster::primed();
    let v = c.next_value;
    c.write(0, 1);
    let b = (0, REGION_BYTES / BLOCK);
    assert_eq!(c.copies_of(b), vec![v; 3]);
    let first = c.compare_and_write(0, 1, v, 100, 7);
    let plain = c.queue_write(0, 1, 200);
    let second = c.compare_and_write(0, 1, v, 300, 8);
    c.run();
    assert_eq!(c.replies.get(&first), Some(&ClientResult::Ok));
    assert_eq!(c.replies.get(&plain), Some(&ClientResult::Ok));
    assert_eq!(c.replies.get(&second), Some(&ClientResult::Miscompare(0)));
    assert_eq!(c.copies_of(b), vec![200; 3]);
    // The gateway lost the first answer and resends: Ok, nothing written.
    let resend = c.compare_and_write(0, 1, v, 100, 7);
    c.run();
    assert_eq!(c.replies.get(&resend), Some(&ClientResult::Ok));
    assert_eq!(c.copies_of(b), vec![200; 3]);
    // A never-written block compares equal to zeroes.
    let zero = c.compare_and_write(0, 2, 0, 400, 9);
    c.run();
    assert_eq!(c.replies.get(&zero), Some(&ClientResult::Ok));
    assert_eq!(c.copies_of((0, 2 * REGION_BYTES / BLOCK)), vec![400; 3]);
    c.settle();
    c.assert_converged();
}

// Proves a COMPARE AND WRITE whose primary is deposed while it compares is
// told to retry (at the new primary) and writes nothing.
#[test]
fn compare_and_write_deposed_while_comparing_retries() {
    let mut c = Cluster::primed();
    let v = c.next_value;
    c.write(0, 1);
    let b = (0, REGION_BYTES / BLOCK);
    let primary = c.map.primary(0).expect("primary");
    let id = c.compare_and_write(0, 1, v, 100, 7);
    // The primary takes the request and asks for its read; before the read
    // is answered, a map arrives that gives the group another primary.
    c.step();
    let at = c
        .queue
        .iter()
        .position(|(to, i)| *to == primary && matches!(i, Input::ReadDone { .. }))
        .expect("the compare's read is asked");
    let read = c.queue.remove(at).expect("read");
    c.declare_down(primary);
    c.queue.push_back(read);
    c.run();
    assert_eq!(c.replies.get(&id), Some(&ClientResult::Retry));
    assert_eq!(c.node(primary).disk.get(b), v);
    let others: Vec<u32> = (1..=MEMBERS).filter(|m| *m != primary).collect();
    for m in others {
        assert_eq!(c.node(m).disk.get(b), v, "node {m}");
    }
}

// Proves a COMPARE AND WRITE whose write both members applied, and whose
// primary died before it could answer, is answered Ok by the new primary
// when the gateway resends it: the member learnt the token with the change
// and its term's peering makes every copy agree with its content, which
// holds the write. Compared again, the request would find its own write
// and miscompare. A request with another token does compare.
#[test]
fn compare_and_write_resent_after_failover_is_answered_ok() {
    let mut c = Cluster::primed();
    let v = c.next_value;
    c.write(0, 1);
    let b = (0, REGION_BYTES / BLOCK);
    let primary = c.map.primary(0).expect("primary");
    let members: Vec<u32> = (1..=MEMBERS).filter(|m| *m != primary).collect();
    let first = c.compare_and_write(0, 1, v, 100, 7);
    // Until both members applied the write and processed its completion;
    // their acknowledgements have not reached the primary yet.
    c.step_until_held(b, 100, &members, None);
    c.die(primary);
    assert_eq!(c.replies.get(&first), None, "never answered");
    c.declare_down(primary);
    c.ticks(3);
    let resend = c.compare_and_write(0, 1, v, 100, 7);
    c.run();
    c.ticks(3);
    assert_eq!(c.replies.get(&resend), Some(&ClientResult::Ok));
    let other = c.compare_and_write(0, 1, v, 300, 8);
    c.run();
    assert_eq!(c.replies.get(&other), Some(&ClientResult::Miscompare(0)));
    for m in members {
        assert_eq!(c.nodes[m as usize - 1].disk.get(b), 100, "node {m}");
    }
}

// Proves a write that is not whole 4 KiB blocks, over a block that fails
// its CRC on one copy (the primary's, then a replica's), is not failed:
// that copy writes nothing, the primary rewrites its whole blocks from a
// good copy (which has the write) and only then answers Ok. Every copy
// ends with the write and the bad block is gone. (Before, the client got
// an I/O error.)
#[test]
fn a_partial_write_over_a_corrupt_block_repairs_that_copy() {
    for bad_on_primary in [true, false] {
        let mut c = Cluster::primed();
        c.write(0, 1);
        let b = (0, REGION_BYTES / BLOCK);
        let primary = c.map.primary(0).expect("primary");
        let victim = if bad_on_primary {
            primary
        } else {
            (1..=MEMBERS).find(|m| *m != primary).expect("a replica")
        };
        c.node(victim).disk.bad.insert(b);
        let (client, w) = c.queue_client(
            Extent {
                volume_id: 1,
                chunk_index: 0,
                offset: REGION_BYTES + 512,
                length: 512,
            },
            false,
        );
        c.run();
        c.ticks(3);
        assert_eq!(
            c.replies.get(&client),
            Some(&ClientResult::Ok),
            "bad on primary: {bad_on_primary}"
        );
        assert_eq!(
            c.copies_of(b),
            vec![w; 3],
            "bad on primary: {bad_on_primary}"
        );
        assert!(c.node(victim).disk.bad.is_empty());
        c.settle();
        c.assert_converged();
    }
}

// Proves a new primary that holds a COMPARE AND WRITE's write (only it got
// the write before the old primary died) answers a resend of it only once
// its peering has pushed that region to the other up-to-date copy: before,
// it may be the only copy holding the write (and would lose it to a crash),
// so the resend is told to retry; after, it is answered Ok (not compared
// again, which would find its own write).
#[test]
fn a_resent_compare_and_write_waits_for_the_new_primarys_peering() {
    let mut c = Cluster::primed();
    let v = c.next_value;
    c.write(0, 1);
    let b = (0, REGION_BYTES / BLOCK);
    let (p, nb, nc) = (1, 2, 3);
    assert_eq!(c.map.primary(0), Some(p));
    c.compare_and_write(0, 1, v, 100, 7);
    // The write reaches node 2 only.
    c.step_until_held(b, 100, &[nb], Some(nc));
    assert_eq!(c.nodes[nc as usize - 1].disk.get(b), v);
    c.die(p);
    c.map.disks[p as usize - 1].up = false;
    c.map.nodes[p as usize - 1].up = false;
    let pgs = c.map.pgs.clone();
    outdate_disk(&pgs, &mut c.map.pg_states, p);
    c.bump();
    // Node 2 learns it leads; the gateway's resend reaches it while it
    // peers, and waits in its queue.
    let epoch = c.map.epoch;
    for _ in 0..1000 {
        if c.node(nb).rep.epoch() == epoch {
            break;
        }
        c.step();
    }
    let client = c.next_client;
    c.next_client += 1;
    c.queue.push_front((
        nb,
        Input::CompareAndWrite {
            pg: 0,
            disk: nb,
            client,
            extent: block_of(0, 1),
            compare: vec![v],
            data: vec![100],
            token: 7,
            fua: false,
        },
    ));
    // Peering ends: the region goes to node 3 as a push. Until node 3 has
    // it, node 2 may be the only copy holding the write, so the resend is
    // not answered Ok (it is told to retry).
    for _ in 0..1000 {
        if c.node(nb).rep.active_primaries().contains(&(0, nb)) {
            break;
        }
        c.step();
    }
    assert!(c.node(nb).rep.active_primaries().contains(&(0, nb)));
    assert_eq!(c.nodes[nc as usize - 1].disk.get(b), v, "not pushed yet");
    assert_eq!(
        c.replies.get(&client),
        Some(&ClientResult::Retry),
        "answered before the push"
    );
    c.run();
    c.ticks(3);
    let again = c.next_client;
    c.next_client += 1;
    c.queue.push_back((
        nb,
        Input::CompareAndWrite {
            pg: 0,
            disk: nb,
            client: again,
            extent: block_of(0, 1),
            compare: vec![v],
            data: vec![100],
            token: 7,
            fua: false,
        },
    ));
    c.run();
    assert_eq!(
        c.replies.get(&again),
        Some(&ClientResult::Ok),
        "after the push"
    );
    assert_eq!(
        c.nodes[nc as usize - 1].disk.get(b),
        100,
        "pushed by peering"
    );
}

// Proves a read repair (and a scrub) assembles an extent block by block when every copy
// has some bad block in it: a two-block read on the primary, whose first
// block is bad there, and whose copies on the two replicas are bad in the
// second block and in the first, is answered Ok (each block has one good
// copy) and every copy ends good. Before, the repair took the whole extent
// from one copy, found none, and the client got Failed.
#[test]
fn a_read_repair_takes_each_block_from_a_copy_good_for_it() {
    for by_scrub in [false, true] {
        repair_block_by_block(by_scrub);
    }
}

fn repair_block_by_block(by_scrub: bool) {
    let mut c = Cluster::primed();
    c.write(0, 1);
    let first = (0, REGION_BYTES / BLOCK);
    let second = (0, REGION_BYTES / BLOCK + 1);
    let extent = Extent {
        volume_id: 1,
        chunk_index: 0,
        offset: REGION_BYTES,
        length: 2 * BLOCK,
    };
    // The second block gets a value too, so a copy left bad shows.
    let primary = c.map.primary(0).expect("primary");
    let (_, w) = c.queue_client(
        Extent {
            offset: REGION_BYTES + BLOCK,
            length: BLOCK,
            ..extent
        },
        true,
    );
    c.run();
    let want = (c.copies_of(first)[0], w);
    let replicas: Vec<u32> = (1..=MEMBERS).filter(|m| *m != primary).collect();
    c.node(primary).disk.bad.insert(first);
    c.node(replicas[0]).disk.bad.insert(second);
    c.node(replicas[1]).disk.bad.insert(first);
    let client = c.next_client;
    c.next_client += 1;
    let input = if by_scrub {
        Input::Scrub { pg: Some(0) }
    } else {
        Input::Repair {
            pg: 0,
            disk: primary,
            client,
            extent,
        }
    };
    c.queue.push_back((primary, input));
    c.run();
    c.ticks(3);
    if !by_scrub {
        assert_eq!(c.replies.get(&client), Some(&ClientResult::Ok));
    }
    for id in 1..=MEMBERS {
        assert!(c.node(id).disk.bad.is_empty(), "copy {id} still bad");
    }
    assert_eq!(c.copies_of(first), vec![want.0; 3]);
    assert_eq!(c.copies_of(second), vec![want.1; 3]);
    c.settle();
    c.assert_converged();
}

// Proves a change that a copy could not apply over a corrupt block keeps
// the commit point below it until its repair ends: when the primary dies
// between the members' answers and the repair's rewrite, the new primary's
// peering still finds the change uncertain and makes every copy agree
// (before, the commit point had passed it, nobody repaired the copy that
// refused it, and the copies differed until a scrub).
#[test]
fn a_change_refused_over_a_corrupt_block_stays_uncertain_until_repaired() {
    let mut c = Cluster::primed();
    c.write(0, 1);
    let b = (0, REGION_BYTES / BLOCK);
    let (p, next, victim) = (1, 2, 3);
    assert_eq!(c.map.primary(0), Some(p));
    c.node(victim).disk.bad.insert(b);
    let before = c.nodes[victim as usize - 1].disk.get(b);
    c.queue_client(
        Extent {
            volume_id: 1,
            chunk_index: 0,
            offset: REGION_BYTES + 512,
            length: 512,
        },
        true,
    );
    // Every member answered; the repair of the victim's copy is queued and
    // has not rewritten it yet.
    let queued = |c: &mut Cluster| {
        c.node(p)
            .rep
            .pgs
            .get(&(0, p))
            .and_then(|g| g.primary.as_ref())
            .is_some_and(|pr| {
                pr.ops.is_empty() && (!pr.repairs.is_empty() || !pr.checks.is_empty())
            })
    };
    for _ in 0..1000 {
        if queued(&mut c) {
            break;
        }
        c.step();
    }
    assert!(queued(&mut c), "the repair was never queued");
    // Another change of the group goes through while the repair's read of
    // the primary's copy is held back: it carries the primary's commit
    // point to the members.
    let (other, _) = c.queue_client(block_of(PGS * 2, 5), false);
    let mut held = Vec::new();
    for _ in 0..1000 {
        if c.replies.contains_key(&other) {
            break;
        }
        let Some((to, input)) = c.queue.pop_front() else {
            break;
        };
        if to == p && matches!(input, Input::ReadDone { .. }) {
            held.push((to, input));
            continue;
        }
        c.queue.push_front((to, input));
        c.step();
    }
    assert_eq!(c.replies.get(&other), Some(&ClientResult::Ok));
    // The members learn the commit point with the next message.
    c.queue.push_back((p, Input::Tick));
    c.run();
    assert_eq!(
        c.copies_of(b)[victim as usize - 1],
        before,
        "not repaired yet"
    );
    assert!(c.node(victim).disk.bad.contains(&b));
    c.die(p);
    c.declare_down(p);
    c.ticks(3);
    assert_eq!(c.map.primary(0), Some(next));
    assert!(
        !c.node(victim).disk.bad.contains(&b),
        "the new primary's peering did not rewrite the copy that refused the change"
    );
    assert_eq!(
        c.nodes[next as usize - 1].disk.get(b),
        c.nodes[victim as usize - 1].disk.get(b),
        "the surviving copies differ"
    );
}

// Proves the operator's `norecover`: a daemon back from an absence gets
// no delta-recovery push while it is set (its copies stay outdated; new
// writes still reach it), and once unset the recovery runs and the copies
// converge. `nobackfill` leaves delta recovery alone.
#[test]
fn norecover_holds_delta_recovery_until_unset() {
    let mut c = Cluster::primed();
    let back = 2;
    c.stop(back);
    c.declare_down(back);
    for ch in 0..CHUNKS {
        c.write(ch, 2);
    }
    for n in &mut c.nodes {
        n.rep.set_recovery_paused(true, false);
    }
    let from = c.pushed.len();
    c.resume(back);
    c.declare_up(back);
    c.ticks(20);
    assert!(
        c.pushed_since(from).is_empty(),
        "pushed while paused: {:?}",
        c.pushed_since(from)
    );
    assert!(!c.clean(), "the returning copies stay outdated");
    // A new write still reaches the paused member.
    let b = (0, 3 * REGION_BYTES / BLOCK);
    let w = c.next_value;
    c.write(0, 3);
    assert_eq!(c.copies_of(b), vec![w; 3]);
    // Backfill paused instead: delta recovery goes on.
    for n in &mut c.nodes {
        n.rep.set_recovery_paused(false, true);
    }
    c.settle();
    c.assert_converged();
    assert!(!c.pushed_since(from).is_empty());
}

// Proves the persisted group logs close the double-crash divergence
// (docs/replication.md, "Persistent group logs"): a change of group 0
// reaches its primary (node 1) and node 2 but not node 3 (the message is
// lost), both make it durable, and both crash before it is acknowledged;
// node 3, the last up-to-date copy, leads. Their new processes get the
// change's log entry back from their disks, so node 3's delta recovery
// hears of it (the uncommitted entries it asks returning copies for) and
// pushes its own content of that region: every copy agrees. Run without
// giving the entries back (the logs as they were, in memory only), the two
// returning copies keep the change and node 3 does not: the copies differ
// for good, which is what the simulation's scrub checker counted.
#[test]
fn a_change_two_crashed_copies_hold_is_made_to_agree_from_their_logs() {
    for persisted in [true, false] {
        let mut c = Cluster::primed();
        // Region 2 of chunk 0: no change of it is in anyone's log.
        let b = (0, 2 * REGION_BYTES / BLOCK);
        let old = c.copies_of(b)[2];
        let (client, v) = c.queue_client(block_of(0, 2), false);
        c.step_until_held(b, v, &[1, 2], Some(3));
        assert_eq!(c.copies_of(b), vec![v, v, old]);
        assert_eq!(c.replies.get(&client), None, "never acknowledged");
        // The engines commit their journals (as they do every few MiB).
        for id in [1, 2] {
            c.node(id).disk.flush();
        }
        // Both crash at once; their new processes register.
        for id in [1, 2] {
            c.restart_unpublished(id, persisted);
        }
        c.bump();
        assert_eq!(c.map.primary(0), Some(3));
        c.run();
        c.settle();
        if persisted {
            c.assert_converged();
            assert_eq!(c.copies_of(b), vec![old; 3]);
        } else {
            assert_eq!(c.copies_of(b), vec![v, v, old], "the copies differ");
        }
    }
}

// Proves a COMPARE AND WRITE's token survives its primary's restart with
// the write: node 3 away, a COMPARE AND WRITE through node 1 (primary)
// and node 2 is acknowledged and made durable on node 1 only; node 2's
// process dies (it lost the write) and its new process stays outdated
// (`norecover`), then node 1 — every group's last up-to-date copy — dies
// and restarts. Its disk's group log gives the write back with its
// token, so when the gateway resends the request (it never saw the
// answer) the new process answers Ok once its peering is done, instead of
// comparing again and finding its own write (a false miscompare, which
// VMware reads as losing the ATS lock). Without the entries given back,
// the resend miscompares.
#[test]
fn a_compare_and_write_resent_to_a_restarted_last_copy_is_answered_ok() {
    for persisted in [true, false] {
        let mut c = Cluster::primed();
        let v = c.next_value;
        c.write(0, 1);
        c.stop(3);
        c.declare_down(3);
        assert_eq!(c.map.primary(0), Some(1));
        let first = c.compare_and_write(0, 1, v, 100, 7);
        c.run();
        assert_eq!(c.replies.get(&first), Some(&ClientResult::Ok));
        c.node(1).disk.flush();
        // `norecover` on node 1: node 2's new process stays outdated.
        c.node(1).rep.set_recovery_paused(true, false);
        c.crash_and_restart(2);
        // Node 1 dies too; its new process registers (the last up-to-date
        // copy stays up to date).
        c.restart_unpublished(1, persisted);
        c.bump();
        assert_eq!(c.map.primary(0), Some(1), "the last up-to-date copy leads");
        c.run();
        c.ticks(3);
        let resend = c.compare_and_write(0, 1, v, 100, 7);
        c.run();
        c.ticks(3);
        let expect = if persisted {
            ClientResult::Ok
        } else {
            ClientResult::Miscompare(0)
        };
        assert_eq!(
            c.replies.get(&resend),
            Some(&expect),
            "persisted logs: {persisted}"
        );
        let other = c.compare_and_write(0, 1, v, 300, 8);
        c.run();
        assert_eq!(c.replies.get(&other), Some(&ClientResult::Miscompare(0)));
        c.resume(3);
        c.declare_up(3);
        c.settle();
        c.assert_converged();
        assert_eq!(c.copies_of((0, REGION_BYTES / BLOCK)), vec![100; 3]);
    }
}

// Proves a COMPARE AND WRITE resent to a new primary that held its write
// when its term began is written again to every member of the write set,
// not answered from the token alone: node 3 is back but outdated (its
// recovery paused), the write reaches node 1 (primary) and node 2 only,
// node 1 dies, node 2 leads with nobody up to date to peer with. The
// resend is answered Ok only once node 3 applied the write too. Before,
// it was answered at once while node 3 lacked the write, which broke what
// a member vouches for ("a restarted last copy takes back", simulation
// seed 14086): node 3 could later vouch for an older change of the block
// and a restarted node 2 would take that back over the acknowledged
// write.
#[test]
fn a_resent_compare_and_write_is_written_to_every_member_of_the_write_set() {
    let mut c = Cluster::primed();
    let v = c.next_value;
    c.write(0, 1);
    let b = (0, REGION_BYTES / BLOCK);
    for id in [1, 2] {
        c.node(id).rep.set_recovery_paused(true, false);
    }
    c.stop(3);
    c.declare_down(3);
    c.resume(3);
    c.declare_up(3);
    assert_eq!(
        c.map.copy_state(0, 2),
        CopyState::Outdated,
        "node 3 outdated"
    );
    let first = c.compare_and_write(0, 1, v, 100, 7);
    c.step_until_held(b, 100, &[1, 2], Some(3));
    assert_eq!(c.copies_of(b), vec![100, 100, v]);
    c.die(1);
    assert_eq!(c.replies.get(&first), None, "never answered");
    c.queue.retain(|(to, _)| *to != 3);
    c.declare_down(1);
    assert_eq!(c.map.primary(0), Some(2));
    c.ticks(3);
    let resend = c.compare_and_write(0, 1, v, 100, 7);
    c.run();
    assert_eq!(c.replies.get(&resend), Some(&ClientResult::Ok));
    assert_eq!(
        c.nodes[2].disk.get(b),
        100,
        "node 3 (outdated, its recovery paused) has the write"
    );
    let other = c.compare_and_write(0, 1, v, 300, 8);
    c.run();
    assert_eq!(c.replies.get(&other), Some(&ClientResult::Miscompare(0)));
}
