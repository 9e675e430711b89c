"""The PPO critic: one linear layer on the policy's final hidden states.

The head shares the policy trunk (no second model), so it costs one [H] x 1 matmul per token.
It knows nothing about advantages or losses (learner/losses.py) and saves only its own weights;
the trunk is saved with the policy.
"""
from __future__ import annotations

import os
import tempfile

import torch
from safetensors.torch import load_file, save_file
from torch import nn


class ValueHead(nn.Module):
    """Linear(H, 1) over final-normed hidden states [B, T, H] -> values [B, T] (fp32).

    Zero-initialised (weight and bias): an untrained critic predicts 0 everywhere, so the first
    advantages are the plain (discounted) rewards instead of rewards plus random-init noise.
    The gradient w.r.t. the weight is the hidden state itself, so zero init still learns.
    The head is kept in fp32; hidden states are cast up, so a bf16 trunk gives fp32 values.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"hidden_size: must be >= 1 (the policy's hidden size), got {hidden_size}")
        self.hidden_size = hidden_size
        self.proj = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H] -> values [B, T]."""
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden: last dim must be hidden_size={self.hidden_size}, got shape {tuple(hidden.shape)}")
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1)  # [B, T]

    def save(self, path: str) -> None:
        """Write the weights as safetensors, atomically (temp file in the same folder, then rename)."""
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"hidden_size": str(self.hidden_size)})
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: str, hidden_size: int, device: str | torch.device = "cpu") -> "ValueHead":
        """Read a head written by `save`; hidden_size must match the policy it sits on."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no value head at {path!r}; write one with ValueHead.save "
                                    f"or start PPO without a value-head checkpoint")
        tensors = load_file(path, device=str(device))
        head = cls(hidden_size).to(device)
        weight = tensors.get("proj.weight")
        if weight is None or tuple(weight.shape) != (1, hidden_size):
            got = None if weight is None else tuple(weight.shape)
            raise ValueError(f"hidden_size: {path!r} holds a value head with proj.weight shape {got}, "
                             f"expected (1, {hidden_size}); load it with the hidden_size of the policy it was trained on")
        head.load_state_dict(tensors)
        return head
