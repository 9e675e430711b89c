"""Speculation on a GPU with controlled acceptance (`scripts/bench_gpu.py --spec`).

The policy is a published shape with random weights whose embeddings dominate its residual
stream: with tied embeddings its next token is, to fp32 precision, always the last one (the
target distribution is one-hot on it). The draft heads are real sequential heads (their
kernels and costs are the engine's), but each depth's draft distribution is replaced by
`agree` on the token the target will emit and 1 - agree on another one, so exact rejection
sampling accepts each draft with probability `agree`, independently (the table reports the
acceptance it measured). Expected tokens per row-step at depth k: (1 - a^(k+1)) / (1 - a).

Predicted speedup of fixed depth k over plain decoding, from the engine's own kernels, each
timed as a CUDA graph: E[tokens] * t(1) / (t_begin + (k - 1) t_depth + t(k + 1)), where t(W) is
a forward with the LM head of W tokens per row, t_begin the heads' pass over a 16-wide window
with the first depth's LM head, t_depth one more depth. The achieved speedup is the engine's
end to end (prefill included) over `off`, paired per round.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from rollout.engine import Engine, _attention_backends
from rollout.types import SamplingParams, SpecParams
from spec_heads.fused import fused_elementwise
from spec_heads.heads import DraftHeads, HeadConfig


class ControlledHeads(DraftHeads):
    """Sequential heads whose draft at each depth is the target's next token with probability
    `agree` (a device buffer, so graphs stay valid when it changes) and the token after it
    (mod the draft vocabulary) otherwise. The heads' own kernels still run for their cost."""

    def __init__(self, config: HeadConfig, model_config, agree: float):
        super().__init__(config, model_config)
        self.register_buffer("logp", torch.zeros(2))
        self.set_agree(agree)

    def set_agree(self, agree: float) -> None:
        self.logp.copy_(torch.tensor([math.log(agree), math.log1p(-agree)]))
        self.set_measured_acceptance([agree] * self.num_depths)

    def _control(self, logits: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        # the target repeats `token`; the other draft is the next id within the draft vocabulary
        n = self.config.draft_vocab or logits.shape[-1]
        alt = (token + 1) % n
        out = torch.full(logits.shape, -math.inf, dtype=torch.float32, device=logits.device)
        return out.scatter_(1, torch.stack((token, alt), 1), self.logp.expand(logits.shape[0], 2))

    def begin(self, hidden, next_tokens, positions, last_index, embed, lm_head, cache=None, kv_len=None,
              slots=None, floor=None):
        logits, st = super().begin(hidden, next_tokens, positions, last_index, embed, lm_head, cache, kv_len,
                                   slots, floor)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self._control(logits, next_tokens[rows, last_index]), st

    def step(self, state, token, embed, lm_head):
        logits, st = super().step(state, token, embed, lm_head)
        return self._control(logits, token), st


def controlled(model, depths: int, draft_vocab: int, agree: float) -> ControlledHeads:
    """A policy whose next token is its last one, and heads of `depths` that agree with it."""
    with torch.no_grad():
        model.embed_tokens.weight.normal_(0, 1.0)  # dominates the residual stream: the policy repeats
    heads = ControlledHeads(HeadConfig(kind="sequential", num_depths=depths, draft_vocab=draft_vocab),
                            model.config, agree)
    heads = heads.to(model.embed_tokens.weight.device, model.embed_tokens.weight.dtype).eval()
    heads.logp = heads.logp.float()  # the draft's two log-probabilities, unrounded
    heads.set_agree(agree)
    return heads


def expected_tokens(agree: float, k: int) -> float:
    return (1 - agree ** (k + 1)) / (1 - agree)


def _graph_time(fn, replays: int = 30) -> float:
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


@torch.inference_mode()
def component_times(model, heads, batch: int, ctx: int, widths) -> dict:
    """Seconds of t(W) for each width, t_begin and t_depth at `batch` rows (CUDA graphs)."""
    dev, K = "cuda", heads.num_depths
    kv = -(-(ctx + 16 + K + 2) // 64) * 64
    cache, hcache = model.new_cache(batch, kv), heads.new_cache(batch, kv)
    lm = heads.draft_lm_head(model.lm_head)
    out = {}
    with _attention_backends(torch.device(dev)), fused_elementwise():
        for w in widths:
            ids = torch.randint(3, 1000, (batch, w), device=dev)
            pos = (ctx + torch.arange(w, device=dev)).expand(batch, w)
            out[w] = _graph_time(lambda: model.logits(model(ids, pos, cache, kv)))
        H = model.config.hidden_size
        hid = torch.randn(batch, 16, H, device=dev).to(next(model.parameters()).dtype)
        nxt = torch.randint(3, 1000, (batch, 16), device=dev)
        pos = (ctx + torch.arange(16, device=dev)).expand(batch, 16)
        last = torch.full((batch,), 15, device=dev)
        begin = lambda: heads.begin(hid, nxt, pos, last, model.embed_tokens, lm, hcache, kv)  # noqa: E731
        out["begin"] = _graph_time(begin)
        _, st = begin()
        tok = torch.randint(3, 1000, (batch,), device=dev)
        out["depth"] = _graph_time(lambda: heads.step(st, tok, model.embed_tokens, lm))
    return out


def predicted(t: dict, agree: float, k: int) -> float:
    return expected_tokens(agree, k) * t[1] / (t["begin"] + (k - 1) * t["depth"] + t[k + 1])


def run_spec(model, card: str, batches, agrees, depths, prompt: int, new: int, rounds: int,
             draft_vocab: int, entropy: bool = True, log=print) -> list[dict]:
    """Rows of (batch, agree, mode, k): achieved and predicted speedup over off, paired per round."""
    K = max(depths)
    heads = controlled(model, K, draft_vocab, agrees[0])
    sp = SamplingParams(temperature=1.0, max_new_tokens=new, stop_token_ids=[])
    modes = [("fixed", k) for k in depths] + ([("entropy", K)] if entropy else [])
    rows = []
    for b in batches:
        g = torch.Generator().manual_seed(b)
        prompts = torch.randint(3, draft_vocab, (b, prompt), generator=g).tolist()
        t = component_times(model, heads, b, prompt + new // 2, [1] + [k + 1 for k in depths])
        eng = Engine(model, heads, max_batch=b)
        for a in agrees:
            heads.set_agree(a)
            eng.reset_calibration()
            specs = [SpecParams(mode=m, k=min(k, K), max_k=K) for m, k in modes]
            for s in [SpecParams(mode="off")] + specs:  # warm-up: graphs, compiles, the entropy probe
                eng.generate(prompts, sp, spec=s, seed=99)
            ratios = {i: [] for i in range(len(specs))}
            acc = {i: [] for i in range(len(specs))}
            offs = []
            for r in range(rounds):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                off = eng.generate(prompts, sp, spec=SpecParams(mode="off"), seed=r)
                torch.cuda.synchronize()
                t_off = time.perf_counter() - t0
                offs.append(b * new / t_off)
                for i, s in enumerate(specs):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    out = eng.generate(prompts, sp, spec=s, seed=r)
                    torch.cuda.synchronize()
                    ratios[i].append(t_off / (time.perf_counter() - t0))
                    acc[i].append(out.stats.mean_accepted_len)
                    assert out.stats.tokens == off.stats.tokens == b * new
            for i, (m, k) in enumerate(modes):
                pred = predicted(t, a, k) if m == "fixed" else max(predicted(t, a, j) for j in depths)
                row = {"card": card, "batch": b, "agree": a, "mode": m, "k": k, "off_tok_s": statistics.median(offs),
                       "speedup": statistics.median(ratios[i]), "range": [min(ratios[i]), max(ratios[i])],
                       "predicted": pred, "accepted_len": statistics.median(acc[i]),
                       "expected_len": expected_tokens(a, k) if m == "fixed" else None,
                       "components_ms": {str(w): 1e3 * v for w, v in t.items()}, "rounds": rounds}
                row["of_predicted"] = row["speedup"] / pred
                rows.append(row)
                log(f"b{b} a={a} {m}:{k}: {row['speedup']:.2f}x ({row['range'][0]:.2f}-{row['range'][1]:.2f}), "
                    f"predicted {pred:.2f}x ({100 * row['of_predicted']:.0f}%), acc len {row['accepted_len']:.2f}"
                    + (f" (expected {row['expected_len']:.2f})" if row["expected_len"] else "")
                    + f", off {row['off_tok_s']:.0f} tok/s")
        del eng
    return rows


def print_spec_table(rows) -> None:
    print("\n| batch | acceptance | mode | off tok/s | speedup (range) | predicted | % of predicted | "
          "accepted len (expected) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mode = f"fixed {r['k']}" if r["mode"] == "fixed" else f"entropy (max {r['k']})"
        exp = f" ({r['expected_len']:.2f})" if r["expected_len"] else ""
        print(f"| {r['batch']} | {r['agree']} | {mode} | {r['off_tok_s']:.0f} | {r['speedup']:.2f}x "
              f"({r['range'][0]:.2f}-{r['range'][1]:.2f}) | {r['predicted']:.2f}x | {100 * r['of_predicted']:.0f}% | "
              f"{r['accepted_len']:.2f}{exp} |")
