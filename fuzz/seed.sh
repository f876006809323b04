#!/usr/bin/env bash
# Builds the starting corpora in fuzz/corpus/<target>/ (not committed) from the repository's examples
# and test fixtures and the few tiny files in fuzz/seeds/. Run from anywhere; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")"
root=..
fx=$root/tests/fixtures/parity
mkdir -p corpus/data_json corpus/data_parquet corpus/safetensors corpus/config

# Data inputs are 3 settings bytes (see src/lib.rs `data_settings`), then the file.
# flags: bits 0-1 reader (records, pairs, unpaired, sft), 4 keep_end, 8 skip_bad_rows, 16 no tokenizer,
# 32 .json (data_json only); then max_length, max_prompt_length (0: none).
seed() { # seed <dir> <name> <flags> <max_len> <max_prompt> <file>
    { printf "\\$(printf %03o "$3")\\$(printf %03o "$4")\\$(printf %03o "$5")"; cat "$6"; } > "corpus/$1/$2"
}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
head -n 3 "$root/examples/chat_prefs.jsonl" > "$tmp/chat.jsonl"
head -n 3 "$fx/data/prefs.jsonl" > "$tmp/text.jsonl"
head -n 3 "$fx/data/prefs.tokenized.jsonl" > "$tmp/ids.jsonl"
cat > "$tmp/kto.jsonl" <<'J'
{"prompt": "Q: ice?", "completion": " Cold.", "label": true}
{"prompt": "Q: ice?", "chosen": " Cold.", "rejected": " Hot."}
{"prompt_ids": [1, 2], "completion_ids": [3], "label": false}
J
cat > "$tmp/sft.jsonl" <<'J'
{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}]}
{"prompt": "Say hi.", "completion": " Hi!"}
{"chosen": "Human: hi Assistant: hello there", "rejected": "Human: hi Assistant: go away"}
J
printf '[{"prompt": "p", "chosen": " a", "rejected": " b"},\n {"prompt_ids": [5], "chosen_ids": [6, 7], "rejected_ids": [8]}]' > "$tmp/array.json"
seed data_json chat_pairs 1 0 0 "$tmp/chat.jsonl"
seed data_json chat_sft_keepend 7 12 0 "$tmp/chat.jsonl"
seed data_json text_pairs 1 0 0 "$tmp/text.jsonl"
seed data_json text_pairs_limits 13 24 6 "$tmp/text.jsonl"
seed data_json ids_pairs_notok 17 0 0 "$tmp/ids.jsonl"
seed data_json ids_unpaired_keepend 22 9 4 "$tmp/ids.jsonl"
seed data_json kto 2 0 0 "$tmp/kto.jsonl"
seed data_json sft 3 0 0 "$tmp/sft.jsonl"
seed data_json array_records 32 0 0 "$tmp/array.json"
seed data_json array_pairs_skip 41 5 0 "$tmp/array.json"

for f in seeds/*.parquet; do
    b=$(basename "$f" .parquet)
    seed data_parquet "${b}_records" 0 0 0 "$f"
    seed data_parquet "${b}_pairs" 1 0 0 "$f"
    seed data_parquet "${b}_unpaired_skip" 10 16 4 "$f"
    seed data_parquet "${b}_sft_notok" 19 0 0 "$f"
done

# safetensors: byte 0 even, then a file; odd, then an index over the target's fixed shards.
for f in seeds/*.safetensors; do
    { printf '\000'; cat "$f"; } > "corpus/safetensors/$(basename "$f" .safetensors)"
done
printf '\001{"metadata": {"total_size": 28}, "weight_map": {"a": "a.safetensors", "x": "a.safetensors", "b": "b.safetensors"}}' > corpus/safetensors/index_ok
printf '\001{"weight_map": {"c": "sub/c.safetensors", "o": "../outside.safetensors"}}' > corpus/safetensors/index_escape

# config: config.json, optionally NUL and generation_config.json.
for d in "$fx"/models/*/; do
    n=$(basename "$d")
    cp "$d/config.json" "corpus/config/$n"
    { cat "$d/config.json"; printf '\000'; cat "$d/generation_config.json"; } > "corpus/config/${n}_gen"
done
# Regressions: sizes that overflowed or allocated per layer (fixed in crates/hf/src/config.rs).
printf '{"model_type":"gpt2","vocab_size":5,"n_embd":4611686018427387904,"n_head":1,"n_layer":1,"n_positions":4}' \
    > corpus/config/regress_n_embd
printf '{"model_type":"mistral","vocab_size":5,"hidden_size":8,"num_attention_heads":1,"num_hidden_layers":1000000000000,"intermediate_size":4,"max_position_embeddings":4,"sliding_window":2}' \
    > corpus/config/regress_layers
echo "corpora: $(for t in corpus/*/; do printf '%s=%s ' "$(basename "$t")" "$(ls "$t" | wc -l)"; done)"
