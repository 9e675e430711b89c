"""Finding 4: head re-fit schedules over an RL run, from training runs' metrics.

Each run is a `specroll train` run with one `refit.*` setting (same seed, policy, heads and
steps). Per run: the accepted length the heads give at full depth per step
(`accepted_len_full_depth`, what `refit.schedule=on_drop` watches), the re-fits (kept or not),
their time, and the rollout time. The figure overlays the runs' curves, re-fits marked.

    python scripts/results/refit_schedules.py runs/refit-never runs/refit-every10 runs/refit-on_drop
        # writes docs/results/refit_schedules.png and prints the table

`--replay RUN` also prints when each `on_drop` trigger in TRIGGERS would first have fired on
RUN's trace (a run that never re-fitted, so its trace is what any trigger sees until it fires).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _common import OUT_DIR, new_figure, save_figure

# (label, drop_fraction, window): fire when the mean of the last `window` steps falls below
# drop_fraction x the mean of the first `window` steps after the last fit
TRIGGERS = [("one step < 0.85 x first step", 0.85, 1), ("one step < 0.95 x first step", 0.95, 1),
            ("mean of 5 < 0.95 x first 5", 0.95, 5), ("mean of 5 < 0.97 x first 5", 0.97, 5),
            ("mean of 3 < 0.95 x first 3", 0.95, 3)]


def read(run_dir: str) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def first_fire(lengths: list[float], fraction: float, window: int) -> int | None:
    """1-based index of the first step at which the trigger fires on `lengths`, or None."""
    for i in range(2 * window - 1, len(lengths)):
        base = statistics.fmean(lengths[:window])
        if statistics.fmean(lengths[i - window + 1:i + 1]) < fraction * base:
            return i + 1
    return None


def summary(records: list[dict]) -> dict:
    lengths = [r.get("accepted_len_full_depth", 0.0) for r in records]
    refits = [r for r in records if r.get("refit") is True]
    return {
        "steps": len(records),
        "first10": statistics.fmean(lengths[:10]), "last10": statistics.fmean(lengths[-10:]),
        "mean": statistics.fmean(lengths),
        "refits": len(refits), "kept": sum(1 for r in refits if r.get("refit_kept", True)),
        "refit_s": sum(r.get("time_refit_s", 0.0) for r in records),
        "rollout_s": sum(r.get("time_rollout_s", 0.0) for r in records),
        "step_s": sum(r.get("time_step_s", 0.0) for r in records),
        "reward_last10": statistics.fmean(r["reward_mean"] for r in records[-10:]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--replay", help="a run without re-fits to replay the on_drop triggers on")
    ap.add_argument("--out", default=str(OUT_DIR / "refit_schedules.png"))
    args = ap.parse_args()
    if args.replay:
        lengths = [r.get("accepted_len_full_depth", 0.0) for r in read(args.replay)]
        print("| trigger | first fires at step |\n|---|---|")
        for label, fraction, window in TRIGGERS:
            print(f"| {label} | {first_fire(lengths, fraction, window) or 'never'} |")
        print()
    fig = new_figure(9.0, 3.8)
    ax = fig.subplots()
    print("| run | re-fits (kept) | accepted length at full depth: first 10 -> last 10 steps (run mean) "
          "| re-fit s | rollout s | step s | reward, last 10 |\n|---|---|---|---|---|---|---|")
    for i, run in enumerate(args.runs):
        records = read(run)
        s = summary(records)
        name = Path(run).name
        print(f"| {name} | {s['refits']} ({s['kept']}) | {s['first10']:.2f} -> {s['last10']:.2f} ({s['mean']:.2f}) "
              f"| {s['refit_s']:.1f} | {s['rollout_s']:.1f} | {s['step_s']:.1f} | {s['reward_last10']:.3f} |")
        steps = [r["step"] for r in records]
        ax.plot(steps, [r.get("accepted_len_full_depth", 0.0) for r in records], color=f"C{i}",
                label=f"{name} ({s['refits']} re-fits)")
        for r in records:
            if r.get("refit") is True:
                ax.axvline(r["step"], color=f"C{i}", ls=":" if r.get("refit_kept", True) else "-.", lw=1)
    ax.set_xlabel("RL step (dotted: a kept re-fit, dash-dot: a re-fit that was rejected)")
    ax.set_ylabel("accepted length at full depth")
    ax.legend(fontsize=8)
    save_figure(fig, Path(args.out).name, Path(args.out).parent)


if __name__ == "__main__":
    main()
