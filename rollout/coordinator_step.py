"""One step of the coordinator's pull queue: dispatch, collect, re-queue, and the step's report.

`StepRun` is the loop of rollout/coordinator.py for one step: it hands items to workers with
free rows (round robin, one item each, until every worker holds about max_batch rows),
collects finished groups with ray.wait, re-queues the groups of a worker that failed or hung,
and measures each worker's busy time. It keeps no state past its step.
"""
from __future__ import annotations

import time
from collections import deque

import ray
from ray.exceptions import RayActorError

from rollout.types import ItemResult, WorkItem

POLL_S = 0.05  # how often the loop looks for hung workers while it waits for results


def split(items: list, parts: int) -> list[list]:
    """Contiguous shares, sizes differing by at most one (the fixed schedule)."""
    base, extra = divmod(len(items), parts)
    out, a = [], 0
    for i in range(parts):
        b = a + base + (1 if i < extra else 0)
        out.append(items[a:b])
        a = b
    return out


class StepRun:
    def __init__(self, co, step: int, items: list[WorkItem], t0: float):
        self.co, self.step, self.items, self.t0 = co, step, items, t0
        n = co.num_workers
        live = [w for w in range(n) if co.alive[w]]
        self.fixed = co.rollout.schedule == "fixed"
        self.shared: deque[WorkItem] = deque(items)
        self.queues: dict[int, deque[WorkItem]] = {}
        if self.fixed:
            self.queues = {w: deque(share) for w, share in zip(live, split(items, len(live)))}
        self.inflight: dict = {}  # ref -> (worker, item, worker incarnation)
        self.rows = [0] * n  # rows in flight per worker
        self.results: dict[int, ItemResult] = {}  # item key -> result, the first one that came back
        self.tokens = [0] * n
        self.first: dict[int, float] = {}  # worker -> its first dispatch
        self.idle_at: dict[int, float] = {}  # worker -> when it ran out of work (while it stays out)
        self.progress: dict[int, float] = {}  # worker -> its last result (or dispatch from idle)
        self.waits: list[float] = []  # per dispatch: time since the step began
        self.took_part: set[int] = set()
        self.faults_before = len(co.events)
        self.idle_ref = None  # the step's idle-time work (one per step), if any
        self.idle_worker: int | None = None

    # ------------------------------------------------------------------ queues
    def queue(self, w: int) -> deque[WorkItem]:
        return self.queues[w] if self.fixed else self.shared

    def requeue(self, w: int, item: WorkItem) -> None:
        if self.fixed and w not in self.queues:  # its owner was dropped: the shortest live share takes it
            w = min(self.queues, key=lambda v: len(self.queues[v]))
        self.queue(w).appendleft(item)

    def drop(self, w: int) -> None:
        """Worker w is gone: under the fixed split, its share goes round robin to the others."""
        if self.fixed and w in self.queues:
            left = self.queues.pop(w)
            if not self.queues:
                return
            for i, item in enumerate(left):
                live = sorted(self.queues)
                self.queues[live[i % len(live)]].append(item)

    # ------------------------------------------------------------------ loop
    def loop(self) -> dict[int, ItemResult]:
        co = self.co
        while len(self.results) < len(self.items):
            self.dispatch()
            if not self.inflight:
                raise RuntimeError(f"rollout step {self.step}: {len(self.items) - len(self.results)} groups "
                                   f"unfinished and none in flight (workers alive: {co.alive})")
            ready, rest = ray.wait(list(self.inflight), num_returns=1, timeout=POLL_S)
            if ready and rest:  # take everything that is done, not one per round
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
            for ref in ready:
                self.collect(ref)
            self.check_hangs()
        return self.results

    def dispatch(self) -> None:
        """Round robin, one item per worker per round, while workers have free rows."""
        co = self.co
        gave = True
        while gave:
            gave = False
            for w in range(co.num_workers):
                q = self.queue(w) if (co.alive[w] and (not self.fixed or w in self.queues)) else None
                if not q or self.rows[w] >= co.rollout.for_worker(w).max_batch:
                    continue
                item = q.popleft()
                now = time.perf_counter()
                if self.rows[w] == 0:
                    self.progress[w] = now
                ref = co.workers[w].serve.remote(item)
                self.inflight[ref] = (w, item, co._gen[w])
                self.rows[w] += len(item.ids)
                self.first.setdefault(w, now)
                self.idle_at.pop(w, None)
                self.took_part.add(w)
                self.waits.append(now - self.t0)
                gave = True

    def collect(self, ref) -> None:
        co = self.co
        w, item, gen = self.inflight.pop(ref)
        self.rows[w] -= len(item.ids)
        try:
            res: ItemResult = ray.get(ref)
        except RayActorError as e:
            self.requeue(w, item)
            if gen == co._gen[w] and co.alive[w]:  # the first failure seen of this incarnation
                if not co._recover(w, self.step, f"{type(e).__name__} with group {item.key} in flight",
                                   item.version):
                    self.drop(w)
                now = time.perf_counter()  # nobody watched the others while the restart was awaited
                self.progress = {v: now for v in self.progress}
            elif not co.alive[w]:
                self.drop(w)
            return
        now = time.perf_counter()
        if res.key not in self.results:  # at-least-once calls: keep the first copy, never count
            self.results[res.key] = res
            self.tokens[w] += sum(len(s.tokens) for s in res.sequences)
        self.progress[w] = now
        if self.rows[w] == 0 and not (self.queue(w) if (not self.fixed or w in self.queues) else None):
            self.idle_at[w] = now
            self.start_idle_work(w)

    def start_idle_work(self, w: int) -> None:
        """The first worker out of work while others still have rows in flight takes the idle work
        (on the rows finished so far); it runs beside the worker's next engine run, if any."""
        co = self.co
        if co.idle_work is None or self.idle_ref is not None or not self.inflight:
            return
        sequences = [s for r in self.results.values() for s in r.sequences]
        if len(sequences) < 2:
            return
        fn, args = co.idle_work(sequences, self.items[0].seed + 1)
        self.idle_ref = co.workers[w].run_idle.remote(fn, *args)
        self.idle_worker = w

    def check_hangs(self) -> None:
        co, timeout = self.co, self.co.rollout.worker_timeout_s
        if not timeout:
            return
        now = time.perf_counter()
        for w in range(co.num_workers):
            if co.alive[w] and self.rows[w] > 0 and now - self.progress.get(w, now) > timeout:
                co._event(self.step, w, "hung", f"nothing back for rollout.worker_timeout_s={timeout}s with "
                                                f"{self.rows[w]} rows in flight; killing it")
                ray.kill(co.workers[w], no_restart=False)  # its calls fail now and are re-queued
                self.progress[w] = now

    # ------------------------------------------------------------------ report
    def report(self, t_end: float) -> dict:
        """Per-worker tokens/s (over its busy time) and idle fraction, the tail (first worker out
        of work to last row done) and the queue wait."""
        wall = max(t_end - self.t0, 1e-9)
        tps, idle = [], []
        for w in range(self.co.num_workers):
            if w not in self.took_part:
                tps.append(0.0)
                idle.append(1.0)
                continue
            busy = max(self.idle_at.get(w, t_end) - self.t0, 1e-9)
            tps.append(self.tokens[w] / busy)
            idle.append(max(0.0, 1.0 - busy / wall))
        first_idle = min((self.idle_at.get(w, t_end) for w in self.took_part), default=t_end)
        return {"rollout_worker_tokens_per_s": tps, "rollout_worker_idle_frac": idle,
                "rollout_tail_s": t_end - first_idle,
                "rollout_queue_wait_s": sum(self.waits) / len(self.waits) if self.waits else 0.0,
                "rollout_faults": len(self.co.events) - self.faults_before,
                "rollout_workers_alive": sum(self.co.alive)}
