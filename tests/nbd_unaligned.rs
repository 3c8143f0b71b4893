//! NBD clients held to no block size (issue 11, "also worth doing"): a
//! client that enters transmission with NBD_OPT_EXPORT_NAME, or with
//! NBD_OPT_GO without NBD_INFO_BLOCK_SIZE, may send READ, WRITE, TRIM and
//! WRITE_ZEROES at any byte (the spec's default minimum block size is 1),
//! as nbd-tester-client does. Basalt serves them by read-modify-write of
//! the partial blocks under the store's exclusive range lock (on a
//! replicated volume, the owner's exclusive hold), so such a write is
//! atomic per block against every other write, from any connection and any
//! frontend. A raw-socket client here, since libnbd always negotiates
//! block sizes.

mod common;

use basalt::layout::Layout;
use basalt::node::{Node, Volume, VolumeOptions};
use basalt::storage::{EngineKind, Store, StoreConfig, StoreOptions};
use basalt::types::{Epoch, ExtentIndex, ExtentKey, flatten_chunks};
use bytes::Bytes;
use common::cluster::Cluster;
use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_BLOCK_SIZE: u16 = 3;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

/// A minimal NBD client over one TCP connection, simple replies only.
struct Raw {
    s: TcpStream,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut r = Raw { s };
        assert_eq!(r.u64(), NBDMAGIC);
        assert_eq!(r.u64(), IHAVEOPT);
        assert_eq!(r.u16() & 1, 1, "FIXED_NEWSTYLE");
        r.s.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
        r
    }

    /// Enters transmission by NBD_OPT_EXPORT_NAME: no block size can be
    /// agreed this way (what nbd-tester-client does).
    fn by_export_name(addr: SocketAddr, name: &str) -> Raw {
        let mut r = Raw::connect(addr);
        r.option(OPT_EXPORT_NAME, name.as_bytes());
        r.u64(); // size
        r.u16(); // transmission flags
        r
    }

    /// Enters transmission by NBD_OPT_GO, asking for NBD_INFO_BLOCK_SIZE
    /// when `agree` (the client then keeps to 512-byte alignment).
    fn by_go(addr: SocketAddr, name: &str, agree: bool) -> Raw {
        let mut r = Raw::connect(addr);
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        if agree {
            d.extend_from_slice(&1u16.to_be_bytes());
            d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        } else {
            d.extend_from_slice(&0u16.to_be_bytes());
        }
        r.option(OPT_GO, &d);
        loop {
            assert_eq!(r.u64(), OPT_REPLY_MAGIC);
            let (opt, kind, n) = (r.u32(), r.u32(), r.u32() as usize);
            assert_eq!(opt, OPT_GO);
            let data = r.bytes(n);
            match kind {
                REP_INFO => {}
                REP_ACK => return r,
                k => panic!("GO failed with {k:#x}: {}", String::from_utf8_lossy(&data)),
            }
        }
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
        u16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).try_into().unwrap())
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    fn request(&mut self, kind: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }

    /// A simple reply header: (error, handle).
    fn reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC);
        let err = self.u32();
        (err, self.u64())
    }

    fn ok(&mut self, kind: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
        self.request(kind, handle, offset, len, payload);
        assert_eq!(self.reply(), (0, handle), "request {kind} at {offset}+{len}");
    }

    fn write(&mut self, handle: u64, offset: u64, data: &[u8]) {
        self.ok(CMD_WRITE, handle, offset, data.len() as u32, data);
    }

    fn read(&mut self, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        self.ok(CMD_READ, handle, offset, len, &[]);
        self.bytes(len as usize)
    }

    fn flush(&mut self) {
        self.ok(CMD_FLUSH, u64::MAX, 0, 0, &[]);
    }

    /// Sends every write of `writes` without waiting, on this thread, while
    /// another thread reads the replies; all must succeed.
    fn pipelined_writes(mut self, writes: &[(u64, Vec<u8>)]) {
        let mut rd = Raw { s: self.s.try_clone().unwrap() };
        let n = writes.len();
        let reader = std::thread::spawn(move || {
            for _ in 0..n {
                let (err, handle) = rd.reply();
                assert_eq!(err, 0, "write {handle} failed");
            }
        });
        let mut batch = Vec::new();
        for (i, (at, data)) in writes.iter().enumerate() {
            batch.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            batch.extend_from_slice(&0u16.to_be_bytes());
            batch.extend_from_slice(&CMD_WRITE.to_be_bytes());
            batch.extend_from_slice(&(i as u64).to_be_bytes());
            batch.extend_from_slice(&at.to_be_bytes());
            batch.extend_from_slice(&(data.len() as u32).to_be_bytes());
            batch.extend_from_slice(data);
            if batch.len() > 64 << 10 {
                self.s.write_all(&batch).unwrap();
                batch.clear();
            }
        }
        self.s.write_all(&batch).unwrap();
        reader.join().unwrap();
    }
}

/// xorshift, so a failing sequence reproduces.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn local(d: &Daemon) -> SocketAddr {
    format!("127.0.0.1:{}", d.nbd_port).parse().unwrap()
}

/// Bytes `[at, at + n)` of the volume as qemu-img (libnbd-free, a client
/// that negotiates 512-byte blocks) reads them: the store holds what the
/// unaligned client wrote, not just what it reads back itself.
fn read_with_qemu(uri: &str, at: usize, n: usize, scratch: &std::path::Path) -> Vec<u8> {
    let out = scratch.join("read.img");
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", uri, out.to_str().unwrap()]);
    let all = std::fs::read(&out).unwrap();
    all[at..at + n].to_vec()
}

/// Random byte-offset writes, zeroes, trims and reads (lengths 1 to 70,000
/// bytes, across sectors, 4 KiB blocks and 1 MiB extents) from an
/// NBD_OPT_EXPORT_NAME client, each read checked against a shadow buffer;
/// a second client that agreed to no block size through NBD_OPT_GO reads
/// the same bytes; after a flush and a restart of the daemon, qemu-img
/// reads the whole region back equal to the shadow.
#[test]
fn byte_offset_requests_match_a_shadow_buffer_across_a_restart() {
    if !require("qemu-img") {
        return;
    }
    const REGION: u64 = 4 << 20;
    let mut d = Daemon::start("8M", &["--extent-size=1MiB"]);
    let mut c = Raw::by_export_name(local(&d), "demo");
    let mut shadow = vec![0u8; REGION as usize];
    let mut rng = Rng(0x0dd_b17e);
    // Edges first: one byte at each end of an extent, a write across the
    // extent boundary, and a one-byte write into the middle of a sector.
    for (i, (at, n)) in [((1u64 << 20) - 1, 1u64), (1 << 20, 1), ((1 << 20) - 3, 7), (4097, 1), (511, 2)]
        .into_iter()
        .enumerate()
    {
        let data = pattern(1000 + i as u64, n as usize);
        c.write(i as u64, at, &data);
        shadow[at as usize..(at + n) as usize].copy_from_slice(&data);
    }
    for i in 0..2000u64 {
        let len = 1 + match rng.below(3) {
            0 => rng.below(20),
            1 => rng.below(5000),
            _ => rng.below(70_000),
        };
        let offset = rng.below(REGION - len);
        let (o, n) = (offset as usize, len as usize);
        match rng.below(6) {
            0..=2 => {
                let data = pattern(i, n);
                c.write(i, offset, &data);
                shadow[o..o + n].copy_from_slice(&data);
            }
            3 => {
                c.ok(CMD_WRITE_ZEROES, i, offset, len as u32, &[]);
                shadow[o..o + n].fill(0);
            }
            4 => {
                // Advisory: the whole sectors inside are discarded (and
                // read as zeros), the partial ones at the ends keep their bytes.
                c.ok(CMD_TRIM, i, offset, len as u32, &[]);
                let (a, b) = (offset.div_ceil(512) * 512, (offset + len) / 512 * 512);
                if a < b {
                    shadow[a as usize..b as usize].fill(0);
                }
            }
            _ => assert!(c.read(i, offset, len as u32) == shadow[o..o + n], "read {offset}+{len} (op {i})"),
        }
    }
    let mut g = Raw::by_go(local(&d), "demo", false);
    for (at, n) in [(0u64, REGION), (1, 4095), ((1 << 20) - 5, 11)] {
        assert!(g.read(1, at, n as u32) == shadow[at as usize..(at + n) as usize], "GO client: {at}+{n}");
    }
    c.flush();
    drop((c, g));
    assert_eq!(d.terminate(), Some(0));
    d.restart();
    let s = scratch();
    let got = read_with_qemu(&d.uri(), 0, REGION as usize, s.path());
    let bad = got.iter().zip(&shadow).position(|(a, b)| a != b);
    assert_eq!(bad, None, "qemu-img after a restart differs from the shadow first at that byte");
}

/// Two connections held to no block size write interleaved 37-byte runs
/// (so runs start and end mid-sector) into the first half of every 4 KiB
/// block, and a client that agreed to 512-byte blocks writes whole sectors
/// into the second half of the same blocks, all at once, hundreds in
/// flight each. The byte ranges never overlap, so every byte of every run
/// must survive: a read-modify-write that is not atomic against the
/// others' writes of the same block puts old bytes back over a neighbour's.
#[test]
fn disjoint_byte_ranges_in_shared_blocks_all_survive() {
    const BLOCKS: u64 = 256;
    const RUN: u64 = 37;
    let d = Daemon::start("64M", &[]);
    let addr = local(&d);
    let mut want = vec![0u8; (BLOCKS * 4096) as usize];
    for round in 0..3u64 {
        let mut plans: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new(); 3];
        for b in 0..BLOCKS {
            let base = b * 4096;
            for k in 0..2048 / RUN {
                let at = base + k * RUN;
                let data = pattern((round << 32) + at, RUN as usize);
                want[at as usize..(at + RUN) as usize].copy_from_slice(&data);
                plans[(k % 2) as usize].push((at, data));
            }
            for s in 4..8 {
                let at = base + s * 512;
                let data = pattern((round << 32) + at, 512);
                want[at as usize..(at + 512) as usize].copy_from_slice(&data);
                plans[2].push((at, data));
            }
        }
        let writers: Vec<_> = plans
            .into_iter()
            .enumerate()
            .map(|(who, plan)| {
                let c =
                    if who < 2 { Raw::by_export_name(addr, "demo") } else { Raw::by_go(addr, "demo", true) };
                std::thread::spawn(move || c.pipelined_writes(&plan))
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let got = Raw::by_export_name(addr, "demo").read(1, 0, want.len() as u32);
        let lost: Vec<u64> = (0..BLOCKS * 4096 / RUN)
            .filter(|r| {
                let s = (r * RUN) as usize..((r + 1) * RUN) as usize;
                got[s.clone()] != want[s]
            })
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: {} of {} 37-byte runs lost, first at byte {}",
            lost.len(),
            BLOCKS * 4096 / RUN,
            lost.first().map_or(0, |r| r * RUN)
        );
    }
}

/// The pattern of a write, recognisable in the result: every byte says
/// which writer, round and sector it came from.
fn tagged(writer: u8, round: u64, sector: u64, len: usize) -> Vec<u8> {
    let mut v = pattern((u64::from(writer) << 56) + (round << 32) + sector, len);
    v[0] = writer;
    v
}

/// One round at a time: a client that agreed to 512-byte blocks writes
/// every sector of a region whole (the kind of write iSCSI and Linux's
/// NBD driver send), while a client held to no block size writes bytes
/// 100..300 of every sector, both pipelined over the same sectors in the
/// same order. Once both are done, each sector must be what some serial
/// order of the two writes gives: bytes 100..300 from one of them, and
/// every other byte from this round's whole-sector write. A
/// read-modify-write that read the sector before the whole-sector write
/// and wrote it back after (a lock only unaligned clients take) leaves the
/// previous round's bytes there. The whole-sector client connects to
/// `addr`, the other to `part_addr` (a node that forwards to the owner of
/// a replicated volume, say).
fn rmw_against_whole_sector_writes(
    addr: SocketAddr,
    part_addr: SocketAddr,
    export: &str,
    sectors: u64,
    rounds: u64,
) {
    let (lo, hi) = (100usize, 300usize);
    let seed = Raw::by_go(addr, export, true);
    let first: Vec<(u64, Vec<u8>)> = (0..sectors).map(|s| (s * 512, tagged(9, 0, s, 512))).collect();
    seed.pipelined_writes(&first);
    for round in 1..=rounds {
        let whole: Vec<(u64, Vec<u8>)> = (0..sectors).map(|s| (s * 512, tagged(2, round, s, 512))).collect();
        let part: Vec<(u64, Vec<u8>)> =
            (0..sectors).map(|s| (s * 512 + lo as u64, tagged(1, round, s, hi - lo))).collect();
        let a = Raw::by_go(addr, export, true);
        let b = Raw::by_export_name(part_addr, export);
        let wa = std::thread::spawn(move || a.pipelined_writes(&whole));
        let wb = std::thread::spawn(move || b.pipelined_writes(&part));
        wa.join().unwrap();
        wb.join().unwrap();
        let got = Raw::by_go(addr, export, true).read(1, 0, (sectors * 512) as u32);
        let mut lost = Vec::new();
        let mut torn = Vec::new();
        for s in 0..sectors {
            let sec = &got[(s * 512) as usize..((s + 1) * 512) as usize];
            let w = tagged(2, round, s, 512);
            if sec[..lo] != w[..lo] || sec[hi..] != w[hi..] {
                lost.push(s);
            }
            if sec[lo..hi] != w[lo..hi] && sec[lo..hi] != tagged(1, round, s, hi - lo)[..] {
                torn.push(s);
            }
        }
        assert!(
            lost.is_empty() && torn.is_empty(),
            "round {round}: whole-sector writes lost outside bytes {lo}..{hi} in {} of {sectors} sectors \
             (first {:?}), bytes {lo}..{hi} from no single write in {} (first {:?})",
            lost.len(),
            lost.first(),
            torn.len(),
            torn.first()
        );
    }
}

#[test]
fn unaligned_rmw_is_atomic_against_another_clients_whole_sector_writes() {
    let d = Daemon::start("64M", &[]);
    rmw_against_whole_sector_writes(local(&d), local(&d), "demo", 2048, 6);
}

/// The same against iSCSI: an initiator writes every sector of a region
/// whole with WRITE(10), one command at a time, while a client held to no
/// block size writes bytes 100..300 of every sector, pass after pass
/// (each pipelined), until the initiator is done. Then every sector's bytes
/// outside 100..300 must be the initiator's of this round, and bytes
/// 100..300 the initiator's or those of one of the NBD client's passes.
#[test]
fn unaligned_rmw_is_atomic_against_iscsi_writes() {
    const SECTORS: u64 = 512;
    let (lo, hi) = (100usize, 300usize);
    let d = Daemon::start("64M", &[]);
    let addr = local(&d);
    let mut i = common::iscsi::RawIscsi::connect(d.iscsi_port);
    i.login(Some(&d.iqn()));
    for round in 1..=4u64 {
        let stop = Arc::new(AtomicBool::new(false));
        let nbd = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut passes = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let tag = round * 1000 + passes;
                    let part: Vec<(u64, Vec<u8>)> =
                        (0..SECTORS).map(|s| (s * 512 + lo as u64, tagged(1, tag, s, hi - lo))).collect();
                    Raw::by_export_name(addr, "demo").pipelined_writes(&part);
                    passes += 1;
                }
                passes
            })
        };
        for s in 0..SECTORS {
            assert_eq!(i.write10(s as u32, &tagged(2, round, s, 512)), 0, "WRITE(10) of sector {s}");
        }
        stop.store(true, Ordering::Release);
        let passes = nbd.join().unwrap();
        let got = Raw::by_go(addr, "demo", true).read(1, 0, (SECTORS * 512) as u32);
        let (mut lost, mut torn) = (Vec::new(), Vec::new());
        for s in 0..SECTORS {
            let sec = &got[(s * 512) as usize..((s + 1) * 512) as usize];
            let w = tagged(2, round, s, 512);
            if sec[..lo] != w[..lo] || sec[hi..] != w[hi..] {
                lost.push(s);
            }
            let from_nbd = (0..passes).any(|p| sec[lo..hi] == tagged(1, round * 1000 + p, s, hi - lo)[..]);
            if sec[lo..hi] != w[lo..hi] && !from_nbd {
                torn.push(s);
            }
        }
        assert!(
            lost.is_empty() && torn.is_empty(),
            "round {round} ({passes} NBD passes): iSCSI writes lost outside bytes {lo}..{hi} in {} of \
             {SECTORS} sectors (first {:?}); bytes {lo}..{hi} from no single write in {} (first {:?})",
            lost.len(),
            lost.first(),
            torn.len(),
            torn.first()
        );
    }
}

/// Polls `fut` up to `polls` times, letting the runtime run between polls,
/// and drops it if it is not done by then.
async fn poll_then_drop<F: std::future::Future>(fut: F, polls: usize) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    for _ in 0..polls {
        if let Poll::Ready(v) = futures::poll!(fut.as_mut()) {
            return Some(v);
        }
        tokio::task::yield_now().await;
    }
    None
}

async fn read_volume(v: &Volume, at: u64, len: u64) -> Vec<u8> {
    flatten_chunks(&v.read(at, len).await.unwrap()).to_vec()
}

/// `Volume::write_unaligned` and `write_zeroes_unaligned` dropped at every
/// await point (polled 0, 1, 2, ... times, then dropped) on the mem engine
/// with completions deferred: afterwards every 4 KiB block reads back (no
/// checksum error) as its old or its new contents, a finished one as new,
/// and after a flush and a power loss the volume holds exactly what was
/// read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_unaligned_writes_leave_every_block_old_or_new() {
    const SPAN: u64 = 64 << 10;
    let disk = basalt::storage::MemDisk::new();
    disk.defer_completions(true);
    let opts = StoreOptions { mem_disk: Some(disk), clean_after_flushes: 1, ..Default::default() };
    let cfg = StoreConfig { data_dirs: vec!["/mem/d0".into()], engine: EngineKind::Mem };
    let node = Node::open_with(cfg.clone(), opts.clone(), 1 << 30).await.unwrap();
    let vopts = VolumeOptions {
        size: 4 << 20,
        layout: Layout::contiguous(1 << 20).unwrap(),
        replicas: 1,
        min_replicas: 1,
        read_only: false,
    };
    let v = node.create_volume("u", vopts).unwrap();
    v.write(0, Bytes::from(pattern(1, SPAN as usize)), false).await.unwrap();
    let mut model = read_volume(&v, 0, SPAN).await;
    let mut dropped = 0;
    for round in 0..(2 * 30u64) {
        let (zero, polls) = (round % 2 == 1, (round / 2) as usize);
        // Odd offsets and lengths, straddling blocks.
        let at = 4096 * (round % 8) + 1 + 3 * round;
        let n = 2 * 4096 + 5 + round;
        let mut new = model.clone();
        let done = if zero {
            new[at as usize..(at + n) as usize].fill(0);
            poll_then_drop(v.write_zeroes_unaligned(at, n, round % 4 == 1, false), polls).await
        } else {
            let data = pattern(100 + round, n as usize);
            new[at as usize..(at + n) as usize].copy_from_slice(&data);
            poll_then_drop(v.write_unaligned(at, Bytes::from(data), round % 4 == 0), polls).await
        };
        let done = match done {
            Some(r) => r.map_err(|e| format!("round {round}: {e}")).map(|()| true).unwrap(),
            None => {
                dropped += 1;
                false
            }
        };
        let got = read_volume(&v, 0, SPAN).await;
        for (b, blk) in got.chunks(4096).enumerate() {
            let r = b * 4096..(b + 1) * 4096;
            assert!(
                blk == &model[r.clone()] || blk == &new[r],
                "round {round} ({polls} polls, zero {zero}): block {b} is neither old nor new"
            );
        }
        if done {
            assert!(got == new, "round {round}: finished, so new");
        }
        model = got;
    }
    assert!(dropped > 10, "only {dropped} writes were dropped before their end");
    v.flush().await.unwrap();
    // The mem node's catalog lives in memory: reopen the store alone.
    let key = ExtentKey { volume: v.spec().id, index: ExtentIndex(0) };
    let opts = StoreOptions { mem_disk: Some(node.store().unwrap().mem_disk()), ..opts };
    node.store().unwrap().crash(3).unwrap();
    drop(v);
    drop(node);
    let s = Store::open_with(cfg, opts).await.unwrap();
    let e = s.extent(key, 1 << 20, Epoch(1)).await.unwrap();
    assert!(flatten_chunks(&e.read(0, SPAN as u32).await.unwrap()) == model, "after a power loss");
}

/// The same on an R=3 volume of a three-node cluster, through the owner:
/// the partial sectors are read-modify-written under the owner's exclusive
/// hold, so the whole-sector writes of another client survive; `basalt
/// volume verify` finds the replicas equal. Through a node that forwards
/// to the owner, unaligned reads are served and unaligned writes go to the
/// owner as they are (ANY_BYTE), aligned ones as before.
#[test]
fn replicated_volume_rmw_through_the_owner_and_a_forwarder() {
    let c = Cluster::start(3, 3);
    c.wait_leader(0, None);
    let v =
        c.cli_json(0, &["volume", "create", "u", "--size", "16M", "--replicas", "3", "--extent-size", "4M"]);
    assert!(v["id"].as_u64().is_some(), "{v}");
    let owner = c.nodes[0].nbd;
    rmw_against_whole_sector_writes(owner, owner, "u", 512, 3);
    // Unaligned writes across an extent boundary, read back.
    let mut o = Raw::by_export_name(owner, "u");
    let data = pattern(5, 10_001);
    o.write(1, (4 << 20) - 4_999, &data);
    assert!(o.read(2, (4 << 20) - 4_999, 10_001) == data);
    o.ok(CMD_WRITE_ZEROES, 3, (4 << 20) - 11, 22, &[]);
    o.flush();
    let mut want = data.clone();
    want[4_999 - 11..4_999 + 11].fill(0);
    let mut f = Raw::by_export_name(c.nodes[1].nbd, "u");
    assert!(f.read(4, (4 << 20) - 4_999, 10_001) == want, "read through the forwarder");
    let mut around = o.read(5, 0, 16);
    f.write(5, 7, b"abc");
    around[7..10].copy_from_slice(b"abc");
    assert!(o.read(8, 0, 16) == around, "an unaligned write through a forwarder");
    f.write(6, 8 << 20, &[0x5a; 512]);
    assert!(o.read(7, (8 << 20) - 1, 514) == [&[0u8][..], &[0x5a; 512], &[0]].concat());
    let out = c.cli(0, &["--json", "volume", "verify", "u"]);
    assert_eq!(out.status.code(), Some(0), "verify: {}", String::from_utf8_lossy(&out.stdout));
}

/// Unaligned writes from clients of nodes that are NOT the owner of an R=3
/// volume (issue 13): forwarded with their byte offsets (ANY_BYTE), read-
/// modify-written on the owner under its exclusive hold, so they are
/// atomic against another client's whole-sector writes through the owner
/// exactly as when the client reaches the owner directly. Then byte runs
/// of two forwarding clients and whole sectors of a client of the owner
/// share every 4 KiB block of a region across an extent boundary, all in
/// flight at once; a WRITE_ZEROES with unaligned edges and a write at odd
/// bytes go through a forwarder. Every node reads the region back equal to
/// a shadow buffer, through a client held to no block size (at odd
/// offsets) and one that agreed to 512-byte blocks, and the replicas verify
/// equal. Before ANY_BYTE, the forwarders refused every such write with
/// EINVAL.
#[test]
fn replicated_unaligned_writes_through_forwarding_nodes_match_a_shadow() {
    const BLOCKS: u64 = 64;
    const RUN: u64 = 37;
    let c = Cluster::start(3, 3);
    c.wait_leader(0, None);
    let v =
        c.cli_json(0, &["volume", "create", "w", "--size", "16M", "--replicas", "3", "--extent-size", "4M"]);
    assert!(v["id"].as_u64().is_some(), "{v}");
    let owner = c.nodes[0].nbd;
    let (f1, f2) = (c.nodes[1].nbd, c.nodes[2].nbd);
    // The first client makes node 0 the owner; nodes 1 and 2 forward to it.
    Raw::by_go(owner, "w", true).write(0, 4 << 20, &[0u8; 512]);
    rmw_against_whole_sector_writes(owner, f1, "w", 256, 3);

    // Around the extent boundary at 4 MiB, clear of the region above.
    let base: u64 = (4 << 20) - BLOCKS / 2 * 4096;
    let mut want = vec![0u8; (BLOCKS * 4096) as usize];
    let mut plans: Vec<Vec<(u64, Vec<u8>)>> = vec![Vec::new(); 3];
    for b in 0..BLOCKS {
        let block = b * 4096;
        for k in 0..2048 / RUN {
            let at = block + 3 + k * RUN;
            let data = pattern(at, RUN as usize);
            want[at as usize..(at + RUN) as usize].copy_from_slice(&data);
            plans[(k % 2) as usize].push((base + at, data));
        }
        for s in 4..8 {
            let at = block + s * 512;
            let data = pattern(at + 1, 512);
            want[at as usize..(at + 512) as usize].copy_from_slice(&data);
            plans[2].push((base + at, data));
        }
    }
    let writers: Vec<_> = plans
        .into_iter()
        .enumerate()
        .map(|(who, plan)| {
            let c = match who {
                0 => Raw::by_export_name(f1, "w"),
                1 => Raw::by_export_name(f2, "w"),
                _ => Raw::by_go(owner, "w", true),
            };
            std::thread::spawn(move || c.pipelined_writes(&plan))
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let mut f = Raw::by_export_name(f2, "w");
    // Zeroes with unaligned edges, across the extent boundary.
    let (zat, zlen) = (10 * 4096 + 77, 30 * 4096 + 1001);
    f.ok(CMD_WRITE_ZEROES, 1, base + zat, zlen as u32, &[]);
    want[zat as usize..(zat + zlen) as usize].fill(0);
    // Odd bytes across the boundary, and one byte.
    let (wat, data) = (BLOCKS / 2 * 4096 - 4_999, pattern(5, 10_001));
    f.write(2, base + wat, &data);
    want[wat as usize..wat as usize + data.len()].copy_from_slice(&data);
    f.write(3, base + 1, b"x");
    want[1] = b'x';
    f.flush();
    let n = want.len() as u32;
    for (k, node) in c.nodes.iter().enumerate() {
        let got = Raw::by_go(node.nbd, "w", true).read(1, base, n);
        let bad = got.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(bad, None, "node {k} (512-byte client): first differing byte");
        let got = Raw::by_export_name(node.nbd, "w").read(2, base + 5, n - 12);
        let bad = got.iter().zip(&want[5..]).position(|(a, b)| a != b);
        assert_eq!(bad, None, "node {k} (any-byte client at +5): first differing byte");
    }
    let out = c.cli(0, &["--json", "volume", "verify", "w"]);
    assert_eq!(out.status.code(), Some(0), "verify: {}", String::from_utf8_lossy(&out.stdout));
}
