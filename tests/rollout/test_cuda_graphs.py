"""CUDA graphs of the decode steps: a replayed plain or speculative step equals the same step
launched eagerly, token for token (greedy and seeded sampling, fp32 and bf16; sequential heads
with and without a draft vocabulary, parallel heads; drafting steps between plain ones); graphs
live across generate calls (plain and speculative runs keep each other's) and follow weights
loaded in place; the grouped-query attention of decode steps equals SDPA over expanded KV
heads. The gpu-marked tests run on a lent GPU (`pytest -m gpu`)."""
import pytest
import torch
import torch.nn.functional as F

from rollout.cuda_graphs import DecodeGraphs, GraphConfig
from rollout.engine import Engine
from rollout.model import ModelConfig, Transformer
from rollout.types import SamplingParams, SpecParams
from spec_heads.depth import DepthPolicy
from spec_heads.heads import DraftHeads, HeadConfig
from spec_heads.layers import _grouped_query_sdpa, causal_mask, expand_kv

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(dtype, seed=0, device="cuda"):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)  # tied, a random policy mostly repeats its input
    return Transformer(cfg).to(device, dtype).eval()


def _prompts(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (int(k),), generator=g).tolist() for k in torch.randint(2, 12, (n,), generator=g)]


def test_rows_run_as_the_next_bucket_within_the_batch():
    g = DecodeGraphs(GraphConfig(row_buckets=(1, 2, 4, 8, 16)))
    assert [g.rows(n, 64) for n in (1, 2, 3, 5, 8, 9, 16, 17, 40)] == [1, 2, 4, 8, 8, 16, 16, 32, 48]
    assert g.rows(5, 6) == 6  # never past the engine's rows
    with pytest.raises(ValueError, match="row_buckets"):
        GraphConfig(row_buckets=(4, 2))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, cuda])])
@pytest.mark.parametrize("T", [1, 3])
def test_grouped_query_attention_equals_sdpa_over_expanded_kv_heads(device, T):
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, S, D = 3, 6, 2, 40, 16
    q = torch.randn(B, H, T, D, generator=g).to(device)
    k, v = (torch.randn(B, S, Hkv, D, generator=g).to(device).transpose(1, 2) for _ in range(2))  # cache layout
    pos = torch.tensor([[5], [17], [30]]) + torch.arange(T)
    mask = causal_mask(pos.to(device), S)
    ref = F.scaled_dot_product_attention(q, expand_kv(k, H), expand_kv(v, H), attn_mask=mask)
    out = _grouped_query_sdpa(q, k, v, mask)
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(B, T, H * D), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sp", [SamplingParams(temperature=0, max_new_tokens=40),
                                SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=40, stop_token_ids=[5, 6])])
def test_graph_decode_equals_eager_decode_token_for_token(dtype, sp):
    model = _model(dtype)
    prompts = _prompts(11)
    eager = Engine(model, max_batch=6, graphs=GraphConfig(enabled=False)).generate(prompts, sp, seed=3)
    eng = Engine(model, max_batch=6)
    graphed = eng.generate(prompts, sp, seed=3)
    assert eng.graphs.captures > 0 and eng.graphs.replays > eng.graphs.captures  # it did replay
    for a, b in zip(eager.sequences, graphed.sequences):
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
        assert a.logprobs == b.logprobs and a.entropies == b.entropies
    assert graphed.stats.tokens == eager.stats.tokens == sum(len(s.tokens) for s in graphed.sequences)


@pytest.mark.gpu
@cuda
def test_graphs_live_across_calls_and_follow_weights_loaded_in_place():
    model = _model(torch.bfloat16)
    sp = SamplingParams(temperature=1.0, max_new_tokens=24)
    prompts = _prompts(4)
    eng = Engine(model, max_batch=4)
    first = eng.generate(prompts, sp, seed=1)
    captured = eng.graphs.captures
    again = eng.generate(prompts, sp, seed=1)
    assert eng.graphs.captures == captured  # the second call only replays
    assert [s.tokens for s in again.sequences] == [s.tokens for s in first.sequences]
    # new weights, copied into the same storage (as a worker's set_weights does)
    model.load_state_dict(_model(torch.bfloat16, seed=5).state_dict())
    moved = eng.generate(prompts, sp, seed=1)
    ref = Engine(model, max_batch=4, graphs=GraphConfig(enabled=False)).generate(prompts, sp, seed=1)
    assert [s.tokens for s in moved.sequences] == [s.tokens for s in ref.sequences]
    assert [s.tokens for s in moved.sequences] != [s.tokens for s in first.sequences]


def _heads(model, kind, draft_vocab=0, noise=0.05, depths=3):
    """Heads near the trunk's next-token head (their initialisation), so drafts are often accepted."""
    torch.manual_seed(1)
    heads = DraftHeads(HeadConfig(kind=kind, num_depths=depths, draft_vocab=draft_vocab), model.config)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(noise * torch.randn_like(p))
    if draft_vocab:
        heads.set_draft_vocab([list(range(3, 97))])
    p = next(model.parameters())
    return heads.to(p.device, p.dtype)


def _same(a, b):
    for x, y in zip(a.sequences, b.sequences):
        assert x.tokens == y.tokens and x.finish_reason == y.finish_reason
        assert x.logprobs == y.logprobs and x.entropies == y.entropies
        assert x.draft_lengths == y.draft_lengths and x.accepted == y.accepted


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,draft_vocab", [("sequential", 0), ("sequential", 48), ("parallel", 0)])
@pytest.mark.parametrize("sp", [SamplingParams(temperature=0, max_new_tokens=40),
                                SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=40, stop_token_ids=[5, 6])])
def test_graph_speculative_decode_equals_eager_token_for_token(dtype, kind, draft_vocab, sp, monkeypatch):
    # every 4th step plain: drafting steps then start from windows of several widths
    monkeypatch.setattr(DepthPolicy, "draft_budget", lambda self, rows: 0 if self.steps % 4 == 0 else 3)
    model = _model(dtype)
    heads = _heads(model, kind, draft_vocab)
    prompts, spec = _prompts(11), SpecParams(mode="fixed", k=3)
    eager = Engine(model, heads, max_batch=6, graphs=GraphConfig(enabled=False)).generate(prompts, sp, spec, seed=3)
    eng = Engine(model, heads, max_batch=6)
    graphed = eng.generate(prompts, sp, spec, seed=3)
    assert eng.graphs.captures > 0 and eng.graphs.replays > eng.graphs.captures  # it did replay
    _same(eager, graphed)
    assert graphed.stats.tokens == eager.stats.tokens == sum(len(s.tokens) for s in graphed.sequences)
    assert sum(sum(s.accepted) for s in graphed.sequences) > 0  # drafts were accepted, and some not
    assert any(a < d for s in graphed.sequences for a, d in zip(s.accepted, s.draft_lengths))


@pytest.mark.gpu
@cuda
def test_speculative_graphs_live_across_calls_and_plain_runs():
    model = _model(torch.bfloat16)
    heads = _heads(model, "sequential", draft_vocab=48)
    sp, spec = SamplingParams(temperature=1.0, max_new_tokens=24), SpecParams(mode="fixed", k=3)
    prompts = _prompts(4)
    eng = Engine(model, heads, max_batch=4)
    first = eng.generate(prompts, sp, spec, seed=1)
    eng.generate(prompts, sp, seed=1)  # a plain run between: its graphs join the others
    captured = eng.graphs.captures
    again = eng.generate(prompts, sp, spec, seed=1)
    assert eng.graphs.captures == captured  # the second speculative call only replays
    _same(first, again)
    # new policy weights, copied into the same storage: the heads' packed weights and their
    # draft vocabulary's LM head rows follow, and the graphs with them
    model.load_state_dict(_model(torch.bfloat16, seed=5).state_dict())
    moved = eng.generate(prompts, sp, spec, seed=1)
    ref = Engine(model, heads, max_batch=4, graphs=GraphConfig(enabled=False)).generate(prompts, sp, spec, seed=1)
    _same(moved, ref)
    assert [s.tokens for s in moved.sequences] != [s.tokens for s in first.sequences]
