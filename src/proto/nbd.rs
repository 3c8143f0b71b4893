//! NBD wire protocol (NetworkBlockDevice/nbd doc/proto.md).
