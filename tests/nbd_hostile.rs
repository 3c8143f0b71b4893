//! Hostile and malformed input: nbdsh with strict mode off, and raw
//! sockets speaking broken NBD. After each, the server must keep serving
//! other connections and previously acknowledged data must be intact.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_META_CONTEXT: u32 = 4;
const REP_INFO: u32 = 3;
const INFO_BLOCK_SIZE: u16 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_FLAG_DONE: u16 = 1;
const STATE_HOLE_ZERO: u32 = 3;

const EINVAL: u32 = 22;

/// A deliberately minimal NBD client that can be made to misbehave.
struct Raw {
    s: TcpStream,
}

impl Raw {
    /// Connects and reads the greeting; sends client flags (FIXED_NEWSTYLE | NO_ZEROES).
    fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut r = Raw { s };
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).unwrap();
        assert_eq!(u64::from_be_bytes(g[..8].try_into().unwrap()), NBDMAGIC);
        assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), IHAVEOPT);
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3, "FIXED_NEWSTYLE | NO_ZEROES");
        r
    }

    fn flags(&mut self, f: u32) {
        self.s.write_all(&f.to_be_bytes()).unwrap();
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        self.s.read_exact(&mut b).unwrap();
        u16::from_be_bytes(b)
    }

    fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.s.read_exact(&mut b).unwrap();
        u32::from_be_bytes(b)
    }

    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.s.read_exact(&mut b).unwrap();
        u64::from_be_bytes(b)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    /// One option reply: (option, type, data).
    fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), OPT_REPLY_MAGIC);
        let opt = self.u32();
        let kind = self.u32();
        let n = self.u32() as usize;
        (opt, kind, self.bytes(n))
    }

    /// NBD_OPT_GO asking for NBD_INFO_BLOCK_SIZE: the client agrees to
    /// keep to the sizes the server sends.
    fn go(&mut self, name: &str) -> (u64, u16) {
        self.go_with(name, &[INFO_BLOCK_SIZE])
    }

    fn go_with(&mut self, name: &str, infos: &[u16]) -> (u64, u16) {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        self.option(OPT_GO, &d);
        let mut export = None;
        loop {
            let (opt, kind, data) = self.opt_reply();
            assert_eq!(opt, OPT_GO);
            match kind {
                REP_INFO if data[..2] == [0, 0] => {
                    export = Some((
                        u64::from_be_bytes(data[2..10].try_into().unwrap()),
                        u16::from_be_bytes([data[10], data[11]]),
                    ))
                }
                REP_INFO => {}
                REP_ACK => return export.expect("NBD_INFO_EXPORT before ACK"),
                k => panic!("GO failed with {k:#x}: {}", String::from_utf8_lossy(&data)),
            }
        }
    }

    /// Handshake with simple replies only and enter transmission.
    fn open(port: u16) -> Raw {
        let mut r = Raw::connect(port);
        r.flags(3);
        r.go("demo");
        r
    }

    /// Handshake with structured replies and base:allocation, then enter
    /// transmission.
    fn open_with_block_status(port: u16) -> Raw {
        let mut r = Raw::connect(port);
        r.flags(3);
        r.option(OPT_STRUCTURED_REPLY, b"");
        assert_eq!(r.opt_reply().1, REP_ACK);
        let mut meta = Vec::new();
        meta.extend_from_slice(&4u32.to_be_bytes());
        meta.extend_from_slice(b"demo");
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&15u32.to_be_bytes());
        meta.extend_from_slice(b"base:allocation");
        r.option(OPT_SET_META_CONTEXT, &meta);
        let (_, kind, data) = r.opt_reply();
        assert_eq!((kind, &data[4..]), (REP_META_CONTEXT, &b"base:allocation"[..]));
        assert_eq!(r.opt_reply().1, REP_ACK);
        r.go("demo");
        r
    }

    fn request(&mut self, flags: u16, kind: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }

    /// A simple reply header: (error, handle).
    fn simple_reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC);
        let err = self.u32();
        (err, self.u64())
    }

    fn write(&mut self, handle: u64, offset: u64, data: &[u8]) {
        self.request(0, CMD_WRITE, handle, offset, data.len() as u32, data);
        assert_eq!(self.simple_reply(), (0, handle));
    }

    fn read(&mut self, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, CMD_READ, handle, offset, len, &[]);
        assert_eq!(self.simple_reply(), (0, handle));
        self.bytes(len as usize)
    }

    fn flush(&mut self) {
        self.request(0, CMD_FLUSH, 77, 0, 0, &[]);
        assert_eq!(self.simple_reply(), (0, 77));
    }

    /// True once the server has closed the connection.
    fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

/// Writes a known pattern (acknowledged and flushed) and returns it.
fn seed(port: u16) -> Vec<u8> {
    let data = pattern(42, 1 << 20);
    let mut c = Raw::open(port);
    c.write(1, 0, &data);
    c.flush();
    c.request(0, CMD_DISC, 2, 0, 0, &[]);
    assert!(c.closed_by_server());
    data
}

/// The seeded data is intact and a fresh connection works.
fn check_intact(port: u16, want: &[u8]) {
    let mut c = Raw::open(port);
    assert!(c.read(9, 0, want.len() as u32) == want, "acknowledged data changed");
}

fn warn_lines(d: &Daemon, needle: &str) -> usize {
    d.log_text().lines().filter(|l| l.contains("WARN") && l.contains(needle)).count()
}

#[test]
fn garbage_handshake_closes_only_that_connection() {
    let d = Daemon::start("64M", &[]);
    let want = seed(d.nbd_port);
    let mut other = Raw::open(d.nbd_port);
    let mut bad = Raw::connect(d.nbd_port);
    bad.s.write_all(b"\0\0\0\x03GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(bad.closed_by_server());
    // Unknown client flags are also refused.
    let mut bad = Raw::connect(d.nbd_port);
    bad.flags(1 << 7);
    assert!(bad.closed_by_server());
    assert_eq!(other.read(5, 0, 4096), want[..4096]);
    check_intact(d.nbd_port, &want);
    assert_eq!(warn_lines(&d, "handshake refused"), 2, "{}", d.log_text());
}

#[test]
fn wrong_request_magic_closes_only_that_connection() {
    let d = Daemon::start("64M", &[]);
    let want = seed(d.nbd_port);
    let mut bad = Raw::open(d.nbd_port);
    bad.s.write_all(&[0x25, 0x60, 0x95, 0x14]).unwrap();
    bad.s.write_all(&[0u8; 24]).unwrap();
    assert!(bad.closed_by_server());
    check_intact(d.nbd_port, &want);
    assert_eq!(warn_lines(&d, "bad request framing"), 1, "{}", d.log_text());
}

#[test]
fn truncated_frame_closes_only_that_connection() {
    let d = Daemon::start("64M", &[]);
    let want = seed(d.nbd_port);
    let mut bad = Raw::open(d.nbd_port);
    bad.s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
    bad.s.write_all(&[0u8; 10]).unwrap();
    drop(bad);
    check_intact(d.nbd_port, &want);
    // The log line is written when the server notices the EOF; poll for it.
    for _ in 0..100 {
        if warn_lines(&d, "middle of a frame") == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(warn_lines(&d, "middle of a frame"), 1, "{}", d.log_text());
}

#[test]
fn client_vanishing_mid_write_loses_nothing_acknowledged() {
    let d = Daemon::start("64M", &[]);
    let want = seed(d.nbd_port);
    let mut bad = Raw::open(d.nbd_port);
    // A 1 MiB WRITE over the seeded data, of which only 100 KiB arrive.
    bad.request(0, CMD_WRITE, 1, 0, 1 << 20, &vec![0xEE; 100 << 10]);
    drop(bad);
    check_intact(d.nbd_port, &want);
    // And a half-sent handshake option.
    let mut bad = Raw::connect(d.nbd_port);
    bad.flags(3);
    bad.s.write_all(&IHAVEOPT.to_be_bytes()).unwrap();
    drop(bad);
    check_intact(d.nbd_port, &want);
}

#[test]
fn oversized_write_is_refused_and_its_payload_skipped() {
    let d = Daemon::start("64M", &[]);
    let want = seed(d.nbd_port);
    let mut c = Raw::open(d.nbd_port);
    let len = (32 << 20) + 4096;
    let payload = vec![0xABu8; len];
    // Sent from another thread so a server that answered early could not deadlock us.
    let mut w = c.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut b = Vec::new();
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&CMD_WRITE.to_be_bytes());
        b.extend_from_slice(&3u64.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes());
        b.extend_from_slice(&(len as u32).to_be_bytes());
        w.write_all(&b).unwrap();
        w.write_all(&payload).unwrap();
    });
    assert_eq!(c.simple_reply(), (EINVAL, 3));
    sender.join().unwrap();
    // Same connection, still in sync, and nothing was written.
    assert!(c.read(4, 0, 1 << 20) == want);
}

#[test]
fn unknown_command_and_flags_get_einval_and_connection_goes_on() {
    let d = Daemon::start("64M", &[]);
    let mut c = Raw::open(d.nbd_port);
    c.request(0, 42, 1, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 1));
    c.request(1 << 12, CMD_FLUSH, 2, 0, 0, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 2));
    // DF without structured replies is a flag the client may not use.
    c.request(1 << 2, CMD_READ, 3, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 3), "a failed simple READ carries no payload");
    // Past the end: no payload either, and the stream stays in sync.
    c.request(0, CMD_READ, 4, 64 << 20, 512, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 4));
    assert_eq!(c.read(5, 0, 512), vec![0u8; 512]);
}

#[test]
fn pipelined_requests_all_answered_with_right_data() {
    let d = Daemon::start("64M", &[]);
    let mut c = Raw::open(d.nbd_port);
    // 64 writes of distinct 64 KiB blocks without waiting, then 64 reads.
    let blocks: Vec<Vec<u8>> = (0..64).map(|i| pattern(i, 64 << 10)).collect();
    for (i, b) in blocks.iter().enumerate() {
        c.request(0, CMD_WRITE, i as u64, i as u64 * (64 << 10), b.len() as u32, b);
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..64 {
        let (err, h) = c.simple_reply();
        assert_eq!(err, 0);
        assert!(seen.insert(h), "handle {h} answered twice");
    }
    for i in 0..64u64 {
        c.request(0, CMD_READ, 1000 + i, i * (64 << 10), 64 << 10, &[]);
    }
    for _ in 0..64 {
        let (err, h) = c.simple_reply();
        assert_eq!(err, 0);
        let data = c.bytes(64 << 10);
        assert!(data == blocks[(h - 1000) as usize], "wrong data for handle {h}");
    }
}

#[test]
fn handshake_options_in_every_state() {
    let d = Daemon::start("64M", &[]);
    let mut c = Raw::connect(d.nbd_port);
    c.flags(3);
    // Unknown option: ERR_UNSUP, and negotiation goes on.
    c.option(99, b"whatever");
    assert_eq!(c.opt_reply().1, REP_ERR_UNSUP);
    // Meta context before structured replies: the wrong state.
    let mut meta = Vec::new();
    meta.extend_from_slice(&4u32.to_be_bytes());
    meta.extend_from_slice(b"demo");
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    c.option(OPT_SET_META_CONTEXT, &meta);
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    // LIST with data is invalid; without, it lists the export.
    c.option(OPT_LIST, b"x");
    assert_eq!(c.opt_reply().1, REP_ERR_INVALID);
    c.option(OPT_LIST, b"");
    let (_, kind, data) = c.opt_reply();
    assert_eq!((kind, &data[..]), (REP_SERVER, &b"\0\0\0\x04demo"[..]));
    assert_eq!(c.opt_reply().1, REP_ACK);
    // GO on an unknown export: ERR_UNKNOWN, and we can still go on.
    let mut go = Vec::new();
    go.extend_from_slice(&4u32.to_be_bytes());
    go.extend_from_slice(b"nope");
    go.extend_from_slice(&0u16.to_be_bytes());
    c.option(OPT_GO, &go);
    assert_eq!(c.opt_reply().1, REP_ERR_UNKNOWN);
    c.option(OPT_STRUCTURED_REPLY, b"");
    assert_eq!(c.opt_reply().1, REP_ACK);
    c.option(OPT_SET_META_CONTEXT, &meta);
    let (_, kind, data) = c.opt_reply();
    assert_eq!((kind, &data[4..]), (4, &b"base:allocation"[..]));
    assert_eq!(c.opt_reply().1, REP_ACK);
    let (size, flags) = c.go("demo");
    assert_eq!(size, 64 << 20);
    assert_ne!(flags & (1 << 7), 0, "DF once structured replies are on");
    // A structured READ of a never-written range: one OFFSET_HOLE chunk.
    c.request(0, CMD_READ, 8, 4096, 8192, &[]);
    assert_eq!(c.u32(), STRUCTURED_REPLY_MAGIC);
    assert_eq!(c.u16(), 1, "DONE");
    assert_eq!(c.u16(), 2, "OFFSET_HOLE");
    assert_eq!(c.u64(), 8);
    assert_eq!(c.u32(), 12);
    assert_eq!((c.u64(), c.u32()), (4096, 8192));
    // A structured error: ERROR chunk with errno and message.
    c.request(0, CMD_READ, 9, 1, 512, &[]);
    assert_eq!(c.u32(), STRUCTURED_REPLY_MAGIC);
    assert_eq!((c.u16(), c.u16(), c.u64()), (1, (1 << 15) + 1, 9));
    let n = c.u32() as usize;
    let body = c.bytes(n);
    assert_eq!(u32::from_be_bytes(body[..4].try_into().unwrap()), EINVAL);

    // EXPORT_NAME with "" is the default export; with NO_ZEROES, 10 bytes.
    let mut c = Raw::connect(d.nbd_port);
    c.flags(3);
    c.option(OPT_EXPORT_NAME, b"");
    assert_eq!(c.u64(), 64 << 20);
    let flags = c.u16();
    assert_eq!(flags & 1, 1);
    assert_eq!(c.read(1, 0, 512), vec![0u8; 512], "no zero padding before transmission");
    // Without NO_ZEROES: 124 zero bytes follow.
    let mut c = Raw::connect(d.nbd_port);
    c.flags(1);
    c.option(OPT_EXPORT_NAME, b"demo");
    c.u64();
    c.u16();
    assert_eq!(c.bytes(124), vec![0u8; 124]);
    // EXPORT_NAME of an unknown export: the server hangs up.
    let mut c = Raw::connect(d.nbd_port);
    c.flags(3);
    c.option(OPT_EXPORT_NAME, b"nope");
    assert!(c.closed_by_server());
    // ABORT: ACK, then close.
    let mut c = Raw::connect(d.nbd_port);
    c.flags(3);
    c.option(OPT_ABORT, b"");
    assert_eq!(c.opt_reply().1, REP_ACK);
    assert!(c.closed_by_server());
}

#[test]
fn nbdsh_malformed_requests_get_the_spec_errno() {
    if !require("nbdsh") {
        return;
    }
    let d = Daemon::start("64M", &[]);
    nbdsh(
        &d.uri(),
        r#"
import errno
h.set_strict_mode(0)
size = h.get_size()
assert size == 64 << 20
def expect(code, f, *args):
    try:
        f(*args)
    except nbd.Error as e:
        assert e.errnum == code, "%s%r: got %s, want %s" % (f.__name__, args, e, errno.errorcode[code])
        return
    raise AssertionError("%s%r succeeded, want %s" % (f.__name__, args, errno.errorcode[code]))

h.pwrite(b"\x5a" * 4096, 0)
# past the end
expect(errno.EINVAL, h.pread, 512, size)
expect(errno.EINVAL, h.pread, 1024, size - 512)
expect(errno.ENOSPC, h.pwrite, b"x" * 512, size)
expect(errno.ENOSPC, h.zero, 1024, size - 512)
expect(errno.EINVAL, h.trim, 512, size)
expect(errno.EINVAL, h.cache, 512, size)
expect(errno.EINVAL, h.block_status, 512, size, lambda *a: 0)
# misaligned to the 512-byte minimum
expect(errno.EINVAL, h.pread, 512, 1)
expect(errno.EINVAL, h.pread, 100, 0)
expect(errno.EINVAL, h.pwrite, b"x" * 100, 0)
expect(errno.EINVAL, h.trim, 512, 3)
expect(errno.EINVAL, h.zero, 700, 0)
# flags not valid for the command
expect(errno.EINVAL, h.pread, 512, 0, nbd.CMD_FLAG_FAST_ZERO)
expect(errno.EINVAL, h.pwrite, b"x" * 512, 0, nbd.CMD_FLAG_NO_HOLE)
expect(errno.EINVAL, h.trim, 512, 0, nbd.CMD_FLAG_REQ_ONE)
expect(errno.EINVAL, h.flush, nbd.CMD_FLAG_DF)
# FAST_ZERO that would have to write: ENOTSUP, and the data is untouched
expect(errno.ENOTSUP, h.zero, 4096, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 0) == b"\x5a" * 4096
# huge lengths
expect(errno.EINVAL, h.pread, 64 << 20, 0)
expect(errno.EINVAL, h.pwrite, b"\x01" * ((32 << 20) + 512), 0)
# no payload: a zero over the maximum payload is bounded by the export only
expect(errno.ENOSPC, h.zero, 48 << 20, 32 << 20, nbd.CMD_FLAG_NO_HOLE)
# the connection is still in sync and nothing was written
assert h.pread(4096, 0) == b"\x5a" * 4096
assert h.pread(512, 32 << 20) == bytes(512)
# FUA is accepted everywhere
h.pwrite(b"\x33" * 4096, 8192, nbd.CMD_FLAG_FUA)
h.zero(4096, 8192, nbd.CMD_FLAG_FUA)
h.trim(4096, 12288, nbd.CMD_FLAG_FUA)
h.flush(nbd.CMD_FLAG_FUA)
assert h.pread(4096, 8192, nbd.CMD_FLAG_FUA) == bytes(4096)
print("ok")
"#,
    );
}

#[test]
fn sigterm_drain_answers_what_it_read_and_loses_nothing_acknowledged() {
    let mut d = Daemon::start("64M", &[]);
    let mut c = Raw::open(d.nbd_port);
    let blocks: Vec<Vec<u8>> = (0..64).map(|i| pattern(1000 + i, 64 << 10)).collect();
    let mut w = c.s.try_clone().unwrap();
    let to_send = blocks.clone();
    let sender = std::thread::spawn(move || {
        for (i, b) in to_send.iter().enumerate() {
            let mut f = Vec::with_capacity(28 + b.len());
            f.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            f.extend_from_slice(&0u16.to_be_bytes());
            f.extend_from_slice(&CMD_WRITE.to_be_bytes());
            f.extend_from_slice(&(i as u64).to_be_bytes());
            f.extend_from_slice(&(i as u64 * (64 << 10)).to_be_bytes());
            f.extend_from_slice(&(b.len() as u32).to_be_bytes());
            f.extend_from_slice(b);
            // The server may stop reading at any point; that is allowed.
            if w.write_all(&f).is_err() {
                return;
            }
        }
    });
    // Wait for the first reply so the drain has something in flight to finish.
    let first = c.simple_reply();
    assert_eq!(first.0, 0);
    assert_eq!(d.terminate(), Some(0), "drain must exit 0; log:\n{}", d.log_text());
    let mut acked = vec![first.1];
    // Every reply sent before the close must be whole and successful.
    loop {
        let mut hdr = [0u8; 16];
        match c.s.read_exact(&mut hdr) {
            Ok(()) => {
                assert_eq!(u32::from_be_bytes(hdr[..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC);
                assert_eq!(u32::from_be_bytes(hdr[4..8].try_into().unwrap()), 0);
                acked.push(u64::from_be_bytes(hdr[8..16].try_into().unwrap()));
            }
            Err(_) => break,
        }
    }
    let _ = sender.join();
    d.restart();
    let mut r = Raw::open(d.nbd_port);
    for h in &acked {
        let got = r.read(500 + h, h * (64 << 10), 64 << 10);
        assert!(got == blocks[*h as usize], "acknowledged write {h} lost");
    }
}

/// A `/proc/PID/status` figure in KiB (VmRSS: now; VmHWM: the peak so far).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// Lets the server run until its peak memory stops growing (it has done
/// all a stalled client lets it do). Only gives it the chance to
/// misbehave: what the caller asserts is the peak, whenever it came.
fn settle(pid: u32) {
    let mut last = 0;
    let mut same = 0;
    for _ in 0..400 {
        std::thread::sleep(Duration::from_millis(250));
        let now = status_kib(pid, "VmHWM:");
        same = if now == last { same + 1 } else { 0 };
        last = now;
        if same == 4 {
            return;
        }
    }
}

/// Sends every request in `reqs` (kind, offset, payload) on one connection
/// while a second thread reads the simple replies; all must succeed.
fn pipelined(port: u16, reqs: Vec<(u16, u64, Vec<u8>)>) {
    let mut c = Raw::open(port);
    let mut rd = Raw { s: c.s.try_clone().unwrap() };
    let n = reqs.len();
    let reader = std::thread::spawn(move || {
        for _ in 0..n {
            assert_eq!(rd.simple_reply().0, 0);
        }
    });
    for (i, (kind, offset, data)) in reqs.into_iter().enumerate() {
        let len = if kind == CMD_WRITE {
            data.len() as u32
        } else {
            u32::from_be_bytes(data[..].try_into().unwrap())
        };
        c.request(0, kind, i as u64, offset, len, if kind == CMD_WRITE { &data } else { &[] });
    }
    reader.join().unwrap();
}

/// `n` whole-export BLOCK_STATUS requests (handles 0..n) in one write.
fn block_status_requests(n: u64, len: u32) -> Vec<u8> {
    let mut reqs = Vec::new();
    for h in 0..n {
        reqs.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        reqs.extend_from_slice(&0u16.to_be_bytes());
        reqs.extend_from_slice(&CMD_BLOCK_STATUS.to_be_bytes());
        reqs.extend_from_slice(&h.to_be_bytes());
        reqs.extend_from_slice(&0u64.to_be_bytes());
        reqs.extend_from_slice(&len.to_be_bytes());
    }
    reqs
}

/// Writes 4 KiB of data every 8 KiB of the first `size` bytes.
fn fragment(port: u16, size: u64) {
    pipelined(port, (0..size / 8192).map(|i| (CMD_WRITE, i * 8192, pattern(i, 4096))).collect());
}

/// Reads one BLOCK_STATUS reply of the fragmented volume; its handle.
fn fragmented_status_reply(c: &mut Raw) -> u64 {
    assert_eq!(c.u32(), STRUCTURED_REPLY_MAGIC);
    assert_eq!(c.u16(), REPLY_FLAG_DONE);
    assert_eq!(c.u16(), REPLY_TYPE_BLOCK_STATUS);
    let h = c.u64();
    let len = c.u32() as usize;
    assert_eq!(c.u32(), 1, "context id of base:allocation");
    let body = c.bytes(len - 4);
    // The cap: 16 Ki descriptors, each one 4 KiB run, data then hole.
    assert_eq!(body.len() / 8, 16 << 10, "descriptors in reply {h}");
    for (i, d) in body.chunks(8).enumerate() {
        let dlen = u32::from_be_bytes(d[..4].try_into().unwrap());
        let flags = u32::from_be_bytes(d[4..].try_into().unwrap());
        let want = (4096, if i % 2 == 0 { 0 } else { STATE_HOLE_ZERO });
        assert_eq!((dlen, flags), want, "reply {h}, descriptor {i}");
    }
    h
}

/// Issue 11, item 3. 4,000 whole-export BLOCK_STATUS requests over a
/// volume fragmented into 65,536 alternating 4 KiB runs would be 2 GiB of
/// replies (512 KiB each); a client that sends them all and never reads
/// used to take the server from 7 MB to 3.09 GB. Replies are now capped at
/// 16 Ki descriptors and charged by their size to the connection's 64 MiB
/// budget and the node's until written, so the server stops reading the
/// socket instead; once the client reads, every reply is whole and right.
#[test]
fn block_status_replies_to_a_client_that_never_reads_stay_within_the_caps() {
    const SIZE: u64 = 256 << 20;
    // On tmpfs: freeing the 32 Ki file extents this makes takes ext4 (with
    // `discard`) two minutes on the test VMs; tmpfs drops them at once.
    let d = Daemon::start_in(Path::new("/dev/shm"), "256M", &[]);
    fragment(d.nbd_port, SIZE);
    // A fresh process, so the peak below is the replies' and not the writes'.
    let mut d = d;
    assert_eq!(d.terminate(), Some(0));
    d.restart();
    let before = status_kib(d.pid(), "VmHWM:");
    let mut c = Raw::open_with_block_status(d.nbd_port);
    const N: u64 = 4000;
    let reqs = block_status_requests(N, SIZE as u32);
    // 112 KB of requests: they fit in the socket buffers, so this returns
    // whether or not the server reads them.
    c.s.write_all(&reqs).unwrap();
    settle(d.pid());
    // Others are still served meanwhile.
    let mut other = Raw::open(d.nbd_port);
    assert!(other.read(1, 8192, 4096) == pattern(1, 4096));
    let peak = status_kib(d.pid(), "VmHWM:");
    eprintln!("VmHWM before {before} KiB, with the stalled client {peak} KiB");
    // The connection budget (64 MiB) plus what the allocator keeps, far
    // below the 2 GiB that buffering every reply would take.
    assert!(peak < before + 128 * 1024, "VmHWM grew from {before} KiB to {peak} KiB");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..N {
        let h = fragmented_status_reply(&mut c);
        assert!(h < N && seen.insert(h), "handle {h} unknown or answered twice");
    }
    // The stream is still in sync after all of it.
    c.request(0, CMD_READ, 9, 0, 4096, &[]);
    assert_eq!((c.u32(), c.u16(), c.u16(), c.u64()), (STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, 1, 9));
    assert_eq!(c.u32(), 8 + 4096);
    assert_eq!(c.u64(), 0);
    assert!(c.bytes(4096) == pattern(0, 4096));
}

#[test]
fn client_that_never_reads_replies_cannot_grow_server_memory() {
    let d = Daemon::start("128M", &[]);
    let mut c = Raw::open(d.nbd_port);
    let data = pattern(5, 32 << 20);
    c.write(1, 0, &data);
    c.write(2, 32 << 20, &data);
    let before = rss_kib(d.pid());
    // 20 reads of 32 MiB (640 MiB of replies) sent at once, none read back yet.
    for i in 0..20u64 {
        c.request(0, CMD_READ, 100 + i, (i % 2) * (32 << 20), 32 << 20, &[]);
    }
    // Let the server run into its budget (this only gives it the chance to
    // misbehave; nothing below depends on how long it took).
    std::thread::sleep(Duration::from_millis(500));
    let during = rss_kib(d.pid());
    // Budget 64 MiB + one frame + socket buffers, with room to spare; far
    // below the 640 MiB that buffering every reply would take.
    assert!(during < before + 256 * 1024, "RSS grew from {before} KiB to {during} KiB");
    // Other clients are still served meanwhile.
    let mut other = Raw::open(d.nbd_port);
    assert!(other.read(3, 0, 4096) == data[..4096]);
    // And every reply arrives, whole and right, once the client reads.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        let (err, h) = c.simple_reply();
        assert_eq!(err, 0);
        assert!(seen.insert(h));
        assert!(c.bytes(32 << 20) == data, "wrong data for handle {h}");
    }
}

/// The node-wide payload budget bounds memory over all connections, not
/// just per connection. With a 64 MiB budget, two clients stalled in the
/// middle of 32 MiB WRITEs hold all of it; a third client's READ then waits
/// (its connection is not read, nothing more is allocated) rather than
/// adding to the total. When the stalled clients go away their room comes
/// back, the READ is answered with the right bytes, and none of their
/// partial writes landed.
#[test]
fn node_wide_payload_budget_makes_clients_wait_instead_of_allocating() {
    let d = Daemon::start("64M", &["--payload-budget=64MiB"]);
    let want = seed(d.nbd_port);
    let hogs: Vec<Raw> = (0..2)
        .map(|i| {
            let mut c = Raw::open(d.nbd_port);
            c.request(0, CMD_WRITE, 100 + i, 0, 32 << 20, &vec![0xEE; 1 << 20]);
            c
        })
        .collect();
    let port = d.nbd_port;
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut c = Raw::open(port);
        let _ = tx.send(c.read(7, 0, 1 << 20));
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(800)).is_err(),
        "a READ must wait while stalled WRITEs hold the whole node budget"
    );
    drop(hogs);
    let data =
        rx.recv_timeout(Duration::from_secs(30)).expect("the READ is answered once the budget is free");
    assert!(data == want, "READ returned other bytes");
    reader.join().unwrap();
    check_intact(d.nbd_port, &want);
}

/// Issue 11, item 3: BLOCK_STATUS replies also take room in the node's
/// payload budget until written. With the node budget at its floor (32
/// MiB, under one connection's 64 MiB), a client that never reads its
/// BLOCK_STATUS replies holds all of it, and another client's 1 MiB READ
/// waits instead of adding to the total; it is answered, with the right
/// bytes, once the first client reads.
#[test]
fn block_status_replies_take_room_in_the_node_budget() {
    const SIZE: u64 = 256 << 20;
    let d = Daemon::start_in(Path::new("/dev/shm"), "256M", &["--payload-budget=32MiB"]);
    fragment(d.nbd_port, SIZE);
    let mut c = Raw::open_with_block_status(d.nbd_port);
    c.s.write_all(&block_status_requests(1000, SIZE as u32)).unwrap();
    settle(d.pid());
    let port = d.nbd_port;
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut c = Raw::open(port);
        let _ = tx.send(c.read(7, 0, 1 << 20));
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(800)).is_err(),
        "a READ must wait while unread BLOCK_STATUS replies hold the whole node budget"
    );
    let mut seen = std::collections::HashSet::new();
    for _ in 0..1000 {
        assert!(seen.insert(fragmented_status_reply(&mut c)));
    }
    let data =
        rx.recv_timeout(Duration::from_secs(30)).expect("the READ is answered once the budget is free");
    let want: Vec<u8> = (0..128u64).flat_map(|i| [pattern(i, 4096), vec![0; 4096]].concat()).collect();
    assert!(data == want, "READ returned other bytes");
    reader.join().unwrap();
}

// ---- clients held to no block size (issue 11, "also worth doing")

/// A client that enters transmission with NBD_OPT_EXPORT_NAME, so it can
/// agree on no block size: the spec's default minimum of 1 applies.
fn open_by_export_name(port: u16) -> Raw {
    let mut c = Raw::connect(port);
    c.flags(3);
    c.option(OPT_EXPORT_NAME, b"demo");
    c.u64();
    c.u16();
    c
}

/// xorshift, so a failing sequence reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Reads, writes, zeroes and trims at odd byte offsets and lengths (across
/// sectors, 4 KiB blocks and 1 MiB extents) from an NBD_OPT_EXPORT_NAME
/// client, each checked against an oracle; then 32 MiB (the maximum
/// payload) at an odd offset, which covers more sectors than one volume
/// request may. Trims discard the whole sectors inside their range.
#[test]
fn unaligned_requests_without_agreed_block_sizes_match_an_oracle() {
    const REGION: u64 = 8 << 20;
    let d = Daemon::start("64M", &["--extent-size=1MiB"]);
    let mut c = open_by_export_name(d.nbd_port);
    let mut oracle = vec![0u8; REGION as usize];
    let mut rng = Rng(0x5eed_0bad_cafe);
    for i in 0..3000u64 {
        let len = 1 + match rng.below(4) {
            0 => rng.below(16),
            1 => rng.below(1500),
            _ => rng.below(70_000),
        };
        let offset = rng.below(REGION - len);
        let (o, n) = (offset as usize, len as usize);
        match rng.below(6) {
            0 | 1 => {
                let data = pattern(i, n);
                c.write(i, offset, &data);
                oracle[o..o + n].copy_from_slice(&data);
            }
            2 => {
                c.request(0, CMD_WRITE_ZEROES, i, offset, len as u32, &[]);
                assert_eq!(c.simple_reply(), (0, i), "zero {offset}+{len}");
                oracle[o..o + n].fill(0);
            }
            3 => {
                c.request(0, CMD_TRIM, i, offset, len as u32, &[]);
                assert_eq!(c.simple_reply(), (0, i), "trim {offset}+{len}");
                let (a, b) = (offset.div_ceil(512) * 512, (offset + len) / 512 * 512);
                if a < b {
                    oracle[a as usize..b as usize].fill(0);
                }
            }
            _ => assert!(c.read(i, offset, len as u32) == oracle[o..o + n], "read {offset}+{len} (op {i})"),
        }
    }
    assert!(c.read(1, 0, REGION as u32) == oracle, "whole region");
    let big = pattern(77, 32 << 20);
    c.write(2, (16 << 20) + 777, &big);
    assert!(c.read(3, (16 << 20) + 777, 32 << 20) == big);
    assert!(c.read(4, (16 << 20) + 776, 1) == [0]);
    assert!(c.read(5, (48 << 20) + 777, 3) == [0, 0, 0]);
    // The same through NBD_OPT_GO without NBD_INFO_BLOCK_SIZE, with
    // structured replies: a READ's chunks carry the odd offsets.
    let mut g = Raw::connect(d.nbd_port);
    g.flags(3);
    g.option(OPT_STRUCTURED_REPLY, b"");
    assert_eq!(g.opt_reply().1, REP_ACK);
    g.go_with("demo", &[]);
    g.request(0, CMD_READ, 6, 1001, 3001, &[]);
    let mut got = vec![0xEEu8; 3001];
    loop {
        assert_eq!(g.u32(), STRUCTURED_REPLY_MAGIC);
        let (flags, kind, h, n) = (g.u16(), g.u16(), g.u64(), g.u32() as usize);
        assert_eq!(h, 6);
        let at = (g.u64() - 1001) as usize;
        match kind {
            1 => got[at..at + n - 8].copy_from_slice(&g.bytes(n - 8)),
            2 => got[at..at + g.u32() as usize].fill(0),
            k => panic!("chunk type {k}"),
        }
        if flags & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    assert!(got == oracle[1001..4002]);
}

/// Two connections of clients held to no block size write interleaved
/// 50-byte runs (ten to a sector, alternating between the connections),
/// many in flight at once: each partial sector is read-modify-written by
/// both at the same time, and the store's exclusive range lock must keep
/// every one of those writes. Three rounds, each awaited before the next.
#[test]
fn concurrent_unaligned_writes_from_two_connections_lose_nothing() {
    const RUN: u64 = 50;
    const RUNS: u64 = 1024;
    let d = Daemon::start("64M", &[]);
    let mut want = vec![0u8; (2 * RUN * RUNS) as usize];
    for round in 0..3u64 {
        let writers: Vec<_> = (0..2u64)
            .map(|who| {
                let port = d.nbd_port;
                let runs: Vec<(u64, Vec<u8>)> = (0..RUNS)
                    .map(|i| {
                        let at = (2 * i + who) * RUN;
                        (at, pattern(round * 1_000_000 + at, RUN as usize))
                    })
                    .collect();
                for (at, data) in &runs {
                    want[*at as usize..(*at + RUN) as usize].copy_from_slice(data);
                }
                std::thread::spawn(move || {
                    let mut c = open_by_export_name(port);
                    let mut rd = Raw { s: c.s.try_clone().unwrap() };
                    let reader = std::thread::spawn(move || {
                        for _ in 0..RUNS {
                            assert_eq!(rd.simple_reply().0, 0);
                        }
                    });
                    for (i, (at, data)) in runs.iter().enumerate() {
                        c.request(0, CMD_WRITE, i as u64, *at + 4096 - 7, RUN as u32, data);
                    }
                    reader.join().unwrap();
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let mut c = open_by_export_name(d.nbd_port);
        let got = c.read(1, 4096 - 7, want.len() as u32);
        let lost = (0..2 * RUNS).filter(|r| {
            let s = (*r * RUN) as usize..((r + 1) * RUN) as usize;
            got[s.clone()] != want[s]
        });
        assert_eq!(lost.count(), 0, "runs lost in round {round}");
    }
}

/// A client that asked for NBD_INFO_BLOCK_SIZE is held to the 512-byte
/// minimum: misaligned requests get EINVAL and change nothing.
#[test]
fn clients_that_agreed_block_sizes_get_einval_for_misaligned_requests() {
    let d = Daemon::start("64M", &[]);
    let want = seed(d.nbd_port);
    let mut c = Raw::open(d.nbd_port);
    for (i, (kind, offset, len)) in [
        (CMD_READ, 1, 512),
        (CMD_READ, 0, 100),
        (CMD_WRITE, 100, 512),
        (CMD_WRITE_ZEROES, 0, 700),
        (CMD_TRIM, 3, 512),
    ]
    .into_iter()
    .enumerate()
    {
        let payload = if kind == CMD_WRITE { vec![0xAB; len as usize] } else { vec![] };
        c.request(0, kind, i as u64, offset, len, &payload);
        assert_eq!(c.simple_reply(), (EINVAL, i as u64), "kind {kind} at {offset}+{len}");
    }
    check_intact(d.nbd_port, &want);
}

/// A client held to no block size that vanishes with hundreds of
/// overlapping read-modify-writes sent leaves no sector locked: another
/// such client then writes the same bytes and reads back exactly what it
/// wrote; and the bytes of the vanished client's range hold its values or
/// the old zeros, nothing else.
#[test]
fn client_vanishing_mid_unaligned_writes_leaves_no_sector_locked() {
    let d = Daemon::start("64M", &[]);
    let mut a = open_by_export_name(d.nbd_port);
    // 500 writes of 600 bytes at offsets 7 + 3i: each overlaps its
    // neighbours and straddles a sector boundary; all carry byte 0xA0+i%16.
    let mut burst = Vec::new();
    for i in 0..500u64 {
        burst.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        burst.extend_from_slice(&0u16.to_be_bytes());
        burst.extend_from_slice(&CMD_WRITE.to_be_bytes());
        burst.extend_from_slice(&i.to_be_bytes());
        burst.extend_from_slice(&(7 + 3 * i).to_be_bytes());
        burst.extend_from_slice(&600u32.to_be_bytes());
        burst.extend_from_slice(&[0xA0 + (i % 16) as u8; 600]);
    }
    a.s.write_all(&burst).unwrap();
    drop(a);
    let mut b = open_by_export_name(d.nbd_port);
    let got = b.read(1, 0, 4096);
    // The server may have run any subset of the burst (the client's close
    // resets the connection): bytes it wrote hold one of its values, the
    // rest are still zero, and nothing else appears.
    assert!(got[..7].iter().all(|&x| x == 0));
    assert!(got[7..7 + 3 * 499 + 600].iter().all(|&x| x == 0 || (0xA0..0xB0).contains(&x)), "foreign bytes");
    assert!(got[7 + 3 * 499 + 600..].iter().all(|&x| x == 0));
    let mine = pattern(9, 1500);
    b.write(2, 5, &mine);
    assert!(b.read(3, 5, 1500) == mine, "the sectors are writable and exact afterwards");
}
