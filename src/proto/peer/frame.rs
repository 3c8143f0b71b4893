//! The frame: a fixed 32-byte header, then the payload (the message body).
//!
//! ```text
//! offset size field
//! 0      4    magic, the bytes "BASP"
//! 4      2    protocol version (u16 LE)            } the first six bytes keep this
//!                                                  } meaning in every version
//! 6      2    message kind (u16 LE, see `Kind`)
//! 8      4    frame flags (u32 LE, see `FrameFlags`; unknown bits refused)
//! 12     4    payload length in bytes (u32 LE)
//! 16     8    request id (u64 LE; a reply carries its request's id; 0 is
//!             "no request", used for connection-level errors)
//! 24     4    crc32c of the payload
//! 28     4    crc32c of bytes 0..28 of this header
//! 32     ..   payload
//! ```
//!
//! Decoding checks, in this order: magic, version, header crc, flags, kind,
//! payload length against the cap (before a byte of payload is buffered),
//! then, once the whole payload is there, the payload crc and the body.
//! Everything after the header crc is trusted enough to report the request
//! id in the error, so the receiver can answer that request.

use super::message::{BodyError, Kind, Message};
use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const MAGIC: [u8; 4] = *b"BASP";
pub const HEADER_LEN: usize = 32;
/// The largest data payload a message carries: one 32 MiB write or read.
pub const MAX_DATA: usize = 32 << 20;
/// The hard cap on a whole frame: the largest data payload, its body fields
/// and the header, rounded up to 33 MiB. A decoder may be built with a
/// smaller cap, never a larger one.
pub const MAX_FRAME: usize = 33 << 20;

/// The version of the peer protocol a frame is written in.
///
/// Bump it (add `V2`, keep `V1` decodable as long as a release that speaks
/// only `V1` may still be in a cluster) whenever a change would make an
/// older node misread a frame or refuse one it should accept: a header or
/// body field added, removed, resized or given a new meaning, a new message
/// kind, a new flag bit. Extending an enum carried in a body (an error
/// code) counts too. The magic and the version stay at bytes 0..6 in every
/// version, so a mismatch is always recognized and answered clearly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum ProtocolVersion {
    V1 = 1,
}

impl ProtocolVersion {
    /// The version this build speaks.
    pub const CURRENT: ProtocolVersion = ProtocolVersion::V1;

    pub fn from_u16(v: u16) -> Option<ProtocolVersion> {
        match v {
            1 => Some(ProtocolVersion::V1),
            _ => None,
        }
    }

    pub fn as_u16(self) -> u16 {
        self as u16
    }
}

impl std::fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.as_u16())
    }
}

/// Frame-level flags, independent of the message kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct FrameFlags(u32);

impl FrameFlags {
    pub const NONE: FrameFlags = FrameFlags(0);
    /// The sender expects no reply (Raft messages: Raft retransmits). The
    /// receiver answers nothing for it, not even an error.
    pub const ONE_WAY: FrameFlags = FrameFlags(1);
    const KNOWN: u32 = 1;

    pub fn bits(self) -> u32 {
        self.0
    }

    pub fn from_bits(bits: u32) -> Option<FrameFlags> {
        (bits & !Self::KNOWN == 0).then_some(FrameFlags(bits))
    }

    pub fn one_way(self) -> bool {
        self.0 & Self::ONE_WAY.0 != 0
    }
}

/// Data shorter than this is copied in with the header when encoding: a
/// separate buffer per small Raft message would cost more than the copy.
const INLINE_DATA: usize = 4096;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub request_id: u64,
    pub flags: FrameFlags,
    pub message: Message,
}

/// Why bytes are not a valid frame. Every variant closes the connection
/// (the stream cannot be resynchronized); those past the header crc carry
/// the request id so the receiver can answer that request with an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bad frame magic {found:02x?} (not a Basalt peer, or the stream lost sync)")]
    BadMagic { found: [u8; 4] },
    #[error("peer speaks peer protocol version {theirs}, this node speaks version {ours}")]
    VersionMismatch { ours: ProtocolVersion, theirs: u16 },
    #[error("header crc32c {found:#010x} does not match the header ({computed:#010x})")]
    HeaderChecksum { found: u32, computed: u32 },
    #[error("unknown frame flags {flags:#x} on request {request_id}")]
    UnknownFlags { flags: u32, request_id: u64 },
    #[error("unknown message kind {kind} on request {request_id}")]
    UnknownKind { kind: u16, request_id: u64 },
    #[error("frame of {len} bytes on request {request_id} is over the {max}-byte cap")]
    Oversize { len: u64, max: usize, request_id: u64 },
    #[error(
        "payload crc32c {found:#010x} does not match the payload ({computed:#010x}) on request {request_id}"
    )]
    PayloadChecksum { found: u32, computed: u32, request_id: u64 },
    #[error("malformed {kind:?} body on request {request_id}")]
    Body {
        kind: Kind,
        request_id: u64,
        #[source]
        error: BodyError,
    },
}

impl DecodeError {
    /// The request the bad frame claimed to be, when its header was intact.
    pub fn request_id(&self) -> Option<u64> {
        match self {
            DecodeError::BadMagic { .. }
            | DecodeError::VersionMismatch { .. }
            | DecodeError::HeaderChecksum { .. } => None,
            DecodeError::UnknownFlags { request_id, .. }
            | DecodeError::UnknownKind { request_id, .. }
            | DecodeError::Oversize { request_id, .. }
            | DecodeError::PayloadChecksum { request_id, .. }
            | DecodeError::Body { request_id, .. } => Some(*request_id),
        }
    }
}

/// A header whose magic, version, crc, flags, kind and length all checked out.
#[derive(Debug, Clone, Copy)]
struct Header {
    kind: Kind,
    flags: FrameFlags,
    len: usize,
    request_id: u64,
    payload_crc: u32,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Frames out of a receive buffer.
///
/// Payloads of at least `copy_below` bytes become `Bytes` that share the
/// receive buffer (`split_to().freeze()`, no copy). Smaller ones are copied
/// out: a few bytes sharing the buffer would keep its whole allocation (a
/// read chunk) alive for as long as the request lives, which a peer could
/// use to make a tiny request pin far more memory than it is charged for.
#[derive(Debug, Clone)]
pub struct Decoder {
    max_frame: usize,
    copy_below: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(MAX_FRAME)
    }
}

impl Decoder {
    /// A decoder refusing frames over `max_frame` bytes (clamped to
    /// [`MAX_FRAME`] and to at least a header), copying no payload.
    pub fn new(max_frame: usize) -> Decoder {
        Decoder { max_frame: max_frame.clamp(HEADER_LEN, MAX_FRAME), copy_below: 0 }
    }

    /// Copies payloads shorter than `n` bytes out of the receive buffer.
    pub fn copy_below(mut self, n: usize) -> Decoder {
        self.copy_below = n;
        self
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Checks the header at the start of `buf` (at least `HEADER_LEN` bytes).
    fn header(&self, buf: &[u8]) -> Result<Header, DecodeError> {
        let magic: [u8; 4] = buf[0..4].try_into().unwrap();
        if magic != MAGIC {
            return Err(DecodeError::BadMagic { found: magic });
        }
        let version = le16(buf, 4);
        if ProtocolVersion::from_u16(version) != Some(ProtocolVersion::CURRENT) {
            return Err(DecodeError::VersionMismatch { ours: ProtocolVersion::CURRENT, theirs: version });
        }
        let found = le32(buf, 28);
        let computed = crc32c::crc32c(&buf[..28]);
        if found != computed {
            return Err(DecodeError::HeaderChecksum { found, computed });
        }
        let request_id = le64(buf, 16);
        let bits = le32(buf, 8);
        let flags =
            FrameFlags::from_bits(bits).ok_or(DecodeError::UnknownFlags { flags: bits, request_id })?;
        let raw_kind = le16(buf, 6);
        let kind = Kind::from_u16(raw_kind).ok_or(DecodeError::UnknownKind { kind: raw_kind, request_id })?;
        let len = le32(buf, 12);
        let total = HEADER_LEN as u64 + u64::from(len);
        if total > self.max_frame as u64 {
            return Err(DecodeError::Oversize { len: total, max: self.max_frame, request_id });
        }
        Ok(Header { kind, flags, len: len as usize, request_id, payload_crc: le32(buf, 24) })
    }

    /// The whole length of the frame at the start of `buf`, once its header
    /// is there and valid (so a reader can reserve room for exactly it).
    pub fn frame_len(&self, buf: &[u8]) -> Option<usize> {
        if buf.len() < HEADER_LEN {
            return None;
        }
        self.header(buf).ok().map(|h| HEADER_LEN + h.len)
    }

    /// The next frame, or `Ok(None)` until a whole one is in `buf`. After an
    /// error the stream cannot be resynchronized: close the connection.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let h = self.header(buf)?;
        let end = HEADER_LEN + h.len;
        if buf.len() < end {
            return Ok(None);
        }
        let computed = crc32c::crc32c(&buf[HEADER_LEN..end]);
        if computed != h.payload_crc {
            return Err(DecodeError::PayloadChecksum {
                found: h.payload_crc,
                computed,
                request_id: h.request_id,
            });
        }
        let payload = if h.len < self.copy_below {
            let p = Bytes::copy_from_slice(&buf[HEADER_LEN..end]);
            buf.advance(end);
            p
        } else {
            let mut frame = buf.split_to(end);
            frame.advance(HEADER_LEN);
            frame.freeze()
        };
        let message = Message::decode(h.kind, payload).map_err(|error| DecodeError::Body {
            kind: h.kind,
            request_id: h.request_id,
            error,
        })?;
        Ok(Some(Frame { request_id: h.request_id, flags: h.flags, message }))
    }
}

/// Why a message cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("a {kind:?} frame of {len} bytes is over the {max}-byte cap")]
    TooLarge { kind: Kind, len: u64, max: usize },
}

/// Output for a batch of frames: headers and small bodies are packed into
/// one buffer, large data payloads (`Bytes`) are referenced, not copied.
/// [`FrameBuf::segments`] is what a vectored write sends.
#[derive(Debug, Default)]
pub struct FrameBuf {
    hdr: BytesMut,
    segs: Vec<Bytes>,
    len: usize,
}

impl FrameBuf {
    pub fn new() -> FrameBuf {
        FrameBuf::default()
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
        self.seal();
        &self.segs
    }

    /// The encoded bytes, in order, taken out of the buffer.
    pub fn take_segments(&mut self) -> Vec<Bytes> {
        self.seal();
        self.len = 0;
        std::mem::take(&mut self.segs)
    }

    /// Everything in one contiguous buffer (a copy; for tests and tools).
    pub fn to_bytes(&mut self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.len);
        for s in self.segments() {
            out.extend_from_slice(s);
        }
        out.freeze()
    }

    fn seal(&mut self) {
        if !self.hdr.is_empty() {
            self.segs.push(self.hdr.split().freeze());
        }
    }

    /// Appends one frame. Nothing is appended on an error.
    pub fn encode(
        &mut self,
        request_id: u64,
        flags: FrameFlags,
        message: &Message,
    ) -> Result<(), EncodeError> {
        let kind = message.kind();
        let start = self.hdr.len();
        self.hdr.put_bytes(0, HEADER_LEN);
        message.encode_fields(&mut self.hdr);
        let fields = self.hdr.len() - start - HEADER_LEN;
        let data_len: usize = message.data_parts().map(Bytes::len).sum();
        let len = (fields + data_len) as u64;
        if HEADER_LEN as u64 + len > MAX_FRAME as u64 {
            self.hdr.truncate(start);
            return Err(EncodeError::TooLarge { kind, len: HEADER_LEN as u64 + len, max: MAX_FRAME });
        }
        let mut crc = crc32c::crc32c(&self.hdr[start + HEADER_LEN..]);
        for d in message.data_parts() {
            crc = crc32c::crc32c_append(crc, d);
        }
        let h = &mut self.hdr[start..start + HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&ProtocolVersion::CURRENT.as_u16().to_le_bytes());
        h[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
        h[8..12].copy_from_slice(&flags.bits().to_le_bytes());
        h[12..16].copy_from_slice(&(len as u32).to_le_bytes());
        h[16..24].copy_from_slice(&request_id.to_le_bytes());
        h[24..28].copy_from_slice(&crc.to_le_bytes());
        let hcrc = crc32c::crc32c(&h[..28]);
        h[28..32].copy_from_slice(&hcrc.to_le_bytes());
        self.len += HEADER_LEN + fields;
        for d in message.data_parts().filter(|d| !d.is_empty()) {
            self.len += d.len();
            if d.len() < INLINE_DATA {
                self.hdr.extend_from_slice(d);
            } else {
                self.seal();
                self.segs.push(d.clone());
            }
        }
        Ok(())
    }
}

/// One frame's wire bytes in one buffer (a copy of any data; for tests,
/// tools and small control messages).
pub fn encode_to_bytes(request_id: u64, flags: FrameFlags, message: &Message) -> Result<Bytes, EncodeError> {
    let mut b = FrameBuf::new();
    b.encode(request_id, flags, message)?;
    Ok(b.to_bytes())
}

/// The bytes of a frame on the wire for `message` (header included),
/// without encoding it: what a sender charges against its budget.
pub fn frame_len(message: &Message) -> usize {
    HEADER_LEN + message.body_len()
}
