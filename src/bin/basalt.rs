//! `basalt`: the operator CLI, a client of the admin API.
//!
//! Exit status: 0 on success, 1 on an error (its message on stderr),
//! 2 on a usage error (clap's own). `volume verify` answers as cmp(1)
//! does: 0 if every replica matches, 1 if some differ, 2 if it could not
//! compare everything (a replica unreachable, or an error). `--json` prints the admin API's JSON
//! bodies (field names in README, kept stable); without it, aligned
//! tables for people.

use basalt::admin::{
    AddNode, ApiError, ClusterStatus, CreateVolume, NodeInfo, ResizeVolume, VolumeInfo, VolumeVerify,
};
use basalt::client::transfer::{Direction, Job, Options};
use basalt::units::ByteSize;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "basalt", version, about = "Basalt operator CLI (talks to a node's admin API)")]
struct Cli {
    /// Admin address of any node (metadata writes are forwarded to the leader).
    #[arg(long, global = true, env = "BASALT_ADMIN", default_value = "127.0.0.1:7480")]
    admin: String,
    /// Print JSON (the admin API's bodies) instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Answer from the node's local metadata without a round to the leader.
    #[arg(long, global = true)]
    stale: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The cluster as a whole.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Nodes of the cluster.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
}

#[derive(Debug, Subcommand)]
enum ClusterCmd {
    /// Cluster id, Raft leader and term, and every node with its addresses.
    Status,
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    /// Every node.
    List,
    /// One node.
    Show { id: u64 },
    /// Invite the node whose peer address is ADDR to join (it joins as a
    /// learner and is promoted to voter while the cluster lacks voters).
    Add { addr: SocketAddr },
    /// Remove a node that holds no replicas.
    Remove { id: u64 },
    /// Whether the node at --admin serves (its /readyz): exit 0 if ready,
    /// 1 with the reason if not.
    Ready,
}

#[derive(Debug, Subcommand)]
enum VolumeCmd {
    /// Create a volume.
    Create {
        name: String,
        /// Size: 10G, 512MiB, or bytes.
        #[arg(long)]
        size: ByteSize,
        /// Copies of every extent (default 3, or fewer on a smaller cluster).
        #[arg(long)]
        replicas: Option<u32>,
        /// Fewest copies a write may be acknowledged on (default: 2 of 3, 1 of 1).
        #[arg(long)]
        min_replicas: Option<u32>,
        #[arg(long)]
        stripe_unit: Option<ByteSize>,
        #[arg(long)]
        stripe_width: Option<u64>,
        #[arg(long)]
        extent_size: Option<ByteSize>,
        #[arg(long)]
        read_only: bool,
    },
    /// Every volume.
    List,
    /// One volume with its owner, every extent's replica set, epoch and
    /// state (healthy, or degraded: fewer members than the volume's
    /// replicas), and the counts of each. Text shows a volume of more
    /// than 16 extents as runs of alike extents; --json lists every one.
    Show {
        name: String,
        /// Refresh every 2 seconds until interrupted (with --json: one JSON
        /// document per line per refresh).
        #[arg(long)]
        watch: bool,
    },
    /// Delete a volume and its data.
    Delete { name: String },
    /// Compare every extent's replicas (their per-block crc32c tables) and
    /// list where they differ. Exit 0 if they all match, 1 if some differ,
    /// 2 if a replica could not be compared.
    Verify { name: String },
    /// Change a volume's size online. Growing is always allowed: the new
    /// space reads as zeros; new NBD connections see the new size
    /// (connected NBD clients keep the size of their handshake: NBD cannot
    /// tell them), and every connected iSCSI initiator gets a UNIT
    /// ATTENTION (CAPACITY DATA HAS CHANGED) on its next command. Shrinking
    /// needs --allow-shrink, goes through the volume's owner node, and is
    /// refused while any NBD client is connected to the volume; data past
    /// the new size is lost.
    Resize {
        name: String,
        /// New size: 20G, 512MiB, or bytes (a multiple of 4096).
        size: ByteSize,
        /// Allow a size below the current one.
        #[arg(long)]
        allow_shrink: bool,
    },
    /// Copy the raw image FILE into the volume over NBD. Sparse: file holes
    /// and zero blocks are not sent; the volume reads as the image after
    /// it (zeros past its end). A file larger than the volume is refused.
    Import {
        name: String,
        file: std::path::PathBuf,
        #[command(flatten)]
        io: TransferArgs,
    },
    /// Copy the volume into the raw image FILE (created or truncated; its
    /// length becomes the volume's). Holes in the volume stay holes.
    Export {
        name: String,
        file: std::path::PathBuf,
        #[command(flatten)]
        io: TransferArgs,
    },
}

#[derive(Debug, clap::Args)]
struct TransferArgs {
    /// NBD address (HOST:PORT) of the node to use; default: the volume's
    /// owner, as the admin API names it.
    #[arg(long)]
    nbd: Option<String>,
    /// Requests in flight.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    depth: u16,
    /// Largest request, e.g. 1MiB.
    #[arg(long, default_value = "1MiB")]
    chunk: ByteSize,
}

/// The NBD address that serves `volume`: its owner's, else the answering
/// node's.
fn nbd_address(c: &Client, volume: &str) -> Result<String, String> {
    let hint = |e: String| format!("{e}; or pass --nbd HOST:PORT");
    let v: VolumeInfo = c.get(&format!("/v1/volumes/{volume}")).map_err(hint)?;
    let s: ClusterStatus = c.get("/v1/cluster").map_err(hint)?;
    let nbd_of = |id: u64| s.nodes.iter().find(|n| n.id == id).and_then(|n| n.addresses.nbd);
    let owner = v.owner.map_or(s.this_node, |o| o.node);
    let addr = nbd_of(owner).or_else(|| nbd_of(s.this_node)).ok_or_else(|| {
        format!("no NBD address for volume {volume:?}: node {owner} serves no NBD (pass --nbd HOST:PORT)")
    })?;
    Ok(addr.to_string())
}

fn transfer(
    c: &Client,
    direction: Direction,
    name: String,
    file: std::path::PathBuf,
    io: TransferArgs,
    json: bool,
) -> Result<(), String> {
    let addr = match io.nbd {
        Some(a) => a,
        None => nbd_address(c, &name)?,
    };
    let chunk = u32::try_from(io.chunk.0).map_err(|_| "--chunk: at most 32MiB".to_string())?;
    let job = Job {
        direction,
        addr,
        volume: name,
        file,
        options: Options { depth: io.depth.into(), chunk },
        progress: !json,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    let rt = rt.map_err(|e| format!("starting the I/O runtime: {e}"))?;
    match rt.block_on(basalt::client::transfer::run(&job)) {
        Ok(s) if json => print_json(&s),
        Ok(s) => println!("{s}"),
        Err(f) => {
            let mut msg = basalt::client::chain(&f);
            if let Some(far) = f.how_far() {
                msg = format!("{msg}\nbasalt: {far}");
            }
            return Err(msg);
        }
    }
    Ok(())
}

struct Client {
    base: String,
    agent: ureq::Agent,
    stale: bool,
}

impl Client {
    fn new(admin: &str, stale: bool) -> Client {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(std::time::Duration::from_secs(5))
            .timeout(std::time::Duration::from_secs(60))
            .build();
        let base = if admin.starts_with("http://") { admin.to_string() } else { format!("http://{admin}") };
        Client { base, agent, stale }
    }

    fn url(&self, path: &str, read: bool) -> String {
        let q = if read && self.stale { "?stale=true" } else { "" };
        format!("{}{path}{q}", self.base)
    }

    fn answer<T: serde::de::DeserializeOwned>(
        &self,
        r: Result<ureq::Response, ureq::Error>,
    ) -> Result<T, String> {
        match r {
            Ok(resp) => {
                let text = resp.into_string().map_err(|e| format!("reading the answer: {e}"))?;
                let text = if text.is_empty() { "null".to_string() } else { text };
                serde_json::from_str(&text).map_err(|e| format!("unexpected answer from {}: {e}", self.base))
            }
            Err(ureq::Error::Status(code, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                Err(match serde_json::from_str::<ApiError>(&text) {
                    Ok(e) => e.message,
                    Err(_) => format!("HTTP {code}: {}", text.trim()),
                })
            }
            Err(e) => Err(format!(
                "cannot reach the admin API at {}: {e} (is basaltd running? set --admin or BASALT_ADMIN)",
                self.base
            )),
        }
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        self.answer(self.agent.get(&self.url(path, true)).call())
    }

    fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<T, String> {
        self.answer(self.agent.post(&self.url(path, false)).send_json(body))
    }

    fn delete(&self, path: &str) -> Result<(), String> {
        self.answer::<Option<()>>(self.agent.delete(&self.url(path, false)).call()).map(|_| ())
    }
}

/// Rows as columns padded to their widest cell; numbers right-aligned.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let numeric: Vec<bool> = (0..header.len())
        .map(|i| !rows.is_empty() && rows.iter().all(|r| r[i].parse::<f64>().is_ok()))
        .collect();
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| if numeric[i] { format!("{c:>0$}", w[i]) } else { format!("{c:<0$}", w[i]) })
            .collect();
        parts.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in &rows {
        out += &line(r.iter().map(String::as_str).collect());
    }
    out
}

/// Bytes for people: 252.0GiB, 16.0MiB, 512B.
fn human(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b}B") } else { format!("{v:.1}{}", units[u]) }
}

fn opt_addr(a: Option<SocketAddr>) -> String {
    a.map_or("-".into(), |a| a.to_string())
}

fn node_rows(nodes: &[NodeInfo], leader: Option<u64>) -> String {
    let rows = nodes
        .iter()
        .map(|n| {
            let role = if Some(n.id) == leader { format!("{} (leader)", n.role) } else { n.role.clone() };
            vec![
                n.id.to_string(),
                n.zone.clone(),
                n.state.clone(),
                role,
                human(n.capacity),
                human(n.used),
                n.pid.to_string(),
                n.addresses.peer.to_string(),
                opt_addr(n.addresses.nbd),
                opt_addr(n.addresses.iscsi),
                n.addresses.admin.to_string(),
            ]
        })
        .collect();
    table(&["ID", "ZONE", "STATE", "ROLE", "CAPACITY", "USED", "PID", "PEER", "NBD", "ISCSI", "ADMIN"], rows)
}

fn volume_rows(vols: &[VolumeInfo]) -> String {
    let rows = vols
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.id.to_string(),
                human(v.size),
                format!("{}/{}", v.min_replicas, v.replicas),
                ByteSize(v.extent_size).to_string(),
                format!("{}x{}", ByteSize(v.stripe_unit), v.stripe_width),
                v.owner.as_ref().map_or("-".into(), |o| format!("{} (gen {})", o.node, o.generation)),
                if v.read_only { "ro".into() } else { "rw".into() },
            ]
        })
        .collect();
    table(&["NAME", "ID", "SIZE", "MIN/R", "EXTENT", "STRIPE", "OWNER", "MODE"], rows)
}

/// A volume of more extents than this shows runs of alike extents (same
/// state and epoch) as one row in text; `--json` always lists each.
const SHOW_EACH_EXTENT: usize = 16;

/// Rows of the extent table: one per extent, or for a long volume one per
/// run of consecutive extents of the same state and epoch (a run of one
/// still shows its replica set; a longer run shows which nodes it spans).
fn extent_rows(v: &VolumeInfo) -> Vec<Vec<String>> {
    let extents = v.extents.as_deref().unwrap_or_default();
    let ids = |r: &[u64]| r.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    if extents.len() <= SHOW_EACH_EXTENT {
        return extents
            .iter()
            .map(|e| vec![e.index.to_string(), e.epoch.to_string(), e.state.clone(), ids(&e.replicas)])
            .collect();
    }
    let mut rows = Vec::new();
    for run in extents.chunk_by(|a, b| a.state == b.state && a.epoch == b.epoch) {
        let (first, last) = (&run[0], &run[run.len() - 1]);
        if run.len() == 1 {
            rows.push(vec![
                first.index.to_string(),
                first.epoch.to_string(),
                first.state.clone(),
                ids(&first.replicas),
            ]);
            continue;
        }
        let mut nodes: Vec<u64> = run.iter().flat_map(|e| e.replicas.iter().copied()).collect();
        nodes.sort_unstable();
        nodes.dedup();
        let mut sizes: Vec<usize> = run.iter().map(|e| e.replicas.len()).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let each = sizes.iter().map(usize::to_string).collect::<Vec<_>>().join("-");
        rows.push(vec![
            format!("{}-{}", first.index, last.index),
            first.epoch.to_string(),
            first.state.clone(),
            format!("{each} each, over nodes {}", ids(&nodes)),
        ]);
    }
    rows
}

fn show_volume(v: &VolumeInfo, json: bool) {
    if json {
        return print_json(v);
    }
    print!("{}", volume_rows(std::slice::from_ref(v)));
    println!();
    if let Some(h) = &v.health {
        println!(
            "{}: {} extents of {}, {} healthy, {} degraded (fewer than {} replicas)",
            h.state,
            h.healthy + h.degraded,
            ByteSize(v.extent_size),
            h.healthy,
            h.degraded,
            v.replicas
        );
    }
    print!("{}", table(&["EXTENT", "EPOCH", "STATE", "REPLICAS"], extent_rows(v)));
}

fn show_verify(v: &VolumeVerify) {
    println!(
        "volume {} (id {}): {} extents, {} with replicas that differ, {} not fully compared",
        v.name,
        v.id,
        v.extents.len(),
        v.mismatched,
        v.incomplete
    );
    let rows = v
        .extents
        .iter()
        .map(|e| {
            let set: Vec<String> = e.replicas.iter().map(u64::to_string).collect();
            let mut result = Vec::new();
            if e.mismatched_blocks > 0 {
                let ranges: Vec<String> =
                    e.mismatches.iter().map(|r| format!("{}+{}", r.offset, r.len)).collect();
                let more = if e.mismatched_blocks > e.mismatches.iter().map(|r| r.len / 4096).sum::<u64>() {
                    " ..."
                } else {
                    ""
                };
                result.push(format!("{} blocks differ at {}{more}", e.mismatched_blocks, ranges.join(" ")));
            }
            for u in &e.unreachable {
                result.push(format!("node {} not compared: {}", u.node, u.error));
            }
            if result.is_empty() {
                result.push("match".into());
            }
            vec![e.index.to_string(), e.epoch.to_string(), set.join(","), result.join("; ")]
        })
        .collect();
    print!("{}", table(&["EXTENT", "EPOCH", "REPLICAS", "RESULT"], rows));
}

/// `volume verify`: its own exit status (see the module docs).
fn verify(c: &Client, name: &str, json: bool) -> ExitCode {
    let v: VolumeVerify = match c.post(&format!("/v1/volumes/{name}/verify"), &serde_json::json!({})) {
        Ok(v) => v,
        Err(msg) => {
            eprintln!("basalt: {msg}");
            return ExitCode::from(2);
        }
    };
    if json {
        print_json(&v);
    } else {
        show_verify(&v);
    }
    if v.incomplete > 0 {
        ExitCode::from(2)
    } else if v.mismatched > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("admin bodies serialize"));
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    let c = Client::new(&cli.admin, cli.stale);
    match cli.cmd {
        Cmd::Volume(VolumeCmd::Verify { name }) => return Ok(verify(&c, &name, cli.json)),
        Cmd::Cluster(ClusterCmd::Status) => {
            let s: ClusterStatus = c.get("/v1/cluster")?;
            if cli.json {
                print_json(&s);
            } else {
                let leader = s.leader.map_or("none".into(), |l| l.to_string());
                println!(
                    "cluster {} ({}), leader {leader}, term {}, commit {}, applied {} (on node {})",
                    s.id, s.name, s.term, s.commit_index, s.applied_index, s.this_node
                );
                print!("{}", node_rows(&s.nodes, s.leader));
            }
        }
        Cmd::Node(NodeCmd::List) => {
            let s: ClusterStatus = c.get("/v1/cluster")?;
            if cli.json { print_json(&s.nodes) } else { print!("{}", node_rows(&s.nodes, s.leader)) }
        }
        Cmd::Node(NodeCmd::Show { id }) => {
            let n: NodeInfo = c.get(&format!("/v1/nodes/{id}"))?;
            if cli.json { print_json(&n) } else { print!("{}", node_rows(&[n], None)) }
        }
        Cmd::Node(NodeCmd::Add { addr }) => {
            let n: NodeInfo = c.post("/v1/nodes", &AddNode { peer: addr })?;
            if cli.json { print_json(&n) } else { print!("{}", node_rows(&[n], None)) }
        }
        Cmd::Node(NodeCmd::Ready) => {
            let url = c.url("/readyz", false);
            match c.agent.get(&url).call() {
                Ok(r) => print!("{}", r.into_string().unwrap_or_default()),
                Err(ureq::Error::Status(_, r)) => {
                    return Err(r.into_string().unwrap_or_default().trim().to_string());
                }
                Err(e) => return Err(format!("cannot reach the admin API at {}: {e}", c.base)),
            }
        }
        Cmd::Node(NodeCmd::Remove { id }) => {
            c.delete(&format!("/v1/nodes/{id}"))?;
            if cli.json {
                print_json(&serde_json::json!({"removed": id}))
            } else {
                println!("removed node {id}")
            }
        }
        Cmd::Volume(VolumeCmd::Create {
            name,
            size,
            replicas,
            min_replicas,
            stripe_unit,
            stripe_width,
            extent_size,
            read_only,
        }) => {
            let req = CreateVolume {
                name,
                size: size.0,
                replicas,
                min_replicas,
                extent_size: extent_size.map(|s| s.0),
                stripe_unit: stripe_unit.map(|s| s.0),
                stripe_width,
                read_only,
            };
            let v: VolumeInfo = c.post("/v1/volumes", &req)?;
            if cli.json { print_json(&v) } else { print!("{}", volume_rows(&[v])) }
        }
        Cmd::Volume(VolumeCmd::List) => {
            let v: Vec<VolumeInfo> = c.get("/v1/volumes")?;
            if cli.json { print_json(&v) } else { print!("{}", volume_rows(&v)) }
        }
        Cmd::Volume(VolumeCmd::Show { name, watch }) => loop {
            let v: VolumeInfo = c.get(&format!("/v1/volumes/{name}"))?;
            if watch && cli.json {
                println!("{}", serde_json::to_string(&v).expect("admin bodies serialize"));
            } else {
                if watch && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                    // Clear the screen and home the cursor, as watch(1) does.
                    print!("\x1b[2J\x1b[H");
                }
                show_volume(&v, cli.json);
            }
            if !watch {
                break;
            }
            std::thread::sleep(std::time::Duration::from_secs(2));
        },
        Cmd::Volume(VolumeCmd::Delete { name }) => {
            c.delete(&format!("/v1/volumes/{name}"))?;
            if cli.json {
                print_json(&serde_json::json!({"deleted": name}))
            } else {
                println!("deleted volume {name}")
            }
        }
        Cmd::Volume(VolumeCmd::Resize { name, size, allow_shrink }) => {
            let req = ResizeVolume { size: size.0, allow_shrink };
            let v: VolumeInfo = c.post(&format!("/v1/volumes/{name}/resize"), &req)?;
            if cli.json { print_json(&v) } else { print!("{}", volume_rows(&[v])) }
        }
        Cmd::Volume(VolumeCmd::Import { name, file, io }) => {
            transfer(&c, Direction::Import, name, file, io, cli.json)?
        }
        Cmd::Volume(VolumeCmd::Export { name, file, io }) => {
            transfer(&c, Direction::Export, name, file, io, cli.json)?
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("basalt: {msg}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt::admin::{ExtentInfo, VolumeHealth};

    fn volume(extents: Vec<ExtentInfo>) -> VolumeInfo {
        VolumeInfo {
            id: 1,
            name: "v".into(),
            size: extents.len() as u64 * (16 << 20),
            replicas: 3,
            min_replicas: 2,
            extent_size: 16 << 20,
            stripe_unit: 16 << 20,
            stripe_width: 1,
            read_only: false,
            owner: None,
            health: Some(VolumeHealth::of(&extents)),
            extents: Some(extents),
        }
    }

    fn extent(index: u64, epoch: u64, replicas: &[u64]) -> ExtentInfo {
        let state = if replicas.len() < 3 { ExtentInfo::DEGRADED } else { ExtentInfo::HEALTHY };
        ExtentInfo { index, epoch, replicas: replicas.to_vec(), state: state.into() }
    }

    #[test]
    fn a_short_volume_lists_every_extent() {
        let v = volume(vec![extent(0, 0, &[1, 2, 3]), extent(1, 2, &[3, 1])]);
        let rows = extent_rows(&v);
        assert_eq!(rows, vec![vec!["0", "0", "healthy", "1,2,3"], vec!["1", "2", "degraded", "3,1"]]);
        assert_eq!(v.health.unwrap(), VolumeHealth { state: "degraded".into(), healthy: 1, degraded: 1 });
    }

    #[test]
    fn a_long_volume_collapses_runs_of_alike_extents() {
        let mut e: Vec<ExtentInfo> =
            (0..40).map(|i| extent(i, 0, &[i % 4 + 1, (i + 1) % 4 + 1, 9])).collect();
        e[17] = extent(17, 1, &[2, 9]);
        e[18] = extent(18, 1, &[3, 9]);
        let rows = extent_rows(&volume(e));
        assert_eq!(
            rows,
            vec![
                vec!["0-16", "0", "healthy", "3 each, over nodes 1,2,3,4,9"],
                vec!["17-18", "1", "degraded", "2 each, over nodes 2,3,9"],
                vec!["19-39", "0", "healthy", "3 each, over nodes 1,2,3,4,9"],
            ]
        );
        let one = extent_rows(&volume((0..20).map(|i| extent(i, i % 2, &[1, 2, 3])).collect()));
        assert_eq!(one.len(), 20, "runs of one show their sets");
        assert_eq!(one[1], vec!["1", "1", "healthy", "1,2,3"]);
    }
}
