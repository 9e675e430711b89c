"""Ragged verification: a step where row b feeds 1 + d_b tokens. The packed forward equals the
padded one at every real token; with mixed per-row depths speculative sampling stays exact
(greedy equality, a two-sample test against plain sampling) and a row's samples do not depend
on its neighbours' depths."""
import pytest
import torch
from scipy.stats import chi2_contingency

from rollout import engine as engine_mod
from rollout.engine import Engine
from rollout.model import ModelConfig, Transformer
from rollout.types import SamplingParams, SpecParams
from spec_heads.depth import DepthPolicy
from spec_heads.estimators import AcceptanceTable
from spec_heads.heads import DraftHeads, HeadConfig


def _model(vocab=61, hidden=64, layers=2, scale=1.0):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=128, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def _heads(model, kind, noise, depths=3, seed=1):
    torch.manual_seed(seed)
    heads = DraftHeads(HeadConfig(kind=kind, num_depths=depths), model.config)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(noise * torch.randn_like(p))
    return heads


def _prompts(n, seed=1, vocab=61):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(k),), generator=g).tolist() for k in torch.randint(2, 10, (n,), generator=g)]


@pytest.fixture
def row_local_depths(monkeypatch):
    """Every step drafts, and each row's depth follows from its own drafts alone: a draft's
    predicted acceptance is a fixed function of its entropy bin, and a row keeps its drafts
    while their prefix product stays above 0.3. Depths then differ from row to row."""
    depths = []

    def plan(self, rows):
        self.steps += 1
        return self.max_k, self.max_k, False

    def choose(values, cost):
        d = (values > 0.3).sum(1)
        depths.append(d.clone())
        return d

    monkeypatch.setattr(DepthPolicy, "plan_step", plan)
    monkeypatch.setattr(AcceptanceTable, "predict_bins",  # greedy drafts (entropy 0, bin 0) count as sure
                        lambda self, bins: torch.where(bins == 0, 1.0, (bins % 3).float() / 2))
    monkeypatch.setattr(engine_mod, "choose_depths", choose)
    monkeypatch.setattr(Engine, "_probe_costs", lambda self, dp, K: None)  # no cost model needed
    return depths


def test_packed_verify_equals_padded_verify():
    model = _model()
    B, W = 6, 5
    caches = [model.new_cache(B, 64) for _ in range(2)]
    prompt = torch.randint(0, 61, (B, 12))
    n = torch.tensor([1, 5, 2, 3, 1, 4])
    ids = torch.randint(0, 61, (B, W))
    pos = 12 + torch.arange(W).expand(B, W)
    with torch.no_grad():
        for c in caches:
            model(prompt, torch.arange(12).expand(B, 12), c, 32)
        padded = model.logits(model(ids, pos, caches[0], 32))
        packed = model.logits(model(ids, pos, caches[1], 32, n_tokens=n))
    real = torch.arange(W)[None] < n[:, None]
    assert torch.allclose(packed[real], padded[real], atol=1e-5)
    # the cache entries of real tokens match too: later steps read them
    for layer in range(2):
        k0, k1 = caches[0].k[layer][:, 12:12 + W], caches[1].k[layer][:, 12:12 + W]
        assert torch.allclose(k0[real], k1[real], atol=1e-5)


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_greedy_with_mixed_row_depths_equals_greedy(kind, row_local_depths):
    model = _model()
    prompts, sp = _prompts(7), SamplingParams(temperature=0, max_new_tokens=20)
    plain = Engine(model, max_batch=4).generate(prompts, sp)
    out = Engine(model, _heads(model, kind, 0.05), max_batch=4).generate(prompts, sp, SpecParams(mode="entropy", max_k=3))
    assert [s.tokens for s in out.sequences] == [s.tokens for s in plain.sequences]
    d = torch.cat(row_local_depths)
    assert len(set(d.tolist())) >= 3  # the steps really were ragged
    assert sum(out.stats.depth_hist) == out.stats.row_steps


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_a_rows_samples_do_not_depend_on_its_neighbours_depths(kind, row_local_depths):
    model = _model(scale=4.0)  # peaked drafts: entropies, so depths, differ from draft to draft
    heads = _heads(model, kind, 0.05)
    prompts, sp = _prompts(8), SamplingParams(temperature=1.0, max_new_tokens=16)
    spec = SpecParams(mode="entropy", max_k=3)
    a = Engine(model, heads, max_batch=8).generate(prompts, sp, spec, seed=3)
    b = Engine(model, heads, max_batch=3).generate(prompts, sp, spec, seed=3)
    others = _prompts(4, seed=7)
    others[1] = prompts[5]
    c = Engine(model, heads, max_batch=4).generate(others, sp, spec, seed=3, ids=[50, 5, 51, 52])
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert c.sequences[1].tokens == a.sequences[5].tokens
    steps = [set(d.tolist()) for d in row_local_depths if len(d) > 1]
    assert any(len(s) > 1 for s in steps)  # neighbours drafted to other depths within a step


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_mixed_row_depths_sample_exactly_two_sample(kind, row_local_depths, monkeypatch):
    """Speculative sampling with per-row depths gives plain sampling's distribution over the
    first three tokens and their pairs (chi-square two-sample tests). Each draft's predicted
    acceptance is drawn at random here (a choice made without the policy stays exact), so every
    depth 0..3 comes up many times whatever entropy bins the heads' drafts fall in; 5 new
    tokens leave the first decode step room for 3 drafts and the bonus."""
    g = torch.Generator().manual_seed(5)
    monkeypatch.setattr(AcceptanceTable, "predict_bins", lambda self, bins: torch.rand(bins.shape, generator=g))
    model = _model(vocab=8, hidden=32, layers=1, scale=4.0)
    n = 12000
    prompts, sp = [[1, 2, 3]] * n, SamplingParams(temperature=1.0, max_new_tokens=5)
    plain = Engine(model, max_batch=n).generate(prompts, sp, seed=11)
    spec = Engine(model, _heads(model, kind, 0.15, seed=2), max_batch=n).generate(
        prompts, sp, SpecParams(mode="entropy", max_k=3), seed=12)
    assert spec.stats.mean_accepted_len > 1.1  # drafts were accepted (a third of row-steps draft none)
    d = torch.cat(row_local_depths)
    assert all((d == k).sum() > 1000 for k in range(4)), torch.bincount(d)  # every depth 0..3, many times

    def table(key):
        ka, kb = [key(s.tokens) for s in plain.sequences], [key(s.tokens) for s in spec.sequences]
        cells = sorted(set(ka) | set(kb))
        t = torch.zeros(2, len(cells))
        for row, keys in enumerate((ka, kb)):
            for k in keys:
                t[row, cells.index(k)] += 1
        return t[:, t.sum(0) >= 10].numpy()

    for key in (lambda t: t[0], lambda t: t[1], lambda t: t[2], lambda t: (t[0], t[1]), lambda t: (t[1], t[2])):
        assert chi2_contingency(table(key))[1] > 1e-3



def _depths_when_every_step_drafts(monkeypatch, accept: float) -> list[int]:
    """Row-steps by verified depth (of 4) when every step drafts, every draft's predicted
    acceptance is `accept`, and a step's cost is 1 plain, 2 once it drafts at all (the heads'
    first pass, the sampler), plus 0.05 per drafted token per row."""
    from spec_heads.estimators import CostModel

    model = _model()
    heads = _heads(model, "sequential", noise=0.0, depths=4)
    monkeypatch.setattr(DepthPolicy, "plan_step", lambda self, rows: (self.max_k, self.max_k, False))
    monkeypatch.setattr(DepthPolicy, "position_acceptance", lambda self: [accept] * self.max_k)
    monkeypatch.setattr(AcceptanceTable, "predict_bins", lambda self, bins: torch.full(bins.shape, accept))
    monkeypatch.setattr(Engine, "_probe_costs", lambda self, dp, K: None)
    monkeypatch.setattr(CostModel, "curve", lambda self, rows, drafts: torch.cat(
        [torch.ones(1, dtype=torch.float64), 2.0 + 0.05 * torch.arange(1, rows * drafts + 1, dtype=torch.float64) / rows]))
    eng = Engine(model, heads, max_batch=4)
    eng.generate(_prompts(4), SamplingParams(temperature=1.0, max_new_tokens=40), SpecParams(mode="entropy", k=1, max_k=4),
                 seed=3)
    return eng.depth_policy.depth_hist


def test_rows_draft_deep_where_only_the_deeper_drafts_pay_for_the_drafting_step(monkeypatch):
    """One sure draft alone does not repay a drafting step's fixed cost, four do. Each row must
    look past its first draft (the heads' per-position acceptance for the drafts still to come)
    and verify four, not stop at none."""
    hist = _depths_when_every_step_drafts(monkeypatch, 0.95)
    assert hist[4] >= 0.8 * sum(hist), hist  # (short of four only where max_new_tokens leaves no room)


def test_a_drafting_step_verifies_each_draft_worth_its_own_cost(monkeypatch):
    """Once a step drafts, its fixed cost is paid: a row verifies each draft worth more than
    what one more token costs (here its first two of acceptance 0.3, 0.09), not none because the
    first would not have repaid the whole drafting step."""
    hist = _depths_when_every_step_drafts(monkeypatch, 0.3)
    assert hist[2] >= 0.8 * sum(hist), hist
