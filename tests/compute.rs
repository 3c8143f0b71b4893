//! A compute node: a `basaltd run` with `data_dirs = []` in a cluster of
//! three storage nodes (real processes on 127.0.0.x). It stores nothing,
//! yet owns volumes and serves them over NBD (TCP and its unix socket) and
//! iSCSI, with every replica on the storage nodes; it forwards a volume a
//! storage node owns; and when it dies while owning one, a storage node a
//! client reaches takes the volume over with every flushed write.

mod common;

use basalt::admin::metrics::NodeCollector;
use basalt::layout::Layout;
use basalt::node::volume::Route;
use basalt::node::{Node, VolumeError, VolumeOptions};
use basalt::types::{NodeId, VolumeId};
use common::cluster::Cluster;
use common::{pattern, require, run, run_ok, scratch, stdout, write_file};
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::Arc;

const MIB: usize = 1 << 20;
const INI: &str = "iqn.2026-11.io.basalt.test:compute";
/// The compute node's index; 0-2 store data.
const COMPUTE: usize = 3;
const REQUESTS: &str = "basalt_peer_request_duration_seconds_count";

/// Three storage nodes bootstrap the cluster; the compute node joins it
/// through node 0.
fn start() -> Cluster {
    let mut c = Cluster::configure(4, 3, None);
    for k in 0..3 {
        c.set_membership(k, &[0, 1, 2], None);
    }
    c.set_membership(COMPUTE, &[], Some(0));
    c.make_compute(COMPUTE);
    for k in 0..4 {
        c.spawn(k);
    }
    for k in 0..4 {
        c.wait_ready(k);
    }
    c.wait_leader(0, None);
    c
}

fn uri(c: &Cluster, k: usize, name: &str) -> String {
    format!("nbd://{}/{name}", c.nodes[k].nbd)
}

/// A 64 MiB R=3 volume of 4 MiB extents, 64 KiB stripe units over sets of
/// four, created through node `k`.
fn create(c: &Cluster, k: usize, name: &str) -> Value {
    let args = ["volume", "create", name, "--size", "64M", "--replicas", "3", "--extent-size", "4M"];
    c.cli_json(k, &[&args[..], &["--stripe-unit", "64K", "--stripe-width", "4"]].concat())
}

fn qemu_io(u: &str, cmds: &[String]) -> String {
    let mut args = vec!["-f", "raw"];
    for cmd in cmds {
        args.extend(["-c", cmd.as_str()]);
    }
    args.push(u);
    let o = run_ok("qemu-io", &args);
    let text = stdout(&o);
    assert!(!text.contains("fail") && !text.contains("error"), "qemu-io {u}: {text}");
    text
}

fn node_logs(c: &Cluster) -> String {
    (0..c.nodes.len()).map(|k| format!("--- node {k} log ---\n{}\n", c.log(k))).collect()
}

fn assert_no_panic(c: &Cluster) {
    for k in 0..c.nodes.len() {
        let log = c.log(k);
        assert!(!log.contains("panicked"), "node {k} panicked:\n{log}");
    }
}

/// Requests of `class` ("extent": to a replica; "volume": forwarded to an
/// owner) node `k` sent to `to`'s peer port.
fn sent(c: &Cluster, k: usize, to: usize, class: &str) -> f64 {
    let peer = c.nodes[to].peer.to_string();
    c.metric(k, REQUESTS, &[("peer", &peer), ("class", class)])
}

/// The compute node owns a volume it created: qemu-io (TCP and unix
/// socket) and fio verify write through it, every byte reads back through
/// it and through a storage node (which forwards to it), the extents are
/// on the three storage nodes' disks and none on its own; iSCSI answers
/// INQUIRY and READ CAPACITY(16) through it. Then a volume a storage node
/// owns: the compute node forwards to it and sends no replica requests.
#[test]
fn a_compute_node_owns_and_serves_volumes_and_stores_nothing() {
    for t in ["qemu-io", "nbdcopy", "fio", "iscsi-inq", "iscsi-readcapacity16"] {
        if !require(t) {
            return;
        }
    }
    let c = start();
    let ids = c.node_ids(0);
    let status = c.cli_json(COMPUTE, &["cluster", "status"]);
    let me = status["nodes"].as_array().unwrap().iter().find(|n| n["id"] == ids[COMPUTE]).unwrap().clone();
    assert_eq!((me["capacity"].as_u64(), me["state"].as_str()), (Some(0), Some("up")), "{status}");

    let v = create(&c, COMPUTE, "cv");
    let id = v["id"].as_u64().unwrap();
    assert_eq!(v["owner"]["node"].as_u64(), Some(ids[COMPUTE]), "the compute node owns what it created: {v}");
    let generation = v["owner"]["generation"].clone();
    let mut want = vec![0u8; 64 * MIB];

    // qemu-io over TCP: 16 MiB of pattern, sector-aligned writes across
    // stripe units and stripe sets, a zeroed MiB, a flush.
    let a = uri(&c, COMPUTE, "cv");
    let mut cmds: Vec<String> = (0..16).map(|i| format!("write -P {} {} 1M", 0x40 + i, i * MIB)).collect();
    for i in 0..16 {
        want[i * MIB..(i + 1) * MIB].fill(0x40 + i as u8);
    }
    for &(p, off, len) in &[(0x11u8, 7 * 512, 129 * 512), (0x22, 16 * MIB - 1536, 4096 + 512)] {
        cmds.push(format!("write -P {p} {off} {len}"));
        want[off..off + len].fill(p);
    }
    cmds.push(format!("write -z {} {}", 3 * MIB, MIB));
    want[3 * MIB..4 * MIB].fill(0);
    cmds.push("flush".into());
    qemu_io(&a, &cmds);

    // Over the unix socket: a MiB at 20 MiB.
    let socket = c.nodes[COMPUTE].dir.join("nbd.sock");
    let unix = format!("nbd+unix:///cv?socket={}", socket.display());
    qemu_io(&unix, &[format!("write -P 0x5a {} 1M", 20 * MIB), "flush".into()]);
    want[20 * MIB..21 * MIB].fill(0x5a);

    // fio verify: 8 MiB of random 4 KiB writes at 32 MiB, each block's
    // crc32c checked as fio reads it back.
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
            "--offset=32M",
            "--size=8M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ],
    );
    let text = stdout(&out);
    assert!(out.status.success(), "fio: {text}\n{}\n{}", String::from_utf8_lossy(&out.stderr), node_logs(&c));
    let j: Value = serde_json::from_str(&text[text.find('{').expect("fio JSON")..]).unwrap();
    let job = &j["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job["write"]["io_bytes"].as_u64(), Some(8 << 20), "{job}");
    assert_eq!(job["read"]["io_bytes"].as_u64(), Some(8 << 20), "every block verified: {job}");

    // Read the whole volume through the compute node, then through storage
    // node 0; fio's range (verified above) is taken from the first read.
    let s = scratch();
    let through_compute = s.path().join("compute.img");
    run_ok("nbdcopy", &["--connections=4", &a, through_compute.to_str().unwrap()]);
    let got = std::fs::read(&through_compute).unwrap();
    assert_eq!(got.len(), want.len());
    let fio = 32 * MIB..40 * MIB;
    assert!(got[fio.clone()].chunks(4096).all(|b| b.iter().any(|x| *x != 0)), "fio wrote every block");
    want[fio.clone()].copy_from_slice(&got[fio]);
    if let Some(i) = got.iter().zip(&want).position(|(g, w)| g != w) {
        panic!("read through the compute node differs at byte {i}");
    }
    let through_storage = s.path().join("storage.img");
    run_ok("nbdcopy", &["--connections=4", &uri(&c, 0, "cv"), through_storage.to_str().unwrap()]);
    let got = std::fs::read(&through_storage).unwrap();
    if let Some(i) = got.iter().zip(&want).position(|(g, w)| g != w) {
        panic!("read through storage node 0 differs at byte {i}\n{}", node_logs(&c));
    }
    assert_eq!(got.len(), want.len());

    // Which paths were taken: the compute node sent replica requests to
    // every storage node and forwarded nothing; node 0 forwarded its
    // clients' requests to the compute node.
    for k in 0..3 {
        assert!(sent(&c, COMPUTE, k, "extent") > 0.0, "the compute node wrote node {k}'s replicas");
        assert_eq!(sent(&c, COMPUTE, k, "volume"), 0.0, "the owner forwards nothing to node {k}");
    }
    assert!(sent(&c, 0, COMPUTE, "volume") > 0.0, "node 0 forwarded to the owner");
    let owner = c.cli_json(1, &["volume", "show", "cv"])["owner"].clone();
    assert_eq!((owner["node"].as_u64(), &owner["generation"]), (Some(ids[COMPUTE]), &generation), "{owner}");

    // On disk: 41 MiB touched in 64 KiB units over sets of four 4 MiB
    // extents is extents 0-11 (sets 0-2); every storage node holds all of
    // them (R=3 of three), the compute node none, nor a data directory.
    let written: BTreeSet<String> = (0..12).map(|e| format!("v{id}-e{e}.ext")).collect();
    for k in 0..3 {
        let mine: BTreeSet<String> = c.volume_extent_files(k, id).into_iter().collect();
        assert_eq!(mine, written, "node {k}");
    }
    assert_eq!(c.extent_files(COMPUTE), BTreeSet::new(), "the compute node stores nothing");
    assert!(!c.nodes[COMPUTE].dir.join("data").exists(), "and has no data directory");
    let out = c.cli(COMPUTE, &["--json", "volume", "verify", "cv"]);
    let verify: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{verify}");
    assert_eq!(
        (verify["mismatched"].as_u64(), verify["incomplete"].as_u64()),
        (Some(0), Some(0)),
        "{verify}"
    );

    // Its store metrics are zeros; its client metrics count as anywhere.
    assert_eq!(c.metric(COMPUTE, "basalt_store_capacity_bytes", &[]), 0.0);
    assert_eq!(c.metric(COMPUTE, "basalt_store_used_bytes", &[]), 0.0);
    assert!(c.metric(COMPUTE, "basalt_volume_write_bytes_total", &[("volume", "cv")]) >= (25 << 20) as f64);

    // iSCSI through the compute node.
    let url = format!("iscsi://{}/iqn.2026-11.io.basalt:cv/0", c.nodes[COMPUTE].iscsi);
    let out = stdout(&run_ok("iscsi-inq", &["-i", INI, &url]));
    for line in ["Peripheral Device Type:DIRECT_ACCESS", "Vendor:BASALT  ", "Product:VOLUME          "] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    let out = stdout(&run_ok("iscsi-readcapacity16", &["-i", INI, &url]));
    assert!(out.contains(&format!("RETURNED LOGICAL BLOCK ADDRESS:{}\n", 64 * 2048 - 1)), "{out}");
    assert!(out.contains(&format!("Total size:{}\n", 64u64 << 20)), "{out}");

    // A volume storage node 0 owns: the compute node forwards to it.
    let sv = create(&c, 0, "sv");
    assert_eq!(sv["owner"]["node"].as_u64(), Some(ids[0]), "{sv}");
    let extent_before: Vec<f64> = (0..3).map(|k| sent(&c, COMPUTE, k, "extent")).collect();
    let forwarded_before = sent(&c, COMPUTE, 0, "volume");
    let b = uri(&c, COMPUTE, "sv");
    let cmds: Vec<String> = (0..4).map(|i| format!("write -P {} {} 1M", 0x60 + i, i * MIB)).collect();
    qemu_io(&b, &[cmds, vec!["flush".into()]].concat());
    let reads: Vec<String> = (0..4).map(|i| format!("read -P {} {} 1M", 0x60 + i, i * MIB)).collect();
    qemu_io(&b, &reads);
    qemu_io(&uri(&c, 1, "sv"), &reads);
    // 4 writes and 4 reads of 1 MiB, a flush: at least 9 forwarded requests.
    assert!(sent(&c, COMPUTE, 0, "volume") >= forwarded_before + 9.0, "the compute node forwarded to node 0");
    let extent_after: Vec<f64> = (0..3).map(|k| sent(&c, COMPUTE, k, "extent")).collect();
    assert_eq!(extent_after, extent_before, "forwarding sends no replica requests from the compute node");
    let owner = c.cli_json(COMPUTE, &["volume", "show", "sv"])["owner"].clone();
    assert_eq!((owner["node"].as_u64(), &owner["generation"]), (Some(ids[0]), &sv["owner"]["generation"]));
    assert_eq!(c.extent_files(COMPUTE), BTreeSet::new(), "still nothing on the compute node");
    assert_no_panic(&c);
}

/// kill -9 of the compute node while it owns a volume: a storage node a
/// client reaches takes ownership (generation + 1), every flushed write
/// reads back through it, and it takes new writes.
#[test]
fn kill9_of_a_compute_owner_moves_the_volume_to_a_storage_node() {
    if !require("qemu-io") || !require("qemu-img") {
        return;
    }
    let mut c = start();
    let ids = c.node_ids(0);
    let v = create(&c, COMPUTE, "k");
    assert_eq!(v["owner"]["node"].as_u64(), Some(ids[COMPUTE]), "{v}");
    let before = v["owner"]["generation"].as_u64().unwrap();
    let s = scratch();
    let img = pattern(0xC0, 24 * MIB);
    let src = write_file(s.path(), "src.img", &img);
    // qemu-img convert flushes before it exits.
    let out = run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src.to_str().unwrap(), &uri(&c, COMPUTE, "k")],
    );
    assert!(
        out.status.success(),
        "qemu-img convert: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node_logs(&c)
    );
    let cmds: Vec<String> =
        (24..32).map(|i| format!("write -P {} {} 1M", 0x80 + i, i * MIB)).chain(["flush".into()]).collect();
    qemu_io(&uri(&c, COMPUTE, "k"), &cmds);
    c.kill9(COMPUTE);

    let back = s.path().join("back.img");
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri(&c, 1, "k"), back.to_str().unwrap()]);
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), 64 * MIB);
    if let Some(i) = got[..img.len()].iter().zip(&img).position(|(g, w)| g != w) {
        panic!("byte {i} of the image differs after the takeover\n{}", node_logs(&c));
    }
    for i in 24..32 {
        assert!(
            got[i * MIB..(i + 1) * MIB].iter().all(|b| *b == 0x80 + i as u8),
            "MiB {i} after the takeover"
        );
    }
    assert!(got[32 * MIB..].iter().all(|b| *b == 0), "never written: zeros");
    let v = c.cli_json(1, &["volume", "show", "k"]);
    assert_eq!(v["owner"]["node"].as_u64(), Some(ids[1]), "the node the client reached owns it: {v}");
    assert_eq!(v["owner"]["generation"].as_u64(), Some(before + 1), "{v}");
    let text = qemu_io(&uri(&c, 2, "k"), &["write -P 0x99 0 64k".into(), "read -P 0x99 0 64k".into()]);
    assert!(text.contains("wrote 65536/65536"), "{text}");
    assert!(c.log(1).contains("took over a volume whose owner is down"), "{}", c.log(1));
    assert_eq!(c.extent_files(COMPUTE), BTreeSet::new());
    assert_no_panic(&c);
}

/// The library's compute node: no store, so no local route. A volume
/// routed `Local` anyway (a router bug) fails its requests as unavailable
/// after the route wait, never panics; flush, close, deleting a volume and
/// the store gauges (zeros) all work without a store.
#[tokio::test]
async fn a_node_without_a_store_has_no_local_route() {
    let node = Node::open_compute(NodeId(7), 1 << 20);
    assert!(node.store().is_none());
    assert_eq!(node.node_id(), NodeId(7));
    let opts = VolumeOptions {
        size: 8 << 20,
        layout: Layout::new(4 << 20, 4 << 20, 1).unwrap(),
        replicas: 3,
        min_replicas: 2,
        read_only: false,
    };
    let v = node.create_volume("c", opts).unwrap();
    node.set_router(Arc::new(|_| Route::Local));
    let (read, write, flush) =
        tokio::join!(v.read(0, 4096), v.write(0, bytes::Bytes::from(vec![1u8; 4096]), false), v.flush());
    for (what, e) in [("read", read.err()), ("write", write.err()), ("flush", flush.err())] {
        match e {
            Some(VolumeError::Unavailable(why)) => assert!(why.contains("stores no data"), "{what}: {why}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    node.flush_all().await.unwrap();
    node.metrics().register_collector(Box::new(NodeCollector(node.clone())));
    let text = node.metrics().encode();
    for gauge in ["basalt_store_capacity_bytes 0", "basalt_store_used_bytes 0", "basalt_store_free_bytes 0"] {
        assert!(text.lines().any(|l| l == gauge), "{gauge} in:\n{text}");
    }
    let gone = node.sync_catalog(&[], &BTreeSet::new(), VolumeId(2)).await.unwrap();
    assert_eq!(gone, vec!["c".to_string()]);
    assert!(node.volume("c").is_none() && node.catalog_specs().is_empty());
    node.close().await.unwrap();
}

/// The data-moving libiscsi suites through a compute node that owns the
/// volume: every read, write, WRITE SAME, UNMAP and COMPARE AND WRITE goes
/// from the compute node to the three storage nodes.
#[test]
fn iscsi_data_suites_pass_through_a_compute_owner() {
    if !require("iscsi-test-cu") {
        return;
    }
    let c = start();
    let v = create(&c, COMPUTE, "cu");
    let ids = c.node_ids(0);
    assert_eq!(v["owner"]["node"].as_u64(), Some(ids[COMPUTE]), "{v}");
    let url = format!("iscsi://{}/iqn.2026-11.io.basalt:cu/0", c.nodes[COMPUTE].iscsi);
    let suites = ["Read10", "Read16", "Write10", "Write16", "WriteSame16", "Unmap", "CompareAndWrite"];
    let mut bad = Vec::new();
    let mut ran = 0;
    for s in suites {
        let r = common::compliance::run_suite(&url, &format!("SCSI.{s}"));
        eprintln!("{:<24} ran {:>3} failed {:?}", r.suite, r.ran, r.failed);
        ran += r.ran;
        if !r.failed.is_empty() {
            bad.push(format!("{}: {:?}", r.suite, r.failed));
        }
    }
    assert_eq!(ran, 40, "these seven suites have 40 tests in libiscsi 1.19");
    assert!(bad.is_empty(), "through the compute node: {bad:?}\n{}", node_logs(&c));
    // The data went to the storage nodes, none to the compute node.
    assert_eq!(c.extent_files(COMPUTE), BTreeSet::new());
    let stored: usize = (0..3).map(|k| c.volume_extent_files(k, v["id"].as_u64().unwrap()).len()).sum();
    assert!(stored >= 3, "the suites' writes are on the storage nodes ({stored} extent files)");
    let out = c.cli(COMPUTE, &["--json", "volume", "verify", "cu"]);
    let verify: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{verify}");
    assert_eq!(
        (verify["mismatched"].as_u64(), verify["incomplete"].as_u64()),
        (Some(0), Some(0)),
        "{verify}"
    );
    assert_no_panic(&c);
}
