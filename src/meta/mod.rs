//! The metadata group: a Raft log (raft-rs) replicated over 1, 3 or 5
//! voters plus learners, and the state machine it drives.
//!
//! - [`state`]: the pure state machine (commands, validation, snapshots).
//! - [`maps`]: the versioned placement maps the state keeps (pure).
//! - [`store`]: the durable Raft log, hard state and snapshots (redb).
//! - [`core`]: the Ready cycle and the leader's duties, driven by calls and
//!   ticks, no I/O of its own (the simulator drives it directly).
//! - [`node`]: [`MetaNode`], the tokio shell: tick loop, message intake,
//!   proposals and reads with timeouts, heartbeats.
//!
//! Writes from any node: a follower's proposal (and read-index request)
//! reaches the leader through Raft itself (raft-rs forwards `MsgPropose` and
//! `MsgReadIndex`), so the only RPC besides Raft messages is the node
//! heartbeat ([`MetaRequest`]). A proposal resolves when the proposing node
//! has applied it, so a caller reads its own write on the node it asked.
//!
//! Ids the cluster needs but `types` does not have yet ([`ClusterId`],
//! [`Generation`]) live in `state` for now.

pub mod core;
pub mod maps;
pub mod node;
pub mod state;
pub mod store;

pub use self::core::{CoreConfig, MetaCore, NodeReport};
pub use node::{Consistency, MetaConfig, MetaNode, MetaTransport, Startup};
pub use state::{ApplyOutcome, ClusterId, Command, Generation, MetaState, Rejection};
pub use store::{LogStore, MemStore, RedbStore, StoreError};

use crate::types::NodeId;
use serde::{Deserialize, Serialize};

/// Everything the metadata layer can fail with.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("no metadata leader is known: fewer than a majority of the voters are reachable")]
    NoLeader,
    #[error("metadata leader {leader} did not commit in time: a majority of the voters may be unreachable")]
    NoQuorum { leader: NodeId },
    #[error("the metadata refused the command")]
    Rejected(#[from] Rejection),
    #[error("metadata store")]
    Store(#[from] StoreError),
    #[error("raft")]
    Raft(#[source] raft::Error),
    #[error("metadata snapshot")]
    CorruptSnapshot(#[source] state::SnapshotDecodeError),
    #[error("this data dir already belongs to a cluster; a second bootstrap is refused")]
    AlreadyBootstrapped,
    #[error("metadata config field {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: &'static str },
    #[error("the metadata node has stopped")]
    Stopped,
    #[error("metadata transport to {to}: {reason}")]
    Transport { to: NodeId, reason: String },
    #[error("a metadata {0} did not decode")]
    BadMessage(&'static str),
    #[error("command of {len} bytes is over the {max}-byte limit")]
    ProposalTooLarge { len: usize, max: usize },
}

/// This node's role in Raft right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftRole {
    Leader,
    Candidate,
    Follower,
    Learner,
}

/// What `MetaNode::status` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaStatus {
    pub id: NodeId,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub role: RaftRole,
    pub commit_index: u64,
    pub applied_index: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// First and last index of the log this node holds.
    pub log_first: u64,
    pub log_last: u64,
    /// Index of this node's newest snapshot.
    pub snapshot_index: u64,
}

/// A request between metadata nodes besides Raft messages. Variants are
/// only appended; the wire form is versioned by [`MetaRequest::encode`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaRequest {
    /// "I am alive, and this is what I am": to the leader, every
    /// heartbeat interval.
    Heartbeat(NodeReport),
}

/// The answer to a [`MetaRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaResponse {
    HeartbeatAck,
    /// Ask this one instead (`None`: no leader known).
    NotLeader {
        leader: Option<NodeId>,
    },
}

#[derive(Serialize, Deserialize)]
enum Wire<T> {
    V1(T),
}

fn encode_wire<T: Serialize>(v: &T) -> Vec<u8> {
    #[derive(Serialize)]
    enum WireRef<'a, T> {
        V1(&'a T),
    }
    postcard::to_allocvec(&WireRef::V1(v)).expect("postcard encode of a metadata message")
}

impl MetaRequest {
    pub fn encode(&self) -> Vec<u8> {
        encode_wire(self)
    }
    pub fn decode(b: &[u8]) -> Result<Self, MetaError> {
        match postcard::from_bytes::<Wire<Self>>(b) {
            Ok(Wire::V1(r)) => Ok(r),
            Err(_) => Err(MetaError::BadMessage("request")),
        }
    }
}

impl MetaResponse {
    pub fn encode(&self) -> Vec<u8> {
        encode_wire(self)
    }
    pub fn decode(b: &[u8]) -> Result<Self, MetaError> {
        match postcard::from_bytes::<Wire<Self>>(b) {
            Ok(Wire::V1(r)) => Ok(r),
            Err(_) => Err(MetaError::BadMessage("response")),
        }
    }
}

/// A Raft message as bytes for the peer protocol (protobuf, as raft-rs defines it).
pub fn encode_raft_message(m: &raft::eraftpb::Message) -> Vec<u8> {
    use protobuf::Message as _;
    m.write_to_bytes().expect("protobuf encode of a raft message")
}

/// Bytes from a peer as a Raft message. The caller caps the frame size.
pub fn decode_raft_message(b: &[u8]) -> Result<raft::eraftpb::Message, MetaError> {
    use protobuf::Message as _;
    raft::eraftpb::Message::parse_from_bytes(b).map_err(|_| MetaError::BadMessage("raft message"))
}

/// raft-rs logs through slog; this hands its records to `tracing`.
pub fn raft_logger(node: NodeId) -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!("meta_node" => node.0))
}

#[derive(Debug)]
struct TracingDrain;

struct KvText(String);

impl slog::Serializer for KvText {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        use std::fmt::Write;
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        use slog::KV;
        let mut kv = KvText(String::new());
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        let msg = record.msg();
        let kv = kv.0;
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!(target: "raft", "{msg}{kv}"),
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}{kv}"),
            slog::Level::Info => tracing::info!(target: "raft", "{msg}{kv}"),
            slog::Level::Debug => tracing::debug!(target: "raft", "{msg}{kv}"),
            slog::Level::Trace => tracing::trace!(target: "raft", "{msg}{kv}"),
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::field_reassign_with_default)]
mod tests {
    use super::*;

    #[test]
    fn wire_messages_round_trip_and_refuse_garbage() {
        let r = MetaResponse::NotLeader { leader: Some(NodeId(3)) };
        assert_eq!(MetaResponse::decode(&r.encode()).unwrap(), r);
        assert!(matches!(MetaRequest::decode(&[7, 1, 2]), Err(MetaError::BadMessage("request"))));
        assert!(matches!(MetaResponse::decode(&[]), Err(MetaError::BadMessage("response"))));
        let mut m = raft::eraftpb::Message::default();
        m.from = 2;
        m.to = 3;
        m.term = 9;
        assert_eq!(decode_raft_message(&encode_raft_message(&m)).unwrap(), m);
        assert!(decode_raft_message(&[0xff, 0xff, 0xff]).is_err());
    }
}
