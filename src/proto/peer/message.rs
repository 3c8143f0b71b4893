//! Message kinds and their bodies.
//!
//! Every body is fixed little-endian fields, then (for the kinds that carry
//! one) the raw data to the end of the payload: no length prefix for the
//! data, the frame's payload length bounds it. Text is a u16 length and
//! UTF-8 bytes, at most [`MAX_TEXT`]. Every data message carries an
//! [`ExtentTarget`]: (volume, extent, epoch, owner generation), which a
//! replica checks before it applies anything.
//!
//! ```text
//! Hello, HelloAck     version u16, cluster id u128, node id u64
//! Refused             code u16, text
//! Error               code u16, text
//! Ping, Pong          (empty)
//! Raft                a protobuf-encoded raft-rs Message, opaque here
//! MetaRequest/-Resp.  opaque bytes the metadata layer defines
//! target              volume u64, extent u64, epoch u64, generation u64
//! ExtentWrite         target, offset u64, flags u32 (FUA, COPY), data
//! ExtentRead          target, offset u64, len u32
//! ExtentReadReply     flags u32 (CRCS), [block size u32, count u32,
//!                     count x crc32c u32], data
//! ExtentWriteZeroes   target, offset u64, len u64, flags u32 (FUA, DEALLOCATE)
//! ExtentTrim          target, offset u64, len u64, flags u32 (FUA)
//! ExtentFlush         target, flush number u64
//! ExtentStatus        target
//! ExtentStatusReply   flush number u64, generation u64, epoch u64,
//!                     flags u32 (EXISTS), region size u32, count u32,
//!                     count x dirty region index u32 (strictly increasing)
//! ExtentOk            (empty)
//! ExtentErr           code u16, current u64 (epoch or generation), text
//! ExtentCrcs          target, offset u64, len u64
//! ExtentCrcsReply     block size u32, count u32, count x crc32c u32
//! ExtentMap           target, offset u64, len u64
//! ExtentMapReply      count u32 (at most MAX_MAP_EXTENTS), count x
//!                     (len u64, flags u32 (ALLOCATED, ZERO))
//! ExtentsDirty        volume u64, generation u64, from extent u64
//! ExtentsDirtyReply   flags u32 (MORE), count u32 (at most
//!                     MAX_DIRTY_EXTENTS), count x extent u64 (strictly
//!                     increasing, each at least the request's from)
//! ```
//!
//! Volume-level requests (forwarded by a node that does not own the volume
//! to its owner; see [`VolumeTarget`]):
//!
//! ```text
//! vtarget             volume u64, generation u64
//! VolumeRead          vtarget, offset u64, len u32
//! VolumeWrite         vtarget, offset u64, flags u32 (FUA, ANY_BYTE), data
//! VolumeWriteZeroes   vtarget, offset u64, len u64, flags u32 (FUA,
//!                     DEALLOCATE, ANY_BYTE)
//! VolumeTrim          vtarget, offset u64, len u64, flags u32 (FUA)
//! VolumeFlush         vtarget
//! VolumeBlockStatus   vtarget, offset u64, len u64
//! VolumeCompareAndWrite vtarget, offset u64, flags u32 (FUA), buf (the
//!                     bytes to compare, then as many to write)
//! VolumeReadReply     count u32 (at most MAX_READ_RUNS), count x run u32
//!                     (bit 31: hole, bits 0-30: length, never 0), then
//!                     the data of the non-hole runs in order
//! VolumeMapReply      count u32 (at most MAX_MAP_EXTENTS), count x
//!                     (len u64, flags u32 (ALLOCATED, ZERO))
//! VolumeCawReply      flags u32 (MISCOMPARE), offset u64 (0 without it)
//! VolumeOk            (empty)
//! VolumeErr           code u16, a u64, b u64, c u64 (per code, 0 where
//!                     unused), text
//! ```
//!
//! COPY (bit 1 of an ExtentWrite's flags) marks a piece of a whole-extent
//! copy at reconciliation, sent to a replica that reported it does not hold
//! the extent. The first piece creates the extent marked incomplete; the
//! replica then reports it absent and serves no read of it, until a COPY
//! piece with FUA (the last) has made the whole copy durable and cleared
//! the mark. A COPY piece for an extent the replica holds complete is
//! refused (`Io`). So a copy cut short by a crash is never taken for a
//! replica, nor as the source of the next reconciliation. COPY was added
//! before any release spoke V1, so V1 carries it.
//!
//! ANY_BYTE (bit 1 of a VolumeWrite's flags, bit 2 of a VolumeWriteZeroes')
//! says the request comes from a client held to no block size: the owner
//! runs it as `Volume::write_unaligned` / `write_zeroes_unaligned` (a
//! read-modify-write of the partial sectors under its exclusive hold), so
//! the offset and length may be any byte. Without it they must be whole
//! sectors, as for a client of the owner's own. ANY_BYTE, `ExtentMap` and
//! `ExtentMapReply` were added before any release spoke V1, so V1 carries
//! them (as it does `ErrorCode::Forbidden`).
//!
//! `ExtentsDirty` asks a replica which extents of a volume it holds that
//! may carry a write no flush covered (dirty regions, or a crash record
//! awaiting reconciliation), from one extent index on: a new owner's first
//! FLUSH reconciles and flushes those, so it covers what its predecessors
//! acknowledged. It passes the volume's fence as a status request does (a
//! newer generation is persisted first, and waits for an older owner's
//! writes still landing). Added before any release spoke V1, with its reply.

use super::frame::{MAX_DATA, ProtocolVersion};
use crate::types::{
    BlockState, ClusterId, Epoch, ExtentIndex, Generation, MapExtent, NodeId, ReadChunk, VolumeId,
};
use bytes::{BufMut, Bytes, BytesMut};

/// Longest text (reasons, error messages) a body carries; longer text is
/// cut at a character boundary when encoded.
pub const MAX_TEXT: usize = 1024;

/// What a frame carries. The numbers are wire values: never reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Kind {
    Hello = 1,
    HelloAck = 2,
    Refused = 3,
    Ping = 4,
    Pong = 5,
    Error = 6,
    Raft = 16,
    MetaRequest = 17,
    MetaResponse = 18,
    ExtentWrite = 32,
    ExtentRead = 33,
    ExtentReadReply = 34,
    ExtentWriteZeroes = 35,
    ExtentTrim = 36,
    ExtentFlush = 37,
    ExtentStatus = 38,
    ExtentStatusReply = 39,
    ExtentOk = 40,
    ExtentErr = 41,
    ExtentCrcs = 42,
    ExtentCrcsReply = 43,
    ExtentMap = 44,
    ExtentMapReply = 45,
    ExtentsDirty = 46,
    ExtentsDirtyReply = 47,
    // --- volume-level forwarding (64..=75) ---
    VolumeRead = 64,
    VolumeWrite = 65,
    VolumeWriteZeroes = 66,
    VolumeTrim = 67,
    VolumeFlush = 68,
    VolumeBlockStatus = 69,
    VolumeCompareAndWrite = 70,
    VolumeReadReply = 71,
    VolumeMapReply = 72,
    VolumeCawReply = 73,
    VolumeOk = 74,
    VolumeErr = 75,
    // --- end of volume-level forwarding ---
}

impl Kind {
    pub const ALL: [Kind; 37] = [
        Kind::Hello,
        Kind::HelloAck,
        Kind::Refused,
        Kind::Ping,
        Kind::Pong,
        Kind::Error,
        Kind::Raft,
        Kind::MetaRequest,
        Kind::MetaResponse,
        Kind::ExtentWrite,
        Kind::ExtentRead,
        Kind::ExtentReadReply,
        Kind::ExtentWriteZeroes,
        Kind::ExtentTrim,
        Kind::ExtentFlush,
        Kind::ExtentStatus,
        Kind::ExtentStatusReply,
        Kind::ExtentOk,
        Kind::ExtentErr,
        Kind::ExtentCrcs,
        Kind::ExtentCrcsReply,
        Kind::ExtentMap,
        Kind::ExtentMapReply,
        Kind::ExtentsDirty,
        Kind::ExtentsDirtyReply,
        // --- volume-level forwarding ---
        Kind::VolumeRead,
        Kind::VolumeWrite,
        Kind::VolumeWriteZeroes,
        Kind::VolumeTrim,
        Kind::VolumeFlush,
        Kind::VolumeBlockStatus,
        Kind::VolumeCompareAndWrite,
        Kind::VolumeReadReply,
        Kind::VolumeMapReply,
        Kind::VolumeCawReply,
        Kind::VolumeOk,
        Kind::VolumeErr,
        // --- end of volume-level forwarding ---
    ];

    pub fn from_u16(v: u16) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u16 == v)
    }

    /// A reply (or a handshake answer): never sent as a request.
    pub fn is_reply(self) -> bool {
        matches!(
            self,
            Kind::HelloAck
                | Kind::Refused
                | Kind::Pong
                | Kind::Error
                | Kind::MetaResponse
                | Kind::ExtentReadReply
                | Kind::ExtentStatusReply
                | Kind::ExtentOk
                | Kind::ExtentErr
                | Kind::ExtentCrcsReply
                | Kind::ExtentMapReply
                | Kind::ExtentsDirtyReply
                // --- volume-level forwarding ---
                | Kind::VolumeReadReply
                | Kind::VolumeMapReply
                | Kind::VolumeCawReply
                | Kind::VolumeOk
                | Kind::VolumeErr
        )
    }
}

/// Why a payload is not a valid body of its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("body ends inside field {field} ({have} of {need} bytes)")]
    Truncated { field: &'static str, need: usize, have: usize },
    #[error("{extra} bytes after the last field")]
    TrailingBytes { extra: usize },
    #[error("field {field} = {value} is invalid: {why}")]
    InvalidField { field: &'static str, value: u64, why: &'static str },
    #[error("field {field} is not UTF-8")]
    BadUtf8 { field: &'static str },
}

/// (volume, extent, epoch, owner generation): which extent replica a data
/// message is for, and the replica-set epoch and owner generation the
/// sender believes current. A replica refuses older ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExtentTarget {
    pub volume: VolumeId,
    pub extent: ExtentIndex,
    pub epoch: Epoch,
    pub generation: Generation,
}

/// The first frame on a connection, from the connecting node; the server
/// answers with its own as `HelloAck`, or with `Refused`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub version: ProtocolVersion,
    pub cluster: ClusterId,
    pub node: NodeId,
}

/// Why a server refused a connection at `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum RefuseCode {
    VersionMismatch = 1,
    WrongCluster = 2,
    ExpectedHello = 3,
    Malformed = 4,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: RefuseCode,
    pub message: String,
}

/// A transport-level error answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The frame could not be decoded; the connection closes after this.
    Malformed = 1,
    /// A reply kind arrived as a request.
    Unexpected = 2,
    /// This node does not serve that kind of request.
    Unsupported = 3,
    /// The handler failed without a more specific answer.
    Internal = 4,
    /// The node is shutting down.
    ShuttingDown = 5,
    /// The sender may not send this: the message names a sender other
    /// than the node its `Hello` named, or that node is not a member of
    /// the cluster. (Added before any release spoke V1, so V1 carries it.)
    Forbidden = 6,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentWrite {
    pub target: ExtentTarget,
    pub offset: u64,
    /// Durable on the replica before it answers.
    pub fua: bool,
    /// A piece of a whole-extent copy (see the module docs).
    pub copy: bool,
    pub data: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentRead {
    pub target: ExtentTarget,
    pub offset: u64,
    pub len: u32,
}

/// crc32c of each `block_size` block of a read's data (the last may be short).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockCrcs {
    pub block_size: u32,
    pub crcs: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentReadReply {
    pub crcs: Option<BlockCrcs>,
    pub data: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentWriteZeroes {
    pub target: ExtentTarget,
    pub offset: u64,
    pub len: u64,
    /// The replica may free the range instead of writing zeros.
    pub deallocate: bool,
    pub fua: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentTrim {
    pub target: ExtentTarget,
    pub offset: u64,
    pub len: u64,
    pub fua: bool,
}

/// Makes every write the replica acknowledged for the extent durable, and
/// records `flush_number` (the owner's count of flushes) with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentFlush {
    pub target: ExtentTarget,
    pub flush_number: u64,
}

/// What a replica reports for reconciliation (owner takeover): whether it
/// holds the extent, its flush count, the highest owner generation it has
/// seen for the volume, the epoch it knows, and the regions that may hold
/// a write no flush covered (every region whose dirty bit is durably set:
/// a superset of the regions written since the last flush, so copying
/// those regions from one replica to the others makes them identical).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentState {
    /// The replica has the extent (it was written at least once). When
    /// false, `flush_number` and `region_size` are 0 and no region is dirty.
    pub exists: bool,
    /// Flushes the replica completed on this extent (its own count).
    pub flush_number: u64,
    pub generation: Generation,
    pub epoch: Epoch,
    /// Bytes per dirty region: a power of two of at least 4 KiB (0 when
    /// the extent does not exist).
    pub region_size: u32,
    /// Indexes of the dirty regions, strictly increasing.
    pub dirty_regions: Vec<u32>,
}

impl ExtentState {
    /// The state of an extent the replica does not hold.
    pub fn absent(generation: Generation, epoch: Epoch) -> ExtentState {
        ExtentState {
            exists: false,
            flush_number: 0,
            generation,
            epoch,
            region_size: 0,
            dirty_regions: Vec::new(),
        }
    }

    /// May hold a write no flush covered.
    pub fn dirty(&self) -> bool {
        !self.dirty_regions.is_empty()
    }

    /// The dirty regions as byte ranges (offset, len) inside the extent;
    /// the last may reach past the extent's end (callers clip).
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let size = u64::from(self.region_size);
        self.dirty_regions.iter().map(|&r| (u64::from(r) * size, size)).collect()
    }
}

/// Asks a replica for the stored crc32c of every block of a range, without
/// reading the data (`basalt volume verify` compares replicas with it).
/// A block never written, trimmed or zeroed reports the crc32c of a block
/// of zeros, so a hole and a block written with zeros compare equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentCrcs {
    pub target: ExtentTarget,
    pub offset: u64,
    pub len: u64,
}

/// Longest range one [`ExtentCrcs`] may ask for.
pub const MAX_CRCS_RANGE: u64 = 4 << 30;
/// Most crcs one reply carries (4 MiB of them).
pub const MAX_CRC_COUNT: usize = 1 << 20;
/// Most dirty regions one [`ExtentState`] lists (an extent header holds
/// at most 31,744).
pub const MAX_DIRTY_REGIONS: usize = 1 << 16;

/// Asks a replica for the allocation map of a range of its extent (the
/// owner's answer to BLOCK_STATUS and GET LBA STATUS on a replicated
/// volume). Answered with an `ExtentMapReply` of at most
/// [`MAX_MAP_EXTENTS`] runs covering a prefix of the range; an extent the
/// replica never created is one hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentMap {
    pub target: ExtentTarget,
    pub offset: u64,
    pub len: u64,
}

/// Asks a replica for the extents of `volume` it holds that may carry a
/// write no flush covered, in index order from `from` (see the module
/// docs). Answered with an `ExtentsDirtyReply`, or an `ExtentErr`
/// (`StaleGeneration`, `NotFound` for a volume the node does not know).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentsDirty {
    pub volume: VolumeId,
    pub generation: Generation,
    pub from: ExtentIndex,
}

/// Most extents one [`DirtyExtents`] lists; `more` says to ask again from
/// after the last.
pub const MAX_DIRTY_EXTENTS: usize = 1 << 14;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyExtents {
    /// Strictly increasing, at most [`MAX_DIRTY_EXTENTS`].
    pub extents: Vec<ExtentIndex>,
    /// The list stopped at the cap: more may follow the last one.
    pub more: bool,
}

/// Why a replica did not apply a data request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentError {
    /// The request's epoch is older than the replica's.
    StaleEpoch { current: Epoch },
    /// The request's owner generation is older than one the replica has seen.
    StaleGeneration { current: Generation },
    /// The replica holds no such extent.
    NotFound,
    /// The range is outside the extent.
    OutOfRange,
    /// The replica's disk failed.
    Io,
    /// Stored data failed its checksum.
    Checksum,
    /// An offset or length is not a multiple of the sector size (512 bytes;
    /// a block, 4096, for [`ExtentCrcs`]).
    Misaligned,
    /// The replica's disk is full.
    NoSpace,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentErr {
    pub error: ExtentError,
    pub message: String,
}

/// One message of the peer protocol. Data payloads are `Bytes` that share
/// the receive buffer (or the sender's buffer): never copied by the codec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    HelloAck(Hello),
    Refused(Refused),
    Ping,
    Pong,
    Error(ErrorReply),
    /// A protobuf-encoded raft-rs `Message`.
    Raft(Bytes),
    MetaRequest(Bytes),
    MetaResponse(Bytes),
    ExtentWrite(ExtentWrite),
    ExtentRead(ExtentRead),
    ExtentReadReply(ExtentReadReply),
    ExtentWriteZeroes(ExtentWriteZeroes),
    ExtentTrim(ExtentTrim),
    ExtentFlush(ExtentFlush),
    ExtentStatus(ExtentTarget),
    ExtentStatusReply(ExtentState),
    ExtentOk,
    ExtentErr(ExtentErr),
    ExtentCrcs(ExtentCrcs),
    ExtentCrcsReply(BlockCrcs),
    ExtentMap(ExtentMap),
    /// Runs in order from the request's offset, at most [`MAX_MAP_EXTENTS`].
    ExtentMapReply(Vec<MapExtent>),
    ExtentsDirty(ExtentsDirty),
    ExtentsDirtyReply(DirtyExtents),
    // --- volume-level forwarding ---
    VolumeRead(VolumeRead),
    VolumeWrite(VolumeWrite),
    VolumeWriteZeroes(VolumeWriteZeroes),
    VolumeTrim(VolumeTrim),
    VolumeFlush(VolumeTarget),
    VolumeBlockStatus(VolumeBlockStatus),
    VolumeCompareAndWrite(VolumeCompareAndWrite),
    VolumeReadReply(VolumeReadReply),
    VolumeMapReply(VolumeMapReply),
    VolumeCawReply(VolumeCawReply),
    VolumeOk,
    VolumeErr(VolumeErr),
    // --- end of volume-level forwarding ---
}

const TARGET_LEN: usize = 32;
const WRITE_FUA: u32 = 1;
const WRITE_COPY: u32 = 2;
const ZEROES_FUA: u32 = 1;
const ZEROES_DEALLOCATE: u32 = 2;
/// Volume-level only (see the module docs).
const WRITE_ANY_BYTE: u32 = 2;
const ZEROES_ANY_BYTE: u32 = 4;
const TRIM_FUA: u32 = 1;
const READ_REPLY_CRCS: u32 = 1;
const STATUS_EXISTS: u32 = 1;
const DIRTY_MORE: u32 = 1;
const MIN_REGION: u32 = 4096;
const MIN_CRC_BLOCK: u32 = 512;

fn text_len(s: &str) -> usize {
    2 + clip(s).len()
}

/// `s` cut to at most [`MAX_TEXT`] bytes at a character boundary.
fn clip(s: &str) -> &str {
    if s.len() <= MAX_TEXT {
        return s;
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_text(out: &mut BytesMut, s: &str) {
    let s = clip(s);
    out.put_u16_le(s.len() as u16);
    out.put_slice(s.as_bytes());
}

fn put_target(out: &mut BytesMut, t: &ExtentTarget) {
    out.put_u64_le(t.volume.0);
    out.put_u64_le(t.extent.0);
    out.put_u64_le(t.epoch.0);
    out.put_u64_le(t.generation.0);
}

fn flag(on: bool, bit: u32) -> u32 {
    if on { bit } else { 0 }
}

impl ExtentError {
    fn wire(self) -> (u16, u64) {
        match self {
            ExtentError::StaleEpoch { current } => (1, current.0),
            ExtentError::StaleGeneration { current } => (2, current.0),
            ExtentError::NotFound => (3, 0),
            ExtentError::OutOfRange => (4, 0),
            ExtentError::Io => (5, 0),
            ExtentError::Checksum => (6, 0),
            ExtentError::Misaligned => (7, 0),
            ExtentError::NoSpace => (8, 0),
        }
    }

    fn from_wire(code: u16, current: u64) -> Option<ExtentError> {
        Some(match code {
            1 => ExtentError::StaleEpoch { current: Epoch(current) },
            2 => ExtentError::StaleGeneration { current: Generation(current) },
            3 => ExtentError::NotFound,
            4 => ExtentError::OutOfRange,
            5 => ExtentError::Io,
            6 => ExtentError::Checksum,
            7 => ExtentError::Misaligned,
            8 => ExtentError::NoSpace,
            _ => return None,
        })
    }
}

impl RefuseCode {
    fn from_u16(v: u16) -> Option<RefuseCode> {
        [
            RefuseCode::VersionMismatch,
            RefuseCode::WrongCluster,
            RefuseCode::ExpectedHello,
            RefuseCode::Malformed,
        ]
        .into_iter()
        .find(|c| *c as u16 == v)
    }
}

impl ErrorCode {
    fn from_u16(v: u16) -> Option<ErrorCode> {
        [
            ErrorCode::Malformed,
            ErrorCode::Unexpected,
            ErrorCode::Unsupported,
            ErrorCode::Internal,
            ErrorCode::ShuttingDown,
            ErrorCode::Forbidden,
        ]
        .into_iter()
        .find(|c| *c as u16 == v)
    }
}

impl Message {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::HelloAck(_) => Kind::HelloAck,
            Message::Refused(_) => Kind::Refused,
            Message::Ping => Kind::Ping,
            Message::Pong => Kind::Pong,
            Message::Error(_) => Kind::Error,
            Message::Raft(_) => Kind::Raft,
            Message::MetaRequest(_) => Kind::MetaRequest,
            Message::MetaResponse(_) => Kind::MetaResponse,
            Message::ExtentWrite(_) => Kind::ExtentWrite,
            Message::ExtentRead(_) => Kind::ExtentRead,
            Message::ExtentReadReply(_) => Kind::ExtentReadReply,
            Message::ExtentWriteZeroes(_) => Kind::ExtentWriteZeroes,
            Message::ExtentTrim(_) => Kind::ExtentTrim,
            Message::ExtentFlush(_) => Kind::ExtentFlush,
            Message::ExtentStatus(_) => Kind::ExtentStatus,
            Message::ExtentStatusReply(_) => Kind::ExtentStatusReply,
            Message::ExtentOk => Kind::ExtentOk,
            Message::ExtentErr(_) => Kind::ExtentErr,
            Message::ExtentCrcs(_) => Kind::ExtentCrcs,
            Message::ExtentCrcsReply(_) => Kind::ExtentCrcsReply,
            Message::ExtentMap(_) => Kind::ExtentMap,
            Message::ExtentMapReply(_) => Kind::ExtentMapReply,
            Message::ExtentsDirty(_) => Kind::ExtentsDirty,
            Message::ExtentsDirtyReply(_) => Kind::ExtentsDirtyReply,
            // --- volume-level forwarding ---
            Message::VolumeRead(_) => Kind::VolumeRead,
            Message::VolumeWrite(_) => Kind::VolumeWrite,
            Message::VolumeWriteZeroes(_) => Kind::VolumeWriteZeroes,
            Message::VolumeTrim(_) => Kind::VolumeTrim,
            Message::VolumeFlush(_) => Kind::VolumeFlush,
            Message::VolumeBlockStatus(_) => Kind::VolumeBlockStatus,
            Message::VolumeCompareAndWrite(_) => Kind::VolumeCompareAndWrite,
            Message::VolumeReadReply(_) => Kind::VolumeReadReply,
            Message::VolumeMapReply(_) => Kind::VolumeMapReply,
            Message::VolumeCawReply(_) => Kind::VolumeCawReply,
            Message::VolumeOk => Kind::VolumeOk,
            Message::VolumeErr(_) => Kind::VolumeErr,
        }
    }

    /// A transport-level error answer.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Message {
        Message::Error(ErrorReply { code, message: message.into() })
    }

    /// The raw data that follows the fixed fields, if this kind has any
    /// as one buffer (a `VolumeReadReply` has several: [`Self::data_parts`]).
    pub fn data(&self) -> Option<&Bytes> {
        match self {
            Message::Raft(b) | Message::MetaRequest(b) | Message::MetaResponse(b) => Some(b),
            Message::ExtentWrite(w) => Some(&w.data),
            Message::ExtentReadReply(r) => Some(&r.data),
            Message::VolumeWrite(w) => Some(&w.data),
            Message::VolumeCompareAndWrite(c) => Some(&c.buf),
            _ => None,
        }
    }

    /// The raw data that follows the fixed fields, in wire order, as the
    /// buffers it is held in (each sent as it is, never copied together).
    pub fn data_parts(&self) -> impl Iterator<Item = &Bytes> {
        let chunks: &[ReadChunk] = match self {
            Message::VolumeReadReply(r) => &r.chunks,
            _ => &[],
        };
        let chunk_data = chunks.iter().filter_map(|c| match c {
            ReadChunk::Data(b) => Some(b),
            ReadChunk::Hole(_) => None,
        });
        self.data().into_iter().chain(chunk_data)
    }

    /// Bytes of the fixed fields (everything but [`Self::data`]).
    pub fn fields_len(&self) -> usize {
        match self {
            Message::Hello(_) | Message::HelloAck(_) => 2 + 16 + 8,
            Message::Refused(r) => 2 + text_len(&r.message),
            Message::Error(e) => 2 + text_len(&e.message),
            Message::Ping | Message::Pong | Message::ExtentOk => 0,
            Message::Raft(_) | Message::MetaRequest(_) | Message::MetaResponse(_) => 0,
            Message::ExtentWrite(_) => TARGET_LEN + 8 + 4,
            Message::ExtentRead(_) => TARGET_LEN + 8 + 4,
            Message::ExtentReadReply(r) => 4 + r.crcs.as_ref().map_or(0, |c| 8 + 4 * c.crcs.len()),
            Message::ExtentWriteZeroes(_) | Message::ExtentTrim(_) => TARGET_LEN + 8 + 8 + 4,
            Message::ExtentFlush(_) => TARGET_LEN + 8,
            Message::ExtentStatus(_) => TARGET_LEN,
            Message::ExtentStatusReply(s) => 8 + 8 + 8 + 4 + 4 + 4 + 4 * s.dirty_regions.len(),
            Message::ExtentErr(e) => 2 + 8 + text_len(&e.message),
            Message::ExtentCrcs(_) => TARGET_LEN + 8 + 8,
            Message::ExtentCrcsReply(c) => 4 + 4 + 4 * c.crcs.len(),
            Message::ExtentMap(_) => TARGET_LEN + 8 + 8,
            Message::ExtentMapReply(m) => 4 + MAP_EXTENT_LEN * m.len(),
            Message::ExtentsDirty(_) => 8 + 8 + 8,
            Message::ExtentsDirtyReply(d) => 4 + 4 + 8 * d.extents.len(),
            m @ (Message::VolumeRead(_)
            | Message::VolumeWrite(_)
            | Message::VolumeWriteZeroes(_)
            | Message::VolumeTrim(_)
            | Message::VolumeFlush(_)
            | Message::VolumeBlockStatus(_)
            | Message::VolumeCompareAndWrite(_)
            | Message::VolumeReadReply(_)
            | Message::VolumeMapReply(_)
            | Message::VolumeCawReply(_)
            | Message::VolumeOk
            | Message::VolumeErr(_)) => volume_fields_len(m),
        }
    }

    /// The whole payload length of this message's frame.
    pub fn body_len(&self) -> usize {
        self.fields_len() + self.data_parts().map(Bytes::len).sum::<usize>()
    }

    /// Bytes the answer to this request may take, beyond a small reply: the
    /// data of a read. A sender reserves room for it before sending.
    pub fn reply_hint(&self) -> usize {
        match self {
            Message::ExtentRead(r) => r.len as usize,
            // At most one crc per 512 bytes, and never more than a reply carries.
            Message::ExtentCrcs(c) => {
                (c.len.div_ceil(u64::from(MIN_CRC_BLOCK)).min(MAX_CRC_COUNT as u64) * 4) as usize
            }
            Message::ExtentStatus(_) => 4 * MAX_DIRTY_REGIONS,
            Message::ExtentsDirty(_) => 8 * MAX_DIRTY_EXTENTS,
            Message::ExtentMap(m) => map_reply_hint(m.len),
            Message::VolumeRead(r) => r.len as usize,
            Message::VolumeBlockStatus(b) => map_reply_hint(b.len),
            _ => 0,
        }
    }

    /// Appends the fixed fields (not [`Self::data`]).
    pub fn encode_fields(&self, out: &mut BytesMut) {
        match self {
            Message::Hello(h) | Message::HelloAck(h) => {
                out.put_u16_le(h.version.as_u16());
                out.put_u128_le(h.cluster.0);
                out.put_u64_le(h.node.0);
            }
            Message::Refused(r) => {
                out.put_u16_le(r.code as u16);
                put_text(out, &r.message);
            }
            Message::Error(e) => {
                out.put_u16_le(e.code as u16);
                put_text(out, &e.message);
            }
            Message::Ping
            | Message::Pong
            | Message::ExtentOk
            | Message::Raft(_)
            | Message::MetaRequest(_)
            | Message::MetaResponse(_) => {}
            Message::ExtentWrite(w) => {
                put_target(out, &w.target);
                out.put_u64_le(w.offset);
                out.put_u32_le(flag(w.fua, WRITE_FUA) | flag(w.copy, WRITE_COPY));
            }
            Message::ExtentRead(r) => {
                put_target(out, &r.target);
                out.put_u64_le(r.offset);
                out.put_u32_le(r.len);
            }
            Message::ExtentReadReply(r) => {
                out.put_u32_le(flag(r.crcs.is_some(), READ_REPLY_CRCS));
                if let Some(c) = &r.crcs {
                    out.put_u32_le(c.block_size);
                    out.put_u32_le(c.crcs.len() as u32);
                    for crc in &c.crcs {
                        out.put_u32_le(*crc);
                    }
                }
            }
            Message::ExtentWriteZeroes(z) => {
                put_target(out, &z.target);
                out.put_u64_le(z.offset);
                out.put_u64_le(z.len);
                out.put_u32_le(flag(z.fua, ZEROES_FUA) | flag(z.deallocate, ZEROES_DEALLOCATE));
            }
            Message::ExtentTrim(t) => {
                put_target(out, &t.target);
                out.put_u64_le(t.offset);
                out.put_u64_le(t.len);
                out.put_u32_le(flag(t.fua, TRIM_FUA));
            }
            Message::ExtentFlush(f) => {
                put_target(out, &f.target);
                out.put_u64_le(f.flush_number);
            }
            Message::ExtentStatus(t) => put_target(out, t),
            Message::ExtentStatusReply(s) => {
                out.put_u64_le(s.flush_number);
                out.put_u64_le(s.generation.0);
                out.put_u64_le(s.epoch.0);
                out.put_u32_le(flag(s.exists, STATUS_EXISTS));
                out.put_u32_le(s.region_size);
                out.put_u32_le(s.dirty_regions.len() as u32);
                for r in &s.dirty_regions {
                    out.put_u32_le(*r);
                }
            }
            Message::ExtentErr(e) => {
                let (code, current) = e.error.wire();
                out.put_u16_le(code);
                out.put_u64_le(current);
                put_text(out, &e.message);
            }
            Message::ExtentCrcs(c) => {
                put_target(out, &c.target);
                out.put_u64_le(c.offset);
                out.put_u64_le(c.len);
            }
            Message::ExtentCrcsReply(c) => {
                out.put_u32_le(c.block_size);
                out.put_u32_le(c.crcs.len() as u32);
                for crc in &c.crcs {
                    out.put_u32_le(*crc);
                }
            }
            Message::ExtentMap(m) => {
                put_target(out, &m.target);
                out.put_u64_le(m.offset);
                out.put_u64_le(m.len);
            }
            Message::ExtentMapReply(m) => put_map(out, m),
            Message::ExtentsDirty(q) => {
                out.put_u64_le(q.volume.0);
                out.put_u64_le(q.generation.0);
                out.put_u64_le(q.from.0);
            }
            Message::ExtentsDirtyReply(d) => {
                out.put_u32_le(flag(d.more, DIRTY_MORE));
                out.put_u32_le(d.extents.len() as u32);
                for e in &d.extents {
                    out.put_u64_le(e.0);
                }
            }
            m @ (Message::VolumeRead(_)
            | Message::VolumeWrite(_)
            | Message::VolumeWriteZeroes(_)
            | Message::VolumeTrim(_)
            | Message::VolumeFlush(_)
            | Message::VolumeBlockStatus(_)
            | Message::VolumeCompareAndWrite(_)
            | Message::VolumeReadReply(_)
            | Message::VolumeMapReply(_)
            | Message::VolumeCawReply(_)
            | Message::VolumeOk
            | Message::VolumeErr(_)) => encode_volume_fields(m, out),
        }
    }

    /// Parses a payload of `kind`. Data fields are slices of `payload`.
    pub fn decode(kind: Kind, payload: Bytes) -> Result<Message, BodyError> {
        let mut f = Fields { b: &payload, at: 0 };
        let msg = match kind {
            Kind::Hello | Kind::HelloAck => {
                let v = f.u16("version")?;
                let version = ProtocolVersion::from_u16(v).ok_or(BodyError::InvalidField {
                    field: "version",
                    value: v.into(),
                    why: "unknown protocol version",
                })?;
                let h =
                    Hello { version, cluster: ClusterId(f.u128("cluster")?), node: NodeId(f.u64("node")?) };
                if kind == Kind::Hello { Message::Hello(h) } else { Message::HelloAck(h) }
            }
            Kind::Refused => {
                let v = f.u16("code")?;
                let code = RefuseCode::from_u16(v).ok_or(BodyError::InvalidField {
                    field: "code",
                    value: v.into(),
                    why: "unknown refusal code",
                })?;
                Message::Refused(Refused { code, message: f.text("message")? })
            }
            Kind::Error => {
                let v = f.u16("code")?;
                let code = ErrorCode::from_u16(v).ok_or(BodyError::InvalidField {
                    field: "code",
                    value: v.into(),
                    why: "unknown error code",
                })?;
                Message::Error(ErrorReply { code, message: f.text("message")? })
            }
            Kind::Ping => Message::Ping,
            Kind::Pong => Message::Pong,
            Kind::ExtentOk => Message::ExtentOk,
            Kind::Raft => Message::Raft(f.rest(&payload)),
            Kind::MetaRequest => Message::MetaRequest(f.rest(&payload)),
            Kind::MetaResponse => Message::MetaResponse(f.rest(&payload)),
            Kind::ExtentWrite => {
                let target = f.target()?;
                let offset = f.u64("offset")?;
                let flags = f.flags("flags", WRITE_FUA | WRITE_COPY)?;
                let data = f.rest(&payload);
                check_data_len(data.len())?;
                check_range(offset, data.len() as u64)?;
                let (fua, copy) = (flags & WRITE_FUA != 0, flags & WRITE_COPY != 0);
                Message::ExtentWrite(ExtentWrite { target, offset, fua, copy, data })
            }
            Kind::ExtentRead => {
                let target = f.target()?;
                let offset = f.u64("offset")?;
                let len = f.u32("len")?;
                if len as usize > MAX_DATA {
                    return Err(BodyError::InvalidField {
                        field: "len",
                        value: len.into(),
                        why: "over the largest data payload",
                    });
                }
                check_range(offset, len.into())?;
                Message::ExtentRead(ExtentRead { target, offset, len })
            }
            Kind::ExtentReadReply => {
                let flags = f.flags("flags", READ_REPLY_CRCS)?;
                let crcs = if flags & READ_REPLY_CRCS != 0 {
                    let block_size = f.u32("block size")?;
                    check_crc_block(block_size)?;
                    let count = f.u32("crc count")? as usize;
                    Some(BlockCrcs { block_size, crcs: f.crcs(count)? })
                } else {
                    None
                };
                let data = f.rest(&payload);
                check_data_len(data.len())?;
                if let Some(c) = &crcs {
                    let want = data.len().div_ceil(c.block_size as usize);
                    if c.crcs.len() != want {
                        return Err(BodyError::InvalidField {
                            field: "crc count",
                            value: c.crcs.len() as u64,
                            why: "not one per block of the data",
                        });
                    }
                }
                Message::ExtentReadReply(ExtentReadReply { crcs, data })
            }
            Kind::ExtentWriteZeroes => {
                let target = f.target()?;
                let offset = f.u64("offset")?;
                let len = f.u64("len")?;
                let flags = f.flags("flags", ZEROES_FUA | ZEROES_DEALLOCATE)?;
                check_range(offset, len)?;
                Message::ExtentWriteZeroes(ExtentWriteZeroes {
                    target,
                    offset,
                    len,
                    deallocate: flags & ZEROES_DEALLOCATE != 0,
                    fua: flags & ZEROES_FUA != 0,
                })
            }
            Kind::ExtentTrim => {
                let target = f.target()?;
                let offset = f.u64("offset")?;
                let len = f.u64("len")?;
                let flags = f.flags("flags", TRIM_FUA)?;
                check_range(offset, len)?;
                Message::ExtentTrim(ExtentTrim { target, offset, len, fua: flags & TRIM_FUA != 0 })
            }
            Kind::ExtentFlush => Message::ExtentFlush(ExtentFlush {
                target: f.target()?,
                flush_number: f.u64("flush number")?,
            }),
            Kind::ExtentStatus => Message::ExtentStatus(f.target()?),
            Kind::ExtentStatusReply => {
                let flush_number = f.u64("flush number")?;
                let generation = Generation(f.u64("generation")?);
                let epoch = Epoch(f.u64("epoch")?);
                let exists = f.flags("flags", STATUS_EXISTS)? & STATUS_EXISTS != 0;
                let region_size = f.u32("region size")?;
                let valid_size = region_size.is_power_of_two() && region_size >= MIN_REGION;
                if exists != valid_size || (!exists && region_size != 0) {
                    return Err(BodyError::InvalidField {
                        field: "region size",
                        value: region_size.into(),
                        why: "a power of two of at least 4096 for an extent that exists, else 0",
                    });
                }
                let count = f.u32("region count")? as usize;
                if count > MAX_DIRTY_REGIONS || (!exists && count > 0) {
                    return Err(BodyError::InvalidField {
                        field: "region count",
                        value: count as u64,
                        why: "over the cap, or dirty regions of an extent that does not exist",
                    });
                }
                f.need("dirty regions", count * 4)?;
                let mut dirty_regions = Vec::with_capacity(count);
                for _ in 0..count {
                    let r = f.u32("dirty regions")?;
                    if dirty_regions.last().is_some_and(|&last| r <= last) {
                        return Err(BodyError::InvalidField {
                            field: "dirty regions",
                            value: r.into(),
                            why: "region indexes must be strictly increasing",
                        });
                    }
                    dirty_regions.push(r);
                }
                Message::ExtentStatusReply(ExtentState {
                    exists,
                    flush_number,
                    generation,
                    epoch,
                    region_size,
                    dirty_regions,
                })
            }
            Kind::ExtentCrcs => {
                let target = f.target()?;
                let offset = f.u64("offset")?;
                let len = f.u64("len")?;
                if len > MAX_CRCS_RANGE {
                    return Err(BodyError::InvalidField {
                        field: "len",
                        value: len,
                        why: "over the longest range one crc request may ask for",
                    });
                }
                check_range(offset, len)?;
                Message::ExtentCrcs(ExtentCrcs { target, offset, len })
            }
            Kind::ExtentCrcsReply => {
                let block_size = f.u32("block size")?;
                check_crc_block(block_size)?;
                let count = f.u32("crc count")? as usize;
                if count > MAX_CRC_COUNT {
                    return Err(BodyError::InvalidField {
                        field: "crc count",
                        value: count as u64,
                        why: "over the most crcs a reply carries",
                    });
                }
                Message::ExtentCrcsReply(BlockCrcs { block_size, crcs: f.crcs(count)? })
            }
            Kind::ExtentMap => {
                let target = f.target()?;
                let offset = f.u64("offset")?;
                let len = f.u64("len")?;
                check_range(offset, len)?;
                Message::ExtentMap(ExtentMap { target, offset, len })
            }
            Kind::ExtentMapReply => Message::ExtentMapReply(f.map()?),
            Kind::ExtentsDirty => Message::ExtentsDirty(ExtentsDirty {
                volume: VolumeId(f.u64("volume")?),
                generation: Generation(f.u64("generation")?),
                from: ExtentIndex(f.u64("from")?),
            }),
            Kind::ExtentsDirtyReply => {
                let more = f.flags("flags", DIRTY_MORE)? & DIRTY_MORE != 0;
                let count = f.u32("extent count")? as usize;
                if count > MAX_DIRTY_EXTENTS {
                    return Err(BodyError::InvalidField {
                        field: "extent count",
                        value: count as u64,
                        why: "over the most extents a reply lists",
                    });
                }
                f.need("extents", count * 8)?;
                let mut extents: Vec<ExtentIndex> = Vec::with_capacity(count);
                for _ in 0..count {
                    let e = f.u64("extents")?;
                    if extents.last().is_some_and(|last| e <= last.0) {
                        return Err(BodyError::InvalidField {
                            field: "extents",
                            value: e,
                            why: "extent indexes must be strictly increasing",
                        });
                    }
                    extents.push(ExtentIndex(e));
                }
                Message::ExtentsDirtyReply(DirtyExtents { extents, more })
            }
            Kind::ExtentErr => {
                let code = f.u16("code")?;
                let current = f.u64("current")?;
                let error = ExtentError::from_wire(code, current).ok_or(BodyError::InvalidField {
                    field: "code",
                    value: code.into(),
                    why: "unknown extent error code",
                })?;
                // One message, one encoding: a value where the code has none is refused.
                if error.wire() != (code, current) {
                    return Err(BodyError::InvalidField {
                        field: "current",
                        value: current,
                        why: "must be 0 for this error code",
                    });
                }
                Message::ExtentErr(ExtentErr { error, message: f.text("message")? })
            }
            Kind::VolumeRead
            | Kind::VolumeWrite
            | Kind::VolumeWriteZeroes
            | Kind::VolumeTrim
            | Kind::VolumeFlush
            | Kind::VolumeBlockStatus
            | Kind::VolumeCompareAndWrite
            | Kind::VolumeReadReply
            | Kind::VolumeMapReply
            | Kind::VolumeCawReply
            | Kind::VolumeOk
            | Kind::VolumeErr => decode_volume(kind, &mut f, &payload)?,
        };
        if f.at != payload.len() {
            return Err(BodyError::TrailingBytes { extra: payload.len() - f.at });
        }
        Ok(msg)
    }
}

fn check_data_len(len: usize) -> Result<(), BodyError> {
    if len > MAX_DATA {
        return Err(BodyError::InvalidField {
            field: "data",
            value: len as u64,
            why: "over the largest data payload",
        });
    }
    Ok(())
}

fn check_crc_block(block_size: u32) -> Result<(), BodyError> {
    if !block_size.is_power_of_two() || block_size < MIN_CRC_BLOCK || block_size as usize > MAX_DATA {
        return Err(BodyError::InvalidField {
            field: "block size",
            value: block_size.into(),
            why: "not a power of two from 512 bytes to the largest data payload",
        });
    }
    Ok(())
}

fn check_range(offset: u64, len: u64) -> Result<(), BodyError> {
    if offset.checked_add(len).is_none() {
        return Err(BodyError::InvalidField { field: "len", value: len, why: "offset + len overflows" });
    }
    Ok(())
}

/// A cursor over a body's fixed fields.
struct Fields<'a> {
    b: &'a [u8],
    at: usize,
}

impl Fields<'_> {
    fn need(&self, field: &'static str, n: usize) -> Result<(), BodyError> {
        let have = self.b.len() - self.at;
        if have < n {
            return Err(BodyError::Truncated { field, need: n, have });
        }
        Ok(())
    }

    fn take<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], BodyError> {
        self.need(field, N)?;
        let v: [u8; N] = self.b[self.at..self.at + N].try_into().unwrap();
        self.at += N;
        Ok(v)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, BodyError> {
        self.take::<2>(field).map(u16::from_le_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, BodyError> {
        self.take::<4>(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, BodyError> {
        self.take::<8>(field).map(u64::from_le_bytes)
    }

    fn u128(&mut self, field: &'static str) -> Result<u128, BodyError> {
        self.take::<16>(field).map(u128::from_le_bytes)
    }

    /// A u32 of flag bits, refusing bits outside `known`.
    fn flags(&mut self, field: &'static str, known: u32) -> Result<u32, BodyError> {
        let v = self.u32(field)?;
        if v & !known != 0 {
            return Err(BodyError::InvalidField { field, value: v.into(), why: "unknown flag bits" });
        }
        Ok(v)
    }

    /// `count` crcs, checked to be there before anything is allocated for them.
    fn crcs(&mut self, count: usize) -> Result<Vec<u32>, BodyError> {
        let need = count.checked_mul(4).ok_or(BodyError::InvalidField {
            field: "crc count",
            value: count as u64,
            why: "overflows",
        })?;
        self.need("crcs", need)?;
        let mut crcs = Vec::with_capacity(count);
        for _ in 0..count {
            crcs.push(self.u32("crcs")?);
        }
        Ok(crcs)
    }

    fn target(&mut self) -> Result<ExtentTarget, BodyError> {
        Ok(ExtentTarget {
            volume: VolumeId(self.u64("volume")?),
            extent: ExtentIndex(self.u64("extent")?),
            epoch: Epoch(self.u64("epoch")?),
            generation: Generation(self.u64("generation")?),
        })
    }

    fn text(&mut self, field: &'static str) -> Result<String, BodyError> {
        let len = self.u16(field)? as usize;
        if len > MAX_TEXT {
            return Err(BodyError::InvalidField {
                field,
                value: len as u64,
                why: "text over the length cap",
            });
        }
        self.need(field, len)?;
        let s =
            std::str::from_utf8(&self.b[self.at..self.at + len]).map_err(|_| BodyError::BadUtf8 { field })?;
        self.at += len;
        Ok(s.to_owned())
    }

    /// Everything after the fixed fields, as a slice of `payload` (no copy).
    fn rest(&mut self, payload: &Bytes) -> Bytes {
        let r = payload.slice(self.at..);
        self.at = payload.len();
        r
    }
}

// --- volume-level forwarding ----------------------------------------------
//
// A node that serves a volume it does not own forwards each request to the
// owner as one of these; the owner runs it on its `Volume` and answers with
// the result or the error, so a client sees the same data and the same
// error through any node.

/// Most extents a `VolumeMapReply` carries; an owner whose map of the range
/// is longer answers with a prefix of it (block status answers may cover
/// less than was asked, in NBD and in SCSI GET LBA STATUS).
pub const MAX_MAP_EXTENTS: usize = 64 << 10;
/// Most runs a `VolumeReadReply` carries: one per 512-byte block of the
/// largest read (an owner's runs are whole blocks of a block-aligned read).
/// It bounds what decoding a hostile reply allocates.
pub const MAX_READ_RUNS: usize = MAX_DATA / 512;
/// Bytes of one extent of a `VolumeMapReply`.
const MAP_EXTENT_LEN: usize = 8 + 4;
/// The shortest extent a volume's map reports (its logical block).
const MIN_MAP_LEN: u64 = 512;
const VTARGET_LEN: usize = 16;
const RUN_HOLE: u32 = 1 << 31;
const MAP_ALLOCATED: u32 = 1;
const MAP_ZERO: u32 = 2;
const CAW_MISCOMPARE: u32 = 1;

/// (volume, owner generation): which volume a forwarded request is for,
/// and the owner generation the forwarder believes current. A node that
/// does not own the volume at that generation answers `NotOwner`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VolumeTarget {
    pub volume: VolumeId,
    pub generation: Generation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeRead {
    pub target: VolumeTarget,
    pub offset: u64,
    pub len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeWrite {
    pub target: VolumeTarget,
    pub offset: u64,
    pub fua: bool,
    /// From a client held to no block size: `offset` and the data's length
    /// may be any byte (the owner read-modify-writes the partial sectors).
    pub any_byte: bool,
    pub data: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeWriteZeroes {
    pub target: VolumeTarget,
    pub offset: u64,
    pub len: u64,
    pub deallocate: bool,
    pub fua: bool,
    /// As [`VolumeWrite::any_byte`]: the partial sectors at the ends get
    /// zeros by read-modify-write on the owner.
    pub any_byte: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeTrim {
    pub target: VolumeTarget,
    pub offset: u64,
    pub len: u64,
    pub fua: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeBlockStatus {
    pub target: VolumeTarget,
    pub offset: u64,
    pub len: u64,
}

/// COMPARE AND WRITE: `buf` is the bytes to compare, then as many to write
/// (as `Volume::compare_and_write` takes it; an odd length is the owner's
/// to refuse, so the error is the same as on the owner).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeCompareAndWrite {
    pub target: VolumeTarget,
    pub offset: u64,
    pub fua: bool,
    pub buf: Bytes,
}

/// A read's data and holes in address order. On the wire the runs come
/// first and the data of the data runs after them; decoded, each data run
/// is a slice of the received payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeReadReply {
    pub chunks: Vec<ReadChunk>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMapReply {
    /// At most [`MAX_MAP_EXTENTS`], covering a prefix of the range asked.
    pub extents: Vec<MapExtent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeCawReply {
    /// Offset (from the request's) of the first byte that differed;
    /// `None`: it matched and was written.
    pub miscompare: Option<u64>,
}

/// Why an owner did not serve a forwarded request: one code per kind of
/// `node::VolumeError`, with the fields a forwarder needs to rebuild it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeFault {
    OutOfRange {
        offset: u64,
        len: u64,
        size: u64,
    },
    Misaligned {
        offset: u64,
        len: u64,
    },
    TooLarge {
        len: u64,
    },
    ReadOnly,
    NoSpace,
    Checksum {
        volume: VolumeId,
        extent: ExtentIndex,
        block: u64,
    },
    Io,
    /// The node does not own the volume; `generation` is the owner
    /// generation it knows (the forwarder looks the owner up again).
    NotOwner {
        generation: Generation,
    },
    /// The node could not serve the volume now (not opened yet, its own
    /// replicas unreachable).
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeErr {
    pub fault: VolumeFault,
    pub message: String,
}

impl VolumeFault {
    fn wire(self) -> (u16, [u64; 3]) {
        match self {
            VolumeFault::OutOfRange { offset, len, size } => (1, [offset, len, size]),
            VolumeFault::Misaligned { offset, len } => (2, [offset, len, 0]),
            VolumeFault::TooLarge { len } => (3, [len, 0, 0]),
            VolumeFault::ReadOnly => (4, [0; 3]),
            VolumeFault::NoSpace => (5, [0; 3]),
            VolumeFault::Checksum { volume, extent, block } => (6, [volume.0, extent.0, block]),
            VolumeFault::Io => (7, [0; 3]),
            VolumeFault::NotOwner { generation } => (8, [generation.0, 0, 0]),
            VolumeFault::Unavailable => (9, [0; 3]),
        }
    }

    fn from_wire(code: u16, [a, b, c]: [u64; 3]) -> Option<VolumeFault> {
        Some(match code {
            1 => VolumeFault::OutOfRange { offset: a, len: b, size: c },
            2 => VolumeFault::Misaligned { offset: a, len: b },
            3 => VolumeFault::TooLarge { len: a },
            4 => VolumeFault::ReadOnly,
            5 => VolumeFault::NoSpace,
            6 => VolumeFault::Checksum { volume: VolumeId(a), extent: ExtentIndex(b), block: c },
            7 => VolumeFault::Io,
            8 => VolumeFault::NotOwner { generation: Generation(a) },
            9 => VolumeFault::Unavailable,
            _ => return None,
        })
    }
}

fn put_vtarget(out: &mut BytesMut, t: &VolumeTarget) {
    out.put_u64_le(t.volume.0);
    out.put_u64_le(t.generation.0);
}

fn run_of(c: &ReadChunk) -> u32 {
    match c {
        // Lengths are at most MAX_DATA (checked by the decoder; a volume
        // read is at most that long), well under bit 31.
        ReadChunk::Data(b) => b.len() as u32,
        ReadChunk::Hole(n) => *n | RUN_HOLE,
    }
}

fn volume_fields_len(m: &Message) -> usize {
    match m {
        Message::VolumeRead(_) => VTARGET_LEN + 8 + 4,
        Message::VolumeWrite(_) | Message::VolumeCompareAndWrite(_) => VTARGET_LEN + 8 + 4,
        Message::VolumeWriteZeroes(_) | Message::VolumeTrim(_) => VTARGET_LEN + 8 + 8 + 4,
        Message::VolumeFlush(_) => VTARGET_LEN,
        Message::VolumeBlockStatus(_) => VTARGET_LEN + 8 + 8,
        Message::VolumeReadReply(r) => 4 + 4 * r.chunks.len(),
        Message::VolumeMapReply(r) => 4 + MAP_EXTENT_LEN * r.extents.len(),
        Message::VolumeCawReply(_) => 4 + 8,
        Message::VolumeErr(e) => 2 + 3 * 8 + text_len(&e.message),
        _ => 0,
    }
}

fn encode_volume_fields(m: &Message, out: &mut BytesMut) {
    match m {
        Message::VolumeRead(r) => {
            put_vtarget(out, &r.target);
            out.put_u64_le(r.offset);
            out.put_u32_le(r.len);
        }
        Message::VolumeWrite(w) => {
            put_vtarget(out, &w.target);
            out.put_u64_le(w.offset);
            out.put_u32_le(flag(w.fua, WRITE_FUA) | flag(w.any_byte, WRITE_ANY_BYTE));
        }
        Message::VolumeCompareAndWrite(c) => {
            put_vtarget(out, &c.target);
            out.put_u64_le(c.offset);
            out.put_u32_le(flag(c.fua, WRITE_FUA));
        }
        Message::VolumeWriteZeroes(z) => {
            put_vtarget(out, &z.target);
            out.put_u64_le(z.offset);
            out.put_u64_le(z.len);
            out.put_u32_le(
                flag(z.fua, ZEROES_FUA)
                    | flag(z.deallocate, ZEROES_DEALLOCATE)
                    | flag(z.any_byte, ZEROES_ANY_BYTE),
            );
        }
        Message::VolumeTrim(t) => {
            put_vtarget(out, &t.target);
            out.put_u64_le(t.offset);
            out.put_u64_le(t.len);
            out.put_u32_le(flag(t.fua, TRIM_FUA));
        }
        Message::VolumeFlush(t) => put_vtarget(out, t),
        Message::VolumeBlockStatus(b) => {
            put_vtarget(out, &b.target);
            out.put_u64_le(b.offset);
            out.put_u64_le(b.len);
        }
        Message::VolumeReadReply(r) => {
            out.put_u32_le(r.chunks.len() as u32);
            for c in &r.chunks {
                out.put_u32_le(run_of(c));
            }
        }
        Message::VolumeMapReply(r) => put_map(out, &r.extents),
        Message::VolumeCawReply(c) => {
            out.put_u32_le(flag(c.miscompare.is_some(), CAW_MISCOMPARE));
            out.put_u64_le(c.miscompare.unwrap_or(0));
        }
        Message::VolumeErr(e) => {
            let (code, fields) = e.fault.wire();
            out.put_u16_le(code);
            for v in fields {
                out.put_u64_le(v);
            }
            put_text(out, &e.message);
        }
        _ => {}
    }
}

/// `count` fixed-size items of `size` bytes each must be in the body
/// before anything is allocated for them.
fn need_items(f: &Fields<'_>, field: &'static str, count: u32, size: usize) -> Result<usize, BodyError> {
    let count = count as usize;
    let bytes = count.checked_mul(size).ok_or(BodyError::InvalidField {
        field,
        value: count as u64,
        why: "overflows",
    })?;
    f.need(field, bytes)?;
    Ok(count)
}

/// Ranges are not checked here: the owner's `Volume` checks them (with
/// checked arithmetic) and answers `OutOfRange`, which is what a client of
/// the owner gets for the same range; a decode error would close the
/// connection instead.
fn decode_volume(kind: Kind, f: &mut Fields<'_>, payload: &Bytes) -> Result<Message, BodyError> {
    Ok(match kind {
        Kind::VolumeRead => {
            let target = f.vtarget()?;
            let offset = f.u64("offset")?;
            let len = f.u32("len")?;
            if len as usize > MAX_DATA {
                return Err(BodyError::InvalidField {
                    field: "len",
                    value: len.into(),
                    why: "over the largest data payload",
                });
            }
            Message::VolumeRead(VolumeRead { target, offset, len })
        }
        Kind::VolumeWrite | Kind::VolumeCompareAndWrite => {
            let target = f.vtarget()?;
            let offset = f.u64("offset")?;
            // COMPARE AND WRITE comes from SCSI, always whole blocks.
            let known = if kind == Kind::VolumeWrite { WRITE_FUA | WRITE_ANY_BYTE } else { WRITE_FUA };
            let flags = f.flags("flags", known)?;
            let (fua, any_byte) = (flags & WRITE_FUA != 0, flags & WRITE_ANY_BYTE != 0);
            let data = f.rest(payload);
            check_data_len(data.len())?;
            if kind == Kind::VolumeWrite {
                Message::VolumeWrite(VolumeWrite { target, offset, fua, any_byte, data })
            } else {
                Message::VolumeCompareAndWrite(VolumeCompareAndWrite { target, offset, fua, buf: data })
            }
        }
        Kind::VolumeWriteZeroes => {
            let target = f.vtarget()?;
            let offset = f.u64("offset")?;
            let len = f.u64("len")?;
            let flags = f.flags("flags", ZEROES_FUA | ZEROES_DEALLOCATE | ZEROES_ANY_BYTE)?;
            Message::VolumeWriteZeroes(VolumeWriteZeroes {
                target,
                offset,
                len,
                deallocate: flags & ZEROES_DEALLOCATE != 0,
                fua: flags & ZEROES_FUA != 0,
                any_byte: flags & ZEROES_ANY_BYTE != 0,
            })
        }
        Kind::VolumeTrim => {
            let target = f.vtarget()?;
            let offset = f.u64("offset")?;
            let len = f.u64("len")?;
            let fua = f.flags("flags", TRIM_FUA)? & TRIM_FUA != 0;
            Message::VolumeTrim(VolumeTrim { target, offset, len, fua })
        }
        Kind::VolumeFlush => Message::VolumeFlush(f.vtarget()?),
        Kind::VolumeBlockStatus => {
            let target = f.vtarget()?;
            let offset = f.u64("offset")?;
            let len = f.u64("len")?;
            Message::VolumeBlockStatus(VolumeBlockStatus { target, offset, len })
        }
        Kind::VolumeReadReply => {
            let raw = f.u32("run count")?;
            if raw as usize > MAX_READ_RUNS {
                return Err(BodyError::InvalidField {
                    field: "run count",
                    value: raw.into(),
                    why: "over the cap on read runs",
                });
            }
            let count = need_items(f, "runs", raw, 4)?;
            let mut runs = Vec::with_capacity(count);
            let (mut total, mut data_len) = (0usize, 0usize);
            for _ in 0..count {
                let run = f.u32("runs")?;
                let len = (run & !RUN_HOLE) as usize;
                if len == 0 {
                    return Err(BodyError::InvalidField {
                        field: "runs",
                        value: run.into(),
                        why: "a run of length 0",
                    });
                }
                // Runs and data are each at most one largest payload, so
                // neither sum can overflow before it is refused.
                total = total.checked_add(len).filter(|t| *t <= MAX_DATA).ok_or(BodyError::InvalidField {
                    field: "runs",
                    value: total as u64,
                    why: "runs add up to more than the largest data payload",
                })?;
                if run & RUN_HOLE == 0 {
                    data_len += len;
                }
                runs.push(run);
            }
            let data = f.rest(payload);
            if data.len() != data_len {
                return Err(BodyError::InvalidField {
                    field: "data",
                    value: data.len() as u64,
                    why: "not the length of the data runs",
                });
            }
            let mut at = 0usize;
            let chunks = runs
                .into_iter()
                .map(|run| {
                    let len = (run & !RUN_HOLE) as usize;
                    if run & RUN_HOLE != 0 {
                        ReadChunk::Hole(len as u32)
                    } else {
                        at += len;
                        ReadChunk::Data(data.slice(at - len..at))
                    }
                })
                .collect();
            Message::VolumeReadReply(VolumeReadReply { chunks })
        }
        Kind::VolumeMapReply => Message::VolumeMapReply(VolumeMapReply { extents: f.map()? }),
        Kind::VolumeCawReply => {
            let flags = f.flags("flags", CAW_MISCOMPARE)?;
            let offset = f.u64("offset")?;
            if flags & CAW_MISCOMPARE == 0 && offset != 0 {
                return Err(BodyError::InvalidField {
                    field: "offset",
                    value: offset,
                    why: "must be 0 without a miscompare",
                });
            }
            Message::VolumeCawReply(VolumeCawReply {
                miscompare: (flags & CAW_MISCOMPARE != 0).then_some(offset),
            })
        }
        Kind::VolumeOk => Message::VolumeOk,
        Kind::VolumeErr => {
            let code = f.u16("code")?;
            let fields = [f.u64("a")?, f.u64("b")?, f.u64("c")?];
            let fault = VolumeFault::from_wire(code, fields).ok_or(BodyError::InvalidField {
                field: "code",
                value: code.into(),
                why: "unknown volume error code",
            })?;
            // One message, one encoding: a value the code does not use is refused.
            if let Some(i) = (0..3).find(|&i| fault.wire().1[i] != fields[i]) {
                return Err(BodyError::InvalidField {
                    field: ["a", "b", "c"][i],
                    value: fields[i],
                    why: "must be 0 for this error code",
                });
            }
            Message::VolumeErr(VolumeErr { fault, message: f.text("message")? })
        }
        // Called for the volume kinds only.
        other => {
            return Err(BodyError::InvalidField {
                field: "kind",
                value: other as u64,
                why: "not a volume-level kind",
            });
        }
    })
}

impl Kind {
    /// A volume-level request: one a node forwards to a volume's owner.
    pub fn is_volume_request(self) -> bool {
        matches!(
            self,
            Kind::VolumeRead
                | Kind::VolumeWrite
                | Kind::VolumeWriteZeroes
                | Kind::VolumeTrim
                | Kind::VolumeFlush
                | Kind::VolumeBlockStatus
                | Kind::VolumeCompareAndWrite
        )
    }
}

impl Fields<'_> {
    fn vtarget(&mut self) -> Result<VolumeTarget, BodyError> {
        Ok(VolumeTarget {
            volume: VolumeId(self.u64("volume")?),
            generation: Generation(self.u64("generation")?),
        })
    }

    /// A map (`VolumeMapReply`, `ExtentMapReply`): its count checked
    /// against the cap and the body before anything is allocated.
    fn map(&mut self) -> Result<Vec<MapExtent>, BodyError> {
        let raw = self.u32("extent count")?;
        if raw as usize > MAX_MAP_EXTENTS {
            return Err(BodyError::InvalidField {
                field: "extent count",
                value: raw.into(),
                why: "over the cap on map extents",
            });
        }
        let count = need_items(self, "extents", raw, MAP_EXTENT_LEN)?;
        let mut extents = Vec::with_capacity(count);
        for _ in 0..count {
            let len = self.u64("extent len")?;
            let flags = self.flags("extent flags", MAP_ALLOCATED | MAP_ZERO)?;
            extents.push(MapExtent {
                len,
                state: BlockState { allocated: flags & MAP_ALLOCATED != 0, zero: flags & MAP_ZERO != 0 },
            });
        }
        Ok(extents)
    }
}

fn put_map(out: &mut BytesMut, extents: &[MapExtent]) {
    out.put_u32_le(extents.len() as u32);
    for e in extents {
        out.put_u64_le(e.len);
        out.put_u32_le(flag(e.state.allocated, MAP_ALLOCATED) | flag(e.state.zero, MAP_ZERO));
    }
}

/// Room for the largest map a range of `len` bytes can have.
fn map_reply_hint(len: u64) -> usize {
    let most = (len / MIN_MAP_LEN).min(MAX_MAP_EXTENTS as u64) as usize;
    4 + most * MAP_EXTENT_LEN
}
// --- end of volume-level forwarding ----------------------------------------
