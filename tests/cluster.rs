//! The control plane with real processes: `basaltd run` nodes on
//! 127.0.0.x forming one cluster, driven through the real `basalt` CLI.

mod common;

use common::cluster::Cluster;
use serde_json::Value;
use std::time::{Duration, Instant};

fn names(v: &Value) -> Vec<String> {
    let mut n: Vec<String> =
        v.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap().to_string()).collect();
    n.sort();
    n
}

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

fn crud_on(n: usize) {
    let c = Cluster::start(n, if n >= 5 { 5 } else { 3 });
    let leader = c.wait_leader(0, None);
    let s = c.cli_json(n - 1, &["cluster", "status"]);
    assert_eq!(s["nodes"].as_array().unwrap().len(), n, "{s}");
    assert_eq!(s["id"].as_str().unwrap().len(), 32, "{s}");
    for node in s["nodes"].as_array().unwrap() {
        assert_eq!(node["state"], "up", "{s}");
        assert_eq!(node["role"], "voter", "{s}");
        assert!(node["pid"].as_u64().unwrap() > 0, "{s}");
        for k in ["peer", "nbd", "iscsi", "admin"] {
            assert!(node["addresses"][k].as_str().unwrap().starts_with("127.0.0."), "{s}");
        }
    }
    // Every node agrees on the cluster id and the leader.
    for k in 0..n {
        let o = c.cli_json(k, &["cluster", "status"]);
        assert_eq!(o["id"], s["id"]);
        assert_eq!(c.leader(k), Some(leader));
    }
    // Writes through a follower are forwarded to the leader.
    let follower = (leader + 1) % n;
    let v = c.cli_json(follower, &["volume", "create", "vol-a", "--size", "1G"]);
    assert_eq!(v["name"], "vol-a");
    assert_eq!(v["size"], 1u64 << 30);
    assert_eq!(v["replicas"], 3);
    assert_eq!(v["min_replicas"], 2);
    assert_eq!(v["extents"].as_array().unwrap().len(), 4, "1 GiB of 256 MiB extents: {v}");
    for e in v["extents"].as_array().unwrap() {
        let set = e["replicas"].as_array().unwrap();
        assert_eq!(set.len(), 3, "{v}");
        let mut ids: Vec<u64> = set.iter().map(|x| x.as_u64().unwrap()).collect();
        ids.dedup();
        assert_eq!(ids.len(), 3, "distinct nodes: {v}");
        assert_eq!(e["state"], "healthy");
    }
    let v2 = c.cli_json(
        (leader + 2) % n,
        &[
            "volume",
            "create",
            "vol-b",
            "--size",
            "64M",
            "--replicas",
            "2",
            "--min-replicas",
            "1",
            "--extent-size",
            "16M",
            "--stripe-unit",
            "1M",
            "--stripe-width",
            "4",
        ],
    );
    assert_eq!(v2["stripe_width"], 4);
    assert_eq!(v2["extent_size"], 16u64 << 20);
    // Reads from any node see both (linearizable by default).
    for k in 0..n {
        assert_eq!(names(&c.cli_json(k, &["volume", "list"])), ["vol-a", "vol-b"], "node {k}");
    }
    let shown = c.cli_json(leader, &["volume", "show", "vol-b"]);
    assert_eq!(shown["id"], v2["id"]);
    assert_eq!(shown["replicas"], 2);
    // A name that exists is refused the same way on every node.
    for k in 0..n {
        let out = c.cli(k, &["volume", "create", "vol-a", "--size", "1G"]);
        assert_eq!(out.status.code(), Some(1), "node {k}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("vol-a") && err.contains("exists"), "node {k}: {err}");
    }
    // Bad input is a usage error (2) or an API error (1), never a crash.
    assert_eq!(c.cli(0, &["volume", "create", "x"]).status.code(), Some(2));
    let out = c.cli(0, &["volume", "create", "bad name", "--size", "1G"]);
    assert_eq!(out.status.code(), Some(1));
    let out = c.cli(0, &["volume", "show", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
    // Human output is a table with the names in it.
    let out = c.cli(follower, &["volume", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("NAME") && text.contains("vol-a") && text.contains("vol-b"), "{text}");
    // Delete through another node.
    let out = c.cli(follower, &["volume", "delete", "vol-a"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for k in 0..n {
        assert_eq!(names(&c.cli_json(k, &["volume", "list"])), ["vol-b"], "node {k}");
    }
    // A node that may hold replicas is not removed, and the refusal says why.
    let id = s["nodes"][0]["id"].as_u64().unwrap().to_string();
    let out = c.cli(follower, &["node", "remove", &id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("replica"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn three_nodes_form_a_cluster_and_serve_metadata_from_any_node() {
    crud_on(3);
}

#[test]
fn five_nodes_form_a_cluster_and_serve_metadata_from_any_node() {
    crud_on(5);
}

fn status_of(c: &Cluster, k: usize) -> Value {
    c.cli_json(k, &["--stale", "cluster", "status"])
}

#[test]
fn leader_kill9_new_leader_then_catch_up_from_log_and_by_snapshot() {
    let mut c = Cluster::start(3, 3);
    let old = c.wait_leader(0, None);
    let term0 = status_of(&c, old)["term"].as_u64().unwrap();
    c.kill9(old);
    let via = (old + 1) % 3;
    let new = c.wait_leader(via, Some(old));
    assert_ne!(new, old);
    assert!(status_of(&c, new)["term"].as_u64().unwrap() > term0);
    // Metadata writes continue on the majority.
    for i in 0..5 {
        c.cli_json(via, &["volume", "create", &format!("log-{i}"), "--size", "16M", "--extent-size", "16M"]);
    }
    // The old leader restarts and catches up from the log.
    c.spawn(old);
    c.wait_ready(old);
    wait_for("the restarted node to list every volume", || {
        let v = c.cli(old, &["--json", "--stale", "volume", "list"]);
        v.status.success()
            && serde_json::from_slice::<Value>(&v.stdout).map(|v| names(&v).len() == 5).unwrap_or(false)
    });
    // Kill it again and write past a compaction (snapshot every 40 entries).
    c.kill9(old);
    for i in 0..60 {
        c.cli_json(via, &["volume", "create", &format!("snap-{i}"), "--size", "16M", "--extent-size", "16M"]);
    }
    c.spawn(old);
    c.wait_ready(old);
    wait_for("the restarted node to catch up by snapshot", || {
        let v = c.cli(old, &["--json", "--stale", "volume", "list"]);
        v.status.success()
            && serde_json::from_slice::<Value>(&v.stdout).map(|v| names(&v).len() == 65).unwrap_or(false)
    });
    assert!(
        c.log(old).contains("restore snapshot") || c.log(old).contains("restored snapshot"),
        "the node caught up by snapshot (log has no snapshot line):\n{}",
        c.log(old)
    );
    let a = c.cli_json(old, &["volume", "list"]);
    let b = c.cli_json(via, &["volume", "list"]);
    assert_eq!(a, b, "one history");
}

#[test]
fn a_minority_refuses_metadata_writes() {
    let mut c = Cluster::start(3, 3);
    let leader = c.wait_leader(0, None);
    let last = (leader + 1) % 3;
    for k in 0..3 {
        if k != last {
            c.kill9(k);
        }
    }
    let out = c.cli(last, &["volume", "create", "lonely", "--size", "16M"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("majority"), "a clear error: {err}");
    // Stale reads still answer.
    assert!(c.cli(last, &["--stale", "volume", "list"]).status.success());
}

#[test]
fn kill9_of_every_node_keeps_cluster_id_volumes_node_ids_and_term() {
    let mut c = Cluster::start(3, 3);
    c.wait_leader(0, None);
    c.cli_json(1, &["volume", "create", "keep", "--size", "1G"]);
    let before = c.cli_json(0, &["cluster", "status"]);
    for k in 0..3 {
        c.kill9(k);
    }
    for k in 0..3 {
        c.spawn(k);
    }
    for k in 0..3 {
        c.wait_ready(k);
    }
    c.wait_leader(2, None);
    let after = c.cli_json(0, &["cluster", "status"]);
    // Unwrapped, so that a field missing on both sides cannot compare equal.
    let cluster_id = |s: &Value| s["id"].as_str().unwrap_or_else(|| panic!("no cluster id: {s}")).to_string();
    assert_eq!(cluster_id(&after), cluster_id(&before));
    let ids = |s: &Value| {
        let mut v: Vec<u64> =
            s["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_u64().unwrap()).collect();
        v.sort();
        v
    };
    assert_eq!(ids(&before).len(), 3, "{before}");
    assert_eq!(ids(&after), ids(&before));
    let term = |s: &Value| s["term"].as_u64().unwrap_or_else(|| panic!("no term: {s}"));
    assert!(term(&after) >= term(&before), "the term never goes back");
    assert_eq!(names(&c.cli_json(2, &["volume", "list"])), ["keep"]);
}

#[test]
fn check_config_prints_the_effective_file_or_names_the_bad_field() {
    let t = tempfile::tempdir().unwrap();
    let good = t.path().join("good.toml");
    std::fs::write(&good, "state_dir = \"/var/lib/basalt/state\"\nzone = \"r1\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_basaltd"))
        .arg("check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("zone = \"r1\"") && text.contains("election_ticks = 10"), "{text}");
    for (body, field) in [
        ("[cluster]\nvoters = 4\n", "cluster.voters"),
        ("zone = \"a b\"\n", "zone"),
        ("[raft]\nheartbeat_ticks = 50\n", "raft.heartbeat_ticks"),
        ("[raft]\nelection_ticks = 60\n", "liveness.down_after_ms"),
        ("nonsense = 1\n", "unknown field"),
    ] {
        let bad = t.path().join("bad.toml");
        std::fs::write(&bad, body).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_basaltd"))
            .arg("check-config")
            .arg(&bad)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{body}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "{body}: {err}");
    }
}

#[test]
fn nodes_join_by_config_and_by_invitation_and_are_promoted_to_voters() {
    let mut c = Cluster::configure(5, 5, None);
    for k in 0..3 {
        c.set_membership(k, &[0, 1, 2], None);
    }
    c.set_membership(3, &[], Some(1));
    c.set_membership(4, &[], None);
    for k in 0..5 {
        c.spawn(k);
    }
    for k in 0..4 {
        c.wait_ready(k);
    }
    // Node 4 waits for an invitation, and says so.
    let out = c.cli(4, &["node", "ready"]);
    assert_eq!(out.status.code(), Some(1), "not ready before it is invited");
    let peer4 = c.nodes[4].peer.to_string();
    let added = c.cli_json(2, &["node", "add", &peer4]);
    assert_eq!(added["addresses"]["peer"], peer4.as_str());
    c.wait_ready(4);
    wait_for("five voters", || {
        let s = c.cli(0, &["--json", "cluster", "status"]);
        let Ok(v) = serde_json::from_slice::<Value>(&s.stdout) else { return false };
        let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
        nodes.len() == 5 && nodes.iter().all(|n| n["role"] == "voter" && n["state"] == "up")
    });
    // Every node, the joined ones included, serves metadata.
    c.cli_json(4, &["volume", "create", "after-join", "--size", "16M", "--extent-size", "16M"]);
    for k in 0..5 {
        assert_eq!(names(&c.cli_json(k, &["volume", "list"])), ["after-join"], "node {k}");
    }
    // Inviting a node of this cluster again changes nothing; an address
    // where nothing listens is a clear error.
    let out = c.cli(0, &["node", "add", "127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("127.0.0.1:1"));
}

#[test]
fn a_silent_node_is_committed_down_and_up_again_when_it_returns() {
    let mut c = Cluster::start(3, 3);
    let leader = c.wait_leader(0, None);
    let victim = (leader + 1) % 3;
    let id = c.cli_json(victim, &["cluster", "status"])["this_node"].as_u64().unwrap();
    let state_of = |c: &Cluster| {
        let s = c.cli_json(leader, &["cluster", "status"]);
        s["nodes"].as_array().unwrap().iter().find(|n| n["id"].as_u64() == Some(id)).unwrap()["state"].clone()
    };
    assert_eq!(state_of(&c), "up");
    let commit0 = c.cli_json(leader, &["cluster", "status"])["commit_index"].as_u64().unwrap();
    c.kill9(victim);
    wait_for("the node to be committed down", || state_of(&c) == "down");
    // Liveness costs log entries only when it changes, not with time.
    let commit1 = c.cli_json(leader, &["cluster", "status"])["commit_index"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let commit2 = c.cli_json(leader, &["cluster", "status"])["commit_index"].as_u64().unwrap();
    assert_eq!(commit1, commit2, "an idle cluster with a down node writes nothing ({commit0} -> {commit1})");
    c.spawn(victim);
    c.wait_ready(victim);
    wait_for("the node to be committed up", || state_of(&c) == "up");
}

#[test]
fn volume_show_watch_refreshes_until_interrupted() {
    let c = Cluster::start(1, 1);
    c.wait_leader(0, None);
    c.cli_json(0, &["volume", "create", "w", "--size", "16M", "--extent-size", "16M"]);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_basalt"));
    cmd.args(["--admin", &c.nodes[0].admin.to_string(), "--json", "volume", "show", "w", "--watch"])
        .stdout(std::process::Stdio::piped());
    // Ctrl-C as a terminal delivers it. A suite started in the background
    // by a non-interactive shell inherits SIGINT ignored, and so would the
    // watch: it then outlived the signal, filled the pipe and hung the test.
    // SAFETY: signal(2) between fork and exec touches only this process.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    // Two refreshes, each one JSON document on a line of its own.
    for _ in 0..2 {
        let line = lines.next().unwrap().unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["name"], "w");
        assert_eq!(v["extents"].as_array().unwrap().len(), 1);
    }
    assert!(child.try_wait().unwrap().is_none(), "still watching");
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "interrupted, not finished: {status}");
}

/// `basalt --json ARGS` against a demo's first node; panics unless it succeeds.
fn demo_cli_json(admin_port: u16, args: &[&str]) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_basalt"))
        .args(["--admin", &format!("127.0.0.1:{admin_port}"), "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "basalt {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The URIs the demo printed under the node it names as the volume's
/// owner: (nbd://..., nbd+unix://...).
fn owner_uris(lines: &[String]) -> (String, String) {
    let at = lines.iter().rposition(|l| l.contains("the volume's owner")).expect("an owner line");
    let uri = |scheme: &str| {
        lines[at + 1..]
            .iter()
            .take_while(|l| l.starts_with("    "))
            .find(|l| l.trim().starts_with(scheme))
            .map(|l| l.trim().to_string())
            .unwrap_or_else(|| panic!("no {scheme} line for the owner in {lines:?}"))
    };
    (uri("nbd://"), uri("nbd+unix://"))
}

/// `basaltd demo` with no node or replica flags: three `basaltd run`
/// processes, a volume of 3 replicas, every node's URIs printed; data
/// written with qemu-io survives a SIGTERM of the demo and a new start.
#[test]
fn demo_defaults_to_three_nodes_and_three_replicas_and_keeps_data_across_restarts() {
    if !common::require("qemu-io") {
        return;
    }
    let mut d = common::Daemon::start_demo_defaults("64M", &["--extent-size=16MiB"]);
    let printed = d.printed();
    let text = printed.join("\n");
    assert!(text.contains("of 3 nodes") && text.contains("3 replicas"), "{text}");
    for k in 0..3u16 {
        let node = d.data.join(format!("node{}", k + 1));
        assert!(text.contains(&format!("nbd://127.0.0.1:{}/demo", d.nbd_port + k)), "node {k}: {text}");
        let sock = node.join("nbd.sock");
        assert!(text.contains(&format!("nbd+unix:///demo?socket={}", sock.display())), "node {k}: {text}");
        assert!(text.contains(&format!("admin 127.0.0.1:{}", d.admin_port + k)), "node {k}: {text}");
        assert!(
            node.join("basaltd.toml").exists() && node.join("state").exists(),
            "node {k} has its own files"
        );
    }
    let admin_port = d.admin_port;
    let basalt = |args: &[&str]| demo_cli_json(admin_port, args);
    let s = basalt(&["cluster", "status"]);
    assert_eq!(s["nodes"].as_array().unwrap().len(), 3, "{s}");
    let v = basalt(&["volume", "show", "demo"]);
    assert_eq!(v["replicas"], 3, "{v}");
    assert_eq!(v["min_replicas"], 2, "{v}");

    let (tcp, unix) = owner_uris(&printed);
    common::run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x6d 0 2M", "-c", "write -P 0x2e 40M 1M", &tcp]);
    common::run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x91 20M 64k", &unix]);
    assert_eq!(d.terminate(), Some(0), "the demo stops its nodes and exits 0");
    for k in 1..=3 {
        assert!(!d.data.join(format!("node{k}/nbd.sock")).exists(), "node {k} removed its socket");
    }

    d.restart();
    let again = d.printed();
    let (tcp2, unix2) = owner_uris(&again);
    assert_eq!((&tcp2, &unix2), (&tcp, &unix), "the same owner serves the volume");
    let v2 = basalt(&["volume", "show", "demo"]);
    assert_eq!(v2["id"], v["id"], "the volume was found, not created again");
    common::run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x6d 0 2M",
            "-c",
            "read -P 0x91 20M 64k",
            "-c",
            "read -P 0x2e 40M 1M",
            "-c",
            "read -P 0 2M 1M",
            &unix2,
        ],
    );
}

/// `basaltd demo --engine=mem` on three nodes: a throwaway cluster comes up
/// and serves. The mem engine never creates the data directories, so a
/// node that took its capacity from them reported 0 bytes, the metadata
/// refused its registration each second, and the demo never got ready.
/// Each node now reports the machine's memory; the volume is written
/// through the owner and read back byte-exact through another node.
#[test]
fn a_demo_on_the_mem_engine_comes_up_and_serves() {
    if !common::require("qemu-io") {
        return;
    }
    let d = common::Daemon::start_demo_defaults("32M", &["--extent-size=8MiB", "--engine=mem"]);
    let nodes = demo_cli_json(d.admin_port, &["node", "list"]);
    let nodes = nodes.as_array().expect("a node list");
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    for n in nodes {
        assert!(n["capacity"].as_u64().unwrap_or(0) > 0, "a node reports a capacity: {n}");
    }
    let (tcp, _) = owner_uris(&d.printed());
    common::run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x3c 1M 3M", &tcp]);
    let other =
        (0..3u16).map(|k| format!("nbd://127.0.0.1:{}/demo", d.nbd_port + k)).find(|u| *u != tcp).unwrap();
    common::run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x3c 1M 3M", "-c", "read -P 0 0 1M", "-c", "read -P 0 4M 1M", &other],
    );
}

/// Commits `command` to the metadata of cluster `c` the way a follower's
/// proposal reaches the leader: a Raft MsgPropose over the peer protocol
/// (raft-rs forwards proposals so), here sent by the test in the name of
/// node `via`. Sent again every 2 s until `done` holds (a repeat of an
/// applied SetExtentReplicas is refused for its epoch, and harmless).
fn commit_through_raft(
    c: &Cluster,
    leader: usize,
    via: usize,
    command: basalt::meta::Command,
    mut done: impl FnMut() -> bool,
) {
    use basalt::meta::state::{Proposal, RequestId, encode_proposal};
    use basalt::types::{ClusterId, NodeId};
    let s = c.cli_json(leader, &["cluster", "status"]);
    let cluster = ClusterId(u128::from_str_radix(s["id"].as_str().unwrap(), 16).unwrap());
    let leader_id = s["this_node"].as_u64().unwrap();
    let via_id = c.cli_json(via, &["cluster", "status"])["this_node"].as_u64().unwrap();
    let mut entry = raft::eraftpb::Entry::default();
    let request = RequestId { origin: NodeId(via_id), seq: u64::MAX };
    entry.set_data(encode_proposal(&Proposal { request, command }).into());
    let mut m = raft::eraftpb::Message::default();
    m.set_msg_type(raft::eraftpb::MessageType::MsgPropose);
    m.to = leader_id;
    m.from = via_id;
    m.set_entries(vec![entry].into());
    let frame = bytes::Bytes::from(basalt::meta::encode_raft_message(&m));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_rt = rt.enter();
    let pool = basalt::net::PeerPool::new(basalt::net::ClientConfig::new(cluster, NodeId(via_id)));
    let deadline = Instant::now() + Duration::from_secs(60);
    let to = c.nodes[leader].peer;
    while Instant::now() < deadline {
        // A one-way message needs a connection up: a Ping makes one.
        if let Err(e) = rt.block_on(pool.request(to, basalt::proto::peer::Message::Ping)) {
            eprintln!("ping {to}: {e}");
        } else if let Err(e) = pool.send(to, basalt::proto::peer::Message::Raft(frame.clone())) {
            eprintln!("send to {to}: {e}");
        }
        for _ in 0..20 {
            if done() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    panic!("the proposal was not applied in 60 s; leader log:\n{}", c.log(leader));
}

/// `basalt volume show` on an R=3 volume of a 3-node cluster: every
/// extent healthy on 3 distinct nodes at the base epoch; after the
/// metadata commits a 2-node set for one extent at epoch + 1, that extent
/// shows degraded with its new set and epoch, and the counts follow, in
/// the text and the JSON output, through every node.
#[test]
fn volume_show_reports_each_extents_replica_set_epoch_and_state() {
    let c = Cluster::start(3, 3);
    let leader = c.wait_leader(0, None);
    let args = ["volume", "create", "r3", "--size", "64M", "--extent-size", "16M", "--replicas", "3"];
    let created = c.cli_json(1, &args);
    let members: Vec<u64> = c.cli_json(0, &["cluster", "status"])["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_u64().unwrap())
        .collect();
    let v = c.cli_json(2, &["volume", "show", "r3"]);
    let extents = v["extents"].as_array().unwrap();
    assert_eq!(extents.len(), 4, "64 MiB of 16 MiB extents: {v}");
    for (i, e) in extents.iter().enumerate() {
        assert_eq!(e["index"], i as u64);
        assert_eq!(e["state"], "healthy", "{v}");
        assert_eq!(e["epoch"], 1, "the base epoch: {v}");
        let mut set: Vec<u64> =
            e["replicas"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        set.sort_unstable();
        set.dedup();
        assert_eq!(set.len(), 3, "3 distinct nodes: {v}");
        assert!(set.iter().all(|n| members.contains(n)), "members of the cluster: {v}");
    }
    assert_eq!(v["health"], serde_json::json!({"state": "healthy", "healthy": 4, "degraded": 0}), "{v}");
    let text = String::from_utf8(c.cli(0, &["volume", "show", "r3"]).stdout).unwrap();
    assert!(
        text.contains("healthy: 4 extents of 16MiB, 4 healthy, 0 degraded (fewer than 3 replicas)"),
        "{text}"
    );
    let row = |e: &Value| {
        let ids: Vec<String> = e["replicas"].as_array().unwrap().iter().map(|x| x.to_string()).collect();
        vec![
            e["index"].to_string(),
            e["epoch"].to_string(),
            e["state"].as_str().unwrap().to_string(),
            ids.join(","),
        ]
    };
    let has_row = |text: &str, want: &[String]| {
        text.lines().any(|l| l.split_whitespace().eq(want.iter().map(String::as_str)))
    };
    for e in extents {
        assert!(has_row(&text, &row(e)), "row {:?} in\n{text}", row(e));
    }

    // Extent 2 loses its last replica: a 2-node set at epoch 2.
    let before = &extents[2];
    let keep: Vec<u64> =
        before["replicas"].as_array().unwrap()[..2].iter().map(|x| x.as_u64().unwrap()).collect();
    let command = basalt::meta::Command::SetExtentReplicas {
        volume: basalt::types::VolumeId(created["id"].as_u64().unwrap()),
        extent: basalt::types::ExtentIndex(2),
        epoch: basalt::types::Epoch(2),
        replicas: keep.iter().map(|&n| basalt::types::NodeId(n)).collect(),
    };
    let shows_degraded = || {
        let o = c.cli(1, &["--json", "volume", "show", "r3"]);
        serde_json::from_slice::<Value>(&o.stdout).is_ok_and(|v| v["extents"][2]["state"] == "degraded")
    };
    commit_through_raft(&c, leader, (leader + 1) % 3, command, shows_degraded);
    for k in 0..3 {
        let v = c.cli_json(k, &["volume", "show", "r3"]);
        let e = &v["extents"][2];
        assert_eq!(e["state"], "degraded", "node {k}: {v}");
        assert_eq!(e["epoch"], 2, "node {k}: {v}");
        assert_eq!(e["replicas"], serde_json::json!(keep), "node {k}: {v}");
        for i in [0, 1, 3] {
            assert_eq!(v["extents"][i], extents[i], "extent {i} unchanged on node {k}");
        }
        assert_eq!(v["health"], serde_json::json!({"state": "degraded", "healthy": 3, "degraded": 1}), "{v}");
    }
    let text = String::from_utf8(c.cli(2, &["volume", "show", "r3"]).stdout).unwrap();
    assert!(
        text.contains("degraded: 4 extents of 16MiB, 3 healthy, 1 degraded (fewer than 3 replicas)"),
        "{text}"
    );
    let ids: Vec<String> = keep.iter().map(u64::to_string).collect();
    let degraded_row = ["2".to_string(), "2".into(), "degraded".into(), ids.join(",")];
    assert!(has_row(&text, &degraded_row), "{degraded_row:?} in\n{text}");
}

/// Placement never chooses a down node for a new volume, and leaves the
/// older volumes' sets alone. Five nodes, two killed and committed down
/// (three voters of five stay): a new R=3 volume has every extent on the
/// three that are up, healthy, and takes writes at once; the older
/// volume's sets are unchanged. An R=4 create is refused with what to do
/// (exit 1), and the default gives R=3 on the three that are up.
#[test]
fn a_new_volume_is_never_placed_on_a_down_node() {
    if !common::require("qemu-io") {
        return;
    }
    let mut c = Cluster::start(5, 5);
    let leader = c.wait_leader(0, None);
    let ids = c.node_ids(leader);
    let sets = |c: &Cluster, name: &str| -> Vec<Vec<u64>> {
        let v = c.cli_json(leader, &["volume", "show", name]);
        v["extents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                assert_eq!(e["state"], "healthy", "{v}");
                e["replicas"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect()
            })
            .collect()
    };
    let old_args = ["volume", "create", "old", "--size", "64M", "--extent-size", "4M", "--replicas", "3"];
    c.cli_json(leader, &old_args);
    let old = sets(&c, "old");
    let victims: Vec<usize> = (0..5).filter(|&k| k != leader).take(2).collect();
    let down: Vec<u64> = victims.iter().map(|&k| ids[k]).collect();
    assert!(
        old.iter().any(|s| s.iter().any(|n| down.contains(n))),
        "the victims hold none of old's 16 extents: {old:?}"
    );
    let state_of = |c: &Cluster, id: u64| {
        let s = c.cli_json(leader, &["cluster", "status"]);
        s["nodes"].as_array().unwrap().iter().find(|n| n["id"].as_u64() == Some(id)).unwrap()["state"].clone()
    };
    for &k in &victims {
        c.kill9(k);
    }
    for &id in &down {
        wait_for("the victims to be committed down", || state_of(&c, id) == "down");
    }

    let new_args = ["volume", "create", "new", "--size", "64M", "--extent-size", "4M", "--replicas", "3"];
    c.cli_json(leader, &new_args);
    let new = sets(&c, "new");
    assert_eq!(new.len(), 16);
    for s in &new {
        assert_eq!(s.len(), 3, "{new:?}");
        assert!(!s.iter().any(|n| down.contains(n)), "a new extent on a down node: {new:?}");
    }
    assert_eq!(sets(&c, "old"), old, "the old volume's sets moved");
    // Written whole through the volume: no replica fails, so no set changes.
    let uri = format!("nbd://{}/new", c.nodes[leader].nbd);
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &uri, "-c", "write -P 0x5a 0 64M", "-c", "flush", "-c", "read -P 0x5a 0 64M"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("fail"),
        "{uri}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sets(&c, "new"), new, "a write took a replica out of a new extent");

    // Four replicas cannot be placed on the three that are up.
    let out = c.cli(leader, &["volume", "create", "r4", "--size", "16M", "--replicas", "4"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("4 replicas need 4 nodes") && err.contains("has 3") && err.contains("--replicas"),
        "{err}"
    );
    let r = c.cli_json(leader, &["volume", "create", "dflt", "--size", "16M", "--extent-size", "4M"]);
    assert_eq!(r["replicas"], 3, "{r}");
    for s in sets(&c, "dflt") {
        assert!(!s.iter().any(|n| down.contains(n)), "dflt on a down node: {s:?}");
    }
}

/// A demo killed with SIGKILL (or by the OOM killer) cannot stop its
/// nodes itself: they get SIGTERM from the kernel and shut down cleanly
/// rather than live on with their ports and data directories (before:
/// they did, reparented to init). The next demo finds the data.
#[test]
fn nodes_of_a_killed_demo_shut_down_cleanly() {
    if !common::require("qemu-io") {
        return;
    }
    let mut d = common::Daemon::start_demo_defaults("16M", &["--extent-size=4MiB"]);
    let s = demo_cli_json(d.admin_port, &["cluster", "status"]);
    let pids: Vec<i32> =
        s["nodes"].as_array().unwrap().iter().map(|n| n["pid"].as_i64().unwrap() as i32).collect();
    assert_eq!(pids.len(), 3, "{s}");
    let (tcp, _) = owner_uris(&d.printed());
    common::run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x3c 0 16M", &tcp]);
    d.kill9();
    // Gone, or a zombie nobody reaps yet: either way no longer running.
    let running = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|st| st.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
    };
    wait_for("every node of the killed demo to exit", || pids.iter().all(|&p| !running(p)));
    for k in 1..=3 {
        let node = d.data.join(format!("node{k}"));
        let log = std::fs::read_to_string(node.join("basaltd.log")).unwrap();
        assert!(log.contains("SIGTERM: draining"), "node {k}: {log}");
        assert!(node.join("state").join("clean-shutdown").exists(), "node {k} did not shut down cleanly");
    }
    d.restart();
    let (tcp, _) = owner_uris(&d.printed());
    common::run_ok("qemu-io", &["-f", "raw", "-c", "read -P 0x3c 0 16M", &tcp]);
}
