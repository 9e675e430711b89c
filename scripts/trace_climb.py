"""Per-step trace of the entropy depth policy's climb at one batch size, against off and a fixed
depth, in alternating calls: each call's decode time, and for entropy calls every step's width,
time, the depth the climb stands on, its neighbours' paired samples and the budget.

    python scripts/trace_climb.py cuda 32 64 6 8    # device, batch, prompts, calls per mode, fixed k
"""
import json, os, sys, time
from dataclasses import replace
import torch
from experiments.config import load_config
from experiments.bench import _load
from experiments.tasks import make_task
import rollout.engine as E
import spec_heads.depth as D
from rollout.types import SpecParams
dev, B, P, calls, fk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cfg = load_config(None, ["heads.num_depths=8", f"model.device={dev}", "model.dtype=" + ("bfloat16" if dev == "cuda" else "float32")])
class A: heads = None
model, heads, tok, *_ = _load(A, cfg)
task = make_task(cfg.task, chat=tok.apply_chat)
prompts = [tok.encode(ex.prompt) for ex in task.train_prompts(P, 0)]
sp = replace(cfg.sampling, stop_token_ids=[tok.eos_id])
recs = []
orig = D.DepthPolicy.record_step
def rs(self, rows, tpr, seconds, **kw):
    orig(self, rows, tpr, seconds, **kw)
    key = self.cost.bucket(rows)
    recs.append(dict(rows=rows, w=tpr, ms=round(seconds * 1e3, 2), planned=kw.get("planned"),
                     em=round(kw.get("emitted") or 0, 2), climbed=self._climbed.get(key),
                     rel={d: (round(e, 3), n) for d, (e, n) in self._depth_rel.get(key, {}).items()},
                     adv=None if self._advantage.get(key) is None else round(self._advantage[key], 3),
                     budget=self._budgets.get(key)))
D.DepthPolicy.record_step = rs
eng = E.Engine(model, heads, max_batch=B, device=dev)
K = heads.config.num_depths
modes = [("off", 1), ("fixed", fk), ("entropy", 1)]
out = os.environ.get("OUT", "/tmp")
times = {m: [] for m, _ in modes}
for c in range(calls + 1):
    for mode, k in modes:
        recs.clear()
        b = eng.generate(prompts, sp, SpecParams(mode=mode, k=k, max_k=K), seed=c)
        s = b.stats
        if c:
            times[mode].append(s.time_s)
        hist = s.depth_hist
        print(f"call {c} {mode:7s} time {s.time_s:.3f} steps {s.steps} tokens {s.tokens} depth_hist {hist}", flush=True)
        if mode == "entropy":
            json.dump(recs, open(f"{out}/climb_b{B}_c{c}.json", "w"))
            full = [r for r in recs if r["rows"] >= B * 3 // 4]
            print("   at >= 3/4 rows:", [(r["w"], r["ms"], r["climbed"]) for r in full][:40])
            print("   last:", recs[-1] if recs else None)
import statistics
for mode, _ in modes:
    print(mode, "median time", round(statistics.median(times[mode]), 3), "x off", round(statistics.median(times["off"]) / statistics.median(times[mode]), 3))
