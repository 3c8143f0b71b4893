//! The metadata group: a Raft log (the `raft` crate) replicated over 1, 3
//! or 5 voters plus learners, and the state machine it drives.
//!
//! - [`state`]: the pure state machine (commands, validation, snapshots).
//! - [`store`]: the durable Raft log, hard state and snapshots (redb).
//!
//! Ids the cluster needs but `types` does not have yet ([`ClusterId`],
//! [`Generation`]) live in `state` for now.

pub mod state;
pub mod store;

pub use state::{ClusterId, Generation};
