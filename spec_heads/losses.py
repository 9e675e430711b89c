"""Losses that fit draft heads to the policy's own distributions.

The acceptance rate of a draft distribution for a target distribution is
alpha = sum_v min(target, draft) = 1 - TV(target, draft), so the TV loss maximises acceptance
directly; the end-to-end TV loss maximises the expected number of accepted drafts of a chain
(a draft at depth j is kept only if depths 1..j are all accepted). TV gradients vanish where
target and draft barely overlap, so a fresh head starts with forward KL (`scheduled_loss_name`).

Shapes: B rows, K draft depths, T positions, V vocabulary. `target_probs` [B, K, T, V] is the
policy's sampling distribution for the token each depth predicts; it is detached here, so
fitting heads never changes the policy. `draft_logits` [B, K, T, V] are the heads' logits
(finite; upcast to fp32). `mask` [B, K, T] (bool or 0/1) marks positions that have a target
(the last K-1 positions of a sequence have no target at the deeper depths, padding has none).
Every loss is a mean over masked-in terms and its gradient is exactly zero at masked-out
positions. This module knows nothing about head architectures or the policy model.
"""
from __future__ import annotations

import torch

from spec_heads.acceptance import acceptance_rate

LOSS_NAMES = ("tv", "e2e_tv", "kl", "ce")


acceptance = acceptance_rate  # sum_v min(target, draft), under the name the losses use


def _prepare(target_probs: torch.Tensor, draft_logits: torch.Tensor, mask: torch.Tensor):
    if target_probs.shape != draft_logits.shape:
        raise ValueError(f"target_probs: shape {tuple(target_probs.shape)} must equal draft_logits "
                         f"shape {tuple(draft_logits.shape)} ([B, K, T, V])")
    if mask.shape != draft_logits.shape[:-1]:
        raise ValueError(f"mask: expected shape {tuple(draft_logits.shape[:-1])} ([B, K, T]), "
                         f"got {tuple(mask.shape)}")
    return target_probs.detach().float(), draft_logits.float(), mask.to(torch.bool)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values [...] over mask [...]; 0 (still differentiable) when nothing is masked in.
    torch.where (not multiplication) so masked-out terms pass exactly zero gradient."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


def _alphas(target_probs, draft_logits):
    return acceptance(target_probs, draft_logits.softmax(-1))  # [B, K, T]


def tv_loss(target_probs: torch.Tensor, draft_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-depth TV: mean over masked positions of 1 - sum_v min(target, softmax(draft_logits)).
    target_probs, draft_logits [B, K, T, V]; mask [B, K, T]. Returns a scalar."""
    target_probs, draft_logits, mask = _prepare(target_probs, draft_logits, mask)
    return _masked_mean(1.0 - _alphas(target_probs, draft_logits), mask)


@torch.no_grad()
def per_depth_acceptance(target_probs: torch.Tensor, draft_logits: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """Mean acceptance per depth over masked positions, [K] (a metric: no grad). A depth with
    no masked-in position reports 0."""
    target_probs, draft_logits, mask = _prepare(target_probs, draft_logits, mask)
    alphas = torch.where(mask, _alphas(target_probs, draft_logits), 0.0)  # [B, K, T]
    return alphas.sum((0, 2)) / mask.sum((0, 2)).clamp(min=1)


def e2e_tv_loss(target_probs: torch.Tensor, draft_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """End-to-end TV: 1 - (1/K) sum_{j=1..K} prod_{i<=j} alpha_i, alpha_i the acceptance of
    depth i at (b, t). Term j counts at (b, t) only if depths 1..j are all masked in there, and
    the loss is the mean of (1 - prod_{i<=j} alpha_i) over counted terms; with every depth
    valid this is exactly the formula above. target_probs, draft_logits [B, K, T, V];
    mask [B, K, T]. Returns a scalar."""
    target_probs, draft_logits, mask = _prepare(target_probs, draft_logits, mask)
    alphas = _alphas(target_probs, draft_logits)  # [B, K, T]
    # a masked-out alpha is replaced by 1 so it cannot leak into products; those terms are
    # dropped by `chain_valid` anyway, and where() keeps their gradient exactly zero
    alphas = torch.where(mask, alphas, torch.ones_like(alphas))
    chain = alphas.cumprod(1)  # [B, K, T]: prod_{i<=j} alpha_i
    chain_valid = mask.to(torch.int64).cumprod(1).to(torch.bool)  # [B, K, T]
    return _masked_mean(1.0 - chain, chain_valid)


def kl_loss(target_probs: torch.Tensor, draft_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Forward KL(target || draft) = sum_v target (log target - log_softmax(draft_logits)),
    with 0 log 0 = 0 (top-k/top-p targets have zeros), mean over masked positions.
    target_probs, draft_logits [B, K, T, V]; mask [B, K, T]. Returns a scalar."""
    target_probs, draft_logits, mask = _prepare(target_probs, draft_logits, mask)
    draft_logprobs = draft_logits.log_softmax(-1)
    kl = (torch.xlogy(target_probs, target_probs) - target_probs * draft_logprobs).sum(-1)  # [B, K, T]
    return _masked_mean(kl, mask)


def ce_loss(draft_logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the heads on sampled tokens, mean over masked positions.
    draft_logits [B, K, T, V]; tokens [B, K, T] int64 (any value where masked out, e.g. -1);
    mask [B, K, T]. Returns a scalar."""
    if tokens.shape != draft_logits.shape[:-1] or mask.shape != draft_logits.shape[:-1]:
        raise ValueError(f"tokens, mask: expected shape {tuple(draft_logits.shape[:-1])} ([B, K, T]), "
                         f"got {tuple(tokens.shape)} and {tuple(mask.shape)}")
    mask = mask.to(torch.bool)
    safe_tokens = torch.where(mask, tokens.to(torch.int64), 0)
    nll = -draft_logits.float().log_softmax(-1).gather(-1, safe_tokens[..., None]).squeeze(-1)
    return _masked_mean(nll, mask)


def head_loss(name: str, target_probs: torch.Tensor, draft_logits: torch.Tensor,
              mask: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The head loss called `name` (tv | e2e_tv | kl | ce). Shapes as in each loss; `tokens`
    [B, K, T] is needed by ce only."""
    if name == "tv":
        return tv_loss(target_probs, draft_logits, mask)
    elif name == "e2e_tv":
        return e2e_tv_loss(target_probs, draft_logits, mask)
    elif name == "kl":
        return kl_loss(target_probs, draft_logits, mask)
    elif name == "ce":
        if tokens is None:
            raise ValueError("tokens: the ce head loss needs the sampled tokens [B, K, T]; "
                             "pass tokens= or pick tv, e2e_tv or kl")
        return ce_loss(draft_logits, tokens, mask)
    raise ValueError(f"head loss: unknown name {name!r}; choose one of {', '.join(LOSS_NAMES)}")


def scheduled_loss_name(step: int, warmup_steps: int, final: str) -> str:
    """KL for the first `warmup_steps` steps (TV gradients vanish while a fresh head barely
    overlaps the policy), then `final`."""
    if final not in LOSS_NAMES:
        raise ValueError(f"final: unknown head loss {final!r}; choose one of {', '.join(LOSS_NAMES)}")
    return "kl" if step < warmup_steps else final
