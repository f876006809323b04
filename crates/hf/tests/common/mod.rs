#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub const PARITY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/parity");

pub fn parity(rel: &str) -> PathBuf {
    Path::new(PARITY).join(rel)
}

/// A fresh, empty directory under the system temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("dpo-hf-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies every file of `src` (one level) into `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

pub const MORE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/more");

/// A path inside the fixtures of the families added as naming-table rows.
pub fn more(rel: &str) -> PathBuf {
    Path::new(MORE).join(rel)
}
