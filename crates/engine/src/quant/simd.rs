//! AVX-512F kernels for widening quantised storage to f32, chosen at run time. Each computes exactly
//! what the portable loop beside its caller computes (a table look-up and one f32 multiply, or a shift),
//! so results do not depend on the CPU.

use core::arch::x86_64::*;

use super::nf4::NF4_CODE;

/// Whether the AVX-512 kernels run: the CPU has AVX-512F and `DPO_GEMM` is not `portable` (the switch
/// the matrix-product kernels honour, so one variable selects the portable code everywhere).
pub(super) fn avx512() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        is_x86_feature_detected!("avx512f") && std::env::var("DPO_GEMM").map_or(true, |v| v != "portable")
    })
}

/// Dequantises whole groups of 32 NF4 values (16 bytes, first value in the high nibble) into
/// `dst[..32 * groups]`, `groups = dst.len() / 32`, each `NF4_CODE[nibble] * scale`. Returns the count
/// written.
///
/// # Safety
/// AVX-512F must be available; `packed` must hold at least `dst.len() / 2` bytes.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn nf4_dequantize(packed: &[u8], scale: f32, dst: &mut [f32]) -> usize {
    let groups = dst.len() / 32;
    debug_assert!(packed.len() >= groups * 16);
    let table = _mm512_loadu_ps(NF4_CODE.as_ptr());
    let scale = _mm512_set1_ps(scale);
    let low4 = _mm512_set1_epi32(0x0F);
    // Lane i of the first half takes byte i / 2's high nibble (even i) or low nibble (odd i); the second
    // half the same for bytes 8..16. Indices >= 16 select from the second permute operand (low nibbles).
    let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let (src, out) = (packed.as_ptr(), dst.as_mut_ptr());
    for g in 0..groups {
        let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(src.add(16 * g) as *const __m128i));
        let high = _mm512_srli_epi32::<4>(bytes);
        let low = _mm512_and_si512(bytes, low4);
        let q0 = _mm512_permutex2var_epi32(high, first, low);
        let q1 = _mm512_permutex2var_epi32(high, second, low);
        let v0 = _mm512_mul_ps(_mm512_permutexvar_ps(q0, table), scale);
        let v1 = _mm512_mul_ps(_mm512_permutexvar_ps(q1, table), scale);
        _mm512_storeu_ps(out.add(32 * g), v0);
        _mm512_storeu_ps(out.add(32 * g + 16), v1);
    }
    groups * 32
}

/// Widens `src[..16 * groups]` from bf16 into `out`, `groups = src.len() / 16`; returns the count.
///
/// # Safety
/// AVX-512F must be available; `out` must be at least as long as `src`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn bf16_widen(src: &[u16], out: &mut [f32]) -> usize {
    let groups = src.len() / 16;
    debug_assert!(out.len() >= groups * 16);
    let (s, o) = (src.as_ptr(), out.as_mut_ptr());
    for g in 0..groups {
        let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(s.add(16 * g) as *const __m256i));
        _mm512_storeu_ps(o.add(16 * g), _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h)));
    }
    groups * 16
}
