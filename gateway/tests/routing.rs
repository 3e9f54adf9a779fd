//! The routed volume against a fake storage daemon speaking the internal
//! protocol on 127.0.0.1: chunk splitting, FUA, flush fan-out, StaleEpoch
//! retry after a map refresh, and reconnection after a daemon restart.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tessera_gateway::client::Pool;
use tessera_gateway::map::{MapHandle, publish};
use tessera_gateway::metrics::Metrics;
use tessera_gateway::routing::{MapCatalog, Router};
use tessera_gateway::volume::{Catalog, VolumeError};
use tessera_wire::header::{HEADER_SIZE, open_payload, seal_payload};
use tessera_wire::map::{ClusterMap, DiskEntry, NodeEntry, VolumeEntry};
use tessera_wire::{Flags, Header, Op, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const CHUNK: u64 = 1 << 20;

/// One request as the fake daemon saw it: (op, chunk, offset, length,
/// fua, disk).
type Seen = (Op, u32, u32, u32, bool, u32);

#[derive(Default)]
struct Fake {
    /// (volume, chunk) → chunk bytes.
    chunks: Mutex<HashMap<(u64, u32), Vec<u8>>>,
    /// Every request seen: (op, chunk, offset, length, fua, disk).
    log: Mutex<Vec<Seen>>,
    /// Reply StaleEpoch to this many requests first.
    stale: AtomicU32,
    /// Bumped to kill every open connection, as a daemon crash would.
    kill: Option<tokio::sync::watch::Sender<u32>>,
}

impl Fake {
    fn new() -> Fake {
        Fake {
            kill: Some(tokio::sync::watch::channel(0).0),
            ..Fake::default()
        }
    }
}

async fn serve_fake(listener: TcpListener, fake: Arc<Fake>) {
    while let Ok((mut s, _)) = listener.accept().await {
        let fake = Arc::clone(&fake);
        let mut killed = fake.kill.as_ref().unwrap().subscribe();
        tokio::spawn(async move {
            let mut b = [0u8; HEADER_SIZE];
            loop {
                tokio::select! {
                    r = s.read_exact(&mut b) => if r.is_err() { return },
                    _ = killed.changed() => return,
                }
                let h = Header::decode(&b).expect("valid request header");
                let mut p = vec![0u8; h.payload_len as usize];
                s.read_exact(&mut p).await.unwrap();
                if h.op == Op::Hello {
                    assert_eq!(open_payload(&p), Some(&b"cluster"[..]));
                    s.write_all(&h.reply_to(Status::Ok, h.epoch, 0).to_bytes())
                        .await
                        .unwrap();
                    continue;
                }
                fake.log.lock().unwrap().push((
                    h.op,
                    h.chunk_index,
                    h.offset,
                    h.length,
                    h.flags.contains(Flags::FUA),
                    h.disk_id,
                ));
                if fake
                    .stale
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    s.write_all(&h.reply_to(Status::StaleEpoch, h.epoch, 0).to_bytes())
                        .await
                        .unwrap();
                    continue;
                }
                let (o, l) = (h.offset as usize, h.length as usize);
                let mut out = Vec::new();
                {
                    let mut chunks = fake.chunks.lock().unwrap();
                    let c = chunks
                        .entry((h.volume_id, h.chunk_index))
                        .or_insert_with(|| vec![0u8; CHUNK as usize]);
                    match h.op {
                        Op::Write => c[o..o + l].copy_from_slice(open_payload(&p).unwrap()),
                        Op::Read => {
                            out = c[o..o + l].to_vec();
                            seal_payload(&mut out);
                        }
                        Op::Trim | Op::WriteZeroes => c[o..o + l].fill(0),
                        _ => {}
                    }
                }
                let r = h.reply_to(Status::Ok, h.epoch, out.len() as u32);
                s.write_all(&r.to_bytes()).await.unwrap();
                s.write_all(&out).await.unwrap();
            }
        });
    }
}

fn cluster_map(epoch: u64, addr: SocketAddr) -> ClusterMap {
    ClusterMap {
        epoch,
        cluster_id: "cluster".into(),
        pg_count: 4,
        nodes: vec![NodeEntry {
            id: 1,
            addr: addr.to_string(),
            up: true,
            zone: String::new(),
            rack: String::new(),
            host: String::new(),
        }],
        disks: (1..=2)
            .map(|id| DiskEntry {
                id,
                node_id: 1,
                uuid: format!("d{id}"),
                capacity_bytes: 1 << 30,
                up: true,
                incarnation: 0,
                out: false,
                up_since: None,
            })
            .collect(),
        pgs: vec![vec![1], vec![2], vec![1], vec![2]],
        volumes: vec![VolumeEntry {
            id: 1,
            name: "v".into(),
            size_bytes: 8 * CHUNK,
            chunk_size_bytes: CHUNK,
            block_size: 512,
            pool_id: 0,
        }],
        next_volume_id: 2,
        pools: vec![],
        pg_states: vec![],
    }
}

fn router(
    map: ClusterMap,
    io_timeout: Duration,
) -> (MapCatalog, tokio::sync::watch::Sender<Arc<ClusterMap>>) {
    let (maps, tx) = MapHandle::fixed(map);
    let router = Arc::new(Router {
        maps,
        pool: Pool::new("cluster".into()),
        io_timeout,
        metrics: Metrics::new(),
    });
    (MapCatalog { router }, tx)
}

// Proves a write spanning chunks is split per chunk with FUA on each piece,
// reads back through the same split, and FLUSH reaches every acting disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_write_read_flush() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = Arc::new(Fake::new());
    tokio::spawn(serve_fake(listener, Arc::clone(&fake)));
    let (catalog, _tx) = router(cluster_map(1, addr), Duration::from_secs(10));
    assert_eq!(catalog.names(), ["v"]);
    assert!(catalog.open("").is_none());
    let v = catalog.open("v").unwrap();
    assert_eq!(v.size_bytes(), 8 * CHUNK);
    let data: Vec<u8> = (0..(CHUNK as usize + 8192))
        .map(|i| (i % 253) as u8)
        .collect();
    v.write(CHUNK - 4096, data.clone(), true).await.unwrap();
    assert_eq!(v.read(CHUNK - 4096, data.len() as u32).await.unwrap(), data);
    {
        let log = fake.log.lock().unwrap();
        let writes: Vec<_> = log.iter().filter(|e| e.0 == Op::Write).collect();
        assert_eq!(writes.len(), 3);
        assert!(writes.iter().all(|w| w.4), "FUA on every piece");
        assert_eq!(
            (writes[0].1, writes[0].2, writes[0].3),
            (0, (CHUNK - 4096) as u32, 4096)
        );
    }
    v.flush().await.unwrap();
    let mut flushed: Vec<u32> = fake
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.0 == Op::Flush)
        .map(|e| e.5)
        .collect();
    flushed.sort();
    assert_eq!(flushed, [1, 2]);
    v.write_zeroes(CHUNK, 4096, false).await.unwrap();
    assert_eq!(v.read(CHUNK, 4096).await.unwrap(), vec![0u8; 4096]);
}

// Proves StaleEpoch makes the gateway wait for a newer map and retry, and
// the retry carries the new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epoch_retries_with_new_map() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = Arc::new(Fake::new());
    fake.stale.store(1, Ordering::SeqCst);
    tokio::spawn(serve_fake(listener, Arc::clone(&fake)));
    let (catalog, tx) = router(cluster_map(1, addr), Duration::from_secs(10));
    let v = catalog.open("v").unwrap();
    let publisher = tokio::spawn(async move {
        // Publish once the first (stale) attempt has been answered.
        while fake.stale.load(Ordering::SeqCst) > 0 {
            tokio::task::yield_now().await;
        }
        publish(&tx, cluster_map(2, addr));
        tx
    });
    v.write(0, vec![7u8; 4096], false).await.unwrap();
    let _tx = publisher.await.unwrap();
    assert_eq!(v.read(0, 4096).await.unwrap(), vec![7u8; 4096]);
}

// Proves a storage daemon restart is survived (reconnect and retry), and
// that with no daemon at all the request fails once the I/O timeout passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_restart_and_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = Arc::new(Fake::new());
    let server = tokio::spawn(serve_fake(listener, Arc::clone(&fake)));
    let (catalog, _tx) = router(cluster_map(1, addr), Duration::from_secs(20));
    let v = catalog.open("v").unwrap();
    v.write(0, vec![1u8; 512], false).await.unwrap();
    // Kill the daemon: stop accepting and drop every open connection, then
    // restart it on the same port.
    server.abort();
    let _ = server.await;
    fake.kill.as_ref().unwrap().send_modify(|k| *k += 1);
    let fake2 = Arc::clone(&fake);
    let restart = tokio::spawn(async move {
        let l = loop {
            if let Ok(l) = TcpListener::bind(addr).await {
                break l;
            }
            tokio::task::yield_now().await;
        };
        serve_fake(l, fake2).await
    });
    assert_eq!(v.read(0, 512).await.unwrap(), vec![1u8; 512]);
    restart.abort();

    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let (catalog, _tx) = router(cluster_map(1, dead_addr), Duration::from_millis(300));
    let v = catalog.open("v").unwrap();
    assert_eq!(v.read(0, 512).await, Err(VolumeError::Timeout));
}
