//! Prometheus metrics (the prometheus-client crate), served as text at
//! `/metrics` on the admin address.
//!
//! Owns: every metric name and label (README "Metrics" lists them; the
//! Grafana dashboard in `grafana/` uses exactly these). The I/O path pays
//! one atomic add per counter and one short mutex per histogram per
//! request: each volume resolves its label sets once, at open, so no label
//! map is searched per request. Gauges that describe state (capacity,
//! budget in use, Raft indexes) are read at scrape time by collectors and
//! cost the I/O path nothing.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A volume operation, as the `op` label spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Op {
    read,
    write,
    flush,
    trim,
    write_zeroes,
}

const OPS: [Op; 5] = [Op::read, Op::write, Op::flush, Op::trim, Op::write_zeroes];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VolumeOp {
    volume: String,
    op: Op,
}

/// A replica request, as the `op` label of the replica service time spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ReplicaOp {
    read,
    write,
    flush,
    trim,
    write_zeroes,
    /// Status, crc tables and maps (reconciliation and verify).
    other,
}

const REPLICA_OPS: [ReplicaOp; 6] = [
    ReplicaOp::read,
    ReplicaOp::write,
    ReplicaOp::flush,
    ReplicaOp::trim,
    ReplicaOp::write_zeroes,
    ReplicaOp::other,
];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReplicaOpLabel {
    op: ReplicaOp,
}

/// The replica service's time per request, by op: resolved handles, so a
/// request observes one histogram without a label lookup.
#[derive(Debug, Clone)]
pub struct ReplicaMetrics {
    per_op: [Histogram; 6],
}

impl ReplicaMetrics {
    /// Records a request of `op` that was admitted at `start`.
    #[inline]
    pub fn record(&self, op: ReplicaOp, start: Instant) {
        self.per_op[op as usize].observe(start.elapsed().as_secs_f64());
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VolumeLabel {
    volume: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VolumeError {
    volume: String,
    op: Op,
    kind: String,
}

/// The buckets of every latency histogram (volumes and peers).
pub fn latency_histogram() -> Histogram {
    // 16 µs .. ~8.4 s in doublings: block I/O latencies span that range.
    Histogram::new(exponential_buckets(16e-6, 2.0, 20))
}

/// Every metric of one daemon.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    ops: Family<VolumeOp, Counter>,
    latency: Family<VolumeOp, Histogram, fn() -> Histogram>,
    errors: Family<VolumeError, Counter>,
    read_bytes: Family<VolumeLabel, Counter>,
    write_bytes: Family<VolumeLabel, Counter>,
    trim_bytes: Family<VolumeLabel, Counter>,
    zero_bytes: Family<VolumeLabel, Counter>,
    replica: Family<ReplicaOpLabel, Histogram, fn() -> Histogram>,
    /// False with `BASALT_METRICS=off` (hidden; for measuring what the
    /// metrics cost): volume operations record nothing.
    enabled: bool,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("basalt")),
            ops: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            errors: Family::default(),
            read_bytes: Family::default(),
            write_bytes: Family::default(),
            trim_bytes: Family::default(),
            zero_bytes: Family::default(),
            replica: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            enabled: std::env::var("BASALT_METRICS").as_deref() != Ok("off"),
        };
        {
            let mut r = m.registry.lock().unwrap();
            r.register(
                "volume_operations",
                "Volume operations finished, failed ones included",
                m.ops.clone(),
            );
            r.register_with_unit(
                "volume_operation_duration",
                "Time from a volume operation's start to its end",
                prometheus_client::registry::Unit::Seconds,
                m.latency.clone(),
            );
            r.register("volume_errors", "Volume operations that failed, by kind of error", m.errors.clone());
            r.register_with_unit(
                "volume_read",
                "Bytes read from volumes",
                prometheus_client::registry::Unit::Bytes,
                m.read_bytes.clone(),
            );
            r.register_with_unit(
                "volume_write",
                "Bytes written to volumes",
                prometheus_client::registry::Unit::Bytes,
                m.write_bytes.clone(),
            );
            r.register_with_unit(
                "volume_trim",
                "Bytes trimmed (discarded) on volumes",
                prometheus_client::registry::Unit::Bytes,
                m.trim_bytes.clone(),
            );
            r.register_with_unit(
                "volume_write_zeroes",
                "Bytes zeroed on volumes",
                prometheus_client::registry::Unit::Bytes,
                m.zero_bytes.clone(),
            );
            r.register_with_unit(
                "replica_request_duration",
                "Time this node's replica service took for an extent request, from its admission to its answer, by op",
                prometheus_client::registry::Unit::Seconds,
                m.replica.clone(),
            );
        }
        m
    }

    /// The replica service's handles (none with `BASALT_METRICS=off`).
    pub fn replica(&self) -> Option<ReplicaMetrics> {
        self.enabled.then(|| ReplicaMetrics {
            per_op: REPLICA_OPS.map(|op| self.replica.get_or_create(&ReplicaOpLabel { op }).clone()),
        })
    }

    /// Adds a collector read at scrape time (node, Raft, peer gauges).
    pub fn register_collector(&self, c: Box<dyn Collector>) {
        self.registry.lock().unwrap().register_collector(c);
    }

    /// The handles of one volume's metrics, resolved once.
    pub fn volume(&self, name: &str) -> VolumeMetrics {
        let per_op = |op: Op| {
            let l = VolumeOp { volume: name.to_string(), op };
            OpMetrics {
                ops: self.ops.get_or_create(&l).clone(),
                latency: self.latency.get_or_create(&l).clone(),
            }
        };
        let bytes =
            |f: &Family<VolumeLabel, Counter>| f.get_or_create(&VolumeLabel { volume: name.into() }).clone();
        VolumeMetrics {
            name: name.into(),
            per_op: OPS.map(per_op),
            read_bytes: bytes(&self.read_bytes),
            write_bytes: bytes(&self.write_bytes),
            trim_bytes: bytes(&self.trim_bytes),
            zero_bytes: bytes(&self.zero_bytes),
            errors: self.errors.clone(),
            enabled: self.enabled,
        }
    }

    /// Forgets a deleted volume's series.
    pub fn remove_volume(&self, name: &str) {
        for op in OPS {
            let l = VolumeOp { volume: name.into(), op };
            self.ops.remove(&l);
            self.latency.remove(&l);
        }
        for f in [&self.read_bytes, &self.write_bytes, &self.trim_bytes, &self.zero_bytes] {
            f.remove(&VolumeLabel { volume: name.into() });
        }
    }

    /// The text exposition format (`/metrics`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().unwrap();
        prometheus_client::encoding::text::encode(&mut out, &r).expect("writing to a String cannot fail");
        out
    }
}

#[derive(Debug, Clone)]
struct OpMetrics {
    ops: Counter,
    latency: Histogram,
}

/// One volume's metric handles: recording is an atomic add or two and a
/// histogram observation, no label lookups.
#[derive(Debug, Clone)]
pub struct VolumeMetrics {
    name: String,
    per_op: [OpMetrics; 5],
    read_bytes: Counter,
    write_bytes: Counter,
    trim_bytes: Counter,
    zero_bytes: Counter,
    errors: Family<VolumeError, Counter>,
    enabled: bool,
}

impl VolumeMetrics {
    /// The start time of an operation, if metrics are on.
    #[inline]
    pub fn start(&self) -> Option<Instant> {
        self.enabled.then(Instant::now)
    }

    /// [`VolumeMetrics::record`] for an operation timed by [`VolumeMetrics::start`].
    #[inline]
    pub fn finish(&self, op: Op, bytes: u64, start: Option<Instant>, error: Option<&'static str>) {
        if let Some(t) = start {
            self.record(op, bytes, t, error);
        }
    }

    /// Handles that record into a registry nobody scrapes (tests, tools).
    pub fn detached(name: &str) -> VolumeMetrics {
        Metrics::new().volume(name)
    }

    /// Records one finished operation of `bytes` that started at `start`;
    /// `error` is the error's kind if it failed (bytes are counted only on
    /// success).
    pub fn record(&self, op: Op, bytes: u64, start: Instant, error: Option<&'static str>) {
        let m = &self.per_op[op as usize];
        m.ops.inc();
        m.latency.observe(start.elapsed().as_secs_f64());
        match error {
            None => {
                let c = match op {
                    Op::read => &self.read_bytes,
                    Op::write => &self.write_bytes,
                    Op::trim => &self.trim_bytes,
                    Op::write_zeroes => &self.zero_bytes,
                    Op::flush => return,
                };
                c.inc_by(bytes);
            }
            Some(kind) => {
                let l = VolumeError { volume: self.name.clone(), op, kind: kind.into() };
                self.errors.get_or_create(&l).inc();
            }
        }
    }
}

/// Writes one unlabelled gauge.
fn gauge(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: i64,
) -> std::fmt::Result {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, unit, MetricType::Gauge)?)
}

/// Writes one unlabelled counter (`_total` is appended).
fn counter(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> std::fmt::Result {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// Writes a gauge with one series per label set.
fn gauges<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: &[(L, i64)],
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, v) in series {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Capacity, used and free bytes of the filesystems holding `dirs`, each
/// filesystem counted once (statvfs(3); used is what nobody may write).
pub fn filesystems(dirs: &[&std::path::Path]) -> (u64, u64, u64) {
    let mut seen = std::collections::HashSet::new();
    let (mut cap, mut free) = (0u64, 0u64);
    for d in dirs {
        let Ok(c) = std::ffi::CString::new(d.as_os_str().as_encoded_bytes()) else { continue };
        // SAFETY: statvfs(3) writes into the zeroed struct we own; the path
        // is a valid NUL-terminated string.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0 && seen.insert(st.f_fsid) {
            let frsize = st.f_frsize as u64;
            cap = cap.saturating_add((st.f_blocks as u64).saturating_mul(frsize));
            free = free.saturating_add((st.f_bavail as u64).saturating_mul(frsize));
        }
    }
    (cap, cap.saturating_sub(free), free)
}

/// The node's store, payload budget and front-end connections, read at
/// scrape time.
#[derive(Debug)]
pub struct NodeCollector(pub Arc<crate::node::Node>);

impl Collector for NodeCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let node = &self.0;
        // A node without a store (no data directories) reports zeros.
        let dirs: Vec<&std::path::Path> =
            node.store().map(|s| s.data_dirs().map(|(p, _)| p).collect()).unwrap_or_default();
        let (cap, used, free) = filesystems(&dirs);
        let b = Some(&Unit::Bytes);
        gauge(
            &mut e,
            "store_capacity",
            "Size of the filesystems holding the data directories",
            b,
            clamp(cap),
        )?;
        gauge(&mut e, "store_used", "Bytes in use on those filesystems (by anyone)", b, clamp(used))?;
        gauge(&mut e, "store_free", "Bytes free for basaltd on those filesystems", b, clamp(free))?;
        let depths: Vec<_> = node
            .store()
            .into_iter()
            .flat_map(|s| s.queue_depths())
            .map(|(dir, n)| ([("dir", dir.display().to_string())], clamp(n)))
            .collect();
        gauges(
            &mut e,
            "engine_queue_depth",
            "Disk I/O ops submitted to the io_uring engine and not yet completed, per data directory",
            None,
            &depths,
        )?;
        let budget = node.payload_budget();
        gauge(
            &mut e,
            "payload_budget",
            "The node-wide budget for client payload in flight",
            b,
            clamp(budget.total()),
        )?;
        let in_use = budget.total().saturating_sub(budget.available());
        gauge(
            &mut e,
            "payload_budget_in_use",
            "Client payload bytes in flight now (budget taken)",
            b,
            clamp(in_use),
        )?;
        let c = node.connections();
        let open: Vec<_> = crate::node::Frontend::ALL
            .iter()
            .map(|&f| ([("frontend", f.label())], clamp(c.open(f))))
            .collect();
        gauges(&mut e, "frontend_connections", "Client connections open now, per front end", None, &open)?;
        let mut m = e.encode_descriptor(
            "frontend_connections_accepted",
            "Client connections accepted since start, per front end",
            None,
            MetricType::Counter,
        )?;
        for f in crate::node::Frontend::ALL {
            ConstCounter::new(c.accepted(f)).encode(m.encode_family(&[("frontend", f.label())])?)?;
        }
        Ok(())
    }
}

/// The metadata group as this node sees it: Raft term, leader, indexes,
/// and the extents with fewer replicas than their volume asks for.
#[derive(Debug)]
pub struct RaftCollector(pub crate::meta::MetaNode);

impl Collector for RaftCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let st = self.0.status();
        gauge(&mut e, "raft_term", "Current Raft term", None, clamp(st.term))?;
        // Node ids are 64-bit: labels, not sample values (a float loses them).
        let me = [([("node", st.id.0.to_string())], 1)];
        gauges(&mut e, "node_info", "This node (its id in the label)", None, &me)?;
        let has = i64::from(st.leader.is_some());
        gauge(&mut e, "raft_has_leader", "1 if this node knows a Raft leader", None, has)?;
        let leader: Vec<_> = st.leader.iter().map(|l| ([("node", l.0.to_string())], 1)).collect();
        gauges(
            &mut e,
            "raft_leader",
            "The leader this node knows, by node id (no series: none)",
            None,
            &leader,
        )?;
        let is = i64::from(st.leader == Some(st.id));
        gauge(&mut e, "raft_is_leader", "1 if this node is the Raft leader", None, is)?;
        gauge(
            &mut e,
            "raft_commit_index",
            "Highest log index known committed",
            None,
            clamp(st.commit_index),
        )?;
        gauge(&mut e, "raft_applied_index", "Highest log index applied here", None, clamp(st.applied_index))?;
        gauge(&mut e, "raft_voters", "Voters in the Raft configuration", None, st.voters.len() as i64)?;
        counter(
            &mut e,
            "raft_proposals",
            "Commands this node proposed to the metadata group",
            self.0.proposals(),
        )?;
        let state = self.0.subscribe().borrow().clone();
        let mut total = 0u64;
        let mut per_volume = Vec::new();
        for v in state.volumes() {
            let n = state
                .exceptions_of(v.id)
                .filter(|(_, x)| x.replicas.as_ref().is_some_and(|r| r.len() < v.replicas as usize))
                .count() as u64;
            if n > 0 {
                per_volume.push(([("volume", v.name.clone())], clamp(n)));
            }
            total += n;
        }
        gauge(
            &mut e,
            "degraded_extents",
            "Extents with fewer replicas than their volume asks for",
            None,
            clamp(total),
        )?;
        gauges(
            &mut e,
            "volume_degraded_extents",
            "Degraded extents per volume (only volumes that have some)",
            None,
            &per_volume,
        )
    }
}

/// The peer protocol's clients: per peer, requests and bytes in flight;
/// over all peers, the pool's counters.
#[derive(Debug)]
pub struct PeerCollector {
    pub pool: Arc<crate::net::PeerPool>,
    /// The per-peer byte budget (`ClientConfig::peer_budget`).
    pub peer_budget: u64,
}

impl Collector for PeerCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let mut clients = self.pool.clients();
        clients.sort_by_key(|c| c.addr());
        let label = |c: &crate::net::PeerClient| [("peer", c.addr().to_string())];
        let series = |f: &dyn Fn(&crate::net::PeerClient) -> u64| -> Vec<_> {
            clients.iter().map(|c| (label(c), clamp(f(c)))).collect()
        };
        gauges(
            &mut e,
            "peer_requests_in_flight",
            "Requests to the peer awaiting their reply",
            None,
            &series(&|c| c.in_flight() as u64),
        )?;
        gauges(
            &mut e,
            "peer_in_flight",
            "Bytes of the peer's budget held by frames in flight",
            Some(&Unit::Bytes),
            &series(&|c| self.peer_budget.saturating_sub(c.budget_available() as u64)),
        )?;
        gauges(
            &mut e,
            "peer_connections",
            "Live connections to the peer",
            None,
            &series(&|c| c.connections() as u64),
        )?;
        let mut m = e.encode_descriptor(
            "peer_request_duration",
            "Time from a peer request's start to its reply, failure or timeout, by peer and class",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for c in &clients {
            for class in crate::net::RequestClass::ALL {
                let labels = [("peer", c.addr().to_string()), ("class", class.label().to_string())];
                c.latency(class).encode(m.encode_family(&labels)?)?;
            }
        }
        let s = self.pool.stats();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(&mut e, "peer_requests", "Requests sent to peers", get(&s.requests))?;
        counter(&mut e, "peer_timeouts", "Peer requests that timed out", get(&s.timeouts))?;
        counter(&mut e, "peer_connects", "Peer connections made", get(&s.connects))?;
        counter(
            &mut e,
            "peer_connect_failures",
            "Peer connection attempts that failed",
            get(&s.connect_failures),
        )?;
        counter(&mut e, "peer_connections_lost", "Peer connections lost", get(&s.connections_lost))?;
        counter(&mut e, "peer_messages_sent", "One-way messages sent to peers (Raft)", get(&s.sent_one_way))?;
        let mut m = e.encode_descriptor(
            "peer_messages_dropped",
            "One-way messages dropped, by why",
            None,
            MetricType::Counter,
        )?;
        for (why, v) in [
            ("unreachable", &s.dropped_unreachable),
            ("budget_full", &s.dropped_full),
            ("no_address", &s.dropped_no_address),
        ] {
            ConstCounter::new(get(v)).encode(m.encode_family(&[("reason", why)])?)?;
        }
        Ok(())
    }
}

/// The peer port's own counters ([`crate::net::ServerStats`]): what
/// connecting peers did, hostile or not, read at scrape time.
#[derive(Debug)]
pub struct PeerServerCollector(pub Arc<crate::net::ServerStats>);

impl Collector for PeerServerCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        let s = &*self.0;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut e,
            "peer_server_connections_accepted",
            "Connections accepted on the peer port",
            get(&s.accepted),
        )?;
        let mut m = e.encode_descriptor(
            "peer_server_connections_refused",
            "Peer connections closed before their Hello was taken, by why",
            None,
            MetricType::Counter,
        )?;
        let early =
            [("handshake_limit", get(&s.handshake_overflow)), ("hello_timeout", get(&s.hello_timeouts))];
        for (why, v) in early.into_iter().chain(s.refused_by()) {
            ConstCounter::new(v).encode(m.encode_family(&[("reason", why)])?)?;
        }
        let mut m = e.encode_descriptor(
            "peer_server_messages",
            "Messages received from peers, by kind (request: answered; one_way: not)",
            None,
            MetricType::Counter,
        )?;
        for (kind, v) in [("request", get(&s.requests)), ("one_way", get(&s.one_way))] {
            ConstCounter::new(v).encode(m.encode_family(&[("kind", kind)])?)?;
        }
        let mut m = e.encode_descriptor(
            "peer_server_messages_refused",
            "Peer messages refused with Forbidden, by why (impostor: a sender other than the Hello's; \
             not_member: a member-only message from a non-member; invalid: one no honest peer sends)",
            None,
            MetricType::Counter,
        )?;
        for (why, v) in s.forbidden_by() {
            ConstCounter::new(v).encode(m.encode_family(&[("reason", why)])?)?;
        }
        counter(
            &mut e,
            "peer_server_bad_frames",
            "Frames from peers that did not decode (the connection is closed)",
            get(&s.bad_frames),
        )?;
        counter(
            &mut e,
            "peer_server_frame_timeouts",
            "Peer connections closed because a frame did not complete, or found no room, within frame_timeout",
            get(&s.frame_timeouts),
        )?;
        counter(
            &mut e,
            "peer_server_handlers_aborted",
            "Peer request handlers dropped because shutdown's grace ran out",
            get(&s.handlers_aborted),
        )?;
        for (name, help, g) in [
            ("peer_server_held", "Bytes held by peer requests in flight over every connection", &s.held),
            (
                "peer_server_assembling",
                "Bytes of the assembly budget held by partly received frames",
                &s.assembling,
            ),
        ] {
            gauge(&mut e, name, help, Some(&Unit::Bytes), clamp(g.now()))?;
            let peak = format!("{name}_peak");
            gauge(&mut e, &peak, &format!("{help}, at most so far"), Some(&Unit::Bytes), clamp(g.peak()))?;
        }
        Ok(())
    }
}

/// The volumes this node owns on the replicated data path: name and owner.
pub type OwnedVolumes =
    Box<dyn Fn() -> Vec<(String, Arc<crate::node::replicated::Replicated>)> + Send + Sync>;

/// Per owned volume, the counters of its owner
/// ([`crate::node::replicated::ReplicationStats`]), read at scrape time.
/// They count from this node's taking the volume (or its newest
/// generation); a volume this node stops owning loses its series.
pub struct ReplicationCollector(pub OwnedVolumes);

impl std::fmt::Debug for ReplicationCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationCollector").finish_non_exhaustive()
    }
}

impl Collector for ReplicationCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        use crate::node::replicated::ReplicationStats;
        let mut owned = (self.0)();
        owned.sort_by(|a, b| a.0.cmp(&b.0));
        type Field = fn(&ReplicationStats) -> &AtomicU64;
        let families: [(&str, &str, Option<&Unit>, Field); 4] = [
            (
                "replication_read_failovers",
                "Reads served by another replica after a checksum or I/O error",
                None,
                |s| &s.read_failovers,
            ),
            ("replication_repairs", "Bad copies rewritten from a good replica", None, |s| &s.repairs),
            ("replication_degraded", "Replica sets shrunk because a replica failed", None, |s| &s.degraded),
            (
                "replication_reconciled",
                "Bytes copied between replicas by reconciliation",
                Some(&Unit::Bytes),
                |s| &s.reconciled_bytes,
            ),
        ];
        for (name, help, unit, field) in families {
            let mut m = e.encode_descriptor(name, help, unit, MetricType::Counter)?;
            for (volume, r) in &owned {
                let v = field(&r.stats).load(Ordering::Relaxed);
                ConstCounter::new(v).encode(m.encode_family(&[("volume", volume.as_str())])?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new();
        let v = m.volume("vol1");
        let t = Instant::now();
        v.record(Op::write, 4096, t, None);
        v.record(Op::write, 4096, t, None);
        v.record(Op::read, 512, t, Some("checksum"));
        let text = m.encode();
        assert!(text.contains("basalt_volume_write_bytes_total{volume=\"vol1\"} 8192"), "{text}");
        assert!(text.contains("basalt_volume_operations_total{volume=\"vol1\",op=\"write\"} 2"), "{text}");
        assert!(
            text.contains("basalt_volume_errors_total{volume=\"vol1\",op=\"read\",kind=\"checksum\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("basalt_volume_read_bytes_total{volume=\"vol1\"} 0"),
            "failed reads add no bytes: {text}"
        );
        // Buckets exist from 16 µs up; which one an observation lands in
        // depends on time, the +Inf bucket holds them all.
        assert!(text.contains("basalt_volume_operation_duration_seconds_bucket{le=\"0.000016\",volume=\"vol1\",op=\"write\"}"), "{text}");
        assert!(
            text.contains(
                "basalt_volume_operation_duration_seconds_bucket{le=\"+Inf\",volume=\"vol1\",op=\"write\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE basalt_volume_operation_duration_seconds histogram"), "{text}");
        m.remove_volume("vol1");
        assert!(!m.encode().contains("volume=\"vol1\",op=\"write\""));
    }
}
