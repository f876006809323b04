//! Where reference log-probs come from: a frozen model evaluated on each batch (by default a copy of the
//! starting weights, loaded once), the policy's own frozen base in a LoRA run (with the adapter off, or
//! with a frozen copy of the adapter the run started from, as TRL keeps it), a cache filled by one pass
//! before training (`--precompute-ref`), or nothing at all for reference-free objectives.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use engine::kernels::Precision;
use engine::model::Model;
use engine::quant::{FrozenEmbedding, FrozenError, FrozenLinears, Matrix, QuantError, Storage};
use engine::{Activations, Adapter, Decoder, EngineError, ParamSet, Params};
use hf::{ModelConfig, Tokenizer};
use sha2::{Digest, Sha256};

use crate::data::pack::sum_ranges;
use crate::data::{Example, PackedPairs, Packing, SftExample, UnpairedExample};
use crate::scoring::{score_pairs, PairScore};

/// Reference log-probs of a batch: chosen and rejected sequence sums, one per row.
pub type RefLogps = (Vec<f64>, Vec<f64>);

/// A reference model held beside the policy, never written to.
pub struct ReferenceModel {
    pub decoder: Decoder,
    /// Its weights; with `linears`, every tensor but the block linears' (those are then empty).
    pub params: Params,
    /// The block linears stored in bf16, in a bf16 run: its products round them to bf16 anyway, so the
    /// log-probs are bit for bit those of the f32 copy, in half the memory. Embeddings, norms and the
    /// head stay f32, unless [`ReferenceModel::keep_lookups_of`] moved the embedding and head here:
    pub linears: Option<FrozenLinears>,
    /// The token embedding and the head of a bf16 run's reference that scores known data: the head in
    /// bf16, the lookups' rows in f32 for the data's tokens alone (`engine::quant::FrozenEmbedding`).
    pub embedding: Option<FrozenEmbedding>,
}

impl ReferenceModel {
    /// `params` held for passes in `precision`: in bf16, with the block linears stored in bf16.
    pub fn new(decoder: Decoder, mut params: Params, precision: Precision) -> Result<Self, FrozenError> {
        let linears = match precision {
            Precision::Bf16 => Some(FrozenLinears::take_from(&mut params, Storage::Bf16)?),
            Precision::F32 => None,
        };
        Ok(ReferenceModel { decoder, params, linears, embedding: None })
    }

    /// In a bf16 run (block linears in bf16), keeps the token embedding for the lookups of `tokens`
    /// alone, in f32, and the head in bf16: the log-probs of rows made of those tokens are unchanged bit
    /// for bit, in about half the embedding's memory (GPT-2: 154 MB -> 77 MB and 4 KB a token kept). A row
    /// with any other token is refused (`EngineError::TokenNotKept`): for a reference that scores a data
    /// set known in advance, not generated text. An f32 run's reference is left as it is.
    pub fn keep_lookups_of(&mut self, tokens: &BTreeSet<u32>) -> Result<(), QuantError> {
        if self.linears.is_none() || self.embedding.is_some() {
            return Ok(());
        }
        self.embedding = Some(freeze_tables(&mut self.params, &self.decoder.cfg, tokens)?);
        Ok(())
    }

    /// The weights as a pass in `precision` reads them.
    pub fn view(&self, precision: Precision) -> Model<'_> {
        let mut m = Model::new(&self.params, None).with_precision(precision);
        if let Some(f) = &self.linears {
            m = m.with_frozen(f);
        }
        if let Some(e) = &self.embedding {
            m = m.with_embedding(e);
        }
        m
    }
}

/// Moves `params`' token embedding and head (when it has one of its own) into a [`FrozenEmbedding`]
/// keeping the lookups of `tokens`: `wte` and the head are left empty.
pub fn freeze_tables(
    params: &mut Params,
    cfg: &engine::DecoderConfig,
    tokens: &BTreeSet<u32>,
) -> Result<FrozenEmbedding, QuantError> {
    let head = params.lm_head.as_mut().map(|t| std::mem::take(&mut t.data));
    let wte = std::mem::take(&mut params.wte.data);
    FrozenEmbedding::new(wte, head, cfg.vocab_size, cfg.hidden, tokens)
}

/// Every token id of preference rows (prompts and both completions): what a reference that scores
/// them keeps the embeddings of ([`ReferenceModel::keep_lookups_of`]).
pub fn pair_tokens<'e>(rows: impl Iterator<Item = &'e Example>) -> BTreeSet<u32> {
    distinct(rows.flat_map(|e| [&e.prompt_ids, &e.chosen_ids, &e.rejected_ids]).flatten().copied())
}

/// [`pair_tokens`] of unpaired rows (prompts and completions).
pub fn unpaired_tokens<'e>(rows: impl Iterator<Item = &'e UnpairedExample>) -> BTreeSet<u32> {
    distinct(rows.flat_map(|e| [&e.prompt_ids, &e.completion_ids]).flatten().copied())
}

/// [`pair_tokens`] of SFT rows (prompts and completions).
pub fn sft_tokens<'e>(rows: impl Iterator<Item = &'e SftExample>) -> BTreeSet<u32> {
    distinct(rows.flat_map(|e| [&e.prompt_ids, &e.completion_ids]).flatten().copied())
}

/// The distinct ids of `ids`: marked in a table as long as the largest id (one pass over a data set's
/// tokens, however many), then collected in order.
fn distinct(ids: impl Iterator<Item = u32>) -> BTreeSet<u32> {
    let mut seen = Vec::new();
    for t in ids.map(|t| t as usize) {
        if t >= seen.len() {
            seen.resize(t + 1, false);
        }
        seen[t] = true;
    }
    seen.iter().enumerate().filter(|&(_, &s)| s).map(|(t, _)| t as u32).collect()
}

pub enum Reference {
    /// Evaluated on every batch; never written to (the optimizer only sees the policy's parameters).
    /// Shared between the training and the evaluation data.
    Model(Arc<ReferenceModel>),
    /// A LoRA run's reference: the policy's frozen base (read through the policy's view, never copied)
    /// with this frozen adapter on it, or with none (a new adapter's reference: the base with the adapter
    /// off). The trained adapter is never read.
    PolicyBase(Option<Adapter>),
    /// One score per example, in example order.
    Cached(Vec<PairScore>),
    /// Reference-free: every reference log-prob is absent.
    None,
}

/// Why a reference model cannot serve a policy: log-prob differences between the two would mean nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error(transparent)]
    Load(#[from] hf::Error),
    #[error(
        "reference {dir} has a vocabulary of {reference} tokens, the policy {policy}: the reference must read the \
         policy's token ids (use a reference with the policy's tokenizer)"
    )]
    Vocab { dir: PathBuf, reference: usize, policy: usize },
    #[error(
        "reference {dir}: its tokenizer ({reference}) and the policy's ({policy}) map tokens to different ids \
         ({detail}): the reference must read the policy's token ids (use a reference with the policy's tokenizer)"
    )]
    Tokenizer { dir: PathBuf, reference: PathBuf, policy: PathBuf, detail: String },
    #[error("reference {dir}: its block linears cannot be stored in bf16: {source}")]
    Store { dir: PathBuf, source: FrozenError },
}

impl Reference {
    /// Loads the reference model in `dir` for a policy configured as `policy` (whose tokenizer, when it has
    /// one, is `policy_tokenizer`), and checks that it reads the same token ids: the same vocabulary size
    /// and, where both directories have a `tokenizer.json`, the same token-to-id map. Every command that
    /// compares a policy with a reference loads it here, held for passes in `precision`
    /// ([`ReferenceModel::new`]).
    pub fn load(
        dir: &Path,
        policy: &ModelConfig,
        policy_tokenizer: Option<&Tokenizer>,
        precision: Precision,
    ) -> Result<Self, ReferenceError> {
        let config = hf::load_config(dir)?;
        check_fits(dir, &config, policy, policy_tokenizer)?;
        let model = hf::load_model(dir)?;
        let decoder = Decoder::new(model.config.decoder.clone());
        let held = ReferenceModel::new(decoder, model.params, precision)
            .map_err(|source| ReferenceError::Store { dir: dir.to_path_buf(), source })?;
        Ok(Reference::Model(Arc::new(held)))
    }

    /// The reference model, when log-probs come from one.
    pub fn model(&self) -> Option<&ReferenceModel> {
        match self {
            Reference::Model(m) => Some(m),
            _ => None,
        }
    }

    /// The frozen model a batch is scored with, when log-probs come from one: its decoder and view, in
    /// the policy's precision. A [`Reference::PolicyBase`] reads `policy`'s decoder and base.
    pub fn frozen<'a>(&'a self, policy: (&'a Decoder, Model<'a>)) -> Option<(&'a Decoder, Model<'a>)> {
        match self {
            Reference::Model(m) => Some((&m.decoder, m.view(policy.1.precision))),
            // The policy's view less its adapter: the same base (and frozen storage), never dropping.
            Reference::PolicyBase(adapter) => {
                Some((policy.0, Model { adapter: adapter.as_ref(), dropout_seed: None, ..policy.1 }))
            }
            Reference::Cached(_) | Reference::None => None,
        }
    }

    /// Reference log-probs of the examples `rows` (indices into the example list the reference was built
    /// for), packed as `packed`. `None` when reference-free. `policy` is the decoder and view of the policy
    /// being trained (a [`Reference::PolicyBase`] reads its base).
    pub fn pair_logps(
        &self,
        rows: &[usize],
        packed: &PackedPairs,
        acts: &mut Activations,
        policy: (&Decoder, Model<'_>),
    ) -> Result<Option<RefLogps>, EngineError> {
        match self {
            Reference::Model(_) | Reference::PolicyBase(_) => {
                let Some((decoder, model)) = self.frozen(policy) else { unreachable!("a model reference") };
                let head = decoder.logprobs(model, &packed.batch, acts, false)?;
                Ok(Some((sum_ranges(&head.logp, &packed.chosen), sum_ranges(&head.logp, &packed.rejected))))
            }
            Reference::Cached(scores) => Ok(Some((
                rows.iter().map(|&i| scores[i].chosen_logps).collect(),
                rows.iter().map(|&i| scores[i].rejected_logps).collect(),
            ))),
            Reference::None => Ok(None),
        }
    }
}

/// Checks that the reference configured as `config` (in `dir`) reads the policy's token ids.
pub fn check_fits(
    dir: &Path,
    config: &ModelConfig,
    policy: &ModelConfig,
    policy_tokenizer: Option<&Tokenizer>,
) -> Result<(), ReferenceError> {
    let (reference, policy_vocab) = (config.decoder.vocab_size, policy.decoder.vocab_size);
    if reference != policy_vocab {
        return Err(ReferenceError::Vocab { dir: dir.to_path_buf(), reference, policy: policy_vocab });
    }
    let tokenizer_file = dir.join("tokenizer.json");
    let Some(policy_tok) = policy_tokenizer.filter(|_| tokenizer_file.is_file()) else { return Ok(()) };
    let reference_tok = Tokenizer::from_file(&tokenizer_file)?;
    if let Some(detail) = vocab_difference(policy_tok, &reference_tok) {
        return Err(ReferenceError::Tokenizer {
            dir: dir.to_path_buf(),
            reference: tokenizer_file,
            policy: policy_tok.path().to_path_buf(),
            detail,
        });
    }
    Ok(())
}

/// The first token whose id differs between two tokenizers (added tokens included), or `None` when
/// they map every token to the same id. Merges and normalizers may differ: only the ids a model reads matter.
fn vocab_difference(policy: &Tokenizer, reference: &Tokenizer) -> Option<String> {
    let (p, r) = (policy.inner().get_vocab(true), reference.inner().get_vocab(true));
    if p.len() != r.len() {
        return Some(format!("{} tokens against {}", r.len(), p.len()));
    }
    let mut differing: Vec<(&String, &u32)> = p.iter().filter(|(tok, id)| r.get(*tok) != Some(*id)).collect();
    differing.sort_by_key(|(_, id)| **id);
    let (tok, id) = differing.first()?;
    Some(match r.get(*tok) {
        Some(rid) => format!("token {tok:?} is id {id} for the policy, {rid} for the reference"),
        None => format!("the policy's token {tok:?} (id {id}) is not in the reference's vocabulary"),
    })
}

/// The cache key of precomputed reference log-probs: a SHA-256 over the reference weights (the base, its
/// stored block linears when it has them, and, when the reference reads one, the adapter on it: its
/// tensors, targets and scales; a frozen embedding's head and kept rows), the precision of its products, and the exact token ids of every example
/// (which captures the data file, the tokenizer and every truncation setting). An f32 model without an
/// adapter hashes as it always has, so the base with a new adapter off shares the base's cache, and
/// caches written before bf16 existed stay valid for f32 runs.
pub fn cache_key<'m>(model: impl Into<Model<'m>>, examples: &[Example]) -> String {
    let model = model.into();
    let mut h = Sha256::new();
    if model.precision != Precision::F32 {
        // bf16 log-probs differ from f32 ones: a cache of one precision never serves the other.
        h.update(format!("precision {}", model.precision).as_bytes());
    }
    if let Some(frozen) = model.frozen {
        // The stored linears replace the base's (emptied) tensors: their values are the weights.
        h.update(b"stored linears");
        for (l, layer) in frozen.layers().iter().enumerate() {
            for site in engine::Site::ALL {
                let m = layer.get(site);
                h.update(format!("{l}:{site:?}:{:?}:{}x{}", m.storage(), m.rows(), m.cols()).as_bytes());
                hash_matrix(&mut h, m);
            }
        }
    }
    if let Some(e) = model.embedding {
        // The head and the kept lookups replace the base's (emptied) embedding and head.
        h.update(format!("frozen embedding {}x{}", e.vocab(), e.hidden()).as_bytes());
        hash_matrix(&mut h, e.head());
        if let Some(table) = e.whole_rows() {
            h.update(b"whole rows");
            hash_matrix(&mut h, table);
        }
        for t in 0..e.vocab() as u32 {
            if let Some(row) = e.row(t) {
                h.update(t.to_le_bytes());
                hash_words(&mut h, row.iter().map(|x| x.to_bits()));
            }
        }
    }
    let mut tensors = model.base.named();
    if let Some(adapter) = model.adapter {
        h.update(b"lora adapter");
        for pair in adapter.layers.iter().flat_map(|l| &l.pairs) {
            let t = &pair.target;
            h.update(format!("{}:{:?}:{:?}:{}:{}", t.module, t.site, t.rows, t.r, t.scale.to_bits()).as_bytes());
        }
        tensors.extend(ParamSet::named(adapter));
    }
    for (name, t) in tensors {
        h.update(name.as_bytes());
        for d in &t.shape {
            h.update((*d as u64).to_le_bytes());
        }
        hash_words(&mut h, t.data.iter().map(|x| x.to_bits()));
    }
    for e in examples {
        h.update((e.chosen_prompt_skip as u64).to_le_bytes());
        h.update((e.rejected_prompt_skip as u64).to_le_bytes());
        for ids in [&e.prompt_ids, &e.chosen_ids, &e.rejected_ids] {
            h.update((ids.len() as u64).to_le_bytes());
            hash_words(&mut h, ids.iter().copied());
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Feeds 32-bit words to the hash in little-endian order, a block at a time (no copy of a whole tensor).
/// Hashes a stored matrix's values, widened a block at a time: no f32 copy of the whole matrix.
fn hash_matrix(h: &mut Sha256, m: &Matrix) {
    let n = m.rows() * m.cols();
    let mut block = vec![0.0f32; n.min(1 << 14)];
    for start in (0..n).step_by(block.len().max(1)) {
        let part = &mut block[..(n - start).min(1 << 14)];
        m.widen_into(start, part);
        hash_words(h, part.iter().map(|x| x.to_bits()));
    }
}

fn hash_words(h: &mut Sha256, words: impl Iterator<Item = u32>) {
    let mut buf = Vec::with_capacity(1 << 16);
    for w in words {
        buf.extend_from_slice(&w.to_le_bytes());
        if buf.len() >= 1 << 16 {
            h.update(&buf);
            buf.clear();
        }
    }
    h.update(&buf);
}

/// `$XDG_CACHE_HOME/dpo`, else `~/.cache/dpo`, else `./.dpo-cache`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("dpo");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(h).join(".cache").join("dpo");
    }
    PathBuf::from(".dpo-cache")
}

/// Whether a cache directory can hold the reference log-probs: created if missing, then a probe file
/// written and removed. Checked before the reference pass, so that its outcome is known, and said, first.
pub fn check_cache_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {} ({e})", dir.display()))?;
    let probe = dir.join(format!(".write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| format!("cannot write in {} ({e})", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Where precomputed scores came from, or went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Read from this file, written by an earlier run for the same weights and token ids.
    Read(PathBuf),
    /// Computed and written to this file.
    Written(PathBuf),
    /// Computed; not cached, for this reason (the next run computes them again).
    NotWritten(String),
}

/// Outcome of [`precompute`]: the scores and what the cache did.
pub struct Precomputed {
    pub scores: Vec<PairScore>,
    pub cache: CacheOutcome,
}

impl Precomputed {
    /// "read from cache: FILE", "computed and cached: FILE" or "computed, not cached: REASON".
    pub fn summary(&self) -> String {
        match &self.cache {
            CacheOutcome::Read(f) => format!("read from cache: {}", f.display()),
            CacheOutcome::Written(f) => format!("computed and cached: {}", f.display()),
            CacheOutcome::NotWritten(why) => format!("computed, not cached: {why}; the next run computes them again"),
        }
    }
}

/// Scores every example under the reference once, or reads the scores a previous run cached for the
/// same weights and token ids. The cache file is written atomically; an unreadable one is recomputed.
/// A cache directory that cannot be written does not stop the run (the cache only saves the next run a
/// pass): the scores are computed and the outcome says why they were not cached.
pub fn precompute<'m>(
    decoder: &Decoder,
    model: impl Into<Model<'m>>,
    examples: &[Example],
    packing: Packing,
    batch_size: usize,
    cache_dir: &Path,
    progress: impl FnMut(usize),
) -> Result<Precomputed, EngineError> {
    let model = model.into();
    let key = cache_key(model, examples);
    let cache_file = cache_dir.join(format!("ref-logps-{}.json", &key[..32]));
    let cached = std::fs::read_to_string(&cache_file)
        .ok()
        .and_then(|text| serde_json::from_str::<Vec<PairScore>>(&text).ok())
        .filter(|scores| scores.len() == examples.len());
    // The ranks of a data-parallel run score the rows together unless every one found the cache.
    let everyone = crate::dist::all(cached.is_some());
    if let Some(scores) = cached.filter(|_| everyone) {
        return Ok(Precomputed { scores, cache: CacheOutcome::Read(cache_file) });
    }
    let writable = check_cache_dir(cache_dir);
    let scores = score_pairs(decoder, model, examples, packing, batch_size, progress)?;
    let cache = match writable {
        Err(why) => CacheOutcome::NotWritten(why),
        Ok(()) => {
            let json = serde_json::to_vec(&scores).expect("scores serialise");
            match crate::io::write_atomic(&cache_file, &json) {
                Ok(()) => CacheOutcome::Written(cache_file),
                Err(e) => CacheOutcome::NotWritten(format!("cannot write {} ({e})", cache_file.display())),
            }
        }
    };
    Ok(Precomputed { scores, cache })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/parity/models").join(name)
    }

    #[test]
    fn a_reference_must_read_the_policys_token_ids() {
        let (policy_dir, ref_dir) = (fixture("gpt2-policy"), fixture("gpt2-ref"));
        let policy = hf::load_config(&policy_dir).unwrap();
        let tok = hf::load_tokenizer(&policy_dir).unwrap();
        let reference = hf::load_config(&ref_dir).unwrap();
        check_fits(&ref_dir, &reference, &policy, Some(&tok)).unwrap();
        assert!(matches!(Reference::load(&ref_dir, &policy, Some(&tok), Precision::F32), Ok(Reference::Model(_))));

        let mut wider = reference.clone();
        wider.decoder.vocab_size += 8;
        let e = check_fits(&ref_dir, &wider, &policy, Some(&tok)).unwrap_err().to_string();
        assert!(e.contains("gpt2-ref has a vocabulary of 520 tokens, the policy 512"), "{e}");

        // The same size, two ids swapped: another tokenizer.
        let dir = std::env::temp_dir().join(format!("dpo-ref-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = std::fs::read_to_string(ref_dir.join("tokenizer.json")).unwrap();
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let vocab = json["model"]["vocab"].as_object_mut().unwrap();
        let (a, b) = (vocab.keys().nth(300).unwrap().clone(), vocab.keys().nth(301).unwrap().clone());
        let (ia, ib) = (vocab[&a].clone(), vocab[&b].clone());
        vocab.insert(a, ib);
        vocab.insert(b, ia);
        std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
        let e = check_fits(&dir, &reference, &policy, Some(&tok)).unwrap_err().to_string();
        assert!(e.contains("map tokens to different ids") && e.contains("for the policy"), "{e}");
        // Without the policy's tokenizer only the sizes can be compared.
        check_fits(&dir, &reference, &policy, None).unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_unwritable_cache_dir_is_reported_not_claimed() {
        let dir = std::env::temp_dir().join(format!("dpo-ref-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A path under a regular file cannot be created, whoever runs the test (root included).
        let file = dir.join("not-a-dir");
        std::fs::write(&file, b"").unwrap();
        let e = check_cache_dir(&file.join("cache")).unwrap_err();
        assert!(e.starts_with("cannot create") && e.contains("not-a-dir"), "{e}");
        check_cache_dir(&dir.join("ok")).unwrap();
        let p = Precomputed { scores: vec![], cache: CacheOutcome::NotWritten(e) };
        assert!(p.summary().starts_with("computed, not cached: cannot create"), "{}", p.summary());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Precomputed log-probs of one precision never serve another; an f32 model keys as it always did
    /// (caches written before precisions existed stay valid); stored linears key by their values.
    #[test]
    fn the_cache_key_distinguishes_precisions_and_stored_linears() {
        let dir = fixture("gpt2-ref");
        let m = hf::load_model(&dir).unwrap();
        let tok = hf::load_tokenizer(&dir).unwrap();
        let data = dir.join("../../data/prefs.jsonl");
        let examples = crate::data::load_pairs(&data, Some(&tok), &Default::default()).unwrap().examples;
        let key = |model: Model| cache_key(model, &examples);
        let plain = key(Model::new(&m.params, None));
        assert_eq!(key(Model::new(&m.params, None).with_precision(Precision::F32)), plain);
        let bf16 = key(Model::new(&m.params, None).with_precision(Precision::Bf16));
        assert_ne!(bf16, plain);
        // The same weights held with bf16-stored linears: the stored values (equal to what a bf16 pass
        // reads) are hashed, and differ from another model's.
        let held =
            ReferenceModel::new(Decoder::new(m.config.decoder.clone()), m.params.clone(), Precision::Bf16).unwrap();
        let stored = key(held.view(Precision::Bf16));
        assert_ne!(stored, plain);
        let other = hf::load_model(&fixture("gpt2-policy")).unwrap();
        let other =
            ReferenceModel::new(Decoder::new(other.config.decoder.clone()), other.params, Precision::Bf16).unwrap();
        assert_ne!(key(other.view(Precision::Bf16)), stored);
    }
    /// A bf16 reference that keeps the embeddings of its data's tokens alone (the head in bf16) scores
    /// that data bit for bit as it does with the whole f32 table, tied head (GPT-2) or not (Llama); a row
    /// with another token is refused, and no full backward runs through it (an adapter's may: a LoRA
    /// base's tables, `engine/tests/frozen_embedding.rs`). An f32 reference is left whole.
    #[test]
    fn a_reference_keeping_its_datas_lookups_scores_them_unchanged() {
        use crate::data::load_pairs;
        use crate::scoring::score_pairs;
        for name in ["gpt2-ref", "llama-ref"] {
            let dir = fixture(name);
            let m = hf::load_model(&dir).unwrap();
            let tok = hf::load_tokenizer(&dir).unwrap();
            let data = dir.join("../../data/prefs.jsonl");
            let examples = load_pairs(&data, Some(&tok), &Default::default()).unwrap().examples;
            let held =
                |precision| ReferenceModel::new(Decoder::new(m.config.decoder.clone()), m.params.clone(), precision);
            let whole = held(Precision::Bf16).unwrap();
            let mut kept = held(Precision::Bf16).unwrap();
            let seen = &examples[..examples.len() / 2];
            let tokens = pair_tokens(seen.iter());
            kept.keep_lookups_of(&tokens).unwrap();
            let e = kept.embedding.as_ref().unwrap();
            assert_eq!(e.kept(), tokens.len(), "{name}");
            assert!(kept.params.wte.data.is_empty() && kept.params.lm_head.iter().all(|t| t.data.is_empty()), "{name}");
            let score = |r: &ReferenceModel, rows: &[Example]| {
                score_pairs(&r.decoder, r.view(Precision::Bf16), rows, Packing::SharedPrompt, 3, |_| {})
            };
            let bits = |s: Vec<PairScore>| -> Vec<(u64, u64)> {
                s.iter().map(|p| (p.chosen_logps.to_bits(), p.rejected_logps.to_bits())).collect()
            };
            assert_eq!(bits(score(&kept, seen).unwrap()), bits(score(&whole, seen).unwrap()), "{name}");

            let unseen = examples[seen.len()..]
                .iter()
                .find(|e| pair_tokens(std::iter::once(*e)).difference(&tokens).next().is_some())
                .expect("a row with a token the first half lacks");
            let err = score(&kept, std::slice::from_ref(unseen)).unwrap_err();
            assert!(matches!(err, EngineError::TokenNotKept { .. }), "{name}: {err}");

            // The f32 weights with the frozen embedding alone: its own refusal, not the stored linears'.
            let packed = crate::data::pack_pairs(&[&seen[0]], Packing::SharedPrompt);
            let mut acts = Activations::default();
            let view = Model::new(&m.params, None).with_embedding(e).with_precision(Precision::Bf16);
            let out = whole.decoder.logprobs(view, &packed.batch, &mut acts, engine::Keep::All).unwrap();
            let mut grads = Params::zeros(&whole.decoder.cfg);
            let dlogp = vec![1.0; out.logp.len()];
            let err = whole.decoder.backward_logprobs(view, &packed.batch, &mut acts, &dlogp, &mut grads).unwrap_err();
            assert!(matches!(err, EngineError::FullGradsOfFrozenBase), "{name}: {err}");

            let mut f32_ref = held(Precision::F32).unwrap();
            f32_ref.keep_lookups_of(&tokens).unwrap();
            assert!(f32_ref.embedding.is_none() && f32_ref.params == m.params, "{name}");
        }
    }
}
