"""Every rope variant transformers runs for Llama / Qwen3 either matches it or is refused at load.

For each variant and option value: our inverse frequencies and attention scaling equal
transformers' bit for bit; the cos/sin tables equal its own at every position up to 2^17 (or up
to the variant's limit); the logits of a whole sequence match to 1e-4 in fp32, for static
variants at three times max_position_embeddings. dynamic and longrope rescale with the sequence
length, so the engine refuses to run past their limit, and past it transformers does differ.
"""
import itertools

import pytest
import torch

from rollout.checkpoint import load_checkpoint
from rollout.types import LengthError

transformers = pytest.importorskip("transformers")

VOCAB, MAX_POS, HEAD_DIM = 96, 48, 16


def _yarn():
    out = []
    for factor, orig, (fast, slow), (m, m_all), attention, truncate in itertools.product(
            [2.0, 4.0, 8.0], [16, 32], [(32, 1), (16, 2)], [(None, None), (0.707, 0.707), (1.0, 0.5)],
            [None, 1.3], [True, False]):
        if attention is not None and (m, m_all) != (None, None):
            continue  # attention_factor wins over mscale: one such case is enough
        sc = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig,
              "beta_fast": fast, "beta_slow": slow, "truncate": truncate}
        sc.update({k: v for k, v in (("mscale", m), ("mscale_all_dim", m_all), ("attention_factor", attention))
                   if v is not None})
        out.append(sc)
    return out


STATIC = (
    [None]
    + [{"rope_type": "linear", "factor": f} for f in (1.5, 2.0, 4.0)]
    + [{"type": "linear", "factor": 2.0}]  # the old key name
    + [{"rope_type": "llama3", "factor": f, "low_freq_factor": lo, "high_freq_factor": hi,
        "original_max_position_embeddings": orig}
       for f, (lo, hi), orig in itertools.product((2.0, 8.0), ((1.0, 4.0), (2.0, 8.0)), (16, 32))]
    + _yarn()
    + [{"rope_type": "proportional", "factor": f, "partial_rotary_factor": p}
       for f, p in itertools.product((1.0, 2.0), (0.25, 0.5, 1.0))]
)
LIMITED = (
    [({"rope_type": "dynamic", "factor": f}, MAX_POS) for f in (2.0, 4.0)]
    + [({"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(HEAD_DIM // 2)],
         "long_factor": [1.0 + 0.5 * i for i in range(HEAD_DIM // 2)], "original_max_position_embeddings": 32,
         **extra}, 32)
       for extra in ({}, {"factor": 2.0}, {"attention_factor": 1.1})]
)


def _id(sc):
    return "default" if sc is None else "-".join(f"{k}={v}" for k, v in sc.items() if not isinstance(v, list))


def hf_model(scaling, kind="llama", layers=1, seed=0, **top):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                  rms_norm_eps=1e-6, attn_implementation="eager", tie_word_embeddings=False, **top)
    if scaling is not None:
        common["rope_scaling"] = dict(scaling)
    config = (transformers.LlamaConfig(head_dim=HEAD_DIM, **common) if kind == "llama"
              else transformers.Qwen3Config(head_dim=HEAD_DIM, **common))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1 + 0.1 * torch.randn_like(param) if name.endswith("norm.weight")
                        else 0.3 * torch.randn_like(param))
    return model


def load_ours(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    return load_checkpoint(str(tmp_path))


def assert_tables_match(hf, ours, positions: int):
    rotary = hf.model.rotary_emb
    assert torch.equal(ours.rotary.inv_freq, rotary.inv_freq.float())
    assert ours.rotary.mscale == pytest.approx(rotary.attention_scaling, abs=0, rel=0)
    pos = torch.arange(positions)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos)  # [1, N, D]
    our_cos, our_sin = ours.rotary(pos)  # [1, 1, N, D], sine signed (-sin | +sin)
    half = our_cos.shape[-1] // 2
    assert torch.equal(our_cos[0, 0], cos[0])
    assert torch.equal(our_sin[0, 0, :, half:], sin[0, :, half:])
    assert torch.equal(-our_sin[0, 0, :, :half], sin[0, :, :half])


def assert_logits_match(hf, ours, length: int, seed=1):
    ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours.logits(ours(ids))
    assert expected.abs().max() > 1.0
    return (got - expected).abs().max().item()


@pytest.mark.parametrize("scaling", STATIC, ids=_id)
def test_static_ropes_match_transformers_at_every_position(tmp_path, scaling):
    hf = hf_model(scaling)
    ours = load_ours(hf, tmp_path)
    assert ours.max_positions is None  # the engine may run these at any length
    assert_tables_match(hf, ours, 1 << 17)
    assert assert_logits_match(hf, ours, 3 * MAX_POS) <= 1e-4


@pytest.mark.parametrize("scaling", [STATIC[1], STATIC[10], _yarn()[5]], ids=_id)
def test_qwen3_ropes_match_transformers(tmp_path, scaling):
    hf = hf_model(scaling, kind="qwen3")
    ours = load_ours(hf, tmp_path)
    assert_tables_match(hf, ours, 1 << 12)
    assert assert_logits_match(hf, ours, 3 * MAX_POS) <= 1e-4


def test_a_top_level_original_max_position_embeddings_wins_as_in_transformers(tmp_path):
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    hf = hf_model(scaling, original_max_position_embeddings=16)
    assert hf.config.rope_parameters["original_max_position_embeddings"] == 16
    ours = load_ours(hf, tmp_path)
    assert_tables_match(hf, ours, 1 << 12)


@pytest.mark.parametrize("scaling, limit", LIMITED, ids=[_id(s) for s, _ in LIMITED])
def test_length_dependent_ropes_match_inside_their_limit_and_the_engine_stops_there(tmp_path, scaling, limit):
    from rollout.engine import Engine

    hf = hf_model(scaling)
    ours = load_ours(hf, tmp_path)
    assert ours.max_positions == limit
    assert_tables_match(hf, ours, limit)
    assert assert_logits_match(hf, ours, limit) <= 1e-4
    with pytest.raises(LengthError, match=f"rollout.max_seq_len: {limit + 1} runs past position {limit}"):
        Engine(ours, max_len=limit + 1)
    # past the limit transformers rescales the whole sequence's frequencies: what the refusal avoids
    assert assert_logits_match(hf, ours, limit + 16) > 1e-3


@pytest.mark.parametrize("scaling, top, reason", [
    ({"rope_type": "linear", "factor": 2.0}, {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    (None, {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32}, {}, "needs 'low_freq_factor'"),
])
def test_variants_that_cannot_match_are_refused_at_load_with_the_reason(tmp_path, scaling, top, reason):
    import json

    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": 64,
              "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": HEAD_DIM, "max_position_embeddings": MAX_POS, "rope_scaling": scaling, **top}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=reason) as info:
        load_checkpoint(str(tmp_path))
    assert str(tmp_path / "config.json") in str(info.value)


def test_an_unknown_rope_type_is_refused_with_the_supported_ones(tmp_path):
    from rollout.model import ModelConfig

    with pytest.raises(ValueError, match="rope_type='mrope' is not supported.*linear, dynamic, yarn, longrope"):
        ModelConfig(rope_scaling={"rope_type": "mrope", "factor": 2.0})
