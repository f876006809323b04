//! Writing safetensors files: f32 (the bytes the Python library writes for the same tensors) or bf16, one
//! tensor at a time into a temporary file renamed into place.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Metadata, TensorInfo as StInfo};
use safetensors::{Dtype as StDtype, View};

use crate::error::{Error, Result};

/// f32 values as the crate's [`View`]: borrowed as bytes on little-endian machines (no copy).
struct F32View<'a> {
    shape: &'a [usize],
    data: &'a [f32],
}

impl View for F32View<'_> {
    fn dtype(&self) -> StDtype {
        StDtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        #[cfg(target_endian = "little")]
        {
            // SAFETY: f32 has no padding and any byte pattern is a valid u8; the length is the same memory.
            Cow::Borrowed(unsafe { std::slice::from_raw_parts(self.data.as_ptr().cast::<u8>(), 4 * self.data.len()) })
        }
        #[cfg(not(target_endian = "little"))]
        Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        4 * self.data.len()
    }
}

/// `{"format": "pt"}`, as the Python library writes it.
fn pt_metadata() -> Option<HashMap<String, String>> {
    Some(HashMap::from([("format".to_string(), "pt".to_string())]))
}

/// The views of f32 `tensors` in name order, after the checks the crate leaves to us (a repeated name,
/// one that would be read as the metadata, values that do not fill the shape).
fn views(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<Vec<(&str, F32View<'_>)>, String> {
    let mut order: Vec<&(String, Vec<usize>, Vec<f32>)> = tensors.iter().collect();
    order.sort_by(|a, b| a.0.cmp(&b.0));
    for (i, (name, shape, data)) in order.iter().enumerate() {
        if i > 0 && order[i - 1].0 == *name {
            return Err(format!("tensor `{name}` appears twice"));
        }
        if name == "__metadata__" {
            return Err("a tensor cannot be named `__metadata__`".into());
        }
        if shape.iter().product::<usize>() != data.len() {
            return Err(format!("tensor `{name}`: shape {shape:?} does not match its {} values", data.len()));
        }
    }
    Ok(order.into_iter().map(|(n, s, d)| (n.as_str(), F32View { shape: s, data: d })).collect())
}

/// The dtype of a weights file this crate writes: f32, or bf16 / f16 (each value rounded to the nearest,
/// ties to even, as PyTorch's `.to(torch.bfloat16)` / `.to(torch.float16)`), half the bytes, for a merged
/// model to share.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriteDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl WriteDtype {
    fn st(self) -> StDtype {
        match self {
            WriteDtype::F32 => StDtype::F32,
            WriteDtype::Bf16 => StDtype::BF16,
            WriteDtype::F16 => StDtype::F16,
        }
    }

    /// Bytes a value.
    pub fn width(self) -> usize {
        match self {
            WriteDtype::F32 => 4,
            WriteDtype::Bf16 | WriteDtype::F16 => 2,
        }
    }

    /// `config.json`'s name for it (`dtype` / `torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            WriteDtype::F32 => "float32",
            WriteDtype::Bf16 => "bfloat16",
            WriteDtype::F16 => "float16",
        }
    }

    /// The name the command line and a run's configuration give it.
    pub fn name(self) -> &'static str {
        match self {
            WriteDtype::F32 => "f32",
            WriteDtype::Bf16 => "bf16",
            WriteDtype::F16 => "f16",
        }
    }

    /// The dtype of that name ([`WriteDtype::name`]).
    pub fn parse(name: &str) -> Option<WriteDtype> {
        [WriteDtype::F32, WriteDtype::Bf16, WriteDtype::F16].into_iter().find(|d| d.name() == name)
    }

    /// The dtype a model stored in `dtype` is written back in: its own, or f32 for one this crate does not
    /// write (f64).
    pub fn of_stored(dtype: super::Dtype) -> WriteDtype {
        match dtype {
            super::Dtype::BF16 => WriteDtype::Bf16,
            super::Dtype::F16 => WriteDtype::F16,
            _ => WriteDtype::F32,
        }
    }

    /// Appends `values` to `out` as little-endian values of this dtype.
    fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            WriteDtype::F32 => out.extend(values.iter().flat_map(|x| x.to_le_bytes())),
            WriteDtype::Bf16 => out.extend(values.iter().flat_map(|&x| engine::quant::bf16::from_f32(x).to_le_bytes())),
            WriteDtype::F16 => out.extend(values.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes())),
        }
    }
}

/// The crate's header for tensors of these names and shapes, in this order, padded with spaces to a
/// multiple of 8 bytes.
fn header<'a>(tensors: impl Iterator<Item = (&'a str, &'a [usize])>, dtype: WriteDtype) -> Result<Vec<u8>, String> {
    let mut offset = 0;
    let infos = tensors
        .map(|(name, shape)| {
            let len = dtype.width() * shape.iter().product::<usize>();
            let info = StInfo { dtype: dtype.st(), shape: shape.to_vec(), data_offsets: (offset, offset + len) };
            offset += len;
            (name.to_string(), info)
        })
        .collect();
    let meta = Metadata::new(pt_metadata(), infos).map_err(|e| e.to_string())?;
    let mut h = serde_json::to_vec(&meta).map_err(|e| e.to_string())?;
    h.resize(h.len().next_multiple_of(8), b' ');
    Ok(h)
}

/// The serialized bytes of f32 `tensors` (sorted by name; `__metadata__` `{"format": "pt"}` first, as the
/// Python library writes it; the header is padded with spaces to a multiple of 8 bytes).
pub fn serialize_f32(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<Vec<u8>, String> {
    safetensors::serialize(views(tensors)?, pt_metadata()).map_err(|e| e.to_string())
}

/// Writes f32 `tensors` to `path` atomically, the same bytes as [`serialize_f32`] (see
/// [`write_f32_with`]). Checked before anything is written.
pub fn write_f32(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    views(tensors).map_err(|m| Error::st(path, None, m))?;
    let shapes: Vec<(String, Vec<usize>)> = tensors.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect();
    write_f32_with(path, &shapes, |i| Ok(Cow::Borrowed(&tensors[i].2[..])))
}

/// Writes f32 tensors of these names and shapes to `path` atomically, the bytes [`serialize_f32`] gives
/// for them: the crate's header, then each tensor's values, asked of `values(i)` (`i` indexing `shapes`)
/// only when its turn comes in the file's name order, so a caller converting weights to another layout
/// holds one converted tensor at a time, never a second copy of the model. The data is streamed into a
/// temporary file in the same directory, synced, then renamed; on failure (values that do not fill
/// their shape, a full disk, a file-size limit, an error from `values`, which is returned) the temporary
/// file is removed and `path` is untouched.
pub fn write_f32_with<'v>(
    path: &Path,
    shapes: &[(String, Vec<usize>)],
    values: impl FnMut(usize) -> Result<Cow<'v, [f32]>>,
) -> Result<()> {
    write_with(path, shapes, WriteDtype::F32, values)
}

/// [`write_f32_with`], the values written in `dtype`.
pub fn write_with<'v>(
    path: &Path,
    shapes: &[(String, Vec<usize>)],
    dtype: WriteDtype,
    mut values: impl FnMut(usize) -> Result<Cow<'v, [f32]>>,
) -> Result<()> {
    write_blocks_with(path, shapes, dtype, |i, out| out(&values(i)?))
}

/// [`write_with`], each tensor's values handed to the file a block at a time: `fill(i, out)` calls `out`
/// with tensor `i`'s values in order, in pieces of any size, so a tensor streamed from another file is
/// never held whole. Values beyond the tensor's shape, or too few, are an error.
pub fn write_blocks_with(
    path: &Path,
    shapes: &[(String, Vec<usize>)],
    dtype: WriteDtype,
    mut fill: impl FnMut(usize, &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()>,
) -> Result<()> {
    let mut order: Vec<usize> = (0..shapes.len()).collect();
    order.sort_by(|&a, &b| shapes[a].0.cmp(&shapes[b].0));
    for (k, &i) in order.iter().enumerate() {
        let name = &shapes[i].0;
        if k > 0 && shapes[order[k - 1]].0 == *name {
            return Err(Error::st(path, None, format!("tensor `{name}` appears twice")));
        }
        if name == "__metadata__" {
            return Err(Error::st(path, None, "a tensor cannot be named `__metadata__`"));
        }
    }
    let header = header(order.iter().map(|&i| (shapes[i].0.as_str(), &shapes[i].1[..])), dtype)
        .map_err(|m| Error::st(path, None, m))?;
    // The first error of `fill` or of writing `path`, returned as it is rather than as an I/O error.
    let mut carried = crate::atomic::Carried::default();
    let mut bytes = Vec::new();
    let written = crate::atomic::write_with(path, |out| {
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        for &i in &order {
            let (name, shape) = &shapes[i];
            let want = shape.iter().product::<usize>();
            let mut count = 0;
            let mut put = |block: &[f32]| -> Result<()> {
                count += block.len();
                if count > want {
                    return Err(Error::st(path, Some(name), format!("more values than its shape {shape:?} holds")));
                }
                // A piece of values at a time: no second copy of a large tensor.
                for piece in block.chunks(1 << 20) {
                    match dtype {
                        WriteDtype::F32 => out.write_all(&F32View { shape, data: piece }.data()),
                        _ => {
                            bytes.clear();
                            dtype.encode(piece, &mut bytes);
                            out.write_all(&bytes)
                        }
                    }
                    .map_err(|e| Error::io(path, e))?;
                }
                Ok(())
            };
            let done = fill(i, &mut put).and_then(|()| match count == want {
                true => Ok(()),
                false => Err(Error::st(path, Some(name), format!("shape {shape:?} does not match its {count} values"))),
            });
            done.map_err(|e| carried.carry(e))?;
        }
        Ok(())
    });
    carried.result(path, written)
}
