"""Draft heads: `parallel` (Medusa, arXiv:2401.10774) and `sequential` (DeepSeek-V3 MTP,
arXiv:2412.19437; Qwen3.5 native MTP), behind one interface.

The heads never own the policy's embedding or LM head. Both come in per call as callables
`embed(ids [..]) -> [.., H]` and `lm_head(h [.., H]) -> [.., V]` (the engine passes
`model.embed_tokens` and `model.logits`), so saving heads saves only head weights. This module
knows nothing about sampling, acceptance or the policy's KV cache.

Alignment (everything below follows from it):
- Trunk: the policy's final-normed hidden state h_t at position t predicts token x_{t+1}.
- Depth i (1-based) predicts x_{t+1+i} from h_t (and, for `sequential`, from x_{t+1..t+i}).
- `parallel`: depth i is its own residual block `h + W2(SiLU(W1 h))` (W2 zero-initialised, so
  a fresh head equals the trunk's next-token head) followed by the shared LM head. No weights
  are shared between depths (Medusa's `[ResBlock] * n` shared one block by accident).
- `sequential`: ONE module applied recursively. Its input for an entry at position t+m is
  `proj(cat(norm_h(g), norm_e(embed(x_{t+m}))))`, where g = h_t for depth 1 and g = the previous
  depth's block output (before the final norm) for depth m > 1. Then one DecoderBlock (the
  trunk's dims and RoPE) at position t+m, a final RMSNorm and the LM head: the output predicts
  x_{t+1+m}.

The sequential block attends over the sequence, so it keeps a KV cache of its OWN (never mixed
with the policy's; mixing the two shipped in a production MTP model as a train/inference
mismatch). At inference the cache holds the depth-1 entry of every committed position (entry
t+1 from h_t and x_{t+1}); a draft chain's entries (depth >= 2) sit at the positions after
them. `begin` writes the depth-1 entries of the newly accepted positions, overwriting the
chain's entries there (rollback is forgetting, as in layers.py). Position 0 holds no entry and
is never attended. `train_logits` reproduces exactly this view with a block/diagonal mask:
depth d for start t sees the depth-1 entries of starts s <= t and the chain entries of depths
2..d of start t only (tests/spec_heads/test_heads.py checks inference == training to 1e-5).
"""
from __future__ import annotations

import json
import math
import os
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spec_heads.layers import (Attention, CacheView, DecoderBlock, KVCache, Linear, RMSNorm, RopeSpec, Rotary,
                               attention, causal_mask, linear)

KINDS = ("parallel", "sequential")
MAX_DEPTHS = 8
WEIGHTS_FILE = "heads.safetensors"
CONFIG_FILE = "heads_config.json"
# Model dims a head set is tied to; a mismatch at load means the heads belong to another model.
MODEL_DIMS = ("hidden_size", "vocab_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "head_dim")


@dataclass
class HeadConfig:
    kind: str = "sequential"  # parallel | sequential
    num_depths: int = 6  # 1..8
    # Drafts come from the draft_vocab tokens the policy samples most (FR-Spec, arXiv:2502.14856):
    # the heads' LM head then multiplies that many rows of the policy's, not all of them (for a
    # 49k vocabulary, most of a draft step). 0: the whole vocabulary. Exact either way.
    draft_vocab: int = 0

    def __post_init__(self):
        if isinstance(self.draft_vocab, bool) or not isinstance(self.draft_vocab, int) or self.draft_vocab < 0:
            raise ValueError(f"draft_vocab: must be an integer >= 0 (0: draft from the whole vocabulary; "
                             f"e.g. 8192 for a 49k one), got {self.draft_vocab!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind: must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if isinstance(self.num_depths, bool) or not isinstance(self.num_depths, int) \
                or not 1 <= self.num_depths <= MAX_DEPTHS:
            raise ValueError(f"num_depths: must be an integer in 1..{MAX_DEPTHS} (drafts per "
                             f"step; deeper drafts are rarely accepted), got {self.num_depths!r}")


@dataclass
class DraftState:
    """Where a draft chain stands after the call that returned it.

    depth: the depth of the logits just returned (1 after `begin`).
    hidden [B, H]: parallel: the trunk's h at the row's last position; sequential: the block
      output of the last depth (before the final norm), the next depth's input ([B, H+E] where
      the chain runs on packed weights: see _Packed).
    positions [B]: sequential: head-cache position of the last entry written (None: parallel).
    """

    depth: int
    hidden: torch.Tensor
    positions: torch.Tensor | None = None
    cache: KVCache | None = None
    kv_len: int | None = None
    slots: torch.Tensor | None = None
    out_dtype: torch.dtype = torch.float32  # the trunk's dtype, which its lm_head expects
    chain: tuple | None = None  # sequential: (positions [B, K-1], cos, sin, mask) of depths 2..K
    packed: "_Packed | None" = None  # sequential: the decode weights the chain runs on (None: the modules)
    cache_rows: torch.Tensor | None = None  # sequential, packed: the head-cache rows as a column [B, 1]

    def take(self, index: torch.Tensor) -> "DraftState":
        """The chain of rows `index` [m] only (rows that stop drafting drop out of later depths);
        they keep writing their own head-cache rows."""
        slots = index if self.slots is None else self.slots[index]
        chain = None if self.chain is None else tuple(t[index] for t in self.chain)
        return replace(self, hidden=self.hidden[index],
                       positions=None if self.positions is None else self.positions[index],
                       slots=slots if self.positions is not None else self.slots, chain=chain,
                       cache_rows=None if self.cache_rows is None else self.cache_rows[index])


class ResBlock(nn.Module):
    """h + W2(SiLU(W1 h)), W2 zero-initialised so a fresh block is the identity."""

    def __init__(self, hidden: int):
        super().__init__()
        self.w1 = Linear(hidden, hidden)
        self.w2 = Linear(hidden, hidden)
        nn.init.zeros_(self.w2.weight)
        nn.init.zeros_(self.w2.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.w2(F.silu(self.w1(h)))


_EXTRA = 8  # the packed residual stream's extra columns (see _Packed)


@dataclass
class _Packed:
    """The sequential head's weights as drafting multiplies them (MTPModule.packed).

    A draft step at one row is launch-bound; this path runs one in ~40 ops and no module calls,
    against 61 ops and 13 module calls through the modules (scripts/time_head_step.py times
    both). How:
    - every RMSNorm weight that feeds a matrix is folded into that matrix's columns; q|k|v and
      gate|up are one matrix each; the residual adds ride in addmm;
    - the residual stream runs as rows of H + E, E = 8 extra columns: the first holds
      sqrt(H * eps), the others 0, and every matrix ignores them (zero rows) and leaves them as
      they are (zero columns). An RMSNorm is then one fused op, `torch._weight_norm` with gain
      sqrt(H): x sqrt(H) / |[x, sqrt(H eps), 0..]| = x / sqrt(mean(x^2) + eps), RMSNorm's own
      formula, eps included (F.rms_norm runs as ~8 ops on a CPU).
      E = 8, not 1, keeps every matrix dimension a multiple of 8 where H is: with H+1, GPU GEMM
      kernels can change with the batch's size, and with them a row's drafts.
    Draft distributions need only be the ones drafts are sampled from (rejection sampling is
    exact for any), so the float rounding this moves is no error; tests hold it to the
    modules' logits within 1e-5 all the same."""

    table: torch.Tensor  # [V, H+E]: proj's embedding half of norm_e(embedding) for every token, then `column`
    # Matrices are stored [in, out], contiguous: products x @ W in the BLAS's NN layout, which
    # for a few rows of small matrices is faster than F.linear's x @ W^T on a CPU.
    w_h: torch.Tensor  # [H+E, H+E]: proj's hidden half (norm_h's weight folded in)
    w_qkv: torch.Tensor  # [H+E, (heads + 2 kv_heads) * D], input_layernorm's weight folded in
    b_qkv: torch.Tensor | None
    w_o: torch.Tensor  # [heads * D, H+E]
    b_o: torch.Tensor | None  # [H+E]
    w_gu: torch.Tensor  # [H+E, 2 I]: gate then up, post_attention_layernorm's weight folded in
    w_down: torch.Tensor  # [I, H+E]
    w_final: torch.Tensor  # [H]: final_norm's weight (the LM head is the policy's)
    column: torch.Tensor  # [1, E]: sqrt(H * eps), then zeros
    gain: torch.Tensor  # [1, 1]: sqrt(H)
    n_heads: int
    n_kv: int
    head_dim: int
    hidden: int  # H
    gains: dict = field(default_factory=dict)  # rows -> gain as [rows, 1] (what _weight_norm takes)
    rotary: dict = field(default_factory=dict)  # max_len -> cos, sin tables (MTPModule.rotary_packed)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm without weight of rows [N, H+E] (extra columns: `column`) -> [N, H+E]."""
        g = self.gains.get(x.shape[0])
        if g is None:
            g = self.gains[x.shape[0]] = self.gain.expand(x.shape[0], 1).contiguous()
        return torch._weight_norm(x, g, 0)

    def extend(self, h: torch.Tensor) -> torch.Tensor:
        """Rows [N, H] -> [N, H+E] with the extra columns."""
        return torch.cat((h, self.column.expand(h.shape[0], _EXTRA)), 1)


class MTPModule(nn.Module):
    """The sequential head's one module: fuse, one decoder block, final norm."""

    def __init__(self, mc):
        super().__init__()
        H, eps = mc.hidden_size, mc.rms_norm_eps
        self.norm_h = RMSNorm(H, eps)
        self.norm_e = RMSNorm(H, eps)
        self.proj = Linear(2 * H, H, bias=False)
        self.block = DecoderBlock(H, mc.intermediate_size, mc.num_attention_heads,
                                  mc.num_key_value_heads, mc.head_dim, eps,
                                  mc.attention_bias, mc.qk_norm)
        self.final_norm = RMSNorm(H, eps)
        extra = getattr(mc, "extra", None) or {}
        self.rotary = Rotary(RopeSpec(mc.head_dim, mc.rope_theta, mc.rope_scaling,
                                      mc.max_position_embeddings,
                                      extra.get("partial_rotary_factor", 1.0)))

    def fuse(self, g: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """g, emb [.., H] -> block input [.., H]."""
        return self.proj(torch.cat((self.norm_h(g), self.norm_e(emb)), dim=-1))

    def __getstate__(self):  # the decode-time table (with weak references) is not state
        return {k: v for k, v in super().__getstate__().items() if not k.startswith("_fuse_")}

    def packed(self, embed, dtype: torch.dtype) -> _Packed | None:
        """The decode weights (_Packed) for drafting in `dtype` with the policy's `embed`, built
        once and rebuilt when any weight they derive from changes (a new tensor, or an in-place
        update: load_state_dict, an optimizer step). None where drafting runs the modules: with
        autograd on, an `embed` that is not an nn.Embedding, q/k norms, partial rotary."""
        block, attn = self.block, self.block.self_attn
        if torch.is_grad_enabled() or not isinstance(embed, nn.Embedding) or attn.q_norm is not None:
            return None
        norms = (self.norm_h, block.input_layernorm, block.post_attention_layernorm, self.final_norm)
        if self.rotary.inv_freq.numel() * 2 != attn.head_dim or len({n.eps for n in norms}) != 1:
            return None
        params = [embed.weight, *self.parameters()]
        key = (dtype, *((p.data_ptr(), p._version, p.dtype, p.device) for p in params))
        cached = getattr(self, "_fuse_packed", None)  # weak references: a freed tensor's address may be reused
        if cached is not None and cached[0] == key and all(r() is p for r, p in zip(cached[1], params)):
            return cached[2]
        H, eps, mlp = self.proj.weight.shape[0], self.norm_h.eps, block.mlp
        f32 = torch.float32

        def packed_matrix(ws, norm=None, extra_in=True, extra_out=False):
            """Stacked [out, in] weights -> [in(+E), out(+E)] in `dtype`: the norm's weight folded
            into the input columns, zero rows for the extra input columns (ignored), zero
            columns for the extra outputs (the extra columns stay as they are)."""
            w = torch.cat([w.to(f32) for w in ws])
            w = w * norm.weight.to(f32)[None, :] if norm is not None else w
            w = F.pad(w, (0, _EXTRA if extra_in else 0, 0, _EXTRA if extra_out else 0))
            return w.t().contiguous().to(dtype)

        with torch.no_grad():
            table = F.linear(self.norm_e(embed.weight.to(self.proj.weight.dtype)), self.proj.weight[:, H:]).to(f32)
            column = F.pad(torch.full((1, 1), math.sqrt(H * eps), dtype=f32, device=table.device), (0, _EXTRA - 1))
            bias = [m.bias for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
            packed = _Packed(
                table=torch.cat((table, column.expand(table.shape[0], _EXTRA)), 1).to(dtype),
                w_h=packed_matrix([self.proj.weight[:, :H]], self.norm_h, extra_out=True),
                w_qkv=packed_matrix([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight],
                                    block.input_layernorm),
                b_qkv=None if bias[0] is None else torch.cat([b.to(f32) for b in bias]).to(dtype),
                w_o=packed_matrix([attn.o_proj.weight], extra_in=False, extra_out=True),
                b_o=None if attn.o_proj.bias is None else F.pad(attn.o_proj.bias.to(f32), (0, _EXTRA)).to(dtype),
                w_gu=packed_matrix([mlp.gate_proj.weight, mlp.up_proj.weight], block.post_attention_layernorm),
                w_down=packed_matrix([mlp.down_proj.weight], extra_in=False, extra_out=True),
                w_final=self.final_norm.weight.to(dtype), column=column.to(dtype),
                gain=torch.full((1, 1), math.sqrt(H), dtype=dtype, device=table.device),
                n_heads=attn.n_heads, n_kv=attn.n_kv, head_dim=attn.head_dim, hidden=H)
        self._fuse_packed = (key, [weakref.ref(p) for p in params], packed)
        return packed

    def rotary_packed(self, p: _Packed, positions: torch.Tensor, max_len: int):
        """cos, signed sin [B, T, heads + 2 kv_heads, D] for `decode_block`: the rotary of
        `positions` [B, T] (< max_len) for the q and k heads, identity (1, 0) for the v heads,
        so one rotation of the whole q|k|v projection leaves v as it is. Looked up in a table
        of every position below max_len, made once (one op each, against ~14 to compute them)."""
        tables = p.rotary.get(max_len)
        if tables is None:
            cos, sin = self.rotary(torch.arange(max_len, device=positions.device)[None], p.gain.dtype)
            D, qk, v = p.head_dim, p.n_heads + p.n_kv, p.n_kv
            cos, sin = cos[0, 0, :, None], sin[0, 0, :, None]  # [L, 1, D]
            tables = p.rotary[max_len] = (torch.cat((cos.expand(max_len, qk, D), torch.ones_like(cos).expand(max_len, v, D)), 1),
                                          torch.cat((sin.expand(max_len, qk, D), torch.zeros_like(sin).expand(max_len, v, D)), 1))
        return tables[0][positions], tables[1][positions]

    @staticmethod
    def fuse_packed(p: _Packed, g: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """`fuse(g, embed(tokens))` through the packed weights: g [N, H+E], tokens [N] -> [N, H+E]."""
        return torch.addmm(p.table[tokens], p.norm(g), p.w_h)

    @staticmethod
    def decode_block(p: _Packed, x, B: int, cos, sin, mask, cache: KVCache, slots, positions, kv_len,
                     rows: torch.Tensor | None = None):
        """`block(x, ...)` over rows x [B * T, H+E] (row-major over [B, T]) with its K/V written to
        `cache` at `positions` [B, T] of cache rows `slots` (None: 0..B-1), through the packed
        weights; cos/sin from `rotary_packed`. rows: the cache rows as a column [B, 1] where the
        caller has them. Returns [B * T, H+E]."""
        T, D, nq = positions.shape[1], p.head_dim, p.n_heads
        y = p.norm(x)
        qkv = (torch.mm(y, p.w_qkv) if p.b_qkv is None else torch.addmm(p.b_qkv, y, p.w_qkv)).view(B, T, -1, D)
        qkv = torch.addcmul(qkv * cos, qkv.roll(D // 2, -1), sin)  # rotary on q and k, v as it is
        if rows is None:
            rows = (slots if slots is not None else torch.arange(B, device=x.device))[:, None]
        buf = cache.buf  # [2, max_batch, max_len, kv_heads, D]: this module's one layer
        kv = qkv[:, :, nq:].view(B, T, 2, p.n_kv, D).movedim(2, 0)
        buf[:, rows, positions] = kv if kv.dtype == buf.dtype else kv.to(buf.dtype)
        kv = buf[:, :B, :kv_len] if slots is None else buf[:, slots, :kv_len]  # [2, B, S, kv_heads, D]
        kv = kv.transpose(2, 3)
        o = attention(qkv[:, :, :nq].transpose(1, 2), kv[0], kv[1], mask, Attention.expand_masked_gqa_on_cuda)
        x = torch.addmm(x, o.view(B * T, -1), p.w_o)
        if p.b_o is not None:
            x = x + p.b_o
        gate, up = torch.mm(p.norm(x), p.w_gu).chunk(2, -1)
        return torch.addmm(x, F.silu(gate) * up, p.w_down)

    @staticmethod
    def final_packed(p: _Packed, x: torch.Tensor) -> torch.Tensor:
        """final_norm of rows [N, H+E] -> [N, H]."""
        return p.norm(x)[:, :p.hidden] * p.w_final

    def fuse_next(self, g: torch.Tensor, tokens: torch.Tensor, embed) -> torch.Tensor:
        """`fuse` of g with the embedding of `tokens`: through the per-token table where `embed`
        is an nn.Embedding (`fuse_tokens`), else by calling it."""
        if isinstance(embed, nn.Embedding):
            return self.fuse_tokens(g, tokens, embed)
        return self.fuse(g, embed(tokens).to(g.dtype))

    def fuse_tokens(self, g: torch.Tensor, tokens: torch.Tensor, embedding: nn.Embedding) -> torch.Tensor:
        """`fuse(g, embedding(tokens))` for decoding: proj splits into its hidden half and its
        embedding half, and the embedding half of every vocabulary token, proj_e(norm_e(E)) [V, H],
        is computed once and looked up (decoding a few rows is launch-bound; this runs once per
        draft depth). The table is rebuilt when a weight it derives from changes: in-place
        updates (load_state_dict, an optimizer step) bump a tensor's version counter. With
        autograd on, this is `fuse` itself: the table is a no-grad cache (and one built under
        inference mode cannot enter a graph)."""
        if torch.is_grad_enabled():
            return self.fuse(g, embedding(tokens).to(g.dtype))
        w, proj = embedding.weight, self.proj.weight
        key = (w._version, proj._version, self.norm_e.weight._version, g.dtype)
        src = getattr(self, "_fuse_src", None)  # weak references: a freed tensor's address may be reused
        if src is None or src[0]() is not w or src[1]() is not proj or self._fuse_key != key:
            H = proj.shape[0]
            with torch.no_grad():
                self._fuse_w_h = proj[:, :H].to(g.dtype).contiguous()
                self._fuse_table = F.linear(self.norm_e(w.to(proj.dtype)), proj[:, H:]).to(g.dtype)
            self._fuse_key, self._fuse_src = key, (weakref.ref(w), weakref.ref(proj))
        return torch.addmm(self._fuse_table[tokens].reshape(-1, g.shape[-1]),
                           self.norm_h(g).reshape(-1, g.shape[-1]), self._fuse_w_h.t()).view(g.shape)


class DraftHeads(nn.Module):
    def __init__(self, config: HeadConfig, model_config):
        super().__init__()
        self.config = config
        self.num_depths = config.num_depths
        self.kind = config.kind
        self.model_dims = {k: int(getattr(model_config, k)) for k in MODEL_DIMS}
        if config.kind == "parallel":
            self.blocks = nn.ModuleList(ResBlock(model_config.hidden_size)
                                        for _ in range(config.num_depths))
        else:
            self.mtp = MTPModule(model_config)
            self._n_kv, self._head_dim = model_config.num_key_value_heads, model_config.head_dim
        # Per-depth acceptance (sum_v min(target, draft), given the earlier drafts accepted) the
        # heads were last measured at on held-out text of the policy they were fitted to; -1
        # where unmeasured (not NaN: state dicts with NaN never compare equal). A buffer, so it
        # travels with the weights (publish, save, load) and the rollout's depth policy starts
        # from what the heads really achieve.
        self.register_buffer("acceptance", torch.full((config.num_depths,), -1.0))
        if config.draft_vocab:
            if config.draft_vocab >= model_config.vocab_size:
                raise ValueError(f"draft_vocab: {config.draft_vocab} is not below the policy's vocabulary "
                                 f"({model_config.vocab_size} tokens); set it lower, or 0 to draft from all")
            # the tokens drafts may take, ascending; the first ids until set_draft_vocab picks them
            self.register_buffer("draft_tokens", torch.arange(config.draft_vocab))

    def set_draft_vocab(self, sequences: list[list[int]], always: list[int] = ()) -> float:
        """Pick the draft vocabulary: the `always` tokens (e.g. stop tokens) and then the tokens
        that occur most in `sequences` (the policy's own samples), up to config.draft_vocab.
        Ties, and the slots left when the samples hold fewer distinct tokens, go to the lower
        ids (a BPE vocabulary numbers its tokens roughly by how early, i.e. how frequently,
        they were merged). Returns the share of the sequences' tokens it covers."""
        n, vocab = self.config.draft_vocab, self.model_dims["vocab_size"]
        if not n:
            raise ValueError("draft_vocab: these heads draft from the whole vocabulary (heads.draft_vocab=0)")
        counts = torch.zeros(vocab, dtype=torch.float64)
        for seq in sequences:
            counts.index_add_(0, torch.as_tensor(seq, dtype=torch.int64), torch.ones(len(seq), dtype=torch.float64))
        total = float(counts.sum())
        ranked = counts - torch.arange(vocab, dtype=torch.float64) / (2.0 * vocab)  # ties: lower id first
        ranked[torch.as_tensor(list(always), dtype=torch.int64)] = math.inf
        chosen = ranked.topk(n).indices.sort().values
        self.draft_tokens.copy_(chosen.to(self.draft_tokens.device))
        return float(counts[chosen].sum()) / total if total else 0.0

    def draft_lm_head(self, lm_head: nn.Linear):
        """The LM head the drafts use: `lm_head` itself, or with a draft vocabulary, a callable
        that multiplies only those rows of its weight and returns full-vocabulary logits, -inf
        elsewhere (a draft distribution that is zero off the draft vocabulary: rejection
        sampling stays exact). Build it after each weight update (it copies the rows)."""
        if not self.config.draft_vocab:
            return lm_head
        return _SubsetLMHead(lm_head, self.draft_tokens)

    def decode_tensors(self, embed) -> list[torch.Tensor]:
        """Every tensor drafting reads besides its inputs and cache: the weights, and the packed
        decode weights derived from them (rebuilt into new storage when the weights change),
        for callers that replay captured drafting steps (rollout.cuda_graphs)."""
        tensors = [*self.parameters(), *self.buffers()]
        if self.kind == "sequential":
            packed = self.mtp.packed(embed, self._param().dtype)
            if packed is not None:
                tensors += [t for t in vars(packed).values() if isinstance(t, torch.Tensor)]
        return tensors

    def measured_acceptance(self) -> list[float] | None:
        """The held-out per-depth acceptance recorded with the heads, or None if unmeasured."""
        values = self.acceptance.float().tolist()
        return None if any(v < 0 for v in values) else values

    def set_measured_acceptance(self, values: list[float] | None) -> None:
        """Record a held-out measurement (one value in [0, 1] per depth; None: unmeasured)."""
        if values is None:
            self.acceptance.fill_(-1.0)
            return
        if len(values) != self.num_depths or not all(-1e-4 <= v <= 1.0 + 1e-4 for v in values):
            raise ValueError(f"values: need {self.num_depths} acceptances in [0, 1] (one per depth), "
                             f"got {values}")
        clamped = [min(1.0, max(0.0, float(v))) for v in values]  # float sums may pass 1 by an ulp
        self.acceptance.copy_(torch.tensor(clamped, dtype=self.acceptance.dtype))

    def _param(self) -> torch.Tensor:
        return next(self.parameters())

    # ------------------------------------------------------------------ inference
    def new_cache(self, max_batch: int, max_len: int, device=None, dtype=None) -> KVCache | None:
        """The sequential head's own 1-layer KV cache; None for parallel heads.

        max_len: the policy cache's max_len. The head cache adds num_depths + 1 positions: the
        chain runs num_depths past the last committed position, and the last position is a
        scratch slot where `begin` writes its padding entries.
        """
        if self.kind == "parallel":
            return None
        p = self._param()
        return KVCache(1, max_batch, max_len + self.num_depths + 1, self._n_kv, self._head_dim,
                       device or p.device, dtype or p.dtype)

    def begin(self, hidden, next_tokens, positions, last_index, embed, lm_head,
              cache: KVCache | None = None, kv_len: int | None = None,
              slots: torch.Tensor | None = None, floor: torch.Tensor | None = None):
        """Start a draft chain; returns depth-1 logits [B, V] and the chain's state.

        hidden [B, T, H]: trunk hidden states at the T positions just fed (row b valid at
        t <= last_index[b]); next_tokens [B, T]: the token that follows positions[b, t];
        positions [B, T]: absolute positions of `hidden` (any values in padding);
        last_index [B]. Depth 1 predicts the token after next_tokens[b, last_index[b]].
        Sequential only: `cache` from `new_cache`, `slots` [B] its rows (default 0..B-1),
        `kv_len` attends over head-cache positions [0, kv_len) and must exceed
        max_b positions[b, last_index[b]] + num_depths (default: the whole cache); `floor` [B]
        (default 0): the chain attends only to head-cache positions >= floor[b] (entries below
        it are stale, e.g. positions the engine never ran the heads over).
        """
        B = hidden.shape[0]
        rows = torch.arange(B, device=hidden.device)
        if self.kind == "parallel":
            h_last = hidden[rows, last_index]  # [B, H]
            state = DraftState(depth=1, hidden=h_last, out_dtype=hidden.dtype)
            return self._parallel_logits(state, lm_head), state
        mtp, dt = self.mtp, self._param().dtype
        packed = mtp.packed(embed, dt)
        cache_rows = None
        if packed is None:
            out, write_pos, kv_len = self._absorb(hidden, next_tokens, positions, last_index, embed, cache,
                                                  kv_len, slots, floor)
            last_pos = write_pos[rows, last_index]  # [B]
            chain = None
            if self.num_depths > 1:
                # the chain's entries sit at last_pos + 1 .. last_pos + num_depths - 1: their rotary
                # angles and masks are made once here, not once per depth (decoding is launch-bound)
                cpos = last_pos[:, None] + torch.arange(1, self.num_depths, device=hidden.device)  # [B, K-1]
                chain = (cpos, *mtp.rotary(cpos, dt), self._mask(cpos, kv_len, floor))
        else:
            # One rotary and one mask for the T fed positions and the chain's K-1 positions
            # after the last accepted one, split after (decoding is launch-bound).
            write_pos, kv_len = self._write_positions(positions, last_index, cache, kv_len)
            T = write_pos.shape[1]
            last_pos = write_pos[rows, last_index]  # [B]
            cpos = last_pos[:, None] + torch.arange(1, self.num_depths, device=hidden.device)  # [B, K-1]
            every = torch.cat((write_pos, cpos), 1)
            cos, sin = mtp.rotary_packed(packed, every, cache.max_len)
            mask = self._mask(every, kv_len, floor, additive=dt)
            cache_rows = (rows if slots is None else slots)[:, None]
            out = self._packed_absorb(packed, hidden, next_tokens, cos[:, :T], sin[:, :T], mask[:, :, :T], cache,
                                      slots, write_pos, kv_len, cache_rows)  # [B, T, H+E]
            chain = (cpos, cos[:, T:], sin[:, T:], mask[:, :, T:]) if self.num_depths > 1 else None
        state = DraftState(depth=1, hidden=out[rows, last_index], positions=last_pos, cache=cache,
                           kv_len=kv_len, slots=slots, out_dtype=hidden.dtype, chain=chain, packed=packed,
                           cache_rows=cache_rows)
        final = mtp.final_norm(state.hidden) if packed is None else mtp.final_packed(packed, state.hidden)
        return lm_head(final.to(hidden.dtype)), state

    def prefill(self, hidden, next_tokens, positions, last_index, embed, cache: KVCache | None = None,
                kv_len: int | None = None, slots: torch.Tensor | None = None) -> None:
        """Write the sequential head's cache over the T positions just fed (e.g. a prompt), as
        `begin` does, without starting a draft chain (no chain set-up, no depth-1 logits): the
        engine's prefill, which drafts nothing yet. Arguments as for `begin`; no-op for
        parallel heads (they keep no cache)."""
        if self.kind == "parallel":
            return
        self._absorb(hidden, next_tokens, positions, last_index, embed, cache, kv_len, slots, None)

    def _absorb(self, hidden, next_tokens, positions, last_index, embed, cache, kv_len, slots, floor):
        """Run the head's block over the T fed positions, writing their depth-1 cache entries.
        Returns the block output [B, T, H], the cache positions written [B, T] and the kv_len
        used (default: the whole cache)."""
        mtp, dt = self.mtp, self._param().dtype
        write_pos, kv_len = self._write_positions(positions, last_index, cache, kv_len)
        packed = mtp.packed(embed, dt)
        if packed is not None:  # (the block output has the packed path's extra columns: [B, T, H+E])
            cos, sin = mtp.rotary_packed(packed, write_pos, cache.max_len)
            mask = self._mask(write_pos, kv_len, floor, additive=dt)
            out = self._packed_absorb(packed, hidden, next_tokens, cos, sin, mask, cache, slots, write_pos, kv_len)
            return out, write_pos, kv_len
        x = mtp.fuse_next(hidden.to(dt), next_tokens, embed)  # [B, T, H]
        cos, sin = mtp.rotary(write_pos, dt)
        out = mtp.block(x, cos, sin, self._mask(write_pos, kv_len, floor), 0,
                        CacheView(cache, write_pos, kv_len, slots))  # [B, T, H]
        return out, write_pos, kv_len

    def _packed_absorb(self, packed, hidden, next_tokens, cos, sin, mask, cache, slots, write_pos, kv_len,
                       cache_rows=None) -> torch.Tensor:
        """The packed block over the T fed positions (trunk hidden [B, T, H]) -> [B, T, H+E]."""
        B, T = write_pos.shape
        g = packed.extend(hidden.to(self._param().dtype).reshape(B * T, -1))
        x = self.mtp.fuse_packed(packed, g, next_tokens.reshape(-1))
        return self.mtp.decode_block(packed, x, B, cos, sin, mask, cache, slots, write_pos, kv_len,
                                     cache_rows).view(B, T, -1)

    @staticmethod
    def _write_positions(positions, last_index, cache, kv_len):
        """The head-cache positions the T fed positions write [B, T], and the kv_len to attend
        over (default: the whole cache)."""
        if cache is None:
            raise ValueError("cache: sequential heads keep their own KV cache; pass "
                             "heads.new_cache(max_batch, max_len) to begin")
        T = positions.shape[1]
        valid = torch.arange(T, device=positions.device)[None, :] <= last_index[:, None]  # [B, T]
        # Depth-1 entry for position p sits at p+1. Padding goes to the scratch position, so
        # whatever positions the caller put in padding can never overwrite a committed entry.
        return torch.where(valid, positions + 1, cache.max_len - 1), kv_len or cache.max_len

    def step(self, state: DraftState, token: torch.Tensor, embed, lm_head):
        """Depth m+1 logits [B, V] given the depth-m drafted token [B]; returns (logits, state)."""
        if state.depth >= self.num_depths:
            raise ValueError(f"step: the chain already drafted all num_depths={self.num_depths} "
                             "depths; call begin to start a new chain (or fit deeper heads)")
        if self.kind == "parallel":
            state = replace(state, depth=state.depth + 1)
            return self._parallel_logits(state, lm_head), state
        mtp, i, p = self.mtp, state.depth - 1, state.packed
        cpos, cos, sin, mask = state.chain
        pos = cpos[:, i:i + 1]  # [B, 1]
        if p is not None:
            x = mtp.fuse_packed(p, state.hidden, token)  # [B, H+E]
            out = mtp.decode_block(p, x, x.shape[0], cos[:, i:i + 1], sin[:, i:i + 1], mask[:, :, i:i + 1],
                                   state.cache, state.slots, pos, state.kv_len, state.cache_rows)
            final = mtp.final_packed(p, out)
        else:
            x = mtp.fuse_next(state.hidden, token, embed)[:, None]  # [B, 1, H]
            out = mtp.block(x, cos[:, :, i:i + 1], sin[:, :, i:i + 1], mask[:, :, i:i + 1], 0,
                            CacheView(state.cache, pos, state.kv_len, state.slots))[:, 0]
            final = mtp.final_norm(out)
        state = DraftState(depth=state.depth + 1, hidden=out, positions=pos[:, 0], cache=state.cache,
                           kv_len=state.kv_len, slots=state.slots, out_dtype=state.out_dtype,
                           chain=state.chain, packed=p, cache_rows=state.cache_rows)
        return lm_head(final.to(state.out_dtype)), state

    def all_logits(self, state: DraftState, lm_head, depths: int | None = None) -> torch.Tensor:
        """parallel only: the logits of depths 1..depths (default num_depths) at once, [B, K, V].

        A parallel head's depths depend on h alone, not on each other's drafted tokens, so one
        LM-head call covers them all (drafting costs about one depth, not K)."""
        if self.kind != "parallel":
            raise ValueError("all_logits: only parallel heads draft every depth at once; sequential "
                             "heads draft depth by depth with step()")
        depths = self.num_depths if depths is None else depths
        h = state.hidden.to(self._param().dtype)
        feats = torch.stack([self.blocks[i](h) for i in range(depths)], dim=1)  # [B, K, H]
        return lm_head(feats.to(state.out_dtype))

    def _parallel_logits(self, state: DraftState, lm_head) -> torch.Tensor:
        h = state.hidden
        return lm_head(self.blocks[state.depth - 1](h.to(self._param().dtype)).to(h.dtype))

    @staticmethod
    def _mask(write_pos: torch.Tensor, kv_len: int, floor: torch.Tensor | None = None,
              additive: torch.dtype | None = None) -> torch.Tensor:
        """[B, 1, T, kv_len]: causal over head-cache positions; position 0 never holds an entry,
        nor do positions below a row's floor. Boolean, or with `additive` a 0 / -inf mask of that
        dtype (the log of the boolean one): SDPA turns a boolean mask into one on every call."""
        keys = torch.arange(kv_len, device=write_pos.device)
        mask = causal_mask(write_pos, kv_len).logical_and_(
            keys >= (1 if floor is None else floor.clamp(min=1)[:, None, None, None]))
        return mask if additive is None else mask.to(additive).log_()

    # ------------------------------------------------------------------ training
    def train_logits(self, hidden, tokens, embed, lm_head, depths: int | None = None):
        """Teacher-forced draft logits [B, K, T, V], K = depths (default num_depths).

        hidden [B, T, H]: the trunk's hidden at position t of `tokens` [B, T] (it predicted
        tokens[:, t+1]). logits[:, i-1, t] is depth i's draft for tokens[:, t+1+i] given the
        true tokens up to t+i; its target is the trunk's distribution at position t+i, so it
        is valid only for t+i <= T-1 (finite garbage elsewhere).
        """
        return lm_head(self.train_features(hidden, tokens, embed, depths).to(hidden.dtype))

    def train_features(self, hidden, tokens, embed, depths: int | None = None) -> torch.Tensor:
        """`train_logits` before the LM head: [B, K, T, H] (lets a loss chunk the vocab)."""
        depths = self.num_depths if depths is None else depths
        if not 1 <= depths <= self.num_depths:
            raise ValueError(f"depths: must be in 1..{self.num_depths} (the heads' num_depths), "
                             f"got {depths}")
        h = hidden.to(self._param().dtype)
        if self.kind == "parallel":
            return torch.stack([self.blocks[i](h) for i in range(depths)], dim=1)
        return self._sequential_features(h, tokens, embed, depths)

    def _sequential_features(self, h, tokens, embed, depths: int) -> torch.Tensor:
        B, T, _ = h.shape
        mtp, attn = self.mtp, self.mtp.block.self_attn
        start = torch.arange(T, device=h.device)
        # Depth m (1-based) for start t: input token x_{t+m}, entry at position t+m. Tokens
        # past the end feed only entries whose outputs are invalid (t+m > T-1).
        shifted = F.pad(tokens, (0, depths), value=0)
        g, keys, values, feats = h, [], [], []
        for m in range(1, depths + 1):
            x = mtp.fuse(g, embed(shifted[:, m:m + T]).to(h.dtype))  # [B, T, H]
            cos, sin = mtp.rotary((start + m).expand(B, T), h.dtype)
            q, k, v = attn.project(mtp.block.input_layernorm(x), cos, sin)  # [B, heads, T, D]
            keys.append(k)
            values.append(v)
            out = x + attn.attend(q, torch.cat(keys, 2), torch.cat(values, 2),
                                   _train_mask(m, T, h.device))
            g = out + mtp.block.mlp(mtp.block.post_attention_layernorm(out))
            feats.append(mtp.final_norm(g))
        return torch.stack(feats, dim=1)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path_dir, policy_version: int, extra: dict | None = None) -> None:
        """Head weights (safetensors) + heads_config.json; each written to a temp file, then renamed."""
        from safetensors.torch import save_file

        path = Path(path_dir)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"kind": self.kind, "num_depths": self.num_depths, "draft_vocab": self.config.draft_vocab,
                **self.model_dims,
                "policy_version": int(policy_version), "extra": extra or {}}
        tmp_w, tmp_c = path / (WEIGHTS_FILE + ".tmp"), path / (CONFIG_FILE + ".tmp")
        save_file(tensors, str(tmp_w))
        tmp_c.write_text(json.dumps(meta, indent=2))
        os.replace(tmp_w, path / WEIGHTS_FILE)
        os.replace(tmp_c, path / CONFIG_FILE)

    @classmethod
    def load(cls, path_dir, model_config, device=None, dtype=None):
        """-> (heads, policy_version). Raises ValueError if the heads belong to another model."""
        from safetensors.torch import load_file

        path = Path(path_dir)
        if not (path / CONFIG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"path_dir: {path} holds no {CONFIG_FILE} + {WEIGHTS_FILE}; "
                                    "point it at a directory written by DraftHeads.save")
        meta = json.loads((path / CONFIG_FILE).read_text())
        saved = {k: meta[k] for k in MODEL_DIMS}
        wanted = {k: int(getattr(model_config, k)) for k in MODEL_DIMS}
        if saved != wanted:
            show = lambda d: ", ".join(f"{k}={d[k]}" for k in MODEL_DIMS if saved[k] != wanted[k])
            raise ValueError(f"path_dir: heads at {path} were fit for a model with ({show(saved)}) "
                             f"but the policy has ({show(wanted)}); re-fit heads for this policy "
                             "(`specroll fit-heads`)")
        heads = cls(HeadConfig(meta["kind"], meta["num_depths"], meta.get("draft_vocab", 0)), model_config)
        state = load_file(str(path / WEIGHTS_FILE))
        # heads saved before the acceptance buffer existed: take fit-heads' held-out record
        acc = meta.get("extra", {}).get("acceptance_after") or [-1.0] * heads.num_depths
        state.setdefault("acceptance", torch.tensor(acc, dtype=torch.float32))
        heads.load_state_dict(state)
        heads.to(device=device, dtype=dtype)
        return heads, int(meta["policy_version"])


class _SubsetLMHead:
    """Logits over `token_ids` only, scattered into a full-vocabulary row of -inf."""

    def __init__(self, lm_head: nn.Linear, token_ids: torch.Tensor):
        ids = token_ids.to(lm_head.weight.device)
        self.ids, self.vocab = ids, lm_head.weight.shape[0]
        self.weight = lm_head.weight.detach().index_select(0, ids).contiguous()  # [N, H]
        self.bias = lm_head.bias.detach()[ids] if lm_head.bias is not None else None

    def refresh(self, lm_head: nn.Linear) -> None:
        """Copy the rows of `lm_head` (updated weights) into this head's storage, in place."""
        with torch.no_grad():
            self.weight.copy_(lm_head.weight.detach().index_select(0, self.ids))
            if self.bias is not None:
                self.bias.copy_(lm_head.bias.detach()[self.ids])

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        sub = linear(hidden.to(self.weight.dtype), self.weight, self.bias)  # [..., N]
        out = sub.new_full((*sub.shape[:-1], self.vocab), -math.inf)
        return out.index_copy_(-1, self.ids, sub)


def _train_mask(depth: int, T: int, device) -> torch.Tensor:
    """[T, depth*T] boolean: depth `depth` for start t sees the depth-1 entries of starts
    s <= t and the chain entries (depths 2..depth) of start t only, as in rollout."""
    idx = torch.arange(T, device=device)
    first = idx[None, :] <= idx[:, None]  # [T, T] causal over depth-1 entries
    chain = torch.eye(T, dtype=torch.bool, device=device)  # [T, T] same start only
    return torch.cat([first] + [chain] * (depth - 1), dim=1)
