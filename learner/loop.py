"""One RL step end to end (docs/design.md, "Data flow of one RL step"):

rollouts (speculative, through the rollout client) -> rewards (a callable from experiments,
checked row by row) -> advantages and the policy update (Learner.update) -> head re-fit per
schedule -> publish policy and heads together under one new version number.

Determinism: a step's prompts and its rollout seed derive from (seed, step) only, and each of
the group_size samples of a prompt has its own row id (its own random stream), so a run
resumed from a checkpoint at step k reproduces the uninterrupted run from step k+1 on, token for
token, with spec.mode=off or fixed. With spec.mode=entropy the draft depth of each row follows
measured timings, and the emitted tokens depend on the depth (different random draws are
consumed), so an entropy-mode run is exact in distribution but not bit-reproducible.

Bounded staleness (`max_staleness` N >= 1): the rollouts of steps s+1..s+N are submitted
(client.generate_async) before step s trains, each with the version published at that moment,
so the coordinator generates them on the Ray workers while the learner updates; step s trains
on sequences sampled by a policy at most N versions old (checked: an older one fails the step)
against their exact behaviour log-probs (learner/losses.py: the PPO ratio is taken against the
behaviour policy; algo.tis_cap adds truncated importance weights). N = 0 is the synchronous loop.
Versions only depend on the step, never on timing, so an async run is as reproducible as a
synchronous one; `pending_rollouts` / `preload` carry the submitted rollouts across a checkpoint.

`RLLoop` knows nothing about tokenizers or tasks: experiments give it a prompt source and a
reward function. The client is anything with RolloutClient's generate / generate_async /
publish / throughput / report.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import torch

from learner.trainer import Learner, idle_refit
from rollout.types import RolloutBatch, SamplingParams, Sequence, SpecParams
from spec_heads.acceptance import expected_tokens


class RewardError(RuntimeError):
    """The reward function failed, or returned a wrong number of rewards or a non-finite one."""


@dataclass
class StepPrompts:
    prompts: list[list[int]]  # token ids, one entry per prompt (the loop repeats each group_size times)
    texts: list[str]  # the prompt as text, for error messages
    meta: list[Any]  # handed back to the reward function (e.g. the task's Example), one per prompt


# rewards(sequences, meta per sequence) -> one float per sequence
RewardFn = Callable[[list[Sequence], list[Any]], list[float]]


def step_seed(seed: int, step: int) -> int:
    """The rollout / prompt seed of one step: a function of (run seed, step) only."""
    return (int(seed) * 1_000_003 + int(step) * 7_919 + 12_345) % (1 << 62)


def accepted_len_at_full_depth(stats) -> float:
    """Tokens per verify step the heads would give at their full depth K, from the step's
    overall acceptance rate alpha (accepted / tested drafts): (1 - alpha^(K+1)) / (1 - alpha).
    0.0 when nothing was drafted."""
    tested, accepted = sum(stats.drafted_per_pos), sum(stats.accepted_per_pos)
    if not tested:
        return 0.0
    alpha, K = accepted / tested, len(stats.drafted_per_pos)
    return float(K + 1) if alpha >= 1.0 else (1.0 - alpha ** (K + 1)) / (1.0 - alpha)


def heads_after_update(learner: Learner, batch: RolloutBatch, spec: SpecParams, step: int, seed: int) -> dict:
    """The heads' side of step `step`, after the policy update: what the heads give the updated
    policy, and a re-fit on the step's rollouts when the schedule says so (`seed` draws the
    fit's batches). Returns {"accepted_len_full_depth", "heads_acceptance_measured", "refit",
    and the re-fit's metrics}. Publishing is the caller's."""
    stats = batch.stats
    speculating = spec.mode != "off" and learner.heads is not None
    # on_drop watches the heads, not the depth policy: the accepted length itself also moves
    # when entropy mode drafts shallower, so use what the measured acceptance rate predicts
    # at the heads' full depth
    full_len = accepted_len_at_full_depth(stats)
    measured = None
    if speculating and 4 * sum(stats.drafted_per_pos[:1]) < stats.row_steps:
        # The depth policy kept this rollout mostly plain (under a quarter of its row-steps
        # drafted with the heads' context), so it says little about the heads: measure them
        # on held-out rollouts instead, so a drop still triggers a re-fit and the workers
        # learn what drafting would give (else a run that went plain once could stay plain
        # for good).
        measured = learner.measure_heads(batch.sequences)
        if measured:
            full_len = expected_tokens(measured, len(measured))
    refit = learner.should_refit(step, full_len, speculating)
    refit_metrics = learner.refit_heads(batch.sequences, seed) if refit else {}
    return {"accepted_len_full_depth": full_len, "heads_acceptance_measured": measured,
            "refit": bool(refit), **refit_metrics}


class RLLoop:
    def __init__(self, learner: Learner, client, *, prompt_fn: Callable[[int], StepPrompts],
                 reward_fn: RewardFn, task_name: str, sampling: SamplingParams, spec: SpecParams,
                 group_size: int, seed: int, max_staleness: int = 0, last_step: int | None = None):
        self.learner, self.client = learner, client
        self.prompt_fn, self.reward_fn, self.task_name = prompt_fn, reward_fn, task_name
        self.sampling, self.spec, self.group_size, self.seed = sampling, spec, group_size, seed
        self.max_staleness, self.last_step = max_staleness, last_step  # last_step: submit nothing past it
        self._ahead: dict[int, Future] = {}  # step -> its submitted rollout
        self._idle: list = []  # idle-time head fits handed out and not yet taken, oldest first
        r = learner.refit_cfg
        if r.schedule == "idle" and learner.heads is not None and spec.mode != "off":  # off: nothing drafts
            if not hasattr(client, "set_idle_work"):
                raise ValueError("refit.schedule: idle re-fits run on idle Ray rollout workers; set "
                                 "ray.enabled=true and rollout.num_workers >= 2, or another schedule")
            temperature = sampling.temperature
            client.set_idle_work(lambda sequences, seed: (idle_refit, (sequences, r, temperature, seed)))

    def _rows(self, sp: StepPrompts) -> list[list[int]]:
        return [p for p in sp.prompts for _ in range(self.group_size)]  # groups contiguous

    def _rollout(self, step: int, sp: StepPrompts) -> RolloutBatch:
        rows = self._rows(sp)
        if not self.max_staleness:
            return self.client.generate(rows, list(range(len(rows))), self.sampling, self.spec,
                                        step_seed(self.seed, step))
        last = step + self.max_staleness if self.last_step is None else min(self.last_step, step + self.max_staleness)
        for t in range(step, last + 1):
            if t not in self._ahead:
                rows_t = rows if t == step else self._rows(self.prompt_fn(t))
                self._ahead[t] = self.client.generate_async(rows_t, list(range(len(rows_t))), self.sampling,
                                                            self.spec, step_seed(self.seed, t))
        return self._ahead.pop(step).result()

    def _take_idle(self, new) -> dict | None:
        """The newest finished idle-time fit, if any; never waits for one still running (it goes
        out with a later version): the fit stays off the learner's critical path."""
        if new is not None:
            self._idle.append(new)
        done = None
        while self._idle and self.client.idle_ready(self._idle[0]):
            got = self.client.idle_result(self._idle.pop(0))
            done = got if got is not None else done
        return done

    def pending_rollouts(self) -> dict[int, RolloutBatch]:
        """The submitted rollouts of later steps (waits for them): a checkpoint's async state."""
        return {t: fut.result() for t, fut in sorted(self._ahead.items())}

    def preload(self, batches: dict[int, RolloutBatch]) -> None:
        """Take back `pending_rollouts` of a checkpoint (on resume): those steps are not re-generated."""
        for t, batch in batches.items():
            fut: Future = Future()
            fut.set_result(batch)
            self._ahead[int(t)] = fut

    def step(self, step: int) -> dict:
        """Run RL step `step` (1-based); returns its metrics (see experiments/train.py)."""
        t0 = time.perf_counter()
        sp = self.prompt_fn(step)
        batch = self._rollout(step, sp)
        info = dict(batch.report)  # the client's numbers for this very batch (async: an earlier submission)
        for key in ("tokens", "mean_accepted_len"):
            info.pop(key, None)
        idle = info.pop("idle_work", None)  # a head re-fit an idle worker ran in the rollout's tail
        tokens_per_s, speedup = info.pop("tokens_per_s"), info.pop("speedup_vs_off_est")
        staleness = self._staleness(batch)
        t1 = time.perf_counter()
        rewards = self.rewards(batch.sequences, sp)
        upd = self.learner.update(batch.sequences, rewards)
        t2 = time.perf_counter()
        stats = batch.stats
        heads = heads_after_update(self.learner, batch, self.spec, step, step_seed(self.seed, step) + 1)
        done = self._take_idle(idle)
        if done is not None and not done.get("refit_skipped"):
            # the idle workers' fit (from the step's tail) replaces the scheduled one's report
            heads = {"accepted_len_full_depth": heads["accepted_len_full_depth"],
                     "heads_acceptance_measured": heads["heads_acceptance_measured"],
                     "refit": True, **self.learner.take_heads(done)}
        t3 = time.perf_counter()
        self.client.publish(*self.learner.next_version())
        t4 = time.perf_counter()
        lengths = torch.tensor([len(s.tokens) for s in batch.sequences], dtype=torch.float32)
        return {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "accuracy": float((rewards >= 1.0).float().mean()),
            "response_len_mean": float(lengths.mean()),
            "mean_accepted_len": stats.mean_accepted_len, "accept_rate_per_pos": stats.accept_rate_per_pos,
            "depth_hist": stats.depth_hist, "spec_mode": self.spec.mode,
            "rollout_tokens_per_s": tokens_per_s, "speedup_vs_off_est": speedup,
            **upd, **heads,
            "refit_baseline": self.learner.refit_baseline, "refit_level": self.learner.refit_level,
            "policy_version": self.learner.policy_version,
            "time_rollout_s": t1 - t0, "time_train_s": t2 - t1, "time_refit_s": t3 - t2,
            "time_publish_s": t4 - t3, "time_step_s": t4 - t0,
            "rollout_wall_s": stats.time_s, **staleness, **info,
        }

    def _staleness(self, batch: RolloutBatch) -> dict:
        """Versions behind the learner of the policies that sampled the batch; fails past the bound."""
        behind = [self.learner.policy_version - s.policy_version for s in batch.sequences] or [0]
        if max(behind) > self.max_staleness:
            raise RuntimeError(f"rollout: sequences {max(behind)} versions behind the learner (train.max_staleness="
                               f"{self.max_staleness}); stale samples are never trained on")
        return {"staleness_max": max(behind), "staleness_mean": sum(behind) / len(behind)}

    def rewards(self, sequences: list[Sequence], sp: StepPrompts) -> torch.Tensor:
        """[B] checked rewards: an exception, a wrong count or a non-finite value fails the step
        with a message naming the task and the row."""
        G, name = self.group_size, self.task_name
        meta = [sp.meta[i // G] for i in range(len(sequences))]
        try:
            values = self.reward_fn(sequences, meta)
        except RewardError:
            raise
        except Exception as e:
            raise RewardError(f"task {name}: the reward function raised {type(e).__name__}: {e}") from e
        values = list(values)
        if len(values) != len(sequences):
            raise RewardError(f"task {name}: the reward function returned {len(values)} rewards for "
                              f"{len(sequences)} completions; it must return one per completion, in order")
        for i, v in enumerate(values):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok:
                raise RewardError(f"task {name}: reward {v!r} for row {i} (prompt {sp.texts[i // G]!r}, "
                                  f"sample {i % G} of {G}) is not a finite number; fix the reward "
                                  "function so it returns a float for every completion")
        return torch.tensor(values, dtype=torch.float32)
