//! The server in-process, with settings the daemon does not expose: the
//! target pings an idle initiator (NOP-In) and drops one that stops
//! answering; on cancel it stops accepting, ends sessions, and keeps only
//! acknowledged writes.

mod common;

use basalt::export::iscsi::{self, IscsiConfig};
use basalt::layout::Layout;
use basalt::node::{Node, VolumeOptions};
use basalt::proto::iscsi::pdu::{Opcode, Pdu};
use basalt::storage::{EngineKind, StoreConfig};
use basalt::types::flatten_chunks;
use bytes::Bytes;
use common::iscsi::RawIscsi;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

struct Server {
    rt: tokio::runtime::Runtime,
    node: Arc<Node>,
    port: u16,
    cancel: CancellationToken,
    tracker: TaskTracker,
    handle: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

fn server(cfg: IscsiConfig) -> Server {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (node, listener) = rt.block_on(async {
        let node =
            Node::open(StoreConfig { data_dirs: vec![dir.path().to_path_buf()], engine: EngineKind::Psync })
                .await
                .unwrap();
        let opts = VolumeOptions {
            size: 16 << 20,
            layout: Layout::contiguous(64 << 20).unwrap(),
            replicas: 1,
            min_replicas: 1,
            read_only: false,
        };
        node.create_volume("demo", opts).unwrap();
        (node, tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
    });
    let port = listener.local_addr().unwrap().port();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let handle = rt.spawn(iscsi::serve(listener, node.clone(), cancel.clone(), tracker.clone(), cfg));
    Server { rt, node, port, cancel, tracker, handle, _dir: dir }
}

const IQN: &str = "iqn.2026-11.io.basalt:demo";

#[test]
fn idle_initiators_are_pinged_and_silent_ones_dropped() {
    let s = server(IscsiConfig {
        nop_interval: Some(Duration::from_millis(100)),
        nop_timeout: Duration::from_millis(300),
        ..Default::default()
    });
    let mut c = RawIscsi::connect(s.port);
    c.login(Some(IQN));
    // The first ping: unsolicited NOP-In, ITT reserved, a real TTT.
    let ping = c.recv().expect("NOP-In ping");
    assert_eq!(ping.raw_opcode(), Opcode::NopIn as u8);
    assert_eq!(ping.itt(), 0xffff_ffff);
    assert_ne!(ping.word20(), 0xffff_ffff);
    // Answer it as RFC 7143 11.18 says: immediate NOP-Out, ITT reserved, TTT echoed.
    let mut pong = Pdu::new(Opcode::NopOut);
    pong.bhs[0] |= 0x40;
    pong.set_itt(0xffff_ffff);
    pong.set_u32(20, ping.word20());
    pong.set_u32(24, c.cmd_sn);
    c.send(&pong);
    // The session is alive and commands still work.
    assert_eq!(c.test_unit_ready(), 0);
    // Stop answering: the next ping goes unanswered and the target closes.
    let next = c.recv().expect("second ping");
    assert_eq!((next.raw_opcode(), next.itt()), (Opcode::NopIn as u8, 0xffff_ffff));
    assert_ne!(next.word20(), ping.word20(), "each ping has its own TTT");
    assert!(c.closed());
    s.cancel.cancel();
    s.rt.block_on(s.handle).unwrap().unwrap();
}

#[test]
fn cancel_drains_and_keeps_only_acknowledged_writes() {
    let s = server(IscsiConfig { nop_interval: None, ..Default::default() });
    let mut c = RawIscsi::connect(s.port);
    c.login(Some(IQN));
    let acked = common::pattern(1, 4096);
    assert_eq!(c.write10(8, &acked), 0);
    // A 128 KiB write whose Data-Out never comes: the target asks (R2T)
    // and must not write or acknowledge anything of it.
    let mut w = c.command(&[0x2a, 0, 0, 0, 0, 64, 0, 0, 0, 0], 128 << 10, false, true);
    w.bhs[32 + 7..32 + 9].copy_from_slice(&256u16.to_be_bytes());
    w.data = bytes::Bytes::from(vec![0xeeu8; 65536]);
    c.send(&w);
    let r2t = c.recv().expect("R2T");
    assert_eq!(r2t.raw_opcode(), Opcode::R2t as u8);
    assert_eq!((r2t.u32_at(40), r2t.u32_at(44)), (65536, 65536));

    s.cancel.cancel();
    s.tracker.close();
    // The session ends without a response for the unfinished write.
    assert!(c.closed());
    s.rt.block_on(async {
        s.tracker.wait().await;
        s.handle.await.unwrap().unwrap();
    });
    // The listener is gone.
    assert!(std::net::TcpStream::connect(("127.0.0.1", s.port)).is_err());
    let vol = s.node.volume("demo").unwrap();
    let got = s.rt.block_on(vol.read(8 * 512, 4096)).unwrap();
    assert!(flatten_chunks(&got) == acked, "acknowledged write lost");
    let got = s.rt.block_on(vol.read(64 * 512, 128 << 10)).unwrap();
    assert!(flatten_chunks(&got).iter().all(|&b| b == 0), "unacknowledged write reached the volume");
}

/// The next answer to any command: (ITT, status, Data-In).
fn answer(c: &mut RawIscsi) -> (u32, u8, Vec<u8>) {
    let mut data = Vec::new();
    loop {
        let p = c.recv().expect("an answer");
        match Opcode::from_u8(p.raw_opcode()) {
            Some(Opcode::DataIn) => {
                data.extend_from_slice(&p.data);
                if p.flags() & 0x01 != 0 {
                    return (p.itt(), p.bhs[3], data);
                }
            }
            Some(Opcode::ScsiResponse) => return (p.itt(), p.bhs[3], data),
            other => panic!("unexpected PDU {other:?}"),
        }
    }
}

fn with_attr(mut p: Pdu, attr: u8) -> Pdu {
    p.bhs[1] = (p.bhs[1] & !0x07) | attr;
    p
}

const SIMPLE: u8 = 1;
const ORDERED: u8 = 2;
const HEAD_OF_QUEUE: u8 = 3;

fn rw10(op: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = op;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// A 128 KiB SIMPLE WRITE at `lba` with the first 64 KiB immediate: it
/// stays pending (unstarted) until [`finish_write`] sends the rest.
fn open_write(c: &mut RawIscsi, lba: u32, data: &[u8]) -> (u32, Pdu) {
    let mut w = c.command(&rw10(0x2a, lba, 256), 128 << 10, false, true);
    w.data = Bytes::copy_from_slice(&data[..65536]);
    let itt = w.itt();
    c.send(&w);
    let r2t = c.recv().expect("R2T");
    assert_eq!((r2t.raw_opcode(), r2t.itt()), (Opcode::R2t as u8, itt));
    assert_eq!((r2t.u32_at(40), r2t.u32_at(44)), (65536, 65536));
    (itt, r2t)
}

fn finish_write(c: &mut RawIscsi, itt: u32, r2t: &Pdu, data: &[u8]) {
    let mut d = Pdu::new(Opcode::DataOut);
    d.bhs[1] = 0x80;
    d.set_itt(itt);
    d.set_u32(20, r2t.word20());
    d.set_u32(28, c.exp_stat_sn);
    d.set_u32(40, 65536);
    d.data = Bytes::copy_from_slice(&data[65536..]);
    c.send(&d);
}

/// A 4 KiB WRITE of `data` at `lba`, all of it immediate, with `attr`.
fn small_write(c: &mut RawIscsi, lba: u32, data: &[u8], attr: u8) -> u32 {
    let mut w = with_attr(c.command(&rw10(0x2a, lba, 8), 4096, false, true), attr);
    w.data = Bytes::copy_from_slice(data);
    c.send(&w);
    w.itt()
}

fn small_read(c: &mut RawIscsi, lba: u32, attr: u8) -> u32 {
    let r = with_attr(c.command(&rw10(0x28, lba, 8), 4096, true, false), attr);
    c.send(&r);
    r.itt()
}

/// Task attributes (SAM-5 8.6), which INQUIRY's CmdQue bit promises. A
/// SIMPLE write left waiting for its Data-Out holds back an ORDERED write
/// to the same block and a SIMPLE read after it, but not a HEAD OF QUEUE
/// read: that one is answered at once, with the old data. Once the Data-Out
/// comes, the answers come in order (first write, ORDERED write, read),
/// and the read and the medium show the ORDERED write landed after the
/// first. Then SIMPLE, ORDERED, SIMPLE writes to one block end in that
/// order, the last one's data on the medium; an ACA command is refused.
#[test]
fn ordered_and_head_of_queue_commands_keep_their_places() {
    let s = server(IscsiConfig { nop_interval: None, ..Default::default() });
    let mut c = RawIscsi::connect(s.port);
    c.login(Some(IQN));
    let old = common::pattern(1, 4096);
    assert_eq!(c.write10(100, &old), 0);

    let first = common::pattern(2, 128 << 10);
    let ordered = common::pattern(3, 4096);
    let (w1, r2t) = open_write(&mut c, 100, &first);
    let w2 = small_write(&mut c, 100, &ordered, ORDERED);
    let r1 = small_read(&mut c, 100, SIMPLE);
    let h = small_read(&mut c, 100, HEAD_OF_QUEUE);
    let (itt, st, data) = answer(&mut c);
    assert_eq!((itt, st), (h, 0), "HEAD OF QUEUE is answered first (w1 {w1}, w2 {w2}, r1 {r1})");
    assert!(data == old, "HEAD OF QUEUE ran before the writes");
    finish_write(&mut c, w1, &r2t, &first);
    let order: Vec<(u32, u8)> = (0..3)
        .map(|_| {
            let (itt, st, data) = answer(&mut c);
            if itt == r1 {
                assert!(data == ordered, "the SIMPLE read after the ORDERED write sees it");
            }
            (itt, st)
        })
        .collect();
    assert_eq!(order, vec![(w1, 0), (w2, 0), (r1, 0)]);
    assert_eq!(c.read10(100, 8), ordered, "the ORDERED write landed after the one before it");

    let (a, b, last) = (common::pattern(4, 128 << 10), common::pattern(5, 4096), common::pattern(6, 4096));
    let (w1, r2t) = open_write(&mut c, 200, &a);
    let w2 = small_write(&mut c, 200, &b, ORDERED);
    let w3 = small_write(&mut c, 200, &last, SIMPLE);
    finish_write(&mut c, w1, &r2t, &a);
    let order: Vec<(u32, u8)> = (0..3).map(|_| answer(&mut c)).map(|(itt, st, _)| (itt, st)).collect();
    assert_eq!(order, vec![(w1, 0), (w2, 0), (w3, 0)]);
    assert_eq!(c.read10(200, 8), last);
    assert!(c.read10(208, 248) == a[4096..], "the rest of the first write");

    // ACA outside an ACA condition: CHECK CONDITION, ILLEGAL REQUEST,
    // INVALID MESSAGE ERROR; the session goes on.
    let t = with_attr(c.command(&[0u8; 6], 0, false, false), 4);
    c.send(&t);
    let r = c.recv().expect("response");
    assert_eq!((r.raw_opcode(), r.itt(), r.bhs[3]), (Opcode::ScsiResponse as u8, t.itt(), 0x02));
    assert_eq!((r.data[2 + 2], r.data[2 + 12], r.data[2 + 13]), (0x05, 0x49, 0x00));
    assert_eq!(c.test_unit_ready(), 0);
    c.logout();
    s.cancel.cancel();
    s.rt.block_on(s.handle).unwrap().unwrap();
}
