//! The replica service (`node::replica`) on a real store (io_uring and
//! psync, files under the target dir), called directly and through a real
//! peer server over TCP: data byte-exact, fencing by generation (across a
//! restart) and epoch, dirty regions, crc tables, hostile requests.

use basalt::layout::Layout;
use basalt::net::{
    ClientConfig, PeerError, PeerHandler, PeerInfo, PeerPool, PeerServer, ReplyFuture, ServerConfig,
};
use basalt::node::fence::Fences;
use basalt::node::replica::ReplicaService;
use basalt::node::suspect::Suspects;
use basalt::proto::peer::{
    BlockCrcs, ErrorCode, ExtentCrcs, ExtentErr, ExtentError, ExtentFlush, ExtentRead, ExtentReadReply,
    ExtentState, ExtentTarget, ExtentTrim, ExtentWrite, ExtentWriteZeroes, ExtentsDirty, Message,
};
use basalt::storage::{EngineKind, Store, StoreConfig, StoreOptions};
use basalt::types::{ClusterId, Epoch, ExtentIndex, ExtentKey, Generation, NodeId, VolumeId};
use bytes::Bytes;
use std::path::Path;
use std::sync::Arc;

const EXTENT: u64 = 4 << 20;
const REGION: u32 = 256 << 10;
const VOLUME: VolumeId = VolumeId(1);
const OWNER: NodeId = NodeId(77);
const ENGINES: [EngineKind; 2] = [EngineKind::Uring, EngineKind::Psync];

fn pattern(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

fn at(extent: u64, epoch: u64, generation: u64) -> ExtentTarget {
    ExtentTarget {
        volume: VOLUME,
        extent: ExtentIndex(extent),
        epoch: Epoch(epoch),
        generation: Generation(generation),
    }
}

/// One replica node: a store and fences under a temporary directory.
struct Replica {
    kind: EngineKind,
    dir: tempfile::TempDir,
    store: Arc<Store>,
    svc: Arc<ReplicaService>,
}

impl Replica {
    async fn new(kind: EngineKind) -> Replica {
        let dir =
            tempfile::Builder::new().prefix("replica-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let (store, svc) = Replica::start(kind, dir.path()).await;
        Replica { kind, dir, store, svc }
    }

    async fn start(kind: EngineKind, dir: &Path) -> (Arc<Store>, Arc<ReplicaService>) {
        let cfg = StoreConfig { data_dirs: vec![dir.join("data")], engine: kind };
        let opts = StoreOptions { region_size: REGION, clean_after_flushes: 1, ..Default::default() };
        let store = Store::open_with(cfg, opts).await.unwrap();
        assert_eq!(store.engine_kind(), kind);
        let fences = Fences::open(&dir.join("state/fences")).unwrap();
        let layout = Layout::contiguous(EXTENT).unwrap();
        let svc =
            ReplicaService::new(store.clone(), fences, Arc::new(move |v| (v == VOLUME).then_some(layout)));
        (store, svc)
    }

    /// A start as the daemon does it: the record of suspect replicas read
    /// from the state dir, and after a crash every dirty replica added.
    async fn start_as_daemon(
        kind: EngineKind,
        dir: &Path,
        crashed: bool,
    ) -> (Arc<Store>, Arc<ReplicaService>) {
        let cfg = StoreConfig { data_dirs: vec![dir.join("data")], engine: kind };
        let opts = StoreOptions { region_size: REGION, clean_after_flushes: 1, ..Default::default() };
        let store = Store::open_with(cfg, opts).await.unwrap();
        let fences = Fences::open(&dir.join("state/fences")).unwrap();
        let suspects = Suspects::open(&dir.join("state"), &store).unwrap();
        if crashed {
            suspects.record_crash(&store).unwrap();
        }
        let layout = Layout::contiguous(EXTENT).unwrap();
        let svc = ReplicaService::with_suspects(
            store.clone(),
            fences,
            Arc::new(move |v| (v == VOLUME).then_some(layout)),
            suspects,
        );
        (store, svc)
    }

    /// A restart: the store and the fences opened again from disk.
    async fn reopen(&mut self) {
        self.store.close().await.unwrap();
        let (store, svc) = Replica::start(self.kind, self.dir.path()).await;
        self.store = store;
        self.svc = svc;
    }

    async fn ask(&self, m: Message) -> Message {
        self.svc.handle(OWNER, m).await
    }

    async fn write(&self, t: ExtentTarget, offset: u64, data: Bytes) -> Message {
        self.ask(Message::ExtentWrite(ExtentWrite { target: t, offset, fua: false, copy: false, data })).await
    }

    async fn read(&self, t: ExtentTarget, offset: u64, len: u32) -> Bytes {
        match self.ask(Message::ExtentRead(ExtentRead { target: t, offset, len })).await {
            Message::ExtentReadReply(ExtentReadReply { crcs: None, data }) => data,
            other => panic!("read {offset}+{len}: {other:?}"),
        }
    }

    async fn flush(&self, t: ExtentTarget) {
        let m = self.ask(Message::ExtentFlush(ExtentFlush { target: t, flush_number: 1 })).await;
        assert_eq!(m, Message::ExtentOk);
    }

    async fn status(&self, t: ExtentTarget) -> ExtentState {
        match self.ask(Message::ExtentStatus(t)).await {
            Message::ExtentStatusReply(s) => s,
            other => panic!("status: {other:?}"),
        }
    }

    async fn crcs(&self, t: ExtentTarget, offset: u64, len: u64) -> Message {
        self.ask(Message::ExtentCrcs(ExtentCrcs { target: t, offset, len })).await
    }
}

fn err(m: Message) -> ExtentError {
    match m {
        Message::ExtentErr(ExtentErr { error, .. }) => error,
        other => panic!("expected an extent error, got {other:?}"),
    }
}

fn zeros(n: usize) -> Bytes {
    Bytes::from(vec![0u8; n])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_read_zeroes_trim_and_flush_are_byte_exact() {
    for kind in ENGINES {
        let r = Replica::new(kind).await;
        let t = at(0, 1, 1);
        let data = pattern(1, 64 << 10);
        assert_eq!(r.write(t, 8192, data.clone()).await, Message::ExtentOk, "{kind:?}");
        assert_eq!(r.read(t, 8192, 64 << 10).await, data);
        // A read across written data and holes: zeros around the data.
        let mut want = vec![0u8; 8192];
        want.extend_from_slice(&data);
        want.resize(128 << 10, 0);
        assert_eq!(r.read(t, 0, 128 << 10).await, Bytes::from(want.clone()));
        // A partial block (512 bytes inside one) keeps the rest of it.
        let small = pattern(2, 512);
        assert_eq!(r.write(t, 8192 + 1024, small.clone()).await, Message::ExtentOk);
        want[8192 + 1024..8192 + 1536].copy_from_slice(&small);
        // Zeroes (allocated) over [16K, 24K), trim over [40K, 48K), one FUA.
        let z = ExtentWriteZeroes { target: t, offset: 16 << 10, len: 8 << 10, deallocate: false, fua: true };
        assert_eq!(r.ask(Message::ExtentWriteZeroes(z)).await, Message::ExtentOk);
        want[16 << 10..24 << 10].fill(0);
        let tr = ExtentTrim { target: t, offset: 40 << 10, len: 8 << 10, fua: false };
        assert_eq!(r.ask(Message::ExtentTrim(tr)).await, Message::ExtentOk);
        want[40 << 10..48 << 10].fill(0);
        r.flush(t).await;
        assert_eq!(r.read(t, 0, 128 << 10).await, Bytes::from(want.clone()));
        let fua =
            ExtentWrite { target: t, offset: EXTENT - 4096, fua: true, copy: false, data: pattern(3, 4096) };
        assert_eq!(r.ask(Message::ExtentWrite(fua)).await, Message::ExtentOk);
        assert_eq!(r.read(t, EXTENT - 4096, 4096).await, pattern(3, 4096));
        // A never-written extent reads as zeros and is not created by it,
        // nor by zeroes, trim or flush.
        let t2 = at(2, 1, 1);
        assert_eq!(r.read(t2, 4096, 1 << 20).await, zeros(1 << 20));
        let z = ExtentWriteZeroes { target: t2, offset: 0, len: 4096, deallocate: true, fua: true };
        assert_eq!(r.ask(Message::ExtentWriteZeroes(z)).await, Message::ExtentOk);
        let tr = ExtentTrim { target: t2, offset: 0, len: 4096, fua: true };
        assert_eq!(r.ask(Message::ExtentTrim(tr)).await, Message::ExtentOk);
        r.flush(t2).await;
        let key2 = ExtentKey { volume: VOLUME, index: ExtentIndex(2) };
        assert!(!r.store.contains(key2), "{kind:?}: nothing but a write creates an extent");
        assert_eq!(r.status(t2).await, ExtentState::absent(Generation(1), Epoch(1)));
        // Everything flushed survives a restart.
        let mut r = r;
        r.reopen().await;
        assert_eq!(r.read(t, 0, 128 << 10).await, Bytes::from(want));
        assert_eq!(r.svc.refused(), 0);
    }
}

struct Served(Arc<ReplicaService>);

impl PeerHandler for Served {
    fn request(&self, peer: PeerInfo, request: Message) -> ReplyFuture {
        let svc = self.0.clone();
        Box::pin(async move { svc.handle(peer.node, request).await })
    }

    fn one_way(&self, _peer: PeerInfo, _message: Message) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_through_a_peer_server_over_tcp() {
    const CLUSTER: ClusterId = ClusterId(0x5eed_0000_0000_0000_0000_0000_0000_0013);
    for kind in ENGINES {
        let r = Replica::new(kind).await;
        let srv = PeerServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            ServerConfig::new(CLUSTER, NodeId(1)),
            Arc::new(Served(r.svc.clone())),
        )
        .await
        .unwrap();
        let pool = PeerPool::new(ClientConfig::new(CLUSTER, OWNER));
        let c = pool.client(srv.local_addr());
        let t = at(1, 2, 3);
        // Many writes in flight at once, each to its own range.
        let writes = (0..32u64).map(|i| {
            let c = c.clone();
            async move {
                let w = ExtentWrite {
                    target: t,
                    offset: i * 65536,
                    fua: i % 5 == 0,
                    copy: false,
                    data: pattern(i, 65536),
                };
                c.request(Message::ExtentWrite(w)).await.unwrap()
            }
        });
        for reply in futures::future::join_all(writes).await {
            assert_eq!(reply, Message::ExtentOk, "{kind:?}");
        }
        let read = c.request(Message::ExtentRead(ExtentRead { target: t, offset: 0, len: 32 * 65536 })).await;
        let Message::ExtentReadReply(ExtentReadReply { data, .. }) = read.unwrap() else { panic!() };
        let want: Vec<u8> = (0..32u64).flat_map(|i| pattern(i, 65536).to_vec()).collect();
        assert_eq!(data, Bytes::from(want.clone()));
        let flush = ExtentFlush { target: t, flush_number: 1 };
        assert_eq!(c.request(Message::ExtentFlush(flush)).await.unwrap(), Message::ExtentOk);
        let crcs = c.request(Message::ExtentCrcs(ExtentCrcs { target: t, offset: 0, len: 8192 })).await;
        let expect: Vec<u32> = want[..8192].chunks(4096).map(crc32c::crc32c).collect();
        assert_eq!(crcs.unwrap(), Message::ExtentCrcsReply(BlockCrcs { block_size: 4096, crcs: expect }));
        // A stale generation over the wire: the exact error.
        let old =
            ExtentWrite { target: at(1, 2, 2), offset: 0, fua: false, copy: false, data: pattern(9, 4096) };
        let reply = c.request(Message::ExtentWrite(old)).await.unwrap();
        assert_eq!(err(reply), ExtentError::StaleGeneration { current: Generation(3) });
        // Not an extent request.
        let reply = c.request(Message::MetaRequest(Bytes::from_static(b"x"))).await;
        assert!(matches!(reply, Err(PeerError::Remote { code: ErrorCode::Unsupported, .. })), "{reply:?}");
        srv.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_generation_is_refused_also_after_a_restart() {
    for kind in ENGINES {
        let mut r = Replica::new(kind).await;
        assert_eq!(r.write(at(0, 1, 5), 0, pattern(1, 4096)).await, Message::ExtentOk);
        for g in [0, 4] {
            let m = r.write(at(0, 1, g), 0, pattern(2, 4096)).await;
            assert_eq!(err(m), ExtentError::StaleGeneration { current: Generation(5) }, "{kind:?}");
        }
        // Every kind is fenced, reads included.
        let m = r.ask(Message::ExtentRead(ExtentRead { target: at(0, 1, 4), offset: 0, len: 4096 })).await;
        assert_eq!(err(m), ExtentError::StaleGeneration { current: Generation(5) });
        let m = r.ask(Message::ExtentStatus(at(3, 1, 1))).await;
        assert_eq!(err(m), ExtentError::StaleGeneration { current: Generation(5) });
        r.reopen().await;
        let m = r.write(at(0, 1, 4), 0, pattern(2, 4096)).await;
        assert_eq!(
            err(m),
            ExtentError::StaleGeneration { current: Generation(5) },
            "{kind:?} after a restart"
        );
        assert_eq!(r.read(at(0, 1, 5), 0, 4096).await, pattern(1, 4096), "the refused write left nothing");
        assert_eq!(r.status(at(0, 1, 6)).await.generation, Generation(6));
        r.reopen().await;
        assert_eq!(r.svc.fences().current(VOLUME), Generation(6));
        let file = std::fs::read(r.dir.path().join("state/fences/v1")).unwrap();
        assert_eq!(&file[..4], b"BFEN");
        assert_eq!(u64::from_le_bytes(file[4..12].try_into().unwrap()), 6);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_generation_is_persisted_before_the_request_applies() {
    for kind in ENGINES {
        let r = Replica::new(kind).await;
        // The fence file cannot be replaced (a directory stands in its
        // place): raising the generation fails, so the write must not happen.
        let blocker = r.dir.path().join("state/fences/v1");
        std::fs::create_dir(&blocker).unwrap();
        std::fs::write(blocker.join("keep"), b"x").unwrap();
        let m = r.write(at(0, 1, 7), 0, pattern(1, 4096)).await;
        assert_eq!(err(m), ExtentError::Io, "{kind:?}");
        let key = ExtentKey { volume: VOLUME, index: ExtentIndex(0) };
        assert!(!r.store.contains(key), "{kind:?}: nothing applied without the fence on disk");
        assert_eq!(r.svc.fences().current(VOLUME), Generation(0));
        std::fs::remove_dir_all(&blocker).unwrap();
        // Concurrent raisers: all admitted, one generation on disk.
        let writes = (0..8u64).map(|i| r.write(at(0, 1, 9), i * 4096, pattern(i, 4096)));
        for m in futures::future::join_all(writes).await {
            assert_eq!(m, Message::ExtentOk);
        }
        assert_eq!(r.svc.fences().current(VOLUME), Generation(9));
        let file = std::fs::read(r.dir.path().join("state/fences/v1")).unwrap();
        assert_eq!(u64::from_le_bytes(file[4..12].try_into().unwrap()), 9);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_epoch_is_refused_and_a_newer_one_observed() {
    for kind in ENGINES {
        let mut r = Replica::new(kind).await;
        assert_eq!(r.write(at(0, 3, 1), 0, pattern(1, 4096)).await, Message::ExtentOk);
        let m = r.write(at(0, 2, 1), 0, pattern(2, 4096)).await;
        assert_eq!(err(m), ExtentError::StaleEpoch { current: Epoch(3) }, "{kind:?}");
        assert_eq!(r.write(at(0, 4, 1), 4096, pattern(3, 4096)).await, Message::ExtentOk);
        let m = r.ask(Message::ExtentRead(ExtentRead { target: at(0, 3, 1), offset: 0, len: 4096 })).await;
        assert_eq!(err(m), ExtentError::StaleEpoch { current: Epoch(4) });
        assert_eq!(r.status(at(0, 4, 1)).await.epoch, Epoch(4));
        // Epochs are per extent: extent 1 never saw one.
        assert_eq!(r.write(at(1, 1, 1), 0, pattern(4, 4096)).await, Message::ExtentOk);
        // Recorded in the header by the flush, so a restart keeps it.
        r.flush(at(0, 4, 1)).await;
        r.reopen().await;
        let m = r.write(at(0, 3, 1), 0, pattern(2, 4096)).await;
        assert_eq!(err(m), ExtentError::StaleEpoch { current: Epoch(4) }, "{kind:?} after a restart");
        assert_eq!(r.read(at(0, 4, 1), 0, 8192).await, [pattern(1, 4096), pattern(3, 4096)].concat());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_regions_follow_the_extents_activity_log() {
    for kind in ENGINES {
        let r = Replica::new(kind).await;
        let t = at(0, 1, 1);
        let region = u64::from(REGION);
        assert_eq!(r.write(t, 0, pattern(1, 4096)).await, Message::ExtentOk);
        assert_eq!(r.write(t, 5 * region + 8192, pattern(2, 8192)).await, Message::ExtentOk);
        let s = r.status(t).await;
        assert_eq!(
            s,
            ExtentState {
                exists: true,
                flush_number: 0,
                generation: Generation(1),
                epoch: Epoch(1),
                region_size: REGION,
                dirty_regions: vec![0, 5],
            },
            "{kind:?}"
        );
        assert_eq!(s.dirty_ranges(), vec![(0, region), (5 * region, region)]);
        // The first flush makes the writes durable, but a region is marked
        // clean only by a later flush (never by the sync that made its
        // table page durable) after a flush interval without writes.
        r.flush(t).await;
        let s = r.status(t).await;
        assert_eq!((s.flush_number, s.dirty_regions), (1, vec![0, 5]), "{kind:?}");
        assert_eq!(r.write(t, 9 * region, pattern(3, 4096)).await, Message::ExtentOk);
        r.flush(t).await;
        let s = r.status(t).await;
        assert_eq!((s.flush_number, s.dirty_regions), (2, vec![9]), "{kind:?}");
        // A clean shutdown clears every idle region.
        r.store.close().await.unwrap();
        assert_eq!(r.status(t).await.dirty_regions, Vec::<u32>::new());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crc_tables_of_two_replicas_match_until_one_differs() {
    for kind in ENGINES {
        let a = Replica::new(kind).await;
        let b = Replica::new(kind).await;
        let t = at(0, 1, 1);
        for r in [&a, &b] {
            assert_eq!(r.write(t, 0, pattern(1, 256 << 10)).await, Message::ExtentOk);
            assert_eq!(r.write(t, 1 << 20, pattern(2, 4096)).await, Message::ExtentOk);
        }
        // Zeros written on one, a hole (trimmed) on the other: equal.
        assert_eq!(a.write(t, 2 << 20, zeros(8192)).await, Message::ExtentOk);
        assert_eq!(b.write(t, 2 << 20, pattern(5, 8192)).await, Message::ExtentOk);
        let tr = ExtentTrim { target: t, offset: 2 << 20, len: 8192, fua: false };
        assert_eq!(b.ask(Message::ExtentTrim(tr)).await, Message::ExtentOk);
        let whole = |m: Message| match m {
            Message::ExtentCrcsReply(c) => c,
            other => panic!("{other:?}"),
        };
        let ca = whole(a.crcs(t, 0, EXTENT).await);
        let cb = whole(b.crcs(t, 0, EXTENT).await);
        assert_eq!(ca.block_size, 4096);
        assert_eq!(ca.crcs.len(), (EXTENT / 4096) as usize);
        assert_eq!(ca, cb, "{kind:?}");
        assert_eq!(ca.crcs[0], crc32c::crc32c(&pattern(1, 256 << 10)[..4096]));
        assert_eq!(ca.crcs[100], crc32c::crc32c(&[0; 4096]), "a hole has the crc of zeros");
        // One block differs on b: exactly that crc differs.
        assert_eq!(b.write(t, 77 * 4096 + 512, pattern(9, 512)).await, Message::ExtentOk);
        let cb = whole(b.crcs(t, 0, EXTENT).await);
        let differ: Vec<usize> = (0..ca.crcs.len()).filter(|&i| ca.crcs[i] != cb.crcs[i]).collect();
        assert_eq!(differ, vec![77], "{kind:?}");
        // A never-written extent: zero crcs, nothing created.
        let c = whole(a.crcs(at(3, 1, 1), 4096, 8192).await);
        assert_eq!(c.crcs, vec![crc32c::crc32c(&[0; 4096]); 2]);
        assert!(!a.store.contains(ExtentKey { volume: VOLUME, index: ExtentIndex(3) }));
        // A crc query of a newer generation does not fence the owner.
        assert!(matches!(a.crcs(at(0, 1, 8), 0, 4096).await, Message::ExtentCrcsReply(_)));
        assert_eq!(a.svc.fences().current(VOLUME), Generation(1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_the_exact_error() {
    for kind in ENGINES {
        let r = Replica::new(kind).await;
        let t = at(0, 1, 1);
        let write = |offset: u64, len: usize| {
            Message::ExtentWrite(ExtentWrite {
                target: t,
                offset,
                fua: false,
                copy: false,
                data: pattern(1, len),
            })
        };
        let read = |offset: u64, len: u32| Message::ExtentRead(ExtentRead { target: t, offset, len });
        let zeroes = |offset: u64, len: u64| {
            Message::ExtentWriteZeroes(ExtentWriteZeroes {
                target: t,
                offset,
                len,
                deallocate: true,
                fua: false,
            })
        };
        let trim =
            |offset: u64, len: u64| Message::ExtentTrim(ExtentTrim { target: t, offset, len, fua: false });
        let crcs = |offset: u64, len: u64| Message::ExtentCrcs(ExtentCrcs { target: t, offset, len });
        let cases = [
            (write(u64::MAX - 511, 512), ExtentError::OutOfRange),
            (write(0, 0), ExtentError::OutOfRange),
            (write(EXTENT - 512, 1024), ExtentError::OutOfRange),
            (write(EXTENT, 512), ExtentError::OutOfRange),
            (write(100, 512), ExtentError::Misaligned),
            (write(512, 100), ExtentError::Misaligned),
            (read(u64::MAX - 4095, 4096), ExtentError::OutOfRange),
            (read(0, 0), ExtentError::OutOfRange),
            (read(EXTENT - 4096, 8192), ExtentError::OutOfRange),
            (read(1, 512), ExtentError::Misaligned),
            (zeroes(4096, u64::MAX), ExtentError::OutOfRange),
            (zeroes(0, EXTENT + 512), ExtentError::OutOfRange),
            (zeroes(0, 0), ExtentError::OutOfRange),
            (trim(u64::MAX, 1), ExtentError::OutOfRange),
            (trim(7, 512), ExtentError::Misaligned),
            (crcs(0, 0), ExtentError::OutOfRange),
            (crcs(512, 4096), ExtentError::Misaligned),
            (crcs(0, EXTENT + 4096), ExtentError::OutOfRange),
            (crcs(u64::MAX - 4095, 8192), ExtentError::OutOfRange),
            (Message::ExtentStatus(ExtentTarget { volume: VolumeId(2), ..t }), ExtentError::NotFound),
            (
                Message::ExtentWrite(ExtentWrite {
                    target: ExtentTarget { volume: VolumeId(99), ..t },
                    offset: 0,
                    fua: false,
                    copy: false,
                    data: pattern(1, 512),
                }),
                ExtentError::NotFound,
            ),
            (Message::ExtentStatus(at(u64::MAX, 1, 1)), ExtentError::NotFound),
            (Message::ExtentStatus(at((1 << 56) / EXTENT, 1, 1)), ExtentError::NotFound),
        ];
        let n = cases.len() as u64;
        for (m, want) in cases {
            let shown = format!("{m:?}");
            assert_eq!(err(r.ask(m).await), want, "{kind:?}: {}", &shown[..shown.len().min(200)]);
        }
        assert_eq!(r.svc.refused(), n);
        let m = r.ask(Message::Ping).await;
        assert!(matches!(m, Message::Error(e) if e.code == ErrorCode::Unsupported));
        // Nothing of it created a file, and the last extent index is fine.
        assert!(r.store.extent_keys().is_empty());
        assert!(!r.status(at((1 << 56) / EXTENT - 1, 1, 1)).await.exists);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checksum_error_names_the_block() {
    for kind in ENGINES {
        let r = Replica::new(kind).await;
        let t = at(0, 1, 1);
        assert_eq!(r.write(t, 0, pattern(1, 64 << 10)).await, Message::ExtentOk);
        r.flush(t).await;
        let key = ExtentKey { volume: VOLUME, index: ExtentIndex(0) };
        let ext = r.store.extent(key, EXTENT, Epoch(1)).await.unwrap();
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().read(true).write(true).open(ext.path()).unwrap();
            let at = ext.file_offset(5 * 4096 + 10);
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at).unwrap();
            f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
            f.sync_all().unwrap();
        }
        match r.ask(Message::ExtentRead(ExtentRead { target: t, offset: 0, len: 64 << 10 })).await {
            Message::ExtentErr(ExtentErr { error: ExtentError::Checksum, message }) => {
                assert!(message.contains("block 5"), "{kind:?}: {message}")
            }
            other => panic!("{kind:?}: {other:?}"),
        }
        // Blocks around it still read.
        assert_eq!(r.read(t, 0, 5 * 4096).await, pattern(1, 64 << 10).slice(..5 * 4096));
    }
}

/// A write whose caller goes away either lands before a newer owner is
/// admitted or not at all: after the newer owner's first answer the data
/// never changes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_write_lands_before_a_newer_owner_or_not_at_all() {
    for kind in ENGINES {
        let r = Replica::new(kind).await;
        let old = pattern(1, 1 << 20);
        let new = pattern(2, 1 << 20);
        assert_eq!(r.write(at(0, 1, 1), 0, old.clone()).await, Message::ExtentOk);
        for polls in 0..4 {
            let fut = r.write(at(0, 1, 1 + polls), 0, new.clone());
            let mut fut = Box::pin(fut);
            // A write that finishes within its polls is not polled again.
            for _ in 0..polls {
                if futures::poll!(fut.as_mut()).is_ready() {
                    break;
                }
            }
            drop(fut);
            // The newer owner's first request.
            let _ = r.status(at(0, 1, 2 + polls)).await;
            let first = r.read(at(0, 1, 2 + polls), 0, 1 << 20).await;
            assert!(first == old || first == new, "{kind:?}: torn after {polls} polls");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            assert_eq!(r.read(at(0, 1, 2 + polls), 0, 1 << 20).await, first, "{kind:?}: changed later");
        }
    }
}

/// `ExtentMap` answers the block table: never created is one hole (and
/// creates nothing), written blocks data, zeroed blocks allocated zeros,
/// trimmed and deallocated ones holes; a prefix range is cut at its ends.
/// Hostile ranges get the exact error; a stale generation or epoch too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extent_maps_follow_the_block_table_and_refuse_hostile_ranges() {
    use basalt::proto::peer::ExtentMap;
    use basalt::types::{BlockState, MapExtent};
    const ZEROED: BlockState = BlockState { allocated: true, zero: true };
    let run = |len: u64, state: BlockState| MapExtent { len, state };
    for kind in ENGINES {
        let r = Replica::new(kind).await;
        let t = at(0, 1, 1);
        let map =
            |t: ExtentTarget, offset: u64, len: u64| Message::ExtentMap(ExtentMap { target: t, offset, len });
        assert_eq!(
            r.ask(map(t, 0, EXTENT)).await,
            Message::ExtentMapReply(vec![run(EXTENT, BlockState::HOLE)])
        );
        assert!(r.store.extent_keys().is_empty(), "a map created the extent");
        assert_eq!(r.write(t, 8192, pattern(1, 3 * 4096)).await, Message::ExtentOk);
        let z = |offset, len, deallocate| {
            Message::ExtentWriteZeroes(ExtentWriteZeroes { target: t, offset, len, deallocate, fua: false })
        };
        assert_eq!(r.ask(z(65536, 8192, false)).await, Message::ExtentOk);
        assert_eq!(r.ask(z(12288, 4096, true)).await, Message::ExtentOk);
        let trim = Message::ExtentTrim(ExtentTrim { target: t, offset: 16384, len: 4096, fua: false });
        assert_eq!(r.ask(trim).await, Message::ExtentOk);
        assert_eq!(
            r.ask(map(t, 0, 128 << 10)).await,
            Message::ExtentMapReply(vec![
                run(8192, BlockState::HOLE),
                run(4096, BlockState::DATA),
                // Deallocated zeroes, a trim, never written: one hole.
                run(65536 - 12288, BlockState::HOLE),
                run(8192, ZEROED),
                run((128 << 10) - 73728, BlockState::HOLE),
            ])
        );
        // Sector-aligned edges inside blocks.
        assert_eq!(
            r.ask(map(t, 8192 + 512, 1024)).await,
            Message::ExtentMapReply(vec![run(1024, BlockState::DATA)])
        );
        let cases = [
            (map(t, 0, 0), ExtentError::OutOfRange),
            (map(t, EXTENT - 512, 1024), ExtentError::OutOfRange),
            (map(t, EXTENT, 512), ExtentError::OutOfRange),
            (map(t, u64::MAX - 511, 1024), ExtentError::OutOfRange),
            (map(t, 100, 512), ExtentError::Misaligned),
            (map(t, 512, 100), ExtentError::Misaligned),
            (map(ExtentTarget { volume: VolumeId(99), ..t }, 0, 512), ExtentError::NotFound),
            (map(at(u64::MAX, 1, 1), 0, 512), ExtentError::NotFound),
        ];
        for (m, want) in cases {
            assert_eq!(err(r.ask(m.clone()).await), want, "{kind:?}: {m:?}");
        }
        // A newer owner seen: the old one's map is refused, as its reads are.
        assert!(matches!(r.ask(map(at(0, 1, 5), 0, 512)).await, Message::ExtentMapReply(_)));
        assert!(matches!(err(r.ask(map(t, 0, 512)).await), ExtentError::StaleGeneration { .. }));
        assert_eq!(r.write(at(0, 3, 5), 0, pattern(2, 512)).await, Message::ExtentOk);
        assert!(matches!(err(r.ask(map(at(0, 2, 5), 0, 512)).await), ExtentError::StaleEpoch { .. }));
    }
}

/// A replica that crashed (its store dropped without a flush, as kill -9
/// leaves it) lost its unflushed writes: recovery keeps only what the
/// on-disk block table covers. It must stay suspect, refusing reads and
/// writes, until an owner's status request reconciles it, and that
/// suspicion must survive a clean shutdown in between, which clears every
/// dirty bit. The status reports the regions the crash left dirty, and
/// keeps reporting them (across clean restarts) until a flush shows an
/// owner finished; a crash before that makes it refuse again. A damaged
/// record makes every region of every replica suspect.
#[tokio::test]
async fn a_crashed_replica_stays_suspect_until_reconciled_across_clean_restarts() {
    for kind in ENGINES {
        let dir =
            tempfile::Builder::new().prefix("replica-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let t = at(0, 1, 1);
        let region = u64::from(REGION);
        let (store, svc) = Replica::start_as_daemon(kind, dir.path(), false).await;
        // Extent 1 written and cleanly shut down: not suspect after the crash.
        let t1 = at(1, 1, 1);
        let kept = pattern(8, 4096);
        let w1 = ExtentWrite { target: t1, offset: 0, fua: true, copy: false, data: kept.clone() };
        assert_eq!(svc.handle(OWNER, Message::ExtentWrite(w1)).await, Message::ExtentOk);
        store.close().await.unwrap();
        drop(svc);
        let (store, svc) = Replica::start_as_daemon(kind, dir.path(), false).await;
        let w =
            ExtentWrite { target: t, offset: 3 * region, fua: false, copy: false, data: pattern(9, 8192) };
        assert_eq!(svc.handle(OWNER, Message::ExtentWrite(w)).await, Message::ExtentOk, "{kind:?}");
        drop(svc);
        drop(store); // the crash: no flush, no close

        let (store, svc) = Replica::start_as_daemon(kind, dir.path(), true).await;
        let read = |svc: Arc<ReplicaService>, t: ExtentTarget| async move {
            svc.handle(OWNER, Message::ExtentRead(ExtentRead { target: t, offset: 3 * region, len: 8192 }))
                .await
        };
        assert_eq!(
            err(read(svc.clone(), t).await),
            ExtentError::Io,
            "{kind:?}: a suspect replica serves nothing"
        );
        let w2 = ExtentWrite { target: t, offset: 0, fua: false, copy: false, data: pattern(10, 4096) };
        assert_eq!(err(svc.handle(OWNER, Message::ExtentWrite(w2)).await), ExtentError::Io, "{kind:?}");
        match svc.handle(OWNER, Message::ExtentRead(ExtentRead { target: t1, offset: 0, len: 4096 })).await {
            Message::ExtentReadReply(r) => assert_eq!(r.data, kept, "{kind:?}"),
            other => panic!("{kind:?}: the clean extent serves: {other:?}"),
        }
        // A clean shutdown and start: the dirty bits are gone, the
        // suspicion is not.
        store.close().await.unwrap();
        drop(svc);
        let (store, svc) = Replica::start_as_daemon(kind, dir.path(), false).await;
        assert_eq!(
            err(read(svc.clone(), t).await),
            ExtentError::Io,
            "{kind:?}: suspect after a clean restart"
        );
        let s = match svc.handle(OWNER, Message::ExtentStatus(t)).await {
            Message::ExtentStatusReply(s) => s,
            other => panic!("{kind:?}: status: {other:?}"),
        };
        assert_eq!(s.dirty_regions, vec![3], "{kind:?}: the region the crash left dirty");
        // Reconciliation has begun: the replica serves (the lost write
        // reads as zeros here until the owner copies the region back).
        match read(svc.clone(), t).await {
            Message::ExtentReadReply(r) => assert_eq!(r.data, zeros(8192), "{kind:?}"),
            other => panic!("{kind:?}: read after status: {other:?}"),
        }
        // The owner dies before its copies; this node restarts cleanly
        // (its dirty bits cleared again). The record is still there for the
        // next owner's status, and the replica still serves.
        store.close().await.unwrap();
        drop(svc);
        let (store, svc) = Replica::start_as_daemon(kind, dir.path(), false).await;
        assert!(
            matches!(read(svc.clone(), t).await, Message::ExtentReadReply(_)),
            "{kind:?}: a taken record serves after a clean restart"
        );
        let status = |svc: Arc<ReplicaService>| async move {
            match svc.handle(OWNER, Message::ExtentStatus(t)).await {
                Message::ExtentStatusReply(s) => s.dirty_regions,
                other => panic!("status: {other:?}"),
            }
        };
        assert_eq!(status(svc.clone()).await, vec![3], "{kind:?}: the next owner is told again");
        // A crash now (reconciliation unfinished): it refuses again.
        drop(svc);
        drop(store);
        let (store, svc) = Replica::start_as_daemon(kind, dir.path(), true).await;
        assert_eq!(err(read(svc.clone(), t).await), ExtentError::Io, "{kind:?}: refuses after a crash");
        assert_eq!(status(svc.clone()).await, vec![3], "{kind:?}");
        // The owner copies region 3 back and flushes: reconciled, the record goes.
        let back =
            ExtentWrite { target: t, offset: 3 * region, fua: false, copy: false, data: pattern(9, 8192) };
        assert_eq!(svc.handle(OWNER, Message::ExtentWrite(back)).await, Message::ExtentOk, "{kind:?}");
        let flush = ExtentFlush { target: t, flush_number: 1 };
        assert_eq!(svc.handle(OWNER, Message::ExtentFlush(flush)).await, Message::ExtentOk, "{kind:?}");
        assert!(!dir.path().join("state").join(basalt::node::suspect::FILE).exists(), "{kind:?}");
        store.close().await.unwrap();
        drop(svc);
        let (store, svc) = Replica::start_as_daemon(kind, dir.path(), false).await;
        match read(svc.clone(), t).await {
            Message::ExtentReadReply(r) => assert_eq!(r.data, pattern(9, 8192), "{kind:?}"),
            other => panic!("{kind:?}: read after reconciliation: {other:?}"),
        }
        assert_eq!(status(svc.clone()).await, Vec::<u32>::new(), "{kind:?}: nothing left to reconcile");

        // A damaged record: every replica suspect, in every region.
        store.close().await.unwrap();
        drop(svc);
        std::fs::write(dir.path().join("state").join(basalt::node::suspect::FILE), b"{\"version\": 1, \"ext")
            .unwrap();
        let (store, svc) = Replica::start_as_daemon(kind, dir.path(), false).await;
        assert_eq!(err(read(svc.clone(), t1).await), ExtentError::Io, "{kind:?}");
        let s = match svc.handle(OWNER, Message::ExtentStatus(t1)).await {
            Message::ExtentStatusReply(s) => s,
            other => panic!("{kind:?}: status: {other:?}"),
        };
        let all: Vec<u32> = (0..(EXTENT / region) as u32).collect();
        assert_eq!(s.dirty_regions, all, "{kind:?}");
        store.close().await.unwrap();
    }
}

/// Reconciliation's whole-extent copy, cut short: the pieces that arrived
/// (COPY writes) leave the extent marked incomplete, so the replica reports
/// it absent (the next owner copies it whole again, and never takes it as
/// the source) and refuses to read it, across a crash and a clean restart.
/// The last piece (COPY with FUA) completes it. A COPY piece for an extent
/// the replica holds complete is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_copy_cut_short_reports_the_extent_absent_until_its_last_piece() {
    const PIECE: u64 = 1 << 20;
    for kind in ENGINES {
        let dir =
            tempfile::Builder::new().prefix("replica-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let t = at(2, 1, 1);
        let piece = |svc: Arc<ReplicaService>, i: u64, fua: bool| async move {
            let w = ExtentWrite {
                target: t,
                offset: i * PIECE,
                fua,
                copy: true,
                data: pattern(i, PIECE as usize),
            };
            svc.handle(OWNER, Message::ExtentWrite(w)).await
        };
        let status = |svc: Arc<ReplicaService>| async move {
            match svc.handle(OWNER, Message::ExtentStatus(t)).await {
                Message::ExtentStatusReply(s) => s,
                other => panic!("status: {other:?}"),
            }
        };
        let read = |svc: Arc<ReplicaService>| async move {
            svc.handle(OWNER, Message::ExtentRead(ExtentRead { target: t, offset: 0, len: PIECE as u32 }))
                .await
        };
        let (store, svc) = Replica::start_as_daemon(kind, dir.path(), false).await;
        for i in 0..2 {
            assert_eq!(piece(svc.clone(), i, false).await, Message::ExtentOk, "{kind:?}");
        }
        assert!(!status(svc.clone()).await.exists, "{kind:?}: an incomplete copy reports itself absent");
        assert_eq!(err(read(svc.clone()).await), ExtentError::Io, "{kind:?}: and serves no read");

        // The owner dies, then this node crashes: still incomplete.
        drop(svc);
        drop(store);
        let (store, svc) = Replica::start_as_daemon(kind, dir.path(), true).await;
        assert!(!status(svc.clone()).await.exists, "{kind:?}: absent after a crash");
        assert_eq!(err(read(svc.clone()).await), ExtentError::Io, "{kind:?}");
        // And after a clean restart, which clears the dirty bits.
        store.close().await.unwrap();
        drop(svc);
        let (store, svc) = Replica::start_as_daemon(kind, dir.path(), false).await;
        let s = status(svc.clone()).await;
        assert!(!s.exists && s.dirty_regions.is_empty(), "{kind:?}: absent after a clean restart: {s:?}");

        // The next owner copies it whole: the last piece completes it.
        let n = EXTENT / PIECE;
        for i in 0..n {
            assert_eq!(piece(svc.clone(), i, i + 1 == n).await, Message::ExtentOk, "{kind:?} piece {i}");
        }
        assert!(status(svc.clone()).await.exists, "{kind:?}: complete");
        // Complete survives a crash, with every piece durable.
        drop(svc);
        drop(store);
        let (store, svc) = Replica::start_as_daemon(kind, dir.path(), true).await;
        assert!(status(svc.clone()).await.exists, "{kind:?}: complete after a crash");
        for i in 0..n {
            let r = ExtentRead { target: t, offset: i * PIECE, len: PIECE as u32 };
            match svc.handle(OWNER, Message::ExtentRead(r)).await {
                Message::ExtentReadReply(r) => {
                    assert!(r.data == pattern(i, PIECE as usize), "{kind:?}: piece {i} reads back")
                }
                other => panic!("{kind:?}: read of piece {i}: {other:?}"),
            }
        }
        // A whole copy over a complete replica is refused, and changes nothing.
        assert_eq!(err(piece(svc.clone(), 0, false).await), ExtentError::Io, "{kind:?}");
        match read(svc.clone()).await {
            Message::ExtentReadReply(r) => assert!(r.data == pattern(0, PIECE as usize), "{kind:?}"),
            other => panic!("{kind:?}: {other:?}"),
        }
        // An ordinary first write creates a complete extent as before.
        let t3 = at(3, 1, 1);
        let w = ExtentWrite { target: t3, offset: 0, fua: false, copy: false, data: pattern(5, 4096) };
        assert_eq!(svc.handle(OWNER, Message::ExtentWrite(w)).await, Message::ExtentOk, "{kind:?}");
        match svc.handle(OWNER, Message::ExtentStatus(t3)).await {
            Message::ExtentStatusReply(s) => assert!(s.exists, "{kind:?}"),
            other => panic!("{kind:?}: {other:?}"),
        }
        store.close().await.unwrap();
    }
}

/// The listing a new owner's first FLUSH asks every node for: the extents
/// of the volume this replica holds with a dirty region, from an index on,
/// and those with a crash record (whose dirty bits a clean restart
/// cleared). It passes the fence as a status does: a stale generation is
/// refused, a newer one persisted (so the old owner's next write is
/// refused, after a restart too), and an unknown volume is `NotFound`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_extents_a_new_owner_must_flush_are_listed() {
    let ask = |g: u64, from: u64| {
        Message::ExtentsDirty(ExtentsDirty {
            volume: VOLUME,
            generation: Generation(g),
            from: ExtentIndex(from),
        })
    };
    let list = |m: Message| match m {
        Message::ExtentsDirtyReply(d) => {
            assert!(!d.more);
            d.extents.iter().map(|e| e.0).collect::<Vec<u64>>()
        }
        other => panic!("dirty extents: {other:?}"),
    };
    for kind in ENGINES {
        let mut r = Replica::new(kind).await;
        assert_eq!(list(r.ask(ask(1, 0)).await), Vec::<u64>::new(), "{kind:?}: nothing written");
        for (i, e) in [7u64, 0, 3].into_iter().enumerate() {
            assert_eq!(r.write(at(e, 1, 1), 4096, pattern(i as u64, 4096)).await, Message::ExtentOk);
        }
        assert_eq!(list(r.ask(ask(1, 0)).await), vec![0, 3, 7], "{kind:?}");
        assert_eq!(list(r.ask(ask(1, 3)).await), vec![3, 7], "{kind:?}: from 3 on");
        // A flush makes the writes durable; the bits clear at a later one
        // (see `dirty_regions_follow_the_extents_activity_log`), so the
        // extent is still listed: a superset is all the owner needs.
        r.flush(at(3, 1, 1)).await;
        assert_eq!(list(r.ask(ask(1, 0)).await), vec![0, 3, 7], "{kind:?}");
        // A newer owner asks: its generation is persisted first.
        assert_eq!(list(r.ask(ask(2, 0)).await), vec![0, 3, 7], "{kind:?}");
        let old = r.write(at(0, 1, 1), 0, pattern(9, 4096)).await;
        assert_eq!(err(old), ExtentError::StaleGeneration { current: Generation(2) }, "{kind:?}");
        r.reopen().await;
        let stale = r.ask(ask(1, 0)).await;
        assert_eq!(err(stale), ExtentError::StaleGeneration { current: Generation(2) }, "{kind:?}");
        assert_eq!(list(r.ask(ask(2, 0)).await), Vec::<u64>::new(), "{kind:?}: a clean shutdown flushed all");
        let other = r.svc.handle(
            OWNER,
            Message::ExtentsDirty(ExtentsDirty {
                volume: VolumeId(99),
                generation: Generation(9),
                from: ExtentIndex(0),
            }),
        );
        assert_eq!(err(other.await), ExtentError::NotFound, "{kind:?}");

        // A crash with extent 5 unflushed, then a clean restart (which
        // clears its dirty bits): its crash record keeps it listed.
        let dir =
            tempfile::Builder::new().prefix("replica-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let (store, svc) = Replica::start_as_daemon(kind, dir.path(), false).await;
        let w =
            ExtentWrite { target: at(5, 1, 1), offset: 0, fua: false, copy: false, data: pattern(5, 8192) };
        assert_eq!(svc.handle(OWNER, Message::ExtentWrite(w)).await, Message::ExtentOk);
        drop(svc);
        drop(store); // the crash
        let (store, svc) = Replica::start_as_daemon(kind, dir.path(), true).await;
        assert_eq!(list(svc.handle(OWNER, ask(1, 0)).await), vec![5], "{kind:?}: after the crash");
        store.close().await.unwrap();
        drop(svc);
        let (store, svc) = Replica::start_as_daemon(kind, dir.path(), false).await;
        assert!(store.opened().iter().all(|e| !e.is_dirty()), "{kind:?}: the clean restart cleared the bits");
        assert_eq!(list(svc.handle(OWNER, ask(1, 0)).await), vec![5], "{kind:?}: by its crash record");
    }
}
