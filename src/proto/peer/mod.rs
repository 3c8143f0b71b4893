//! The peer protocol: what Basalt nodes say to each other over TCP, as pure
//! code. One framed, versioned codec carries the Raft messages of the
//! metadata group and the replicated data path.
//!
//! Owns: every byte layout of the protocol ([`frame`] for the header,
//! [`message`] for the bodies), the version ([`ProtocolVersion`]) and the
//! hard frame cap ([`MAX_FRAME`]). Must never: do I/O, read a clock, trust a
//! length from the wire before checking it against the cap, or panic on
//! any input. The I/O shell is `net::`.
//!
//! A connection starts with `Hello` from the connecting node (version,
//! cluster id, node id) answered by `HelloAck` or `Refused`; after that the
//! connecting side sends requests, each with a request id of its choosing
//! (never 0), and the other side answers each with one reply carrying the
//! same id, in any order. A request flagged [`FrameFlags::ONE_WAY`] gets no
//! answer. An `Error` with request id 0 is about the connection, which the
//! sender closes after it.
//!
//! Decoding ([`Decoder::decode`]) returns `Ok(None)` until a whole frame is
//! buffered, and refuses a frame over the cap from its header alone, before
//! any of its payload is buffered. Data payloads are `Bytes` that share the
//! receive buffer. Encoding ([`FrameBuf::encode`]) packs headers and small
//! bodies together and references data payloads, for vectored writes.

pub mod frame;
pub mod message;

pub use frame::{
    DecodeError, Decoder, EncodeError, Frame, FrameBuf, FrameFlags, HEADER_LEN, MAGIC, MAX_DATA, MAX_FRAME,
    ProtocolVersion, encode_to_bytes, frame_len,
};
pub use message::{
    BlockCrcs, BodyError, DirtyExtents, ErrorCode, ErrorReply, ExtentCrcs, ExtentErr, ExtentError,
    ExtentFlush, ExtentMap, ExtentRead, ExtentReadReply, ExtentState, ExtentTarget, ExtentTrim, ExtentWrite,
    ExtentWriteZeroes, ExtentsDirty, Hello, Kind, MAX_CRC_COUNT, MAX_CRCS_RANGE, MAX_DIRTY_EXTENTS,
    MAX_DIRTY_REGIONS, MAX_TEXT, Message, RefuseCode, Refused,
};
// Volume-level forwarding.
pub use message::{
    MAX_MAP_EXTENTS, MAX_READ_RUNS, VolumeBlockStatus, VolumeCawReply, VolumeCompareAndWrite, VolumeErr,
    VolumeFault, VolumeMapReply, VolumeRead, VolumeReadReply, VolumeTarget, VolumeTrim, VolumeWrite,
    VolumeWriteZeroes,
};

#[cfg(test)]
mod tests;
