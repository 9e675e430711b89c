"""Per-row draft depths under a step's token budget: a pure function of (the drafts' predicted
values, the step's cost curve).

A row's i-th draft is worth the predicted chance that all its drafts up to i are accepted (the
prefix product of their predicted acceptances): that is the expected number of tokens it adds.
The step verifies the rows' new tokens packed together (ragged verification), so its cost
follows the total T it verifies. Drafts are taken greedily by value across rows, as TETRIS
(arXiv 2502.15197) selects draft tokens across a batch, up to the T that maximises expected
tokens per second: past it, one more token costs more than it is expected to return.

This module knows nothing about models, heads, timings or the device's cost: its inputs are
tensors, its output is the depth per row. It never syncs with the host.
"""
from __future__ import annotations

import torch


def choose_depths(values: torch.Tensor, step_cost: torch.Tensor) -> torch.Tensor:
    """Draft depth per row [B] int64 (0..K) from values [B, K] and step_cost [>= B*K + 1].

    values[b, i]: expected tokens the (i+1)-th draft of row b adds (the prefix product of the
    predicted acceptances, so non-increasing along a row; 0 where the row drafted no such token).
    step_cost[t]: seconds (any unit) of a step that verifies B + t tokens (every row its
    last token plus t drafts in all); positive, typically non-decreasing.

    The first t drafts in the order of value (ties: the shallower first) are kept, for the t
    that maximises (B + their summed value) / step_cost[t]; a row's kept drafts are a prefix of
    its drafts because values fall along a row.
    """
    B, K = values.shape
    if step_cost.shape[0] < B * K + 1:
        raise ValueError(f"step_cost: needs B*K + 1 = {B * K + 1} entries (t = 0..B*K drafts), "
                         f"got {step_cost.shape[0]}")
    if K == 0:
        return torch.zeros(B, dtype=torch.int64, device=values.device)
    flat = values.reshape(-1).to(torch.float64)
    # stable descending sort: within a row equal values keep their depth order
    order = torch.sort(flat, descending=True, stable=True).indices  # [B*K]
    gain = torch.cat([flat.new_zeros(1), flat[order].cumsum(0)])  # [B*K + 1] tokens added by the first t
    rate = (B + gain) / step_cost[: B * K + 1].to(torch.float64)
    t = rate.argmax()  # the first maximum: no token is verified for nothing
    taken = torch.arange(B * K, device=values.device) < t
    kept = torch.zeros(B * K, dtype=torch.int64, device=values.device).scatter_(0, order, taken.long())
    return kept.view(B, K).sum(1)


def prefix_values(accept: torch.Tensor) -> torch.Tensor:
    """Predicted acceptances [B, K] (each given the earlier drafts were accepted) -> the
    drafts' values for choose_depths: prod_{j <= i} accept[b, j]."""
    return accept.cumprod(-1)
