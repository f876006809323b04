//! NF4 storage as bitsandbytes does it (`quantize_4bit(.., quant_type="nf4", blocksize=64)`):
//! - the row-major matrix, flattened, is cut into blocks of [`BLOCK`] values; each block keeps its absmax
//!   (an f32) and each value the index (a nibble) of the code book value nearest to `value / absmax`;
//! - two values per byte, the first of each pair in the high nibble (`(q[2i] << 4) | q[2i + 1]`), an odd
//!   count padded with the nibble of 0.0 (7), as bitsandbytes pads with a zero value;
//! - a value is `NF4_CODE[nibble] * absmax`, one f32 multiply;
//! - the absmax values may themselves be quantised ([`super::double_quant`]: bitsandbytes'
//!   `compress_statistics`).
//!
//! Rounding follows bitsandbytes' CPU quantiser (its default backend, which the CPU runs): the value is
//! scaled by the f32 reciprocal of the absmax (`x * (1 / absmax)`, not `x / absmax`), clamped to
//! `[-1, 1]`, and bucketed against the f32 midpoints `(code[i] + code[i + 1]) / 2` with ties (a value
//! exactly on a midpoint) going to the lower code. A block of zeros has absmax 0 and all nibbles 7 (0.0).

use rayon::prelude::*;

use super::double_quant::DoubleQuant;
use super::QuantError;

/// Values per absmax block (bitsandbytes' default `blocksize` for 4-bit weights, and QLoRA's).
pub const BLOCK: usize = 64;

/// The 16 NormalFloat values (bitsandbytes' `get_4bit_type("nf4")`): quantiles of N(0, 1) scaled to
/// `[-1, 1]`, with an exact zero at index 7. Sorted, so a nibble's order is the value's order.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// The nibble of 0.0.
const ZERO_NIBBLE: u8 = 7;

/// The decision boundaries between neighbouring code values, `(code[i] + code[i + 1]) / 2` in f32.
fn midpoints() -> [f32; 15] {
    std::array::from_fn(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
}

/// The nibble of `scaled` (a value already divided by its block's absmax): the number of midpoints
/// strictly below it, so a value on a midpoint takes the lower code (torch.bucketize, right=False).
fn nibble(scaled: f32, mids: &[f32; 15]) -> u8 {
    let x = scaled.clamp(-1.0, 1.0);
    // The midpoints are sorted, so counting those below is the bucket; branch-free, it vectorises.
    mids.iter().map(|&m| (m < x) as u8).sum()
}

/// Quantises one block into `bytes` (`block.len().div_ceil(2)` of them, an odd last value padded with
/// 0.0's nibble) and returns its absmax.
fn quantize_block(block: &[f32], bytes: &mut [u8], mids: &[f32; 15]) -> f32 {
    let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    // bitsandbytes clamps the divisor to 1e-38 (a zero block scales to zeros).
    let recip = 1.0 / amax.max(1e-38);
    for (byte, pair) in bytes.iter_mut().zip(block.chunks(2)) {
        let high = nibble(pair[0] * recip, mids);
        let low = pair.get(1).map_or(ZERO_NIBBLE, |&v| nibble(v * recip, mids));
        *byte = (high << 4) | low;
    }
    amax
}

/// The absmax of each block: either the f32 values or their double quantisation.
#[derive(Clone, Debug, PartialEq)]
pub enum Scales {
    F32(Vec<f32>),
    Double(DoubleQuant),
}

impl Scales {
    /// Number of blocks.
    pub fn len(&self) -> usize {
        match self {
            Scales::F32(v) => v.len(),
            Scales::Double(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The absmax of block `b` as dequantisation uses it.
    #[inline]
    pub fn get(&self, b: usize) -> f32 {
        match self {
            Scales::F32(v) => v[b],
            Scales::Double(d) => d.get(b),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Scales::F32(v) => 4 * v.len(),
            Scales::Double(d) => d.bytes(),
        }
    }
}

/// `len` values in NF4: packed nibbles and per-block scales.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4 {
    len: usize,
    packed: Vec<u8>,
    scales: Scales,
}

impl Nf4 {
    /// Quantises `values` (any length; blocks run over them in order). Fails on a non-finite value.
    pub fn quantize(values: &[f32], double_quant: bool) -> Result<Self, QuantError> {
        let mut q = Nf4Builder::new(values.len(), double_quant);
        q.push(values)?;
        q.finish()
    }

    /// Wraps bitsandbytes' own arrays (e.g. a pre-quantised checkpoint): `packed` holds `len.div_ceil(2)`
    /// bytes and `scales` one entry per block of [`BLOCK`] values.
    pub fn from_parts(len: usize, packed: Vec<u8>, scales: Scales) -> Result<Self, QuantError> {
        if packed.len() != len.div_ceil(2) {
            return Err(QuantError::Length { what: "packed nibbles", want: len.div_ceil(2), got: packed.len() });
        }
        if scales.len() != len.div_ceil(BLOCK) {
            return Err(QuantError::Length { what: "absmax blocks", want: len.div_ceil(BLOCK), got: scales.len() });
        }
        Ok(Nf4 { len, packed, scales })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    pub fn scales(&self) -> &Scales {
        &self.scales
    }

    /// Bytes held: the nibbles and the scales.
    pub fn bytes(&self) -> usize {
        self.packed.len() + self.scales.bytes()
    }

    /// `out[i] = value(start + i)`.
    ///
    /// # Panics
    /// If the range is outside `0..len`.
    pub fn dequantize_into(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        assert!(end <= self.len, "Nf4::dequantize_into: {start}..{end} outside 0..{}", self.len);
        let mut e = start;
        while e < end {
            let b = e / BLOCK;
            let seg = (b + 1) * BLOCK - e;
            let seg = seg.min(end - e);
            let scale = self.scales.get(b);
            let dst = &mut out[e - start..e - start + seg];
            dequantize_segment(&self.packed, e, scale, dst);
            e += seg;
        }
    }
}

/// [`Nf4::quantize`] of `len` values that arrive in pieces of any length (a checkpoint read a block of
/// the file at a time): the same bytes, without the values ever held whole. Blocks are quantised as soon
/// as they are complete; the absmax values wait for [`Nf4Builder::finish`], whose double quantisation
/// centres them on their mean.
#[derive(Debug)]
pub struct Nf4Builder {
    len: usize,
    double_quant: bool,
    pushed: usize,
    packed: Vec<u8>,
    absmax: Vec<f32>,
    /// The values of the block not yet complete (fewer than [`BLOCK`]).
    tail: Vec<f32>,
}

impl Nf4Builder {
    pub fn new(len: usize, double_quant: bool) -> Self {
        Nf4Builder {
            len,
            double_quant,
            pushed: 0,
            packed: Vec::with_capacity(len.div_ceil(2)),
            absmax: Vec::with_capacity(len.div_ceil(BLOCK)),
            tail: Vec::with_capacity(BLOCK),
        }
    }

    /// The next `values`. Fails on a non-finite value (its index counted from the first value pushed) or
    /// on more than `len` values in all.
    pub fn push(&mut self, values: &[f32]) -> Result<(), QuantError> {
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            return Err(QuantError::NonFinite { index: self.pushed + at });
        }
        if self.pushed + values.len() > self.len {
            return Err(QuantError::Length { what: "values", want: self.len, got: self.pushed + values.len() });
        }
        self.pushed += values.len();
        let mut rest = values;
        if !self.tail.is_empty() {
            let take = (BLOCK - self.tail.len()).min(rest.len());
            self.tail.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.tail.len() < BLOCK {
                return Ok(());
            }
            let block = std::mem::take(&mut self.tail);
            self.quantize_blocks(&block);
            self.tail = block;
            self.tail.clear();
        }
        let whole = rest.len() / BLOCK * BLOCK;
        self.quantize_blocks(&rest[..whole]);
        self.tail.extend_from_slice(&rest[whole..]);
        Ok(())
    }

    /// The quantised values; fails unless exactly `len` were pushed.
    pub fn finish(mut self) -> Result<Nf4, QuantError> {
        if self.pushed != self.len {
            return Err(QuantError::Length { what: "values", want: self.len, got: self.pushed });
        }
        let tail = std::mem::take(&mut self.tail);
        self.quantize_blocks(&tail);
        let scales = match self.double_quant {
            true => Scales::Double(DoubleQuant::quantize(&self.absmax)),
            false => Scales::F32(self.absmax),
        };
        Ok(Nf4 { len: self.len, packed: self.packed, scales })
    }

    /// Quantises `values` as the next blocks: whole blocks, or the last one of the matrix.
    fn quantize_blocks(&mut self, values: &[f32]) {
        let mids = midpoints();
        // Every block before these is whole, so they start on a byte.
        let (bytes_at, blocks_at) = (self.packed.len(), self.absmax.len());
        self.packed.resize(bytes_at + values.len().div_ceil(2), 0);
        self.absmax.resize(blocks_at + values.len().div_ceil(BLOCK), 0.0);
        // Blocks are independent and whole bytes (BLOCK is even): 64 blocks per task.
        self.packed[bytes_at..]
            .par_chunks_mut(64 * BLOCK / 2)
            .zip(self.absmax[blocks_at..].par_chunks_mut(64))
            .zip(values.par_chunks(64 * BLOCK))
            .for_each(|((bytes, amax), v)| {
                for ((bytes, amax), block) in bytes.chunks_mut(BLOCK / 2).zip(amax).zip(v.chunks(BLOCK)) {
                    *amax = quantize_block(block, bytes, &mids);
                }
            });
    }
}

/// `dst[i] = NF4_CODE[nibble(e + i)] * scale` for a run inside one block.
fn dequantize_segment(packed: &[u8], e: usize, scale: f32, dst: &mut [f32]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if e.is_multiple_of(2) && dst.len() >= 32 && super::simd::avx512() {
        // SAFETY: AVX-512F is present; the nibbles of `e .. e + dst.len()` are in `packed` (the caller
        // checked the range against `len`), and the kernel writes only whole 32-value groups of `dst`.
        done = unsafe { super::simd::nf4_dequantize(&packed[e / 2..], scale, dst) };
    }
    for (i, d) in dst.iter_mut().enumerate().skip(done) {
        let k = e + i;
        let byte = packed[k / 2];
        let q = if k.is_multiple_of(2) { byte >> 4 } else { byte & 0x0F };
        *d = NF4_CODE[q as usize] * scale;
    }
}
