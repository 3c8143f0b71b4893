//! A node's data directories, with a real basaltd: recognised by their
//! identity whatever their order on the command line, another node's
//! refused, extents no catalog records refused, the catalog surviving rot
//! in a copy, a first-version directory adopted, new directories durable.

mod common;

use common::{Daemon, nbdsh, require, run_ok, run_to_exit};
use std::path::{Path, PathBuf};
use std::process::Command;

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap()
}

fn ext_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".ext"))
        .collect();
    v.sort();
    v
}

/// Copies the export at `uri` into a file and returns its bytes.
fn read_export(uri: &str, tmp: &Path, name: &str) -> Vec<u8> {
    let out = tmp.join(name);
    let _ = std::fs::remove_file(&out);
    run_ok("nbdcopy", &[uri, out.to_str().unwrap()]);
    std::fs::read(&out).unwrap()
}

/// A basaltd demo command on `dirs` (in that order) that is expected to
/// refuse to start.
fn refused(dirs: &[&Path]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_basaltd"));
    cmd.arg("demo")
        .args(["--nodes=1", "--replicas=1"])
        .args(dirs.iter().map(|d| format!("--data={}", d.display())))
        .arg(format!("--nbd=127.0.0.1:{}", common::free_port()))
        .args(["--iscsi=off", "--size=8M", "--extent-size=1MiB"]);
    run_to_exit(cmd)
}

/// `--data A --data B`, volumes with extents in both directories, then
/// `--data B --data A`: the same volumes with the same bytes, and a new
/// volume gets a fresh id (3), never one of the old ones. (Before: the
/// catalog lived only in the first directory, so the swapped start found
/// none and issued volume id 1 again, over the old volume's extents.)
#[test]
fn data_dirs_are_recognised_whatever_their_order() {
    if !require("nbdcopy") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("b");
    let mut d =
        Daemon::start("8M", &["--volume=one", "--extent-size=1MiB", &format!("--data={}", b.display())]);
    let a = d.data.clone();
    let img_one = common::write_file(tmp.path(), "one.img", &common::pattern(11, 8 << 20));
    run_ok("nbdcopy", &[img_one.to_str().unwrap(), &d.uri()]);
    assert_eq!(d.terminate(), Some(0));
    // Half of volume one's extents move to the other directory.
    for i in 4..8 {
        let name = format!("v1-e{i}.ext");
        let (from, to) = if a.join(&name).exists() { (&a, &b) } else { (&b, &a) };
        std::fs::rename(from.join(&name), to.join(&name)).unwrap();
    }
    d.restart_with(&["--volume=two", "--extent-size=1MiB", &format!("--data={}", b.display())]);
    let port = d.nbd_port;
    let uri = |v: &str| format!("nbd://127.0.0.1:{port}/{v}");
    let img_two = common::write_file(tmp.path(), "two.img", &common::pattern(12, 8 << 20));
    run_ok("nbdcopy", &[img_two.to_str().unwrap(), &uri("two")]);
    assert_eq!(d.terminate(), Some(0));
    assert!(
        !ext_files(&a).is_empty() && !ext_files(&b).is_empty(),
        "{:?} {:?}",
        ext_files(&a),
        ext_files(&b)
    );

    // Swapped: B first.
    d.data = b.clone();
    d.restart_with(&["--volume=three", "--extent-size=1MiB", &format!("--data={}", a.display())]);
    assert_eq!(read_export(&uri("one"), tmp.path(), "one.out"), std::fs::read(&img_one).unwrap());
    assert_eq!(read_export(&uri("two"), tmp.path(), "two.out"), std::fs::read(&img_two).unwrap());
    nbdsh(
        &uri("three"),
        "h.pwrite(b'\\x33' * 4096, 0)\nh.flush()\nassert h.pread(4096, 4096) == bytes(4096)",
    );
    assert_eq!(d.terminate(), Some(0));
    let all: Vec<String> = [ext_files(&a), ext_files(&b)].concat();
    assert!(all.contains(&"v3-e0.ext".to_string()), "volume three has id 3: {all:?}");
    assert_eq!(all.iter().filter(|n| n.starts_with("v1-")).count(), 8, "{all:?}");
    assert_eq!(all.iter().filter(|n| n.starts_with("v2-")).count(), 8, "{all:?}");
    // Both directories carry this node's identity and the same catalog.
    let (ia, ib) = (json(&a.join("basalt-dir.json")), json(&b.join("basalt-dir.json")));
    assert_eq!(ia["node_id"], ib["node_id"]);
    assert_ne!(ia["dir_id"], ib["dir_id"]);
    assert_eq!(ia["cluster_id"], serde_json::Value::Null);
    let cat = json(&a.join("catalog-a.json"));
    for c in [&a, &b].iter().flat_map(|d| [d.join("catalog-a.json"), d.join("catalog-b.json")]) {
        assert_eq!(json(&c), cat, "{}", c.display());
    }
    assert_eq!(cat["node_id"], ia["node_id"]);
    assert_eq!(cat["next_id"], 3);
    assert_eq!(cat["volumes"]["three"]["id"], 3);
}

/// A data directory of another node is refused, naming it; so is one
/// with data but no identity, and one directory given twice.
#[test]
fn foreign_unknown_and_repeated_dirs_are_refused() {
    if !require("nbdsh") {
        return;
    }
    let mut x = Daemon::start("8M", &["--extent-size=1MiB"]);
    nbdsh(&x.uri(), "h.pwrite(b'\\x01' * 4096, 0)\nh.flush()");
    assert_eq!(x.terminate(), Some(0));
    let mut y = Daemon::start("8M", &["--extent-size=1MiB"]);
    nbdsh(&y.uri(), "h.pwrite(b'\\x02' * 4096, 0)\nh.flush()");
    assert_eq!(y.terminate(), Some(0));

    let (code, err) = refused(&[&x.data, &y.data]);
    assert_eq!(code, Some(1), "{err}");
    let node_of = |d: &Path| json(&d.join("basalt-dir.json"))["node_id"].as_u64().unwrap();
    assert!(
        err.contains(&format!("data directory {} belongs to node n{}", y.data.display(), node_of(&y.data)))
            && err.contains(&format!("{} belongs to node n{}", x.data.display(), node_of(&x.data))),
        "{err}"
    );

    // Data without an identity, next to a stamped directory.
    let tmp = tempfile::tempdir().unwrap();
    let bare = tmp.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    std::fs::copy(y.data.join("v1-e0.ext"), bare.join("v1-e0.ext")).unwrap();
    let (code, err) = refused(&[&x.data, &bare]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("data directory {} holds data (v1-e0.ext) but no identity", bare.display())),
        "{err}"
    );

    let (code, err) = refused(&[&x.data, &x.data.join("../data")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("are the same directory"), "{err}");
    // Also when new, under another name: one directory is never stamped twice.
    let fresh = tmp.path().join("fresh");
    let alias = tmp.path().join("alias");
    std::os::unix::fs::symlink(&fresh, &alias).unwrap();
    let (code, err) = refused(&[&fresh, &alias]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("are the same directory"), "{err}");
    // Nothing was stamped or changed by the refusals.
    assert!(!bare.join("basalt-dir.json").exists() && !fresh.join("basalt-dir.json").exists());
    x.restart();
    nbdsh(&x.uri(), "assert h.pread(4096, 0) == b'\\x01' * 4096");
    assert_eq!(x.terminate(), Some(0));
}

/// Rewrites the extent key in both header slots of an extent file (and
/// their crcs), as a replica of another extent would carry.
fn forge_key(path: &Path, volume: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    for slot in 0..2u64 {
        let mut h = vec![0u8; 4096];
        f.read_exact_at(&mut h, slot * 4096).unwrap();
        h[24..32].copy_from_slice(&volume.to_le_bytes());
        h[12..16].fill(0);
        let crc = crc32c::crc32c(&h);
        h[12..16].copy_from_slice(&crc.to_le_bytes());
        f.write_all_at(&h, slot * 4096).unwrap();
    }
    f.sync_all().unwrap();
}

/// An extent whose volume no catalog records (here: volume 7, when the
/// catalog knows volume 1 only) keeps the node from starting, with a
/// message naming it and what to do. (Before: ignored, and a later
/// volume 7 would have served it.)
#[test]
fn orphan_extent_is_refused() {
    if !require("nbdsh") {
        return;
    }
    let mut d = Daemon::start("8M", &["--extent-size=1MiB"]);
    nbdsh(&d.uri(), "h.pwrite(b'\\x07' * 4096, 0)\nh.flush()");
    assert_eq!(d.terminate(), Some(0));
    let orphan = d.data.join("v7-e0.ext");
    std::fs::copy(d.data.join("v1-e0.ext"), &orphan).unwrap();
    forge_key(&orphan, 7);
    let (code, err) = refused(&[&d.data]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("extents of volumes no catalog records: v7/e0 ({})", orphan.display()))
            && err.contains("move their files out"),
        "{err}"
    );
    std::fs::remove_file(&orphan).unwrap();
    d.restart();
    nbdsh(&d.uri(), "assert h.pread(4096, 0) == b'\\x07' * 4096");
    assert_eq!(d.terminate(), Some(0));
}

/// Rot in one catalog copy and in one identity copy: the node starts on
/// the sound copies, serves the same bytes, and rewrites the damaged
/// ones. Every catalog copy damaged: refused, naming them.
#[test]
fn catalog_and_identity_rot_is_survived() {
    if !require("nbdsh") {
        return;
    }
    let mut d = Daemon::start("8M", &["--extent-size=1MiB"]);
    nbdsh(&d.uri(), "h.pwrite(b'\\x0c' * 8192, 4096)\nh.flush()");
    assert_eq!(d.terminate(), Some(0));
    let cat_a = d.data.join("catalog-a.json");
    let cat_b = d.data.join("catalog-b.json");
    let good = std::fs::read(&cat_b).unwrap();
    // A digit of the volume size rots: still valid JSON, wrong value.
    let text = String::from_utf8(good.clone()).unwrap();
    assert!(text.contains("\"size\": 8388608"), "{text}");
    std::fs::write(&cat_a, text.replace("\"size\": 8388608", "\"size\": 8388609")).unwrap();
    let ident = d.data.join("basalt-dir.json");
    let ident_good = std::fs::read(&ident).unwrap();
    std::fs::write(&ident, &ident_good[..ident_good.len() / 2]).unwrap();
    d.restart();
    nbdsh(&d.uri(), "assert h.get_size() == 8 << 20\nassert h.pread(8192, 4096) == b'\\x0c' * 8192");
    assert_eq!(d.terminate(), Some(0));
    let log = d.log_text();
    assert!(log.contains("damaged catalog copy") && log.contains("catalog-a.json"), "{log}");
    assert_eq!(std::fs::read(&ident).unwrap(), ident_good, "identity rewritten from its twin");
    let (a, b) = (json(&cat_a), json(&cat_b));
    assert_eq!(a, b, "catalog copies rewritten alike");
    assert_eq!(a["volumes"]["demo"]["size"], 8u64 << 20);

    // Both identity copies lost: the node keeps its id, from the catalog.
    let node = json(&ident)["node_id"].clone();
    std::fs::write(&ident, b"").unwrap();
    std::fs::write(d.data.join("basalt-dir.json.bak"), b"{}").unwrap();
    d.restart();
    nbdsh(&d.uri(), "assert h.pread(8192, 4096) == b'\\x0c' * 8192");
    assert_eq!(d.terminate(), Some(0));
    assert_eq!(json(&ident)["node_id"], node);
    assert_eq!(json(&d.data.join("basalt-dir.json.bak")), json(&ident));
    let text = String::from_utf8(std::fs::read(&cat_b).unwrap()).unwrap();

    std::fs::write(&cat_a, b"{").unwrap();
    std::fs::write(&cat_b, text.replace("\"next_id\": 1", "\"next_id\": 2")).unwrap();
    let (code, err) = refused(&[&d.data]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("no sound copy of the volume catalog")
            && err.contains(&format!("{}: does not parse", cat_a.display()))
            && err.contains(&format!("{}: crc mismatch", cat_b.display())),
        "{err}"
    );
}

/// A data directory of the first version (no identity, the catalog in
/// `volumes.json`) is stamped and its catalog adopted: same volume, same
/// bytes; `volumes.json` is gone afterwards.
#[test]
fn first_version_dir_is_adopted() {
    if !require("nbdsh") {
        return;
    }
    let mut d = Daemon::start("8M", &["--extent-size=1MiB"]);
    nbdsh(&d.uri(), "h.pwrite(b'\\x0f' * 4096, 1 << 20)\nh.flush()");
    assert_eq!(d.terminate(), Some(0));
    let mut cat = json(&d.data.join("catalog-a.json"));
    let node = json(&d.data.join("basalt-dir.json"))["node_id"].clone();
    let legacy = serde_json::json!({ "next_id": cat["next_id"].take(), "volumes": cat["volumes"].take() });
    for f in ["catalog-a.json", "catalog-b.json", "basalt-dir.json", "basalt-dir.json.bak"] {
        std::fs::remove_file(d.data.join(f)).unwrap();
    }
    // The single-node slice had no state directory (node identity, Raft
    // store) either: its volumes are adopted into the cluster it bootstraps.
    std::fs::remove_dir_all(d.data.join("state")).unwrap();
    std::fs::write(d.data.join("volumes.json"), serde_json::to_vec_pretty(&legacy).unwrap()).unwrap();
    d.restart();
    nbdsh(&d.uri(), "assert h.pread(4096, 1 << 20) == b'\\x0f' * 4096");
    assert_eq!(d.terminate(), Some(0));
    assert!(!d.data.join("volumes.json").exists());
    let now = json(&d.data.join("catalog-b.json"));
    assert_eq!(now["volumes"], legacy["volumes"]);
    assert_eq!(now["next_id"], legacy["next_id"]);
    assert_ne!(json(&d.data.join("basalt-dir.json"))["node_id"], node, "a new identity was drawn");
}

/// A data directory that basaltd creates, parents included, has its
/// directory entry made durable: strace shows an fsync of each created
/// directory's parent. (Before: none.)
#[test]
fn new_data_dir_parents_are_fsynced() {
    if !require("strace") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let top = tmp.path().canonicalize().unwrap();
    let dir: PathBuf = top.join("x").join("y");
    let trace = top.join("trace.txt");
    // An invalid volume name makes basaltd exit right after opening the store.
    let out = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=openat,fsync,mkdir", "-o"])
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_basaltd"))
        .arg("demo")
        .args(["--nodes=1", "--replicas=1"])
        .arg(format!("--data={}", dir.display()))
        .args(["--volume=bad name", "--nbd=127.0.0.1:0", "--iscsi=off"])
        .arg(format!("--peer=127.0.0.1:{}", common::free_port()))
        .arg(format!("--admin=127.0.0.1:{}", common::free_port()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    // fd -> path from openat, then the paths fsync'ed after the mkdirs.
    let text = std::fs::read_to_string(&trace).unwrap();
    let mut fds = std::collections::HashMap::new();
    let mut made = false;
    let mut synced = Vec::new();
    for line in text.lines() {
        if line.contains(&format!("mkdir(\"{}\"", dir.display())) && line.ends_with("= 0") {
            made = true;
        }
        if let (Some(p), Some(fd)) = (line.split('"').nth(1), line.rsplit("= ").next())
            && line.contains("openat(")
        {
            fds.insert(fd.trim().to_string(), p.to_string());
        }
        if made
            && let Some(fd) = line.split("fsync(").nth(1).and_then(|r| r.split(')').next())
            && let Some(p) = fds.get(fd)
        {
            synced.push(p.clone());
        }
    }
    assert!(made, "{text}");
    let parents = [top.display().to_string(), top.join("x").display().to_string()];
    for p in &parents {
        assert!(synced.contains(p), "no fsync of {p} after creating the data dir: {synced:?}");
    }
}

/// A node stopped half way through stamping its directories for the
/// first time (one stamped, the other, holding data, with its identity
/// still under the temporary name) completes the stamping at the next
/// start instead of refusing its own directory.
#[test]
fn half_stamped_node_completes_its_stamping() {
    if !require("nbdsh") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("b");
    let mut d = Daemon::start("8M", &["--extent-size=1MiB", &format!("--data={}", b.display())]);
    nbdsh(&d.uri(), "h.pwrite(b'\\x42' * 4096, 0)\nh.pwrite(b'\\x43' * 4096, 1 << 20)\nh.flush()");
    assert_eq!(d.terminate(), Some(0));
    // Extent 1 lives in b.
    let name = "v1-e1.ext";
    if d.data.join(name).exists() {
        std::fs::rename(d.data.join(name), b.join(name)).unwrap();
    }
    let ident = std::fs::read(b.join("basalt-dir.json")).unwrap();
    std::fs::rename(b.join("basalt-dir.json"), b.join("basalt-dir.json.tmp")).unwrap();
    std::fs::remove_file(b.join("basalt-dir.json.bak")).unwrap();
    d.restart();
    nbdsh(
        &d.uri(),
        "assert h.pread(4096, 0) == b'\\x42' * 4096\nassert h.pread(4096, 1 << 20) == b'\\x43' * 4096",
    );
    assert_eq!(d.terminate(), Some(0));
    assert_eq!(std::fs::read(b.join("basalt-dir.json")).unwrap(), ident);
    assert_eq!(std::fs::read(b.join("basalt-dir.json.bak")).unwrap(), ident);
    assert!(!b.join("basalt-dir.json.tmp").exists());
}

/// The node id the control plane knows is the one new data directories
/// are stamped with; a later start as another node is refused, and one
/// without an id keeps the stamped one. (Real files, psync engine.)
#[tokio::test]
async fn node_id_from_the_control_plane_stamps_new_dirs() {
    use basalt::node::{Node, NodeError};
    use basalt::storage::{EngineKind, StoreConfig, StoreOptions};
    use basalt::types::NodeId;
    let tmp = tempfile::tempdir().unwrap();
    let cfg = || StoreConfig {
        data_dirs: vec![tmp.path().join("a"), tmp.path().join("b")],
        engine: EngineKind::Psync,
    };
    let open = |id: Option<u64>| Node::open_as(cfg(), StoreOptions::default(), 1 << 30, id.map(NodeId));
    let node = open(Some(77)).await.unwrap();
    assert_eq!(node.node_id(), NodeId(77));
    drop(node);
    for d in ["a", "b"] {
        assert_eq!(json(&tmp.path().join(d).join("basalt-dir.json"))["node_id"], 77);
    }
    match open(Some(78)).await {
        Err(e @ NodeError::DirsOfOtherNode { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("belong to node n77, but this node is n78"), "{msg}");
        }
        other => panic!("expected DirsOfOtherNode, got {other:?}"),
    }
    assert_eq!(open(None).await.unwrap().node_id(), NodeId(77));
}

/// A first-version directory whose volume ids cannot carry over (its first
/// volume was deleted, so the one left is id 2 and a new cluster's first id
/// is 1) is refused with what to do, and nothing of it is lost: the start
/// fails the same way again, and the catalog still records the volume.
#[test]
fn first_version_dir_whose_ids_cannot_carry_over_is_refused_and_kept() {
    let mut d = Daemon::start("8M", &["--extent-size=1MiB"]);
    assert_eq!(d.terminate(), Some(0));
    let cat = json(&d.data.join("catalog-a.json"));
    let mut spec = cat["volumes"]["demo"].clone();
    assert_eq!(spec["id"], 1, "{cat}");
    spec["id"] = 2.into();
    let legacy = serde_json::json!({ "next_id": 3, "volumes": { "demo": spec } });
    for f in ["catalog-a.json", "catalog-b.json", "basalt-dir.json", "basalt-dir.json.bak"] {
        std::fs::remove_file(d.data.join(f)).unwrap();
    }
    for f in ext_files(&d.data) {
        std::fs::remove_file(d.data.join(f)).unwrap();
    }
    std::fs::remove_dir_all(d.data.join("state")).unwrap();
    std::fs::write(d.data.join("volumes.json"), serde_json::to_vec_pretty(&legacy).unwrap()).unwrap();
    for attempt in 0..2 {
        let (code, err) = refused(&[&d.data]);
        assert_eq!(code, Some(1), "attempt {attempt}: {err}");
        assert!(
            err.contains(
                "local volume \"demo\" (v2) is not in the cluster's metadata and cannot keep its id"
            ) && err.contains("move its data directory away"),
            "attempt {attempt}: {err}"
        );
        let now = json(&d.data.join("catalog-a.json"));
        assert_eq!(now["volumes"], legacy["volumes"], "attempt {attempt}");
        assert_eq!(now["next_id"], 3, "attempt {attempt}");
    }
}
