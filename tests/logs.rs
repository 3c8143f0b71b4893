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
    let out_of_range =
        |l: &serde_json::Value| l["fields"]["message"] == "command refused" && l["fields"]["asc"] == "0x21";
    let refused: Vec<&&serde_json::Value> = normal.iter().filter(|l| out_of_range(l)).collect();
    assert_eq!(refused.len(), 2, "{text}");
    for (l, opcode) in refused.iter().zip(["0x2a", "0x28"]) {
        assert_eq!(span(l, "iscsi").unwrap()["conn"].as_u64(), Some(sessions[1]), "{l}");
        assert_eq!(l["fields"]["lba"], u64::from(past_end), "{l}");
        assert_eq!(l["fields"]["capacity"], u64::from(past_end), "{l}");
        assert_eq!(l["fields"]["opcode"], opcode, "{l}");
    }
    // Every refusal line is in a session: none was logged outside the spans.
    let all_refused = lines.iter().filter(|l| out_of_range(l)).count();
    assert_eq!(all_refused, 2, "{text}");
}

/// The JSON lines of a log, each parsed.
fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect()
}

/// The span called `name` of a line, if it is in one.
fn span_of(l: &serde_json::Value, name: &str) -> Option<serde_json::Value> {
    l["spans"].as_array()?.iter().find(|s| s["name"] == name).cloned()
}

fn msg(l: &serde_json::Value) -> &str {
    l["fields"]["message"].as_str().unwrap_or("")
}

/// A one-node demo with JSON logs (at info unless $RUST_LOG says
/// otherwise), volume `vol7` of 16 MiB.
fn json_daemon() -> common::Daemon {
    common::Daemon::start("16M", &["--log-format=json", "--volume=vol7"])
}

const VOL7: &str = "iqn.2026-11.io.basalt:vol7";

/// Every client-visible iSCSI error a raw initiator provokes (CHECK
/// CONDITION from the session's loop and from a command's task, a Reject,
/// a refused task management function, a failed login) is one log line,
/// with the sense the initiator got, the opcode, and the connection and
/// volume of its spans.
#[test]
fn every_iscsi_error_is_logged_once_with_its_sense_and_opcode() {
    use basalt::proto::iscsi::pdu::{Opcode, Pdu};
    let mut d = json_daemon();
    let mut raw = common::iscsi::RawIscsi::connect(d.iscsi_port);
    raw.login(Some(VOL7));
    let sense_of = |s: &[u8]| (s[2] & 0x0f, s[12], s[13]);
    // An opcode we do not have: INVALID COMMAND OPERATION CODE.
    let mut cdb = [0u8; 16];
    cdb[0] = 0xc0;
    let (st, _, sense) = raw.run(&cdb, &[], 0);
    assert_eq!((st, sense_of(&sense)), (2, (0x05, 0x20, 0x00)));
    // INQUIRY of a VPD page without EVPD: INVALID FIELD IN CDB.
    let (st, _, sense) = raw.run(&[0x12, 0, 0x80, 0, 255, 0], &[], 255);
    assert_eq!((st, sense_of(&sense)), (2, (0x05, 0x24, 0x00)));
    // TEST UNIT READY to LUN 1: LOGICAL UNIT NOT SUPPORTED.
    let mut tur = raw.command(&[0u8; 6], 0, false, false);
    tur.set_lun(1 << 48);
    raw.send(&tur);
    let r = raw.recv().expect("TEST UNIT READY response");
    assert_eq!((r.bhs[3], sense_of(&r.data[2..])), (2, (0x05, 0x25, 0x00)));
    // COMPARE AND WRITE of data that is not there: MISCOMPARE, from the command's task.
    let mut caw = [0u8; 16];
    caw[0] = 0x89;
    caw[2..10].copy_from_slice(&8u64.to_be_bytes());
    caw[13] = 1;
    let mut data = vec![0x55u8; 512];
    data.extend_from_slice(&[0xaa; 512]);
    let (st, _, sense) = raw.run(&caw, &data, 0);
    assert_eq!((st, sense_of(&sense)), (2, (0x0e, 0x1d, 0x00)));
    // A SNACK (error recovery level 1, which we do not offer): Reject.
    let mut snack = Pdu::new(Opcode::Snack);
    snack.set_itt(0x5151);
    snack.set_u32(28, raw.exp_stat_sn);
    raw.send(&snack);
    let r = raw.recv().expect("Reject");
    assert_eq!((r.raw_opcode(), r.bhs[2]), (Opcode::Reject as u8, 0x04), "Reject, protocol error");
    // CLEAR ACA: task management function not supported (5).
    let mut tmf = Pdu::new(Opcode::TaskMgmtRequest);
    tmf.bhs[0] |= 0x40;
    tmf.bhs[1] = 0x80 | 3;
    tmf.set_itt(raw.itt());
    tmf.set_u32(20, 0xffff_ffff);
    tmf.set_u32(24, raw.cmd_sn);
    tmf.set_u32(28, raw.exp_stat_sn);
    raw.send(&tmf);
    let r = raw.recv().expect("task management response");
    assert_eq!((r.raw_opcode(), r.bhs[2]), (Opcode::TaskMgmtResponse as u8, 5));
    raw.logout();
    // A login to a target that does not exist: status 0x0203, then closed.
    let mut bad = common::iscsi::RawIscsi::connect(d.iscsi_port);
    let req = bad.login_request(
        0x80 | 1 << 2 | 3,
        &[
            ("InitiatorName", common::iscsi::INITIATOR),
            ("SessionType", "Normal"),
            ("TargetName", "iqn.2026-11.io.basalt:nope"),
        ],
    );
    bad.send(&req);
    let r = bad.recv().expect("login response");
    assert_eq!(r.u16_at(36), 0x0203, "target not found");
    assert!(bad.closed());
    d.terminate();

    let lines = json_lines(&d.log_text());
    let session = lines
        .iter()
        .find(|l| msg(l) == "session in full feature phase")
        .and_then(|l| span_of(l, "iscsi"))
        .expect("the raw session's line");
    let conn = session["conn"].as_u64().unwrap();
    let of_session = |l: &&serde_json::Value| {
        span_of(l, "iscsi").is_some_and(|s| s["conn"] == conn)
            && span_of(l, "volume").is_some_and(|s| s["volume"] == "vol7")
    };
    let one = |what: &str, f: &dyn Fn(&serde_json::Value) -> bool| -> serde_json::Value {
        let hits: Vec<&serde_json::Value> = lines.iter().filter(|l| f(l)).collect();
        assert_eq!(hits.len(), 1, "{what}: {hits:#?}");
        assert!(of_session(&hits[0]), "{what} in the raw session's spans: {}", hits[0]);
        hits[0].clone()
    };
    let check = |opcode: &str, key: &str, asc: &str| {
        let l = one(opcode, &|l| msg(l) == "command refused" && l["fields"]["opcode"] == opcode);
        assert_eq!(l["level"], "INFO", "{l}");
        let f = &l["fields"];
        assert_eq!(f["status"], "CHECK CONDITION", "{l}");
        assert_eq!(
            (f["sense_key"].as_str(), f["asc"].as_str(), f["ascq"].as_str()),
            (Some(key), Some(asc), Some("0x00")),
            "{l}"
        );
        l
    };
    check("0xc0", "ILLEGAL REQUEST", "0x20");
    check("0x12", "ILLEGAL REQUEST", "0x24");
    check("0x00", "ILLEGAL REQUEST", "0x25");
    check("0x89", "MISCOMPARE", "0x1d");
    let refusals =
        lines.iter().filter(|l| msg(l).starts_with("command refused") || msg(l) == "command failed").count();
    assert_eq!(refusals, 4, "no other command refusal lines");
    let rej = one("Reject", &|l| msg(l) == "PDU rejected");
    assert_eq!(
        (rej["fields"]["opcode"].as_str(), rej["fields"]["reason"].as_str()),
        (Some("0x10"), Some("ProtocolError")),
        "{rej}"
    );
    assert_eq!(rej["fields"]["itt"], 0x5151, "{rej}");
    let tmf = one("task management", &|l| msg(l) == "task management refused");
    assert_eq!(
        (tmf["fields"]["function"].as_u64(), tmf["fields"]["response"].as_u64()),
        (Some(3), Some(5)),
        "{tmf}"
    );
    let login: Vec<&serde_json::Value> =
        lines.iter().filter(|l| msg(l) == "closing connection during login").collect();
    assert_eq!(login.len(), 1, "{login:#?}");
    assert_eq!(login[0]["level"], "WARN");
    let error = login[0]["fields"]["error"].as_str().unwrap();
    assert!(error.contains("0x0203"), "{error}");
    assert!(span_of(login[0], "iscsi").is_some_and(|s| s["conn"].as_u64() > Some(conn)), "{}", login[0]);
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

/// A read of a rotten block fails on both front ends: one warn line each,
/// "command failed" with MEDIUM ERROR for iSCSI and "I/O error" with EIO
/// for NBD, naming the checksum mismatch.
#[test]
fn medium_errors_are_logged_once_as_failures() {
    use std::io::{Read, Seek, SeekFrom, Write};
    if !require("nbdsh") {
        return;
    }
    let mut d = json_daemon();
    let at = 1u64 << 20;
    common::nbdsh(&d.uri(), &format!("h.pwrite(bytes(range(256)) * 16, {at})\nh.flush()"));
    assert_eq!(d.terminate(), Some(0));
    // Flip one byte of the block in its extent file.
    let needle: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let mut hit = None;
    let mut dirs = vec![d.data.clone()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
                continue;
            }
            let mut bytes = Vec::new();
            std::fs::File::open(&p).unwrap().read_to_end(&mut bytes).unwrap();
            if let Some(pos) = bytes.windows(needle.len()).position(|w| w == needle) {
                hit = Some((p, pos as u64));
            }
        }
    }
    let (file, pos) = hit.expect("the written block is in an extent file");
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&file).unwrap();
    f.seek(SeekFrom::Start(pos + 7)).unwrap();
    f.write_all(&[0xff]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    d.restart();

    let mut raw = common::iscsi::RawIscsi::connect(d.iscsi_port);
    raw.login(Some(VOL7));
    let mut read = [0u8; 10];
    read[0] = 0x28;
    read[2..6].copy_from_slice(&((at / 512) as u32).to_be_bytes());
    read[7..9].copy_from_slice(&8u16.to_be_bytes());
    let (st, _, sense) = raw.run(&read, &[], 4096);
    assert_eq!((st, sense[2] & 0x0f, sense[12], sense[13]), (2, 0x03, 0x11, 0x00), "{sense:02x?}");
    raw.logout();
    common::nbdsh(
        &d.uri(),
        &format!(
            "import nbd\ntry:\n    h.pread(4096, {at})\n    raise SystemExit('the rotten read succeeded')\nexcept nbd.Error as e:\n    assert e.errno == 'EIO', e.errno\n"
        ),
    );
    d.terminate();

    let lines = json_lines(&d.log_text());
    let iscsi: Vec<&serde_json::Value> = lines.iter().filter(|l| msg(l) == "command failed").collect();
    assert_eq!(iscsi.len(), 1, "{iscsi:#?}");
    let l = iscsi[0];
    assert_eq!(l["level"], "WARN", "{l}");
    let f = &l["fields"];
    assert_eq!(
        (
            f["opcode"].as_str(),
            f["status"].as_str(),
            f["sense_key"].as_str(),
            f["asc"].as_str(),
            f["ascq"].as_str()
        ),
        (Some("0x28"), Some("CHECK CONDITION"), Some("MEDIUM ERROR"), Some("0x11"), Some("0x00")),
        "{l}"
    );
    assert!(f["error"].as_str().is_some_and(|e| e.contains("checksum mismatch")), "{l}");
    assert_eq!(span_of(l, "volume").map(|s| s["volume"].clone()), Some("vol7".into()), "{l}");
    assert!(span_of(l, "iscsi").is_some(), "{l}");
    let nbd: Vec<&serde_json::Value> = lines.iter().filter(|l| msg(l) == "I/O error").collect();
    assert_eq!(nbd.len(), 1, "{nbd:#?}");
    let l = nbd[0];
    assert_eq!((l["level"].as_str(), l["fields"]["errno"].as_str()), (Some("WARN"), Some("Io")), "{l}");
    assert!(l["fields"]["error"].as_str().is_some_and(|e| e.contains("checksum mismatch")), "{l}");
    assert!(span_of(l, "nbd").is_some() && span_of(l, "volume").is_some(), "{l}");
}

/// The flood guard: 200 bad CDBs on one iSCSI connection and 200 bad
/// requests on one NBD connection. Every one is accounted for exactly,
/// as a line of its own or in a `suppressed` count (on a later line or the
/// connection's last); the first `BURST` go out in full; and no more lines
/// go out than the bucket can have earned while the flood lasted.
#[test]
fn a_flood_of_client_errors_is_held_back_and_counted() {
    const N: u64 = 200;
    const BURST: u64 = 20; // export::flood::BURST
    if !require("nbdsh") {
        return;
    }
    let mut d = json_daemon();
    let started = Instant::now();
    let mut raw = common::iscsi::RawIscsi::connect(d.iscsi_port);
    raw.login(Some(VOL7));
    let mut cdb = [0u8; 16];
    cdb[0] = 0xc0;
    for _ in 0..N {
        assert_eq!(raw.run(&cdb, &[], 0).0, 2);
    }
    raw.logout();
    let iscsi_secs = started.elapsed().as_secs();
    let started = Instant::now();
    common::nbdsh(
        &d.uri(),
        &format!(
            "import nbd\nh.set_strict_mode(0)\nfor _ in range({N}):\n    try:\n        h.pread(512, h.get_size())\n        raise SystemExit('read past the end succeeded')\n    except nbd.Error as e:\n        assert e.errno == 'EINVAL', e.errno\n"
        ),
    );
    let nbd_secs = started.elapsed().as_secs();
    d.terminate();

    let lines = json_lines(&d.log_text());
    let tally = |refused: &dyn Fn(&serde_json::Value) -> bool, secs: u64, what: &str| {
        let full: Vec<&serde_json::Value> = lines.iter().filter(|l| refused(l)).collect();
        let in_lines: u64 = full.iter().filter_map(|l| l["fields"]["suppressed"].as_u64()).sum();
        let summaries: Vec<u64> = lines
            .iter()
            .filter(|l| msg(l) == "error lines held back by this connection's flood guard")
            .filter(|l| span_of(l, what).is_some())
            .map(|l| l["fields"]["suppressed"].as_u64().unwrap())
            .collect();
        assert!(summaries.len() <= 1, "{what}: {summaries:?}");
        let total = full.len() as u64 + in_lines + summaries.iter().sum::<u64>();
        assert_eq!(
            total,
            N,
            "{what}: {} lines, {in_lines} counted on them, summaries {summaries:?}",
            full.len()
        );
        assert!(full.len() as u64 >= BURST, "{what}: {}", full.len());
        assert!(full[..BURST as usize].iter().all(|l| l["fields"]["suppressed"].is_null()), "{what}");
        // The bucket earns one line a second: never more than that while the flood lasted.
        assert!(full.len() as u64 <= BURST + secs + 1, "{what}: {} lines in {secs} s", full.len());
        full.len()
    };
    let iscsi =
        tally(&|l| msg(l) == "command refused" && l["fields"]["opcode"] == "0xc0", iscsi_secs, "iscsi");
    let nbd = tally(&|l| msg(l) == "request refused", nbd_secs, "nbd");
    eprintln!("full lines: iSCSI {iscsi} in {iscsi_secs} s, NBD {nbd} in {nbd_secs} s, of {N} errors each");
}

/// NBD: an option refused in the handshake (NBD_OPT_GO of an export that
/// does not exist) and requests refused in transmission (a WRITE past the
/// end: ENOSPC; a READ past the end: EINVAL) are one line each.
#[test]
fn nbd_option_and_request_errors_are_logged_once() {
    if !require("nbdsh") {
        return;
    }
    let mut d = json_daemon();
    let script = format!(
        "import nbd\n\
         h = nbd.NBD()\n\
         h.set_opt_mode(True)\n\
         h.connect_uri('nbd://127.0.0.1:{port}/nope')\n\
         try:\n    h.opt_go()\n    raise SystemExit('GO of an unknown export succeeded')\n\
         except nbd.Error as e:\n    pass\n\
         h.set_export_name('vol7')\n\
         h.opt_go()\n\
         h.set_strict_mode(0)\n\
         size = h.get_size()\n\
         try:\n    h.pwrite(b'x' * 512, size)\n    raise SystemExit('write past the end succeeded')\n\
         except nbd.Error as e:\n    assert e.errno == 'ENOSPC', e.errno\n\
         try:\n    h.pread(512, size)\n    raise SystemExit('read past the end succeeded')\n\
         except nbd.Error as e:\n    assert e.errno == 'EINVAL', e.errno\n\
         h.shutdown()\n",
        port = d.nbd_port
    );
    // The system Python has the libnbd bindings (see `common::nbdsh_cmd`).
    let out = Command::new("/usr/bin/python3").arg("-c").arg(&script).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    d.terminate();

    let lines = json_lines(&d.log_text());
    let go: Vec<&serde_json::Value> =
        lines.iter().filter(|l| msg(l) == "option refused" && l["fields"]["option"] == 7).collect();
    assert_eq!(go.len(), 1, "{go:#?}");
    let f = &go[0]["fields"];
    assert_eq!(f["reply"], "NBD_REP_ERR_UNKNOWN", "{}", go[0]);
    assert_eq!(f["why"], "no export named \"nope\"", "{}", go[0]);
    assert!(
        span_of(go[0], "nbd")
            .is_some_and(|s| s["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")))
    );
    let refused = |errno: &str, kind: u64| -> Vec<&serde_json::Value> {
        lines
            .iter()
            .filter(|l| {
                msg(l) == "request refused" && l["fields"]["errno"] == errno && l["fields"]["kind"] == kind
            })
            .collect()
    };
    for (errno, kind) in [("NoSpc", 1), ("Inval", 0)] {
        let r = refused(errno, kind);
        assert_eq!(r.len(), 1, "{errno}: {r:#?}");
        assert_eq!(span_of(r[0], "volume").map(|s| s["volume"].clone()), Some("vol7".into()), "{}", r[0]);
        assert_eq!(r[0]["level"], "INFO");
    }
    let all = lines.iter().filter(|l| msg(l) == "request refused" || msg(l) == "request failed").count();
    assert_eq!(all, 2, "no other request error lines");
}
