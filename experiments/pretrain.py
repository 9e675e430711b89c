"""`specroll pretrain`: the tiny default policy, a character-level transformer taught a built-in
task's worked format (arith or longtail) by supervised fine-tuning, on a CPU, in minutes.

It is meant to be *partly* right: training stops once teacher-forced exact match on a probe
set of training problems reaches `target_accuracy` (or after `steps`), so greedy accuracy
on the held-out eval prompts lands in the middle and RL has room to raise it.
The result is an ordinary Hugging Face folder (rollout.checkpoint.save_checkpoint) cached
under $SPECROLL_CACHE/models/tiny-<task>-<hash of the configs>, so it is built once per config.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.tasks import Example, Task, TaskConfig, make_task
from experiments.tokenizer import TextTokenizer, build_char_tokenizer
from rollout.checkpoint import save_checkpoint
from rollout.model import ModelConfig, Transformer

ARITH_ALPHABET = "0123456789+-=,>"
_FORMAT_VERSION = 1  # bump when the data format or training recipe changes, to invalidate caches


@dataclass
class PretrainConfig:
    steps: int = 800  # most optimizer steps (training stops earlier at target_accuracy)
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 50  # linear warmup steps, then cosine decay to lr/10 over `steps`
    weight_decay: float = 0.01
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 352
    max_len: int = 64  # longest training sequence (prompt + worked answer + EOS)
    # examples per forward/backward, grouped by length so a few long answers pad only each other
    # (long-tailed tasks); 0: the whole batch in one pass
    micro_batch_size: int = 0
    target_accuracy: float = 0.5  # stop once probe exact match reaches this (1.0: run all steps)
    eval_every: int = 20  # steps between probe checks (0: never stop early)
    probe_size: int = 256  # training-distribution problems for the stopping check
    threads: int = 1  # torch CPU threads while pretraining (0: torch's default); tiny matrices gain
    # little from more, and spinning threads lose several-fold on a busy machine

    def __post_init__(self):
        for name in ("steps", "batch_size", "hidden_size", "layers", "heads", "kv_heads",
                     "intermediate", "max_len", "probe_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        for name in ("warmup", "eval_every", "weight_decay", "threads", "micro_batch_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size: {self.hidden_size} must be a multiple of heads={self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads: heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        if not 0.0 < self.target_accuracy <= 1.0:
            raise ValueError(f"target_accuracy: must be in (0, 1] (1 runs all steps), got {self.target_accuracy}")


# ---------------------------------------------------------------------------------------------
# Where the policy lives


# The built-in tasks a tiny policy is pretrained on, and each one's character alphabet.
TINY_TASKS = {"arith": ARITH_ALPHABET, "longtail": "0123456789+-*=:,>"}
# What of the task config shapes the tiny policy (its cache key).
_TASK_KEYS = {"arith": ("name", "digits", "ops"), "longtail": ("name", "ops", "chain_max", "chain_skew")}


def _check_task(task_cfg: TaskConfig) -> None:
    if task_cfg.name not in TINY_TASKS:
        raise ValueError(f"task.name: the tiny policy is pretrained on task arith or longtail, got "
                         f"{task_cfg.name!r}; set task.name=arith, or model.name to a real model for {task_cfg.name}")


def tiny_policy_dir(pcfg: PretrainConfig, task_cfg: TaskConfig, seed: int = 0,
                    cache_dir: str | None = None) -> str:
    """$SPECROLL_CACHE (or ~/.cache/specroll)/models/tiny-<task>-<hash of what shapes the model>."""
    _check_task(task_cfg)
    shape = {k: v for k, v in dataclasses.asdict(pcfg).items() if k != "threads"}  # speed only
    if not shape["micro_batch_size"]:  # (policies built before the field existed keep their folder)
        del shape["micro_batch_size"]
    key = {"pretrain": shape, "seed": seed, "version": _FORMAT_VERSION,
           "task": {k: getattr(task_cfg, k) for k in _TASK_KEYS[task_cfg.name]}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir or os.environ.get("SPECROLL_CACHE") or Path.home() / ".cache" / "specroll")
    return str(root / "models" / f"tiny-{task_cfg.name}-{digest}")


def _is_built(folder: str) -> bool:
    return all((Path(folder) / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def ensure_tiny_policy(cfg_root) -> str:
    """The tiny policy's folder for `cfg_root` (uses .pretrain, .task, .seed), built if missing."""
    _check_task(cfg_root.task)
    folder = tiny_policy_dir(cfg_root.pretrain, cfg_root.task, cfg_root.seed)
    if not _is_built(folder):
        build_tiny_policy(cfg_root.pretrain, cfg_root.task, folder, seed=cfg_root.seed)
    return folder


def run(cfg) -> None:
    """CLI `specroll pretrain`: (re)build the tiny policy for cfg.pretrain / cfg.task / cfg.seed."""
    _check_task(cfg.task)
    folder = tiny_policy_dir(cfg.pretrain, cfg.task, cfg.seed)
    metrics = build_tiny_policy(cfg.pretrain, cfg.task, folder, seed=cfg.seed)
    print(f"tiny policy: {folder}")
    for k, v in metrics.items():
        print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")


# ---------------------------------------------------------------------------------------------
# Building


def tiny_model_config(pcfg: PretrainConfig, tok: TextTokenizer) -> ModelConfig:
    return ModelConfig(vocab_size=tok.vocab_size, hidden_size=pcfg.hidden_size,
                       intermediate_size=pcfg.intermediate, num_hidden_layers=pcfg.layers,
                       num_attention_heads=pcfg.heads, num_key_value_heads=pcfg.kv_heads,
                       model_type="llama", tie_word_embeddings=True,
                       eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)


def _init_weights(model: Transformer, generator: torch.Generator) -> None:
    # Small normal init (GPT-2 style): the default N(0, 1) embedding, tied to the LM head,
    # starts with huge logits and trains slowly.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02, generator=generator)


def sft_batch(examples: list[Example], tok: TextTokenizer, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and a loss mask [B, T] that is 1 where the token at t+1 is part of
    the completion (worked target + EOS): the loss never trains the prompt."""
    rows, masks = [], []
    for ex in examples:
        prompt, completion = tok.encode(ex.prompt), tok.encode(ex.target) + [tok.eos_id]
        ids = prompt + completion
        if len(ids) > max_len:
            raise ValueError(f"max_len: {max_len} is shorter than a training sequence ({len(ids)} tokens: "
                             f"{ex.prompt}{ex.target}); raise pretrain.max_len or lower task.digits (the longtail task: --config longtail)")
        rows.append(ids)
        masks.append([0] * (len(prompt) - 1) + [1] * len(completion))  # predicts ids[1:]
    T = max(map(len, rows))
    input_ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), T)
    for i, (ids, m) in enumerate(zip(rows, masks)):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        loss_mask[i, :len(m)] = torch.tensor(m, dtype=torch.float)
    return input_ids, loss_mask


def sft_loss(model: Transformer, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over completion tokens."""
    logits = model.logits(model(input_ids))[:, :-1]  # [B, T-1, V]
    nll = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")  # [B, T-1]
    mask = loss_mask[:, :-1]
    return (nll * mask).sum() / mask.sum()


@torch.no_grad()
def teacher_forced_match(model: Transformer, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the target at every completion position. Equal to
    greedy exact match whenever greedy decoding reproduces the worked target, at the cost of
    one forward pass."""
    pred = model.logits(model(input_ids))[:, :-1].argmax(-1)  # [B, T-1]
    mask = loss_mask[:, :-1].bool()
    ok = (pred == input_ids[:, 1:]) | ~mask
    return ok.all(dim=1).float().mean().item()


def sft_chunks(examples: list[Example], tok: TextTokenizer, max_len: int,
               micro_batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`sft_batch`es of at most `micro_batch_size` examples, grouped by length (0: one batch in
    the given order)."""
    if not micro_batch_size or micro_batch_size >= len(examples):
        return [sft_batch(examples, tok, max_len)]
    ordered = sorted(examples, key=lambda ex: len(ex.prompt) + len(ex.target))
    return [sft_batch(ordered[i:i + micro_batch_size], tok, max_len)
            for i in range(0, len(ordered), micro_batch_size)]


def sft_step(model: Transformer, chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Backward of the batch's mean completion-token loss, accumulated over its chunks; returns
    that loss (detached)."""
    total = sum(mask[:, :-1].sum() for _, mask in chunks)
    loss_sum = torch.zeros(())
    for ids, mask in chunks:
        part = sft_loss(model, ids, mask) * (mask[:, :-1].sum() / total)
        part.backward()
        loss_sum += part.detach()
    return loss_sum


def chunked_match(model: Transformer, chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """`teacher_forced_match` over all chunks' rows."""
    rows = sum(ids.shape[0] for ids, _ in chunks)
    return sum(teacher_forced_match(model, ids, mask) * ids.shape[0] for ids, mask in chunks) / rows


def _lr_at(step: int, pcfg: PretrainConfig) -> float:
    if step < pcfg.warmup:
        return pcfg.lr * (step + 1) / pcfg.warmup
    t = (step - pcfg.warmup) / max(1, pcfg.steps - pcfg.warmup)
    return pcfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def build_tiny_policy(pcfg: PretrainConfig, task_cfg: TaskConfig, out_dir: str, seed: int = 0,
                      progress: bool = True) -> dict:
    """SFT a tiny policy on the task's worked targets and save it to `out_dir`
    (an HF folder plus pretrain_metrics.json). Returns the metrics."""
    model, tok, metrics = train_tiny_policy(pcfg, task_cfg, seed, progress)
    save_tiny_policy(model, tok, out_dir, metrics, pcfg, task_cfg, seed)
    return metrics


def train_tiny_policy(pcfg: PretrainConfig, task_cfg: TaskConfig, seed: int = 0,
                      progress: bool = True) -> tuple[Transformer, TextTokenizer, dict]:
    """SFT (AdamW, warmup + cosine, loss on completion tokens only) until the probe reaches
    target_accuracy or `steps` run out; then greedy evaluation on the held-out prompts."""
    _check_task(task_cfg)
    threads = torch.get_num_threads()
    if pcfg.threads:
        torch.set_num_threads(pcfg.threads)
    try:
        return _train(pcfg, task_cfg, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _train(pcfg: PretrainConfig, task_cfg: TaskConfig, seed: int, progress: bool):
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    task = make_task(task_cfg)
    tok = TextTokenizer(build_char_tokenizer(TINY_TASKS[task_cfg.name]))
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(tiny_model_config(pcfg, tok))
    _init_weights(model, gen)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": pcfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=pcfg.lr, betas=(0.9, 0.98))
    # Probe problems from the training distribution (a seed no training batch uses).
    probe = sft_chunks(task.train_prompts(pcfg.probe_size, seed=-1 - seed), tok, pcfg.max_len,
                       pcfg.micro_batch_size)
    losses, probe_match, step = [], 0.0, 0
    bar = tqdm(range(pcfg.steps), desc="pretrain tiny policy", disable=not progress, leave=False)
    for step in bar:
        chunks = sft_chunks(task.train_prompts(pcfg.batch_size, seed=seed * 1_000_003 + step), tok,
                            pcfg.max_len, pcfg.micro_batch_size)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, pcfg)
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = sft_step(model, chunks)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if pcfg.eval_every and (step + 1) % pcfg.eval_every == 0:
            model.eval()
            probe_match = chunked_match(model, probe)
            bar.set_postfix(loss=f"{loss.item():.3f}", probe=f"{probe_match:.2f}")
            if probe_match >= pcfg.target_accuracy:
                break
    bar.close()
    model.eval()
    train_s = time.perf_counter() - t0
    metrics = {"steps_run": step + 1, "initial_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:]),
               "probe_match": chunked_match(model, probe), "num_params": model.num_params(),
               "train_s": train_s}
    metrics.update(greedy_eval(model, tok, task))
    metrics["wall_s"] = time.perf_counter() - t0
    return model, tok, metrics


def save_tiny_policy(model: Transformer, tok: TextTokenizer, out_dir: str, metrics: dict,
                     pcfg: PretrainConfig, task_cfg: TaskConfig, seed: int) -> None:
    """The HF folder (atomic, via save_checkpoint), then pretrain_metrics.json (atomic)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tok-") as tok_dir:
        tok.save(tok_dir)
        save_checkpoint(model, str(out), tokenizer_dir_or_file=tok_dir, extra_config={
            "specroll_pretrain": {"pretrain": dataclasses.asdict(pcfg), "seed": seed,
                                  "task": dataclasses.asdict(task_cfg)}})
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".metrics-")
    with os.fdopen(fd, "w") as f:
        json.dump(metrics, f, indent=2)
    os.replace(tmp, out / "pretrain_metrics.json")


# ---------------------------------------------------------------------------------------------
# Greedy evaluation


def greedy_completions(model: Transformer, tok: TextTokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy decoding of each prompt with the rollout engine (speculation off)."""
    from rollout.engine import Engine
    from rollout.types import SamplingParams, SpecParams

    eng = Engine(model, heads=None, max_batch=64, device="cpu")
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=[tok.eos_id])
    batch = eng.generate([tok.encode(p) for p in prompts], params, spec=SpecParams(mode="off"), seed=0)
    return [tok.decode(s.tokens) for s in batch.sequences]


def greedy_eval(model: Transformer, tok: TextTokenizer, task: Task) -> dict:
    """Greedy accuracy, well-formed rate and mean reward on the task's held-out prompts."""
    examples = task.eval_prompts()
    max_new = max(len(tok.encode(ex.target)) for ex in examples) + 4
    texts = greedy_completions(model, tok, [ex.prompt for ex in examples], max_new)
    parts = [task.reward_parts(t, ex) for t, ex in zip(texts, examples)]
    n = len(examples)
    return {"eval_accuracy": sum(p["correct"] for p in parts) / n,
            "eval_format_rate": sum(p["format"] for p in parts) / n,
            "eval_reward": sum(task.reward(t, ex) for t, ex in zip(texts, examples)) / n}
