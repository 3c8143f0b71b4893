//! The NBD codec is sans-IO: no tokio, no sockets, no files, no clock.

#[test]
fn nbd_codec_does_no_io() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/proto/nbd");
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for banned in ["tokio", "std::net", "std::fs", "Instant::now", "SystemTime", "std::thread"] {
            assert!(!text.contains(banned), "{} uses {banned}", path.display());
        }
        files += 1;
    }
    assert!(files >= 3, "expected the codec files in {}", dir.display());
}
