//! Crash after crash: kill -9 basaltd several times in the middle of a mixed
//! NBD workload, restart it each time (alternating the io_uring and psync
//! engines, on a real disk), and check every sector of the volume after each
//! restart against an oracle (invariant 7 of docs/design.md).
//!
//! tests/crash.rs kills once during aligned 4 KiB writes. This test aims at
//! what that one cannot reach: read-modify-write of partial blocks, writes
//! that straddle extents, TRIM and WRITE_ZEROES next to writes, FUA, and
//! above all damage that an earlier crash leaves behind and only a later
//! one shows (a sub-block write into a block whose earlier write was lost,
//! say). So what each check reads back becomes the baseline of the next
//! cycle, and every workload aims a quarter of its operations at the ranges
//! the previous crash left in doubt.
//!
//! The workload (Python, libnbd) sends batches of up to 8 operations at
//! once on non-overlapping 512-byte-aligned ranges (they may share 4 KiB
//! blocks), waits for all of them, and then FLUSHes most of the time:
//! writes of 1 to 400 sectors, some with FUA; TRIM; WRITE_ZEROES with and
//! without NO_HOLE. Every sector a write carries names itself: magic,
//! sector number, the write's generation, a check word over those, and a
//! body derived from the check word, so a torn, stale, misplaced or
//! garbage sector is told apart from a good one sector by sector. The
//! workload logs each operation before sending it and its ack, and each
//! FLUSH after it completes, fsyncing the log, so the test knows exactly
//! what was acknowledged.
//!
//! The oracle, per sector: after a crash it may hold its durable value (as
//! of the last completed FLUSH, or of a FUA operation acknowledged since)
//! or any value sent to it after that point; nothing else. TRIM counts as
//! zeros: Basalt's TRIM is WRITE_ZEROES with deallocation
//! (`storage::Extent::trim`): whole 4 KiB blocks are punched out and the
//! partial blocks at either end are written with zeros, so an acknowledged
//! TRIM reads back as zeros exactly, and an unflushed one as old or zero per
//! sector like any other unflushed write. Sectors never written must read
//! as zeros. After each restart the test also reads the whole volume with
//! nbdcopy (no EIO allowed) and fails on any "checksum mismatch" in the
//! daemon's log. At the end a clean shutdown and restart must change
//! nothing.
//!
//! One cycle runs long and keeps to 2 MiB of the volume, so the daemon's
//! dirty regions elsewhere idle through its hysteresis (1024 flushes) and
//! go clean: recovery trusts clean regions without re-reading them, so a
//! region marked clean too early shows as a checksum error after the crash.
//!
//! What kill -9 cannot show: whatever the kernel accepted survives the
//! process, so a missing fdatasync, or writes lost, reordered or torn by
//! power loss, go unseen here; the mem-engine property test
//! (tests/storage_crash.rs) crashes a disk model that does all that.
//!
//! `BASALT_CRASH_SEED=n` picks another workload (the kill times vary from
//! run to run anyway); a failure prints the seed and the cycle, and keeps
//! the workload logs.

mod common;

use common::{Daemon, require};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECTOR: u64 = 512;
const VOLUME_SIZE: u64 = 64 << 20;
const EXTENT_SIZE: u64 = 8 << 20;
const CYCLES: usize = 10;
/// The cycle whose workload, after [`UNFOCUSED_FLUSHES`] flushes, stays
/// within [`FOCUS`] for [`FOCUS_FLUSHES`] more: long enough for the regions
/// of extents 0 and 1 outside it to idle through the daemon's hysteresis
/// and be marked clean, table pages deferred in the first phase included.
/// So the following crashes find clean regions (never re-checked by
/// recovery) next to dirty ones, and later cycles write into clean regions
/// again.
const FOCUS_CYCLE: usize = 4;
const UNFOCUSED_FLUSHES: usize = 100;
/// The last MiB of extent 0 and the first of extent 1, in sectors.
const FOCUS: (u64, u64) = ((EXTENT_SIZE - (1 << 20)) / SECTOR, (2 << 20) / SECTOR);
/// More than `storage::extent::DEFAULT_CLEAN_AFTER_FLUSHES` (1024), as not
/// every FLUSH reaches both extents.
const FOCUS_FLUSHES: usize = 1600;
/// The fewest FLUSHes a cycle's workload must complete before its crash.
const MIN_FLUSHES: usize = 20;

/// First word of every sector the workload writes.
const MAGIC: u64 = 0x3150_4f4f_4c48_5352; // "RSHLOOP1"

/// The workload. Arguments: NBD URI, log path, seed, first generation,
/// sectors per extent, a file of `first count` sector ranges to aim at, and
/// optionally `first count after`: the only sectors to touch once `after`
/// flushes have completed.
/// Log lines: `S kind gen first count fua` before an operation is sent,
/// `A gen` once it is acknowledged, `F n` once FLUSH n has completed. Acks
/// are logged when the whole batch is done, so a FUA operation acknowledged
/// just before the crash is checked as an unflushed one: weaker, never wrong.
const WORKLOAD: &str = r#"
import nbd, os, random, struct, sys
uri, log_path = sys.argv[1], sys.argv[2]
seed, gen, extent_sectors = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
hot = [tuple(map(int, line.split())) for line in open(sys.argv[6])]
focus = tuple(map(int, sys.argv[7].split())) if len(sys.argv) > 7 else None
M = (1 << 64) - 1
MAGIC = 0x31504F4F4C485352

def mix(x):
    x = (x + 0x9E3779B97F4A7C15) & M
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M
    return x ^ (x >> 31)

# A sector: MAGIC, sector number, generation, check = mix(sector ^ mix(gen)),
# then 60 words: check ^ mix(i) for word i = 4..63 (one big-int op per sector).
ONES = sum(1 << (64 * k) for k in range(60))
PAD = sum(mix(i) << (64 * (i - 4)) for i in range(4, 64))
def payload(first, count, g):
    mg = mix(g)
    out = bytearray()
    for s in range(first, first + count):
        c = mix(s ^ mg)
        out += struct.pack("<4Q", MAGIC, s, g, c) + ((c * ONES) ^ PAD).to_bytes(480, "little")
    return out

rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
assert h.can_fua() and h.can_trim() and h.can_zero() and h.can_flush()
sectors = h.get_size() // 512
log = open(log_path, "w", buffering=1)
def sync():
    log.flush()
    os.fsync(log.fileno())

def pick(kind):
    r = rng.random()
    if kind == "write":
        n = rng.randint(1, 8) if r < 0.4 else rng.randint(9, 64) if r < 0.8 else rng.randint(65, 400)
    else:
        n = rng.randint(1, 16) if r < 0.3 else rng.randint(17, 2048)
    where = rng.random()
    if focus and flushes >= focus[2]:
        start = focus[0] + rng.randrange(focus[1])
        return start, min(n, focus[0] + focus[1] - start)
    if hot and where < 0.25:
        # At or next to a range the last crash left in doubt, mostly sub-block.
        f, c = rng.choice(hot)
        start = rng.randint(max(0, f - 8), f + c)
        n = min(n, rng.randint(1, 16))
    elif where < 0.35 and n > 1:
        # Across an extent boundary.
        b = rng.randint(1, sectors // extent_sectors - 1) * extent_sectors
        start = b - rng.randint(1, n - 1)
    else:
        start = rng.randrange(sectors)
    start = min(start, sectors - 1)
    return start, min(n, sectors - start)

flushes = 0
while True:
    batch, taken = [], []
    for _ in range(rng.randint(1, 8)):
        kind = rng.choices(["write", "trim", "zero", "zero-nohole"], [70, 10, 10, 10])[0]
        for _ in range(10):
            s, n = pick(kind)
            if all(s + n <= a or b <= s for a, b in taken):
                break
        else:
            continue
        taken.append((s, s + n))
        fua = rng.random() < (0.15 if kind == "write" else 0.1)
        gen += 1
        batch.append((kind, gen, s, n, fua))
        log.write(f"S {kind} {gen} {s} {n} {int(fua)}\n")
    sync()
    cookies = []
    for kind, g, s, n, fua in batch:
        fl = nbd.CMD_FLAG_FUA if fua else 0
        if kind == "write":
            c = h.aio_pwrite(nbd.Buffer.from_bytearray(payload(s, n, g)), s * 512, flags=fl)
        elif kind == "trim":
            c = h.aio_trim(n * 512, s * 512, flags=fl)
        elif kind == "zero":
            c = h.aio_zero(n * 512, s * 512, flags=fl)
        else:
            c = h.aio_zero(n * 512, s * 512, flags=fl | nbd.CMD_FLAG_NO_HOLE)
        cookies.append(c)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)  # raises if the operation failed
    for _, g, _, _, _ in batch:
        log.write(f"A {g}\n")
    if rng.random() < 0.8:
        h.flush()
        flushes += 1
        log.write(f"F {flushes}\n")
    sync()
"#;

/// Reads the whole volume with plain READs into a file.
const DUMP: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
with open(sys.argv[2], "wb") as out:
    for off in range(0, size, 4 << 20):
        out.write(h.pread(min(4 << 20, size - off), off))
"#;

fn mix(x: u64) -> u64 {
    let mut x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// What the workload writes into `sector` for the write `generation`.
fn sector_bytes(sector: u64, generation: u64) -> Vec<u8> {
    let check = mix(sector ^ mix(generation));
    let words = [MAGIC, sector, generation, check].into_iter().chain((4..64).map(|i| check ^ mix(i)));
    words.flat_map(u64::to_le_bytes).collect()
}

/// A sector's content as the oracle knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Value {
    Zero,
    /// Written by the write with this generation.
    Data(u64),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Zero => write!(f, "zeros"),
            Value::Data(g) => write!(f, "{}", Gen(*g)),
        }
    }
}

/// A generation: the cycle in the high half (plus one), a counter below.
struct Gen(u64);

impl fmt::Display for Gen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}#{}", (self.0 >> 32).wrapping_sub(1), self.0 & 0xffff_ffff)
    }
}

/// Decodes a sector read back; `Err` describes what is wrong with it.
fn decode(sector: u64, bytes: &[u8]) -> Result<Value, String> {
    if bytes.iter().all(|&b| b == 0) {
        return Ok(Value::Zero);
    }
    let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
    let (s, g) = (word(1), word(2));
    if word(0) != MAGIC || word(3) != mix(s ^ mix(g)) {
        return Err(format!("garbage, starting {:02x?}", &bytes[..32]));
    }
    if s != sector {
        return Err(format!("sector {s}'s {} (misplaced)", Gen(g)));
    }
    if bytes != sector_bytes(s, g) {
        return Err(format!("{} with a damaged body", Gen(g)));
    }
    Ok(Value::Data(g))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Write,
    Trim,
    Zero,
    ZeroNoHole,
}

#[derive(Debug, Clone)]
struct Op {
    kind: Kind,
    first: u64,
    count: u64,
    fua: bool,
    acked: bool,
}

impl Op {
    fn value(&self, generation: u64) -> Value {
        if self.kind == Kind::Write { Value::Data(generation) } else { Value::Zero }
    }
}

/// What a sector may read as after a crash.
#[derive(Debug, Clone)]
struct Allowed {
    durable: Value,
    /// Sent after the durable point, oldest first.
    in_doubt: Vec<Value>,
}

/// The oracle: every sector of the volume, and every operation ever sent.
struct Model {
    sectors: Vec<Allowed>,
    ops: BTreeMap<u64, Op>,
}

/// What one cycle's workload did, from its log.
#[derive(Debug, Default)]
struct Replay {
    sent: usize,
    acked: usize,
    flushes: usize,
    /// Ranges of the operations sent after the last FLUSH.
    after_flush: Vec<(u64, u64)>,
    /// Sectors with values in doubt at the crash.
    in_doubt: Vec<u64>,
}

impl Model {
    fn new() -> Model {
        let allowed = Allowed { durable: Value::Zero, in_doubt: Vec::new() };
        Model { sectors: vec![allowed; (VOLUME_SIZE / SECTOR) as usize], ops: BTreeMap::new() }
    }

    /// Applies a cycle's workload log.
    fn replay(&mut self, log: &str) -> Replay {
        let mut r = Replay::default();
        // Sectors sent to since the last FLUSH, and ops not acknowledged.
        let mut touched: Vec<u64> = Vec::new();
        let mut unacked = 0;
        let lines: Vec<&str> = log.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let f: Vec<&str> = line.split(' ').collect();
            match f[..] {
                ["S", kind, g, first, count, fua] => {
                    let kind = match kind {
                        "write" => Kind::Write,
                        "trim" => Kind::Trim,
                        "zero" => Kind::Zero,
                        "zero-nohole" => Kind::ZeroNoHole,
                        _ => panic!("unknown operation in {line:?}"),
                    };
                    let g: u64 = g.parse().unwrap();
                    let op = Op {
                        kind,
                        first: first.parse().unwrap(),
                        count: count.parse().unwrap(),
                        fua: fua == "1",
                        acked: false,
                    };
                    for s in op.first..op.first + op.count {
                        self.sectors[s as usize].in_doubt.push(op.value(g));
                        touched.push(s);
                    }
                    r.after_flush.push((op.first, op.count));
                    self.ops.insert(g, op);
                    r.sent += 1;
                    unacked += 1;
                }
                ["A", g] => {
                    let g: u64 = g.parse().unwrap();
                    let op = self.ops.get_mut(&g).expect("ack of an operation never sent");
                    op.acked = true;
                    if op.fua {
                        for s in op.first..op.first + op.count {
                            let a = &mut self.sectors[s as usize];
                            a.durable = op.value(g);
                            a.in_doubt.clear();
                        }
                    }
                    r.acked += 1;
                    unacked -= 1;
                }
                ["F", _] => {
                    assert_eq!(unacked, 0, "the workload flushed with operations in flight");
                    for s in touched.drain(..) {
                        let a = &mut self.sectors[s as usize];
                        if let Some(&v) = a.in_doubt.last() {
                            a.durable = v;
                            a.in_doubt.clear();
                        }
                    }
                    r.after_flush.clear();
                    r.flushes += 1;
                }
                _ if i + 1 == lines.len() => {} // torn last line
                _ => panic!("bad workload log line {line:?}"),
            }
        }
        touched.sort_unstable();
        touched.dedup();
        touched.retain(|&s| !self.sectors[s as usize].in_doubt.is_empty());
        r.in_doubt = touched;
        r
    }

    /// Checks every sector of `dump` (the whole volume). Returns the number
    /// of bad sectors and a report of the first few.
    fn check(&self, dump: &[u8]) -> (usize, String) {
        assert_eq!(dump.len() as u64, VOLUME_SIZE, "short read of the volume");
        let mut bad = 0;
        let mut report = String::new();
        for (s, bytes) in dump.chunks(SECTOR as usize).enumerate() {
            let a = &self.sectors[s];
            let got = decode(s as u64, bytes);
            if matches!(got, Ok(v) if v == a.durable || a.in_doubt.contains(&v)) {
                continue;
            }
            bad += 1;
            if bad <= 20 {
                let s = s as u64;
                let got = got.map_or_else(|e| e, |v| v.to_string());
                let doubt: Vec<String> = a.in_doubt.iter().map(Value::to_string).collect();
                report += &format!(
                    "  sector {s} (extent {}, block {}, sector {} of it): read {got}; allowed {} (durable) or [{}] (in doubt)\n    ops on it: {}\n",
                    s * SECTOR / EXTENT_SIZE,
                    s * SECTOR % EXTENT_SIZE / 4096,
                    s % 8,
                    a.durable,
                    doubt.join(", "),
                    self.history(s),
                );
            }
        }
        (bad, report)
    }

    /// The operations ever sent to `sector`, oldest first.
    fn history(&self, sector: u64) -> String {
        let ops = self.ops.iter().filter(|(_, op)| (op.first..op.first + op.count).contains(&sector));
        let ops: Vec<String> = ops
            .map(|(g, op)| {
                let fua = if op.fua { " FUA" } else { "" };
                let ack = if op.acked { "acked" } else { "not acked" };
                format!("{} {:?}{fua} {}+{} {ack}", Gen(*g), op.kind, op.first, op.count)
            })
            .collect();
        ops.join("; ")
    }

    /// Takes what was read back as every sector's durable value.
    fn settle(&mut self, dump: &[u8]) {
        for (s, bytes) in dump.chunks(SECTOR as usize).enumerate() {
            let v = decode(s as u64, bytes).expect("settle only a dump that passed the check");
            self.sectors[s] = Allowed { durable: v, in_doubt: Vec::new() };
        }
    }
}

fn engine(cycle: usize) -> &'static str {
    if cycle.is_multiple_of(2) { "--engine=uring" } else { "--engine=psync" }
}

/// Both flush barriers (one syncfs, or one fdatasync per extent file) with
/// both engines: a FLUSH here spans several 8 MiB extents.
fn barrier(cycle: usize) -> &'static str {
    if (cycle / 2).is_multiple_of(2) { "--flush-barrier=fs" } else { "--flush-barrier=file" }
}

fn daemon_args(cycle: usize) -> [&'static str; 3] {
    ["--extent-size=8MiB", engine(cycle), barrier(cycle)] // EXTENT_SIZE
}

fn flushes_in(log: &Path) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().matches("\nF ").count()
}

/// Waits for the workload to exit after its server died.
fn reap(child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the workload did not exit after its server was killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The run's files: scripts, workload logs, the volume read back. Removed
/// when the test passes, kept when it fails.
struct Run {
    seed: u64,
    dir: PathBuf,
}

impl Run {
    /// Fails the test with the seed, the daemon's first errors, and the
    /// run's directory kept.
    fn fail(&self, d: &Daemon, what: &str, msg: String) -> ! {
        let log = d.log_text();
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).take(10).collect();
        panic!(
            "seed {}, {what}: {msg}\nbasaltd's first errors:\n{}\n(workload logs kept in {})",
            self.seed,
            errors.join("\n"),
            self.dir.display()
        );
    }

    /// Reads the whole volume back and checks it against the model; on
    /// success what was read becomes the model's durable state.
    fn verify(&self, d: &Daemon, model: &mut Model, what: &str) {
        let dump = self.dir.join("volume.img");
        let script = common::write_file(&self.dir, "dump.py", DUMP.as_bytes());
        let out =
            common::run("/usr/bin/python3", &[script.to_str().unwrap(), &d.uri(), dump.to_str().unwrap()]);
        if !out.status.success() {
            self.fail(
                d,
                what,
                format!("reading the volume back failed: {}", String::from_utf8_lossy(&out.stderr)),
            );
        }
        let bytes = std::fs::read(&dump).unwrap();
        let (bad, report) = model.check(&bytes);
        if bad > 0 {
            self.fail(d, what, format!("{bad} sectors read back wrong; the first ones:\n{report}"));
        }
        model.settle(&bytes);
        let out = common::run("nbdcopy", &[&d.uri(), "null:"]);
        if !out.status.success() {
            self.fail(
                d,
                what,
                format!("full read with nbdcopy failed: {}", String::from_utf8_lossy(&out.stderr)),
            );
        }
        if d.log_text().contains("checksum mismatch") {
            self.fail(d, what, "checksum errors in the daemon's log".into());
        }
    }
}

#[test]
fn sector_tags_tell_zeros_good_misplaced_and_damaged_sectors_apart() {
    let good = sector_bytes(7, 3 << 32 | 5);
    assert_eq!(decode(7, &good), Ok(Value::Data(3 << 32 | 5)));
    assert_eq!(decode(7, &[0; 512]), Ok(Value::Zero));
    assert!(decode(8, &good).unwrap_err().contains("misplaced"));
    let mut damaged = good.clone();
    damaged[300] ^= 1;
    assert!(decode(7, &damaged).unwrap_err().contains("damaged"));
    let mut shifted = good.clone();
    shifted[32..].rotate_left(8);
    assert!(decode(7, &shifted).is_err());
    damaged[20] ^= 1;
    assert!(decode(7, &damaged).unwrap_err().contains("garbage"));
}

#[test]
fn repeated_kill9_under_mixed_io_keeps_every_sector_consistent() {
    if !require("nbdsh") || !require("nbdcopy") {
        return;
    }
    let started = Instant::now();
    let seed: u64 = std::env::var("BASALT_CRASH_SEED").ok().map_or(1, |s| s.parse().unwrap());
    let mut rng = StdRng::seed_from_u64(seed);
    let run =
        Run { seed, dir: tempfile::Builder::new().prefix("basalt-crash-loop-").tempdir().unwrap().keep() };
    let script = common::write_file(&run.dir, "workload.py", WORKLOAD.as_bytes());
    let mut d = Daemon::start(&VOLUME_SIZE.to_string(), &daemon_args(0));
    let mut model = Model::new();
    let mut hot: Vec<(u64, u64)> = Vec::new();

    for cycle in 0..CYCLES {
        let cycle_start = Instant::now();
        let log = run.dir.join(format!("workload-{cycle}.log"));
        let err = run.dir.join(format!("workload-{cycle}.err"));
        let hot_file = run.dir.join(format!("hot-{cycle}.txt"));
        std::fs::write(&hot_file, hot.iter().map(|(f, c)| format!("{f} {c}\n")).collect::<String>()).unwrap();
        let mut workload = Command::new("/usr/bin/python3");
        workload
            .arg(&script)
            .arg(d.uri())
            .arg(&log)
            .arg((seed * 1000 + cycle as u64).to_string())
            .arg(((cycle as u64 + 1) << 32).to_string())
            .arg((EXTENT_SIZE / SECTOR).to_string())
            .arg(&hot_file);
        // Pull the plug after a random number of flushes, at a random point
        // of a batch.
        let mut target = rng.gen_range(40..=300);
        let mut deadline = Instant::now() + Duration::from_secs(15);
        if cycle == FOCUS_CYCLE {
            workload.arg(format!("{} {} {UNFOCUSED_FLUSHES}", FOCUS.0, FOCUS.1));
            target = UNFOCUSED_FLUSHES + FOCUS_FLUSHES;
            deadline += Duration::from_secs(30);
        }
        let mut child =
            workload.stdout(Stdio::null()).stderr(std::fs::File::create(&err).unwrap()).spawn().unwrap();
        while flushes_in(&log) < target && Instant::now() < deadline && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..25)));
        let what = format!("cycle {cycle} ({} workload, checked under {})", engine(cycle), engine(cycle + 1));
        if let Some(status) = child.try_wait().unwrap() {
            let stderr = std::fs::read_to_string(&err).unwrap_or_default();
            run.fail(&d, &what, format!("the workload stopped before the crash ({status}):\n{stderr}"));
        }
        d.kill9();
        reap(&mut child);

        let r = model.replay(&std::fs::read_to_string(&log).unwrap());
        if r.flushes < MIN_FLUSHES {
            let stderr = std::fs::read_to_string(&err).unwrap_or_default();
            run.fail(&d, &what, format!("too little progress ({} flushes):\n{stderr}", r.flushes));
        }
        // What the crash left in doubt, to see which way it went.
        let doubt: Vec<(u64, Allowed)> =
            r.in_doubt.iter().map(|&s| (s, model.sectors[s as usize].clone())).collect();
        hot = r.after_flush;

        d.restart_with(&daemon_args(cycle + 1));
        run.verify(&d, &mut model, &what);
        let (mut newest, mut durable) = (0, 0);
        for (s, before) in &doubt {
            let now = model.sectors[*s as usize].durable;
            if before.in_doubt.last() == Some(&now) {
                newest += 1;
            } else if before.durable == now {
                durable += 1;
            }
        }
        eprintln!(
            "cycle {cycle} ({:.1} s): {} ops sent, {} acked, {} flushes; {} sectors in doubt at the crash: \
             {newest} read back as the newest value, {durable} as the durable one, {} in between",
            cycle_start.elapsed().as_secs_f64(),
            r.sent,
            r.acked,
            r.flushes,
            doubt.len(),
            doubt.len() - newest - durable
        );
    }

    // A clean shutdown and restart must change nothing.
    assert_eq!(d.terminate(), Some(0), "basaltd did not shut down cleanly");
    d.restart();
    run.verify(&d, &mut model, "after a clean restart");
    let log = d.log_text();
    assert!(
        log.contains("engine=Uring") && log.contains("engine=Psync"),
        "both engines must have run:\n{log}"
    );
    assert_eq!(d.terminate(), Some(0));
    std::fs::remove_dir_all(&run.dir).unwrap();
    eprintln!("seed {seed}: {CYCLES} crash cycles in {:.1} s", started.elapsed().as_secs_f64());
}
