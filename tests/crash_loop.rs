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

use common::sector_oracle::{
    self, DUMP, FOCUS_FLUSHES, Model, SECTOR, UNFOCUSED_FLUSHES, Value, WORKLOAD, decode, reap, sector_bytes,
    spawn_logged, wait_flushes,
};
use common::{Daemon, require};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const VOLUME_SIZE: u64 = 64 << 20;
const EXTENT_SIZE: u64 = 8 << 20;
const CYCLES: usize = 10;
/// The cycle whose workload is focused (`sector_oracle::focus`): after
/// [`UNFOCUSED_FLUSHES`] flushes it stays within the last MiB of extent 0
/// and the first of extent 1 for [`FOCUS_FLUSHES`] more, long enough for
/// the regions of extents 0 and 1 outside it to idle through the daemon's
/// hysteresis and be marked clean, table pages deferred in the first phase
/// included. So the following crashes find clean regions (never re-checked
/// by recovery) next to dirty ones, and later cycles write into clean
/// regions again.
const FOCUS_CYCLE: usize = 4;
/// The fewest FLUSHes a cycle's workload must complete before its crash.
const MIN_FLUSHES: usize = 20;

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
    let seed = sector_oracle::seed_from_env();
    let mut rng = StdRng::seed_from_u64(seed);
    let run =
        Run { seed, dir: tempfile::Builder::new().prefix("basalt-crash-loop-").tempdir().unwrap().keep() };
    let script = common::write_file(&run.dir, "workload.py", WORKLOAD.as_bytes());
    let mut d = Daemon::start(&VOLUME_SIZE.to_string(), &daemon_args(0));
    let mut model = Model::new(VOLUME_SIZE, EXTENT_SIZE);
    let mut hot: Vec<(u64, u64)> = Vec::new();

    for cycle in 0..CYCLES {
        let cycle_start = Instant::now();
        let log = run.dir.join(format!("workload-{cycle}.log"));
        let err = run.dir.join(format!("workload-{cycle}.err"));
        let mut workload = sector_oracle::workload(
            &script,
            &d.uri(),
            &log,
            seed * 1000 + cycle as u64,
            (cycle as u64 + 1) << 32,
            EXTENT_SIZE / SECTOR,
            &hot,
        );
        // Pull the plug after a random number of flushes, at a random point
        // of a batch.
        let mut target = rng.gen_range(40..=300);
        let mut deadline = Instant::now() + Duration::from_secs(15);
        if cycle == FOCUS_CYCLE {
            workload.arg(sector_oracle::focus(EXTENT_SIZE));
            target = UNFOCUSED_FLUSHES + FOCUS_FLUSHES;
            deadline += Duration::from_secs(30);
        }
        let mut child = spawn_logged(&mut workload, &err);
        wait_flushes(&mut child, &log, target, deadline);
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
        let doubt = model.doubt(&r);
        hot = r.after_flush;

        d.restart_with(&daemon_args(cycle + 1));
        run.verify(&d, &mut model, &what);
        let (newest, durable) = model.resolved(&doubt);
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
