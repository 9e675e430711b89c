"""Draft-depth policy: acceptance table, cost model and the per-row depth rule."""
import math

import pytest
import torch

from spec_heads.depth import DepthPolicy
from spec_heads.depth_config import DepthControl
from spec_heads.estimators import AcceptanceTable, CostModel, isotonic_decreasing, predicted_speedup

VOCAB, MAX_BATCH = 1000, 64


def linear_cost(cost: CostModel, a_of_rows, b_of_rows, max_tokens: int) -> None:
    """Record t = a(rows) + b(rows) * tokens for every bucket's representative rows."""
    for rows, tokens in CostModel.probe_plan(cost.max_batch, max_tokens):
        cost.record(rows, tokens, a_of_rows(rows) + b_of_rows(rows) * tokens)


def fill_table(table: AcceptanceTable, accept_of_bin, n_per_bin: int, seed: int = 0) -> None:
    """Feed `update` with Bernoulli outcomes: a draft in bin b is accepted w.p. accept_of_bin[b]."""
    gen = torch.Generator().manual_seed(seed)
    edges = table.edges.float()
    bins = torch.arange(table.num_bins).repeat_interleave(n_per_bin)  # [N]
    entropy = edges[bins] + (edges[bins + 1] - edges[bins]) * torch.rand(bins.shape, generator=gen)
    accepted = torch.rand(bins.shape, generator=gen) < torch.tensor(accept_of_bin)[bins]
    table.update(entropy[:, None], accepted[:, None], torch.ones_like(accepted)[:, None])


def policy_with(accept_of_bin, slope: float, mode="entropy", max_k=6, bins=8) -> DepthPolicy:
    """Entropy policy whose table learnt `accept_of_bin` and whose step time is 1 + slope * (tokens - 1)."""
    policy = DepthPolicy(mode, k=3, max_k=max_k, num_bins=bins, vocab_size=VOCAB, max_batch=MAX_BATCH)
    fill_table(policy.table, accept_of_bin, 4000)
    linear_cost(policy.cost, lambda r: 1.0 - slope, lambda r: slope, 1 + max_k)
    return policy


def test_isotonic_fit_matches_pool_adjacent_violators():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        values = torch.rand(12, generator=gen, dtype=torch.float64)
        weights = torch.rand(12, generator=gen, dtype=torch.float64) * 10 + 0.1
        blocks = []  # [value, weight, length]; a non-increasing PAV, one loop
        for v, w in zip(values.tolist(), weights.tolist()):
            blocks.append([v, w, 1])
            while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
                (v2, w2, n2), (v1, w1, n1) = blocks.pop(), blocks.pop()
                blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
        reference = torch.tensor([v for v, _, n in blocks for _ in range(n)], dtype=torch.float64)
        torch.testing.assert_close(isotonic_decreasing(values, weights), reference)


def test_acceptance_table_converges_through_observe():
    # Sequential process: draft i is judged only if drafts < i were accepted (rejection sampling).
    true_accept = torch.tensor([0.95, 0.9, 0.8, 0.7, 0.55, 0.4, 0.25, 0.1])
    policy = DepthPolicy("entropy", k=3, max_k=4, num_bins=8, vocab_size=VOCAB, max_batch=MAX_BATCH)
    table, gen = policy.table, torch.Generator().manual_seed(1)
    edges = table.edges.float()
    for _ in range(60):
        bins = torch.randint(0, 8, (256, 4), generator=gen)  # [B, K]
        entropy = edges[bins] + (edges[bins + 1] - edges[bins]) * torch.rand(bins.shape, generator=gen)
        accepted = torch.rand(bins.shape, generator=gen) < true_accept[bins]  # [B, K]
        lengths = torch.randint(1, 5, (256,), generator=gen)  # [B]
        pos = torch.arange(4)
        num_accepted = ((accepted | (pos >= lengths[:, None])).int().cumprod(-1).sum(-1)).clamp(max=lengths)
        policy.observe(entropy, lengths, num_accepted)
    predicted = table.predict((edges[:-1] + edges[1:]) / 2)
    assert (predicted - true_accept).abs().max() < 0.03
    assert all(row["count"] > 1000 for row in table.table())


def test_acceptance_table_converges_without_monotone_fit():
    true_accept = [0.3, 0.8, 0.5, 0.9]  # not monotone: only the raw estimate can follow it
    table = AcceptanceTable(4, math.log(VOCAB), monotone=False)
    fill_table(table, true_accept, 3000, seed=2)
    predicted = table.predict((table.edges[:-1] + table.edges[1:]) / 2)
    assert (predicted - torch.tensor(true_accept)).abs().max() < 0.03
    assert AcceptanceTable(4, 5.0).predict(torch.tensor([0.1, 4.0])).tolist() == [0.5, 0.5]  # the prior


def test_observe_counts_only_judged_drafts():
    policy = DepthPolicy("entropy", k=2, max_k=4, num_bins=4, vocab_size=VOCAB, max_batch=MAX_BATCH)
    table = policy.table
    # One bin per depth, so each depth's counts can be read off its own bin.
    entropy = ((table.edges[:-1] + table.edges[1:]) / 2).float()[None].expand(3, 4)  # [3, 4]
    lengths = torch.tensor([2, 4, 0])
    num_accepted = torch.tensor([2, 1, 0])
    policy.observe(entropy, lengths, num_accepted)
    # row 0: depths 0,1 accepted; row 1: depth 0 accepted, depth 1 rejected, 2..3 never judged;
    # row 2: drafted nothing.
    assert table.trials.tolist() == [2.0, 2.0, 0.0, 0.0]
    assert table.accepts.tolist() == [2.0, 1.0, 0.0, 0.0]
    fixed = DepthPolicy("fixed", k=2, max_k=4, num_bins=4, vocab_size=VOCAB, max_batch=MAX_BATCH)
    fixed.observe(entropy, lengths, num_accepted)  # only the entropy policy calibrates
    assert fixed.table.trials.sum() == 0


def test_acceptance_table_window_forgets_old_outcomes():
    table = AcceptanceTable(2, 5.0, window=1000.0)
    fill_table(table, [0.9, 0.9], 5000)
    for seed in range(1, 11):  # heads went stale: 10 steps of 500 outcomes per bin
        fill_table(table, [0.1, 0.1], 500, seed=seed)
    assert table.table()[0]["count"] == pytest.approx(1000.0)
    assert (table.predict(torch.tensor([0.1, 4.0])) - 0.1).abs().max() < 0.03


def test_cost_model_interpolates_linear_cost():
    cost = CostModel(max_batch=MAX_BATCH, max_tokens=7)
    a, b = (lambda r: 0.01 + 0.001 * r), (lambda r: 0.0005 * r)
    for rows in (1, 4, 16, 64):  # buckets 0, 2, 4, 6, at tokens 1, 3, 7 only
        for tokens in (1, 3, 7):
            cost.record(rows, tokens, a(rows) + b(rows) * tokens)
    for rows in (1, 4, 16, 64):
        for tokens in range(1, 8):
            assert cost.step_time(rows, tokens) == pytest.approx(a(rows) + b(rows) * tokens)
            want = b(rows) / (a(rows) + b(rows) * tokens)
            assert cost.marginal_ratio(rows, tokens) == pytest.approx(want)
    assert cost.step_time(64, 9) == pytest.approx(a(64) + b(64) * 9)  # extrapolated
    assert not cost.is_calibrated()  # buckets 1, 3, 5 never timed
    # An untimed bucket borrows the nearest timed one (ties to the larger), scaled by rows.
    assert cost.step_time(2, 3) == pytest.approx(cost.step_time(4, 3) * 2 / 4)
    linear_cost(cost, a, b, 7)
    assert cost.is_calibrated()


def test_cost_model_prior_and_single_point():
    cost = CostModel(max_batch=MAX_BATCH, max_tokens=5)
    assert cost.marginal_ratio(1, 1) == pytest.approx(0.1)  # documented prior, before any timing
    assert cost.marginal_ratio(64, 1) == pytest.approx(0.8)
    cost.record(1, 2, 3.0)  # one anchor: the prior slope through it
    assert cost.step_time(1, 1) == pytest.approx(3.0 / 1.1)
    cost.record(1, 2, 5.0)  # EMA
    assert cost.table()[0]["seconds"] == pytest.approx(3.0 + 0.1 * 2.0)
    with pytest.raises(ValueError, match="^tokens_per_row"):
        cost.record(1, 6, 1.0)
    with pytest.raises(ValueError, match="^rows"):
        cost.step_time(65, 1)


@pytest.mark.parametrize("a,k", [(0.7, 4), (0.9, 2), (0.5, 6)])
def test_predicted_speedup_iid(a, k):
    cost = CostModel(max_batch=8, max_tokens=7)
    linear_cost(cost, lambda r: 1.0, lambda r: 0.1 * r, 7)
    ratio = cost.step_time(8, 1 + k) / cost.step_time(8, 1)
    want = (1 - a ** (k + 1)) / (1 - a) / ratio
    assert predicted_speedup([a] * 6, cost, rows=8, k=k) == pytest.approx(want)


def test_config_errors_name_the_input():
    with pytest.raises(ValueError, match="^mode"):
        DepthPolicy("greedy", k=3, max_k=6, num_bins=8, vocab_size=VOCAB, max_batch=8)
    with pytest.raises(ValueError, match="^k"):
        DepthPolicy("fixed", k=7, max_k=6, num_bins=8, vocab_size=VOCAB, max_batch=8)
    policy = DepthPolicy("entropy", k=3, max_k=4, num_bins=8, vocab_size=VOCAB, max_batch=8)
    with pytest.raises(ValueError, match="^per_row_depths"):
        DepthControl(per_row_depths="sometimes")
    with pytest.raises(ValueError, match="^clear_advantage"):
        DepthControl(clear_advantage=1.01)
    with pytest.raises(ValueError, match="^accept_rate_per_pos"):
        predicted_speedup([0.5], policy.cost, rows=2, k=3)


def observed_policy(accept_per_pos, plain_s: float, draft_s, max_k=4, device="cpu",
                    control: DepthControl | None = None) -> DepthPolicy:
    """Entropy policy that observed `accept_per_pos` (conditional, per draft position) and timed a
    plain step at plain_s and a step verifying d drafts at draft_s(d)."""
    policy = DepthPolicy("entropy", k=1, max_k=max_k, num_bins=4, vocab_size=VOCAB, max_batch=MAX_BATCH,
                         device=device, control=control)
    gen = torch.Generator().manual_seed(0)
    n = 20000
    accepted = torch.zeros(n, dtype=torch.int64)  # accepted drafts per row, all rows drafting max_k
    alive = torch.ones(n, dtype=torch.bool)
    for a in accept_per_pos:
        alive &= torch.rand(n, generator=gen) < a
        accepted += alive
    policy.observe(torch.zeros(n, max_k), torch.full((n,), max_k), accepted)
    for _ in range(40):
        policy.record_step(1, 1, plain_s)
        for d in range(1, max_k + 1):
            policy.record_step(1, 1 + d, draft_s(d))
    return policy


def test_position_acceptance_and_expected_tokens_follow_observations():
    policy = observed_policy([0.9, 0.8, 0.5, 0.5], 1.0, lambda d: 1.0 + d)
    got = policy.position_acceptance()
    assert got == pytest.approx([0.9, 0.8, 0.5, 0.5], abs=0.02)
    assert policy.expected_tokens(0) == 1.0
    assert policy.expected_tokens(2) == pytest.approx(1 + got[0] + got[0] * got[1])


def test_budget_is_zero_when_drafting_delivers_less_than_plain_steps():
    # poor heads: a drafting step costs 1.6x a plain one and yields ~1.2 tokens
    poor = observed_policy([0.2, 0.2, 0.2, 0.2], 1.0, lambda d: 1.5 + 0.1 * d)
    assert poor.draft_budget(1) == 0
    # good heads, same costs: drafting pays, and on a CPU the whole depth is open (per-row depths)
    good = observed_policy([0.95] * 4, 1.0, lambda d: 1.5 + 0.1 * d)
    assert good.draft_budget(1) == 4
    # one depth per step (a GPU), the budget is the depth with the best tokens per second
    gpu = observed_policy([0.9, 0.9, 0.05, 0.05], 1.0, lambda d: 1.5 + 0.1 * d,
                          control=DepthControl(per_row_depths="off"))
    assert gpu.draft_budget(1) == 2
    fixed = DepthPolicy("fixed", k=3, max_k=6, num_bins=8, vocab_size=VOCAB, max_batch=MAX_BATCH)
    assert fixed.draft_budget(1) == 3


def test_budget_is_zero_where_drafting_only_ties_with_plain_steps():
    # always accepted (E(d) = d + 1) and a step verifying d drafts costs (d + 1) / 1.03 plain
    # steps: 3% more tokens per second than plain steps, inside the 5% margin
    tie = observed_policy([1.0] * 4, 1.0, lambda d: (d + 1) / 1.03)
    assert tie.control.draft_margin == 0.05 and tie.draft_budget(1) == 0
    clear = observed_policy([1.0] * 4, 1.0, lambda d: (d + 1) / 1.10)  # 10% more: draft
    assert clear.draft_budget(1) == 4


def _drifting_run(policy, plain_s: float, draft_s: float, speed, steps: int = 3000) -> list[int]:
    """Real steps through plan_step at one row, each timed at its cost x speed(step) (a shared
    machine's drift); returns each step's draft depth."""
    depths = []
    for step in range(steps):
        _, depth, _ = policy.plan_step(1)
        policy.record_step(1, 1 + depth, speed(step) * (plain_s if depth == 0 else draft_s))
        depths.append(depth)
    return depths


def test_budget_pairs_drafting_with_plain_steps_timed_near_it():
    """Each drafting rate is weighed against plain steps timed in the same spell of a drifting
    machine, not against plain steps of other minutes: plain steps are rare while drafting, so
    their long-run average lags the drift (and drafting steps are rare while plain)."""
    slow_later = lambda step: 2.0 if step >= 200 else 1.0
    fast_later = lambda step: 1.0 if step >= 200 else 2.0
    # drafting yields 1.12x the tokens per second of plain steps; the machine then halves its
    # speed: drafting stays on (but for the periodic plain step; set against the average plain
    # step instead, drafting switched off for 5% of the steps)
    good = observed_policy([0.95] * 4, 1.0, lambda d: 3.6)
    depths = _drifting_run(good, 1.0, good.expected_tokens(4) / 1.12, slow_later)
    # (2 of every 64 steps are plain ones: the periodic pair)
    assert sum(d > 0 for d in depths[200:]) >= 0.95 * len(depths[200:])
    # drafting yields 0.9x: off, whether the machine speeds up or slows down
    for speed in (slow_later, fast_later):
        poor = observed_policy([0.95] * 4, 1.0, lambda d: 5.0)
        depths = _drifting_run(poor, 1.0, poor.expected_tokens(4) / 0.9, speed)
        assert sum(d > 0 for d in depths[200:]) <= 0.03 * len(depths[200:])


def _noisy_run(advantage: float, p_slow: float, seed: int = 0, steps: int = 3000) -> float:
    """Share of drafting steps (after the first 200) at one row where a step verifying d drafts
    takes 1 + c d plain steps' time, drafting 4 deep delivers `advantage` x the tokens per
    second of plain steps, and each step, plain or drafting, is 1.6x slow with chance p_slow."""
    import random

    rng = random.Random(seed)
    noise = [1.6 if rng.random() < p_slow else 1.0 for _ in range(steps)]
    c = (observed_policy([0.95] * 4, 1.0, lambda d: 1.0 + d).expected_tokens(4) / advantage - 1.0) / 4
    step_s = lambda d: 1.0 + c * d
    policy = observed_policy([0.95] * 4, 1.0, step_s)
    depths = []
    for step in range(steps):
        _, depth, _ = policy.plan_step(1)
        policy.record_step(1, 1 + depth, noise[step] * step_s(depth))
        depths.append(depth)
    return sum(d > 0 for d in depths[200:]) / len(depths[200:])


def test_noise_that_slows_plain_and_drafting_steps_alike_does_not_switch_drafting_off():
    """A shared machine adds time to any step now and then (the tiny policy's plain steps at 128
    rows on the CPU ranged 5.6-12 ms within a run). With the fastest of 2 plain steps set
    against the latest drafting step alone, and the rare side of each regime (a plain pair
    while drafting, an exploring step while plain) pairing as a fresh EMA sample with every
    step after it, drafting that delivers 1.2x drafted on 7% of the steps where a fifth of the
    steps were slow, and 1.3x on 10% where a third were."""
    assert _noisy_run(1.2, 0.2) >= 0.9
    assert _noisy_run(1.3, 0.35) >= 0.9
    # and drafting that delivers 0.9x stays off under the same noise
    assert _noisy_run(0.9, 0.2) <= 0.05
    assert _noisy_run(0.9, 0.35) <= 0.05


def test_one_slow_first_drafting_step_does_not_switch_drafting_off():
    """The first drafting step at a rows bucket runs cold (the tiny policy at 128 rows on the
    CPU: 17.5 ms where the next ones took 12). As the bucket's only drafting sample it paired
    with every plain step after it and kept drafting off for the run; now pairs start from the
    start-up probes' prediction and move from it step by step."""
    rows = 32

    def share_drafting(first_slow: float) -> float:
        policy = observed_policy([0.95] * 4, 1.0, lambda d: 1.0 + 0.5 * d)
        for t in range(1, 6):  # start-up probes at 32 rows
            policy.cost.record(rows, t, 1.0 + 0.55 * (t - 1))
        step_s = lambda d: 1.0 + 0.6 * d  # real steps: drafting 4 deep delivers 1.33x
        depths = []
        for _ in range(300):
            _, depth, _ = policy.plan_step(rows)
            slow = first_slow if depth and not any(depths) else 1.0
            policy.record_step(rows, 1 + depth, slow * step_s(depth), planned=depth)
            depths.append(depth)
        return sum(d > 0 for d in depths) / len(depths)

    assert share_drafting(1.0) >= 0.9
    assert share_drafting(3.0) >= 0.9  # (0.76 when the first pair set the advantage outright)


def test_drafting_must_also_pay_for_the_heads_prefill():
    """Each admitted row costs the heads one pass over its prompt, which a run without drafting
    skips. Drafting steps 1.10x as fast as plain ones lose where that pass costs 10% of
    drafting's decode time, and still win where it costs 1%."""
    rows = 32

    def paired(prefill_row_s: float | None) -> DepthPolicy:
        policy = DepthPolicy("entropy", k=1, max_k=4, num_bins=4, vocab_size=VOCAB, max_batch=MAX_BATCH)
        for _ in range(20):  # warm plain pairs at 1 s, each followed by drafting steps 1.10x as fast
            for _ in range(2):
                policy.record_step(rows, 1, 1.0, emitted=1.0)
            for _ in range(4):
                policy.record_step(rows, 5, policy.expected_tokens(4) / 1.10, planned=4, emitted=1.0, proposed=1.0)
        assert policy._advantage[policy.cost.bucket(rows)] == pytest.approx(1.10, rel=0.01)
        if prefill_row_s is not None:
            policy.record_heads_prefill(8, 8 * prefill_row_s)
            policy.record_finished(4, 4 * 20)  # rows yield 20 tokens each
        return policy

    rate = paired(None)._draft_rate[paired(None).cost.bucket(rows)]  # tokens per row per second
    share_s = lambda share: share * 20 / (rows * rate)  # the per-row prefill time for a share
    with torch.inference_mode():
        assert paired(None).draft_budget(rows) > 0
        dear = paired(share_s(0.10))
        assert dear.prefill_share(rows) == pytest.approx(0.10)
        assert dear.draft_budget(rows) == 0
        assert paired(share_s(0.01)).draft_budget(rows) > 0
    assert dear.summary()["prefill_share_by_rows"][rows] == pytest.approx(0.10, abs=1e-3)
    with pytest.raises(ValueError, match="rows"):
        dear.record_heads_prefill(0, 1.0)


def test_budget_follows_the_paired_advantage_at_once():
    """The budget is cached per rows bucket between refreshes (every 16 timings); a paired
    timing that moves drafting's advantage across the threshold drops the cache at once, so a
    slow machine stops drafting at a loss within a step (at 32 rows of a 135M model on a CPU,
    the 16 steps until the refresh cost seconds)."""
    policy = observed_policy([0.95] * 4, 1.0, lambda d: 1.5 + 0.1 * d)
    bar = 1.0 + policy.control.draft_margin
    assert policy.draft_budget(1) == 4
    for _ in range(4):  # (so the switch does not fall on a refresh by chance)
        policy.record_step(1, 1, 1.0)
    flips = 0
    for _ in range(30):  # drafting steps now take 20 plain steps each
        policy.record_step(1, 5, 20.0)
        assert (policy.draft_budget(1) == 0) == (policy._advantage[0] < bar)
        flips += policy.draft_budget(1) == 0
    assert flips > 10


def test_plan_step_explores_a_plain_stretch_ever_less_often_per_bucket():
    poor = observed_policy([0.2, 0.2, 0.2, 0.2], 1.0, lambda d: 1.5 + 0.1 * d)
    plans = [poor.plan_step(1) for _ in range(1100)]
    assert all(budget == 0 for budget, _, _ in plans)
    explored = [i + 1 for i, (_, depth, explore) in enumerate(plans) if explore]
    # every exploring step drafts the depth with the best rate by the cost model (1 for such
    # poor heads: a deeper exploring step would cost more plain steps); every other step is plain
    assert poor.explore_depth(1) == 1
    assert all(depth == 1 for _, depth, explore in plans if explore)
    assert all(depth == 0 for _, depth, explore in plans if not explore)
    # exploring steps come in bursts of two (explore_burst); with no burst timed, the wait keeps
    # two 1.6x steps (1.2 plain steps extra) within 1% of the stretch (120 steps), then the
    # back-off doubles up to 1024 once it is the longer wait
    assert poor.control.explore_overhead == 0.01
    starts = explored[::2]
    assert explored[1::2] == [s + 1 for s in starts]
    assert starts[0] >= 120
    assert [b - a for a, b in zip(starts, starts[1:])] == [120, 120, 128, 256]
    # the cadence is the policy's, not one generate() call's: a later call at the same rows
    # continues the back-off instead of exploring again at its own early step
    more = [poor.plan_step(1)[2] for _ in range(1100)]
    assert 1100 + more.index(True) + 1 == starts[-1] + 512
    # another rows bucket has its own cadence
    for _ in range(40):
        poor.record_step(64, 1, 1.0)
        for d in range(1, 5):
            poor.record_step(64, 1 + d, 1.5 + 0.1 * d)
    assert poor.draft_budget(64) == 0
    # its own first burst: with per-row depths (a CPU) both of its steps draft the best depth,
    # and the wait keeps their extra time (0.6 + 0.6 plain steps) within 1%
    plans64 = [poor.plan_step(64) for _ in range(200)]
    first = [explore for _, _, explore in plans64].index(True)
    assert first == 119
    assert [depth for _, depth, _ in plans64[first:first + 2]] == [1, 1]
    # with one depth per step (a GPU) the burst's second step tries the next depth, and the
    # wait covers 0.6 + 0.7 plain steps
    gpu = observed_policy([0.2] * 4, 1.0, lambda d: 1.5 + 0.1 * d, control=DepthControl(per_row_depths="off"))
    for _ in range(40):
        gpu.record_step(64, 1, 1.0)
        for d in range(1, 5):
            gpu.record_step(64, 1 + d, 1.5 + 0.1 * d)
    plans64 = [gpu.plan_step(64) for _ in range(200)]
    first = [explore for _, _, explore in plans64].index(True)
    assert first == 129
    assert [depth for _, depth, _ in plans64[first:first + 2]] == [1, 2]


def test_exploring_cadence_counts_the_buckets_own_steps():
    """A draining batch passes through the buckets below its full size for a few steps per
    rollout. Counted in all the policy's steps, each of those buckets came due for exploring
    in nearly every rollout (the tiny policy at 128 rows on the CPU: 2 of a tail bucket's ~10
    steps per call, 5% of the call where drafting was off throughout); counted in the
    bucket's own steps, it explores as rarely as a bucket that holds the batch all along."""
    poor = observed_policy([0.2, 0.2, 0.2, 0.2], 1.0, lambda d: 1.5 + 0.1 * d)
    for _ in range(40):
        poor.record_step(64, 1, 1.0)
        for d in range(1, 5):
            poor.record_step(64, 1 + d, 1.5 + 0.1 * d)
    tail = []
    for _ in range(60):  # 60 rollouts: 150 steps at 64 rows, then 5 at 1 row (another bucket)
        for _ in range(150):
            poor.plan_step(64)
        tail += [poor.plan_step(1) for _ in range(5)]
    explored = [i for i, (_, _, explore) in enumerate(tail) if explore]
    assert all(b == 0 for b, _, _ in tail)
    # 300 steps at 1 row: bursts of two at its own steps 120 and 240, not in every rollout
    assert [i + 1 for i in explored] == [120, 121, 240, 241]


def test_a_timed_burst_sets_the_wait_so_exploring_costs_one_percent_of_the_stretch():
    """The cost model's step times come from start-up probes; real exploring steps, and the
    plain step after a burst (it runs cold), can cost far more. Each burst is timed against
    the plain steps' time for the tokens it emitted, and its real cost sets the wait: over a
    long plain stretch on a machine where a burst costs 10x what the probes say, and however
    often the back-off restarts, exploring takes 1% of the time."""
    policy = observed_policy([0.2, 0.2, 0.2, 0.2], 1.0, lambda d: 1.0 + 0.1 * d)
    for _ in range(3):
        policy.record_step(64, 1, 1.0, emitted=1.0)
    assert policy.draft_budget(64) == 0
    total = extra = 0.0
    bursts = 0
    for step in range(20000):
        if step % 100 == 0:
            policy._explore_gap.clear()  # what a moment of drafting does to the back-off
        _, depth, explore = policy.plan_step(64)
        bursts += explore and depth and policy._burst.get(policy.cost.bucket(64)) is not None
        if depth:  # a blind drafting step: 3 plain steps' time for 1.2 tokens per row
            seconds, emitted = 3.0, 1.2
        else:  # a plain step, cold (1.6 plain steps) right after drafting
            seconds, emitted = (1.6 if not policy._prev_plain else 1.0), 1.0
        total += seconds
        extra += seconds - emitted
        policy.record_step(64, 1 + depth, seconds, planned=depth or None, emitted=emitted, blind=bool(depth))
    # a burst: 2 x (3 - 1.2) + 0.6 = 4.2 plain steps, where the probes' model says ~0.4
    assert policy._burst_cost[policy.cost.bucket(64)] == pytest.approx(4.2)
    assert 0.008 < extra / total <= 0.011, extra / total
    assert bursts > 40


def test_plan_step_drafts_the_budget_with_periodic_plain_steps():
    good = observed_policy([0.95] * 4, 1.0, lambda d: 1.5 + 0.1 * d)
    plans = [good.plan_step(1) for _ in range(128)]
    assert {b for b, _, _ in plans} == {4} and not any(e for _, _, e in plans)
    # every 64 steps two plain ones, so the plain step's cost stays a real timing (the second:
    # one that followed a plain step, with the caches as a run without drafting has them)
    assert [i + 1 for i, (_, d, _) in enumerate(plans) if d == 0] == [47, 48, 111, 112]
    fixed = DepthPolicy("fixed", k=3, max_k=6, num_bins=8, vocab_size=VOCAB, max_batch=MAX_BATCH)
    assert {fixed.plan_step(1) for _ in range(100)} == {(3, 3, False)}


def test_plain_steps_come_eight_times_as_often_where_drafting_is_near_the_bar():
    """Every drafting step is weighed against the latest plain timings; near the bar (within
    5% above the 5% margin) one slow plain step could keep drafting on at a loss, so plain
    steps come every 8th step there, every 64th where drafting clearly pays."""
    def plain_steps(advantage):
        # always accepted (d + 1 tokens) and a step verifying d drafts costs (d + 1) / advantage
        policy = observed_policy([1.0] * 4, 1.0, lambda d: (d + 1) / advantage)
        assert policy.draft_budget(1) == 4
        plans = [policy.plan_step(1) for _ in range(128)]
        return [i + 1 for i, (_, d, _) in enumerate(plans) if d == 0], policy._advantage[0]

    steps, advantage = plain_steps(1.08)
    assert 1.05 < advantage < 1.10 and steps == [s for s in range(1, 129) if s % 8 in (7, 0)]
    steps, advantage = plain_steps(1.12)
    assert advantage > 1.10 and steps == [47, 48, 111, 112]


def test_plan_step_times_a_plain_step_first_at_every_new_rows_bucket():
    # timed only at rows=1: at 64 rows no plain step has been timed, so drafting could never be
    # switched off there; the first step at that bucket is a plain one, and the next (a plain
    # step after a plain one: the warm timing), then it drafts
    good = observed_policy([0.95] * 4, 1.0, lambda d: 1.5 + 0.1 * d)
    assert good.plan_step(64) == (4, 0, False)
    good.record_step(64, 1, 2.0)
    assert good.plan_step(64) == (4, 0, False)
    good.record_step(64, 1, 1.6)
    assert good._plain_recent[good.cost.bucket(64)][0] == 1.6  # the warm timing replaced the cold one
    assert good.plan_step(64)[1] == 4
    good.record_step(64, 5, 3.0, planned=4)
    assert good.plan_step(1)[1] == 4  # rows=1 had its plain timing already


def test_where_drafting_is_clear_plain_steps_come_only_at_the_periodic_cadence():
    """Drafting at 1.7x of plain steps: a stale plain timing, too few plain timings and a new
    rows bucket below a clear one each took plain steps (on an H200, the tiny policy at 32 rows
    drafted at 1.7x and still lost 7% to them against fixed 8). None of them can change the
    choice there, so only the periodic pair at steps 47-48 of every 64 remains; at 1.3x (not
    clear) each still takes its plain steps."""
    def policy_at(advantage):
        clock = [0.0]
        policy = observed_policy([0.9] * 4, 1.0, lambda d: 1.0 + 0.5 * d, max_k=4)
        policy.clock = lambda: clock[0]
        for _ in range(2):  # a warm plain pair at 32 rows
            policy.record_step(32, 1, 1.0)
        policy.record_step(32, 5, policy.expected_tokens(4) / advantage, planned=4)
        assert policy._advantage[policy.cost.bucket(32)] == pytest.approx(advantage, rel=0.02)
        clock[0] += 60.0  # the plain timing is a minute old
        assert not policy.plain_fresh(32)
        return policy

    with torch.inference_mode():
        clear = policy_at(1.7)
        assert clear.plan_step(32)[1] > 0  # stale, but drafting is clear: no re-timing
        assert clear.plan_step(16)[1] > 0  # bucket 16 has no plain timing: it borrows 32's
        assert clear.plan_step(64)[1] == 0  # nothing above 64 to borrow from: timed first
        plans = [clear.plan_step(32)[1] for _ in range(125)]  # policy steps 4..128
        assert [i + 4 for i, d in enumerate(plans) if d == 0] == [47, 48, 111, 112]

        unclear = policy_at(1.3)
        assert unclear.plan_step(32)[1] == 0  # stale: re-timed before drafting goes on
        assert unclear.plan_step(16)[1] == 0  # new bucket, nothing clear above it: timed first


def test_reset_calibration_keeps_acceptance_as_a_weak_prior():
    policy = observed_policy([0.95] * 4, 1.0, lambda d: 1.5 + 0.1 * d)
    policy.reset_calibration()
    after = policy.position_acceptance()
    # still optimistic (the prior alone would say 0.8) ...
    assert all(0.85 < a < 0.95 for a in after), after
    # ... but fresh outcomes of re-fitted (here: worse) heads take over within a few hundred drafts
    n = 400
    policy.observe(torch.zeros(n, 4), torch.full((n,), 4), torch.zeros(n, dtype=torch.int64))
    for _ in range(16):  # host estimates refresh every 16 timed steps
        policy.record_step(1, 1, 1.0)
    assert policy.position_acceptance()[0] < 0.1
    # the per-entropy table keeps its estimate too, halfway to its prior at most
    table = AcceptanceTable(4, math.log(VOCAB), prior_accept=0.5, prior_weight=4.0)
    fill_table(table, [0.95] * 4, 1000)
    table.soften(table.prior_weight)
    assert torch.all(table.predict_bins(torch.arange(4)) > 0.7)


def test_measured_heads_acceptance_is_the_prior_and_decides_the_first_budget():
    """Heads that come with a held-out measurement start from it: good heads draft from the
    first step where the default prior (0.8) would not pay, and poor ones do not."""
    def fresh(measured):
        policy = DepthPolicy("entropy", k=1, max_k=4, num_bins=4, vocab_size=VOCAB, max_batch=MAX_BATCH)
        linear_cost(policy.cost, lambda r: 0.25, lambda r: 0.75, 5)  # one more token: +75% of a step
        policy.set_measured_prior(measured)
        policy.record_step(8, 1, 1.0)  # a real plain step: the budget weighs drafting against it
        return policy

    default, good, poor = fresh(None), fresh([0.97, 0.96, 0.95, 0.95]), fresh([0.3, 0.2, 0.2, 0.2])
    assert default.position_acceptance() == pytest.approx([0.8] * 4)
    assert good.position_acceptance() == pytest.approx([0.97, 0.96, 0.95, 0.95])
    assert good.table.predict(torch.zeros(1)).item() == pytest.approx(0.97, abs=0.05)
    # at 0.8 one draft yields 1.8 tokens for 1.75 steps' time (under the 5% margin); at 0.97, 1.97
    assert default.draft_budget(8) == 0 and poor.draft_budget(8) == 0
    assert good.draft_budget(8) == 4  # max_k: on a CPU the engine stops drafting early
    # observed outcomes take over from the measurement (measured_prior_weight: 128 observations)
    n = 2000
    good.observe(torch.zeros(n, 4), torch.full((n,), 4), torch.zeros(n, dtype=torch.int64))
    for _ in range(16):  # host estimates refresh every 16 timed steps
        good.record_step(1, 1, 1.0)
    assert good.position_acceptance()[0] < 0.1
    with pytest.raises(ValueError, match="acceptance"):
        good.set_measured_prior([0.5, 1.5])


def test_one_steps_outcomes_do_not_override_the_heads_measurement():
    """Rows admitted together draft at the same point of their answers: one step where 8 of 31
    first drafts were accepted (a hard token there) is one sample, not 31, against heads measured
    at 0.75 on held-out text; it must not sink the estimate (at the plain prior's weight of 8 it
    fell to 0.36, and drafting went off for the run)."""
    policy = DepthPolicy("entropy", k=1, max_k=4, num_bins=4, vocab_size=VOCAB, max_batch=MAX_BATCH)
    policy.set_measured_prior([0.75] * 4)
    accepted = torch.tensor([1] * 8 + [0] * 23)
    policy.observe(torch.zeros(31, 4), torch.full((31,), 3), accepted)
    assert policy.position_acceptance()[0] > 0.6


def test_reset_calibration_with_a_measurement_forgets_old_outcomes():
    policy = observed_policy([0.95] * 4, 1.0, lambda d: 1.5 + 0.1 * d)
    policy.reset_calibration([0.4, 0.3, 0.3, 0.3])  # re-fitted heads, measured on held-out text
    assert policy.position_acceptance() == pytest.approx([0.4, 0.3, 0.3, 0.3])
    assert policy.table.predict(torch.zeros(1)).item() == pytest.approx(0.4, abs=0.05)


def test_pairs_only_timings_at_nearly_the_same_rows():
    """A draining batch: a plain step timed at 64 rows, then drafting steps at ever fewer rows
    (compute-bound: step time follows the rows). Drafting one token yields 1.66 tokens for 1.9x
    a plain step's time at the same rows, a loss; set against the plain step at 64 rows, the
    drafting steps at 35 rows would look like a 1.6x gain."""
    policy = observed_policy([0.66] * 4, 1.0, lambda d: 1.0 + 0.9 * d, max_k=4)
    key = policy.cost.bucket(64)
    policy.record_step(64, 1, 0.01 * 64)
    for rows in range(63, 32, -1):
        policy.record_step(rows, 2, 0.01 * rows * 1.9)
    assert policy._advantage[key] < 0.95  # only the pairs near 64 rows count
    # a plain step at 35 rows pairs with the drafting steps there, as the drain goes on
    policy.record_step(35, 1, 0.01 * 35)
    policy.record_step(33, 2, 0.01 * 33 * 1.9)
    assert policy._advantage[key] < 0.95


def test_budget_climbs_to_the_depth_real_steps_deliver_most_at_without_early_stop():
    """One depth per step (no early stop, the GPU): the start-up cost model says 4 drafts pay
    best, real steps say 2 (deeper drafts cost more than probes showed). Exploring one deeper
    and one shallower in turn, the budget walks down to 2 and stays there."""
    policy = DepthPolicy("entropy", k=1, max_k=4, num_bins=4, vocab_size=VOCAB, max_batch=MAX_BATCH,
                         control=DepthControl(per_row_depths="off"))
    linear_cost(policy.cost, lambda r: 1.0, lambda r: 0.02, 5)  # probes: drafts nearly free
    policy.set_measured_prior([0.9] * 4)
    real = {0: 1.0, 1: 1.3, 2: 1.5, 3: 2.1, 4: 2.8}  # real step times by depth: 2 is best
    assert policy.draft_budget(32) == 4
    depths = []
    for _ in range(1500):
        _, depth, _ = policy.plan_step(32)
        policy.record_step(32, 1 + depth, real[depth], planned=depth)
        depths.append(depth)
    assert policy.draft_budget(32) == 2
    late = depths[-500:]
    assert late.count(2) >= 0.9 * len(late), {d: late.count(d) for d in set(late)}
    # with per-row depths (a CPU by default) the budget stays max_k at every rows count: the
    # rows' depths are chosen within each step (spec_heads.budget)
    cpu = DepthPolicy("entropy", k=1, max_k=4, num_bins=4, vocab_size=VOCAB, max_batch=MAX_BATCH)
    assert cpu.stops_early(1) and cpu.stops_early(MAX_BATCH)
    linear_cost(cpu.cost, lambda r: 1.0, lambda r: 0.02, 5)
    cpu.set_measured_prior([0.9] * 4)
    for rows in (8, 32):
        for _ in range(1500):
            _, depth, _ = cpu.plan_step(rows)
            cpu.record_step(rows, 1 + depth, real[depth], planned=depth)
    assert cpu.draft_budget(8) == 4 and cpu.draft_budget(32) == 4


def test_budget_climb_weighs_each_explored_depth_against_the_budget_timed_next_to_it():
    """A machine whose speed drifts: every 150 steps it turns 1.6x slower or back. Real steps
    deliver most at 2 drafts. Per-depth averages let a neighbour timed before a slowdown look
    1.6x better than the budget timed after it, and the climb wandered; weighed against the
    budget's step next to it, the explored depths lose in every phase and the budget stays at 2."""
    policy = DepthPolicy("entropy", k=1, max_k=4, num_bins=4, vocab_size=VOCAB, max_batch=MAX_BATCH,
                         control=DepthControl(per_row_depths="off"))
    real = {0: 1.0, 1: 1.3, 2: 1.5, 3: 2.1, 4: 2.8}
    for rows, tokens in CostModel.probe_plan(MAX_BATCH, 5):  # probes timing real steps (the
        policy.cost.record(rows, tokens, real[tokens - 1])  # cost model's line starts it at 1)
    policy.set_measured_prior([0.9] * 4)
    depths = []
    for step in range(3000):
        _, depth, _ = policy.plan_step(32)
        slow = 1.6 if (step // 150) % 2 else 1.0
        policy.record_step(32, 1 + depth, real[depth] * slow, planned=depth)
        depths.append(depth)
    late = depths[1000:]
    assert late.count(2) >= 0.9 * len(late), {d: late.count(d) for d in set(late)}


def test_budget_climb_gets_from_a_poor_start_to_the_best_depth_within_a_few_dozen_steps():
    """The cost model says 1 draft (probes of deep steps were slow); real steps deliver most at
    4. Exploring every 8th step while the climb is unsettled, moving at once on a clear edge and
    going on the way it moved, the budget gets to 4 within 100 steps (at 128 rows a rollout
    batch of the tiny task has ~50 drafting steps: a climb of one depth per 64 steps left the
    drafting gate judging the start depth, and it switched drafting off)."""
    policy = DepthPolicy("entropy", k=1, max_k=6, num_bins=4, vocab_size=VOCAB, max_batch=MAX_BATCH,
                         control=DepthControl(per_row_depths="off"))
    real = {0: 1.0, 1: 1.6, 2: 2.0, 3: 2.1, 4: 2.2, 5: 3.6, 6: 4.2}  # drafting has a fixed cost
    probes = {0: 1.0, 1: 1.6, 2: 3.0, 3: 4.0, 4: 5.0, 5: 6.0, 6: 7.0}
    for rows, tokens in CostModel.probe_plan(MAX_BATCH, 7):
        policy.cost.record(rows, tokens, probes[tokens - 1])
    policy.set_measured_prior([0.95] * 6)
    for _ in range(4):  # real plain timings: the first steps at a bucket are plain ones
        _, depth, _ = policy.plan_step(32)
        policy.record_step(32, 1 + depth, real[depth], planned=depth)
    assert policy.draft_budget(32) == 1
    for _ in range(100):
        _, depth, _ = policy.plan_step(32)
        policy.record_step(32, 1 + depth, real[depth], planned=depth)
    assert policy.draft_budget(32) == 4


def test_exploring_from_a_plain_stretch_drafts_at_the_depth_the_climb_stood_on():
    """Without early stop, once the budget climbed to the depth real steps deliver most at (2,
    where probes said 4), a plain stretch explores at that depth (and its neighbours): the cost model's best depth
    measures a rate drafting would not use, and deep exploring steps cost several plain steps."""
    policy = DepthPolicy("entropy", k=1, max_k=4, num_bins=4, vocab_size=VOCAB, max_batch=MAX_BATCH,
                         control=DepthControl(per_row_depths="off"))
    rows = 32
    assert not policy.stops_early(rows)
    linear_cost(policy.cost, lambda r: 1.0, lambda r: 0.02, 5)  # probes: drafts nearly free
    policy.set_measured_prior([0.9] * 4)
    real = {0: 1.0, 1: 1.3, 2: 1.5, 3: 2.1, 4: 2.8}
    for _ in range(1500):
        _, depth, _ = policy.plan_step(rows)
        policy.record_step(rows, 1 + depth, real[depth], planned=depth)
    assert policy.draft_budget(rows) == 2
    for _ in range(200):  # probes again: the cost model's best depth is 4, not the climb's 2
        linear_cost(policy.cost, lambda r: 1.0, lambda r: 0.02, 5)
    assert policy._best_by_cost(rows)[0] == 4
    real = {0: 0.5, 1: 1.3, 2: 1.5, 3: 2.1, 4: 2.8}  # plain steps got cheap: drafting loses
    explored = []
    for _ in range(3000):
        _, depth, explore = policy.plan_step(rows)
        policy.record_step(rows, 1 + depth, real[depth], planned=depth)
        if explore and policy.draft_budget(rows) == 0:
            explored.append(depth)
    assert policy.draft_budget(rows) == 0 and len(explored) >= 8
    # bursts of two: the climb's depth, then one of its neighbours in turn (which lose to it,
    # so the climb stays at 2)
    assert set(explored[::2]) == {2}, explored
    assert set(explored[1::2]) == {1, 3}, explored
    assert policy._climbed[policy.cost.bucket(rows)] == 2


def test_a_plain_stretch_climbs_out_of_a_start_depth_where_drafting_loses():
    """The tiny policy at 128 rows on the CPU: probes put the best depth at 1, where real steps
    deliver 0.975x of plain ones, and real steps at 3-4 drafts deliver 1.3-1.4x. Drafting at 1
    goes off; exploring the plain stretch only at the depth the climb stood on kept it there
    for good (0.94x where fixed depths gained 1.2x). Each burst's second step tries a neighbour
    depth, weighed against the first: the climb goes on while plain, and drafting comes back at
    the depths that pay."""
    policy = DepthPolicy("entropy", k=1, max_k=6, num_bins=4, vocab_size=VOCAB, max_batch=MAX_BATCH,
                         control=DepthControl(per_row_depths="off"))
    rows = 64
    assert not policy.stops_early(rows)
    probes = {0: 1.0, 1: 1.6, 2: 3.0, 3: 4.0, 4: 5.0, 5: 6.0, 6: 7.0}
    for r, tokens in CostModel.probe_plan(MAX_BATCH, 7):
        policy.cost.record(r, tokens, probes[tokens - 1])
    policy.set_measured_prior([0.95] * 6)
    real = {0: 1.0, 1: 2.0, 2: 2.4, 3: 2.8, 4: 3.2, 5: 4.2, 6: 5.2}  # best: 4 drafts, 1.41x
    depths = []
    for _ in range(4000):
        _, depth, _ = policy.plan_step(rows)
        policy.record_step(rows, 1 + depth, real[depth], planned=depth)
        depths.append(depth)
    assert depths[:200].count(1) > 0 and 0 in depths[:400]  # drafted at 1, then went plain
    assert policy.draft_budget(rows) in (3, 4)
    late = depths[-1000:]
    assert sum(d in (3, 4, 5) for d in late) >= 0.8 * len(late), {d: late.count(d) for d in set(late)}


def test_drafting_is_weighed_by_the_tokens_steps_really_emit():
    """A 1-deep draft at 0.64 acceptance is expected to yield 1.64 tokens per row-step; at 1.42x
    a plain step's time that is +15%. Where steps really emit 1.4 per row (rows finishing
    mid-step, the last step cut at max_new_tokens), drafting loses 1.4 / 1.42 and goes off; the
    expected yield alone keeps it on."""
    def run(emitted_draft):
        policy = observed_policy([0.64] * 4, 1.0, lambda d: 1.0 + 0.42 * d, max_k=4)
        for _ in range(60):
            policy.record_step(32, 1, 0.155, emitted=1.0)
            for _ in range(5):
                policy.record_step(32, 2, 0.155 * 1.42, planned=1, emitted=emitted_draft)
        return policy

    assert run(None).draft_budget(32) > 0
    assert run(1.4).draft_budget(32) == 0
    # a plain step with idle slots (rows done, not yet collected) costs more per token emitted
    policy = run(1.4)
    policy.record_step(32, 1, 0.155, emitted=0.5)
    policy.record_step(32, 1, 0.155, emitted=0.5)
    assert policy._plain_recent[policy.cost.bucket(32)][0] > 0.155


def test_one_unlucky_step_at_one_row_moves_the_drafting_rate_a_tenth_of_the_way():
    """At one row a 4-deep step emits 1 to 5 tokens; the drafting rate follows the running
    ratio of emitted to expected tokens, so one step emitting 1 token where 2.8 were expected
    moves the rate by a tenth of that gap, not all of it."""
    policy = observed_policy([0.7] * 4, 1.0, lambda d: 1.0 + 0.12 * d, max_k=4)
    key, expected = policy.cost.bucket(1), policy.expected_tokens(4)
    for i in range(300):  # 3.7 and 1.0 in turn: 2.35 on average
        policy.record_step(1, 5, 1.48, planned=4, emitted=1.0 if i % 2 else 3.7)
    assert policy._yield[key] == pytest.approx(2.35 / expected, rel=0.1)
    before = policy._draft_recent[key][0]
    policy.record_step(1, 5, 1.48, planned=4, emitted=1.0)
    after = policy._draft_recent[key][0]
    assert after < before and (before - after) / before < 0.1
    assert after > 0.7 * expected / 1.48  # where the step's own yield alone would put it at 1/1.48


def test_a_hard_stretch_at_one_row_does_not_switch_drafting_off():
    """At one row the tokens a step emits follow the text being written (SmolLM2's depth-1
    acceptance ran 0.15-0.75 from prompt to prompt). Told what rejection sampling proposed, the
    policy's yield measures only what stops and max_new_tokens cut: 40 steps that accepted
    nothing leave drafting on where the long-run acceptance says it pays, while steps that
    lose over half of their proposed tokens to cuts switch it off (and emitted alone, as before,
    counts the unlucky stretch as a loss)."""
    def run(emitted, proposed):
        policy = observed_policy([0.6] * 4, 1.0, lambda d: 1.0 + 0.05 * d, max_k=4)
        for _ in range(5):
            policy.record_step(1, 1, 1.0, emitted=1.0)
            policy.record_step(1, 1, 1.0, emitted=1.0)
            for _ in range(8):
                policy.record_step(1, 5, 1.2, planned=4, emitted=emitted, proposed=proposed)
        return policy

    assert run(1.0, 1.0).draft_budget(1) == 4  # nothing accepted for 40 steps: still drafting
    assert run(1.0, None).draft_budget(1) == 0  # the old yield: emitted over expected
    assert run(1.0, 2.1).draft_budget(1) == 0  # over half of what was proposed cut


def test_one_slow_first_plain_step_does_not_keep_drafting_on():
    """The first decode step after a prefill is slow (the tiny policy at 128 rows on a CPU:
    6.9 ms where its plain steps take 4.9): as a bucket's only plain timing it rated drafting
    1.44x where drafting delivered 1.00x of plain steps, for the whole run. Until a bucket has
    min_plain_samples plain timings every 8th drafting step is plain, and the plain timing is
    the faster of the last two: drafting at exactly plain's rate goes off."""
    policy = observed_policy([0.95] * 4, 1.0, lambda d: 1.5 + 0.1 * d)
    rows, plain = 64, 1.0
    depths = []
    for _ in range(400):
        _, depth, _ = policy.plan_step(rows)
        if depth == 0:
            seconds = 1.4 * plain if not depths else plain
        else:  # drafting delivers exactly the tokens per second of plain steps
            seconds = policy.expected_tokens(depth) * plain
        policy.record_step(rows, 1 + depth, seconds, planned=depth)
        depths.append(depth)
    assert policy._advantage[policy.cost.bucket(rows)] < 1.0 + policy.control.draft_margin
    assert sum(d > 0 for d in depths[100:]) <= 0.05 * len(depths[100:])


def test_drafting_is_weighed_against_plain_steps_that_followed_plain_steps():
    """After a drafting step a plain step runs with the heads' weights and the verify's
    activations in the caches (the tiny policy at 128 rows: 1.2-1.4x the plain steps of a run
    without speculation). Drafting competes with plain steps that follow plain steps, so the
    policy takes its periodic plain steps in pairs and times the second: drafting at exactly the
    warm plain step's rate goes off, though it beats the cold one by 1.3x."""
    policy = observed_policy([0.95] * 4, 1.0, lambda d: 1.5 + 0.1 * d)
    rows, plain = 64, 1.0
    depths, prev = [], None
    for _ in range(600):
        _, depth, _ = policy.plan_step(rows)
        if depth == 0:
            seconds = plain if prev == 0 else 1.3 * plain  # cold after a drafting step (or the prefill)
        else:  # drafting delivers exactly the tokens per second of warm plain steps
            seconds = policy.expected_tokens(depth) * plain
        policy.record_step(rows, 1 + depth, seconds, planned=depth)
        depths.append(depth)
        prev = depth
    assert policy._advantage[policy.cost.bucket(rows)] < 1.0 + policy.control.draft_margin
    assert sum(d > 0 for d in depths[300:]) <= 0.05 * len(depths[300:])


def test_the_cost_models_plain_cell_takes_warm_plain_steps_only():
    """A plain step right after a drafting step is slow (caches); in training every rollout
    starts plain at each rows bucket, and with those timings in the cost model's plain cell
    the worker's speedup estimate (mean accepted length over relative step cost) climbed to 14x
    over 30 steps. Only plain steps that followed a plain step (and a cell's first) count."""
    policy = DepthPolicy("entropy", k=1, max_k=4, num_bins=4, vocab_size=VOCAB, max_batch=MAX_BATCH)
    policy.record_step(8, 1, 1.0)  # the cell's first timing
    for _ in range(50):
        policy.record_step(8, 5, 2.0, planned=4)
        policy.record_step(8, 1, 3.0)  # cold: right after a drafting step
        policy.record_step(8, 1, 1.0)  # warm
    assert policy.cost.step_time(8, 1) == pytest.approx(1.0)


def test_timings_minutes_apart_do_not_pair_and_a_stale_plain_timing_is_retaken():
    """Between generate() calls other work runs (the bench's other modes, a trainer's update)
    and the machine's speed drifts: a plain step timed while the machine was 1.7x faster must
    not rate the drafting steps of the next call. Drafting really delivers 1.3x here; set
    against the stale fast plain step it would look like 0.76x and switch off."""
    clock = [0.0]
    policy = observed_policy([0.9] * 4, 1.0, lambda d: 1.0 + 0.5 * d, max_k=4)
    policy.clock = lambda: clock[0]
    key = policy.cost.bucket(32)
    for _ in range(2):  # a warm plain pair at 1.0 s, on the fast machine
        policy.record_step(32, 1, 1.0)
    draft_s = policy.expected_tokens(4) / 1.3  # 1.3x the tokens per second of a plain step
    policy.record_step(32, 5, draft_s, planned=4)
    adv0 = policy._advantage[key]
    assert adv0 == pytest.approx(1.3, rel=0.02)
    with torch.inference_mode():
        assert policy.draft_budget(32) > 0
    clock[0] += 60.0  # a minute later the machine runs 1.7x slower
    assert not policy.plain_fresh(32)
    policy.record_step(32, 5, 1.7 * draft_s, planned=4)
    assert policy._advantage[key] == adv0  # no pair with the stale plain step
    # the next two steps are plain (the second, warm one is the timing drafting is weighed against)
    with torch.inference_mode():
        assert policy.plan_step(32)[1] == 0
        policy.record_step(32, 1, 1.7 * 1.3)  # cold: right after drafting
        assert policy._advantage[key] == adv0  # a cold plain timing does not pair
        assert policy.plan_step(32)[1] == 0
        policy.record_step(32, 1, 1.7)
    assert policy._plain_recent[key][0] == 1.7  # retaken: not the minute-old 1.0
    assert policy._advantage[key] == pytest.approx(adv0, rel=0.02)  # the same 1.3x, not 0.76x
    with torch.inference_mode():
        assert policy.plan_step(32)[1] > 0  # drafting again


def test_heads_prefill_is_skipped_once_drafting_has_idled_where_it_is_off():
    """Where drafting is off by the cost model alone (no drafting step timed, so not
    measured_plain), admitted rows still get the heads' pass over their prompts until
    idle_prefill_steps decode steps went by without a step that drafted to a budget. Rows
    admitted where drafting is on keep the pass, and a step that drafts ends the idle stretch."""
    policy = DepthPolicy("entropy", k=3, max_k=6, num_bins=8, vocab_size=VOCAB, max_batch=MAX_BATCH)
    fill_table(policy.table, [0.99] * 8, 4000)
    # compute-bound at 64 rows (an extra token costs a whole step), nearly free at 1 row
    linear_cost(policy.cost, lambda r: 1.0 if r < 8 else 0.0, lambda r: 0.01 * r, 7)
    policy.record_step(64, 1, 0.64)
    policy.cost.version += 16  # next refresh
    assert policy.draft_budget(64) == 0 and not policy.measured_plain(64)
    assert policy.draft_budget(1) > 0
    assert not policy.skips_heads_prefill(64)  # a fresh policy: the pass runs
    plans = [policy.plan_step(64) for _ in range(policy.control.idle_prefill_steps - 1)]
    assert not any(depth and not explore for _, depth, explore in plans)
    assert not policy.skips_heads_prefill(64)
    policy.plan_step(64)
    assert policy.skips_heads_prefill(64)
    assert not policy.skips_heads_prefill(1)  # drafting is on at 1 row
    for _ in range(20):  # at 1 row the policy drafts after its first plain timings
        budget, depth, explore = policy.plan_step(1)
        policy.record_step(1, 1 + depth, 1.0 + 0.01 * (1 + depth), planned=depth)
        if depth and not explore:
            break
    else:
        pytest.fail("never drafted at 1 row")
    assert not policy.skips_heads_prefill(64)
    fixed = DepthPolicy("fixed", k=3, max_k=6, num_bins=8, vocab_size=VOCAB, max_batch=MAX_BATCH)
    for _ in range(200):
        fixed.plan_step(64)
    assert not fixed.skips_heads_prefill(64)
