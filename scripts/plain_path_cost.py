"""Where entropy mode's time goes where it stays (mostly) plain: the same engine and prompts as
`specroll bench`, three configurations interleaved per round with fresh seeds:

  off        speculation off
  entropy    the entropy policy as shipped
  plain      the entropy policy with every step forced plain (plan_step -> depth 0): what the
             speculative engine's plain path costs over `off`, without any exploring

and per configuration and round: decode seconds per row-step, decode steps, tokens per row-step,
prefill seconds, and the row-steps that drafted. Prints a table of per-round ratios to off
(median, mean and range) for the call time and for the decode time per row-step.

    PYTHONPATH=. python scripts/plain_path_cost.py --config smollm2-gsm8k --heads DIR \
        --dtype bfloat16 --batch 32 --prompts 64 --max-new-tokens 64 --rounds 8
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from dataclasses import replace

import torch

import rollout.engine as E
import rollout.model as M
import spec_heads.sampling as S
from experiments.bench import _load
from experiments.config import load_config
from experiments.tasks import make_task
from spec_heads.depth import DepthPolicy
from spec_heads.heads import DraftHeads


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default")
    p.add_argument("--heads", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", default="off,entropy,plain", help="comma-separated subset of off,entropy,plain")
    p.add_argument("--profile", action="store_true",
                   help="also wall time per engine function per decode step, for each configuration")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.dtype:
        cfg = replace(cfg, model=replace(cfg.model, dtype=args.dtype))
    model, heads, tok, *_, device, _ = _load(args, cfg)
    sampling = replace(cfg.sampling, temperature=1.0, max_new_tokens=args.max_new_tokens,
                       stop_token_ids=[tok.eos_id])
    task = make_task(cfg.task, chat=tok.apply_chat)
    prompts = [tok.encode(ex.prompt) for ex in task.train_prompts(args.prompts, args.seed)]
    K = heads.config.num_depths
    eng = E.Engine(model, heads, max_batch=args.batch, device=device)
    specs = {"off": replace(cfg.spec, mode="off", k=1, max_k=K),
             "entropy": replace(cfg.spec, mode="entropy", k=1, max_k=K),
             "plain": replace(cfg.spec, mode="entropy", k=1, max_k=K)}
    specs = {name: specs[name] for name in args.configs.split(",")}
    if "off" not in specs:
        p.error("--configs: must include off (every ratio is to it)")
    policies: dict[str, object] = {}
    key = ("entropy", K)

    def run(name: str, seed: int):
        # the engine keeps one policy per (mode, K): entropy and plain each get their own
        if name in policies:
            eng._policies[key] = policies[name]
        else:
            eng._policies.pop(key, None)
        out = eng.generate(prompts, sampling, specs[name], seed=seed)
        pol = eng._policies.get(key)
        if name == "plain" and not getattr(pol, "_forced", False):
            plan = pol.plan_step

            def plain_only(rows, plan=plan):
                plan(rows)  # keep the policy's own bookkeeping (and its cost)
                return 0, 0, False
            pol.plan_step, pol._forced = plain_only, True
        if name != "off":
            policies[name] = pol
        return out.stats

    current = ["off"]
    spent: dict[tuple[str, str], float] = collections.defaultdict(float)
    steps: dict[str, int] = collections.defaultdict(int)
    if args.profile:
        def timed(owner, attr):
            fn = getattr(owner, attr)

            def wrapper(*a, **kw):
                t = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    spent[current[0], f"{owner.__name__}.{attr}"] += time.perf_counter() - t
            setattr(owner, attr, wrapper)
        for attr in ("loop", "_refill", "_plain_step", "_spec_step", "_emit", "_collect", "_compact"):
            timed(E._Run, attr)
        for attr in ("forward", "logits"):
            timed(M.Transformer, attr)
        for attr in ("plan_step", "record_step"):
            timed(DepthPolicy, attr)
        for attr in ("prefill", "begin", "step"):
            timed(DraftHeads, attr)
        timed(S, "sampling_logprobs")
        E.sampling_logprobs = S.sampling_logprobs
    for name in specs:  # warm-up; the forced-plain policy exists after its first call
        run(name, args.seed)
    if "plain" in specs:
        run("plain", args.seed)
    spent.clear()  # only the timed rounds count
    rec = {name: [] for name in specs}
    names = list(specs)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            current[0] = name
            s = run(name, args.seed + 1 + r)
            steps[name] += s.steps
            decode = s.time_s - s.prefill_time_s
            rec[name].append(dict(time=s.time_s, tps=s.tokens_per_s, decode_rs=decode / max(s.row_steps, 1),
                                  steps=s.steps, row_steps=s.row_steps, tok_rs=s.mean_accepted_len,
                                  prefill=s.prefill_time_s, drafted=sum(s.depth_hist[1:]),
                                  skipped=s.heads_prefill_skipped))
            print(f"round {r} {name:8s} " + " ".join(f"{k}={v:.4g}" for k, v in rec[name][-1].items()), flush=True)

    print(f"\n{model.config.__class__.__name__} on {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.prompts} prompts, {args.rounds} rounds: per-round ratios to off")
    print(f"{'config':8s} | {'tok/s ratio: median mean (range)':34s} | {'decode s/row-step ratio: median mean':36s} "
          f"| tok/row-step | drafted row-steps/call | prefill s")
    for name in names:
        tr = [a["tps"] / b["tps"] for a, b in zip(rec[name], rec["off"])]
        dr = [a["decode_rs"] / b["decode_rs"] for a, b in zip(rec[name], rec["off"])]
        print(f"{name:8s} | {statistics.median(tr):.3f} {statistics.mean(tr):.3f} ({min(tr):.2f}-{max(tr):.2f})"
              f"{'':9s} | {statistics.median(dr):.3f} {statistics.mean(dr):.3f}{'':22s} "
              f"| {statistics.mean(a['tok_rs'] for a in rec[name]):.3f}        "
              f"| {statistics.mean(a['drafted'] for a in rec[name]):.0f}                    "
              f"| {statistics.mean(a['prefill'] for a in rec[name]):.2f}")
    if args.profile:
        print("\nms per decode step (the same work in off and plain; functions nest, so they do not add up)")
        fns = sorted({f for _, f in spent})
        print(f"{'function':28s} " + " ".join(f"{n:>9s}" for n in names))
        for f in fns:
            print(f"{f:28s} " + " ".join(f"{1e3 * spent[n, f] / max(steps[n], 1):9.3f}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
