//! Bit rot in a stored extent file: the read of the rotten block fails with
//! EIO over NBD (and MEDIUM ERROR-class sense over iSCSI is the iSCSI
//! suite's business), the log names extent and block, nothing panics, and
//! every other block still reads back exactly.

mod common;

use common::{Daemon, nbdsh, require};
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
