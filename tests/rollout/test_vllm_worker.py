"""rollout.backend=vllm (rollout/vllm_worker.py) against specroll's own model on the same weights.

Needs vLLM (skipped without it): scripts/test_vllm.sh builds the venv and runs this file. Tiny
Llama built here (head_dim 64: vLLM's CPU attention needs it), fp32 throughout. Each engine takes
tens of seconds to build on a CPU, so the tests share a few and run in file order.
"""

import pytest
import torch

vllm = pytest.importorskip("vllm")

from learner.trainer import cpu_state  # noqa: E402
from rollout.model import ModelConfig, Transformer  # noqa: E402
from rollout.types import RolloutConfig, SamplingParams, SpecParams, VllmParams  # noqa: E402
from rollout.vllm_worker import VllmRolloutWorker  # noqa: E402
from rollout.worker import RolloutClient  # noqa: E402
from spec_heads.exactness import FitResult  # noqa: E402
from spec_heads.heads import DraftHeads, HeadConfig  # noqa: E402
from spec_heads.sampling import sampling_logprobs  # noqa: E402

MC = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=False)
HC = HeadConfig("parallel", 3)
SPEC = SpecParams(mode="fixed", k=3, draft="greedy")
LOGPROB_TOL = 1e-4  # fp32; vLLM's CPU kernels and specroll's model sum in other orders
WARM = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=12)


def _policy(seed):
    torch.manual_seed(seed)
    model = Transformer(MC)
    with torch.no_grad():  # an untied, small LM head: logits neither flat nor one-hot, no repeat loops
        model.lm_head.weight.normal_(0, 0.15)
    return model.eval()


def _heads(seed):
    torch.manual_seed(seed + 100)
    heads = DraftHeads(HC, MC)
    with torch.no_grad():  # depth 1 stays the identity (drafts repeat the trunk's guess); deeper ones random
        for name, p in heads.named_parameters():
            if not name.startswith("blocks.0."):
                p.normal_(0, 0.5)
    return heads


def _prompts(n=4, length=300, seed=0):  # longer than two KV blocks (128 tokens on a CPU): cacheable
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(MC.vocab_size, (length,), generator=g).tolist() for _ in range(n)]


@torch.no_grad()
def _recompute(model, seqs, sp):
    """specroll's behaviour log-probs of each emitted token (the learner's teacher-forced path)."""
    out = []
    for s in seqs:
        ids = torch.tensor([s.prompt + s.tokens])
        logits = model.logits(model(ids))[0, len(s.prompt) - 1:-1]
        lp = sampling_logprobs(logits.float(), sp.temperature, sp.top_k, sp.top_p)
        out.append(lp.gather(-1, torch.tensor(s.tokens)[:, None])[:, 0])
    return out


def _max_logprob_error(model, seqs, sp):
    ref = _recompute(model, seqs, sp)
    return max(float((torch.tensor(s.logprobs) - r).abs().max()) for s, r in zip(seqs, ref))


@torch.no_grad()
def _greedy(model, prompts, n):
    out = []
    for p in prompts:
        ids = list(p)
        for _ in range(n):
            ids.append(int(model.logits(model(torch.tensor([ids])))[0, -1].argmax()))
        out.append(ids[len(p):])
    return out


@pytest.fixture(scope="module")
def plain():
    return VllmRolloutWorker(MC, None, RolloutConfig(max_batch=8), policy_state=cpu_state(_policy(0)))


@pytest.fixture(scope="module")
def spec():
    return VllmRolloutWorker(MC, HC, RolloutConfig(max_batch=8), policy_state=cpu_state(_policy(0)),
                             heads_state=cpu_state(_heads(0)))


def test_config_key_selects_the_vllm_worker():
    client = RolloutClient(MC, cpu_state(_policy(0)), None, None, RolloutConfig(backend="vllm"))
    assert isinstance(client.workers[0], VllmRolloutWorker)


def test_temperature_zero_speculative_equals_plain_and_specroll(plain, spec):
    prompts, sp = _prompts(), SamplingParams(temperature=0.0, max_new_tokens=16)
    a = spec.generate(prompts, sp, SPEC, seed=0)
    b = plain.generate(prompts, sp, None, seed=0)
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert [s.tokens for s in b.sequences] == _greedy(_policy(0), prompts, 16)
    drafted, accepted = a.stats.drafted_per_pos, a.stats.accepted_per_pos
    assert len(drafted) == 3 and drafted[0] > 0 and sum(accepted) < sum(drafted)  # drafts verified, some rejected


def test_logprobs_equal_specroll_on_the_same_weights(plain):
    batch = plain.generate(_prompts(seed=1), WARM, None, seed=3)
    assert all(len(s.logprobs) == len(s.tokens) > 0 for s in batch.sequences)
    assert _max_logprob_error(_policy(0), batch.sequences, WARM) < LOGPROB_TOL


def test_sync_serves_the_new_policy_on_cached_prompts(plain):
    prompts = _prompts(seed=2)
    plain.generate(prompts, WARM, None, seed=0)  # the prompts' KV is now cached under the old weights
    new = _policy(1)
    assert plain.set_weights(1, cpu_state(new), None) == 1
    batch = plain.generate(prompts, WARM, None, seed=0)
    assert {s.policy_version for s in batch.sequences} == {1}
    assert _max_logprob_error(new, batch.sequences, WARM) < LOGPROB_TOL


def test_a_missing_prefix_cache_reset_is_caught(plain, monkeypatch):
    """The check above fails when the sync skips reset_prefix_cache: cached prompts keep the old KV."""
    prompts = _prompts(seed=2)
    plain.generate(prompts, WARM, None, seed=0)  # cached under version 1
    monkeypatch.setattr(plain, "reset_prefix_cache", lambda: None)
    new = _policy(2)
    plain.set_weights(2, cpu_state(new), None)
    outs = plain.llm.generate([vllm.inputs.TokensPrompt(prompt_token_ids=p) for p in prompts],
                              vllm.SamplingParams(max_tokens=1), use_tqdm=False)
    block = plain.llm.llm_engine.vllm_config.cache_config.block_size
    assert all(o.num_cached_tokens >= block for o in outs)  # the stale KV was served
    batch = plain.generate(prompts, WARM, None, seed=0)
    assert _max_logprob_error(new, batch.sequences, WARM) > 100 * LOGPROB_TOL


def test_sync_swaps_policy_and_heads_together(spec):
    new_policy, new_heads = _policy(3), _heads(3)
    with pytest.raises(ValueError, match="heads_state"):
        spec.set_weights(1, cpu_state(new_policy), None)
    spec.set_weights(1, cpu_state(new_policy), cpu_state(new_heads))
    served = spec.llm.collective_rpc(lambda w: {k: v.clone() for k, v in w.model_runner.drafter.model.state_dict().items()})[0]
    want = cpu_state(new_heads)
    assert all(torch.equal(served[f"blocks.{i}.{p}"], want[f"blocks.{i}.{p}"])
               for i in range(3) for p in ("w1.weight", "w1.bias", "w2.weight", "w2.bias"))
    assert torch.equal(served["lm_head.weight"], new_policy.lm_head.weight)  # the drafts' LM head too
    prompts, sp = _prompts(seed=4), SamplingParams(temperature=0.0, max_new_tokens=16)
    batch = spec.generate(prompts, sp, SPEC, seed=0)
    assert [s.tokens for s in batch.sequences] == _greedy(new_policy, prompts, 16)
    assert {s.policy_version for s in batch.sequences} == {1}


def test_speculation_at_temperature_one_fails_closed():
    """vLLM 0.32's speculative sampling at temperature 1 on a CPU fails the goodness-of-fit check
    (docs/vllm.md has the evidence); the worker refuses it, or with fallback_plain serves plain
    decoding whose output passes the same check."""
    sp = SamplingParams(temperature=1.0, max_new_tokens=8)
    refuse = VllmRolloutWorker(MC, HC, RolloutConfig(max_batch=64), policy_state=cpu_state(_policy(0)),
                               heads_state=cpu_state(_heads(0)))
    with pytest.raises(RuntimeError, match="goodness-of-fit"):
        refuse.generate(_prompts(), sp, SPEC, seed=0)
    assert refuse.fit is not None and not refuse.fit.passed(1e-3)
    with pytest.raises(RuntimeError, match="goodness-of-fit"):  # refused again: no later call skips the check
        refuse.generate(_prompts(), sp, SPEC, seed=1)
    fallback = VllmRolloutWorker(MC, HC, RolloutConfig(max_batch=64, vllm=VllmParams(fallback_plain=True)),
                                 policy_state=cpu_state(_policy(0)), heads_state=cpu_state(_heads(0)))
    batch = fallback.generate(_prompts(), sp, SPEC, seed=0)
    assert not fallback.speculating and batch.stats.drafted_per_pos == []
    control: FitResult = fallback.check_speculation(sp)  # the same check on plain sampling passes
    assert control.passed(1e-3) and control.dof > 20, control
    assert _max_logprob_error(_policy(0), batch.sequences, sp) < LOGPROB_TOL


def test_unsupported_settings_name_the_key():
    with pytest.raises(ValueError, match="heads.kind"):
        VllmRolloutWorker(MC, HeadConfig("sequential", 2), RolloutConfig(), policy_state=cpu_state(_policy(0)))
    w = VllmRolloutWorker(MC, HC, RolloutConfig(), policy_state=cpu_state(_policy(0)), heads_state=cpu_state(_heads(0)))
    with pytest.raises(ValueError, match="spec.mode"):
        w.generate(_prompts(), SamplingParams(), SpecParams(mode="entropy"), seed=0)
    with pytest.raises(ValueError, match="spec.draft"):
        w.generate(_prompts(), SamplingParams(), SpecParams(mode="fixed", k=2), seed=0)
