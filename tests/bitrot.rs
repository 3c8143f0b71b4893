//! Bit rot in a stored extent file: the read of the rotten block fails with
//! EIO over NBD (and MEDIUM ERROR-class sense over iSCSI is the iSCSI
//! suite's business), the log names extent and block, nothing panics, and
//! every other block still reads back exactly.

mod common;

use common::{Daemon, nbdsh, require, run_to_exit};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Finds the one file under `dir` that contains `needle` and the offset of it.
fn find_in_files(dir: &Path, needle: &[u8]) -> Option<(PathBuf, u64)> {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            if let Some(hit) = find_in_files(&p, needle) {
                return Some(hit);
            }
            continue;
        }
        let mut bytes = Vec::new();
        std::fs::File::open(&p).unwrap().read_to_end(&mut bytes).unwrap();
        if let Some(pos) = bytes.windows(needle.len()).position(|w| w == needle) {
            return Some((p, pos as u64));
        }
    }
    None
}

#[test]
fn flipped_byte_reads_as_eio_and_is_logged_with_extent_and_block() {
    if !require("nbdsh") {
        return;
    }
    let mut d = Daemon::start("128M", &[]);
    // Block 1282 of extent 0 (5 MiB + 8 KiB) gets a recognisable pattern;
    // its neighbours get other data.
    let target = (5u64 << 20) + 8192;
    nbdsh(
        &d.uri(),
        &format!(
            "h.pwrite(b'\\x11' * 4096, {prev})\n\
             h.pwrite(bytes(range(256)) * 16, {target})\n\
             h.pwrite(b'\\x22' * 4096, {next})\n\
             h.flush()",
            prev = target - 4096,
            next = target + 4096
        ),
    );
    assert_eq!(d.terminate(), Some(0));

    let needle: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let (file, pos) = find_in_files(&d.data, &needle).expect("the written block is in some extent file");
    {
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&file).unwrap();
        f.seek(SeekFrom::Start(pos + 100)).unwrap();
        f.write_all(&[0xff ^ 100u8]).unwrap();
        f.sync_all().unwrap();
    }

    d.restart();
    let out = nbdsh(
        &d.uri(),
        &format!(
            "import errno\n\
             try:\n    h.pread(4096, {target})\n    print('READ-OK')\n\
             except nbd.Error as e:\n    print('ERRNO', e.errnum == errno.EIO)\n\
             assert h.pread(4096, {prev}) == b'\\x11' * 4096\n\
             assert h.pread(4096, {next}) == b'\\x22' * 4096\n\
             print('NEIGHBOURS-OK')",
            prev = target - 4096,
            next = target + 4096
        ),
    );
    assert!(out.contains("ERRNO True"), "rotten block must read as EIO, got: {out}");
    assert!(out.contains("NEIGHBOURS-OK"), "{out}");
    let log = d.log_text();
    let line = log.lines().find(|l| l.contains("checksum mismatch")).expect("a log line for the mismatch");
    assert!(line.contains("v1/e0") && line.contains("block=1282"), "log must name extent and block: {line}");
    assert!(!log.contains("panicked"), "{log}");
    // The server is still healthy: a rewrite of the block heals it.
    nbdsh(
        &d.uri(),
        &format!("h.pwrite(b'\\x33' * 4096, {target})\nassert h.pread(4096, {target}) == b'\\x33' * 4096"),
    );
    assert_eq!(d.terminate(), Some(0));
}

/// Flips `mask` into the byte at `offset` of `path`.
fn flip(path: &Path, offset: u64, mask: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= mask;
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
}

/// Where block `b`'s 8-byte table entry lives in an extent file (format 2:
/// the table at 8192, 63 entries and an 8-byte trailer per 512-byte sector).
fn entry_pos(b: u64) -> u64 {
    8192 + (b / 63) * 512 + (b % 63) * 8
}

/// Reads every 4 KiB block of the export at `uri` and compares it with
/// the file `expected`: returns the blocks that failed (all with EIO, or
/// the test fails) and the blocks that read back other bytes.
fn read_all_blocks(uri: &str, expected: &Path) -> (Vec<u64>, Vec<u64>) {
    let out = nbdsh(
        uri,
        &format!(
            "import errno\n\
             exp = open('{}', 'rb').read()\n\
             bad = []\n\
             wrong = []\n\
             for b in range(len(exp) // 4096):\n    \
                 try:\n        \
                     if h.pread(4096, b * 4096) != exp[b * 4096:(b + 1) * 4096]:\n            \
                         wrong.append(b)\n    \
                 except nbd.Error as e:\n        \
                     assert e.errnum == errno.EIO, (b, e)\n        \
                     bad.append(b)\n\
             print('BAD', ','.join(map(str, bad)))\n\
             print('WRONG', ','.join(map(str, wrong)))",
            expected.display()
        ),
    );
    let list = |tag: &str| -> Vec<u64> {
        let line = out.lines().find_map(|l| l.strip_prefix(tag)).unwrap_or_else(|| panic!("{out}"));
        line.trim().split(',').filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect()
    };
    (list("BAD "), list("WRONG "))
}

/// Rot in the metadata of extent files read at open (block table sectors,
/// both header slots) stops neither the node nor any other extent or
/// volume: a real basaltd starts, the blocks whose entries were lost (and
/// the one extent without a header) read EIO over NBD and MEDIUM ERROR over
/// iSCSI, every other block of the volume and of a second volume reads
/// back exact bytes, rot the data can prove harmless costs nothing, each
/// loss is logged once with extent and blocks, and rewriting the lost
/// blocks heals them for good. (Before table checksums, basaltd exited 1
/// on the first malformed entry and every volume was offline.)
#[test]
fn metadata_rot_costs_only_the_blocks_it_covers() {
    if !require("nbdsh") {
        return;
    }
    const MIB: u64 = 1 << 20;
    let mut d = Daemon::start("8M", &["--volume=a", "--extent-size=1MiB"]);
    let tmp = tempfile::tempdir().unwrap();
    let img_a = common::write_file(tmp.path(), "a.img", &common::pattern(1, 8 << 20));
    let img_b = common::write_file(tmp.path(), "b.img", &common::pattern(2, 8 << 20));
    common::run_ok("nbdcopy", &[img_a.to_str().unwrap(), &d.uri()]);
    d.terminate();
    d.restart_with(&["--volume=b", "--extent-size=1MiB"]);
    let uri_b = format!("nbd://127.0.0.1:{}/b", d.nbd_port);
    common::run_ok("nbdcopy", &[img_b.to_str().unwrap(), &uri_b]);
    assert_eq!(d.terminate(), Some(0));

    let file = |i: u64| d.data.join(format!("v1-e{i}.ext"));
    // Extent 1: one entry's flags become invalid (block 100), one entry's
    // crc is off by a bit (block 200), and sector 4's own crc takes a hit
    // while its entries stay intact.
    flip(&file(1), entry_pos(100) + 4, 0x04);
    flip(&file(1), entry_pos(200), 0x01);
    flip(&file(1), 8192 + 4 * 512 + 508, 0x10);
    // Extent 2: table sector 0 (blocks 0..63) wiped to zeros.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(file(2)).unwrap();
        f.write_all_at(&[0u8; 512], 8192).unwrap();
        f.sync_all().unwrap();
    }
    // Extent 3: both header slots.
    flip(&file(3), 20, 0x01);
    flip(&file(3), 4096 + 20, 0x01);

    d.restart_with(&["--volume=a", "--extent-size=1MiB"]);
    let e1 = MIB / 4096;
    let mut want_bad: Vec<u64> = vec![e1 + 100, e1 + 200];
    want_bad.extend(2 * e1..2 * e1 + 63);
    want_bad.extend(3 * e1..4 * e1);
    let (bad, wrong) = read_all_blocks(&d.uri(), &img_a);
    assert_eq!(bad, want_bad);
    assert!(wrong.is_empty(), "blocks read back wrong bytes: {wrong:?}");
    let (bad, wrong) = read_all_blocks(&uri_b, &img_b);
    assert!(bad.is_empty() && wrong.is_empty(), "volume b: bad {bad:?}, wrong {wrong:?}");

    let log = d.log_text();
    assert!(!log.contains("panicked"), "{log}");
    let rot: Vec<&str> = log.lines().filter(|l| l.contains("block table rot")).collect();
    assert_eq!(rot.len(), 4, "one line per bad sector: {rot:#?}");
    let find = |needles: &[&str]| rot.iter().any(|l| needles.iter().all(|n| l.contains(n)));
    assert!(find(&["extent=v1/e1", "blocks=63..126", "lost=1", "first_lost=Some(100)"]), "{rot:#?}");
    assert!(find(&["extent=v1/e1", "blocks=189..252", "lost=1", "first_lost=Some(200)"]), "{rot:#?}");
    assert!(find(&["extent=v1/e1", "blocks=252..256", "lost=0"]), "{rot:#?}");
    assert!(find(&["extent=v1/e2", "blocks=0..63", "lost=63"]), "{rot:#?}");
    let gone = log.lines().find(|l| l.contains("extent unavailable")).expect("a line for extent 3");
    assert!(gone.contains("v1/e3") && gone.contains("v1-e3.ext"), "{gone}");

    // iSCSI: the lost block is a MEDIUM ERROR, its neighbour reads.
    let mut c = common::iscsi::RawIscsi::connect(d.iscsi_port);
    c.login(Some(&d.iqn()));
    let lba = |block: u64| ((block * 8) as u32).to_be_bytes();
    let read10 = |c: &mut common::iscsi::RawIscsi, block: u64| {
        let l = lba(block);
        c.run(&[0x28, 0, l[0], l[1], l[2], l[3], 0, 0, 8, 0], &[], 4096)
    };
    let (status, _, sense) = read10(&mut c, e1 + 100);
    assert_eq!(status, 2, "CHECK CONDITION");
    assert_eq!(
        (sense[2] & 0x0f, sense[12]),
        (0x03, 0x11),
        "MEDIUM ERROR, unrecovered read error: {sense:02x?}"
    );
    let (status, data, _) = read10(&mut c, e1 + 101);
    assert_eq!(status, 0);
    let a = std::fs::read(&img_a).unwrap();
    let at = ((e1 + 101) * 4096) as usize;
    assert_eq!(data, a[at..at + 4096]);
    c.logout();

    // Rewriting the lost blocks heals them; extent 3 stays unavailable
    // (its writes fail too: nothing is created over its file).
    let mut healed = a.clone();
    let fresh = common::pattern(3, 8 << 20);
    let mut script = String::new();
    for &b in want_bad.iter().filter(|&&b| b < 3 * e1) {
        let r = (b * 4096) as usize..((b + 1) * 4096) as usize;
        healed[r.clone()].copy_from_slice(&fresh[r.clone()]);
        script += &format!("h.pwrite(fresh[{s}:{e}], {s})\n", s = r.start, e = r.end);
    }
    let img_fresh = common::write_file(tmp.path(), "fresh.img", &fresh);
    let img_healed = common::write_file(tmp.path(), "healed.img", &healed);
    nbdsh(
        &d.uri(),
        &format!(
            "import errno\nfresh = open('{}', 'rb').read()\n{script}h.flush()\n\
             try:\n    h.pwrite(bytes(4096), {})\n    print('WRITE-OK')\n\
             except nbd.Error as e:\n    print('ERRNO', e.errnum == errno.EIO)",
            img_fresh.display(),
            3 * MIB + 4096
        ),
    )
    .contains("ERRNO True")
    .then_some(())
    .expect("a write into the unavailable extent fails with EIO");
    let want_after: Vec<u64> = (3 * e1..4 * e1).collect();
    assert_eq!(read_all_blocks(&d.uri(), &img_healed), (want_after.clone(), vec![]));
    assert_eq!(d.terminate(), Some(0));
    d.restart_with(&["--volume=a", "--extent-size=1MiB"]);
    assert_eq!(read_all_blocks(&d.uri(), &img_healed), (want_after, vec![]));
    let rot_lines = d.log_text().lines().filter(|l| l.contains("block table rot")).count();
    assert_eq!(rot_lines, 4, "the healed sectors were rewritten sound: nothing new to log");
    assert_eq!(d.terminate(), Some(0));
}

/// An extent file of format version 1 (no table checksums) is refused at
/// start with a message naming the file and the version; nothing is
/// served from it and the file is left as it was.
#[test]
fn extent_of_an_older_format_is_refused_by_name() {
    if !require("nbdsh") {
        return;
    }
    let mut d = Daemon::start("4M", &["--extent-size=1MiB"]);
    nbdsh(&d.uri(), "h.pwrite(b'\\x5a' * 4096, 0)\nh.flush()");
    assert_eq!(d.terminate(), Some(0));
    let path = d.data.join("v1-e0.ext");
    // Rewrite both header slots as version 1, with a valid header crc.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        for slot in 0..2u64 {
            let mut h = vec![0u8; 4096];
            f.read_exact_at(&mut h, slot * 4096).unwrap();
            h[8..12].copy_from_slice(&1u32.to_le_bytes());
            h[12..16].fill(0);
            let crc = crc32c::crc32c(&h);
            h[12..16].copy_from_slice(&crc.to_le_bytes());
            f.write_all_at(&h, slot * 4096).unwrap();
        }
        f.sync_all().unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_basaltd"));
    cmd.arg("demo")
        .args(["--nodes=1", "--replicas=1"])
        .arg(format!("--data={}", d.data.display()))
        .arg(format!("--nbd=127.0.0.1:{}", d.nbd_port))
        .args(["--iscsi=off", "--size=4M", "--extent-size=1MiB"]);
    let (code, err) = run_to_exit(cmd);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&path.display().to_string()) && err.contains("format version 1"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "the old file is not touched");
}
