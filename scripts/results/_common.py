"""Shared by the scripts in scripts/results/: the default tiny policy with its heads, task
prompts, and figures drawn with matplotlib's object API (no pyplot, no display)."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OUT_DIR = REPO / "docs" / "results"


def load_default(heads_dir: str | None = "", with_heads: bool = True):
    """(cfg, model, heads, tokenizer) for the default config, fp32 on the CPU: the tiny policy
    (built first if missing) and the heads in `heads_dir`, or with "" the default config's heads
    (fitted first if missing, as `specroll train` does); heads None without `with_heads`."""
    import torch

    from experiments.config import load_config
    from experiments.fit_heads import ensure_heads, policy_dir
    from experiments.tokenizer import TextTokenizer
    from rollout.checkpoint import load_checkpoint
    from spec_heads.heads import DraftHeads

    cfg = load_config("default", [])
    model_dir = policy_dir(cfg)
    model = load_checkpoint(model_dir, device="cpu", dtype=torch.float32).eval()
    heads = None
    if with_heads:
        heads, _ = DraftHeads.load(heads_dir or ensure_heads(cfg, model_dir), model.config, device="cpu",
                                   dtype=torch.float32)
        heads.eval()
    return cfg, model, heads, TextTokenizer.from_dir(model_dir)


def task_prompts(cfg, tok, n: int, seed: int) -> list[list[int]]:
    from experiments.tasks import make_task

    task = make_task(cfg.task, chat=tok.apply_chat)
    return [tok.encode(ex.prompt) for ex in task.train_prompts(n, seed)]


def sampling(cfg, tok, **changes):
    """cfg.sampling with the tokenizer's EOS as a stop token, and `changes` applied (they win)."""
    changes.setdefault("stop_token_ids", sorted(set(cfg.sampling.stop_token_ids) | {tok.eos_id}))
    return dataclasses.replace(cfg.sampling, **changes)


def new_figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, name: str, out_dir: Path = OUT_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return path
