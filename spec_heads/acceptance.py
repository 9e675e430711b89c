"""The arithmetic of acceptance, in one place: the acceptance rate of a draft distribution
for a target, and the tokens a verify step is expected to emit. The learner, the bench and the
depth policy import these; this module imports nothing of specroll.
"""
from __future__ import annotations

import torch

MAX_DEPTH = 8  # the deepest draft a step may verify (SpecParams.k / max_k, the bench's fixed:K)


def acceptance_rate(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """Probability that a draft x ~ draft_probs is accepted for target_probs:
    sum_v min(target, draft) = 1 - TV(target, draft). [..., V] -> [...]."""
    return torch.minimum(target_probs, draft_probs).sum(-1)


def expected_tokens(accept_rate_per_pos: list[float], depth: int) -> float:
    """Expected tokens from a step verifying `depth` drafts, given the conditional acceptance at
    each position: 1 + a_1 + a_1 a_2 + ... (i.i.d. a gives (1 - a^(depth+1)) / (1 - a))."""
    expected, all_accepted = 1.0, 1.0
    for a in accept_rate_per_pos[:depth]:
        all_accepted *= a
        expected += all_accepted
    return expected


def expected_tokens_per_step(alpha: float, k: int) -> float:
    """Expected tokens emitted per verify with i.i.d. acceptance `alpha` and draft depth k:
    1 + alpha + ... + alpha^k = (1 - alpha^(k+1)) / (1 - alpha)."""
    return expected_tokens([alpha] * k, k)
