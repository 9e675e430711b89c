"""Batched generation with continuous batching, plain or speculative.

The engine owns a preallocated KV cache of `max_batch` rows. Active rows live in slots
[0, n): finished rows are compacted away at once, and their slots refilled from the prompt
queue in groups (`min_refill`: one prefill of several prompts, not one per freed slot); once
the queue is empty the long tail runs at its true batch size.

One decode step per row, vectorised over rows (no per-row Python loop inside a step):
- plain: feed the last sampled token, sample the next one.
- speculative (DESIGN.md): the depth policy (spec_heads.depth) sets how deep the batch drafts
  this step. At 0 (drafting would not pay: poor heads, or verifying is dear at this many rows)
  the step is a plain step and the heads do not run; the trunk's hidden states of such steps
  wait in a per-row window that the heads consume at their next call (or when it fills), so
  they never fall behind. Otherwise: draft with the heads (sampled from the fp32 draft
  distribution; on a CPU, in entropy mode, stopping early once the batch's predicted
  acceptance no longer pays for one more depth), verify every row's drafts in one policy
  forward, accept/reject exactly (spec_heads.rejection), emit accepted + one more token, and
  roll the cache back by simply not advancing past rejections.

Every row draws from its own counter-based random stream (keyed by its prompt id), so its
output never depends on its batch neighbours, on `max_batch` or on scheduling, and a seed
reproduces a run exactly. The engine knows nothing about tokenizers, tasks or Ray.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import deque
from dataclasses import astuple

import torch
from torch import nn

from rollout.cuda_graphs import DecodeGraphs, GraphConfig
from rollout.head_window import HeadWindow
from rollout.types import LengthError, RolloutBatch, RolloutStats, Sequence, SamplingParams, SpecParams
from spec_heads.budget import choose_depths, prefix_values
from spec_heads.depth import DepthPolicy
from spec_heads.fused import fused_elementwise
from spec_heads.layers import (Attention, CpuKernels, Ragged, attention_table, calibrate_cpu_attention,
                               calibrate_cpu_row_padding, row_padding_table, use_cpu_kernels)
from spec_heads.rejection import rejection_sample
from spec_heads.sampling import (entropy_from_logprobs, row_keys, row_uniforms, sample_with_uniforms,
                                 sampling_logprobs, sampling_probs)

log = logging.getLogger(__name__)

# random streams: a row never reuses a draw across uses
_S_SAMPLE, _S_SPEC = 1, 2  # a speculative step draws [K drafts | K accepts | 1 final] at once
_WINDOW = 32  # positions the heads' window holds between drafting steps before it is dropped


_LOG_FLOOR = torch.finfo(torch.float32).min


def _entropy(probs: torch.Tensor, logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy [...] of probabilities [..., V] (zeros allowed), for the decode loop
    (spec_heads.sampling.entropy_from_logprobs is the differentiable one).

    With their log-probabilities (probs = logprobs.exp()), -sum p * log p is one dot product per
    row: cut tokens (log p = -inf, p = 0) are floored to the most negative float, so they add
    -0.0, not NaN. entr() takes a log per element, a real share of a step over a large vocabulary."""
    if logprobs is None:
        return torch.special.entr(probs).sum(-1)
    return -torch.linalg.vecdot(probs, logprobs.clamp_min(_LOG_FLOOR))


def _attention_backends(device: torch.device):
    """Decoding's attention kernels: on CUDA every SDPA backend but cuDNN's, which builds an
    execution plan per new shape; a decode loop meets new (rows, tokens, kv length) shapes all
    the time as rows finish and draft widths change (docs/gpu.md)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _bucket(n: int, quantum: int) -> int:
    return -(-n // quantum) * quantum


_ROW_PADDING: dict[tuple, dict] = {}  # (weight shapes, dtype, threads) -> measured table


def _row_padding(model) -> dict:
    """On a CPU, the policy's linear weights timed at 1..12 rows, shape by shape (measured once
    per shape set, dtype and thread count in this process): row counts are padded where the
    BLAS multiplies more rows faster (spec_heads.layers.calibrate_cpu_row_padding). Verifying a
    few drafts at batch 1, and a batch draining to its last rows, multiply just such counts."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    key = (tuple(tuple(w.shape) for w in weights), weights[0].dtype if weights else None,
           torch.get_num_threads())
    if key not in _ROW_PADDING:
        _ROW_PADDING[key] = row_padding_table(calibrate_cpu_row_padding(weights))
        log.info("CPU row padding for this policy's matrix products (weight shape: rows -> rows): %s", _ROW_PADDING[key])
    return _ROW_PADDING[key]


_ATTENTION: dict[tuple, set] = {}  # (heads, kv heads, head dim, dtype, threads) -> measured grouped classes


def _attention_kernels(*modules) -> dict:
    """On a CPU, the two attention kernels timed at each attention shape of these modules (the
    policy's and its heads'; once per shape, dtype and thread count in this process): where
    grouped_attention is faster it runs instead of SDPA (spec_heads.layers.calibrate_cpu_attention)."""
    threads, table = torch.get_num_threads(), {}
    for module in modules:
        for m in module.modules() if module is not None else ():
            if isinstance(m, Attention):
                key = (m.n_heads, m.n_kv, m.head_dim, m.q_proj.weight.dtype)
                if key + (threads,) not in _ATTENTION:
                    _ATTENTION[key + (threads,)] = calibrate_cpu_attention(*key)
                    log.info("CPU attention for %s (heads, kv heads, head dim, dtype): grouped kernel at "
                             "(rows, width) %s, SDPA elsewhere", key, sorted(_ATTENTION[key + (threads,)]))
                table[key] = _ATTENTION[key + (threads,)]
    return attention_table(table)


class Engine:
    def __init__(self, model, heads=None, *, max_batch: int = 64, max_len: int | None = None,
                 device=None, sync_every: int | None = None, min_refill: int | None = None,
                 graphs: GraphConfig | None = None):
        self.model = model.eval()
        self.heads = heads.eval() if heads is not None else None
        p = next(model.parameters())
        self.device, self.dtype = (torch.device(device) if device else p.device), p.dtype
        self.max_batch = max_batch
        # a dynamic / longrope rope matches transformers only below model.max_positions
        limit = getattr(model, "max_positions", None)
        self.max_len = max_len or min(model.config.max_position_embeddings, limit or math.inf)
        if limit is not None and self.max_len > limit:
            raise LengthError(f"rollout.max_seq_len: {self.max_len} runs past position {limit}, where this model's "
                              f"{model.config.rope_scaling.get('rope_type')} rope stops matching transformers (it "
                              f"rescales with the sequence length); set rollout.max_seq_len <= {limit}")
        self.policy_version = 0
        self.cuda = self.device.type == "cuda"
        # On a GPU, reading state back each step costs a sync; on a CPU it is free.
        self.sync_every = sync_every or (4 if self.cuda else 1)
        # Queued prompts are admitted in groups of at least min_refill (or all that are left):
        # a prefill of one prompt costs most of what one of several costs, and speculative rows
        # finish over several steps, not all at one. A slot waits a few steps at most.
        if min_refill is not None and not 1 <= min_refill <= max_batch:
            raise ValueError(f"min_refill: must be in 1..max_batch ({max_batch}), got {min_refill}")
        self.min_refill = min_refill or max(1, max_batch // 8)
        # this engine's CPU kernel choices, in force only inside its generate() (and probes)
        self.cpu_kernels = None if self.cuda else CpuKernels(_row_padding(model), _attention_kernels(model, heads))
        self.depth_policy: DepthPolicy | None = None  # the one the last generate() used
        self._policies: dict[tuple, DepthPolicy] = {}  # (mode, K, control) -> policy
        self._cost = None  # spec_heads.depth.CostModel, shared by the policies
        self._cache = self._head_cache = None
        # on CUDA, plain decode steps run over row buckets, replayed from graphs (rollout.cuda_graphs)
        self.graphs = DecodeGraphs(graphs) if self.cuda else None
        self._buffers: dict[str, torch.Tensor] = {}
        self._draft_lm = None  # the heads' LM head, kept in one storage across runs (draft_lm)

    # ------------------------------------------------------------------ public
    def set_heads(self, heads):
        self.heads = heads.eval() if heads is not None else None
        self._draft_lm = None
        if not self.cuda:
            self.cpu_kernels.grouped = _attention_kernels(self.model, self.heads)
        self._head_cache = None
        self.reset_calibration()

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams,
                 spec: SpecParams | None = None, seed: int = 0, ids: list[int] | None = None,
                 progress=None, feed=None, on_finish=None, max_prompt_len: int = 0) -> RolloutBatch:
        """Generate one completion per prompt. `ids` (default 0..n-1) key each row's random
        stream; give equal prompts distinct ids to get distinct samples.

        Continuous batching from outside (the rollout worker's pull queue): `feed(free_rows)`
        returns more (prompt, id) pairs whenever rows are free (prompts of at most
        `max_prompt_len` tokens, which sizes the cache), and `on_finish(sequence)` is called as
        each row finishes. The call returns when no row is left and `feed` gives nothing."""
        spec = spec or SpecParams(mode="off")
        if spec.mode != "off" and self.heads is None:
            raise ValueError(f"spec.mode={spec.mode!r} needs draft heads: fit them with "
                             "`specroll fit-heads` or set spec.mode=off")
        if not prompts:
            return RolloutBatch([], RolloutStats())
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (add a BOS token)")
        ids = list(range(len(prompts))) if ids is None else list(ids)
        K = 0 if spec.mode == "off" else min(spec.k if spec.mode == "fixed" else spec.max_k,
                                            self.heads.config.num_depths)
        max_prompt_len = max(max_prompt_len, max(map(len, prompts)))
        need = max_prompt_len + sampling.max_new_tokens + K + 2
        if need > self.max_len:
            raise LengthError(f"sampling.max_new_tokens: prompt length + max_new_tokens + draft depth = "
                              f"{need} exceeds the engine's max_len={self.max_len}; lower "
                              "sampling.max_new_tokens, shorten prompts, or raise rollout.max_seq_len")
        fuse = self.graphs is not None and self.graphs.config.fuse
        with _attention_backends(self.device), fused_elementwise(fuse), use_cpu_kernels(self.cpu_kernels):
            run = _Run(self, prompts, ids, sampling, spec, K, seed, progress, max_prompt_len)
            run.feed, run.on_finish = feed, on_finish
            return run.loop()

    # ------------------------------------------------------------ internals
    def caches(self, max_len: int):
        if self._cache is None or self._cache.max_len < max_len or self._cache.max_batch < self.max_batch:
            self._cache = self.model.new_cache(self.max_batch, max_len, self.device, self.dtype)
            self._head_cache = None
        if self.heads is not None and self._head_cache is None:
            self._head_cache = self.heads.new_cache(self.max_batch, self._cache.max_len, self.device, self.dtype)
        return self._cache, self._head_cache

    def buffer(self, name: str, shape: tuple, dtype=torch.int64, fill=0) -> torch.Tensor:
        """A per-run buffer, filled with `fill`, in the same storage from run to run while its
        leading dimensions hold (the last one only grows, a view gives the shape asked for):
        captured decode graphs read and write it in place."""
        t = self._buffers.get(name)
        if t is None or t.shape[:-1] != shape[:-1] or t.shape[-1] < shape[-1] or t.dtype != dtype:
            t = self._buffers[name] = torch.empty(shape, dtype=dtype, device=self.device)
        return t[..., :shape[-1]].fill_(fill)

    def draft_lm(self):
        """The heads' LM head (heads.draft_lm_head), built once and refreshed in place from the
        policy's LM head at each run: captured drafting steps read its storage."""
        lm = self._draft_lm
        if lm is None or lm is not self.model.lm_head and lm.ids is not getattr(self.heads, "draft_tokens", None):
            lm = self._draft_lm = self.heads.draft_lm_head(self.model.lm_head)
        elif lm is not self.model.lm_head:
            lm.refresh(self.model.lm_head)
        return lm

    def graph_tensors(self, cache, head_cache) -> list[torch.Tensor]:
        """Every tensor a captured step reads or writes in place: weights (the heads' packed
        decode weights too), caches, the persistent per-run buffers, the heads' LM head. One list
        for plain and speculative runs, so runs of either kind keep each other's graphs."""
        m = self.model
        tensors = [*m.parameters(), *m.buffers(), cache.buf, *(self._buffers[k] for k in sorted(self._buffers))]
        if self.heads is not None:
            tensors += self.heads.decode_tensors(m.embed_tokens)
            if head_cache is not None:
                tensors.append(head_cache.buf)
            if self._draft_lm is not None:
                tensors.append(self._draft_lm.weight)
        return tensors

    def ensure_depth_policy(self, spec: SpecParams, K: int) -> DepthPolicy:
        """The depth policy for this mode. Policies live as long as the engine (calibration is
        learned across generate calls); all modes share one cost model, probed once, because
        what a verified token costs is a property of the model and machine, not of the mode."""
        key = (spec.mode, K, astuple(spec.control))
        dp = self._policies.get(key)
        if dp is None:
            dp = DepthPolicy(spec.mode, min(spec.k, K), K, spec.calibration_bins, self.model.config.vocab_size,
                             self.max_batch, device=self.device, control=spec.control)
            if self._cost is not None and self._cost.max_tokens >= K + 1:
                dp.cost = self._cost
            elif spec.mode == "entropy":
                with use_cpu_kernels(self.cpu_kernels):
                    self._probe_costs(dp, K)
                self._cost = dp.cost
            dp.set_measured_prior(self.heads.measured_acceptance())
            self._policies[key] = dp
        dp.k = min(spec.k, K)
        self.depth_policy = dp
        return dp

    def reset_calibration(self):
        """Forget acceptance statistics (the heads changed): start again from the heads'
        recorded held-out acceptance where they carry one; measured costs stay."""
        measured = self.heads.measured_acceptance() if self.heads is not None else None
        for dp in self._policies.values():
            dp.reset_calibration(measured)

    @torch.inference_mode()
    def _probe_costs(self, dp: DepthPolicy, K: int):
        """Time dummy steps at (rows, tokens): a plain step for 1 token, a draft of tokens - 1
        plus a verify forward otherwise, so the depth policy knows what drafting costs before it
        has seen real steps (real steps then replace these timings)."""
        plan = dp.cost.probe_plan(self.max_batch, K + 1)
        m = self.model
        g = torch.Generator(device="cpu").manual_seed(0)
        ctx = (m.new_cache(self.max_batch, 64 + K + 2, self.device, self.dtype),
               self.heads.new_cache(self.max_batch, 64 + K + 2, self.device, self.dtype), g,
               torch.rand(self.max_batch, K + 1, generator=g, dtype=torch.float64).to(self.device),
               self.heads.draft_lm_head(m.lm_head))
        # Per rows bucket: one warm-up call per token count, then `passes` passes over every
        # token count in turn, keeping each cell's fastest (other load only ever adds time).
        # In turn, not back to back: a slow moment of a shared machine shorter than a pass
        # reaches at most one of a cell's timings, and cannot decide the best depth alone.
        passes = 3
        for rows in sorted({r for r, _ in plan}):
            counts = [t for r, t in plan if r == rows]
            for t in counts:  # warm-up: not kept
                self._probe_step(ctx, rows, t)
            best = {t: math.inf for t in counts}
            for _ in range(passes):
                for t in counts:
                    best[t] = min(best[t], self._probe_step(ctx, rows, t))
            for t in counts:
                dp.cost.record(rows, t, best[t])

    def _probe_step(self, ctx, rows: int, tokens: int) -> float:
        """Seconds of one dummy step (_probe_costs) of `tokens` per row over `rows` rows, doing
        the work of a real one: each draft's entropy (the acceptance table's bin), and the
        verify's rejection sampling and per-position entropies (over [rows, tokens, vocab], a
        share of a step that grows with depth). The heads start from a one-position window, as
        most real steps do (a full window of `tokens` positions overstates drafting's cost)."""
        m, heads = self.model, self.heads
        cache, hcache, g, u, draft_lm = ctx
        ids = torch.randint(0, m.config.vocab_size, (rows, tokens), generator=g).to(self.device)
        pos = (32 + torch.arange(tokens)).expand(rows, tokens).to(self.device)
        kv = _bucket(32 + tokens, 16)
        drafting = tokens > 1
        if drafting:
            hid = torch.randn(rows, 1, m.config.hidden_size, generator=g).to(self.device, self.dtype)
            last = torch.zeros(rows, dtype=torch.int64, device=self.device)
            dlen = torch.full((rows,), tokens - 1, dtype=torch.int64, device=self.device)
        t0 = time.perf_counter()
        if drafting:  # the heads draft tokens - 1, then verify
            logits, st = heads.begin(hid, ids[:, :1], pos[:, :1], last, m.embed_tokens, draft_lm, hcache, kv)
            probs, toks = [], []
            for i in range(tokens - 1):
                dp = sampling_probs(logits, 1.0)
                _entropy(dp)
                toks.append(sample_with_uniforms(dp, u[:rows, i]))
                probs.append(dp)
                if i + 1 < tokens - 1:
                    logits, st = heads.step(st, toks[-1], m.embed_tokens, draft_lm)
            draft_probs, draft_tok = torch.stack(probs, 1), torch.stack(toks, 1)
        tlp = sampling_logprobs(m.logits(m(ids, pos, cache, kv)), 1.0)  # [rows, tokens, V]
        tp = tlp.exp()
        if drafting:
            rejection_sample(tp, draft_probs, draft_tok, dlen, uniforms=(u[:rows, :tokens - 1], u[:rows, -1]))
        else:
            sample_with_uniforms(tp[:, -1], u[:rows, -1])
        _entropy(tp, tlp)
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0


class _Run:
    """State of one generate() call: per-row device tensors indexed by slot."""

    def __init__(self, eng: Engine, prompts, ids, sampling: SamplingParams, spec: SpecParams, K,
                 seed, progress, max_prompt_len: int):
        self.e, self.prompts, self.ids, self.sp, self.spec, self.K = eng, list(prompts), ids, sampling, spec, K
        self.seed, self.progress = seed, progress
        self.feed = self.on_finish = None
        self.max_prompt_len = max_prompt_len
        B, dev = eng.max_batch, eng.device
        self.max_len = max_prompt_len + sampling.max_new_tokens + K + 2
        self.cache, self.hcache = eng.caches(_bucket(self.max_len, 64))
        self.policy = eng.ensure_depth_policy(spec, K) if K else None
        # the heads' LM head: the policy's, or its rows of the heads' draft vocabulary
        self.draft_lm = eng.draft_lm() if K else None
        cap = sampling.max_new_tokens + K + 1
        z = lambda *s, dt=torch.int64: torch.zeros(*s, dtype=dt, device=dev)
        persistent = lambda name, *s, dt=torch.int64: eng.buffer(name, s, dt)
        # Per-row state lives in a few buffers, each field a view of one: compaction moves rows
        # with one copy per buffer (_compact), not one per field.
        self.row_int = persistent("row_int", B, 8)  # per row: length, last token, tokens out, key, steps, heads' window
        self.lengths, self.last_tok, self.n_out, self.keys, self.n_steps = self.row_int[:, :5].unbind(1)
        self.done = eng.buffer("done", (B,), torch.bool, True)
        self.out_int = persistent("out_int", B, 3, cap)  # per row: emitted tokens; draft length and accepted per step
        self.out_tok, self.out_dl, self.out_acc = self.out_int.unbind(1)
        self.out_float = persistent("out_float", B, 2, cap, dt=torch.float32)  # per row: logprobs and entropies
        self.out_lp, self.out_ent = self.out_float.unbind(1)
        stops = sampling.stop_token_ids or [-1]
        self.stop_ids = eng.buffer("stop_ids", (len(stops),))
        self.stop_ids.copy_(torch.tensor(stops))
        self.win = None  # the heads' window (rollout.head_window)
        if eng.heads is not None and K:
            cap, H = max(K + 1, _WINDOW), eng.model.config.hidden_size
            self.win = HeadWindow(self.row_int[:, 5:], cap, H, eng.dtype, dev,
                                  buffers=(eng.buffer("win_hid", (B, cap, H), eng.dtype), eng.buffer("win_nxt", (B, cap))))
        self.slot_prompt = [-1] * B  # host: prompt index in each slot
        self.n = 0  # active rows occupy slots [0, n)
        self.len_bound = 0  # host upper bound of lengths[:n]
        self.queue = deque(range(len(prompts)))
        self.results: list[Sequence | None] = [None] * len(prompts)
        self.stats = RolloutStats(drafted_per_pos=[0] * K, accepted_per_pos=[0] * K, depth_hist=[0] * (K + 1))
        self.acc_wa = z(K + 1, K + 1)  # [drafts verified, drafts accepted] -> live row-steps
        self.acc_blind = z(K + 1)  # [drafts verified] -> live row-steps of blind exploring steps
        self.acc_tokens, self.acc_rowsteps = persistent("acc", 2).unbind()
        if eng.graphs is not None:
            # what the graphs read and write; any of it in new storage drops them
            eng.graphs.bind(eng.graph_tensors(self.cache, self.hcache))
            # what a graph bakes in besides the buffers: the sampling settings and stop tokens
            self.graph_key = (sampling.temperature, sampling.top_k, sampling.top_p, sampling.max_new_tokens,
                              tuple(stops))
        self._curve = self._curve_key = None  # _cost_curve's cache

    def _kv(self, n: int) -> int:
        """Attention span for a forward: a bucketed bound on the longest row (static shapes)."""
        return min(_bucket(n, 64), self.cache.max_len)

    # ----------------------------------------------------------------- loop
    def loop(self) -> RolloutBatch:
        e, t0 = self.e, time.perf_counter()
        self._refill()
        step = 0
        # A speculative step reads its outcome back anyway (the depth policy's timings), so its
        # finished rows go at once: collected every sync_every steps, a finished row would be
        # drafted and verified for nothing, and its zero yield would rate drafting low.
        collect_every = 1 if self.K else e.sync_every
        while self.n:
            if self.K:
                self._spec_step()
            else:
                self._plain_step()
            step += 1
            self.stats.steps += 1
            if step % collect_every == 0 or self.len_bound + self.K + 1 >= self.max_len:
                self._collect()
                self._refill()
        s = self.stats
        s.time_s = time.perf_counter() - t0
        s.sequences = len(self.prompts)
        s.tokens, s.row_steps = int(self.acc_tokens), int(self.acc_rowsteps)
        if self.K:
            # a draft at depth i counts as tested only if every earlier draft was accepted, so
            # accepted/drafted is the conditional acceptance per position
            # plain steps' live row-steps: all of them but the drafting and blind ones
            self.acc_wa[0, 0] += self.acc_rowsteps - self.acc_wa.sum() - self.acc_blind.sum()
            wa = self.acc_wa.tolist()
            s.depth_hist = [sum(r) + b for r, b in zip(wa, self.acc_blind.tolist())]
            for d, row in enumerate(wa):
                for a, count in enumerate(row):
                    for i in range(min(d, a + 1)):
                        s.drafted_per_pos[i] += count
                        s.accepted_per_pos[i] += count * (i < a)
        return RolloutBatch(self.results, s)

    # ------------------------------------------------------------- prefill
    def _refill(self):
        """Prefill queued prompts into free slots [n, ...) (finished rows were compacted), once
        at least Engine.min_refill slots are free (or the rest of the queue fits, or no row is
        in flight)."""
        free = self.e.max_batch - self.n
        if self.feed is not None and len(self.queue) < free and (not self.n or free >= self.e.min_refill):
            self._pull(free - len(self.queue))
        if self.n and free < min(self.e.min_refill, len(self.queue)):
            return
        take = [self.queue.popleft() for _ in range(min(free, len(self.queue)))]
        if not take:
            return
        t0 = time.perf_counter()
        dev, m = self.e.device, len(take)
        slots = torch.arange(self.n, self.n + m, device=dev)
        lens = [len(self.prompts[i]) for i in take]
        P = max(lens)
        ids = torch.zeros(m, P, dtype=torch.int64)
        for r, i in enumerate(take):
            ids[r, : lens[r]] = torch.tensor(self.prompts[i])
        ids = ids.to(dev)
        lens_t = torch.tensor(lens, device=dev)
        pos = torch.arange(P, device=dev).expand(m, P)
        h = self.e.model(ids, pos, self.cache, _bucket(P, 16), slots)  # [m, P, H]
        last = h[torch.arange(m, device=dev), lens_t - 1]  # [m, H]
        lp = sampling_logprobs(self.e.model.logits(last), self.sp.temperature, self.sp.top_k, self.sp.top_p)
        keys = row_keys(self.seed, torch.tensor([self.ids[i] for i in take], device=dev))
        zero = torch.zeros(m, dtype=torch.int64, device=dev)
        tok = sample_with_uniforms(lp.exp(), row_uniforms(keys, zero, _S_SAMPLE, 1)[:, 0])
        sl = slice(self.n, self.n + m)
        self.keys[sl], self.lengths[sl], self.n_out[sl], self.n_steps[sl] = keys, lens_t, 0, 0
        self.done[sl] = False
        if self.K:
            # a plain step leaves its step's column (0 drafted, 0 accepted) as zeroed here
            self.out_dl[sl], self.out_acc[sl] = 0, 0
        skip = self.K and self.policy.skips_heads_prefill(self.n + m)
        if self.K:  # each row's heads start from its last prompt position
            self.win.admit(sl, last, tok, lens_t, heads_saw_prompt=not skip)
        if skip:
            # Where drafting is measured off at these rows, or off and idle for a while
            # (DepthPolicy.skips_heads_prefill), the heads skip the prompts: the pass costs one
            # head block per prompt token. Such rows draft from their last prompt position on if
            # drafting comes back; the exploring steps that bring it back are blind anyway.
            self.stats.heads_prefill_skipped += m
        elif self.K:
            # The heads catch up over the prompt (sequential heads fill their own KV cache), also
            # while drafting is off by the start-up cost model alone: a row admitted without it
            # drafts without its prompt for its whole life, and its low yield keeps drafting off.
            nxt = torch.cat([ids[:, 1:], ids[:, :1]], 1).scatter(1, (lens_t - 1)[:, None], tok[:, None])
            timed = self.spec.mode == "entropy"  # the depth policy weighs drafting net of this pass
            if timed and self.e.cuda:
                torch.cuda.synchronize()
            th = time.perf_counter()
            self.e.heads.prefill(h, nxt, pos, lens_t - 1, self.e.model.embed_tokens, self.hcache,
                                 _bucket(P + 1, 16), slots)
            if timed:
                if self.e.cuda:
                    torch.cuda.synchronize()
                self.policy.record_heads_prefill(m, time.perf_counter() - th)
        for r, i in enumerate(take):
            self.slot_prompt[self.n + r] = i
        self._emit(sl, tok[:, None], lp.gather(1, tok[:, None]), entropy_from_logprobs(lp)[:, None],
                   torch.ones(m, dtype=torch.int64, device=dev), count_step=False)
        self.n += m
        self.len_bound = max(self.len_bound, P)
        self.stats.prefill_time_s += time.perf_counter() - t0

    # ---------------------------------------------------------------- steps
    def _pull(self, rows: int):
        """Append what `feed` hands out for up to `rows` free rows to the queue."""
        for prompt, pid in self.feed(rows):
            if not 0 < len(prompt) <= self.max_prompt_len:
                raise ValueError(f"feed: a prompt of {len(prompt)} tokens; this run holds 1..{self.max_prompt_len}")
            self.queue.append(len(self.prompts))
            self.prompts.append(prompt)
            self.ids.append(pid)
            self.results.append(None)

    def _plain_step(self) -> torch.Tensor | None:
        """One plain decode step over the rows in flight; returns the tokens emitted per row [n]
        (None for a plain run on CUDA, whose steps run as a rows bucket, replayed from a graph)."""
        n, kv, graphs = self.n, self._kv(self.len_bound + 1), self.e.graphs
        if graphs is not None and self.win is None:
            # Rows past n are finished (done) or empty slots: they emit nothing, and what they
            # write lands past their lengths, where nothing reads before a row's next write.
            rows = graphs.rows(n, self.e.max_batch)
            graphs.run((rows, kv) + self.graph_key, lambda: self._plain_device(rows, kv))
            self.len_bound += 1
            return None
        h, tok, emitted = self._plain_device(n, kv)
        if self.win is not None:  # a speculative run not drafting this step: feed the window
            self.win.append(n, h[:, 0], tok)
        self.len_bound += 1
        return emitted

    def _plain_device(self, n: int, kv: int):
        """A plain step's device work over slots [0, n) with attention span kv (no host reads,
        no host state changed: rollout.cuda_graphs captures it). Returns the hidden states
        [n, 1, H], the sampled tokens [n] and the tokens emitted per row [n]."""
        sp, m = self.sp, self.e.model
        pos = self.lengths[:n, None]
        h = m(self.last_tok[:n, None], pos, self.cache, kv)
        lp = sampling_logprobs(m.logits(h[:, 0]), sp.temperature, sp.top_k, sp.top_p)  # [n, V]
        probs = lp.exp()
        tok = sample_with_uniforms(probs, row_uniforms(self.keys[:n], self.n_out[:n], _S_SAMPLE, 1)[:, 0])
        emitted = self._emit(slice(0, n), tok[:, None], lp.gather(1, tok[:, None]), _entropy(probs, lp)[:, None],
                             torch.ones(n, dtype=torch.int64, device=self.e.device))
        return h, tok, emitted

    def _begin_heads(self, n: int, K: int):
        """Run the heads over each row's window; returns depth-1 logits and the draft state."""
        e = self.e
        hid, nxt, pos, last, floor = self.win.inputs(n, pad_to_16=e.cuda)
        return e.heads.begin(hid, nxt, pos, last, e.model.embed_tokens, self.draft_lm, self.hcache,
                             self._kv(self.len_bound + K + 2), floor=floor)

    def _draft(self, n: int, K: int, u: torch.Tensor, choose: bool):
        """Draft up to K tokens per row with uniforms u [n, >=K]. Returns draft_probs [n, k, V]
        fp32, tokens [n, k], the drafts' entropy bins in the acceptance table [n, k] (None
        outside entropy mode), the drafts each row verifies [n] (k = their maximum) and the
        step's expected tokens per row (None without `choose`).

        With `choose` each row's depth comes from spec_heads.budget.choose_depths: the drafts'
        values (prefix products of their predicted acceptance) against the step's cost curve.
        A sequential chain re-decides after each depth, and rows whose drafts are not all worth
        verifying drop out of the later head steps. Without it every row verifies K drafts."""
        e, sp = self.e, self.sp
        logits, st = self._begin_heads(n, K)
        table, calibrate = self.policy.table, self.spec.mode == "entropy"
        dev = logits.device

        def sample(logits, u_cols):  # -> draft probs (fp32), tokens, entropy bins
            dp = sampling_probs(logits, sp.temperature, sp.top_k, sp.top_p)
            bins = table.bins(_entropy(dp)) if calibrate else None
            if self.spec.draft == "greedy":  # baseline: argmax drafts, still exact (one-hot draft)
                dp = torch.zeros_like(dp).scatter_(-1, dp.argmax(-1, keepdim=True), 1.0)
            return dp, sample_with_uniforms(dp, u_cols), bins

        if choose:
            curve = self._cost_curve(n, K)
            room = self.sp.max_new_tokens - self.n_out[:n]  # a draft at depth j needs room >= j + 2
        if e.heads.kind == "parallel":  # every depth at once
            probs, toks, bins = sample(e.heads.all_logits(st, self.draft_lm, K), u[:, :K])  # [n, K, V], [n, K]
            dlen = torch.full((n,), K, dtype=torch.int64, device=dev)
            if choose:
                j = torch.arange(K, device=dev)
                # no draft after a drafted stop token, none past max_new_tokens, can be emitted
                clear = torch.cat([torch.ones_like(toks[:, :1], dtype=torch.bool),
                                   ~torch.isin(toks[:, :-1], self.stop_ids)], 1).cumprod(1).bool()
                worth = table.predict_bins(bins).double() * (clear & (room[:, None] >= j + 2))
                values = prefix_values(worth)
                dlen = choose_depths(values, curve)
        else:
            probs = toks = bins = values = None
            act, clear = torch.arange(n, device=dev), torch.ones(n, dtype=torch.bool, device=dev)
            dlen = torch.full((n,), K, dtype=torch.int64, device=dev)
            for i in range(K):
                dp, tok, b = sample(logits, u[act, i])
                if probs is None:
                    probs = dp.new_zeros(n, K, dp.shape[-1])
                    toks = torch.zeros(n, K, dtype=torch.int64, device=dev)
                    bins = torch.zeros(n, K, dtype=torch.int64, device=dev) if calibrate else None
                    values = torch.zeros(n, K, dtype=torch.float64, device=dev)
                probs[act, i], toks[act, i] = dp, tok
                if calibrate:
                    bins[act, i] = b
                if choose:
                    worth = table.predict_bins(b).double() * (clear[act] & (room[act] >= i + 2))
                    values[act, i] = worth * (values[act, i - 1] if i else 1.0)
                    clear[act] &= ~torch.isin(tok, self.stop_ids)
                    if i + 1 < K:  # go on where the drafts still to come are worth their cost
                        plan = choose_depths(torch.cat([values[:, :i + 1], self._ahead(values[:, i], clear, room, i, K)], 1), curve)
                        more = plan[act] > i + 1
                    if i + 1 == K or not bool(more.any()):
                        dlen = choose_depths(values[:, :i + 1], curve)  # what was drafted, at its real worth
                        break
                    if not bool(more.all()):  # the others drop out of the later head steps
                        keep = more.nonzero()[:, 0]
                        act, tok, st = act[keep], tok[keep], st.take(keep)
                elif i + 1 == K:
                    break
                logits, st = e.heads.step(st, tok, e.model.embed_tokens, self.draft_lm)
        expected = None
        if choose:
            k = int(dlen.max())
            probs, toks, bins, values = probs[:, :k], toks[:, :k], None if bins is None else bins[:, :k], values[:, :k]
            expected = 1.0 + float((values * (torch.arange(k, device=dev) < dlen[:, None])).sum()) / n
        return probs, toks, bins, dlen, expected

    def _ahead(self, last: torch.Tensor, clear: torch.Tensor, room: torch.Tensor, i: int, K: int) -> torch.Tensor:
        """Predicted values [n, K - i - 1] of the drafts at depths i + 2..K not yet made: the last
        draft's value times the heads' per-position acceptance (DepthPolicy.position_acceptance).
        Deciding on the drafts made so far alone would stop where the first draft does not pay
        for the drafting step's fixed cost although a deeper one would."""
        acc = torch.tensor(self.policy.position_acceptance()[i + 1:K], dtype=torch.float64, device=last.device)
        j = torch.arange(i + 1, K, device=last.device)
        return last[:, None] * acc.cumprod(0) * (clear[:, None] & (room[:, None] >= j + 2))

    def _cost_curve(self, n: int, K: int) -> torch.Tensor:
        """The depth policy's step time at n rows for n + t verified tokens, t = 0..n K, as a
        drafting step sees it (cached until the cost model has taken 16 more timings).

        Once a step drafts, its fixed cost (the heads' first pass, the sampler's) is paid
        whatever the rows then verify: a row's first draft costs what a later one does, so the
        curve runs back from t = n to t = 0 at the slope between n and 2n (where that is dearer
        than a plain step). Whether to draft at all is the depth policy's plan (plan_step),
        weighed on real steps."""
        key = (n, K, self.policy.cost.version // 16)
        if self._curve_key != key:
            curve = self.policy.cost.curve(n, K)
            if K >= 2:
                sunk = float(2 * curve[n] - curve[2 * n])  # a step that drafted but verifies no draft
                if sunk > float(curve[0]):
                    curve[:n + 1] = torch.linspace(sunk, float(curve[n]), n + 1, dtype=curve.dtype)
            self._curve, self._curve_key = curve.to(self.e.device), key
        return self._curve

    def _spec_step(self):
        """One speculative step: plan -> draft -> verify (ragged) -> accept -> emit."""
        e, n = self.e, self.n
        t0 = time.perf_counter()
        # how deep this step may draft (0: a plain step), and whether it explores beyond the
        # policy's budget (spec_heads.depth.DepthPolicy.plan_step)
        budget, Kd, explore = self.policy.plan_step(n)
        budget, Kd = min(budget, self.K), min(Kd, self.K)
        # After a plain stretch, explore from each row's last position only: running the heads
        # over the whole window would cost a head layer per position and row, and the exploring
        # step must cost what an ordinary drafting step costs. Its drafts then lack the heads'
        # context, so it times a drafting step but its acceptance is not counted.
        blind = explore and not budget
        if blind and self.win.width > 1:
            self.win.keep_last(n)
        if Kd == 0:  # a plain step is faster than any draft: skip the heads (they catch up later)
            self.policy.depth_hist[0] += n  # acc_wa[0, 0]: loop() counts the plain row-steps
            emitted = self._plain_step()
            if e.cuda:
                torch.cuda.synchronize()
            self.policy.record_step(n, 1, time.perf_counter() - t0, emitted=float(emitted.sum()) / n)
            return
        # per-row depths in entropy mode where the control says so (spec.control.per_row_depths:
        # by default on a CPU, where reading them back is free; a GPU's verify is padded anyway)
        choose = self.spec.mode == "entropy" and not explore and self.policy.stops_early(n)
        if e.cuda and not choose:  # one replayed graph, no host reads inside
            self._spec_step_cuda(n, Kd, blind, t0)
            return
        u = row_uniforms(self.keys[:n], self.n_out[:n], _S_SPEC, 2 * self.K + 1)  # [n, 2K+1]
        draft_probs, draft_tok, draft_bins, dlen, expected = self._draft(n, Kd, u, choose)
        t1 = time.perf_counter()
        h, W, toks, num, lps, ents = self._verify(n, draft_probs, draft_tok, dlen, u)
        live = ~self.done[:n]
        emitted = self._emit(slice(0, n), toks, lps, ents, num, dlen=dlen)
        self.win.restart(n, h, toks, num, live, first_pos=self.lengths[:n] - num * live)
        # A row advances by the tokens it accepted, not by W: on a GPU the bound grows by W
        # (reading lengths back costs a sync; compaction tightens it), on a CPU it is exact.
        self.len_bound = self.len_bound + W if e.cuda else int(self.lengths[:n].max())
        self._count(n, draft_bins, dlen, num, live, blind)
        if e.cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        self.stats.draft_time_s += t1 - t0
        self.stats.verify_time_s += t2 - t1
        self._record(n, W, dlen, t2 - t0, Kd, emitted, num, live, blind, expected)

    def _spec_step_cuda(self, n: int, Kd: int, blind: bool, t0: float):
        """A drafting step on CUDA: draft Kd per row, verify Kd + 1 per row, accept, emit, as one
        piece of device work over a rows bucket (padded with finished rows), replayed from a
        CUDA graph per (rows bucket, depth, attention spans, window width, settings); then the
        depth policy's bookkeeping and one read-back. Draft and verify time count as verify time."""
        e, W = self.e, Kd + 1
        rows = e.graphs.rows(n, e.max_batch)
        spans = (self._kv(self.len_bound + W), self._kv(self.len_bound + Kd + 2), self.win.padded_width(True))
        table = self.policy.table._inner_edges.data_ptr() if self.spec.mode == "entropy" else None
        key = ("spec", rows, Kd, self.K, self.spec.draft, table) + spans + self.graph_key
        bins, dlen, num, live, sums = e.graphs.run(key, lambda: self._spec_device(rows, Kd))
        self.win.width = W  # HeadWindow.restart's host side, which a replay does not run
        self.len_bound += W  # lengths grow by what each row accepted: compaction tightens the bound
        self._count(n, None if bins is None else bins[:n], dlen[:n], num[:n], live[:n], blind)
        torch.cuda.synchronize()
        got, proposed, n_live = sums.tolist()
        seconds = time.perf_counter() - t0
        self.stats.verify_time_s += seconds
        self.policy.depth_hist[W - 1] += n
        self._record_step(n, W, seconds, Kd, got, proposed, n_live, blind, None)

    def _spec_device(self, n: int, Kd: int):
        """A drafting step's device work over slots [0, n) (no host reads, no host state but the
        window's width: rollout.cuda_graphs captures it). Returns the drafts' entropy bins (None
        outside entropy mode), draft lengths, tokens emitted by rejection sampling and liveness
        [n] each, and (tokens appended, tokens proposed to live rows, live rows)."""
        u = row_uniforms(self.keys[:n], self.n_out[:n], _S_SPEC, 2 * self.K + 1)  # [n, 2K+1]
        draft_probs, draft_tok, draft_bins, dlen, _ = self._draft(n, Kd, u, False)
        h, W, toks, num, lps, ents = self._verify(n, draft_probs, draft_tok, dlen, u)
        live = ~self.done[:n]
        emitted = self._emit(slice(0, n), toks, lps, ents, num, dlen=dlen)
        self.win.restart(n, h, toks, num, live, first_pos=self.lengths[:n] - num * live)
        return draft_bins, dlen, num, live, torch.stack((emitted.sum(), (num * live).sum(), live.sum()))

    def _verify(self, n: int, draft_probs, draft_tok, dlen, u):
        """One policy forward over every row's last token and its dlen[b] drafts (ragged on a
        CPU: spec_heads.layers.Ragged), then exact accept/reject. Returns hidden states
        [n, W, H], W, emitted tokens [n, W] (-1 past each row's end), their count [n], their
        log-probabilities and the policy's entropies [n, W]."""
        e, sp, dev = self.e, self.sp, self.e.device
        W = 1 + draft_tok.shape[1]
        inp = torch.cat([self.last_tok[:n, None], draft_tok], 1)  # [n, W]
        pos = self.lengths[:n, None] + torch.arange(W, device=dev)
        ragged = None if e.cuda or not bool((dlen < W - 1).any()) else Ragged.from_counts(1 + dlen, W)
        h = e.model(inp, pos, self.cache, self._kv(self.len_bound + W),
                    n_tokens=None if ragged is None else 1 + dlen)  # [n, W, H]
        fed = h.reshape(n * W, -1) if ragged is None else ragged.pack(h)  # [T, H]
        tlp = sampling_logprobs(e.model.logits(fed), sp.temperature, sp.top_k, sp.top_p)  # [T, V]
        tp = tlp.exp()
        # [n, W, V] for the sampler: a view where every row verifies W - 1 drafts, else a gather
        # (padding repeats the row's last real token; the sampler never reads it)
        slot = torch.arange(n * W, device=dev).view(n, W) if ragged is None else ragged.slot  # [n, W] -> T
        toks, num = rejection_sample(tp.view(n, W, -1) if ragged is None else tp[slot], draft_probs, draft_tok,
                                     dlen, uniforms=(u[:, self.K: self.K + W - 1], u[:, 2 * self.K]))  # [n, W], [n]
        lps = tlp[slot, toks.clamp(min=0)]  # [n, W]
        ents = _entropy(tp, tlp)[slot]  # [n, W]
        return h, W, toks, num, lps, ents

    def _count(self, n: int, draft_bins, dlen, num, live, blind: bool):
        """The depth policy learns the heads' acceptance with their context: rows already done
        count for nothing, nor do rows whose heads miss part of it (they would rate the heads
        low after every plain stretch). The rollout's statistics count every live row: row-steps
        by (drafts verified, drafts accepted), a device accumulator read once at the end."""
        if self.spec.mode == "entropy" and not blind:
            seen = live & self.win.has_context(n)
            self.policy.observe_bins(draft_bins, dlen * seen, (num - 1) * seen)
        if blind:  # drafts without the heads' context: their acceptance is no measure of the heads
            self.acc_blind.index_add_(0, dlen, live.long())
        else:
            self.acc_wa.index_put_((dlen, num - 1), live.long(), accumulate=True)

    def _record(self, n, W, dlen, seconds, planned, emitted, num, live, blind, expected):
        """Tell the depth policy what the step cost and yielded: what it really emitted per row,
        and what rejection sampling proposed per live row (their ratio is what stops,
        max_new_tokens and done rows cost apart from this step's luck). A blind exploring
        step's drafts lack the heads' context: it is credited with the yield of drafting."""
        if self.e.cuda:  # the verify is padded: every row verifies W - 1 drafts
            self.policy.depth_hist[W - 1] += n
        else:
            for d, c in enumerate(torch.bincount(dlen, minlength=self.K + 1).tolist()):
                self.policy.depth_hist[d] += c
        got, proposed, n_live, fed = torch.stack((emitted.sum(), (num * live).sum(), live.sum(),
                                                  dlen.sum())).tolist()
        self._record_step(n, max(2, round(1 + fed / n)), seconds, planned, got, proposed, n_live, blind, expected)

    def _record_step(self, n, tokens_per_row, seconds, planned, got, proposed, n_live, blind, expected):
        """_record's host half: tokens_per_row is the cost model's cell (a drafting step's)."""
        self.policy.record_step(n, tokens_per_row, seconds, planned=planned, emitted=got / n,
                                proposed=proposed / n_live if n_live and not blind else None, blind=blind,
                                expected=expected)
        if self.spec.log_every and self.stats.steps % self.spec.log_every == 0:
            log.info("depth policy at step %d (rows=%d, width=%d): %s", self.stats.steps, n, tokens_per_row,
                     self.policy.summary())

    # ----------------------------------------------------------- bookkeeping
    def _emit(self, sl: slice, toks, lps, ents, num, dlen=None, count_step=True):
        """Append up to num[b] tokens per row (stopping at a stop token or max_new_tokens);
        rows already done are left untouched. toks/lps/ents [m, W], num [m]. Returns the tokens
        appended per row [m] (device)."""
        m, W = toks.shape
        dev = toks.device
        done, n_out = self.done[sl], self.n_out[sl]
        live = ~done
        j = torch.arange(W, device=dev)
        is_stop = (toks == self.stop_ids[0]) if self.stop_ids.numel() == 1 else torch.isin(toks, self.stop_ids)
        # 1 + index of the first stop token among the emitted ones (W + 1: none)
        stop_at = torch.where(is_stop & (j[None] < num[:, None]), j[None] + 1, W + 1).amin(1)
        # keep tokens up to and including the first stop, and within max_new_tokens
        cnt = torch.minimum(torch.minimum(num, stop_at), self.sp.max_new_tokens - n_out) * live
        # Write all W columns: those past cnt are not part of the row (n_out bounds what is
        # read) and the next append starts at n_out + cnt, overwriting them. The buffers have
        # room: n_out <= max_new_tokens and W <= K + 1.
        col = n_out[:, None] + j[None]  # [m, W]
        rows = torch.arange(sl.start, sl.start + m, device=dev)[:, None].expand(m, W)
        self.out_tok[rows, col] = toks
        self.out_lp[rows, col] = lps.to(self.out_lp.dtype)
        self.out_ent[rows, col] = ents.to(self.out_ent.dtype)
        new_out = n_out + cnt
        finished = live & ((stop_at <= cnt) | (new_out >= self.sp.max_new_tokens))
        last = toks.gather(1, (num - 1).clamp(min=0)[:, None])[:, 0]
        if count_step:
            if dlen is not None:  # a done row's write lands past its n_steps: never read
                step_col = self.n_steps[sl].clamp(max=self.out_dl.shape[1] - 1)
                r1 = torch.arange(sl.start, sl.start + m, device=dev)
                self.out_dl[r1, step_col] = dlen
                self.out_acc[r1, step_col] = num - 1
            self.n_steps[sl] += live
            self.lengths[sl] += num * live
            self.acc_rowsteps += live.sum()
        self.acc_tokens += cnt.sum()
        self.last_tok[sl] = torch.where(done, self.last_tok[sl], last)
        self.n_out[sl] = new_out
        self.done[sl] = done | finished
        return cnt

    def _collect(self):
        """Hand finished rows to the results (one read-back), then compact the active slots."""
        n = self.n
        done = self.done[:n].tolist()
        fin = [b for b in range(n) if done[b]]
        if not fin:
            return
        idx = torch.tensor(fin, device=self.e.device)
        n_out, n_steps = self.n_out[idx].tolist(), self.n_steps[idx].tolist()
        if self.K and self.spec.mode == "entropy":  # what a row yields, against its heads' prefill
            self.policy.record_finished(len(fin), sum(n_out))
        # read back only the columns written: the buffers are max_new_tokens + K + 1 wide, answers
        # are often far shorter than max_new_tokens
        k_max, s_max = max(n_out), max(n_steps)
        toks, lps, ents = (t[idx, :k_max].tolist() for t in (self.out_tok, self.out_lp, self.out_ent))
        dls, accs = self.out_dl[idx, :s_max].tolist(), self.out_acc[idx, :s_max].tolist()
        for r, b in enumerate(fin):
            i = self.slot_prompt[b]
            k = n_out[r]
            stop = k > 0 and toks[r][k - 1] in self.sp.stop_token_ids
            self.results[i] = Sequence(
                prompt_id=self.ids[i], prompt=list(self.prompts[i]), tokens=toks[r][:k], logprobs=lps[r][:k],
                entropies=ents[r][:k], finish_reason="stop" if stop else "length",
                policy_version=self.e.policy_version,
                draft_lengths=dls[r][: n_steps[r]] if self.K else [], accepted=accs[r][: n_steps[r]] if self.K else [])
            self.slot_prompt[b] = -1
            if self.progress is not None:
                self.progress.update(1)
            if self.on_finish is not None:
                self.on_finish(self.results[i])
        keep = [b for b in range(n) if not done[b]]
        self._compact(keep)

    def _compact(self, keep: list[int]):
        """Make the rows in `keep` occupy slots [0, len(keep)) (cache rows included), moving
        only the rows above that range into the holes below it: a finished row costs one move,
        not a shift of every row after it. Row order is free: results are keyed by slot_prompt."""
        m = len(keep)
        kept = set(keep)
        holes = [b for b in range(m) if b not in kept]
        moves = list(zip([b for b in keep if b >= m], holes))
        if moves:
            dev = self.e.device
            src = torch.tensor([s for s, _ in moves], device=dev)
            dst = torch.tensor([d for _, d in moves], device=dev)
            tensors = [self.row_int, self.done, self.out_int, self.out_float]
            if self.win is not None:
                tensors += self.win.tensors()
            for t in tensors:
                t[dst] = t[src]
            # cache entries at or past a row's length are rewritten before they are read; the
            # heads' entry of position p sits at p + 1, and a step writes up to K + 1 past it
            upto = self.len_bound + self.K + 2
            for c in (self.cache, self.hcache):
                if c is not None:
                    c.move_rows(moves, upto, index=(src, dst))
            for s, d in moves:
                self.slot_prompt[d] = self.slot_prompt[s]
        for b in range(m, self.n):
            self.slot_prompt[b] = -1
        self.done[m:self.n] = True
        self.n = m
        self.len_bound = int(self.lengths[:m].max()) if m else 0
