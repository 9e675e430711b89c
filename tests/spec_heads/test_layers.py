"""Shared layers: the masked-GQA path that CUDA takes (KV heads expanded before SDPA) computes
what SDPA's own enable_gqa computes."""
import torch
import torch.nn.functional as F

from spec_heads.layers import causal_mask, expand_kv


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
