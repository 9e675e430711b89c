"""Every tuning value of the entropy mode's depth control, once (`spec.control.*` in a config).

Plain data: spec_heads.depth reads it, rollout.types.SpecParams carries it, tests set it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class DepthControl:
    """Tuning of spec_heads.depth.DepthPolicy (entropy mode), each with why it has its value."""

    # what a draft is expected to be accepted
    prior_pos_accept: float = 0.8  # optimistic start per draft position, so fresh heads get tried
    prior_pos_weight: float = 8.0  # observations that prior weighs: weak heads lose it within a few steps
    # observations the heads' held-out acceptance weighs: rows admitted together draft at the
    # same point of their answers, so a step's outcomes are one correlated sample, and one hard
    # token there must not put drafting off for the run
    measured_prior_weight: float = 128.0
    pos_window: float = 4096.0  # outcomes a position remembers, so estimates follow a moving policy
    table_prior_weight: float = 4.0  # pseudo-observations per entropy bin before any outcome
    table_window: float = 4096.0  # outcomes an entropy bin remembers
    table_refit_every: int = 8  # table updates between re-fits: a re-fit per step cost more than sampling
    # what a step costs
    cost_ema: float = 0.02  # ~50 timings per cost cell: millisecond timings on a shared machine are noisy
    # when drafting is on
    per_row_depths: str = "auto"  # on | off | auto (on a CPU, where reading depths back is free)
    draft_margin: float = 0.05  # drafting must beat plain steps by 5%: costs the step model misses
    clear_advantage: float = 1.5  # drafting this far ahead needs no fresh plain timing to stay on
    near_band: float = 0.05  # within this above the bar, plain timings come 8x as often
    min_plain_samples: int = 4  # plain timings at a rows bucket before they come only every 64th step
    # which timings are compared (paired in time: a shared machine's speed drifts over minutes)
    pair_within: int = 128  # steps apart two timings may be
    pair_within_s: float = 2.0  # seconds apart two timings may be
    pair_within_plain: int = 32  # or this many plain steps' time, where plain steps are slow
    pair_anchor_cap: int = 10  # pairs sharing one timing move the estimate by at most 1 - 0.9^10
    # exploring beyond the budget, so one slow timing cannot switch drafting off for good
    explore_overhead: float = 0.01  # exploring from a plain stretch costs at most 1% of it
    explore_burst: int = 2  # drafting steps per exploring burst: the faster of 2 is what pairs
    climb_edge: float = 1.03  # a neighbouring depth this much faster (over climb_samples) moves the budget
    climb_samples: int = 2  # paired samples a small edge needs
    climb_edge_at_once: float = 1.10  # an edge this large moves the budget on one sample
    # the heads' pass over admitted prompts
    idle_prefill_steps: int = 128  # plain steps after which rows are admitted without that pass

    def __post_init__(self):
        if self.per_row_depths not in ("on", "off", "auto"):
            raise ValueError(f"per_row_depths: must be on, off or auto, got {self.per_row_depths!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "per_row_depths" and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{f.name}: must be a positive number, got {value!r}")
        for name in ("prior_pos_accept", "cost_ema", "explore_overhead", "draft_margin", "near_band"):
            if getattr(self, name) > 1.0:
                raise ValueError(f"{name}: must be at most 1, got {getattr(self, name)}")
        if self.table_window <= self.table_prior_weight:
            raise ValueError(f"table_window: must exceed table_prior_weight ({self.table_prior_weight}), "
                             f"got {self.table_window}")
        if self.clear_advantage <= 1.0 + self.draft_margin:
            raise ValueError(f"clear_advantage: must exceed 1 + draft_margin ({1.0 + self.draft_margin}), "
                             f"got {self.clear_advantage}")
        for name in ("climb_edge", "climb_edge_at_once"):
            if getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be above 1 (a rate ratio), got {getattr(self, name)}")
