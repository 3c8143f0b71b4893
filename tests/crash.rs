//! A real crash: kill -9 basaltd in the middle of a write workload over NBD
//! that flushes now and then; restart it; every write acknowledged before
//! the last completed FLUSH must read back exactly, every later write must
//! read back per 512-byte sector as the old or a newer value, and no block
//! may fail its checksum (invariant 7 of docs/design.md).

mod common;

use common::{Daemon, require};
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The workload: batches of 8 concurrent 4 KiB writes at random blocks,
/// one FLUSH after each batch.
/// Every sector of a write holds (block, generation, sector) so a torn
/// write is recognisable sector by sector. It logs `W block gen` before each
/// write is sent and `F n` after each FLUSH completes, fsyncing its log so
/// the test sees exactly what was acknowledged.
const WORKLOAD: &str = r#"
import nbd, os, random, struct, sys
uri, log_path, seed, blocks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
log = open(log_path, "w", buffering=1)
gen = 0
def content(b, g):
    return b"".join(struct.pack("<QQQ", b, g, s) + bytes(512 - 24) for s in range(8))
flushes = 0
while True:
    # 8 writes in flight at once on distinct blocks, then one FLUSH.
    batch = []
    for b in rng.sample(range(blocks), 8):
        gen += 1
        batch.append((b, gen))
        log.write(f"W {b} {gen}\n")
    log.flush(); os.fsync(log.fileno())
    cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(content(b, g))), b * 4096) for b, g in batch]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)  # raises if the write failed
    for b, g in batch:
        log.write(f"A {b} {g}\n")
    h.flush()
    flushes += 1
    log.write(f"F {flushes}\n"); log.flush(); os.fsync(log.fileno())
"#;

#[test]
fn kill9_during_writes_keeps_flushed_data_and_checksums() {
    if !require("nbdsh") {
        return;
    }
    let blocks: u64 = 32768; // 128 MiB: two 64 MiB extents
    let mut d = Daemon::start("256M", &[]);
    let dir = tempfile::tempdir().unwrap();
    let script = common::write_file(dir.path(), "workload.py", WORKLOAD.as_bytes());
    let log = dir.path().join("workload.log");
    let mut child = Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(d.uri())
        .arg(&log)
        .arg("7")
        .arg(blocks.to_string())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("workload.err")).unwrap())
        .spawn()
        .unwrap();
    // Let the workload get a few hundred flushes in, then pull the plug.
    let mut flushes = 0;
    for _ in 0..600 {
        std::thread::sleep(Duration::from_millis(50));
        flushes = std::fs::read_to_string(&log).unwrap_or_default().matches("\nF ").count();
        if flushes >= 200 {
            break;
        }
    }
    assert!(
        flushes >= 20,
        "workload made too little progress ({flushes} flushes): {}",
        std::fs::read_to_string(dir.path().join("workload.err")).unwrap_or_default()
    );
    d.kill9();
    let _ = child.wait();

    // Replay the log: `durable` = generation of each block as of the last
    // completed FLUSH; `later` = generations sent after it (may or may not land).
    let text = std::fs::read_to_string(&log).unwrap();
    let mut acked: HashMap<u64, u64> = HashMap::new();
    let mut durable: HashMap<u64, u64> = HashMap::new();
    let mut sent_since_flush: Vec<(u64, u64)> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["W", b, g] => sent_since_flush.push((b.parse().unwrap(), g.parse().unwrap())),
            ["A", b, g] => {
                acked.insert(b.parse().unwrap(), g.parse().unwrap());
            }
            ["F", _] => {
                durable = acked.clone();
                sent_since_flush.clear();
            }
            _ => {} // a torn last line
        }
    }
    // Writes sent after the last flush but possibly acknowledged.
    let mut maybe: HashMap<u64, Vec<u64>> = HashMap::new();
    for (b, g) in &sent_since_flush {
        maybe.entry(*b).or_default().push(*g);
    }

    d.restart();
    let checker = r#"
import nbd, struct, sys, json
h = nbd.NBD(); h.connect_uri(sys.argv[1])
want = json.load(open(sys.argv[2]))
bad = []
for b, (old, later) in want.items():
    b = int(b)
    data = h.pread(4096, b * 4096)
    for s in range(8):
        sec = data[s*512:(s+1)*512]
        ok_vals = ([old] if old is not None else []) + later
        if old is None and sec == bytes(512):
            continue
        bb, g, ss = struct.unpack("<QQQ", sec[:24])
        if bb != b or ss != s or g not in ok_vals or sec[24:] != bytes(488):
            bad.append((b, s, bb, g, ss, old, later))
print(json.dumps({"checked": len(want), "bad": bad[:20], "nbad": len(bad)}))
"#;
    let mut want: HashMap<String, (Option<u64>, Vec<u64>)> = HashMap::new();
    for (b, g) in &durable {
        want.insert(b.to_string(), (Some(*g), maybe.get(b).cloned().unwrap_or_default()));
    }
    for (b, gs) in &maybe {
        want.entry(b.to_string()).or_insert((None, gs.clone()));
    }
    let want_path =
        common::write_file(dir.path(), "want.json", serde_json::to_string(&want).unwrap().as_bytes());
    let check_path = common::write_file(dir.path(), "check.py", checker.as_bytes());
    let out = common::run_ok(
        "/usr/bin/python3",
        &[check_path.to_str().unwrap(), &d.uri(), want_path.to_str().unwrap()],
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!(
        "crash after {flushes} flushes; {} blocks checked, {} sent after the last flush",
        report["checked"],
        sent_since_flush.len()
    );
    assert!(report["checked"].as_u64().unwrap() > 100, "{report}");
    assert_eq!(report["nbad"], 0, "blocks read back wrong after kill -9: {report}");

    // Every block of the written range must read without a checksum error.
    let out = common::run("nbdcopy", &[&d.uri(), "null:"]);
    assert!(out.status.success(), "full read after crash failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!d.log_text().contains("checksum mismatch"), "checksum errors after crash:\n{}", d.log_text());
    assert_eq!(d.terminate(), Some(0));
}
