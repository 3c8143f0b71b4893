//! Placement: which nodes hold the replicas of each extent. Pure: no I/O, no
//! clock, no tokio; a function of its inputs only, so every node computes
//! the same replica sets from the same cluster map.
//!
//! Owns: the [`ClusterMap`] input (the metadata state machine builds it from
//! its node records), the score function (`score.rs`: the placement
//! contract, changing it moves data), the choice of R nodes per extent, and
//! the rule that merges a stored exception into a computed set
//! ([`effective`]).
//! Must never: store a replica set (only exceptions are stored, by the
//! metadata), look at what a node currently holds, or depend on the order
//! of the map's nodes.
//!
//! # The rule
//! Weighted rendezvous (highest random weight) hashing. For the extent
//! `(volume, extent)`, every eligible node gets a uniform `u` in (0, 1) from
//! a 64-bit hash of (node id, volume, extent), and the score
//! `-weight / ln(u)`; higher is better. Equivalently (and so computed, in
//! integers): the smallest `-log2(u) / weight` wins. Then:
//!
//! 1. Each zone's nodes are ranked by score (rank 0 = the zone's best).
//! 2. Candidates are ordered by (rank, score): every zone's best node first,
//!    best zone first, then every zone's second best, and so on.
//! 3. The replica set is the first R of that order. The order of the set is
//!    meaningful: the first node is the preferred one.
//!
//! With at least R zones the set is R nodes in R distinct zones. With fewer,
//! zones hold ⌊R/Z⌋ or ⌈R/Z⌉ replicas each (a zone out of nodes gives its
//! share to the others). Ties (equal scores, about one in 2^60) go to the
//! lower node id, so the input order of the map never matters.
//!
//! # Why rendezvous, and what the zone rule costs
//! No tables to store and no rebalancing plan: the set follows from the map.
//! Adding a node changes only the extents it now wins, and in each of them
//! exactly one replica moves, to the new node; removing a node changes only
//! the extents it held, one replica each (the property tests check both on
//! small maps, `tests/placement_scale.rs` at 1,000 nodes). CRUSH buys
//! hierarchy and tunable failure domains with a heavier, harder-to-verify
//! algorithm; Vitastor's PG optimiser needs a solver and stored PG tables.
//! One level of failure domain (the zone) is all Basalt needs now.
//!
//! Taking each zone's best node and then the best zones means a zone is
//! chosen with the law of weighted sampling *without replacement* over zone
//! weights (the first arrival in a zone of exponential clocks is an
//! exponential clock with the zone's total weight). Its inclusion
//! probability is not exactly proportional to its weight: heavier zones get
//! slightly less than their share, lighter ones slightly more. Computed
//! exactly for 10 zones and R = 3: a zone 15% heavier than the other nine
//! gets 1.7% less than its weighted share; with five zones twice as heavy
//! as the other five, light zones get +5.8% and heavy ones -2.9%. Within a
//! zone, nodes share in exact proportion to weight. A zone holding more
//! than 1/R of all weight cannot get its share at all (one replica per
//! extent at most) and its nodes fill less than the others: give zones
//! similar capacity. Correcting the bias with per-zone weight factors is
//! possible but each map change would then shift every zone a little and
//! move more than the new node's share; at the balance figures of the scale
//! test the plain rule is well inside 10% (zones 9.4% to 10.9% of capacity
//! are off their share by -1.3% to +0.8%; the rest is counting noise), so
//! it stays plain.
//!
//! # Cost
//! Placing one extent hashes every eligible node once: O(nodes), about 3 ns
//! a node (a 64-bit mix and a bound check; the logarithm only for the few
//! nodes that might beat their zone's best so far). A [`Placer`] holds what
//! can be computed once per map (eligible nodes grouped by zone, their
//! hashes), so re-placing all 1.6 million extents of 100,000 volumes after a
//! map change is seconds of one core (`benches/placement.rs`). Caching the
//! sets is the caller's choice; placement keeps no state.

mod score;

use crate::types::{Epoch, ExtentIndex, NodeId, VolumeId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// The placement input: every node of the cluster as placement sees it. The
/// metadata state machine builds it from its node records; order does not
/// matter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    pub nodes: Vec<Candidate>,
}

/// One node of the [`ClusterMap`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub id: NodeId,
    /// Failure domain label (rack, room, site). Nodes with the same label
    /// share a zone; an empty label is a zone like any other.
    pub zone: String,
    /// Capacity in bytes: a node's share of replicas is proportional to it
    /// (zone rule aside). Zero makes the node ineligible.
    pub weight: u64,
    /// False for nodes that must get no new replicas: down, or with no data
    /// directory (compute-only hosts).
    pub eligible: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("{need} replicas need {need} eligible nodes; the cluster map has {eligible}")]
    NotEnoughNodes { need: usize, eligible: usize },
    #[error("a replica set needs at least one replica")]
    ZeroReplicas,
    #[error("node {0} appears twice in the cluster map")]
    DuplicateNode(NodeId),
    #[error("node {0} appears twice in a replica set")]
    DuplicateReplica(NodeId),
}

/// The nodes holding one extent's replicas, distinct, preferred first.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "Vec<NodeId>", into = "Vec<NodeId>")]
pub struct ReplicaSet(Vec<NodeId>);

impl ReplicaSet {
    /// A set from a list (an exception the metadata stores, a set read back
    /// from a peer): refuses duplicates and the empty list.
    pub fn new(nodes: Vec<NodeId>) -> Result<Self, PlacementError> {
        if nodes.is_empty() {
            return Err(PlacementError::ZeroReplicas);
        }
        let mut seen = BTreeSet::new();
        for n in &nodes {
            if !seen.insert(*n) {
                return Err(PlacementError::DuplicateReplica(*n));
            }
        }
        Ok(ReplicaSet(nodes))
    }

    pub fn nodes(&self) -> &[NodeId] {
        &self.0
    }

    /// The preferred replica.
    pub fn primary(&self) -> NodeId {
        self.0[0]
    }

    pub fn contains(&self, node: NodeId) -> bool {
        self.0.contains(&node)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: a set has at least one node.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Nodes in `self` that are not in `other` (what a move from `other` to
    /// `self` must copy to).
    pub fn added_since<'a>(&'a self, other: &'a ReplicaSet) -> impl Iterator<Item = NodeId> + 'a {
        self.0.iter().copied().filter(move |n| !other.contains(*n))
    }
}

impl TryFrom<Vec<NodeId>> for ReplicaSet {
    type Error = PlacementError;
    fn try_from(v: Vec<NodeId>) -> Result<Self, PlacementError> {
        ReplicaSet::new(v)
    }
}

impl From<ReplicaSet> for Vec<NodeId> {
    fn from(s: ReplicaSet) -> Self {
        s.0
    }
}

/// A stored replica set that overrides the computed one for one extent
/// (degraded, rebuilding, moving), with the epoch it was set at. The
/// metadata owns these; placement only knows how they combine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exception {
    pub epoch: Epoch,
    pub replicas: ReplicaSet,
}

impl Exception {
    /// True when the exception says nothing the map does not: the metadata
    /// may delete it (after a map change made the computed set match).
    pub fn is_redundant(&self, computed: &ReplicaSet) -> bool {
        self.replicas == *computed
    }
}

/// Where an effective set came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The cluster map, through [`Placer::place`].
    Computed,
    /// A stored exception at this epoch.
    Exception(Epoch),
}

/// The replica set an extent really uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effective<'a> {
    pub replicas: &'a ReplicaSet,
    pub source: Source,
}

/// The set to use for an extent: its stored exception when it has one (the
/// exception is the truth while it exists, even if the map changed since),
/// else the computed set.
pub fn effective<'a>(computed: &'a ReplicaSet, exception: Option<&'a Exception>) -> Effective<'a> {
    match exception {
        Some(e) => Effective { replicas: &e.replicas, source: Source::Exception(e.epoch) },
        None => Effective { replicas: computed, source: Source::Computed },
    }
}

/// Places one extent on `map`. Prepares the map each call (sorting, hashing
/// node ids): to place many extents, build a [`Placer`] once.
pub fn place(
    map: &ClusterMap,
    volume: VolumeId,
    extent: ExtentIndex,
    r: usize,
) -> Result<ReplicaSet, PlacementError> {
    Placer::new(map)?.place(volume, extent, r)
}

/// A cluster map prepared for placing: eligible nodes only, grouped by zone,
/// their hashes precomputed. Immutable; rebuild it when the map changes.
#[derive(Debug, Clone)]
pub struct Placer {
    /// Eligible nodes sorted by (zone, id).
    nodes: Vec<Prepared>,
    /// `zones[z]` is the range of `nodes` in zone `z`; zones in name order.
    zones: Vec<std::ops::Range<usize>>,
}

#[derive(Debug, Clone, Copy)]
struct Prepared {
    id: NodeId,
    hash: u64,
    weight: u64,
}

/// A scored node: `e` is `-log2(u)` in Q32; it wins over another by the
/// smaller `e / weight`.
#[derive(Debug, Clone, Copy)]
struct Pick {
    e: u64,
    weight: u64,
    id: NodeId,
}

impl Pick {
    #[inline]
    fn beats(&self, other: &Pick) -> bool {
        // e <= 2^38 and weight < 2^64: the products fit in u128 (wrapping
        // only spares the hot loop an overflow check that cannot fire).
        let a = (self.e as u128).wrapping_mul(other.weight as u128);
        let b = (other.e as u128).wrapping_mul(self.weight as u128);
        a < b || (a == b && self.id < other.id)
    }
}

impl Placer {
    /// Refuses a map naming a node twice (eligible or not): that is a bug in
    /// the caller, and placing around it would hide it.
    pub fn new(map: &ClusterMap) -> Result<Self, PlacementError> {
        let mut seen = BTreeSet::new();
        for c in &map.nodes {
            if !seen.insert(c.id) {
                return Err(PlacementError::DuplicateNode(c.id));
            }
        }
        let mut eligible: Vec<&Candidate> = map.nodes.iter().filter(|c| c.eligible && c.weight > 0).collect();
        eligible.sort_by(|a, b| (&a.zone, a.id).cmp(&(&b.zone, b.id)));
        let mut zones = Vec::new();
        let mut start = 0;
        for i in 1..=eligible.len() {
            if i == eligible.len() || eligible[i].zone != eligible[start].zone {
                zones.push(start..i);
                start = i;
            }
        }
        let nodes = eligible
            .iter()
            .map(|c| Prepared { id: c.id, hash: score::node_hash(c.id), weight: c.weight })
            .collect();
        Ok(Placer { nodes, zones })
    }

    /// Eligible nodes (eligible, weight above zero).
    pub fn eligible_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Zones with at least one eligible node: with fewer than R, replica
    /// sets share zones.
    pub fn zone_count(&self) -> usize {
        self.zones.len()
    }

    /// The replica set of `(volume, extent)` with `r` replicas: see the
    /// module docs for the rule.
    pub fn place(
        &self,
        volume: VolumeId,
        extent: ExtentIndex,
        r: usize,
    ) -> Result<ReplicaSet, PlacementError> {
        if r == 0 {
            return Err(PlacementError::ZeroReplicas);
        }
        if r > self.nodes.len() {
            return Err(PlacementError::NotEnoughNodes { need: r, eligible: self.nodes.len() });
        }
        let key = score::key_hash(volume, extent);
        let out = if self.zones.len() >= r { self.place_spread(key, r) } else { self.place_shared(key, r) };
        Ok(ReplicaSet(out))
    }

    #[inline]
    fn pick(&self, key: u64, n: &Prepared) -> Pick {
        Pick { e: score::exp_q32(key, n.hash), weight: n.weight, id: n.id }
    }

    /// At least `r` zones: each zone's best node, then the best `r` zones.
    fn place_spread(&self, key: u64, r: usize) -> Vec<NodeId> {
        let mut top: Vec<Pick> = Vec::with_capacity(r + 1);
        for zone in &self.zones {
            let nodes = &self.nodes[zone.clone()];
            let mut best = self.pick(key, &nodes[0]);
            for n in &nodes[1..] {
                let h = score::draw(key, n.hash);
                // Skip the logarithm when even its lower bound loses
                // (strictly, so a tie still goes to the id rule below).
                let lb = (score::neg_log2_lower_bound_q32(h) as u128).wrapping_mul(best.weight as u128);
                if lb > (best.e as u128).wrapping_mul(n.weight as u128) {
                    continue;
                }
                let p = Pick { e: score::neg_log2_q32(h), weight: n.weight, id: n.id };
                if p.beats(&best) {
                    best = p;
                }
            }
            insert_top(&mut top, best, r);
        }
        top.iter().map(|p| p.id).collect()
    }

    /// Fewer zones than replicas: rank nodes within each zone, then order
    /// by (rank, score). No zone can need more than `r - zones + 1` ranks.
    fn place_shared(&self, key: u64, r: usize) -> Vec<NodeId> {
        let ranks = r + 1 - self.zones.len();
        let mut all: Vec<(usize, Pick)> = Vec::with_capacity(self.zones.len() * ranks);
        let mut zone_top: Vec<Pick> = Vec::with_capacity(ranks + 1);
        for zone in &self.zones {
            zone_top.clear();
            for n in &self.nodes[zone.clone()] {
                insert_top(&mut zone_top, self.pick(key, n), ranks);
            }
            all.extend(zone_top.iter().copied().enumerate());
        }
        all.sort_by(|(ra, a), (rb, b)| {
            ra.cmp(rb).then(if a.beats(b) {
                std::cmp::Ordering::Less
            } else if b.beats(a) {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            })
        });
        all.iter().take(r).map(|(_, p)| p.id).collect()
    }
}

/// Keeps `top` the best `k` picks seen, best first.
#[inline]
fn insert_top(top: &mut Vec<Pick>, p: Pick, k: usize) {
    if top.len() == k && !p.beats(&top[k - 1]) {
        return;
    }
    let at = top.iter().position(|q| p.beats(q)).unwrap_or(top.len());
    top.insert(at, p);
    top.truncate(k);
}

#[cfg(test)]
mod tests;
