"""The learner: one GRPO/PPO update over a rollout batch, head re-fits, and what a publish ships.

`Learner` is a plain class (no Ray, no tokenizer, no task). It holds the policy (train mode),
a frozen reference only when algo.kl_coef > 0, a ValueHead for PPO, the draft heads, and AdamW
over the policy (and value head). `RLLoop` (learner/loop.py) drives one RL step around it.

The update (`update`):
1. pack the sequences (learner/batching.py) and, without grad, recompute every completion
   token's log-prob under the sampling distribution the rollout used: the mismatch against
   the rollout's behaviour log-probs is logged (~1e-6 in fp32); the rollout's are the old
   log-probs (exact, same model code). Reference log-probs and PPO's rollout-time values come
   from the same pass.
2. advantages: GRPO, group-normalised over the group_size contiguous samples of each prompt;
   PPO, GAE over the value head with the outcome reward on each row's last token.
3. epochs_per_step passes; each pass accumulates gradients over micro-batches whose losses take
   the FULL batch's token/sequence counts (losses.batch_totals), so the accumulated gradient
   equals the full-batch gradient; one optimiser step per pass. A non-finite loss or gradient
   raises `NonFiniteError` before `optimizer.step()`, so the weights stay the last good ones.
"""
from __future__ import annotations

import copy
import math

import torch

from learner.batching import PackedBatch, completion_hidden, logprob_mismatch, pack, token_logprobs
from learner.config import RefitConfig, TrainConfig
from learner.losses import AlgoConfig, batch_totals, gae, grpo_advantages, masked_mean, policy_loss, value_loss
from learner.refit import fit_heads, measure_acceptance
from learner.value import ValueHead
from rollout.types import SamplingParams, Sequence
from spec_heads.acceptance import expected_tokens


_LOSS_KEYS = ("loss", "pg_loss", "value_loss")  # micro-batch shares of the full-batch loss: they add up


class NonFiniteError(RuntimeError):
    """The update produced a NaN/inf loss, gradient or logits; no optimiser step was taken."""


def cpu_state(module: torch.nn.Module | None) -> dict | None:
    """A detached CPU copy of a module's state (what a publish ships); None for None."""
    if module is None:
        return None
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class Learner:
    def __init__(self, policy, heads, *, algo: AlgoConfig, train: TrainConfig, refit: RefitConfig,
                 sampling: SamplingParams, value_head: ValueHead | None = None):
        if sampling.temperature <= 0:
            raise ValueError("sampling.temperature: RL needs a stochastic policy (temperature > 0; "
                             "0 is greedy and has no gradient); set e.g. sampling.temperature=1.0")
        self.algo, self.train_cfg, self.refit_cfg, self.sampling = algo, train, refit, sampling
        self.policy = policy.train()
        self.heads = heads
        self.device = next(policy.parameters()).device
        self.reference = None
        if algo.kl_coef > 0:  # only then: a second copy of the weights is not free
            self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        self.value_head = None
        if algo.name == "ppo":
            self.value_head = (value_head or ValueHead(policy.config.hidden_size)).to(self.device)
        params = list(policy.parameters()) + (list(self.value_head.parameters()) if self.value_head else [])
        self.params = [p for p in params if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=train.lr, betas=tuple(train.betas),
                                           weight_decay=train.weight_decay)
        self.policy_version = 0
        # on_drop: the smoothed accepted length since the last fit (refit_level) against its best
        # since then (refit_baseline); None until the first measured step after a fit
        self.refit_baseline: float | None = None
        self.refit_level: float | None = None

    # ------------------------------------------------------------------ update
    def update(self, sequences: list[Sequence], rewards: torch.Tensor) -> dict:
        """One policy update on a rollout batch; rewards [B], one per sequence, finite."""
        B = len(sequences)
        if rewards.shape != (B,):
            raise ValueError(f"rewards: need one reward per sequence, shape ({B},), got {tuple(rewards.shape)}")
        batch = pack(sequences, self.device)
        rewards = rewards.to(self.device, torch.float32)
        pre = self._score_rollouts(batch)
        advantages, returns = self._advantages(batch, rewards, pre.get("values"))
        full_tokens, full_seqs = batch_totals(batch.mask)
        micro = self.train_cfg.micro_batch_size
        out: dict = {}
        for epoch in range(self.train_cfg.epochs_per_step):
            self.optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = {}
            for a in range(0, B, micro):
                sl = slice(a, min(a + micro, B))
                part = self._micro_loss(batch.rows(sl), advantages[sl],
                                        None if returns is None else returns[sl],
                                        {k: v[sl] for k, v in pre.items() if torch.is_tensor(v)}, full_tokens, full_seqs)
                weight = float(batch.mask[sl].sum() / full_tokens.clamp(min=1.0))
                for k, v in part.items():  # losses are already full-batch shares; metrics are means
                    sums[k] = sums.get(k, 0.0) + (v if k in _LOSS_KEYS else v * weight)
            grad_norm = self._clip_and_check(epoch)
            norm_before = _global_norm(self.params)
            self.optimizer.step()
            self._check_weights(norm_before, epoch)
            if epoch == 0:  # the on-policy pass is the one to log
                out = {**sums, "grad_norm": grad_norm}
        entropy = torch.tensor([e for s in sequences for e in s.entropies] or [0.0])
        out.update(logprob_diff_max=pre["diff_max"], logprob_diff_mean=pre["diff_mean"],
                   entropy_mean=float(entropy.mean()),
                   advantage_abs_mean=float(masked_mean(_per_token(advantages, batch).abs(), batch.mask)))
        return out

    @torch.no_grad()
    def _score_rollouts(self, batch: PackedBatch) -> dict:
        """Learner log-probs (for the mismatch check), reference log-probs, rollout-time values."""
        sp, micro, B = self.sampling, self.train_cfg.micro_batch_size, batch.mask.shape[0]
        lps, refs, values = [], [], []
        for a in range(0, B, micro):
            part = batch.rows(slice(a, min(a + micro, B)))
            hidden = completion_hidden(self.policy, part)  # [b, L', H]
            if not torch.isfinite(hidden).all():
                raise NonFiniteError(f"policy: non-finite hidden states / logits on rollout rows {a}.."
                                     f"{min(a + micro, B) - 1} before the update; the weights have "
                                     "diverged (lower train.lr or raise train.grad_clip's strictness); "
                                     "resume from the last checkpoint")
            lps.append(_pad_to(token_logprobs(self.policy, part, sp.temperature, sp.top_k, sp.top_p,
                                              hidden=hidden)[0], batch))
            if self.reference is not None:
                refs.append(_pad_to(token_logprobs(self.reference, part, sp.temperature, sp.top_k,
                                                   sp.top_p)[0], batch))
            if self.value_head is not None:
                values.append(_pad_to(self.value_head(hidden) * part.mask, batch))
        recomputed = torch.cat(lps)  # [B, L]
        diff_max, diff_mean = logprob_mismatch(recomputed, batch.old_logprobs, batch.mask)
        pre = {"diff_max": diff_max, "diff_mean": diff_mean}
        if self.algo.tis_cap > 0:  # the proximal policy of decoupled PPO: this one, before the update
            pre["prox"] = recomputed
        if refs:
            pre["ref"] = torch.cat(refs)
        if values:
            pre["values"] = torch.cat(values)
        return pre

    def _advantages(self, batch: PackedBatch, rewards: torch.Tensor, values: torch.Tensor | None):
        """GRPO: [B] advantages (broadcast over tokens), no returns. PPO: GAE [B, L] and returns."""
        a = self.algo
        if a.name == "grpo":
            return grpo_advantages(rewards, a.group_size, a.std_normalize), None
        mask = batch.mask
        last = (mask.sum(1).long() - 1).clamp(min=0)  # [B] each row's last real token
        token_rewards = torch.zeros_like(mask).scatter(1, last[:, None], rewards[:, None]) * mask
        return gae(token_rewards, values, mask, a.gamma, a.lam)

    def _micro_loss(self, part: PackedBatch, advantages, returns, pre: dict, full_tokens, full_seqs) -> dict:
        """Backward of one micro-batch's share of the full-batch loss; returns its metrics."""
        a, sp = self.algo, self.sampling
        L = part.mask.shape[1]
        hidden = completion_hidden(self.policy, part)  # [b, L, H]
        logprobs, entropy = token_logprobs(self.policy, part, sp.temperature, sp.top_k, sp.top_p,
                                           with_entropy=a.entropy_coef > 0, hidden=hidden)
        adv = advantages if advantages.dim() == 1 else advantages[:, :L]
        ref = pre["ref"][:, :L] if "ref" in pre else None
        prox = pre["prox"][:, :L] if "prox" in pre else None
        totals = dict(num_tokens_total=full_tokens, num_seqs_total=full_seqs)
        loss, m = policy_loss(logprobs, part.old_logprobs, adv, part.mask, a.clip_low, a.clip_high, a.loss_agg,
                              ref_logprobs=ref, kl_coef=a.kl_coef, entropy=entropy,
                              entropy_coef=a.entropy_coef, prox_logprobs=prox, tis_cap=a.tis_cap, **totals)
        out = {"pg_loss": float(loss.detach())}
        if self.value_head is not None:
            values = self.value_head(hidden)  # [b, L]
            vloss = value_loss(values, pre["values"][:, :L], returns[:, :L], part.mask, a.vf_clip, a.loss_agg,
                               **totals)
            loss = loss + a.vf_coef * vloss
            out["value_loss"] = float(vloss.detach())
        if not torch.isfinite(loss):
            raise NonFiniteError(f"loss: {float(loss)} on a micro-batch; no optimiser step was taken and "
                                 "the last checkpoint is intact (lower train.lr, check the rewards)")
        loss.backward()
        out.update(loss=float(loss.detach()), clipfrac=float(m["clipfrac"]), kl=float(m["kl"]),
                   approx_kl=float(m["approx_kl"]))
        return out

    def _clip_and_check(self, epoch: int) -> float:
        clip = self.train_cfg.grad_clip or math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"grad_norm: {norm} in pass {epoch}; no optimiser step was taken and the "
                                 "last checkpoint is intact (lower train.lr or set train.grad_clip)")
        return norm

    def _check_weights(self, norm_before: float, epoch: int) -> None:
        """After the optimiser step: the weights are finite and their norm moved by a sane amount,
        or the run stops here, before they are published or checkpointed (so the last checkpoint
        is good)."""
        norm = _global_norm(self.params)
        limit = self.train_cfg.max_norm_change
        if not math.isfinite(norm):
            raise NonFiniteError(f"weights: non-finite after the optimiser step of pass {epoch} (norm {norm}); "
                                 "they were neither published nor checkpointed (lower train.lr)")
        if abs(norm - norm_before) > limit * norm_before:
            raise NonFiniteError(f"weights: the optimiser step of pass {epoch} took their norm from "
                                 f"{norm_before:.4g} to {norm:.4g} (more than train.max_norm_change={limit} "
                                 "of it): the run is diverging towards non-finite weights; they were neither "
                                 "published nor checkpointed (lower train.lr)")

    # ------------------------------------------------------------------ re-fit
    def should_refit(self, step: int, accepted_len: float, speculating: bool) -> bool:
        """Per RefitConfig.schedule. on_drop: the moving average of the accepted length at full
        depth (weight drop_smoothing on the newest step) fell below drop_fraction x its best
        since the last fit; the first measured step after a fit starts both."""
        r = self.refit_cfg
        if self.heads is None or r.schedule in ("never", "idle"):  # idle: the rollout workers fit
            return False
        if r.schedule == "every":
            return step % r.every == 0
        if not speculating or accepted_len <= 0:  # nothing measured: no drop to see
            return False
        if self.refit_level is None or self.refit_baseline is None:
            self.refit_level = self.refit_baseline = accepted_len
            return False
        self.refit_level += r.drop_smoothing * (accepted_len - self.refit_level)
        if self.refit_level < r.drop_fraction * self.refit_baseline:
            return True
        self.refit_baseline = max(self.refit_baseline, self.refit_level)
        return False

    def refit_heads(self, sequences: list[Sequence], seed: int) -> dict:
        """Fit the heads (trunk frozen) to the updated policy on the latest rollouts; the last
        1/8 of them (at least one sequence) is held out to measure acceptance before and after,
        and the old heads are kept (refit_kept=False) when the fit made it worse."""
        out = fit_with_holdout(self.policy, self.heads, sequences, self.refit_cfg, self.sampling.temperature, seed)
        self.policy.train()  # fit_heads puts the (frozen) trunk in eval mode
        self.refit_baseline = self.refit_level = None
        return out

    def take_heads(self, result: dict) -> dict:
        """Adopt heads fitted elsewhere (an idle rollout worker's `idle_refit`); they go out with the
        next version. Returns the re-fit's metrics."""
        if result.get("refit_kept"):
            self.heads.load_state_dict(result["state"])
            self.heads.set_measured_acceptance(result["refit_accept_after"])
        self.refit_baseline = self.refit_level = None
        return {k: v for k, v in result.items() if k != "state"}

    def measure_heads(self, sequences: list[Sequence]) -> list[float] | None:
        """Per-depth acceptance of the heads against the policy as it is now (after this step's
        update), on the last 1/8 of `sequences` (at least one): what drafting with full
        context would achieve in the next rollout. For steps whose rollout drafted too little
        to measure acceptance (the depth policy kept generation plain). The heads record it
        (DraftHeads.acceptance), so the workers' depth policy starts from it after the publish.
        None without heads or usable sequences."""
        if self.heads is None:
            return None
        _, held = _held_out(sequences)
        if not held:
            return None
        with torch.no_grad():
            acceptance = measure_acceptance(self.policy, self.heads, [s.prompt + s.tokens for s in held],
                                            prompt_lens=[len(s.prompt) for s in held],
                                            batch_size=self.refit_cfg.micro_batch_size,
                                            temperature=self.sampling.temperature)
        self.heads.set_measured_acceptance(acceptance)
        return acceptance

    # ----------------------------------------------------------------- publish
    def next_version(self) -> tuple[int, dict, dict | None]:
        """Bump the version; returns (version, policy state, heads state) to publish together."""
        self.policy_version += 1
        return self.policy_version, cpu_state(self.policy), cpu_state(self.heads)

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """What a checkpoint needs besides the policy, heads and value-head weights."""
        return {"optimizer": self.optimizer.state_dict(), "policy_version": self.policy_version,
                "refit_baseline": self.refit_baseline, "refit_level": self.refit_level}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.policy_version = int(state["policy_version"])
        self.refit_baseline = state["refit_baseline"]
        self.refit_level = state.get("refit_level", self.refit_baseline)  # absent before the moving average


def _global_norm(params: list[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach().float())
                                                       for p in params])))


def fit_with_holdout(policy, heads, sequences: list[Sequence], r: RefitConfig, temperature: float, seed: int) -> dict:
    """Re-fit `heads` in place on `sequences` minus the last 1/8 (held out); keep the old heads
    when the held-out expected tokens per verify got worse. Returns the re-fit metrics."""
    fit, held = _held_out(sequences)
    if not fit:
        return {"refit_skipped": True}
    gen = torch.Generator().manual_seed(seed)
    old_state = {k: v.detach().clone() for k, v in heads.state_dict().items()}
    result = fit_heads(policy, heads, [s.prompt + s.tokens for s in fit],
                       prompt_lens=[len(s.prompt) for s in fit], steps=r.steps, lr=r.lr, loss=r.loss,
                       kl_warmup_steps=r.kl_warmup_steps, micro_batch_size=r.micro_batch_size,
                       temperature=temperature, eval_sequences=[s.prompt + s.tokens for s in held],
                       eval_prompt_lens=[len(s.prompt) for s in held], generator=gen)
    before, after = result["acceptance_before"], result["acceptance_after"]
    # A fit on one step's rollouts can overfit them; keep the old heads when the held-out
    # expected tokens per verify (1 + sum_j prod_{i<=j} alpha_i) got worse.
    kept = expected_tokens(after, len(after)) >= expected_tokens(before, len(before)) \
        and all(torch.isfinite(v).all() for v in heads.state_dict().values())
    if not kept:
        heads.load_state_dict(old_state)
    # the heads carry their held-out acceptance to the rollout workers (DraftHeads.acceptance)
    heads.set_measured_acceptance(after if kept else before)
    return {"refit_loss": result["losses"][-1] if result["losses"] else float("nan"),
            "refit_accept_before": before, "refit_accept_after": after, "refit_kept": kept}


def idle_refit(policy, heads, sequences: list[Sequence], r: RefitConfig, temperature: float, seed: int) -> dict:
    """Run on an idle rollout worker (refit.schedule=idle) on its copies of its policy (the version
    that sampled `sequences`) and heads: fit the heads and return the re-fit metrics plus "state",
    the fitted heads' CPU state. Off the learner's critical path; the heads trail the learner's
    update by one step or more, as the next rollout's heads always do."""
    heads = heads.float()
    with torch.enable_grad():
        out = fit_with_holdout(policy, heads, sequences, r, temperature, seed)
    return {**out, "state": cpu_state(heads), "refit_where": "idle"}


def _pad_to(x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """[b, L'] -> [b, L] with zeros (micro-batches are trimmed to their own longest row)."""
    L = batch.mask.shape[1]
    return torch.nn.functional.pad(x, (0, L - x.shape[1]))


def _held_out(sequences: list[Sequence]) -> tuple[list[Sequence], list[Sequence]]:
    """(fit, held): the sequences of >= 2 tokens, the last 1/8 of them (at least one) held out."""
    data = [s for s in sequences if len(s.prompt) + len(s.tokens) >= 2]
    n_eval = max(1, len(data) // 8) if data else 0
    return data[:len(data) - n_eval], data[len(data) - n_eval:]


def _per_token(advantages: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    return advantages[:, None].expand_as(batch.mask) if advantages.dim() == 1 else advantages

