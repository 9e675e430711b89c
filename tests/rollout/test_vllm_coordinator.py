"""rollout.backend=vllm through the coordinator: Ray actors host vLLM engines, a publish swaps
policy and heads together inside the engine, and a short `specroll train` with Ray workers on
vLLM never samples with stale weights.

Needs vLLM and Ray in one venv (skipped without vLLM): scripts/test_vllm.sh runs this file, the
driver in that venv, so Ray's worker processes start from it too.
"""
import pytest
import torch

vllm = pytest.importorskip("vllm")
ray = pytest.importorskip("ray")

import experiments.train as train  # noqa: E402
from experiments.config import load_config  # noqa: E402
from experiments.metrics import read_metrics  # noqa: E402
from learner.loop import RLLoop  # noqa: E402
from learner.trainer import cpu_state  # noqa: E402
from rollout.coordinator import Coordinator  # noqa: E402
from rollout.types import RolloutConfig, SamplingParams  # noqa: E402
from test_vllm_worker import HC, MC, SPEC, _greedy, _heads, _policy  # noqa: E402

pytestmark = pytest.mark.ray

GROUPS = 2  # rows per GRPO group


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _rows(n=3, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(MC.vocab_size, (length,), generator=g).tolist() for _ in range(n)]
    return [p for p in prompts for _ in range(GROUPS)]


def _as_loaded(served: dict, policy_state: dict) -> list[str]:
    """The policy tensors vLLM keeps as loaded (embeddings, norms, LM head; its CPU linear layers
    are fused and repacked, so those are checked through log-probs) that differ from `policy_state`."""
    names = {("model." + k if k != "lm_head.weight" else k): k for k in policy_state}
    common = [n for n in served if n in names and not n.endswith("proj.weight")]
    assert len(common) >= 2 * MC.num_hidden_layers + 3, sorted(served)  # the check compares something
    # (vLLM pads the vocabulary rows of the embedding and LM head: compare the real ones)
    return [n for n in common if not torch.equal(served[n][:len(policy_state[names[n]])], policy_state[names[n]])]


def _heads_differ(drafter: dict, heads_state: dict) -> list[str]:
    return [k for k in heads_state if k.startswith("blocks.") and k in drafter
            and not torch.equal(drafter[k], heads_state[k])]


def test_coordinator_actors_serve_vllm_and_swap_policy_and_heads_together(cluster):
    co = Coordinator(MC, cpu_state(_policy(0)), HC, cpu_state(_heads(0)),
                     RolloutConfig(backend="vllm", max_batch=8, num_cpus=1, start_timeout_s=600))
    try:
        rows, sp = _rows(), SamplingParams(temperature=0.0, max_new_tokens=12)
        batch = co.generate(rows, list(range(len(rows))), sp, SPEC, seed=0)
        assert [s.tokens for s in batch.sequences] == _greedy(_policy(0), rows, 12)
        assert batch.stats.drafted_per_pos and batch.stats.drafted_per_pos[0] > 0  # the heads drafted
        with pytest.raises(ValueError, match="heads_state"):
            co.publish(1, cpu_state(_policy(1)), None)
        co.publish(1, cpu_state(_policy(1)), cpu_state(_heads(1)))
        served = ray.get(co.workers[0].served_weights.remote())
        assert served["version"] == 1 and co.versions() == [{"policy": 1, "heads": 1}]
        assert _as_loaded(served["policy"], cpu_state(_policy(1))) == []
        assert _as_loaded(served["policy"], cpu_state(_policy(0)))  # (the old policy would be caught)
        assert _heads_differ(served["drafter"], cpu_state(_heads(1))) == []
        assert _heads_differ(served["drafter"], cpu_state(_heads(0)))  # (the old heads would be caught)
        assert torch.equal(served["drafter"]["lm_head.weight"], _policy(1).lm_head.weight)
        batch = co.generate(rows, list(range(len(rows))), sp, SPEC, seed=0)
        assert [s.tokens for s in batch.sequences] == _greedy(_policy(1), rows, 12)
        assert {s.policy_version for s in batch.sequences} == {1}
    finally:
        co.close()


@pytest.fixture(scope="module")
def vllm_policy_dir(tmp_path_factory):
    """A tiny char-level policy for the arithmetic task that vLLM's CPU attention can run
    (head_dim 64), saved with its tokenizer."""
    from experiments.pretrain import ARITH_ALPHABET
    from experiments.tokenizer import TextTokenizer, build_char_tokenizer
    from rollout.checkpoint import save_checkpoint
    from rollout.model import ModelConfig, Transformer

    root = tmp_path_factory.mktemp("vllm-policy")
    tok = TextTokenizer(build_char_tokenizer(ARITH_ALPHABET))
    tok.save(str(root / "tok"))
    torch.manual_seed(0)
    mc = ModelConfig(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=256,
                     tie_word_embeddings=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = Transformer(mc)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.15)
    save_checkpoint(model, str(root / "tiny"), tokenizer_dir_or_file=str(root / "tok"))
    return str(root / "tiny")


def test_train_through_the_coordinator_on_vllm_never_samples_stale_weights(cluster, vllm_policy_dir, tmp_path,
                                                                            monkeypatch):
    """`specroll train ray.enabled=true rollout.backend=vllm`: after every learner step the actor's
    engine holds the learner's new policy and the worker the re-fitted heads, under the learner's
    version; every step's behaviour log-probs equal the learner's recompute (stale weights or a
    stale prefix cache would break that)."""
    cfg = load_config("default", [
        f"model.name={vllm_policy_dir}", f"out_dir={tmp_path}", "name=vllm", "task.digits=2", "task.eval_size=4",
        "fit.num_sequences=16", "fit.steps=4", "fit.kl_warmup_steps=2", "fit.micro_batch_size=8", "fit.eval_every=0",
        "heads.kind=parallel", "heads.num_depths=2", "spec.mode=fixed", "spec.k=2", "spec.draft=greedy",
        "sampling.max_new_tokens=16", "rollout.max_batch=8", "rollout.backend=vllm",
        "rollout.vllm.fallback_plain=true", "rollout.vllm.check_draws=500", "train.steps=3",
        "train.prompts_per_step=2", "algo.group_size=2", "train.micro_batch_size=2", "train.checkpoint_every=0",
        "train.lr=1e-3", "refit.schedule=every", "refit.every=1", "refit.steps=2", "refit.micro_batch_size=4",
        "ray.enabled=true", "rollout.num_workers=1", "rollout.start_timeout_s=600"])
    checks, real_step = [], RLLoop.step

    def step_then_check(self, step):
        metrics = real_step(self, step)
        assert isinstance(self.client, Coordinator)
        served = ray.get(self.client.workers[0].served_weights.remote())
        policy, heads = cpu_state(self.learner.policy), cpu_state(self.learner.heads)
        checks.append({"version": (served["version"], self.learner.policy_version),
                       "policy_differs": _as_loaded(served["policy"], policy),
                       "held_heads_differ": _heads_differ(served["heads"], heads),
                       "drafter_differs": (None if served["drafter"] is None
                                           else _heads_differ(served["drafter"], heads))})
        return metrics

    monkeypatch.setattr(RLLoop, "step", step_then_check)
    train.run(cfg)
    assert [c["version"] for c in checks] == [(1, 1), (2, 2), (3, 3)]
    assert all(c["policy_differs"] == [] and c["held_heads_differ"] == [] for c in checks), checks
    assert all(c["drafter_differs"] in (None, []) for c in checks), checks
    records = read_metrics(cfg.run_dir)
    assert [r["refit"] for r in records] == [True, True, True]  # the heads moved every step
    assert all(r["logprob_diff_max"] < 1e-3 for r in records), [r["logprob_diff_max"] for r in records]
