"""The coordinator: a pull queue of GRPO groups over N Ray rollout workers.

A step's rows arrive as today (`generate(prompts, ids, sampling, spec, seed)`, groups
contiguous); consecutive rows with one prompt form a work item (a GRPO group stays on one
worker) keyed by its first row id. Items wait in one queue; a worker is handed the next item
whenever its rows in flight drop below `rollout.max_batch` (ray.wait over per-worker in-flight
`serve` calls, as ray.util.ActorPool's submit / get_next_unordered), so faster workers take
more. Inside a worker the items share one engine run (rollout/worker.py), so a freed row takes
the next item's rows. `rollout.schedule=fixed` gives each worker one contiguous share instead:
the old split, kept as a baseline. Rows carry their own random streams, so every schedule
returns the same tokens for the same seed (exactly so with spec.mode off or fixed).

Faults (Ray's actor fault-tolerance guide): workers are actors with `max_restarts`; a call that
fails with RayActorError (the actor was killed or its process exited) or a worker that returns
nothing for `rollout.worker_timeout_s` while it has rows (it is killed) has its unfinished
items re-queued; a worker that comes back gets the step's weights again, one that does not is
dropped. Results are keyed by item and de-duplicated, never counted, so no group is lost or
returned twice. Every fault is logged and kept in `events`.

Weights: `publish` puts policy and heads in the object store once per version. A step samples
with the version that was current when it was submitted; the coordinator swaps every worker to
it before the step's first item, and never during a step. `generate_async` runs steps one at a
time on a background thread, so rollouts of the next steps proceed while the learner trains
(bounded staleness is the caller's: learner/loop.py).

Resources: the workers live in one placement group (`rollout.num_cpus` / `num_gpus` per worker,
`placement_strategy`; under placement=separate a GPU bundle is held back for the learner).
Asking for more than the cluster has fails at start, naming what is missing and what is there.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rollout.coordinator_step import StepRun
from rollout.device import resolve_device
from rollout.model import ModelConfig
from rollout.types import RolloutBatch, RolloutConfig, RolloutStats, SamplingParams, SpecParams, WorkItem
from rollout.worker import worker_class
from spec_heads.heads import HeadConfig

log = logging.getLogger("specroll.coordinator")

# Calls one worker actor runs at once (serve calls block until their group is done). The pull
# queue keeps about max_batch rows per worker in flight; the fixed split may hand a worker
# more items than this, and they simply wait in Ray's queue.
MAX_CONCURRENCY = 64


class ResourceError(RuntimeError):
    """The cluster cannot hold the requested workers; the message says what is missing."""


# ------------------------------------------------------------------------------ resources


def worker_bundle(rollout: RolloutConfig) -> dict[str, float]:
    """One worker's placement-group bundle."""
    gpus = rollout.num_gpus
    if gpus < 0:  # auto: one card per worker where the workers run on CUDA
        gpus = 1.0 if resolve_device(rollout.device).type == "cuda" else 0.0
    return {"CPU": float(rollout.num_cpus), **({"GPU": float(gpus)} if gpus else {})}


def reserve(rollout: RolloutConfig):
    """(a ready placement group, the bundle index of worker 0, whether it is ours to remove), or
    ResourceError at once. Inside a placement group that already holds a bundle for the caller
    plus one per worker (a `specroll sweep` trial's), the workers take bundles 1..N of it."""
    bundle = worker_bundle(rollout)
    current = get_current_placement_group()
    if current is not None and len(current.bundle_specs) >= rollout.num_workers + 1:
        return current, 1, False
    bundles = [dict(bundle) for _ in range(rollout.num_workers)]
    if rollout.placement == "separate" and bundle.get("GPU") and rollout.learner_gpus:
        bundles.append({"GPU": float(rollout.learner_gpus)})  # held for the learner: no worker lands there
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    have = ray.cluster_resources()
    missing = {k: v - have.get(k, 0.0) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    what = f"{rollout.num_workers} workers x {bundle}" + (
        f" + the learner's {{'GPU': {rollout.learner_gpus}}}" if len(bundles) > rollout.num_workers else "")
    there = {k: have.get(k, 0.0) for k in need}
    if missing:
        raise ResourceError(f"rollout: {what} need {need}; the cluster has {there} (missing {missing}); "
                            "lower rollout.num_workers, rollout.num_cpus or rollout.num_gpus, or add nodes "
                            "(`ray start --address=...`)")
    pg = placement_group(bundles, strategy=rollout.placement_strategy)
    try:
        ray.get(pg.ready(), timeout=rollout.start_timeout_s)
    except GetTimeoutError:
        remove_placement_group(pg)
        nodes = [{k: v for k, v in n["Resources"].items() if k in need} for n in ray.nodes() if n["Alive"]]
        raise ResourceError(f"rollout: {what} could not be placed with placement_strategy="
                            f"{rollout.placement_strategy} within rollout.start_timeout_s={rollout.start_timeout_s}; "
                            f"the nodes have {nodes} (available now: "
                            f"{ {k: ray.available_resources().get(k, 0.0) for k in need} }); use fewer workers, "
                            "smaller bundles or placement_strategy=PACK") from None
    return pg, 0, True


# ------------------------------------------------------------------------------ work items


def make_items(step: int, prompts: list[list[int]], ids: list[int], sampling: SamplingParams,
               spec: SpecParams | None, seed: int, version: int) -> list[WorkItem]:
    """Runs of consecutive equal prompts (GRPO groups) as work items, in prompt order."""
    if len(ids) != len(prompts):
        raise ValueError(f"ids: {len(ids)} ids for {len(prompts)} prompts; give one id per prompt")
    if len(set(ids)) != len(ids):
        raise ValueError("ids: row ids repeat; each row needs its own id (its random stream and its key)")
    longest = max(map(len, prompts), default=0)
    items, a = [], 0
    for b in range(1, len(prompts) + 1):
        if b == len(prompts) or prompts[b] != prompts[a]:
            items.append(WorkItem(ids[a], step, prompts[a:b], ids[a:b], sampling, spec, seed, version, longest))
            a = b
    return items


# ------------------------------------------------------------------------------ the coordinator


class Coordinator:
    """N rollout worker actors behind RolloutClient's interface (generate / publish / throughput),
    plus `generate_async` (a Future of the step's RolloutBatch) and `report()` (per-step numbers).

    worker_cls: the worker class to run as actors; default: rollout.backend's (RolloutWorker, or
    the vLLM worker, whose actors then run in vLLM's venv like the driver). Tests pass a subclass
    that fails on purpose.
    """

    def __init__(self, model_config: ModelConfig, policy_state: dict, heads: HeadConfig | None,
                 heads_state: dict | None, rollout: RolloutConfig, *, version: int = 0,
                 worker_cls: type | None = None):
        if not ray.is_initialized():
            raise RuntimeError("ray: not initialised; call ray.init() first (specroll train does it "
                               "when ray.enabled=true)")
        worker_cls = worker_cls or worker_class(rollout)
        self.rollout, self.version, self.num_workers = rollout, int(version), rollout.num_workers
        self.pg, first, self._own_pg = reserve(rollout)
        bundle = worker_bundle(rollout)
        actor = ray.remote(worker_cls)
        opts = dict(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), max_restarts=rollout.max_restarts,
                    max_task_retries=0, max_concurrency=MAX_CONCURRENCY)
        refs = (ray.put(policy_state), ray.put(heads_state))
        self.has_heads = heads is not None  # a ref is never None: whether heads travel is kept here
        self._weights = {self.version: refs}  # version -> (policy ref, heads ref), each put once
        # what a restarted worker comes back with: Ray re-runs the constructor on these refs, so
        # they stay pinned for the coordinator's life
        self._init_version, self._init_refs = self.version, refs
        # refs as top-level arguments: Ray resolves them in each actor (also on other nodes)
        self.workers = [actor.options(**opts, scheduling_strategy=PlacementGroupSchedulingStrategy(
            self.pg, placement_group_bundle_index=first + i)).remote(
                model_config, heads, rollout.for_worker(i), policy_state=refs[0], heads_state=refs[1],
                version=version)
            for i in range(self.num_workers)]
        self.alive = [True] * self.num_workers
        self.worker_version = [self.version] * self.num_workers
        self._gen = [0] * self.num_workers  # incarnation: failures of an older one are not new faults
        try:
            self.node_ids = ray.get([w.node_id.remote() for w in self.workers], timeout=rollout.start_timeout_s)
        except GetTimeoutError:
            self.close()
            raise ResourceError(f"rollout: the workers did not start within rollout.start_timeout_s="
                                f"{rollout.start_timeout_s}; raise it (large models load slowly)") from None
        self.events: list[dict] = []  # faults: {"step", "worker", "event", "detail"}
        self.idle_work = None  # see set_idle_work
        self._idle_last = None  # the ref of the last idle-time work handed out
        self._lock = threading.Lock()
        self._pending = 0  # steps submitted and not finished
        self._step = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="coordinator")
        self._report: dict = {}
        # rollout.partial: per submitted step, its groups not yet started (`upcoming`), those
        # started while an earlier step ran (`early`: ref -> (worker, item, incarnation)), the
        # results of those already back (`early_done`), and their keys (`early_keys`, kept)
        self.upcoming: dict[int, deque[WorkItem]] = {}
        self.early: dict[int, dict] = {}
        self.early_done: dict[int, dict] = {}
        self.early_keys: dict[int, list[int]] = {}
        self._throughput: dict = {"tokens": 0, "tokens_per_s": 0.0, "mean_accepted_len": 1.0,
                                  "speedup_vs_off_est": 1.0}

    # ----------------------------------------------------------------- weights
    def publish(self, version: int, policy_state: dict, heads_state: dict | None) -> None:
        """Policy and heads of `version`, together. Steps submitted from now on sample with it;
        workers swap to it now if no step is running, else before the next step starts."""
        if heads_state is None and self.has_heads:
            raise ValueError("heads_state: a policy-only update would leave the draft heads stale; "
                             "publish policy and heads together")
        refs = (ray.put(policy_state), ray.put(heads_state))
        with self._lock:
            if int(version) <= self.version:
                raise ValueError(f"version: {version} is not newer than {self.version}; versions must "
                                 "increase with every publish")
            self._weights[int(version)] = refs
            self.version = int(version)
            if self._pending == 0:
                self._push(self.version, step=self._step)
                self._prune(self.version)

    def versions(self) -> list[dict]:
        """Each live worker's policy and heads versions."""
        return ray.get([w.versions.remote() for w, ok in zip(self.workers, self.alive) if ok])

    def _prune(self, oldest: int) -> None:
        for v in [v for v in self._weights if v < oldest]:
            del self._weights[v]

    def _push(self, version: int, step: int) -> None:
        """Swap every live worker that holds another version to `version` (between steps only);
        workers still running a later step's groups (rollout.partial) swap when they run out."""
        busy = {w for refs in self.early.values() for w, _, _ in refs.values()}
        calls = {w: self.workers[w].set_weights.remote(version, *self._weights[version],
                                                       rewind=version < self.worker_version[w])
                 for w in range(self.num_workers)
                 if self.alive[w] and self.worker_version[w] != version and w not in busy}
        for w, ref in calls.items():
            try:
                ray.get(ref)
                self.worker_version[w] = version
            except RayActorError as e:
                self._recover(w, step, f"died while taking weights: {e}", version)

    def swap(self, w: int, version: int, step: int) -> bool:
        """Give worker w (no rows in flight) `version`; False if it died and was dropped. An older
        version than it holds only comes back for a step's re-queued group after a fault."""
        try:
            ray.get(self.workers[w].set_weights.remote(version, *self._weights[version],
                                                       rewind=version < self.worker_version[w]))
            self.worker_version[w] = version
            return True
        except RayActorError as e:
            return self._recover(w, step, f"died while taking weights: {e}", version)

    # ------------------------------------------------------- over-provisioning
    def take_upcoming(self, step: int, items: list[WorkItem]) -> deque[WorkItem]:
        """Step `step`'s queue as it starts: its groups no earlier step has started."""
        with self._lock:
            q = self.upcoming.pop(step, None)
        return q if q is not None else deque(items)

    def next_upcoming(self, step: int, version: int | None) -> WorkItem | None:
        """The next group of the earliest step submitted after `step` that has groups waiting (of
        `version` only, if given: a worker that runs a later step's groups keeps their version)."""
        with self._lock:
            waiting = [t for t in sorted(self.upcoming) if t > step and self.upcoming[t]]
            if not waiting:
                return None
            q = self.upcoming[waiting[0]]
            return q.popleft() if version is None or q[0].version == version else None

    def return_upcoming(self, item: WorkItem) -> None:
        """A later step's group whose worker failed goes back to the front of its step's queue."""
        with self._lock:
            self.upcoming.setdefault(item.step, deque()).appendleft(item)
            keys = self.early_keys.get(item.step, [])
            if item.key in keys:
                keys.remove(item.key)

    # -------------------------------------------------------------- generation
    def generate(self, prompts: list[list[int]], ids: list[int], sampling: SamplingParams,
                 spec: SpecParams | None, seed: int) -> RolloutBatch:
        """Sequences in prompt order, sampled by the current version; stats merged over workers."""
        return self.generate_async(prompts, ids, sampling, spec, seed).result()

    def generate_async(self, prompts: list[list[int]], ids: list[int], sampling: SamplingParams,
                       spec: SpecParams | None, seed: int) -> Future:
        """Queue a step (run after the steps before it, on the coordinator's thread); its Future
        holds the RolloutBatch. It samples with the version current now."""
        with self._lock:
            self._step += 1
            self._pending += 1
            step, version = self._step, self.version
        try:
            items = make_items(step, prompts, ids, sampling, spec, seed, version)
        except ValueError:
            with self._lock:
                self._pending -= 1
            raise
        if self.rollout.partial:
            with self._lock:
                self.upcoming[step] = deque(items)
        return self._executor.submit(self._step_guarded, step, version, items)

    def _step_guarded(self, step: int, version: int, items: list[WorkItem]) -> RolloutBatch:
        try:
            return self._run_step(step, version, items)
        finally:
            with self._lock:
                self._pending -= 1

    def _run_step(self, step: int, version: int, items: list[WorkItem]) -> RolloutBatch:
        if not items:
            with self._lock:
                self.upcoming.pop(step, None)
            return RolloutBatch([], RolloutStats())
        with self._lock:
            self._push(version, step)
            self._prune(version)
        t0 = time.perf_counter()
        run = StepRun(self, step, items, t0)
        results = run.loop()
        t_end = time.perf_counter()
        run.handoff()
        sequences = [s for it in items for s in results[it.key].sequences]
        stale = {s.policy_version for s in sequences} - {version}
        if stale:
            raise RuntimeError(f"rollout: sequences carry policy versions {sorted(stale)}, expected {version}; "
                               "a worker missed a publish")
        stats, speedup = self._merged_stats(step, run.took_part)
        stats.time_s = t_end - t0
        tokens = sum(len(s.tokens) for s in sequences)
        self._throughput = {"tokens": tokens, "tokens_per_s": tokens / stats.time_s if stats.time_s > 0 else 0.0,
                            "mean_accepted_len": stats.mean_accepted_len, "speedup_vs_off_est": speedup}
        self._report = run.report(t_end)
        idle = {"idle_work": run.idle_ref} if run.idle_ref is not None else {}
        return RolloutBatch(sequences, stats, {**self._throughput, **self._report, **idle})

    def _merged_stats(self, step: int, workers: set[int]) -> tuple[RolloutStats, float]:
        """The engine stats of the workers that served this step, merged, and their
        tokens-weighted speedup estimate; a worker that died since is left out."""
        stats, weighted, tokens = RolloutStats(), 0.0, 0
        for w in sorted(workers):
            if not self.alive[w]:
                continue
            try:
                got = ray.get(self.workers[w].step_stats.remote(step), timeout=self.rollout.start_timeout_s)
            except (RayActorError, GetTimeoutError):
                continue
            if got is not None:
                stats = stats.merge(got["stats"])
                weighted += got["speedup"] * got["stats"].tokens
                tokens += got["stats"].tokens
        return stats, (weighted / tokens if tokens else 1.0)

    # ------------------------------------------------------------------ faults
    def _recover(self, w: int, step: int, why: str, version: int) -> bool:
        """Worker `w` failed: wait for Ray to restart it and give it `version`, or drop it."""
        self._event(step, w, "failed", why)
        self._gen[w] += 1
        try:
            got = self._await_restart(w)
        except (RayActorError, GetTimeoutError) as e:
            self.alive[w] = False
            ray.kill(self.workers[w], no_restart=True)
            self._event(step, w, "dropped", f"no restart left or it did not come back ({type(e).__name__})")
            if not any(self.alive):
                raise RuntimeError(f"rollout: every worker failed (events: {self.events}); check the "
                                   "workers' logs, raise rollout.max_restarts or rollout.worker_timeout_s") from e
            return False
        self.worker_version[w] = int(got["policy"])
        self._event(step, w, "restarted", f"back at version {self.worker_version[w]}")
        if self.worker_version[w] != version:
            try:
                ray.get(self.workers[w].set_weights.remote(version, *self._weights[version]))
                self.worker_version[w] = version
                self._event(step, w, "republished", f"version {version}")
            except RayActorError as e:
                return self._recover(w, step, f"died while taking weights: {e}", version)
        return True

    def _await_restart(self, w: int) -> dict:
        """Worker w's versions once Ray has restarted it; ActorDiedError when it will not come back."""
        deadline = time.perf_counter() + self.rollout.start_timeout_s
        while True:
            try:
                return ray.get(self.workers[w].versions.remote(), timeout=max(0.1, deadline - time.perf_counter()))
            except ActorUnavailableError:  # restarting: ask again until the deadline
                if time.perf_counter() > deadline:
                    raise
                time.sleep(0.2)

    def _event(self, step: int, w: int, event: str, detail: str) -> None:
        log.warning("rollout step %d: worker %d %s: %s", step, w, event, detail)
        self.events.append({"step": step, "worker": w, "event": event, "detail": detail})

    # ---------------------------------------------------------------- reports
    def set_idle_work(self, fn) -> None:
        """fn(sequences, seed) -> (remote fn, args): work for the first worker that runs out of rows
        while others still finish the step (e.g. a head re-fit on the rows finished so far). Its
        ref comes back in the step's batch.report["idle_work"]; `idle_result` waits for it."""
        if self.rollout.backend != "specroll":  # the idle re-fit trains the worker's own engine copy
            raise ValueError(f"refit.schedule: idle re-fits run on specroll's engine; with rollout.backend="
                             f"{self.rollout.backend} use refit.schedule=every or on_drop")
        self.idle_work = fn

    def idle_ready(self, ref) -> bool:
        """Whether idle-time work has finished (its result is there, or its worker died)."""
        return bool(ray.wait([ref], timeout=0)[0])

    def idle_running(self) -> bool:
        """Whether the last idle-time work handed out still runs (one at a time: a fit that
        outlasts its step's tail goes on beside the next steps, never twice at once)."""
        return self._idle_last is not None and not self.idle_ready(self._idle_last)

    def idle_result(self, ref):
        """What the step's idle-time work returned (waits for it); None if its worker died."""
        try:
            return ray.get(ref)
        except RayActorError as e:
            log.warning("rollout: idle-time work lost with its worker: %s", e)
            return None

    def report(self) -> dict:
        """The last step's numbers: per-worker tokens/s and idle fraction, tail and queue wait."""
        return dict(self._report)

    def throughput(self) -> dict:
        """The last step: tokens, tokens_per_s (over its wall time), mean_accepted_len, speedup_vs_off_est."""
        return dict(self._throughput)

    def close(self) -> None:
        if getattr(self, "_executor", None) is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []
        if self.pg is not None and self._own_pg:
            remove_placement_group(self.pg)
        self.pg = None

