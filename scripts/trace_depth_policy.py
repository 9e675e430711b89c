"""What the entropy depth policy believes against what steps really cost, at one batch size.

Runs the engine without speculation and in entropy mode in turn (two rounds), and prints: the
off run's plain step time at >= 7/8 of the batch in flight; the entropy run's drafting steps at
those rows (tokens emitted per row per second, and that rate against the off run's plain steps:
the true advantage of drafting); the plain steps timed inside the entropy run; and the policy's
own paired advantage, plain timing, drafting rate and yield for that rows bucket.

    python scripts/trace_depth_policy.py smollm2-gsm8k HEADS_DIR 32 64   # preset, heads, batch, prompts
    python scripts/trace_depth_policy.py default "" 128 1024             # tiny policy, its 8-depth heads
"""
import time, sys, statistics, torch
from dataclasses import replace
from experiments.config import load_config
from experiments.bench import _load
from experiments.tasks import make_task
import rollout.engine as E
import spec_heads.depth as D
from rollout.types import SpecParams
preset, heads_dir, B, P = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = load_config(preset, [] if preset != "default" else ["heads.num_depths=8"])
class A: heads = heads_dir or None
model, heads, tok, *_ = _load(A, cfg)
task = make_task(cfg.task, chat=tok.apply_chat)
prompts = [tok.encode(ex.prompt) for ex in task.train_prompts(P, 0)]
sp = replace(cfg.sampling, stop_token_ids=[tok.eos_id], max_new_tokens=64)
recs = []
orig = D.DepthPolicy.record_step
def rs(self, rows, tpr, seconds, **kw):  # record_step's keywords: planned, emitted, proposed, blind
    recs.append((rows, tpr, seconds, kw.get("emitted"))); return orig(self, rows, tpr, seconds, **kw)
D.DepthPolicy.record_step = rs
plain_off = []
opl = E._Run._plain_step
def pl(self):
    t = time.perf_counter(); r = opl(self)
    if not self.K: plain_off.append((self.n, time.perf_counter() - t))
    return r
E._Run._plain_step = pl
eng = E.Engine(model, heads, max_batch=B)
K = heads.config.num_depths
for rnd in range(2):
    for mode in ("off", "entropy"):
        recs.clear(); plain_off.clear()
        b = eng.generate(prompts, sp, SpecParams(mode=mode, k=1, max_k=K), seed=rnd)
        s = b.stats
        print(f"{mode} time {s.time_s:.2f} prefill {s.prefill_time_s:.2f} draft {s.draft_time_s:.2f} verify {s.verify_time_s:.2f} steps {s.steps} tokens {s.tokens}")
        if mode == "off":
            full = [t for n, t in plain_off if n >= B * 7 // 8]
            off_plain = statistics.median(full); print(f"  off plain step at >= 7/8 rows: median {1e3*off_plain:.1f} ms over {len(full)}")
        else:
            pol = eng.depth_policy
            key = pol.cost.bucket(B)
            dr = [(e / t) for r, w, t, e in recs if w > 1 and e is not None and r >= B * 7 // 8]
            pr = [t for r, w, t, e in recs if w == 1 and r >= B * 7 // 8]
            print(f"  drafting steps at >= 7/8 rows: {len(dr)}, emitted tokens/row/s median {statistics.median(dr) if dr else float('nan'):.2f}; true advantage vs off plain {statistics.median(dr) * off_plain if dr else float('nan'):.3f}")
            print(f"  plain steps in the entropy run at >= 7/8 rows: {[round(1e3*t,1) for t in pr][:10]} ms")
            with torch.inference_mode():  # the policy's counters are inference tensors
                budget = pol.draft_budget(B)
            print(f"  policy: advantage {pol._advantage.get(key)}, plain_recent {pol._plain_recent.get(key)}, draft_rate {pol._draft_rate.get(key)}, yield {pol._yield.get(key)}, budget {budget}")
