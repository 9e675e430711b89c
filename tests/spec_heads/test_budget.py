"""The per-row depth decision (spec_heads.budget.choose_depths) on hand-made inputs: against a
brute force over every depth vector, and the behaviour the rule promises (flat cost takes every
useful draft, dear tokens take none, confident rows draft deeper than uncertain ones)."""
import itertools

import pytest
import torch

from spec_heads.budget import choose_depths, prefix_values
from spec_heads.estimators import CostModel


def _rate(values, cost, depths):
    B = values.shape[0]
    gain = sum(float(values[b, :d].sum()) for b, d in enumerate(depths))
    return (B + gain) / float(cost[sum(depths)])


def test_equals_brute_force_over_every_depth_vector():
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        B, K = 3, 3
        values = prefix_values(torch.rand(B, K, generator=g, dtype=torch.float64))
        # a memory-bound start, then compute-bound: cheap first tokens, dearer ones after
        slope = torch.rand(2, generator=g, dtype=torch.float64)
        t = torch.arange(B * K + 1, dtype=torch.float64)
        cost = 1.0 + 0.05 * slope[0] * t + slope[1] * (t - 3).clamp(min=0)
        best = max(_rate(values, cost, d) for d in itertools.product(range(K + 1), repeat=B))
        got = choose_depths(values, cost).tolist()
        assert _rate(values, cost, got) == pytest.approx(best, rel=1e-12)


def test_flat_cost_takes_every_useful_draft_and_no_worthless_one():
    values = torch.tensor([[0.9, 0.8, 0.0], [0.5, 0.2, 0.1], [0.0, 0.0, 0.0]])
    assert choose_depths(values, torch.ones(10)).tolist() == [2, 3, 0]


def test_dear_tokens_take_none():
    values = prefix_values(torch.full((4, 3), 0.9))
    cost = 1.0 + torch.arange(13, dtype=torch.float64)  # each token costs a whole step: never pays
    assert choose_depths(values, cost).tolist() == [0, 0, 0, 0]


def test_confident_rows_draft_deeper_and_the_budget_grows_as_tokens_get_cheaper():
    accept = torch.tensor([[0.95] * 4, [0.7] * 4, [0.3] * 4])  # low, middle, high draft entropy
    values = prefix_values(accept)
    t = torch.arange(13, dtype=torch.float64)
    dear, cheap = 1.0 + 0.25 * t, 1.0 + 0.02 * t
    d_dear, d_cheap = choose_depths(values, dear), choose_depths(values, cheap)
    assert d_dear[0] > d_dear[1] >= d_dear[2]
    assert d_cheap.sum() > d_dear.sum()
    assert (d_cheap >= d_dear).all()


def test_ties_across_and_within_rows_still_reach_the_best_rate():
    values = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.25]], dtype=torch.float64)
    t = torch.arange(7, dtype=torch.float64)
    for slope in (0.05, 0.2, 0.3, 0.45):
        cost = 1.0 + slope * t
        best = max(_rate(values, cost, d) for d in itertools.product(range(4), repeat=2))
        assert _rate(values, cost, choose_depths(values, cost).tolist()) == pytest.approx(best, rel=1e-12)


def test_a_short_cost_curve_is_refused():
    with pytest.raises(ValueError, match="step_cost"):
        choose_depths(torch.ones(2, 3), torch.ones(6))


def test_rows_draft_deeper_as_the_batch_drains_on_a_measured_cost_curve():
    """With the cost model's curve (verifying dearer per token at more rows), identical rows
    take more drafts each as rows drop: the long tail drafts deep, a full batch shallow."""
    cost = CostModel(max_batch=64, max_tokens=7)
    for rows, tokens in CostModel.probe_plan(64, 7):
        cost.record(rows, tokens, 1.0 + 0.004 * rows * (tokens - 1))  # marginal cost grows with rows
    values = prefix_values(torch.full((1, 6), 0.8, dtype=torch.float64))
    per_row = []
    for rows in (64, 16, 4, 1):
        d = choose_depths(values.expand(rows, 6), cost.curve(rows, 6))
        per_row.append(float(d.double().mean()))
    assert per_row == sorted(per_row) and per_row[0] < per_row[-1]
    assert cost.curve(4, 6)[4 * 2] == pytest.approx(cost.step_time(4, 3))  # whole tokens per row: the cells
