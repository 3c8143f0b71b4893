//! Who this node is: `node.json` in the state directory, written once on
//! first start (atomically, fsynced) and checked on every start after.
//!
//! The node id is random (raft-rs ids must be non-zero and unique; a random
//! 63-bit id needs no coordination). The cluster id is recorded the first
//! time the node is a member, so a state directory of another cluster is
//! refused instead of silently joining two histories.

use crate::storage::identity::{create_dir_durably, random_u64};
use crate::types::NodeId;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const FILE: &str = "node.json";
const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub format: u32,
    pub node_id: NodeId,
    /// 32 hex digits once the node belongs to a cluster.
    #[serde(default)]
    pub cluster_id: Option<String>,
    pub cluster_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is corrupt; restore it from a backup or move the state directory away to start as a new node"
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("drawing a node id: {0}")]
    Random(String),
    #[error("{path} has format {found}; this basaltd reads format {FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("{path} belongs to node {found}, but the config says node_id = {configured}")]
    OtherNode { path: PathBuf, found: NodeId, configured: NodeId },
    #[error(
        "{path} belongs to cluster {found:?}, but the config says cluster_name = {configured:?}; \
         point state_dir at this cluster's directory"
    )]
    OtherClusterName { path: PathBuf, found: String, configured: String },
    #[error(
        "{path} belongs to cluster {found}, not to cluster {joining}: this node is a member of another cluster"
    )]
    OtherCluster { path: PathBuf, found: String, joining: String },
}

impl Identity {
    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(FILE)
    }

    /// Loads the identity, or creates it (with `configured` as the node id
    /// if given, else a random one) on first start.
    pub fn load_or_create(
        state_dir: &Path,
        configured: Option<NodeId>,
        cluster_name: &str,
    ) -> Result<Identity, IdentityError> {
        let path = Self::path(state_dir);
        let io = |source| IdentityError::Io { path: path.clone(), source };
        match std::fs::read(&path) {
            Ok(bytes) => {
                let id: Identity = serde_json::from_slice(&bytes)
                    .map_err(|source| IdentityError::Corrupt { path: path.clone(), source })?;
                if id.format != FORMAT {
                    return Err(IdentityError::Format { path, found: id.format });
                }
                if let Some(c) = configured
                    && c != id.node_id
                {
                    return Err(IdentityError::OtherNode { path, found: id.node_id, configured: c });
                }
                if id.cluster_name != cluster_name {
                    return Err(IdentityError::OtherClusterName {
                        path,
                        found: id.cluster_name,
                        configured: cluster_name.into(),
                    });
                }
                Ok(id)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                create_dir_durably(state_dir).map_err(io)?;
                let random = || random_u64().map(NodeId).map_err(|e| IdentityError::Random(e.to_string()));
                let id = Identity {
                    format: FORMAT,
                    node_id: match configured {
                        Some(n) => n,
                        None => random()?,
                    },
                    cluster_id: None,
                    cluster_name: cluster_name.into(),
                };
                id.save(state_dir)?;
                Ok(id)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Records the cluster this node belongs to; refuses another one.
    pub fn set_cluster(&mut self, state_dir: &Path, cluster_id: &str) -> Result<(), IdentityError> {
        match &self.cluster_id {
            Some(c) if c == cluster_id => Ok(()),
            Some(c) => Err(IdentityError::OtherCluster {
                path: Self::path(state_dir),
                found: c.clone(),
                joining: cluster_id.into(),
            }),
            None => {
                self.cluster_id = Some(cluster_id.into());
                self.save(state_dir)
            }
        }
    }

    fn save(&self, state_dir: &Path) -> Result<(), IdentityError> {
        let path = Self::path(state_dir);
        let bytes = serde_json::to_vec_pretty(self).expect("identity serializes");
        super::write_atomically(&path, &bytes).map_err(|source| IdentityError::Io { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_checked() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("a/b/state");
        let a = Identity::load_or_create(&dir, None, "c").unwrap();
        assert_ne!(a.node_id, NodeId(0));
        let b = Identity::load_or_create(&dir, None, "c").unwrap();
        assert_eq!(a, b, "the same identity on every start");
        let e = Identity::load_or_create(&dir, Some(NodeId(a.node_id.0 + 1)), "c").unwrap_err();
        assert!(matches!(e, IdentityError::OtherNode { .. }), "{e}");
        let e = Identity::load_or_create(&dir, None, "other").unwrap_err();
        assert!(matches!(e, IdentityError::OtherClusterName { .. }), "{e}");
    }

    #[test]
    fn configured_id_and_cluster_binding() {
        let t = tempfile::tempdir().unwrap();
        let mut a = Identity::load_or_create(t.path(), Some(NodeId(42)), "c").unwrap();
        assert_eq!(a.node_id, NodeId(42));
        a.set_cluster(t.path(), "00ff").unwrap();
        a.set_cluster(t.path(), "00ff").unwrap();
        assert!(matches!(a.set_cluster(t.path(), "0100"), Err(IdentityError::OtherCluster { .. })));
        let b = Identity::load_or_create(t.path(), None, "c").unwrap();
        assert_eq!(b.cluster_id.as_deref(), Some("00ff"), "the cluster id is persisted");
    }

    #[test]
    fn corrupt_is_refused() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join(FILE), b"{not json").unwrap();
        let e = Identity::load_or_create(t.path(), None, "c").unwrap_err();
        assert!(matches!(e, IdentityError::Corrupt { .. }), "{e}");
    }
}
