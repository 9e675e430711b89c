"""RL losses and advantages: GRPO and PPO as plain torch functions.

In the style of verl's `core_algos.py`: each function takes tensors, returns tensors, and says
its shapes. Every `[B, T]` tensor is per token over the *completion* tokens, with
`mask [B, T]` = 1 on real completion tokens and 0 on padding (either side). Nothing here knows
about models, tokenizers, rollouts or optimisers; the update loop feeds it log-probabilities.

Micro-batching. A loss averaged over tokens is not the average of micro-batch averages when the
micro-batches hold different numbers of tokens (the classic gradient-accumulation bug). Every
loss here takes `num_tokens_total` / `num_seqs_total`: pass the full batch's counts from
`batch_totals(full_mask)` to each micro-batch's loss and call `backward()` on each micro-batch
loss *without* further scaling; the accumulated gradient then equals the full-batch gradient.

Departures from the papers, on purpose:
- GRPO (arXiv:2402.03300) normalises by the group std; `std_normalize=False` gives Dr. GRPO
  (arXiv:2503.20783). The std is the unbiased one (torch.std, as verl and TRL use).
- The policy-loss clip is asymmetric, [1 - clip_low, 1 + clip_high] (DAPO "clip-higher",
  arXiv:2503.14476), and the loss aggregation is a config choice (token-mean as in DAPO).
- The KL to the reference is the k3 estimator added to the loss (as GRPO does), not a reward
  penalty; kl_coef = 0 means no reference model is needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
_LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: far past any clip, and keeps exp() finite under bf16/fp16 noise


@dataclass
class AlgoConfig:
    """The RL algorithm. Defaults live here once; configs override them."""

    name: str = "grpo"  # grpo | ppo
    group_size: int = 8  # samples per prompt (GRPO groups)
    std_normalize: bool = True  # divide group-centred rewards by the group std (Dr. GRPO arXiv:2503.20783 turns this off)
    clip_low: float = 0.2
    clip_high: float = 0.28  # separate upper clip (DAPO arXiv:2503.14476 "clip-higher")
    kl_coef: float = 0.0  # KL to a frozen reference, k3 estimator; 0 = no reference model
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-sum | seq-mean-token-mean
    gamma: float = 1.0  # PPO / GAE discount
    lam: float = 0.95  # GAE lambda
    vf_coef: float = 0.5  # weight of the value loss (PPO)
    vf_clip: float = 0.2  # value clip around the rollout-time values (PPO)
    entropy_coef: float = 0.0  # entropy bonus; 0 turns it off
    # > 0: decoupled PPO for stale (async) samples (AReaL, arXiv:2505.24298): clip the ratio to
    # the learner's pre-update policy and weight each token by min(pi_prox / pi_behaviour,
    # tis_cap), a truncated importance weight; 0: clip against the behaviour policy itself
    tis_cap: float = 0.0

    def __post_init__(self):
        if self.name not in ("grpo", "ppo"):
            raise ValueError(f"name: must be grpo or ppo, got {self.name!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise ValueError(f"group_size: must be an integer, got {self.group_size!r}")
        if self.name == "grpo" and self.group_size < 2:
            raise ValueError(f"group_size: GRPO needs >= 2 samples per prompt (a group of one has zero "
                             f"advantage; use name=ppo for single samples), got {self.group_size}")
        if self.group_size < 1:
            raise ValueError(f"group_size: must be >= 1, got {self.group_size}")
        if not isinstance(self.std_normalize, bool):
            raise ValueError(f"std_normalize: must be true or false, got {self.std_normalize!r}")
        if self.loss_agg not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg: must be one of {', '.join(LOSS_AGG_MODES)}, got {self.loss_agg!r}")
        _check_range("clip_low", self.clip_low, 0.0, 1.0, "(0, 1) so that 1 - clip_low > 0; typical 0.2",
                     lo_open=True, hi_open=True)
        _check_range("clip_high", self.clip_high, 0.0, math.inf, "> 0; typical 0.2-0.28", lo_open=True)
        _check_range("kl_coef", self.kl_coef, 0.0, math.inf, ">= 0 (0 turns the reference model off)")
        _check_range("gamma", self.gamma, 0.0, 1.0, "in [0, 1]; 1 for outcome rewards")
        _check_range("lam", self.lam, 0.0, 1.0, "in [0, 1]; typical 0.95")
        _check_range("vf_coef", self.vf_coef, 0.0, math.inf, ">= 0; typical 0.5")
        _check_range("vf_clip", self.vf_clip, 0.0, math.inf, "> 0; typical 0.2", lo_open=True)
        _check_range("entropy_coef", self.entropy_coef, 0.0, math.inf, ">= 0 (0 turns the entropy bonus off)")
        _check_range("tis_cap", self.tis_cap, 0.0, math.inf, ">= 0 (0 turns truncated importance weights off; "
                     "typical 2)")


def _check_range(name: str, value, lo: float, hi: float, want: str, lo_open: bool = False,
                 hi_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number {want}, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
        raise ValueError(f"{name}: must be {want}, got {value}")


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------

def grpo_advantages(rewards: torch.Tensor, group_size: int, std_normalize: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages, [B] -> [B] (fp32).

    rewards [B]: one scalar per completion, rows group-contiguous (rows g*G .. g*G+G-1 answer
    the same prompt). advantage = (r - mean_group) / (std_group + eps), or r - mean_group when
    std_normalize is False (Dr. GRPO). std is unbiased (Bessel), as torch.std / verl / TRL; a
    group whose rewards are all equal gets advantage 0. group_size 1 gives 0 (r - r), not NaN.
    Broadcast to tokens with `advantages[:, None]` (policy_loss does this for [B] input).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards: must be 1-D [B] (one reward per completion), got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size: must be >= 1, got {group_size}")
    B = rewards.shape[0]
    if B % group_size:
        raise ValueError(f"rewards: batch of {B} rows is not divisible by group_size={group_size}; "
                         f"pass whole groups (rows g*group_size .. g*group_size+group_size-1 per prompt)")
    grouped = rewards.float().view(B // group_size, group_size)  # [num_groups, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [num_groups, G]
    if std_normalize and group_size > 1:
        centred = centred / (grouped.std(dim=1, keepdim=True, unbiased=True) + eps)
    return centred.reshape(B)


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (arXiv:1506.02438) over completion tokens.

    rewards [B, T]: reward at each token (an outcome reward sits at the row's last real token).
    values [B, T]: the value head's prediction at each token (rollout-time, detached).
    mask [B, T]: 1 on real tokens. Padding is skipped, not treated as a step: the "next value"
    of a real token is the value at the row's next real token, and 0 after its last real token
    (the episode ends there). Rewards on padding are ignored.
    Returns (advantages [B, T], returns [B, T]) in fp32, both 0 on padding; returns =
    advantages + values on real tokens (the value loss target).
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(f"rewards, values, mask: must all be [B, T], got {tuple(rewards.shape)}, "
                         f"{tuple(values.shape)}, {tuple(mask.shape)}")
    m = mask.float()  # [B, T]
    r = rewards.float() * m  # [B, T]
    v = values.float() * m  # [B, T]
    B, T = r.shape
    advantages = torch.zeros_like(r)  # [B, T]
    next_value = r.new_zeros(B)  # [B]  value of the next real token (0 past the end)
    running = r.new_zeros(B)  # [B]  GAE accumulated from the next real token on
    # Backwards over time, vectorised over rows; padding leaves next_value and running unchanged.
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]  # [B]
        adv_t = delta + gamma * lam * running  # [B]
        advantages[:, t] = adv_t * m[:, t]
        running = torch.where(m[:, t] > 0, adv_t, running)
        next_value = torch.where(m[:, t] > 0, v[:, t], next_value)
    returns = (advantages + v) * m  # [B, T]
    return advantages, returns


# ---------------------------------------------------------------------------------------------
# Aggregation (and the micro-batch bookkeeping)
# ---------------------------------------------------------------------------------------------

def batch_totals(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_tokens, num_seqs) of a full batch, to pass to each micro-batch's loss.

    mask [B, T]. num_seqs counts rows with at least one real token (empty rows are padding and
    must not dilute a seq-mean). Both are 0-d float tensors (no host sync).
    """
    m = mask.float()  # [B, T]
    return m.sum(), (m.sum(dim=-1) > 0).float().sum()


def aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str,
              num_tokens_total: torch.Tensor | float | None = None,
              num_seqs_total: torch.Tensor | float | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    token-mean:          sum of all real tokens' losses / number of real tokens.
    seq-mean-token-sum:  mean over sequences of each sequence's token sum.
    seq-mean-token-mean: mean over sequences of each sequence's token mean.
    A "sequence" is a row with at least one real token; an all-padding row contributes nothing.
    num_tokens_total / num_seqs_total: the *full batch's* counts (see `batch_totals`) when this
    is one micro-batch of it; the micro-batch losses then sum to the full-batch loss. None uses
    this batch's own counts. Empty batches give 0, not NaN.
    """
    if loss_mat.shape != mask.shape:
        raise ValueError(f"loss_mat, mask: shapes differ, {tuple(loss_mat.shape)} vs {tuple(mask.shape)}")
    m = mask.to(loss_mat.dtype)  # [B, T]
    masked = loss_mat * m  # [B, T]
    if mode == "token-mean":
        denom = m.sum() if num_tokens_total is None else num_tokens_total
        return masked.sum() / _clamp_count(denom)
    tokens_per_seq = m.sum(dim=-1)  # [B]
    if mode == "seq-mean-token-sum":
        per_seq = masked.sum(dim=-1)  # [B]
    elif mode == "seq-mean-token-mean":
        per_seq = masked.sum(dim=-1) / tokens_per_seq.clamp(min=1.0)  # [B]
    else:
        raise ValueError(f"loss_agg: must be one of {', '.join(LOSS_AGG_MODES)}, got {mode!r}")
    denom = (tokens_per_seq > 0).to(loss_mat.dtype).sum() if num_seqs_total is None else num_seqs_total
    return per_seq.sum() / _clamp_count(denom)


def _clamp_count(count: torch.Tensor | float) -> torch.Tensor | float:
    if isinstance(count, torch.Tensor):
        return count.clamp(min=1.0)
    return max(float(count), 1.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, T] over real tokens; 0 for an empty mask. For metrics."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------

def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || ref) per token, [B, T] -> [B, T], always >= 0.

    k3 = exp(ref - lp) - (ref - lp) - 1: unbiased for samples from the policy, low variance, and
    0 exactly where the two agree. The log-ratio is clamped to +-20 so exp() stays finite.
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # [B, T]
    return torch.exp(log_ratio) - log_ratio - 1.0


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_low: float, clip_high: float, loss_agg: str,
                ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0,
                entropy: torch.Tensor | None = None, entropy_coef: float = 0.0,
                num_tokens_total: torch.Tensor | float | None = None,
                num_seqs_total: torch.Tensor | float | None = None,
                prox_logprobs: torch.Tensor | None = None, tis_cap: float = 0.0,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate with asymmetric clip, plus optional k3 KL and entropy bonus.

    logprobs [B, T]: current policy's log-prob of each completion token (carries the gradient).
    old_logprobs [B, T]: behaviour log-probs (from the rollout; detached).
    advantages [B, T] or [B] (broadcast over tokens, e.g. GRPO); detached.
    ref_logprobs [B, T]: frozen reference, needed only when kl_coef > 0.
    entropy [B, T]: per-token policy entropy, needed only when entropy_coef > 0.
    loss = agg(-min(ratio A, clip(ratio, 1-clip_low, 1+clip_high) A)) + kl_coef agg(k3)
           - entropy_coef agg(entropy), every term aggregated the same way (see `aggregate`).
    prox_logprobs [B, T] with tis_cap > 0 (decoupled PPO, arXiv:2505.24298): the ratio is taken
    against this proximal policy (the learner's before the update) and each token's term is
    weighted by min(exp(prox - old), tis_cap), detached: stale samples stay unbiased up to the cap.
    Metrics (detached 0-d tensors, token-means over this batch): clipfrac (share of tokens where
    the clipped term is the active one), approx_kl (mean old_lp - lp), ratio_mean, kl (k3 to the
    reference; 0 without one).
    """
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs, old_logprobs, mask: must share shape [B, T], got {tuple(logprobs.shape)}, "
                         f"{tuple(old_logprobs.shape)}, {tuple(mask.shape)}")
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # [B, 1] broadcasts over tokens
    advantages = advantages.to(logprobs.dtype).detach()
    anchor = old_logprobs if tis_cap <= 0 else prox_logprobs
    if anchor is None:
        raise ValueError("prox_logprobs: required when tis_cap > 0 (the learner's pre-update log-probs)")
    log_ratio = (logprobs - anchor.detach()).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    unclipped = -advantages * ratio  # [B, T]
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    pg_mat = torch.maximum(unclipped, clipped)  # [B, T]  the pessimistic (max loss) of the two
    is_weight = torch.ones_like(ratio)
    if tis_cap > 0:
        behaviour_gap = (prox_logprobs - old_logprobs).detach().clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        is_weight = torch.exp(behaviour_gap).clamp(max=tis_cap)  # [B, T]
        pg_mat = pg_mat * is_weight
    totals = dict(num_tokens_total=num_tokens_total, num_seqs_total=num_seqs_total)
    loss = aggregate(pg_mat, mask, loss_agg, **totals)

    kl_mean = logprobs.new_zeros(())
    if kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("ref_logprobs: required when kl_coef > 0 (pass the reference model's "
                             "log-probs, or set kl_coef=0)")
        kl_mat = kl_k3(logprobs, ref_logprobs.detach())  # [B, T]
        loss = loss + kl_coef * aggregate(kl_mat, mask, loss_agg, **totals)
        kl_mean = masked_mean(kl_mat.detach(), mask)
    if entropy_coef > 0:
        if entropy is None:
            raise ValueError("entropy: required when entropy_coef > 0 (pass the per-token policy "
                             "entropy, or set entropy_coef=0)")
        loss = loss - entropy_coef * aggregate(entropy, mask, loss_agg, **totals)

    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask),
            "approx_kl": masked_mean(-log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "is_weight_mean": masked_mean(is_weight, mask),
            "kl": kl_mean,
        }
    return loss, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, vf_clip: float, loss_agg: str,
               num_tokens_total: torch.Tensor | float | None = None,
               num_seqs_total: torch.Tensor | float | None = None) -> torch.Tensor:
    """Clipped value loss, scalar: agg(0.5 * max((v - R)^2, (clip(v, old - c, old + c) - R)^2)).

    values [B, T]: current value head (carries the gradient); old_values [B, T]: rollout-time
    values; returns [B, T]: targets from `gae`. The clip keeps the critic near the values the
    advantages were computed with (PPO2). Multiply by vf_coef in the caller.
    """
    old_values = old_values.detach()
    returns = returns.detach().to(values.dtype)
    clipped_values = old_values + (values - old_values).clamp(-vf_clip, vf_clip)  # [B, T]
    loss_mat = 0.5 * torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2)  # [B, T]
    return aggregate(loss_mat, mask, loss_agg, num_tokens_total=num_tokens_total,
                     num_seqs_total=num_seqs_total)
