//! The connecting side of the peer protocol.
//!
//! A [`PeerClient`] is one peer: a few connection slots, each connected on
//! first use (and again after the connection is lost), a byte budget, and
//! counters. A request takes room in the budget for its frame and the reply
//! it expects (waiting when there is none: backpressure) and keeps it until
//! both the frame is written and the reply is in, picks a slot
//! round-robin, registers a request id in that connection's in-flight map,
//! queues its frame for the connection's writer task and awaits the reply,
//! which the connection's reader task hands over by id.
//!
//! Cancel safety: a request future may be dropped at any await (its caller
//! gave up, or its timeout fired). Its entry leaves the in-flight map when
//! it is dropped, so a reply that arrives later is counted and discarded;
//! its room in the budget comes back at once, or, if its frame is still
//! queued, once the frame is written (or its connection is gone).

use super::budget::{ByteBudget, Gauge};
use super::wire::{self, OVERHEAD, Outgoing, ReadError, WriterCmd, WriterTx};
use super::{ClientConfig, PeerError};
use crate::proto::peer::{
    DecodeError, EncodeError, Frame, FrameFlags, HEADER_LEN, Hello, Message, ProtocolVersion,
    encode_to_bytes, frame_len,
};
use crate::types::NodeId;
use bytes::BytesMut;
use prometheus_client::metrics::histogram::Histogram;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

/// Counters of a pool (over all its peers) or of a lone client.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub requests: AtomicU64,
    pub timeouts: AtomicU64,
    /// Replies that came after their request timed out or was dropped.
    pub late_replies: AtomicU64,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub connections_lost: AtomicU64,
    pub sent_one_way: AtomicU64,
    /// One-way messages dropped: no live connection to the peer.
    pub dropped_unreachable: AtomicU64,
    /// One-way messages dropped: the peer's budget was full.
    pub dropped_full: AtomicU64,
    /// One-way messages dropped by a sender that knew no address for the
    /// node (counted by the sender: the pool never saw them).
    pub dropped_no_address: AtomicU64,
    /// Bytes held by requests in flight, now and at most.
    pub held: Arc<Gauge>,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What a request is for: the `class` label of the per-peer latency
/// histograms (one histogram per peer and class, so a request observes
/// one without a label lookup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestClass {
    /// A replica request of the data path (`Extent*`).
    Extent,
    /// A volume request forwarded to its owner (`Volume*`).
    Volume,
    /// Everything else: pings, metadata and membership requests.
    Control,
}

impl RequestClass {
    pub const ALL: [RequestClass; 3] = [RequestClass::Extent, RequestClass::Volume, RequestClass::Control];

    pub fn of(m: &Message) -> RequestClass {
        match m {
            Message::ExtentWrite(_)
            | Message::ExtentRead(_)
            | Message::ExtentWriteZeroes(_)
            | Message::ExtentTrim(_)
            | Message::ExtentFlush(_)
            | Message::ExtentStatus(_)
            | Message::ExtentCrcs(_)
            | Message::ExtentMap(_)
            | Message::ExtentsDirty(_) => RequestClass::Extent,
            Message::VolumeRead(_)
            | Message::VolumeWrite(_)
            | Message::VolumeWriteZeroes(_)
            | Message::VolumeTrim(_)
            | Message::VolumeFlush(_)
            | Message::VolumeBlockStatus(_)
            | Message::VolumeCompareAndWrite(_) => RequestClass::Volume,
            _ => RequestClass::Control,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            RequestClass::Extent => "extent",
            RequestClass::Volume => "volume",
            RequestClass::Control => "control",
        }
    }
}

/// Why a one-way message was dropped (it is also counted).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("no live connection to the peer (connecting in the background)")]
    Unreachable,
    #[error("the peer's byte budget is full")]
    Full,
    #[error("message cannot be sent")]
    Encode(#[from] EncodeError),
}

type ReplyTx = oneshot::Sender<Result<Message, PeerError>>;

#[derive(Default)]
struct InflightMap {
    map: HashMap<u64, ReplyTx, crate::types::IdHash>,
    /// Set when the connection is gone; nothing registers after that.
    closed: bool,
}

/// One live connection.
struct Conn {
    tx: WriterTx,
    inflight: Mutex<InflightMap>,
    next_id: AtomicU64,
    dead: CancellationToken,
}

impl Conn {
    fn alive(&self) -> bool {
        !self.dead.is_cancelled()
    }

    fn register(
        &self,
        addr: SocketAddr,
    ) -> Result<(u64, oneshot::Receiver<Result<Message, PeerError>>), PeerError> {
        let (tx, rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut m = self.inflight.lock().unwrap();
        if m.closed {
            return Err(PeerError::ConnectionLost { addr });
        }
        m.map.insert(id, tx);
        self.tx.busy().fetch_add(1, Ordering::Relaxed);
        Ok((id, rx))
    }

    fn in_flight(&self) -> usize {
        self.inflight.lock().unwrap().map.len()
    }
}

/// Removes a request's entry when its future ends, however it ends.
struct Registered<'a> {
    conn: &'a Conn,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.conn.inflight.lock().unwrap().map.remove(&self.id);
        self.conn.tx.busy().fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Slot {
    conn: Option<Arc<Conn>>,
    failed_at: Option<Instant>,
}

struct Inner {
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
    slots: Vec<tokio::sync::Mutex<Slot>>,
    next_slot: AtomicUsize,
    budget: ByteBudget,
    stats: Arc<ClientStats>,
    connecting: AtomicBool,
    remote: Mutex<Option<NodeId>>,
    /// Request latency (seconds) by [`RequestClass`], for metrics.
    latency: [Histogram; 3],
    /// Cancelled when the last handle goes: every connection closes.
    closed: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

/// One peer (cheap to clone: clones share connections, budget and counters).
#[derive(Clone)]
pub struct PeerClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient").field("addr", &self.inner.addr).finish_non_exhaustive()
    }
}

impl PeerClient {
    /// A client of the peer at `addr`; nothing connects until it is used.
    pub fn new(addr: SocketAddr, cfg: ClientConfig) -> PeerClient {
        PeerClient::with_stats(addr, Arc::new(cfg), Arc::new(ClientStats::default()))
    }

    fn with_stats(addr: SocketAddr, cfg: Arc<ClientConfig>, stats: Arc<ClientStats>) -> PeerClient {
        let slots = (0..cfg.connections.max(1)).map(|_| tokio::sync::Mutex::new(Slot::default())).collect();
        let budget = ByteBudget::new(cfg.peer_budget, stats.held.clone());
        PeerClient {
            inner: Arc::new(Inner {
                addr,
                cfg,
                slots,
                next_slot: AtomicUsize::new(0),
                budget,
                stats,
                connecting: AtomicBool::new(false),
                remote: Mutex::new(None),
                latency: RequestClass::ALL.map(|_| crate::admin::metrics::latency_histogram()),
                closed: CancellationToken::new(),
            }),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    pub fn stats(&self) -> &ClientStats {
        &self.inner.stats
    }

    /// Latency of this peer's requests of `class` that ended (answered,
    /// failed or timed out; a request its caller dropped is not observed).
    pub fn latency(&self, class: RequestClass) -> &Histogram {
        &self.inner.latency[class as usize]
    }

    /// The node id the peer gave in its last `HelloAck`.
    pub fn remote_node(&self) -> Option<NodeId> {
        *self.inner.remote.lock().unwrap()
    }

    /// Requests registered and not yet answered, over live connections.
    pub fn in_flight(&self) -> usize {
        self.inner
            .slots
            .iter()
            .filter_map(|s| s.try_lock().ok().and_then(|s| s.conn.as_ref().map(|c| c.in_flight())))
            .sum()
    }

    /// Bytes of this peer's budget free now.
    pub fn budget_available(&self) -> usize {
        self.inner.budget.available()
    }

    /// Live connections now.
    pub fn connections(&self) -> usize {
        self.inner
            .slots
            .iter()
            .filter(|s| s.try_lock().is_ok_and(|s| s.conn.as_ref().is_some_and(|c| c.alive())))
            .count()
    }

    /// Sends `request` and waits for its reply, at most the configured
    /// request timeout. An `Error` reply becomes [`PeerError::Remote`];
    /// every other reply (an `ExtentErr` included) is the caller's to read.
    pub async fn request(&self, request: Message) -> Result<Message, PeerError> {
        self.request_timeout(request, self.inner.cfg.request_timeout).await
    }

    /// [`Self::request`] with its own timeout.
    pub async fn request_timeout(&self, request: Message, after: Duration) -> Result<Message, PeerError> {
        bump(&self.inner.stats.requests);
        let (class, start) = (RequestClass::of(&request), Instant::now());
        let r = match tokio::time::timeout(after, self.exchange(request)).await {
            Ok(r) => r,
            Err(_) => {
                bump(&self.inner.stats.timeouts);
                Err(PeerError::Timeout { addr: self.inner.addr, after })
            }
        };
        self.inner.latency[class as usize].observe(start.elapsed().as_secs_f64());
        r
    }

    async fn exchange(&self, request: Message) -> Result<Message, PeerError> {
        let addr = self.inner.addr;
        let len = frame_len(&request);
        if len > self.inner.cfg.max_frame {
            let max = self.inner.cfg.max_frame;
            return Err(EncodeError::TooLarge { kind: request.kind(), len: len as u64, max }.into());
        }
        let send_cost = len + OVERHEAD;
        let hint = request.reply_hint();
        // A read reply: its data, a crc per 512 bytes at most, its fields.
        let reply_cost =
            if hint > 0 { wire::receive_cost(HEADER_LEN + 16 + hint + hint / 128) } else { OVERHEAD };
        // Held until the frame is written and the reply is in (or the
        // request is dropped), whichever is later.
        let held = Arc::new(self.inner.budget.take(send_cost + reply_cost).await);
        let conn = self.conn().await?;
        let (id, rx) = conn.register(addr)?;
        let _registered = Registered { conn: &conn, id };
        let out = Outgoing::encode(id, FrameFlags::NONE, &request, Some(held.clone()))?;
        drop(request);
        conn.tx.send(WriterCmd::Frame(out)).map_err(|_| PeerError::ConnectionLost { addr })?;
        let reply = rx.await.map_err(|_| PeerError::ConnectionLost { addr })??;
        drop(held);
        match reply {
            Message::Error(e) => Err(PeerError::Remote { addr, code: e.code, message: e.message }),
            m => Ok(m),
        }
    }

    /// Queues a one-way message (a Raft message): no reply, no waiting. When
    /// there is no live connection (one is started in the background) or
    /// the budget is full, the message is dropped and counted.
    pub fn send(&self, message: Message) -> Result<(), SendError> {
        let stats = &self.inner.stats;
        let len = frame_len(&message);
        if len > self.inner.cfg.max_frame {
            let max = self.inner.cfg.max_frame;
            return Err(EncodeError::TooLarge { kind: message.kind(), len: len as u64, max }.into());
        }
        let Some(held) = self.inner.budget.try_take(len + OVERHEAD) else {
            bump(&stats.dropped_full);
            return Err(SendError::Full);
        };
        let n = self.inner.slots.len();
        let start = self.inner.next_slot.fetch_add(1, Ordering::Relaxed);
        for k in 0..n {
            let Ok(slot) = self.inner.slots[(start + k) % n].try_lock() else { continue };
            let Some(conn) = slot.conn.as_ref().filter(|c| c.alive()) else { continue };
            let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
            let out = Outgoing::encode(id, FrameFlags::ONE_WAY, &message, Some(Arc::new(held)))?;
            if conn.tx.send(WriterCmd::Frame(out)).is_ok() {
                bump(&stats.sent_one_way);
                return Ok(());
            }
            break;
        }
        bump(&stats.dropped_unreachable);
        self.connect_in_background();
        Err(SendError::Unreachable)
    }

    fn connect_in_background(&self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        if self.inner.connecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        rt.spawn(async move {
            let _ = me.conn().await;
            me.inner.connecting.store(false, Ordering::Release);
        });
    }

    /// A live connection of the next slot, connecting it if needed.
    async fn conn(&self) -> Result<Arc<Conn>, PeerError> {
        let n = self.inner.slots.len();
        let i = self.inner.next_slot.fetch_add(1, Ordering::Relaxed) % n;
        let mut slot = self.inner.slots[i].lock().await;
        if let Some(c) = slot.conn.as_ref().filter(|c| c.alive()) {
            return Ok(c.clone());
        }
        if slot.failed_at.is_some_and(|t| t.elapsed() < self.inner.cfg.reconnect_backoff) {
            // Another slot may still be connected.
            let live =
                self.inner.slots.iter().find_map(|s| {
                    s.try_lock().ok().and_then(|s| s.conn.as_ref().filter(|c| c.alive()).cloned())
                });
            if let Some(c) = live {
                return Ok(c);
            }
            return Err(PeerError::Backoff { addr: self.inner.addr });
        }
        slot.conn = None;
        match self.connect().await {
            Ok(c) => {
                slot.failed_at = None;
                slot.conn = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                bump(&self.inner.stats.connect_failures);
                slot.failed_at = Some(Instant::now());
                Err(e)
            }
        }
    }

    async fn connect(&self) -> Result<Arc<Conn>, PeerError> {
        let addr = self.inner.addr;
        let cfg = &self.inner.cfg;
        let after = cfg.connect_timeout;
        let (rd, wr, buf, remote) = tokio::time::timeout(after, handshake(addr, cfg))
            .await
            .map_err(|_| PeerError::HandshakeTimeout { addr, after })??;
        bump(&self.inner.stats.connects);
        *self.inner.remote.lock().unwrap() = Some(remote);
        let (tx, rx) = wire::channel(1);
        let conn = Arc::new(Conn {
            tx,
            inflight: Mutex::new(InflightMap::default()),
            next_id: AtomicU64::new(1),
            dead: self.inner.closed.child_token(),
        });
        let span = tracing::info_span!("peer_client", peer = %addr, node = %remote);
        info!(parent: &span, "connected to peer");
        tokio::spawn(wire::writer(wr, rx, conn.dead.clone()).instrument(span.clone()));
        let dec = wire::decoder(cfg.max_frame);
        tokio::spawn(reader(rd, buf, dec, conn.clone(), addr, self.inner.stats.clone()).instrument(span));
        Ok(conn)
    }
}

/// Connects and exchanges `Hello` / `HelloAck`.
async fn handshake(
    addr: SocketAddr,
    cfg: &ClientConfig,
) -> Result<(OwnedReadHalf, tokio::net::tcp::OwnedWriteHalf, BytesMut, NodeId), PeerError> {
    let io = |source| PeerError::Connect { addr, source };
    let sock = TcpStream::connect(addr).await.map_err(io)?;
    let _ = sock.set_nodelay(true);
    let (mut rd, mut wr) = sock.into_split();
    let hello = Message::Hello(Hello {
        version: ProtocolVersion::CURRENT,
        cluster: cfg.cluster.get(),
        node: cfg.node,
    });
    wr.write_all(&encode_to_bytes(0, FrameFlags::NONE, &hello)?).await.map_err(io)?;
    let dec = wire::decoder(wire::HANDSHAKE_FRAME);
    let mut buf = BytesMut::new();
    let broke = |detail: String| PeerError::Handshake { addr, detail };
    match wire::read_frame(&mut rd, &mut buf, &dec).await {
        Ok(Some(Frame { message: Message::HelloAck(h), .. })) => {
            if !cfg.cluster.accepts(h.cluster) {
                return Err(broke(format!(
                    "peer is in cluster {}, this node in {}",
                    h.cluster,
                    cfg.cluster.get()
                )));
            }
            Ok((rd, wr, buf, h.node))
        }
        Ok(Some(Frame { message: Message::Refused(r), .. })) => {
            warn!(peer = %addr, code = ?r.code, reason = %r.message, "peer refused our connection");
            Err(PeerError::Refused { addr, code: r.code, message: r.message })
        }
        Ok(Some(f)) => Err(broke(format!("answered Hello with {:?}", f.message.kind()))),
        Ok(None) => Err(broke("closed the connection after Hello".into())),
        Err(ReadError::Decode(DecodeError::VersionMismatch { ours, theirs })) => {
            Err(broke(format!("answered in peer protocol version {theirs}; this node speaks version {ours}")))
        }
        Err(ReadError::Decode(source)) => Err(PeerError::BadFrame { addr, source }),
        Err(ReadError::Io(source)) => Err(PeerError::Connect { addr, source }),
        Err(e @ ReadError::Truncated(_)) => Err(broke(e.to_string())),
    }
}

/// Hands each reply to its waiting request until the connection ends, then
/// fails every request still waiting.
async fn reader(
    mut rd: OwnedReadHalf,
    mut buf: BytesMut,
    dec: crate::proto::peer::Decoder,
    conn: Arc<Conn>,
    addr: SocketAddr,
    stats: Arc<ClientStats>,
) {
    let end: Result<(), ReadError> = loop {
        let frame = tokio::select! {
            _ = conn.dead.cancelled() => break Ok(()),
            r = wire::read_frame(&mut rd, &mut buf, &dec) => r,
        };
        match frame {
            Ok(Some(f)) if f.request_id == 0 => {
                // About the connection, and the peer closes it after this.
                match f.message {
                    Message::Error(e) => {
                        warn!(code = ?e.code, message = %e.message, "peer closed the connection with an error")
                    }
                    m => warn!(kind = ?m.kind(), "peer sent a frame with request id 0"),
                }
                break Ok(());
            }
            Ok(Some(f)) => {
                let waiter = conn.inflight.lock().unwrap().map.remove(&f.request_id);
                match waiter {
                    Some(w) => {
                        let _ = w.send(Ok(f.message));
                    }
                    None => {
                        bump(&stats.late_replies);
                        debug!(
                            request = f.request_id,
                            "reply to no request in flight (timed out or dropped); discarded"
                        );
                    }
                }
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    conn.dead.cancel();
    let waiting = {
        let mut m = conn.inflight.lock().unwrap();
        m.closed = true;
        std::mem::take(&mut m.map)
    };
    if let Err(e) = &end {
        warn!(error = %super::error_chain(e), waiting = waiting.len(), "peer connection failed");
    } else {
        debug!(waiting = waiting.len(), "peer connection closed");
    }
    bump(&stats.connections_lost);
    for (_, w) in waiting {
        let _ = w.send(Err(PeerError::ConnectionLost { addr }));
    }
}

/// Clients of every peer, by address, sharing one configuration and one set
/// of counters.
#[derive(Debug)]
pub struct PeerPool {
    cfg: Arc<ClientConfig>,
    stats: Arc<ClientStats>,
    peers: Mutex<HashMap<SocketAddr, PeerClient>>,
}

impl PeerPool {
    pub fn new(cfg: ClientConfig) -> PeerPool {
        PeerPool {
            cfg: Arc::new(cfg),
            stats: Arc::new(ClientStats::default()),
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// The client of the peer at `addr` (created, unconnected, on first use).
    pub fn client(&self, addr: SocketAddr) -> PeerClient {
        self.peers
            .lock()
            .unwrap()
            .entry(addr)
            .or_insert_with(|| PeerClient::with_stats(addr, self.cfg.clone(), self.stats.clone()))
            .clone()
    }

    /// Forgets the peer at `addr`; its connections close when the last
    /// clone of its client is gone.
    pub fn remove(&self, addr: SocketAddr) {
        self.peers.lock().unwrap().remove(&addr);
    }

    pub async fn request(&self, addr: SocketAddr, request: Message) -> Result<Message, PeerError> {
        self.client(addr).request(request).await
    }

    pub fn send(&self, addr: SocketAddr, message: Message) -> Result<(), SendError> {
        self.client(addr).send(message)
    }

    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// The client of every peer known (for metrics).
    pub fn clients(&self) -> Vec<PeerClient> {
        self.peers.lock().unwrap().values().cloned().collect()
    }
}
