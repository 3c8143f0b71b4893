//! `basalt volume verify` on a real cluster: three `basaltd run` processes
//! on 127.0.0.x, R=3. Until the owner fans writes out to the replicas, the
//! test writes into each replica itself with peer requests (the library's
//! `PeerPool`, real TCP to every node's replica service), then checks what
//! verify reports: nothing for identical replicas, the exact block for one
//! that differs, the node for one that is down, with the CLI's exit status.

mod common;

use basalt::net::{ClientConfig, PeerPool};
use basalt::proto::peer::{ExtentTarget, ExtentWrite, Message};
use basalt::types::{ClusterId, Epoch, ExtentIndex, Generation, NodeId, VolumeId};
use bytes::Bytes;
use common::cluster::Cluster;
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;

fn pattern(seed: u64, len: usize) -> Bytes {
    (0..len as u64)
        .map(|i| (seed.wrapping_mul(131).wrapping_add(i * 7) % 251) as u8)
        .collect::<Vec<_>>()
        .into()
}

fn verify(c: &Cluster, k: usize) -> (i32, Value) {
    let out = c.cli(k, &["--json", "volume", "verify", "vv"]);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), v)
}

#[test]
fn verify_reports_matching_replicas_the_block_that_differs_and_a_node_that_is_down() {
    // Liveness slow enough that the node killed below stays "up" (and in
    // its replica sets) while verify runs.
    let mut c = Cluster::configure(3, 3, None);
    for node in &c.nodes {
        let text = std::fs::read_to_string(&node.config).unwrap();
        assert!(text.contains("down_after_ms = 2000"));
        std::fs::write(&node.config, text.replace("down_after_ms = 2000", "down_after_ms = 600000")).unwrap();
    }
    for k in 0..3 {
        c.spawn(k);
    }
    for k in 0..3 {
        c.wait_ready(k);
    }
    let leader = c.wait_leader(0, None);
    c.cli_json(0, &["volume", "create", "vv", "--size", "4MiB", "--extent-size", "1MiB", "--replicas", "3"]);
    let show = c.cli_json(1, &["volume", "show", "vv"]);
    let status = c.cli_json(1, &["cluster", "status"]);
    let peers: HashMap<u64, SocketAddr> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_u64().unwrap(), n["addresses"]["peer"].as_str().unwrap().parse().unwrap()))
        .collect();
    let cluster = ClusterId(u128::from_str_radix(status["id"].as_str().unwrap(), 16).unwrap());
    let volume = VolumeId(show["id"].as_u64().unwrap());
    let generation = Generation(show["owner"]["generation"].as_u64().unwrap());
    let extents = show["extents"].as_array().unwrap().clone();
    assert_eq!(extents.len(), 4, "{show}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let pool = PeerPool::new(ClientConfig::new(cluster, NodeId(0xfeed)));
    let write = |node: u64, extent: u64, epoch: u64, offset: u64, data: Bytes| {
        let target = ExtentTarget { volume, extent: ExtentIndex(extent), epoch: Epoch(epoch), generation };
        let req = Message::ExtentWrite(ExtentWrite { target, offset, fua: true, copy: false, data });
        let reply = rt.block_on(pool.request(peers[&node], req)).unwrap();
        assert_eq!(reply, Message::ExtentOk, "write to node {node}, extent {extent}");
    };
    // The same writes on every replica of every extent but the last
    // (never written anywhere: holes compare equal).
    for e in &extents[..3] {
        let (index, epoch) = (e["index"].as_u64().unwrap(), e["epoch"].as_u64().unwrap());
        let replicas: Vec<u64> =
            e["replicas"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect();
        assert_eq!(replicas.len(), 3, "{show}");
        for &n in &replicas {
            write(n, index, epoch, 0, pattern(index, 64 << 10));
            write(n, index, epoch, 512 << 10, pattern(index + 10, 4096));
        }
    }
    let (code, v) = verify(&c, 2);
    assert_eq!(code, 0, "{v}");
    assert_eq!((v["mismatched"].as_u64(), v["incomplete"].as_u64()), (Some(0), Some(0)), "{v}");
    let listed = v["extents"].as_array().unwrap();
    assert_eq!(listed.len(), 4);
    for (e, shown) in listed.iter().zip(&extents) {
        assert_eq!(e["replicas"], shown["replicas"], "{v}");
        assert_eq!(e["epoch"], shown["epoch"], "{v}");
        assert_eq!(e["mismatched_blocks"], 0, "{v}");
    }

    // One replica of extent 1 gets another 4 KiB at 8192.
    let e1 = &extents[1];
    let odd = e1["replicas"][2].as_u64().unwrap();
    write(odd, 1, e1["epoch"].as_u64().unwrap(), 8192, pattern(99, 4096));
    let (code, v) = verify(&c, 0);
    assert_eq!(code, 1, "{v}");
    assert_eq!((v["mismatched"].as_u64(), v["incomplete"].as_u64()), (Some(1), Some(0)), "{v}");
    let bad = &v["extents"][1];
    assert_eq!(bad["mismatched_blocks"], 1, "{v}");
    assert_eq!(bad["mismatches"], serde_json::json!([{"offset": 8192, "len": 4096}]), "{v}");
    for i in [0, 2, 3] {
        assert_eq!(v["extents"][i]["mismatched_blocks"], 0, "{v}");
    }
    let text = c.cli(0, &["volume", "verify", "vv"]);
    let shown = String::from_utf8_lossy(&text.stdout);
    assert_eq!(text.status.code(), Some(1));
    assert!(shown.contains("1 blocks differ at 8192+4096"), "{shown}");

    // A node down (not the leader, nor the one asked): every extent has a
    // replica there, not compared.
    let down = if leader == 2 { 1 } else { 2 };
    let down_id = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["addresses"]["admin"].as_str().unwrap() == c.nodes[down].admin.to_string())
        .unwrap()["id"]
        .as_u64()
        .unwrap();
    c.kill9(down);
    let (code, v) = verify(&c, 0);
    assert_eq!(code, 2, "{v}");
    for e in v["extents"].as_array().unwrap() {
        let nodes: Vec<u64> =
            e["unreachable"].as_array().unwrap().iter().map(|u| u["node"].as_u64().unwrap()).collect();
        assert_eq!(nodes, vec![down_id], "{v}");
    }
    assert_eq!(v["incomplete"], 4, "{v}");

    // An unknown volume is an error (exit 2), not a verdict.
    let out = c.cli(0, &["volume", "verify", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no volume named"), "{out:?}");
}
