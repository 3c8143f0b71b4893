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
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

struct Net {
    sw: String,
    nodes: Vec<String>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Net {
    fn new(n: usize) -> Net {
        let tag = std::process::id();
        let net = Net { sw: format!("bsl{tag}sw"), nodes: (0..n).map(|k| format!("bsl{tag}n{k}")).collect() };
        ip(&["netns", "add", &net.sw]);
        ip(&["-n", &net.sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &net.sw, "link", "set", "br0", "up"]);
        for (k, ns) in net.nodes.iter().enumerate() {
            let port = format!("sw{k}");
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &net.sw]);
            ip(&["-n", &net.sw, "link", "set", &port, "master", "br0"]);
            ip(&["-n", &net.sw, "link", "set", &port, "up"]);
            ip(&["-n", ns, "addr", "add", &format!("10.231.0.{}/24", k + 1), "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        net
    }

    fn link(&self, k: usize, up: bool) {
        ip(&["-n", &self.sw, "link", "set", &format!("sw{k}"), if up { "up" } else { "down" }]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain(std::iter::once(&self.sw)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

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
    let net = Net::new(3);
    let ips: Vec<String> = (0..3).map(|k| format!("10.231.0.{}", k + 1)).collect();
    let mut c = Cluster::configure(3, 3, Some(ips));
    for (k, ns) in net.nodes.iter().enumerate() {
        c.nodes[k].wrap = vec!["ip".into(), "netns".into(), "exec".into(), ns.clone()];
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
