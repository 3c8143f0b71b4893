//! Placement maps: the versioned input of computed placement.
//!
//! Owns the list of map versions the metadata keeps ([`Maps`]), each one
//! the set of placement candidates (node, zone, weight) at one point of the
//! cluster's history, and how many volumes place their extents with it.
//! A volume is placed with the map version it was created with, for its
//! whole life: so a node that joins, leaves, or changes its zone or
//! capacity moves no existing extent by itself (Ceph's osdmap epochs, with
//! the map fixed per volume until a rebalance moves it explicitly).
//! Liveness is not part of a map: a down node stays in it, and the data
//! path takes it out of the sets it fails, through exceptions.
//!
//! Pure: no I/O, no clock. Must never: change a version once appended,
//! hand out a version no volume may use (only the latest is given to new
//! volumes), or keep a version no volume uses (except the latest).

use crate::placement::{Candidate, ClusterMap, PlacementError, Placer, ReplicaSet};
use crate::types::{ExtentIndex, NodeId, VolumeId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// Version of a placement map; every change of the candidate set appends
/// the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MapVersion(pub u64);

impl fmt::Display for MapVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "map{}", self.0)
    }
}

/// The version a fresh metadata state starts with: the empty map.
pub const FIRST_MAP: MapVersion = MapVersion(1);

/// One placement candidate: a node with data directories.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapNode {
    pub id: NodeId,
    pub zone: String,
    /// Capacity in bytes: the node's share of replicas.
    pub weight: u64,
}

/// One version's candidates, sorted by node id, prepared for placing (the
/// [`Placer`] is built once, when the map is made or decoded). Immutable
/// and shared: the state is cloned on every applied batch, a map is not.
#[derive(Clone, Serialize, Deserialize)]
#[serde(try_from = "Vec<MapNode>", into = "Vec<MapNode>")]
pub struct PlacementMap(Arc<Prepared>);

struct Prepared {
    nodes: Vec<MapNode>,
    placer: Placer,
}

impl PlacementMap {
    /// A map of these candidates, in any order; refuses a node listed twice.
    pub fn new(mut nodes: Vec<MapNode>) -> Result<Self, PlacementError> {
        nodes.sort_by_key(|n| n.id);
        let map = ClusterMap {
            nodes: nodes
                .iter()
                .map(|n| Candidate { id: n.id, zone: n.zone.clone(), weight: n.weight, eligible: true })
                .collect(),
        };
        let placer = Placer::new(&map)?;
        Ok(PlacementMap(Arc::new(Prepared { nodes, placer })))
    }

    /// The candidates, by node id.
    pub fn nodes(&self) -> &[MapNode] {
        &self.0.nodes
    }

    pub fn contains(&self, node: NodeId) -> bool {
        self.0.nodes.binary_search_by_key(&node, |n| n.id).is_ok()
    }

    /// The prepared map, for callers placing many extents.
    pub fn placer(&self) -> &Placer {
        &self.0.placer
    }

    /// The computed replica set of one extent with `r` replicas.
    pub fn place(
        &self,
        volume: VolumeId,
        extent: ExtentIndex,
        r: usize,
    ) -> Result<ReplicaSet, PlacementError> {
        self.0.placer.place(volume, extent, r)
    }
}

impl fmt::Debug for PlacementMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The placer is derived from the nodes: printing it says nothing new.
        f.debug_struct("PlacementMap").field("nodes", &self.0.nodes).finish()
    }
}

impl PartialEq for PlacementMap {
    fn eq(&self, other: &Self) -> bool {
        self.0.nodes == other.0.nodes
    }
}

impl Eq for PlacementMap {}

impl TryFrom<Vec<MapNode>> for PlacementMap {
    type Error = PlacementError;
    fn try_from(nodes: Vec<MapNode>) -> Result<Self, PlacementError> {
        PlacementMap::new(nodes)
    }
}

impl From<PlacementMap> for Vec<MapNode> {
    fn from(m: PlacementMap) -> Self {
        m.0.nodes.clone()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct MapEntry {
    map: PlacementMap,
    /// Volumes created with this version. Not in the snapshot: it follows
    /// from the volume records and is counted again on decode.
    #[serde(skip)]
    volumes: u64,
}

/// Why a set of map versions is refused (a snapshot that does not hold together).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapsError {
    #[error("the snapshot has no placement map")]
    Empty,
    #[error("volume {volume} uses {version}, which the snapshot does not have")]
    Missing { volume: VolumeId, version: MapVersion },
    #[error("{0} is used by no volume and is not the latest; the snapshot is inconsistent")]
    Unused(MapVersion),
}

/// Every map version still needed: the latest (new volumes get it) and
/// each one some volume was created with. Maps are few: one per change of
/// the candidate set, kept only while a volume uses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Maps {
    versions: BTreeMap<MapVersion, MapEntry>,
}

impl Default for Maps {
    fn default() -> Self {
        Maps::starting_with(FIRST_MAP, PlacementMap::new(Vec::new()).expect("an empty map is valid"))
    }
}

impl Maps {
    /// Maps holding one version, the latest.
    pub fn starting_with(version: MapVersion, map: PlacementMap) -> Maps {
        Maps { versions: BTreeMap::from([(version, MapEntry { map, volumes: 0 })]) }
    }

    /// The latest version and its map.
    pub fn latest(&self) -> (MapVersion, &PlacementMap) {
        let (v, e) = self.versions.last_key_value().expect("maps always hold the latest version");
        (*v, &e.map)
    }

    pub fn get(&self, version: MapVersion) -> Option<&PlacementMap> {
        self.versions.get(&version).map(|e| &e.map)
    }

    /// Every version kept, oldest first, with how many volumes use it.
    pub fn iter(&self) -> impl Iterator<Item = (MapVersion, &PlacementMap, u64)> {
        self.versions.iter().map(|(v, e)| (*v, &e.map, e.volumes))
    }

    /// How many versions are kept.
    pub fn len(&self) -> usize {
        self.versions.len()
    }

    /// Never: the latest version is always kept.
    pub fn is_empty(&self) -> bool {
        self.versions.is_empty()
    }

    /// The oldest version some volume uses that lists `node`, if any: its
    /// volumes may place replicas on it.
    pub fn first_listing(&self, node: NodeId) -> Option<MapVersion> {
        self.versions.iter().find(|(_, e)| e.volumes > 0 && e.map.contains(node)).map(|(v, _)| *v)
    }

    /// True when no version number is left after the latest: a change of
    /// the candidates could not be recorded.
    pub fn exhausted(&self) -> bool {
        self.latest().0.0 == u64::MAX
    }

    /// Makes `map` the latest version unless it lists the same candidates
    /// as the latest already; returns the new version. The previous latest
    /// goes if no volume uses it. `None` too when versions are exhausted
    /// (callers check [`Maps::exhausted`] first, so nothing is lost).
    pub fn update(&mut self, map: PlacementMap) -> Option<MapVersion> {
        let (latest, current) = self.latest();
        if *current == map {
            return None;
        }
        let next = MapVersion(latest.0.checked_add(1)?);
        if self.versions.get(&latest).is_some_and(|e| e.volumes == 0) {
            self.versions.remove(&latest);
        }
        self.versions.insert(next, MapEntry { map, volumes: 0 });
        Some(next)
    }

    /// A new volume takes the latest version.
    pub fn acquire(&mut self) -> MapVersion {
        let mut last = self.versions.last_entry().expect("maps always hold the latest version");
        let e = last.get_mut();
        e.volumes = e.volumes.saturating_add(1);
        *last.key()
    }

    /// A volume created with `version` is gone; the version goes with its
    /// last volume unless it is the latest.
    pub fn release(&mut self, version: MapVersion) {
        let latest = self.latest().0;
        if let Some(e) = self.versions.get_mut(&version) {
            e.volumes = e.volumes.saturating_sub(1);
            if e.volumes == 0 && version != latest {
                self.versions.remove(&version);
            }
        }
    }

    /// Counts the users of every version again from the volumes' versions
    /// (after a decode), and refuses a set that does not hold together.
    pub fn recount(
        &mut self,
        volumes: impl IntoIterator<Item = (VolumeId, MapVersion)>,
    ) -> Result<(), MapsError> {
        if self.versions.is_empty() {
            return Err(MapsError::Empty);
        }
        for e in self.versions.values_mut() {
            e.volumes = 0;
        }
        for (volume, version) in volumes {
            let e = self.versions.get_mut(&version).ok_or(MapsError::Missing { volume, version })?;
            e.volumes = e.volumes.saturating_add(1);
        }
        let latest = self.latest().0;
        if let Some((v, _)) = self.versions.iter().find(|(v, e)| e.volumes == 0 && **v != latest) {
            return Err(MapsError::Unused(*v));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(ids: &[u64]) -> PlacementMap {
        PlacementMap::new(
            ids.iter().map(|&i| MapNode { id: NodeId(i), zone: format!("z{i}"), weight: 10 }).collect(),
        )
        .unwrap()
    }

    #[test]
    fn map_is_sorted_and_refuses_duplicates() {
        let m = map(&[3, 1, 2]);
        assert_eq!(m.nodes().iter().map(|n| n.id.0).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(m.contains(NodeId(2)) && !m.contains(NodeId(4)));
        assert_eq!(m.placer().eligible_nodes(), 3);
        let dup = vec![
            MapNode { id: NodeId(1), zone: "a".into(), weight: 1 },
            MapNode { id: NodeId(1), zone: "b".into(), weight: 1 },
        ];
        assert_eq!(PlacementMap::new(dup).unwrap_err(), PlacementError::DuplicateNode(NodeId(1)));
        // Order of the input does not matter to equality or placement.
        assert_eq!(map(&[1, 2, 3]), m);
        assert_eq!(
            map(&[1, 2, 3]).place(VolumeId(1), ExtentIndex(0), 2),
            m.place(VolumeId(1), ExtentIndex(0), 2)
        );
    }

    #[test]
    fn versions_are_kept_while_used() {
        let mut m = Maps::default();
        assert_eq!(m.latest().0, FIRST_MAP);
        // The empty first map, unused, goes when the next one comes.
        assert_eq!(m.update(map(&[1])), Some(MapVersion(2)));
        assert_eq!(m.len(), 1);
        // The same candidates again: no new version.
        assert_eq!(m.update(map(&[1])), None);
        assert_eq!(m.acquire(), MapVersion(2));
        assert_eq!(m.acquire(), MapVersion(2));
        assert_eq!(m.update(map(&[1, 2])), Some(MapVersion(3)));
        assert_eq!(m.len(), 2);
        assert_eq!(m.first_listing(NodeId(1)), Some(MapVersion(2)));
        // The latest is used by no volume: it does not hold node 2 back.
        assert_eq!(m.first_listing(NodeId(2)), None);
        m.release(MapVersion(2));
        assert_eq!(m.len(), 2);
        m.release(MapVersion(2));
        assert_eq!(m.iter().map(|(v, _, n)| (v, n)).collect::<Vec<_>>(), [(MapVersion(3), 0)]);
        // The latest stays even unused.
        assert_eq!(m.acquire(), MapVersion(3));
        m.release(MapVersion(3));
        assert_eq!(m.latest().0, MapVersion(3));
    }

    #[test]
    fn recount_checks_consistency() {
        let mut m = Maps::default();
        m.update(map(&[1]));
        m.acquire();
        m.update(map(&[1, 2]));
        let mut back = m.clone();
        back.recount([(VolumeId(7), MapVersion(2))]).unwrap();
        assert_eq!(back, m);
        assert_eq!(
            back.recount([(VolumeId(7), MapVersion(9))]),
            Err(MapsError::Missing { volume: VolumeId(7), version: MapVersion(9) })
        );
        assert_eq!(back.recount([]), Err(MapsError::Unused(MapVersion(2))));
    }

    #[test]
    fn versions_can_run_out() {
        let mut m = Maps::starting_with(MapVersion(u64::MAX), map(&[1]));
        assert!(m.exhausted());
        assert_eq!(m.update(map(&[1, 2])), None);
        assert_eq!(m.latest().1, &map(&[1]));
    }
}
