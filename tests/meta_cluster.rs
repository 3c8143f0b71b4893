//! In-process metadata clusters: 1, 3 and 5 `MetaNode`s in one runtime over
//! a channel transport, each on a real redb file in its own temp dir.
//! Bootstrap, election, writes from any node, leader crash, restart and
//! catch-up (from the log, and by snapshot after compaction), a minority
//! refusing writes, joining learners and their promotion, liveness, removal.
//!
//! Waits are bounded (a failed wait names what it waited for); nothing
//! asserts on how long anything took.

use basalt::meta::core::{NodeReport, bootstrap_store};
use basalt::meta::state::{NodeAddrs, NodeSpec, NodeState, VolumeSpec};
use basalt::meta::{
    ApplyOutcome, Command, Consistency, MetaConfig, MetaError, MetaNode, MetaRequest, MetaResponse,
    MetaTransport, RaftRole, RedbStore, Rejection, Startup,
};
use basalt::types::{NodeId, VolumeId};
use futures::future::BoxFuture;
use raft::eraftpb::Message;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Net {
    nodes: Mutex<HashMap<NodeId, MetaNode>>,
    isolated: Mutex<HashSet<NodeId>>,
}

impl Net {
    fn get(&self, from: NodeId, to: NodeId) -> Option<MetaNode> {
        let iso = self.isolated.lock().unwrap();
        if iso.contains(&from) || iso.contains(&to) {
            return None;
        }
        self.nodes.lock().unwrap().get(&to).cloned()
    }
}

struct Transport {
    me: NodeId,
    net: Arc<Net>,
}

impl MetaTransport for Transport {
    fn send(&self, to: NodeId, msg: Message) {
        if let Some(n) = self.net.get(self.me, to) {
            n.step(msg);
        }
    }
    fn forward(&self, to: NodeId, req: MetaRequest) -> BoxFuture<'static, Result<MetaResponse, MetaError>> {
        let target = self.net.get(self.me, to);
        Box::pin(async move {
            match target {
                Some(n) => n.handle_request(req).await,
                None => Err(MetaError::Transport { to, reason: "unreachable".into() }),
            }
        })
    }
}

struct Cluster {
    net: Arc<Net>,
    dirs: HashMap<NodeId, tempfile::TempDir>,
    members: Vec<NodeId>,
    snapshot_interval: u64,
    max_voters: usize,
}

fn spec(id: NodeId) -> NodeSpec {
    NodeSpec {
        id,
        addrs: NodeAddrs {
            peer: format!("127.0.0.{}:7100", id.0),
            nbd: format!("127.0.0.{}:10809", id.0),
            iscsi: format!("127.0.0.{}:3260", id.0),
            admin: format!("127.0.0.{}:7180", id.0),
        },
        zone: format!("zone-{}", id.0 % 3),
        capacity: 1 << 40,
        has_data: true,
        pid: 1,
    }
}

/// One replica: these clusters start with one data node, and placement
/// refuses a volume it cannot place.
fn vol(name: &str) -> VolumeSpec {
    VolumeSpec {
        name: name.into(),
        size: 1 << 30,
        replicas: 1,
        min_replicas: 1,
        extent_size: 64 << 20,
        stripe_unit: 1 << 20,
        stripe_width: 4,
        read_only: false,
    }
}

impl Cluster {
    fn new(n: u64, snapshot_interval: u64) -> Cluster {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let members: Vec<NodeId> = (1..=n).map(NodeId).collect();
        let mut c = Cluster {
            net: Arc::default(),
            dirs: HashMap::new(),
            members: members.clone(),
            snapshot_interval,
            max_voters: if n == 5 { 5 } else { 3 },
        };
        for id in members {
            c.start(id, true);
        }
        c
    }

    fn path(&mut self, id: NodeId) -> PathBuf {
        self.dirs.entry(id).or_insert_with(|| tempfile::tempdir().unwrap()).path().join("raft.redb")
    }

    fn config(&self, id: NodeId) -> MetaConfig {
        let mut cfg = MetaConfig::new(id);
        cfg.tick = Duration::from_millis(20);
        cfg.core.election_ticks = 10;
        cfg.core.heartbeat_ticks = 2;
        cfg.core.liveness_ticks = 40;
        cfg.core.snapshot_interval = self.snapshot_interval;
        cfg.core.retain_entries = 2;
        cfg.core.max_voters = self.max_voters;
        cfg.request_timeout = Duration::from_secs(2);
        cfg.heartbeat_interval = Duration::from_millis(60);
        cfg
    }

    /// Starts (or restarts, from its directory) node `id`.
    fn start(&mut self, id: NodeId, initial: bool) -> MetaNode {
        let path = self.path(id);
        let store = RedbStore::open(&path).unwrap();
        let transport = Arc::new(Transport { me: id, net: Arc::clone(&self.net) });
        let startup = if initial {
            Startup::Initial { members: self.members.clone(), cluster_name: "test".into(), cluster_id: None }
        } else {
            Startup::Join
        };
        let node = MetaNode::start(
            self.config(id),
            store,
            transport,
            NodeReport { spec: spec(id), used: 0 },
            startup,
        )
        .unwrap();
        self.net.nodes.lock().unwrap().insert(id, node.clone());
        node
    }

    fn node(&self, id: NodeId) -> MetaNode {
        self.net.nodes.lock().unwrap()[&id].clone()
    }

    fn live(&self) -> Vec<MetaNode> {
        let mut v: Vec<MetaNode> = self.net.nodes.lock().unwrap().values().cloned().collect();
        v.sort_by_key(|n| n.id());
        v
    }

    /// Kills node `id` (its task and its open store) as a crash would.
    async fn crash(&self, id: NodeId) {
        let n = self.net.nodes.lock().unwrap().remove(&id).unwrap();
        n.shutdown().await;
    }

    /// Waits for one leader that every live node agrees on.
    async fn leader(&self) -> NodeId {
        wait("one agreed leader", || {
            let st: Vec<_> = self.live().iter().map(|n| n.status()).collect();
            let l = st.iter().find(|s| s.role == RaftRole::Leader)?.id;
            st.iter().all(|s| s.leader == Some(l)).then_some(l)
        })
        .await
    }

    /// Waits until every live node has the cluster id and all members registered.
    async fn ready(&self) {
        self.leader().await;
        wait("bootstrapped and registered everywhere", || {
            let states: Vec<_> = self.live().iter().map(|n| n.subscribe().borrow().clone()).collect();
            let id = states[0].cluster()?.id;
            let all = states.iter().all(|s| {
                s.cluster().map(|c| c.id) == Some(id) && self.members.iter().all(|m| s.node(*m).is_some())
            });
            all.then_some(())
        })
        .await;
    }
}

async fn wait<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..1500 {
        if let Some(v) = f() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn create(n: &MetaNode, name: &str) -> Result<VolumeId, MetaError> {
    match n.propose(Command::CreateVolume { spec: vol(name) }).await? {
        ApplyOutcome::VolumeCreated(id) => Ok(id),
        other => panic!("create {name}: {other:?}"),
    }
}

fn names(s: &basalt::meta::MetaState) -> Vec<String> {
    s.volumes().map(|v| v.name.clone()).collect()
}

async fn bootstrap_elect_and_write_from_every_node(n: u64) {
    let c = Cluster::new(n, 1000);
    c.ready().await;
    // Every node's heartbeat reaches the leader and is acknowledged.
    for node in c.live() {
        wait("liveness ack", || node.last_liveness_ack()).await;
    }
    let cluster_ids: HashSet<_> =
        c.live().iter().map(|x| x.subscribe().borrow().cluster().unwrap().id).collect();
    assert_eq!(cluster_ids.len(), 1);
    let mut ids = Vec::new();
    for node in c.live() {
        let id = create(&node, &format!("vol-{}", node.id().0)).await.unwrap();
        // Resolved means applied here: the writer reads its own write.
        assert!(node.read(Consistency::Stale).await.unwrap().volume(id).is_some());
        ids.push(id);
    }
    assert_eq!(ids, (1..=n).map(VolumeId).collect::<Vec<_>>());
    // The same name from another node is refused the same way everywhere.
    let last = c.node(NodeId(n));
    assert!(matches!(
        create(&last, "vol-1").await,
        Err(MetaError::Rejected(Rejection::VolumeNameExists(ref s))) if s == "vol-1"
    ));
    for node in c.live() {
        let s = node.read(Consistency::Linearizable).await.unwrap();
        let expect: Vec<String> = (1..=n).map(|i| format!("vol-{i}")).collect();
        assert_eq!(names(&s), expect);
        let st = node.status();
        assert_eq!(st.voters, (1..=n).map(NodeId).collect::<Vec<_>>());
        assert!(st.learners.is_empty());
        for m in 1..=n {
            assert_eq!(s.node(NodeId(m)).unwrap().spec, spec(NodeId(m)));
            assert_eq!(s.node(NodeId(m)).unwrap().state, NodeState::Up);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_bootstrap_elect_and_write_from_every_node() {
    bootstrap_elect_and_write_from_every_node(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_bootstrap_elect_and_write_from_every_node() {
    bootstrap_elect_and_write_from_every_node(5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_crash_reelection_and_catch_up_from_the_log() {
    let mut c = Cluster::new(3, 1000);
    c.ready().await;
    let old = c.leader().await;
    let term = c.node(old).status().term;
    create(&c.node(old), "before").await.unwrap();
    c.crash(old).await;
    let new = c.leader().await;
    assert_ne!(new, old);
    assert!(c.node(new).status().term > term);
    for (i, n) in c.live().iter().enumerate() {
        create(n, &format!("after-{i}")).await.unwrap();
    }
    let restarted = c.start(old, true);
    wait("old leader caught up", || {
        let s = restarted.subscribe().borrow().clone();
        (s.volume_count() == 3).then_some(())
    })
    .await;
    // From the log: no snapshot was needed.
    assert_eq!(restarted.status().snapshot_index, 1);
    let s = restarted.read(Consistency::Linearizable).await.unwrap();
    assert_eq!(names(&s), vec!["before", "after-0", "after-1"]);
    // It takes writes again, too.
    create(&restarted, "from-old").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_node_catches_up_by_snapshot_after_compaction() {
    let mut c = Cluster::new(3, 8);
    c.ready().await;
    let leader = c.leader().await;
    let lagger = c.members.iter().copied().find(|m| *m != leader).unwrap();
    let lag_last = c.node(lagger).status().log_last;
    c.crash(lagger).await;
    for i in 0..30 {
        create(&c.node(leader), &format!("v{i}")).await.unwrap();
    }
    let ls = c.node(leader).status();
    assert!(ls.snapshot_index > lag_last, "leader compacted past the lagging node: {ls:?}");
    assert!(ls.log_first > lag_last + 1, "{ls:?}");
    let back = c.start(lagger, true);
    wait("lagging node caught up", || (back.subscribe().borrow().volume_count() == 30).then_some(())).await;
    let st = back.status();
    assert!(st.snapshot_index > lag_last, "caught up by snapshot: {st:?}");
    let a = c.node(leader).read(Consistency::Linearizable).await.unwrap();
    let b = back.read(Consistency::Linearizable).await.unwrap();
    assert_eq!(names(&a), names(&b));
    // And it restarts once more from its own snapshot.
    c.crash(lagger).await;
    let again = c.start(lagger, true);
    assert!(again.status().snapshot_index >= st.snapshot_index);
    wait("restarted again", || (again.subscribe().borrow().volume_count() == 30).then_some(())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minority_refuses_writes_and_linearizable_reads() {
    let c = Cluster::new(3, 1000);
    c.ready().await;
    create(&c.node(NodeId(1)), "kept").await.unwrap();
    c.crash(NodeId(2)).await;
    c.crash(NodeId(3)).await;
    let alone = c.node(NodeId(1));
    let err = create(&alone, "lost").await.unwrap_err();
    assert!(matches!(err, MetaError::NoLeader | MetaError::NoQuorum { .. }), "{err:?}");
    let err = alone.read(Consistency::Linearizable).await.unwrap_err();
    assert!(matches!(err, MetaError::NoLeader | MetaError::NoQuorum { .. }), "{err:?}");
    // What it had is still there to read stale.
    let s = alone.read(Consistency::Stale).await.unwrap();
    assert_eq!(names(&s), vec!["kept"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_restart_keeps_everything() {
    let mut c = Cluster::new(3, 5);
    c.ready().await;
    let cluster = c.node(NodeId(1)).subscribe().borrow().cluster().unwrap().id;
    for i in 0..12 {
        create(&c.node(NodeId(1 + i % 3)), &format!("v{i}")).await.unwrap();
    }
    let terms: HashMap<NodeId, u64> = c.live().iter().map(|n| (n.id(), n.status().term)).collect();
    for id in c.members.clone() {
        c.crash(id).await;
    }
    for id in c.members.clone() {
        c.start(id, true);
    }
    c.leader().await;
    for n in c.live() {
        assert!(n.status().term >= terms[&n.id()]);
        let s = n.read(Consistency::Linearizable).await.unwrap();
        assert_eq!(s.cluster().unwrap().id, cluster);
        assert_eq!(s.volume_count(), 12);
        assert_eq!(s.nodes().count(), 3);
    }
    assert_eq!(create(&c.node(NodeId(2)), "next").await.unwrap(), VolumeId(13));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_bootstrap_of_a_store_is_refused() {
    let c = Cluster::new(1, 1000);
    c.ready().await;
    let dir = tempfile::tempdir().unwrap();
    let mut store = RedbStore::open(&dir.path().join("raft.redb")).unwrap();
    bootstrap_store(&mut store, &[NodeId(1)]).unwrap();
    assert!(matches!(bootstrap_store(&mut store, &[NodeId(1)]), Err(MetaError::AlreadyBootstrapped)));
    drop(store);
    let mut store = RedbStore::open(&dir.path().join("raft.redb")).unwrap();
    assert!(matches!(
        bootstrap_store(&mut store, &[NodeId(1), NodeId(2)]),
        Err(MetaError::AlreadyBootstrapped)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learners_join_and_are_promoted_up_to_the_voter_count() {
    // One initial voter, three voters wanted: two joiners are promoted, the
    // third stays a learner.
    let mut c = Cluster::new(1, 4);
    let first = c.node(NodeId(1));
    c.ready().await;
    for i in 0..6 {
        create(&first, &format!("v{i}")).await.unwrap();
    }
    for id in [2, 3, 4].map(NodeId) {
        first.add_learner(spec(id)).await.unwrap();
        c.start(id, false);
        let want = (id.0 as usize).min(3);
        wait("promotion", || (first.status().voters.len() == want).then_some(())).await;
    }
    let st = first.status();
    assert_eq!(st.voters, vec![NodeId(1), NodeId(2), NodeId(3)]);
    assert_eq!(st.learners, vec![NodeId(4)]);
    // Every joiner got the log (through the leader's snapshot) and serves reads.
    for id in [2, 3, 4].map(NodeId) {
        let n = c.node(id);
        wait("joiner caught up", || (n.subscribe().borrow().volume_count() == 6).then_some(())).await;
        assert_eq!(n.read(Consistency::Linearizable).await.unwrap().volume_count(), 6);
    }
    // A learner accepts writes too (forwarded to the leader).
    create(&c.node(NodeId(4)), "from-learner").await.unwrap();
    let s = first.read(Consistency::Linearizable).await.unwrap();
    assert_eq!(s.role(NodeId(4)), Some(basalt::meta::state::Role::Learner));
    assert_eq!(s.role(NodeId(2)), Some(basalt::meta::state::Role::Voter));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_liveness_down_and_up_through_the_log() {
    let mut c = Cluster::new(3, 1000);
    c.ready().await;
    let leader = c.leader().await;
    let other = c.members.iter().copied().find(|m| *m != leader).unwrap();
    c.crash(other).await;
    let l = c.node(leader);
    wait("node marked down", || {
        (l.subscribe().borrow().node(other).unwrap().state == NodeState::Down).then_some(())
    })
    .await;
    let before = l.status().commit_index;
    c.start(other, true);
    wait("node marked up", || {
        (l.subscribe().borrow().node(other).unwrap().state == NodeState::Up).then_some(())
    })
    .await;
    // A handful of entries (the down, the up, maybe a new term), not one per heartbeat.
    let after = l.read(Consistency::Linearizable).await.unwrap().applied_index();
    assert!(after - before < 10, "liveness wrote {} entries", after - before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_node_refused_while_it_may_hold_replicas() {
    let mut c = Cluster::new(3, 1000);
    c.ready().await;
    let n1 = c.node(NodeId(1));
    n1.add_learner(spec(NodeId(4))).await.unwrap();
    c.start(NodeId(4), false);
    wait("learner added", || n1.status().learners.contains(&NodeId(4)).then_some(())).await;
    let v = create(&n1, "data").await.unwrap();
    let err = n1.remove_node(NodeId(4)).await.unwrap_err();
    assert!(
        matches!(err, MetaError::Rejected(Rejection::NodeHoldsReplicas { node: NodeId(4), .. })),
        "{err:?}"
    );
    assert!(n1.status().learners.contains(&NodeId(4)));
    n1.propose(Command::DeleteVolume { volume: v }).await.unwrap();
    n1.remove_node(NodeId(4)).await.unwrap();
    let s = n1.read(Consistency::Linearizable).await.unwrap();
    assert!(s.node(NodeId(4)).is_none());
    assert_eq!(s.role(NodeId(4)), None);
    assert!(n1.status().learners.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_callers_leave_the_node_consistent() {
    let c = Cluster::new(3, 6);
    c.ready().await;
    let n2 = c.node(NodeId(2));
    // Callers that give up at once, mid-flight: each create applies once or not at all.
    for i in 0..20 {
        let n = n2.clone();
        let fut = async move { create(&n, &format!("dropped-{i}")).await };
        let _ = tokio::time::timeout(Duration::from_micros(50 * i), fut).await;
    }
    let t = tokio::spawn({
        let n = n2.clone();
        async move { n.read(Consistency::Linearizable).await }
    });
    t.abort();
    // The node still answers, and the same name is still taken once.
    let id = create(&n2, "after").await.unwrap();
    let s = c.node(NodeId(3)).read(Consistency::Linearizable).await.unwrap();
    assert!(s.volume(id).is_some());
    let dropped: Vec<String> = names(&s).into_iter().filter(|n| n.starts_with("dropped-")).collect();
    let unique: HashSet<&String> = dropped.iter().collect();
    assert_eq!(unique.len(), dropped.len());
    for name in &dropped {
        assert!(matches!(
            create(&c.node(NodeId(1)), name).await,
            Err(MetaError::Rejected(Rejection::VolumeNameExists(_)))
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_are_refused() {
    let c = Cluster::new(1, 1000);
    c.ready().await;
    let n = c.node(NodeId(1));
    // An oversized command never reaches the log.
    let mut v = vol("x");
    v.name = "n".repeat(100_000);
    let err = n.propose(Command::CreateVolume { spec: v }).await.unwrap_err();
    assert!(matches!(err, MetaError::ProposalTooLarge { len, max: 65536 } if len > 100_000), "{err:?}");
    // A raft message for another node is dropped; the node goes on.
    let m = Message { to: 9, from: 8, term: 1000, ..Default::default() };
    n.step(m);
    let before = n.status().term;
    create(&n, "fine").await.unwrap();
    assert_eq!(n.status().term, before);
    // Bad bytes from the wire are an error, not a panic.
    assert!(basalt::meta::decode_raft_message(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
    assert!(MetaRequest::decode(&[0, 200, 200, 200]).is_err());
    // The leader acknowledges its own liveness as it leads.
    wait("leader's own liveness ack", || n.last_liveness_ack()).await;
}
