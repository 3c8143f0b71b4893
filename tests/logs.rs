//! Logs of a real `basaltd`: `--log-format json` lines parse one by one
//! and carry the fields of their spans (node, connection, volume); the
//! configuration's `log_filter` applies at start and again on SIGHUP.

mod common;

use common::{free_port, require};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn wait_for(what: &str, mut f: impl FnMut() -> bool, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn readyz(port: u16) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

fn terminate(child: &mut Child) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

#[test]
fn json_lines_carry_node_connection_and_volume_fields() {
    if !require("nbdsh") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (nbd, admin) = (free_port(), free_port());
    let log = tmp.path().join("basaltd.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_basaltd"))
        .args(["--log-format", "json", "demo", "--nodes=1", "--replicas=1", "--size=16M", "--volume=vol7"])
        .arg(format!("--iscsi=127.0.0.1:{}", free_port()))
        .arg(format!("--data={}", tmp.path().join("data").display()))
        .arg(format!("--nbd=127.0.0.1:{nbd}"))
        .arg(format!("--admin=127.0.0.1:{admin}"))
        .arg(format!("--peer=127.0.0.1:{}", free_port()))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for("ready", || readyz(admin) == Some(200), &log);
    // A read past the end, sent (libnbd's own check off) and refused.
    common::nbdsh(
        &format!("nbd://127.0.0.1:{nbd}/vol7"),
        "import nbd\nh.set_strict_mode(0)\ntry:\n    h.pread(4096, h.get_size())\n    raise SystemExit('read past the end succeeded')\nexcept nbd.Error as e:\n    assert e.errno == 'EINVAL', e.errno\n",
    );
    terminate(&mut child);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect();
    assert!(lines.len() >= 5, "{text}");
    for l in &lines {
        assert!(l["timestamp"].is_string() && l["level"].is_string() && l["fields"].is_object(), "{l}");
    }
    let refused: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["fields"]["message"] == "request refused").collect();
    assert_eq!(refused.len(), 1, "the refusal is logged once: {text}");
    let line = refused[0];
    let spans = line["spans"].as_array().expect("the span list");
    let span = |name: &str| {
        spans.iter().find(|s| s["name"] == name).unwrap_or_else(|| panic!("no {name} span in {line}"))
    };
    let node = span("node")["node"].as_str().expect("node id");
    assert!(node.strip_prefix('n').is_some_and(|n| n.parse::<u64>().is_ok()), "{line}");
    let conn = span("nbd");
    assert!(conn["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{line}");
    assert_eq!(conn["export"], "vol7", "{line}");
    assert_eq!(span("volume")["volume"], "vol7", "{line}");
    assert_eq!(line["span"]["name"], "volume", "the innermost span: {line}");
    assert_eq!(line["fields"]["errno"], "Inval", "{line}");
    // Every line the node logged after it knew its id carries it.
    let ready = lines.iter().find(|l| l["fields"]["message"] == "ready").expect("a ready line");
    assert_eq!(ready["spans"][0]["node"], node);
}

/// iSCSI: a real initiator (iscsi-inq) and a raw one that writes and reads
/// one block past the end. Every line of a normal session carries its
/// connection and its volume, the lines of its command tasks included; each
/// refusal is logged once.
#[test]
fn iscsi_session_lines_carry_connection_and_volume_fields() {
    if !require("iscsi-inq") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (iscsi, admin) = (free_port(), free_port());
    let log = tmp.path().join("basaltd.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_basaltd"))
        .args(["--log-format", "json", "demo", "--nodes=1", "--replicas=1", "--size=16M", "--volume=vol7"])
        .arg(format!("--iscsi=127.0.0.1:{iscsi}"))
        .arg(format!("--data={}", tmp.path().join("data").display()))
        .arg(format!("--nbd=127.0.0.1:{}", free_port()))
        .arg(format!("--admin=127.0.0.1:{admin}"))
        .arg(format!("--peer=127.0.0.1:{}", free_port()))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for("ready", || readyz(admin) == Some(200), &log);
    let iqn = "iqn.2026-11.io.basalt:vol7";
    common::run_ok(
        "iscsi-inq",
        &["-i", "iqn.2026-11.io.basalt.test:logs", &format!("iscsi://127.0.0.1:{iscsi}/{iqn}/0")],
    );
    let mut raw = common::iscsi::RawIscsi::connect(iscsi);
    raw.login(Some(iqn));
    let past_end = (16u32 << 20) / 512;
    // WRITE(10) is range-checked in its command task, READ(10) in the
    // session's loop: both answer CHECK CONDITION, LBA OUT OF RANGE.
    assert_eq!(raw.write10(past_end, &[1u8; 512]), 2, "WRITE(10) past the end");
    let mut read = [0u8; 10];
    read[0] = 0x28;
    read[2..6].copy_from_slice(&past_end.to_be_bytes());
    read[7..9].copy_from_slice(&1u16.to_be_bytes());
    let (status, _, sense) = raw.run(&read, &[], 512);
    assert_eq!(status, 2, "READ(10) past the end");
    assert_eq!((sense[2] & 0x0f, sense[12], sense[13]), (0x05, 0x21, 0x00), "{sense:02x?}");
    raw.logout();
    terminate(&mut child);

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect();
    let spans_of = |l: &serde_json::Value| l["spans"].as_array().cloned().unwrap_or_default();
    let span = |l: &serde_json::Value, name: &str| spans_of(l).into_iter().find(|s| s["name"] == name);
    // Lines of normal sessions: each names its connection and its volume.
    let normal: Vec<&serde_json::Value> =
        lines.iter().filter(|l| span(l, "session").is_some_and(|s| s["kind"] == "normal")).collect();
    for l in &normal {
        let conn = span(l, "iscsi").unwrap_or_else(|| panic!("no iscsi span: {l}"));
        assert!(conn["conn"].as_u64().is_some_and(|c| c >= 1), "{l}");
        assert!(conn["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{l}");
        assert_eq!(span(l, "volume").map(|s| s["volume"].clone()), Some("vol7".into()), "{l}");
        assert_eq!(l["span"]["name"], "volume", "the innermost span: {l}");
    }
    let conns_of = |msg: &str| -> Vec<u64> {
        normal
            .iter()
            .filter(|l| l["fields"]["message"] == msg)
            .map(|l| span(l, "iscsi").unwrap()["conn"].as_u64().unwrap())
            .collect()
    };
    let sessions = conns_of("session in full feature phase");
    assert_eq!(sessions.len(), 2, "iscsi-inq's session and the raw one: {text}");
    assert_ne!(sessions[0], sessions[1]);
    // Both refusals, once each, on the raw initiator's connection.
    let refused: Vec<&&serde_json::Value> =
        normal.iter().filter(|l| l["fields"]["message"] == "command refused: LBA out of range").collect();
    assert_eq!(refused.len(), 2, "{text}");
    for l in &refused {
        assert_eq!(span(l, "iscsi").unwrap()["conn"].as_u64(), Some(sessions[1]), "{l}");
        assert_eq!(l["fields"]["lba"], u64::from(past_end), "{l}");
        assert_eq!(l["fields"]["capacity"], u64::from(past_end), "{l}");
    }
    // Every refusal line is in a session: none was logged outside the spans.
    let all_refused =
        lines.iter().filter(|l| l["fields"]["message"] == "command refused: LBA out of range").count();
    assert_eq!(all_refused, 2, "{text}");
}

/// A one-node cluster from a configuration file (as `tests/common/cluster.rs`
/// writes them), with `log_filter` set to `filter`.
fn write_config(dir: &Path, filter: &str, peer: u16, nbd: u16, admin: u16) -> PathBuf {
    let path = dir.join("basaltd.toml");
    let text = format!(
        "cluster_name = \"test\"\nstate_dir = \"{d}/state\"\ndata_dirs = [\"{d}/data\"]\nlog_filter = \"{filter}\"\n\
         [listen]\npeer = \"127.0.0.1:{peer}\"\nnbd = \"127.0.0.1:{nbd}\"\niscsi = \"127.0.0.1:{}\"\nadmin = \"127.0.0.1:{admin}\"\n\
         [cluster]\ninitial_members = [\"127.0.0.1:{peer}\"]\nvoters = 1\n",
        free_port(),
        d = dir.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A TCP connection to the NBD port that reads the greeting and closes:
/// the server logs "connection closed" at debug level only.
fn poke(nbd: u16) {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", nbd)).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    drop(s);
}

fn debug_closes(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("DEBUG") && l.contains("connection closed"))
        .count()
}

struct Run {
    child: Child,
    log: PathBuf,
    config: PathBuf,
    nbd: u16,
    _tmp: tempfile::TempDir,
}

impl Run {
    fn start(filter: &str) -> Run {
        let tmp = tempfile::tempdir().unwrap();
        let (peer, nbd, admin) = (free_port(), free_port(), free_port());
        let config = write_config(tmp.path(), filter, peer, nbd, admin);
        let log = tmp.path().join("basaltd.log");
        let child = Command::new(env!("CARGO_BIN_EXE_basaltd"))
            .args(["run", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        wait_for("ready", || readyz(admin) == Some(200), &log);
        Run { child, log, config, nbd, _tmp: tmp }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sighup_applies_a_changed_log_filter() {
    let mut r = Run::start("info");
    poke(r.nbd);
    // Give the server a moment to see the close (a wrong filter would
    // log it within that time; a slow server only makes this pass
    // vacuously, never fail).
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(debug_closes(&r.log), 0, "no debug lines at info");
    let text = std::fs::read_to_string(&r.config).unwrap();
    std::fs::write(
        &r.config,
        text.replace("log_filter = \"info\"", "log_filter = \"info,basalt::export=debug\""),
    )
    .unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(r.child.id() as i32, libc::SIGHUP) };
    let log = r.log.clone();
    wait_for(
        "the reload line",
        || std::fs::read_to_string(&log).unwrap_or_default().contains("SIGHUP: log filter set"),
        &log,
    );
    poke(r.nbd);
    wait_for("a debug line", || debug_closes(&log) >= 1, &log);
    terminate(&mut r.child);
}

/// The configuration's filter holds from the start, not only after a SIGHUP.
#[test]
fn log_filter_of_the_config_applies_at_start() {
    let mut r = Run::start("info,basalt::export=debug");
    poke(r.nbd);
    let log = r.log.clone();
    wait_for("a debug line", || debug_closes(&log) >= 1, &log);
    terminate(&mut r.child);
}
