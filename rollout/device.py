"""Where and in what dtype a policy runs: 'auto' resolved for this machine. No Ray here, so
`specroll bench` and other single-process tools run where Ray is not installed (the image of a
lent GPU machine, for one)."""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when a GPU is visible, else cpu; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on a GPU, fp32 on a CPU. A CPU stays fp32 even where it multiplies bf16
    natively (`cpu_native_bf16`): the learner there trains in fp32, and rollouts in another
    dtype would give it logprobs of a slightly different policy. Ask for bfloat16 to have it."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def cpu_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16). There a
    bf16 policy decodes faster than fp32, and a verify forward over several tokens costs about
    what one token costs. Without them bf16 matrix products are emulated and slow."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
