"""Elementwise chains of the decoder block, fused into one kernel each on CUDA.

A decode step of a small model is a chain of kernels of a few microseconds each, even replayed
from a CUDA graph: in bf16 an RMSNorm is eight of them, a rotary embedding three, SwiGLU's
activation two. Inside `fused_elementwise()` (the engine's decoding, on CUDA) layers.py runs
these chains through `torch.compile` (one Triton kernel each, compiled once per process for any
shape), with the same formulas and the same intermediate roundings as the eager ones
(`emulate_precision_casts`). Outside it, and on a CPU, everything runs eagerly.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

_ON = False  # inside fused_elementwise()
_COMPILED: dict = {}


@contextlib.contextmanager
def fused_elementwise(enabled: bool = True):
    """Within this context, CUDA tensors take the fused kernels (`active`)."""
    global _ON
    old, _ON = _ON, enabled
    try:
        yield
    finally:
        _ON = old


def active(x: torch.Tensor) -> bool:
    return _ON and x.is_cuda


def fused(fn):
    """fn compiled for any shape (one kernel per chain), its bf16 roundings kept as written."""
    f = _COMPILED.get(fn)
    if f is None:
        # dtypes, 1-sized dimensions and callers (policy, heads) each add a compiled variant
        dyn = torch._dynamo.config
        if getattr(dyn, "recompile_limit", 64) < 64:
            dyn.recompile_limit = 64
        f = _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True,
                                          options={"emulate_precision_casts": True})
    return f


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's RMSNorm: normalised in fp32, cast back, then scaled (two roundings)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding over the whole head (layers.apply_rope)."""
    return torch.addcmul(x * cos, x.roll(cos.shape[-1] // 2, -1), sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
