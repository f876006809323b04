//! The arithmetic of the matrix products: f32, or bf16 as PyTorch's autocast means it (both operands
//! rounded to bf16, nearest with ties to even; products and sums in f32). Everything else (norms, softmax,
//! log-softmax, the losses, the optimizer, master weights) is f32 whatever the precision; the precision is
//! chosen per product by the caller, so a pass carries it from [`crate::model::Model`] down to
//! [`super::matmul::gemm_view`], where the kernel is picked.

use std::fmt;
use std::str::FromStr;

/// How a matrix product rounds its operands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 operands, f32 products and sums.
    #[default]
    F32,
    /// bf16 operands (rounded from f32), f32 products and sums: autocast's `torch.bfloat16`.
    Bf16,
}

impl Precision {
    /// Every precision, in the order the help lists them.
    pub const ALL: [Precision; 2] = [Precision::F32, Precision::Bf16];

    /// The name flags and files use: `f32`, `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A precision name that is not `f32` or `bf16`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown precision `{0}`: expected f32 or bf16")]
pub struct UnknownPrecision(pub String);

impl FromStr for Precision {
    type Err = UnknownPrecision;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Precision::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| UnknownPrecision(s.to_string()))
    }
}

/// What runs a bf16 product on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AMX-BF16 (`tdpbf16ps`): 16 x 16 tiles of C from tiles of bf16 pairs, where the CPU has AMX and the
    /// OS grants this process the tile state.
    Amx,
    /// `vdpbf16ps` (AVX512_BF16): bf16 pairs multiplied and summed into f32 lanes (CPUs without AMX, or
    /// `DPO_GEMM=avx512_bf16`).
    Avx512Bf16,
    /// The f32 kernels on operands rounded to bf16: the same numbers up to the grouping of the f32 sums,
    /// at f32 speed (CPUs without bf16 instructions, other architectures, `DPO_GEMM=portable`).
    Emulated,
}

impl Bf16Kernel {
    /// The kernel bf16 products use here, detected once: the fastest the CPU has, unless `DPO_GEMM` says
    /// `avx512_bf16` (no AMX) or `portable` (the emulation).
    pub fn detect() -> Bf16Kernel {
        static KERNEL: std::sync::OnceLock<Bf16Kernel> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if super::sgemm::amx_available() {
                    return Bf16Kernel::Amx;
                }
                if super::sgemm::avx512_bf16_available() {
                    return Bf16Kernel::Avx512Bf16;
                }
            }
            Bf16Kernel::Emulated
        })
    }

    /// A short description for logs and `--version`.
    pub fn describe(self) -> &'static str {
        match self {
            Bf16Kernel::Amx => "amx_bf16 (tdpbf16ps tiles)",
            Bf16Kernel::Avx512Bf16 => "avx512_bf16 (vdpbf16ps)",
            Bf16Kernel::Emulated => {
                "emulated (f32 kernels on bf16-rounded operands: no AVX512_BF16, or DPO_GEMM=portable)"
            }
        }
    }
}

/// What runs f32 matrix products on this CPU, for logs and `--version`.
pub fn describe_f32_kernel() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if super::sgemm::available() {
        return "avx512f (hand-written sgemm)";
    }
    "gemm crate (portable: no AVX-512F, or DPO_GEMM=portable)"
}

/// The CPU's name as Linux gives it (`model name` in /proc/cpuinfo, the first core's), or "unknown": the
/// name that goes next to every measured figure.
pub fn cpu_model() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let line = info.lines().find(|l| l.starts_with("model name"));
    line.and_then(|l| l.split(':').nth(1)).map(|s| s.trim().to_string()).unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>(), Ok(p));
        }
        assert_eq!("fp16".parse::<Precision>(), Err(UnknownPrecision("fp16".into())));
        assert_eq!(Precision::default(), Precision::F32);
    }

    /// Without `DPO_GEMM` (the unit tests do not set it), the fastest kernel the CPU has is chosen.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn detect_prefers_amx_then_vdpbf16ps() {
        use crate::kernels::sgemm::{amx_available, avx512_bf16_available};
        let want = if amx_available() {
            Bf16Kernel::Amx
        } else if avx512_bf16_available() {
            Bf16Kernel::Avx512Bf16
        } else {
            Bf16Kernel::Emulated
        };
        assert_eq!(Bf16Kernel::detect(), want);
        if std::env::var_os("DPO_GEMM").is_none() && std::arch::is_x86_feature_detected!("avx512bf16") {
            assert_ne!(want, Bf16Kernel::Emulated);
        }
    }
}
