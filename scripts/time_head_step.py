"""Warm timing of the sequential heads' draft calls at one row, packed decode weights against the
modules, alternating: `begin` over T fed positions, then `step`, each in a loop.

    python scripts/time_head_step.py            # the tiny policy's 8-depth heads, fp32, T=5
    python scripts/time_head_step.py bfloat16 3

Warm loops over one shape time the dispatch path, not what a decode loop pays between other
work (in a generation a head step costs ~1.1x this); compare paths, not absolute numbers.
"""
import sys
import time

import torch

from experiments.bench import _load
from experiments.config import load_config
from spec_heads.heads import MTPModule

dtype = sys.argv[1] if len(sys.argv) > 1 else "float32"
T = int(sys.argv[2]) if len(sys.argv) > 2 else 5
cfg = load_config(None, ["heads.num_depths=8", "model.device=cpu", f"model.dtype={dtype}"])


class _Args:
    heads = None


model, heads, *_ = _load(_Args, cfg)
dt = getattr(torch, dtype)
H = model.embed_tokens.weight.shape[1]
cache = heads.new_cache(1, 128)
hidden, nxt = torch.randn(1, T, H, dtype=dt), torch.randint(0, model.embed_tokens.weight.shape[0], (1, T))
pos, last, token = torch.arange(T)[None] + 10, torch.tensor([T - 1]), torch.tensor([3])
packed = MTPModule.packed
paths = {"packed": packed, "modules": lambda self, embed, dtype: None}


def loop(fn, n):
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


with torch.inference_mode():
    for rep in range(3):
        for name, fn in paths.items():
            MTPModule.packed = fn
            begin = lambda: heads.begin(hidden, nxt, pos, last, model.embed_tokens, model.logits, cache, 40)
            _, state = begin()
            step = lambda: heads.step(state, token, model.embed_tokens, model.logits)
            print(f"round {rep} {name:8s} begin (T={T}) {loop(begin, 1000):6.0f} us   step {loop(step, 2000):6.0f} us")
    MTPModule.packed = packed
