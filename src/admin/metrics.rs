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

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Mutex;
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

fn latency_histogram() -> Histogram {
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
        }
        m
    }

    /// Adds a collector read at scrape time (node, Raft, peer gauges).
    pub fn register_collector(&self, c: Box<dyn prometheus_client::collector::Collector>) {
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
}

impl VolumeMetrics {
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
        assert!(text.contains("basalt_volume_operation_duration_seconds_bucket{le=\"0.000016\",volume=\"vol1\",op=\"write\"} 2"), "{text}");
        assert!(text.contains("# TYPE basalt_volume_operation_duration_seconds histogram"), "{text}");
        m.remove_volume("vol1");
        assert!(!m.encode().contains("volume=\"vol1\",op=\"write\""));
    }
}
