//! Versioned placement maps at cluster scale, through the metadata state
//! machine's commands only: 1,000 nodes in 10 zones, 2,000 volumes of 16
//! extents at R = 3. Liveness and membership changes after a volume exists
//! move none of its replicas; volumes created after a change use the new
//! map; maps nobody uses are gone; snapshots keep it all and stay small.
//! Prints its figures (`-- --nocapture`).

use basalt::meta::maps::MapVersion;
use basalt::meta::state::{
    ApplyOutcome, ClusterId, Command, ConservativeReplicaCheck, HoldReason, MetaState, NodeAddrs, NodeSpec,
    NodeState, Proposal, Rejection, RequestId, VolumeSpec,
};
use basalt::types::{Epoch, ExtentIndex, NodeId, VolumeId};
use std::collections::BTreeMap;

const NODES: u64 = 1000;
const ZONES: u64 = 10;
const VOLUMES: u64 = 1000;
const EXTENTS: u64 = 16;
const TIB: u64 = 1 << 40;

fn node(id: u64, zone: u64, capacity: u64) -> NodeSpec {
    NodeSpec {
        id: NodeId(id),
        addrs: NodeAddrs {
            peer: format!("10.0.{}.{}:7000", id / 256, id % 256),
            nbd: String::new(),
            iscsi: String::new(),
            admin: format!("10.0.{}.{}:8080", id / 256, id % 256),
        },
        zone: format!("zone-{zone}"),
        capacity,
        has_data: true,
        pid: 1,
    }
}

fn volume(name: String) -> VolumeSpec {
    VolumeSpec {
        name,
        size: EXTENTS << 26,
        replicas: 3,
        min_replicas: 2,
        extent_size: 64 << 20,
        stripe_unit: 1 << 20,
        stripe_width: 4,
        read_only: false,
    }
}

/// Two state machines fed the same log, and the log itself.
struct Cluster {
    a: MetaState,
    b: MetaState,
    log: Vec<Proposal>,
}

impl Cluster {
    fn run(&mut self, command: Command) -> Result<ApplyOutcome, Rejection> {
        let seq = self.log.len() as u64 + 1;
        let p = Proposal { request: RequestId { origin: NodeId(1), seq }, command };
        let ra = self.a.apply(seq, &p, &ConservativeReplicaCheck);
        let rb = self.b.apply(seq, &p, &ConservativeReplicaCheck);
        assert_eq!(ra, rb, "entry {seq}");
        self.log.push(p);
        ra
    }

    fn create(&mut self, name: String) -> VolumeId {
        match self.run(Command::CreateVolume { spec: volume(name) }) {
            Ok(ApplyOutcome::VolumeCreated(v)) => v,
            other => panic!("{other:?}"),
        }
    }
}

type Sets = BTreeMap<(VolumeId, ExtentIndex), (Epoch, Vec<NodeId>)>;

fn sets(s: &MetaState, volumes: &[VolumeId]) -> Sets {
    let mut out = BTreeMap::new();
    for &v in volumes {
        for e in 0..EXTENTS {
            out.insert((v, ExtentIndex(e)), s.replicas(v, ExtentIndex(e)).unwrap());
        }
    }
    out
}

fn capacity(i: u64) -> u64 {
    [4, 8, 12, 16][(i * 7 % 4) as usize] * TIB
}

#[test]
fn membership_changes_move_nothing_of_existing_volumes() {
    let mut c = Cluster { a: MetaState::new(), b: MetaState::new(), log: Vec::new() };
    c.run(Command::Bootstrap { cluster: ClusterId(1), name: "scale".into() }).unwrap();
    for i in 1..=NODES {
        c.run(Command::AddNode { spec: node(i, i % ZONES, capacity(i)) }).unwrap();
    }
    // Every map before the first volume was used by none: only the latest is kept.
    assert_eq!(c.a.maps().len(), 1);
    let one_map = c.a.encode_snapshot().len();
    let old: Vec<VolumeId> = (0..VOLUMES).map(|i| c.create(format!("old-{i}"))).collect();
    let v_old = c.a.volume(old[0]).unwrap().map_version;
    let before = sets(&c.a, &old);
    assert!(before.values().all(|(_, r)| r.len() == 3));

    // 50 nodes down, 50 new ones, 20 with a new capacity, 10 in a new zone.
    for i in (1..=NODES).step_by(20) {
        c.run(Command::SetNodeState { node: NodeId(i), state: NodeState::Down }).unwrap();
    }
    for i in NODES + 1..=NODES + 50 {
        c.run(Command::AddNode { spec: node(i, i % ZONES, 16 * TIB) }).unwrap();
    }
    for i in (3..=NODES).step_by(50) {
        c.run(Command::UpdateNode { spec: node(i, i % ZONES, 2 * capacity(i)) }).unwrap();
    }
    for i in (7..=NODES).step_by(100) {
        c.run(Command::UpdateNode { spec: node(i, (i + 1) % ZONES, capacity(i)) }).unwrap();
    }
    assert_eq!(sets(&c.a, &old), before, "an existing volume's replica set changed");
    let v_new = c.a.maps().latest().0;
    // Each change above was a new version; only the used one and the latest remain.
    assert!(v_new.0 >= v_old.0 + 80, "{v_old} -> {v_new}");
    assert_eq!(c.a.maps().iter().map(|(v, _, n)| (v, n)).collect::<Vec<_>>(), [(v_old, VOLUMES), (v_new, 0)]);

    let new: Vec<VolumeId> = (0..VOLUMES).map(|i| c.create(format!("new-{i}"))).collect();
    let after = sets(&c.a, &new);
    let on_newcomers = |s: &Sets| s.values().flat_map(|(_, r)| r).filter(|n| n.0 > NODES).count();
    assert_eq!(on_newcomers(&before), 0);
    // 50 of 1050 nodes, 16 TiB each of about 10.6 PiB: about 7.4% of 48,000 replicas.
    let fresh = on_newcomers(&after);
    assert!((2500..=4700).contains(&fresh), "{fresh} replicas of new volumes on the new nodes");
    // New volumes are placed with the latest map, which leaves the down nodes out.
    let placer = c.a.placement_map(new[0]).unwrap();
    for ((v, e), (epoch, r)) in &after {
        assert_eq!(*epoch, Epoch(1));
        assert_eq!(placer.place(*v, *e, 3).unwrap().nodes(), r.as_slice());
    }
    let down_used = after.values().flat_map(|(_, r)| r).filter(|n| n.0 % 20 == 1 && n.0 <= NODES).count();
    assert_eq!(down_used, 0, "a new volume has replicas on down nodes");
    assert!(before.values().flat_map(|(_, r)| r).any(|n| n.0 % 20 == 1), "the old ones keep theirs");

    // Removal: a node of a map in use is refused, one no used map lists is not.
    assert_eq!(
        c.run(Command::RemoveNode { node: NodeId(NODES + 1) }),
        Err(Rejection::NodeHoldsReplicas { node: NodeId(NODES + 1), reason: HoldReason::Map(v_new) })
    );
    c.run(Command::AddNode { spec: node(5000, 0, TIB) }).unwrap();
    assert_eq!(
        c.run(Command::RemoveNode { node: NodeId(5000) }),
        Ok(ApplyOutcome::NodeRemoved(NodeId(5000)))
    );

    // Snapshot: both maps kept, every set the same after a decode.
    let snap = c.a.encode_snapshot();
    let back = MetaState::decode_snapshot(&snap).unwrap();
    assert_eq!(back, c.a);
    let all: Vec<VolumeId> = old.iter().chain(&new).copied().collect();
    assert_eq!(sets(&back, &all), sets(&c.a, &all));
    assert_eq!(c.a, c.b);
    assert_eq!(c.a.encode_snapshot(), c.b.encode_snapshot());

    // Deleting the old volumes drops their map.
    for v in &old {
        c.run(Command::DeleteVolume { volume: *v }).unwrap();
    }
    let kept: Vec<MapVersion> = c.a.maps().iter().map(|(v, _, _)| v).collect();
    assert_eq!(kept, [c.a.volume(new[0]).unwrap().map_version, c.a.maps().latest().0]);
    let one_volume_set = c.a.encode_snapshot().len();
    let maps_bytes = postcard::to_allocvec(c.a.maps()).unwrap().len();
    // A map of 1,000 nodes is about 16 bytes a node: id, zone label, weight.
    assert!(maps_bytes < 2 * 1050 * 20, "{maps_bytes} bytes for {} maps", c.a.maps().len());
    println!("maps: {} versions in {maps_bytes} bytes", c.a.maps().len());
    println!(
        "snapshot bytes: {one_map} (1,000 nodes, one map, no volume); {} (2,000 volumes, {} maps); \
         {one_volume_set} (1,000 volumes, {} maps); {} log entries",
        snap.len(),
        back.maps().len(),
        c.a.maps().len(),
        c.log.len()
    );
    assert_eq!(sets(&c.a, &new), after);
}
