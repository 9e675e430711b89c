"""The online depth control of entropy mode: when a step drafts at all, how deep it may go,
and the exploring steps that keep its estimates honest (DESIGN.md, "Entropy-aware draft depth").

Per step, `plan_step` says plain or drafting (and whether the step explores): drafting must
deliver more tokens per second than plain steps at this many rows, measured on real steps
paired in time. Within a drafting step the rows' depths come from spec_heads.budget (a pure
function of the estimators in spec_heads.estimators). Every tuning value of the control lives
in `DepthControl` (spec_heads.depth_config), once.

This module knows nothing about models, heads or the KV cache. Per-step calls never
synchronise with the device: no .item(), no branching on tensor values.
"""
from __future__ import annotations

import math
import time

import torch

from spec_heads.acceptance import expected_tokens
from spec_heads.depth_config import DepthControl
from spec_heads.estimators import AcceptanceTable, CostModel, _cap_counts, _ema

_MODES = ("off", "fixed", "entropy")


def _near(rows_a: int, rows_b: int) -> bool:
    """Two timings are comparable: their rows in flight differ by at most 1/8 (or one row).
    A rows bucket spans up to 2x; where steps are compute-bound their time follows the rows, so
    a plain step timed at 128 rows against drafting at 70 (a draining batch) would credit
    drafting with the rows it lost."""
    return abs(rows_a - rows_b) <= max(1, max(rows_a, rows_b) // 8)


class DepthPolicy:
    """Chooses per row how many of the available drafts to verify; mode off | fixed | entropy."""

    def __init__(self, mode: str, k: int, max_k: int, num_bins: int, vocab_size: int,
                 max_batch: int, device=None, control: DepthControl | None = None):
        if mode not in _MODES:
            raise ValueError(f"mode: must be off, fixed or entropy, got {mode!r}")
        if max_k < 1:
            raise ValueError(f"max_k: must be >= 1, got {max_k}")
        if not 1 <= k <= max_k:
            raise ValueError(f"k: must be in 1..max_k ({max_k}), got {k}")
        if vocab_size < 2:
            raise ValueError(f"vocab_size: must be >= 2, got {vocab_size}")
        c = self.control = control or DepthControl()
        self.mode, self.k, self.max_k = mode, k, max_k
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.table = AcceptanceTable(num_bins, math.log(vocab_size), prior_weight=c.table_prior_weight,
                                     device=self.device, window=c.table_window)
        self.table.refit_every = c.table_refit_every
        self.cost = CostModel(max_batch, 1 + max_k, ema=c.cost_ema)
        self.depth_hist = [0] * (max_k + 1)  # host: row-steps by draft depth
        # Per-row depths (spec_heads.budget) where reading them back is free: the CPU. Elsewhere
        # the budget is one depth for the whole step, and it climbs on real timings.
        self.early_stop = c.per_row_depths == "on" or (c.per_row_depths == "auto" and self.device.type != "cuda")
        # Conditional acceptance per draft position (accepted given all earlier ones were): the
        # batch-level estimate behind the draft budget, from control.prior_pos_accept on.
        self.measured_prior: list[float] | None = None  # the heads' held-out measurement (set_measured_prior)
        self.pos_trials = torch.zeros(max_k, dtype=torch.float64, device=self.device)
        self.pos_accepts = torch.zeros(max_k, dtype=torch.float64, device=self.device)
        self._pos_accept: list[float] | None = None  # host copy, refreshed every 16 timings
        self._refreshed_at = -1  # the cost model's version // 16 at the last refresh
        self._budgets: dict[int, int] = {}  # bucket -> deepest useful draft
        self._draft_rate: dict[int, float] = {}  # bucket -> EMA of expected tokens per row per second drafting
        self._draft_tokens: dict[int, float] = {}  # bucket -> EMA of the tokens per row a drafting step yields
        self._plain_timed: set[int] = set()  # buckets where a real plain step was timed
        # Drafting against plain steps, paired in time (record_step): a shared machine's speed
        # drifts by tens of percent over minutes and plain steps are rare while drafting, so only
        # timings near in time (_fresh) and at nearly the same rows (_near) are compared.
        self._plain_recent: dict[int, tuple[float, int, int, float]] = {}  # bucket -> (seconds, step, rows, wall time)
        self._draft_recent: dict[int, tuple[float, int, int, float]] = {}  # bucket -> (rate, step, rows, wall time)
        self._advantage: dict[int, float] = {}  # bucket -> drafting's paired advantage over plain steps
        self._draft_samples: dict[int, list[float]] = {}  # bucket -> last 2 drafting rates at near rows
        self._anchor: dict[int, tuple] = {}  # bucket -> (anchor, base, n, sum) of the pairs sharing an anchor (_pair)
        self._plain_samples: dict[int, list[float]] = {}  # bucket -> last 2 plain timings at near rows
        self._plain_count: dict[int, int] = {}  # bucket -> plain steps timed there, ever
        self._plain_warm: set[int] = set()  # buckets whose plain samples are warm timings
        self._prev_plain = False  # whether the last step recorded was a plain one
        self.clock = time.perf_counter  # wall time of the timings (tests pass their own)
        # Exploration (plan_step), counted in each rows bucket's own decode steps over the
        # policy's life, across generate() calls.
        self.steps = 0
        self._bucket_steps: dict[int, int] = {}  # bucket -> decode steps planned at it
        self._explore_at: dict[int, int] = {}  # bucket -> its step count at its next exploring step
        self._explore_gap: dict[int, int] = {}  # bucket -> back-off between exploring steps
        # bucket -> [steps left to time, extra seconds so far, its step count at the burst's start]
        # of the exploring burst being timed (_time_burst)
        self._burst_ledger: dict[int, list] = {}
        self._burst_cost: dict[int, float] = {}  # bucket -> the last burst's extra time, in plain steps
        self._burst: dict[int, tuple[int, int]] = {}  # bucket -> (exploring steps left, depth)
        # The climb (one depth for the whole step): bucket -> {depth: (EMA of the explored
        # depth's rate over the budget's, samples)}, reset when the budget moves.
        self._depth_rel: dict[int, dict[int, tuple[float, int]]] = {}
        self._budget_recent: dict[int, tuple[float, int, int, float]] = {}  # bucket -> (rate, step, rows, wall time) at the budget
        self._explore_down: dict[int, bool] = {}
        self._climbed: dict[int, int] = {}  # bucket -> the depth the climb stands on
        self._yield: dict[int, float] = {}  # bucket -> EMA of emitted / expected tokens of drafting steps
        # What drafting costs outside decode steps: the heads' pass over each admitted prompt
        # (record_heads_prefill), set against the tokens a row goes on to yield (record_finished).
        self.heads_prefill_row_s: float | None = None  # seconds of the heads' prefill per admitted row
        self.tokens_per_row: float | None = None  # tokens a finished row generated
        self._drafted_at = 0  # self.steps at the last step that drafted to a budget

    def _refresh(self) -> None:
        """Re-derive host-side caches once per 16 timings: every step records one, and the
        derivation is host Python (and, on a GPU, one read-back of the acceptance counts),
        a real share of a small model's step if done every step."""
        epoch = self.cost.version // 16
        if self._refreshed_at != epoch:
            self._budgets, self._pos_accept, self._refreshed_at = {}, None, epoch

    def position_acceptance(self) -> list[float]:
        """Host floats [max_k]: estimated acceptance at each draft position, given that every
        earlier draft was accepted (windowed counts of observed outcomes plus the prior)."""
        self._refresh()
        if self._pos_accept is None:
            # sliding memory: scale the counts down once a position holds more than pos_window
            _cap_counts(self.pos_trials, self.pos_accepts, self.control.pos_window)
            # Each position's prior is the estimate of the position before it (the first's is
            # prior_pos_accept): a depth never drafted yet is assumed as good as the last one
            # measured, not reset to a fixed guess that would keep it from ever being tried.
            # Where the heads come with a held-out measurement (set_measured_prior), that is
            # each position's prior instead.
            prior, measured = self.control.prior_pos_accept, self.measured_prior
            est = []
            for i, (trials, accepts) in enumerate(zip(self.pos_trials.tolist(), self.pos_accepts.tolist())):  # one read-back
                w = self.control.prior_pos_weight
                if measured is not None and i < len(measured):
                    prior, w = measured[i], self.control.measured_prior_weight
                prior = (accepts + prior * w) / (trials + w)
                est.append(prior)
            self._pos_accept = est
        return self._pos_accept

    def expected_tokens(self, depth: int) -> float:
        """Expected tokens per row from a step that verifies `depth` drafts, from the
        per-position acceptance: 1 + sum_{i<=depth} prod_{j<=i} a_j (host)."""
        return expected_tokens(self.position_acceptance(), depth)

    def draft_budget(self, rows_in_flight: int) -> int:
        """How deep to draft this step at this many rows (host only; no sync between refreshes).

        fixed: k. entropy: 0 (a plain step, the heads skipped) when drafting steps have not
        delivered more tokens per second than plain steps at this many rows (measured on real
        steps, each drafting rate against a plain step's timed near it: record_step; before
        any, predicted from the cost model). That is what keeps speculation from ever being much slower than `off`
        where drafts are poor or verifying is dear; exploration steps keep re-measuring it.
        Otherwise max_k where the engine stops drafting early (a CPU at few rows), else the depth d that
        maximises E(d) / step_time(rows, 1 + d).
        """
        if self.mode == "off":
            return 0
        if self.mode == "fixed":
            return self.k
        self._refresh()
        key = self.cost.bucket(rows_in_flight)
        if key not in self._budgets:
            best, best_rate = self._best_by_cost(rows_in_flight)
            drafting = self._draft_rate.get(key, best_rate)
            # only a real plain step's time may switch drafting off: a start-up probe skips the
            # step's bookkeeping and would make plain steps look cheaper than they are. Drafting
            # must beat plain steps by draft_margin: it has costs and variance the step model
            # does not see (the heads' prefill, catching up after plain steps, noisy timings),
            # and where the two are within a few percent plain steps are the safe choice.
            advantage = self._advantage.get(key)
            if advantage is None:  # no paired timings yet: the cost model's plain step
                advantage = drafting * self.cost.step_time(rows_in_flight, 1)
            advantage = self._net(advantage, rows_in_flight)
            if key in self._plain_timed and advantage < 1.0 + self.control.draft_margin:
                self._budgets[key] = 0
            elif self.stops_early(rows_in_flight):
                self._budgets[key] = self.max_k
            else:
                # the cost model's best depth to start from, then the depth the climb moved to
                # on real steps (record_step: the cost model's step times come largely from
                # start-up probes, which miss the bookkeeping and catch-up of real steps)
                self._budgets[key] = self._climbed.setdefault(key, best)
        return self._budgets[key]

    def record_heads_prefill(self, rows: int, seconds: float) -> None:
        """Time of the heads' pass over the prompts of `rows` newly admitted rows (a cost a run
        without drafting does not pay: the engine skips it where drafting is measured off)."""
        if rows < 1:
            raise ValueError(f"rows: must be >= 1, got {rows}")
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds: must be a finite duration >= 0, got {seconds}")
        self.heads_prefill_row_s = _ema(self.heads_prefill_row_s, seconds / rows, 0.1)

    def record_finished(self, rows: int, tokens: int) -> None:
        """`rows` rows finished with `tokens` generated tokens in all."""
        if rows < 1:
            return
        self.tokens_per_row = _ema(self.tokens_per_row, tokens / rows, 0.1)

    def prefill_share(self, rows_in_flight: int) -> float:
        """The heads' prefill time per token drafting yields, over drafting's decode time per
        token at this many rows: rows * (tokens per row per second of drafting steps) *
        (heads' prefill seconds per row) / (tokens per row). 0 until all three were measured.

        Each admitted row costs the heads one block over its prompt; a run without drafting
        skips it. Short completions at many rows make it dear: it can exceed the margin drafting
        has to win by (control.draft_margin)."""
        rate = self._draft_rate.get(self.cost.bucket(rows_in_flight))
        if rate is None or self.heads_prefill_row_s is None or not self.tokens_per_row:
            return 0.0
        return rows_in_flight * rate * self.heads_prefill_row_s / self.tokens_per_row

    def _net(self, advantage: float, rows_in_flight: int) -> float:
        """Drafting's advantage over plain steps in decode steps, net of the heads' prefill:
        what the decode steps gain, the prefill gives back (prefill_share)."""
        return advantage / (1.0 + self.prefill_share(rows_in_flight))

    def drafting_off(self, rows_in_flight: int) -> bool:
        """Entropy mode with a draft budget of 0 at this many rows: decode steps are plain ones
        (but for exploring steps) until real timings say drafting pays again."""
        return self.mode == "entropy" and self.draft_budget(rows_in_flight) == 0

    def skips_heads_prefill(self, rows_in_flight: int) -> bool:
        """Whether rows admitted now, bringing this many rows in flight, go without the heads'
        pass over their prompts (entropy mode): where real paired timings put drafting off at
        these rows (measured_plain), or where it is off there by the cost model and no step has
        drafted to a budget in the last idle_prefill_steps decode steps. The pass costs one head
        block per prompt token and pays only for rows that go on to draft; a policy plain by the
        cost model from the start never times a drafting step (so is never measured_plain).
        Exploring steps (which bring drafting back) do not need the pass: they draft blind."""
        if self.mode != "entropy":
            return False
        if self.measured_plain(rows_in_flight):
            return True
        return self.steps - self._drafted_at >= self.control.idle_prefill_steps and self.drafting_off(rows_in_flight)

    def measured_plain(self, rows_in_flight: int) -> bool:
        """Entropy mode, and real paired timings at this many rows put drafting below the bar
        (not the start-up cost model alone): the engine then admits new rows without running
        the heads over their prompts (see rollout.engine._Run._refill)."""
        key = self.cost.bucket(rows_in_flight)
        return self.mode == "entropy" and key in self._advantage and self.draft_budget(rows_in_flight) == 0

    def plan_step(self, rows_in_flight: int) -> tuple[int, int, bool]:
        """(budget, depth, explore) for the next decode step at this many rows; counts the step
        (see _plan), and notes the last step that drafted to a budget (skips_heads_prefill)."""
        budget, depth, explore = self._plan(rows_in_flight)
        if depth and not explore:
            self._drafted_at = self.steps
        return budget, depth, explore

    def _plan(self, rows_in_flight: int) -> tuple[int, int, bool]:
        """(budget, depth, explore) for the next decode step at this many rows; counts the step.

        budget = draft_budget(rows); depth is how deep this step drafts (0: a plain step).
        In entropy mode, now and then a step drafts beyond the budget (explore), so acceptance
        and cost keep being measured there and one slow timing cannot switch drafting off for
        good (any depth is exact; this only costs time): budget + 1, or from a plain stretch
        (budget 0) a burst of explore_burst ordinary drafting steps (explore_depth). While a bucket's budget stays 0
        and exploring keeps confirming it, it explores ever less often (every 32, 64, ... 1024
        steps, and never more often than keeps the exploring steps' extra time within
        explore_overhead of the stretch: where verifying is dear one costs several plain steps). And while
        drafting, every 64th step is a plain one (every 8th near the bar: _plain_every), so the
        plain step's cost that drafting is weighed against is a real timing (the heads catch up
        on it at the next step).
        """
        self.steps += 1
        budget = self.draft_budget(rows_in_flight)
        if self.mode != "entropy":
            return budget, budget, False
        key = self.cost.bucket(rows_in_flight)
        local = self._bucket_steps[key] = self._bucket_steps.get(key, 0) + 1
        clear = bool(budget) and self._clear(key, rows_in_flight)
        if not clear and (key not in self._plain_timed or (self._prev_plain and key not in self._plain_warm)
                          or (budget and not self.plain_fresh(rows_in_flight))):
            # the first step at a new rows bucket is a plain one: only a real plain step's time
            # can switch drafting off there, and a draining batch passes through every bucket,
            # often for fewer steps than the periodic plain step's cadence; and so is the next,
            # until one plain step there followed another (record_step: a warm timing). While
            # drafting, so is the step after the plain timing went stale (_fresh): drafting is
            # weighed against plain steps of the same minute. None of this where drafting is
            # clear (_clear): there a plain timing could not change the choice.
            return budget, 0, False
        left, burst_depth = self._burst.pop(key, (0, 0))
        if left and not budget:  # the rest of a burst of exploring steps from a plain stretch
            if left > 1:
                self._burst[key] = (left - 1, burst_depth)
            return budget, burst_depth, True
        every = self._plain_every(key, rows_in_flight, clear) if budget else 0
        if every and self.steps % every in (47 % every, 48 % every):
            # two in a row: the second is the warm timing drafting is weighed against
            return budget, 0, False
        if budget >= self.max_k and not self._explores_down(budget, rows_in_flight):
            return budget, budget, False
        backoff = (32 if self._climb_settled(key) else 8) if budget else self._explore_gap.get(key, 32)
        self._explore_gap[key] = backoff
        due = self._explore_at.get(key)
        if due is None:
            due = self._explore_at[key] = local + self._explore_plan(rows_in_flight, budget, backoff)[1] - 1
        if local < due:
            return budget, budget, False
        depth, gap = self._explore_plan(rows_in_flight, budget, backoff)
        self._explore_at[key] = local + gap
        if budget:  # the next exploring step goes the other way (where both ways are open)
            self._explore_down[key] = depth > budget
        if not budget:
            self._explore_gap[key] = min(2 * backoff, 1024)
            if self.control.explore_burst > 1:
                self._burst[key] = (self.control.explore_burst - 1, self._burst_neighbour(key, depth, rows_in_flight))
            self._burst_ledger[key] = [max(1, self.control.explore_burst) + 1, 0.0, local]
        return budget, depth, True

    def _burst_neighbour(self, key: int, depth: int, rows_in_flight: int) -> int:
        """The depth of the rest of a burst from a plain stretch that began at `depth`. Where the
        budget is one depth per step (no per-row depths), one depth either side of the climb's, in
        turn (or on the way the climb last moved), each weighed against the burst's first step
        (_climb): the climb goes on from a plain stretch (exploring only at the depth the climb
        stood on, a climb that started where drafting loses would never leave it). Else
        (per-row depths: each step chooses its own) the same depth."""
        neighbour = self._neighbour(key, depth, rows_in_flight)
        if neighbour != depth:
            self._climbed.setdefault(key, depth)
            self._explore_down[key] = neighbour > depth  # the next burst tries the other side
        return neighbour

    def _neighbour(self, key: int, depth: int, rows_in_flight: int) -> int:
        """_burst_neighbour's depth, without its bookkeeping."""
        if self.stops_early(rows_in_flight) or self.max_k < 2:
            return depth
        down = self._explore_down.get(key, False)
        return depth - 1 if (down and depth > 1) or depth >= self.max_k else depth + 1

    def _plain_every(self, key: int, rows_in_flight: int, clear: bool) -> int:
        """While drafting, every n-th step is a plain one: every 64th, or every 8th where drafting's
        advantage is within near_band (5%) above the bar or fewer than min_plain_samples plain
        steps were timed at these rows (unless drafting is `clear` there: _clear, which plan_step
        has computed). Every drafting step is weighed against the latest plain timings, so near
        the bar the advantage rests on few plain steps, and one slow one could keep drafting on
        at a loss. A plain step costs what drafting would have gained, there a few percent."""
        advantage = self._advantage.get(key)
        near = (advantage is not None
                and self._net(advantage, rows_in_flight) < 1.0 + self.control.draft_margin + self.control.near_band)
        # the plain timing rests on too few (unless drafting is clear: then no timing would matter)
        few = self._plain_count.get(key, 0) < self.control.min_plain_samples and not clear
        return 8 if near or few else 64

    def _clear(self, key: int, rows_in_flight: int) -> bool:
        """Whether drafting is clear at this bucket: its paired advantage net of the heads' prefill
        is at least clear_advantage, or, where the bucket has none yet, that of the nearest bucket
        with more rows that has one (verifying only gets cheaper as rows drop). Before any paired
        timing, nothing is clear."""
        for k in range(key, self.cost.num_buckets):
            advantage = self._advantage.get(k)
            if advantage is not None:
                rows = rows_in_flight if k == key else self.cost.bucket_rows(k)
                return self._net(advantage, rows) >= self.control.clear_advantage
        return False

    def stops_early(self, rows_in_flight: int) -> bool:
        """Whether each row's depth is chosen per step (spec_heads.budget: control.per_row_depths,
        by default on a CPU), so the budget is simply max_k; else the budget is the step's one
        depth, and it climbs on the rates real steps deliver (draft_budget)."""
        return self.early_stop

    def _explores_down(self, budget: int, rows_in_flight: int) -> bool:
        """Whether exploring may try one depth shallower: where the budget is one depth for the
        whole step (no per-row depths: by default the GPU) and there is a shallower drafting depth."""
        return budget > 1 and not self.stops_early(rows_in_flight)

    def _explore_plan(self, rows_in_flight: int, budget: int, backoff: int) -> tuple[int, int]:
        """(depth, gap) of an exploring step: budget + 1 while drafting (on the GPU, budget - 1
        every other time), else explore_depth; the gap to the next one is the back-off, but
        from a plain stretch never shorter than keeps the exploring steps' extra time
        (step_time(rows, 1 + depth) - one plain step) within explore_overhead of the stretch:
        where verifying is dear, one exploring step costs several plain ones."""
        if budget:
            key = self.cost.bucket(rows_in_flight)
            down = self._explores_down(budget, rows_in_flight) and (budget >= self.max_k or self._explore_down.get(key, False))
            return (budget - 1 if down else budget + 1), backoff
        depth = self.explore_depth(rows_in_flight)
        plain = self.cost.step_time(rows_in_flight, 1)
        extra = lambda d: max(self.cost.step_time(rows_in_flight, 1 + d) / plain - 1.0, 0.0)
        # the burst's first step at `depth`, the rest at its neighbour (_burst_neighbour)
        key = self.cost.bucket(rows_in_flight)
        cost = self._burst_cost.get(key)
        if cost is None:  # no burst timed at these rows yet: the cost model's
            rest = self._neighbour(key, depth, rows_in_flight)
            cost = extra(depth) + max(0, self.control.explore_burst - 1) * extra(rest)
        return depth, max(backoff, math.ceil(cost / self.control.explore_overhead - 1e-9))

    def _time_burst(self, key: int, seconds: float, emitted: float | None) -> None:
        """Charge one step of the burst being timed at this bucket (_burst_ledger) with its time
        over what plain steps take for the tokens it emitted per row; after the last one (the
        plain step after the burst, which runs cold), the burst's cost in plain steps sets how
        long the bucket waits before exploring again (_explore_plan). The cost model's step times
        come from start-up probes, which can put a burst far below what it really costs with the
        cold plain step after it."""
        ledger, plain = self._burst_ledger.get(key), self._plain_recent.get(key)
        if ledger is None or plain is None:
            return
        ledger[0] -= 1
        ledger[1] += seconds - plain[0] * (1.0 if emitted is None else emitted)
        if ledger[0] <= 0:
            del self._burst_ledger[key]
            cost = self._burst_cost[key] = max(0.0, ledger[1] / plain[0])
            wait = math.ceil(cost / self.control.explore_overhead - 1e-9)
            self._explore_at[key] = max(self._explore_at.get(key, 0), ledger[2] + wait)

    def _best_by_cost(self, rows_in_flight: int) -> tuple[int, float]:
        """(d, rate): the draft depth d >= 1 that maximises E(d) / step_time(rows, 1 + d)."""
        best, best_rate = 1, 0.0
        for d in range(1, self.max_k + 1):
            rate = self.expected_tokens(d) / self.cost.step_time(rows_in_flight, 1 + d)
            if rate > best_rate:
                best, best_rate = d, rate
        return best, best_rate

    def explore_depth(self, rows_in_flight: int) -> int:
        """How deep an exploring step drafts when the budget is 0: the depth drafting would use
        there, so it measures the rate that could switch drafting back on. Where the budget is
        one depth per step, the depth the climb stands on: the cost model's best can be far from
        it (it misses, e.g., the drafts cut by short answers' ends). Else, and before any climb, the depth with the best tokens per second by the cost model
        (where verifying is dear, a max-depth step would cost many plain steps)."""
        climbed = None if self.stops_early(rows_in_flight) else self._climbed.get(self.cost.bucket(rows_in_flight))
        return climbed if climbed is not None else self._best_by_cost(rows_in_flight)[0]

    def observe(self, draft_entropy: torch.Tensor, draft_lengths: torch.Tensor,
                num_accepted: torch.Tensor) -> None:
        """Count the outcome of each verified draft. draft_entropy [B, K]; lengths, accepted [B].

        Depth i (0-based) was tested iff i < draft_lengths and i <= num_accepted: drafts past
        the first rejection were never judged, and counting them as rejected would bias the
        table's conditional acceptance low. It was accepted iff i < num_accepted.
        """
        if self.mode == "entropy":
            self.observe_bins(self.table.bins(draft_entropy), draft_lengths, num_accepted)

    def observe_bins(self, bins: torch.Tensor, draft_lengths: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """`observe` with the drafts' entropy bins (table.bins) [B, K] already computed."""
        if self.mode != "entropy":
            return
        K = bins.shape[1]
        pos = torch.arange(K, device=bins.device)  # [K]
        valid = (pos[None] < draft_lengths[:, None]) & (pos[None] <= num_accepted[:, None])  # [B, K]
        accepted = pos[None] < num_accepted[:, None]  # [B, K]
        self.table.update_bins(bins, accepted & valid, valid)
        self.pos_trials[:K] += valid.sum(0)
        self.pos_accepts[:K] += (accepted & valid).sum(0)  # windowed in position_acceptance

    def record_step(self, rows: int, tokens_per_row: int, seconds: float, planned: int | None = None,
                    emitted: float | None = None, proposed: float | None = None, blind: bool = False,
                    expected: float | None = None) -> None:
        """Time of a real step (draft + verify) with tokens_per_row = 1 + deepest draft in it
        (1: a plain step); `planned`: the depth plan_step gave it (default: tokens_per_row - 1);
        `emitted`: the tokens the step really emitted per row in flight, where known;
        `proposed`: the tokens rejection sampling gave per live row (1 + drafts accepted),
        before stop tokens and max_new_tokens cut them. Start-up probes go to `cost.record`
        directly. `blind`: a step exploring from a plain stretch, without the heads' context
        (its `emitted` times the burst, not the yield of drafting).

        Drafting is weighed by what steps emit: a drafting step yields the expected tokens of its
        depth times the bucket's running ratio of emitted to expected tokens (rows that finished
        mid-step, a last step cut at max_new_tokens or a stop token, rows done but not yet
        collected all lower it; smoothed, since at one row a single step emits anywhere from 1
        to depth + 1 tokens and one unlucky step must not switch drafting off), and a plain
        step's time is per token it emitted (expected and realised yields can differ by enough
        to turn a measured gain into a real loss: docs/bench.md).

        Where the engine says what each step `proposed`, the ratio is emitted / proposed: what
        the batch loses to rows done, stops and max_new_tokens, not how lucky this step's drafts
        were. Acceptance has its own long-memory estimate (expected_tokens): at one row the
        realised acceptance is that of the text being written, and a hard stretch must not
        switch drafting off for good (blind exploring steps leave the ratio alone)."""
        # A plain step that followed a plain step is "warm"; one right after a drafting step
        # runs slower, and drafting competes with plain steps as a run without drafting takes
        # them. The cost model's plain cell takes warm plain steps only (and a cell's first
        # timing): cold timings would otherwise dominate it where each rollout starts plain.
        key = self.cost.bucket(rows)
        if self._burst_ledger:
            self._time_burst(key, seconds, emitted)
        warm, self._prev_plain = self._prev_plain, tokens_per_row == 1
        if tokens_per_row > 1 or warm or not self.cost.has_timing(rows, 1):
            self.cost.record(rows, tokens_per_row, seconds)
        if tokens_per_row == 1:
            self._plain_timed.add(key)
            if emitted is not None and emitted > 0:  # seconds per token per row
                seconds = seconds / min(1.0, emitted)
            # The plain timing is the faster of the last 2 plain steps at near rows, warm ones
            # once there is one, not an average: other load only ever adds time (a machine that
            # speeds up is followed at once, one that slows down at the second timing), and
            # plain steps are rare while drafting: one slow one (e.g. the first decode step after
            # a prefill) would rate drafting for the whole run. A plain step at other rows (a
            # draining batch) starts afresh.
            if self._pairs_with(key, self._plain_recent.get(key), rows):
                samples = self._plain_samples.get(key, [])
            else:
                samples = []
                self._plain_warm.discard(key)
            if warm and key not in self._plain_warm:
                samples = []  # the first warm timing replaces the cold ones
                self._plain_warm.add(key)
            if warm or key not in self._plain_warm:
                samples = (samples + [seconds])[-2:]
            self._plain_samples[key] = samples
            estimate = min(samples)
            self._plain_recent[key] = self._stamp(estimate, rows)
            self._plain_count[key] = self._plain_count.get(key, 0) + 1
            last = self._draft_recent.get(key)  # the latest drafting rates, not an average of old ones
            # only a warm plain timing pairs: a cold one (right after drafting) can run slow
            if key in self._plain_warm and self._pairs_with(key, last, rows):
                self._pair(key, last[0] * estimate, ("draft", last[1]), rows)
        elif self.mode == "entropy":
            if expected is None:  # a ragged step passes its own (per-row depths, chosen by entropy)
                expected = self.expected_tokens(tokens_per_row - 1)
            if emitted is not None and not blind:  # realised over expected, smoothed: one row's yield swings 1..5
                ratio = emitted / proposed if proposed else emitted / expected
                old_yield = self._yield.get(key, 1.0)
                self._yield[key] = old_yield + 0.1 * (ratio - old_yield)
            rate = expected * self._yield.get(key, 1.0) / seconds
            self._draft_rate[key] = _ema(self._draft_rate.get(key), rate, 0.1)
            self._draft_tokens[key] = _ema(self._draft_tokens.get(key), expected * self._yield.get(key, 1.0), 0.1)
            # The drafting rate that pairs is the faster of the last 2 drafting steps at near rows,
            # as the plain timing is the faster of the last 2 plain steps: the same estimator on
            # both sides of the ratio (the latest rate alone against the best of 2 plain steps
            # would rate drafting below what it delivers on a noisy machine).
            prev = self._draft_recent.get(key)
            samples = self._draft_samples.get(key, []) if self._pairs_with(key, prev, rows) else []
            samples = self._draft_samples[key] = (samples + [rate])[-2:]
            self._draft_recent[key] = self._stamp(max(samples), rows)
            self._climb(key, planned if planned else tokens_per_row - 1, rate, rows)
            plain = self._plain_recent.get(key)
            if self._pairs_with(key, plain, rows):
                self._pair(key, self._draft_recent[key][0] * plain[0], ("plain", plain[1]), rows)

    def _climb(self, key: int, depth: int, rate: float, rows: int) -> None:
        """A drafting step of `depth` delivered `rate` (expected tokens per row per second). At
        the depth the climb stands on it is the timing later exploring steps are weighed against;
        one depth either side, it is one sample of that depth's rate over the budget's, against
        the budget's latest step if that pairs (fresh, near rows). Once climb_samples samples put
        a neighbour climb_edge above (or one sample climb_edge_at_once above), the budget moves
        there, and the next exploring step goes on in the same direction: from a start one or
        two depths off the climb gets there within a few dozen steps, before the drafting gate
        has judged drafting by its worst depths."""
        held = self._climbed.get(key)
        if held is None:
            return
        if depth == held:
            self._budget_recent[key] = self._stamp(rate, rows)
            return
        base = self._budget_recent.get(key)
        if abs(depth - held) != 1 or not self._pairs_with(key, base, rows):
            return
        rel = self._depth_rel.setdefault(key, {})
        ema, n = rel.get(depth, (None, 0))
        ema = _ema(ema, rate / base[0], 0.3)
        rel[depth] = (ema, n + 1)
        # a clear edge moves at once; a small one needs climb_samples samples
        if ema > self.control.climb_edge_at_once or (n + 1 >= self.control.climb_samples and ema > self.control.climb_edge):
            self._climbed[key] = depth
            self._depth_rel[key], self._budget_recent[key] = {}, self._stamp(rate, rows)
            self._explore_down[key] = depth < held  # the next exploring step goes on the same way
            self._budgets.pop(key, None)

    def _climb_settled(self, key: int) -> bool:
        """Whether each neighbour of the depth the climb stands on has climb_samples paired samples
        (record_step: _climb): until then, while drafting, every 8th step explores, not every 32nd."""
        held = self._climbed.get(key)
        if held is None:
            return True
        rel = self._depth_rel.get(key, {})
        return all(rel.get(d, (0.0, 0))[1] >= self.control.climb_samples
                   for d in (held - 1, held + 1) if 1 <= d <= self.max_k)

    def _stamp(self, value: float, rows: int) -> tuple[float, int, int, float]:
        """A timing as pairing reads it: (value, step, rows, wall time)."""
        return value, self.steps, rows, self.clock()

    def _fresh(self, key: int, timing: tuple[float, int, int, float]) -> bool:
        """Whether a (value, step, rows, wall time) timing of this bucket may still pair: taken
        within pair_within steps and pair_within_s seconds (or pair_within_plain plain steps'
        time, where the bucket's plain step is slower than pair_within_s / pair_within_plain)."""
        if self.steps - timing[1] > self.control.pair_within:
            return False
        plain = self._plain_recent.get(key)
        span = max(self.control.pair_within_s, self.control.pair_within_plain * plain[0]) if plain else self.control.pair_within_s
        return self.clock() - timing[3] <= span

    def _pairs_with(self, key: int, timing: tuple[float, int, int, float] | None, rows: int) -> bool:
        """Whether a timing of this bucket (None: none yet) pairs with one taken now at `rows`:
        fresh (_fresh) and at nearly the same rows (_near)."""
        return timing is not None and _near(timing[2], rows) and self._fresh(key, timing)

    def plain_fresh(self, rows_in_flight: int) -> bool:
        """Whether the plain timing at this many rows is fresh enough to weigh drafting against."""
        key = self.cost.bucket(rows_in_flight)
        plain = self._plain_recent.get(key)
        return plain is not None and self._fresh(key, plain)

    def _pair(self, key: int, advantage: float, anchor: tuple[str, int], rows: int) -> None:
        """One sample of drafting's advantage over plain steps from timings near in time;
        `anchor` names the older timing of the pair (its kind and step). Where it moves the
        bucket's advantage across the drafting threshold, the bucket's cached budget goes at
        once (not at the next refresh, up to 16 steps later: where verifying is dear, 16
        drafting steps at a loss cost many plain steps).

        Samples that share an anchor move the advantage as one: towards their mean, by at most
        1 - 0.9^pair_anchor_cap of the way. The rare side of a regime (a plain timing while
        drafting, an exploring burst while plain) pairs with every step that follows it; as
        separate samples of an EMA, one both-slow pair of plain steps, or one slow burst, set
        the advantage for the whole stretch. The first samples of a bucket move from the
        advantage its start-up probes predict, so one slow first drafting step cannot keep
        drafting off for a whole run."""
        # a drafting step does all of a plain step's work: it cannot deliver more than the tokens
        # it yields per plain step's time, however a busy machine stretched the plain timing
        advantage = min(advantage, self._draft_tokens.get(key, advantage))
        old = self._advantage.get(key)
        held = self._anchor.get(key)
        if held is None or held[0] != anchor:
            base = old
            if base is None:  # the probes' prediction: their best rate against their plain step
                base = self._best_by_cost(rows)[1] * self.cost.step_time(rows, 1)
            held = (anchor, base, 0, 0.0)  # (anchor, advantage before it, samples, their sum)
        _, base, n, total = held
        n, total = n + 1, total + advantage
        self._anchor[key] = (anchor, base, n, total)
        new = base + (1.0 - 0.9 ** min(n, self.control.pair_anchor_cap)) * (total / n - base)
        self._advantage[key] = new
        bar = 1.0 + self.control.draft_margin  # for the advantage net of the heads' prefill, as draft_budget
        if old is None or (self._net(old, rows) < bar) != (self._net(new, rows) < bar):
            self._budgets.pop(key, None)

    def set_measured_prior(self, acceptance: list[float] | None) -> None:
        """Start each draft position's acceptance estimate from the heads' held-out measurement
        (DraftHeads.measured_acceptance; None: the fixed prior). Observed outcomes take over
        as they come; the entropy table's prior becomes the measured first-depth acceptance."""
        if acceptance is not None:
            if not all(0.0 <= a <= 1.0 for a in acceptance):
                raise ValueError(f"acceptance: must be in [0, 1] per position, got {acceptance}")
            acceptance = [float(a) for a in acceptance]
            self.table.prior_accept = acceptance[0]
            self.table._fitted = None
        self.measured_prior, self._pos_accept, self._budgets = acceptance, None, {}

    def reset_calibration(self, acceptance: list[float] | None = None) -> None:
        """After the heads changed (timings stay). With `acceptance`, the new heads' held-out
        measurement per position: the old outcomes are forgotten and estimates start from it.
        Without, old outcomes become a weak prior: every position and entropy bin keeps its
        estimate with the weight of at most the prior's pseudo-observations, so fresh outcomes
        take over within a few steps (not zero: from a plain stretch, exploring steps are
        blind and do not count acceptance, so a policy reset to a pessimistic fixed prior could
        stay plain for good)."""
        with torch.inference_mode():  # the counts are updated inside the engine's inference mode
            if acceptance is not None:
                self.table.reset()
                self.pos_trials.zero_()
                self.pos_accepts.zero_()
            else:
                self.table.soften(self.table.prior_weight)
                _cap_counts(self.pos_trials, self.pos_accepts, self.control.prior_pos_weight)
        if acceptance is not None:
            self.set_measured_prior(acceptance)
        self._pos_accept, self._budgets, self._draft_rate, self._advantage, self._anchor = None, {}, {}, {}, {}
        self._draft_tokens = {}
        self._draft_recent, self._draft_samples, self._depth_rel, self._climbed = {}, {}, {}, {}
        self._budget_recent = {}

    def summary(self) -> dict:
        """For logs (syncs): acceptance table, cost table, per-depth thresholds, depth histogram."""
        thresholds = {self.cost.bucket_rows(b): [round(self.cost.marginal_ratio(self.cost.bucket_rows(b), i), 4)
                                                 for i in range(1, self.max_k + 1)]
                      for b in range(self.cost.num_buckets)}
        return {"mode": self.mode, "k": self.k, "max_k": self.max_k,
                "acceptance": self.table.table(), "cost": self.cost.table(),
                "cost_calibrated": self.cost.is_calibrated(), "thresholds_by_rows": thresholds,
                "position_acceptance": [round(a, 4) for a in self.position_acceptance()],
                "budget_by_rows": {self.cost.bucket_rows(b): self.draft_budget(self.cost.bucket_rows(b))
                                   for b in range(self.cost.num_buckets)},
                "heads_prefill_row_s": self.heads_prefill_row_s, "tokens_per_row": self.tokens_per_row,
                "prefill_share_by_rows": {self.cost.bucket_rows(b): round(self.prefill_share(self.cost.bucket_rows(b)), 4)
                                          for b in range(self.cost.num_buckets)},
                "depth_hist": list(self.depth_hist)}
