#!/usr/bin/env python3
"""What PyTorch's own bf16 autocast costs in accuracy, as the yardstick for `--precision bf16` (issue 12).

Writes the goldens of tests/fixtures/bf16/ (its README says how they were made; crates/dpo/tests/bf16_accuracy.rs
reads them):

  logps     for every parity fixture (tests/fixtures/parity and tests/fixtures/more): the summed completion log-probs
            of its policy and reference models on every row of data/prefs.tokenized.jsonl, in f32 and under
            torch.autocast("cpu", dtype=torch.bfloat16), and autocast's mean and max absolute error
            -> <arch>.json
  smollm2   the same on 16 chat rows (tools/make_smollm2_prefs.py's, spread over the set) of a SmolLM2-135M-Instruct
            HF directory -> smollm2-135m.json and smollm2-135m.rows.jsonl (the rows, for `dpo`)
  train     TRL's DPOTrainer on the 4 parity fixtures with the fixture's own settings (MANIFEST.json), 6 steps in f32
            and 6 with bf16=True (CPU autocast), on 16 orders of the rows (file order first): both trajectories and
            autocast's distance per metric of every run -> train_<arch>.json

The f32 log-probs are checked against the fixture's expected/<arch>/logps.jsonl (2e-4, its README's tolerance) and the
file-order f32 training run against expected/<arch>/train.jsonl (1e-3 of max(|x|, 1)), so the goldens are tied to the
rows and the run the parity tests already hold dpo to.

Usage (from the repository root, in the reference venv):
  /work/venv/bin/python tools/bf16_autocast_reference.py logps
  /work/venv/bin/python tools/bf16_autocast_reference.py smollm2 --model /work/models/smollm2-hf
  /work/venv/bin/python tools/bf16_autocast_reference.py train [--arch gpt2 llama llama3 neox]
  /work/venv/bin/python tools/bf16_autocast_reference.py cli [--dpo target/release/dpo] [--smollm2 DIR]
"""
import argparse
import json
import os
import random
import shutil
import sys
import tempfile

import datasets
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

transformers.utils.logging.disable_progress_bar()
datasets.disable_progress_bars()

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIXTURES, "bf16")
FIXTURE_SETS = {"parity": ["gpt2", "llama", "llama3", "neox"], "more": ["phi3", "qwen3", "smollm3", "gptj", "gemma3"]}
LOGP_TOL = 2e-4  # tests/fixtures/parity/README.md: sequence log-probs in f32
METRIC_TOL = 1e-3  # the same README: a 6-step run's per-step metrics, relative to max(|x|, 1)
TRAIN_METRICS = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"]
SMOLLM2_ROWS = 16
TRAIN_ORDERS = 16  # data orders per training golden: independent draws of the rounding noise


def versions():
    import trl
    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}


def load_model(path):
    # eager attention, as tools/make_fixtures.py made the fixtures' expected numbers
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@torch.no_grad()
def seq_logp(model, prompt_ids, completion_ids, autocast):
    """Sum over completion tokens of log softmax(logits) at the next token, as `dpo logps` reports it. Under autocast
    the model's matrix products run in bf16 (so the logits come out bf16); the log-softmax runs in f32 on them, as
    make_fixtures.py's seq_logps and TRL do."""
    ids = torch.tensor([prompt_ids + completion_ids])  # [1, T]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids).logits[0, :-1]  # [T-1, vocab]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, 1:, None])[:, 0]  # [T-1]
    return lp[len(prompt_ids) - 1:].sum().item()


def row_logps(model, rows, autocast):
    """[[chosen, rejected]] per row."""
    return [[seq_logp(model, r["prompt_ids"], r[side], autocast) for side in ("chosen_ids", "rejected_ids")]
            for r in rows]


def errors(f32, other):
    """Mean and max of |other - f32| over every value of every model."""
    diffs = [abs(o - f) for m in f32 for fr, orow in zip(f32[m], other[m]) for f, o in zip(fr, orow)]
    return sum(diffs) / len(diffs), max(diffs)


def reference(models, rows):
    """f32 and autocast log-probs of each named model on `rows`, with autocast's errors."""
    f32, autocast = {}, {}
    for name, model in models.items():
        f32[name] = row_logps(model, rows, autocast=False)
        autocast[name] = row_logps(model, rows, autocast=True)
    mae, worst = errors(f32, autocast)
    lens = [[len(r["chosen_ids"]), len(r["rejected_ids"])] for r in rows]
    return {"lens": lens, "f32": f32, "autocast": autocast, "autocast_mae": mae, "autocast_max": worst}


def f32_digits(obj):
    """`obj` with every float written with 9 significant digits: exact for an f32 value, a third the size."""
    if isinstance(obj, float):
        return float(f"{obj:.9g}")
    if isinstance(obj, dict):
        return {k: f32_digits(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [f32_digits(v) for v in obj]
    return obj


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(f32_digits(obj), f, indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {os.path.relpath(path, ROOT)}")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def cmd_logps(args):
    torch.set_num_threads(1)
    for fset, archs in FIXTURE_SETS.items():
        base = os.path.join(FIXTURES, fset)
        rows = read_jsonl(os.path.join(base, "data", "prefs.tokenized.jsonl"))
        for arch in archs:
            models = {v: load_model(os.path.join(base, "models", f"{arch}-{v}")) for v in ("policy", "ref")}
            res = reference(models, rows)
            want = read_jsonl(os.path.join(base, "expected", arch, "logps.jsonl"))
            drift = max(abs(res["f32"][m][i][j] - w[f"{m}_{side}_logps"])
                        for m in ("policy", "ref") for i, w in enumerate(want)
                        for j, side in enumerate(("chosen", "rejected")))
            assert drift < LOGP_TOL, f"{fset}/{arch}: f32 log-probs {drift:.2e} from expected/logps.jsonl"
            out = {"fixture": f"{fset}/{arch}", "rows": f"tests/fixtures/{fset}/data/prefs.tokenized.jsonl",
                   "models": {m: f"tests/fixtures/{fset}/models/{arch}-{m}" for m in models},
                   "f32_vs_expected_max": drift, **versions(), **res}
            write_json(os.path.join(OUT, f"{arch}.json"), out)
            print(f"  {fset}/{arch}: autocast MAE {res['autocast_mae']:.3e}, max {res['autocast_max']:.3e}; "
                  f"f32 vs expected {drift:.1e}")


def chat_ids(tok, messages, generation_prompt):
    ids = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def cmd_smollm2(args):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_smollm2_prefs import rows as smollm2_rows
    chat = smollm2_rows()
    chat = chat[:: len(chat) // SMOLLM2_ROWS][:SMOLLM2_ROWS]  # spread over the set: every kind of question
    tok = AutoTokenizer.from_pretrained(args.model)
    rows = []
    for r in chat:
        prompt = chat_ids(tok, r["prompt"], True)
        row = {"prompt_ids": prompt}
        for side in ("chosen", "rejected"):
            full = chat_ids(tok, r["prompt"] + r[side], False)
            assert full[:len(prompt)] == prompt, "chat template: the prompt is not a prefix of prompt+completion"
            row[f"{side}_ids"] = full[len(prompt):]
        rows.append(row)
    torch.set_num_threads(args.threads)
    res = reference({"policy": load_model(args.model)}, rows)
    with open(os.path.join(OUT, "smollm2-135m.rows.jsonl"), "w") as f:
        for r in chat:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    out = {"fixture": "SmolLM2-135M-Instruct", "rows": "tests/fixtures/bf16/smollm2-135m.rows.jsonl (chat template)",
           "models": {"policy": "$DPO_SMOLLM2 (HuggingFaceTB/SmolLM2-135M-Instruct)"},
           **versions(), **res}
    write_json(os.path.join(OUT, "smollm2-135m.json"), out)
    print(f"  SmolLM2-135M: autocast MAE {res['autocast_mae']:.3e}, max {res['autocast_max']:.3e}")


def row_orders(n):
    """The data orders of the training goldens: file order first (the fixture's own run), then seeded shuffles.
    Each order is one more independent draw of bf16's rounding noise along a 6-step trajectory."""
    orders = [list(range(n))]
    for seed in range(1, TRAIN_ORDERS):
        order = list(range(n))
        random.Random(seed).shuffle(order)
        orders.append(order)
    return orders


def trl_run(arch, order, bf16):
    """TRL's DPOTrainer with the fixture's settings (tools/make_fixtures.py run_trl) from the fixture's weights on
    the rows of data/prefs.jsonl in `order`: each logged metric's values at steps 1..6 and the policy's weight
    change."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    base = os.path.join(FIXTURES, "parity")
    settings = json.load(open(os.path.join(base, "MANIFEST.json")))["archs"][arch]["train"]
    rows = read_jsonl(os.path.join(base, "data", "prefs.jsonl"))
    rows = [rows[i] for i in order]
    policy = load_model(os.path.join(base, "models", f"{arch}-policy"))
    ref = load_model(os.path.join(base, "models", f"{arch}-ref"))
    tok = AutoTokenizer.from_pretrained(os.path.join(base, "models", f"{arch}-policy"))
    logs = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                keep.append({k: logs[k] for k in TRAIN_METRICS + ["num_tokens"]})

    keep = logs
    out_dir = tempfile.mkdtemp()
    cfg = DPOConfig(output_dir=out_dir, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=bf16,
                    fp16=False, dataloader_num_workers=0, disable_tqdm=True, **settings)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=cfg, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=[Keep()])
    trainer.remove_callback(PrinterCallback)  # the metrics go to the JSON, not to stdout
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)
    start = load_model(os.path.join(base, "models", f"{arch}-policy"))
    # autocast keeps master weights in f32: the trained policy must still be f32
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    delta = torch.cat([(p.detach() - q.detach()).flatten()
                       for p, q in zip(trainer.model.parameters(), start.parameters())])
    # one list of per-step values per metric: the file stays small
    return {k: [step[k] for step in logs] for k in logs[0]}, delta


def cmd_train(args):
    torch.set_num_threads(args.threads)
    for arch in args.arch:
        train_reference(arch)


def train_reference(arch):
    expected = read_jsonl(os.path.join(FIXTURES, "parity", "expected", arch, "train.jsonl"))
    runs = []
    for k, order in enumerate(row_orders(len(read_jsonl(os.path.join(FIXTURES, "parity", "data", "prefs.jsonl"))))):
        f32, d32 = trl_run(arch, order, bf16=False)
        bf16, d16 = trl_run(arch, order, bf16=True)
        assert len(f32["loss"]) == len(bf16["loss"]) == 6 and f32["num_tokens"] == bf16["num_tokens"]
        run = {"order": order, "trl_f32": f32, "trl_bf16": bf16,
               "autocast_distance": {m: max(abs(a - b) for a, b in zip(f32[m], bf16[m])) for m in TRAIN_METRICS}}
        if k == 0:
            # file order is the fixture's run: same metrics within its tolerance, and its trained weights
            # (expected/<arch>/trained) are what a weight-change distance is measured against
            drift = max(abs(a - e[m]) / max(abs(e[m]), 1.0) for m in TRAIN_METRICS for a, e in zip(f32[m], expected))
            assert drift < METRIC_TOL, f"{arch}: this f32 run is {drift:.2e} from expected/train.jsonl"
            run["f32_vs_expected_max_rel"] = drift
            run["autocast_weight_change_rel"] = ((d16 - d32).norm() / d32.norm()).item()
        runs.append(run)
        print(f"  {arch} order {k}: " + ", ".join(f"{m} {v:.2e}" for m, v in run["autocast_distance"].items()))
    out = {"fixture": f"parity/{arch}", "settings": f"MANIFEST.json archs.{arch}.train (sigmoid, beta 0.1, lr 5e-3 "
           "constant, 6 steps of 4 rows, clip 1.0), rows of data/prefs.jsonl in each run's order", **versions(),
           "runs": runs}
    write_json(os.path.join(OUT, f"train_{arch}.json"), out)
    print(f"  {arch}: weight change |bf16 - f32| / |f32| = {runs[0]['autocast_weight_change_rel']:.3e} (file order); "
          f"f32 run vs expected {runs[0]['f32_vs_expected_max_rel']:.1e}")


def cmd_cli(args):
    """`dpo logps --precision bf16` (the command line itself) on every golden's rows: its MAE against the golden's
    f32 log-probs next to autocast's. The same figures as crates/dpo/tests/bf16_accuracy.rs, through the binary."""
    import glob
    import subprocess
    worst = 0.0
    for path in sorted(glob.glob(os.path.join(OUT, "*.json"))):
        golden = json.load(open(path))
        if "autocast_mae" not in golden:
            continue  # a training golden
        smollm2 = golden["fixture"].startswith("SmolLM2")
        if smollm2 and not args.smollm2:
            continue
        rows = os.path.join(OUT, "smollm2-135m.rows.jsonl") if smollm2 else os.path.join(ROOT, golden["rows"])
        diffs = []
        for name, rel in golden["models"].items():
            model = args.smollm2 if smollm2 else os.path.join(ROOT, rel)
            out = subprocess.run([args.dpo, "logps", "--model", model, "--data", rows, "--precision", "bf16"],
                                 check=True, capture_output=True, text=True).stdout
            got = [json.loads(line) for line in out.splitlines() if line.strip()]
            assert [[g["chosen_len"], g["rejected_len"]] for g in got] == golden["lens"], f"{path}: other tokens"
            diffs += [abs(g[f"{side}_logps"] - w[j]) for g, w in zip(got, golden["f32"][name])
                      for j, side in enumerate(("chosen", "rejected"))]
        mae, autocast = sum(diffs) / len(diffs), golden["autocast_mae"]
        worst = max(worst, mae / autocast)
        print(f"{golden['fixture']:24s} dpo logps --precision bf16 MAE {mae:.3e}, autocast {autocast:.3e}, "
              f"ratio {mae / autocast:.2f}")
    print(f"worst ratio {worst:.2f} (target <= 1.5)")
    sys.exit(0 if worst <= 1.5 else 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("logps")
    s = sub.add_parser("smollm2")
    s.add_argument("--model", required=True, help="SmolLM2-135M-Instruct HF directory")
    s.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("cli")
    c.add_argument("--dpo", default=os.path.join(ROOT, "target", "release", "dpo"))
    c.add_argument("--smollm2", help="SmolLM2-135M-Instruct HF directory (else its golden is skipped)")
    t = sub.add_parser("train")
    t.add_argument("--arch", nargs="+", default=FIXTURE_SETS["parity"], choices=FIXTURE_SETS["parity"])
    t.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    os.makedirs(OUT, exist_ok=True)
    {"logps": cmd_logps, "smollm2": cmd_smollm2, "train": cmd_train, "cli": cmd_cli}[a.cmd](a)


if __name__ == "__main__":
    main()
