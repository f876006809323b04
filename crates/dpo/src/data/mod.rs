//! Preference data, from a file on disk to the engine's packed batches:
//!
//! ```text
//! read     JSONL / JSON array  -> Record { location, fields }
//! rows     Record              -> PreferenceRow (explicit prompt, implicit prompt, conversational, token ids)
//! tokenize PreferenceRow       -> Example { prompt_ids, chosen_ids, rejected_ids }   (TRL 1.x rules)
//! pack     [Example]           -> engine::Batch + where each sequence's targets are
//! ```

pub mod error;
pub mod pack;
pub mod read;
pub mod rows;
pub mod tokenize;

pub use error::DataError;
pub use pack::{pack_pairs, PackedPairs, Packing};
pub use read::{read_records, Record};
pub use rows::{parse_preference_row, PreferenceRow, Text};
pub use tokenize::{tokenize_row, Example, TokenizeStats};

use std::path::Path;

/// Reads and tokenizes a preference file. `tok` is needed unless every row is pre-tokenized.
pub fn load_pairs(path: &Path, tok: Option<&hf::Tokenizer>) -> Result<(Vec<Example>, TokenizeStats), DataError> {
    let mut stats = TokenizeStats::default();
    let mut out = Vec::new();
    for rec in read_records(path)? {
        let row = parse_preference_row(path, &rec)?;
        let tok_err =
            |message: String| DataError::Tokenize { path: path.to_path_buf(), location: rec.location.clone(), message };
        let ex = tokenize_row(&row, tok, &mut stats).map_err(tok_err)?;
        out.push(ex);
    }
    Ok((out, stats))
}
