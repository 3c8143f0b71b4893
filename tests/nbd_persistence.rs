//! Data written over NBD and flushed survives a clean stop (SIGTERM, exit
//! code 0) and a crash (kill -9), byte for byte.

mod common;
use common::*;

/// Writes `data` at 1 MiB + 512 over NBD and flushes it (nbdsh), with a
/// few FUA writes and a WRITE_ZEROES mixed in.
fn write_and_flush(d: &Daemon, file: &std::path::Path) {
    nbdsh(
        &d.uri(),
        &format!(
            r#"
data = open({path:?}, "rb").read()
h.pwrite(data, (1 << 20) + 512)
h.pwrite(b"\x77" * 4096, 40 << 20, nbd.CMD_FLAG_FUA)
h.zero(8192, 41 << 20, nbd.CMD_FLAG_NO_HOLE)
h.flush()
"#,
            path = file.to_str().unwrap()
        ),
    );
}

fn check(d: &Daemon, file: &std::path::Path) {
    nbdsh(
        &d.uri(),
        &format!(
            r#"
data = open({path:?}, "rb").read()
assert h.pread(len(data), (1 << 20) + 512) == data, "data changed"
assert h.pread(4096, 40 << 20) == b"\x77" * 4096
assert h.pread(8192, 41 << 20) == bytes(8192)
assert h.pread(512, 1 << 20) == bytes(512), "bytes before the write changed"
"#,
            path = file.to_str().unwrap()
        ),
    );
}

#[test]
fn flushed_data_survives_sigterm_and_restart() {
    if !require("nbdsh") {
        return;
    }
    let dir = scratch();
    let file = write_file(dir.path(), "data.bin", &pattern(7, 5 << 20));
    let mut d = Daemon::start("64M", &[]);
    write_and_flush(&d, &file);
    assert_eq!(d.terminate(), Some(0), "clean shutdown exits 0; log:\n{}", d.log_text());
    d.restart();
    check(&d, &file);
}

#[test]
fn flushed_data_survives_kill_9_and_restart() {
    if !require("nbdsh") {
        return;
    }
    let dir = scratch();
    let file = write_file(dir.path(), "data.bin", &pattern(8, 5 << 20));
    let mut d = Daemon::start("64M", &[]);
    write_and_flush(&d, &file);
    d.kill9();
    d.restart();
    check(&d, &file);
}

#[test]
fn sigterm_with_connections_open_drains_and_exits_0() {
    if !require("nbdsh") {
        return;
    }
    let dir = scratch();
    let file = write_file(dir.path(), "data.bin", &pattern(9, 1 << 20));
    let mut d = Daemon::start("64M", &[]);
    // A client that stays connected (mid-handshake) and one in transmission.
    let _idle = std::net::TcpStream::connect(("127.0.0.1", d.nbd_port)).unwrap();
    let mut busy = std::process::Command::new("nbdsh");
    busy.env("PATH", format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()))
        .args([
            "-u",
            &d.uri(),
            "-c",
            &format!(
                "h.pwrite(open({:?}, 'rb').read(), 0)\nh.flush()\nimport sys\nprint('written', flush=True)\nsys.stdin.read()",
                file.to_str().unwrap()
            ),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = busy.spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut().unwrap()), &mut line)
        .unwrap();
    assert_eq!(line.trim(), "written");
    assert_eq!(d.terminate(), Some(0), "log:\n{}", d.log_text());
    drop(child.stdin.take());
    let _ = child.wait();
    d.restart();
    nbdsh(
        &d.uri(),
        &format!("assert h.pread(1 << 20, 0) == open({:?}, 'rb').read()", file.to_str().unwrap()),
    );
}
