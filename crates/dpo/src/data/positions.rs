//! Sequence lengths against the positions of the models that read them: the default `max_length`
//! lowered to what the models can read, and every row checked before the first step, so that a row too
//! long for a model with learned positions is refused with its file and line instead of stopping a run
//! when its batch comes.
//!
//! A model with learned positions (GPT-2) has a table of `max_positions` rows and cannot read a longer
//! sequence. A rotary model's `max_position_embeddings` is the context it was trained for; the engine
//! extends its tables past it as transformers does, so longer rows are read (if less well) and only an
//! explicit `max_length` may ask for them.

use std::path::Path;

use engine::{DecoderConfig, PositionKind};

use super::tokenize::{Example, SftExample, UnpairedExample};
use super::DataError;

/// Something packed as one or more sequences: its longest one decides which positions it needs.
pub trait Sequences {
    /// Where it came from ("line 12"), for messages.
    fn location(&self) -> &str;
    /// Tokens in its longest sequence (prompt and completion).
    fn longest_sequence(&self) -> usize;
}

impl Sequences for Example {
    fn location(&self) -> &str {
        &self.location
    }
    fn longest_sequence(&self) -> usize {
        let chosen = self.chosen_prompt().len() + self.chosen_ids.len();
        chosen.max(self.rejected_prompt().len() + self.rejected_ids.len())
    }
}

impl Sequences for UnpairedExample {
    fn location(&self) -> &str {
        &self.location
    }
    fn longest_sequence(&self) -> usize {
        self.prompt_ids.len() + self.completion_ids.len()
    }
}

impl Sequences for SftExample {
    fn location(&self) -> &str {
        &self.location
    }
    fn longest_sequence(&self) -> usize {
        self.prompt_ids.len() + self.completion_ids.len()
    }
}

/// The positions every one of `models` reads: the smallest `max_positions`.
pub fn model_positions(models: &[&DecoderConfig]) -> Option<usize> {
    models.iter().map(|m| m.max_positions).min()
}

/// The smallest number of learned positions among `models`: a hard limit on any sequence.
pub fn learned_positions(models: &[&DecoderConfig]) -> Option<usize> {
    models.iter().filter(|m| matches!(m.positions, PositionKind::Learned)).map(|m| m.max_positions).min()
}

/// The `max_length` to use and, when it was lowered, a one-line notice saying so. An explicit value is
/// kept as given (rows longer than learned positions are then refused by [`check_positions`]); the
/// default is lowered to the positions the models read.
pub fn resolve_max_length(
    explicit: Option<usize>,
    default: Option<usize>,
    models: &[&DecoderConfig],
) -> (Option<usize>, Option<String>) {
    if explicit.is_some() {
        return (explicit, None);
    }
    match (default, model_positions(models)) {
        (Some(d), Some(p)) if p < d => {
            (Some(p), Some(format!("max_length lowered from its default {d} to {p}, the positions the model reads")))
        }
        _ => (default, None),
    }
}

/// Checks, before any step, that every example of `path` fits the learned positions of `models` (a
/// rotary model reads longer sequences; see the module's documentation).
pub fn check_positions<T: Sequences>(path: &Path, examples: &[T], models: &[&DecoderConfig]) -> Result<(), DataError> {
    let Some(max) = learned_positions(models) else { return Ok(()) };
    match examples.iter().find(|e| e.longest_sequence() > max) {
        Some(e) => Err(DataError::TooLong {
            path: path.to_path_buf(),
            location: e.location().to_string(),
            tokens: e.longest_sequence(),
            max,
        }),
        None => Ok(()),
    }
}

/// Checks that every generation prompt, followed by `new_tokens` more tokens the model reads, fits its
/// learned positions. `prompts` gives each prompt's location and length in tokens. Returns the first
/// prompt that does not fit: `(location, positions needed, positions the model has)`.
pub fn check_generation_positions<'a>(
    prompts: impl IntoIterator<Item = (&'a str, usize)>,
    new_tokens: usize,
    model: &DecoderConfig,
) -> Result<(), (String, usize, usize)> {
    let Some(max) = learned_positions(&[model]) else { return Ok(()) };
    match prompts.into_iter().find(|(_, len)| len + new_tokens > max) {
        Some((location, len)) => Err((location.to_string(), len + new_tokens, max)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(positions: PositionKind, max_positions: usize) -> DecoderConfig {
        let mut c = engine::presets::gpt2_small();
        c.positions = positions;
        c.max_positions = max_positions;
        c
    }

    #[test]
    fn the_default_max_length_is_lowered_to_the_models_positions_and_says_so() {
        let gpt2 = cfg(PositionKind::Learned, 256);
        let (m, notice) = resolve_max_length(None, Some(1024), &[&gpt2]);
        assert_eq!(m, Some(256));
        assert_eq!(notice.unwrap(), "max_length lowered from its default 1024 to 256, the positions the model reads");
        assert_eq!(resolve_max_length(Some(2000), Some(1024), &[&gpt2]), (Some(2000), None));
        assert_eq!(resolve_max_length(None, Some(128), &[&gpt2]), (Some(128), None));
        assert_eq!(resolve_max_length(None, None, &[&gpt2]), (None, None));
    }

    #[test]
    fn rows_longer_than_learned_positions_are_refused_naming_file_and_row() {
        let gpt2 = cfg(PositionKind::Learned, 8);
        let ok = Example::new("line 1", vec![1, 2, 3], vec![4, 5], vec![6, 7, 8, 9, 10]);
        let long = Example::new("line 2", vec![1, 2, 3], vec![4, 5, 6, 7, 8, 9], vec![6]);
        check_positions(Path::new("d.jsonl"), std::slice::from_ref(&ok), &[&gpt2]).unwrap();
        let e = check_positions(Path::new("d.jsonl"), &[ok.clone(), long.clone()], &[&gpt2]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "d.jsonl, line 2: the row's longest sequence has 9 tokens, more than the 8 positions the model has \
             (learned positions; truncate rows to at most 8 tokens)"
        );
        // The smallest of several models decides (a reference with fewer positions).
        let wide = cfg(PositionKind::Learned, 100);
        check_positions(Path::new("d.jsonl"), std::slice::from_ref(&long), &[&wide]).unwrap();
        assert!(check_positions(Path::new("d.jsonl"), std::slice::from_ref(&long), &[&wide, &gpt2]).is_err());
    }

    #[test]
    fn generation_prompts_are_checked_with_the_new_tokens() {
        let gpt2 = cfg(PositionKind::Learned, 10);
        assert!(check_generation_positions([("prompt 1", 4)], 6, &gpt2).is_ok());
        assert_eq!(
            check_generation_positions([("prompt 1", 4), ("line 2", 5)], 6, &gpt2),
            Err(("line 2".into(), 11, 10))
        );
    }
}
