//! The Raft driver without I/O of its own: one node's RawNode, its store
//! and its state machine, advanced by calls.
//!
//! Owns the Ready cycle (persist, then hand out messages; apply committed
//! entries and membership changes; install snapshots; compact), the
//! leader's duties that the log records (bootstrap, node liveness, promoting
//! learners) and the request ids of this node's proposals. Time is a tick
//! counter, so the same code runs under the tokio shell (`node`) and under
//! the deterministic simulator (tests/meta_sim.rs).
//!
//! Never: sleeps, reads a clock, opens a socket, or sends a message itself
//! (messages come back for the caller to send: a leader's appends before
//! its own fsync if the caller wants them early, everything that promises
//! something only after the writes it depends on are durable).

// raft's protobuf messages are built field by field, as raft-rs does.
#![allow(clippy::field_reassign_with_default)]

use super::state::{
    ApplyOutcome, ClusterId, Command, MetaState, NodeSpec, NodeState, Proposal, Rejection, ReplicaCheck,
    RequestId, Role, decode_proposal, encode_proposal,
};
use super::store::LogStore;
use super::{MetaError, MetaStatus, RaftRole};
use crate::types::NodeId;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfChangeV2, EntryType, Message, SnapshotMetadata};
use raft::{RawNode, StateRole};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The largest encoded command the log takes. Commands are small (a node
/// spec, a volume spec, a replica list); this keeps a hostile or broken
/// caller from putting megabytes into every node's log and snapshot.
pub const MAX_PROPOSAL_BYTES: usize = 64 << 10;

/// Raft timings and the metadata group's policies, in ticks.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub id: NodeId,
    /// Ticks without a leader before a follower campaigns (raft-rs
    /// randomises between this and twice this).
    pub election_ticks: usize,
    /// Ticks between the leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Take a snapshot and compact the log after this many applied entries.
    pub snapshot_interval: u64,
    /// Entries kept below a snapshot, so a follower just behind catches up
    /// from the log rather than by snapshot.
    pub retain_entries: u64,
    /// Learners are promoted while there are fewer voters than this (1, 3 or 5).
    pub max_voters: usize,
    /// Ticks without a heartbeat after which the leader commits a node as down.
    pub liveness_ticks: u64,
    /// raft-rs draws each election timeout from [min, max) with its own
    /// unseeded thread_rng; 0 means [election_ticks, 2 * election_ticks).
    /// The simulator pins a one-value range per node so its runs replay.
    pub min_election_ticks: usize,
    pub max_election_ticks: usize,
}

impl CoreConfig {
    pub fn new(id: NodeId) -> Self {
        CoreConfig {
            id,
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_interval: 1000,
            retain_entries: 200,
            max_voters: 3,
            liveness_ticks: 50,
            min_election_ticks: 0,
            max_election_ticks: 0,
        }
    }

    /// Names the first bad field.
    pub fn validate(&self) -> Result<(), MetaError> {
        let bad = |field, reason| Err(MetaError::InvalidConfig { field, reason });
        if self.id.0 == 0 {
            return bad("id", "node id 0 is reserved");
        }
        if self.heartbeat_ticks == 0 {
            return bad("heartbeat_ticks", "must be at least 1");
        }
        if self.election_ticks <= self.heartbeat_ticks {
            return bad("election_ticks", "must be above heartbeat_ticks");
        }
        if self.snapshot_interval == 0 {
            return bad("snapshot_interval", "must be at least 1");
        }
        if ![1, 3, 5].contains(&self.max_voters) {
            return bad("max_voters", "must be 1, 3 or 5");
        }
        if self.liveness_ticks <= self.election_ticks as u64 {
            return bad("liveness_ticks", "must be above election_ticks");
        }
        Ok(())
    }
}

/// What a node tells the leader in its heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub spec: NodeSpec,
    pub used: u64,
}

/// One log entry this node applied.
#[derive(Debug, Clone)]
pub struct Applied {
    pub index: u64,
    pub term: u64,
    /// The entry's bytes (a proposal or a membership change; empty for a
    /// new leader's no-op).
    pub data: bytes::Bytes,
    /// The request it carried, if any.
    pub request: Option<RequestId>,
    pub outcome: Result<ApplyOutcome, Rejection>,
}

/// What one turn of the Ready cycle hands back to the caller.
#[derive(Debug, Default)]
pub struct ReadyOutput {
    /// To send now: what they depend on is already durable (with
    /// `handle_ready_with`, minus what went early).
    pub messages: Vec<Message>,
    /// Entries applied in this turn, in log order.
    pub applied: Vec<Applied>,
    /// Read-index answers: (request context, index to wait for).
    pub reads: Vec<(u64, u64)>,
    /// A leader's snapshot replaced the state (its index).
    pub snapshot_installed: Option<u64>,
}

/// Kinds of proposals the leader makes on its own, for throttling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Duty {
    Register,
    Liveness,
    Used,
}

/// Context of a membership change entry: the request it belongs to.
fn encode_request(r: &RequestId) -> Vec<u8> {
    postcard::to_allocvec(r).expect("postcard encode of a request id")
}

fn decode_request(b: &[u8]) -> Option<RequestId> {
    postcard::from_bytes(b).ok()
}

/// How far `used` must move before the leader records it: the log grows
/// with real change, not with every written block.
fn used_changed(old: u64, new: u64, capacity: u64) -> bool {
    old.abs_diff(new) >= (capacity / 100).max(1 << 30)
}

fn sorted_ids(ids: &[u64]) -> Vec<NodeId> {
    let mut v: Vec<NodeId> = ids.iter().map(|&i| NodeId(i)).collect();
    v.sort_unstable();
    v
}

/// One metadata node's Raft state machine and store, without I/O.
pub struct MetaCore<S: LogStore> {
    cfg: CoreConfig,
    raw: RawNode<S>,
    state: Arc<MetaState>,
    check: Box<dyn ReplicaCheck + Send + Sync>,
    incarnation: u64,
    next_seq: u64,
    last_snapshot: u64,
    /// A membership change applied since the last snapshot.
    conf_changed: bool,
    ticks: u64,
    /// Leader only: when it became leader, and when it last heard each node.
    leader_since: Option<u64>,
    heard: BTreeMap<NodeId, u64>,
    reports: BTreeMap<NodeId, NodeReport>,
    duties: BTreeMap<(NodeId, Duty), u64>,
    last_promotion: u64,
    last_bootstrap: u64,
    /// The cluster id this node proposes if it leads an unbootstrapped cluster.
    bootstrap: Option<(ClusterId, String)>,
}

impl<S: LogStore> std::fmt::Debug for MetaCore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaCore").field("id", &self.cfg.id).field("status", &self.status()).finish()
    }
}

/// The state an initial member's bootstrap snapshot holds.
pub fn initial_state_data(voters: &[NodeId]) -> Vec<u8> {
    let mut s = MetaState::new();
    let ids: Vec<u64> = voters.iter().map(|v| v.0).collect();
    s.set_members(&ids, &[]);
    s.set_applied(1);
    s.encode_snapshot()
}

/// Writes the bootstrap snapshot of an initial member into an empty store.
/// Every initial member must be given the same `voters`.
pub fn bootstrap_store<S: LogStore>(store: &mut S, voters: &[NodeId]) -> Result<(), MetaError> {
    if voters.is_empty() {
        return Err(MetaError::InvalidConfig {
            field: "initial_members",
            reason: "must list at least one node",
        });
    }
    let ids: Vec<u64> = voters.iter().map(|v| v.0).collect();
    store.bootstrap(&ids, initial_state_data(voters)).map_err(|e| match e {
        super::store::StoreError::AlreadyInitialized => MetaError::AlreadyBootstrapped,
        e => MetaError::Store(e),
    })
}

impl<S: LogStore> MetaCore<S> {
    /// Opens a node on `store`: from its snapshot and log if it has them,
    /// empty (a joining node, waiting for its leader's snapshot) if not.
    pub fn open(
        cfg: CoreConfig,
        store: S,
        check: Box<dyn ReplicaCheck + Send + Sync>,
        logger: &slog::Logger,
    ) -> Result<Self, MetaError> {
        cfg.validate()?;
        let snap = store.latest_snapshot();
        let snap_index = snap.get_metadata().index;
        let state = if store.is_initialized() {
            let mut s = MetaState::decode_snapshot(&snap.data).map_err(MetaError::CorruptSnapshot)?;
            let cs = snap.get_metadata().get_conf_state();
            s.set_members(&cs.voters, &cs.learners);
            s.set_applied(snap_index);
            s
        } else {
            MetaState::new()
        };
        let raft_cfg = raft::Config {
            id: cfg.id.0,
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied: snap_index,
            // A partitioned leader steps down, so a minority refuses writes
            // (NoLeader) instead of accepting proposals that never commit;
            // pre-vote keeps a rejoining node from disrupting the term.
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            min_election_tick: cfg.min_election_ticks,
            max_election_tick: cfg.max_election_ticks,
            ..Default::default()
        };
        raft_cfg.validate().map_err(MetaError::Raft)?;
        let incarnation = store.incarnation();
        let raw = RawNode::new(&raft_cfg, store, logger).map_err(MetaError::Raft)?;
        Ok(MetaCore {
            cfg,
            raw,
            state: Arc::new(state),
            check,
            incarnation,
            next_seq: 0,
            last_snapshot: snap_index,
            conf_changed: false,
            ticks: 0,
            leader_since: None,
            heard: BTreeMap::new(),
            reports: BTreeMap::new(),
            duties: BTreeMap::new(),
            last_promotion: 0,
            last_bootstrap: 0,
            bootstrap: None,
        })
    }

    /// The cluster id to propose when this node leads a cluster that has none yet.
    pub fn set_bootstrap_candidate(&mut self, cluster: ClusterId, name: String) {
        self.bootstrap = Some((cluster, name));
    }

    pub fn id(&self) -> NodeId {
        self.cfg.id
    }
    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }
    pub fn state(&self) -> &Arc<MetaState> {
        &self.state
    }
    pub fn store(&self) -> &S {
        self.raw.store()
    }
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }
    pub fn leader(&self) -> Option<NodeId> {
        let l = self.raw.raft.leader_id;
        (l != raft::INVALID_ID).then_some(NodeId(l))
    }
    pub fn ticks(&self) -> u64 {
        self.ticks
    }

    pub fn status(&self) -> MetaStatus {
        let r = &self.raw.raft;
        let cs = r.prs().conf().to_conf_state();
        let (first, last) = self.raw.store().log_bounds();
        MetaStatus {
            id: self.cfg.id,
            term: r.term,
            leader: self.leader(),
            role: match r.state {
                StateRole::Leader => RaftRole::Leader,
                StateRole::Candidate | StateRole::PreCandidate => RaftRole::Candidate,
                StateRole::Follower if cs.learners.contains(&self.cfg.id.0) => RaftRole::Learner,
                StateRole::Follower => RaftRole::Follower,
            },
            commit_index: r.raft_log.committed,
            applied_index: self.state.applied_index(),
            voters: sorted_ids(&cs.voters),
            learners: sorted_ids(&cs.learners),
            log_first: first,
            log_last: last.max(r.raft_log.last_index()),
            snapshot_index: self.last_snapshot,
        }
    }

    /// Whether `req` was made by this run of the node (not one replayed
    /// from the log of an earlier run).
    pub fn is_own_request(&self, req: RequestId) -> bool {
        req.origin == self.cfg.id && req.seq >> 32 == self.incarnation
    }

    /// A fresh request id: unique across restarts, because the store's
    /// incarnation grows at every open.
    pub fn next_request(&mut self) -> RequestId {
        self.next_seq += 1;
        RequestId { origin: self.cfg.id, seq: (self.incarnation << 32) | (self.next_seq & 0xffff_ffff) }
    }

    /// Advances the logical clock by one tick; a leader also does its duties.
    pub fn tick(&mut self) {
        self.ticks += 1;
        self.raw.tick();
        match (self.is_leader(), self.leader_since) {
            (true, None) => {
                // Everyone gets a full liveness timeout from now on.
                self.leader_since = Some(self.ticks);
                self.heard.clear();
                self.duties.clear();
            }
            (false, Some(_)) => self.leader_since = None,
            _ => {}
        }
        if self.is_leader() {
            self.leader_duties();
        }
    }

    /// Hands a message from a peer to Raft.
    pub fn step(&mut self, msg: Message) -> Result<(), MetaError> {
        self.raw.step(msg).map_err(MetaError::Raft)
    }

    /// Proposes a command; a follower passes it to the leader (raft-rs
    /// forwards proposals). Whether it commits shows when it is applied.
    /// A proposal over [`MAX_PROPOSAL_BYTES`] is refused before the log.
    pub fn propose(&mut self, p: &Proposal) -> Result<(), MetaError> {
        let data = encode_proposal(p);
        if data.len() > MAX_PROPOSAL_BYTES {
            return Err(MetaError::ProposalTooLarge { len: data.len(), max: MAX_PROPOSAL_BYTES });
        }
        self.raw.propose(vec![], data).map_err(|e| match e {
            raft::Error::ProposalDropped => MetaError::NoLeader,
            e => MetaError::Raft(e),
        })
    }

    /// Proposes a membership change for `node`.
    pub fn propose_membership(
        &mut self,
        request: RequestId,
        kind: ConfChangeType,
        node: NodeId,
    ) -> Result<(), MetaError> {
        let mut cc = ConfChange::default();
        cc.set_change_type(kind);
        cc.node_id = node.0;
        cc.context = encode_request(&request).into();
        self.raw.propose_conf_change(vec![], cc).map_err(|e| match e {
            raft::Error::ProposalDropped => MetaError::NoLeader,
            e => MetaError::Raft(e),
        })
    }

    /// Tells Raft how sending a snapshot to `to` went.
    pub fn report_snapshot(&mut self, to: NodeId, ok: bool) {
        let status = if ok { raft::SnapshotStatus::Finish } else { raft::SnapshotStatus::Failure };
        self.raw.report_snapshot(to.0, status);
    }

    /// Tells Raft that `to` could not be reached.
    pub fn report_unreachable(&mut self, to: NodeId) {
        self.raw.report_unreachable(to.0);
    }

    /// Asks for a read index; the answer comes back in [`ReadyOutput::reads`] with `ctx`.
    pub fn read_index(&mut self, ctx: u64) {
        self.raw.read_index(ctx.to_le_bytes().to_vec());
    }

    /// A node's heartbeat reached this node (the leader).
    pub fn on_heartbeat(&mut self, report: NodeReport) {
        if !self.is_leader() {
            return;
        }
        let id = report.spec.id;
        self.heard.insert(id, self.ticks);
        self.reports.insert(id, report);
    }

    fn duty_due(&mut self, node: NodeId, duty: Duty) -> bool {
        let now = self.ticks;
        let every = self.cfg.election_ticks as u64;
        match self.duties.get(&(node, duty)) {
            Some(&t) if now < t + every => false,
            _ => {
                self.duties.insert((node, duty), now);
                true
            }
        }
    }

    fn propose_internal(&mut self, command: Command) {
        let request = self.next_request();
        // A leader that cannot propose has just lost leadership; the next
        // leader does the duty.
        let _ = self.propose(&Proposal { request, command });
    }

    fn leader_duties(&mut self) {
        let now = self.ticks;
        let every = self.cfg.election_ticks as u64;
        let state = Arc::clone(&self.state);
        if state.cluster().is_none() {
            if let Some((cluster, name)) = self.bootstrap.clone()
                && (self.last_bootstrap == 0 || now >= self.last_bootstrap + every)
            {
                self.last_bootstrap = now;
                self.propose_internal(Command::Bootstrap { cluster, name });
            }
            return;
        }
        // Registration and usage, from the heartbeats of members.
        let reports: Vec<NodeReport> = self.reports.values().cloned().collect();
        for r in reports {
            let id = r.spec.id;
            if state.role(id).is_none() {
                continue;
            }
            match state.node(id) {
                None => {
                    if self.duty_due(id, Duty::Register) {
                        self.propose_internal(Command::AddNode { spec: r.spec.clone() });
                    }
                }
                Some(n) if n.spec != r.spec => {
                    if self.duty_due(id, Duty::Register) {
                        self.propose_internal(Command::UpdateNode { spec: r.spec.clone() });
                    }
                }
                Some(n) if used_changed(n.used, r.used, n.spec.capacity) => {
                    if self.duty_due(id, Duty::Used) {
                        self.propose_internal(Command::SetNodeUsed { node: id, used: r.used });
                    }
                }
                Some(_) => {}
            }
        }
        // Liveness: a node is up while the leader hears from it.
        let since = self.leader_since.unwrap_or(now);
        let nodes: Vec<(NodeId, NodeState)> = state.nodes().map(|n| (n.spec.id, n.state)).collect();
        for (id, current) in nodes {
            let heard =
                if id == self.cfg.id { now } else { self.heard.get(&id).copied().unwrap_or(0).max(since) };
            let want = if now.saturating_sub(heard) < self.cfg.liveness_ticks {
                NodeState::Up
            } else {
                NodeState::Down
            };
            if want != current && self.duty_due(id, Duty::Liveness) {
                self.propose_internal(Command::SetNodeState { node: id, state: want });
            }
        }
        // Promotion: a caught-up, live learner becomes a voter while there are too few.
        if now >= self.last_promotion + every && !self.raw.raft.has_pending_conf() {
            let conf = self.raw.raft.prs().conf().to_conf_state();
            if conf.voters.len() < self.cfg.max_voters {
                let committed = self.raw.raft.raft_log.committed;
                let mut learners = conf.learners.clone();
                learners.sort_unstable();
                let ready = learners.into_iter().map(NodeId).find(|l| {
                    let caught_up = self.raw.raft.prs().get(l.0).is_some_and(|p| p.matched >= committed);
                    let up = state.node(*l).is_some_and(|n| n.state == NodeState::Up);
                    caught_up && up
                });
                if let Some(l) = ready {
                    self.last_promotion = now;
                    let request = self.next_request();
                    let _ = self.propose_membership(request, ConfChangeType::AddNode, l);
                }
            }
        }
    }

    /// One turn of the Ready cycle. Call until [`Self::has_ready`] is false.
    /// Every message comes back in the output, after this turn's writes.
    pub fn handle_ready(&mut self) -> Result<ReadyOutput, MetaError> {
        let mut held = Vec::new();
        let mut out = self.handle_ready_with(&mut |m| held.push(m))?;
        held.append(&mut out.messages);
        out.messages = held;
        Ok(out)
    }

    /// [`Self::handle_ready`], handing a leader's appends and heartbeats to
    /// `early` before this turn's fsync, so followers write in parallel
    /// with the leader (raft thesis 10.2.1: the leader counts itself only
    /// once its own write is durable). Nothing a follower or candidate
    /// sends (votes, acknowledgements) goes early: those are in the output,
    /// after the writes they promise.
    pub fn handle_ready_with(&mut self, early: &mut dyn FnMut(Message)) -> Result<ReadyOutput, MetaError> {
        let mut out = ReadyOutput::default();
        if !self.raw.has_ready() {
            return Ok(out);
        }
        let mut rd = self.raw.ready();
        for m in rd.take_messages() {
            self.note_sent(&m);
            early(m);
        }
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            let mut s = MetaState::decode_snapshot(&snap.data).map_err(MetaError::CorruptSnapshot)?;
            let meta = snap.get_metadata();
            s.set_members(&meta.get_conf_state().voters, &meta.get_conf_state().learners);
            s.set_applied(meta.index);
            self.raw.mut_store().install_snapshot(&snap)?;
            self.state = Arc::new(s);
            self.last_snapshot = meta.index;
            out.snapshot_installed = Some(meta.index);
        }
        self.apply_entries(rd.take_committed_entries(), &mut out);
        self.raw.mut_store().append(rd.entries(), rd.hs())?;
        out.messages.extend(rd.take_persisted_messages());
        for rs in rd.take_read_states() {
            if let Ok(b) = <[u8; 8]>::try_from(&rs.request_ctx[..]) {
                out.reads.push((u64::from_le_bytes(b), rs.index));
            }
        }
        let mut light = self.raw.advance_append(rd);
        if let Some(c) = light.commit_index() {
            self.raw.mut_store().set_commit(c);
        }
        out.messages.extend(light.take_messages());
        self.apply_entries(light.take_committed_entries(), &mut out);
        self.raw.advance_apply_to(self.state.applied_index());
        self.maybe_compact()?;
        let msgs = std::mem::take(&mut out.messages);
        for m in &msgs {
            self.note_sent(m);
        }
        out.messages = msgs;
        Ok(out)
    }

    /// Transports are best effort: a snapshot handed out counts as sent.
    /// If it was lost, the follower rejects the next append and the leader
    /// sends it again; left in "sending", it would wait forever.
    fn note_sent(&mut self, m: &Message) {
        if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
            self.raw.report_snapshot(m.to, raft::SnapshotStatus::Finish);
        }
    }

    pub fn has_ready(&self) -> bool {
        self.raw.has_ready()
    }

    fn apply_entries(&mut self, entries: Vec<raft::eraftpb::Entry>, out: &mut ReadyOutput) {
        if entries.is_empty() {
            return;
        }
        let state = Arc::make_mut(&mut self.state);
        for e in entries {
            let index = e.index;
            let (request, outcome) = match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => {
                    state.set_applied(index);
                    out.applied.push(Applied {
                        index,
                        term: e.term,
                        data: e.data,
                        request: None,
                        outcome: Ok(ApplyOutcome::Noop),
                    });
                    continue;
                }
                EntryType::EntryNormal => match decode_proposal(&e.data) {
                    Some(p) => (Some(p.request), state.apply(index, &p, self.check.as_ref())),
                    None => {
                        tracing::error!(
                            index,
                            "metadata log entry does not decode; skipped on every node alike"
                        );
                        state.set_applied(index);
                        (None, Err(Rejection::Undecodable))
                    }
                },
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    let cc = if e.get_entry_type() == EntryType::EntryConfChange {
                        ConfChange::parse_from_bytes(&e.data).ok().map(AnyConfChange::V1)
                    } else {
                        ConfChangeV2::parse_from_bytes(&e.data).ok().map(AnyConfChange::V2)
                    };
                    let Some(cc) = cc else {
                        state.set_applied(index);
                        out.applied.push(Applied {
                            index,
                            term: e.term,
                            data: e.data,
                            request: None,
                            outcome: Err(Rejection::Undecodable),
                        });
                        continue;
                    };
                    let raw = &mut self.raw;
                    let conf_changed = &mut self.conf_changed;
                    let mut change = |s: &mut MetaState| {
                        let applied = match &cc {
                            AnyConfChange::V1(c) => raw.apply_conf_change(c),
                            AnyConfChange::V2(c) => raw.apply_conf_change(c),
                        };
                        match applied {
                            Ok(cs) => {
                                *conf_changed = true;
                                s.set_members(&cs.voters, &cs.learners);
                                Ok(ApplyOutcome::MembershipChanged(s.members().clone()))
                            }
                            Err(err) => Err(Rejection::ConfChange(err.to_string())),
                        }
                    };
                    match decode_request(cc.context()) {
                        Some(r) => (Some(r), state.apply_with(index, r, change)),
                        None => {
                            state.set_applied(index);
                            (None, change(state))
                        }
                    }
                }
            };
            out.applied.push(Applied { index, term: e.term, data: e.data, request, outcome });
        }
    }

    /// Snapshots every `snapshot_interval` applied entries and compacts
    /// the log; also after every membership change, without compacting, so
    /// the snapshot a new member is sent always names it (raft-rs ignores a
    /// snapshot whose conf state does not contain the receiver).
    fn maybe_compact(&mut self) -> Result<(), MetaError> {
        let applied = self.state.applied_index();
        let due = applied >= self.last_snapshot + self.cfg.snapshot_interval;
        let conf_changed = std::mem::take(&mut self.conf_changed);
        if !(due || conf_changed && applied > self.last_snapshot) {
            return Ok(());
        }
        let term = self.raw.raft.raft_log.term(applied).map_err(MetaError::Raft)?;
        let mut meta = SnapshotMetadata::default();
        meta.index = applied;
        meta.term = term;
        meta.set_conf_state(self.raw.raft.prs().conf().to_conf_state());
        let (first, _) = self.raw.store().log_bounds();
        let compact_to =
            if due { (applied + 1).saturating_sub(self.cfg.retain_entries).max(first) } else { first };
        let data = self.state.encode_snapshot();
        self.raw.mut_store().save_snapshot(meta, data, compact_to)?;
        self.last_snapshot = applied;
        tracing::debug!(node = %self.cfg.id, index = applied, compact_to, "metadata snapshot taken");
        Ok(())
    }

    /// The Raft role this node holds in the applied membership.
    pub fn role(&self) -> Option<Role> {
        self.state.role(self.cfg.id)
    }
}

enum AnyConfChange {
    V1(ConfChange),
    V2(ConfChangeV2),
}

impl AnyConfChange {
    fn context(&self) -> &[u8] {
        match self {
            AnyConfChange::V1(c) => &c.context,
            AnyConfChange::V2(c) => &c.context,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::node::MetaConfig;
    use std::time::Duration;

    fn field(e: MetaError) -> &'static str {
        match e {
            MetaError::InvalidConfig { field, .. } => field,
            other => panic!("not a config error: {other:?}"),
        }
    }

    #[test]
    fn config_validation_names_the_bad_field() {
        assert!(CoreConfig::new(NodeId(1)).validate().is_ok());
        type Breaks = fn(&mut CoreConfig);
        let cases: [(&str, Breaks); 6] = [
            ("id", |c| c.id = NodeId(0)),
            ("heartbeat_ticks", |c| c.heartbeat_ticks = 0),
            ("election_ticks", |c| c.election_ticks = c.heartbeat_ticks),
            ("snapshot_interval", |c| c.snapshot_interval = 0),
            ("max_voters", |c| c.max_voters = 2),
            ("liveness_ticks", |c| c.liveness_ticks = c.election_ticks as u64),
        ];
        for (name, f) in cases {
            let mut c = CoreConfig::new(NodeId(1));
            f(&mut c);
            assert_eq!(field(c.validate().unwrap_err()), name);
        }
        let mut m = MetaConfig::new(NodeId(1));
        assert!(m.validate().is_ok());
        m.tick = Duration::ZERO;
        assert_eq!(field(m.validate().unwrap_err()), "tick");
        let mut m = MetaConfig::new(NodeId(1));
        m.request_timeout = Duration::from_millis(10);
        assert_eq!(field(m.validate().unwrap_err()), "request_timeout");
        let mut m = MetaConfig::new(NodeId(1));
        m.heartbeat_interval = Duration::ZERO;
        assert_eq!(field(m.validate().unwrap_err()), "heartbeat_interval");
    }

    #[test]
    fn bootstrap_store_refuses_empty_and_second() {
        let mut s = crate::meta::MemStore::new();
        assert_eq!(field(bootstrap_store(&mut s, &[]).unwrap_err()), "initial_members");
        bootstrap_store(&mut s, &[NodeId(1), NodeId(2)]).unwrap();
        assert!(matches!(bootstrap_store(&mut s, &[NodeId(1)]), Err(MetaError::AlreadyBootstrapped)));
        let st = MetaState::decode_snapshot(&s.latest_snapshot().data).unwrap();
        assert_eq!(st.members().voters.len(), 2);
        assert_eq!(st.applied_index(), 1);
    }

    /// Requests of this run are its own; those of an earlier run (replayed
    /// from the log after a restart) or of another node are not.
    #[test]
    fn own_requests_are_those_of_this_run() {
        let mut s = crate::meta::MemStore::new();
        bootstrap_store(&mut s, &[NodeId(1)]).unwrap();
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let check = || Box::new(crate::meta::state::ConservativeReplicaCheck);
        let mut c = MetaCore::open(CoreConfig::new(NodeId(1)), s, check(), &logger).unwrap();
        let old = c.next_request();
        assert!(c.is_own_request(old));
        assert!(!c.is_own_request(RequestId { origin: NodeId(2), seq: old.seq }), "another node's");
        let mut store = c.store().clone();
        store.reopen();
        let mut c = MetaCore::open(CoreConfig::new(NodeId(1)), store, check(), &logger).unwrap();
        let new = c.next_request();
        assert!(c.is_own_request(new));
        assert!(!c.is_own_request(old), "a request of the run before the restart");
    }

    #[test]
    fn single_voter_commits_alone_and_takes_the_bootstrap_id() {
        let mut s = crate::meta::MemStore::new();
        bootstrap_store(&mut s, &[NodeId(1)]).unwrap();
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut c = MetaCore::open(
            CoreConfig::new(NodeId(1)),
            s,
            Box::new(crate::meta::state::ConservativeReplicaCheck),
            &logger,
        )
        .unwrap();
        c.set_bootstrap_candidate(ClusterId(42), "one".into());
        let mut applied = Vec::new();
        for _ in 0..40 {
            c.tick();
            while c.has_ready() {
                let out = c.handle_ready().unwrap();
                assert!(out.messages.is_empty(), "a single voter sends nothing");
                applied.extend(out.applied);
            }
        }
        assert!(c.is_leader());
        assert_eq!(c.state().cluster().unwrap().id, ClusterId(42));
        assert!(applied.iter().any(|a| a.outcome == Ok(ApplyOutcome::Bootstrapped(ClusterId(42)))));
        // Indexes applied in order, from 2 (1 is the bootstrap snapshot).
        let idx: Vec<u64> = applied.iter().map(|a| a.index).collect();
        assert_eq!(idx, (2..2 + idx.len() as u64).collect::<Vec<_>>());
    }

    /// Liveness is per node and heard outside the log: with 100,000
    /// volumes, many liveness timeouts of heartbeats and ticks append not
    /// one entry; a node falling silent costs one.
    #[test]
    fn liveness_grows_the_log_with_changes_not_with_time_or_volumes() {
        use crate::meta::state::{NodeAddrs, VolumeSpec};
        let mut s = crate::meta::MemStore::new();
        bootstrap_store(&mut s, &[NodeId(1)]).unwrap();
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut cfg = CoreConfig::new(NodeId(1));
        cfg.snapshot_interval = 50_000;
        let liveness = cfg.liveness_ticks;
        let mut c =
            MetaCore::open(cfg, s, Box::new(crate::meta::state::ConservativeReplicaCheck), &logger).unwrap();
        c.set_bootstrap_candidate(ClusterId(7), "big".into());
        let report = NodeReport {
            spec: NodeSpec {
                id: NodeId(1),
                addrs: NodeAddrs {
                    peer: "127.0.0.1:7400".into(),
                    nbd: "127.0.0.1:10809".into(),
                    iscsi: "127.0.0.1:3260".into(),
                    admin: "127.0.0.1:7480".into(),
                },
                zone: "z".into(),
                capacity: 1 << 50,
                has_data: true,
                pid: 1,
            },
            used: 0,
        };
        let drain = |c: &mut MetaCore<crate::meta::MemStore>| {
            while c.has_ready() {
                c.handle_ready().unwrap();
            }
        };
        for _ in 0..100 {
            c.on_heartbeat(report.clone());
            c.tick();
            drain(&mut c);
        }
        assert!(c.state().node(NodeId(1)).is_some(), "registered");
        for batch in 0..100 {
            for i in 0..1000 {
                let spec = VolumeSpec {
                    name: format!("v{}", batch * 1000 + i),
                    size: 1 << 30,
                    replicas: 1,
                    min_replicas: 1,
                    extent_size: 64 << 20,
                    stripe_unit: 64 << 20,
                    stripe_width: 1,
                    read_only: false,
                };
                let request = c.next_request();
                c.propose(&Proposal { request, command: Command::CreateVolume { spec } }).unwrap();
            }
            drain(&mut c);
        }
        assert_eq!(c.state().volume_count(), 100_000);
        let last = c.status().log_last;
        assert_eq!(c.status().commit_index, last);
        // Ten liveness timeouts of heartbeats: nothing.
        for _ in 0..10 * liveness {
            c.on_heartbeat(report.clone());
            c.tick();
            drain(&mut c);
        }
        assert_eq!(c.status().log_last, last, "time with 100,000 volumes appended entries");
        // A second member falls silent: one entry (it is down), then
        // nothing more however long it stays silent.
        let mut other = report.spec.clone();
        other.id = NodeId(2);
        let request = c.next_request();
        c.propose(&Proposal { request, command: Command::AddNode { spec: other } }).unwrap();
        drain(&mut c);
        let added = c.status().log_last;
        assert_eq!(added, last + 1);
        for _ in 0..10 * liveness {
            c.on_heartbeat(report.clone());
            c.tick();
            drain(&mut c);
        }
        assert_eq!(c.state().node(NodeId(2)).map(|n| n.state), Some(NodeState::Down));
        assert_eq!(c.status().log_last, added + 1, "one entry for the change");
    }
}
