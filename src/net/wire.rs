//! What both ends of a peer connection share: framing reads off a socket
//! and the writer task that drains a connection's queue in vectored writes.

use super::budget::Held;
use crate::proto::peer::{DecodeError, Decoder, EncodeError, Frame, FrameBuf, FrameFlags, Message};
use bytes::{Bytes, BytesMut};
use std::io::IoSlice;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Socket reads ask for at least this much room.
pub(crate) const READ_CHUNK: usize = 64 << 10;
/// Payloads shorter than this are copied out of the read buffer rather than
/// sharing it (see `proto::peer::Decoder::copy_below`): a shared payload
/// keeps its whole read allocation alive, at most itself plus a read chunk.
pub(crate) const COPY_BELOW: usize = READ_CHUNK;
/// What a request costs beyond its bytes (task, map entry, bookkeeping), so
/// a flood of empty requests is bounded by the budget too.
pub(crate) const OVERHEAD: usize = 512;
/// The cap on frames before the handshake is done (a `Hello` is 58 bytes;
/// a refusal at most a header and its text).
pub(crate) const HANDSHAKE_FRAME: usize = 4096;
/// Stop adding frames to one vectored write past this many bytes...
const MAX_BATCH: usize = 4 << 20;
/// ...or this many buffers (well under IOV_MAX).
const MAX_IOV: usize = 128;

/// Memory a received frame of `frame_len` bytes may keep alive: a payload
/// shared with the read buffer pins up to a read chunk more than itself.
pub(crate) fn receive_cost(frame_len: usize) -> usize {
    let pinned = if frame_len - crate::proto::peer::HEADER_LEN >= COPY_BELOW { READ_CHUNK } else { 0 };
    frame_len + pinned + OVERHEAD
}

pub(crate) fn decoder(max_frame: usize) -> Decoder {
    Decoder::new(max_frame).copy_below(COPY_BELOW)
}

/// One encoded frame on its way out, with the budget it holds until it is
/// written (shared with the request that waits for the reply, if any: the
/// room comes back when both are done).
#[derive(Debug)]
pub(crate) struct Outgoing {
    segs: Vec<Bytes>,
    len: usize,
    _held: Option<Arc<Held>>,
}

impl Outgoing {
    pub(crate) fn encode(
        request_id: u64,
        flags: FrameFlags,
        message: &Message,
        held: Option<Arc<Held>>,
    ) -> Result<Outgoing, EncodeError> {
        let mut b = FrameBuf::new();
        b.encode(request_id, flags, message)?;
        let len = b.len();
        Ok(Outgoing { segs: b.take_segments(), len, _held: held })
    }
}

#[derive(Debug)]
pub(crate) enum WriterCmd {
    Frame(Outgoing),
    /// Write everything queued before this, then shut the socket down.
    Close,
}

/// The queue of a connection's writer task, and how much more is coming:
/// requests in flight on the connection that will queue a frame later
/// (replies to be written, on a server; replies awaited, on a client).
#[derive(Debug, Clone)]
pub(crate) struct WriterTx {
    tx: mpsc::UnboundedSender<WriterCmd>,
    busy: Arc<AtomicUsize>,
}

impl WriterTx {
    pub(crate) fn send(&self, cmd: WriterCmd) -> Result<(), mpsc::error::SendError<WriterCmd>> {
        self.tx.send(cmd)
    }

    /// The count of requests in flight that [`writer`] reads.
    pub(crate) fn busy(&self) -> &AtomicUsize {
        &self.busy
    }
}

pub(crate) struct WriterRx {
    rx: mpsc::UnboundedReceiver<WriterCmd>,
    busy: Arc<AtomicUsize>,
    /// More than this many in flight means others will queue frames soon.
    floor: usize,
}

/// A writer queue. `floor`: how many of the requests counted in
/// [`WriterTx::busy`] are the one that just queued a frame (1 on a client,
/// whose request waits for its reply; 0 on a server, whose handler is done).
pub(crate) fn channel(floor: usize) -> (WriterTx, WriterRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let busy = Arc::new(AtomicUsize::new(0));
    (WriterTx { tx, busy: busy.clone() }, WriterRx { rx, busy, floor })
}

/// Drains `rx` into `wr`: whatever is queued when the socket is ready goes
/// out in one vectored write, and each frame's budget comes back once it
/// is written. Cancels `dead` when it stops, for whatever reason.
pub(crate) async fn writer(
    mut wr: OwnedWriteHalf,
    rx: WriterRx,
    dead: CancellationToken,
) -> std::io::Result<()> {
    let _dead = dead.clone().drop_guard();
    let WriterRx { mut rx, busy, floor } = rx;
    let mut batch: Vec<Outgoing> = Vec::new();
    loop {
        let first = tokio::select! {
            c = rx.recv() => c,
            _ = dead.cancelled() => None,
        };
        let Some(first) = first else { break };
        // With other requests in flight, let the tasks that are ready now
        // queue their frames too, so they share this write: the task that
        // queued `first` woke this one into the runtime's next-to-run slot,
        // and without the yield every reply went out in a write of its own
        // (a `writev` per 4 KiB write on each replica at QD32). Alone (queue
        // depth 1) the frame goes out at once.
        if busy.load(Ordering::Relaxed) > floor {
            crate::poll::yield_to_ready().await;
        }
        let mut close = false;
        let (mut bytes, mut iov) = (0, 0);
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            match cmd {
                WriterCmd::Close => close = true,
                WriterCmd::Frame(f) => {
                    bytes += f.len;
                    iov += f.segs.len();
                    batch.push(f);
                }
            }
            if close || bytes >= MAX_BATCH || iov >= MAX_IOV {
                break;
            }
            next = rx.try_recv().ok();
        }
        let segs: Vec<&Bytes> = batch.iter().flat_map(|f| f.segs.iter()).collect();
        write_segments(&mut wr, &segs).await?;
        batch.clear();
        if close {
            wr.shutdown().await?;
            break;
        }
    }
    Ok(())
}

async fn write_segments(wr: &mut OwnedWriteHalf, segs: &[&Bytes]) -> std::io::Result<()> {
    let (mut i, mut off) = (0, 0);
    loop {
        while i < segs.len() && off == segs[i].len() {
            i += 1;
            off = 0;
        }
        if i == segs.len() {
            return Ok(());
        }
        let mut iov = Vec::with_capacity(MAX_IOV.min(segs.len() - i));
        iov.push(IoSlice::new(&segs[i][off..]));
        iov.extend(segs[i + 1..].iter().take(MAX_IOV - 1).map(|s| IoSlice::new(s)));
        let mut n = wr.write_vectored(&iov).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let left = segs[i].len() - off;
            if n >= left {
                n -= left;
                i += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
    }
}

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    #[error("socket error")]
    Io(#[from] std::io::Error),
    #[error("bad frame")]
    Decode(#[from] DecodeError),
    #[error("connection closed in the middle of a frame ({0} bytes of it received)")]
    Truncated(usize),
}

/// The next frame off `rd`; `Ok(None)` when the peer closed cleanly between
/// frames. Cancel-safe: bytes read stay in `buf`.
pub(crate) async fn read_frame(
    rd: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    dec: &Decoder,
) -> Result<Option<Frame>, ReadError> {
    loop {
        if let Some(f) = dec.decode(buf)? {
            return Ok(Some(f));
        }
        // Room for the rest of this frame (its header is checked against
        // the cap by now), and at least a read chunk.
        let want = dec.frame_len(buf).map_or(0, |n| n.saturating_sub(buf.len()));
        buf.reserve(want.max(READ_CHUNK));
        if rd.read_buf(buf).await? == 0 {
            return if buf.is_empty() { Ok(None) } else { Err(ReadError::Truncated(buf.len())) };
        }
    }
}
