//! The same volume through both front-ends: what iSCSI writes, NBD reads
//! back byte for byte, and the reverse. Needs the NBD server (merged from
//! the nbd branch); in a tree where NBD is a stub this test fails.

mod common;

use common::iscsi::RawIscsi;
use common::{Daemon, run_ok};

#[test]
fn iscsi_writes_read_back_over_nbd_and_the_reverse() {
    if !common::require("nbdcopy") || !common::require("iscsi-inq") {
        return;
    }
    const SIZE: usize = 16 << 20;
    let d = Daemon::start("16M", &[]);
    let tmp = tempfile::tempdir().unwrap();

    // NBD -> iSCSI: fill the whole volume over NBD, read it over iSCSI.
    let image = common::pattern(11, SIZE);
    let src = common::write_file(tmp.path(), "src.img", &image);
    run_ok("nbdcopy", &[src.to_str().unwrap(), &d.uri()]);
    let mut c = RawIscsi::connect(d.iscsi_port);
    c.login(Some(&d.iqn()));
    for (lba, blocks) in [(0u32, 1u16), (1, 7), (2048, 2048), ((SIZE / 512 - 9) as u32, 9)] {
        let got = c.read10(lba, blocks);
        let at = lba as usize * 512;
        assert!(
            got == image[at..at + blocks as usize * 512],
            "iSCSI read of LBA {lba}+{blocks} differs from NBD write"
        );
    }

    // iSCSI -> NBD: overwrite ranges over iSCSI (immediate data, R2T
    // bursts, an unaligned-to-4K LBA), then read the volume over NBD.
    let mut expect = image.clone();
    for (seed, lba, len) in
        [(21u64, 3u32, 512usize), (22, 100, 64 << 10), (23, 4096, 1 << 20), (24, 30001, 4608)]
    {
        let data = common::pattern(seed, len);
        assert_eq!(c.write10(lba, &data), 0);
        let at = lba as usize * 512;
        expect[at..at + len].copy_from_slice(&data);
    }
    // SYNCHRONIZE CACHE(10) before the other front-end looks.
    assert_eq!(c.run(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0).0, 0);
    c.logout();
    let dst = tmp.path().join("dst.img");
    run_ok("nbdcopy", &[&d.uri(), dst.to_str().unwrap()]);
    let got = std::fs::read(&dst).unwrap();
    assert_eq!(got.len(), SIZE);
    assert!(got == expect, "NBD read-back differs from what iSCSI wrote");
}

const MIB: usize = 1 << 20;
/// Volume size of the read-ahead tests: a stream of 1 MiB READs with room
/// for the read-ahead to run several MiB ahead.
const RA_SIZE: usize = 24 * MIB;

/// A daemon whose volume holds `pattern(seed)`, written over NBD.
fn filled_daemon(seed: u64) -> (Daemon, Vec<u8>) {
    let d = Daemon::start("24M", &[]);
    let tmp = tempfile::tempdir().unwrap();
    let image = common::pattern(seed, RA_SIZE);
    let src = common::write_file(tmp.path(), "src.img", &image);
    run_ok("nbdcopy", &[src.to_str().unwrap(), &d.uri()]);
    (d, image)
}

/// An nbdsh running `script` against `uri`: each line written to its stdin
/// gets one line back.
struct NbdshLines {
    child: std::process::Child,
    to: std::process::ChildStdin,
    from: std::io::BufReader<std::process::ChildStdout>,
}

impl NbdshLines {
    fn start(uri: &str, script: &str) -> NbdshLines {
        let mut child = common::nbdsh_cmd()
            .args(["-u", uri, "-c", script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let to = child.stdin.take().unwrap();
        let from = std::io::BufReader::new(child.stdout.take().unwrap());
        NbdshLines { child, to, from }
    }

    fn ask(&mut self, line: &str) -> String {
        use std::io::{BufRead, Write};
        writeln!(self.to, "{line}").unwrap();
        let mut answer = String::new();
        self.from.read_line(&mut answer).unwrap();
        answer.trim().to_string()
    }

    fn finish(self) {
        let NbdshLines { mut child, to, .. } = self;
        drop(to);
        assert!(child.wait().unwrap().success());
    }
}

/// NBD read-ahead and iSCSI writes: an NBD connection streams 1 MiB READs
/// (so the next few MiB are read ahead), and between its READs an iSCSI
/// session overwrites ranges the reader has not reached yet, some already
/// read ahead. Every NBD READ must return what iSCSI wrote: a write on the
/// other front-end must void the read-ahead too.
#[test]
fn nbd_read_ahead_sees_iscsi_writes() {
    if !common::require("nbdsh") || !common::require("iscsi-inq") {
        return;
    }
    let (d, mut expect) = filled_daemon(31);
    // The reader: one READ per line ("offset length"), answered with a
    // digest of the bytes.
    let mut reader = NbdshLines::start(
        &d.uri(),
        r#"
import hashlib, sys
for line in sys.stdin:
    off, n = map(int, line.split())
    print(hashlib.md5(h.pread(n, off)).hexdigest(), flush=True)
"#,
    );
    let digest = |b: &[u8]| {
        use md5::Digest;
        md5::Md5::digest(b).iter().map(|x| format!("{x:02x}")).collect::<String>()
    };

    let mut c = RawIscsi::connect(d.iscsi_port);
    c.login(Some(&d.iqn()));
    let mut seed = 40;
    for i in 0..RA_SIZE / MIB {
        let off = i * MIB;
        let got = reader.ask(&format!("{off} {MIB}"));
        assert_eq!(got, digest(&expect[off..off + MIB]), "NBD READ at MiB {i} is stale");
        // Overwrite part of a range 2 MiB ahead (read ahead by now, once
        // the stream has started) over iSCSI, acknowledged before the
        // reader gets there.
        let ahead = off + 2 * MIB + (i % 4) * 64 * 1024;
        if ahead + 128 * 1024 <= RA_SIZE {
            seed += 1;
            let data = common::pattern(seed, 128 * 1024);
            assert_eq!(c.write10((ahead / 512) as u32, &data), 0);
            expect[ahead..ahead + data.len()].copy_from_slice(&data);
        }
    }
    c.logout();
    reader.finish();
}

/// iSCSI read-ahead and writes from both front-ends: an iSCSI session
/// streams 1 MiB READ(10)s (so the next few MiB are read ahead), and
/// between its READs ranges it has not reached yet are overwritten, over
/// NBD and over the same iSCSI session, some already read ahead. Every
/// READ must return the latest acknowledged bytes.
#[test]
fn iscsi_read_ahead_sees_nbd_and_its_own_writes() {
    if !common::require("nbdsh") || !common::require("iscsi-inq") {
        return;
    }
    let (d, mut expect) = filled_daemon(51);
    // The NBD writer: one WRITE per line ("offset hexdata"), answered once
    // acknowledged.
    let mut writer = NbdshLines::start(
        &d.uri(),
        r#"
import sys
for line in sys.stdin:
    off, data = line.split()
    h.pwrite(bytes.fromhex(data), int(off))
    print("ok", flush=True)
"#,
    );

    let mut c = RawIscsi::connect(d.iscsi_port);
    c.login(Some(&d.iqn()));
    let mut seed = 60;
    for i in 0..RA_SIZE / MIB {
        let off = i * MIB;
        let got = c.read10((off / 512) as u32, (MIB / 512) as u16);
        assert!(got == expect[off..off + MIB], "iSCSI READ at MiB {i} is stale");
        // Overwrite part of a range 2 MiB ahead, alternately over NBD and
        // over this session, acknowledged before the reader gets there.
        let ahead = off + 2 * MIB + (i % 4) * 64 * 1024;
        if ahead + 128 * 1024 <= RA_SIZE {
            seed += 1;
            let data = common::pattern(seed, 128 * 1024);
            if i % 2 == 0 {
                let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
                assert_eq!(writer.ask(&format!("{ahead} {hex}")), "ok");
            } else {
                assert_eq!(c.write10((ahead / 512) as u32, &data), 0);
            }
            expect[ahead..ahead + data.len()].copy_from_slice(&data);
        }
    }
    c.logout();
    writer.finish();
}
