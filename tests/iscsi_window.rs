//! The CmdSN window under load, against a real basaltd on two workers: an
//! initiator that keeps to the MaxCmdSN the target advertises never loses
//! a command (a raw initiator that checks every CmdSN, and libiscsi's
//! iscsi-perf at depth 128), and a command that did get lost is given
//! back by ABORT TASK instead of wedging the session.

mod common;

use basalt::proto::iscsi::pdu::{Opcode, Pdu};
use bytes::Bytes;
use common::Daemon;
use common::iscsi::RawIscsi;
use std::collections::HashMap;
use std::time::Duration;

fn serial_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < (1 << 31)
}

/// What the target told us about the window, from PDUs whose fields are
/// valid (RFC 7143 4.2.2.1: MaxCmdSN >= ExpCmdSN - 1); MaxCmdSN only grows.
struct Seen {
    exp: u32,
    max: u32,
}

impl Seen {
    fn update(&mut self, p: &Pdu) {
        let (exp, max) = (p.word28(), p.u32_at(32));
        if serial_lt(max, exp.wrapping_sub(1)) {
            return;
        }
        if serial_lt(self.exp, exp) {
            self.exp = exp;
        }
        if serial_lt(self.max, max) {
            self.max = max;
        }
    }
}

fn answer_ping(c: &mut RawIscsi, ping: &Pdu) {
    let mut pong = Pdu::new(Opcode::NopOut);
    pong.bhs[0] |= 0x40;
    pong.bhs[1] = 0x80;
    pong.set_itt(0xffff_ffff);
    pong.set_u32(20, ping.word20());
    pong.set_u32(24, c.cmd_sn);
    pong.set_u32(28, c.exp_stat_sn);
    c.send(&pong);
}

fn cdb10(op: u8, lba: u32, blocks: u16, fua: bool) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = op;
    cdb[1] = if fua { 0x08 } else { 0 };
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// QD 64 against a 32-command window: the initiator always has more to
/// send than the window allows, so every command goes out at the edge
/// the target last advertised. Each must be answered, GOOD.
#[test]
fn a_window_kept_to_at_depth_64_loses_no_command() {
    if !common::require("iscsi-inq") {
        return;
    }
    const QD: usize = 64;
    const TOTAL: u32 = 60_000;
    const BLOCKS: u32 = 64 << 20 >> 9;
    let d = Daemon::start("64M", &["--workers=2"]);
    let mut c = RawIscsi::connect(d.iscsi_port);
    c.s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let login = c.login(Some(&d.iqn()));
    let mut seen = Seen { exp: login.word28(), max: login.u32_at(32) };
    let mut outstanding: HashMap<u32, u32> = HashMap::new(); // ITT -> CmdSN
    let (mut sent, mut answered, mut rng) = (0u32, 0u32, 0x9e37_79b9_7f4a_7c15u64);
    let data = Bytes::from(common::pattern(3, 4096));
    loop {
        while outstanding.len() < QD && sent < TOTAL && !serial_lt(seen.max, c.cmd_sn) {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let lba = ((rng >> 33) as u32 % (BLOCKS / 8)) * 8;
            // A quarter writes (some FUA, so commands stay in flight long
            // enough to fill the window), the rest 4 KiB reads.
            let cmd_sn = c.cmd_sn;
            let p = if sent % 4 == 0 {
                let mut w = c.command(&cdb10(0x2a, lba, 8, sent % 16 == 0), 4096, false, true);
                w.data = data.clone();
                w
            } else {
                c.command(&cdb10(0x28, lba, 8, false), 4096, true, false)
            };
            outstanding.insert(p.itt(), cmd_sn);
            c.send(&p);
            sent += 1;
        }
        if outstanding.is_empty() {
            break;
        }
        let p = match c.try_recv() {
            Ok(Some(p)) => p,
            Ok(None) => panic!("target closed the session after {answered} answers"),
            Err(e) => {
                let mut lost: Vec<u32> = outstanding.values().copied().collect();
                lost.sort_unstable();
                panic!(
                    "{e}: no answer for CmdSNs {lost:?} (all at or below the highest MaxCmdSN \
                     advertised, {}); {answered} of {sent} answered",
                    seen.max
                );
            }
        };
        seen.update(&p);
        match Opcode::from_u8(p.raw_opcode()) {
            Some(Opcode::DataIn) if p.flags() & 0x01 == 0 => {}
            Some(Opcode::DataIn) | Some(Opcode::ScsiResponse) => {
                let cmd_sn = outstanding.remove(&p.itt()).expect("an answer for a command we sent");
                assert_eq!(p.bhs[3], 0, "status of CmdSN {cmd_sn}");
                answered += 1;
            }
            Some(Opcode::NopIn) if p.itt() == 0xffff_ffff => answer_ping(&mut c, &p),
            other => panic!("unexpected PDU {other:?}"),
        }
    }
    assert_eq!(answered, TOTAL);
    // Every CmdSN was taken, none left over.
    assert_eq!(seen.exp, c.cmd_sn, "ExpCmdSN after the last answer");
    c.logout();
    let log = d.log_text();
    assert_eq!(log.matches("CmdSN outside the window").count(), 0, "commands dropped:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// libiscsi's own benchmark at depth 128 on two workers, random 4 KiB
/// reads over written data (so they reach the disk and stay in flight):
/// it must end on its own after its run time, with no reconnect.
#[test]
fn iscsi_perf_at_depth_128_finishes_without_reconnects() {
    if !common::require("iscsi-perf") || !common::require("timeout") {
        return;
    }
    let d = Daemon::start("64M", &["--workers=2"]);
    let mut c = RawIscsi::connect(d.iscsi_port);
    c.login(Some(&d.iqn()));
    for mib in 0..64u32 {
        let chunk = common::pattern(mib as u64, 1 << 20);
        let (st, _, sense) = c.run(&cdb10(0x2a, mib << 11, 2048, false), &chunk, 0);
        assert_eq!(st, 0, "WRITE of MiB {mib}: sense {sense:02x?}");
    }
    c.logout();
    // LIBISCSI_DEBUG=2 makes libiscsi log each login and reconnect, which
    // it otherwise does silently.
    let out = std::process::Command::new("timeout")
        .args(["-k", "10", "120", "iscsi-perf", "-i", "iqn.2026-11.io.basalt.test:perf"])
        .args(["-m", "128", "-r", "-t", "10", &d.iscsi_url()])
        .env("LIBISCSI_DEBUG", "2")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
        .replace('\r', "\n");
    assert_eq!(out.status.code(), Some(0), "iscsi-perf did not finish on its own:\n{text}");
    assert!(text.contains("will run for 10 seconds"), "{text}");
    assert!(text.contains("\nfinished."), "{text}");
    assert_eq!(text.matches("login successful").count(), 1, "iscsi-perf logged in again:\n{text}");
    assert!(!text.contains("reconnect"), "iscsi-perf reconnected:\n{text}");
    assert!(!text.contains("failed"), "{text}");
    let avg = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("iops average "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no average in:\n{text}"));
    assert!(avg > 0, "{text}");
    let log = d.log_text();
    assert_eq!(log.matches("CmdSN outside the window").count(), 0, "commands dropped:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    eprintln!("iscsi-perf -m 128 -r: {avg} IOPS average (loaded machine; not a benchmark)");
}

fn abort_task(c: &mut RawIscsi, rtt: u32, ref_cmd_sn: u32) -> u8 {
    let mut t = Pdu::new(Opcode::TaskMgmtRequest);
    t.bhs[0] |= 0x40; // immediate, as initiators send them
    t.bhs[1] = 0x80 | 1;
    let itt = c.itt();
    t.set_itt(itt);
    t.set_u32(20, rtt);
    t.set_u32(24, c.cmd_sn);
    t.set_u32(28, c.exp_stat_sn);
    t.set_u32(32, ref_cmd_sn);
    c.send(&t);
    let r = c.recv().expect("task management response");
    assert_eq!((r.raw_opcode(), r.itt()), (Opcode::TaskMgmtResponse as u8, itt));
    r.bhs[2]
}

/// A command lost on the way (here: never sent) leaves a hole at ExpCmdSN;
/// what follows it is out of order and dropped, as RFC 7143 says. The
/// initiator's ABORT TASK for each (RFC 7143 11.5.1: RefCmdSN in the window
/// and below the request's CmdSN) makes the target take the CmdSN as
/// received, and the session goes on instead of wedging.
#[test]
fn abort_task_gives_back_the_cmd_sn_of_a_lost_command() {
    if !common::require("iscsi-inq") {
        return;
    }
    let d = Daemon::start("64M", &[]);
    let mut c = RawIscsi::connect(d.iscsi_port);
    // A wedged session shows as a read timeout, not a test that hangs.
    c.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.login(Some(&d.iqn()));
    assert_eq!(c.test_unit_ready(), 0);
    let lost_sn = c.cmd_sn;
    let lost = c.command(&[0u8; 6], 0, false, false); // never sent
    let behind_sn = c.cmd_sn;
    let behind = c.command(&[0u8; 6], 0, false, false);
    c.send(&behind); // out of order: dropped
    // Abort the later one first: taken as received, ahead of ExpCmdSN.
    assert_eq!(abort_task(&mut c, behind.itt(), behind_sn), 0, "function complete");
    assert_eq!(abort_task(&mut c, lost.itt(), lost_sn), 0, "function complete");
    // Both CmdSNs are taken: the next command is the one the target expects.
    let (st, _, _) = c.run(&[0u8; 6], &[], 0);
    assert_eq!(st, 0);
    // A RefCmdSN past the window names nothing: task does not exist.
    let far = c.cmd_sn.wrapping_add(1000);
    assert_eq!(abort_task(&mut c, 0x7777, far), 1);
    assert_eq!(c.test_unit_ready(), 0);
    c.logout();
    assert_eq!(d.log_text().matches("ABORT TASK of a command never received").count(), 2);
}
