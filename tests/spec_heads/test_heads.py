"""Draft heads: inference-style drafting (begin/step over a head KV cache with rollback) equals
teacher-forced training (train_logits), plus structure, checkpoints and batch independence."""
import math

import pytest
import torch

from rollout.model import ModelConfig, Transformer
from spec_heads.heads import DraftHeads, HeadConfig

KINDS = ["parallel", "sequential"]


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    mc = ModelConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **kw)
    trunk = Transformer(mc).eval()
    with torch.no_grad():  # N(0, 1) tied embeddings give logits of std ~18; keep them O(1)
        trunk.embed_tokens.weight.mul_(0.25)
    return mc, trunk


def random_heads(kind, mc, num_depths=4, seed=1):
    """Heads with every parameter perturbed, so no depth is the identity and norms matter."""
    torch.manual_seed(seed)
    heads = DraftHeads(HeadConfig(kind, num_depths), mc)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return heads.eval()


def pad_rows(rows, fill=0):
    T = max(len(r) for r in rows)
    return torch.tensor([list(r) + [fill] * (T - len(r)) for r in rows])


@torch.no_grad()
def draft_along_path(trunk, heads, seq, prompt_lens, rounds, slots):
    """Simulate the engine: prefill, then rounds of (draft k, verify, accept a_b per row).

    Drafts are the true tokens up to each row's accepted count and wrong tokens after it, so
    the trunk's and the head's caches hold rejected entries that must be forgotten. Returns
    {(row, depth, start): logits} for every draft drafted along the true path.
    """
    B = seq.shape[0]
    V = trunk.config.vocab_size
    emb, lmh = trunk.embed_tokens, trunk.logits
    trunk_cache = trunk.new_cache(B, 64)
    head_cache = heads.new_cache(6, 64)
    if head_cache is not None:  # stale garbage from an earlier occupant must never be read
        head_cache.k[0].normal_()
        head_cache.v[0].normal_()
    # Prefill: trunk over each row's prompt, head begins over all prompt positions.
    fed = [list(range(n)) for n in prompt_lens]  # absolute positions fed this call
    accepted = [n - 1 for n in prompt_lens]  # last_index per row
    out = {}
    for r, (k, accept) in enumerate([(None, None)] + rounds):
        if k is not None:  # verify: feed x_{p+1}, d_1..d_k at positions p+1..p+1+k
            fed = [list(range(p[b] + 1, p[b] + 2 + k)) for b in range(B)]
            accepted = accept
        pos = pad_rows(fed)  # [B, T]
        T = pos.shape[1]
        for b in range(B):  # padding continues the row's positions (the trunk needs valid ones)
            pos[b, len(fed[b]):] = fed[b][-1] + 1 + torch.arange(T - len(fed[b]))
        ids = torch.stack([seq[b, pos[b]] for b in range(B)])  # [B, T]
        if k is not None:  # rejected drafts are wrong tokens
            for b in range(B):
                for t in range(accepted[b] + 1, T):
                    ids[b, t] = (seq[b, pos[b, t]] + 1 + t) % V
        hidden = trunk(ids, pos, trunk_cache)
        next_tokens = torch.stack([seq[b, pos[b] + 1] for b in range(B)])
        last = torch.tensor(accepted)
        head_pos = pos.clone()
        if r % 2:  # the padding convention must not matter: zero padding positions
            for b in range(B):
                head_pos[b, last[b] + 1:] = 0
        logits, state = heads.begin(hidden, next_tokens, head_pos, last, emb, lmh,
                                    head_cache, None, slots)
        p = [int(pos[b, last[b]]) for b in range(B)]
        k_next = rounds[r][0] if r < len(rounds) else heads.num_depths
        next_accept = rounds[r][1] if r < len(rounds) else [k_next] * B
        for depth in range(1, k_next + 1):
            for b in range(B):
                if depth <= next_accept[b] + 1:  # drafted from true tokens only
                    out[(b, depth, p[b])] = logits[b]
            if depth == k_next:
                break
            true_tok = seq[torch.arange(B), torch.tensor(p) + 1 + depth]
            wrong = (true_tok + 7) % V
            tok = torch.where(torch.tensor(next_accept) >= depth, true_tok, wrong)
            logits, state = heads.step(state, tok, emb, lmh)
        if k_next == heads.num_depths:
            with pytest.raises(ValueError, match="num_depths"):
                heads.step(state, tok, emb, lmh)
    return out


@pytest.mark.parametrize("kind, arch", [("parallel", {}), ("sequential", {}), ("sequential", {"attention_bias": True}),
                                        ("sequential", {"qk_norm": True, "attention_bias": True})])
def test_inference_drafts_equal_train_logits(kind, arch):
    mc, trunk = tiny(**arch)
    heads = random_heads(kind, mc)
    torch.manual_seed(2)
    B, L = 3, 40
    seq = torch.randint(0, mc.vocab_size, (B, L))
    # (draft depth k, accepted count per row); a=0 after a depth-3 chain leaves a stale
    # chain entry that the next begin/step must overwrite before it is read.
    rounds = [(3, [3, 0, 1]), (4, [0, 2, 4]), (2, [1, 0, 2]), (3, [0, 3, 1])]
    got = draft_along_path(trunk, heads, seq, [5, 8, 3], rounds, slots=torch.tensor([4, 0, 2]))
    with torch.no_grad():
        want = heads.train_logits(trunk(seq), seq, trunk.embed_tokens, trunk.logits)  # [B, K, L, V]
    assert want.shape == (B, 4, L, mc.vocab_size)
    depths_seen = {d for (_, d, _) in got}
    assert depths_seen == {1, 2, 3, 4} and len(got) > 30
    for (b, depth, start), logits in got.items():
        assert start + depth <= L - 1
        torch.testing.assert_close(logits, want[b, depth - 1, start], atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"row {b} depth {depth} start {start}: {m}")


@pytest.mark.parametrize("kind", KINDS)
def test_train_depths_is_a_prefix_and_trains_every_parameter(kind):
    mc, trunk = tiny()
    heads = random_heads(kind, mc)
    seq = torch.randint(0, mc.vocab_size, (2, 12))
    with torch.no_grad():
        hidden = trunk(seq)
    full = heads.train_logits(hidden, seq, trunk.embed_tokens, trunk.logits)  # [B, 4, T, V]
    two = heads.train_logits(hidden, seq, trunk.embed_tokens, trunk.logits, depths=2)
    torch.testing.assert_close(two, full[:, :2], atol=0, rtol=0)
    full.logsumexp(-1).sum().backward()
    for name, p in heads.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="depths"):
        heads.train_logits(hidden, seq, trunk.embed_tokens, trunk.logits, depths=5)


def test_fresh_parallel_heads_equal_trunk_head():
    mc, trunk = tiny()
    heads = DraftHeads(HeadConfig("parallel", 3), mc)
    torch.manual_seed(3)
    seq = torch.randint(0, mc.vocab_size, (2, 7))
    with torch.no_grad():
        hidden = trunk(seq)
        last = torch.tensor([6, 3])
        logits, state = heads.begin(hidden, seq, torch.arange(7).expand(2, 7), last,
                                    trunk.embed_tokens, trunk.logits)
        trunk_logits = trunk.logits(hidden[torch.arange(2), last])
        assert torch.equal(logits, trunk_logits)
        logits2, _ = heads.step(state, seq[:, 0], trunk.embed_tokens, trunk.logits)
        assert torch.equal(logits2, trunk_logits)
        train = heads.train_logits(hidden, seq, trunk.embed_tokens, trunk.logits)
    for i in range(3):
        assert torch.equal(train[:, i], trunk.logits(hidden))


def test_parallel_depths_hold_distinct_parameters():
    mc, _ = tiny()
    heads = DraftHeads(HeadConfig("parallel", 4), mc)
    params = list(heads.parameters())
    assert len({id(p) for p in params}) == len(params)
    assert len({p.data_ptr() for p in params}) == len(params)
    per_depth = [sum(p.numel() for p in blk.parameters()) for blk in heads.blocks]
    one = sum(p.numel() for p in DraftHeads(HeadConfig("parallel", 1), mc).parameters())
    assert per_depth == [one] * 4
    assert sum(p.numel() for p in params) == 4 * one
    # The sequential head is ONE module applied recursively: its size does not grow with depth.
    seq_sizes = {sum(p.numel() for p in DraftHeads(HeadConfig("sequential", k), mc).parameters())
                 for k in (1, 4)}
    assert len(seq_sizes) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, tmp_path):
    mc, trunk = tiny()
    heads = random_heads(kind, mc)
    heads.save(tmp_path / "h", policy_version=7, extra={"loss": "tv"})
    loaded, version = DraftHeads.load(tmp_path / "h", mc)
    assert version == 7 and loaded.kind == kind and loaded.num_depths == 4
    seq = torch.randint(0, mc.vocab_size, (2, 9))
    with torch.no_grad():
        hidden = trunk(seq)
        a = heads.train_logits(hidden, seq, trunk.embed_tokens, trunk.logits)
        b = loaded.train_logits(hidden, seq, trunk.embed_tokens, trunk.logits)
    assert torch.equal(a, b)
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["heads.safetensors",
                                                                  "heads_config.json"]
    for field, value in (("hidden_size", 32), ("vocab_size", 60)):
        kw = dict(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
        kw[field] = value
        with pytest.raises(ValueError) as err:
            DraftHeads.load(tmp_path / "h", ModelConfig(**kw))
        msg = str(err.value)
        assert f"{field}={kw[field]}" in msg and f"{field}={64 if field == 'hidden_size' else 50}" in msg
        assert "fit-heads" in msg


@pytest.mark.parametrize("kind", KINDS)
def test_batch_independence(kind):
    mc, trunk = tiny()
    heads = random_heads(kind, mc)
    torch.manual_seed(4)
    B, T = 3, 6
    hidden = torch.randn(B, T, mc.hidden_size)
    tokens = torch.randint(0, mc.vocab_size, (B, T))
    positions = torch.arange(T).expand(B, T) + torch.tensor([[0], [3], [1]])
    last = torch.tensor([5, 2, 4])

    @torch.no_grad()
    def run(hidden, tokens, last):
        cache = heads.new_cache(B, 32)
        logits, state = heads.begin(hidden, tokens, positions, last, trunk.embed_tokens,
                                    trunk.logits, cache, None, torch.tensor([2, 0, 1]))
        outs = [logits]
        for d in range(2):
            logits, state = heads.step(state, tokens[:, d], trunk.embed_tokens, trunk.logits)
            outs.append(logits)
        return torch.stack(outs, 1)  # [B, 3, V]

    base = run(hidden, tokens, last)
    hidden2, tokens2 = hidden.clone(), tokens.clone()
    hidden2[1] = torch.randn(T, mc.hidden_size)
    tokens2[1] = torch.randint(0, mc.vocab_size, (T,))
    changed = run(hidden2, tokens2, torch.tensor([5, 5, 4]))
    torch.testing.assert_close(changed[[0, 2]], base[[0, 2]], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(changed[1], base[1])


def test_sequential_begin_needs_its_cache():
    mc, trunk = tiny()
    heads = DraftHeads(HeadConfig("sequential", 2), mc)
    with pytest.raises(ValueError, match="cache"):
        heads.begin(torch.randn(1, 2, 64), torch.zeros(1, 2, dtype=torch.long),
                    torch.arange(2)[None], torch.tensor([1]), trunk.embed_tokens, trunk.logits)


@pytest.mark.parametrize("kw, field", [({"num_depths": 0}, "num_depths"),
                                       ({"num_depths": 9}, "num_depths"),
                                       ({"kind": "medusa"}, "kind")])
def test_head_config_validation(kw, field):
    with pytest.raises(ValueError) as err:
        HeadConfig(**kw)
    assert str(err.value).startswith(f"{field}:")


def test_parallel_all_logits_equal_depth_by_depth():
    mc, trunk = tiny()
    heads = random_heads("parallel", mc)
    seq = torch.randint(0, mc.vocab_size, (3, 9))
    with torch.no_grad():
        h = trunk(seq)
        logits, state = heads.begin(h, seq, torch.arange(9).expand(3, 9), torch.tensor([8, 4, 6]),
                                    trunk.embed_tokens, trunk.logits)
        every = heads.all_logits(state, trunk.logits)  # [B, K, V]
        assert every.shape == (3, heads.num_depths, mc.vocab_size)
        torch.testing.assert_close(every[:, 0], logits)
        for d in range(1, heads.num_depths):
            logits, state = heads.step(state, logits.argmax(-1), trunk.embed_tokens, trunk.logits)
            torch.testing.assert_close(every[:, d], logits)
        torch.testing.assert_close(heads.all_logits(state, trunk.logits, depths=2), every[:, :2])
    with pytest.raises(ValueError, match="parallel"):
        random_heads("sequential", mc).all_logits(state, trunk.logits)


def test_sequential_floor_hides_head_cache_entries_below_it():
    """Entries below a row's floor are never read: garbage there changes no draft."""
    mc, trunk = tiny()
    heads = random_heads("sequential", mc)
    seq = torch.randint(0, mc.vocab_size, (2, 31))
    pos, last = torch.arange(20, 30).expand(2, 10), torch.tensor([8, 9])
    with torch.no_grad():
        h = trunk(seq)

        def drafts(fill, floor):
            cache = heads.new_cache(2, 64)  # positions 20..29 write head entries 21..30
            cache.k[0].fill_(fill)
            cache.v[0].fill_(fill)
            logits, st = heads.begin(h[:, 20:30], seq[:, 21:31], pos, last, trunk.embed_tokens,
                                     trunk.logits, cache, 48, floor=floor)
            out = [logits]
            for _ in range(heads.num_depths - 1):
                logits, st = heads.step(st, logits.argmax(-1), trunk.embed_tokens, trunk.logits)
                out.append(logits)
            return torch.stack(out, 1)

        floor = torch.tensor([21, 21])
        torch.testing.assert_close(drafts(0.0, floor), drafts(50.0, floor))
        # without the floor (or with one below the entries written) the stale entries are read
        assert not torch.allclose(drafts(0.0, None), drafts(50.0, None))
        assert not torch.allclose(drafts(0.0, torch.tensor([15, 21])), drafts(50.0, torch.tensor([15, 21])))


@torch.no_grad()
def test_prefill_writes_the_head_cache_that_begin_writes():
    mc, trunk = tiny()
    heads = random_heads("sequential", mc)
    seq = torch.randint(0, 50, (2, 13))
    hidden = trunk(seq[:, :12])
    pos, last = torch.arange(12).expand(2, 12), torch.tensor([11, 7])
    by_begin, by_prefill = heads.new_cache(2, 64), heads.new_cache(2, 64)
    heads.begin(hidden, seq[:, 1:], pos, last, trunk.embed_tokens, trunk.logits, by_begin, 32)
    heads.prefill(hidden, seq[:, 1:], pos, last, trunk.embed_tokens, by_prefill, 32)
    assert torch.equal(by_begin.k[0], by_prefill.k[0]) and torch.equal(by_begin.v[0], by_prefill.v[0])
    written = by_prefill.k[0].abs().sum((-1, -2)) > 0  # [B, positions]: entries at p + 1
    assert written[0, 1:13].all() and written[1, 1:9].all() and not written[:, 13:-1].any()
    assert random_heads("parallel", mc).prefill(hidden, seq[:, 1:], pos, last, trunk.embed_tokens) is None


@torch.no_grad()
def test_fuse_tokens_equals_fuse_and_follows_weight_updates():
    mc, trunk = tiny()
    heads = random_heads("sequential", mc)
    mtp, emb = heads.mtp, trunk.embed_tokens
    g, tok = torch.randn(3, 5, 64), torch.randint(0, 50, (3, 5))

    def check():
        torch.testing.assert_close(mtp.fuse_tokens(g, tok, emb), mtp.fuse(g, emb(tok)), rtol=1e-5, atol=1e-5)

    check()
    # in-place updates (load_state_dict, an optimizer step) must rebuild the cached table
    for update in (lambda: emb.weight.mul_(2.0), lambda: mtp.proj.weight.add_(0.1),
                   lambda: mtp.norm_e.weight.mul_(0.5), lambda: mtp.norm_h.weight.mul_(3.0),
                   lambda: heads.load_state_dict(random_heads("sequential", mc, seed=7).state_dict())):
        update()
        check()
    # and so must another embedding (a new policy)
    emb = nn_embedding_like(emb)
    check()
    # the table is a cache, not state: heads with one still pickle and copy
    import copy
    import pickle
    clone = pickle.loads(pickle.dumps(heads))
    torch.testing.assert_close(clone.mtp.fuse_tokens(g, tok, emb), mtp.fuse_tokens(g, tok, emb))
    assert copy.deepcopy(heads).mtp.fuse_tokens(g, tok, emb).shape == g.shape


def test_fuse_tokens_after_inference_mode_still_trains():
    """A table built under inference mode (a rollout) must not break a later call with autograd
    on (the cost probe after a head fit in the same process died with 'Inference tensors cannot
    be saved for backward'): with grad enabled fuse_tokens is fuse, gradients included."""
    mc, trunk = tiny()
    heads = random_heads("sequential", mc)
    mtp, emb = heads.mtp, trunk.embed_tokens
    g, tok = torch.randn(3, 5, 64), torch.randint(0, 50, (3, 5))
    with torch.inference_mode():
        mtp.fuse_tokens(g, tok, emb)
    out = mtp.fuse_tokens(g, tok, emb)
    torch.testing.assert_close(out, mtp.fuse(g, emb(tok)))
    out.sum().backward()
    assert mtp.proj.weight.grad is not None and mtp.proj.weight.grad.abs().sum() > 0


def nn_embedding_like(emb):
    other = torch.nn.Embedding(*emb.weight.shape)
    other.weight.normal_()
    return other


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6])
def test_cpu_linear_pads_rows_as_the_table_says(rows, monkeypatch):
    """spec_heads.layers.Linear multiplies `rows` rows as the padding table says on a CPU (here
    2 or 3 as 4, what MKL on an AMD EPYC wanted): same values and gradients as nn.Linear."""
    import torch.nn.functional as F

    from spec_heads import layers

    torch.manual_seed(0)
    lin = layers.Linear(8, 5)
    ref = torch.nn.Linear(8, 5)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(rows, 1, 8, requires_grad=True)
    seen = []
    linear = F.linear
    monkeypatch.setattr(layers.F, "linear", lambda a, w, b=None: (seen.append(a.shape[0]), linear(a, w, b))[1])
    table = layers.row_padding_table({2: 4, 3: 4, 4: 4})
    assert table == {None: {2: 4, 3: 4}}
    with layers.use_cpu_kernels(layers.CpuKernels(row_pad=table)):
        out = lin(x)
    assert seen == [4 if rows in (2, 3) else rows]
    assert out.shape == (rows, 1, 5)
    torch.testing.assert_close(out, ref(x), atol=1e-6, rtol=1e-6)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(grad, torch.autograd.grad(ref(x).square().sum(), x)[0], atol=1e-6, rtol=1e-6)
    seen.clear()
    lin(x)  # outside an engine's block (the learner's forward): no padding
    assert seen == [rows]
    with pytest.raises(ValueError, match="table"):
        layers.row_padding_table({3: 2})


def test_row_padding_follows_the_measured_times():
    """Each row count goes to the fastest row count at or above it, where that is >= 5% faster:
    the AMD EPYC's MKL (2-3 rows as that many matrix-vector products) pads 2 and 3 to 4; the
    Xeon's (1-3 rows cheap, a jump at 4) pads nothing; noise within 5% pads nothing."""
    from spec_heads.layers import padding_from_times

    epyc = {1: 9.4, 2: 20.0, 3: 32.0, 4: 16.0, 5: 18.0, 6: 20.0, 7: 22.0, 8: 24.0}
    assert padding_from_times(epyc) == {2: 4, 3: 4}
    xeon = {1: 23.4, 2: 25.3, 3: 27.5, 4: 41.9, 5: 45.5, 6: 50.7, 7: 53.0, 8: 55.6}
    assert padding_from_times(xeon) == {}
    assert padding_from_times({1: 10.0, 2: 10.4, 3: 10.0}) == {}
    assert padding_from_times({1: 10.0, 2: 30.0, 3: 12.0, 4: 11.0}) == {2: 4, 3: 4}
    # padding's own cost counts against it (the tiny policy's 352x128
    # matrices: 7 rows 25 us, 8 rows 20.5 us, the zero rows, cat and slice ~5 us a matrix)
    tiny = {6: 19.0, 7: 25.0, 8: 20.5}
    assert padding_from_times(tiny) == {7: 8}
    assert padding_from_times(tiny, overhead=5.0) == {}
    assert padding_from_times(epyc, overhead=2.0) == {2: 4, 3: 4}
    assert padding_from_times(epyc, overhead=9.0) == {3: 4}


def test_row_padding_is_per_weight_shape(monkeypatch):
    """Calibration times each weight shape on its own and pads each as its own times ask
    (e.g. MLP matrices fastest at 6 rows, the LM head at 4 or 8), and a Linear pads
    by its weight's shape; a shape the table leaves out is not padded."""
    import torch.nn.functional as F

    from spec_heads import layers

    costs = {(6, 4): {1: 1.0, 2: 1.6, 3: 1.9, 4: 1.3, 5: 1.1, 6: 1.0},
             (9, 4): {1: 1.0, 2: 2.3, 3: 3.3, 4: 1.7, 5: 1.7, 6: 2.7},
             (3, 4): {1: 1.0, 2: 1.02, 3: 1.03, 4: 1.2, 5: 1.3, 6: 1.4}}
    clock = [0.0]
    monkeypatch.setattr(layers.time, "perf_counter", lambda: clock[0])
    linear = F.linear

    def fake(x, w, b=None):
        clock[0] += costs[tuple(w.shape)][x.shape[0]]
        return linear(x, w, b)

    monkeypatch.setattr(layers.F, "linear", fake)
    weights = [torch.randn(6, 4), torch.randn(6, 4), torch.randn(9, 4), torch.randn(3, 4)]
    table = layers.calibrate_cpu_row_padding(weights, max_rows=6)
    assert table == {(6, 4): {2: 6, 3: 6, 4: 6, 5: 6}, (9, 4): {2: 4, 3: 4}}
    monkeypatch.setattr(layers.F, "linear", linear)
    assert layers.row_padding_table(table) == table
    seen = []
    monkeypatch.setattr(layers.F, "linear", lambda a, w, b=None: (seen.append((tuple(w.shape), a.shape[0])), linear(a, w, b))[1])
    x = torch.randn(3, 4)
    for shape in costs:
        lin = layers.Linear(4, shape[0])
        with layers.use_cpu_kernels(layers.CpuKernels(row_pad=table)):
            torch.testing.assert_close(lin(x), linear(x, lin.weight, lin.bias))
    assert seen == [((6, 4), 6), ((9, 4), 4), ((3, 4), 3)]
    with pytest.raises(ValueError, match="table"):
        layers.row_padding_table({(6, 4): {3: 2}})


def test_row_padding_calibration_counts_what_padding_costs(monkeypatch):
    """Calibration times padding's own ops (zero rows, cat, slice) and pads only where the
    product's saving outweighs them: the tiny policy's 7-token verify on the EPYC was 10% slower
    with 7 rows padded to 8 in every Linear, each saving 2-3 us and costing ~5 us."""
    import torch.nn.functional as F

    from spec_heads import layers

    costs = {1: 1.0, 2: 3.0, 3: 3.2, 4: 2.0}  # per matrix; 2 and 3 rows pad to 4 when padding is free
    clock = [0.0]
    monkeypatch.setattr(layers.time, "perf_counter", lambda: clock[0])
    linear, cat = F.linear, torch.cat

    def fake(x, w, b=None):
        clock[0] += costs[x.shape[0]]
        return linear(x, w, b)

    def slow_cat(tensors, *a, **kw):
        clock[0] += pad_cost
        return cat(tensors, *a, **kw)

    monkeypatch.setattr(layers.F, "linear", fake)
    monkeypatch.setattr(layers.torch, "cat", slow_cat)
    weights = [torch.randn(6, 4), torch.randn(6, 4)]
    pad_cost = 0.0
    assert layers.calibrate_cpu_row_padding(weights, max_rows=4) == {(6, 4): {2: 4, 3: 4}}
    pad_cost = 0.6  # per matrix: 2 rows cost 3.0 alone, 2.0 + 0.6 padded; 3 rows 3.2 against 2.6
    assert layers.calibrate_cpu_row_padding(weights, max_rows=4) == {(6, 4): {2: 4, 3: 4}}
    pad_cost = 1.1  # 2 rows: 3.1 padded against 3.0; 3 rows: 3.1 against 3.2, not 5% faster
    assert layers.calibrate_cpu_row_padding(weights, max_rows=4) == {}


def test_engine_calibrates_row_padding_on_the_cpu(monkeypatch):
    """An engine on a CPU times its policy's weights (once per shape set) and keeps the padding
    the times ask for as its own state: other code in the process runs unpadded."""
    from rollout import engine as engine_mod
    from rollout.engine import Engine
    from rollout.model import ModelConfig, Transformer
    from spec_heads import layers

    calls = []
    monkeypatch.setattr(engine_mod, "_ROW_PADDING", {})
    monkeypatch.setattr(engine_mod, "calibrate_cpu_row_padding", lambda ws: (calls.append(len(ws)), {3: 4})[1])
    model = Transformer(ModelConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1))
    a, b = Engine(model, max_batch=2), Engine(model, max_batch=4)
    assert calls == [8]  # q, k, v, o, gate, up, down, LM head; the second engine reuses the table
    assert a.cpu_kernels.row_pad == b.cpu_kernels.row_pad == {None: {3: 4}}
    assert layers._KERNELS.get() is None  # nothing installed process-wide


def test_measured_acceptance_travels_with_the_heads(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    mc, _ = tiny()
    heads = random_heads("sequential", mc, num_depths=3)
    assert heads.measured_acceptance() is None  # unmeasured
    heads.set_measured_acceptance([0.9, 0.8, 1.0 + 1e-7])  # a float sum an ulp past 1 is clamped
    assert heads.measured_acceptance() == pytest.approx([0.9, 0.8, 1.0])
    assert "acceptance" in heads.state_dict()  # so a publish ships it with the weights
    heads.save(tmp_path / "h", policy_version=1)
    loaded, _ = DraftHeads.load(tmp_path / "h", mc)
    assert loaded.measured_acceptance() == pytest.approx([0.9, 0.8, 1.0])
    for bad in ([0.9, 0.8], [0.9, 0.8, 1.5], [-0.2, 0.5, 0.5]):
        with pytest.raises(ValueError, match="one per depth"):
            heads.set_measured_acceptance(bad)
    # heads saved before the buffer existed: fit-heads' held-out record, else unmeasured
    state = load_file(str(tmp_path / "h" / "heads.safetensors"))
    del state["acceptance"]
    save_file(state, str(tmp_path / "h" / "heads.safetensors"))
    assert DraftHeads.load(tmp_path / "h", mc)[0].measured_acceptance() is None
    meta = json.loads((tmp_path / "h" / "heads_config.json").read_text())
    meta["extra"] = {"acceptance_after": [0.7, 0.6, 0.5]}
    (tmp_path / "h" / "heads_config.json").write_text(json.dumps(meta))
    assert DraftHeads.load(tmp_path / "h", mc)[0].measured_acceptance() == pytest.approx([0.7, 0.6, 0.5])


def test_draft_vocabulary_picks_the_most_sampled_tokens_and_restricts_the_logits(tmp_path):
    mc, trunk = tiny()
    heads = DraftHeads(HeadConfig("sequential", 2, draft_vocab=4), mc)
    samples = [[7, 7, 7, 3, 3, 9], [3, 7, 12, 12, 9, 40]]  # 7 x4, 3 x3, 9 x2, 12 x2, 40 x1
    coverage = heads.set_draft_vocab(samples, always=[0])  # stop token 0 never sampled
    assert heads.draft_tokens.tolist() == [0, 3, 7, 9]  # 9 before 12: ties go to the lower id
    assert coverage == pytest.approx(9 / 12)
    h = torch.randn(2, 5, mc.hidden_size)
    with torch.no_grad():
        full, sub = trunk.logits(h), heads.draft_lm_head(trunk.lm_head)(h)
    keep = torch.zeros(mc.vocab_size, dtype=torch.bool)
    keep[[0, 3, 7, 9]] = True
    torch.testing.assert_close(sub[..., keep], full[..., keep])
    assert torch.all(sub[..., ~keep] == -math.inf)
    assert heads.draft_lm_head.__func__(DraftHeads(HeadConfig("sequential", 2), mc), trunk.lm_head) is trunk.lm_head
    # saved and loaded with the heads
    heads.save(tmp_path / "h", policy_version=0)
    loaded, _ = DraftHeads.load(tmp_path / "h", mc)
    assert loaded.config.draft_vocab == 4 and loaded.draft_tokens.tolist() == [0, 3, 7, 9]
    with pytest.raises(ValueError, match="draft_vocab"):
        HeadConfig("sequential", 2, draft_vocab=-1)
    with pytest.raises(ValueError, match="below the policy's vocabulary"):
        DraftHeads(HeadConfig("sequential", 2, draft_vocab=50), mc)
    with pytest.raises(ValueError, match="whole vocabulary"):
        DraftHeads(HeadConfig("sequential", 2), mc).set_draft_vocab(samples)


def test_acceptance_with_a_draft_vocabulary_is_that_of_the_restricted_drafts():
    from learner.refit import measure_acceptance
    from spec_heads.sampling import sampling_probs

    mc, trunk = tiny()
    heads = random_heads("parallel", mc, num_depths=1)
    seqs = [torch.randint(0, mc.vocab_size, (12,), generator=torch.Generator().manual_seed(i)).tolist()
            for i in range(3)]
    small = DraftHeads(HeadConfig("parallel", 1, draft_vocab=10), mc)
    small.load_state_dict({**heads.state_dict(), "draft_tokens": small.draft_tokens})
    small.set_draft_vocab(seqs)
    full_acc = measure_acceptance(trunk, heads, seqs, batch_size=2)[0]
    small_acc = measure_acceptance(trunk, small, seqs, batch_size=2)[0]
    # by hand: draft = softmax over the 10 tokens, target = the trunk one position on
    ids = torch.tensor(seqs)
    with torch.no_grad():
        hidden = trunk(ids)
        feats = small.train_features(hidden, ids, trunk.embed_tokens, depths=1)[:, 0]  # [3, T, H]
        # depth 1 at t drafts token t + 2: the trunk's distribution at t + 1; t + 2 in the sequence
        draft = sampling_probs(small.draft_lm_head(trunk.lm_head)(feats), 1.0)[:, :-2]
        target = sampling_probs(trunk.logits(hidden), 1.0)[:, 1:-1]
    want = torch.minimum(draft, target).sum(-1).mean().item()
    assert small_acc == pytest.approx(want, abs=1e-5)
    assert small_acc != pytest.approx(full_acc, abs=1e-3)


def module_drafts(heads, trunk, hidden, seq, pos, last, cache, slots, packed: bool):
    """begin + every step, through the packed decode weights or (packed=False) the modules;
    returns the logits [B, K, V], the chain's states and the head cache's K/V after."""
    from spec_heads.heads import MTPModule

    orig = MTPModule.packed
    if not packed:
        MTPModule.packed = lambda self, embed, dtype: None
    try:
        logits, st = heads.begin(hidden, seq[:, 1:hidden.shape[1] + 1], pos, last, trunk.embed_tokens,
                                 trunk.logits, cache, 48, slots)
        out, states = [logits], [st]
        for d in range(heads.num_depths - 1):  # drafted tokens: fixed, so both paths draft the same chain
            logits, st = heads.step(st, seq[:, d], trunk.embed_tokens, trunk.logits)
            out.append(logits)
            states.append(st)
    finally:
        MTPModule.packed = orig
    return torch.stack(out, 1), states, cache.buf.clone()


_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA device")])


@torch.no_grad()
@pytest.mark.parametrize("device", ["cpu", _CUDA])
@pytest.mark.parametrize("arch, dtype", [({}, torch.float32), ({"attention_bias": True}, torch.float32),
                                         ({}, torch.bfloat16)])
def test_packed_decode_equals_the_modules(arch, dtype, device):
    """Drafting through the packed weights (norm weights folded into the matrices, q|k|v and
    gate|up as one matrix each, one rotary and one cache write) gives the modules' drafts and
    writes the modules' cache entries, slot by slot, for B rows at their own positions (in
    bf16 to bf16's rounding: folding moves where products round)."""
    mc, trunk = tiny(**arch)
    heads = random_heads("sequential", mc)
    trunk, heads = trunk.to(device, dtype), heads.to(device, dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.05, "atol": 0.25}
    if device == "cuda" and dtype == torch.float32:  # TF32 and another reduction order in the GEMMs
        tol = {"rtol": 1e-3, "atol": 1e-3}
    seq = torch.randint(0, mc.vocab_size, (3, 14)).to(device)
    hidden = trunk(seq[:, :10])
    pos = (torch.arange(10).expand(3, 10) + torch.tensor([[0], [3], [1]])).to(device)
    last, slots = torch.tensor([9, 4, 6], device=device), torch.tensor([5, 0, 2], device=device)
    got, states, buf = module_drafts(heads, trunk, hidden, seq, pos, last, heads.new_cache(6, 64), slots, True)
    want, ref_states, ref_buf = module_drafts(heads, trunk, hidden, seq, pos, last, heads.new_cache(6, 64), slots,
                                              False)
    assert all(s.packed is not None for s in states) and all(s.packed is None for s in ref_states)
    assert got.dtype == dtype and buf.dtype == dtype
    torch.testing.assert_close(got, want, **tol)
    # padding entries all go to the scratch position (the cache's last), where duplicate writes
    # land in no fixed order on a GPU: it is never attended by a valid query
    torch.testing.assert_close(buf[:, :, :-1], ref_buf[:, :, :-1], **tol)
    assert buf.abs().sum() > 0 and not buf[:, [1, 3, 4]].any()  # only the rows' own slots are written


@torch.no_grad()
def test_packed_decode_weights_follow_weight_updates():
    """The packed weights are a cache: any in-place update of a weight they fold in (an
    optimizer step, load_state_dict) or of the policy's embedding rebuilds them."""
    mc, trunk = tiny()
    heads = random_heads("sequential", mc)
    mtp = heads.mtp
    seq = torch.randint(0, mc.vocab_size, (2, 12))
    hidden = trunk(seq[:, :8])
    pos, last = torch.arange(8).expand(2, 8), torch.tensor([7, 5])

    def check():
        got = module_drafts(heads, trunk, hidden, seq, pos, last, heads.new_cache(2, 64), None, True)[0]
        want = module_drafts(heads, trunk, hidden, seq, pos, last, heads.new_cache(2, 64), None, False)[0]
        # folding rounds differently (~1e-5 of logits of ~10 here); a stale cache is off by ~0.1 and more
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        return got

    before = check()
    for update in (lambda: mtp.block.input_layernorm.weight.mul_(1.5),
                   lambda: mtp.block.self_attn.v_proj.weight.add_(0.1),
                   lambda: mtp.block.post_attention_layernorm.weight.mul_(0.5),
                   lambda: mtp.block.mlp.up_proj.weight.add_(0.1),
                   lambda: mtp.norm_h.weight.mul_(2.0), lambda: trunk.embed_tokens.weight.mul_(1.5),
                   lambda: heads.load_state_dict(random_heads("sequential", mc, seed=7).state_dict())):
        update()
        after = check()
        assert not torch.allclose(after, before)
        before = after


def test_packed_decode_only_where_it_applies():
    """The modules draft where the packed path does not apply: with autograd on (fitting),
    q/k norms (Qwen3), an embed that is a plain callable."""
    mc, trunk = tiny()
    mtp = random_heads("sequential", mc).mtp
    with torch.no_grad():
        assert mtp.packed(trunk.embed_tokens, torch.float32) is not None
        assert mtp.packed(lambda ids: trunk.embed_tokens(ids), torch.float32) is None
        assert random_heads("sequential", tiny(qk_norm=True)[0]).mtp.packed(trunk.embed_tokens, torch.float32) is None
    assert mtp.packed(trunk.embed_tokens, torch.float32) is None
