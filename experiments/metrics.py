"""Run metrics: one JSON line per RL step in `run_dir/metrics.jsonl`, mirrored to TensorBoard.

metrics.jsonl is the record plots and comparisons read; TensorBoard (`run_dir/tb`) is for watching
a live run. Each line is flushed and fsynced, so a crash loses at most the line being written.
A resumed run first drops the lines past its checkpoint step, so its file equals the file of a
run that was never interrupted.
This module knows nothing about how metrics are computed; it stores and reads them.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


class MetricsError(ValueError):
    """A run directory or its metrics file cannot be read; the message names the path and the fix."""


class MetricsLogger:
    """Appends one JSON line per step to run_dir/metrics.jsonl and writes its numbers to TensorBoard.

    resume_step=k: a resumed run continues after step k, so lines with step > k (written after the
    checkpoint the run resumes from) are dropped first, and TensorBoard purges its events past k.
    """

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if resume_step is not None:
            truncate_metrics(self.path, resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        # Imported here: reading metrics (plot, compare) must not pay for torch.
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self._writer = SummaryWriter(log_dir=str(self.run_dir / TB_DIR), purge_step=purge)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Write {"step": step, **metrics}: the JSON line first (the durable record), then TensorBoard."""
        if "step" in metrics and metrics["step"] != step:
            raise ValueError(f"metrics['step']={metrics['step']} disagrees with step={step}; drop one of them")
        record = {"step": int(step), **{k: _to_json(v) for k, v in metrics.items() if k != "step"}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        for tag, value in flatten_scalars(record):
            if tag != "step":
                self._writer.add_scalar(tag, value, global_step=int(step))
        self._writer.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
            self._writer.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def flatten_scalars(record: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """(tag, number) pairs: scalars as `name`, list elements as `name/i` (0-based), dict items as `name/key`.

    Bools become 0/1 (so `refit` shows as a spike); strings and None are skipped.
    """
    out: list[tuple[str, float]] = []
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, bool):
            out.append((tag, float(value)))
        elif isinstance(value, (int, float)):
            out.append((tag, float(value)))
        elif isinstance(value, (list, tuple)):
            out.extend(flatten_scalars({str(i): v for i, v in enumerate(value)}, prefix=f"{tag}/"))
        elif isinstance(value, dict):
            out.extend(flatten_scalars(value, prefix=f"{tag}/"))
    return out


def _to_json(value: Any) -> Any:
    """Tensors and numpy values to plain Python, so json.dumps takes them."""
    if hasattr(value, "tolist"):  # torch.Tensor, numpy array or numpy scalar
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def truncate_metrics(path: str | os.PathLike, resume_step: int) -> int:
    """Keep only the lines with step <= resume_step (and no half-written last line); returns lines dropped.

    Rewrites through a temp file and a rename, so a crash here leaves either the old or the new file.
    """
    path = Path(path)
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
        record = _parse_line(line, path, number, last=number == len(lines))
        if record is not None and record["step"] <= resume_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    from learner.checkpointing import write_text_atomic  # here: plot/compare never load torch

    write_text_atomic(path, "".join(kept))
    return len(lines) - len(kept)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of run_dir/metrics.jsonl (or of a .jsonl path), in file order.

    A truncated last line (a crash mid-write) is skipped with a note on stderr; a bad line anywhere
    else raises MetricsError naming the file and the line.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise MetricsError(f"{path}: no such metrics file; give a run directory written by `specroll train` "
                           f"(it holds {METRICS_FILE})")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        record = _parse_line(line, path, number, last=number == len(lines))
        if record is not None:
            records.append(record)
    return records


def _parse_line(line: str, path: Path, number: int, last: bool) -> dict[str, Any] | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        if last:  # the line in flight when a run crashed
            print(f"note: {path}:{number}: skipping a truncated last line", file=sys.stderr)
            return None
        raise MetricsError(f"{path}:{number}: not a JSON object ({e.msg}); fix or delete that line") from None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise MetricsError(f"{path}:{number}: each line must be a JSON object with an integer 'step'; "
                           f"fix or delete that line")
    return record


@dataclass
class Run:
    """One run directory's metrics, named for tables and legends."""

    name: str
    path: Path
    records: list[dict[str, Any]]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of the steps where `key` holds a number; bools count as 0/1."""
        steps, values = [], []
        for r in self.records:
            value = r.get(key)
            if isinstance(value, (int, float)):
                steps.append(r["step"])
                values.append(float(value))
        return steps, values

    def has(self, key: str) -> bool:
        return any(r.get(key) is not None for r in self.records)

    def refit_steps(self) -> list[int]:
        return [r["step"] for r in self.records if r.get("refit") is True]


def load_runs(run_dirs: list[str | os.PathLike]) -> list[Run]:
    """Read every run; MetricsError names the first directory that is missing, empty or unreadable."""
    if not run_dirs:
        raise MetricsError("no run directories given; pass one or more, e.g. runs/default")
    for d in run_dirs:
        if not Path(d).is_dir():
            raise MetricsError(f"{d}: no such run directory; pass a directory written by `specroll train`")
    names = run_names([Path(d) for d in run_dirs])
    runs = []
    for name, d in zip(names, run_dirs):
        records = read_metrics(d)
        if not records:
            raise MetricsError(f"{Path(d) / METRICS_FILE}: holds no steps yet; wait for the run's first step")
        runs.append(Run(name, Path(d), records))
    return runs


def run_names(paths: list[Path]) -> list[str]:
    """The shortest trailing path parts that tell the runs apart (runs/a/x and runs/b/x -> a/x, b/x)."""
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]  # the same directory given twice


def finite_mean(values: list[float]) -> float:
    """Mean of the finite values; nan when there are none (a missing metric shows as nan, not 0)."""
    good = [v for v in values if math.isfinite(v)]
    return sum(good) / len(good) if good else math.nan
