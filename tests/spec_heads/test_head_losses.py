"""Head losses: vectorised == loop reference, masks respected (values and gradients), targets
detached, TV fitting drives acceptance up, the KL -> TV schedule."""
import pytest
import torch

from spec_heads.losses import (LOSS_NAMES, acceptance, ce_loss, e2e_tv_loss, head_loss, kl_loss,
                               per_depth_acceptance, scheduled_loss_name, tv_loss)
from spec_heads.sampling import sampling_probs

B, K, T, V = 3, 3, 7, 11


def _batch(seed=0, top_p=0.8):
    """Targets with zeros (top-p), finite draft logits, a realistic mask: depth k at position t
    has a target only if t + k + 1 < the row's length (so masks are prefix-closed over depths)."""
    gen = torch.Generator().manual_seed(seed)
    target = sampling_probs(2 * torch.randn(B, K, T, V, generator=gen), 1.0, top_p=top_p)
    draft_logits = 2 * torch.randn(B, K, T, V, generator=gen)
    lengths = torch.tensor([T + 1, T - 1, 3])
    mask = (torch.arange(T)[None, None] + torch.arange(K)[None, :, None] + 1) < lengths[:, None, None]
    tokens = torch.where(mask, torch.randint(0, V, (B, K, T), generator=gen), -1)
    return target, draft_logits, mask, tokens


def _tv_reference(target, draft_logits, mask):
    terms = []
    for b in range(B):
        for k in range(K):
            for t in range(T):
                if mask[b, k, t]:
                    draft = draft_logits[b, k, t].softmax(-1)
                    terms.append(1 - sum(min(float(x), float(y)) for x, y in zip(target[b, k, t], draft)))
    return sum(terms) / len(terms)


def _e2e_reference(target, draft_logits, mask):
    terms = []
    for b in range(B):
        for t in range(T):
            chain = 1.0
            for j in range(K):
                if not mask[b, j, t]:
                    break  # deeper terms need this depth
                chain *= float(acceptance(target[b, j, t], draft_logits[b, j, t].softmax(-1)))
                terms.append(1 - chain)
    return sum(terms) / len(terms)


def _kl_reference(target, draft_logits, mask):
    terms = []
    for b in range(B):
        for k in range(K):
            for t in range(T):
                if mask[b, k, t]:
                    logq = draft_logits[b, k, t].log_softmax(-1)
                    terms.append(sum(float(p * (p.log() - lq)) for p, lq in zip(target[b, k, t], logq) if p > 0))
    return sum(terms) / len(terms)


def test_tv_loss_matches_loop_and_is_one_minus_acceptance():
    target, draft_logits, mask, _ = _batch()
    loss = tv_loss(target, draft_logits, mask)
    assert abs(loss.item() - _tv_reference(target, draft_logits, mask)) < 1e-5
    alpha = acceptance(target, draft_logits.softmax(-1))  # [B, K, T]
    assert abs(loss.item() - (1 - alpha[mask].mean().item())) < 1e-6
    per_depth = per_depth_acceptance(target, draft_logits, mask)
    expected = torch.stack([alpha[:, k][mask[:, k]].mean() for k in range(K)])
    torch.testing.assert_close(per_depth, expected)


def test_e2e_tv_loss_matches_loop():
    target, draft_logits, mask, _ = _batch(1)
    assert abs(e2e_tv_loss(target, draft_logits, mask).item() - _e2e_reference(target, draft_logits, mask)) < 1e-5
    # every depth valid everywhere: exactly 1 - (1/K) sum_j prod_{i<=j} alpha_i, averaged
    full = torch.ones(B, K, T, dtype=torch.bool)
    alpha = acceptance(target, draft_logits.softmax(-1))
    expected = 1 - alpha.cumprod(1).mean(1).mean()
    assert abs(e2e_tv_loss(target, draft_logits, full).item() - expected.item()) < 1e-6


def test_e2e_tv_equals_tv_for_one_depth():
    target, draft_logits, mask, _ = _batch(2)
    one = (target[:, :1], draft_logits[:, :1], mask[:, :1])
    assert abs(e2e_tv_loss(*one).item() - tv_loss(*one).item()) < 1e-6


def test_kl_nonnegative_zero_iff_equal_and_matches_loop():
    target, draft_logits, mask, _ = _batch(3)
    kl = kl_loss(target, draft_logits, mask)
    assert kl.item() > 0.01
    assert abs(kl.item() - _kl_reference(target, draft_logits, mask)) < 1e-4
    dense = sampling_probs(torch.randn(B, K, T, V), 1.0)  # no zeros: log is finite
    assert abs(kl_loss(dense, dense.log(), mask).item()) < 1e-6
    assert kl_loss(dense, dense.log() + 0.3 * torch.randn(B, K, T, V), mask).item() > 1e-4


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_gradient_nonzero_where_masked_in_and_exactly_zero_where_masked_out(name):
    target, draft_logits, mask, tokens = _batch(4)
    draft_logits.requires_grad_(True)
    loss = head_loss(name, target, draft_logits, mask, tokens=tokens)
    assert torch.isfinite(loss)
    (grad,) = torch.autograd.grad(loss, draft_logits)
    assert torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()
    assert (grad[mask].abs().sum(-1) > 0).all()


def test_masked_out_values_do_not_change_the_loss():
    target, draft_logits, mask, tokens = _batch(5)
    noisy_logits = torch.where(mask[..., None], draft_logits, 100 * torch.randn(B, K, T, V))
    noisy_target = torch.where(mask[..., None], target, torch.full_like(target, 1.0 / V))
    for name in LOSS_NAMES:
        a = head_loss(name, target, draft_logits, mask, tokens=tokens)
        b = head_loss(name, noisy_target, noisy_logits, mask, tokens=torch.where(mask, tokens, 0))
        assert torch.equal(a, b), name


def test_ce_loss_matches_gather():
    target, draft_logits, mask, tokens = _batch(6)
    logprobs = draft_logits.log_softmax(-1)
    expected = -logprobs.gather(-1, tokens.clamp(min=0)[..., None]).squeeze(-1)[mask].mean()
    torch.testing.assert_close(ce_loss(draft_logits, tokens, mask), expected)


def test_fitting_tv_raises_acceptance_without_touching_the_policy():
    gen = torch.Generator().manual_seed(7)
    policy_logits = (3 * torch.randn(2, 2, 4, 32, generator=gen)).requires_grad_(True)
    target = sampling_probs(policy_logits, 1.0)  # still attached to the "policy"
    target_before = target.detach().clone()
    head_logits = torch.nn.Parameter(3 * torch.randn(2, 2, 4, 32, generator=gen))
    mask = torch.ones(2, 2, 4, dtype=torch.bool)
    start = per_depth_acceptance(target, head_logits, mask).mean().item()
    opt = torch.optim.Adam([head_logits], lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        tv_loss(target, head_logits, mask).backward()
        opt.step()
    end = per_depth_acceptance(target, head_logits, mask).mean().item()
    assert start < 0.5 and end > 0.95, (start, end)
    assert policy_logits.grad is None
    assert torch.equal(target.detach(), target_before)


def test_schedule_switches_from_kl_at_warmup_boundary():
    assert [scheduled_loss_name(s, 3, "tv") for s in range(5)] == ["kl", "kl", "kl", "tv", "tv"]
    assert scheduled_loss_name(0, 0, "e2e_tv") == "e2e_tv"
    with pytest.raises(ValueError, match="tvv"):
        scheduled_loss_name(0, 3, "tvv")


def test_bad_inputs_raise_naming_them():
    target, draft_logits, mask, _ = _batch()
    with pytest.raises(ValueError, match="l2.*tv, e2e_tv, kl, ce"):
        head_loss("l2", target, draft_logits, mask)
    with pytest.raises(ValueError, match="tokens"):
        head_loss("ce", target, draft_logits, mask)
    with pytest.raises(ValueError, match="mask"):
        tv_loss(target, draft_logits, mask[:, :, :-1])
    with pytest.raises(ValueError, match="target_probs"):
        kl_loss(target[..., :-1], draft_logits, mask)
    assert head_loss("tv", target, draft_logits, mask).item() == tv_loss(target, draft_logits, mask).item()
