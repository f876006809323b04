//! The worker pool every kernel runs on, and the floating-point mode of its threads.
//!
//! Kernels parallelise with rayon's global pool. Its threads (and the caller's) run with flush-to-zero and
//! denormals-are-zero: subnormal f32 values appear in softmax tails and in gradients of saturated units and
//! cost ~100 cycles per operation on x86 without these bits. PyTorch sets the same mode
//! (`torch.set_flush_denormal(True)`) in the reference runs this engine is compared with.

/// Builds rayon's global pool with `n` threads (`0` = rayon's default, one per core) whose threads run
/// with flush-to-zero and denormals-are-zero, and sets the same mode on the calling thread.
///
/// The global pool can be built once per process; later calls only set the calling thread's mode.
pub fn init_threads(n: usize) {
    set_flush_denormals();
    // An error means the pool already exists (an earlier call, or a kernel that ran first); keep it.
    let _ = rayon::ThreadPoolBuilder::new().num_threads(n).start_handler(|_| set_flush_denormals()).build_global();
}

/// Threads in the pool kernels run on.
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}

/// Sets MXCSR.FZ (bit 15) and MXCSR.DAZ (bit 6) on the calling thread; a no-op off x86-64.
fn set_flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    #[allow(deprecated)]
    // SAFETY: SSE is part of the x86-64 baseline; changing the denormal mode does not affect memory safety.
    unsafe {
        use core::arch::x86_64::{_mm_getcsr, _mm_setcsr};
        _mm_setcsr(_mm_getcsr() | (1 << 15) | (1 << 6));
    }
}

/// Helpers shared by the kernel tests: a deterministic generator and comparisons.
#[cfg(test)]
pub(crate) mod test_util {
    /// SplitMix64: small, deterministic, good enough for test data.
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Self {
            Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
        }

        pub fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in `[-1, 1)`.
        pub fn uniform(&mut self) -> f32 {
            ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }

        pub fn below(&mut self, n: usize) -> usize {
            (self.next_u64() % n as u64) as usize
        }

        /// `n` values uniform in `[-scale, scale)`.
        pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
            (0..n).map(|_| self.uniform() * scale).collect()
        }
    }

    /// Largest `|a - b| / max(|b|, floor)` over the elements; panics with the worst index above `tol`.
    #[track_caller]
    pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64, floor: f64) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let mut worst = (0.0f64, 0usize);
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let e = (g as f64 - w).abs() / w.abs().max(floor);
            if e.is_nan() || e > worst.0 {
                worst = (if e.is_nan() { f64::INFINITY } else { e }, i);
            }
        }
        let i = worst.1;
        assert!(
            worst.0 <= tol,
            "{what}: error {:.3e} at {i}: got {} want {}",
            worst.0,
            got.get(i).copied().unwrap_or(f32::NAN),
            want.get(i).copied().unwrap_or(f64::NAN)
        );
    }

    /// Relative Frobenius error `|a - b| / max(|b|, tiny)` over a whole tensor.
    #[track_caller]
    pub fn assert_close_norm(what: &str, got: &[f32], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (&g, &w) in got.iter().zip(want) {
            num += (g as f64 - w).powi(2);
            den += w * w;
        }
        let e = num.sqrt() / den.sqrt().max(1e-30);
        assert!(e <= tol, "{what}: relative error {e:.3e} (norm {:.3e})", den.sqrt());
    }

    pub fn to_f64(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_sets_flush_to_zero_on_the_caller() {
        init_threads(2);
        assert!(num_threads() >= 1);
        // (The pool's threads get the same mode when `init_threads` is what builds the pool; another
        // test may have used rayon first in this process, so only the caller's mode is checked.)
        let tiny = std::hint::black_box(f32::MIN_POSITIVE);
        assert_eq!(std::hint::black_box(tiny * 0.5), 0.0);
    }
}
