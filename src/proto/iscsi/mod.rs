//! iSCSI PDU codec (RFC 7143) and SCSI command parsing.
