//! Online resize (`basalt volume resize`): in process against real extent
//! files, against a real `basaltd demo` with nbdinfo, nbdsh, libiscsi and a
//! raw iSCSI initiator that stays logged in across the resize, and through
//! a non-owner node of a 3-node cluster.

mod common;

use basalt::layout::Layout;
use basalt::node::volume::ShrinkBlocked;
use basalt::node::{Node, VolumeError, VolumeOptions};
use basalt::storage::{EngineKind, StoreConfig};
use basalt::types::{VolumeId, flatten_chunks};
use bytes::Bytes;
use common::cluster::Cluster;
use common::iscsi::RawIscsi;
use common::{Daemon, nbdsh, pattern, run_ok, stdout, write_file};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const INI: &str = "iqn.2026-11.io.basalt.test:resize";

/// Extent indexes of volume `v` with a replica file under `dir`.
fn extent_files(dir: &Path, v: u64) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let prefix = format!("v{v}-e");
            if let Some(i) = name.strip_prefix(&prefix).and_then(|r| r.strip_suffix(".ext")) {
                out.insert(i.parse().unwrap());
            }
        }
    }
    out
}

/// The node follows a metadata that gives volume `id` the size `size`.
async fn set_size(node: &Node, id: VolumeId, size: u64) {
    let mut spec = node.catalog_specs().into_iter().find(|s| s.id == id).unwrap();
    spec.size = size;
    let owned = BTreeSet::from([id]);
    node.sync_catalog(&[spec], &owned, VolumeId(id.0 + 1)).await.unwrap();
}

/// Striped volume (64 KiB units over 3 extents of 1 MiB) on real files:
/// a shrink removes the extents wholly past the end and a grow after it
/// reads zeros where the old data was; data below both sizes stays.
#[tokio::test]
async fn resize_in_process_on_real_files() {
    let tmp = common::scratch();
    let data = tmp.path().join("data");
    let node =
        Node::open(StoreConfig { data_dirs: vec![data.clone()], engine: EngineKind::Auto }).await.unwrap();
    let layout = Layout::new(MIB, 64 << 10, 3).unwrap();
    let opts = VolumeOptions { size: 9 * MIB, layout, replicas: 1, min_replicas: 1, read_only: false };
    let vol = node.create_volume("v", opts).unwrap();
    let id = vol.spec().id;
    let pat = Bytes::from(pattern(7, (9 * MIB) as usize));
    vol.write(0, pat.clone(), false).await.unwrap();
    assert_eq!(extent_files(&data, id.0), (0..9).collect());

    // 2.5 MiB: 40 units, all in the first extent set (extents 0..3).
    let small = 5 * MIB / 2;
    let before = vol.resizes();
    set_size(&node, id, small).await;
    assert_eq!((vol.size(), vol.resizes()), (small, before + 1));
    assert_eq!(extent_files(&data, id.0), (0..3).collect());
    let got = flatten_chunks(&vol.read(0, small).await.unwrap());
    assert!(got[..] == pat[..small as usize], "data below the new size changed");
    assert!(matches!(vol.read(small, 4096).await, Err(VolumeError::OutOfRange { .. })));
    assert!(matches!(
        vol.write(small - 4096, Bytes::from(vec![1u8; 8192]), false).await,
        Err(VolumeError::OutOfRange { .. })
    ));
    // The catalog keeps the new size across a restart.
    assert_eq!(node.catalog_specs()[0].size, small);

    // Grow: everything past 2.5 MiB reads zeros, the first 2.5 MiB is the pattern.
    set_size(&node, id, 9 * MIB).await;
    let got = flatten_chunks(&vol.read(0, 9 * MIB).await.unwrap());
    assert!(got[..small as usize] == pat[..small as usize], "data below the old size changed");
    let nonzero = got[small as usize..].iter().position(|&b| b != 0);
    assert_eq!(nonzero.map(|i| i as u64 + small), None, "old data reappeared past the shrunk end");
    vol.write(8 * MIB, Bytes::from(vec![9u8; 4096]), true).await.unwrap();

    // A connected NBD client blocks a shrink; once it leaves, the shrink may start.
    let client = vol.attach_nbd(vol.nbd_size()).unwrap();
    assert_eq!(vol.nbd_clients(), 1);
    assert_eq!(vol.begin_shrink(MIB).unwrap_err(), ShrinkBlocked::NbdClients(1));
    drop(client);
    let hold = vol.begin_shrink(MIB).unwrap();
    // Meanwhile a new NBD client is told the new size, and one told the
    // old size during its handshake is turned away.
    assert_eq!(vol.nbd_size(), MIB);
    assert!(vol.attach_nbd(9 * MIB).is_none());
    assert_eq!(vol.begin_shrink(MIB).unwrap_err(), ShrinkBlocked::Busy);
    drop(hold);
    assert_eq!(vol.nbd_size(), 9 * MIB);
}

fn basalt(d: &Daemon, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_basalt"))
        .arg("--admin")
        .arg(format!("127.0.0.1:{}", d.admin_port))
        .args(args)
        .output()
        .expect("run basalt")
}

fn json_ok(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "basalt failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn nbd_size(uri: &str) -> u64 {
    stdout(&run_ok("nbdinfo", &["--size", uri])).trim().parse().unwrap()
}

/// (key, ASC, ASCQ) of fixed or descriptor sense data.
fn sense_code(s: &[u8]) -> (u8, u8, u8) {
    assert!(s.len() >= 4, "no sense data: {s:02x?}");
    match s[0] & 0x7f {
        0x72 | 0x73 => (s[1] & 0x0f, s[2], s[3]),
        _ => (s[2] & 0x0f, s[12], s[13]),
    }
}

const TUR: [u8; 6] = [0; 6];

fn read_capacity16(i: &mut RawIscsi) -> u64 {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x9e;
    cdb[1] = 0x10;
    cdb[13] = 32;
    let (st, data, sense) = i.run(&cdb, &[], 32);
    assert_eq!(st, 0, "READ CAPACITY(16) sense {sense:02x?}");
    u64::from_be_bytes(data[..8].try_into().unwrap()) + 1
}

fn read_capacity10(i: &mut RawIscsi) -> u64 {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x25;
    let (st, data, sense) = i.run(&cdb, &[], 8);
    assert_eq!(st, 0, "READ CAPACITY(10) sense {sense:02x?}");
    u32::from_be_bytes(data[..4].try_into().unwrap()) as u64 + 1
}

/// The next command (TEST UNIT READY) gets CHECK CONDITION with UNIT
/// ATTENTION 2A/09, the one after it is GOOD.
fn expect_capacity_changed(i: &mut RawIscsi) {
    let (st, _, sense) = i.run(&TUR, &[], 0);
    assert_eq!(st, 2, "CHECK CONDITION expected");
    assert_eq!(sense_code(&sense), (6, 0x2a, 0x09), "sense {sense:02x?}");
    assert_eq!(i.run(&TUR, &[], 0).0, 0, "the UNIT ATTENTION is reported once");
}

fn readcapacity16_total(d: &Daemon) -> String {
    let out = stdout(&run_ok("iscsi-readcapacity16", &["-i", INI, &d.iscsi_url()]));
    out.lines().find(|l| l.starts_with("Total size:")).unwrap_or_default().to_string()
}

#[test]
fn resize_a_served_volume_through_the_cli() {
    for tool in ["nbdinfo", "nbdsh", "iscsi-readcapacity16", "python3"] {
        if !common::require(tool) {
            return;
        }
    }
    let d = Daemon::start("16M", &["--extent-size=1MiB"]);
    let scratch = common::scratch();
    let pat = write_file(scratch.path(), "pat", &pattern(11, (16 * MIB) as usize));
    let pat = pat.display().to_string();
    let uri = d.uri();
    nbdsh(&uri, &format!("h.pwrite(open({pat:?}, 'rb').read(), 0)\nh.flush()"));

    // An initiator logged in before the resize, and another one that asks
    // for REQUEST SENSE first.
    let mut ini = RawIscsi::connect(d.iscsi_port);
    ini.login(Some(&d.iqn()));
    assert_eq!(ini.run(&TUR, &[], 0).0, 0);
    assert_eq!(read_capacity16(&mut ini), 16 * MIB / 512);
    let mut ini2 = RawIscsi::connect(d.iscsi_port);
    ini2.login(Some(&d.iqn()));

    // Grow.
    let v = json_ok(&basalt(&d, &["--json", "volume", "resize", "demo", "24M"]));
    assert_eq!(v["size"].as_u64(), Some(24 * MIB));
    assert_eq!(nbd_size(&uri), 24 * MIB);
    // INQUIRY does not take the UNIT ATTENTION; the next other command does.
    let (st, _, _) = ini.run(&[0x12, 0, 0, 0, 36, 0], &[], 36);
    assert_eq!(st, 0);
    expect_capacity_changed(&mut ini);
    assert_eq!(read_capacity16(&mut ini), 24 * MIB / 512);
    assert_eq!(read_capacity10(&mut ini), 24 * MIB / 512);
    // REQUEST SENSE reports it as its data (and clears it).
    let (st, data, _) = ini2.run(&[0x03, 0, 0, 0, 252, 0], &[], 252);
    assert_eq!(st, 0);
    assert_eq!(sense_code(&data), (6, 0x2a, 0x09), "REQUEST SENSE data {data:02x?}");
    assert_eq!(ini2.run(&TUR, &[], 0).0, 0);
    assert_eq!(readcapacity16_total(&d), format!("Total size:{}", 24 * MIB));
    // Below the old size: the pattern; the new space: zeros.
    let check = |size: u64| {
        format!(
            "p = open({pat:?}, 'rb').read()[:{size}]\nassert h.get_size() >= {size}\n\
             assert h.pread({size}, 0) == p, 'data below {size} changed'\n\
             n = h.get_size() - {size}\nassert n == 0 or h.pread(n, {size}) == bytes(n), 'tail not zero'\n"
        )
    };
    nbdsh(&uri, &check(16 * MIB));
    let mut lba = [0u8; 10];
    lba[0] = 0x28;
    lba[2..6].copy_from_slice(&((20 * MIB / 512) as u32).to_be_bytes());
    lba[8] = 8;
    let (st, data, _) = ini.run(&lba, &[], 4096);
    assert_eq!((st, data), (0, vec![0u8; 4096]), "the grown space reads zeros over iSCSI");

    // Shrink without --allow-shrink: refused, and nothing changes.
    let o = basalt(&d, &["volume", "resize", "demo", "10752K"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--allow-shrink"), "{err}");
    assert_eq!(nbd_size(&uri), 24 * MIB);

    // With it, but an NBD client connected: refused (NBD cannot tell it).
    let mut held = common::nbdsh_cmd()
        .args(["-u", &uri, "-c", "import sys\nprint(h.get_size(), flush=True)\nsys.stdin.read()"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(held.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), (24 * MIB).to_string());
    let o = basalt(&d, &["volume", "resize", "demo", "10752K", "--allow-shrink"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("1 NBD client(s) are connected"), "{err}");
    assert_eq!(nbd_size(&uri), 24 * MIB);
    held.stdin.take().unwrap().write_all(b"").unwrap();
    assert!(held.wait().unwrap().success());

    // Once it is gone (the server notices the disconnect), the shrink goes
    // through: 10.5 MiB, half of extent 10.
    let small = 10752 * 1024;
    let deadline = Instant::now() + Duration::from_secs(30);
    let v = loop {
        let o = basalt(&d, &["--json", "volume", "resize", "demo", "10752K", "--allow-shrink"]);
        if o.status.success() || Instant::now() > deadline {
            break json_ok(&o);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(v["size"].as_u64(), Some(small));
    assert_eq!(nbd_size(&uri), small);
    assert_eq!(extent_files(&d.data, v["id"].as_u64().unwrap()), (0..11).collect());
    nbdsh(&uri, &check(small));
    let past = nbdsh(
        &uri,
        &format!(
            "try:\n    h.pread(4096, {small})\n    print('read')\nexcept nbd.Error as e:\n    print('refused')"
        ),
    );
    assert_eq!(past.trim(), "refused");
    expect_capacity_changed(&mut ini);
    assert_eq!(read_capacity16(&mut ini), small / 512);
    lba[2..6].copy_from_slice(&((small / 512) as u32).to_be_bytes());
    let (st, _, sense) = ini.run(&lba, &[], 4096);
    assert_eq!((st, sense_code(&sense)), (2, (5, 0x21, 0)), "READ past the new end");

    // Grow again: the part of extent 10 past the shrunk end reads zeros,
    // not the old pattern.
    json_ok(&basalt(&d, &["--json", "volume", "resize", "demo", "16M"]));
    nbdsh(&uri, &check(small));
    expect_capacity_changed(&mut ini);
    assert_eq!(readcapacity16_total(&d), format!("Total size:{}", 16 * MIB));
    ini.logout();
}

#[test]
fn resize_through_a_non_owner_node() {
    if !common::require("nbdinfo") || !common::require("nbdsh") {
        return;
    }
    let c = Cluster::start(3, 3);
    let v = c.cli_json(0, &["volume", "create", "r1", "--size", "16M", "--extent-size", "1MiB"]);
    let owner = v["owner"]["node"].as_u64().unwrap();
    let status = c.cli_json(0, &["cluster", "status"]);
    let nodes = status["nodes"].as_array().unwrap();
    let owner_nbd = nodes.iter().find(|n| n["id"].as_u64() == Some(owner)).unwrap()["addresses"]["nbd"]
        .as_str()
        .unwrap()
        .to_string();
    let owner_k = c.nodes.iter().position(|n| n.nbd.to_string() == owner_nbd).unwrap();
    let other = (0..3).find(|&k| k != owner_k).unwrap();
    let uri = format!("nbd://{owner_nbd}/r1");
    let scratch = common::scratch();
    let pat = write_file(scratch.path(), "pat", &pattern(5, MIB as usize)).display().to_string();
    nbdsh(&uri, &format!("h.pwrite(open({pat:?}, 'rb').read(), 15 * 1024 * 1024)\nh.flush()"));

    let v = c.cli_json(other, &["volume", "resize", "r1", "40M"]);
    assert_eq!(v["size"].as_u64(), Some(40 * MIB));
    // The owner applies it as it follows the metadata.
    let deadline = Instant::now() + Duration::from_secs(30);
    while nbd_size(&uri) != 40 * MIB {
        assert!(Instant::now() < deadline, "owner still serves {} bytes", nbd_size(&uri));
        std::thread::sleep(Duration::from_millis(100));
    }
    nbdsh(
        &uri,
        &format!(
            "assert h.pread(1048576, 15 * 1048576) == open({pat:?}, 'rb').read()\n\
             assert h.pread(24 * 1048576, 16 * 1048576) == bytes(24 * 1048576)"
        ),
    );
    let shown = c.cli_json(owner_k, &["volume", "show", "r1"]);
    assert_eq!(shown["extents"].as_array().unwrap().len(), 40);

    // A shrink goes through the owner, which knows its NBD clients.
    let o = c.cli(other, &["volume", "resize", "r1", "8M", "--allow-shrink"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("served by node n{owner}")), "{err}");
    let v = c.cli_json(owner_k, &["volume", "resize", "r1", "8M", "--allow-shrink"]);
    assert_eq!(v["size"].as_u64(), Some(8 * MIB));
    assert_eq!(nbd_size(&uri), 8 * MIB);
}

/// A shrink dropped part way (after it took effect, while its clean-up
/// runs) still finishes the clean-up, and a later grow waits for it: the
/// space past the shrunk end reads zeros, never old data or a checksum
/// error. (A trim cut short by a drop left blocks whose checksums no
/// longer matched their data before the clean-up got a task of its own.)
#[tokio::test]
async fn shrink_dropped_part_way_then_grow_reads_zeros() {
    use futures::FutureExt;
    let tmp = common::scratch();
    let data = tmp.path().join("data");
    let node =
        Node::open(StoreConfig { data_dirs: vec![data.clone()], engine: EngineKind::Auto }).await.unwrap();
    let opts = VolumeOptions {
        size: 4 * MIB,
        layout: Layout::contiguous(MIB).unwrap(),
        replicas: 1,
        min_replicas: 1,
        read_only: false,
    };
    let vol = node.create_volume("v", opts).unwrap();
    let id = vol.spec().id;
    let pat = Bytes::from(pattern(3, (4 * MIB) as usize));
    vol.write(0, pat.clone(), true).await.unwrap();
    let small = MIB + MIB / 2;
    // Polled once, then dropped: the new size is served, but the tail of
    // extent 1 is still being trimmed (its I/O in flight).
    assert!(set_size(&node, id, small).now_or_never().is_none(), "the shrink finished in one poll");
    assert_eq!(vol.size(), small);
    set_size(&node, id, 4 * MIB).await;
    let got = flatten_chunks(&vol.read(0, 4 * MIB).await.unwrap());
    assert!(got[..small as usize] == pat[..small as usize], "data below the shrunk size changed");
    let nonzero = got[small as usize..].iter().position(|&b| b != 0);
    assert_eq!(nonzero.map(|i| i as u64 + small), None, "old data reappeared past the shrunk end");
    assert_eq!(node.catalog_specs()[0].size, 4 * MIB);
}
