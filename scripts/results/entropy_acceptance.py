"""Finding 1: draft acceptance against the policy's entropy during RL, from training runs' metrics.

For every step of each run (runs/NAME/metrics.jsonl, written by `specroll train`): x = the mean
entropy of the policy's sampling distribution over the step's rollout tokens (`entropy_mean`),
y = the heads' acceptance rate, the alpha that gives the step's `accepted_len_full_depth`
((1 - alpha^(K+1)) / (1 - alpha) at the heads' K depths), and the depth-1 acceptance. Steps
right after a re-fit are marked; a least-squares line is fitted to each run's steps.

    python scripts/results/entropy_acceptance.py runs/refit-never [runs/other ...]
        # writes docs/results/entropy_acceptance.png and prints slope, intercept and r per run

`--tokens N` instead measures it token by token, without training: the policy samples N task
completions, and at every completion position the depth-1 draft's acceptance sum_v min(p, q) is
set against the entropy of the policy's distribution p there (`--heads`: the heads to draft
with; default the default config's). Writes docs/results/entropy_acceptance_tokens.png.

    python scripts/results/entropy_acceptance.py --tokens 128 --heads HEADS
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import OUT_DIR, new_figure, save_figure


def alpha_from_length(length: float, K: int) -> float:
    """The i.i.d. acceptance rate alpha with 1 + alpha + ... + alpha^K = length (bisection)."""
    if length <= 1.0:
        return 0.0
    if length >= K + 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(mid ** i for i in range(K + 1)) < length:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def read(run_dir: str) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """(slope, intercept, Pearson r) of the least-squares line y = slope x + intercept."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx if sxx else 0.0
    r = sxy / (sxx * syy) ** 0.5 if sxx and syy else 0.0
    return slope, my - slope * mx, r


def slope_at_fixed_step(entropy: list[float], alpha: list[float], step: list[int]) -> float:
    """d alpha / d entropy from the least-squares plane alpha = a + b entropy + c step: the
    entropy effect with the heads' staleness (which grows with the step) held apart."""
    import numpy as np

    X = np.column_stack([np.ones(len(step)), entropy, step])
    return float(np.linalg.lstsq(X, np.asarray(alpha), rcond=None)[0][1])


def points(records: list[dict]) -> dict:
    steps = [r for r in records if r.get("spec_mode") != "off" and r.get("accepted_len_full_depth", 0) > 0
             and r.get("accept_rate_per_pos")]
    K = len(steps[0]["accept_rate_per_pos"])
    return {"step": [r["step"] for r in steps], "entropy": [r["entropy_mean"] for r in steps],
            "alpha": [alpha_from_length(r["accepted_len_full_depth"], K) for r in steps],
            "depth1": [r["accept_rate_per_pos"][0] for r in steps], "K": K}


def token_points(heads_dir: str, n: int, seed: int = 3) -> tuple[list[float], list[float]]:
    """(policy entropy, depth-1 acceptance) at every completion position of n fresh samples."""
    import torch

    from _common import load_default, sampling, task_prompts
    from learner.refit import _Data, _frozen_fns, _target_probs, collect_sequences
    from rollout.engine import Engine
    from spec_heads.sampling import sampling_probs

    cfg, model, heads, tok = load_default(heads_dir)
    sp = sampling(cfg, tok)
    seqs, plens = collect_sequences(Engine(model, None, max_batch=64), task_prompts(cfg, tok, n, seed), sp, n,
                                    seed=seed)
    data = _Data(model, seqs, plens, 16)
    embed, lm_head = _frozen_fns(model)
    ents, accs = [], []
    with torch.no_grad():
        for i in range(0, len(data), 16):
            hidden, tokens, mask = data.batch(torch.arange(i, min(i + 16, len(data))), 1)
            T = hidden.shape[1]
            target = _target_probs(hidden, lm_head, 1, 0, T, sp.temperature)[:, 0]  # [B, T, V]
            draft = sampling_probs(lm_head(heads.train_features(hidden, tokens, embed, depths=1)[:, 0]),
                                   sp.temperature)  # [B, T, V]
            alpha = torch.minimum(target, draft).sum(-1)
            ent = -(target * target.clamp_min(1e-30).log()).sum(-1)
            keep = mask[:, 0]
            ents += ent[keep].tolist()
            accs += alpha[keep].tolist()
    return ents, accs


def tokens_main(args) -> None:
    ents, accs = token_points(args.heads, args.tokens)
    slope, icpt, r = fit_line(ents, accs)
    edges = [0.0, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5, 3.0]
    print(f"{len(ents)} positions; linear fit: acceptance = {icpt:.3f} {slope:+.3f} x entropy (nats), r = {r:.2f}")
    print("| policy entropy (nats) | positions | mean depth-1 acceptance |\n|---|---|---|")
    centers, means = [], []
    for lo, hi in zip(edges, edges[1:]):
        sel = [a for e, a in zip(ents, accs) if lo <= e < hi]
        if sel:
            print(f"| {lo:.2f}-{hi:.2f} | {len(sel)} | {sum(sel) / len(sel):.3f} |")
            centers.append(sum(e for e in ents if lo <= e < hi) / len(sel))
            means.append(sum(sel) / len(sel))
    fig = new_figure(6.0, 3.8)
    ax = fig.subplots()
    ax.scatter(ents, accs, s=3, alpha=0.25, color="C0", label="one completion position")
    ax.plot(centers, means, marker="o", color="C1", label="mean per entropy bin")
    lo, hi = min(ents), max(ents)
    ax.plot([lo, hi], [icpt + slope * lo, icpt + slope * hi], color="C2", ls="--",
            label=f"linear fit: slope {slope:.2f}, r {r:.2f}")
    ax.set_xlabel("policy entropy at the drafted position (nats)")
    ax.set_ylabel("depth-1 acceptance sum min(p, q)")
    ax.legend(fontsize=8)
    save_figure(fig, "entropy_acceptance_tokens.png", Path(args.out).parent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*")
    ap.add_argument("--tokens", type=int, default=0, help="measure per token on this many fresh samples instead")
    ap.add_argument("--heads", default="", help="with --tokens: the heads folder (default: the default config's)")
    ap.add_argument("--out", default=str(OUT_DIR / "entropy_acceptance.png"))
    args = ap.parse_args()
    if args.tokens:
        return tokens_main(args)
    fig = new_figure(9.0, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    print("| run | steps | entropy range (nats) | alpha range | slope d alpha / d entropy | r "
          "| slope, step held fixed | depth-1 slope | depth-1 r |\n|---|---|---|---|---|---|---|---|---|")
    table = {}
    ax2b = ax2.twinx()  # acceptance on the right axis, entropy on the left
    for i, run in enumerate(args.runs):
        p = points(read(run))
        slope, icpt, r = fit_line(p["entropy"], p["alpha"])
        slope1, icpt1, r1 = fit_line(p["entropy"], p["depth1"])
        fixed = slope_at_fixed_step(p["entropy"], p["alpha"], p["step"])
        name = Path(run).name
        table[name] = {"steps": len(p["step"]), "slope": slope, "intercept": icpt, "r": r, "slope_step_fixed": fixed,
                       "depth1_slope": slope1, "depth1_r": r1, "points": p}
        print(f"| {name} | {len(p['step'])} | {min(p['entropy']):.3f}-{max(p['entropy']):.3f} | "
              f"{min(p['alpha']):.3f}-{max(p['alpha']):.3f} | {slope:.3f} | {r:.2f} | {fixed:.3f} | {slope1:.3f} | {r1:.2f} |")
        color = f"C{i}"
        ax1.scatter(p["entropy"], p["alpha"], s=12, color=color, label=f"{name}: slope {slope:.2f}, r {r:.2f}")
        lo, hi = min(p["entropy"]), max(p["entropy"])
        ax1.plot([lo, hi], [icpt + slope * lo, icpt + slope * hi], color=color)
        ax2.plot(p["step"], p["entropy"], color=color, label=f"{name}: entropy")
        ax2b.plot(p["step"], p["alpha"], color=color, ls="--", label=f"{name}: alpha")
    ax1.set_xlabel("policy entropy, mean over the step's tokens (nats)")
    ax1.set_ylabel("acceptance rate alpha")
    ax1.set_title("per RL step")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("RL step")
    ax2.set_ylabel("policy entropy (solid)")
    ax2b.set_ylabel("alpha (dashed)")
    ax2.set_title("over the run")
    Path(args.out).with_suffix(".json").write_text(json.dumps(table, indent=1))
    save_figure(fig, Path(args.out).name, Path(args.out).parent)


if __name__ == "__main__":
    main()
