//! safetensors files: `SafeTensors::open` (header validation), `bytes`, `read_f32`, `Checkpoint::open_file`,
//! and a write/read round trip of what was read; with the first byte odd, the rest is instead a
//! `model.safetensors.index.json` over fixed shards (`Checkpoint::open_index`, shard path checks).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use hf::{Checkpoint, Dtype, SafeTensors};
use libfuzzer_sys::fuzz_target;

/// Checks everything a successfully opened file promises.
fn check_file(st: &SafeTensors, file_len: usize) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let tensors = st.tensors();
    assert!(tensors.windows(2).all(|w| w[0].name < w[1].name), "tensors not sorted by name, or repeated");
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    let mut floats = Vec::new();
    for t in tensors {
        assert!(t.start <= t.end && t.end <= file_len, "{}: range {}..{} outside the file", t.name, t.start, t.end);
        let n: usize = t.shape.iter().product();
        assert_eq!(t.end - t.start, n * t.dtype.size(), "{}: byte range does not match shape", t.name);
        assert_eq!(st.info(&t.name), Some(t));
        let bytes = st.bytes(&t.name).expect("bytes of a listed tensor");
        assert_eq!(bytes.len(), t.end - t.start);
        if t.end > t.start {
            ranges.push((t.start, t.end));
        }
        match (t.dtype, st.read_f32(&t.name)) {
            (Dtype::Other(..), Ok(_)) => panic!("{}: a non-float dtype read as f32", t.name),
            (Dtype::Other(name, _), Err(e)) => {
                let m = e.to_string();
                assert!(m.contains(&t.name) && m.contains(name), "{m}");
            }
            (_, Err(e)) => panic!("{}: a float tensor does not read: {e}", t.name),
            (dtype, Ok(x)) => {
                assert_eq!(x.shape, t.shape);
                assert_eq!(x.data.len(), n, "{}: {} values for shape {:?}", t.name, x.data.len(), t.shape);
                if dtype == Dtype::F32 {
                    let raw: Vec<u8> = x.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                    assert_eq!(raw, bytes, "{}: F32 values are not the stored bytes", t.name);
                }
                floats.push((t.name.clone(), t.shape.clone(), x.data));
            }
        }
    }
    ranges.sort_unstable();
    assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0), "tensor byte ranges overlap: {ranges:?}");
    assert!(st.bytes("\u{0}no such tensor").is_err() || st.info("\u{0}no such tensor").is_some());
    floats
}

fn single(bytes: &[u8]) {
    let path = dpo_fuzz::scratch_file("x.safetensors", bytes);
    let st = match SafeTensors::open(&path) {
        Ok(st) => st,
        Err(e) => {
            let m = e.to_string();
            assert!(m.contains("x.safetensors"), "error does not name the file: {m}");
            assert!(Checkpoint::open_file(&path).is_err());
            return;
        }
    };
    let floats = check_file(&st, bytes.len());
    let ck = Checkpoint::open_file(&path).expect("Checkpoint::open_file of a file SafeTensors opens");
    let names: Vec<&str> = st.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(ck.names(), names);

    // What was read, written as F32 and read back, is bit-identical.
    let out = hf::safetensors::serialize_f32(&floats).expect("serialize what was read");
    let back_path = dpo_fuzz::scratch_file("back.safetensors", &out);
    let back = SafeTensors::open(&back_path).expect("reopen a written file");
    assert_eq!(back.tensors().len(), floats.len());
    for (name, shape, data) in &floats {
        let x = back.read_f32(name).expect("read back");
        assert_eq!(&x.shape, shape);
        assert!(x.data.iter().zip(data).all(|(a, b)| a.to_bits() == b.to_bits()), "{name}: round trip changed values");
    }
}

/// A model directory with three shards, and a fourth file beside the directory that no index may reach.
static MODEL_DIR: LazyLock<PathBuf> = LazyLock::new(|| {
    let root = dpo_fuzz::scratch_dir();
    let dir = root.join("model");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let t = |name: &str, n: usize| (name.to_string(), vec![n], (0..n).map(|i| i as f32).collect::<Vec<f32>>());
    let write =
        |path: PathBuf, ts: Vec<(String, Vec<usize>, Vec<f32>)>| hf::safetensors::write_f32(&path, &ts).unwrap();
    write(dir.join("a.safetensors"), vec![t("a", 2), t("x", 1)]);
    write(dir.join("b.safetensors"), vec![t("b", 3)]);
    write(dir.join("sub/c.safetensors"), vec![t("c", 1)]);
    write(root.join("outside.safetensors"), vec![t("o", 1)]);
    dir
});

fn index(bytes: &[u8]) {
    let dir: &Path = &MODEL_DIR;
    let path = dir.join("model.safetensors.index.json");
    std::fs::write(&path, bytes).unwrap();
    match Checkpoint::open_index(&path) {
        Ok(ck) => {
            let canon_dir = dir.canonicalize().unwrap();
            for name in ck.names() {
                let file = ck.file_of(name).expect("file of a listed tensor");
                let canon = file.canonicalize().unwrap();
                assert!(
                    canon.starts_with(&canon_dir),
                    "tensor `{name}` read from {} outside the model directory",
                    file.display()
                );
                let info = ck.info(name).expect("info of a listed tensor");
                let x = ck.read_f32(name).expect("read a listed F32 tensor");
                assert_eq!(x.data.len(), info.shape.iter().product::<usize>());
            }
        }
        Err(e) => {
            let m = e.to_string();
            assert!(m.contains(&dir.display().to_string()), "error does not name the index or shard: {m}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode & 1 == 0 {
        single(rest);
    } else {
        index(rest);
    }
});
