//! Placement at the scale of DESIGN.md: 1,000 nodes in 10 zones with mixed
//! capacities (4, 8, 12 and 16 TiB), 100,000 volumes of 16 extents, R = 3
//! (4.8 million replicas). Checks balance (every node within 10% of its
//! capacity-weighted share) and movement: adding a node moves at most 1.5x
//! its ideal share, and only onto it; removing one moves only what it held.
//!
//! The smallest nodes expect about 1,900 replicas, so counting noise alone is
//! a standard deviation of 2.3%; the zone rule adds a bias of a few tenths of
//! a percent here (see `placement` docs). The run prints its figures
//! (`-- --nocapture`).

use basalt::placement::{Candidate, ClusterMap, Placer};
use basalt::types::{ExtentIndex, NodeId, VolumeId};
use std::time::Instant;

const NODES: u64 = 1000;
const ZONES: u64 = 10;
const VOLUMES: u64 = 100_000;
const EXTENTS: u64 = 16;
const R: usize = 3;
const TIB: u64 = 1 << 40;

/// Fixed pseudo-random capacities (a SplitMix64 step), so the run is the
/// same every time and zone totals differ as in a real cluster.
fn capacity(i: u64) -> u64 {
    let mut x = i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    [4, 8, 12, 16][(x % 4) as usize] * TIB
}

fn cluster() -> ClusterMap {
    ClusterMap {
        nodes: (0..NODES)
            .map(|i| Candidate {
                id: NodeId(i + 1),
                zone: format!("zone-{}", i % ZONES),
                weight: capacity(i),
                eligible: true,
            })
            .collect(),
    }
}

/// Every extent's set, as node ids, in key order.
fn place_all(map: &ClusterMap) -> Vec<[u32; R]> {
    let started = Instant::now();
    let p = Placer::new(map).unwrap();
    let mut out = Vec::with_capacity((VOLUMES * EXTENTS) as usize);
    for v in 0..VOLUMES {
        for e in 0..EXTENTS {
            let s = p.place(VolumeId(v), ExtentIndex(e), R).unwrap();
            let n = s.nodes();
            out.push([n[0].0 as u32, n[1].0 as u32, n[2].0 as u32]);
        }
    }
    println!("placed {} extents on {} nodes in {:.2?}", out.len(), map.nodes.len(), started.elapsed());
    out
}

fn counts(sets: &[[u32; R]], max_id: usize) -> Vec<u64> {
    let mut c = vec![0u64; max_id + 1];
    for s in sets {
        for &n in s {
            c[n as usize] += 1;
        }
    }
    c
}

#[test]
fn balance_and_movement_at_scale() {
    let map = cluster();
    let total = VOLUMES * EXTENTS * R as u64;
    let new = NodeId(NODES + 1);
    let mut bigger = map.clone();
    bigger.nodes.push(Candidate { id: new, zone: "zone-3".into(), weight: 12 * TIB, eligible: true });
    let gone = NodeId(500);
    let smaller = ClusterMap { nodes: map.nodes.iter().filter(|c| c.id != gone).cloned().collect() };
    // The three placements are independent: one thread each (2 cores).
    let (base, added, removed) = std::thread::scope(|s| {
        let a = s.spawn(|| place_all(&bigger));
        let b = s.spawn(|| place_all(&smaller));
        (place_all(&map), a.join().unwrap(), b.join().unwrap())
    });

    // Balance: every node within 10% of its capacity-weighted share.
    let weight_sum: u64 = map.nodes.iter().map(|c| c.weight).sum();
    let held = counts(&base, NODES as usize + 1);
    let mut worst = (0.0f64, NodeId(0));
    for c in &map.nodes {
        let mean = total as f64 * c.weight as f64 / weight_sum as f64;
        let dev = (held[c.id.0 as usize] as f64 - mean) / mean;
        if dev.abs() > worst.0.abs() {
            worst = (dev, c.id);
        }
    }
    for z in 0..ZONES {
        let zone = format!("zone-{z}");
        let w: u64 = map.nodes.iter().filter(|c| c.zone == zone).map(|c| c.weight).sum();
        let h: u64 = map.nodes.iter().filter(|c| c.zone == zone).map(|c| held[c.id.0 as usize]).sum();
        let mean = total as f64 * w as f64 / weight_sum as f64;
        println!(
            "{zone}: {:.1}% of capacity, share {:+.2}% from weighted",
            100.0 * w as f64 / weight_sum as f64,
            100.0 * (h as f64 - mean) / mean
        );
    }
    for tib in [4, 8, 12, 16] {
        let class: Vec<f64> = map
            .nodes
            .iter()
            .filter(|c| c.weight == tib * TIB)
            .map(|c| {
                held[c.id.0 as usize] as f64 / (total as f64 * c.weight as f64 / weight_sum as f64) - 1.0
            })
            .collect();
        let mean = class.iter().sum::<f64>() / class.len() as f64;
        let sd = (class.iter().map(|d| (d - mean) * (d - mean)).sum::<f64>() / class.len() as f64).sqrt();
        let max = class.iter().fold(0.0f64, |m, d| m.max(d.abs()));
        println!(
            "{tib:2} TiB x {}: mean {:+.2}%, sd {:.2}%, max |dev| {:.2}%",
            class.len(),
            100.0 * mean,
            100.0 * sd,
            100.0 * max
        );
    }
    println!(
        "balance: worst node {} ({} TiB) at {:+.2}% from its weighted share",
        worst.1,
        capacity(worst.1.0 - 1) / TIB,
        100.0 * worst.0
    );
    assert!(worst.0.abs() < 0.10, "node {} is {:+.2}% off its weighted share", worst.1, 100.0 * worst.0);

    // Add a node: only sets it joins change, by one replica each, and the
    // replicas moved stay within 1.5x of its ideal share.
    let mut moved = 0u64;
    for (old, now) in base.iter().zip(&added) {
        let arrived: Vec<u32> = now.iter().copied().filter(|n| !old.contains(n)).collect();
        assert!(arrived.is_empty() || arrived == [new.0 as u32], "{old:?} -> {now:?}");
        moved += arrived.len() as u64;
    }
    let ideal = total as f64 * (12 * TIB) as f64 / (weight_sum + 12 * TIB) as f64;
    println!(
        "add {new} (12 TiB): moved {moved} replicas = {:.3}x its weighted share, {:.3}x 1/N",
        moved as f64 / ideal,
        moved as f64 / (total as f64 / (NODES + 1) as f64)
    );
    assert!(moved as f64 <= 1.5 * ideal, "moved {moved}, ideal {ideal}");
    assert!(moved > 0);

    // Remove a node: only the sets that held it change, by one replica each.
    let mut moved = 0u64;
    for (old, now) in base.iter().zip(&removed) {
        if !old.contains(&(gone.0 as u32)) {
            assert_eq!(old, now);
            continue;
        }
        let arrived = now.iter().filter(|n| !old.contains(n)).count();
        assert_eq!(arrived, 1, "{old:?} -> {now:?}");
        assert!(!now.contains(&(gone.0 as u32)));
        moved += 1;
    }
    println!(
        "remove {gone} ({} TiB): moved {moved} replicas, it held {} ({:.3}x 1/N)",
        capacity(gone.0 - 1) / TIB,
        held[gone.0 as usize],
        moved as f64 / (total as f64 / NODES as f64)
    );
    assert_eq!(moved, held[gone.0 as usize]);
}
