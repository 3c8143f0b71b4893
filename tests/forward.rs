//! Forwarding a volume's I/O to its owner (`node::forward`), over real TCP
//! loopback: an owner is a real `Node` (real files, the default engine)
//! behind a real `PeerServer` whose handler calls `forward::serve`; the
//! forwarding side is a `Forwarder` over a real `PeerPool`.
//!
//! Every operation through the forwarder gives exactly what the volume
//! gives directly; every error comes back as the same kind with the same
//! fields; a forwarded write whose caller goes away leaves the range old or
//! new and the connection usable; an owner that is gone or silent gives
//! `Unavailable`, not a hang. And a real `basaltd` serves forwarded
//! requests for the volume it owns, at its generation only.

mod common;

use basalt::layout::Layout;
use basalt::net::{ClientConfig, PeerHandler, PeerInfo, PeerPool, PeerServer, ReplyFuture, ServerConfig};
use basalt::node::forward::{self, Forwarder};
use basalt::node::{Node, Volume, VolumeError, VolumeOptions};
use basalt::proto::peer::{ErrorCode, Message, VolumeRead, VolumeTarget};
use basalt::storage::{EngineKind, StoreConfig, StoreOptions};
use basalt::types::{ClusterId, Generation, NodeId, ReadChunk, VolumeId, flatten_chunks};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CLUSTER: ClusterId = ClusterId(0x0f0f_0f0f_0f0f_0f0f_0f0f_0f0f_0f0f_0f0f);
const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;
/// Guards against a hang only: every wait ends far sooner when the code works.
const HANG: Duration = Duration::from_secs(60);
/// Requests for this volume never get an answer (a silent owner).
const SILENT: VolumeId = VolumeId(999);

fn pattern(seed: u64, len: usize) -> Bytes {
    (0..len as u64).map(|i| ((i * 131 + seed * 7919) % 251) as u8).collect::<Vec<_>>().into()
}

/// What the owner's peer server runs: `forward::serve` over this node's
/// volumes, owned at `generation`.
struct OwnerHandler {
    volumes: Mutex<HashMap<VolumeId, Arc<Volume>>>,
    generation: AtomicU64,
}

impl OwnerHandler {
    fn volume_of(&self, id: VolumeId, generation: Generation) -> Result<Arc<Volume>, VolumeError> {
        let mine = Generation(self.generation.load(Ordering::SeqCst));
        if generation != mine {
            return Err(VolumeError::NotOwner { generation: mine });
        }
        self.volumes
            .lock()
            .unwrap()
            .get(&id)
            .cloned()
            .ok_or_else(|| VolumeError::Unavailable(format!("volume {id} is not open here")))
    }
}

impl PeerHandler for OwnerHandler {
    fn request(&self, _peer: PeerInfo, request: Message) -> ReplyFuture {
        if let Message::VolumeRead(VolumeRead { target: VolumeTarget { volume: SILENT, .. }, .. }) = request {
            return Box::pin(std::future::pending());
        }
        Box::pin(forward::serve(&|v, g| self.volume_of(v, g), request))
    }

    fn one_way(&self, _peer: PeerInfo, _message: Message) {}
}

struct Owner {
    _tmp: tempfile::TempDir,
    _node: Arc<Node>,
    rw: Arc<Volume>,
    ro: Arc<Volume>,
    handler: Arc<OwnerHandler>,
    server: Option<PeerServer>,
}

const GENERATION: Generation = Generation(3);

async fn owner() -> Owner {
    let tmp = tempfile::Builder::new().prefix("forward-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cfg = StoreConfig { data_dirs: vec![tmp.path().join("d0")], engine: EngineKind::Auto };
    let node = Node::open_with(cfg, StoreOptions::default(), 1 << 30).await.unwrap();
    let opts = |read_only| VolumeOptions {
        size: SIZE,
        layout: Layout::contiguous(MIB).unwrap(),
        replicas: 1,
        min_replicas: 1,
        read_only,
    };
    let rw = node.create_volume("rw", opts(false)).unwrap();
    let ro = node.create_volume("ro", opts(true)).unwrap();
    let handler = Arc::new(OwnerHandler {
        volumes: Mutex::new([(rw.spec().id, rw.clone()), (ro.spec().id, ro.clone())].into_iter().collect()),
        generation: AtomicU64::new(GENERATION.0),
    });
    let server = PeerServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig::new(CLUSTER, NodeId(1)),
        handler.clone(),
    )
    .await
    .unwrap();
    Owner { _tmp: tmp, _node: node, rw, ro, handler, server: Some(server) }
}

impl Owner {
    fn addr(&self) -> std::net::SocketAddr {
        self.server.as_ref().unwrap().local_addr()
    }
}

fn pool() -> PeerPool {
    PeerPool::new(ClientConfig::new(CLUSTER, NodeId(2)))
}

/// A pool with one connection per peer: "the same connection" is then
/// the only one.
fn one_connection_pool() -> PeerPool {
    let mut cfg = ClientConfig::new(CLUSTER, NodeId(2));
    cfg.connections = 1;
    PeerPool::new(cfg)
}

fn forwarder(pool: &PeerPool, o: &Owner, v: &Volume) -> Forwarder {
    Forwarder::new(pool.client(o.addr()), v.spec().id, GENERATION)
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < HANG, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The same reads through the forwarder and directly: the same runs of
/// data and holes, the same bytes.
async fn same_read(f: &Forwarder, v: &Volume, offset: u64, len: u64) -> Vec<ReadChunk> {
    let direct = v.read(offset, len).await.unwrap();
    let forwarded = f.read(offset, len).await.unwrap();
    assert_eq!(forwarded, direct, "read {offset}+{len}");
    forwarded
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_through_the_forwarder_matches_the_volume() {
    let o = owner().await;
    let pool = pool();
    let f = forwarder(&pool, &o, &o.rw);
    let v = &o.rw;

    // Never written: one hole.
    assert_eq!(same_read(&f, v, 0, 2 * MIB).await, vec![ReadChunk::Hole(2 * MIB as u32)]);

    // A write over an extent boundary, FUA, and a small one with a hole
    // between them: the read has data, hole, data runs.
    let a = pattern(1, 256 << 10);
    f.write(MIB - (128 << 10), a.clone(), true).await.unwrap();
    let b = pattern(2, 4096);
    f.write(3 * MIB, b.clone(), false).await.unwrap();
    let got = same_read(&f, v, MIB - (128 << 10), 2 * MIB + (128 << 10) + 4096).await;
    assert!(got.iter().any(|c| matches!(c, ReadChunk::Hole(_))), "{got:?}");
    let flat = flatten_chunks(&got);
    assert_eq!(&flat[..a.len()], &a[..]);
    assert_eq!(&flat[flat.len() - 4096..], &b[..]);
    assert!(flat[a.len()..flat.len() - 4096].iter().all(|x| *x == 0));

    // The largest read there is, through several extents.
    same_read(&f, v, 0, SIZE.min(32 * MIB)).await;

    // Block status, over written and unwritten space.
    let direct = v.block_status(0, SIZE).await.unwrap();
    assert_eq!(f.block_status(0, SIZE).await.unwrap(), direct);
    assert!(direct.len() >= 3, "{direct:?}");

    // Zeroes (both ways), trim, flush.
    f.write_zeroes(MIB, 64 << 10, false, true).await.unwrap();
    f.write_zeroes(MIB + (64 << 10), 4096, true, false).await.unwrap();
    f.trim(3 * MIB, 4096, false).await.unwrap();
    f.flush().await.unwrap();
    let got = flatten_chunks(&same_read(&f, v, MIB - (128 << 10), 256 << 10).await);
    assert_eq!(&got[..128 << 10], &a[..128 << 10]);
    assert!(got[128 << 10..(128 << 10) + (64 << 10) + 4096].iter().all(|x| *x == 0));
    assert_eq!(&got[(128 << 10) + (64 << 10) + 4096..], &a[(128 << 10) + (64 << 10) + 4096..]);
    assert!(flatten_chunks(&same_read(&f, v, 3 * MIB, 4096).await).iter().all(|x| *x == 0));
    assert_eq!(f.block_status(0, SIZE).await.unwrap(), v.block_status(0, SIZE).await.unwrap());

    // Compare and write that matches: written.
    let old = flatten_chunks(&v.read(5 * MIB, 8192).await.unwrap());
    let new = pattern(3, 8192);
    let buf: Bytes = [&old[..], &new[..]].concat().into();
    assert_eq!(f.compare_and_write(5 * MIB, buf, true).await.unwrap(), None);
    assert_eq!(flatten_chunks(&v.read(5 * MIB, 8192).await.unwrap()), new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miscompare_offset_comes_back_and_nothing_is_written() {
    let o = owner().await;
    let pool = pool();
    let f = forwarder(&pool, &o, &o.rw);
    let data = pattern(4, 16 << 10);
    // Over an extent boundary, so the owner compares two pieces.
    let at = MIB - 8192;
    o.rw.write(at, data.clone(), false).await.unwrap();
    let mut compare = data.to_vec();
    compare[12345] ^= 0xff;
    let buf: Bytes = [&compare[..], &pattern(5, 16 << 10)[..]].concat().into();
    assert_eq!(o.rw.compare_and_write(at, buf.clone(), false).await.unwrap(), Some(12345));
    assert_eq!(f.compare_and_write(at, buf, false).await.unwrap(), Some(12345));
    assert_eq!(flatten_chunks(&o.rw.read(at, 16 << 10).await.unwrap()), data);
}

/// The kind and the fields of an error (its text may name the owner).
fn shape(e: &VolumeError) -> String {
    match e {
        VolumeError::NoSpace(_) | VolumeError::Io(_) | VolumeError::Unavailable(_) => e.kind().to_string(),
        other => format!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_comes_back_as_the_same_kind_with_the_same_fields() {
    let o = owner().await;
    let pool = pool();
    let f = forwarder(&pool, &o, &o.rw);
    let ro = forwarder(&pool, &o, &o.ro);
    let (v, rov) = (&o.rw, &o.ro);
    let w = pattern(6, 4096);

    let cases: Vec<(&str, VolumeError, VolumeError)> = vec![
        (
            "read past the end",
            f.read(SIZE - 512, 1024).await.unwrap_err(),
            v.read(SIZE - 512, 1024).await.unwrap_err(),
        ),
        (
            "write past the end",
            f.write(SIZE, w.clone(), false).await.unwrap_err(),
            v.write(SIZE, w.clone(), false).await.unwrap_err(),
        ),
        (
            "offset overflows",
            f.trim(u64::MAX - 511, 512, false).await.unwrap_err(),
            v.trim(u64::MAX - 511, 512, false).await.unwrap_err(),
        ),
        ("misaligned read", f.read(1, 512).await.unwrap_err(), v.read(1, 512).await.unwrap_err()),
        (
            "misaligned zeroes",
            f.write_zeroes(0, 100, false, false).await.unwrap_err(),
            v.write_zeroes(0, 100, false, false).await.unwrap_err(),
        ),
        (
            "misaligned status",
            f.block_status(7, 512).await.unwrap_err(),
            v.block_status(7, 512).await.unwrap_err(),
        ),
        (
            "odd compare and write",
            f.compare_and_write(0, pattern(7, 1023), false).await.unwrap_err(),
            v.compare_and_write(0, pattern(7, 1023), false).await.unwrap_err(),
        ),
        (
            "read-only write",
            ro.write(0, w.clone(), false).await.unwrap_err(),
            rov.write(0, w.clone(), false).await.unwrap_err(),
        ),
        (
            "read-only trim",
            ro.trim(0, 4096, false).await.unwrap_err(),
            rov.trim(0, 4096, false).await.unwrap_err(),
        ),
        (
            "read-only compare and write",
            ro.compare_and_write(0, pattern(8, 1024), false).await.unwrap_err(),
            rov.compare_and_write(0, pattern(8, 1024), false).await.unwrap_err(),
        ),
        // Refused before it is sent (it cannot be encoded): the same kind.
        (
            "read too large",
            f.read(0, 32 * MIB + 512).await.unwrap_err(),
            v.read(0, 32 * MIB + 512).await.unwrap_err(),
        ),
    ];
    for (what, forwarded, direct) in &cases {
        assert_eq!(shape(forwarded), shape(direct), "{what}");
    }
    let kinds: std::collections::BTreeSet<&str> = cases.iter().map(|c| c.1.kind()).collect();
    assert_eq!(kinds, ["misaligned", "out_of_range", "read_only", "too_large"].into_iter().collect());

    // Not the owner at that generation: NotOwner with the generation the
    // serving node knows, on every kind of request.
    let stale = Forwarder::new(pool.client(o.addr()), v.spec().id, Generation(GENERATION.0 - 1));
    let not_owner = |r: Result<(), VolumeError>| match r {
        Err(VolumeError::NotOwner { generation }) => assert_eq!(generation, GENERATION),
        other => panic!("expected NotOwner, got {other:?}"),
    };
    not_owner(stale.read(0, 4096).await.map(drop));
    not_owner(stale.write(0, w.clone(), false).await);
    not_owner(stale.write_zeroes(0, 4096, true, false).await);
    not_owner(stale.trim(0, 4096, false).await);
    not_owner(stale.flush().await);
    not_owner(stale.block_status(0, 4096).await.map(drop));
    not_owner(stale.compare_and_write(0, pattern(9, 1024), false).await.map(drop));
    // The owner moved on: the forwarder's generation is now the stale one.
    o.handler.generation.store(GENERATION.0 + 1, Ordering::SeqCst);
    match f.flush().await {
        Err(VolumeError::NotOwner { generation }) => assert_eq!(generation, Generation(GENERATION.0 + 1)),
        other => panic!("expected NotOwner, got {other:?}"),
    }
    // A volume the owner does not have open: Unavailable, with its reason.
    let none = Forwarder::new(pool.client(o.addr()), VolumeId(4242), Generation(GENERATION.0 + 1));
    match none.read(0, 4096).await {
        Err(VolumeError::Unavailable(why)) => assert!(why.contains("not open here"), "{why}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_volume_request_to_serve_is_unsupported() {
    let o = owner().await;
    let reply = forward::serve(&|v, g| o.handler.volume_of(v, g), Message::Ping).await;
    match reply {
        Message::Error(e) => assert_eq!(e.code, ErrorCode::Unsupported),
        other => panic!("{other:?}"),
    }
}

/// A forwarded write dropped after its frame went out: the write still
/// completes on the owner (its late reply is counted and discarded), the
/// range reads as old or new in every block (here: new, since it was sent),
/// and the same connection serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_forwarded_write_leaves_old_or_new_and_the_connection_usable() {
    let o = owner().await;
    let pool = one_connection_pool();
    let f = forwarder(&pool, &o, &o.rw);
    let old = pattern(10, MIB as usize);
    let new = pattern(11, MIB as usize);
    f.write(2 * MIB, old.clone(), true).await.unwrap();
    let client = pool.client(o.addr());
    let connects = client.stats().connects.load(Ordering::Relaxed);

    let mut write = Box::pin(f.write(2 * MIB, new.clone(), false));
    let start = Instant::now();
    // Poll until the request is registered on the connection (its frame is
    // queued in the same step), then drop it.
    while client.in_flight() == 0 {
        assert!(futures::poll!(write.as_mut()).is_pending(), "the write finished before it was dropped");
        assert!(start.elapsed() < HANG);
        tokio::task::yield_now().await;
    }
    drop(write);
    assert_eq!(client.in_flight(), 0, "the dropped request left its entry");
    eventually("the late reply of the dropped write", || {
        client.stats().late_replies.load(Ordering::Relaxed) == 1
    })
    .await;

    let got = flatten_chunks(&f.read(2 * MIB, MIB).await.unwrap());
    for (i, (g, (o, n))) in got.chunks(4096).zip(old.chunks(4096).zip(new.chunks(4096))).enumerate() {
        assert!(g == o || g == n, "block {i} is neither old nor new");
    }
    assert_eq!(got, new, "the write was sent, so it ran to its end on the owner");
    // The connection is the one from before, and it still works.
    f.write(2 * MIB, old.clone(), false).await.unwrap();
    assert_eq!(flatten_chunks(&o.rw.read(2 * MIB, MIB).await.unwrap()), old);
    assert_eq!(client.stats().connects.load(Ordering::Relaxed), connects);
    assert_eq!(client.stats().connections_lost.load(Ordering::Relaxed), 0);
}

/// An owner that never answers, and one that is gone: `Unavailable`
/// (after the forwarder's timeout for the silent one), never a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_vanished_or_is_silent_gives_unavailable() {
    let mut o = owner().await;
    let pool = pool();
    let f = forwarder(&pool, &o, &o.rw).with_timeout(Duration::from_millis(500));
    f.write(0, pattern(12, 4096), false).await.unwrap();

    // Silent: the request is taken and never answered.
    let silent =
        Forwarder::new(pool.client(o.addr()), SILENT, GENERATION).with_timeout(Duration::from_millis(300));
    let r = tokio::time::timeout(HANG, silent.read(0, 4096)).await.expect("hung past the timeout");
    match r {
        Err(VolumeError::Unavailable(why)) => assert!(why.contains("timed out"), "{why}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(pool.client(o.addr()).stats().timeouts.load(Ordering::Relaxed), 1);

    // Gone: the server goes away with the connection open (dropped, not
    // shut down: a shutdown waits for the silent request's handler).
    drop(o.server.take());
    for _ in 0..3 {
        let r = tokio::time::timeout(HANG, f.read(0, 4096)).await.expect("hung past the timeout");
        assert!(matches!(r, Err(VolumeError::Unavailable(_))), "{r:?}");
        let r = tokio::time::timeout(HANG, f.write(0, pattern(13, 4096), true)).await.expect("hung");
        assert!(matches!(r, Err(VolumeError::Unavailable(_))), "{r:?}");
    }
    // The write before the owner went away is there; the failed ones are not.
    assert_eq!(flatten_chunks(&o.rw.read(0, 4096).await.unwrap()), pattern(12, 4096));
}

/// `basaltd demo` serves forwarded requests for the volume it owns (its
/// peer handler calls `forward::serve` with the metadata's owner and
/// generation): a write forwarded to it is what its NBD clients read, and a
/// request at another generation is told the current one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basaltd_serves_forwarded_requests_for_the_volume_it_owns() {
    if !common::require("nbdsh") {
        return;
    }
    let d = common::Daemon::start("16M", &[]);
    let url = format!("http://127.0.0.1:{}/v1/volumes/{}", d.admin_port, d.volume);
    let info: basalt::admin::api::VolumeInfo =
        tokio::task::spawn_blocking(move || ureq::get(&url).call().unwrap().into_json().unwrap())
            .await
            .unwrap();
    let owner = info.owner.expect("the demo volume has an owner");
    let generation = Generation(owner.generation);
    // A node outside the cluster says cluster 0, which a member accepts.
    let pool = PeerPool::new(ClientConfig::new(ClusterId(0), NodeId(77)));
    let peer = format!("127.0.0.1:{}", d.peer_port).parse().unwrap();
    let f = Forwarder::new(pool.client(peer), VolumeId(info.id), generation);

    let data = pattern(20, 8192);
    f.write(MIB, data.clone(), true).await.unwrap();
    assert_eq!(flatten_chunks(&f.read(MIB, 8192).await.unwrap()), data);
    let uri = d.uri();
    let hex = tokio::task::spawn_blocking(move || {
        common::nbdsh(&uri, &format!("print(h.pread(8192, {MIB}).hex())"))
    })
    .await
    .unwrap();
    assert_eq!(hex.trim(), data.iter().map(|b| format!("{b:02x}")).collect::<String>());
    // Out of range on the daemon's volume, as for its own clients.
    match f.read(16 * MIB, 4096).await {
        Err(VolumeError::OutOfRange { offset, len, size }) => {
            assert_eq!((offset, len, size), (16 * MIB, 4096, 16 * MIB))
        }
        other => panic!("expected OutOfRange, got {other:?}"),
    }

    let stale = Forwarder::new(pool.client(peer), VolumeId(info.id), Generation(owner.generation + 1));
    match stale.read(0, 4096).await {
        Err(VolumeError::NotOwner { generation: g }) => assert_eq!(g, generation),
        other => panic!("expected NotOwner, got {other:?}"),
    }
    let unknown = Forwarder::new(pool.client(peer), VolumeId(info.id + 1000), generation);
    match unknown.flush().await {
        Err(VolumeError::NotOwner { generation: g }) => assert_eq!(g, Generation(0)),
        other => panic!("expected NotOwner, got {other:?}"),
    }
}

/// Writes and zeroes at any byte (ANY_BYTE) through the forwarder are
/// read-modify-written on the owner, byte-exact; a hostile peer's ANY_BYTE
/// requests with ranges past the volume or whose end overflows get the
/// owner's `OutOfRange` with their fields (the same a client of the owner
/// gets), never a panic, and the owner serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unaligned_writes_through_the_forwarder_and_hostile_any_byte_ranges() {
    use basalt::proto::peer::{VolumeErr, VolumeFault, VolumeWrite, VolumeWriteZeroes};
    let o = owner().await;
    let pool = pool();
    let f = forwarder(&pool, &o, &o.rw);
    let v = &o.rw;
    let mut shadow = vec![0u8; 2 * MIB as usize];
    let base = pattern(1, shadow.len());
    v.write(0, base.clone(), false).await.unwrap();
    shadow.copy_from_slice(&base);
    for (at, len) in [(7u64, 3usize), (511, 2), (MIB - 3, 7), (4095, 8193), (MIB + 1, 1)] {
        let data = pattern(at, len);
        f.write_unaligned(at, data.clone(), false).await.unwrap();
        shadow[at as usize..at as usize + len].copy_from_slice(&data);
    }
    f.write_zeroes_unaligned(MIB - 4097, 8194 + 4096, true, true).await.unwrap();
    shadow[(MIB - 4097) as usize..(MIB + 8193) as usize].fill(0);
    f.write_zeroes_unaligned(100, 5, false, false).await.unwrap();
    shadow[100..105].fill(0);
    assert!(
        flatten_chunks(&v.read(0, 2 * MIB).await.unwrap()) == shadow,
        "owner's bytes differ from the shadow"
    );
    // Without ANY_BYTE a misaligned write is refused as it is on the owner.
    assert!(matches!(
        f.write(7, pattern(2, 3), false).await,
        Err(VolumeError::Misaligned { offset: 7, len: 3 })
    ));

    let client = pool.client(o.addr());
    let target = VolumeTarget { volume: v.spec().id, generation: GENERATION };
    let write = |offset: u64, len: usize| {
        Message::VolumeWrite(VolumeWrite {
            target,
            offset,
            fua: false,
            any_byte: true,
            data: pattern(3, len),
        })
    };
    let zeroes = |offset: u64, len: u64| {
        Message::VolumeWriteZeroes(VolumeWriteZeroes {
            target,
            offset,
            len,
            deallocate: true,
            fua: false,
            any_byte: true,
        })
    };
    for (m, offset, len) in [
        (write(SIZE - 1, 2), SIZE - 1, 2),
        (write(SIZE, 1), SIZE, 1),
        (write(u64::MAX - 1, 3), u64::MAX - 1, 3),
        (zeroes(SIZE - 3, 4), SIZE - 3, 4),
        (zeroes(3, u64::MAX), 3, u64::MAX),
        (zeroes(u64::MAX, 1), u64::MAX, 1),
    ] {
        match client.request(m).await.unwrap() {
            Message::VolumeErr(VolumeErr { fault, .. }) => {
                assert_eq!(fault, VolumeFault::OutOfRange { offset, len, size: SIZE }, "{offset}+{len}");
            }
            other => panic!("{offset}+{len}: {other:?}"),
        }
    }
    // A write over the largest payload is refused by the forwarder before
    // it is sent (the peer decoder refuses one too: the frame cap).
    let big = Bytes::from(vec![0u8; 32 * MIB as usize + 1]);
    assert!(matches!(f.write_unaligned(1, big, false).await, Err(VolumeError::TooLarge(_))));
    // Nothing of it changed the volume, and the owner still serves.
    assert!(flatten_chunks(&f.read(0, 2 * MIB).await.unwrap()) == shadow);
}
