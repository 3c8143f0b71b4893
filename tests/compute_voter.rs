//! A compute node (`data_dirs = []`) as one of the initial members: real
//! `basaltd run` processes on 127.0.0.x, three storage nodes and the
//! compute node bootstrapping the cluster together. The compute node is a
//! voter from the first start, placement never chooses it, a volume
//! written through it lands only on the storage nodes, and after kill -9
//! of the storage node that leads, its vote is what keeps the metadata
//! committing (four voters, three left: a quorum only with it).

mod common;

use common::cluster::Cluster;
use common::{require, run_ok, scratch, stdout};
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
/// The compute node's index; 0-2 store data.
const COMPUTE: usize = 3;

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

/// Four initial members, one of them the compute node. Its election
/// timeout is longer than the others' (35 ticks against 20; liveness
/// needs more than 35 ticks) so a storage node usually wins the first
/// election (the test needs a storage leader to kill).
fn start() -> Cluster {
    start_with(4, 5, COMPUTE)
}

/// `n` initial members, node `compute` the compute node.
fn start_with(n: usize, voters: u8, compute: usize) -> Cluster {
    let mut c = Cluster::configure(n, voters, None);
    c.make_compute(compute);
    let cfg = &c.nodes[compute].config;
    let text = std::fs::read_to_string(cfg).unwrap();
    assert!(text.contains("election_ticks = 20\n"), "{text}");
    std::fs::write(cfg, text.replace("election_ticks = 20\n", "election_ticks = 35\n")).unwrap();
    for k in 0..n {
        c.spawn(k);
    }
    for k in 0..n {
        c.wait_ready(k);
    }
    c
}

fn qemu_io(u: &str, cmds: &[String]) -> String {
    let mut args = vec!["-f", "raw"];
    for cmd in cmds {
        args.extend(["-c", cmd.as_str()]);
    }
    args.push(u);
    let text = stdout(&run_ok("qemu-io", &args));
    assert!(!text.contains("fail") && !text.contains("error"), "qemu-io {u}: {text}");
    text
}

fn logs(c: &Cluster) -> String {
    (0..c.nodes.len()).map(|k| format!("--- node {k} log ---\n{}\n", c.log(k))).collect()
}

fn node_json(s: &Value, id: u64) -> Value {
    s["nodes"].as_array().unwrap().iter().find(|n| n["id"].as_u64() == Some(id)).unwrap().clone()
}

/// Every node id placement chose for any extent of `v`.
fn placed(v: &Value) -> BTreeSet<u64> {
    v["extents"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| e["replicas"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()))
        .collect()
}

#[test]
fn a_compute_node_bootstraps_as_a_voter_stores_nothing_and_keeps_the_quorum() {
    if !require("qemu-io") || !require("nbdcopy") {
        return;
    }
    let mut c = start();
    let mut leader = c.wait_leader(0, None);
    if leader == COMPUTE {
        // The longer timeout is a bias, not a guarantee: restart the
        // compute node so a storage node leads.
        c.kill9(COMPUTE);
        leader = c.wait_leader(0, Some(COMPUTE));
        c.spawn(COMPUTE);
        c.wait_ready(COMPUTE);
    }
    let ids = c.node_ids(COMPUTE);
    let storage: BTreeSet<u64> = ids[..3].iter().copied().collect();

    // Bootstrapped with every initial member as voter, the compute node
    // included; it offers no capacity.
    let s = c.cli_json(COMPUTE, &["cluster", "status"]);
    assert_eq!(s["nodes"].as_array().unwrap().len(), 4, "{s}");
    for (k, &id) in ids.iter().enumerate() {
        let n = node_json(&s, id);
        assert_eq!((n["role"].as_str(), n["state"].as_str()), (Some("voter"), Some("up")), "node {k}: {s}");
    }
    assert_eq!(node_json(&s, ids[COMPUTE])["capacity"].as_u64(), Some(0), "{s}");

    // A volume created through the compute node: placement puts every
    // extent on the three storage nodes (R=3 of three), never on it.
    let v = c.cli_json(
        COMPUTE,
        &["volume", "create", "cv", "--size", "32M", "--replicas", "3", "--extent-size", "4M"],
    );
    let id = v["id"].as_u64().unwrap();
    assert_eq!(v["extents"].as_array().unwrap().len(), 8, "{v}");
    assert_eq!(placed(&v), storage, "only storage nodes are placed: {v}");
    assert_eq!(v["owner"]["node"].as_u64(), Some(ids[COMPUTE]), "{v}");
    for k in 0..4 {
        assert_eq!(placed(&c.cli_json(k, &["volume", "show", "cv"])), storage, "node {k} agrees");
    }

    // Written through the compute node, read back byte-exact through a
    // storage node.
    let mut want = vec![0u8; 32 * MIB];
    let mut cmds: Vec<String> = Vec::new();
    for &(p, off, len) in
        &[(0x31u8, 0, 3 * MIB), (0x32, 5 * MIB - 512, 2 * MIB + 1024), (0x33, 31 * MIB, MIB)]
    {
        cmds.push(format!("write -P {p} {off} {len}"));
        want[off..off + len].fill(p);
    }
    cmds.push("flush".into());
    let through = format!("nbd://{}/cv", c.nodes[COMPUTE].nbd);
    qemu_io(&through, &cmds);
    let tmp = scratch();
    let back = tmp.path().join("back.img");
    run_ok("nbdcopy", &[&format!("nbd://{}/cv", c.nodes[0].nbd), back.to_str().unwrap()]);
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), want.len());
    if let Some(i) = got.iter().zip(&want).position(|(g, w)| g != w) {
        panic!("byte {i} read through storage node 0 differs\n{}", logs(&c));
    }
    // Extents 0, 1 and 7 were written (one stripe unit per set by
    // default): on every storage node, none on the compute node.
    let written: Vec<String> = [0, 1, 7].iter().map(|e| format!("v{id}-e{e}.ext")).collect();
    for k in 0..3 {
        assert_eq!(c.volume_extent_files(k, id), written, "node {k}");
    }
    assert_eq!(c.extent_files(COMPUTE), BTreeSet::new(), "the compute node stores nothing");

    // kill -9 of the storage node that leads. Four voters, three left: the
    // new leader's quorum needs the compute node's vote.
    let term0 = c.cli_json(COMPUTE, &["cluster", "status"])["term"].as_u64().unwrap();
    c.kill9(leader);
    let new = c.wait_leader(COMPUTE, Some(leader));
    let s = c.cli_json(COMPUTE, &["cluster", "status"]);
    assert!(s["term"].as_u64().unwrap() > term0, "a new term: {s}");
    assert_eq!(c.leader(COMPUTE), Some(new));
    // The new leader commits the dead node down...
    let dead = ids[leader];
    wait_for("the killed leader to be committed down", || {
        c.cli(COMPUTE, &["--json", "cluster", "status"]).status.success()
            && node_json(&c.cli_json(COMPUTE, &["cluster", "status"]), dead)["state"] == "down"
    });
    // ...and takes metadata writes through the compute node and a storage
    // node. R=3 would be refused (two storage nodes are up); R=2 volumes
    // are placed on storage nodes only, never the compute node (the down
    // node may be chosen: liveness is not in the placement map,
    // docs/design.md; a down replica is the data path's business).
    let other = (0..3).find(|&k| k != leader).unwrap();
    for (k, name) in [(COMPUTE, "after-c"), (other, "after-s")] {
        let v = c.cli_json(
            k,
            &["volume", "create", name, "--size", "16M", "--replicas", "2", "--extent-size", "4M"],
        );
        let p = placed(&v);
        assert!(p.is_subset(&storage) && p.len() >= 2, "{name}: {v}");
    }
    let list = c.cli_json(COMPUTE, &["volume", "list"]);
    let mut names: Vec<&str> = list.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["after-c", "after-s", "cv"]);

    // Data still moves: written through the compute node (it owns after-c)
    // (R=2, min 1; the dead node may hold one replica of an extent), read
    // back through a live storage node; the written extent's set holds
    // live storage nodes only.
    let after = format!("nbd://{}/after-c", c.nodes[COMPUTE].nbd);
    qemu_io(&after, &["write -P 0x44 1M 2M".into(), "flush".into()]);
    let text = qemu_io(
        &format!("nbd://{}/after-c", c.nodes[other].nbd),
        &["read -P 0x44 1M 2M".into(), "read -P 0 0 1M".into(), "read -P 0 3M 13M".into()],
    );
    assert!(text.contains("read 2097152/2097152"), "{text}");
    let v = c.cli_json(COMPUTE, &["volume", "show", "after-c"]);
    let e0: BTreeSet<u64> =
        v["extents"][0]["replicas"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    let live: BTreeSet<u64> = storage.iter().copied().filter(|&n| n != dead).collect();
    assert!(!e0.is_empty() && e0.is_subset(&live), "{v}");
    assert_eq!(c.extent_files(COMPUTE), BTreeSet::new(), "still nothing on the compute node");
    for k in 0..4 {
        if k != leader {
            assert!(!c.log(k).contains("panicked"), "node {k} panicked:\n{}", c.log(k));
        }
    }
}

/// Two storage nodes and the compute node bootstrap (three voters). After
/// kill -9 of the storage node that leads, the two left are a majority
/// only if the compute node's vote counts: metadata writes go on, through
/// either survivor; volumes are placed on storage nodes only.
#[test]
fn the_compute_nodes_vote_makes_the_majority_after_the_storage_leader_dies() {
    const C: usize = 2;
    let mut c = start_with(3, 3, C);
    let mut leader = c.wait_leader(0, None);
    if leader == C {
        c.kill9(C);
        leader = c.wait_leader(0, Some(C));
        c.spawn(C);
        c.wait_ready(C);
    }
    let ids = c.node_ids(C);
    let storage: BTreeSet<u64> = ids[..2].iter().copied().collect();
    let s = c.cli_json(C, &["cluster", "status"]);
    for &id in &ids {
        assert_eq!(node_json(&s, id)["role"], "voter", "{s}");
    }
    let v = c
        .cli_json(C, &["volume", "create", "two", "--size", "16M", "--replicas", "2", "--extent-size", "4M"]);
    assert_eq!(placed(&v), storage, "{v}");

    let term0 = s["term"].as_u64().unwrap();
    c.kill9(leader);
    let other = 1 - leader;
    let new = c.wait_leader(C, Some(leader));
    assert!(new == other || new == C, "{new}");
    let s = c.cli_json(other, &["cluster", "status"]);
    assert!(s["term"].as_u64().unwrap() > term0, "{s}");
    // The dead node is committed down (a write that needs both votes)...
    let dead = ids[leader];
    wait_for("the killed leader to be committed down", || {
        c.cli(C, &["--json", "cluster", "status"]).status.success()
            && node_json(&c.cli_json(C, &["cluster", "status"]), dead)["state"] == "down"
    });
    // ...then writes through both survivors: R=2 is refused with one
    // storage node up, R=1 lands on a storage node.
    let out = c.cli(C, &["volume", "create", "r2", "--size", "16M", "--replicas", "2"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the cluster has 1"), "{out:?}");
    for (k, name) in [(C, "one-c"), (other, "one-s")] {
        let v = c.cli_json(
            k,
            &["volume", "create", name, "--size", "16M", "--replicas", "1", "--extent-size", "4M"],
        );
        let p = placed(&v);
        assert!(!p.is_empty() && p.is_subset(&storage), "{name}: {v}");
    }
    let out = c.cli(other, &["volume", "delete", "one-c"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for k in [C, other] {
        let list = c.cli_json(k, &["volume", "list"]);
        let mut names: Vec<&str> =
            list.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["one-s", "two"], "node {k}");
    }
    // The killed leader returns and catches up.
    c.spawn(leader);
    c.wait_ready(leader);
    wait_for("the old leader to catch up", || {
        let o = c.cli(leader, &["--json", "--stale", "volume", "list"]);
        o.status.success()
            && serde_json::from_slice::<Value>(&o.stdout)
                .is_ok_and(|v| v.as_array().is_some_and(|a| a.len() == 2))
    });
    assert_eq!(c.extent_files(C), BTreeSet::new());
}
