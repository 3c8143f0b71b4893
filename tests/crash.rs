//! A real crash: kill -9 basaltd in the middle of a write workload over NBD
//! that flushes now and then; restart it; every write acknowledged before
//! the last completed FLUSH must read back exactly, every later write must
//! read back per 512-byte sector as the old or a newer value, and no block
//! may fail its checksum (invariant 7 of docs/design.md).

mod common;

use common::oracle::{CHECKER, WORKLOAD, oracle};
use common::{Daemon, require};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn kill9_during_writes_keeps_flushed_data_and_checksums() {
    if !require("nbdsh") {
        return;
    }
    let blocks: u64 = 32768; // 128 MiB: two 64 MiB extents
    let mut d = Daemon::start("256M", &[]);
    let dir = tempfile::tempdir().unwrap();
    let script = common::write_file(dir.path(), "workload.py", WORKLOAD.as_bytes());
    let log = dir.path().join("workload.log");
    let mut child = Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(d.uri())
        .arg(&log)
        .arg("7")
        .arg(blocks.to_string())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("workload.err")).unwrap())
        .spawn()
        .unwrap();
    // Let the workload get a few hundred flushes in, then pull the plug.
    let mut flushes = 0;
    for _ in 0..600 {
        std::thread::sleep(Duration::from_millis(50));
        flushes = std::fs::read_to_string(&log).unwrap_or_default().matches("\nF ").count();
        if flushes >= 200 {
            break;
        }
    }
    assert!(
        flushes >= 20,
        "workload made too little progress ({flushes} flushes): {}",
        std::fs::read_to_string(dir.path().join("workload.err")).unwrap_or_default()
    );
    // A workload that stopped (a failed write ends it) would leave the kill
    // to land on an idle server, with nothing in flight to be lost.
    assert!(
        child.try_wait().unwrap().is_none(),
        "the workload stopped before the crash: {}",
        std::fs::read_to_string(dir.path().join("workload.err")).unwrap_or_default()
    );
    d.kill9();
    let _ = child.wait();

    // What the log implies for each block (see `common::oracle`).
    let (want, sent_after) = oracle(&std::fs::read_to_string(&log).unwrap());

    d.restart();
    let want_path =
        common::write_file(dir.path(), "want.json", serde_json::to_string(&want).unwrap().as_bytes());
    let check_path = common::write_file(dir.path(), "check.py", CHECKER.as_bytes());
    let out = common::run_ok(
        "/usr/bin/python3",
        &[check_path.to_str().unwrap(), &d.uri(), want_path.to_str().unwrap()],
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!(
        "crash after {flushes} flushes; {} blocks checked, {} sent after the last flush",
        report["checked"], sent_after
    );
    assert!(report["checked"].as_u64().unwrap() > 100, "{report}");
    assert_eq!(report["nbad"], 0, "blocks read back wrong after kill -9: {report}");

    // Every block of the written range must read without a checksum error.
    let out = common::run("nbdcopy", &[&d.uri(), "null:"]);
    assert!(out.status.success(), "full read after crash failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!d.log_text().contains("checksum mismatch"), "checksum errors after crash:\n{}", d.log_text());
    assert_eq!(d.terminate(), Some(0));
}
