"""Finding 4: head re-fit schedules over an RL run, from training runs' metrics.

Each run is a `specroll train` run with one `refit.*` setting (same seed, policy, heads and
steps). Per run: the accepted length the heads give at full depth per step
(`accepted_len_full_depth`, what `refit.schedule=on_drop` watches), the re-fits (kept or not),
their time, and the rollout time. The figure overlays the runs' curves, re-fits marked.

    python scripts/results/refit_schedules.py runs/refit-never runs/refit-every10 runs/refit-on_drop
        # writes docs/results/refit_schedules.png and .json, and prints the table

`--replay RUN` also replays `on_drop` with each (drop_fraction, drop_smoothing) in TRIGGERS on
RUN's trace (a run that never re-fitted, so its trace is what any trigger sees until it first
fires), through the learner's own trigger code (`Learner.should_refit`), and prints the first
step each fires at and how far the trace had slid by then.
"""
from __future__ import annotations

import argparse
import json
import statistics
import types
from pathlib import Path

from _common import OUT_DIR, new_figure, save_figure

# (drop_fraction, drop_smoothing): smoothing 1.0 is one step alone against the best step
TRIGGERS = [(0.85, 1.0), (0.95, 1.0), (0.95, 0.3), (0.97, 0.3), (0.95, 0.1), (0.93, 0.3), (0.90, 0.3), (0.90, 0.2),
            (0.90, 0.1), (0.85, 0.3)]


# the triggers marked on the figure: the earlier default and the current one
MARKED = [(0.95, 0.3), (0.90, 0.2)]


def read(run_dir: str) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def first_fire(lengths: list[float], fraction: float, smoothing: float) -> int | None:
    """1-based step at which `refit.schedule=on_drop` with these settings first fires on `lengths`, or None."""
    from learner.config import RefitConfig
    from learner.trainer import Learner

    # the trigger's state alone: should_refit reads heads, refit_cfg, refit_level and refit_baseline
    state = types.SimpleNamespace(heads=object(), refit_level=None, refit_baseline=None,
                                  refit_cfg=RefitConfig(drop_fraction=fraction, drop_smoothing=smoothing))
    for step, length in enumerate(lengths, start=1):
        if Learner.should_refit(state, step, length, True):
            return step
    return None


def replay(run_dir: str) -> list[dict]:
    lengths = [r.get("accepted_len_full_depth", 0.0) for r in read(run_dir)]
    start = statistics.fmean(lengths[:5])
    noise = statistics.pstdev([b - a for a, b in zip(lengths, lengths[1:])]) / 2 ** 0.5
    print(f"replay on {Path(run_dir).name}: {len(lengths)} steps, first 5 steps {start:.2f}, last 5 "
          f"{statistics.fmean(lengths[-5:]):.2f}, one step's noise ~{noise:.3f} ({100 * noise / start:.1f}%)")
    print("| drop_fraction | drop_smoothing | first fires at step | mean of the 5 steps before it / first 5 |"
          "\n|---|---|---|---|")
    rows = []
    for fraction, smoothing in TRIGGERS:
        at = first_fire(lengths, fraction, smoothing)
        slid = statistics.fmean(lengths[max(0, at - 5):at]) / start if at else None
        rows.append({"drop_fraction": fraction, "drop_smoothing": smoothing, "first_fire": at, "slid_to": slid})
        print(f"| {fraction} | {smoothing} | {at or 'never'} | {f'{slid:.3f}' if slid else '-'} |")
    print()
    return rows


def summary(records: list[dict]) -> dict:
    lengths = [r.get("accepted_len_full_depth", 0.0) for r in records]
    refits = [r for r in records if r.get("refit") is True]
    return {
        "steps": len(records),
        "first10": statistics.fmean(lengths[:10]), "last10": statistics.fmean(lengths[-10:]),
        "mean": statistics.fmean(lengths),
        # tokens per verify step at the depths drafted: what the rollout's forward passes yield
        "accepted_len_mean": statistics.fmean(r.get("mean_accepted_len", 0.0) for r in records),
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
    ap.add_argument("--steps", type=int, default=0, help="compare the runs over their first N steps (0: all)")
    ap.add_argument("--out", default=str(OUT_DIR / "refit_schedules.png"))
    args = ap.parse_args()
    replayed = replay(args.replay) if args.replay else []
    fig = new_figure(9.0, 3.8)
    ax = fig.subplots()
    print("| run | re-fits (kept) | accepted length at full depth: first 10 -> last 10 steps (run mean) "
          "| tokens per verify step (run mean) | re-fit s | rollout s | step s | reward, last 10 |"
          "\n|---|---|---|---|---|---|---|---|")
    summaries = {}
    for i, run in enumerate(args.runs):
        records = read(run)[:args.steps or None]
        s = summary(records)
        name = Path(run).name
        summaries[name] = s
        print(f"| {name} | {s['refits']} ({s['kept']}) | {s['first10']:.2f} -> {s['last10']:.2f} ({s['mean']:.2f}) "
              f"| {s['accepted_len_mean']:.2f} | {s['refit_s']:.1f} | {s['rollout_s']:.1f} | {s['step_s']:.1f} | {s['reward_last10']:.3f} |")
        steps = [r["step"] for r in records]
        ax.plot(steps, [r.get("accepted_len_full_depth", 0.0) for r in records], color=f"C{i}",
                label=f"{name} ({s['refits']} re-fits)")
        for r in records:
            if r.get("refit") is True:
                ax.axvline(r["step"], color=f"C{i}", ls=":" if r.get("refit_kept", True) else "-.", lw=1)
    if args.replay:  # where each replayed trigger first fires on the never-re-fitted trace
        lengths = [r.get("accepted_len_full_depth", 0.0) for r in read(args.replay)]
        marked = [r for r in replayed if r["first_fire"] and (r["drop_fraction"], r["drop_smoothing"]) in MARKED]
        for j, r in enumerate(marked):
            at = r["first_fire"]
            ax.plot([at], [lengths[at - 1]], marker="v^sD"[j % 4], ms=9, ls="none", color="k", alpha=0.7,
                    label=f"on_drop {r['drop_fraction']} / smoothing {r['drop_smoothing']}: fires at step {at}")
    ax.set_xlabel("RL step (dotted: a kept re-fit, dash-dot: a re-fit that was rejected)")
    ax.set_ylabel("accepted length at full depth")
    ax.legend(fontsize=8)
    out = Path(args.out).with_suffix(".json")
    out.write_text(json.dumps({"runs": summaries, "replay": replayed,
                               "replayed_run": Path(args.replay).name if args.replay else None}, indent=1))
    save_figure(fig, Path(args.out).name, Path(args.out).parent)


if __name__ == "__main__":
    main()
