"""The policy: a decoder-only transformer of the Llama / Qwen2 / Qwen3 / SmolLM2 family.

One class serves generation (KV cache, new tokens per row at each row's own positions) and
training (full sequences), so rollout and learner log-probabilities come from the same code.
`forward` returns the final-normed hidden states; `logits` applies the LM head, so callers pay
for the vocabulary projection only where they need it.

This module knows nothing about sampling, tokenizers or checkpoints on disk (rollout/checkpoint.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from spec_heads.layers import CacheView, DecoderBlock, KVCache, Linear, Ragged, RMSNorm, Rotary, causal_mask
from spec_heads.rope import RopeSpec, rope_inv_freq, rope_position_limit


@dataclass
class ModelConfig:
    """Architecture, with Hugging Face `config.json` field names."""

    vocab_size: int = 32
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 512
    attention_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = True
    model_type: str = "llama"  # llama | qwen2 | qwen3
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # HF fields we carry through unchanged

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.model_type == "qwen3":
            self.qk_norm = True
        rope_inv_freq(self.rope_spec())  # an unsupported rope fails here, at load, with the reason

    def rope_spec(self) -> RopeSpec:
        return RopeSpec(self.head_dim, self.rope_theta, self.rope_scaling, self.max_position_embeddings,
                        self.extra.get("partial_rotary_factor", 1.0))

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: v for k, v in d.items() if k in known}
        mt = d.get("model_type", "llama")
        if mt not in ("llama", "qwen2", "qwen3", "mistral"):
            raise ValueError(f"model_type={mt!r} is not supported; supported: llama, qwen2, qwen3, mistral")
        if mt == "qwen2":
            kw["attention_bias"] = True
        if d.get("rope_parameters") and not d.get("rope_scaling"):  # transformers >= 5 layout
            rp = dict(d["rope_parameters"])
            kw["rope_theta"] = rp.pop("rope_theta", kw.get("rope_theta", 10000.0))
            kw["rope_scaling"] = rp
        kw["rope_scaling"] = _rope_scaling(kw.get("rope_scaling"), d)
        kw["model_type"] = "llama" if mt == "mistral" else mt
        kw["extra"] = {k: v for k, v in d.items() if k not in known and k not in ("architectures",)}
        return cls(**kw)

    def to_hf(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("extra", "qk_norm")}
        d.update(self.extra)
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        d["architectures"] = [arch[self.model_type]]
        d["hidden_act"] = "silu"
        if self.model_type == "qwen2":
            d.pop("attention_bias")
        return d


def _rope_scaling(scaling: dict | None, d: dict) -> dict | None:
    """rope_scaling as transformers reads it: "type" is the old name of "rope_type", default is
    no scaling, and a top-level original_max_position_embeddings overrides the one inside."""
    if not scaling:
        return None
    scaling = dict(scaling)
    kind = scaling.setdefault("rope_type", scaling.pop("type", "default"))
    if kind == "default" and not set(scaling) - {"rope_type", "type", "rope_theta"}:
        return None
    if kind in ("llama3", "yarn", "longrope"):
        top = d.get("original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = top or scaling.get(
            "original_max_position_embeddings", d.get("max_position_embeddings", 512))
    return scaling


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(
            DecoderBlock(c.hidden_size, c.intermediate_size, c.num_attention_heads,
                         c.num_key_value_heads, c.head_dim, c.rms_norm_eps, c.attention_bias, c.qk_norm,
                         # Llama and Qwen3 put the bias on o_proj too; Qwen2 only on q/k/v
                         o_bias=c.attention_bias and c.model_type != "qwen2")
            for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary = Rotary(c.rope_spec())
        # the engine never runs past this position (dynamic / longrope rope; None: no limit)
        self.max_positions = rope_position_limit(c.rope_spec())
        self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def new_cache(self, max_batch: int, max_len: int, device=None, dtype=None) -> KVCache:
        c = self.config
        p = self.embed_tokens.weight
        return KVCache(c.num_hidden_layers, max_batch, max_len, c.num_key_value_heads, c.head_dim,
                       device or p.device, dtype or p.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, kv_len: int | None = None,
                slots: torch.Tensor | None = None, n_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, T] -> final-normed hidden states [B, T, H].

        Without a cache: full sequences, positions default to 0..T-1 (right padding is safe:
        attention is causal). With a cache: the new tokens of each row sit at `positions`
        [B, T] (each row its own start), K/V are written there, and queries attend over cache
        positions [0, kv_len). `slots` [B] picks cache rows (default 0..B-1).

        `n_tokens` [B] (1..T, a ragged step with a cache): row b's real tokens are its first n_tokens[b].
        On a CPU the projections and MLPs then run on the real tokens only (spec_heads.layers.
        Ragged); hidden states in padding are zeros. On CUDA the step runs padded (same values
        at real tokens, no host sync).
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        ragged = None
        if n_tokens is not None and cache is not None and not input_ids.is_cuda:
            ragged = Ragged.from_counts(n_tokens, T)
            input_ids = ragged.pack(input_ids)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions if ragged is None else ragged.pack(positions)[None], x.dtype)
        view = None
        if cache is not None:
            kv_len = kv_len or cache.max_len
            view = CacheView(cache, positions, kv_len, slots)
            mask = causal_mask(positions, kv_len)
        else:
            mask = causal_mask(positions, T)
        if x.is_cuda:  # additive once here: SDPA would convert a boolean mask in every layer (3 kernels)
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, i, view, ragged)
        x = self.norm(x)
        return x if ragged is None else ragged.unpack(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
