//! One `basaltd`: its store, its volumes, and the catalog that names them.
//!
//! Until the metadata group exists the catalog is a small JSON file in the
//! first data directory, replaced atomically (write, fsync, rename, fsync
//! dir). It holds only per-volume records: extents are computed from the
//! layout, never listed.

mod budget;
pub mod identity;
pub mod systemd;
mod sync;
pub mod volume;

use crate::layout::Layout;
use crate::storage::{Store, StoreConfig, StoreError, StoreOptions};
use crate::types::VolumeId;
pub use budget::PayloadBudget;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
pub use volume::{Volume, VolumeError};

/// The durable record of one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub id: VolumeId,
    pub name: String,
    pub size: u64,
    pub layout: Layout,
    pub replicas: u32,
    pub min_replicas: u32,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Catalog {
    next_id: u64,
    volumes: BTreeMap<String, VolumeSpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("store")]
    Store(#[from] StoreError),
    #[error("catalog {path}")]
    Catalog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("catalog {path} is corrupt")]
    CatalogCorrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid volume name {0:?}: use 1-64 of [A-Za-z0-9._-]")]
    BadName(String),
    #[error("volume size {0} must be a positive multiple of 4096")]
    BadSize(u64),
    #[error("volume {0:?} already exists")]
    Exists(String),
}

/// What a new volume looks like.
#[derive(Debug, Clone)]
pub struct VolumeOptions {
    pub size: u64,
    pub layout: Layout,
    pub replicas: u32,
    pub min_replicas: u32,
    pub read_only: bool,
}

/// A running node: the store plus the open volumes.
#[derive(Debug)]
pub struct Node {
    store: Arc<Store>,
    /// `None` on the mem engine: its volumes, like its data, live in memory.
    catalog_path: Option<PathBuf>,
    catalog: Mutex<Catalog>,
    volumes: Mutex<BTreeMap<String, Arc<Volume>>>,
    /// Client payload memory, shared by every frontend connection.
    payload_budget: PayloadBudget,
}

/// Default for the node-wide client payload budget ([`Node::payload_budget`]).
pub const DEFAULT_PAYLOAD_BUDGET: u64 = 1 << 30;

pub fn valid_volume_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

impl Node {
    pub async fn open(store_cfg: StoreConfig) -> Result<Arc<Node>, NodeError> {
        Node::open_with(store_cfg, StoreOptions::default(), DEFAULT_PAYLOAD_BUDGET).await
    }

    /// [`Node::open`] with store options and a node-wide client payload
    /// budget of `payload_budget` bytes.
    pub async fn open_with(
        store_cfg: StoreConfig,
        store_opts: StoreOptions,
        payload_budget: u64,
    ) -> Result<Arc<Node>, NodeError> {
        let catalog_path = (store_cfg.engine != crate::storage::EngineKind::Mem)
            .then(|| store_cfg.data_dirs[0].join("volumes.json"));
        let store = Store::open_with(store_cfg, store_opts).await?;
        let catalog = match catalog_path.as_ref().map(std::fs::read) {
            None => Catalog::default(),
            Some(Ok(bytes)) => serde_json::from_slice(&bytes).map_err(|source| {
                NodeError::CatalogCorrupt { path: catalog_path.clone().unwrap_or_default(), source }
            })?,
            Some(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Catalog::default(),
            Some(Err(source)) => {
                return Err(NodeError::Catalog { path: catalog_path.unwrap_or_default(), source });
            }
        };
        let node = Node {
            store,
            catalog_path,
            catalog: Mutex::new(catalog),
            volumes: Mutex::new(BTreeMap::new()),
            payload_budget: PayloadBudget::new(payload_budget),
        };
        let specs: Vec<VolumeSpec> = node.catalog.lock().unwrap().volumes.values().cloned().collect();
        for spec in specs {
            node.volumes.lock().unwrap().insert(spec.name.clone(), Volume::new(spec, node.store.clone()));
        }
        Ok(Arc::new(node))
    }

    /// The node-wide cap on client payload memory (READ and WRITE data in
    /// flight over all connections), [`DEFAULT_PAYLOAD_BUDGET`].
    pub fn payload_budget(&self) -> &PayloadBudget {
        &self.payload_budget
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The volume called `name`, if it exists.
    pub fn volume(&self, name: &str) -> Option<Arc<Volume>> {
        self.volumes.lock().unwrap().get(name).cloned()
    }

    /// All volumes, by name.
    pub fn volumes(&self) -> Vec<Arc<Volume>> {
        self.volumes.lock().unwrap().values().cloned().collect()
    }

    /// Creates a volume and records it durably before returning it.
    pub fn create_volume(&self, name: &str, opts: VolumeOptions) -> Result<Arc<Volume>, NodeError> {
        if !valid_volume_name(name) {
            return Err(NodeError::BadName(name.to_string()));
        }
        if opts.size == 0 || opts.size % 4096 != 0 {
            return Err(NodeError::BadSize(opts.size));
        }
        let mut cat = self.catalog.lock().unwrap();
        if cat.volumes.contains_key(name) {
            return Err(NodeError::Exists(name.to_string()));
        }
        cat.next_id += 1;
        let spec = VolumeSpec {
            id: VolumeId(cat.next_id),
            name: name.to_string(),
            size: opts.size,
            layout: opts.layout,
            replicas: opts.replicas,
            min_replicas: opts.min_replicas,
            read_only: opts.read_only,
        };
        cat.volumes.insert(name.to_string(), spec.clone());
        if let Some(path) = &self.catalog_path
            && let Err(e) = write_atomically(path, &serde_json::to_vec_pretty(&*cat).unwrap())
        {
            cat.volumes.remove(name);
            return Err(NodeError::Catalog { path: path.clone(), source: e });
        }
        let vol = Volume::new(spec, self.store.clone());
        self.volumes.lock().unwrap().insert(name.to_string(), vol.clone());
        Ok(vol)
    }

    /// Flushes every volume.
    pub async fn flush_all(&self) -> Result<(), StoreError> {
        self.store.flush_all().await
    }

    /// The last step of a clean shutdown: flushes every extent and marks it
    /// clean on disk, so the next start verifies every checksum it reads
    /// instead of forgiving blocks a crash may have torn.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.store.close().await
    }
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new
/// file, never a torn one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
