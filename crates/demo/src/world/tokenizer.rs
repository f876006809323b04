//! A byte-level BPE tokenizer trained on the experiment's corpus, laid out like GPT-2's (the
//! `tokenizers` crate, the same library transformers uses), so the rest of the program loads it
//! through `hf::load_tokenizer` like any Hugging Face checkpoint's and Python can load it too.

use std::collections::HashSet;
use std::path::Path;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

use super::WorldError;

/// The one special token: beginning and end of text, and padding (as in GPT-2). Always id 0.
pub const EOT: &str = "<|endoftext|>";

/// A vocabulary this size keeps the embedding and LM head small next to the blocks of a small
/// model while still merging most of the corpus' words into single tokens.
pub const DEFAULT_VOCAB_SIZE: usize = 1024;

/// The 256 byte symbols plus the special token.
const MIN_VOCAB_SIZE: usize = 257;

/// Trains a byte-level BPE with `vocab_size` entries on `texts` and writes `tokenizer.json` and
/// `tokenizer_config.json` into `out_dir` (created if missing). Each file is written to a temporary
/// name and renamed, so a reader never sees half a file.
pub fn build_tokenizer(texts: &[String], vocab_size: usize, out_dir: &Path) -> Result<(), WorldError> {
    if vocab_size < MIN_VOCAB_SIZE {
        return Err(WorldError::VocabTooSmall { got: vocab_size, min: MIN_VOCAB_SIZE });
    }
    if texts.iter().all(|t| t.is_empty()) {
        return Err(WorldError::NoText);
    }
    // GPT-2's settings: no prefix space (a review's first word is tokenized as it appears at the start
    // of a sequence), its split regex, offsets trimmed.
    let byte_level = ByteLevel::new(false, true, true);
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(EOT, true)])
        // All 256 byte symbols, even those the corpus lacks, so any text (a user's prompt) encodes.
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect::<HashSet<char>>())
        .build();
    let mut tok = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(tokenizers::PreTokenizerWrapper::from(byte_level)))
        .with_post_processor(Some(tokenizers::PostProcessorWrapper::from(byte_level)))
        .with_decoder(Some(tokenizers::DecoderWrapper::from(byte_level)))
        .build()
        .map_err(|e| WorldError::Tokenizer { what: "assembling", reason: e.to_string() })?;
    tok.train(&mut trainer, texts.iter())
        .map_err(|e| WorldError::Tokenizer { what: "training", reason: e.to_string() })?;
    if tok.token_to_id(EOT) != Some(0) {
        return Err(WorldError::Tokenizer { what: "training", reason: format!("{EOT} did not get id 0") });
    }
    let json =
        tok.to_string(false).map_err(|e| WorldError::Tokenizer { what: "serialising", reason: e.to_string() })?;

    // transformers reads the special-token roles from here; `add_bos_token: false` as in GPT-2, the
    // data pipeline decides where BOS/EOS go.
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": EOT,
        "add_bos_token": false,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 1024,
    });
    let config = format!("{config:#}");

    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| WorldError::Io { path, source }
    };
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    for (name, text) in [("tokenizer.json", json), ("tokenizer_config.json", config)] {
        let path = out_dir.join(name);
        dpo::io::write_atomic(&path, text.as_bytes()).map_err(io(&path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::corpus::{prompts, reviews};
    use super::*;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("dpo-world-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn trains_saves_loads_and_round_trips() {
        let dir = temp_dir("tok");
        let texts = reviews(1, 3000);
        build_tokenizer(&texts, DEFAULT_VOCAB_SIZE, &dir).expect("build");
        let tok = hf::load_tokenizer(&dir).expect("hf loads it");
        assert_eq!(tok.vocab_size(), DEFAULT_VOCAB_SIZE);
        assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (Some(0), Some(0), Some(0)));
        assert_eq!(tok.eos_token(), Some(EOT));

        let mut tokens = 0;
        let mut words = 0;
        for t in texts.iter().take(200).chain(&prompts(1, 50)) {
            let ids = tok.encode(t, false).expect("encode");
            assert!(!ids.contains(&0), "{t}");
            assert_eq!(&tok.decode(&ids, false).expect("decode"), t);
            tokens += ids.len();
            words += t.split_whitespace().count();
        }
        // The merges cover the corpus: most words are one token.
        let per_word = tokens as f64 / words as f64;
        assert!(per_word < 1.5, "{per_word} tokens per word");

        // Text the corpus never had still encodes (byte fallback), and the special token is one id.
        for t in ["Zebra ünïcode 😀 {}", "<|endoftext|>"] {
            let ids = tok.encode(t, false).expect("encode");
            assert_eq!(tok.decode(&ids, false).expect("decode"), t);
        }
        assert_eq!(tok.encode(EOT, false).expect("encode"), vec![0]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rejects_bad_input() {
        let dir = temp_dir("bad");
        assert!(build_tokenizer(&reviews(1, 10), 100, &dir).is_err());
        assert!(build_tokenizer(&[], 512, &dir).is_err());
        assert!(!dir.exists());
    }
}
