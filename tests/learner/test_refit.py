"""Fitting draft heads to a frozen policy (learner/refit.py): acceptance rises on held-out
sequences, the trunk never changes, KL warm-up then the final loss, masks and chunking."""
import pytest
import torch

import learner.refit as refit
from learner.refit import HeadFitConfig, batch_loss, collect_sequences, depth_mask, fit_heads
from rollout.engine import Engine
from rollout.model import ModelConfig, Transformer
from rollout.types import SamplingParams
from spec_heads.heads import DraftHeads, HeadConfig

V = 32
KINDS = ["parallel", "sequential"]


def tiny_trunk(seed=0):
    torch.manual_seed(seed)
    mc = ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    trunk = Transformer(mc).eval()
    with torch.no_grad():  # keep the random trunk's logits O(1)
        trunk.embed_tokens.weight.mul_(0.25)
    return mc, trunk


def fresh_heads(kind, mc, K=3, seed=1):
    torch.manual_seed(seed)
    return DraftHeads(HeadConfig(kind, K), mc)


def progressions(n, seed, prompt_len=4):
    """Arithmetic progressions mod V: the future is a function of the prefix, so heads can learn
    to predict the trunk's distributions further ahead."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(n):
        L = int(torch.randint(12, 24, (1,), generator=g))
        x0, d = int(torch.randint(0, V, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        seqs.append([(x0 + d * j) % V for j in range(L)])
    return seqs, [prompt_len] * n


def fit(trunk, heads, steps=60, **kw):
    train, train_lens = progressions(128, seed=0)
    held, held_lens = progressions(32, seed=1)
    args = dict(steps=steps, lr=3e-3, loss="tv", kl_warmup_steps=steps // 3, micro_batch_size=16,
                prompt_lens=train_lens, eval_sequences=held, eval_prompt_lens=held_lens,
                generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return fit_heads(trunk, heads, train, **args)


@pytest.mark.parametrize("kind", KINDS)
def test_fit_raises_held_out_acceptance(kind):
    mc, trunk = tiny_trunk()
    metrics = fit(trunk, fresh_heads(kind, mc), steps=60 if kind == "parallel" else 30)
    before, after = metrics["acceptance_before"], metrics["acceptance_after"]
    assert len(before) == len(after) == 3
    assert before[0] < 0.1  # a fresh head is the trunk's next-token head: wrong position
    assert after[0] > before[0] + 0.2
    assert all(a > b + 0.2 for a, b in zip(after, before))
    if kind == "sequential":  # it sees the drafted tokens, so it can match almost exactly
        assert min(after) > 0.9


@pytest.mark.parametrize("kind", KINDS)
def test_trunk_is_frozen(kind):
    mc, trunk = tiny_trunk()
    heads = fresh_heads(kind, mc)
    trunk_before = {k: v.clone() for k, v in trunk.state_dict().items()}
    heads_before = {k: v.clone() for k, v in heads.state_dict().items()}
    fit(trunk, heads, steps=4, loss="e2e_tv", kl_warmup_steps=2)
    for name, p in trunk.named_parameters():
        assert torch.equal(p, trunk_before[name]), name
        assert p.grad is None, name
    assert all(p.requires_grad for p in trunk.parameters())  # flags left as they were
    changed = [k for k, v in heads.state_dict().items() if not torch.equal(v, heads_before[k])]
    assert changed  # the heads did move


def test_kl_warmup_then_final_loss():
    mc, trunk = tiny_trunk()
    records = []
    metrics = fit(trunk, fresh_heads("parallel", mc), steps=6, kl_warmup_steps=3, loss="e2e_tv",
                  eval_every=1, log_fn=records.append)
    assert [r["loss_name"] for r in records] == ["kl"] * 3 + ["e2e_tv"] * 3
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert metrics["loss_names"] == ["kl"] * 3 + ["e2e_tv"] * 3
    assert all(len(r["acceptance"]) == 3 for r in records)
    assert metrics["acceptance_after"] == records[-1]["acceptance"]


def test_depth_mask_counts_completion_positions_only():
    # length 8, prompt of 3 tokens -> first start 2; depth i valid while t + 1 + i <= 7
    mask = depth_mask(torch.tensor([8]), torch.tensor([2]), K=2, T=10)[0]
    assert mask[0].nonzero().flatten().tolist() == [2, 3, 4, 5]
    assert mask[1].nonzero().flatten().tolist() == [2, 3, 4]


def _padded_batch(trunk, fill_seed, K=3):
    seqs, lens = progressions(4, seed=5)
    T = max(map(len, seqs)) + 3
    g = torch.Generator().manual_seed(fill_seed)
    tokens = torch.randint(0, V, (len(seqs), T), generator=g)  # garbage in the padding
    for b, s in enumerate(seqs):
        tokens[b, :len(s)] = torch.tensor(s)
    with torch.no_grad():
        hidden = trunk(tokens)
    mask = depth_mask(torch.tensor([len(s) for s in seqs]), torch.tensor(lens) - 1, K, T)
    return hidden, tokens, mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loss", ["tv", "e2e_tv", "kl", "ce"])
def test_padding_contributes_nothing(kind, loss):
    mc, trunk = tiny_trunk()
    heads = fresh_heads(kind, mc)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.1 * torch.randn_like(p))
    values, grads = [], []
    for fill_seed in (1, 2):
        heads.zero_grad(set_to_none=True)
        values.append(batch_loss(heads, trunk, *_padded_batch(trunk, fill_seed), loss, 1.0, backward=True))
        grads.append([p.grad.clone() for p in heads.parameters()])
    assert values[0] == pytest.approx(values[1], abs=1e-6)
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("loss", ["tv", "e2e_tv"])
def test_chunked_lm_head_equals_unchunked(kind, loss, monkeypatch):
    mc, trunk = tiny_trunk()
    heads = fresh_heads(kind, mc)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = _padded_batch(trunk, 1)
    results = []
    for chunk in (refit.CHUNK_ELEMENTS, 4 * 3 * V * 2):  # whole sequence, then 2 positions a chunk
        monkeypatch.setattr(refit, "CHUNK_ELEMENTS", chunk)
        heads.zero_grad(set_to_none=True)
        value = batch_loss(heads, trunk, *batch, loss, 0.7, backward=True)
        results.append((value, [p.grad.clone() for p in heads.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for g0, g1 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_acceptance_matches_hand_alignment(temperature):
    """Depth i at start t is scored against the trunk's distribution at t+i (heads.py's
    alignment), computed here independently; at temperature 0 that is argmax agreement."""
    from learner.refit import acceptance_sums
    from spec_heads.losses import per_depth_acceptance
    from spec_heads.sampling import sampling_probs

    mc, trunk = tiny_trunk()
    heads = fresh_heads("sequential", mc)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hidden, tokens, mask = _padded_batch(trunk, 1)
    K, T = mask.shape[1], mask.shape[2]
    with torch.no_grad():
        draft_logits = heads.train_logits(hidden, tokens, trunk.embed_tokens, trunk.logits)  # [B, K, T, V]
        trunk_logits = trunk.logits(hidden)  # [B, T, V]
    target_logits = torch.zeros_like(draft_logits)
    for i in range(1, K + 1):
        target_logits[:, i - 1, :T - i] = trunk_logits[:, i:]
    if temperature == 0:
        agree = (draft_logits.argmax(-1) == target_logits.argmax(-1)).float()  # [B, K, T]
        expected = (agree * mask).sum((0, 2)) / mask.sum((0, 2))
    else:
        expected = per_depth_acceptance(sampling_probs(target_logits, temperature),
                                        draft_logits / temperature, mask)
    sums, counts = acceptance_sums(heads, trunk, hidden, tokens, mask, temperature)
    torch.testing.assert_close((sums / counts).float(), expected.float(), atol=1e-5, rtol=1e-5)


def test_greedy_fit_raises_argmax_agreement():
    mc, trunk = tiny_trunk()
    metrics = fit(trunk, fresh_heads("sequential", mc), steps=20, temperature=0.0)
    assert metrics["acceptance_after"][0] > metrics["acceptance_before"][0] + 0.3


def test_collect_sequences_returns_prompt_plus_completion():
    mc, trunk = tiny_trunk()
    prompts = [[1, 2, 3], [4, 5]]
    seqs, lens = collect_sequences(Engine(trunk, None, max_batch=4), prompts,
                                   SamplingParams(temperature=5.0, max_new_tokens=5), n=5, seed=0)
    assert lens == [3, 2, 3, 2, 3]
    assert [s[:n] for s, n in zip(seqs, lens)] == [prompts[i % 2] for i in range(5)]
    assert all(len(s) == n + 5 for s, n in zip(seqs, lens))
    assert seqs[0] != seqs[2] or seqs[2] != seqs[4]  # a repeated prompt gets its own stream


@pytest.mark.parametrize("field, value", [("num_sequences", 1), ("holdout", 1.0), ("steps", 0), ("lr", 0.0),
                                          ("loss", "mse"), ("kl_warmup_steps", 601),
                                          ("micro_batch_size", 0), ("eval_every", -1), ("temperature", -0.5)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        HeadFitConfig(**{field: value})


@pytest.mark.parametrize("kind", KINDS)
def test_tv_with_a_draft_vocabulary_is_one_minus_the_served_acceptance(kind):
    """With a draft vocabulary the TV loss compares the drafts the engine serves (softmax over
    the vocabulary's rows, zero elsewhere): its value is 1 - the acceptance acceptance_sums
    measures with the restricted drafts, and a restricted and an unrestricted fit differ."""
    from learner.refit import acceptance_sums

    mc, trunk = tiny_trunk()
    heads = DraftHeads(HeadConfig(kind, 3, draft_vocab=8), mc)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.1 * torch.randn_like(p))
    heads.set_draft_vocab([list(range(0, V, 4))])  # 8 tokens
    batch = _padded_batch(trunk, 1)
    loss = batch_loss(heads, trunk, *batch, "tv", 0.7, backward=True)
    sums, counts = acceptance_sums(heads, trunk, *batch, 0.7)
    assert loss == pytest.approx(1.0 - float(sums.sum() / counts.sum()), abs=1e-6)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters() if p.requires_grad)
    full = DraftHeads(HeadConfig(kind, 3), mc)
    full.load_state_dict({k: v for k, v in heads.state_dict().items() if k in full.state_dict()})
    assert abs(batch_loss(full, trunk, *batch, "tv", 0.7) - loss) > 1e-3  # the same weights, served otherwise


@pytest.mark.parametrize("kind", KINDS)
def test_kl_with_a_draft_vocabulary_fits_the_served_draft_to_the_renormalised_target(kind):
    """With a draft vocabulary the KL warm-up compares the served draft (softmax over the
    vocabulary's rows) with the policy's distribution renormalised over those rows: the loss is
    that KL computed by hand, finite although the draft is zero off the vocabulary, and it
    trains the heads."""
    from spec_heads.sampling import sampling_probs

    mc, trunk = tiny_trunk()
    heads = DraftHeads(HeadConfig(kind, 3, draft_vocab=8), mc)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = list(range(1, V, 4))  # 8 tokens
    heads.set_draft_vocab([ids])
    hidden, tokens, mask = _padded_batch(trunk, 1)
    loss = batch_loss(heads, trunk, hidden, tokens, mask, "kl", 0.7, backward=True)

    with torch.no_grad():
        feats = heads.train_features(hidden, tokens, trunk.embed_tokens, depths=3)  # [B, K, T, H]
        draft = (trunk.lm_head(feats).float()[..., ids] / 0.7).log_softmax(-1)
        target = sampling_probs(trunk.lm_head(hidden).float(), 0.7)[..., ids]  # [B, T, N]
        terms = []
        for b, i, t in mask.nonzero().tolist():  # depth i at start t targets position t + 1 + i
            q = target[b, t + 1 + i] / target[b, t + 1 + i].sum()
            terms.append(float((q * (q.log() - draft[b, i, t])).sum()))
    assert loss == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in heads.parameters() if p.requires_grad)
