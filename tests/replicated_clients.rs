//! Real clients on R=3 volumes of a real cluster (`basaltd run` processes
//! on 127.0.0.x): qemu-io, nbdcopy over 4 connections and fio verify write
//! through the owner, and every byte reads back through nodes that forward
//! to it; libiscsi's compliance suites through the owner and through a node
//! that forwards; ext4 through nbdfuse and a loop device, before and after
//! every node restarted.

mod common;

use common::attach::Attached;
use common::cluster::Cluster;
use common::compliance::{SCSI_SUITES, SuiteResult, run_suite};
use common::{pattern, require, run, run_ok, scratch, stdout, write_file};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const MIB: usize = 1 << 20;

fn uri(c: &Cluster, k: usize, name: &str) -> String {
    format!("nbd://{}/{name}", c.nodes[k].nbd)
}

/// Node ids by index: `ids[k]` is the id of `c.nodes[k]`.
fn node_ids(c: &Cluster) -> Vec<u64> {
    let s = c.cli_json(0, &["cluster", "status"]);
    let nodes = s["nodes"].as_array().unwrap();
    c.nodes
        .iter()
        .map(|n| {
            nodes
                .iter()
                .find(|j| j["addresses"]["admin"].as_str() == Some(&n.admin.to_string()))
                .unwrap_or_else(|| panic!("node {} not in {s}", n.admin))["id"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// Extent indexes whose files (`v{id}-e{e}.ext`) are under node `k`'s data
/// directory.
fn extents_on_disk(c: &Cluster, k: usize, id: u64) -> BTreeSet<u64> {
    let prefix = format!("v{id}-e");
    c.volume_extent_files(k, id)
        .iter()
        .filter_map(|n| n.strip_prefix(&prefix)?.strip_suffix(".ext")?.parse().ok())
        .collect()
}

fn create(c: &Cluster, name: &str, size: &str) -> Value {
    c.cli_json(
        0,
        &[
            "volume",
            "create",
            name,
            "--size",
            size,
            "--replicas",
            "3",
            "--extent-size",
            "4M",
            "--stripe-unit",
            "64K",
            "--stripe-width",
            "4",
        ],
    )
}

fn node_logs(c: &Cluster) -> String {
    (0..c.nodes.len()).map(|k| format!("--- node {k} log ---\n{}\n", c.log(k))).collect()
}

fn assert_no_panic(c: &Cluster) {
    for k in 0..c.nodes.len() {
        let log = c.log(k);
        assert!(!log.contains("panicked"), "node {k} panicked:\n{log}");
        assert!(!log.contains("checksum mismatch"), "node {k} read a bad block:\n{log}");
    }
}

/// Writes through node A (the owner) with nbdcopy (4 connections), qemu-io
/// and fio verify; reads back through the other nodes (forwarded to the
/// owner) with qemu-img compare; `basalt volume verify` is clean; every
/// written extent's file is on exactly its three replicas' disks.
fn write_through_the_owner_read_through_the_others(n: usize) {
    for t in ["qemu-io", "qemu-img", "nbdcopy", "fio"] {
        if !require(t) {
            return;
        }
    }
    let c = Cluster::start(n, 3);
    c.wait_leader(0, None);
    let ids = node_ids(&c);
    let v = create(&c, "rc", "128M");
    let id = v["id"].as_u64().unwrap();
    assert_eq!(v["owner"]["node"].as_u64(), Some(ids[0]), "node A owns the volume it created: {v}");
    let s = scratch();
    let mut want = vec![0u8; 128 * MIB];

    // nbdcopy, 4 connections: 64 MiB at offset 0.
    let img = pattern(0xC0FFEE + n as u64, 64 * MIB);
    want[..img.len()].copy_from_slice(&img);
    let src = write_file(s.path(), "nbdcopy.img", &img);
    run_ok("nbdcopy", &["--connections=4", "--flush", src.to_str().unwrap(), &uri(&c, 0, "rc")]);

    // qemu-io over it: sector-aligned but not block-aligned writes, across
    // a stripe unit (64 KiB) and across a stripe set (16 MiB: extents 0-3
    // to 4-7), and a zeroed MiB.
    let writes: &[(u8, usize, usize)] =
        &[(0x11, 7 * 512, 129 * 512), (0x22, 128 * 1024 - 4096, 8192), (0x33, 16 * MIB - 1536, 4096 + 512)];
    let mut cmds: Vec<String> = Vec::new();
    for &(p, off, len) in writes {
        cmds.push(format!("write -P {p} {off} {len}"));
        want[off..off + len].fill(p);
    }
    cmds.push(format!("write -z {} {}", 40 * MIB, MIB));
    want[40 * MIB..41 * MIB].fill(0);
    cmds.push("flush".into());
    for &(p, off, len) in writes {
        cmds.push(format!("read -P {p} {off} {len}"));
    }
    let mut args: Vec<&str> = vec!["-f", "raw"];
    for cmd in &cmds {
        args.extend(["-c", cmd]);
    }
    let a = uri(&c, 0, "rc");
    args.push(&a);
    let o = run_ok("qemu-io", &args);
    let text = stdout(&o);
    assert!(!text.contains("fail") && !text.contains("error"), "qemu-io: {text}");

    // fio verify: two jobs of 8 MiB random 4 KiB writes at 64 and 80 MiB
    // (every extent of stripe sets 4 and 5), crc32c verified as it reads.
    let fio_uri = format!("--uri={a}");
    let out = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &fio_uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--numjobs=2",
            "--offset=64M",
            "--size=8M",
            "--offset_increment=16M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ],
    );
    assert!(
        out.status.success(),
        "fio failed: {}\n{}\n{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr),
        node_logs(&c)
    );
    let text = stdout(&out);
    let j: Value = serde_json::from_str(&text[text.find('{').expect("fio JSON")..]).unwrap();
    let jobs = j["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2, "{j}");
    for job in jobs {
        assert_eq!(job["error"], 0, "{job}");
        assert_eq!(job["write"]["io_bytes"].as_u64(), Some(8 << 20), "{job}");
        assert_eq!(job["read"]["io_bytes"].as_u64(), Some(8 << 20), "every block verified: {job}");
    }

    // What fio wrote (verified above through A) joins the expected image:
    // read the whole volume through A once, check everything but fio's
    // ranges, then take those.
    let through_a = s.path().join("a.img");
    run_ok("nbdcopy", &["--connections=4", &a, through_a.to_str().unwrap()]);
    let got = std::fs::read(&through_a).unwrap();
    assert_eq!(got.len(), want.len());
    let fio_ranges = [64 * MIB..72 * MIB, 80 * MIB..88 * MIB];
    for r in &fio_ranges {
        assert!(got[r.clone()].chunks(4096).all(|b| b.iter().any(|x| *x != 0)), "fio wrote {r:?}");
        want[r.clone()].copy_from_slice(&got[r.clone()]);
    }
    if let Some(i) = got.iter().zip(&want).position(|(g, w)| g != w) {
        panic!("read through A differs at byte {i}");
    }
    let want_path = write_file(s.path(), "want.img", &want);
    drop(got);

    // Through B and C (and the last node of five): forwarded to A.
    let mut readers = vec![1, 2, n - 1];
    readers.dedup();
    for k in readers {
        let o = run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", want_path.to_str().unwrap(), &uri(&c, k, "rc")],
        );
        assert!(
            o.status.success(),
            "through node {k}: {}{}\n{}",
            stdout(&o),
            String::from_utf8_lossy(&o.stderr),
            node_logs(&c)
        );
        assert!(stdout(&o).contains("Images are identical"), "{}", stdout(&o));
    }

    // They forwarded: A still owns the volume, in the generation it had.
    let owner = c.cli_json(2, &["volume", "show", "rc"])["owner"].clone();
    assert_eq!(
        (owner["node"].as_u64(), &owner["generation"]),
        (Some(ids[0]), &v["owner"]["generation"]),
        "{owner}"
    );

    c.assert_verify_clean(1, "rc");

    // Extents 0-23 were written (64 KiB units over sets of four 4 MiB
    // extents: 96 MiB touched), 24-31 never. Each written one is on
    // exactly its replica set's three disks.
    let show = c.cli_json(0, &["volume", "show", "rc"]);
    let sets: BTreeMap<u64, BTreeSet<u64>> = show["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let r: BTreeSet<u64> =
                e["replicas"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
            assert_eq!(r.len(), 3, "{show}");
            assert_eq!(e["state"], "healthy", "{show}");
            (e["index"].as_u64().unwrap(), r)
        })
        .collect();
    assert_eq!(sets.len(), 32, "{show}");
    let on_disk: Vec<BTreeSet<u64>> = (0..n).map(|k| extents_on_disk(&c, k, id)).collect();
    let counts: Vec<usize> = on_disk.iter().map(BTreeSet::len).collect();
    eprintln!("extent files per node ({n} nodes): {counts:?}");
    for (e, set) in &sets {
        let holders: BTreeSet<u64> = (0..n).filter(|&k| on_disk[k].contains(e)).map(|k| ids[k]).collect();
        if *e < 24 {
            assert_eq!(&holders, set, "extent {e}: files vs replica set");
        } else {
            assert!(holders.is_empty(), "extent {e} was never written but is on {holders:?}");
        }
    }
    assert_eq!(counts.iter().sum::<usize>(), 3 * 24, "{counts:?}");
    // Evenly. Node ids are random, so placement (rendezvous hashing) is a
    // fair draw: a node is in each extent's set with probability 3/n. Of
    // three nodes each holds all 24; of five, about 14 (binomial 24, 3/5),
    // and fewer than 4 has probability 2e-6 per node.
    for (k, &m) in counts.iter().enumerate() {
        if n == 3 {
            assert_eq!(m, 24, "node {k}: {counts:?}");
        } else {
            assert!(m >= 4, "node {k} holds {m} of 72 extent copies: {counts:?}");
        }
    }
    assert_no_panic(&c);
}

#[test]
fn three_nodes_r3_clients_write_through_the_owner_and_read_through_the_others() {
    write_through_the_owner_read_through_the_others(3);
}

#[test]
fn five_nodes_r3_clients_write_through_the_owner_and_read_through_the_others() {
    write_through_the_owner_read_through_the_others(5);
}

/// Every suite through `k`, with none failing.
fn suites_pass_through(c: &Cluster, k: usize, name: &str) {
    let url = format!("iscsi://{}/iqn.2026-11.io.basalt:{name}/0", c.nodes[k].iscsi);
    let mut results: Vec<SuiteResult> =
        SCSI_SUITES.iter().map(|s| run_suite(&url, &format!("SCSI.{s}"))).collect();
    results.push(run_suite(&url, "iSCSI"));
    let ran: u32 = results.iter().map(|r| r.ran).sum();
    assert_eq!(ran, 141, "the 24 SCSI suites and the iSCSI family have 141 tests in libiscsi 1.19");
    let mut bad = Vec::new();
    for r in &results {
        eprintln!("node {k} {:<24} ran {:>3} failed {:?}", r.suite, r.ran, r.failed);
        if !r.failed.is_empty() {
            bad.push(format!("{}: {:?}", r.suite, r.failed));
        }
    }
    assert!(bad.is_empty(), "through node {k}: {bad:?}\n{}", node_logs(c));
}

/// libiscsi's compliance suites on an R=3 volume, through the owner and
/// through a node that forwards every command to it; the replicas agree
/// afterwards.
#[test]
fn iscsi_compliance_suites_pass_on_r3_through_the_owner_and_a_forwarding_node() {
    if !require("iscsi-test-cu") {
        return;
    }
    let c = Cluster::start(3, 3);
    c.wait_leader(0, None);
    let ids = node_ids(&c);
    let v = create(&c, "cu", "64M");
    assert_eq!(v["owner"]["node"].as_u64(), Some(ids[0]), "{v}");
    let t = std::time::Instant::now();
    suites_pass_through(&c, 0, "cu");
    eprintln!("through the owner: {:?}", t.elapsed());
    let t = std::time::Instant::now();
    suites_pass_through(&c, 1, "cu");
    eprintln!("through node B: {:?}", t.elapsed());
    // Node B forwarded: A still owns the volume, in the generation it had.
    let owner = c.cli_json(2, &["volume", "show", "cu"])["owner"].clone();
    assert_eq!(
        (owner["node"].as_u64(), &owner["generation"]),
        (Some(ids[0]), &v["owner"]["generation"]),
        "{owner}"
    );
    c.assert_verify_clean(2, "cu");
    assert_no_panic(&c);
}

/// Mounts, checks that f0-f2 equal `src` and f3 is gone, unmounts.
fn mount_and_compare(a: &Attached, src: &Path) {
    run_ok("mount", &[a.dev(), a.mnt_str()]);
    for i in 0..3 {
        run_ok("cmp", &[src.to_str().unwrap(), a.mnt.join(format!("f{i}")).to_str().unwrap()]);
    }
    assert!(!a.mnt.join("f3").exists());
    run_ok("umount", &[a.mnt_str()]);
}

/// ext4 on an R=3 volume through nbdfuse and a loop device: mkfs, copy in,
/// fsck clean, remount and compare; then every node stopped (SIGTERM) and
/// started again, and the filesystem checks and compares the same, through
/// the owner and (as an image copied out) through a forwarding node.
#[test]
fn ext4_on_r3_survives_fsck_remount_and_a_restart_of_every_node() {
    if !common::attach::usable(&[
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "fusermount3",
        "fstrim",
        "qemu-img",
        "nbdcopy",
    ]) {
        return;
    }
    let mut c = Cluster::start(3, 3);
    c.wait_leader(0, None);
    let ids = node_ids(&c);
    let v = create(&c, "fs", "128M");
    assert_eq!(v["owner"]["node"].as_u64(), Some(ids[0]), "{v}");
    let dir = scratch();
    let src = write_file(dir.path(), "payload.bin", &pattern(4242, 12 * MIB));
    {
        let a = Attached::new(&uri(&c, 0, "fs"), dir.path());
        run_ok("mkfs.ext4", &["-q", "-F", "-E", "discard", a.dev()]);
        run_ok("mount", &["-o", "discard", a.dev(), a.mnt_str()]);
        for i in 0..4 {
            run_ok("cp", &[src.to_str().unwrap(), a.mnt.join(format!("f{i}")).to_str().unwrap()]);
        }
        // A deleted file: its blocks are discarded (TRIM on every replica).
        std::fs::remove_file(a.mnt.join("f3")).unwrap();
        run_ok("fstrim", &[a.mnt_str()]);
        run_ok("sync", &[]);
        run_ok("umount", &[a.mnt_str()]);
        run_ok("e2fsck", &["-fn", a.dev()]);
        mount_and_compare(&a, &src);
    }
    c.assert_verify_clean(1, "fs");

    c.restart_all();
    c.wait_leader(0, None);
    {
        let a = Attached::new(&uri(&c, 0, "fs"), dir.path());
        run_ok("e2fsck", &["-fn", a.dev()]);
        mount_and_compare(&a, &src);
    }
    // Through node B, the same bytes as through A.
    let img = dir.path().join("b.img");
    run_ok("nbdcopy", &["--connections=4", &uri(&c, 1, "fs"), img.to_str().unwrap()]);
    run_ok("e2fsck", &["-fn", img.to_str().unwrap()]);
    run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", img.to_str().unwrap(), &uri(&c, 0, "fs")]);
    c.assert_verify_clean(2, "fs");
    assert_no_panic(&c);
}

/// Every node stopped (SIGTERM) and started again at once, five times over,
/// with an R=3 volume on them: every node comes back ready each time and
/// the data reads back through every node. (The smallest form of the
/// whole-cluster restart of the ext4 test.)
#[test]
fn every_node_restarted_at_once_comes_back_ready_five_times() {
    if !require("qemu-io") {
        return;
    }
    let mut c = Cluster::start(3, 3);
    c.wait_leader(0, None);
    create(&c, "rs", "64M");
    let write: Vec<String> =
        (0..8).map(|i| format!("write -P {} {} 1M", 30 + i, i << 22)).chain(["flush".to_string()]).collect();
    let read: Vec<String> = (0..8).map(|i| format!("read -P {} {} 1M", 30 + i, i << 22)).collect();
    let qemu_io = |c: &Cluster, k: usize, cmds: &[String]| {
        let mut args: Vec<&str> = vec!["-f", "raw"];
        for cmd in cmds {
            args.extend(["-c", cmd]);
        }
        let u = uri(c, k, "rs");
        args.push(&u);
        let o = run("qemu-io", &args);
        let text = format!("{}{}", stdout(&o), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success() && !text.contains("fail") && !text.contains("error"), "node {k}: {text}");
    };
    qemu_io(&c, 0, &write);
    for round in 0..5 {
        for k in 0..3 {
            assert_eq!(c.terminate(k), Some(0), "round {round}, node {k} on SIGTERM:\n{}", c.log(k));
        }
        for k in 0..3 {
            c.spawn(k);
        }
        for k in 0..3 {
            c.wait_ready(k);
        }
        c.wait_leader(0, None);
        for k in 0..3 {
            qemu_io(&c, k, &read);
        }
    }
    c.assert_verify_clean(1, "rs");
    assert_no_panic(&c);
}
