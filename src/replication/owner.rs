//! [`Owner`]: one volume's replication state at its owner, for one owner
//! generation. See the module doc of `replication` for the rules it keeps.
//!
//! The shell gives every range request an [`OpId`] (increasing: arrival
//! order is id order), tells the core each extent's committed replica set
//! ([`Event::View`]) before its first request, and reports every replica's
//! answer. The core answers with [`Action`]s: send this change to that
//! replica, grant this exclusive hold, propose this smaller replica set,
//! complete this request.
//!
//! Lifecycle of a change: *waiting* (an earlier overlapping request of the
//! extent is unfinished) → *sent* (to every member of the set that has not
//! failed) → finished when each member answered and no failed member is
//! still in the committed set. A failing member is removed by one proposal
//! per extent at a time; requests it missed wait for that commit. A set that
//! would become empty is not proposed: the extent is then lost to this
//! owner (the next owner reconciles its replicas).

use crate::types::{Epoch, ExtentIndex, Generation, NodeId};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A request's id, given by the shell; increasing in arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId(pub u64);

/// A change of an extent's data, sent to its replicas as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Write { fua: bool },
    WriteZeroes { deallocate: bool, fua: bool },
    Trim { fua: bool },
}

/// Why a replica did not apply a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Its disk failed (or stored data failed its checksum).
    Io,
    /// No answer within the shell's timeout.
    Timeout,
    /// No connection to it.
    Unreachable,
    /// It has seen a newer owner generation: this owner is fenced.
    StaleGeneration(Generation),
    /// Its replica-set epoch is newer than this owner's view.
    StaleEpoch(Epoch),
}

/// Why a request failed (the shell maps each to EIO or its sense).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error("this owner was fenced: a replica has seen owner generation {0}")]
    Fenced(Generation),
    #[error("extent {extent} has {have} replicas, fewer than min_replicas {min}")]
    BelowMinReplicas { extent: ExtentIndex, have: usize, min: usize },
    #[error("the metadata did not commit a new replica set for extent {0}")]
    Metadata(ExtentIndex),
    #[error("no replica of extent {0} is left to this owner")]
    NoReplica(ExtentIndex),
}

/// What the shell does with a granted exclusive hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Nothing to write (a miscompare): release the range.
    Release,
    /// Send this change over the held range, to every member or `only` to
    /// one (a read repair rewrites just the bad copy).
    Change { change: Change, only: Option<NodeId> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The extent's committed replica set (from the metadata). Installs the
    /// extent, or moves it to a newer epoch; an older epoch is ignored.
    View { extent: ExtentIndex, epoch: Epoch, replicas: Vec<NodeId> },
    /// A change of `[offset, offset + len)` inside the extent.
    Submit { op: OpId, extent: ExtentIndex, offset: u64, len: u64, change: Change },
    /// The range to itself (nothing overlapping runs until [`Event::Held`]):
    /// for read-compare-write and read repair.
    SubmitExclusive { op: OpId, extent: ExtentIndex, offset: u64, len: u64 },
    /// What became of a granted hold.
    Held { op: OpId, then: Then },
    /// A FLUSH of the whole volume.
    Flush { op: OpId },
    /// A replica's answer to a sent change.
    Reply { op: OpId, node: NodeId, result: Result<(), Failure> },
    /// A replica's answer to a flush of one extent in `round`.
    FlushReply { round: u64, extent: ExtentIndex, node: NodeId, result: Result<(), Failure> },
    /// A proposed replica set committed.
    Committed { extent: ExtentIndex, epoch: Epoch, replicas: Vec<NodeId> },
    /// A proposed replica set could not be committed.
    CommitFailed { extent: ExtentIndex, epoch: Epoch },
    /// The installed extent's members may hold changes no flush covered
    /// that this owner did not make (a predecessor's, found at takeover):
    /// the next FLUSH round flushes it on every member, as if this owner
    /// had just acknowledged a change there.
    Unflushed { extent: ExtentIndex },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `op`'s change of `[offset, offset + len)` to `node`.
    Send { op: OpId, extent: ExtentIndex, epoch: Epoch, node: NodeId, offset: u64, len: u64, change: Change },
    /// The range of `op` is held: read what it needs from `replicas`, then
    /// answer with [`Event::Held`].
    Grant { op: OpId, extent: ExtentIndex, epoch: Epoch, replicas: Vec<NodeId> },
    /// Make everything `node` acknowledged for the extent durable.
    SendFlush { round: u64, extent: ExtentIndex, epoch: Epoch, node: NodeId },
    /// Commit this replica set for the extent (epoch + 1, failed members out).
    Propose { extent: ExtentIndex, epoch: Epoch, replicas: Vec<NodeId> },
    /// The request is finished (for a released hold, `Ok`).
    Complete { op: OpId, result: Result<(), OpError> },
    /// Once: a replica has seen a newer generation; stop owning the volume.
    Fenced { generation: Generation },
}

#[derive(Debug)]
enum State {
    Waiting(Pending),
    Held,
    Sent { sent: BTreeSet<NodeId>, ok: BTreeSet<NodeId> },
}

#[derive(Debug, Clone, Copy)]
enum Pending {
    Change(Change),
    Exclusive,
}

#[derive(Debug)]
struct RangeOp {
    op: OpId,
    offset: u64,
    end: u64,
    change: Option<Change>,
    only: Option<NodeId>,
    state: State,
}

impl RangeOp {
    fn overlaps(&self, offset: u64, end: u64) -> bool {
        self.offset < end && offset < self.end
    }
}

#[derive(Debug)]
struct Ext {
    epoch: Epoch,
    set: Vec<NodeId>,
    /// Members that failed a request; they leave the set by the next commit.
    failed: BTreeSet<NodeId>,
    proposing: Option<Epoch>,
    /// Every failed member failed: nothing to propose, nothing left to use.
    lost: bool,
    /// Unfinished requests, in arrival order.
    ops: BTreeMap<OpId, RangeOp>,
    /// A change was acknowledged since the current flush round began.
    dirty: bool,
}

impl Ext {
    fn members(&self) -> Vec<NodeId> {
        self.set.iter().copied().filter(|n| !self.failed.contains(n)).collect()
    }

    /// A member failed and has not yet left the committed set.
    fn removal_pending(&self) -> bool {
        self.set.iter().any(|n| self.failed.contains(n))
    }
}

#[derive(Debug, Default)]
struct Round {
    id: u64,
    ops: Vec<OpId>,
    pending: BTreeSet<(ExtentIndex, NodeId)>,
    /// Extents where a member failed this round's flush.
    failed: BTreeSet<ExtentIndex>,
    /// Extents whose flush is not sent yet: it waits for the extent's sent
    /// changes to finish, and its new changes wait for it. A replica's flush
    /// clears its dirty regions, so a flush that passed a change which then
    /// failed on another member would hide the difference from reconcile.
    deferred: BTreeSet<ExtentIndex>,
    error: Option<OpError>,
}

/// Bugs `tests/replication_sim.rs` plants to show that it finds them
/// (each is checked at the one line that keeps its rule). Never set
/// outside that test.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Planted {
    /// Acknowledge a change once `min_replicas` members applied it.
    pub ack_before_all: bool,
    /// Start a change without waiting for earlier overlapping ones.
    pub no_overlap_order: bool,
    /// Take a replica's refusal by newer generation as an applied change.
    pub no_fencing: bool,
    /// Bugs the simulator found (fixed; planted back to show it finds them):
    /// send a round's flush at once, past changes of the extent in flight.
    pub flush_passes_changes: bool,
    /// After a failed commit, do not propose again for the next request.
    pub no_repropose: bool,
    /// A round that failed does not mark its extents dirty again.
    pub forget_failed_flush: bool,
}

/// One volume's replication state at its owner, for one generation.
#[derive(Debug)]
pub struct Owner {
    generation: Generation,
    planted: Planted,
    min_replicas: usize,
    extents: HashMap<ExtentIndex, Ext>,
    /// Which extent holds each unfinished range request.
    index: HashMap<OpId, ExtentIndex, crate::types::IdHash>,
    round: Option<Round>,
    rounds: u64,
    /// FLUSHes for the round after the current one.
    next_flushes: Vec<OpId>,
    /// A change was acknowledged since the current round began: a new
    /// FLUSH must wait for the next round.
    acked_in_round: bool,
    fenced: Option<Generation>,
}

impl Owner {
    pub fn new(generation: Generation, min_replicas: usize) -> Owner {
        Owner {
            generation,
            planted: Planted::default(),
            min_replicas: min_replicas.max(1),
            extents: HashMap::new(),
            index: HashMap::default(),
            round: None,
            rounds: 0,
            next_flushes: Vec::new(),
            acked_in_round: false,
            fenced: None,
        }
    }

    /// Plants bugs (for the simulator only).
    #[doc(hidden)]
    pub fn with_planted(mut self, planted: Planted) -> Owner {
        self.planted = planted;
        self
    }

    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The generation that fenced this owner, if one did.
    pub fn fenced(&self) -> Option<Generation> {
        self.fenced
    }

    /// Whether the extent's committed set is installed.
    pub fn knows(&self, extent: ExtentIndex) -> bool {
        self.extents.contains_key(&extent)
    }

    /// The members a read may use (the committed set less failed members),
    /// with the epoch to send. `None` for an extent not installed.
    pub fn read_set(&self, extent: ExtentIndex) -> Option<(Epoch, Vec<NodeId>)> {
        self.extents.get(&extent).map(|e| (e.epoch, e.members()))
    }

    /// The committed set and epoch of an installed extent.
    pub fn view(&self, extent: ExtentIndex) -> Option<(Epoch, &[NodeId])> {
        self.extents.get(&extent).map(|e| (e.epoch, &e.set[..]))
    }

    /// Unfinished range requests and FLUSHes (for tests and metrics).
    pub fn in_flight(&self) -> usize {
        self.index.len() + self.round.as_ref().map_or(0, |r| r.ops.len()) + self.next_flushes.len()
    }

    /// Takes one event; appends what to do to `out`.
    pub fn step(&mut self, event: Event, out: &mut Vec<Action>) {
        match event {
            Event::View { extent, epoch, replicas } => self.view_event(extent, epoch, replicas, out),
            Event::Submit { op, extent, offset, len, change } => {
                self.submit(op, extent, offset, len, Pending::Change(change), out)
            }
            Event::SubmitExclusive { op, extent, offset, len } => {
                self.submit(op, extent, offset, len, Pending::Exclusive, out)
            }
            Event::Held { op, then } => self.held(op, then, out),
            Event::Flush { op } => self.flush(op, out),
            Event::Reply { op, node, result } => self.reply(op, node, result, out),
            Event::FlushReply { round, extent, node, result } => {
                self.flush_reply(round, extent, node, result, out)
            }
            Event::Committed { extent, epoch, replicas } => self.view_event(extent, epoch, replicas, out),
            Event::CommitFailed { extent, epoch } => self.commit_failed(extent, epoch, out),
            Event::Unflushed { extent } => {
                if let Some(ext) = self.extents.get_mut(&extent) {
                    ext.dirty = true;
                    // A FLUSH arriving now must not join a round that began
                    // before this extent needed one.
                    self.acked_in_round = true;
                }
            }
        }
    }

    fn view_event(
        &mut self,
        extent: ExtentIndex,
        epoch: Epoch,
        replicas: Vec<NodeId>,
        out: &mut Vec<Action>,
    ) {
        let ext = match self.extents.get_mut(&extent) {
            None => {
                let ext = Ext {
                    epoch,
                    set: replicas,
                    failed: BTreeSet::new(),
                    proposing: None,
                    lost: false,
                    ops: BTreeMap::new(),
                    dirty: false,
                };
                self.extents.insert(extent, ext);
                return;
            }
            Some(e) if epoch <= e.epoch => return,
            Some(e) => e,
        };
        ext.epoch = epoch;
        ext.set = replicas;
        let set = ext.set.clone();
        ext.failed.retain(|n| set.contains(n));
        if ext.proposing.is_some_and(|p| p <= epoch) {
            ext.proposing = None;
        }
        if ext.failed.is_empty() {
            ext.lost = false;
        }
        self.settle_extent(extent, out);
        self.maybe_propose(extent, out);
        self.release_flush(extent, out);
        self.try_finish_round(out);
    }

    fn submit(
        &mut self,
        op: OpId,
        extent: ExtentIndex,
        offset: u64,
        len: u64,
        what: Pending,
        out: &mut Vec<Action>,
    ) {
        if let Some(g) = self.fenced {
            out.push(Action::Complete { op, result: Err(OpError::Fenced(g)) });
            return;
        }
        let Some(ext) = self.extents.get_mut(&extent) else {
            out.push(Action::Complete { op, result: Err(OpError::Metadata(extent)) });
            return;
        };
        let end = offset.saturating_add(len);
        let blocked = ext.ops.values().any(|o| o.overlaps(offset, end)) && !self.planted.no_overlap_order;
        let change = match what {
            Pending::Change(c) => Some(c),
            Pending::Exclusive => None,
        };
        ext.ops.insert(op, RangeOp { op, offset, end, change, only: None, state: State::Waiting(what) });
        self.index.insert(op, extent);
        if !blocked {
            self.start(extent, op, out);
        }
    }

    /// Starts a waiting request whose earlier overlapping requests are done.
    fn start(&mut self, extent: ExtentIndex, op: OpId, out: &mut Vec<Action>) {
        let min = self.min_replicas;
        let ext = self.extents.get_mut(&extent).expect("indexed extent");
        let members = ext.members();
        let (epoch, have) = (ext.epoch, ext.set.len());
        let o = ext.ops.get_mut(&op).expect("indexed op");
        let State::Waiting(what) = o.state else { return };
        match what {
            Pending::Exclusive => {
                o.state = State::Held;
                out.push(Action::Grant { op, extent, epoch, replicas: members });
            }
            Pending::Change(_)
                if self.round.as_ref().is_some_and(|r| r.deferred.contains(&extent))
                    && !self.planted.flush_passes_changes =>
            {
                // Waits for the extent's flush to go out (see `Round::deferred`).
            }
            Pending::Change(change) => {
                let refuse = if members.is_empty() {
                    Some(OpError::NoReplica(extent))
                } else if have < min {
                    Some(OpError::BelowMinReplicas { extent, have, min })
                } else {
                    None
                };
                if let Some(e) = refuse {
                    self.finish(extent, op, Err(e), out);
                    return;
                }
                let targets: BTreeSet<NodeId> = match o.only {
                    Some(n) => members.into_iter().filter(|m| *m == n).collect(),
                    None => members.into_iter().collect(),
                };
                for &node in &targets {
                    out.push(Action::Send {
                        op,
                        extent,
                        epoch,
                        node,
                        offset: o.offset,
                        len: o.end - o.offset,
                        change,
                    });
                }
                o.state = State::Sent { sent: targets, ok: BTreeSet::new() };
                self.try_finish(extent, op, out);
            }
        }
    }

    fn held(&mut self, op: OpId, then: Then, out: &mut Vec<Action>) {
        let Some(&extent) = self.index.get(&op) else { return };
        let ext = self.extents.get_mut(&extent).expect("indexed extent");
        let o = ext.ops.get_mut(&op).expect("indexed op");
        if !matches!(o.state, State::Held) {
            return;
        }
        if let Some(g) = self.fenced {
            self.finish(extent, op, Err(OpError::Fenced(g)), out);
            return;
        }
        match then {
            Then::Release => self.finish(extent, op, Ok(()), out),
            Then::Change { change, only } => {
                o.change = Some(change);
                o.only = only;
                o.state = State::Waiting(Pending::Change(change));
                self.start(extent, op, out);
            }
        }
    }

    fn reply(&mut self, op: OpId, node: NodeId, result: Result<(), Failure>, out: &mut Vec<Action>) {
        let Some(&extent) = self.index.get(&op) else { return }; // finished: a late or duplicate answer
        let ext = self.extents.get_mut(&extent).expect("indexed extent");
        let o = ext.ops.get_mut(&op).expect("indexed op");
        let State::Sent { sent, ok } = &mut o.state else { return };
        if !sent.contains(&node) || ok.contains(&node) {
            return;
        }
        match result {
            Ok(()) => {
                ok.insert(node);
            }
            Err(Failure::StaleGeneration(_)) if self.planted.no_fencing => {
                ok.insert(node);
            }
            // Sent at an older epoch, and the replica applied a change of a
            // newer one (of this owner) first: it is still a member, so send
            // it again at the current epoch. Only a newer epoch than this
            // owner knows means another writer.
            Err(Failure::StaleEpoch(current)) if current <= ext.epoch && ext.set.contains(&node) => {
                let change = o.change.expect("a sent request has its change");
                let (offset, len) = (o.offset, o.end - o.offset);
                out.push(Action::Send { op, extent, epoch: ext.epoch, node, offset, len, change });
                return;
            }
            Err(f) => {
                if self.failure(extent, node, f, out) {
                    return; // fenced: everything is finished
                }
            }
        }
        self.try_finish(extent, op, out);
    }

    /// Records a member's failure. True if it fenced this owner.
    fn failure(&mut self, extent: ExtentIndex, node: NodeId, f: Failure, out: &mut Vec<Action>) -> bool {
        match f {
            Failure::StaleGeneration(g) => {
                self.fence(g, out);
                true
            }
            Failure::StaleEpoch(_) => {
                // Another writer changed the set: only a newer owner does.
                self.fence(Generation(self.generation.0 + 1), out);
                true
            }
            Failure::Io | Failure::Timeout | Failure::Unreachable => {
                let ext = self.extents.get_mut(&extent).expect("installed extent");
                if ext.set.contains(&node) {
                    ext.failed.insert(node);
                }
                self.maybe_propose(extent, out);
                false
            }
        }
    }

    fn maybe_propose(&mut self, extent: ExtentIndex, out: &mut Vec<Action>) {
        if self.fenced.is_some() {
            return;
        }
        let ext = self.extents.get_mut(&extent).expect("installed extent");
        if ext.proposing.is_some() || !ext.removal_pending() {
            return;
        }
        let members = ext.members();
        if members.is_empty() {
            if !ext.lost {
                ext.lost = true;
                self.settle_extent(extent, out);
            }
            return;
        }
        let epoch = Epoch(ext.epoch.0 + 1);
        ext.proposing = Some(epoch);
        out.push(Action::Propose { extent, epoch, replicas: members });
    }

    fn commit_failed(&mut self, extent: ExtentIndex, epoch: Epoch, out: &mut Vec<Action>) {
        let Some(ext) = self.extents.get_mut(&extent) else { return };
        if ext.proposing != Some(epoch) {
            return;
        }
        ext.proposing = None;
        // Everything that waits on this commit fails; the next request
        // proposes again.
        let waiting: Vec<OpId> = ext
            .ops
            .values()
            .filter(|o| match &o.state {
                State::Sent { sent, ok } => {
                    sent.iter().all(|n| !ext.set.contains(n) || ok.contains(n) || ext.failed.contains(n))
                }
                _ => false,
            })
            .map(|o| o.op)
            .collect();
        for op in waiting {
            self.finish(extent, op, Err(OpError::Metadata(extent)), out);
        }
        self.release_flush(extent, out);
        if let Some(r) = &mut self.round
            && r.failed.contains(&extent)
        {
            r.error.get_or_insert(OpError::Metadata(extent));
        }
        self.try_finish_round(out);
    }

    /// Re-checks every sent request of the extent (after a commit, or when
    /// the extent became lost).
    fn settle_extent(&mut self, extent: ExtentIndex, out: &mut Vec<Action>) {
        let ops: Vec<OpId> = match self.extents.get(&extent) {
            Some(e) => {
                e.ops.values().filter(|o| matches!(o.state, State::Sent { .. })).map(|o| o.op).collect()
            }
            None => return,
        };
        for op in ops {
            self.try_finish(extent, op, out);
        }
    }

    /// Finishes a sent request if every member answered and no failed
    /// member is still in the committed set.
    fn try_finish(&mut self, extent: ExtentIndex, op: OpId, out: &mut Vec<Action>) {
        let min = self.min_replicas;
        let ext = self.extents.get(&extent).expect("installed extent");
        let Some(o) = ext.ops.get(&op) else { return };
        let State::Sent { sent, ok } = &o.state else { return };
        if ext.lost {
            self.finish(extent, op, Err(OpError::NoReplica(extent)), out);
            return;
        }
        if self.planted.ack_before_all && ok.len() >= min {
            let ext = self.extents.get_mut(&extent).expect("installed extent");
            ext.dirty = true;
            self.acked_in_round = true;
            self.finish(extent, op, Ok(()), out);
            return;
        }
        if sent.iter().any(|n| ext.set.contains(n) && !ok.contains(n) && !ext.failed.contains(n)) {
            return; // a member has not answered (one that left the set no longer counts)
        }
        if ext.removal_pending() {
            // The commit that removes the failed member decides; after a
            // failed commit, this request proposes again.
            if !self.planted.no_repropose {
                self.maybe_propose(extent, out);
            }
            return;
        }
        let result = if ext.set.len() < min {
            Err(OpError::BelowMinReplicas { extent, have: ext.set.len(), min })
        } else if o.only.is_none() && !ext.set.iter().all(|n| ok.contains(n)) {
            // The set holds a member this change never reached.
            Err(OpError::Metadata(extent))
        } else {
            Ok(())
        };
        if result.is_ok() {
            let ext = self.extents.get_mut(&extent).expect("installed extent");
            ext.dirty = true;
            self.acked_in_round = true;
        }
        self.finish(extent, op, result, out);
    }

    /// Removes a finished request, reports it and starts what waited on it.
    fn finish(&mut self, extent: ExtentIndex, op: OpId, result: Result<(), OpError>, out: &mut Vec<Action>) {
        let ext = self.extents.get_mut(&extent).expect("installed extent");
        let Some(done) = ext.ops.remove(&op) else { return };
        self.index.remove(&op);
        out.push(Action::Complete { op, result });
        // Waiting requests that overlapped it may now have no earlier overlap.
        let mut ready = Vec::new();
        for (id, o) in ext.ops.range(op..) {
            if !matches!(o.state, State::Waiting(_)) || !o.overlaps(done.offset, done.end) {
                continue;
            }
            let earlier = ext.ops.range(..*id).any(|(_, e)| e.overlaps(o.offset, o.end));
            if !earlier {
                ready.push(*id);
            }
        }
        for id in ready {
            self.start(extent, id, out);
        }
        self.release_flush(extent, out);
    }

    fn flush(&mut self, op: OpId, out: &mut Vec<Action>) {
        if let Some(g) = self.fenced {
            out.push(Action::Complete { op, result: Err(OpError::Fenced(g)) });
            return;
        }
        match &mut self.round {
            // Nothing was acknowledged since the round began: it covers this one too.
            Some(r) if !self.acked_in_round => r.ops.push(op),
            Some(_) => self.next_flushes.push(op),
            None => {
                self.next_flushes.push(op);
                self.start_round(out);
            }
        }
    }

    fn start_round(&mut self, out: &mut Vec<Action>) {
        self.rounds += 1;
        let mut round =
            Round { id: self.rounds, ops: std::mem::take(&mut self.next_flushes), ..Round::default() };
        self.acked_in_round = false;
        let mut dirty: Vec<ExtentIndex> =
            self.extents.iter().filter(|(_, e)| e.dirty).map(|(i, _)| *i).collect();
        dirty.sort();
        for &extent in &dirty {
            self.extents.get_mut(&extent).expect("listed extent").dirty = false;
            round.deferred.insert(extent);
        }
        self.round = Some(round);
        for &extent in &dirty {
            if !self.planted.no_repropose {
                // A member failed and its commit failed: this FLUSH proposes again.
                self.maybe_propose(extent, out);
            }
        }
        for extent in dirty {
            self.release_flush(extent, out);
        }
        self.try_finish_round(out);
    }

    /// Sends the round's flush of `extent` once none of its changes is in
    /// flight, then starts the changes that waited behind it. A failed
    /// member still in the set fails it (once the commit has decided).
    fn release_flush(&mut self, extent: ExtentIndex, out: &mut Vec<Action>) {
        let Some(r) = &mut self.round else { return };
        let Some(ext) = self.extents.get_mut(&extent) else { return };
        let in_flight = ext.ops.values().any(|o| matches!(o.state, State::Sent { .. }));
        if !r.deferred.contains(&extent) || (in_flight && !self.planted.flush_passes_changes) {
            return;
        }
        let forget = self.planted.forget_failed_flush;
        if ext.lost {
            r.error.get_or_insert(OpError::NoReplica(extent));
            ext.dirty = !forget;
        } else if ext.removal_pending() && !self.planted.flush_passes_changes {
            if ext.proposing.is_some() {
                return; // the commit decides
            }
            r.error.get_or_insert(OpError::Metadata(extent));
            ext.dirty = !forget;
        } else {
            for node in ext.members() {
                r.pending.insert((extent, node));
                out.push(Action::SendFlush { round: r.id, extent, epoch: ext.epoch, node });
            }
        }
        r.deferred.remove(&extent);
        let ready: Vec<OpId> = ext
            .ops
            .iter()
            .filter(|(id, o)| {
                matches!(o.state, State::Waiting(_))
                    && !ext.ops.range(..**id).any(|(_, e)| e.overlaps(o.offset, o.end))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            self.start(extent, id, out);
        }
        self.try_finish_round(out);
    }

    fn flush_reply(
        &mut self,
        round: u64,
        extent: ExtentIndex,
        node: NodeId,
        result: Result<(), Failure>,
        out: &mut Vec<Action>,
    ) {
        let Some(r) = &mut self.round else { return };
        if r.id != round || !r.pending.remove(&(extent, node)) {
            return;
        }
        if let Err(Failure::StaleEpoch(current)) = result
            && let Some(ext) = self.extents.get(&extent)
            && current <= ext.epoch
            && ext.set.contains(&node)
        {
            // As for a change (see `reply`): the member is current, the flush was not.
            r.pending.insert((extent, node));
            out.push(Action::SendFlush { round, extent, epoch: ext.epoch, node });
            return;
        }
        if let Err(f) = result
            && !(self.planted.no_fencing && matches!(f, Failure::StaleGeneration(_)))
        {
            r.failed.insert(extent);
            if self.failure(extent, node, f, out) {
                return;
            }
        }
        self.try_finish_round(out);
    }

    fn try_finish_round(&mut self, out: &mut Vec<Action>) {
        let Some(r) = &self.round else { return };
        if !r.pending.is_empty() || !r.deferred.is_empty() {
            return;
        }
        let mut error = r.error;
        for extent in &r.failed {
            let ext = &self.extents[extent];
            if ext.lost {
                error.get_or_insert(OpError::NoReplica(*extent));
            } else if ext.removal_pending() {
                if error.is_none() {
                    return; // wait for the commit that removes the failed member
                }
            } else if ext.set.len() < self.min_replicas {
                error.get_or_insert(OpError::BelowMinReplicas {
                    extent: *extent,
                    have: ext.set.len(),
                    min: self.min_replicas,
                });
            }
        }
        let r = self.round.take().expect("checked");
        if error.is_some() && !self.planted.forget_failed_flush {
            // What this round did not make durable, the next one must.
            for extent in &r.failed {
                self.extents.get_mut(extent).expect("installed extent").dirty = true;
            }
        }
        for op in r.ops {
            out.push(Action::Complete { op, result: error.map_or(Ok(()), Err) });
        }
        if !self.next_flushes.is_empty() {
            self.start_round(out);
        }
    }

    /// A replica has seen `generation`: every request fails from now on.
    fn fence(&mut self, generation: Generation, out: &mut Vec<Action>) {
        if self.fenced.is_some() {
            return;
        }
        self.fenced = Some(generation);
        out.push(Action::Fenced { generation });
        let err = Err(OpError::Fenced(generation));
        let mut ops: Vec<OpId> = self.index.keys().copied().collect();
        ops.sort();
        for op in ops {
            let extent = self.index[&op];
            let ext = self.extents.get_mut(&extent).expect("indexed extent");
            ext.ops.remove(&op);
            self.index.remove(&op);
            out.push(Action::Complete { op, result: err });
        }
        if let Some(r) = self.round.take() {
            for op in r.ops {
                out.push(Action::Complete { op, result: err });
            }
        }
        for op in std::mem::take(&mut self.next_flushes) {
            out.push(Action::Complete { op, result: err });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: ExtentIndex = ExtentIndex(0);
    const W: Change = Change::Write { fua: false };

    fn owner3() -> (Owner, Vec<Action>) {
        let mut o = Owner::new(Generation(1), 2);
        let mut out = Vec::new();
        o.step(
            Event::View { extent: E, epoch: Epoch(1), replicas: vec![NodeId(1), NodeId(2), NodeId(3)] },
            &mut out,
        );
        assert!(out.is_empty());
        (o, out)
    }

    fn sends(out: &[Action]) -> Vec<(OpId, NodeId)> {
        out.iter()
            .filter_map(|a| match a {
                Action::Send { op, node, .. } => Some((*op, *node)),
                _ => None,
            })
            .collect()
    }

    fn completes(out: &[Action]) -> Vec<(OpId, Result<(), OpError>)> {
        out.iter()
            .filter_map(|a| match a {
                Action::Complete { op, result } => Some((*op, *result)),
                _ => None,
            })
            .collect()
    }

    fn ok(o: &mut Owner, op: u64, node: u64, out: &mut Vec<Action>) {
        o.step(Event::Reply { op: OpId(op), node: NodeId(node), result: Ok(()) }, out);
    }

    #[test]
    fn acknowledged_only_when_every_replica_applied() {
        let (mut o, mut out) = owner3();
        o.step(Event::Submit { op: OpId(1), extent: E, offset: 0, len: 4096, change: W }, &mut out);
        assert_eq!(sends(&out).len(), 3);
        out.clear();
        ok(&mut o, 1, 1, &mut out);
        ok(&mut o, 1, 2, &mut out);
        assert!(completes(&out).is_empty());
        ok(&mut o, 1, 2, &mut out); // a duplicate answer changes nothing
        assert!(completes(&out).is_empty());
        ok(&mut o, 1, 3, &mut out);
        assert_eq!(completes(&out), vec![(OpId(1), Ok(()))]);
    }

    #[test]
    fn overlapping_changes_go_out_in_order() {
        let (mut o, mut out) = owner3();
        o.step(Event::Submit { op: OpId(1), extent: E, offset: 0, len: 8192, change: W }, &mut out);
        o.step(Event::Submit { op: OpId(2), extent: E, offset: 4096, len: 4096, change: W }, &mut out);
        o.step(Event::Submit { op: OpId(3), extent: E, offset: 8192, len: 4096, change: W }, &mut out);
        let s = sends(&out);
        assert!(s.iter().all(|(op, _)| *op != OpId(2)), "2 overlaps 1 and must wait: {s:?}");
        assert_eq!(s.iter().filter(|(op, _)| *op == OpId(3)).count(), 3);
        out.clear();
        for n in 1..=3 {
            ok(&mut o, 1, n, &mut out);
        }
        assert_eq!(sends(&out).iter().filter(|(op, _)| *op == OpId(2)).count(), 3);
    }

    #[test]
    fn a_failed_member_leaves_by_commit_before_the_ack() {
        let (mut o, mut out) = owner3();
        o.step(Event::Submit { op: OpId(1), extent: E, offset: 0, len: 4096, change: W }, &mut out);
        out.clear();
        ok(&mut o, 1, 1, &mut out);
        ok(&mut o, 1, 2, &mut out);
        o.step(Event::Reply { op: OpId(1), node: NodeId(3), result: Err(Failure::Timeout) }, &mut out);
        assert_eq!(
            out,
            vec![Action::Propose { extent: E, epoch: Epoch(2), replicas: vec![NodeId(1), NodeId(2)] }]
        );
        out.clear();
        // A new request does not go to the failed member.
        o.step(Event::Submit { op: OpId(2), extent: E, offset: 1 << 20, len: 4096, change: W }, &mut out);
        assert_eq!(sends(&out), vec![(OpId(2), NodeId(1)), (OpId(2), NodeId(2))]);
        out.clear();
        o.step(
            Event::Committed { extent: E, epoch: Epoch(2), replicas: vec![NodeId(1), NodeId(2)] },
            &mut out,
        );
        assert_eq!(completes(&out), vec![(OpId(1), Ok(()))]);
    }

    #[test]
    fn below_min_replicas_is_an_error_after_the_commit() {
        let (mut o, mut out) = owner3();
        o.step(Event::Submit { op: OpId(1), extent: E, offset: 0, len: 4096, change: W }, &mut out);
        ok(&mut o, 1, 1, &mut out);
        o.step(Event::Reply { op: OpId(1), node: NodeId(2), result: Err(Failure::Io) }, &mut out);
        o.step(Event::Reply { op: OpId(1), node: NodeId(3), result: Err(Failure::Io) }, &mut out);
        out.clear();
        o.step(Event::Committed { extent: E, epoch: Epoch(2), replicas: vec![NodeId(1)] }, &mut out);
        out.clear();
        o.step(Event::Committed { extent: E, epoch: Epoch(3), replicas: vec![NodeId(1)] }, &mut out);
        // The first commit removed 2 only (3 failed meanwhile); whichever
        // commit settled it, the request fails: one member is below 2.
        let (mut o2, mut out2) = owner3();
        o2.step(Event::Submit { op: OpId(1), extent: E, offset: 0, len: 4096, change: W }, &mut out2);
        ok(&mut o2, 1, 1, &mut out2);
        o2.step(Event::Reply { op: OpId(1), node: NodeId(2), result: Err(Failure::Io) }, &mut out2);
        o2.step(Event::Reply { op: OpId(1), node: NodeId(3), result: Err(Failure::Io) }, &mut out2);
        out2.clear();
        o2.step(
            Event::Committed { extent: E, epoch: Epoch(2), replicas: vec![NodeId(1), NodeId(3)] },
            &mut out2,
        );
        assert_eq!(out2, vec![Action::Propose { extent: E, epoch: Epoch(3), replicas: vec![NodeId(1)] }]);
        out2.clear();
        o2.step(Event::Committed { extent: E, epoch: Epoch(3), replicas: vec![NodeId(1)] }, &mut out2);
        assert_eq!(
            completes(&out2),
            vec![(OpId(1), Err(OpError::BelowMinReplicas { extent: E, have: 1, min: 2 }))]
        );
    }

    #[test]
    fn a_newer_generation_fences_everything() {
        let (mut o, mut out) = owner3();
        o.step(Event::Submit { op: OpId(1), extent: E, offset: 0, len: 4096, change: W }, &mut out);
        o.step(Event::Submit { op: OpId(2), extent: E, offset: 0, len: 4096, change: W }, &mut out);
        out.clear();
        o.step(
            Event::Reply {
                op: OpId(1),
                node: NodeId(2),
                result: Err(Failure::StaleGeneration(Generation(5))),
            },
            &mut out,
        );
        assert_eq!(out[0], Action::Fenced { generation: Generation(5) });
        assert_eq!(completes(&out).len(), 2, "the sent write and the one waiting behind it");
        assert!(completes(&out).iter().all(|(_, r)| *r == Err(OpError::Fenced(Generation(5)))));
        out.clear();
        o.step(Event::Submit { op: OpId(3), extent: E, offset: 0, len: 4096, change: W }, &mut out);
        assert_eq!(completes(&out), vec![(OpId(3), Err(OpError::Fenced(Generation(5))))]);
    }

    #[test]
    fn flushes_share_rounds_and_cover_acknowledged_changes() {
        let (mut o, mut out) = owner3();
        o.step(Event::Flush { op: OpId(1) }, &mut out);
        assert_eq!(completes(&out), vec![(OpId(1), Ok(()))], "nothing to flush");
        out.clear();
        o.step(Event::Submit { op: OpId(2), extent: E, offset: 0, len: 4096, change: W }, &mut out);
        for n in 1..=3 {
            ok(&mut o, 2, n, &mut out);
        }
        out.clear();
        o.step(Event::Flush { op: OpId(3) }, &mut out);
        o.step(Event::Flush { op: OpId(4) }, &mut out); // joins: nothing acknowledged since
        let flushes = out.iter().filter(|a| matches!(a, Action::SendFlush { .. })).count();
        assert_eq!(flushes, 3);
        out.clear();
        for n in 1..=3 {
            o.step(Event::FlushReply { round: 2, extent: E, node: NodeId(n), result: Ok(()) }, &mut out);
        }
        assert_eq!(completes(&out), vec![(OpId(3), Ok(())), (OpId(4), Ok(()))]);
    }

    /// A predecessor's unflushed changes found at takeover: the next FLUSH
    /// flushes the extent on every member although this owner changed
    /// nothing there, and a FLUSH that comes while a round that began
    /// before the mark is running does not join it.
    #[test]
    fn an_extent_marked_unflushed_is_flushed_by_the_next_round() {
        let (mut o, mut out) = owner3();
        o.step(Event::Unflushed { extent: E }, &mut out);
        assert!(out.is_empty(), "the mark sends nothing by itself");
        o.step(Event::Flush { op: OpId(1) }, &mut out);
        let sent = |out: &[Action], round: u64| {
            out.iter()
                .filter(|a| matches!(a, Action::SendFlush { round: r, extent: E, .. } if *r == round))
                .count()
        };
        assert_eq!(sent(&out, 1), 3, "{out:?}");
        assert!(completes(&out).is_empty());
        out.clear();
        // Round 1 runs; the extent is marked again (another takeover step
        // found more), and a FLUSH comes: it waits for round 2.
        o.step(Event::Unflushed { extent: E }, &mut out);
        o.step(Event::Flush { op: OpId(2) }, &mut out);
        for n in 1..=3 {
            o.step(Event::FlushReply { round: 1, extent: E, node: NodeId(n), result: Ok(()) }, &mut out);
        }
        assert_eq!(completes(&out), vec![(OpId(1), Ok(()))], "{out:?}");
        assert_eq!(sent(&out, 2), 3, "{out:?}");
        out.clear();
        for n in 1..=3 {
            o.step(Event::FlushReply { round: 2, extent: E, node: NodeId(n), result: Ok(()) }, &mut out);
        }
        assert_eq!(completes(&out), vec![(OpId(2), Ok(()))]);
        // An extent not installed is not marked (it is reconciled, and
        // marked, when it is).
        out.clear();
        o.step(Event::Unflushed { extent: ExtentIndex(99) }, &mut out);
        o.step(Event::Flush { op: OpId(3) }, &mut out);
        assert_eq!(completes(&out), vec![(OpId(3), Ok(()))]);
    }

    #[test]
    fn a_flush_after_an_ack_waits_for_the_next_round() {
        let (mut o, mut out) = owner3();
        o.step(Event::Submit { op: OpId(1), extent: E, offset: 0, len: 4096, change: W }, &mut out);
        for n in 1..=3 {
            ok(&mut o, 1, n, &mut out);
        }
        o.step(Event::Flush { op: OpId(2) }, &mut out); // round 1
        o.step(Event::Submit { op: OpId(3), extent: E, offset: 0, len: 4096, change: W }, &mut out);
        for n in 1..=3 {
            ok(&mut o, 3, n, &mut out);
        }
        o.step(Event::Flush { op: OpId(4) }, &mut out); // must not join round 1
        out.clear();
        for n in 1..=3 {
            o.step(Event::FlushReply { round: 1, extent: E, node: NodeId(n), result: Ok(()) }, &mut out);
        }
        assert_eq!(completes(&out), vec![(OpId(2), Ok(()))]);
        assert_eq!(out.iter().filter(|a| matches!(a, Action::SendFlush { round: 2, .. })).count(), 3);
    }

    #[test]
    fn a_flush_waits_for_the_extents_changes_in_flight() {
        let (mut o, mut out) = owner3();
        o.step(Event::Submit { op: OpId(1), extent: E, offset: 0, len: 4096, change: W }, &mut out);
        for n in 1..=3 {
            ok(&mut o, 1, n, &mut out);
        }
        o.step(Event::Submit { op: OpId(2), extent: E, offset: 4096, len: 4096, change: W }, &mut out);
        out.clear();
        o.step(Event::Flush { op: OpId(3) }, &mut out);
        assert!(out.is_empty(), "op 2 is in flight: the flush would clear dirty bits over it: {out:?}");
        o.step(Event::Submit { op: OpId(4), extent: E, offset: 8192, len: 4096, change: W }, &mut out);
        assert!(sends(&out).is_empty(), "a new change waits behind the flush");
        for n in 1..=3 {
            ok(&mut o, 2, n, &mut out);
        }
        let flush_at = out.iter().position(|a| matches!(a, Action::SendFlush { .. })).expect("flush sent");
        let send_at =
            out.iter().position(|a| matches!(a, Action::Send { op: OpId(4), .. })).expect("op 4 sent");
        assert!(flush_at < send_at, "{out:?}");
        assert_eq!(out.iter().filter(|a| matches!(a, Action::SendFlush { round: 1, .. })).count(), 3);
        assert_eq!(sends(&out).len(), 3);
    }

    #[test]
    fn a_request_after_a_failed_commit_proposes_again() {
        let (mut o, mut out) = owner3();
        o.step(Event::Submit { op: OpId(1), extent: E, offset: 0, len: 4096, change: W }, &mut out);
        ok(&mut o, 1, 1, &mut out);
        ok(&mut o, 1, 2, &mut out);
        o.step(Event::Reply { op: OpId(1), node: NodeId(3), result: Err(Failure::Timeout) }, &mut out);
        out.clear();
        o.step(Event::CommitFailed { extent: E, epoch: Epoch(2) }, &mut out);
        assert_eq!(completes(&out), vec![(OpId(1), Err(OpError::Metadata(E)))]);
        out.clear();
        o.step(Event::Submit { op: OpId(2), extent: E, offset: 0, len: 4096, change: W }, &mut out);
        ok(&mut o, 2, 1, &mut out);
        ok(&mut o, 2, 2, &mut out);
        let propose = Action::Propose { extent: E, epoch: Epoch(2), replicas: vec![NodeId(1), NodeId(2)] };
        assert!(out.contains(&propose), "{out:?}");
        out.clear();
        o.step(
            Event::Committed { extent: E, epoch: Epoch(2), replicas: vec![NodeId(1), NodeId(2)] },
            &mut out,
        );
        assert_eq!(completes(&out), vec![(OpId(2), Ok(()))]);
    }

    #[test]
    fn a_failed_flush_leaves_its_extent_to_the_next_one() {
        let (mut o, mut out) = owner3();
        o.step(Event::Submit { op: OpId(1), extent: E, offset: 0, len: 4096, change: W }, &mut out);
        for n in 1..=3 {
            ok(&mut o, 1, n, &mut out);
        }
        o.step(Event::Flush { op: OpId(2) }, &mut out);
        for n in 1..=2 {
            o.step(Event::FlushReply { round: 1, extent: E, node: NodeId(n), result: Ok(()) }, &mut out);
        }
        o.step(
            Event::FlushReply { round: 1, extent: E, node: NodeId(3), result: Err(Failure::Io) },
            &mut out,
        );
        out.clear();
        o.step(Event::CommitFailed { extent: E, epoch: Epoch(2) }, &mut out);
        assert_eq!(completes(&out), vec![(OpId(2), Err(OpError::Metadata(E)))]);
        out.clear();
        // Node 3 never flushed op 1: the next FLUSH must not succeed without it.
        o.step(Event::Flush { op: OpId(3) }, &mut out);
        assert_eq!(
            out,
            vec![Action::Propose { extent: E, epoch: Epoch(2), replicas: vec![NodeId(1), NodeId(2)] }]
        );
        out.clear();
        o.step(
            Event::Committed { extent: E, epoch: Epoch(2), replicas: vec![NodeId(1), NodeId(2)] },
            &mut out,
        );
        assert_eq!(out.iter().filter(|a| matches!(a, Action::SendFlush { round: 2, .. })).count(), 2);
        for n in 1..=2 {
            o.step(Event::FlushReply { round: 2, extent: E, node: NodeId(n), result: Ok(()) }, &mut out);
        }
        assert_eq!(completes(&out), vec![(OpId(3), Ok(()))]);
    }

    #[test]
    fn a_stale_epoch_of_this_owner_is_sent_again_not_fenced() {
        let (mut o, mut out) = owner3();
        o.step(Event::Submit { op: OpId(1), extent: E, offset: 0, len: 4096, change: W }, &mut out);
        o.step(
            Event::Committed { extent: E, epoch: Epoch(2), replicas: vec![NodeId(1), NodeId(2), NodeId(3)] },
            &mut out,
        );
        out.clear();
        o.step(
            Event::Reply { op: OpId(1), node: NodeId(2), result: Err(Failure::StaleEpoch(Epoch(2))) },
            &mut out,
        );
        assert_eq!(
            out,
            vec![Action::Send {
                op: OpId(1),
                extent: E,
                epoch: Epoch(2),
                node: NodeId(2),
                offset: 0,
                len: 4096,
                change: W
            }]
        );
        assert_eq!(o.fenced(), None);
        out.clear();
        o.step(
            Event::Reply { op: OpId(1), node: NodeId(2), result: Err(Failure::StaleEpoch(Epoch(3))) },
            &mut out,
        );
        assert!(o.fenced().is_some(), "an epoch newer than this owner knows is another writer");
    }

    #[test]
    fn exclusive_holds_keep_overlaps_out() {
        let (mut o, mut out) = owner3();
        o.step(Event::SubmitExclusive { op: OpId(1), extent: E, offset: 0, len: 4096 }, &mut out);
        assert!(matches!(out[0], Action::Grant { op: OpId(1), .. }));
        o.step(Event::Submit { op: OpId(2), extent: E, offset: 0, len: 4096, change: W }, &mut out);
        assert!(sends(&out).is_empty());
        out.clear();
        o.step(
            Event::Held { op: OpId(1), then: Then::Change { change: W, only: Some(NodeId(2)) } },
            &mut out,
        );
        assert_eq!(sends(&out), vec![(OpId(1), NodeId(2))]);
        out.clear();
        ok(&mut o, 1, 2, &mut out);
        assert_eq!(completes(&out), vec![(OpId(1), Ok(()))]);
        assert_eq!(sends(&out).len(), 3, "the waiting write starts");
    }
}
