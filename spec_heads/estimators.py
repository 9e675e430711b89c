"""The depth policy's online estimators: what a draft is likely to be accepted, and what a step
costs.

- `AcceptanceTable`: draft entropy bin -> conditional acceptance (accepted given that every
  earlier draft of the row was accepted), counted on the device from the engine's own outcomes;
- `CostModel`: step time as a function of (rows in flight, tokens verified per row), timed on
  the host from the engine's real steps and its start-up probes; `curve` gives it as a function
  of the total tokens a ragged step verifies.

Neither knows about models, heads or the KV cache, nor decides anything (spec_heads.budget
decides, spec_heads.depth controls). Updates never synchronise with the device.
"""
from __future__ import annotations

import math

import torch

from spec_heads.acceptance import expected_tokens


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
            # never below the plain step's own time: a drafting step does all of its work
            plain = points[0][1] if points and points[0][0] == 1 else 1e-12
            return max((sy - slope * sx) / n + slope * tokens, plain)
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

    def curve(self, rows: int, drafts: int) -> torch.Tensor:
        """Step time [rows * drafts + 1] (float64, host) of a step verifying rows + t tokens in
        all, t = 0..rows * drafts: linear in t between whole tokens per row (a ragged step costs
        what a uniform one of the same total does)."""
        whole = torch.tensor([self.step_time(rows, 1 + d) for d in range(drafts + 1)], dtype=torch.float64)
        whole = whole.cummax(0).values  # verifying more tokens never costs less
        x = torch.arange(rows * drafts + 1, dtype=torch.float64) / rows  # drafts per row
        lo = x.floor().long().clamp(max=max(drafts - 1, 0))
        hi = (lo + 1).clamp(max=drafts)
        return whole[lo] + (x - lo) * (whole[hi] - whole[lo])

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


def predicted_speedup(accept_rate_per_pos: list[float], cost: CostModel, rows: int, k: int) -> float:
    """Expected tokens per step / (step_time(rows, 1 + k) / step_time(rows, 1)).

    accept_rate_per_pos[i]: acceptance of the draft at depth i + 1 given that all earlier drafts
    of the row were accepted (i.i.d. acceptance a gives (1 - a^(k+1)) / (1 - a) tokens).
    """
    if len(accept_rate_per_pos) < k:
        raise ValueError(f"accept_rate_per_pos: needs k={k} entries, got {len(accept_rate_per_pos)}")
    return expected_tokens(accept_rate_per_pos, k) / (cost.step_time(rows, 1 + k) / cost.step_time(rows, 1))
