"""Draft heads and the math of drafting. torch only; imports nothing else of specroll.

The stable public surface (others build on it):

    from spec_heads import rejection_sample
    tokens, num_emitted = rejection_sample(target_probs, draft_probs, draft_tokens, draft_lengths,
                                           generator)

- `rejection_sample` / `rejection_sample_reference`: exact speculative sampling, batched over
  rows with per-row draft lengths (and its slow per-row reference, equal bit for bit);
- `acceptance_rate`, `expected_tokens_per_step`: alpha = sum_v min(target, draft), and the
  tokens a k-deep verify emits on average at a constant alpha;
- `DraftHeads`, `HeadConfig`: the parallel (Medusa) and sequential (MTP) heads;
- `head_loss` and the losses it names (`tv_loss`, `e2e_tv_loss`, `kl_loss`, `ce_loss`);
- `choose_depths`: per-row draft depths under a step's token budget (a pure function);
- `DepthPolicy`: the off / fixed / entropy draft-depth control, tuned by `DepthControl`.
"""
from spec_heads.budget import choose_depths
from spec_heads.depth import DepthPolicy
from spec_heads.depth_config import DepthControl
from spec_heads.heads import DraftHeads, HeadConfig
from spec_heads.losses import ce_loss, e2e_tv_loss, head_loss, kl_loss, tv_loss
from spec_heads.acceptance import acceptance_rate, expected_tokens_per_step
from spec_heads.rejection import rejection_sample, rejection_sample_reference

__all__ = [
    "DepthControl", "DepthPolicy", "DraftHeads", "HeadConfig", "choose_depths",
    "ce_loss", "e2e_tv_loss", "head_loss", "kl_loss", "tv_loss",
    "acceptance_rate", "expected_tokens_per_step", "rejection_sample", "rejection_sample_reference",
]
