//! A mounted filesystem through an owner failure: ext4 on an R=3 volume,
//! attached (nbdfuse + loop) through a node that forwards to the owner,
//! while files are written; the owner is killed with SIGKILL mid-write.
//! The node the client reaches takes the volume over, the writes finish
//! without an error reaching the filesystem, fsck is clean and every file
//! reads back exactly, before and after the old owner comes back.

mod common;

use common::attach::Attached;
use common::cluster::Cluster;
use common::{pattern, run_ok, scratch, write_file};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

fn uri(c: &Cluster, k: usize, name: &str) -> String {
    format!("nbd://{}/{name}", c.nodes[k].nbd)
}

fn node_logs(c: &Cluster) -> String {
    (0..c.nodes.len()).map(|k| format!("--- node {k} log ---\n{}\n", c.log(k))).collect()
}

/// Mounts, compares `f0..n` with `src`, unmounts.
fn mount_and_compare(a: &Attached, src: &Path, n: usize) {
    run_ok("mount", &[a.dev(), a.mnt_str()]);
    for i in 0..n {
        run_ok("cmp", &[src.to_str().unwrap(), a.mnt.join(format!("f{i}")).to_str().unwrap()]);
    }
    run_ok("umount", &[a.mnt_str()]);
}

#[test]
fn ext4_through_a_forwarding_node_survives_kill9_of_the_owner_mid_write() {
    if !common::attach::usable(&["nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "fusermount3", "dd"]) {
        return;
    }
    let mut c = Cluster::start(3, 3);
    c.wait_leader(0, None);
    let v = c.cli_json(
        0,
        &[
            "volume",
            "create",
            "fs",
            "--size",
            "256M",
            "--replicas",
            "3",
            "--min-replicas",
            "2",
            "--extent-size",
            "16M",
        ],
    );
    let owner = v["owner"]["node"].as_u64().unwrap();
    let generation = v["owner"]["generation"].as_u64().unwrap();
    assert_eq!(Some(owner), c.cli_json(0, &["cluster", "status"])["this_node"].as_u64(), "{v}");
    let b_id = c.cli_json(1, &["cluster", "status"])["this_node"].as_u64().unwrap();

    let dir = scratch();
    let src = write_file(dir.path(), "payload.bin", &pattern(977, 24 * MIB));
    {
        let a = Attached::new(&uri(&c, 1, "fs"), dir.path());
        run_ok("mkfs.ext4", &["-q", "-F", a.dev()]);
        run_ok("mount", &[a.dev(), a.mnt_str()]);
        run_ok("cp", &[src.to_str().unwrap(), a.mnt.join("f0").to_str().unwrap()]);
        run_ok("sync", &[]);

        // f1 written with O_DIRECT, so its blocks reach the volume while
        // dd runs; the owner dies a few MiB in.
        let f1 = a.mnt.join("f1");
        let dd = Command::new("dd")
            .arg(format!("if={}", src.display()))
            .arg(format!("of={}", f1.display()))
            .args(["bs=256k", "oflag=direct", "conv=fsync", "status=none"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::fs::metadata(&f1).map(|m| m.len()).unwrap_or(0) < 4 * MIB as u64 {
            assert!(Instant::now() < deadline, "dd made no progress:\n{}", node_logs(&c));
            std::thread::sleep(Duration::from_millis(20));
        }
        c.kill9(0);
        let out = dd.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "dd through the failover: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            node_logs(&c)
        );
        // Buffered writes and a delete after the takeover.
        for i in 2..4 {
            run_ok("cp", &[src.to_str().unwrap(), a.mnt.join(format!("f{i}")).to_str().unwrap()]);
        }
        run_ok("sync", &[]);
        run_ok("umount", &[a.mnt_str()]);
        run_ok("e2fsck", &["-fn", a.dev()]);
        mount_and_compare(&a, &src, 4);
    }
    let v = c.cli_json(1, &["volume", "show", "fs"]);
    assert_eq!(v["owner"]["node"].as_u64(), Some(b_id), "the node the client reached owns it: {v}");
    assert_eq!(v["owner"]["generation"].as_u64(), Some(generation + 1), "{v}");
    // The extents written after the kill left the old owner's node (epoch
    // + 1, degraded); the others still name it, and with it down verify
    // compares the rest and says what it could not reach.
    let written_after: Vec<u64> = v["extents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["epoch"].as_u64() == Some(2))
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert!(!written_after.is_empty(), "no extent changed its set after the kill: {v}");
    for e in v["extents"].as_array().unwrap() {
        let named: Vec<u64> = e["replicas"].as_array().unwrap().iter().map(|r| r.as_u64().unwrap()).collect();
        assert_eq!(named.contains(&owner), e["epoch"].as_u64() == Some(1), "{e}");
        assert_eq!(e["state"].as_str(), Some(if named.len() == 2 { "degraded" } else { "healthy" }), "{e}");
    }
    let out = c.cli(1, &["--json", "volume", "verify", "fs"]);
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(2), "some replicas unreachable: {r}");
    assert_eq!(r["mismatched"].as_u64(), Some(0), "{r}");
    for e in r["extents"].as_array().unwrap() {
        let unreachable: Vec<u64> =
            e["unreachable"].as_array().unwrap().iter().map(|u| u["node"].as_u64().unwrap()).collect();
        let expect = if written_after.contains(&e["index"].as_u64().unwrap()) { vec![] } else { vec![owner] };
        assert_eq!(unreachable, expect, "{e}");
    }

    // The old owner back: it serves through the new owner, its stale
    // copies are not read, and the filesystem is the same through it.
    c.spawn(0);
    c.wait_ready(0);
    {
        let d2 = scratch();
        let a = Attached::new(&uri(&c, 0, "fs"), d2.path());
        run_ok("e2fsck", &["-fn", a.dev()]);
        mount_and_compare(&a, &src, 4);
    }
    c.assert_verify_clean(2, "fs");
    for k in 0..3 {
        let log = c.log(k);
        assert!(!log.contains("panicked"), "node {k} panicked:\n{log}");
        assert!(!log.contains("checksum mismatch"), "node {k} read a bad block:\n{log}");
    }
}
