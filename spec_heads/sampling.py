"""The sampling distribution and per-row random streams.

`sampling_logprobs` is the one definition of "the distribution the policy samples from"
(temperature, top-k, top-p). The engine samples from it, the rejection sampler verifies
against it, and the learner recomputes log-probabilities with it, so all three agree.

Randomness is counter-based: a row's uniforms are a hash of (row key, counter, stream, index),
computed on the device with integer ops. A row's draws therefore never depend on which rows
share its batch or on the order rows were scheduled, and no host sync is needed per token.
"""
from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _to_signed(x: int) -> int:
    return x - (1 << 64) if x >= (1 << 63) else x


_C1 = _to_signed(0xBF58476D1CE4E5B9)
_C2 = _to_signed(0x94D049BB133111EB)
_GOLD = _to_signed(0x9E3779B97F4A7C15)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 (wrapping arithmetic; logical shifts emulated)."""
    def shr(v, n):  # logical right shift of a signed int64
        return (v >> n) & ((1 << (64 - n)) - 1)
    x = (x ^ shr(x, 30)) * _C1
    x = (x ^ shr(x, 27)) * _C2
    return x ^ shr(x, 31)


def row_uniforms(keys: torch.Tensor, counters: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """Uniforms in (0, 1), float64, shape [B, n].

    keys [B] int64: one per row (derived from the run seed and the prompt's index).
    counters [B] int64: where the row is in its own sequence (tokens emitted so far).
    stream: which use (draft sampling, acceptance, final sample...), so uses never share draws.

    SplitMix64 (Steele et al. 2014): draw i of a row is mix(key + (i + 1) * golden gamma), with
    i = counter * 1_000_003 + stream * 7919 + j unique per (counter, stream, j < 7919). One
    mix per draw, not a chain of them: a decode step at a few rows is launch-bound.
    """
    j = torch.arange(n, device=keys.device, dtype=torch.int64)
    i = (counters[:, None] * 1_000_003 + (stream * 7919 + 1)) + j[None]  # [B, n]
    x = _mix(keys[:, None] + i * _GOLD)
    # top 53 bits -> (0, 1)
    mant = (x >> 11) & ((1 << 53) - 1)
    return (mant.double() + 0.5) / float(1 << 53)


def row_keys(seed: int, ids: torch.Tensor) -> torch.Tensor:
    """One int64 key per row from the run seed and each row's stable id (e.g. prompt index)."""
    return _mix(ids.to(torch.int64) * _GOLD + int(_to_signed((seed * 0x2545F4914F6CDD1D) & _MASK64)))


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_k: int = 0,
                      top_p: float = 1.0) -> torch.Tensor:
    """Log-probabilities of the sampling distribution, fp32, same shape as logits [..., V].

    temperature 0 gives the one-hot of the argmax (log 0 = -inf elsewhere). Tokens cut by
    top-k / top-p get -inf. Differentiable where finite (the learner uses it).
    """
    logits = logits.float()
    if temperature == 0.0:
        arg = logits.argmax(-1, keepdim=True)
        out = torch.full_like(logits, float("-inf"))
        return out.scatter(-1, arg, 0.0)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it stays)
        cut = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.log_softmax(-1)


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = 0,
                   top_p: float = 1.0) -> torch.Tensor:
    """exp(sampling_logprobs(...)), fp32: one softmax where neither top-k nor top-p cuts (the
    draft heads' distributions, drawn once per draft depth)."""
    if temperature > 0.0 and not (top_k and top_k < logits.shape[-1]) and top_p >= 1.0:
        logits = logits.float()
        return (logits if temperature == 1.0 else logits / temperature).softmax(-1)
    return sampling_logprobs(logits, temperature, top_k, top_p).exp()


def entropy_from_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy [...] of distributions given as log-probabilities [..., V] (-inf allowed)."""
    p = logprobs.exp()
    return -(p * logprobs.masked_fill(p == 0, 0.0)).sum(-1)


_CDF_BLOCK = 1024  # tokens per block of the two-level inverse CDF (sample_with_uniforms)


def sample_with_uniforms(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample: probs [..., V] (need not be normalised, must have mass), u [...] in
    (0, 1). Returns int64 [...]. Zero-probability tokens are never returned.

    The target u * total is kept strictly below the total mass, so the first index whose
    float64 CDF exceeds it is a step of the CDF: a token with positive probability. (The cap
    moves only u within 2^-52 of 1, where rounding could otherwise land past the last token.)

    Over a large vocabulary the CDF has two levels: the target picks a block of _CDF_BLOCK
    tokens by the blocks' masses, then a token within that block by the block's own float64
    CDF, the target rescaled to that CDF's total: a float64 cumulative sum over every token of
    every row is otherwise the dearest op of a plain decode step over a 49k vocabulary on a CPU.
    The block masses are float32 sums (a float64 sum would convert every element): a block's
    weight is off by at most ~1e-7 of itself, the rounding of the float32 probabilities themselves, and within a block the
    draw is exactly proportional to the float64 CDF.
    """
    V = probs.shape[-1]
    if V <= 2 * _CDF_BLOCK:
        cdf = probs.double().cumsum(-1)
        total = cdf[..., -1:]
        target = torch.minimum(u.double()[..., None] * total, total * (1.0 - 2.0 ** -52))
        return torch.searchsorted(cdf, target, right=True).squeeze(-1)
    lead, bs = probs.shape[:-1], _CDF_BLOCK
    nb = -(-V // bs)
    p = probs.reshape(-1, V)
    if nb * bs != V:  # zero mass past the end: never drawn
        p = torch.nn.functional.pad(p, (0, nb * bs - V))
    p = p.view(-1, nb, bs)  # [N, nb, bs]
    N = p.shape[0]
    cdf = p.sum(-1).double().cumsum(-1)  # [N, nb]
    total = cdf[:, -1:]
    target = torch.minimum(u.double().reshape(N, 1) * total, total * (1.0 - 2.0 ** -52))
    block = torch.searchsorted(cdf, target, right=True)  # [N, 1]: a block with mass
    lo = cdf.gather(1, (block - 1).clamp(min=0)).masked_fill(block == 0, 0.0)
    hi = cdf.gather(1, block)
    inner = p.gather(1, block[..., None].expand(N, 1, bs))[:, 0].double().cumsum(-1)  # [N, bs]
    in_total = inner[:, -1:]
    # the target's place within the block, on the block's own CDF; kept below its total
    t = torch.minimum((target - lo) / (hi - lo) * in_total, in_total * (1.0 - 2.0 ** -52))
    token = block * bs + torch.searchsorted(inner, t, right=True)
    return token.reshape(lead)
