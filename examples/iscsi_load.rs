//! A small iSCSI load generator for `scripts/bench-iscsi`: one session,
//! QD commands in flight, random or sequential READ(16)/WRITE(16) for a
//! fixed time; prints IOPS and MiB/s. It exists because iscsi-perf only
//! reads and this fio has no libiscsi engine. Uses the crate's PDU codec.
//!
//! iscsi_load <host:port> <target-iqn> <lun> <randread|randwrite|read|write> <bs> <qd> <secs>

use basalt::proto::iscsi::pdu::{self, CodecConfig, Opcode, Pdu};
use basalt::proto::iscsi::text;
use bytes::{Bytes, BytesMut};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

fn send(w: &Mutex<TcpStream>, p: &Pdu) {
    let mut out = BytesMut::new();
    pdu::encode(p, &CodecConfig::default(), &mut out);
    w.lock().unwrap().write_all(&out).expect("send");
}

struct Reader {
    s: TcpStream,
    buf: BytesMut,
    codec: CodecConfig,
}

impl Reader {
    fn next(&mut self) -> Pdu {
        loop {
            if let Some(p) = pdu::decode(&mut self.buf, &self.codec).expect("framing") {
                return p;
            }
            let mut tmp = vec![0u8; 1 << 20];
            let n = self.s.read(&mut tmp).expect("read");
            assert!(n > 0, "target closed the connection");
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 8 {
        eprintln!(
            "usage: iscsi_load <host:port> <iqn> <lun> <randread|randwrite|read|write> <bs> <qd> <secs>"
        );
        std::process::exit(2);
    }
    let (addr, iqn, lun): (&str, &str, u64) = (&a[1], &a[2], a[3].parse().unwrap());
    let op = a[4].as_str();
    let bs: usize = a[5].parse().unwrap();
    let qd: u32 = a[6].parse().unwrap();
    let secs: u64 = a[7].parse().unwrap();
    let write = op.contains("write");
    let random = op.starts_with("rand");

    let s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).unwrap();
    let w = Arc::new(Mutex::new(s.try_clone().unwrap()));
    let mut r = Reader {
        s,
        buf: BytesMut::new(),
        codec: CodecConfig { max_recv_data: 1 << 20, ..Default::default() },
    };

    // Login: operational stage straight to full feature phase.
    let mut login = Pdu::new(Opcode::LoginRequest);
    login.bhs[0] |= 0x40;
    login.bhs[1] = 0x80 | 1 << 2 | 3;
    login.bhs[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0x42, 1]);
    let kv: Vec<(String, String)> = [
        ("InitiatorName", "iqn.2026-11.io.basalt.bench:load"),
        ("SessionType", "Normal"),
        ("TargetName", iqn),
        ("HeaderDigest", "None"),
        ("DataDigest", "None"),
        ("MaxRecvDataSegmentLength", "262144"),
        ("ImmediateData", "Yes"),
        ("InitialR2T", "Yes"),
        ("FirstBurstLength", "65536"),
        ("MaxBurstLength", "16776192"),
        ("MaxOutstandingR2T", "1"),
        ("ErrorRecoveryLevel", "0"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    login.data = Bytes::from(text::encode(&kv));
    send(&w, &login);
    let resp = r.next();
    assert_eq!(resp.u16_at(36), 0, "login failed: status {:#06x}", resp.u16_at(36));
    assert_eq!(resp.flags() & 3, 3, "login needs more steps than this tool does");
    let mut target_mrdsl = 8192usize;
    let mut first_burst = 65536usize;
    let mut immediate = true;
    for (k, v) in text::parse(&resp.data).unwrap() {
        match k.as_str() {
            "MaxRecvDataSegmentLength" => target_mrdsl = v.parse().unwrap(),
            "FirstBurstLength" => first_burst = v.parse().unwrap(),
            "ImmediateData" => immediate = v == "Yes",
            _ => {}
        }
    }
    let mut cmd_sn = resp.u32_at(28);
    // Targets may open the window only after login (tgt does): follow
    // MaxCmdSN from every PDU and never send past it.
    let max_cmd_sn = Arc::new(AtomicU32::new(resp.u32_at(32)));

    // TEST UNIT READY until GOOD: a fresh LUN reports UNIT ATTENTION first (tgt does).
    let lun_field = lun << 48;
    for _ in 0..4 {
        let mut t = Pdu::new(Opcode::ScsiCommand);
        t.bhs[1] = 0x81;
        t.set_lun(lun_field);
        t.set_itt(0x7000_0000);
        t.set_u32(24, cmd_sn);
        cmd_sn = cmd_sn.wrapping_add(1);
        send(&w, &t);
        let resp = r.next();
        max_cmd_sn.store(resp.u32_at(32), Ordering::Release);
        if resp.bhs[3] == 0 {
            break;
        }
    }
    let payload = Bytes::from(vec![0x5au8; bs]);
    let blocks = (bs / 512) as u32;
    let (tok_tx, tok_rx) = mpsc::channel::<()>();
    for _ in 0..qd {
        tok_tx.send(()).unwrap();
    }
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let rw = w.clone();
    let rdone = done.clone();
    let rpayload = payload.clone();
    let rmax = max_cmd_sn.clone();
    let reader = std::thread::spawn(move || {
        loop {
            let p = r.next();
            let m = p.u32_at(32);
            let cur = rmax.load(Ordering::Acquire);
            if m.wrapping_sub(cur) < (1 << 31) {
                rmax.store(m, Ordering::Release);
            }
            match Opcode::from_u8(p.raw_opcode()) {
                Some(Opcode::R2t) => {
                    let (ttt, mut off) = (p.word20(), p.u32_at(40) as usize);
                    let end = off + p.u32_at(44) as usize;
                    let mut sn = 0;
                    while off < end {
                        let n = (end - off).min(target_mrdsl);
                        let mut d = Pdu::new(Opcode::DataOut);
                        d.bhs[1] = if off + n == end { 0x80 } else { 0 };
                        d.set_lun(lun_field);
                        d.set_itt(p.itt());
                        d.set_u32(20, ttt);
                        d.set_u32(36, sn);
                        d.set_u32(40, off as u32);
                        d.data = rpayload.slice(off..off + n);
                        send(&rw, &d);
                        sn += 1;
                        off += n;
                    }
                }
                Some(Opcode::DataIn) if p.flags() & 1 == 0 => {}
                Some(Opcode::DataIn) | Some(Opcode::ScsiResponse) => {
                    assert_eq!(p.bhs[3], 0, "SCSI status {:#x}", p.bhs[3]);
                    rdone.fetch_add(1, Ordering::Relaxed);
                    if tok_tx.send(()).is_err() {
                        return;
                    }
                }
                Some(Opcode::NopIn) if p.itt() == 0xffff_ffff => {
                    let mut n = Pdu::new(Opcode::NopOut);
                    n.bhs[0] |= 0x40;
                    n.set_itt(0xffff_ffff);
                    n.set_u32(20, p.word20());
                    send(&rw, &n);
                }
                Some(Opcode::LogoutResponse) => return,
                other => panic!("unexpected PDU {other:?}"),
            }
        }
    });

    let capacity_blocks: u64 = 1 << 18; // the first 128 MiB of the LUN
    let span = capacity_blocks / blocks as u64;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut seq = 0u64;
    let mut itt = 0u32;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut issued = 0u64;
    while Instant::now() < deadline {
        tok_rx.recv().unwrap();
        while max_cmd_sn.load(Ordering::Acquire).wrapping_sub(cmd_sn) >= (1 << 31) {
            std::thread::yield_now();
        }
        let lba = if random {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % span) * blocks as u64
        } else {
            seq = (seq + 1) % span;
            seq * blocks as u64
        };
        let mut c = Pdu::new(Opcode::ScsiCommand);
        c.bhs[1] = 0x80 | if write { 0x20 } else { 0x40 } | 0x01;
        c.set_lun(lun_field);
        itt = itt.wrapping_add(1);
        c.set_itt(itt);
        c.set_u32(20, bs as u32);
        c.set_u32(24, cmd_sn);
        cmd_sn = cmd_sn.wrapping_add(1);
        c.bhs[32] = if write { 0x8a } else { 0x88 };
        c.bhs[34..42].copy_from_slice(&lba.to_be_bytes());
        c.bhs[42..46].copy_from_slice(&blocks.to_be_bytes());
        if write && immediate {
            let n = bs.min(first_burst).min(target_mrdsl);
            c.data = payload.slice(..n);
        }
        send(&w, &c);
        issued += 1;
    }
    while done.load(Ordering::Relaxed) < issued {
        tok_rx.recv().unwrap();
    }
    let el = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed) as f64;
    println!("{:.0} {:.1}", n / el, n * bs as f64 / el / (1 << 20) as f64);
    let mut lo = Pdu::new(Opcode::LogoutRequest);
    lo.bhs[0] |= 0x40;
    lo.set_itt(itt.wrapping_add(1));
    lo.set_u32(24, cmd_sn);
    send(&w, &lo);
    drop(tok_rx);
    let _ = reader.join();
}
