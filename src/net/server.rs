//! The accepting side of the peer protocol.
//!
//! Per connection: the first frame must be a `Hello` of this cluster in
//! this protocol version, else the connection is answered `Refused` with a
//! reason, logged and closed. After `HelloAck`, one task reads and decodes
//! frames and spawns a task per request that runs the handler and queues
//! its encoded reply; one writer task drains the queue in vectored writes.
//! Many requests are in flight at once and answered as they complete.
//!
//! Memory: every request takes room in the connection's byte budget before
//! its handler runs (its frame, the reply it may produce, a fixed overhead)
//! and gives it back only when its reply is written. When the budget is
//! spent the reader stops reading the socket: a peer that never reads its
//! replies stalls itself, not the node. A frame being assembled is bounded
//! node-wide: once its header declares more than a read chunk, the frame
//! takes its whole length from the server's assembly budget before a byte
//! of its payload is read (waiting, without reading the socket, while the
//! budget is spent), and gives it back once the decoded frame holds room in
//! the connection's budget, or when the connection dies. It must then be
//! complete within `frame_timeout`, else the connection is closed: a peer
//! that sends half a frame and stalls holds the room for that long only.
//! Worst case per connection beyond its budget: a frame waiting for that
//! budget (counted in the assembly budget) and two read chunks; over the
//! server: the assembly budget plus that slack per connection. Connections
//! that have not sent their `Hello` are at most `max_handshaking` (more are
//! closed on accept) and buffer at most a read chunk each.
//!
//! Identity: the `Hello` names the connecting node, and every message is
//! offered to [`PeerHandler::admit`] first, which refuses one that names a
//! different sender (a Raft message's `from`) or comes from a node that is
//! not a member; the refusal is answered with `Error` (`Forbidden`) and
//! logged. Nothing proves the `Hello` itself: a socket that knows the
//! cluster id can still claim any node id. Mutual TLS on the peer port,
//! binding a node id to a certificate, is a later issue.
//!
//! Shutdown: [`PeerServer::shutdown`] waits `shutdown_grace` for handlers
//! still running, then drops them (logged), so it always returns.
//!
//! Hostile input: a frame that does not decode is answered with an `Error`
//! (with its request id when the header was intact, else id 0), logged, and
//! the connection closed; other connections are not affected.

use super::budget::{ByteBudget, Gauge, Held};
use super::wire::{self, Outgoing, ReadError, WriterCmd, WriterTx};
use super::{PeerInfo, ServerConfig};
use crate::proto::peer::{
    DecodeError, Decoder, ErrorCode, Frame, FrameFlags, Hello, Message, ProtocolVersion, RefuseCode, Refused,
    frame_len,
};
use crate::types::NodeId;
use bytes::{BufMut, BytesMut};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

/// The future of one request's reply.
pub type ReplyFuture = Pin<Box<dyn Future<Output = Message> + Send + 'static>>;

/// What serves the requests of connected peers (the node: its extent store
/// and its metadata layer). Transport messages (`Hello`, `Ping`) never reach
/// it.
pub trait PeerHandler: Send + Sync + 'static {
    /// Answers one request from `peer`. Runs concurrently with the peer's
    /// other requests. The future may be dropped only if the node shuts
    /// down; it is not dropped when the peer disconnects.
    fn request(&self, peer: PeerInfo, request: Message) -> ReplyFuture;

    /// Takes a one-way message (a Raft message). Must not block: queue it
    /// (and drop it when the queue is full; Raft retransmits).
    fn one_way(&self, peer: PeerInfo, message: Message);

    /// Whether `peer` may send `message` (a request or a one-way message;
    /// never `Hello` or `Ping`), before it reaches [`PeerHandler::request`]
    /// or [`PeerHandler::one_way`]. A refused message is answered with
    /// `Error` (`Forbidden`, even when it was one-way) and logged; any
    /// refusal but [`Refusal::NotMember`] also closes the connection. Must
    /// not block.
    /// The default admits everything: for handlers whose messages name no
    /// sender. This checks what a peer claims against its `Hello`, which
    /// nothing authenticates yet (mutual TLS is a later issue).
    fn admit(&self, peer: PeerInfo, message: &Message) -> Result<(), Refusal> {
        let _ = (peer, message);
        Ok(())
    }
}

/// Why [`PeerHandler::admit`] refused a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The message names a sender other than the connection's `Hello`:
    /// forged or confused, either way the connection is closed.
    #[error("the message names node {claimed} as its sender, but this connection's Hello named node {hello}")]
    Impostor { claimed: NodeId, hello: NodeId },
    /// The connection's node is not a member of the cluster (as far as this
    /// node knows) and the message is one only members may send.
    #[error("node {node} is not a member of this cluster ({what} is for members only)")]
    NotMember { node: NodeId, what: &'static str },
    /// A message no honest peer sends (one the receiver's own code would
    /// trip over): the connection is closed.
    #[error("refused: {0}")]
    Invalid(&'static str),
}

/// Counters of a server, over all its connections (exported by
/// `admin::metrics::PeerServerCollector`).
#[derive(Debug, Default)]
pub struct ServerStats {
    pub accepted: AtomicU64,
    /// Connections refused at their Hello, over every code.
    pub refused: AtomicU64,
    /// The same by code, in [`REFUSE_CODES`] order.
    refused_by: [AtomicU64; 4],
    /// Connections closed because no Hello came within `hello_timeout`.
    pub hello_timeouts: AtomicU64,
    pub bad_frames: AtomicU64,
    pub requests: AtomicU64,
    pub one_way: AtomicU64,
    /// Messages [`PeerHandler::admit`] refused.
    pub forbidden: AtomicU64,
    /// The same by kind of refusal, in [`ServerStats::forbidden_by`] order.
    forbidden_by: [AtomicU64; 3],
    /// Connections closed because a frame's payload did not complete in time.
    pub frame_timeouts: AtomicU64,
    /// Connections closed on accept: too many were still in their handshake.
    pub handshake_overflow: AtomicU64,
    /// Request handlers dropped because shutdown's grace ran out.
    pub handlers_aborted: AtomicU64,
    /// Bytes held by requests in flight over every connection, now and at most.
    pub held: Arc<Gauge>,
    /// Bytes of the assembly budget held by partly received frames, now and
    /// at most.
    pub assembling: Arc<Gauge>,
}

/// The codes a Hello is refused with, each with its metric label.
pub const REFUSE_CODES: [(RefuseCode, &str); 4] = [
    (RefuseCode::VersionMismatch, "version_mismatch"),
    (RefuseCode::WrongCluster, "wrong_cluster"),
    (RefuseCode::ExpectedHello, "expected_hello"),
    (RefuseCode::Malformed, "malformed"),
];

impl ServerStats {
    /// Hello refusals by code: (label, count) in [`REFUSE_CODES`] order.
    pub fn refused_by(&self) -> [(&'static str, u64); 4] {
        std::array::from_fn(|i| (REFUSE_CODES[i].1, self.refused_by[i].load(Ordering::Relaxed)))
    }

    /// Messages refused by [`PeerHandler::admit`], by kind of [`Refusal`]:
    /// (label, count).
    pub fn forbidden_by(&self) -> [(&'static str, u64); 3] {
        let labels = ["impostor", "not_member", "invalid"];
        std::array::from_fn(|i| (labels[i], self.forbidden_by[i].load(Ordering::Relaxed)))
    }

    fn count_refused(&self, code: RefuseCode) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        if let Some(i) = REFUSE_CODES.iter().position(|(c, _)| *c == code) {
            self.refused_by[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn count_forbidden(&self, r: &Refusal) {
        self.forbidden.fetch_add(1, Ordering::Relaxed);
        let i = match r {
            Refusal::Impostor { .. } => 0,
            Refusal::NotMember { .. } => 1,
            Refusal::Invalid(_) => 2,
        };
        self.forbidden_by[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Frames of at most this many bytes are read without room in the
/// assembly budget: a read chunk per connection is allowed for anyway.
const SMALL_FRAME: usize = wire::READ_CHUNK;

struct Shared {
    cfg: ServerConfig,
    handler: Arc<dyn PeerHandler>,
    stats: Arc<ServerStats>,
    cancel: CancellationToken,
    /// Cancelled when shutdown's grace runs out: handlers still running
    /// are dropped.
    abort: CancellationToken,
    tracker: TaskTracker,
    /// Partly received frames, over every connection.
    assembly: ByteBudget,
    /// Permits for connections that have not finished their `Hello`.
    handshakes: Arc<Semaphore>,
}

/// A running peer server. Dropping it stops accepting and closes every
/// connection (requests already running finish; their replies are dropped).
#[derive(Debug)]
pub struct PeerServer {
    addr: SocketAddr,
    stats: Arc<ServerStats>,
    cancel: CancellationToken,
    abort: CancellationToken,
    tracker: TaskTracker,
    grace: Duration,
}

impl PeerServer {
    /// Binds `addr` and serves on it.
    pub async fn bind(
        addr: SocketAddr,
        cfg: ServerConfig,
        handler: Arc<dyn PeerHandler>,
    ) -> std::io::Result<PeerServer> {
        PeerServer::start(TcpListener::bind(addr).await?, cfg, handler)
    }

    /// Serves on `listener` (from a task of its own, on the current tokio
    /// runtime) until dropped or shut down.
    pub fn start(
        listener: TcpListener,
        cfg: ServerConfig,
        handler: Arc<dyn PeerHandler>,
    ) -> std::io::Result<PeerServer> {
        let addr = listener.local_addr()?;
        let stats = Arc::new(ServerStats::default());
        let cancel = CancellationToken::new();
        let abort = CancellationToken::new();
        let tracker = TaskTracker::new();
        let grace = cfg.shutdown_grace;
        let shared = Arc::new(Shared {
            assembly: ByteBudget::new(cfg.assembly_budget, stats.assembling.clone()),
            handshakes: Arc::new(Semaphore::new(cfg.max_handshaking.max(1))),
            cfg,
            handler,
            stats: stats.clone(),
            cancel: cancel.clone(),
            abort: abort.clone(),
            tracker: tracker.clone(),
        });
        info!(%addr, cluster = %shared.cfg.cluster.get(), node = %shared.cfg.node, "peer server listening");
        tracker.spawn(accept_loop(listener, shared));
        Ok(PeerServer { addr, stats, cancel, abort, tracker, grace })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// The counters, to read at scrape time (`admin::metrics`).
    pub fn shared_stats(&self) -> Arc<ServerStats> {
        self.stats.clone()
    }

    /// Stops accepting, closes every connection, and waits for every task
    /// (handlers of requests in flight included) to finish, at most
    /// `shutdown_grace`; then drops the handlers still running (their
    /// replies go nowhere) and waits for that, again at most the grace.
    /// Returns in at most twice the grace, whatever the handlers do, unless
    /// one blocks its thread (a handler must not).
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(self.grace, self.tracker.wait()).await.is_ok() {
            return;
        }
        warn!(tasks = self.tracker.len(), grace = ?self.grace,
            "peer server shutdown: request handlers still running after the grace; dropping them");
        self.abort.cancel();
        if tokio::time::timeout(self.grace, self.tracker.wait()).await.is_err() {
            warn!(
                tasks = self.tracker.len(),
                "peer server shutdown: tasks still running after being dropped; leaving them"
            );
        }
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((sock, addr)) => {
                shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
                let Ok(permit) = shared.handshakes.clone().try_acquire_owned() else {
                    // Every permit is held by a connection that has not sent
                    // its Hello (each for at most hello_timeout): closing
                    // this one bounds what a connect flood costs.
                    let n = shared.stats.handshake_overflow.fetch_add(1, Ordering::Relaxed) + 1;
                    let max = shared.cfg.max_handshaking;
                    if n.is_power_of_two() {
                        warn!(peer = %addr, closed = n, max, "too many peer connections still in their handshake; closing new ones (logged at powers of two)");
                    } else {
                        debug!(peer = %addr, closed = n, max, "too many peer connections still in their handshake; closed");
                    }
                    drop(sock);
                    continue;
                };
                let span = tracing::info_span!("peer_conn", peer = %addr, node = tracing::field::Empty);
                shared.tracker.spawn(connection(sock, addr, permit, shared.clone()).instrument(span));
            }
            Err(e) => {
                // Out of fds and the like: keep the connections we have.
                warn!(error = %e, "peer accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Why a connection ended, other than the peer closing between frames.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("reading from the peer failed")]
    Read(#[from] ReadError),
    #[error("no Hello within {0:?}")]
    HelloTimeout(std::time::Duration),
    #[error(
        "frame of {len} bytes not complete within {after:?} of its header ({received} bytes received); closing"
    )]
    FrameTimeout { len: usize, received: usize, after: Duration },
    #[error(
        "frame of {len} bytes found no room in the connection's budget within {after:?} of its header \
         (are its replies read?); closing"
    )]
    HandOffTimeout { len: usize, after: Duration },
    #[error("writing to the peer failed")]
    Write(#[from] std::io::Error),
}

async fn refuse(
    wr: &mut OwnedWriteHalf,
    shared: &Shared,
    code: RefuseCode,
    message: String,
) -> std::io::Result<()> {
    shared.stats.count_refused(code);
    warn!(?code, reason = %message, "peer connection refused");
    let msg = Message::Refused(Refused { code, message });
    let bytes =
        crate::proto::peer::encode_to_bytes(0, FrameFlags::NONE, &msg).expect("a refusal fits a frame");
    wr.write_all(&bytes).await?;
    wr.shutdown().await
}

async fn connection(sock: TcpStream, addr: SocketAddr, permit: OwnedSemaphorePermit, shared: Arc<Shared>) {
    if let Err(e) = serve(sock, addr, permit, &shared).await {
        // A bad frame and a frame timeout were logged where they were answered.
        match e {
            ConnError::Read(ReadError::Decode(_) | ReadError::Truncated(_))
            | ConnError::FrameTimeout { .. }
            | ConnError::HandOffTimeout { .. } => {}
            ConnError::HelloTimeout(_) => warn!(error = %e, "peer connection closed"),
            _ => debug!(error = %super::error_chain(&e), "peer connection ended"),
        }
    }
}

async fn serve(
    sock: TcpStream,
    addr: SocketAddr,
    permit: OwnedSemaphorePermit,
    shared: &Arc<Shared>,
) -> Result<(), ConnError> {
    let _ = sock.set_nodelay(true);
    let (mut rd, mut wr) = sock.into_split();
    let dec = wire::decoder(shared.cfg.max_frame);
    let mut buf = BytesMut::new();
    let ours = ProtocolVersion::CURRENT;
    // Until a Hello checks out, nothing bigger than a handshake is buffered.
    let small = wire::decoder(wire::HANDSHAKE_FRAME);
    let hello = tokio::select! {
        _ = shared.cancel.cancelled() => return Ok(()),
        r = tokio::time::timeout(shared.cfg.hello_timeout, wire::read_frame(&mut rd, &mut buf, &small)) => r,
    };
    let hello = match hello {
        Err(_) => {
            shared.stats.hello_timeouts.fetch_add(1, Ordering::Relaxed);
            return Err(ConnError::HelloTimeout(shared.cfg.hello_timeout));
        }
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(ReadError::Decode(DecodeError::VersionMismatch { theirs, .. }))) => {
            let why = format!(
                "peer protocol version mismatch: this node speaks version {ours}, the connecting node sent \
                 version {theirs}; run Basalt releases that share a protocol version on every node"
            );
            refuse(&mut wr, shared, RefuseCode::VersionMismatch, why).await?;
            return Ok(());
        }
        Ok(Err(ReadError::Decode(e))) => {
            shared.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            let why = format!("the first frame did not decode: {}", super::error_chain(&e));
            refuse(&mut wr, shared, RefuseCode::Malformed, why).await?;
            return Err(ReadError::Decode(e).into());
        }
        Ok(Err(e)) => return Err(e.into()),
        Ok(Ok(Some(Frame { message: Message::Hello(h), .. }))) => h,
        Ok(Ok(Some(f))) => {
            let why = format!("expected Hello as the first frame, got {:?}", f.message.kind());
            refuse(&mut wr, shared, RefuseCode::ExpectedHello, why).await?;
            return Ok(());
        }
    };
    if !shared.cfg.cluster.accepts(hello.cluster) {
        let why = format!(
            "wrong cluster: this node ({}) belongs to cluster {}, the connecting node {} to cluster {}; \
             is its data directory from another cluster?",
            shared.cfg.node,
            shared.cfg.cluster.get(),
            hello.node,
            hello.cluster
        );
        refuse(&mut wr, shared, RefuseCode::WrongCluster, why).await?;
        return Ok(());
    }
    tracing::Span::current().record("node", tracing::field::display(hello.node));
    let ack =
        Message::HelloAck(Hello { version: ours, cluster: shared.cfg.cluster.get(), node: shared.cfg.node });
    wr.write_all(&crate::proto::peer::encode_to_bytes(0, FrameFlags::NONE, &ack).expect("fits")).await?;
    drop(permit);
    debug!("peer connected");

    let peer = PeerInfo { node: hello.node, addr };
    let (tx, rx) = wire::channel(0);
    let dead = shared.cancel.child_token();
    shared.tracker.spawn(wire::writer(wr, rx, dead.clone()).in_current_span());
    let budget = ByteBudget::new(shared.cfg.connection_budget, shared.stats.held.clone());
    let r = read_loop(&mut rd, buf, &dec, peer, &tx, &budget, &dead, shared).await;
    let bad = match &r {
        Err(ConnError::Read(ReadError::Decode(e))) => {
            Some((e.request_id().unwrap_or(0), super::error_chain(e)))
        }
        Err(ConnError::Read(e @ ReadError::Truncated(_))) => Some((0, e.to_string())),
        Err(e @ (ConnError::FrameTimeout { .. } | ConnError::HandOffTimeout { .. })) => {
            shared.stats.frame_timeouts.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, "peer frame stalled; answering with an error and closing");
            let m = Message::error(ErrorCode::Malformed, e.to_string());
            if let Ok(f) = Outgoing::encode(0, FrameFlags::NONE, &m, None) {
                let _ = tx.send(WriterCmd::Frame(f));
            }
            None
        }
        _ => None,
    };
    if let Some((id, why)) = bad {
        shared.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
        warn!(request = id, error = %why, "bad frame from peer; answering with an error and closing");
        let m = Message::error(ErrorCode::Malformed, why);
        let f = Outgoing::encode(id, FrameFlags::NONE, &m, None).expect("an error fits a frame");
        let _ = tx.send(WriterCmd::Frame(f));
    }
    let _ = tx.send(WriterCmd::Close);
    r
}

#[allow(clippy::too_many_arguments)]
async fn read_loop(
    rd: &mut OwnedReadHalf,
    mut buf: BytesMut,
    dec: &Decoder,
    peer: PeerInfo,
    tx: &WriterTx,
    budget: &ByteBudget,
    dead: &CancellationToken,
    shared: &Arc<Shared>,
) -> Result<(), ConnError> {
    loop {
        let Some((frame, assembling)) = read_assembled(rd, &mut buf, dec, dead, shared).await? else {
            return Ok(());
        };
        let one_way = frame.flags.one_way();
        let id = frame.request_id;
        if id == 0 && !one_way {
            // Id 0 is for connection-level errors; a reply to it would be misread.
            let e = "request id 0 is reserved";
            warn!(kind = ?frame.message.kind(), "{e}; closing");
            shared.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            let f = Outgoing::encode(0, FrameFlags::NONE, &Message::error(ErrorCode::Malformed, e), None);
            if let Ok(f) = f {
                let _ = tx.send(WriterCmd::Frame(f));
            }
            return Ok(());
        }
        let kind = frame.message.kind();
        let cost = wire::receive_cost(frame_len(&frame.message)).saturating_add(frame.message.reply_hint());
        // Backpressure: wait for room before reading further. A large frame
        // holds assembly room meanwhile, so its deadline still runs: a peer
        // that never reads its replies must not keep that room forever.
        let deadline = assembling.as_ref().and_then(|a| a.deadline);
        let timer = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let held = tokio::select! {
            _ = dead.cancelled() => return Ok(()),
            h = budget.take(cost) => h,
            _ = timer => {
                let (len, after) = (frame_len(&frame.message), shared.cfg.frame_timeout);
                return Err(ConnError::HandOffTimeout { len, after });
            }
        };
        // Handed on: the connection's budget counts the frame now.
        drop(assembling);
        if kind.is_reply() || matches!(frame.message, Message::Hello(_)) {
            warn!(?kind, request = id, "peer sent a reply or a second Hello as a request");
            if !one_way {
                let why = format!("{kind:?} is not a request");
                reply(tx, id, Message::error(ErrorCode::Unexpected, why), held);
            }
            continue;
        }
        if one_way {
            shared.stats.one_way.fetch_add(1, Ordering::Relaxed);
            if matches!(frame.message, Message::Ping) {
                continue;
            }
        }
        if !one_way {
            shared.stats.requests.fetch_add(1, Ordering::Relaxed);
            if matches!(frame.message, Message::Ping) {
                reply(tx, id, Message::Pong, held);
                continue;
            }
        }
        if let Err(refusal) = shared.handler.admit(peer, &frame.message) {
            shared.stats.count_forbidden(&refusal);
            let close = !matches!(refusal, Refusal::NotMember { .. });
            warn!(?kind, request = id, one_way, reason = %refusal, close, "peer message refused");
            // Answered even when one-way: the sender broke a rule, not the network.
            reply(tx, id, Message::error(ErrorCode::Forbidden, refusal.to_string()), held);
            if close {
                return Ok(());
            }
            continue;
        }
        if one_way {
            shared.handler.one_way(peer, frame.message);
            continue;
        }
        // A replica request is not instrumented with the connection's span:
        // entering a span on every poll of every request cost a replica 3%
        // of its CPU per write (EnvFilter's scope tracking). The replica
        // service names the peer's node and address in its own log lines;
        // every other request keeps the span.
        let span = match super::client::RequestClass::of(&frame.message) {
            super::client::RequestClass::Extent => tracing::Span::none(),
            _ => tracing::Span::current(),
        };
        let fut = shared.handler.request(peer, frame.message);
        let tx = tx.clone();
        let budget = budget.clone();
        let abort = shared.abort.clone();
        let stats = shared.stats.clone();
        tx.busy().fetch_add(1, Ordering::Relaxed);
        let task = async move {
            let answer = tokio::select! {
                a = fut => a,
                _ = abort.cancelled() => {
                    stats.handlers_aborted.fetch_add(1, Ordering::Relaxed);
                    debug!(request = id, "request handler dropped at shutdown");
                    tx.busy().fetch_sub(1, Ordering::Relaxed);
                    return;
                }
            };
            tx.busy().fetch_sub(1, Ordering::Relaxed);
            let mut held = held;
            // A reply bigger than was reserved takes the difference
            // without waiting (it must not wait behind new requests).
            let need = wire::receive_cost(frame_len(&answer));
            if need > held.bytes() {
                held.merge(budget.force(need - held.bytes()));
            }
            reply(&tx, id, answer, held);
        };
        shared.tracker.spawn(task.instrument(span));
    }
}

fn reply(tx: &WriterTx, id: u64, message: Message, held: Held) {
    let f = match Outgoing::encode(id, FrameFlags::NONE, &message, Some(Arc::new(held))) {
        Ok(f) => f,
        Err(e) => {
            warn!(error = %e, request = id, "reply does not fit a frame");
            let m = Message::error(ErrorCode::Internal, e.to_string());
            Outgoing::encode(id, FrameFlags::NONE, &m, None).expect("an error fits a frame")
        }
    };
    // The writer is gone only when the connection is: the reply has no one to go to.
    let _ = tx.send(WriterCmd::Frame(f));
}

/// Room a large frame holds in the assembly budget until it is handed on,
/// and when it must have been.
struct Assembling {
    _room: Held,
    /// `None` only for a timeout too large to add to now: no deadline.
    deadline: Option<tokio::time::Instant>,
}

/// The next frame off `rd`, like `wire::read_frame`, with the room it took
/// in the assembly budget (none for a small frame); `Ok(None)` when the
/// peer closed cleanly between frames or the connection is dying. A large
/// frame takes its whole declared length before its payload is read and
/// must then complete within `frame_timeout`. Reads ask for at most the
/// rest of the frame or a read chunk, whichever is more, so bytes beyond
/// what is counted stay under a read chunk.
async fn read_assembled(
    rd: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    dec: &Decoder,
    dead: &CancellationToken,
    shared: &Shared,
) -> Result<Option<(Frame, Option<Assembling>)>, ConnError> {
    let mut room: Option<Assembling> = None;
    loop {
        if let Some(f) = dec.decode(buf).map_err(ReadError::from)? {
            return Ok(Some((f, room)));
        }
        // No frame yet, and no error: a header in `buf` has checked out
        // (its length is within the cap).
        let total = dec.frame_len(buf);
        if let Some(len) = total
            && len > SMALL_FRAME
            && room.is_none()
        {
            // Backpressure: until there is room, this socket is not read.
            let held = tokio::select! {
                _ = dead.cancelled() => return Ok(None),
                h = shared.assembly.take(len) => h,
            };
            let deadline = tokio::time::Instant::now().checked_add(shared.cfg.frame_timeout);
            room = Some(Assembling { _room: held, deadline });
        }
        let deadline = room.as_ref().and_then(|a| a.deadline);
        let rest = total.map_or(0, |t| t.saturating_sub(buf.len()));
        let ask = rest.max(wire::READ_CHUNK);
        buf.reserve(ask);
        let timer = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let mut limited = (&mut *buf).limit(ask);
        let read = tokio::select! {
            _ = dead.cancelled() => return Ok(None),
            _ = timer => None,
            r = rd.read_buf(&mut limited) => Some(r),
        };
        let Some(read) = read else {
            let after = shared.cfg.frame_timeout;
            return Err(ConnError::FrameTimeout { len: total.unwrap_or(0), received: buf.len(), after });
        };
        if read.map_err(ReadError::from)? == 0 {
            return if buf.is_empty() { Ok(None) } else { Err(ReadError::Truncated(buf.len()).into()) };
        }
    }
}
