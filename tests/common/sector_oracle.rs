//! The sector-tagged crash oracle of the crash-loop tests (tests/crash_loop.rs
//! on one node, tests/replicated_crash_loop.rs on R=3): a mixed libnbd
//! workload (sub-block writes, writes across extents, TRIM, WRITE_ZEROES
//! with and without NO_HOLE, FUA, FLUSH) that logs every operation before it
//! is sent and every ack and FLUSH after; sector tags that tell a good
//! sector from a torn, stale, misplaced or garbage one; and the model that
//! replays the logs and says, per sector, what may read back after a crash.
//!
//! The rule, per sector: its durable value (as of the last completed FLUSH,
//! or of a FUA operation acknowledged since) or any value sent to it after
//! that point; nothing else. TRIM counts as zeros (Basalt's TRIM is
//! WRITE_ZEROES with deallocation). Sectors never written read as zeros.
//! What a check reads back becomes the durable state of the next cycle
//! ([`Model::settle`]).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SECTOR: u64 = 512;

/// First word of every sector the workload writes.
pub const MAGIC: u64 = 0x3150_4f4f_4c48_5352; // "RSHLOOP1"

/// The workload. Arguments: NBD URI, log path, seed, first generation,
/// sectors per extent, a file of `first count` sector ranges to aim at, and
/// optionally `first count after`: the only sectors to touch once `after`
/// flushes have completed.
/// Log lines: `S kind gen first count fua` before an operation is sent,
/// `A gen` once it is acknowledged, `F n` once FLUSH n has completed. Acks
/// are logged when the whole batch is done, so a FUA operation acknowledged
/// just before the crash is checked as an unflushed one: weaker, never wrong.
pub const WORKLOAD: &str = r#"
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
pub const DUMP: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
with open(sys.argv[2], "wb") as out:
    for off in range(0, size, 4 << 20):
        out.write(h.pread(min(4 << 20, size - off), off))
"#;

pub fn mix(x: u64) -> u64 {
    let mut x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// What the workload writes into `sector` for the write `generation`.
pub fn sector_bytes(sector: u64, generation: u64) -> Vec<u8> {
    let check = mix(sector ^ mix(generation));
    let words = [MAGIC, sector, generation, check].into_iter().chain((4..64).map(|i| check ^ mix(i)));
    words.flat_map(u64::to_le_bytes).collect()
}

/// A sector's content as the oracle knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
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
pub struct Gen(pub u64);

impl fmt::Display for Gen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}#{}", (self.0 >> 32).wrapping_sub(1), self.0 & 0xffff_ffff)
    }
}

/// Decodes a sector read back; `Err` describes what is wrong with it.
pub fn decode(sector: u64, bytes: &[u8]) -> Result<Value, String> {
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
pub enum Kind {
    Write,
    Trim,
    Zero,
    ZeroNoHole,
}

#[derive(Debug, Clone)]
pub struct Op {
    pub kind: Kind,
    pub first: u64,
    pub count: u64,
    pub fua: bool,
    pub acked: bool,
}

impl Op {
    pub fn value(&self, generation: u64) -> Value {
        if self.kind == Kind::Write { Value::Data(generation) } else { Value::Zero }
    }
}

/// What a sector may read as after a crash.
#[derive(Debug, Clone)]
pub struct Allowed {
    pub durable: Value,
    /// Sent after the durable point, oldest first.
    pub in_doubt: Vec<Value>,
}

/// The oracle: every sector of the volume, and every operation ever sent.
pub struct Model {
    pub sectors: Vec<Allowed>,
    pub ops: BTreeMap<u64, Op>,
    volume_size: u64,
    extent_size: u64,
}

/// What one cycle's workload did, from its log.
#[derive(Debug, Default)]
pub struct Replay {
    pub sent: usize,
    pub acked: usize,
    pub flushes: usize,
    /// Ranges of the operations sent after the last FLUSH.
    pub after_flush: Vec<(u64, u64)>,
    /// Sectors with values in doubt at the crash.
    pub in_doubt: Vec<u64>,
}

impl Model {
    /// A volume of `volume_size` bytes never written, in extents of
    /// `extent_size` (named in reports only).
    pub fn new(volume_size: u64, extent_size: u64) -> Model {
        let allowed = Allowed { durable: Value::Zero, in_doubt: Vec::new() };
        Model {
            sectors: vec![allowed; (volume_size / SECTOR) as usize],
            ops: BTreeMap::new(),
            volume_size,
            extent_size,
        }
    }

    /// Applies a cycle's workload log.
    pub fn replay(&mut self, log: &str) -> Replay {
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
    pub fn check(&self, dump: &[u8]) -> (usize, String) {
        assert_eq!(dump.len() as u64, self.volume_size, "short read of the volume");
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
                    s * SECTOR / self.extent_size,
                    s * SECTOR % self.extent_size / 4096,
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
    pub fn history(&self, sector: u64) -> String {
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
    pub fn settle(&mut self, dump: &[u8]) {
        for (s, bytes) in dump.chunks(SECTOR as usize).enumerate() {
            let v = decode(s as u64, bytes).expect("settle only a dump that passed the check");
            self.sectors[s] = Allowed { durable: v, in_doubt: Vec::new() };
        }
    }
}

impl Model {
    /// The sectors a replayed log left in doubt, with what each could read
    /// as: taken before the check, to tell afterwards which way they went.
    pub fn doubt(&self, r: &Replay) -> Vec<(u64, Allowed)> {
        r.in_doubt.iter().map(|&s| (s, self.sectors[s as usize].clone())).collect()
    }

    /// Of the sectors of `doubt`, once settled: how many read back as the
    /// newest value sent, and how many as the durable one.
    pub fn resolved(&self, doubt: &[(u64, Allowed)]) -> (usize, usize) {
        let (mut newest, mut durable) = (0, 0);
        for (s, before) in doubt {
            let now = self.sectors[*s as usize].durable;
            if before.in_doubt.last() == Some(&now) {
                newest += 1;
            } else if before.durable == now {
                durable += 1;
            }
        }
        (newest, durable)
    }
}

/// The workload ([`WORKLOAD`] in `script`) against `uri`, logging to `log`,
/// writing generations from `first_generation` + 1 on, and aiming a
/// quarter of its operations at the `(first, count)` sector ranges of
/// `hot` (kept next to the log, `.hot`). Add the focus argument before
/// spawning if wanted.
pub fn workload(
    script: &Path,
    uri: &str,
    log: &Path,
    seed: u64,
    first_generation: u64,
    extent_sectors: u64,
    hot: &[(u64, u64)],
) -> Command {
    let hot_file = log.with_extension("hot");
    std::fs::write(&hot_file, hot.iter().map(|(f, c)| format!("{f} {c}\n")).collect::<String>()).unwrap();
    let mut c = Command::new("/usr/bin/python3");
    c.arg(script)
        .arg(uri)
        .arg(log)
        .arg(seed.to_string())
        .arg(first_generation.to_string())
        .arg(extent_sectors.to_string())
        .arg(&hot_file);
    c
}

/// FLUSHes a focused workload ([`focus`]) runs everywhere first.
pub const UNFOCUSED_FLUSHES: usize = 100;
/// FLUSHes a focused workload runs within its focus after that: more than
/// `storage::extent::DEFAULT_CLEAN_AFTER_FLUSHES` (1024), as not every
/// FLUSH reaches both extents of it.
pub const FOCUS_FLUSHES: usize = 1600;

/// The focus argument of [`workload`] for extents of `extent_size` bytes:
/// after [`UNFOCUSED_FLUSHES`] flushes, only the last MiB of extent 0 and
/// the first of extent 1, so that the regions of extents 0 and 1 outside
/// it idle long enough to be marked clean.
pub fn focus(extent_size: u64) -> String {
    format!("{} {} {UNFOCUSED_FLUSHES}", (extent_size - (1 << 20)) / SECTOR, (2 << 20) / SECTOR)
}

/// Spawns `cmd` with stdout discarded and stderr to `err`.
pub fn spawn_logged(cmd: &mut Command, err: &Path) -> Child {
    cmd.stdout(Stdio::null()).stderr(std::fs::File::create(err).unwrap()).spawn().unwrap()
}

/// FLUSHes the workload logged in `log` so far.
pub fn flushes_in(log: &Path) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().matches("\nF ").count()
}

/// Waits until the workload has logged `target` FLUSHes, exited, or
/// `deadline` passed.
pub fn wait_flushes(child: &mut Child, log: &Path, target: usize, deadline: Instant) {
    while flushes_in(log) < target && Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for the workload to exit after its server died.
pub fn reap(child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the workload did not exit after its server was killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The workload seed of a crash loop: `BASALT_CRASH_SEED`, else 1.
pub fn seed_from_env() -> u64 {
    std::env::var("BASALT_CRASH_SEED").ok().map_or(1, |s| s.parse().expect("BASALT_CRASH_SEED is a number"))
}
