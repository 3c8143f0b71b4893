//! Owner fences: the highest owner generation this node has seen for each
//! volume, kept durably, so that a replica refuses an old owner (a
//! partitioned one that has not noticed it was replaced) even after a
//! restart.
//!
//! Owns: the fence files (`STATE/fences/vID`, one per volume this node
//! has been asked about) and the per-volume admission rule. Must never:
//! apply a raised generation before it is on stable storage, let a request
//! of an older generation start after a newer one was admitted, or forget
//! a fence whose file it cannot read (that volume's requests fail instead).
//!
//! # A fence file
//! ```text
//! 0  4  magic "BFEN"
//! 4  8  generation (u64 LE)
//! 12 4  crc32c of bytes 0..12
//! ```
//! Written whole to `vID.tmp`, fsynced, renamed over `vID`, and the
//! directory fsynced: a crash leaves the old file or the new one.
//!
//! # Admission
//! Every request holds its volume's fence shared ([`FenceGuard`]) from its
//! check until it has been applied. A request with a newer generation
//! takes the fence exclusively to persist it: it waits for the requests of
//! the older generation already admitted to finish, and requests arriving
//! meanwhile wait behind it, then are checked against the new generation.
//! So once a new owner's first request has been answered, nothing of an
//! older owner is applied any more, which reconciliation at takeover
//! relies on. Concurrent raises persist once; the others wait for it. The
//! persist runs in a task of its own holding the fence, so a caller that
//! goes away cannot leave it half done or let a later persist overtake it.

use crate::storage::{identity, write_atomically};
use crate::types::{Generation, VolumeId};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedRwLockReadGuard, RwLock};

const MAGIC: [u8; 4] = *b"BFEN";
const FILE_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("owner generation {asked} of volume {volume} is older than {current}, which this node has seen")]
    Stale { volume: VolumeId, asked: Generation, current: Generation },
    #[error("cannot persist the owner generation of volume {volume} at {path}")]
    Io {
        volume: VolumeId,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the fence file of volume {volume} ({path}) is unreadable ({why}); its requests are refused \
         until it is restored or replaced by a file naming the generation of the volume's owner"
    )]
    Broken { volume: VolumeId, path: PathBuf, why: String },
    #[error("cannot open the fence directory {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One volume's fence.
#[derive(Debug, Default)]
struct VolumeFence {
    current: AtomicU64,
    lock: Arc<RwLock<()>>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    volumes: Mutex<HashMap<VolumeId, Arc<VolumeFence>>>,
    /// Volumes whose fence file did not read back: (path, why).
    broken: HashMap<VolumeId, (PathBuf, String)>,
}

/// The fences of every volume (cheap to clone: shared).
#[derive(Debug, Clone)]
pub struct Fences(Arc<Inner>);

/// A request's hold on its volume's fence: the generation it was admitted
/// under stays current (no newer one is persisted) until this drops.
#[derive(Debug)]
pub struct FenceGuard {
    _held: OwnedRwLockReadGuard<()>,
    generation: Generation,
}

impl FenceGuard {
    /// The volume's generation as this request was admitted: at least the
    /// request's own.
    pub fn current(&self) -> Generation {
        self.generation
    }
}

fn file_name(volume: VolumeId) -> String {
    format!("{volume}")
}

fn volume_of(name: &str) -> Option<VolumeId> {
    let id: u64 = name.strip_prefix('v')?.parse().ok()?;
    (file_name(VolumeId(id)) == name).then_some(VolumeId(id))
}

fn encode(generation: Generation) -> [u8; FILE_LEN] {
    let mut b = [0; FILE_LEN];
    b[..4].copy_from_slice(&MAGIC);
    b[4..12].copy_from_slice(&generation.0.to_le_bytes());
    let crc = crc32c::crc32c(&b[..12]);
    b[12..].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Result<Generation, String> {
    if b.len() != FILE_LEN {
        return Err(format!("{} bytes, a fence file has {FILE_LEN}", b.len()));
    }
    if b[..4] != MAGIC {
        return Err("bad magic".into());
    }
    let crc = u32::from_le_bytes(b[12..].try_into().expect("4 bytes"));
    if crc != crc32c::crc32c(&b[..12]) {
        return Err("crc32c mismatch".into());
    }
    Ok(Generation(u64::from_le_bytes(b[4..12].try_into().expect("8 bytes"))))
}

impl Fences {
    /// Opens the fences under `dir` (created durably if missing) and reads
    /// every fence file. A file that does not read back makes only its
    /// volume unusable here (logged); leftovers of an interrupted write
    /// (`.tmp`) are ignored, since the rename never happened.
    pub fn open(dir: &Path) -> Result<Fences, FenceError> {
        let open_err = |source| FenceError::Open { path: dir.to_path_buf(), source };
        identity::create_dir_durably(dir).map_err(open_err)?;
        let mut volumes = HashMap::new();
        let mut broken = HashMap::new();
        for entry in std::fs::read_dir(dir).map_err(open_err)? {
            let entry = entry.map_err(open_err)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(volume) = volume_of(&name) else { continue };
            let path = entry.path();
            match std::fs::read(&path).map_err(|e| e.to_string()).and_then(|b| decode(&b)) {
                Ok(g) => {
                    let f = VolumeFence { current: AtomicU64::new(g.0), lock: Arc::default() };
                    volumes.insert(volume, Arc::new(f));
                }
                Err(why) => {
                    tracing::error!(%volume, path = %path.display(), %why,
                        "fence file unreadable: the volume's requests are refused on this node");
                    broken.insert(volume, (path, why));
                }
            }
        }
        tracing::debug!(dir = %dir.display(), volumes = volumes.len(), broken = broken.len(), "fences open");
        Ok(Fences(Arc::new(Inner { dir: dir.to_path_buf(), volumes: Mutex::new(volumes), broken })))
    }

    /// The highest generation persisted for `volume` (0 if none).
    pub fn current(&self, volume: VolumeId) -> Generation {
        let m = self.0.volumes.lock().unwrap();
        Generation(m.get(&volume).map_or(0, |f| f.current.load(Ordering::Acquire)))
    }

    fn fence(&self, volume: VolumeId) -> Result<Arc<VolumeFence>, FenceError> {
        if let Some((path, why)) = self.0.broken.get(&volume) {
            return Err(FenceError::Broken { volume, path: path.clone(), why: why.clone() });
        }
        Ok(self.0.volumes.lock().unwrap().entry(volume).or_default().clone())
    }

    /// Admits a request of owner `generation` for `volume`: refuses it if
    /// an older generation than the persisted one; with `raise`, persists a
    /// newer one durably first (without, a newer one is admitted as it is:
    /// read-only queries must not fence an owner). Cancel safe.
    pub async fn admit(
        &self,
        volume: VolumeId,
        generation: Generation,
        raise: bool,
    ) -> Result<FenceGuard, FenceError> {
        let f = self.fence(volume)?;
        loop {
            let held = f.lock.clone().read_owned().await;
            let current = Generation(f.current.load(Ordering::Acquire));
            if generation < current {
                return Err(FenceError::Stale { volume, asked: generation, current });
            }
            if generation == current || !raise {
                return Ok(FenceGuard { _held: held, generation: current.max(generation) });
            }
            drop(held);
            let (f2, path) = (f.clone(), self.0.dir.join(file_name(volume)));
            let raised = tokio::spawn(async move {
                let _excl = f2.lock.clone().write_owned().await;
                if generation.0 <= f2.current.load(Ordering::Acquire) {
                    return Ok(()); // a concurrent raise got there first
                }
                let p = path.clone();
                let written = tokio::task::spawn_blocking(move || write_atomically(&p, &encode(generation)))
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)));
                written.map_err(|source| FenceError::Io { volume, path, source })?;
                f2.current.store(generation.0, Ordering::Release);
                tracing::info!(%volume, %generation, "owner generation raised");
                Ok(())
            });
            raised.await.unwrap_or_else(|e| {
                Err(FenceError::Io {
                    volume,
                    path: self.0.dir.join(file_name(volume)),
                    source: io::Error::other(e),
                })
            })?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_file_round_trips_and_rot_is_refused() {
        let b = encode(Generation(0x0102_0304_0506_0708));
        assert_eq!(&b[..4], b"BFEN");
        assert_eq!(decode(&b), Ok(Generation(0x0102_0304_0506_0708)));
        for i in 0..FILE_LEN {
            let mut bad = b;
            bad[i] ^= 0x10;
            assert!(decode(&bad).is_err(), "flip at {i}");
        }
        assert!(decode(&b[..15]).is_err());
        assert_eq!(volume_of("v12"), Some(VolumeId(12)));
        for name in ["v12.tmp", "v012", "x1", "v", "v+1"] {
            assert_eq!(volume_of(name), None, "{name}");
        }
    }
}
