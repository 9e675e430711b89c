"""Exact speculative (rejection) sampling: accept drafts so every emitted token is distributed
exactly as the policy would have sampled it (arXiv:2211.17192, arXiv:2302.01318).

Per row with draft depth k: for i = 1..k accept draft x_i with probability
min(1, target_i(x_i) / draft_i(x_i)); at the first rejection emit y ~ normalize(max(target_i -
draft_i, 0)) and stop; if all k are accepted emit a bonus y ~ target_{k+1}.

This module knows nothing about models, heads or caches: it sees fp32 distributions and
tokens. Temperature, top-k and top-p are applied by the caller (spec_heads.sampling); greedy
decoding arrives as one-hot distributions. Randomness is an argument: a torch.Generator, or
pre-drawn per-row uniforms (the engine passes spec_heads.sampling.row_uniforms so a row's
output never depends on its batch neighbours).

`rejection_sample` is batched and never syncs with the host (no .item(), no data-dependent
Python branches), so it runs inside a GPU decode step. `rejection_sample_reference` is the
slow per-row loop the tests compare it against, bit for bit.
"""
from __future__ import annotations

import torch

from spec_heads.acceptance import acceptance_rate, expected_tokens_per_step  # noqa: F401 (re-exported)
from spec_heads.sampling import sample_with_uniforms

# torch.rand draws from [0, 1); a uniform of exactly 0 would accept a draft the target gives
# zero mass, so draws are lifted to the smallest float64 step above 0.
_TINY_U = 2.0 ** -54


def _check_inputs(target_probs, draft_probs, draft_tokens, draft_lengths, uniforms):
    B, K1, V = target_probs.shape
    K = K1 - 1
    if K < 0:
        raise ValueError("target_probs: needs shape [B, K+1, V] with K+1 >= 1 (drafts plus the "
                         f"bonus position), got {tuple(target_probs.shape)}")
    if tuple(draft_probs.shape) != (B, K, V):
        raise ValueError(f"draft_probs: expected shape {(B, K, V)} to match target_probs "
                         f"{tuple(target_probs.shape)} (one fewer position), got {tuple(draft_probs.shape)}")
    if tuple(draft_tokens.shape) != (B, K):
        raise ValueError(f"draft_tokens: expected shape {(B, K)}, got {tuple(draft_tokens.shape)}")
    if tuple(draft_lengths.shape) != (B,):
        raise ValueError(f"draft_lengths: expected shape {(B,)}, got {tuple(draft_lengths.shape)}")
    if uniforms is not None:
        accept_u, sample_u = uniforms
        if tuple(accept_u.shape) != (B, K) or tuple(sample_u.shape) != (B,):
            raise ValueError(f"uniforms: expected (accept_u [{B}, {K}], sample_u [{B}]), got "
                             f"({tuple(accept_u.shape)}, {tuple(sample_u.shape)})")


def _draw_uniforms(B: int, K: int, device, generator, uniforms):
    """(accept_u [B, K], sample_u [B]) float64 in (0, 1): given, or drawn from `generator`."""
    if uniforms is not None:
        accept_u, sample_u = uniforms
        return accept_u.to(device, torch.float64), sample_u.to(device, torch.float64)
    accept_u = torch.rand(B, K, generator=generator, device=device, dtype=torch.float64)
    sample_u = torch.rand(B, generator=generator, device=device, dtype=torch.float64)
    return accept_u.clamp_(min=_TINY_U), sample_u.clamp_(min=_TINY_U)


def rejection_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor,
                     draft_tokens: torch.Tensor, draft_lengths: torch.Tensor,
                     generator: torch.Generator | None = None, *,
                     uniforms: tuple[torch.Tensor, torch.Tensor] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept/reject a batch of drafts exactly. No host synchronisation.

    target_probs  [B, K+1, V] fp32: the policy's sampling distribution at each draft position
                  and at the bonus position (row b uses positions 0..draft_lengths[b]).
    draft_probs   [B, K, V] fp32: the SAME distributions the drafts were sampled from.
    draft_tokens  [B, K] int64: drafts; entries past a row's length are ignored (may be -1).
    draft_lengths [B] int64 in 0..K (not checked: checking would sync with the host).
    generator or uniforms=(accept_u [B, K], sample_u [B]) float64 in (0, 1).

    Returns tokens [B, K+1] int64 (emitted tokens, -1 past each row's end) and
    num_emitted [B] int64 in 1..draft_lengths+1.
    """
    _check_inputs(target_probs, draft_probs, draft_tokens, draft_lengths, uniforms)
    B, K1, V = target_probs.shape
    K = K1 - 1
    device = target_probs.device
    target_probs, draft_probs = target_probs.float(), draft_probs.float()
    accept_u, sample_u = _draw_uniforms(B, K, device, generator, uniforms)
    lengths = draft_lengths.to(device, torch.int64)

    depth = torch.arange(K, device=device)                                   # [K]
    valid = depth[None, :] < lengths[:, None]                                # [B, K]
    safe_tokens = torch.where(valid, draft_tokens.to(device, torch.int64), 0)  # [B, K]
    target_x = target_probs[:, :K].gather(-1, safe_tokens[..., None])[..., 0]  # [B, K]
    draft_x = draft_probs.gather(-1, safe_tokens[..., None])[..., 0]         # [B, K]
    # accept iff u <= target/draft, written without the division (draft_x may be 0 for
    # padded positions; a sampled draft always has draft_x > 0)
    accepted = (accept_u * draft_x.double() <= target_x.double()) & valid    # [B, K]
    # drafts are kept up to the first rejection: count the leading run of acceptances
    final_pos = accepted.to(torch.int64).cumprod(-1).sum(-1)                 # [B] in 0..K

    # final token: the residual at the first rejected depth, or the bonus at depth `lengths`
    rows = torch.arange(B, device=device)
    final_target = target_probs[rows, final_pos]                             # [B, V]
    if K > 0:
        residual = (final_target - draft_probs[rows, final_pos.clamp(max=K - 1)]).clamp(min=0.0)
        # a rejection implies target(x) < draft(x), so the residual has mass in exact
        # arithmetic; fp32 rounding of target ~= draft can leave none, and then the
        # residual's limit is the target itself
        use_residual = (final_pos < lengths) & (residual.sum(-1) > 0)        # [B]
        final_probs = torch.where(use_residual[:, None], residual, final_target)
    else:
        final_probs = final_target
    final_token = sample_with_uniforms(final_probs, sample_u)                # [B]

    # accepted drafts, then the final token at final_pos, then -1
    out_pos = torch.arange(K1, device=device)[None, :]                       # [1, K+1]
    tokens = torch.cat([safe_tokens, safe_tokens.new_zeros(B, 1)], dim=1)    # [B, K+1]
    tokens = torch.where(out_pos < final_pos[:, None], tokens, final_token[:, None])
    return tokens.masked_fill(out_pos > final_pos[:, None], -1), final_pos + 1


def rejection_sample_reference(target_probs: torch.Tensor, draft_probs: torch.Tensor,
                               draft_tokens: torch.Tensor, draft_lengths: torch.Tensor,
                               generator: torch.Generator | None = None, *,
                               uniforms: tuple[torch.Tensor, torch.Tensor] | None = None,
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow, obviously-correct per-row loop with the same signature and semantics as
    `rejection_sample` (and the same uniforms, so outputs match bit for bit). Tests only."""
    _check_inputs(target_probs, draft_probs, draft_tokens, draft_lengths, uniforms)
    B, K1, V = target_probs.shape
    K = K1 - 1
    accept_u, sample_u = _draw_uniforms(B, K, target_probs.device, generator, uniforms)
    tokens = torch.full((B, K1), -1, dtype=torch.int64)
    num_emitted = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        n = int(draft_lengths[b])
        emitted = []
        final_probs = target_probs[b, n].float()  # bonus, unless a draft is rejected
        for i in range(n):
            x = int(draft_tokens[b, i])
            target_i, draft_i = target_probs[b, i].float(), draft_probs[b, i].float()
            if float(accept_u[b, i]) * float(draft_i[x]) <= float(target_i[x]):
                emitted.append(x)
                continue
            residual = (target_i - draft_i).clamp(min=0.0)
            final_probs = residual if float(residual.sum()) > 0 else target_i
            break
        emitted.append(int(sample_with_uniforms(final_probs, sample_u[b])))
        tokens[b, :len(emitted)] = torch.tensor(emitted)
        num_emitted[b] = len(emitted)
    return tokens.to(target_probs.device), num_emitted.to(target_probs.device)
