//! `--precision f32|bf16` of every command that runs the model: one flag, one help text, one reading.

use engine::kernels::{Bf16Kernel, Precision};
use serde::Serialize;

/// The flag's long help: what bf16 means, what stays f32, and what runs a bf16 product on this CPU.
fn long_help() -> String {
    format!(
        "Arithmetic of the matrix products [default: f32]. bf16 is PyTorch autocast's: the block linears' and \
         the LM head's products (forward and backward) take operands rounded to bf16 and sum in f32; attention \
         reads q, k, v rounded to bf16. Attention's own products, the LoRA adapter's products, decode steps, \
         norms, softmax, log-softmax, the loss, the master weights and the optimizer stay f32. Frozen weights are stored in bf16 where that changes no \
         number (a full run's reference model; a LoRA base unless --base-dtype or --quantize say otherwise).\n\n\
         On this CPU bf16 products run as: {}",
        Bf16Kernel::detect().describe()
    )
}

/// `--precision`; flattened into every command's arguments (and, for `dpo train`/`sft`, serialised as
/// config.toml's `precision` key when given).
#[derive(clap::Args, Debug, Default, Serialize)]
#[command(next_help_heading = "Precision")]
pub(super) struct PrecisionFlag {
    /// Arithmetic of the matrix products: f32, or bf16 (autocast's: bf16 operands, f32 sums) [default: f32].
    #[arg(
        long,
        value_name = "PRECISION",
        value_parser = clap::builder::PossibleValuesParser::new(Precision::ALL.map(Precision::name)),
        long_help = long_help(),
    )]
    #[serde(skip_serializing_if = "Option::is_none")]
    precision: Option<String>,
}

impl PrecisionFlag {
    /// The precision given, or f32.
    pub(super) fn get(&self) -> Precision {
        // The parser admits only the names `Precision` reads.
        self.precision.as_deref().and_then(|p| p.parse().ok()).unwrap_or_default()
    }

    /// The precision given, if any (commands whose saved settings hold the rest).
    pub(super) fn given(&self) -> Option<Precision> {
        self.precision.as_ref().map(|_| self.get())
    }
}
