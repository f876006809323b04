"""Tiny Llama-3-style and Qwen2-style checkpoints for the GGUF export's pre-tokenizer check.

No real Llama 3 or Qwen2 tokenizer.json is available offline here (none in /work/models, the shared fixtures
or a Hugging Face cache), so each fixture's tokenizer is a 512-token byte-level BPE trained with the
`tokenizers` library on a small generated corpus, with the family's own pre-tokenizer: the `Split` regex of
Llama 3 (digits grouped by up to three) or Qwen2 (every digit alone, NFC normalizer) followed by
`ByteLevel(use_regex=False)`, as their tokenizer.json files hold them. The export maps those to llama.cpp's
`tokenizer.ggml.pre` names `llama-bpe` and `qwen2`; llama.cpp then splits with its own copy of the regex,
so a wrong name shows up as different tokens (the corpus has digit merges such as `12`, `123`).

Weights are random (transformers' LlamaForCausalLM / Qwen2ForCausalLM, initializer_range 0.2 so greedy
decoding has no near-ties). Run with the reference venv:

    /work/venv/bin/python tools/make_gguf_tokenizer_fixtures.py tests/fixtures/gguf
"""

import random
import sys
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def corpus():
    rng = random.Random(0)
    words = (
        "hello world the capital of france is paris tokens model kite grandmother story tell me about a "
        "numbers year count it's we're they'll I'm you've"
    ).split()
    lines = []
    for _ in range(3000):
        ws = [rng.choice(words) for _ in range(rng.randint(3, 9))]
        ws.insert(rng.randint(0, len(ws)), str(rng.choice([12, 123, 1234, 12345, 2024, 45, 7, 99, 345])))
        lines.append(" ".join(ws).capitalize() + rng.choice([".", "!", ",", "?"]))
    return lines


def tokenizer(pattern, specials, nfc):
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


def build(out, family):
    out.mkdir(parents=True, exist_ok=True)
    if family == "llama3":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
        tok = tokenizer(LLAMA3, specials, nfc=False)
        bos, eos = tok.token_to_id(specials[0]), tok.token_to_id(specials[1])
        cfg = LlamaConfig(
            vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rope_theta=500000.0, initializer_range=0.2,
            bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=False,
        )
        cls = LlamaForCausalLM
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok = tokenizer(QWEN2, specials, nfc=True)
        bos, eos = None, tok.token_to_id(specials[0])
        cfg = Qwen2Config(
            vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rope_theta=1000000.0, initializer_range=0.2,
            eos_token_id=eos, tie_word_embeddings=False,
        )
        cls = Qwen2ForCausalLM
    torch.manual_seed(0)
    model = cls(cfg)
    # Qwen2's q/k/v biases start at zero; random ones check that they reach the GGUF file.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=specials[0] if bos is not None else None,
        eos_token=specials[0] if family == "qwen2" else specials[1],
    )
    fast.save_pretrained(out)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/gguf")
    build(root / "llama3-bpe", "llama3")
    build(root / "qwen2-bpe", "qwen2")
    print("written", root)
