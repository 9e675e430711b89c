"""Rollout workers: a plain `RolloutWorker` around one Engine, its Ray actor, and a client.

`RolloutWorker` does the work and knows nothing about Ray: it holds a policy and its draft
heads under ONE version number, swaps both together (`set_weights` refuses an update of one
without the other, so a worker never drafts with heads of another version than its policy),
and stamps that version on every sequence it generates.

`RolloutWorkerActor = ray.remote(RolloutWorker)` is the thin actor (OpenRLHF's
`RolloutRayActor` pattern). `RolloutClient` hides whether there are N actors (`ray.enabled=
true`) or one in-process worker (`ray.enabled=false`): the same worker code runs either way, so
both give identical sequences for the same seed. Client methods that return object refs end in
`_async`. Prompts are split into contiguous chunks, one per worker; a later pull-based
coordinator replaces the split behind the same `generate` signature.

This module knows nothing about tokenizers, tasks, rewards or optimisers.
"""
from __future__ import annotations

import os

import math

import ray
import torch

from rollout.checkpoint import load_checkpoint
from rollout.device import resolve_device, resolve_dtype
from rollout.engine import Engine
from rollout.model import ModelConfig, Transformer
from rollout.types import RolloutBatch, RolloutConfig, RolloutStats, SamplingParams, SpecParams
from spec_heads.depth import CostModel
from spec_heads.heads import DraftHeads, HeadConfig

def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state, what a publish ships to the workers."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class RolloutWorker:
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

    # ----------------------------------------------------------------- weights
    @torch.no_grad()
    def set_weights(self, version: int, policy_state: dict, heads_state: dict | None) -> int:
        """Swap policy and heads together to `version` (which must be newer than the current
        one). Returns the new version."""
        if policy_state is None:
            raise ValueError("policy_state: a heads-only update would leave the heads one version "
                             "ahead of the policy; publish policy and heads together")
        if self.engine.heads is not None and heads_state is None:
            raise ValueError("heads_state: a policy-only update would leave the draft heads stale "
                             f"(version {self.version}); publish policy and heads together")
        if self.engine.heads is None and heads_state is not None:
            raise ValueError("heads_state: this worker was built without draft heads (heads=None); "
                             "build it with a HeadConfig to receive heads")
        if int(version) <= self.version:
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

    def versions(self) -> dict:
        """The version of the policy and of the heads this worker serves (always equal)."""
        return {"policy": self.engine.policy_version, "heads": self.version}

    # -------------------------------------------------------------- generation
    def generate(self, prompts: list[list[int]], sampling: SamplingParams, spec: SpecParams | None,
                 seed: int, ids: list[int] | None = None) -> RolloutBatch:
        self.engine.policy_version = self.version  # every sequence carries the weights' version
        batch = self.engine.generate(prompts, sampling, spec, seed=seed, ids=ids)
        self._last = batch.stats
        self._last_speedup = self._speedup_estimate(batch.stats, spec)
        return batch

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


class RolloutClient:
    """N Ray actors (use_ray=True) or one in-process worker, behind one interface.

    Built from the learner's weights: model_config + policy_state (CPU tensors), the heads'
    config + state, and the version they carry. Each publish puts the state into the object
    store ONCE and hands the same ref to every actor.
    """

    def __init__(self, model_config: ModelConfig, policy_state: dict, heads: HeadConfig | None,
                 heads_state: dict | None, rollout: RolloutConfig, *, version: int = 0,
                 use_ray: bool = False, num_cpus_per_worker: float = 1.0):
        self.use_ray, self.version = use_ray, int(version)
        self.num_workers = rollout.num_workers
        if not use_ray:
            if rollout.num_workers != 1:
                raise ValueError(f"rollout.num_workers: {rollout.num_workers} workers need Ray; "
                                 "set ray.enabled=true or rollout.num_workers=1")
            self.workers = [_worker_class(rollout)(model_config, heads, rollout, policy_state=policy_state,
                                                   heads_state=heads_state, version=version)]
            return
        if not ray.is_initialized():
            raise RuntimeError("ray: not initialised; call ray.init() first (specroll train does it "
                               "when ray.enabled=true)")
        gpus = 1 if resolve_device(rollout.device).type == "cuda" else 0
        policy_ref, heads_ref = ray.put(policy_state), ray.put(heads_state)
        cls = RolloutWorkerActor if rollout.backend == "specroll" else ray.remote(_worker_class(rollout))
        actor = cls.options(num_cpus=num_cpus_per_worker, num_gpus=gpus)
        # refs as top-level arguments: Ray resolves them in each actor, one copy in the store
        self.workers = [actor.remote(model_config, heads, rollout, policy_state=policy_ref,
                                     heads_state=heads_ref, version=version)
                        for _ in range(rollout.num_workers)]
        ray.get([w.versions.remote() for w in self.workers])  # surface start-up errors here

    # ----------------------------------------------------------------- publish
    def publish_async(self, version: int, policy_state: dict, heads_state: dict | None) -> list:
        """Start swapping every worker to `version`; returns the refs (or the new versions)."""
        if not self.use_ray:
            return [w.set_weights(version, policy_state, heads_state) for w in self.workers]
        policy_ref, heads_ref = ray.put(policy_state), ray.put(heads_state)
        return [w.set_weights.remote(version, policy_ref, heads_ref) for w in self.workers]

    def publish(self, version: int, policy_state: dict, heads_state: dict | None) -> None:
        """Swap policy and heads on every worker to `version` and wait for all of them."""
        refs = self.publish_async(version, policy_state, heads_state)
        if self.use_ray:
            ray.get(refs)
        self.version = int(version)

    def versions(self) -> list[dict]:
        if not self.use_ray:
            return [w.versions() for w in self.workers]
        return ray.get([w.versions.remote() for w in self.workers])

    # -------------------------------------------------------------- generation
    def generate_async(self, prompts: list[list[int]], ids: list[int], sampling: SamplingParams,
                       spec: SpecParams | None, seed: int) -> list:
        """One ref per non-empty chunk (Ray), or the finished batches (in-process)."""
        if len(ids) != len(prompts):
            raise ValueError(f"ids: {len(ids)} ids for {len(prompts)} prompts; give one id per prompt")
        chunks = _split(len(prompts), len(self.workers))
        calls = [(w, prompts[a:b], ids[a:b]) for w, (a, b) in zip(self.workers, chunks) if b > a]
        if not self.use_ray:
            return [w.generate(p, sampling, spec, seed, i) for w, p, i in calls]
        return [w.generate.remote(p, sampling, spec, seed, i) for w, p, i in calls]

    def generate(self, prompts: list[list[int]], ids: list[int], sampling: SamplingParams,
                 spec: SpecParams | None, seed: int) -> RolloutBatch:
        """Sequences in prompt order; stats merged (time_s is the slowest worker's, since
        workers run side by side)."""
        parts = self.generate_async(prompts, ids, sampling, spec, seed)
        batches: list[RolloutBatch] = ray.get(parts) if self.use_ray else parts
        if not batches:
            return RolloutBatch([], RolloutStats())
        stats = batches[0].stats
        for b in batches[1:]:
            stats = stats.merge(b.stats)
        stats.time_s = max(b.stats.time_s for b in batches)
        sequences = [s for b in batches for s in b.sequences]
        stale = {s.policy_version for s in sequences} - {self.version}
        if stale:
            raise RuntimeError(f"rollout: sequences carry policy versions {sorted(stale)}, expected "
                               f"{self.version}; a worker missed a publish")
        return RolloutBatch(sequences, stats)

    def throughput(self) -> dict:
        """The workers' last-call numbers, tokens-weighted (tokens_per_s: summed)."""
        infos = ([w.throughput() for w in self.workers] if not self.use_ray
                 else ray.get([w.throughput.remote() for w in self.workers]))
        tokens = sum(i["tokens"] for i in infos)
        weight = lambda key: (sum(i[key] * i["tokens"] for i in infos) / tokens) if tokens else 1.0
        return {"tokens": tokens, "tokens_per_s": sum(i["tokens_per_s"] for i in infos),
                "mean_accepted_len": weight("mean_accepted_len"),
                "speedup_vs_off_est": weight("speedup_vs_off_est")}

    def close(self) -> None:
        if self.use_ray:
            for w in self.workers:
                ray.kill(w)
        self.workers = []


def _worker_class(rollout: RolloutConfig) -> type:
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


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [a, b) chunks of range(n), sizes differing by at most one."""
    base, extra = divmod(n, parts)
    out, a = [], 0
    for i in range(parts):
        b = a + base + (1 if i < extra else 0)
        out.append((a, b))
        a = b
    return out
