"""The learner and one RL step: micro-batching, parameter coverage, on-policy log-probs, a reward
that rises, versioned publishing, bad rewards, non-finite updates, checkpoints and exact resume."""
import copy
import dataclasses
import math

import pytest
import torch

from learner.batching import pack, token_logprobs
from learner.checkpointing import latest_checkpoint, load_run_checkpoint, save_run_checkpoint
from learner.config import RefitConfig, TrainConfig
from learner.loop import RewardError, RLLoop, StepPrompts
from learner.losses import AlgoConfig
from learner.trainer import Learner, NonFiniteError, cpu_state
from rollout.engine import Engine
from rollout.model import ModelConfig, Transformer
from rollout.types import RolloutConfig, SamplingParams, SpecParams
from rollout.worker import RolloutClient
from spec_heads.heads import DraftHeads, HeadConfig

MC = ModelConfig(vocab_size=16, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=8)
FIXED = SpecParams(mode="fixed", k=2)
TARGET = 7  # the toy task rewards emitting this token
PROMPT_POOL = [[1, 2, 3], [4, 5], [6, 8, 9, 10], [11], [12, 13], [14, 15, 1], [2, 4, 6], [3, 5]]


def make_policy(seed=0, std=0.02):
    g = torch.Generator().manual_seed(seed)
    model, heads = Transformer(MC), DraftHeads(HeadConfig("parallel", 2), MC)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model, heads


def make_learner(model, heads, algo="grpo", micro=8, lr=1e-3, refit="never", kl=0.0, sampling=SAMPLING,
                 loss_agg="token-mean"):
    return Learner(model, heads, algo=AlgoConfig(name=algo, group_size=4, kl_coef=kl, loss_agg=loss_agg),
                   train=TrainConfig(lr=lr, micro_batch_size=micro), sampling=sampling,
                   refit=RefitConfig(schedule=refit, every=1, steps=3, micro_batch_size=8))


def toy_prompts(step, n=2):
    prompts = [PROMPT_POOL[(step * n + i) % len(PROMPT_POOL)] for i in range(n)]
    return StepPrompts(prompts, [str(p) for p in prompts], list(range(n)))


def toy_reward(sequences, meta):
    return [sum(t == TARGET for t in s.tokens) / max(len(s.tokens), 1) for s in sequences]


def make_loop(learner, spec=FIXED, reward=toy_reward, n_prompts=2, seed=0, max_staleness=0):
    client = RolloutClient(learner.policy.config, cpu_state(learner.policy), learner.heads.config,
                           cpu_state(learner.heads), RolloutConfig(max_batch=8), version=learner.policy_version)
    return RLLoop(learner, client, prompt_fn=lambda s: toy_prompts(s, n_prompts), reward_fn=reward,
                  task_name="toy", sampling=learner.sampling, spec=spec, group_size=4, seed=seed,
                  max_staleness=max_staleness)


def rollouts(model, heads, sampling=SAMPLING, n=8, seed=0):
    eng = Engine(copy.deepcopy(model), copy.deepcopy(heads), max_batch=8)
    prompts = [PROMPT_POOL[i // 4 % len(PROMPT_POOL)] for i in range(n)]
    return eng.generate(prompts, sampling, FIXED, seed=seed).sequences


@pytest.mark.parametrize("algo,loss_agg", [("grpo", "token-mean"), ("grpo", "seq-mean-token-mean"),
                                           ("ppo", "token-mean")])
def test_micro_batched_step_equals_full_batch_step(algo, loss_agg):
    """micro_batch 2 vs 8: same loss, same accumulated gradient, same parameters after one step.
    The step is plain SGD here: Adam divides by |grad| + 1e-8, which blows fp32 round-off up to
    an lr-sized difference on the few elements whose gradient is itself ~1e-8."""
    model, heads = make_policy()
    seqs = rollouts(model, heads)
    rewards = torch.tensor([float(i % 3) for i in range(len(seqs))])
    runs = []
    for micro in (8, 2):
        learner = make_learner(copy.deepcopy(model), heads, algo=algo, micro=micro, kl=0.1, loss_agg=loss_agg)
        learner.optimizer = torch.optim.SGD(learner.params, lr=1.0)
        grads = {}
        step = learner.optimizer.step

        def capture(*args, learner=learner, grads=grads, step=step, **kw):
            grads.update({n: p.grad.clone() for n, p in learner.policy.named_parameters()})
            return step(*args, **kw)

        learner.optimizer.step = capture
        runs.append((learner, learner.update(seqs, rewards), grads))
    (full, m_full, g_full), (micro, m_micro, g_micro) = runs
    assert m_full["loss"] == pytest.approx(m_micro["loss"], abs=1e-6)
    assert m_full["grad_norm"] == pytest.approx(m_micro["grad_norm"], rel=1e-5)
    for name, g in g_full.items():
        assert torch.allclose(g, g_micro[name], rtol=1e-4, atol=1e-7), name
    for (name, a), b in zip(full.policy.named_parameters(), micro.policy.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_every_trainable_parameter_changes(algo):
    model, heads = make_policy()
    seqs = rollouts(model, heads)
    learner = make_learner(copy.deepcopy(model), heads, algo=algo, micro=3)
    modules = [learner.policy] + ([learner.value_head] if learner.value_head is not None else [])
    before = {f"{i}.{n}": p.detach().clone() for i, m in enumerate(modules) for n, p in m.named_parameters()}
    learner.update(seqs, torch.tensor([float(i % 2) for i in range(len(seqs))]))
    after = {f"{i}.{n}": p for i, m in enumerate(modules) for n, p in m.named_parameters()}
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged


@pytest.mark.parametrize("sampling", [SAMPLING, SamplingParams(temperature=0.7, top_k=8, top_p=0.9, max_new_tokens=8)])
def test_rollout_logprobs_equal_learner_recompute(sampling):
    model, heads = make_policy(std=0.3)  # peaked distributions: top-k / top-p cut real mass
    seqs = rollouts(model, heads, sampling=sampling)
    batch = pack(seqs, "cpu")
    with torch.no_grad():
        lp, _ = token_logprobs(model, batch, sampling.temperature, sampling.top_k, sampling.top_p)
    diff = ((lp - batch.old_logprobs) * batch.mask).abs().max()
    assert diff <= 1e-5
    m = make_learner(model, heads, sampling=sampling).update(seqs, torch.arange(len(seqs), dtype=torch.float32))
    assert m["logprob_diff_max"] <= 1e-5


def test_reward_rises_on_toy_task():
    model, heads = make_policy()
    loop = make_loop(make_learner(model, heads, lr=3e-3), n_prompts=4)
    rewards = [loop.step(s)["reward_mean"] for s in range(1, 11)]
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2 + 0.2, rewards


def test_publish_advances_policy_and_heads_together():
    model, heads = make_policy()
    learner = make_learner(model, heads, refit="every")
    loop = make_loop(learner)
    for step in (1, 2):
        m = loop.step(step)
        assert m["refit"] and m["policy_version"] == step
        assert loop.client.versions() == [{"policy": step, "heads": step}]
    worker = loop.client.workers[0]
    for k, v in learner.heads.state_dict().items():  # the re-fitted heads reached the worker
        assert torch.equal(worker.engine.heads.state_dict()[k], v)
    for k, v in learner.policy.state_dict().items():
        assert torch.equal(worker.engine.model.state_dict()[k], v)


def test_async_steps_train_on_samples_at_most_n_versions_old_with_heads_and_policy_together():
    """max_staleness 1: step s >= 2 trains on rollouts sampled by version s - 2 (submitted before
    step s - 1 trained), each sequence carries that version, and every publish still moves
    policy and heads together; a batch older than the bound fails the step."""
    model, heads = make_policy()
    learner = make_learner(model, heads, refit="every")
    loop = make_loop(learner, max_staleness=1)
    sampled_by = {}
    real = loop.client.generate

    def spy(prompts, ids, sampling, spec, seed):
        batch = real(prompts, ids, sampling, spec, seed)
        sampled_by[seed] = {s.policy_version for s in batch.sequences}
        return batch

    loop.client.generate = spy
    metrics = [loop.step(s) for s in (1, 2, 3)]
    assert [m["staleness_max"] for m in metrics] == [0, 1, 1]
    assert [m["policy_version"] for m in metrics] == [1, 2, 3]
    # steps 1 and 2 were both submitted at version 0, step 3 at version 1, step 4 at version 2
    from learner.loop import step_seed
    assert [sampled_by[step_seed(0, t)] for t in (1, 2, 3, 4)] == [{0}, {0}, {1}, {2}]
    assert loop.client.versions() == [{"policy": 3, "heads": 3}]
    worker = loop.client.workers[0]
    for k, v in learner.heads.state_dict().items():  # the step-3 re-fit reached the worker with the policy
        assert torch.equal(worker.engine.heads.state_dict()[k], v)
    pending = loop.pending_rollouts()
    assert list(pending) == [4] and {s.policy_version for s in pending[4].sequences} == {2}

    stale = make_loop(make_learner(*make_policy()), max_staleness=1)
    for s in (1, 2):
        stale.step(s)
    stale._ahead.clear()
    old = [dataclasses.replace(x, policy_version=0) for x in pending[4].sequences]
    stale.preload({3: dataclasses.replace(pending[4], sequences=old)})  # two versions behind learner version 2
    with pytest.raises(RuntimeError, match="2 versions behind the learner"):
        stale.step(3)


def test_truncated_importance_weights_follow_the_behaviour_gap():
    from learner.losses import policy_loss

    old = torch.log(torch.tensor([[0.5, 0.1]]))
    prox = torch.log(torch.tensor([[0.25, 0.4]]))  # the learner moved since the rollout
    logprobs = prox.clone().requires_grad_(True)
    mask = torch.ones(1, 2)
    loss, m = policy_loss(logprobs, old, torch.tensor([1.0]), mask, 0.2, 0.2, "token-mean",
                          prox_logprobs=prox, tis_cap=2.0)
    loss.backward()
    # ratio to the proximal policy is 1 (no clipping); weights min(0.5, 2) and min(4, 2)
    assert float(m["is_weight_mean"]) == pytest.approx((0.5 + 2.0) / 2)
    assert logprobs.grad[0].tolist() == pytest.approx([-0.5 / 2, -2.0 / 2])
    with pytest.raises(ValueError, match="prox_logprobs"):
        policy_loss(logprobs, old, torch.tensor([1.0]), mask, 0.2, 0.2, "token-mean", tis_cap=2.0)


def test_bad_rewards_fail_the_step_naming_task_and_row():
    model, heads = make_policy()

    def nan_on_row_5(seqs, meta):
        return [math.nan if i == 5 else 0.0 for i in range(len(seqs))]

    with pytest.raises(RewardError, match=r"task toy: reward nan for row 5 \(prompt '\[4, 5\]'"):
        make_loop(make_learner(model, heads), reward=nan_on_row_5).step(0)
    with pytest.raises(RewardError, match="task toy: the reward function returned 3 rewards for 8"):
        make_loop(make_learner(model, heads), reward=lambda s, m: [0.0] * 3).step(0)
    with pytest.raises(RewardError, match="task toy: the reward function raised KeyError"):
        make_loop(make_learner(model, heads), reward=lambda s, m: {}["x"]).step(0)


def test_non_finite_update_raises_before_the_optimizer_step():
    model, heads = make_policy()
    seqs = rollouts(model, heads)
    learner = make_learner(copy.deepcopy(model), heads)
    with torch.no_grad():
        learner.policy.layers[0].mlp.down_proj.weight[0, 0] = math.nan  # a diverged weight
    before = {n: p.detach().clone() for n, p in learner.policy.named_parameters()}
    with pytest.raises(NonFiniteError, match="non-finite"):
        learner.update(seqs, torch.arange(len(seqs), dtype=torch.float32))
    for n, p in learner.policy.named_parameters():
        assert torch.equal(p, before[n]) or torch.isnan(before[n]).any(), n
    assert not learner.optimizer.state  # no step was taken


def test_checkpoint_round_trip(tmp_path):
    model, heads = make_policy()
    learner = make_learner(copy.deepcopy(model), copy.deepcopy(heads), algo="ppo", refit="on_drop")
    loop = make_loop(learner)
    loop.step(1)
    save_run_checkpoint(tmp_path, 1, learner)
    assert latest_checkpoint(tmp_path).name == "step_1"
    fresh = make_learner(copy.deepcopy(model), copy.deepcopy(heads), algo="ppo", refit="on_drop")
    state = load_run_checkpoint(latest_checkpoint(tmp_path), fresh)
    assert state["step"] == 1 and fresh.policy_version == learner.policy_version == 1
    assert fresh.refit_baseline == learner.refit_baseline is not None
    for a, b in ((learner.policy, fresh.policy), (learner.heads, fresh.heads), (learner.value_head, fresh.value_head)):
        for k, v in a.state_dict().items():
            assert torch.equal(v, b.state_dict()[k]), k
    sa, sb = learner.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k])


def _comparable(m):
    return {k: v for k, v in m.items() if not k.startswith(("time_", "rollout_")) and k != "speedup_vs_off_est"}


@pytest.mark.parametrize("spec", [FIXED, SpecParams(mode="off")])
def test_resume_reproduces_uninterrupted_run(tmp_path, spec):
    """Stop after step 2, resume from its checkpoint: steps 3-4 match a run that never stopped
    (spec.mode fixed/off; entropy mode's depths follow timings and are not bit-reproducible)."""
    model, heads = make_policy()

    def fresh():
        return make_learner(copy.deepcopy(model), copy.deepcopy(heads), lr=3e-3, refit="on_drop")

    loop = make_loop(fresh(), spec=spec)
    straight = [_comparable(loop.step(s)) for s in range(1, 5)]

    first = make_loop(fresh(), spec=spec)
    for s in (1, 2):
        first.step(s)
    save_run_checkpoint(tmp_path, 2, first.learner)
    learner = fresh()
    assert load_run_checkpoint(latest_checkpoint(tmp_path), learner)["step"] == 2
    resumed = make_loop(learner, spec=spec)
    again = [_comparable(resumed.step(s)) for s in (3, 4)]
    assert again == straight[2:]


def test_refit_that_loses_held_out_acceptance_keeps_the_old_heads(monkeypatch):
    import learner.trainer as trainer_mod

    model, heads = make_policy()
    learner = make_learner(model, heads, refit="every")
    old = {k: v.clone() for k, v in learner.heads.state_dict().items()}

    def worse_fit(policy, fitted, *args, **kwargs):
        with torch.no_grad():
            for p in fitted.parameters():
                p.add_(1.0)
        return {"losses": [0.5], "acceptance_before": [0.9, 0.8], "acceptance_after": [0.5, 0.4]}

    monkeypatch.setattr(trainer_mod, "fit_heads", worse_fit)
    m = learner.refit_heads(rollouts(model, heads), seed=0)
    assert m["refit_kept"] is False
    for k, v in learner.heads.named_parameters():
        assert torch.equal(v, old[k]), k
    # the kept heads carry their own acceptance measured on this step's held-out rollouts
    assert learner.heads.measured_acceptance() == pytest.approx([0.9, 0.8])


def test_kept_refit_records_the_held_out_acceptance_after_the_fit(monkeypatch):
    import learner.trainer as trainer_mod

    model, heads = make_policy()
    learner = make_learner(model, heads, refit="every")
    assert learner.heads.measured_acceptance() is None

    def better_fit(policy, fitted, *args, **kwargs):
        return {"losses": [0.5], "acceptance_before": [0.5, 0.4], "acceptance_after": [0.9, 0.7]}

    monkeypatch.setattr(trainer_mod, "fit_heads", better_fit)
    assert learner.refit_heads(rollouts(model, heads), seed=0)["refit_kept"] is True
    assert learner.heads.measured_acceptance() == pytest.approx([0.9, 0.7])


def test_accepted_len_at_full_depth_reads_the_heads_not_the_depths():
    from learner.loop import accepted_len_at_full_depth
    from rollout.types import RolloutStats
    # the same acceptance rate (0.9) at shallow and at deep drafting gives the same signal
    shallow = RolloutStats(drafted_per_pos=[100, 0, 0, 0], accepted_per_pos=[90, 0, 0, 0])
    deep = RolloutStats(drafted_per_pos=[100, 90, 81, 73], accepted_per_pos=[90, 81, 73, 66])
    want = (1 - 0.9 ** 5) / (1 - 0.9)
    assert accepted_len_at_full_depth(shallow) == pytest.approx(want)
    assert accepted_len_at_full_depth(deep) == pytest.approx(want, rel=1e-2)
    assert accepted_len_at_full_depth(RolloutStats(drafted_per_pos=[0, 0], accepted_per_pos=[0, 0])) == 0.0
    assert accepted_len_at_full_depth(RolloutStats(drafted_per_pos=[5, 5], accepted_per_pos=[5, 5])) == 3.0


class _PlainRollouts:
    """A rollout client whose rollouts report no drafts, as when the depth policy kept them plain."""

    def __init__(self, client):
        self.client = client

    def generate(self, *args, **kwargs):
        batch = self.client.generate(*args, **kwargs)
        K = len(batch.stats.drafted_per_pos)
        batch.stats.drafted_per_pos, batch.stats.accepted_per_pos = [0] * K, [0] * K
        return batch

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_plain_rollouts_measure_the_heads_so_a_drop_still_refits():
    from learner.refit import measure_acceptance
    from spec_heads.depth import expected_tokens

    model, heads = make_policy()
    learner = make_learner(model, heads, refit="on_drop")
    loop = make_loop(learner, spec=SpecParams(mode="entropy"))
    loop.client = _PlainRollouts(loop.client)
    m1 = loop.step(1)
    measured = m1["heads_acceptance_measured"]
    assert measured is not None and not m1["refit"]
    # the measurement is the heads' held-out acceptance against the updated policy, it sets the
    # on_drop baseline, and the heads carry it to the workers with the publish
    assert m1["accepted_len_full_depth"] == pytest.approx(expected_tokens(measured, len(measured)))
    assert learner.refit_baseline == pytest.approx(m1["accepted_len_full_depth"])
    assert learner.heads.measured_acceptance() == pytest.approx(measured, abs=1e-6)
    worker_heads = loop.client.workers[0].engine.heads
    assert worker_heads.measured_acceptance() == pytest.approx(measured, abs=1e-6)
    # the heads go stale (here: scrambled), the next plain rollout sees it, and a re-fit follows
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in learner.heads.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 2.0)
    m2 = loop.step(2)
    assert m2["heads_acceptance_measured"][0] < 0.85 * measured[0]
    assert m2["refit"] and "refit_accept_before" in m2
    # drafted rollouts are measured by the rollout itself: no extra measurement
    loop.client, loop.spec = loop.client.client, FIXED
    assert loop.step(3)["heads_acceptance_measured"] is None


def test_measure_acceptance_matches_the_fit_evaluation():
    from learner.refit import fit_heads, measure_acceptance

    model, heads = make_policy()
    seqs = [s.prompt + s.tokens for s in rollouts(model, heads)]
    lens = [3] * len(seqs)
    m = fit_heads(model, heads, seqs, steps=0, lr=1e-3, loss="tv", kl_warmup_steps=0, micro_batch_size=4,
                  prompt_lens=lens, eval_sequences=seqs, eval_prompt_lens=lens)
    assert measure_acceptance(model, heads, seqs, prompt_lens=lens, batch_size=4) == pytest.approx(m["acceptance_after"])
    assert heads.measured_acceptance() == pytest.approx(m["acceptance_after"], abs=1e-6)


def test_a_diverging_step_stops_the_run_before_it_is_published():
    """lr 0.9 keeps every loss and gradient finite but multiplies the weights' norm many-fold: the
    step raises before the publish, so the workers keep the last good version and the run's
    checkpoint loop never saves these weights."""
    model, heads = make_policy()
    learner = make_learner(copy.deepcopy(model), copy.deepcopy(heads), lr=0.9)
    loop = make_loop(learner)
    with pytest.raises(NonFiniteError, match="diverging"):
        loop.step(1)
    assert learner.policy_version == 0 and loop.client.version == 0


def test_non_finite_weights_after_the_step_stop_the_run(monkeypatch):
    model, heads = make_policy()
    learner = make_learner(copy.deepcopy(model), copy.deepcopy(heads))
    step = learner.optimizer.step

    def overflowing_step(*args, **kwargs):  # what an fp16/bf16 overflow in the update leaves behind
        step(*args, **kwargs)
        with torch.no_grad():
            learner.policy.norm.weight[0] = math.inf

    monkeypatch.setattr(learner.optimizer, "step", overflowing_step)
    loop = make_loop(learner)
    with pytest.raises(NonFiniteError, match="non-finite"):
        loop.step(1)
    assert learner.policy_version == 0 and loop.client.version == 0


def test_a_healthy_step_passes_the_update_check():
    model, heads = make_policy()
    learner = make_learner(copy.deepcopy(model), copy.deepcopy(heads), lr=1e-2)
    make_loop(learner).step(1)
    assert learner.policy_version == 1
