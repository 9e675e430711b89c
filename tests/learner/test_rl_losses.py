"""RL losses: vectorised == loop references, micro-batch == full batch, toy bandits learn."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from learner.losses import (LOSS_AGG_MODES, AlgoConfig, aggregate, batch_totals, gae, grpo_advantages,
                            kl_k3, policy_loss, value_loss)
from learner.value import ValueHead


def _random_mask(B: int, T: int, gen: torch.Generator, left_pad_rows: int = 0) -> torch.Tensor:
    """Variable-length rows (right padded; the first `left_pad_rows` left padded), one row empty."""
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[-1] = 0
    mask = torch.zeros(B, T)
    for b in range(B):
        n = int(lengths[b])
        if b < left_pad_rows:
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
    return mask


# --------------------------------------------------------------------------------------------- advantages

def _grpo_loop(rewards: list[float], G: int, std_normalize: bool, eps: float = 1e-6) -> list[float]:
    out = []
    for g in range(len(rewards) // G):
        group = rewards[g * G:(g + 1) * G]
        mean = sum(group) / G
        std = statistics.stdev(group)  # unbiased, as documented
        out += [(r - mean) / (std + eps) if std_normalize else r - mean for r in group]
    return out


@pytest.mark.parametrize("std_normalize", [True, False])
def test_grpo_advantages_match_loop(std_normalize):
    gen = torch.Generator().manual_seed(0)
    G = 4
    rewards = torch.randint(0, 2, (6 * G,), generator=gen).float()
    rewards[:G] = 1.0  # an all-equal group: advantage 0, not NaN
    rewards[G:2 * G] = torch.rand(G, generator=gen)  # continuous rewards too
    got = grpo_advantages(rewards, G, std_normalize)
    want = torch.tensor(_grpo_loop(rewards.tolist(), G, std_normalize))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.all(got[:G] == 0)


def test_grpo_advantages_rejects_partial_groups():
    with pytest.raises(ValueError, match=r"10 rows.*group_size=4"):
        grpo_advantages(torch.zeros(10), 4)


def _gae_loop(rewards, values, mask, gamma, lam):
    """Per row: compress to the real tokens, textbook backwards GAE, scatter back."""
    B, T = rewards.shape
    adv, ret = torch.zeros(B, T), torch.zeros(B, T)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t] > 0]
        running, next_value = 0.0, 0.0
        for t in reversed(idx):
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            adv[b, t] = running
            ret[b, t] = running + float(values[b, t])
            next_value = float(values[b, t])
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_backwards_loop(gamma, lam):
    gen = torch.Generator().manual_seed(1)
    B, T = 7, 9
    mask = _random_mask(B, T, gen, left_pad_rows=2)
    assert mask[3, :4].sum() == 4
    mask[3, 2] = 0  # a hole inside a row is skipped, not treated as a step
    rewards = torch.randn(B, T, generator=gen)
    values = torch.randn(B, T, generator=gen)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    want_adv, want_ret = _gae_loop(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, want_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, want_ret, atol=1e-5, rtol=1e-5)
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)


def test_gae_outcome_reward_one_step_is_reward_minus_value():
    rewards, values, mask = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.3], [0.3]]), torch.ones(2, 1)
    adv, ret = gae(rewards, values, mask, 1.0, 0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.7], [-0.3]]))
    torch.testing.assert_close(ret, rewards)


# --------------------------------------------------------------------------------------------- aggregation

def _aggregate_loop(loss_mat, mask, mode):
    per_seq_sum, per_seq_n = [], []
    for b in range(loss_mat.shape[0]):
        toks = [float(loss_mat[b, t]) for t in range(loss_mat.shape[1]) if mask[b, t] > 0]
        if toks:
            per_seq_sum.append(sum(toks))
            per_seq_n.append(len(toks))
    if mode == "token-mean":
        return sum(per_seq_sum) / sum(per_seq_n)
    if mode == "seq-mean-token-sum":
        return sum(per_seq_sum) / len(per_seq_sum)
    return sum(s / n for s, n in zip(per_seq_sum, per_seq_n)) / len(per_seq_sum)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregate_matches_loop(mode):
    gen = torch.Generator().manual_seed(2)
    mask = _random_mask(6, 8, gen, left_pad_rows=1)
    loss_mat = torch.randn(6, 8, generator=gen)
    loss_mat[mask == 0] = 1e3  # padding values must not leak in
    got = aggregate(loss_mat, mask, mode)
    assert math.isclose(float(got), _aggregate_loop(loss_mat, mask, mode), rel_tol=1e-5, abs_tol=1e-6)


def test_aggregate_rejects_unknown_mode_naming_field():
    with pytest.raises(ValueError, match=r"^loss_agg: must be one of"):
        aggregate(torch.zeros(2, 2), torch.ones(2, 2), "mean")


# --------------------------------------------------------------------------------------------- policy loss

def _policy_loss_loop(lp, old, adv, mask, cl, ch, mode, ref=None, kl_coef=0.0):
    B, T = lp.shape
    pg, kl = torch.zeros(B, T), torch.zeros(B, T)
    clipped_active, n = 0, 0
    for b in range(B):
        for t in range(T):
            ratio = math.exp(float(lp[b, t]) - float(old[b, t]))
            a = float(adv[b, t])
            surr1, surr2 = ratio * a, min(max(ratio, 1 - cl), 1 + ch) * a
            pg[b, t] = -min(surr1, surr2)
            if ref is not None:
                d = float(ref[b, t]) - float(lp[b, t])
                kl[b, t] = math.exp(d) - d - 1
            if mask[b, t] > 0:
                n += 1
                clipped_active += int(-surr2 > -surr1)
    loss = _aggregate_loop(pg, mask, mode) + kl_coef * _aggregate_loop(kl, mask, mode)
    return loss, clipped_active / n


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_policy_loss_matches_loop_and_clips_both_sides(mode):
    cl, ch = 0.2, 0.28
    # ratios below, inside and above [1 - cl, 1 + ch], each with positive and negative advantage
    ratios = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5])
    ratio_grid = ratios.repeat(2)[None].repeat(2, 1)  # [2, 10]
    adv = torch.tensor([1.0] * 5 + [-1.0] * 5)[None].repeat(2, 1) * torch.tensor([[1.0], [2.5]])  # [2, 10]
    old = torch.randn(2, 10, generator=torch.Generator().manual_seed(3))
    lp = (old + torch.log(ratio_grid)).requires_grad_(True)
    ref = old + 0.3 * torch.randn(2, 10, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 10)
    loss, metrics = policy_loss(lp, old, adv, mask, cl, ch, mode, ref_logprobs=ref, kl_coef=0.1)
    want, want_clipfrac = _policy_loss_loop(lp.detach(), old, adv, mask, cl, ch, mode, ref, 0.1)
    assert math.isclose(loss.item(), want, rel_tol=1e-5)
    # active clip: A > 0 with ratio 1.5 (> 1 + ch) and A < 0 with ratio 0.5 (< 1 - cl): 2 of 10
    assert math.isclose(float(metrics["clipfrac"]), want_clipfrac, abs_tol=1e-6)
    assert math.isclose(want_clipfrac, 0.2)
    torch.testing.assert_close(metrics["ratio_mean"], ratio_grid.mean())
    assert float(metrics["kl"]) > 0 and not metrics["kl"].requires_grad
    # Where the clip is active the surrogate is flat: only the KL term's gradient remains.
    loss_no_kl, _ = policy_loss(lp, old, adv, mask, cl, ch, mode)
    (grad,) = torch.autograd.grad(loss_no_kl, lp)
    active = ((ratio_grid > 1 + ch) & (adv > 0)) | ((ratio_grid < 1 - cl) & (adv < 0))
    assert torch.all(grad[active] == 0) and torch.all(grad[~active] != 0)


def test_policy_loss_broadcasts_sequence_advantages_and_masks_padding():
    gen = torch.Generator().manual_seed(5)
    mask = _random_mask(5, 6, gen)
    old = torch.randn(5, 6, generator=gen)
    lp = old + 0.3 * torch.randn(5, 6, generator=gen)
    lp[mask == 0] = 50.0  # huge ratios on padding must not matter
    adv = torch.randn(5, generator=gen)
    a, _ = policy_loss(lp, old, adv, mask, 0.2, 0.28, "token-mean")
    b, _ = policy_loss(lp, old, adv[:, None].expand(5, 6), mask, 0.2, 0.28, "token-mean")
    want, _ = _policy_loss_loop(lp, old, adv[:, None].expand(5, 6), mask, 0.2, 0.28, "token-mean")
    assert float(a) == float(b)
    assert math.isclose(float(a), want, rel_tol=1e-5)


def test_policy_loss_kl_without_reference_names_the_input():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"^ref_logprobs: required when kl_coef > 0"):
        policy_loss(z, z, z, torch.ones(1, 2), 0.2, 0.2, "token-mean", kl_coef=0.1)


def test_kl_k3_nonnegative_zero_at_equality_and_unbiased():
    gen = torch.Generator().manual_seed(6)
    lp, ref = torch.randn(50, 20, generator=gen), torch.randn(50, 20, generator=gen)
    assert torch.all(kl_k3(lp, ref) >= 0)
    assert torch.all(kl_k3(lp, lp) == 0)
    # E_{x ~ policy}[k3] = KL(policy || ref)
    policy_logits, ref_logits = torch.randn(10, generator=gen), torch.randn(10, generator=gen)
    policy_lp, ref_lp = policy_logits.log_softmax(-1), ref_logits.log_softmax(-1)
    x = torch.multinomial(policy_lp.exp(), 200_000, replacement=True, generator=gen)
    estimate = kl_k3(policy_lp[x], ref_lp[x]).mean()
    exact = (policy_lp.exp() * (policy_lp - ref_lp)).sum()
    assert abs(float(estimate) - float(exact)) < 0.02 * float(exact) + 1e-3


def test_value_loss_matches_loop_with_clipping():
    values = torch.tensor([[0.0, 1.0, 0.5, -1.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    returns = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    mask = torch.ones(1, 4)
    loss = value_loss(values, old, returns, mask, 0.2, "token-mean")
    want = []
    for v, o, r in zip(values[0].tolist(), old[0].tolist(), returns[0].tolist()):
        vc = min(max(v, o - 0.2), o + 0.2)
        want.append(0.5 * max((v - r) ** 2, (vc - r) ** 2))
    assert math.isclose(loss.item(), sum(want) / 4, rel_tol=1e-6)


# --------------------------------------------------------------------------------------------- micro-batching

def _toy_losses(model_logits, tokens, old, ref, adv, values_param, old_values, returns, mask, mode, totals):
    """Policy (with KL) + value loss of a batch slice, from a per-row logits table."""
    lp = model_logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)  # [b, T]
    pol, _ = policy_loss(lp, old, adv, mask, 0.2, 0.28, mode, ref_logprobs=ref, kl_coef=0.05, **totals)
    val = value_loss(values_param, old_values, returns, mask, 0.2, mode, **totals)
    return pol + 0.5 * val


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_micro_batches_accumulate_to_full_batch_gradient(mode):
    gen = torch.Generator().manual_seed(7)
    B, T, V = 7, 6, 11
    mask = _random_mask(B, T, gen, left_pad_rows=2).double()
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64).requires_grad_(True)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64).requires_grad_(True)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    base = logits.detach().log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    old = base + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)  # some ratios clip
    ref = base + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    old_values = values.detach() + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    returns = torch.randn(B, T, generator=gen, dtype=torch.float64)
    data = (tokens, old, ref, adv)

    full = _toy_losses(logits, *data, values, old_values, returns, mask, mode, {})
    full_grads = torch.autograd.grad(full, (logits, values))

    num_tokens, num_seqs = batch_totals(mask)
    totals = {"num_tokens_total": num_tokens, "num_seqs_total": num_seqs}
    acc = [torch.zeros_like(logits), torch.zeros_like(values)]
    summed = 0.0
    for sl in (slice(0, 1), slice(1, 5), slice(5, 7)):  # uneven; the last holds the empty row
        part = _toy_losses(logits[sl], *(d[sl] for d in data), values[sl], old_values[sl], returns[sl],
                           mask[sl], mode, totals)
        for a, g in zip(acc, torch.autograd.grad(part, (logits, values))):
            a += g
        summed += part.item()
    assert math.isclose(summed, full.item(), rel_tol=1e-9, abs_tol=1e-9)
    for a, g in zip(acc, full_grads):
        torch.testing.assert_close(a, g, atol=1e-6, rtol=0)
    # The bug this guards against: averaging micro-batch means differs from the full mean.
    naive = sum(_toy_losses(logits[sl], *(d[sl] for d in data), values[sl], old_values[sl],
                            returns[sl], mask[sl], mode, {}).item()
                for sl in (slice(0, 1), slice(1, 5), slice(5, 7))) / 3
    assert not math.isclose(naive, full.item(), rel_tol=1e-3)


# --------------------------------------------------------------------------------------------- toy bandits

def _bandit_probs(logits: torch.Tensor) -> float:
    return float(logits.detach().softmax(-1)[3])


def test_grpo_toy_bandit_learns_rewarded_token():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    logits = torch.nn.Parameter(torch.zeros(5))  # p(token 3) = 0.2
    opt = torch.optim.Adam([logits], lr=0.05)
    cfg = AlgoConfig(name="grpo", group_size=8)
    assert math.isclose(_bandit_probs(logits), 0.2, rel_tol=1e-6)
    for step in range(300):
        with torch.no_grad():
            actions = torch.multinomial(logits.softmax(-1), 8 * cfg.group_size, replacement=True, generator=gen)
            old = logits.log_softmax(-1)[actions][:, None]  # [B, 1]
        adv = grpo_advantages((actions == 3).float(), cfg.group_size, cfg.std_normalize)  # [B]
        for _ in range(2):  # two passes over each batch, so the ratio moves off 1 and clipping is live
            lp = logits.log_softmax(-1)[actions][:, None]  # [B, 1]
            loss, _ = policy_loss(lp, old, adv, torch.ones_like(lp), cfg.clip_low, cfg.clip_high, cfg.loss_agg)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if _bandit_probs(logits) > 0.9:
            break
    assert _bandit_probs(logits) > 0.9, f"p(3) = {_bandit_probs(logits):.3f} after {step + 1} steps"


def test_ppo_gae_toy_bandit_learns_rewarded_token_and_value():
    gen = torch.Generator().manual_seed(1)
    logits = torch.nn.Parameter(torch.zeros(5))
    value = torch.nn.Parameter(torch.zeros(()))  # critic of the single state
    opt = torch.optim.Adam([logits, value], lr=0.05)
    cfg = AlgoConfig(name="ppo", group_size=1)
    B = 32
    for step in range(300):
        with torch.no_grad():
            actions = torch.multinomial(logits.softmax(-1), B, replacement=True, generator=gen)
            old = logits.log_softmax(-1)[actions][:, None]  # [B, 1]
            old_values = value.expand(B, 1).clone()  # [B, 1]
            rewards = (actions == 3).float()[:, None]  # [B, 1] outcome reward at the only token
        mask = torch.ones(B, 1)
        adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        for _ in range(2):
            lp = logits.log_softmax(-1)[actions][:, None]
            pol, _ = policy_loss(lp, old, adv, mask, cfg.clip_low, cfg.clip_high, cfg.loss_agg)
            val = value_loss(value.expand(B, 1), old_values, returns, mask, cfg.vf_clip, cfg.loss_agg)
            opt.zero_grad()
            (pol + cfg.vf_coef * val).backward()
            opt.step()
        if _bandit_probs(logits) > 0.9:
            break
    assert _bandit_probs(logits) > 0.9, f"p(3) = {_bandit_probs(logits):.3f} after {step + 1} steps"
    assert float(value.detach()) > 0.5  # the critic tracks the expected reward, which rose with p(3)


# --------------------------------------------------------------------------------------------- config, value head

@pytest.mark.parametrize("field,value", [
    ("name", "reinforce"), ("group_size", 1), ("group_size", 2.5), ("std_normalize", "yes"),
    ("clip_low", 1.0), ("clip_low", 0.0), ("clip_high", -0.1), ("kl_coef", -1.0), ("loss_agg", "mean"),
    ("gamma", 1.5), ("lam", -0.1), ("vf_coef", float("nan")), ("vf_clip", 0.0), ("entropy_coef", -0.01),
])
def test_algo_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        AlgoConfig(**{field: value})


def test_algo_config_defaults_valid_and_ppo_allows_single_samples():
    AlgoConfig()
    AlgoConfig(name="ppo", group_size=1)


def test_value_head_zero_init_trains_and_round_trips(tmp_path):
    torch.manual_seed(0)
    head = ValueHead(64)
    hidden = torch.randn(3, 5, 64)
    assert head(hidden).shape == (3, 5) and torch.all(head(hidden) == 0)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    value_loss(head(hidden), torch.zeros(3, 5), torch.ones(3, 5), torch.ones(3, 5), 10.0, "token-mean").backward()
    opt.step()
    assert all(torch.any(p != 0) for p in head.parameters())  # every parameter moved
    path = str(tmp_path / "value_head.safetensors")
    head.save(path)
    loaded = ValueHead.load(path, 64)
    torch.testing.assert_close(loaded(hidden), head(hidden), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"^hidden_size: .*expected \(1, 32\)"):
        ValueHead.load(path, 32)
