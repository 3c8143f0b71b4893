//! The durable side of Raft: hard state, log entries and snapshots.
//!
//! Owns the bytes Raft must not lose: a store answers raft-rs's
//! [`raft::Storage`] reads and takes the Ready cycle's writes through
//! [`LogStore`]. [`RedbStore`] keeps them in a redb database (one file) and
//! returns from every write only after it is on stable storage (redb's
//! immediate durability: fsync at commit), so the caller may send the
//! messages that depend on it. [`MemStore`] is the same thing in memory, for
//! the deterministic simulator.
//!
//! What is kept: the hard state; the newest snapshot (metadata with its conf
//! state, and the state machine's bytes); the log from the truncation point
//! on. The conf state is the snapshot's: conf changes in the log after it are
//! applied again on restart, in order, as the entries replay. Every node
//! with a store has a snapshot, from index 1 on: the initial members write the
//! same bootstrap snapshot, and a joining node starts empty until its
//! leader's snapshot arrives.
//!
//! Never: interprets entries (that is `state`'s), or sends anything.

// raft's protobuf messages are built field by field, as raft-rs does;
// redb's error type is large, and is boxed where it leaves this module.
#![allow(clippy::field_reassign_with_default, clippy::result_large_err)]

use raft::eraftpb::{Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use redb::{Database, TableDefinition};
use std::path::{Path, PathBuf};

const LOG: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("raft_meta");
const K_HARD_STATE: &str = "hard_state";
const K_SNAP_META: &str = "snapshot_meta";
const K_SNAP_DATA: &str = "snapshot_data";
/// (index, term) of the last entry dropped from the log.
const K_TRUNCATED: &str = "truncated";
const K_INCARNATION: &str = "incarnation";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("metadata store {path}: {op}")]
    Db {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("metadata store record {0} is corrupt")]
    Corrupt(&'static str),
    #[error("the metadata store is already initialized: this node is part of a cluster")]
    AlreadyInitialized,
    #[error("append at {first} would leave a gap or rewrite compacted entries (log {low}..={last})")]
    BadAppend { first: u64, low: u64, last: u64 },
    #[error("snapshot at {index} is older than the log start {first}")]
    SnapshotTooOld { index: u64, first: u64 },
    #[error("compaction to {to} is beyond the snapshot at {snapshot}")]
    BadCompaction { to: u64, snapshot: u64 },
    #[error("protobuf encoding")]
    Encode(#[source] protobuf::ProtobufError),
}

/// The Ready cycle's writes. Every method is durable when it returns Ok.
pub trait LogStore: Storage {
    /// Appends `entries` (dropping any entries from `entries[0].index` on
    /// first: a new leader's log wins) and saves `hs`, in one atomic write.
    fn append(&mut self, entries: &[Entry], hs: Option<&HardState>) -> Result<(), StoreError>;
    /// Notes a new commit index. It need not be durable (a lower commit
    /// after a crash is safe); it is written with the next write.
    fn set_commit(&mut self, commit: u64);
    /// Installs a snapshot from the leader: replaces the log and the snapshot.
    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<(), StoreError>;
    /// Saves a snapshot of the local state machine and drops the log
    /// entries below `compact_to` (at most `meta.index + 1`).
    fn save_snapshot(
        &mut self,
        meta: SnapshotMetadata,
        data: Vec<u8>,
        compact_to: u64,
    ) -> Result<(), StoreError>;
    /// The newest snapshot (the state machine restarts from it).
    fn latest_snapshot(&self) -> &Snapshot;
    /// Whether the store belongs to a cluster (holds a snapshot).
    fn is_initialized(&self) -> bool {
        self.latest_snapshot().get_metadata().index > 0
    }
    /// Writes the bootstrap snapshot of an initial member: index 1, term 1,
    /// `voters`, and `data` (the empty state machine). Refused on a store
    /// that is already initialized.
    fn bootstrap(&mut self, voters: &[u64], data: Vec<u8>) -> Result<(), StoreError> {
        if self.is_initialized() {
            return Err(StoreError::AlreadyInitialized);
        }
        let mut snap = Snapshot::default();
        let meta = snap.mut_metadata();
        meta.index = 1;
        meta.term = 1;
        meta.mut_conf_state().voters = voters.to_vec();
        snap.data = data.into();
        self.install_snapshot(&snap)
    }
    /// A number that grows every time the store is opened (request ids use
    /// it so that a restarted node never reuses one).
    fn incarnation(&self) -> u64;
    /// First and last index of the log held (last < first when empty).
    fn log_bounds(&self) -> (u64, u64);
}

/// The in-memory image both stores serve reads from.
#[derive(Debug, Default, Clone)]
struct Image {
    hs: HardState,
    snap: Snapshot,
    truncated: (u64, u64),
    /// entries[i].index == truncated.0 + 1 + i
    entries: Vec<Entry>,
}

impl Image {
    fn first_index(&self) -> u64 {
        self.truncated.0 + 1
    }
    fn last_index(&self) -> u64 {
        self.truncated.0 + self.entries.len() as u64
    }

    fn check_append(&self, entries: &[Entry]) -> Result<(), StoreError> {
        let Some(first) = entries.first() else { return Ok(()) };
        if first.index < self.first_index() || first.index > self.last_index() + 1 {
            return Err(StoreError::BadAppend {
                first: first.index,
                low: self.first_index(),
                last: self.last_index(),
            });
        }
        Ok(())
    }

    fn append(&mut self, entries: &[Entry], hs: Option<&HardState>) {
        if let Some(first) = entries.first() {
            let keep = (first.index - self.first_index()) as usize;
            self.entries.truncate(keep);
            self.entries.extend_from_slice(entries);
        }
        if let Some(hs) = hs {
            let commit = self.hs.commit.max(hs.commit);
            self.hs = hs.clone();
            self.hs.commit = commit;
        }
    }

    fn install(&mut self, snap: &Snapshot) {
        let m = snap.get_metadata();
        self.snap = snap.clone();
        self.truncated = (m.index, m.term);
        self.entries.clear();
        self.hs.term = self.hs.term.max(m.term);
        self.hs.commit = self.hs.commit.max(m.index);
    }

    fn check_save(&self, meta: &SnapshotMetadata, compact_to: u64) -> Result<(), StoreError> {
        if meta.index < self.snap.get_metadata().index || meta.index > self.last_index() {
            return Err(StoreError::SnapshotTooOld { index: meta.index, first: self.first_index() });
        }
        if compact_to > meta.index + 1 {
            return Err(StoreError::BadCompaction { to: compact_to, snapshot: meta.index });
        }
        Ok(())
    }

    /// Saves the snapshot; returns the new truncation point.
    fn save(&mut self, meta: SnapshotMetadata, data: Vec<u8>, compact_to: u64) -> (u64, u64) {
        let mut snap = Snapshot::default();
        self.hs.commit = self.hs.commit.max(meta.index);
        snap.set_metadata(meta);
        snap.data = data.into();
        self.snap = snap;
        if compact_to > self.first_index() {
            let term = self.term_of(compact_to - 1).unwrap_or(self.truncated.1);
            let drop = (compact_to - self.first_index()) as usize;
            self.entries.drain(..drop);
            self.truncated = (compact_to - 1, term);
        }
        self.truncated
    }

    fn term_of(&self, idx: u64) -> Option<u64> {
        if idx == self.truncated.0 {
            return Some(self.truncated.1);
        }
        if idx < self.first_index() || idx > self.last_index() {
            return None;
        }
        Some(self.entries[(idx - self.first_index()) as usize].term)
    }

    fn raft_state(&self) -> RaftState {
        let mut hs = self.hs.clone();
        hs.commit = hs.commit.max(self.snap.get_metadata().index);
        RaftState::new(hs, self.snap.get_metadata().get_conf_state().clone())
    }

    fn entries(&self, low: u64, high: u64, max_size: Option<u64>) -> raft::Result<Vec<Entry>> {
        if low < self.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let lo = (low - self.first_index()) as usize;
        let hi = (high - self.first_index()) as usize;
        let mut out = self.entries[lo..hi].to_vec();
        raft::util::limit_size(&mut out, max_size);
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        match self.term_of(idx) {
            Some(t) => Ok(t),
            None if idx < self.first_index() => Err(raft::Error::Store(StorageError::Compacted)),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn snapshot(&self, request_index: u64) -> raft::Result<Snapshot> {
        if self.snap.get_metadata().index < request_index {
            // The node makes a newer one at its next compaction.
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(self.snap.clone())
    }
}

macro_rules! storage_via_image {
    ($t:ty) => {
        impl Storage for $t {
            fn initial_state(&self) -> raft::Result<RaftState> {
                Ok(self.image.raft_state())
            }
            fn entries(
                &self,
                low: u64,
                high: u64,
                max_size: impl Into<Option<u64>>,
                _context: GetEntriesContext,
            ) -> raft::Result<Vec<Entry>> {
                self.image.entries(low, high, max_size.into())
            }
            fn term(&self, idx: u64) -> raft::Result<u64> {
                self.image.term(idx)
            }
            fn first_index(&self) -> raft::Result<u64> {
                Ok(self.image.first_index())
            }
            fn last_index(&self) -> raft::Result<u64> {
                Ok(self.image.last_index())
            }
            fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
                self.image.snapshot(request_index)
            }
        }
    };
}

/// The Raft store in memory: for the simulator and tests. "Durable" means
/// it survives a simulated crash, which drops everything but the store.
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    image: Image,
    incarnation: u64,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }
    /// What a restart sees: the same store, opened once more.
    pub fn reopen(&mut self) {
        self.incarnation += 1;
    }
    pub fn hard_state(&self) -> &HardState {
        &self.image.hs
    }
}

storage_via_image!(MemStore);

impl LogStore for MemStore {
    fn append(&mut self, entries: &[Entry], hs: Option<&HardState>) -> Result<(), StoreError> {
        self.image.check_append(entries)?;
        self.image.append(entries, hs);
        Ok(())
    }
    fn set_commit(&mut self, commit: u64) {
        self.image.hs.commit = self.image.hs.commit.max(commit);
    }
    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<(), StoreError> {
        self.image.install(snap);
        Ok(())
    }
    fn save_snapshot(
        &mut self,
        meta: SnapshotMetadata,
        data: Vec<u8>,
        compact_to: u64,
    ) -> Result<(), StoreError> {
        self.image.check_save(&meta, compact_to)?;
        self.image.save(meta, data, compact_to);
        Ok(())
    }
    fn latest_snapshot(&self) -> &Snapshot {
        &self.image.snap
    }
    fn incarnation(&self) -> u64 {
        self.incarnation
    }
    fn log_bounds(&self) -> (u64, u64) {
        (self.image.first_index(), self.image.last_index())
    }
}

/// The Raft store in a redb database file.
///
/// Reads come from an in-memory image of the log (bounded by compaction:
/// a few thousand small entries); writes go to redb first and to the image
/// after the commit succeeded, so the image never shows what is not durable.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
    image: Image,
    incarnation: u64,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .field("log", &(self.image.first_index(), self.image.last_index()))
            .field("hard_state", &self.image.hs)
            .finish()
    }
}

storage_via_image!(RedbStore);

fn decode<M: protobuf::Message>(bytes: &[u8], what: &'static str) -> Result<M, StoreError> {
    M::parse_from_bytes(bytes).map_err(|_| StoreError::Corrupt(what))
}

fn encode<M: protobuf::Message>(m: &M) -> Result<Vec<u8>, StoreError> {
    m.write_to_bytes().map_err(StoreError::Encode)
}

fn encode_pair(p: (u64, u64)) -> [u8; 16] {
    let mut b = [0; 16];
    b[..8].copy_from_slice(&p.0.to_le_bytes());
    b[8..].copy_from_slice(&p.1.to_le_bytes());
    b
}

fn decode_pair(b: &[u8]) -> Result<(u64, u64), StoreError> {
    let b: [u8; 16] = b.try_into().map_err(|_| StoreError::Corrupt(K_TRUNCATED))?;
    Ok((u64::from_le_bytes(b[..8].try_into().unwrap()), u64::from_le_bytes(b[8..].try_into().unwrap())))
}

impl RedbStore {
    /// Opens (or creates) the store at `path` and bumps its incarnation.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let path = path.to_path_buf();
        let db = Database::create(&path).map_err(|e| StoreError::Db {
            path: path.clone(),
            op: "open",
            source: Box::new(e.into()),
        })?;
        let mut s = RedbStore { db, path, image: Image::default(), incarnation: 0 };
        s.load()?;
        let inc = s.incarnation + 1;
        s.write("bump incarnation", |_, meta| {
            meta.insert(K_INCARNATION, inc.to_le_bytes().as_slice())?;
            Ok(())
        })?;
        s.incarnation = inc;
        Ok(s)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn hard_state(&self) -> &HardState {
        &self.image.hs
    }

    fn db_err(&self, op: &'static str) -> impl Fn(redb::Error) -> StoreError + use<> {
        let path = self.path.clone();
        move |source| StoreError::Db { path: path.clone(), op, source: Box::new(source) }
    }

    fn load(&mut self) -> Result<(), StoreError> {
        let err = self.db_err("load");
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let meta = match txn.open_table(META) {
            Ok(t) => t,
            // A new file: nothing written yet.
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(err(e.into())),
        };
        let get = |k: &str| -> Result<Option<Vec<u8>>, StoreError> {
            Ok(meta.get(k).map_err(|e| err(e.into()))?.map(|v| v.value().to_vec()))
        };
        let mut image = Image::default();
        if let Some(b) = get(K_HARD_STATE)? {
            image.hs = decode(&b, K_HARD_STATE)?;
        }
        if let Some(b) = get(K_SNAP_META)? {
            image.snap.set_metadata(decode(&b, K_SNAP_META)?);
        }
        if let Some(b) = get(K_SNAP_DATA)? {
            image.snap.data = b.into();
        }
        if let Some(b) = get(K_TRUNCATED)? {
            image.truncated = decode_pair(&b)?;
        }
        if let Some(b) = get(K_INCARNATION)? {
            let b: [u8; 8] = b.as_slice().try_into().map_err(|_| StoreError::Corrupt(K_INCARNATION))?;
            self.incarnation = u64::from_le_bytes(b);
        }
        let log = txn.open_table(LOG).map_err(|e| err(e.into()))?;
        let first = image.truncated.0 + 1;
        for (next, row) in (first..).zip(log.range(first..).map_err(|e| err(e.into()))?) {
            let (k, v) = row.map_err(|e| err(e.into()))?;
            let e: Entry = decode(v.value(), "log entry")?;
            // The log is contiguous from the truncation point on.
            if k.value() != next || e.index != next {
                return Err(StoreError::Corrupt("log entry"));
            }
            image.entries.push(e);
        }
        self.image = image;
        Ok(())
    }

    /// One durable redb write transaction.
    fn write(
        &self,
        op: &'static str,
        f: impl FnOnce(
            &mut redb::Table<'_, u64, &[u8]>,
            &mut redb::Table<'_, &str, &[u8]>,
        ) -> Result<(), redb::Error>,
    ) -> Result<(), StoreError> {
        let err = self.db_err(op);
        let mut txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        txn.set_durability(redb::Durability::Immediate);
        {
            let mut log = txn.open_table(LOG).map_err(|e| err(e.into()))?;
            let mut meta = txn.open_table(META).map_err(|e| err(e.into()))?;
            f(&mut log, &mut meta).map_err(&err)?;
        }
        txn.commit().map_err(|e| err(e.into()))
    }
}

impl LogStore for RedbStore {
    fn append(&mut self, entries: &[Entry], hs: Option<&HardState>) -> Result<(), StoreError> {
        self.image.check_append(entries)?;
        if entries.is_empty() && hs.is_none() {
            return Ok(());
        }
        let mut next = self.image.clone_header();
        next.append(entries, hs);
        let hs_bytes = encode(&next.hs)?;
        let mut rows = Vec::with_capacity(entries.len());
        for e in entries {
            rows.push((e.index, encode(e)?));
        }
        let first = entries.first().map(|e| e.index);
        let old_last = self.image.last_index();
        self.write("append", |log, meta| {
            if let Some(first) = first
                && first <= old_last
            {
                log.retain_in(first.., |_, _| false)?;
            }
            for (i, b) in &rows {
                log.insert(*i, b.as_slice())?;
            }
            meta.insert(K_HARD_STATE, hs_bytes.as_slice())?;
            Ok(())
        })?;
        self.image.append(entries, hs);
        Ok(())
    }

    fn set_commit(&mut self, commit: u64) {
        self.image.hs.commit = self.image.hs.commit.max(commit);
    }

    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<(), StoreError> {
        let mut next = self.image.clone_header();
        next.install(snap);
        let hs = encode(&next.hs)?;
        let meta_b = encode(snap.get_metadata())?;
        let data = snap.data.to_vec();
        let truncated = encode_pair(next.truncated);
        self.write("install snapshot", |log, meta| {
            log.retain(|_, _| false)?;
            meta.insert(K_HARD_STATE, hs.as_slice())?;
            meta.insert(K_SNAP_META, meta_b.as_slice())?;
            meta.insert(K_SNAP_DATA, data.as_slice())?;
            meta.insert(K_TRUNCATED, truncated.as_slice())?;
            Ok(())
        })?;
        self.image.install(snap);
        Ok(())
    }

    fn save_snapshot(
        &mut self,
        meta: SnapshotMetadata,
        data: Vec<u8>,
        compact_to: u64,
    ) -> Result<(), StoreError> {
        self.image.check_save(&meta, compact_to)?;
        let mut next = self.image.clone();
        let truncated = next.save(meta.clone(), data.clone(), compact_to);
        let hs = encode(&next.hs)?;
        let meta_b = encode(&meta)?;
        let truncated_b = encode_pair(truncated);
        self.write("save snapshot", |log, m| {
            log.retain_in(..=truncated.0, |_, _| false)?;
            m.insert(K_HARD_STATE, hs.as_slice())?;
            m.insert(K_SNAP_META, meta_b.as_slice())?;
            m.insert(K_SNAP_DATA, data.as_slice())?;
            m.insert(K_TRUNCATED, truncated_b.as_slice())?;
            Ok(())
        })?;
        self.image = next;
        Ok(())
    }

    fn latest_snapshot(&self) -> &Snapshot {
        &self.image.snap
    }
    fn incarnation(&self) -> u64 {
        self.incarnation
    }
    fn log_bounds(&self) -> (u64, u64) {
        (self.image.first_index(), self.image.last_index())
    }
}

impl Image {
    /// A copy without the log, for computing the next header (hard state,
    /// truncation) before the write that makes it durable.
    fn clone_header(&self) -> Image {
        Image {
            hs: self.hs.clone(),
            snap: Snapshot::default(),
            truncated: self.truncated,
            entries: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e.data = data.to_vec().into();
        e
    }

    fn hs(term: u64, vote: u64, commit: u64) -> HardState {
        let mut h = HardState::default();
        h.term = term;
        h.vote = vote;
        h.commit = commit;
        h
    }

    fn ctx() -> GetEntriesContext {
        GetEntriesContext::empty(false)
    }

    fn datas(s: &impl Storage, low: u64, high: u64) -> Vec<(u64, u64, Vec<u8>)> {
        s.entries(low, high, None, ctx())
            .unwrap()
            .into_iter()
            .map(|e| (e.index, e.term, e.data.to_vec()))
            .collect()
    }

    fn booted(dir: &Path) -> RedbStore {
        let mut s = RedbStore::open(&dir.join("raft.redb")).unwrap();
        s.bootstrap(&[1, 2, 3], b"empty".to_vec()).unwrap();
        s
    }

    #[test]
    fn restart_keeps_hard_state_and_log() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = booted(dir.path());
            s.append(&[entry(2, 2, b"a"), entry(3, 2, b"b"), entry(4, 3, b"c")], Some(&hs(3, 2, 3))).unwrap();
        }
        let s = RedbStore::open(&dir.path().join("raft.redb")).unwrap();
        let st = s.initial_state().unwrap();
        assert_eq!((st.hard_state.term, st.hard_state.vote, st.hard_state.commit), (3, 2, 3));
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (2, 4));
        assert_eq!(
            datas(&s, 2, 5),
            vec![(2, 2, b"a".to_vec()), (3, 2, b"b".to_vec()), (4, 3, b"c".to_vec())]
        );
        assert_eq!(s.term(1).unwrap(), 1);
        assert_eq!(s.term(4).unwrap(), 3);
        assert_eq!(s.term(0), Err(raft::Error::Store(StorageError::Compacted)));
        assert_eq!(s.term(5), Err(raft::Error::Store(StorageError::Unavailable)));
        assert_eq!(&s.latest_snapshot().data[..], b"empty");
    }

    #[test]
    fn commit_only_update_is_written_with_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = booted(dir.path());
            s.append(&[entry(2, 2, b"a")], Some(&hs(2, 1, 1))).unwrap();
            s.set_commit(2);
            assert_eq!(s.initial_state().unwrap().hard_state.commit, 2);
            s.append(&[entry(3, 2, b"b")], None).unwrap();
        }
        let s = RedbStore::open(&dir.path().join("raft.redb")).unwrap();
        assert_eq!(s.initial_state().unwrap().hard_state.commit, 2);
    }

    #[test]
    fn conflicting_append_replaces_the_suffix() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = booted(dir.path());
            s.append(&[entry(2, 2, b"a"), entry(3, 2, b"b"), entry(4, 2, b"c")], None).unwrap();
            s.append(&[entry(3, 4, b"B")], Some(&hs(4, 0, 2))).unwrap();
            assert_eq!(s.last_index().unwrap(), 3);
        }
        let s = RedbStore::open(&dir.path().join("raft.redb")).unwrap();
        assert_eq!(datas(&s, 2, 4), vec![(2, 2, b"a".to_vec()), (3, 4, b"B".to_vec())]);
    }

    #[test]
    fn appends_that_leave_gaps_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = booted(dir.path());
        assert!(matches!(
            s.append(&[entry(3, 2, b"x")], None),
            Err(StoreError::BadAppend { first: 3, low: 2, last: 1 })
        ));
        // Index 1 is inside the bootstrap snapshot.
        assert!(matches!(s.append(&[entry(1, 2, b"x")], None), Err(StoreError::BadAppend { first: 1, .. })));
        assert_eq!(s.last_index().unwrap(), 1);
    }

    #[test]
    fn compaction_by_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        {
            let mut s = booted(dir.path());
            let ents: Vec<_> = (2..=10).map(|i| entry(i, 2, &[i as u8])).collect();
            s.append(&ents, Some(&hs(2, 1, 8))).unwrap();
            let mut meta = SnapshotMetadata::default();
            meta.index = 8;
            meta.term = 2;
            meta.mut_conf_state().voters = vec![1, 2, 3, 4];
            // Keep two entries before the snapshot for followers just behind.
            s.save_snapshot(meta, b"state@8".to_vec(), 7).unwrap();
            assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (7, 10));
            assert_eq!(s.entries(6, 8, None, ctx()), Err(raft::Error::Store(StorageError::Compacted)));
        }
        let s = RedbStore::open(&path).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (7, 10));
        assert_eq!(s.term(6).unwrap(), 2);
        assert_eq!(datas(&s, 7, 11).len(), 4);
        let snap = s.snapshot(0, 2).unwrap();
        assert_eq!((snap.get_metadata().index, &snap.data[..]), (8, &b"state@8"[..]));
        assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1, 2, 3, 4]);
        assert_eq!(s.snapshot(9, 2), Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable)));
    }

    #[test]
    fn bad_snapshots_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = booted(dir.path());
        s.append(&[entry(2, 2, b"a")], None).unwrap();
        let mut meta = SnapshotMetadata::default();
        meta.index = 5;
        assert!(matches!(
            s.save_snapshot(meta.clone(), vec![], 3),
            Err(StoreError::SnapshotTooOld { index: 5, .. })
        ));
        meta.index = 2;
        assert!(matches!(
            s.save_snapshot(meta, vec![], 4),
            Err(StoreError::BadCompaction { to: 4, snapshot: 2 })
        ));
    }

    #[test]
    fn snapshot_install_replaces_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        {
            // A joining node: empty, then the leader's snapshot.
            let mut s = RedbStore::open(&path).unwrap();
            assert!(!s.is_initialized());
            let mut snap = Snapshot::default();
            snap.mut_metadata().index = 20;
            snap.mut_metadata().term = 4;
            snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
            snap.mut_metadata().mut_conf_state().learners = vec![4];
            snap.data = b"state@20".to_vec().into();
            s.install_snapshot(&snap).unwrap();
            s.append(&[entry(21, 4, b"x")], Some(&hs(4, 0, 21))).unwrap();
        }
        let s = RedbStore::open(&path).unwrap();
        assert!(s.is_initialized());
        let st = s.initial_state().unwrap();
        assert_eq!((st.hard_state.term, st.hard_state.commit), (4, 21));
        assert_eq!(st.conf_state.learners, vec![4]);
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (21, 21));
        assert_eq!(s.term(20).unwrap(), 4);
        assert_eq!(&s.latest_snapshot().data[..], b"state@20");
    }

    #[test]
    fn second_bootstrap_refused_and_incarnation_grows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        let first = booted(dir.path()).incarnation();
        let mut s = RedbStore::open(&path).unwrap();
        assert!(s.incarnation() > first);
        assert!(matches!(s.bootstrap(&[1], vec![]), Err(StoreError::AlreadyInitialized)));
        assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
    }

    #[test]
    fn mem_store_behaves_the_same() {
        let mut s = MemStore::new();
        s.bootstrap(&[1], vec![]).unwrap();
        s.append(&[entry(2, 2, b"a"), entry(3, 2, b"b")], Some(&hs(2, 1, 3))).unwrap();
        let mut meta = SnapshotMetadata::default();
        meta.index = 3;
        meta.term = 2;
        s.save_snapshot(meta, vec![], 4).unwrap();
        assert_eq!(s.log_bounds(), (4, 3));
        assert_eq!(s.term(3).unwrap(), 2);
        assert!(matches!(s.bootstrap(&[1], vec![]), Err(StoreError::AlreadyInitialized)));
    }
}
