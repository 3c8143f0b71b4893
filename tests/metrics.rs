//! `/metrics`, `/healthz` and `/readyz` of a real `basaltd`, scraped over
//! HTTP and parsed by Python's `prometheus_client` (a real parser, not
//! ours); and the Grafana dashboard checked against what the daemon exports.

mod common;

use common::{Daemon, nbdsh, require};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Command, Stdio};

/// One HTTP/1.1 GET: (status, body).
fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the admin API");
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
    let (status, body) = http_get(port, "/metrics");
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
    let d = Daemon::start("16M", &[]);
    // One write and one read so every volume series has samples.
    nbdsh(
        &d.uri(),
        "import nbd\nh.pwrite(b'x' * 4096, 0); h.pread(4096, 0)\nh.set_strict_mode(0)\ntry:\n    h.pread(4096, h.get_size())\nexcept nbd.Error:\n    pass\n",
    );
    let (_, samples) = scrape(d.admin_port);
    let exported: std::collections::BTreeSet<&str> =
        samples.keys().map(|k| k.split_once('{').map_or(k.as_str(), |(n, _)| n)).collect();
    let missing: Vec<&String> = names.iter().filter(|n| !exported.contains(n.as_str())).collect();
    assert!(
        missing.is_empty(),
        "the dashboard uses names the daemon does not export: {missing:?}\nexported: {exported:?}"
    );
    // Histograms are queried through their series, never by the bare name.
    assert!(!names.contains("basalt_volume_operation_duration_seconds"));
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
