"""`specroll fit-heads`: fit fresh draft heads to a frozen policy by self-distillation.

The policy samples `fit.num_sequences` completions of task training prompts (speculation off,
cfg.sampling, the tokenizer's EOS added as a stop token); the heads are fitted to the
policy's sampling distribution on those completions (learner.refit.fit_heads: KL warm-up, then
fit.loss), with `fit.holdout` of the samples held out to report per-depth acceptance
sum_v min(target, draft) as the fit goes. The fit temperature is fit.temperature, or, when it
is null (the default), sampling.temperature: the one the engine drafts and verifies at.

Where the heads go: `heads_path` when set; otherwise next to the policy, in
`<model_dir>-heads-<kind>-<K>-<hash>` (`default_heads_dir`), where the hash covers everything
that shapes the fit (heads, fit, task, sampling, seed), so changing any of them fits new heads
instead of silently reusing stale ones. For the tiny policy and named models the policy folder
is in the cache ($SPECROLL_CACHE or ~/.cache/specroll/models), so the heads are too.
`ensure_heads` (used by `specroll train` and `bench`) fits only when that folder holds no heads;
`run` (the command) always fits, replacing heads already there.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from experiments.config import Config, ConfigError
from spec_heads.acceptance import expected_tokens
from spec_heads.heads import CONFIG_FILE, MODEL_DIMS, WEIGHTS_FILE, DraftHeads

_FIT_VERSION = 1  # bump when the fitting recipe changes, to invalidate cached heads


# ------------------------------------------------------------------------------ where things are


def policy_dir(cfg: Config) -> str:
    """The policy's checkpoint folder: the tiny policy (built if missing), a named model
    (converted once) or a local folder."""
    from rollout.checkpoint import resolve_model

    if cfg.model.name == "tiny":
        from experiments.pretrain import ensure_tiny_policy

        return ensure_tiny_policy(cfg)
    if cfg.model.name.endswith(".gguf"):
        raise ConfigError(f"model.name: {cfg.model.name}: fit-heads needs a checkpoint folder with "
                          "tokenizer.json; use a named model (e.g. smollm2-135m) or convert the GGUF "
                          "to a folder (rollout.checkpoint.save_checkpoint)")
    try:
        folder = resolve_model(cfg.model.name)
    except (FileNotFoundError, NotADirectoryError, ModuleNotFoundError) as e:
        raise ConfigError(f"model.name: {e}") from None
    missing = [f for f in ("config.json", "tokenizer.json") if not (Path(folder) / f).is_file()]
    if missing:
        raise ConfigError(f"model.name: {folder} has no {' or '.join(missing)}; point model.name at a "
                          "checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    return folder


def fit_temperature(cfg: Config) -> float:
    return cfg.sampling.temperature if cfg.fit.temperature is None else cfg.fit.temperature


def default_heads_dir(model_dir: str, cfg: Config) -> str:
    """`<model_dir>-heads-<kind>-<K>-<hash of what shapes the fit>`, next to the policy."""
    sp = cfg.sampling
    heads = dataclasses.asdict(cfg.heads)
    if not heads["draft_vocab"]:  # (heads fitted before the field existed keep their folder)
        del heads["draft_vocab"]
    fit = dataclasses.asdict(cfg.fit)
    if not fit["init"]:  # (fits from fresh heads, as before the field existed, keep their folder)
        del fit["init"]
    key = {"heads": heads, "fit": fit,
           "temperature": fit_temperature(cfg), "seed": cfg.seed, "version": _FIT_VERSION,
           "task": {k: getattr(cfg.task, k) for k in ("name", "path", "digits", "ops")},
           "sampling": {k: getattr(sp, k) for k in ("top_k", "top_p", "max_new_tokens")}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    base = str(Path(model_dir)).rstrip("/")
    return f"{base}-heads-{cfg.heads.kind}-{cfg.heads.num_depths}-{digest}"


def _heads_target(cfg: Config, model_dir: str) -> tuple[Path, str]:
    """(folder, the config key that named it) for error messages."""
    if cfg.heads_path:
        return Path(cfg.heads_path).expanduser(), "heads_path"
    return Path(default_heads_dir(model_dir, cfg)), "the default heads folder"


def _has_heads(folder: Path, where: str, cfg: Config, model_dir: str) -> bool:
    """True if `folder` holds heads usable for this config; False if it can take new ones;
    ConfigError if it is something else (a file, an unrelated folder, heads of another shape)."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{where}: {folder} is a file; give a folder for the heads "
                          "(a new one is created) or one written by `specroll fit-heads`")
    if not folder.is_dir():
        return False
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        if any(p for p in folder.iterdir() if not p.name.startswith(".")):
            raise ConfigError(f"{where}: {folder} exists but holds no draft heads ({CONFIG_FILE}); "
                              "point heads_path at a new or empty folder, or one written by `specroll fit-heads`")
        return False
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where}: {folder / CONFIG_FILE} is unreadable ({e}); delete the folder to "
                          "re-fit, or re-run `specroll fit-heads`") from None
    if (meta.get("kind"), meta.get("num_depths")) != (cfg.heads.kind, cfg.heads.num_depths):
        raise ConfigError(f"{where}: {folder} holds {meta.get('kind')} heads with {meta.get('num_depths')} "
                          f"depths but heads.kind={cfg.heads.kind}, heads.num_depths={cfg.heads.num_depths}; "
                          "match heads.* to them, or point heads_path at another folder")
    model_cfg = json.loads((Path(model_dir) / "config.json").read_text())
    clash = [k for k in MODEL_DIMS if k in meta and model_cfg.get(k) is not None and meta[k] != model_cfg[k]]
    if clash:
        raise ConfigError(f"{where}: heads in {folder} were fit for another model ({', '.join(clash)} differ "
                          f"from {model_dir}); re-fit with `specroll fit-heads` or point heads_path elsewhere")
    return True


def ensure_heads(cfg: Config, model_dir: str) -> str:
    """The folder of draft heads for this policy and config: `heads_path` or the default
    folder, fitted (and saved there) first if it holds none."""
    folder, where = _heads_target(cfg, model_dir)
    if not _has_heads(folder, where, cfg, model_dir):
        fit_and_save(cfg, model_dir, str(folder))
    return str(folder)


# ------------------------------------------------------------------------------ the fit


def _device_dtype(cfg: Config) -> tuple[torch.device, torch.dtype]:
    name = cfg.model.device
    dev = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                       "cpu" if name == "auto" else name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {name} but CUDA is not available here; set model.device=cpu")
    if cfg.model.dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, getattr(torch, cfg.model.dtype)


def _load_policy(cfg: Config, model_dir: str):
    from experiments.tokenizer import TextTokenizer
    from rollout.checkpoint import load_checkpoint

    device, dtype = _device_dtype(cfg)
    try:
        model = load_checkpoint(model_dir, device=device, dtype=dtype).eval()
        tok = TextTokenizer.from_dir(model_dir)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise ConfigError(f"model.name: cannot load the policy from {model_dir}: {e}") from None
    for p in model.parameters():
        p.requires_grad_(False)  # frozen: fitting heads never trains the policy
    return model, tok


def _sample(cfg: Config, model, tok) -> tuple[list[list[int]], list[int]]:
    """fit.num_sequences self-distillation samples of task training prompts."""
    from tqdm.auto import tqdm

    from experiments.tasks import make_task
    from learner.refit import collect_sequences
    from rollout.engine import Engine

    task = make_task(cfg.task, chat=tok.apply_chat)
    n = cfg.fit.num_sequences
    prompts = [tok.encode(ex.prompt) for ex in task.train_prompts(n, seed=cfg.seed)]
    stops = sorted(set(cfg.sampling.stop_token_ids) | {tok.eos_id})
    sampling = dataclasses.replace(cfg.sampling, stop_token_ids=stops)
    engine = Engine(model, None, max_batch=cfg.rollout.max_batch, max_len=cfg.rollout.max_seq_len or None)
    with tqdm(total=n, desc="sampling", unit="seq", leave=False) as bar:
        return collect_sequences(engine, prompts, sampling, n, seed=cfg.seed, progress=bar)


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def predicted_tokens_per_verify(acceptance: list[float]) -> float:
    """1 + sum_j prod_{i<=j} alpha_i: tokens per verify step drafting all K depths, taking the
    per-depth acceptance (measured given accepted earlier drafts) as each depth's rate."""
    return expected_tokens(acceptance, len(acceptance))


def _initial_heads(cfg: Config, model_config) -> DraftHeads:
    """The heads at fit.init, checked against cfg.heads (ConfigError naming both and the fix)."""
    try:
        heads, _ = DraftHeads.load(cfg.fit.init, model_config)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"fit.init: {e}") from None
    saved = dataclasses.asdict(heads.config)
    wanted = dataclasses.asdict(cfg.heads)
    if saved != wanted:
        diff = ", ".join(f"heads.{k}={saved[k]} (config: {wanted[k]})" for k in saved if saved[k] != wanted[k])
        raise ConfigError(f"fit.init: the heads at {cfg.fit.init} have {diff}; set those heads.* values, "
                          "or fit fresh heads (fit.init='')")
    return heads


def fit_and_save(cfg: Config, model_dir: str, out_dir: str) -> dict:
    """Sample, fit fresh heads (or continue from fit.init), save them to `out_dir` (policy_version
    0); returns the metrics."""
    from tqdm.auto import tqdm

    from learner.refit import fit_heads

    model, tok = _load_policy(cfg, model_dir)
    if cfg.heads.draft_vocab >= model.config.vocab_size:  # before minutes of sampling, not after
        raise ConfigError(f"heads.draft_vocab: {cfg.heads.draft_vocab} is not below the policy's vocabulary "
                          f"({model.config.vocab_size} tokens); set it lower, or 0 to draft from all")
    fc, temperature = cfg.fit, fit_temperature(cfg)
    init = _initial_heads(cfg, model.config) if fc.init else None  # checked before sampling too
    print(f"fit-heads: {cfg.heads.kind} heads, {cfg.heads.num_depths} depths, for {model_dir}"
          + (f", continuing from {fc.init}" if init is not None else ""))
    sequences, prompt_lens = _sample(cfg, model, tok)
    n_eval = min(len(sequences) - 1, max(1, round(fc.holdout * len(sequences))))
    n_fit = len(sequences) - n_eval
    device = next(model.parameters()).device
    if init is not None:  # continue a fit: the heads (and their draft vocabulary) as they were saved
        heads = init
    else:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(cfg.seed)
            heads = DraftHeads(cfg.heads, model.config)
    heads.to(device=device, dtype=torch.float32)  # fp32 heads: the optimiser state stays exact
    coverage = None
    if cfg.heads.draft_vocab and not fc.init:  # the tokens the policy samples most, from the fit's samples
        stops = sorted(set(cfg.sampling.stop_token_ids) | {tok.eos_id})
        coverage = heads.set_draft_vocab([s[p:] for s, p in zip(sequences[:n_fit], prompt_lens[:n_fit])],
                                         always=stops)
        print(f"draft vocabulary: the {cfg.heads.draft_vocab} most sampled tokens (and the stop tokens) "
              f"cover {coverage:.1%} of the sampled tokens")

    def log(record):
        acc = record["acceptance"]
        tqdm.write(f"step {record['step']:5d}  {record['loss_name']:>6} loss {record['loss']:.4f}"
                   + (f"  acceptance per depth {_fmt(acc)}" if acc else ""))

    with tqdm(total=fc.steps, desc="fitting heads", unit="step", leave=False) as bar:
        metrics = fit_heads(model, heads, sequences[:n_fit], prompt_lens=prompt_lens[:n_fit],
                            eval_sequences=sequences[n_fit:], eval_prompt_lens=prompt_lens[n_fit:],
                            steps=fc.steps, lr=fc.lr, loss=fc.loss, kl_warmup_steps=fc.kl_warmup_steps,
                            micro_batch_size=fc.micro_batch_size, temperature=temperature,
                            eval_every=fc.eval_every, generator=torch.Generator().manual_seed(cfg.seed),
                            progress=bar, log_fn=log)
    extra = {"fit": {**dataclasses.asdict(fc), "temperature": temperature}, "policy": str(model_dir),
             "task": cfg.task.name, "num_fit_sequences": n_fit, "num_eval_sequences": n_eval,
             "acceptance_before": metrics["acceptance_before"],
             "acceptance_after": metrics["acceptance_after"],
             "final_loss": metrics["losses"][-1], "fit_time_s": metrics["time_s"],
             "draft_vocab_coverage": coverage}
    heads.save(out_dir, policy_version=0, extra=extra)
    _report(metrics, out_dir)
    return metrics


def _report(metrics: dict, out_dir: str) -> None:
    before, after = metrics["acceptance_before"], metrics["acceptance_after"]
    print("depth  acceptance before -> after (held-out samples)")
    for i, (b, a) in enumerate(zip(before, after), start=1):
        print(f"{i:5d}  {b:.3f} -> {a:.3f}")
    print(f"predicted tokens per verify at full depth: {predicted_tokens_per_verify(before):.2f} -> "
          f"{predicted_tokens_per_verify(after):.2f}")
    print(f"fit took {metrics['time_s']:.1f}s; heads saved to {out_dir}")


def run(cfg: Config) -> int:
    """CLI `specroll fit-heads`: fit heads for cfg's policy and save them (replacing any there)."""
    model_dir = policy_dir(cfg)
    folder, where = _heads_target(cfg, model_dir)
    try:
        _has_heads(folder, where, cfg, model_dir)
    except ConfigError as e:
        # heads of another shape or model are replaced by the command; anything else is refused
        if not (folder / CONFIG_FILE).is_file():
            raise e from None
    fit_and_save(cfg, model_dir, str(folder))
    return 0
