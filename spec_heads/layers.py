"""Transformer building blocks shared by the policy (rollout/model.py) and the sequential draft
head: RMSNorm, rotary embeddings (their parameters: spec_heads/rope.py), grouped-query attention
over a slot-indexed KV cache, SwiGLU, one decoder block.

The KV cache knows nothing about sequences or sampling. It is a set of per-layer buffers
indexed by (slot, position). A row's length lives with its owner (the engine); rolling a row
back is forgetting: entries past its length are overwritten by the next write and never read
before that, because attention is causal on absolute positions.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spec_heads import fused as _fz
from spec_heads.rope import RopeSpec, rope_inv_freq  # noqa: F401  (RopeSpec: re-exported for heads.py)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one fused op
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        if _fz.active(x):
            return _fz.fused(_fz.rms_norm)(x, self.weight, self.eps)
        return _fz.rms_norm(x, self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear that, on a CPU, multiplies a few rows as more where the BLAS is faster so
    (zero padding, dropped after): see `calibrate_cpu_row_padding`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# rows -> rows to multiply them as, on a CPU (calibrate_cpu_row_padding; empty: as they are):
# under a weight shape (out, in) for that shape, under None for every other shape
_CPU_ROW_PAD: dict[tuple[int, int] | None, dict[int, int]] = {}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, multiplying `rows` rows as the padding table says for this weight's shape on a
    CPU (see Linear)."""
    if _CPU_ROW_PAD and x.is_cpu and x.dim() >= 2 and x.shape[-1]:
        table = _CPU_ROW_PAD.get(weight.shape) or _CPU_ROW_PAD.get(None)
        rows = x.numel() // x.shape[-1]
        pad = table.get(rows, rows) if table else rows
        if pad > rows:
            return _padded_linear(x, weight, bias, rows, pad)
    return F.linear(x, weight, bias)


def _padded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int,
                   pad: int) -> torch.Tensor:
    """F.linear of x's `rows` rows multiplied as `pad` rows (zero rows added, dropped after)."""
    return _unpad_rows(F.linear(_pad_rows(x, rows, pad), weight, bias), x, rows)


def _pad_rows(x: torch.Tensor, rows: int, pad: int) -> torch.Tensor:
    """x's `rows` rows as a [pad, in] matrix, zero rows after them."""
    flat = x.reshape(rows, x.shape[-1])
    return torch.cat((flat, flat.new_zeros(pad - rows, x.shape[-1])))


def _unpad_rows(out: torch.Tensor, x: torch.Tensor, rows: int) -> torch.Tensor:
    """The first `rows` rows of a padded product, in x's leading shape."""
    return out[:rows].reshape(*x.shape[:-1], out.shape[-1])


def cpu_row_padding() -> dict:
    """The padding in force (a copy): rows -> rows where one table serves every weight shape,
    else weight shape (out, in) -> {rows -> rows}."""
    if set(_CPU_ROW_PAD) <= {None}:
        return dict(_CPU_ROW_PAD.get(None, {}))
    return {k: dict(v) for k, v in _CPU_ROW_PAD.items()}


def set_cpu_row_padding(table: dict) -> None:
    """Use `table` from now on, in every Linear of this process: rows -> rows >= them for every
    weight shape, or weight shape (out, in) -> such a table (a shape not in it is not padded)."""
    by_shape = table if table and all(isinstance(k, tuple) for k in table) else {None: table}
    clean = {}
    for shape, rows_to in by_shape.items():
        if not all(isinstance(r, int) and isinstance(p, int) for r, p in rows_to.items()):
            raise ValueError(f"table: rows -> rows, or a weight shape (out, in) -> rows -> rows, got {table}")
        bad = {r: p for r, p in rows_to.items() if not 1 <= r <= p}
        if bad:
            raise ValueError(f"table: each entry must map rows >= 1 to at least as many rows, got {bad}")
        if any(p > r for r, p in rows_to.items()):
            clean[None if shape is None else tuple(shape)] = {r: p for r, p in rows_to.items() if p > r}
    _CPU_ROW_PAD.clear()
    _CPU_ROW_PAD.update(clean)


@torch.inference_mode()
def calibrate_cpu_row_padding(weights: list[torch.Tensor], max_rows: int = 12, repeats: int = 3,
                              min_gain: float = 0.05) -> dict[tuple[int, int], dict[int, int]]:
    """Time x @ W.T for 1..max_rows rows over each weight shape's matrices (a model's linear
    weights, read from memory as a decode step reads them), and map each row count to the row
    count >= it that was fastest for that shape, by at least min_gain (only padding up is
    possible: the rows are real). Returns the table for set_cpu_row_padding: weight shape ->
    {rows -> rows}, shapes that pad nothing left out.

    The BLAS's speed by row count differs from machine to machine and from shape to shape (some
    CPU BLAS builds run 2-3 rows as that many matrix-vector products, each reading the whole
    matrix, so 3 rows can cost more than 4), and one table for all shapes swings from run to run:
    hence a table per weight shape, measured on the machine. Rows are interleaved within
    each repeat, so drift in the machine's speed affects every row count alike."""
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for w in weights:
        if w.dim() == 2 and w.is_cpu:
            groups.setdefault(tuple(w.shape), []).append(w.detach())
    table = {}
    for shape, ws in groups.items():
        xs = {rows: torch.randn(rows, shape[1], dtype=ws[0].dtype) for rows in range(1, max_rows + 1)}
        times = dict.fromkeys(xs, math.inf)
        # What padding itself costs (the zero rows, the cat, the slice back), per matrix: on small
        # matrices it can exceed what padding saves, so it is timed as _padded_linear's ops around
        # the product, from 1 row to max_rows, and charged against the gain.
        extra = math.inf
        for rep in range(repeats + 1):
            for rows, x in xs.items():
                t0 = time.perf_counter()
                for w in ws:
                    F.linear(x, w)
                if rep:  # the first pass warms up; other load only ever adds time
                    times[rows] = min(times[rows], time.perf_counter() - t0)
            if max_rows > 1:
                t0 = time.perf_counter()
                _unpad_rows(_pad_rows(xs[1], 1, max_rows), xs[1], 1)
                if rep:
                    extra = min(extra, time.perf_counter() - t0)
        pad = padding_from_times(times, min_gain, 0.0 if math.isinf(extra) else extra * len(ws))
        if pad:
            table[shape] = pad
    return table


def padding_from_times(times: dict[int, float], min_gain: float = 0.05, overhead: float = 0.0) -> dict[int, int]:
    """rows -> the row count >= rows with the least time, padding's own cost `overhead` added
    to every padded count, where that is at least min_gain faster than `rows` itself (times:
    rows -> seconds for 1..max_rows)."""
    top = max(times)
    table = {}
    for rows in sorted(times):
        cost = lambda r: times[r] + (overhead if r > rows else 0.0)
        pad = min(range(rows, top + 1), key=lambda r: (cost(r), r))
        if cost(pad) < (1.0 - min_gain) * times[rows]:
            table[rows] = pad
    return table


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos/sin [B, 1, T, rot] from `Rotary` (rot <= D, in x's dtype).

    Hugging Face's half-split RoPE is x * cos + cat(-x2, x1) * sin. `Rotary` returns the sine
    with that sign folded in (-sin | +sin), so the rotation is x * cos + roll(x, rot/2) * sin:
    three kernels instead of eight (decoding a few rows is launch-bound; this runs twice a layer).
    """
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return _fz.fused(_fz.rope)(x, cos, sin) if _fz.active(x) else _fz.rope(x, cos, sin)
    xr, xp = x[..., :rot], x[..., rot:]
    return torch.cat((torch.addcmul(xr * cos, xr.roll(rot // 2, -1), sin), xp), dim=-1)


class Rotary(nn.Module):
    def __init__(self, spec: RopeSpec):
        super().__init__()
        inv, self.mscale = rope_inv_freq(spec)
        self.register_buffer("inv_freq", inv, persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not round the frequencies: angles would drift by ~pos * 2^-9
        inv = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv.to(self.inv_freq.device, torch.float32)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, signed sin [B, 1, T, rot_dim], computed in fp32 and cast to
        `dtype` (default fp32) once per forward, as Hugging Face casts them to q's dtype."""
        freqs = positions.float()[:, None, :, None] * self.inv_freq  # [B, 1, T, rot/2]
        cos, sin = freqs.cos(), freqs.sin()
        if self.mscale != 1.0:
            cos, sin = cos * self.mscale, sin * self.mscale
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        if dtype is not None and dtype != torch.float32:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin


class KVCache:
    """Per-layer K/V buffers [max_batch, max_len, n_kv_heads, head_dim], indexed by slot."""

    def __init__(self, num_layers: int, max_batch: int, max_len: int, n_kv_heads: int,
                 head_dim: int, device=None, dtype=torch.float32):
        # One buffer [2 * layers, ...]: k[i] and v[i] are contiguous views of it, so moving rows
        # between slots (move_rows) is one copy for every layer, not 2 * layers of them.
        self.buf = torch.zeros(2 * num_layers, max_batch, max_len, n_kv_heads, head_dim,
                               device=device, dtype=dtype)
        self.k = [self.buf[2 * i] for i in range(num_layers)]
        self.v = [self.buf[2 * i + 1] for i in range(num_layers)]
        self.max_batch, self.max_len = max_batch, max_len

    def nbytes(self) -> int:
        return self.buf.numel() * self.buf.element_size()

    def move_rows(self, moves: list[tuple[int, int]], upto: int | None = None,
                  index: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Copy slot src to slot dst for each (src, dst) in `moves` (no dst is another move's
        src), in every layer's K and V, over positions [0, upto) (default: all). `index`: the
        moves' (src, dst) as tensors on the buffer's device, where the caller has them. A row's entries
        at or past its length are never read before a forward writes them, so callers pass a
        bound on the rows' lengths. On a CPU, one plain slice copy per row over the shared
        buffer: 6 rows of the tiny policy's 8 buffers took 55 us this way, 94 us as one indexed
        copy and 276 us as one indexed copy per buffer. On a GPU (launch-bound), and for more than
        32 rows (where the per-row Python calls add up), one indexed copy."""
        upto = self.max_len if upto is None else min(upto, self.max_len)
        if self.buf.is_cuda or len(moves) > 32:
            if index is None:
                index = (torch.tensor([s for s, _ in moves], device=self.buf.device),
                         torch.tensor([d for _, d in moves], device=self.buf.device))
            src, dst = index
            self.buf[:, dst, :upto] = self.buf[:, src, :upto]
            return
        for src, dst in moves:
            self.buf[:, dst, :upto] = self.buf[:, src, :upto]


@dataclass
class CacheView:
    """Where one forward reads and writes in a KVCache.

    slots [B] (None: rows 0..B-1), positions [B, T] absolute positions of the new tokens,
    kv_len: attend over cache positions [0, kv_len) (static per batch bucket).
    """

    cache: KVCache
    positions: torch.Tensor
    kv_len: int
    slots: torch.Tensor | None = None


def causal_mask(query_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[B, 1, T, kv_len] boolean, True where key position <= query position."""
    keys = torch.arange(kv_len, device=query_pos.device)
    return (keys[None, None, :] <= query_pos[:, :, None])[:, None]


def expand_kv(kv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, kv_heads, S, D] -> [B, n_heads, S, D]: query head h reads KV head h // (n_heads /
    kv_heads), as SDPA's enable_gqa does."""
    B, n_kv, S, D = kv.shape
    return kv[:, :, None].expand(B, n_kv, n_heads // n_kv, S, D).reshape(B, n_heads, S, D)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) masked) v for q [B, heads, T, D], k/v [B, kv_heads, S, D] and a
    mask [B, 1, T, S] (boolean, or additive: 0 / -inf), as two batched matrix products per KV
    head's group of query heads (no KV expansion) with the softmax in fp32 (or wider): SDPA's
    result, by another kernel (see calibrate_cpu_attention)."""
    B, H, T, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    g = H // n_kv
    scores = torch.matmul(q.reshape(B, n_kv, g * T, D), k.transpose(-1, -2))  # [B, kv, g*T, S]
    acc = torch.promote_types(q.dtype, torch.float32)  # the softmax in fp32 at least
    scores = scores.view(B, n_kv, g, T, S).to(acc).mul_(D ** -0.5)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill_(~mask[:, :, None], float("-inf"))
    else:
        scores = scores.add_(mask[:, :, None])
    probs = torch.softmax(scores, -1).to(q.dtype).view(B, n_kv, g * T, S)
    return torch.matmul(probs, v).view(B, H, T, D)


# (heads, kv heads, head dim, dtype) -> the (rows class, width class) pairs whose masked
# attention runs grouped_attention on a CPU (calibrate_cpu_attention; absent: SDPA throughout)
_CPU_GROUPED: dict[tuple, frozenset] = {}
_ATTN_ROWS, _ATTN_WIDTHS = (1, 4, 16, 64), (1, 4)  # the classes' calibration points
_ATTN_MAX_WIDTH = 16  # wider queries (prefills of longer prompts, training) always run SDPA


def attention_class(rows: int, width: int) -> tuple[int, int]:
    """(rows, query width) -> the calibration point standing for them: rows to the nearest of
    1 / 4 / 16 / 64 on a log scale, width 1 or 2..16 (as 4)."""
    r = min(_ATTN_ROWS, key=lambda p: abs(math.log(max(rows, 1) / p)))
    return r, 1 if width == 1 else 4


def set_cpu_attention(table: dict) -> None:
    """Use `table` from now on, in every Attention of this process: (heads, kv heads, head dim,
    dtype) -> the (rows class, width class) pairs (attention_class) to run grouped_attention."""
    clean = {}
    for key, classes in table.items():
        if not (isinstance(key, tuple) and len(key) == 4 and isinstance(key[3], torch.dtype)):
            raise ValueError(f"table: keys must be (heads, kv heads, head dim, dtype), got {key!r}")
        bad = [c for c in classes if c not in {(r, w) for r in _ATTN_ROWS for w in _ATTN_WIDTHS}]
        if bad:
            raise ValueError(f"table: classes must be (rows, width) with rows in {_ATTN_ROWS} and "
                             f"width in {_ATTN_WIDTHS}, got {bad}")
        if classes:
            clean[key] = frozenset(classes)
    _CPU_GROUPED.clear()
    _CPU_GROUPED.update(clean)


def cpu_attention() -> dict:
    """The attention kernel table in force (a copy; see set_cpu_attention)."""
    return {k: set(v) for k, v in _CPU_GROUPED.items()}


@torch.inference_mode()
def calibrate_cpu_attention(n_heads: int, n_kv: int, head_dim: int, dtype: torch.dtype,
                            kv_len: int = 128, repeats: int = 5, min_gain: float = 0.10) -> set:
    """Time SDPA and grouped_attention on a CPU at each (rows, width) calibration point, with
    a causal boolean mask and K/V laid out as a KV cache holds them; returns the points where
    grouped_attention was faster by at least min_gain (the set for set_cpu_attention).

    CPU SDPA with a mask is fast in fp32 but can be several times slower in bfloat16, worst for
    one query per row, which slows plain decode steps and flatters speculative ones (several
    queries per row) against them; in fp32 SDPA usually wins at every point. The kernels
    interleave within each repeat, so drift hits both alike."""
    times: dict[tuple[int, int, str], float] = {}
    inputs = {}
    for rows in _ATTN_ROWS:
        for width in _ATTN_WIDTHS:
            q = torch.randn(rows, n_heads, width, head_dim, dtype=dtype)
            k = torch.randn(rows, kv_len, n_kv, head_dim, dtype=dtype).transpose(1, 2)
            v = torch.randn(rows, kv_len, n_kv, head_dim, dtype=dtype).transpose(1, 2)
            pos = torch.randint(width, kv_len, (rows, 1)) - width + 1 + torch.arange(width)
            inputs[rows, width] = (q, k, v, causal_mask(pos, kv_len))
    gqa = n_kv != n_heads
    kernels = {"sdpa": lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=gqa),
               "grouped": grouped_attention}
    for rep in range(repeats + 1):
        for (rows, width), args in inputs.items():
            for name, fn in kernels.items():
                t0 = time.perf_counter()
                fn(*args)
                if rep:  # the first pass warms up; other load only ever adds time
                    key = (rows, width, name)
                    times[key] = min(times.get(key, math.inf), time.perf_counter() - t0)
    return {(r, w) for (r, w) in inputs if times[r, w, "grouped"] < (1.0 - min_gain) * times[r, w, "sdpa"]}


def attention(q, k, v, mask, expand_masked_gqa_on_cuda: bool = True) -> torch.Tensor:
    """q [B, heads, T, D], k/v [B, kv_heads, S, D], mask [B, 1, T, S] (boolean or additive, or None) ->
    the heads' outputs side by side, [B, T, heads * D] (o_proj's input): grouped_attention
    where the CPU calibration chose it for this shape, else SDPA (see Attention)."""
    B, n_heads, T, head_dim = q.shape
    n_kv = k.shape[1]
    if _CPU_GROUPED and mask is not None and T <= _ATTN_MAX_WIDTH and not q.is_cuda:
        classes = _CPU_GROUPED.get((n_heads, n_kv, head_dim, q.dtype))
        if classes and attention_class(B, T) in classes:
            out = grouped_attention(q, k.to(q.dtype), v.to(q.dtype), mask)
            return out.transpose(1, 2).reshape(B, T, -1)
    gqa = n_kv != n_heads
    if gqa and mask is not None and q.is_cuda and expand_masked_gqa_on_cuda:
        if T <= _ATTN_MAX_WIDTH:
            return _grouped_query_sdpa(q, k.to(q.dtype), v.to(q.dtype), mask)
        k, v, gqa = expand_kv(k, n_heads), expand_kv(v, n_heads), False
    out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(B, T, -1)


def _grouped_query_sdpa(q, k, v, mask) -> torch.Tensor:
    """Masked grouped-query SDPA for a few queries per row (decode and verify steps), as one
    fused kernel that reads each KV head once: the g query heads of a KV head's group, times
    the T queries, become g * T queries of that head, the mask repeated over the group.
    Expanding the KV heads instead copies the whole attended cache every layer (a decode step
    of a 0.5B shape at 256 rows: ~0.2 GB per layer)."""
    B, n_heads, T, D = q.shape
    n_kv, S = k.shape[1], k.shape[2]
    g = n_heads // n_kv
    qg = q.reshape(B, n_kv, g * T, D)  # head h = kv * g + j: query row j * T + t
    mg = mask if T == 1 else mask[:, :, None].expand(B, 1, g, T, S).reshape(B, 1, g * T, S)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mg)  # [B, n_kv, g * T, D]
    return out.reshape(B, n_heads, T, D).transpose(1, 2).reshape(B, T, -1)


class Attention(nn.Module):
    def __init__(self, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 bias: bool = False, qk_norm: bool = False, eps: float = 1e-6, o_bias: bool = False):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = Linear(hidden, n_heads * head_dim, bias=bias)
        self.k_proj = Linear(hidden, n_kv_heads * head_dim, bias=bias)
        self.v_proj = Linear(hidden, n_kv_heads * head_dim, bias=bias)
        self.o_proj = Linear(n_heads * head_dim, hidden, bias=o_bias)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None

    def project(self, x, cos, sin):
        """x [B, T, H] -> q [B, heads, T, D], k and v [B, kv_heads, T, D], rotary applied."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin), v.transpose(1, 2)

    # On CUDA, SDPA's fused kernels take a mask or enable_gqa but not both: masked GQA ran the
    # math path (several kernels and a repeat_interleave of its own: 0.94 s of 3.7 s of GPU time
    # in a SmolLM2-shaped profile on an H200). Expanding the KV heads here lets the
    # memory-efficient kernel run. (A class flag, so a benchmark can time both ways.)
    expand_masked_gqa_on_cuda = True

    def attend(self, q, k, v, mask):
        """q [B, heads, T, D], k/v [B, kv_heads, S, D], boolean mask -> o_proj output [B, T, H]."""
        return self.o_proj(attention(q, k, v, mask, self.expand_masked_gqa_on_cuda))

    def forward(self, x, cos, sin, mask, layer: int = 0, view: CacheView | None = None):
        B = x.shape[0]
        q, k, v = self.project(x, cos, sin)  # [B, H, T, D], [B, Hkv, T, D] x2
        if view is not None:
            ck, cv = view.cache.k[layer], view.cache.v[layer]
            rows = view.slots if view.slots is not None else torch.arange(B, device=x.device)
            idx = (rows[:, None], view.positions)
            ck[idx] = k.transpose(1, 2).to(ck.dtype)  # [B, T, Hkv, D]
            cv[idx] = v.transpose(1, 2).to(cv.dtype)
            if view.slots is None:
                k, v = ck[:B, :view.kv_len], cv[:B, :view.kv_len]
            else:
                k, v = ck[view.slots, :view.kv_len], cv[view.slots, :view.kv_len]
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, S, D]
        return self.attend(q, k, v, mask)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(_fz.fused(_fz.silu_mul)(g, u) if _fz.active(g) else _fz.silu_mul(g, u))


class DecoderBlock(nn.Module):
    def __init__(self, hidden: int, intermediate: int, n_heads: int, n_kv_heads: int,
                 head_dim: int, eps: float = 1e-6, bias: bool = False, qk_norm: bool = False,
                 o_bias: bool = False):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = Attention(hidden, n_heads, n_kv_heads, head_dim, bias, qk_norm, eps, o_bias)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = SwiGLU(hidden, intermediate)

    def forward(self, x, cos, sin, mask, layer: int = 0, view: CacheView | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, layer, view)
        return x + self.mlp(self.post_attention_layernorm(x))
