//! Transmission phase: request framing, request validation, reply encoding.
//!
//! Requests are framed by [`RequestDecoder`] straight out of the connection's
//! read buffer: a WRITE payload becomes a `Bytes` that shares the buffer (no
//! copy). A WRITE longer than the maximum payload is never buffered: the
//! decoder discards the payload as it streams past and then hands up the
//! header, so it can be answered `EINVAL` (only after the payload: clients
//! such as libnbd do not expect a reply to a command still being sent).
//!
//! Replies are encoded into a [`ReplyBuf`]: headers go into one growing
//! buffer, payloads (`Bytes` from the volume) are referenced, not copied, so
//! a batch of replies leaves as one vectored write.

use super::*;
use crate::types::{MapExtent, ReadChunk};
use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const REQUEST_HEADER_LEN: usize = 28;

/// A request as framed off the wire, not yet checked against the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
    /// The WRITE payload. `None` for other commands and for a WRITE over the
    /// payload cap (whose bytes the decoder discards).
    pub data: Option<Bytes>,
}

/// Framing errors: the connection cannot be resynchronized and is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("request magic {0:#010x} is not NBD_REQUEST_MAGIC")]
    BadMagic(u32),
}

/// Frames requests out of a byte buffer.
#[derive(Debug)]
pub struct RequestDecoder {
    max_payload: u32,
    /// Bytes of an oversized WRITE payload still to be thrown away.
    skip: u64,
    /// That WRITE, handed up once its payload is gone.
    skipped: Option<Request>,
}

impl RequestDecoder {
    pub fn new(max_payload: u32) -> Self {
        RequestDecoder { max_payload, skip: 0, skipped: None }
    }

    /// The next request, or `Ok(None)` until a whole one is in `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, ProtoError> {
        if self.skip > 0 {
            let n = self.skip.min(buf.len() as u64);
            buf.advance(n as usize);
            self.skip -= n;
            if self.skip > 0 {
                return Ok(None);
            }
            if let Some(req) = self.skipped.take() {
                return Ok(Some(req));
            }
        }
        if buf.len() < REQUEST_HEADER_LEN {
            return Ok(None);
        }
        let magic = u32::from_be_bytes(buf[0..4].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic(magic));
        }
        let flags = u16::from_be_bytes([buf[4], buf[5]]);
        let kind = u16::from_be_bytes([buf[6], buf[7]]);
        let handle = u64::from_be_bytes(buf[8..16].try_into().unwrap());
        let offset = u64::from_be_bytes(buf[16..24].try_into().unwrap());
        let len = u32::from_be_bytes(buf[24..28].try_into().unwrap());
        let mut data = None;
        if kind == CMD_WRITE {
            if len > self.max_payload {
                buf.advance(REQUEST_HEADER_LEN);
                self.skip = len as u64;
                self.skipped = Some(Request { flags, kind, handle, offset, len, data: None });
                return self.decode(buf);
            } else {
                if buf.len() < REQUEST_HEADER_LEN + len as usize {
                    return Ok(None);
                }
                buf.advance(REQUEST_HEADER_LEN);
                data = Some(buf.split_to(len as usize).freeze());
            }
        } else {
            buf.advance(REQUEST_HEADER_LEN);
        }
        Ok(Some(Request { flags, kind, handle, offset, len, data }))
    }

    /// Takes the header of a WRITE off `buf` when its payload is at least
    /// `min` bytes (and within the cap), so the caller can gather the
    /// payload itself: the bytes already in `buf`, then the rest straight
    /// from the socket into memory of its choosing (aligned for O_DIRECT),
    /// and finish the request with [`LargeWrite::finish`]. `Ok(None)` when
    /// `buf` does not start with such a header; then [`Self::decode`] as usual.
    pub fn take_large_write(
        &mut self,
        buf: &mut BytesMut,
        min: u32,
    ) -> Result<Option<LargeWrite>, ProtoError> {
        if self.skip > 0 || buf.len() < REQUEST_HEADER_LEN {
            return Ok(None);
        }
        let magic = u32::from_be_bytes(buf[0..4].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic(magic));
        }
        let kind = u16::from_be_bytes([buf[6], buf[7]]);
        let len = u32::from_be_bytes(buf[24..28].try_into().unwrap());
        if kind != CMD_WRITE || len < min || len > self.max_payload {
            return Ok(None);
        }
        let req = Request {
            flags: u16::from_be_bytes([buf[4], buf[5]]),
            kind,
            handle: u64::from_be_bytes(buf[8..16].try_into().unwrap()),
            offset: u64::from_be_bytes(buf[16..24].try_into().unwrap()),
            len,
            data: None,
        };
        buf.advance(REQUEST_HEADER_LEN);
        Ok(Some(LargeWrite(req)))
    }

    /// True while the payload of an oversized WRITE is being discarded.
    pub fn skipping(&self) -> bool {
        self.skip > 0
    }
}

/// A WRITE whose header is framed and whose payload the caller gathers
/// (see [`RequestDecoder::take_large_write`]).
#[derive(Debug)]
pub struct LargeWrite(Request);

impl LargeWrite {
    /// Payload bytes the request carries.
    pub fn len(&self) -> usize {
        self.0.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }

    /// The request with its payload; `None` if `data` is not exactly
    /// [`Self::len`] bytes (a caller bug, not a client's).
    pub fn finish(self, data: Bytes) -> Option<Request> {
        (data.len() == self.len()).then_some(Request { data: Some(data), ..self.0 })
    }
}

/// Encodes a request (the client side; for tests and benchmarks).
pub fn encode_request(out: &mut BytesMut, flags: u16, kind: u16, handle: u64, offset: u64, len: u32) {
    out.put_u32(REQUEST_MAGIC);
    out.put_u16(flags);
    out.put_u16(kind);
    out.put_u64(handle);
    out.put_u64(offset);
    out.put_u32(len);
}

/// A request that passed every check, ready for the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Read { offset: u64, len: u32, df: bool },
    Write { offset: u64, data: Bytes, fua: bool },
    Disc,
    Flush,
    Trim { offset: u64, len: u32, fua: bool },
    Cache { offset: u64, len: u32 },
    WriteZeroes { offset: u64, len: u32, deallocate: bool, fua: bool },
    BlockStatus { offset: u64, len: u32, req_one: bool },
}

/// Checks a request against the negotiated session; the error is the errno
/// the spec asks for.
pub fn validate(req: Request, s: &Session) -> Result<Command, Errno> {
    let allowed = match req.kind {
        CMD_READ if s.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_READ | CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => return Err(Errno::Inval),
    };
    if req.flags & !allowed != 0 {
        return Err(Errno::Inval);
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (req.offset, req.len);
    match req.kind {
        CMD_DISC => return Ok(Command::Disc),
        CMD_FLUSH => return Ok(Command::Flush),
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if s.read_only => return Err(Errno::Perm),
        CMD_BLOCK_STATUS if s.meta_context.is_none() => return Err(Errno::Inval),
        _ => {}
    }
    // READ, WRITE and CACHE are bounded by the maximum payload. TRIM and
    // WRITE_ZEROES carry none and may cover any length a request can name
    // (the Linux driver sends up to 4 GiB): the server runs them one
    // extent at a time, so their cost does not grow with the length.
    // BLOCK_STATUS replies are capped by the server.
    let bounded = matches!(req.kind, CMD_READ | CMD_WRITE | CMD_CACHE);
    if bounded && len > s.sizes.max_payload {
        return Err(Errno::Inval);
    }
    // A client that did not agree to the advertised sizes has the spec's
    // minimum block size of 1 (the server read-modify-writes for it).
    let min = if s.sizes_agreed { s.sizes.min as u64 } else { 1 };
    if offset % min != 0 || !(len as u64).is_multiple_of(min) {
        return Err(Errno::Inval);
    }
    if offset.checked_add(len as u64).is_none_or(|end| end > s.size) {
        return Err(if matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            Errno::NoSpc
        } else {
            Errno::Inval
        });
    }
    Ok(match req.kind {
        CMD_READ => Command::Read { offset, len, df: req.flags & CMD_FLAG_DF != 0 },
        CMD_WRITE => match req.data {
            Some(data) if data.len() == len as usize => Command::Write { offset, data, fua },
            _ => return Err(Errno::Inval),
        },
        CMD_TRIM => Command::Trim { offset, len, fua },
        CMD_CACHE => Command::Cache { offset, len },
        CMD_WRITE_ZEROES => {
            let no_hole = req.flags & CMD_FLAG_NO_HOLE != 0;
            let fast_zero = req.flags & CMD_FLAG_FAST_ZERO != 0;
            // Zeroing is fast only when the store may deallocate instead of
            // writing zeros; with NO_HOLE it is as slow as a WRITE.
            if fast_zero && no_hole {
                return Err(Errno::NotSup);
            }
            Command::WriteZeroes { offset, len, deallocate: !no_hole, fua }
        }
        CMD_BLOCK_STATUS => {
            if len == 0 {
                return Err(Errno::Inval);
            }
            Command::BlockStatus { offset, len, req_one: req.flags & CMD_FLAG_REQ_ONE != 0 }
        }
        _ => unreachable!("kinds filtered above"),
    })
}

/// One reply, as the server produces it; encoded by [`encode_reply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Simple reply without payload: any success but READ, or any error
    /// without structured replies.
    Simple { handle: u64, error: u32 },
    /// Successful READ without structured replies: holes are sent as zeros.
    SimpleRead { handle: u64, chunks: Vec<ReadChunk> },
    /// Successful READ with structured replies: OFFSET_DATA / OFFSET_HOLE
    /// chunks, or one OFFSET_DATA chunk if the client set DF.
    StructuredRead { handle: u64, offset: u64, chunks: Vec<ReadChunk>, df: bool },
    /// An error chunk (structured replies only), final.
    StructuredError { handle: u64, error: Errno, message: String },
    /// base:allocation descriptors (length, flags), final.
    BlockStatus { handle: u64, context: u32, descriptors: Vec<(u32, u32)> },
}

impl Reply {
    /// Bytes of payload this reply carries (for in-flight accounting).
    pub fn payload_len(&self) -> usize {
        match self {
            Reply::SimpleRead { chunks, .. } | Reply::StructuredRead { chunks, .. } => {
                chunks.iter().map(ReadChunk::len).sum()
            }
            _ => 0,
        }
    }
}

/// An error reply of the right shape for the session.
pub fn error_reply(handle: u64, error: Errno, structured: bool, message: impl Into<String>) -> Reply {
    if structured {
        Reply::StructuredError { handle, error, message: message.into() }
    } else {
        Reply::Simple { handle, error: error.code() }
    }
}

/// Most base:allocation descriptors in one BLOCK_STATUS reply (128 KiB of
/// them). The spec lets a server describe less than the range asked for
/// (the client asks again from where the reply ends) and says to send no
/// more than 2^20; without a cap, a whole-export query of a fragmented
/// volume is a reply of megabytes whose size the client chooses.
pub const MAX_STATUS_DESCRIPTORS: usize = 16 << 10;

/// Builds the descriptors of one BLOCK_STATUS reply from an allocation map
/// fed in address order, merging neighbours of the same state, and stops
/// at the request's length or at the descriptor cap.
#[derive(Debug)]
pub struct StatusBuilder {
    out: Vec<(u32, u32)>,
    left: u64,
    cap: usize,
}

impl StatusBuilder {
    /// For a request of `req_len` bytes; REQ_ONE means one descriptor.
    pub fn new(req_len: u32, req_one: bool) -> StatusBuilder {
        let cap = if req_one { 1 } else { MAX_STATUS_DESCRIPTORS };
        StatusBuilder { out: Vec::new(), left: req_len as u64, cap }
    }

    /// Adds the next piece of the map; false once the reply is complete
    /// (the range is covered, or a new descriptor would pass the cap).
    pub fn push(&mut self, m: &MapExtent) -> bool {
        let len = m.len.min(self.left);
        if len > 0 {
            let flags =
                if m.state.allocated { 0 } else { STATE_HOLE } | if m.state.zero { STATE_ZERO } else { 0 };
            let full = self.out.len() == self.cap;
            match self.out.last_mut() {
                // The sum stays within the request's u32 length.
                Some(last) if last.1 == flags => last.0 += len as u32,
                _ if full => return false,
                _ => self.out.push((len as u32, flags)),
            }
            self.left -= len;
        }
        self.left > 0
    }

    pub fn finish(self) -> Vec<(u32, u32)> {
        self.out
    }
}

/// Bytes `reply` takes on the wire, payloads included, as [`encode_reply`]
/// writes it: what a finished reply holds until it is written.
pub fn reply_len(reply: &Reply) -> usize {
    const CHUNK: usize = 20;
    match reply {
        Reply::Simple { .. } => 16,
        Reply::SimpleRead { chunks, .. } => 16 + chunks.iter().map(ReadChunk::len).sum::<usize>(),
        Reply::StructuredRead { chunks, df, .. } => {
            let data: usize = chunks.iter().map(ReadChunk::len).sum();
            if data == 0 {
                CHUNK
            } else if *df || chunks.len() == 1 && matches!(chunks[0], ReadChunk::Data(_)) {
                CHUNK + 8 + data
            } else {
                chunks
                    .iter()
                    .map(|c| match c {
                        _ if c.is_empty() => 0,
                        ReadChunk::Data(b) => CHUNK + 8 + b.len(),
                        ReadChunk::Hole(_) => CHUNK + 12,
                    })
                    .sum()
            }
        }
        Reply::StructuredError { message, .. } => CHUNK + 6 + message.len().min(MAX_ERROR_MESSAGE),
        Reply::BlockStatus { descriptors, .. } => CHUNK + 4 + 8 * descriptors.len(),
    }
}

/// Header bytes past which [`ReplyBuf`] starts a new segment.
const HEADER_SEGMENT: usize = 256 << 10;

/// Zeros to send for holes when the client cannot take OFFSET_HOLE.
static ZEROES: [u8; 64 << 10] = [0; 64 << 10];

/// Output buffer for a batch of replies: small headers are packed together,
/// payloads are referenced. [`ReplyBuf::segments`] is what to write.
#[derive(Debug, Default)]
pub struct ReplyBuf {
    hdr: BytesMut,
    segs: Vec<Bytes>,
    len: usize,
}

impl ReplyBuf {
    pub fn new() -> Self {
        ReplyBuf { hdr: BytesMut::with_capacity(16 << 10), segs: Vec::with_capacity(64), len: 0 }
    }

    fn payload(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        if !self.hdr.is_empty() {
            self.segs.push(self.hdr.split().freeze());
        }
        self.len += b.len();
        self.segs.push(b);
    }

    fn zeros(&mut self, mut n: usize) {
        while n > 0 {
            let k = n.min(ZEROES.len());
            self.payload(Bytes::from_static(&ZEROES[..k]));
            n -= k;
        }
    }

    fn chunk_header(&mut self, flags: u16, kind: u16, handle: u64, len: u32) {
        self.hdr.put_u32(STRUCTURED_REPLY_MAGIC);
        self.hdr.put_u16(flags);
        self.hdr.put_u16(kind);
        self.hdr.put_u64(handle);
        self.hdr.put_u32(len);
        self.len += 20;
    }

    fn simple_header(&mut self, handle: u64, error: u32) {
        self.hdr.put_u32(SIMPLE_REPLY_MAGIC);
        self.hdr.put_u32(error);
        self.hdr.put_u64(handle);
        self.len += 16;
    }

    fn put(&mut self, n: usize, f: impl FnOnce(&mut BytesMut)) {
        self.hdr.reserve(n);
        f(&mut self.hdr);
        self.len += n;
        // Many large headers (BLOCK_STATUS descriptors) waiting for a slow
        // socket: hand them over as segments, so the header buffer is not
        // grown by doubling (and copied) to the size of all of them.
        if self.hdr.len() >= HEADER_SEGMENT {
            self.segs.push(self.hdr.split().freeze());
        }
    }

    /// Total bytes encoded so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The encoded bytes, in order.
    pub fn segments(&mut self) -> &[Bytes] {
        if !self.hdr.is_empty() {
            self.segs.push(self.hdr.split().freeze());
        }
        &self.segs
    }

    /// Forgets everything written (keeps the header buffer's capacity when
    /// it is no longer shared).
    pub fn clear(&mut self) {
        self.segs.clear();
        self.hdr.clear();
        self.len = 0;
        if self.hdr.capacity() < 4096 {
            self.hdr.reserve(16 << 10);
        }
    }
}

/// Appends the wire form of `reply` to `out`.
pub fn encode_reply(reply: Reply, out: &mut ReplyBuf) {
    match reply {
        Reply::Simple { handle, error } => out.simple_header(handle, error),
        Reply::SimpleRead { handle, chunks } => {
            out.simple_header(handle, 0);
            for c in chunks {
                match c {
                    ReadChunk::Data(b) => out.payload(b),
                    ReadChunk::Hole(n) => out.zeros(n as usize),
                }
            }
        }
        Reply::StructuredRead { handle, offset, chunks, df } => {
            let total: usize = chunks.iter().map(ReadChunk::len).sum();
            if total == 0 {
                out.chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0);
            } else if df || chunks.len() == 1 && matches!(chunks[0], ReadChunk::Data(_)) {
                out.chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, handle, 8 + total as u32);
                out.put(8, |h| h.put_u64(offset));
                for c in chunks {
                    match c {
                        ReadChunk::Data(b) => out.payload(b),
                        ReadChunk::Hole(n) => out.zeros(n as usize),
                    }
                }
            } else {
                let last = chunks.iter().rposition(|c| !c.is_empty()).unwrap_or(0);
                let mut at = offset;
                for (i, c) in chunks.into_iter().enumerate() {
                    let n = c.len();
                    if n == 0 {
                        continue;
                    }
                    let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
                    match c {
                        ReadChunk::Data(b) => {
                            out.chunk_header(flags, REPLY_TYPE_OFFSET_DATA, handle, 8 + n as u32);
                            out.put(8, |h| h.put_u64(at));
                            out.payload(b);
                        }
                        ReadChunk::Hole(h) => {
                            out.chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, handle, 12);
                            out.put(12, |b| {
                                b.put_u64(at);
                                b.put_u32(h);
                            });
                        }
                    }
                    at += n as u64;
                }
            }
        }
        Reply::StructuredError { handle, error, message } => {
            let mut msg = message.as_str();
            while msg.len() > MAX_ERROR_MESSAGE {
                let mut cut = MAX_ERROR_MESSAGE;
                while !msg.is_char_boundary(cut) {
                    cut -= 1;
                }
                msg = &msg[..cut];
            }
            out.chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 6 + msg.len() as u32);
            out.put(6 + msg.len(), |h| {
                h.put_u32(error.code());
                h.put_u16(msg.len() as u16);
                h.put_slice(msg.as_bytes());
            });
        }
        Reply::BlockStatus { handle, context, descriptors } => {
            let n = 4 + 8 * descriptors.len();
            out.chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, handle, n as u32);
            out.put(n, |h| {
                h.put_u32(context);
                for (len, flags) in descriptors {
                    h.put_u32(len);
                    h.put_u32(flags);
                }
            });
        }
    }
}

/// Longest human-readable message put in an error chunk.
pub const MAX_ERROR_MESSAGE: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::BlockState;
    use proptest::prelude::*;

    fn session() -> Session {
        Session {
            export: "demo".into(),
            size: 1 << 20,
            read_only: false,
            flags: 0,
            structured: true,
            meta_context: Some(META_BASE_ALLOCATION_ID),
            sizes: BlockSizes::default(),
            sizes_agreed: true,
        }
    }

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        let data = (kind == CMD_WRITE).then(|| Bytes::from(vec![7u8; len as usize]));
        Request { flags, kind, handle: 9, offset, len, data }
    }

    fn frame(kind: u16, flags: u16, handle: u64, offset: u64, payload: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        encode_request(&mut b, flags, kind, handle, offset, payload.len() as u32);
        b.put_slice(payload);
        b
    }

    fn concat(out: &mut ReplyBuf) -> Vec<u8> {
        out.segments().iter().flat_map(|s| s.iter().copied()).collect()
    }

    // ---- framing: one test per malformation

    #[test]
    fn partial_header_is_none() {
        let f = frame(CMD_READ, 0, 1, 0, &[]);
        let mut d = RequestDecoder::new(1024);
        for cut in 0..REQUEST_HEADER_LEN {
            let mut b = BytesMut::from(&f[..cut]);
            assert_eq!(d.decode(&mut b), Ok(None));
            assert_eq!(b.len(), cut, "nothing consumed");
        }
    }

    #[test]
    fn partial_write_payload_is_none() {
        let f = frame(CMD_WRITE, 0, 1, 0, &[5; 512]);
        let mut d = RequestDecoder::new(1024);
        let mut b = BytesMut::from(&f[..REQUEST_HEADER_LEN + 511]);
        assert_eq!(d.decode(&mut b), Ok(None));
        b.put_u8(5);
        let r = d.decode(&mut b).unwrap().unwrap();
        assert_eq!(r.data.as_deref(), Some(&[5u8; 512][..]));
        assert!(b.is_empty());
    }

    #[test]
    fn wrong_magic_is_an_error() {
        let mut f = frame(CMD_READ, 0, 1, 0, &[]);
        f[3] = 0;
        assert_eq!(RequestDecoder::new(1024).decode(&mut f), Err(ProtoError::BadMagic(0x2560_9500)));
    }

    #[test]
    fn garbage_is_an_error() {
        let mut b = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"[..]);
        assert!(matches!(RequestDecoder::new(1024).decode(&mut b), Err(ProtoError::BadMagic(_))));
    }

    #[test]
    fn large_write_header_is_taken_and_the_payload_left_to_the_caller() {
        let mut d = RequestDecoder::new(1 << 20);
        let payload: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let mut b = frame(CMD_WRITE, CMD_FLAG_FUA, 9, 4096, &payload);
        b.truncate(REQUEST_HEADER_LEN + 100);
        // Under the threshold, or not a WRITE: left to decode().
        assert!(d.take_large_write(&mut b, 8193).unwrap().is_none());
        let mut flush = frame(CMD_FLUSH, 0, 1, 0, &[]);
        assert!(d.take_large_write(&mut flush, 1).unwrap().is_none());
        let w = d.take_large_write(&mut b, 4096).unwrap().expect("a large write");
        assert_eq!(w.len(), 8192);
        assert_eq!(&b[..], &payload[..100], "only the header was consumed");
        assert!(w.finish(Bytes::from_static(b"short")).is_none());
        let w = d.take_large_write(&mut frame(CMD_WRITE, 0, 9, 4096, &payload), 4096).unwrap().unwrap();
        let r = w.finish(Bytes::from(payload.clone())).unwrap();
        assert_eq!((r.kind, r.handle, r.offset, r.len), (CMD_WRITE, 9, 4096, 8192));
        assert_eq!(r.data.as_deref(), Some(&payload[..]));
        // A wrong magic is the same framing error decode() reports; an
        // oversized WRITE stays decode()'s to skip.
        let mut bad = BytesMut::from(&[0u8; REQUEST_HEADER_LEN][..]);
        assert_eq!(d.take_large_write(&mut bad, 1).unwrap_err(), ProtoError::BadMagic(0));
        let mut huge = frame(CMD_WRITE, 0, 3, 0, &[]);
        huge[24..28].copy_from_slice(&(2u32 << 20).to_be_bytes());
        assert!(d.take_large_write(&mut huge, 1).unwrap().is_none());
    }

    #[test]
    fn oversized_write_is_handed_up_and_its_payload_skipped() {
        let mut d = RequestDecoder::new(1024);
        let mut b = frame(CMD_WRITE, 0, 1, 0, &[1; 3000]);
        // Only part of the payload has arrived: nothing to hand up yet.
        b.truncate(REQUEST_HEADER_LEN + 1000);
        assert_eq!(d.decode(&mut b), Ok(None));
        assert!(d.skipping());
        assert!(b.is_empty());
        b.put_bytes(1, 2000);
        b.extend_from_slice(&frame(CMD_FLUSH, 0, 2, 0, &[]));
        let r = d.decode(&mut b).unwrap().unwrap();
        assert_eq!((r.handle, r.len, r.data), (1, 3000, None));
        assert!(!d.skipping());
        let r = d.decode(&mut b).unwrap().unwrap();
        assert_eq!((r.kind, r.handle), (CMD_FLUSH, 2));
        assert!(!d.skipping());
        assert_eq!(validate(req(CMD_WRITE, 0, 0, 3000), &session()), Err(Errno::Inval));
    }

    #[test]
    fn back_to_back_frames() {
        let mut b = frame(CMD_WRITE, CMD_FLAG_FUA, 1, 512, &[3; 512]);
        b.extend_from_slice(&frame(CMD_READ, 0, 2, 0, &[]));
        let mut d = RequestDecoder::new(1024);
        assert_eq!(d.decode(&mut b).unwrap().unwrap().handle, 1);
        assert_eq!(d.decode(&mut b).unwrap().unwrap().handle, 2);
        assert_eq!(d.decode(&mut b), Ok(None));
    }

    // ---- validation: one test per error

    #[test]
    fn unknown_command_einval() {
        assert_eq!(validate(req(42, 0, 0, 0), &session()), Err(Errno::Inval));
        assert_eq!(validate(req(8, 0, 0, 512), &session()), Err(Errno::Inval));
    }

    #[test]
    fn unknown_or_misplaced_flag_einval() {
        let s = session();
        assert_eq!(validate(req(CMD_READ, 1 << 9, 0, 512), &s), Err(Errno::Inval));
        assert_eq!(validate(req(CMD_WRITE, CMD_FLAG_DF, 0, 512), &s), Err(Errno::Inval));
        assert_eq!(validate(req(CMD_READ, CMD_FLAG_REQ_ONE, 0, 512), &s), Err(Errno::Inval));
        assert_eq!(validate(req(CMD_TRIM, CMD_FLAG_NO_HOLE, 0, 512), &s), Err(Errno::Inval));
        let simple = Session { structured: false, ..s };
        assert_eq!(validate(req(CMD_READ, CMD_FLAG_DF, 0, 512), &simple), Err(Errno::Inval));
    }

    #[test]
    fn fua_accepted_on_every_command() {
        let s = session();
        for kind in [CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS]
        {
            assert!(validate(req(kind, CMD_FLAG_FUA, 0, 512), &s).is_ok(), "kind {kind}");
        }
    }

    #[test]
    fn past_end_write_enospc_others_einval() {
        let s = session();
        let end = s.size;
        assert_eq!(validate(req(CMD_WRITE, 0, end, 512), &s), Err(Errno::NoSpc));
        assert_eq!(validate(req(CMD_WRITE_ZEROES, 0, end - 512, 1024), &s), Err(Errno::NoSpc));
        for kind in [CMD_READ, CMD_TRIM, CMD_CACHE, CMD_BLOCK_STATUS] {
            assert_eq!(validate(req(kind, 0, end, 512), &s), Err(Errno::Inval), "kind {kind}");
        }
        assert_eq!(validate(req(CMD_READ, 0, u64::MAX - 511, 1024), &s), Err(Errno::Inval), "overflow");
        assert!(validate(req(CMD_READ, 0, end - 512, 512), &s).is_ok());
    }

    #[test]
    fn misaligned_einval() {
        let s = session();
        for kind in [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE, CMD_BLOCK_STATUS] {
            assert_eq!(validate(req(kind, 0, 1, 512), &s), Err(Errno::Inval));
            assert_eq!(validate(req(kind, 0, 0, 100), &s), Err(Errno::Inval));
        }
    }

    #[test]
    fn unaligned_accepted_when_sizes_were_not_agreed() {
        let s = Session { sizes_agreed: false, ..session() };
        for kind in [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE, CMD_BLOCK_STATUS] {
            assert!(validate(req(kind, 0, 1, 511), &s).is_ok(), "kind {kind}");
            assert!(validate(req(kind, 0, 777, 1), &s).is_ok(), "kind {kind}");
        }
        // Bounds still hold at byte granularity.
        assert_eq!(validate(req(CMD_READ, 0, s.size - 1, 2), &s), Err(Errno::Inval));
        assert_eq!(validate(req(CMD_WRITE, 0, s.size - 1, 2), &s), Err(Errno::NoSpc));
        assert!(validate(req(CMD_READ, 0, s.size - 1, 1), &s).is_ok());
    }

    #[test]
    fn over_max_payload_einval_only_for_commands_with_a_payload() {
        let s = Session { size: 8 << 30, ..session() };
        let big = s.sizes.max_payload + 512;
        for kind in [CMD_READ, CMD_WRITE, CMD_CACHE] {
            assert_eq!(validate(req(kind, 0, 0, big), &s), Err(Errno::Inval));
        }
        let huge = u32::MAX - 511;
        for flags in [0, CMD_FLAG_NO_HOLE, CMD_FLAG_FAST_ZERO] {
            assert_eq!(
                validate(req(CMD_WRITE_ZEROES, flags, 0, huge), &s),
                Ok(Command::WriteZeroes {
                    offset: 0,
                    len: huge,
                    deallocate: flags & CMD_FLAG_NO_HOLE == 0,
                    fua: false
                })
            );
        }
        assert!(validate(req(CMD_TRIM, 0, 0, huge), &s).is_ok());
        assert!(validate(req(CMD_BLOCK_STATUS, 0, 0, huge), &s).is_ok());
    }

    #[test]
    fn read_only_eperm() {
        let s = Session { read_only: true, ..session() };
        for kind in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(validate(req(kind, 0, 0, 512), &s), Err(Errno::Perm));
        }
        assert!(validate(req(CMD_READ, 0, 0, 512), &s).is_ok());
        assert_eq!(validate(req(CMD_FLUSH, 0, 0, 0), &s), Ok(Command::Flush));
    }

    #[test]
    fn block_status_needs_meta_context() {
        let s = Session { meta_context: None, ..session() };
        assert_eq!(validate(req(CMD_BLOCK_STATUS, 0, 0, 512), &s), Err(Errno::Inval));
    }

    #[test]
    fn fast_zero_with_no_hole_enotsup() {
        let s = session();
        assert_eq!(
            validate(req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE, 0, 512), &s),
            Err(Errno::NotSup)
        );
        assert_eq!(
            validate(req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 512), &s),
            Ok(Command::WriteZeroes { offset: 0, len: 512, deallocate: false, fua: false })
        );
    }

    // ---- replies

    #[test]
    fn simple_read_sends_holes_as_zeros() {
        let mut out = ReplyBuf::new();
        let chunks = vec![ReadChunk::Data(Bytes::from_static(b"ab")), ReadChunk::Hole(3)];
        encode_reply(Reply::SimpleRead { handle: 7, chunks }, &mut out);
        let b = concat(&mut out);
        assert_eq!(&b[..16], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
        assert_eq!(&b[16..], b"ab\0\0\0");
        assert_eq!(out.len(), 21);
    }

    #[test]
    fn structured_read_data_and_hole_chunks() {
        let mut out = ReplyBuf::new();
        let chunks = vec![ReadChunk::Data(Bytes::from_static(b"xy")), ReadChunk::Hole(4)];
        encode_reply(Reply::StructuredRead { handle: 1, offset: 100, chunks, df: false }, &mut out);
        let b = concat(&mut out);
        let mut want = BytesMut::new();
        want.put_u32(STRUCTURED_REPLY_MAGIC);
        want.put_u16(0);
        want.put_u16(REPLY_TYPE_OFFSET_DATA);
        want.put_u64(1);
        want.put_u32(10);
        want.put_u64(100);
        want.put_slice(b"xy");
        want.put_u32(STRUCTURED_REPLY_MAGIC);
        want.put_u16(REPLY_FLAG_DONE);
        want.put_u16(REPLY_TYPE_OFFSET_HOLE);
        want.put_u64(1);
        want.put_u32(12);
        want.put_u64(102);
        want.put_u32(4);
        assert_eq!(b, want.to_vec());
    }

    #[test]
    fn structured_read_df_is_one_data_chunk() {
        let mut out = ReplyBuf::new();
        let chunks = vec![ReadChunk::Hole(2), ReadChunk::Data(Bytes::from_static(b"z"))];
        encode_reply(Reply::StructuredRead { handle: 1, offset: 0, chunks, df: true }, &mut out);
        let b = concat(&mut out);
        assert_eq!(u16::from_be_bytes([b[4], b[5]]), REPLY_FLAG_DONE);
        assert_eq!(u16::from_be_bytes([b[6], b[7]]), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(u32::from_be_bytes(b[16..20].try_into().unwrap()), 11);
        assert_eq!(&b[28..], b"\0\0z");
    }

    #[test]
    fn error_chunk_layout_and_message_cap() {
        let mut out = ReplyBuf::new();
        encode_reply(
            Reply::StructuredError { handle: 3, error: Errno::NoSpc, message: "é".repeat(1000) },
            &mut out,
        );
        let b = concat(&mut out);
        assert_eq!(u16::from_be_bytes([b[6], b[7]]), REPLY_TYPE_ERROR);
        assert_eq!(u32::from_be_bytes(b[20..24].try_into().unwrap()), 28);
        let mlen = u16::from_be_bytes([b[24], b[25]]) as usize;
        assert_eq!(mlen, MAX_ERROR_MESSAGE);
        assert_eq!(u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize, 6 + mlen);
        assert!(std::str::from_utf8(&b[26..]).is_ok());
    }

    #[test]
    fn block_status_descriptors_merge_and_req_one() {
        let map = [
            MapExtent { len: 4096, state: BlockState::DATA },
            MapExtent { len: 4096, state: BlockState::DATA },
            MapExtent { len: 8192, state: BlockState::HOLE },
        ];
        let build = |len, req_one| {
            let mut b = StatusBuilder::new(len, req_one);
            for m in &map {
                if !b.push(m) {
                    break;
                }
            }
            b.finish()
        };
        assert_eq!(build(16384, false), vec![(8192, 0), (8192, STATE_HOLE | STATE_ZERO)]);
        assert_eq!(build(16384, true), vec![(8192, 0)], "REQ_ONE: one descriptor, merged");
        assert_eq!(build(6000, false), vec![(6000, 0)]);
    }

    #[test]
    fn block_status_descriptors_stop_at_the_cap() {
        let data = MapExtent { len: 4096, state: BlockState::DATA };
        let hole = MapExtent { len: 4096, state: BlockState::HOLE };
        let mut b = StatusBuilder::new(u32::MAX, false);
        let mut fed = 0;
        while b.push(if fed % 2 == 0 { &data } else { &hole }) {
            fed += 1;
        }
        // A piece of the same state as the last one still merges at the cap.
        let out = b.finish();
        assert_eq!(out.len(), MAX_STATUS_DESCRIPTORS);
        assert_eq!(fed, MAX_STATUS_DESCRIPTORS, "stopped at the first piece past the cap");
        assert!(out.iter().all(|d| d.0 == 4096));
        assert!(out.windows(2).all(|w| w[0].1 != w[1].1));
    }

    #[test]
    fn reply_len_is_the_encoded_length() {
        let replies = [
            Reply::Simple { handle: 1, error: 5 },
            Reply::SimpleRead {
                handle: 2,
                chunks: vec![ReadChunk::Data(Bytes::from_static(b"abc")), ReadChunk::Hole(9)],
            },
            Reply::StructuredError { handle: 3, error: Errno::Io, message: "x".repeat(5000) },
            Reply::StructuredError { handle: 3, error: Errno::Io, message: String::new() },
            Reply::BlockStatus { handle: 4, context: 1, descriptors: vec![(4096, 0); 7] },
            Reply::StructuredRead { handle: 5, offset: 0, chunks: vec![], df: false },
        ];
        for r in replies {
            let mut out = ReplyBuf::new();
            let want = reply_len(&r);
            encode_reply(r.clone(), &mut out);
            assert_eq!(concat(&mut out).len(), want, "{r:?}");
        }
    }

    // ---- properties

    /// A naive parser of the server's reply stream, as a client would do it.
    fn parse_replies(mut b: &[u8]) -> Vec<(u64, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            let magic = b.get_u32();
            assert_eq!(magic, SIMPLE_REPLY_MAGIC);
            let err = b.get_u32();
            let handle = b.get_u64();
            v.push((handle, err, Vec::new()));
        }
        v
    }

    proptest! {
        #[test]
        fn request_round_trip(flags: u16, kind in 0u16..10, handle: u64, offset: u64,
                              payload in proptest::collection::vec(any::<u8>(), 0..2048),
                              split in 0usize..4096) {
            let len = if kind == CMD_WRITE { payload.len() as u32 } else { payload.len() as u32 * 7 };
            let mut wire = BytesMut::new();
            encode_request(&mut wire, flags, kind, handle, offset, len);
            if kind == CMD_WRITE { wire.put_slice(&payload); }
            // Feed it in two pieces: the decoder must wait, then produce exactly it.
            let split = split.min(wire.len());
            let mut d = RequestDecoder::new(1 << 20);
            let mut buf = BytesMut::from(&wire[..split]);
            let first = d.decode(&mut buf).unwrap();
            if split < wire.len() {
                prop_assert!(first.is_none());
                buf.extend_from_slice(&wire[split..]);
            }
            let r = match first { Some(r) => r, None => d.decode(&mut buf).unwrap().unwrap() };
            prop_assert_eq!((r.flags, r.kind, r.handle, r.offset, r.len), (flags, kind, handle, offset, len));
            prop_assert_eq!(r.data.map(|d| d.to_vec()), (kind == CMD_WRITE).then_some(payload));
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn decoder_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut d = RequestDecoder::new(1024);
            let mut b = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = d.decode(&mut b) {}
        }

        #[test]
        fn simple_replies_round_trip(items in proptest::collection::vec((any::<u64>(), 0u32..200), 0..50)) {
            let mut out = ReplyBuf::new();
            for (h, e) in &items {
                encode_reply(Reply::Simple { handle: *h, error: *e }, &mut out);
            }
            let parsed = parse_replies(&concat(&mut out));
            prop_assert_eq!(parsed.len(), items.len());
            for ((h, e, _), (h2, e2)) in parsed.iter().zip(&items) {
                prop_assert_eq!((h, e), (h2, e2));
            }
        }

        #[test]
        fn structured_read_covers_request_exactly(
            parts in proptest::collection::vec((any::<bool>(), 1usize..3000), 0..12),
            offset in 0u64..1_000_000, df: bool)
        {
            let chunks: Vec<ReadChunk> = parts.iter().enumerate().map(|(i, (data, n))| if *data {
                ReadChunk::Data(Bytes::from(vec![i as u8 + 1; *n]))
            } else {
                ReadChunk::Hole(*n as u32)
            }).collect();
            let want: Vec<u8> = crate::types::flatten_chunks(&chunks).to_vec();
            let mut out = ReplyBuf::new();
            let reply = Reply::StructuredRead { handle: 5, offset, chunks, df };
            let predicted = reply_len(&reply);
            encode_reply(reply, &mut out);
            let wire = concat(&mut out);
            prop_assert_eq!(wire.len(), out.len());
            prop_assert_eq!(predicted, wire.len());
            // Reassemble as a client: every chunk within the request, DONE last.
            let mut got = vec![0xffu8; want.len()];
            let mut b = &wire[..];
            let mut done = false;
            let mut content = 0;
            while !b.is_empty() {
                prop_assert!(!done, "chunk after DONE");
                prop_assert_eq!(b.get_u32(), STRUCTURED_REPLY_MAGIC);
                let flags = b.get_u16();
                let kind = b.get_u16();
                prop_assert_eq!(b.get_u64(), 5);
                let len = b.get_u32() as usize;
                let (mut body, rest) = b.split_at(len);
                b = rest;
                done = flags & REPLY_FLAG_DONE != 0;
                match kind {
                    REPLY_TYPE_NONE => prop_assert_eq!(len, 0),
                    REPLY_TYPE_OFFSET_DATA => {
                        let at = (body.get_u64() - offset) as usize;
                        got[at..at + body.len()].copy_from_slice(body);
                        content += 1;
                    }
                    REPLY_TYPE_OFFSET_HOLE => {
                        let at = (body.get_u64() - offset) as usize;
                        let n = body.get_u32() as usize;
                        prop_assert!(n > 0);
                        got[at..at + n].fill(0);
                        content += 1;
                    }
                    k => prop_assert!(false, "unexpected chunk type {}", k),
                }
            }
            prop_assert!(done);
            if df { prop_assert!(content <= 1); }
            prop_assert_eq!(got, want);
        }
    }
}
