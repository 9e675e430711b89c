"""Shared layers: the masked-GQA path that CUDA takes (KV heads expanded before SDPA) computes
what SDPA's own enable_gqa computes; so does the CPU's grouped attention kernel, which runs
just where its calibration table says."""
import pytest
import torch
import torch.nn.functional as F

from spec_heads import layers
from spec_heads.layers import (Attention, attention_class, calibrate_cpu_attention, causal_mask, expand_kv,
                               grouped_attention, attention_table)


def test_expanded_kv_heads_equal_sdpa_gqa_with_a_mask():
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, S, D = 3, 6, 2, 4, 10, 8
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    mask = causal_mask(torch.tensor([[3, 5, 6, 9]] * B), S)  # [B, 1, T, S]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = F.scaled_dot_product_attention(q, expand_kv(k, H), expand_kv(v, H), attn_mask=mask)
    assert torch.allclose(got, ref, atol=1e-12)
    # and head h reads KV head h // 3: swapping the KV heads changes the result
    swapped = F.scaled_dot_product_attention(q, expand_kv(k.flip(1), H), expand_kv(v.flip(1), H), attn_mask=mask)
    assert not torch.allclose(swapped, ref, atol=1e-3)


def _qkv_mask(B, H, Hkv, T, S, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    # K/V as a KV cache lays them out: [B, S, kv heads, D] viewed as [B, kv heads, S, D]
    k = torch.randn(B, S, Hkv, D, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(B, S, Hkv, D, generator=g).to(dtype).transpose(1, 2)
    pos = torch.randint(T - 1, S, (B, 1), generator=g) - (T - 1) + torch.arange(T)  # [B, T]
    return q, k, v, causal_mask(pos, S)


@pytest.mark.parametrize("H,Hkv,T", [(6, 2, 1), (6, 2, 5), (4, 4, 3), (9, 3, 16)])
def test_grouped_attention_equals_sdpa_with_a_causal_mask(H, Hkv, T):
    q, k, v, mask = _qkv_mask(5, H, Hkv, T, 24, 8)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hkv != H)
    assert torch.allclose(grouped_attention(q, k, v, mask), ref, atol=1e-12)
    # each query head reads its own group's KV head: pairing them the other way round differs
    assert not torch.allclose(grouped_attention(q, k.flip(1), v.flip(1), mask), ref, atol=1e-3) or Hkv == 1
    # and the mask counts: attending one more position differs
    wider = mask | torch.roll(mask, 1, -1)
    assert not torch.allclose(grouped_attention(q, k, v, wider), ref, atol=1e-3)
    # an additive mask (0 / -inf, what packed head drafting passes) is the same mask
    additive = mask.to(q.dtype).log()
    assert torch.allclose(grouped_attention(q, k, v, additive), ref, atol=1e-12)
    assert torch.allclose(F.scaled_dot_product_attention(q, k, v, attn_mask=additive, enable_gqa=Hkv != H), ref,
                          atol=1e-12)


def test_attention_runs_the_grouped_kernel_just_where_the_table_says(monkeypatch):
    torch.manual_seed(0)
    attn = Attention(32, 4, 2, 8).double().eval()
    calls = []
    real = layers.grouped_attention
    monkeypatch.setattr(layers, "grouped_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    kernels = layers.CpuKernels(grouped=attention_table({(4, 2, 8, torch.float64): {(1, 1), (64, 4)}}))

    def both(B, T):
        """attend() under the table, and by SDPA alone (outside the block), on the same inputs."""
        q, k, v, mask = _qkv_mask(B, 4, 2, T, 40, 8)
        with layers.use_cpu_kernels(kernels):
            got = attn.attend(q, k, v, mask)
        ref = attn.attend(q, k, v, mask)
        return got, ref

    for B, T, grouped in [(1, 1, True), (2, 1, True), (1, 3, False), (64, 1, False), (100, 9, True),
                          (64, 17, False), (16, 4, False)]:
        calls.clear()
        got, ref = both(B, T)
        assert bool(calls) == grouped, (B, T)
        assert torch.allclose(got, ref, atol=1e-12)
    # another shape or dtype has its own entry: none here, so SDPA
    calls.clear()
    with layers.use_cpu_kernels(kernels):
        Attention(32, 4, 4, 8).double().attend(*_qkv_mask(1, 4, 4, 1, 40, 8))
    assert not calls
    assert attention_class(1, 1) == (1, 1) and attention_class(3, 2) == (4, 4)
    assert attention_class(20, 16) == (16, 4) and attention_class(500, 1) == (64, 1)
    with pytest.raises(ValueError, match="rows in"):
        attention_table({(4, 2, 8, torch.float64): {(8, 1)}})
    with pytest.raises(ValueError, match="dtype"):
        attention_table({(4, 2, 8): {(1, 1)}})


def test_attention_calibration_keeps_the_kernel_that_wins_by_min_gain():
    every = {(r, w) for r in (1, 4, 16, 64) for w in (1, 4)}
    # a gain no kernel can have keeps SDPA everywhere; a "gain" of -1000% takes grouped everywhere
    assert calibrate_cpu_attention(4, 2, 8, torch.float32, kv_len=16, repeats=1, min_gain=1.0) == set()
    assert calibrate_cpu_attention(4, 2, 8, torch.float32, kv_len=16, repeats=1, min_gain=-10.0) == every


def test_kv_cache_moves_rows_in_every_layer_up_to_the_bound_and_nothing_else():
    """KVCache.move_rows copies slots src -> dst in every layer's K and V at positions below
    `upto` (over the buffer all layers share), leaving the rest of those rows and every other row
    as they were; k[i] / v[i] stay views of the buffer, so forwards see what was moved."""
    from spec_heads.layers import KVCache
    c = KVCache(3, 6, 10, 2, 4)
    g = torch.Generator().manual_seed(0)
    c.buf.copy_(torch.randn(c.buf.shape, generator=g))
    before = c.buf.clone()
    c.move_rows([(5, 0), (3, 2)], upto=7)
    for layer in range(3):
        for kv, t in enumerate((c.k[layer], c.v[layer])):
            b = before[2 * layer + kv]
            assert t.data_ptr() == c.buf[2 * layer + kv].data_ptr()
            assert torch.equal(t[0, :7], b[5, :7]) and torch.equal(t[2, :7], b[3, :7])
            assert torch.equal(t[0, 7:], b[0, 7:]) and torch.equal(t[2, 7:], b[2, 7:])
            for row in (1, 3, 4, 5):
                assert torch.equal(t[row], b[row])
    c.move_rows([(4, 1)])  # no bound: the whole row
    assert torch.equal(c.k[2][1], before[4][4]) and torch.equal(c.v[0][1], before[1][4])
    many = KVCache(1, 80, 5, 1, 2)  # more than 32 rows move as one indexed copy
    many.buf.copy_(torch.randn(many.buf.shape, generator=g))
    ref = many.buf.clone()
    many.move_rows([(40 + i, i) for i in range(40)], upto=3)
    assert torch.equal(many.buf[:, :40, :3], ref[:, 40:, :3]) and torch.equal(many.buf[:, :40, 3:], ref[:, :40, 3:])
    assert torch.equal(many.buf[:, 40:], ref[:, 40:])
    assert c.nbytes() == 2 * 3 * 6 * 10 * 2 * 4 * 4
