//! Fingerprints of what a run reads, recorded when it starts and compared when it is resumed: a resumed
//! run must read the inputs its checkpoints were written from, or it would be neither run.
//!
//! One hash (FNV-1a over 32-bit words, no dependency) serves tensors and token ids as loaded
//! ([`fingerprint`], PPO's inputs) and files as they are on disk ([`fingerprint_path`], `dpo train`'s).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use engine::Tensor;

/// What a run reads, named (`starting policy`, `reward model`, `data`, ...), each with its fingerprint.
pub type InputFingerprints = BTreeMap<String, String>;

/// FNV-1a over 32-bit words.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn word(&mut self, w: u32) {
        self.0 ^= w as u64;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }

    /// The length, then the bytes as little-endian words (the last one padded with zeros).
    fn bytes(&mut self, b: &[u8]) {
        self.len(b.len() as u64);
        self.chunk(b);
    }

    fn len(&mut self, n: u64) {
        self.word(n as u32);
        self.word((n >> 32) as u32);
    }

    fn chunk(&mut self, b: &[u8]) {
        let mut words = b.chunks_exact(4);
        for w in &mut words {
            self.word(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 4];
            w[..rest.len()].copy_from_slice(rest);
            self.word(u32::from_le_bytes(w));
        }
    }

    fn finish(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// A fingerprint of tensors (names, shapes and every value's bits) and token ids: equal inputs give equal
/// fingerprints, and a resumed run compares them with those its checkpoint recorded.
pub fn fingerprint<'t>(tensors: impl IntoIterator<Item = (String, &'t Tensor)>, ids: &[Vec<u32>]) -> String {
    let mut h = Fnv::new();
    for (name, t) in tensors {
        name.bytes().for_each(|b| h.word(b as u32));
        t.shape.iter().for_each(|&d| h.word(d as u32));
        t.data.iter().for_each(|v| h.word(v.to_bits()));
    }
    for row in ids {
        h.word(row.len() as u32);
        row.iter().for_each(|&t| h.word(t));
    }
    h.finish()
}

/// A fingerprint of a file's bytes or of a directory's files (names and bytes, in name order; hidden
/// entries left out). A model or adapter directory's own files count, not its subdirectories (`onnx/`
/// and the like are not read); a data directory (a dataset's shards) counts all of them.
pub fn fingerprint_path(path: &Path, recurse: bool) -> std::io::Result<String> {
    let mut h = Fnv::new();
    if path.is_dir() {
        let mut files = Vec::new();
        list_files(path, Path::new(""), recurse, &mut files)?;
        for rel in files {
            h.bytes(rel.to_string_lossy().as_bytes());
            file(&mut h, &path.join(rel))?;
        }
    } else {
        file(&mut h, path)?;
    }
    Ok(h.finish())
}

/// A fingerprint of the files a data pattern names (`train-*.parquet`, its shards in order): names and
/// bytes, as [`fingerprint_path`] takes a directory's.
pub fn fingerprint_files(files: &[PathBuf]) -> std::io::Result<String> {
    let mut h = Fnv::new();
    for f in files {
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        h.bytes(name.as_bytes());
        file(&mut h, f)?;
    }
    Ok(h.finish())
}

/// Feeds a file's length and bytes, read in blocks (a model's weights are never held twice).
fn file(h: &mut Fnv, path: &Path) -> std::io::Result<()> {
    let mut f = std::fs::File::open(path)?;
    h.len(f.metadata()?.len());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        // Whole words per block but the last: `chunk` pads only the file's end.
        let mut filled = 0;
        while filled < buf.len() {
            match f.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        h.chunk(&buf[..filled]);
        if filled < buf.len() {
            return Ok(());
        }
    }
}

fn list_files(root: &Path, rel: &Path, recurse: bool, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(root.join(rel))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let p = rel.join(e.file_name());
        // Followed, as the readers follow them: a hub snapshot's files are links to its blobs.
        let meta = std::fs::metadata(e.path())?;
        if meta.is_file() {
            out.push(p);
        } else if meta.is_dir() && recurse {
            list_files(root, &p, recurse, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_edited_in_place_changes_its_fingerprint() {
        let dir = std::env::temp_dir().join(format!("dpo-fingerprint-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let f = dir.join("a.jsonl");
        std::fs::write(&f, b"{\"x\": 1}\n").unwrap();
        let a = fingerprint_path(&f, false).unwrap();
        assert_eq!(a, fingerprint_path(&f, false).unwrap());
        std::fs::write(&f, b"{\"x\": 2}\n").unwrap();
        assert_ne!(a, fingerprint_path(&f, false).unwrap());
        // A directory: its files' names and bytes; a subdirectory only when recursing.
        let top = fingerprint_path(&dir, false).unwrap();
        let all = fingerprint_path(&dir, true).unwrap();
        std::fs::write(dir.join("sub/b"), b"b").unwrap();
        std::fs::write(dir.join(".hidden"), b"h").unwrap();
        assert_eq!(top, fingerprint_path(&dir, false).unwrap());
        assert_ne!(all, fingerprint_path(&dir, true).unwrap());
        std::fs::rename(&f, dir.join("c.jsonl")).unwrap();
        assert_ne!(top, fingerprint_path(&dir, false).unwrap());
        // A block boundary pads nothing but the end: 1 MiB + 1 byte differs from 1 MiB + a zero byte.
        let big = dir.join("big");
        std::fs::write(&big, vec![0u8; (1 << 20) + 1]).unwrap();
        let one = fingerprint_path(&big, false).unwrap();
        std::fs::write(&big, vec![0u8; (1 << 20) + 2]).unwrap();
        assert_ne!(one, fingerprint_path(&big, false).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
