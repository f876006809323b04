"""Compare `dpo logps` output with transformers on the same model and preference file.

Usage (in the reference venv, see ../shared/tools/reference-venv.sh):
    dpo logps --model MODEL --data DATA --out ours.jsonl
    python scripts/compare_logps.py MODEL DATA ours.jsonl

Tokenizes every row by TRL's rules (EOS appended to text completions; chat template for conversations, the
prompt with the generation prompt), computes the summed completion log-probs with transformers in f32, and
prints the largest absolute difference from `ours.jsonl`.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def ids_for(tok, row):
    p, c, r = row["prompt"], row["chosen"], row["rejected"]
    if isinstance(p, list):
        enc = lambda msgs, gen: tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=True)["input_ids"]
        return enc(p, True), enc(p + c, False), enc(p + r, False)
    eos = tok.eos_token
    c = c if c.endswith(eos) else c + eos
    r = r if r.endswith(eos) else r + eos
    return tok(p)["input_ids"], tok(p + c)["input_ids"], tok(p + r)["input_ids"]


def common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@torch.no_grad()
def seq_logp(model, ids, start):
    t = torch.tensor([ids])
    logits = model(t).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, t[0, 1:, None])[:, 0]
    return lp[start - 1:].sum().item(), len(ids) - start


def main():
    model_dir, data, ours = sys.argv[1:4]
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    rows = [json.loads(l) for l in open(data) if l.strip()]
    mine = [json.loads(l) for l in open(ours) if l.strip()]
    worst = 0.0
    for row, m in zip(rows, mine):
        p, pc, pr = ids_for(tok, row)
        k = min(common(p, pc), common(p, pr))
        c, lc = seq_logp(model, pc, k)
        r, lr = seq_logp(model, pr, k)
        assert (lc, lr) == (m["chosen_len"], m["rejected_len"]), (lc, lr, m)
        err = max(abs(c - m["chosen_logps"]), abs(r - m["rejected_logps"]))
        worst = max(worst, err)
        print(f"chosen {c:12.5f} (dpo {m['chosen_logps']:12.5f})  rejected {r:12.5f} (dpo {m['rejected_logps']:12.5f})  |diff| {err:.2e}")
    print(json.dumps({"rows": len(rows), "max_abs_diff": worst}))


if __name__ == "__main__":
    main()
