//! Which node a data directory belongs to: its identity file.
//!
//! Owns: `basalt-dir.json` in every data directory (and its twin
//! `basalt-dir.json.bak`), the node id they carry, and the rules that let a
//! node recognise its directories whatever their order on the command line.
//! Must never: stamp a directory that holds another node's data, or hand
//! out a second node id for one node.
//!
//! # The file
//! ```text
//! {"format":1,"node_id":1234,"dir_id":5678,"cluster_id":null,"crc32c":91011}
//! ```
//! `crc32c` is over the JSON of the other fields exactly as this module
//! writes them (serde_json, field order as listed), so rot in a value is
//! caught even where it still parses. Both copies are written once, when
//! the directory is stamped (each atomically: temporary file, fsync,
//! rename, fsync of the directory); a rotten copy is rewritten from the
//! sound one, and a directory with both copies bad is re-stamped with the
//! node id its sibling directories agree on, or, if none has a sound one,
//! the one the node's newest sound catalog copy names.
//!
//! # The rules at open
//! - No directory has an identity: a new node (or one of a version without
//!   identities). A random node id is drawn and every directory stamped.
//! - Otherwise all identities must name one node: a directory of another
//!   node is refused, naming it, and so is one directory given twice (same
//!   dir id). A directory without one is stamped only if it holds no
//!   extent or catalog files (a new, empty disk); one with data but no
//!   identity is refused: its data is no known node's.

use super::{Result, StoreError};
use crate::types::NodeId;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const IDENTITY_FILE: &str = "basalt-dir.json";
const IDENTITY_BACKUP: &str = "basalt-dir.json.bak";
pub const IDENTITY_FORMAT: u32 = 1;

/// One data directory's id, drawn when it is stamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DirId(pub u64);

impl std::fmt::Display for DirId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "d{:016x}", self.0)
    }
}

/// What a data directory's identity file says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirIdentity {
    pub format: u32,
    pub node_id: NodeId,
    pub dir_id: DirId,
    /// The cluster the node belongs to, once the control plane has one.
    #[serde(default)]
    pub cluster_id: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct Stamped {
    #[serde(flatten)]
    identity: DirIdentity,
    crc32c: u32,
}

fn crc_of(id: &DirIdentity) -> u32 {
    crc32c::crc32c(&serde_json::to_vec(id).expect("plain struct"))
}

fn encode(id: &DirIdentity) -> Vec<u8> {
    let mut v =
        serde_json::to_vec(&Stamped { identity: id.clone(), crc32c: crc_of(id) }).expect("plain struct");
    v.push(b'\n');
    v
}

fn decode(bytes: &[u8]) -> std::result::Result<DirIdentity, String> {
    let s: Stamped = serde_json::from_slice(bytes).map_err(|e| format!("does not parse: {e}"))?;
    let crc = crc_of(&s.identity);
    if crc != s.crc32c {
        return Err(format!("crc mismatch: stored {:#010x}, computed {crc:#010x}", s.crc32c));
    }
    if s.identity.format != IDENTITY_FORMAT {
        return Err(format!("unsupported identity format {}", s.identity.format));
    }
    Ok(s.identity)
}

/// 64 random bits from the kernel, never zero.
pub fn random_u64() -> Result<u64> {
    use std::io::Read;
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| StoreError::io("read /dev/urandom", e))?;
    Ok(u64::from_le_bytes(b).max(1))
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new
/// file, never a torn one: temporary file, fsync, rename, fsync of the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_parent(path)
}

/// fsync of the directory holding `path` (`.` for a bare name).
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)?.sync_all()
}

/// Creates `dir` and any missing parents; each directory created has its
/// entry made durable (fsync of its parent), so a crash cannot lose a
/// directory that extent files were then created in.
pub fn create_dir_durably(dir: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut p = dir;
    while !p.exists() {
        missing.push(p.to_path_buf());
        match p.parent() {
            Some(q) if !q.as_os_str().is_empty() => p = q,
            _ => break,
        }
    }
    std::fs::create_dir_all(dir)?;
    for m in missing.iter().rev() {
        sync_parent(m)?;
    }
    Ok(())
}

/// What one directory's identity files hold.
#[derive(Debug)]
enum Found {
    /// Neither copy exists; `pending` is a sound identity still under its
    /// temporary name (a first stamping of several directories that
    /// stopped half way: see [`stamp_all`]).
    None { pending: Option<DirIdentity> },
    /// At least one sound copy (and whether the other needs a rewrite).
    Sound { id: DirIdentity, repair: bool },
    /// Copies exist but none is sound: why, per file.
    Bad(String),
}

fn read_dir_identity(dir: &Path) -> Found {
    let mut sound = None;
    let mut problems = Vec::new();
    let mut missing = 0;
    for name in [IDENTITY_FILE, IDENTITY_BACKUP] {
        let path = dir.join(name);
        match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing += 1,
            Err(e) => problems.push(format!("{}: {e}", path.display())),
            Ok(bytes) => match decode(&bytes) {
                Ok(id) => match &sound {
                    Some(s) if *s != id => {
                        problems.push(format!("{}: differs from its twin", path.display()))
                    }
                    _ => sound = Some(id),
                },
                Err(why) => problems.push(format!("{}: {why}", path.display())),
            },
        }
    }
    match sound {
        Some(id) => Found::Sound { id, repair: missing > 0 || !problems.is_empty() },
        None if missing == 2 => {
            let pending = std::fs::read(pending_path(dir)).ok().and_then(|b| decode(&b).ok());
            Found::None { pending }
        }
        None => Found::Bad(problems.join("; ")),
    }
}

fn pending_path(dir: &Path) -> PathBuf {
    dir.join(format!("{IDENTITY_FILE}.tmp"))
}

/// Stamps several new directories of one node so that a crash half way
/// never leaves some stamped and others, holding data, not: every
/// identity is first made durable under its temporary name, and only then
/// are they renamed into place. A start after a crash in the first phase
/// finds no identity anywhere and begins again; one after a crash in the
/// second finds the missing ones pending, naming the node, and completes them.
fn stamp_all(dirs: &[(&Path, DirIdentity)]) -> Result<()> {
    let io = |what: &str, p: &Path, e| StoreError::io(format!("{what} {}", p.display()), e);
    for (dir, id) in dirs {
        let tmp = pending_path(dir);
        std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&encode(id)).and_then(|()| f.sync_all()))
            .and_then(|()| sync_parent(&tmp))
            .map_err(|e| io("write", &tmp, e))?;
    }
    for (dir, id) in dirs {
        finish_pending(dir, id)?;
    }
    Ok(())
}

/// Renames a pending identity into place and writes its twin.
fn finish_pending(dir: &Path, id: &DirIdentity) -> Result<()> {
    let (tmp, path) = (pending_path(dir), dir.join(IDENTITY_FILE));
    std::fs::rename(&tmp, &path)
        .and_then(|()| sync_parent(&path))
        .map_err(|e| StoreError::io(format!("rename {}", tmp.display()), e))?;
    let bak = dir.join(IDENTITY_BACKUP);
    write_atomically(&bak, &encode(id)).map_err(|e| StoreError::io(format!("write {}", bak.display()), e))
}

fn stamp(dir: &Path, id: &DirIdentity) -> Result<()> {
    let bytes = encode(id);
    for name in [IDENTITY_FILE, IDENTITY_BACKUP] {
        let path = dir.join(name);
        write_atomically(&path, &bytes)
            .map_err(|e| StoreError::io(format!("write {}", path.display()), e))?;
    }
    Ok(())
}

/// Files in `dir` that hold data or a catalog: a directory with any of
/// them is not new.
fn holds_data(dir: &Path) -> Result<Option<String>> {
    let names = super::engine::real::list_dir(dir)
        .map_err(|e| StoreError::io(format!("list {}", dir.display()), e))?;
    let data: Vec<String> = names
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".ext") || n == "volumes.json" || n.starts_with("catalog"))
        .collect();
    Ok((!data.is_empty()).then(|| {
        let more = if data.len() > 3 { format!(" and {} more", data.len() - 3) } else { String::new() };
        format!("{}{more}", data[..data.len().min(3)].join(", "))
    }))
}

/// Reads, checks and completes the identities of a node's data
/// directories (see the module docs); returns each directory's identity,
/// in the order given. `known` is the node id the node's other records
/// (its catalog) name, if any: used only when no identity file is sound,
/// so that a node that lost them keeps its id.
pub fn recognise(dirs: &[PathBuf], known: Option<NodeId>) -> Result<Vec<DirIdentity>> {
    // One directory under two names would otherwise be stamped twice when new.
    let mut real: Vec<PathBuf> = Vec::with_capacity(dirs.len());
    for dir in dirs {
        let r = dir.canonicalize().map_err(|e| StoreError::io(format!("resolve {}", dir.display()), e))?;
        if let Some(j) = real.iter().position(|x| *x == r) {
            return Err(StoreError::SameDir { a: dirs[j].clone(), b: dir.clone() });
        }
        real.push(r);
    }
    let found: Vec<Found> = dirs.iter().map(|d| read_dir_identity(d)).collect();
    // The node: the one all sound identities name.
    let mut node: Option<(NodeId, &Path)> = None;
    for (dir, f) in dirs.iter().zip(&found) {
        if let Found::Sound { id, .. } = f {
            match node {
                None => node = Some((id.node_id, dir)),
                Some((n, first)) if n != id.node_id => {
                    return Err(StoreError::ForeignDir {
                        dir: dir.clone(),
                        its_node: id.node_id,
                        node: n,
                        node_dir: first.to_path_buf(),
                    });
                }
                Some(_) => {}
            }
        }
    }
    let any_identity = node.is_some() || found.iter().any(|f| matches!(f, Found::Bad(_)));
    let node_id = match (node, known) {
        (Some((n, _)), _) => n,
        (None, Some(n)) => {
            tracing::warn!(node = %n, "no sound identity file; taking the node id from the catalog");
            n
        }
        (None, None) if any_identity => {
            // Every identity there is is rotten: nothing to take the node id from.
            let (dir, why) = dirs
                .iter()
                .zip(&found)
                .find_map(|(d, f)| if let Found::Bad(w) = f { Some((d, w)) } else { None })
                .expect("some identity is bad");
            return Err(StoreError::BadIdentity { dir: dir.clone(), why: why.clone() });
        }
        (None, None) => NodeId(random_u64()?),
    };
    if !any_identity {
        // A new node (or one from before identities): every directory at once.
        let mut ids = Vec::with_capacity(dirs.len());
        for dir in dirs {
            let id = DirIdentity {
                format: IDENTITY_FORMAT,
                node_id,
                dir_id: DirId(random_u64()?),
                cluster_id: None,
            };
            tracing::info!(dir = %dir.display(), node = %node_id, dir_id = %id.dir_id, "stamping data directory");
            ids.push((dir.as_path(), id));
        }
        stamp_all(&ids)?;
        return Ok(ids.into_iter().map(|(_, id)| id).collect());
    }
    let mut out = Vec::with_capacity(dirs.len());
    for (dir, f) in dirs.iter().zip(found) {
        let id = match f {
            Found::Sound { id, repair } => {
                if repair {
                    tracing::warn!(dir = %dir.display(), "identity file missing or damaged; rewriting it from its twin");
                    stamp(dir, &id)?;
                }
                id
            }
            Found::Bad(why) => {
                // The other directories name the node; a directory whose
                // both copies rotted is re-stamped as theirs.
                tracing::warn!(dir = %dir.display(), why, node = %node_id,
                    "both identity copies damaged; re-stamping with the node id the other data directories agree on");
                let id = DirIdentity {
                    format: IDENTITY_FORMAT,
                    node_id,
                    dir_id: DirId(random_u64()?),
                    cluster_id: None,
                };
                stamp(dir, &id)?;
                id
            }
            Found::None { pending: Some(id) } if id.node_id == node_id => {
                tracing::info!(dir = %dir.display(), node = %node_id, "completing the stamping of a data directory");
                finish_pending(dir, &id)?;
                id
            }
            Found::None { .. } => {
                if let Some(files) = holds_data(dir)? {
                    return Err(StoreError::UnknownDir { dir: dir.clone(), files });
                }
                let id = DirIdentity {
                    format: IDENTITY_FORMAT,
                    node_id,
                    dir_id: DirId(random_u64()?),
                    cluster_id: None,
                };
                tracing::info!(dir = %dir.display(), node = %node_id, dir_id = %id.dir_id, "stamping data directory");
                stamp(dir, &id)?;
                id
            }
        };
        if let Some((j, _)) =
            out.iter().enumerate().find(|(_, o): &(usize, &DirIdentity)| o.dir_id == id.dir_id)
        {
            return Err(StoreError::SameDir { a: dirs[j].clone(), b: dir.clone() });
        }
        out.push(id);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trip_and_rot() {
        let id = DirIdentity { format: 1, node_id: NodeId(42), dir_id: DirId(7), cluster_id: None };
        let bytes = encode(&id);
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            format!(
                "{{\"format\":1,\"node_id\":42,\"dir_id\":7,\"cluster_id\":null,\"crc32c\":{}}}\n",
                crc_of(&id)
            )
        );
        assert_eq!(decode(&bytes), Ok(id.clone()));
        // A digit that rots into another digit still parses: the crc catches it.
        let rotten = String::from_utf8(bytes.clone()).unwrap().replace("\"node_id\":42", "\"node_id\":43");
        assert!(decode(rotten.as_bytes()).unwrap_err().contains("crc mismatch"));
        assert!(decode(b"{\"format\":1").unwrap_err().contains("does not parse"));
        // A file written before cluster ids existed still reads.
        let old = format!("{{\"format\":1,\"node_id\":42,\"dir_id\":7,\"crc32c\":{}}}", crc_of(&id));
        assert_eq!(decode(old.as_bytes()), Ok(id));
    }
}
