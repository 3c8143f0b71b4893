//! Daemon configuration. Every field has a default that works for a
//! single-node demo; `validate` names the first bad field.

use crate::storage::EngineKind;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Configuration of one `basaltd`.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dirs: Vec<PathBuf>,
    pub engine: EngineKind,
    /// Where the NBD server listens (`None`: no NBD).
    pub nbd_listen: Option<SocketAddr>,
    /// Where the iSCSI target listens (`None`: no iSCSI).
    pub iscsi_listen: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("data_dirs: at least one data directory is needed")]
    NoDataDir,
    #[error("data_dirs: {0} is listed twice")]
    DuplicateDataDir(String),
    #[error("nbd_listen and iscsi_listen are both {0}")]
    SameListenAddr(SocketAddr),
}

impl NodeConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.data_dirs.is_empty() {
            return Err(ConfigError::NoDataDir);
        }
        for (i, d) in self.data_dirs.iter().enumerate() {
            if self.data_dirs[..i].contains(d) {
                return Err(ConfigError::DuplicateDataDir(d.display().to_string()));
            }
        }
        if let (Some(a), Some(b)) = (self.nbd_listen, self.iscsi_listen) {
            if a == b {
                return Err(ConfigError::SameListenAddr(a));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> NodeConfig {
        NodeConfig {
            data_dirs: vec!["/a".into()],
            engine: EngineKind::Auto,
            nbd_listen: Some("127.0.0.1:10809".parse().unwrap()),
            iscsi_listen: Some("127.0.0.1:3260".parse().unwrap()),
        }
    }

    #[test]
    fn validate_names_the_bad_field() {
        assert_eq!(base().validate(), Ok(()));
        let mut c = base();
        c.data_dirs.clear();
        assert_eq!(c.validate(), Err(ConfigError::NoDataDir));
        let mut c = base();
        c.data_dirs.push("/a".into());
        assert_eq!(c.validate(), Err(ConfigError::DuplicateDataDir("/a".into())));
        let mut c = base();
        c.iscsi_listen = c.nbd_listen;
        assert!(matches!(c.validate(), Err(ConfigError::SameListenAddr(_))));
    }
}
