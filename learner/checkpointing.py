"""Run checkpoints: everything a resumed run needs to continue exactly where it stopped.

Layout of run_dir/checkpoints/:
  step_<k>/policy/        the policy as a Hugging Face folder (rollout.checkpoint.save_checkpoint)
  step_<k>/heads/         the draft heads (DraftHeads.save, with the policy version)
  step_<k>/value_head.safetensors   PPO only
  step_<k>/trainer.pt     optimiser state and the torch RNG states (read with weights_only=True)
  step_<k>/state.json     step, policy_version, refit baseline, python/numpy RNG states
  step_<k>/async_rollouts.pt   async runs (train.max_staleness >= 1): the rollouts already
                          submitted for the next steps, so a resumed run trains on the same samples
  latest                  a text file naming the newest complete step_<k>, written last

A checkpoint is written into a temporary folder next to its final place and renamed into place
when complete; `latest` is replaced atomically after that, so a crash at any moment leaves the
previous checkpoint and pointer intact. This module knows nothing about tasks, tokenizers or Ray.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from learner.trainer import Learner
from learner.value import ValueHead
from rollout.checkpoint import load_checkpoint, save_checkpoint

CHECKPOINTS = "checkpoints"
LATEST = "latest"
ASYNC_ROLLOUTS = "async_rollouts.pt"


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step}"


def save_run_checkpoint(run_dir: str | os.PathLike, step: int, learner: Learner,
                        tokenizer_dir: str | None = None, extra: dict | None = None,
                        async_rollouts: dict | None = None) -> Path:
    """Write checkpoint `step` atomically and point `latest` at it; returns its folder.
    async_rollouts: {step: RolloutBatch} submitted ahead (RLLoop.pending_rollouts)."""
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        save_checkpoint(learner.policy, str(tmp / "policy"), tokenizer_dir_or_file=tokenizer_dir)
        if learner.heads is not None:
            learner.heads.save(tmp / "heads", policy_version=learner.policy_version)
        if learner.value_head is not None:
            learner.value_head.save(str(tmp / "value_head.safetensors"))
        torch.save({"learner": learner.state_dict(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   tmp / "trainer.pt")
        state = {"step": int(step), "policy_version": learner.policy_version,
                 "refit_baseline": learner.refit_baseline, "python_rng": _python_rng(),
                 "numpy_rng": _numpy_rng(), "extra": extra or {}}
        if async_rollouts:
            torch.save(async_rollouts, tmp / ASYNC_ROLLOUTS)
        (tmp / "state.json").write_text(json.dumps(state))
        if final.exists():  # re-saving a step (e.g. the final one): replace it whole
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(final.parent / LATEST, final.name)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The folder `latest` points at, or None when the run has no checkpoint yet."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text().strip()
    if not (folder / "state.json").is_file():
        raise FileNotFoundError(f"{pointer}: points at {folder}, which is not a complete checkpoint; "
                                f"point it at another step_<k> folder in {root}")
    return folder


def load_run_checkpoint(folder: str | os.PathLike, learner: Learner) -> dict:
    """Load a checkpoint into `learner` (built for the same config) and restore the RNG states;
    returns state.json's contents (step, policy_version, ...) and "async_rollouts" ({} if none)."""
    folder = Path(folder)
    state = json.loads((folder / "state.json").read_text())
    ahead = folder / ASYNC_ROLLOUTS
    state["async_rollouts"] = torch.load(ahead, map_location="cpu", weights_only=False) if ahead.is_file() else {}
    device = learner.device
    dtype = next(learner.policy.parameters()).dtype
    saved = load_checkpoint(str(folder / "policy"), device=device, dtype=dtype)
    with torch.no_grad():
        learner.policy.load_state_dict(saved.state_dict())
    if learner.heads is not None:
        if not (folder / "heads").is_dir():
            raise FileNotFoundError(f"{folder}: holds no heads/ but this run speculates; resume with the "
                                    "run's own config (spec.mode as saved)")
        from safetensors.torch import load_file

        learner.heads.load_state_dict(load_file(str(folder / "heads" / "heads.safetensors")))
    if learner.value_head is not None:
        vh = ValueHead.load(str(folder / "value_head.safetensors"), learner.policy.config.hidden_size, device)
        learner.value_head.load_state_dict(vh.state_dict())
    trainer = _load_trainer_state(folder / "trainer.pt")
    learner.load_state_dict(trainer["learner"])
    _move_optimizer_state(learner.optimizer, device)
    torch.set_rng_state(trainer["torch_rng"])
    if trainer["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["cuda_rng"])
    _set_python_rng(state["python_rng"])
    _set_numpy_rng(state["numpy_rng"])
    return state


# ---------------------------------------------------------------------------------- helpers


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file and a rename: readers never see half of it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_trainer_state(file: Path) -> dict:
    """trainer.pt as tensors and plain containers only. A run folder may come from someone else,
    and a full unpickle runs whatever code the file names, so anything else is refused."""
    try:
        trainer = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{file}: holds objects other than tensors and plain containers, which specroll "
                         f"never writes, so it was not loaded ({first}); resume only from checkpoints "
                         "written by `specroll train`, or delete this step_<k> folder and point "
                         "`latest` at an earlier one") from None
    if not isinstance(trainer, dict) or not {"learner", "torch_rng", "cuda_rng"} <= trainer.keys():
        raise ValueError(f"{file}: is not a specroll trainer state (keys learner, torch_rng, cuda_rng); "
                         "resume only from checkpoints written by `specroll train`")
    return trainer


def _move_optimizer_state(optimizer: torch.optim.Optimizer, device) -> None:
    for st in optimizer.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and k != "step":
                st[k] = v.to(device)


def _python_rng():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_rng(saved) -> None:
    version, internal, gauss = saved
    random.setstate((version, tuple(internal), gauss))


def _numpy_rng():
    """numpy's global RNG state, if numpy is in use in this process (nothing here imports it)."""
    np = sys.modules.get("numpy")
    if np is None:
        return None
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def _set_numpy_rng(saved) -> None:
    np = sys.modules.get("numpy")
    if saved is None or np is None:
        return
    name, keys, pos, has_gauss, gauss = saved
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
