#!/usr/bin/env python3
"""Dumps bitsandbytes' own NF4 quantisation of two fixed matrices, for crates/engine/tests/quant_bnb.rs.

Run with the reference venv (bitsandbytes on CPU):
    /work/venv/bin/python tools/nf4_fixture.py crates/engine/tests/fixtures/quant

The matrices come from a formula the Rust test repeats exactly (SplitMix64 draws mapped to f32 with exact
operations only), so only bitsandbytes' outputs are stored. Every file is raw little-endian:
  nf4_code.f32          the 16 NF4 values bitsandbytes dequantises with
  dynamic_map.f32       the 256-value signed dynamic map of its double quantisation (as stored in state2.code)
  <name>.packed.u8      quantize_4bit(W, blocksize=64, quant_type="nf4") packed bytes
  <name>.absmax.f32     its per-64-block absmax
  <name>.dq.f32         dequantize_4bit of it (small matrix only)
  big.nested.q.u8       quantize_4bit(.., compress_statistics=True): the 8-bit absmax codes
  big.nested.scale.f32  state2.absmax (one per 256 absmax values)
  big.nested.offset.f32 the offset (mean absmax)
  big.nested.absmax.f32 the absmax bitsandbytes' dequantize_4bit reconstructs (dequantize_blockwise + offset)
"""
import sys
from pathlib import Path

import numpy as np
import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F

MASK = (1 << 64) - 1


def splitmix_uniform(seed, n):
    """n values uniform in [-1, 1): ((z >> 40) / 2^24) * 2 - 1, every step exact in f32."""
    state = (seed ^ 0x9E3779B97F4A7C15) & MASK
    out = np.empty(n, dtype=np.float32)
    for i in range(n):
        state = (state + 0x9E3779B97F4A7C15) & MASK
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        z ^= z >> 31
        out[i] = np.float32(z >> 40) / np.float32(1 << 24) * np.float32(2) - np.float32(1)
    return out


def test_matrix(seed, rows, cols, code):
    """Rows scaled by powers of two; every 17th row (from 3) zero; every 17th (from 5) the code's midpoints
    with a leading 1.0, so the block's absmax is 1 and each midpoint is an exact tie."""
    w = splitmix_uniform(seed, rows * cols).reshape(rows, cols)
    mids = ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)
    for r in range(rows):
        w[r] *= np.float32(2.0 ** ((r % 5) - 2))
        if r % 17 == 3:
            w[r] = 0
        if r % 17 == 5:
            w[r] = mids[np.arange(cols) % len(mids)]
            w[r, 0] = 1
    return w


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    code = F.get_4bit_type("nf4", device="cpu").float().numpy()
    code.astype("<f4").tofile(out / "nf4_code.f32")
    for name, seed, rows, cols in [("big", 11, 136, 128), ("small", 12, 3, 37)]:
        w = torch.from_numpy(test_matrix(seed, rows, cols, code))
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
        packed.numpy().astype(np.uint8).tofile(out / f"{name}.packed.u8")
        state.absmax.numpy().astype("<f4").tofile(out / f"{name}.absmax.f32")
        if name == "small":
            F.dequantize_4bit(packed, state).numpy().astype("<f4").tofile(out / f"{name}.dq.f32")
        if name == "big":
            packed2, s2 = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            assert torch.equal(packed, packed2)
            s2.absmax.numpy().astype(np.uint8).tofile(out / "big.nested.q.u8")
            s2.state2.absmax.numpy().astype("<f4").tofile(out / "big.nested.scale.f32")
            np.array([s2.offset.item()], dtype="<f4").tofile(out / "big.nested.offset.f32")
            s2.state2.code.numpy().astype("<f4").tofile(out / "dynamic_map.f32")
            absmax = F.dequantize_blockwise(s2.absmax, s2.state2) + s2.offset
            absmax.numpy().astype("<f4").tofile(out / "big.nested.absmax.f32")
    (out / "VERSIONS").write_text(f"bitsandbytes {bnb.__version__}\ntorch {torch.__version__}\n")


if __name__ == "__main__":
    main()
