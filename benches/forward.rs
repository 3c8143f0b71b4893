//! What forwarding a volume's I/O to its owner costs: 4 KiB random reads
//! and writes at queue depth 1 and 16, straight on the owner's `Volume`
//! against the same through a `Forwarder` over loopback TCP to a
//! `PeerServer` whose handler runs `forward::serve` on that volume. The
//! volume is on a real disk (a temp dir under the target dir, default
//! engine), 64 MiB, filled with data first.
//!
//! `cargo bench --bench forward`. Quote the forwarded/direct ratio of one
//! run, not the absolute figures, on a shared machine.

use basalt::layout::Layout;
use basalt::net::{ClientConfig, PeerHandler, PeerInfo, PeerPool, PeerServer, ReplyFuture, ServerConfig};
use basalt::node::forward::{self, Forwarder};
use basalt::node::{Node, Volume, VolumeError, VolumeOptions};
use basalt::proto::peer::Message;
use basalt::storage::{EngineKind, StoreConfig, StoreOptions};
use basalt::types::{ClusterId, Generation, NodeId};
use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::stream::{FuturesUnordered, StreamExt};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: u64 = 64 << 20;
const CLUSTER: ClusterId = ClusterId(0xbe4c);
const GENERATION: Generation = Generation(1);

struct Owner(Arc<Volume>);

impl PeerHandler for Owner {
    fn request(&self, _peer: PeerInfo, request: Message) -> ReplyFuture {
        let v = self.0.clone();
        Box::pin(forward::serve(
            &move |id, g| {
                if id == v.spec().id && g == GENERATION {
                    Ok(v.clone())
                } else {
                    Err(VolumeError::NotOwner { generation: GENERATION })
                }
            },
            request,
        ))
    }

    fn one_way(&self, _peer: PeerInfo, _message: Message) {}
}

struct Rig {
    _tmp: tempfile::TempDir,
    _node: Arc<Node>,
    _server: PeerServer,
    volume: Arc<Volume>,
    forwarder: Forwarder,
}

async fn rig() -> Rig {
    let tmp = tempfile::Builder::new().prefix("bench-fwd-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cfg = StoreConfig { data_dirs: vec![tmp.path().join("d0")], engine: EngineKind::Auto };
    let node = Node::open_with(cfg, StoreOptions::default(), 1 << 30).await.unwrap();
    let opts = VolumeOptions {
        size: SIZE,
        layout: Layout::contiguous(SIZE).unwrap(),
        replicas: 1,
        min_replicas: 1,
        read_only: false,
    };
    let volume = node.create_volume("bench", opts).unwrap();
    let chunk = Bytes::from(vec![0xa5u8; 1 << 20]);
    for i in 0..SIZE >> 20 {
        volume.write(i << 20, chunk.clone(), false).await.unwrap();
    }
    volume.flush().await.unwrap();
    let handler = Arc::new(Owner(volume.clone()));
    let server =
        PeerServer::bind("127.0.0.1:0".parse().unwrap(), ServerConfig::new(CLUSTER, NodeId(1)), handler)
            .await
            .unwrap();
    let pool = PeerPool::new(ClientConfig::new(CLUSTER, NodeId(2)));
    let forwarder = Forwarder::new(pool.client(server.local_addr()), volume.spec().id, GENERATION);
    // Connect before measuring.
    forwarder.read(0, 4096).await.unwrap();
    forwarder.read(4096, 4096).await.unwrap();
    Rig { _tmp: tmp, _node: node, _server: server, volume, forwarder }
}

#[derive(Clone, Copy)]
enum Path {
    Direct,
    Forwarded,
}

/// Runs `n` 4 KiB ops at random block offsets, `qd` at a time.
async fn run(rig: &Rig, path: Path, n: u64, qd: usize, write: bool, seed: &mut u64) -> Duration {
    let data = Bytes::from(vec![0x5au8; 4096]);
    let mut next = || {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        (*seed % (SIZE / 4096)) * 4096
    };
    let op = |off: u64| {
        let data = data.clone();
        async move {
            match (path, write) {
                (Path::Direct, true) => rig.volume.write(off, data, false).await.unwrap(),
                (Path::Direct, false) => drop(black_box(rig.volume.read(off, 4096).await.unwrap())),
                (Path::Forwarded, true) => rig.forwarder.write(off, data, false).await.unwrap(),
                (Path::Forwarded, false) => drop(black_box(rig.forwarder.read(off, 4096).await.unwrap())),
            }
        }
    };
    let start = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let mut issued = 0;
    while issued < n && inflight.len() < qd {
        inflight.push(op(next()));
        issued += 1;
    }
    while inflight.next().await.is_some() {
        if issued < n {
            inflight.push(op(next()));
            issued += 1;
        }
    }
    start.elapsed()
}

fn forwarding(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let rig = rt.block_on(rig());
    let mut g = c.benchmark_group("forward");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(4));
    g.sample_size(15);
    let mut seed = 0x1234_5678_9abc_def1u64;
    for (op, write) in [("read", false), ("write", true)] {
        for qd in [1usize, 16] {
            for (name, path) in [("direct", Path::Direct), ("forwarded", Path::Forwarded)] {
                let id = BenchmarkId::new(format!("{op}_4k_qd{qd}"), name);
                g.bench_function(id, |b| {
                    b.iter_custom(|iters| rt.block_on(run(&rig, path, iters, qd, write, &mut seed)))
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, forwarding);
criterion_main!(benches);
