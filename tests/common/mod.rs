//! Shared helpers for the integration tests: start a real `basaltd`, find
//! external clients, run them and check their output.
#![allow(dead_code)]

pub mod attach;
pub mod cluster;
pub mod compliance;
pub mod netns;
pub mod oracle;
pub mod sector_oracle;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// True if `tool` is on PATH. Under `CI=true` a missing tool fails the test
/// loudly; elsewhere the test prints why it did nothing and returns.
pub fn require(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "required client {tool:?} is not installed (CI=true): run ./scripts/test, which installs it"
            );
        }
        eprintln!("SKIPPING: {tool} is not installed (install it or run ./scripts/test)");
    }
    found
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    free_port_on("127.0.0.1")
}

/// A port that was free a moment ago on `ip`, chosen below the kernel's
/// ephemeral range (32768 and up), so the outgoing connections of other
/// daemons and clients cannot take it before the daemon binds it.
///
/// No port is handed out twice by one test process: two picks in a row can
/// otherwise both find the same port free (nothing holds it between them),
/// and a daemon then gets it for two listeners.
pub fn free_port_on(ip: &str) -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = rand::Rng::gen_range(&mut rand::thread_rng(), 20_000..32_000);
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind((ip, port)).is_ok() {
            given.push(port);
            return port;
        }
    }
}

/// `n` consecutive ports, each free a moment ago on 127.0.0.1 and none
/// handed out before by this process: a demo of `n` nodes listens on a
/// base port + k for node k.
pub fn free_port_run(n: u16) -> u16 {
    loop {
        let base = free_port();
        if (1..n).all(|k| base + k < 32_000 && claim(base + k)) {
            return base;
        }
    }
}

/// Marks `port` handed out if it is free and was not handed out before.
fn claim(port: u16) -> bool {
    static CLAIMED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut c = CLAIMED.lock().unwrap_or_else(|e| e.into_inner());
    if c.contains(&port) || TcpListener::bind(("127.0.0.1", port)).is_err() {
        return false;
    }
    c.push(port);
    true
}

/// A running `basaltd demo` on free loopback ports, with its own data dir:
/// the single-node slice (`--nodes=1 --replicas=1`) unless the arguments
/// name `--nodes`.
pub struct Daemon {
    child: Option<Child>,
    pub nbd_port: u16,
    pub iscsi_port: u16,
    pub admin_port: u16,
    pub peer_port: u16,
    /// Started once: later starts keep their ports.
    started: bool,
    pub data: PathBuf,
    pub volume: String,
    args: Vec<String>,
    /// Nodes of the demo (`--nodes`).
    pub nodes: u16,
    /// What the demo printed on stdout, line by line, over every start.
    stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _tmp: Option<tempfile::TempDir>,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `basaltd demo --size <size>` plus `extra` arguments.
    pub fn start(size: &str, extra: &[&str]) -> Daemon {
        Daemon::start_in(&std::env::temp_dir(), size, extra)
    }

    /// [`Daemon::start`] with its data directory under `parent` (another
    /// filesystem, say).
    pub fn start_in(parent: &Path, size: &str, extra: &[&str]) -> Daemon {
        Daemon::start_as(parent, size, extra, true)
    }

    /// `basaltd demo` with its own defaults for nodes and replicas (3 and
    /// 3), which [`Daemon::start`] replaces with the single-node slice.
    pub fn start_demo_defaults(size: &str, extra: &[&str]) -> Daemon {
        Daemon::start_as(&std::env::temp_dir(), size, extra, false)
    }

    fn start_as(parent: &Path, size: &str, extra: &[&str], single_by_default: bool) -> Daemon {
        let tmp = tempfile::Builder::new().prefix("basalt-test-").tempdir_in(parent).unwrap();
        let data = tmp.path().join("data");
        let mut args: Vec<String> =
            std::iter::once(format!("--size={size}")).chain(extra.iter().map(|s| s.to_string())).collect();
        let nodes = args.iter().find_map(|a| a.strip_prefix("--nodes=")).map(|n| n.parse::<u16>().unwrap());
        if nodes.is_none() && single_by_default {
            args.splice(1..1, ["--nodes=1".to_string(), "--replicas=1".to_string()]);
        }
        // The demo's own default is 3 nodes.
        let nodes = nodes.unwrap_or(if single_by_default { 1 } else { 3 });
        let mut d = Daemon {
            child: None,
            nbd_port: free_port_run(nodes),
            iscsi_port: free_port_run(nodes),
            admin_port: free_port_run(nodes),
            peer_port: free_port_run(nodes),
            started: false,
            data,
            volume: "demo".into(),
            args,
            nodes,
            stdout: Default::default(),
            log: tmp.path().join("basaltd.log"),
            _tmp: Some(tmp),
        };
        if let Some(v) = d.args.iter().find_map(|a| a.strip_prefix("--volume=")) {
            d.volume = v.to_string();
        }
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        // A port free when picked can be taken before basaltd binds it (by
        // any process's outgoing connection): on the first start only, when
        // that is why it failed, pick new ports and try again. A restart
        // keeps its ports, since the test's clients know them.
        for attempt in 0..3 {
            let before = self.log_text().len();
            match self.try_spawn() {
                Ok(child) => {
                    self.child = Some(child);
                    self.started = true;
                    return;
                }
                Err(()) => {
                    let new_log = self.log_text()[before..].to_string();
                    if self.started || attempt == 2 || !new_log.contains("Address already in use") {
                        panic!("basaltd did not become ready; log:\n{}", self.log_text());
                    }
                    self.nbd_port = free_port_run(self.nodes);
                    self.iscsi_port = free_port_run(self.nodes);
                    self.admin_port = free_port_run(self.nodes);
                    self.peer_port = free_port_run(self.nodes);
                }
            }
        }
    }

    fn try_spawn(&mut self) -> Result<Child, ()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_basaltd"))
            .arg("demo")
            .arg(format!("--data={}", self.data.display()))
            .arg(format!("--nbd=127.0.0.1:{}", self.nbd_port))
            .arg(format!("--iscsi=127.0.0.1:{}", self.iscsi_port))
            .arg(format!("--admin=127.0.0.1:{}", self.admin_port))
            .arg(format!("--peer=127.0.0.1:{}", self.peer_port))
            .args(&self.args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn basaltd");
        // The daemon prints how to reach it on stdout once it serves,
        // ending with the line that names `basalt --admin`.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let seen = self.stdout.clone();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut sent = false;
            while let Some(Ok(line)) = lines.next() {
                let last = line.contains("basalt --admin");
                seen.lock().unwrap().push(line);
                if !sent && last {
                    let _ = tx.send(());
                    sent = true;
                }
            }
        });
        // Ready, or gone (stdout closes and the sender drops), or 30 s
        // (90 s for a cluster of processes to elect a leader and create
        // the volume on a loaded machine).
        let limit = Duration::from_secs(if self.nodes > 1 { 90 } else { 30 });
        match rx.recv_timeout(limit) {
            Ok(()) => Ok(child),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(())
            }
        }
    }

    /// Every line the demo printed on stdout so far, over every start.
    pub fn printed(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// The NBD unix socket of the single-node demo (its default path).
    pub fn socket(&self) -> PathBuf {
        self.data.join("nbd.sock")
    }

    /// `nbd+unix:///VOLUME?socket=...` on [`Daemon::socket`].
    pub fn unix_uri(&self) -> String {
        format!("nbd+unix:///{}?socket={}", self.volume, self.socket().display())
    }

    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.nbd_port, self.volume)
    }

    pub fn iqn(&self) -> String {
        format!("iqn.2026-11.io.basalt:{}", self.volume)
    }

    pub fn iscsi_url(&self) -> String {
        format!("iscsi://127.0.0.1:{}/{}/0", self.iscsi_port, self.iqn())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        unsafe_kill(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("basaltd ignored SIGTERM for 60 s; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9, no chance to flush.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the daemon again on the same data dir and ports.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the daemon before restarting it");
        self.spawn();
    }

    /// [`Daemon::restart`] with `extra` in place of the arguments given
    /// after the size at start (another `--engine`, say). The volume stays
    /// the one named at start.
    pub fn restart_with(&mut self, extra: &[&str]) {
        // --size, and --nodes=1 --replicas=1 when the helper added them.
        let keep = if self.args.get(1).is_some_and(|a| a == "--nodes=1") { 3 } else { 1 };
        self.args.truncate(keep);
        self.args.extend(extra.iter().map(|s| s.to_string()));
        self.restart();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- basaltd log ({}) ---\n{}", self.log.display(), self.log_text());
        }
    }
}

fn unsafe_kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child pid we own; no memory is involved.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Runs a basaltd that is expected to refuse to start: its exit code and
/// stderr. One that is still running after 30 s is killed (and fails the
/// caller's exit-code check).
pub fn run_to_exit(mut cmd: std::process::Command) -> (Option<i32>, String) {
    let tmp = tempfile::tempfile().unwrap();
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(tmp.try_clone().unwrap())
        .spawn()
        .expect("spawn basaltd");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    let mut f = tmp;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).unwrap();
    std::io::Read::read_to_string(&mut f, &mut err).unwrap();
    (code, err)
}

/// Runs a command; panics with its output unless it exits 0.
pub fn run_ok(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command and returns its output whatever the exit status.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

pub mod iscsi;

/// Runs a Python script under `nbdsh` connected to `uri` (the handle is
/// `h`, with base:allocation requested); panics with its output unless it
/// exits 0. Returns stdout.
pub fn nbdsh(uri: &str, script: &str) -> String {
    let out = nbdsh_cmd().args(["--base-allocation", "-u", uri, "-c", script]).output().expect("nbdsh");
    assert!(
        out.status.success(),
        "nbdsh failed ({}):\nscript:\n{script}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(&out)
}

/// `nbdsh` runs `python3 -m nbd`; the libnbd bindings live in the system
/// Python, so put /usr/bin first (a pyenv python on PATH lacks them).
pub fn nbdsh_cmd() -> Command {
    let mut c = Command::new("nbdsh");
    c.env("PATH", format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()));
    c
}

/// A scratch directory for client-side files (images, patterns).
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("basalt-scratch-").tempdir().unwrap()
}

/// Sector content that names the write that produced it: every 8 bytes of
/// every 512-byte sector hold `version`.
pub fn versioned(version: u64, sectors: usize) -> bytes::Bytes {
    let mut v = Vec::with_capacity(sectors * 512);
    for _ in 0..sectors * 64 {
        v.extend_from_slice(&version.to_le_bytes());
    }
    v.into()
}

/// The version a sector written by [`versioned`] names, or `None` if the
/// sector is not one whole version (torn inside the sector, or garbage).
pub fn version_of(sector: &[u8]) -> Option<u64> {
    let v = u64::from_le_bytes(sector[..8].try_into().unwrap());
    sector.chunks(8).all(|c| c == v.to_le_bytes()).then_some(v)
}
