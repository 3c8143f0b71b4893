//! Executes parsed SCSI commands against a `Volume`: the semantics shared
//! with NBD (SYNCHRONIZE CACHE = flush, FUA = fua, UNMAP = trim, WRITE SAME
//! with UNMAP of zeros = write_zeroes with deallocate).

use crate::export::readahead::Hit;
use crate::node::{Volume, VolumeError};
use crate::proto::iscsi::scsi::{self, BLOCK, Command, LunInfo, Sense};
use crate::types::flatten_chunks;
use bytes::{Bytes, BytesMut};
use std::sync::Arc;

/// SPC-4: the UNIT ATTENTION every I_T nexus gets once after a resize.
pub(crate) const CAPACITY_DATA_HAS_CHANGED: Sense = Sense::new(scsi::key::UNIT_ATTENTION, 0x2a, 0x09);

/// One LUN: the volume plus what the response builders need.
#[derive(Debug)]
pub(crate) struct Lun {
    pub vol: Arc<Volume>,
    /// As at login; `blocks` goes stale when the volume is resized: use
    /// [`Lun::blocks`] and [`Lun::info_now`].
    pub info: LunInfo,
}

impl Lun {
    /// The capacity now, in blocks.
    pub fn blocks(&self) -> u64 {
        self.vol.size() / BLOCK
    }

    /// `info` with the capacity now (READ CAPACITY, MODE SENSE, INQUIRY).
    pub fn info_now(&self) -> LunInfo {
        LunInfo { blocks: self.blocks(), ..self.info.clone() }
    }
}

/// Maps a volume error to the sense data the initiator gets.
pub(crate) fn sense_of(e: &VolumeError, writing: bool) -> Sense {
    match e {
        VolumeError::OutOfRange { .. } => Sense::LBA_OUT_OF_RANGE,
        VolumeError::Misaligned { .. } | VolumeError::TooLarge(_) => Sense::INVALID_FIELD_IN_CDB,
        VolumeError::ReadOnly => Sense::WRITE_PROTECTED,
        VolumeError::NoSpace(_) => Sense::SPACE_ALLOCATION_FAILED,
        VolumeError::Checksum { .. } => Sense::UNRECOVERED_READ_ERROR,
        VolumeError::Io(_) if writing => Sense::WRITE_ERROR,
        VolumeError::Io(_) => Sense::UNRECOVERED_READ_ERROR,
        // The medium is fine and the target did not fail: the logical unit
        // is not accessible through this node right now (its owner is
        // unreachable or moved). SPC-4 has NOT READY for that; HARDWARE
        // ERROR would tell the initiator a device broke.
        VolumeError::NotOwner { .. } | VolumeError::Unavailable(_) => OWNER_UNAVAILABLE,
    }
}

/// NOT READY, LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE (02/04/00).
const OWNER_UNAVAILABLE: Sense = Sense::new(crate::proto::iscsi::scsi::key::NOT_READY, 0x04, 0x00);

/// Why a command ends in CHECK CONDITION, beyond its sense data: the
/// fields of its one log line (see `conn::Response::pdus`, where it is
/// logged). Nothing here logs.
#[derive(Debug, Default)]
pub(crate) struct Why {
    pub lba: Option<u64>,
    pub blocks: Option<u64>,
    pub capacity: Option<u64>,
    /// The error behind it, with its causes.
    pub error: Option<String>,
    /// The volume failed the command (a warn line); otherwise the
    /// initiator asked for something we refuse (an info line).
    pub failed: bool,
}

impl Why {
    pub const NONE: Why = Why { lba: None, blocks: None, capacity: None, error: None, failed: false };

    pub fn said(error: impl Into<String>) -> Why {
        Why { error: Some(error.into()), ..Why::NONE }
    }
}

/// A command's CHECK CONDITION and why.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub sense: Sense,
    pub why: Why,
}

impl From<Sense> for Refusal {
    fn from(sense: Sense) -> Refusal {
        Refusal { sense, why: Why::NONE }
    }
}

/// The volume failed a command: its sense, and the error for the log line.
fn failed(e: &VolumeError, writing: bool) -> Refusal {
    let why = Why { error: Some(crate::units::error_chain(e)), failed: true, ..Why::NONE };
    Refusal { sense: sense_of(e, writing), why }
}

/// The range check of a command (the initiator sees LBA OUT OF RANGE; the
/// log line names the range and the capacity).
pub(crate) fn in_range(lba: u64, blocks: u64, capacity: u64) -> Result<(), Refusal> {
    scsi::check_range(lba, blocks, capacity).map_err(|sense| Refusal {
        sense,
        why: Why { lba: Some(lba), blocks: Some(blocks), capacity: Some(capacity), ..Why::NONE },
    })
}

fn off(lba: u64) -> u64 {
    lba * BLOCK
}

async fn read(lun: &Lun, lba: u64, blocks: u32) -> Result<Bytes, Refusal> {
    let chunks = lun.vol.read(off(lba), blocks as u64 * BLOCK).await.map_err(|e| failed(&e, false))?;
    Ok(flatten_chunks(&chunks))
}

/// A READ (range already checked) answered from read-ahead.
pub(crate) async fn read_ahead(lun: &Lun, hit: Hit) -> Result<Bytes, Refusal> {
    let chunks = hit.read(&lun.vol).await.map_err(|e| failed(&e, false))?;
    Ok(flatten_chunks(&chunks))
}

fn wr_err(e: VolumeError) -> Refusal {
    failed(&e, true)
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Runs `cmd` with its Data-Out payload; returns the Data-In payload.
pub(crate) async fn execute(lun: &Lun, cmd: Command, data: Bytes) -> Result<Bytes, Refusal> {
    let cap = lun.blocks();
    if cmd.writes() && lun.info.read_only {
        return Err(Sense::WRITE_PROTECTED.into());
    }
    match cmd {
        Command::TestUnitReady | Command::NoOp => Ok(Bytes::new()),
        Command::RequestSense { desc, alloc } => Ok(scsi::request_sense(desc, alloc).into()),
        Command::Inquiry { evpd, page, alloc } => {
            Ok(scsi::inquiry(&lun.info_now(), evpd, page, alloc)?.into())
        }
        Command::ModeSense(m) => Ok(scsi::mode_sense(&lun.info_now(), m)?.into()),
        Command::ReadCapacity10 => Ok(scsi::read_capacity10(&lun.info_now()).into()),
        Command::ReadCapacity16 { alloc } => Ok(scsi::read_capacity16(&lun.info_now(), alloc).into()),
        Command::ReportLuns { alloc } => Ok(scsi::report_luns(alloc).into()),
        Command::ReportSupportedOpcodes { rctd, options, opcode, sa, alloc } => {
            Ok(scsi::report_opcodes(rctd, options, opcode, sa, alloc)?.into())
        }
        Command::Read { lba, blocks, .. } => {
            in_range(lba, blocks as u64, cap)?;
            if blocks == 0 {
                return Ok(Bytes::new());
            }
            read(lun, lba, blocks).await
        }
        Command::Write { lba, blocks, fua } => {
            in_range(lba, blocks as u64, cap)?;
            if blocks == 0 {
                return Ok(Bytes::new());
            }
            lun.vol.write(off(lba), data, fua).await.map_err(wr_err)?;
            Ok(Bytes::new())
        }
        Command::WriteAndVerify { lba, blocks } => {
            in_range(lba, blocks as u64, cap)?;
            if blocks == 0 {
                return Ok(Bytes::new());
            }
            // Verify means on the medium: make the write durable first.
            lun.vol.write(off(lba), data, true).await.map_err(wr_err)?;
            Ok(Bytes::new())
        }
        Command::SyncCache { lba, blocks } => {
            in_range(lba, blocks as u64, cap)?;
            lun.vol.flush().await.map_err(wr_err)?;
            Ok(Bytes::new())
        }
        Command::WriteSame { lba, blocks, unmap, ndob } => {
            in_range(lba, blocks as u64, cap)?;
            let len = blocks as u64 * BLOCK;
            if ndob || data.iter().all(|&b| b == 0) {
                lun.vol.write_zeroes(off(lba), len, unmap, false).await.map_err(wr_err)?;
                return Ok(Bytes::new());
            }
            // Non-zero pattern: write it in bounded chunks.
            let per = (len.min(4 << 20) / BLOCK) as usize;
            let mut buf = BytesMut::with_capacity(per * BLOCK as usize);
            for _ in 0..per {
                buf.extend_from_slice(&data);
            }
            let buf = buf.freeze();
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                lun.vol.write(off(lba) + done, buf.slice(..n), false).await.map_err(wr_err)?;
                done += n as u64;
            }
            Ok(Bytes::new())
        }
        Command::Unmap { .. } => {
            for r in scsi::parse_unmap(&data, cap)? {
                if r.blocks > 0 {
                    lun.vol.trim(off(r.lba), r.blocks as u64 * BLOCK, false).await.map_err(wr_err)?;
                }
            }
            Ok(Bytes::new())
        }
        Command::CompareAndWrite { lba, blocks, fua } => {
            in_range(lba, blocks as u64, cap)?;
            if blocks == 0 {
                return Ok(Bytes::new());
            }
            // Atomic against every other change of these blocks, from any
            // frontend: the volume compares and writes under the store's
            // exclusive range lock.
            if data.len() != 2 * blocks as usize * BLOCK as usize {
                return Err(Refusal {
                    sense: Sense::INVALID_FIELD_IN_CDB,
                    why: Why::said(format!("{} bytes of Data-Out for {blocks} blocks", data.len())),
                });
            }
            match lun.vol.compare_and_write(off(lba), data, fua).await.map_err(wr_err)? {
                Some(at) => Err(Sense::MISCOMPARE_DURING_VERIFY.with_info(at).into()),
                None => Ok(Bytes::new()),
            }
        }
        Command::Verify { lba, blocks, bytchk } => {
            in_range(lba, blocks as u64, cap)?;
            if blocks == 0 {
                return Ok(Bytes::new());
            }
            let current = read(lun, lba, blocks).await?;
            let mismatch = match bytchk {
                1 => first_difference(&current, &data),
                3 => current
                    .chunks(BLOCK as usize)
                    .enumerate()
                    .find_map(|(i, blk)| first_difference(blk, &data).map(|at| i * BLOCK as usize + at)),
                _ => None,
            };
            match mismatch {
                Some(at) => Err(Sense::MISCOMPARE_DURING_VERIFY.with_info(at as u64).into()),
                None => Ok(Bytes::new()),
            }
        }
        Command::GetLbaStatus { lba, alloc } => {
            if lba >= cap {
                let why = Why { lba: Some(lba), capacity: Some(cap), ..Why::NONE };
                return Err(Refusal { sense: Sense::LBA_OUT_OF_RANGE, why });
            }
            // Bounded look-ahead; the initiator asks again from where we stop.
            let blocks = (cap - lba).min((1u64 << 30) / BLOCK);
            let map = lun.vol.block_status(off(lba), blocks * BLOCK).await.map_err(|e| failed(&e, false))?;
            let max_descs = ((alloc as usize).saturating_sub(8) / 16).max(1);
            let mut descs = Vec::new();
            let mut at = lba;
            for m in map {
                if descs.len() >= max_descs {
                    break;
                }
                let n = (m.len / BLOCK).min(u32::MAX as u64) as u32;
                if n == 0 {
                    continue;
                }
                let st = if m.state.allocated { 0 } else { 1 };
                match descs.last_mut() {
                    Some((_, cnt, s)) if *s == st && (*cnt as u64 + n as u64) <= u32::MAX as u64 => *cnt += n,
                    _ => descs.push((at, n, st)),
                }
                at += n as u64;
            }
            Ok(scsi::lba_status(&descs, alloc).into())
        }
    }
}
