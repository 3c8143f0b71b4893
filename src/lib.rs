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
//! transport   net:: + proto::peer            framed peer RPC over TCP: pipelined, crc32c, versioned, budgeted
//! store       storage::                      extent replicas on local disk; engines: io_uring | psync | mem
//! placement   placement::                    pure: cluster map + (volume, extent) -> replica set (rendezvous)
//! metadata    meta::                         Raft group (raft-rs, redb log) + pure state machine (meta::state)
//! ```
//! Control: `admin::` (HTTP admin API, metrics), `config` (the node's TOML
//! file), `client::` (the CLI's NBD client for import/export). The daemon
//! shell that ties metadata, transport, store and front ends together is
//! `src/bin/basaltd/`. Replication (`replication::`) slots in between
//! `node::volume` and `storage::` next: the volume already talks to extents
//! through one narrow API, so a remote replica is just another
//! implementation of it, carried by `proto::peer`'s extent messages.
//!
//! Beside the layers, `poll` keeps a runtime worker polling for a moment
//! after client activity instead of sleeping (low-queue-depth latency).
//!
//! Pure modules (`proto`, `layout`, `placement`, `storage::format`, `types`, `units`) do
//! no I/O and read no clock; `tests/architecture.rs` keeps them that way.
//!
//! ## Invariants (docs/design.md) and where this slice keeps them
//! 1. Ack rule: with one replica, an operation is acknowledged only after
//!    the local extent completed it (`node::volume` awaits every piece).
//! 2. Durability: `Volume::flush` is a barrier over every extent of the
//!    volume, shared by all connections and both front ends, so NBD
//!    advertises multi-conn; FUA is a write plus a flush of its extents.
//! 3. No split brain, 4. degrade before ack, 5. same order everywhere: these
//!    arrive with replication; extents already carry an epoch in their header.
//! 6. Checksums: a crc32c per 4 KiB block, verified on every read; a
//!    mismatch is EIO (NBD) / MEDIUM ERROR (SCSI) and an error log naming
//!    extent and block; rot in the block table (a crc32c per sector) or
//!    headers costs only the blocks or the extent it covers, never the node
//!    (`tests/bitrot.rs`).
//! 7. Crash consistency: the dirty-region activity log in
//!    `storage::extent` (`tests/storage_crash.rs`, `tests/crash.rs`,
//!    `tests/crash_loop.rs`).
//! 9. Hostile input: codecs cap every length before buffering and answer
//!    with the protocol's error; memory is bounded per connection and, over
//!    all of them, by `node::PayloadBudget` (`tests/nbd_hostile.rs`,
//!    `tests/iscsi_hostile.rs`).
//!
//! ## Glossary
//! - **volume**: a named, fixed-size block device; 512-byte logical blocks,
//!   4 KiB preferred.
//! - **extent**: the unit of placement, replication and repair: a fixed-size
//!   slice of a volume (default 256 MiB).
//! - **stripe unit / width**: consecutive stripe units go round-robin over
//!   `width` extents.
//! - **epoch**: version of an extent's replica set (1 until the cluster
//!   exists).

pub mod admin;
pub mod client;
pub mod config;
pub mod export;
pub mod layout;
pub mod meta;
pub mod net;
pub mod node;
pub mod placement;
pub mod poll;
pub mod proto;
pub mod replication;
pub mod storage;
pub mod types;
pub mod units;
