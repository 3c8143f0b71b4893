//! The systemd surface: the unit passes `systemd-analyze verify`, and a
//! real `basaltd` speaks the notify protocol (READY=1 once it serves,
//! STATUS= while starting, WATCHDOG=1 from the runtime, missed while the
//! runtime is stalled on purpose) to a NOTIFY_SOCKET this test owns.

mod common;

use common::{free_port, require};
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn unit_passes_systemd_analyze_verify() {
    if !require("systemd-analyze") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_basaltd");
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/basaltd.service")).unwrap();
    // ExecStart and ExecStartPre at the binary just built; User= and the
    // hardening stay as shipped.
    let unit = unit.replace("/usr/bin/basaltd", exe);
    assert!(unit.contains(&format!("ExecStart={exe} run")) && unit.contains(&format!("ExecStartPre={exe} ")));
    let path = tmp.path().join("basaltd.service");
    std::fs::write(&path, &unit).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed: {stderr}");
    // Unknown keys and bad values are only warnings: clean means none.
    assert!(stderr.trim().is_empty(), "systemd-analyze verify warns:\n{stderr}");
}

/// One notification and when it arrived.
#[derive(Debug)]
struct Note {
    at: Instant,
    msg: String,
}

/// A `basaltd demo` whose notifications go to a socket of ours.
struct Notified {
    child: Child,
    /// Notifications, stamped by a thread that does nothing else (so a
    /// slow check here never shifts the times).
    rx: std::sync::mpsc::Receiver<Note>,
    admin: u16,
    log: std::path::PathBuf,
    _tmp: tempfile::TempDir,
}

impl Notified {
    fn start(stall_ms: Option<u64>) -> Notified {
        let tmp = tempfile::tempdir().unwrap();
        let sock_path = tmp.path().join("notify.sock");
        let sock = UnixDatagram::bind(&sock_path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let note = Note { at: Instant::now(), msg: String::from_utf8_lossy(&buf[..n]).into_owned() };
                if tx.send(note).is_err() {
                    return;
                }
            }
        });
        let admin = free_port();
        let log = tmp.path().join("basaltd.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_basaltd"));
        cmd.arg("demo")
            .args(["--nodes=1", "--replicas=1"])
            .arg(format!("--data={}", tmp.path().join("data").display()))
            .arg(format!("--nbd=127.0.0.1:{}", free_port()))
            // Not off: a node without an iSCSI address is refused by the
            // metadata today and never becomes ready (see the report).
            .arg(format!("--iscsi=127.0.0.1:{}", free_port()))
            .arg(format!("--admin=127.0.0.1:{admin}"))
            .arg(format!("--peer=127.0.0.1:{}", free_port()))
            .arg("--size=16M")
            .env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "200000")
            .env_remove("WATCHDOG_PID")
            .env_remove("BASALT_DEBUG_STALL_RUNTIME_MS")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(ms) = stall_ms {
            cmd.env("BASALT_DEBUG_STALL_RUNTIME_MS", ms.to_string());
        }
        let child = cmd.spawn().unwrap();
        Notified { child, rx, admin, log, _tmp: tmp }
    }

    /// Notifications until `until` says stop (or 60 s pass).
    fn collect(&mut self, mut until: impl FnMut(&[Note]) -> bool) -> Vec<Note> {
        let mut notes = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !until(&notes) {
            assert!(Instant::now() < deadline, "gave up waiting; got {notes:?}\nlog:\n{}", self.log_text());
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("basaltd exited ({st}); got {notes:?}\nlog:\n{}", self.log_text());
            }
            if let Ok(note) = self.rx.recv_timeout(Duration::from_millis(100)) {
                // READY=1 promises the node serves: ask it right away.
                if note.msg == "READY=1" {
                    let ready = readyz(self.admin);
                    assert_eq!(ready, Some(200), "READY=1 came before /readyz said ready");
                }
                notes.push(note);
            }
        }
        notes
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Notified {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The status code of GET /readyz, or None if nothing answers.
fn readyz(port: u16) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

fn position(notes: &[Note], msg: &str) -> Option<usize> {
    notes.iter().position(|n| n.msg == msg)
}

#[test]
fn ready_status_and_watchdog_reach_the_notify_socket() {
    let mut d = Notified::start(None);
    // Until READY=1 and five watchdog pings after it.
    let notes = d.collect(|n| {
        position(n, "READY=1").is_some_and(|r| n[r..].iter().filter(|x| x.msg == "WATCHDOG=1").count() >= 5)
    });
    let ready = position(&notes, "READY=1").unwrap();
    let statuses: Vec<&str> = notes[..ready].iter().filter_map(|n| n.msg.strip_prefix("STATUS=")).collect();
    assert!(statuses.contains(&"opening the store"), "{statuses:?}");
    assert!(statuses.contains(&"waiting to be a member of the metadata group"), "{statuses:?}");
    assert_eq!(notes.iter().filter(|n| n.msg == "READY=1").count(), 1, "READY=1 once: {notes:?}");
    assert!(notes[ready..].iter().any(|n| n.msg == "STATUS=serving"), "{notes:?}");
    // Nothing but the protocol's words.
    for n in &notes {
        assert!(
            n.msg == "READY=1" || n.msg == "WATCHDOG=1" || n.msg.starts_with("STATUS="),
            "unexpected notification {:?}",
            n.msg
        );
    }

    // SIGTERM: STOPPING=1 and a draining status.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
    let notes = d.collect(|n| position(n, "STATUS=draining connections").is_some());
    let stop = position(&notes, "STOPPING=1").expect("STOPPING=1 before draining");
    assert!(stop < position(&notes, "STATUS=draining connections").unwrap(), "{notes:?}");
    let st = d.child.wait().unwrap();
    assert_eq!(st.code(), Some(0), "clean exit after SIGTERM; log:\n{}", d.log_text());
}

#[test]
fn a_stalled_runtime_misses_its_watchdog() {
    let mut d = Notified::start(Some(2000));
    // Pings until one comes 1.5 s or more after the one before it (the
    // planted 2 s stall, which starts as READY=1 is sent), then three more
    // to see them resume.
    let pings =
        |n: &[Note]| -> Vec<Instant> { n.iter().filter(|x| x.msg == "WATCHDOG=1").map(|x| x.at).collect() };
    let gap = |n: &[Note]| -> Option<usize> {
        position(n, "READY=1")?;
        let p = pings(n);
        let i = p.windows(2).position(|w| w[1] - w[0] >= Duration::from_millis(1500))?;
        (p.len() >= i + 4).then_some(i)
    };
    let notes = d.collect(|n| gap(n).is_some());
    let p = pings(&notes);
    let longest = p.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(longest >= Duration::from_millis(1500), "longest gap {longest:?}");
    let ready = notes[position(&notes, "READY=1").unwrap()].at;
    let i = gap(&notes).unwrap();
    assert!(p[i + 1] > ready, "the gap is the stall after READY=1, not a slow start");
    assert!(d.log_text().contains("stalling the runtime on purpose"));
}
