//! bf16 storage: the top 16 bits of an f32, rounded to nearest with ties to even (PyTorch's
//! `tensor.to(torch.bfloat16)`); widening back is exact (the low 16 bits become zero).

/// `x` rounded to bf16 (nearest, ties to even), as PyTorch's `round_to_nearest_even`: a NaN becomes the
/// canonical quiet NaN `0x7FC0`; values that round past the largest bf16 become infinities.
#[inline]
pub fn from_f32(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7FC0;
    }
    let bits = x.to_bits();
    let round = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// The f32 value of a bf16.
#[inline]
pub fn to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `out[i] = to_f32(src[i])`.
pub fn widen_into(src: &[u16], out: &mut [f32]) {
    assert_eq!(src.len(), out.len(), "bf16::widen_into: lengths differ");
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if super::simd::avx512() {
        // SAFETY: AVX-512F is present and both slices have the same length.
        done = unsafe { super::simd::bf16_widen(src, out) };
    }
    for (o, &h) in out.iter_mut().zip(src).skip(done) {
        *o = to_f32(h);
    }
}
