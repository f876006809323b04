//! Training data, from a file on disk to the engine's packed batches:
//!
//! ```text
//! source   a file, saved dataset, repository directory or hub id (+ split, subset) -> what `read` reads
//! read     JSONL / JSON array / Parquet / Arrow IPC -> Record { location, fields }
//! rows     Record   -> PreferenceRow | UnpairedRow | SftRow (explicit or implicit prompt, conversational, ids)
//! tokenize row      -> Example | UnpairedExample | SftExample                  (TRL 1.x rules)
//! truncate example  -> the same, limited to max_prompt_length / max_length      (or dropped)
//! load     all of the above for a file, in parallel, with DataStats
//! positions every row against the positions of the models that read it (before the first step)
//! prompts  generation prompts (`prompt` of every row) and the ids that end a generation
//! pack     [Example] / [(prompt, completion)] -> engine::Batch + where each sequence's targets are
//! ```

mod arrow;
pub mod error;
pub mod load;
pub mod pack;
mod parquet;
pub mod positions;
pub mod prompts;
pub mod read;
pub mod rows;
pub mod source;
#[cfg(test)]
mod testutil;
pub mod tokenize;
pub mod truncate;

pub use error::DataError;
pub use load::{check_vocab, check_vocab_sft, load_pairs, load_sft, load_unpaired, DataStats, LoadedData};
pub use pack::{pack_pairs, pack_sequences, PackedPairs, Packing};
pub use positions::{check_generation_positions, check_positions, resolve_max_length, Sequences};
pub use prompts::{read_prompts, stop_ids, Prompt};
pub use read::{read_records, Record};
pub use rows::{parse_preference_row, parse_sft_row, parse_unpaired_rows, PreferenceRow, SftRow, Text, UnpairedRow};
pub use source::resolve_data;
pub use tokenize::{
    tokenize_row, tokenize_sft, tokenize_unpaired, Example, SftExample, TokenizeError, UnpairedExample,
};
pub use truncate::{DataOptions, Truncation};
