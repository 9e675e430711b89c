"""rollout.backend=vllm: rollouts served by a vLLM engine, behind RolloutWorker's interface.

`VllmRolloutWorker` takes the same arguments and returns the same records as
rollout/worker.py's RolloutWorker (tokens, behaviour log-probs of the sampling distribution,
the policy version), so the learner, head re-fit and client stay specroll's. The only module
that imports vLLM; the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so a
Ray actor wrapping this class holds it.

- Weights: policy and heads go in together under one version. The policy's through the model
  runner's `reload_weights`, the heads' through the drafter's `load_weights`, then the prefix
  cache is dropped: cached KV of a prompt was computed with the old weights.
- Speculation: parallel heads run as vLLM's Medusa proposer (`SpecrollMedusa`, registered with
  vLLM, our residual blocks and a copy of the policy's LM head). vLLM's Medusa drafts each head's
  argmax and verifies as if the draft were certain (acceptance p(x)): exact for argmax drafts,
  so spec.draft must be greedy. Sequential heads have no vLLM proposer here: refused.
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
import time
from typing import Iterable

import torch
import vllm
from torch import nn
from vllm.inputs import TokensPrompt

from rollout.checkpoint import load_checkpoint, save_checkpoint
from rollout.model import ModelConfig, Transformer
from rollout.types import RolloutBatch, RolloutConfig, RolloutStats, SamplingParams, Sequence, SpecParams
from spec_heads.exactness import FitResult, conditional_fit
from spec_heads.heads import HeadConfig
from spec_heads.sampling import sampling_probs

MEDUSA_ARCH = "SpecrollMedusa"
CHECK_PROMPT_LEN = 8  # tokens of the check's fixed prompt
CHECK_POSITIONS = (1, 2)  # completion tokens the check tests: the first two a verify step emits


class _ResBlock(nn.Module):
    """spec_heads.heads.ResBlock: h + W2(SiLU(W1 h)) (vLLM's Medusa block is h + SiLU(W h))."""

    def __init__(self, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, hidden)
        self.w2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.w2(nn.functional.silu(self.w1(h)))


class SpecrollMedusa(nn.Module):
    """specroll's parallel heads as a vLLM Medusa draft model: blocks.i.w{1,2} and lm_head (a copy
    of the policy's, re-sent with every sync), draft_tokens when the heads draft from a subset."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        c = vllm_config.speculative_config.draft_model_config.hf_config
        self.blocks = nn.ModuleList(_ResBlock(c.hidden_size) for _ in range(c.num_heads))
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        draft_vocab = int(getattr(c, "specroll_draft_vocab", 0))
        self.register_buffer("draft_tokens", torch.zeros(draft_vocab, dtype=torch.long) if draft_vocab else None)

    def forward(self, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        return [block(hidden_states) for block in self.blocks]

    def compute_logits(self, hidden_states: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for h in hidden_states:
            logits = self.lm_head(h)
            if self.draft_tokens is not None:  # drafts only from the draft vocabulary, as specroll's
                masked = torch.full_like(logits, -math.inf)
                masked[:, self.draft_tokens] = logits[:, self.draft_tokens]
                logits = masked
            out.append(logits)
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        loaded = set()
        for name, tensor in weights:
            if name not in own:
                raise ValueError(f"heads: unexpected tensor {name!r} for the vLLM Medusa export "
                                 f"(expected {sorted(own)})")
            own[name].data.copy_(tensor.to(own[name].dtype))
            loaded.add(name)
        return loaded


def policy_weights(policy_state: dict) -> list[tuple[str, torch.Tensor]]:
    """specroll's Transformer state -> (HF name, tensor), what vLLM's Llama/Qwen loaders read."""
    out = []
    for key, tensor in policy_state.items():
        if key.endswith("rotary.inv_freq") or key.startswith("rotary."):
            continue
        out.append((key if key == "lm_head.weight" else "model." + key, tensor))
    return out


def medusa_weights(heads_state: dict, policy_state: dict, k: int) -> list[tuple[str, torch.Tensor]]:
    """The first k parallel heads plus the policy's LM head, as SpecrollMedusa names them."""
    lm = policy_state.get("lm_head.weight", policy_state["embed_tokens.weight"])
    out = [("lm_head.weight", lm)]
    for i in range(k):
        for part in ("w1", "w2"):
            out += [(f"blocks.{i}.{part}.{p}", heads_state[f"blocks.{i}.{part}.{p}"]) for p in ("weight", "bias")]
    if "draft_tokens" in heads_state:
        out.append(("draft_tokens", heads_state["draft_tokens"]))
    return out


def _save_medusa(folder: str, mc: ModelConfig, heads: HeadConfig, k: int, tensors) -> None:
    import json

    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    config = {"model_type": "medusa", "architectures": [MEDUSA_ARCH], "hidden_size": mc.hidden_size,
              "vocab_size": mc.vocab_size, "num_heads": k, "num_hidden_layers": 1,
              "specroll_draft_vocab": heads.draft_vocab}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file({n: t.detach().contiguous().cpu() for n, t in tensors}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})


class VllmRolloutWorker:
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

    # ----------------------------------------------------------------- weights
    @torch.no_grad()
    def set_weights(self, version: int, policy_state: dict, heads_state: dict | None) -> int:
        """Swap policy and heads together to `version` (newer than the current one)."""
        if policy_state is None:
            raise ValueError("policy_state: a heads-only update would leave the heads one version "
                             "ahead of the policy; publish policy and heads together")
        if self.heads_config is not None and heads_state is None:
            raise ValueError("heads_state: a policy-only update would leave the draft heads stale "
                             f"(version {self.version}); publish policy and heads together")
        if int(version) <= self.version:
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

    # ------------------------------------------------------------------ engine
    def _ensure_exact(self, sampling: SamplingParams) -> None:
        """Run the goodness-of-fit check once per sampling setting at temperature > 0 while the
        engine speculates; on failure refuse (closing the engine, so no later call skips the
        check) or, with rollout.vllm.fallback_plain, rebuild it plain."""
        key = (sampling.temperature, sampling.top_k, sampling.top_p)
        if not self.speculating or sampling.temperature == 0 or key in self._checked:
            return
        self.fit = self.check_speculation(sampling)
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
        self.start_engine(self._want[0], False)

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
            _save_medusa(os.path.join(root, "heads"), self.model_config, self.heads_config, k,
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

    @torch.no_grad()
    def check_speculation(self, sampling: SamplingParams) -> FitResult:
        """Draw rollout.vllm.check_draws completions of one fixed prompt through the engine and test
        the tokens its verify steps emitted against the policy's sampling distribution."""
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
        want = self._spec_settings(spec)
        if self.llm is None:
            self._want = want
            self.start_engine(*want)
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

    def _params(self, sampling: SamplingParams, seed: int, pid: int):
        # a seed per row (prompt id), so a row's tokens do not depend on its batch neighbours
        row_seed = (int(seed) * 1_000_003 + int(pid)) % (2**63 - 1)
        return vllm.SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k or -1,
                                   top_p=sampling.top_p, max_tokens=sampling.max_new_tokens,
                                   stop_token_ids=list(sampling.stop_token_ids), logprobs=0, seed=row_seed,
                                   detokenize=False)

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
