//! Crash after crash on a replicated volume: what tests/crash_loop.rs does
//! to one node, done to a cluster of three `basaltd run` processes holding
//! an R=3 volume (invariant 7 of docs/design.md, through invariants 1, 2
//! and 5).
//!
//! Each cycle runs the mixed workload of `common::sector_oracle` (sub-block
//! writes, writes across extents, TRIM, WRITE_ZEROES with and without
//! NO_HOLE, FUA, FLUSH; every operation and ack logged) through one node
//! picked at random, the volume's owner or a node that forwards to it, and
//! kill -9s every node at once, in a random order, at a random point of the
//! workload. Then all three start again, and the whole volume is read
//! through every node: each sector must hold its durable value (as of the
//! last completed FLUSH, or a FUA acknowledged since) or a value sent
//! after that, and the three reads must be the same bytes (replicas that
//! differed at the crash are reconciled before they serve, so no block
//! reads differently depending on the replica asked). nbdcopy must read
//! the whole volume without an error, `basalt volume verify` must find the
//! replicas' block tables equal, and no node may log a checksum mismatch.
//! What a cycle reads back is the next cycle's baseline, and a quarter of
//! the next workload aims at what the crash left in doubt.
//!
//! Every node dies at once because nothing rebuilds a replica yet: a node
//! killed alone leaves the replica sets it was in (degraded, stale until a
//! resync that does not exist), and a second lone kill would leave fewer
//! than `min_replicas`. So one cycle only ([`LONE_CYCLE`]) kills the owner
//! alone: a client of the owner reconnects through another node, which
//! takes the volume over and reconciles; a client of a forwarding node
//! goes on through it, or reconnects if a request failed; the old owner
//! starts again while that workload runs, and then the cycle ends with
//! every node killed as the others do. The cycles after it run on the
//! degraded sets.
//!
//! One cycle ([`FOCUS_CYCLE`]) runs long within 2 MiB, so that the other
//! regions of its two extents go clean on every replica, as in
//! tests/crash_loop.rs. Two cycles ([`RECONCILE_CRASH_CYCLES`]) restart
//! every node cleanly after the crash, before anything is read, and kill
//! them all again while the first read has the owner reconcile: a clean
//! shutdown clears the dirty bits, so only the replicas' crash records say
//! where they may differ. A second test does that on purpose and
//! deterministically: one block made to differ between the replicas, and
//! the kill right after the owner has asked every replica for its status.
//!
//! What kill -9 cannot show: whatever the kernel accepted survives the
//! process (see tests/crash_loop.rs and the mem-engine model of
//! tests/storage_crash.rs for power loss).
//!
//! `BASALT_CRASH_SEED=n` picks another workload and other nodes (the kill
//! times vary from run to run anyway); a failure prints the seed and the
//! cycle and keeps the workload logs, the volume as read back, and every
//! node's log.

mod common;

use common::cluster::Cluster;
use common::require;
use common::sector_oracle::{
    self, DUMP, FOCUS_FLUSHES, Model, Replay, SECTOR, UNFOCUSED_FLUSHES, WORKLOAD, decode, reap,
    spawn_logged, wait_flushes,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const VOLUME: &str = "crash";
const VOLUME_SIZE: u64 = 64 << 20;
const EXTENT_SIZE: u64 = 8 << 20;
const CYCLES: usize = 6;
/// The one cycle that kills the owner alone first (see the module docs).
/// Late, so that the cycles before it run on full replica sets.
const LONE_CYCLE: usize = 4;
/// Cycles whose crash is followed by a clean restart of every node and
/// then, while the first read of the volume has the owner reconcile the
/// extents, kill -9 of every node again (see the test).
const RECONCILE_CRASH_CYCLES: [usize; 2] = [1, 3];
/// The cycle whose workload is focused (`sector_oracle::focus`): long
/// enough for the regions of extents 0 and 1 outside its focus to be
/// marked clean on every replica, so that later crashes find clean regions
/// next to dirty ones and later workloads write into clean regions again.
const FOCUS_CYCLE: usize = 2;
/// The fewest FLUSHes a workload must complete before its crash.
const MIN_FLUSHES: usize = 10;

/// The run's files: scripts, workload logs, the volume read back through
/// each node. Removed when the test passes; kept, with every node's log
/// copied in, when it fails.
struct Run {
    seed: u64,
    dir: PathBuf,
    node_logs: Vec<PathBuf>,
    passed: bool,
}

impl Drop for Run {
    fn drop(&mut self) {
        if self.passed {
            let _ = std::fs::remove_dir_all(&self.dir);
            return;
        }
        for (k, log) in self.node_logs.iter().enumerate() {
            let _ = std::fs::copy(log, self.dir.join(format!("basaltd-{k}.log")));
        }
        eprintln!(
            "seed {} failed (rerun with BASALT_CRASH_SEED={}); workload logs, reads and node logs kept in {}",
            self.seed,
            self.seed,
            self.dir.display()
        );
    }
}

impl Run {
    /// Fails the test with the seed and every node's first errors.
    fn fail(&self, c: &Cluster, what: &str, msg: String) -> ! {
        let mut errors = String::new();
        for k in 0..c.nodes.len() {
            let log = c.log(k);
            let first: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).take(8).collect();
            errors += &format!("--- node {k}\n{}\n", first.join("\n"));
        }
        panic!("seed {}, {what}: {msg}\nfirst errors of each node:\n{errors}", self.seed);
    }

    /// Fails the test unless the workload logging to `log` has flushed at
    /// least `MIN_FLUSHES` times (`why` says what the shortfall means).
    fn require_flushes(&self, c: &Cluster, what: &str, log: &Path, why: impl FnOnce(usize) -> String) {
        let flushed = sector_oracle::flushes_in(log);
        if flushed < MIN_FLUSHES {
            self.fail(c, what, why(flushed));
        }
    }

    /// Reads the whole volume through node `k` into `dump-k.img`, with
    /// plain READs and no retry.
    fn dump(&self, c: &Cluster, k: usize, what: &str) -> Vec<u8> {
        let path = self.dir.join(format!("dump-{k}.img"));
        let script = self.dir.join("dump.py");
        let out =
            timeout(300, "/usr/bin/python3", &[script.to_str().unwrap(), &uri(c, k), path.to_str().unwrap()]);
        if !out.status.success() {
            self.fail(c, what, format!("reading the volume through node {k} failed: {}", text(&out)));
        }
        std::fs::read(&path).unwrap()
    }

    /// After a restart: the volume read through every node, the same
    /// bytes each time and every sector as the model allows; then nbdcopy,
    /// `volume verify` and the logs. What was read becomes the model's
    /// durable state.
    fn check(&self, c: &Cluster, model: &mut Model, what: &str, rng: &mut StdRng) {
        for k in 0..c.nodes.len() {
            wait_connectable(self, c, k, what);
        }
        let mut order: Vec<usize> = (0..c.nodes.len()).collect();
        order.shuffle(rng);
        let dumps: Vec<(usize, Vec<u8>)> = order.iter().map(|&k| (k, self.dump(c, k, what))).collect();
        let (first, bytes) = &dumps[0];
        for (k, other) in &dumps[1..] {
            if other != bytes {
                let report = differences(model, (*first, bytes), (*k, other));
                self.fail(c, what, format!("nodes {first} and {k} read the volume differently:\n{report}"));
            }
        }
        let (bad, report) = model.check(bytes);
        if bad > 0 {
            self.fail(c, what, format!("{bad} sectors read back wrong; the first ones:\n{report}"));
        }
        model.settle(bytes);
        let via = order[0];
        let out = timeout(300, "nbdcopy", &[&uri(c, via), "null:"]);
        if !out.status.success() {
            self.fail(c, what, format!("full read with nbdcopy through node {via} failed: {}", text(&out)));
        }
        eprintln!("seed {}, {what}: verifying the replicas through node {via}", self.seed);
        c.assert_verify_clean(via, VOLUME);
        for k in 0..c.nodes.len() {
            if c.log(k).contains("checksum mismatch") {
                self.fail(c, what, format!("checksum errors in node {k}'s log"));
            }
        }
    }
}

fn uri(c: &Cluster, k: usize) -> String {
    format!("nbd://{}/{VOLUME}", c.nodes[k].nbd)
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `cmd args` bounded by `timeout(1)`, with the system Python first on
/// PATH (the libnbd bindings live there).
fn timeout(secs: u64, cmd: &str, args: &[&str]) -> Output {
    let mut c = Command::new("timeout");
    c.arg(secs.to_string()).arg(cmd).args(args);
    c.env("PATH", format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()));
    c.output().unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

/// Waits until node `k` takes an NBD connection to the volume and gives
/// its size: after a restart the node learns its volumes from the
/// metadata. Reads are not retried anywhere, so only the handshake is.
fn wait_connectable(run: &Run, c: &Cluster, k: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = common::nbdsh_cmd()
            .args(["-u", &uri(c, k), "-c", "print(h.get_size())"])
            .output()
            .expect("nbdsh");
        if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == VOLUME_SIZE.to_string() {
            return;
        }
        if Instant::now() > deadline {
            run.fail(c, what, format!("node {k} took no NBD connection in 120 s: {}", text(&out)));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The first sectors where two nodes' reads differ, each decoded, with
/// what the model allows there.
fn differences(model: &Model, (a, x): (usize, &[u8]), (b, y): (usize, &[u8])) -> String {
    let show = |s: u64, bytes: &[u8]| decode(s, bytes).map_or_else(|e| e, |v| v.to_string());
    let sector = |d: &[u8], s: u64| d[(s * SECTOR) as usize..((s + 1) * SECTOR) as usize].to_vec();
    let differing: Vec<u64> =
        (0..x.len() as u64 / SECTOR).filter(|&s| sector(x, s) != sector(y, s)).collect();
    let mut out = format!("{} sectors differ; the first ones:\n", differing.len());
    for s in differing.into_iter().take(20) {
        let (p, q) = (sector(x, s), sector(y, s));
        let allowed = &model.sectors[s as usize];
        let doubt: Vec<String> = allowed.in_doubt.iter().map(ToString::to_string).collect();
        out += &format!(
            "  sector {s} (extent {}, block {}): node {a} read {}, node {b} read {}; allowed {} (durable) or [{}]\n    ops on it: {}\n",
            s * SECTOR / EXTENT_SIZE,
            s * SECTOR % EXTENT_SIZE / 4096,
            show(s, &p),
            show(s, &q),
            allowed.durable,
            doubt.join(", "),
            model.history(s),
        );
    }
    out
}

/// The index of the node that owns volume `name`.
fn owner(c: &Cluster, name: &str) -> usize {
    let v = c.cli_json(0, &["volume", "show", name]);
    let id = v["owner"]["node"].as_u64().unwrap_or_else(|| panic!("no owner: {v}"));
    c.node_ids(0).iter().position(|&n| n == id).unwrap_or_else(|| panic!("owner {id} is no node: {v}"))
}

/// One run of the workload; `phase` numbers its generations and seed.
struct Workload {
    log: PathBuf,
    err: PathBuf,
    child: Child,
}

fn start_workload(
    run: &Run,
    c: &Cluster,
    k: usize,
    phase: u64,
    hot: &[(u64, u64)],
    focused: bool,
) -> Workload {
    let log = run.dir.join(format!("workload-{phase}.log"));
    let err = run.dir.join(format!("workload-{phase}.err"));
    let mut cmd = sector_oracle::workload(
        &run.dir.join("workload.py"),
        &uri(c, k),
        &log,
        run.seed * 1000 + phase,
        (phase + 1) << 32,
        EXTENT_SIZE / SECTOR,
        hot,
    );
    if focused {
        cmd.arg(sector_oracle::focus(EXTENT_SIZE));
    }
    let child = spawn_logged(&mut cmd, &err);
    Workload { log, err, child }
}

impl Workload {
    /// Fails unless the workload still runs.
    fn expect_running(&mut self, run: &Run, c: &Cluster, what: &str) {
        if let Some(status) = self.child.try_wait().unwrap() {
            let stderr = std::fs::read_to_string(&self.err).unwrap_or_default();
            run.fail(c, what, format!("the workload stopped before the crash ({status}):\n{stderr}"));
        }
    }

    /// Reaps the workload (its server is dead) and replays its log.
    fn replay(mut self, run: &Run, c: &Cluster, model: &mut Model, what: &str) -> Replay {
        reap(&mut self.child);
        let r = model.replay(&std::fs::read_to_string(&self.log).unwrap_or_default());
        if r.flushes < MIN_FLUSHES {
            let stderr = std::fs::read_to_string(&self.err).unwrap_or_default();
            run.fail(c, what, format!("too little progress ({} flushes):\n{stderr}", r.flushes));
        }
        r
    }
}

/// Every node killed at once, in a random order.
fn kill_all(c: &mut Cluster, rng: &mut StdRng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..c.nodes.len()).collect();
    order.shuffle(rng);
    c.kill9_all(&order);
    order
}

fn start_all(c: &mut Cluster) {
    for k in 0..c.nodes.len() {
        c.spawn(k);
    }
    for k in 0..c.nodes.len() {
        c.wait_ready(k);
    }
    c.wait_leader(0, None);
}

#[test]
fn kill9_of_every_node_again_and_again_under_mixed_io_keeps_every_sector_consistent() {
    if !require("nbdsh") || !require("nbdcopy") {
        return;
    }
    let started = Instant::now();
    let seed = sector_oracle::seed_from_env();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut c = Cluster::start(3, 3);
    let mut run = Run {
        seed,
        dir: tempfile::Builder::new().prefix("basalt-replicated-crash-loop-").tempdir().unwrap().keep(),
        node_logs: c.nodes.iter().map(|n| n.log.clone()).collect(),
        passed: false,
    };
    common::write_file(&run.dir, "workload.py", WORKLOAD.as_bytes());
    common::write_file(&run.dir, "dump.py", DUMP.as_bytes());
    c.wait_leader(0, None);
    let extent = format!("{}M", EXTENT_SIZE >> 20);
    let size = format!("{}M", VOLUME_SIZE >> 20);
    c.cli_json(
        0,
        &[
            "volume",
            "create",
            VOLUME,
            "--size",
            &size,
            "--replicas",
            "3",
            "--min-replicas",
            "2",
            "--extent-size",
            &extent,
        ],
    );
    let mut model = Model::new(VOLUME_SIZE, EXTENT_SIZE);
    let mut hot: Vec<(u64, u64)> = Vec::new();
    let mut phase = 0;

    for cycle in 0..CYCLES {
        let cycle_start = Instant::now();
        let owner = owner(&c, VOLUME);
        let via = rng.gen_range(0..c.nodes.len());
        let mut what = format!("cycle {cycle} (owner node {owner}, workload through node {via})");
        eprintln!("seed {seed}, {what}: starting");
        let mut w = start_workload(&run, &c, via, phase, &hot, cycle == FOCUS_CYCLE);
        phase += 1;
        if cycle == LONE_CYCLE {
            // The owner alone first.
            wait_flushes(
                &mut w.child,
                &w.log,
                rng.gen_range(MIN_FLUSHES..=80),
                Instant::now() + Duration::from_secs(20),
            );
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..25)));
            w.expect_running(&run, &c, &what);
            // The wait above gives up after 20 s: a kill after fewer flushes
            // would test the takeover of a volume hardly written.
            run.require_flushes(&c, &what, &w.log, |n| {
                format!("too little progress before the owner's kill ({n} flushes)")
            });
            let owner_id = c.node_ids(via)[owner];
            c.kill9(owner);
            let before = sector_oracle::flushes_in(&w.log);
            if via == owner {
                reap(&mut w.child); // its server is gone
            } else {
                // A client of a forwarding node may ride the takeover (a
                // forwarded write is tried once more on the new route) or
                // see an error (a FLUSH is not tried again); either way it
                // has nothing in flight once it fails.
                wait_flushes(
                    &mut w.child,
                    &w.log,
                    before + MIN_FLUSHES,
                    Instant::now() + Duration::from_secs(60),
                );
            }
            if w.child.try_wait().unwrap().is_some() {
                let err = std::fs::read_to_string(&w.err).unwrap_or_default();
                let first = w.replay(&run, &c, &mut model, &what);
                hot = first.after_flush;
                let others: Vec<usize> = (0..c.nodes.len()).filter(|&k| k != owner).collect();
                let next = *others.choose(&mut rng).unwrap();
                what = format!(
                    "cycle {cycle} (owner node {owner} killed alone after {before} flushes through node {via}, \
                     whose client stopped ({}), then the workload through node {next})",
                    err.lines().last().unwrap_or("no error")
                );
                eprintln!("seed {seed}, {what}");
                w = start_workload(&run, &c, next, phase, &hot, false);
                phase += 1;
                // The takeover: the old owner must be marked down first.
                wait_flushes(&mut w.child, &w.log, MIN_FLUSHES, Instant::now() + Duration::from_secs(60));
                // Respawning the old owner before the new workload got going
                // would let it take its volume back without any takeover.
                run.require_flushes(&c, &what, &w.log, |n| {
                    format!("{n} flushes in 60 s through node {next} after the owner's death")
                });
                let v = c.cli_json(next, &["volume", "show", VOLUME]);
                if v["owner"]["node"].as_u64() == Some(owner_id) {
                    run.fail(&c, &what, format!("the dead owner still owns the volume: {v}"));
                }
            } else {
                let after = sector_oracle::flushes_in(&w.log) - before;
                if after < MIN_FLUSHES {
                    run.fail(&c, &what, format!("{after} flushes in 60 s after the owner's death"));
                }
                what = format!(
                    "cycle {cycle} (owner node {owner} killed alone after {before} flushes; the client through \
                     node {via} went on)"
                );
                eprintln!("seed {seed}, {what}");
            }
            w.expect_running(&run, &c, &what);
            c.spawn(owner);
            c.wait_ready(owner);
            let more = sector_oracle::flushes_in(&w.log) + rng.gen_range(10..=60);
            wait_flushes(&mut w.child, &w.log, more, Instant::now() + Duration::from_secs(20));
        } else if cycle == FOCUS_CYCLE {
            let target = UNFOCUSED_FLUSHES + FOCUS_FLUSHES + rng.gen_range(0..=50);
            wait_flushes(&mut w.child, &w.log, target, Instant::now() + Duration::from_secs(120));
        } else {
            let target = rng.gen_range(MIN_FLUSHES * 2..=150);
            wait_flushes(&mut w.child, &w.log, target, Instant::now() + Duration::from_secs(20));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..25)));
        w.expect_running(&run, &c, &what);
        let order = kill_all(&mut c, &mut rng);
        let mut r = w.replay(&run, &c, &mut model, &what);
        what += &format!(", all killed in the order {order:?}");
        let doubt = model.doubt(&r);
        hot = std::mem::take(&mut r.after_flush);

        start_all(&mut c);
        if RECONCILE_CRASH_CYCLES.contains(&cycle) {
            // Restarted cleanly before anyone reads (a clean shutdown marks
            // every region clean; the replicas' records of what the crash
            // left in doubt stay), and then killed in the middle of the
            // reconciliation the first read starts. Nothing is written, so
            // the model stays as it is.
            let from: Vec<usize> = (0..c.nodes.len()).map(|k| c.log(k).len()).collect();
            c.restart_all();
            // Whether any replica was dirty at the crash (each node that
            // keeps such a record says so when it starts): only then is
            // there a reconciliation to interrupt.
            let dirty = (0..c.nodes.len())
                .any(|k| count_since(&c, k, from[k], "still wait for their owner to reconcile them") > 0);
            let k = rng.gen_range(0..c.nodes.len());
            wait_connectable(&run, &c, k, &what);
            let dump = run.dir.join("interrupted.img");
            let script = run.dir.join("dump.py");
            let mut reader = Command::new("/usr/bin/python3")
                .args([script.to_str().unwrap(), &uri(&c, k), dump.to_str().unwrap()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            // The kill must come once the reconciliation has started, not
            // before the first read reached the owner: wait for a replica
            // to be asked its status, then kill at a random point of the
            // reconciliation of that extent or of the ones read after it.
            if dirty {
                let line = "a replica that crashed with unflushed writes is being reconciled";
                let deadline = Instant::now() + Duration::from_secs(60);
                while (0..c.nodes.len()).all(|j| count_since(&c, j, from[j], line) == 0) {
                    if Instant::now() > deadline {
                        run.fail(&c, &what, "no reconciliation started in 60 s of reading".to_string());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..650)));
            let order = kill_all(&mut c, &mut rng);
            reap(&mut reader);
            what += &format!(
                ", restarted cleanly, killed again in the order {order:?} while reading through node {k}{}",
                if dirty { " and reconciling" } else { " (no replica was dirty: nothing to reconcile)" }
            );
            start_all(&mut c);
        }
        run.check(&c, &mut model, &what, &mut rng);
        let (newest, durable) = model.resolved(&doubt);
        eprintln!(
            "{what} ({:.1} s): {} ops sent, {} acked, {} flushes; {} sectors in doubt at the crash: \
             {newest} read back as the newest value, {durable} as the durable one, {} in between",
            cycle_start.elapsed().as_secs_f64(),
            r.sent,
            r.acked,
            r.flushes,
            doubt.len(),
            doubt.len() - newest - durable
        );
    }

    // A clean restart of every node must change nothing.
    c.restart_all();
    run.check(&c, &mut model, "after a clean restart", &mut rng);
    let health = c.cli_json(0, &["volume", "show", VOLUME])["health"].clone();
    run.passed = true;
    eprintln!(
        "seed {seed}: {CYCLES} crash cycles in {:.1} s; volume health at the end: {health}",
        started.elapsed().as_secs_f64()
    );
}

/// The one file under `dir` holding `needle`, and where.
fn find_in_files(dir: &std::path::Path, needle: &[u8]) -> Option<(PathBuf, u64)> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        if p.is_dir() {
            if let Some(hit) = find_in_files(&p, needle) {
                return Some(hit);
            }
        } else if p.extension().is_some_and(|x| x == "ext") {
            let bytes = std::fs::read(&p).unwrap();
            if let Some(pos) = bytes.windows(needle.len()).position(|w| w == needle) {
                return Some((p, pos as u64));
            }
        }
    }
    None
}

/// Lines of node `k`'s log after byte `from` that contain `needle`.
fn count_since(c: &Cluster, k: usize, from: usize, needle: &str) -> usize {
    c.log(k).get(from..).unwrap_or_default().matches(needle).count()
}

/// A crash in the middle of reconciliation, after a clean restart: the
/// replicas differ in one block (a write in flight at a whole-cluster
/// crash reached one of them only), every node is restarted cleanly (a
/// clean shutdown marks every region clean; only the replicas' records of
/// the crash say where they may differ), and every node is killed again as
/// soon as the owner has asked each replica for its status, while it copies
/// the first replica. After the next start the replicas must be made the
/// same before they serve: `volume verify` finds them equal, and the block
/// reads the same through every node.
#[test]
fn kill9_of_every_node_while_the_owner_reconciles_after_a_clean_restart_loses_no_difference() {
    if !require("nbdsh") {
        return;
    }
    let mut c = Cluster::start(3, 3);
    c.wait_leader(0, None);
    // One 64 MiB extent of 64 regions, a block written in each, so that
    // copying it to one replica takes a while; the block that will differ
    // is in the last region, the last copied.
    let name = "rec";
    c.cli_json(
        0,
        &[
            "volume",
            "create",
            name,
            "--size",
            "64M",
            "--replicas",
            "3",
            "--min-replicas",
            "2",
            "--extent-size",
            "64M",
        ],
    );
    let owner = owner(&c, name);
    let other = (owner + 1) % 3;
    let u = format!("nbd://{}/{name}", c.nodes[owner].nbd);
    common::nbdsh(
        &u,
        "for r in range(64):\n    h.pwrite(bytes([r]) * 4096, r << 20)\nh.pwrite(b'A' * 4096, 63 << 20)\nh.flush()",
    );
    let order = [0, 1, 2];
    c.kill9_all(&order);
    // The in-flight write that reached one replica only.
    let (file, pos) = find_in_files(&c.nodes[other].dir, &[b'A'; 4096]).expect("node's copy of the block");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.seek(SeekFrom::Start(pos)).unwrap();
        f.write_all(&[b'B'; 4096]).unwrap();
        f.sync_all().unwrap();
    }
    start_all(&mut c);
    c.restart_all();
    let out = c.cli(0, &["--json", "volume", "verify", name]);
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    assert_eq!(
        v["mismatched"].as_u64(),
        Some(1),
        "the replicas differ in one block before reconciliation: {v}"
    );

    // The first read reconciles; every node dies once every replica has
    // answered the owner's status (each logs it), before the copies end.
    let from: Vec<usize> = (0..3).map(|k| c.log(k).len()).collect();
    let line = "a replica that crashed with unflushed writes is being reconciled";
    let mut reader = common::nbdsh_cmd()
        .args(["-u", &u, "-c", "h.pread(4096, 63 << 20)"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while (0..3).any(|k| count_since(&c, k, from[k], line) == 0) {
        assert!(Instant::now() < deadline, "no reconciliation started in 60 s: {}", c.log(owner));
        std::thread::sleep(Duration::from_millis(1));
    }
    c.kill9_all(&order);
    reap(&mut reader);
    // Else this run did not cut the reconciliation short, and shows nothing.
    let copied = count_since(&c, owner, from[owner], "reconciled a replica");
    assert!(copied < 2, "the kill came after the owner had copied to both replicas:\n{}", c.log(owner));

    start_all(&mut c);
    let mut seen = Vec::new();
    for k in 0..3 {
        let u = format!("nbd://{}/{name}", c.nodes[k].nbd);
        let out = common::nbdsh(&u, "print(h.pread(4096, 63 << 20)[:1].decode())");
        seen.push(out.trim().to_string());
    }
    assert!(seen.iter().all(|s| s == &seen[0]) && ["A", "B"].contains(&seen[0].as_str()), "{seen:?}");
    c.assert_verify_clean(0, name);
}
