//! The replicated data path under faults, with real `basaltd run`
//! processes and real clients: a replica killed during `fio --verify`, the
//! owner cut off by a network partition (namespaces), every node killed
//! during a flushed write workload, and hostile peers on the peer port.

mod common;

use basalt::proto::peer::{
    Decoder, ExtentError, ExtentRead, ExtentTarget, ExtentWrite, Frame, FrameFlags, HEADER_LEN, Hello, Kind,
    MAGIC, Message, ProtocolVersion, VolumeTarget, VolumeWrite, encode_to_bytes,
};
use basalt::types::{ClusterId, Epoch, ExtentIndex, Generation, NodeId, VolumeId};
use bytes::{Bytes, BytesMut};
use common::cluster::Cluster;
use common::netns::Net;
use common::oracle::{CHECKER, WORKLOAD, oracle};
use common::{require, run};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out waiting for {what}");
}

fn uri(c: &Cluster, k: usize, name: &str) -> String {
    format!("nbd://{}/{name}", c.nodes[k].nbd)
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `wrap` (a netns prefix, or nothing) then `cmd args`, bounded by
/// `timeout(1)` so a client stuck on an unreachable server cannot hang
/// the test.
fn run_in(wrap: &[String], secs: u64, cmd: &str, args: &[&str]) -> Output {
    let mut c = Command::new("timeout");
    c.arg(secs.to_string());
    c.args(wrap).arg(cmd).args(args);
    c.env("PATH", format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()));
    c.output().unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

fn qemu_io_in(wrap: &[String], u: &str, cmds: &[String]) -> Output {
    let mut args = vec!["-f".to_string(), "raw".to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(u.to_string());
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    run_in(wrap, 120, "qemu-io", &args)
}

fn io_ok(o: &Output) -> bool {
    let out = String::from_utf8_lossy(&o.stdout);
    o.status.success() && !out.contains("failed") && !out.contains("error")
}

fn assert_ok(o: &Output, what: &str) {
    assert!(io_ok(o), "{what}: {}\n{}", o.status, text(o));
}

/// [`assert_ok`], with the last lines of every node's log (Raft lines
/// left out) in the failure.
fn assert_ok_in(c: &Cluster, o: &Output, what: &str) {
    if !io_ok(o) {
        let logs: Vec<String> = (0..c.nodes.len())
            .map(|k| {
                let log = c.log(k);
                let lines: Vec<&str> = log.lines().filter(|l| !l.contains("raft")).collect();
                format!("--- node {k}\n{}", lines[lines.len().saturating_sub(60)..].join("\n"))
            })
            .collect();
        panic!("{what}: {}\n{}\n{}", o.status, text(o), logs.join("\n"));
    }
}

fn volume(c: &Cluster, k: usize, name: &str) -> Value {
    c.cli_json(k, &["volume", "show", name])
}

/// Node `k`'s id in the cluster, as `cluster status` names it.
fn node_id(c: &Cluster, via: usize, k: usize) -> u64 {
    let s = c.cli_json(via, &["cluster", "status"]);
    s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["addresses"]["admin"].as_str() == Some(&c.nodes[k].admin.to_string()))
        .unwrap_or_else(|| panic!("node {k} not in {s}"))["id"]
        .as_u64()
        .unwrap()
}

/// `basalt --json volume verify NAME` on node `k`: exit code and report.
fn verify(c: &Cluster, k: usize, name: &str) -> (i32, Value) {
    let out = c.cli(k, &["--json", "volume", "verify", name]);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out)));
    (out.status.code().unwrap(), v)
}

fn fio_json(out: &Output) -> Value {
    let t = String::from_utf8_lossy(&out.stdout);
    // fio's nbd engine prints a line before its JSON.
    let start = t.find(['{', '[']).unwrap_or_else(|| panic!("no JSON from fio: {}", text(out)));
    serde_json::from_str(&t[start..]).unwrap_or_else(|e| panic!("{e}: {t}"))
}

fn fio_args(u: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={u}"),
        "--rw=randrw",
        "--bs=4k",
        "--iodepth=8",
        "--numjobs=2",
        "--size=8M",
        "--offset_increment=8M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        // fio would otherwise drop *-verify.state files in the working directory.
        "--verify_state_save=0",
        "--output-format=json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Both fio jobs finished with no error, having written and read.
fn assert_fio_clean(out: &Output, what: &str) {
    assert!(out.status.success(), "{what}: fio failed: {}", text(out));
    let j = fio_json(out);
    let jobs = j["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2, "{what}: {j}");
    for job in jobs {
        assert_eq!(job["error"], 0, "{what}: {job}");
        assert!(job["write"]["io_bytes"].as_u64().unwrap() > 0, "{what}: {job}");
        assert!(job["read"]["io_bytes"].as_u64().unwrap() > 0, "{what}: {job}");
    }
}

fn create(c: &Cluster, k: usize, name: &str, size: &str) -> Value {
    c.cli_json(
        k,
        &[
            "volume",
            "create",
            name,
            "--size",
            size,
            "--replicas",
            "3",
            "--min-replicas",
            "2",
            "--extent-size",
            "4M",
        ],
    )
}

/// kill -9 of a replica node while `fio --verify` writes through the owner:
/// fio ends with no error and its data verifies; the extents fio wrote
/// lose the killed node by a new epoch and show `degraded`; the untouched
/// ones keep their three replicas. The killed node restarted stays out of
/// those sets (stale until resync) and the owner keeps serving.
#[test]
fn kill9_of_a_replica_during_fio_verify() {
    if !require("fio") || !require("qemu-io") {
        return;
    }
    let mut c = Cluster::start(3, 3);
    c.wait_leader(0, None);
    let v = create(&c, 0, "f", "32M");
    assert_eq!(v["owner"]["node"].as_u64(), Some(node_id(&c, 0, 0)), "{v}");
    let victim = node_id(&c, 0, 2);
    let before: HashMap<u64, u64> = v["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["index"].as_u64().unwrap(), e["epoch"].as_u64().unwrap()))
        .collect();
    assert_eq!(before.len(), 8, "{v}");

    // Two jobs over [0, 8M) and [8M, 16M): extents 0-3. Rate-limited so
    // the workload lasts long enough to be running when the node dies.
    let args = fio_args(&uri(&c, 0, "f"), &["--rate_iops=150"]);
    let s = common::scratch();
    let mut fio = Command::new("fio")
        .args(&args)
        .current_dir(s.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fio");
    std::thread::sleep(Duration::from_secs(4));
    // fio running is not enough: its writes must have reached the owner, or
    // the kill lands before any extent was written through three replicas.
    wait_for("fio's writes to complete on the owner", 60, || {
        c.metric(0, "basalt_volume_write_bytes_total", &[("volume", "f")]) > 0.0
    });
    assert!(fio.try_wait().unwrap().is_none(), "fio ended before the kill: make the workload longer");
    c.kill9(2);
    let out = fio.wait_with_output().unwrap();
    assert_fio_clean(&out, "fio across the kill");

    let v = volume(&c, 0, "f");
    for e in v["extents"].as_array().unwrap() {
        let i = e["index"].as_u64().unwrap();
        let replicas: Vec<u64> =
            e["replicas"].as_array().unwrap().iter().map(|r| r.as_u64().unwrap()).collect();
        if i < 4 {
            assert_eq!(e["state"], "degraded", "extent {i}: {v}");
            assert_eq!(e["epoch"].as_u64().unwrap(), before[&i] + 1, "extent {i}: {v}");
            assert_eq!(replicas.len(), 2, "extent {i}: {v}");
            assert!(!replicas.contains(&victim), "extent {i}: {v}");
        } else {
            assert_eq!(e["state"], "healthy", "extent {i}, never written: {v}");
            assert_eq!(e["epoch"].as_u64().unwrap(), before[&i], "extent {i}: {v}");
            assert_eq!(replicas.len(), 3, "extent {i}: {v}");
        }
    }

    // The killed node comes back: its replicas of extents 0-3 are stale and
    // stay out; the owner serves fio again, and the data reads back through
    // the restarted node too (forwarded to the owner).
    c.spawn(2);
    c.wait_ready(2);
    let out = run("fio", &fio_args(&uri(&c, 0, "f"), &[]).iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert_fio_clean(&out, "fio after the restart");
    let cmds: Vec<String> = vec!["write -P 61 20M 1M".into(), "flush".into(), "read -P 61 20M 1M".into()];
    assert_ok(&qemu_io_in(&[], &uri(&c, 0, "f"), &cmds), "through the owner after the restart");
    assert_ok(
        &qemu_io_in(&[], &uri(&c, 2, "f"), &["read -P 61 20M 1M".into()]),
        "through the restarted node",
    );
    let v = volume(&c, 2, "f");
    for e in v["extents"].as_array().unwrap() {
        let i = e["index"].as_u64().unwrap();
        let replicas: Vec<u64> =
            e["replicas"].as_array().unwrap().iter().map(|r| r.as_u64().unwrap()).collect();
        if i < 4 {
            assert_eq!(e["state"], "degraded", "extent {i}: {v}");
            assert!(!replicas.contains(&victim), "a stale replica rejoined extent {i}: {v}");
        }
    }
    let (code, report) = verify(&c, 1, "f");
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["mismatched"], 0, "{report}");
}

/// kill -9 of all three nodes during a flushed write workload on R=3:
/// after a restart of all, every flushed write reads back through a node
/// that is not the owner, the whole volume reads without error, and
/// `basalt volume verify` finds the replicas identical (reconciled on
/// first access).
#[test]
fn kill9_of_every_node_keeps_every_flushed_write() {
    if !require("nbdsh") || !require("nbdcopy") {
        return;
    }
    let mut c = Cluster::start(3, 3);
    c.wait_leader(0, None);
    create(&c, 0, "w", "32M");
    let blocks: u64 = 8192; // 32 MiB: eight 4 MiB extents
    let s = common::scratch();
    let script = common::write_file(s.path(), "workload.py", WORKLOAD.as_bytes());
    let log = s.path().join("workload.log");
    let mut child = Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(uri(&c, 0, "w"))
        .arg(&log)
        .arg("11")
        .arg(blocks.to_string())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(s.path().join("workload.err")).unwrap())
        .spawn()
        .unwrap();
    let mut flushes = 0;
    for _ in 0..1200 {
        std::thread::sleep(Duration::from_millis(50));
        flushes = std::fs::read_to_string(&log).unwrap_or_default().matches("\nF ").count();
        if flushes >= 60 {
            break;
        }
    }
    assert!(
        flushes >= 10,
        "workload made too little progress ({flushes} flushes): {}",
        std::fs::read_to_string(s.path().join("workload.err")).unwrap_or_default()
    );
    // A workload that stopped (a failed write ends it) would leave the kill
    // to land on idle nodes, with nothing in flight to be lost.
    assert!(
        child.try_wait().unwrap().is_none(),
        "the workload stopped before the kill: {}",
        std::fs::read_to_string(s.path().join("workload.err")).unwrap_or_default()
    );
    for k in 0..3 {
        c.kill9(k);
    }
    let _ = child.kill();
    let _ = child.wait();
    let (want, sent_after) = oracle(&std::fs::read_to_string(&log).unwrap());

    for k in 0..3 {
        c.spawn(k);
    }
    for k in 0..3 {
        c.wait_ready(k);
    }
    c.wait_leader(1, None);
    // Until the cluster has settled who serves the volume, a connection
    // through node 1 may be refused; a read that succeeds means it has.
    wait_for("a read through node 1 after the restart", 120, || {
        io_ok(&qemu_io_in(&[], &uri(&c, 1, "w"), &["read 0 4k".into()]))
    });
    let want_path =
        common::write_file(s.path(), "want.json", serde_json::to_string(&want).unwrap().as_bytes());
    let check = common::write_file(s.path(), "check.py", CHECKER.as_bytes());
    let out = run_in(
        &[],
        300,
        "/usr/bin/python3",
        &[check.to_str().unwrap(), &uri(&c, 1, "w"), want_path.to_str().unwrap()],
    );
    assert!(out.status.success(), "checker: {}\nnode 0:\n{}", text(&out), c.log(0));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!(
        "crash after {flushes} flushes; {} blocks checked, {sent_after} sent after the last flush",
        report["checked"]
    );
    assert!(report["checked"].as_u64().unwrap() > 50, "{report}");
    assert_eq!(report["nbad"], 0, "blocks read back wrong after kill -9 of every node: {report}");
    // Every extent read once (reconciled), then the replicas compared.
    let out = run_in(&[], 300, "nbdcopy", &[&uri(&c, 2, "w"), "null:"]);
    assert!(out.status.success(), "full read after the crash: {}", text(&out));
    let (code, v) = verify(&c, 2, "w");
    assert_eq!(code, 0, "{v}");
    assert_eq!((v["mismatched"].as_u64(), v["incomplete"].as_u64()), (Some(0), Some(0)), "{v}");
    for k in 0..3 {
        assert!(!c.log(k).contains("checksum mismatch"), "node {k}:\n{}", c.log(k));
    }
}

/// A raw peer connection to a real node, past a correct Hello.
struct RawPeer {
    s: TcpStream,
    local: String,
    buf: BytesMut,
}

impl RawPeer {
    fn hello(addr: std::net::SocketAddr, cluster: ClusterId) -> RawPeer {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let local = s.local_addr().unwrap().to_string();
        let hello = Message::Hello(Hello { version: ProtocolVersion::V1, cluster, node: NodeId(0xbad) });
        s.write_all(&encode_to_bytes(0, FrameFlags::NONE, &hello).unwrap()).unwrap();
        let mut r = RawPeer { s, local, buf: BytesMut::new() };
        match r.frame() {
            Some(Frame { message: Message::HelloAck(_), .. }) => r,
            other => panic!("no HelloAck: {other:?}"),
        }
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    fn request(&mut self, id: u64, m: &Message) -> Message {
        self.send(&encode_to_bytes(id, FrameFlags::NONE, m).unwrap());
        let f = self.frame().unwrap_or_else(|| panic!("connection closed instead of answering {m:?}"));
        assert_eq!(f.request_id, id, "{f:?}");
        f.message
    }

    /// The next frame, or None at the end of the stream.
    fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = Decoder::default().decode(&mut self.buf).expect("the node sent a bad frame") {
                return Some(f);
            }
            let mut chunk = [0u8; 65536];
            match self.s.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("reading from the node: {e}"),
            }
        }
    }

    /// A bad frame: answered by `Error` (Malformed), then the connection closes.
    fn expect_malformed_then_closed(&mut self, bytes: &[u8]) -> String {
        self.send(bytes);
        let f = self.frame().expect("an error frame before the close");
        let Message::Error(e) = &f.message else { panic!("{f:?}") };
        assert_eq!(e.code, basalt::proto::peer::ErrorCode::Malformed, "{f:?}");
        assert!(self.frame().is_none(), "the connection closes after a bad frame");
        e.message.clone()
    }
}

/// A frame with correct checksums around any header fields and payload.
fn raw_frame(kind: u16, id: u64, declared_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&kind.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&declared_len.to_le_bytes());
    b.extend_from_slice(&id.to_le_bytes());
    b.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let h = crc32c::crc32c(&b[..28]);
    b.extend_from_slice(&h.to_le_bytes());
    assert_eq!(b.len(), HEADER_LEN);
    b.extend_from_slice(payload);
    b
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn vm_hwm(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

fn count(log: &str, needle: &str, text: &str) -> usize {
    log.lines().filter(|l| l.contains(needle) && l.contains(text)).count()
}

/// Hostile peers on a real node's peer port, after a correct Hello:
/// malformed, truncated and oversized frames get a Malformed error and a
/// closed connection with one log line each; stale generations and epochs,
/// unknown volumes, bad ranges get the exact refusal on a connection that
/// stays open, with a log line; held half-sent frames of the largest size
/// do not grow the daemon's memory past its budget; a real client is
/// served all along.
#[test]
fn hostile_peers_get_errors_and_the_node_keeps_serving() {
    if !require("qemu-io") {
        return;
    }
    // The hostile peer talks to node 1, a replica of every extent (R=3 of
    // 3) but not the owner; the real client goes through node 1 as well
    // (forwarded to the owner, node 0).
    let c = Cluster::start(3, 3);
    c.wait_leader(0, None);
    create(&c, 0, "h", "16M");
    let u = uri(&c, 1, "h");
    assert_ok(&qemu_io_in(&[], &u, &["write -P 5 0 1M".into(), "flush".into()]), "a real client");
    let show = volume(&c, 0, "h");
    let status = c.cli_json(0, &["cluster", "status"]);
    let cluster = ClusterId(u128::from_str_radix(status["id"].as_str().unwrap(), 16).unwrap());
    let vol = VolumeId(show["id"].as_u64().unwrap());
    let generation = Generation(show["owner"]["generation"].as_u64().unwrap());
    let epoch = Epoch(show["extents"][0]["epoch"].as_u64().unwrap());
    assert!(generation.0 >= 1 && epoch.0 >= 1, "{show}");
    let peer = c.nodes[1].peer;
    let pid = c.pid(1).unwrap();
    let target = |volume: VolumeId, extent: u64, epoch: Epoch, generation: Generation| ExtentTarget {
        volume,
        extent: ExtentIndex(extent),
        epoch,
        generation,
    };
    let write = |t: ExtentTarget, offset: u64, data: Bytes| {
        Message::ExtentWrite(ExtentWrite { target: t, offset, fua: false, copy: false, data })
    };
    let data = Bytes::from(vec![0xee; 4096]);

    // Refusals of well-formed requests: the exact error, the connection
    // stays open. One a little over a second apart, so each gets its warn
    // line (the replica rate-limits them to one a second).
    let mut r = RawPeer::hello(peer, cluster);
    let cases: Vec<(Message, &str)> = vec![
        (write(target(vol, 0, epoch, Generation(generation.0 - 1)), 0, data.clone()), "StaleGeneration"),
        (write(target(vol, 0, Epoch(epoch.0 - 1), generation), 0, data.clone()), "StaleEpoch"),
        (write(target(VolumeId(987_654), 0, epoch, generation), 0, data.clone()), "NotFound"),
        (write(target(vol, u64::MAX, epoch, generation), 0, data.clone()), "NotFound"),
        (write(target(vol, 0, epoch, generation), (4 << 20) - 512, data.clone()), "OutOfRange"),
        (write(target(vol, 0, epoch, generation), 1, data.clone()), "Misaligned"),
        (
            // 8 MiB from a 4 MiB extent.
            Message::ExtentRead(ExtentRead {
                target: target(vol, 0, epoch, generation),
                offset: 0,
                len: 8 << 20,
            }),
            "OutOfRange",
        ),
    ];
    for (i, (m, want)) in cases.iter().enumerate() {
        let reply = r.request(100 + i as u64, m);
        let Message::ExtentErr(e) = &reply else { panic!("case {i}: {reply:?}") };
        let got = format!("{:?}", e.error);
        assert!(got.starts_with(want), "case {i}: want {want}, got {reply:?}");
        if let ExtentError::StaleGeneration { current } = e.error {
            assert_eq!(current, generation, "{reply:?}");
        }
        if let ExtentError::StaleEpoch { current } = e.error {
            assert_eq!(current, epoch, "{reply:?}");
        }
        std::thread::sleep(Duration::from_millis(1100));
    }
    // Volume-level requests for a volume not known, or of a stale generation.
    let vw = |volume: VolumeId, generation: Generation| {
        Message::VolumeWrite(VolumeWrite {
            target: VolumeTarget { volume, generation },
            offset: 0,
            fua: false,
            any_byte: false,
            data: data.clone(),
        })
    };
    let not_owner = |reply: &Message| match reply {
        Message::VolumeErr(e) => match e.fault {
            basalt::proto::peer::VolumeFault::NotOwner { generation } => Some(generation),
            _ => None,
        },
        _ => None,
    };
    // Node 1 does not own the volume: it says so, naming the generation it
    // knows (none, g0, for a volume it does not know).
    let reply = r.request(200, &vw(VolumeId(987_654), generation));
    assert_eq!(not_owner(&reply), Some(Generation(0)), "{reply:?}");
    let reply = r.request(201, &vw(vol, Generation(generation.0 - 1)));
    assert_eq!(not_owner(&reply), Some(generation), "{reply:?}");
    // The owner (node 0) refuses a forwarded write naming an older
    // generation, naming the current one.
    let mut o = RawPeer::hello(c.nodes[0].peer, cluster);
    let reply = o.request(202, &vw(vol, Generation(generation.0 - 1)));
    assert_eq!(not_owner(&reply), Some(generation), "{reply:?}");
    drop(o);
    // Still open, still answering.
    assert_eq!(r.request(300, &Message::Ping), Message::Pong);
    let log = c.log(1);
    let refused = count(&log, &r.local, "extent request refused");
    assert_eq!(refused, cases.len(), "one warn line per refusal:\n{log}");
    drop(r);

    // Malformed frames: an error, a close, one log line per connection.
    let good =
        encode_to_bytes(7, FrameFlags::NONE, &write(target(vol, 0, epoch, generation), 0, data.clone()))
            .unwrap()
            .to_vec();
    let mut bad_magic = good.clone();
    bad_magic[..4].copy_from_slice(b"HTTP");
    let mut bad_crc = good.clone();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0xff;
    let overflow = encode_to_bytes(
        12,
        FrameFlags::NONE,
        &write(target(vol, 0, epoch, generation), u64::MAX - 511, data.clone()),
    )
    .unwrap()
    .to_vec();
    let read_max = encode_to_bytes(
        13,
        FrameFlags::NONE,
        &Message::ExtentRead(ExtentRead {
            target: target(vol, 0, epoch, generation),
            offset: 0,
            len: u32::MAX,
        }),
    )
    .unwrap()
    .to_vec();
    let malformed: Vec<(&str, Vec<u8>)> = vec![
        ("offset + len overflows", overflow),
        ("read over the largest payload", read_max),
        ("bad magic", bad_magic),
        ("payload checksum", bad_crc),
        ("truncated body", raw_frame(Kind::ExtentWrite as u16, 8, 3, &[1, 2, 3])),
        ("unknown kind", raw_frame(4242, 9, 0, &[])),
        // Declares 1 GiB: refused from the header, before any payload.
        ("oversized length", raw_frame(Kind::ExtentWrite as u16, 10, 1 << 30, &[])),
        ("length u32::MAX", raw_frame(Kind::ExtentWrite as u16, 11, u32::MAX, &[])),
    ];
    for (what, bytes) in &malformed {
        let mut r = RawPeer::hello(peer, cluster);
        let why = r.expect_malformed_then_closed(bytes);
        eprintln!("{what}: {why}");
        wait_for("the bad-frame log line", 30, || count(&c.log(1), &r.local, "bad frame from peer") == 1);
    }
    assert_ok(&qemu_io_in(&[], &u, &["read -P 5 0 1M".into()]), "a real client after the malformed frames");

    // Memory: 12 connections each send the header of a largest-size write
    // (32 MiB of data) and 8 MiB of it, then hold. The daemon may buffer
    // what arrives, within its payload budget (256 MiB here), never what a
    // header merely declares.
    let before = vm_hwm(pid);
    let mut held = Vec::new();
    let big = Bytes::from(vec![0x11u8; 32 << 20]);
    let frame =
        encode_to_bytes(50, FrameFlags::NONE, &write(target(vol, 1, epoch, generation), 0, big)).unwrap();
    for _ in 0..12 {
        let mut r = RawPeer::hello(peer, cluster);
        r.s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut sent = 0;
        while sent < (8 << 20) + HEADER_LEN {
            match r.s.write(&frame[sent..(8 << 20) + HEADER_LEN]) {
                Ok(n) => sent += n,
                Err(_) => break, // the node stopped reading: backpressure
            }
        }
        held.push(r);
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_ok(
        &qemu_io_in(&[], &u, &["write -P 6 1M 1M".into(), "read -P 6 1M 1M".into()]),
        "while peers hold",
    );
    let during = vm_hwm(pid);
    drop(held);
    // And 200 connections that declare 1 GiB each.
    for i in 0..200u64 {
        let mut r = RawPeer::hello(peer, cluster);
        r.expect_malformed_then_closed(&raw_frame(Kind::ExtentWrite as u16, 1000 + i, 1 << 30, &[]));
    }
    let after = vm_hwm(pid);
    eprintln!(
        "daemon VmHWM: {} MiB before, {} MiB while 12 peers held 8 MiB each, {} MiB after",
        before >> 20,
        during >> 20,
        after >> 20
    );
    // The daemon's payload budget (256 MiB in the test config) plus room
    // for its own working set.
    const BOUND: u64 = 320 << 20;
    assert!(after < BOUND, "VmHWM {after} bytes over the {BOUND}-byte bound");
    assert_ok(
        &qemu_io_in(&[], &u, &["read -P 5 0 1M".into(), "read -P 6 1M 1M".into()]),
        "a real client at the end",
    );
    for k in 0..3 {
        assert!(!c.log(k).contains("panicked"), "node {k}:\n{}", c.log(k));
    }
}

// --- network partition (namespaces, as in tests/cluster_partition.rs)

/// One client connection kept open through the partition: writes block i
/// (4 KiB, every 8 bytes = i + 1) one after another, logging `S i` before
/// and `OK i` or `ERR i ERRNO-NAME` after each, until the stop file appears.
/// After each write it reads 4 KiB at 9 MiB, which the new owner writes
/// (0x16 bytes) during the partition, and logs what it saw: `R new`,
/// `R zero` (the old data), `R other` or `R err ERRNO-NAME`.
const WRITER: &str = r#"
import nbd, os, struct, sys, time
uri, log_path, stop = sys.argv[1], sys.argv[2], sys.argv[3]
h = nbd.NBD(); h.connect_uri(uri)
log = open(log_path, "w", buffering=1)
i = 0
while not os.path.exists(stop) and i < 2048:
    log.write(f"S {i}\n"); log.flush()
    try:
        h.pwrite(struct.pack("<Q", i + 1) * 512, i * 4096)
        log.write(f"OK {i}\n")
    except nbd.Error as e:
        log.write(f"ERR {i} {e.errno}\n")
    try:
        d = h.pread(4096, 9 << 20)
        log.write("R new\n" if d == b"\x16" * 4096 else "R zero\n" if d == bytes(4096) else "R other\n")
    except nbd.Error as e:
        log.write(f"R err {e.errno}\n")
    log.flush()
    i += 1
    time.sleep(0.1)
"#;

/// Reads blocks 0..n: those in `ok` must hold their write, the others
/// their write or zeros. Prints the blocks that do not.
const WRITER_CHECK: &str = r#"
import nbd, struct, sys, json
h = nbd.NBD(); h.connect_uri(sys.argv[1])
n, ok = int(sys.argv[2]), set(json.loads(sys.argv[3]))
bad = []
for i in range(n):
    d = h.pread(4096, i * 4096)
    mine = struct.pack("<Q", i + 1) * 512
    if d != mine and (i in ok or d != bytes(4096)):
        bad.append(i)
print(json.dumps(bad))
"#;

/// Sends pre-encoded frames (a Hello, then one request) to a peer address
/// and prints the two answers as hex: run inside a node's namespace, it
/// speaks to the others as that node would.
const RAW_PEER: &str = r#"
import socket, struct, sys
host, port, frames = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
hello_len = 32 + struct.unpack("<I", frames[12:16])[0]
s = socket.create_connection((host, port), timeout=60)
def frame():
    h = b""
    while len(h) < 32:
        c = s.recv(32 - len(h)); assert c, "closed"; h += c
    n = struct.unpack("<I", h[12:16])[0]; p = b""
    while len(p) < n:
        c = s.recv(n - len(p)); assert c, "closed"; p += c
    return h + p
s.sendall(frames[:hello_len]); a = frame()
s.sendall(frames[hello_len:]); b = frame()
print(a.hex()); print(b.hex())
"#;

fn decode_hex(s: &str) -> Frame {
    let bytes: Vec<u8> =
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect();
    Decoder::default().decode(&mut BytesMut::from(&bytes[..])).unwrap().unwrap()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The owner cut off from the other two nodes: its client's writes fail
/// with EIO once its lease runs out; a client through another node gets
/// the volume with a new generation and the data written before the cut;
/// after the link heals, the replicas refuse the old generation, every
/// write the old owner acknowledged reads back, and `volume verify` is
/// clean.
#[test]
fn partitioned_owner_is_fenced_and_the_majority_takes_over() {
    if !require("ip") || !require("qemu-io") || !require("nbdsh") || !require("nbdcopy") {
        return;
    }
    let net = Net::new("bsf", 232, 3);
    let ips: Vec<String> = (0..3).map(|k| net.addr(k)).collect();
    let mut c = Cluster::configure(3, 3, Some(ips));
    for k in 0..3 {
        c.nodes[k].wrap = net.wrap(k);
    }
    for k in 0..3 {
        c.spawn(k);
    }
    for k in 0..3 {
        c.wait_ready(k);
    }
    let leader = c.wait_leader(0, None);
    // The owner is not the Raft leader: the majority keeps its leader.
    let a = (leader + 1) % 3;
    let b = leader;
    // a names the leader too before it is asked to create the volume.
    assert_eq!(c.wait_leader(a, None), leader);
    let a_id = node_id(&c, a, a);
    let b_id = node_id(&c, a, b);
    let v = create(&c, a, "p", "16M");
    assert_eq!(v["owner"]["node"].as_u64(), Some(a_id), "{v}");
    let wa = net.wrap(a);
    let wb = net.wrap(b);
    let (ua, ub) = (uri(&c, a, "p"), uri(&c, b, "p"));
    assert_ok_in(
        &c,
        &qemu_io_in(&wa, &ua, &["write -P 21 8M 1M".into(), "flush".into()]),
        "through the owner",
    );
    let gen_before = volume(&c, a, "p")["owner"]["generation"].as_u64().unwrap();

    let s = common::scratch();
    let script = common::write_file(s.path(), "writer.py", WRITER.as_bytes());
    let log = s.path().join("writer.log");
    let stop = s.path().join("stop");
    let mut writer = Command::new("ip")
        .args(["netns", "exec", &net.nodes[a], "/usr/bin/python3"])
        .arg(&script)
        .arg(&ua)
        .arg(&log)
        .arg(&stop)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(s.path().join("writer.err")).unwrap())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("10 writes through the owner", 120, || read_log().matches("OK ").count() >= 10);

    net.link(a, false);
    let cut_at = read_log().lines().filter(|l| l.starts_with("S ")).count();
    wait_for("a write through the cut-off owner to fail", 180, || read_log().contains("ERR "));
    let first_err = read_log().lines().find(|l| l.starts_with("ERR ")).unwrap().to_string();
    assert!(first_err.ends_with(" EIO"), "the first failed write gets EIO: {first_err}\n{}", read_log());

    // Through node b: it takes the volume over once a is marked down.
    let mut last = None;
    wait_for("node b to serve the volume", 180, || {
        let o = qemu_io_in(&wb, &ub, &["read -P 21 8M 1M".into()]);
        let ok = io_ok(&o);
        last = Some(text(&o));
        ok
    });
    assert_ok(&qemu_io_in(&wb, &ub, &["write -P 22 9M 1M".into(), "flush".into()]), "through b");
    // From here on, no read through the old owner may return the old data.
    let new_written_at = read_log().len();
    let v = volume(&c, b, "p");
    assert_eq!(v["owner"]["node"].as_u64(), Some(b_id), "{v}");
    assert_eq!(v["owner"]["generation"].as_u64(), Some(gen_before + 1), "{v}");

    // Every write sent after the cut that has an answer by now failed
    // with EIO: the cut-off owner acknowledged nothing.
    let at_heal = read_log();
    let answered_during: Vec<&str> = at_heal
        .lines()
        .filter(|l| l.starts_with("OK ") || l.starts_with("ERR "))
        .filter(|l| l.split(' ').nth(1).unwrap().parse::<usize>().unwrap() >= cut_at)
        .collect();
    assert!(!answered_during.is_empty());
    for l in &answered_during {
        assert!(l.starts_with("ERR ") && l.ends_with(" EIO"), "during the partition: {l}\n{at_heal}");
    }
    let healed_at = at_heal.lines().filter(|l| l.starts_with("S ")).count();
    net.link(a, true);
    wait_for("node a to see the new owner", 120, || {
        let o = c.cli(a, &["--json", "volume", "show", "p"]);
        o.status.success()
            && serde_json::from_slice::<Value>(&o.stdout)
                .is_ok_and(|v| v["owner"]["node"].as_u64() == Some(b_id))
    });
    std::thread::sleep(Duration::from_secs(3));
    // The stale-read check below is worth something only if reads through
    // the old owner succeeded after the new owner's write: had they all
    // failed, or the writer ended, it would pass with nothing checked.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !read_log()[new_written_at..].lines().any(|l| l == "R new") {
        assert!(
            Instant::now() < deadline,
            "no read through the old owner returned the new owner's data after the heal \
             (writer ended: {}):\n{}",
            writer.try_wait().unwrap().is_some(),
            read_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::write(&stop, b"").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while writer.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = writer.kill();
    let _ = writer.wait();

    let wlog = read_log();
    let stale: Vec<&str> =
        wlog[new_written_at..].lines().filter(|l| *l == "R zero" || *l == "R other").collect();
    let fresh = wlog[new_written_at..].lines().filter(|l| *l == "R new").count();
    eprintln!("reads through the old owner after the new owner wrote: {fresh} new, {} stale", stale.len());
    assert!(fresh > 0, "no read through the old owner returned the new owner's data:\n{wlog}");
    assert!(stale.is_empty(), "the old owner served data older than the new owner's write:\n{wlog}");
    // The replicas refuse a write of the old generation, sent from a's
    // namespace as the old owner would send it.
    let status = c.cli_json(b, &["cluster", "status"]);
    let cluster = ClusterId(u128::from_str_radix(status["id"].as_str().unwrap(), 16).unwrap());
    let raw = common::write_file(s.path(), "raw.py", RAW_PEER.as_bytes());
    let e0 = &v["extents"][2]; // 8M: written by both owners
    let t = ExtentTarget {
        volume: VolumeId(v["id"].as_u64().unwrap()),
        extent: ExtentIndex(e0["index"].as_u64().unwrap()),
        epoch: Epoch(e0["epoch"].as_u64().unwrap()),
        generation: Generation(gen_before),
    };
    let mut frames = encode_to_bytes(
        0,
        FrameFlags::NONE,
        &Message::Hello(Hello { version: ProtocolVersion::V1, cluster, node: NodeId(a_id) }),
    )
    .unwrap()
    .to_vec();
    let w = ExtentWrite { target: t, offset: 0, fua: true, copy: false, data: Bytes::from(vec![0x99; 4096]) };
    frames.extend_from_slice(&encode_to_bytes(9, FrameFlags::NONE, &Message::ExtentWrite(w)).unwrap());
    for k in (0..3).filter(|&k| k != a) {
        let o = run_in(
            &wa,
            60,
            "/usr/bin/python3",
            &[
                raw.to_str().unwrap(),
                &c.nodes[k].peer.ip().to_string(),
                &c.nodes[k].peer.port().to_string(),
                &hex(&frames),
            ],
        );
        assert!(o.status.success(), "raw peer to node {k}: {}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let mut lines = out.lines();
        assert!(matches!(decode_hex(lines.next().unwrap()).message, Message::HelloAck(_)));
        let reply = decode_hex(lines.next().unwrap()).message;
        match &reply {
            Message::ExtentErr(e) => {
                assert_eq!(
                    e.error,
                    ExtentError::StaleGeneration { current: Generation(gen_before + 1) },
                    "node {k}"
                )
            }
            other => panic!("node {k} took a write of the old generation: {other:?}"),
        }
    }

    // Every write the old owner acknowledged reads back through b; the
    // others read back as written or as zeros.
    let wlog = read_log();
    let sent = wlog.lines().filter(|l| l.starts_with("S ")).count();
    let ok: Vec<usize> =
        wlog.lines().filter_map(|l| l.strip_prefix("OK ")).map(|n| n.parse().unwrap()).collect();
    let errs = wlog.lines().filter(|l| l.starts_with("ERR ")).count();
    let oks_after_heal = ok.iter().filter(|&&i| i >= healed_at).count();
    eprintln!(
        "writer: {sent} sent, {} acknowledged ({oks_after_heal} after the heal), {errs} failed ({} during the \
         partition); first error: {first_err}",
        ok.len(),
        answered_during.len()
    );
    let check = common::write_file(s.path(), "check.py", WRITER_CHECK.as_bytes());
    let o = run_in(
        &wb,
        300,
        "/usr/bin/python3",
        &[check.to_str().unwrap(), &ub, &sent.to_string(), &serde_json::to_string(&ok).unwrap()],
    );
    assert!(o.status.success(), "check: {}", text(&o));
    let bad: Vec<usize> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(bad.is_empty(), "blocks that read back wrong through the new owner: {bad:?}\n{wlog}");
    assert_ok(
        &qemu_io_in(&wb, &ub, &["read -P 21 8M 1M".into(), "read -P 22 9M 1M".into()]),
        "both owners' data",
    );
    // Every extent read once (reconciled), then the replicas compared.
    let o = run_in(&wb, 300, "nbdcopy", &[&ub, "null:"]);
    assert!(o.status.success(), "full read: {}", text(&o));
    let (code, report) = verify(&c, b, "p");
    assert_eq!(code, 0, "{report}");
    assert_eq!(
        (report["mismatched"].as_u64(), report["incomplete"].as_u64()),
        (Some(0), Some(0)),
        "{report}"
    );
    for k in 0..3 {
        c.kill9(k);
    }
    drop(net);
}

/// An R=1 volume is served by its owner from its own store; the replica
/// service on that node must still refuse a peer's write of an older
/// owner generation (after a clean restart, so no crash recovery is in the
/// way), and the volume's data must stay what its client wrote.
#[test]
fn stale_generation_write_to_an_r1_volume_is_refused() {
    if !require("qemu-io") {
        return;
    }
    let mut c = Cluster::start(1, 1);
    c.wait_leader(0, None);
    c.cli_json(0, &["volume", "create", "one", "--size", "8M", "--replicas", "1", "--extent-size", "4M"]);
    let u = uri(&c, 0, "one");
    assert_ok_in(&c, &qemu_io_in(&[], &u, &["write -P 5 0 64k".into(), "flush".into()]), "a real client");
    assert_eq!(c.terminate(0), Some(0));
    c.spawn(0);
    c.wait_ready(0);
    c.wait_leader(0, None);
    let show = volume(&c, 0, "one");
    let status = c.cli_json(0, &["cluster", "status"]);
    let cluster = ClusterId(u128::from_str_radix(status["id"].as_str().unwrap(), 16).unwrap());
    let generation = Generation(show["owner"]["generation"].as_u64().unwrap());
    assert!(generation.0 >= 1, "{show}");
    let t = ExtentTarget {
        volume: VolumeId(show["id"].as_u64().unwrap()),
        extent: ExtentIndex(0),
        epoch: Epoch(show["extents"][0]["epoch"].as_u64().unwrap()),
        generation: Generation(generation.0 - 1),
    };
    let mut r = RawPeer::hello(c.nodes[0].peer, cluster);
    let w = ExtentWrite { target: t, offset: 0, fua: true, copy: false, data: Bytes::from(vec![0xee; 4096]) };
    let reply = r.request(1, &Message::ExtentWrite(w));
    let data = qemu_io_in(&[], &u, &["read -P 5 0 64k".into()]);
    assert_eq!(
        reply,
        Message::ExtentErr(basalt::proto::peer::ExtentErr {
            error: ExtentError::StaleGeneration { current: generation },
            message: match &reply {
                Message::ExtentErr(e) => e.message.clone(),
                _ => String::new(),
            },
        }),
        "a write of generation {} to an R=1 volume of generation {}; the client now reads: {}",
        generation.0 - 1,
        generation.0,
        text(&data)
    );
    assert_ok_in(&c, &data, "the client's data is untouched");
}
