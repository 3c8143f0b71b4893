//! Hostile input over raw TCP against a real basaltd: each malformation
//! gets the answer RFC 7143 asks for (Reject, login reject, silent drop,
//! close), and the target keeps serving a fresh session afterwards.

mod common;

use basalt::proto::iscsi::pdu::{Opcode, Pdu};
use bytes::Bytes;
use common::Daemon;
use common::iscsi::RawIscsi;

/// A new session still works: log in, TEST UNIT READY is GOOD, write and
/// read back a block, log out.
fn still_serving(d: &Daemon) {
    let mut c = RawIscsi::connect(d.iscsi_port);
    c.login(Some(&d.iqn()));
    assert_eq!(c.test_unit_ready(), 0);
    let block = common::pattern(7, 512);
    assert_eq!(c.write10(3, &block), 0);
    assert_eq!(c.read10(3, 1), block);
    c.logout();
}

fn expect_login_reject(c: &mut RawIscsi, status: u16) {
    let r = c.recv().expect("login response");
    assert_eq!(r.raw_opcode(), Opcode::LoginResponse as u8);
    assert_eq!(r.u16_at(36), status, "status class/detail");
    assert!(c.closed());
}

fn expect_reject_and_close(c: &mut RawIscsi, reason: u8) {
    let r = c.recv().expect("reject");
    assert_eq!(r.raw_opcode(), Opcode::Reject as u8);
    assert_eq!(r.bhs[2], reason, "reject reason");
    assert_eq!(r.data.len(), 48, "reject carries the offending header");
    assert!(c.closed());
}

#[test]
fn hostile_input_is_answered_and_the_target_survives() {
    if !common::require("iscsi-inq") {
        return;
    }
    let d = Daemon::start("64M", &[]);

    // 1. Garbage BHS: every byte 0xff. The data segment length (16 MiB - 1)
    //    is over the 8 KiB login limit: Reject (protocol error), close.
    let mut c = RawIscsi::connect(d.iscsi_port);
    c.send_raw(&[0xff; 48]);
    expect_reject_and_close(&mut c, 0x04);
    still_serving(&d);

    // 2. Garbage with a sane length: an unknown opcode during login is a
    //    login reject "invalid during login" (0x020b).
    let mut c = RawIscsi::connect(d.iscsi_port);
    let mut g = [0x5au8; 48];
    g[0] = 0x1e;
    g[4] = 0;
    g[5..8].copy_from_slice(&[0, 0, 0]);
    c.send_raw(&g);
    expect_login_reject(&mut c, 0x020b);
    still_serving(&d);

    // 3. A SCSI command before login: login reject 0x020b, close.
    let mut c = RawIscsi::connect(d.iscsi_port);
    let tur = c.command(&[0u8; 6], 0, false, false);
    c.send(&tur);
    expect_login_reject(&mut c, 0x020b);
    still_serving(&d);

    // 4. Login in the wrong stage: CSG = full feature phase on the first
    //    request is an initiator error (0x0200).
    let mut c = RawIscsi::connect(d.iscsi_port);
    let iqn = d.iqn();
    let req = c.login_request(0x80 | 3 << 2 | 3, &[("InitiatorName", "iqn.x:y"), ("TargetName", &iqn)]);
    c.send(&req);
    expect_login_reject(&mut c, 0x0200);
    //    ... and a transition backwards (operational -> security).
    let mut c = RawIscsi::connect(d.iscsi_port);
    let req = c.login_request(0x80 | 1 << 2, &[("InitiatorName", "iqn.x:y"), ("TargetName", &iqn)]);
    c.send(&req);
    expect_login_reject(&mut c, 0x0200);
    //    ... and an unknown target (0x0203).
    let mut c = RawIscsi::connect(d.iscsi_port);
    let req =
        c.login_request(0x80 | 1 << 2 | 3, &[("InitiatorName", "iqn.x:y"), ("TargetName", "iqn.nope:x")]);
    c.send(&req);
    expect_login_reject(&mut c, 0x0203);
    still_serving(&d);

    // 5. Oversized data segment in the full feature phase: over the
    //    MaxRecvDataSegmentLength we declared. Reject, close; the header
    //    alone decides, the segment is never buffered.
    let mut c = RawIscsi::connect(d.iscsi_port);
    c.login(Some(&d.iqn()));
    let mut w = c.command(&[0x2a, 0, 0, 0, 0, 0, 0, 0x08, 0, 0], 1 << 20, false, true);
    let declared = (c.target_mrdsl + 512) as u32;
    w.bhs[5..8].copy_from_slice(&declared.to_be_bytes()[1..]);
    c.send_raw(&w.bhs);
    expect_reject_and_close(&mut c, 0x04);
    still_serving(&d);

    // 6. Wrong CmdSN: a command far outside the window is dropped silently;
    //    the next in-order command is answered, and the dropped one never is.
    let mut c = RawIscsi::connect(d.iscsi_port);
    c.login(Some(&d.iqn()));
    let mut bad = c.command(&[0u8; 6], 0, false, false);
    bad.set_u32(24, bad.word24().wrapping_add(1000));
    let bad_itt = bad.itt();
    c.send(&bad);
    c.cmd_sn = c.cmd_sn.wrapping_sub(1); // the dropped command did not use up a CmdSN
    let good = c.command(&[0u8; 6], 0, false, false);
    let good_itt = good.itt();
    c.send(&good);
    let r = c.recv().expect("response");
    assert_ne!(r.itt(), bad_itt, "a command outside the CmdSN window was executed");
    assert_eq!(r.itt(), good_itt);
    assert_eq!(r.raw_opcode(), Opcode::ScsiResponse as u8);
    assert_eq!(r.bhs[3], 0);
    assert_eq!(r.word28(), c.cmd_sn, "ExpCmdSN counts only accepted commands");
    c.logout();
    still_serving(&d);

    // 7. A target opcode from the initiator is rejected (protocol error),
    //    an unknown one as "command not supported"; the session goes on.
    let mut c = RawIscsi::connect(d.iscsi_port);
    c.login(Some(&d.iqn()));
    let mut t = Pdu::new(Opcode::R2t);
    t.set_itt(99);
    c.send(&t);
    let r = c.recv().expect("reject");
    assert_eq!((r.raw_opcode(), r.bhs[2]), (Opcode::Reject as u8, 0x04));
    let mut u = Pdu::new(Opcode::NopOut);
    u.bhs[0] = 0x1c;
    c.send(&u);
    let r = c.recv().expect("reject");
    assert_eq!((r.raw_opcode(), r.bhs[2]), (Opcode::Reject as u8, 0x05));
    assert_eq!(c.test_unit_ready(), 0);
    c.logout();

    // 8. An unknown opcode in the CDB: CHECK CONDITION, ILLEGAL REQUEST,
    //    INVALID COMMAND OPERATION CODE (fixed format sense).
    let mut c = RawIscsi::connect(d.iscsi_port);
    c.login(Some(&d.iqn()));
    let (st, _, sense) = c.run(&[0xc5, 0, 0, 0, 0, 0], &[], 0);
    assert_eq!(st, 0x02);
    assert_eq!((sense[0] & 0x7f, sense[2], sense[12], sense[13]), (0x70, 0x05, 0x20, 0x00));
    //    A read past the end: LBA OUT OF RANGE.
    let (st, _, sense) = c.run(&[0x28, 0, 0, 0x02, 0, 0, 0, 0, 1, 0], &[], 512);
    assert_eq!(st, 0x02);
    assert_eq!((sense[2], sense[12], sense[13]), (0x05, 0x21, 0x00));
    //    REPORT LUNS: exactly LUN 0.
    let (st, data, _) = c.run(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[], 256);
    assert_eq!((st, data), (0, vec![0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
    //    LUN 1 does not exist: TEST UNIT READY gets LOGICAL UNIT NOT
    //    SUPPORTED, INQUIRY answers with peripheral qualifier 011b.
    let mut t = c.command(&[0u8; 6], 0, false, false);
    t.set_lun(1 << 48);
    c.send(&t);
    let r = c.recv().expect("response");
    assert_eq!((r.raw_opcode(), r.bhs[3]), (Opcode::ScsiResponse as u8, 0x02));
    assert_eq!((r.data[2 + 2], r.data[2 + 12]), (0x05, 0x25));
    let mut q = c.command(&[0x12, 0, 0, 0, 36, 0], 36, true, false);
    q.set_lun(1 << 48);
    c.send(&q);
    let r = c.recv().expect("inquiry data");
    assert_eq!((r.raw_opcode(), r.data.len(), r.data[0]), (Opcode::DataIn as u8, 36, 0x7f));
    //    A NOP-Out ping is echoed with its data.
    let mut nop = Pdu::new(Opcode::NopOut);
    nop.bhs[0] |= 0x40;
    nop.set_itt(4242);
    nop.set_u32(20, 0xffff_ffff);
    nop.set_u32(24, c.cmd_sn);
    nop.data = Bytes::from_static(b"ping!");
    c.send(&nop);
    let r = c.recv().expect("nop-in");
    assert_eq!((r.raw_opcode(), r.itt(), &r.data[..]), (Opcode::NopIn as u8, 4242, &b"ping!"[..]));
    c.logout();

    // 9. EOF in the middle of a PDU: the target just closes; still serving.
    let mut c = RawIscsi::connect(d.iscsi_port);
    c.send_raw(&[0x43, 0x87, 0, 0]);
    drop(c);
    still_serving(&d);

    let log = d.log_text();
    assert!(log.contains("closing connection"), "bad connections are logged:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn crc32c_digests_are_negotiated_and_enforced() {
    if !common::require("iscsi-inq") {
        return;
    }
    let d = Daemon::start("64M", &[]);
    // Negotiated: both digests on, and real I/O works with them.
    let mut c = RawIscsi::connect(d.iscsi_port);
    c.login_with(Some(&d.iqn()), true);
    assert!(c.codec.header_digest && c.codec.data_digest, "target refused CRC32C");
    let data = common::pattern(3, 200 << 10);
    assert_eq!(c.write10(40, &data), 0);
    assert_eq!(c.read10(40, 400), data);
    c.logout();

    // A bad data digest: Reject "data digest error", then close (ERL 0).
    let mut c = RawIscsi::connect(d.iscsi_port);
    c.login_with(Some(&d.iqn()), true);
    let mut nop = Pdu::new(Opcode::NopOut);
    nop.bhs[0] |= 0x40;
    nop.set_itt(77);
    nop.set_u32(20, 0xffff_ffff);
    nop.data = Bytes::from_static(b"digest me");
    let mut wire = bytes::BytesMut::new();
    basalt::proto::iscsi::pdu::encode(&nop, &c.codec, &mut wire);
    let n = wire.len();
    wire[n - 1] ^= 0x01;
    c.send_raw(&wire);
    expect_reject_and_close(&mut c, 0x02);

    // A bad header digest: the header cannot be trusted, so just close.
    let mut c = RawIscsi::connect(d.iscsi_port);
    c.login_with(Some(&d.iqn()), true);
    let mut wire = bytes::BytesMut::new();
    basalt::proto::iscsi::pdu::encode(&nop, &c.codec, &mut wire);
    wire[48] ^= 0x01;
    c.send_raw(&wire);
    assert!(c.recv().is_none(), "no reply to a PDU with a bad header digest");
    still_serving(&d);
    assert!(d.log_text().contains("header digest mismatch"));
}

#[test]
fn task_management_aborts_a_write_waiting_for_data() {
    if !common::require("iscsi-inq") {
        return;
    }
    let d = Daemon::start("64M", &[]);
    let mut c = RawIscsi::connect(d.iscsi_port);
    c.login(Some(&d.iqn()));
    let tmf = |c: &mut RawIscsi, function: u8, rtt: u32| {
        let mut t = Pdu::new(Opcode::TaskMgmtRequest);
        t.bhs[0] |= 0x40;
        t.bhs[1] = 0x80 | function;
        t.set_itt(c.itt());
        t.set_u32(20, rtt);
        t.set_u32(24, c.cmd_sn);
        t.set_u32(32, c.cmd_sn.wrapping_sub(1));
        c.send(&t);
        let r = c.recv().expect("TMF response");
        assert_eq!(r.raw_opcode(), Opcode::TaskMgmtResponse as u8);
        r.bhs[2]
    };
    // A 128 KiB WRITE(10) with 64 KiB immediate data: the target asks for
    // the rest with an R2T, which we never answer.
    let mut w = c.command(&[0x2a, 0, 0, 0, 0, 64, 0, 1, 0, 0], 128 << 10, false, true);
    w.data = Bytes::from(vec![0xeeu8; 65536]);
    let witt = w.itt();
    c.send(&w);
    let r2t = c.recv().expect("R2T");
    assert_eq!((r2t.raw_opcode(), r2t.itt()), (Opcode::R2t as u8, witt));
    // ABORT TASK: function complete; the task never answers.
    assert_eq!(tmf(&mut c, 1, witt), 0);
    // Data-Out for the aborted task is discarded, not an error.
    let mut late = Pdu::new(Opcode::DataOut);
    late.bhs[1] = 0x80;
    late.set_itt(witt);
    late.set_u32(20, r2t.word20());
    late.set_u32(40, 65536);
    late.data = Bytes::from(vec![0xeeu8; 65536]);
    c.send(&late);
    // Nothing of the aborted write reached the medium.
    assert!(c.read10(64, 256).iter().all(|&b| b == 0));
    // ABORT TASK for a tag that never existed, with a RefCmdSN ahead of
    // this request: "task does not exist".
    let mut t = Pdu::new(Opcode::TaskMgmtRequest);
    t.bhs[0] |= 0x40;
    t.bhs[1] = 0x81;
    t.set_itt(c.itt());
    t.set_u32(20, 0x1234_5678);
    t.set_u32(24, c.cmd_sn);
    t.set_u32(32, c.cmd_sn.wrapping_add(5));
    c.send(&t);
    let r = c.recv().expect("TMF response");
    assert_eq!(r.bhs[2], 1);
    // LUN RESET and ABORT TASK SET: function complete; CLEAR ACA: not supported.
    assert_eq!(tmf(&mut c, 5, 0xffff_ffff), 0);
    assert_eq!(tmf(&mut c, 2, 0xffff_ffff), 0);
    assert_eq!(tmf(&mut c, 3, 0xffff_ffff), 5);
    assert_eq!(c.test_unit_ready(), 0);
    c.logout();
}

/// iSCSI commands take their data's room in the node-wide payload budget.
/// With the smallest budget (32 MiB), a session that opens a 32 MiB WRITE
/// and never sends its Data-Out holds all of it: another session's READ is
/// answered TASK SET FULL (nothing buffered, the initiator retries later)
/// rather than adding to the total. Once the stalled session is gone the
/// READ works and returns the data written before.
#[test]
fn node_payload_budget_answers_task_set_full_when_spent() {
    let d = Daemon::start("64M", &["--payload-budget=32MiB"]);
    let mut c = RawIscsi::connect(d.iscsi_port);
    c.login(Some(&d.iqn()));
    let block = common::pattern(11, 4096);
    assert_eq!(c.write10(8, &block), 0);

    let mut hog = RawIscsi::connect(d.iscsi_port);
    hog.login(Some(&d.iqn()));
    let blocks: u16 = 65535; // 32 MiB - 512: the whole budget in 4 KiB units
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    let cmd = hog.command(&cdb, blocks as u32 * 512, false, true);
    hog.send(&cmd);
    let r2t = hog.recv().expect("R2T for the stalled WRITE");
    assert_eq!(r2t.raw_opcode(), Opcode::R2t as u8);

    let mut cdb = [0u8; 10];
    cdb[0] = 0x28;
    cdb[2..6].copy_from_slice(&8u32.to_be_bytes());
    cdb[7..9].copy_from_slice(&8u16.to_be_bytes());
    let (status, data, _) = c.run(&cdb, &[], 4096);
    assert_eq!(status, 0x28, "TASK SET FULL while the budget is spent");
    assert!(data.is_empty());

    drop(hog);
    // The stalled session's room comes back once the target sees it gone.
    let mut answered = None;
    for _ in 0..200 {
        let (status, data, _) = c.run(&cdb, &[], 4096);
        if status == 0 {
            answered = Some(data);
            break;
        }
        assert_eq!(status, 0x28);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(answered.expect("the READ succeeds once the budget is free"), block);
    still_serving(&d);
}

/// Peak resident memory of a process, from /proc (kB).
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).expect("VmHWM in /proc/PID/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn read16_cdb(lba: u64, blocks: u32) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = 0x88;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// One READ(16) with the given EDTL: (status, Data-In, residual flags
/// (O 0x04, U 0x02), residual count), from the PDU that carries status.
fn read16(c: &mut RawIscsi, lba: u64, blocks: u32, edtl: u32) -> (u8, Vec<u8>, u8, u32) {
    let cmd = c.command(&read16_cdb(lba, blocks), edtl, true, false);
    let itt = cmd.itt();
    c.send(&cmd);
    let mut data = Vec::new();
    loop {
        let p = c.recv().expect("answer");
        assert_eq!(p.itt(), itt);
        data.extend_from_slice(&p.data);
        let op = p.raw_opcode();
        if op == Opcode::ScsiResponse as u8 {
            assert_eq!(data.len(), p.data.len(), "a SCSI Response after Data-In carries no data here");
            return (p.bhs[3], Vec::new(), p.flags() & 0x06, p.u32_at(44));
        }
        assert_eq!(op, Opcode::DataIn as u8);
        if p.flags() & 0x01 != 0 {
            return (p.bhs[3], data, p.flags() & 0x06, p.u32_at(44));
        }
    }
}

/// A READ is charged to the node's payload budget by the larger of its
/// CDB's length and the initiator's Expected Data Transfer Length, and
/// reads (and allocates) only what it sends. READ(16)s of 32 MiB with EDTL
/// 0 under a 64 MiB budget, a full window of them at a time and again as
/// each is answered: every one ends GOOD with a residual overflow of 32 MiB
/// (or TASK SET FULL while the budget is spent, and is sent again), and the
/// daemon's peak RSS grows by less than the budget. A mismatch either way
/// is answered with the residual RFC 7143 11.4.5 asks for.
#[test]
fn read_memory_is_bounded_by_the_budget_whatever_the_edtl() {
    const BIG: u32 = 32 << 20;
    let d = Daemon::start("64M", &["--payload-budget=64MiB", "--workers=2"]);
    let mut c = RawIscsi::connect(d.iscsi_port);
    c.login(Some(&d.iqn()));
    let written = common::pattern(21, BIG as usize);
    for (i, mib) in written.chunks(1 << 20).enumerate() {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2a;
        cdb[2..6].copy_from_slice(&((i as u32) << 11).to_be_bytes());
        cdb[7..9].copy_from_slice(&2048u16.to_be_bytes());
        assert_eq!(c.run(&cdb, mib, 0).0, 0);
    }
    let before = vm_hwm_kib(d.pid());

    // Keep 32 (the CmdSN window) in flight until 96 have been answered GOOD.
    let (mut good, mut full, mut sent) = (0u32, 0u32, 0u32);
    let mut in_flight = 0u32;
    while good < 96 {
        while in_flight < 32 && sent - full < 96 {
            let cmd = c.command(&read16_cdb(0, BIG / 512), 0, true, false);
            c.send(&cmd);
            in_flight += 1;
            sent += 1;
        }
        let p = c.recv().expect("answer");
        assert_eq!(p.raw_opcode(), Opcode::ScsiResponse as u8, "no Data-In for EDTL 0");
        in_flight -= 1;
        match p.bhs[3] {
            0 => {
                assert_eq!((p.flags() & 0x06, p.u32_at(44)), (0x04, BIG), "residual overflow of 32 MiB");
                good += 1;
            }
            0x28 => full += 1,
            st => panic!("status {st:#x}"),
        }
    }
    while in_flight > 0 {
        let p = c.recv().expect("answer");
        assert!(matches!(p.bhs[3], 0 | 0x28));
        in_flight -= 1;
    }
    let after = vm_hwm_kib(d.pid());
    eprintln!("VmHWM {before} kB before, {after} kB after: {} TASK SET FULL among {sent} READs", full);
    assert!(after < before + (64 << 10), "peak RSS grew from {before} kB to {after} kB");

    // EDTL short of the CDB: only EDTL bytes come back, the rest is overflow.
    let (st, data, flags, res) = read16(&mut c, 0, BIG / 512, 4096);
    assert_eq!((st, flags, res), (0, 0x04, BIG - 4096));
    assert!(data == written[..4096]);
    //    ... not a whole number of blocks.
    let (st, data, flags, res) = read16(&mut c, 8, 8, 1000);
    assert_eq!((st, flags, res), (0, 0x04, 4096 - 1000));
    assert!(data == written[4096..4096 + 1000]);
    // EDTL past the CDB: the CDB's length comes back, underflow for the rest.
    let (st, data, flags, res) = read16(&mut c, 16, 8, 8192);
    assert_eq!((st, flags, res), (0, 0x02, 4096));
    assert!(data == written[8192..12288]);
    // Out of range is judged on the CDB, whatever the EDTL.
    let (st, data, _, _) = read16(&mut c, (64 << 20) / 512 - 4, 8, 0);
    assert_eq!((st, data.len()), (0x02, 0));
    c.logout();
    assert!(!d.log_text().contains("panicked"));
}
