"""`specroll train`: RL-train a policy with speculative rollouts (GRPO or PPO).

Start-up: resolve the config (for `resume=RUN_DIR`, that run's saved config.yaml with the
command line's overrides on top), print it and save it to run_dir/config.yaml; start Ray when
ray.enabled; build the tiny policy and fit draft heads if they are missing; load the latest
checkpoint when resuming. Then one RL step per train step (learner/loop.py), a progress bar
with one line per step, metrics to run_dir/metrics.jsonl + TensorBoard, checkpoints every
train.checkpoint_every steps and at the end, and PNG plots in run_dir/plots.

Metrics per step (metrics.jsonl): reward_mean, reward_std, accuracy (share of completions with
the full reward 1.0, i.e. correct answers), response_len_mean, mean_accepted_len (tokens per row
per verify step, the engine's count: just over 1.0 without speculation, since the token sampled
at prefill takes no step), accept_rate_per_pos, depth_hist, spec_mode,
rollout_tokens_per_s, speedup_vs_off_est (rollout/worker.py: mean accepted length over the
depth policy's measured relative step cost; an estimate, the measured ratio comes from
`specroll bench` or a spec.mode=off run), loss, pg_loss, grad_norm, kl, approx_kl, clipfrac,
entropy_mean, logprob_diff_max/_mean (learner recompute vs rollout), refit (+ refit_loss,
refit_accept_before/_after on held-out rollouts, refit_kept: false when the fit lost acceptance
and the old heads were kept), refit_baseline, policy_version, time_rollout_s / time_train_s /
time_refit_s / time_publish_s / time_step_s, and the rollout's own numbers (docs/coordinator.md):
rollout_wall_s, rollout_worker_tokens_per_s / rollout_worker_idle_frac (per worker),
rollout_tail_s, rollout_queue_wait_s, rollout_faults, rollout_workers_alive, staleness_max /
staleness_mean (train.max_staleness: async rollouts; time_rollout_s is then the wait for them).

Reproducibility: resuming reproduces the uninterrupted run exactly with spec.mode=off or fixed;
with spec.mode=entropy the draft depths follow live timings, so tokens differ run to run (each
run is still exact in distribution).
"""
from __future__ import annotations

import dataclasses
import os
import json
import sys
import time
from pathlib import Path

import torch

from experiments.config import (Config, ConfigError, config_from_yaml, format_config, load_config,
                                save_config)
from learner.loop import RewardError, StepPrompts, step_seed

CONFIG_FILE = "config.yaml"


def run(cfg: Config, overrides: list[str] | None = None) -> dict | int:
    """Train per `cfg`; returns a summary dict (or 1 when a step failed: the message says why and
    how to resume). `overrides`: the command line's key=value list, re-applied on top of the saved
    config when resuming (None: every value that differs from the defaults counts as one)."""
    if cfg.resume:
        cfg = resume_config(cfg, overrides)
    run_dir = Path(cfg.run_dir)
    _check_run_dir(cfg, run_dir)
    print(format_config(cfg), end="", flush=True)
    # resume is an action, not a property of the run: the saved config starts this run afresh
    save_config(dataclasses.replace(cfg, resume=""), run_dir / CONFIG_FILE)
    started_ray = _init_ray(cfg)
    try:
        return _train(cfg, run_dir)
    finally:
        if started_ray:
            import ray

            ray.shutdown()


# ---------------------------------------------------------------------------------- config


def resume_config(cfg: Config, overrides: list[str] | None) -> Config:
    """The saved config of run `cfg.resume`, with the overrides applied; its run dir is kept."""
    run_dir = Path(cfg.resume).expanduser()
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"resume: {run_dir} holds no {CONFIG_FILE}; give a run directory written by "
                          "`specroll train` (e.g. resume=runs/default)")
    if overrides is None:
        overrides = _differences(cfg, load_config("default", []))
    keep = [o for o in overrides if o.split("=", 1)[0] not in ("resume", "name", "out_dir")]
    fixed = [f"resume={json.dumps(str(run_dir))}", f"name={json.dumps(run_dir.name)}",
             f"out_dir={json.dumps(str(run_dir.parent))}"]
    config_from_yaml(run_dir)  # a broken saved config fails here, naming its file
    return load_config(str(run_dir / CONFIG_FILE), keep + fixed)


def _differences(cfg, default, prefix: str = "") -> list[str]:
    """key=value for every leaf where cfg differs from default (values JSON-quoted, so strings
    like "off" stay strings)."""
    out = []
    for f in dataclasses.fields(cfg):
        a, b = getattr(cfg, f.name), getattr(default, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(a):
            out += _differences(a, b, key + ".")
        elif a != b:
            out.append(f"{key}={json.dumps(a)}")
    return out


def _check_run_dir(cfg: Config, run_dir: Path) -> None:
    if cfg.resume:
        return
    metrics = run_dir / "metrics.jsonl"
    if (metrics.is_file() and metrics.stat().st_size > 0) or (run_dir / "checkpoints").is_dir():
        raise ConfigError(f"name: {run_dir} already holds a run; continue it with `specroll train "
                          f"resume={run_dir}`, or start a new one with name=<new name>")


def _init_ray(cfg: Config) -> bool:
    if not cfg.ray.enabled:
        return False
    import ray

    if ray.is_initialized():  # e.g. a sweep trial inside a running driver
        return False
    address = cfg.ray.address or None
    if address is None:  # a private cluster of this process: no token to manage (opt back in by setting it)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address=address, num_cpus=None if address else (cfg.ray.num_cpus or None),
             include_dashboard=False)
    return True


# ---------------------------------------------------------------------------------- training


class TaskReward:
    """rewards(sequences, examples): decode each completion and score it with the task; an
    exception names the task and the row."""

    def __init__(self, task, tok):
        self.task, self.tok = task, tok

    def __call__(self, sequences, examples) -> list[float]:
        out = []
        for i, (seq, ex) in enumerate(zip(sequences, examples)):
            text = self.tok.decode(seq.tokens)
            try:
                out.append(float(self.task.reward(text, ex)))
            except Exception as e:
                raise RewardError(f"task {self.task.name}: reward raised {type(e).__name__} on row {i} "
                                  f"(prompt {ex.prompt!r}, completion {text[:120]!r}): {e}") from e
        return out


def _setup(cfg: Config):
    """Policy folder, tokenizer, task, learner (with the latest checkpoint when resuming)."""
    from experiments.fit_heads import ensure_heads, policy_dir
    from experiments.tasks import make_task
    from experiments.tokenizer import TextTokenizer
    from learner.trainer import Learner
    from rollout.checkpoint import load_checkpoint
    from rollout.device import resolve_device, resolve_dtype
    from spec_heads.heads import DraftHeads

    model_dir = policy_dir(cfg)
    tok = TextTokenizer.from_dir(model_dir)
    task = make_task(cfg.task, chat=tok.apply_chat)
    device = resolve_device(cfg.model.device)
    policy = load_checkpoint(model_dir, device=device, dtype=resolve_dtype(cfg.model.dtype, device))
    heads, heads_dir = None, None
    if cfg.spec.mode != "off":  # without speculation the heads are never used
        heads_dir = ensure_heads(cfg, model_dir)
        heads, _ = DraftHeads.load(heads_dir, policy.config, device=device, dtype=torch.float32)
    stops = sorted(set(cfg.sampling.stop_token_ids) | {tok.eos_id})
    sampling = dataclasses.replace(cfg.sampling, stop_token_ids=stops)
    try:
        learner = Learner(policy, heads, algo=cfg.algo, train=cfg.train, refit=cfg.refit, sampling=sampling)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return model_dir, heads_dir, tok, task, sampling, learner


def _train(cfg: Config, run_dir: Path) -> dict | int:
    from tqdm.auto import tqdm

    from experiments.metrics import MetricsLogger
    from learner.checkpointing import latest_checkpoint, load_run_checkpoint, save_run_checkpoint
    from learner.loop import RLLoop
    from learner.trainer import NonFiniteError, cpu_state
    from rollout.worker import RolloutClient
    if cfg.ray.enabled:
        from rollout.coordinator import Coordinator, ResourceError

    t_start = time.perf_counter()
    model_dir, heads_dir, tok, task, sampling, learner = _setup(cfg)
    start, ahead = 0, {}
    checkpoint = latest_checkpoint(run_dir) if cfg.resume else None
    if checkpoint is not None:
        state = load_run_checkpoint(checkpoint, learner)
        start, ahead = int(state["step"]), state["async_rollouts"]
        print(f"resuming {run_dir} from {checkpoint} (step {start}, policy version {learner.policy_version})")
    elif cfg.resume:  # killed before its first checkpoint: nothing to load, its logged steps are redone
        print(f"resuming {run_dir}: it stopped before its first checkpoint, so it restarts from step 0 "
              "(the steps it logged are discarded)")
    heads = learner.heads
    weights = (learner.policy.config, cpu_state(learner.policy), heads.config if heads else None, cpu_state(heads),
               cfg.rollout)
    if cfg.ray.enabled:
        try:
            client = Coordinator(*weights, version=learner.policy_version)
        except ResourceError as e:
            raise ConfigError(str(e)) from None
    else:
        client = RolloutClient(*weights, version=learner.policy_version)

    def prompts(step: int) -> StepPrompts:
        examples = task.train_prompts(cfg.train.prompts_per_step, seed=step_seed(cfg.seed, step))
        return StepPrompts([tok.encode(ex.prompt) for ex in examples], [ex.prompt for ex in examples], examples)

    loop = RLLoop(learner, client, prompt_fn=prompts, reward_fn=TaskReward(task, tok), task_name=task.name,
                  sampling=sampling, spec=cfg.spec, group_size=cfg.algo.group_size, seed=cfg.seed,
                  max_staleness=cfg.train.max_staleness, last_step=cfg.train.steps)
    loop.preload({t: b for t, b in ahead.items() if t <= cfg.train.steps})
    extra = {"model_dir": model_dir, "heads_dir": heads_dir}
    history: list[dict] = []
    step = start
    with MetricsLogger(run_dir, resume_step=start if cfg.resume else None) as logger, \
            tqdm(total=cfg.train.steps, initial=start, desc=f"train {cfg.name}", unit="step",
                 dynamic_ncols=True) as bar:
        try:
            for step in range(start + 1, cfg.train.steps + 1):
                metrics = loop.step(step)
                history.append({"step": step, **metrics})
                logger.log(step, metrics)
                line = progress_line(step, cfg.train.steps, metrics)
                bar.set_postfix_str(line.split(": ", 1)[1], refresh=False)
                bar.update(1)
                if step % cfg.train.log_every == 0:
                    tqdm.write(line)
                every = cfg.train.checkpoint_every
                if (every and step % every == 0) or step == cfg.train.steps:
                    save_run_checkpoint(run_dir, step, learner, tokenizer_dir=model_dir, extra=extra,
                                        async_rollouts=loop.pending_rollouts())
        except (NonFiniteError, RewardError) as e:
            last = latest_checkpoint(run_dir)
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            print(f"error: step {step}: {e}\n{where}; after fixing the cause, continue with "
                  f"`specroll train resume={run_dir}`", file=sys.stderr)
            return 1
        finally:
            client.close()
    return _finish(cfg, run_dir, history, time.perf_counter() - t_start)


def progress_line(step: int, steps: int, m: dict) -> str:
    return (f"step {step}/{steps}: reward {m['reward_mean']:.3f} acc {m['accuracy']:.2f} "
            f"accepted {m['mean_accepted_len']:.2f} tok/s {m['rollout_tokens_per_s']:.0f} "
            f"speedup~{m['speedup_vs_off_est']:.2f}x time roll/train/refit "
            f"{m['time_rollout_s']:.1f}/{m['time_train_s']:.1f}/{m['time_refit_s']:.1f}s"
            + (" [re-fit]" if m["refit"] else ""))


def _finish(cfg: Config, run_dir: Path, history: list[dict], wall_s: float) -> dict:
    from experiments.plots import plot_runs

    plots = plot_runs([str(run_dir)]) if (run_dir / "metrics.jsonl").is_file() else []
    summary = {"run_dir": str(run_dir), "wall_s": wall_s, "steps_run": len(history),
               "refit_steps": [h["step"] for h in history if h["refit"]], "plots": plots}
    if history:
        k = max(1, min(3, len(history) // 3))
        mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        for key in ("reward_mean", "accuracy", "mean_accepted_len"):
            summary[f"{key}_first"] = mean(history[:k], key)
            summary[f"{key}_last"] = mean(history[-k:], key)
        print(f"done in {wall_s:.0f}s: reward {summary['reward_mean_first']:.3f} -> "
              f"{summary['reward_mean_last']:.3f}, accuracy {summary['accuracy_first']:.2f} -> "
              f"{summary['accuracy_last']:.2f}, accepted length {summary['mean_accepted_len_first']:.2f} -> "
              f"{summary['mean_accepted_len_last']:.2f} (means of the first/last {k} steps), "
              f"re-fits at steps {summary['refit_steps'] or 'none'}; plots in {run_dir / 'plots'}")
    return summary
