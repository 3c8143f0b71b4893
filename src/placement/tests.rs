use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

fn node(id: u64, zone: &str, weight: u64) -> Candidate {
    Candidate { id: NodeId(id), zone: zone.into(), weight, eligible: true }
}

fn ids(s: &ReplicaSet) -> Vec<u64> {
    s.nodes().iter().map(|n| n.0).collect()
}

fn zone_of(map: &ClusterMap, id: NodeId) -> &str {
    &map.nodes.iter().find(|c| c.id == id).unwrap().zone
}

const TB: u64 = 1 << 40;

/// The placement contract, pinned: these sets must never change (every
/// cluster's data would move). If this fails, the score function changed:
/// revert it, or version placement and plan a migration.
#[test]
fn golden_sets_never_change() {
    let map = ClusterMap {
        nodes: vec![
            node(1, "a", 4 * TB),
            node(2, "a", 8 * TB),
            node(3, "b", 4 * TB),
            node(4, "b", 16 * TB),
            node(5, "c", 12 * TB),
            node(6, "c", 4 * TB),
            node(7, "d", 8 * TB),
        ],
    };
    let p = Placer::new(&map).unwrap();
    let got: Vec<Vec<u64>> =
        (0..8).map(|e| ids(&p.place(VolumeId(e / 4 + 1), ExtentIndex(e % 4), 3).unwrap())).collect();
    let want = [[1, 5, 4], [2, 6, 4], [3, 1, 5], [5, 7, 2], [2, 4, 5], [4, 6, 2], [4, 6, 7], [3, 2, 5]];
    assert_eq!(got, want);
    let two_zones =
        ClusterMap { nodes: map.nodes.iter().filter(|c| c.zone.as_str() < "c").cloned().collect() };
    let got: Vec<u64> = ids(&place(&two_zones, VolumeId(9), ExtentIndex(0), 3).unwrap());
    assert_eq!(got, [1, 4, 2]);
}

#[test]
fn errors_name_the_problem() {
    let mut map = ClusterMap { nodes: vec![node(1, "a", TB), node(2, "b", TB), node(3, "c", TB)] };
    map.nodes[2].eligible = false;
    assert_eq!(
        place(&map, VolumeId(1), ExtentIndex(0), 3),
        Err(PlacementError::NotEnoughNodes { need: 3, eligible: 2 })
    );
    map.nodes[2].eligible = true;
    map.nodes[1].weight = 0;
    assert_eq!(
        place(&map, VolumeId(1), ExtentIndex(0), 3),
        Err(PlacementError::NotEnoughNodes { need: 3, eligible: 2 })
    );
    assert_eq!(place(&map, VolumeId(1), ExtentIndex(0), 0), Err(PlacementError::ZeroReplicas));
    map.nodes.push(node(2, "z", TB));
    assert_eq!(Placer::new(&map).unwrap_err(), PlacementError::DuplicateNode(NodeId(2)));
    assert_eq!(
        ReplicaSet::new(vec![NodeId(1), NodeId(2), NodeId(1)]),
        Err(PlacementError::DuplicateReplica(NodeId(1)))
    );
    assert_eq!(ReplicaSet::new(vec![]), Err(PlacementError::ZeroReplicas));
    // Deserializing goes through the same check.
    assert!(serde_json::from_str::<ReplicaSet>("[1,2,1]").is_err());
    let s: ReplicaSet = serde_json::from_str("[3,1]").unwrap();
    assert_eq!((s.primary(), s.len()), (NodeId(3), 2));
    assert_eq!(serde_json::to_string(&s).unwrap(), "[3,1]");
}

#[test]
fn exception_overrides_the_computed_set() {
    let computed = ReplicaSet::new(vec![NodeId(1), NodeId(2), NodeId(3)]).unwrap();
    let e = effective(&computed, None);
    assert_eq!((e.replicas, e.source), (&computed, Source::Computed));
    let degraded =
        Exception { epoch: Epoch(7), replicas: ReplicaSet::new(vec![NodeId(2), NodeId(3)]).unwrap() };
    let e = effective(&computed, Some(&degraded));
    assert_eq!(ids(e.replicas), vec![2, 3]);
    assert_eq!(e.source, Source::Exception(Epoch(7)));
    assert!(!degraded.is_redundant(&computed));
    assert!(Exception { epoch: Epoch(8), replicas: computed.clone() }.is_redundant(&computed));
    let moved = ReplicaSet::new(vec![NodeId(4), NodeId(2), NodeId(3)]).unwrap();
    assert_eq!(moved.added_since(&computed).collect::<Vec<_>>(), vec![NodeId(4)]);
}

/// One zone, R = 1: shares follow weight. 60,000 extents; the expected
/// counts are 6,000 to 24,000, so 3% is over 4 standard deviations.
#[test]
fn shares_follow_weight() {
    let map = ClusterMap { nodes: (1..=4).map(|i| node(i, "", i * TB)).collect() };
    let p = Placer::new(&map).unwrap();
    let mut count = [0u64; 5];
    for v in 0..1000 {
        for e in 0..60 {
            count[p.place(VolumeId(v), ExtentIndex(e), 1).unwrap().primary().0 as usize] += 1;
        }
    }
    for (i, &got) in count.iter().enumerate().skip(1) {
        let want = 60_000.0 * i as f64 / 10.0;
        let dev = (got as f64 - want).abs() / want;
        assert!(dev < 0.03, "node {i}: {got} replicas, weighted mean {want}");
    }
}

/// The zone rule's known bias (module docs): ten one-node zones, five of
/// weight 1 and five of weight 2, R = 3. Sampling zones without
/// replacement gives light zones an inclusion of 0.211655 (1.0583x their
/// weighted share) and heavy ones 0.388345 (0.9709x), computed exactly by
/// summing over the 720 ordered triples. 200,000 extents: each group's
/// total has a standard deviation under 0.2%; the bound is 0.6%.
#[test]
fn zone_rule_bias_matches_sampling_without_replacement() {
    let map = ClusterMap {
        nodes: (0..10).map(|i| node(i, &format!("z{i}"), if i < 5 { TB } else { 2 * TB })).collect(),
    };
    let p = Placer::new(&map).unwrap();
    let mut held = [0u64; 10];
    for v in 0..12_500 {
        for e in 0..16 {
            for n in p.place(VolumeId(v), ExtentIndex(e), 3).unwrap().nodes() {
                held[n.0 as usize] += 1;
            }
        }
    }
    let light: u64 = held[..5].iter().sum();
    let heavy: u64 = held[5..].iter().sum();
    let (light, heavy) = (light as f64 / (5.0 * 200_000.0), heavy as f64 / (5.0 * 200_000.0));
    assert!((light / 0.211655 - 1.0).abs() < 0.006, "light zones: inclusion {light}");
    assert!((heavy / 0.388345 - 1.0).abs() < 0.006, "heavy zones: inclusion {heavy}");
}

/// Two zones for three replicas: two in one zone, one in the other. Zone a
/// (three nodes) wins the third slot when its second-best clock beats b's
/// second (its last): P = P(Exp(3) + Exp(2) < Exp(2) + Exp(1)) = 0.70, so
/// 700 of 1,000 expected, standard deviation 14.5.
#[test]
fn fewer_zones_than_replicas_share_evenly() {
    let map = ClusterMap {
        nodes: vec![node(1, "a", TB), node(2, "a", TB), node(3, "a", TB), node(4, "b", TB), node(5, "b", TB)],
    };
    let p = Placer::new(&map).unwrap();
    let mut a_heavy = 0;
    for e in 0..1000 {
        let s = p.place(VolumeId(1), ExtentIndex(e), 3).unwrap();
        let in_a = s.nodes().iter().filter(|n| zone_of(&map, **n) == "a").count();
        assert!(in_a == 1 || in_a == 2, "{s:?}");
        a_heavy += usize::from(in_a == 2);
    }
    assert!((650..=750).contains(&a_heavy), "{a_heavy} of 1000 sets had two replicas in zone a");
    // One zone with one node: the other zone takes the rest.
    let map =
        ClusterMap { nodes: vec![node(1, "a", TB), node(4, "b", TB), node(5, "b", TB), node(6, "b", TB)] };
    for e in 0..100 {
        let s = place(&map, VolumeId(2), ExtentIndex(e), 4).unwrap();
        let mut got = ids(&s);
        got.sort();
        assert_eq!(got, vec![1, 4, 5, 6]);
    }
}

fn arb_map() -> impl Strategy<Value = ClusterMap> {
    let weight = prop_oneof![1u64..=16, (1u64..=64).prop_map(|t| t * TB), Just(u64::MAX), Just(0u64)];
    proptest::collection::btree_map(0u64..10_000, (0usize..5, weight, proptest::bool::weighted(0.85)), 1..14)
        .prop_map(|m| ClusterMap {
            nodes: m
                .into_iter()
                .map(|(id, (z, weight, eligible))| Candidate {
                    id: NodeId(id),
                    zone: ["r1", "r2", "r3", "r4", ""][z].to_string(),
                    weight,
                    eligible,
                })
                .collect(),
        })
}

fn usable(map: &ClusterMap) -> Vec<&Candidate> {
    map.nodes.iter().filter(|c| c.eligible && c.weight > 0).collect()
}

fn zone_count(map: &ClusterMap) -> usize {
    usable(map).iter().map(|c| c.zone.as_str()).collect::<BTreeSet<_>>().len()
}

/// (e, weight, id, zone) of one node for one key.
type Scored<'a> = (u64, u64, NodeId, &'a str);

/// The rule of the module docs, written plainly: score every eligible
/// node, rank within zones, sort by (rank, score), take r.
fn oracle(map: &ClusterMap, volume: VolumeId, extent: ExtentIndex, r: usize) -> Option<Vec<NodeId>> {
    let usable = usable(map);
    if r == 0 || usable.len() < r {
        return None;
    }
    let key = score::key_hash(volume, extent);
    // (e / weight) as an exact fraction, compared by cross-multiplying.
    let mut scored: Vec<Scored<'_>> = usable
        .iter()
        .map(|c| (score::exp_q32(key, score::node_hash(c.id)), c.weight, c.id, c.zone.as_str()))
        .collect();
    let cmp = |a: &Scored<'_>, b: &Scored<'_>| {
        (a.0 as u128 * b.1 as u128).cmp(&(b.0 as u128 * a.1 as u128)).then(a.2.cmp(&b.2))
    };
    scored.sort_by(cmp);
    let mut rank: BTreeMap<&str, usize> = BTreeMap::new();
    let mut ranked: Vec<(usize, Scored<'_>)> = scored
        .into_iter()
        .map(|s| {
            let k = rank.entry(s.3).or_insert(0);
            *k += 1;
            (*k, s)
        })
        .collect();
    ranked.sort_by(|a, b| a.0.cmp(&b.0).then(cmp(&a.1, &b.1)));
    Some(ranked.iter().take(r).map(|(_, s)| s.2).collect())
}

proptest! {
    /// The placer (zone grouping, top-k, the skipped logarithms) computes
    /// exactly the oracle's sets, in the same order.
    #[test]
    fn placer_matches_the_oracle(map in arb_map(), r in 1usize..=6, volume in any::<u64>()) {
        let p = Placer::new(&map).unwrap();
        for e in 0..32 {
            let want = oracle(&map, VolumeId(volume), ExtentIndex(e), r);
            let got = p.place(VolumeId(volume), ExtentIndex(e), r).ok().map(|s| s.nodes().to_vec());
            prop_assert_eq!(got, want);
        }
    }

    /// Distinct nodes, only eligible ones, zones spread: distinct when
    /// there are enough, else as even as possible (a zone has two more
    /// than another only when the other is out of nodes).
    #[test]
    fn sets_are_distinct_eligible_and_spread(map in arb_map(), r in 1usize..=5, volume in any::<u64>()) {
        let p = Placer::new(&map).unwrap();
        let usable = usable(&map);
        for e in 0..32 {
            let got = p.place(VolumeId(volume), ExtentIndex(e), r);
            if usable.len() < r {
                prop_assert_eq!(got, Err(PlacementError::NotEnoughNodes { need: r, eligible: usable.len() }));
                continue;
            }
            let s = got.unwrap();
            prop_assert_eq!(s.len(), r);
            prop_assert_eq!(s.nodes().iter().collect::<BTreeSet<_>>().len(), r);
            let mut per_zone: BTreeMap<&str, usize> = usable.iter().map(|c| (c.zone.as_str(), 0)).collect();
            for n in s.nodes() {
                let c = usable.iter().find(|c| c.id == *n);
                prop_assert!(c.is_some(), "{} is not eligible", n);
                *per_zone.get_mut(c.unwrap().zone.as_str()).unwrap() += 1;
            }
            if per_zone.len() >= r {
                prop_assert!(per_zone.values().all(|&k| k <= 1), "{:?}", per_zone);
            }
            for (za, &ka) in &per_zone {
                for (zb, &kb) in &per_zone {
                    let size_b = usable.iter().filter(|c| c.zone == *zb).count();
                    prop_assert!(ka <= kb + 1 || kb == size_b, "{za}: {ka}, {zb}: {kb} of {size_b}");
                }
            }
        }
    }

    /// The same map in any node order gives the same sets, in the same order.
    #[test]
    fn node_order_does_not_matter(
        (map, shuffled) in arb_map().prop_flat_map(|m| {
            let nodes = m.nodes.clone();
            (Just(m), Just(nodes).prop_shuffle())
        }),
        r in 1usize..=4,
    ) {
        let a = Placer::new(&map).unwrap();
        let b = Placer::new(&ClusterMap { nodes: shuffled }).unwrap();
        for e in 0..32 {
            prop_assert_eq!(a.place(VolumeId(5), ExtentIndex(e), r), b.place(VolumeId(5), ExtentIndex(e), r));
        }
    }

    /// Adding a node changes only the sets it joins, each by exactly one
    /// replica (which moves to it); the others keep their order.
    #[test]
    fn adding_a_node_moves_only_to_it(
        map in arb_map(), zone in 0usize..5, weight in 1u64..=64, r in 1usize..=3, volume in any::<u64>()
    ) {
        prop_assume!(zone_count(&map) >= r && usable(&map).len() >= r);
        let new = NodeId(20_000);
        let mut bigger = map.clone();
        bigger.nodes.push(Candidate {
            id: new,
            zone: ["r1", "r2", "r3", "r4", ""][zone].to_string(),
            weight: weight * TB,
            eligible: true,
        });
        let (a, b) = (Placer::new(&map).unwrap(), Placer::new(&bigger).unwrap());
        for e in 0..64 {
            let old = a.place(VolumeId(volume), ExtentIndex(e), r).unwrap();
            let now = b.place(VolumeId(volume), ExtentIndex(e), r).unwrap();
            if !now.contains(new) {
                prop_assert_eq!(&now, &old);
                continue;
            }
            let gone: Vec<NodeId> = old.added_since(&now).collect();
            prop_assert_eq!(gone.len(), 1);
            let kept_old: Vec<NodeId> = old.nodes().iter().copied().filter(|n| *n != gone[0]).collect();
            let kept_now: Vec<NodeId> = now.nodes().iter().copied().filter(|n| *n != new).collect();
            prop_assert_eq!(kept_old, kept_now);
        }
    }

    /// Removing a node changes only the sets that held it, each by exactly
    /// one replica; the survivors keep their order.
    #[test]
    fn removing_a_node_moves_only_its_replicas(
        map in arb_map(), pick in any::<prop::sample::Index>(), r in 1usize..=3, volume in any::<u64>()
    ) {
        let gone = pick.get(&map.nodes).id;
        let smaller = ClusterMap { nodes: map.nodes.iter().filter(|c| c.id != gone).cloned().collect() };
        prop_assume!(zone_count(&smaller) >= r && usable(&smaller).len() >= r);
        let (a, b) = (Placer::new(&map).unwrap(), Placer::new(&smaller).unwrap());
        for e in 0..64 {
            let old = a.place(VolumeId(volume), ExtentIndex(e), r).unwrap();
            let now = b.place(VolumeId(volume), ExtentIndex(e), r).unwrap();
            if !old.contains(gone) {
                prop_assert_eq!(&now, &old);
                continue;
            }
            let added: Vec<NodeId> = now.added_since(&old).collect();
            prop_assert_eq!(added.len(), 1);
            let kept_old: Vec<NodeId> = old.nodes().iter().copied().filter(|n| *n != gone).collect();
            let kept_now: Vec<NodeId> = now.nodes().iter().copied().filter(|n| *n != added[0]).collect();
            prop_assert_eq!(kept_old, kept_now);
        }
    }
}
