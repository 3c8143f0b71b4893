//! [`MetaNode`]: the tokio shell around [`MetaCore`].
//!
//! Owns the tick timer, the intake of Raft messages from the transport,
//! the callers waiting on proposals and reads (with their retries and
//! deadlines), and this node's heartbeat to the leader. One task owns the
//! core; everything else talks to it through a channel, so the core is
//! never shared and a dropped caller future leaves it consistent (its
//! waiter is simply gone when the answer comes).
//!
//! Never: decides what a command means (that is `state`), or sends a
//! message before the store has made durable what the message depends on
//! (the core hands out early only a leader's appends, which depend on
//! nothing local; everything else after its writes).

use super::core::{CoreConfig, MetaCore, NodeReport, ReadyOutput, bootstrap_store};
use super::state::{
    ApplyOutcome, ClusterId, Command, ConservativeReplicaCheck, MetaState, NodeSpec, Proposal, Rejection,
    ReplicaCheck, RequestId,
};
use super::store::LogStore;
use super::{MetaError, MetaRequest, MetaResponse, MetaStatus, raft_logger};
use crate::types::NodeId;
use futures::future::BoxFuture;
use raft::eraftpb::{ConfChangeType, Message};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// How Raft messages and metadata requests reach other nodes. The lead
/// implements it over the peer protocol; tests over channels.
pub trait MetaTransport: Send + Sync + 'static {
    /// Sends a Raft message; best effort (Raft retries what is lost).
    fn send(&self, to: NodeId, msg: Message);
    /// Sends a request and waits for the answer.
    fn forward(&self, to: NodeId, req: MetaRequest) -> BoxFuture<'static, Result<MetaResponse, MetaError>>;
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Reflects every write committed before the read began (read index).
    Linearizable,
    /// This node's applied state, however old.
    Stale,
}

/// The shell's settings; Raft's own are in `core`.
#[derive(Debug, Clone)]
pub struct MetaConfig {
    pub core: CoreConfig,
    /// One Raft tick.
    pub tick: Duration,
    /// How long a proposal or linearizable read may take before NoLeader / NoQuorum.
    pub request_timeout: Duration,
    /// How often this node tells the leader it is alive.
    pub heartbeat_interval: Duration,
}

impl MetaConfig {
    pub fn new(id: NodeId) -> Self {
        MetaConfig {
            core: CoreConfig::new(id),
            tick: Duration::from_millis(100),
            request_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_millis(500),
        }
    }

    pub fn validate(&self) -> Result<(), MetaError> {
        self.core.validate()?;
        if self.tick.is_zero() {
            return Err(MetaError::InvalidConfig { field: "tick", reason: "must be above zero" });
        }
        if self.request_timeout < self.tick * self.core.election_ticks as u32 {
            return Err(MetaError::InvalidConfig {
                field: "request_timeout",
                reason: "must cover at least one election timeout",
            });
        }
        if self.heartbeat_interval.is_zero() {
            return Err(MetaError::InvalidConfig {
                field: "heartbeat_interval",
                reason: "must be above zero",
            });
        }
        Ok(())
    }
}

/// How this node comes up.
#[derive(Debug, Clone)]
pub enum Startup {
    /// One of the initial members: on an empty store, write the bootstrap
    /// snapshot with `members` as voters (every member must list the same
    /// ones); the first leader then commits the cluster id. On a store that
    /// already has a cluster, this is an ordinary restart.
    Initial { members: Vec<NodeId>, cluster_name: String, cluster_id: Option<ClusterId> },
    /// A node that joins a running cluster (or restarts): an empty store
    /// waits, as a learner once the leader adds it, for the leader's snapshot.
    Join,
}

enum Input {
    Raft(Message),
    Propose { command: Command, reply: oneshot::Sender<Result<ApplyOutcome, MetaError>> },
    Membership { kind: ConfChangeType, node: NodeId, reply: oneshot::Sender<Result<ApplyOutcome, MetaError>> },
    Read { reply: oneshot::Sender<Result<Arc<MetaState>, MetaError>> },
    Heartbeat(NodeReport),
    Report(NodeReport),
}

enum Work {
    Command(Proposal),
    Membership { request: RequestId, kind: ConfChangeType, node: NodeId },
}

struct Pending {
    work: Work,
    reply: oneshot::Sender<Result<ApplyOutcome, MetaError>>,
    deadline: Instant,
    retry_at: Instant,
}

struct PendingRead {
    reply: oneshot::Sender<Result<Arc<MetaState>, MetaError>>,
    deadline: Instant,
    retry_at: Instant,
    index: Option<u64>,
}

struct Shared {
    id: NodeId,
    tx: mpsc::Sender<Input>,
    state: watch::Receiver<Arc<MetaState>>,
    status: watch::Receiver<MetaStatus>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// When the leader last acknowledged this node's heartbeat (a watch,
    /// so an owner waiting for its first lease wakes at the ack).
    last_ack: Arc<watch::Sender<Option<Instant>>>,
    /// Commands proposed through [`MetaNode::propose`] (for metrics).
    proposals: std::sync::atomic::AtomicU64,
}

/// A running metadata node. Cheap to clone; every clone talks to one task.
#[derive(Clone)]
pub struct MetaNode {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MetaNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaNode").field("id", &self.shared.id).finish()
    }
}

/// A cluster id nobody else will pick: hashed from the clock, the process
/// and std's per-process random hash keys.
fn fresh_cluster_id(node: NodeId) -> ClusterId {
    use std::hash::{BuildHasher, Hasher};
    let mut out = 0u128;
    for half in 0..2u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(half);
        h.write_u64(node.0);
        h.write_u32(std::process::id());
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        h.write_u128(t.as_nanos());
        out = (out << 64) | h.finish() as u128;
    }
    ClusterId(out)
}

impl MetaNode {
    /// Opens the node on `store` and starts its task (call inside a tokio
    /// runtime). `report` is what this node heartbeats to the leader (its
    /// registration, for initial members).
    pub fn start<S: LogStore + Send + 'static>(
        cfg: MetaConfig,
        store: S,
        transport: Arc<dyn MetaTransport>,
        report: NodeReport,
        startup: Startup,
    ) -> Result<MetaNode, MetaError> {
        Self::start_with(cfg, store, transport, report, startup, Box::new(ConservativeReplicaCheck))
    }

    /// [`MetaNode::start`] with the placement's answer to "may this node
    /// hold replicas" (see `state::ReplicaCheck`).
    pub fn start_with<S: LogStore + Send + 'static>(
        cfg: MetaConfig,
        store: S,
        transport: Arc<dyn MetaTransport>,
        report: NodeReport,
        startup: Startup,
        check: Box<dyn ReplicaCheck + Send + Sync>,
    ) -> Result<MetaNode, MetaError> {
        cfg.validate()?;
        let id = cfg.core.id;
        if report.spec.id != id {
            return Err(MetaError::InvalidConfig {
                field: "id",
                reason: "the node report names another node",
            });
        }
        let mut store = store;
        store_prepare(&mut store, &id, &startup)?;
        let logger = raft_logger(id);
        let mut core = MetaCore::open(cfg.core.clone(), store, check, &logger)?;
        if let Startup::Initial { cluster_name, cluster_id, members } = &startup
            && members.contains(&id)
        {
            core.set_bootstrap_candidate(
                cluster_id.unwrap_or_else(|| fresh_cluster_id(id)),
                cluster_name.clone(),
            );
        }
        let (tx, rx) = mpsc::channel(4096);
        let (state_tx, state_rx) = watch::channel(Arc::clone(core.state()));
        let (status_tx, status_rx) = watch::channel(core.status());
        let last_ack = Arc::new(watch::Sender::new(None));
        let shared = Arc::new(Shared {
            id,
            tx,
            state: state_rx,
            status: status_rx,
            task: Mutex::new(None),
            last_ack: Arc::clone(&last_ack),
            proposals: Default::default(),
        });
        let runner = Runner {
            cfg,
            core,
            transport,
            report,
            rx,
            state_tx,
            status_tx,
            pending: HashMap::new(),
            reads: HashMap::new(),
            next_read: 0,
            heartbeat_in_flight: Arc::new(AtomicBool::new(false)),
            last_ack,
            last_rejected_registration: None,
        };
        let span = tracing::info_span!("meta", node = %id);
        let task = tokio::spawn(tracing::Instrument::instrument(runner.run(), span));
        *shared.task.lock().unwrap() = Some(task);
        Ok(MetaNode { shared })
    }

    pub fn id(&self) -> NodeId {
        self.shared.id
    }

    /// Proposes a command from this node (forwarded to the leader by Raft)
    /// and waits until this node has applied it. Dropping the future does
    /// not withdraw the command: it may still apply, once.
    pub async fn propose(&self, command: Command) -> Result<ApplyOutcome, MetaError> {
        self.shared.proposals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        self.send(Input::Propose { command, reply }).await?;
        rx.await.map_err(|_| MetaError::Stopped)?
    }

    /// The metadata, as fresh as asked.
    pub async fn read(&self, consistency: Consistency) -> Result<Arc<MetaState>, MetaError> {
        match consistency {
            Consistency::Stale => Ok(self.shared.state.borrow().clone()),
            Consistency::Linearizable => {
                let (reply, rx) = oneshot::channel();
                self.send(Input::Read { reply }).await?;
                rx.await.map_err(|_| MetaError::Stopped)?
            }
        }
    }

    /// A watch of the applied state (changes after every applied batch).
    pub fn subscribe(&self) -> watch::Receiver<Arc<MetaState>> {
        self.shared.state.clone()
    }

    /// How many commands [`MetaNode::propose`] was asked to propose here.
    pub fn proposals(&self) -> u64 {
        self.shared.proposals.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn status(&self) -> MetaStatus {
        self.shared.status.borrow().clone()
    }

    /// A watch of [`MetaNode::status`].
    pub fn status_watch(&self) -> watch::Receiver<MetaStatus> {
        self.shared.status.clone()
    }

    /// Registers `spec` and adds it to Raft as a learner; the leader
    /// promotes it to voter once it has caught up, while there are fewer
    /// voters than configured. A node already a member is left as it is.
    pub async fn add_learner(&self, spec: NodeSpec) -> Result<(), MetaError> {
        let id = spec.id;
        match self.propose(Command::AddNode { spec: spec.clone() }).await {
            Ok(_) => {}
            Err(MetaError::Rejected(Rejection::NodeExists(_))) => {
                self.propose(Command::UpdateNode { spec }).await?;
            }
            Err(e) => return Err(e),
        }
        if self.read(Consistency::Stale).await?.role(id).is_some() {
            return Ok(());
        }
        self.membership(ConfChangeType::AddLearnerNode, id).await.map(|_| ())
    }

    /// Removes a node: from the registry (refused while it may hold
    /// replicas or owns volumes, with the reason), then from Raft.
    pub async fn remove_node(&self, id: NodeId) -> Result<(), MetaError> {
        match self.propose(Command::RemoveNode { node: id }).await {
            Ok(_) | Err(MetaError::Rejected(Rejection::NodeNotFound(_))) => {}
            Err(e) => return Err(e),
        }
        if self.read(Consistency::Stale).await?.role(id).is_none() {
            return Ok(());
        }
        self.membership(ConfChangeType::RemoveNode, id).await.map(|_| ())
    }

    async fn membership(&self, kind: ConfChangeType, node: NodeId) -> Result<ApplyOutcome, MetaError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Membership { kind, node, reply }).await?;
        rx.await.map_err(|_| MetaError::Stopped)?
    }

    /// When the leader last acknowledged this node's heartbeat (on the
    /// leader: its last heartbeat tick while leading). A node that owns
    /// volumes stops serving once this is older than its liveness lease
    /// minus a safety margin, before the leader may commit it as down;
    /// that rule belongs to the owner, this is its clock.
    pub fn last_liveness_ack(&self) -> Option<Instant> {
        *self.shared.last_ack.borrow()
    }

    /// Every change of [`MetaNode::last_liveness_ack`], for a caller that
    /// waits for the next acknowledgement.
    pub fn liveness_acks(&self) -> watch::Receiver<Option<Instant>> {
        self.shared.last_ack.subscribe()
    }

    /// A Raft message from a peer. Never waits: when the node is this far
    /// behind, the message is dropped, as the network might have (Raft
    /// resends). A message for another node is dropped with a log line.
    pub fn step(&self, msg: Message) {
        if msg.to != self.shared.id.0 {
            tracing::warn!(node = %self.shared.id, to = msg.to, from = msg.from, "raft message for another node dropped");
            return;
        }
        if self.shared.tx.try_send(Input::Raft(msg)).is_err() {
            tracing::debug!(node = %self.shared.id, "raft message dropped: intake full or node stopped");
        }
    }

    /// Serves a [`MetaRequest`] from a peer.
    pub async fn handle_request(&self, req: MetaRequest) -> Result<MetaResponse, MetaError> {
        match req {
            MetaRequest::Heartbeat(report) => {
                let st = self.status();
                if st.leader != Some(self.shared.id) {
                    return Ok(MetaResponse::NotLeader { leader: st.leader });
                }
                self.send(Input::Heartbeat(report)).await?;
                Ok(MetaResponse::HeartbeatAck)
            }
        }
    }

    /// Replaces what this node reports about itself (addresses, zone,
    /// capacity, used bytes); the leader records changes.
    pub async fn set_report(&self, report: NodeReport) -> Result<(), MetaError> {
        self.send(Input::Report(report)).await
    }

    async fn send(&self, input: Input) -> Result<(), MetaError> {
        self.shared.tx.send(input).await.map_err(|_| MetaError::Stopped)
    }

    /// Stops the task (as a crash would: nothing is flushed that was not
    /// already durable) and waits until it and its store are gone.
    pub async fn shutdown(&self) {
        let task = self.shared.task.lock().unwrap().take();
        if let Some(t) = task {
            t.abort();
            let _ = t.await;
        }
    }
}

/// Writes the bootstrap snapshot when an initial member starts on an empty store.
fn store_prepare<S: LogStore>(store: &mut S, id: &NodeId, startup: &Startup) -> Result<(), MetaError> {
    match startup {
        Startup::Initial { members, .. } if members.contains(id) && !store.is_initialized() => {
            bootstrap_store(store, members)
        }
        _ => Ok(()),
    }
}

struct Runner<S: LogStore> {
    cfg: MetaConfig,
    core: MetaCore<S>,
    transport: Arc<dyn MetaTransport>,
    report: NodeReport,
    rx: mpsc::Receiver<Input>,
    state_tx: watch::Sender<Arc<MetaState>>,
    status_tx: watch::Sender<MetaStatus>,
    pending: HashMap<RequestId, Pending>,
    reads: HashMap<u64, PendingRead>,
    next_read: u64,
    heartbeat_in_flight: Arc<AtomicBool>,
    last_ack: Arc<watch::Sender<Option<Instant>>>,
    /// The last refused registration warned about (see `duty_rejected`).
    last_rejected_registration: Option<String>,
}

impl<S: LogStore + Send + 'static> Runner<S> {
    /// A leader duty this run of the node proposed (a command nobody waits
    /// for) that the state machine refused. A refused registration leaves a node out of
    /// the cluster for good while the leader retries it each second, so it
    /// is a warning, once per distinct reason; other duties lose benign
    /// races (a state another node changed first), at debug.
    fn duty_rejected(&mut self, data: &[u8], why: &Rejection) {
        let Some(p) = crate::meta::state::decode_proposal(data) else { return };
        match &p.command {
            Command::AddNode { spec } | Command::UpdateNode { spec } => {
                let text = format!("{}: {why}", spec.id);
                if self.last_rejected_registration.as_deref() != Some(text.as_str()) {
                    tracing::warn!(node = %spec.id, reason = %why, capacity = spec.capacity, has_data = spec.has_data,
                        "the metadata refused a node's registration: it cannot join the cluster until its report changes");
                    self.last_rejected_registration = Some(text);
                }
            }
            other => tracing::debug!(command = ?other, reason = %why, "a leader duty was refused"),
        }
    }

    fn retry_every(&self) -> Duration {
        self.cfg.tick * self.cfg.core.election_ticks as u32
    }

    async fn run(mut self) {
        let mut ticker = tokio::time::interval(self.cfg.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeat = tokio::time::interval(self.cfg.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Entries committed before a restart replay before anything else.
        if let Err(e) = self.drain_ready() {
            return self.fail(e);
        }
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    self.core.tick();
                    self.retry_and_expire();
                }
                _ = heartbeat.tick() => self.heartbeat(),
                input = self.rx.recv() => {
                    let Some(input) = input else { break };
                    self.input(input);
                    // Take what else is queued before the (fsyncing) Ready turn.
                    for _ in 0..256 {
                        match self.rx.try_recv() {
                            Ok(i) => self.input(i),
                            Err(_) => break,
                        }
                    }
                }
            }
            if let Err(e) = self.drain_ready() {
                return self.fail(e);
            }
        }
    }

    fn fail(mut self, e: MetaError) {
        tracing::error!(error = %e, source = ?std::error::Error::source(&e), "metadata node stops");
        for (_, p) in self.pending.drain() {
            let _ = p.reply.send(Err(MetaError::Stopped));
        }
        for (_, r) in self.reads.drain() {
            let _ = r.reply.send(Err(MetaError::Stopped));
        }
    }

    fn input(&mut self, input: Input) {
        let now = Instant::now();
        match input {
            Input::Raft(msg) => {
                if let Err(e) = self.core.step(msg) {
                    tracing::debug!(error = %e, "raft message not stepped");
                }
            }
            Input::Propose { command, reply } => {
                let proposal = Proposal { request: self.core.next_request(), command };
                // Only NoLeader is worth a retry; the rest will not change.
                match self.core.propose(&proposal) {
                    Ok(()) | Err(MetaError::NoLeader) => {}
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                }
                let request = proposal.request;
                self.pending.insert(
                    request,
                    Pending {
                        work: Work::Command(proposal),
                        reply,
                        deadline: now + self.cfg.request_timeout,
                        retry_at: now + self.retry_every(),
                    },
                );
            }
            Input::Membership { kind, node, reply } => {
                let request = self.core.next_request();
                let _ = self.core.propose_membership(request, kind, node);
                self.pending.insert(
                    request,
                    Pending {
                        work: Work::Membership { request, kind, node },
                        reply,
                        deadline: now + self.cfg.request_timeout,
                        retry_at: now + self.retry_every(),
                    },
                );
            }
            Input::Read { reply } => {
                self.next_read += 1;
                let ctx = self.next_read;
                self.core.read_index(ctx);
                self.reads.insert(
                    ctx,
                    PendingRead {
                        reply,
                        deadline: now + self.cfg.request_timeout,
                        retry_at: now + self.retry_every(),
                        index: None,
                    },
                );
            }
            Input::Heartbeat(report) => self.core.on_heartbeat(report),
            Input::Report(report) => self.report = report,
        }
    }

    fn timeout_error(&self) -> MetaError {
        match self.core.leader() {
            Some(leader) if leader != self.core.id() || self.core.is_leader() => {
                MetaError::NoQuorum { leader }
            }
            _ => MetaError::NoLeader,
        }
    }

    /// Re-proposes what has not applied yet (the same request id: the state
    /// machine applies it once however often it lands in the log) and
    /// answers what ran out of time.
    fn retry_and_expire(&mut self) {
        let now = Instant::now();
        let every = self.retry_every();
        let expired: Vec<RequestId> =
            self.pending.iter().filter(|(_, p)| now >= p.deadline).map(|(k, _)| *k).collect();
        for k in expired {
            let p = self.pending.remove(&k).unwrap();
            let _ = p.reply.send(Err(self.timeout_error()));
        }
        for p in self.pending.values_mut() {
            if now >= p.retry_at {
                p.retry_at = now + every;
                let _ = match &p.work {
                    Work::Command(proposal) => self.core.propose(proposal),
                    Work::Membership { request, kind, node } => {
                        self.core.propose_membership(*request, *kind, *node)
                    }
                };
            }
        }
        let expired: Vec<u64> =
            self.reads.iter().filter(|(_, r)| now >= r.deadline).map(|(k, _)| *k).collect();
        for k in expired {
            let r = self.reads.remove(&k).unwrap();
            let _ = r.reply.send(Err(self.timeout_error()));
        }
        for (ctx, r) in self.reads.iter_mut() {
            if r.index.is_none() && now >= r.retry_at {
                r.retry_at = now + every;
                self.core.read_index(*ctx);
            }
        }
    }

    fn heartbeat(&mut self) {
        let me = self.core.id();
        match self.core.leader() {
            Some(l) if l == me => {
                self.core.on_heartbeat(self.report.clone());
                self.last_ack.send_replace(Some(Instant::now()));
            }
            Some(l) => {
                if self.heartbeat_in_flight.swap(true, Ordering::AcqRel) {
                    return;
                }
                let sent = Instant::now();
                let fut = self.transport.forward(l, MetaRequest::Heartbeat(self.report.clone()));
                let flag = Arc::clone(&self.heartbeat_in_flight);
                let last_ack = Arc::clone(&self.last_ack);
                tokio::spawn(async move {
                    match fut.await {
                        // The lease runs from when the heartbeat left, not
                        // from when the answer came back.
                        Ok(MetaResponse::HeartbeatAck) => {
                            last_ack.send_replace(Some(sent));
                        }
                        Ok(MetaResponse::NotLeader { leader }) => {
                            tracing::debug!(asked = %l, ?leader, "heartbeat reached a node that no longer leads")
                        }
                        Err(e) => {
                            tracing::debug!(leader = %l, error = %e, "heartbeat to the metadata leader failed")
                        }
                    }
                    flag.store(false, Ordering::Release);
                });
            }
            None => {}
        }
    }

    fn drain_ready(&mut self) -> Result<(), MetaError> {
        while self.core.has_ready() {
            let transport = &self.transport;
            let out = self.core.handle_ready_with(&mut |m| transport.send(NodeId(m.to), m))?;
            // Published before any waiter hears back, so a caller whose
            // proposal resolved reads it here, even stale.
            if !out.applied.is_empty() || out.snapshot_installed.is_some() {
                self.state_tx.send_replace(Arc::clone(self.core.state()));
            }
            self.dispatch(out);
        }
        let applied = self.core.state().applied_index();
        let done: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.index.is_some_and(|i| i <= applied))
            .map(|(k, _)| *k)
            .collect();
        for k in done {
            let r = self.reads.remove(&k).unwrap();
            let _ = r.reply.send(Ok(Arc::clone(self.core.state())));
        }
        let status = self.core.status();
        self.status_tx.send_if_modified(|s| {
            let differs = *s != status;
            if differs {
                *s = status;
            }
            differs
        });
        Ok(())
    }

    fn dispatch(&mut self, out: ReadyOutput) {
        for msg in out.messages {
            self.transport.send(NodeId(msg.to), msg);
        }
        for a in out.applied {
            if let Some(req) = a.request
                && let Some(p) = self.pending.remove(&req)
            {
                let _ = p.reply.send(a.outcome.map_err(MetaError::Rejected));
            } else if let (Some(req), Err(why)) = (a.request, &a.outcome)
                // Not one replayed at a restart: that refusal is old news.
                && self.core.is_own_request(req)
            {
                self.duty_rejected(&a.data, why);
            }
        }
        for (ctx, index) in out.reads {
            if let Some(r) = self.reads.get_mut(&ctx) {
                r.index = Some(index);
            }
        }
    }
}
