#!/usr/bin/env python3
"""On a GPU: the engine with masked GQA through expanded KV heads (the memory-efficient SDPA
kernel) against SDPA's enable_gqa (its math path), same process, interleaved rounds. Tiny
policy with its fitted heads (off and fixed 4) from $SPECROLL_CACHE, and SmolLM2-135M-shaped
random weights (off: plain decoding speed only, random heads would accept nothing). Prints a
table of tokens/s and the ratio; bf16."""
import statistics
import time

import torch

from rollout.engine import Engine
from rollout.model import ModelConfig, Transformer
from rollout.types import SamplingParams, SpecParams
from spec_heads.layers import Attention

dev, dt = torch.device("cuda"), torch.bfloat16
print(torch.cuda.get_device_name(0), flush=True)


def rate(eng, prompts, sp, spec):
    torch.cuda.synchronize()
    out = eng.generate(prompts, sp, spec, seed=0)
    return out.stats.tokens / out.stats.time_s


def ab(label, eng, prompts, sp, spec, rounds=3):
    rates = {True: [], False: []}
    for flag in (True, False):  # warm-up both
        Attention.expand_masked_gqa_on_cuda = flag
        rate(eng, prompts, sp, spec)
    for r in range(rounds):
        for flag in ((True, False) if r % 2 == 0 else (False, True)):
            Attention.expand_masked_gqa_on_cuda = flag
            rates[flag].append(rate(eng, prompts, sp, spec))
    ratio = statistics.median(a / b for a, b in zip(rates[True], rates[False]))
    print(f"| {label} | {statistics.median(rates[True]):.1f} | {statistics.median(rates[False]):.1f} | {ratio:.2f} |",
          flush=True)


print("| model, batch, mode | tok/s expanded KV | tok/s enable_gqa | ratio |\n|---|---|---|---|")
from experiments.bench import _load
from experiments.config import load_config
from experiments.tasks import make_task
from dataclasses import replace

class A:
    heads = None

cfg = load_config("default", ["heads.num_depths=8", "model.device=cuda", "model.dtype=bfloat16"])
model, heads, tok, *_ = _load(A, cfg)
sp = replace(cfg.sampling, stop_token_ids=[tok.eos_id])
task = make_task(cfg.task, chat=tok.apply_chat)
prompts = [tok.encode(ex.prompt) for ex in task.train_prompts(256, cfg.seed)]
for b, n in ((1, 16), (32, 64), (128, 256)):
    eng = Engine(model, heads, max_batch=b)
    for name, spec in (("off", SpecParams(mode="off")), ("fixed 4", SpecParams(mode="fixed", k=4, max_k=8))):
        ab(f"tiny, {b}, {name}", eng, prompts[:n], sp, spec)
torch.manual_seed(0)
mc = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                 rope_theta=100000.0)
big = Transformer(mc).to(dev, dt).eval()
g = torch.Generator().manual_seed(1)
rp = [torch.randint(0, 49152, (int(torch.randint(60, 100, (1,), generator=g)),), generator=g).tolist()
      for _ in range(256)]
sp = SamplingParams(temperature=1.0, max_new_tokens=64)
for b, n in ((1, 2), (32, 64), (128, 256)):
    ab(f"SmolLM2-shaped random, {b}, off", Engine(big, None, max_batch=b), rp[:n], sp, SpecParams(mode="off"))
