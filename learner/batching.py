"""Rollout sequences as padded training tensors, and the learner's per-token log-probabilities.

The learner scores completion tokens with the same model code and the same sampling
distribution (spec_heads.sampling.sampling_logprobs: temperature, top-k, top-p) the rollout
engine sampled them from, so in fp32 its log-probs equal the rollout's behaviour log-probs to
~1e-6 and GRPO/PPO stay on-policy without any mismatch correction.

Layout: row b is prompt + completion, right-padded to T (causal attention makes right padding
safe). The completion token j of row b sits at index P_b + j and is predicted by the hidden
state at index P_b + j - 1; `pred_pos [B, L]` holds those indices, so one gather turns the
[B, T, H] hidden states into the [B, L, H] states that score the completion.
This module knows nothing about rewards, optimisers or Ray.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rollout.types import Sequence
from spec_heads.sampling import entropy_from_logprobs, sampling_logprobs


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, T] prompt + completion, right-padded with 0
    pred_pos: torch.Tensor  # [B, L] index into T of the hidden state that predicts completion token j
    tokens: torch.Tensor  # [B, L] completion tokens, 0 on padding
    mask: torch.Tensor  # [B, L] float, 1 on real completion tokens
    old_logprobs: torch.Tensor  # [B, L] behaviour log-probs from the rollout, 0 on padding

    def rows(self, idx: slice) -> "PackedBatch":
        """A micro-batch of rows, trimmed to its own longest row (less padding to compute)."""
        mask = self.mask[idx]
        L = max(int(mask.sum(1).max().item()), 1) if mask.numel() else 1
        T = int(self.pred_pos[idx][:, :L].max().item()) + 2 if mask.numel() else 1
        T = min(T, self.input_ids.shape[1])
        return PackedBatch(self.input_ids[idx, :T], self.pred_pos[idx, :L], self.tokens[idx, :L],
                           mask[:, :L], self.old_logprobs[idx, :L])


def pack(sequences: list[Sequence], device) -> PackedBatch:
    """Sequences -> PackedBatch on `device`. Empty completions give all-padding rows."""
    if not sequences:
        raise ValueError("sequences: an RL step needs at least one rollout sequence")
    B = len(sequences)
    T = max(len(s.prompt) + len(s.tokens) for s in sequences)
    L = max(max(len(s.tokens) for s in sequences), 1)
    input_ids = torch.zeros(B, T, dtype=torch.int64)
    pred_pos = torch.zeros(B, L, dtype=torch.int64)
    tokens = torch.zeros(B, L, dtype=torch.int64)
    mask = torch.zeros(B, L)
    old = torch.zeros(B, L)
    for b, s in enumerate(sequences):
        P, n = len(s.prompt), len(s.tokens)
        if len(s.logprobs) != n:
            raise ValueError(f"sequences[{b}]: {len(s.logprobs)} logprobs for {n} tokens; the rollout "
                             "must return one behaviour log-prob per completion token")
        input_ids[b, :P + n] = torch.tensor(s.prompt + s.tokens, dtype=torch.int64)
        pred_pos[b, :n] = torch.arange(P - 1, P - 1 + n)
        tokens[b, :n] = torch.tensor(s.tokens, dtype=torch.int64)
        mask[b, :n] = 1.0
        old[b, :n] = torch.tensor(s.logprobs, dtype=torch.float32)
    return PackedBatch(input_ids.to(device), pred_pos.to(device), tokens.to(device), mask.to(device),
                       old.to(device))


def completion_hidden(model, batch: PackedBatch) -> torch.Tensor:
    """The policy's final hidden states that predict each completion token: [B, L, H]."""
    hidden = model(batch.input_ids)  # [B, T, H]
    H = hidden.shape[-1]
    return hidden.gather(1, batch.pred_pos[..., None].expand(-1, -1, H))  # [B, L, H]


def token_logprobs(model, batch: PackedBatch, temperature: float, top_k: int, top_p: float,
                   with_entropy: bool = False, hidden: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each completion token under the sampling distribution [B, L] (0 on padding),
    and, with_entropy, the distribution's entropy [B, L]. Differentiable.

    hidden: `completion_hidden(model, batch)` when the caller already has it (PPO's value
    head reads the same states).
    """
    if hidden is None:
        hidden = completion_hidden(model, batch)  # [B, L, H]
    logprobs = sampling_logprobs(model.logits(hidden), temperature, top_k, top_p)  # [B, L, V]
    picked = logprobs.gather(-1, batch.tokens[..., None]).squeeze(-1)  # [B, L]
    real = batch.mask > 0
    # padding scores token 0, which top-k/top-p may have cut to -inf: zero it without a NaN grad
    picked = torch.where(real, picked, torch.zeros_like(picked))
    entropy = None
    if with_entropy:
        entropy = torch.where(real, entropy_from_logprobs(logprobs), torch.zeros_like(picked))
    return picked, entropy


def logprob_mismatch(recomputed: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(max, mean) |learner - rollout| log-prob over real tokens. inf when a token the rollout
    emitted has zero probability for the learner (e.g. cut by top-k in one and not the other)."""
    diff = (recomputed - rollout).abs()
    diff = torch.where(mask > 0, diff, torch.zeros_like(diff))
    n = mask.sum().clamp(min=1.0)
    return float(diff.max()) if diff.numel() else 0.0, float(diff.sum() / n)
