//! A skeptical user's first test: a real filesystem on a volume. The volume
//! is attached through nbdfuse (no kernel NBD module here) and a loop device,
//! formatted with ext4, filled, unmounted, checked with e2fsck, remounted
//! and compared; then the daemon is restarted and the files compared again
//! from a fresh NBD connection.

mod common;

use common::attach::Attached;
use common::{Daemon, run_ok};

#[test]
fn ext4_on_a_volume_survives_fsck_remount_and_restart() {
    if !common::attach::usable(&[
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "fusermount3",
        "nbdcopy",
        "debugfs",
    ]) {
        return;
    }
    let mut d = Daemon::start("512M", &[]);
    let dir = tempfile::tempdir().unwrap();
    let payload = common::pattern(42, 48 << 20);
    let src = common::write_file(dir.path(), "payload.bin", &payload);
    {
        let a = Attached::new(&d.uri(), dir.path());
        run_ok("mkfs.ext4", &["-q", "-F", "-E", "discard", a.dev()]);
        run_ok("mount", &["-o", "discard", a.dev(), a.mnt.to_str().unwrap()]);
        for i in 0..4 {
            run_ok("cp", &[src.to_str().unwrap(), a.mnt.join(format!("f{i}")).to_str().unwrap()]);
        }
        // Delete one file so the filesystem discards (TRIM) its blocks.
        std::fs::remove_file(a.mnt.join("f3")).unwrap();
        run_ok("fstrim", &["-v", a.mnt.to_str().unwrap()]);
        run_ok("sync", &[]);
        run_ok("umount", &[a.mnt.to_str().unwrap()]);
        run_ok("e2fsck", &["-fn", a.dev()]);
        run_ok("mount", &[a.dev(), a.mnt.to_str().unwrap()]);
        for i in 0..3 {
            run_ok("cmp", &[src.to_str().unwrap(), a.mnt.join(format!("f{i}")).to_str().unwrap()]);
        }
        assert!(!a.mnt.join("f3").exists());
        run_ok("umount", &[a.mnt.to_str().unwrap()]);
    }
    // A clean restart, then a fresh connection sees the same filesystem.
    assert_eq!(d.terminate(), Some(0));
    d.restart();
    let img = dir.path().join("copy.img");
    run_ok("nbdcopy", &[&d.uri(), img.to_str().unwrap()]);
    run_ok("e2fsck", &["-fn", img.to_str().unwrap()]);
    let dumped = dir.path().join("dumped.bin");
    run_ok("debugfs", &["-R", &format!("dump /f1 {}", dumped.display()), img.to_str().unwrap()]);
    run_ok("cmp", &[src.to_str().unwrap(), dumped.to_str().unwrap()]);
    assert!(!d.log_text().contains("checksum mismatch"));
    assert_eq!(d.terminate(), Some(0));
}
