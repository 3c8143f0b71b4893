//! I/O buffers: aligned, owned, recycled.
//!
//! Every read and write the engines perform goes through memory aligned to
//! [`BUF_ALIGN`], as O_DIRECT requires. [`AlignedBuf`] is that memory, owned
//! by one op at a time. [`WriteData`] is what a write sends: an owned buffer,
//! or a frontend's payload (`Bytes`) that already lies in aligned memory, so
//! a large WRITE reaches the disk without a copy.
//!
//! Buffers are recycled through a pool of power-of-two size classes, 4 KiB to
//! [`POOL_MAX_BUF`], holding at most [`POOL_BYTES`] in all. Without it every
//! 1 MiB request paid an mmap, 256 page faults with their page clearing, and
//! an munmap: a profile of 1 MiB sequential reads spent a third of the
//! worker's time in the page-fault path. A recycled buffer keeps the bytes of
//! its last use; [`AlignedBuf::zeroed`] clears them, and
//! [`AlignedBuf::for_overwrite`] leaves that to a caller that overwrites
//! every byte it later exposes (a read the kernel fills, a write buffer the
//! caller fills). Either way every byte is initialized memory, so handing out
//! a stale buffer is never undefined behaviour, only a caller bug that the
//! store's own tests would show as wrong data.
//!
//! Buffers of [`HUGE_MIN`] and more live in anonymous mappings aligned to
//! 2 MiB and advised for transparent huge pages, several buffers of a small
//! class carved from one 2 MiB mapping. Memory from the general allocator
//! is scattered 4 KiB pages, and a disk request needs one segment per
//! physically contiguous piece: a 1 MiB read into it was 256 segments, over
//! the 254 a virtio disk takes in one request, and on a virtual disk every
//! segment is work for the host. fio reading this VM's disk at 1 MiB and
//! QD8 went from 1,676-2,182 MiB/s to 2,535-2,715 with huge-page buffers
//! (interleaved runs). Where huge pages are off or short, the mappings
//! simply get small pages, as before.

use bytes::Bytes;
use std::alloc::Layout;
use std::fmt;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Alignment of every I/O buffer: enough for O_DIRECT on 4 KiB-sector disks.
pub const BUF_ALIGN: usize = 4096;
/// The largest buffer the pool keeps (the largest payload a frontend accepts).
pub const POOL_MAX_BUF: usize = 32 << 20;
/// The most memory the pool holds while idle, over all size classes.
pub const POOL_BYTES: usize = 64 << 20;
/// Buffers of at least this capacity (and at most [`POOL_MAX_BUF`]) live in
/// huge-page mappings of their own (see the module docs).
pub const HUGE_MIN: usize = 64 << 10;
/// The size and alignment of a transparent huge page on x86-64 and arm64 (4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

const CLASSES: usize = (POOL_MAX_BUF / BUF_ALIGN).trailing_zeros() as usize + 1;

/// A heap buffer aligned to [`BUF_ALIGN`], owned by one op at a time.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf uniquely owns its allocation (like Box<[u8]>); moving it
// across threads moves that ownership.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`, which is safe to share.
unsafe impl Sync for AlignedBuf {}

/// The allocation size behind a buffer of `len` bytes: a power of two (so
/// buffers of similar sizes share a pool class), at least one block.
fn capacity(len: usize) -> usize {
    len.max(BUF_ALIGN).next_power_of_two()
}

fn class(cap: usize) -> Option<usize> {
    (cap <= POOL_MAX_BUF).then(|| (cap / BUF_ALIGN).trailing_zeros() as usize)
}

fn layout(cap: usize) -> Layout {
    Layout::from_size_align(cap, BUF_ALIGN).expect("buffer too large")
}

/// Whether buffers of capacity `cap` come from [`map_fresh`] (else from
/// the general allocator).
fn is_mapped(cap: usize) -> bool {
    (HUGE_MIN..=POOL_MAX_BUF).contains(&cap)
}

/// Fresh zeroed memory for a buffer of capacity `cap` (a power of two with
/// [`is_mapped`]): a mapping aligned to 2 MiB and advised for huge pages.
/// A class under 2 MiB takes the first piece of one 2 MiB mapping and
/// offers the other pieces to the pool; each piece is unmapped on its own.
fn map_fresh(cap: usize) -> NonNull<u8> {
    let span = cap.max(HUGE_PAGE);
    // Over-map by one huge page, then unmap what lies outside the aligned span.
    let over = span + HUGE_PAGE;
    // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            over,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        std::alloc::handle_alloc_error(layout(cap));
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let end = aligned + span;
    // SAFETY: both ranges lie inside the mapping just made and outside the
    // span kept; munmap of page-aligned subranges cannot fail here.
    unsafe {
        if aligned > start {
            libc::munmap(start as *mut libc::c_void, aligned - start);
        }
        if start + over > end {
            libc::munmap(end as *mut libc::c_void, start + over - end);
        }
        // Advice only: where THP is off or short, small pages serve.
        libc::madvise(aligned as *mut libc::c_void, span, libc::MADV_HUGEPAGE);
    }
    for piece in (aligned + cap..end).step_by(cap) {
        // SAFETY: each piece is a distinct part of the fresh mapping, owned by nobody yet.
        release(NonNull::new(piece as *mut u8).expect("inside a mapping"), cap);
    }
    NonNull::new(aligned as *mut u8).expect("mmap never returns null on success")
}

/// Returns a free buffer of capacity `cap` to the pool, or to the system
/// when the pool is full.
fn release(ptr: NonNull<u8>, cap: usize) {
    if let Some(c) = class(cap) {
        // Reserve room under the cap first, so concurrent drops cannot overshoot it.
        let before = POOLED.fetch_add(cap, Ordering::Relaxed);
        if before + cap <= POOL_BYTES {
            POOL[c].lock().unwrap_or_else(|e| e.into_inner()).push(PoolPtr(ptr));
            return;
        }
        POOLED.fetch_sub(cap, Ordering::Relaxed);
    }
    if is_mapped(cap) {
        // SAFETY: a piece of a mapping made by `map_fresh` for this class,
        // `cap` bytes, unmapped once (nobody references it any more).
        unsafe { libc::munmap(ptr.as_ptr().cast(), cap) };
    } else {
        // SAFETY: allocated in `get` with this same layout, freed once.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), layout(cap)) }
    }
}

impl AlignedBuf {
    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let (mut b, recycled) = Self::get(len);
        if recycled {
            b.as_mut_slice().fill(0);
        }
        b
    }

    /// A buffer of `len` bytes whose contents are unspecified (zeros, or what
    /// an earlier op of this process left there). For a caller that
    /// overwrites every byte it later reads or exposes.
    pub fn for_overwrite(len: usize) -> AlignedBuf {
        Self::get(len).0
    }

    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::for_overwrite(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    /// A buffer from the pool (true), or a fresh zeroed one (false).
    fn get(len: usize) -> (AlignedBuf, bool) {
        let cap = capacity(len);
        if let Some(c) = class(cap)
            && let Some(PoolPtr(ptr)) = POOL[c].lock().unwrap_or_else(|e| e.into_inner()).pop()
        {
            POOLED.fetch_sub(cap, Ordering::Relaxed);
            return (AlignedBuf { ptr, len }, true);
        }
        if is_mapped(cap) {
            // Anonymous mappings start out as zero pages.
            return (AlignedBuf { ptr: map_fresh(cap), len }, false);
        }
        let layout = layout(cap);
        // SAFETY: the layout has a non-zero size. Zeroed, so every byte is
        // initialized from the start (large ones come as fresh zero pages).
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(p) else { std::alloc::handle_alloc_error(layout) };
        (AlignedBuf { ptr, len }, false)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to at least `len` initialized bytes (zeroed at
        // allocation, only ever overwritten since) owned by self; the borrow
        // ties the slice to self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// For the io_uring engine: the kernel reads or writes through it while the op is in flight.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

/// A free buffer waiting for reuse.
struct PoolPtr(NonNull<u8>);

// SAFETY: a pooled pointer is an allocation nobody references; whoever pops
// it owns it, like a Box moved between threads.
unsafe impl Send for PoolPtr {}

#[allow(clippy::declare_interior_mutable_const)] // only used to build the array below
const EMPTY_CLASS: Mutex<Vec<PoolPtr>> = Mutex::new(Vec::new());
static POOL: [Mutex<Vec<PoolPtr>>; CLASSES] = [EMPTY_CLASS; CLASSES];
/// Bytes held by the pool (capacity of every pooled buffer).
static POOLED: AtomicUsize = AtomicUsize::new(0);

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        release(self.ptr, capacity(self.len));
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// The bytes a write sends to disk.
pub enum WriteData {
    /// A buffer the op owns.
    Owned(AlignedBuf),
    /// Shared bytes already in aligned memory (see [`WriteData::shared`]).
    /// The op holds a reference, so the memory outlives the I/O; the kernel
    /// only reads it.
    Shared(Bytes),
}

impl WriteData {
    /// Wraps `data` without copying if its address and length are multiples
    /// of [`BUF_ALIGN`]; otherwise hands it back.
    pub fn shared(data: Bytes) -> Result<WriteData, Bytes> {
        if (data.as_ptr() as usize).is_multiple_of(BUF_ALIGN) && data.len().is_multiple_of(BUF_ALIGN) {
            Ok(WriteData::Shared(data))
        } else {
            Err(data)
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        match self {
            WriteData::Owned(b) => b.as_slice(),
            WriteData::Shared(b) => b,
        }
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// For the io_uring engine: the kernel reads through it while the op is in flight.
    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.as_slice().as_ptr()
    }
}

impl From<AlignedBuf> for WriteData {
    fn from(b: AlignedBuf) -> Self {
        WriteData::Owned(b)
    }
}

impl fmt::Debug for WriteData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteData::Owned(b) => b.fmt(f),
            WriteData::Shared(b) => write!(f, "WriteData::Shared({} bytes)", b.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_is_zero_even_when_recycled() {
        for len in [4096, 8192, 3 << 20] {
            let mut a = AlignedBuf::zeroed(len);
            a.as_mut_slice().fill(0xab);
            drop(a);
            let b = AlignedBuf::zeroed(len);
            assert!(b.iter().all(|&x| x == 0), "len {len}");
            assert_eq!(b.len(), len);
            assert_eq!(b.as_slice().as_ptr() as usize % BUF_ALIGN, 0);
        }
    }

    #[test]
    fn odd_and_huge_sizes() {
        for len in [0, 1, 4095, 4097, (1 << 20) + 512, POOL_MAX_BUF + 4096] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_slice().as_ptr() as usize % BUF_ALIGN, 0);
            let c = AlignedBuf::from_slice(&vec![5u8; len]);
            assert!(c.iter().all(|&x| x == 5));
        }
    }

    #[test]
    fn pool_stays_under_its_cap() {
        let bufs: Vec<_> = (0..(POOL_BYTES / (8 << 20)) + 4).map(|_| AlignedBuf::zeroed(8 << 20)).collect();
        drop(bufs);
        assert!(POOLED.load(Ordering::Relaxed) <= POOL_BYTES);
    }

    #[test]
    fn large_buffers_lie_in_huge_page_memory() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        let thp_on = thp.contains("[always]") || thp.contains("[madvise]");
        for len in [HUGE_MIN, 100 << 10, 1 << 20, 2 << 20, 5 << 20, POOL_MAX_BUF] {
            let b = AlignedBuf::for_overwrite(len);
            let cap = capacity(len);
            let at = b.as_slice().as_ptr() as usize;
            // Carved from a 2 MiB-aligned mapping at multiples of its class.
            assert_eq!(at % cap.min(HUGE_PAGE), 0, "len {len}");
            if thp_on {
                assert!(thp_eligible(at), "len {len}: the mapping at {at:#x} is not advised for huge pages");
            }
        }
        let small = AlignedBuf::for_overwrite(HUGE_MIN / 2);
        assert!(!is_mapped(capacity(small.len())));
    }

    /// Whether /proc/self/smaps says the mapping holding `addr` may use THP.
    fn thp_eligible(addr: usize) -> bool {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((a, b)) = range.split_once('-')
                && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            {
                inside = (a..b).contains(&addr);
            } else if inside && let Some(v) = line.strip_prefix("THPeligible:") {
                return v.trim() == "1";
            }
        }
        false
    }

    #[test]
    fn shared_needs_alignment() {
        let b = Bytes::from_owner(AlignedBuf::from_slice(&[1u8; 8192]));
        let w = WriteData::shared(b.clone()).expect("aligned");
        assert_eq!(w.len(), 8192);
        assert!(WriteData::shared(b.slice(512..4608)).is_err(), "misaligned address");
        assert!(WriteData::shared(b.slice(0..512)).is_err(), "short length");
        assert!(WriteData::shared(b.slice(4096..8192)).is_ok());
    }
}
