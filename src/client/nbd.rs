//! A small async NBD client: one TCP connection, fixed newstyle handshake
//! with `NBD_OPT_GO`, structured replies and `base:allocation`, and
//! requests pipelined by handle.
//!
//! Owns: the connection and the map of requests in flight. Two tasks serve
//! it: a writer that sends whole request frames taken from a channel (so a
//! caller dropping its request future can never tear a frame on the wire),
//! and a reader that checks every reply with [`super::codec`] before
//! buffering its payload and hands each result to the waiting caller. Must
//! never: trust a length or an offset from the server unchecked, buffer
//! more than a request can legitimately carry, or hang a caller once the
//! connection is gone (every request in flight fails with the reason).

use super::codec::{self, Expect, Extent, Info, ProtocolError, ReplyHeader};
use crate::proto::nbd::*;
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

/// Why a request or the connection failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("cannot connect to the NBD server at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("NBD handshake with {addr} failed")]
    Handshake {
        addr: String,
        #[source]
        source: Box<NbdError>,
    },
    #[error("the NBD server at {addr} did not finish the handshake within {limit:?}")]
    Timeout { addr: String, limit: Duration },
    #[error("the server refused export {export:?}: {message}")]
    Refused { export: String, message: String },
    #[error("the server does not support {0}")]
    Unsupported(&'static str),
    #[error("connection to the NBD server broke")]
    Io(#[source] std::io::Error),
    #[error("the NBD server closed the connection")]
    Closed,
    #[error("the NBD server broke the protocol")]
    Protocol(#[source] ProtocolError),
    #[error("the NBD server failed {cmd} at offset {offset} ({len} bytes): {} ({errno}){}", codec::errno_name(*errno), if message.is_empty() { String::new() } else { format!(": {message}") })]
    Server { cmd: &'static str, offset: u64, len: u32, errno: u32, message: String },
    #[error("connection to the NBD server lost")]
    Lost(#[source] Arc<NbdError>),
}

impl From<ProtocolError> for NbdError {
    fn from(e: ProtocolError) -> Self {
        NbdError::Protocol(e)
    }
}

impl From<std::io::Error> for NbdError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof { NbdError::Closed } else { NbdError::Io(e) }
    }
}

pub type Result<T, E = NbdError> = std::result::Result<T, E>;

/// What the handshake learned about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    /// Largest READ/WRITE/WRITE_ZEROES payload the server takes.
    pub max_payload: u32,
    /// Id of `base:allocation`, if the server granted it.
    pub allocation_context: Option<u32>,
}

impl ExportInfo {
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }
    pub fn can_write_zeroes(&self) -> bool {
        self.flags & TFLAG_SEND_WRITE_ZEROES != 0
    }
    pub fn can_trim(&self) -> bool {
        self.flags & TFLAG_SEND_TRIM != 0
    }
    pub fn can_flush(&self) -> bool {
        self.flags & TFLAG_SEND_FLUSH != 0
    }
}

/// Largest payload asked for when the server names no maximum (the
/// protocol's default is 32 MiB).
const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

/// Replies to one option before its final one (INFO and META_CONTEXT
/// replies number a handful).
const MAX_OPTION_REPLIES: usize = 64;
/// How long connecting and the handshake may take before giving up on a
/// server that accepted the connection and says nothing.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Outcome of one request, as the reader hands it over.
enum Answer {
    Ack,
    Read(Bytes),
    Extents(Vec<Extent>),
}

struct Pending {
    cmd: &'static str,
    offset: u64,
    len: u32,
    expect: Expect,
    reply: oneshot::Sender<Result<Answer>>,
}

/// State shared between callers and the reader.
#[derive(Default)]
struct Shared {
    pending: HashMap<u64, Pending>,
    /// Set once the connection is gone; later requests fail with it.
    dead: Option<Arc<NbdError>>,
}

struct Frame {
    header: BytesMut,
    payload: Option<Bytes>,
    /// NBD_CMD_DISC: the writer closes its half after it.
    last: bool,
}

/// A connected client. Requests may be issued concurrently from many tasks
/// (`&self`); they are pipelined on the one connection.
#[derive(Debug)]
pub struct NbdClient {
    info: ExportInfo,
    next_handle: AtomicU64,
    shared: Arc<Mutex<Shared>>,
    tx: mpsc::UnboundedSender<Frame>,
    reader: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("pending", &self.pending.len()).field("dead", &self.dead).finish()
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

async fn read_array<const N: usize>(r: &mut (impl AsyncReadExt + Unpin)) -> Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b).await?;
    Ok(b)
}

async fn read_vec(r: &mut (impl AsyncReadExt + Unpin), len: usize) -> Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    r.read_exact(&mut v).await?;
    Ok(v)
}

/// One option and its replies, up to and including the final one (ACK or
/// an error); `on_reply` sees each non-final reply's type and data.
async fn option(
    rd: &mut BufReader<OwnedReadHalf>,
    wr: &mut OwnedWriteHalf,
    option: u32,
    data: &[u8],
    mut on_reply: impl FnMut(u32, &[u8]) -> Result<()>,
) -> Result<Result<(), (u32, String)>> {
    let mut out = BytesMut::new();
    codec::encode_option(&mut out, option, data);
    wr.write_all(&out).await?;
    // Bounded: each reply is capped, and so is their number.
    for _ in 0..MAX_OPTION_REPLIES {
        let h = codec::decode_option_reply(&read_array::<20>(rd).await?, option)?;
        let data = read_vec(rd, h.len as usize).await?;
        match h.kind {
            REP_ACK => return Ok(Ok(())),
            k if k & (1 << 31) != 0 => return Ok(Err((k, String::from_utf8_lossy(&data).into_owned()))),
            k => on_reply(k, &data)?,
        }
    }
    Err(ProtocolError::TooManyOptionReplies(option).into())
}

async fn handshake(
    stream: TcpStream,
    export: &str,
) -> Result<(BufReader<OwnedReadHalf>, OwnedWriteHalf, ExportInfo)> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let flags = codec::decode_greeting(&read_array::<18>(&mut rd).await?)?;
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if flags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    wr.write_all(&cflags.to_be_bytes()).await?;

    if option(&mut rd, &mut wr, OPT_STRUCTURED_REPLY, &[], |_, _| Ok(())).await?.is_err() {
        return Err(NbdError::Unsupported("structured replies"));
    }
    let mut context = None;
    // Refusal is fine: without base:allocation, every block counts as data.
    let _ = option(&mut rd, &mut wr, OPT_SET_META_CONTEXT, &codec::meta_data(export), |kind, data| {
        if kind == REP_META_CONTEXT {
            context = context.or(codec::decode_meta_context(data)?);
        }
        Ok(())
    })
    .await?;

    let (mut size, mut tflags, mut sizes) = (None, 0u16, None);
    let go = option(&mut rd, &mut wr, OPT_GO, &codec::go_data(export), |kind, data| {
        if kind == REP_INFO {
            match codec::decode_info(data)? {
                Info::Export { size: s, flags } => (size, tflags) = (Some(s), flags),
                Info::BlockSize { min, preferred, max } => sizes = Some((min, preferred, max)),
                Info::Other => {}
            }
        }
        Ok(())
    })
    .await?;
    if let Err((_, message)) = go {
        return Err(NbdError::Refused { export: export.to_string(), message });
    }
    let size = size.ok_or(ProtocolError::NoAnswer)?;
    let (min_block, preferred_block, max_payload) = sizes.unwrap_or((1, 4096, DEFAULT_MAX_PAYLOAD));
    let info = ExportInfo {
        name: export.to_string(),
        size,
        flags: tflags,
        min_block,
        preferred_block,
        max_payload: max_payload.min(DEFAULT_MAX_PAYLOAD),
        allocation_context: context,
    };
    Ok((rd, wr, info))
}

impl NbdClient {
    /// Connects to `addr` (host:port) and opens `export`.
    pub async fn connect(addr: &str, export: &str) -> Result<NbdClient> {
        Self::connect_within(addr, export, HANDSHAKE_TIMEOUT).await
    }

    /// [`NbdClient::connect`], giving up after `limit`.
    pub async fn connect_within(addr: &str, export: &str, limit: Duration) -> Result<NbdClient> {
        let open = async {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|source| NbdError::Connect { addr: addr.to_string(), source })?;
            let _ = stream.set_nodelay(true);
            match handshake(stream, export).await {
                Ok(x) => Ok(x),
                Err(e @ NbdError::Refused { .. }) => Err(e),
                Err(e) => Err(NbdError::Handshake { addr: addr.to_string(), source: Box::new(e) }),
            }
        };
        let (rd, wr, info) = tokio::time::timeout(limit, open)
            .await
            .map_err(|_| NbdError::Timeout { addr: addr.to_string(), limit })??;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_loop(wr, rx, shared.clone()));
        let reader = tokio::spawn(read_loop(rd, shared.clone()));
        Ok(NbdClient { info, next_handle: AtomicU64::new(1), shared, tx, reader, writer })
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    async fn request(
        &self,
        cmd: &'static str,
        kind: u16,
        offset: u64,
        len: u32,
        payload: Option<Bytes>,
        expect: Expect,
    ) -> Result<Answer> {
        let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        {
            let mut s = self.shared.lock().unwrap();
            if let Some(dead) = &s.dead {
                return Err(NbdError::Lost(dead.clone()));
            }
            // In the map before the frame is queued: the reply cannot
            // overtake it.
            s.pending.insert(handle, Pending { cmd, offset, len, expect, reply });
        }
        let mut header = BytesMut::with_capacity(28);
        codec::encode_request(&mut header, 0, kind, handle, offset, len);
        if self.tx.send(Frame { header, payload, last: false }).is_err() {
            self.shared.lock().unwrap().pending.remove(&handle);
            return Err(NbdError::Closed);
        }
        // Dropping this future here is safe: the frame is whole in the
        // channel, and the reader discards a reply nobody waits for.
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(NbdError::Closed),
        }
    }

    /// Reads `len` bytes at `offset` (holes come back as zeros).
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes> {
        match self.request("READ", CMD_READ, offset, len, None, Expect::Read { offset, len }).await? {
            Answer::Read(b) => Ok(b),
            _ => Err(ProtocolError::NoAnswer.into()),
        }
    }

    pub async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        let len = u32::try_from(data.len()).map_err(|_| NbdError::Unsupported("writes over 4 GiB"))?;
        self.request("WRITE", CMD_WRITE, offset, len, Some(data), Expect::Ack).await.map(|_| ())
    }

    /// Zeroes the range, letting the server deallocate it (no NO_HOLE).
    pub async fn write_zeroes(&self, offset: u64, len: u32) -> Result<()> {
        self.request("WRITE_ZEROES", CMD_WRITE_ZEROES, offset, len, None, Expect::Ack).await.map(|_| ())
    }

    pub async fn trim(&self, offset: u64, len: u32) -> Result<()> {
        self.request("TRIM", CMD_TRIM, offset, len, None, Expect::Ack).await.map(|_| ())
    }

    pub async fn flush(&self) -> Result<()> {
        self.request("FLUSH", CMD_FLUSH, 0, 0, None, Expect::Ack).await.map(|_| ())
    }

    /// base:allocation extents from `offset`, covering at most `len` bytes
    /// (the server may describe less). Needs the context granted.
    pub async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>> {
        let context = self.info.allocation_context.ok_or(NbdError::Unsupported("base:allocation"))?;
        let expect = Expect::BlockStatus { len, context, min_block: self.info.min_block };
        match self.request("BLOCK_STATUS", CMD_BLOCK_STATUS, offset, len, None, expect).await? {
            Answer::Extents(e) => Ok(e),
            _ => Err(ProtocolError::NoAnswer.into()),
        }
    }

    /// Sends NBD_CMD_DISC after everything queued, and waits until it is
    /// on the wire.
    pub async fn disconnect(mut self) {
        let mut header = BytesMut::with_capacity(28);
        codec::encode_request(&mut header, 0, CMD_DISC, 0, 0, 0);
        if self.tx.send(Frame { header, payload: None, last: true }).is_ok() {
            let _ = (&mut self.writer).await;
        }
    }
}

/// Fails every request in flight (and all later ones) with `err`; returns
/// the reason that stands (the first one, if both tasks fail).
fn kill(shared: &Mutex<Shared>, err: NbdError) -> Arc<NbdError> {
    let mut s = shared.lock().unwrap();
    let err = s.dead.get_or_insert_with(|| Arc::new(err)).clone();
    for (_, p) in s.pending.drain() {
        let _ = p.reply.send(Err(NbdError::Lost(err.clone())));
    }
    err
}

async fn write_loop(wr: OwnedWriteHalf, mut rx: mpsc::UnboundedReceiver<Frame>, shared: Arc<Mutex<Shared>>) {
    let mut wr = BufWriter::with_capacity(64 << 10, wr);
    let result: std::io::Result<()> = async {
        while let Some(f) = rx.recv().await {
            let mut next = Some(f);
            // Batch whatever is queued into as few syscalls as possible.
            while let Some(f) = next {
                wr.write_all(&f.header).await?;
                if let Some(p) = f.payload {
                    wr.write_all(&p).await?;
                }
                if f.last {
                    wr.flush().await?;
                    return wr.shutdown().await;
                }
                next = rx.try_recv().ok();
            }
            wr.flush().await?;
        }
        wr.shutdown().await
    }
    .await;
    if let Err(e) = result {
        kill(&shared, NbdError::from(e));
    }
}

/// A request being answered: its entry, and the READ buffer being filled.
struct Active {
    p: Pending,
    buf: Option<BytesMut>,
    covered: u64,
    extents: Option<Vec<Extent>>,
    error: Option<NbdError>,
}

async fn read_loop(mut rd: BufReader<OwnedReadHalf>, shared: Arc<Mutex<Shared>>) {
    let mut active: HashMap<u64, Active> = HashMap::new();
    let err = loop {
        match read_one(&mut rd, &shared, &mut active).await {
            Ok(()) => {}
            Err(e) => break e,
        }
    };
    // The requests being answered fail with the reason too.
    let err = kill(&shared, err);
    for (_, a) in active.drain() {
        let _ = a.p.reply.send(Err(NbdError::Lost(err.clone())));
    }
}

fn take_active<'a>(
    shared: &Mutex<Shared>,
    active: &'a mut HashMap<u64, Active>,
    handle: u64,
) -> Result<&'a mut Active> {
    match active.entry(handle) {
        std::collections::hash_map::Entry::Occupied(o) => Ok(o.into_mut()),
        std::collections::hash_map::Entry::Vacant(v) => {
            let p =
                shared.lock().unwrap().pending.remove(&handle).ok_or(ProtocolError::UnknownHandle(handle))?;
            let buf = match p.expect {
                Expect::Read { len, .. } => Some(BytesMut::zeroed(len as usize)),
                _ => None,
            };
            Ok(v.insert(Active { p, buf, covered: 0, extents: None, error: None }))
        }
    }
}

async fn read_one(
    rd: &mut BufReader<OwnedReadHalf>,
    shared: &Mutex<Shared>,
    active: &mut HashMap<u64, Active>,
) -> Result<()> {
    let magic = read_array::<4>(rd).await?;
    let n = codec::header_len(magic)?;
    let mut hdr = [0u8; codec::CHUNK_HEADER_LEN];
    hdr[..4].copy_from_slice(&magic);
    rd.read_exact(&mut hdr[4..n]).await?;
    match codec::decode_reply_header(&hdr[..n])? {
        ReplyHeader::Simple { handle, error } => {
            let a = take_active(shared, active, handle)?;
            if error == 0 && matches!(a.p.expect, Expect::Read { .. } | Expect::BlockStatus { .. }) {
                return Err(ProtocolError::SimpleReadReply.into());
            }
            let a = active.remove(&handle).expect("taken above");
            let r = if error == 0 { Ok(Answer::Ack) } else { Err(server_error(&a.p, error, String::new())) };
            let _ = a.p.reply.send(r);
        }
        ReplyHeader::Chunk(h) => {
            let a = take_active(shared, active, h.handle)?;
            let len = codec::check_chunk(&h, &a.p.expect)?;
            match h.kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let offset = u64::from_be_bytes(read_array::<8>(rd).await?);
                    let range = codec::data_range(offset, len, &a.p.expect)?;
                    a.covered += range.len() as u64;
                    let buf = a.buf.as_mut().expect("READs have a buffer");
                    rd.read_exact(&mut buf[range]).await?;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let p = read_array::<12>(rd).await?;
                    let range = codec::hole_range(&p, &a.p.expect)?;
                    a.covered += range.len() as u64; // the buffer is zeroed already
                }
                REPLY_TYPE_BLOCK_STATUS => {
                    let p = read_vec(rd, len).await?;
                    if a.extents.is_some() {
                        // One context was selected: one chunk per request.
                        return Err(ProtocolError::BadChunk {
                            cmd: "BLOCK_STATUS",
                            kind: h.kind,
                            len: h.len,
                        }
                        .into());
                    }
                    a.extents = Some(codec::decode_block_status(&p, &a.p.expect)?);
                }
                REPLY_TYPE_NONE => {}
                _ => {
                    let p = read_vec(rd, len).await?;
                    let (errno, message) = codec::decode_error(&p);
                    a.error.get_or_insert(server_error(&a.p, errno, message));
                }
            }
            if h.done() {
                // (The caller may have given up waiting: then nobody hears it.)
                finish(active.remove(&h.handle).expect("taken above"))?;
            }
        }
    }
    Ok(())
}

fn server_error(p: &Pending, errno: u32, message: String) -> NbdError {
    NbdError::Server { cmd: p.cmd, offset: p.offset, len: p.len, errno, message }
}

/// The answer of a request whose last chunk arrived; sends it to the
/// caller and returns a protocol error for the reader to close on.
fn finish(a: Active) -> Result<()> {
    let r = match (a.error, a.p.expect) {
        (Some(e), _) => Err(e),
        (None, Expect::Read { len, .. }) if a.covered != len as u64 => {
            Err(ProtocolError::ReadIncomplete { got: a.covered, want: len }.into())
        }
        (None, Expect::Read { .. }) => Ok(Answer::Read(a.buf.expect("READs have a buffer").freeze())),
        (None, Expect::BlockStatus { .. }) => match a.extents {
            Some(e) => Ok(Answer::Extents(e)),
            None => Err(ProtocolError::NoAnswer.into()),
        },
        (None, Expect::Ack) => Ok(Answer::Ack),
    };
    let fatal = match &r {
        Err(NbdError::Protocol(e)) => Some(e.clone()),
        _ => None,
    };
    let _ = a.p.reply.send(r);
    match fatal {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    //! A scripted hostile server: the real server-side handshake
    //! (`proto::nbd::Negotiator`), then replies written by hand.
    use super::*;
    use crate::proto::nbd::handshake::{Negotiator, Next, decode_option, greeting};
    use bytes::BufMut;
    use tokio::net::TcpListener;

    const SIZE: u64 = 1 << 20;

    async fn serve<F, Fut>(script: F) -> String
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(&greeting()).await.unwrap();
            let mut n = Negotiator::new(BlockSizes::default());
            n.client_flags(u32::from_be_bytes(read_array::<4>(&mut s).await.unwrap())).unwrap();
            let exports =
                [Export { name: "v".into(), description: String::new(), size: SIZE, read_only: false }];
            let mut buf = BytesMut::new();
            loop {
                let (opt, data) = loop {
                    if let Some(o) = decode_option(&mut buf).unwrap() {
                        break o;
                    }
                    let mut b = [0u8; 4096];
                    let k = s.read(&mut b).await.unwrap();
                    assert!(k > 0, "client hung up during the handshake");
                    buf.extend_from_slice(&b[..k]);
                };
                let mut out = BytesMut::new();
                let next = n.option(opt, &data, &exports, &mut out);
                s.write_all(&out).await.unwrap();
                if let Next::Transmit(_) = next {
                    break;
                }
            }
            script(s).await;
        });
        addr
    }

    /// Reads one request; returns (kind, handle).
    async fn request(s: &mut TcpStream) -> (u16, u64) {
        let h = read_array::<28>(s).await.unwrap();
        let kind = u16::from_be_bytes([h[6], h[7]]);
        let len = u32::from_be_bytes(h[24..28].try_into().unwrap()) as usize;
        if kind == CMD_WRITE {
            read_vec(s, len).await.unwrap();
        }
        (kind, u64::from_be_bytes(h[8..16].try_into().unwrap()))
    }

    fn chunk(flags: u16, kind: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u32(STRUCTURED_REPLY_MAGIC);
        b.put_u16(flags);
        b.put_u16(kind);
        b.put_u64(handle);
        b.put_u32(payload.len() as u32);
        b.put_slice(payload);
        b.to_vec()
    }

    fn simple(handle: u64, error: u32) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u32(SIMPLE_REPLY_MAGIC);
        b.put_u32(error);
        b.put_u64(handle);
        b.to_vec()
    }

    async fn client(addr: &str) -> NbdClient {
        let c = NbdClient::connect(addr, "v").await.unwrap();
        assert_eq!((c.info().size, c.info().allocation_context), (SIZE, Some(META_BASE_ALLOCATION_ID)));
        c
    }

    fn lost_with(e: NbdError) -> ProtocolError {
        match e {
            NbdError::Lost(inner) => match &*inner {
                NbdError::Protocol(p) => p.clone(),
                other => panic!("lost for another reason: {other:?}"),
            },
            other => panic!("not a lost connection: {other:?}"),
        }
    }

    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), f).await.expect("no hang")
    }

    #[tokio::test]
    async fn oversized_chunk_fails_every_request_without_buffering_it() {
        let addr = serve(|mut s| async move {
            let (_, h) = request(&mut s).await;
            let (_, _flush) = request(&mut s).await;
            // Claims 1 GiB of data for a 4 KiB read: refused on the header.
            let mut hdr = chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, h, &[]);
            hdr[16..20].copy_from_slice(&(1u32 << 30).to_be_bytes());
            s.write_all(&hdr).await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await; // keep the socket open
        })
        .await;
        let c = client(&addr).await;
        let (r, f) = within(async { tokio::join!(c.read(0, 4096), c.flush()) }).await;
        let want = ProtocolError::BadChunk { cmd: "READ", kind: REPLY_TYPE_OFFSET_DATA, len: 1 << 30 };
        assert_eq!(lost_with(r.unwrap_err()), want);
        assert_eq!(lost_with(f.unwrap_err()), want);
        // Later requests fail at once with the same reason.
        assert_eq!(lost_with(within(c.flush()).await.unwrap_err()), want);
    }

    #[tokio::test]
    async fn data_outside_the_request_and_unknown_handles_are_protocol_errors() {
        let addr = serve(|mut s| async move {
            let (_, h) = request(&mut s).await;
            let mut p = 8192u64.to_be_bytes().to_vec();
            p.extend_from_slice(&[1u8; 512]);
            s.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, h, &p)).await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let c = client(&addr).await;
        let e = lost_with(within(c.read(0, 4096)).await.unwrap_err());
        assert_eq!(e, ProtocolError::ChunkOutOfRange { offset: 8192, len: 512, start: 0, req_len: 4096 });

        let addr = serve(|mut s| async move {
            let _ = request(&mut s).await;
            s.write_all(&simple(999, 0)).await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let c = client(&addr).await;
        assert_eq!(lost_with(within(c.flush()).await.unwrap_err()), ProtocolError::UnknownHandle(999));
    }

    #[tokio::test]
    async fn a_read_not_fully_covered_is_refused() {
        let addr = serve(|mut s| async move {
            let (_, h) = request(&mut s).await;
            let mut p = 0u64.to_be_bytes().to_vec();
            p.extend_from_slice(&[7u8; 512]);
            s.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, h, &p)).await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let c = client(&addr).await;
        match within(c.read(0, 4096)).await.unwrap_err() {
            NbdError::Protocol(ProtocolError::ReadIncomplete { got: 512, want: 4096 }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn structured_read_with_holes_and_server_errors() {
        let addr = serve(|mut s| async move {
            let (_, h) = request(&mut s).await;
            let mut p = 0u64.to_be_bytes().to_vec();
            p.extend_from_slice(&[9u8; 1024]);
            s.write_all(&chunk(0, REPLY_TYPE_OFFSET_DATA, h, &p)).await.unwrap();
            let mut hole = 1024u64.to_be_bytes().to_vec();
            hole.extend_from_slice(&3072u32.to_be_bytes());
            s.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, h, &hole)).await.unwrap();
            let (_, h) = request(&mut s).await;
            let mut err = 28u32.to_be_bytes().to_vec();
            err.extend_from_slice(&4u16.to_be_bytes());
            err.extend_from_slice(b"full");
            s.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, h, &err)).await.unwrap();
            let (_, h) = request(&mut s).await;
            s.write_all(&simple(h, 0)).await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let c = client(&addr).await;
        let data = within(c.read(0, 4096)).await.unwrap();
        assert_eq!(&data[..1024], &[9u8; 1024][..]);
        assert!(data[1024..].iter().all(|b| *b == 0));
        match within(c.write(0, Bytes::from(vec![1u8; 512]))).await.unwrap_err() {
            NbdError::Server { cmd: "WRITE", offset: 0, len: 512, errno: 28, message } => {
                assert_eq!(message, "full")
            }
            other => panic!("{other:?}"),
        }
        // A refused request leaves the connection usable.
        within(c.flush()).await.unwrap();
    }

    #[tokio::test]
    async fn a_dropped_request_leaves_the_connection_usable() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let addr = serve(|mut s| async move {
            let (_, first) = request(&mut s).await;
            let _ = rx.await; // the client has given up on it
            let mut p = 0u64.to_be_bytes().to_vec();
            p.extend_from_slice(&[5u8; 4096]);
            s.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, first, &p)).await.unwrap();
            let (_, h) = request(&mut s).await;
            s.write_all(&simple(h, 0)).await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let c = client(&addr).await;
        assert!(tokio::time::timeout(Duration::from_millis(100), c.read(0, 4096)).await.is_err());
        tx.send(()).unwrap();
        within(c.flush()).await.unwrap();
    }

    #[tokio::test]
    async fn a_server_closing_mid_reply_fails_the_request() {
        let addr = serve(|mut s| async move {
            let (_, h) = request(&mut s).await;
            s.write_all(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, h, &[])[..10]).await.unwrap();
        })
        .await;
        let c = client(&addr).await;
        match within(c.flush()).await.unwrap_err() {
            NbdError::Lost(e) => assert!(matches!(*e, NbdError::Closed), "{e:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_silent_server_times_out_and_an_endless_option_reply_stream_is_cut() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (_s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        match within(NbdClient::connect_within(&addr, "v", Duration::from_millis(200))).await.unwrap_err() {
            NbdError::Timeout { limit, .. } => assert_eq!(limit, Duration::from_millis(200)),
            other => panic!("{other:?}"),
        }

        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(&greeting()).await.unwrap();
            let _ = read_array::<4>(&mut s).await;
            let mut b = BytesMut::new();
            for _ in 0..MAX_OPTION_REPLIES + 1 {
                b.put_u64(OPT_REPLY_MAGIC);
                b.put_u32(OPT_STRUCTURED_REPLY);
                b.put_u32(REP_SERVER);
                b.put_u32(0);
            }
            let _ = s.write_all(&b).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        match within(NbdClient::connect(&addr, "v")).await.unwrap_err() {
            NbdError::Handshake { source, .. } => assert!(
                matches!(
                    *source,
                    NbdError::Protocol(ProtocolError::TooManyOptionReplies(OPT_STRUCTURED_REPLY))
                ),
                "{source:?}"
            ),
            other => panic!("{other:?}"),
        }
    }
}
