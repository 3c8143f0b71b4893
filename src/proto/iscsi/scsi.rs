//! SCSI block commands (SBC-3/SPC-4) as a pure layer: CDB parsing with
//! every field checked, sense data, and the fixed-format responses
//! (INQUIRY and VPD pages, MODE SENSE, READ CAPACITY, REPORT LUNS,
//! REPORT SUPPORTED OPERATION CODES). Execution against a volume lives in
//! `export::iscsi`; this module never touches one.

/// Logical block size we expose.
pub const BLOCK: u64 = 512;
/// log2(physical / logical) reported by READ CAPACITY(16). 0: the store
/// really is 512-byte addressable (sub-4 KiB writes are read-modify-write
/// inside one crash-atomic block), and reporting 4 KiB physical blocks would
/// promise unmap/status granularity we do not keep per 512-byte sector
/// (libiscsi's GetLBAStatus.UnmapSingle checks exactly that). The 4 KiB
/// preference is still advertised as the optimal granularity below.
pub const PHYS_EXP: u8 = 0;
/// Optimal transfer and unmap granularity (Block Limits VPD): 4 KiB.
pub const OPT_GRANULARITY_BLOCKS: u32 = 8;
/// Most blocks one READ/WRITE may move (32 MiB, `node::volume::MAX_PAYLOAD`).
pub const MAX_XFER_BLOCKS: u32 = (32 << 20) / BLOCK as u32;
/// Most blocks one COMPARE AND WRITE may cover.
pub const MAX_CAW_BLOCKS: u8 = 128;
/// UNMAP limits advertised in the Block Limits VPD page.
pub const MAX_UNMAP_BLOCKS: u32 = 1 << 19;
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// WRITE SAME limit (blocks) advertised and enforced.
pub const MAX_WRITE_SAME_BLOCKS: u64 = 1 << 22;

pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
    pub const BUSY: u8 = 0x08;
    pub const TASK_SET_FULL: u8 = 0x28;
    pub const TASK_ABORTED: u8 = 0x40;
}

pub mod key {
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const ABORTED_COMMAND: u8 = 0xb;
    pub const MISCOMPARE: u8 = 0xe;

    /// The sense key's name in SPC-4, for log lines.
    pub fn name(key: u8) -> &'static str {
        match key {
            NO_SENSE => "NO SENSE",
            NOT_READY => "NOT READY",
            MEDIUM_ERROR => "MEDIUM ERROR",
            HARDWARE_ERROR => "HARDWARE ERROR",
            ILLEGAL_REQUEST => "ILLEGAL REQUEST",
            UNIT_ATTENTION => "UNIT ATTENTION",
            DATA_PROTECT => "DATA PROTECT",
            ABORTED_COMMAND => "ABORTED COMMAND",
            MISCOMPARE => "MISCOMPARE",
            _ => "OTHER",
        }
    }
}

/// Sense data: key, additional sense code and qualifier, and the optional
/// INFORMATION field (a miscompare offset, for instance).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    pub info: Option<u64>,
}

impl Sense {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense { key, asc, ascq, info: None }
    }
    pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1a, 0x00);
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
    pub const WRITE_PROTECTED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x00);
    pub const SPACE_ALLOCATION_FAILED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x07);
    pub const UNRECOVERED_READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
    pub const WRITE_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x0c, 0x00);
    pub const INTERNAL_TARGET_FAILURE: Sense = Sense::new(key::HARDWARE_ERROR, 0x44, 0x00);
    pub const MISCOMPARE_DURING_VERIFY: Sense = Sense::new(key::MISCOMPARE, 0x1d, 0x00);
    /// SAM-5: a command with the ACA task attribute when no ACA condition exists.
    pub const INVALID_MESSAGE_ERROR: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x49, 0x00);
    /// Data-Out sequence errors (SPC-4 ASC 0x4B family).
    pub const DATA_PHASE_ERROR: Sense = Sense::new(key::ABORTED_COMMAND, 0x4b, 0x00);
    pub const INVALID_TTT: Sense = Sense::new(key::ABORTED_COMMAND, 0x4b, 0x01);
    pub const TOO_MUCH_WRITE_DATA: Sense = Sense::new(key::ABORTED_COMMAND, 0x4b, 0x02);
    pub const DATA_OFFSET_ERROR: Sense = Sense::new(key::ABORTED_COMMAND, 0x4b, 0x05);

    pub const fn with_info(mut self, info: u64) -> Sense {
        self.info = Some(info);
        self
    }

    /// Fixed-format sense data (SPC-4 4.5.3), 18 bytes.
    pub fn fixed(&self) -> Vec<u8> {
        let mut s = vec![0u8; 18];
        s[0] = 0x70;
        s[2] = self.key & 0x0f;
        if let Some(info) = self.info {
            // The 4-byte INFORMATION field; VALID only if it fits.
            if let Ok(i) = u32::try_from(info) {
                s[0] |= 0x80;
                s[3..7].copy_from_slice(&i.to_be_bytes());
            }
        }
        s[7] = 10;
        s[12] = self.asc;
        s[13] = self.ascq;
        s
    }

    /// Descriptor-format sense data (SPC-4 4.5.2), with an information
    /// descriptor when there is one.
    pub fn descriptor(&self) -> Vec<u8> {
        let mut s = vec![0x72, self.key & 0x0f, self.asc, self.ascq, 0, 0, 0, 0];
        if let Some(info) = self.info {
            s.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
            s.extend_from_slice(&info.to_be_bytes());
            s[7] = 12;
        }
        s
    }
}

/// A parsed CDB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    TestUnitReady,
    RequestSense {
        desc: bool,
        alloc: u32,
    },
    Inquiry {
        evpd: bool,
        page: u8,
        alloc: u32,
    },
    ModeSense(ModeSense),
    ReadCapacity10,
    ReadCapacity16 {
        alloc: u32,
    },
    Read {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    Write {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    SyncCache {
        lba: u64,
        blocks: u32,
    },
    WriteSame {
        lba: u64,
        blocks: u32,
        unmap: bool,
        ndob: bool,
    },
    Unmap {
        param_len: u32,
    },
    CompareAndWrite {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    /// `bytchk`: 0 no compare, 1 compare `blocks` blocks, 3 compare one block against each.
    Verify {
        lba: u64,
        blocks: u32,
        bytchk: u8,
    },
    WriteAndVerify {
        lba: u64,
        blocks: u32,
    },
    GetLbaStatus {
        lba: u64,
        alloc: u32,
    },
    ReportLuns {
        alloc: u32,
    },
    ReportSupportedOpcodes {
        rctd: bool,
        options: u8,
        opcode: u8,
        sa: u16,
        alloc: u32,
    },
    /// START STOP UNIT and PREVENT ALLOW MEDIUM REMOVAL: accepted, nothing to do.
    NoOp,
}

impl Command {
    /// Bytes the command expects from the initiator (its SPDTL for Data-Out).
    pub fn data_out_len(&self) -> u64 {
        match *self {
            Command::Write { blocks, .. } | Command::WriteAndVerify { blocks, .. } => blocks as u64 * BLOCK,
            Command::WriteSame { blocks, ndob, .. } => {
                if ndob || blocks == 0 {
                    0
                } else {
                    BLOCK
                }
            }
            Command::Unmap { param_len } => param_len as u64,
            Command::CompareAndWrite { blocks, .. } => 2 * blocks as u64 * BLOCK,
            Command::Verify { blocks, bytchk: 1, .. } => blocks as u64 * BLOCK,
            Command::Verify { blocks, bytchk: 3, .. } if blocks > 0 => BLOCK,
            _ => 0,
        }
    }

    /// True for commands whose CDB implies a Data-Out phase (even of zero
    /// bytes): a transfer length the CDB does not account for is refused.
    pub fn has_data_out(&self) -> bool {
        self.writes() || matches!(self, Command::Verify { bytchk: 1 | 3, .. })
    }

    /// The same command cut down to at most `blocks` blocks, for commands
    /// that can be carried out in part (WRITE, WRITE AND VERIFY).
    pub fn truncated(&self, blocks: u64) -> Option<Command> {
        let cut = |b: u32| (b as u64).min(blocks) as u32;
        match *self {
            Command::Write { lba, blocks: b, fua } => Some(Command::Write { lba, blocks: cut(b), fua }),
            Command::WriteAndVerify { lba, blocks: b } => {
                Some(Command::WriteAndVerify { lba, blocks: cut(b) })
            }
            _ => None,
        }
    }

    /// True for commands that change the medium (refused on a read-only LUN).
    pub fn writes(&self) -> bool {
        matches!(
            self,
            Command::Write { .. }
                | Command::WriteSame { .. }
                | Command::Unmap { .. }
                | Command::CompareAndWrite { .. }
                | Command::WriteAndVerify { .. }
        )
    }
}

fn u16b(c: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([c[at], c[at + 1]])
}
fn u32b(c: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(c[at..at + 4].try_into().unwrap())
}
/// LBA and transfer length of a READ/WRITE-shaped 10-, 12- or 16-byte CDB,
/// told apart by the opcode's group code (SPC-4 4.2.5.1).
fn lba_and_len(c: &[u8; 16]) -> (u64, u32) {
    match c[0] >> 5 {
        1 => (u32b(c, 2) as u64, u16b(c, 7) as u32),
        5 => (u32b(c, 2) as u64, u32b(c, 6)),
        _ => (u64b(c, 2), u32b(c, 10)),
    }
}

fn u64b(c: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(c[at..at + 8].try_into().unwrap())
}

/// Opcodes we implement, with their CDB length and service action (for
/// REPORT SUPPORTED OPERATION CODES).
pub const SUPPORTED: &[(u8, Option<u16>, u8)] = &[
    (0x00, None, 6),
    (0x03, None, 6),
    (0x08, None, 6),
    (0x0a, None, 6),
    (0x12, None, 6),
    (0x1a, None, 6),
    (0x1b, None, 6),
    (0x1e, None, 6),
    (0x25, None, 10),
    (0x28, None, 10),
    (0x2a, None, 10),
    (0x2e, None, 10),
    (0x2f, None, 10),
    (0x35, None, 10),
    (0x41, None, 10),
    (0x42, None, 10),
    (0x5a, None, 10),
    (0x88, None, 16),
    (0x89, None, 16),
    (0x8a, None, 16),
    (0x8e, None, 16),
    (0x8f, None, 16),
    (0x91, None, 16),
    (0x93, None, 16),
    (0x9e, Some(0x10), 16),
    (0x9e, Some(0x12), 16),
    (0xa0, None, 12),
    (0xa3, Some(0x0c), 12),
    (0xa8, None, 12),
    (0xaa, None, 12),
    (0xae, None, 12),
    (0xaf, None, 12),
];

/// Parses a CDB (the 16 bytes of the SCSI Command PDU). Errors are the
/// sense data to answer with.
pub fn parse(cdb: &[u8; 16]) -> Result<Command, Sense> {
    let c = &cdb[..];
    let op = c[0];
    // Protection information is not supported (INQUIRY PROTECT=0): any
    // RDPROTECT/WRPROTECT/VRPROTECT value is an invalid field.
    let protect = |c: &[u8]| if c[1] & 0xe0 != 0 { Err(Sense::INVALID_FIELD_IN_CDB) } else { Ok(()) };
    let fua = |c: &[u8]| c[1] & 0x08 != 0;
    Ok(match op {
        0x00 => Command::TestUnitReady,
        0x03 => Command::RequestSense { desc: c[1] & 1 != 0, alloc: c[4] as u32 },
        0x12 => {
            let evpd = c[1] & 1 != 0;
            if c[1] & 0xfe != 0 || (!evpd && c[2] != 0) {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            Command::Inquiry { evpd, page: c[2], alloc: u16b(c, 3) as u32 }
        }
        0x1a | 0x5a => {
            let ten = op == 0x5a;
            Command::ModeSense(ModeSense {
                ten,
                dbd: c[1] & 0x08 != 0,
                llbaa: ten && c[1] & 0x10 != 0,
                pc: c[2] >> 6,
                page: c[2] & 0x3f,
                subpage: c[3],
                alloc: if ten { u16b(c, 7) as u32 } else { c[4] as u32 },
            })
        }
        0x1b | 0x1e => Command::NoOp,
        0x25 => {
            // PMI=0 requires LBA=0 (SBC-3 5.16).
            if c[8] & 1 == 0 && u32b(c, 2) != 0 {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            Command::ReadCapacity10
        }
        0x9e => match c[1] & 0x1f {
            0x10 => Command::ReadCapacity16 { alloc: u32b(c, 10) },
            0x12 => Command::GetLbaStatus { lba: u64b(c, 2), alloc: u32b(c, 10) },
            _ => return Err(Sense::INVALID_FIELD_IN_CDB),
        },
        0x08 | 0x0a => {
            let lba = (u32::from_be_bytes([0, c[1] & 0x1f, c[2], c[3]])) as u64;
            // A zero length in READ(6)/WRITE(6) means 256 blocks.
            let blocks = if c[4] == 0 { 256 } else { c[4] as u32 };
            if op == 0x08 {
                Command::Read { lba, blocks, fua: false }
            } else {
                Command::Write { lba, blocks, fua: false }
            }
        }
        0x28 | 0x2a | 0xa8 | 0xaa | 0x88 | 0x8a => {
            protect(c)?;
            let (lba, blocks) = lba_and_len(cdb);
            if blocks > MAX_XFER_BLOCKS {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            if matches!(op, 0x28 | 0xa8 | 0x88) {
                Command::Read { lba, blocks, fua: fua(c) }
            } else {
                Command::Write { lba, blocks, fua: fua(c) }
            }
        }
        0x35 => Command::SyncCache { lba: u32b(c, 2) as u64, blocks: u16b(c, 7) as u32 },
        0x91 => Command::SyncCache { lba: u64b(c, 2), blocks: u32b(c, 10) },
        0x41 | 0x93 => {
            protect(c)?;
            let unmap = c[1] & 0x08 != 0;
            let anchor = c[1] & 0x10 != 0;
            let ndob = op == 0x93 && c[1] & 0x01 != 0;
            let (lba, blocks) =
                if op == 0x41 { (u32b(c, 2) as u64, u16b(c, 7) as u32) } else { (u64b(c, 2), u32b(c, 10)) };
            // ANCHOR is not supported (ANC_SUP=0); a zero count is not
            // supported either (WSNZ=1).
            if anchor || blocks == 0 || blocks as u64 > MAX_WRITE_SAME_BLOCKS {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            Command::WriteSame { lba, blocks, unmap, ndob }
        }
        0x42 => {
            if c[1] & 0x01 != 0 {
                return Err(Sense::INVALID_FIELD_IN_CDB); // ANCHOR
            }
            Command::Unmap { param_len: u16b(c, 7) as u32 }
        }
        0x89 => {
            protect(c)?;
            let blocks = c[13] as u32;
            if blocks > MAX_CAW_BLOCKS as u32 {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            Command::CompareAndWrite { lba: u64b(c, 2), blocks, fua: fua(c) }
        }
        0x2f | 0xaf | 0x8f | 0x2e | 0xae | 0x8e => {
            protect(c)?;
            let (lba, blocks) = lba_and_len(cdb);
            if blocks > MAX_XFER_BLOCKS {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            let bytchk = (c[1] >> 1) & 3;
            if matches!(op, 0x2f | 0xaf | 0x8f) {
                if bytchk == 2 {
                    return Err(Sense::INVALID_FIELD_IN_CDB);
                }
                Command::Verify { lba, blocks, bytchk }
            } else {
                if bytchk > 1 {
                    return Err(Sense::INVALID_FIELD_IN_CDB);
                }
                Command::WriteAndVerify { lba, blocks }
            }
        }
        0xa0 => {
            let alloc = u32b(c, 6);
            if !matches!(c[2], 0x00..=0x02 | 0x10..=0x12) || alloc < 16 {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            Command::ReportLuns { alloc }
        }
        0xa3 if c[1] & 0x1f == 0x0c => {
            let options = c[2] & 0x07;
            if options > 3 {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            Command::ReportSupportedOpcodes {
                rctd: c[2] & 0x80 != 0,
                options,
                opcode: c[3],
                sa: u16b(c, 4),
                alloc: u32b(c, 6),
            }
        }
        _ => return Err(Sense::INVALID_OPCODE),
    })
}

/// Checks that `blocks` blocks at `lba` fit a LUN of `capacity` blocks.
pub fn check_range(lba: u64, blocks: u64, capacity: u64) -> Result<(), Sense> {
    match lba.checked_add(blocks) {
        Some(end) if end <= capacity && lba <= capacity => Ok(()),
        _ => Err(Sense::LBA_OUT_OF_RANGE),
    }
}

/// What the LUN looks like to the response builders.
#[derive(Debug, Clone)]
pub struct LunInfo {
    /// Capacity in logical blocks.
    pub blocks: u64,
    pub read_only: bool,
    /// VPD 0x80 serial, printable ASCII.
    pub serial: String,
    /// A 60-bit identifier unique to the volume (NAA locally assigned).
    pub uid: u64,
    /// The target's IQN.
    pub target_name: String,
}

fn trunc(mut v: Vec<u8>, alloc: u32) -> Vec<u8> {
    v.truncate(alloc as usize);
    v
}

fn padded(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s.bytes().take(n).collect();
    v.resize(n, b' ');
    v
}

pub const VENDOR: &str = "BASALT";
pub const PRODUCT: &str = "VOLUME";
pub const REVISION: &str = "0001";
const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

/// Standard INQUIRY data or a VPD page, truncated to `alloc`.
pub fn inquiry(lun: &LunInfo, evpd: bool, page: u8, alloc: u32) -> Result<Vec<u8>, Sense> {
    if !evpd {
        let mut d = vec![0u8; 96];
        d[0] = 0x00; // connected, direct access block device
        d[2] = 0x06; // SPC-4
        d[3] = 0x12; // HISUP, response data format 2
        d[4] = (d.len() - 5) as u8;
        d[7] = 0x02; // CMDQUE
        d[8..16].copy_from_slice(&padded(VENDOR, 8));
        d[16..32].copy_from_slice(&padded(PRODUCT, 16));
        d[32..36].copy_from_slice(&padded(REVISION, 4));
        // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
        for (i, v) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
            d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
        }
        return Ok(trunc(d, alloc));
    }
    let body: Vec<u8> = match page {
        0x00 => VPD_PAGES.to_vec(),
        0x80 => lun.serial.bytes().filter(|b| b.is_ascii_graphic()).collect(),
        0x83 => {
            let mut b = Vec::new();
            // NAA locally assigned (type 3), binary, LU association.
            b.extend_from_slice(&[0x01, 0x03, 0x00, 0x08]);
            b.extend_from_slice(&((0x3u64 << 60) | (lun.uid & ((1 << 60) - 1))).to_be_bytes());
            // T10 vendor ID (type 1), ASCII, LU association.
            let t10: Vec<u8> = padded(VENDOR, 8)
                .into_iter()
                .chain(lun.serial.bytes().filter(|b| b.is_ascii_graphic()))
                .collect();
            b.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
            b.extend_from_slice(&t10);
            // SCSI name string (type 8), UTF-8, target device association, iSCSI.
            let mut name = lun.target_name.as_bytes().to_vec();
            name.push(0);
            while !name.len().is_multiple_of(4) {
                name.push(0);
            }
            name.truncate(252);
            b.extend_from_slice(&[0x53, 0xa8, 0x00, name.len() as u8]);
            b.extend_from_slice(&name);
            b
        }
        0xb0 => {
            let mut b = vec![0u8; 60];
            b[0] = 0x01; // WSNZ: WRITE SAME with zero blocks is refused
            b[1] = MAX_CAW_BLOCKS;
            b[2..4].copy_from_slice(&(OPT_GRANULARITY_BLOCKS as u16).to_be_bytes()); // optimal granularity
            b[4..8].copy_from_slice(&MAX_XFER_BLOCKS.to_be_bytes());
            b[8..12].copy_from_slice(&2048u32.to_be_bytes()); // optimal transfer: 1 MiB
            b[16..20].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
            b[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
            b[24..28].copy_from_slice(&OPT_GRANULARITY_BLOCKS.to_be_bytes()); // optimal unmap granularity
            b[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, alignment 0
            b[32..40].copy_from_slice(&MAX_WRITE_SAME_BLOCKS.to_be_bytes());
            b
        }
        0xb1 => {
            let mut b = vec![0u8; 60];
            b[0..2].copy_from_slice(&1u16.to_be_bytes()); // non-rotating medium
            b
        }
        0xb2 => {
            // LBPU, LBPWS, LBPWS10; LBPRZ=1 (unmapped blocks read as zeros);
            // provisioning type 2 (thin).
            vec![0x00, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0x00]
        }
        _ => return Err(Sense::INVALID_FIELD_IN_CDB),
    };
    let mut d = vec![0x00, page];
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(&body);
    Ok(trunc(d, alloc))
}

/// READ CAPACITY(10) data.
pub fn read_capacity10(lun: &LunInfo) -> Vec<u8> {
    let last = lun.blocks.saturating_sub(1).min(0xffff_ffff) as u32;
    let mut d = last.to_be_bytes().to_vec();
    d.extend_from_slice(&(BLOCK as u32).to_be_bytes());
    d
}

/// READ CAPACITY(16) data, with LBPME and LBPRZ set (thin, unmapped reads zero).
pub fn read_capacity16(lun: &LunInfo, alloc: u32) -> Vec<u8> {
    let mut d = vec![0u8; 32];
    d[0..8].copy_from_slice(&lun.blocks.saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&(BLOCK as u32).to_be_bytes());
    d[13] = PHYS_EXP;
    d[14] = 0x80 | 0x40;
    trunc(d, alloc)
}

fn caching_page() -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x08;
    p[1] = 0x12;
    // WCE: acknowledged writes may sit in a volatile cache until
    // SYNCHRONIZE CACHE, which is the volume's contract.
    p[2] = 0x04;
    p
}

fn control_page() -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p[0] = 0x0a;
    p[1] = 0x0a;
    p[3] = 0x10; // unrestricted reordering allowed
    p[8..10].copy_from_slice(&0xffffu16.to_be_bytes()); // busy timeout: unlimited
    p
}

fn iec_page() -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p[0] = 0x1c;
    p[1] = 0x0a;
    p
}

/// The fields of a MODE SENSE(6) or (10) CDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeSense {
    /// MODE SENSE(10) (else (6)): decides the header layout.
    pub ten: bool,
    /// Disable block descriptors.
    pub dbd: bool,
    /// Long LBA block descriptor (10 only).
    pub llbaa: bool,
    /// Page control: 0 current, 1 changeable, 2 default, 3 saved.
    pub pc: u8,
    pub page: u8,
    pub subpage: u8,
    pub alloc: u32,
}

/// MODE SENSE(6)/(10) data.
pub fn mode_sense(lun: &LunInfo, m: ModeSense) -> Result<Vec<u8>, Sense> {
    let ModeSense { ten, dbd, llbaa, pc, page, subpage, alloc } = m;
    if pc == 3 {
        return Err(Sense::SAVING_PARAMETERS_NOT_SUPPORTED);
    }
    let pages: Vec<Vec<u8>> = match (page, subpage) {
        (0x08, 0) => vec![caching_page()],
        (0x0a, 0) => vec![control_page()],
        (0x1c, 0) => vec![iec_page()],
        (0x3f, 0 | 0xff) => vec![caching_page(), control_page(), iec_page()],
        _ => return Err(Sense::INVALID_FIELD_IN_CDB),
    };
    let mut body: Vec<u8> = Vec::new();
    for mut p in pages {
        if pc == 1 {
            // Changeable values: nothing is changeable.
            for b in &mut p[2..] {
                *b = 0;
            }
        }
        body.extend_from_slice(&p);
    }
    let mut bd = Vec::new();
    if !dbd {
        if llbaa {
            bd.extend_from_slice(&lun.blocks.to_be_bytes());
            bd.extend_from_slice(&[0; 4]);
            bd.extend_from_slice(&(BLOCK as u32).to_be_bytes());
        } else {
            bd.extend_from_slice(&(lun.blocks.min(0xffff_ffff) as u32).to_be_bytes());
            bd.push(0);
            bd.extend_from_slice(&(BLOCK as u32).to_be_bytes()[1..]);
        }
    }
    // Device-specific parameter: WP if read-only, DPOFUA supported.
    let dsp = if lun.read_only { 0x80 } else { 0 } | 0x10;
    let mut d = Vec::new();
    if ten {
        let total = 8 + bd.len() + body.len();
        d.extend_from_slice(&((total - 2) as u16).to_be_bytes());
        d.extend_from_slice(&[0, dsp, if llbaa && !dbd { 1 } else { 0 }, 0]);
        d.extend_from_slice(&(bd.len() as u16).to_be_bytes());
    } else {
        let total = 4 + bd.len() + body.len();
        d.extend_from_slice(&[(total - 1).min(255) as u8, 0, dsp, bd.len() as u8]);
    }
    d.extend_from_slice(&bd);
    d.extend_from_slice(&body);
    Ok(trunc(d, alloc))
}

/// REPORT LUNS data: one LUN, 0.
pub fn report_luns(alloc: u32) -> Vec<u8> {
    let mut d = vec![0u8; 16];
    d[3] = 8;
    trunc(d, alloc)
}

/// REQUEST SENSE data: we keep no deferred sense, so always NO SENSE.
pub fn request_sense(desc: bool, alloc: u32) -> Vec<u8> {
    let s = Sense::new(key::NO_SENSE, 0, 0);
    trunc(if desc { s.descriptor() } else { s.fixed() }, alloc)
}

/// REPORT SUPPORTED OPERATION CODES data.
pub fn report_opcodes(rctd: bool, options: u8, opcode: u8, sa: u16, alloc: u32) -> Result<Vec<u8>, Sense> {
    let timeouts = |d: &mut Vec<u8>| {
        if rctd {
            d.extend_from_slice(&[0x00, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        }
    };
    match options {
        0 => {
            let mut list = Vec::new();
            for &(op, s, len) in SUPPORTED {
                list.push(op);
                list.push(0);
                list.extend_from_slice(&s.unwrap_or(0).to_be_bytes());
                list.push(0);
                list.push(if rctd { 0x02 } else { 0 } | if s.is_some() { 0x01 } else { 0 });
                list.extend_from_slice(&(len as u16).to_be_bytes());
                timeouts(&mut list);
            }
            let mut d = (list.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(&list);
            Ok(trunc(d, alloc))
        }
        1 | 2 => {
            let has_sa = SUPPORTED.iter().any(|&(op, s, _)| op == opcode && s.is_some());
            if (options == 1 && has_sa)
                || (options == 2 && !has_sa && SUPPORTED.iter().any(|e| e.0 == opcode))
            {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            let found = SUPPORTED
                .iter()
                .find(|&&(op, s, _)| op == opcode && (options == 1 || s == Some(sa)))
                .copied();
            let mut d = vec![0u8, if rctd { 0x80 } else { 0 }];
            match found {
                Some((op, s, len)) => {
                    d[1] |= 0x03; // supported, as the standard says
                    d.extend_from_slice(&(len as u16).to_be_bytes());
                    let mut usage = vec![0xffu8; len as usize];
                    usage[0] = op;
                    if let Some(s) = s {
                        usage[1] = s as u8 & 0x1f;
                    }
                    d.extend_from_slice(&usage);
                    timeouts(&mut d);
                }
                None => {
                    d[1] |= 0x01; // not supported
                    d.extend_from_slice(&[0, 0]);
                }
            }
            Ok(trunc(d, alloc))
        }
        _ => Err(Sense::INVALID_FIELD_IN_CDB),
    }
}

/// One UNMAP block descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnmapRange {
    pub lba: u64,
    pub blocks: u32,
}

/// Parses an UNMAP parameter list and checks every range against the LUN.
pub fn parse_unmap(param: &[u8], capacity: u64) -> Result<Vec<UnmapRange>, Sense> {
    if param.is_empty() {
        return Ok(Vec::new());
    }
    if param.len() < 8 {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let bd_len = u16b(param, 2) as usize;
    let avail = param.len() - 8;
    if !bd_len.is_multiple_of(16) || bd_len > avail {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
    }
    let n = bd_len / 16;
    if n as u32 > MAX_UNMAP_DESCRIPTORS {
        return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let d = &param[8 + 16 * i..8 + 16 * (i + 1)];
        let r = UnmapRange { lba: u64b(d, 0), blocks: u32b(d, 8) };
        if r.blocks > MAX_UNMAP_BLOCKS {
            return Err(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
        }
        check_range(r.lba, r.blocks as u64, capacity)?;
        out.push(r);
    }
    Ok(out)
}

/// One GET LBA STATUS descriptor: `provisioning` 0 mapped, 1 deallocated.
pub fn lba_status(descs: &[(u64, u32, u8)], alloc: u32) -> Vec<u8> {
    let mut d = vec![0u8; 8];
    for &(lba, n, st) in descs {
        d.extend_from_slice(&lba.to_be_bytes());
        d.extend_from_slice(&n.to_be_bytes());
        d.extend_from_slice(&[st & 0x0f, 0, 0, 0]);
    }
    let len = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&len.to_be_bytes());
    trunc(d, alloc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MODE SENSE fields with subpage 0 and a 255-byte allocation.
    fn ms(ten: bool, dbd: bool, llbaa: bool, pc: u8, page: u8) -> ModeSense {
        ModeSense { ten, dbd, llbaa, pc, page, subpage: 0, alloc: 255 }
    }

    fn cdb(b: &[u8]) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..b.len()].copy_from_slice(b);
        c
    }

    fn lun() -> LunInfo {
        LunInfo { blocks: 2048, read_only: false, serial: "S1".into(), uid: 7, target_name: "iqn.x:y".into() }
    }

    #[test]
    fn read_write_cdbs() {
        assert_eq!(
            parse(&cdb(&[0x08, 0x01, 0x02, 0x03, 0])),
            Ok(Command::Read { lba: 0x10203, blocks: 256, fua: false })
        );
        assert_eq!(
            parse(&cdb(&[0x2a, 0x08, 0, 0, 0, 9, 0, 0, 2, 0])),
            Ok(Command::Write { lba: 9, blocks: 2, fua: true })
        );
        assert_eq!(parse(&cdb(&[0x28, 0x20, 0, 0, 0, 9, 0, 0, 2, 0])), Err(Sense::INVALID_FIELD_IN_CDB));
        let mut c = cdb(&[0x88]);
        c[9] = 5;
        c[13] = 1;
        assert_eq!(parse(&c), Ok(Command::Read { lba: 5, blocks: 1, fua: false }));
        c[10] = 0xff;
        assert_eq!(parse(&c), Err(Sense::INVALID_FIELD_IN_CDB));
    }

    #[test]
    fn unknown_opcode() {
        assert_eq!(parse(&cdb(&[0xc0])), Err(Sense::INVALID_OPCODE));
    }

    #[test]
    fn ranges() {
        assert_eq!(check_range(2047, 1, 2048), Ok(()));
        assert_eq!(check_range(2048, 0, 2048), Ok(()));
        assert_eq!(check_range(2048, 1, 2048), Err(Sense::LBA_OUT_OF_RANGE));
        assert_eq!(check_range(u64::MAX, 2, 2048), Err(Sense::LBA_OUT_OF_RANGE));
    }

    #[test]
    fn sense_formats() {
        let s = Sense::MISCOMPARE_DURING_VERIFY.with_info(513).fixed();
        assert_eq!(s[0], 0xf0);
        assert_eq!(s[2], 0x0e);
        assert_eq!(&s[3..7], &[0, 0, 2, 1]);
        assert_eq!((s[12], s[13]), (0x1d, 0));
        let d = Sense::LBA_OUT_OF_RANGE.descriptor();
        assert_eq!(d, vec![0x72, 5, 0x21, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn vpd_pages() {
        let l = lun();
        let d = inquiry(&l, true, 0, 255).unwrap();
        assert_eq!(d, vec![0, 0, 0, 6, 0, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
        let b2 = inquiry(&l, true, 0xb2, 255).unwrap();
        assert_eq!(b2[5] & 0x04, 0x04);
        assert_eq!(inquiry(&l, true, 0x99, 255), Err(Sense::INVALID_FIELD_IN_CDB));
        let std = inquiry(&l, false, 0, 36).unwrap();
        assert_eq!(&std[8..14], b"BASALT");
        assert_eq!(parse(&cdb(&[0x12, 0, 0x80, 0, 0xff])), Err(Sense::INVALID_FIELD_IN_CDB));
    }

    #[test]
    fn capacity() {
        let rc = read_capacity16(&lun(), 32);
        assert_eq!(u64::from_be_bytes(rc[0..8].try_into().unwrap()), 2047);
        assert_eq!(rc[13], PHYS_EXP);
        assert_eq!(rc[14], 0xc0);
        assert_eq!(read_capacity10(&lun()), vec![0, 0, 7, 0xff, 0, 0, 2, 0]);
    }

    #[test]
    fn unmap_parameter_list() {
        let mut p = vec![0u8; 8 + 16];
        p[3] = 16;
        p[8 + 7] = 10;
        p[8 + 11] = 4;
        assert_eq!(parse_unmap(&p, 2048), Ok(vec![UnmapRange { lba: 10, blocks: 4 }]));
        p[8 + 6] = 0x10;
        assert_eq!(parse_unmap(&p, 2048), Err(Sense::LBA_OUT_OF_RANGE));
        assert_eq!(parse_unmap(&p[..5], 2048), Err(Sense::PARAMETER_LIST_LENGTH_ERROR));
        p[3] = 32;
        assert_eq!(parse_unmap(&p, 2048), Err(Sense::PARAMETER_LIST_LENGTH_ERROR));
    }

    #[test]
    fn mode_sense_caching_page() {
        let d = mode_sense(&lun(), ms(false, true, false, 0, 0x08)).unwrap();
        assert_eq!(d[0] as usize, d.len() - 1);
        assert_eq!(d[2], 0x10);
        assert_eq!(&d[4..7], &[0x08, 0x12, 0x04]);
        assert_eq!(
            mode_sense(&lun(), ms(false, true, false, 3, 0x08)),
            Err(Sense::SAVING_PARAMETERS_NOT_SUPPORTED)
        );
    }

    #[test]
    fn mode_sense10_long_lba_descriptor() {
        let d = mode_sense(&lun(), ms(true, false, true, 0, 0x0a)).unwrap();
        assert_eq!(u16::from_be_bytes([d[0], d[1]]) as usize, d.len() - 2);
        assert_eq!((d[3], d[4], u16::from_be_bytes([d[6], d[7]])), (0x10, 1, 16));
        assert_eq!(u64::from_be_bytes(d[8..16].try_into().unwrap()), 2048);
        assert_eq!(&d[24..26], &[0x0a, 0x0a]);
        let ro = LunInfo { read_only: true, ..lun() };
        assert_eq!(mode_sense(&ro, ms(false, true, false, 0, 0x3f)).unwrap()[2], 0x90);
    }

    #[test]
    fn lba_status_layout() {
        let d = lba_status(&[(8, 16, 0), (24, 8, 1)], 255);
        assert_eq!(d.len(), 8 + 32);
        assert_eq!(u32::from_be_bytes(d[0..4].try_into().unwrap()), 36);
        assert_eq!(u64::from_be_bytes(d[8..16].try_into().unwrap()), 8);
        assert_eq!(u32::from_be_bytes(d[16..20].try_into().unwrap()), 16);
        assert_eq!((d[20], d[36]), (0, 1));
        assert_eq!(lba_status(&[(8, 16, 0)], 24).len(), 24);
    }

    #[test]
    fn write_same_and_caw_fields() {
        let mut c = cdb(&[0x93, 0x08]);
        c[9] = 4;
        c[13] = 8;
        assert_eq!(parse(&c), Ok(Command::WriteSame { lba: 4, blocks: 8, unmap: true, ndob: false }));
        c[13] = 0;
        assert_eq!(parse(&c), Err(Sense::INVALID_FIELD_IN_CDB)); // WSNZ
        let mut w = cdb(&[0x89]);
        w[13] = 2;
        assert_eq!(parse(&w).unwrap().data_out_len(), 2048);
        w[13] = 129;
        assert_eq!(parse(&w), Err(Sense::INVALID_FIELD_IN_CDB));
    }
}
