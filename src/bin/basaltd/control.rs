//! The daemon's side of the admin API and of cluster membership: turns
//! admin requests into metadata commands, metadata state into admin
//! answers, and keeps the served volumes in step with the metadata.

use crate::run::{AddrBook, DemoVolume, ShellRequest, ShellResponse, shell_request};
use basalt::admin::metrics::Metrics;
use basalt::admin::{
    ClusterStatus, Control, ControlError, ControlResult, CreateVolume, ExtentInfo, NodeAddresses, NodeInfo,
    Owner, ResizeVolume, VolumeHealth, VolumeInfo, VolumeVerify,
};
use basalt::config::Config;
use basalt::layout::Layout;
use basalt::meta::state::{
    Command, MetaState, NodeState, Rejection, Role, VolumeRecord, VolumeSpec as MetaVolumeSpec,
};
use basalt::meta::{ApplyOutcome, Consistency, MetaError, MetaNode};
use basalt::net::{ClusterCell, PeerPool};
use basalt::node::systemd::Notifier;
use basalt::node::{Node, VolumeSpec};
use basalt::types::{ClusterId, ExtentIndex, NodeId, VolumeId};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const STARTING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;

#[derive(Debug)]
pub struct Daemon {
    cfg: Config,
    me: NodeId,
    meta: MetaNode,
    pool: Arc<PeerPool>,
    book: Arc<AddrBook>,
    /// The volumes served here; a compute node's [`Node`] has no store.
    node: Arc<Node>,
    metrics: Arc<Metrics>,
    cluster: ClusterCell,
    phase: AtomicU8,
    /// One catalog sync at a time (the follower task and admin requests).
    syncing: tokio::sync::Mutex<()>,
    /// Volumes seen without an owner, and since when (on the leader).
    ownerless: std::sync::Mutex<std::collections::HashMap<VolumeId, std::time::Instant>>,
    /// Routes volumes to their owner (set once the replica service runs).
    pub router: std::sync::OnceLock<Arc<crate::replicas::Router>>,
    /// Takeovers proposed and not yet settled.
    taking: std::sync::Mutex<BTreeSet<VolumeId>>,
}

fn meta_error(e: MetaError) -> ControlError {
    let msg = basalt::units::error_chain(&e);
    match e {
        MetaError::NoLeader | MetaError::NoQuorum { .. } => ControlError::Unavailable(format!(
            "{msg}; metadata writes are refused until a majority of the voters can talk to each other"
        )),
        MetaError::Rejected(r) => match r {
            Rejection::VolumeNameExists(_)
            | Rejection::NodeExists(_)
            | Rejection::GenerationMismatch { .. } => ControlError::Conflict(msg),
            Rejection::NodeHoldsReplicas { .. } | Rejection::NodeOwnsVolumes { .. } => {
                ControlError::Conflict(format!(
                    "{msg}; delete or move its volumes first (draining a node comes with a later release)"
                ))
            }
            Rejection::ShrinkNotAllowed { .. } => ControlError::Conflict(format!(
                "{msg}: the data past the new size would be lost; to shrink anyway, pass --allow-shrink \
                 (\"allow_shrink\": true)"
            )),
            Rejection::ExtentPastEnd { .. } => ControlError::Conflict(msg),
            Rejection::ResizeSize(_) | Rejection::TooFewNodes { .. } => ControlError::Invalid(msg),
            Rejection::VolumeNotFound(_) | Rejection::NodeNotFound(_) => ControlError::NotFound(msg),
            Rejection::InvalidVolume(_) | Rejection::InvalidNode(_) | Rejection::InvalidReplicas(_) => {
                ControlError::Invalid(msg)
            }
            _ => ControlError::Internal(msg),
        },
        _ => ControlError::Internal(msg),
    }
}

fn parse_addr(s: &str) -> Option<SocketAddr> {
    s.parse().ok()
}

impl Daemon {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Config,
        me: NodeId,
        meta: MetaNode,
        pool: Arc<PeerPool>,
        book: Arc<AddrBook>,
        node: Arc<Node>,
        metrics: Arc<Metrics>,
        cluster: ClusterCell,
    ) -> Daemon {
        Daemon {
            cfg,
            me,
            meta,
            pool,
            book,
            node,
            metrics,
            cluster,
            phase: AtomicU8::new(STARTING),
            syncing: tokio::sync::Mutex::new(()),
            ownerless: Default::default(),
            router: std::sync::OnceLock::new(),
            taking: Default::default(),
        }
    }

    pub fn set_ready(&self) {
        self.phase.store(READY, Ordering::Release);
    }

    pub fn set_draining(&self) {
        self.phase.store(DRAINING, Ordering::Release);
    }

    /// Metadata requests from peers: joins and invitations here, the rest
    /// to the metadata group.
    pub async fn handle_shell_request(&self, req: ShellRequest) -> Result<ShellResponse, String> {
        let chain = |e: MetaError| basalt::units::error_chain(&e);
        match req {
            ShellRequest::Join(spec) => {
                let id = spec.id;
                self.meta.add_learner(spec.clone()).await.map_err(chain)?;
                if let Some(a) = parse_addr(&spec.addrs.peer) {
                    self.book.insert(id, a);
                }
                let answer = self.membership_answer().await?;
                tracing::info!(node = %id, peer = %spec.addrs.peer, "node joined as a learner");
                Ok(answer)
            }
            ShellRequest::Invite { cluster, members } => {
                let cluster = ClusterId(cluster);
                let mine = self.cluster.get();
                if mine.0 != 0 && mine != cluster {
                    return Err(format!("node {} already belongs to cluster {mine}", self.me));
                }
                let state = self.meta.read(Consistency::Stale).await.map_err(chain)?;
                if state.cluster().is_some_and(|c| c.id.0 != cluster.0) {
                    return Err(format!("node {} already belongs to another cluster", self.me));
                }
                for (id, addr) in members {
                    if let Some(a) = parse_addr(&addr) {
                        self.book.insert(id, a);
                    }
                }
                self.cluster.set(cluster);
                tracing::info!(%cluster, "invited into a cluster; waiting for the leader's snapshot");
                Ok(ShellResponse::Invited { spec: crate::run::node_spec_of(&self.cfg, self.me) })
            }
            ShellRequest::Meta(req) => {
                self.meta.handle_request(req).await.map(ShellResponse::Meta).map_err(chain)
            }
        }
    }

    /// What a joiner needs to hear the cluster: its id and every member's
    /// peer address, the leader's above all. The joiner answers Raft only
    /// to addresses it knows, so an answer without the leader's leaves it
    /// hearing heartbeats it cannot acknowledge, and the leader never
    /// sends it a snapshot. A node still starting (its own state not yet
    /// caught up, its cluster id not yet known) has no such answer: it
    /// says so, and the joiner asks again.
    async fn membership_answer(&self) -> Result<ShellResponse, String> {
        let chain = |e: MetaError| basalt::units::error_chain(&e);
        let state = self.meta.read(Consistency::Linearizable).await.map_err(chain)?;
        let Some(cluster) = state.cluster() else {
            return Err("this node is still starting (it knows no cluster id yet)".into());
        };
        let members: Vec<(NodeId, String)> =
            state.nodes().map(|n| (n.spec.id, n.spec.addrs.peer.clone())).collect();
        if let Some(leader) = self.meta.status().leader
            && !members.iter().any(|(id, _)| *id == leader)
        {
            return Err(format!(
                "this node is still starting (the leader, node {leader}, is not registered yet)"
            ));
        }
        Ok(ShellResponse::Joined { cluster: cluster.id.0, members })
    }

    /// A fresh node with `cluster.join`: asks a member to add it, retrying
    /// until one does.
    pub async fn join_through(&self, addr: SocketAddr) -> anyhow::Result<()> {
        let spec = crate::run::node_spec_of(&self.cfg, self.me);
        loop {
            match shell_request(&self.pool, addr, &ShellRequest::Join(spec.clone())).await {
                // An answer without a cluster id or members (an older
                // member that was still starting) would leave this node
                // unable to answer the leader: ask again.
                Ok(ShellResponse::Joined { cluster, members }) if cluster == 0 || members.is_empty() => {
                    tracing::warn!(through = %addr, "the member is still starting; retrying the join");
                }
                Ok(ShellResponse::Joined { cluster, members }) => {
                    let cluster = ClusterId(cluster);
                    for (id, a) in members {
                        if let Some(a) = parse_addr(&a) {
                            self.book.insert(id, a);
                        }
                    }
                    self.cluster.set(cluster);
                    tracing::info!(%cluster, through = %addr, "joined; waiting for the leader's snapshot");
                    return Ok(());
                }
                Ok(other) => tracing::warn!(through = %addr, answer = ?other, "unexpected answer to a join"),
                Err(e) => tracing::warn!(through = %addr, error = %e, "join failed; retrying"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Waits until this node is in the Raft configuration of a cluster
    /// with an id; returns the id.
    pub async fn wait_membership(&self, notifier: &Notifier) -> anyhow::Result<ClusterId> {
        let mut w = self.meta.subscribe();
        let mut said = false;
        loop {
            {
                let s = w.borrow_and_update().clone();
                if let (Some(c), Some(_), Some(_)) = (s.cluster(), s.role(self.me), s.node(self.me)) {
                    self.book.refresh(&s);
                    return Ok(ClusterId(c.id.0));
                }
            }
            if !said {
                said = true;
                if self.cfg.cluster.initial_members.is_empty() && self.cfg.cluster.join.is_none() {
                    notifier.status("waiting for an invitation (basalt node add)");
                    tracing::info!(peer = %self.cfg.listen.peer,
                        "not a member of any cluster: waiting for `basalt node add {}` on a member", self.cfg.listen.peer);
                }
            }
            match tokio::time::timeout(std::time::Duration::from_secs(15), w.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => anyhow::bail!("the metadata group stopped"),
                Err(_) => {
                    let s = w.borrow().clone();
                    tracing::warn!(
                        cluster = s.cluster().is_some(),
                        member = s.role(self.me).is_some(),
                        registered = s.node(self.me).is_some(),
                        leader = ?self.meta.status().leader,
                        "still not a registered member of the metadata group"
                    );
                }
            }
        }
    }

    /// `demo --nodes 1`: the demo volume, created (owned by this node) if absent.
    pub async fn ensure_demo_volume(&self, demo: &DemoVolume) -> anyhow::Result<()> {
        let state = self.meta.read(Consistency::Linearizable).await?;
        if let Some(v) = state.volume_by_name(&demo.name) {
            if v.size != demo.opts.size {
                tracing::warn!(volume = %demo.name, existing = v.size, requested = demo.opts.size,
                    "volume exists with another size; serving it as it is");
            }
        } else {
            let l = demo.opts.layout;
            let req = CreateVolume {
                name: demo.name.clone(),
                size: demo.opts.size,
                replicas: Some(demo.opts.replicas),
                min_replicas: Some(demo.opts.min_replicas),
                extent_size: Some(l.extent_size),
                stripe_unit: Some(l.stripe_unit),
                stripe_width: Some(l.stripe_width),
                read_only: demo.opts.read_only,
            };
            self.create(req).await.map_err(|e| anyhow::anyhow!("creating the demo volume: {e}"))?;
        }
        let state = self.meta.read(Consistency::Stale).await?;
        self.sync_volumes(&state).await;
        Ok(())
    }

    /// Opens the volumes this node owns; closes the ones it no longer
    /// does; removes the replicas of deleted volumes.
    async fn sync_volumes(&self, state: &MetaState) {
        let node = &self.node;
        let all: Vec<VolumeSpec> = state.volumes().map(node_spec).collect();
        // Every node serves every volume: as its owner, or by waiting for
        // (or taking) ownership when the owner is gone.
        let owned: BTreeSet<VolumeId> = if self.router.get().is_some() {
            state.volumes().map(|v| v.id).collect()
        } else {
            state.volumes().filter(|v| v.owner == Some(self.me)).map(|v| v.id).collect()
        };
        let _one_at_a_time = self.syncing.lock().await;
        match node.sync_catalog(&all, &owned, state.next_volume_id()).await {
            Ok(removed) => {
                for name in removed {
                    self.metrics.remove_volume(&name);
                }
            }
            Err(e) => {
                tracing::error!(error = %basalt::units::error_chain(&e), "following the metadata failed")
            }
        }
    }

    /// Before serving: every volume of the local catalog must be one the
    /// metadata knows. A node upgraded from the single-node slice brings its
    /// volumes into a cluster it bootstraps (same ids, owned here); anything
    /// else unknown is refused.
    pub async fn adopt_local_volumes(&self) -> anyhow::Result<()> {
        // A compute node's catalog is in memory: nothing to adopt.
        let mut local = self.node.catalog_specs();
        local.sort_by_key(|v| v.id);
        for v in local {
            // After every node restarted, the group may take a while to
            // elect a leader: wait for one rather than exit.
            let mut tries = 0;
            let state = loop {
                match self.meta.read(Consistency::Linearizable).await {
                    Ok(s) => break s,
                    Err(e) if tries < 24 => {
                        tries += 1;
                        tracing::info!(error = %basalt::units::error_chain(&e), "metadata not readable yet; waiting for a leader");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            if let Some(m) = state.volume(v.id) {
                if m.name != v.name {
                    anyhow::bail!(
                        "local volume {:?} ({}) is {:?} in the cluster's metadata: this data directory belongs to another cluster",
                        v.name,
                        v.id,
                        m.name
                    );
                }
                continue;
            }
            if v.id < state.next_volume_id() {
                continue; // deleted while this node was away: sync removes it
            }
            if state.next_volume_id() != v.id || state.volume_by_name(&v.name).is_some() {
                anyhow::bail!(
                    "local volume {:?} ({}) is not in the cluster's metadata and cannot keep its id there \
                     (next id {}); export it with an older basaltd or move its data directory away",
                    v.name,
                    v.id,
                    state.next_volume_id()
                );
            }
            let spec = MetaVolumeSpec {
                name: v.name.clone(),
                size: v.size,
                replicas: v.replicas,
                min_replicas: v.min_replicas,
                extent_size: v.layout.extent_size,
                stripe_unit: v.layout.stripe_unit,
                stripe_width: v.layout.stripe_width,
                read_only: v.read_only,
            };
            match self.meta.propose(Command::CreateVolume { spec }).await? {
                ApplyOutcome::VolumeCreated(id) if id == v.id => {}
                other => anyhow::bail!("adopting local volume {:?}: the metadata answered {other:?}", v.name),
            }
            self.meta
                .propose(Command::SetOwner {
                    volume: v.id,
                    owner: Some(self.me),
                    expected: basalt::meta::Generation(0),
                })
                .await?;
            tracing::info!(volume = %v.name, id = %v.id, "adopted a local volume into the cluster's metadata");
        }
        Ok(())
    }

    fn volume_info(&self, state: &MetaState, v: &VolumeRecord, extents: bool) -> VolumeInfo {
        let extents = extents.then(|| {
            (0..v.extent_count())
                .map(|i| {
                    let idx = ExtentIndex(i);
                    let (epoch, nodes) =
                        state.replicas(v.id, idx).unwrap_or((state.epoch(v.id, idx), Vec::new()));
                    let replicas: Vec<u64> = nodes.iter().map(|n| n.0).collect();
                    let state_s = if replicas.len() < v.replicas as usize {
                        ExtentInfo::DEGRADED
                    } else {
                        ExtentInfo::HEALTHY
                    };
                    ExtentInfo { index: i, epoch: epoch.0, replicas, state: state_s.into() }
                })
                .collect::<Vec<_>>()
        });
        let health = extents.as_deref().map(VolumeHealth::of);
        VolumeInfo {
            id: v.id.0,
            name: v.name.clone(),
            size: v.size,
            replicas: v.replicas,
            min_replicas: v.min_replicas,
            extent_size: v.layout.extent_size,
            stripe_unit: v.layout.stripe_unit,
            stripe_width: v.layout.stripe_width,
            read_only: v.read_only,
            owner: v.owner.map(|o| Owner { node: o.0, generation: v.generation.0 }),
            extents,
            health,
        }
    }

    async fn state(&self, stale: bool) -> Result<Arc<MetaState>, ControlError> {
        let c = if stale { Consistency::Stale } else { Consistency::Linearizable };
        self.meta.read(c).await.map_err(meta_error)
    }

    async fn create(&self, req: CreateVolume) -> Result<VolumeInfo, ControlError> {
        let state = self.state(false).await?;
        let data_nodes = state.nodes().filter(|n| n.spec.has_data && n.state == NodeState::Up).count() as u32;
        let replicas = req.replicas.unwrap_or_else(|| 3.min(data_nodes.max(1)));
        let min_replicas = req.min_replicas.unwrap_or(if replicas >= 3 { 2 } else { 1 });
        let extent_size = req.extent_size.unwrap_or(Layout::DEFAULT_EXTENT_SIZE);
        let stripe_unit = req.stripe_unit.unwrap_or(extent_size);
        let stripe_width = req.stripe_width.unwrap_or(1);
        Layout::new(extent_size, stripe_unit, stripe_width)
            .map_err(|e| ControlError::Invalid(e.to_string()))?;
        if replicas > data_nodes {
            return Err(ControlError::Invalid(format!(
                "{replicas} replicas need {replicas} nodes with data directories that are up; the cluster has \
                 {data_nodes}: bring nodes back up or add some, or ask for fewer (--replicas)"
            )));
        }
        let spec = MetaVolumeSpec {
            name: req.name.clone(),
            size: req.size,
            replicas,
            min_replicas,
            extent_size,
            stripe_unit,
            stripe_width,
            read_only: req.read_only,
        };
        let id = match self.meta.propose(Command::CreateVolume { spec }).await.map_err(meta_error)? {
            ApplyOutcome::VolumeCreated(id) => id,
            other => return Err(ControlError::Internal(format!("unexpected outcome {other:?}"))),
        };
        // The volume's first owner is the node that created it. Should this
        // future be dropped or this node crash right here, the leader gives
        // the volume an owner (`adopt_orphans`).
        let owner = owner_for(self);
        let set = Command::SetOwner { volume: id, owner: Some(owner), expected: basalt::meta::Generation(0) };
        let outcome = match self.meta.propose(set).await {
            // The leader gave it an owner first.
            Err(MetaError::Rejected(Rejection::GenerationMismatch { .. })) => None,
            r => Some(r.map_err(meta_error)?),
        };
        tracing::info!(volume = %req.name, %id, %owner, ?outcome, "volume created");
        let state = self.state(true).await?;
        self.sync_volumes(&state).await;
        let v = state.volume(id).ok_or_else(|| ControlError::Internal("created volume vanished".into()))?;
        Ok(self.volume_info(&state, v, true))
    }

    async fn resize(&self, name: String, req: ResizeVolume) -> Result<VolumeInfo, ControlError> {
        let state = self.state(false).await?;
        let v = Self::volume_by_name(&state, &name)?;
        let id = v.id;
        let served = self.node.volume(&name).filter(|vol| vol.spec().id == id);
        // A shrink is checked against the clients where they connect: the
        // owner (today the only node serving the volume).
        let _hold = match (&served, v.owner) {
            _ if req.size >= v.size || !req.allow_shrink => None,
            (Some(vol), Some(owner)) if owner == self.me => Some(
                vol.begin_shrink(req.size)
                    .map_err(|e| ControlError::Conflict(format!("cannot shrink volume {name:?}: {e}")))?,
            ),
            (_, Some(owner)) => {
                let admin =
                    state.node(owner).map_or_else(|| "unknown".into(), |n| n.spec.addrs.admin.clone());
                return Err(ControlError::Conflict(format!(
                    "volume {name:?} is served by node {owner}: shrink it through that node's admin API \
                     (basalt --admin {admin}), which knows the clients connected to it"
                )));
            }
            (_, None) => None,
        };
        let command = Command::ResizeVolume { volume: id, size: req.size, allow_shrink: req.allow_shrink };
        let outcome = self.meta.propose(command).await.map_err(meta_error)?;
        tracing::info!(volume = %name, %id, ?outcome, "volume resize committed");
        let state = self.state(true).await?;
        self.sync_volumes(&state).await;
        let v =
            state.volume(id).ok_or_else(|| ControlError::NotFound(format!("no volume named {name:?}")))?;
        if let Some(vol) = served.as_ref().filter(|_| v.owner == Some(self.me))
            && vol.size() != v.size
        {
            return Err(ControlError::Internal(format!(
                "the metadata has volume {name:?} at {} bytes, but this node still serves {}: see its log; \
                 it tries again at the next metadata change or restart",
                v.size,
                vol.size()
            )));
        }
        Ok(self.volume_info(&state, v, false))
    }

    fn volume_by_name<'a>(state: &'a MetaState, name: &str) -> Result<&'a VolumeRecord, ControlError> {
        state.volume_by_name(name).ok_or_else(|| ControlError::NotFound(format!("no volume named {name:?}")))
    }
}

fn node_spec(v: &VolumeRecord) -> VolumeSpec {
    VolumeSpec {
        id: v.id,
        name: v.name.clone(),
        size: v.size,
        layout: v.layout,
        replicas: v.replicas,
        min_replicas: v.min_replicas,
        read_only: v.read_only,
    }
}

impl Control for Daemon {
    fn cluster(&self, stale: bool) -> ControlResult<'_, ClusterStatus> {
        Box::pin(async move {
            let state = self.state(stale).await?;
            let st = self.meta.status();
            let info = state.cluster();
            let nodes = state
                .nodes()
                .map(|n| {
                    let role = match state.role(n.spec.id) {
                        Some(Role::Voter) => "voter",
                        Some(Role::Learner) => "learner",
                        None => "none",
                    };
                    NodeInfo {
                        id: n.spec.id.0,
                        zone: n.spec.zone.clone(),
                        state: match n.state {
                            NodeState::Up => "up".into(),
                            NodeState::Down => "down".into(),
                        },
                        role: role.into(),
                        capacity: n.spec.capacity,
                        used: n.used,
                        pid: n.spec.pid,
                        addresses: NodeAddresses {
                            peer: parse_addr(&n.spec.addrs.peer).unwrap_or(([0, 0, 0, 0], 0).into()),
                            nbd: parse_addr(&n.spec.addrs.nbd),
                            iscsi: parse_addr(&n.spec.addrs.iscsi),
                            admin: parse_addr(&n.spec.addrs.admin).unwrap_or(([0, 0, 0, 0], 0).into()),
                        },
                    }
                })
                .collect();
            Ok(ClusterStatus {
                id: info.map_or_else(String::new, |c| c.id.to_string()),
                name: info.map_or_else(String::new, |c| c.name.clone()),
                this_node: self.me.0,
                leader: st.leader.map(|l| l.0),
                term: st.term,
                commit_index: st.commit_index,
                applied_index: st.applied_index,
                nodes,
            })
        })
    }

    fn add_node(&self, peer: SocketAddr) -> ControlResult<'_, NodeInfo> {
        Box::pin(async move {
            let state = self.state(false).await?;
            let cluster = self.cluster.get();
            let members = state.nodes().map(|n| (n.spec.id, n.spec.addrs.peer.clone())).collect();
            let spec = match shell_request(
                &self.pool,
                peer,
                &ShellRequest::Invite { cluster: cluster.0, members },
            )
            .await
            {
                Ok(ShellResponse::Invited { spec }) => spec,
                Ok(other) => return Err(ControlError::Internal(format!("unexpected answer {other:?}"))),
                Err(e) => {
                    return Err(ControlError::Unavailable(format!(
                        "cannot invite the node at {peer}: {e} (is its basaltd running with listen.peer = {peer}?)"
                    )));
                }
            };
            let id = spec.id;
            self.book.insert(id, peer);
            self.meta.add_learner(spec).await.map_err(meta_error)?;
            let status = self.cluster(true).await?;
            status
                .nodes
                .into_iter()
                .find(|n| n.id == id.0)
                .ok_or_else(|| ControlError::Internal("the added node is not in the metadata".into()))
        })
    }

    fn remove_node(&self, id: u64) -> ControlResult<'_, ()> {
        Box::pin(async move {
            let state = self.state(false).await?;
            if state.node(NodeId(id)).is_none() && state.role(NodeId(id)).is_none() {
                return Err(ControlError::NotFound(format!("no node {id}")));
            }
            self.meta.remove_node(NodeId(id)).await.map_err(meta_error)
        })
    }

    fn volumes(&self, stale: bool) -> ControlResult<'_, Vec<VolumeInfo>> {
        Box::pin(async move {
            let state = self.state(stale).await?;
            Ok(state.volumes().map(|v| self.volume_info(&state, v, false)).collect())
        })
    }

    fn volume(&self, name: String, stale: bool) -> ControlResult<'_, VolumeInfo> {
        Box::pin(async move {
            let state = self.state(stale).await?;
            let v = Self::volume_by_name(&state, &name)?;
            Ok(self.volume_info(&state, v, true))
        })
    }

    fn create_volume(&self, req: CreateVolume) -> ControlResult<'_, VolumeInfo> {
        Box::pin(self.create(req))
    }

    fn delete_volume(&self, name: String) -> ControlResult<'_, ()> {
        Box::pin(async move {
            let state = self.state(false).await?;
            let id: VolumeId = Self::volume_by_name(&state, &name)?.id;
            self.meta.propose(Command::DeleteVolume { volume: id }).await.map_err(meta_error)?;
            let state = self.state(true).await?;
            self.sync_volumes(&state).await;
            Ok(())
        })
    }

    fn resize_volume(&self, name: String, req: ResizeVolume) -> ControlResult<'_, VolumeInfo> {
        Box::pin(self.resize(name, req))
    }

    fn verify_volume(&self, name: String) -> ControlResult<'_, VolumeVerify> {
        Box::pin(async move {
            let state = self.state(false).await?;
            crate::verify::verify(&state, &self.pool, &name).await
        })
    }

    fn ready(&self) -> Result<(), String> {
        match self.phase.load(Ordering::Acquire) {
            READY => {}
            DRAINING => return Err("draining".into()),
            _ => return Err("starting: joining the metadata group".into()),
        }
        let st = self.meta.status();
        if st.leader.is_none() {
            return Err("no metadata leader known".into());
        }
        Ok(())
    }
}

/// The node a volume without an owner goes to: this one. Every node can
/// own a volume (one without data directories serves it from replicas on
/// the others), and the node that creates or adopts it is as good as any.
fn owner_for(d: &Daemon) -> NodeId {
    d.me
}

/// On the leader: a volume left without an owner (its creator crashed, or
/// its admin request was dropped, between the create and the owner
/// commits) gets one, so no volume stays unserved.
fn adopt_orphans(d: &Arc<Daemon>, state: &MetaState) {
    let mut seen = d.ownerless.lock().unwrap();
    if d.meta.status().leader != Some(d.me) {
        seen.clear();
        return;
    }
    let now = std::time::Instant::now();
    seen.retain(|id, _| state.volume(*id).is_some_and(|v| v.owner.is_none()));
    // Left alone for a few seconds first: the creating node sets the owner
    // itself right after the create commits.
    let due: Vec<&VolumeRecord> = state
        .volumes()
        .filter(|v| v.owner.is_none())
        .filter(|v| now.duration_since(*seen.entry(v.id).or_insert(now)) >= Duration::from_secs(5))
        .collect();
    for v in due {
        let owner = owner_for(d);
        let (d, id, expected) = (d.clone(), v.id, v.generation);
        tokio::spawn(async move {
            let r = d.meta.propose(Command::SetOwner { volume: id, owner: Some(owner), expected }).await;
            match r {
                Ok(_) => tracing::info!(volume = %id, %owner, "gave an ownerless volume an owner"),
                Err(e) => {
                    tracing::debug!(volume = %id, error = %basalt::units::error_chain(&e), "owner not set")
                }
            }
        });
    }
}

/// A volume whose owner is down (or that has none) and that clients reach
/// through this node becomes this node's: the owner record moves here with
/// generation + 1. The leader marks a node down only after its liveness
/// timeout, and a node stops serving when half of that has passed without
/// an acknowledged heartbeat, so the old owner has stopped by now; the
/// replicas refuse its generation from the new owner's first request on.
fn take_over(d: &Arc<Daemon>, state: &MetaState) {
    let node = &d.node;
    if d.router.get().is_none() {
        return;
    }
    let recent = |v: &basalt::node::volume::Volume| {
        v.nbd_clients() > 0 || v.last_unserved().is_some_and(|t| t.elapsed() < Duration::from_secs(30))
    };
    for vol in node.volumes() {
        let Some(rec) = state.volume(vol.spec().id) else { continue };
        let owner_live = rec.owner.is_some_and(|o| state.node(o).is_some_and(|n| n.state == NodeState::Up));
        if rec.owner == Some(d.me) || owner_live || !recent(&vol) {
            continue;
        }
        if !d.taking.lock().unwrap().insert(rec.id) {
            continue;
        }
        let (d, id, expected, old) = (d.clone(), rec.id, rec.generation, rec.owner);
        tokio::spawn(async move {
            let r = d.meta.propose(Command::SetOwner { volume: id, owner: Some(d.me), expected }).await;
            match r {
                Ok(_) => {
                    tracing::warn!(volume = %id, old_owner = ?old.map(|o| o.0), generation = expected.0 + 1,
                    "took over a volume whose owner is down")
                }
                Err(e) => {
                    tracing::info!(volume = %id, error = %basalt::units::error_chain(&e), "takeover not committed")
                }
            }
            d.taking.lock().unwrap().remove(&id);
        });
    }
}

/// Follows the applied metadata: peer addresses, the volumes served here,
/// and (on the leader) owners for ownerless volumes.
pub async fn follow_metadata(d: Arc<Daemon>, cancel: CancellationToken) {
    let mut w = d.meta.subscribe();
    loop {
        {
            let s = w.borrow_and_update().clone();
            d.book.refresh(&s);
            if let Some(r) = d.router.get() {
                *r.io.latest.write().unwrap() = s.clone();
            }
            d.sync_volumes(&s).await;
            d.node.reroute();
            take_over(&d, &s);
            adopt_orphans(&d, &s);
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = w.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
