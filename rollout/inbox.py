"""The pull path's inbox, shared by the rollout workers (rollout/worker.py, rollout/vllm_worker.py).

`serve` queues a work item from the coordinator and blocks until its rows are done; one engine
thread drains the queue, one engine run at a time, so concurrent callers share the engine
instead of racing for it. A worker says what one run takes from the queue (`_take`) and how it
serves it (`_serve_run`).
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future

from rollout.types import ItemResult, WorkItem


class ItemInbox:
    """Mixin: the inbox, its engine thread, and the step that thread serves now."""

    _engine_thread_name = "rollout-engine"

    def _init_inbox(self) -> None:
        self._cond = threading.Condition()
        self._inbox: deque[tuple[WorkItem, Future]] = deque()
        self._draining = False  # whether the engine thread runs
        self._run_step: int | None = None  # the step an engine run serves now

    def serve(self, item: WorkItem) -> ItemResult:
        """Generate one work item (a GRPO group); blocks until its rows are done."""
        fut: Future = Future()
        with self._cond:
            self._inbox.append((item, fut))
            if not self._draining:
                self._draining = True
                threading.Thread(target=self._drain, daemon=True, name=self._engine_thread_name).start()
        return fut.result()

    def _drain(self) -> None:
        """The engine thread: one engine run at a time, until no item waits."""
        while True:
            with self._cond:
                if not self._inbox:
                    self._draining = False
                    self._cond.notify_all()
                    return
                first, taken = self._take()
                self._run_step = first.step
            try:
                self._serve_run(first, taken)
            finally:
                with self._cond:
                    self._run_step = None
                    self._cond.notify_all()

    def _take(self) -> tuple[WorkItem, object]:
        """Under the lock, from a non-empty inbox: (the run's first item, what the run takes)."""
        raise NotImplementedError

    def _serve_run(self, first: WorkItem, taken) -> None:
        """Serve one run; every future taken gets its result or the run's exception."""
        raise NotImplementedError
