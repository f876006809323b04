"""PEFT's view of adapters written by `hf::peft` (run by the ignored test `peft_loads_what_we_save` in peft.rs).

Each argument is a JSON object {"base": DIR, "adapter": DIR, "merged": DIR or null, "reference": DIR or null}.
For each: PeftModel.from_pretrained(base, adapter) must create exactly the LoRA modules whose tensors the
file holds and load them unchanged; its logits are compared with transformers' logits of `merged` (our
merge, saved as a plain model) and with PEFT's own logits of `reference` (the adapter we re-saved).
Prints one JSON line per case.
"""
import json
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

torch.manual_seed(0)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


for arg in sys.argv[1:]:
    case = json.loads(arg)
    base = AutoModelForCausalLM.from_pretrained(case["base"], dtype=torch.float32).eval()
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (2, 24))
    peft = PeftModel.from_pretrained(base, case["adapter"]).eval()
    stored = load_file(f'{case["adapter"]}/adapter_model.safetensors')
    state = peft.state_dict()
    created = sorted(k for k in state if ".lora_A." in k or ".lora_B." in k)
    want = sorted(k.replace(".weight", ".default.weight") for k in stored)
    mismatched = [k for k in stored if not torch.equal(state[k.replace(".weight", ".default.weight")], stored[k])] if created == want else []
    out = {"adapter": case["adapter"], "modules_match": created == want, "pairs": len(stored) // 2,
           "values_equal": created == want and not mismatched}
    if created != want:
        out["only_peft"] = sorted(set(created) - set(want))[:5]
        out["only_file"] = sorted(set(want) - set(created))[:5]
    got = logits(peft, ids)
    if case.get("merged"):
        merged = AutoModelForCausalLM.from_pretrained(case["merged"], dtype=torch.float32).eval()
        out["max_abs_logit_diff_vs_merged"] = (got - logits(merged, ids)).abs().max().item()
    # The adapter must change the outputs (a test of nothing otherwise).
    with peft.disable_adapter():
        out["max_abs_logit_change_by_adapter"] = (got - logits(peft, ids)).abs().max().item()
    if case.get("reference"):
        base2 = AutoModelForCausalLM.from_pretrained(case["base"], dtype=torch.float32).eval()
        ref = PeftModel.from_pretrained(base2, case["reference"]).eval()
        out["max_abs_logit_diff_vs_reference"] = (got - logits(ref, ids)).abs().max().item()
    print(json.dumps(out), flush=True)
