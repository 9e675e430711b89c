"""The start-up goodness-of-fit check (spec_heads/exactness.py): exact draws pass, the biases a
broken speculative sampler shows fail, and the p-value helper matches scipy."""
import pytest
import torch
from scipy import stats

from spec_heads.exactness import chi2_sf, conditional_fit

V, N = 12, 4000


def _table(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(V, V, generator=g, dtype=torch.float64) * 1.5, -1)  # next | prev


def _draw(table, n, length, seed, repeat=0.0):
    """Markov chains from token 0; with probability `repeat` a step copies the previous token (the
    repeated-token flood a biased speculative sampler produced)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prev, seq = 0, []
        for _ in range(length):
            if repeat and seq and torch.rand((), generator=g) < repeat:
                tok = prev
            else:
                tok = int(torch.multinomial(table[prev], 1, generator=g))
            seq.append(tok)
            prev = tok
        out.append(seq)
    return out


def _probs(table):
    return lambda prefixes: torch.stack([table[p[-1] if p else 0] for p in prefixes])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_exact_draws_pass(seed):
    table = _table()
    fit = conditional_fit(_draw(table, N, 3, seed), [0, 1, 2], _probs(table))
    assert fit.dof > 20 and fit.passed(1e-3), fit


def test_repeated_token_bias_fails():
    table = _table()
    fit = conditional_fit(_draw(table, N, 3, 5, repeat=0.1), [1, 2], _probs(table))
    assert not fit.passed(1e-3), fit


def test_wrong_temperature_fails():
    table = _table()
    hot = torch.softmax(table.log() / 1.3, -1)  # draws at temperature 1.3 checked against 1.0
    fit = conditional_fit(_draw(hot, N, 2, 6), [0, 1], _probs(table))
    assert not fit.passed(1e-3), fit


def test_zero_mass_token_fails_outright():
    table = _table()
    cut = table.clone()
    cut[:, 3] = 0.0  # the target (e.g. under top-k) cannot emit token 3; the draws can
    fit = conditional_fit(_draw(table, 500, 1, 7), [0], _probs(cut / cut.sum(-1, keepdim=True)))
    assert fit.zero_mass_hits > 0 and fit.pvalue == 0.0 and not fit.passed(1e-3)


@pytest.mark.parametrize("x,dof", [(3.0, 1), (25.0, 17), (400.0, 350)])
def test_chi2_sf_matches_scipy(x, dof):
    assert chi2_sf(x, dof) == pytest.approx(stats.chi2.sf(x, dof), rel=1e-9)
