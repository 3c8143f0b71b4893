//! Client side of the NBD wire format, sans-IO: encoders for what a client
//! sends, and checked decoders for what a server answers.
//!
//! Owns: the byte layouts of client options and requests and the checks on
//! every server reply before a byte of its payload is buffered (a reply's
//! length is judged against what the request it answers can legitimately
//! carry). Must never: do I/O, read a clock, or size a buffer from a wire
//! length it has not capped. The constants are `proto::nbd`'s.

use crate::proto::nbd::*;
use bytes::{BufMut, BytesMut};

/// Longest option reply accepted during the handshake (an export
/// description is at most 4096 bytes; the rest are small fixed fields).
pub const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Longest error chunk accepted (a 4096-byte message plus fields).
pub const MAX_ERROR_CHUNK: u32 = 8 << 10;
/// Length of a simple reply header.
pub const SIMPLE_HEADER_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// What a server sent that no server following the protocol sends. The
/// connection cannot be trusted afterwards and is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("greeting magic {0:#018x} is not NBDMAGIC")]
    BadGreeting(u64),
    #[error("server does not speak fixed newstyle negotiation (greeting {0:#018x})")]
    NotNewstyle(u64),
    #[error("server does not offer fixed newstyle (handshake flags {0:#06x})")]
    NotFixedNewstyle(u16),
    #[error("option reply magic {0:#018x} is wrong")]
    BadOptionReplyMagic(u64),
    #[error("option reply answers option {got}, not the {sent} sent")]
    WrongOption { sent: u32, got: u32 },
    #[error("option reply carries {0} bytes, over the {MAX_OPTION_REPLY}-byte cap")]
    OptionReplyTooLong(u32),
    #[error("option {0} drew more replies than any server sends")]
    TooManyOptionReplies(u32),
    #[error("option reply type {kind:#x} with {len} bytes is malformed")]
    BadOptionReply { kind: u32, len: u32 },
    #[error("reply magic {0:#010x} is neither simple nor structured")]
    BadReplyMagic(u32),
    #[error("reply for handle {0}, which no request in flight has")]
    UnknownHandle(u64),
    #[error("structured reply before structured replies were negotiated")]
    UnexpectedStructured,
    #[error("simple reply without error to a READ under structured replies")]
    SimpleReadReply,
    #[error("chunk type {kind} ({len} bytes) does not fit a {cmd} request")]
    BadChunk { cmd: &'static str, kind: u16, len: u32 },
    #[error("chunk covers {offset}+{len}, outside the request {start}+{req_len}")]
    ChunkOutOfRange { offset: u64, len: u64, start: u64, req_len: u32 },
    #[error("READ reply covered {got} of {want} bytes")]
    ReadIncomplete { got: u64, want: u32 },
    #[error("block status reply for context {got}, not the negotiated {want}")]
    WrongContext { got: u32, want: u32 },
    #[error("block status reply is empty or describes {got} bytes of a {want}-byte request")]
    BadBlockStatus { got: u64, want: u32 },
    #[error("request finished without a chunk that answers it")]
    NoAnswer,
}

/// The greeting's handshake flags, after checking both magics.
pub fn decode_greeting(b: &[u8; 18]) -> Result<u16, ProtocolError> {
    let magic = u64::from_be_bytes(b[0..8].try_into().unwrap());
    if magic != NBDMAGIC {
        return Err(ProtocolError::BadGreeting(magic));
    }
    let opt = u64::from_be_bytes(b[8..16].try_into().unwrap());
    if opt != IHAVEOPT {
        return Err(ProtocolError::NotNewstyle(opt));
    }
    let flags = u16::from_be_bytes([b[16], b[17]]);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ProtocolError::NotFixedNewstyle(flags));
    }
    Ok(flags)
}

/// Appends one option (`IHAVEOPT`, option, length, data).
pub fn encode_option(out: &mut BytesMut, option: u32, data: &[u8]) {
    out.put_u64(IHAVEOPT);
    out.put_u32(option);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// Data of `NBD_OPT_GO` for `name`, asking for the block size info.
pub fn go_data(name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(8 + name.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d
}

/// Data of `NBD_OPT_SET_META_CONTEXT` selecting `base:allocation` on `name`.
pub fn meta_data(name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(12 + name.len() + META_BASE_ALLOCATION.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&(META_BASE_ALLOCATION.len() as u32).to_be_bytes());
    d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
    d
}

/// Header of one option reply; the caller reads `len` bytes of data next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub kind: u32,
    pub len: u32,
}

pub fn decode_option_reply(b: &[u8; 20], sent: u32) -> Result<OptionReplyHeader, ProtocolError> {
    let magic = u64::from_be_bytes(b[0..8].try_into().unwrap());
    if magic != OPT_REPLY_MAGIC {
        return Err(ProtocolError::BadOptionReplyMagic(magic));
    }
    let got = u32::from_be_bytes(b[8..12].try_into().unwrap());
    if got != sent {
        return Err(ProtocolError::WrongOption { sent, got });
    }
    let kind = u32::from_be_bytes(b[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(b[16..20].try_into().unwrap());
    if len > MAX_OPTION_REPLY {
        return Err(ProtocolError::OptionReplyTooLong(len));
    }
    Ok(OptionReplyHeader { kind, len })
}

/// What an `NBD_REP_INFO` reply says, when it is one we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    Export { size: u64, flags: u16 },
    BlockSize { min: u32, preferred: u32, max: u32 },
    Other,
}

pub fn decode_info(data: &[u8]) -> Result<Info, ProtocolError> {
    let bad = || ProtocolError::BadOptionReply { kind: REP_INFO, len: data.len() as u32 };
    if data.len() < 2 {
        return Err(bad());
    }
    let u32_at = |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().unwrap());
    match u16::from_be_bytes([data[0], data[1]]) {
        INFO_EXPORT if data.len() == 12 => Ok(Info::Export {
            size: u64::from_be_bytes(data[2..10].try_into().unwrap()),
            flags: u16::from_be_bytes([data[10], data[11]]),
        }),
        INFO_BLOCK_SIZE if data.len() == 14 => {
            let (min, preferred, max) = (u32_at(2), u32_at(6), u32_at(10));
            // The spec: powers of two, min <= preferred, min <= max.
            if !min.is_power_of_two() || !preferred.is_power_of_two() || min > preferred || max < min {
                return Err(bad());
            }
            Ok(Info::BlockSize { min, preferred, max })
        }
        INFO_EXPORT | INFO_BLOCK_SIZE => Err(bad()),
        _ => Ok(Info::Other),
    }
}

/// The context id of an `NBD_REP_META_CONTEXT` reply naming `base:allocation`,
/// `None` for any other context.
pub fn decode_meta_context(data: &[u8]) -> Result<Option<u32>, ProtocolError> {
    if data.len() < 4 {
        return Err(ProtocolError::BadOptionReply { kind: REP_META_CONTEXT, len: data.len() as u32 });
    }
    let id = u32::from_be_bytes(data[0..4].try_into().unwrap());
    Ok((&data[4..] == META_BASE_ALLOCATION.as_bytes()).then_some(id))
}

/// Appends a request header (`payload` bytes of a WRITE follow it).
pub fn encode_request(out: &mut BytesMut, flags: u16, kind: u16, handle: u64, offset: u64, len: u32) {
    crate::proto::nbd::transmission::encode_request(out, flags, kind, handle, offset, len);
}

/// A reply header, simple or structured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple { handle: u64, error: u32 },
    Chunk(ChunkHeader),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub len: u32,
}

impl ChunkHeader {
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// Bytes of a reply header given its first four (the magic): 16 or 20.
pub fn header_len(magic: [u8; 4]) -> Result<usize, ProtocolError> {
    match u32::from_be_bytes(magic) {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_HEADER_LEN),
        STRUCTURED_REPLY_MAGIC => Ok(CHUNK_HEADER_LEN),
        m => Err(ProtocolError::BadReplyMagic(m)),
    }
}

/// Decodes a whole reply header (`b` is 16 or 20 bytes, magic first).
pub fn decode_reply_header(b: &[u8]) -> Result<ReplyHeader, ProtocolError> {
    let magic: [u8; 4] = b[0..4].try_into().unwrap();
    match (u32::from_be_bytes(magic), b.len()) {
        (SIMPLE_REPLY_MAGIC, SIMPLE_HEADER_LEN) => Ok(ReplyHeader::Simple {
            error: u32::from_be_bytes(b[4..8].try_into().unwrap()),
            handle: u64::from_be_bytes(b[8..16].try_into().unwrap()),
        }),
        (STRUCTURED_REPLY_MAGIC, CHUNK_HEADER_LEN) => Ok(ReplyHeader::Chunk(ChunkHeader {
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            handle: u64::from_be_bytes(b[8..16].try_into().unwrap()),
            len: u32::from_be_bytes(b[16..20].try_into().unwrap()),
        })),
        (m, _) => Err(ProtocolError::BadReplyMagic(m)),
    }
}

/// The request kinds a client has in flight, as far as replies care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Read {
        offset: u64,
        len: u32,
    },
    BlockStatus {
        len: u32,
        context: u32,
        min_block: u32,
    },
    /// WRITE, WRITE_ZEROES, TRIM, FLUSH: only an acknowledgement.
    Ack,
}

impl Expect {
    fn name(&self) -> &'static str {
        match self {
            Expect::Read { .. } => "READ",
            Expect::BlockStatus { .. } => "BLOCK_STATUS",
            Expect::Ack => "acknowledged",
        }
    }
}

/// Checks a chunk header against the request it answers, before its
/// payload is read: returns how many payload bytes may be buffered (the
/// chunk's own length, now known to be legitimate).
pub fn check_chunk(h: &ChunkHeader, expect: &Expect) -> Result<usize, ProtocolError> {
    let bad = || ProtocolError::BadChunk { cmd: expect.name(), kind: h.kind, len: h.len };
    let len = h.len as u64;
    let ok = match (h.kind, expect) {
        (REPLY_TYPE_NONE, _) => len == 0 && h.done(),
        (k, _) if k & (1 << 15) != 0 => (6..=MAX_ERROR_CHUNK as u64).contains(&len),
        (REPLY_TYPE_OFFSET_DATA, Expect::Read { len: rl, .. }) => len > 8 && len <= *rl as u64 + 8,
        (REPLY_TYPE_OFFSET_HOLE, Expect::Read { .. }) => len == 12,
        (REPLY_TYPE_BLOCK_STATUS, Expect::BlockStatus { len: rl, min_block, .. }) => {
            // At most one descriptor per minimum block of the request.
            let cap = 4 + 8 * (*rl as u64 / (*min_block).max(1) as u64).max(1);
            len >= 12 && (len - 4).is_multiple_of(8) && len <= cap
        }
        _ => false,
    };
    if ok { Ok(h.len as usize) } else { Err(bad()) }
}

/// Where in a READ's buffer an `OFFSET_DATA` chunk of `chunk_len` bytes
/// (including its 8-byte offset, `offset`) goes: the byte range, checked to
/// lie inside the request.
pub fn data_range(
    offset: u64,
    chunk_len: usize,
    expect: &Expect,
) -> Result<std::ops::Range<usize>, ProtocolError> {
    let Expect::Read { offset: start, len: req_len } = *expect else {
        return Err(ProtocolError::NoAnswer);
    };
    range_in(offset, chunk_len as u64 - 8, start, req_len)
}

/// An `OFFSET_HOLE` chunk's payload: the hole's place in the READ's buffer.
pub fn hole_range(payload: &[u8], expect: &Expect) -> Result<std::ops::Range<usize>, ProtocolError> {
    let Expect::Read { offset: start, len: req_len } = *expect else {
        return Err(ProtocolError::NoAnswer);
    };
    let offset = u64::from_be_bytes(payload[0..8].try_into().unwrap());
    let len = u32::from_be_bytes(payload[8..12].try_into().unwrap()) as u64;
    range_in(offset, len, start, req_len)
}

fn range_in(
    offset: u64,
    len: u64,
    start: u64,
    req_len: u32,
) -> Result<std::ops::Range<usize>, ProtocolError> {
    let out = || ProtocolError::ChunkOutOfRange { offset, len, start, req_len };
    let rel = offset.checked_sub(start).ok_or_else(out)?;
    let end = rel.checked_add(len).ok_or_else(out)?;
    if len == 0 || end > req_len as u64 {
        return Err(out());
    }
    Ok(rel as usize..end as usize)
}

/// One base:allocation descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub flags: u32,
}

impl Extent {
    /// Reads as zeros (a hole or zeroed storage): nothing to copy.
    pub fn zero(&self) -> bool {
        self.flags & STATE_ZERO != 0
    }
}

/// Decodes a `BLOCK_STATUS` chunk payload; the descriptors, trimmed to the
/// request (the spec lets the last one run past it) and never empty.
pub fn decode_block_status(payload: &[u8], expect: &Expect) -> Result<Vec<Extent>, ProtocolError> {
    let Expect::BlockStatus { len: req_len, context, .. } = *expect else {
        return Err(ProtocolError::NoAnswer);
    };
    let got = u32::from_be_bytes(payload[0..4].try_into().unwrap());
    if got != context {
        return Err(ProtocolError::WrongContext { got, want: context });
    }
    let mut left = req_len as u64;
    let mut out = Vec::with_capacity((payload.len() - 4) / 8);
    let mut described = 0u64;
    for d in payload[4..].chunks_exact(8) {
        let len = u32::from_be_bytes(d[0..4].try_into().unwrap()) as u64;
        let flags = u32::from_be_bytes(d[4..8].try_into().unwrap());
        described = described.saturating_add(len);
        if len == 0 || left == 0 {
            return Err(ProtocolError::BadBlockStatus { got: described, want: req_len });
        }
        let len = len.min(left);
        left -= len;
        match out.last_mut() {
            Some(Extent { len: l, flags: f }) if *f == flags => *l += len,
            _ => out.push(Extent { len, flags }),
        }
    }
    if out.is_empty() {
        return Err(ProtocolError::BadBlockStatus { got: 0, want: req_len });
    }
    Ok(out)
}

/// Decodes an error chunk payload: the errno and the server's message
/// (lossy UTF-8; the message is for people).
pub fn decode_error(payload: &[u8]) -> (u32, String) {
    let errno = u32::from_be_bytes(payload[0..4].try_into().unwrap());
    let n = u16::from_be_bytes([payload[4], payload[5]]) as usize;
    let msg = payload.get(6..6 + n).unwrap_or(&payload[6..]);
    (errno, String::from_utf8_lossy(msg).into_owned())
}

/// The usual name of an NBD errno, for messages.
pub fn errno_name(e: u32) -> &'static str {
    match e {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(kind: u16, len: u32, done: bool) -> ChunkHeader {
        ChunkHeader { flags: if done { REPLY_FLAG_DONE } else { 0 }, kind, handle: 7, len }
    }

    const READ: Expect = Expect::Read { offset: 4096, len: 8192 };
    const BS: Expect = Expect::BlockStatus { len: 1 << 20, context: 1, min_block: 512 };

    #[test]
    fn greeting_checks() {
        let mut g = [0u8; 18];
        g[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        g[16..18].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(decode_greeting(&g), Ok(3));
        g[17] = 2;
        assert_eq!(decode_greeting(&g), Err(ProtocolError::NotFixedNewstyle(2)));
        g[8] = 0;
        assert!(matches!(decode_greeting(&g), Err(ProtocolError::NotNewstyle(_))));
        g[0] = 0;
        assert!(matches!(decode_greeting(&g), Err(ProtocolError::BadGreeting(_))));
    }

    #[test]
    fn option_reply_caps_length_and_checks_option() {
        let mut b = [0u8; 20];
        b[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        b[12..16].copy_from_slice(&REP_ACK.to_be_bytes());
        assert_eq!(decode_option_reply(&b, OPT_GO), Ok(OptionReplyHeader { kind: REP_ACK, len: 0 }));
        assert_eq!(
            decode_option_reply(&b, OPT_INFO),
            Err(ProtocolError::WrongOption { sent: OPT_INFO, got: OPT_GO })
        );
        b[16..20].copy_from_slice(&(MAX_OPTION_REPLY + 1).to_be_bytes());
        assert_eq!(
            decode_option_reply(&b, OPT_GO),
            Err(ProtocolError::OptionReplyTooLong(MAX_OPTION_REPLY + 1))
        );
        b[0] ^= 1;
        assert!(matches!(decode_option_reply(&b, OPT_GO), Err(ProtocolError::BadOptionReplyMagic(_))));
    }

    #[test]
    fn info_decoding() {
        let mut e = INFO_EXPORT.to_be_bytes().to_vec();
        e.extend_from_slice(&(1u64 << 30).to_be_bytes());
        e.extend_from_slice(&TFLAG_HAS_FLAGS.to_be_bytes());
        assert_eq!(decode_info(&e), Ok(Info::Export { size: 1 << 30, flags: TFLAG_HAS_FLAGS }));
        assert!(decode_info(&e[..11]).is_err());
        let mut s = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [512u32, 4096, 32 << 20] {
            s.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(decode_info(&s), Ok(Info::BlockSize { min: 512, preferred: 4096, max: 32 << 20 }));
        s[2..6].copy_from_slice(&3u32.to_be_bytes()); // not a power of two
        assert!(decode_info(&s).is_err());
        assert_eq!(decode_info(&[0, 9, 1, 2]), Ok(Info::Other));
        assert!(decode_info(&[0]).is_err());
    }

    #[test]
    fn meta_context_names_base_allocation() {
        let mut d = 5u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"base:allocation");
        assert_eq!(decode_meta_context(&d), Ok(Some(5)));
        assert_eq!(decode_meta_context(&d[..8]), Ok(None));
        assert!(decode_meta_context(&d[..3]).is_err());
    }

    #[test]
    fn reply_headers() {
        assert_eq!(header_len(SIMPLE_REPLY_MAGIC.to_be_bytes()), Ok(16));
        assert_eq!(header_len(STRUCTURED_REPLY_MAGIC.to_be_bytes()), Ok(20));
        assert_eq!(header_len([1, 2, 3, 4]), Err(ProtocolError::BadReplyMagic(0x0102_0304)));
        let mut b = BytesMut::new();
        b.put_u32(STRUCTURED_REPLY_MAGIC);
        b.put_u16(REPLY_FLAG_DONE);
        b.put_u16(REPLY_TYPE_OFFSET_DATA);
        b.put_u64(9);
        b.put_u32(100);
        let h = decode_reply_header(&b).unwrap();
        assert_eq!(h, ReplyHeader::Chunk(ChunkHeader { flags: 1, kind: 1, handle: 9, len: 100 }));
        let mut s = BytesMut::new();
        s.put_u32(SIMPLE_REPLY_MAGIC);
        s.put_u32(28);
        s.put_u64(3);
        assert_eq!(decode_reply_header(&s), Ok(ReplyHeader::Simple { handle: 3, error: 28 }));
    }

    #[test]
    fn chunk_lengths_are_capped_by_the_request() {
        assert_eq!(check_chunk(&chunk(REPLY_TYPE_OFFSET_DATA, 8192 + 8, true), &READ), Ok(8200));
        assert!(check_chunk(&chunk(REPLY_TYPE_OFFSET_DATA, 8192 + 9, true), &READ).is_err());
        assert!(check_chunk(&chunk(REPLY_TYPE_OFFSET_DATA, 8, true), &READ).is_err());
        assert!(check_chunk(&chunk(REPLY_TYPE_OFFSET_DATA, u32::MAX, true), &READ).is_err());
        assert_eq!(check_chunk(&chunk(REPLY_TYPE_OFFSET_HOLE, 12, false), &READ), Ok(12));
        assert!(check_chunk(&chunk(REPLY_TYPE_OFFSET_HOLE, 13, false), &READ).is_err());
        // Data for a request that carries none.
        assert!(check_chunk(&chunk(REPLY_TYPE_OFFSET_DATA, 100, true), &Expect::Ack).is_err());
        assert!(check_chunk(&chunk(REPLY_TYPE_BLOCK_STATUS, 12, true), &READ).is_err());
        // NONE must be empty and final.
        assert_eq!(check_chunk(&chunk(REPLY_TYPE_NONE, 0, true), &Expect::Ack), Ok(0));
        assert!(check_chunk(&chunk(REPLY_TYPE_NONE, 0, false), &Expect::Ack).is_err());
        assert!(check_chunk(&chunk(REPLY_TYPE_NONE, 4, true), &Expect::Ack).is_err());
        // Errors: bounded.
        assert_eq!(check_chunk(&chunk(REPLY_TYPE_ERROR, 6, true), &Expect::Ack), Ok(6));
        assert!(check_chunk(&chunk(REPLY_TYPE_ERROR, 5, true), &Expect::Ack).is_err());
        assert!(check_chunk(&chunk(REPLY_TYPE_ERROR, MAX_ERROR_CHUNK + 1, true), &Expect::Ack).is_err());
        // Block status: whole descriptors, at most one per 512 bytes.
        assert_eq!(check_chunk(&chunk(REPLY_TYPE_BLOCK_STATUS, 12, true), &BS), Ok(12));
        assert!(check_chunk(&chunk(REPLY_TYPE_BLOCK_STATUS, 13, true), &BS).is_err());
        assert!(check_chunk(&chunk(REPLY_TYPE_BLOCK_STATUS, 4, true), &BS).is_err());
        let cap = 4 + 8 * 2048;
        assert_eq!(check_chunk(&chunk(REPLY_TYPE_BLOCK_STATUS, cap, true), &BS), Ok(cap as usize));
        assert!(check_chunk(&chunk(REPLY_TYPE_BLOCK_STATUS, cap + 8, true), &BS).is_err());
    }

    #[test]
    fn data_and_holes_must_lie_inside_the_request() {
        assert_eq!(data_range(4096, 8 + 4096, &READ), Ok(0..4096));
        assert_eq!(data_range(8192, 8 + 4096, &READ), Ok(4096..8192));
        assert!(data_range(8192, 8 + 4097, &READ).is_err());
        assert!(data_range(0, 8 + 512, &READ).is_err());
        assert!(data_range(u64::MAX, 8 + 512, &READ).is_err());
        let hole = |off: u64, len: u32| {
            let mut p = off.to_be_bytes().to_vec();
            p.extend_from_slice(&len.to_be_bytes());
            p
        };
        assert_eq!(hole_range(&hole(4096, 8192), &READ), Ok(0..8192));
        assert!(hole_range(&hole(4096, 8193), &READ).is_err());
        assert!(hole_range(&hole(4096, 0), &READ).is_err());
        assert!(hole_range(&hole(u64::MAX - 1, 8), &READ).is_err());
    }

    #[test]
    fn block_status_descriptors() {
        let enc = |ctx: u32, d: &[(u32, u32)]| {
            let mut p = ctx.to_be_bytes().to_vec();
            for (l, f) in d {
                p.extend_from_slice(&l.to_be_bytes());
                p.extend_from_slice(&f.to_be_bytes());
            }
            p
        };
        let bs = Expect::BlockStatus { len: 8192, context: 1, min_block: 512 };
        assert_eq!(
            decode_block_status(&enc(1, &[(4096, 0), (8192, 3)]), &bs),
            Ok(vec![Extent { len: 4096, flags: 0 }, Extent { len: 4096, flags: 3 }])
        );
        // Same flags merge.
        assert_eq!(
            decode_block_status(&enc(1, &[(512, 3), (512, 3)]), &bs),
            Ok(vec![Extent { len: 1024, flags: 3 }])
        );
        assert_eq!(
            decode_block_status(&enc(2, &[(512, 3)]), &bs),
            Err(ProtocolError::WrongContext { got: 2, want: 1 })
        );
        assert!(decode_block_status(&enc(1, &[(0, 3)]), &bs).is_err());
        // A descriptor after the request is covered.
        assert!(decode_block_status(&enc(1, &[(8192, 0), (512, 3)]), &bs).is_err());
    }

    #[test]
    fn error_chunk_message_is_bounded_by_the_chunk() {
        let mut p = 28u32.to_be_bytes().to_vec();
        p.extend_from_slice(&100u16.to_be_bytes());
        p.extend_from_slice(b"full");
        assert_eq!(decode_error(&p), (28, "full".into()));
        assert_eq!(errno_name(28), "ENOSPC");
    }
}
