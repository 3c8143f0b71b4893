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
