//! The metadata group across a real network partition: three `basaltd run`
//! processes, each in a network namespace of its own, joined by veth pairs
//! to a bridge in a fourth ("switch") namespace. Cutting the leader's veth
//! isolates it; the majority elects a leader and keeps committing; the old
//! leader commits nothing; after the link heals there is one history.
//!
//! All traffic stays inside the test's namespaces; they are deleted when
//! the test ends, also when it fails.

mod common;

use common::cluster::Cluster;
use common::netns::Net;
use serde_json::Value;
use std::time::{Duration, Instant};

fn names(v: &Value) -> Vec<String> {
    let mut n: Vec<String> =
        v.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap().to_string()).collect();
    n.sort();
    n
}

#[test]
fn partitioned_leader_commits_nothing_and_the_majority_carries_on() {
    if !common::require("ip") {
        return;
    }
    let net = Net::new("bsl", 231, 3);
    let ips: Vec<String> = (0..3).map(|k| net.addr(k)).collect();
    let mut c = Cluster::configure(3, 3, Some(ips));
    for k in 0..3 {
        c.nodes[k].wrap = net.wrap(k);
    }
    for k in 0..3 {
        c.spawn(k);
    }
    for k in 0..3 {
        c.wait_ready(k);
    }
    let old = c.wait_leader(0, None);
    c.cli_json(old, &["volume", "create", "before", "--size", "16M", "--extent-size", "16M"]);

    net.link(old, false);
    let a = (old + 1) % 3;
    let new = c.wait_leader(a, Some(old));
    assert_ne!(new, old);
    c.cli_json(a, &["volume", "create", "during", "--size", "16M", "--extent-size", "16M"]);
    // The isolated old leader cannot commit.
    let out = c.cli(old, &["volume", "create", "isolated", "--size", "16M", "--extent-size", "16M"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));

    net.link(old, true);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let views: Vec<Option<Vec<String>>> = (0..3)
            .map(|k| {
                let o = c.cli(k, &["--json", "volume", "list"]);
                o.status.success().then(|| names(&serde_json::from_slice(&o.stdout).unwrap()))
            })
            .collect();
        if views.iter().all(|v| v.as_deref() == Some(&["before".to_string(), "during".to_string()][..])) {
            break;
        }
        assert!(Instant::now() < deadline, "no single history after heal: {views:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let statuses: Vec<Value> = (0..3).map(|k| c.cli_json(k, &["cluster", "status"])).collect();
    assert!(statuses.iter().all(|s| s["leader"] == statuses[0]["leader"]), "one leader: {statuses:?}");
    for k in 0..3 {
        c.kill9(k);
    }
    drop(net);
}
