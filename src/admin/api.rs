//! JSON bodies of the admin API. Field names are a stable contract: the
//! CLI's `--json` prints these, and README documents them. Add fields;
//! never rename or repurpose one.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// `GET /v1/cluster`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The cluster id, 32 hex digits.
    pub id: String,
    pub name: String,
    /// The node that answered.
    pub this_node: u64,
    /// The Raft leader, if one is known.
    pub leader: Option<u64>,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub nodes: Vec<NodeInfo>,
}

/// One node, as `GET /v1/nodes` and `/v1/nodes/{id}` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: u64,
    pub zone: String,
    /// `up` or `down`, as the metadata last committed it.
    pub state: String,
    /// `voter`, `learner` or `none` (not yet in the Raft configuration).
    pub role: String,
    /// Bytes offered for placement (0: a compute node without data directories).
    pub capacity: u64,
    /// Bytes its extents use, as last reported.
    pub used: u64,
    /// Process id of its `basaltd`, as last reported.
    pub pid: u32,
    pub addresses: NodeAddresses,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddresses {
    pub peer: SocketAddr,
    pub nbd: Option<SocketAddr>,
    pub iscsi: Option<SocketAddr>,
    pub admin: SocketAddr,
}

/// `POST /v1/nodes`: invite the node listening on `peer` to join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddNode {
    pub peer: SocketAddr,
}

/// `POST /v1/volumes`. Unset fields take the cluster defaults.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CreateVolume {
    pub name: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_replicas: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extent_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stripe_unit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stripe_width: Option<u64>,
    #[serde(default)]
    pub read_only: bool,
}

/// `POST /v1/volumes/{name}/resize`: the new size in bytes (a multiple of
/// 4096). Shrinking needs `allow_shrink`, and is refused while NBD clients
/// are connected to the volume (NBD cannot tell them).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ResizeVolume {
    pub size: u64,
    #[serde(default)]
    pub allow_shrink: bool,
}

/// One volume: its spec, owner and (in `show`) every extent's replica set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub replicas: u32,
    pub min_replicas: u32,
    pub extent_size: u64,
    pub stripe_unit: u64,
    pub stripe_width: u64,
    pub read_only: bool,
    pub owner: Option<Owner>,
    /// Present in `GET /v1/volumes/{name}`, absent in the list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extents: Option<Vec<ExtentInfo>>,
    /// How many of `extents` are in each state; with `extents` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<VolumeHealth>,
}

/// A volume's extents counted by state. Every extent of the volume is
/// counted, written or not: the metadata does not know which exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeHealth {
    /// `healthy` when every extent is, else `degraded`.
    pub state: String,
    pub healthy: u64,
    pub degraded: u64,
}

impl VolumeHealth {
    /// Counts `extents` by their `state`.
    pub fn of(extents: &[ExtentInfo]) -> VolumeHealth {
        let degraded = extents.iter().filter(|e| e.state != ExtentInfo::HEALTHY).count() as u64;
        let healthy = extents.len() as u64 - degraded;
        let state = if degraded == 0 { ExtentInfo::HEALTHY } else { ExtentInfo::DEGRADED };
        VolumeHealth { state: state.into(), healthy, degraded }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub node: u64,
    pub generation: u64,
}

/// One extent: its replica set (the computed placement, or the set the
/// metadata records for it when that differs), the set's epoch, and state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentInfo {
    pub index: u64,
    pub epoch: u64,
    /// Node ids, preferred first.
    pub replicas: Vec<u64>,
    /// `healthy`, or `degraded` (fewer members than the volume's replicas).
    pub state: String,
}

/// `POST /v1/volumes/{name}/verify`: every extent's replicas compared by
/// their per-block crc32c tables (read from each replica's block table,
/// not its data; a hole and a block of zeros compare equal).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeVerify {
    pub name: String,
    pub id: u64,
    pub extent_size: u64,
    /// Every extent of the volume, in order.
    pub extents: Vec<ExtentVerify>,
    /// Extents whose replicas differ somewhere.
    pub mismatched: u64,
    /// Extents with a replica that could not be compared (unreachable, or
    /// it answered with an error), or without a replica set.
    pub incomplete: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentVerify {
    pub index: u64,
    pub epoch: u64,
    /// The extent's current replica set (node ids), as compared.
    pub replicas: Vec<u64>,
    /// Byte ranges inside the extent where the compared replicas differ,
    /// merged, in order; at most [`MAX_LISTED_MISMATCHES`] are listed.
    pub mismatches: Vec<ByteRange>,
    /// 4 KiB blocks that differ (all of them, listed or not).
    pub mismatched_blocks: u64,
    /// Replicas that could not be compared, and why.
    pub unreachable: Vec<UnreachableReplica>,
}

/// Most mismatching ranges one extent lists.
pub const MAX_LISTED_MISMATCHES: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnreachableReplica {
    pub node: u64,
    pub error: String,
}

impl ExtentInfo {
    pub const HEALTHY: &'static str = "healthy";
    pub const DEGRADED: &'static str = "degraded";
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Stable code: `invalid`, `not_found`, `conflict`, `unavailable`, `internal`.
    pub error: String,
    /// What went wrong and what to do, for a person.
    pub message: String,
}
