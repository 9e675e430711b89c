"""The coordinator on the long-tail task: RL step time and rollout time per schedule, with
speculation off and on, over two rollout workers of unequal speed; then reward curves.

Modes (each with spec.mode off and entropy, the same seeds and prompts):
  fixed        each worker gets one contiguous half of the step's GRPO groups (rollout.schedule=fixed)
  pull         workers pull groups from one queue whenever they have free rows
  pull+refit   pull, and an idle worker re-fits the heads while the last rows finish (refit.schedule=idle)
  async-1      pull, and rollouts of step t+1 run while the learner trains on step t
               (train.max_staleness=1; re-fits per the preset's refit.schedule)
  async-1+partial  async-1, and a worker with no rows left starts step t+1's groups while the
               others finish step t's tail (rollout.partial)

The workers' speeds differ for real: worker 0 runs with --threads A torch threads, worker 1 with B
(default 1 and 1; rollout.threads_per_worker), and with different row limits (--max-batch, default
16,8; rollout.max_batch_per_worker): the tiny policy's decoding is overhead-bound, so twice the
rows in flight is about twice the tokens/s. The per-worker tokens/s the coordinator measures are
printed, so the actual ratio on the machine is in the table. Every mode loads the draft
heads (publishes carry them), so spec off and on run the same workers and weights.

Timing: each round runs every configuration once, in turn, on that round's seed (fresh prompts),
for --steps RL steps from the same pretrained policy and heads; a configuration's time is the
median over its steps after the first (the first pays the depth policy's cost probe and the
workers' warm-up). Speedups are medians of per-round ratios against `fixed` with speculation
off (the synchronous loop as it was), with the range over rounds. CPU timings are only ratios.

Reward curves: --curve-seeds seeds x --curve-steps steps of the synchronous fixed split with
speculation off against speculation + pull queue (+ idle re-fit) + async, reward per step.

    PYTHONPATH=. python scripts/bench_coordinator.py --rounds 3 --steps 3 --json runs/coordinator.json
    PYTHONPATH=. python scripts/bench_coordinator.py --plot-from runs/coordinator.json   # the reward plot

This is a script that prints a table, never a test.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import ray
import torch

from experiments.config import load_config
from experiments.train import TaskReward, _setup
from learner.loop import RLLoop, StepPrompts, step_seed
from learner.trainer import cpu_state
from rollout.coordinator import Coordinator

SPEC_MODES = ("off", "entropy")
BASELINE = ("fixed", "off")


# ------------------------------------------------------------------------------------- modes


def mode_config(cfg, mode: str, spec_mode: str):
    """The run config of one mode: schedule, idle re-fit and staleness per the coordinator's keys."""
    rollout = dataclasses.replace(cfg.rollout, schedule="fixed" if mode == "fixed" else "pull",
                                  partial=mode == "async-1+partial")
    train = dataclasses.replace(cfg.train, max_staleness=1 if mode.startswith("async-1") else 0)
    # the learner's own scheduled re-fits (the preset's on_drop: ~2 min on this CPU when it fires)
    # would land in random steps of random modes; only pull+refit re-fits, on an idle worker
    refit = dataclasses.replace(cfg.refit, schedule="idle" if mode == "pull+refit" else "never")
    return dataclasses.replace(cfg, rollout=rollout, train=train, refit=refit,
                               spec=dataclasses.replace(cfg.spec, mode=spec_mode))


def measure(cfg, mode: str, spec_mode: str, seed: int, steps: int) -> list[dict]:
    """Run `steps` RL steps of one mode from the pretrained policy; per-step metrics. `seed` picks
    the prompts and sampling; the policy and heads are those of cfg.seed."""
    run_cfg = mode_config(cfg, mode, spec_mode)
    _, _, tok, task, sampling, learner = _setup(dataclasses.replace(run_cfg, spec=cfg.spec))
    heads = learner.heads
    client = Coordinator(learner.policy.config, cpu_state(learner.policy), heads.config, cpu_state(heads),
                         run_cfg.rollout, version=learner.policy_version)

    def prompts(step: int) -> StepPrompts:
        examples = task.train_prompts(run_cfg.train.prompts_per_step, seed=step_seed(seed, step))
        return StepPrompts([tok.encode(ex.prompt) for ex in examples], [ex.prompt for ex in examples], examples)

    loop = RLLoop(learner, client, prompt_fn=prompts, reward_fn=TaskReward(task, tok), task_name=task.name,
                  sampling=sampling, spec=run_cfg.spec, group_size=run_cfg.algo.group_size, seed=seed,
                  max_staleness=run_cfg.train.max_staleness)  # async: step t+1 rolls out during every timed step
    out = []
    try:
        for step in range(1, steps + 1):
            m = loop.step(step)
            out.append({k: m.get(k) for k in ("reward_mean", "accuracy", "response_len_mean", "mean_accepted_len",
                                              "time_step_s", "time_rollout_s", "time_train_s", "time_refit_s",
                                              "rollout_wall_s", "staleness_max",
                                              "rollout_worker_tokens_per_s", "rollout_worker_idle_frac",
                                              "rollout_tail_s", "rollout_early_groups", "refit")})
    finally:
        client.close()
    return out


def summarise(steps: list[dict]) -> dict:
    """Medians over the steps after the first."""
    timed = steps[1:] or steps
    mean = lambda key: statistics.median(s[key] for s in timed)  # noqa: E731
    tps = [s["rollout_worker_tokens_per_s"] for s in timed if s.get("rollout_worker_tokens_per_s")]
    speeds = [statistics.median(w[i] for w in tps) for i in range(len(tps[0]))] if tps else []
    fracs = [s["rollout_worker_idle_frac"] for s in timed if s.get("rollout_worker_idle_frac")]
    idle = [statistics.median(w[i] for w in fracs) for i in range(len(fracs[0]))] if fracs else []
    # rollout_s: the rollout's own wall time (async: it overlaps the step before; the step
    # waits only time_rollout_s for it)
    return {"step_s": mean("time_step_s"), "rollout_s": mean("rollout_wall_s"),
            "wait_s": mean("time_rollout_s"), "train_s": mean("time_train_s"),
            "refit_s": mean("time_refit_s"), "worker_tokens_per_s": speeds, "worker_idle": idle,
            "tail_s": mean("rollout_tail_s"),
            "accepted_len": mean("mean_accepted_len"), "reward": mean("reward_mean")}


# ------------------------------------------------------------------------------------- output


def _median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def table(results: dict, modes: list[str]) -> str:
    """Markdown table: per configuration, median step/rollout/train seconds, per-worker tokens/s,
    and speedups (median of per-round ratios against fixed + spec off, with their range)."""
    base = {r["round"]: r for r in results[BASELINE]}
    lines = ["| mode | spec | step s | rollout s | train s | re-fit s | rollout share | step / max(rollout, train) "
             "| worker tok/s (0 / 1) | worker idle (0 / 1) | tail s | step speedup | rollout speedup |",
             "|---" * 13 + "|"]
    for mode in modes:
        for spec in SPEC_MODES:
            rounds = results.get((mode, spec))
            if not rounds:
                continue
            med = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
            speeds = [statistics.median(r["worker_tokens_per_s"][i] for r in rounds)
                      for i in range(len(rounds[0]["worker_tokens_per_s"]))]
            idle = [statistics.median(r["worker_idle"][i] for r in rounds) for i in range(len(rounds[0]["worker_idle"]))]
            step_x = [base[r["round"]]["step_s"] / r["step_s"] for r in rounds if r["round"] in base]
            roll_x = [base[r["round"]]["rollout_s"] / r["rollout_s"] for r in rounds if r["round"] in base]
            lines.append(f"| {mode} | {spec} | {med('step_s'):.2f} | {med('rollout_s'):.2f} | {med('train_s'):.2f} "
                         f"| {med('refit_s'):.2f} | {med('rollout_s') / med('step_s'):.0%} "
                         f"| {statistics.median(r['step_s'] / max(r['rollout_s'], r['train_s'] + r['refit_s']) for r in rounds):.2f} "
                         f"| {' / '.join(f'{s:.0f}' for s in speeds)} | {' / '.join(f'{f:.0%}' for f in idle)} "
                         f"| {med('tail_s'):.1f} | {_median_range(step_x)} "
                         f"| {_median_range(roll_x)} |")
    return "\n".join(lines)


def paired(results: dict, pairs: list[tuple[tuple, tuple]]) -> str:
    """Markdown table: for each (config, against) pair, the median (range) over rounds of the
    per-round ratios against's step time / config's step time, the same for rollout time, and
    the rounds paired."""
    lines = ["| config | against | step speedup | rollout speedup | rounds |", "|---|---|---|---|---|"]
    for a, b in pairs:
        other = {r["round"]: r for r in results.get(b, [])}
        both = [(other[r["round"]], r) for r in results.get(a, []) if r["round"] in other]
        if both:
            lines.append(f"| {'/'.join(a)} | {'/'.join(b)} | {_median_range([o['step_s'] / r['step_s'] for o, r in both])} "
                         f"| {_median_range([o['rollout_s'] / r['rollout_s'] for o, r in both])} | {len(both)} |")
    return "\n".join(lines)


PAIRS = [(("pull", "off"), ("fixed", "off")), (("pull", "entropy"), ("fixed", "entropy")),
         (("pull+refit", "entropy"), ("pull", "entropy")), (("async-1", "off"), ("pull", "off")),
         (("async-1+partial", "off"), ("async-1", "off")), (("async-1+partial", "entropy"), ("async-1", "entropy")),
         (("pull", "entropy"), ("pull", "off")), (("async-1+partial", "entropy"), ("fixed", "off"))]


def curves_table(curves: dict) -> str:
    lines = ["| run | seed | reward per step | reward, first k -> last k steps | accuracy, last k |",
             "|---|---|---|---|---|"]
    for name, per_seed in curves.items():
        for seed, steps in per_seed.items():
            k = max(1, min(3, len(steps) // 2))
            first = statistics.fmean(s["reward_mean"] for s in steps[:k])
            last = statistics.fmean(s["reward_mean"] for s in steps[-k:])
            acc = statistics.fmean(s["accuracy"] for s in steps[-k:])
            curve = " ".join(f"{s['reward_mean']:.2f}" for s in steps)
            lines.append(f"| {name} | {seed} | {curve} | {first:.3f} -> {last:.3f} (k={k}) | {acc:.2f} |")
    return "\n".join(lines)


def plot_curves(curves: dict, path: str) -> str:
    """Reward per step, one line per seed, one colour per run (the 'curves' of a --json file)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=80, layout="constrained")
    ax = fig.add_subplot()
    for i, (name, per_seed) in enumerate(curves.items()):
        for j, (seed, steps) in enumerate(sorted(per_seed.items())):
            xs = list(range(1, len(steps) + 1))
            ax.plot(xs, [s["reward_mean"] for s in steps], color=f"C{i}", marker="o", markersize=3, alpha=0.8,
                    linestyle=("-", "--", ":")[j % 3], label=f"{name}, seed {seed}")
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean reward")
    ax.set_title("Long-tail task: reward per step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# ------------------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="longtail")
    p.add_argument("--modes", default="fixed,pull,pull+refit,async-1,async-1+partial")
    p.add_argument("--spec-modes", default="off,entropy", help="speculation settings to run each mode with")
    p.add_argument("--configs", default="", help="mode/spec pairs to run instead of every mode x spec "
                   "setting, e.g. fixed/off,pull+refit/entropy (fixed/off, the baseline, is always run)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="RL steps per measurement (the first is not timed)")
    p.add_argument("--threads", default="1,1", help="torch threads of worker 0 and worker 1")
    p.add_argument("--max-batch", default="16,8", help="rows in flight of worker 0 and worker 1 (empty: "
                   "rollout.max_batch for both)")
    p.add_argument("--seed", type=int, default=100, help="round r uses seed + r")
    p.add_argument("--learner-threads", type=int, default=1,
                   help="torch threads of the learner in this process (0: torch's default); on a shared "
                        "CPU, spinning threads lose several-fold")
    p.add_argument("--curve-seeds", type=int, default=3)
    p.add_argument("--curve-steps", type=int, default=10)
    p.add_argument("--curve-runs", default="off,spec", help="which reward curves: off (synchronous fixed "
                   "split, speculation off), spec (speculation + coordinator + async), or both")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--plot-from", default=None, metavar="JSON", help="draw the reward curves of an earlier "
                   "--json file into --plot and print its tables; runs nothing")
    p.add_argument("--plot", default="docs/training/coordinator_reward.png", metavar="PNG")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.plot_from:  # one or more --json files of earlier runs (comma-separated): tables and the plot
        results, curves, modes = {}, {}, []
        for path in args.plot_from.split(","):
            saved = json.loads(Path(path).read_text())
            for key, rounds in saved["rounds"].items():
                mode, spec = key.split("/")
                modes.append(mode)
                seed = saved["args"]["seed"]
                results.setdefault((mode, spec), []).extend({"round": seed + i, **r["summary"]} for i, r in enumerate(rounds))
            curves.update(saved.get("curves", {}))
        if results:
            print(table(results, list(dict.fromkeys(modes))))
            print(paired(results, PAIRS))
        if curves:
            print(curves_table(curves))
            print("wrote", plot_curves(curves, args.plot))
        return 0
    modes = [m for m in args.modes.split(",") if m]
    spec_modes = [m for m in args.spec_modes.split(",") if m]
    configs = [(m, s) for m in modes for s in spec_modes]
    if args.configs:
        configs = [tuple(c.split("/")) for c in args.configs.split(",") if c]
        configs = [BASELINE] * (BASELINE not in configs) + configs
        modes = list(dict.fromkeys(m for m, _ in configs))
    if args.learner_threads:
        torch.set_num_threads(args.learner_threads)
    unequal = [f"rollout.threads_per_worker=[{args.threads}]"]
    if args.max_batch:
        unequal.append(f"rollout.max_batch_per_worker=[{args.max_batch}]")
    cfg = load_config(args.config, ["rollout.num_workers=2", *unequal, *args.overrides])
    if cfg.spec.mode == "off":
        raise SystemExit(f"--config {args.config}: spec.mode is off; the benchmark runs both off and entropy "
                         "and needs the preset's heads settings with speculation on")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # "local": a private cluster, never one another process on this machine started
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    out = {"machine": f"{os.cpu_count()}-core CPU", "threads_per_worker": cfg.rollout.threads_per_worker,
           "max_batch_per_worker": cfg.rollout.max_batch_per_worker, "args": vars(args),
           "rounds": {}, "curves": {}}
    results: dict = {}
    t0 = time.perf_counter()
    try:
        for r in range(args.rounds):
            for mode, spec in configs:
                steps = measure(cfg, mode, spec, args.seed + r, args.steps)
                s = {**summarise(steps), "round": args.seed + r}
                results.setdefault((mode, spec), []).append(s)
                out["rounds"].setdefault(f"{mode}/{spec}", []).append({"summary": s, "steps": steps})
                print(f"round {r} {mode:>10} spec {spec:>7}: step {s['step_s']:.2f}s rollout {s['rollout_s']:.2f}s "
                      f"train {s['train_s']:.2f}s workers tok/s {[round(v) for v in s['worker_tokens_per_s']]} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
                _write(out, args.json)
        if results:
            out["table"] = table(results, modes)
            print(out["table"])
            _write(out, args.json)
        runs = {"off": ("sync fixed, spec off", "fixed", "off"), "spec": ("spec + pull + async-1", "async-1", "entropy")}
        for name, mode, spec in (runs[r] for r in args.curve_runs.split(",") if r):
            for seed in range(args.curve_seeds):
                steps = measure(cfg, mode, spec, seed, args.curve_steps)
                out["curves"].setdefault(name, {})[seed] = steps
                print(f"curve {name} seed {seed}: reward {[round(s['reward_mean'], 3) for s in steps]}", flush=True)
                _write(out, args.json)
        if out["curves"]:
            out["curves_table"] = curves_table(out["curves"])
            print(out["curves_table"])
            _write(out, args.json)
    finally:
        ray.shutdown()
    return 0


def _write(out: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1, default=str))
        os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
