"""Rollout workers: versioned weight swaps (policy and heads together), outputs from the newest
weights, and the pull path (`serve`: items sharing one engine run give the same sequences as
one generate call). The Ray side is in test_coordinator.py."""
import pytest
import torch

from rollout.engine import Engine
from rollout.model import ModelConfig, Transformer
from rollout.types import RolloutConfig, SamplingParams, SpecParams
from rollout.worker import RolloutClient, RolloutWorker, cpu_state
from spec_heads.heads import DraftHeads, HeadConfig

MC = ModelConfig(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
HC = HeadConfig("parallel", 3)
PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10], [11, 12], [13, 14, 15]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
SAMPLED = SamplingParams(temperature=1.0, max_new_tokens=8)
FIXED = SpecParams(mode="fixed", k=2)


def make_model(seed: int, std: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # the parameters not drawn below (biases) take a seeded default init
        torch.manual_seed(seed)
        model = Transformer(MC)
        heads = DraftHeads(HC, MC)
    with torch.no_grad():
        for p in list(model.parameters()) + list(heads.parameters()):
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval(), heads.eval()


def local_greedy(model, heads, prompts):
    eng = Engine(model, heads, max_batch=8)
    return [s.tokens for s in eng.generate(prompts, GREEDY, FIXED, seed=0).sequences]


def test_publish_swaps_both_and_outputs_follow_new_weights():
    old, old_heads = make_model(0)
    new, new_heads = make_model(1)
    worker = RolloutWorker(MC, HC, RolloutConfig(max_batch=4), policy_state=cpu_state(old),
                           heads_state=cpu_state(old_heads), version=0)
    before = worker.generate(PROMPTS, GREEDY, FIXED, seed=0)
    assert [s.tokens for s in before.sequences] == local_greedy(old, old_heads, PROMPTS)
    assert {s.policy_version for s in before.sequences} == {0}

    worker.set_weights(1, cpu_state(new), cpu_state(new_heads))
    assert worker.versions() == {"policy": 1, "heads": 1}
    after = worker.generate(PROMPTS, GREEDY, FIXED, seed=0)
    expected = local_greedy(new, new_heads, PROMPTS)
    assert [s.tokens for s in after.sequences] == expected
    assert expected != [s.tokens for s in before.sequences]  # the swap is visible
    assert {s.policy_version for s in after.sequences} == {1}
    # the heads were swapped too: the worker's heads equal the published ones
    for k, v in new_heads.state_dict().items():
        assert torch.equal(worker.engine.heads.state_dict()[k], v), k


def test_mismatched_or_stale_update_raises_and_changes_nothing():
    model, heads = make_model(0)
    other, other_heads = make_model(1)
    worker = RolloutWorker(MC, HC, RolloutConfig(max_batch=4), policy_state=cpu_state(model),
                           heads_state=cpu_state(heads), version=3)
    with pytest.raises(ValueError, match="heads_state: a policy-only update"):
        worker.set_weights(4, cpu_state(other), None)
    with pytest.raises(ValueError, match="policy_state: a heads-only update"):
        worker.set_weights(4, None, cpu_state(other_heads))
    with pytest.raises(ValueError, match="version: 3 is not newer"):
        worker.set_weights(3, cpu_state(other), cpu_state(other_heads))
    assert worker.versions() == {"policy": 3, "heads": 3}
    for k, v in model.state_dict().items():
        assert torch.equal(worker.engine.model.state_dict()[k], v)


def test_client_keeps_prompt_order_and_ids():
    model, heads = make_model(0)
    client = RolloutClient(MC, cpu_state(model), HC, cpu_state(heads), RolloutConfig(max_batch=4))
    ids = [10 + i for i in range(len(PROMPTS))]
    batch = client.generate(PROMPTS, ids, SAMPLED, FIXED, seed=5)
    assert [s.prompt for s in batch.sequences] == PROMPTS
    assert [s.prompt_id for s in batch.sequences] == ids
    assert batch.stats.sequences == len(PROMPTS)
    assert batch.stats.tokens == sum(len(s.tokens) for s in batch.sequences)


def test_concurrent_serve_calls_share_a_run_and_match_one_generate_call():
    """Items served from several threads at once join one engine run as rows free up (max_batch 4
    for 12 rows) and give each row the tokens a single generate call gives it."""
    from concurrent.futures import ThreadPoolExecutor

    from rollout.coordinator import make_items

    model, heads = make_model(0)
    worker = RolloutWorker(MC, HC, RolloutConfig(max_batch=4), policy_state=cpu_state(model),
                           heads_state=cpu_state(heads))
    rows = [p for p in PROMPTS for _ in range(2)]
    ids = list(range(len(rows)))
    whole = worker.generate(rows, SAMPLED, FIXED, seed=3, ids=ids)
    items = make_items(1, rows, ids, SAMPLED, FIXED, seed=3, version=0)
    assert [it.key for it in items] == list(range(0, 12, 2)) and all(len(it.ids) == 2 for it in items)
    with ThreadPoolExecutor(len(items)) as pool:
        results = list(pool.map(worker.serve, items))
    assert [r.key for r in results] == [it.key for it in items]
    served = [s for r in results for s in r.sequences]
    assert [s.prompt_id for s in served] == ids
    assert [s.tokens for s in served] == [s.tokens for s in whole.sequences]
    got = worker.step_stats(1)
    assert got["stats"].sequences == len(rows)
    assert got["stats"].tokens == sum(len(s.tokens) for s in served)
    assert worker.step_stats(1) is None  # taken once
