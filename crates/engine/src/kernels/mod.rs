//! Every numerical operation the decoder performs, with its backward. This module is the boundary between
//! model code (`crate::model`) and the machine: model code calls only these functions, on flat row-major
//! f32 buffers, and never loops over elements itself. They run on the CPU (the `gemm` crate and rayon).
//!
//! Conventions: shapes are written `[rows, cols]`, row-major. A backward function's input-gradient
//! argument is documented as overwritten (`=`) or accumulated (`+=`); parameter gradients always
//! accumulate, so gradient accumulation over micro-batches needs no extra buffer.

pub mod act;
pub mod attention;
pub mod decode;
pub mod embed;
pub mod head;
pub mod lowrank;
pub mod matmul;
pub mod norm;
pub mod precision;
pub mod rope;
#[cfg(target_arch = "x86_64")]
mod sgemm;
pub mod threads;

pub use act::*;
pub use attention::*;
pub use decode::*;
pub use embed::*;
pub use head::*;
pub use lowrank::*;
pub use matmul::*;
pub use norm::*;
pub use precision::*;
pub use rope::*;
pub use threads::*;
