"""Exactness of the rejection sampler, four ways (see STYLE.md): the algebraic identity in
float64; goodness-of-fit of the first one and two emitted tokens (200k draws, fixed seeds)
against the policy's own autoregressive distribution; the same test failing on deliberately
broken samplers; batched == slow loop reference, bit for bit. Plus batch independence,
output structure and temperature 0.

The goodness-of-fit harness is a tiny Markov "model": target(next | prev) and draft tables
indexed by the previous token. Sequential drafts (MTP-style) condition draft i on draft i-1;
parallel drafts (Medusa-style) condition every depth only on the context token.
"""
import math

import pytest
import torch
from scipy import stats

# the public API: spec_heads.rejection_sample (the package exports it)
from spec_heads import acceptance_rate, expected_tokens_per_step, rejection_sample, rejection_sample_reference
from spec_heads.sampling import row_keys, row_uniforms, sample_with_uniforms, sampling_probs

V, K, N_DRAWS, CONTEXT = 8, 3, 200_000, 0


# ----------------------------------------------------------------------------- algebra
def _emit_first_float64(target, draft):
    """P(first emitted token = y) by the accept/residual rule, float64 [V]."""
    overlap = torch.minimum(target, draft)
    residual = (target - draft).clamp(min=0)
    reject_mass = 1 - overlap.sum()
    residual = residual / residual.sum() if residual.sum() > 0 else torch.zeros_like(residual)
    # draft(y) * min(1, target(y)/draft(y)) == min(target(y), draft(y)), division-free
    return overlap + reject_mass * residual


def _random_dist(gen, n, sparsity=0.0):
    x = torch.rand(n, generator=gen, dtype=torch.float64) ** 3
    x[torch.rand(n, generator=gen, dtype=torch.float64) < sparsity] = 0
    x[0] += 1e-3  # keep some mass
    return x / x.sum()


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_identity_first_token_float64(sparsity):
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        target, draft = _random_dist(gen, 12, sparsity), _random_dist(gen, 12, sparsity)
        torch.testing.assert_close(_emit_first_float64(target, draft), target, rtol=0, atol=1e-12)
    target = _random_dist(gen, 12)  # draft == target: never rejects, residual has no mass
    torch.testing.assert_close(_emit_first_float64(target, target.clone()), target, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_identity_second_token_float64(kind):
    """P(a, b) over the first two emitted tokens == target(a) * target(b | a)."""
    gen = torch.Generator().manual_seed(2)
    n = 7
    target = torch.stack([_random_dist(gen, n, 0.3) for _ in range(n)])  # [prev, next]
    draft = torch.stack([_random_dist(gen, n, 0.3) for _ in range(n)])
    draft2_parallel = _random_dist(gen, n, 0.3)  # depth 2 sees only the context
    c = 3
    overlap1 = torch.minimum(target[c], draft[c])  # first draft accepted and equal to a
    reject_then_a = _emit_first_float64(target[c], draft[c]) - overlap1  # residual emitted a
    joint = torch.zeros(n, n, dtype=torch.float64)
    for a in range(n):
        draft2 = draft[a] if kind == "sequential" else draft2_parallel
        after_accept = _emit_first_float64(target[a], draft2)  # depth 2 given x1 = a accepted
        after_reject = target[a]  # the next round starts from a; by the first identity
        joint[a] = overlap1[a] * after_accept + reject_then_a[a] * after_reject
    expected = target[c][:, None] * target
    torch.testing.assert_close(joint, expected, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------- goodness of fit
def _tables(temperature, top_p, seed=0):
    gen = torch.Generator().manual_seed(seed)
    target_logits = 1.5 * torch.randn(V, V, generator=gen)  # [prev, next]
    # drafts near the target; the +64 offset (softmax-invariant) makes bf16 rounding of the
    # draft logits matter: bf16 spacing in [64, 128) is 0.5
    seq_logits = target_logits + torch.randn(V, V, generator=gen) + 64.0
    par_logits = target_logits[None] + 1.5 * torch.randn(K, V, V, generator=gen) + 64.0  # [depth, ctx, next]

    def probs(logits):
        return sampling_probs(logits, temperature, top_p=top_p)
    return {"target": probs(target_logits),
            "seq": probs(seq_logits), "seq_bf16": probs(seq_logits.bfloat16().float()),
            "par": probs(par_logits), "par_bf16": probs(par_logits.bfloat16().float())}


def _one_round(sampler, tables, kind, context, lengths, gen, bf16_drafts):
    """Draft up to K tokens from `context` [B], verify them with `sampler`."""
    B = context.shape[0]
    key = ("seq" if kind == "sequential" else "par")
    sample_key = key + ("_bf16" if bf16_drafts else "")
    drafts, draft_probs, prev = [], [], context
    for i in range(K):
        if kind == "sequential":
            probs, sample_probs = tables[key][prev], tables[sample_key][prev]  # [B, V]
        else:
            probs, sample_probs = tables[key][i][context], tables[sample_key][i][context]
        x = sample_with_uniforms(sample_probs, torch.rand(B, generator=gen, dtype=torch.float64))
        drafts.append(x)
        draft_probs.append(probs)
        prev = x
    drafts = torch.stack(drafts, 1)  # [B, K]
    positions = torch.cat([context[:, None], drafts], 1)  # [B, K+1]: token before each position
    target_probs = tables["target"][positions]  # [B, K+1, V]
    drafts = torch.where(torch.arange(K)[None] < lengths[:, None], drafts, -1)  # padding
    return sampler(target_probs, torch.stack(draft_probs, 1), drafts, lengths, gen)


def _first_two(sampler, tables, kind, seed, bf16_drafts=False):
    """First two emitted tokens of N_DRAWS independent streams from CONTEXT, [N, 2]."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.full((N_DRAWS,), CONTEXT, dtype=torch.int64)
    lengths1 = torch.randint(0, K + 1, (N_DRAWS,), generator=gen)
    tokens1, n1 = _one_round(sampler, tables, kind, context, lengths1, gen, bf16_drafts)
    lengths2 = torch.randint(0, K + 1, (N_DRAWS,), generator=gen)
    tokens2, _ = _one_round(sampler, tables, kind, tokens1[:, 0], lengths2, gen, bf16_drafts)
    second = torch.where(n1 >= 2, tokens1[:, 1], tokens2[:, 0])
    return torch.stack([tokens1[:, 0], second], 1)


def _gof_pvalue(codes, probs):
    """Chi-square p-value of samples `codes` [N] against `probs` [C]; 0 if a sample falls on
    a zero-probability cell. Cells with expected count < 5 are pooled."""
    probs = probs.double().flatten()
    counts = torch.bincount(codes.flatten(), minlength=probs.numel()).double()
    if counts[probs <= 0].sum() > 0:
        return 0.0
    keep = probs > 0
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    observed = counts[keep]
    small = expected < 5
    if small.sum() > 0:
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
    return float(stats.chisquare(observed.numpy(), expected.numpy()).pvalue)


def _pvalues(sampler, tables, kind, seed, bf16_drafts=False):
    pair = _first_two(sampler, tables, kind, seed, bf16_drafts)
    target = tables["target"].double()
    p_first = _gof_pvalue(pair[:, 0], target[CONTEXT])
    p_pair = _gof_pvalue(pair[:, 0] * V + pair[:, 1], target[CONTEXT][:, None] * target)
    return p_first, p_pair


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_goodness_of_fit_first_two_tokens(kind, temperature, top_p):
    tables = _tables(temperature, top_p)
    p_first, p_pair = _pvalues(rejection_sample, tables, kind, seed=10)
    assert p_first > 1e-3 and p_pair > 1e-3, (p_first, p_pair)


def _broken_sampler(bug):
    """A batched sampler with one deliberate bug (the bugs this field shipped)."""
    def sample(target_probs, draft_probs, draft_tokens, draft_lengths, gen):
        B, K1, _ = target_probs.shape
        accept_u = torch.rand(B, K1 - 1, generator=gen, dtype=torch.float64)
        sample_u = torch.rand(B, generator=gen, dtype=torch.float64)
        rows = torch.arange(B)
        # bonus unless rejected; the off-by-one bug reads the last draft position's target
        bonus_pos = (draft_lengths - 1).clamp(min=0) if bug == "bonus_off_by_one" else draft_lengths
        final_probs = target_probs[rows, bonus_pos]
        tokens = torch.full((B, K1), -1, dtype=torch.int64)
        num_accepted = torch.zeros(B, dtype=torch.int64)
        stopped = torch.zeros(B, dtype=torch.bool)
        for i in range(K1 - 1):
            active = ~stopped & (i < draft_lengths)
            x = draft_tokens[:, i].clamp(min=0)
            target_x = target_probs[rows, i, x].double()
            draft_x = draft_probs[rows, i, x].double()
            if bug == "swapped_ratio":  # accept with min(1, draft/target)
                accepted = accept_u[:, i] * target_x <= draft_x
            else:
                accepted = accept_u[:, i] * draft_x <= target_x
            rejected = active & ~accepted
            if bug == "residual_from_target":  # no max(target - draft, 0) residual
                residual = target_probs[:, i]
            else:
                residual = (target_probs[:, i] - draft_probs[:, i]).clamp(min=0)
            final_probs = torch.where(rejected[:, None], residual, final_probs)
            tokens[:, i] = torch.where(active & accepted, x, tokens[:, i])
            num_accepted += (active & accepted).long()
            stopped |= rejected
        if bug == "unnormalised_residual":  # inverse CDF against mass 1, not the residual's
            cdf = final_probs.double().cumsum(-1)
            final = torch.searchsorted(cdf, sample_u[:, None], right=True).squeeze(-1)
            final = final.clamp(max=final_probs.shape[-1] - 1)
        else:
            final = sample_with_uniforms(final_probs, sample_u)
        if bug == "dropped_bonus":
            # the bonus slot is never written when all drafts pass: the engine advances by
            # num_emitted and reads the zero-initialised output buffer there
            final = torch.where(stopped, final, 0)
        tokens[rows, num_accepted] = final
        return tokens, num_accepted + 1
    return sample


@pytest.mark.parametrize("bug", ["residual_from_target", "dropped_bonus", "bf16_drafts",
                                 "swapped_ratio", "bonus_off_by_one", "unnormalised_residual"])
def test_goodness_of_fit_catches_broken_samplers(bug):
    tables = _tables(1.0, 1.0)
    if bug == "bf16_drafts":  # correct sampler, but drafts drawn from bf16 logits' softmax
        p_first, p_pair = _pvalues(rejection_sample, tables, "sequential", seed=11, bf16_drafts=True)
    else:
        p_first, p_pair = _pvalues(_broken_sampler(bug), tables, "sequential", seed=11)
    assert min(p_first, p_pair) < 1e-6, (p_first, p_pair)


def test_mean_tokens_per_step_matches_formula():
    """i.i.d. acceptance alpha at every depth: E[num_emitted] = (1 - alpha^(k+1)) / (1 - alpha)."""
    gen = torch.Generator().manual_seed(3)
    target, draft = _random_dist(gen, V).float(), _random_dist(gen, V).float()
    alpha = float(acceptance_rate(target, draft))
    B = N_DRAWS
    drafts = sample_with_uniforms(draft.expand(B, K, V), torch.rand(B, K, generator=gen, dtype=torch.float64))
    _, n = rejection_sample(target.expand(B, K + 1, V), draft.expand(B, K, V), drafts,
                            torch.full((B,), K), gen)
    var = n.double().var().item()
    assert abs(n.double().mean().item() - expected_tokens_per_step(alpha, K)) < 5 * math.sqrt(var / B)
    assert expected_tokens_per_step(1.0, K) == K + 1
    assert expected_tokens_per_step(0.0, K) == 1


# ------------------------------------------------------------------- batched == reference
def _random_batch(B=48, K_=4, V_=16, seed=0):
    """Random rows with lengths 0..K (both ends present); every third row is temperature 0
    (one-hot target and draft), half of those with the draft equal to the target argmax."""
    gen = torch.Generator().manual_seed(seed)
    target = sampling_probs(2 * torch.randn(B, K_ + 1, V_, generator=gen), 1.0, top_p=0.9)
    draft = sampling_probs(target[:, :K_].log() + torch.randn(B, K_, V_, generator=gen), 1.0)
    greedy = torch.arange(B) % 3 == 0
    hot_target = sampling_probs(torch.randn(B, K_ + 1, V_, generator=gen), 0.0)
    same = torch.rand(B, K_, 1, generator=gen) < 0.7
    hot_draft = torch.where(same, hot_target[:, :K_], sampling_probs(torch.randn(B, K_, V_, generator=gen), 0.0))
    target = torch.where(greedy[:, None, None], hot_target, target)
    draft = torch.where(greedy[:, None, None], hot_draft, draft)
    drafts = sample_with_uniforms(draft, torch.rand(B, K_, generator=gen, dtype=torch.float64))
    lengths = torch.randint(0, K_ + 1, (B,), generator=gen)
    lengths[:2] = torch.tensor([0, K_])
    drafts = torch.where(torch.arange(K_)[None] < lengths[:, None], drafts, -1)
    keys = row_keys(0, torch.arange(B))
    counters = torch.zeros(B, dtype=torch.int64)
    uniforms = (row_uniforms(keys, counters, 0, K_), row_uniforms(keys, counters, 1, 1)[:, 0])
    return target, draft, drafts, lengths, uniforms


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_equals_reference_bit_identical(seed):
    target, draft, drafts, lengths, uniforms = _random_batch(seed=seed)
    out = rejection_sample(target, draft, drafts, lengths, uniforms=uniforms)
    ref = rejection_sample_reference(target, draft, drafts, lengths, uniforms=uniforms)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    # and through a generator: same seed, same draws
    out = rejection_sample(target, draft, drafts, lengths, torch.Generator().manual_seed(seed))
    ref = rejection_sample_reference(target, draft, drafts, lengths, torch.Generator().manual_seed(seed))
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_row_output_independent_of_batch_neighbours():
    target, draft, drafts, lengths, (accept_u, sample_u) = _random_batch(seed=4)
    row = 5
    alone = rejection_sample(target[row:row + 1], draft[row:row + 1], drafts[row:row + 1],
                             lengths[row:row + 1], uniforms=(accept_u[row:row + 1], sample_u[row:row + 1]))
    other = _random_batch(seed=5)
    for i, x in enumerate((target, draft, drafts, lengths)):
        other[i][row] = x[row]
    other[4][0][row], other[4][1][row] = accept_u[row], sample_u[row]
    mixed = rejection_sample(*other[:4], uniforms=other[4])
    full = rejection_sample(target, draft, drafts, lengths, uniforms=(accept_u, sample_u))
    for tokens, n in (mixed, full):
        assert torch.equal(tokens[row], alone[0][0]) and n[row] == alone[1][0]


def test_output_structure():
    target, draft, drafts, lengths, uniforms = _random_batch(B=256, seed=6)
    tokens, n = rejection_sample(target, draft, drafts, lengths, uniforms=uniforms)
    assert tokens.dtype == torch.int64 and n.dtype == torch.int64
    assert ((n >= 1) & (n <= lengths + 1)).all()
    pos = torch.arange(tokens.shape[1])[None]
    assert ((tokens >= 0) == (pos < n[:, None])).all()
    assert (tokens[pos >= n[:, None]] == -1).all()
    # everything before the last emitted token is an accepted draft, in order
    kept = pos < (n - 1)[:, None]
    assert torch.equal(tokens[:, :-1][kept[:, :-1]], drafts[kept[:, :-1]])
    # a token the target gives zero mass is never emitted
    emitted_mass = target.gather(-1, tokens.clamp(min=0)[..., None]).squeeze(-1)
    final_mass = emitted_mass.gather(1, (n - 1)[:, None])
    assert (final_mass > 0).all()


def test_temperature_zero_is_greedy_for_any_uniforms():
    """One-hot target and draft: keep drafts while they equal the target argmax, then emit the
    target argmax; the uniforms do not matter."""
    target, draft, drafts, lengths, _ = _random_batch(B=60, seed=7)
    greedy = torch.arange(60) % 3 == 0
    target, draft, drafts, lengths = target[greedy], draft[greedy], drafts[greedy], lengths[greedy]
    B, K1 = target.shape[:2]
    argmax = target.argmax(-1)  # [B, K+1]
    expected = torch.full((B, K1), -1, dtype=torch.int64)
    for b in range(B):
        i = 0
        while i < lengths[b] and drafts[b, i] == argmax[b, i]:
            expected[b, i] = argmax[b, i]
            i += 1
        expected[b, i] = argmax[b, i]
    for seed in range(3):
        tokens, n = rejection_sample(target, draft, drafts, lengths, torch.Generator().manual_seed(seed))
        assert torch.equal(tokens, expected)
        assert torch.equal(n, (expected >= 0).sum(1))


def test_residual_without_mass_falls_back_to_target():
    """target ~= draft rounded so that target <= draft everywhere: a rejection is still possible
    in fp32, and the emitted token must have target mass."""
    target = torch.tensor([[[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]]])
    draft = torch.tensor([[[0.0, 0.5000001, 0.5]]])
    drafts = torch.tensor([[1]])
    tokens, n = rejection_sample(target, draft, drafts, torch.tensor([1]),
                                 uniforms=(torch.tensor([[0.9999999999]], dtype=torch.float64),
                                           torch.tensor([0.999], dtype=torch.float64)))
    assert n.item() == 1 and tokens[0, 0].item() in (1, 2)
    ref = rejection_sample_reference(target, draft, drafts, torch.tensor([1]),
                                     uniforms=(torch.tensor([[0.9999999999]], dtype=torch.float64),
                                               torch.tensor([0.999], dtype=torch.float64)))
    assert torch.equal(tokens, ref[0])


def test_acceptance_rate_and_input_errors():
    target = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    draft = torch.tensor([[0.25, 0.25, 0.5], [0.0, 1.0, 0.0]])
    assert torch.allclose(acceptance_rate(target, draft), torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="draft_probs"):
        rejection_sample(torch.rand(2, 3, 5), torch.rand(2, 3, 5), torch.zeros(2, 2, dtype=torch.long),
                         torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="uniforms"):
        rejection_sample(torch.rand(2, 3, 5), torch.rand(2, 2, 5), torch.zeros(2, 2, dtype=torch.long),
                         torch.zeros(2, dtype=torch.long), uniforms=(torch.rand(2, 3), torch.rand(2)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_without_host_sync_and_matches_cpu():
    target, draft, drafts, lengths, uniforms = _random_batch(B=256, seed=8)
    expected = rejection_sample(target, draft, drafts, lengths, uniforms=uniforms)
    on_gpu = [x.cuda() for x in (target, draft, drafts, lengths)]
    gpu_uniforms = tuple(u.cuda() for u in uniforms)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside raises
    try:
        tokens, n = rejection_sample(*on_gpu, uniforms=gpu_uniforms)
        rejection_sample(*on_gpu, torch.Generator(device="cuda").manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(tokens.cpu(), expected[0]) and torch.equal(n.cpu(), expected[1])


def test_inverse_cdf_sample_never_returns_zero_mass_tokens_at_the_extremes():
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0, 0.0], [1e-30, 0.0, 0.0, 0.0, 1.0, 0.0]])
    top = 1.0 - 2.0 ** -54  # the largest uniform row_uniforms returns
    for u, want in ((top, [3, 4]), (2.0 ** -54, [1, 4])):
        got = sample_with_uniforms(probs, torch.full((2,), u, dtype=torch.float64))
        assert got.tolist() == want, (u, got)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = sample_with_uniforms(probs[:1].expand(20000, 6), u)
    assert set(got.tolist()) == {1, 3}
    assert abs((got == 3).double().mean().item() - 0.7) < 0.015


def _big_vocab_dist(V=3 * 1024 + 100):
    """A large vocabulary (two-level inverse CDF) that is not a whole number of blocks: mass on
    the first and last tokens, a block with no mass at all, and a spread of tokens elsewhere."""
    probs = torch.zeros(V, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    where = torch.tensor([0, 5, 1023, 1024, 2500, 3071, 3100, V - 1])  # 1025..2047: an empty stretch
    probs[where] = torch.rand(len(where), generator=gen, dtype=torch.float64) + 0.2
    return (probs / probs.sum()).float(), where


def test_two_level_inverse_cdf_never_returns_zero_mass_tokens_at_the_extremes():
    probs, where = _big_vocab_dist()
    top = 1.0 - 2.0 ** -54  # the largest and smallest uniforms row_uniforms returns
    got = sample_with_uniforms(probs[None].expand(2, -1), torch.tensor([top, 2.0 ** -54], dtype=torch.float64))
    assert got.tolist() == [int(where[-1]), int(where[0])]
    u = torch.rand(50_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert set(sample_with_uniforms(probs[None].expand(len(u), -1), u).tolist()) <= set(where.tolist())


def test_two_level_inverse_cdf_draws_the_distribution():
    """Chi-square on 200k draws over a vocabulary past two blocks, and the draws follow the
    one-level float64 inverse CDF on the same uniforms (they can differ only where a uniform
    falls within float32 rounding of a block's edge)."""
    probs, where = _big_vocab_dist()
    u = torch.rand(N_DRAWS, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = sample_with_uniforms(probs[None].expand(N_DRAWS, -1), u)
    counts = torch.bincount(got, minlength=probs.shape[0])[where].double()
    expected = probs[where].double() * N_DRAWS
    assert counts.sum() == N_DRAWS
    assert stats.chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3
    cdf = probs.double().cumsum(0)
    one_level = torch.searchsorted(cdf, (u * cdf[-1]).clamp(max=float(cdf[-1]) * (1 - 2.0 ** -52)), right=True)
    assert (one_level == got).double().mean() > 0.999
    # a batch [B, K, V] samples each row on its own, as one row at a time does
    batch = torch.stack([probs, probs.flip(0), probs.roll(700)])[None].expand(4, 3, -1)
    u2 = torch.rand(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rows = torch.stack([torch.stack([sample_with_uniforms(batch[b, k][None], u2[b, k][None])[0] for k in range(3)])
                        for b in range(4)])
    assert torch.equal(sample_with_uniforms(batch, u2), rows)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0),
                                                      (0.7, 0, 0.9), (0.0, 0, 1.0)])
def test_sampling_probs_is_the_sampling_distribution(temperature, top_k, top_p):
    from spec_heads.sampling import sampling_logprobs, sampling_probs

    logits = 3 * torch.randn(4, 3, 40, generator=torch.Generator().manual_seed(0))
    probs = sampling_probs(logits, temperature, top_k, top_p)
    expected = sampling_logprobs(logits, temperature, top_k, top_p).exp()
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(probs == 0, expected == 0)  # the same support (top-k / top-p cuts)
