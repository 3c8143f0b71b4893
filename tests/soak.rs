//! Mixed I/O the way real guests do it: writes of every size from one
//! sector to 64 KiB, 512-byte aligned but rarely 4 KiB aligned, 16 in flight
//! on each of 4 connections. Sub-block writes of neighbouring sectors land in
//! the same 4 KiB block at the same time, which is exactly what the store's
//! read-modify-write and block range lock must serialize. fio verifies every
//! block it wrote (crc32c), then again from a fresh connection after the
//! daemon restarted.

mod common;

use common::{Daemon, require, run, stdout};

fn fio(uri: &str, extra: &[&str]) -> serde_json::Value {
    let uri = format!("--uri={uri}");
    let mut args = vec![
        "--name=mixed",
        "--ioengine=nbd",
        uri.as_str(),
        "--rw=randwrite",
        "--bsrange=512-64k",
        "--blockalign=512",
        "--iodepth=16",
        "--numjobs=4",
        "--size=24M",
        "--offset_increment=32M",
        "--randseed=4242",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    ];
    args.extend_from_slice(extra);
    let out = run("fio", &args);
    let text = stdout(&out);
    assert!(out.status.success(), "fio {extra:?} failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&text[text.find('{').expect("fio JSON")..]).unwrap()
}

#[test]
fn mixed_size_sub_block_writes_verify_before_and_after_restart() {
    if !require("fio") {
        return;
    }
    let mut d = Daemon::start("128M", &[]);
    let j = fio(&d.uri(), &["--do_verify=1"]);
    let jobs = j["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 4);
    for job in jobs {
        assert_eq!(job["error"], 0, "{job}");
        // Every byte of each job's 24 MiB was written, then read back verified.
        assert_eq!(job["write"]["io_bytes"].as_u64().unwrap(), 24 << 20, "{job}");
        assert_eq!(job["read"]["io_bytes"].as_u64().unwrap(), 24 << 20, "{job}");
    }
    assert_eq!(d.terminate(), Some(0));
    d.restart();
    // Same seed and layout: fio regenerates what it wrote and checks it.
    let j = fio(&d.uri(), &["--verify_only"]);
    for job in j["jobs"].as_array().unwrap() {
        assert_eq!(job["error"], 0, "{job}");
        assert_eq!(job["read"]["io_bytes"].as_u64().unwrap(), 24 << 20, "{job}");
    }
    let log = d.log_text();
    assert!(!log.contains("checksum mismatch") && !log.contains("panicked"), "{log}");
    assert_eq!(d.terminate(), Some(0));
}
