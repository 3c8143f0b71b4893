//! NBD on a unix socket (`nbd+unix:///NAME?socket=PATH`) against a real
//! `basaltd demo`: the same handshake and transmission as TCP, checked with
//! real clients byte for byte across both sockets; the socket file's life
//! (0660, removed at a clean stop, a stale one replaced, any other file
//! refused and kept).

mod common;
use common::*;
use serde_json::Value;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

const MIB: usize = 1 << 20;

fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// A single-node demo command on `data` that is expected to exit.
fn demo_cmd(data: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_basaltd"));
    cmd.args(["demo", "--nodes=1", "--replicas=1", "--size=16M", "--iscsi=off"])
        .arg(format!("--data={}", data.display()))
        .arg(format!("--nbd=127.0.0.1:{}", free_port()))
        .arg(format!("--admin=127.0.0.1:{}", free_port()))
        .arg(format!("--peer=127.0.0.1:{}", free_port()))
        .args(extra);
    cmd
}

#[test]
fn qemu_io_nbdinfo_and_nbdcopy_over_the_unix_socket_match_tcp_byte_for_byte() {
    if !require("qemu-io") || !require("nbdinfo") || !require("nbdcopy") {
        return;
    }
    let d = Daemon::start("64M", &[]);
    let sock = d.socket();
    assert!(is_socket(&sock), "{} is a socket", sock.display());
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket permissions {mode:o}");
    assert!(
        d.printed().iter().any(|l| l.contains(&d.unix_uri())),
        "the demo prints the unix URI: {:?}",
        d.printed()
    );

    // The same export, the same capabilities, as over TCP.
    let text = stdout(&run_ok("nbdinfo", &["--json", &d.unix_uri()]));
    let j: Value = serde_json::from_str(&text).unwrap();
    let e = &j["exports"][0];
    assert_eq!(e["export-name"], "demo");
    assert_eq!(e["export-size"], 64 * MIB);
    assert_eq!(e["can_multi_conn"], true, "{e}");
    assert_eq!(e["can_flush"], true, "{e}");
    assert_eq!(e["block_size_maximum"], 32 * MIB);
    let tcp: Value = serde_json::from_str(&stdout(&run_ok("nbdinfo", &["--json", &d.uri()]))).unwrap();
    for cap in ["export-size", "can_multi_conn", "can_fua", "can_trim", "can_zero", "block_size_preferred"] {
        assert_eq!(e[cap], tcp["exports"][0][cap], "{cap}");
    }

    // qemu-io: written through the socket, read through TCP, and back.
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 1M 3M", &d.unix_uri()]);
    run_ok("qemu-io", &["-f", "raw", "-c", "read -P 0x5a 1M 3M", "-c", "read -P 0 0 1M", &d.uri()]);
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0xc3 5M 512", &d.uri()]);
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0xc3 5M 512", "-c", "read -P 0x5a 4193792 512", &d.unix_uri()],
    );

    // nbdcopy with 4 connections (multi-conn) each way.
    let tmp = scratch();
    let src = pattern(13, 16 * MIB);
    let src_path = write_file(tmp.path(), "src.img", &src);
    let back = tmp.path().join("back.img");
    run_ok("nbdcopy", &["--connections=4", "--flush", src_path.to_str().unwrap(), &d.unix_uri()]);
    run_ok("nbdcopy", &["--connections=4", &d.uri(), back.to_str().unwrap()]);
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), 64 * MIB);
    assert!(got[..16 * MIB] == src[..], "bytes copied in through the socket read back over TCP");
    assert!(got[16 * MIB..].iter().all(|&b| b == 0), "nothing was written past 16 MiB");

    let src2 = pattern(14, 8 * MIB);
    let img = tmp.path().join("tcp.img");
    let mut whole = src2.clone();
    whole.resize(64 * MIB, 0);
    std::fs::write(&img, &whole).unwrap();
    run_ok("nbdcopy", &["--connections=4", "--flush", img.to_str().unwrap(), &d.uri()]);
    let back2 = tmp.path().join("back2.img");
    run_ok("nbdcopy", &["--connections=4", &d.unix_uri(), back2.to_str().unwrap()]);
    assert!(std::fs::read(&back2).unwrap() == whole, "bytes copied in over TCP read back through the socket");
}

#[test]
fn multi_conn_on_the_socket_a_flush_on_one_connection_covers_writes_on_another() {
    if !require("nbdsh") {
        return;
    }
    let d = Daemon::start("64M", &[]);
    // Four connections on the socket: each writes its own region, one
    // other connection flushes, and every connection reads every region.
    let script = format!(
        r#"
import nbd
uri = "{uri}"
hs = [h]
for _ in range(3):
    x = nbd.NBD()
    x.connect_uri(uri)
    hs.append(x)
assert all(x.can_multi_conn() for x in hs)
for i, x in enumerate(hs):
    x.pwrite(bytes([0x41 + i]) * 65536, i * 1048576)
hs[2].flush()
for x in hs:
    for i in range(4):
        assert x.pread(65536, i * 1048576) == bytes([0x41 + i]) * 65536, (i,)
print("ok", len(hs))
"#,
        uri = d.unix_uri()
    );
    let out = nbdsh(&d.unix_uri(), &script);
    assert_eq!(out.trim(), "ok 4");
    // Written through the socket, visible over TCP.
    let out = nbdsh(&d.uri(), "print(h.pread(512, 3 * 1048576) == b'D' * 512)");
    assert_eq!(out.trim(), "True");
}

#[test]
fn socket_is_removed_at_a_clean_stop_and_a_stale_one_does_not_stop_a_restart() {
    if !require("nbdsh") {
        return;
    }
    let mut d = Daemon::start("16M", &[]);
    let sock = d.socket();
    nbdsh(&d.unix_uri(), "h.pwrite(b'\\x77' * 4096, 8192); h.flush()");
    assert_eq!(d.terminate(), Some(0));
    assert!(!sock.exists(), "a clean stop removes {}", sock.display());

    d.restart();
    assert!(is_socket(&sock));
    d.kill9();
    assert!(is_socket(&sock), "kill -9 leaves the socket file behind");
    d.restart();
    assert!(
        d.log_text().contains("removed a stale NBD socket"),
        "the restart says it replaced the stale socket:\n{}",
        d.log_text()
    );
    let out = nbdsh(&d.unix_uri(), "print(h.pread(4096, 8192) == b'\\x77' * 4096)");
    assert_eq!(out.trim(), "True", "the restarted daemon serves on the socket");

    // A second daemon on the same socket path is refused: the socket is live.
    let other = scratch();
    let (code, err) =
        run_to_exit(demo_cmd(&other.path().join("data"), &[&format!("--nbd-unix={}", sock.display())]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("another server is listening"), "{err}");
    assert!(is_socket(&sock));
    let out = nbdsh(&d.unix_uri(), "print(h.get_size())");
    assert_eq!(out.trim(), (16 * MIB).to_string(), "the first daemon still serves");
}

#[test]
fn a_regular_file_at_the_socket_path_is_refused_and_kept() {
    let tmp = scratch();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let path = data.join("nbd.sock");
    std::fs::write(&path, b"not a socket: keep me").unwrap();
    let (code, err) = run_to_exit(demo_cmd(&data, &[]));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("listen.nbd_unix") && err.contains("is not a socket"), "a clear error: {err}");
    assert!(err.contains(&path.display().to_string()), "names the path: {err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket: keep me", "the file is not removed");
}

#[test]
fn an_explicit_path_is_used_and_off_serves_no_socket() {
    if !require("nbdinfo") {
        return;
    }
    let tmp = scratch();
    let path = tmp.path().join("my.sock");
    let mut d = Daemon::start("16M", &[&format!("--nbd-unix={}", path.display())]);
    assert!(is_socket(&path));
    assert!(!d.socket().exists(), "no socket at the default path");
    let uri = format!("nbd+unix:///demo?socket={}", path.display());
    let j: Value = serde_json::from_str(&stdout(&run_ok("nbdinfo", &["--json", &uri]))).unwrap();
    assert_eq!(j["exports"][0]["export-size"], 16 * MIB);
    assert_eq!(d.terminate(), Some(0));
    assert!(!path.exists());

    let unix_lines = |d: &Daemon| d.printed().iter().filter(|l| l.contains("nbd+unix")).count();
    let before = unix_lines(&d);
    d.restart_with(&["--nbd-unix=off"]);
    assert!(!path.exists() && !d.socket().exists(), "off: no socket anywhere");
    assert_eq!(unix_lines(&d), before, "off: no unix URI printed");
    run_ok("nbdinfo", &[&d.uri()]);
}
