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

/// `out[i] = from_f32(src[i])`. The loop has no branch (`from_f32`'s NaN test becomes a select), so the
/// compiler vectorises it on any x86-64; it streams memory, so explicit SIMD would gain little.
pub fn narrow_into(src: &[f32], out: &mut [u16]) {
    assert_eq!(src.len(), out.len(), "bf16::narrow_into: lengths differ");
    for (o, &x) in out.iter_mut().zip(src) {
        *o = from_f32(x);
    }
}

/// `x` rounded to the nearest bf16, kept as an f32.
pub fn round(x: f32) -> f32 {
    to_f32(from_f32(x))
}

/// `v[i] = round(v[i])`: each value rounded to the nearest bf16, kept as an f32.
pub fn round_in_place(v: &mut [f32]) {
    for x in v {
        *x = round(*x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrowing_and_rounding_match_the_scalar_definition() {
        // Ties both ways, NaN, infinities, overflow past the largest bf16, subnormals, signed zeros, and a
        // length that is no multiple of any vector width.
        let mut v: Vec<f32> = [
            1.0,
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
            f32::from_bits(0x3F80_8001),
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            f32::from_bits(0x0000_0001),
            -0.0,
            0.0,
        ]
        .to_vec();
        v.extend((0..37).map(|i| (i as f32 * 0.731).sin() * 10f32.powi(i % 9 - 4)));
        let mut narrow = vec![0u16; v.len()];
        narrow_into(&v, &mut narrow);
        let mut rounded = v.clone();
        round_in_place(&mut rounded);
        for ((&x, &h), &r) in v.iter().zip(&narrow).zip(&rounded) {
            assert_eq!(h, from_f32(x), "{x:e}");
            assert_eq!(r.to_bits(), to_f32(from_f32(x)).to_bits(), "{x:e}");
        }
        assert_eq!(narrow[1], 0x3F80, "a tie rounds to the even neighbour");
        assert_eq!(narrow[2], 0x3F82, "a tie rounds to the even neighbour");
        assert_eq!(narrow[4], 0x7FC0);
        assert_eq!(narrow[8], 0x7F80, "past the largest bf16: infinity");
    }
}
