//! The safetensors format, read and written by hand: an 8-byte little-endian header length, a JSON header
//! `{name: {dtype, shape, data_offsets: [start, end]}, "__metadata__": {..}}`, then the data section that
//! the offsets index into. Reading memory-maps the file and validates the whole header before any tensor
//! is touched; floating-point tensors (F64, F32, F16, BF16) are converted to f32.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use memmap2::Mmap;
use serde_json::Value;

use crate::error::{read_json, Error, Result};

/// Element type of a stored tensor. Only the floating-point ones can be read as f32; the rest are known
/// so that a checkpoint holding an integer buffer (ignored by the model) still opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    /// Any other dtype of the format (`I64`, `U8`, `BOOL`, `F8_E4M3`, ...): its name and byte size.
    Other(&'static str, usize),
}

impl Dtype {
    fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "F64" => Dtype::F64,
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I64" => Dtype::Other("I64", 8),
            "U64" => Dtype::Other("U64", 8),
            "I32" => Dtype::Other("I32", 4),
            "U32" => Dtype::Other("U32", 4),
            "I16" => Dtype::Other("I16", 2),
            "U16" => Dtype::Other("U16", 2),
            "I8" => Dtype::Other("I8", 1),
            "U8" => Dtype::Other("U8", 1),
            "BOOL" => Dtype::Other("BOOL", 1),
            "F8_E4M3" => Dtype::Other("F8_E4M3", 1),
            "F8_E5M2" => Dtype::Other("F8_E5M2", 1),
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::F64 => 8,
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::Other(_, n) => n,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F64 => "F64",
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::Other(n, _) => n,
        }
    }
}

/// One header entry, validated: `start..end` lies inside the data section and has the right length.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range relative to the start of the data section.
    pub start: usize,
    pub end: usize,
}

/// An opened, validated safetensors file.
pub struct SafeTensors {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    /// Sorted by name.
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    metadata: Option<Value>,
}

impl std::fmt::Debug for SafeTensors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafeTensors").field("path", &self.path).field("tensors", &self.tensors.len()).finish()
    }
}

impl SafeTensors {
    /// Opens and validates `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a concurrent writer truncating the file is the usual mmap caveat,
        // and checkpoints are written by rename (see `write_f32`), never in place.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (data_start, tensors, metadata) = parse_header(path, &mmap)?;
        let by_name = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(SafeTensors { path: path.to_path_buf(), mmap, data_start, tensors, by_name, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All tensors, sorted by name.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The `__metadata__` object, if any.
    pub fn metadata(&self) -> Option<&Value> {
        self.metadata.as_ref()
    }

    /// The raw little-endian bytes of `name`.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.info(name).ok_or_else(|| Error::st(&self.path, Some(name), "no such tensor"))?;
        Ok(&self.mmap[self.data_start + t.start..self.data_start + t.end])
    }

    /// `name` converted to f32 (from F64, F32, F16 or BF16).
    pub fn read_f32(&self, name: &str) -> Result<engine::Tensor> {
        let t = self.info(name).ok_or_else(|| Error::st(&self.path, Some(name), "no such tensor"))?;
        let b = &self.mmap[self.data_start + t.start..self.data_start + t.end];
        let data: Vec<f32> = match t.dtype {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
                .collect(),
            Dtype::Other(n, _) => {
                return Err(Error::st(
                    &self.path,
                    Some(name),
                    format!("dtype {n} cannot be loaded as weights (only F64, F32, F16, BF16)"),
                ))
            }
        };
        Ok(engine::Tensor { shape: t.shape.clone(), data })
    }
}

type Header = (usize, Vec<TensorInfo>, Option<Value>);

fn parse_header(path: &Path, file: &[u8]) -> Result<Header> {
    let bad = |tensor: Option<&str>, msg: String| Error::st(path, tensor, msg);
    if file.len() < 8 {
        return Err(bad(None, format!("file is {} bytes, too short for a safetensors header", file.len())));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&file[..8]);
    let n = u64::from_le_bytes(len8);
    let avail = (file.len() - 8) as u64;
    if n > avail {
        return Err(bad(
            None,
            format!("header length {n} exceeds the {avail} bytes after it; the file is truncated or not safetensors"),
        ));
    }
    let n = n as usize;
    let header: Value =
        serde_json::from_slice(&file[8..8 + n]).map_err(|e| bad(None, format!("header is not valid JSON: {e}")))?;
    let Value::Object(entries) = header else {
        return Err(bad(None, "header is not a JSON object".into()));
    };
    let data_start = 8 + n;
    let data_len = file.len() - data_start;
    let mut metadata = None;
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, entry) in entries {
        if name == "__metadata__" {
            metadata = Some(entry);
            continue;
        }
        let t = Some(name.as_str());
        let dtype_s = entry.get("dtype").and_then(Value::as_str).ok_or_else(|| bad(t, "missing `dtype`".into()))?;
        let dtype = Dtype::parse(dtype_s).ok_or_else(|| bad(t, format!("unknown dtype `{dtype_s}`")))?;
        let shape = entry
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| bad(t, "`shape` must be a list of non-negative integers".into()))?;
        let offs = entry
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| bad(t, "`data_offsets` must be [start, end]".into()))?;
        let (start, end) = offs;
        if start > end || end > data_len as u64 {
            return Err(bad(
                t,
                format!(
                    "data_offsets [{start}, {end}] lie outside the data section of {data_len} bytes; the file is \
                     truncated or corrupt (copy or download it again)"
                ),
            ));
        }
        let (start, end) = (start as usize, end as usize);
        let want = shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(t, format!("shape {shape:?} overflows")))?;
        if want != end - start {
            return Err(bad(
                t,
                format!("shape {shape:?} of {} needs {want} bytes but data_offsets span {}", dtype.name(), end - start),
            ));
        }
        tensors.push(TensorInfo { name, dtype, shape, start, end });
    }
    // In the data section the tensors follow one another without overlapping.
    let mut order: Vec<&TensorInfo> = tensors.iter().filter(|t| t.end > t.start).collect();
    order.sort_by_key(|t| t.start);
    for w in order.windows(2) {
        if w[1].start < w[0].end {
            return Err(bad(
                Some(&w[1].name),
                format!("data_offsets overlap those of `{}`; the file is corrupt", w[0].name),
            ));
        }
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((data_start, tensors, metadata))
}

/// The header of f32 `tensors` (sorted by name; `__metadata__` `{"format": "pt"}` first, as the Python
/// library writes it; padded with spaces to a multiple of 8 bytes), and the order the data follows.
fn header_f32(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<(String, Vec<usize>), String> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| tensors[a].0.cmp(&tensors[b].0));
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut offset = 0usize;
    for (i, &k) in order.iter().enumerate() {
        let (name, shape, data) = &tensors[k];
        if i > 0 && tensors[order[i - 1]].0 == *name {
            return Err(format!("tensor `{name}` appears twice"));
        }
        if name == "__metadata__" {
            return Err("a tensor cannot be named `__metadata__`".into());
        }
        if shape.iter().product::<usize>() != data.len() {
            return Err(format!("tensor `{name}`: shape {shape:?} does not match its {} values", data.len()));
        }
        let end = offset + 4 * data.len();
        header.push(',');
        header.push_str(&Value::String(name.clone()).to_string());
        header.push_str(&format!(
            ":{{\"dtype\":\"F32\",\"shape\":{},\"data_offsets\":[{offset},{end}]}}",
            Value::from(shape.clone())
        ));
        offset = end;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    Ok((header, order))
}

/// Writes the safetensors form of f32 `tensors` to `out`, tensor by tensor (no copy of the whole file).
fn write_f32_to(
    out: &mut impl Write,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    header: &str,
    order: &[usize],
) -> std::io::Result<()> {
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(header.as_bytes())?;
    let mut buf = Vec::with_capacity(1 << 16);
    for &k in order {
        for chunk in tensors[k].2.chunks(1 << 14) {
            buf.clear();
            chunk.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
            out.write_all(&buf)?;
        }
    }
    Ok(())
}

/// The serialized bytes of f32 `tensors` (sorted by name; `__metadata__` `{"format": "pt"}` first, as the
/// Python library writes it; the header is padded with spaces to a multiple of 8 bytes).
pub fn serialize_f32(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<Vec<u8>, String> {
    let (header, order) = header_f32(tensors)?;
    let mut out = Vec::with_capacity(8 + header.len() + tensors.iter().map(|t| 4 * t.2.len()).sum::<usize>());
    write_f32_to(&mut out, tensors, &header, &order).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Writes f32 `tensors` to `path` atomically: streamed into a temporary file in the same directory (no
/// second copy of the weights in memory), synced, then renamed. On failure (a full disk, a file-size
/// limit) the temporary file is removed and `path` is untouched.
pub fn write_f32(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let (header, order) = header_f32(tensors).map_err(|m| Error::st(path, None, m))?;
    crate::atomic::write_with(path, |mut w| write_f32_to(&mut w, tensors, &header, &order))
        .map_err(|e| Error::io(path, e))
}

/// The weights of a model directory: one `model.safetensors`, or the shards named by
/// `model.safetensors.index.json`.
#[derive(Debug)]
pub struct Checkpoint {
    /// The file named in messages: `model.safetensors` or the index.
    pub path: PathBuf,
    files: Vec<SafeTensors>,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
}

impl Checkpoint {
    /// Finds and opens the weights of `dir`. Pickle-only directories are refused with how to convert them.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Self::open_file(&single);
        }
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            return Self::open_index(&index);
        }
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let pickle = entries.filter_map(|e| e.ok()).any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.ends_with(".bin") || name == "pytorch_model.bin.index.json"
        });
        Err(if pickle {
            Error::PickleOnly { dir: dir.to_path_buf() }
        } else {
            Error::NoWeights { dir: dir.to_path_buf() }
        })
    }

    /// One safetensors file (`grads.safetensors`, a single-file checkpoint).
    pub fn open_file(path: &Path) -> Result<Self> {
        let st = SafeTensors::open(path)?;
        let index = st.tensors().iter().map(|t| (t.name.clone(), 0)).collect();
        Ok(Checkpoint { path: path.to_path_buf(), files: vec![st], index })
    }

    /// A sharded checkpoint: `weight_map` {tensor name → shard file relative to the index's directory}.
    pub fn open_index(index_path: &Path) -> Result<Self> {
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let idx = read_json(index_path)?;
        let map = idx
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::field(index_path, "weight_map", "missing; expected {tensor name: shard file}"))?;
        let shard_err = |shard: &str, msg: &str| Error::Shard {
            index: index_path.to_path_buf(),
            shard: shard.to_string(),
            msg: msg.to_string(),
        };
        let mut shard_ids: HashMap<String, usize> = HashMap::new();
        let mut files = Vec::new();
        let mut wanted: Vec<(String, usize)> = Vec::new();
        for (tensor, shard) in map {
            let shard = shard
                .as_str()
                .ok_or_else(|| Error::field(index_path, &format!("weight_map.{tensor}"), "expected a file name"))?;
            let id = match shard_ids.get(shard) {
                Some(&id) => id,
                None => {
                    let rel = Path::new(shard);
                    if !rel.components().all(|c| matches!(c, Component::Normal(_))) || shard.is_empty() {
                        return Err(shard_err(
                            shard,
                            "must be a plain relative path inside the model directory (no absolute paths, no `..`)",
                        ));
                    }
                    let p = dir.join(rel);
                    if !p.is_file() {
                        return Err(shard_err(shard, "file is missing; download every shard the index lists"));
                    }
                    files.push(SafeTensors::open(&p)?);
                    shard_ids.insert(shard.to_string(), files.len() - 1);
                    files.len() - 1
                }
            };
            wanted.push((tensor.clone(), id));
        }
        let mut index = HashMap::new();
        for (id, f) in files.iter().enumerate() {
            for t in f.tensors() {
                if let Some(&other) = index.get(&t.name) {
                    let other: &SafeTensors = &files[other];
                    return Err(Error::st(
                        f.path(),
                        Some(&t.name),
                        format!("also stored in {}", other.path().display()),
                    ));
                }
                index.insert(t.name.clone(), id);
            }
        }
        for (tensor, id) in wanted {
            if index.get(&tensor) != Some(&id) {
                return Err(Error::st(files[id].path(), Some(&tensor), "listed in the index but not in this shard"));
            }
        }
        Ok(Checkpoint { path: index_path.to_path_buf(), files, index })
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).and_then(|&i| self.files[i].info(name))
    }

    /// The file holding `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.index.get(name).map(|&i| self.files[i].path())
    }

    pub fn read_f32(&self, name: &str) -> Result<engine::Tensor> {
        match self.index.get(name) {
            Some(&i) => self.files[i].read_f32(name),
            None => Err(Error::st(&self.path, Some(name), "no such tensor")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    fn parse(bytes: &[u8]) -> Result<Header> {
        parse_header(Path::new("x.safetensors"), bytes)
    }

    #[test]
    fn roundtrip_in_memory() {
        let t = vec![("b".to_string(), vec![2], vec![1.0, 2.0]), ("a".to_string(), vec![1, 1], vec![-3.5])];
        let bytes = serialize_f32(&t).unwrap();
        let (start, infos, meta) = parse(&bytes).unwrap();
        assert_eq!(start % 8, 0);
        assert_eq!(meta.unwrap()["format"], "pt");
        assert_eq!(infos[0].name, "a");
        assert_eq!((infos[0].start, infos[0].end, infos[1].start, infos[1].end), (0, 4, 4, 12));
        assert_eq!(&bytes[start..start + 4], &(-3.5f32).to_le_bytes());
    }

    #[test]
    fn corrupt_headers_name_the_tensor() {
        let too_long = {
            let mut v = raw("{}", &[]);
            v[..8].copy_from_slice(&1000u64.to_le_bytes());
            v
        };
        assert!(parse(&too_long).unwrap_err().to_string().contains("header length 1000"));
        assert!(parse(&[1, 2, 3]).is_err());
        assert!(parse(&raw("{not json", &[])).unwrap_err().to_string().contains("JSON"));
        let cases = [
            (r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}}"#, "outside the data section"),
            (r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, "needs 12 bytes"),
            (r#"{"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#, "unknown dtype"),
            (r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#, "outside"),
            (r#"{"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#, "shape"),
            (
                r#"{"v":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                "overlap",
            ),
        ];
        for (h, want) in cases {
            let e = parse(&raw(h, &[0u8; 8])).unwrap_err().to_string();
            assert!(e.contains("tensor `w`") && e.contains(want), "{h}: {e}");
        }
    }

    #[test]
    fn half_precision_converts() {
        let dir = std::env::temp_dir().join(format!("hf-st-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("h.safetensors");
        let mut data = half::bf16::from_f32(1.5).to_le_bytes().to_vec();
        data.extend_from_slice(&half::f16::from_f32(-0.25).to_le_bytes());
        data.extend_from_slice(&7i64.to_le_bytes());
        let h = r#"{"a":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]},"b":{"dtype":"F16","shape":[1],"data_offsets":[2,4]},"c":{"dtype":"I64","shape":[1],"data_offsets":[4,12]}}"#;
        std::fs::write(&p, raw(h, &data)).unwrap();
        let st = SafeTensors::open(&p).unwrap();
        assert_eq!(st.read_f32("a").unwrap().data, vec![1.5]);
        assert_eq!(st.read_f32("b").unwrap().data, vec![-0.25]);
        let e = st.read_f32("c").unwrap_err().to_string();
        assert!(e.contains("tensor `c`") && e.contains("I64"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
