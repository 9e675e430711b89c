"""Where a speculative decode step's time goes on this machine: wall time per engine function,
per decode step, for the tiny policy (8-depth heads) at batch 1, over 3 generations of P prompts
after a warm-up; with a 4th argument, also torch.profiler's op table for 8 prompts.

    python scripts/profile_spec_step.py fixed 6 16        # mode, k, prompts
    python scripts/profile_spec_step.py off 1 16
    python scripts/profile_spec_step.py fixed 6 16 ops   # + the op table

Wrapped functions nest (heads.step is inside draft, draft inside spec_step), so their times do
not add up. Timings are this machine's of the moment: compare two trees in alternating runs.
"""
import collections
import sys
import time
from dataclasses import replace

import rollout.engine as E
import rollout.model as M
import spec_heads.heads as H
from experiments.bench import _load
from experiments.config import load_config
from experiments.tasks import make_task
from rollout.types import SpecParams

mode, k = sys.argv[1], int(sys.argv[2])
P = int(sys.argv[3]) if len(sys.argv) > 3 else 16
cfg = load_config(None, ["heads.num_depths=8", "model.device=cpu", "model.dtype=float32"])


class _Args:
    heads = None


model, heads, tok, *_ = _load(_Args, cfg)
task = make_task(cfg.task, chat=tok.apply_chat)
prompts = [tok.encode(ex.prompt) for ex in task.train_prompts(P, 0)]
sp = replace(cfg.sampling, stop_token_ids=[tok.eos_id])
eng = E.Engine(model, heads, max_batch=1, device="cpu")
spec = SpecParams(mode=mode, k=k, max_k=8)
eng.generate(prompts[:4], sp, spec, seed=0)  # warm-up: calibrations, first calls
seconds, calls = collections.defaultdict(float), collections.Counter()


def wrap(owner, name, label):
    fn = getattr(owner, name)

    def timed(*a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        seconds[label] += time.perf_counter() - t0
        calls[label] += 1
        return out

    setattr(owner, name, timed)


for owner, name, label in [(M.Transformer, "forward", "model.forward"), (E, "row_uniforms", "uniforms"),
                           (E, "sample_with_uniforms", "sample_with_uniforms"), (E._Run, "_emit", "emit"),
                           (H.DraftHeads, "begin", "heads.begin"), (H.DraftHeads, "step", "heads.step"),
                           (E._Run, "_draft", "draft"), (E, "rejection_sample", "rejection"),
                           (E._Run, "_plain_step", "plain_step"), (E._Run, "_spec_step", "spec_step")]:
    wrap(owner, name, label)
t0 = time.perf_counter()
stats = [eng.generate(prompts, sp, spec, seed=s + 1).stats for s in range(3)]
total = time.perf_counter() - t0
tokens, steps = sum(s.tokens for s in stats), sum(s.steps for s in stats)
print(f"{mode} k={k}: {total:.3f} s, {tokens} tokens, {steps} decode steps: {tokens / total:.1f} tok/s, "
      f"{total / steps * 1e3:.3f} ms and {tokens / steps:.2f} tokens per step (prefill included)")
for label in seconds:
    print(f"  {label:22s} {seconds[label] / steps * 1e3:7.3f} ms/step  {calls[label] / steps:5.2f} calls/step  "
          f"{seconds[label] / calls[label] * 1e6:7.0f} us/call")
if len(sys.argv) > 4:
    from torch.profiler import profile

    with profile() as prof:
        eng.generate(prompts[:8], sp, spec, seed=9)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
