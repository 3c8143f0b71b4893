//! `/metrics`, `/healthz` and `/readyz` of a real `basaltd`, scraped over
//! HTTP and parsed by Python's `prometheus_client` (a real parser, not
//! ours); and the Grafana dashboard checked against what the daemon exports.

mod common;

use common::cluster::Cluster;
use common::{Daemon, nbdsh, require};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One HTTP/1.1 GET on 127.0.0.1: (status, body).
fn http_get(port: u16, path: &str) -> (u16, String) {
    http_get_at(SocketAddr::from(([127, 0, 0, 1], port)), path)
}

/// One HTTP/1.1 GET: (status, body).
fn http_get_at(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the admin API");
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("a status code");
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    (status, if chunked { dechunk(body) } else { body.to_string() })
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

/// True if Python's prometheus_client is importable; under CI=true its
/// absence fails the test.
fn require_parser() -> bool {
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "Python prometheus_client is not installed (CI=true): run ./scripts/test, which installs python3-prometheus-client"
            );
        }
        eprintln!("SKIPPING: Python prometheus_client is not installed");
    }
    ok
}

/// Samples as the parser saw them: `name{k="v",...}` (labels sorted) to value.
type Samples = BTreeMap<String, f64>;

/// Families: name to type, as the parser saw them.
type Families = BTreeMap<String, String>;

const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
fams, samples = {}, {}
for f in text_string_to_metric_families(sys.stdin.read()):
    fams[f.name] = f.type
    for s in f.samples:
        labels = ",".join('%s="%s"' % (k, v) for k, v in sorted(s.labels.items()))
        samples["%s{%s}" % (s.name, labels)] = s.value
print(json.dumps({"families": fams, "samples": samples}))
"#;

/// Scrapes `/metrics` and parses it with prometheus_client (OpenMetrics:
/// the parser also insists on the `# EOF` line).
fn scrape(port: u16) -> (Families, Samples) {
    scrape_at(SocketAddr::from(([127, 0, 0, 1], port)))
}

fn scrape_at(addr: SocketAddr) -> (Families, Samples) {
    let (status, body) = http_get_at(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    let mut py = Command::new("/usr/bin/python3")
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    py.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = py.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refused the exposition: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fams = v["families"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, t)| (k.clone(), t.as_str().unwrap().to_string()))
        .collect();
    let samples =
        v["samples"].as_object().unwrap().iter().map(|(k, x)| (k.clone(), x.as_f64().unwrap())).collect();
    (fams, samples)
}

fn get(s: &Samples, key: &str) -> f64 {
    *s.get(key).unwrap_or_else(|| {
        panic!("no sample {key}; have:\n{}", s.keys().cloned().collect::<Vec<_>>().join("\n"))
    })
}

fn op(name: &str, volume: &str, op: &str) -> String {
    format!("{name}{{op=\"{op}\",volume=\"{volume}\"}}")
}

#[test]
fn counters_move_by_exactly_the_workload() {
    if !require("nbdsh") || !require_parser() {
        return;
    }
    let d = Daemon::start("64M", &[]);
    let v = &d.volume;
    let (_, before) = scrape(d.admin_port);
    const N: u64 = 37;
    // N writes of 4 KiB at distinct offsets, then N reads of them, on one
    // connection; then one read past the end with libnbd's own bounds
    // check off, so the server is the one that refuses it.
    nbdsh(
        &d.uri(),
        &format!(
            "import nbd\n\
             for i in range({N}):\n    h.pwrite(bytes([i]) * 4096, i * 8192)\n\
             for i in range({N}):\n    assert h.pread(4096, i * 8192) == bytes([i]) * 4096\n\
             h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)\n\
             try:\n    h.pread(4096, h.get_size())\n    raise SystemExit('read past the end succeeded')\n\
             except nbd.Error as e:\n    assert e.errno == 'EINVAL', e.errno\n"
        ),
    );
    let (fams, after) = scrape(d.admin_port);
    let delta = |k: &str| get(&after, k) - before.get(k).copied().unwrap_or(0.0);
    let vol = format!("{{volume=\"{v}\"}}");
    assert_eq!(delta(&format!("basalt_volume_write_bytes_total{vol}")), (N * 4096) as f64);
    assert_eq!(
        delta(&format!("basalt_volume_read_bytes_total{vol}")),
        (N * 4096) as f64,
        "the failed read adds no bytes"
    );
    assert_eq!(delta(&op("basalt_volume_operations_total", v, "write")), N as f64);
    assert_eq!(
        delta(&op("basalt_volume_operations_total", v, "read")),
        (N + 1) as f64,
        "failed ones included"
    );
    let err = format!("basalt_volume_errors_total{{kind=\"out_of_range\",op=\"read\",volume=\"{v}\"}}");
    assert_eq!(get(&after, &err), 1.0);
    assert!(!after.keys().any(|k| k.starts_with("basalt_volume_errors_total") && k.contains("op=\"write\"")));

    // Histograms: typed as such, with buckets, counting every operation.
    assert_eq!(fams["basalt_volume_operation_duration_seconds"], "histogram");
    let h = |suffix: &str, le: Option<&str>| match le {
        Some(le) => format!(
            "basalt_volume_operation_duration_seconds_{suffix}{{le=\"{le}\",op=\"write\",volume=\"{v}\"}}"
        ),
        None => format!("basalt_volume_operation_duration_seconds_{suffix}{{op=\"write\",volume=\"{v}\"}}"),
    };
    assert_eq!(get(&after, &h("count", None)), N as f64);
    assert_eq!(get(&after, &h("bucket", Some("+Inf"))), N as f64);
    let buckets: Vec<f64> = after
        .iter()
        .filter(|(k, _)| {
            k.starts_with("basalt_volume_operation_duration_seconds_bucket{") && k.contains("op=\"write\"")
        })
        .map(|(_, &x)| x)
        .collect();
    assert_eq!(buckets.len(), 21, "20 bounds and +Inf");
    assert!(get(&after, &h("sum", None)) > 0.0);

    // Node gauges: one NBD connection was accepted and is closed again;
    // the payload budget is the default and nothing is in flight.
    assert_eq!(get(&after, "basalt_frontend_connections_accepted_total{frontend=\"nbd\"}"), 1.0);
    assert_eq!(get(&after, "basalt_frontend_connections{frontend=\"nbd\"}"), 0.0);
    assert_eq!(get(&after, "basalt_payload_budget_bytes{}"), (1u64 << 30) as f64);
    assert_eq!(get(&after, "basalt_payload_budget_in_use_bytes{}"), 0.0);
    let (cap, used, free) = (
        get(&after, "basalt_store_capacity_bytes{}"),
        get(&after, "basalt_store_used_bytes{}"),
        get(&after, "basalt_store_free_bytes{}"),
    );
    assert!(cap > 0.0 && used + free <= cap, "{cap} {used} {free}");
    // The engine's queue depth: one series per data directory (io_uring
    // counts its ops; a psync fallback has none), and nothing in flight
    // once the client is done.
    let depths: Vec<(&String, f64)> = after
        .iter()
        .filter(|(k, _)| k.starts_with("basalt_engine_queue_depth{"))
        .map(|(k, &x)| (k, x))
        .collect();
    assert_eq!(fams["basalt_engine_queue_depth"], "gauge");
    if d.log_text().contains("io_uring unavailable") {
        assert!(depths.is_empty(), "{depths:?}");
    } else {
        assert_eq!(depths.len(), 1, "one data directory: {depths:?}");
        let dir = format!("basalt_engine_queue_depth{{dir=\"{}", d.data.display());
        assert!(depths[0].0.starts_with(&dir), "{depths:?} under {dir}");
        assert_eq!(depths[0].1, 0.0);
    }
    // The single-node slice serves from its store directly: no owner of a
    // replicated volume, so the replication families have no series.
    assert_eq!(fams["basalt_replication_read_failovers"], "counter");
    assert!(!after.keys().any(|k| k.starts_with("basalt_replication_")), "{after:?}");
    // Raft: a group of one that leads itself.
    assert_eq!(get(&after, "basalt_raft_is_leader{}"), 1.0);
    assert_eq!(get(&after, "basalt_raft_has_leader{}"), 1.0);
    assert!(get(&after, "basalt_raft_commit_index{}") >= 1.0);
    assert_eq!(get(&after, "basalt_raft_applied_index{}"), get(&after, "basalt_raft_commit_index{}"));
    assert_eq!(get(&after, "basalt_degraded_extents{}"), 0.0);
    assert!(get(&after, "basalt_raft_proposals_total{}") >= 2.0, "the demo volume's create and owner");
}

/// A node that is not a member of any cluster waits for an invitation:
/// its admin API answers, but /readyz says it does not serve.
#[test]
fn readyz_is_false_before_the_node_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let admin = common::free_port();
    let cfg = tmp.path().join("basaltd.toml");
    std::fs::write(
        &cfg,
        format!(
            "cluster_name = \"test\"\nstate_dir = \"{d}/state\"\ndata_dirs = [\"{d}/data\"]\n\
             [listen]\npeer = \"127.0.0.1:{}\"\nnbd = \"127.0.0.1:{}\"\nadmin = \"127.0.0.1:{admin}\"\n",
            common::free_port(),
            common::free_port(),
            d = tmp.path().display()
        ),
    )
    .unwrap();
    let log = tmp.path().join("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_basaltd"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let answer = loop {
        if std::net::TcpStream::connect(("127.0.0.1", admin)).is_ok() {
            break http_get(admin, "/readyz");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "admin API never answered:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let health = http_get(admin, "/healthz");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(answer.0, 503, "{answer:?}");
    assert!(answer.1.starts_with("not ready: starting"), "{answer:?}");
    assert_eq!(health, (200, "ok\n".to_string()));
}

#[test]
fn readyz_is_true_once_serving() {
    let d = Daemon::start("16M", &[]);
    assert_eq!(http_get(d.admin_port, "/readyz"), (200, "ready\n".to_string()));
    assert_eq!(http_get(d.admin_port, "/healthz"), (200, "ok\n".to_string()));
}

/// Every metric name the dashboard's expressions use is exported by a
/// running daemon (a histogram through its _bucket/_sum/_count series).
#[test]
fn grafana_dashboard_uses_exported_names() {
    if !require_parser() {
        return;
    }
    let names = dashboard_names();
    let d = Daemon::start("16M", &[]);
    // One write and one read so every volume series has samples.
    nbdsh(
        &d.uri(),
        "import nbd\nh.pwrite(b'x' * 4096, 0); h.pread(4096, 0)\nh.set_strict_mode(0)\ntry:\n    h.pread(4096, h.get_size())\nexcept nbd.Error:\n    pass\n",
    );
    let (fams, samples) = scrape(d.admin_port);
    // A single node has no peers and owns no replicated volume: those
    // families are declared (HELP and TYPE) without series. The R=3 test
    // below checks every name against series of a cluster's owner.
    let mut exported = sample_names(&samples);
    for (name, kind) in &fams {
        match kind.as_str() {
            "histogram" => exported.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}"))),
            "counter" => exported.push(format!("{name}_total")),
            _ => exported.push(name.clone()),
        }
    }
    let missing: Vec<&String> = names.iter().filter(|n| !exported.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard uses names the daemon does not export: {missing:?}\nexported: {exported:?}"
    );
    // Histograms are queried through their series, never by the bare name.
    assert!(!names.contains("basalt_volume_operation_duration_seconds"));
    assert!(!names.contains("basalt_peer_request_duration_seconds"));
}

/// Every `basalt_*` name the dashboard's expressions use.
fn dashboard_names() -> std::collections::BTreeSet<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/grafana/basalt.json");
    let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dash, &mut exprs);
    assert!(exprs.len() >= 10, "the dashboard has panels with queries: {exprs:?}");
    let mut names = std::collections::BTreeSet::new();
    for e in &exprs {
        let b = e.as_bytes();
        let mut i = 0;
        while let Some(at) = e[i..].find("basalt_") {
            let start = i + at;
            let mut end = start;
            while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
                end += 1;
            }
            names.insert(e[start..end].to_string());
            i = end;
        }
    }
    assert!(names.len() >= 10, "{names:?}");
    names
}

/// The metric names that have series.
fn sample_names(samples: &Samples) -> Vec<String> {
    let mut v: Vec<String> =
        samples.keys().map(|k| k.split_once('{').map_or(k.as_str(), |(n, _)| n).to_string()).collect();
    v.dedup();
    v
}

/// Three nodes, R=3, the volume owned by node 0: each of its N writes of
/// 4 KiB sends one ExtentWrite to each other replica, and node 0's
/// latency histogram of that peer's `extent` class counts exactly N more.
/// (Heartbeats, metadata and membership requests go through the same
/// client but count in the `control` class; Raft messages are one-way and
/// not timed.) A replica killed then shrinks the extent's set once.
#[test]
fn r3_peer_latency_counts_every_replica_request() {
    if !require("nbdsh") || !require_parser() {
        return;
    }
    let mut c = Cluster::start(3, 3);
    let leader = c.wait_leader(0, None);
    let v = c.cli_json(
        0,
        &[
            "volume",
            "create",
            "r3",
            "--size",
            "64M",
            "--replicas",
            "3",
            "--extent-size",
            "4M",
            "--stripe-width",
            "1",
        ],
    );
    assert_eq!(v["owner"]["node"], c.cli_json(0, &["cluster", "status"])["this_node"], "{v}");
    let uri = format!("nbd://{}/r3", c.nodes[0].nbd);
    // The first request of extent 0 reconciles it (status requests to
    // every member); after that a write is one request per other member.
    nbdsh(&uri, "h.pwrite(b'w' * 4096, 0)\nassert h.pread(4096, 0) == b'w' * 4096\n");
    let admin = c.nodes[0].admin;
    let peers: Vec<String> = [1, 2].map(|k| c.nodes[k].peer.to_string()).to_vec();
    let count = |s: &Samples, peer: &str, class: &str| {
        s.get(&format!("basalt_peer_request_duration_seconds_count{{class=\"{class}\",peer=\"{peer}\"}}"))
            .copied()
            .unwrap_or(0.0)
    };
    let (fams, before) = scrape_at(admin);
    assert_eq!(fams["basalt_peer_request_duration_seconds"], "histogram");
    assert_eq!(fams["basalt_replica_request_duration_seconds"], "histogram");
    // The replica service's own times, on every node (node 0's own replica too).
    let served = |s: &Samples, op: &str| {
        s.get(&format!("basalt_replica_request_duration_seconds_count{{op=\"{op}\"}}"))
            .copied()
            .unwrap_or(0.0)
    };
    let served_before: Vec<Samples> = (0..3).map(|k| scrape_at(c.nodes[k].admin).1).collect();
    const N: u64 = 25;
    // N writes inside extent 0, then N reads (served by node 0's own
    // replica first: no peer request), then one read past the end.
    nbdsh(
        &uri,
        &format!(
            "import nbd\n\
             for i in range({N}):\n    h.pwrite(bytes([i + 1]) * 4096, (i + 1) * 8192)\n\
             for i in range({N}):\n    assert h.pread(4096, (i + 1) * 8192) == bytes([i + 1]) * 4096\n\
             h.set_strict_mode(0)\n\
             try:\n    h.pread(4096, h.get_size())\nexcept nbd.Error:\n    pass\n"
        ),
    );
    // Every write is acknowledged once each member answered; still, wait
    // for the counts to settle rather than presume when they do.
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let (_, s) = scrape_at(admin);
        let sent: f64 = peers.iter().map(|p| count(&s, p, "extent") - count(&before, p, "extent")).sum();
        if sent >= (2 * N) as f64 || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for p in &peers {
        assert_eq!(count(&after, p, "extent") - count(&before, p, "extent"), N as f64, "peer {p}");
        let inf = format!(
            "basalt_peer_request_duration_seconds_bucket{{class=\"extent\",le=\"+Inf\",peer=\"{p}\"}}"
        );
        assert_eq!(get(&after, &inf), count(&after, p, "extent"), "+Inf holds every observation");
        let buckets = after
            .keys()
            .filter(|k| {
                k.starts_with("basalt_peer_request_duration_seconds_bucket{class=\"extent\",")
                    && k.ends_with(&format!("peer=\"{p}\"}}"))
            })
            .count();
        assert_eq!(buckets, 21, "20 bounds and +Inf");
        assert!(
            get(
                &after,
                &format!("basalt_peer_request_duration_seconds_sum{{class=\"extent\",peer=\"{p}\"}}")
            ) > 0.0
        );
        // No forwarded volume requests: node 0 owns the volume.
        assert_eq!(count(&after, p, "volume"), 0.0, "peer {p}");
        // Requests in flight to a peer that is not the leader: none now
        // (to the leader, a liveness heartbeat may be on its way).
        if c.nodes[leader].peer.to_string() != *p {
            assert_eq!(
                get(&after, &format!("basalt_peer_requests_in_flight{{peer=\"{p}\"}}")),
                0.0,
                "peer {p}"
            );
        }
    }
    // Each member served exactly the N writes; the reads, node 0's replica alone.
    for (k, b) in served_before.iter().enumerate() {
        let (_, a) = scrape_at(c.nodes[k].admin);
        assert_eq!(served(&a, "write") - served(b, "write"), N as f64, "node {k}: writes served");
        let reads = if k == 0 { N as f64 } else { 0.0 };
        assert_eq!(served(&a, "read") - served(b, "read"), reads, "node {k}: reads served");
        let inf = "basalt_replica_request_duration_seconds_bucket{le=\"+Inf\",op=\"write\"}";
        assert_eq!(get(&a, inf), served(&a, "write"), "node {k}: +Inf holds every write");
    }
    let vol = "{volume=\"r3\"}";
    for name in ["read_failovers", "repairs", "degraded", "reconciled_bytes"] {
        assert_eq!(get(&after, &format!("basalt_replication_{name}_total{vol}")), 0.0, "{name}");
    }
    // The engine counts node 0's own replica I/O; nothing is in flight now.
    let depths: Vec<f64> =
        after.iter().filter(|(k, _)| k.starts_with("basalt_engine_queue_depth{")).map(|(_, &x)| x).collect();
    if !c.log(0).contains("io_uring unavailable") {
        assert_eq!(depths, vec![0.0], "one data directory, idle");
    }
    // The owner of a replicated volume exports a series for every name
    // the dashboard uses.
    let exported = sample_names(&after);
    let uring = !c.log(0).contains("io_uring unavailable");
    let missing: Vec<String> = dashboard_names()
        .into_iter()
        .filter(|n| !exported.contains(n) && (uring || n != "basalt_engine_queue_depth"))
        .collect();
    assert!(missing.is_empty(), "no series on the owner for {missing:?}");

    // kill -9 of a replica that does not lead the metadata group: the next
    // write to extent 0 fails there, and the owner shrinks the extent's
    // set exactly once.
    let victim = if leader == 2 { 1 } else { 2 };
    c.kill9(victim);
    nbdsh(&uri, "h.pwrite(b'k' * 4096, 0)\nassert h.pread(4096, 0) == b'k' * 4096\n");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (_, s) = loop {
        let r = scrape_at(admin);
        let seen = |k: &str| r.1.get(k).copied().unwrap_or(0.0) >= 1.0;
        if (seen(&format!("basalt_replication_degraded_total{vol}")) && seen("basalt_degraded_extents{}"))
            || Instant::now() > deadline
        {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(get(&s, &format!("basalt_replication_degraded_total{vol}")), 1.0);
    assert_eq!(get(&s, "basalt_degraded_extents{}"), 1.0);
    assert_eq!(get(&s, &format!("basalt_volume_degraded_extents{vol}")), 1.0);
    let dead = c.nodes[victim].peer.to_string();
    assert!(
        count(&s, &dead, "extent") > count(&after, &dead, "extent"),
        "the failed request is observed too"
    );
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}

/// A hostile peer's every trick on the peer port of a real `basaltd run`
/// moves its `basalt_peer_server_*` counter by exactly one per trick (two
/// silent sockets time out: two), scraped and parsed by prometheus_client.
#[test]
fn hostile_peers_move_the_peer_server_counters_exactly() {
    use basalt::proto::peer::{FrameFlags, HEADER_LEN, Hello, Message, ProtocolVersion, encode_to_bytes};
    use basalt::types::{ClusterId, NodeId};
    use bytes::Bytes;
    use raft::eraftpb::MessageType;
    use std::net::TcpStream;
    if !require_parser() {
        return;
    }
    let mut c = Cluster::configure(1, 1, None);
    let mut cfg = std::fs::read_to_string(&c.nodes[0].config).unwrap();
    cfg += "[peer]\nmax_handshaking = 2\nframe_timeout_ms = 1000\n";
    std::fs::write(&c.nodes[0].config, cfg).unwrap();
    c.spawn(0);
    c.wait_ready(0);
    let (peer, admin) = (c.nodes[0].peer, c.nodes[0].admin);
    let me = c.cli_json(0, &["cluster", "status"])["nodes"][0]["id"].as_u64().unwrap();
    let x = me ^ 0x5a5a_5a5a;
    let hello = |cluster: u128, node: u64| {
        let h = Hello { version: ProtocolVersion::CURRENT, cluster: ClusterId(cluster), node: NodeId(node) };
        encode_to_bytes(0, FrameFlags::NONE, &Message::Hello(h)).unwrap()
    };
    let raft = |t: MessageType, from: u64| {
        let mut m = raft::eraftpb::Message::default();
        m.set_msg_type(t);
        (m.from, m.to) = (from, me);
        let msg = Message::Raft(Bytes::from(basalt::meta::encode_raft_message(&m)));
        encode_to_bytes(7, FrameFlags::ONE_WAY, &msg).unwrap()
    };
    let open = |first: &[u8]| {
        let mut s = TcpStream::connect(peer).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s.write_all(first).unwrap();
        s
    };
    // Reads what the node sends until it closes the connection.
    let until_closed = |s: &mut TcpStream| {
        let mut b = [0u8; 4096];
        loop {
            match s.read(&mut b) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(e) => panic!("the node did not close the connection: {e}"),
            }
        }
    };
    // Reads one whole frame (the HelloAck, say).
    let frame = |s: &mut TcpStream| {
        let mut head = [0u8; HEADER_LEN];
        s.read_exact(&mut head).unwrap();
        let len = u32::from_le_bytes(head[12..16].try_into().unwrap()) as usize;
        let mut rest = vec![0u8; len];
        s.read_exact(&mut rest).unwrap();
    };
    let (_, before) = scrape_at(admin);

    // Impostor: Hello as x, then Raft from the node itself. Closed.
    let mut s = open(&hello(0, x));
    frame(&mut s);
    s.write_all(&raft(MessageType::MsgHeartbeat, me)).unwrap();
    until_closed(&mut s);
    // Not a member: Raft from x as x. Refused; the connection stays.
    let mut outsider = open(&hello(0, x));
    frame(&mut outsider);
    outsider.write_all(&raft(MessageType::MsgHeartbeat, x)).unwrap();
    frame(&mut outsider);
    drop(outsider);
    // A Raft message only the local node makes. Closed.
    let mut s = open(&hello(0, x));
    frame(&mut s);
    s.write_all(&raft(MessageType::MsgBeat, x)).unwrap();
    until_closed(&mut s);
    // Hellos refused: another cluster; a Ping first; a corrupted frame.
    until_closed(&mut open(&hello(0x0bad_c1a5, x)));
    until_closed(&mut open(&encode_to_bytes(1, FrameFlags::NONE, &Message::Ping).unwrap()));
    let mut bad = hello(0, x).to_vec();
    *bad.last_mut().unwrap() ^= 0xff;
    until_closed(&mut open(&bad));
    // A 1 MiB frame sent in part, then silence: closed after frame_timeout.
    let big =
        encode_to_bytes(9, FrameFlags::ONE_WAY, &Message::Raft(Bytes::from(vec![7u8; 1 << 20]))).unwrap();
    let mut s = open(&hello(0, x));
    frame(&mut s);
    s.write_all(&big[..HEADER_LEN + (100 << 10)]).unwrap();
    until_closed(&mut s);
    // Two sockets that never say Hello hold both handshake slots: a third
    // is closed at once; the two are closed at hello_timeout.
    let mut silent: Vec<TcpStream> = (0..2).map(|_| open(&[])).collect();
    // The node takes connections in order: once the third is closed, the
    // two hold their slots.
    until_closed(&mut open(&[]));
    for s in &mut silent {
        until_closed(s);
    }

    let (fams, after) = scrape_at(admin);
    let delta = |key: &str| get(&after, key) - before.get(key).copied().unwrap_or(0.0);
    let refused =
        |why: &str| delta(&format!("basalt_peer_server_connections_refused_total{{reason=\"{why}\"}}"));
    let forbidden =
        |why: &str| delta(&format!("basalt_peer_server_messages_refused_total{{reason=\"{why}\"}}"));
    assert_eq!(
        [
            refused("handshake_limit"),
            refused("hello_timeout"),
            refused("wrong_cluster"),
            refused("expected_hello"),
            refused("malformed"),
            refused("version_mismatch")
        ],
        [1.0, 2.0, 1.0, 1.0, 1.0, 0.0]
    );
    assert_eq!([forbidden("impostor"), forbidden("not_member"), forbidden("invalid")], [1.0, 1.0, 1.0]);
    assert_eq!(delta("basalt_peer_server_bad_frames_total{}"), 1.0, "the corrupted Hello");
    assert_eq!(delta("basalt_peer_server_frame_timeouts_total{}"), 1.0);
    assert!(delta("basalt_peer_server_connections_accepted_total{}") >= 10.0);
    assert!(get(&after, "basalt_peer_server_assembling_peak_bytes{}") >= f64::from(1u32 << 20));
    assert_eq!(get(&after, "basalt_peer_server_assembling_bytes{}"), 0.0, "given back");
    for name in ["basalt_peer_server_connections_refused", "basalt_peer_server_messages_refused"] {
        assert_eq!(fams.get(name).map(String::as_str), Some("counter"), "{name}");
    }
}
