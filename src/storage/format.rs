//! The on-disk format of one extent replica. Pure: bytes in, values out; no
//! I/O, no clock. The I/O shell is `storage::extent`.
//!
//! # Layout of an extent replica file (all integers little-endian)
//!
//! One sparse file per extent replica, `<volume>-<index>.ext`, e.g. `v7-e12.ext`.
//!
//! ```text
//! file offset        size            what
//! 0                  4096            header slot A
//! 4096               4096            header slot B
//! 8192               table_len       block table: 8 bytes per 4 KiB data block,
//!                                    table_len = nblocks * 8 rounded up to 4096
//! data_offset        extent_size     data area; block b lives at data_offset + b * 4096.
//!                                    data_offset = (8192 + table_len) rounded up to 1 MiB
//! ```
//!
//! ## Header slot (4096 bytes)
//! ```text
//! 0    8   magic  "BASALTX1"
//! 8    4   format version (1)
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
//! 92   36  reserved, zero
//! 128  3968 dirty-region bitmap: bit r (byte r/8, bit r%8, LSB first) set means
//!          region r may hold writes that were not flushed; bits past the
//!          number of regions are zero
//! ```
//!
//! ## Block table entry (8 bytes)
//! ```text
//! 0    4   crc32c of the block's 4096 data bytes (0 unless ALLOCATED and not ZEROED)
//! 4    4   flags: bit 0 ALLOCATED (the block holds data), bit 1 ZEROED (the
//!          block reads as zeros but keeps its allocation; needs ALLOCATED);
//!          other bits zero. No flags: a hole, reads as zeros.
//! ```
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
pub const VERSION: u32 = 1;
/// Data block size: the unit of checksums and of the block table.
pub const BLOCK: u64 = 4096;
pub const SECTOR: u64 = 512;
pub const HEADER_SIZE: usize = 4096;
pub const HEADER_SLOTS: u64 = 2;
pub const TABLE_OFFSET: u64 = HEADER_SIZE as u64 * HEADER_SLOTS;
pub const ENTRY_SIZE: u64 = 8;
/// Table entries per 4 KiB table page.
pub const ENTRIES_PER_PAGE: u64 = BLOCK / ENTRY_SIZE;
pub const DATA_ALIGN: u64 = 1 << 20;
pub const BITMAP_OFFSET: usize = 128;
pub const MAX_REGIONS: u64 = ((HEADER_SIZE - BITMAP_OFFSET) * 8) as u64;
pub const DEFAULT_REGION_SIZE: u32 = 1 << 20;

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
        if extent_size == 0 || extent_size % BLOCK != 0 || extent_size > (1 << 45) {
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
        let table_len = (nblocks * ENTRY_SIZE).next_multiple_of(BLOCK);
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
        let version = le_u32(b, 8);
        if version != VERSION {
            return Err(FormatError::BadVersion(version));
        }
        let stored = le_u32(b, 12);
        let computed = header_crc(b);
        if stored != computed {
            return Err(FormatError::BadCrc { stored, computed });
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
        if b[92..BITMAP_OFFSET].iter().any(|&x| x != 0) {
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

/// One block table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    pub crc: u32,
    pub flags: u32,
}

impl Entry {
    pub const HOLE: Entry = Entry { crc: 0, flags: 0 };
    pub const ZEROED: Entry = Entry { crc: 0, flags: FLAG_ALLOCATED | FLAG_ZEROED };

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

    pub fn encode(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.crc.to_le_bytes());
        out[4..8].copy_from_slice(&self.flags.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> Result<Entry, FormatError> {
        let e = Entry { crc: le_u32(b, 0), flags: le_u32(b, 4) };
        if e.flags & !(FLAG_ALLOCATED | FLAG_ZEROED) != 0 {
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

/// Decodes a whole table (`geometry.table_len` bytes); on error names the block.
pub fn decode_table(b: &[u8], nblocks: u64) -> Result<Vec<Entry>, (u64, FormatError)> {
    (0..nblocks)
        .map(|i| {
            let at = (i * ENTRY_SIZE) as usize;
            Entry::decode(&b[at..at + ENTRY_SIZE as usize]).map_err(|e| (i, e))
        })
        .collect()
}

/// Encodes table page `page` (4096 bytes) from the in-memory table.
pub fn encode_table_page(table: &[Entry], page: u64, out: &mut [u8]) {
    out.fill(0);
    let first = (page * ENTRIES_PER_PAGE) as usize;
    let last = (first + ENTRIES_PER_PAGE as usize).min(table.len());
    for (i, e) in table[first..last].iter().enumerate() {
        e.encode(&mut out[i * ENTRY_SIZE as usize..(i + 1) * ENTRY_SIZE as usize]);
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
        assert_eq!(g.table_len, 131072);
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
        b[8] = 2;
        recrc(&mut b);
        assert_eq!(Header::decode(&b), Err(FormatError::BadVersion(2)));
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
        for e in [Entry::HOLE, Entry::ZEROED, Entry::data(0xdead_beef)] {
            let mut b = [0u8; 8];
            e.encode(&mut b);
            assert_eq!(Entry::decode(&b), Ok(e));
        }
        let enc = |crc: u32, flags: u32| {
            let mut b = [0u8; 8];
            Entry { crc, flags }.encode(&mut b);
            b
        };
        assert_eq!(Entry::decode(&enc(0, 4)), Err(FormatError::BadFlags(4)));
        assert_eq!(Entry::decode(&enc(0, FLAG_ZEROED)), Err(FormatError::ZeroedNotAllocated));
        assert_eq!(Entry::decode(&enc(5, 0)), Err(FormatError::CrcOnEmptyBlock(5)));
        assert_eq!(
            Entry::decode(&enc(5, FLAG_ALLOCATED | FLAG_ZEROED)),
            Err(FormatError::CrcOnEmptyBlock(5))
        );
    }

    #[test]
    fn table_round_trip_and_bad_entry() {
        let g = Geometry::new(4 << 20, 1 << 20).unwrap();
        let mut t = vec![Entry::HOLE; g.nblocks as usize];
        t[0] = Entry::data(1);
        t[511] = Entry::ZEROED;
        t[512] = Entry::data(7);
        let mut bytes = vec![0u8; g.table_len as usize];
        for p in 0..g.table_pages() {
            let at = (p * BLOCK) as usize;
            encode_table_page(&t, p, &mut bytes[at..at + BLOCK as usize]);
        }
        assert_eq!(decode_table(&bytes, g.nblocks).unwrap(), t);
        bytes[512 * 8 + 4] = 0x80;
        assert_eq!(decode_table(&bytes, g.nblocks), Err((512, FormatError::BadFlags(0x80))));
    }

    #[test]
    fn crc_is_crc32c() {
        // The standard crc32c check value.
        assert_eq!(block_crc(b"123456789"), 0xe306_9283);
    }
}
