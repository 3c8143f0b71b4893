//! iSCSI PDU framing (RFC 7143 section 11): the 48-byte Basic Header Segment,
//! additional header segments, optional CRC32C digests and 4-byte padding.
//!
//! Owns: turning bytes into whole [`Pdu`]s and back. Must never: trust a
//! length from the wire before checking it against a hard cap, or buffer
//! more than one PDU of the declared maximum size.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// The reserved tag value: "no task" / "no response wanted".
pub const RESERVED_TAG: u32 = 0xffff_ffff;
/// The largest data segment we will ever agree to receive (MaxRecvDataSegmentLength
/// is capped here whatever the config says, though the RFC allows up to 2^24-1).
pub const MAX_DATA_SEGMENT_CAP: u32 = 1 << 20;

/// PDU opcodes (RFC 7143 11.2.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Opcode {
    NopOut = 0x00,
    ScsiCommand = 0x01,
    TaskMgmtRequest = 0x02,
    LoginRequest = 0x03,
    TextRequest = 0x04,
    DataOut = 0x05,
    LogoutRequest = 0x06,
    Snack = 0x10,
    NopIn = 0x20,
    ScsiResponse = 0x21,
    TaskMgmtResponse = 0x22,
    LoginResponse = 0x23,
    TextResponse = 0x24,
    DataIn = 0x25,
    LogoutResponse = 0x26,
    R2t = 0x31,
    AsyncMessage = 0x32,
    Reject = 0x3f,
}

impl Opcode {
    pub fn from_u8(v: u8) -> Option<Opcode> {
        use Opcode::*;
        Some(match v {
            0x00 => NopOut,
            0x01 => ScsiCommand,
            0x02 => TaskMgmtRequest,
            0x03 => LoginRequest,
            0x04 => TextRequest,
            0x05 => DataOut,
            0x06 => LogoutRequest,
            0x10 => Snack,
            0x20 => NopIn,
            0x21 => ScsiResponse,
            0x22 => TaskMgmtResponse,
            0x23 => LoginResponse,
            0x24 => TextResponse,
            0x25 => DataIn,
            0x26 => LogoutResponse,
            0x31 => R2t,
            0x32 => AsyncMessage,
            0x3f => Reject,
            _ => return None,
        })
    }
}

/// Reject reasons (RFC 7143 11.17.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RejectReason {
    DataDigest = 0x02,
    SnackReject = 0x03,
    ProtocolError = 0x04,
    CommandNotSupported = 0x05,
    ImmediateCommandReject = 0x06,
    TaskInProgress = 0x07,
    InvalidDataAck = 0x08,
    InvalidPduField = 0x09,
    OutOfResources = 0x0a,
    WaitingForLogout = 0x0c,
}

/// Why bytes could not be framed into a PDU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    #[error("data segment of {len} bytes is over the negotiated maximum {max}")]
    DataTooLong { len: u32, max: u32, header: Box<[u8; BHS_LEN]> },
    #[error("header digest mismatch (sent {sent:#010x}, computed {computed:#010x})")]
    HeaderDigest { sent: u32, computed: u32 },
    #[error("data digest mismatch (sent {sent:#010x}, computed {computed:#010x})")]
    DataDigest { sent: u32, computed: u32, header: Box<[u8; BHS_LEN]> },
}

impl PduError {
    /// The header of the offending PDU, when it is known to be intact
    /// (a Reject carries it back to the initiator).
    pub fn header(&self) -> Option<&[u8; BHS_LEN]> {
        match self {
            PduError::DataTooLong { header, .. } | PduError::DataDigest { header, .. } => Some(header),
            PduError::HeaderDigest { .. } => None,
        }
    }
}

/// SAM-5 task attributes: how a command is ordered against the others of
/// its session (SAM-5 8.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskAttr {
    /// Waits only for older ORDERED and HEAD OF QUEUE commands.
    Simple,
    /// Starts once every older command has ended; younger SIMPLE and
    /// ORDERED commands wait for it.
    Ordered,
    /// Starts at once; younger SIMPLE and ORDERED commands wait for it.
    HeadOfQueue,
    /// Only valid during an ACA condition, which we never establish.
    Aca,
}

/// One PDU: the raw BHS plus its AHS and data segment (no padding, no digests).
/// Field accessors read the BHS in place, so a PDU always re-encodes to the
/// same bytes it was decoded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: [u8; BHS_LEN],
    pub ahs: Bytes,
    pub data: Bytes,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Pdu {
    /// A PDU with `op` in byte 0 and the final bit set; everything else zero.
    pub fn new(op: Opcode) -> Pdu {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = op as u8;
        bhs[1] = 0x80;
        Pdu { bhs, ahs: Bytes::new(), data: Bytes::new() }
    }

    pub fn raw_opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }

    pub fn opcode(&self) -> Option<Opcode> {
        Opcode::from_u8(self.raw_opcode())
    }

    pub fn immediate(&self) -> bool {
        self.bhs[0] & 0x40 != 0
    }

    /// The task attribute of a SCSI Command PDU (ATTR, byte 1 bits 0-2).
    pub fn task_attr(&self) -> TaskAttr {
        match self.bhs[1] & 0x07 {
            2 => TaskAttr::Ordered,
            3 => TaskAttr::HeadOfQueue,
            4 => TaskAttr::Aca,
            // 0 is untagged, which SAM-5 runs as SIMPLE; 5-7 are reserved
            // and run as SIMPLE too rather than fail a whole command.
            _ => TaskAttr::Simple,
        }
    }

    pub fn set_immediate(&mut self, on: bool) {
        if on { self.bhs[0] |= 0x40 } else { self.bhs[0] &= !0x40 }
    }

    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }

    pub fn final_bit(&self) -> bool {
        self.bhs[1] & 0x80 != 0
    }

    pub fn u32_at(&self, at: usize) -> u32 {
        be32(&self.bhs, at)
    }

    pub fn set_u32(&mut self, at: usize, v: u32) {
        self.bhs[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    pub fn u16_at(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.bhs[at], self.bhs[at + 1]])
    }

    pub fn set_u16(&mut self, at: usize, v: u16) {
        self.bhs[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }

    pub fn lun(&self) -> u64 {
        u64::from_be_bytes(self.bhs[8..16].try_into().unwrap())
    }

    pub fn set_lun(&mut self, lun: u64) {
        self.bhs[8..16].copy_from_slice(&lun.to_be_bytes());
    }

    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }

    pub fn set_itt(&mut self, v: u32) {
        self.set_u32(16, v)
    }

    /// Bytes 20..24: TTT, EDTL, CID or Referenced Task Tag depending on the opcode.
    pub fn word20(&self) -> u32 {
        self.u32_at(20)
    }

    /// CmdSN in initiator PDUs, StatSN in target PDUs.
    pub fn word24(&self) -> u32 {
        self.u32_at(24)
    }

    /// ExpStatSN in initiator PDUs, ExpCmdSN in target PDUs.
    pub fn word28(&self) -> u32 {
        self.u32_at(28)
    }

    /// TotalAHSLength as declared in the header (in bytes).
    pub fn declared_ahs_len(&self) -> usize {
        self.bhs[4] as usize * 4
    }

    /// DataSegmentLength as declared in the header.
    pub fn declared_data_len(&self) -> u32 {
        u32::from_be_bytes([0, self.bhs[5], self.bhs[6], self.bhs[7]])
    }
}

/// What the framing needs to know about the connection: the receive cap
/// we declared and the digests negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecConfig {
    pub max_recv_data: u32,
    pub header_digest: bool,
    pub data_digest: bool,
}

impl Default for CodecConfig {
    /// Login phase: no digests, the RFC's default 8 KiB segment.
    fn default() -> Self {
        CodecConfig { max_recv_data: 8192, header_digest: false, data_digest: false }
    }
}

/// Digests go on the wire least significant byte first (RFC 7143 appendix B.4
/// lists the CRC of 32 zero bytes as the byte sequence aa 36 91 8a).
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

fn crc(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0u32, |acc, p| crc32c::crc32c_append(acc, p))
}

/// Decodes one PDU from the front of `buf`. Returns `Ok(None)` (consuming
/// nothing) until the whole PDU is there. On error the buffer is left as
/// it was; the connection cannot resynchronize and should close.
pub fn decode(buf: &mut BytesMut, cfg: &CodecConfig) -> Result<Option<Pdu>, PduError> {
    if buf.len() < BHS_LEN {
        return Ok(None);
    }
    let bhs: [u8; BHS_LEN] = buf[..BHS_LEN].try_into().unwrap();
    let ahs_len = bhs[4] as usize * 4;
    let data_len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]);
    // Checked before waiting for the rest: an oversized segment must not
    // make us buffer it.
    let max = cfg.max_recv_data.min(MAX_DATA_SEGMENT_CAP);
    if data_len > max {
        return Err(PduError::DataTooLong { len: data_len, max, header: Box::new(bhs) });
    }
    let data_len = data_len as usize;
    let hd = if cfg.header_digest { 4 } else { 0 };
    let dd = if cfg.data_digest && data_len > 0 { 4 } else { 0 };
    let header_total = BHS_LEN + ahs_len + hd;
    let total = header_total + data_len + pad4(data_len) + dd;
    if buf.len() < header_total {
        return Ok(None);
    }
    if cfg.header_digest {
        let sent = le32(buf, BHS_LEN + ahs_len);
        let computed = crc(&[&buf[..BHS_LEN + ahs_len]]);
        if sent != computed {
            return Err(PduError::HeaderDigest { sent, computed });
        }
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    if dd != 0 {
        let start = header_total;
        let padded = data_len + pad4(data_len);
        let sent = le32(buf, start + padded);
        let computed = crc(&[&buf[start..start + padded]]);
        if sent != computed {
            return Err(PduError::DataDigest { sent, computed, header: Box::new(bhs) });
        }
    }
    let mut frame = buf.split_to(total).freeze();
    frame.advance(BHS_LEN);
    let ahs = frame.split_to(ahs_len);
    frame.advance(hd);
    let data = frame.split_to(data_len);
    Ok(Some(Pdu { bhs, ahs, data }))
}

/// Appends the wire form of `pdu` to `out`, filling in TotalAHSLength and
/// DataSegmentLength from the segments it carries.
///
/// Panics if the AHS is not a multiple of 4 bytes or over 1020 bytes, or
/// the data is over 2^24-1 bytes: those are bugs in the caller, never
/// input from the wire.
pub fn encode(pdu: &Pdu, cfg: &CodecConfig, out: &mut BytesMut) {
    assert!(pdu.ahs.len().is_multiple_of(4) && pdu.ahs.len() <= 255 * 4, "bad AHS length");
    assert!(pdu.data.len() < 1 << 24, "data segment too long");
    let mut bhs = pdu.bhs;
    bhs[4] = (pdu.ahs.len() / 4) as u8;
    let dl = (pdu.data.len() as u32).to_be_bytes();
    bhs[5..8].copy_from_slice(&dl[1..]);
    let pad = pad4(pdu.data.len());
    out.reserve(BHS_LEN + pdu.ahs.len() + 8 + pdu.data.len() + pad);
    out.put_slice(&bhs);
    out.put_slice(&pdu.ahs);
    if cfg.header_digest {
        out.put_u32_le(crc(&[&bhs, &pdu.ahs]));
    }
    if !pdu.data.is_empty() {
        out.put_slice(&pdu.data);
        out.put_bytes(0, pad);
        if cfg.data_digest {
            out.put_u32_le(crc(&[&pdu.data, &[0u8; 3][..pad]]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_attributes() {
        let mut p = Pdu::new(Opcode::ScsiCommand);
        for (bits, attr) in [
            (0, TaskAttr::Simple),
            (1, TaskAttr::Simple),
            (2, TaskAttr::Ordered),
            (3, TaskAttr::HeadOfQueue),
            (4, TaskAttr::Aca),
            (5, TaskAttr::Simple),
            (7, TaskAttr::Simple),
        ] {
            p.bhs[1] = 0x80 | 0x40 | bits;
            assert_eq!(p.task_attr(), attr, "ATTR {bits}");
        }
    }

    fn cfg() -> CodecConfig {
        CodecConfig { max_recv_data: 65536, header_digest: false, data_digest: false }
    }

    fn sample() -> Pdu {
        let mut p = Pdu::new(Opcode::ScsiCommand);
        p.set_itt(7);
        p.data = Bytes::from_static(b"hello");
        p
    }

    #[test]
    fn partial_header_is_none() {
        let mut b = BytesMut::from(&[0u8; 47][..]);
        assert_eq!(decode(&mut b, &cfg()).unwrap(), None);
        assert_eq!(b.len(), 47);
    }

    #[test]
    fn partial_data_is_none_and_consumes_nothing() {
        let mut out = BytesMut::new();
        encode(&sample(), &cfg(), &mut out);
        assert_eq!(out.len(), 48 + 8);
        let mut part = BytesMut::from(&out[..50]);
        assert_eq!(decode(&mut part, &cfg()).unwrap(), None);
        assert_eq!(part.len(), 50);
    }

    #[test]
    fn padding_is_added_and_stripped() {
        let mut out = BytesMut::new();
        encode(&sample(), &cfg(), &mut out);
        assert_eq!(&out[48 + 5..], &[0, 0, 0]);
        let p = decode(&mut out, &cfg()).unwrap().unwrap();
        assert_eq!(&p.data[..], b"hello");
        assert!(out.is_empty());
    }

    #[test]
    fn oversized_data_segment_is_refused_from_the_header_alone() {
        let mut p = Pdu::new(Opcode::ScsiCommand);
        p.bhs[5..8].copy_from_slice(&[0x01, 0x00, 0x01]); // 65537
        let mut b = BytesMut::from(&p.bhs[..]);
        match decode(&mut b, &cfg()) {
            Err(PduError::DataTooLong { len: 65537, max: 65536, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn max_recv_is_capped_by_hard_limit() {
        let mut p = Pdu::new(Opcode::DataOut);
        p.bhs[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
        let mut b = BytesMut::from(&p.bhs[..]);
        let c = CodecConfig { max_recv_data: u32::MAX, ..cfg() };
        assert!(matches!(decode(&mut b, &c), Err(PduError::DataTooLong { max: MAX_DATA_SEGMENT_CAP, .. })));
    }

    #[test]
    fn header_digest_mismatch() {
        let c = CodecConfig { header_digest: true, ..cfg() };
        let mut out = BytesMut::new();
        encode(&sample(), &c, &mut out);
        out[49] ^= 1;
        assert!(matches!(decode(&mut out, &c), Err(PduError::HeaderDigest { .. })));
    }

    #[test]
    fn data_digest_mismatch() {
        let c = CodecConfig { data_digest: true, ..cfg() };
        let mut out = BytesMut::new();
        encode(&sample(), &c, &mut out);
        out[48] ^= 1;
        assert!(matches!(decode(&mut out, &c), Err(PduError::DataDigest { .. })));
    }

    #[test]
    fn digests_round_trip_and_empty_data_has_no_data_digest() {
        let c = CodecConfig { header_digest: true, data_digest: true, ..cfg() };
        let mut out = BytesMut::new();
        encode(&Pdu::new(Opcode::NopOut), &c, &mut out);
        assert_eq!(out.len(), 52);
        encode(&sample(), &c, &mut out);
        assert_eq!(decode(&mut out, &c).unwrap().unwrap(), Pdu::new(Opcode::NopOut));
        assert_eq!(decode(&mut out, &c).unwrap().unwrap().data, Bytes::from_static(b"hello"));
    }

    #[test]
    fn ahs_is_split_out() {
        let mut p = sample();
        p.ahs = Bytes::from_static(&[0, 4, 1, 0, 1, 2, 3, 4]);
        let mut out = BytesMut::new();
        encode(&p, &cfg(), &mut out);
        let d = decode(&mut out, &cfg()).unwrap().unwrap();
        assert_eq!(d.ahs.len(), 8);
        assert_eq!(d.declared_ahs_len(), 8);
        assert_eq!(d, Pdu { bhs: d.bhs, ..p });
    }

    #[test]
    fn unknown_opcode_still_frames() {
        let mut p = Pdu::new(Opcode::NopOut);
        p.bhs[0] = 0x1e;
        let mut out = BytesMut::new();
        encode(&p, &cfg(), &mut out);
        let d = decode(&mut out, &cfg()).unwrap().unwrap();
        assert_eq!(d.opcode(), None);
        assert_eq!(d.raw_opcode(), 0x1e);
    }

    #[test]
    fn the_known_rfc_crc32c_vector() {
        // RFC 7143 appendix: 32 bytes of zeros have CRC32C 0x8a9136aa.
        assert_eq!(crc(&[&[0u8; 32]]), 0x8a91_36aa);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn arb_pdu() -> impl Strategy<Value = Pdu> {
            (
                proptest::collection::vec(any::<u8>(), 48),
                proptest::collection::vec(any::<u8>(), 0..16usize),
                proptest::collection::vec(any::<u8>(), 0..3000usize),
            )
                .prop_map(|(b, ahs_words, data)| {
                    let mut bhs = [0u8; BHS_LEN];
                    bhs.copy_from_slice(&b);
                    let ahs: Vec<u8> = ahs_words.iter().flat_map(|w| [*w; 4]).collect();
                    bhs[4] = (ahs.len() / 4) as u8;
                    bhs[5..8].copy_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
                    Pdu { bhs, ahs: Bytes::from(ahs), data: Bytes::from(data) }
                })
        }

        proptest! {
            #[test]
            fn round_trip(p in arb_pdu(), hd in any::<bool>(), dd in any::<bool>()) {
                let c = CodecConfig { max_recv_data: 4096, header_digest: hd, data_digest: dd };
                let mut out = BytesMut::new();
                encode(&p, &c, &mut out);
                prop_assert_eq!(out.len() % 4, 0);
                let mut two = out.clone();
                two.extend_from_slice(&out);
                prop_assert_eq!(decode(&mut two, &c).unwrap(), Some(p.clone()));
                prop_assert_eq!(decode(&mut two, &c).unwrap(), Some(p));
                prop_assert!(two.is_empty());
            }

            #[test]
            fn byte_at_a_time_is_the_same(p in arb_pdu(), hd in any::<bool>()) {
                let c = CodecConfig { max_recv_data: 4096, header_digest: hd, data_digest: true };
                let mut out = BytesMut::new();
                encode(&p, &c, &mut out);
                let mut buf = BytesMut::new();
                let mut got = None;
                for (i, b) in out.iter().enumerate() {
                    buf.extend_from_slice(&[*b]);
                    let r = decode(&mut buf, &c).unwrap();
                    if i + 1 < out.len() {
                        prop_assert_eq!(r, None);
                    } else {
                        got = r;
                    }
                }
                prop_assert_eq!(got, Some(p));
            }

            #[test]
            fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096), hd in any::<bool>(), dd in any::<bool>()) {
                let c = CodecConfig { max_recv_data: 1024, header_digest: hd, data_digest: dd };
                let mut buf = BytesMut::from(&bytes[..]);
                while let Ok(Some(p)) = decode(&mut buf, &c) {
                    prop_assert!(p.data.len() <= 1024);
                }
            }
        }
    }
}
