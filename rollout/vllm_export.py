"""specroll's weights in the shapes vLLM loads (rollout.backend=vllm); imports no vLLM itself.

- `policy_weights`: specroll's Transformer state under Hugging Face names, what vLLM's
  Llama / Qwen loaders read in `reload_weights`.
- `SpecrollMedusa`: parallel heads as a vLLM Medusa draft model. vLLM's own Medusa block is
  `h + SiLU(W h)`, not specroll's `h + W2 SiLU(W1 h)`, so rollout/vllm_worker.py registers this
  class with vLLM under `MEDUSA_ARCH`; it holds a copy of the policy's LM head (re-sent with
  every sync) and the draft vocabulary where the heads have one.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable

import torch
from torch import nn

from rollout.model import ModelConfig
from spec_heads.heads import HeadConfig

MEDUSA_ARCH = "SpecrollMedusa"


class _ResBlock(nn.Module):
    """spec_heads.heads.ResBlock: h + W2(SiLU(W1 h)) (vLLM's Medusa block is h + SiLU(W h))."""

    def __init__(self, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, hidden)
        self.w2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.w2(nn.functional.silu(self.w1(h)))


class SpecrollMedusa(nn.Module):
    """specroll's parallel heads as a vLLM Medusa draft model: blocks.i.w{1,2} and lm_head (a copy
    of the policy's, re-sent with every sync), draft_tokens when the heads draft from a subset."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        c = vllm_config.speculative_config.draft_model_config.hf_config
        self.blocks = nn.ModuleList(_ResBlock(c.hidden_size) for _ in range(c.num_heads))
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        draft_vocab = int(getattr(c, "specroll_draft_vocab", 0))
        self.register_buffer("draft_tokens", torch.zeros(draft_vocab, dtype=torch.long) if draft_vocab else None)

    def forward(self, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        return [block(hidden_states) for block in self.blocks]

    def compute_logits(self, hidden_states: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for h in hidden_states:
            logits = self.lm_head(h)
            if self.draft_tokens is not None:  # drafts only from the draft vocabulary, as specroll's
                masked = torch.full_like(logits, -math.inf)
                masked[:, self.draft_tokens] = logits[:, self.draft_tokens]
                logits = masked
            out.append(logits)
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        loaded = set()
        for name, tensor in weights:
            if name not in own:
                raise ValueError(f"heads: unexpected tensor {name!r} for the vLLM Medusa export "
                                 f"(expected {sorted(own)})")
            own[name].data.copy_(tensor.to(own[name].dtype))
            loaded.add(name)
        return loaded


def policy_weights(policy_state: dict) -> list[tuple[str, torch.Tensor]]:
    """specroll's Transformer state -> (HF name, tensor), what vLLM's Llama/Qwen loaders read."""
    out = []
    for key, tensor in policy_state.items():
        if key.endswith("rotary.inv_freq") or key.startswith("rotary."):
            continue
        out.append((key if key == "lm_head.weight" else "model." + key, tensor))
    return out


def medusa_weights(heads_state: dict, policy_state: dict, k: int) -> list[tuple[str, torch.Tensor]]:
    """The first k parallel heads plus the policy's LM head, as SpecrollMedusa names them."""
    lm = policy_state.get("lm_head.weight", policy_state["embed_tokens.weight"])
    out = [("lm_head.weight", lm)]
    for i in range(k):
        for part in ("w1", "w2"):
            out += [(f"blocks.{i}.{part}.{p}", heads_state[f"blocks.{i}.{part}.{p}"]) for p in ("weight", "bias")]
    if "draft_tokens" in heads_state:
        out.append(("draft_tokens", heads_state["draft_tokens"]))
    return out


def save_medusa(folder: str, mc: ModelConfig, heads: HeadConfig, k: int, tensors) -> None:
    """A folder vLLM's speculative_config loads as `method: medusa` (config.json + safetensors)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    config = {"model_type": "medusa", "architectures": [MEDUSA_ARCH], "hidden_size": mc.hidden_size,
              "vocab_size": mc.vocab_size, "num_heads": k, "num_hidden_layers": 1,
              "specroll_draft_vocab": heads.draft_vocab}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file({n: t.detach().contiguous().cpu() for n, t in tensors}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
