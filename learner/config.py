"""Learner settings: the RL update loop (`TrainConfig`) and draft-head re-fitting (`RefitConfig`).

Plain dataclasses, one default per setting; `experiments/config.py` composes them into the root
config and prefixes the dotted path to the `ValueError`s raised here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

REFIT_SCHEDULES = ("never", "every", "on_drop", "idle")
REFIT_LOSSES = ("tv", "e2e_tv", "kl", "ce")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _require_finite(owner) -> None:
    """Every float setting of `owner` is finite: nan fails no comparison-based range check."""
    for name, value in vars(owner).items():
        for v in value if isinstance(value, list) else [value]:
            _require(not isinstance(v, float) or math.isfinite(v),
                     f"{name}: must be a finite number, got {v}; set a finite value")


@dataclass
class TrainConfig:
    """The RL loop: how many steps, how big a step, and the optimiser (AdamW)."""

    steps: int = 30
    prompts_per_step: int = 32  # prompts per RL step; each is sampled algo.group_size times
    lr: float = 2e-4  # 1e-3 wrecks the ~1M-parameter tiny policy within 10 steps (Adam)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    micro_batch_size: int = 16  # sequences per forward/backward; gradients accumulate over the step
    epochs_per_step: int = 1  # passes over each rollout batch (> 1 makes the later passes off-policy)
    checkpoint_every: int = 10  # steps; 0 = only at the end
    # A step that changes the weights' global norm by more than this fraction is divergence (on
    # the tests' 2-layer policy: < 0.1% per step at lr 1e-3, ~1.5% at 1e-2, 78% at 1e-1): the run
    # stops before those weights are published or checkpointed. The norm's change is a lower
    # bound on the update's size that needs no copy of the weights.
    max_norm_change: float = 0.1
    log_every: int = 1
    # async rollouts: the next N steps' rollouts are generated (on the Ray workers) while the
    # learner trains, so a step may train on samples up to N versions old; 0 = synchronous.
    # (`async` is a Python keyword, so the key lives here rather than as async.max_staleness)
    max_staleness: int = 0

    def __post_init__(self):
        _require_finite(self)
        _require(self.steps >= 1, f"steps: must be >= 1, got {self.steps}")
        _require(self.prompts_per_step >= 1, f"prompts_per_step: must be >= 1, got {self.prompts_per_step}")
        # AdamW moves every weight by about lr per step: lr >= 1 rewrites the weights in one step
        _require(0 < self.lr < 1, f"lr: must be in (0, 1) (typical 1e-6..1e-4), got {self.lr}")
        _require(self.weight_decay >= 0, f"weight_decay: must be >= 0 (0 turns it off), got {self.weight_decay}")
        self.betas = list(self.betas)
        _require(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
                 f"betas: must be two numbers in [0, 1), e.g. [0.9, 0.999], got {self.betas}")
        _require(self.grad_clip >= 0, f"grad_clip: must be >= 0 (0 turns clipping off), got {self.grad_clip}")
        _require(self.micro_batch_size >= 1, f"micro_batch_size: must be >= 1, got {self.micro_batch_size}")
        _require(self.epochs_per_step >= 1, f"epochs_per_step: must be >= 1, got {self.epochs_per_step}")
        _require(self.checkpoint_every >= 0,
                 f"checkpoint_every: must be >= 0 (0 saves only at the end), got {self.checkpoint_every}")
        _require(self.log_every >= 1, f"log_every: must be >= 1, got {self.log_every}")
        _require(self.max_norm_change > 0,
                 f"max_norm_change: must be > 0 (e.g. 0.1), got {self.max_norm_change}")
        _require(self.max_staleness >= 0,
                 f"max_staleness: must be >= 0 (0 is the synchronous loop), got {self.max_staleness}")


@dataclass
class RefitConfig:
    """When and how the draft heads are re-fitted to the moving policy (trunk frozen)."""

    # never | every | on_drop | idle (every step, on a rollout worker that ran out of work while
    # others finish the step's long tail; off the learner's critical path; needs Ray and >= 2 workers)
    schedule: str = "on_drop"
    every: int = 10  # RL steps between re-fits, for schedule=every
    # on_drop: re-fit when the accepted length the heads give at full depth (from the step's
    # measured acceptance rate; metric accepted_len_full_depth), smoothed over steps, falls below
    # drop_fraction * its best since the last fit. A stale head can drop acceptance to ~0
    # silently, or slide over tens of steps within one step's noise. The raw mean accepted
    # length is not used: in entropy mode it also moves with the chosen depths.
    # 10%: far enough below the best that one step's noise (6% at 32 rows a step) does not
    # reach it once smoothed; 5% does (docs/results.md, finding 4)
    drop_fraction: float = 0.90
    # weight of the newest step in the moving average on_drop watches; a collapse to
    # (1 - (1 - drop_fraction) / drop_smoothing) of the level (half, at the defaults) fires at once
    drop_smoothing: float = 0.2
    steps: int = 60  # optimiser steps per re-fit
    lr: float = 3e-4  # a re-fit sees one step's rollouts; at 1e-3 it overfits them
    loss: str = "tv"  # tv | e2e_tv | kl | ce
    kl_warmup_steps: int = 0  # KL first, then `loss`: TV gradients vanish when the distributions barely overlap
    micro_batch_size: int = 16

    def __post_init__(self):
        _require_finite(self)
        _require(self.schedule in REFIT_SCHEDULES,
                 f"schedule: must be one of {', '.join(REFIT_SCHEDULES)}, got {self.schedule!r}")
        _require(self.every >= 1, f"every: must be >= 1 (RL steps between re-fits), got {self.every}")
        _require(0.0 < self.drop_fraction < 1.0,
                 f"drop_fraction: must be in (0, 1), e.g. 0.90 re-fits after a 10% drop, got {self.drop_fraction}")
        _require(0.0 < self.drop_smoothing <= 1.0,
                 f"drop_smoothing: must be in (0, 1] (1: no smoothing, each step alone), got {self.drop_smoothing}")
        _require(self.steps >= 1, f"steps: must be >= 1, got {self.steps}")
        _require(0 < self.lr < 1, f"lr: must be in (0, 1) (typical 1e-3), got {self.lr}")
        _require(self.loss in REFIT_LOSSES, f"loss: must be one of {', '.join(REFIT_LOSSES)}, got {self.loss!r}")
        _require(self.kl_warmup_steps >= 0,
                 f"kl_warmup_steps: must be >= 0 (0 skips the KL warm-up), got {self.kl_warmup_steps}")
        _require(self.kl_warmup_steps <= self.steps,
                 f"kl_warmup_steps: must be <= steps ({self.steps}); lower it or raise steps, "
                 f"got {self.kl_warmup_steps}")
        _require(self.micro_batch_size >= 1, f"micro_batch_size: must be >= 1, got {self.micro_batch_size}")
