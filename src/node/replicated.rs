//! The I/O shell around `replication::Owner`: how this node, as a volume's
//! owner, serves it from replicas on several nodes.
//!
//! Owns: carrying out the core's actions (peer requests to replicas,
//! metadata proposals, completing callers), reads (one replica, the next on
//! a checksum or I/O error, and a repair of the bad copy), and
//! reconciliation of each extent before its first request in this owner's
//! lifetime (`replication::reconcile`), and, before this owner's first
//! FLUSH, the reconciliation of every extent a predecessor may have left
//! unflushed, so that FLUSH covers what the predecessor acknowledged too.
//!
//! Cancel safety: once a request is submitted to the core, its replica
//! requests run in tasks of their own; a caller that goes away only drops
//! the receiver of its completion. Reconciliation runs in a task too, so a
//! dropped first request does not leave an extent half copied (and a later
//! one reconciles again from the replicas' dirty bits, which copying keeps).
//!
//! Never: decides ordering or acknowledgement itself (the core does), or
//! reads a replica outside the committed set less its failed members.

use super::volume::{ROUTE_WAIT, Result, VolumeError};
use crate::layout::Layout;
use crate::proto::peer::{
    BlockCrcs, ExtentCrcs, ExtentError, ExtentFlush, ExtentMap, ExtentRead, ExtentTarget, ExtentTrim,
    ExtentWrite, ExtentWriteZeroes, ExtentsDirty, Message,
};
use crate::replication::reconcile::{self, Report};
use crate::replication::{Action, Change, Event, Failure, OpError, OpId, Owner, Then};
use crate::types::{BlockState, Epoch, ExtentIndex, Generation, MapExtent, NodeId, ReadChunk, VolumeId};
use bytes::Bytes;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OnceCell, oneshot};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Why a replica request got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallError {
    Timeout,
    Unreachable,
}

/// What the shell needs from the node around it (the daemon implements it
/// over its peer pool, its replica service and its metadata node).
pub trait ClusterIo: Send + Sync + 'static {
    /// This node.
    fn me(&self) -> NodeId;
    /// One request to `node`'s replica service (this node's own, in
    /// process, when `node` is [`ClusterIo::me`]), within the request timeout.
    fn call(&self, node: NodeId, request: Message) -> BoxFuture<std::result::Result<Message, CallError>>;
    /// The extent's committed replica set and epoch, as the metadata has it.
    fn view(&self, volume: VolumeId, extent: ExtentIndex) -> Option<(Epoch, Vec<NodeId>)>;
    /// Commits a new replica set for the extent.
    fn propose(
        &self,
        volume: VolumeId,
        extent: ExtentIndex,
        epoch: Epoch,
        replicas: Vec<NodeId>,
    ) -> BoxFuture<std::result::Result<(), String>>;
    /// False once this node may no longer presume itself live (its
    /// liveness lease ran out), and before its first heartbeat after a
    /// start or a join was acknowledged: it must not serve.
    fn lease_valid(&self) -> bool;
    /// Resolves with true once the lease is valid (at once if it is now),
    /// or with false at `deadline`.
    fn lease_wait(&self, deadline: tokio::time::Instant) -> BoxFuture<bool>;
    /// Whether the metadata as applied here names this node the owner of
    /// `volume` at `generation`.
    fn owns(&self, volume: VolumeId, generation: Generation) -> bool;
    /// The nodes that may hold replicas and are not known to be down (the
    /// metadata's nodes marked up), this node included if it is one.
    fn data_nodes(&self) -> Vec<NodeId>;
}

/// Counters of one replicated volume (exported as metrics).
#[derive(Debug, Default)]
pub struct ReplicationStats {
    /// Reads served from another replica after a checksum or I/O error.
    pub read_failovers: AtomicU64,
    /// Bad copies rewritten from a good one.
    pub repairs: AtomicU64,
    /// Replica sets shrunk by a failure.
    pub degraded: AtomicU64,
    /// Bytes copied by reconciliation.
    pub reconciled_bytes: AtomicU64,
}

#[derive(Default)]
struct Slot {
    done: Option<oneshot::Sender<std::result::Result<(), OpError>>>,
    grant: Option<oneshot::Sender<(Epoch, Vec<NodeId>)>>,
    data: Option<Bytes>,
}

struct Inner {
    core: Owner,
    next_op: u64,
    slots: HashMap<OpId, Slot, crate::types::IdHash>,
}

/// One volume served by this node as its owner, at one generation.
pub struct Replicated {
    volume: VolumeId,
    generation: Generation,
    layout: Layout,
    io: Arc<dyn ClusterIo>,
    inner: Mutex<Inner>,
    /// Extents reconciled (and installed in the core) by this owner.
    ready: Mutex<HashMap<ExtentIndex, Arc<OnceCell<()>>>>,
    /// Set once the extents a predecessor may have left unflushed are
    /// reconciled and marked for this owner's FLUSH (see [`Self::inherit`]).
    inherited: Arc<OnceCell<()>>,
    reads: AtomicU64,
    pub stats: ReplicationStats,
}

impl std::fmt::Debug for Replicated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicated")
            .field("volume", &self.volume)
            .field("generation", &self.generation)
            .finish()
    }
}

fn unavailable(e: impl std::fmt::Display) -> VolumeError {
    VolumeError::Unavailable(e.to_string())
}

/// A replica's answer as the core sees it.
fn failure_of(reply: std::result::Result<Message, CallError>) -> std::result::Result<Message, Failure> {
    match reply {
        Err(CallError::Timeout) => Err(Failure::Timeout),
        Err(CallError::Unreachable) => Err(Failure::Unreachable),
        Ok(Message::ExtentErr(e)) => Err(match e.error {
            ExtentError::StaleGeneration { current } => Failure::StaleGeneration(current),
            ExtentError::StaleEpoch { current } => Failure::StaleEpoch(current),
            _ => Failure::Io,
        }),
        Ok(Message::Error(_)) => Err(Failure::Io),
        Ok(m) => Ok(m),
    }
}

impl Replicated {
    pub fn new(
        volume: VolumeId,
        generation: Generation,
        layout: Layout,
        min_replicas: usize,
        io: Arc<dyn ClusterIo>,
    ) -> Arc<Replicated> {
        Arc::new(Replicated {
            volume,
            generation,
            layout,
            io,
            inner: Mutex::new(Inner {
                core: Owner::new(generation, min_replicas),
                next_op: 1,
                slots: HashMap::default(),
            }),
            ready: Mutex::default(),
            inherited: Arc::default(),
            reads: AtomicU64::new(0),
            stats: ReplicationStats::default(),
        })
    }

    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The generation that fenced this owner, if a replica has seen a newer one.
    pub fn fenced(&self) -> Option<Generation> {
        self.inner.lock().unwrap().core.fenced()
    }

    fn target(&self, extent: ExtentIndex, epoch: Epoch) -> ExtentTarget {
        ExtentTarget { volume: self.volume, extent, epoch, generation: self.generation }
    }

    fn check_owner(&self) -> Result<()> {
        match self.fenced() {
            Some(g) => {
                Err(VolumeError::Unavailable(format!("this node no longer owns the volume (generation {g})")))
            }
            None => Ok(()),
        }
    }

    /// Whether this node may serve now. Without a valid lease (a node that
    /// just started or joined and whose first heartbeat is not yet
    /// acknowledged, or one cut off from the leader) the request waits up
    /// to [`ROUTE_WAIT`] for the lease, as a request without a route waits
    /// for one, instead of failing a client that came a moment early.
    /// Waiting holds nothing, so dropping it is safe.
    ///
    /// A valid lease also means this node's metadata is current (the lease
    /// comes back after a lapse only once it has caught up with the
    /// leader), so the owner record checked here is the one that counts:
    /// an old owner healed from a partition learns of its successor before
    /// it may serve, and never reads its stale copy to a client.
    async fn check_serving(&self) -> Result<()> {
        self.check_owner()?;
        if !self.io.lease_valid() {
            let deadline = tokio::time::Instant::now() + ROUTE_WAIT;
            if !self.io.lease_wait(deadline).await {
                return Err(unavailable(
                    "this node's liveness lease ran out: it cannot serve until it renews it",
                ));
            }
            self.check_owner()?;
        }
        if !self.io.owns(self.volume, self.generation) {
            return Err(unavailable(format!(
                "this node no longer owns the volume (it had generation {})",
                self.generation
            )));
        }
        Ok(())
    }

    /// Steps the core under its lock and carries out what it asks.
    fn step_all(self: &Arc<Self>, events: impl IntoIterator<Item = Event>) {
        let mut out = Vec::new();
        let mut ready = Vec::new();
        {
            let mut inner = self.inner.lock().unwrap();
            for e in events {
                inner.core.step(e, &mut out);
            }
            self.take_actions(&mut inner, &mut out, &mut ready);
        }
        for f in ready {
            f();
        }
    }

    /// Turns actions into work, under the lock: completions find their
    /// slots here; network work is returned to run after the lock drops.
    fn take_actions(
        self: &Arc<Self>,
        inner: &mut Inner,
        out: &mut Vec<Action>,
        later: &mut Vec<Box<dyn FnOnce() + Send>>,
    ) {
        // An op's copies go out from one task: one spawn per write, not one
        // per replica.
        let mut sends: Option<(OpId, Vec<(NodeId, Message)>)> = None;
        let flush_sends = |sends: &mut Option<(OpId, Vec<(NodeId, Message)>)>,
                           later: &mut Vec<Box<dyn FnOnce() + Send>>| {
            if let Some((op, calls)) = sends.take() {
                let me = self.clone();
                later.push(Box::new(move || {
                    tokio::spawn(me.send_all(op, calls));
                }));
            }
        };
        for a in out.drain(..) {
            if !matches!(&a, Action::Send { op, .. } if sends.as_ref().is_none_or(|(o, _)| o == op)) {
                flush_sends(&mut sends, later);
            }
            match a {
                Action::Complete { op, result } => {
                    if let Some(tx) = inner.slots.remove(&op).and_then(|s| s.done) {
                        let _ = tx.send(result);
                    }
                }
                Action::Grant { op, epoch, replicas, .. } => {
                    if let Some(tx) = inner.slots.get_mut(&op).and_then(|s| s.grant.take()) {
                        let _ = tx.send((epoch, replicas));
                    }
                }
                Action::Send { op, extent, epoch, node, offset, len, change } => {
                    let data = inner.slots.get(&op).and_then(|s| s.data.clone());
                    let msg = self.change_message(extent, epoch, offset, len, change, data);
                    sends.get_or_insert_with(|| (op, Vec::with_capacity(3))).1.push((node, msg));
                }
                Action::SendFlush { round, extent, epoch, node } => {
                    let msg = Message::ExtentFlush(ExtentFlush {
                        target: self.target(extent, epoch),
                        flush_number: round,
                    });
                    let me = self.clone();
                    later.push(Box::new(move || {
                        tokio::spawn(async move {
                            let r = me.call_retrying(node, msg).await.map(|_| ());
                            me.step_all([Event::FlushReply { round, extent, node, result: r }]);
                        });
                    }));
                }
                Action::Propose { extent, epoch, replicas } => {
                    let me = self.clone();
                    later.push(Box::new(move || {
                        tokio::spawn(async move {
                            tracing::warn!(volume = %me.volume, %extent, %epoch, ?replicas,
                                "a replica failed: removing it from the extent's set");
                            let r = me.propose_patiently(extent, epoch, replicas.clone()).await;
                            let ev = match r {
                                Ok(()) => {
                                    me.stats.degraded.fetch_add(1, Ordering::Relaxed);
                                    Event::Committed { extent, epoch, replicas }
                                }
                                Err(e) => {
                                    tracing::error!(volume = %me.volume, %extent, error = %e,
                                        "could not commit the smaller replica set: the requests waiting on it fail");
                                    Event::CommitFailed { extent, epoch }
                                }
                            };
                            me.step_all([ev]);
                        });
                    }));
                }
                Action::Fenced { generation } => {
                    tracing::error!(volume = %self.volume, ours = %self.generation, theirs = %generation,
                        "a replica has seen a newer owner generation: this node stops serving the volume");
                }
            }
        }
        flush_sends(&mut sends, later);
    }

    /// Sends one op's change to each of `calls`' nodes at once and steps
    /// the core with each reply as it comes.
    async fn send_all(self: Arc<Self>, op: OpId, mut calls: Vec<(NodeId, Message)>) {
        use futures::StreamExt;
        let me = self.io.me();
        // This node's copy goes after the frames to the others are queued:
        // the local write is the shorter leg, and its submission (a syscall
        // and the disk's doorbell) would delay the sends. R=3 QD1 4 KiB
        // writes, same session, 3 runs each: 4,381-4,452 IOPS with,
        // 3,533-4,648 without; QD32 level at 61-64 against 68-69 µs of CPU.
        calls.sort_by_key(|&(node, _)| node == me);
        let this = &self;
        let call = |(node, msg): (NodeId, Message)| async move {
            if node == me {
                crate::poll::yield_to_ready().await;
            }
            (node, this.call_retrying(node, msg).await.map(|_| ()))
        };
        if calls.len() == 1 {
            let (node, result) = call(calls.pop().expect("one call")).await;
            self.step_all([Event::Reply { op, node, result }]);
            return;
        }
        let mut replies: futures::stream::FuturesUnordered<_> = calls.into_iter().map(call).collect();
        while let Some((node, result)) = replies.next().await {
            self.step_all([Event::Reply { op, node, result }]);
        }
    }

    /// Proposes a replica set, retrying for a while: a commit fails
    /// while the metadata group elects a leader (the failed node may have
    /// led it), and requests wait on it rather than fail.
    async fn propose_patiently(
        &self,
        extent: ExtentIndex,
        epoch: Epoch,
        replicas: Vec<NodeId>,
    ) -> std::result::Result<(), String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            match self.io.propose(self.volume, extent, epoch, replicas.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    tracing::info!(volume = %self.volume, %extent, error = %e, "replica set not committed yet; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    fn change_message(
        &self,
        extent: ExtentIndex,
        epoch: Epoch,
        offset: u64,
        len: u64,
        change: Change,
        data: Option<Bytes>,
    ) -> Message {
        let target = self.target(extent, epoch);
        match change {
            Change::Write { fua } => Message::ExtentWrite(ExtentWrite {
                target,
                offset,
                fua,
                copy: false,
                data: data.unwrap_or_default(),
            }),
            Change::WriteZeroes { deallocate, fua } => {
                Message::ExtentWriteZeroes(ExtentWriteZeroes { target, offset, len, deallocate, fua })
            }
            Change::Trim { fua } => Message::ExtentTrim(ExtentTrim { target, offset, len, fua }),
        }
    }

    /// One request, retried while the replica says it does not know the
    /// volume yet (its copy of the metadata lags a just-created volume).
    async fn call_retrying(&self, node: NodeId, msg: Message) -> std::result::Result<Message, Failure> {
        let mut wait = Duration::from_millis(20);
        for attempt in 0.. {
            let r = self.io.call(node, msg.clone()).await;
            if let Ok(Message::ExtentErr(e)) = &r
                && e.error == ExtentError::NotFound
                && attempt < 8
            {
                tokio::time::sleep(wait).await;
                wait *= 2;
                continue;
            }
            return failure_of(r);
        }
        unreachable!()
    }

    /// Makes sure the extent is reconciled and installed in the core.
    async fn ensure(self: &Arc<Self>, extent: ExtentIndex) -> Result<()> {
        let cell = self.ready.lock().unwrap().entry(extent).or_default().clone();
        cell.get_or_try_init(|| {
            let me = self.clone();
            async move {
                // A task of its own: a dropped first request must not stop it half way.
                tokio::spawn(async move { me.reconcile(extent).await })
                    .await
                    .map_err(|e| unavailable(format!("reconciliation task failed: {e}")))?
            }
        })
        .await
        .map(|_| ())
    }

    /// Before this owner serves the extent: every member reports its dirty
    /// regions; one member's version of them goes to the others.
    async fn reconcile(self: Arc<Self>, extent: ExtentIndex) -> Result<()> {
        let (mut epoch, mut set) = self.io.view(self.volume, extent).ok_or_else(|| {
            unavailable(format!("extent {extent} of {} is not in the metadata", self.volume))
        })?;
        let size = self.layout.extent_size;
        let mut gone: Vec<NodeId> = Vec::new();
        // Some member may hold changes no flush covered (a predecessor's,
        // or copies made below): this owner's next FLUSH must reach them.
        let mut unflushed = false;
        // Statuses, plan, copies; again from fresh statuses of the others
        // when a source could not be read (a bad block there, or it went
        // away): the source leaves, not the replica it was copying to.
        let plan = loop {
            let mut reports = Vec::new();
            let ask: Vec<NodeId> = set.iter().copied().filter(|n| !gone.contains(n)).collect();
            for node in ask {
                let msg = Message::ExtentStatus(self.target(extent, epoch));
                match self.call_retrying(node, msg).await {
                    Ok(Message::ExtentStatusReply(s)) => reports.push(report_of(node, &s, size)),
                    Ok(other) => {
                        tracing::warn!(volume = %self.volume, %extent, %node, reply = ?other.kind(), "odd status reply");
                        gone.push(node);
                    }
                    Err(Failure::StaleGeneration(g)) => {
                        return Err(VolumeError::Unavailable(format!(
                            "a newer owner (generation {g}) took the volume"
                        )));
                    }
                    Err(f) => {
                        tracing::warn!(volume = %self.volume, %extent, %node, failure = ?f,
                        "replica unreachable at takeover: it leaves the set");
                        gone.push(node);
                    }
                }
            }
            unflushed |= reports.iter().any(|r| !r.dirty.is_empty());
            let plan = reconcile::plan(&reports, size, Some(self.io.me()));
            let mut bad_source = None;
            for copy in &plan {
                match self.copy(extent, epoch, copy).await {
                    Ok(()) => {}
                    Err((node, f)) if node == copy.source => {
                        tracing::warn!(volume = %self.volume, %extent, source = %node, failure = ?f,
                        "reconciliation could not read its source: it leaves the set, and the others report again");
                        bad_source = Some(node);
                        break;
                    }
                    Err((node, f)) => {
                        tracing::warn!(volume = %self.volume, %extent, target = %node, failure = ?f,
                        "reconciliation could not write a replica: it leaves the set");
                        gone.push(node);
                    }
                }
            }
            match bad_source {
                Some(node) => gone.push(node),
                None => break plan,
            }
        };
        // The source's version is now everyone's: make it durable there too
        // (a crash of the source must not take back what the others keep).
        let sources: std::collections::BTreeSet<NodeId> = plan.iter().map(|c| c.source).collect();
        for node in sources {
            let flush =
                Message::ExtentFlush(ExtentFlush { target: self.target(extent, epoch), flush_number: 0 });
            if let Err(f) = self.call_retrying(node, flush).await {
                tracing::warn!(volume = %self.volume, %extent, %node, failure = ?f,
                    "reconciliation could not flush its source: it leaves the set");
                gone.push(node);
            }
        }
        if !gone.is_empty() {
            let keep: Vec<NodeId> = set.iter().copied().filter(|n| !gone.contains(n)).collect();
            if keep.is_empty() {
                return Err(unavailable(format!("no replica of extent {extent} answered")));
            }
            let next = Epoch(epoch.0 + 1);
            self.propose_patiently(extent, next, keep.clone()).await.map_err(unavailable)?;
            self.stats.degraded.fetch_add(1, Ordering::Relaxed);
            (epoch, set) = (next, keep);
        }
        self.step_all([Event::View { extent, epoch, replicas: set }]);
        if unflushed {
            self.step_all([Event::Unflushed { extent }]);
        }
        Ok(())
    }

    /// Once per owner, before its first FLUSH completes: asks every data
    /// node which extents of the volume it holds that may carry a write no
    /// flush covered, then reconciles each (marking it for the next FLUSH
    /// round). An older owner may have acknowledged writes there and died
    /// before any FLUSH; without this, a FLUSH through this owner would
    /// succeed while they stayed unflushed on every replica, and a crash of
    /// every node would lose them (invariant 2: a FLUSH covers every write
    /// acknowledged before it, through any node). A node that cannot be
    /// asked is passed over: every acknowledged write is on each member of
    /// its set, so the ones that answer hold it, and the one that did not
    /// is reconciled before it serves that extent again (its crash record,
    /// or the status the next reconciliation asks of it). Runs in a task of
    /// its own (a dropped FLUSH does not stop it half way); a failure
    /// fails the FLUSH, and the next one tries again.
    async fn inherit(self: &Arc<Self>) -> Result<()> {
        // Every FLUSH passes here: once done, a load and nothing more.
        if self.inherited.initialized() {
            return Ok(());
        }
        let me = self.clone();
        self.inherited
            .get_or_try_init(|| async move {
                tokio::spawn(async move { me.inherit_now().await })
                    .await
                    .map_err(|e| unavailable(format!("the takeover's flush task failed: {e}")))?
            })
            .await
            .map(|_| ())
    }

    async fn inherit_now(self: Arc<Self>) -> Result<()> {
        let nodes = self.io.data_nodes();
        let lists = futures::future::join_all(nodes.iter().map(|&n| self.dirty_on(n))).await;
        let mut dirty = std::collections::BTreeSet::new();
        for (node, list) in nodes.iter().zip(lists) {
            match list {
                Ok(l) => dirty.extend(l),
                Err(Failure::StaleGeneration(g)) => {
                    return Err(unavailable(format!("a newer owner (generation {g}) took the volume")));
                }
                Err(f) => tracing::warn!(volume = %self.volume, %node, failure = ?f,
                    "cannot ask a node for the extents it may hold unflushed; passed over"),
            }
        }
        let known: Vec<ExtentIndex> =
            dirty.into_iter().filter(|&e| self.io.view(self.volume, e).is_some()).collect();
        if !known.is_empty() {
            tracing::info!(volume = %self.volume, extents = known.len(),
                "reconciling the extents an earlier owner may have left unflushed, for this owner's first flush");
        }
        // Eight at a time: each is a few round trips (statuses, crcs, a
        // flush), and a large volume may list thousands.
        use futures::StreamExt;
        let me = &self;
        let mut done = futures::stream::iter(known)
            .map(|extent| async move { me.ensure(extent).await.map(|()| extent) })
            .buffer_unordered(8);
        while let Some(r) = done.next().await {
            self.step_all([Event::Unflushed { extent: r? }]);
        }
        Ok(())
    }

    /// The extents of the volume `node` lists as maybe unflushed.
    async fn dirty_on(&self, node: NodeId) -> std::result::Result<Vec<ExtentIndex>, Failure> {
        let mut out = Vec::new();
        let mut from = ExtentIndex(0);
        loop {
            let q = ExtentsDirty { volume: self.volume, generation: self.generation, from };
            match self.call_retrying(node, Message::ExtentsDirty(q)).await? {
                Message::ExtentsDirtyReply(d) => {
                    // Increasing (the decoder checks); ones before `from` are ignored.
                    let last = d.extents.last().copied();
                    out.extend(d.extents.into_iter().filter(|e| *e >= from));
                    match last {
                        Some(l) if d.more && l >= from && l.0 < u64::MAX => from = ExtentIndex(l.0 + 1),
                        _ => return Ok(out),
                    }
                }
                other => {
                    tracing::warn!(volume = %self.volume, %node, reply = ?other.kind(), "odd dirty-extent reply");
                    return Err(Failure::Io);
                }
            }
        }
    }

    async fn copy(
        &self,
        extent: ExtentIndex,
        epoch: Epoch,
        c: &reconcile::Copy,
    ) -> std::result::Result<(), (NodeId, Failure)> {
        const CHUNK: u64 = 1 << 20;
        let target = self.target(extent, epoch);
        let ranges = if c.whole {
            self.whole_copy_ranges(c, target).await?
        } else {
            self.differing(c, target).await?
        };
        let from_source = |f| (c.source, f);
        let to_target = |f| (c.target, f);
        let end = ranges.last().map_or(0, |&(o, l)| o + l);
        for &(start, len) in &ranges {
            let mut at = start;
            while at < start + len {
                let n = CHUNK.min(start + len - at);
                let read = Message::ExtentRead(ExtentRead { target, offset: at, len: n as u32 });
                let data = match self.call_retrying(c.source, read).await.map_err(from_source)? {
                    Message::ExtentReadReply(r) => r.data,
                    _ => return Err((c.source, Failure::Io)),
                };
                // A whole copy's pieces are COPY writes, the last with FUA:
                // the target keeps the extent marked incomplete (absent to
                // the next reconciliation) until that one has made them all
                // durable.
                let last = at + n == end;
                let fua = c.whole && last;
                let write =
                    Message::ExtentWrite(ExtentWrite { target, offset: at, fua, copy: c.whole, data });
                self.call_retrying(c.target, write).await.map_err(to_target)?;
                self.stats.reconciled_bytes.fetch_add(n, Ordering::Relaxed);
                at += n;
            }
        }
        if !c.whole {
            let flush = Message::ExtentFlush(ExtentFlush { target, flush_number: 0 });
            self.call_retrying(c.target, flush).await.map_err(to_target)?;
        }
        tracing::info!(volume = %self.volume, %extent, from = %c.source, to = %c.target,
            ranges = ranges.len(), whole = c.whole, "reconciled a replica");
        Ok(())
    }

    /// What a copy of dirty regions sends: the blocks of `c.ranges` whose
    /// crc32c differs between the source and the target (from both block
    /// tables, 4 bytes per 4 KiB block, no data read). After an owner dies
    /// most dirty regions are the same on every member (what it
    /// acknowledged is on all of them; only what was in flight may
    /// differ), and a region's dirty bit stays set for many flushes after
    /// its last write, so copying every dirty region moved mostly identical
    /// data: a new owner's first FLUSH after 10 s of 4 KiB random writes to
    /// a 4 GiB volume copied all 4 GiB and took 8.3 s. A range that is not
    /// whole blocks, or whose crcs one side cannot give (a rotten table
    /// entry), is sent whole, as before. The target is flushed after the
    /// copies either way (`copy`), so what it already held is durable too.
    async fn differing(
        &self,
        c: &reconcile::Copy,
        target: ExtentTarget,
    ) -> std::result::Result<Vec<(u64, u64)>, (NodeId, Failure)> {
        const BLOCK: u64 = crate::storage::format::BLOCK;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |o: u64, l: u64| match out.last_mut() {
            Some(last) if last.0 + last.1 == o => last.1 += l,
            _ => out.push((o, l)),
        };
        for &(start, len) in &c.ranges {
            if !start.is_multiple_of(BLOCK) || !len.is_multiple_of(BLOCK) || len == 0 {
                push(start, len);
                continue;
            }
            let ask = |node: NodeId| {
                let msg = Message::ExtentCrcs(ExtentCrcs { target, offset: start, len });
                async move {
                    match self.call_retrying(node, msg).await {
                        Ok(Message::ExtentCrcsReply(BlockCrcs { block_size, crcs }))
                            if u64::from(block_size) == BLOCK && crcs.len() as u64 == len / BLOCK =>
                        {
                            Ok(Some(crcs))
                        }
                        // A rotten table entry, or an odd answer: the range goes whole.
                        Ok(_) | Err(Failure::Io) => Ok(None),
                        Err(f) => Err((node, f)),
                    }
                }
            };
            let (theirs, ours) = futures::future::join(ask(c.source), ask(c.target)).await;
            match (theirs?, ours?) {
                (Some(a), Some(b)) => {
                    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                        if x != y {
                            push(start + i as u64 * BLOCK, BLOCK);
                        }
                    }
                }
                _ => push(start, len),
            }
        }
        Ok(out)
    }

    /// What a whole copy sends: the runs of the source's extent that may
    /// hold data (its allocation map; holes and known zeros read as zeros
    /// on the target too), so the target stays as thin as the source and a
    /// takeover does not wait for the copy of a mostly empty extent. An
    /// empty source still sends its first block: the COPY with FUA that
    /// completes the target. The target is trimmed whole first, since an
    /// incomplete copy from an earlier attempt may hold data where this
    /// source has none (a trim of an extent it does not hold is nothing).
    async fn whole_copy_ranges(
        &self,
        c: &reconcile::Copy,
        target: ExtentTarget,
    ) -> std::result::Result<Vec<(u64, u64)>, (NodeId, Failure)> {
        let size = self.layout.extent_size;
        let trim = Message::ExtentTrim(ExtentTrim { target, offset: 0, len: size, fua: false });
        self.call_retrying(c.target, trim).await.map_err(|f| (c.target, f))?;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut at = 0;
        while at < size {
            let msg = Message::ExtentMap(ExtentMap { target, offset: at, len: size - at });
            let map = match self.call_retrying(c.source, msg).await.map_err(|f| (c.source, f))? {
                Message::ExtentMapReply(map) => checked_map(map, size - at).ok_or((c.source, Failure::Io))?,
                _ => return Err((c.source, Failure::Io)),
            };
            for m in map {
                if !m.state.zero {
                    match runs.last_mut() {
                        Some(last) if last.0 + last.1 == at => last.1 += m.len,
                        _ => runs.push((at, m.len)),
                    }
                }
                at += m.len;
            }
        }
        if runs.is_empty() {
            runs.push((0, crate::storage::format::BLOCK.min(size)));
        }
        Ok(runs)
    }

    fn new_op(inner: &mut Inner, slot: Slot) -> OpId {
        let op = OpId(inner.next_op);
        inner.next_op += 1;
        inner.slots.insert(op, slot);
        op
    }

    /// Changes of several extents (one request of the volume), submitted
    /// together so they keep one order against other requests; waits for
    /// all, then reports the first error.
    pub async fn change(
        self: &Arc<Self>,
        pieces: Vec<(ExtentIndex, u64, u64, Change, Option<Bytes>)>,
    ) -> Result<()> {
        self.check_serving().await?;
        for p in &pieces {
            self.ensure(p.0).await?;
        }
        let mut rx = Vec::with_capacity(pieces.len());
        let mut events = Vec::with_capacity(pieces.len());
        {
            let mut inner = self.inner.lock().unwrap();
            for (extent, offset, len, change, data) in pieces {
                let (tx, r) = oneshot::channel();
                let op = Self::new_op(&mut inner, Slot { done: Some(tx), grant: None, data });
                events.push(Event::Submit { op, extent, offset, len, change });
                rx.push(r);
            }
        }
        // The replicas' round trip is a long wait for the idle poller: it
        // sleeps meanwhile, so the CPU it would spin on is free for the
        // replicas (on a small machine they share it). R=3 demo, fio 4 KiB
        // random writes, perf stat on each node, interleaved A/B: QD32 54-55
        // against 59-61 us of CPU per write over the three nodes, IOPS level
        // (21.4-21.8k against 20.8-23.0k); QD1 178-204 against 285-294 us,
        // latency level (220-262 against 217-264 us).
        let _gate = crate::poll::LongOp::begin();
        self.step_all(events);
        let mut first = Ok(());
        for r in rx {
            let res = match r.await {
                Ok(r) => r.map_err(|e| VolumeError::Unavailable(e.to_string())),
                Err(_) => Err(unavailable("the request was dropped by its owner")),
            };
            if let (Err(e), Ok(())) = (res, &first) {
                first = Err(e);
            }
        }
        first
    }

    /// Every change acknowledged before this call is durable on every
    /// member of its extent's set.
    pub async fn flush(self: &Arc<Self>) -> Result<()> {
        self.check_serving().await?;
        self.inherit().await?;
        let (tx, rx) = oneshot::channel();
        let op =
            Self::new_op(&mut self.inner.lock().unwrap(), Slot { done: Some(tx), grant: None, data: None });
        self.step_all([Event::Flush { op }]);
        match rx.await {
            Ok(r) => r.map_err(|e| VolumeError::Unavailable(e.to_string())),
            Err(_) => Err(unavailable("the flush was dropped by its owner")),
        }
    }

    /// Reads `[offset, offset + len)` of the extent from one member: this
    /// node's if it is one, else the next in turn; on a checksum or I/O
    /// error from the next one, and the bad copy is repaired.
    pub async fn read(
        self: &Arc<Self>,
        extent: ExtentIndex,
        offset: u64,
        len: u64,
    ) -> Result<Vec<ReadChunk>> {
        self.check_serving().await?;
        self.ensure(extent).await?;
        let (epoch, members) = self.read_order(extent)?;
        let mut bad = Vec::new();
        for node in members {
            let msg = Message::ExtentRead(ExtentRead {
                target: self.target(extent, epoch),
                offset,
                len: len as u32,
            });
            match self.io.call(node, msg).await {
                Ok(Message::ExtentReadReply(r)) if r.data.len() as u64 == len => {
                    if !bad.is_empty() {
                        self.stats.read_failovers.fetch_add(1, Ordering::Relaxed);
                        for b in bad {
                            self.spawn_repair(extent, offset, len, b, node);
                        }
                    }
                    return Ok(vec![ReadChunk::Data(r.data)]);
                }
                Ok(Message::ExtentErr(e)) if matches!(e.error, ExtentError::StaleGeneration { .. }) => {
                    return Err(unavailable(format!("fenced: {}", e.message)));
                }
                Ok(Message::ExtentErr(e)) if matches!(e.error, ExtentError::Checksum | ExtentError::Io) => {
                    tracing::warn!(volume = %self.volume, %extent, %node, offset, len, error = %e.message,
                        "a replica failed a read: reading another and repairing this one");
                    bad.push(node);
                }
                other => {
                    tracing::warn!(volume = %self.volume, %extent, %node, reply = ?other.as_ref().map(|m| m.kind()),
                        "a replica did not answer a read: trying another");
                }
            }
        }
        Err(VolumeError::Unavailable(format!("no replica of extent {extent} could serve the read")))
    }

    /// Allocation map of `[offset, offset + len)` of the extent (`len`
    /// non-zero), from one member as a read would pick it: runs in order
    /// covering a prefix of the range, never empty.
    ///
    /// A run is reported as reading zeros only from a member the owner
    /// reads from: reconciled (before this owner's first request), in the
    /// committed set, not failed. Every change reaches every such member
    /// before it is acknowledged, so their contents are the same and one
    /// member's zeros are everyone's; a removed (stale) copy is never asked.
    /// When in doubt the range is data: no member answered, or an answer
    /// that does not fit the request (refused, logged).
    pub async fn block_status(
        self: &Arc<Self>,
        extent: ExtentIndex,
        offset: u64,
        len: u64,
    ) -> Result<Vec<MapExtent>> {
        self.check_serving().await?;
        self.ensure(extent).await?;
        let (epoch, members) = self.read_order(extent)?;
        for node in members {
            let msg = Message::ExtentMap(ExtentMap { target: self.target(extent, epoch), offset, len });
            match self.io.call(node, msg).await {
                Ok(Message::ExtentMapReply(map)) => match checked_map(map, len) {
                    Some(map) => return Ok(map),
                    None => tracing::warn!(volume = %self.volume, %extent, %node, offset, len,
                        "a replica's allocation map does not fit the range asked: trying another"),
                },
                Ok(Message::ExtentErr(e)) if matches!(e.error, ExtentError::StaleGeneration { .. }) => {
                    return Err(unavailable(format!("fenced: {}", e.message)));
                }
                other => {
                    tracing::debug!(volume = %self.volume, %extent, %node, reply = ?other.as_ref().map(|m| m.kind()),
                        "a replica did not answer an allocation map: trying another");
                }
            }
        }
        tracing::info!(volume = %self.volume, %extent, offset, len,
            "no replica answered an allocation map: the range is reported as data");
        Ok(vec![MapExtent { len, state: BlockState::DATA }])
    }

    /// Members in read order: this node first, then the others rotated.
    fn read_order(&self, extent: ExtentIndex) -> Result<(Epoch, Vec<NodeId>)> {
        let (epoch, mut members) = self
            .inner
            .lock()
            .unwrap()
            .core
            .read_set(extent)
            .ok_or_else(|| unavailable(format!("extent {extent} is not installed")))?;
        if members.is_empty() {
            return Err(unavailable(format!("no replica of extent {extent} is left")));
        }
        let me = self.io.me();
        if let Some(i) = members.iter().position(|n| *n == me) {
            members.swap(0, i);
            let k = members.len();
            let turn = self.reads.fetch_add(1, Ordering::Relaxed) as usize;
            if k > 2 {
                members[1..].rotate_left(turn % (k - 1));
            }
        } else {
            let turn = self.reads.fetch_add(1, Ordering::Relaxed) as usize;
            let k = members.len();
            members.rotate_left(turn % k);
        }
        Ok((epoch, members))
    }

    /// Rewrites `bad`'s copy of the range from `good`'s, holding the range
    /// so no change of it runs between the read and the rewrite.
    fn spawn_repair(self: &Arc<Self>, extent: ExtentIndex, offset: u64, len: u64, bad: NodeId, good: NodeId) {
        let me = self.clone();
        tokio::spawn(async move {
            let held = me.hold(extent, offset, len).await;
            let Ok((op, epoch, _)) = held else { return };
            let msg =
                Message::ExtentRead(ExtentRead { target: me.target(extent, epoch), offset, len: len as u32 });
            let then = match me.io.call(good, msg).await {
                Ok(Message::ExtentReadReply(r)) if r.data.len() as u64 == len => {
                    if let Some(s) = me.inner.lock().unwrap().slots.get_mut(&op) {
                        s.data = Some(r.data);
                    }
                    Then::Change { change: Change::Write { fua: true }, only: Some(bad) }
                }
                _ => Then::Release,
            };
            let rx = me.release(op, then);
            if matches!(rx.await, Ok(Ok(()))) && then != Then::Release {
                me.stats.repairs.fetch_add(1, Ordering::Relaxed);
                tracing::info!(volume = %me.volume, %extent, node = %bad, offset, len, "repaired a bad copy");
            }
        });
    }

    /// Takes the range of the extent to itself (see `Event::SubmitExclusive`).
    async fn hold(
        self: &Arc<Self>,
        extent: ExtentIndex,
        offset: u64,
        len: u64,
    ) -> Result<(OpId, Epoch, Vec<NodeId>)> {
        let (gtx, grx) = oneshot::channel();
        let op =
            Self::new_op(&mut self.inner.lock().unwrap(), Slot { done: None, grant: Some(gtx), data: None });
        self.step_all([Event::SubmitExclusive { op, extent, offset, len }]);
        // The sender goes with the slot if the request fails before the grant.
        let (epoch, members) =
            grx.await.map_err(|_| unavailable("the range could not be held (owner fenced?)"))?;
        Ok((op, epoch, members))
    }

    /// Ends a hold; the receiver reports the change's outcome.
    fn release(
        self: &Arc<Self>,
        op: OpId,
        then: Then,
    ) -> oneshot::Receiver<std::result::Result<(), OpError>> {
        let (tx, rx) = oneshot::channel();
        if let Some(s) = self.inner.lock().unwrap().slots.get_mut(&op) {
            s.done = Some(tx);
        }
        self.step_all([Event::Held { op, then }]);
        rx
    }

    /// COMPARE AND WRITE within one extent: the range is held from the read
    /// to the end of the write.
    pub async fn compare_and_write(
        self: &Arc<Self>,
        extent: ExtentIndex,
        offset: u64,
        compare: Bytes,
        data: Bytes,
        fua: bool,
    ) -> Result<Option<u64>> {
        self.check_serving().await?;
        // A task of its own: a caller dropped between the hold and its
        // release (a client gone, a timeout) would leave the range held and
        // every later request to it waiting.
        let me = self.clone();
        tokio::spawn(async move { me.compare_and_write_held(extent, offset, compare, data, fua).await })
            .await
            .unwrap_or_else(|e| Err(unavailable(format!("the compare and write task failed: {e}"))))
    }

    async fn compare_and_write_held(
        self: Arc<Self>,
        extent: ExtentIndex,
        offset: u64,
        compare: Bytes,
        data: Bytes,
        fua: bool,
    ) -> Result<Option<u64>> {
        self.ensure(extent).await?;
        let len = data.len() as u64;
        let (op, epoch, members) = self.hold(extent, offset, len).await?;
        let mut found: Option<Result<Option<u64>>> = None;
        for node in &members {
            let msg = Message::ExtentRead(ExtentRead {
                target: self.target(extent, epoch),
                offset,
                len: len as u32,
            });
            if let Ok(Message::ExtentReadReply(r)) = self.io.call(*node, msg).await
                && r.data.len() as u64 == len
            {
                found =
                    Some(Ok(r.data.iter().zip(compare.iter()).position(|(a, b)| a != b).map(|p| p as u64)));
                break;
            }
        }
        let found = found.unwrap_or_else(|| Err(unavailable("no replica could serve the compare")));
        let then = match &found {
            Ok(None) => {
                if let Some(s) = self.inner.lock().unwrap().slots.get_mut(&op) {
                    s.data = Some(data);
                }
                Then::Change { change: Change::Write { fua }, only: None }
            }
            _ => Then::Release,
        };
        let r = self.release(op, then).await.unwrap_or(Err(OpError::Metadata(extent)));
        let found = found?;
        r.map_err(|e| VolumeError::Unavailable(e.to_string()))?;
        Ok(found)
    }
}

impl Replicated {
    /// A write at any byte offset within one extent (`data` non-empty), for
    /// clients held to no block size: the whole sectors it touches are held
    /// exclusive (as COMPARE AND WRITE holds its range), the partial first
    /// and last read from one member and patched, and the whole span
    /// written to every member before the hold ends. It runs in a task of
    /// its own: a caller that goes away must not leave the range held, or
    /// the patch half sent.
    pub async fn write_unaligned(
        self: &Arc<Self>,
        extent: ExtentIndex,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<()> {
        self.check_serving().await?;
        self.ensure(extent).await?;
        let me = self.clone();
        tokio::spawn(async move { me.patch(extent, offset, data, fua).await })
            .await
            .unwrap_or_else(|e| Err(unavailable(format!("an unaligned write's task failed: {e}"))))
    }

    async fn patch(self: &Arc<Self>, extent: ExtentIndex, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        const SECTOR: u64 = super::volume::MIN_BLOCK;
        let end = offset + data.len() as u64;
        let span = offset / SECTOR * SECTOR..end.div_ceil(SECTOR) * SECTOR;
        let (op, epoch, members) = self.hold(extent, span.start, span.end - span.start).await?;
        let mut buf = vec![0u8; (span.end - span.start) as usize];
        let mut edges = vec![span.start];
        if span.end - SECTOR != span.start {
            edges.push(span.end - SECTOR);
        }
        let mut read = Ok(());
        for at in edges {
            let old = self.read_members(extent, epoch, &members, at, SECTOR).await;
            match old {
                Some(old) => {
                    let i = (at - span.start) as usize;
                    buf[i..i + SECTOR as usize].copy_from_slice(&old);
                }
                None => {
                    read = Err(unavailable("no replica could serve the read of an unaligned write"));
                    break;
                }
            }
        }
        let then = if read.is_ok() {
            let i = (offset - span.start) as usize;
            buf[i..i + data.len()].copy_from_slice(&data);
            if let Some(s) = self.inner.lock().unwrap().slots.get_mut(&op) {
                s.data = Some(Bytes::from(buf));
            }
            Then::Change { change: Change::Write { fua }, only: None }
        } else {
            Then::Release
        };
        let r = self.release(op, then).await.unwrap_or(Err(OpError::Metadata(extent)));
        read?;
        r.map_err(|e| VolumeError::Unavailable(e.to_string()))
    }

    /// `[offset, offset + len)` of the extent from the first of `members`
    /// that serves it whole.
    async fn read_members(
        &self,
        extent: ExtentIndex,
        epoch: Epoch,
        members: &[NodeId],
        offset: u64,
        len: u64,
    ) -> Option<Bytes> {
        for node in members {
            let msg = Message::ExtentRead(ExtentRead {
                target: self.target(extent, epoch),
                offset,
                len: len as u32,
            });
            if let Ok(Message::ExtentReadReply(r)) = self.io.call(*node, msg).await
                && r.data.len() as u64 == len
            {
                return Some(r.data);
            }
        }
        None
    }
}

/// A replica's map of a `len`-byte range if it is one: non-empty runs of
/// whole sectors, in all no longer than the range.
fn checked_map(map: Vec<MapExtent>, len: u64) -> Option<Vec<MapExtent>> {
    let sector = super::volume::MIN_BLOCK;
    let whole = map.iter().all(|m| m.len > 0 && m.len.is_multiple_of(sector));
    let covered = map.iter().try_fold(0u64, |sum, m| sum.checked_add(m.len))?;
    (whole && covered > 0 && covered <= len).then_some(map)
}

/// The reconcile report of one replica's status reply.
fn report_of(node: NodeId, s: &crate::proto::peer::ExtentState, extent_size: u64) -> Report {
    let size = u64::from(s.region_size);
    let dirty = s.dirty_regions.iter().map(|&r| (u64::from(r) * size, size)).collect();
    // A region list that cannot be used (a zero region size with regions)
    // costs a whole copy, never a skipped one.
    let dirty = if size == 0 && !s.dirty_regions.is_empty() { vec![(0, extent_size)] } else { dirty };
    Report { node, exists: s.exists, dirty }
}
