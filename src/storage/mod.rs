//! The local store: extent replicas on this node's disks.
//!
//! Owns: the on-disk format of an extent replica (data, a crc32c per 4 KiB
//! block, metadata), the I/O engines (io_uring, psync, mem), and the choice of
//! data directory for a new extent. Must never: acknowledge a write or flush
//! that is not where it claims to be (page cache is not stable storage), or
//! return data whose checksum does not match.
//!
//! The API the volume layer uses is [`Store`] and [`Extent`]; a remote
//! replica (later) implements the same operations over the peer transport.
//!
//! Files: [`format`](mod@format) (pure on-disk format, documented byte by byte),
//! [`extent`] (one replica: I/O, crash atomicity, recovery), [`store`]
//! (data dirs, placement), [`identity`] (which node a data dir belongs
//! to), [`engine`] (io_uring | psync | mem),
//! [`rangelock`] (per-extent block range lock).

pub mod engine;
pub mod extent;
pub mod format;
pub mod identity;
pub mod rangelock;
pub mod store;

pub use engine::mem::MemDisk;
pub use extent::Extent;
pub use identity::{DirId, DirIdentity, write_atomically};
pub use store::{FlushBarrier, Store, StoreOptions};

use crate::types::{ExtentKey, NodeId};
use std::path::PathBuf;

/// Which engine does the disk I/O.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// io_uring if the kernel allows it, else psync (with a log line).
    #[default]
    Auto,
    Uring,
    Psync,
    /// In memory; data is lost at exit. For tests and throwaway demos.
    Mem,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// One directory per disk. New extents go to the one with the most free space.
    pub data_dirs: Vec<PathBuf>,
    pub engine: EngineKind,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("I/O error on {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("checksum mismatch in extent {key} block {block}")]
    Checksum { key: ExtentKey, block: u64 },
    #[error("no space left on device for extent {key}")]
    NoSpace { key: ExtentKey },
    #[error("range {offset}+{len} is outside extent {key} of {size} bytes")]
    OutOfRange { key: ExtentKey, offset: u64, len: u64, size: u64 },
    #[error("range {offset}+{len} is not 512-byte aligned")]
    Misaligned { offset: u64, len: u64 },
    #[error("corrupt extent file {path}: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error(
        "extent file {path} is in format version {version}; this basaltd reads version {} only and does \
         not upgrade in place: copy the volume's data out with the basaltd that wrote it (e.g. qemu-img \
         convert from its NBD export) and into a new volume, then remove the old data directory",
        format::VERSION
    )]
    Version { path: PathBuf, version: u32 },
    #[error("extent {key} is unavailable ({path} did not open: {why}); restore or remove the file")]
    Unavailable { key: ExtentKey, path: PathBuf, why: String },
    #[error("the store is shut down")]
    Closed,
    #[error("extent {key} exists with {have} bytes, asked for {want}")]
    SizeMismatch { key: ExtentKey, have: u64, want: u64 },
    #[error("extent {key} cannot have size {size}: {why}")]
    BadSize { key: ExtentKey, size: u64, why: String },
    #[error("bad store configuration: {0}")]
    Config(String),
    #[error(
        "data directory {dir} belongs to node {its_node}, but {node_dir} belongs to node {node}: every \
         data directory of a node must be its own; remove the other node's directory from the configuration"
    )]
    ForeignDir { dir: PathBuf, its_node: NodeId, node: NodeId, node_dir: PathBuf },
    #[error(
        "data directory {dir} holds data ({files}) but no identity file, while the other data directories \
         have one: it was not stamped by this node; remove it from the configuration, or move its files out"
    )]
    UnknownDir { dir: PathBuf, files: String },
    #[error(
        "identity of data directory {dir} is unreadable ({why}) and no other data directory names the node: \
         restore basalt-dir.json from a backup"
    )]
    BadIdentity { dir: PathBuf, why: String },
    #[error("data directories {a} and {b} are the same directory; give each once")]
    SameDir { a: PathBuf, b: PathBuf },
}

impl StoreError {
    /// An I/O error; ENOSPC stays visible through [`StoreError::is_no_space`].
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io { what: what.into(), source }
    }

    /// True if the underlying cause is a full disk (surfaces as ENOSPC to clients).
    pub fn is_no_space(&self) -> bool {
        match self {
            StoreError::NoSpace { .. } => true,
            StoreError::Io { source, .. } => source.raw_os_error() == Some(libc::ENOSPC),
            _ => false,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
