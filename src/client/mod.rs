//! Clients of a node's volume I/O path, for the `basalt` CLI.
//!
//! - [`nbd`]: a small async NBD client (pipelined, structured replies,
//!   `base:allocation`), on the sans-IO [`codec`].
//! - [`transfer`]: `volume import` and `volume export` of raw images,
//!   sparse both ways, several requests in flight.
//! - [`progress`]: the progress bar a terminal gets.
//!
//! Owns nothing of the server: it speaks only the wire protocol, and treats
//! every byte a server sends as hostile input. Must never: buffer a reply
//! beyond what its request can carry, or claim progress the server has not
//! acknowledged.

pub mod codec;
pub mod nbd;
pub mod progress;
pub mod transfer;

/// An error and its causes, one sentence: "a: b: c".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
