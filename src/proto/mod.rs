//! Sans-IO protocol codecs: bytes in, frames out. No sockets, no tokio, no
//! clock; every length and offset from the wire is checked before use.

pub mod iscsi;
pub mod nbd;
pub mod peer;
