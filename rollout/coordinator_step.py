"""One step of the coordinator's pull queue: dispatch, collect, re-queue, and the step's report.

`StepRun` is the loop of rollout/coordinator.py for one step: it hands items to workers with
free rows (round robin, one item each, until every worker holds about max_batch rows),
collects finished groups with ray.wait, re-queues the groups of a worker that failed or hung,
and measures each worker's busy and idle time.

Over-provisioning (`rollout.partial`): once the step's queue is empty, a worker with no rows in
flight takes groups of the next submitted step (the coordinator's `upcoming`), after swapping to
that step's version. Those groups keep the version they were submitted with; when this step
ends, the ones still running, and the results of the ones done, are handed to their own step
(`handoff`), which returns them. A group is keyed by (step, key) throughout, so none is lost or
returned twice.
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
        self.partial = co.rollout.partial
        self.shared: deque[WorkItem] = co.take_upcoming(step, items)
        self.queues: dict[int, deque[WorkItem]] = {}
        if self.fixed:
            self.queues = {w: deque(share) for w, share in zip(live, split(items, len(live)))}
        self.inflight: dict = {}  # ref -> (worker, item, worker incarnation); items of later steps too
        self.rows = [0] * n  # rows in flight per worker, of any step
        self.results: dict[int, ItemResult] = {}  # item key -> result, the first one that came back
        # tokens of the groups each worker started and finished within this step's window (any
        # step's groups): a group carried in from the step before ran mostly before it
        self.tokens = [0] * n
        self.idle_since: dict[int, float] = {w: t0 for w in range(n)}  # worker -> idle since (while idle)
        self.idle_s = [0.0] * n
        self.out_at: dict[int, float] = {}  # worker -> when it first ran out of this step's work
        self.progress: dict[int, float] = {}  # worker -> its last result (or dispatch from idle)
        self.waits: list[float] = []  # per dispatch of this step's groups: time since the step began
        self.took_part: set[int] = set()
        self.faults_before = len(co.events)
        self.idle_ref = None  # the step's idle-time work (one per step), if any
        self.idle_worker: int | None = None
        self.early = 0  # groups of this step started while an earlier step ran
        self.carried: set = set()  # refs started before this step's window
        for ref, (w, item, gen) in co.early.pop(step, {}).items():
            self.inflight[ref] = (w, item, gen)
            self.carried.add(ref)
            self.rows[w] += len(item.ids)
            self.busy(w, t0)
            self.progress[w] = t0
            self.took_part.add(w)
            self.early += 1
        for key, (w, res) in co.early_done.pop(step, {}).items():
            self.results[key] = res
            self.took_part.add(w)
            self.early += 1

    # ------------------------------------------------------------------ queues
    def queue(self, w: int) -> deque[WorkItem]:
        return self.queues[w] if self.fixed else self.shared

    def own_queue(self, w: int) -> deque[WorkItem] | None:
        return self.queue(w) if (not self.fixed or w in self.queues) else None

    def requeue(self, w: int, item: WorkItem) -> None:
        if item.step != self.step:  # a later step's group: back to the front of that step's queue
            self.co.return_upcoming(item)
            return
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

    def busy(self, w: int, now: float) -> None:
        since = self.idle_since.pop(w, None)
        if since is not None:
            self.idle_s[w] += now - since

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

    def next_item(self, w: int) -> WorkItem | None:
        """The item worker w takes now, or None: this step's queue first; under partial, once that is
        empty, a later step's group for a worker with nothing of this step in flight."""
        co = self.co
        if not co.alive[w] or self.rows[w] >= co.rollout.for_worker(w).max_batch:
            return None
        own = self.own_queue(w)
        if own:
            if co.worker_version[w] != own[0].version and self.rows[w]:
                return None  # it still runs a later step's groups: their version stays until they end
            return own.popleft()
        if not self.partial or w == self.idle_worker or self.shared or any(
                v == w and item.step == self.step for v, item, _ in self.inflight.values()):
            return None
        return co.next_upcoming(self.step, None if not self.rows[w] else co.worker_version[w])

    def dispatch(self) -> None:
        """Round robin, one item per worker per round, while workers have free rows."""
        co = self.co
        gave = True
        while gave:
            gave = False
            for w in range(co.num_workers):
                item = self.next_item(w)
                if item is None:
                    continue
                if co.worker_version[w] != item.version and not co.swap(w, item.version, self.step):
                    self.requeue(w, item)  # the worker died taking the weights and was dropped
                    self.drop(w)
                    continue
                now = time.perf_counter()
                if self.rows[w] == 0:
                    self.progress[w] = now
                ref = co.workers[w].serve.remote(item)
                self.inflight[ref] = (w, item, co._gen[w])
                self.rows[w] += len(item.ids)
                self.busy(w, now)
                self.took_part.add(w)
                if item.step == self.step:
                    self.waits.append(now - self.t0)
                else:
                    co.early_keys.setdefault(item.step, []).append(item.key)
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
                if not co._recover(w, self.step, f"{type(e).__name__} with group {item.key} of step "
                                                 f"{item.step} in flight", item.version):
                    self.drop(w)
                now = time.perf_counter()  # nobody watched the others while the restart was awaited
                self.progress = {v: now for v in self.progress}
            elif not co.alive[w]:
                self.drop(w)
            self.went_idle(w)
            return
        now = time.perf_counter()
        kept = self.results if item.step == self.step else co.early_done.setdefault(item.step, {})
        if res.key not in kept:  # at-least-once calls: keep the first copy, never count
            kept[res.key] = res if kept is self.results else (w, res)
            if ref not in self.carried:
                self.tokens[w] += sum(len(s.tokens) for s in res.sequences)
        self.progress[w] = now
        self.went_idle(w)

    def went_idle(self, w: int) -> None:
        """Book-keeping when worker w may have run out of work: idle time, and the idle work."""
        now = time.perf_counter()
        own = self.own_queue(w)
        if not own and w not in self.out_at and not any(
                v == w and item.step == self.step for v, item, _ in self.inflight.values()):
            self.out_at[w] = now
            if self.rows[w] == 0:
                self.start_idle_work(w)
        if self.rows[w] == 0:
            self.idle_since.setdefault(w, now)

    def start_idle_work(self, w: int) -> None:
        """The first worker out of work while others still have rows in flight takes the idle work
        (on the rows finished so far); it runs beside the worker's next engine run, if any."""
        co = self.co
        if co.idle_work is None or self.idle_ref is not None or not self.inflight or co.idle_running():
            return
        sequences = [s for r in self.results.values() for s in r.sequences]
        if len(sequences) < 2:
            return
        fn, args = co.idle_work(sequences, self.items[0].seed + 1)
        self.idle_ref = co._idle_last = co.workers[w].run_idle.remote(fn, *args)
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

    def handoff(self) -> None:
        """Later steps' groups still in flight go to their own step's books (co.early)."""
        for ref, (w, item, gen) in self.inflight.items():
            self.co.early.setdefault(item.step, {})[ref] = (w, item, gen)
        self.inflight = {}

    # ------------------------------------------------------------------ report
    def report(self, t_end: float) -> dict:
        """Per-worker tokens/s (over its busy time) and idle fraction (no rows in flight), the tail
        (first worker out of this step's work to last row done), the queue wait, and the groups
        started before the step (rollout.partial)."""
        wall = max(t_end - self.t0, 1e-9)
        tps, idle = [], []
        for w in range(self.co.num_workers):
            if w not in self.took_part:
                tps.append(0.0)
                idle.append(1.0)
                continue
            idle_s = self.idle_s[w] + (t_end - self.idle_since[w] if w in self.idle_since else 0.0)
            busy = max(wall - idle_s, 1e-9)
            tps.append(self.tokens[w] / busy)
            idle.append(min(1.0, max(0.0, idle_s / wall)))
        first_out = min((self.out_at.get(w, t_end) for w in self.took_part), default=t_end)
        return {"rollout_worker_tokens_per_s": tps, "rollout_worker_idle_frac": idle,
                "rollout_tail_s": t_end - first_out,
                "rollout_queue_wait_s": sum(self.waits) / len(self.waits) if self.waits else 0.0,
                "rollout_faults": len(self.co.events) - self.faults_before,
                "rollout_workers_alive": sum(self.co.alive), "rollout_early_groups": self.early}
