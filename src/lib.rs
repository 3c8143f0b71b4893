//! # Basalt: replicated block storage
//!
//! A `basaltd` daemon runs on every node; together the daemons store
//! *volumes* (virtual block devices) and serve them over NBD and iSCSI. The
//! architecture and its invariants are written down in `docs/design.md`;
//! this page is the map of the code.
//!
//! ## Layers (one module per layer)
//! ```text
//! frontends   export::nbd, export::iscsi     sockets + sans-IO codecs (proto::nbd, proto::iscsi)
//! volume      node::volume                   offset -> extent via layout::, ordering, the ack rule
//! layout      layout::                       pure striping math: volume offsets to extent ranges
//! store       storage::                      extent replicas on local disk; engines: io_uring | psync | mem
//! ```
//! Replication (`replication::`), the peer transport (`net::`) and the Raft
//! metadata group (`meta::`) slot in between `node::volume` and `storage::`
//! in later work: the volume already talks to extents through one narrow
//! API, so a remote replica is just another implementation of it.
//!
//! Pure modules (`proto`, `layout`, `storage::format`) do no I/O and read no
//! clock.
//!
//! ## Glossary
//! - **volume**: a named, fixed-size block device; 512-byte logical blocks,
//!   4 KiB preferred.
//! - **extent**: the unit of placement, replication and repair: a fixed-size
//!   slice of a volume (default 64 MiB).
//! - **stripe unit / width**: consecutive stripe units go round-robin over
//!   `width` extents.
//! - **epoch**: version of an extent's replica set (1 until the cluster
//!   exists).

pub mod config;
pub mod export;
pub mod layout;
pub mod node;
pub mod proto;
pub mod storage;
pub mod types;
pub mod units;
