"""What a ragged verify costs: one policy forward (and its LM head) over T tokens in all, where
row b feeds 1 + d_b of them, against a uniform step of the same T and against the padded step
(every row as wide as the widest) that a per-row depth cost before ragged verification.

    python -m experiments.ragged_cost [--rows 8 32 128] [--rounds 15] [--json out.json] [key=value ...]

Rounds interleave the three forwards; each ratio is the median over rounds of that round's
ratio (paired: a slow spell of a shared machine hits both sides alike), with its range. CPU
timings are only ratios. This is a script that prints a table, never a test.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from experiments.bench import machine_name
from experiments.config import load_config
from experiments.fit_heads import policy_dir
from rollout.checkpoint import load_checkpoint


def _ragged_counts(rows: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """1 + d_b tokens per row, d_b in 0..width-1 spread out, summing to rows * (1 + width) // 2
    (the uniform step's T when width is odd; the widest row is `width`)."""
    counts = torch.randint(1, width + 1, (rows,), generator=gen)
    counts[0] = width  # the padded step is as wide as this
    target = rows * (1 + width) // 2
    while int(counts.sum()) != target:  # nudge random rows toward the target total
        b = int(torch.randint(1, rows, (1,), generator=gen)) if rows > 1 else 0
        step = 1 if int(counts.sum()) < target else -1
        if 1 <= int(counts[b]) + step <= width:
            counts[b] += step
    return counts


@torch.inference_mode()
def _time(model, cache, rows: int, width: int, n_tokens, ctx: int, reps: int) -> float:
    """The fastest of `reps` forwards (other load only ever adds time)."""
    ids = torch.randint(0, model.config.vocab_size, (rows, width))
    pos = ctx + torch.arange(width).expand(rows, width)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        h = model(ids, pos, cache, ctx + width + 1, n_tokens=n_tokens)
        if n_tokens is None:
            model.logits(h.reshape(rows * width, -1))
        else:
            model.logits(h[torch.arange(width)[None] < n_tokens[:, None]])
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", nargs="+", type=int, default=[8, 32, 128])
    p.add_argument("--width", type=int, default=7, help="widest row: 1 + deepest draft (odd: uniform T matches)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--reps", type=int, default=3, help="forwards per timing, the fastest kept")
    p.add_argument("--context", type=int, default=64, help="cache positions each row already holds")
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.name=smollm2-135m")
    args = p.parse_args(argv)
    cfg = load_config("default", args.overrides)
    model = load_checkpoint(policy_dir(cfg), device="cpu", dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    results = []
    print(f"# ragged verify cost, {cfg.model.name}, {machine_name(torch.device('cpu'))}, "
          f"{torch.get_num_threads()} threads, CPU ratios")
    print(f"{'rows':>5} {'T':>6} {'uniform W':>9} {'ragged/uniform':>22} {'padded/ragged':>22}")
    for rows in args.rows:
        cache = model.new_cache(rows, args.context + args.width + 2)
        uni_w = (1 + args.width) // 2
        with torch.inference_mode():
            model(torch.randint(0, model.config.vocab_size, (rows, args.context)),
                  torch.arange(args.context).expand(rows, args.context), cache, args.context)
        ratios_u, ratios_p = [], []
        for r in range(args.rounds + 1):
            counts = _ragged_counts(rows, args.width, gen)
            t_uni = _time(model, cache, rows, uni_w, None, args.context, args.reps)
            t_rag = _time(model, cache, rows, args.width, counts, args.context, args.reps)
            t_pad = _time(model, cache, rows, args.width, None, args.context, args.reps)
            if r:  # the first round warms up
                ratios_u.append(t_rag / t_uni)
                ratios_p.append(t_pad / t_rag)
        row = {"rows": rows, "total_tokens": rows * uni_w, "uniform_width": uni_w, "widest": args.width,
               "ragged_over_uniform": statistics.median(ratios_u), "ragged_over_uniform_range": [min(ratios_u), max(ratios_u)],
               "padded_over_ragged": statistics.median(ratios_p), "padded_over_ragged_range": [min(ratios_p), max(ratios_p)],
               "rounds": args.rounds}
        results.append(row)
        fmt = lambda m, rg: f"{m:.3f} [{rg[0]:.2f}-{rg[1]:.2f}]"
        print(f"{rows:>5} {row['total_tokens']:>6} {uni_w:>9} {fmt(row['ragged_over_uniform'], row['ragged_over_uniform_range']):>22} "
              f"{fmt(row['padded_over_ragged'], row['padded_over_ragged_range']):>22}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": cfg.model.name, "machine": machine_name(torch.device("cpu")), "rows": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
