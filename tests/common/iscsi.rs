//! A minimal blocking iSCSI initiator for tests: raw PDUs over a
//! `std::net::TcpStream`, using the crate's own PDU codec for framing.
//! Enough to log in, run a few SCSI commands and send hostile input.
#![allow(dead_code)]

use basalt::proto::iscsi::pdu::{self, CodecConfig, Opcode, Pdu};
use basalt::proto::iscsi::text;
use bytes::{Bytes, BytesMut};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub struct RawIscsi {
    pub s: TcpStream,
    buf: BytesMut,
    pub codec: CodecConfig,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    next_itt: u32,
    /// The target's MaxRecvDataSegmentLength.
    pub target_mrdsl: usize,
}

pub const INITIATOR: &str = "iqn.2026-11.io.basalt.test:raw";

impl RawIscsi {
    pub fn connect(port: u16) -> RawIscsi {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        // A hang is a failure, not a test that runs forever.
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.set_nodelay(true).unwrap();
        RawIscsi {
            s,
            buf: BytesMut::new(),
            codec: CodecConfig { max_recv_data: 1 << 20, header_digest: false, data_digest: false },
            cmd_sn: 1,
            exp_stat_sn: 0,
            next_itt: 1,
            target_mrdsl: 8192,
        }
    }

    pub fn itt(&mut self) -> u32 {
        self.next_itt += 1;
        self.next_itt
    }

    pub fn send(&mut self, p: &Pdu) {
        let mut out = BytesMut::new();
        pdu::encode(p, &self.codec, &mut out);
        self.s.write_all(&out).unwrap();
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// The next PDU, or None once the target closed the connection.
    pub fn recv(&mut self) -> Option<Pdu> {
        self.try_recv().unwrap_or_else(|e| panic!("read: {e}"))
    }

    /// Like [`recv`], handing back a read error (a read timeout, say) so a
    /// test can say what it was waiting for.
    pub fn try_recv(&mut self) -> std::io::Result<Option<Pdu>> {
        loop {
            if let Some(p) = pdu::decode(&mut self.buf, &self.codec).unwrap() {
                // PDUs carrying status advance ExpStatSN: not R2T, not Data-In
                // without S, not an unsolicited NOP-In.
                let op = p.raw_opcode();
                let status = if op == Opcode::DataIn as u8 {
                    p.flags() & 0x01 != 0
                } else {
                    op != Opcode::R2t as u8 && !(op == Opcode::NopIn as u8 && p.itt() == 0xffff_ffff)
                };
                if status {
                    self.exp_stat_sn = p.word24().wrapping_add(1);
                }
                return Ok(Some(p));
            }
            let mut tmp = [0u8; 65536];
            match self.s.read(&mut tmp) {
                Ok(0) => return Ok(None),
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
                // A signal to the test process (a child exiting, say) is not the target's doing.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// True if the target closes the connection (after any PDUs it still sends).
    pub fn closed(&mut self) -> bool {
        while let Some(p) = self.recv() {
            eprintln!("PDU before close: opcode {:#x}", p.raw_opcode());
        }
        true
    }

    pub fn login_request(&mut self, flags: u8, pairs: &[(&str, &str)]) -> Pdu {
        let mut p = Pdu::new(Opcode::LoginRequest);
        p.bhs[0] |= 0x40;
        p.bhs[1] = flags;
        p.bhs[8..14].copy_from_slice(&[0x80, 0x12, 0x34, 0x56, 0x78, 0x9a]);
        p.set_itt(self.itt());
        p.set_u32(24, self.cmd_sn);
        p.set_u32(28, self.exp_stat_sn);
        let kv: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        p.data = Bytes::from(text::encode(&kv));
        p
    }

    /// Logs in to `target` (or a discovery session if None) without
    /// authentication, straight from the operational stage; returns the
    /// final login response.
    pub fn login(&mut self, target: Option<&str>) -> Pdu {
        self.login_with(target, false)
    }

    /// Like [`login`], offering CRC32C header and data digests (only) when
    /// `digests`; the codec switches to them for the full feature phase.
    pub fn login_with(&mut self, target: Option<&str>, digests: bool) -> Pdu {
        let d = if digests { "CRC32C" } else { "None" };
        let mut pairs = vec![
            ("InitiatorName", INITIATOR),
            ("HeaderDigest", d),
            ("DataDigest", d),
            ("MaxRecvDataSegmentLength", "262144"),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "Yes"),
            ("FirstBurstLength", "65536"),
            ("MaxBurstLength", "1048576"),
        ];
        match target {
            Some(t) => pairs.extend([("SessionType", "Normal"), ("TargetName", t)]),
            None => pairs.push(("SessionType", "Discovery")),
        }
        let req = self.login_request(0x80 | 1 << 2 | 3, &pairs);
        self.send(&req);
        let resp = self.recv().expect("login response");
        assert_eq!(resp.raw_opcode(), Opcode::LoginResponse as u8);
        assert_eq!(resp.u16_at(36), 0, "login status");
        assert_eq!(resp.flags() & 0x83, 0x83, "transit to full feature phase");
        for (k, v) in text::parse(&resp.data).unwrap() {
            match k.as_str() {
                "MaxRecvDataSegmentLength" => self.target_mrdsl = v.parse().unwrap(),
                "HeaderDigest" => self.codec.header_digest = v == "CRC32C",
                "DataDigest" => self.codec.data_digest = v == "CRC32C",
                _ => {}
            }
        }
        resp
    }

    /// A SCSI Command PDU (not sent).
    pub fn command(&mut self, cdb: &[u8], edtl: u32, read: bool, write: bool) -> Pdu {
        let mut p = Pdu::new(Opcode::ScsiCommand);
        p.bhs[1] = 0x80 | if read { 0x40 } else { 0 } | if write { 0x20 } else { 0 } | 0x01;
        p.set_itt(self.itt());
        p.set_u32(20, edtl);
        p.set_u32(24, self.cmd_sn);
        p.set_u32(28, self.exp_stat_sn);
        p.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        p
    }

    /// Runs a command to completion: returns (status, data-in, sense).
    pub fn run(&mut self, cdb: &[u8], data_out: &[u8], read_len: u32) -> (u8, Vec<u8>, Vec<u8>) {
        let write = !data_out.is_empty();
        let edtl = if write { data_out.len() as u32 } else { read_len };
        let mut cmd = self.command(cdb, edtl, read_len > 0, write);
        let imm = data_out.len().min(65536).min(self.target_mrdsl);
        cmd.data = Bytes::copy_from_slice(&data_out[..imm]);
        let itt = cmd.itt();
        self.send(&cmd);
        let mut data_in = Vec::new();
        loop {
            let p = self.recv().expect("response");
            assert_eq!(p.itt(), itt, "response for another task (opcode {:#x})", p.raw_opcode());
            match Opcode::from_u8(p.raw_opcode()) {
                Some(Opcode::R2t) => {
                    let ttt = p.word20();
                    let mut off = p.u32_at(40) as usize;
                    let end = off + p.u32_at(44) as usize;
                    let mut sn = 0;
                    while off < end {
                        let n = (end - off).min(self.target_mrdsl);
                        let mut d = Pdu::new(Opcode::DataOut);
                        d.bhs[1] = if off + n == end { 0x80 } else { 0 };
                        d.set_itt(itt);
                        d.set_u32(20, ttt);
                        d.set_u32(28, self.exp_stat_sn);
                        d.set_u32(36, sn);
                        d.set_u32(40, off as u32);
                        d.data = Bytes::copy_from_slice(&data_out[off..off + n]);
                        self.send(&d);
                        sn += 1;
                        off += n;
                    }
                }
                Some(Opcode::DataIn) => {
                    assert_eq!(p.u32_at(40) as usize, data_in.len(), "Data-In offset");
                    data_in.extend_from_slice(&p.data);
                    if p.flags() & 0x01 != 0 {
                        return (p.bhs[3], data_in, Vec::new());
                    }
                }
                Some(Opcode::ScsiResponse) => {
                    let sense = if p.data.len() >= 2 { p.data[2..].to_vec() } else { Vec::new() };
                    return (p.bhs[3], data_in, sense);
                }
                other => panic!("unexpected PDU {other:?}"),
            }
        }
    }

    pub fn write10(&mut self, lba: u32, data: &[u8]) -> u8 {
        let blocks = (data.len() / 512) as u16;
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2a;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        self.run(&cdb, data, 0).0
    }

    pub fn read10(&mut self, lba: u32, blocks: u16) -> Vec<u8> {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x28;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        let (st, data, sense) = self.run(&cdb, &[], blocks as u32 * 512);
        assert_eq!(st, 0, "READ(10) status, sense {sense:02x?}");
        data
    }

    pub fn test_unit_ready(&mut self) -> u8 {
        self.run(&[0u8; 6], &[], 0).0
    }

    pub fn logout(&mut self) {
        let mut p = Pdu::new(Opcode::LogoutRequest);
        p.bhs[0] |= 0x40;
        p.set_itt(self.itt());
        p.set_u32(24, self.cmd_sn);
        p.set_u32(28, self.exp_stat_sn);
        self.send(&p);
        let r = self.recv().expect("logout response");
        assert_eq!(r.raw_opcode(), Opcode::LogoutResponse as u8);
        assert_eq!(r.bhs[2], 0);
        assert!(self.closed());
    }
}
