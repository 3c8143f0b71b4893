//! `basaltd run`: one node of a cluster, from its configuration.
//!
//! Start-up, in order (each step a STATUS= line for systemd):
//! 1. identity (`node.json` in the state dir) and the store (if the node
//!    has data directories);
//! 2. the peer server, then the metadata group: a fresh initial member
//!    learns the other initial members' node ids over the peer protocol
//!    and bootstraps with all of them as voters; a fresh node with `join`
//!    asks a member to add it; a fresh node with neither waits for
//!    `basalt node add` to invite it; a restart just restarts;
//! 3. the admin API, as soon as the metadata node runs (`/readyz` says
//!    why the node does not serve yet); once the node is a member and the
//!    cluster id is known: the front ends, serving the volumes it owns;
//! 4. READY=1. SIGTERM/SIGINT drain and flush; SIGHUP re-reads log_filter.

use crate::LogReload;
use crate::control::{self, Daemon};
use anyhow::Context;
use basalt::admin::metrics::{
    NodeCollector, PeerCollector, PeerServerCollector, RaftCollector, ReplicationCollector,
};
use basalt::config::Config;
use basalt::meta::{self, MetaNode, MetaRequest, MetaResponse, NodeReport, RedbStore, Startup};
use basalt::net::{
    ClientConfig, PeerHandler, PeerInfo, PeerPool, PeerServer, Refusal, ReplyFuture, ServerConfig,
};
use basalt::node::identity::Identity;
use basalt::node::systemd::{Notifier, spawn_watchdog};
use basalt::node::{Node, VolumeOptions, forward};
use basalt::proto::peer::{ErrorCode, ErrorReply, Message};
use basalt::storage::{StoreConfig, StoreOptions};
use basalt::types::{ClusterId, NodeId};
use bytes::Bytes;
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// What `demo --nodes 1` adds to a plain `run`: a volume created if absent
/// and the client commands printed once it serves.
#[derive(Debug, Clone)]
pub struct DemoVolume {
    pub name: String,
    pub opts: VolumeOptions,
}

#[derive(Debug, Default)]
pub struct RunOptions {
    pub config_path: Option<PathBuf>,
    pub log_reload: Option<LogReload>,
    pub demo: Option<DemoVolume>,
    pub iscsi_chap: Option<basalt::proto::iscsi::login::ChapConfig>,
}

/// Node ids to peer addresses: from the metadata's node records, and from
/// what a join or the initial-member exchange told us before those exist.
#[derive(Debug, Default)]
pub struct AddrBook {
    map: RwLock<HashMap<NodeId, SocketAddr>>,
}

impl AddrBook {
    pub fn get(&self, id: NodeId) -> Option<SocketAddr> {
        self.map.read().unwrap().get(&id).copied()
    }

    pub fn insert(&self, id: NodeId, addr: SocketAddr) {
        self.map.write().unwrap().insert(id, addr);
    }

    pub fn refresh(&self, state: &meta::MetaState) {
        let mut m = self.map.write().unwrap();
        for n in state.nodes() {
            if let Ok(a) = n.spec.addrs.peer.parse() {
                m.insert(n.spec.id, a);
            }
        }
    }
}

/// Raft messages and metadata requests over the peer protocol.
#[derive(Debug)]
struct PeerTransport {
    pool: Arc<PeerPool>,
    book: Arc<AddrBook>,
    /// Nodes this node has Raft messages for but no address, since when.
    unknown: Mutex<HashMap<NodeId, Unknown>>,
}

#[derive(Debug)]
struct Unknown {
    since: Instant,
    warned: Option<Instant>,
    dropped: u64,
}

/// A node's address may be missing for a moment (a joiner learns the
/// others' from the state it is catching up with); past this, Raft to it is
/// stuck, which stalls a join or a catch-up: a warning, and again every
/// [`UNKNOWN_WARN_EVERY`] while it lasts.
const UNKNOWN_WARN_AFTER: Duration = Duration::from_secs(5);
const UNKNOWN_WARN_EVERY: Duration = Duration::from_secs(30);

impl PeerTransport {
    fn new(pool: Arc<PeerPool>, book: Arc<AddrBook>) -> PeerTransport {
        PeerTransport { pool, book, unknown: Mutex::default() }
    }

    fn no_address(&self, to: NodeId) {
        self.pool.stats().dropped_no_address.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut m = self.unknown.lock().unwrap();
        let u = m.entry(to).or_insert(Unknown { since: now, warned: None, dropped: 0 });
        u.dropped += 1;
        let due = match u.warned {
            None => now.duration_since(u.since) >= UNKNOWN_WARN_AFTER,
            Some(w) => now.duration_since(w) >= UNKNOWN_WARN_EVERY,
        };
        if due {
            tracing::warn!(%to, dropped = u.dropped, for_s = now.duration_since(u.since).as_secs(),
                "raft messages to a node are dropped: no address is known for it here (is it in the node registry?)");
            u.warned = Some(now);
            u.dropped = 0;
        } else {
            tracing::debug!(%to, "raft message dropped: no address known for the node yet");
        }
    }
}

impl meta::MetaTransport for PeerTransport {
    fn send(&self, to: NodeId, msg: raft::eraftpb::Message) {
        let Some(addr) = self.book.get(to) else {
            self.no_address(to);
            return;
        };
        {
            let mut m = self.unknown.lock().unwrap();
            if !m.is_empty()
                && let Some(u) = m.remove(&to)
                && u.warned.is_some()
            {
                tracing::info!(%to, %addr, "the node's address is known again: raft messages to it flow");
            }
        }
        let bytes = Bytes::from(meta::encode_raft_message(&msg));
        if let Err(e) = self.pool.send(addr, Message::Raft(bytes)) {
            tracing::debug!(%to, error = %e, "raft message dropped");
        }
    }

    fn forward(
        &self,
        to: NodeId,
        req: MetaRequest,
    ) -> BoxFuture<'static, Result<MetaResponse, meta::MetaError>> {
        let addr = self.book.get(to);
        let pool = self.pool.clone();
        Box::pin(async move {
            let addr = addr.ok_or(meta::MetaError::Transport { to, reason: "no address known".into() })?;
            meta_request(&pool, addr, req).await.map_err(|reason| meta::MetaError::Transport { to, reason })
        })
    }
}

/// What travels in the peer protocol's MetaRequest frames: the metadata
/// group's own requests, and the membership handshakes of this shell.
/// Variants are only appended; the wire form is versioned.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum ShellRequest {
    Meta(MetaRequest),
    /// A fresh node asks a member to add it (config `cluster.join`).
    Join(meta::state::NodeSpec),
    /// A member invites a fresh node (`basalt node add`), telling it the
    /// cluster and every member's peer address.
    Invite {
        cluster: u128,
        members: Vec<(NodeId, String)>,
    },
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum ShellResponse {
    Meta(MetaResponse),
    Joined { cluster: u128, members: Vec<(NodeId, String)> },
    Invited { spec: meta::state::NodeSpec },
}

#[derive(serde::Serialize, serde::Deserialize)]
enum Wire<T> {
    V1(T),
}

fn encode_wire<T: serde::Serialize + Clone>(v: &T) -> Bytes {
    Bytes::from(postcard::to_allocvec(&Wire::V1(v.clone())).expect("postcard encodes shell messages"))
}

fn decode_wire<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    match postcard::from_bytes::<Wire<T>>(b) {
        Ok(Wire::V1(v)) => Ok(v),
        Err(e) => Err(format!("undecodable metadata frame: {e}")),
    }
}

/// One membership or metadata request to the peer at `addr`.
pub async fn shell_request(
    pool: &PeerPool,
    addr: SocketAddr,
    req: &ShellRequest,
) -> Result<ShellResponse, String> {
    match pool.request(addr, Message::MetaRequest(encode_wire(req))).await {
        Ok(Message::MetaResponse(b)) => decode_wire(&b),
        Ok(Message::Error(e)) => Err(e.message),
        Ok(other) => Err(format!("unexpected answer {:?}", other.kind())),
        Err(e) => Err(basalt::units::error_chain(&e)),
    }
}

async fn meta_request(pool: &PeerPool, addr: SocketAddr, req: MetaRequest) -> Result<MetaResponse, String> {
    match shell_request(pool, addr, &ShellRequest::Meta(req)).await? {
        ShellResponse::Meta(r) => Ok(r),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// What the peer server hands to this node: Raft messages to the metadata
/// group, metadata requests to the daemon. Before the metadata group has
/// started, Raft messages are dropped (Raft resends).
struct Handler {
    daemon: OnceLock<Arc<Daemon>>,
    meta: OnceLock<MetaNode>,
    /// Answers extent requests once the store is open and the node routed.
    replica: OnceLock<Arc<basalt::node::replica::ReplicaService>>,
    /// Serves the volume requests other nodes forward to this one.
    node: Arc<Node>,
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handler")
    }
}

fn error_reply(code: ErrorCode, message: impl Into<String>) -> Message {
    Message::Error(ErrorReply { code, message: message.into() })
}

/// The local volume `id` if the metadata says this node owns it at
/// `generation`; else `NotOwner` with the generation this node knows.
fn owned_volume(
    meta: Option<&MetaNode>,
    node: &Node,
    id: basalt::types::VolumeId,
    generation: basalt::types::Generation,
) -> Result<Arc<basalt::node::Volume>, basalt::node::VolumeError> {
    use basalt::node::VolumeError;
    let meta = meta.ok_or_else(|| VolumeError::Unavailable("this node is still starting".into()))?;
    let state = meta.subscribe().borrow().clone();
    let record = state.volume(id);
    let known = basalt::types::Generation(record.map_or(0, |v| v.generation.0));
    let Some(v) = record.filter(|v| v.owner == Some(meta.id()) && known == generation) else {
        return Err(VolumeError::NotOwner { generation: known });
    };
    node.volume(&v.name)
        .filter(|vol| vol.spec().id == id)
        .ok_or_else(|| VolumeError::Unavailable(format!("volume {id} is not open on this node yet")))
}

impl PeerHandler for Handler {
    fn request(&self, peer: PeerInfo, request: Message) -> ReplyFuture {
        if request.kind().is_volume_request() {
            let (meta, node) = (self.meta.get(), &*self.node);
            return Box::pin(forward::serve(&|id, g| owned_volume(meta, node, id, g), request));
        }
        let daemon = self.daemon.get().cloned();
        let meta = self.meta.get().cloned();
        let replica = self.replica.get().cloned();
        Box::pin(async move {
            match request {
                m @ (Message::ExtentWrite(_)
                | Message::ExtentRead(_)
                | Message::ExtentWriteZeroes(_)
                | Message::ExtentTrim(_)
                | Message::ExtentFlush(_)
                | Message::ExtentStatus(_)
                | Message::ExtentCrcs(_)
                | Message::ExtentMap(_)
                | Message::ExtentsDirty(_)) => match replica {
                    Some(r) => {
                        // The metadata's owner generation is a floor too: a
                        // volume served from the local store directly (the
                        // single-node slice) never raises the replica's fence.
                        let floor = basalt::node::replica::generation_of(&m).and_then(|(volume, g)| {
                            let v = meta.as_ref()?.subscribe().borrow().volume(volume)?.generation.0;
                            (g.0 < v).then_some((volume, g, v))
                        });
                        if let Some((volume, g, current)) = floor {
                            tracing::warn!(peer = %peer.addr, node = %peer.node, %volume,
                                asked = g.0, current, "extent request refused: its owner generation is older than the metadata's");
                            return Message::ExtentErr(basalt::proto::peer::ExtentErr {
                                error: basalt::proto::peer::ExtentError::StaleGeneration {
                                    current: basalt::types::Generation(current),
                                },
                                message: format!("owner generation {} is older than {current}", g.0),
                            });
                        }
                        r.handle_from(
                            basalt::node::replica::Requester { node: peer.node, addr: Some(peer.addr) },
                            m,
                        )
                        .await
                    }
                    None => error_reply(
                        ErrorCode::ShuttingDown,
                        "this node stores no replicas (or is still starting)",
                    ),
                },
                Message::MetaRequest(b) => {
                    let req = match decode_wire::<ShellRequest>(&b) {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::warn!(peer = %peer.addr, node = %peer.node, error = %e, "bad metadata request");
                            return error_reply(ErrorCode::Malformed, e.to_string());
                        }
                    };
                    let answer = match (&daemon, &meta, req) {
                        (Some(d), _, req) => d.handle_shell_request(req).await,
                        (None, Some(m), ShellRequest::Meta(req)) => m
                            .handle_request(req)
                            .await
                            .map(ShellResponse::Meta)
                            .map_err(|e| basalt::units::error_chain(&e)),
                        _ => Err("this node is still starting".into()),
                    };
                    match answer {
                        Ok(r) => Message::MetaResponse(encode_wire(&r)),
                        Err(msg) => error_reply(ErrorCode::Internal, msg),
                    }
                }
                other => {
                    tracing::warn!(peer = %peer.addr, kind = ?other.kind(), "peer request not served by this build");
                    error_reply(ErrorCode::Unsupported, "not served by this node")
                }
            }
        })
    }

    /// The sender a message names must be the node its connection's Hello
    /// named, and Raft traffic and heartbeats must come from members. A
    /// node that knows no Raft membership yet (fresh, waiting for the
    /// leader's snapshot) takes Raft messages from anyone who names
    /// themselves truthfully: it cannot tell members yet. The Hello is
    /// unauthenticated; mutual TLS is a later issue.
    fn admit(&self, peer: PeerInfo, message: &Message) -> Result<(), Refusal> {
        let claimed = match message {
            // One that does not decode names no one; one_way logs it.
            Message::Raft(b) => match meta::decode_raft_message(b) {
                Ok(m) => {
                    use raft::eraftpb::MessageType as T;
                    // raft-rs makes these itself and panics on some from a
                    // peer (an empty MsgPropose is fatal); none travel.
                    let local = matches!(
                        m.get_msg_type(),
                        T::MsgHup | T::MsgBeat | T::MsgUnreachable | T::MsgSnapStatus | T::MsgCheckQuorum
                    );
                    if local || (m.get_msg_type() == T::MsgPropose && m.entries.is_empty()) {
                        return Err(Refusal::Invalid("a Raft message of a kind only the local node makes"));
                    }
                    Some((NodeId(m.from), "raft traffic"))
                }
                Err(_) => return Ok(()),
            },
            Message::MetaRequest(b) => match decode_wire::<ShellRequest>(b) {
                Ok(ShellRequest::Meta(MetaRequest::Heartbeat(r))) => Some((r.spec.id, "a heartbeat")),
                // A fresh node asks to join: it names itself, and is no member yet.
                Ok(ShellRequest::Join(spec)) if spec.id != peer.node => {
                    return Err(Refusal::Impostor { claimed: spec.id, hello: peer.node });
                }
                // An invitation names no sender; the daemon decides on it.
                Ok(_) | Err(_) => None,
            },
            _ => None,
        };
        let Some((claimed, what)) = claimed else { return Ok(()) };
        if claimed != peer.node {
            return Err(Refusal::Impostor { claimed, hello: peer.node });
        }
        let Some(meta) = self.meta.get() else { return Ok(()) };
        let status = meta.status();
        let in_raft = status.voters.contains(&peer.node) || status.learners.contains(&peer.node);
        let knows_none = status.voters.is_empty() && status.learners.is_empty();
        if in_raft || knows_none || meta.subscribe().borrow().node(peer.node).is_some() {
            return Ok(());
        }
        Err(Refusal::NotMember { node: peer.node, what })
    }

    fn one_way(&self, peer: PeerInfo, message: Message) {
        match message {
            Message::Raft(b) => match (meta::decode_raft_message(&b), self.meta.get()) {
                (Ok(m), Some(meta)) => meta.step(m),
                (Ok(_), None) => {}
                (Err(e), _) => tracing::warn!(peer = %peer.addr, error = %e, "bad raft message"),
            },
            other => {
                tracing::warn!(peer = %peer.addr, kind = ?other.kind(), "unexpected one-way peer message")
            }
        }
    }
}

pub fn node_spec_of(cfg: &Config, id: NodeId) -> meta::state::NodeSpec {
    let opt = |a: Option<SocketAddr>| a.map_or(String::new(), |a| a.to_string());
    let has_data = !cfg.data_dirs.is_empty();
    meta::state::NodeSpec {
        id,
        addrs: meta::state::NodeAddrs {
            peer: cfg.listen.peer.to_string(),
            nbd: opt(cfg.listen.nbd),
            iscsi: opt(cfg.listen.iscsi),
            admin: cfg.listen.admin.to_string(),
        },
        zone: cfg.zone.clone(),
        capacity: if has_data {
            cfg.capacity.map_or_else(
                || {
                    if cfg.engine == basalt::storage::EngineKind::Mem {
                        // Extents live in this process's memory, not in the
                        // data directories (which it may never create).
                        return physical_memory();
                    }
                    let dirs: Vec<&std::path::Path> = cfg.data_dirs.iter().map(|d| d.as_path()).collect();
                    basalt::admin::metrics::filesystems(&dirs).0
                },
                |c| c.0,
            )
        } else {
            0
        },
        has_data,
        pid: std::process::id(),
    }
}

/// The machine's memory in bytes (0 if it cannot be read).
fn physical_memory() -> u64 {
    // SAFETY: sysconf(3) only reads configuration values.
    let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    u64::try_from(pages).unwrap_or(0).saturating_mul(u64::try_from(page).unwrap_or(0))
}

/// Asks each initial member for its node id (the peer handshake carries
/// it) until all have answered.
async fn initial_member_ids(
    pool: &PeerPool,
    cfg: &Config,
    me: NodeId,
    book: &AddrBook,
    notifier: &Notifier,
) -> Vec<NodeId> {
    let mut ids: HashMap<SocketAddr, NodeId> = HashMap::new();
    ids.insert(cfg.listen.peer, me);
    loop {
        for &m in &cfg.cluster.initial_members {
            if ids.contains_key(&m) {
                continue;
            }
            let client = pool.client(m);
            if client.request_timeout(Message::Ping, Duration::from_secs(2)).await.is_ok()
                && let Some(id) = client.remote_node()
            {
                tracing::info!(member = %m, node = %id, "initial member answered");
                ids.insert(m, id);
                book.insert(id, m);
            }
        }
        if ids.len() == cfg.cluster.initial_members.len() {
            let mut v: Vec<NodeId> = ids.into_values().collect();
            v.sort();
            return v;
        }
        let missing: Vec<String> = cfg
            .cluster
            .initial_members
            .iter()
            .filter(|m| !ids.contains_key(m))
            .map(|m| m.to_string())
            .collect();
        notifier.status(&format!("waiting for initial members {}", missing.join(", ")));
        tracing::info!(missing = ?missing, "waiting for the other initial members to start");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn run(cfg: Config, opts: RunOptions) -> anyhow::Result<()> {
    // Logging started before the configuration was read: its filter
    // applies from here (it used to wait for the first SIGHUP).
    if let Some(handle) = &opts.log_reload
        && std::env::var_os("RUST_LOG").is_none()
        && cfg.log_filter.is_some()
    {
        apply_log_filter(&cfg, handle, "start");
    }
    let ident = Identity::load_or_create(&cfg.state_dir, cfg.node_id.map(NodeId), &cfg.cluster_name)
        .context("node identity")?;
    let span = tracing::info_span!("node", node = %ident.node_id);
    run_node(cfg, opts, ident).instrument(span).await
}

async fn run_node(cfg: Config, opts: RunOptions, mut ident: Identity) -> anyhow::Result<()> {
    let me = ident.node_id;
    let notifier = Arc::new(Notifier::from_env());
    spawn_watchdog(notifier.clone());
    notifier.status("opening the store");
    let node = if cfg.data_dirs.is_empty() {
        tracing::info!("no data directories: a compute node (stores nothing, owns and serves volumes)");
        Node::open_compute(me, cfg.payload_budget.0)
    } else {
        let store_cfg = StoreConfig { data_dirs: cfg.data_dirs.clone(), engine: cfg.engine };
        let store_opts = StoreOptions { flush_barrier: cfg.flush_barrier, ..StoreOptions::default() };
        Node::open_as(store_cfg, store_opts, cfg.payload_budget.0, Some(ident.node_id))
            .await
            .context("opening the store")?
    };
    // The volumes record into the node's registry; the collectors below
    // add what is read at scrape time.
    let metrics = node.metrics().clone();
    metrics.register_collector(Box::new(NodeCollector(node.clone())));

    // The peer protocol: a node that belongs to no cluster yet says so
    // with cluster id 0, which members accept only for joining.
    let cluster_id = ident.cluster_id.as_deref().and_then(|s| u128::from_str_radix(s, 16).ok()).unwrap_or(0);
    let cluster_cell = basalt::net::ClusterCell::new(ClusterId(cluster_id));
    let client_cfg = ClientConfig::new(cluster_cell.clone(), me);
    let peer_budget = client_cfg.peer_budget as u64;
    let pool = Arc::new(PeerPool::new(client_cfg));
    metrics.register_collector(Box::new(PeerCollector { pool: pool.clone(), peer_budget }));
    let book = Arc::new(AddrBook::default());
    let handler = Arc::new(Handler {
        daemon: OnceLock::new(),
        meta: OnceLock::new(),
        replica: OnceLock::new(),
        node: node.clone(),
    });
    let server_cfg = ServerConfig {
        assembly_budget: usize::try_from(cfg.peer.assembly_budget.0).unwrap_or(usize::MAX),
        frame_timeout: Duration::from_millis(cfg.peer.frame_timeout_ms),
        max_handshaking: cfg.peer.max_handshaking,
        ..ServerConfig::new(cluster_cell.clone(), me)
    };
    let peer_server = PeerServer::bind(cfg.listen.peer, server_cfg, handler.clone())
        .await
        .with_context(|| format!("listen.peer {}", cfg.listen.peer))?;
    metrics.register_collector(Box::new(PeerServerCollector(peer_server.shared_stats())));

    let store = RedbStore::open(&cfg.state_dir.join("meta.redb")).context("opening the metadata store")?;
    let fresh = !meta::LogStore::is_initialized(&store);
    let startup = if fresh && cfg.cluster.initial_members.contains(&cfg.listen.peer) {
        notifier.status("finding the initial members");
        let members = initial_member_ids(&pool, &cfg, me, &book, &notifier).await;
        tracing::info!(?members, "bootstrapping the metadata group with every initial member as voter");
        Startup::Initial { members, cluster_name: cfg.cluster_name.clone(), cluster_id: None }
    } else {
        Startup::Join
    };
    let mut mcfg = meta::MetaConfig::new(me);
    mcfg.tick = Duration::from_millis(cfg.raft.tick_ms);
    mcfg.core.election_ticks = cfg.raft.election_ticks;
    mcfg.core.heartbeat_ticks = cfg.raft.heartbeat_ticks;
    mcfg.core.snapshot_interval = cfg.raft.snapshot_entries;
    mcfg.core.retain_entries = (cfg.raft.snapshot_entries / 4).max(5);
    mcfg.core.max_voters = cfg.cluster.voters as usize;
    mcfg.core.liveness_ticks = (cfg.liveness.down_after_ms / cfg.raft.tick_ms).max(1);
    mcfg.heartbeat_interval = Duration::from_millis(cfg.liveness.heartbeat_ms);
    mcfg.request_timeout = (mcfg.tick * (cfg.raft.election_ticks as u32) * 4).max(Duration::from_secs(5));
    let transport = Arc::new(PeerTransport::new(pool.clone(), book.clone()));
    let report = NodeReport { spec: node_spec_of(&cfg, me), used: 0 };
    if report.spec.has_data && report.spec.capacity == 0 {
        // The metadata refuses such a node: it would wait forever to join.
        anyhow::bail!(
            "cannot tell the capacity of the data directories {:?} (statvfs failed or reports 0 bytes): \
             set `capacity` in the configuration",
            cfg.data_dirs
        );
    }
    let meta =
        MetaNode::start(mcfg, store, transport, report, startup).context("starting the metadata group")?;
    let _ = handler.meta.set(meta.clone());
    metrics.register_collector(Box::new(RaftCollector(meta.clone())));

    let daemon = Arc::new(Daemon::new(
        cfg.clone(),
        me,
        meta.clone(),
        pool.clone(),
        book.clone(),
        node.clone(),
        metrics.clone(),
        cluster_cell.clone(),
    ));
    let _ = handler.daemon.set(daemon.clone());

    // The admin API answers from here on: /readyz says why the node does
    // not serve yet, and `basalt node add` can reach a node that waits.
    let cancel = CancellationToken::new();
    // The admin API outlives the front ends, so /readyz can say "draining".
    let admin_cancel = CancellationToken::new();
    let mut servers = tokio::task::JoinSet::new();
    let admin = tokio::net::TcpListener::bind(cfg.listen.admin)
        .await
        .with_context(|| format!("listen.admin {}", cfg.listen.admin))?;
    let admin_addr = admin.local_addr()?;
    let control: Arc<dyn basalt::admin::Control> = daemon.clone();
    servers.spawn(
        basalt::admin::server::serve(admin, control, metrics.clone(), admin_cancel.clone()).in_current_span(),
    );

    if fresh && let Some(join) = cfg.cluster.join {
        notifier.status(&format!("joining the cluster through {join}"));
        daemon.join_through(join).await?;
    }
    notifier.status("waiting to be a member of the metadata group");
    let cluster = daemon.wait_membership(&notifier).await?;
    ident.set_cluster(&cfg.state_dir, &cluster.to_string()).context("recording the cluster id")?;
    cluster_cell.set(cluster);
    tracing::info!(cluster = %cluster, "member of the metadata group");

    // The replicated data path: this node owns volumes and serves them
    // from their replicas (its own, if it stores data, through the replica
    // service in process). A compute node has no replica service: its
    // volumes' replicas are all on other nodes.
    let latest = Arc::new(std::sync::RwLock::new(meta.subscribe().borrow().clone()));
    let local = match node.store() {
        Some(store) => {
            let fences = basalt::node::fence::Fences::open(&cfg.state_dir.join("fences"))
                .context("opening the fences")?;
            let view = latest.clone();
            let layout_of: basalt::node::replica::LayoutOf =
                Arc::new(move |v| view.read().unwrap().volume(v).map(|r| r.layout));
            // A fresh state dir has no mark and nothing to distrust.
            let crashed =
                take_clean_mark(&cfg.state_dir).context("reading the clean-shutdown mark")? && !fresh;
            let suspects = basalt::node::suspect::Suspects::open(&cfg.state_dir, store)
                .context("reading the record of replicas awaiting reconciliation")?;
            if crashed {
                let n = suspects.record_crash(store).context("recording the replicas dirty after a crash")?;
                tracing::warn!(
                    suspect = n,
                    "the last run did not shut down cleanly: replicas that were dirty wait for their owner to reconcile them"
                );
            } else if !suspects.is_empty() {
                tracing::warn!(
                    "replicas dirty after an earlier crash still wait for their owner to reconcile them"
                );
            }
            let service = basalt::node::replica::ReplicaService::with_suspects(
                store.clone(),
                fences,
                layout_of,
                suspects,
            );
            if let Some(m) = metrics.replica() {
                service.record_timing(m);
            }
            let _ = handler.replica.set(service.clone());
            let local: crate::replicas::LocalReplica = Arc::new(move |from, m| {
                let s = service.clone();
                Box::pin(async move { s.handle(from, m).await })
            });
            Some(local)
        }
        None => None,
    };
    let io = Arc::new(crate::replicas::DaemonIo {
        me,
        pool: pool.clone(),
        book: book.clone(),
        local,
        meta: meta.clone(),
        latest,
        state: meta.subscribe(),
        lease: crate::replicas::Lease::start(
            meta.clone(),
            Duration::from_millis(cfg.liveness.down_after_ms / 2),
        ),
    });
    let router = crate::replicas::Router::new(io);
    let owned = router.clone();
    metrics.register_collector(Box::new(ReplicationCollector(Box::new(move || owned.owned()))));
    let _ = daemon.router.set(router.clone());
    node.set_router(Arc::new(move |spec| router.route(spec)));

    // Keep the address book and the served volumes in step with the metadata.
    let tracker = TaskTracker::new();
    tokio::spawn(control::follow_metadata(daemon.clone(), cancel.clone()).in_current_span());

    daemon.adopt_local_volumes().await?;
    if let Some(demo) = &opts.demo {
        daemon.ensure_demo_volume(demo).await?;
    }

    let mut nbd_addr = None;
    let mut nbd_unix = None;
    let mut iscsi_addr = None;
    if let Some(a) = cfg.listen.nbd {
        let l = tokio::net::TcpListener::bind(a).await.with_context(|| format!("listen.nbd {a}"))?;
        nbd_addr = Some(l.local_addr()?);
        servers.spawn(
            basalt::export::nbd::serve(l, node.clone(), cancel.clone(), tracker.clone()).in_current_span(),
        );
    }
    if let Some(path) = &cfg.listen.nbd_unix {
        let sock = basalt::export::nbd::UnixSocket::bind(path).context("listen.nbd_unix")?;
        nbd_unix = Some(sock.path().to_path_buf());
        servers.spawn(
            basalt::export::nbd::serve_unix(sock, node.clone(), cancel.clone(), tracker.clone())
                .in_current_span(),
        );
    }
    if let Some(a) = cfg.listen.iscsi {
        let l = tokio::net::TcpListener::bind(a).await.with_context(|| format!("listen.iscsi {a}"))?;
        iscsi_addr = Some(l.local_addr()?);
        let chap = opts.iscsi_chap.clone().or_else(|| {
            let i = &cfg.iscsi;
            Some(basalt::proto::iscsi::login::ChapConfig {
                user: i.chap_user.clone()?,
                secret: i.chap_secret.clone()?,
                mutual: i.chap_mutual_user.clone().zip(i.chap_mutual_secret.clone()),
            })
        });
        let icfg = basalt::export::iscsi::IscsiConfig { chap, ..Default::default() };
        icfg.validate().map_err(|e| anyhow::anyhow!("iSCSI config: {e}"))?;
        servers.spawn(
            basalt::export::iscsi::serve(l, node.clone(), cancel.clone(), tracker.clone(), icfg)
                .in_current_span(),
        );
    }
    daemon.set_ready();
    notifier.notify("READY=1");
    notifier.status("serving");
    if let Some(demo) = &opts.demo {
        print_demo(&demo.name, nbd_addr, nbd_unix.as_deref(), iscsi_addr, admin_addr);
    }
    tracing::info!(admin = %admin_addr, nbd = ?nbd_addr, nbd_unix = ?nbd_unix, iscsi = ?iscsi_addr, "ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let stall = std::env::var("BASALT_DEBUG_STALL_RUNTIME_MS").ok().and_then(|s| s.parse::<u64>().ok());
    if let Some(ms) = stall {
        // Test hook for the watchdog: block every runtime worker.
        tracing::warn!(ms, "BASALT_DEBUG_STALL_RUNTIME_MS: stalling the runtime on purpose");
        for _ in 0..tokio::runtime::Handle::current().metrics().num_workers() {
            tokio::spawn(async move { std::thread::sleep(Duration::from_millis(ms)) });
        }
    }
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: draining"); break; }
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); break; }
            _ = hup.recv() => reload(&opts),
            Some(r) = servers.join_next() => {
                r?.context("a server stopped")?;
            }
        }
    }
    notifier.notify("STOPPING=1");
    notifier.status("draining connections");
    daemon.set_draining();
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(30), tracker.wait()).await.is_err() {
        tracing::warn!("connections did not drain in 30 s; flushing anyway");
    }
    notifier.status("flushing");
    node.close().await.context("final flush")?;
    // The mark speaks for the replicas of this node's store (a compute node has none).
    if node.store().is_some() {
        set_clean_mark(&cfg.state_dir).context("recording the clean shutdown")?;
    }
    admin_cancel.cancel();
    meta.shutdown().await;
    peer_server.shutdown().await;
    tracing::info!("flushed; bye");
    Ok(())
}

/// The mark a clean shutdown leaves in the state dir: every acknowledged
/// write was flushed. Absent at start means the last run crashed.
const CLEAN_MARK: &str = "clean-shutdown";

/// Whether the last run crashed; removes the mark (durably) so a crash of
/// this run is seen by the next.
fn take_clean_mark(state: &std::path::Path) -> std::io::Result<bool> {
    let p = state.join(CLEAN_MARK);
    match std::fs::remove_file(&p) {
        Ok(()) => {
            std::fs::File::open(state)?.sync_all()?;
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e),
    }
}

fn set_clean_mark(state: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::create(state.join(CLEAN_MARK))?.sync_all()?;
    std::fs::File::open(state)?.sync_all()
}

/// `nbd+unix:///NAME?socket=PATH`, the socket made absolute (a client
/// may run from another directory).
pub fn nbd_unix_uri(name: &str, path: &std::path::Path) -> String {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    format!("nbd+unix:///{name}?socket={}", abs.display())
}

fn reload(opts: &RunOptions) {
    let (Some(path), Some(handle)) = (&opts.config_path, &opts.log_reload) else {
        tracing::info!("SIGHUP: nothing to reload (no configuration file)");
        return;
    };
    let cfg = match std::fs::read_to_string(path).map_err(|e| e.to_string()).and_then(|t| {
        let c = Config::from_toml(&t).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(config = %path.display(), error = %e, "SIGHUP: configuration not reloaded");
            return;
        }
    };
    apply_log_filter(&cfg, handle, "SIGHUP");
}

/// The log filter of `cfg` (unless $RUST_LOG, which wins), applied now.
fn apply_log_filter(cfg: &Config, handle: &LogReload, why: &str) {
    let filter = std::env::var("RUST_LOG").ok().or(cfg.log_filter.clone()).unwrap_or_else(|| "info".into());
    match tracing_subscriber::EnvFilter::try_new(&filter) {
        Ok(f) => match handle.reload(f) {
            Ok(()) => tracing::info!(%filter, "{why}: log filter set"),
            Err(e) => tracing::warn!(error = %e, "{why}: log filter not set"),
        },
        Err(e) => tracing::warn!(%filter, error = %e, "{why}: bad log filter"),
    }
}

fn print_demo(
    name: &str,
    nbd: Option<SocketAddr>,
    nbd_unix: Option<&std::path::Path>,
    iscsi: Option<SocketAddr>,
    admin: SocketAddr,
) {
    if let Some(nbd_addr) = nbd {
        let uri = format!("nbd://{nbd_addr}/{name}");
        println!("basaltd demo: volume {name:?} at {uri}");
        println!("  nbdinfo {uri}");
        println!("  qemu-img info {uri}");
        println!("  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' {uri}");
        println!("  nbd-client -N {name} {} {} /dev/nbd0 -C 4", nbd_addr.ip(), nbd_addr.port());
    }
    if let Some(path) = nbd_unix {
        let uri = nbd_unix_uri(name, path);
        println!("NBD on a unix socket: {uri}");
        println!("  nbdinfo '{uri}'");
    }
    if let Some(a) = iscsi {
        let iqn = format!("iqn.2026-11.io.basalt:{name}");
        println!("iSCSI: iscsi://{a}/{iqn}/0");
        println!("  iscsi-inq iscsi://{a}/{iqn}/0");
        println!("  iscsiadm -m discovery -t st -p {a}");
    }
    println!("admin: basalt --admin {admin} cluster status");
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt::meta::MetaTransport;
    use basalt::net::ClientConfig;

    fn heartbeat(to: u64) -> raft::eraftpb::Message {
        let mut m = raft::eraftpb::Message::default();
        m.set_msg_type(raft::eraftpb::MessageType::MsgHeartbeat);
        m.to = to;
        m.from = 1;
        m
    }

    /// A Raft message for a node without a known address is dropped and
    /// counted (the `no_address` reason of the dropped-messages metric);
    /// one with an address is handed to the pool, not counted there.
    #[tokio::test]
    async fn raft_messages_to_a_node_without_an_address_are_counted() {
        let pool = Arc::new(PeerPool::new(ClientConfig::new(ClusterId(1), NodeId(1))));
        let book = Arc::new(AddrBook::default());
        let t = PeerTransport::new(pool.clone(), book.clone());
        let dropped = || pool.stats().dropped_no_address.load(Ordering::Relaxed);
        t.send(NodeId(7), heartbeat(7));
        t.send(NodeId(7), heartbeat(7));
        assert_eq!(dropped(), 2);
        assert_eq!(t.unknown.lock().unwrap()[&NodeId(7)].dropped, 2);
        // Known now (nothing listens there: the pool counts it as unreachable).
        book.insert(NodeId(7), "127.0.0.1:9".parse().unwrap());
        t.send(NodeId(7), heartbeat(7));
        assert_eq!(dropped(), 2, "sent with an address: not a no-address drop");
        assert!(t.unknown.lock().unwrap().is_empty(), "the node left the unknown list");
    }
}
