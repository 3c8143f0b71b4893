//! `basaltd demo --nodes N` for N > 1: writes one config per node, starts
//! each node as its own `basaltd run` process, creates the demo volume
//! through the admin API, prints how to reach it, and stops the nodes on
//! SIGINT/SIGTERM. A node that dies (kill -9 by a curious newcomer) is
//! reported and left dead; the others keep serving.

use anyhow::Context;
use basalt::admin::{ApiError, ClusterStatus, CreateVolume, VolumeInfo};
use basalt::config::Config;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the demo's nodes put their NBD unix sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnixSocket {
    Off,
    /// DATA/nodeK/nbd.sock for node K.
    Default,
    /// PATH.K for node K.
    Path(PathBuf),
}

/// One demo node: where its files are and how to reach it.
#[derive(Debug)]
pub struct DemoNode {
    pub index: usize,
    pub dir: PathBuf,
    pub config: Config,
}

fn bump(a: SocketAddr, by: usize) -> anyhow::Result<SocketAddr> {
    let port = u16::try_from(a.port() as usize + by).context("demo ports past 65535")?;
    Ok(SocketAddr::new(a.ip(), port))
}

/// Configs for `n` demo nodes under `root`: node k (from 0) listens on the
/// base ports plus k; every node is an initial member.
pub fn plan(root: &Path, n: usize, base: &Config, unix: &UnixSocket) -> anyhow::Result<Vec<DemoNode>> {
    let peers: Vec<SocketAddr> = (0..n).map(|k| bump(base.listen.peer, k)).collect::<anyhow::Result<_>>()?;
    let voters = match n {
        1 | 2 => 1,
        3 | 4 => 3,
        _ => 5,
    };
    (0..n)
        .map(|k| {
            let dir = root.join(format!("node{}", k + 1));
            let mut c = base.clone();
            c.state_dir = dir.join("state");
            c.data_dirs = vec![dir.join("data")];
            c.listen.peer = peers[k];
            c.listen.admin = bump(base.listen.admin, k)?;
            c.listen.nbd = base.listen.nbd.map(|a| bump(a, k)).transpose()?;
            c.listen.iscsi = base.listen.iscsi.map(|a| bump(a, k)).transpose()?;
            c.listen.nbd_unix = match unix {
                UnixSocket::Off => None,
                UnixSocket::Default => Some(dir.join("nbd.sock")),
                UnixSocket::Path(p) => {
                    let mut s = p.clone().into_os_string();
                    s.push(format!(".{}", k + 1));
                    Some(PathBuf::from(s))
                }
            };
            c.cluster.initial_members = peers.clone();
            c.cluster.voters = voters;
            c.zone = format!("zone{}", k + 1);
            c.validate().with_context(|| format!("demo node {}", k + 1))?;
            Ok(DemoNode { index: k, dir, config: c })
        })
        .collect()
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir()?.join(p) })
}

fn http_get<T: serde::de::DeserializeOwned>(admin: SocketAddr, path: &str) -> Result<T, String> {
    match ureq::get(&format!("http://{admin}{path}")).timeout(Duration::from_secs(5)).call() {
        Ok(r) => r.into_json().map_err(|e| e.to_string()),
        Err(ureq::Error::Status(code, r)) => Err(r
            .into_json::<ApiError>()
            .map(|e| format!("{}: {}", e.error, e.message))
            .unwrap_or_else(|_| format!("HTTP {code}"))),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs the demo cluster until a signal. `volume` is created if absent.
pub async fn run(
    root: &Path,
    n: usize,
    base: &Config,
    unix: &UnixSocket,
    extra_args: Vec<String>,
    volume: CreateVolume,
) -> anyhow::Result<()> {
    let root = absolute(root)?;
    let unix = match unix {
        UnixSocket::Path(p) => UnixSocket::Path(absolute(p)?),
        other => other.clone(),
    };
    let nodes = plan(&root, n, base, &unix)?;
    let exe = std::env::current_exe().context("finding the basaltd binary")?;
    let mut children: Vec<Option<Child>> = Vec::new();
    for node in &nodes {
        std::fs::create_dir_all(&node.dir).with_context(|| format!("creating {}", node.dir.display()))?;
        let cfg_path = node.dir.join("basaltd.toml");
        basalt::storage::write_atomically(&cfg_path, node.config.to_toml().as_bytes())
            .with_context(|| format!("writing {}", cfg_path.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("basaltd.log"))
            .context("opening a node log")?;
        let mut cmd = Command::new(&exe);
        cmd.args(&extra_args)
            .arg("run")
            .arg("--config")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("starting node {}", node.index + 1))?;
        children.push(Some(child));
    }
    let result = serve(&nodes, &mut children, volume).await;
    stop(&mut children);
    result
}

/// A node gets SIGTERM (and shuts down cleanly) when the demo dies, even
/// by SIGKILL or the OOM killer, which give the demo no chance to stop it:
/// without this its nodes lived on, holding their ports and data
/// directories. The signal comes when the thread that spawned the node
/// exits; that is the thread driving the demo (`block_on` in main), which
/// lives as long as the demo does.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec and calls
    // only prctl(2) and getppid(2), which are async-signal-safe; it touches
    // no memory the parent's other threads could have left inconsistent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The demo died before the prctl: nobody would send the signal.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the demo exited while starting its nodes"));
            }
            Ok(())
        });
    }
}

async fn serve(
    nodes: &[DemoNode],
    children: &mut [Option<Child>],
    volume: CreateVolume,
) -> anyhow::Result<()> {
    let admin = nodes[0].config.listen.admin;
    let name = volume.name.clone();
    let vol = tokio::task::spawn_blocking(move || ensure_volume(admin, volume)).await??;
    // Print only once every node serves: its listeners are open once its
    // /readyz says so.
    let admins: Vec<SocketAddr> = nodes.iter().map(|n| n.config.listen.admin).collect();
    tokio::task::spawn_blocking(move || wait_ready(&admins)).await?;
    let status: ClusterStatus =
        tokio::task::spawn_blocking(move || http_get(admin, "/v1/cluster?stale=true"))
            .await?
            .map_err(anyhow::Error::msg)?;
    println!("basaltd demo: cluster {} of {} nodes, leader {:?}", status.id, nodes.len(), status.leader);
    println!(
        "volume {name:?} ({} bytes, {} replicas, at least {} to accept a write)",
        vol.size, vol.replicas, vol.min_replicas
    );
    for node in nodes {
        let c = &node.config;
        let owner = vol.owner.as_ref().is_some_and(|o| {
            status.nodes.iter().any(|n| n.id == o.node && n.addresses.admin == c.listen.admin)
        });
        let pid = children.get(node.index).and_then(|c| c.as_ref()).map_or(0, Child::id);
        println!("  node {}{} (pid {pid}):", node.index + 1, if owner { ", the volume's owner" } else { "" });
        if let Some(nbd) = c.listen.nbd {
            println!("    nbd://{nbd}/{name}");
        }
        if let Some(path) = &c.listen.nbd_unix {
            println!("    {}", crate::run::nbd_unix_uri(&name, path));
        }
        if let Some(iscsi) = c.listen.iscsi {
            println!("    iscsi://{iscsi}/iqn.2026-11.io.basalt:{name}/0");
        }
        println!("    admin {}  log {}", c.listen.admin, node.dir.join("basaltd.log").display());
    }
    println!("  basalt --admin {admin} volume show {name}");
    println!("  basalt --admin {admin} cluster status");
    tracing::info!("demo cluster ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: stopping the nodes"); return Ok(()); }
            _ = term.recv() => { tracing::info!("SIGTERM: stopping the nodes"); return Ok(()); }
            _ = tick.tick() => {}
        }
        let mut alive = 0;
        for (k, slot) in children.iter_mut().enumerate() {
            if let Some(c) = slot {
                match c.try_wait() {
                    Ok(Some(status)) => {
                        tracing::warn!(node = k + 1, %status, config = %nodes[k].dir.join("basaltd.toml").display(),
                            "demo node exited; the others keep serving (restart it with basaltd run --config ...)");
                        *slot = None;
                    }
                    _ => alive += 1,
                }
            }
        }
        if alive == 0 {
            anyhow::bail!("every demo node has exited; see their logs");
        }
    }
}

/// Waits for the cluster to answer, then creates the volume unless it exists.
fn ensure_volume(admin: SocketAddr, volume: CreateVolume) -> anyhow::Result<VolumeInfo> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        match http_get::<VolumeInfo>(admin, &format!("/v1/volumes/{}", volume.name)) {
            Ok(v) => return Ok(v),
            Err(e) if e.starts_with("not_found") => {
                match ureq::post(&format!("http://{admin}/v1/volumes"))
                    .timeout(Duration::from_secs(10))
                    .send_json(&volume)
                {
                    Ok(r) => return Ok(r.into_json()?),
                    Err(ureq::Error::Status(_, r)) => {
                        last = r.into_json::<ApiError>().map(|e| e.message).unwrap_or_default();
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    anyhow::bail!("the demo cluster did not come up in 60 s (last: {last}); see the node logs")
}

/// Waits up to 60 s for every node's /readyz; a node still not ready then
/// is reported (its log says why) and the others are served anyway.
fn wait_ready(admins: &[SocketAddr]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for (k, admin) in admins.iter().enumerate() {
        loop {
            let url = format!("http://{admin}/readyz");
            if ureq::get(&url).timeout(Duration::from_secs(2)).call().is_ok() {
                break;
            }
            if Instant::now() > deadline {
                tracing::warn!(node = k + 1, %admin, "demo node not ready after 60 s; see its log");
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// SIGTERM to every live node, then SIGKILL after 30 s.
fn stop(children: &mut [Option<Child>]) {
    for c in children.iter().flatten() {
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for c in children.iter_mut().flatten() {
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !matches!(c.try_wait(), Ok(Some(_))) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_gives_distinct_ports_and_one_member_list() {
        let nodes = plan(Path::new("/d"), 3, &Config::default(), &UnixSocket::Default).unwrap();
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes[2].config.listen.peer.port(), 7402);
        assert_eq!(nodes[1].config.listen.nbd.unwrap().port(), 10810);
        assert_eq!(nodes[2].config.listen.admin.port(), 7482);
        assert_eq!(nodes[0].config.cluster.initial_members, nodes[2].config.cluster.initial_members);
        assert_eq!(nodes[0].config.cluster.voters, 3);
        assert_eq!(nodes[1].config.state_dir, PathBuf::from("/d/node2/state"));
        assert_eq!(nodes[2].config.listen.nbd_unix, Some(PathBuf::from("/d/node3/nbd.sock")));
        let named =
            plan(Path::new("/d"), 2, &Config::default(), &UnixSocket::Path("/r/n.sock".into())).unwrap();
        assert_eq!(named[1].config.listen.nbd_unix, Some(PathBuf::from("/r/n.sock.2")));
        let off = plan(Path::new("/d"), 2, &Config::default(), &UnixSocket::Off).unwrap();
        assert_eq!(off[0].config.listen.nbd_unix, None);
    }
}
