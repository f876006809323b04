#!/usr/bin/env bash
# DPO training speed and memory, dpo against TRL, back to back on this machine (BENCHMARKS.md).
#
#   scripts/bench_vs_trl.sh [main|bf16|techniques|scaling|all] [RESULTS.jsonl]
#
# main:       the issue's settings (4 pairs, prompt 64, completion 128), both shapes, reference in memory and
#             precomputed, TRL then dpo.
# bf16:       issue 12's settings: both shapes, reference in memory, TRL f32 and bf16 (autocast), then dpo
#             --precision f32 and bf16 (and with --micro-pairs 1).
# techniques: dpo with one technique changed at a time (prefix sharing, micro-pairs, threads, GEMM kernel).
# scaling:    dpo step time for rows of 128 to 2048 tokens (1 pair, prompt:completion 1:3), and a 4096-token row.
# Every run prints one JSON line, appended to RESULTS.jsonl (default bench-results.jsonl).
# TRL runs need the reference venv (../shared/tools/reference-venv.sh); set PYTHON to its python.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-main}
out=${2:-bench-results.jsonl}
py=${PYTHON:-$HOME/.cache/dpo-reference-venv/bin/python}
dpo=./target/release/dpo
cargo build --release --quiet

run() {
    echo "+ $*" >&2
    "$@" 2>/dev/null | tail -n 1 | tee -a "$out"
}
trl() { run "$py" scripts/trl_bench.py --threads 2 "$@"; }

if [[ $what == main || $what == all ]]; then
    for arch in gpt2 llama; do
        trl --arch "$arch"
        run $dpo bench --arch "$arch"
        run $dpo bench --arch "$arch" --micro-pairs 1
        trl --arch "$arch" --precompute
        run $dpo bench --arch "$arch" --precompute
        run $dpo bench --arch "$arch" --precompute --micro-pairs 1
    done
fi
if [[ $what == bf16 || $what == all ]]; then
    for arch in gpt2 llama; do
        trl --arch "$arch"
        trl --arch "$arch" --bf16
        run $dpo bench --arch "$arch"
        run $dpo bench --arch "$arch" --precision bf16
        run $dpo bench --arch "$arch" --precision bf16 --micro-pairs 1
    done
fi
if [[ $what == techniques || $what == all ]]; then
    for arch in gpt2 llama; do
        run $dpo bench --arch "$arch" --no-prefix-sharing
        run $dpo --threads 1 bench --arch "$arch" --steps 4
        DPO_GEMM=portable run $dpo bench --arch "$arch"
    done
    cargo run --release --quiet -p dpo-engine --example gemm_shapes | tee -a "$out"
fi
if [[ $what == scaling || $what == all ]]; then
    for len in 128 256 512 1024 2048; do
        run $dpo bench --arch llama --pairs 1 --prompt $((len / 4)) --completion $((len * 3 / 4)) --steps 3
    done
    run $dpo bench --arch llama --pairs 1 --prompt 1024 --completion 3072 --steps 2
fi
