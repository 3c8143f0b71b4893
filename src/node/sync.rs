//! Following the metadata: the set of volumes this node serves is the set
//! the metadata says it owns.

use super::{Node, Volume, VolumeSpec};

impl Node {
    /// Serves exactly `specs` (the volumes the metadata says this node
    /// owns) from now on. Returns the names no longer served.
    pub fn sync_catalog(&self, specs: &[VolumeSpec]) -> Vec<String> {
        let mut vols = self.volumes.lock().unwrap();
        let mut removed = Vec::new();
        vols.retain(|name, v| {
            let keep = specs.iter().any(|s| s.name == *name && s.id == v.spec().id);
            if !keep {
                removed.push(name.clone());
            }
            keep
        });
        for s in specs {
            if !vols.contains_key(&s.name) {
                tracing::info!(volume = %s.name, id = %s.id, "serving volume");
                vols.insert(s.name.clone(), Volume::new(s.clone(), self.store.clone()));
            }
        }
        for name in &removed {
            tracing::info!(volume = %name, "no longer serving volume");
        }
        removed
    }
}
