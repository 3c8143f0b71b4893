//! `basalt volume verify`: compares every extent's replicas by their
//! per-block crc32c tables (`ExtentCrcs` over the peer protocol), chunk by
//! chunk, so memory stays bounded by a chunk whatever the extent size.
//!
//! The replica set of each extent is the metadata's (`MetaState::replicas`:
//! its exception if it has one, else placement with the volume's map), as
//! `volume show` prints it. Every replica is asked through the node's peer pool (this node's own
//! replica too, over loopback: verify is not a hot path). Requests carry
//! the extent's epoch and the volume's owner generation from this node's
//! metadata; the replicas check but do not raise them, so verify never
//! fences the owner. A replica that cannot answer (unreachable, or an
//! error such as a stale epoch) is listed and left out of the comparison.

use basalt::admin::{
    ByteRange, ControlError, ExtentVerify, MAX_LISTED_MISMATCHES, UnreachableReplica, VolumeVerify,
};
use basalt::meta::state::{MetaState, VolumeRecord};
use basalt::net::PeerPool;
use basalt::proto::peer::{BlockCrcs, ExtentCrcs, ExtentTarget, Message};
use basalt::types::{ExtentIndex, Generation, NodeId};
use futures::StreamExt;
use std::net::SocketAddr;

/// Bytes of an extent compared per round: 64 MiB is 16,384 crcs (64 KiB)
/// per replica.
const CHUNK: u64 = 64 << 20;
/// Extents compared at once.
const PARALLEL_EXTENTS: usize = 4;

/// Verifies volume `name` as `state` describes it.
pub async fn verify(state: &MetaState, pool: &PeerPool, name: &str) -> Result<VolumeVerify, ControlError> {
    let v = state
        .volume_by_name(name)
        .ok_or_else(|| ControlError::NotFound(format!("no volume named {name:?}")))?;
    let jobs: Vec<_> = (0..v.extent_count())
        .map(|i| {
            let idx = ExtentIndex(i);
            let (epoch, set) = match state.replicas(v.id, idx) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(volume = %v.name, extent = %idx, error = %e, "verify: no replica set");
                    (state.epoch(v.id, idx), Vec::new())
                }
            };
            let members: Vec<(NodeId, Option<SocketAddr>)> = set
                .iter()
                .map(|&n| (n, state.node(n).and_then(|r| r.spec.addrs.peer.parse().ok())))
                .collect();
            let target =
                ExtentTarget { volume: v.id, extent: idx, epoch, generation: Generation(v.generation.0) };
            verify_extent(pool, v, target, members)
        })
        .collect();
    let extents: Vec<ExtentVerify> = futures::stream::iter(jobs).buffered(PARALLEL_EXTENTS).collect().await;
    let mismatched = extents.iter().filter(|e| e.mismatched_blocks > 0).count() as u64;
    // An extent without a replica set (placement found no nodes) was not compared either.
    let incomplete =
        extents.iter().filter(|e| !e.unreachable.is_empty() || e.replicas.is_empty()).count() as u64;
    if mismatched > 0 || incomplete > 0 {
        tracing::warn!(volume = %v.name, mismatched, incomplete, "verify found differences or could not compare");
    } else {
        tracing::info!(volume = %v.name, extents = extents.len(), "verify: every extent's replicas match");
    }
    Ok(VolumeVerify {
        name: v.name.clone(),
        id: v.id.0,
        extent_size: v.layout.extent_size,
        extents,
        mismatched,
        incomplete,
    })
}

/// One replica's crcs of one chunk, or why there are none.
async fn ask(pool: &PeerPool, addr: Option<SocketAddr>, req: ExtentCrcs) -> Result<BlockCrcs, String> {
    let addr = addr.ok_or("no peer address known for the node")?;
    match pool.request(addr, Message::ExtentCrcs(req)).await {
        Ok(Message::ExtentCrcsReply(c)) if c.block_size == 4096 && c.crcs.len() as u64 == req.len / 4096 => {
            Ok(c)
        }
        Ok(Message::ExtentCrcsReply(c)) => {
            Err(format!("answered {} crcs of {} bytes for {} bytes", c.crcs.len(), c.block_size, req.len))
        }
        Ok(Message::ExtentErr(e)) => Err(format!("{:?}: {}", e.error, e.message)),
        Ok(Message::Error(e)) => Err(format!("{:?}: {}", e.code, e.message)),
        Ok(other) => Err(format!("unexpected answer {:?}", other.kind())),
        Err(e) => Err(basalt::units::error_chain(&e)),
    }
}

async fn verify_extent(
    pool: &PeerPool,
    v: &VolumeRecord,
    target: ExtentTarget,
    members: Vec<(NodeId, Option<SocketAddr>)>,
) -> ExtentVerify {
    let size = v.layout.extent_size;
    let mut failed: Vec<Option<String>> = vec![None; members.len()];
    let mut mismatches: Vec<ByteRange> = Vec::new();
    let mut mismatched_blocks = 0u64;
    let mut offset = 0;
    while offset < size {
        let len = CHUNK.min(size - offset);
        let req = ExtentCrcs { target, offset, len };
        let answers =
            futures::future::join_all(members.iter().zip(&failed).map(|((_, addr), f)| async move {
                if f.is_some() { None } else { Some(ask(pool, *addr, req).await) }
            }))
            .await;
        let mut tables: Vec<Vec<u32>> = Vec::new();
        for (i, a) in answers.into_iter().enumerate() {
            match a {
                Some(Ok(c)) => tables.push(c.crcs),
                Some(Err(why)) => failed[i] = Some(why),
                None => {}
            }
        }
        if let Some((first, rest)) = tables.split_first() {
            for (b, crc) in first.iter().enumerate() {
                if rest.iter().all(|t| t[b] == *crc) {
                    continue;
                }
                mismatched_blocks += 1;
                let at = offset + b as u64 * 4096;
                let listed = mismatches.len();
                match mismatches.last_mut() {
                    Some(r) if r.offset + r.len == at => r.len += 4096,
                    _ if listed < MAX_LISTED_MISMATCHES => {
                        mismatches.push(ByteRange { offset: at, len: 4096 })
                    }
                    _ => {}
                }
            }
        }
        offset += len;
    }
    let unreachable: Vec<UnreachableReplica> = members
        .iter()
        .zip(failed)
        .filter_map(|((n, _), f)| f.map(|error| UnreachableReplica { node: n.0, error }))
        .collect();
    if mismatched_blocks > 0 {
        tracing::warn!(volume = %v.name, extent = %target.extent, mismatched_blocks, first = ?mismatches.first(),
            "replicas differ");
    }
    for u in &unreachable {
        tracing::warn!(volume = %v.name, extent = %target.extent, node = u.node, error = %u.error,
            "verify could not compare a replica");
    }
    ExtentVerify {
        index: target.extent.0,
        epoch: target.epoch.0,
        replicas: members.iter().map(|(n, _)| n.0).collect(),
        mismatches,
        mismatched_blocks,
        unreachable,
    }
}
