//! HF tensor names ↔ engine [`Params`], with the layout conversions between them.
//!
//! The names come from the model's [`crate::naming::Naming`] row: one `Entry` per engine tensor says which
//! HF tensors make it and how: copied, transposed (GPT-2's Conv1D stores `[in, out]`), row-concatenated
//! (q/k/v, gate/up) or de-interleaved (NeoX stores q/k/v rows as `[n_heads, 3, head_dim]`). Loading and
//! saving both walk the same plan, so they are inverses.

use std::borrow::Cow;
use std::collections::HashSet;
use std::path::Path;

use engine::{DecoderConfig, Params, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::naming::{aliases, ignored, plan, Entry, Hf};
use crate::safetensors::{Checkpoint, WriteDtype};

/// Loads the weights of model directory `dir` (single file or sharded) into engine [`Params`].
pub fn load_params(dir: &Path, config: &ModelConfig) -> Result<Params> {
    params_from_checkpoint(&Checkpoint::open_dir(dir)?, config)
}

/// The dtype a model made from the weights of `dir` (a merged one) is written in unless told otherwise:
/// the one their floating-point tensors share (bf16 for most published checkpoints), else f32.
pub fn stored_dtype(dir: &Path) -> Result<WriteDtype> {
    let ckpt = Checkpoint::open_dir(dir)?;
    Ok(ckpt.float_dtype().map(WriteDtype::of_stored).unwrap_or_default())
}

/// Bytes of the values of the weights file written for `config` in `dtype` (its header aside).
pub fn weights_bytes(config: &ModelConfig, dtype: WriteDtype) -> u64 {
    // A config the name table cannot map is refused by the write itself.
    let entries = plan(config.naming, &config.decoder).unwrap_or_default();
    let values: usize = entries.iter().flat_map(|e| &e.hf).map(|(_, s)| s.iter().product::<usize>()).sum();
    (values * dtype.width()) as u64
}

/// Loads one safetensors file with HF names (a checkpoint, or a gradient file with the same names).
pub fn load_params_file(path: &Path, config: &ModelConfig) -> Result<Params> {
    params_from_checkpoint(&Checkpoint::open_file(path)?, config)
}

/// Maps an opened checkpoint onto [`Params`]. Every problem — missing, unexpected, wrong shape, unreadable
/// dtype, NaN/infinite values — is collected and reported together, each under its HF name.
pub fn params_from_checkpoint(ckpt: &Checkpoint, config: &ModelConfig) -> Result<Params> {
    let mut params = Params::zeros(&config.decoder);
    let mut slots = params.named_mut();
    let count = slots.len();
    let placed = read_tensors(ckpt, config, |engine_name, values| {
        let slot = slots.iter_mut().find(|(n, _)| *n == engine_name).map(|(_, t)| t);
        match slot {
            Some(t) if t.data.len() == values.len() => {
                t.data = values.into_vec()?;
                Ok(())
            }
            _ => Err(internal(ckpt, engine_name)),
        }
    })?;
    if placed != count {
        return Err(internal(ckpt, "<count>"));
    }
    Ok(params)
}

/// One engine tensor's values, as [`read_tensors`] hands them over.
pub(crate) enum Values<'a> {
    /// Converted from the HF layout (a transpose, a de-interleave), held whole and checked finite.
    Whole(Vec<f32>),
    /// Values in the HF tensors' own order (one tensor, or several whose rows the engine stacks), not yet
    /// read: [`Values::for_each_block`] reads them a block of the file at a time.
    Blocks(Blocks<'a>),
}

/// The HF tensors behind [`Values::Blocks`].
pub(crate) struct Blocks<'a> {
    ckpt: &'a Checkpoint,
    /// The tensors' names in the checkpoint, in the engine's order.
    parts: Vec<String>,
    /// Values in one row of each (1 for a vector).
    row: usize,
    len: usize,
}

impl Values<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Values::Whole(v) => v.len(),
            Values::Blocks(b) => b.len,
        }
    }

    /// Hands `f` the values in order, a block of whole rows at a time (all at once when held whole), each
    /// checked finite before `f` sees it: a value that is not is reported under its HF name and index.
    pub(crate) fn for_each_block(self, mut f: impl FnMut(&[f32]) -> Result<()>) -> Result<()> {
        let b = match self {
            Values::Whole(v) => return f(&v),
            Values::Blocks(b) => b,
        };
        b.parts.iter().try_for_each(|part| b.for_each_block_of(part, &mut f))
    }

    /// The values in one vector.
    pub(crate) fn into_vec(self) -> Result<Vec<f32>> {
        if let Values::Whole(v) = self {
            return Ok(v);
        }
        let mut all = Vec::with_capacity(self.len());
        self.for_each_block(|block| {
            all.extend_from_slice(block);
            Ok(())
        })?;
        Ok(all)
    }
}

impl Blocks<'_> {
    /// The values of HF tensor `part` (one of [`Blocks::parts`]) a block of whole rows at a time, each
    /// checked finite before `f` sees it.
    fn for_each_block_of(&self, part: &str, f: &mut impl FnMut(&[f32]) -> Result<()>) -> Result<()> {
        let mut at = 0;
        self.ckpt.for_each_block(part, self.row, |block| {
            if let Some(i) = block.iter().position(|x| !x.is_finite()) {
                let problems = vec![not_finite(part, at + i, block[i])];
                return Err(Error::Weights { path: self.ckpt.path.clone(), problems });
            }
            at += block.len();
            f(block)
        })
    }
}

fn not_finite(hf_name: &str, index: usize, value: f32) -> String {
    format!(
        "tensor `{hf_name}`: value {value} at flat index {index} is not finite; the checkpoint is corrupt or diverged"
    )
}

/// Reads the checkpoint tensor by tensor in engine layout, handing each engine tensor (`layers.3.w_in`)
/// to `place` as soon as it can: those whose HF layout is the engine's (all of Llama's and its
/// relatives': one tensor, or q/k/v and gate/up rows stacked) as [`Values::Blocks`], so a caller can
/// store them another way a block at a time and never hold them whole in f32; the others converted.
/// Every problem is collected as [`params_from_checkpoint`] says, `place`'s own among them; once one is
/// found nothing more is placed (the rest is still read, to report every problem). Returns how many
/// tensors were placed.
pub(crate) fn read_tensors(
    ckpt: &Checkpoint,
    config: &ModelConfig,
    mut place: impl FnMut(&str, Values<'_>) -> Result<()>,
) -> Result<usize> {
    let entries = plan(config.naming, &config.decoder).map_err(|e| internal(ckpt, &e.0))?;
    let mut problems = Vec::new();
    let mut used = HashSet::new();
    let mut placed = 0;
    for entry in &entries {
        let Some(found) = find_parts(ckpt, config, entry, &mut used, &mut problems) else { continue };
        let Some(values) = entry_values(ckpt, config, entry, found, &mut problems) else { continue };
        let result = match problems.is_empty() {
            true => place(&entry.engine, values).map(|()| placed += 1),
            // Nothing is placed after a problem, but every value is still checked.
            false => values.for_each_block(|_| Ok(())),
        };
        if let Err(e) = result {
            match e {
                Error::Weights { problems: p, .. } => problems.extend(p),
                e => problems.push(e.to_string()),
            }
        }
    }
    unexpected(ckpt, config, &used, &mut problems);
    if !problems.is_empty() {
        return Err(Error::Weights { path: ckpt.path.clone(), problems });
    }
    Ok(placed)
}

/// Checks every name and shape the checkpoint must hold for `config`, from its header alone (no values
/// read), reporting every problem as [`read_tensors`] does; returns the plan to read it by
/// ([`read_entry`]).
pub(crate) fn check_names(ckpt: &Checkpoint, config: &ModelConfig) -> Result<Vec<Entry>> {
    let entries = plan(config.naming, &config.decoder).map_err(|e| internal(ckpt, &e.0))?;
    let (mut problems, mut used) = (Vec::new(), HashSet::new());
    for entry in &entries {
        find_parts(ckpt, config, entry, &mut used, &mut problems);
    }
    unexpected(ckpt, config, &used, &mut problems);
    match problems.is_empty() {
        true => Ok(entries),
        false => Err(Error::Weights { path: ckpt.path.clone(), problems }),
    }
}

/// The values of one engine tensor of a checkpoint [`check_names`] passed, in engine layout.
pub(crate) fn read_entry(ckpt: &Checkpoint, config: &ModelConfig, entry: &Entry) -> Result<Vec<f32>> {
    let mut problems = Vec::new();
    let found = find_parts(ckpt, config, entry, &mut HashSet::new(), &mut problems);
    let values = found.and_then(|found| entry_values(ckpt, config, entry, found, &mut problems));
    match values {
        Some(values) if problems.is_empty() => values.into_vec(),
        _ => Err(Error::Weights { path: ckpt.path.clone(), problems }),
    }
}

/// HF tensor `part` of `entry` (of a checkpoint [`check_names`] passed; one whose layout is the engine's,
/// [`streams`]) handed to `f` a block of whole rows at a time, each checked finite.
pub(crate) fn read_part(
    ckpt: &Checkpoint,
    config: &ModelConfig,
    entry: &Entry,
    part: usize,
    mut f: impl FnMut(&[f32]) -> Result<()>,
) -> Result<()> {
    let mut problems = Vec::new();
    let found = find_parts(ckpt, config, entry, &mut HashSet::new(), &mut problems);
    let values = found.and_then(|found| entry_values(ckpt, config, entry, found, &mut problems));
    match values {
        Some(Values::Blocks(b)) if problems.is_empty() && part < b.parts.len() => {
            b.for_each_block_of(&b.parts[part], &mut f)
        }
        _ if problems.is_empty() => Err(internal(ckpt, &entry.engine)),
        _ => Err(Error::Weights { path: ckpt.path.clone(), problems }),
    }
}

/// The checkpoint's names of `entry`'s HF tensors (each recorded in `used`), if every one is there at
/// its shape; what is not goes to `problems`.
fn find_parts(
    ckpt: &Checkpoint,
    config: &ModelConfig,
    entry: &Entry,
    used: &mut HashSet<String>,
    problems: &mut Vec<String>,
) -> Option<Vec<String>> {
    let mut found = Vec::with_capacity(entry.hf.len());
    for (name, want) in &entry.hf {
        let Some(name) = aliases(config.naming, name).into_iter().find(|n| ckpt.info(n).is_some()) else {
            problems.push(format!("missing tensor `{name}` (expected shape {want:?})"));
            continue;
        };
        used.insert(name.clone());
        let shape = ckpt.info(&name).map(|i| i.shape.clone()).unwrap_or_default();
        if &shape != want {
            problems.push(format!("tensor `{name}`: expected shape {want:?}, found {shape:?}"));
            continue;
        }
        found.push(name);
    }
    (found.len() == entry.hf.len()).then_some(found)
}

/// `entry`'s values from its HF tensors `found`: blocks where the layouts agree ([`streams`]), else read
/// whole, checked finite (what is not goes to `problems`) and converted.
fn entry_values<'a>(
    ckpt: &'a Checkpoint,
    config: &ModelConfig,
    entry: &Entry,
    found: Vec<String>,
    problems: &mut Vec<String>,
) -> Option<Values<'a>> {
    if streams(entry) {
        let row = entry.hf[0].1.iter().skip(1).product();
        let len = entry.hf.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        return Some(Values::Blocks(Blocks { ckpt, parts: found, row, len }));
    }
    let mut parts = Vec::with_capacity(found.len());
    for name in &found {
        match ckpt.read_f32(name) {
            Ok(t) => match t.data.iter().position(|x| !x.is_finite()) {
                Some(i) => problems.push(not_finite(name, i, t.data[i])),
                None => parts.push(t.data),
            },
            Err(e) => problems.push(e.to_string()),
        }
    }
    (parts.len() == found.len()).then(|| Values::Whole(to_engine(entry, parts, &config.decoder)))
}

/// A problem for each tensor of the checkpoint that no entry used and the naming row does not ignore.
fn unexpected(ckpt: &Checkpoint, config: &ModelConfig, used: &HashSet<String>, problems: &mut Vec<String>) {
    for name in ckpt.names() {
        if !used.contains(name) && !ignored(config.naming, &config.decoder, name) {
            let shape = ckpt.info(name).map(|i| i.shape.clone()).unwrap_or_default();
            problems.push(format!("unexpected tensor `{name}` (shape {shape:?})"));
        }
    }
}

/// The most a load of `config`'s checkpoint holds beyond the tensors it keeps (or stores from them): one
/// block of the file and its values in f32 ([`crate::safetensors::BLOCK_BYTES`], up to twice that in
/// f32 from a 16-bit file), or a converted tensor (GPT-2's transposed Conv1D weights, NeoX's q/k/v) whole
/// in f32 beside its HF copy. The memory estimate of a stored base counts it.
pub fn load_transient_bytes(config: &ModelConfig) -> u64 {
    // A config the name table cannot map is refused by the load itself.
    let entries = plan(config.naming, &config.decoder).unwrap_or_default();
    let block = 3 * crate::safetensors::BLOCK_BYTES as u64;
    let converted = entries.iter().filter(|e| !streams(e));
    let whole = converted.map(|e| 8 * e.hf.iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum::<u64>());
    whole.fold(block, u64::max)
}

/// Whether `entry`'s HF tensors, read in order, are the engine tensor's values (no transpose or
/// de-interleave), so [`read_tensors`] can hand them over a block at a time.
fn streams(entry: &Entry) -> bool {
    match entry.layout {
        Hf::Same(_) | Hf::Rows(_) => true,
        Hf::Conv1D(_) => entry.hf[0].1.len() != 2,
        Hf::HeadsInterleaved(_) => false,
    }
}

fn internal(ckpt: &Checkpoint, engine_name: &str) -> Error {
    Error::Weights {
        path: ckpt.path.clone(),
        problems: vec![format!(
            "internal: the name table and engine::Params disagree on `{engine_name}`; please report this"
        )],
    }
}

/// Checks that `params` has exactly the tensors and shapes `config` implies.
pub fn check_params(config: &ModelConfig, params: &Params) -> std::result::Result<(), String> {
    let want = Params::zeros(&config.decoder);
    let (a, b) = (want.named(), params.named());
    let mut problems = Vec::new();
    for (name, t) in &a {
        match b.iter().find(|(n, _)| n == name) {
            None => problems.push(format!("`{name}` missing")),
            Some((_, p)) if p.shape != t.shape || p.data.len() != t.data.len() => {
                problems.push(format!("`{name}`: expected shape {:?}, found {:?}", t.shape, p.shape))
            }
            Some(_) => {}
        }
    }
    for (name, _) in &b {
        if !a.iter().any(|(n, _)| n == name) {
            problems.push(format!("`{name}` not expected by the config"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// The inverse of loading: `(HF name, HF shape, values)` for every tensor, as transformers saves them
/// (a tied model has no `lm_head.weight` / `embed_out.weight`). A copy of the whole model: to write it,
/// [`HfTensors`] converts one tensor at a time.
///
/// `params` must match `config` ([`check_params`]); it does when it came from [`load_params`] or
/// `Params::zeros(&config.decoder)`. Panics otherwise (a programming error, not bad input).
pub fn to_hf_tensors(config: &ModelConfig, params: &Params) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let hf = HfTensors::new(config, params);
    hf.shapes
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| (name.clone(), shape.clone(), hf.values(i).into_owned()))
        .collect()
}

/// A model's tensors as transformers names and shapes them, each one's values made on request: borrowed
/// where the layouts agree, converted (a transpose, a de-interleave) into a new buffer where they do not.
pub struct HfTensors<'a> {
    /// `(HF name, HF shape)` of every tensor.
    pub shapes: Vec<(String, Vec<usize>)>,
    /// Per tensor: its engine tensor, the plan entry it comes from and which of the entry's HF parts it is.
    sources: Vec<(&'a Tensor, usize, usize)>,
    entries: Vec<Entry>,
    cfg: &'a DecoderConfig,
}

impl<'a> HfTensors<'a> {
    /// The tensors of `params` (which must match `config`, as for [`to_hf_tensors`]).
    pub fn new(config: &'a ModelConfig, params: &'a Params) -> Self {
        let named = params.named();
        let entries = plan(config.naming, &config.decoder)
            .unwrap_or_else(|e| panic!("to_hf_tensors: the naming table has no HF module for `{}`", e.0));
        let (mut shapes, mut sources) = (Vec::new(), Vec::new());
        for (e, entry) in entries.iter().enumerate() {
            let Some(&(_, t)) = named.iter().find(|(n, _)| *n == entry.engine) else {
                panic!("to_hf_tensors: params lack `{}`; they do not match the config", entry.engine)
            };
            for (part, (name, shape)) in entry.hf.iter().enumerate() {
                shapes.push((name.clone(), shape.clone()));
                sources.push((t, e, part));
            }
        }
        HfTensors { shapes, sources, entries, cfg: &config.decoder }
    }

    /// The values of tensor `i` (of [`HfTensors::shapes`]) in transformers' layout.
    pub fn values(&self, i: usize) -> Cow<'a, [f32]> {
        let (t, e, part) = self.sources[i];
        to_hf_part(&self.entries[e], part, &t.data, self.cfg)
    }
}

/// Part `part` of `entry`'s HF tensors in transformers' layout, from the engine tensor's values `data`:
/// borrowed where the layouts agree, converted into a new buffer where they do not.
fn to_hf_part<'d>(entry: &Entry, part: usize, data: &'d [f32], cfg: &DecoderConfig) -> Cow<'d, [f32]> {
    let s = &entry.hf[0].1;
    match entry.layout {
        Hf::Rows(_) => {
            let start: usize = entry.hf[..part].iter().map(|(_, s)| s.iter().product::<usize>()).sum();
            let n: usize = entry.hf[part].1.iter().product();
            Cow::Borrowed(&data[start..start + n])
        }
        Hf::Conv1D(_) if s.len() == 2 => Cow::Owned(transpose(data, s[1], s[0])),
        Hf::HeadsInterleaved(_) => {
            let cols = if s.len() == 2 { s[1] } else { 1 };
            Cow::Owned(neox_qkv(data, cfg.n_heads, cfg.head_dim, cols, true))
        }
        Hf::Same(_) | Hf::Conv1D(_) => Cow::Borrowed(data),
    }
}

/// Where [`HfValues`] takes a model's tensors from (a base held in memory or read from its file, with an
/// adapter merged in or not).
pub(crate) trait EngineTensors {
    /// The engine tensor of `entry`, whole (one whose HF layout is converted: [`streams`] is false).
    fn whole(&self, entry: &Entry) -> Result<Vec<f32>>;

    /// HF tensor `part` of `entry` (one [`streams`]: the engine tensor's rows `first..`, in its layout),
    /// handed to `out` in blocks of whole rows.
    fn blocks(&self, entry: &Entry, part: usize, first: usize, out: &mut dyn FnMut(&[f32]) -> Result<()>)
        -> Result<()>;
}

/// A model's tensors in transformers' names and layouts, each made on request from [`EngineTensors`]:
/// one whose layout is the engine's (every Llama-like weight, q/k/v and gate/up parts included) a block of
/// rows at a time, never whole; one that is converted (GPT-2's Conv1D, NeoX's q/k/v) from its engine tensor
/// whole. So at most [`merge_transient_bytes`] is held, never a copy of the model. Writing a merged model
/// ([`write_weights_with`]) and exporting one to GGUF take its tensors so.
pub(crate) struct HfValues<'c, S> {
    cfg: &'c DecoderConfig,
    entries: Vec<Entry>,
    /// `(HF name, HF shape)` of every tensor, in plan order (an entry's parts together).
    pub(crate) shapes: Vec<(String, Vec<usize>)>,
    /// Per tensor: its plan entry, which of the entry's HF parts it is, and the part's first row of the
    /// engine tensor.
    sources: Vec<(usize, usize, usize)>,
    source: &'c S,
}

impl<'c, S: EngineTensors> HfValues<'c, S> {
    pub(crate) fn new(config: &'c ModelConfig, source: &'c S) -> Result<Self> {
        let entries = plan(config.naming, &config.decoder)
            .map_err(|e| Error::dir(&config.path, format!("internal: no HF module for `{}`", e.0)))?;
        let (mut shapes, mut sources) = (Vec::new(), Vec::new());
        for (e, entry) in entries.iter().enumerate() {
            let mut first = 0;
            for (part, (name, shape)) in entry.hf.iter().enumerate() {
                shapes.push((name.clone(), shape.clone()));
                sources.push((e, part, first));
                first += shape.first().copied().unwrap_or(1);
            }
        }
        Ok(HfValues { cfg: &config.decoder, entries, shapes, sources, source })
    }

    /// Whether tensor `i` comes a block at a time (its layout is the engine's).
    pub(crate) fn streams(&self, i: usize) -> bool {
        streams(&self.entries[self.sources[i].0])
    }

    /// The values of tensor `i` (of [`HfValues::shapes`]), in transformers' layout, handed to `out` in
    /// blocks of whole rows (one block where it is converted).
    pub(crate) fn for_each_block(&self, i: usize, out: &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()> {
        let (e, part, first) = self.sources[i];
        let entry = &self.entries[e];
        if streams(entry) {
            return self.source.blocks(entry, part, first, out);
        }
        let data = self.source.whole(entry)?;
        out(&to_hf_part(entry, part, &data, self.cfg))
    }

    /// The values of tensor `i` in one vector.
    pub(crate) fn whole(&self, i: usize) -> Result<Vec<f32>> {
        let mut all = Vec::with_capacity(self.shapes[i].1.iter().product());
        self.for_each_block(i, &mut |block| {
            all.extend_from_slice(block);
            Ok(())
        })?;
        Ok(all)
    }
}

/// Writes the weights of `config` to `path` in `dtype` as [`crate::save_model`] does (the same bytes for
/// the same values in f32), each tensor of [`HfValues`] taken when the file, which runs in name order,
/// reaches it. `source`'s first error stops the write (nothing is left at `path`).
pub(crate) fn write_weights_with(
    path: &Path,
    config: &ModelConfig,
    dtype: WriteDtype,
    source: &impl EngineTensors,
) -> Result<()> {
    let values = HfValues::new(config, source)?;
    crate::safetensors::write_blocks_with(path, &values.shapes, dtype, |i, out| values.for_each_block(i, out))
}

/// Bytes [`HfValues`] holds for `config` beyond the values it hands over: a block of the file read, its
/// values in f32 and a merged copy of them; or a converted tensor (GPT-2's transposed Conv1D, NeoX's
/// q/k/v) whole and its copy in the other layout, in f32.
pub fn merge_transient_bytes(config: &ModelConfig) -> u64 {
    // The load's block and its f32 values, and the merged copy of those values.
    load_transient_bytes(config).max(5 * crate::safetensors::BLOCK_BYTES as u64)
}

/// HF parts (in `entry.hf` order, shapes already checked) → engine data.
fn to_engine(entry: &Entry, parts: Vec<Vec<f32>>, cfg: &DecoderConfig) -> Vec<f32> {
    let s = &entry.hf[0].1;
    match entry.layout {
        Hf::Rows(_) => parts.concat(),
        Hf::Conv1D(_) if s.len() == 2 => transpose(&parts[0], s[0], s[1]),
        Hf::HeadsInterleaved(_) => {
            let cols = if s.len() == 2 { s[1] } else { 1 };
            neox_qkv(&parts[0], cfg.n_heads, cfg.head_dim, cols, false)
        }
        Hf::Same(_) | Hf::Conv1D(_) => parts.into_iter().next().unwrap_or_default(),
    }
}

/// `[rows, cols]` → `[cols, rows]`.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = x[r * cols + c];
        }
    }
    out
}

/// Rows `[n_heads, 3, head_dim]` (NeoX) ↔ `[3, n_heads, head_dim]` (engine: q rows, k rows, v rows); each
/// row has `cols` values. `to_hf` selects the direction.
pub(crate) fn neox_qkv(x: &[f32], n_heads: usize, head_dim: usize, cols: usize, to_hf: bool) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    let block = head_dim * cols;
    for h in 0..n_heads {
        for j in 0..3 {
            let hf = (h * 3 + j) * block;
            let en = (j * n_heads + h) * block;
            let (src, dst) = if to_hf { (en, hf) } else { (hf, en) };
            out[dst..dst + block].copy_from_slice(&x[src..src + block]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neox_deinterleave_is_inverted() {
        // 2 heads, head_dim 1, 2 columns: rows q0 k0 v0 q1 k1 v1.
        let hf: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let en = neox_qkv(&hf, 2, 1, 2, false);
        assert_eq!(en, vec![0., 1., 6., 7., 2., 3., 8., 9., 4., 5., 10., 11.]);
        assert_eq!(neox_qkv(&en, 2, 1, 2, true), hf);
    }

    #[test]
    fn transpose_is_inverted() {
        let x: Vec<f32> = (0..6).map(|x| x as f32).collect();
        let t = transpose(&x, 2, 3);
        assert_eq!(t, vec![0., 3., 1., 4., 2., 5.]);
        assert_eq!(transpose(&t, 3, 2), x);
    }
}
