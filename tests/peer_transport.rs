//! The peer transport (`net::`) on real TCP loopback: requests round trip
//! with the right ids under concurrency, timeouts discard late replies,
//! clients reconnect after a server restart, version and cluster mismatches
//! are refused with a reason, hostile frames get an error and a log line
//! (one test per malformation) while other connections go on, and neither
//! a client that never reads nor a server that never reads can grow the
//! other side's memory past its budget.

use basalt::net::{
    ClientConfig, PeerClient, PeerError, PeerHandler, PeerInfo, PeerPool, PeerServer, ReplyFuture, SendError,
    ServerConfig,
};
use basalt::proto::peer::{
    BlockCrcs, Decoder, ErrorCode, ExtentErr, ExtentError, ExtentFlush, ExtentRead, ExtentReadReply,
    ExtentState, ExtentTarget, ExtentTrim, ExtentWrite, Frame, FrameFlags, HEADER_LEN, Hello, Kind, MAGIC,
    Message, ProtocolVersion, RefuseCode, encode_to_bytes,
};
use basalt::types::{ClusterId, Epoch, ExtentIndex, Generation, NodeId, VolumeId};
use bytes::{Bytes, BytesMut};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

const CLUSTER: ClusterId = ClusterId(0xb45a_17b4_5a17_b45a_17b4_5a17_b45a_17b4);
const SERVER_NODE: NodeId = NodeId(1);
const CLIENT_NODE: NodeId = NodeId(2);
/// Writes to this volume wait for the test's gate, like flushes.
const GATED: VolumeId = VolumeId(666);
/// Guards against a hang only: every wait below ends far sooner when the
/// code works.
const HANG: Duration = Duration::from_secs(30);

// --- log capture: one subscriber for the whole test binary

#[derive(Clone)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        std::io::stderr().write_all(b)?;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> &'static LogBuf {
    static LOGS: OnceLock<LogBuf> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = LogBuf(Arc::new(Mutex::new(Vec::new())));
        let w = buf.clone();
        tracing_subscriber::fmt()
            .with_env_filter("basalt=debug")
            .with_ansi(false)
            .with_writer(move || w.clone())
            .init();
        buf
    })
}

/// Log lines mentioning `needle` that contain `text`.
fn log_lines(needle: &str, text: &str) -> Vec<String> {
    let all = String::from_utf8_lossy(&logs().0.lock().unwrap()).into_owned();
    all.lines().filter(|l| l.contains(needle) && l.contains(text)).map(str::to_owned).collect()
}

/// Waits (bounded by `HANG`) until `f` holds.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < HANG, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// --- a handler with known answers

struct State {
    requests: AtomicU64,
    /// `ExtentFlush` waits for a permit here: the test decides when it ends.
    gate: Semaphore,
    one_way: Mutex<Vec<Bytes>>,
}

impl State {
    fn new() -> State {
        State { requests: AtomicU64::new(0), gate: Semaphore::new(0), one_way: Mutex::new(Vec::new()) }
    }
}

struct TestHandler(Arc<State>);

fn pattern(seed: u64, len: usize) -> Bytes {
    (0..len as u64)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i * 7) % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

fn crcs(data: &[u8]) -> BlockCrcs {
    BlockCrcs { block_size: 4096, crcs: data.chunks(4096).map(crc32c::crc32c).collect() }
}

impl PeerHandler for TestHandler {
    fn request(&self, _peer: PeerInfo, request: Message) -> ReplyFuture {
        let st = self.0.clone();
        st.requests.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            match request {
                Message::ExtentRead(r) => {
                    // A fresh buffer per reply, as a store would produce.
                    let data = pattern(r.offset, r.len as usize);
                    Message::ExtentReadReply(ExtentReadReply { crcs: Some(crcs(&data)), data })
                }
                Message::ExtentWrite(w) => {
                    if w.target.volume == GATED {
                        st.gate.acquire().await.unwrap().forget();
                    }
                    Message::ExtentStatusReply(ExtentState {
                        flush_number: crc32c::crc32c(&w.data) as u64 + (w.offset << 32),
                        ..ExtentState::absent(w.target.generation, Epoch(w.fua.into()))
                    })
                }
                Message::ExtentFlush(f) => {
                    st.gate.acquire().await.unwrap().forget();
                    Message::ExtentStatusReply(ExtentState {
                        flush_number: f.flush_number,
                        ..ExtentState::absent(f.target.generation, Epoch(1))
                    })
                }
                Message::ExtentTrim(t) => Message::ExtentErr(ExtentErr {
                    error: ExtentError::StaleEpoch { current: Epoch(t.target.epoch.0 + 1) },
                    message: "stale".into(),
                }),
                Message::MetaRequest(b) => {
                    let mut v = b.to_vec();
                    v.reverse();
                    Message::MetaResponse(v.into())
                }
                m => Message::error(ErrorCode::Unsupported, format!("{:?} not served here", m.kind())),
            }
        })
    }

    fn one_way(&self, _peer: PeerInfo, message: Message) {
        if let Message::Raft(b) = message {
            self.0.one_way.lock().unwrap().push(b);
        }
    }
}

fn target(v: u64) -> ExtentTarget {
    ExtentTarget {
        volume: VolumeId(v),
        extent: ExtentIndex(v % 7),
        epoch: Epoch(3),
        generation: Generation(9),
    }
}

async fn server_with(cfg: ServerConfig) -> (PeerServer, Arc<State>) {
    logs();
    let st = Arc::new(State::new());
    let s = PeerServer::bind("127.0.0.1:0".parse().unwrap(), cfg, Arc::new(TestHandler(st.clone())))
        .await
        .unwrap();
    (s, st)
}

async fn server() -> (PeerServer, Arc<State>) {
    server_with(ServerConfig::new(CLUSTER, SERVER_NODE)).await
}

fn client_cfg() -> ClientConfig {
    let mut c = ClientConfig::new(CLUSTER, CLIENT_NODE);
    c.reconnect_backoff = Duration::from_millis(20);
    c
}

// --- round trips

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests_round_trip_with_the_right_answers() {
    let (srv, st) = server().await;
    let pool = PeerPool::new(client_cfg());
    let addr = srv.local_addr();
    let mut futs = Vec::new();
    for i in 0..600u64 {
        let c = pool.client(addr);
        futs.push(async move {
            match i % 4 {
                0 => {
                    let len = 4096 << (i % 9); // 4 KiB .. 1 MiB
                    let r = c
                        .request(Message::ExtentRead(ExtentRead { target: target(i), offset: i * 4096, len }))
                        .await;
                    let want = pattern(i * 4096, len as usize);
                    assert_eq!(
                        r.unwrap(),
                        Message::ExtentReadReply(ExtentReadReply { crcs: Some(crcs(&want)), data: want }),
                        "read {i}"
                    );
                }
                1 => {
                    let data = pattern(i, 512 << (i % 7));
                    let w = ExtentWrite {
                        target: target(i),
                        offset: i,
                        fua: i % 8 == 1,
                        copy: false,
                        data: data.clone(),
                    };
                    let r = c.request(Message::ExtentWrite(w)).await.unwrap();
                    let want = ExtentState {
                        flush_number: crc32c::crc32c(&data) as u64 + (i << 32),
                        ..ExtentState::absent(Generation(9), Epoch((i % 8 == 1).into()))
                    };
                    assert_eq!(r, Message::ExtentStatusReply(want), "write {i}");
                }
                2 => {
                    let b = pattern(i, 100 + i as usize);
                    let mut rev = b.to_vec();
                    rev.reverse();
                    assert_eq!(
                        c.request(Message::MetaRequest(b)).await.unwrap(),
                        Message::MetaResponse(rev.into())
                    );
                }
                _ => {
                    let r = c.request(Message::ExtentTrim(ExtentTrim {
                        target: target(i),
                        offset: 0,
                        len: 4096,
                        fua: false,
                    }));
                    let Message::ExtentErr(e) = r.await.unwrap() else { panic!("trim {i}") };
                    assert_eq!(e.error, ExtentError::StaleEpoch { current: Epoch(4) });
                }
            }
        });
    }
    futures::future::join_all(futs).await;
    assert_eq!(st.requests.load(Ordering::SeqCst), 600);
    // Ping is answered by the transport itself; an unserved kind gets the handler's error.
    let c = pool.client(addr);
    assert_eq!(c.request(Message::Ping).await.unwrap(), Message::Pong);
    match c.request(Message::ExtentStatus(target(1))).await {
        Err(PeerError::Remote { code: ErrorCode::Unsupported, message, .. }) => {
            assert!(message.contains("ExtentStatus"))
        }
        other => panic!("{other:?}"),
    }
    // Two connections, both used, nothing left in flight or held.
    assert_eq!(c.connections(), 2);
    assert_eq!(srv.stats().accepted.load(Ordering::SeqCst), 2);
    assert_eq!(c.in_flight(), 0);
    assert_eq!(c.remote_node(), Some(SERVER_NODE));
    eventually("client budget back", || c.budget_available() == client_cfg().peer_budget).await;
    eventually("server budget back", || srv.stats().held.now() == 0).await;
    assert_eq!(pool.stats().timeouts.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_times_out_and_its_late_reply_is_discarded() {
    let (srv, st) = server().await;
    let mut cfg = client_cfg();
    cfg.connections = 1; // the late reply and the next request share a connection
    let c = PeerClient::new(srv.local_addr(), cfg);
    let flush = |n| Message::ExtentFlush(ExtentFlush { target: target(1), flush_number: n });
    let r = c.request_timeout(flush(1), Duration::from_millis(200)).await;
    assert!(matches!(r, Err(PeerError::Timeout { .. })), "{r:?}");
    assert_eq!(c.stats().timeouts.load(Ordering::SeqCst), 1);
    assert_eq!(c.in_flight(), 0, "a timed-out request leaves the in-flight map");
    // Let the slow handler answer: the reply has no one to go to.
    st.gate.add_permits(1);
    eventually("late reply counted", || c.stats().late_replies.load(Ordering::SeqCst) == 1).await;
    // The connection goes on, and the next answer is the next request's own.
    st.gate.add_permits(1);
    assert_eq!(
        c.request(flush(2)).await.unwrap(),
        Message::ExtentStatusReply(ExtentState {
            flush_number: 2,
            ..ExtentState::absent(Generation(9), Epoch(1))
        })
    );
    assert_eq!(srv.stats().accepted.load(Ordering::SeqCst), 1);
    eventually("budget back", || c.budget_available() == client_cfg().peer_budget).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_request_future_releases_its_entry_and_budget() {
    let (srv, st) = server().await;
    let mut cfg = client_cfg();
    cfg.connections = 1;
    let c = PeerClient::new(srv.local_addr(), cfg);
    let task = {
        let c = c.clone();
        tokio::spawn(async move {
            c.request(Message::ExtentFlush(ExtentFlush { target: target(1), flush_number: 7 })).await
        })
    };
    eventually("request reached the handler", || st.requests.load(Ordering::SeqCst) == 1).await;
    assert_eq!(c.in_flight(), 1);
    // Replies go out as they complete: a later request on the same
    // connection is answered while the flush is still parked.
    let meta = c.request(Message::MetaRequest(Bytes::from_static(b"xy"))).await.unwrap();
    assert_eq!(meta, Message::MetaResponse(Bytes::from_static(b"yx")));
    assert_eq!(c.in_flight(), 1);
    assert!(c.budget_available() < client_cfg().peer_budget);
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!(c.in_flight(), 0);
    eventually("budget back after the drop", || c.budget_available() == client_cfg().peer_budget).await;
    st.gate.add_permits(1);
    eventually("late reply counted", || c.stats().late_replies.load(Ordering::SeqCst) == 1).await;
    assert_eq!(c.request(Message::Ping).await.unwrap(), Message::Pong);
    assert_eq!(c.stats().timeouts.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_for_budget_instead_of_growing_memory() {
    let (srv, st) = server().await;
    let mut cfg = client_cfg();
    cfg.peer_budget = 3 << 20;
    let c = PeerClient::new(srv.local_addr(), cfg);
    let data = pattern(1, 2 << 20);
    let write = |volume| {
        let c = c.clone();
        let w = ExtentWrite {
            target: ExtentTarget { volume, ..target(1) },
            offset: 0,
            fua: false,
            copy: false,
            data: data.clone(),
        };
        tokio::spawn(async move { c.request(Message::ExtentWrite(w)).await })
    };
    // A 2 MiB write parked in the handler holds two thirds of the budget...
    let parked = write(GATED);
    eventually("write in the handler", || st.requests.load(Ordering::SeqCst) == 1).await;
    // ...so a second one waits for room and is not even sent. (The sleep
    // only gives a bug the chance to show.)
    let waiting = write(VolumeId(1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished());
    assert_eq!(st.requests.load(Ordering::SeqCst), 1, "the second write must wait, unsent");
    assert!(c.stats().held.peak() <= 3 << 20);
    st.gate.add_permits(1);
    for t in [parked, waiting] {
        let Message::ExtentStatusReply(s) = t.await.unwrap().unwrap() else { panic!() };
        assert_eq!(s.flush_number, crc32c::crc32c(&data) as u64);
    }
    assert_eq!(st.requests.load(Ordering::SeqCst), 2);
    eventually("budget back", || c.budget_available() == 3 << 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reconnects_after_the_server_restarts() {
    let (srv, _st) = server().await;
    let addr = srv.local_addr();
    let c = PeerClient::new(addr, client_cfg());
    let meta = || Message::MetaRequest(Bytes::from_static(b"abc"));
    assert_eq!(c.request(meta()).await.unwrap(), Message::MetaResponse(Bytes::from_static(b"cba")));
    srv.shutdown().await;
    eventually("client noticed", || c.connections() == 0).await;
    // Down: requests fail fast with a connect error (or the backoff after it).
    match c.request(meta()).await {
        Err(PeerError::Connect { .. } | PeerError::Backoff { .. }) => {}
        other => panic!("{other:?}"),
    }
    // Up again on the same address: the next requests connect anew.
    let st = Arc::new(State::new());
    let srv =
        PeerServer::bind(addr, ServerConfig::new(CLUSTER, SERVER_NODE), Arc::new(TestHandler(st.clone())))
            .await
            .unwrap();
    let start = Instant::now();
    let reply = loop {
        match c.request(meta()).await {
            Ok(m) => break m,
            Err(PeerError::Backoff { .. } | PeerError::Connect { .. }) if start.elapsed() < HANG => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    assert_eq!(reply, Message::MetaResponse(Bytes::from_static(b"cba")));
    assert_eq!(st.requests.load(Ordering::SeqCst), 1);
    assert!(c.stats().connects.load(Ordering::SeqCst) >= 2);
    assert_eq!(srv.stats().accepted.load(Ordering::SeqCst), c.connections() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_messages_are_dropped_and_counted_when_the_peer_is_unreachable_then_delivered() {
    // Nobody listens here.
    let dead: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    logs();
    let pool = PeerPool::new(client_cfg());
    let raft = |i: u64| Message::Raft(pattern(i, 50 + i as usize));
    assert_eq!(pool.send(dead, raft(0)), Err(SendError::Unreachable));
    assert_eq!(pool.stats().dropped_unreachable.load(Ordering::SeqCst), 1);
    eventually("background connect failed", || pool.stats().connect_failures.load(Ordering::SeqCst) >= 1)
        .await;

    let (srv, st) = server().await;
    let c = pool.client(srv.local_addr());
    assert_eq!(c.send(raft(0)), Err(SendError::Unreachable), "not connected yet: dropped, connecting");
    eventually("connected in the background", || c.connections() == 1).await;
    for i in 1..=100 {
        c.send(raft(i)).unwrap();
    }
    eventually("all delivered", || st.one_way.lock().unwrap().len() == 100).await;
    let got = st.one_way.lock().unwrap().clone();
    let want: Vec<Bytes> = (1..=100).map(|i| pattern(i, 50 + i as usize)).collect();
    assert_eq!(got, want, "one connection: delivered in order, byte for byte");
    assert_eq!(pool.stats().sent_one_way.load(Ordering::SeqCst), 100);
    assert_eq!(pool.stats().dropped_unreachable.load(Ordering::SeqCst), 2);
    assert_eq!(srv.stats().requests.load(Ordering::SeqCst), 0, "one-way messages are not requests");
}

/// A peer that completes the handshake and then never reads: one-way
/// messages fill the socket, then the budget, then are dropped and counted
/// (not queued without bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_messages_to_a_peer_that_stops_reading_are_dropped_at_the_budget() {
    logs();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let stalled = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut b = vec![0; HEADER_LEN + 26];
        s.read_exact(&mut b).await.unwrap();
        let ack =
            Message::HelloAck(Hello { version: ProtocolVersion::V1, cluster: CLUSTER, node: SERVER_NODE });
        s.write_all(&encode_to_bytes(0, FrameFlags::NONE, &ack).unwrap()).await.unwrap();
        tokio::time::sleep(HANG).await; // never reads again
        drop(s);
    });
    let mut cfg = client_cfg();
    cfg.peer_budget = 4 << 20;
    cfg.connections = 1;
    let c = PeerClient::new(addr, cfg);
    let _ = c.send(Message::Raft(Bytes::new()));
    eventually("connected", || c.connections() == 1).await;
    let msg = Message::Raft(pattern(1, 64 << 10));
    let mut sent = 0u64;
    let start = Instant::now();
    while c.stats().dropped_full.load(Ordering::SeqCst) == 0 {
        assert!(start.elapsed() < HANG);
        if c.send(msg.clone()).is_ok() {
            sent += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // What was accepted is at most the budget plus what the socket buffers hold.
    assert!(c.stats().held.peak() <= 4 << 20);
    assert!(sent * (64 << 10) < (4 << 20) + (64 << 20), "sent {sent} messages of 64 KiB");
    stalled.abort();
}

// --- refusals

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_cluster_is_refused_with_the_reason() {
    let (srv, st) = server().await;
    let mut cfg = client_cfg();
    cfg.cluster = ClusterId(0xdead_beef).into();
    let c = PeerClient::new(srv.local_addr(), cfg);
    match c.request(Message::Ping).await {
        Err(PeerError::Refused { code: RefuseCode::WrongCluster, message, .. }) => {
            assert!(message.contains(&CLUSTER.to_string()), "{message}");
            assert!(message.contains(&ClusterId(0xdead_beef).to_string()), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(srv.stats().refused.load(Ordering::SeqCst), 1);
    assert_eq!(st.requests.load(Ordering::SeqCst), 0);
    assert_eq!(log_lines(&ClusterId(0xdead_beef).to_string(), "peer connection refused").len(), 1);
}

/// A raw connection to the server, speaking bytes.
struct Raw {
    s: TcpStream,
    local: String,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).await.unwrap();
        let local = s.local_addr().unwrap().to_string();
        Raw { s, local }
    }

    /// Connected and past the handshake.
    async fn hello(addr: SocketAddr) -> Raw {
        let mut r = Raw::connect(addr).await;
        let hello =
            Message::Hello(Hello { version: ProtocolVersion::V1, cluster: CLUSTER, node: NodeId(77) });
        r.send(&encode_to_bytes(0, FrameFlags::NONE, &hello).unwrap()).await;
        match r.frame().await {
            Some(Frame { message: Message::HelloAck(h), .. }) => assert_eq!(h.node, SERVER_NODE),
            other => panic!("{other:?}"),
        }
        r
    }

    async fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).await.unwrap();
    }

    /// The next frame, or None at end of stream.
    async fn frame(&mut self) -> Option<Frame> {
        let mut b = vec![0; HEADER_LEN];
        match tokio::time::timeout(HANG, self.s.read_exact(&mut b)).await.expect("hang") {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) => panic!("{e}"),
        }
        let len = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
        b.resize(HEADER_LEN + len, 0);
        tokio::time::timeout(HANG, self.s.read_exact(&mut b[HEADER_LEN..])).await.expect("hang").unwrap();
        let mut buf = BytesMut::from(&b[..]);
        Some(Decoder::default().decode(&mut buf).unwrap().unwrap())
    }

    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(tokio::time::timeout(HANG, self.s.read(&mut b)).await.expect("hang"), Ok(0) | Err(_))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_of_another_protocol_version_is_refused_naming_both_versions() {
    let (srv, _st) = server().await;
    let mut r = Raw::connect(srv.local_addr()).await;
    let mut hello = encode_to_bytes(
        0,
        FrameFlags::NONE,
        &Message::Hello(Hello { version: ProtocolVersion::V1, cluster: CLUSTER, node: NodeId(5) }),
    )
    .unwrap()
    .to_vec();
    hello[4] = 2; // a version 2 frame
    r.send(&hello).await;
    match r.frame().await {
        Some(Frame { message: Message::Refused(f), request_id: 0, .. }) => {
            assert_eq!(f.code, RefuseCode::VersionMismatch);
            assert!(f.message.contains("this node speaks version 1"), "{}", f.message);
            assert!(f.message.contains("sent version 2"), "{}", f.message);
        }
        other => panic!("{other:?}"),
    }
    assert!(r.closed().await);
    assert_eq!(log_lines(&r.local, "peer connection refused").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_frame_that_is_not_hello_is_refused() {
    let (srv, st) = server().await;
    let mut r = Raw::connect(srv.local_addr()).await;
    r.send(&encode_to_bytes(1, FrameFlags::NONE, &Message::Ping).unwrap()).await;
    match r.frame().await {
        Some(Frame { message: Message::Refused(f), .. }) => {
            assert_eq!(f.code, RefuseCode::ExpectedHello);
            assert!(f.message.contains("Ping"));
        }
        other => panic!("{other:?}"),
    }
    assert!(r.closed().await);
    // Garbage before any Hello: refused as malformed.
    let mut r = Raw::connect(srv.local_addr()).await;
    r.send(&[0x55; 64]).await;
    match r.frame().await {
        Some(Frame { message: Message::Refused(f), .. }) => {
            assert_eq!(f.code, RefuseCode::Malformed);
            assert!(f.message.contains("bad frame magic"), "{}", f.message);
        }
        other => panic!("{other:?}"),
    }
    assert!(r.closed().await);
    assert_eq!(log_lines(&r.local, "peer connection refused").len(), 1);
    // A first frame bigger than a handshake is refused from its header:
    // no one who has not said Hello gets 33 MiB buffered.
    let mut r = Raw::connect(srv.local_addr()).await;
    let mut big = raw_frame(1, Kind::Hello as u16, 0, 0, &[]);
    big[12..16].copy_from_slice(&(1u32 << 20).to_le_bytes());
    reseal(&mut big);
    r.send(&big).await;
    match r.frame().await {
        Some(Frame { message: Message::Refused(f), .. }) => {
            assert_eq!(f.code, RefuseCode::Malformed);
            assert!(f.message.contains("over the 4096-byte cap"), "{}", f.message);
        }
        other => panic!("{other:?}"),
    }
    assert!(r.closed().await);
    assert_eq!(st.requests.load(Ordering::SeqCst), 0);
}

// --- hostile frames after the handshake: one test per malformation

/// A frame with correct crcs around an arbitrary header and payload.
fn raw_frame(version: u16, kind: u16, flags: u32, id: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&kind.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&id.to_le_bytes());
    b.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let h = crc32c::crc32c(&b[..28]);
    b.extend_from_slice(&h.to_le_bytes());
    b.extend_from_slice(payload);
    b
}

fn reseal(b: &mut [u8]) {
    let h = crc32c::crc32c(&b[..28]);
    b[28..32].copy_from_slice(&h.to_le_bytes());
}

/// Sends `bytes` after a good request, on a connection past the handshake:
/// the good request is answered, the bad frame gets an `Error` (with its
/// request id when the header was intact) carrying exactly the decoder's
/// complaint, a log line names the connection, the connection closes, and
/// the server goes on serving another connection.
async fn hostile(bytes: Vec<u8>, half_close: bool) {
    let (srv, _st) = server().await;
    let mut r = Raw::hello(srv.local_addr()).await;
    let expected = match Decoder::default().decode(&mut BytesMut::from(&bytes[..])) {
        Err(e) => Some(e),
        Ok(None) => None, // truncated: the server sees the end of the stream
        Ok(Some(f)) => panic!("not hostile: {f:?}"),
    };
    let mut both = encode_to_bytes(41, FrameFlags::NONE, &Message::Ping).unwrap().to_vec();
    both.extend_from_slice(&bytes);
    r.send(&both).await;
    if half_close {
        r.s.shutdown().await.unwrap();
    }
    let mut frames = Vec::new();
    while let Some(f) = r.frame().await {
        frames.push(f);
    }
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert_eq!(frames[0], Frame { request_id: 41, flags: FrameFlags::NONE, message: Message::Pong });
    let Message::Error(err) = &frames[1].message else { panic!("{frames:?}") };
    assert_eq!(err.code, ErrorCode::Malformed);
    match &expected {
        Some(e) => {
            assert_eq!(err.message, basalt::net::error_chain(e));
            assert_eq!(frames[1].request_id, e.request_id().unwrap_or(0));
        }
        None => assert!(err.message.contains("in the middle of a frame"), "{}", err.message),
    }
    let lines = log_lines(&r.local, "bad frame from peer");
    assert_eq!(lines.len(), 1, "one log line for the bad frame");
    assert!(lines[0].contains("WARN"));
    assert_eq!(srv.stats().bad_frames.load(Ordering::SeqCst), 1);
    // Everyone else is still served.
    let c = PeerClient::new(srv.local_addr(), client_cfg());
    assert_eq!(c.request(Message::Ping).await.unwrap(), Message::Pong);
}

fn good_write(id: u64) -> Vec<u8> {
    let w = ExtentWrite { target: target(1), offset: 0, fua: false, copy: false, data: pattern(1, 1000) };
    encode_to_bytes(id, FrameFlags::NONE, &Message::ExtentWrite(w)).unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bad_magic() {
    let mut b = good_write(5);
    b[..4].copy_from_slice(b"HTTP");
    hostile(b, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_version_change_mid_connection() {
    let mut b = good_write(5);
    b[4] = 9;
    reseal(&mut b);
    hostile(b, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_header_checksum() {
    let mut b = good_write(5);
    b[20] ^= 1;
    hostile(b, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_unknown_flags() {
    hostile(raw_frame(1, Kind::Ping as u16, 0x80, 6, &[]), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_unknown_kind() {
    hostile(raw_frame(1, 4242, 0, 7, &[]), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_oversize_is_answered_before_any_payload() {
    // Claims 40 MiB and sends none of it: answered from the header alone.
    let mut b = raw_frame(1, Kind::ExtentWrite as u16, 0, 8, &[]);
    b[12..16].copy_from_slice(&(40u32 << 20).to_le_bytes());
    reseal(&mut b);
    hostile(b, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_payload_checksum() {
    let mut b = good_write(9);
    let last = b.len() - 1;
    b[last] ^= 0xff;
    hostile(b, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_truncated_body() {
    hostile(raw_frame(1, Kind::ExtentRead as u16, 0, 10, &[1, 2, 3]), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_invalid_body_field() {
    let r = ExtentRead { target: target(1), offset: u64::MAX, len: 4096 };
    let b = encode_to_bytes(11, FrameFlags::NONE, &Message::ExtentRead(r)).unwrap().to_vec();
    let e = Decoder::default().decode(&mut BytesMut::from(&b[..])).unwrap_err();
    // The answer names the field and why, not just the kind.
    assert_eq!(
        basalt::net::error_chain(&e),
        "malformed ExtentRead body on request 11: field len = 4096 is invalid: offset + len overflows"
    );
    hostile(b, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_trailing_bytes() {
    let mut body = vec![0; 32];
    body.push(1);
    hostile(raw_frame(1, Kind::ExtentStatus as u16, 0, 12, &body), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_text_not_utf8() {
    hostile(raw_frame(1, Kind::Error as u16, 0, 13, &[4, 0, 2, 0, 0xc3, 0x28]), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_request_id_zero() {
    let (srv, _st) = server().await;
    let mut r = Raw::hello(srv.local_addr()).await;
    r.send(&encode_to_bytes(0, FrameFlags::NONE, &Message::Ping).unwrap()).await;
    let f = r.frame().await.unwrap();
    assert_eq!(f.request_id, 0);
    assert_eq!(f.message, Message::error(ErrorCode::Malformed, "request id 0 is reserved"));
    assert!(r.closed().await);
    assert_eq!(log_lines(&r.local, "request id 0 is reserved").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frame_cut_off_by_the_end_of_the_stream() {
    let mut b = good_write(14);
    b.truncate(HEADER_LEN + 100);
    hostile(b, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_sent_as_a_request_is_answered_and_the_connection_goes_on() {
    let (srv, st) = server().await;
    let mut r = Raw::hello(srv.local_addr()).await;
    r.send(&encode_to_bytes(3, FrameFlags::NONE, &Message::ExtentOk).unwrap()).await;
    let f = r.frame().await.unwrap();
    assert_eq!(f.request_id, 3);
    assert_eq!(f.message, Message::error(ErrorCode::Unexpected, "ExtentOk is not a request"));
    r.send(&encode_to_bytes(4, FrameFlags::NONE, &Message::Ping).unwrap()).await;
    assert_eq!(r.frame().await.unwrap().message, Message::Pong);
    assert_eq!(st.requests.load(Ordering::SeqCst), 0);
    assert_eq!(log_lines(&r.local, "peer sent a reply").len(), 1);
}

// --- memory

/// 300 reads of 1 MiB sent at once by a client that reads no reply: without
/// the connection budget the server would build 300 MiB of replies. With an
/// 8 MiB budget it stops reading the connection once the budget is spent,
/// holds no more than it, and answers everything, right, once the client
/// reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_replies_cannot_grow_server_memory() {
    let mut cfg = ServerConfig::new(CLUSTER, SERVER_NODE);
    cfg.connection_budget = 8 << 20;
    let (srv, st) = server_with(cfg).await;
    let mut r = Raw::hello(srv.local_addr()).await;
    let mut reqs = Vec::new();
    for i in 1..=300u64 {
        let m = Message::ExtentRead(ExtentRead { target: target(i), offset: i << 20, len: 1 << 20 });
        reqs.extend_from_slice(&encode_to_bytes(i, FrameFlags::NONE, &m).unwrap());
    }
    r.send(&reqs).await;
    // Give the server every chance to overrun (nothing depends on how long).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let handled = st.requests.load(Ordering::SeqCst);
    eprintln!(
        "FIGURE: {handled} of 300 reads handled while stalled; server held at most {} bytes",
        srv.stats().held.peak()
    );
    assert!(srv.stats().held.peak() <= 8 << 20, "held {} bytes", srv.stats().held.peak());
    // Replies in flight fit the budget; a few more sit in socket buffers.
    assert!(handled < 100, "{handled} of 300 reads ran while the client read nothing");
    // Another connection is served meanwhile.
    let c = PeerClient::new(srv.local_addr(), client_cfg());
    assert_eq!(c.request(Message::Ping).await.unwrap(), Message::Pong);
    // Every reply arrives, right, once the client reads.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..300 {
        let f = r.frame().await.unwrap();
        let want = pattern(f.request_id << 20, 1 << 20);
        assert_eq!(
            f.message,
            Message::ExtentReadReply(ExtentReadReply { crcs: Some(crcs(&want)), data: want })
        );
        assert!(seen.insert(f.request_id));
    }
    assert_eq!(seen.len(), 300);
    eventually("budget back", || srv.stats().held.now() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_says_hello_is_closed() {
    let mut cfg = ServerConfig::new(CLUSTER, SERVER_NODE);
    cfg.hello_timeout = Duration::from_millis(200);
    let (srv, _st) = server_with(cfg).await;
    let mut r = Raw::connect(srv.local_addr()).await;
    r.send(&MAGIC).await; // a few bytes, then nothing
    assert!(r.closed().await);
    eventually("logged", || log_lines(&r.local, "no Hello within 200ms").len() == 1).await;
}

/// The client side is just as careful: a server answering with garbage
/// fails the requests waiting on that connection (never a panic or a
/// wrong answer), is logged, and the next request connects afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_answering_garbage_fails_the_waiting_requests() {
    logs();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let fake = tokio::spawn(async move {
        for _ in 0..2 {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = vec![0; HEADER_LEN + 26];
            s.read_exact(&mut b).await.unwrap();
            let ack = Message::HelloAck(Hello {
                version: ProtocolVersion::V1,
                cluster: CLUSTER,
                node: SERVER_NODE,
            });
            s.write_all(&encode_to_bytes(0, FrameFlags::NONE, &ack).unwrap()).await.unwrap();
            let mut req = vec![0; HEADER_LEN];
            s.read_exact(&mut req).await.unwrap();
            s.write_all(b"this is not a frame, not at all: 32+ bytes of it").await.unwrap();
            let _ = s.read(&mut req).await; // until the client hangs up
        }
    });
    let mut cfg = client_cfg();
    cfg.connections = 1;
    let c = PeerClient::new(addr, cfg);
    for _ in 0..2 {
        match c.request(Message::Ping).await {
            Err(PeerError::ConnectionLost { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(c.stats().connects.load(Ordering::SeqCst), 2);
    assert_eq!(c.in_flight(), 0);
    let lines = log_lines(&addr.to_string(), "peer connection failed");
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].contains("bad frame magic"), "{}", lines[0]);
    fake.await.unwrap();
}
