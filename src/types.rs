//! Identifier newtypes shared by every layer. A bare `u64` that could be an
//! id, an index or an offset is how bugs get in; these keep them apart.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_newtype {
    ($(#[$m:meta])* $name:ident, $prefix:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_newtype!(
    /// A volume's cluster-wide id (names can be reused after deletion; ids are not).
    VolumeId,
    "v"
);
id_newtype!(
    /// Index of an extent within its volume.
    ExtentIndex,
    "e"
);
id_newtype!(
    /// Version of an extent's replica set; bumped by every membership change.
    Epoch,
    "epoch"
);
id_newtype!(
    /// A node of the cluster.
    NodeId,
    "n"
);

/// One extent of one volume: the key of an extent replica in a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ExtentKey {
    pub volume: VolumeId,
    pub index: ExtentIndex,
}

impl fmt::Display for ExtentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.volume, self.index)
    }
}

/// What a range of a volume or extent holds, as NBD `base:allocation`
/// and SCSI GET LBA STATUS report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockState {
    /// Storage is allocated for the range (false: a hole, thin).
    pub allocated: bool,
    /// The range is known to read as zeros.
    pub zero: bool,
}

impl BlockState {
    pub const HOLE: BlockState = BlockState { allocated: false, zero: true };
    pub const DATA: BlockState = BlockState { allocated: true, zero: false };
}

/// A run of bytes sharing one [`BlockState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapExtent {
    pub len: u64,
    pub state: BlockState,
}

/// One piece of a read, in order: data, or a hole that reads as zeros and
/// was never stored (NBD can send it as `OFFSET_HOLE` without the bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadChunk {
    Data(bytes::Bytes),
    Hole(u32),
}

impl ReadChunk {
    pub fn len(&self) -> usize {
        match self {
            ReadChunk::Data(b) => b.len(),
            ReadChunk::Hole(n) => *n as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Flattens read chunks into one buffer (holes become zeros).
pub fn flatten_chunks(chunks: &[ReadChunk]) -> bytes::Bytes {
    if let [ReadChunk::Data(b)] = chunks {
        return b.clone();
    }
    let total: usize = chunks.iter().map(ReadChunk::len).sum();
    let mut out = bytes::BytesMut::with_capacity(total);
    for c in chunks {
        match c {
            ReadChunk::Data(b) => out.extend_from_slice(b),
            ReadChunk::Hole(n) => out.resize(out.len() + *n as usize, 0),
        }
    }
    out.freeze()
}

id_newtype!(
    /// Owner generation of a volume: bumped by every change of owner, so a
    /// replica can refuse an older owner that has not noticed it was replaced.
    Generation,
    "g"
);

/// The id of a cluster, chosen at bootstrap: 128 random bits, so two
/// clusters never mistake each other's nodes for their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClusterId(pub u128);

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// A hasher for maps keyed by ids this node hands out itself (op ids,
/// request ids): a multiply and a rotate per word instead of SipHash, which
/// showed at 1-2% of an owner's CPU per replicated write. Not for keys a
/// peer or client picks: those keep the default, DoS-resistant hasher.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// `HashMap<K, V, IdHash>`: see [`IdHasher`].
pub type IdHash = std::hash::BuildHasherDefault<IdHasher>;

#[cfg(test)]
mod id_hash_tests {
    use super::IdHasher;
    use std::hash::{Hash, Hasher};

    fn hash(v: impl Hash) -> u64 {
        let mut h = IdHasher::default();
        v.hash(&mut h);
        h.finish()
    }

    #[test]
    fn neighbouring_ids_hash_apart_and_in_every_bucket_bit() {
        let hashes: std::collections::HashSet<u64> = (0u64..10_000).map(hash).collect();
        assert_eq!(hashes.len(), 10_000);
        // hashbrown takes the top 7 bits as a tag and the low bits as the
        // bucket: sequential ids must spread over both.
        let tags: std::collections::HashSet<u64> = (0u64..10_000).map(|i| hash(i) >> 57).collect();
        assert_eq!(tags.len(), 128);
        let low: std::collections::HashSet<u64> = (0u64..10_000).map(|i| hash(i) & 1023).collect();
        assert!(low.len() > 900, "{} of 1024 low buckets", low.len());
        assert_ne!(hash(b"ab"), hash(b"ba"));
    }
}
