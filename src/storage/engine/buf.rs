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
        let cap = capacity(self.len);
        if let Some(c) = class(cap) {
            // Reserve room under the cap first, so concurrent drops cannot overshoot it.
            let before = POOLED.fetch_add(cap, Ordering::Relaxed);
            if before + cap <= POOL_BYTES {
                POOL[c].lock().unwrap_or_else(|e| e.into_inner()).push(PoolPtr(self.ptr));
                return;
            }
            POOLED.fetch_sub(cap, Ordering::Relaxed);
        }
        // SAFETY: allocated in `get` with this same layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout(cap)) }
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
        if (data.as_ptr() as usize) % BUF_ALIGN == 0 && data.len() % BUF_ALIGN == 0 {
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
    fn shared_needs_alignment() {
        let b = Bytes::from_owner(AlignedBuf::from_slice(&[1u8; 8192]));
        let w = WriteData::shared(b.clone()).expect("aligned");
        assert_eq!(w.len(), 8192);
        assert!(WriteData::shared(b.slice(512..4608)).is_err(), "misaligned address");
        assert!(WriteData::shared(b.slice(0..512)).is_err(), "short length");
        assert!(WriteData::shared(b.slice(4096..8192)).is_ok());
    }
}
