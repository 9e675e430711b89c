"""A goodness-of-fit check of a sampler's output against the target distributions it claims.

Used at start-up on a backend we do not control (rollout/vllm_worker.py): many completions of
one prompt are drawn through the backend's speculative path; at each checked position j the
completions are grouped by their first j tokens, and the tokens at j are tested against the
target's sampling distribution after that prefix (chi-square, cells with expected count < 5
pooled). Given the prefix, the token at j is an independent draw from the target under an exact
sampler, so the per-group statistics add up to one chi-square with the summed degrees of
freedom. A token the target gives zero probability fails the check outright.

torch only; the target distributions come in through a callable, so this module knows nothing
about models or backends.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class FitResult:
    pvalue: float  # 0.0 where a draw hit a token of zero target probability
    statistic: float
    dof: int
    groups: int  # prefixes that contributed at least one degree of freedom
    zero_mass_hits: int  # draws of tokens the target cannot emit

    def passed(self, alpha: float) -> bool:
        return self.zero_mass_hits == 0 and self.dof > 0 and self.pvalue >= alpha


def chi2_sf(statistic: float, dof: int) -> float:
    """P(chi-square(dof) >= statistic): the regularised upper incomplete gamma Q(dof/2, x/2)."""
    if dof <= 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         torch.tensor(statistic / 2.0, dtype=torch.float64)))


def conditional_fit(completions: Sequence[Sequence[int]], positions: Sequence[int],
                    target_probs: Callable[[list[list[int]]], torch.Tensor], min_expected: float = 5.0, chunk: int = 128,
                    min_group: int = 2) -> FitResult:
    """Chi-square of the tokens at `positions` (0-based, into each completion) given their prefixes.

    completions: draws of one prompt (those shorter than a position skip it).
    target_probs(prefixes) -> [N, V]: the target's sampling distribution after each completion
    prefix (the prompt is the caller's business). Prefixes drawn fewer than `min_group` times are
    not tested (nor checked for zero-mass draws).
    """
    stat, dof, groups, zero_hits = 0.0, 0, 0, 0
    for j in positions:
        by_prefix: dict[tuple, list[int]] = defaultdict(list)
        for c in completions:
            if len(c) > j:
                by_prefix[tuple(c[:j])].append(int(c[j]))
        if not by_prefix:
            continue
        # a prefix drawn once pools into one cell (no degree of freedom): skip its target pass,
        # the dear part for a large vocabulary and a high-entropy policy
        prefixes = [p for p, draws in by_prefix.items() if len(draws) >= min_group]
        for a in range(0, len(prefixes), chunk):  # [chunk, V] at a time: a vocabulary of 49k is big
            part = prefixes[a:a + chunk]
            probs = target_probs([list(p) for p in part]).double()
            for row, prefix in zip(probs, part):
                counts = torch.bincount(torch.tensor(by_prefix[prefix]), minlength=row.numel()).double()
                zero_hits += int(counts[row <= 0].sum())
                s, d = _chi2(counts[row > 0], row[row > 0], min_expected)
                stat += s
                dof += d
                groups += d > 0
    pvalue = 0.0 if zero_hits else chi2_sf(stat, dof)
    return FitResult(pvalue, stat, dof, groups, zero_hits)


def _chi2(observed: torch.Tensor, probs: torch.Tensor, min_expected: float) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, cells with expected count < min_expected pooled."""
    n = observed.sum()
    expected = probs / probs.sum() * n
    small = expected < min_expected
    if small.any():
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
    keep = expected > 0
    expected, observed = expected[keep], observed[keep]
    if expected.numel() < 2:
        return 0.0, 0
    return float(((observed - expected) ** 2 / expected).sum()), int(expected.numel() - 1)
