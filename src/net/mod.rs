//! The peer transport: `proto::peer` over tokio TCP.
//!
//! Owns: peer sockets, the handshake (version and cluster checked), request
//! ids and the in-flight table of each connection, per-request timeouts,
//! byte budgets and backpressure, vectored reply batching, reconnection.
//! Must never: interpret a message beyond what the transport needs (data
//! and metadata requests go to a [`PeerHandler`] untouched), grow memory
//! with a slow or hostile peer, or panic on anything a peer sends.
//!
//! - [`PeerServer`] accepts connections and hands each request to a
//!   [`PeerHandler`], many at once per connection.
//! - [`PeerPool`] keeps a [`PeerClient`] per peer address; a client keeps a
//!   few connections (lazily connected and reconnected) and sends requests
//!   ([`PeerClient::request`], with a timeout and a byte budget that makes
//!   callers wait) and one-way messages ([`PeerClient::send`], dropped and
//!   counted when the peer is unreachable or its budget is full: for Raft,
//!   which retransmits).

mod budget;
mod client;
mod server;
mod wire;

pub use budget::Gauge;
pub use client::{ClientStats, PeerClient, PeerPool, RequestClass, SendError};
pub use server::{PeerHandler, PeerServer, Refusal, ReplyFuture, ServerStats};

use crate::proto::peer::{DecodeError, EncodeError, ErrorCode, MAX_FRAME, RefuseCode};
use crate::types::{ClusterId, NodeId};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Who a request came from: the node id its `Hello` gave, and its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    pub node: NodeId,
    pub addr: SocketAddr,
}

/// The cluster id this node speaks for, shared by its server and clients.
/// Zero until the node belongs to a cluster: a fresh node (bootstrapping,
/// joining, or waiting for an invitation) says 0 in its `Hello`, and a
/// member accepts that, since the first thing such a node needs is to
/// learn the cluster. Two nodes that both know their cluster must agree.
#[derive(Debug, Clone)]
pub struct ClusterCell(Arc<RwLock<ClusterId>>);

impl ClusterCell {
    pub fn new(id: ClusterId) -> ClusterCell {
        ClusterCell(Arc::new(RwLock::new(id)))
    }

    pub fn get(&self) -> ClusterId {
        *self.0.read().unwrap()
    }

    pub fn set(&self, id: ClusterId) {
        *self.0.write().unwrap() = id;
    }

    /// Whether a peer that says `theirs` may talk to us.
    pub fn accepts(&self, theirs: ClusterId) -> bool {
        let mine = self.get();
        mine == theirs || mine.0 == 0 || theirs.0 == 0
    }
}

impl From<ClusterId> for ClusterCell {
    fn from(id: ClusterId) -> Self {
        ClusterCell::new(id)
    }
}

/// Settings of a [`PeerServer`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections from another cluster are refused.
    pub cluster: ClusterCell,
    /// This node, as `HelloAck` reports it.
    pub node: NodeId,
    /// Largest frame accepted (at most `proto::peer::MAX_FRAME`).
    pub max_frame: usize,
    /// Bytes of requests and replies in flight per connection before the
    /// server stops reading it.
    pub connection_budget: usize,
    /// A connection must send its `Hello` within this time.
    pub hello_timeout: Duration,
    /// Connections at most that have not finished their `Hello`; one more
    /// is closed at once (with a log line) instead of being served.
    pub max_handshaking: usize,
    /// Bytes of partly received frames over every connection of the
    /// server. A frame whose header declares more than a read chunk takes
    /// its whole length from this before its payload is read; when it is
    /// spent, connections with a large frame pending stop reading (the
    /// per-connection budget does not bound the node: it is per connection).
    pub assembly_budget: usize,
    /// A frame whose payload is being read must be complete this long
    /// after its room in `assembly_budget` was granted, else the
    /// connection is answered with an error, logged and closed.
    pub frame_timeout: Duration,
    /// [`PeerServer::shutdown`] waits this long for request handlers to
    /// finish, then drops the ones still running (with a log line).
    pub shutdown_grace: Duration,
}

impl ServerConfig {
    pub fn new(cluster: impl Into<ClusterCell>, node: NodeId) -> ServerConfig {
        ServerConfig {
            cluster: cluster.into(),
            node,
            max_frame: MAX_FRAME,
            connection_budget: 128 << 20,
            hello_timeout: Duration::from_secs(10),
            max_handshaking: 64,
            assembly_budget: 256 << 20,
            frame_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Settings of a [`PeerPool`] and its clients.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Sent in `Hello`; a server of another cluster refuses us.
    pub cluster: ClusterCell,
    /// This node, as `Hello` reports it.
    pub node: NodeId,
    /// Connections per peer.
    pub connections: usize,
    /// Default timeout of a request, from the call to the reply (waiting
    /// for budget and connecting included).
    pub request_timeout: Duration,
    /// Connecting plus the handshake.
    pub connect_timeout: Duration,
    /// After a failed connect, a connection slot fails requests at once for
    /// this long instead of trying again (a down peer costs nothing).
    pub reconnect_backoff: Duration,
    /// Bytes of requests and expected replies in flight per peer before
    /// requests wait and one-way messages are dropped.
    pub peer_budget: usize,
    /// Largest frame accepted (at most `proto::peer::MAX_FRAME`).
    pub max_frame: usize,
}

impl ClientConfig {
    pub fn new(cluster: impl Into<ClusterCell>, node: NodeId) -> ClientConfig {
        ClientConfig {
            cluster: cluster.into(),
            node,
            connections: 2,
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            reconnect_backoff: Duration::from_millis(200),
            peer_budget: 128 << 20,
            max_frame: MAX_FRAME,
        }
    }
}

/// Why a request to a peer got no reply.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot connect to peer {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("peer {addr} did not finish the handshake within {after:?}")]
    HandshakeTimeout { addr: SocketAddr, after: Duration },
    #[error("peer {addr} refused the connection ({code:?}): {message}")]
    Refused { addr: SocketAddr, code: RefuseCode, message: String },
    #[error("peer {addr} broke the handshake: {detail}")]
    Handshake { addr: SocketAddr, detail: String },
    #[error("peer {addr} is not reachable (the last connect failed; retrying after a short backoff)")]
    Backoff { addr: SocketAddr },
    #[error("request to peer {addr} timed out after {after:?}")]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("connection to peer {addr} was lost before the reply")]
    ConnectionLost { addr: SocketAddr },
    #[error("peer {addr} sent a frame that does not decode")]
    BadFrame {
        addr: SocketAddr,
        #[source]
        source: DecodeError,
    },
    #[error("peer {addr} answered with an error ({code:?}): {message}")]
    Remote { addr: SocketAddr, code: ErrorCode, message: String },
    #[error("request cannot be sent")]
    Encode(#[from] EncodeError),
}

/// `e` and its causes, as one line: what a peer is told about its bad frame.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
