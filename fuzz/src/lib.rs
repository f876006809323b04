//! What the fuzz targets share: scratch files (the readers take paths) and the data-pipeline checks
//! that `data_json` and `data_parquet` both run.

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use dpo::data::{
    check_vocab, check_vocab_sft, load_pairs, load_sft, load_unpaired, pack_pairs, pack_sequences, read_records,
    DataError, DataOptions, DataStats, Packing, Truncation,
};

/// A directory of this process's own under /dev/shm (RAM), made once.
pub fn scratch_dir() -> &'static Path {
    static DIR: LazyLock<PathBuf> = LazyLock::new(|| {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() { base.to_path_buf() } else { std::env::temp_dir() };
        let dir = base.join(format!("dpo-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    });
    &DIR
}

/// Writes `bytes` to `name` in the scratch directory (replacing it) and returns its path.
pub fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch_dir().join(name);
    std::fs::write(&path, bytes).expect("write scratch file");
    path
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/parity")
}

const CHATML: &str = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}\
{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The parity fixtures' byte-level BPE tokenizer (EOS `<|endoftext|>`), with a ChatML template.
static TOKENIZER: LazyLock<hf::Tokenizer> = LazyLock::new(|| {
    hf::Tokenizer::from_dir(&fixtures().join("tokenizer"))
        .expect("fixture tokenizer")
        .with_chat_template(CHATML.into(), "chatml".into())
});

/// Which reader a data input goes through, from its first byte.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Records,
    Pairs,
    Unpaired,
    Sft,
}

/// Splits a data input into its settings and the file's bytes: byte 0 picks the reader, the
/// truncation side, `skip_bad_rows` and whether there is a tokenizer; bytes 1 and 2 are `max_length` and
/// `max_prompt_length` (0: none).
pub fn data_settings(data: &[u8]) -> Option<(u8, Kind, DataOptions, bool, &[u8])> {
    let (&[flags, max_len, max_prompt], rest) = data.split_first_chunk::<3>()?;
    let kind = [Kind::Records, Kind::Pairs, Kind::Unpaired, Kind::Sft][(flags & 3) as usize];
    let opt = |b: u8| (b != 0).then_some(b as usize);
    let opts = DataOptions {
        max_length: opt(max_len),
        max_prompt_length: opt(max_prompt),
        truncation: if flags & 4 != 0 { Truncation::KeepEnd } else { Truncation::KeepStart },
        skip_bad_rows: flags & 8 != 0,
    };
    let with_tokenizer = flags & 16 == 0;
    Some((flags, kind, opts, with_tokenizer, rest))
}

/// Every error of a data file names it.
fn check_error(path: &Path, e: &DataError) {
    let m = e.to_string();
    let name = path.file_name().unwrap().to_str().unwrap();
    assert!(matches!(e, DataError::Options(_)) || m.contains(name), "error does not name the file: {m}");
}

fn check_stats(s: &DataStats, kept: usize, opts: &DataOptions) {
    assert_eq!(s.examples_kept, kept);
    assert!(kept > 0, "a load that succeeds keeps at least one example");
    assert!(s.rows_read > 0);
    assert_eq!(s.bad_row_messages.len(), s.bad_rows.min(dpo::data::load::MAX_BAD_ROW_MESSAGES));
    assert!(opts.skip_bad_rows || s.bad_rows == 0, "bad rows skipped without skip_bad_rows");
    assert!(s.bad_rows <= s.rows_read);
    assert!(s.prompt_truncated <= kept && s.completion_truncated <= kept && s.prompt_not_prefix <= kept);
    assert!(opts.max_length.is_some() || opts.max_prompt_length.is_some() || s.prompt_truncated == 0);
    let _ = s.summary();
}

/// A prompt and completion that a load kept: a scored completion token, within the limits.
fn check_sequence(prompt: usize, completion: usize, scored: usize, opts: &DataOptions) {
    assert!(scored >= 1, "kept a sequence with no scored completion token");
    assert!(scored <= completion);
    if let Some(l) = opts.max_length {
        assert!(prompt + completion <= l, "sequence of {} tokens over max_length {l}", prompt + completion);
    }
}

fn location_ok(loc: &str, ext: &str) -> bool {
    let (word, n) = loc.split_once(' ').unwrap_or(("", ""));
    let word_ok = match ext {
        "parquet" => word == "row",
        "json" => word == "element" || word == "line",
        _ => word == "line",
    };
    word_ok && n.parse::<usize>().is_ok_and(|n| n >= 1)
}

/// Runs `data` (settings, then a data file) through the reader it picks and checks what the library
/// promises of the result.
pub fn fuzz_data(data: &[u8], ext: &str) {
    let Some((_, kind, opts, with_tokenizer, bytes)) = data_settings(data) else { return };
    let path = scratch_file(&format!("data.{ext}"), bytes);
    let tok = with_tokenizer.then(|| &*TOKENIZER);
    let vocab = TOKENIZER.vocab_size();

    let records = read_records(&path);
    match &records {
        Ok(recs) => {
            assert!(!recs.is_empty(), "read_records returned no records and no error");
            for r in recs {
                assert!(location_ok(&r.location, ext), "bad location {:?} for .{ext}", r.location);
            }
            // In file order: the numbers strictly increase.
            let nums: Vec<usize> =
                recs.iter().map(|r| r.location.split_once(' ').unwrap().1.parse().unwrap()).collect();
            assert!(nums.windows(2).all(|w| w[0] < w[1]), "records out of order: {nums:?}");
        }
        Err(e) => check_error(&path, e),
    }
    let rows_read = records.as_ref().ok().map(Vec::len);
    let check_rows = |s: &DataStats| {
        if let Some(n) = rows_read {
            assert_eq!(s.rows_read, n, "load read a different number of rows than read_records");
        }
    };

    match kind {
        Kind::Records => {}
        Kind::Pairs => match load_pairs(&path, tok, &opts) {
            Ok(d) => {
                check_stats(&d.stats, d.examples.len(), &opts);
                check_rows(&d.stats);
                for e in &d.examples {
                    assert!(location_ok(&e.location, ext), "{:?}", e.location);
                    if let Some(m) = opts.max_prompt_length {
                        assert!(e.prompt_ids.len() <= m);
                    }
                    assert!(e.chosen_prompt_skip <= e.prompt_ids.len() && e.rejected_prompt_skip <= e.prompt_ids.len());
                    assert!(
                        e.chosen_prompt_skip == 0 || e.rejected_prompt_skip == 0,
                        "a shared cut left on both sides"
                    );
                    check_sequence(e.chosen_prompt().len(), e.chosen_ids.len(), e.chosen_len(), &opts);
                    check_sequence(e.rejected_prompt().len(), e.rejected_ids.len(), e.rejected_len(), &opts);
                }
                let _ = check_vocab(&path, &d.examples, vocab).map_err(|e| check_error(&path, &e));
                // Both packings score the same tokens, as many as the examples say.
                let refs: Vec<_> = d.examples.iter().collect();
                let shared = pack_pairs(&refs, Packing::SharedPrompt);
                let separate = pack_pairs(&refs, Packing::Separate);
                for (i, e) in d.examples.iter().enumerate() {
                    for (p, want) in [(&shared, e.chosen_len()), (&separate, e.chosen_len())] {
                        assert_eq!(p.chosen[i].len(), want);
                    }
                    for (p, want) in [(&shared, e.rejected_len()), (&separate, e.rejected_len())] {
                        assert_eq!(p.rejected[i].len(), want);
                    }
                    let tokens = |p: &dpo::data::PackedPairs, r: &std::ops::Range<usize>| {
                        p.batch.targets[r.clone()].iter().map(|t| t.token).collect::<Vec<_>>()
                    };
                    assert_eq!(tokens(&shared, &shared.chosen[i]), tokens(&separate, &separate.chosen[i]));
                    assert_eq!(tokens(&shared, &shared.rejected[i]), tokens(&separate, &separate.rejected[i]));
                }
            }
            Err(e) => check_error(&path, &e),
        },
        Kind::Unpaired => match load_unpaired(&path, tok, &opts) {
            Ok(d) => {
                check_stats(&d.stats, d.examples.len(), &opts);
                check_rows(&d.stats);
                for e in &d.examples {
                    assert!(location_ok(&e.location, ext), "{:?}", e.location);
                    if let Some(m) = opts.max_prompt_length {
                        assert!(e.prompt_ids.len() <= m);
                    }
                    check_sequence(e.prompt_ids.len(), e.completion_ids.len(), e.completion_len(), &opts);
                }
                let seqs: Vec<_> = d.examples.iter().map(|e| e.parts()).collect();
                let (_, ranges) = pack_sequences(&seqs);
                assert!(ranges.iter().zip(&d.examples).all(|(r, e)| r.len() == e.completion_len()));
            }
            Err(e) => check_error(&path, &e),
        },
        Kind::Sft => match load_sft(&path, tok, &opts) {
            Ok(d) => {
                check_stats(&d.stats, d.examples.len(), &opts);
                check_rows(&d.stats);
                for e in &d.examples {
                    assert!(location_ok(&e.location, ext), "{:?}", e.location);
                    if let Some(m) = opts.max_prompt_length {
                        assert!(e.prompt_ids.len() <= m);
                    }
                    check_sequence(e.prompt_ids.len(), e.completion_ids.len(), e.completion_len(), &opts);
                }
                let _ = check_vocab_sft(&path, &d.examples, vocab).map_err(|e| check_error(&path, &e));
                let seqs: Vec<_> = d.examples.iter().map(|e| e.parts()).collect();
                let (_, ranges) = pack_sequences(&seqs);
                assert!(ranges.iter().zip(&d.examples).all(|(r, e)| r.len() == e.completion_len()));
            }
            Err(e) => check_error(&path, &e),
        },
    }
}
