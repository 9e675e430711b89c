"""Entropy-aware draft depth: how many of the drafted tokens each row submits for verification.

Per row and step, keep drafting while the predicted chance that all drafts so far are accepted
is worth the marginal cost of verifying one more token per row (DESIGN.md, "Entropy-aware draft
depth"). Two online estimates feed the rule:
- `AcceptanceTable`: draft entropy bin -> conditional acceptance (accepted given that every
  earlier draft of the row was accepted), counted on the device from the engine's own outcomes;
- `CostModel`: step time as a function of (rows in flight, tokens verified per row), timed on
  the host from the engine's real steps and its start-up probes.

This module knows nothing about models, heads or the KV cache. `choose` and `observe` run every
decode step, so they never synchronise with the device: no .item(), no branching on tensor
values; cost thresholds are host floats, moved to the device without a blocking copy.
"""
from __future__ import annotations

import math
import time

import torch

_MODES = ("off", "fixed", "entropy")


def isotonic_decreasing(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted least-squares fit of `values` [n] that is non-increasing, on device, no sync.

    Uses the min-max formula f(k) = min_{i<=k} max_{j>=k} avg_w(values[i..j]) (Barlow et al.
    1972), O(n^2): n is the number of entropy bins, so this is a handful of tiny kernels.
    """
    n = values.shape[0]
    zero = values.new_zeros(1)
    sum_w = torch.cat([zero, weights.cumsum(0)])  # [n+1]
    sum_wv = torch.cat([zero, (weights * values).cumsum(0)])  # [n+1]
    idx = torch.arange(n, device=values.device)
    upper = idx[None, :] >= idx[:, None]  # [i, j] valid where j >= i
    denom = (sum_w[1:][None, :] - sum_w[:-1][:, None]).clamp_min(1e-12)  # [n, n]
    avg = (sum_wv[1:][None, :] - sum_wv[:-1][:, None]) / denom  # [i, j] mean of bins i..j
    avg = torch.where(upper, avg, torch.full_like(avg, -math.inf))
    suffix_max = avg.flip(1).cummax(1).values.flip(1)  # [i, k] max_{j>=k} avg(i, j)
    prefix_min = suffix_max.cummin(0).values  # [i, k] min_{i'<=i} of the above
    return prefix_min.diagonal()  # f(k) = prefix_min[k, k]


def _near(rows_a: int, rows_b: int) -> bool:
    """Two timings are comparable: their rows in flight differ by at most 1/8 (or one row).
    A rows bucket spans up to 2x; where steps are compute-bound their time follows the rows, so
    a plain step timed at 128 rows against drafting at 70 (a draining batch) would credit
    drafting with the rows it lost."""
    return abs(rows_a - rows_b) <= max(1, max(rows_a, rows_b) // 8)


def _ema(old: float | None, value: float, weight: float) -> float:
    """Exponential moving average: `value` where there is none yet, else `weight` of the way there."""
    return value if old is None else old + weight * (value - old)


def _cap_counts(trials: torch.Tensor, accepts: torch.Tensor, cap: float) -> None:
    """Scale each entry's (trials, accepts) down, in place and without a sync, so that it holds
    at most `cap` trials: the estimate accepts / trials stays, its weight shrinks."""
    scale = (cap / trials.clamp_min(1.0)).clamp(max=1.0)
    trials.mul_(scale)
    accepts.mul_(scale)


class AcceptanceTable:
    """Draft entropy bin -> acceptance of that draft given all earlier drafts were accepted.

    Bins are uniform in log(1 + entropy) over [0, max_entropy]: most drafts have low entropy,
    so the low end gets the finest bins. Each bin starts at `prior_accept` with the weight of
    `prior_weight` observations. `window` caps the observations a bin remembers (older counts
    are scaled down), so the table follows acceptance as the policy and heads move. With
    `monotone`, predictions are fitted non-increasing in entropy (a flatter draft distribution
    is never predicted more acceptable), which keeps draft depth monotone in entropy.
    """

    def __init__(self, num_bins: int, max_entropy: float, prior_accept: float = 0.5,
                 prior_weight: float = 4.0, device=None, window: float = 4096.0,
                 monotone: bool = True):
        if num_bins < 2:
            raise ValueError(f"num_bins: must be >= 2, got {num_bins}")
        if not max_entropy > 0:
            raise ValueError(f"max_entropy: must be > 0 (log of the vocab size), got {max_entropy}")
        if not 0.0 <= prior_accept <= 1.0:
            raise ValueError(f"prior_accept: must be in [0, 1], got {prior_accept}")
        if not prior_weight > 0:
            raise ValueError(f"prior_weight: must be > 0 (pseudo-observations per bin), got {prior_weight}")
        if not window > prior_weight:
            raise ValueError(f"window: must be > prior_weight ({prior_weight}), got {window}")
        self.num_bins, self.max_entropy = num_bins, float(max_entropy)
        self.prior_accept, self.prior_weight = float(prior_accept), float(prior_weight)
        self.window, self.monotone = float(window), monotone
        self.refit_every = 8  # updates between re-fits of the predictions (each is ~15 kernels)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        log_edges = torch.linspace(0.0, math.log1p(self.max_entropy), num_bins + 1, dtype=torch.float64)
        self.edges = torch.expm1(log_edges).to(self.device)  # [num_bins + 1], nats
        self._inner_edges = self.edges[1:-1].float()  # [num_bins - 1]
        self.reset()

    def reset(self) -> None:
        """Forget every observation (back to the prior)."""
        # float64 counts: exact for integers far past any run length; device-side, no sync.
        self.trials = torch.zeros(self.num_bins, dtype=torch.float64, device=self.device)
        self.accepts = torch.zeros(self.num_bins, dtype=torch.float64, device=self.device)
        self._fitted = None  # [num_bins] float32, recomputed lazily after an update
        self._stale = 0  # updates since the last fit

    def soften(self, weight: float) -> None:
        """Keep each bin's estimate but with the weight of at most `weight` observations."""
        _cap_counts(self.trials, self.accepts, weight)
        self._fitted, self._stale = None, 0

    def bins(self, draft_entropy: torch.Tensor) -> torch.Tensor:
        """Bin index (int64, same shape) of each entropy; out-of-range values go to the end bins."""
        entropy = torch.nan_to_num(draft_entropy.float(), nan=self.max_entropy)
        return torch.bucketize(entropy, self._inner_edges, right=True)

    def _fit(self) -> torch.Tensor:
        if self._fitted is None:
            weights = self.trials + self.prior_weight  # [num_bins]
            values = (self.accepts + self.prior_accept * self.prior_weight) / weights
            if self.monotone:
                values = isotonic_decreasing(values, weights)
            self._fitted = values.clamp(0.0, 1.0).float()
        return self._fitted

    def predict(self, draft_entropy: torch.Tensor) -> torch.Tensor:
        """Predicted acceptance in [0, 1] per draft, float32, same shape as draft_entropy."""
        return self._fit()[self.bins(draft_entropy)]

    def predict_bins(self, bins: torch.Tensor) -> torch.Tensor:
        """`predict` for bin indices already computed (`bins`)."""
        return self._fit()[bins]

    def update(self, draft_entropy: torch.Tensor, accepted: torch.Tensor, valid: torch.Tensor) -> None:
        """Count outcomes. draft_entropy [B, K]; accepted, valid [B, K] bool (accepted implies valid)."""
        self.update_bins(self.bins(draft_entropy), accepted, valid)

    def update_bins(self, bins: torch.Tensor, accepted: torch.Tensor, valid: torch.Tensor) -> None:
        """`update` for bin indices already computed (`bins`) [B, K]."""
        b = bins.flatten()  # [B*K]
        self.trials.index_add_(0, b, valid.flatten().to(torch.float64))
        self.accepts.index_add_(0, b, (accepted & valid).flatten().to(torch.float64))
        # Predictions follow the counts within `refit_every` updates: a decode step updates the
        # table every time, and re-fitting each time cost more than the step's own sampling.
        self._window()
        self._stale += 1
        if self._stale >= self.refit_every:
            self._fitted, self._stale = None, 0

    def _window(self) -> None:
        """Sliding memory without a sync: scale a bin down once it holds more than `window`."""
        _cap_counts(self.trials, self.accepts, self.window)

    def table(self) -> list[dict]:
        """Per bin: entropy range, observations (after windowing), raw and predicted acceptance."""
        self._fitted, self._stale = None, 0  # show the fit of every count so far
        trials, accepts = self.trials.tolist(), self.accepts.tolist()
        fitted, edges = self._fit().tolist(), self.edges.tolist()
        return [{"entropy_lo": edges[i], "entropy_hi": edges[i + 1], "count": trials[i],
                 "observed": accepts[i] / trials[i] if trials[i] > 0 else None,
                 "predicted": fitted[i]} for i in range(self.num_bins)]


def prior_marginal_ratio(rows: int) -> float:
    """Slope of step time in tokens per row, relative to a one-token step, before any timing.

    Decoding a few rows is memory- and launch-bound: verifying one more token per row costs a
    small fraction of a step (about 0.1 of it at one row here, deliberately above the few
    percent a GPU shows). The cost grows with rows until the forward is compute-bound, where a
    step's time is proportional to its tokens (slope 1): 0.1 * sqrt(rows), capped at 1, reaches
    1 at 100 rows. With this prior and prior acceptance 0.5 the rule drafts 2 tokens at one row,
    1 at up to 24 rows and none from 25 rows, until real timings replace it.
    """
    return min(1.0, 0.1 * math.sqrt(rows))


class CostModel:
    """Time of one decode step (draft + verify) as a function of (rows in flight, tokens per row).

    Rows are bucketed by powers of two (bucket b holds rows in (2^(b-1), 2^b]); each (bucket,
    tokens) cell keeps an exponential moving average of the seconds recorded for it. Within a
    bucket, time is piecewise linear in tokens through the measured cells (extrapolated with
    the nearest segment's slope), made non-decreasing so noise never yields a negative cost.
    """

    def __init__(self, max_batch: int, max_tokens: int, ema: float = 0.1):
        if max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {max_batch}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1 (1 + deepest draft), got {max_tokens}")
        if not 0.0 < ema <= 1.0:
            raise ValueError(f"ema: must be in (0, 1] (weight of the newest timing), got {ema}")
        self.max_batch, self.max_tokens, self.ema = max_batch, max_tokens, ema
        self.num_buckets = self.bucket(max_batch) + 1
        # [bucket][tokens] -> (EMA seconds, count); index 0 of tokens unused
        self._seconds: list[list[float | None]] = [[None] * (max_tokens + 1) for _ in range(self.num_buckets)]
        self._counts = [[0] * (max_tokens + 1) for _ in range(self.num_buckets)]
        self.version = 0  # bumped on every record, so callers can cache what they derive
        # per bucket: forgetting-weighted sums (n, x, x^2, y, xy) of drafted steps (x = tokens)
        self.line_forget = min(ema, 0.05)
        self._line = [[0.0] * 5 for _ in range(self.num_buckets)]

    @staticmethod
    def bucket(rows: int) -> int:
        return (rows - 1).bit_length()  # 1 -> 0, 2 -> 1, 3..4 -> 2, 5..8 -> 3, ...

    def bucket_rows(self, bucket: int) -> int:
        """The rows a bucket stands for: its upper end, capped at max_batch."""
        return min(1 << bucket, self.max_batch)

    @staticmethod
    def probe_plan(max_batch: int, max_tokens: int) -> list[tuple[int, int]]:
        """(rows, tokens per row) pairs to time at start-up, one bucket and token count each.

        Time each pair as a full step (a draft of depth tokens - 1 and a verify forward over
        [rows, tokens]) after a warm-up, and `record` it; every bucket then has a measured slope
        and the prior is never used where verifying is dear.
        """
        rows = sorted({min(1 << b, max_batch) for b in range(CostModel.bucket(max_batch) + 1)})
        return [(r, t) for r in rows for t in range(1, max_tokens + 1)]

    def _check(self, rows: int, tokens_per_row: int) -> None:
        if not 1 <= rows <= self.max_batch:
            raise ValueError(f"rows: must be in 1..max_batch ({self.max_batch}), got {rows}; "
                             "build the CostModel with the engine's max batch")
        if tokens_per_row < 1:
            raise ValueError(f"tokens_per_row: must be >= 1, got {tokens_per_row}")

    def record(self, rows: int, tokens_per_row: int, seconds: float) -> None:
        self._check(rows, tokens_per_row)
        if tokens_per_row > self.max_tokens:
            raise ValueError(f"tokens_per_row: must be <= max_tokens ({self.max_tokens}), got "
                             f"{tokens_per_row}; build the CostModel with max_tokens = 1 + max_k")
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"seconds: must be a positive finite duration, got {seconds}")
        b = self.bucket(rows)
        old = self._seconds[b][tokens_per_row]
        self._seconds[b][tokens_per_row] = _ema(old, seconds, self.ema)
        self._counts[b][tokens_per_row] += 1
        if tokens_per_row >= 2:  # drafting steps also feed the bucket's least-squares line
            sums, x = self._line[b], float(tokens_per_row)
            for i, v in enumerate((1.0, x, x * x, seconds, x * seconds)):
                sums[i] = sums[i] * (1.0 - self.line_forget) + v
        self.version += 1

    def has_timing(self, rows: int, tokens_per_row: int) -> bool:
        """Whether a step of this many tokens per row was timed in this rows bucket."""
        return self._seconds[self.bucket(rows)][tokens_per_row] is not None

    def _measured(self, bucket: int) -> list[tuple[int, float]]:
        """(tokens, seconds) known in a bucket, times made non-decreasing in tokens."""
        points, running = [], 0.0
        for t in range(1, self.max_tokens + 1):
            s = self._seconds[bucket][t]
            if s is not None:
                running = max(running, s)
                points.append((t, running))
        return points

    def _bucket_time(self, bucket: int, points: list[tuple[int, float]], tokens: int) -> float:
        n, sx, sxx, sy, sxy = self._line[bucket]
        var = sxx * n - sx * sx
        if tokens >= 2 and n >= 3 and var > 0.5 * n * n:  # drafted steps at 2+ widths
            # A least-squares line through every drafted step recorded in the bucket (with
            # exponential forgetting), not through per-width averages: single timings are
            # noisy at the millisecond scale, widths seen a few times in unusual steps would
            # tilt a line through averages, and a local slope between two of them can swing
            # depth choices by several tokens. tokens == 1 (no drafting) keeps its own
            # measurement: the first draft also pays the heads' fixed start-up cost.
            slope = max(0.0, (sxy * n - sx * sy) / var)
            return max((sy - slope * sx) / n + slope * tokens, 1e-12)
        if len(points) == 1:  # one anchor: take the slope from the prior
            (t0, s0), r = points[0], prior_marginal_ratio(self.bucket_rows(bucket))
            return s0 * (1 + r * (tokens - 1)) / (1 + r * (t0 - 1))
        if tokens <= points[0][0]:
            (t0, s0), (t1, s1) = points[0], points[1]
        elif tokens >= points[-1][0]:
            (t0, s0), (t1, s1) = points[-2], points[-1]
        else:
            i = next(i for i, (t, _) in enumerate(points) if t >= tokens)
            (t0, s0), (t1, s1) = points[i - 1], points[i]
        return max(s0 + (s1 - s0) * (tokens - t0) / (t1 - t0), 1e-12)

    def step_time(self, rows: int, tokens_per_row: int) -> float:
        """Seconds of a step; in prior units (a one-token step at one row = 1) before any timing."""
        self._check(rows, tokens_per_row)
        b = self.bucket(rows)
        points = self._measured(b)
        if points:
            return self._bucket_time(b, points, tokens_per_row)
        measured = [c for c in range(self.num_buckets) if self._measured(c)]
        if not measured:
            return 1.0 + prior_marginal_ratio(self.bucket_rows(b)) * (tokens_per_row - 1)
        # nearest measured bucket, ties to the larger (dearer) one, scaled by rows
        near = min(measured, key=lambda c: (abs(c - b), -c))
        scale = self.bucket_rows(b) / self.bucket_rows(near)
        return scale * self._bucket_time(near, self._measured(near), tokens_per_row)

    def marginal_ratio(self, rows: int, tokens_per_row: int) -> float:
        """(time(tokens + 1) - time(tokens)) / time(tokens): relative cost of one more token per row."""
        now = self.step_time(rows, tokens_per_row)
        return max(0.0, (self.step_time(rows, tokens_per_row + 1) - now) / now)

    def is_calibrated(self) -> bool:
        """Every bucket up to max_batch has at least two token counts timed (a measured slope)."""
        return all(len(self._measured(b)) >= 2 for b in range(self.num_buckets))

    def table(self) -> list[dict]:
        rows = []
        for b in range(self.num_buckets):
            lo, hi = (1 << (b - 1)) + 1 if b else 1, self.bucket_rows(b)
            for t in range(1, self.max_tokens + 1):
                if self._seconds[b][t] is not None:
                    rows.append({"rows": f"{lo}..{hi}", "tokens_per_row": t, "seconds": self._seconds[b][t],
                                 "count": self._counts[b][t],
                                 "marginal_ratio": self.marginal_ratio(hi, t)})
        return rows


def expected_tokens(accept_rate_per_pos: list[float], depth: int) -> float:
    """Expected tokens from a step verifying `depth` drafts, given the conditional acceptance at
    each position: 1 + a_1 + a_1 a_2 + ... (i.i.d. a gives (1 - a^(depth+1)) / (1 - a))."""
    expected, all_accepted = 1.0, 1.0
    for a in accept_rate_per_pos[:depth]:
        all_accepted *= a
        expected += all_accepted
    return expected


def predicted_speedup(accept_rate_per_pos: list[float], cost: CostModel, rows: int, k: int) -> float:
    """Expected tokens per step / (step_time(rows, 1 + k) / step_time(rows, 1)).

    accept_rate_per_pos[i]: acceptance of the draft at depth i + 1 given that all earlier drafts
    of the row were accepted (i.i.d. acceptance a gives (1 - a^(k+1)) / (1 - a) tokens).
    """
    if len(accept_rate_per_pos) < k:
        raise ValueError(f"accept_rate_per_pos: needs k={k} entries, got {len(accept_rate_per_pos)}")
    return expected_tokens(accept_rate_per_pos, k) / (cost.step_time(rows, 1 + k) / cost.step_time(rows, 1))


class DepthPolicy:
    """Chooses per row how many of the available drafts to verify; mode off | fixed | entropy."""

    def __init__(self, mode: str, k: int, max_k: int, num_bins: int, vocab_size: int,
                 max_batch: int, device=None):
        if mode not in _MODES:
            raise ValueError(f"mode: must be off, fixed or entropy, got {mode!r}")
        if max_k < 1:
            raise ValueError(f"max_k: must be >= 1, got {max_k}")
        if not 1 <= k <= max_k:
            raise ValueError(f"k: must be in 1..max_k ({max_k}), got {k}")
        if vocab_size < 2:
            raise ValueError(f"vocab_size: must be >= 2, got {vocab_size}")
        self.mode, self.k, self.max_k = mode, k, max_k
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.table = AcceptanceTable(num_bins, math.log(vocab_size), device=self.device)
        # a long memory (~50 steps per cell): step times are a property of the model and
        # machine, and millisecond timings are noisy
        self.cost = CostModel(max_batch, 1 + max_k, ema=0.02)
        self.depth_hist = [0] * (max_k + 1)  # host: row-steps by draft depth
        # Conditional acceptance per draft position (accepted given all earlier ones were), the
        # batch-level estimate behind the draft budget. It starts optimistic (prior_pos_accept
        # with the weight of prior_pos_weight observations), so fresh heads get tried; weak
        # heads lose their budget within a few steps of real outcomes.
        self.prior_pos_accept, self.prior_pos_weight, self.pos_window = 0.8, 8.0, 4096.0
        # the heads' own held-out measurement per position, where known (set_measured_prior)
        self.measured_prior: list[float] | None = None
        self.pos_trials = torch.zeros(max_k, dtype=torch.float64, device=self.device)
        self.pos_accepts = torch.zeros(max_k, dtype=torch.float64, device=self.device)
        self._pos_accept: list[float] | None = None  # host copy, refreshed with the thresholds
        self._thresholds: dict[tuple[int, int], torch.Tensor] = {}  # (bucket, K) -> [K]
        self._ratios: dict[int, list[float]] = {}  # bucket -> host marginal ratios, depth 1..max_k
        self._thresholds_version = -1
        self._budgets: dict[int, int] = {}  # bucket -> deepest useful draft
        # bucket -> EMA of expected tokens per row per second over real drafting steps: what
        # drafting actually delivers
        self._draft_rate: dict[int, float] = {}
        self._plain_timed: set[int] = set()  # buckets where a real plain step was timed
        # Drafting against plain steps, paired in time (see record_step): bucket -> EMA of
        # (drafted tokens per second) / (plain tokens per second), each sample from timings a
        # few steps apart. A shared machine's speed drifts by tens of percent over minutes;
        # plain steps are rare while drafting (and drafting steps rare while plain), so an
        # average plain step set against recent drafting steps would mostly measure the drift.
        # Only timings at nearly the same rows pair (_near).
        # Timings pair only while fresh (_fresh): within pair_within steps and pair_within_s
        # seconds of wall time (or pair_within_plain plain steps' time, where plain steps are
        # slow). Counted in steps alone, a plain timing outlived the minute it was taken in:
        # where other work runs between generate() calls (the bench's other modes; a trainer's
        # update), the policy's next call paired its drafting steps against a plain step timed
        # on a machine 1.7x faster, rated drafting below the bar and stayed plain (the tiny
        # policy at 32 rows on the CPU: 0.94x where fixed depth 6 gave 1.29x, docs/bench.md
        # session 10). While drafting, a stale plain timing is re-measured by a pair of plain
        # steps (plan_step).
        self._plain_recent: dict[int, tuple[float, int, int, float]] = {}  # bucket -> (seconds, step, rows, wall time)
        self._draft_recent: dict[int, tuple[float, int, int, float]] = {}  # bucket -> (rate, step, rows, wall time) of the last drafting step
        self._advantage: dict[int, float] = {}
        self._draft_samples: dict[int, list[float]] = {}  # bucket -> last 2 drafting rates at near rows
        self._anchor: dict[int, tuple] = {}  # bucket -> (anchor, base, n, sum) of the pairs sharing an anchor (_pair)
        self.pair_anchor_cap = 10  # pairs sharing one anchor move the advantage by at most 1 - 0.9^10 = 65%
        self._plain_samples: dict[int, list[float]] = {}  # bucket -> last 2 plain timings at near rows
        self._plain_count: dict[int, int] = {}  # bucket -> plain steps timed there, ever
        self.min_plain_samples = 4  # until then, while drafting, every 8th step is a plain one
        self._plain_warm: set[int] = set()  # buckets whose plain samples are warm timings
        self._prev_plain = False  # whether the last step recorded was a plain one
        self.pair_within = 128  # steps: how far apart two timings may be to pair
        self.pair_within_s, self.pair_within_plain = 2.0, 32  # and how far apart in wall time
        self.clock = time.perf_counter  # wall time of the timings (tests set their own)
        # On a CPU the engine stops drafting early (keep_drafting), per step, where the batch has
        # few rows: their drafts' entropies tell when to stop. At more rows the batch sums make
        # that rule a near-constant depth from an imperfect step model, and one depth for the
        # whole step climbs on real timings instead, as on the GPU (the tiny policy at 128 rows
        # on the CPU: early stop drafted 1-2 deep at times, where 1-deep steps deliver less than
        # plain ones and fixed depths 3-6 gained 1.2-1.4x; docs/bench.md session 12).
        self.early_stop = self.device.type != "cuda"
        self.early_stop_rows = 8  # early stop up to this many rows in flight (stops_early)
        self.draft_margin = 0.05  # drafting must deliver 5% more tokens per second than plain steps
        # Drafting that delivers at least this many times plain steps' tokens per second is
        # "clear" (_clear): no plain timing a noisy machine gives could move it below the bar, so
        # plain steps are taken only at the periodic cadence of every 64th step, not when the
        # plain timing goes stale, nor every 8th while few were timed, nor at the first steps at
        # a new rows bucket (a bucket borrows the nearest clear one above it: drafting's
        # advantage only grows as rows drop). On an H200, the tiny policy at 32 rows drafted
        # 8 deep at 1.7x of plain steps, and each call still took a pair of plain steps at full
        # rows when the last plain timing passed 2 s (the bench's other modes run between
        # calls), and two more at each bucket the draining batch entered: 1.50x where fixed 8
        # gave 1.62x.
        self.clear_advantage = 1.5
        self.near_band = 0.05  # within this above the bar, plain steps come 8x as often (_plain_every)
        # Exploration (see plan_step), counted in decode steps over the policy's life: across
        # generate() calls, so a rollout batch of a few dozen steps does not explore at the
        # same early step every time, and per rows bucket, like the budget it re-checks.
        # The exploring cadence counts each bucket's own steps: a draining batch passes through
        # the buckets below its full size for a few steps per rollout, and counted in all steps
        # the back-off came due at each of them in nearly every rollout (the tiny policy at 128
        # rows on the CPU: 3-6 exploring steps per call in the tail's buckets, each bucket
        # exploring 2 of its ~10 steps; 5% of the call where drafting was off throughout).
        self.steps = 0
        self._bucket_steps: dict[int, int] = {}  # bucket -> decode steps planned at it
        self._explore_at: dict[int, int] = {}  # bucket -> its step count at its next exploring step
        self._explore_gap: dict[int, int] = {}  # bucket -> back-off between exploring steps
        # exploring from a plain stretch costs at most this share of the stretch, by what the
        # last burst really cost (_burst_ledger) once one was timed, by the cost model before
        self.explore_overhead = 0.01
        # bucket -> [steps left to time, extra seconds so far, its step count at the burst's
        # start] of the burst being timed: its exploring steps and the plain step after them
        # (which runs cold), each against the plain steps' time for the tokens it emitted
        self._burst_ledger: dict[int, list] = {}
        self._burst_cost: dict[int, float] = {}  # bucket -> the last burst's extra time, in plain steps
        # From a plain stretch, exploring steps come in bursts of explore_burst drafting steps:
        # the drafting rate that pairs is the faster of the last 2 (record_step), and one lone
        # exploring step that a noisy machine slowed rated drafting for the whole stretch.
        self.explore_burst = 2
        self._burst: dict[int, tuple[int, int]] = {}  # bucket -> (exploring steps left, depth)
        # Where the budget is one depth for the whole step (no early stop: the GPU, or a CPU at
        # many rows), it climbs on real timings: exploring steps one deeper and one shallower, in
        # turn, each weighed against the latest step at the budget (paired in time, as drafting
        # against plain steps: a CPU's speed drifts by tens of percent between minutes, and
        # per-depth averages taken minutes apart climbed SmolLM2 at 32 rows to 3-deep drafts at
        # 0.98x of off where 1-deep ones gave 1.18x). bucket -> {depth: (EMA of the explored
        # depth's rate over the budget's, samples)}, reset when the budget moves.
        self._depth_rel: dict[int, dict[int, tuple[float, int]]] = {}
        self._budget_recent: dict[int, tuple[float, int, int, float]] = {}  # bucket -> (rate, step, rows, wall time) at the budget
        self.climb_edge, self.climb_samples = 1.03, 2  # move on a 3% edge over 2 paired samples
        self.climb_edge_at_once = 1.10  # or on a 10% edge in one
        self._explore_down: dict[int, bool] = {}
        self._climbed: dict[int, int] = {}  # bucket -> the depth the climb stands on
        self._yield: dict[int, float] = {}  # bucket -> EMA of emitted / expected tokens of drafting steps
        # What drafting costs outside decode steps: the heads' pass over each admitted prompt
        # (record_heads_prefill), set against the tokens a row goes on to yield (record_finished);
        # EMAs over prefills and finished rows (prefill_share).
        self.heads_prefill_row_s: float | None = None  # seconds of the heads' prefill per admitted row
        self.tokens_per_row: float | None = None  # tokens a finished row generated
        # Rows are admitted without that pass where drafting is off and idle (skips_heads_prefill):
        # self.steps at the last step that drafted to a budget, and how many plain (or exploring)
        # steps since then make drafting idle.
        self._drafted_at = 0
        self.idle_prefill_steps = 128

    def _refresh(self) -> None:
        """Re-derive host-side caches once per 16 timings: every step records one, and the
        derivation is host Python (and, on a GPU, one read-back of the acceptance counts)
        that would otherwise cost ~10% of a small model's step."""
        epoch = self.cost.version // 16
        if self._thresholds_version != epoch:
            self._thresholds, self._ratios, self._budgets = {}, {}, {}
            self._pos_accept, self._thresholds_version = None, epoch

    def marginal_ratios(self, rows_in_flight: int) -> list[float]:
        """Host floats: marginal_ratio(rows, i) for depth i = 1..max_k (cached per bucket)."""
        self._refresh()
        key = self.cost.bucket(rows_in_flight)
        if key not in self._ratios:
            self._ratios[key] = [self.cost.marginal_ratio(rows_in_flight, i) for i in range(1, self.max_k + 1)]
        return self._ratios[key]

    def thresholds(self, rows_in_flight: int, num_drafts: int) -> torch.Tensor:
        """[K] float32 on device: marginal_ratio(rows, i) for depth i = 1..K (cached per bucket)."""
        self._refresh()
        key = (self.cost.bucket(rows_in_flight), num_drafts)
        if key not in self._thresholds:
            host = torch.tensor(self.marginal_ratios(rows_in_flight)[:num_drafts], dtype=torch.float32)
            if self.device.type == "cuda":  # pinned + non_blocking: no wait on the stream
                host = host.pin_memory()
            self._thresholds[key] = host.to(self.device, non_blocking=True)
        return self._thresholds[key]

    def position_acceptance(self) -> list[float]:
        """Host floats [max_k]: estimated acceptance at each draft position, given that every
        earlier draft was accepted (windowed counts of observed outcomes plus the prior)."""
        self._refresh()
        if self._pos_accept is None:
            # sliding memory: scale the counts down once a position holds more than pos_window
            _cap_counts(self.pos_trials, self.pos_accepts, self.pos_window)
            # Each position's prior is the estimate of the position before it (the first's is
            # prior_pos_accept): a depth never drafted yet is assumed as good as the last one
            # measured, not reset to a fixed guess that would keep it from ever being tried.
            # Where the heads come with a held-out measurement (set_measured_prior), that is
            # each position's prior instead.
            w, prior, measured = self.prior_pos_weight, self.prior_pos_accept, self.measured_prior
            est = []
            for i, (trials, accepts) in enumerate(zip(self.pos_trials.tolist(), self.pos_accepts.tolist())):  # one read-back
                if measured is not None and i < len(measured):
                    prior = measured[i]
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
            if key in self._plain_timed and advantage < 1.0 + self.draft_margin:
                self._budgets[key] = 0
            elif self.stops_early(rows_in_flight):
                self._budgets[key] = self.max_k
            else:
                # the cost model's best depth to start from, then the depth the climb moved to
                # on real steps (record_step: the cost model's step times come largely from
                # start-up probes, which miss the bookkeeping and catch-up of real steps: on an
                # H200 they chose 4-deep drafts for SmolLM2 at 128 rows, 0.92x, where 2 gave 1.20x)
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
        skips it. Short completions at many rows make it dear: the tiny policy's ~21-token
        answers at 128 rows on the CPU spent 0.06-0.10 s of a 1.6-2.2 s run there, 6-8% of its
        drafting steps' time, more than the 5% drafting had to win by (draft_margin)."""
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
        block per prompt token and pays only for rows that go on to draft. SmolLM2 at 128 rows
        on the CPU stayed plain by the cost model from the start, never timed a drafting step
        there (so never measured_plain), and paid the pass on every prompt: 14% more prefill,
        0.93x of off where its decode steps ran even with off's (docs/bench.md, session 22).
        Exploring steps (which bring drafting back) do not need the pass: they draft blind."""
        if self.mode != "entropy":
            return False
        if self.measured_plain(rows_in_flight):
            return True
        return self.steps - self._drafted_at >= self.idle_prefill_steps and self.drafting_off(rows_in_flight)

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
            if self.explore_burst > 1:
                self._burst[key] = (self.explore_burst - 1, self._burst_neighbour(key, depth, rows_in_flight))
            self._burst_ledger[key] = [max(1, self.explore_burst) + 1, 0.0, local]
        return budget, depth, True

    def _burst_neighbour(self, key: int, depth: int, rows_in_flight: int) -> int:
        """The depth of the rest of a burst from a plain stretch that began at `depth`. Where the
        budget is one depth per step (no early stop), one depth either side of the climb's, in
        turn (or on the way the climb last moved), each weighed against the burst's first step
        (_climb): the climb goes on from a plain stretch. Exploring only at the depth the climb
        stood on, a climb that started at a depth where drafting loses never left it (the tiny
        policy at 128 rows on the CPU: probes put the best depth at 1, real 1-deep steps
        delivered 0.9x of plain ones and depths 3-6 1.2x; entropy mode stayed plain, 0.94x).
        Else (early stop decides each step's depth) the same depth."""
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
        has computed). Every drafting step is weighed against the
        latest plain timings, so near the bar the advantage rests on few plain steps and one
        slow one kept drafting on at a loss (SmolLM2 at 32 rows on the CPU: rated above the bar,
        0.92x of off). A plain step costs what drafting would have gained, there a few percent."""
        advantage = self._advantage.get(key)
        near = (advantage is not None
                and self._net(advantage, rows_in_flight) < 1.0 + self.draft_margin + self.near_band)
        # the plain timing rests on too few (unless drafting is clear: then no timing would matter)
        few = self._plain_count.get(key, 0) < self.min_plain_samples and not clear
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
                return self._net(advantage, rows) >= self.clear_advantage
        return False

    def stops_early(self, rows_in_flight: int) -> bool:
        """Whether the engine ends each step's draft chain by keep_drafting at this many rows (a
        CPU, at most early_stop_rows rows); else the budget is the step's one depth, and it
        climbs on the rates real steps deliver (draft_budget)."""
        return self.early_stop and self.cost.bucket(rows_in_flight) <= self.cost.bucket(self.early_stop_rows)

    def _explores_down(self, budget: int, rows_in_flight: int) -> bool:
        """Whether exploring may try one depth shallower: where the budget is one depth for the
        whole step (no early stop: the GPU, or many rows) and there is a shallower drafting depth."""
        return budget > 1 and not self.stops_early(rows_in_flight)

    def _explore_plan(self, rows_in_flight: int, budget: int, backoff: int) -> tuple[int, int]:
        """(depth, gap) of an exploring step: budget + 1 while drafting (on the GPU, budget - 1
        every other time), else explore_depth; the gap to the next one is the back-off, but
        from a plain stretch never shorter than keeps the exploring steps' extra time
        (step_time(rows, 1 + depth) - one plain step) within explore_overhead of the stretch
        (at 64 rows a 7-token step is ~4 plain ones: every 32nd step would cost ~10%)."""
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
            cost = extra(depth) + max(0, self.explore_burst - 1) * extra(rest)
        return depth, max(backoff, math.ceil(cost / self.explore_overhead - 1e-9))

    def _time_burst(self, key: int, seconds: float, emitted: float | None) -> None:
        """Charge one step of the burst being timed at this bucket (_burst_ledger) with its time
        over what plain steps take for the tokens it emitted per row; after the last one (the
        plain step after the burst, which runs cold), the burst's cost in plain steps sets how
        long the bucket waits before exploring again (_explore_plan). The cost model's step times
        come from start-up probes: on the tiny policy at 128 rows on the CPU they put a 2-step
        burst at ~1.3 plain steps where the real burst, with the cold plain step after it, cost
        several."""
        ledger, plain = self._burst_ledger.get(key), self._plain_recent.get(key)
        if ledger is None or plain is None:
            return
        ledger[0] -= 1
        ledger[1] += seconds - plain[0] * (1.0 if emitted is None else emitted)
        if ledger[0] <= 0:
            del self._burst_ledger[key]
            cost = self._burst_cost[key] = max(0.0, ledger[1] / plain[0])
            wait = math.ceil(cost / self.explore_overhead - 1e-9)
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
        one depth per step (no early stop), the depth the climb stands on: the cost model's best
        can be far from it (the tiny policy at 128 rows on the CPU: 7-8 by the cost model, which
        misses the drafts cut by the ~21-token answers' ends; real steps delivered most at 3-5).
        Else, and before any climb, the depth with the best tokens per second by the cost model
        (where verifying is dear, a max-depth step would cost many plain steps)."""
        climbed = None if self.stops_early(rows_in_flight) else self._climbed.get(self.cost.bucket(rows_in_flight))
        return climbed if climbed is not None else self._best_by_cost(rows_in_flight)[0]

    def keep_drafting(self, all_accepted: float, expected: float, rows_in_flight: int, depth: int) -> bool:
        """After `depth` drafts: is drafting (and verifying) depth + 1 worth its marginal cost?
        all_accepted: the batch's sum over rows of the predicted probability that all `depth`
        drafts are accepted (from their entropies); expected: the sum of the rows' expected
        tokens so far. Host floats: the engine reads the predictions back where that is free
        (the CPU).

        The extra tokens expected, all_accepted * a_{depth+1}, must pay for the extra step time,
        marginal_ratio(rows, depth + 1) of the step so far (the rule of `choose`, for the whole
        batch: verifying is padded to the deepest row anyway).
        """
        a_next = self.position_acceptance()[depth]
        return all_accepted * a_next > self.marginal_ratios(rows_in_flight)[depth] * expected

    def best_depth(self, accept: torch.Tensor, rows_in_flight: int) -> int:
        """How many of K drafts the batch should verify, from each draft's predicted acceptance
        accept [B, K] (e.g. table.predict of its entropy): the depth d in 1..K that maximises
        the expected tokens of all rows over the step's time, sum_b E_b(d) / step_time(rows,
        1 + d), E_b(d) = 1 + sum_{i<=d} prod_{j<=i} accept[b, j]. Reads back K sums, so only for
        devices where that is free (the CPU)."""
        K = accept.shape[1]
        expected = (1.0 + accept.cumprod(-1).cumsum(-1)).sum(0).tolist()  # [K], d = 1..K
        rates = [expected[d - 1] / self.cost.step_time(rows_in_flight, 1 + d) for d in range(1, K + 1)]
        return 1 + max(range(K), key=rates.__getitem__)

    def choose(self, draft_entropy: torch.Tensor, rows_in_flight: int) -> torch.Tensor:
        """Draft length per row, int64 [B], from draft_entropy [B, K] (K drafts available)."""
        batch, num_drafts = draft_entropy.shape
        if num_drafts > self.max_k:
            raise ValueError(f"draft_entropy: has {num_drafts} drafts per row, more than max_k={self.max_k}; "
                             "draft at most max_k tokens")
        device = draft_entropy.device
        if self.mode == "off" or num_drafts == 0:
            depth = torch.zeros(batch, dtype=torch.int64, device=device)
        elif self.mode == "fixed":
            depth = torch.full((batch,), min(self.k, num_drafts), dtype=torch.int64, device=device)
        else:
            accept = self.table.predict(draft_entropy)  # [B, K]
            all_accepted = accept.cumprod(-1)  # [B, K] P_i
            expected_before = 1.0 + all_accepted.cumsum(-1) - all_accepted  # [B, K] E_i = 1 + sum_{j<i} P_j
            keep = all_accepted > self.thresholds(rows_in_flight, num_drafts) * expected_before
            depth = keep.to(torch.int64).cumprod(-1).sum(-1)  # [B] stop at the first depth that fails
        for d, count in enumerate(torch.bincount(depth, minlength=self.max_k + 1).tolist()):
            self.depth_hist[d] += count
        return depth

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
                    emitted: float | None = None, proposed: float | None = None, blind: bool = False) -> None:
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
        step's time is per token it emitted. On SmolLM2 at 32 rows on the CPU the expected yield
        of a 1-deep draft was 1.64 tokens per row-step and the realised one ~1.4: the difference
        between drafting at a measured +15% and a real -11% (docs/bench.md).

        Where the engine says what each step `proposed`, the ratio is emitted / proposed: what
        the batch loses to rows done, stops and max_new_tokens, not how lucky this step's drafts
        were. Acceptance has its own long-memory estimate (expected_tokens). At one row the
        realised acceptance is that of the text being written (SmolLM2's depth-1 acceptance
        ran 0.15 to 0.75 from prompt to prompt): a hard stretch dragged the ratio to 0.83, rated
        drafting 0.83x of plain steps and switched it off, and since the exploring steps of a
        plain stretch are blind (they leave the ratio alone) it stayed off for the rest of the
        run, 1.00x where fixed 4 gave 1.42x."""
        # A plain step that followed a plain step is "warm". After a drafting step one runs
        # 1.2-1.4x slower (the tiny policy at 128 rows on a CPU), and drafting competes with
        # plain steps as a run without drafting takes them. The cost model's plain cell takes
        # warm plain steps only (and a cell's first timing): in training, where each rollout
        # starts plain at every rows bucket, cold timings were most of that cell and the
        # worker's speedup estimate climbed to 14x.
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
            # plain steps are rare while drafting: one slow one (the first decode step after a
            # prefill, 6.9 ms where the tiny policy's plain steps at 128 rows take 4.9 ms) made
            # drafting look 1.44x as fast as plain steps where it delivered 1.00x, for the whole
            # run. A plain step at other rows (a draining batch) starts afresh.
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
            # only a warm plain timing pairs: a cold one (right after drafting) ran 1.2-1.4x slow in
            # session 10's traces (session 11's at 128 rows found it as fast as a warm one)
            if key in self._plain_warm and self._pairs_with(key, last, rows):
                self._pair(key, last[0] * estimate, ("draft", last[1]), rows)
        elif self.mode == "entropy":
            expected = self.expected_tokens(tokens_per_row - 1)
            if emitted is not None and not blind:  # realised over expected, smoothed: one row's yield swings 1..5
                ratio = emitted / proposed if proposed else emitted / expected
                old_yield = self._yield.get(key, 1.0)
                self._yield[key] = old_yield + 0.1 * (ratio - old_yield)
            rate = expected * self._yield.get(key, 1.0) / seconds
            self._draft_rate[key] = _ema(self._draft_rate.get(key), rate, 0.1)
            # The drafting rate that pairs is the faster of the last 2 drafting steps at near rows,
            # as the plain timing is the faster of the last 2 plain steps: the same estimator on
            # both sides of the ratio. With the latest rate alone against the best of 2 plain
            # steps, noise that hits both alike (the tiny policy's plain steps at 128 rows on
            # the CPU ranged 5.6-12 ms within a run) rated drafting below what it delivered.
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
        two depths off (the tiny policy at 128 rows on the CPU: the cost model's best was 1
        draft, real steps delivered most at 3-5) the climb gets there within a few dozen steps,
        before the drafting gate has judged drafting by its worst depths."""
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
        if ema > self.climb_edge_at_once or (n + 1 >= self.climb_samples and ema > self.climb_edge):
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
        return all(rel.get(d, (0.0, 0))[1] >= self.climb_samples
                   for d in (held - 1, held + 1) if 1 <= d <= self.max_k)

    def _stamp(self, value: float, rows: int) -> tuple[float, int, int, float]:
        """A timing as pairing reads it: (value, step, rows, wall time)."""
        return value, self.steps, rows, self.clock()

    def _fresh(self, key: int, timing: tuple[float, int, int, float]) -> bool:
        """Whether a (value, step, rows, wall time) timing of this bucket may still pair: taken
        within pair_within steps and pair_within_s seconds (or pair_within_plain plain steps'
        time, where the bucket's plain step is slower than pair_within_s / pair_within_plain)."""
        if self.steps - timing[1] > self.pair_within:
            return False
        plain = self._plain_recent.get(key)
        span = max(self.pair_within_s, self.pair_within_plain * plain[0]) if plain else self.pair_within_s
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
        once (not at the next refresh, up to 16 steps later: on a CPU at 32 rows of a 135M
        model, 16 drafting steps at a loss cost several seconds).

        Samples that share an anchor move the advantage as one: towards their mean, by at most
        1 - 0.9^pair_anchor_cap of the way. The rare side of a regime (a plain timing while
        drafting, an exploring burst while plain) pairs with every step that follows it; as
        separate samples of an EMA, one both-slow pair of plain steps, or one slow burst, set
        the advantage for the whole stretch (a third of steps 1.6x slow at random switched
        drafting that delivers 1.15x off for most of a run). The first samples of a bucket move
        from the advantage its start-up probes predict (the tiny policy at 128 rows: the first
        drafting step after the prefill took 17.5 ms where the next ones took 12, and as the
        only drafting sample it rated drafting 0.87x and kept it off for the whole run)."""
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
        new = base + (1.0 - 0.9 ** min(n, self.pair_anchor_cap)) * (total / n - base)
        self._advantage[key] = new
        bar = 1.0 + self.draft_margin  # for the advantage net of the heads' prefill, as draft_budget
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
                _cap_counts(self.pos_trials, self.pos_accepts, self.prior_pos_weight)
        if acceptance is not None:
            self.set_measured_prior(acceptance)
        self._pos_accept, self._budgets, self._draft_rate, self._advantage, self._anchor = None, {}, {}, {}, {}
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
