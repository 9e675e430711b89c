"""Fitting draft heads to a frozen policy: the initial fit (`specroll fit-heads`) and the RL
loop's re-fits after the policy moves.

Self-distillation: the policy samples sequences, and the heads learn to predict, at every
completion position, the policy's own sampling distribution for the tokens further ahead.
Alignment (spec_heads/heads.py): the depth-i draft at position t predicts token x_{t+1+i},
so its target is the trunk's distribution at position t+i.

Which positions count (the `[B, K, T]` mask):
- depth i at start t counts iff `first <= t` and `t+1+i <= L-1` (the drafted token is a real
  token of the sequence, as in rollout, where drafting past a stop token is wasted); padding
  never counts. `first` is prompt_len-1: in rollout, drafting starts at the prompt's last
  position (the trunk samples the first completion token there and the heads draft the ones
  after it), so prompt positions, where nothing is ever drafted, are not fitted.
- without prompt lengths every position counts (e.g. for plain text).

The distribution both sides are compared in is the sampling distribution at `temperature`
(spec_heads.sampling.sampling_probs, without top-k/top-p: those cut the support to a set that
depends on the logits, which has no useful gradient; they are off in typical RL runs). The
loss sees the draft as softmax(head_logits / temperature); at temperature 0 the target is the
trunk's one-hot argmax and the loss sees softmax(head_logits) (KL is then cross-entropy on the
argmax), while the reported acceptance is argmax agreement, as the engine's greedy check is.

The trunk is frozen: its forward runs under no_grad once per sequence (hidden states are
cached, so each step costs only the heads and the LM head), and its embedding and LM head
enter the heads' graph as detached weights, so fitting never writes a gradient into the policy.
The LM head over a large vocabulary (49k for SmolLM2) is applied in chunks of positions, with
the head features' gradient accumulated chunk by chunk. This module knows nothing about
tokenizers, tasks or Ray.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from rollout.types import SamplingParams, SpecParams
from spec_heads.acceptance import acceptance_rate
from spec_heads.losses import LOSS_NAMES, head_loss, scheduled_loss_name
from spec_heads.sampling import sampling_probs

GRAD_CLIP = 1.0  # max global grad norm of the head parameters
# Elements of one [B, K, chunk, V] logits tensor; a loss holds a few tensors of this size.
CHUNK_ELEMENTS = 1 << 25


@dataclass
class HeadFitConfig:
    """The initial fit of fresh heads (`specroll fit-heads`); the RL loop's re-fits use RefitConfig."""

    num_sequences: int = 1024  # self-distillation samples the policy generates
    holdout: float = 0.1  # fraction held out for reporting acceptance
    steps: int = 600  # optimiser steps, one micro-batch each
    lr: float = 3e-3
    loss: str = "tv"  # tv | e2e_tv | kl | ce
    kl_warmup_steps: int = 150  # fresh heads: KL first (TV gradients vanish at low overlap), then `loss`
    micro_batch_size: int = 32  # sequences per optimiser step
    eval_every: int = 100  # steps between held-out acceptance reports (0: only before and after)
    # The distribution the heads are fitted to: the policy's sampling distribution at this
    # temperature. None: the run's sampling.temperature, the one the engine drafts and verifies at.
    temperature: Optional[float] = None
    # A heads folder to continue fitting from ("": fresh heads). Its kind, depths and draft
    # vocabulary must match `heads`; a continued fit usually needs no KL warm-up (kl_warmup_steps=0).
    init: str = ""

    def __post_init__(self):
        if self.num_sequences < 2:
            raise ValueError(f"num_sequences: must be >= 2 (some to fit on, some held out), got {self.num_sequences}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout: must be in (0, 1), e.g. 0.1 holds out 10% for acceptance reports, "
                             f"got {self.holdout}")
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0 (typical 1e-3..3e-3 for fresh heads), got {self.lr}")
        if self.loss not in LOSS_NAMES:
            raise ValueError(f"loss: must be one of {', '.join(LOSS_NAMES)}, got {self.loss!r}")
        if not 0 <= self.kl_warmup_steps <= self.steps:
            raise ValueError(f"kl_warmup_steps: must be in 0..steps ({self.steps}); lower it or raise steps, "
                             f"got {self.kl_warmup_steps}")
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size: must be >= 1, got {self.micro_batch_size}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every: must be >= 0 (0 reports only before and after), got {self.eval_every}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0 (0 is greedy) or null (use sampling.temperature), "
                             f"got {self.temperature}")


# ------------------------------------------------------------------------------ data


def collect_sequences(engine, prompts_ids: list[list[int]], sampling: SamplingParams, n: int,
                      seed: int, progress=None) -> tuple[list[list[int]], list[int]]:
    """n self-distillation samples (speculation off), cycling through the prompts; each row has
    its own id, so a repeated prompt gets distinct samples. Returns (prompt + completion token
    ids, prompt lengths)."""
    if not prompts_ids:
        raise ValueError("prompts_ids: need at least one prompt to sample from")
    prompts = [prompts_ids[i % len(prompts_ids)] for i in range(n)]
    batch = engine.generate(prompts, sampling, SpecParams(mode="off"), seed=seed, ids=list(range(n)),
                            progress=progress)
    return [s.prompt + s.tokens for s in batch.sequences], [len(s.prompt) for s in batch.sequences]


class _Data:
    """Sequences with their frozen trunk hidden states, right-padded: tokens [N, T],
    hidden [N, T, H], lengths [N], first [N] (first start position that counts)."""

    def __init__(self, model, sequences, prompt_lens, batch_size: int):
        if not sequences or any(len(s) < 2 for s in sequences):
            raise ValueError("sequences: need at least one sequence, each of >= 2 tokens")
        if prompt_lens is not None and len(prompt_lens) != len(sequences):
            raise ValueError(f"prompt_lens: {len(prompt_lens)} lengths for {len(sequences)} sequences")
        dev = next(model.parameters()).device
        N, T = len(sequences), max(map(len, sequences))
        self.tokens = torch.zeros(N, T, dtype=torch.int64, device=dev)
        for b, s in enumerate(sequences):
            self.tokens[b, :len(s)] = torch.tensor(s, device=dev)
        self.lengths = torch.tensor([len(s) for s in sequences], device=dev)
        self.first = torch.tensor([max(p - 1, 0) for p in prompt_lens] if prompt_lens else [0] * N,
                                  device=dev)
        with torch.no_grad():  # the trunk is frozen: one forward per sequence for the whole fit
            self.hidden = torch.cat([model(self.tokens[i:i + batch_size])
                                     for i in range(0, N, batch_size)])  # [N, T, H]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def batch(self, idx: torch.Tensor, K: int):
        """-> hidden [B, T', H], tokens [B, T'], mask [B, K, T'], trimmed to the batch's longest row."""
        T = int(self.lengths[idx].max())
        return self.hidden[idx, :T], self.tokens[idx, :T], \
            depth_mask(self.lengths[idx], self.first[idx], K, T)


def depth_mask(lengths: torch.Tensor, first: torch.Tensor, K: int, T: int) -> torch.Tensor:
    """[B, K, T] bool: depth i (1-based) at start t has a target iff first[b] <= t and
    t + 1 + i <= lengths[b] - 1 (its drafted token is a real token of row b)."""
    t = torch.arange(T, device=lengths.device)[None, None, :]
    depth = torch.arange(1, K + 1, device=lengths.device)[None, :, None]
    return (t >= first[:, None, None]) & (t + 1 + depth <= lengths[:, None, None] - 1)


# ------------------------------------------------------------------------------ targets


def _frozen_fns(model):
    """The trunk's embedding and LM head as functions of detached weights (no grad into the policy)."""
    emb_w = model.embed_tokens.weight.detach()
    head_w = model.lm_head.weight.detach()
    head_b = model.lm_head.bias.detach() if model.lm_head.bias is not None else None
    embed = lambda ids: F.embedding(ids, emb_w)  # noqa: E731
    lm_head = lambda h: F.linear(h.to(head_w.dtype), head_w, head_b).float()  # noqa: E731
    return embed, lm_head


def _target_probs(hidden, lm_head, K: int, t0: int, t1: int, temperature: float,
                  columns: torch.Tensor | None = None) -> torch.Tensor:
    """Depth i at start t targets the trunk's distribution at t+i: [B, K, t1-t0, V] (fp32), or
    only its `columns` [N] ([B, K, t1-t0, N]). Each position's distribution is computed once
    and shared by the K (start, depth) pairs that target it: a view, not K LM-head calls."""
    padded = F.pad(hidden, (0, 0, 0, K))  # [B, T+K, H]; positions past the end are masked out
    with torch.no_grad():
        probs = sampling_probs(lm_head(padded[:, t0 + 1:t1 + K]), temperature)  # [B, Tc+K-1, V]
        if columns is not None:
            probs = probs.index_select(-1, columns)
    return probs.unfold(1, t1 - t0, 1).transpose(2, 3)  # [B, K, Tc, V]: depth i at t -> t+i


def _served_draft_head(heads, model, name: str):
    """(LM head for the drafts in the loss, the target columns it covers or None). With a draft
    vocabulary, the TV and KL losses compare the drafts the engine serves: a softmax over the
    draft vocabulary's rows only (zero elsewhere), against the policy's probabilities of those
    tokens, so 1 - TV is the acceptance rejection sampling will see, and the draft LM head
    multiplies N rows, not the whole vocabulary (4096 of SmolLM2's 49,152). KL is taken against
    the policy's distribution renormalised over the vocabulary (the served draft can put no mass
    elsewhere; its best KL fit there is the renormalised target, which is also where TV starts
    best). CE needs the draft on every token the policy can sample, so it keeps the whole
    vocabulary."""
    if not heads.config.draft_vocab or name not in ("tv", "e2e_tv", "kl"):
        return _frozen_fns(model)[1], None
    served = heads.draft_lm_head(model.lm_head)  # the engine's: the draft vocabulary's rows, detached
    w, b = served.weight, served.bias
    return (lambda h: F.linear(h.to(w.dtype), w, b).float()), served.ids  # noqa: E731


def _renormalised(probs: torch.Tensor) -> torch.Tensor:
    """probs [..., N] scaled to sum to 1 over N (a position with no mass there stays all zero)."""
    mass = probs.sum(-1, keepdim=True)
    return torch.where(mass > 0, probs / mass.clamp(min=torch.finfo(probs.dtype).tiny), 0.0)


def _chunk_len(B: int, K: int, T: int, V: int) -> int:
    return max(1, min(T, CHUNK_ELEMENTS // max(1, B * K * V)))


def _draft_for_loss(draft_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The logits whose softmax is the draft the loss compares (temperature 0: the raw logits)."""
    return draft_logits / temperature if temperature > 0 else draft_logits


def _sampled_tokens(tokens: torch.Tensor, K: int, t0: int, t1: int) -> torch.Tensor:
    """Depth i at start t drafts tokens[t+1+i]: [B, K, t1-t0] (0 past the end, masked out)."""
    padded = F.pad(tokens, (0, K + 1))
    return torch.stack([padded[:, t0 + 1 + i:t1 + 1 + i] for i in range(1, K + 1)], dim=1)


def _loss_count(name: str, mask: torch.Tensor) -> torch.Tensor:
    """How many terms a loss averages over: positions, or for e2e_tv, valid chain prefixes."""
    if name == "e2e_tv":
        return mask.to(torch.int64).cumprod(1).sum()
    return mask.sum()


def batch_loss(heads, model, hidden, tokens, mask, name: str, temperature: float,
               backward: bool = False) -> float:
    """The head loss `name` of one micro-batch (a float); with backward=True its gradient is
    accumulated into the head parameters only. hidden [B, T, H], tokens [B, T], mask [B, K, T].
    The LM head runs over chunks of positions; each chunk's loss is weighted by its share of the
    terms, so the result equals the unchunked loss."""
    embed, lm_head = _frozen_fns(model)
    draft_head, columns = _served_draft_head(heads, model, name)
    K = mask.shape[1]
    with torch.set_grad_enabled(backward):
        feats = heads.train_features(hidden, tokens, embed, depths=K)  # [B, K, T, H]
    leaf = feats.detach().requires_grad_(backward)
    B, _, T, _ = feats.shape
    total = _loss_count(name, mask).clamp(min=1)
    step = _chunk_len(B, K, T, model.config.vocab_size)
    value = 0.0
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        chunk_mask = mask[:, :, t0:t1]
        if not chunk_mask.any():
            continue
        target_probs = _target_probs(hidden, lm_head, K, t0, t1, temperature, columns)  # [B, K, Tc, V or N]
        if columns is not None and name == "kl":
            target_probs = _renormalised(target_probs)
        with torch.set_grad_enabled(backward):
            draft_logits = _draft_for_loss(draft_head(leaf[:, :, t0:t1]), temperature)  # [B, K, Tc, V or N]
            sampled = _sampled_tokens(tokens, K, t0, t1) if name == "ce" else None
            loss = head_loss(name, target_probs, draft_logits, chunk_mask, sampled) \
                * (_loss_count(name, chunk_mask) / total)
            if backward:
                loss.backward()
        value += float(loss.detach())
    if backward and leaf.grad is not None:
        feats.backward(leaf.grad)
    return value


@torch.no_grad()
def acceptance_sums(heads, model, hidden, tokens, mask, temperature: float):
    """Per-depth sums of sum_v min(target, draft) over masked positions, and their counts: [K], [K]."""
    embed, lm_head = _frozen_fns(model)
    # drafts as the engine makes them: from the heads' draft vocabulary where they have one
    draft_lm = heads.draft_lm_head(model.lm_head) if heads.config.draft_vocab else lm_head
    K = mask.shape[1]
    feats = heads.train_features(hidden, tokens, embed, depths=K)  # [B, K, T, H]
    B, _, T, _ = feats.shape
    sums = torch.zeros(K, dtype=torch.float64, device=hidden.device)
    step = _chunk_len(B, K, T, model.config.vocab_size)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        target_probs = _target_probs(hidden, lm_head, K, t0, t1, temperature)
        draft_probs = sampling_probs(draft_lm(feats[:, :, t0:t1]).float(), temperature)  # [B, K, Tc, V]
        alpha = acceptance_rate(target_probs, draft_probs)  # [B, K, Tc]
        sums += torch.where(mask[:, :, t0:t1], alpha, 0.0).sum((0, 2)).double()
    return sums, mask.sum((0, 2))


def _acceptance(heads, model, data: _Data, K: int, batch_size: int, temperature: float) -> list[float]:
    """Mean acceptance per depth over every counted position of `data`: list[K]."""
    was_training = heads.training
    heads.eval()
    sums = torch.zeros(K, dtype=torch.float64)
    counts = torch.zeros(K, dtype=torch.int64)
    for i in range(0, len(data), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(data)), device=data.tokens.device)
        s, c = acceptance_sums(heads, model, *data.batch(idx, K), temperature)
        sums += s.cpu()
        counts += c.cpu()
    heads.train(was_training)
    return (sums / counts.clamp(min=1)).tolist()


def measure_acceptance(model, heads, sequences: list[list[int]], *, prompt_lens: list[int] | None = None,
                       batch_size: int = 16, temperature: float = 1.0) -> list[float]:
    """Per-depth acceptance sum_v min(target, draft) of `heads` against the frozen `model` on
    `sequences` (prompt + completion ids; counted from each prompt's last position on), given
    the earlier drafts accepted: list[num_depths]. What the heads would achieve drafting with
    full context, measured without generating (e.g. on a rollout that did not draft)."""
    was_training = model.training
    model.eval()
    try:
        data = _Data(model, sequences, prompt_lens, batch_size)
        return _acceptance(heads, model, data, heads.num_depths, batch_size, temperature)
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------ the fit


def fit_heads(model, heads, sequences: list[list[int]], *, steps: int, lr: float, loss: str,
              kl_warmup_steps: int, micro_batch_size: int, temperature: float = 1.0,
              prompt_lens: list[int] | None = None, eval_sequences: list[list[int]] | None = None,
              eval_prompt_lens: list[int] | None = None, eval_every: int = 0,
              generator: torch.Generator | None = None, progress=None,
              log_fn: Callable[[dict], None] | None = None) -> dict:
    """Fit `heads` (in place) to the frozen `model`'s sampling distributions on `sequences`
    (prompt + completion token ids; `prompt_lens` marks where completions start, None fits
    every position). AdamW on the head parameters, one micro-batch of `micro_batch_size`
    sequences per step (shuffled epochs drawn with `generator`), KL for the first
    `kl_warmup_steps` steps, then `loss`.

    log_fn(record) is called every `eval_every` steps and after the last one with record =
    {"step", "loss" (mean since the last record), "loss_name" (of the last step),
    "acceptance" (per-depth on eval_sequences, or None without them)}; `progress.update(1)`
    after each step. Returns {"acceptance_before", "acceptance_after" (list[K], [] without
    eval_sequences), "losses", "loss_names" (per step), "time_s", "steps", "num_sequences",
    "temperature"}.
    """
    t_start = time.perf_counter()
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    scheduled_loss_name(0, kl_warmup_steps, loss)  # an unknown loss fails before any work
    K = heads.num_depths
    data = _Data(model, sequences, prompt_lens, micro_batch_size)
    held = _Data(model, eval_sequences, eval_prompt_lens, micro_batch_size) if eval_sequences else None
    evaluate = (lambda: _acceptance(heads, model, held, K, micro_batch_size, temperature)) \
        if held is not None else (lambda: [])
    before = evaluate()
    params = [p for p in heads.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = generator or torch.Generator().manual_seed(0)
    order = torch.empty(0, dtype=torch.int64)
    losses, names, since, after = [], [], [], None
    heads.train()
    for step in range(steps):
        if len(order) < min(micro_batch_size, len(data)):
            order = torch.cat([order, torch.randperm(len(data), generator=generator)])
        idx, order = order[:micro_batch_size], order[micro_batch_size:]
        name = scheduled_loss_name(step, kl_warmup_steps, loss)
        opt.zero_grad(set_to_none=True)
        value = batch_loss(heads, model, *data.batch(idx.to(data.tokens.device), K), name, temperature,
                           backward=True)
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        losses.append(value)
        names.append(name)
        since.append(value)
        if progress is not None:
            progress.update(1)
        last = step + 1 == steps
        if log_fn is not None and ((eval_every and (step + 1) % eval_every == 0) or last):
            after = evaluate() if held is not None else None
            log_fn({"step": step + 1, "loss": sum(since) / len(since), "loss_name": name,
                    "acceptance": after})
            since = []
    heads.eval()
    if log_fn is None:  # otherwise the record after the last step measured it
        after = evaluate()
    if after:  # the heads carry their held-out acceptance (DraftHeads.acceptance)
        heads.set_measured_acceptance(after)
    return {"acceptance_before": before, "acceptance_after": after or [], "losses": losses,
            "loss_names": names, "time_s": time.perf_counter() - t_start, "steps": steps,
            "num_sequences": len(sequences), "temperature": temperature}
