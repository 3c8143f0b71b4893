//! NBD server: one tokio task per connection running the sans-IO codec in
//! `proto::nbd` over a TCP socket, and turning requests into `Volume` calls.
//!
//! Per connection, after the handshake the socket is split:
//! - the connection task reads and frames requests, validates them, and
//!   runs them as futures in a `FuturesUnordered`, so many requests are in
//!   flight at once and complete in any order;
//! - a writer task takes finished replies from a channel and writes
//!   everything queued in one vectored write (read payloads are the
//!   volume's `Bytes`, never copied).
//!
//! Memory is bounded per connection by a semaphore of "cost units" (one per
//! request plus one per 4 KiB of payload): a request takes its units before
//! it runs and gives them back only once its reply is written. When the
//! budget is spent the connection stops reading the socket, which is the
//! backpressure. Worst case per connection: the budget, plus one frame
//! being assembled (at most the maximum payload), plus the read buffer.
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

use crate::node::{Node, Volume, VolumeError};
use crate::proto::nbd::handshake::{self, Export, Negotiator, Next, Session};
use crate::proto::nbd::transmission::{
    Command, ProtoError, Reply, ReplyBuf, Request, RequestDecoder, descriptors, encode_reply, error_reply,
    validate,
};
use crate::proto::nbd::{BlockSizes, CMD_READ, CMD_WRITE, Errno};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use std::io::IoSlice;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
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
/// A WRITE payload remainder at least this big is read on its own.
const LARGE_REMAINDER: usize = 64 << 10;

/// Serves every volume of `node` on `listener` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) -> std::io::Result<()> {
    info!(addr = ?listener.local_addr().ok(), "NBD server listening");
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((sock, peer)) => {
                let span = tracing::info_span!("nbd", %peer, export = tracing::field::Empty);
                tracker.spawn(connection(sock, node.clone(), cancel.clone()).instrument(span));
            }
            Err(e) => {
                // Out of fds and the like: keep serving the connections we have.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    info!("NBD server stopped accepting");
    Ok(())
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

async fn connection(sock: TcpStream, node: Arc<Node>, cancel: CancellationToken) {
    if let Err(e) = sock.set_nodelay(true) {
        debug!(error = %e, "TCP_NODELAY");
    }
    match run(sock, &node, &cancel).await {
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
                v.size(),
                if v.read_only() { ", read-only" } else { "" }
            ),
            size: v.size(),
            read_only: v.read_only(),
        })
        .collect()
}

/// Reads more bytes into `buf`; `Ok(false)` on EOF or cancellation.
async fn fill(sock: &mut TcpStream, buf: &mut BytesMut, cancel: &CancellationToken) -> std::io::Result<bool> {
    buf.reserve(4096);
    tokio::select! {
        _ = cancel.cancelled() => Ok(false),
        r = sock.read_buf(buf) => Ok(r? > 0),
    }
}

async fn run(mut sock: TcpStream, node: &Arc<Node>, cancel: &CancellationToken) -> Result<Closed, ConnError> {
    let (session, buf) = match tokio::time::timeout(HANDSHAKE_LIMIT, negotiate(&mut sock, node, cancel)).await
    {
        Err(_) => return Err(ConnError::HandshakeTimeout(HANDSHAKE_LIMIT)),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Err(closed))) => return Ok(closed),
        Ok(Ok(Ok(agreed))) => agreed,
    };
    let Some(volume) = node.volume(&session.export) else {
        return Err(ConnError::UnknownExport(session.export));
    };
    tracing::Span::current().record("export", session.export.as_str());
    debug!(structured = session.structured, meta = ?session.meta_context, "transmission");
    transmission(sock, buf, volume, session, cancel).await
}

/// Option haggling: the agreed session plus any bytes already read past
/// it, or how the connection ended.
async fn negotiate(
    sock: &mut TcpStream,
    node: &Arc<Node>,
    cancel: &CancellationToken,
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

/// A reply on its way to the writer, holding its share of the budget.
type Outgoing = (Reply, OwnedSemaphorePermit);

fn cost(req: &Request) -> u32 {
    // Lengths over the cap are refused before running, so they cost 1.
    let payload = (req.kind == CMD_READ || req.kind == CMD_WRITE)
        && (req.len as u64) <= crate::node::volume::MAX_PAYLOAD;
    if payload { 1 + (req.len as u64 / UNIT_BYTES) as u32 } else { 1 }
}

async fn transmission(
    sock: TcpStream,
    mut buf: BytesMut,
    volume: Arc<Volume>,
    session: Session,
    cancel: &CancellationToken,
) -> Result<Closed, ConnError> {
    let (mut rd, wr) = sock.into_split();
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let writer = tokio::spawn(writer(wr, rx).in_current_span());
    let budget = Arc::new(Semaphore::new(BUDGET_UNITS as usize));
    let mut decoder = RequestDecoder::new(session.sizes.max_payload);
    let mut inflight = FuturesUnordered::new();
    let mut pending: Option<(Request, u32)> = None;
    let mut reading = true;
    let mut writer_ok = true;
    let mut outcome: Result<Closed, ConnError> = Ok(Closed::Eof);

    loop {
        if reading && pending.is_none() {
            match decoder.decode(&mut buf) {
                Ok(Some(req)) => {
                    let c = cost(&req);
                    pending = Some((req, c));
                }
                Ok(None) => {}
                Err(e) => {
                    reading = false;
                    outcome = Err(e.into());
                }
            }
        }
        if let Some((req, c)) = pending.take() {
            match budget.clone().try_acquire_many_owned(c) {
                Ok(permit) => {
                    dispatch(req, permit, &volume, &session, &tx, &mut inflight, &mut reading, &mut outcome);
                    continue;
                }
                Err(_) => pending = Some((req, c)),
            }
        }
        if !reading && pending.is_none() && inflight.is_empty() {
            break;
        }
        let want_units = pending.as_ref().map_or(1, |p| p.1);
        tokio::select! {
            biased;
            Some((reply, permit)) = inflight.next(), if !inflight.is_empty() => {
                if writer_ok && tx.send((reply, permit)).is_err() {
                    // The writer died (client gone): finish what runs, read no more.
                    writer_ok = false;
                    reading = false;
                }
            }
            permit = budget.clone().acquire_many_owned(want_units), if pending.is_some() => {
                let (req, _) = pending.take().unwrap();
                let permit = permit.expect("the budget semaphore is never closed");
                dispatch(req, permit, &volume, &session, &tx, &mut inflight, &mut reading, &mut outcome);
            }
            r = read_more(&mut rd, &mut buf, &decoder), if reading && pending.is_none() => {
                match r {
                    Ok(0) => {
                        reading = false;
                        if !buf.is_empty() || decoder.skipping() {
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
    drop(tx);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if outcome.is_ok() => outcome = Err(e.into()),
        Ok(Err(_)) => {}
        Err(e) => warn!(error = %e, "writer task failed"),
    }
    outcome
}

async fn read_more(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut BytesMut,
    decoder: &RequestDecoder,
) -> std::io::Result<usize> {
    let wanted = decoder.wanted(buf);
    if wanted >= LARGE_REMAINDER {
        // Read exactly the rest of a large WRITE payload: the frame then ends
        // at the end of the buffer, and no partial next frame has to be
        // copied when the buffer is replaced (its payload is still in use).
        buf.reserve(wanted);
        let mut limited = bytes::BufMut::limit(&mut *buf, wanted);
        rd.read_buf(&mut limited).await
    } else {
        buf.reserve(wanted.max(READ_CHUNK));
        rd.read_buf(buf).await
    }
}

type Inflight = FuturesUnordered<std::pin::Pin<Box<dyn std::future::Future<Output = Outgoing> + Send>>>;

#[allow(clippy::too_many_arguments)]
fn dispatch(
    req: Request,
    permit: OwnedSemaphorePermit,
    volume: &Arc<Volume>,
    session: &Session,
    tx: &mpsc::UnboundedSender<Outgoing>,
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
            let volume = volume.clone();
            let structured = session.structured;
            let context = session.meta_context.unwrap_or(0);
            inflight.push(Box::pin(async move {
                (execute(&volume, cmd, handle, structured, context).await, permit)
            }));
        }
        Err(errno) => {
            info!(handle, kind, offset, len, ?errno, "request refused");
            let msg = format!("{errno:?}: command {kind} at {offset}+{len}");
            let _ = tx.send((error_reply(handle, errno, session.structured, msg), permit));
        }
    }
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
    }
}

async fn execute(volume: &Volume, cmd: Command, handle: u64, structured: bool, context: u32) -> Reply {
    let ok = Reply::Simple { handle, error: 0 };
    let writes = matches!(cmd, Command::Write { .. } | Command::WriteZeroes { .. });
    let result = match cmd {
        Command::Read { offset, len, df } => volume.read(offset, len as u64).await.map(|chunks| {
            if structured {
                Reply::StructuredRead { handle, offset, chunks, df }
            } else {
                Reply::SimpleRead { handle, chunks }
            }
        }),
        Command::Write { offset, data, fua } => volume.write(offset, data, fua).await.map(|()| ok),
        Command::Flush => volume.flush().await.map(|()| ok),
        Command::Trim { len: 0, .. } | Command::WriteZeroes { len: 0, .. } => Ok(ok),
        Command::Trim { offset, len, fua } => volume.trim(offset, len as u64, fua).await.map(|()| ok),
        Command::WriteZeroes { offset, len, deallocate, fua } => {
            volume.write_zeroes(offset, len as u64, deallocate, fua).await.map(|()| ok)
        }
        // The store has no cache to warm; the range was checked.
        Command::Cache { .. } => Ok(ok),
        Command::BlockStatus { offset, len, req_one } => volume
            .block_status(offset, len as u64)
            .await
            .map(|map| Reply::BlockStatus { handle, context, descriptors: descriptors(&map, len, req_one) }),
        Command::Disc => Ok(ok),
    };
    match result {
        Ok(r) => r,
        Err(e) => {
            let errno = errno_of(&e, writes);
            if errno == Errno::Io {
                warn!(handle, error = %e, cause = ?std::error::Error::source(&e).map(|s| s.to_string()), "I/O error");
            } else {
                info!(handle, error = %e, "request failed");
            }
            error_reply(handle, errno, structured, e.to_string())
        }
    }
}

/// Writes replies as they come, batching whatever is queued into one
/// vectored write; the permits go back once their bytes are in the socket.
async fn writer(mut wr: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Outgoing>) -> std::io::Result<()> {
    let mut out = ReplyBuf::new();
    let mut permits = Vec::with_capacity(64);
    while let Some((reply, permit)) = rx.recv().await {
        encode_reply(reply, &mut out);
        permits.push(permit);
        while out.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok((reply, permit)) => {
                    encode_reply(reply, &mut out);
                    permits.push(permit);
                }
                Err(_) => break,
            }
        }
        write_segments(&mut wr, out.segments()).await?;
        out.clear();
        permits.clear();
    }
    wr.shutdown().await
}

async fn write_segments(wr: &mut OwnedWriteHalf, segs: &[Bytes]) -> std::io::Result<()> {
    let (mut i, mut off) = (0usize, 0usize);
    let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(MAX_IOV);
    while i < segs.len() {
        iov.clear();
        iov.push(IoSlice::new(&segs[i][off..]));
        iov.extend(segs[i + 1..].iter().take(MAX_IOV - 1).map(|s| IoSlice::new(s)));
        let mut n = wr.write_vectored(&iov).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let rem = segs[i].len() - off;
            if n >= rem {
                n -= rem;
                i += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
        while i < segs.len() && segs[i].len() == off {
            i += 1;
            off = 0;
        }
    }
    Ok(())
}
