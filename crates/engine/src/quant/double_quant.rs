//! Double quantisation of NF4 absmax values, as bitsandbytes' `quantize_4bit(.., compress_statistics=True)`
//! does it: the absmax values minus their mean (the `offset`) are quantised with the 8-bit signed
//! dynamic map ([`DYNAMIC_MAP`]) in blocks of [`STATS_BLOCK`], each block with its own f32 absmax; an absmax
//! is recovered as `DYNAMIC_MAP[q] * scale[block] + offset`. This turns 32 bits per 64 weights into
//! 8 (+ 32 per 16384 weights): 0.5 to 0.127 bits per weight.
//!
//! Rounding follows bitsandbytes' CPU blockwise quantiser: `x / absmax` (an f32 division), then the nearest
//! map value, measured as the f32 distance `|x - map[i]|`, a tie going to the lower index.
//!
//! The offset is the mean of the absmax values, summed in f64 and rounded once to f32; torch's f32 mean
//! (which bitsandbytes uses) can differ from it in the last bit.

/// Absmax values per second-level block (bitsandbytes' fixed 256).
pub const STATS_BLOCK: usize = 256;

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`, as stored in its
/// quantisation state): a dynamic exponent with a shrinking fraction, 0 and 1.0, sorted. Its generator
/// depends on `torch.linspace`'s rounding, so the published values are listed rather than regenerated.
#[allow(clippy::excessive_precision, clippy::approx_constant)]
#[rustfmt::skip]
pub const DYNAMIC_MAP: [f32; 256] = [
    -0.99296874, -0.9789063, -0.96484375, -0.9507812, -0.93671876, -0.92265624, -0.9085938, -0.89453125,
    -0.8804687, -0.86640626, -0.85234374, -0.8382813, -0.82421875, -0.8101562, -0.79609376, -0.78203124,
    -0.7679688, -0.75390625, -0.7398437, -0.72578126, -0.7117188, -0.6976563, -0.68359375, -0.6695312,
    -0.65546876, -0.6414063, -0.6273438, -0.61328125, -0.5992187, -0.58515626, -0.5710938, -0.5570313,
    -0.54296875, -0.5289062, -0.5148437, -0.50078124, -0.4867187, -0.47265625, -0.45859373, -0.44453126,
    -0.43046874, -0.41640624, -0.40234375, -0.38828123, -0.37421876, -0.36015624, -0.34609374, -0.33203125,
    -0.31796873, -0.30390626, -0.28984374, -0.27578127, -0.26171875, -0.24765624, -0.23359375, -0.21953125,
    -0.20546874, -0.19140625, -0.17734376, -0.16328125, -0.14921875, -0.13515624, -0.12109375, -0.107031256,
    -0.09859375, -0.09578126, -0.092968754, -0.09015625, -0.08734375, -0.08453125, -0.08171876, -0.07890625,
    -0.07609375, -0.07328125, -0.070468746, -0.067656256, -0.06484375, -0.06203125, -0.059218753, -0.05640625,
    -0.05359375, -0.05078125, -0.04796875, -0.04515625, -0.042343747, -0.03953125, -0.036718752, -0.03390625,
    -0.03109375, -0.028281251, -0.02546875, -0.02265625, -0.019843752, -0.01703125, -0.01421875, -0.01140625,
    -0.00971875, -0.009156249, -0.00859375, -0.00803125, -0.00746875, -0.00690625, -0.00634375, -0.00578125,
    -0.0052187503, -0.0046562497, -0.00409375, -0.0035312497, -0.00296875, -0.00240625, -0.00184375, -0.0012812499,
    -0.0009437501, -0.00083125, -0.00071875006, -0.0006062501, -0.00049375003, -0.00038125002, -0.00026875004, -0.00015625001,
    -0.00008875, -0.00006625, -0.00004375, -0.000021249998, -0.00000775, -0.0000032500002, -0.00000055000004, 0.0,
    0.00000055000004, 0.0000032500002, 0.00000775, 0.000021249998, 0.00004375, 0.00006625, 0.00008875, 0.00015625001,
    0.00026875004, 0.00038125002, 0.00049375003, 0.0006062501, 0.00071875006, 0.00083125, 0.0009437501, 0.0012812499,
    0.00184375, 0.00240625, 0.00296875, 0.0035312497, 0.00409375, 0.0046562497, 0.0052187503, 0.00578125,
    0.00634375, 0.00690625, 0.00746875, 0.00803125, 0.00859375, 0.009156249, 0.00971875, 0.01140625,
    0.01421875, 0.01703125, 0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375, 0.03390625,
    0.036718752, 0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125, 0.05359375, 0.05640625,
    0.059218753, 0.06203125, 0.06484375, 0.067656256, 0.070468746, 0.07328125, 0.07609375, 0.07890625,
    0.08171876, 0.08453125, 0.08734375, 0.09015625, 0.092968754, 0.09578126, 0.09859375, 0.107031256,
    0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376, 0.19140625, 0.20546874, 0.21953125,
    0.23359375, 0.24765624, 0.26171875, 0.27578127, 0.28984374, 0.30390626, 0.31796873, 0.33203125,
    0.34609374, 0.36015624, 0.37421876, 0.38828123, 0.40234375, 0.41640624, 0.43046874, 0.44453126,
    0.45859373, 0.47265625, 0.4867187, 0.50078124, 0.5148437, 0.5289062, 0.54296875, 0.5570313,
    0.5710938, 0.58515626, 0.5992187, 0.61328125, 0.6273438, 0.6414063, 0.65546876, 0.6695312,
    0.68359375, 0.6976563, 0.7117188, 0.72578126, 0.7398437, 0.75390625, 0.7679688, 0.78203124,
    0.79609376, 0.8101562, 0.82421875, 0.8382813, 0.85234374, 0.86640626, 0.8804687, 0.89453125,
    0.9085938, 0.92265624, 0.93671876, 0.9507812, 0.96484375, 0.9789063, 0.99296874, 1.0,
];

/// Absmax values stored as 8-bit codes with second-level f32 scales and an offset.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuant {
    codes: Vec<u8>,
    scales: Vec<f32>,
    offset: f32,
}

impl DoubleQuant {
    /// Quantises `absmax` (finite values).
    pub fn quantize(absmax: &[f32]) -> Self {
        let offset = if absmax.is_empty() {
            0.0
        } else {
            (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32
        };
        Self::quantize_with_offset(absmax, offset)
    }

    /// As [`Self::quantize`] with a given offset (bitsandbytes' own, to compare bit for bit).
    pub fn quantize_with_offset(absmax: &[f32], offset: f32) -> Self {
        let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let mut codes = Vec::with_capacity(centred.len());
        let mut scales = Vec::with_capacity(centred.len().div_ceil(STATS_BLOCK));
        for block in centred.chunks(STATS_BLOCK) {
            let scale = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            scales.push(scale);
            codes.extend(block.iter().map(|&v| nearest_code(v / scale)));
        }
        DoubleQuant { codes, scales, offset }
    }

    /// Wraps bitsandbytes' arrays: one code per absmax, one scale per [`STATS_BLOCK`] codes.
    pub fn from_parts(codes: Vec<u8>, scales: Vec<f32>, offset: f32) -> Result<Self, super::QuantError> {
        if scales.len() != codes.len().div_ceil(STATS_BLOCK) {
            let want = codes.len().div_ceil(STATS_BLOCK);
            return Err(super::QuantError::Length { what: "second-level scales", want, got: scales.len() });
        }
        Ok(DoubleQuant { codes, scales, offset })
    }

    /// Number of absmax values.
    pub fn len(&self) -> usize {
        self.codes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }

    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    pub fn offset(&self) -> f32 {
        self.offset
    }

    /// Absmax `b` as bitsandbytes' `dequantize_blockwise(..) + offset` gives it.
    #[inline]
    pub fn get(&self, b: usize) -> f32 {
        DYNAMIC_MAP[self.codes[b] as usize] * self.scales[b / STATS_BLOCK] + self.offset
    }

    pub(super) fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len() + 4
    }
}

/// The index of the map value nearest to `x` (NaN, from a zero block's `0 / 0`, maps to the lowest index
/// as bitsandbytes' search does not define it; such a block's values are all the offset anyway).
fn nearest_code(x: f32) -> u8 {
    // The last index whose value is <= x (0 when x is below the map).
    let left = DYNAMIC_MAP.partition_point(|&m| m <= x).saturating_sub(1);
    let right = (left + 1).min(255);
    let pick = if (x - DYNAMIC_MAP[right]).abs() < (x - DYNAMIC_MAP[left]).abs() { right } else { left };
    pick as u8
}
