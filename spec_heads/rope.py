"""Rotary position embeddings' parameters: inverse frequencies and attention scaling for every
rope variant transformers runs for Llama / Qwen2 / Qwen3 / Mistral, computed as it computes
them (modeling_rope_utils), op for op in fp32, so the angles are bit-identical to its own.
Variants whose frequencies follow the sequence length (dynamic, longrope) are exact below a
position limit that the engine enforces; anything else transformers would compute differently
is refused with the reason. torch only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RopeSpec:
    """Rotary embedding parameters, as in a Hugging Face config (`rope_theta`, `rope_scaling`)."""

    head_dim: int
    theta: float = 10000.0
    scaling: dict | None = None  # {"rope_type": one of ROPE_TYPES, its options...}
    max_position_embeddings: int = 2048
    partial_rotary_factor: float = 1.0


# transformers' rope types (modeling_rope_utils.ROPE_INIT_FUNCTIONS), computed here the way it
# computes them for Llama / Qwen2 / Qwen3 / Mistral, op for op in fp32, so the angles are its own.
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")


def rope_position_limit(spec: RopeSpec) -> int | None:
    """The first position at which `rope_inv_freq` stops matching transformers, or None (never).

    dynamic and longrope rescale their frequencies from the length of the sequence a forward
    sees (and, with a KV cache, from the history of calls), which a cached engine cannot follow;
    inside these limits the frequencies are the static ones computed here."""
    sc = spec.scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "dynamic":
        return spec.max_position_embeddings
    if kind == "longrope":
        return int(sc.get("original_max_position_embeddings") or spec.max_position_embeddings)
    return None


def rope_inv_freq(spec: RopeSpec) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rot_dim/2] (fp32) and the attention scaling factor for `spec`; a
    ValueError names what transformers would compute differently."""
    sc = dict(spec.scaling or {})
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type={kind!r} is not supported; transformers' Llama-family "
                         f"models take one of {', '.join(ROPE_TYPES)}")
    if any(isinstance(v, dict) for v in sc.values()):
        raise ValueError("rope_scaling: per-layer rope parameters are not supported; the policy uses one rope")
    base, partial = spec.theta, float(sc.get("partial_rotary_factor", spec.partial_rotary_factor))
    if partial != 1.0 and kind != "proportional":
        raise ValueError(f"partial_rotary_factor={partial} with rope_type={kind!r} is not supported: transformers' "
                         "Llama / Qwen2 / Qwen3 / Mistral rotate the whole head for it (default rope ignores the "
                         "factor, scaled ropes fail), so no model trained with a partial rotation runs the same "
                         "there; use a checkpoint without it")

    def need(key):
        if sc.get(key) is None:
            raise ValueError(f"rope_scaling: rope_type={kind!r} needs {key!r}; add it to the checkpoint's config.json")
        return sc[key]

    dim = spec.head_dim
    if kind == "default":
        return _plain_inv_freq(base, dim), 1.0
    if kind == "linear":
        return _plain_inv_freq(base, dim) / need("factor"), 1.0
    if kind == "dynamic":  # its frequencies at sequence length max_position_embeddings (the limit)
        factor, seq = need("factor"), spec.max_position_embeddings
        scaled = base * ((factor * seq / spec.max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return _plain_inv_freq(scaled, dim), 1.0
    if kind == "llama3":  # arXiv:2407.21783, frequency-dependent interpolation
        return _llama3_inv_freq(_plain_inv_freq(base, dim), need("factor"), need("low_freq_factor"),
                                need("high_freq_factor"), need("original_max_position_embeddings")), 1.0
    if kind == "yarn":  # arXiv:2309.00071
        return _yarn_inv_freq(spec, sc, need("original_max_position_embeddings"), dim)
    if kind == "longrope":  # arXiv:2402.13753; the short factors, inside the limit
        old, short = need("original_max_position_embeddings"), need("short_factor")
        need("long_factor")
        if len(short) != dim // 2:
            raise ValueError(f"rope_scaling.short_factor: needs head_dim/2 = {dim // 2} values, got {len(short)}")
        factor = sc.get("factor")
        if factor is None:  # Phi3-style configs: the ratio of the context lengths
            factor = spec.max_position_embeddings / old
        attention = sc.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (torch.tensor(short, dtype=torch.float32) * base ** shape), float(attention)
    # proportional: the first partial * head_dim / 2 angles rotate, the rest stay put (zero frequency)
    angles = int(partial * dim // 2)
    rotated = 1.0 / (base ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / dim))
    inv = torch.cat((rotated, torch.zeros(dim // 2 - angles, dtype=torch.float32)))
    return inv / sc.get("factor", 1.0), 1.0


def _plain_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(inv: torch.Tensor, factor, low, high, old) -> torch.Tensor:
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(spec: RopeSpec, sc: dict, old, dim: int) -> tuple[torch.Tensor, float]:
    base = spec.theta
    if "factor" not in sc:
        raise ValueError("rope_scaling: rope_type='yarn' needs 'factor'; add it to the checkpoint's config.json")
    factor = sc["factor"]
    if factor is None:  # DeepSeek-style configs: the ratio of the context lengths
        factor = spec.max_position_embeddings / old

    def mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = sc.get("attention_factor")
    if attention is None:
        m, m_all = sc.get("mscale"), sc.get("mscale_all_dim")
        attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = sc.get("beta_fast") or 32, sc.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attention)
