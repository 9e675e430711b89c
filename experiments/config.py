"""The root run config: dataclass sections merged from a YAML preset and `key.sub=value` overrides.

Layers, later wins: dataclass defaults <- preset YAML (a name in configs/ or a path) <- overrides.
OmegaConf does the merging and type checks; we build the dataclass tree ourselves, bottom-up, so
every error a user can cause (unknown key, wrong type, impossible value, sections that do not fit
together) becomes one `ConfigError` naming the dotted key and the fix.
Defaults live once, in the section dataclasses; presets hold only overrides.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from experiments.pretrain import PretrainConfig
from experiments.tasks import TaskConfig
from learner.config import RefitConfig, TrainConfig
from learner.refit import HeadFitConfig
from learner.losses import AlgoConfig
from rollout.types import RolloutConfig, SamplingParams, SpecParams
from spec_heads.heads import HeadConfig

# Presets sit next to the packages: configs/ in a source checkout, and site-packages/configs/ in an
# installed wheel (pyproject's package-data "../configs/*.yaml" puts them there).
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"

DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """A config the user wrote cannot run; the message names the dotted key and the fix."""


@dataclass
class ModelSpec:
    """Which policy to train; `dtype`/`device` place the learner's copy (rollout.* places the workers')."""

    name: str = "tiny"  # tiny | smollm2-135m | a local HF folder | a .gguf file
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self):
        if not self.name:
            raise ValueError("name: must be tiny, smollm2-135m, a local HF folder or a .gguf path, got ''")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not _DEVICE_RE.match(self.device):
            raise ValueError(f"device: must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}")


@dataclass
class RayConfig:
    enabled: bool = True  # false: everything in this process, no Ray (one rollout worker)
    address: str = ""  # "": start a local cluster; "auto": join the running one (`ray start --head`)
    num_cpus: int = 0  # for a local cluster; 0 = all

    def __post_init__(self):
        if self.num_cpus < 0:
            raise ValueError(f"num_cpus: must be >= 0 (0 uses all cores), got {self.num_cpus}")


@dataclass
class Config:
    """One run: every section, merged by `load_config`. Sections validate themselves; this checks across them."""

    name: str = "default"  # run name; the run directory is out_dir/name
    seed: int = 0
    out_dir: str = "runs"
    resume: str = ""  # a run directory to continue from its last checkpoint
    heads_path: str = ""  # fitted draft heads to start from; "" fits fresh heads
    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskConfig = field(default_factory=TaskConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # builds the tiny policy
    sampling: SamplingParams = field(default_factory=SamplingParams)
    spec: SpecParams = field(default_factory=SpecParams)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    heads: HeadConfig = field(default_factory=HeadConfig)
    fit: HeadFitConfig = field(default_factory=HeadFitConfig)  # the initial fit of fresh heads (fit-heads)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    refit: RefitConfig = field(default_factory=RefitConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self):
        # Checks across sections; messages carry their own dotted paths.
        if not self.name or "/" in self.name:
            raise ValueError(f"name: must be a non-empty run name without '/', got {self.name!r}")
        if self.model.name == "tiny" and self.task.name not in ("arith", "longtail"):
            raise ValueError(f"task.name: the tiny policy is pretrained on task arith or longtail, got "
                             f"{self.task.name!r}; set task.name=arith, or model.name to a real model (e.g. smollm2-135m)")
        if self.spec.mode == "fixed" and self.spec.k > self.heads.num_depths:
            raise ValueError(
                f"spec.k: {self.spec.k} drafts per step need {self.spec.k} head depths but heads.num_depths="
                f"{self.heads.num_depths}; set spec.k <= {self.heads.num_depths} or raise heads.num_depths")
        # entropy mode: spec.max_k is a ceiling, and the heads' depth caps it (see SpecParams).
        depth = {"off": 0, "fixed": self.spec.k,
                 "entropy": min(self.spec.max_k, self.heads.num_depths)}[self.spec.mode]
        cache_len = self.sampling.max_new_tokens + depth + 1
        if 0 < self.rollout.max_seq_len < cache_len:
            raise ValueError(
                f"rollout.max_seq_len: {self.rollout.max_seq_len} cannot hold sampling.max_new_tokens="
                f"{self.sampling.max_new_tokens} plus {depth} drafts plus the prompt; raise it or set 0 "
                f"(sized from the prompts)")
        if self.refit.schedule == "idle" and (not self.ray.enabled or self.rollout.num_workers < 2):
            raise ValueError("refit.schedule: idle re-fits run on a rollout worker that ran out of work while "
                             "others finish; set ray.enabled=true and rollout.num_workers>=2, or use on_drop")
        if self.rollout.partial and (self.train.max_staleness < 1 or not self.ray.enabled):
            raise ValueError("rollout.partial: idle workers start the next step's prompts, which exist only with "
                             "async rollouts on Ray workers; set train.max_staleness>=1 and ray.enabled=true, "
                             "or rollout.partial=false")
        if self.rollout.num_workers > 1 and not self.ray.enabled:
            raise ValueError(f"rollout.num_workers: {self.rollout.num_workers} workers need Ray; "
                             f"set ray.enabled=true or rollout.num_workers=1")

    @property
    def run_dir(self) -> str:
        return f"{self.out_dir}/{self.name}"


# ---------------------------------------------------------------- loading


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def find_preset(preset: str) -> Path:
    """A preset name in configs/ ("default", "smollm2-gsm8k") or a path to a YAML file."""
    path = Path(preset).expanduser()
    if preset.endswith((".yaml", ".yml")) or os.sep in preset or path.is_file():
        if not path.is_file():
            raise ConfigError(f"--config {preset}: no such file; give a YAML path or one of the presets: "
                              f"{', '.join(list_presets())}")
        return path
    candidate = PRESET_DIR / f"{preset}.yaml"
    if candidate.is_file():
        return candidate
    names = list_presets()
    close = difflib.get_close_matches(preset, names, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ConfigError(f"--config {preset}: no preset of that name in {PRESET_DIR}; {hint}"
                      f"presets: {', '.join(names)} (or give a path to a YAML file)")


def load_config(preset: str | None = "default", overrides: list[str] | None = None) -> Config:
    """Defaults <- preset YAML <- `key.sub=value` overrides, validated; raises ConfigError."""
    merged = OmegaConf.structured(Config)
    if preset:
        path = find_preset(preset)
        try:
            layer = OmegaConf.load(path)
        except Exception as e:  # YAML syntax: the parser's message has the line
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"{path}: must hold a mapping of sections (e.g. 'train:\\n  steps: 5')")
        merged = _merge(merged, layer, where=f"{path}: ")
    for item in overrides or []:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=5")
        key, value = item.split("=", 1)
        section = _section_type(key)
        hint = typing.get_type_hints(section).get(key.split(".")[-1]) if section else None
        if dataclasses.is_dataclass(hint):
            raise ConfigError(f"{key}: is a section, not a value; set its keys instead, e.g. {key}.<key>=value")
        if hint is str:
            # a string field takes the text as written: YAML would read spec.mode=off as False
            layer = OmegaConf.create()
            OmegaConf.update(layer, key, value.strip("'\""), force_add=True)
        else:
            try:
                layer = OmegaConf.from_dotlist([item])
            except Exception as e:  # the YAML parser's own errors, e.g. an unclosed list
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(f"{key}: cannot read {value!r} as a value ({first}); write a list as "
                                  f"[1, 2] and a string with quotes if it holds [ ] , or :") from None
        merged = _merge(merged, layer, where="")
    try:
        tree = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e)) from None
    return _build(Config, tree, "")


def config_from_yaml(path: str | os.PathLike) -> Config:
    """A saved run config (`save_config`), e.g. to resume; checked as strictly as a preset."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file; give a run directory holding config.yaml or a YAML path")
    return load_config(str(path), [])


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def format_config(cfg: Config) -> str:
    """The resolved config, for the top of a run's log."""
    return f"# run_dir: {cfg.run_dir}\n{to_yaml(cfg)}"


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the fully resolved YAML atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(to_yaml(cfg))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- internals


def _merge(base: DictConfig, layer: DictConfig, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as e:
        raise ConfigError(where + _explain(e)) from None


def _build(cls, node: dict, path: str):
    """Instantiate dataclass `cls` from a plain dict, children first, prefixing errors with `path`."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name not in node:
            continue
        value = node[f.name]
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, dict):
            value = _build(hints[f.name], value, _join(path, f.name))
        else:
            _check_finite(_join(path, f.name), hints[f.name], value, f)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path}.{e}" if path else str(e)) from None


def _check_finite(key: str, hint, value, f: dataclasses.Field) -> None:
    """Every float setting (and each float of a list) must be finite: nan and inf pass most range
    checks (`nan < 0` is False) and surface later as tracebacks deep in the engine or the optimiser."""
    if float not in (hint, *typing.get_args(hint)):
        return
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, float) and not math.isfinite(v):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            raise ConfigError(f"{key}: must be a finite number, got {v}; set a finite value "
                              f"(default: {'unset' if default is None else default})")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _section_type(dotted: str):
    """The dataclass holding `dotted`'s last key (Config for top-level keys), or None."""
    cls = Config
    for key in dotted.split(".")[:-1]:
        hint = typing.get_type_hints(cls).get(key) if dataclasses.is_dataclass(cls) else None
        if not dataclasses.is_dataclass(hint):
            return None
        cls = hint
    return cls


def _type_name(t) -> str:
    return t.__name__ if isinstance(t, type) else str(t).replace("typing.", "")


def _explain(e: OmegaConfBaseException) -> str:
    """One line: the dotted key, what is wrong and the fix, from an OmegaConf merge error."""
    key = getattr(e, "full_key", None)
    first_line = str(getattr(e, "msg", None) or e).splitlines()[0]
    if not key:
        return first_line
    section = _section_type(key)
    name = key.split(".")[-1]
    if isinstance(e, ConfigKeyError) and section is not None:
        valid = [f.name for f in dataclasses.fields(section) if f.init]
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(_join(parent, c) for c in close)}? " if close else ""
        where = f"keys of {parent}" if parent else "top-level keys"
        return f"{key}: unknown key; {hint}valid {where}: {', '.join(valid)}"
    if isinstance(e, ValidationError) and section is not None:
        expected = typing.get_type_hints(section).get(name)
        if expected is not None:
            value = getattr(e, "value", None)
            if dataclasses.is_dataclass(expected):
                return f"{key}: is a section; set its keys instead, e.g. {key}.<key>=value ({first_line})"
            got = f"got {value!r}" if value is not None else first_line
            return f"{key}: expected {_type_name(expected)}, {got}"
    return f"{key}: {first_line}"
