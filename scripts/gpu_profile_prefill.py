#!/usr/bin/env python3
"""On a CUDA GPU: where does the speculative engine's extra prefill time go? SmolLM2-135M-shaped random
weights (bf16), heads (sequential, 4 depths, 4096 draft vocab); times trunk prefill vs heads
prefill over (rows, prompt length), then a full generate of 256 prompts at batch 128 in off and
fixed:2 with the engine's prefill timer, and a torch.profiler table of one fixed:2 generate."""
import time

import torch

from rollout.model import ModelConfig, Transformer
from rollout.engine import Engine
from rollout.types import SamplingParams, SpecParams
from spec_heads.heads import DraftHeads, HeadConfig
torch.manual_seed(0)
mc = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0)
dev = torch.device("cuda")
model = Transformer(mc).to(dev, torch.bfloat16).eval()
heads = DraftHeads(HeadConfig("sequential", 4, 4096), mc).to(dev, torch.bfloat16)
print(torch.cuda.get_device_name(0), flush=True)
def sync(): torch.cuda.synchronize()
with torch.inference_mode():
    cache = model.new_cache(128, 512, dev, torch.bfloat16); hc = heads.new_cache(128, 512, dev, torch.bfloat16)
    for B, P in ((128, 96), (16, 96), (4, 96), (1, 96), (128, 96)):
        ids = torch.randint(0, 49152, (B, P), device=dev); pos = torch.arange(P, device=dev).expand(B, P)
        lens = torch.full((B,), P, device=dev); slots = torch.arange(B, device=dev)
        ts, th = [], []
        for rep in range(4):
            sync(); t = time.perf_counter(); h = model(ids, pos, cache, 96, slots); sync(); t1 = time.perf_counter()
            heads.prefill(h, ids, pos, lens - 1, model.embed_tokens, hc, 112, slots); sync(); t2 = time.perf_counter()
            ts.append(t1 - t); th.append(t2 - t1)
        print(f"B={B} P={P}: trunk {[round(1e3*x,2) for x in ts]} ms, heads {[round(1e3*x,2) for x in th]} ms", flush=True)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 49152, (int(torch.randint(60, 100, (1,), generator=g)),), generator=g).tolist() for _ in range(256)]
    sp = SamplingParams(temperature=1.0, max_new_tokens=128)
    eng = Engine(model, heads, max_batch=128)
    for rep in range(2):
        for name, spec in (("off", SpecParams(mode="off")), ("fixed2", SpecParams(mode="fixed", k=2))):
            sync(); t = time.perf_counter(); out = eng.generate(prompts, sp, spec, seed=rep); sync()
            st = out.stats
            print(f"{name}: wall {time.perf_counter()-t:.2f}s prefill {st.prefill_time_s:.3f}s draft {st.draft_time_s:.3f} verify {st.verify_time_s:.3f} steps {st.steps}", flush=True)
    from torch.profiler import profile, ProfilerActivity
    import rollout.engine as E
    calls = {"refill": 0}
    orig = E._Run._refill
    def counted(self):
        calls["refill"] += 1; return orig(self)
    E._Run._refill = counted
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        eng.generate(prompts, sp, SpecParams(mode="fixed", k=2), seed=5)
    print("refill calls", calls)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
