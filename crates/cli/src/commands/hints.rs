//! What to do about a run error, in the flags of the command that ran it: the library's `TrainError`
//! states only the facts (which file, which setting); the binary adds the way out.

use dpo::data::DataError;
use dpo::train::TrainError;

/// A run error with what to do about it, in `command`'s flags (the library states only the facts).
pub fn with_hint(e: TrainError, command: &str) -> anyhow::Error {
    let hint = match &e {
        TrainError::OutputExists(p) => {
            format!("; pass --overwrite to replace it or --resume {} to continue it", p.display())
        }
        TrainError::NoCheckpoint { .. } => "; start it again with --overwrite (or pass a run directory with \
             checkpoints/step-N, or such a checkpoint directory, to --resume)"
            .to_string(),
        TrainError::Locked { .. } => ": wait for it to end, or choose another --output".to_string(),
        TrainError::NonFinite { output, .. } => format!(
            ": `{command} --resume {} --on-nonfinite skip` continues and skips such steps (or lower --lr or \
             --beta, or look at those rows)",
            output.display()
        ),
        TrainError::CheckpointWrite { newest: Some(_), output, .. } => {
            format!(": free disk space, then continue with `{command} --resume {}`", output.display())
        }
        TrainError::CheckpointWrite { newest: None, .. } => {
            ": free disk space, then start again with --overwrite".to_string()
        }
        TrainError::FinalWrite { output, .. } => {
            format!(": free disk space, then `{command} --resume {}` writes final/ again", output.display())
        }
        TrainError::Output { .. } => "; choose another --output".to_string(),
        TrainError::InputInRun { .. } => {
            "; copy the input out of the run first, or choose another --output".to_string()
        }
        TrainError::NeedsReferenceModel { .. } => "; run it without --precompute-ref".to_string(),
        TrainError::ResumeChanged { run, changes } => {
            // A setting as config.toml holds it; an input whose content changed has no flag to give.
            let settings: Vec<String> = changes
                .iter()
                .filter(|c| !c.was.contains("(content "))
                .map(|c| format!("{} = {}", c.key, c.was))
                .collect();
            let mut hint = String::from("; ");
            if !settings.is_empty() {
                hint +=
                    &format!("resume it without the flags that change them (config.toml: {}), ", settings.join(", "));
            }
            if settings.len() < changes.len() {
                hint += "put back the files it started with, ";
            }
            hint + &format!(
                "or start a new run from a checkpoint's weights with --model {}/checkpoints/step-N/model and \
                 another --output",
                run.display()
            )
        }
        TrainError::Model(hf::Error::NoRoom { .. }) => "; free space there, write it in half the bytes with \
             --merge-dtype bf16, or train without --merge and run `dpo merge` where there is room"
            .to_string(),
        TrainError::Data(DataError::TooLong { max, .. }) => {
            format!(": pass --max-length {max} (with --truncation keep-end to keep the ends)")
        }
        _ => return e.into(),
    };
    anyhow::anyhow!("{e}{hint}")
}

/// An output refused by the guard (`hf::output`), with the flag that gets past it: `--overwrite` for an
/// output that already holds a model or is an existing file, another `out_flag` otherwise.
pub fn output_hint(e: hf::Error, out_flag: &str) -> anyhow::Error {
    let hint = match &e {
        hf::Error::OutputExists { .. } => format!("; pass --overwrite to replace it, or choose another {out_flag}"),
        hf::Error::OutputIsInput { .. } | hf::Error::ModelDir { .. } => format!("; choose another {out_flag}"),
        _ => return e.into(),
    };
    anyhow::anyhow!("{e}{hint}")
}

/// An output too large for its file system (`hf::Error::NoRoom`), with the ways out: free space, or
/// `others` (the command's flags that write elsewhere or less). Any other error as it is.
pub fn room_hint(e: hf::Error, others: &str) -> anyhow::Error {
    match e {
        hf::Error::NoRoom { .. } => anyhow::anyhow!("{e}; free space there, or {others}"),
        e => e.into(),
    }
}
