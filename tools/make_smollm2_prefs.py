#!/usr/bin/env python3
"""Chat-format preference pairs for the SmolLM2-135M-Instruct LoRA DPO check (tools/smollm2_lora_dpo.sh).

examples/chat_prefs.jsonl has only 4 rows, too few to measure held-out accuracy, so this writes a larger set in the
same format: the chosen reply is a correct, complete sentence; the rejected one is either a wrong fact in the same
sentence form or a short unhelpful reply. Deterministic (no randomness): the same files every run.
Usage: make_smollm2_prefs.py OUT_DIR  ->  OUT_DIR/train.jsonl, OUT_DIR/heldout.jsonl (every 3rd generated row held
out, plus the 4 repository examples, which never appear in training).
"""
import json
import os
import sys

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"),
            ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Poland", "Warsaw"),
            ("Austria", "Vienna"), ("Sweden", "Stockholm"), ("Russia", "Moscow"), ("China", "Beijing"),
            ("India", "New Delhi"), ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"), ("Chile", "Santiago"),
            ("Cuba", "Havana"), ("Finland", "Helsinki")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
             ("light", "dark"), ("early", "late"), ("open", "closed"), ("strong", "weak"), ("full", "empty"),
             ("young", "old"), ("wet", "dry")]
COLORS = [("the sky on a clear day", "blue"), ("grass", "green"), ("snow", "white"), ("a ripe banana", "yellow"),
          ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange"), ("a lemon", "yellow")]
UNHELPFUL = ["I don't know.", "Look it up yourself.", "Why do you care?", "No idea, sorry."]


def msg(role, text):
    return [{"role": role, "content": text}]


def rows():
    out = []
    for i, (country, city) in enumerate(CAPITALS):
        wrong = CAPITALS[(i + 5) % len(CAPITALS)][1]
        q = f"What is the capital of {country}?"
        bad = f"The capital of {country} is {wrong}." if i % 2 == 0 else UNHELPFUL[i // 2 % len(UNHELPFUL)]
        out.append((q, f"The capital of {country} is {city}.", bad))
    for i in range(24):
        a, b = 3 + (i * 7) % 19, 2 + (i * 5) % 13
        q = f"What is {a} plus {b}?"
        bad = f"{a} plus {b} is {a + b + 1 + i % 3}." if i % 2 == 0 else UNHELPFUL[(i // 2 + 1) % len(UNHELPFUL)]
        out.append((q, f"{a} plus {b} is {a + b}.", bad))
    for i, (word, opposite) in enumerate(OPPOSITES):
        wrong = OPPOSITES[(i + 3) % len(OPPOSITES)][1]
        q = f"What is the opposite of '{word}'?"
        bad = f"The opposite of '{word}' is '{wrong}'." if i % 2 == 0 else UNHELPFUL[(i // 2 + 2) % len(UNHELPFUL)]
        out.append((q, f"The opposite of '{word}' is '{opposite}'.", bad))
    for i, (thing, color) in enumerate(COLORS):
        wrong = "purple" if color != "purple" else "green"
        q = f"What color is {thing}?"
        bad = f"{thing[0].upper() + thing[1:]} is {wrong}." if i % 2 == 0 else UNHELPFUL[(i // 2 + 3) % 4]
        out.append((q, f"{thing[0].upper() + thing[1:]} is {color}.", bad))
    return [{"prompt": msg("user", q), "chosen": msg("assistant", c), "rejected": msg("assistant", r)}
            for q, c, r in out]


def main():
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    examples = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "chat_prefs.jsonl")
    with open(examples) as f:
        repo_rows = [json.loads(line) for line in f if line.strip()]
    generated = rows()
    train = [r for i, r in enumerate(generated) if i % 3 != 2]
    heldout = [r for i, r in enumerate(generated) if i % 3 == 2] + repo_rows
    for name, data in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        with open(os.path.join(out_dir, name), "w") as f:
            for r in data:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{out_dir}: {len(train)} train pairs, {len(heldout)} held-out pairs")


if __name__ == "__main__":
    main()
