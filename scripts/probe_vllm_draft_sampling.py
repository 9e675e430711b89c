"""Is vLLM's speculative sampling at temperature 1 exact when the drafts carry probabilities?

docs/vllm.md's exactness table checks proposers whose drafts vLLM treats as certain (ngram,
specroll's Medusa export). This probe checks the other path: a separate draft model that samples
its drafts (`draft_sample_method=probabilistic`, the full draft distribution in the ratio test)
or takes their argmax (`greedy`). The draft is the test policy with noise on its LM head, close
to the policy but not equal (a draft equal to the policy would pass any sampler). Prints
specroll's goodness-of-fit result and vLLM's acceptance counters.

  .venv-vllm/bin/python scripts/probe_vllm_draft_sampling.py [--draws 2000] [--draft probabilistic|greedy]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--draft", default="probabilistic", choices=["probabilistic", "greedy"])
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--noise", type=float, default=0.1, help="std of the noise added to the draft's LM head")
    args = ap.parse_args()

    import torch
    import vllm  # this script is a probe of vLLM itself; the worker module stays the only product importer

    from rollout.checkpoint import save_checkpoint
    from rollout.model import ModelConfig, Transformer
    from rollout.types import RolloutConfig, SamplingParams, VllmParams
    from rollout.vllm_worker import VllmRolloutWorker

    mc = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)  # the policy of tests/rollout/test_vllm_worker.py
    policy = Transformer(mc)
    with torch.no_grad():
        policy.lm_head.weight.normal_(0, 0.15)
    w = VllmRolloutWorker(mc, None, RolloutConfig(max_batch=256, vllm=VllmParams(check_draws=args.draws)),
                          policy_state={k: v.detach().clone() for k, v in policy.state_dict().items()})
    with torch.no_grad():
        policy.lm_head.weight.add_(torch.randn_like(policy.lm_head.weight) * args.noise)
    root = w._dir.name
    save_checkpoint(policy, os.path.join(root, "draft"))
    w.start_engine(0, False)  # writes the policy's folder
    w.close()
    w.llm = vllm.LLM(model=os.path.join(root, "policy"), skip_tokenizer_init=True, dtype="float32",
                     logprobs_mode="processed_logprobs", max_model_len=1024, max_num_seqs=256, enforce_eager=True,
                     seed=0, disable_log_stats=False,
                     speculative_config={"method": "draft_model", "model": os.path.join(root, "draft"),
                                         "num_speculative_tokens": args.k, "draft_sample_method": args.draft})
    w.speculating = True
    fit = w.check_speculation(SamplingParams(temperature=1.0, max_new_tokens=4))
    counters = {m.name: getattr(m, "values", None) or getattr(m, "value", None) for m in w.llm.get_metrics()
                if m.name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_accepted_tokens_per_pos")}
    print(f"vllm {vllm.__version__}, draft model ({args.draft} drafts, k={args.k}, LM-head noise {args.noise}), "
          f"temperature 1, {args.draws} draws: chi-square p={fit.pvalue:.3g} over {fit.dof} dof, "
          f"{fit.zero_mass_hits} zero-mass draws; counters {counters}")


if __name__ == "__main__":
    main()
