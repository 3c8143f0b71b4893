//! Forwarding a volume's I/O from a node that serves it to the node that
//! owns it.
//!
//! Every node serves every volume over NBD and iSCSI, but one node at a
//! time owns a volume (metadata: owner node and generation) and runs its
//! I/O. A node that is not the owner sends each request to the owner as a
//! `Volume*` message of the peer protocol ([`Forwarder`]); the owner runs
//! it on its [`Volume`] and answers with the result or the error
//! ([`serve`]). Errors travel as their kind with the fields the frontends
//! use, so a client through a forwarding node gets the same errno or sense
//! as one connected to the owner.
//!
//! Owns: the mapping between volume calls and peer messages, and between
//! [`VolumeError`] and [`VolumeFault`], both ways. Must never: decide who
//! owns a volume (the caller's `volume_of` callback and routing do), trust
//! a reply's lengths without checking them against the request, or hang
//! on an owner that went away (every request has a timeout).
//!
//! Ordering and durability: a forwarded write is acknowledged only when
//! the owner's `Volume` acknowledged it, so a FLUSH through any node (sent
//! to the owner, which flushes every write completed before it) covers
//! every write acknowledged before it through any node.
//!
//! Cancel safety: dropping a forwarded request's future drops its entry in
//! the peer connection's in-flight table (`net::client`); a reply that
//! comes later is counted and discarded, and the connection stays usable.
//! A write whose frame was already queued still reaches the owner and runs
//! there to its end, as a local write does once it has started
//! (`Volume`'s run-to-end pieces): the range reads as the old or the new
//! data, never a mix decided by the drop.

use super::volume::{MAX_PAYLOAD, MIN_BLOCK, Result, Volume, VolumeError};
use crate::net::{PeerClient, PeerError};
use crate::proto::peer::{
    ErrorCode, MAX_DATA, MAX_MAP_EXTENTS, MAX_READ_RUNS, Message, VolumeBlockStatus, VolumeCawReply,
    VolumeCompareAndWrite, VolumeErr, VolumeFault, VolumeMapReply, VolumeRead, VolumeReadReply, VolumeTarget,
    VolumeTrim, VolumeWrite, VolumeWriteZeroes,
};
use crate::storage::StoreError;
use crate::types::{ExtentKey, Generation, MapExtent, ReadChunk, VolumeId};
use crate::units::error_chain;
use bytes::Bytes;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// How long a forwarded request may take, from the call to the owner's
/// reply, before it fails with [`VolumeError::Unavailable`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// One volume's I/O sent to its owner: the same calls, arguments and
/// errors as [`Volume`]'s. Built for one (owner, generation); when the
/// owner answers [`VolumeError::NotOwner`], look the owner up again and
/// build a new one.
#[derive(Debug, Clone)]
pub struct Forwarder {
    owner: PeerClient,
    target: VolumeTarget,
    timeout: Duration,
}

impl Forwarder {
    /// Forwards the I/O of `volume` to `owner`, which the caller believes
    /// owns it at `generation`.
    pub fn new(owner: PeerClient, volume: VolumeId, generation: Generation) -> Forwarder {
        Forwarder { owner, target: VolumeTarget { volume, generation }, timeout: DEFAULT_TIMEOUT }
    }

    /// The same, with a per-request timeout other than [`DEFAULT_TIMEOUT`].
    pub fn with_timeout(mut self, timeout: Duration) -> Forwarder {
        self.timeout = timeout;
        self
    }

    pub fn volume(&self) -> VolumeId {
        self.target.volume
    }

    pub fn generation(&self) -> Generation {
        self.target.generation
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The owner's peer client.
    pub fn owner(&self) -> &PeerClient {
        &self.owner
    }

    /// Sends one request and turns a `VolumeErr` or a transport failure
    /// into the error.
    async fn call(&self, request: Message) -> Result<Message> {
        match self.owner.request_timeout(request, self.timeout).await {
            Ok(Message::VolumeErr(e)) => Err(error_of(e)),
            Ok(reply) => Ok(reply),
            Err(e) => Err(self.unavailable(&e)),
        }
    }

    fn unavailable(&self, e: &PeerError) -> VolumeError {
        VolumeError::Unavailable(error_chain(e))
    }

    /// An answer that is not what the request asks for: the owner runs a
    /// build that speaks otherwise, or is broken. Logged here, once.
    fn bad_reply(&self, what: String) -> VolumeError {
        tracing::warn!(peer = %self.owner.addr(), volume = %self.target.volume, "the owner {what}");
        VolumeError::Unavailable(format!("the owner at {} {what}", self.owner.addr()))
    }

    fn unexpected(&self, request: &str, reply: &Message) -> VolumeError {
        self.bad_reply(format!("answered a {request} with {:?}", reply.kind()))
    }

    /// Reads `len` bytes at `offset`, as data and holes in address order.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<ReadChunk>> {
        if len > MAX_PAYLOAD || len > MAX_DATA as u64 {
            return Err(VolumeError::TooLarge(len));
        }
        let request = Message::VolumeRead(VolumeRead { target: self.target, offset, len: len as u32 });
        match self.call(request).await? {
            Message::VolumeReadReply(VolumeReadReply { chunks }) => {
                // Each run is at most MAX_DATA (the decoder checks): no overflow.
                let got: u64 = chunks.iter().map(|c| c.len() as u64).sum();
                if got != len {
                    return Err(self.bad_reply(format!("answered a read of {len} bytes with {got}")));
                }
                Ok(chunks)
            }
            other => Err(self.unexpected("read", &other)),
        }
    }

    /// Writes `data` at `offset`. With `fua` the data is durable on return.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.write_any(offset, data, fua, false).await
    }

    /// [`Volume::write_unaligned`] on the owner: `offset` and the length
    /// may be any byte, and the owner read-modify-writes the partial
    /// sectors under its own exclusive hold, so the write is atomic
    /// against every other writer there, as for a client of the owner's.
    pub async fn write_unaligned(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.write_any(offset, data, fua, true).await
    }

    async fn write_any(&self, offset: u64, data: Bytes, fua: bool, any_byte: bool) -> Result<()> {
        let len = data.len() as u64;
        if len > MAX_PAYLOAD || len > MAX_DATA as u64 {
            return Err(VolumeError::TooLarge(len));
        }
        self.ok(Message::VolumeWrite(VolumeWrite { target: self.target, offset, fua, any_byte, data })).await
    }

    /// Makes the range read as zeros (see [`Volume::write_zeroes`]).
    pub async fn write_zeroes(&self, offset: u64, len: u64, deallocate: bool, fua: bool) -> Result<()> {
        let m = VolumeWriteZeroes { target: self.target, offset, len, deallocate, fua, any_byte: false };
        self.ok(Message::VolumeWriteZeroes(m)).await
    }

    /// [`Volume::write_zeroes_unaligned`] on the owner (see
    /// [`Forwarder::write_unaligned`]).
    pub async fn write_zeroes_unaligned(
        &self,
        offset: u64,
        len: u64,
        deallocate: bool,
        fua: bool,
    ) -> Result<()> {
        let m = VolumeWriteZeroes { target: self.target, offset, len, deallocate, fua, any_byte: true };
        self.ok(Message::VolumeWriteZeroes(m)).await
    }

    /// Discards the range; it reads back as zeros afterwards.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.ok(Message::VolumeTrim(VolumeTrim { target: self.target, offset, len, fua })).await
    }

    /// Every write acknowledged before this call, through any node, is on
    /// stable storage when it returns.
    pub async fn flush(&self) -> Result<()> {
        self.ok(Message::VolumeFlush(self.target)).await
    }

    async fn ok(&self, request: Message) -> Result<()> {
        match self.call(request).await? {
            Message::VolumeOk => Ok(()),
            other => Err(self.unexpected("change", &other)),
        }
    }

    /// Allocation map of the range, in order. The owner sends at most
    /// [`MAX_MAP_EXTENTS`] extents: the map may cover a prefix of the range
    /// only (the frontends ask again from where it ends).
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<MapExtent>> {
        let request = Message::VolumeBlockStatus(VolumeBlockStatus { target: self.target, offset, len });
        match self.call(request).await? {
            Message::VolumeMapReply(VolumeMapReply { extents }) => {
                let covered = extents.iter().try_fold(0u64, |sum, e| sum.checked_add(e.len));
                if covered.is_none_or(|c| c > len) {
                    return Err(self.bad_reply(format!("answered a map of {len} bytes with more")));
                }
                // A frontend's reply must describe some of the range, in
                // whole sectors (the range is).
                let sectors = extents.iter().all(|e| e.len > 0 && e.len.is_multiple_of(MIN_BLOCK));
                if len > 0 && (covered == Some(0) || !sectors) {
                    return Err(
                        self.bad_reply(format!("answered a map of {len} bytes with a run of no sectors"))
                    );
                }
                Ok(extents)
            }
            other => Err(self.unexpected("block status", &other)),
        }
    }

    /// COMPARE AND WRITE (see [`Volume::compare_and_write`]): `buf` is the
    /// bytes to compare, then as many to write. Runs on the owner as one
    /// uninterrupted read-compare-write. A `buf` over the largest peer
    /// payload (a compare length over 16 MiB, far past what SCSI's Block
    /// Limits page lets an initiator send) is refused here as too large.
    pub async fn compare_and_write(&self, offset: u64, buf: Bytes, fua: bool) -> Result<Option<u64>> {
        let len = buf.len() as u64 / 2;
        if buf.len() > MAX_DATA {
            if len * 2 != buf.len() as u64 {
                return Err(VolumeError::Misaligned { offset, len: buf.len() as u64 });
            }
            return Err(VolumeError::TooLarge(len));
        }
        let request =
            Message::VolumeCompareAndWrite(VolumeCompareAndWrite { target: self.target, offset, fua, buf });
        match self.call(request).await? {
            Message::VolumeCawReply(VolumeCawReply { miscompare }) => {
                if let Some(at) = miscompare.filter(|at| *at >= len) {
                    return Err(self.bad_reply(format!("reported a miscompare at {at} of {len} bytes")));
                }
                Ok(miscompare)
            }
            other => Err(self.unexpected("compare and write", &other)),
        }
    }
}

/// The owner's side: runs a forwarded `request` on the local volume that
/// `volume_of` gives for its (volume, generation) and returns the reply.
///
/// `volume_of` returns [`VolumeError::NotOwner`] (with the generation this
/// node knows) when this node does not own the volume at that generation,
/// [`VolumeError::Unavailable`] when it does but cannot serve it now. It is
/// called once, before the returned future is first polled, so it need not
/// be `Send`; the future owns everything it uses. A kind that is not a
/// volume request is answered `Error(Unsupported)`.
pub fn serve(
    volume_of: &dyn Fn(VolumeId, Generation) -> Result<Arc<Volume>, VolumeError>,
    request: Message,
) -> impl Future<Output = Message> + Send + 'static {
    let target = match &request {
        Message::VolumeRead(r) => Some(r.target),
        Message::VolumeWrite(w) => Some(w.target),
        Message::VolumeWriteZeroes(z) => Some(z.target),
        Message::VolumeTrim(t) => Some(t.target),
        Message::VolumeFlush(t) => Some(*t),
        Message::VolumeBlockStatus(b) => Some(b.target),
        Message::VolumeCompareAndWrite(c) => Some(c.target),
        _ => None,
    };
    let volume = target.map(|t| (t, volume_of(t.volume, t.generation)));
    async move {
        let Some((target, volume)) = volume else {
            return Message::error(
                ErrorCode::Unsupported,
                format!("{:?} is not a volume request", request.kind()),
            );
        };
        let reply = match volume {
            Ok(v) => run(&v, request).await,
            Err(e) => Err(e),
        };
        reply.unwrap_or_else(|e| {
            tracing::debug!(volume = %target.volume, error = %error_chain(&e), "forwarded request failed");
            Message::VolumeErr(VolumeErr { fault: fault_of(&e), message: error_chain(&e) })
        })
    }
}

async fn run(v: &Volume, request: Message) -> Result<Message> {
    Ok(match request {
        Message::VolumeRead(r) => {
            let mut chunks = v.read(r.offset, r.len.into()).await?;
            // The wire has no empty run.
            chunks.retain(|c| !c.is_empty());
            if chunks.len() > MAX_READ_RUNS {
                // Not from a block-aligned read; one copy rather than a
                // reply the forwarder would refuse.
                chunks = vec![ReadChunk::Data(crate::types::flatten_chunks(&chunks))];
            }
            Message::VolumeReadReply(VolumeReadReply { chunks })
        }
        // The volume checks the range (checked arithmetic, against its
        // size) as for a client of its own, and `OutOfRange` goes back.
        Message::VolumeWrite(w) if w.any_byte => {
            v.write_unaligned(w.offset, w.data, w.fua).await?;
            Message::VolumeOk
        }
        Message::VolumeWrite(w) => {
            v.write(w.offset, w.data, w.fua).await?;
            Message::VolumeOk
        }
        Message::VolumeWriteZeroes(z) if z.any_byte => {
            v.write_zeroes_unaligned(z.offset, z.len, z.deallocate, z.fua).await?;
            Message::VolumeOk
        }
        Message::VolumeWriteZeroes(z) => {
            v.write_zeroes(z.offset, z.len, z.deallocate, z.fua).await?;
            Message::VolumeOk
        }
        Message::VolumeTrim(t) => {
            v.trim(t.offset, t.len, t.fua).await?;
            Message::VolumeOk
        }
        Message::VolumeFlush(_) => {
            v.flush().await?;
            Message::VolumeOk
        }
        Message::VolumeBlockStatus(b) => {
            let mut extents = v.block_status(b.offset, b.len).await?;
            extents.truncate(MAX_MAP_EXTENTS);
            Message::VolumeMapReply(VolumeMapReply { extents })
        }
        Message::VolumeCompareAndWrite(c) => {
            let miscompare = v.compare_and_write(c.offset, c.buf, c.fua).await?;
            Message::VolumeCawReply(VolumeCawReply { miscompare })
        }
        other => {
            Message::error(ErrorCode::Unsupported, format!("{:?} is not a volume request", other.kind()))
        }
    })
}

/// The wire form of `e`: its kind and the fields the frontends read.
pub fn fault_of(e: &VolumeError) -> VolumeFault {
    match e {
        VolumeError::OutOfRange { offset, len, size } => {
            VolumeFault::OutOfRange { offset: *offset, len: *len, size: *size }
        }
        VolumeError::Misaligned { offset, len } => VolumeFault::Misaligned { offset: *offset, len: *len },
        VolumeError::TooLarge(len) => VolumeFault::TooLarge { len: *len },
        VolumeError::ReadOnly => VolumeFault::ReadOnly,
        VolumeError::NoSpace(_) => VolumeFault::NoSpace,
        VolumeError::Checksum { key, block } => {
            VolumeFault::Checksum { volume: key.volume, extent: key.index, block: *block }
        }
        VolumeError::Io(_) => VolumeFault::Io,
        VolumeError::NotOwner { generation } => VolumeFault::NotOwner { generation: *generation },
        VolumeError::Unavailable(_) => VolumeFault::Unavailable,
    }
}

/// The error an owner's `VolumeErr` stands for: the same kind as on the
/// owner, with the owner's text as the cause of the store-level ones.
pub fn error_of(e: VolumeErr) -> VolumeError {
    let remote =
        |source: std::io::Error| StoreError::io(format!("the volume's owner ({})", e.message), source);
    match e.fault {
        VolumeFault::OutOfRange { offset, len, size } => VolumeError::OutOfRange { offset, len, size },
        VolumeFault::Misaligned { offset, len } => VolumeError::Misaligned { offset, len },
        VolumeFault::TooLarge { len } => VolumeError::TooLarge(len),
        VolumeFault::ReadOnly => VolumeError::ReadOnly,
        // ENOSPC keeps `StoreError::is_no_space` true on this side too.
        VolumeFault::NoSpace => VolumeError::NoSpace(remote(std::io::Error::from_raw_os_error(libc::ENOSPC))),
        VolumeFault::Checksum { volume, extent, block } => {
            VolumeError::Checksum { key: ExtentKey { volume, index: extent }, block }
        }
        VolumeFault::Io => VolumeError::Io(remote(std::io::Error::other("I/O error on the owner"))),
        VolumeFault::NotOwner { generation } => VolumeError::NotOwner { generation },
        VolumeFault::Unavailable => VolumeError::Unavailable(e.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ExtentIndex;

    /// Every kind of `VolumeError` survives the trip to the wire and back
    /// with its kind and its fields (the match in `fault_of` is exhaustive,
    /// so a new kind cannot be forgotten there; this checks the way back).
    #[test]
    fn every_volume_error_kind_round_trips() {
        let io = || StoreError::io("disk", std::io::Error::other("boom"));
        let errors = vec![
            VolumeError::OutOfRange { offset: 4096, len: 512, size: 4096 },
            VolumeError::Misaligned { offset: 1, len: 3 },
            VolumeError::TooLarge(MAX_PAYLOAD + 1),
            VolumeError::ReadOnly,
            VolumeError::NoSpace(StoreError::io("f", std::io::Error::from_raw_os_error(libc::ENOSPC))),
            VolumeError::Checksum { key: ExtentKey { volume: VolumeId(3), index: ExtentIndex(7) }, block: 9 },
            VolumeError::Io(io()),
            VolumeError::NotOwner { generation: Generation(12) },
            VolumeError::Unavailable("owner timed out".into()),
        ];
        for e in errors {
            let wire = VolumeErr { fault: fault_of(&e), message: error_chain(&e) };
            let back = error_of(wire);
            assert_eq!(back.kind(), e.kind(), "{e:?}");
            assert_eq!(fault_of(&back), fault_of(&e), "{e:?}");
            if let VolumeError::NoSpace(s) = &back {
                assert!(s.is_no_space());
            }
        }
    }
}
