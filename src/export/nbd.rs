//! NBD server: one tokio task per connection running the sans-IO codec in
//! `proto::nbd` over a TCP socket or a unix socket (clients on the same
//! host: `nbd+unix:///NAME?socket=PATH`), and turning requests into
//! `Volume` calls. Both kinds of socket run the same handshake and
//! transmission code, generic over [`Stream`].
//!
//! Per connection, after the handshake, one task reads and frames requests,
//! validates them, and runs them as futures in a `FuturesUnordered`, so many
//! requests are in flight at once and complete in any order. Finished
//! replies (plus any others finished by then) are encoded into an outbox and
//! written by the same task with one non-blocking vectored write; what the
//! socket does not take waits for writability. Read payloads are the
//! volume's `Bytes`, referenced by the write, never copied. WRITE payloads
//! of `LARGE_WRITE` (64 KiB) and more are read from the socket straight into an
//! aligned buffer, which the store hands to the disk as it is; smaller ones
//! are sliced out of the read buffer and copied once, into the store's
//! block buffer. (Copying a 1 MiB payload into a freshly allocated block
//! buffer was a fifth of the worker's time at 1 MiB writes.) (An earlier
//! version fed a separate writer task through a channel; writing in place
//! saves a task wake-up per batch and measured faster at QD32.)
//!
//! Memory is bounded per connection by a semaphore of "cost units" (one per
//! request plus one per 4 KiB of payload): a request takes its units before
//! it runs and gives them back only once its reply is written. When the
//! budget is spent the connection stops reading the socket, which is the
//! backpressure. Worst case per connection: the budget, plus one frame
//! being assembled (at most the maximum payload), plus the read buffer.
//! Over all connections, the payload of every READ and WRITE also takes
//! room in the node's [`PayloadBudget`] (a large WRITE before its buffer is
//! allocated), so many clients together cannot exceed it either.
//! "Payload" includes the replies the server sizes: a BLOCK_STATUS is
//! charged to both budgets for the most its reply can take (the descriptor
//! cap, [`MAX_STATUS_DESCRIPTORS`]) and, once encoded, every reply keeps
//! only its own size until it is in the socket ([`Held::fit`]).
//!
//! Every connection to a volume shares one `Arc<Volume>`, whose `flush` is
//! a barrier over every write completed before it on any connection; that
//! is why `NBD_FLAG_CAN_MULTI_CONN` is advertised.
//!
//! Drain: when `cancel` fires the server stops accepting; each connection
//! stops reading new requests, answers the ones in flight, and closes.
//!
//! Export names: see `proto::nbd::handshake` (`""` is the only volume, or
//! the one called `demo`).

use super::readahead::{Hit, ReadAhead};
use crate::export::flood::{LineBudget, held_back};
use crate::node::volume::{MAX_PAYLOAD, MIN_BLOCK, PREFERRED_BLOCK};
use crate::node::{Node, PayloadBudget, Volume, VolumeError};
use crate::poll::LongOp;
use crate::proto::nbd::handshake::{self, Export, Negotiator, Next, Session};
use crate::proto::nbd::transmission::{
    Command, LargeWrite, MAX_STATUS_DESCRIPTORS, ProtoError, Reply, ReplyBuf, Request, RequestDecoder,
    StatusBuilder, encode_reply, error_reply, reply_len, validate,
};
use crate::proto::nbd::{BlockSizes, CMD_BLOCK_STATUS, CMD_FLAG_FUA, CMD_FLUSH, CMD_READ, CMD_WRITE, Errno};
use crate::storage::engine::AlignedBuf;
use crate::types::ReadChunk;
use bytes::{Buf, Bytes, BytesMut};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use std::future::Future;
use std::io::IoSlice;
use std::ops::Range;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

/// Per-connection in-flight budget, in cost units (see the module docs):
/// 64 MiB of payload, or 16 Ki small requests.
const BUDGET_UNITS: u32 = 16 << 10;
/// Payload bytes per cost unit.
const UNIT_BYTES: u64 = 4096;
/// Stop batching replies into one write past this many bytes.
const MAX_BATCH: usize = 4 << 20;
/// At most this many buffers per `writev` (well under IOV_MAX).
const MAX_IOV: usize = 128;
/// Socket reads ask for at least this much room.
const READ_CHUNK: usize = 256 << 10;
/// A client must finish option haggling within this time (a half-open
/// connection otherwise holds a task forever).
const HANDSHAKE_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);
/// A WRITE payload at least this big is read into aligned memory of its own.
const LARGE_WRITE: u32 = 64 << 10;
/// A BLOCK_STATUS asks the volume for the allocation map this many bytes at
/// a time, so the map it holds is small whatever the range (at most one
/// entry per 4 KiB block of the window, plus the two ends).
const STATUS_WINDOW: u64 = 16 << 20;
/// What a BLOCK_STATUS is charged before it runs: the largest reply twice
/// (the descriptors, then their encoding) and one window of the map. Once
/// encoded, the reply keeps only its own size ([`Held::fit`]).
const STATUS_CHARGE: u64 = 2 * 8 * MAX_STATUS_DESCRIPTORS as u64
    + (STATUS_WINDOW / 4096 + 2) * std::mem::size_of::<crate::types::MapExtent>() as u64;

/// A connected socket NBD runs over: split into a read half the request
/// loop awaits and a write half it writes replies to without waiting.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: WriteHalf;
    fn into_halves(self) -> (Self::Read, Self::Write);
    /// Socket options for request/reply traffic.
    fn tune(&self) {}
}

/// The write half of a [`Stream`]: non-blocking vectored writes, and a
/// wait for room in the socket.
trait WriteHalf: AsyncWrite + Unpin + Send + 'static {
    fn ready_to_write(&self) -> impl Future<Output = std::io::Result<()>> + Send;
    fn try_writev(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize>;
}

impl Stream for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
    fn tune(&self) {
        if let Err(e) = self.set_nodelay(true) {
            debug!(error = %e, "TCP_NODELAY");
        }
    }
}

impl WriteHalf for tokio::net::tcp::OwnedWriteHalf {
    fn ready_to_write(&self) -> impl Future<Output = std::io::Result<()>> + Send {
        self.writable()
    }
    fn try_writev(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        self.try_write_vectored(bufs)
    }
}

impl Stream for UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl WriteHalf for tokio::net::unix::OwnedWriteHalf {
    fn ready_to_write(&self) -> impl Future<Output = std::io::Result<()>> + Send {
        self.writable()
    }
    fn try_writev(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        self.try_write_vectored(bufs)
    }
}

/// A listening socket: TCP or unix.
trait Listener: Send {
    type Conn: Stream;
    /// The next connection and how to name its peer in logs.
    fn next(&self) -> impl Future<Output = std::io::Result<(Self::Conn, String)>> + Send;
}

impl Listener for TcpListener {
    type Conn = TcpStream;
    async fn next(&self) -> std::io::Result<(TcpStream, String)> {
        let (sock, peer) = self.accept().await?;
        Ok((sock, peer.to_string()))
    }
}

impl Listener for UnixListener {
    type Conn = UnixStream;
    async fn next(&self) -> std::io::Result<(UnixStream, String)> {
        let (sock, _) = self.accept().await?;
        // A unix client has no address worth logging; its process has.
        let peer = match sock.peer_cred() {
            Ok(c) => format!("unix:pid={},uid={}", c.pid().unwrap_or(0), c.uid()),
            Err(_) => "unix".to_string(),
        };
        Ok((sock, peer))
    }
}

/// Serves every volume of `node` on `listener` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) -> std::io::Result<()> {
    info!(addr = ?listener.local_addr().ok(), "NBD server listening");
    accept_loop(&listener, node, cancel, tracker).await;
    Ok(())
}

/// Why a unix socket for NBD could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UnixSocketError {
    #[error("{0} exists and is not a socket; not removing it (choose another path, or move the file)")]
    NotASocket(PathBuf),
    #[error("{0}: another server is listening on it")]
    InUse(PathBuf),
    #[error("{path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A unix socket NBD listens on, removed when the server stops.
#[derive(Debug)]
pub struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl UnixSocket {
    /// Binds `path` with permissions 0660 (the owner and its group may
    /// connect). A socket file nothing listens on (left by a crashed run)
    /// is removed first; any other file there is refused, never removed.
    pub fn bind(path: &Path) -> Result<UnixSocket, UnixSocketError> {
        let io = |what| move |source| UnixSocketError::Io { path: path.to_path_buf(), what, source };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                // Connecting tells a live server from a stale file.
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => return Err(UnixSocketError::InUse(path.to_path_buf())),
                    Err(_) => {
                        std::fs::remove_file(path).map_err(io("removing the stale socket"))?;
                        info!(path = %path.display(), "removed a stale NBD socket left by an earlier run");
                    }
                }
            }
            Ok(_) => return Err(UnixSocketError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("inspecting")(e)),
        }
        let listener = UnixListener::bind(path).map_err(io("binding"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
            .map_err(io("setting permissions 0660"))?;
        Ok(UnixSocket { listener, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Serves every volume of `node` on the unix socket until `cancel` fires,
/// then removes the socket file.
pub async fn serve_unix(
    socket: UnixSocket,
    node: Arc<Node>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) -> std::io::Result<()> {
    info!(path = %socket.path.display(), "NBD server listening on a unix socket");
    accept_loop(&socket.listener, node, cancel, tracker).await;
    drop(socket.listener);
    match std::fs::remove_file(&socket.path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(path = %socket.path.display(), error = %e, "NBD socket file not removed"),
    }
    Ok(())
}

async fn accept_loop<L: Listener>(
    listener: &L,
    node: Arc<Node>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.next() => r,
        };
        match accepted {
            Ok((sock, peer)) => {
                let span = tracing::info_span!("nbd", %peer, export = tracing::field::Empty);
                let conn = connection(sock, node.clone(), cancel.clone());
                tracker.spawn(conn.instrument(span));
            }
            Err(e) => {
                // Out of fds and the like: keep serving the connections we have.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    info!("NBD server stopped accepting");
}

/// Why a connection ended other than by the client's choice.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("socket error")]
    Io(#[from] std::io::Error),
    #[error("handshake refused")]
    Handshake(#[from] handshake::HandshakeError),
    #[error("bad request framing")]
    Proto(#[from] ProtoError),
    #[error("client closed the connection in the middle of a frame ({0} bytes of it received)")]
    Truncated(usize),
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("export {export:?} shrank below the {told} bytes the client was told during its handshake")]
    ShrankInHandshake { export: String, told: u64 },
}

/// How a connection ended normally.
#[derive(Debug)]
enum Closed {
    /// NBD_OPT_ABORT or NBD_CMD_DISC.
    ByClient,
    /// The client closed the socket between frames.
    Eof,
    /// Server shutdown.
    Drained,
}

async fn connection<S: Stream>(sock: S, node: Arc<Node>, cancel: CancellationToken) {
    let _open = node.open_connection(crate::node::Frontend::Nbd);
    sock.tune();
    let lines = Arc::new(LineBudget::default());
    let ended = run(sock, &node, &cancel, &lines).await;
    let held = lines.take_suppressed();
    if held > 0 {
        info!(suppressed = held, "error lines held back by this connection's flood guard");
    }
    match ended {
        Ok(how) => debug!(?how, "connection closed"),
        Err(e) => {
            // The one log line for a connection that went wrong.
            let cause = std::error::Error::source(&e).map(|s| s.to_string());
            warn!(error = %e, cause, "connection closed");
        }
    }
}

fn exports(node: &Node) -> Vec<Export> {
    node.volumes()
        .iter()
        .map(|v| Export {
            name: v.name().to_string(),
            description: format!(
                "Basalt volume {} ({} bytes{})",
                v.name(),
                v.nbd_size(),
                if v.read_only() { ", read-only" } else { "" }
            ),
            // NBD cannot tell a connected client of a new size: a client
            // sees the size of its handshake for the whole connection.
            size: v.nbd_size(),
            read_only: v.read_only(),
        })
        .collect()
}

/// Reads more bytes into `buf`; `Ok(false)` on EOF or cancellation.
async fn fill<S: Stream>(
    sock: &mut S,
    buf: &mut BytesMut,
    cancel: &CancellationToken,
) -> std::io::Result<bool> {
    buf.reserve(4096);
    tokio::select! {
        _ = cancel.cancelled() => Ok(false),
        r = sock.read_buf(buf) => Ok(r? > 0),
    }
}

async fn run<S: Stream>(
    mut sock: S,
    node: &Arc<Node>,
    cancel: &CancellationToken,
    lines: &Arc<LineBudget>,
) -> Result<Closed, ConnError> {
    let handshake = negotiate(&mut sock, node, cancel, lines);
    let (session, buf) = match tokio::time::timeout(HANDSHAKE_LIMIT, handshake).await {
        Err(_) => return Err(ConnError::HandshakeTimeout(HANDSHAKE_LIMIT)),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Err(closed))) => return Ok(closed),
        Ok(Ok(Ok(agreed))) => agreed,
    };
    let Some(volume) = node.volume(&session.export) else {
        return Err(ConnError::UnknownExport(session.export));
    };
    // Counted while connected: a shrink is refused meanwhile.
    let Some(_client) = volume.attach_nbd(session.size) else {
        return Err(ConnError::ShrankInHandshake { export: session.export, told: session.size });
    };
    tracing::Span::current().record("export", session.export.as_str());
    debug!(structured = session.structured, meta = ?session.meta_context, sizes_agreed = session.sizes_agreed, "transmission");
    let target = Target { volume, any_byte: !session.sizes_agreed, lines: lines.clone() };
    // Every line of the transmission phase names its volume (JSON logs
    // carry it as a span field).
    let span = tracing::info_span!("volume", volume = %session.export);
    transmission(sock, buf, target, node.payload_budget(), session, cancel).instrument(span).await
}

/// Option haggling: the agreed session plus any bytes already read past
/// it, or how the connection ended.
async fn negotiate<S: Stream>(
    sock: &mut S,
    node: &Arc<Node>,
    cancel: &CancellationToken,
    lines: &LineBudget,
) -> Result<Result<(Session, BytesMut), Closed>, ConnError> {
    sock.write_all(&handshake::greeting()).await?;
    // Small on purpose: an idle half-open connection should cost little.
    let mut buf = BytesMut::with_capacity(4096);
    while buf.len() < 4 {
        if !fill(sock, &mut buf, cancel).await? {
            return Ok(Err(if cancel.is_cancelled() { Closed::Drained } else { Closed::Eof }));
        }
    }
    let flags = u32::from_be_bytes(buf[..4].try_into().unwrap());
    let _ = buf.split_to(4);
    let mut neg = Negotiator::new(BlockSizes::default());
    neg.client_flags(flags)?;
    let mut out = BytesMut::new();
    loop {
        let Some((option, data)) = handshake::decode_option(&mut buf)? else {
            if !fill(sock, &mut buf, cancel).await? {
                if cancel.is_cancelled() {
                    return Ok(Err(Closed::Drained));
                }
                if buf.is_empty() {
                    return Ok(Err(Closed::Eof));
                }
                return Err(ConnError::Truncated(buf.len()));
            }
            continue;
        };
        out.clear();
        let next = neg.option(option, &data, &exports(node), &mut out);
        if let Some((reply, message)) = handshake::refusal(&out) {
            // The client's mistake (or a feature we lack): info, once.
            match lines.admit().map(held_back) {
                Some(suppressed) => info!(option, reply, why = message, suppressed, "option refused"),
                None => debug!(option, reply, why = message, "option refused (flood guard)"),
            }
        }
        sock.write_all(&out).await?;
        match next {
            Next::Continue => {}
            Next::Close if option == crate::proto::nbd::OPT_EXPORT_NAME => {
                return Err(ConnError::UnknownExport(String::from_utf8_lossy(&data).into_owned()));
            }
            Next::Close => return Ok(Err(Closed::ByClient)),
            Next::Transmit(s) => return Ok(Ok((s, buf))),
        }
    }
}

/// A request's share of the connection's budget and of the node's payload
/// budget, given back once its reply is written; and, for a long one, the
/// mark that keeps the idle poller asleep until then (`crate::poll`).
#[derive(Debug)]
struct Held {
    conn: OwnedSemaphorePermit,
    node: Option<OwnedSemaphorePermit>,
    _long: Option<LongOp>,
}

impl Held {
    /// Keeps only what an encoded reply of `bytes` needs (a request is
    /// charged for the most its reply can be; a failed READ or a short
    /// BLOCK_STATUS gives the rest back at once). Never grows the share.
    fn fit(&mut self, bytes: usize) {
        let units = 1 + (bytes as u64).div_ceil(UNIT_BYTES);
        let extra = (self.conn.num_permits() as u64).saturating_sub(units);
        if extra > 0 {
            drop(self.conn.split(extra as usize));
        }
        if let Some(node) = self.node.as_mut() {
            PayloadBudget::shrink(node, bytes as u64);
        }
    }
}

/// A finished reply, holding its share of the budgets.
type Outgoing = (Reply, Held);

/// A framed request waiting for room in the budgets before it runs.
struct Admission {
    req: Request,
    conn_units: u32,
    conn: Option<OwnedSemaphorePermit>,
    /// Payload bytes it needs from the node's budget (0: none).
    node_bytes: u64,
    node: Option<OwnedSemaphorePermit>,
}

impl Admission {
    /// `node` is the node-budget room already taken for a gathered payload.
    fn new(req: Request, node: Option<OwnedSemaphorePermit>) -> Admission {
        let node_bytes = if node.is_none() { payload_len(&req) } else { 0 };
        Admission { conn_units: cost(&req), req, conn: None, node_bytes, node }
    }

    fn needs_conn(&self) -> bool {
        self.conn.is_none()
    }

    fn needs_node(&self) -> bool {
        self.conn.is_some() && self.node.is_none() && self.node_bytes > 0
    }

    /// Takes what is free now; the request with its share once it has all.
    fn try_admit(&mut self, conn: &Arc<Semaphore>, node: &PayloadBudget) -> bool {
        if self.needs_conn() {
            self.conn = conn.clone().try_acquire_many_owned(self.conn_units).ok();
        }
        if self.needs_node() {
            self.node = node.try_take(self.node_bytes);
        }
        !self.needs_conn() && !self.needs_node()
    }

    fn into_parts(self) -> (Request, Held) {
        let conn = self.conn.expect("admitted");
        let long = long_op(&self.req);
        (self.req, Held { conn, node: self.node, _long: long })
    }
}

/// The mark of a request that keeps the disk or the socket busy for long:
/// a FLUSH, or what `LongOp::for_transfer` counts (see `crate::poll`).
fn long_op(req: &Request) -> Option<LongOp> {
    if req.kind == CMD_FLUSH {
        Some(LongOp::begin())
    } else {
        LongOp::for_transfer(req.len as u64, req.flags & CMD_FLAG_FUA != 0)
    }
}

/// Bytes of memory a request may hold until its reply is written, taken
/// from both budgets before it runs: READ and WRITE data (lengths over the
/// cap are refused before running, so they hold none; an unaligned one
/// also holds its partial sectors, and a write the copy its store blocks
/// are patched in), and the reply of a BLOCK_STATUS, which
/// the server sizes (at most [`STATUS_CHARGE`]).
fn payload_len(req: &Request) -> u64 {
    let len = req.len as u64;
    match req.kind {
        CMD_READ | CMD_WRITE if len <= MAX_PAYLOAD && unaligned::aligned(req.offset, len) => len,
        // The covering sectors, sliced without a copy.
        CMD_READ if len <= MAX_PAYLOAD => len + 2 * MIN_BLOCK,
        // The store patches the data into a copy of its whole blocks.
        CMD_WRITE if len <= MAX_PAYLOAD => 2 * len + 2 * PREFERRED_BLOCK,
        CMD_BLOCK_STATUS => STATUS_CHARGE,
        _ => 0,
    }
}

/// Connection budget units: at most the whole budget, so any request can
/// be admitted once the others are done.
fn cost(req: &Request) -> u32 {
    (1 + payload_len(req) / UNIT_BYTES).min(BUDGET_UNITS.into()) as u32
}

async fn transmission<S: Stream>(
    sock: S,
    mut buf: BytesMut,
    target: Target,
    node_budget: &PayloadBudget,
    session: Session,
    cancel: &CancellationToken,
) -> Result<Closed, ConnError> {
    let (mut rd, wr) = sock.into_halves();
    let budget = Arc::new(Semaphore::new(BUDGET_UNITS as usize));
    let mut decoder = RequestDecoder::new(session.sizes.max_payload);
    let mut inflight: Inflight = FuturesUnordered::new();
    let mut pending: Option<Admission> = None;
    let mut gathering: Option<Gathering> = None;
    // A large WRITE whose payload waits for room in the node's budget.
    let mut gather_wait: Option<LargeWrite> = None;
    let mut out = Outbox::default();
    let mut readahead = ReadAhead::default();
    let mut reading = true;
    let mut write_failed = false;
    let mut outcome: Result<Closed, ConnError> = Ok(Closed::Eof);

    loop {
        if reading && pending.is_none() && gathering.is_none() && gather_wait.is_none() {
            match decoder.take_large_write(&mut buf, LARGE_WRITE) {
                Ok(Some(w)) => match node_budget.try_take(w.len() as u64) {
                    Some(room) => gathering = Some(Gathering::start(w, &mut buf, room)),
                    None => gather_wait = Some(w),
                },
                Ok(None) => {}
                Err(e) => {
                    reading = false;
                    outcome = Err(e.into());
                }
            }
        }
        if let Some(g) = gathering.take_if(|g| g.is_complete()) {
            let (req, room) = g.finish();
            pending = Some(Admission::new(req, Some(room)));
        }
        if reading && pending.is_none() && gathering.is_none() && gather_wait.is_none() {
            match decoder.decode(&mut buf) {
                Ok(Some(req)) => pending = Some(Admission::new(req, None)),
                Ok(None) => {}
                Err(e) => {
                    reading = false;
                    outcome = Err(e.into());
                }
            }
        }
        if let Some(a) = pending.take_if(|a| a.try_admit(&budget, node_budget)) {
            let (req, held) = a.into_parts();
            crate::poll::touch();
            let ra = (&mut readahead, node_budget);
            dispatch(req, held, &target, &session, ra, &mut out, &mut inflight, &mut reading, &mut outcome);
            continue;
        }
        // Replies go out from this task, without a hop to another one, as
        // far as the socket takes them; the rest waits for writability.
        if !write_failed && !out.is_empty() && !inflight.is_empty() && out.len() < MAX_BATCH {
            // Others are in flight: let the tasks that are ready now finish
            // theirs, so they share this write. On a replicated volume the
            // replies complete one at a time, as the replicas' answers come
            // in; this cut the owner's writev per 4 KiB write at QD32.
            crate::poll::yield_to_ready().await;
            while out.len() < MAX_BATCH {
                match inflight.next().now_or_never() {
                    Some(Some((reply, permit))) => out.push(reply, permit),
                    _ => break,
                }
            }
        }
        if !write_failed
            && !out.is_empty()
            && let Err(e) = out.try_flush(&wr)
        {
            write_failed = true;
            reading = false;
            out.discard();
            if outcome.is_ok() {
                outcome = Err(e.into());
            }
        }
        if !reading && pending.is_none() && inflight.is_empty() && out.is_empty() {
            break;
        }
        let want_conn = pending.as_ref().filter(|a| a.needs_conn()).map(|a| a.conn_units);
        let want_node = pending.as_ref().filter(|a| a.needs_node()).map(|a| a.node_bytes);
        let want_gather = gather_wait.as_ref().map(|w| w.len() as u64);
        tokio::select! {
            biased;
            Some((reply, permit)) = inflight.next(), if !inflight.is_empty() => {
                crate::poll::touch();
                if !write_failed {
                    out.push(reply, permit);
                    // Everything else already finished goes in the same write.
                    while out.len() < MAX_BATCH {
                        match inflight.next().now_or_never() {
                            Some(Some((reply, permit))) => out.push(reply, permit),
                            _ => break,
                        }
                    }
                }
            }
            r = wr.ready_to_write(), if !out.is_empty() => {
                if let Err(e) = r {
                    write_failed = true;
                    reading = false;
                    out.discard();
                    if outcome.is_ok() {
                        outcome = Err(e.into());
                    }
                }
            }
            permit = budget.clone().acquire_many_owned(want_conn.unwrap_or(1)), if want_conn.is_some() => {
                let permit = permit.expect("the budget semaphore is never closed");
                if let Some(a) = pending.as_mut() {
                    a.conn = Some(permit);
                }
            }
            room = node_budget.take(want_node.unwrap_or(0)), if want_node.is_some() => {
                if let Some(a) = pending.as_mut() {
                    a.node = Some(room);
                }
            }
            room = node_budget.take(want_gather.unwrap_or(0)), if want_gather.is_some() => {
                let w = gather_wait.take().expect("checked by the branch condition");
                gathering = Some(Gathering::start(w, &mut buf, room));
            }
            r = read_more(&mut rd, &mut buf, gathering.as_mut()),
                if reading && pending.is_none() && gather_wait.is_none() => {
                match r {
                    Ok(0) => {
                        reading = false;
                        if !buf.is_empty() || decoder.skipping() || gathering.is_some() || gather_wait.is_some() {
                            outcome = Err(ConnError::Truncated(buf.len()));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        reading = false;
                        outcome = Err(e.into());
                    }
                }
            }
            _ = cancel.cancelled(), if reading => {
                reading = false;
                outcome = Ok(Closed::Drained);
                debug!(in_flight = inflight.len(), "draining");
            }
        }
    }
    if !write_failed {
        let mut wr = wr;
        let _ = wr.shutdown().await;
    }
    outcome
}

/// Reads from the socket: into the payload being gathered, if any, else
/// into the frame buffer.
async fn read_more<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    gathering: Option<&mut Gathering>,
) -> std::io::Result<usize> {
    if let Some(g) = gathering {
        let n = rd.read(g.rest()).await?;
        g.filled += n;
        return Ok(n);
    }
    buf.reserve(READ_CHUNK);
    rd.read_buf(buf).await
}

/// A large WRITE whose payload is read straight into aligned memory, which
/// the store then writes to disk as it is (no copy on the way; see
/// `storage::engine::WriteData`).
struct Gathering {
    write: LargeWrite,
    data: AlignedBuf,
    filled: usize,
    /// The payload's room in the node's budget, taken before allocating it.
    room: OwnedSemaphorePermit,
    /// Reading a large payload off the socket is a long wait.
    _long: Option<LongOp>,
}

impl Gathering {
    /// Starts with the part of the payload already in `buf`.
    fn start(write: LargeWrite, buf: &mut BytesMut, room: OwnedSemaphorePermit) -> Gathering {
        let mut data = AlignedBuf::for_overwrite(write.len());
        let filled = buf.len().min(write.len());
        data.as_mut_slice()[..filled].copy_from_slice(&buf[..filled]);
        buf.advance(filled);
        let long = LongOp::for_transfer(write.len() as u64, false);
        Gathering { write, data, filled, room, _long: long }
    }

    /// Room for the rest of the payload (bytes past `filled` are not exposed).
    fn rest(&mut self) -> &mut [u8] {
        &mut self.data.as_mut_slice()[self.filled..]
    }

    fn is_complete(&self) -> bool {
        self.filled == self.write.len()
    }

    fn finish(self) -> (Request, OwnedSemaphorePermit) {
        let req = self.write.finish(Bytes::from_owner(self.data)).expect("the payload was gathered in full");
        (req, self.room)
    }
}

type Inflight = FuturesUnordered<std::pin::Pin<Box<dyn std::future::Future<Output = Outgoing> + Send>>>;

#[allow(clippy::too_many_arguments)]
fn dispatch(
    req: Request,
    permit: Held,
    target: &Target,
    session: &Session,
    (readahead, budget): (&mut ReadAhead, &PayloadBudget),
    out: &mut Outbox,
    inflight: &mut Inflight,
    reading: &mut bool,
    outcome: &mut Result<Closed, ConnError>,
) {
    let (handle, kind, offset, len) = (req.handle, req.kind, req.offset, req.len);
    match validate(req, session) {
        Ok(Command::Disc) => {
            *reading = false;
            *outcome = Ok(Closed::ByClient);
        }
        Ok(cmd) => {
            let hit = match cmd {
                Command::Read { offset, len, .. } if unaligned::aligned(offset, len as u64) => {
                    readahead.on_read(offset, len as u64, &target.volume, budget)
                }
                _ => None,
            };
            let target = target.clone();
            let structured = session.structured;
            let context = session.meta_context.unwrap_or(0);
            inflight.push(Box::pin(async move {
                (execute(&target, cmd, hit, handle, structured, context).await, permit)
            }));
        }
        Err(errno) => {
            match target.lines.admit().map(held_back) {
                Some(suppressed) => info!(handle, kind, offset, len, ?errno, suppressed, "request refused"),
                None => debug!(handle, kind, offset, len, ?errno, "request refused (flood guard)"),
            }
            count_refused(&target.volume, kind, offset, len);
            let msg = format!("{errno:?}: command {kind} at {offset}+{len}");
            out.push(error_reply(handle, errno, session.structured, msg), permit);
        }
    }
}

/// A refused READ, WRITE, FLUSH, TRIM or WRITE_ZEROES counts in the
/// volume's error metrics like one the volume failed.
fn count_refused(volume: &Volume, kind: u16, offset: u64, len: u32) {
    use crate::admin::metrics::Op;
    let op = match kind {
        CMD_READ => Op::read,
        CMD_WRITE => Op::write,
        CMD_FLUSH => Op::flush,
        crate::proto::nbd::CMD_TRIM => Op::trim,
        crate::proto::nbd::CMD_WRITE_ZEROES => Op::write_zeroes,
        _ => return,
    };
    volume.count_refused(op, offset, len as u64);
}

fn errno_of(e: &VolumeError, writes: bool) -> Errno {
    match e {
        VolumeError::OutOfRange { .. } if writes => Errno::NoSpc,
        VolumeError::OutOfRange { .. } | VolumeError::Misaligned { .. } | VolumeError::TooLarge(_) => {
            Errno::Inval
        }
        VolumeError::ReadOnly => Errno::Perm,
        VolumeError::NoSpace(_) => Errno::NoSpc,
        VolumeError::Checksum { .. } | VolumeError::Io(_) => Errno::Io,
        // The owner of a forwarded request is gone or moved: NBD has no
        // "try again" errno a client acts on, and EIO is what a client
        // reconnecting through another node recovers from.
        VolumeError::NotOwner { .. } | VolumeError::Unavailable(_) => Errno::Io,
    }
}

/// Runs one command; `hit` is the read-ahead that answers a READ.
async fn execute(
    target: &Target,
    cmd: Command,
    hit: Option<Hit>,
    handle: u64,
    structured: bool,
    context: u32,
) -> Reply {
    let ok = Reply::Simple { handle, error: 0 };
    let volume = &*target.volume;
    let writes = matches!(cmd, Command::Write { .. } | Command::WriteZeroes { .. });
    let result = match cmd {
        Command::Read { offset, len, df } => match hit {
            Some(hit) => hit.read(volume).await,
            None if unaligned::aligned(offset, len as u64) => volume.read(offset, len as u64).await,
            None => unaligned::read(volume, offset, len).await,
        }
        .map(|chunks| {
            if structured {
                Reply::StructuredRead { handle, offset, chunks, df }
            } else {
                Reply::SimpleRead { handle, chunks }
            }
        }),
        Command::Write { offset, data, fua } if target.any_byte => {
            volume.write_unaligned(offset, data, fua).await.map(|()| ok)
        }
        Command::Write { offset, data, fua } => volume.write(offset, data, fua).await.map(|()| ok),
        Command::Flush => volume.flush().await.map(|()| ok),
        Command::Trim { len: 0, .. } | Command::WriteZeroes { len: 0, .. } => Ok(ok),
        Command::Trim { offset, len, fua } => {
            // A TRIM is advisory (the content of a trimmed range is
            // unspecified until written): a client held to no block size
            // has the whole sectors inside its range discarded.
            let r = if target.any_byte {
                unaligned::inner(offset, offset + len as u64)
            } else {
                offset..offset + len as u64
            };
            if r.start < r.end {
                by_extent(volume, r.start, r.end - r.start, |at, n| volume.trim(at, n, fua)).await
            } else {
                Ok(())
            }
            .map(|()| ok)
        }
        Command::WriteZeroes { offset, len, deallocate, fua } => if target.any_byte {
            let zero = |at, n| volume.write_zeroes_unaligned(at, n, deallocate, fua);
            by_extent(volume, offset, len as u64, zero).await
        } else {
            by_extent(volume, offset, len as u64, |at, n| volume.write_zeroes(at, n, deallocate, fua)).await
        }
        .map(|()| ok),
        // The store has no cache to warm; the range was checked.
        Command::Cache { .. } => Ok(ok),
        Command::BlockStatus { offset, len, req_one } => block_status(volume, offset, len, req_one)
            .await
            .map(|descriptors| Reply::BlockStatus { handle, context, descriptors }),
        Command::Disc => Ok(ok),
    };
    match result {
        Ok(r) => r,
        Err(e) => {
            let errno = errno_of(&e, writes);
            let error = crate::units::error_chain(&e);
            match target.lines.admit().map(held_back) {
                Some(suppressed) if errno == Errno::Io => {
                    warn!(handle, ?errno, error, suppressed, "I/O error")
                }
                Some(suppressed) => info!(handle, ?errno, error, suppressed, "request failed"),
                None => debug!(handle, ?errno, error, "request failed (flood guard)"),
            }
            error_reply(handle, errno, structured, e.to_string())
        }
    }
}

/// Runs a TRIM or WRITE_ZEROES of `[offset, offset+len)` (up to 4 GiB) one
/// extent-sized piece after another, each with its own `fua`: one piece
/// holds its extent's range lock and dirty regions at a time, so other
/// requests to the volume get in between pieces, and what a piece holds
/// does not grow with the length. The first error ends it; pieces done
/// stay done (NBD does not make a failed request atomic).
async fn by_extent<F, Fut>(volume: &Volume, offset: u64, len: u64, mut op: F) -> Result<(), VolumeError>
where
    F: FnMut(u64, u64) -> Fut,
    Fut: std::future::Future<Output = Result<(), VolumeError>>,
{
    let piece = volume.spec().layout.extent_size.max(1);
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let next = (at / piece + 1).saturating_mul(piece).min(end);
        op(at, next - at).await?;
        at = next;
    }
    Ok(())
}

/// The descriptors of one BLOCK_STATUS reply, at most
/// [`MAX_STATUS_DESCRIPTORS`]: the map is asked for one window at a time
/// and no further than the reply reaches, so neither the map held nor the
/// reply grows with the range asked for.
async fn block_status(
    volume: &Volume,
    offset: u64,
    len: u32,
    req_one: bool,
) -> Result<Vec<(u32, u32)>, VolumeError> {
    let mut b = StatusBuilder::new(len, req_one);
    // The map is kept by whole sectors; an unaligned query skips the head
    // of the first one.
    let span = unaligned::span(offset, len as u64);
    let mut skip = offset - span.start;
    let mut at = span.start;
    'windows: while at < span.end {
        let n = (span.end - at).min(STATUS_WINDOW);
        let map = volume.block_status(at, n).await?;
        // A replicated volume's map may cover a prefix of the window: the
        // reply then ends there (the spec lets it describe less).
        let covered: u64 = map.iter().map(|m| m.len).sum();
        for mut m in map {
            let cut = skip.min(m.len);
            (m.len, skip) = (m.len - cut, skip - cut);
            if m.len > 0 && !b.push(&m) {
                break 'windows;
            }
        }
        if covered < n {
            break;
        }
        at += n;
    }
    Ok(b.finish())
}

/// What a connection's requests run against.
#[derive(Debug, Clone)]
struct Target {
    volume: Arc<Volume>,
    /// A client held to no block size (see `Session::sizes_agreed`): its
    /// requests may start and end at any byte.
    any_byte: bool,
    /// The flood guard on the connection's error lines (`export::flood`).
    lines: Arc<LineBudget>,
}

/// Requests at any byte offset and length, for clients that did not agree
/// to the 512-byte minimum block size (NBD_OPT_EXPORT_NAME, or NBD_OPT_GO
/// without NBD_INFO_BLOCK_SIZE: the spec's default minimum is then 1).
/// A READ reads the sectors covering the range and hands back its bytes; a
/// WRITE or WRITE_ZEROES goes to the volume's `*_unaligned` calls, which
/// read-modify-write the partial blocks under the store's exclusive range
/// lock, so they are atomic against every other change of those blocks
/// from any connection and any frontend (no lock here); a TRIM discards the
/// whole sectors inside its range (see `execute`).
mod unaligned {
    use super::*;

    const SECTOR: u64 = MIN_BLOCK;

    pub(super) fn aligned(offset: u64, len: u64) -> bool {
        offset.is_multiple_of(SECTOR) && len.is_multiple_of(SECTOR)
    }

    /// The whole sectors covering `[offset, offset+len)`, in bytes. Within
    /// the volume, whose size is a multiple of the sector.
    pub(super) fn span(offset: u64, len: u64) -> Range<u64> {
        offset / SECTOR * SECTOR..(offset + len).div_ceil(SECTOR) * SECTOR
    }

    /// The whole sectors inside `[offset, end)`, in bytes; empty (start >=
    /// end) when no sector lies wholly inside.
    pub(super) fn inner(offset: u64, end: u64) -> Range<u64> {
        offset.div_ceil(SECTOR) * SECTOR..end / SECTOR * SECTOR
    }

    pub(super) async fn read(volume: &Volume, offset: u64, len: u32) -> Result<Vec<ReadChunk>, VolumeError> {
        let span = span(offset, len as u64);
        let mut chunks = Vec::new();
        let mut at = span.start;
        // Up to two sectors more than the maximum payload.
        while at < span.end {
            let n = (span.end - at).min(MAX_PAYLOAD);
            chunks.extend(volume.read(at, n).await?);
            at += n;
        }
        Ok(slice_chunks(chunks, (offset - span.start) as usize, len as usize))
    }

    /// `len` bytes of `chunks` after the first `skip`.
    pub(super) fn slice_chunks(chunks: Vec<ReadChunk>, mut skip: usize, mut len: usize) -> Vec<ReadChunk> {
        let mut out = Vec::with_capacity(chunks.len());
        for c in chunks {
            if len == 0 {
                break;
            }
            let n = c.len();
            if skip >= n {
                skip -= n;
                continue;
            }
            let take = (n - skip).min(len);
            out.push(match c {
                ReadChunk::Data(b) => ReadChunk::Data(b.slice(skip..skip + take)),
                ReadChunk::Hole(_) => ReadChunk::Hole(take as u32),
            });
            (skip, len) = (0, len - take);
        }
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn spans_and_inner_sectors() {
            assert_eq!(span(100, 1), 0..512);
            assert_eq!(span(511, 2), 0..1024);
            assert_eq!(span(512, 512), 512..1024);
            assert!(inner(100, 200).is_empty());
            assert_eq!(inner(100, 1100), 512..1024);
            assert_eq!(inner(512, 1024), 512..1024);
        }

        #[test]
        fn slices_of_chunks() {
            let c = || {
                vec![
                    ReadChunk::Data(Bytes::from_static(b"abcdef")),
                    ReadChunk::Hole(4),
                    ReadChunk::Data(Bytes::from_static(b"xyz")),
                ]
            };
            let flat = |v: Vec<ReadChunk>| crate::types::flatten_chunks(&v).to_vec();
            let all = flat(c());
            for skip in 0..all.len() {
                for len in 0..=all.len() - skip {
                    assert_eq!(flat(slice_chunks(c(), skip, len)), all[skip..skip + len], "{skip}+{len}");
                }
            }
            assert!(slice_chunks(c(), 2, 0).is_empty());
        }
    }
}

/// Encoded replies not yet (fully) in the socket, with the budget they
/// hold; the permits go back once all of it is written.
#[derive(Debug, Default)]
struct Outbox {
    buf: ReplyBuf,
    permits: Vec<Held>,
    /// Write position: segment index and offset in it.
    seg: usize,
    off: usize,
}

impl Outbox {
    /// Encodes `reply`; its share of the budgets shrinks to its size and
    /// stays held until the bytes are in the socket.
    fn push(&mut self, reply: Reply, mut permit: Held) {
        let n = reply_len(&reply);
        encode_reply(reply, &mut self.buf);
        permit.fit(n);
        self.permits.push(permit);
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Bytes encoded since the outbox was last empty.
    fn len(&self) -> usize {
        self.buf.len()
    }

    fn discard(&mut self) {
        self.buf.clear();
        self.permits.clear();
        (self.seg, self.off) = (0, 0);
    }

    /// Writes as much as the socket takes now (vectored, no waiting).
    fn try_flush<W: WriteHalf>(&mut self, wr: &W) -> std::io::Result<()> {
        let (mut seg, mut off) = (self.seg, self.off);
        let segs = self.buf.segments();
        let result = loop {
            while seg < segs.len() && segs[seg].len() == off {
                seg += 1;
                off = 0;
            }
            if seg >= segs.len() {
                break Ok(true);
            }
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            iov[0] = IoSlice::new(&segs[seg][off..]);
            let mut k = 1;
            for s in segs[seg + 1..].iter().take(MAX_IOV - 1) {
                iov[k] = IoSlice::new(s);
                k += 1;
            }
            let mut n = match wr.try_writev(&iov[..k]) {
                Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(false),
                Err(e) => break Err(e),
            };
            while n > 0 {
                let rem = segs[seg].len() - off;
                if n >= rem {
                    n -= rem;
                    seg += 1;
                    off = 0;
                } else {
                    off += n;
                    n = 0;
                }
            }
        };
        (self.seg, self.off) = (seg, off);
        if let Ok(true) = result {
            self.discard();
        }
        result.map(|_| ())
    }
}
