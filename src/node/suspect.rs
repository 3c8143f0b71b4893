//! Extent replicas that may have lost acknowledged writes in a crash,
//! remembered durably until an owner reconciles them.
//!
//! A replica acknowledges a write once it is in the extent file; its crc
//! and allocation live in the block table, which reaches the disk at the
//! next flush. After a crash (of the process: kill -9 is enough) the
//! store's recovery keeps only what the on-disk table covers, so the
//! writes since the last flush may be gone here while the other replicas,
//! and the owner, count them as applied. The evidence is the extent's
//! dirty regions at its first open. It must outlive this run: a clean
//! shutdown flushes and clears every dirty bit, and a replica that then
//! starts clean would otherwise look as good as the others and never be
//! reconciled (found by `soak::mixed_size_sub_block_writes_on_r3_*`: a
//! replica killed, restarted and stopped cleanly kept zeros where the
//! others had data, for good).
//!
//! Owns: the file `STATE/suspect-extents.json` and its rule. Every extent
//! that is dirty when a node starts after a crash is recorded here, with
//! its dirty regions, before the node serves anything. A recorded extent
//! answers no data request (the replica service refuses it) until a status
//! request, the first step of an owner's reconciliation, takes its record:
//! the status reports the recorded regions with the current dirty ones,
//! so the owner copies every region that may differ. A taken record stays
//! (durably marked taken before the status is answered) and is reported by
//! every later status, until a flush of the extent succeeds: an owner
//! flushes an extent only once it has reconciled it, so an owner that dies
//! between the status and its copies leaves the record for the next one,
//! even across a clean restart of this node (whose shutdown clears the
//! dirty bits the status also reports). A crash makes every taken record
//! refuse again. Must never: forget a record it could not write (the
//! request fails instead), or read a damaged file as "nothing suspect"
//! (every extent in the store becomes suspect with all its regions, and
//! the error is logged).

use crate::storage::{Store, write_atomically};
use crate::types::ExtentKey;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The file's name in the state directory.
pub const FILE: &str = "suspect-extents.json";

#[derive(Debug, Default, Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    extents: Vec<Record>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    key: ExtentKey,
    /// Every region (the record it replaced was unreadable).
    #[serde(default)]
    all: bool,
    /// Region indexes (the extent's own region size).
    regions: Vec<u32>,
    /// A reconciling owner has asked for it; data requests are served.
    #[serde(default)]
    taken: bool,
}

/// The suspect extents of one node (see the module docs). Clones share
/// one record.
#[derive(Debug, Clone)]
pub struct Suspects {
    /// `None`: in memory only (tests and the mem engine).
    path: Option<PathBuf>,
    map: Arc<Mutex<BTreeMap<ExtentKey, Suspicion>>>,
}

#[derive(Debug, Clone)]
struct Suspicion {
    regions: Regions,
    taken: bool,
}

#[derive(Debug, Clone)]
enum Regions {
    Some(BTreeSet<u32>),
    /// The record was unreadable: every region.
    All,
}

impl Suspects {
    /// None, and nothing kept on disk.
    pub fn in_memory() -> Suspects {
        Suspects { path: None, map: Arc::default() }
    }

    /// Loads `state_dir/suspect-extents.json` (none yet: nothing suspect).
    /// A file that does not parse makes every replica of `store` suspect in
    /// all its regions.
    pub fn open(state_dir: &Path, store: &Store) -> io::Result<Suspects> {
        let path = state_dir.join(FILE);
        let mut map = BTreeMap::new();
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<OnDisk>(&bytes) {
                Ok(d) if d.version == 1 => {
                    for r in d.extents {
                        let regions =
                            if r.all { Regions::All } else { Regions::Some(r.regions.into_iter().collect()) };
                        map.insert(r.key, Suspicion { regions, taken: r.taken });
                    }
                }
                other => {
                    let why = match other {
                        Ok(d) => format!("unknown version {}", d.version),
                        Err(e) => e.to_string(),
                    };
                    tracing::error!(path = %path.display(), error = %why,
                        "the record of extents awaiting reconciliation is unreadable: every replica here waits for its owner to reconcile it");
                    for key in store.extent_keys() {
                        map.insert(key, Suspicion { regions: Regions::All, taken: false });
                    }
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let s = Suspects { path: Some(path), map: Arc::default() };
        if map.values().any(|v| matches!(v.regions, Regions::All)) {
            s.persist(&map)?;
        }
        *s.map.lock().unwrap() = map;
        Ok(s)
    }

    /// After a crash, before serving: records every replica of `store`
    /// with dirty regions, durably, and makes every taken record refuse
    /// again (what reconciliation copied here may be lost with the rest).
    /// Returns how many are suspect now.
    pub fn record_crash(&self, store: &Store) -> io::Result<usize> {
        let mut map = self.map.lock().unwrap();
        let mut changed = false;
        for s in map.values_mut() {
            changed |= std::mem::replace(&mut s.taken, false);
        }
        for ext in store.opened() {
            let dirty: BTreeSet<u32> = ext.dirty_regions().into_iter().map(|r| r as u32).collect();
            if dirty.is_empty() {
                continue;
            }
            changed = true;
            let s = map
                .entry(ext.key())
                .or_insert_with(|| Suspicion { regions: Regions::Some(BTreeSet::new()), taken: false });
            if let Regions::Some(r) = &mut s.regions {
                r.extend(dirty);
            }
        }
        if changed {
            self.persist(&map)?;
        }
        Ok(map.len())
    }

    /// Runs `f` where its writes and fsyncs of the record cannot stall the
    /// runtime: on a blocking thread when the record is on disk. Dropping
    /// the future leaves `f` to finish there, so the record and the file
    /// never part.
    pub async fn off_runtime<T: Send + 'static>(&self, f: impl FnOnce(&Suspects) -> T + Send + 'static) -> T {
        if self.path.is_none() {
            return f(self);
        }
        let me = self.clone();
        match tokio::task::spawn_blocking(move || f(&me)).await {
            Ok(t) => t,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// True when `key` has a taken record, one a flush would remove.
    pub fn is_taken(&self, key: ExtentKey) -> bool {
        self.map.lock().unwrap().get(&key).is_some_and(|s| s.taken)
    }

    pub fn is_empty(&self) -> bool {
        self.map.lock().unwrap().is_empty()
    }

    /// True while `key` must refuse data requests: recorded, not taken.
    pub fn refuses(&self, key: ExtentKey) -> bool {
        self.map.lock().unwrap().get(&key).is_some_and(|s| !s.taken)
    }

    /// The extents of `volume` with a record, taken or not.
    pub fn of_volume(&self, volume: crate::types::VolumeId) -> Vec<crate::types::ExtentIndex> {
        self.map.lock().unwrap().keys().filter(|k| k.volume == volume).map(|k| k.index).collect()
    }

    /// True while `key` has a record, taken or not.
    pub fn contains(&self, key: ExtentKey) -> bool {
        self.map.lock().unwrap().contains_key(&key)
    }

    /// For a reconciling owner's status: adds the recorded regions of `key`
    /// to `dirty` (of an extent with `nregions` regions) and marks the
    /// record taken, durably; false if it has none. On a write error
    /// nothing changes and the caller must fail the request.
    pub fn take(&self, key: ExtentKey, nregions: u32, dirty: &mut Vec<u32>) -> io::Result<bool> {
        let mut map = self.map.lock().unwrap();
        let Some(s) = map.get_mut(&key) else { return Ok(false) };
        let regions = s.regions.clone();
        if !s.taken {
            s.taken = true;
            if let Err(e) = self.persist(&map) {
                map.get_mut(&key).expect("looked up above").taken = false;
                return Err(e);
            }
        }
        let mut merged: BTreeSet<u32> = dirty.iter().copied().collect();
        match regions {
            Regions::Some(r) => merged.extend(r.into_iter().filter(|&r| r < nregions)),
            Regions::All => merged.extend(0..nregions),
        }
        *dirty = merged.into_iter().collect();
        Ok(true)
    }

    /// The extent does not exist here: the owner copies it whole, so its
    /// record (if any) goes, durably.
    pub fn forget(&self, key: ExtentKey) -> io::Result<()> {
        let mut map = self.map.lock().unwrap();
        let Some(s) = map.remove(&key) else { return Ok(()) };
        if let Err(e) = self.persist(&map) {
            map.insert(key, s);
            return Err(e);
        }
        Ok(())
    }

    /// A flush of `key` succeeded: an owner had reconciled it, so a taken
    /// record goes. One that cannot be removed stays (the next owner copies
    /// those regions again, which costs time, not data); the error is logged.
    pub fn flushed(&self, key: ExtentKey) {
        let mut map = self.map.lock().unwrap();
        if !map.get(&key).is_some_and(|s| s.taken) {
            return;
        }
        let s = map.remove(&key).expect("looked up above");
        if let Err(e) = self.persist(&map) {
            tracing::warn!(%key, error = %e, "cannot remove a reconciled extent's record; it stays");
            map.insert(key, s);
        }
    }

    fn persist(&self, map: &BTreeMap<ExtentKey, Suspicion>) -> io::Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        if map.is_empty() {
            return match std::fs::remove_file(path) {
                Ok(()) => crate::storage::identity::sync_parent(path),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            };
        }
        let d = OnDisk {
            version: 1,
            extents: map
                .iter()
                .map(|(k, s)| match &s.regions {
                    Regions::Some(r) => {
                        Record { key: *k, all: false, regions: r.iter().copied().collect(), taken: s.taken }
                    }
                    Regions::All => Record { key: *k, all: true, regions: Vec::new(), taken: s.taken },
                })
                .collect(),
        };
        write_atomically(path, &serde_json::to_vec(&d).map_err(io::Error::other)?)
    }
}
