//! Frontends: the sockets that serve volumes to clients (NBD, iSCSI).
//!
//! Owns: accepting connections, running a protocol codec over them, and
//! turning requests into `node::Volume` calls. Must never: touch the store
//! directly, or acknowledge anything the volume has not completed.
//!
//! Shutdown: every server takes a `CancellationToken` and spawns its
//! connections on a `TaskTracker`. On cancel a server stops accepting, each
//! connection stops reading new requests, answers those in flight, and
//! closes; the daemon then waits for the tracker and flushes.

pub(crate) mod flood;
pub mod iscsi;
pub mod nbd;
pub mod readahead;
