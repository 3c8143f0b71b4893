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
//! NOTE: this file is the interface; the implementation below is a stand-in
//! (plain files, no checksums) until the extent format lands.

use crate::types::{Epoch, ExtentKey, MapExtent, ReadChunk};
use bytes::Bytes;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

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
    #[error("the store is shut down")]
    Closed,
}

impl StoreError {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            // Callers that know the key use NoSpace directly; keep ENOSPC visible here too.
            return StoreError::Io { what: what.into(), source };
        }
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

/// A node's local store.
#[derive(Debug)]
pub struct Store {
    cfg: StoreConfig,
    extents: Mutex<HashMap<ExtentKey, Arc<Extent>>>,
}

impl Store {
    /// Opens (and recovers) the store in `cfg.data_dirs`, creating them if needed.
    pub async fn open(cfg: StoreConfig) -> Result<Arc<Store>> {
        for d in &cfg.data_dirs {
            std::fs::create_dir_all(d).map_err(|e| StoreError::io(format!("create {}", d.display()), e))?;
        }
        Ok(Arc::new(Store { cfg, extents: Mutex::new(HashMap::new()) }))
    }

    /// True if a replica of `key` exists in this store (open or on disk).
    pub fn contains(&self, key: ExtentKey) -> bool {
        self.extents.lock().unwrap().contains_key(&key)
            || self.cfg.data_dirs[0].join(format!("{}-{}.ext", key.volume, key.index)).exists()
    }

    /// The replica of extent `key`, created empty (all holes) with `size`
    /// bytes if it does not exist yet.
    pub async fn extent(&self, key: ExtentKey, size: u64, epoch: Epoch) -> Result<Arc<Extent>> {
        let _ = epoch;
        if let Some(e) = self.extents.lock().unwrap().get(&key) {
            return Ok(e.clone());
        }
        let path = self.cfg.data_dirs[0].join(format!("{}-{}.ext", key.volume, key.index));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StoreError::io(format!("open {}", path.display()), e))?;
        file.set_len(size).map_err(|e| StoreError::io("set_len", e))?;
        let ext = Arc::new(Extent { key, size, file: Arc::new(file) });
        Ok(self.extents.lock().unwrap().entry(key).or_insert(ext).clone())
    }

    /// Makes every write completed before this call durable on every extent.
    pub async fn flush_all(&self) -> Result<()> {
        let all: Vec<_> = self.extents.lock().unwrap().values().cloned().collect();
        for e in all {
            e.flush().await?;
        }
        Ok(())
    }
}

/// One extent replica. All offsets are relative to the extent and must be
/// 512-byte aligned; the range must lie inside the extent.
#[derive(Debug)]
pub struct Extent {
    key: ExtentKey,
    size: u64,
    file: Arc<std::fs::File>,
}

impl Extent {
    pub fn key(&self) -> ExtentKey {
        self.key
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        if offset % 512 != 0 || len % 512 != 0 {
            return Err(StoreError::Misaligned { offset, len });
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(StoreError::OutOfRange { key: self.key, offset, len, size: self.size });
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset`. Never-written ranges come back as holes.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<ReadChunk>> {
        self.check(offset, len as u64)?;
        let f = self.file.clone();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; len as usize];
            f.read_exact_at(&mut buf, offset).map_err(|e| StoreError::io("read", e))?;
            Ok(vec![ReadChunk::Data(Bytes::from(buf))])
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    /// Writes `data` at `offset`; with `fua` it is durable before this returns.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        let f = self.file.clone();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            f.write_all_at(&data, offset).map_err(|e| StoreError::io("write", e))?;
            if fua {
                f.sync_data().map_err(|e| StoreError::io("fdatasync", e))?;
            }
            Ok(())
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    /// Makes `[offset, offset+len)` read as zeros. With `deallocate` the
    /// blocks may become holes (TRIM, or WRITE_ZEROES without NO_HOLE).
    pub async fn write_zeroes(&self, offset: u64, len: u64, deallocate: bool, fua: bool) -> Result<()> {
        let _ = deallocate;
        self.check(offset, len)?;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(1 << 20);
            self.write(offset + done, Bytes::from(vec![0u8; n as usize]), false).await?;
            done += n;
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// TRIM: the range may read back as zeros or as the old data afterwards;
    /// this store deallocates it and it reads as zeros.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.write_zeroes(offset, len, true, fua).await
    }

    /// Durability barrier: every write completed before the call is on stable storage after it.
    pub async fn flush(&self) -> Result<()> {
        let f = self.file.clone();
        tokio::task::spawn_blocking(move || f.sync_data().map_err(|e| StoreError::io("fdatasync", e)))
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Allocation map of `[offset, offset+len)`, in order, covering the range.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<MapExtent>> {
        self.check(offset, len)?;
        Ok(vec![MapExtent { len, state: crate::types::BlockState::DATA }])
    }
}
