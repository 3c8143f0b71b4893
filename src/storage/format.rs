//! The on-disk format of one extent replica. Pure: bytes in, values out; no
//! I/O, no clock. The I/O shell is `storage::extent`.
//!
//! # Layout of an extent replica file (format version 2; all integers little-endian)
//!
//! One sparse file per extent replica, `<volume>-<index>.ext`, e.g. `v7-e12.ext`.
//!
//! ```text
//! file offset        size            what
//! 0                  4096            header slot A
//! 4096               4096            header slot B
//! 8192               table_len       block table: 8 sectors of 512 bytes per 4 KiB page,
//!                                    63 entries of 8 bytes per sector (504 per page);
//!                                    table_len = ceil(nblocks / 504) * 4096
//! data_offset        extent_size     data area; block b lives at data_offset + b * 4096.
//!                                    data_offset = (8192 + table_len) rounded up to 1 MiB
//! ```
//!
//! ## Header slot (4096 bytes)
//! ```text
//! 0    8   magic  "BASALTX1"
//! 8    4   format version (2)
//! 12   4   crc32c of the 4096-byte slot computed with these 4 bytes zeroed
//! 16   8   generation: bumped by every header write; the valid slot with the
//!          highest generation is the header
//! 24   8   volume id          (ExtentKey.volume)
//! 32   8   extent index       (ExtentKey.index)
//! 40   8   epoch of the replica set that last wrote the header
//! 48   8   flush counter: number of completed flushes
//! 56   4   block size (4096)
//! 60   4   dirty-region size in bytes (a power of two, >= 4096; 1 MiB by default)
//! 64   8   extent size in bytes (a multiple of 4096)
//! 72   8   table offset (8192)
//! 80   8   data offset (as computed above; stored so a reader can cross-check)
//! 88   4   number of regions = ceil(extent_size / region size)
//! 92   4   flags: bit 0 INCOMPLETE (a whole-extent copy to this replica
//!          has begun and not yet completed durably: the replica must not
//!          be read or taken as a reconciliation source); other bits zero
//! 96   32  reserved, zero
//! 128  3968 dirty-region bitmap: bit r (byte r/8, bit r%8, LSB first) set means
//!          region r may hold writes that were not flushed; bits past the
//!          number of regions are zero
//! ```
//! The crc is checked before the version, so a header that fails with
//! "unsupported version" really was written by another format version.
//!
//! ## Block table sector (512 bytes)
//! Table sector `s` (counted from the start of the table) holds the
//! entries of blocks `63 s .. 63 s + 63`; entries past the last block are zero.
//! ```text
//! 0    504 63 entries of 8 bytes
//! 504  4   sector number s (catches a sector written to the wrong place)
//! 508  4   crc32c of bytes 0..508
//! ```
//! The checksum covers a sector, not a page, because the sector is the
//! unit a device writes atomically: a crash can tear a table page write
//! into old and new sectors, each still valid, so a crash can never make a
//! table checksum fail and a failing one is rot (or a device breaking its
//! promise). A new extent has its whole table written, so no sector is
//! ever validly all zeros.
//!
//! ## Block table entry (8 bytes)
//! ```text
//! 0    4   crc32c of the block's 4096 data bytes (0 unless ALLOCATED and not ZEROED)
//! 4    4   flags: bit 0 ALLOCATED (the block holds data), bit 1 ZEROED (the
//!          block reads as zeros but keeps its allocation; needs ALLOCATED),
//!          bit 2 LOST (the entry was lost to rot in its table sector: the
//!          block reads as an error until it is rewritten; alone);
//!          other bits zero. No flags: a hole, reads as zeros.
//! ```
//!
//! ## Version history
//! - 1: table pages of 512 plain entries, no table checksum. Not read by
//!   this version: opening such a file fails with [`FormatError::BadVersion`]
//!   and the store refuses to start, naming the file.
//! - 2: 512-byte table sectors with their own crc32c; the LOST flag.
//!
//! # Why two header slots
//! The recommended design writes one header in place. Devices promise at
//! most 512-byte write atomicity, and once the dirty bitmap reaches past the
//! first sector (more than 3072 regions: extents over 3 GiB at 1 MiB regions)
//! a crash can tear a header write, which would make the whole replica
//! unreadable. Header writes therefore alternate: each goes to the slot that
//! does *not* hold the last header known durable, so a crash mid-write
//! always leaves the previous durable header intact, and its dirty bitmap
//! covers every region that could have unflushed writes (a region's bit is
//! made durable before the first write into it; bits are cleared only after
//! an fdatasync). `tests/storage_crash.rs` (`crash_recovery_large_bitmap`)
//! fails if headers are written in place.

use crate::types::{Epoch, ExtentIndex, ExtentKey, VolumeId};

pub const MAGIC: [u8; 8] = *b"BASALTX1";
pub const VERSION: u32 = 2;
/// Data block size: the unit of checksums and of the block table.
pub const BLOCK: u64 = 4096;
pub const SECTOR: u64 = 512;
pub const HEADER_SIZE: usize = 4096;
pub const HEADER_SLOTS: u64 = 2;
pub const TABLE_OFFSET: u64 = HEADER_SIZE as u64 * HEADER_SLOTS;
pub const ENTRY_SIZE: u64 = 8;
/// Table entries per 512-byte table sector (the rest is its trailer).
pub const ENTRIES_PER_SECTOR: u64 = 63;
/// Where a table sector's trailer (sector number, crc32c) starts.
pub const SECTOR_TRAILER: usize = (ENTRIES_PER_SECTOR * ENTRY_SIZE) as usize;
pub const SECTORS_PER_PAGE: u64 = BLOCK / SECTOR;
/// Table entries per 4 KiB table page.
pub const ENTRIES_PER_PAGE: u64 = ENTRIES_PER_SECTOR * SECTORS_PER_PAGE;
pub const DATA_ALIGN: u64 = 1 << 20;
pub const BITMAP_OFFSET: usize = 128;
pub const MAX_REGIONS: u64 = ((HEADER_SIZE - BITMAP_OFFSET) * 8) as u64;
pub const DEFAULT_REGION_SIZE: u32 = 1 << 20;
/// Header flag: the replica is an incomplete copy (see the layout above).
/// Added within format version 2: a binary from before it refuses such a
/// header as reserved-not-zero, which keeps it from serving the copy.
pub const FLAG_INCOMPLETE: u32 = 1;

const CRC_FIELD: std::ops::Range<usize> = 12..16;

/// Why a header or table entry does not decode. One variant per way it can be wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("buffer of {0} bytes is not one header slot")]
    BadLength(usize),
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported format version {0}")]
    BadVersion(u32),
    #[error("header crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc { stored: u32, computed: u32 },
    #[error("unsupported block size {0}")]
    BadBlockSize(u32),
    #[error("bad region size {0}")]
    BadRegionSize(u32),
    #[error("bad extent size {0}")]
    BadExtentSize(u64),
    #[error("extent needs {0} dirty regions, more than the header holds")]
    TooManyRegions(u64),
    #[error("table offset {0} is not {TABLE_OFFSET}")]
    BadTableOffset(u64),
    #[error("data offset {stored} does not match the geometry ({expected})")]
    BadDataOffset { stored: u64, expected: u64 },
    #[error("region count {stored} does not match the geometry ({expected})")]
    BadRegionCount { stored: u32, expected: u64 },
    #[error("reserved header bytes are not zero")]
    ReservedNotZero,
    #[error("dirty bit set past the last region")]
    BitmapOverflow,
    #[error("block table entry has unknown flags {0:#x}")]
    BadFlags(u32),
    #[error("block table entry is ZEROED without ALLOCATED")]
    ZeroedNotAllocated,
    #[error("crc {0:#010x} stored on a block without data")]
    CrcOnEmptyBlock(u32),
    #[error("block table sector {sector} crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    SectorCrc { sector: u64, stored: u32, computed: u32 },
    #[error("block table sector {sector} says it is sector {stored}")]
    SectorNumber { sector: u64, stored: u32 },
}

/// Sizes and offsets derived from the extent size and region size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub extent_size: u64,
    pub region_size: u32,
    pub nblocks: u64,
    pub nregions: u64,
    pub table_len: u64,
    pub data_offset: u64,
}

impl Geometry {
    pub fn new(extent_size: u64, region_size: u32) -> Result<Geometry, FormatError> {
        if extent_size == 0 || !extent_size.is_multiple_of(BLOCK) || extent_size > (1 << 45) {
            return Err(FormatError::BadExtentSize(extent_size));
        }
        if !region_size.is_power_of_two() || (region_size as u64) < BLOCK {
            return Err(FormatError::BadRegionSize(region_size));
        }
        let nblocks = extent_size / BLOCK;
        let nregions = extent_size.div_ceil(region_size as u64);
        if nregions > MAX_REGIONS {
            return Err(FormatError::TooManyRegions(nregions));
        }
        let table_len = nblocks.div_ceil(ENTRIES_PER_PAGE) * BLOCK;
        let data_offset = (TABLE_OFFSET + table_len).next_multiple_of(DATA_ALIGN);
        Ok(Geometry { extent_size, region_size, nblocks, nregions, table_len, data_offset })
    }

    pub fn file_len(&self) -> u64 {
        self.data_offset + self.extent_size
    }

    pub fn blocks_per_region(&self) -> u64 {
        self.region_size as u64 / BLOCK
    }

    pub fn region_of_block(&self, block: u64) -> u64 {
        block / self.blocks_per_region()
    }

    pub fn region_blocks(&self, region: u64) -> std::ops::Range<u64> {
        let start = region * self.blocks_per_region();
        start..(start + self.blocks_per_region()).min(self.nblocks)
    }

    pub fn table_pages(&self) -> u64 {
        self.table_len / BLOCK
    }

    /// File offset of the table page holding `page`.
    pub fn table_page_pos(&self, page: u64) -> u64 {
        TABLE_OFFSET + page * BLOCK
    }

    pub fn data_pos(&self, block: u64) -> u64 {
        self.data_offset + block * BLOCK
    }

    pub fn header_pos(slot: u64) -> u64 {
        slot * HEADER_SIZE as u64
    }
}

/// One decoded header slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub generation: u64,
    pub key: ExtentKey,
    pub epoch: Epoch,
    pub flush_counter: u64,
    pub geometry: Geometry,
    /// Dirty-region bits, one per region (`geometry.nregions` long).
    pub dirty: Vec<bool>,
    /// A whole-extent copy to this replica has not completed.
    pub incomplete: bool,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn header_crc(slot: &[u8]) -> u32 {
    let c = crc32c::crc32c(&slot[..CRC_FIELD.start]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &slot[CRC_FIELD.end..])
}

impl Header {
    /// Encodes into one 4096-byte slot.
    pub fn encode(&self, out: &mut [u8]) {
        assert_eq!(out.len(), HEADER_SIZE);
        assert_eq!(self.dirty.len() as u64, self.geometry.nregions);
        out.fill(0);
        let g = &self.geometry;
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[16..24].copy_from_slice(&self.generation.to_le_bytes());
        out[24..32].copy_from_slice(&self.key.volume.0.to_le_bytes());
        out[32..40].copy_from_slice(&self.key.index.0.to_le_bytes());
        out[40..48].copy_from_slice(&self.epoch.0.to_le_bytes());
        out[48..56].copy_from_slice(&self.flush_counter.to_le_bytes());
        out[56..60].copy_from_slice(&(BLOCK as u32).to_le_bytes());
        out[60..64].copy_from_slice(&g.region_size.to_le_bytes());
        out[64..72].copy_from_slice(&g.extent_size.to_le_bytes());
        out[72..80].copy_from_slice(&TABLE_OFFSET.to_le_bytes());
        out[80..88].copy_from_slice(&g.data_offset.to_le_bytes());
        out[88..92].copy_from_slice(&(g.nregions as u32).to_le_bytes());
        let flags = if self.incomplete { FLAG_INCOMPLETE } else { 0 };
        out[92..96].copy_from_slice(&flags.to_le_bytes());
        for (r, _) in self.dirty.iter().enumerate().filter(|(_, d)| **d) {
            out[BITMAP_OFFSET + r / 8] |= 1 << (r % 8);
        }
        let crc = header_crc(out);
        out[CRC_FIELD].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes and validates one slot.
    pub fn decode(b: &[u8]) -> Result<Header, FormatError> {
        if b.len() != HEADER_SIZE {
            return Err(FormatError::BadLength(b.len()));
        }
        if b[0..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let stored = le_u32(b, 12);
        let computed = header_crc(b);
        if stored != computed {
            return Err(FormatError::BadCrc { stored, computed });
        }
        let version = le_u32(b, 8);
        if version != VERSION {
            return Err(FormatError::BadVersion(version));
        }
        let block = le_u32(b, 56);
        if block as u64 != BLOCK {
            return Err(FormatError::BadBlockSize(block));
        }
        let geometry = Geometry::new(le_u64(b, 64), le_u32(b, 60))?;
        let table = le_u64(b, 72);
        if table != TABLE_OFFSET {
            return Err(FormatError::BadTableOffset(table));
        }
        let data = le_u64(b, 80);
        if data != geometry.data_offset {
            return Err(FormatError::BadDataOffset { stored: data, expected: geometry.data_offset });
        }
        let nregions = le_u32(b, 88);
        if nregions as u64 != geometry.nregions {
            return Err(FormatError::BadRegionCount { stored: nregions, expected: geometry.nregions });
        }
        let flags = le_u32(b, 92);
        if flags & !FLAG_INCOMPLETE != 0 || b[96..BITMAP_OFFSET].iter().any(|&x| x != 0) {
            return Err(FormatError::ReservedNotZero);
        }
        let bit = |r: usize| b[BITMAP_OFFSET + r / 8] & (1 << (r % 8)) != 0;
        if (geometry.nregions as usize..MAX_REGIONS as usize).any(bit) {
            return Err(FormatError::BitmapOverflow);
        }
        Ok(Header {
            generation: le_u64(b, 16),
            key: ExtentKey { volume: VolumeId(le_u64(b, 24)), index: ExtentIndex(le_u64(b, 32)) },
            epoch: Epoch(le_u64(b, 40)),
            flush_counter: le_u64(b, 48),
            geometry,
            dirty: (0..geometry.nregions as usize).map(bit).collect(),
            incomplete: flags & FLAG_INCOMPLETE != 0,
        })
    }
}

/// Picks the header from the two slots: the valid one with the highest
/// generation. Returns the slot index too, or both slots' errors.
pub fn pick_header(a: &[u8], b: &[u8]) -> Result<(u64, Header), [FormatError; 2]> {
    match (Header::decode(a), Header::decode(b)) {
        (Ok(x), Ok(y)) => Ok(if y.generation > x.generation { (1, y) } else { (0, x) }),
        (Ok(x), Err(_)) => Ok((0, x)),
        (Err(_), Ok(y)) => Ok((1, y)),
        (Err(e1), Err(e2)) => Err([e1, e2]),
    }
}

pub const FLAG_ALLOCATED: u32 = 1;
pub const FLAG_ZEROED: u32 = 2;
pub const FLAG_LOST: u32 = 4;

/// One block table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    pub crc: u32,
    pub flags: u32,
}

impl Entry {
    pub const HOLE: Entry = Entry { crc: 0, flags: 0 };
    pub const ZEROED: Entry = Entry { crc: 0, flags: FLAG_ALLOCATED | FLAG_ZEROED };
    /// The block's entry was lost to rot: it reads as an error until rewritten.
    pub const LOST: Entry = Entry { crc: 0, flags: FLAG_LOST };

    pub fn data(crc: u32) -> Entry {
        Entry { crc, flags: FLAG_ALLOCATED }
    }

    /// Holds bytes that must be read from disk (and verified).
    pub fn has_data(&self) -> bool {
        self.flags == FLAG_ALLOCATED
    }

    pub fn is_zeroed(&self) -> bool {
        self.flags & FLAG_ZEROED != 0
    }

    pub fn is_lost(&self) -> bool {
        self.flags == FLAG_LOST
    }

    pub fn encode(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.crc.to_le_bytes());
        out[4..8].copy_from_slice(&self.flags.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> Result<Entry, FormatError> {
        let e = Entry { crc: le_u32(b, 0), flags: le_u32(b, 4) };
        let known = FLAG_ALLOCATED | FLAG_ZEROED | FLAG_LOST;
        if e.flags & !known != 0 || (e.flags & FLAG_LOST != 0 && e.flags != FLAG_LOST) {
            return Err(FormatError::BadFlags(e.flags));
        }
        if e.is_zeroed() && e.flags & FLAG_ALLOCATED == 0 {
            return Err(FormatError::ZeroedNotAllocated);
        }
        if !e.has_data() && e.crc != 0 {
            return Err(FormatError::CrcOnEmptyBlock(e.crc));
        }
        Ok(e)
    }
}

/// A table sector (or one entry) that failed to decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadEntries {
    /// The blocks whose entries it held.
    pub blocks: std::ops::Range<u64>,
    pub why: FormatError,
    /// Each entry as it decodes on its own, if it does: a guess the shell
    /// may keep only where the block's data confirms it (a matching crc,
    /// or zeros for a block without data).
    pub guesses: Vec<Option<Entry>>,
}

/// A decoded block table: the entries (`LOST` where they did not decode)
/// and what did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub entries: Vec<Entry>,
    pub bad: Vec<BadEntries>,
}

fn sector_crc(sector: &[u8]) -> u32 {
    crc32c::crc32c(&sector[..SECTOR_TRAILER + 4])
}

/// Decodes a whole table (`geometry.table_len` bytes). Never fails: a
/// sector with a bad checksum or number makes its blocks `LOST`, and so
/// does an entry that does not decode in a sound sector.
pub fn decode_table(b: &[u8], nblocks: u64) -> Table {
    let mut entries = Vec::with_capacity(nblocks as usize);
    let mut bad = Vec::new();
    let sectors = nblocks.div_ceil(ENTRIES_PER_SECTOR);
    for s in 0..sectors {
        let sec = &b[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize];
        let first = s * ENTRIES_PER_SECTOR;
        let last = (first + ENTRIES_PER_SECTOR).min(nblocks);
        let decoded: Vec<Result<Entry, FormatError>> = (0..last - first)
            .map(|i| {
                let at = (i * ENTRY_SIZE) as usize;
                Entry::decode(&sec[at..at + ENTRY_SIZE as usize])
            })
            .collect();
        let (stored, computed) = (le_u32(sec, SECTOR_TRAILER + 4), sector_crc(sec));
        let number = le_u32(sec, SECTOR_TRAILER);
        let why = if stored != computed {
            Some(FormatError::SectorCrc { sector: s, stored, computed })
        } else if number as u64 != s {
            Some(FormatError::SectorNumber { sector: s, stored: number })
        } else {
            None
        };
        if let Some(why) = why {
            let guesses = decoded.into_iter().map(Result::ok).collect();
            bad.push(BadEntries { blocks: first..last, why, guesses });
            entries.resize(last as usize, Entry::LOST);
            continue;
        }
        for (i, d) in decoded.into_iter().enumerate() {
            match d {
                Ok(e) => entries.push(e),
                Err(why) => {
                    let b = first + i as u64;
                    bad.push(BadEntries { blocks: b..b + 1, why, guesses: vec![None] });
                    entries.push(Entry::LOST);
                }
            }
        }
    }
    Table { entries, bad }
}

/// Encodes table page `page` (4096 bytes, eight sectors with their
/// trailers) from the in-memory table.
pub fn encode_table_page(table: &[Entry], page: u64, out: &mut [u8]) {
    out.fill(0);
    for i in 0..SECTORS_PER_PAGE {
        let s = page * SECTORS_PER_PAGE + i;
        let sec = &mut out[(i * SECTOR) as usize..((i + 1) * SECTOR) as usize];
        let first = (s * ENTRIES_PER_SECTOR) as usize;
        let last = (first + ENTRIES_PER_SECTOR as usize).min(table.len());
        for (j, e) in table.get(first..last).unwrap_or_default().iter().enumerate() {
            e.encode(&mut sec[j * ENTRY_SIZE as usize..(j + 1) * ENTRY_SIZE as usize]);
        }
        sec[SECTOR_TRAILER..SECTOR_TRAILER + 4].copy_from_slice(&(s as u32).to_le_bytes());
        let crc = sector_crc(sec);
        sec[SECTOR_TRAILER + 4..].copy_from_slice(&crc.to_le_bytes());
    }
}

pub fn block_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        let geometry = Geometry::new(64 << 20, DEFAULT_REGION_SIZE).unwrap();
        let mut dirty = vec![false; 64];
        dirty[0] = true;
        dirty[9] = true;
        dirty[63] = true;
        Header {
            generation: 42,
            key: ExtentKey { volume: VolumeId(7), index: ExtentIndex(12) },
            epoch: Epoch(3),
            flush_counter: 99,
            geometry,
            dirty,
            incomplete: false,
        }
    }

    fn encoded() -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        header().encode(&mut b);
        b
    }

    /// Rewrites the crc so a test reaches the check after it.
    fn recrc(b: &mut [u8]) {
        let c = header_crc(b);
        b[12..16].copy_from_slice(&c.to_le_bytes());
    }

    #[test]
    fn geometry_of_64mib() {
        let g = Geometry::new(64 << 20, 1 << 20).unwrap();
        assert_eq!(g.nblocks, 16384);
        assert_eq!(g.table_len, 33 * 4096); // ceil(16384 / 504) pages
        assert_eq!(g.data_offset, 1 << 20);
        assert_eq!(g.nregions, 64);
        assert_eq!(g.file_len(), 65 << 20);
        assert_eq!(g.region_blocks(1), 256..512);
        let big = Geometry::new(1 << 30, 1 << 20).unwrap();
        assert_eq!(big.data_offset, 3 << 20);
    }

    #[test]
    fn header_round_trip() {
        let b = encoded();
        assert_eq!(&b[0..8], b"BASALTX1");
        assert_eq!(b[BITMAP_OFFSET], 0b0000_0001);
        assert_eq!(b[BITMAP_OFFSET + 1], 0b0000_0010);
        assert_eq!(b[BITMAP_OFFSET + 7], 0b1000_0000);
        assert_eq!(Header::decode(&b).unwrap(), header());
    }

    #[test]
    fn header_wrong_length() {
        assert_eq!(Header::decode(&encoded()[..100]), Err(FormatError::BadLength(100)));
    }

    #[test]
    fn header_bad_magic() {
        let mut b = encoded();
        b[0] = b'X';
        assert_eq!(Header::decode(&b), Err(FormatError::BadMagic));
    }

    #[test]
    fn header_bad_version() {
        let mut b = encoded();
        assert_eq!(&b[8..12], &2u32.to_le_bytes());
        b[8] = 1;
        // Rot in the version field is rot, not another version.
        assert!(matches!(Header::decode(&b), Err(FormatError::BadCrc { .. })));
        recrc(&mut b);
        assert_eq!(Header::decode(&b), Err(FormatError::BadVersion(1)));
    }

    #[test]
    fn header_bad_crc() {
        let mut b = encoded();
        b[50] ^= 1;
        assert!(matches!(Header::decode(&b), Err(FormatError::BadCrc { .. })));
        // A torn write: sector 0 from one header, the rest from another
        // that differs in the bitmap past the first sector.
        let geometry = Geometry::new(4 << 30, DEFAULT_REGION_SIZE).unwrap();
        let mut h = Header { geometry, dirty: vec![false; 4096], ..header() };
        let mut a = vec![0u8; HEADER_SIZE];
        h.encode(&mut a);
        h.generation += 1;
        h.dirty[4000] = true;
        let mut torn = vec![0u8; HEADER_SIZE];
        h.encode(&mut torn);
        torn[..512].copy_from_slice(&a[..512]);
        assert!(matches!(Header::decode(&torn), Err(FormatError::BadCrc { .. })));
    }

    #[test]
    fn header_bad_block_size() {
        let mut b = encoded();
        b[56..60].copy_from_slice(&512u32.to_le_bytes());
        recrc(&mut b);
        assert_eq!(Header::decode(&b), Err(FormatError::BadBlockSize(512)));
    }

    #[test]
    fn header_bad_region_size() {
        let mut b = encoded();
        b[60..64].copy_from_slice(&3000u32.to_le_bytes());
        recrc(&mut b);
        assert_eq!(Header::decode(&b), Err(FormatError::BadRegionSize(3000)));
    }

    #[test]
    fn header_bad_extent_size() {
        let mut b = encoded();
        b[64..72].copy_from_slice(&1000u64.to_le_bytes());
        recrc(&mut b);
        assert_eq!(Header::decode(&b), Err(FormatError::BadExtentSize(1000)));
        b[64..72].copy_from_slice(&0u64.to_le_bytes());
        recrc(&mut b);
        assert_eq!(Header::decode(&b), Err(FormatError::BadExtentSize(0)));
    }

    #[test]
    fn header_too_many_regions() {
        let mut b = encoded();
        b[60..64].copy_from_slice(&4096u32.to_le_bytes());
        b[64..72].copy_from_slice(&(256u64 << 20).to_le_bytes());
        recrc(&mut b);
        assert_eq!(Header::decode(&b), Err(FormatError::TooManyRegions(65536)));
    }

    #[test]
    fn header_bad_table_offset() {
        let mut b = encoded();
        b[72..80].copy_from_slice(&4096u64.to_le_bytes());
        recrc(&mut b);
        assert_eq!(Header::decode(&b), Err(FormatError::BadTableOffset(4096)));
    }

    #[test]
    fn header_bad_data_offset() {
        let mut b = encoded();
        b[80..88].copy_from_slice(&8192u64.to_le_bytes());
        recrc(&mut b);
        assert_eq!(Header::decode(&b), Err(FormatError::BadDataOffset { stored: 8192, expected: 1 << 20 }));
    }

    #[test]
    fn header_bad_region_count() {
        let mut b = encoded();
        b[88..92].copy_from_slice(&65u32.to_le_bytes());
        recrc(&mut b);
        assert_eq!(Header::decode(&b), Err(FormatError::BadRegionCount { stored: 65, expected: 64 }));
    }

    #[test]
    fn header_reserved_not_zero() {
        let mut b = encoded();
        b[100] = 1;
        recrc(&mut b);
        assert_eq!(Header::decode(&b), Err(FormatError::ReservedNotZero));
        // An unknown flag bit is reserved too.
        let mut b = encoded();
        b[92] = 0b10;
        recrc(&mut b);
        assert_eq!(Header::decode(&b), Err(FormatError::ReservedNotZero));
    }

    #[test]
    fn header_incomplete_flag_round_trips() {
        let h = Header { incomplete: true, ..header() };
        let mut b = vec![0u8; HEADER_SIZE];
        h.encode(&mut b);
        assert_eq!(u32::from_le_bytes(b[92..96].try_into().unwrap()), FLAG_INCOMPLETE);
        assert_eq!(Header::decode(&b), Ok(h));
        // And clear by default: a header of before the flag decodes as complete.
        assert!(!Header::decode(&encoded()).unwrap().incomplete);
    }

    #[test]
    fn header_bitmap_overflow() {
        let mut b = encoded();
        b[BITMAP_OFFSET + 8] = 1; // region 64 of 64
        recrc(&mut b);
        assert_eq!(Header::decode(&b), Err(FormatError::BitmapOverflow));
    }

    #[test]
    fn pick_highest_valid_generation() {
        let a = encoded();
        let mut h = header();
        h.generation = 43;
        let mut b = vec![0u8; HEADER_SIZE];
        h.encode(&mut b);
        assert_eq!(pick_header(&a, &b).unwrap().0, 1);
        assert_eq!(pick_header(&b, &a).unwrap().0, 0);
        let mut torn = b.clone();
        torn[4000] ^= 0xff;
        assert_eq!(pick_header(&a, &torn).unwrap(), (0, header()));
        let zero = vec![0u8; HEADER_SIZE];
        assert!(matches!(
            pick_header(&zero, &torn),
            Err([FormatError::BadMagic, FormatError::BadCrc { .. }])
        ));
    }

    #[test]
    fn entry_round_trip_and_errors() {
        for e in [Entry::HOLE, Entry::ZEROED, Entry::LOST, Entry::data(0xdead_beef)] {
            let mut b = [0u8; 8];
            e.encode(&mut b);
            assert_eq!(Entry::decode(&b), Ok(e));
        }
        assert!(Entry::LOST.is_lost() && !Entry::LOST.has_data() && !Entry::LOST.is_zeroed());
        let enc = |crc: u32, flags: u32| {
            let mut b = [0u8; 8];
            Entry { crc, flags }.encode(&mut b);
            b
        };
        assert_eq!(Entry::decode(&enc(0, 8)), Err(FormatError::BadFlags(8)));
        assert_eq!(Entry::decode(&enc(0, FLAG_LOST | FLAG_ALLOCATED)), Err(FormatError::BadFlags(5)));
        assert_eq!(Entry::decode(&enc(0, FLAG_ZEROED)), Err(FormatError::ZeroedNotAllocated));
        assert_eq!(Entry::decode(&enc(5, 0)), Err(FormatError::CrcOnEmptyBlock(5)));
        assert_eq!(Entry::decode(&enc(5, FLAG_LOST)), Err(FormatError::CrcOnEmptyBlock(5)));
        assert_eq!(
            Entry::decode(&enc(5, FLAG_ALLOCATED | FLAG_ZEROED)),
            Err(FormatError::CrcOnEmptyBlock(5))
        );
    }

    fn sample_table() -> (Geometry, Vec<Entry>, Vec<u8>) {
        let g = Geometry::new(4 << 20, 1 << 20).unwrap();
        let mut t = vec![Entry::HOLE; g.nblocks as usize];
        t[0] = Entry::data(1);
        t[62] = Entry::data(2);
        t[63] = Entry::ZEROED;
        t[503] = Entry::data(3);
        t[504] = Entry::data(7);
        t[1023] = Entry::LOST;
        let mut bytes = vec![0u8; g.table_len as usize];
        for p in 0..g.table_pages() {
            let at = (p * BLOCK) as usize;
            encode_table_page(&t, p, &mut bytes[at..at + BLOCK as usize]);
        }
        (g, t, bytes)
    }

    #[test]
    fn table_round_trip() {
        let (g, t, bytes) = sample_table();
        assert_eq!(g.table_pages(), 3); // 1024 blocks at 504 a page
        // Sector 1 of page 0 starts with block 63; its trailer names it.
        assert_eq!(&bytes[512 + 4..512 + 8], &(FLAG_ALLOCATED | FLAG_ZEROED).to_le_bytes());
        assert_eq!(&bytes[512 + 504..512 + 508], &1u32.to_le_bytes());
        // Page 1 begins with block 504, in table sector 8.
        assert_eq!(&bytes[4096..4100], &7u32.to_le_bytes());
        assert_eq!(&bytes[4096 + 504..4096 + 508], &8u32.to_le_bytes());
        assert_eq!(decode_table(&bytes, g.nblocks), Table { entries: t, bad: vec![] });
    }

    #[test]
    fn rot_in_a_sector_loses_only_its_blocks() {
        let (g, t, mut bytes) = sample_table();
        bytes[512 + 4] ^= 0x80; // block 63's flags, in sector 1
        let d = decode_table(&bytes, g.nblocks);
        assert_eq!(d.bad.len(), 1);
        let bad = &d.bad[0];
        assert_eq!(bad.blocks, 63..126);
        assert!(matches!(bad.why, FormatError::SectorCrc { sector: 1, .. }), "{:?}", bad.why);
        assert_eq!(bad.guesses.len(), 63);
        assert_eq!(bad.guesses[0], None, "flags 0x82 do not decode");
        assert_eq!(bad.guesses[1], Some(Entry::HOLE));
        for (b, e) in d.entries.iter().enumerate() {
            let want = if (63..126).contains(&b) { Entry::LOST } else { t[b] };
            assert_eq!(*e, want, "block {b}");
        }
    }

    #[test]
    fn rot_in_a_trailer_or_a_misplaced_sector() {
        let (g, t, mut bytes) = sample_table();
        bytes[4096 + 508] ^= 1; // crc of sector 8
        let d = decode_table(&bytes, g.nblocks);
        assert_eq!(d.bad.len(), 1);
        assert_eq!(d.bad[0].blocks, 504..567);
        assert_eq!(d.bad[0].guesses[0], Some(t[504]), "the entries themselves are intact");
        // A sector written where another belongs (sound crc, wrong number).
        let (_, _, mut bytes) = sample_table();
        let s0 = bytes[..512].to_vec();
        bytes[1024..1536].copy_from_slice(&s0);
        let d = decode_table(&bytes, g.nblocks);
        assert_eq!(d.bad.len(), 1);
        assert_eq!(d.bad[0].why, FormatError::SectorNumber { sector: 2, stored: 0 });
        assert_eq!(d.bad[0].blocks, 126..189);
        // A zeroed sector is not a valid one.
        let (_, _, mut bytes) = sample_table();
        bytes[8192..8704].fill(0);
        let d = decode_table(&bytes, g.nblocks);
        assert_eq!(d.bad.iter().map(|b| b.blocks.clone()).collect::<Vec<_>>(), vec![1008..1024]);
    }

    #[test]
    fn bad_entry_in_a_sound_sector() {
        let (g, t, mut bytes) = sample_table();
        // An entry that does not decode under a correct crc (a bug, or a
        // newer writer): only that block is lost.
        bytes[8 * 5 + 4] = 0x10;
        let c = sector_crc(&bytes[..512]);
        bytes[508..512].copy_from_slice(&c.to_le_bytes());
        let d = decode_table(&bytes, g.nblocks);
        assert_eq!(
            d.bad,
            vec![BadEntries { blocks: 5..6, why: FormatError::BadFlags(0x10), guesses: vec![None] }]
        );
        assert_eq!(d.entries[5], Entry::LOST);
        assert_eq!(d.entries[4], t[4]);
        assert_eq!(d.entries[6], t[6]);
    }

    #[test]
    fn crc_is_crc32c() {
        // The standard crc32c check value.
        assert_eq!(block_crc(b"123456789"), 0xe306_9283);
    }
}
