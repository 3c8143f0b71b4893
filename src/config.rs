//! Daemon configuration: the TOML file `basaltd run --config FILE` reads.
//!
//! Owns: the file's shape, every default, and the one `validate()` that
//! names the bad field and why. It never opens files or sockets: the
//! daemon does that with the validated result. Every field is documented
//! in README ("Configuration"); `basaltd check-config FILE` prints the
//! effective configuration (defaults filled in) or the first error.

use crate::storage::{EngineKind, FlushBarrier};
use crate::units::ByteSize;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Configuration of one `basaltd`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Checked against the persisted node id when set; generated on first
    /// start (and persisted in `state_dir` and every data directory) when not.
    pub node_id: Option<u64>,
    /// A label every member shares; a peer of another cluster name is refused.
    pub cluster_name: String,
    /// Node identity and the Raft metadata store. Needed by every node,
    /// including compute nodes without data directories.
    pub state_dir: PathBuf,
    /// One directory per disk for extent replicas. Empty: the node stores
    /// nothing but can own and serve volumes (a compute host).
    pub data_dirs: Vec<PathBuf>,
    /// Failure domain label: replicas of an extent go to distinct zones
    /// whenever the cluster has at least as many zones as replicas.
    pub zone: String,
    /// Capacity this node offers for placement. Default: the free space of
    /// its data directories at start.
    pub capacity: Option<ByteSize>,
    pub engine: EngineKind,
    pub flush_barrier: FlushBarrier,
    /// Memory for client READ/WRITE data in flight over all connections.
    pub payload_budget: ByteSize,
    /// Log filter in RUST_LOG syntax (`info`, `basalt=debug,info`);
    /// `$RUST_LOG` wins at start; SIGHUP re-reads this field.
    pub log_filter: Option<String>,
    pub iscsi: IscsiConfig,
    pub listen: Listen,
    pub cluster: ClusterConfig,
    pub raft: RaftConfig,
    pub liveness: LivenessConfig,
    pub peer: PeerConfig,
}

/// iSCSI target settings. CHAP is off unless `chap_user` is set.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IscsiConfig {
    /// One-way CHAP: the initiator's user name...
    pub chap_user: Option<String>,
    /// ...and its secret (12 bytes or more).
    pub chap_secret: Option<String>,
    /// Mutual CHAP: the name the target answers with...
    pub chap_mutual_user: Option<String>,
    /// ...and the target's secret.
    pub chap_mutual_secret: Option<String>,
}

/// Where the node listens. The same addresses are advertised to the other
/// nodes and to clients, so they must be reachable (not 0.0.0.0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Peer protocol: Raft and (later) replication traffic.
    pub peer: SocketAddr,
    /// NBD; `None` (omit, or "off") disables it.
    #[serde(with = "opt_addr")]
    pub nbd: Option<SocketAddr>,
    /// NBD on a unix socket at this path, for clients on the same host
    /// (`nbd+unix:///NAME?socket=PATH`); omit to disable. Created with
    /// permissions 0660; a stale socket file from a crashed run is
    /// replaced, any other file there is refused; removed at shutdown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_unix: Option<PathBuf>,
    /// iSCSI; `None` (omit, or "off") disables it.
    #[serde(with = "opt_addr")]
    pub iscsi: Option<SocketAddr>,
    /// Admin API (HTTP/JSON) used by the `basalt` CLI.
    pub admin: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Peer addresses of the initial members. The first start of the node
    /// listed first creates the cluster (once: its id is persisted); the
    /// others join it. Empty with no `join`: the node waits for
    /// `basalt node add` to invite it.
    pub initial_members: Vec<SocketAddr>,
    /// Peer address of any member of a running cluster to join.
    pub join: Option<SocketAddr>,
    /// Raft voters the cluster keeps (1, 3 or 5); joining nodes are
    /// promoted from learner while there are fewer.
    pub voters: u8,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Length of one Raft tick.
    pub tick_ms: u64,
    /// Ticks without a leader before a follower stands for election.
    pub election_ticks: usize,
    /// Ticks between the leader's heartbeats (less than election_ticks).
    pub heartbeat_ticks: usize,
    /// Applied entries between snapshots (log compaction).
    pub snapshot_entries: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LivenessConfig {
    /// How often this node tells the leader it is alive.
    pub heartbeat_ms: u64,
    /// Silence after which the leader commits a node as down.
    pub down_after_ms: u64,
}

/// Limits of the peer port against slow or hostile peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeerConfig {
    /// Memory for partly received peer frames over all connections.
    pub assembly_budget: ByteSize,
    /// A large frame must be complete (and handed on) this long after its
    /// header, else its connection is closed.
    pub frame_timeout_ms: u64,
    /// Connections that have not finished their handshake, at most.
    pub max_handshaking: usize,
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig { assembly_budget: ByteSize(256 << 20), frame_timeout_ms: 30_000, max_handshaking: 64 }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: None,
            cluster_name: "basalt".into(),
            state_dir: "/var/lib/basalt".into(),
            data_dirs: vec!["/var/lib/basalt/data".into()],
            zone: "default".into(),
            capacity: None,
            engine: EngineKind::Auto,
            flush_barrier: FlushBarrier::Auto,
            payload_budget: ByteSize(crate::node::DEFAULT_PAYLOAD_BUDGET),
            log_filter: None,
            iscsi: IscsiConfig::default(),
            listen: Listen::default(),
            cluster: ClusterConfig::default(),
            raft: RaftConfig::default(),
            liveness: LivenessConfig::default(),
            peer: PeerConfig::default(),
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            peer: ([127, 0, 0, 1], 7400).into(),
            nbd: Some(([127, 0, 0, 1], 10809).into()),
            nbd_unix: None,
            iscsi: Some(([127, 0, 0, 1], 3260).into()),
            admin: ([127, 0, 0, 1], 7480).into(),
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig { initial_members: Vec::new(), join: None, voters: 3 }
    }
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig { tick_ms: 100, election_ticks: 10, heartbeat_ticks: 2, snapshot_entries: 1000 }
    }
}

impl Default for LivenessConfig {
    fn default() -> Self {
        LivenessConfig { heartbeat_ms: 500, down_after_ms: 5000 }
    }
}

/// The first bad field of a configuration, and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("node_id: 0 is reserved; omit the field to have one generated")]
    ZeroNodeId,
    #[error("cluster_name: {0:?} must be 1-64 of [A-Za-z0-9._-]")]
    ClusterName(String),
    #[error("state_dir: must be an absolute path or start with ./ (got {0:?})")]
    StateDir(String),
    #[error("data_dirs: {0} is listed twice")]
    DuplicateDataDir(String),
    #[error("data_dirs: {0} is the state_dir; give extents a directory of their own")]
    DataDirIsStateDir(String),
    #[error("zone: {0:?} must be 1-64 of [A-Za-z0-9._-]")]
    Zone(String),
    #[error("log_filter: {0}")]
    LogFilter(String),
    #[error(
        "iscsi: chap_user and chap_secret go together, and mutual CHAP needs both of its fields and one-way CHAP"
    )]
    Chap,
    #[error("capacity: must be at least 1GiB when set (got {0})")]
    Capacity(ByteSize),
    #[error("payload_budget: must be at least 32MiB, the largest request (got {0})")]
    PayloadBudget(ByteSize),
    #[error("peer.assembly_budget: must be at least 33MiB, the largest peer frame (got {0})")]
    PeerAssemblyBudget(ByteSize),
    #[error("peer.frame_timeout_ms: must be 100 to 3600000 (got {0})")]
    PeerFrameTimeout(u64),
    #[error("peer.max_handshaking: must be 1 to 65536 (got {0})")]
    PeerMaxHandshaking(usize),
    #[error("listen.{field}: {addr} is unspecified; listen on an address the other nodes can reach")]
    Unspecified { field: &'static str, addr: SocketAddr },
    #[error("listen.{a} and listen.{b} are both {addr}")]
    SameListenAddr { a: &'static str, b: &'static str, addr: SocketAddr },
    #[error("listen.nbd_unix: {path:?} {why}")]
    NbdUnix { path: String, why: &'static str },
    #[error("cluster.voters: must be 1, 3 or 5 (got {0})")]
    Voters(u8),
    #[error("cluster.initial_members: {0} is listed twice")]
    DuplicateMember(SocketAddr),
    #[error("cluster.initial_members: this node's listen.peer {0} is not among them")]
    NotAMember(SocketAddr),
    #[error("cluster.join: give initial_members or join, not both")]
    JoinAndMembers,
    #[error("raft.tick_ms: must be from 1 to 10000 (got {0})")]
    TickMs(u64),
    #[error("raft.heartbeat_ticks: must be at least 1 and less than raft.election_ticks ({h} >= {e})")]
    HeartbeatTicks { h: usize, e: usize },
    #[error("raft.snapshot_entries: must be at least 10 (got {0})")]
    SnapshotEntries(u64),
    #[error("liveness.down_after_ms: must be at least 3x liveness.heartbeat_ms ({down} < 3 * {hb})")]
    DownAfter { down: u64, hb: u64 },
    #[error(
        "liveness.down_after_ms: must be longer than an election timeout, raft.tick_ms * raft.election_ticks \
         ({down} ms is not above {tick} ms * {election}); a node would be committed down before a new leader could be elected"
    )]
    DownAfterElection { down: u64, tick: u64, election: usize },
    #[error("liveness.heartbeat_ms: must be at least 10 (got {0})")]
    HeartbeatMs(u64),
}

/// The longest path a unix socket can bind (`sun_path` less its NUL).
pub const MAX_UNIX_PATH: usize = 107;

fn valid_label(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

impl Config {
    /// Parses a TOML document; unknown fields are errors (a typo must not
    /// silently fall back to a default).
    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    /// The effective configuration as TOML, defaults filled in.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a Config always serializes")
    }

    /// Names the first bad field and why.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == Some(0) {
            return Err(ConfigError::ZeroNodeId);
        }
        if !valid_label(&self.cluster_name) {
            return Err(ConfigError::ClusterName(self.cluster_name.clone()));
        }
        let sd = self.state_dir.to_string_lossy();
        if sd.is_empty() || !(self.state_dir.is_absolute() || sd.starts_with("./")) {
            return Err(ConfigError::StateDir(sd.into_owned()));
        }
        for (i, d) in self.data_dirs.iter().enumerate() {
            if self.data_dirs[..i].contains(d) {
                return Err(ConfigError::DuplicateDataDir(d.display().to_string()));
            }
            if *d == self.state_dir {
                return Err(ConfigError::DataDirIsStateDir(d.display().to_string()));
            }
        }
        if !valid_label(&self.zone) {
            return Err(ConfigError::Zone(self.zone.clone()));
        }
        if let Some(f) = &self.log_filter
            && let Err(e) = tracing_subscriber::EnvFilter::try_new(f)
        {
            return Err(ConfigError::LogFilter(e.to_string()));
        }
        let i = &self.iscsi;
        if i.chap_user.is_some() != i.chap_secret.is_some()
            || i.chap_mutual_user.is_some() != i.chap_mutual_secret.is_some()
            || (i.chap_mutual_user.is_some() && i.chap_user.is_none())
        {
            return Err(ConfigError::Chap);
        }
        if let Some(c) = self.capacity
            && c.0 < 1 << 30
        {
            return Err(ConfigError::Capacity(c));
        }
        if self.payload_budget.0 < crate::node::volume::MAX_PAYLOAD {
            return Err(ConfigError::PayloadBudget(self.payload_budget));
        }
        let addrs: [(&'static str, Option<SocketAddr>); 4] = [
            ("peer", Some(self.listen.peer)),
            ("nbd", self.listen.nbd),
            ("iscsi", self.listen.iscsi),
            ("admin", Some(self.listen.admin)),
        ];
        for (i, (field, addr)) in addrs.iter().enumerate() {
            let Some(addr) = *addr else { continue };
            if addr.ip().is_unspecified() {
                return Err(ConfigError::Unspecified { field, addr });
            }
            for (other, o) in &addrs[..i] {
                if *o == Some(addr) {
                    return Err(ConfigError::SameListenAddr { a: other, b: field, addr });
                }
            }
        }
        if let Some(p) = &self.listen.nbd_unix {
            let path = p.display().to_string();
            let bytes = p.as_os_str().len();
            // sun_path holds 108 bytes, the terminating NUL included.
            let why = if bytes == 0 {
                Some("is empty")
            } else if bytes > MAX_UNIX_PATH {
                Some("is longer than the 107 bytes a unix socket path can have")
            } else if path.ends_with('/') {
                Some("names a directory; give the socket file's path")
            } else if self.data_dirs.contains(p) || *p == self.state_dir {
                Some("is a data or state directory; give the socket file's path")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(ConfigError::NbdUnix { path, why });
            }
        }
        if ![1, 3, 5].contains(&self.cluster.voters) {
            return Err(ConfigError::Voters(self.cluster.voters));
        }
        let members = &self.cluster.initial_members;
        for (i, m) in members.iter().enumerate() {
            if members[..i].contains(m) {
                return Err(ConfigError::DuplicateMember(*m));
            }
        }
        if !members.is_empty() && !members.contains(&self.listen.peer) {
            return Err(ConfigError::NotAMember(self.listen.peer));
        }
        if !members.is_empty() && self.cluster.join.is_some() {
            return Err(ConfigError::JoinAndMembers);
        }
        if !(1..=10_000).contains(&self.raft.tick_ms) {
            return Err(ConfigError::TickMs(self.raft.tick_ms));
        }
        let (h, e) = (self.raft.heartbeat_ticks, self.raft.election_ticks);
        if h == 0 || h >= e {
            return Err(ConfigError::HeartbeatTicks { h, e });
        }
        if self.raft.snapshot_entries < 10 {
            return Err(ConfigError::SnapshotEntries(self.raft.snapshot_entries));
        }
        if self.liveness.heartbeat_ms < 10 {
            return Err(ConfigError::HeartbeatMs(self.liveness.heartbeat_ms));
        }
        let (down, hb) = (self.liveness.down_after_ms, self.liveness.heartbeat_ms);
        if down < hb.saturating_mul(3) {
            return Err(ConfigError::DownAfter { down, hb });
        }
        // The meta group counts liveness in whole ticks and needs more of
        // them than an election takes (a leader change must not look like
        // every node falling silent).
        let (tick, election) = (self.raft.tick_ms, self.raft.election_ticks);
        if down / tick <= election as u64 {
            return Err(ConfigError::DownAfterElection { down, tick, election });
        }
        if self.peer.assembly_budget.0 < crate::proto::peer::MAX_FRAME as u64 {
            return Err(ConfigError::PeerAssemblyBudget(self.peer.assembly_budget));
        }
        if !(100..=3_600_000).contains(&self.peer.frame_timeout_ms) {
            return Err(ConfigError::PeerFrameTimeout(self.peer.frame_timeout_ms));
        }
        if !(1..=65536).contains(&self.peer.max_handshaking) {
            return Err(ConfigError::PeerMaxHandshaking(self.peer.max_handshaking));
        }
        Ok(())
    }
}

/// `Option<SocketAddr>` as a string, with "off" (or absence) for `None`.
mod opt_addr {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::net::SocketAddr;

    pub fn serialize<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(a) => s.serialize_str(&a.to_string()),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "off" | "" => Ok(None),
            a => a.parse().map(Some).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        Config { state_dir: "/s".into(), data_dirs: vec!["/a".into()], ..Config::default() }
    }

    fn err(f: impl FnOnce(&mut Config)) -> ConfigError {
        let mut c = base();
        f(&mut c);
        c.validate().unwrap_err()
    }

    #[test]
    fn defaults_are_valid_and_round_trip() {
        assert_eq!(Config::default().validate(), Ok(()));
        let c = base();
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn parses_a_full_file() {
        let c = Config::from_toml(
            r#"
            cluster_name = "prod"
            state_dir = "/var/lib/basalt"
            data_dirs = ["/d1", "/d2"]
            zone = "rack1"
            capacity = "2TiB"
            payload_budget = "512MiB"
            engine = "psync"
            flush_barrier = "file"
            [listen]
            peer = "10.0.0.1:7400"
            nbd = "10.0.0.1:10809"
            nbd_unix = "/run/basalt/nbd.sock"
            iscsi = "off"
            admin = "10.0.0.1:7480"
            [cluster]
            initial_members = ["10.0.0.1:7400", "10.0.0.2:7400", "10.0.0.3:7400"]
            voters = 3
            [raft]
            tick_ms = 50
            [liveness]
            down_after_ms = 3000
            "#,
        )
        .unwrap();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.capacity, Some(ByteSize(2 << 40)));
        assert_eq!(c.listen.iscsi, None);
        assert_eq!(c.listen.nbd_unix, Some(PathBuf::from("/run/basalt/nbd.sock")));
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c, "nbd_unix round-trips");
        assert_eq!(c.engine, EngineKind::Psync);
        assert_eq!(c.flush_barrier, FlushBarrier::PerFile);
        assert_eq!(c.raft.tick_ms, 50);
        assert_eq!(c.raft.election_ticks, 10, "unset fields keep their defaults");
        assert_eq!(c.cluster.initial_members.len(), 3);
    }

    #[test]
    fn unknown_fields_and_bad_values_fail_to_parse() {
        let e = Config::from_toml("data_dir = [\"/a\"]").unwrap_err().to_string();
        assert!(e.contains("unknown field `data_dir`"), "{e}");
        let e = Config::from_toml("[listen]\nnbd = \"nowhere\"").unwrap_err().to_string();
        assert!(e.contains("invalid socket address"), "{e}");
        let e = Config::from_toml("capacity = \"1X\"").unwrap_err().to_string();
        assert!(e.contains("unknown unit"), "{e}");
        let e = Config::from_toml("engine = \"spdk\"").unwrap_err().to_string();
        assert!(e.contains("unknown variant"), "{e}");
    }

    #[test]
    fn no_data_dirs_is_a_compute_node() {
        let mut c = base();
        c.data_dirs.clear();
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn node_id() {
        assert_eq!(err(|c| c.node_id = Some(0)), ConfigError::ZeroNodeId);
    }

    #[test]
    fn cluster_name() {
        assert!(matches!(err(|c| c.cluster_name = "a b".into()), ConfigError::ClusterName(_)));
        assert!(matches!(err(|c| c.cluster_name.clear()), ConfigError::ClusterName(_)));
    }

    #[test]
    fn state_dir() {
        assert!(matches!(err(|c| c.state_dir = "rel".into()), ConfigError::StateDir(_)));
        assert!(matches!(err(|c| c.state_dir = "".into()), ConfigError::StateDir(_)));
    }

    #[test]
    fn data_dirs() {
        assert_eq!(err(|c| c.data_dirs.push("/a".into())), ConfigError::DuplicateDataDir("/a".into()));
        assert_eq!(err(|c| c.data_dirs.push("/s".into())), ConfigError::DataDirIsStateDir("/s".into()));
    }

    #[test]
    fn zone() {
        assert!(matches!(err(|c| c.zone = "r/1".into()), ConfigError::Zone(_)));
    }

    #[test]
    fn log_filter() {
        assert!(matches!(err(|c| c.log_filter = Some("basalt=loud".into())), ConfigError::LogFilter(_)));
        let mut c = base();
        c.log_filter = Some("basalt=debug,info".into());
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn chap() {
        assert_eq!(err(|c| c.iscsi.chap_user = Some("u".into())), ConfigError::Chap);
        assert_eq!(
            err(|c| {
                c.iscsi.chap_mutual_user = Some("t".into());
                c.iscsi.chap_mutual_secret = Some("s".repeat(12));
            }),
            ConfigError::Chap
        );
    }

    #[test]
    fn capacity() {
        assert_eq!(err(|c| c.capacity = Some(ByteSize(1 << 20))), ConfigError::Capacity(ByteSize(1 << 20)));
    }

    #[test]
    fn peer_limits() {
        let small = ByteSize(32 << 20);
        assert_eq!(err(|c| c.peer.assembly_budget = small), ConfigError::PeerAssemblyBudget(small));
        assert_eq!(err(|c| c.peer.frame_timeout_ms = 99), ConfigError::PeerFrameTimeout(99));
        assert_eq!(err(|c| c.peer.frame_timeout_ms = 3_600_001), ConfigError::PeerFrameTimeout(3_600_001));
        assert_eq!(err(|c| c.peer.max_handshaking = 0), ConfigError::PeerMaxHandshaking(0));
    }

    #[test]
    fn payload_budget() {
        assert!(matches!(err(|c| c.payload_budget = ByteSize(1 << 20)), ConfigError::PayloadBudget(_)));
    }

    #[test]
    fn listen_addresses() {
        assert!(matches!(
            err(|c| c.listen.admin = "0.0.0.0:7480".parse().unwrap()),
            ConfigError::Unspecified { field: "admin", .. }
        ));
        assert!(matches!(
            err(|c| c.listen.iscsi = c.listen.nbd),
            ConfigError::SameListenAddr { a: "nbd", b: "iscsi", .. }
        ));
        assert!(matches!(
            err(|c| c.listen.admin = c.listen.peer),
            ConfigError::SameListenAddr { a: "peer", b: "admin", .. }
        ));
    }

    #[test]
    fn nbd_unix() {
        assert_eq!(Config::default().listen.nbd_unix, None, "off unless configured");
        let bad = |p: &str| err(|c| c.listen.nbd_unix = Some(p.into()));
        assert!(matches!(bad(""), ConfigError::NbdUnix { why: "is empty", .. }));
        assert!(matches!(bad(&format!("/{}", "s".repeat(107))), ConfigError::NbdUnix { .. }));
        assert!(matches!(bad("/run/basalt/"), ConfigError::NbdUnix { .. }));
        assert!(matches!(bad("/a"), ConfigError::NbdUnix { .. }), "a data directory");
        let mut c = base();
        c.listen.nbd_unix = Some(format!("/{}", "s".repeat(106)).into());
        assert_eq!(c.validate(), Ok(()), "107 bytes fit");
        c.listen.nbd_unix = Some("./basalt-demo/nbd.sock".into());
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn cluster() {
        assert_eq!(err(|c| c.cluster.voters = 2), ConfigError::Voters(2));
        let me = base().listen.peer;
        let other: SocketAddr = "127.0.0.2:7400".parse().unwrap();
        assert_eq!(err(|c| c.cluster.initial_members = vec![me, me]), ConfigError::DuplicateMember(me));
        assert_eq!(err(|c| c.cluster.initial_members = vec![other]), ConfigError::NotAMember(me));
        assert_eq!(
            err(|c| {
                c.cluster.initial_members = vec![me];
                c.cluster.join = Some(other);
            }),
            ConfigError::JoinAndMembers
        );
    }

    #[test]
    fn raft() {
        assert_eq!(err(|c| c.raft.tick_ms = 0), ConfigError::TickMs(0));
        assert_eq!(err(|c| c.raft.heartbeat_ticks = 10), ConfigError::HeartbeatTicks { h: 10, e: 10 });
        assert_eq!(err(|c| c.raft.heartbeat_ticks = 0), ConfigError::HeartbeatTicks { h: 0, e: 10 });
        assert_eq!(err(|c| c.raft.snapshot_entries = 1), ConfigError::SnapshotEntries(1));
    }

    #[test]
    fn liveness() {
        assert_eq!(err(|c| c.liveness.heartbeat_ms = 1), ConfigError::HeartbeatMs(1));
        assert_eq!(err(|c| c.liveness.down_after_ms = 1000), ConfigError::DownAfter { down: 1000, hb: 500 });
        // Not longer than an election timeout (100 ms * 10 ticks): the meta
        // group refused it at start, naming no config field (before).
        let e = err(|c| {
            c.liveness.heartbeat_ms = 100;
            c.liveness.down_after_ms = 1000;
        });
        assert_eq!(e, ConfigError::DownAfterElection { down: 1000, tick: 100, election: 10 });
        assert!(e.to_string().starts_with("liveness.down_after_ms: "), "{e}");
        assert_eq!(
            err(|c| {
                c.raft.election_ticks = 60;
                c.raft.tick_ms = 50;
                c.liveness.down_after_ms = 3000;
            }),
            ConfigError::DownAfterElection { down: 3000, tick: 50, election: 60 }
        );
        let mut ok = base();
        ok.liveness.heartbeat_ms = 100;
        ok.liveness.down_after_ms = 1100;
        assert_eq!(ok.validate(), Ok(()), "11 ticks of 100 ms: above 10");
    }
}
