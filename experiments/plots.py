"""`specroll plot`: PNG curves of one or more runs' metrics.jsonl (reward, acceptance, throughput, time).

One PNG per panel; several runs overlay on the same axes with a legend of run names (the acceptance
and time-split panels get one subplot per run, since their own lines or bars already fill an axis).
A panel whose metric no run logged is skipped, so the training loop can call `plot_runs([run_dir])`
at any step, including the first. Uses matplotlib's object API with the Agg canvas, never pyplot,
so importing this module changes no global backend and leaks no figures.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from experiments.metrics import MetricsError, Run, load_runs

PANEL_FILES = ("reward.png", "accepted_len.png", "acceptance.png", "tokens_per_s.png", "time_split.png",
               "logprob_diff.png", "workers.png")
WORKER_PANELS = (("rollout_worker_tokens_per_s", "tokens / s (busy time)"),
                 ("rollout_worker_idle_frac", "idle fraction of the rollout"))
COMPARE_DIR = "plots-compare"
MARKER_MAX_STEPS = 30  # short runs get point markers, so a 1-step run still shows its value
TIME_PARTS = (("time_rollout_s", "rollout", "tab:blue"), ("time_train_s", "train", "tab:orange"),
              ("time_refit_s", "re-fit", "tab:green"))


def plot_runs(run_dirs: list[str], out_dir: str | None = None) -> list[str]:
    """Write the PNG panels for these runs; returns the paths written, in PANEL_FILES order.

    out_dir defaults to <run>/plots for one run and ./plots-compare for several.
    Raises MetricsError when a run directory or its metrics.jsonl is missing or empty.
    """
    runs = load_runs(run_dirs)
    if out_dir is None:
        out_dir = str(Path(run_dirs[0]) / "plots") if len(runs) == 1 else COMPARE_DIR
    os.makedirs(out_dir, exist_ok=True)
    figures = {
        "reward.png": _reward_figure(runs),
        "accepted_len.png": _accepted_len_figure(runs),
        "acceptance.png": _acceptance_figure(runs),
        "tokens_per_s.png": _line_figure(runs, "rollout_tokens_per_s", "Rollout throughput",
                                         "tokens / s (rollout)"),
        "time_split.png": _time_split_figure(runs),
        "logprob_diff.png": _line_figure(runs, "logprob_diff_max",
                                         "Rollout vs learner log-prob mismatch (on-policy check)",
                                         "max |logprob diff| (nats)", logy=True),
        "workers.png": _workers_figure(runs),
    }
    written = []
    for name in PANEL_FILES:
        fig = figures[name]
        if fig is not None:
            written.append(_save(fig, os.path.join(out_dir, name)))
    return written


def plot_sweep(run_dirs: list[str], path: str) -> str:
    """One figure for a sweep: every trial's reward (left) and mean accepted length (right) by step."""
    runs = load_runs(run_dirs)
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    for ax, key, title in ((left, "reward_mean", "Reward (mean per response)"),
                           (right, "mean_accepted_len", "Acceptance (tokens per row per verify step)")):
        for i, run in enumerate(runs):
            steps, values = run.series(key)
            ax.plot(steps, values, color=_color(i), label=run.name, **_markers(steps))
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        _integer_steps(ax)
    right.legend(fontsize="small")
    return _save(fig, path)


def _line_figure(runs: list[Run], key: str, title: str, ylabel: str, logy: bool = False) -> Figure | None:
    """One line per run of a scalar metric; None when no run logged it."""
    runs = [r for r in runs if r.series(key)[0]]
    if not runs:
        return None
    fig, ax = _axes(title, ylabel)
    for i, run in enumerate(runs):
        steps, values = run.series(key)
        if logy:  # exact zeros (a perfect match) have no place on a log axis; floor them visibly
            values = [max(v, 1e-12) for v in values]
        ax.plot(steps, values, color=_color(i), label=run.name, **_markers(steps))
    if logy:
        ax.set_yscale("log")
    _legend(ax, runs)
    _integer_steps(ax)
    return fig


def _reward_figure(runs: list[Run]) -> Figure | None:
    runs = [r for r in runs if r.series("reward_mean")[0]]
    if not runs:
        return None
    fig, ax = _axes("Reward", "mean reward per response")
    for i, run in enumerate(runs):
        steps, values = run.series("reward_mean")
        window = _rolling_window(len(values))
        faint = {"alpha": 0.35, "linewidth": 1} if window > 1 else {}  # raw values under their rolling mean
        ax.plot(steps, values, color=_color(i), **faint,
                label=f"{run.name} (per step)" if window > 1 else run.name, **_markers(steps))
        if window > 1:
            ax.plot(steps, _rolling_mean(values, window), color=_color(i), linewidth=2,
                    label=f"{run.name} ({window}-step rolling mean)")
    ax.legend(fontsize="small")
    _integer_steps(ax)
    return fig


def _accepted_len_figure(runs: list[Run]) -> Figure | None:
    """Tokens per verify step, with each run's re-fit steps as dashed vertical lines in its colour."""
    runs_with = [(i, r) for i, r in enumerate(runs) if r.series("mean_accepted_len")[0]]
    if not runs_with:
        return None
    fig, ax = _axes("Mean accepted length (dashed: draft-head re-fit)", "tokens emitted per row per verify step")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":", label="no speculation (1.0)")
    for i, run in runs_with:
        steps, values = run.series("mean_accepted_len")
        ax.plot(steps, values, color=_color(i), label=run.name, **_markers(steps))
        for j, step in enumerate(run.refit_steps()):
            ax.axvline(step, color=_color(i), linestyle="--", linewidth=0.9, alpha=0.7,
                       label=f"{run.name} re-fit" if j == 0 else None)
    ax.legend(fontsize="small")
    _integer_steps(ax)
    return fig


def _acceptance_figure(runs: list[Run]) -> Figure | None:
    """Conditional acceptance at each draft depth over steps; one subplot per run, shared y axis."""
    runs = [r for r in runs if _acceptance_table(r)[0]]
    if not runs:
        return None
    fig = Figure(figsize=(8, 3.2 * len(runs) + 0.8), layout="constrained")
    axes = fig.subplots(len(runs), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    fig.suptitle("Draft acceptance per depth (P(accept depth i | depths < i accepted))")
    for ax, run in zip(axes, runs):
        steps, table = _acceptance_table(run)
        depth = max(len(row) for row in table)
        cmap = _depth_colormap()
        for d in range(depth):
            pts = [(s, row[d]) for s, row in zip(steps, table) if d < len(row) and row[d] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=cmap(d / max(depth - 1, 1)),
                    label=f"depth {d + 1}", **_markers(steps))
        for step in run.refit_steps():
            ax.axvline(step, color="grey", linestyle="--", linewidth=0.8, alpha=0.6)
        ax.set_title(run.name, fontsize="medium")
        ax.set_ylabel("acceptance rate")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", ncol=min(depth, 4), loc="lower left")
    axes[-1].set_xlabel("RL step")
    _integer_steps(axes[-1])
    return fig


def _acceptance_table(run: Run) -> tuple[list[int], list[list[float | None]]]:
    steps, table = [], []
    for r in run.records:
        rates = r.get("accept_rate_per_pos")
        if isinstance(rates, list) and rates:
            steps.append(r["step"])
            table.append([float(x) if isinstance(x, (int, float)) else None for x in rates])
    return steps, table


def _time_split_figure(runs: list[Run]) -> Figure | None:
    """Stacked bars per step: rollout / train / re-fit seconds; one subplot per run, shared axes."""
    runs = [r for r in runs if any(r.series(key)[0] for key, _, _ in TIME_PARTS)]
    if not runs:
        return None
    fig = Figure(figsize=(8, 3.2 * len(runs) + 0.8), layout="constrained")
    axes = fig.subplots(len(runs), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    fig.suptitle("Time per RL step")
    top = 0.0
    for ax, run in zip(axes, runs):
        steps = [r["step"] for r in run.records]
        bottom = [0.0] * len(steps)
        for key, label, color in TIME_PARTS:
            heights = [_number(r.get(key)) for r in run.records]
            if not any(heights):
                continue
            ax.bar(steps, heights, bottom=bottom, color=color, label=label, width=0.85)
            bottom = [b + h for b, h in zip(bottom, heights)]
        top = max(top, *bottom)
        ax.set_title(run.name, fontsize="medium")
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize="small", loc="upper left", ncol=3)
    axes[-1].set_ylim(0, 1.25 * top if top > 0 else 1.0)  # headroom for the legend, over the bars
    axes[-1].set_xlabel("RL step")
    _integer_steps(axes[-1])
    return fig


def worker_series(run: Run, key: str) -> dict[int, tuple[list[int], list[float]]]:
    """A per-worker list metric (rollout_worker_*) as worker -> (steps, values)."""
    out: dict[int, tuple[list[int], list[float]]] = {}
    for r in run.records:
        values = r.get(key)
        if isinstance(values, list):
            for w, v in enumerate(values):
                steps, ys = out.setdefault(w, ([], []))
                steps.append(r["step"])
                ys.append(_number(v))
    return out


def _workers_figure(runs: list[Run]) -> Figure | None:
    """Per rollout worker, by step: tokens/s over its busy time and its idle fraction; one row of
    two subplots per run with two or more workers (the coordinator's runs)."""
    runs = [r for r in runs if len(worker_series(r, WORKER_PANELS[0][0])) >= 2]
    if not runs:
        return None
    fig = Figure(figsize=(12, 3.2 * len(runs) + 0.8), layout="constrained")
    axes = fig.subplots(len(runs), 2, squeeze=False)
    fig.suptitle("Rollout workers")
    for row, run in zip(axes, runs):
        for ax, (key, ylabel) in zip(row, WORKER_PANELS):
            for w, (steps, values) in sorted(worker_series(run, key).items()):
                ax.plot(steps, values, color=_color(w), label=f"worker {w}", **_markers(steps))
            ax.set_title(run.name, fontsize="medium")
            ax.set_ylabel(ylabel)
            ax.set_xlabel("RL step")
            ax.grid(alpha=0.3)
            _integer_steps(ax)
        row[1].set_ylim(-0.02, 1.02)
        row[0].legend(fontsize="small")
    return fig


def _axes(title: str, ylabel: str):
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("RL step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _integer_steps(ax) -> None:
    """Whole-number step ticks; a 1-step run gets a few steps of room so its tick is not -0.4 .. 0.4."""
    low, high = ax.get_xlim()
    if high - low < 2:
        middle = round((low + high) / 2)
        ax.set_xlim(middle - 2, middle + 2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend(ax, runs: list[Run]) -> None:
    if len(runs) > 1:
        ax.legend(fontsize="small")


def _markers(steps: list[int]) -> dict:
    return {"marker": "o", "markersize": 3} if len(steps) <= MARKER_MAX_STEPS else {}


def _color(i: int) -> str:
    return f"C{i % 10}"


def _depth_colormap():
    from matplotlib import colormaps

    return colormaps["viridis"].resampled(256)


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0


def _rolling_window(n: int) -> int:
    """About a tenth of the run, at least 3 and at most 25 steps; 1 (no smoothing) below 6 steps."""
    return 1 if n < 6 else max(3, min(25, n // 10))


def _rolling_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _save(fig: Figure, path: str) -> str:
    """Write through a temp file and a rename, so a viewer never opens a half-written PNG."""
    fd, tmp = tempfile.mkstemp(prefix=".plot.", suffix=".png", dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specroll plot", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Plot the metrics.jsonl of one or more run directories to PNG files: reward (with a "
                    "rolling mean),\nmean accepted length with re-fit steps marked, acceptance per draft "
                    "depth, rollout tokens/s,\ntime per step (rollout / train / re-fit) and the rollout vs "
                    "learner log-prob mismatch.\nSeveral runs overlay on the same axes, named by run directory.",
        epilog="examples:\n"
               "  specroll plot runs/default                       # -> runs/default/plots/*.png\n"
               "  specroll plot runs/default runs/baseline-off     # -> plots-compare/*.png\n"
               "  specroll plot runs/* --out figs/sweep")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help=f"where the PNGs go (default: RUN_DIR/plots for one run, ./{COMPARE_DIR} for several)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths = plot_runs(args.run_dirs, args.out)
    except MetricsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
