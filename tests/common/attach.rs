//! A volume attached as a block device without the kernel NBD module:
//! nbdfuse exposes the export as a file, a loop device makes it a disk.
//! Dropping it unmounts, detaches and stops nbdfuse.
#![allow(dead_code)]

use super::{require, run, run_ok};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// True when `tools` and the devices an attachment needs (/dev/fuse, loop
/// devices) are here; a missing one fails under CI=true (see `require`).
pub fn usable(tools: &[&str]) -> bool {
    if !tools.iter().all(|t| require(t)) {
        return false;
    }
    if !Path::new("/dev/fuse").exists() || !Path::new("/dev/loop-control").exists() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "/dev/fuse and loop devices are needed");
        eprintln!("SKIPPING: no /dev/fuse or loop devices");
        return false;
    }
    true
}

pub struct Attached {
    fuse: Child,
    mnt_fuse: PathBuf,
    loopdev: Option<String>,
    /// Where the test mounts the filesystem.
    pub mnt: PathBuf,
}

impl Attached {
    /// Attaches `uri` with its mount points under `dir`.
    pub fn new(uri: &str, dir: &Path) -> Attached {
        let mnt_fuse = dir.join("fuse");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt_fuse).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let fuse = Command::new("nbdfuse").arg(mnt_fuse.join("disk")).arg(uri).spawn().unwrap();
        for _ in 0..100 {
            if mnt_fuse.join("disk").exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let disk = mnt_fuse.join("disk");
        assert!(disk.exists(), "nbdfuse did not come up");
        let out = run_ok("losetup", &["-f", "--show", disk.to_str().unwrap()]);
        let loopdev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        Attached { fuse, mnt_fuse, loopdev: Some(loopdev), mnt }
    }

    /// The loop device.
    pub fn dev(&self) -> &str {
        self.loopdev.as_deref().unwrap()
    }

    /// The mount point as a string (for command lines).
    pub fn mnt_str(&self) -> &str {
        self.mnt.to_str().unwrap()
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = run("umount", &[self.mnt.to_str().unwrap()]);
        if let Some(l) = self.loopdev.take() {
            let _ = run("losetup", &["-d", &l]);
        }
        let _ = run("fusermount3", &["-u", self.mnt_fuse.to_str().unwrap()]);
        let _ = self.fuse.wait();
    }
}
