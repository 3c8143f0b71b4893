//! A cluster of real `basaltd run` processes on 127.0.0.x, driven through
//! the real `basalt` CLI.

use super::free_port_on;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct ClusterNode {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub peer: SocketAddr,
    pub nbd: SocketAddr,
    pub iscsi: SocketAddr,
    pub admin: SocketAddr,
    pub log: PathBuf,
    /// Prefix the command with this (e.g. `ip netns exec NS`).
    pub wrap: Vec<String>,
    child: Option<Child>,
}

pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
    pub tmp: tempfile::TempDir,
}

/// Raft and liveness timings short enough for tests, long enough for a
/// loaded 2-core machine.
pub const TIMINGS: &str = "[raft]\ntick_ms = 50\nelection_ticks = 20\nheartbeat_ticks = 3\nsnapshot_entries = 40\n\
                           [liveness]\nheartbeat_ms = 200\ndown_after_ms = 2000\n";

/// A free port on `ip`; inside a network namespace (an address not on this
/// host) any port is free.
fn port_on(ip: &str) -> u16 {
    if ip.starts_with("127.") { free_port_on(ip) } else { free_port_on("127.0.0.1") }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

impl Cluster {
    /// Configs for `n` nodes at 127.0.0.{2..}, every one an initial member.
    pub fn configure(n: usize, voters: u8, ips: Option<Vec<String>>) -> Cluster {
        let tmp = tempfile::Builder::new().prefix("basalt-cluster-").tempdir().unwrap();
        let ips = ips.unwrap_or_else(|| (0..n).map(|k| format!("127.0.0.{}", k + 2)).collect());
        let mut nodes: Vec<ClusterNode> = (0..n)
            .map(|k| {
                let dir = tmp.path().join(format!("node{}", k + 1));
                std::fs::create_dir_all(&dir).unwrap();
                ClusterNode {
                    config: dir.join("basaltd.toml"),
                    log: dir.join("basaltd.log"),
                    peer: addr(&ips[k], port_on(&ips[k])),
                    nbd: addr(&ips[k], port_on(&ips[k])),
                    iscsi: addr(&ips[k], port_on(&ips[k])),
                    admin: addr(&ips[k], port_on(&ips[k])),
                    dir,
                    wrap: Vec::new(),
                    child: None,
                }
            })
            .collect();
        let members: Vec<String> = nodes.iter().map(|n| format!("\"{}\"", n.peer)).collect();
        for (k, node) in nodes.iter_mut().enumerate() {
            let text = format!(
                "cluster_name = \"test\"\nstate_dir = \"{d}/state\"\ndata_dirs = [\"{d}/data\"]\nzone = \"z{k}\"\n\
                 capacity = \"64GiB\"\npayload_budget = \"256MiB\"\n\
                 [listen]\npeer = \"{}\"\nnbd = \"{}\"\niscsi = \"{}\"\nadmin = \"{}\"\n\
                 [cluster]\ninitial_members = [{}]\nvoters = {voters}\n{TIMINGS}",
                node.peer,
                node.nbd,
                node.iscsi,
                node.admin,
                members.join(", "),
                d = node.dir.display(),
            );
            std::fs::write(&node.config, text).unwrap();
        }
        Cluster { nodes, tmp }
    }

    /// Rewrites node `k`'s cluster section: initial members are the nodes
    /// `members` (empty: none), and it joins through node `join`'s peer
    /// address if given.
    pub fn set_membership(&mut self, k: usize, members: &[usize], join: Option<usize>) {
        let text = std::fs::read_to_string(&self.nodes[k].config).unwrap();
        let list: Vec<String> = members.iter().map(|&m| format!("\"{}\"", self.nodes[m].peer)).collect();
        let mut out = String::new();
        for line in text.lines() {
            if line.starts_with("initial_members") {
                out += &format!("initial_members = [{}]\n", list.join(", "));
                if let Some(j) = join {
                    out += &format!("join = \"{}\"\n", self.nodes[j].peer);
                }
            } else {
                out += line;
                out += "\n";
            }
        }
        std::fs::write(&self.nodes[k].config, out).unwrap();
    }

    /// Makes node `k` a compute node: `data_dirs = []` (and no capacity to
    /// offer), and an NBD unix socket at `nbd.sock` in its directory.
    pub fn make_compute(&mut self, k: usize) {
        let node = &self.nodes[k];
        let text = std::fs::read_to_string(&node.config).unwrap();
        let mut out = String::new();
        for line in text.lines() {
            if line.starts_with("data_dirs") {
                out += "data_dirs = []\n";
            } else if !line.starts_with("capacity") {
                out += line;
                out += "\n";
            }
            if line == "[listen]" {
                out += &format!("nbd_unix = \"{}\"\n", node.dir.join("nbd.sock").display());
            }
        }
        std::fs::write(&node.config, out).unwrap();
    }

    /// Every extent replica file (`*.ext`) anywhere under node `k`'s
    /// directory, by file name.
    pub fn extent_files(&self, k: usize) -> std::collections::BTreeSet<String> {
        fn walk(p: &std::path::Path, out: &mut std::collections::BTreeSet<String>) {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "ext") {
                    out.insert(p.file_name().unwrap().to_string_lossy().into_owned());
                }
            }
        }
        let mut out = std::collections::BTreeSet::new();
        walk(&self.nodes[k].dir, &mut out);
        out
    }

    /// The sum of the samples of metric `name` on node `k` whose labels
    /// include every `key="value"` of `labels` (0 if none).
    pub fn metric(&self, k: usize, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.admin_get(k, "/metrics").unwrap_or_else(|| panic!("node {k}: no /metrics"));
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Node ids by index (`ids[k]` is `nodes[k]`'s), as node `via` lists them.
    pub fn node_ids(&self, via: usize) -> Vec<u64> {
        let s = self.cli_json(via, &["cluster", "status"]);
        let listed = s["nodes"].as_array().unwrap();
        self.nodes
            .iter()
            .map(|n| {
                let admin = n.admin.to_string();
                let j = listed.iter().find(|j| j["addresses"]["admin"].as_str() == Some(admin.as_str()));
                j.unwrap_or_else(|| panic!("node {admin} not in {s}"))["id"].as_u64().unwrap()
            })
            .collect()
    }

    /// Starts `n` nodes and waits until every one is ready.
    pub fn start(n: usize, voters: u8) -> Cluster {
        let mut c = Cluster::configure(n, voters, None);
        for k in 0..n {
            c.spawn(k);
        }
        for k in 0..n {
            c.wait_ready(k);
        }
        c
    }

    pub fn spawn(&mut self, k: usize) {
        let node = &mut self.nodes[k];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log).unwrap();
        let exe = env!("CARGO_BIN_EXE_basaltd");
        let mut cmd = if node.wrap.is_empty() {
            Command::new(exe)
        } else {
            let mut c = Command::new(&node.wrap[0]);
            c.args(&node.wrap[1..]).arg(exe);
            c
        };
        let child = cmd
            .args(["--workers", "1", "--idle-poll-us", "0", "run", "--config"])
            .arg(&node.config)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn basaltd run");
        node.child = Some(child);
    }

    pub fn wait_ready(&mut self, k: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(c) = self.nodes[k].child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("node {k} exited ({status}); log:\n{}", self.log(k));
            }
            let out = self.cli(k, &["node", "ready"]);
            if out.status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let others: String = (0..self.nodes.len())
            .filter(|&j| j != k)
            .map(|j| {
                let log = self.log(j);
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                format!(
                    "\n--- node {j}, last {} lines ---\n{}",
                    tail.len(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect();
        panic!("node {k} not ready in 60 s; log:\n{}{others}", self.log(k));
    }

    /// Every node stopped with SIGTERM (each must exit 0), then all started
    /// again and waited for until ready.
    pub fn restart_all(&mut self) {
        let n = self.nodes.len();
        for k in 0..n {
            assert_eq!(self.terminate(k), Some(0), "node {k} on SIGTERM:\n{}", self.log(k));
        }
        for k in 0..n {
            self.spawn(k);
        }
        for k in 0..n {
            self.wait_ready(k);
        }
    }

    /// A raw GET on node `k`'s admin API: the body on 200, else `None`.
    pub fn admin_get(&self, k: usize, path: &str) -> Option<String> {
        let url = format!("http://{}{path}", self.nodes[k].admin);
        match ureq::get(&url).timeout(Duration::from_secs(5)).call() {
            Ok(r) => r.into_string().ok(),
            Err(_) => None,
        }
    }

    /// Names of volume `id`'s extent files (`v{id}-e{N}.ext`) on node `k`,
    /// sorted.
    pub fn volume_extent_files(&self, k: usize, id: u64) -> Vec<String> {
        let prefix = format!("v{id}-e");
        self.extent_files(k).into_iter().filter(|n| n.starts_with(&prefix)).collect()
    }

    pub fn log(&self, k: usize) -> String {
        std::fs::read_to_string(&self.nodes[k].log).unwrap_or_default()
    }

    pub fn pid(&self, k: usize) -> Option<u32> {
        self.nodes[k].child.as_ref().map(Child::id)
    }

    pub fn kill9(&mut self, k: usize) {
        if let Some(mut c) = self.nodes[k].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// kill -9 of the nodes `order`, every signal sent before any is
    /// waited for, so that no node outlives another long enough to act on
    /// its death (degrade a replica set, take over a volume).
    pub fn kill9_all(&mut self, order: &[usize]) {
        let mut killed = Vec::new();
        for &k in order {
            if let Some(mut c) = self.nodes[k].child.take() {
                let _ = c.kill();
                killed.push(c);
            }
        }
        for mut c in killed {
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; the exit code.
    pub fn terminate(&mut self, k: usize) -> Option<i32> {
        let mut c = self.nodes[k].child.take()?;
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        c.wait().ok()?.code()
    }

    /// Runs the `basalt` CLI against node `k` (inside its namespace, if any).
    pub fn cli(&self, k: usize, args: &[&str]) -> Output {
        let exe = env!("CARGO_BIN_EXE_basalt");
        let wrap = &self.nodes[k].wrap;
        let mut cmd = if wrap.is_empty() {
            Command::new(exe)
        } else {
            let mut c = Command::new(&wrap[0]);
            c.args(&wrap[1..]).arg(exe);
            c
        };
        cmd.arg("--admin").arg(self.nodes[k].admin.to_string()).args(args).output().expect("run basalt")
    }

    /// Runs `basalt --json ...` against node `k`, expecting success.
    /// `basalt --json volume verify NAME` through node `k`: exit 0, no
    /// mismatch, nothing left uncompared. Returns the report.
    pub fn assert_verify_clean(&self, k: usize, name: &str) -> serde_json::Value {
        let out = self.cli(k, &["--json", "volume", "verify", name]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "verify: not JSON ({e}): {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert_eq!(out.status.code(), Some(0), "verify {name}: {v}");
        assert_eq!((v["mismatched"].as_u64(), v["incomplete"].as_u64()), (Some(0), Some(0)), "{v}");
        v
    }

    pub fn cli_json(&self, k: usize, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.cli(k, &all);
        assert!(
            out.status.success(),
            "basalt {args:?} on node {k} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("basalt {args:?}: not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout))
        })
    }

    /// The index of the node the cluster names as leader, asking node `via`.
    pub fn leader(&self, via: usize) -> Option<usize> {
        let out = self.cli(via, &["--json", "cluster", "status"]);
        self.leader_from(&out.stdout)
    }

    /// Waits until node `via` names a leader other than `not`, and returns it.
    pub fn wait_leader(&self, via: usize, not: Option<usize>) -> usize {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let out = self.cli(via, &["--json", "--stale", "cluster", "status"]);
            if out.status.success()
                && let Some(l) = self.leader_from(&out.stdout)
                && Some(l) != not
            {
                return l;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no leader (other than {not:?}) seen from node {via} in 60 s; log:\n{}", self.log(via));
    }

    fn leader_from(&self, json: &[u8]) -> Option<usize> {
        let s: serde_json::Value = serde_json::from_slice(json).ok()?;
        let id = s["leader"].as_u64()?;
        let nodes = s["nodes"].as_array()?;
        let admin =
            nodes.iter().find(|n| n["id"].as_u64() == Some(id))?["addresses"]["admin"].as_str()?.to_string();
        self.nodes.iter().position(|n| n.admin.to_string() == admin)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for k in 0..self.nodes.len() {
            self.kill9(k);
        }
    }
}
