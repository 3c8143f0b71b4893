//! Keeps the pure modules pure: protocol codecs, layout math and the store's
//! on-disk format do no I/O and read no clock, so they can be driven by
//! byte arrays, property tests and (later) the deterministic simulator.

use std::path::{Path, PathBuf};

const PURE: &[&str] = &[
    "src/proto",
    "src/proto/peer",
    "src/layout",
    "src/placement",
    "src/types.rs",
    "src/units.rs",
    "src/storage/format.rs",
    "src/meta/state.rs",
    "src/replication",
];
const FORBIDDEN: &[&str] =
    &["tokio::", "std::net", "std::fs", "std::time::Instant", "SystemTime::now", "thread_rng", "std::thread"];

fn rust_files(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            rust_files(&e.unwrap().path(), out);
        }
    } else if p.is_file() && p.extension().is_some_and(|e| e == "rs") {
        out.push(p.to_path_buf());
    }
}

#[test]
fn pure_modules_do_no_io() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for p in PURE {
        rust_files(&root.join(p), &mut files);
    }
    assert!(files.len() >= 4, "pure module list is stale: found {files:?}");
    let mut bad = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        // Tests inside a pure module may use what they like.
        let code = text.split("#[cfg(test)]").next().unwrap();
        for word in FORBIDDEN {
            if code.contains(word) {
                bad.push(format!("{} uses {word}", f.strip_prefix(root).unwrap().display()));
            }
        }
    }
    assert!(bad.is_empty(), "pure modules must not do I/O or read clocks:\n{}", bad.join("\n"));
}
