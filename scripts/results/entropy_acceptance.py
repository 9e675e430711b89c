"""Finding 1: draft acceptance against the policy's entropy during RL, from training runs' metrics.

For every step of each run (runs/NAME/metrics.jsonl, written by `specroll train`): x = the mean
entropy of the policy's sampling distribution over the step's rollout tokens (`entropy_mean`),
y = the heads' acceptance rate, the alpha that gives the step's `accepted_len_full_depth`
((1 - alpha^(K+1)) / (1 - alpha) at the heads' K depths), and the depth-1 acceptance. Steps
right after a re-fit are marked; a least-squares line is fitted to each run's steps.

    python scripts/results/entropy_acceptance.py runs/refit-never [runs/other ...]
        # writes docs/results/entropy_acceptance.png and prints slope, intercept and r per run
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


def points(records: list[dict]) -> dict:
    steps = [r for r in records if r.get("spec_mode") != "off" and r.get("accepted_len_full_depth", 0) > 0
             and r.get("accept_rate_per_pos")]
    K = len(steps[0]["accept_rate_per_pos"])
    return {"step": [r["step"] for r in steps], "entropy": [r["entropy_mean"] for r in steps],
            "alpha": [alpha_from_length(r["accepted_len_full_depth"], K) for r in steps],
            "depth1": [r["accept_rate_per_pos"][0] for r in steps], "K": K}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default=str(OUT_DIR / "entropy_acceptance.png"))
    args = ap.parse_args()
    fig = new_figure(9.0, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    print("| run | steps | entropy range (nats) | alpha range | slope d alpha / d entropy | r "
          "| depth-1 slope | depth-1 r |\n|---|---|---|---|---|---|---|---|")
    for i, run in enumerate(args.runs):
        p = points(read(run))
        slope, icpt, r = fit_line(p["entropy"], p["alpha"])
        slope1, icpt1, r1 = fit_line(p["entropy"], p["depth1"])
        name = Path(run).name
        print(f"| {name} | {len(p['step'])} | {min(p['entropy']):.3f}-{max(p['entropy']):.3f} | "
              f"{min(p['alpha']):.3f}-{max(p['alpha']):.3f} | {slope:.3f} | {r:.2f} | {slope1:.3f} | {r1:.2f} |")
        color = f"C{i}"
        ax1.scatter(p["entropy"], p["alpha"], s=12, color=color, label=f"{name}: slope {slope:.2f}, r {r:.2f}")
        lo, hi = min(p["entropy"]), max(p["entropy"])
        ax1.plot([lo, hi], [icpt + slope * lo, icpt + slope * hi], color=color)
        ax2.plot(p["step"], p["entropy"], color=color, label=f"{name}: entropy")
        ax2b = ax2.twinx() if i == 0 else ax2b  # noqa: F821 (bound on the first run)
        ax2b.plot(p["step"], p["alpha"], color=color, ls="--", label=f"{name}: alpha")
    ax1.set_xlabel("policy entropy, mean over the step's tokens (nats)")
    ax1.set_ylabel("acceptance rate alpha")
    ax1.set_title("per RL step")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("RL step")
    ax2.set_ylabel("policy entropy (solid)")
    ax2b.set_ylabel("alpha (dashed)")
    ax2.set_title("over the run")
    save_figure(fig, Path(args.out).name, Path(args.out).parent)


if __name__ == "__main__":
    main()
