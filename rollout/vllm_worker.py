"""rollout.backend=vllm: rollouts served by a vLLM engine, behind RolloutWorker's interface.

`VllmRolloutWorker` takes the same arguments and returns the same records as
rollout/worker.py's RolloutWorker (tokens, behaviour log-probs of the sampling distribution,
the policy version), so the learner, head re-fit and client stay specroll's. The only module
that imports vLLM; the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so a
Ray actor wrapping this class holds it: rollout/coordinator.py runs it as its worker actors
(`serve`, `step_stats`, `node_id`, as RolloutWorker), the driver and actors in vLLM's venv.

- Weights: policy and heads go in together under one version. The policy's through the model
  runner's `reload_weights`, the heads' through the drafter's `load_weights`, then the prefix
  cache is dropped: cached KV of a prompt was computed with the old weights.
- Speculation: parallel heads run as vLLM's Medusa proposer (rollout/vllm_export.py's
  `SpecrollMedusa`, registered with vLLM: our residual blocks and a copy of the policy's LM
  head). vLLM's Medusa drafts each head's argmax and verifies as if the draft were certain
  (acceptance p(x)): exact for argmax drafts, so spec.draft must be greedy. Sequential heads
  have no vLLM proposer here: refused (docs/vllm.md says why).
- Exactness fails closed: before it serves speculative rollouts at a sampling setting with
  temperature > 0, the worker draws completions of one prompt through vLLM and checks the tokens
  that speculation emitted against the policy's own sampling distribution
  (spec_heads/exactness.py). Where the check fails it refuses, or serves plain decoding if
  rollout.vllm.fallback_plain.

Not served by vLLM: per-token entropies (NaN; vLLM returns no distribution), per-row draft
lengths (vLLM counts acceptance per position across the batch: RolloutStats carries that).
"""
from __future__ import annotations

import math
import os
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import ray
import torch
import vllm
from vllm.inputs import TokensPrompt

from rollout.checkpoint import load_checkpoint, save_checkpoint
from rollout.inbox import ItemInbox
from rollout.model import ModelConfig, Transformer
from rollout.types import (ItemResult, RolloutBatch, RolloutConfig, RolloutStats, SamplingParams, Sequence,
                           SpecParams, WorkItem)
from rollout.vllm_export import MEDUSA_ARCH, SpecrollMedusa, medusa_weights, policy_weights, save_medusa
from spec_heads.exactness import FitResult, conditional_fit
from spec_heads.heads import HeadConfig
from spec_heads.sampling import sampling_probs

CHECK_PROMPT_LEN = 8  # tokens of the check's fixed prompt
CHECK_POSITIONS = (1, 2)  # completion tokens the check tests: the first two a verify step emits


class VllmRolloutWorker(ItemInbox):
    """RolloutWorker's interface over a vLLM engine (see the module docstring).

    The engine is built at the first `generate`, when the speculation settings are known (vLLM
    fixes them per engine); a later call with other settings is refused.
    """

    def __init__(self, model: str | ModelConfig, heads: HeadConfig | None, rollout: RolloutConfig, *,
                 policy_state: dict | None = None, heads_state: dict | None = None, version: int = 0):
        if rollout.device not in ("auto", "cpu") and not rollout.device.startswith("cuda"):
            raise ValueError(f"rollout.device: {rollout.device!r} is not a vLLM device; use auto, cpu or cuda")
        if heads is not None and heads.kind != "parallel":
            raise ValueError(f"heads.kind: {heads.kind} heads have no vLLM proposer here (vLLM's MTP "
                             "proposers load model-specific MTP layers); use heads.kind=parallel "
                             "(Medusa) with rollout.backend=vllm, or rollout.backend=specroll")
        if isinstance(model, ModelConfig):
            if policy_state is None:
                raise ValueError("policy_state: a worker built from a ModelConfig needs its weights; "
                                 "pass policy_state, or a checkpoint folder as model")
            self.model_config, self._policy = model, {k: v.detach().cpu() for k, v in policy_state.items()}
        else:
            policy = load_checkpoint(str(model), device="cpu", dtype=torch.float32)
            self.model_config, self._policy = policy.config, {k: v.detach() for k, v in policy.state_dict().items()}
        self.heads_config, self._heads = heads, heads_state
        self.rollout, self.version = rollout, int(version)
        self.llm = None
        self._spec_key = None  # (k, speculating) the engine was built for
        self.speculating = False
        self.fit: FitResult | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="specroll-vllm-")
        self._last = RolloutStats()
        self._want = (0, False)  # (drafts per step, speculating) the engine was asked for
        self._checked: set[tuple] = set()  # (temperature, top_k, top_p) whose check passed
        # the pull path (serve): items wait in an inbox; one engine thread runs them in batches
        self._init_inbox()
        self._step_stats: dict[int, RolloutStats] = {}
        threads = rollout.threads
        if not threads and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
            # a Ray actor starts with OMP_NUM_THREADS=1: give it its share of the cores
            threads = max(1, (os.cpu_count() or 1) // rollout.num_workers)
        # every engine call runs on this one thread: OpenMP's thread count is per calling thread,
        # and vLLM's CPU attention fails when the thread that plans a step and the one that runs
        # it see different counts; one at a time also keeps weight swaps between generate calls
        self._engine_thread = None
        self._engine = ThreadPoolExecutor(1, thread_name_prefix="vllm-engine", initializer=self._init_engine_thread,
                                          initargs=(threads,))

    # ----------------------------------------------------------------- weights
    def set_weights(self, version: int, policy_state: dict, heads_state: dict | None, *,
                    rewind: bool = False) -> int:
        """Swap policy and heads together to `version` (newer than the current one, unless
        `rewind`: the coordinator's re-queue of an older step's group, as RolloutWorker.set_weights)."""
        return self._on_engine(self._set_weights, version, policy_state, heads_state, rewind)

    @torch.no_grad()  # (grad mode is per thread: this runs on the engine thread)
    def _set_weights(self, version: int, policy_state: dict, heads_state: dict | None, rewind: bool = False) -> int:
        if policy_state is None:
            raise ValueError("policy_state: a heads-only update would leave the heads one version "
                             "ahead of the policy; publish policy and heads together")
        if self.heads_config is not None and heads_state is None:
            raise ValueError("heads_state: a policy-only update would leave the draft heads stale "
                             f"(version {self.version}); publish policy and heads together")
        if int(version) <= self.version and not (rewind and int(version) != self.version):
            raise ValueError(f"version: {version} is not newer than the worker's {self.version}; "
                             "versions must increase with every publish")
        self._policy = {k: v.detach().cpu() for k, v in policy_state.items()}
        self._heads = heads_state
        if self.llm is not None:
            self._load_into_engine()
        self.version = int(version)
        return self.version

    def _load_into_engine(self) -> None:
        weights = policy_weights(self._policy)
        draft = (medusa_weights(self._heads, self._policy, self._spec_key[0])
                 if self._spec_key[1] and self._method == "medusa" else None)

        def load(worker):
            runner = worker.model_runner
            runner.reload_weights(weights_iterator=iter(weights))
            if draft is not None:
                runner.drafter.model.load_weights(iter(draft))

        self.llm.collective_rpc(load)
        self.reset_prefix_cache()

    def reset_prefix_cache(self) -> None:
        """Drop cached prompt KV (computed with the weights before a sync)."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vllm: reset_prefix_cache refused (requests still running); "
                               "sync weights only between generate calls")

    def versions(self) -> dict:
        return {"policy": self.version, "heads": self.version}

    def node_id(self) -> str | None:
        """The Ray node this worker runs on (None outside Ray)."""
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    @torch.no_grad()
    def served_weights(self) -> dict:
        """What the engine computes with now: {"version", "policy": the model runner's tensors
        (vLLM's names; q/k/v and gate/up are fused there), "drafter": the Medusa draft model's
        tensors (None when the engine does not speculate), "heads": the heads' state this worker
        holds for that version}. To check that a sync reached the engine."""
        def read(worker):
            runner = worker.model_runner
            drafter = getattr(getattr(runner, "drafter", None), "model", None)
            return ({k: v.detach().clone() for k, v in runner.model.state_dict().items()},
                    None if drafter is None else {k: v.detach().clone() for k, v in drafter.state_dict().items()})

        if self.llm is None:
            raise RuntimeError("vllm: no engine yet; it is built at the first generate call")
        policy, drafter = self._on_engine(self.llm.collective_rpc, read)[0]
        return {"version": self.version, "policy": policy, "drafter": drafter, "heads": self._heads}

    # ------------------------------------------------------------------ engine
    def _ensure_exact(self, sampling: SamplingParams) -> None:
        """Run the goodness-of-fit check once per sampling setting at temperature > 0 while the
        engine speculates; on failure refuse (closing the engine, so no later call skips the
        check) or, with rollout.vllm.fallback_plain, rebuild it plain."""
        key = (sampling.temperature, sampling.top_k, sampling.top_p)
        if not self.speculating or sampling.temperature == 0 or key in self._checked:
            return
        self.fit = self._check_speculation(sampling)
        if self.fit.passed(self.rollout.vllm.check_alpha):
            self._checked.add(key)
            return
        what = (f"vLLM {vllm.__version__}'s speculative sampling at temperature {sampling.temperature} "
                f"failed specroll's goodness-of-fit check (chi-square p={self.fit.pvalue:.2e} over "
                f"{self.fit.dof} degrees of freedom, {self.fit.zero_mass_hits} draws of zero-probability "
                f"tokens; threshold rollout.vllm.check_alpha={self.rollout.vllm.check_alpha})")
        self.close()
        if not self.rollout.vllm.fallback_plain:
            raise RuntimeError(f"rollout.backend=vllm: {what}: its samples are not the policy's. Set "
                               "spec.mode=off, or rollout.vllm.fallback_plain=true to serve plain "
                               "decoding, or sampling.temperature=0")
        print(f"warning: {what}; serving plain decoding (rollout.vllm.fallback_plain=true)", flush=True)
        self._start_engine(self._want[0], False)

    def _spec_settings(self, spec: SpecParams | None) -> tuple[int, bool]:
        if spec is None or spec.mode == "off" or self.heads_config is None:
            return 0, False
        if spec.mode != "fixed":
            raise ValueError(f"spec.mode: {spec.mode} depth is specroll's engine only; vLLM drafts a fixed "
                             "number of tokens: set spec.mode=fixed (spec.k drafts) or off")
        if spec.draft != "greedy":
            raise ValueError("spec.draft: vLLM's Medusa proposer drafts each head's argmax and verifies "
                             "it as a certain draft; set spec.draft=greedy (exact), or rollout.backend=specroll")
        if spec.k > self.heads_config.num_depths:
            raise ValueError(f"spec.k: {spec.k} drafts need {spec.k} heads, these have {self.heads_config.num_depths}")
        if self._heads is None:
            raise ValueError("heads_state: speculation needs the heads' weights; pass heads_state")
        return spec.k, True

    def start_engine(self, k: int, speculating: bool, method: str = "medusa") -> None:
        """Build the engine on the weights held here; method: medusa (our heads) or ngram (prompt
        lookup, no weights: docs/vllm.md checks vLLM's sampler with it too)."""
        self._on_engine(self._start_engine, k, speculating, method)

    def _start_engine(self, k: int, speculating: bool, method: str = "medusa") -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine lives in this process (and actor)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{self.rollout.vllm.kv_cache_gib:g}")
        root = self._dir.name
        policy = Transformer(self.model_config)
        policy.load_state_dict(self._policy)
        save_checkpoint(policy, os.path.join(root, "policy"))
        del policy
        extra = {}
        if speculating and method == "ngram":
            extra["speculative_config"] = {"method": "ngram", "num_speculative_tokens": k,
                                           "prompt_lookup_min": 1, "prompt_lookup_max": 3}
        elif speculating:
            vllm.ModelRegistry.register_model(MEDUSA_ARCH, SpecrollMedusa)
            save_medusa(os.path.join(root, "heads"), self.model_config, self.heads_config, k,
                         medusa_weights(self._heads, self._policy, k))
            extra["speculative_config"] = {"method": "medusa", "model": os.path.join(root, "heads"),
                                           "num_speculative_tokens": k}
        dtype = {"auto": "float32"}.get(self.rollout.dtype, self.rollout.dtype)
        max_len = self.rollout.max_seq_len or self.model_config.max_position_embeddings
        self.llm = vllm.LLM(model=os.path.join(root, "policy"), skip_tokenizer_init=True, dtype=dtype,
                            logprobs_mode="processed_logprobs", max_model_len=max_len,
                            max_num_seqs=self.rollout.max_batch, enforce_eager=True, enable_prefix_caching=True,
                            seed=0, disable_log_stats=False, **extra)
        self._spec_key, self.speculating, self._method = (k, speculating), speculating, method

    def close(self) -> None:
        if self.llm is not None:
            self.llm = None
            self.speculating = False
            import gc

            gc.collect()

    def check_speculation(self, sampling: SamplingParams) -> FitResult:
        """Draw rollout.vllm.check_draws completions of one fixed prompt through the engine and test
        the tokens its verify steps emitted against the policy's sampling distribution."""
        return self._on_engine(self._check_speculation, sampling)

    @torch.no_grad()
    def _check_speculation(self, sampling: SamplingParams) -> FitResult:
        vocab = self.model_config.vocab_size
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(vocab, (CHECK_PROMPT_LEN,), generator=g).tolist()
        params = vllm.SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k or -1,
                                     top_p=sampling.top_p, max_tokens=max(CHECK_POSITIONS) + 1,
                                     ignore_eos=True, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=prompt)] * self.rollout.vllm.check_draws,
                                 params, use_tqdm=False)
        completions = [list(o.outputs[0].token_ids) for o in outs]
        policy = Transformer(self.model_config)
        policy.load_state_dict(self._policy)

        def target(prefixes: list[list[int]]) -> torch.Tensor:
            ids = torch.tensor([prompt + p for p in prefixes])
            logits = policy.logits(policy(ids)[:, -1]).float()
            return sampling_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)

        return conditional_fit(completions, CHECK_POSITIONS, target)

    # -------------------------------------------------------------- generation
    def generate(self, prompts: list[list[int]], sampling: SamplingParams, spec: SpecParams | None,
                 seed: int, ids: list[int] | None = None) -> RolloutBatch:
        return self._on_engine(self._generate, prompts, sampling, spec, seed, ids)

    def _generate(self, prompts, sampling, spec, seed, ids) -> RolloutBatch:
        want = self._spec_settings(spec)
        if self.llm is None:
            self._want = want
            self._start_engine(*want)
        elif want != self._want:
            raise ValueError(f"spec: this vLLM engine was built for {self._want[0]} drafts per step "
                             f"(speculating={self._want[1]}); vLLM fixes speculation per engine, so keep "
                             "spec.mode and spec.k for the whole run")
        self._ensure_exact(sampling)
        ids = list(range(len(prompts))) if ids is None else list(ids)
        t0 = time.perf_counter()
        before = self._spec_counters()
        params = [self._params(sampling, seed, i) for i in ids]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        sequences = []
        for pid, prompt, out in zip(ids, prompts, outs):
            o = out.outputs[0]
            tokens = list(o.token_ids)
            sequences.append(Sequence(
                prompt_id=pid, prompt=list(prompt), tokens=tokens,
                logprobs=[float(lp[t].logprob) for t, lp in zip(tokens, o.logprobs)],
                entropies=[math.nan] * len(tokens),
                finish_reason="stop" if o.finish_reason == "stop" else "length", policy_version=self.version))
        after = self._spec_counters()
        drafted = [a - b for a, b in zip(after[0], before[0])] if self.speculating else []
        accepted = [a - b for a, b in zip(after[1], before[1])] if self.speculating else []
        n_tokens = sum(len(s.tokens) for s in sequences)
        self._last = RolloutStats(tokens=n_tokens, sequences=len(sequences), time_s=elapsed,
                                  drafted_per_pos=drafted, accepted_per_pos=accepted,
                                  steps=after[2] - before[2], row_steps=after[2] - before[2])
        return RolloutBatch(sequences, self._last)

    def _init_engine_thread(self, threads: int) -> None:
        """The engine thread's CPU threads (0: as the process has them), set before vLLM binds them."""
        self._engine_thread = threading.current_thread()
        if threads:
            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)

    def _on_engine(self, fn, *args):
        """fn(*args) on the engine thread (directly when already there)."""
        if threading.current_thread() is self._engine_thread:
            return fn(*args)
        return self._engine.submit(fn, *args).result()

    # ---------------------------------------------------- pull work (rollout/coordinator.py)
    def _take(self) -> tuple[WorkItem, list[tuple[WorkItem, Future]]]:
        """Every waiting item of the first one's run (same step, seed, sampling, spec and version)
        goes into one engine call together, one vLLM batch."""
        first = self._inbox[0][0]
        run = [(it, f) for it, f in self._inbox if _run_key(it) == _run_key(first)]
        self._inbox = deque((it, f) for it, f in self._inbox if _run_key(it) != _run_key(first))
        return first, run

    def _serve_run(self, first: WorkItem, run: list[tuple[WorkItem, Future]]) -> None:
        try:
            if first.version != self.version:
                raise RuntimeError(f"rollout: item {first.key} needs version {first.version}, this worker "
                                   f"serves {self.version}; the coordinator publishes before a step")
            batch = self.generate([p for it, _ in run for p in it.prompts], first.sampling, first.spec,
                                  first.seed, [i for it, _ in run for i in it.ids])
        except BaseException as e:  # every waiting caller learns why
            for _, fut in run:
                fut.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        with self._cond:
            old = self._step_stats.get(first.step)
            self._step_stats[first.step] = batch.stats if old is None else old.merge(batch.stats)
        done = 0
        for it, fut in run:
            fut.set_result(ItemResult(it.key, batch.sequences[done:done + len(it.ids)]))
            done += len(it.ids)

    def step_stats(self, step: int) -> dict | None:
        """{"stats": `step`'s merged engine stats on this worker, "speedup": 1.0 (vLLM gives no
        cost model to estimate one)}, once its engine calls have ended; then forgotten."""
        with self._cond:
            self._cond.wait_for(lambda: self._run_step != step)
            got = self._step_stats.pop(step, None)
        return None if got is None else {"stats": got, "speedup": 1.0}

    def _params(self, sampling: SamplingParams, seed: int, pid: int):
        # a seed per row (prompt id), so a row's tokens do not depend on its batch neighbours;
        # ignore_eos: rows stop at sampling.stop_token_ids only, as in specroll's engine (vLLM
        # would also stop at the checkpoint's EOS)
        row_seed = (int(seed) * 1_000_003 + int(pid)) % (2**63 - 1)
        return vllm.SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k or -1,
                                   top_p=sampling.top_p, max_tokens=sampling.max_new_tokens,
                                   stop_token_ids=list(sampling.stop_token_ids), ignore_eos=True, logprobs=0,
                                   seed=row_seed, detokenize=False)

    def _spec_counters(self) -> tuple[list[int], list[int], int]:
        """(drafts per position, accepted per position, verify steps summed over requests) so far."""
        k = self._spec_key[0] if self.speculating else 0
        drafted, accepted, drafts = [0] * k, [0] * k, 0
        if not self.speculating:
            return drafted, accepted, 0
        for m in self.llm.get_metrics():
            if m.name == "vllm:spec_decode_num_drafts":
                drafts = int(m.value)
            elif m.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
                accepted = [int(v) for v in m.values][:k]
        return [drafts] * k, accepted, drafts

    def throughput(self) -> dict:
        s = self._last
        drafted, accepted = sum(s.drafted_per_pos[:1]), sum(s.accepted_per_pos)
        mean_len = 1.0 + accepted / drafted if drafted else 1.0
        return {"tokens": s.tokens, "time_s": s.time_s, "tokens_per_s": s.tokens_per_s,
                "mean_accepted_len": mean_len, "speedup_vs_off_est": 1.0}


def _run_key(item: WorkItem) -> tuple:
    """Items with equal keys share one engine call: one step, seed, sampling, spec and version."""
    return (item.step, item.seed, item.version, item.sampling, item.spec)
