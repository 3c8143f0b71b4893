//! Seeded deterministic simulation of the metadata group over its pure
//! cores: `MetaCore` (raft-rs RawNode + our Ready cycle + our state
//! machine) on `MemStore`, 3 and 5 voters (the 3-voter runs also take a
//! joining learner; a third size starts from 1 voter and promotes two
//! joiners to 3), a virtual network that drops, delays, reorders and
//! duplicates messages and cuts partitions, and crashes that drop
//! everything but the store (which holds exactly what the Ready cycle made
//! durable) followed by restarts: at random, and right after a node sent a
//! vote or an append acknowledgement (where persisting before sending matters).
//!
//! Oracle, checked on every applied entry:
//! - no log index is ever applied with two different entries (term, bytes);
//! - every node applies indexes in order, each once per incarnation (after a
//!   restart or a snapshot it goes on from the snapshot's index);
//! - every node's state after applying index i is the same state;
//! - a request that reaches the log more than once is executed once: every
//!   later copy answers what the first did (or, for a copy from before its
//!   origin restarted, "stale");
//! - a linearizable read started after a request was answered reads at an
//!   index at or past it.
//!
//! At the end the network heals, every node restarts, and all must converge
//! on one state.
//!
//! Seeds: `BASALT_SIM_SEEDS` (default 40 per cluster size) from
//! `BASALT_SIM_SEED0` (default 1). A failure names its seed; rerun one with
//! `BASALT_SIM_SEED0=<seed> BASALT_SIM_SEEDS=1`.

use basalt::meta::core::{CoreConfig, MetaCore, NodeReport, ReadyOutput, bootstrap_store};
use basalt::meta::state::{
    ApplyOutcome, ClusterId, Command, ConservativeReplicaCheck, Generation, MetaState, NodeAddrs, NodeSpec,
    Proposal, Rejection, RequestId, VolumeSpec,
};
use basalt::meta::{MemStore, RaftRole};
use basalt::types::{Epoch, ExtentIndex, NodeId, VolumeId};
use raft::eraftpb::{ConfChangeType, Message, MessageType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, HashMap};

enum Packet {
    Raft(Message),
    Heartbeat(NodeReport),
}

struct InFlight {
    at: u64,
    from: NodeId,
    to: NodeId,
    packet: Packet,
}

struct SimNode {
    id: NodeId,
    core: Option<MetaCore<MemStore>>,
    /// The store of a crashed node, until it restarts.
    disk: Option<MemStore>,
    restart_at: u64,
    /// Index of the last entry this incarnation applied.
    applied: u64,
}

#[derive(Clone)]
enum Work {
    Cmd(Command),
    Conf(ConfChangeType, NodeId),
}

struct ClientReq {
    origin: NodeId,
    request: RequestId,
    work: Work,
    retry_at: u64,
}

struct Read {
    node: NodeId,
    /// Highest log index of a request answered before this read began.
    floor: u64,
    index: Option<u64>,
}

struct Sim {
    seed: u64,
    rng: StdRng,
    now: u64,
    nodes: Vec<SimNode>,
    net: Vec<InFlight>,
    /// Partition: node -> side. Messages across sides are lost.
    side: BTreeMap<NodeId, u8>,
    heal_at: u64,
    /// Nodes that start empty and join as learners.
    joiners: Vec<NodeId>,
    max_voters: usize,
    pending: Vec<ClientReq>,
    reads: BTreeMap<u64, Read>,
    next_read: u64,
    /// Oracle: index -> (term, bytes) of the entry applied there.
    log: BTreeMap<u64, (u64, Vec<u8>)>,
    /// Oracle: index -> the state after applying it (snapshot form).
    digests: BTreeMap<u64, (Vec<u8>, NodeId, &'static str)>,
    /// Oracle: the first outcome of every request that reached the log.
    first: HashMap<RequestId, Result<ApplyOutcome, Rejection>>,
    /// Oracle: index at which each answered request applied.
    answered_max: u64,
    faults: bool,
    stats: Stats,
}

#[derive(Default, Debug)]
struct Stats {
    applied: u64,
    answered: u64,
    duplicates: u64,
    crashes: u64,
    snapshots: u64,
    partitions: u64,
    reads: u64,
}

fn spec(id: NodeId) -> NodeSpec {
    NodeSpec {
        id,
        addrs: NodeAddrs {
            peer: format!("p{}", id.0),
            nbd: format!("n{}", id.0),
            iscsi: format!("i{}", id.0),
            admin: format!("a{}", id.0),
        },
        zone: format!("z{}", id.0 % 2),
        capacity: 1 << 40,
        has_data: id.0 % 2 == 1,
        pid: 1,
    }
}

fn digest(s: &MetaState) -> Vec<u8> {
    s.encode_snapshot()
}

/// `timeout`: this incarnation's election timeout, drawn from the sim's rng
/// (raft-rs would draw it from an unseeded one).
fn core_config(id: NodeId, max_voters: usize, timeout: usize) -> CoreConfig {
    let mut c = CoreConfig::new(id);
    c.min_election_ticks = timeout;
    c.max_election_ticks = timeout + 1;
    c.election_ticks = 10;
    c.heartbeat_ticks = 2;
    c.snapshot_interval = 25;
    c.retain_entries = 5;
    c.liveness_ticks = 40;
    c.max_voters = max_voters;
    c
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl Sim {
    fn new(seed: u64, voters: u64, joiners: u64, max_voters: usize) -> Sim {
        let ids: Vec<NodeId> = (1..=voters).map(NodeId).collect();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut nodes = Vec::new();
        let total = voters + joiners;
        for i in 1..=total {
            let id = NodeId(i);
            let mut store = MemStore::new();
            if i <= voters {
                bootstrap_store(&mut store, &ids).unwrap();
            }
            let timeout = rng.gen_range(10..30);
            let mut core = MetaCore::open(
                core_config(id, max_voters, timeout),
                store,
                Box::new(ConservativeReplicaCheck),
                &logger(),
            )
            .unwrap();
            core.set_bootstrap_candidate(ClusterId(seed as u128 * 100 + i as u128), "sim".into());
            let applied = core.state().applied_index();
            nodes.push(SimNode { id, core: Some(core), disk: None, restart_at: 0, applied });
        }
        Sim {
            seed,
            rng,
            now: 0,
            nodes,
            net: Vec::new(),
            side: BTreeMap::new(),
            heal_at: 0,

            joiners: (voters + 1..=total).map(NodeId).collect(),
            max_voters,
            pending: Vec::new(),
            reads: BTreeMap::new(),
            next_read: 0,
            log: BTreeMap::new(),
            digests: BTreeMap::new(),
            first: HashMap::new(),
            answered_max: 0,
            faults: true,
            stats: Stats::default(),
        }
    }

    fn fail(&self, what: String) -> ! {
        panic!("meta_sim seed {} tick {}: {what}", self.seed, self.now);
    }

    fn node(&mut self, id: NodeId) -> &mut SimNode {
        &mut self.nodes[id.0 as usize - 1]
    }

    fn alive(&self) -> Vec<NodeId> {
        self.nodes.iter().filter(|n| n.core.is_some()).map(|n| n.id).collect()
    }

    fn send(&mut self, from: NodeId, to: NodeId, packet: Packet) {
        if self.faults && self.rng.gen_bool(0.05) {
            return;
        }
        let delay = if self.faults { self.rng.gen_range(1..=6) } else { 1 };
        if self.faults
            && self.rng.gen_bool(0.03)
            && let Packet::Raft(m) = &packet
        {
            let again = self.rng.gen_range(1..=10);
            self.net.push(InFlight { at: self.now + again, from, to, packet: Packet::Raft(m.clone()) });
        }
        self.net.push(InFlight { at: self.now + delay, from, to, packet });
    }

    fn cut(&self, a: NodeId, b: NodeId) -> bool {
        self.side.get(&a).copied().unwrap_or(0) != self.side.get(&b).copied().unwrap_or(0)
    }

    fn deliver(&mut self) {
        let now = self.now;
        let (due, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.net).into_iter().partition(|m| m.at <= now);
        self.net = rest;
        for m in due {
            if self.cut(m.from, m.to) {
                continue;
            }
            let Some(core) = self.node(m.to).core.as_mut() else { continue };
            match m.packet {
                Packet::Raft(msg) => {
                    let _ = core.step(msg);
                }
                Packet::Heartbeat(r) => core.on_heartbeat(r),
            }
        }
    }

    fn ready_all(&mut self) {
        for i in 0..self.nodes.len() {
            while let Some(core) = self.nodes[i].core.as_mut() {
                if !core.has_ready() {
                    break;
                }
                // A leader's appends leave before its write, as in the shell.
                let mut early = Vec::new();
                let out = match core.handle_ready_with(&mut |m| early.push(m)) {
                    Ok(o) => o,
                    Err(e) => self.fail(format!("node {} Ready failed: {e:?}", i + 1)),
                };
                let id = NodeId(i as u64 + 1);
                for m in early {
                    self.send(id, NodeId(m.to), Packet::Raft(m));
                }
                self.absorb(id, out);
            }
        }
    }

    fn absorb(&mut self, id: NodeId, out: ReadyOutput) {
        if let Some(i) = out.snapshot_installed {
            self.stats.snapshots += 1;
            let before = self.node(id).applied;
            if i < before {
                self.fail(format!("node {id} installed snapshot {i} below its applied {before}"));
            }
            self.node(id).applied = i;
            // Entries after the snapshot may apply in the same turn; then the
            // check after them covers the installed state.
            if out.applied.is_empty() {
                let d = digest(self.node(id).core.as_ref().unwrap().state());
                self.check_digest(id, i, d, "install");
            }
        }
        for a in &out.applied {
            self.stats.applied += 1;
            let expect = self.node(id).applied + 1;
            if a.index != expect {
                self.fail(format!("node {id} applied index {} after {}", a.index, expect - 1));
            }
            self.node(id).applied = a.index;
            let entry = (a.term, a.data.to_vec());
            match self.log.get(&a.index) {
                Some(e) if *e != entry => self.fail(format!(
                    "index {} holds two different entries: term {} vs term {} (node {id})",
                    a.index, e.0, entry.0
                )),
                Some(_) => {}
                None => {
                    self.log.insert(a.index, entry);
                }
            }
            if let Some(r) = a.request {
                match self.first.get(&r) {
                    None => {
                        self.first.insert(r, a.outcome.clone());
                    }
                    Some(f) if *f == a.outcome => {}
                    Some(_) if matches!(a.outcome, Err(Rejection::StaleRequest { .. })) => {}
                    Some(f) => self.fail(format!(
                        "request {r:?} executed twice: first {f:?}, then {:?} at index {}",
                        a.outcome, a.index
                    )),
                }
                // The origin answers its caller when it applies the request.
                if r.origin == id {
                    if let Some(pos) = self.pending.iter().position(|p| p.request == r && p.origin == id) {
                        self.pending.swap_remove(pos);
                        self.stats.answered += 1;
                        self.answered_max = self.answered_max.max(a.index);
                    } else {
                        self.stats.duplicates += 1;
                    }
                }
            }
        }
        if !out.applied.is_empty() {
            let idx = self.node(id).applied;
            let d = digest(self.node(id).core.as_ref().unwrap().state());
            self.check_digest(id, idx, d, "apply");
        }
        {
            use basalt::meta::LogStore;
            let snap = self.node(id).core.as_ref().unwrap().store().latest_snapshot().clone();
            let i = snap.get_metadata().index;
            if i > 1 {
                let s = MetaState::decode_snapshot(&snap.data).unwrap();
                self.check_digest(id, i, digest(&s), "stored snapshot");
            }
        }
        for (ctx, index) in out.reads {
            if let Some(r) = self.reads.get_mut(&ctx)
                && r.node == id
                && r.index.is_none()
            {
                r.index = Some(index);
            }
        }
        let applied = self.node(id).applied;
        let done: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.node == id && r.index.is_some_and(|i| i <= applied))
            .map(|(k, _)| *k)
            .collect();
        for k in done {
            let r = self.reads.remove(&k).unwrap();
            let i = r.index.unwrap();
            if i < r.floor {
                self.fail(format!("read on {id} at index {i} misses a write answered at {}", r.floor));
            }
            self.stats.reads += 1;
        }
        let mut crash = false;
        for m in out.messages {
            // Crash right after promising something (a vote, an append):
            // the moments where durability before sending matters.
            let promise = matches!(
                m.get_msg_type(),
                MessageType::MsgRequestVoteResponse | MessageType::MsgAppendResponse
            ) && !m.reject;
            crash |= self.faults && promise && self.rng.gen_bool(0.02);
            self.send(id, NodeId(m.to), Packet::Raft(m));
        }
        if crash {
            self.crash(id);
        }
    }

    fn check_digest(&mut self, id: NodeId, index: u64, d: Vec<u8>, how: &'static str) {
        match self.digests.get(&index) {
            Some((x, first, first_how)) if *x != d => {
                eprintln!("first recorded by {first} ({first_how}), now {id} ({how})");
                let a = MetaState::decode_snapshot(x).unwrap();
                let b = MetaState::decode_snapshot(&d).unwrap();
                self.fail(format!(
                    "node {id} state after index {index} differs from another node's:\n{a:#?}\nvs\n{b:#?}"
                ))
            }
            Some(_) => {}
            None => {
                self.digests.insert(index, (d, id, how));
            }
        }
    }

    fn random_command(&mut self) -> Command {
        let r = &mut self.rng;
        match r.gen_range(0..10) {
            0..=3 => Command::CreateVolume {
                spec: VolumeSpec {
                    name: format!("v{}", r.gen_range(0..40)),
                    size: r.gen_range(1..64u64) << 22,
                    replicas: r.gen_range(1..=3),
                    min_replicas: 1,
                    extent_size: 1 << 22,
                    stripe_unit: 1 << 20,
                    stripe_width: r.gen_range(1..=4),
                    read_only: false,
                },
            },
            4 => Command::DeleteVolume { volume: VolumeId(r.gen_range(1..30)) },
            5 | 6 => Command::SetOwner {
                volume: VolumeId(r.gen_range(1..30)),
                owner: Some(NodeId(r.gen_range(1..=3))),
                expected: Generation(r.gen_range(0..4)),
            },
            7 | 8 => {
                let n = r.gen_range(1..=3);
                Command::SetExtentReplicas {
                    volume: VolumeId(r.gen_range(1..30)),
                    extent: ExtentIndex(r.gen_range(0..6)),
                    epoch: Epoch(r.gen_range(1..8)),
                    replicas: (1..=n).map(NodeId).collect(),
                }
            }
            _ => Command::ClearExtentReplicas {
                volume: VolumeId(r.gen_range(1..30)),
                extent: ExtentIndex(r.gen_range(0..6)),
                epoch: Epoch(r.gen_range(1..8)),
            },
        }
    }

    fn submit(&mut self, origin: NodeId, work: Work) {
        let Some(core) = self.node(origin).core.as_mut() else { return };
        let request = core.next_request();
        let req = ClientReq { origin, request, work, retry_at: 0 };
        self.pending.push(req);
        let i = self.pending.len() - 1;
        self.propose(i);
    }

    /// (Re)proposes pending request `i` from its origin, with its one request id.
    fn propose(&mut self, i: usize) {
        let (origin, request, work) = {
            let p = &self.pending[i];
            (p.origin, p.request, p.work.clone())
        };
        self.pending[i].retry_at = self.now + 15;
        let Some(core) = self.node(origin).core.as_mut() else { return };
        let _ = match work {
            Work::Cmd(command) => core.propose(&Proposal { request, command }),
            Work::Conf(kind, node) => core.propose_membership(request, kind, node),
        };
    }

    fn clients(&mut self) {
        let alive = self.alive();
        if alive.is_empty() {
            return;
        }
        if self.rng.gen_bool(0.3) {
            let origin = alive[self.rng.gen_range(0..alive.len())];
            let cmd = self.random_command();
            self.submit(origin, Work::Cmd(cmd));
        }
        // Learners join: registered, then added to Raft (again if the
        // requests died with their origin); the leader promotes them while
        // there are fewer voters than max_voters.
        if self.now >= 150 && self.now.is_multiple_of(50) {
            let origin = alive[0];
            let s = std::sync::Arc::clone(self.node(origin).core.as_ref().unwrap().state());
            for j in self.joiners.clone() {
                if s.cluster().is_some() && s.node(j).is_none() {
                    self.submit(origin, Work::Cmd(Command::AddNode { spec: spec(j) }));
                } else if s.node(j).is_some() && s.role(j).is_none() {
                    self.submit(origin, Work::Conf(ConfChangeType::AddLearnerNode, j));
                }
            }
        }
        if self.rng.gen_bool(0.05) {
            let node = alive[self.rng.gen_range(0..alive.len())];
            self.next_read += 1;
            let ctx = self.next_read;
            let floor = self.answered_max;
            self.reads.insert(ctx, Read { node, floor, index: None });
            self.node(node).core.as_mut().unwrap().read_index(ctx);
        }
        let now = self.now;
        for i in 0..self.pending.len() {
            if self.pending[i].retry_at <= now {
                self.propose(i);
            }
        }
        // Requests whose origin died lost their caller; reads too.
        let alive_set: BTreeSet<NodeId> = alive.iter().copied().collect();
        self.pending.retain(|p| alive_set.contains(&p.origin));
        self.reads.retain(|_, r| alive_set.contains(&r.node));
        if now.is_multiple_of(5) {
            for id in alive {
                let core = self.node(id).core.as_ref().unwrap();
                if let Some(l) = core.leader() {
                    let report = NodeReport { spec: spec(id), used: 0 };
                    if l == id {
                        self.node(id).core.as_mut().unwrap().on_heartbeat(report);
                    } else {
                        self.send(id, l, Packet::Heartbeat(report));
                    }
                }
            }
        }
    }

    fn crash(&mut self, id: NodeId) {
        let restart = self.now + self.rng.gen_range(20..120);
        let n = self.node(id);
        let core = n.core.take().unwrap();
        n.disk = Some(core.store().clone());
        n.restart_at = restart;
        self.stats.crashes += 1;
    }

    fn restart(&mut self, id: NodeId) {
        let max_voters = self.max_voters;
        let seed = self.seed;
        let timeout = self.rng.gen_range(10..30);
        let n = self.node(id);
        let mut store = n.disk.take().unwrap();
        store.reopen();
        let mut core = MetaCore::open(
            core_config(id, max_voters, timeout),
            store,
            Box::new(ConservativeReplicaCheck),
            &logger(),
        )
        .unwrap_or_else(|e| panic!("meta_sim seed {seed}: restart of {id} failed: {e:?}"));
        core.set_bootstrap_candidate(ClusterId(seed as u128 * 100 + id.0 as u128), "sim".into());
        n.applied = core.state().applied_index();
        n.core = Some(core);
        let d = digest(self.node(id).core.as_ref().unwrap().state());
        let idx = self.node(id).applied;
        if idx > 1 {
            self.check_digest(id, idx, d, "restart");
        }
    }

    fn faults(&mut self) {
        let now = self.now;
        for i in 0..self.nodes.len() {
            let id = self.nodes[i].id;
            if self.nodes[i].core.is_some() {
                if self.rng.gen_bool(0.004) {
                    self.crash(id);
                }
            } else if now >= self.nodes[i].restart_at {
                self.restart(id);
            }
        }
        if self.side.is_empty() {
            if self.rng.gen_bool(0.006) {
                self.stats.partitions += 1;
                for n in &self.nodes {
                    let s = self.rng.gen_range(0..2);
                    self.side.insert(n.id, s);
                }
                self.heal_at = now + self.rng.gen_range(30..150);
            }
        } else if now >= self.heal_at {
            self.side.clear();
        }
    }

    fn step(&mut self) {
        self.now += 1;
        for n in &mut self.nodes {
            if let Some(c) = n.core.as_mut() {
                c.tick();
            }
        }
        self.deliver();
        self.ready_all();
        self.clients();
        if self.faults {
            self.faults();
        }
        self.ready_all();
    }

    fn run(&mut self, ticks: u64) {
        for _ in 0..ticks {
            self.step();
        }
        // Heal: no more faults, everyone back, one history.
        self.faults = false;
        self.side.clear();
        for i in 0..self.nodes.len() {
            if self.nodes[i].core.is_none() {
                let id = self.nodes[i].id;
                self.restart(id);
            }
        }
        for _ in 0..3000 {
            self.step();
            if self.converged() {
                return;
            }
        }
        let st: Vec<_> = self.nodes.iter().map(|n| n.core.as_ref().map(|c| c.status())).collect();
        self.fail(format!("no convergence after healing: {st:?}"));
    }

    fn converged(&self) -> bool {
        let cores: Vec<_> = self.nodes.iter().map(|n| n.core.as_ref().unwrap()).collect();
        let leader = cores.iter().filter(|c| c.status().role == RaftRole::Leader).count() == 1;
        let applied = cores[0].state().applied_index();
        let state = cores[0].state();
        leader
            && self.pending.is_empty()
            && cores.iter().all(|c| c.state().applied_index() == applied && **c.state() == **state)
            && cores.iter().all(|c| c.status().commit_index == applied)
            && self.joiners.iter().all(|j| state.role(*j).is_some())
            && state.members().voters.len() == self.max_voters.min(self.nodes.len())
    }
}

fn seeds() -> std::ops::Range<u64> {
    let n: u64 = std::env::var("BASALT_SIM_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(40);
    let s0: u64 = std::env::var("BASALT_SIM_SEED0").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    s0..s0 + n
}

fn run_seeds(voters: u64, joiners: u64, max_voters: usize) {
    let mut total = Stats::default();
    for seed in seeds() {
        let mut sim = Sim::new(seed, voters, joiners, max_voters);
        sim.run(1200);
        let st = &sim.stats;
        // A run that never got anything done proves nothing.
        assert!(st.answered > 0 && sim.log.len() > 20, "seed {seed}: too little happened: {st:?}");
        let s = sim.nodes[0].core.as_ref().unwrap().state();
        assert!(s.cluster().is_some(), "seed {seed}: never bootstrapped");
        total.applied += st.applied;
        total.answered += st.answered;
        total.duplicates += st.duplicates;
        total.crashes += st.crashes;
        total.snapshots += st.snapshots;
        total.partitions += st.partitions;
        total.reads += st.reads;
    }
    eprintln!("meta_sim {voters} voters + {joiners} joining, up to {max_voters} voters: {total:?}");
    // The faults really happened across the seeds.
    assert!(
        total.crashes > 0 && total.partitions > 0 && total.snapshots > 0 && total.duplicates > 0,
        "{total:?}"
    );
}

#[test]
fn three_voters_and_a_learner_under_faults() {
    run_seeds(3, 1, 3);
}

#[test]
fn five_voters_under_faults() {
    run_seeds(5, 0, 5);
}

/// Membership changes under faults: one voter, two joiners promoted.
#[test]
fn one_voter_grows_to_three_under_faults() {
    run_seeds(1, 2, 3);
}

#[test]
fn a_seed_replays_exactly() {
    let trace = |seed| {
        let mut sim = Sim::new(seed, 3, 1, 3);
        sim.run(400);
        (sim.log.clone(), sim.digests.clone(), sim.stats.applied, sim.stats.crashes)
    };
    assert_eq!(trace(7), trace(7));
}
