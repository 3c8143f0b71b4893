//! The peer port of a real `basaltd run` against hostile peers on raw TCP:
//! half-sent frames are bounded node-wide and closed after the frame
//! deadline while the node keeps answering; messages naming a sender other
//! than the connection's Hello, or coming from a non-member, are refused
//! and change no metadata; and `PeerServer::shutdown` returns even when a
//! request handler never does.

mod common;

use basalt::meta::state::{Command, Proposal, RequestId, VolumeSpec, encode_proposal};
use basalt::net::{ClientConfig, PeerHandler, PeerInfo, PeerPool, PeerServer, ReplyFuture, ServerConfig};
use basalt::proto::peer::{
    Decoder, ErrorCode, Frame, FrameFlags, HEADER_LEN, Hello, Message, ProtocolVersion, encode_to_bytes,
};
use basalt::types::{ClusterId, NodeId};
use bytes::{Bytes, BytesMut};
use common::cluster::Cluster;
use raft::eraftpb::{Entry, MessageType};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Guards against a hang only: every wait ends far sooner when the code works.
const HANG: Duration = Duration::from_secs(120);

/// The first frame of a connection: a Hello as `node`, cluster id 0 (what
/// a fresh node says, which a member accepts).
fn hello(node: u64) -> Bytes {
    let h = Hello { version: ProtocolVersion::CURRENT, cluster: ClusterId(0), node: NodeId(node) };
    encode_to_bytes(0, FrameFlags::NONE, &Message::Hello(h)).unwrap()
}

/// One whole frame off `s`, or `None` once the peer closed (EOF or reset).
fn read_frame(s: &mut TcpStream) -> Option<Frame> {
    try_read_frame(s).unwrap_or_else(|e| panic!("reading a frame: {e}"))
}

/// Like `read_frame`, with a timeout (HANG) as an error.
fn try_read_frame(s: &mut TcpStream) -> std::io::Result<Option<Frame>> {
    let mut head = [0u8; HEADER_LEN];
    match s.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(head[12..16].try_into().unwrap()) as usize;
    let mut buf = BytesMut::from(&head[..]);
    buf.resize(HEADER_LEN + len, 0);
    s.read_exact(&mut buf[HEADER_LEN..])?;
    Ok(Some(
        Decoder::default().decode(&mut buf).expect("the node sends valid frames").expect("a whole frame"),
    ))
}

/// Connects to `addr` as `node` and checks the HelloAck.
fn connect(addr: SocketAddr, node: u64) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(HANG)).unwrap();
    s.set_write_timeout(Some(HANG)).unwrap();
    s.write_all(&hello(node)).unwrap();
    let ack = read_frame(&mut s).expect("a HelloAck");
    assert!(matches!(ack.message, Message::HelloAck(_)), "{ack:?}");
    s
}

/// Whether the peer closed `s`: EOF or a reset, after any frames it sent.
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Ping over a fresh connection: the node serves peers.
fn ping(addr: SocketAddr) {
    let mut s = connect(addr, 0x7e57);
    s.write_all(&encode_to_bytes(3, FrameFlags::NONE, &Message::Ping).unwrap()).unwrap();
    let f = read_frame(&mut s).expect("a Pong");
    assert_eq!((f.request_id, &f.message), (3, &Message::Pong));
}

const STALLED: usize = 24;
const ASSEMBLY_MIB: u64 = 96;
const FRAME_TIMEOUT_MS: u64 = 1000;

/// 24 connections each send a valid header declaring a 32 MiB payload,
/// then 24 MiB of it, and stall. Without a node-wide bound the node buffers
/// 24 x 24 MiB = 576 MiB. With `peer.assembly_budget = 96MiB` at most two
/// such frames (32 MiB + header each) are read at once; the others wait,
/// unread, until a deadline closes a holder.
///
/// Bound on the node's VmHWM, from the config: its VmHWM before the attack,
/// plus the assembly budget, plus two read chunks (64 KiB) per connection,
/// plus 32 MiB for what the runtime, allocator and logging may add meanwhile.
#[test]
fn half_sent_frames_are_bounded_node_wide_and_closed_after_the_deadline() {
    let mut c = Cluster::configure(1, 1, None);
    let mut cfg = std::fs::read_to_string(&c.nodes[0].config).unwrap();
    cfg +=
        &format!("[peer]\nassembly_budget = \"{ASSEMBLY_MIB}MiB\"\nframe_timeout_ms = {FRAME_TIMEOUT_MS}\n");
    std::fs::write(&c.nodes[0].config, cfg).unwrap();
    c.spawn(0);
    c.wait_ready(0);
    let (pid, addr) = (c.pid(0).unwrap(), c.nodes[0].peer);
    let before = status_kib(pid, "VmHWM:");

    // One valid 32 MiB Raft frame; each connection sends its first 24 MiB.
    let frame =
        encode_to_bytes(1, FrameFlags::ONE_WAY, &Message::Raft(Bytes::from(vec![7u8; 32 << 20]))).unwrap();
    let part = frame.slice(..HEADER_LEN + (24 << 20));
    let (started_tx, started) = std::sync::mpsc::channel();
    let threads: Vec<_> = (0..STALLED)
        .map(|i| {
            let (part, started_tx) = (part.clone(), started_tx.clone());
            std::thread::spawn(move || {
                let mut s = connect(addr, 1000 + i as u64);
                s.write_all(&part[..HEADER_LEN]).unwrap();
                started_tx.send(()).unwrap();
                // Blocks while the node does not read this socket; fails if
                // the node closes it meanwhile.
                let sent = s.write_all(&part[HEADER_LEN..]).is_ok();
                // The node's answer: an Error about the connection, then the close.
                let mut error = None;
                if sent {
                    match try_read_frame(&mut s) {
                        Ok(Some(f)) => error = Some(f),
                        Ok(None) => return (sent, None, true),
                        // Nothing within HANG: never closed.
                        Err(_) => return (sent, None, false),
                    }
                }
                (sent, error, closed(&mut s))
            })
        })
        .collect();
    for _ in 0..STALLED {
        started.recv_timeout(HANG).expect("every connection sent its header");
    }

    // Meanwhile the node serves: a peer request and the admin API.
    ping(addr);
    let status = c.cli_json(0, &["cluster", "status"]);
    assert_eq!(status["nodes"].as_array().unwrap().len(), 1, "{status}");

    let outcomes: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let after = status_kib(pid, "VmHWM:");
    let bound = before + ASSEMBLY_MIB * 1024 + STALLED as u64 * 2 * 64 + 32 * 1024;
    eprintln!("VmHWM before the attack {before} KiB, after {after} KiB, bound {bound} KiB");
    assert!(after <= bound, "VmHWM {after} KiB over the bound {bound} KiB (before: {before} KiB)");
    for (i, (_sent, error, was_closed)) in outcomes.iter().enumerate() {
        assert!(was_closed, "connection {i} was not closed");
        if let Some(f) = error {
            assert_eq!(f.request_id, 0, "connection {i}: {f:?}");
            assert!(
                matches!(&f.message, Message::Error(e) if e.code == ErrorCode::Malformed
                    && e.message.contains("not complete within")),
                "connection {i}: {f:?}"
            );
        }
    }
    let log = c.log(0);
    assert_eq!(
        log.matches("peer frame stalled; answering with an error and closing").count(),
        STALLED,
        "{log}"
    );
    // Still serving after it all.
    ping(addr);
}

/// With `peer.max_handshaking = 4`, four sockets that never send a Hello
/// hold every handshake slot: a fifth connection is closed at once with a
/// log line; once one of the four goes, a peer connects and is served.
#[test]
fn connections_without_a_hello_are_bounded() {
    let mut c = Cluster::configure(1, 1, None);
    let mut cfg = std::fs::read_to_string(&c.nodes[0].config).unwrap();
    cfg += "[peer]\nmax_handshaking = 4\n";
    std::fs::write(&c.nodes[0].config, cfg).unwrap();
    c.spawn(0);
    c.wait_ready(0);
    let addr = c.nodes[0].peer;
    let mut silent: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // The node takes connections in order: once the fifth is closed, the
    // four hold their slots (each has hello_timeout, 10 s, to speak).
    // A fifth is closed before its Hello is read: no HelloAck, just the close.
    let mut fifth = TcpStream::connect(addr).unwrap();
    fifth.set_read_timeout(Some(HANG)).unwrap();
    let _ = fifth.write_all(&hello(0x7e58));
    let answer = try_read_frame(&mut fifth);
    assert!(matches!(answer, Ok(None)) || answer.is_err(), "the fifth connection was served: {answer:?}");
    // One silent socket goes; its slot comes back once the node sees it close.
    let mut gone = silent.pop().unwrap();
    gone.shutdown(std::net::Shutdown::Write).unwrap();
    gone.set_read_timeout(Some(HANG)).unwrap();
    assert!(closed(&mut gone));
    ping(addr);
    let log = c.log(0);
    assert_eq!(log.matches("too many peer connections still in their handshake").count(), 1, "{log}");
    drop(silent);
}

fn forged_propose(from: u64, to: u64, name: &str) -> Bytes {
    let spec = VolumeSpec {
        name: name.into(),
        size: 1 << 30,
        replicas: 1,
        min_replicas: 1,
        extent_size: 64 << 20,
        stripe_unit: 64 << 20,
        stripe_width: 1,
        read_only: false,
    };
    let p = Proposal {
        request: RequestId { origin: NodeId(from), seq: 1 << 40 },
        command: Command::CreateVolume { spec },
    };
    let mut m = raft::eraftpb::Message::default();
    m.set_msg_type(MessageType::MsgPropose);
    m.from = from;
    m.to = to;
    let e = Entry { data: encode_proposal(&p).into(), ..Default::default() };
    m.entries = vec![e].into();
    Bytes::from(basalt::meta::encode_raft_message(&m))
}

fn names(c: &Cluster) -> Vec<String> {
    let v = c.cli_json(0, &["volume", "list"]);
    let mut n: Vec<String> =
        v.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap().into()).collect();
    n.sort();
    n
}

/// A socket says Hello as node X, then sends a Raft proposal claiming to
/// be from the node itself (the single member, which raft-rs would take):
/// refused with `Forbidden` and the connection closed. Then a proposal
/// from X as X: X is no member, refused, the connection stays. A volume
/// created afterwards through the CLI is the only one in the metadata.
#[test]
fn forged_raft_messages_are_refused_and_change_no_metadata() {
    let c = Cluster::start(1, 1);
    let status = c.cli_json(0, &["cluster", "status"]);
    let me = status["nodes"][0]["id"].as_u64().unwrap();
    let x = me ^ 0x5a5a_5a5a;
    let addr = c.nodes[0].peer;
    assert_eq!(names(&c), Vec::<String>::new());

    // Answers come at once; a missing one shows after this wait, and the
    // checks below say what was missing.
    let answer_of = |s: &mut TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        try_read_frame(s).ok().flatten()
    };
    let mut s = connect(addr, x);
    let forged = Message::Raft(forged_propose(me, me, "forged"));
    s.write_all(&encode_to_bytes(7, FrameFlags::ONE_WAY, &forged).unwrap()).unwrap();
    let answer = answer_of(&mut s);
    let forged_closed = closed(&mut s);

    let mut s = connect(addr, x);
    let outsider = Message::Raft(forged_propose(x, me, "outsider"));
    s.write_all(&encode_to_bytes(8, FrameFlags::ONE_WAY, &outsider).unwrap()).unwrap();
    let outsider_answer = answer_of(&mut s);
    s.write_all(&encode_to_bytes(9, FrameFlags::NONE, &Message::Ping).unwrap()).unwrap();
    let pong = answer_of(&mut s);

    // A write after the forged ones: had they been taken, they would be in
    // the log before it.
    let create = ["volume", "create", "", "--size", "1G", "--replicas", "1", "--min-replicas", "1"];
    let named = |n| {
        let mut a = create;
        a[2] = n;
        a
    };
    c.cli_json(0, &named("legit"));
    assert_eq!(names(&c), ["legit"]);

    // An empty proposal, which raft-rs treats as fatal, even from a socket
    // that names itself as the member (nothing proves a Hello yet).
    let mut s = connect(addr, me);
    let mut m = raft::eraftpb::Message::default();
    m.set_msg_type(MessageType::MsgPropose);
    (m.from, m.to) = (me, me);
    let empty = Message::Raft(Bytes::from(basalt::meta::encode_raft_message(&m)));
    s.write_all(&encode_to_bytes(10, FrameFlags::ONE_WAY, &empty).unwrap()).unwrap();
    let empty_answer = answer_of(&mut s);
    let empty_closed = closed(&mut s);
    // The metadata group still runs.
    c.cli_json(0, &named("after"));
    assert_eq!(names(&c), ["after", "legit"]);

    let f = answer.expect("an answer to the forged message");
    assert_eq!(f.request_id, 7, "{f:?}");
    assert!(
        matches!(&f.message, Message::Error(e) if e.code == ErrorCode::Forbidden
            && e.message.contains(&format!("names node {} as its sender", NodeId(me))) && e.message.contains(&format!("named node {}", NodeId(x)))),
        "{f:?}"
    );
    assert!(forged_closed, "an impostor's connection is closed");
    let f = outsider_answer.expect("an answer to the outsider's message");
    assert!(
        matches!(&f.message, Message::Error(e) if e.code == ErrorCode::Forbidden
            && e.message.contains(&format!("node {} is not a member", NodeId(x)))),
        "{f:?}"
    );
    assert_eq!(pong.map(|f| (f.request_id, f.message)), Some((9, Message::Pong)));
    let f = empty_answer.expect("an answer to the empty proposal");
    assert!(
        matches!(&f.message, Message::Error(e) if e.code == ErrorCode::Forbidden
            && e.message.contains("only the local node makes")),
        "{f:?}"
    );
    assert!(empty_closed);
    let log = c.log(0);
    assert_eq!(log.matches("peer message refused").count(), 3, "{log}");
}

/// Answers nothing, ever; notes when its future is dropped.
struct Never {
    dropped: Arc<AtomicBool>,
}

struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl PeerHandler for Never {
    fn request(&self, _peer: PeerInfo, _request: Message) -> ReplyFuture {
        let guard = SetOnDrop(self.dropped.clone());
        Box::pin(async move {
            let _guard = guard;
            std::future::pending::<Message>().await
        })
    }

    fn one_way(&self, _peer: PeerInfo, _message: Message) {}
}

/// A handler that never returns: shutdown drops it after the grace and
/// returns, instead of waiting forever.
#[tokio::test]
async fn shutdown_drops_a_handler_that_never_returns() {
    let dropped = Arc::new(AtomicBool::new(false));
    let mut cfg = ServerConfig::new(ClusterId(5), NodeId(1));
    cfg.shutdown_grace = Duration::from_millis(200);
    let handler = Arc::new(Never { dropped: dropped.clone() });
    let server = PeerServer::bind("127.0.0.1:0".parse().unwrap(), cfg, handler).await.unwrap();
    let pool = PeerPool::new(ClientConfig::new(ClusterId(5), NodeId(2)));
    let addr = server.local_addr();
    let req =
        tokio::spawn(async move { pool.request(addr, Message::MetaRequest(Bytes::from_static(b"x"))).await });
    while server.stats().requests.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!dropped.load(Ordering::SeqCst));
    let stats_requests = server.stats().requests.load(Ordering::SeqCst);
    tokio::time::timeout(HANG, server.shutdown()).await.expect("shutdown returns");
    assert!(dropped.load(Ordering::SeqCst), "the handler's future was dropped");
    assert_eq!(stats_requests, 1);
    // The request's connection is gone with the server: it fails, not hangs.
    let r = tokio::time::timeout(HANG, req).await.expect("the request ends").unwrap();
    assert!(r.is_err(), "{r:?}");
}
