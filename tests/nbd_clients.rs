//! Real NBD clients (nbdinfo, qemu-img, qemu-io, nbdcopy, nbdsh, fio)
//! against a real `basaltd`. Every test starts its own small daemon.

mod common;
use common::*;
use serde_json::Value;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn json(out: &std::process::Output) -> Value {
    let text = stdout(out);
    // fio's nbd engine prints a line before its JSON.
    let start = text.find(['{', '[']).unwrap_or_else(|| panic!("no JSON in {text}"));
    serde_json::from_str(&text[start..]).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn nbdinfo_json_reports_size_capabilities_and_block_sizes() {
    if !require("nbdinfo") {
        return;
    }
    let d = Daemon::start("64M", &[]);
    let j = json(&run_ok("nbdinfo", &["--json", &d.uri()]));
    assert_eq!(j["protocol"], "newstyle-fixed");
    assert_eq!(j["structured"], true);
    let e = &j["exports"][0];
    assert_eq!(e["export-name"], "demo");
    assert_eq!(e["export-size"], 64 * MIB);
    for cap in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
        "can_df",
        "can_cache",
    ] {
        assert_eq!(e[cap], true, "{cap} in {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 * MIB);
    assert_eq!(e["contexts"], serde_json::json!(["base:allocation"]));
    assert_eq!(e["description"], "Basalt volume demo (67108864 bytes)");
}

#[test]
fn read_only_export_is_advertised_and_refuses_writes() {
    if !require("nbdinfo") || !require("nbdsh") {
        return;
    }
    let d = Daemon::start("64M", &["--read-only"]);
    let j = json(&run_ok("nbdinfo", &["--json", &d.uri()]));
    let e = &j["exports"][0];
    assert_eq!(e["is_read_only"], true);
    assert_eq!(e["can_trim"], false);
    assert_eq!(e["can_zero"], false);
    assert_eq!(e["can_flush"], true);
    nbdsh(
        &d.uri(),
        r#"
import errno
h.set_strict_mode(0)
assert h.pread(4096, 0) == bytes(4096)
for op in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.trim(512, 0), lambda: h.zero(512, 0)):
    try:
        op()
        raise AssertionError("write to a read-only export succeeded")
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, e
h.flush()
"#,
    );
}

#[test]
fn nbdinfo_list_shows_the_export() {
    if !require("nbdinfo") {
        return;
    }
    let d = Daemon::start("64M", &["--volume=vol-a"]);
    let j = json(&run_ok("nbdinfo", &["--list", "--json", &format!("nbd://127.0.0.1:{}", d.nbd_port)]));
    let names: Vec<&str> =
        j["exports"].as_array().unwrap().iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    assert_eq!(names, ["vol-a"]);
    assert_eq!(j["exports"][0]["export-size"], 64 * MIB);
}

#[test]
fn empty_export_name_is_the_only_volume() {
    if !require("nbdinfo") {
        return;
    }
    let d = Daemon::start("64M", &["--volume=only"]);
    let uri = format!("nbd://127.0.0.1:{}/", d.nbd_port);
    let j = json(&run_ok("nbdinfo", &["--json", &uri]));
    assert_eq!(j["exports"][0]["export-size"], 64 * MIB);
    let out = run("nbdinfo", &["--json", &format!("nbd://127.0.0.1:{}/nope", d.nbd_port)]);
    assert!(!out.status.success(), "unknown export must fail");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No such file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Descriptors of `nbdinfo --map --json`: (offset, length, type).
fn map(uri: &str) -> Vec<(u64, u64, u64)> {
    let j = json(&run_ok("nbdinfo", &["--map", "--json", uri]));
    j.as_array()
        .unwrap()
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["type"].as_u64().unwrap()))
        .collect()
}

/// The base:allocation type (bit 0 hole, bit 1 zero) covering `at`.
fn type_at(m: &[(u64, u64, u64)], at: u64) -> u64 {
    m.iter().find(|(o, l, _)| *o <= at && at < o + l).unwrap_or_else(|| panic!("{at} not in map {m:?}")).2
}

#[test]
fn nbdinfo_map_after_writes() {
    if !require("nbdinfo") || !require("qemu-io") {
        return;
    }
    let d = Daemon::start("64M", &["--extent-size=16MiB"]);
    let m = map(&d.uri());
    assert_eq!(m, vec![(0, 64 * MIB, 3)], "a new volume is one hole that reads as zeros");
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x61 0 1M", "-c", "write -P 0x62 32M 4k", &d.uri()]);
    let m = map(&d.uri());
    assert_eq!(m.iter().map(|e| e.1).sum::<u64>(), 64 * MIB, "the map covers the export: {m:?}");
    assert_eq!(type_at(&m, 0), 0, "written data is allocated, not known zero");
    assert_eq!(type_at(&m, 32 * MIB), 0);
    // Extents never written are holes on any store.
    assert_eq!(type_at(&m, 16 * MIB), 3);
    assert_eq!(type_at(&m, 48 * MIB), 3);
}

/// A thin store reports trimmed ranges as holes. NOTE: the stand-in store
/// (plain files, map() says all data) fails this; the real store must pass.
#[test]
fn thin_store_reports_trimmed_range_as_hole_in_map_and_reads() {
    if !require("nbdinfo") || !require("nbdsh") {
        return;
    }
    let d = Daemon::start("64M", &["--extent-size=16MiB"]);
    nbdsh(
        &d.uri(),
        r#"
h.pwrite(b"\xaa" * (4 << 20), 0)
h.trim(1 << 20, 1 << 20)
h.zero(1 << 20, 3 << 20)
h.flush()
"#,
    );
    let m = map(&d.uri());
    assert_eq!(type_at(&m, 0), 0);
    assert_eq!(type_at(&m, MIB) & 2, 2, "trimmed range reads as zero: {m:?}");
    assert_eq!(type_at(&m, MIB) & 1, 1, "trimmed range is a hole on a thin store: {m:?}");
    assert_eq!(type_at(&m, 3 * MIB), 3, "WRITE_ZEROES without NO_HOLE may deallocate: {m:?}");
    // And a structured read of it comes back as OFFSET_HOLE.
    nbdsh(
        &d.uri(),
        r#"
kinds = []
def cb(buf, offset, status, err):
    kinds.append((offset, status))
    return 0
h.pread_structured(1 << 20, 1 << 20, cb)
assert kinds == [(1 << 20, nbd.READ_HOLE)], kinds
"#,
    );
}

#[test]
fn structured_reads_send_holes_and_df_sends_one_chunk() {
    if !require("nbdsh") {
        return;
    }
    let d = Daemon::start("64M", &["--extent-size=16MiB"]);
    nbdsh(
        &d.uri(),
        r#"
h.pwrite(b"\x42" * 65536, (16 << 20) - 65536)
chunks = []
def cb(buf, offset, status, err):
    chunks.append((offset, len(buf), status, bytes(buf[:1])))
    return 0
# 64 KiB of data at the end of extent 0, then 64 KiB of extent 1 (never written).
buf = h.pread_structured(131072, (16 << 20) - 65536, cb)
assert buf == b"\x42" * 65536 + bytes(65536)
assert chunks[-1] == (16 << 20, 65536, nbd.READ_HOLE, b"\0"), chunks
assert all(c[2] == nbd.READ_DATA for c in chunks[:-1]), chunks
assert sum(c[1] for c in chunks) == 131072
chunks.clear()
buf = h.pread_structured(131072, (16 << 20) - 65536, cb, nbd.CMD_FLAG_DF)
assert buf == b"\x42" * 65536 + bytes(65536)
assert len(chunks) == 1 and chunks[0][:3] == ((16 << 20) - 65536, 131072, nbd.READ_DATA), chunks
# BLOCK_STATUS with REQ_ONE: exactly one extent, no longer than asked.
ext = []
def bs(meta, offset, entries, err):
    ext.append((meta, list(entries)))
    return 0
h.block_status(1 << 20, 32 << 20, bs, nbd.CMD_FLAG_REQ_ONE)
assert len(ext) == 1 and ext[0][0] == "base:allocation" and len(ext[0][1]) == 2, ext
assert ext[0][1][0] == 1 << 20 and ext[0][1][1] == 3, ext
h.cache(4096, 0)
"#,
    );
}

#[test]
fn qemu_img_info_convert_compare_and_map() {
    if !require("qemu-img") {
        return;
    }
    let d = Daemon::start("64M", &["--extent-size=16MiB"]);
    let dir = scratch();
    let info = json(&run_ok("qemu-img", &["info", "--output=json", &d.uri()]));
    assert_eq!(info["virtual-size"], 64 * MIB);
    assert_eq!(info["format"], "raw");

    // Map first, while extent 1 (16-32 MiB) has never been written.
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x01 0 1M", "-c", "write -P 0x02 40M 1M", &d.uri()]);
    let m = json(&run_ok("qemu-img", &["map", "--output=json", &d.uri()]));
    let m = m.as_array().unwrap();
    let total: u64 = m.iter().map(|e| e["length"].as_u64().unwrap()).sum();
    assert_eq!(total, 64 * MIB);
    let at = |off: u64| {
        m.iter()
            .find(|e| {
                let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                s <= off && off < s + l
            })
            .unwrap()
    };
    assert_eq!(at(0)["data"], true);
    assert_eq!(at(40 * MIB)["data"], true);
    // Extent 1 (16-32 MiB) was never written: a hole that reads as zeros.
    assert_eq!(at(20 * MIB)["data"], false);
    assert_eq!(at(20 * MIB)["zero"], true);

    // An image with data in the first 8 MiB and at 40 MiB, zeros elsewhere.
    let mut img = vec![0u8; 64 * MIB as usize];
    img[..8 * MIB as usize].copy_from_slice(&pattern(1, 8 * MIB as usize));
    img[40 * MIB as usize..41 * MIB as usize].copy_from_slice(&pattern(2, MIB as usize));
    let src = write_file(dir.path(), "src.img", &img);
    let src = src.to_str().unwrap();
    run_ok("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", src, &d.uri()]);
    run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", src, &d.uri()]);
    let back = dir.path().join("back.img");
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &d.uri(), back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap() == img, "image read back differs");

    // A different byte is caught by compare.
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x01 40M 512", &d.uri()]);
    let out = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", src, &d.uri()]);
    assert_eq!(out.status.code(), Some(1), "compare must report a difference");
}

#[test]
fn qemu_io_patterns_at_unaligned_offsets() {
    if !require("qemu-io") {
        return;
    }
    let d = Daemon::start("64M", &[]);
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xa5 1000 5000",
            "-c",
            "read -P 0xa5 1000 5000",
            "-c",
            "read -P 0 0 1000",
            "-c",
            "read -P 0 6000 2192",
            "-c",
            "write -P 0x3c 1048577 131071",
            "-c",
            "read -P 0x3c 1048577 131071",
            "-c",
            "write -P 0x77 2M 1M",
            "-c",
            "write -z 2M 64k",
            "-c",
            "read -P 0 2M 64k",
            "-c",
            "read -P 0x77 2112k 960k",
            "-c",
            "discard 4M 1M",
            "-c",
            "read -P 0 4M 1M",
            "-c",
            "flush",
            &d.uri(),
        ],
    );
    let text = stdout(&out);
    assert!(!text.contains("failed"), "{text}");
    assert_eq!(text.matches("read ").count(), 7, "{text}");

    let out = run("qemu-io", &["-f", "raw", "-c", "read -P 0x11 1000 5000", &d.uri()]);
    let text = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("Pattern verification failed"), "wrong pattern not detected: {text}");
}

#[test]
fn nbdcopy_round_trip_256m_with_4_connections() {
    if !require("nbdcopy") {
        return;
    }
    let d = Daemon::start("256M", &[]);
    let dir = scratch();
    let data = pattern(0xC0FFEE, 256 * MIB as usize);
    let src = write_file(dir.path(), "src.img", &data);
    run_ok("nbdcopy", &["--connections=4", "--flush", src.to_str().unwrap(), &d.uri()]);
    let back = dir.path().join("back.img");
    run_ok("nbdcopy", &["--connections=4", &d.uri(), back.to_str().unwrap()]);
    run_ok("cmp", &[src.to_str().unwrap(), back.to_str().unwrap()]);
}

#[test]
fn fio_randrw_verify_over_4_connections() {
    if !require("fio") {
        return;
    }
    let d = Daemon::start("128M", &[]);
    let uri = format!("--uri={}", d.uri());
    let out = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &uri,
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--numjobs=4",
            "--size=16M",
            "--offset_increment=32M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // fio would otherwise drop *-verify.state files in the working directory.
            "--verify_state_save=0",
            "--output-format=json",
        ],
    );
    assert!(out.status.success(), "fio failed: {}\n{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    let j = json(&out);
    let jobs = j["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 4);
    for job in jobs {
        assert_eq!(job["error"], 0, "{job}");
        assert!(job["write"]["io_bytes"].as_u64().unwrap() > 0);
        assert!(job["read"]["io_bytes"].as_u64().unwrap() > 0);
    }
}

/// Large WRITEs (64 KiB and more) take their own path: the payload is read
/// straight into aligned memory and, when block-aligned, written to disk
/// as it is. Cover it at aligned and 512-aligned offsets, across extent
/// boundaries, next to small writes, with exact bytes read back before and
/// after a restart.
#[test]
fn large_writes_aligned_or_not_and_across_extents_read_back_exactly() {
    if !require("nbdsh") {
        return;
    }
    let mut d = Daemon::start("8M", &["--extent-size=1MiB"]);
    let script = r#"
import random
rng = random.Random(7)
img = bytearray(8 << 20)
def put(off, n):
    data = bytes(rng.getrandbits(8) for _ in range(n)) if n < 4096 else rng.randbytes(n)
    h.pwrite(data, off)
    img[off:off + n] = data
put(0, 3 << 20)                       # aligned, three extents
put((1 << 20) - 512, 1 << 20)         # 512-aligned, across a boundary
put((4 << 20) + 4096, (1 << 20) + 512) # aligned start, ragged end
put((5 << 20) + 512, 64 << 10)         # exactly the threshold, unaligned
put((6 << 20) - 4096, 128 << 10)       # aligned, across a boundary
put((6 << 20) + 1024, 512)             # a small write inside the last one
h.flush()
assert h.pread(8 << 20, 0) == bytes(img), "read back differs"
open(OUT, "wb").write(bytes(img))
"#;
    let out = d.data.parent().unwrap().join("expected.img");
    nbdsh(&d.uri(), &script.replace("OUT", &format!("{:?}", out.display().to_string())));
    let want = std::fs::read(&out).unwrap();
    d.terminate();
    d.restart();
    let check = format!(
        "assert h.pread(8 << 20, 0) == open({:?}, 'rb').read(), 'differs after restart'",
        out.display().to_string()
    );
    nbdsh(&d.uri(), &check);
    assert_eq!(want.len(), 8 << 20);
}

/// CPU time (user + system, all threads) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces: fields count from after its ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The daemon polls for a while after client activity (`--idle-poll-us`,
/// default 200) instead of sleeping at once. It must stop when clients go
/// quiet, even with a connection left open: an idle daemon burns no CPU.
#[test]
fn an_idle_daemon_stops_polling() {
    if !require("nbdsh") {
        return;
    }
    let d = Daemon::start("64M", &["--idle-poll-us=1000"]);
    // A burst of small requests (which starts the poller), then the
    // connection stays open and silent.
    let script = r#"
import time
for i in range(2000):
    h.pwrite(bytes([i % 251]) * 4096, (i % 1000) * 4096)
    assert h.pread(4096, (i % 1000) * 4096) == bytes([i % 251]) * 4096
print("burst done", flush=True)
time.sleep(3)
"#;
    let mut child = common::nbdsh_cmd()
        .args(["-u", &d.uri(), "-c", script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line)
        .unwrap();
    assert_eq!(line.trim(), "burst done");
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(d.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(d.pid()) - before;
    assert!(child.wait().unwrap().success());
    let hz: u64 = stdout(&run_ok("getconf", &["CLK_TCK"])).trim().parse().unwrap();
    // Polling on would be the whole 2 s of one CPU (188 ticks at HZ 100
    // with the poller made unconditional); allow 5% of it.
    assert!(used * 100 <= 5 * 2 * hz, "idle daemon used {used} ticks of CPU in 2 s (HZ {hz})");
}

/// Read-ahead never serves stale data. One connection streams 1 MiB READs
/// (which starts read-ahead of the next few MiB) while a second connection
/// overwrites, in whole or in part, ranges just ahead of the reader, some
/// of them already being read ahead; every READ must return exactly what
/// was written last. The reader also changes its READ size midway and
/// jumps back, which must drop what was read ahead.
#[test]
fn streaming_reads_see_writes_made_ahead_of_them() {
    if !require("nbdsh") {
        return;
    }
    let d = Daemon::start("64M", &[]);
    let script = r#"
import nbd, random
MiB = 1 << 20
w = nbd.NBD()
w.connect_uri(h.get_uri())
rng = random.Random(5)
size = 64 * MiB
shadow = bytearray(size)
def write(off, n):
    data = bytes([rng.randrange(1, 256)]) * n
    w.pwrite(data, off)
    shadow[off:off + n] = data
def check(off, n):
    got = h.pread(n, off)
    if got != shadow[off:off + n]:
        bad = next(i for i in range(n) if got[i] != shadow[off + i])
        raise SystemExit(f"stale read at {off}+{n}: first bad byte at {off + bad}")
for i in range(0, size, MiB):
    write(i, MiB)
checked = 0
for rnd, step in enumerate([MiB, MiB, 512 * 1024, 2 * MiB]):
    pos = 0
    while pos + step <= size:
        check(pos, step)
        checked += 1
        k = rng.randrange(4)
        ahead = pos + step * rng.randrange(1, 4)
        if ahead + step <= size:
            if k == 0:
                write(ahead, step)
            elif k == 1:
                write(ahead + 4096 * rng.randrange(step // 4096), 4096)
            elif k == 2:
                w.zero(8192, ahead)
                shadow[ahead:ahead + 8192] = bytes(8192)
        pos += step
print("checked", checked)
"#;
    let out = nbdsh(&d.uri(), script);
    assert!(out.contains("checked 288"), "{out}");
}

/// Issue 11, item 9: WRITE_ZEROES carries no payload, so it is not bounded
/// by the 32 MiB maximum payload (the Linux driver sends up to 4 GiB for
/// BLKZEROOUT; qemu-nbd takes 64 MiB). nbdsh zeroes 1 GiB (NO_HOLE, FUA,
/// not extent-aligned) and 4 GiB - 4 KiB on a 16 GiB thin volume, then
/// trims the same 4 GiB - 4 KiB; each range reads back as zeros, and the
/// 4 KiB blocks just outside each range keep their data.
#[test]
fn nbdsh_zeroes_and_trims_of_gigabytes_spare_the_data_around_them() {
    if !require("nbdsh") {
        return;
    }
    let d = Daemon::start("16G", &[]);
    let common = r#"
G, K4, M32 = 1 << 30, 4096, 32 << 20
a, alen = G + K4, G
b, blen = 3 * G, 4 * G - K4
assert b + blen + K4 <= h.get_size()
def mark(v):
    return bytes([v]) * K4
def inside(off):
    return a <= off < a + alen or b <= off < b + blen
marks = [a - K4, a, a + alen // 2 + 512, a + alen - K4, a + alen,
         b - K4, b, b + blen // 3, b + blen - K4, b + blen]
def put_marks():
    for i, off in enumerate(marks):
        h.pwrite(mark(i + 1), off)
def check(what):
    for i, off in enumerate(marks):
        got = h.pread(K4, off)
        want = bytes(K4) if inside(off) else mark(i + 1)
        assert got == want, "%s: block at %d reads %r..." % (what, off, got[:8])
    zeros = bytes(M32)
    for start, n in ((a, alen), (b, blen)):
        at = start
        while at < start + n:
            k = min(M32, start + n - at)
            assert h.pread(k, at) == zeros[:k], "%s: not zero at %d" % (what, at)
            at += k
"#;
    let hwm = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap().to_string();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
    };
    let before = hwm();
    let zero = "put_marks()\nh.zero(alen, a, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)\nh.zero(blen, b)\n";
    nbdsh(&d.uri(), &format!("{common}{zero}"));
    // Nothing the server holds grows with a zeroing's length: what it
    // gains is the block tables of the 21 extents the ranges open (512 KiB
    // each), not 5 GiB of zeros or of dirty state.
    let after = hwm();
    eprintln!("VmHWM {before} KiB before the zeroes, {after} KiB after");
    assert!(after < before + 32 * 1024, "VmHWM grew from {before} KiB to {after} KiB zeroing 5 GiB");
    nbdsh(
        &d.uri(),
        &format!(
            "{common}check('zero')\nput_marks()\nh.trim(alen, a)\nh.trim(blen, b, nbd.CMD_FLAG_FUA)\ncheck('trim')\nh.flush()\n"
        ),
    );
}

/// A libnbd client that does not ask for NBD_INFO_BLOCK_SIZE (and does not
/// check alignment itself) is held to no block size: writes, zeroes and
/// reads at odd bytes land exactly, the bytes around them untouched, and
/// the same client asking for block sizes gets EINVAL for them.
#[test]
fn nbdsh_without_block_sizes_reads_and_writes_at_any_byte() {
    if !require("nbdsh") {
        return;
    }
    let d = Daemon::start("64M", &[]);
    let out = nbdsh_cmd()
        .args([
            "-c",
            &format!(
                r#"
import errno
h.set_request_block_size(False)
h.set_strict_mode(0)
h.connect_uri("{uri}")
base = bytes(range(256)) * 64
h.pwrite(base, 0)
h.pwrite(b"hello", 511)
h.zero(3, 1000, nbd.CMD_FLAG_NO_HOLE)
h.pwrite(b"\xff" * 5000, 4093)
want = bytearray(base)
want[511:516] = b"hello"
want[1000:1003] = bytes(3)
want[4093:9093] = b"\xff" * 5000
got = h.pread(9100, 0)
assert got == bytes(want[:9100]), "bytes differ"
assert h.pread(7, 509) == bytes(want[509:516])
h.shutdown()

g = nbd.NBD()
g.set_strict_mode(0)
g.connect_uri("{uri}")
try:
    g.pwrite(b"x", 3)
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
else:
    raise AssertionError("a client that asked for block sizes wrote at byte 3")
assert g.pread(1024, 0)[:516] == bytes(want[:516])
print("ok")
"#,
                uri = d.uri()
            ),
        ])
        .output()
        .expect("nbdsh");
    assert!(
        out.status.success() && stdout(&out).contains("ok"),
        "nbdsh failed:\n{}\n{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
}
