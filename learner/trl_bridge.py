"""TRL's `GRPOTrainer` on specroll rollouts: exact speculative generation, re-fitted heads.

One argument to the trainer:

    from learner.trl_bridge import SpecrollRollout
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                          rollout_func=SpecrollRollout(heads="path/to/heads"))

`SpecrollRollout` is the `rollout_func` of TRL 1.x (`(prompts, trainer) -> {"prompt_ids",
"completion_ids", "logprobs"}`, one completion per prompt entry: TRL's sampler already repeats
each prompt `num_generations` times). At its first call it copies the trainer's model into a
specroll `RolloutWorker` (in-process, from memory) and adds its callback to the trainer. Each
call tokenizes the prompts exactly as TRL's own generation does, samples with the trainer's
temperature / top-k / top-p / max_completion_length / EOS ids, and returns the tokens with
their behaviour log-probs under the sampling distribution (the engine's, exact). After every
optimizer step the callback reads the trainer's weights (state_dict, no disk), re-fits the heads
on the step's rollouts when specroll's schedule says so (learner.loop.heads_after_update:
never / every N / on acceptance drop), and publishes policy and heads together under one new
version. Acceptance per draft position, accepted length, rollout tokens/s and the re-fits go
into the trainer's own metrics, so they reach whatever the run reports to.

Departures from TRL's own generation: min_p, repetition_penalty and generation_kwargs are
refused (the engine samples temperature / top-k / top-p only, exactly); tools, environments,
images and PEFT models are refused. This is the only module that imports trl; it knows nothing
about tasks (TRL's reward functions score) or Ray (the worker runs in the trainer's process).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

try:
    import trl  # noqa: F401  (the bridge is for TRL's GRPOTrainer; fail here with the install hint)
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("learner.trl_bridge needs TRL: pip install 'specroll[trl]' (trl>=1.16,<2)") from e
from transformers import TrainerCallback

from learner.config import RefitConfig, TrainConfig
from learner.loop import heads_after_update, step_seed
from learner.losses import AlgoConfig
from learner.trainer import Learner, cpu_state
from rollout.checkpoint import from_hf_model, policy_state_from_hf
from rollout.types import RolloutBatch, RolloutConfig, SamplingParams, SpecParams
from rollout.worker import RolloutWorker
from spec_heads.heads import DraftHeads, HeadConfig

METRIC_PREFIX = "specroll/"


@dataclass
class TRLRolloutConfig:
    """How the bridge generates and keeps its heads; the sampling settings are the trainer's."""

    spec: SpecParams = field(default_factory=SpecParams)  # entropy-aware depth by default
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # device, dtype, rows in flight
    refit: RefitConfig = field(default_factory=RefitConfig)  # when and how the heads are re-fitted
    seed: int = 0  # rollout seeds derive from (seed, call index); fresh heads from seed

    def __post_init__(self):
        if self.rollout.num_workers != 1:
            raise ValueError(f"rollout.num_workers: the bridge runs one in-process worker per trainer "
                             f"process, got {self.rollout.num_workers}; set it to 1")
        if self.refit.schedule not in ("never", "every", "on_drop"):
            raise ValueError(f"refit.schedule: {self.refit.schedule!r} needs Ray rollout workers; the bridge's "
                             "worker runs in the trainer's process: use never, every or on_drop")


class SpecrollRollout:
    """TRL `rollout_func` backed by specroll's engine. `heads`: a folder written by `specroll
    fit-heads` / `DraftHeads.save`, a `HeadConfig` for fresh heads (useful only with a re-fit
    schedule), or None (no speculation: config.spec.mode must be off)."""

    def __init__(self, heads: str | HeadConfig | None = None, config: TRLRolloutConfig | None = None):
        self.config = config or TRLRolloutConfig()
        if heads is None and self.config.spec.mode != "off":
            raise ValueError(f"heads: spec.mode={self.config.spec.mode!r} needs draft heads; pass a heads "
                             "folder (specroll fit-heads) or a HeadConfig, or set spec.mode='off'")
        self.heads_source = heads
        self.trainer = None
        self.learner: Learner | None = None  # the heads' side: a specroll copy of the policy, the heads
        self.worker: RolloutWorker | None = None
        self.callback = PublishCallback(self)
        self.last_batch: RolloutBatch | None = None
        self._unseen: RolloutBatch | None = None  # the last training rollout no step end has used
        self._calls = 0

    # ------------------------------------------------------------------ rollout_func
    def __call__(self, prompts: list, trainer) -> dict:
        if self.trainer is None:
            self._attach(trainer)
        elif trainer is not self.trainer:
            raise ValueError("trainer: this SpecrollRollout already serves another GRPOTrainer; "
                             "build one SpecrollRollout per trainer")
        prompt_ids = _prompt_ids(prompts, trainer)
        self._calls += 1
        spec = self.config.spec if self.config.spec.mode != "off" else None
        t0 = time.perf_counter()
        batch = self.worker.generate(prompt_ids, self.sampling, spec, seed=step_seed(self.config.seed, self._calls),
                                     ids=list(range(len(prompt_ids))))
        elapsed = time.perf_counter() - t0
        stale = {s.policy_version for s in batch.sequences} - {self.learner.policy_version}
        if stale:
            raise RuntimeError(f"rollout: sequences from policy versions {sorted(stale)}, the trainer's weights "
                               f"are version {self.learner.policy_version}; a publish was missed")
        self.last_batch = batch
        mode = "train" if trainer.model.training else "eval"
        if mode == "train":
            self._unseen = batch
        _log(trainer, mode, _rollout_metrics(batch, elapsed, self.learner.policy_version))
        return {"prompt_ids": prompt_ids,
                "completion_ids": [s.tokens for s in batch.sequences],
                "logprobs": [s.logprobs for s in batch.sequences]}

    # ------------------------------------------------------------------ weights
    def publish(self, step: int) -> dict:
        """After optimizer step `step`: the trainer's weights into the heads' side, a re-fit when
        due (on the rollouts since the last step), then policy and heads to the worker under one
        new version. Returns the metrics it logged."""
        t0 = time.perf_counter()
        policy = self.learner.policy
        hf = _unwrapped(self.trainer)
        weights = next(policy.parameters())
        policy.load_state_dict(policy_state_from_hf(policy.config, hf.state_dict().items(), weights.device,
                                                    weights.dtype, where=type(hf).__name__))
        metrics = {}
        if self._unseen is not None:
            heads = heads_after_update(self.learner, self._unseen, self.config.spec, step,
                                       step_seed(self.config.seed, step) + 1)
            self._unseen = None
            metrics.update(_heads_metrics(heads))
        version, policy_state, heads_state = self.learner.next_version()
        self.worker.set_weights(version, policy_state, heads_state)
        versions = self.worker.versions()
        metrics.update({"policy_version": versions["policy"], "heads_version": versions["heads"],
                        "publish_s": time.perf_counter() - t0})
        _log(self.trainer, "train", metrics)
        return metrics

    # ------------------------------------------------------------------ setup
    def _attach(self, trainer) -> None:
        _check_trainer(trainer)
        self.sampling = _sampling(trainer)
        hf = _unwrapped(trainer)
        device = next(hf.parameters()).device
        policy = from_hf_model(hf, device=device, dtype=torch.float32)
        heads = self._heads(policy)
        if heads is not None:
            heads.to(device)
        # specroll's Learner holds the heads' side only (TRL owns the policy update): its
        # re-fit schedule, held-out fit and versioned publish are the ones `specroll train` runs
        self.learner = Learner(policy, heads, algo=AlgoConfig(), train=TrainConfig(), refit=self.config.refit,
                               sampling=self.sampling)
        self.worker = RolloutWorker(policy.config, heads.config if heads is not None else None,
                                    self.config.rollout, policy_state=cpu_state(policy),
                                    heads_state=cpu_state(heads), version=self.learner.policy_version)
        self.trainer = trainer
        if self.callback not in trainer.callback_handler.callbacks:
            trainer.add_callback(self.callback)

    def _heads(self, policy) -> DraftHeads | None:
        src = self.heads_source
        if src is None:
            return None
        if isinstance(src, HeadConfig):
            with torch.random.fork_rng(devices=[]):  # fresh heads from our seed, the trainer's RNG untouched
                torch.manual_seed(self.config.seed)
                return DraftHeads(src, policy.config)
        heads, _ = DraftHeads.load(str(src), policy.config)
        return heads


class PublishCallback(TrainerCallback):
    """Publishes the trainer's weights (and re-fitted heads) to the bridge's worker after every
    optimizer step; `SpecrollRollout` adds it to its trainer at its first call."""

    def __init__(self, bridge: SpecrollRollout):
        self.bridge = bridge

    def on_step_end(self, args, state, control, **kwargs):
        if self.bridge.worker is not None:
            self.bridge.publish(state.global_step)


# ---------------------------------------------------------------------------------------------


def _unwrapped(trainer):
    return trainer.accelerator.unwrap_model(trainer.model)


def _check_trainer(trainer) -> None:
    """Refuse what the engine would not reproduce exactly, naming the setting and the fix."""
    args = trainer.args
    if getattr(args, "use_vllm", False):
        raise ValueError("use_vllm: specroll serves the rollouts of this trainer; set use_vllm=False")
    if getattr(trainer, "tools", None) or getattr(trainer, "environment_factories", None):
        raise ValueError("tools / environment_factory: multi-turn tool calls are not served by the specroll "
                         "rollout_func; drop them or generate with TRL's own path")
    if hasattr(_unwrapped(trainer), "peft_config"):
        raise ValueError("model: PEFT (LoRA) models are not supported by the specroll rollout_func; merge the "
                         "adapter (merge_and_unload()) or train the full model")
    if trainer.min_p not in (None, 0.0):
        raise ValueError(f"min_p: {trainer.min_p} is not implemented by specroll's sampler; set min_p=None")
    if trainer.repetition_penalty != 1.0:
        raise ValueError(f"repetition_penalty: {trainer.repetition_penalty} is not implemented by specroll's "
                         "sampler; set repetition_penalty=1.0")
    if args.generation_kwargs:
        raise ValueError(f"generation_kwargs: {sorted(args.generation_kwargs)} would not reach specroll's "
                         "engine; remove them (temperature, top_k, top_p and max_completion_length are used)")


def _sampling(trainer) -> SamplingParams:
    return SamplingParams(temperature=float(trainer.temperature), top_k=int(trainer.top_k or 0),
                          top_p=float(trainer.top_p if trainer.top_p is not None else 1.0),
                          max_new_tokens=int(trainer.max_completion_length),
                          stop_token_ids=[int(t) for t in trainer.eos_token_ids])


def _prompt_ids(prompts: list, trainer) -> list[list[int]]:
    """Token ids as TRL's own generation path makes them (chat template, its kwargs): the same
    (private) method, so a prompt never tokenizes differently under the bridge."""
    prompt_ids, images, _ = trainer._tokenize_prompts(prompts)
    if images is not None:
        raise ValueError("prompts: images are not supported by the specroll rollout_func (text-only policies)")
    return [list(map(int, ids)) for ids in prompt_ids]


def _rollout_metrics(batch: RolloutBatch, elapsed: float, version: int) -> dict:
    s = batch.stats
    out = {"rollout_tokens_per_s": s.tokens / elapsed if elapsed > 0 else 0.0, "rollout_s": elapsed,
           "mean_accepted_len": s.mean_accepted_len, "sequence_policy_version": version}
    for i, (rate, drafted) in enumerate(zip(s.accept_rate_per_pos, s.drafted_per_pos)):
        if drafted:  # a position never drafted has no rate; logging 0 would read as a stale head
            out[f"accept_rate_pos{i + 1}"] = rate
    return out


def _heads_metrics(heads: dict) -> dict:
    out = {"refit": float(heads["refit"]), "accepted_len_full_depth": heads["accepted_len_full_depth"]}
    if "refit_kept" in heads:
        out["refit_kept"] = float(heads["refit_kept"])
        for i, a in enumerate(heads["refit_accept_after"]):
            out[f"refit_accept_pos{i + 1}"] = a
    return out


def _log(trainer, mode: str, metrics: dict) -> None:
    """Into the trainer's step metrics: GRPOTrainer.log averages them over the logging window
    and hands them to every report_to backend (calling trainer.log here would flush TRL's own
    metrics mid-step)."""
    for key, value in metrics.items():
        trainer._metrics[mode][METRIC_PREFIX + key].append(float(value))
