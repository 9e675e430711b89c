"""Rollout data types and generation parameters. Plain data: no torch modules, no Ray."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


class LengthError(ValueError):
    """A request that does not fit the engine's KV cache; the message names the setting to change."""

from spec_heads.acceptance import MAX_DEPTH
from spec_heads.depth_config import DepthControl


@dataclass
class SamplingParams:
    """How tokens are sampled. Defaults live here once; configs override them."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    max_new_tokens: int = 64
    stop_token_ids: list[int] = field(default_factory=list)  # the tokenizer's EOS is added by callers

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature: must be a finite number >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1] (1 turns it off), got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")


@dataclass
class SpecParams:
    """Speculative decoding. mode: off | fixed (always draft k) | entropy (per row and step)."""

    mode: str = "entropy"
    k: int = 4  # draft depth for mode=fixed
    max_k: int = 6  # deepest draft for mode=entropy (capped by the heads' depth)
    draft: str = "sampled"  # sampled | greedy (greedy drafts are a baseline; still exact)
    calibration_bins: int = 16  # entropy bins of the online acceptance table
    log_every: int = 0  # log the calibration table and chosen depths every N steps (0: never)
    control: DepthControl = field(default_factory=DepthControl)  # entropy mode's tuning (spec.control.*)

    def __post_init__(self):
        if self.mode not in ("off", "fixed", "entropy"):
            raise ValueError(f"mode: must be off, fixed or entropy, got {self.mode!r}")
        if self.draft not in ("sampled", "greedy"):
            raise ValueError(f"draft: must be sampled or greedy, got {self.draft!r}")
        if not 1 <= self.k <= MAX_DEPTH:
            raise ValueError(f"k: must be in 1..{MAX_DEPTH}, got {self.k}")
        if not 1 <= self.max_k <= MAX_DEPTH:
            raise ValueError(f"max_k: must be in 1..{MAX_DEPTH}, got {self.max_k}")
        if self.calibration_bins < 2:
            raise ValueError(f"calibration_bins: must be >= 2, got {self.calibration_bins}")


@dataclass
class VllmParams:
    """The vLLM backend (rollout.backend=vllm, rollout/vllm_worker.py)."""

    # start-up goodness-of-fit check of vLLM's speculative sampling at temperature > 0: draws
    # of the first emitted token (a few seconds on a CPU; enough to catch a biased sampler)
    check_draws: int = 2000
    check_alpha: float = 1e-3  # the check fails below this chi-square p-value
    # where the check fails: false refuses to start (fail closed); true serves plain decoding
    fallback_plain: bool = False
    kv_cache_gib: float = 1.0  # CPU KV-cache space per engine (VLLM_CPU_KVCACHE_SPACE)

    def __post_init__(self):
        if self.check_draws < 100:
            raise ValueError(f"check_draws: must be >= 100 for a meaningful chi-square test, got {self.check_draws}")
        if not 0.0 < self.check_alpha < 0.5:
            raise ValueError(f"check_alpha: must be in (0, 0.5), got {self.check_alpha}")
        if self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib: must be > 0, got {self.kv_cache_gib}")


@dataclass
class RolloutConfig:
    """Where and how rollouts are served."""

    backend: str = "specroll"  # specroll (this repo's engine) | vllm (rollout/vllm_worker.py; pip install specroll[vllm])
    num_workers: int = 1  # RolloutWorker actors (one per GPU on a cluster)
    max_batch: int = 64  # rows in flight per engine (continuous batching refills finished rows)
    max_seq_len: int = 0  # KV-cache length per row; 0: prompt length + max_new_tokens + draft depth
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    threads: int = 0  # CPU threads per worker; 0: this machine's cores / num_workers (Ray would give 1)
    # pull: workers take GRPO groups from one queue whenever they have free rows (fast workers
    # take more); fixed: one contiguous share per worker, kept only as a baseline to measure against
    schedule: str = "pull"
    # over-provisioning (async only): a worker left with no rows while others finish the step's
    # tail starts the next submitted step's groups (at that step's version) instead of idling
    partial: bool = False
    num_cpus: float = 1.0  # Ray CPUs reserved per worker (its placement-group bundle)
    # GPUs per worker; -1: one when rollout.device resolves to CUDA, else none. A fraction
    # (e.g. 0.5) shares a card, with the learner too under placement=colocated
    num_gpus: float = -1.0
    # colocated: workers may share the learner's devices; separate: the placement group also
    # reserves learner_gpus GPUs (and a CPU) that no worker may take
    placement: str = "colocated"
    learner_gpus: float = 1.0  # reserved for the learner under placement=separate, when workers use GPUs
    placement_strategy: str = "PACK"  # Ray placement strategy: PACK | SPREAD | STRICT_SPREAD (one node each)
    start_timeout_s: float = 60.0  # fail at start, naming what is missing, if resources are not there by then
    # a worker with rows in flight that returns nothing for this long is killed (and restarted
    # or dropped) and its groups re-queued; 0 waits forever. Long answers on big models need more
    worker_timeout_s: float = 600.0
    max_restarts: int = 1  # Ray restarts of a dead or killed worker (its weights are re-published); then it is dropped
    # per-worker overrides of max_batch and threads (empty: every worker the same), to run
    # workers of unequal speed, e.g. to measure the pull queue against the fixed split
    max_batch_per_worker: list[int] = field(default_factory=list)
    threads_per_worker: list[int] = field(default_factory=list)

    vllm: VllmParams = field(default_factory=VllmParams)

    def __post_init__(self):
        if self.backend not in ("specroll", "vllm"):
            raise ValueError(f"backend: must be specroll or vllm, got {self.backend!r}")
        if self.schedule not in ("pull", "fixed"):
            raise ValueError(f"schedule: must be pull or fixed, got {self.schedule!r}")
        if self.partial and self.schedule != "pull":
            raise ValueError("partial: the next step's groups are handed out by the pull queue; set "
                             "rollout.schedule=pull or rollout.partial=false")
        if self.num_cpus <= 0:
            raise ValueError(f"num_cpus: must be > 0 (a Ray placement bundle cannot be empty), got {self.num_cpus}")
        if self.num_gpus < 0 and self.num_gpus != -1:
            raise ValueError(f"num_gpus: must be >= 0, or -1 for one per worker on CUDA, got {self.num_gpus}")
        if self.placement not in ("colocated", "separate"):
            raise ValueError(f"placement: must be colocated or separate, got {self.placement!r}")
        if self.learner_gpus < 0:
            raise ValueError(f"learner_gpus: must be >= 0, got {self.learner_gpus}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_SPREAD"):
            raise ValueError(f"placement_strategy: must be PACK, SPREAD or STRICT_SPREAD, got {self.placement_strategy!r}")
        if self.start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s: must be > 0, got {self.start_timeout_s}")
        if self.worker_timeout_s < 0:
            raise ValueError(f"worker_timeout_s: must be >= 0 (0 waits forever), got {self.worker_timeout_s}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts: must be >= 0, got {self.max_restarts}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers: must be >= 1, got {self.num_workers}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {self.max_batch}")
        if self.max_seq_len < 0:
            raise ValueError(f"max_seq_len: must be >= 0 (0 sizes it from the prompts), got {self.max_seq_len}")
        if self.threads < 0:
            raise ValueError(f"threads: must be >= 0 (0 divides the machine's cores among workers), got {self.threads}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        for key in ("max_batch_per_worker", "threads_per_worker"):
            values = list(getattr(self, key))
            setattr(self, key, values)
            if values and (len(values) != self.num_workers or min(values) < 1):
                raise ValueError(f"{key}: give one value >= 1 per worker ({self.num_workers}), or [] for "
                                 f"all alike; got {values}")

    def for_worker(self, w: int) -> "RolloutConfig":
        """Worker w's settings, with its per-worker overrides applied."""
        return replace(self, max_batch=self.max_batch_per_worker[w] if self.max_batch_per_worker else self.max_batch,
                       threads=self.threads_per_worker[w] if self.threads_per_worker else self.threads)


@dataclass
class Sequence:
    """One finished rollout. Per-token lists are aligned with `tokens` (the completion)."""

    prompt_id: int
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]  # log-prob of each emitted token under the sampling distribution
    entropies: list[float]  # entropy of the policy's sampling distribution at each token
    finish_reason: str  # "stop" | "length"
    policy_version: int = 0
    draft_lengths: list[int] = field(default_factory=list)  # per verify step of this row
    accepted: list[int] = field(default_factory=list)  # drafts accepted per verify step


@dataclass
class RolloutStats:
    """Aggregate counters of one `Engine.generate` call."""

    tokens: int = 0  # completion tokens emitted
    sequences: int = 0
    steps: int = 0  # decode steps (each one policy forward over the batch)
    row_steps: int = 0  # sum over steps of rows in flight
    time_s: float = 0.0
    prefill_time_s: float = 0.0
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    drafted_per_pos: list[int] = field(default_factory=list)  # [K] drafts proposed at depth i
    accepted_per_pos: list[int] = field(default_factory=list)  # [K] drafts accepted at depth i
    depth_hist: list[int] = field(default_factory=list)  # [K+1] row-steps that drafted k tokens
    heads_prefill_skipped: int = 0  # rows admitted without the heads' pass over their prompt

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.time_s if self.time_s > 0 else 0.0

    @property
    def mean_accepted_len(self) -> float:
        """Tokens emitted per row per decode (verify) step: exactly 1.0 without speculation.
        Each sequence's first token comes from the prefill forward, not a decode step."""
        return (self.tokens - self.sequences) / self.row_steps if self.row_steps else 1.0

    @property
    def accept_rate_per_pos(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_pos, self.drafted_per_pos)]

    def merge(self, other: "RolloutStats") -> "RolloutStats":
        def add(a, b):
            n = max(len(a), len(b))
            return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]
        return RolloutStats(
            self.tokens + other.tokens, self.sequences + other.sequences, self.steps + other.steps,
            self.row_steps + other.row_steps, self.time_s + other.time_s,
            self.prefill_time_s + other.prefill_time_s, self.draft_time_s + other.draft_time_s,
            self.verify_time_s + other.verify_time_s, add(self.drafted_per_pos, other.drafted_per_pos),
            add(self.accepted_per_pos, other.accepted_per_pos), add(self.depth_hist, other.depth_hist),
            self.heads_prefill_skipped + other.heads_prefill_skipped)


@dataclass
class WorkItem:
    """One unit of pull work: a GRPO group (all samples of one prompt), kept on one worker.
    `key` is the group's stable id (its first row id): results are keyed and de-duplicated by it."""

    key: int
    step: int  # the coordinator's step counter: one engine run never mixes steps
    prompts: list[list[int]]
    ids: list[int]  # row ids: each row's random stream
    sampling: SamplingParams
    spec: SpecParams | None
    seed: int
    version: int  # the policy/heads version that must sample it
    max_prompt_len: int  # longest prompt of its step (sizes the engine's cache)


@dataclass
class ItemResult:
    key: int
    sequences: list[Sequence]  # in the item's row order


@dataclass
class RolloutBatch:
    sequences: list[Sequence]  # in prompt order
    stats: RolloutStats
    # the client's numbers for this batch: tokens_per_s, speedup_vs_off_est and the
    # coordinator's per-step report (rollout/coordinator.py)
    report: dict = field(default_factory=dict)
