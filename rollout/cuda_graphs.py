"""CUDA graphs of the engine's decode steps: plain, and speculative (draft + verify + accept).

A decode step of a small policy is a chain of ~30 kernels per layer, each a few microseconds of
GPU work: launched one by one from Python, the GPU waits on the host (SmolLM2-135M ran at the
same 57.6 tokens/s as `transformers` `generate` on an H100, docs/gpu.md). A graph replays the
whole step (forward, sampling, appending the token; for a speculative step the heads' drafts,
the verify forward and rejection sampling too) with one launch.

A graph is captured per key (the engine's: rows bucket, attention spans, draft depth, sampling
settings) on its first use and replayed after that. The step runs over a bucket of rows, padded
with finished rows, whether it is replayed or launched eagerly, so that both run the same
kernels on the same shapes: a graph's tokens equal the eager step's token for token. The graph
reads and writes the engine's persistent buffers (the KV caches, the per-row state) in place;
buffers that are reallocated, and weights loaded into new storage, make every graph stale. What
a step returns (small tensors the engine reads back afterwards) is the captured outputs, which
each replay overwrites.

This module knows nothing about sampling or the engine's bookkeeping: it captures and replays
whatever device work it is handed.
"""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class GraphConfig:
    """How the engine runs its decode steps on CUDA."""

    enabled: bool = True  # replay captured graphs (False: launch the same bucketed step eagerly)
    # fuse the decoder block's elementwise chains (spec_heads.fused: torch.compile, once per
    # process), in graphs and eager steps alike: a small policy's step is mostly such kernels
    fuse: bool = True
    # Rows a step runs over, padded up to the next of these: each bucket costs one capture per
    # attention span; finer buckets past 16 rows waste little work on a draining batch (a padded
    # row costs its share of a step that is memory-bound on the weights) and need fewer captures.
    row_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)

    def __post_init__(self):
        b = list(self.row_buckets)
        if not b or b != sorted(set(b)) or b[0] < 1:
            raise ValueError(f"row_buckets: must be increasing positive row counts, got {self.row_buckets}")


class DecodeGraphs:
    """Captured decode steps, keyed by the caller (rows bucket, attention spans, settings)."""

    def __init__(self, config: GraphConfig | None = None):
        self.config = config or GraphConfig()
        self._graphs: dict[tuple, tuple] = {}  # key -> (graph, its captured outputs)
        self._failed: set[tuple] = set()
        self._fingerprint: tuple | None = None
        self._pool = None
        self.captures = self.replays = 0

    def rows(self, n: int, max_rows: int) -> int:
        """The bucket that n rows run as: the next bucket at or above n, at most max_rows (past
        the last bucket, multiples of it)."""
        b = self.config.row_buckets
        i = bisect.bisect_left(b, n)
        rows = b[i] if i < len(b) else -(-n // b[-1]) * b[-1]
        return min(rows, max_rows)

    def bind(self, tensors) -> None:
        """Forget every graph if any tensor the steps read or write (weights, caches, per-row
        buffers) lives in other storage than when they were captured."""
        fp = tuple(t.data_ptr() for t in tensors)
        if fp != self._fingerprint:
            if self._graphs:
                log.info("CUDA graphs: %d dropped (buffers or weights were reallocated)", len(self._graphs))
            self._graphs.clear()
            self._failed.clear()
            self._fingerprint = fp

    def run(self, key: tuple, step):
        """Run `step` (device work only: no host reads, no Python state changed) for `key` and
        return what it returns: the first time eagerly, which is also the warm-up the capture
        needs, then captured; later calls replay the graph and return the captured outputs."""
        if not self.config.enabled or key in self._failed:
            return step()
        entry = self._graphs.get(key)
        if entry is not None:
            entry[0].replay()
            self.replays += 1
            return entry[1]
        out = step()  # the real step, and the capture's warm-up (lazy initialisation, cuBLAS workspaces)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            # capturing records kernels without running them, so the state `step` updates moves
            # only once, in the eager call above
            with torch.cuda.graph(graph, pool=self._pool):
                captured = step()
        except RuntimeError as err:  # an op that cannot be captured: this key stays eager
            log.warning("CUDA graphs: capture of %s failed (%s); running it eagerly", key, err)
            self._failed.add(key)
            return out
        self._graphs[key] = (graph, captured)
        self.captures += 1
        return out

    def __len__(self) -> int:
        return len(self._graphs)
