//! The flushed-write oracle of the crash tests (tests/crash.rs on one
//! node, tests/replicated_faults.rs on R=3): a workload that logs what it
//! sent, what was acknowledged and which FLUSHes completed, the rule that
//! log implies for each block, and a checker that reads every block back.

use std::collections::HashMap;

/// The workload: batches of 8 concurrent 4 KiB
/// writes at random blocks, one FLUSH after each. Every sector names
/// (block, generation, sector); the log says `W block gen` before a write
/// is sent, `A block gen` once acknowledged, and `F n` after each FLUSH.
pub const WORKLOAD: &str = r#"
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
        assert h.aio_command_completed(c)
    for b, g in batch:
        log.write(f"A {b} {g}\n")
    h.flush()
    flushes += 1
    log.write(f"F {flushes}\n"); log.flush(); os.fsync(log.fileno())
"#;

/// Reads every block of the oracle: a block flushed must hold exactly its
/// durable generation or one sent later; a block only sent later may also
/// still be zeros.
pub const CHECKER: &str = r#"
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

/// Block (as a JSON key) -> (durable generation, generations sent later).
pub type Want = HashMap<String, (Option<u64>, Vec<u64>)>;

/// The oracle from a workload log: block -> (generation durable at the
/// last completed FLUSH, generations sent after it).
pub fn oracle(log: &str) -> (Want, usize) {
    let mut acked: HashMap<u64, u64> = HashMap::new();
    let mut durable: HashMap<u64, u64> = HashMap::new();
    let mut since: Vec<(u64, u64)> = Vec::new();
    for line in log.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["W", b, g] => since.push((b.parse().unwrap(), g.parse().unwrap())),
            ["A", b, g] => {
                acked.insert(b.parse().unwrap(), g.parse().unwrap());
            }
            ["F", _] => {
                durable = acked.clone();
                since.clear();
            }
            _ => {} // a torn last line
        }
    }
    let mut maybe: HashMap<u64, Vec<u64>> = HashMap::new();
    for (b, g) in &since {
        maybe.entry(*b).or_default().push(*g);
    }
    let mut want: Want = HashMap::new();
    for (b, g) in &durable {
        want.insert(b.to_string(), (Some(*g), maybe.get(b).cloned().unwrap_or_default()));
    }
    for (b, gs) in &maybe {
        want.entry(b.to_string()).or_insert((None, gs.clone()));
    }
    (want, since.len())
}
