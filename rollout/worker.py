"""Rollout workers: a plain `RolloutWorker` around one Engine, its Ray actor, and a client.

`RolloutWorker` does the work and knows nothing about Ray: it holds a policy and its draft
heads under ONE version number, swaps both together (`set_weights` refuses an update of one
without the other, so a worker never drafts with heads of another version than its policy),
and stamps that version on every sequence it generates.

`serve(item)` is the pull path (rollout/coordinator.py): it generates one work item (a GRPO
group) and is thread-safe, so a threaded Ray actor takes several items at once and they share
one engine run: a freed row takes the next waiting item's rows (continuous batching across
items). The thin actor is `ray.remote(RolloutWorker)` (OpenRLHF's `RolloutRayActor` pattern);
`RolloutClient` is the in-process path (`ray.enabled=false`, one worker), which gives the same
sequences as the coordinator's actors for the same seed.

This module knows nothing about tokenizers, tasks, rewards or optimisers.
"""
from __future__ import annotations

import copy
import math
import os
import threading
from concurrent.futures import Future

import ray
import torch

from rollout.checkpoint import load_checkpoint
from rollout.device import resolve_device, resolve_dtype
from rollout.engine import Engine
from rollout.inbox import ItemInbox
from rollout.model import ModelConfig, Transformer
from rollout.types import (ItemResult, RolloutBatch, RolloutConfig, RolloutStats, SamplingParams, SpecParams,
                           WorkItem)
from spec_heads.estimators import CostModel
from spec_heads.heads import DraftHeads, HeadConfig

# how long a weight swap waits for the engine thread to close its last run (its groups are back)
SWAP_WAIT_S = 30.0


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state, what a publish ships to the workers."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class RolloutWorker(ItemInbox):
    """One Engine serving rollouts for one policy version.

    model: a checkpoint folder / named model, or a ModelConfig with its `policy_state`.
    heads: the draft-head architecture (None: no speculation on this worker);
    heads_state: their weights (None: freshly initialised heads, fine only for mode=off).
    version: the version of the weights given here (policy and heads together).
    """

    def __init__(self, model: str | ModelConfig, heads: HeadConfig | None, rollout: RolloutConfig, *,
                 policy_state: dict | None = None, heads_state: dict | None = None, version: int = 0):
        self.device = resolve_device(rollout.device)
        self.dtype = resolve_dtype(rollout.dtype, self.device)
        if self.device.type == "cpu":
            # a Ray actor starts with one intra-op thread (OMP_NUM_THREADS=1); generation on a
            # CPU wants the cores that rollouts own while the learner waits for them
            torch.set_num_threads(rollout.threads or max(1, (os.cpu_count() or 1) // rollout.num_workers))
        if isinstance(model, ModelConfig):
            if policy_state is None:
                raise ValueError("policy_state: a worker built from a ModelConfig needs its weights; "
                                 "pass policy_state, or a checkpoint folder as model")
            policy = Transformer(model)
            policy.load_state_dict(policy_state)
            policy.to(device=self.device, dtype=self.dtype)
        else:
            policy = load_checkpoint(str(model), device=self.device, dtype=self.dtype)
        draft = None
        if heads is not None:
            draft = DraftHeads(heads, policy.config)
            if heads_state is not None:
                draft.load_state_dict(heads_state)
            draft.to(device=self.device, dtype=self.dtype)
        self.engine = Engine(policy, draft, max_batch=rollout.max_batch,
                             max_len=rollout.max_seq_len or None, device=self.device)
        self.version = int(version)
        self.engine.policy_version = self.version
        self._last = RolloutStats()
        self._last_speedup = 1.0
        # the pull path: items waiting for rows, whether the engine thread runs, which step it
        # serves, and each step's merged engine stats until the coordinator takes them
        self._init_inbox()
        self._step_stats: dict[int, tuple[RolloutStats, SpecParams | None]] = {}
        self._idle_lock = threading.Lock()

    # ----------------------------------------------------------------- weights
    @torch.no_grad()
    def set_weights(self, version: int, policy_state: dict, heads_state: dict | None, *,
                    rewind: bool = False) -> int:
        """Swap policy and heads together to `version` (which must be newer than the current
        one, unless `rewind`: the coordinator's re-queue of an older step's group after a fault,
        rollout.partial). Returns the new version."""
        if policy_state is None:
            raise ValueError("policy_state: a heads-only update would leave the heads one version "
                             "ahead of the policy; publish policy and heads together")
        if self.engine.heads is not None and heads_state is None:
            raise ValueError("heads_state: a policy-only update would leave the draft heads stale "
                             f"(version {self.version}); publish policy and heads together")
        if self.engine.heads is None and heads_state is not None:
            raise ValueError("heads_state: this worker was built without draft heads (heads=None); "
                             "build it with a HeadConfig to receive heads")
        with self._idle_lock:  # an idle-time job copies these weights as it starts: swap after the copy
            return self._set_weights(version, policy_state, heads_state, rewind)

    def _set_weights(self, version: int, policy_state: dict, heads_state: dict | None, rewind: bool) -> int:
        with self._cond:  # the engine thread may still be closing the run whose last group just returned
            self._cond.wait_for(lambda: not self._draining, timeout=SWAP_WAIT_S)
            if self._draining:
                raise RuntimeError(f"set_weights: version {version} arrived while this worker is generating; "
                                   "weights swap only between steps (a coordinator bug)")
        if int(version) <= self.version and not (rewind and int(version) != self.version):
            raise ValueError(f"version: {version} is not newer than the worker's {self.version}; "
                             "versions must increase with every publish")
        self.engine.model.load_state_dict(policy_state)
        heads = self.engine.heads
        if heads is not None:
            own = heads.state_dict()
            changed = any(not torch.equal(own[k].cpu(), v.to(own[k].dtype).cpu()) for k, v in heads_state.items())
            heads.load_state_dict(heads_state)
            if changed:
                # the acceptance table described the old heads (or their old measurement);
                # timings stay valid
                self.engine.reset_calibration()
        self.version = int(version)
        self.engine.policy_version = self.version
        return self.version

    def node_id(self) -> str | None:
        """The Ray node this worker runs on (None outside Ray)."""
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def versions(self) -> dict:
        """The version of the policy and of the heads this worker serves (always equal)."""
        return {"policy": self.engine.policy_version, "heads": self.version}

    # -------------------------------------------------------------- generation
    def generate(self, prompts: list[list[int]], sampling: SamplingParams, spec: SpecParams | None,
                 seed: int, ids: list[int] | None = None, **pull) -> RolloutBatch:
        """`pull`: the engine's feed / on_finish / max_prompt_len (see Engine.generate)."""
        self.engine.policy_version = self.version  # every sequence carries the weights' version
        batch = self.engine.generate(prompts, sampling, spec, seed=seed, ids=ids, **pull)
        self._last = batch.stats
        self._last_speedup = self._speedup_estimate(batch.stats, spec)
        return batch

    # ------------------------------------------------------------ pull work (rollout.inbox)
    def _take(self) -> tuple[WorkItem, Future]:
        """A run starts from the first waiting item; more join it while they fit (`_run`'s feed):
        concurrent items share one engine run as rows free up."""
        return self._inbox.popleft()

    def _serve_run(self, first: WorkItem, first_fut: Future) -> None:
        pending: dict[int, tuple[WorkItem, Future, dict]] = {}  # item key -> (item, future, rows done)
        owner: dict[int, int] = {}  # row id -> item key

        def admit(item: WorkItem, fut: Future) -> None:
            pending[item.key] = (item, fut, {})
            owner.update((i, item.key) for i in item.ids)

        def feed(rows: int) -> list[tuple[list[int], int]]:
            out = []
            with self._cond:
                while rows > 0 and self._inbox and _same_run(self._inbox[0][0], first):
                    item, fut = self._inbox.popleft()
                    admit(item, fut)
                    rows -= len(item.ids)
                    out += list(zip(item.prompts, item.ids))
            return out

        def on_finish(seq) -> None:
            key = owner[seq.prompt_id]
            item, fut, done = pending[key]
            done[seq.prompt_id] = seq
            if len(done) == len(item.ids):
                del pending[key]
                fut.set_result(ItemResult(key, [done[i] for i in item.ids]))

        admit(first, first_fut)
        try:
            if first.version != self.version:
                raise RuntimeError(f"rollout: item {first.key} needs version {first.version}, this worker "
                                   f"serves {self.version}; the coordinator publishes before a step")
            batch = self.generate(first.prompts, first.sampling, first.spec, first.seed, first.ids, feed=feed,
                                  on_finish=on_finish, max_prompt_len=first.max_prompt_len)
            with self._cond:
                old = self._step_stats.get(first.step)
                self._step_stats[first.step] = (batch.stats if old is None else old[0].merge(batch.stats), first.spec)
        except BaseException as e:  # every waiting caller learns why
            for _, fut, _ in pending.values():
                if not fut.done():
                    fut.set_exception(e)
            if not isinstance(e, Exception):
                raise

    def step_stats(self, step: int) -> dict | None:
        """{"stats": the merged engine stats of `step`'s runs on this worker, "speedup": their
        estimated speedup over speculation off}, once the runs have ended; then forgotten."""
        with self._cond:
            self._cond.wait_for(lambda: self._run_step != step)
            got = self._step_stats.pop(step, None)
        if got is None:
            return None
        return {"stats": got[0], "speedup": self._speedup_estimate(*got)}

    def run_idle(self, fn, *args):
        """Idle-time work the coordinator hands a worker whose queue ran dry: fn(policy, heads,
        *args) on copies of the worker's policy and heads as they are now, so the worker takes new
        weights and new rows while it runs (a copy of the policy is the memory this costs)."""
        with self._idle_lock:
            policy, heads = copy.deepcopy(self.engine.model), copy.deepcopy(self.engine.heads)
        return fn(policy, heads, *args)

    def throughput(self) -> dict:
        """Numbers of the last generate call: tokens, time_s, tokens_per_s, mean_accepted_len,
        speedup_vs_off_est (see `_speedup_estimate`)."""
        s = self._last
        return {"tokens": s.tokens, "time_s": s.time_s, "tokens_per_s": s.tokens_per_s,
                "mean_accepted_len": s.mean_accepted_len, "speedup_vs_off_est": self._last_speedup}

    def _speedup_estimate(self, stats: RolloutStats, spec: SpecParams | None) -> float:
        """Estimated rollout speedup over the same engine with speculation off.

        tokens per row-step (mean accepted length) / the average cost of a row-step relative to
        a plain one-token step, where a step that verified 1 + k tokens costs
        step_time(rows, 1 + k) / step_time(rows, 1) under the depth policy's measured cost
        model, at the run's average rows in flight and weighted by the depth histogram. An
        estimate: the real batch drains over the rollout and steps verify the batch's deepest
        draft. 1.0 without speculation.
        """
        policy = self.engine.depth_policy
        if spec is None or spec.mode == "off" or policy is None or not stats.row_steps or not stats.depth_hist:
            return 1.0
        cost: CostModel = policy.cost
        rows = min(max(1, round(stats.row_steps / max(stats.steps, 1))), cost.max_batch)
        plain = cost.step_time(rows, 1)
        hist = stats.depth_hist
        total = sum(hist)
        if not total or not plain > 0:
            return 1.0
        rel = sum(n * cost.step_time(rows, min(1 + k, cost.max_tokens)) / plain for k, n in enumerate(hist)) / total
        est = stats.mean_accepted_len / rel
        return est if math.isfinite(est) else 1.0


RolloutWorkerActor = ray.remote(RolloutWorker)


def _same_run(item: WorkItem, first: WorkItem) -> bool:
    """Whether `item` may join `first`'s engine run: one seed, sampling, spec and version per run."""
    return (item.step == first.step and item.seed == first.seed and item.version == first.version
            and item.sampling == first.sampling and item.spec == first.spec
            and item.max_prompt_len <= first.max_prompt_len)


class RolloutClient:
    """One in-process worker (ray.enabled=false): the coordinator's interface without Ray.

    Built from the learner's weights: model_config + policy_state (CPU tensors), the heads'
    config + state, and the version they carry.
    """

    def __init__(self, model_config: ModelConfig, policy_state: dict, heads: HeadConfig | None,
                 heads_state: dict | None, rollout: RolloutConfig, *, version: int = 0):
        if rollout.num_workers != 1:
            raise ValueError(f"rollout.num_workers: {rollout.num_workers} workers need Ray; "
                             "set ray.enabled=true or rollout.num_workers=1")
        self.version = int(version)
        self.worker = worker_class(rollout)(model_config, heads, rollout, policy_state=policy_state,
                                    heads_state=heads_state, version=version)
        self.workers = [self.worker]
        self._report: dict = {}

    def publish(self, version: int, policy_state: dict, heads_state: dict | None) -> None:
        """Swap policy and heads to `version` together."""
        self.worker.set_weights(version, policy_state, heads_state)
        self.version = int(version)

    def versions(self) -> list[dict]:
        return [self.worker.versions()]

    def generate(self, prompts: list[list[int]], ids: list[int], sampling: SamplingParams,
                 spec: SpecParams | None, seed: int) -> RolloutBatch:
        """Sequences in prompt order, sampled by the current version."""
        if len(ids) != len(prompts):
            raise ValueError(f"ids: {len(ids)} ids for {len(prompts)} prompts; give one id per prompt")
        if not prompts:
            return RolloutBatch([], RolloutStats())
        batch = self.worker.generate(prompts, sampling, spec, seed, ids)
        self._report = {"rollout_worker_tokens_per_s": [batch.stats.tokens_per_s],
                        "rollout_worker_idle_frac": [0.0], "rollout_tail_s": 0.0, "rollout_queue_wait_s": 0.0,
                        "rollout_faults": 0, "rollout_workers_alive": 1}
        batch.report = {**self.throughput(), **self._report}
        return batch

    def generate_async(self, prompts, ids, sampling, spec, seed) -> Future:
        """In process there is nothing to overlap with: generates now, returns a done future."""
        fut: Future = Future()
        fut.set_result(self.generate(prompts, ids, sampling, spec, seed))
        return fut

    def report(self) -> dict:
        """The last step's per-worker numbers (see rollout/coordinator.py)."""
        return dict(self._report)

    def throughput(self) -> dict:
        info = self.worker.throughput()
        return {k: info[k] for k in ("tokens", "tokens_per_s", "mean_accepted_len", "speedup_vs_off_est")}

    def close(self) -> None:
        self.workers = []


def worker_class(rollout: RolloutConfig) -> type:
    """RolloutWorker, or for rollout.backend=vllm the vLLM-backed worker with the same interface."""
    if rollout.backend == "specroll":
        return RolloutWorker
    try:
        from rollout.vllm_worker import VllmRolloutWorker
    except ImportError as e:
        raise ImportError(f"rollout.backend=vllm: vLLM is not importable ({e}); install the extra "
                          "(pip install specroll[vllm], or scripts/test_vllm.sh's venv), or set "
                          "rollout.backend=specroll") from None
    return VllmRolloutWorker

