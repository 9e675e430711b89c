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

import torch
from torch import nn

from rollout.cuda_graphs import DecodeGraphs, GraphConfig
from rollout.types import LengthError, RolloutBatch, RolloutStats, Sequence, SamplingParams, SpecParams
from spec_heads.depth import DepthPolicy
from spec_heads.fused import fused_elementwise
from spec_heads.layers import (Attention, calibrate_cpu_attention, calibrate_cpu_row_padding, cpu_attention,
                               set_cpu_attention, set_cpu_row_padding)
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
    -0.0, not NaN. entr() takes a log per element: 8.5 ms of a ~140 ms plain step of SmolLM2's
    49k vocabulary at 128 rows on the 2-core CPU, where the dot product took 3.4 ms."""
    if logprobs is None:
        return torch.special.entr(probs).sum(-1)
    return -torch.linalg.vecdot(probs, logprobs.clamp_min(_LOG_FLOOR))


def _attention_backends(device: torch.device):
    """Decoding's attention kernels: on CUDA every SDPA backend but cuDNN's, which builds an
    execution plan per new shape (~0.65 ms of host time per call on average, profiled on an
    H200); a decode loop meets new (rows, tokens, kv length) shapes all the time as rows finish
    and draft widths change, and those builds made speculative steps several times slower than
    plain ones."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _bucket(n: int, quantum: int) -> int:
    return -(-n // quantum) * quantum


_ROW_PADDING: dict[tuple, dict[int, int]] = {}  # (weight shapes, dtype, threads) -> table


def _calibrate_row_padding(model) -> None:
    """On a CPU, time the policy's linear weights at 1..12 rows, shape by shape, once per shape
    set, dtype and thread count in this process, and pad row counts where the BLAS multiplies
    more rows faster (spec_heads.layers.calibrate_cpu_row_padding): verifying 1-8 drafts at
    batch 1 and a batch draining to its last rows multiply just such row counts."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    key = (tuple(tuple(w.shape) for w in weights), weights[0].dtype if weights else None,
           torch.get_num_threads())
    if key not in _ROW_PADDING:
        _ROW_PADDING[key] = calibrate_cpu_row_padding(weights)
        log.info("CPU row padding for this policy's matrix products (weight shape: rows -> rows): %s", _ROW_PADDING[key])
    set_cpu_row_padding(_ROW_PADDING[key])


_ATTENTION: dict[tuple, set] = {}  # (heads, kv heads, head dim, dtype, threads) -> grouped classes


def _calibrate_attention(*modules) -> None:
    """On a CPU, time the two attention kernels at each attention shape of these modules (the
    policy's and its heads'), once per shape, dtype and thread count in this process, and run
    grouped_attention where it is faster (spec_heads.layers.calibrate_cpu_attention: in
    bfloat16 SDPA took 4x its time for one query per row at 128 rows)."""
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
    set_cpu_attention({**cpu_attention(), **table})  # other engines' shapes stay


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
        # a prefill of one prompt costs most of what one of several costs (a 135M model on the
        # CPU: ~500 prompt tokens/s alone, ~735 in a group of 32; on a GPU both are one
        # launch-bound forward), and speculative rows that hit max_new_tokens finish over
        # several steps instead of all at one, so refilling every freed slot at once made a
        # speculative run's prefill several percent dearer than the same prompts without
        # speculation. A slot waits a few steps at most.
        if min_refill is not None and not 1 <= min_refill <= max_batch:
            raise ValueError(f"min_refill: must be in 1..max_batch ({max_batch}), got {min_refill}")
        self.min_refill = min_refill or max(1, max_batch // 8)
        if not self.cuda:
            _calibrate_row_padding(model)
            _calibrate_attention(model, heads)
        self.depth_policy: DepthPolicy | None = None  # the one the last generate() used
        self._policies: dict[tuple[str, int], DepthPolicy] = {}
        self._cost = None  # spec_heads.depth.CostModel, shared by the policies
        self._cache = self._head_cache = None
        # on CUDA, plain decode steps run over row buckets, replayed from graphs (rollout.cuda_graphs)
        self.graphs = DecodeGraphs(graphs) if self.cuda else None
        self._buffers: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ public
    def set_heads(self, heads):
        self.heads = heads.eval() if heads is not None else None
        if not self.cuda:
            _calibrate_attention(self.model, self.heads)
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
        with _attention_backends(self.device), fused_elementwise(fuse):
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

    def ensure_depth_policy(self, spec: SpecParams, K: int) -> DepthPolicy:
        """The depth policy for this mode. Policies live as long as the engine (calibration is
        learned across generate calls); all modes share one cost model, probed once, because
        what a verified token costs is a property of the model and machine, not of the mode."""
        key = (spec.mode, K)
        dp = self._policies.get(key)
        if dp is None:
            dp = DepthPolicy(spec.mode, min(spec.k, K), K, spec.calibration_bins, self.model.config.vocab_size,
                             self.max_batch, device=self.device)
            if self._cost is not None and self._cost.max_tokens >= K + 1:
                dp.cost = self._cost
            elif spec.mode == "entropy":
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
        # Timing each cell's calls back to back let a slow moment of a shared machine (tens of
        # percent, for seconds) land on one cell and decide the cost model's best depth: from
        # process to process it put the tiny policy's at 128 rows at 1, 2 or 7, and a climb that
        # starts where drafting loses goes plain (spec_heads.depth). In turn, a slow moment
        # shorter than a pass reaches at most one of a cell's timings.
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
        verify's rejection sampling and per-position entropies (over [rows, tokens, vocab]: for
        SmolLM2's 49k vocabulary a real share of a step, and one that grows with depth). The
        heads start from a one-position window: probes that gave them a full window of `tokens`
        positions (what a fully accepted step leaves) cost each depth 6.3 ms at 128 rows of the
        tiny policy on the CPU, where real steps cost ~4.5 ms, and put the best depth at 1."""
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
        self.draft_lm = eng.heads.draft_lm_head(eng.model.lm_head) if K else None
        cap = sampling.max_new_tokens + K + 1
        z = lambda *s, dt=torch.int64: torch.zeros(*s, dtype=dt, device=dev)
        persistent = lambda name, *s, dt=torch.int64: eng.buffer(name, s, dt)
        # Per-row state lives in a few buffers, each field a view of one: compaction moves rows
        # with one copy per buffer (_compact), not one per field. On a 2-core CPU at 128 rows of
        # the tiny policy, one copy per field and per cache layer took 98 ms of a ~1.5 s call
        # (47 ms with these buffers and KVCache.move_rows).
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
        self.hid = None
        if eng.heads is not None and K:
            # The heads' window: per row, the trunk's hidden states at the positions fed since
            # the heads last ran (index t is position hstart + t, valid up to hlast) and the
            # token that followed each. A drafting step consumes it; plain steps (no drafting
            # this step) append to it. A window that fills during a plain stretch is dropped,
            # not run through the heads: catching a sequential head up costs one head layer per
            # position, a real cost at large batches, for drafts that did not pay anyway. The
            # head then attends only from hfloor (its first valid cache position) onwards.
            H = eng.model.config.hidden_size
            self.window = max(K + 1, _WINDOW)
            self.hid = torch.zeros(B, self.window, H, dtype=eng.dtype, device=dev)
            self.nxt = z(B, self.window)
            self.hstart, self.hlast, self.hfloor = self.row_int[:, 5:].unbind(1)
            self.hwidth = 1  # host: upper bound of hlast + 1 over active rows
        self.slot_prompt = [-1] * B  # host: prompt index in each slot
        self.n = 0  # active rows occupy slots [0, n)
        self.len_bound = 0  # host upper bound of lengths[:n]
        self.queue = deque(range(len(prompts)))
        self.results: list[Sequence | None] = [None] * len(prompts)
        self.stats = RolloutStats(drafted_per_pos=[0] * K, accepted_per_pos=[0] * K, depth_hist=[0] * (K + 1))
        self.acc_wa = z(K + 1, K + 1)  # [drafts verified, drafts accepted] -> live row-steps
        self.acc_blind = z(K + 1)  # [drafts verified] -> live row-steps of blind exploring steps
        self.acc_tokens, self.acc_rowsteps = persistent("acc", 2).unbind()
        if eng.graphs is not None and not K:
            # what a plain run's graphs read and write; any of it in new storage drops them
            eng.graphs.bind([*eng.model.parameters(), *eng.model.buffers(), self.cache.buf, self.row_int, self.done,
                             self.out_int, self.out_float, self.stop_ids, self.acc_tokens])
            # what a graph bakes in besides the buffers: the sampling settings and stop tokens
            self.graph_key = (sampling.temperature, sampling.top_k, sampling.top_p, sampling.max_new_tokens,
                              tuple(stops))

    def _kv(self, n: int) -> int:
        """Attention span for a forward: a bucketed bound on the longest row (static shapes)."""
        return min(_bucket(n, 64), self.cache.max_len)

    # ----------------------------------------------------------------- loop
    def loop(self) -> RolloutBatch:
        e, t0 = self.e, time.perf_counter()
        self._refill()
        step = 0
        # A speculative step reads its outcome back anyway (the depth policy's timings), so its
        # finished rows go at once: on a GPU, collected every sync_every steps, a row done at
        # one step was drafted and verified for up to 3 more (the tiny policy at batch 1 on an
        # H200: ~21-token answers, 8-deep steps costing ~3.4 plain ones; their zero yield also
        # made entropy mode rate drafting below plain steps and turn it off).
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
            self.acc_wa[0, 0] = self.acc_rowsteps - self.acc_wa.sum() - self.acc_blind.sum()
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
            # each row's heads start from its last prompt position
            self.hid[sl, 0], self.nxt[sl, 0] = last, tok
            self.hstart[sl], self.hlast[sl] = lens_t - 1, 0
        if self.K and self.policy.skips_heads_prefill(self.n + m):
            # Where real timings at these rows have switched drafting off, or it is off there
            # and nothing has drafted for a while (DepthPolicy.skips_heads_prefill), the heads
            # skip the prompts: the pass costs one head block per prompt token (for the tiny
            # policy's four layers, a fifth of its prefill; the entropy run at 128 rows stayed
            # plain and still measured 0.94x of off). Such rows draft from their last prompt
            # position on if drafting comes back; the exploring steps that bring it back are
            # blind anyway.
            self.hfloor[sl] = lens_t  # no head-cache entry before the row's window
            self.stats.heads_prefill_skipped += m
        elif self.K:
            # The heads catch up over the prompt (sequential heads fill their own KV cache), also
            # while drafting is off by the start-up cost model alone: a row admitted without it drafts without
            # its prompt for its whole life, its drafts' real yield is low, and drafting stays
            # off (session 5: SmolLM2 at batch 1 went plain, 0.95x, where fixed 4 gave 1.49x;
            # the pass costs ~4% of a 135M model's prefill on a CPU, ~6% on an H200).
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
            self.hfloor[sl] = 0
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
        if graphs is not None and self.hid is None:
            # Rows past n are finished (done) or empty slots: they emit nothing, and what they
            # write lands past their lengths, where nothing reads before a row's next write.
            rows = graphs.rows(n, self.e.max_batch)
            graphs.run((rows, kv) + self.graph_key, lambda: self._plain_device(rows, kv))
            self.len_bound += 1
            return None
        h, tok, emitted = self._plain_device(n, kv)
        if self.hid is not None:  # a speculative run not drafting this step: feed the window
            if self.hwidth >= self.window:
                self._drop_window(n)
            idx, rows = self.hlast[:n] + 1, torch.arange(n, device=h.device)
            self.hid[rows, idx], self.nxt[rows, idx] = h[:, 0], tok
            self.hlast[:n] = idx
            self.hwidth += 1
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
        """Run the heads over each row's window; returns depth-1 logits and the draft state.

        On a GPU the window's width is padded to 16 or to the whole window: a launch-bound
        device runs 16 positions as fast as 2, and every new shape costs first-call work (seen
        as 10x slower head calls on an H200 while widths varied step to step). Padding entries
        are invalid (past hlast) and go to the head cache's scratch slot."""
        e, w = self.e, self.hwidth
        if e.cuda:
            w = min(16, self.window) if w <= 16 else self.window
        pos = self.hstart[:n, None] + torch.arange(w, device=e.device)
        return e.heads.begin(self.hid[:n, :w], self.nxt[:n, :w], pos, self.hlast[:n],
                             e.model.embed_tokens, self.draft_lm, self.hcache,
                             self._kv(self.len_bound + K + 2), floor=self.hfloor[:n])

    def _keep_last_window_entry(self, n: int):
        """Shrink each row's window to its last entry (the heads then attend from there on)."""
        rows, last = torch.arange(n, device=self.e.device), self.hlast[:n].clamp(min=0)
        self.hid[:n, 0], self.nxt[:n, 0] = self.hid[rows, last], self.nxt[rows, last]
        self.hstart[:n] += last
        self.hfloor[:n] = self.hstart[:n] + 1
        self.hlast[:n] = 0
        self.hwidth = 1

    def _drop_window(self, n: int):
        """Forget a full window: the heads restart at the next position, attending only to
        head-cache entries from there on (hfloor; the depth-1 entry of position p sits at p + 1)."""
        self.hstart[:n] += self.hlast[:n] + 1
        self.hfloor[:n] = self.hstart[:n] + 1
        self.hlast[:n] = -1
        self.hwidth = 0

    def _draft(self, n: int, K: int, u: torch.Tensor, early_stop: bool = True):
        """Draft up to K tokens per row with uniforms u [n, >=K]. Returns draft_probs [n, k, V]
        fp32, tokens [n, k] and the drafts' entropy bins in the acceptance table [n, k] (None
        outside entropy mode), k <= K: in entropy mode on a CPU, drafting stops early once one
        more depth is not worth its cost for the batch (depth_policy.keep_drafting).
        """
        e, sp = self.e, self.sp
        # on a CPU in entropy mode the chain always stops where no row can use another draft;
        # an exploring step (early_stop=False) skips only the policy's cost rule
        host = self.spec.mode == "entropy" and not e.cuda
        early_stop = early_stop and host and self.policy.stops_early(n)
        logits, st = self._begin_heads(n, K)
        if e.heads.kind == "parallel":
            return self._draft_parallel(n, K, u, st, early_stop)
        table, calibrate = self.policy.table, self.spec.mode == "entropy"
        probs, toks, bins = [], [], []
        all_accepted = expected = None
        if host:
            # A draft past a row's drafted stop token, or past what its max_new_tokens leaves
            # room for, can never be emitted: such rows add nothing to one more depth. (Depth 0
            # of this step emits up to 1 + drafts tokens; the row has room for `room` more.)
            room = (self.sp.max_new_tokens - self.n_out[:n]).tolist()
            useful = [1.0] * n
            stop_ids = set(self.sp.stop_token_ids or ())
        for i in range(K):
            dp = sampling_probs(logits, sp.temperature, sp.top_k, sp.top_p)  # [n, V] fp32
            if calibrate:  # the draft distribution's entropy, binned for the acceptance table
                bins.append(table.bins(_entropy(dp)))
            if self.spec.draft == "greedy":  # baseline: argmax drafts, still exact (one-hot draft)
                dp = torch.zeros_like(dp).scatter_(1, dp.argmax(1, keepdim=True), 1.0)
            tok = sample_with_uniforms(dp, u[:, i])
            probs.append(dp), toks.append(tok)
            if i + 1 == K:
                break
            if host:  # host floats: on a CPU reading the n predictions back is free
                if stop_ids:
                    useful = [0.0 if t in stop_ids else u for t, u in zip(tok.tolist(), useful)]
                useful = [u if r >= i + 3 else 0.0 for r, u in zip(room, useful)]
                if not any(useful):
                    break
            if early_stop:
                a = table.predict_bins(bins[-1]).tolist()
                all_accepted = a if all_accepted is None else [p * x for p, x in zip(all_accepted, a)]
                expected = [1.0 + p for p in a] if expected is None else [e + p for e, p in zip(expected, all_accepted)]
                gain = sum(p * u for p, u in zip(all_accepted, useful))
                if not self.policy.keep_drafting(gain, sum(expected), n, i + 1):
                    break
            logits, st = e.heads.step(st, tok, e.model.embed_tokens, self.draft_lm)
        return torch.stack(probs, 1), torch.stack(toks, 1), torch.stack(bins, 1) if calibrate else None

    def _draft_parallel(self, n: int, K: int, u: torch.Tensor, st, choose: bool):
        """Parallel heads draft every depth at once; with `choose` (entropy mode on a CPU) the
        drafts are then cut at the depth the batch gains most from (depth_policy.best_depth)."""
        e, sp = self.e, self.sp
        dp = sampling_probs(e.heads.all_logits(st, self.draft_lm, K), sp.temperature, sp.top_k,
                            sp.top_p)  # [n, K, V]
        bins = self.policy.table.bins(_entropy(dp)) if self.spec.mode == "entropy" else None  # [n, K]
        if self.spec.draft == "greedy":
            dp = torch.zeros_like(dp).scatter_(-1, dp.argmax(-1, keepdim=True), 1.0)
        toks = sample_with_uniforms(dp, u[:, :K])  # [n, K]
        if choose and K > 1:
            k = self.policy.best_depth(self.policy.table.predict_bins(bins), n)
            dp, toks, bins = dp[:, :k], toks[:, :k], bins[:, :k]
        return dp, toks, bins

    def _spec_step(self):
        e, sp, n, dev = self.e, self.sp, self.n, self.e.device
        t0 = time.perf_counter()
        # how deep this step drafts (0: a plain step), and whether it explores beyond the
        # policy's budget (spec_heads.depth.DepthPolicy.plan_step)
        budget, Kd, explore = self.policy.plan_step(n)
        budget, Kd = min(budget, self.K), min(Kd, self.K)
        # After a plain stretch, explore from each row's last position only: running the heads
        # over the whole window would cost a head layer per position and row, and the exploring
        # step must cost what an ordinary drafting step costs. Its drafts then lack the heads'
        # context, so it times a drafting step but its acceptance is not counted.
        blind = explore and not budget
        if blind and self.hwidth > 1:
            self._keep_last_window_entry(n)
        if Kd == 0:  # a plain step is faster than any draft: skip the heads (they catch up later)
            self.policy.depth_hist[0] += n  # acc_wa[0, 0]: loop() counts the plain row-steps
            emitted = self._plain_step()
            if e.cuda:
                torch.cuda.synchronize()
            self.policy.record_step(n, 1, time.perf_counter() - t0, emitted=float(emitted.sum()) / n)
            return
        u = row_uniforms(self.keys[:n], self.n_out[:n], _S_SPEC, 2 * self.K + 1)  # [n, 2K+1]
        draft_probs, draft_tok, draft_bins = self._draft(n, Kd, u, early_stop=not explore)
        # Verify width W = 1 + drafts made. The forward is padded to the deepest row anyway,
        # so every row verifies all the drafts made: a per-row choice could only waste them.
        # (Exactness does not depend on how deep a row drafts.)
        W = 1 + draft_tok.shape[1]
        dlen = torch.full((n,), W - 1, dtype=torch.int64, device=dev)
        self.policy.depth_hist[W - 1] += n
        t1 = time.perf_counter()
        inp = torch.cat([self.last_tok[:n, None], draft_tok], 1)  # [n, W]
        pos = self.lengths[:n, None] + torch.arange(W, device=dev)
        h = e.model(inp, pos, self.cache, self._kv(self.len_bound + W))  # [n, W, H]
        tlp = sampling_logprobs(e.model.logits(h), sp.temperature, sp.top_k, sp.top_p)  # [n, W, V]
        acc_u, fin_u = u[:, self.K: self.K + W - 1], u[:, 2 * self.K]
        tp = tlp.exp()
        toks, num = rejection_sample(tp, draft_probs, draft_tok, dlen,
                                     uniforms=(acc_u, fin_u))  # [n, W], [n]
        safe = toks.clamp(min=0)
        lps = tlp.gather(2, safe[..., None])[..., 0]  # [n, W]
        ents = _entropy(tp, tlp)  # [n, W]
        live = ~self.done[:n]
        emitted = self._emit(slice(0, n), toks, lps, ents, num, dlen=dlen)
        # the heads start next step from the fed positions that were accepted
        self.hid[:n, :W], self.nxt[:n, :W] = h, safe
        self.hstart[:n] = torch.where(live, pos[:, 0], self.hstart[:n])
        # rows already done restart from index 0, so a narrower next step never indexes past W
        self.hlast[:n] = torch.where(live, num - 1, torch.zeros_like(num))
        self.hwidth = W
        if self.spec.mode == "entropy" and not blind:
            # The depth policy learns the heads' acceptance with their context: rows already done
            # count for nothing, and neither do rows whose heads miss part of it (hfloor > 0:
            # admitted without the heads' prefill where drafting was measured off, or a window
            # dropped or trimmed in a plain stretch). Counted, such rows rated the heads low
            # after every plain stretch (the tiny policy at 128 rows on the CPU: 0.89 / 0.88 at
            # depths 1-2 against 0.96 / 0.92 with context), and drafting stayed off where fixed
            # depths gained 1.18x; rows admitted while drafting is on get the pass again. The
            # rollout's own statistics (acc_wa) count every live row.
            seen = live & (self.hfloor[:n] == 0)
            self.policy.observe_bins(draft_bins, dlen * seen, (num - 1) * seen)
        # The attention span of later steps follows this bound. A row advances by the tokens
        # it accepted, not by W: on a GPU the bound grows by W (reading lengths back costs a
        # sync; compaction tightens it), on a CPU reading them is free and the bound is exact.
        self.len_bound = self.len_bound + W if e.cuda else int(self.lengths[:n].max())
        # stats: live row-steps by (drafts verified, drafts accepted), a device accumulator
        # read once at the end (loop() derives per-position acceptance and the depth histogram)
        if blind:  # drafts without the heads' context: their acceptance is no measure of the heads
            self.acc_blind[W - 1] += live.sum()
        else:
            self.acc_wa[W - 1].index_add_(0, num - 1, live.long())
        if e.cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        self.stats.draft_time_s += t1 - t0
        self.stats.verify_time_s += t2 - t1
        # What the step really emitted per row, and what rejection sampling proposed per live
        # row: the policy's yield is their ratio, what stops, max_new_tokens and done rows cost
        # apart from this step's luck (record_step). A blind exploring step's drafts lack the
        # heads' context: it is credited with the yield of drafting with context.
        got, proposed, n_live = torch.stack((emitted.sum(), (num * live).sum(), live.sum())).tolist()
        self.policy.record_step(n, W, t2 - t0, planned=Kd, emitted=got / n,
                                proposed=proposed / n_live if n_live and not blind else None, blind=blind)
        if self.spec.log_every and self.stats.steps % self.spec.log_every == 0:
            log.info("depth policy at step %d (rows=%d, width=%d): %s", self.stats.steps, n, W,
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
        # are often far shorter (the tiny task's ~21 tokens of 73 columns)
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
            if self.hid is not None:
                tensors += [self.hid, self.nxt]
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
