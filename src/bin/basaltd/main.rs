//! `basaltd`: the Basalt node daemon.

mod control;
mod replicas;
mod run;
mod supervise;
mod verify;

use anyhow::Context;
use basalt::config::Config;
use basalt::layout::Layout;
use basalt::node::VolumeOptions;
use basalt::storage::{EngineKind, FlushBarrier};
use basalt::units::ByteSize;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

/// mimalloc instead of glibc's malloc: the data path allocates and frees
/// small buffers and futures per request from several threads, and glibc's
/// arenas spent their time consolidating and unlinking chunks.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "basaltd", version, about = "Basalt block storage node daemon")]
struct Cli {
    /// Async runtime worker threads. Default: half the CPUs (at least 1),
    /// leaving the rest to the kernel's network and disk completion work
    /// and to clients on the same host.
    #[arg(long, global = true)]
    workers: Option<usize>,
    /// After client activity, keep a worker polling for up to this many
    /// microseconds before it sleeps (adaptive; an idle daemon does not
    /// poll). Cuts latency at low queue depth, most on virtual machines,
    /// where waking a sleeping CPU is slow; costs CPU while clients are
    /// active. 0 turns it off.
    #[arg(long, global = true, default_value_t = 200)]
    idle_poll_us: u64,
    /// Log line format on stderr (filters: RUST_LOG syntax, in $RUST_LOG or
    /// the config's log_filter; SIGHUP re-reads the config's).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a demo cluster with one volume and serve it over NBD and iSCSI: no setup needed.
    Demo(Box<DemoArgs>),
    /// Run a node from its configuration file.
    Run {
        /// The TOML configuration (README "Configuration" lists every field).
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the effective configuration (defaults filled in), or the first
    /// error; exits non-zero on an error.
    CheckConfig { file: PathBuf },
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// Data directory; repeat for one per disk. Data persists across restarts.
    #[arg(long = "data", default_value = "./basalt-demo")]
    data: Vec<PathBuf>,
    /// NBD listen address.
    #[arg(long, default_value = "127.0.0.1:10809")]
    nbd: SocketAddr,
    /// NBD on a unix socket at PATH, for clients on this host
    /// (`nbd+unix:///NAME?socket=PATH`); "off" to disable. Default:
    /// DATA/nbd.sock, or DATA/nodeK/nbd.sock with several nodes (an
    /// explicit PATH then gives node K the path PATH.K).
    #[arg(long, value_name = "PATH")]
    nbd_unix: Option<String>,
    /// iSCSI listen address ("off" to disable).
    #[arg(long, default_value = "127.0.0.1:3260")]
    iscsi: String,
    /// Name of the volume to create (if missing) and export.
    #[arg(long, default_value = "demo")]
    volume: String,
    /// Volume size: 512M, 1G, 1GiB or plain bytes.
    #[arg(long, default_value = "1GiB")]
    size: ByteSize,
    /// Nodes in the demo cluster, each its own process (node k listens on
    /// every base port + k - 1 and keeps its files under DATA/nodeK). With
    /// `--nodes 1` the node runs inside this process: the single-node slice.
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    /// Copies of every extent of the volume (when creating it). Default: 3,
    /// or --nodes if there are fewer.
    #[arg(long)]
    replicas: Option<u32>,
    /// Admin API (HTTP) listen address; `basalt` talks to it.
    #[arg(long, default_value = "127.0.0.1:7480")]
    admin: SocketAddr,
    /// Peer protocol listen address (Raft, replication).
    #[arg(long, default_value = "127.0.0.1:7400")]
    peer: SocketAddr,
    /// Disk I/O engine.
    #[arg(long, value_enum, default_value_t = EngineKind::Auto)]
    engine: EngineKind,
    /// Memory for client READ/WRITE data in flight, over all NBD and iSCSI
    /// connections (at least 32MiB, the largest request). Past it, clients
    /// wait: their connections stop being read.
    #[arg(long, default_value = "1GiB")]
    payload_budget: ByteSize,
    /// How a FLUSH covering several extent files of one data directory
    /// makes them durable: one fdatasync per file, one syncfs of the
    /// filesystem (plus one fdatasync), or whichever has been cheaper lately.
    #[arg(long, value_enum, default_value_t = FlushBarrier::Auto)]
    flush_barrier: FlushBarrier,
    /// Extent size (power of two, at least 1MiB).
    #[arg(long, default_value = "256MiB")]
    extent_size: ByteSize,
    /// Export the volume read-only (when creating it).
    #[arg(long)]
    read_only: bool,
    /// iSCSI: require one-way CHAP with this initiator user name.
    #[arg(long, requires = "chap_secret")]
    chap_user: Option<String>,
    /// iSCSI: the initiator's CHAP secret (12 bytes or more).
    #[arg(long, requires = "chap_user")]
    chap_secret: Option<String>,
    /// iSCSI: the name the target answers mutual CHAP with.
    #[arg(long, requires_all = ["chap_mutual_secret", "chap_user"])]
    chap_mutual_user: Option<String>,
    /// iSCSI: the target's secret for mutual CHAP (12 bytes or more).
    #[arg(long, requires = "chap_mutual_user")]
    chap_mutual_secret: Option<String>,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines (colour only at a terminal).
    Text,
    /// One JSON object per line, with the fields of every enclosing span
    /// (node, volume, connection).
    Json,
}

/// Changes the log filter of a running daemon (SIGHUP).
pub type LogReload =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

fn init_logging(format: LogFormat) -> LogReload {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    // Colour codes only for a person at a terminal, never into log files.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    handle
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let log_reload = init_logging(cli.log_format);
    if let Cmd::CheckConfig { file } = &cli.cmd {
        let cfg = load_config(file)?;
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    // Measured on 2 CPUs (scripts/bench, 4 KiB random I/O at QD32): one
    // worker doubles IOPS over two, which spend their time stealing and
    // waking each other and compete with the kernel for the CPUs.
    let workers =
        cli.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() / 2).max(1));
    if workers == 0 {
        anyhow::bail!("--workers must be at least 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()?;
    {
        let _in_runtime = rt.enter();
        basalt::poll::install(std::time::Duration::from_micros(cli.idle_poll_us));
    }
    match cli.cmd {
        Cmd::Demo(args) => {
            // The nodes of a multi-node demo wait the way this process was told to.
            let mut node_args = vec![format!("--idle-poll-us={}", cli.idle_poll_us)];
            node_args.extend(cli.workers.map(|w| format!("--workers={w}")));
            rt.block_on(demo(*args, node_args))
        }
        Cmd::Run { config } => {
            let cfg = load_config(&config)?;
            let opts = run::RunOptions {
                config_path: Some(config),
                log_reload: Some(log_reload),
                ..Default::default()
            };
            rt.block_on(run::run(cfg, opts))
        }
        Cmd::CheckConfig { .. } => unreachable!("handled before the runtime starts"),
    }
}

fn load_config(path: &std::path::Path) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg =
        Config::from_toml(&text).with_context(|| format!("{}: not a valid configuration", path.display()))?;
    cfg.validate().with_context(|| format!("{}", path.display()))?;
    Ok(cfg)
}

async fn demo(args: DemoArgs, node_args: Vec<String>) -> anyhow::Result<()> {
    if args.nodes == 0 || args.nodes > 9 {
        anyhow::bail!("--nodes {}: from 1 to 9", args.nodes);
    }
    let replicas = args.replicas.unwrap_or(args.nodes.min(3));
    if replicas == 0 || replicas > args.nodes {
        anyhow::bail!("--replicas {replicas}: from 1 to --nodes ({})", args.nodes);
    }
    let iscsi = match args.iscsi.as_str() {
        "off" | "" => None,
        a => Some(a.parse::<SocketAddr>().with_context(|| format!("--iscsi {a}"))?),
    };
    let root = args.data[0].clone();
    let unix = match args.nbd_unix.as_deref() {
        Some("off" | "") => supervise::UnixSocket::Off,
        Some(p) => supervise::UnixSocket::Path(PathBuf::from(p)),
        None => supervise::UnixSocket::Default,
    };
    // The node's state (identity, Raft store) sits in one of its data
    // directories: the one that has it already, whatever the --data order.
    let state_dir = args
        .data
        .iter()
        .map(|d| d.join("state"))
        .find(|s| s.join("node.json").exists())
        .unwrap_or_else(|| root.join("state"));
    let mut base = Config {
        state_dir,
        data_dirs: args.data.clone(),
        engine: args.engine,
        flush_barrier: args.flush_barrier,
        payload_budget: args.payload_budget,
        zone: "zone1".into(),
        ..Config::default()
    };
    if base.state_dir.is_relative() && !base.state_dir.starts_with(".") {
        base.state_dir = std::path::Path::new(".").join(&base.state_dir);
    }
    base.listen.nbd = Some(args.nbd);
    base.listen.iscsi = iscsi;
    base.listen.admin = args.admin;
    base.listen.peer = args.peer;
    base.cluster.initial_members = vec![args.peer];
    base.cluster.voters = 1;
    base.iscsi.chap_user = args.chap_user.clone();
    base.iscsi.chap_secret = args.chap_secret.clone();
    base.iscsi.chap_mutual_user = args.chap_mutual_user.clone();
    base.iscsi.chap_mutual_secret = args.chap_mutual_secret.clone();
    let layout = Layout::contiguous(args.extent_size.0).context("--extent-size")?;
    let min_replicas = if replicas >= 3 { 2 } else { 1 };
    if args.nodes == 1 {
        base.listen.nbd_unix = match unix {
            supervise::UnixSocket::Off => None,
            supervise::UnixSocket::Path(p) => Some(p),
            supervise::UnixSocket::Default => Some(root.join("nbd.sock")),
        };
        base.validate().context("demo configuration")?;
        let demo = run::DemoVolume {
            name: args.volume.clone(),
            opts: VolumeOptions {
                size: args.size.0,
                layout,
                replicas,
                min_replicas,
                read_only: args.read_only,
            },
        };
        return run::run(base, run::RunOptions { demo: Some(demo), ..Default::default() }).await;
    }
    let volume = basalt::admin::CreateVolume {
        name: args.volume.clone(),
        size: args.size.0,
        replicas: Some(replicas),
        min_replicas: Some(min_replicas),
        extent_size: Some(layout.extent_size),
        stripe_unit: Some(layout.stripe_unit),
        stripe_width: Some(layout.stripe_width),
        read_only: args.read_only,
    };
    supervise::run(&root, args.nodes as usize, &base, &unix, node_args, volume).await
}
