//! The metadata state machine: what the Raft log means.
//!
//! Owns the cluster's shared truth: the cluster id, the node registry, the
//! volume catalog, volume owners with their generations, the versioned
//! placement maps (`maps.rs`: each volume is placed with the map version it
//! was created with) and the placement exceptions (extents whose replica
//! set differs from the computed one) with their epochs. Every replica set
//! anyone uses comes from [`MetaState::replicas`]. Every change is a typed
//! [`Command`] inside a versioned [`Envelope`]; [`MetaState::apply`]
//! validates and applies it.
//!
//! Pure: no tokio, no files, no sockets, no clock, no randomness. `apply` is
//! a function of the state and the log entry only, so every node that
//! applies the same log reaches the same state and the same outcome, down to
//! which error a rejected command gets. Anything a command needs that is not
//! in the log (a fresh cluster id, a timestamp) is chosen by the proposer and
//! carried inside the command.
//!
//! Exactly once: a proposal carries a [`RequestId`] (origin node + sequence
//! number). A proposer may put the same request into the log more than once
//! (a forward retried after a leader change); the state keeps the outcomes
//! of each origin's recent requests and answers a repeat with the first
//! outcome without executing it again.
//!
//! Growth: the state grows with nodes, volumes and extents that ever had an
//! exception, and with map versions still in use (one per change of the
//! placement candidates); never with time or with healthy extents.

use super::maps::{FIRST_MAP, MapNode, MapVersion, Maps, MapsError, PlacementMap};
use crate::layout::{Layout, LayoutError};
use crate::placement::PlacementError;
use crate::types::{Epoch, ExtentIndex, NodeId, VolumeId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The cluster's id, chosen once by the first leader's `Bootstrap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClusterId(pub u128);

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Version of a volume's owner record; every owner change bumps it, so a
/// replica that has seen generation g refuses an owner still holding g - 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gen{}", self.0)
    }
}

/// Who proposed a command and which of its requests this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId {
    pub origin: NodeId,
    pub seq: u64,
}

/// Epoch of an extent that never had an exception (types::Epoch: "1 until
/// the cluster exists"); the first exception must be above it.
pub const BASE_EPOCH: Epoch = Epoch(1);
/// How many replicas a volume may ask for, and how long a replica list may be.
pub const MAX_REPLICAS: u32 = 7;
/// 64 PiB: far above any real volume, low enough that no size arithmetic
/// on it can overflow.
pub const MAX_VOLUME_SIZE: u64 = 1 << 56;
/// Requests per origin whose outcomes are remembered for duplicates. A
/// request more than this far behind its origin's newest is refused as stale.
pub const SESSION_WINDOW: u64 = 256;
const MAX_ADDR_LEN: usize = 256;
const MAX_LABEL_LEN: usize = 64;

/// The addresses a node serves on (host:port strings as the node's config gives them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddrs {
    pub peer: String,
    pub nbd: String,
    pub iscsi: String,
    pub admin: String,
}

/// What a node says about itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub id: NodeId,
    pub addrs: NodeAddrs,
    pub zone: String,
    /// Bytes it offers for extent replicas (0 for a node without data dirs).
    pub capacity: u64,
    /// It has data directories: placement may put replicas on it.
    pub has_data: bool,
    /// Process id of its basaltd (for operators: `basalt cluster status`).
    pub pid: u32,
}

/// Liveness as the leader last committed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    Up,
    Down,
}

/// A node's Raft role, as the applied conf state says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Voter,
    Learner,
}

/// One registered node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub spec: NodeSpec,
    pub used: u64,
    pub state: NodeState,
}

/// What a new volume asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub name: String,
    pub size: u64,
    pub replicas: u32,
    pub min_replicas: u32,
    pub extent_size: u64,
    pub stripe_unit: u64,
    pub stripe_width: u64,
    pub read_only: bool,
}

/// One volume of the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub name: String,
    pub size: u64,
    pub layout: Layout,
    pub replicas: u32,
    pub min_replicas: u32,
    pub read_only: bool,
    /// The node coordinating I/O, if any.
    pub owner: Option<NodeId>,
    /// Bumped by every owner change (starts at 0: never owned).
    pub generation: Generation,
    /// The placement map its extents are placed with, for its whole life:
    /// the latest when it was created.
    pub map_version: MapVersion,
}

impl VolumeRecord {
    pub fn extent_count(&self) -> u64 {
        self.layout.extent_count(self.size)
    }
}

/// An extent whose replica set is recorded rather than computed.
///
/// `replicas: None` is a cleared exception: the extent is back on the
/// computed placement, and the record stays only so its epoch never goes
/// back (a replica that saw epoch 5 must never be handed epoch 2 again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentException {
    pub epoch: Epoch,
    pub replicas: Option<Vec<NodeId>>,
}

/// The Raft membership as last applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
}

/// The cluster's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub id: ClusterId,
    pub name: String,
}

/// A metadata change. Variants are only ever appended (postcard encodes the
/// variant index): a new kind of change is a new variant, a changed meaning
/// is a new [`Envelope`] version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Sets the cluster id once. The proposer picks the id.
    Bootstrap {
        cluster: ClusterId,
        name: String,
    },
    AddNode {
        spec: NodeSpec,
    },
    /// Replaces a node's spec (addresses, zone, capacity, data dirs).
    UpdateNode {
        spec: NodeSpec,
    },
    SetNodeUsed {
        node: NodeId,
        used: u64,
    },
    SetNodeState {
        node: NodeId,
        state: NodeState,
    },
    /// Refused while the node may still hold replicas or owns volumes.
    RemoveNode {
        node: NodeId,
    },
    CreateVolume {
        spec: VolumeSpec,
    },
    DeleteVolume {
        volume: VolumeId,
    },
    /// Compare-and-set of the owner: applies only if the volume's generation
    /// is still `expected`; the new generation is `expected + 1`.
    SetOwner {
        volume: VolumeId,
        owner: Option<NodeId>,
        expected: Generation,
    },
    /// Records an extent's replica set; `epoch` must be above the current one.
    SetExtentReplicas {
        volume: VolumeId,
        extent: ExtentIndex,
        epoch: Epoch,
        replicas: Vec<NodeId>,
    },
    /// Puts an extent back on the computed placement at a new epoch.
    ClearExtentReplicas {
        volume: VolumeId,
        extent: ExtentIndex,
        epoch: Epoch,
    },
    /// Changes a volume's size. A shrink needs `allow_shrink`, and no
    /// extent wholly past the new end may have a recorded replica set.
    /// Cleared exception records past the end stay, so an extent that
    /// comes back with a later grow keeps its epoch rising.
    ResizeVolume {
        volume: VolumeId,
        size: u64,
        allow_shrink: bool,
    },
}

/// One proposal as it travels in a log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub request: RequestId,
    pub command: Command,
}

/// The versioned wrapper of every normal log entry. Bump (add `V2`) when a
/// command's meaning changes; old entries in the log keep their version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Envelope {
    V1(Proposal),
}

/// The versioned wrapper of a snapshot's data. Bump (add a variant) when
/// the state's shape changes, and upgrade the older ones in
/// [`MetaState::decode_snapshot`].
///
/// - V1: before placement maps. Upgraded on decode: every volume is placed
///   with one map of the nodes that have data (all of them, up or down).
/// - V2: placement maps, and each volume's map version.
#[derive(Debug, Deserialize)]
enum SnapshotEnvelope {
    V1(v1::MetaState),
    V2(MetaState),
}

/// The snapshot envelope, borrowed for encoding: only the newest version
/// is ever written.
#[derive(Serialize)]
enum SnapshotEnvelopeRef<'a> {
    // Holds V2's place in the encoding (postcard writes the variant index).
    #[allow(dead_code)]
    V1(()),
    V2(&'a MetaState),
}

/// The state as snapshot version 1 laid it out (before placement maps).
mod v1 {
    use super::*;

    #[derive(Debug, Deserialize)]
    pub(super) struct VolumeRecord {
        pub id: VolumeId,
        pub name: String,
        pub size: u64,
        pub layout: Layout,
        pub replicas: u32,
        pub min_replicas: u32,
        pub read_only: bool,
        pub owner: Option<NodeId>,
        pub generation: Generation,
    }

    #[derive(Debug, Deserialize)]
    pub(super) struct MetaState {
        pub cluster: Option<ClusterInfo>,
        pub nodes: BTreeMap<NodeId, NodeRecord>,
        pub members: Members,
        pub volumes: BTreeMap<VolumeId, VolumeRecord>,
        pub names: BTreeMap<String, VolumeId>,
        pub next_volume_id: u64,
        pub exceptions: BTreeMap<(VolumeId, ExtentIndex), ExtentException>,
        pub sessions: BTreeMap<NodeId, Session>,
        pub applied: u64,
    }

    /// Version 1 placed extents over the nodes that had data and were up,
    /// at the time of asking. The upgrade fixes the map at every node with
    /// data: a node that was down at the snapshot is in it, as it would be
    /// had the maps existed when it went down.
    pub(super) fn upgrade(old: MetaState) -> super::MetaState {
        let mut s = super::MetaState {
            cluster: old.cluster,
            nodes: old.nodes,
            members: old.members,
            volumes: BTreeMap::new(),
            names: old.names,
            next_volume_id: old.next_volume_id,
            exceptions: old.exceptions,
            sessions: old.sessions,
            applied: old.applied,
            maps: Maps::default(),
        };
        // The volumes that exist keep the sets they had: placement then
        // ignored liveness. New ones get a map without the down nodes.
        if let Ok(map) = PlacementMap::new(s.candidates_with(true)) {
            s.maps = Maps::starting_with(FIRST_MAP, map);
        }
        let version = s.maps.latest().0;
        s.volumes = old
            .volumes
            .into_iter()
            .map(|(id, v)| {
                let r = super::VolumeRecord {
                    id: v.id,
                    name: v.name,
                    size: v.size,
                    layout: v.layout,
                    replicas: v.replicas,
                    min_replicas: v.min_replicas,
                    read_only: v.read_only,
                    owner: v.owner,
                    generation: v.generation,
                    map_version: version,
                };
                (id, r)
            })
            .collect();
        if s.maps.recount(s.volumes.values().map(|v| (v.id, v.map_version))).is_ok() {
            s.refresh_map();
        }
        s
    }
}

/// The same wire form as the owned envelopes, borrowed for encoding.
#[derive(Serialize)]
enum EnvelopeRef<'a, T> {
    V1(&'a T),
}

/// Encodes a proposal for a log entry.
pub fn encode_proposal(p: &Proposal) -> Vec<u8> {
    // Encoding into a Vec of owned, finite data cannot fail.
    postcard::to_allocvec(&EnvelopeRef::V1(p)).expect("postcard encode of a proposal")
}

/// Decodes a log entry's data; `None` for bytes no version of us wrote.
pub fn decode_proposal(data: &[u8]) -> Option<Proposal> {
    match postcard::from_bytes::<Envelope>(data) {
        Ok(Envelope::V1(p)) => Some(p),
        Err(_) => None,
    }
}

/// Why a field of a node spec is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum NodeSpecError {
    #[error("node id 0 is reserved")]
    ZeroId,
    #[error("the {0} address must be 1 to 256 bytes")]
    Address(AddrKind),
    #[error("the zone must be 1 to 64 bytes")]
    Zone,
    #[error("a node with data directories needs a capacity above 0")]
    NoCapacity,
}

/// Which of a node's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AddrKind {
    Peer,
    Nbd,
    Iscsi,
    Admin,
}

impl fmt::Display for AddrKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddrKind::Peer => "peer",
            AddrKind::Nbd => "nbd",
            AddrKind::Iscsi => "iscsi",
            AddrKind::Admin => "admin",
        })
    }
}

/// Why a volume spec is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum VolumeSpecError {
    #[error("name {0:?}: use 1-64 of [A-Za-z0-9._-]")]
    Name(String),
    #[error("size {0} must be a positive multiple of 4096 up to 64 PiB")]
    Size(u64),
    #[error("replicas {0} must be from 1 to 7")]
    Replicas(u32),
    #[error("min_replicas {min} must be from 1 to replicas ({replicas})")]
    MinReplicas { min: u32, replicas: u32 },
    #[error("extent size {0} is not a power of two of at least 1 MiB")]
    ExtentSize(u64),
    #[error("stripe unit {unit} must be a power of two from 4 KiB up to the extent size {extent}")]
    StripeUnit { unit: u64, extent: u64 },
    #[error("stripe width {0} must be from 1 to 256")]
    StripeWidth(u64),
}

/// Why a replica list is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ReplicaListError {
    #[error("the replica list is empty")]
    Empty,
    #[error("{len} replicas is more than {max}")]
    TooMany { len: usize, max: u32 },
    #[error("node {0} is listed twice")]
    Duplicate(NodeId),
    #[error("node {0} is not registered")]
    UnknownNode(NodeId),
}

/// A command the state machine refused. Deterministic: every node refuses
/// the same command with the same rejection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("the cluster is not bootstrapped yet")]
    NotBootstrapped,
    #[error("the cluster is already bootstrapped as {0}")]
    AlreadyBootstrapped(ClusterId),
    #[error("cluster name must be 1 to 64 bytes")]
    ClusterName,
    #[error("node {0} is already registered")]
    NodeExists(NodeId),
    #[error("node {0} is not registered")]
    NodeNotFound(NodeId),
    #[error("invalid node spec")]
    InvalidNode(#[source] NodeSpecError),
    #[error("node {node} may still hold replicas ({reason}); move them off it first")]
    NodeHoldsReplicas { node: NodeId, reason: HoldReason },
    #[error("node {node} owns {count} volume(s); give them another owner first")]
    NodeOwnsVolumes { node: NodeId, count: u64 },
    #[error("a volume named {0:?} exists")]
    VolumeNameExists(String),
    #[error("volume {0} does not exist")]
    VolumeNotFound(VolumeId),
    #[error("invalid volume spec")]
    InvalidVolume(#[source] VolumeSpecError),
    #[error("volume ids are exhausted")]
    VolumeIdsExhausted,
    #[error("owner of {volume} is at {actual}, not {expected}: read it again and retry")]
    GenerationMismatch { volume: VolumeId, expected: Generation, actual: Generation },
    #[error("generation of {0} is exhausted")]
    GenerationExhausted(VolumeId),
    #[error("extent {extent} of {volume} is out of range (it has {extents})")]
    ExtentOutOfRange { volume: VolumeId, extent: ExtentIndex, extents: u64 },
    #[error("epoch {proposed} of {volume}/{extent} is not above the current {current}")]
    EpochNotIncreasing { volume: VolumeId, extent: ExtentIndex, current: Epoch, proposed: Epoch },
    #[error("invalid replica list")]
    InvalidReplicas(#[source] ReplicaListError),
    #[error("request {seq} of node {origin} is too old to tell whether it already applied")]
    StaleRequest { origin: NodeId, seq: u64 },
    #[error("the log entry is not a command this version understands")]
    Undecodable,
    #[error("raft refused the membership change: {0}")]
    ConfChange(String),
    #[error("size {0} must be a positive multiple of 4096 up to 64 PiB")]
    ResizeSize(u64),
    #[error("{volume} would shrink from {current} to {size} bytes; a shrink needs allow_shrink")]
    ShrinkNotAllowed { volume: VolumeId, current: u64, size: u64 },
    #[error(
        "extent {extent} of {volume} lies past the new end but has a recorded replica set; \
         wait until it is back on the computed placement"
    )]
    ExtentPastEnd { volume: VolumeId, extent: ExtentIndex },
    #[error("placement map versions are exhausted")]
    MapVersionsExhausted,
    #[error(
        "{need} replicas need {need} nodes with data that are up; placement has {eligible}: \
         bring nodes back up or add some, or ask for fewer replicas"
    )]
    TooFewNodes { need: u32, eligible: u32 },
}

/// Why [`Rejection::NodeHoldsReplicas`] was given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HoldReason {
    /// An exception lists it (volume, extent).
    Exception(VolumeId, ExtentIndex),
    /// The caller's [`ReplicaCheck`] says placement may choose it.
    Placement,
    /// A placement map some volume is placed with lists it (the oldest such).
    Map(MapVersion),
}

impl fmt::Display for HoldReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HoldReason::Exception(v, e) => write!(f, "the replica set of {v}/{e} lists it"),
            HoldReason::Placement => write!(f, "placement may choose it while volumes exist"),
            HoldReason::Map(v) => write!(f, "placement {v}, which volumes are placed with, lists it"),
        }
    }
}

/// What an applied command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplyOutcome {
    Bootstrapped(ClusterId),
    NodeAdded(NodeId),
    NodeUpdated(NodeId),
    /// `changed` is false when the node already had that state.
    NodeStateSet {
        node: NodeId,
        state: NodeState,
        changed: bool,
    },
    NodeUsedSet(NodeId),
    NodeRemoved(NodeId),
    VolumeCreated(VolumeId),
    VolumeDeleted(VolumeId),
    OwnerSet {
        volume: VolumeId,
        owner: Option<NodeId>,
        generation: Generation,
    },
    ExtentReplicasSet {
        volume: VolumeId,
        extent: ExtentIndex,
        epoch: Epoch,
    },
    ExtentReplicasCleared {
        volume: VolumeId,
        extent: ExtentIndex,
        epoch: Epoch,
    },
    /// `old_size` is the size before (equal to `size`: nothing changed).
    VolumeResized {
        volume: VolumeId,
        old_size: u64,
        size: u64,
    },
    /// A Raft membership change took effect.
    MembershipChanged(Members),
    /// A new leader's empty entry.
    Noop,
}

/// Whether a node may hold a replica of some volume under the computed
/// placement, beyond what the state itself checks (a node listed by a map
/// version some volume uses is always refused). `RemoveNode` asks it; it
/// must be a pure function of the state (the same answer on every node),
/// or nodes would diverge.
pub trait ReplicaCheck {
    fn may_hold_replicas(&self, state: &MetaState, node: NodeId) -> bool;
}

/// Any pure function of the state will do, e.g. one that runs the
/// placement over every volume's extents and looks for `node`.
impl<F: Fn(&MetaState, NodeId) -> bool> ReplicaCheck for F {
    fn may_hold_replicas(&self, state: &MetaState, node: NodeId) -> bool {
        self(state, node)
    }
}

/// Adds nothing to the state's own rule, which is what placement needs: a
/// volume's extents are placed only on the nodes of its map version, so a
/// node that no map in use lists holds no computed replica (exceptions are
/// checked separately). The rule errs on the safe side: a listed node is
/// refused even if no extent happens to land on it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConservativeReplicaCheck;

impl ReplicaCheck for ConservativeReplicaCheck {
    fn may_hold_replicas(&self, _state: &MetaState, _node: NodeId) -> bool {
        false
    }
}

/// Why [`MetaState::replicas`] has no replica set for an extent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicasError {
    #[error("volume {0} does not exist")]
    VolumeNotFound(VolumeId),
    #[error("extent {extent} of {volume} is out of range (it has {extents})")]
    ExtentOutOfRange { volume: VolumeId, extent: ExtentIndex, extents: u64 },
    #[error("{volume} is placed with {version}, which the metadata does not have")]
    MapMissing { volume: VolumeId, version: MapVersion },
    #[error("{volume} cannot be placed with {version}")]
    Placement {
        volume: VolumeId,
        version: MapVersion,
        #[source]
        source: PlacementError,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    /// Outcome of each recent request of this origin, by sequence number.
    recent: BTreeMap<u64, Result<ApplyOutcome, Rejection>>,
}

/// The whole metadata: what a snapshot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaState {
    cluster: Option<ClusterInfo>,
    nodes: BTreeMap<NodeId, NodeRecord>,
    members: Members,
    volumes: BTreeMap<VolumeId, VolumeRecord>,
    names: BTreeMap<String, VolumeId>,
    /// Ids are never re-issued, even after a delete.
    next_volume_id: u64,
    exceptions: BTreeMap<(VolumeId, ExtentIndex), ExtentException>,
    sessions: BTreeMap<NodeId, Session>,
    /// Index of the last log entry applied.
    applied: u64,
    /// The latest placement map and every older one a volume uses.
    maps: Maps,
}

impl Default for MetaState {
    fn default() -> Self {
        MetaState {
            cluster: None,
            nodes: BTreeMap::new(),
            members: Members::default(),
            volumes: BTreeMap::new(),
            names: BTreeMap::new(),
            next_volume_id: 1,
            exceptions: BTreeMap::new(),
            sessions: BTreeMap::new(),
            applied: 0,
            maps: Maps::default(),
        }
    }
}

/// A snapshot's data did not decode.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotDecodeError {
    #[error("snapshot data is not a metadata state this version understands")]
    Decode(#[source] postcard::Error),
    #[error("the snapshot's placement maps do not match its volumes")]
    Maps(#[source] MapsError),
}

fn valid_volume_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

fn check_node_spec(spec: &NodeSpec) -> Result<(), Rejection> {
    let bad = |e| Err(Rejection::InvalidNode(e));
    if spec.id.0 == 0 {
        return bad(NodeSpecError::ZeroId);
    }
    let a = &spec.addrs;
    for (name, v) in [
        (AddrKind::Peer, &a.peer),
        (AddrKind::Nbd, &a.nbd),
        (AddrKind::Iscsi, &a.iscsi),
        (AddrKind::Admin, &a.admin),
    ] {
        // NBD and iSCSI may be off (empty); peer and admin never are.
        let optional = matches!(name, AddrKind::Nbd | AddrKind::Iscsi);
        if (v.is_empty() && !optional) || v.len() > MAX_ADDR_LEN {
            return bad(NodeSpecError::Address(name));
        }
    }
    if spec.zone.is_empty() || spec.zone.len() > MAX_LABEL_LEN {
        return bad(NodeSpecError::Zone);
    }
    if spec.has_data && spec.capacity == 0 {
        return bad(NodeSpecError::NoCapacity);
    }
    Ok(())
}

fn check_volume_spec(spec: &VolumeSpec) -> Result<Layout, VolumeSpecError> {
    if !valid_volume_name(&spec.name) {
        return Err(VolumeSpecError::Name(spec.name.clone()));
    }
    if spec.size == 0 || !spec.size.is_multiple_of(4096) || spec.size > MAX_VOLUME_SIZE {
        return Err(VolumeSpecError::Size(spec.size));
    }
    if spec.replicas == 0 || spec.replicas > MAX_REPLICAS {
        return Err(VolumeSpecError::Replicas(spec.replicas));
    }
    if spec.min_replicas == 0 || spec.min_replicas > spec.replicas {
        return Err(VolumeSpecError::MinReplicas { min: spec.min_replicas, replicas: spec.replicas });
    }
    Layout::new(spec.extent_size, spec.stripe_unit, spec.stripe_width).map_err(|e| match e {
        LayoutError::ExtentSize(s) => VolumeSpecError::ExtentSize(s),
        LayoutError::StripeUnit { unit, extent } => VolumeSpecError::StripeUnit { unit, extent },
        LayoutError::StripeWidth(w) => VolumeSpecError::StripeWidth(w),
    })
}

impl MetaState {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cluster(&self) -> Option<&ClusterInfo> {
        self.cluster.as_ref()
    }
    pub fn nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values()
    }
    pub fn node(&self, id: NodeId) -> Option<&NodeRecord> {
        self.nodes.get(&id)
    }
    pub fn members(&self) -> &Members {
        &self.members
    }
    /// The node's Raft role (`None`: not a member).
    pub fn role(&self, id: NodeId) -> Option<Role> {
        if self.members.voters.contains(&id) {
            Some(Role::Voter)
        } else if self.members.learners.contains(&id) {
            Some(Role::Learner)
        } else {
            None
        }
    }
    pub fn volumes(&self) -> impl Iterator<Item = &VolumeRecord> {
        self.volumes.values()
    }
    pub fn volume(&self, id: VolumeId) -> Option<&VolumeRecord> {
        self.volumes.get(&id)
    }
    pub fn volume_by_name(&self, name: &str) -> Option<&VolumeRecord> {
        self.names.get(name).and_then(|id| self.volumes.get(id))
    }
    /// The id the next created volume gets; every id below it was issued.
    pub fn next_volume_id(&self) -> VolumeId {
        VolumeId(self.next_volume_id)
    }

    pub fn volume_count(&self) -> usize {
        self.volumes.len()
    }
    /// The recorded replica set of one extent, if it has an exception.
    pub fn exception(&self, volume: VolumeId, extent: ExtentIndex) -> Option<&ExtentException> {
        self.exceptions.get(&(volume, extent))
    }
    /// Every exception of one volume, by extent.
    pub fn exceptions_of(&self, volume: VolumeId) -> impl Iterator<Item = (ExtentIndex, &ExtentException)> {
        self.exceptions
            .range((volume, ExtentIndex(0))..=(volume, ExtentIndex(u64::MAX)))
            .map(|((_, e), x)| (*e, x))
    }
    /// The current epoch of an extent ([`BASE_EPOCH`] without an exception).
    pub fn epoch(&self, volume: VolumeId, extent: ExtentIndex) -> Epoch {
        self.exception(volume, extent).map_or(BASE_EPOCH, |x| x.epoch)
    }

    /// The placement map versions kept: the latest and every one in use.
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// The map a volume is placed with (for callers placing many of its
    /// extents; [`MetaState::replicas`] is the rule).
    pub fn placement_map(&self, volume: VolumeId) -> Option<&PlacementMap> {
        self.volumes.get(&volume).and_then(|v| self.maps.get(v.map_version))
    }

    /// The replica set an extent uses now, preferred node first, with its
    /// epoch: the recorded exception if it has one, else the placement of
    /// the volume's map version. The one rule every caller uses (admin
    /// answers, owners, the data path): liveness plays no part, a down node
    /// stays in the set until a metadata commit takes it out.
    pub fn replicas(
        &self,
        volume: VolumeId,
        extent: ExtentIndex,
    ) -> Result<(Epoch, Vec<NodeId>), ReplicasError> {
        let v = self.volumes.get(&volume).ok_or(ReplicasError::VolumeNotFound(volume))?;
        let extents = v.extent_count();
        if extent.0 >= extents {
            return Err(ReplicasError::ExtentOutOfRange { volume, extent, extents });
        }
        let exception = self.exception(volume, extent);
        if let Some(ExtentException { epoch, replicas: Some(r) }) = exception {
            return Ok((*epoch, r.clone()));
        }
        let epoch = exception.map_or(BASE_EPOCH, |x| x.epoch);
        let version = v.map_version;
        let map = self.maps.get(version).ok_or(ReplicasError::MapMissing { volume, version })?;
        let set = map
            .place(volume, extent, v.replicas as usize)
            .map_err(|source| ReplicasError::Placement { volume, version, source })?;
        Ok((epoch, set.into()))
    }

    /// The placement candidates the node records give now: nodes with data
    /// directories that are up, weighted by capacity. Only new volumes use
    /// the map made of them, so a node going down moves nothing that
    /// exists; it only stops being chosen.
    fn candidates(&self) -> Vec<MapNode> {
        self.candidates_with(false)
    }

    /// The candidates, down nodes too if `down` (placement before the maps
    /// existed ignored liveness).
    fn candidates_with(&self, down: bool) -> Vec<MapNode> {
        self.nodes
            .values()
            .filter(|n| n.spec.has_data && n.spec.capacity > 0 && (down || n.state == NodeState::Up))
            .map(|n| MapNode { id: n.spec.id, zone: n.spec.zone.clone(), weight: n.spec.capacity })
            .collect()
    }

    /// After a node change: a new map version if the candidates changed.
    fn refresh_map(&mut self) {
        let candidates = self.candidates();
        if self.maps.latest().1.nodes() == candidates.as_slice() {
            return;
        }
        // Node ids are the keys of `nodes`: a candidate list has no duplicate.
        if let Ok(map) = PlacementMap::new(candidates) {
            self.maps.update(map);
        }
    }

    /// Before a node change: refused when no map version is left for it.
    fn check_map_versions(&self) -> Result<(), Rejection> {
        if self.maps.exhausted() {
            return Err(Rejection::MapVersionsExhausted);
        }
        Ok(())
    }

    /// Index of the last log entry applied.
    pub fn applied_index(&self) -> u64 {
        self.applied
    }

    /// Records that log entry `index` (of any kind) has been applied.
    /// Indexes only grow; a lower one is ignored.
    pub fn set_applied(&mut self, index: u64) {
        self.applied = self.applied.max(index);
    }

    /// Takes the membership from the conf state Raft applied.
    pub fn set_members(&mut self, voters: &[u64], learners: &[u64]) {
        self.members.voters = voters.iter().map(|&v| NodeId(v)).collect();
        self.members.learners = learners.iter().map(|&v| NodeId(v)).collect();
    }

    /// Applies the proposal in log entry `index`. A request already applied
    /// (same origin and sequence) gets its first outcome again and changes nothing.
    pub fn apply(
        &mut self,
        index: u64,
        proposal: &Proposal,
        check: &dyn ReplicaCheck,
    ) -> Result<ApplyOutcome, Rejection> {
        self.apply_with(index, proposal.request, |s| s.execute(&proposal.command, check))
    }

    /// Runs `change` for request `request` in log entry `index` exactly
    /// once: a repeat of an applied request gets the first outcome without
    /// running `change`; one too old to tell is refused. For entries that
    /// are not commands (a membership change, whose effect the caller
    /// computes) as well as for commands.
    pub fn apply_with(
        &mut self,
        index: u64,
        request: RequestId,
        change: impl FnOnce(&mut MetaState) -> Result<ApplyOutcome, Rejection>,
    ) -> Result<ApplyOutcome, Rejection> {
        self.set_applied(index);
        let RequestId { origin, seq } = request;
        let session = self.sessions.entry(origin).or_default();
        if let Some(first) = session.recent.get(&seq) {
            return first.clone();
        }
        let newest = session.recent.last_key_value().map_or(0, |(k, _)| *k);
        if seq.saturating_add(SESSION_WINDOW) <= newest {
            return Err(Rejection::StaleRequest { origin, seq });
        }
        let outcome = change(self);
        let session = self.sessions.entry(origin).or_default();
        session.recent.insert(seq, outcome.clone());
        let newest = session.recent.last_key_value().map_or(0, |(k, _)| *k);
        let floor = newest.saturating_sub(SESSION_WINDOW);
        session.recent.retain(|k, _| *k > floor);
        outcome
    }

    fn execute(&mut self, cmd: &Command, check: &dyn ReplicaCheck) -> Result<ApplyOutcome, Rejection> {
        if let Command::Bootstrap { cluster, name } = cmd {
            if let Some(c) = &self.cluster {
                return Err(Rejection::AlreadyBootstrapped(c.id));
            }
            if name.is_empty() || name.len() > MAX_LABEL_LEN {
                return Err(Rejection::ClusterName);
            }
            self.cluster = Some(ClusterInfo { id: *cluster, name: name.clone() });
            return Ok(ApplyOutcome::Bootstrapped(*cluster));
        }
        if self.cluster.is_none() {
            return Err(Rejection::NotBootstrapped);
        }
        match cmd {
            Command::Bootstrap { .. } => unreachable!("handled above"),
            Command::AddNode { spec } => {
                check_node_spec(spec)?;
                if self.nodes.contains_key(&spec.id) {
                    return Err(Rejection::NodeExists(spec.id));
                }
                self.check_map_versions()?;
                self.nodes.insert(spec.id, NodeRecord { spec: spec.clone(), used: 0, state: NodeState::Up });
                self.refresh_map();
                Ok(ApplyOutcome::NodeAdded(spec.id))
            }
            Command::UpdateNode { spec } => {
                check_node_spec(spec)?;
                if !self.nodes.contains_key(&spec.id) {
                    return Err(Rejection::NodeNotFound(spec.id));
                }
                self.check_map_versions()?;
                let n = self.nodes.get_mut(&spec.id).expect("looked up above");
                n.spec = spec.clone();
                self.refresh_map();
                Ok(ApplyOutcome::NodeUpdated(spec.id))
            }
            Command::SetNodeUsed { node, used } => {
                let n = self.nodes.get_mut(node).ok_or(Rejection::NodeNotFound(*node))?;
                n.used = *used;
                Ok(ApplyOutcome::NodeUsedSet(*node))
            }
            Command::SetNodeState { node, state } => {
                let n = self.nodes.get_mut(node).ok_or(Rejection::NodeNotFound(*node))?;
                let changed = n.state != *state;
                n.state = *state;
                // Never refused for want of a map version (liveness must
                // commit): at u64::MAX the latest map just stays as it is.
                self.refresh_map();
                Ok(ApplyOutcome::NodeStateSet { node: *node, state: *state, changed })
            }
            Command::RemoveNode { node } => {
                if !self.nodes.contains_key(node) {
                    return Err(Rejection::NodeNotFound(*node));
                }
                let listed = self
                    .exceptions
                    .iter()
                    .find(|(_, x)| x.replicas.as_ref().is_some_and(|r| r.contains(node)));
                if let Some(((v, e), _)) = listed {
                    return Err(Rejection::NodeHoldsReplicas {
                        node: *node,
                        reason: HoldReason::Exception(*v, *e),
                    });
                }
                if let Some(version) = self.maps.first_listing(*node) {
                    return Err(Rejection::NodeHoldsReplicas {
                        node: *node,
                        reason: HoldReason::Map(version),
                    });
                }
                if check.may_hold_replicas(self, *node) {
                    return Err(Rejection::NodeHoldsReplicas { node: *node, reason: HoldReason::Placement });
                }
                let owned = self.volumes.values().filter(|v| v.owner == Some(*node)).count() as u64;
                if owned > 0 {
                    return Err(Rejection::NodeOwnsVolumes { node: *node, count: owned });
                }
                self.check_map_versions()?;
                self.nodes.remove(node);
                self.refresh_map();
                Ok(ApplyOutcome::NodeRemoved(*node))
            }
            Command::CreateVolume { spec } => {
                let layout = check_volume_spec(spec).map_err(Rejection::InvalidVolume)?;
                if self.names.contains_key(&spec.name) {
                    return Err(Rejection::VolumeNameExists(spec.name.clone()));
                }
                // A volume its map cannot place could never be written.
                let eligible = self.maps.latest().1.nodes().len() as u32;
                if eligible < spec.replicas {
                    return Err(Rejection::TooFewNodes { need: spec.replicas, eligible });
                }
                let id = VolumeId(self.next_volume_id);
                self.next_volume_id =
                    self.next_volume_id.checked_add(1).ok_or(Rejection::VolumeIdsExhausted)?;
                self.names.insert(spec.name.clone(), id);
                let map_version = self.maps.acquire();
                self.volumes.insert(
                    id,
                    VolumeRecord {
                        id,
                        name: spec.name.clone(),
                        size: spec.size,
                        layout,
                        replicas: spec.replicas,
                        min_replicas: spec.min_replicas,
                        read_only: spec.read_only,
                        owner: None,
                        generation: Generation(0),
                        map_version,
                    },
                );
                Ok(ApplyOutcome::VolumeCreated(id))
            }
            Command::DeleteVolume { volume } => {
                let v = self.volumes.remove(volume).ok_or(Rejection::VolumeNotFound(*volume))?;
                self.names.remove(&v.name);
                self.maps.release(v.map_version);
                let keys: Vec<_> = self.exceptions_of(*volume).map(|(e, _)| (*volume, e)).collect();
                for k in keys {
                    self.exceptions.remove(&k);
                }
                Ok(ApplyOutcome::VolumeDeleted(*volume))
            }
            Command::SetOwner { volume, owner, expected } => {
                if let Some(n) = owner
                    && !self.nodes.contains_key(n)
                {
                    return Err(Rejection::NodeNotFound(*n));
                }
                let v = self.volumes.get_mut(volume).ok_or(Rejection::VolumeNotFound(*volume))?;
                if v.generation != *expected {
                    return Err(Rejection::GenerationMismatch {
                        volume: *volume,
                        expected: *expected,
                        actual: v.generation,
                    });
                }
                let next = v.generation.0.checked_add(1).ok_or(Rejection::GenerationExhausted(*volume))?;
                v.generation = Generation(next);
                v.owner = *owner;
                Ok(ApplyOutcome::OwnerSet { volume: *volume, owner: *owner, generation: v.generation })
            }
            Command::SetExtentReplicas { volume, extent, epoch, replicas } => {
                self.check_extent_epoch(*volume, *extent, *epoch)?;
                self.check_replicas(replicas).map_err(Rejection::InvalidReplicas)?;
                self.exceptions.insert(
                    (*volume, *extent),
                    ExtentException { epoch: *epoch, replicas: Some(replicas.clone()) },
                );
                Ok(ApplyOutcome::ExtentReplicasSet { volume: *volume, extent: *extent, epoch: *epoch })
            }
            Command::ClearExtentReplicas { volume, extent, epoch } => {
                self.check_extent_epoch(*volume, *extent, *epoch)?;
                self.exceptions.insert((*volume, *extent), ExtentException { epoch: *epoch, replicas: None });
                Ok(ApplyOutcome::ExtentReplicasCleared { volume: *volume, extent: *extent, epoch: *epoch })
            }
            Command::ResizeVolume { volume, size, allow_shrink } => {
                let v = self.volumes.get(volume).ok_or(Rejection::VolumeNotFound(*volume))?;
                if *size == 0 || *size % 4096 != 0 || *size > MAX_VOLUME_SIZE {
                    return Err(Rejection::ResizeSize(*size));
                }
                let current = v.size;
                if *size < current {
                    if !allow_shrink {
                        return Err(Rejection::ShrinkNotAllowed { volume: *volume, current, size: *size });
                    }
                    let keep = v.layout.extent_count(*size);
                    let listed =
                        self.exceptions_of(*volume).find(|(e, x)| e.0 >= keep && x.replicas.is_some());
                    if let Some((extent, _)) = listed {
                        return Err(Rejection::ExtentPastEnd { volume: *volume, extent });
                    }
                }
                let v = self.volumes.get_mut(volume).expect("looked up above");
                v.size = *size;
                Ok(ApplyOutcome::VolumeResized { volume: *volume, old_size: current, size: *size })
            }
        }
    }

    fn check_extent_epoch(
        &self,
        volume: VolumeId,
        extent: ExtentIndex,
        epoch: Epoch,
    ) -> Result<(), Rejection> {
        let v = self.volumes.get(&volume).ok_or(Rejection::VolumeNotFound(volume))?;
        let extents = v.extent_count();
        if extent.0 >= extents {
            return Err(Rejection::ExtentOutOfRange { volume, extent, extents });
        }
        let current = self.epoch(volume, extent);
        if epoch <= current {
            return Err(Rejection::EpochNotIncreasing { volume, extent, current, proposed: epoch });
        }
        Ok(())
    }

    fn check_replicas(&self, replicas: &[NodeId]) -> Result<(), ReplicaListError> {
        if replicas.is_empty() {
            return Err(ReplicaListError::Empty);
        }
        if replicas.len() > MAX_REPLICAS as usize {
            return Err(ReplicaListError::TooMany { len: replicas.len(), max: MAX_REPLICAS });
        }
        let mut seen = BTreeSet::new();
        for n in replicas {
            if !seen.insert(*n) {
                return Err(ReplicaListError::Duplicate(*n));
            }
            if !self.nodes.contains_key(n) {
                return Err(ReplicaListError::UnknownNode(*n));
            }
        }
        Ok(())
    }

    /// The snapshot form of the whole state: a version, then postcard.
    pub fn encode_snapshot(&self) -> Vec<u8> {
        postcard::to_allocvec(&SnapshotEnvelopeRef::V2(self)).expect("postcard encode of the state")
    }

    /// Decodes a snapshot of any version (an older one is upgraded, see
    /// [`SnapshotEnvelope`]) and checks that its maps and volumes agree.
    pub fn decode_snapshot(data: &[u8]) -> Result<MetaState, SnapshotDecodeError> {
        let mut s =
            match postcard::from_bytes::<SnapshotEnvelope>(data).map_err(SnapshotDecodeError::Decode)? {
                SnapshotEnvelope::V1(old) => v1::upgrade(old),
                SnapshotEnvelope::V2(s) => s,
            };
        s.maps
            .recount(s.volumes.values().map(|v| (v.id, v.map_version)))
            .map_err(SnapshotDecodeError::Maps)?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CHECK: ConservativeReplicaCheck = ConservativeReplicaCheck;

    fn spec(id: u64, has_data: bool) -> NodeSpec {
        NodeSpec {
            id: NodeId(id),
            addrs: NodeAddrs {
                peer: format!("127.0.0.{id}:7000"),
                nbd: format!("127.0.0.{id}:10809"),
                iscsi: format!("127.0.0.{id}:3260"),
                admin: format!("127.0.0.{id}:8080"),
            },
            zone: format!("z{}", id % 3),
            capacity: if has_data { 1 << 40 } else { 0 },
            has_data,
            pid: 1,
        }
    }

    fn vol(name: &str) -> VolumeSpec {
        VolumeSpec {
            name: name.into(),
            size: 1 << 30,
            replicas: 3,
            min_replicas: 2,
            extent_size: 64 << 20,
            stripe_unit: 64 << 20,
            stripe_width: 1,
            read_only: false,
        }
    }

    /// A state machine plus a request counter, so tests read like a log.
    struct Log {
        s: MetaState,
        seq: u64,
    }

    impl Log {
        fn new() -> Self {
            Log { s: MetaState::new(), seq: 0 }
        }
        fn booted() -> Self {
            let mut l = Log::new();
            l.run(Command::Bootstrap { cluster: ClusterId(7), name: "c".into() }).unwrap();
            for i in 1..=3 {
                l.run(Command::AddNode { spec: spec(i, true) }).unwrap();
            }
            l
        }
        fn run(&mut self, command: Command) -> Result<ApplyOutcome, Rejection> {
            self.seq += 1;
            let p = Proposal { request: RequestId { origin: NodeId(1), seq: self.seq }, command };
            self.s.apply(self.seq, &p, &CHECK)
        }
        fn create(&mut self, name: &str) -> VolumeId {
            match self.run(Command::CreateVolume { spec: vol(name) }) {
                Ok(ApplyOutcome::VolumeCreated(id)) => id,
                other => panic!("create {name}: {other:?}"),
            }
        }
    }

    #[test]
    fn bootstrap_once() {
        let mut l = Log::new();
        assert_eq!(
            l.run(Command::Bootstrap { cluster: ClusterId(7), name: "c".into() }),
            Ok(ApplyOutcome::Bootstrapped(ClusterId(7)))
        );
        assert_eq!(l.s.cluster().unwrap().id, ClusterId(7));
        assert_eq!(
            l.run(Command::Bootstrap { cluster: ClusterId(8), name: "c".into() }),
            Err(Rejection::AlreadyBootstrapped(ClusterId(7)))
        );
        assert_eq!(l.s.cluster().unwrap().id, ClusterId(7));
    }

    #[test]
    fn bootstrap_name_checked() {
        let mut l = Log::new();
        assert_eq!(
            l.run(Command::Bootstrap { cluster: ClusterId(7), name: String::new() }),
            Err(Rejection::ClusterName)
        );
        assert_eq!(
            l.run(Command::Bootstrap { cluster: ClusterId(7), name: "x".repeat(65) }),
            Err(Rejection::ClusterName)
        );
        assert!(l.s.cluster().is_none());
    }

    #[test]
    fn commands_before_bootstrap_refused() {
        let mut l = Log::new();
        assert_eq!(l.run(Command::AddNode { spec: spec(1, true) }), Err(Rejection::NotBootstrapped));
        assert_eq!(l.run(Command::CreateVolume { spec: vol("a") }), Err(Rejection::NotBootstrapped));
        assert_eq!(l.s.nodes().count(), 0);
    }

    #[test]
    fn add_and_update_node() {
        let mut l = Log::booted();
        assert_eq!(l.run(Command::AddNode { spec: spec(1, true) }), Err(Rejection::NodeExists(NodeId(1))));
        let mut s4 = spec(4, false);
        assert_eq!(l.run(Command::UpdateNode { spec: s4.clone() }), Err(Rejection::NodeNotFound(NodeId(4))));
        assert_eq!(l.run(Command::AddNode { spec: s4.clone() }), Ok(ApplyOutcome::NodeAdded(NodeId(4))));
        s4.zone = "other".into();
        assert_eq!(l.run(Command::UpdateNode { spec: s4.clone() }), Ok(ApplyOutcome::NodeUpdated(NodeId(4))));
        let n = l.s.node(NodeId(4)).unwrap();
        assert_eq!((n.spec.zone.as_str(), n.state, n.used), ("other", NodeState::Up, 0));
        assert_eq!(
            l.run(Command::SetNodeUsed { node: NodeId(4), used: 99 }),
            Ok(ApplyOutcome::NodeUsedSet(NodeId(4)))
        );
        assert_eq!(l.s.node(NodeId(4)).unwrap().used, 99);
        assert_eq!(
            l.run(Command::SetNodeUsed { node: NodeId(9), used: 1 }),
            Err(Rejection::NodeNotFound(NodeId(9)))
        );
    }

    #[test]
    fn node_spec_rejections() {
        let mut l = Log::booted();
        let cases: Vec<(NodeSpec, NodeSpecError)> = vec![
            (
                {
                    let mut s = spec(5, true);
                    s.id = NodeId(0);
                    s
                },
                NodeSpecError::ZeroId,
            ),
            (
                {
                    let mut s = spec(5, true);
                    s.addrs.peer.clear();
                    s
                },
                NodeSpecError::Address(AddrKind::Peer),
            ),
            (
                {
                    let mut s = spec(5, true);
                    s.addrs.nbd = "x".repeat(257);
                    s
                },
                NodeSpecError::Address(AddrKind::Nbd),
            ),
            (
                {
                    let mut s = spec(5, true);
                    s.addrs.iscsi = "x".repeat(257);
                    s
                },
                NodeSpecError::Address(AddrKind::Iscsi),
            ),
            (
                {
                    let mut s = spec(5, true);
                    s.addrs.admin.clear();
                    s
                },
                NodeSpecError::Address(AddrKind::Admin),
            ),
            (
                {
                    let mut s = spec(5, true);
                    s.zone.clear();
                    s
                },
                NodeSpecError::Zone,
            ),
            (
                {
                    let mut s = spec(5, true);
                    s.capacity = 0;
                    s
                },
                NodeSpecError::NoCapacity,
            ),
        ];
        for (s, e) in cases {
            assert_eq!(l.run(Command::AddNode { spec: s.clone() }), Err(Rejection::InvalidNode(e.clone())));
            assert_eq!(
                l.run(Command::UpdateNode {
                    spec: {
                        let mut u = s;
                        u.id = if u.id.0 == 0 { NodeId(0) } else { NodeId(1) };
                        u
                    }
                }),
                Err(Rejection::InvalidNode(e))
            );
        }
        assert!(l.s.node(NodeId(5)).is_none());
    }

    #[test]
    fn node_state_up_down() {
        let mut l = Log::booted();
        let down = Command::SetNodeState { node: NodeId(2), state: NodeState::Down };
        assert_eq!(
            l.run(down.clone()),
            Ok(ApplyOutcome::NodeStateSet { node: NodeId(2), state: NodeState::Down, changed: true })
        );
        assert_eq!(
            l.run(down),
            Ok(ApplyOutcome::NodeStateSet { node: NodeId(2), state: NodeState::Down, changed: false })
        );
        assert_eq!(l.s.node(NodeId(2)).unwrap().state, NodeState::Down);
        assert_eq!(
            l.run(Command::SetNodeState { node: NodeId(9), state: NodeState::Up }),
            Err(Rejection::NodeNotFound(NodeId(9)))
        );
    }

    #[test]
    fn remove_node_rules() {
        let mut l = Log::booted();
        l.run(Command::AddNode { spec: spec(4, false) }).unwrap();
        assert_eq!(l.run(Command::RemoveNode { node: NodeId(9) }), Err(Rejection::NodeNotFound(NodeId(9))));
        // No volumes: a data node may go.
        assert_eq!(l.run(Command::RemoveNode { node: NodeId(3) }), Ok(ApplyOutcome::NodeRemoved(NodeId(3))));
        l.run(Command::AddNode { spec: spec(3, true) }).unwrap();
        let v = l.create("a");
        // With a volume, placement may choose any data node of its map.
        let version = l.s.volume(v).unwrap().map_version;
        assert_eq!(
            l.run(Command::RemoveNode { node: NodeId(3) }),
            Err(Rejection::NodeHoldsReplicas { node: NodeId(3), reason: HoldReason::Map(version) })
        );
        // Down changes nothing: the map still lists it.
        l.run(Command::SetNodeState { node: NodeId(3), state: NodeState::Down }).unwrap();
        assert_eq!(
            l.run(Command::RemoveNode { node: NodeId(3) }),
            Err(Rejection::NodeHoldsReplicas { node: NodeId(3), reason: HoldReason::Map(version) })
        );
        // A node without data dirs is never placed on, but it may be listed
        // by an exception or own a volume.
        l.run(Command::SetExtentReplicas {
            volume: v,
            extent: ExtentIndex(2),
            epoch: Epoch(2),
            replicas: vec![NodeId(4)],
        })
        .unwrap();
        assert_eq!(
            l.run(Command::RemoveNode { node: NodeId(4) }),
            Err(Rejection::NodeHoldsReplicas {
                node: NodeId(4),
                reason: HoldReason::Exception(v, ExtentIndex(2))
            })
        );
        l.run(Command::ClearExtentReplicas { volume: v, extent: ExtentIndex(2), epoch: Epoch(3) }).unwrap();
        l.run(Command::SetOwner { volume: v, owner: Some(NodeId(4)), expected: Generation(0) }).unwrap();
        assert_eq!(
            l.run(Command::RemoveNode { node: NodeId(4) }),
            Err(Rejection::NodeOwnsVolumes { node: NodeId(4), count: 1 })
        );
        l.run(Command::SetOwner { volume: v, owner: None, expected: Generation(1) }).unwrap();
        assert_eq!(l.run(Command::RemoveNode { node: NodeId(4) }), Ok(ApplyOutcome::NodeRemoved(NodeId(4))));
        // Once the volumes are gone so is the placement objection.
        l.run(Command::DeleteVolume { volume: v }).unwrap();
        assert_eq!(l.run(Command::RemoveNode { node: NodeId(3) }), Ok(ApplyOutcome::NodeRemoved(NodeId(3))));
    }

    #[test]
    fn remove_node_asks_the_given_check_too() {
        let mut l = Log::booted();
        l.create("a");
        // Node 5 joins after the volume: no map in use lists it.
        l.run(Command::AddNode { spec: spec(5, true) }).unwrap();
        let only_node_5 = |_: &MetaState, n: NodeId| n == NodeId(5);
        let p = |seq| Proposal {
            request: RequestId { origin: NodeId(1), seq },
            command: Command::RemoveNode { node: NodeId(5) },
        };
        assert_eq!(
            l.s.apply(100, &p(100), &only_node_5),
            Err(Rejection::NodeHoldsReplicas { node: NodeId(5), reason: HoldReason::Placement })
        );
        assert_eq!(l.s.apply(101, &p(101), &CHECK), Ok(ApplyOutcome::NodeRemoved(NodeId(5))));
    }

    /// Six data nodes in three zones, then volume "a" (16 extents, R=3).
    fn six_nodes_and_a_volume() -> (Log, VolumeId) {
        let mut l = Log::booted();
        for i in 4..=6 {
            l.run(Command::AddNode { spec: spec(i, true) }).unwrap();
        }
        let v = l.create("a");
        (l, v)
    }

    fn all_sets(s: &MetaState, v: VolumeId) -> Vec<(Epoch, Vec<NodeId>)> {
        let n = s.volume(v).unwrap().extent_count();
        (0..n).map(|e| s.replicas(v, ExtentIndex(e)).unwrap()).collect()
    }

    /// The maps kept are exactly the latest and those in use, with the
    /// right counts.
    fn self_check(s: &MetaState) {
        let mut recounted = s.maps.clone();
        recounted.recount(s.volumes.values().map(|v| (v.id, v.map_version))).unwrap();
        assert_eq!(&recounted, s.maps());
        for (version, _, users) in s.maps().iter() {
            assert!(users > 0 || version == s.maps().latest().0, "{version} kept with no user");
        }
    }

    #[test]
    fn a_node_going_down_changes_no_replica_set_and_is_never_chosen_for_a_new_volume() {
        let (mut l, v) = six_nodes_and_a_volume();
        let before = all_sets(&l.s, v);
        assert!(before.iter().all(|(e, r)| *e == BASE_EPOCH && r.len() == 3), "{before:?}");
        let victim = before[0].1[0];
        l.run(Command::SetNodeState { node: victim, state: NodeState::Down }).unwrap();
        assert_eq!(all_sets(&l.s, v), before, "a down node moved an existing extent");
        assert!(l.s.maps().get(l.s.volume(v).unwrap().map_version).unwrap().contains(victim));
        assert!(!l.s.maps().latest().1.contains(victim));
        // A volume created while it is down is placed without it.
        let w = l.create("w");
        assert!(l.s.volume(w).unwrap().map_version > l.s.volume(v).unwrap().map_version);
        let sets_w = all_sets(&l.s, w);
        assert!(sets_w.iter().all(|(_, r)| r.len() == 3 && !r.contains(&victim)), "{sets_w:?}");
        // Back up: chosen again by volumes created from then on; neither
        // earlier volume moves.
        l.run(Command::SetNodeState { node: victim, state: NodeState::Up }).unwrap();
        assert_eq!(all_sets(&l.s, v), before);
        assert_eq!(all_sets(&l.s, w), sets_w);
        let x = l.create("x");
        assert!(all_sets(&l.s, x).iter().any(|(_, r)| r.contains(&victim)));
        // Flapping with no volume created keeps no extra map: one unused
        // latest at most.
        l.run(Command::SetNodeState { node: victim, state: NodeState::Down }).unwrap();
        l.run(Command::SetNodeState { node: victim, state: NodeState::Up }).unwrap();
        let kept = l.s.maps().len();
        assert_eq!(kept, 4, "the maps of v, w and x, and the latest");
        for _ in 0..10 {
            l.run(Command::SetNodeState { node: victim, state: NodeState::Down }).unwrap();
            l.run(Command::SetNodeState { node: victim, state: NodeState::Up }).unwrap();
        }
        assert_eq!(l.s.maps().len(), kept);
        self_check(&l.s);
    }

    #[test]
    fn a_volume_placement_cannot_place_is_refused() {
        // Three data nodes, two of them down: R=3 and R=2 are refused, R=1
        // lands on the one that is up.
        let mut l = Log::booted();
        let up = NodeId(1);
        for n in [2, 3] {
            l.run(Command::SetNodeState { node: NodeId(n), state: NodeState::Down }).unwrap();
        }
        for replicas in [3, 2] {
            let spec = VolumeSpec { replicas, min_replicas: 1, ..vol("r") };
            assert_eq!(
                l.run(Command::CreateVolume { spec }),
                Err(Rejection::TooFewNodes { need: replicas, eligible: 1 })
            );
        }
        assert!(l.s.volume_by_name("r").is_none(), "a refused create left a name behind");
        let spec = VolumeSpec { replicas: 1, min_replicas: 1, ..vol("r") };
        let Ok(ApplyOutcome::VolumeCreated(id)) = l.run(Command::CreateVolume { spec }) else { panic!() };
        assert!(all_sets(&l.s, id).iter().all(|(_, r)| r == &[up]));
        self_check(&l.s);
    }

    #[test]
    fn a_node_added_later_moves_nothing_of_older_volumes_and_serves_newer_ones() {
        let (mut l, a) = six_nodes_and_a_volume();
        let before = all_sets(&l.s, a);
        let va = l.s.volume(a).unwrap().map_version;
        for i in 7..=12 {
            l.run(Command::AddNode { spec: spec(i, true) }).unwrap();
        }
        assert_eq!(all_sets(&l.s, a), before);
        let b = l.create("b");
        let vb = l.s.volume(b).unwrap().map_version;
        assert!(vb > va, "{vb} after {va}");
        assert_eq!(l.s.maps().len(), 2);
        let newcomers: usize =
            all_sets(&l.s, b).iter().map(|(_, r)| r.iter().filter(|n| n.0 >= 7).count()).sum();
        assert!(newcomers > 0, "volume b uses none of the new nodes");
        // Same extents with a's map would not use them: the map, not the
        // volume id, is what differs.
        let old = l.s.maps().get(va).unwrap();
        for e in 0..16 {
            let set = old.place(b, ExtentIndex(e), 3).unwrap();
            assert!(set.nodes().iter().all(|n| n.0 <= 6));
        }
        // A capacity or zone change is a new version too, and moves
        // nothing either.
        let mut s3 = spec(3, true);
        s3.capacity *= 4;
        l.run(Command::UpdateNode { spec: s3.clone() }).unwrap();
        let vc = l.s.maps().latest().0;
        assert!(vc > vb);
        assert_eq!(all_sets(&l.s, a), before);
        // The same spec again (a restart re-registering): no new version.
        s3.pid = 99;
        l.run(Command::UpdateNode { spec: s3 }).unwrap();
        assert_eq!(l.s.maps().latest().0, vc);
        // A node without data dirs is no candidate: no new version.
        l.run(Command::AddNode { spec: spec(20, false) }).unwrap();
        assert_eq!(l.s.maps().latest().0, vc);
        self_check(&l.s);
    }

    #[test]
    fn unused_maps_are_dropped() {
        let (mut l, a) = six_nodes_and_a_volume();
        let va = l.s.volume(a).unwrap().map_version;
        // Only the latest: every map before it was used by no volume.
        assert_eq!(l.s.maps().iter().map(|(v, _, n)| (v, n)).collect::<Vec<_>>(), [(va, 1)]);
        l.run(Command::AddNode { spec: spec(7, true) }).unwrap();
        let b = l.create("b");
        let vb = l.s.volume(b).unwrap().map_version;
        l.run(Command::AddNode { spec: spec(8, true) }).unwrap();
        let latest = l.s.maps().latest().0;
        let kept = |s: &MetaState| s.maps().iter().map(|(v, _, n)| (v, n)).collect::<Vec<_>>();
        assert_eq!(kept(&l.s), [(va, 1), (vb, 1), (latest, 0)]);
        l.run(Command::DeleteVolume { volume: a }).unwrap();
        assert_eq!(kept(&l.s), [(vb, 1), (latest, 0)]);
        assert!(l.s.maps().get(va).is_none());
        l.run(Command::DeleteVolume { volume: b }).unwrap();
        assert_eq!(kept(&l.s), [(latest, 0)]);
        // A node no map in use lists may go while volumes exist.
        let c = l.create("c");
        l.run(Command::AddNode { spec: spec(9, true) }).unwrap();
        assert_eq!(l.run(Command::RemoveNode { node: NodeId(9) }), Ok(ApplyOutcome::NodeRemoved(NodeId(9))));
        assert_eq!(
            l.run(Command::RemoveNode { node: NodeId(8) }),
            Err(Rejection::NodeHoldsReplicas {
                node: NodeId(8),
                reason: HoldReason::Map(l.s.volume(c).unwrap().map_version)
            })
        );
        self_check(&l.s);
    }

    #[test]
    fn replicas_prefers_the_exception_and_explains_what_it_cannot_place() {
        let (mut l, v) = six_nodes_and_a_volume();
        let e = ExtentIndex(2);
        let (epoch, computed) = l.s.replicas(v, e).unwrap();
        assert_eq!(epoch, BASE_EPOCH);
        assert_eq!(l.s.placement_map(v).unwrap().place(v, e, 3).unwrap().nodes(), computed.as_slice());
        l.run(Command::SetExtentReplicas {
            volume: v,
            extent: e,
            epoch: Epoch(4),
            replicas: vec![NodeId(5)],
        })
        .unwrap();
        assert_eq!(l.s.replicas(v, e), Ok((Epoch(4), vec![NodeId(5)])));
        // Cleared: back on the computed set, at the new epoch.
        l.run(Command::ClearExtentReplicas { volume: v, extent: e, epoch: Epoch(5) }).unwrap();
        assert_eq!(l.s.replicas(v, e), Ok((Epoch(5), computed)));
        assert_eq!(l.s.replicas(VolumeId(9), e), Err(ReplicasError::VolumeNotFound(VolumeId(9))));
        assert_eq!(
            l.s.replicas(v, ExtentIndex(16)),
            Err(ReplicasError::ExtentOutOfRange { volume: v, extent: ExtentIndex(16), extents: 16 })
        );
    }

    #[test]
    fn snapshot_keeps_maps_and_map_versions() {
        let (mut l, a) = six_nodes_and_a_volume();
        l.run(Command::AddNode { spec: spec(7, true) }).unwrap();
        let b = l.create("b");
        l.run(Command::AddNode { spec: spec(8, true) }).unwrap();
        assert_eq!(l.s.maps().len(), 3);
        let back = MetaState::decode_snapshot(&l.s.encode_snapshot()).unwrap();
        assert_eq!(back, l.s);
        assert_eq!(
            back.maps().iter().map(|(v, _, n)| (v, n)).collect::<Vec<_>>(),
            l.s.maps().iter().map(|(v, _, n)| (v, n)).collect::<Vec<_>>()
        );
        for v in [a, b] {
            assert_eq!(back.volume(v).unwrap().map_version, l.s.volume(v).unwrap().map_version);
            assert_eq!(all_sets(&back, v), all_sets(&l.s, v));
        }
        // Deletes after a decode still drop maps (the counts came back).
        let mut back = back;
        let p = Proposal {
            request: RequestId { origin: NodeId(1), seq: 1000 },
            command: Command::DeleteVolume { volume: a },
        };
        back.apply(1000, &p, &CHECK).unwrap();
        assert_eq!(back.maps().len(), 2);
        self_check(&back);
    }

    #[test]
    fn snapshot_with_inconsistent_maps_is_refused() {
        let (mut l, a) = six_nodes_and_a_volume();
        l.s.volumes.get_mut(&a).unwrap().map_version = MapVersion(77);
        assert!(matches!(
            MetaState::decode_snapshot(&l.s.encode_snapshot()),
            Err(SnapshotDecodeError::Maps(MapsError::Missing { version: MapVersion(77), .. }))
        ));
    }

    /// A snapshot written by the version before placement maps (commit
    /// 2cb769c): nodes 1-3 with data in zones z1, z2, z0, node 2 down,
    /// node 4 without data; volumes a (R=3, 16 extents) and b (R=1); a
    /// owned by node 3; extent 2 of a on [1, 3] at epoch 3; members 1-3
    /// voters, 4 a learner; 11 entries applied.
    const SNAPSHOT_V1: &str = concat!(
        "0001bc15036f6c640401010e3132372e302e302e313a373030300f3132372e302e302e313a3130383039000e3132",
        "372e302e302e313a38303830027a318080808080200165000002020e3132372e302e302e323a373030300f313237",
        "2e302e302e323a3130383039000e3132372e302e302e323a38303830027a328080808080400166000103030e3132",
        "372e302e302e333a373030300f3132372e302e302e333a3130383039000e3132372e302e302e333a38303830027a",
        "308080808080600167000004040e3132372e302e302e343a373030300f3132372e302e302e343a3130383039000e",
        "3132372e302e302e343a38303830027a310000680000030102030104020101016180808080048080802080804004",
        "030100010301020201628080808004808080208080400401010000000201610101620203010102030102010301010b",
        "010000bc15020001010300010204000103050001040600030201010700060108000602090008010103010a0009010203",
        "0b0106010001020b",
    );

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn snapshot_v1_is_upgraded() {
        let s = MetaState::decode_snapshot(&unhex(SNAPSHOT_V1)).unwrap();
        assert_eq!(s.cluster().unwrap().id, ClusterId(0xabc));
        assert_eq!(s.applied_index(), 11);
        assert_eq!(s.node(NodeId(2)).unwrap().state, NodeState::Down);
        assert_eq!(s.role(NodeId(4)), Some(Role::Learner));
        // The volumes' map: every node with data, the down one included, as
        // placement was then; the latest, for new volumes, leaves it out.
        let kept: Vec<_> = s.maps().iter().map(|(v, m, n)| (v, m.nodes().to_vec(), n)).collect();
        let node = |id: u64, zone: &str| MapNode { id: NodeId(id), zone: zone.into(), weight: id << 40 };
        assert_eq!(
            kept,
            [
                (FIRST_MAP, vec![node(1, "z1"), node(2, "z2"), node(3, "z0")], 2),
                (MapVersion(2), vec![node(1, "z1"), node(3, "z0")], 0)
            ]
        );
        let a = s.volume_by_name("a").unwrap();
        assert_eq!(
            (a.id, a.map_version, a.owner, a.generation),
            (VolumeId(1), FIRST_MAP, Some(NodeId(3)), Generation(1))
        );
        assert_eq!(s.replicas(a.id, ExtentIndex(2)), Ok((Epoch(3), vec![NodeId(1), NodeId(3)])));
        // Three zones, three nodes: every other extent is on all three.
        let mut set = s.replicas(a.id, ExtentIndex(0)).unwrap().1;
        set.sort();
        assert_eq!(set, [NodeId(1), NodeId(2), NodeId(3)]);
        let b = s.volume_by_name("b").unwrap();
        assert_eq!(s.replicas(b.id, ExtentIndex(0)).unwrap().1.len(), 1);
        // The remembered outcomes came along: a repeat gets the first answer.
        let mut s2 = s.clone();
        let repeat = Proposal {
            request: RequestId { origin: NodeId(1), seq: 11 },
            command: Command::RemoveNode { node: NodeId(1) },
        };
        assert_eq!(
            s2.apply(12, &repeat, &CHECK),
            Err(Rejection::NodeHoldsReplicas {
                node: NodeId(1),
                reason: HoldReason::Exception(VolumeId(1), ExtentIndex(2))
            })
        );
        // Written back as the new version, it reads the same.
        let again = s.encode_snapshot();
        assert_eq!(again[0], 1, "the snapshot envelope is V2 now");
        assert_eq!(MetaState::decode_snapshot(&again).unwrap(), s);
        self_check(&s);
    }

    #[test]
    fn create_and_delete_volume() {
        let mut l = Log::booted();
        let a = l.create("a");
        assert_eq!(a, VolumeId(1));
        assert_eq!(
            l.run(Command::CreateVolume { spec: vol("a") }),
            Err(Rejection::VolumeNameExists("a".into()))
        );
        let r = l.s.volume_by_name("a").unwrap();
        assert_eq!((r.id, r.size, r.replicas, r.min_replicas, r.extent_count()), (a, 1 << 30, 3, 2, 16));
        assert_eq!((r.owner, r.generation), (None, Generation(0)));
        assert_eq!(l.run(Command::DeleteVolume { volume: a }), Ok(ApplyOutcome::VolumeDeleted(a)));
        assert_eq!(l.run(Command::DeleteVolume { volume: a }), Err(Rejection::VolumeNotFound(a)));
        assert!(l.s.volume_by_name("a").is_none());
        // Names come back; ids never do.
        assert_eq!(l.create("a"), VolumeId(2));
    }

    #[test]
    fn volume_spec_rejections() {
        let mut l = Log::booted();
        let cases: Vec<(VolumeSpec, VolumeSpecError)> = vec![
            (
                {
                    let mut v = vol("a");
                    v.name = String::new();
                    v
                },
                VolumeSpecError::Name(String::new()),
            ),
            (
                {
                    let mut v = vol("a");
                    v.name = "a/b".into();
                    v
                },
                VolumeSpecError::Name("a/b".into()),
            ),
            (
                {
                    let mut v = vol("a");
                    v.size = 0;
                    v
                },
                VolumeSpecError::Size(0),
            ),
            (
                {
                    let mut v = vol("a");
                    v.size = 4097;
                    v
                },
                VolumeSpecError::Size(4097),
            ),
            (
                {
                    let mut v = vol("a");
                    v.size = MAX_VOLUME_SIZE + 4096;
                    v
                },
                VolumeSpecError::Size(MAX_VOLUME_SIZE + 4096),
            ),
            (
                {
                    let mut v = vol("a");
                    v.replicas = 0;
                    v
                },
                VolumeSpecError::Replicas(0),
            ),
            (
                {
                    let mut v = vol("a");
                    v.replicas = 8;
                    v
                },
                VolumeSpecError::Replicas(8),
            ),
            (
                {
                    let mut v = vol("a");
                    v.min_replicas = 0;
                    v
                },
                VolumeSpecError::MinReplicas { min: 0, replicas: 3 },
            ),
            (
                {
                    let mut v = vol("a");
                    v.min_replicas = 4;
                    v
                },
                VolumeSpecError::MinReplicas { min: 4, replicas: 3 },
            ),
            (
                {
                    let mut v = vol("a");
                    v.extent_size = 3 << 20;
                    v
                },
                VolumeSpecError::ExtentSize(3 << 20),
            ),
            (
                {
                    let mut v = vol("a");
                    v.stripe_unit = 1024;
                    v
                },
                VolumeSpecError::StripeUnit { unit: 1024, extent: 64 << 20 },
            ),
            (
                {
                    let mut v = vol("a");
                    v.stripe_width = 0;
                    v
                },
                VolumeSpecError::StripeWidth(0),
            ),
        ];
        for (v, e) in cases {
            assert_eq!(l.run(Command::CreateVolume { spec: v }), Err(Rejection::InvalidVolume(e)));
        }
        assert_eq!(l.s.volume_count(), 0);
        // A refused create issues no id.
        assert_eq!(l.create("ok"), VolumeId(1));
    }

    #[test]
    fn owner_compare_and_set() {
        let mut l = Log::booted();
        let v = l.create("a");
        let set = |owner, expected| Command::SetOwner { volume: v, owner, expected: Generation(expected) };
        assert_eq!(
            l.run(set(Some(NodeId(1)), 0)),
            Ok(ApplyOutcome::OwnerSet { volume: v, owner: Some(NodeId(1)), generation: Generation(1) })
        );
        assert_eq!(
            l.run(set(Some(NodeId(2)), 0)),
            Err(Rejection::GenerationMismatch { volume: v, expected: Generation(0), actual: Generation(1) })
        );
        assert_eq!(l.run(set(Some(NodeId(9)), 1)), Err(Rejection::NodeNotFound(NodeId(9))));
        assert_eq!(
            l.run(set(Some(NodeId(2)), 1)),
            Ok(ApplyOutcome::OwnerSet { volume: v, owner: Some(NodeId(2)), generation: Generation(2) })
        );
        // Even setting the same owner again is a change of generation.
        assert_eq!(
            l.run(set(Some(NodeId(2)), 2)),
            Ok(ApplyOutcome::OwnerSet { volume: v, owner: Some(NodeId(2)), generation: Generation(3) })
        );
        assert_eq!(
            l.run(Command::SetOwner { volume: VolumeId(9), owner: None, expected: Generation(0) }),
            Err(Rejection::VolumeNotFound(VolumeId(9)))
        );
        let r = l.s.volume(v).unwrap();
        assert_eq!((r.owner, r.generation), (Some(NodeId(2)), Generation(3)));
    }

    #[test]
    fn owner_generation_exhausted() {
        let mut l = Log::booted();
        let v = l.create("a");
        l.s.volumes.get_mut(&v).unwrap().generation = Generation(u64::MAX);
        assert_eq!(
            l.run(Command::SetOwner { volume: v, owner: None, expected: Generation(u64::MAX) }),
            Err(Rejection::GenerationExhausted(v))
        );
    }

    #[test]
    fn volume_ids_exhausted() {
        let mut l = Log::booted();
        l.s.next_volume_id = u64::MAX;
        assert_eq!(l.run(Command::CreateVolume { spec: vol("a") }), Err(Rejection::VolumeIdsExhausted));
        assert_eq!(l.s.volume_count(), 0);
    }

    #[test]
    fn extent_exceptions_and_epochs() {
        let mut l = Log::booted();
        let v = l.create("a");
        let e = ExtentIndex(3);
        assert_eq!(l.s.epoch(v, e), BASE_EPOCH);
        let set = |epoch, replicas: Vec<u64>| Command::SetExtentReplicas {
            volume: v,
            extent: e,
            epoch: Epoch(epoch),
            replicas: replicas.into_iter().map(NodeId).collect(),
        };
        assert_eq!(
            l.run(set(1, vec![1, 2])),
            Err(Rejection::EpochNotIncreasing {
                volume: v,
                extent: e,
                current: Epoch(1),
                proposed: Epoch(1)
            })
        );
        assert_eq!(
            l.run(set(2, vec![1, 2])),
            Ok(ApplyOutcome::ExtentReplicasSet { volume: v, extent: e, epoch: Epoch(2) })
        );
        assert_eq!(l.s.exception(v, e).unwrap().replicas, Some(vec![NodeId(1), NodeId(2)]));
        assert_eq!(
            l.run(set(2, vec![1])),
            Err(Rejection::EpochNotIncreasing {
                volume: v,
                extent: e,
                current: Epoch(2),
                proposed: Epoch(2)
            })
        );
        assert_eq!(l.run(set(3, vec![])), Err(Rejection::InvalidReplicas(ReplicaListError::Empty)));
        assert_eq!(
            l.run(set(3, vec![1, 1])),
            Err(Rejection::InvalidReplicas(ReplicaListError::Duplicate(NodeId(1))))
        );
        assert_eq!(
            l.run(set(3, vec![1, 9])),
            Err(Rejection::InvalidReplicas(ReplicaListError::UnknownNode(NodeId(9))))
        );
        assert_eq!(
            l.run(set(3, vec![1, 2, 3, 4, 5, 6, 7, 8])),
            Err(Rejection::InvalidReplicas(ReplicaListError::TooMany { len: 8, max: 7 }))
        );
        assert_eq!(
            l.run(Command::SetExtentReplicas {
                volume: v,
                extent: ExtentIndex(16),
                epoch: Epoch(9),
                replicas: vec![NodeId(1)]
            }),
            Err(Rejection::ExtentOutOfRange { volume: v, extent: ExtentIndex(16), extents: 16 })
        );
        assert_eq!(
            l.run(Command::ClearExtentReplicas { volume: VolumeId(9), extent: e, epoch: Epoch(9) }),
            Err(Rejection::VolumeNotFound(VolumeId(9)))
        );
        // Clearing goes back to computed placement but keeps the epoch rising.
        assert_eq!(
            l.run(Command::ClearExtentReplicas { volume: v, extent: e, epoch: Epoch(2) }),
            Err(Rejection::EpochNotIncreasing {
                volume: v,
                extent: e,
                current: Epoch(2),
                proposed: Epoch(2)
            })
        );
        assert_eq!(
            l.run(Command::ClearExtentReplicas { volume: v, extent: e, epoch: Epoch(5) }),
            Ok(ApplyOutcome::ExtentReplicasCleared { volume: v, extent: e, epoch: Epoch(5) })
        );
        assert_eq!(l.s.exception(v, e), Some(&ExtentException { epoch: Epoch(5), replicas: None }));
        assert_eq!(
            l.run(set(4, vec![1])),
            Err(Rejection::EpochNotIncreasing {
                volume: v,
                extent: e,
                current: Epoch(5),
                proposed: Epoch(4)
            })
        );
        // Deleting the volume drops its exceptions.
        l.run(Command::DeleteVolume { volume: v }).unwrap();
        assert_eq!(l.s.exceptions_of(v).count(), 0);
    }

    #[test]
    fn resize_volume() {
        let mut l = Log::booted();
        let v = l.create("a"); // 1 GiB, 64 MiB extents: 16
        let resize = |size, allow_shrink| Command::ResizeVolume { volume: v, size, allow_shrink };
        assert_eq!(
            l.run(resize(2 << 30, false)),
            Ok(ApplyOutcome::VolumeResized { volume: v, old_size: 1 << 30, size: 2 << 30 })
        );
        assert_eq!(l.s.volume(v).unwrap().extent_count(), 32);
        // The same size again changes nothing and is no error.
        assert_eq!(
            l.run(resize(2 << 30, false)),
            Ok(ApplyOutcome::VolumeResized { volume: v, old_size: 2 << 30, size: 2 << 30 })
        );
        assert_eq!(
            l.run(resize((1 << 30) + 4096, true)),
            Ok(ApplyOutcome::VolumeResized { volume: v, old_size: 2 << 30, size: (1 << 30) + 4096 })
        );
        // A partial last extent counts.
        assert_eq!(l.s.volume(v).unwrap().extent_count(), 17);
        // Extents wholly past the end may be named no more.
        assert_eq!(
            l.run(Command::ClearExtentReplicas { volume: v, extent: ExtentIndex(17), epoch: Epoch(2) }),
            Err(Rejection::ExtentOutOfRange { volume: v, extent: ExtentIndex(17), extents: 17 })
        );
    }

    #[test]
    fn resize_rejections() {
        let mut l = Log::booted();
        let v = l.create("a");
        let resize = |size, allow_shrink| Command::ResizeVolume { volume: v, size, allow_shrink };
        for bad in [0, 4097, (1 << 30) + 512, MAX_VOLUME_SIZE + 4096] {
            assert_eq!(l.run(resize(bad, true)), Err(Rejection::ResizeSize(bad)));
        }
        assert_eq!(
            l.run(Command::ResizeVolume { volume: VolumeId(9), size: 4096, allow_shrink: true }),
            Err(Rejection::VolumeNotFound(VolumeId(9)))
        );
        assert_eq!(
            l.run(resize(1 << 20, false)),
            Err(Rejection::ShrinkNotAllowed { volume: v, current: 1 << 30, size: 1 << 20 })
        );
        assert_eq!(l.s.volume(v).unwrap().size, 1 << 30);
        // The largest size is fine.
        assert!(l.run(resize(MAX_VOLUME_SIZE, false)).is_ok());
        assert!(l.run(resize(1 << 30, true)).is_ok());
    }

    #[test]
    fn shrink_refused_over_a_recorded_replica_set_past_the_end() {
        let mut l = Log::booted();
        let v = l.create("a"); // 16 extents
        l.run(Command::SetExtentReplicas {
            volume: v,
            extent: ExtentIndex(10),
            epoch: Epoch(4),
            replicas: vec![NodeId(1)],
        })
        .unwrap();
        let shrink = |size| Command::ResizeVolume { volume: v, size, allow_shrink: true };
        // Extent 10 starts at 640 MiB: a shrink to there drops it.
        assert_eq!(
            l.run(shrink(640 << 20)),
            Err(Rejection::ExtentPastEnd { volume: v, extent: ExtentIndex(10) })
        );
        // One that keeps a byte of it is fine.
        assert!(l.run(shrink((640 << 20) + 4096)).is_ok());
        // Once cleared, the record stays past the end with its epoch, and
        // an extent brought back by a grow goes on from it.
        l.run(Command::ResizeVolume { volume: v, size: 1 << 30, allow_shrink: false }).unwrap();
        l.run(Command::ClearExtentReplicas { volume: v, extent: ExtentIndex(10), epoch: Epoch(5) }).unwrap();
        assert!(l.run(shrink(64 << 20)).is_ok());
        assert_eq!(l.s.epoch(v, ExtentIndex(10)), Epoch(5));
        l.run(Command::ResizeVolume { volume: v, size: 1 << 30, allow_shrink: false }).unwrap();
        assert_eq!(
            l.run(Command::SetExtentReplicas {
                volume: v,
                extent: ExtentIndex(10),
                epoch: Epoch(5),
                replicas: vec![NodeId(2)]
            }),
            Err(Rejection::EpochNotIncreasing {
                volume: v,
                extent: ExtentIndex(10),
                current: Epoch(5),
                proposed: Epoch(5)
            })
        );
    }

    #[test]
    fn duplicate_request_answers_first_outcome() {
        let mut l = Log::booted();
        let p = Proposal {
            request: RequestId { origin: NodeId(2), seq: 1 },
            command: Command::CreateVolume { spec: vol("a") },
        };
        assert_eq!(l.s.apply(100, &p, &CHECK), Ok(ApplyOutcome::VolumeCreated(VolumeId(1))));
        let before = l.s.clone();
        // Applied again (a retried forward): same answer, no second volume.
        assert_eq!(l.s.apply(101, &p, &CHECK), Ok(ApplyOutcome::VolumeCreated(VolumeId(1))));
        assert_eq!(l.s.volume_count(), 1);
        assert_eq!(l.s.applied_index(), 101);
        l.s.applied = before.applied;
        assert_eq!(l.s, before);
    }

    #[test]
    fn stale_request_refused() {
        let mut l = Log::booted();
        let mk = |seq, name: &str| Proposal {
            request: RequestId { origin: NodeId(2), seq },
            command: Command::CreateVolume { spec: vol(name) },
        };
        assert!(l.s.apply(10, &mk(1000, "a"), &CHECK).is_ok());
        assert_eq!(
            l.s.apply(11, &mk(1000 - SESSION_WINDOW, "b"), &CHECK),
            Err(Rejection::StaleRequest { origin: NodeId(2), seq: 1000 - SESSION_WINDOW })
        );
        // Within the window and out of order is fine.
        assert!(l.s.apply(12, &mk(1000 - SESSION_WINDOW + 1, "c"), &CHECK).is_ok());
        assert!(l.s.volume_by_name("b").is_none());
    }

    #[test]
    fn sessions_stay_bounded() {
        let mut l = Log::booted();
        for seq in 1..=2000u64 {
            let p = Proposal {
                request: RequestId { origin: NodeId(3), seq },
                command: Command::SetNodeUsed { node: NodeId(3), used: seq },
            };
            l.s.apply(seq, &p, &CHECK).unwrap();
        }
        assert_eq!(l.s.sessions[&NodeId(3)].recent.len() as u64, SESSION_WINDOW);
    }

    #[test]
    fn proposal_round_trip_and_garbage() {
        let p = Proposal {
            request: RequestId { origin: NodeId(2), seq: 5 },
            command: Command::DeleteVolume { volume: VolumeId(3) },
        };
        assert_eq!(decode_proposal(&encode_proposal(&p)), Some(p));
        assert_eq!(decode_proposal(&[]), None);
        assert_eq!(decode_proposal(&[9, 9, 9]), None);
        assert_eq!(decode_proposal(&[0, 2, 5, 200]), None);
    }

    #[test]
    fn snapshot_round_trip() {
        let mut l = Log::booted();
        let v = l.create("a");
        l.run(Command::SetExtentReplicas {
            volume: v,
            extent: ExtentIndex(1),
            epoch: Epoch(2),
            replicas: vec![NodeId(1)],
        })
        .unwrap();
        l.s.set_members(&[1, 2], &[3]);
        let back = MetaState::decode_snapshot(&l.s.encode_snapshot()).unwrap();
        assert_eq!(back, l.s);
        assert_eq!(back.role(NodeId(3)), Some(Role::Learner));
        assert!(MetaState::decode_snapshot(&[1, 2, 3]).is_err());
        assert!(MetaState::decode_snapshot(&[]).is_err());
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        let node = (0u64..6).prop_map(NodeId);
        let vid = (0u64..6).prop_map(VolumeId);
        prop_oneof![
            (0u128..3).prop_map(|c| Command::Bootstrap { cluster: ClusterId(c), name: "c".into() }),
            ((0u64..6), any::<bool>()).prop_map(|(i, d)| Command::AddNode { spec: spec(i, d) }),
            ((0u64..6), any::<bool>(), 1u64..4, 0u64..3).prop_map(|(i, d, c, z)| {
                let mut s = spec(i, d);
                s.capacity *= c;
                s.zone = format!("z{z}");
                Command::UpdateNode { spec: s }
            }),
            (node.clone(), any::<bool>()).prop_map(|(node, up)| Command::SetNodeState {
                node,
                state: if up { NodeState::Up } else { NodeState::Down }
            }),
            node.clone().prop_map(|node| Command::RemoveNode { node }),
            ((0u8..4), (1u32..5), (1u32..4)).prop_map(|(n, r, m)| {
                let mut v = vol(&format!("v{n}"));
                v.replicas = r;
                v.min_replicas = m;
                Command::CreateVolume { spec: v }
            }),
            vid.clone().prop_map(|volume| Command::DeleteVolume { volume }),
            (vid.clone(), prop::option::of(node.clone()), 0u64..4)
                .prop_map(|(volume, owner, g)| Command::SetOwner { volume, owner, expected: Generation(g) }),
            (vid.clone(), 0u64..20, 0u64..6, prop::collection::vec(node.clone(), 0..4)).prop_map(
                |(volume, e, ep, r)| {
                    Command::SetExtentReplicas {
                        volume,
                        extent: ExtentIndex(e),
                        epoch: Epoch(ep),
                        replicas: r,
                    }
                }
            ),
            (vid.clone(), 0u64..20, 0u64..6).prop_map(|(volume, e, ep)| Command::ClearExtentReplicas {
                volume,
                extent: ExtentIndex(e),
                epoch: Epoch(ep)
            }),
            (vid, 0u64..(1 << 19), any::<bool>()).prop_map(|(volume, pages, allow_shrink)| {
                Command::ResizeVolume { volume, size: pages * 4096, allow_shrink }
            }),
        ]
    }

    proptest! {
        /// Two instances fed the same log agree on every outcome and on the
        /// final state; a snapshot of it decodes to the same state.
        #[test]
        fn same_log_same_state(cmds in prop::collection::vec((arb_command(), 1u64..4, 0u64..40), 1..80)) {
            let mut a = MetaState::new();
            let mut b = MetaState::new();
            for (i, (command, origin, seq)) in cmds.into_iter().enumerate() {
                let p = Proposal { request: RequestId { origin: NodeId(origin), seq }, command };
                let ra = a.apply(i as u64 + 1, &p, &CHECK);
                let rb = b.apply(i as u64 + 1, &p, &CHECK);
                prop_assert_eq!(ra, rb);
            }
            prop_assert_eq!(&a, &b);
            self_check(&a);
            let back = MetaState::decode_snapshot(&a.encode_snapshot()).unwrap();
            for v in a.volumes() {
                for e in 0..v.extent_count().min(20) {
                    let x = a.replicas(v.id, ExtentIndex(e));
                    prop_assert_eq!(&x, &b.replicas(v.id, ExtentIndex(e)));
                    prop_assert_eq!(&x, &back.replicas(v.id, ExtentIndex(e)));
                }
            }
            prop_assert_eq!(back, a);
        }
    }
}
