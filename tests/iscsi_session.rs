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
