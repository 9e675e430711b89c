"""`specroll compare`: one table over several runs (reward, acceptance, throughput, time, rollout speedup).

Reads each run's metrics.jsonl and config.yaml only; never imports torch. The rollout speedup is a
ratio of mean rollout seconds per step against a baseline run (the first, or --baseline NAME), so
runs of different lengths still compare; it is only honest when both ran on the same machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from experiments.metrics import MetricsError, Run, finite_mean, load_runs

DEFAULT_LAST = 5


def summarize(run: Run, last: int = DEFAULT_LAST) -> dict[str, Any]:
    """One row: the numbers the table shows, unformatted (nan where the run did not log the metric)."""
    _, rewards = run.series("reward_mean")
    _, accepted = run.series("mean_accepted_len")
    _, rollout_s = run.series("time_rollout_s")
    spec_mode, refit = _config_summary(run)
    return {
        "name": run.name,
        "path": str(run.path),
        "spec_mode": spec_mode,
        "refit_schedule": refit,
        "steps": len(run.records),
        "last_step": run.records[-1]["step"],
        "final_reward": finite_mean(rewards[-last:]),
        "best_reward": max(rewards) if rewards else math.nan,
        "accepted_len_first": finite_mean(accepted[:last]),
        "accepted_len_last": finite_mean(accepted[-last:]),
        "rollout_tokens_per_s": finite_mean(run.series("rollout_tokens_per_s")[1]),
        "rollout_s_per_step": finite_mean(rollout_s),
        "total_rollout_s": sum(rollout_s),
        "total_train_s": sum(run.series("time_train_s")[1]),
        "total_refit_s": sum(run.series("time_refit_s")[1]),
        "refits": len(run.refit_steps()),
    }


def compare_rows(run_dirs: list[str], last: int = DEFAULT_LAST, baseline: str | None = None) -> list[dict[str, Any]]:
    """Rows for these runs, each with `rollout_speedup` = baseline's rollout s/step / this run's."""
    if last < 1:
        raise MetricsError(f"--last: must be >= 1 (steps averaged for final reward), got {last}")
    rows = [summarize(run, last) for run in load_runs(run_dirs)]
    names = [row["name"] for row in rows]
    if baseline is None:
        base = rows[0]
    elif baseline in names:
        base = rows[names.index(baseline)]
    else:
        raise MetricsError(f"--baseline: no run named {baseline!r}; choose one of {', '.join(names)}")
    for row in rows:
        row["baseline"] = base["name"]
        ratio_ok = row["rollout_s_per_step"] > 0 and math.isfinite(base["rollout_s_per_step"])
        row["rollout_speedup"] = base["rollout_s_per_step"] / row["rollout_s_per_step"] if ratio_ok else math.nan
    return rows


def _config_summary(run: Run) -> tuple[str, str]:
    """(spec mode, refit schedule) from config.yaml, read as plain YAML so old runs' configs still load."""
    spec_mode, refit = "?", "?"
    try:
        cfg = yaml.safe_load((run.path / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    spec = cfg.get("spec") if isinstance(cfg.get("spec"), dict) else {}
    refit_cfg = cfg.get("refit") if isinstance(cfg.get("refit"), dict) else {}
    if "mode" in spec:
        spec_mode = "off" if spec["mode"] is False else str(spec["mode"])  # YAML 1.1 reads a bare off as false
        if spec_mode == "fixed" and "k" in spec:
            spec_mode = f"fixed k={spec['k']}"
        elif spec_mode == "entropy" and "max_k" in spec:
            spec_mode = f"entropy k<={spec['max_k']}"
    else:  # no config.yaml: the metrics may still say
        modes = [r["spec_mode"] for r in run.records if isinstance(r.get("spec_mode"), str)]
        spec_mode = modes[-1] if modes else "?"
    if "schedule" in refit_cfg:
        refit = str(refit_cfg["schedule"])
        if refit == "every" and "every" in refit_cfg:
            refit = f"every {refit_cfg['every']}"
        elif refit == "on_drop" and "drop_fraction" in refit_cfg:
            refit = f"on_drop <{refit_cfg['drop_fraction']}"
    return spec_mode, refit


def print_table(rows: list[dict[str, Any]], last: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Run comparison", caption=f"final reward: mean of the last {last} steps; acc. len: "
                  f"mean of the first / last {last} steps; speedup: rollout s/step of {rows[0]['baseline']} "
                  f"/ this run's")
    for header in ("run", "spec", "re-fit", "steps", "final reward", "best reward", "acc. len first→last",
                   "rollout tok/s", "rollout s", "train s", "re-fit s (n)", "rollout speedup"):
        table.add_column(header, justify="left" if header in ("run", "spec", "re-fit") else "right")
    for row in rows:
        table.add_row(
            row["name"], row["spec_mode"], row["refit_schedule"], str(row["steps"]),
            _fmt(row["final_reward"], 3), _fmt(row["best_reward"], 3),
            f"{_fmt(row['accepted_len_first'], 2)} → {_fmt(row['accepted_len_last'], 2)}",
            _fmt(row["rollout_tokens_per_s"], 1), _fmt(row["total_rollout_s"], 1), _fmt(row["total_train_s"], 1),
            f"{_fmt(row['total_refit_s'], 1)} ({row['refits']})", _fmt(row["rollout_speedup"], 2) + "x")
    # Not a terminal (a pipe, a log file, a test): wide enough that no number is wrapped or cut.
    console = Console(width=None if sys.stdout.isatty() else 240)
    console.print(table)


def _fmt(value: float, digits: int) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"


def write_json(rows: list[dict[str, Any]], path: str) -> None:
    """The rows as a JSON list (nan as null), written through a temp file and a rename."""
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
             for row in rows]
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".compare.", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(clean, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specroll compare", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compare run directories side by side: spec mode and re-fit schedule (from config.yaml),\n"
                    "steps, final and best reward, mean accepted length early vs late, rollout tokens/s,\n"
                    "total rollout / train / re-fit seconds, and the rollout speedup against a baseline run\n"
                    "(mean rollout seconds per step of the baseline divided by the run's).",
        epilog="examples:\n"
               "  specroll compare runs/baseline-off runs/default   # speedup against the first run\n"
               "  specroll compare runs/* --baseline baseline-off --last 10\n"
               "  specroll compare runs/a runs/b --json compare.json")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    parser.add_argument("--last", type=int, default=DEFAULT_LAST, metavar="N",
                        help="steps averaged for final reward and late accepted length (default: %(default)s)")
    parser.add_argument("--baseline", metavar="NAME", default=None,
                        help="run name (as shown in the table) to compute speedups against (default: the first)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the rows to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = compare_rows(args.run_dirs, args.last, args.baseline)
    except MetricsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(rows, args.last)
    if args.json:
        write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
