//! The daemon's side of the replicated data path: how an owner here reaches
//! replicas (this node's own replica service in process, the others over
//! the peer pool), reads replica sets from the metadata and commits new
//! ones, keeps its liveness lease; and which route each volume takes.

use crate::run::AddrBook;
use basalt::meta::state::{Command, MetaState, NodeState};
use basalt::meta::{Consistency, MetaNode};
use basalt::net::{PeerError, PeerPool};
use basalt::node::VolumeSpec;
use basalt::node::forward::Forwarder;
use basalt::node::replicated::{BoxFuture, CallError, ClusterIo, Replicated};
use basalt::node::volume::Route;
use basalt::proto::peer::Message;
use basalt::types::{Epoch, ExtentIndex, Generation, NodeId, VolumeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// A request to a replica that takes longer than this counts as failed:
/// the replica leaves the extent's set.
pub const REPLICA_TIMEOUT: Duration = Duration::from_secs(8);

/// Answers one extent request with this node's replica service.
pub type LocalReplica = Arc<dyn Fn(NodeId, Message) -> BoxFuture<Message> + Send + Sync>;

pub struct DaemonIo {
    pub me: NodeId,
    pub pool: Arc<PeerPool>,
    pub book: Arc<AddrBook>,
    /// This node's replica service, called in process; `None` on a node
    /// without data directories, which placement never names a replica.
    pub local: Option<LocalReplica>,
    pub meta: MetaNode,
    /// The metadata as last applied here.
    pub latest: Arc<RwLock<Arc<MetaState>>>,
    /// The same, at once (the daemon's copy above follows it a moment later).
    pub state: watch::Receiver<Arc<MetaState>>,
    /// This node's liveness lease.
    pub lease: Lease,
}

/// This node's liveness lease as the data path may trust it. It runs from
/// the last acknowledged heartbeat for `length` (half the time after which
/// the leader marks a node down, so it stops well before another node may
/// take its volumes); after a lapse, or at the first acknowledgement, it
/// is valid again only once a linearizable read has brought this node's
/// metadata up to the leader's. Before that rule, an owner cut off by a
/// partition regained its lease with the first heartbeat after the heal,
/// before it had applied the takeover it missed, and served one read of
/// its stale copy (`replicated_faults::partitioned_owner_is_fenced_*`:
/// "R zero" after the new owner's write).
pub struct Lease {
    confirmed: watch::Receiver<Option<Instant>>,
    length: Duration,
}

impl Lease {
    /// Follows `meta`'s acknowledgements from now on (in a task).
    pub fn start(meta: MetaNode, length: Duration) -> Lease {
        let (tx, confirmed) = watch::channel(None::<Instant>);
        let mut acks = meta.liveness_acks();
        tokio::spawn(async move {
            loop {
                let ack = *acks.borrow_and_update();
                if let Some(t) = ack {
                    // Continuous: acknowledged before the last trusted one ran out.
                    let continuous = tx.borrow().is_some_and(|c| t.saturating_duration_since(c) < length);
                    if continuous {
                        tx.send_replace(Some(t));
                    } else {
                        match meta.read(Consistency::Linearizable).await {
                            // Current as of after `t`: whatever the leader had
                            // committed when it acknowledged is applied here.
                            Ok(_) => {
                                tx.send_replace(Some(t));
                            }
                            Err(e) => {
                                tracing::debug!(error = %basalt::units::error_chain(&e),
                                    "lease not renewed: the metadata could not be read from the leader");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                        }
                    }
                }
                if acks.changed().await.is_err() || tx.is_closed() {
                    return;
                }
            }
        });
        Lease { confirmed, length }
    }

    fn valid(&self) -> bool {
        self.confirmed.borrow().is_some_and(|t| t.elapsed() < self.length)
    }
}

/// The committed replica set of an extent: the recorded exception, else
/// the placement of the volume's map version.
pub fn replica_set(state: &MetaState, volume: VolumeId, extent: ExtentIndex) -> Option<(Epoch, Vec<NodeId>)> {
    match state.replicas(volume, extent) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(%volume, %extent, error = %e, "no replica set for the extent");
            None
        }
    }
}

impl ClusterIo for DaemonIo {
    fn me(&self) -> NodeId {
        self.me
    }

    fn call(&self, node: NodeId, request: Message) -> BoxFuture<Result<Message, CallError>> {
        if node == self.me {
            let Some(local) = &self.local else {
                // Only a replica set recorded by hand could name this node.
                tracing::warn!(kind = ?request.kind(), "an extent request for this node, which stores no data");
                return Box::pin(async { Err(CallError::Unreachable) });
            };
            let r = local(self.me, request);
            return Box::pin(async move { Ok(r.await) });
        }
        let Some(addr) = self.book.get(node) else {
            return Box::pin(async { Err(CallError::Unreachable) });
        };
        let pool = self.pool.clone();
        Box::pin(async move {
            match pool.client(addr).request_timeout(request, REPLICA_TIMEOUT).await {
                Ok(m) => Ok(m),
                Err(PeerError::Timeout { .. }) => Err(CallError::Timeout),
                Err(_) => Err(CallError::Unreachable),
            }
        })
    }

    fn view(&self, volume: VolumeId, extent: ExtentIndex) -> Option<(Epoch, Vec<NodeId>)> {
        replica_set(&self.latest.read().unwrap(), volume, extent)
    }

    fn propose(
        &self,
        volume: VolumeId,
        extent: ExtentIndex,
        epoch: Epoch,
        replicas: Vec<NodeId>,
    ) -> BoxFuture<Result<(), String>> {
        let meta = self.meta.clone();
        Box::pin(async move {
            meta.propose(Command::SetExtentReplicas { volume, extent, epoch, replicas })
                .await
                .map(|_| ())
                .map_err(|e| basalt::units::error_chain(&e))
        })
    }

    fn lease_valid(&self) -> bool {
        self.lease.valid()
    }

    fn owns(&self, volume: VolumeId, generation: Generation) -> bool {
        self.state
            .borrow()
            .volume(volume)
            .is_some_and(|v| v.owner == Some(self.me) && v.generation.0 == generation.0)
    }

    fn data_nodes(&self) -> Vec<NodeId> {
        let state = self.latest.read().unwrap().clone();
        state.nodes().filter(|n| n.spec.has_data && n.state == NodeState::Up).map(|n| n.spec.id).collect()
    }

    fn lease_wait(&self, deadline: tokio::time::Instant) -> BoxFuture<bool> {
        let mut acks = self.lease.confirmed.clone();
        let lease = self.lease.length;
        Box::pin(async move {
            loop {
                if acks.borrow_and_update().is_some_and(|t| t.elapsed() < lease) {
                    return true;
                }
                match tokio::time::timeout_at(deadline, acks.changed()).await {
                    Ok(Ok(())) => {}
                    _ => return false,
                }
            }
        })
    }
}

/// Which route each volume takes from this node, from the metadata.
pub struct Router {
    pub io: Arc<DaemonIo>,
    owners: Mutex<HashMap<VolumeId, Arc<Replicated>>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").field("owned", &self.owners.lock().unwrap().len()).finish()
    }
}

impl Router {
    pub fn new(io: Arc<DaemonIo>) -> Arc<Router> {
        Arc::new(Router { io, owners: Mutex::default() })
    }

    /// The volumes this node owns now, by name (for metrics).
    pub fn owned(&self) -> Vec<(String, Arc<Replicated>)> {
        let state = self.io.latest.read().unwrap().clone();
        let owners = self.owners.lock().unwrap();
        owners.iter().filter_map(|(id, r)| Some((state.volume(*id)?.name.clone(), r.clone()))).collect()
    }

    /// The route of `spec` now.
    pub fn route(&self, spec: &VolumeSpec) -> Route {
        let state = self.io.latest.read().unwrap().clone();
        let me = self.io.me;
        let Some(v) = state.volume(spec.id) else {
            return Route::Unavailable(format!("volume {} is not in the metadata", spec.name));
        };
        let mut owners = self.owners.lock().unwrap();
        if v.owner != Some(me) {
            owners.remove(&v.id);
            return match v.owner {
                Some(o) => match (state.node(o).map(|n| n.state), self.io.book.get(o)) {
                    (Some(NodeState::Up), Some(addr)) => Route::Forward(Arc::new(Forwarder::new(
                        self.io.pool.client(addr),
                        v.id,
                        Generation(v.generation.0),
                    ))),
                    (Some(NodeState::Up), None) => {
                        Route::Unavailable(format!("volume {}'s owner {o} has no known address", v.name))
                    }
                    _ => Route::Unavailable(format!(
                        "volume {}'s owner {o} is down: waiting for a takeover",
                        v.name
                    )),
                },
                None => Route::Unavailable(format!("volume {} has no owner yet", v.name)),
            };
        }
        // The single-node slice: one data node, this one, holds everything.
        let mut data_nodes = state.nodes().filter(|n| n.spec.has_data);
        if let (Some(only), None) = (data_nodes.next(), data_nodes.next())
            && only.spec.id == me
            && v.replicas == 1
        {
            owners.remove(&v.id);
            return Route::Local;
        }
        if let Some(r) = owners.get(&v.id)
            && r.generation() == Generation(v.generation.0)
            && r.fenced().is_none()
        {
            return Route::Owner(r.clone());
        }
        let r = Replicated::new(
            v.id,
            Generation(v.generation.0),
            v.layout,
            v.min_replicas as usize,
            self.io.clone(),
        );
        tracing::info!(volume = %v.name, generation = %v.generation, "owning the volume: serving it from its replicas");
        owners.insert(v.id, r.clone());
        Route::Owner(r)
    }
}
