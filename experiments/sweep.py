"""`specroll sweep`: a grid of training configs run as Ray Tune trials.

Each trial is an ordinary `specroll train` run (its own run dir under out_dir/<sweep name>/),
so `specroll plot` and `specroll compare` work on its results; the sweep ends with the compare
table of all trials and one plot of their reward and acceptance curves (curves.png). A trial
with ray.enabled=true reserves its rollout workers' resources from its own config. Trials report every step's metrics to Tune after their run finishes
(no early-stopping scheduler: a trial always runs its full config).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

from experiments.config import ConfigError, load_config
from experiments.data import DataError
from experiments.tasks import load_task_records

EPILOG = """examples:
  specroll sweep --grid spec.mode=off,entropy --grid refit.schedule=never,on_drop train.steps=10
  specroll sweep --config smollm2-gsm8k --grid algo.clip_high=0.2,0.28 ray.address=auto
"""


def split_values(values: str) -> list[str] | None:
    """"1,[0.9,0.99],'a,b'" -> ["1", "[0.9,0.99]", "'a,b'"]: commas inside brackets or quotes
    belong to the value. None when a bracket or quote is left open."""
    out, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(values):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
            if depth < 0:
                return None
        elif ch == "," and depth == 0:
            out.append(values[start:i])
            start = i + 1
    if depth or quote:
        return None
    return [v for v in out + [values[start:]] if v != ""]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """["a.b=1,2", "c=x", "d=[1,2],[3]"] -> {"a.b": ["1", "2"], "c": ["x"], "d": ["[1,2]", "[3]"]};
    a bad item names itself."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        vals = split_values(values)
        if vals is None:
            raise ConfigError(f"--grid {item!r}: a bracket or quote is not closed; e.g. "
                              "--grid train.betas=[0.9,0.99],[0.9,0.999]")
        if not sep or not key or not vals:
            raise ConfigError(f"--grid {item!r}: expected key=v1,v2,..., e.g. --grid spec.mode=off,entropy")
        if key in grid:
            raise ConfigError(f"--grid {key}: given twice; list all its values in one --grid")
        grid[key] = vals
    return grid


def expand(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the grid's values, in a stable order."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def trial_name(point: dict[str, str]) -> str:
    return "_".join(f"{k.split('.')[-1]}={v}" for k, v in point.items()) or "base"


class TrialFailed(RuntimeError):
    """`specroll train` of one trial ended with an error (its run dir keeps what it wrote)."""


def trial_resources(params: dict, args):
    """A trial's resources from its own config: with ray.enabled, one bundle for the trial's
    driver (the learner) and one per rollout worker (rollout.num_cpus / num_gpus), which the
    trial's coordinator takes over; else --cpus-per-trial / --gpus-per-trial."""
    from ray import tune

    from rollout.coordinator import worker_bundle

    cfg = load_config(params["preset"], params["overrides"])
    if not cfg.ray.enabled:
        return {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}
    learner = {"CPU": max(args.cpus_per_trial, 1.0), **({"GPU": args.gpus_per_trial} if args.gpus_per_trial else {})}
    return tune.PlacementGroupFactory([learner] + [worker_bundle(cfg.rollout)] * cfg.rollout.num_workers)


def _trainable(params: dict) -> None:
    """One Tune trial: build the config, run `train`, report each step's metrics; a run that
    ends with an error (e.g. non-finite weights) fails the trial, after reporting its steps."""
    from ray import tune

    from experiments import train
    from experiments.metrics import read_metrics

    cfg = load_config(params["preset"], params["overrides"])
    code = train.run(cfg)
    if (Path(cfg.run_dir) / "metrics.jsonl").is_file():
        for rec in read_metrics(cfg.run_dir):
            tune.report({k: v for k, v in rec.items() if isinstance(v, (int, float, bool))})
    if isinstance(code, int) and code != 0:
        raise TrialFailed(f"specroll train exited with code {code} (its error is in the trial's log; "
                          f"run dir {cfg.run_dir})")


def trial_of(overrides: list[str]) -> str:
    """The trial name a trial's overrides carry (the last name=... wins, as in load_config)."""
    names = [o.split("=", 1)[1] for o in overrides if o.startswith("name=")]
    return names[-1] if names else "?"


def error_line(error: BaseException) -> str:
    """One line for a failed trial: the exception that ended it, without Ray's traceback."""
    cause = getattr(error, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def existing_sweep(sweep_dir: Path) -> list[str]:
    """What an earlier sweep of this name left in sweep_dir (trial run dirs, Tune's state)."""
    if not sweep_dir.is_dir():
        return []
    return sorted(p.name for p in sweep_dir.iterdir()
                  if p.name == "_tune" or (p / "config.yaml").is_file() or (p / "metrics.jsonl").is_file())


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="specroll sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    ap.add_argument("--config", default="default", help="base preset or YAML file (default: default)")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                    help="a config key and the values to sweep; repeat for a product grid")
    ap.add_argument("--name", default="sweep", help="sweep name: trials go to out_dir/NAME/<trial>")
    ap.add_argument("--max-concurrent", type=int, default=1,
                    help="trials at once (default 1: each trial uses the machine's cores)")
    ap.add_argument("--cpus-per-trial", type=float, default=1.0)
    ap.add_argument("--gpus-per-trial", type=float, default=0.0)
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="applied to every trial")
    args = ap.parse_args(argv)
    try:
        grid = parse_grid(args.grid)
        base = load_config(args.config, args.overrides)  # fail early on a bad base config
        points = expand(grid)
        for point in points:  # and on a bad grid value or data file, before any trial starts
            cfg = load_config(args.config, args.overrides + [f"{k}={v}" for k, v in point.items()])
            if cfg.task.name == "gsm8k":
                load_task_records(cfg.task)
        sweep_dir = Path(base.out_dir) / args.name
        earlier = existing_sweep(sweep_dir)
        if earlier:  # its trials would each refuse their used run dir, or mix old and new results
            raise ConfigError(f"--name {args.name}: {sweep_dir} already holds a sweep ({', '.join(earlier[:4])}"
                              f"{' ...' if len(earlier) > 4 else ''}); choose another --name, or delete "
                              f"{sweep_dir} to run it again")
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import ray
    from ray import tune

    trials = []
    for point in points:
        name = trial_name(point)
        # trials run rollouts in their own process unless the user says otherwise
        ray_enabled = [] if any(o.startswith("ray.enabled=") for o in args.overrides) else ["ray.enabled=false"]
        overrides = (args.overrides + ray_enabled + [f"{k}={v}" for k, v in point.items()]
                     + [f"out_dir={sweep_dir.resolve()}", f"name={name}"])
        trials.append({"overrides": overrides, "trial": name})
    preset = str(Path(args.config).resolve()) if Path(args.config).is_file() else args.config
    # trials resolve relative paths (task.path=...) from where the sweep was started
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    if not ray.is_initialized():
        ray.init(address=base.ray.address or None, num_cpus=base.ray.num_cpus or None,
                 include_dashboard=False, log_to_driver=True)
    trainable = tune.with_resources(_trainable, lambda params: trial_resources(params, args))
    tuner = tune.Tuner(
        trainable,
        param_space={"preset": preset, "overrides": tune.grid_search([t["overrides"] for t in trials])},
        tune_config=tune.TuneConfig(max_concurrent_trials=args.max_concurrent),
        run_config=tune.RunConfig(name=args.name, storage_path=str((sweep_dir / "_tune").resolve()), verbose=1),
    )
    results = tuner.fit()
    failed = {trial_of(r.config["overrides"]): error_line(r.error) for r in results if r.error}
    return report(sweep_dir, [t["trial"] for t in trials], failed)


def report(sweep_dir: Path, trials: list[str], failed: dict[str, str]) -> int:
    """The compare table of the trials that logged steps, failed ones marked (FAILED), then one
    error line per failed trial naming it; returns the exit code (1 if any trial failed)."""
    from experiments.compare import compare_rows, print_table

    done = [str(sweep_dir / t) for t in trials if (sweep_dir / t / "metrics.jsonl").exists()]
    if done:
        rows = compare_rows(done, last=5)
        for row in rows:  # a failed trial's steps so far must not read as a finished result
            if row["name"] in failed:
                row["name"] += " (FAILED)"
        print_table(rows, last=5)
        from experiments.plots import plot_sweep

        print(f"reward and acceptance curves of every trial: {plot_sweep(done, str(sweep_dir / 'curves.png'))}")
    for name in trials:
        if name in failed and str(sweep_dir / name) not in done:
            print(f"{name} (FAILED): no step finished", file=sys.stderr)
    for name, line in failed.items():
        print(f"error: trial {name}: {line}", file=sys.stderr)
    return 1 if failed else 0
