//! Safetensors files through Hugging Face's `safetensors` crate, which parses and validates the format (an
//! 8-byte little-endian header length, a JSON header `{name: {dtype, shape, data_offsets}, "__metadata__":
//! {..}}`, then the data section the offsets index into, every byte of it owned by exactly one tensor;
//! a file whose only fault is bytes owned by no tensor is still read, as this project always has).
//! What is the project's own is this thin layer: the file memory-mapped and validated before any tensor
//! is touched, floating-point tensors (F64, F32, F16, BF16) converted to f32, sharded checkpoints with
//! their index's path checks, atomic writes ([`write`]), and errors that name the file and the tensor at
//! fault.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::TensorInfo as StInfo;
use safetensors::{Dtype as StDtype, SafeTensorError};
use serde_json::Value;

use crate::error::{read_json, Error, Result};

mod write;
pub use write::{serialize_f32, write_blocks_with, write_f32, write_f32_with, write_with, WriteDtype};

/// Element type of a stored tensor. Only the floating-point ones can be read as f32; the rest are known
/// so that a checkpoint holding an integer buffer (ignored by the model) still opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    /// Any other whole-byte dtype of the format (`I64`, `U8`, `BOOL`, `F8_E4M3`, ...): its name and byte size.
    Other(&'static str, usize),
}

impl Dtype {
    /// The crate's dtype as ours; `Err` names one whose elements are not whole bytes (F4, F6), which no
    /// layer here can address.
    fn from_st(d: StDtype) -> std::result::Result<Dtype, String> {
        let other = |name: &'static str| Ok(Dtype::Other(name, d.bitsize() / 8));
        match d {
            StDtype::F64 => Ok(Dtype::F64),
            StDtype::F32 => Ok(Dtype::F32),
            StDtype::F16 => Ok(Dtype::F16),
            StDtype::BF16 => Ok(Dtype::BF16),
            StDtype::I64 => other("I64"),
            StDtype::U64 => other("U64"),
            StDtype::I32 => other("I32"),
            StDtype::U32 => other("U32"),
            StDtype::I16 => other("I16"),
            StDtype::U16 => other("U16"),
            StDtype::I8 => other("I8"),
            StDtype::U8 => other("U8"),
            StDtype::BOOL => other("BOOL"),
            StDtype::C64 => other("C64"),
            StDtype::F8_E4M3 => other("F8_E4M3"),
            StDtype::F8_E5M2 => other("F8_E5M2"),
            StDtype::F8_E8M0 => other("F8_E8M0"),
            StDtype::F8_E4M3FNUZ => other("F8_E4M3FNUZ"),
            StDtype::F8_E5M2FNUZ => other("F8_E5M2FNUZ"),
            d => Err(format!("dtype {d} ({} bits per element) is not supported", d.bitsize())),
        }
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
    metadata: Option<HashMap<String, String>>,
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

    /// The `__metadata__` map, if any.
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.as_ref()
    }

    /// The raw little-endian bytes of `name`.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.info(name).ok_or_else(|| Error::st(&self.path, Some(name), "no such tensor"))?;
        Ok(&self.mmap[self.data_start + t.start..self.data_start + t.end])
    }

    /// `name` converted to f32 (from F64, F32, F16 or BF16), a block of the file at a time
    /// ([`SafeTensors::for_each_block`]), so the tensor's f32 copy and its bytes in the file are never
    /// resident whole at once (a bf16 Llama-3-8B head: 2 GiB of f32 and 1 GiB of file pages together,
    /// before).
    pub fn read_f32(&self, name: &str) -> Result<engine::Tensor> {
        let t = self.info(name).ok_or_else(|| Error::st(&self.path, Some(name), "no such tensor"))?;
        let mut data = Vec::with_capacity(t.shape.iter().product());
        self.for_each_block(name, 1, |block| {
            data.extend_from_slice(block);
            Ok(())
        })?;
        Ok(engine::Tensor { shape: t.shape.clone(), data })
    }

    /// Hands `f` the values of `name` in f32 (from F64, F32, F16 or BF16), in order, a block of about
    /// 4 MiB of the file at a time, each block a whole number of `row`s of values: each block's pages
    /// are dropped from this process's mapping once converted ([`SafeTensors::forget`]), and the f32
    /// block is reused, so reading holds one block whatever the tensor's size.
    pub fn for_each_block(&self, name: &str, row: usize, mut f: impl FnMut(&[f32]) -> Result<()>) -> Result<()> {
        let t = self.info(name).ok_or_else(|| Error::st(&self.path, Some(name), "no such tensor"))?;
        // Each dtype's conversion of whole values, chosen once for the tensor.
        let (width, convert): (usize, Convert) = match t.dtype {
            Dtype::F32 => {
                (4, |b, out| out.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))))
            }
            Dtype::F16 => {
                (2, |b, out| out.extend(b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())))
            }
            Dtype::BF16 => {
                (2, |b, out| out.extend(b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())))
            }
            Dtype::F64 => (8, |b, out| {
                out.extend(
                    b.chunks_exact(8)
                        .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32),
                )
            }),
            Dtype::Other(n, _) => {
                return Err(Error::st(
                    &self.path,
                    Some(name),
                    format!("dtype {n} cannot be loaded as weights (only F64, F32, F16, BF16)"),
                ))
            }
        };
        let start = self.data_start + t.start;
        let bytes = &self.mmap[start..self.data_start + t.end];
        // About 4 MiB of the file a block, whole rows (at least one).
        let row_bytes = row.max(1) * width;
        let block = (BLOCK_BYTES / row_bytes).max(1) * row_bytes;
        let mut values = Vec::with_capacity(block / width);
        for (i, b) in bytes.chunks(block).enumerate() {
            values.clear();
            convert(b, &mut values);
            self.forget(start + i * block, start + i * block + b.len());
            f(&values)?;
        }
        Ok(())
    }

    /// Drops this process's mapping of the pages holding bytes `start..end` of the file, once they are
    /// read: the pages stay in the kernel's page cache, but no longer count in the resident set. A model
    /// or a checkpoint read tensor by tensor (1.5 GB of weights and AdamW moments for SmolLM2-135M) then
    /// holds the converted tensors alone, not those and the file's pages as well. Reading the bytes again
    /// faults them back in.
    fn forget(&self, start: usize, end: usize) {
        #[cfg(unix)]
        {
            const PAGE: usize = 4096;
            let start = start / PAGE * PAGE;
            let end = end.div_ceil(PAGE).saturating_mul(PAGE).min(self.mmap.len());
            if end > start {
                // SAFETY: a read-only shared mapping of a file nobody writes in place (see `open`): pages
                // dropped read the same bytes from the page cache when touched again, so borrowed slices
                // stay valid. Only a hint; a failure changes nothing but the resident set.
                let _ =
                    unsafe { self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
            }
        }
        #[cfg(not(unix))]
        let _ = (start, end);
    }
}

/// Appends the f32 values of a block of whole little-endian values of one dtype.
type Convert = fn(&[u8], &mut Vec<f32>);

/// Bytes of the file [`SafeTensors::for_each_block`] converts at a time (rounded to whole rows).
pub const BLOCK_BYTES: usize = 4 << 20;

type Header = (usize, Vec<TensorInfo>, Option<HashMap<String, String>>);

/// The crate validates. A file it refuses only because some bytes of the data section belong to no
/// tensor (a tensor dropped from the header, padding) is still read, as this project's reader always has
/// (every tensor's range, size and dtype checked, no overlaps): the weights check then names what is
/// missing. Any other refusal is explained by [`explain`] in terms of the tensor at fault.
fn parse_header(path: &Path, file: &[u8]) -> Result<Header> {
    let (n, meta) = match safetensors::SafeTensors::read_metadata(file) {
        Ok(ok) => ok,
        Err(e) => return explain(path, file, e),
    };
    let mut tensors = Vec::with_capacity(meta.tensors().len());
    for (name, info) in meta.tensors() {
        tensors.push(tensor_info(path, name, info)?);
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((8 + n, tensors, meta.metadata().clone()))
}

fn tensor_info(path: &Path, name: String, info: &StInfo) -> Result<TensorInfo> {
    let dtype = Dtype::from_st(info.dtype).map_err(|m| Error::st(path, Some(&name), m))?;
    let (start, end) = info.data_offsets;
    Ok(TensorInfo { name, dtype, shape: info.shape.clone(), start, end })
}

/// Why the crate refused `file`, said in terms of the file and, where one is at fault, the tensor; or the
/// header, when the only fault is bytes that belong to no tensor (see [`parse_header`]). The header is
/// re-read as JSON into the crate's own types.
fn explain(path: &Path, file: &[u8], e: SafeTensorError) -> Result<Header> {
    let bad = |tensor: Option<&str>, msg: String| Err(Error::st(path, tensor, msg));
    let avail = file.len().saturating_sub(8);
    let n = file.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    match (&e, n) {
        (SafeTensorError::HeaderTooSmall, _) | (_, None) => {
            return bad(None, format!("file is {} bytes, too short for a safetensors header", file.len()))
        }
        (SafeTensorError::HeaderTooLarge | SafeTensorError::InvalidHeaderLength, Some(n)) => {
            return bad(
                None,
                format!(
                    "header length {n} exceeds the {avail} bytes after it (or the format's 100 MB limit); the \
                     file is truncated or not safetensors"
                ),
            )
        }
        (SafeTensorError::InvalidHeader(u), _) => return bad(None, format!("header is not UTF-8 text: {u}")),
        _ => {}
    }
    let n = n.unwrap_or(0) as usize;
    let header: Value = match serde_json::from_slice(&file[8..8 + n]) {
        Ok(v) => v,
        Err(j) => return bad(None, format!("header is not valid JSON: {j}")),
    };
    let Value::Object(entries) = header else { return bad(None, "header is not a JSON object".into()) };
    let data_len = file.len() - 8 - n;
    let mut metadata = None;
    let mut tensors = Vec::new();
    for (name, entry) in entries {
        if name == "__metadata__" {
            match serde_json::from_value::<HashMap<String, String>>(entry) {
                Ok(m) => metadata = Some(m),
                Err(j) => return bad(None, format!("`__metadata__` must map strings to strings: {j}")),
            }
            continue;
        }
        let t = Some(name.as_str());
        let dtype_s = entry.get("dtype").and_then(Value::as_str);
        let Some(dtype) = dtype_s.and_then(|d| serde_json::from_value::<StDtype>(Value::from(d)).ok()) else {
            return bad(t, format!("unknown dtype `{}`", dtype_s.unwrap_or("(missing)")));
        };
        let Some(shape) = entry.get("shape").and_then(|s| serde_json::from_value::<Vec<usize>>(s.clone()).ok()) else {
            return bad(t, "`shape` must be a list of non-negative integers".into());
        };
        let Some((start, end)) =
            entry.get("data_offsets").and_then(|o| serde_json::from_value::<(usize, usize)>(o.clone()).ok())
        else {
            return bad(t, "`data_offsets` must be [start, end]".into());
        };
        if start > end || end > data_len {
            return bad(
                t,
                format!(
                    "data_offsets [{start}, {end}] lie outside the data section of {data_len} bytes; the file is \
                     truncated or corrupt (copy or download it again)"
                ),
            );
        }
        let want = shape.iter().try_fold(dtype.bitsize(), |acc, &d| acc.checked_mul(d)).map(|bits| bits / 8);
        match want {
            None => return bad(t, format!("shape {shape:?} overflows")),
            Some(w) if w != end - start => {
                return bad(
                    t,
                    format!("shape {shape:?} of {dtype} needs {w} bytes but data_offsets span {}", end - start),
                )
            }
            _ => {}
        }
        tensors.push((name, StInfo { dtype, shape, data_offsets: (start, end) }));
    }
    // In the data section the tensors follow one another without overlapping.
    let mut order: Vec<&(String, StInfo)> =
        tensors.iter().filter(|(_, i)| i.data_offsets.1 > i.data_offsets.0).collect();
    order.sort_by_key(|(_, i)| i.data_offsets);
    for w in order.windows(2) {
        if w[1].1.data_offsets.0 < w[0].1.data_offsets.1 {
            return bad(Some(&w[1].0), format!("data_offsets overlap those of `{}`; the file is corrupt", w[0].0));
        }
    }
    let tidy = matches!(e, SafeTensorError::InvalidOffset(_) | SafeTensorError::MetadataIncompleteBuffer);
    if !tidy {
        return bad(None, format!("not a valid safetensors file: {e}"));
    }
    let mut infos = Vec::with_capacity(tensors.len());
    for (name, info) in tensors {
        infos.push(tensor_info(path, name, &info)?);
    }
    infos.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((8 + n, infos, metadata))
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

    /// The dtype its floating-point tensors share; `None` when they differ (or there are none).
    pub fn float_dtype(&self) -> Option<Dtype> {
        let dtypes = self.files.iter().flat_map(|f| f.tensors()).map(|t| t.dtype);
        let mut floats = dtypes.filter(|d| !matches!(d, Dtype::Other(..)));
        let first = floats.next()?;
        floats.all(|d| d == first).then_some(first)
    }

    /// The file holding `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.index.get(name).map(|&i| self.files[i].path())
    }

    pub fn read_f32(&self, name: &str) -> Result<engine::Tensor> {
        self.file(name)?.read_f32(name)
    }

    /// [`SafeTensors::for_each_block`] of `name`, in whichever file holds it.
    pub fn for_each_block(&self, name: &str, row: usize, f: impl FnMut(&[f32]) -> Result<()>) -> Result<()> {
        self.file(name)?.for_each_block(name, row, f)
    }

    fn file(&self, name: &str) -> Result<&SafeTensors> {
        match self.index.get(name) {
            Some(&i) => Ok(&self.files[i]),
            None => Err(Error::st(&self.path, Some(name), "no such tensor")),
        }
    }
}

#[cfg(test)]
#[path = "safetensors_tests.rs"]
mod tests;
