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
//! request, the first step of an owner's reconciliation, releases it: the
//! status reports the recorded regions with the current dirty ones, so the
//! owner copies every region that may differ, and from then on (in this
//! run) the replica serves. The record itself goes (durably) only at the
//! first flush of the extent after that: the owner flushes a replica when
//! it has copied everything to it (and the source when it has copied to
//! every other), and flushes nothing of the extent before. Until then a
//! crash, or a clean restart, must find the record: the copy may have
//! stopped half way, and a clean shutdown clears the dirty bits that were
//! the only other trace of where the replicas differ (found by
//! `replicated_crash_loop::kill9_of_every_node_while_the_owner_reconciles_*`:
//! with the record gone at the status, a kill during the copy after a clean
//! restart left a block different on one replica for good). Must never:
//! forget a record it could not write (the request fails instead, or the
//! record stays), or read a damaged file as "nothing suspect" (every
//! extent in the store becomes suspect with all its regions, and the
//! error is logged).

use crate::storage::{Store, write_atomically};
use crate::types::ExtentKey;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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
}

/// The suspect extents of one node (see the module docs).
#[derive(Debug)]
pub struct Suspects {
    /// `None`: in memory only (tests and the mem engine).
    path: Option<PathBuf>,
    map: Mutex<BTreeMap<ExtentKey, Suspicion>>,
    /// Recorded extents a status released in this run (they serve; their
    /// record stays until their next flush).
    released: Mutex<BTreeSet<ExtentKey>>,
}

#[derive(Debug, Clone)]
enum Suspicion {
    Regions(BTreeSet<u32>),
    /// The record was unreadable: every region.
    All,
}

impl Suspects {
    /// None, and nothing kept on disk.
    pub fn in_memory() -> Suspects {
        Suspects { path: None, map: Mutex::default(), released: Mutex::default() }
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
                        let s = if r.all {
                            Suspicion::All
                        } else {
                            Suspicion::Regions(r.regions.into_iter().collect())
                        };
                        map.insert(r.key, s);
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
                        map.insert(key, Suspicion::All);
                    }
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let s = Suspects { path: Some(path), map: Mutex::default(), released: Mutex::default() };
        if map.values().any(|v| matches!(v, Suspicion::All)) {
            s.persist(&map)?;
        }
        *s.map.lock().unwrap() = map;
        Ok(s)
    }

    /// After a crash, before serving: records every replica of `store`
    /// with dirty regions, durably. Returns how many are suspect now.
    pub fn record_crash(&self, store: &Store) -> io::Result<usize> {
        let mut map = self.map.lock().unwrap();
        let mut added = 0;
        for ext in store.opened() {
            let dirty: BTreeSet<u32> = ext.dirty_regions().into_iter().map(|r| r as u32).collect();
            if dirty.is_empty() {
                continue;
            }
            added += 1;
            match map.entry(ext.key()).or_insert_with(|| Suspicion::Regions(BTreeSet::new())) {
                Suspicion::Regions(r) => r.extend(dirty),
                Suspicion::All => {}
            }
        }
        if added > 0 {
            self.persist(&map)?;
        }
        Ok(map.len())
    }

    pub fn is_empty(&self) -> bool {
        self.map.lock().unwrap().is_empty()
    }

    /// Whether data requests for `key` are refused: it is recorded and no
    /// status released it in this run.
    pub fn refuses(&self, key: ExtentKey) -> bool {
        self.map.lock().unwrap().contains_key(&key) && !self.released.lock().unwrap().contains(&key)
    }

    /// Whether `key` is recorded (released or not).
    pub fn contains(&self, key: ExtentKey) -> bool {
        self.map.lock().unwrap().contains_key(&key)
    }

    /// A reconciling owner's status: adds the recorded regions of `key`
    /// to `dirty` (of an extent with `nregions` regions) and lets the
    /// replica serve from now on; the record stays until
    /// [`Suspects::settle`]. False if it was not suspect.
    pub fn release(&self, key: ExtentKey, nregions: u32, dirty: &mut Vec<u32>) -> bool {
        let map = self.map.lock().unwrap();
        let Some(s) = map.get(&key) else { return false };
        let mut merged: BTreeSet<u32> = dirty.iter().copied().collect();
        match s {
            Suspicion::Regions(r) => merged.extend(r.iter().copied().filter(|&r| r < nregions)),
            Suspicion::All => merged.extend(0..nregions),
        }
        *dirty = merged.into_iter().collect();
        self.released.lock().unwrap().insert(key);
        true
    }

    /// After a flush of `key` succeeded: a released record has served its
    /// reconciliation (the owner flushes a replica only once it copied
    /// everything to it) and goes, durably; true if it went. On a write
    /// error the record stays (the next reconciliation copies its regions
    /// once more).
    pub fn settle(&self, key: ExtentKey) -> io::Result<bool> {
        if !self.released.lock().unwrap().contains(&key) {
            return Ok(false);
        }
        let mut map = self.map.lock().unwrap();
        let Some(s) = map.remove(&key) else { return Ok(false) };
        if let Err(e) = self.persist(&map) {
            map.insert(key, s);
            return Err(e);
        }
        self.released.lock().unwrap().remove(&key);
        Ok(true)
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
                .map(|(k, s)| match s {
                    Suspicion::Regions(r) => {
                        Record { key: *k, all: false, regions: r.iter().copied().collect() }
                    }
                    Suspicion::All => Record { key: *k, all: true, regions: Vec::new() },
                })
                .collect(),
        };
        write_atomically(path, &serde_json::to_vec(&d).map_err(io::Error::other)?)
    }
}
