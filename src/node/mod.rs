//! One `basaltd`: its store, its volumes, and the catalog that names them.
//!
//! Until the metadata group exists the catalog is a small JSON file kept in
//! two copies in every data directory (`catalog-a.json`, `catalog-b.json`),
//! so it is found whatever the order of the directories and survives rot
//! in any one copy. It holds only per-volume records: extents are computed
//! from the layout, never listed.
//!
//! # A catalog copy
//! ```text
//! {"format":1,"node_id":N,"seq":S,"next_id":I,"volumes":{...},"crc32c":C}
//! ```
//! `seq` counts catalog writes; a change writes every copy (each replaced
//! atomically: temporary file, fsync, rename, fsync of the directory) with
//! the next `seq`, and open loads the sound copy with the highest, then
//! rewrites any copy that is missing, stale or damaged. `crc32c` is over
//! the JSON of the other fields as written here, so rot that still parses
//! is caught; `node_id` must be this node's (`storage::identity`). Volume
//! ids come from `next_id`, which never goes back, so an id is never
//! issued twice. A node refuses to start on an extent whose volume no
//! catalog records, rather than let a new volume serve it. The first
//! catalog (`volumes.json` in the first data directory) is adopted once
//! and removed.

mod budget;
pub mod fence;
pub mod forward;
pub mod identity;
pub mod replica;
pub mod replicated;
pub mod suspect;
mod sync;
pub mod systemd;
pub mod volume;

use crate::layout::Layout;
use crate::storage::{Store, StoreConfig, StoreError, StoreOptions, write_atomically};
use crate::types::{NodeId, VolumeId};
pub use budget::PayloadBudget;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
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

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Catalog {
    next_id: u64,
    volumes: BTreeMap<String, VolumeSpec>,
}

/// The two copies of the catalog in every data directory.
const CATALOG_COPIES: [&str; 2] = ["catalog-a.json", "catalog-b.json"];
/// Where the first catalog lived (the first data directory).
const LEGACY_CATALOG: &str = "volumes.json";
const CATALOG_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CatalogBody {
    format: u32,
    node_id: NodeId,
    seq: u64,
    #[serde(flatten)]
    catalog: Catalog,
}

#[derive(Serialize, Deserialize)]
struct CatalogFile {
    #[serde(flatten)]
    body: CatalogBody,
    crc32c: u32,
}

fn body_crc(b: &CatalogBody) -> u32 {
    crc32c::crc32c(&serde_json::to_vec(b).expect("plain struct"))
}

fn encode_catalog(body: &CatalogBody) -> Vec<u8> {
    let file = CatalogFile { body: body.clone(), crc32c: body_crc(body) };
    let mut v = serde_json::to_vec_pretty(&file).expect("plain struct");
    v.push(b'\n');
    v
}

fn decode_catalog(bytes: &[u8]) -> Result<CatalogBody, String> {
    let f: CatalogFile = serde_json::from_slice(bytes).map_err(|e| format!("does not parse: {e}"))?;
    let crc = body_crc(&f.body);
    if crc != f.crc32c {
        return Err(format!("crc mismatch: stored {:#010x}, computed {crc:#010x}", f.crc32c));
    }
    if f.body.format != CATALOG_FORMAT {
        return Err(format!("unsupported catalog format {}", f.body.format));
    }
    Ok(f.body)
}

/// The catalog as loaded and as last written.
#[derive(Debug)]
struct Stored {
    seq: u64,
    catalog: Catalog,
}

/// Writes `body` to every copy in every directory.
fn write_catalog(dirs: &[PathBuf], body: &CatalogBody) -> Result<(), NodeError> {
    let bytes = encode_catalog(body);
    for dir in dirs {
        for name in CATALOG_COPIES {
            let path = dir.join(name);
            write_atomically(&path, &bytes).map_err(|source| NodeError::Catalog { path, source })?;
        }
    }
    Ok(())
}

/// The newest sound catalog copy in `dirs`, whoever's it is (read before
/// the store opens, for the node id it names).
fn newest_catalog(dirs: &[PathBuf]) -> Option<CatalogBody> {
    let copies = dirs.iter().flat_map(|d| CATALOG_COPIES.map(|n| d.join(n)));
    copies.filter_map(|p| decode_catalog(&std::fs::read(p).ok()?).ok()).max_by_key(|b| b.seq)
}

/// Loads the newest sound catalog copy from `dirs` (see the module docs),
/// rewriting stale or damaged copies and adopting a first-version catalog.
fn load_catalog(dirs: &[PathBuf], node_id: NodeId) -> Result<Stored, NodeError> {
    let mut best: Option<(CatalogBody, PathBuf)> = None;
    let mut sound = Vec::new();
    let mut bad = Vec::new();
    for dir in dirs {
        for name in CATALOG_COPIES {
            let path = dir.join(name);
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    bad.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            match decode_catalog(&bytes) {
                Ok(body) if body.node_id != node_id => {
                    return Err(NodeError::CatalogOfOtherNode {
                        path,
                        its_node: body.node_id,
                        node: node_id,
                    });
                }
                Ok(body) => {
                    sound.push(body.seq);
                    if best.as_ref().is_none_or(|(b, _)| body.seq > b.seq) {
                        best = Some((body, path));
                    }
                }
                Err(why) => {
                    tracing::warn!(path = %path.display(), why, "damaged catalog copy; the newest sound copy is used");
                    bad.push(format!("{}: {why}", path.display()));
                }
            }
        }
    }
    let legacy: Vec<PathBuf> = dirs.iter().map(|d| d.join(LEGACY_CATALOG)).filter(|p| p.exists()).collect();
    let (seq, catalog) = match best {
        Some((body, path)) => {
            let fresh =
                sound.len() == dirs.len() * CATALOG_COPIES.len() && sound.iter().all(|&s| s == body.seq);
            if fresh && legacy.is_empty() {
                return Ok(Stored { seq: body.seq, catalog: body.catalog });
            }
            tracing::info!(from = %path.display(), seq = body.seq, "catalog loaded; rewriting its missing, stale or damaged copies");
            (body.seq, body.catalog)
        }
        None if !bad.is_empty() => return Err(NodeError::NoCatalog(bad.join("; "))),
        None => {
            let mut adopted = Catalog::default();
            for path in &legacy {
                let bytes = std::fs::read(path)
                    .map_err(|source| NodeError::Catalog { path: path.clone(), source })?;
                let c: Catalog = serde_json::from_slice(&bytes)
                    .map_err(|source| NodeError::CatalogCorrupt { path: path.clone(), source })?;
                tracing::info!(path = %path.display(), volumes = c.volumes.len(), "adopting the first-version catalog");
                if c.next_id >= adopted.next_id {
                    adopted = c;
                }
            }
            (0, adopted)
        }
    };
    let body = CatalogBody { format: CATALOG_FORMAT, node_id, seq: seq + 1, catalog };
    write_catalog(dirs, &body)?;
    for path in legacy {
        // Its content is in every copy now (durably): the old file goes.
        std::fs::remove_file(&path)
            .and_then(|()| crate::storage::identity::sync_parent(&path))
            .map_err(|source| NodeError::Catalog { path: path.clone(), source })?;
    }
    Ok(Stored { seq: body.seq, catalog: body.catalog })
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
    #[error("catalog copy {path} belongs to node {its_node}, not to this node ({node})")]
    CatalogOfOtherNode { path: PathBuf, its_node: NodeId, node: NodeId },
    #[error(
        "the data directories {dirs:?} belong to node {dirs_node}, but this node is {node}: give this \
         node its own data directories"
    )]
    DirsOfOtherNode { dirs_node: NodeId, node: NodeId, dirs: Vec<PathBuf> },
    #[error("no sound copy of the volume catalog ({0}); restore one from a backup")]
    NoCatalog(String),
    #[error(
        "extents of volumes no catalog records: {extents}. Another node's data directory, or a catalog \
         lost? Start with every data directory of this node; if these extents are not wanted, move their \
         files out of the data directories"
    )]
    Orphans { extents: String },
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
///
/// A node without data directories (a compute host) has no store: it
/// stores nothing and serves every volume through its replicas on other
/// nodes (as their owner, or forwarding to the owner). That is decided
/// here, once: [`Node::store`] is `None`, its volumes have no local route,
/// and its catalog lives in memory like the mem engine's.
#[derive(Debug)]
pub struct Node {
    id: NodeId,
    store: Option<Arc<Store>>,
    /// The directories holding catalog copies; none on the mem engine: its
    /// volumes, like its data, live in memory.
    catalog_dirs: Vec<PathBuf>,
    catalog: Mutex<Stored>,
    volumes: Mutex<BTreeMap<String, Arc<Volume>>>,
    /// Client payload memory, shared by every frontend connection.
    payload_budget: PayloadBudget,
    /// Where every volume of this node records its metrics.
    metrics: Arc<crate::admin::metrics::Metrics>,
    connections: Arc<Connections>,
    /// Gives each volume opened from now on its route (see [`Node::set_router`]).
    router: RouterSlot,
}

#[derive(Default)]
struct RouterSlot(Mutex<Option<Router>>);

impl std::fmt::Debug for RouterSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.lock().unwrap().is_some() { "RouterSlot(set)" } else { "RouterSlot(none)" })
    }
}

/// Decides where a volume's I/O goes from this node (the daemon's view of
/// the metadata: owner here, elsewhere, or nobody).
pub type Router = Arc<dyn Fn(&VolumeSpec) -> volume::Route + Send + Sync>;

/// A client front end, as the `frontend` metric label spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend {
    Nbd,
    Iscsi,
}

impl Frontend {
    pub const ALL: [Frontend; 2] = [Frontend::Nbd, Frontend::Iscsi];

    pub fn label(self) -> &'static str {
        match self {
            Frontend::Nbd => "nbd",
            Frontend::Iscsi => "iscsi",
        }
    }
}

/// Client connections per front end: open now, and accepted since start.
#[derive(Debug, Default)]
pub struct Connections {
    open: [std::sync::atomic::AtomicU64; 2],
    accepted: [std::sync::atomic::AtomicU64; 2],
}

impl Connections {
    pub fn open(&self, f: Frontend) -> u64 {
        self.open[f as usize].load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn accepted(&self, f: Frontend) -> u64 {
        self.accepted[f as usize].load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One open client connection, counted until dropped.
#[derive(Debug)]
pub struct OpenConnection(Arc<Connections>, Frontend);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open[self.1 as usize].fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
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
        Node::open_as(store_cfg, store_opts, payload_budget, None).await
    }

    /// [`Node::open_with`] for the node `node_id` (as the control plane
    /// knows it): new data directories are stamped with it, and data
    /// directories of any other node are refused.
    pub async fn open_as(
        store_cfg: StoreConfig,
        store_opts: StoreOptions,
        payload_budget: u64,
        node_id: Option<NodeId>,
    ) -> Result<Arc<Node>, NodeError> {
        let catalog_dirs = match store_cfg.engine {
            crate::storage::EngineKind::Mem => Vec::new(),
            _ => store_cfg.data_dirs.clone(),
        };
        let known = node_id.or_else(|| newest_catalog(&catalog_dirs).map(|b| b.node_id));
        let dirs = store_cfg.data_dirs.clone();
        let store = Store::open_as(store_cfg, store_opts, known).await?;
        if let Some(n) = node_id
            && store.node_id() != n
        {
            return Err(NodeError::DirsOfOtherNode { dirs_node: store.node_id(), node: n, dirs });
        }
        let catalog = if catalog_dirs.is_empty() {
            Stored { seq: 0, catalog: Catalog::default() }
        } else {
            let mut stored = load_catalog(&catalog_dirs, store.node_id())?;
            let ids: std::collections::BTreeSet<VolumeId> =
                stored.catalog.volumes.values().map(|v| v.id).collect();
            let orphans: Vec<String> = store
                .extent_keys()
                .into_iter()
                .filter(|k| !ids.contains(&k.volume))
                .map(|k| format!("{k} ({})", store.extent_path(k).unwrap_or_default().display()))
                .collect();
            if !orphans.is_empty() {
                let more = orphans.len().saturating_sub(8);
                let mut extents = orphans[..orphans.len().min(8)].join(", ");
                if more > 0 {
                    extents += &format!(" and {more} more");
                }
                return Err(NodeError::Orphans { extents });
            }
            // Never below an id in use, whatever the file says.
            let top = ids.iter().next_back().map_or(0, |v| v.0);
            stored.catalog.next_id = stored.catalog.next_id.max(top);
            stored
        };
        let node = Node::assemble(store.node_id(), Some(store), catalog_dirs, catalog, payload_budget);
        let specs: Vec<VolumeSpec> = node.catalog.lock().unwrap().catalog.volumes.values().cloned().collect();
        for spec in specs {
            node.volumes.lock().unwrap().insert(spec.name.clone(), node.new_volume(spec));
        }
        Ok(Arc::new(node))
    }

    /// A node that stores nothing (no data directories): node `id`, with a
    /// client payload budget of `payload_budget` bytes. Its volumes are
    /// served only through the routes the daemon sets ([`Node::set_router`]);
    /// until then a request waits for one.
    pub fn open_compute(id: NodeId, payload_budget: u64) -> Arc<Node> {
        let catalog = Stored { seq: 0, catalog: Catalog::default() };
        Arc::new(Node::assemble(id, None, Vec::new(), catalog, payload_budget))
    }

    fn assemble(
        id: NodeId,
        store: Option<Arc<Store>>,
        catalog_dirs: Vec<PathBuf>,
        catalog: Stored,
        payload_budget: u64,
    ) -> Node {
        Node {
            id,
            store,
            catalog_dirs,
            catalog: Mutex::new(catalog),
            volumes: Mutex::new(BTreeMap::new()),
            payload_budget: PayloadBudget::new(payload_budget),
            metrics: Arc::new(crate::admin::metrics::Metrics::new()),
            connections: Arc::default(),
            router: RouterSlot::default(),
        }
    }

    /// The registry this node's volumes record into (`/metrics`).
    pub fn metrics(&self) -> &Arc<crate::admin::metrics::Metrics> {
        &self.metrics
    }

    /// Client connections per front end.
    pub fn connections(&self) -> &Connections {
        &self.connections
    }

    /// Counts a client connection of `f` until the guard is dropped.
    pub fn open_connection(&self, f: Frontend) -> OpenConnection {
        use std::sync::atomic::Ordering::Relaxed;
        self.connections.open[f as usize].fetch_add(1, Relaxed);
        self.connections.accepted[f as usize].fetch_add(1, Relaxed);
        OpenConnection(self.connections.clone(), f)
    }

    fn new_volume(&self, spec: VolumeSpec) -> Arc<Volume> {
        let m = self.metrics.volume(&spec.name);
        let route = self.router.0.lock().unwrap().as_ref().map(|r| r(&spec));
        let v = Volume::new(spec, self.store.clone(), m);
        if let Some(route) = route {
            v.set_route(route);
        }
        v
    }

    /// Every volume opened from now on, and every one open now, takes its
    /// route from `router`; call [`Node::reroute`] when the answer changes.
    pub fn set_router(&self, router: Router) {
        *self.router.0.lock().unwrap() = Some(router);
        self.reroute();
    }

    /// Asks the router again for every open volume.
    pub fn reroute(&self) {
        let Some(r) = self.router.0.lock().unwrap().clone() else { return };
        for v in self.volumes() {
            v.set_route(r(v.spec()));
        }
    }

    /// The node-wide cap on client payload memory (READ and WRITE data in
    /// flight over all connections), [`DEFAULT_PAYLOAD_BUDGET`].
    pub fn payload_budget(&self) -> &PayloadBudget {
        &self.payload_budget
    }

    /// The local store; `None` on a node without data directories.
    pub fn store(&self) -> Option<&Arc<Store>> {
        self.store.as_ref()
    }

    /// This node's id: from its data directories (see `storage::identity`),
    /// or as given to [`Node::open_compute`].
    pub fn node_id(&self) -> NodeId {
        self.id
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
        if opts.size == 0 || !opts.size.is_multiple_of(4096) {
            return Err(NodeError::BadSize(opts.size));
        }
        let mut stored = self.catalog.lock().unwrap();
        let Stored { seq, catalog: cat } = &mut *stored;
        if cat.volumes.contains_key(name) {
            return Err(NodeError::Exists(name.to_string()));
        }
        // Spent even if the write below fails: a copy may hold it already.
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
        if !self.catalog_dirs.is_empty() {
            *seq += 1;
            let body = CatalogBody {
                format: CATALOG_FORMAT,
                node_id: self.node_id(),
                seq: *seq,
                catalog: cat.clone(),
            };
            if let Err(e) = write_catalog(&self.catalog_dirs, &body) {
                cat.volumes.remove(name);
                return Err(e);
            }
        }
        let vol = self.new_volume(spec);
        self.volumes.lock().unwrap().insert(name.to_string(), vol.clone());
        Ok(vol)
    }

    /// Flushes every volume's local replicas (nothing to do without a store).
    pub async fn flush_all(&self) -> Result<(), StoreError> {
        match &self.store {
            Some(s) => s.flush_all().await,
            None => Ok(()),
        }
    }

    /// The last step of a clean shutdown: flushes every extent and marks it
    /// clean on disk, so the next start verifies every checksum it reads
    /// instead of forgiving blocks a crash may have torn.
    pub async fn close(&self) -> Result<(), StoreError> {
        match &self.store {
            Some(s) => s.close().await,
            None => Ok(()),
        }
    }
}
