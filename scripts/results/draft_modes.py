"""Finding 2: sampled drafts with rejection sampling against greedy (argmax) drafts, across
sampling temperatures, on the default tiny policy and its heads.

For each temperature:
- accepted length: the engine generates completions of task prompts drafting the heads' full
  depth every step (spec.mode=fixed), once with sampled drafts (spec.draft=sampled) and once
  with greedy drafts (spec.draft=greedy, a one-hot draft distribution: the draft is accepted
  with probability p(argmax q), and a rejection resamples from the policy without it). Both
  are exact; they differ only in how many tokens a verify step yields.
- exactness: the joint distribution of the first three completion tokens of one prompt, from
  `--rows` independent rows, for plain sampling against each drafting mode (a chi-square test
  of the 2 x C contingency table, categories with fewer than 10 draws pooled). The first token
  comes from the prefill; the next two from the first speculative step's accept/reject. The
  prompt is, among the first 16, the one whose first three tokens vary most under plain
  sampling at that temperature (a pilot of 256 rows each): at low temperatures most prompts'
  first tokens take one value, and a test on one value cannot fail.

    python scripts/results/draft_modes.py                # writes docs/results/draft_modes.png
    python scripts/results/draft_modes.py --temperatures 0.3 1.0 --prompts 64 --rows 2000

The heads are the default config's (or --heads), fitted at temperature 1.0 and used unchanged at every
temperature (the engine applies the temperature to the heads' logits as to the policy's).
"""
from __future__ import annotations

import argparse
import collections
import json

from _common import OUT_DIR, load_default, new_figure, sampling, save_figure, task_prompts

MODES = ("sampled", "greedy")


def accepted_length(engine, prompts, sp, K: int, draft: str, seed: int) -> dict:
    from rollout.types import SpecParams

    batch = engine.generate(prompts, sp, SpecParams(mode="fixed", k=K, draft=draft), seed=seed)
    st = batch.stats
    return {"accepted_len": st.mean_accepted_len, "accept_rate_per_pos": st.accept_rate_per_pos,
            "tokens": st.tokens}


def first_tokens(engine, prompt, sp, spec, rows: int, seed: int) -> collections.Counter:
    """Counts of the first three completion tokens of `rows` independent samples of `prompt`."""
    batch = engine.generate([prompt] * rows, sp, spec, seed=seed, ids=list(range(rows)))
    return collections.Counter(tuple(s.tokens[:3]) for s in batch.sequences)


def test_prompt(engine, prompts, sp, pilot: int, seed: int) -> tuple[int, float]:
    """(index, entropy in nats) of the prompt whose first three tokens vary most under plain sampling."""
    import math

    from rollout.types import SpecParams

    best = (0, -1.0)
    for i, prompt in enumerate(prompts):
        counts = first_tokens(engine, prompt, sp, SpecParams(mode="off"), pilot, seed=seed + i)
        ent = -sum(c / pilot * math.log(c / pilot) for c in counts.values())
        best = max(best, (i, ent), key=lambda b: b[1])
    return best


def chi_square(a: collections.Counter, b: collections.Counter, min_count: int = 10) -> tuple[float, int, float]:
    """(statistic, categories, p-value) of a chi-square test that two samples come from one distribution."""
    from scipy.stats import chi2_contingency

    keys = [k for k in set(a) | set(b) if a[k] + b[k] >= min_count]
    rest = [sum(a.values()) - sum(a[k] for k in keys), sum(b.values()) - sum(b[k] for k in keys)]
    table = [[a[k] for k in keys], [b[k] for k in keys]]
    if sum(rest) >= min_count:
        table[0].append(rest[0])
        table[1].append(rest[1])
    if len(table[0]) < 2:
        return 0.0, 1, 1.0  # one category: the samples cannot differ
    res = chi2_contingency(table)
    return float(res[0]), len(table[0]), float(res[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.3, 0.5, 0.7, 1.0])
    ap.add_argument("--prompts", type=int, default=256, help="task prompts for the accepted length")
    ap.add_argument("--rows", type=int, default=8000, help="samples per mode for the exactness test")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--heads", default="", help="a heads folder (default: the default config's heads)")
    ap.add_argument("--out", default=str(OUT_DIR / "draft_modes.png"))
    args = ap.parse_args()

    from rollout.engine import Engine
    from rollout.types import SpecParams

    cfg, model, heads, tok = load_default(args.heads)
    K = heads.num_depths
    prompts = task_prompts(cfg, tok, args.prompts, seed=args.seed)
    engine = Engine(model, heads, max_batch=128)
    rows = []
    for t in args.temperatures:
        sp = sampling(cfg, tok, temperature=t)
        row = {"temperature": t}
        for draft in MODES:
            row[draft] = accepted_length(engine, prompts, sp, K, draft, seed=args.seed)
        sp3 = sampling(cfg, tok, temperature=t, max_new_tokens=3, stop_token_ids=[])
        pi, ent = test_prompt(engine, prompts[:16], sp3, 256, seed=1000 * args.seed)
        row["test_prompt"], row["test_prompt_entropy"] = pi, ent
        off = first_tokens(engine, prompts[pi], sp3, SpecParams(mode="off"), args.rows, seed=10 * args.seed)
        for j, draft in enumerate(MODES):
            spec = SpecParams(mode="fixed", k=K, draft=draft)
            counts = first_tokens(engine, prompts[pi], sp3, spec, args.rows, seed=10 * args.seed + 1 + j)
            stat, cats, pv = chi_square(off, counts)
            row[draft].update(first3_chi2=stat, first3_categories=cats, first3_p_value=pv)
        rows.append(row)
        print(f"T={t}: accepted length sampled {row['sampled']['accepted_len']:.2f} "
              f"greedy {row['greedy']['accepted_len']:.2f}; chi-square p against plain sampling: "
              f"sampled {row['sampled']['first3_p_value']:.3f} greedy {row['greedy']['first3_p_value']:.3f}",
              flush=True)

    print(f"\n| temperature | accepted length, sampled drafts | accepted length, greedy drafts | ratio | "
          f"test prompt: categories (entropy) | chi2, p vs plain: sampled | greedy |\n|---|---|---|---|---|---|---|")
    for r in rows:
        s, g = r["sampled"], r["greedy"]
        print(f"| {r['temperature']} | {s['accepted_len']:.2f} | {g['accepted_len']:.2f} | "
              f"{s['accepted_len'] / g['accepted_len']:.2f}x | {s['first3_categories']} ({r['test_prompt_entropy']:.2f}) | "
              f"{s['first3_chi2']:.1f}, {s['first3_p_value']:.2f} | {g['first3_chi2']:.1f}, {g['first3_p_value']:.2f} |")
    out = OUT_DIR / "draft_modes.json"
    out.write_text(json.dumps({"depths": K, "prompts": args.prompts, "rows": args.rows, "results": rows}, indent=1))

    fig = new_figure(9.0, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    ts = [r["temperature"] for r in rows]
    for draft, marker in zip(MODES, "os"):
        ax1.plot(ts, [r[draft]["accepted_len"] for r in rows], marker=marker, label=f"{draft} drafts")
    ax1.set_xlabel("sampling temperature")
    ax1.set_ylabel(f"tokens per verify step (fixed {K})")
    ax1.set_title("accepted length")
    ax1.legend()
    for draft, color in zip(MODES, ("C0", "C1")):
        rates = rows[-1][draft]["accept_rate_per_pos"]
        ax2.plot(range(1, len(rates) + 1), rates, marker="o", color=color, label=f"{draft}, T={ts[-1]}")
        rates = rows[0][draft]["accept_rate_per_pos"]
        ax2.plot(range(1, len(rates) + 1), rates, marker="o", ls="--", color=color, label=f"{draft}, T={ts[0]}")
    ax2.set_xlabel("draft depth")
    ax2.set_ylabel("conditional acceptance")
    ax2.set_ylim(0, 1.02)
    ax2.set_title("acceptance per depth")
    ax2.legend(fontsize=8)
    from pathlib import Path

    save_figure(fig, Path(args.out).name, Path(args.out).parent)


if __name__ == "__main__":
    main()
