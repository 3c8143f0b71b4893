//! iSCSI (RFC 7143) as pure code: PDU framing ([`pdu`]), text key=value
//! segments ([`text`]), the login negotiation ([`login`]) and the SCSI
//! block command layer ([`scsi`]). No sockets, no tokio, no clock, no
//! files: the caller (`export::iscsi`) does the I/O and supplies randomness.

pub mod login;
pub mod pdu;
pub mod scsi;
pub mod text;
