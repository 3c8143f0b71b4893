//! Arbitrary bytes through the iSCSI PDU decoder, and every PDU it yields
//! through the pure layers above it: text parsing, login negotiation and
//! CDB parsing. None of them may panic or allocate without bound.
#![no_main]

use basalt::proto::iscsi::login::{ChapConfig, Login, TargetLimits};
use basalt::proto::iscsi::pdu::{self, CodecConfig};
use basalt::proto::iscsi::{scsi, text};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else { return };
    let cfg = CodecConfig { max_recv_data: 8192, header_digest: mode & 1 != 0, data_digest: mode & 2 != 0 };
    let chap = (mode & 4 != 0).then(|| ChapConfig {
        user: "u".into(),
        secret: "0123456789ab".into(),
        mutual: Some(("t".into(), "ba9876543210".into())),
    });
    let limits = TargetLimits { max_recv_data: 8192, max_burst: 1 << 20, chap };
    let mut login = Login::new(limits, vec!["iqn.2026-11.io.basalt:demo".into()], [1; 16], 1, 1);
    let mut buf = BytesMut::from(rest);
    while let Ok(Some(p)) = pdu::decode(&mut buf, &cfg) {
        assert!(p.data.len() <= 8192);
        let _ = text::parse(&p.data);
        let _ = login.step(&p);
        let cdb: [u8; 16] = p.bhs[32..48].try_into().unwrap();
        if let Ok(cmd) = scsi::parse(&cdb) {
            let _ = cmd.data_out_len();
            let _ = scsi::parse_unmap(&p.data, 1 << 20);
        }
        let mut out = BytesMut::new();
        pdu::encode(&p, &cfg, &mut out);
    }
});
