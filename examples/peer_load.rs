//! Load on the peer transport over loopback, in one process: a `PeerServer`
//! whose handler answers at once (no store behind it) and a `PeerClient`
//! keeping QD requests in flight. Prints requests/s, MiB/s, and the CPU time
//! the process spent per request (client and server together), which is
//! what the transport adds to a forwarded or replicated request.
//!
//! peer_load <write|read> <bs> <qd> <count>

use basalt::net::{ClientConfig, PeerClient, PeerHandler, PeerInfo, PeerServer, ReplyFuture, ServerConfig};
use basalt::proto::peer::{ExtentRead, ExtentReadReply, ExtentTarget, ExtentWrite, Message};
use basalt::types::{ClusterId, Epoch, ExtentIndex, Generation, NodeId, VolumeId};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Instant;

struct Answer(Bytes);

impl PeerHandler for Answer {
    fn request(&self, _peer: PeerInfo, request: Message) -> ReplyFuture {
        let data = self.0.clone();
        Box::pin(async move {
            match request {
                Message::ExtentRead(r) => Message::ExtentReadReply(ExtentReadReply {
                    crcs: None,
                    data: data.slice(..r.len as usize),
                }),
                _ => Message::ExtentOk,
            }
        })
    }

    fn one_way(&self, _peer: PeerInfo, _message: Message) {}
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass; RUSAGE_SELF is valid.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: peer_load <write|read> <bs> <qd> <count>");
        std::process::exit(2);
    }
    let write = args[1] == "write";
    let bs: usize = args[2].parse().expect("bs");
    let qd: usize = args[3].parse().expect("qd");
    let count: usize = args[4].parse().expect("count");
    let cluster = ClusterId(1);
    let data = Bytes::from(vec![0x5a; bs]);
    let srv = PeerServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig::new(cluster, NodeId(1)),
        Arc::new(Answer(data.clone())),
    )
    .await
    .unwrap();
    let client = PeerClient::new(srv.local_addr(), ClientConfig::new(cluster, NodeId(2)));
    let target = ExtentTarget {
        volume: VolumeId(1),
        extent: ExtentIndex(0),
        epoch: Epoch(1),
        generation: Generation(1),
    };
    let request = move |i: usize| {
        let offset = (i * bs) as u64;
        if write {
            Message::ExtentWrite(ExtentWrite { target, offset, fua: false, copy: false, data: data.clone() })
        } else {
            Message::ExtentRead(ExtentRead { target, offset, len: bs as u32 })
        }
    };
    client.request(request(0)).await.unwrap(); // connect first
    let (t0, c0) = (Instant::now(), cpu_seconds());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..qd)
        .map(|_| {
            let (client, next, request) = (client.clone(), next.clone(), request.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count {
                    let i = next.load(std::sync::atomic::Ordering::Relaxed);
                    client.request(request(i)).await.unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let (secs, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
    println!(
        "{} bs={bs} qd={qd}: {:.0} req/s, {:.1} MiB/s, {:.1} us CPU per request ({count} requests, {secs:.2} s)",
        args[1],
        count as f64 / secs,
        (count * bs) as f64 / secs / (1 << 20) as f64,
        cpu / count as f64 * 1e6,
    );
}
