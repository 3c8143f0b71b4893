//! iSCSI through an owner failure: qemu-io (libiscsi) writes an R=3 volume
//! through a node that forwards to the owner, and the owner is killed with
//! SIGKILL mid-run. The node the initiator is logged in to takes the volume
//! over within its lease; every write of the run completes without an
//! error reaching the initiator, and every one reads back exactly, over
//! iSCSI and NBD, through every node left; `volume verify` is clean.

mod common;

use common::cluster::Cluster;
use common::require;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WRITES: u64 = 192;
const MIB: u64 = 1 << 20;

fn iscsi(c: &Cluster, k: usize, name: &str) -> String {
    format!("iscsi://{}/iqn.2026-11.io.basalt:{name}/0", c.nodes[k].iscsi)
}

/// qemu's iSCSI driver is a module of its own package (qemu-block-extra).
fn qemu_has_iscsi() -> bool {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .any(|d| d.path().join("qemu/block-iscsi.so").exists());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "qemu's iSCSI driver (block-iscsi.so, package qemu-block-extra) is missing (CI=true): run ./scripts/test"
        );
        eprintln!("SKIPPING: qemu has no iSCSI driver (install qemu-block-extra)");
    }
    found
}

/// Write i fills MiB i with byte (i + 1).
fn commands(verb: &str) -> Vec<String> {
    let mut v = Vec::new();
    for i in 0..WRITES {
        v.push("-c".into());
        v.push(format!("{verb} -P {} {} 1M", (i % 255) + 1, i * MIB));
    }
    v
}

fn qemu_io(target: &str, cmds: &[String]) -> Command {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]).args(cmds).arg(target);
    cmd
}

fn check(out: &std::process::Output, what: &str, c: &Cluster) {
    let text = String::from_utf8_lossy(&out.stdout);
    let fails = text.lines().filter(|l| l.contains("failed") || l.contains("error")).count();
    let done = text.lines().filter(|l| l.starts_with("wrote ") || l.starts_with("read ")).count();
    assert!(
        out.status.success() && fails == 0 && done == WRITES as usize,
        "{what}: {} done of {WRITES}, {fails} failed, {}\n{text}\n{}\n{}",
        done,
        out.status,
        String::from_utf8_lossy(&out.stderr),
        (0..c.nodes.len()).map(|k| format!("--- node {k} ---\n{}", c.log(k))).collect::<String>()
    );
}

#[test]
fn iscsi_writes_through_a_forwarding_node_survive_kill9_of_the_owner() {
    if !require("qemu-io") || !qemu_has_iscsi() {
        return;
    }
    let mut c = Cluster::start(3, 3);
    c.wait_leader(0, None);
    let args = ["volume", "create", "isf", "--size", "256M", "--extent-size", "16M", "--replicas", "3"];
    let v = c.cli_json(0, &args);
    let me = c.cli_json(0, &["cluster", "status"])["this_node"].clone();
    assert_eq!(v["owner"]["node"], me, "node 0 owns what it creates: {v}");
    // The initiator logs in to node 1, which forwards to node 0.
    let mut run = qemu_io(&iscsi(&c, 1, "isf"), &commands("write"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Let some writes land, then kill the owner. Node 1 counts a write once
    // the owner has completed it, so the kill comes after 8 MiB of the run
    // were written (a fixed sleep would also pass with none).
    let start = Instant::now();
    let landed = || c.metric(1, "basalt_volume_write_bytes_total", &[("volume", "isf")]);
    while landed() < (8 * MIB) as f64 {
        assert!(
            start.elapsed() < Duration::from_secs(60) && run.try_wait().unwrap().is_none(),
            "8 MiB of writes did not complete through node 1 before the owner was to be killed \
             ({} bytes, run ended: {})",
            landed(),
            run.try_wait().unwrap().is_some()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(run.try_wait().unwrap().is_none(), "the run ended before the owner was killed");
    c.kill9(0);
    let out = run.wait_with_output().unwrap();
    check(&out, "writes through node 1 across the owner's death", &c);
    let took = start.elapsed();
    let v = c.cli_json(1, &["volume", "show", "isf"]);
    assert_ne!(v["owner"]["node"], me, "ownership moved: {v}");
    assert!(v["owner"]["generation"].as_u64().unwrap() >= 2, "{v}");
    for k in [1, 2] {
        check(
            &qemu_io(&iscsi(&c, k, "isf"), &commands("read")).output().unwrap(),
            &format!("iSCSI read via {k}"),
            &c,
        );
        let nbd = format!("nbd://{}/isf", c.nodes[k].nbd);
        check(&qemu_io(&nbd, &commands("read")).output().unwrap(), &format!("NBD read via {k}"), &c);
    }
    // The old owner returns; the volume reads the same through it.
    c.spawn(0);
    c.wait_ready(0);
    let nbd = format!("nbd://{}/isf", c.nodes[0].nbd);
    check(&qemu_io(&nbd, &commands("read")).output().unwrap(), "NBD read via the old owner", &c);
    c.assert_verify_clean(2, "isf");
    eprintln!("the run across the failover took {took:?}");
    assert!(took > Duration::from_secs(1), "no takeover wait in {took:?}: was the owner killed mid-run?");
}
