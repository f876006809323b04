#!/usr/bin/env bash
# One quiet benchmark pass (nothing else running): issue 12's bf16 pairs twice, micro-pairs and f32 once, for
# GPT-2 and SmolLM2-135M shapes; issue 11's LoRA r16 on SmolLM2-360M in f32 and bf16 and on one thread; the GEMM
# rates of the same pass. TRL runs need the reference venv (../shared/tools/reference-venv.sh): set PYTHON.
#
#   PYTHON=/path/to/venv/bin/python scripts/bench_quiet_pass.sh [RESULTS.jsonl]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-quiet.jsonl}; mkdir -p "$(dirname "$out")"
py=${PYTHON:-$HOME/.cache/dpo-reference-venv/bin/python}
cargo build --release --quiet && cargo build --release --quiet -p dpo-engine --example gemm_shapes
dpo=./target/release/dpo
run() { echo "+ $(date +%H:%M:%S) $*" >&2; "$@" 2>/dev/null | tail -n 1 | tee -a "$out"; }
trl() { run "$py" scripts/trl_bench.py --threads 2 "$@"; }
lscpu | grep -E "Model name|^Model:" >&2
# issue 12: bf16 pairs back to back, twice; f32 and micro-pairs once
for arch in gpt2 llama; do
    trl --arch $arch --bf16
    run $dpo bench --arch $arch --precision bf16
    trl --arch $arch --bf16
    run $dpo bench --arch $arch --precision bf16
    run $dpo bench --arch $arch --precision bf16 --micro-pairs 1
    trl --arch $arch
    run $dpo bench --arch $arch
done
# issue 11: LoRA r16 on smollm2-360m, f32 and bf16, and one thread
L="--arch smollm2-360m --pairs 4 --prompt 64 --completion 128 --steps 6"
trl $L --lora 16
run $dpo bench $L --lora-r 16
trl $L --lora 16 --bf16
run $dpo bench $L --lora-r 16 --precision bf16
run $dpo --threads 1 bench --arch smollm2-360m --pairs 4 --prompt 64 --completion 128 --steps 3 --lora-r 16
echo "+ $(date +%H:%M:%S) gemm_shapes" >&2
./target/release/examples/gemm_shapes 2>&1 | tee -a "${out%.jsonl}-gemm.txt" >&2
echo "+ $(date +%H:%M:%S) done" >&2
