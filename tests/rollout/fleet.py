"""Shared by the coordinator tests: their prompts and a local Ray session."""
import contextlib

import ray

# 6 GRPO groups of 2 rows, row ids 0..11 (group keys 0, 2, ..., 10)
ROWS = [p for p in ([1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12], [13, 14, 15]) for _ in range(2)]
IDS = list(range(len(ROWS)))
KEYS = list(range(0, 12, 2))


@contextlib.contextmanager
def local_ray(num_cpus: int = 4):
    """A Ray session on this machine for the block (no dashboard, worker logs kept off the test output)."""
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
