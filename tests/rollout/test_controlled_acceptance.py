"""The premise of `scripts/bench_gpu.py --spec` (scripts/bench_gpu_spec.py): a policy whose
embeddings dominate repeats its last token, and heads set to agree with it with probability a
have each draft accepted by exact rejection sampling with probability a, depth by depth."""
import math
import sys
from pathlib import Path

import torch

from rollout.engine import Engine
from rollout.model import ModelConfig, Transformer
from rollout.types import SamplingParams, SpecParams

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_gpu_spec import controlled, expected_tokens  # noqa: E402


def test_drafts_are_accepted_with_the_set_probability_at_every_depth():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    heads = controlled(model, 4, 128, 0.7)
    eng = Engine(model, heads, max_batch=16)
    prompts = torch.randint(3, 128, (16, 6), generator=torch.Generator().manual_seed(1)).tolist()
    sp = SamplingParams(temperature=1.0, max_new_tokens=64, stop_token_ids=[])
    plain = eng.generate(prompts, sp, seed=0)
    assert all(set(s.tokens) == {p[-1]} for s, p in zip(plain.sequences, prompts))  # the policy repeats
    for agree in (0.7, 0.4):
        heads.set_agree(agree)
        st = eng.generate(prompts, sp, SpecParams(mode="fixed", k=4), seed=1).stats
        for rate, n in zip(st.accept_rate_per_pos, st.drafted_per_pos):
            assert n >= 20 and abs(rate - agree) < 4 * math.sqrt(agree * (1 - agree) / n), (agree, st.accept_rate_per_pos)
        assert st.tokens == 16 * 64
    assert abs(expected_tokens(0.8, 4) - 3.3616) < 1e-9
