//! The owner side of replication, as pure state machines: events in,
//! actions out. No I/O, no clock, no tasks: the I/O shell
//! (`node::replicated`) feeds it what happened on the network and in the
//! metadata and carries out what it asks; the simulator
//! (`tests/replication_sim.rs`) does the same over a virtual network.
//!
//! Owns: the rules that make a replicated write correct.
//! - Overlapping changes of an extent reach every replica in one order: a
//!   change starts only when every earlier change it overlaps has finished
//!   on every replica (Crucible's upstairs orders by dependency the same way).
//! - A change is acknowledged only when every member of the extent's
//!   *committed* replica set applied it and the set has at least
//!   `min_replicas` members. A member that fails leaves the set by a
//!   metadata commit (epoch + 1) before anything that member missed is
//!   acknowledged on the others.
//! - A FLUSH covers every change acknowledged before it: it goes to every
//!   member of every extent changed since the last round began, and all the
//!   FLUSHes that arrive while a round runs share the next one.
//! - A replica that answers with a newer owner generation fences this owner:
//!   every request fails from then on.
//!
//! Never: touches payloads (the shell keeps them by [`OpId`]), reads a
//! clock (timeouts are the shell's and arrive as [`Failure::Timeout`]).

pub mod owner;
pub mod reconcile;

pub use owner::{Action, Change, Event, Failure, OpError, OpId, Owner, Then};
