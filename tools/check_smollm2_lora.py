#!/usr/bin/env python3
"""transformers/PEFT check of a LoRA DPO run on SmolLM2-135M-Instruct (tools/smollm2_lora_dpo.sh makes the run).

(a) AutoModelForCausalLM.from_pretrained(RUN/final-merged) greedily generates 32 tokens from the same rows' prompts; the text
    and token count must equal `dpo generate --temperature 0` on the same merged directory.
(b) PeftModel.from_pretrained(BASE, RUN/final): summed log-probs of the chosen and rejected completions of held-out
    rows spread over the file must match `dpo logps --adapter RUN/final` within 1e-4 (the LoRA log-prob tolerance of
    /work/shared/fixtures/more/README.md); the completion lengths must agree too (same chat tokenization).
Not part of `cargo test`: needs the reference venv (torch, transformers, peft) and the downloaded model.
Usage: check_smollm2_lora.py --base BASE --run RUN --data HELDOUT.jsonl [--dpo target/release/dpo] [--rows 6]
Exits non-zero when a check fails; prints the figures either way.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

LOGP_TOL = 1e-4


def dpo_json_lines(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def chat_ids(tok, messages, generation_prompt):
    ids = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def check_generation(args, rows, tmp):
    merged = os.path.join(args.run, "final-merged")
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    prompts = os.path.join(tmp, "prompts.jsonl")
    with open(prompts, "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": r["prompt"]}) + "\n")
    ours = dpo_json_lines([args.dpo, "generate", "--model", merged, "--data", prompts, "--temperature", "0",
                           "--max-new-tokens", "32"])
    ok = True
    for r, line in zip(rows, ours):
        ids = torch.tensor([chat_ids(tok, r["prompt"], True)])
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.eos_token_id)
        new = g[0, ids.shape[1]:].tolist()
        text = tok.decode(new, skip_special_tokens=True)
        same = text == line["completion"] and len(new) == line["tokens"]
        ok &= same
        print(f"(a) {'same' if same else 'DIFFERENT'}: {r['prompt'][-1]['content']!r}\n"
              f"    transformers ({len(new)} tokens): {text!r}\n    dpo generate ({line['tokens']} tokens): "
              f"{line['completion']!r}")
    return ok


def check_logps(args, rows, tmp):
    tok = AutoTokenizer.from_pretrained(args.base)
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, os.path.join(args.run, "final")).eval()
    data = os.path.join(tmp, "rows.jsonl")
    with open(data, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    ours = dpo_json_lines([args.dpo, "logps", "--model", args.base, "--adapter", os.path.join(args.run, "final"),
                           "--data", data])
    worst = 0.0
    ok = True
    for r, line in zip(rows, ours):
        prompt = chat_ids(tok, r["prompt"], True)
        for side in ("chosen", "rejected"):
            full = chat_ids(tok, r["prompt"] + r[side], False)
            assert full[:len(prompt)] == prompt, "chat template: the prompt is not a prefix of prompt+completion"
            completion = full[len(prompt):]
            ids = torch.tensor([full])
            with torch.no_grad():
                logits = model(ids).logits[0, :-1].double()  # [T-1, vocab]
            logp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]  # [T-1]
            theirs = logp[len(prompt) - 1:].sum().item()
            diff = abs(theirs - line[f"{side}_logps"])
            worst = max(worst, diff)
            same_len = len(completion) == line[f"{side}_len"]
            ok &= same_len and diff <= LOGP_TOL
            print(f"(b) {side:8s} PEFT {theirs:12.6f}  dpo {line[side + '_logps']:12.6f}  |diff| {diff:.2e}  "
                  f"len {len(completion)}/{line[side + '_len']}")
    print(f"(b) max |PEFT - dpo logps --adapter| = {worst:.2e} over {len(rows)} rows (tolerance {LOGP_TOL:g})")
    return ok


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--dpo", default="target/release/dpo")
    p.add_argument("--rows", type=int, default=6)
    args = p.parse_args()
    torch.set_num_threads(2)
    with open(args.data) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = rows[:: max(1, len(rows) // args.rows)][: args.rows]  # spread over the file: every kind of question
    with tempfile.TemporaryDirectory() as tmp:
        gen_ok = check_generation(args, rows, tmp)
        logp_ok = check_logps(args, rows, tmp)
    print(f"generation identical: {gen_ok}; log-probs within {LOGP_TOL:g}: {logp_ok}")
    sys.exit(0 if gen_ok and logp_ok else 1)


if __name__ == "__main__":
    main()
