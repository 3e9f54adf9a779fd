//! The iSCSI listener and connection loop: the only part of the iSCSI
//! front end that does I/O. Every portal (`--iscsi-listen`) serves every
//! volume as target `iqn.2026-11.io.tessera:<volume>` with the volume as
//! LUN 0, all portals in target portal group 1.
//!
//! Per connection: login (pure [`Login`] state machine, with a deadline),
//! then the full feature phase (pure [`Session`]) with SCSI commands run in
//! order by [`exec::execute`]. The target pings an idle initiator with a
//! NOP-In every `nop_interval_ms` and drops the connection when a ping goes
//! unanswered for a whole interval (a vanished initiator). Limits: at most
//! `connections_max` connections; framing limits come from the negotiated
//! MaxRecvDataSegmentLength.

use super::exec::{self, Lun, Persist};
use super::login::{self, Access, Chap, Directory, Login, Offer, SessionKind, Step};
use super::pdu::{self, Digests, Pdu};
use super::scsi::{Identity, Sense, asc, key};
use super::session::{Discovery, Effect, Outcome, Reset, Session, Task};
use super::stream::{Outbox, Read, Reader};
use crate::volume::{Catalog, Volume};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

/// Target names are this prefix plus the volume name.
pub const IQN_PREFIX: &str = "iqn.2026-11.io.tessera:";
/// Default maximum of concurrent iSCSI connections.
pub const CONNECTIONS_MAX: usize = 256;
/// A login must complete within this time.
pub const LOGIN_TIMEOUT_MS: u64 = 15_000;
/// Idle time before the target pings the initiator with a NOP-In.
pub const NOP_INTERVAL_MS: u64 = 10_000;
/// Login PDUs carry at most 8 KiB of text (§13.12 default before
/// negotiation); bound what we accept.
const LOGIN_DATA_MAX: usize = 64 * 1024;
/// Commands of one connection executing at once (beyond it, no more PDUs
/// are read until one finishes: TCP backpressure).
pub const INFLIGHT_MAX: usize = 64;
/// Data (EDTL) of the commands of one connection executing at once; a
/// single larger command still runs.
pub const INFLIGHT_BYTES_MAX: u64 = 64 << 20;
/// PDUs read ahead of the connection loop.
const READ_QUEUE: usize = 16;

/// Access policy per volume (ACLs and CHAP); the gateway's comes from the
/// manager ([`super::access::ManagerAccess`]).
pub trait Policy: Send + Sync {
    /// May `initiator` log in to `volume` (which exists), and must it
    /// authenticate (`Access::Allowed(Some(chap))`)?
    fn access(&self, volume: &str, initiator: &str) -> Access;
    /// CHAP required of discovery sessions (`None`: discovery is open).
    fn discovery_chap(&self) -> Option<Chap> {
        None
    }
}

/// Everyone may log in to every volume without authentication.
pub struct Open;
impl Policy for Open {
    fn access(&self, _volume: &str, _initiator: &str) -> Access {
        Access::Allowed(None)
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub offer: Offer,
    pub connections_max: usize,
    pub login_timeout_ms: u64,
    pub nop_interval_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            offer: Offer::default(),
            connections_max: CONNECTIONS_MAX,
            login_timeout_ms: LOGIN_TIMEOUT_MS,
            nop_interval_ms: NOP_INTERVAL_MS,
        }
    }
}

/// Everything the portals share.
pub struct Target {
    pub catalog: Arc<dyn Catalog>,
    pub policy: Arc<dyn Policy>,
    pub persist: Option<Arc<dyn Persist>>,
    pub config: Config,
    /// Bound addresses of every portal (for SendTargets).
    pub portals: Mutex<Vec<SocketAddr>>,
    luns: Mutex<HashMap<String, Arc<Lun>>>,
    tsih: AtomicU16,
    slots: Arc<Semaphore>,
}

impl Target {
    pub fn new(catalog: Arc<dyn Catalog>, policy: Arc<dyn Policy>, config: Config) -> Arc<Target> {
        Target::with_persist(catalog, policy, None, config)
    }

    /// A target whose persistent reservations are loaded from and stored
    /// to `persist`.
    pub fn with_persist(
        catalog: Arc<dyn Catalog>,
        policy: Arc<dyn Policy>,
        persist: Option<Arc<dyn Persist>>,
        config: Config,
    ) -> Arc<Target> {
        Arc::new(Target {
            catalog,
            policy,
            persist,
            slots: Arc::new(Semaphore::new(config.connections_max)),
            config,
            portals: Mutex::new(Vec::new()),
            luns: Mutex::new(HashMap::new()),
            tsih: AtomicU16::new(1),
        })
    }

    /// The shared state of a volume's LUN (created on first use, from the
    /// stored reservations when there are any).
    pub fn lun(&self, volume: &str) -> Arc<Lun> {
        let mut l = self.luns.lock().expect("not poisoned");
        Arc::clone(l.entry(volume.to_string()).or_insert_with(|| {
            let stored = self.persist.as_ref().and_then(|p| p.load(volume));
            if let Some(s) = &stored {
                tracing::info!(
                    volume,
                    version = s.version,
                    registrations = s.state.registrations.len(),
                    reserved = s.state.holder.is_some(),
                    "persistent reservations restored"
                );
            }
            Arc::new(Lun::with_reservations(stored.unwrap_or_default()))
        }))
    }

    fn next_tsih(&self) -> u16 {
        loop {
            let t = self.tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }
}

pub fn volume_of(target_name: &str) -> Option<&str> {
    target_name
        .strip_prefix(IQN_PREFIX)
        .filter(|v| !v.is_empty())
}

struct Dir<'a>(&'a Target);

impl Directory for Dir<'_> {
    fn access(&self, target: &str, initiator: &str) -> Access {
        let Some(vol) = volume_of(target) else {
            return Access::NotFound;
        };
        if self.0.catalog.open(vol).is_none() {
            return Access::NotFound;
        }
        self.0.policy.access(vol, initiator)
    }
    fn discovery_chap(&self) -> Option<Chap> {
        self.0.policy.discovery_chap()
    }
}

struct Disc<'a> {
    target: &'a Target,
    local: SocketAddr,
}

impl Discovery for Disc<'_> {
    fn send_targets(&self, initiator: &str, which: &str) -> Vec<(String, Vec<String>)> {
        let tag = self.target.config.offer.portal_group_tag;
        let addrs: Vec<String> = self
            .target
            .portals
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|p| {
                // A wildcard portal is reported at the address this
                // connection reached.
                let ip = if p.ip().is_unspecified() {
                    self.local.ip()
                } else {
                    p.ip()
                };
                format!("{},{tag}", SocketAddr::new(ip, p.port()))
            })
            .collect();
        let names = self.target.catalog.names();
        names
            .into_iter()
            .filter(|v| which == "All" || which == format!("{IQN_PREFIX}{v}"))
            .filter(|v| {
                // Only targets the initiator may log in to (RFC 7143
                // §4.3: SendTargets answers with the targets "available
                // to the requesting initiator").
                matches!(self.target.policy.access(v, initiator), Access::Allowed(_))
            })
            .map(|v| (format!("{IQN_PREFIX}{v}"), addrs.clone()))
            .collect()
    }
}

/// Accept connections on one portal until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    target: Arc<Target>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "iscsi accept failed");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&target.slots).try_acquire_owned() else {
            tracing::warn!(%peer, "iscsi connection limit reached; closing");
            continue;
        };
        let t = Arc::clone(&target);
        tokio::spawn(async move {
            let r = connection(stream, &t).await;
            tracing::debug!(%peer, outcome = %r, "iscsi connection closed");
            drop(slot);
        });
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    use std::io::Read;
    let mut b = [0u8; N];
    // The kernel's CSPRNG; CHAP challenges must be unpredictable.
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("reading /dev/urandom");
    b
}

async fn connection(stream: TcpStream, target: &Target) -> String {
    let _ = stream.set_nodelay(true);
    let local = match stream.local_addr() {
        Ok(a) => a,
        Err(e) => return e.to_string(),
    };
    let (r, mut w) = stream.into_split();
    let mut reader = Reader::new(r);
    let rnd: [u8; 20] = random_bytes();
    let mut challenge = [0u8; login::CHAP_CHALLENGE_BYTES];
    challenge.copy_from_slice(&rnd[..16]);
    let stat_sn = u32::from_be_bytes([rnd[16], rnd[17], rnd[18], rnd[19]]);
    let mut lg = Login::new(
        target.config.offer,
        challenge,
        rnd[0],
        target.next_tsih(),
        stat_sn,
    );
    let dir = Dir(target);
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(target.config.login_timeout_ms);
    let done = loop {
        let read = match tokio::time::timeout_at(
            deadline,
            reader.next(Digests::default(), LOGIN_DATA_MAX),
        )
        .await
        {
            Err(_) => return "login timeout".into(),
            Ok(r) => r,
        };
        let p = match read {
            Read::Pdu(p) => p,
            Read::BadData(_) => return "digest error during login".into(),
            Read::Closed => return "closed during login".into(),
            Read::Error(e) => return e,
        };
        match lg.step(&p, &dir) {
            Step::Continue(resp) => {
                if w.write_all(&resp.to_bytes(Digests::default()))
                    .await
                    .is_err()
                {
                    return "write failed".into();
                }
            }
            Step::Fail(resp) => {
                let _ = w.write_all(&resp.to_bytes(Digests::default())).await;
                let _ = w.shutdown().await;
                let st = u16::from_be_bytes([resp.bhs[36], resp.bhs[37]]);
                tracing::info!(status = format!("0x{st:04x}"), "iscsi login refused");
                return format!("login failed 0x{st:04x}");
            }
            Step::Done(resp, done) => {
                if w.write_all(&resp.to_bytes(Digests::default()))
                    .await
                    .is_err()
                {
                    return "write failed".into();
                }
                break done;
            }
        }
    };
    let isid = done.isid;
    let nexus = format!(
        "{},i,0x{}",
        done.initiator,
        isid.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    tracing::info!(initiator = %done.initiator, target = ?done.target, kind = ?done.kind, "iscsi login");
    let (volume, lun): (Option<Arc<dyn Volume>>, Option<Arc<Lun>>) = match done.kind {
        SessionKind::Discovery => (None, None),
        SessionKind::Normal => {
            let name = volume_of(done.target.as_deref().unwrap_or("")).unwrap_or("");
            match target.catalog.open(name) {
                Some(v) => (Some(v), Some(target.lun(name))),
                None => return "volume vanished after login".into(),
            }
        }
    };
    let ident = Identity {
        id: volume
            .as_ref()
            .map_or(0, |v| tessera_wire::map::mix64(fnv(v.name()))),
        serial: volume.as_ref().map_or(String::new(), |v| {
            format!("{:016x}", tessera_wire::map::mix64(fnv(v.name())))
        }),
        target_name: done.target.clone().unwrap_or_default(),
        portal_group_tag: target.config.offer.portal_group_tag,
    };
    if let Some(l) = &lun {
        l.attach(&nexus);
    }
    let p = done.params;
    let digests = Digests {
        header: p.header_digest,
        data: p.data_digest,
    };
    let data_max = p.target_max_recv_data_segment_bytes as usize;
    let mut session = Session::new(
        p,
        done.initiator.clone(),
        done.target.clone(),
        done.exp_cmd_sn,
        done.stat_sn,
    );
    let disc = Disc { target, local };
    let nop = Duration::from_millis(target.config.nop_interval_ms);
    // PDUs come from their own task so that waiting for them can be
    // interrupted by a command finishing.
    let (tx, mut rx) = mpsc::channel(READ_QUEUE);
    let reading = tokio::spawn(read_pdus(reader, digests, data_max, tx));
    let run = Run {
        volume,
        lun: lun.clone(),
        ident: Arc::new(ident),
        nexus: Arc::from(nexus.as_str()),
        persist: target.persist.clone(),
    };
    let mut running: JoinSet<(Task, Outcome)> = JoinSet::new();
    let mut running_bytes: u64 = 0;
    let mut out = Outbox::default();
    let mut effects = Vec::new();
    let mut idle_until = tokio::time::Instant::now() + nop;
    let end = 'conn: loop {
        let room = running.len() < INFLIGHT_MAX && running_bytes < INFLIGHT_BYTES_MAX;
        tokio::select! {
            biased;
            Some(done) = running.join_next(), if !running.is_empty() => {
                let (task, o) = finished(done);
                running_bytes -= task.edtl as u64;
                complete(&mut session, &task, o, digests, &mut out);
            }
            r = rx.recv(), if room => {
                idle_until = tokio::time::Instant::now() + nop;
                let p = match r {
                    Some(Read::Pdu(p)) => p,
                    Some(Read::BadData(hdr)) => {
                        // §7.8 at ERL 0: reject the PDU; its data is lost,
                        // so a command it carried cannot complete: end the
                        // connection.
                        let mut r = Pdu::new(pdu::op::REJECT);
                        r.set_flags(pdu::FLAG_FINAL);
                        r.bhs[2] = pdu::reject::DATA_DIGEST_ERROR;
                        r.set_itt(pdu::TAG_NONE);
                        r.data = hdr.bhs.to_vec();
                        out.pdu(&r, digests);
                        let _ = out.flush(&mut w).await;
                        break "data digest error".to_string();
                    }
                    Some(Read::Closed) | None => break "initiator closed".to_string(),
                    Some(Read::Error(e)) => break e,
                };
                // Task management and logout act on completed tasks only:
                // an aborted task's status must not follow the TMF
                // response, and a reset must not race commands.
                if matches!(p.opcode(), pdu::op::TASK_MGMT_REQUEST | pdu::op::LOGOUT_REQUEST) {
                    drain(&mut running, &mut running_bytes, &mut session, digests, &mut out).await;
                }
                session.receive(p, &disc, &mut effects);
                let mut i = 0;
                while i < effects.len() {
                    let e = std::mem::replace(&mut effects[i], Effect::Close(""));
                    i += 1;
                    match e {
                        Effect::Send(p) => out.pdu(&p, digests),
                        Effect::DataIn(d) => out.data_in(d, digests),
                        Effect::Execute(task) => {
                            if concurrent(&task.cdb) {
                                running_bytes += task.edtl as u64;
                                running.spawn(run.execute(task));
                            } else {
                                // Runs alone: after the commands before
                                // it, before any after it.
                                drain(&mut running, &mut running_bytes, &mut session, digests, &mut out).await;
                                let (task, o) = run.execute(task).await;
                                complete(&mut session, &task, o, digests, &mut out);
                            }
                        }
                        Effect::Reset(kind) => {
                            // SAM-5 §6.3: a reset clears SPC-2 reservations
                            // and raises a unit attention on every I_T
                            // nexus.
                            if matches!(kind, Reset::TargetWarm | Reset::TargetCold) {
                                for l in target.luns.lock().expect("not poisoned").values() {
                                    l.reservations.lock().expect("not poisoned").reset();
                                    l.unit_attention(Sense::new(key::UNIT_ATTENTION, asc::POWER_ON_RESET));
                                }
                            } else if let Some(l) = &lun {
                                l.reservations.lock().expect("not poisoned").reset();
                                l.unit_attention(Sense::new(key::UNIT_ATTENTION, asc::BUS_DEVICE_RESET));
                            }
                        }
                        Effect::Close(why) => {
                            let _ = out.flush(&mut w).await;
                            break 'conn why.to_string();
                        }
                    }
                }
                effects.clear();
            }
            _ = tokio::time::sleep_until(idle_until), if running.is_empty() => {
                // Idle: ping, or give up on an initiator that did not
                // answer the previous ping.
                idle_until = tokio::time::Instant::now() + nop;
                match session.ping() {
                    Some(ping) => out.pdu(&ping, digests),
                    None => break "initiator did not answer NOP-In".to_string(),
                }
            }
        }
        // Answer every other command that has finished meanwhile in the
        // same write: on loopback a send (which runs the receiver's TCP
        // stack) costs more than a command, and at queue depth 32 storage
        // replies arrive in batches that finish several commands at once.
        while let Some(done) = running.try_join_next() {
            let (task, o) = finished(done);
            running_bytes -= task.edtl as u64;
            complete(&mut session, &task, o, digests, &mut out);
        }
        if !out.is_empty() && out.flush(&mut w).await.is_err() {
            break "write failed".to_string();
        }
    };
    reading.abort();
    // Commands still running finish (their writes are not torn), unanswered.
    while running.join_next().await.is_some() {}
    if let Some(l) = &lun {
        l.reservations
            .lock()
            .expect("not poisoned")
            .nexus_lost(&nexus);
        l.detach(&nexus);
    }
    let _ = w.shutdown().await;
    end
}

/// Read PDUs until the connection ends or the receiver goes away.
async fn read_pdus(
    mut reader: Reader<tokio::net::tcp::OwnedReadHalf>,
    digests: Digests,
    data_max: usize,
    tx: mpsc::Sender<Read>,
) {
    loop {
        let r = reader.next(digests, data_max).await;
        let last = !matches!(r, Read::Pdu(_));
        if tx.send(r).await.is_err() || last {
            return;
        }
    }
}

/// What a spawned command needs, shared by the connection's commands.
struct Run {
    volume: Option<Arc<dyn Volume>>,
    lun: Option<Arc<Lun>>,
    ident: Arc<Identity>,
    nexus: Arc<str>,
    persist: Option<Arc<dyn Persist>>,
}

impl Run {
    fn execute(&self, mut task: Task) -> impl Future<Output = (Task, Outcome)> + Send + 'static {
        let (Some(v), Some(l)) = (self.volume.clone(), self.lun.clone()) else {
            unreachable!("the session refuses SCSI commands in discovery sessions")
        };
        let (ident, nexus, persist) = (
            Arc::clone(&self.ident),
            Arc::clone(&self.nexus),
            self.persist.clone(),
        );
        async move {
            let o = exec::execute(
                v.as_ref(),
                &l,
                &ident,
                &nexus,
                persist.as_deref(),
                &mut task,
            )
            .await;
            (task, o)
        }
    }
}

/// Whether a command may run while others of its connection run: the data
/// path (SIMPLE task attribute semantics, SAM-5 §8.6: any order). The rest
/// (mode pages, reservations, reports) runs alone, in order.
fn concurrent(cdb: &[u8; 16]) -> bool {
    use super::scsi::opc::*;
    matches!(
        cdb[0],
        READ_6
            | READ_10
            | READ_12
            | READ_16
            | WRITE_6
            | WRITE_10
            | WRITE_12
            | WRITE_16
            | VERIFY_10
            | VERIFY_12
            | VERIFY_16
            | WRITE_VERIFY_10
            | WRITE_VERIFY_12
            | WRITE_VERIFY_16
            | COMPARE_AND_WRITE
            | ORWRITE_16
            | WRITE_SAME_10
            | WRITE_SAME_16
            | UNMAP
            | PRE_FETCH_10
            | PRE_FETCH_16
            | SYNCHRONIZE_CACHE_10
            | SYNCHRONIZE_CACHE_16
            | SERVICE_ACTION_IN_16
    )
}

fn finished(r: Result<(Task, Outcome), tokio::task::JoinError>) -> (Task, Outcome) {
    match r {
        Ok(x) => x,
        // A bug in a command: let it surface as the panic it is.
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

fn complete(session: &mut Session, task: &Task, o: Outcome, digests: Digests, out: &mut Outbox) {
    let mut more = Vec::new();
    session.complete(task, o, &mut more);
    for m in more {
        match m {
            Effect::Send(p) => out.pdu(&p, digests),
            Effect::DataIn(d) => out.data_in(d, digests),
            _ => unreachable!("completing a task only sends"),
        }
    }
}

/// Wait for every running command and answer it.
async fn drain(
    running: &mut JoinSet<(Task, Outcome)>,
    running_bytes: &mut u64,
    session: &mut Session,
    digests: Digests,
    out: &mut Outbox,
) {
    while let Some(done) = running.join_next().await {
        let (task, o) = finished(done);
        *running_bytes -= task.edtl as u64;
        complete(session, &task, o, digests, out);
    }
}

/// FNV-1a of a volume name: the seed of its stable SCSI identifiers.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}
