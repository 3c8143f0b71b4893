//! Following the metadata: which volumes this node keeps a local record of
//! (its catalog copies, so a restart recognises every extent it holds),
//! which it serves, and which were deleted, and the size of each it serves.

use super::{CATALOG_FORMAT, CatalogBody, Node, NodeError, VolumeSpec, write_catalog};
use crate::types::VolumeId;
use std::collections::BTreeSet;

impl Node {
    /// The volumes of the local catalog.
    pub fn catalog_specs(&self) -> Vec<VolumeSpec> {
        self.catalog.lock().unwrap().catalog.volumes.values().cloned().collect()
    }

    /// Brings the node in step with the metadata. `all` is every volume
    /// the metadata has; `owned` the ids this node serves; volume ids
    /// below `next_id` that the metadata no longer has were deleted, and
    /// their replicas here are removed. Local records of volumes the
    /// metadata never had (ids from `next_id` up) are kept, untouched: the
    /// daemon refuses to start over those before it gets here.
    ///
    /// A served volume whose size differs from the metadata's is resized
    /// (`Volume::resize`) before its catalog record takes the new size, so
    /// a resize cut short by a crash is done again after the restart.
    ///
    /// Returns the names no longer served.
    pub async fn sync_catalog(
        &self,
        all: &[VolumeSpec],
        owned: &BTreeSet<VolumeId>,
        next_id: VolumeId,
    ) -> Result<Vec<String>, NodeError> {
        let known: BTreeSet<VolumeId> = all.iter().map(|v| v.id).collect();
        // Stop serving first, so no new I/O reaches what is deleted below.
        let (removed, resize) = {
            let mut vols = self.volumes.lock().unwrap();
            let mut removed = Vec::new();
            let mut resize = Vec::new();
            vols.retain(|name, v| {
                let keep = owned.contains(&v.spec().id)
                    && all.iter().any(|s| s.id == v.spec().id && s.name == *name);
                if !keep {
                    removed.push(name.clone());
                }
                keep
            });
            for s in all.iter().filter(|s| owned.contains(&s.id)) {
                match vols.get(&s.name) {
                    Some(v) if v.size() != s.size => resize.push((v.clone(), s.size)),
                    Some(_) => {}
                    None => {
                        tracing::info!(volume = %s.name, id = %s.id, "serving volume");
                        vols.insert(s.name.clone(), self.new_volume(s.clone()));
                    }
                }
            }
            (removed, resize)
        };
        for name in &removed {
            tracing::info!(volume = %name, "no longer serving volume");
        }
        let mut unresized = BTreeSet::new();
        for (vol, size) in resize {
            tracing::info!(volume = %vol.name(), from = vol.size(), to = size, "resizing volume");
            if let Err(e) = vol.resize(size).await {
                tracing::error!(volume = %vol.name(), size, error = %crate::units::error_chain(&e),
                    "resize failed; it is tried again at the next metadata change or restart");
                unresized.insert(vol.spec().id);
            }
        }
        let local = self.catalog_specs();
        let deleted: Vec<&VolumeSpec> =
            local.iter().filter(|v| v.id < next_id && !known.contains(&v.id)).collect();
        let mut dropped = BTreeSet::new();
        for v in deleted {
            // Without a store there is nothing here to remove.
            let left = match &self.store {
                Some(s) => s.remove_volume(v.id).await?,
                None => 0,
            };
            if left == 0 {
                dropped.insert(v.id);
            } else {
                tracing::warn!(volume = %v.name, id = %v.id, left,
                    "deleted volume keeps unreadable replicas here; its catalog record stays until they are removed");
            }
        }
        // The local catalog: what it had, less what was deleted, plus what
        // this node owns now.
        let mut stored = self.catalog.lock().unwrap();
        let mut cat = stored.catalog.clone();
        cat.volumes.retain(|_, v| !dropped.contains(&v.id));
        for s in all.iter().filter(|s| owned.contains(&s.id) && !unresized.contains(&s.id)) {
            cat.volumes.insert(s.name.clone(), s.clone());
        }
        cat.next_id = cat.next_id.max(next_id.0.saturating_sub(1));
        if cat != stored.catalog && !self.catalog_dirs.is_empty() {
            let body = CatalogBody {
                format: CATALOG_FORMAT,
                node_id: self.node_id(),
                seq: stored.seq + 1,
                catalog: cat,
            };
            write_catalog(&self.catalog_dirs, &body)?;
            stored.seq = body.seq;
            stored.catalog = body.catalog;
        } else {
            stored.catalog = cat;
        }
        Ok(removed)
    }
}
