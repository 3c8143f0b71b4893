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
//! replies stalls itself, not the node. Worst case per connection: the
//! budget, one frame being assembled (at most the frame cap) and a read
//! chunk.
//!
//! Hostile input: a frame that does not decode is answered with an `Error`
//! (with its request id when the header was intact, else id 0), logged, and
//! the connection closed; other connections are not affected.

use super::budget::{ByteBudget, Gauge, Held};
use super::wire::{self, Outgoing, ReadError, WriterCmd, WriterTx};
use super::{PeerInfo, ServerConfig};
use crate::proto::peer::{
    DecodeError, ErrorCode, Frame, FrameFlags, Hello, Message, ProtocolVersion, RefuseCode, Refused,
    frame_len,
};
use bytes::BytesMut;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
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
}

/// Counters of a server, over all its connections.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub bad_frames: AtomicU64,
    pub requests: AtomicU64,
    pub one_way: AtomicU64,
    /// Bytes held by requests in flight over every connection, now and at most.
    pub held: Arc<Gauge>,
}

struct Shared {
    cfg: ServerConfig,
    handler: Arc<dyn PeerHandler>,
    stats: Arc<ServerStats>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// A running peer server. Dropping it stops accepting and closes every
/// connection (requests already running finish; their replies are dropped).
#[derive(Debug)]
pub struct PeerServer {
    addr: SocketAddr,
    stats: Arc<ServerStats>,
    cancel: CancellationToken,
    tracker: TaskTracker,
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
        let tracker = TaskTracker::new();
        let shared = Arc::new(Shared {
            cfg,
            handler,
            stats: stats.clone(),
            cancel: cancel.clone(),
            tracker: tracker.clone(),
        });
        info!(%addr, cluster = %shared.cfg.cluster.get(), node = %shared.cfg.node, "peer server listening");
        tracker.spawn(accept_loop(listener, shared));
        Ok(PeerServer { addr, stats, cancel, tracker })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Stops accepting, closes every connection, and waits for every task
    /// (handlers of requests in flight included) to finish.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
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
                let span = tracing::info_span!("peer_conn", peer = %addr, node = tracing::field::Empty);
                shared.tracker.spawn(connection(sock, addr, shared.clone()).instrument(span));
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
    #[error("writing to the peer failed")]
    Write(#[from] std::io::Error),
}

async fn refuse(
    wr: &mut OwnedWriteHalf,
    shared: &Shared,
    code: RefuseCode,
    message: String,
) -> std::io::Result<()> {
    shared.stats.refused.fetch_add(1, Ordering::Relaxed);
    warn!(?code, reason = %message, "peer connection refused");
    let msg = Message::Refused(Refused { code, message });
    let bytes =
        crate::proto::peer::encode_to_bytes(0, FrameFlags::NONE, &msg).expect("a refusal fits a frame");
    wr.write_all(&bytes).await?;
    wr.shutdown().await
}

async fn connection(sock: TcpStream, addr: SocketAddr, shared: Arc<Shared>) {
    if let Err(e) = serve(sock, addr, &shared).await {
        // A bad frame was logged where it was answered.
        match e {
            ConnError::Read(ReadError::Decode(_) | ReadError::Truncated(_)) => {}
            ConnError::HelloTimeout(_) => warn!(error = %e, "peer connection closed"),
            _ => debug!(error = %super::error_chain(&e), "peer connection ended"),
        }
    }
}

async fn serve(sock: TcpStream, addr: SocketAddr, shared: &Arc<Shared>) -> Result<(), ConnError> {
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
        Err(_) => return Err(ConnError::HelloTimeout(shared.cfg.hello_timeout)),
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
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    mut buf: BytesMut,
    dec: &crate::proto::peer::Decoder,
    peer: PeerInfo,
    tx: &WriterTx,
    budget: &ByteBudget,
    dead: &CancellationToken,
    shared: &Arc<Shared>,
) -> Result<(), ConnError> {
    loop {
        let frame = tokio::select! {
            _ = dead.cancelled() => return Ok(()),
            r = wire::read_frame(rd, &mut buf, dec) => r?,
        };
        let Some(frame) = frame else { return Ok(()) };
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
        let cost = wire::receive_cost(frame_len(&frame.message)) + frame.message.reply_hint();
        // Backpressure: wait for room before reading further.
        let held = tokio::select! {
            _ = dead.cancelled() => return Ok(()),
            h = budget.take(cost) => h,
        };
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
            shared.handler.one_way(peer, frame.message);
            continue;
        }
        shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        if matches!(frame.message, Message::Ping) {
            reply(tx, id, Message::Pong, held);
            continue;
        }
        let fut = shared.handler.request(peer, frame.message);
        let tx = tx.clone();
        let budget = budget.clone();
        tx.busy().fetch_add(1, Ordering::Relaxed);
        shared.tracker.spawn(
            async move {
                let answer = fut.await;
                tx.busy().fetch_sub(1, Ordering::Relaxed);
                let mut held = held;
                // A reply bigger than was reserved takes the difference
                // without waiting (it must not wait behind new requests).
                let need = wire::receive_cost(frame_len(&answer));
                if need > held.bytes() {
                    held.merge(budget.force(need - held.bytes()));
                }
                reply(&tx, id, answer, held);
            }
            .in_current_span(),
        );
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
