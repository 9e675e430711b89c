"""Config loading: defaults <- preset <- overrides, and every user error names the dotted key."""
from pathlib import Path

import pytest

from experiments.config import (PRESET_DIR, Config, ConfigError, config_from_yaml, format_config,
                                list_presets, load_config, save_config)


def _error(overrides, preset="default") -> str:
    with pytest.raises(ConfigError) as info:
        load_config(preset, overrides)
    return str(info.value)


def test_defaults_are_the_dataclass_defaults():
    cfg = load_config("default", [])
    assert cfg == Config()  # default.yaml adds nothing a bare Config() lacks
    assert cfg.spec.mode == "entropy" and cfg.algo.name == "grpo" and cfg.refit.schedule == "on_drop"
    assert cfg.model.name == "tiny" and cfg.task.name == "arith"
    assert cfg.run_dir == "runs/default"
    assert load_config(None, []) == Config()


def test_preset_overrides_defaults_and_dotted_overrides_override_the_preset():
    cfg = load_config("smollm2-gsm8k", [])
    assert cfg.model.name == "smollm2-135m" and cfg.task.name == "gsm8k" and cfg.train.steps == 4
    cfg = load_config("smollm2-gsm8k", ["train.steps=3", "sampling.top_p=0.9", "train.betas=[0.8,0.99]"])
    assert cfg.train.steps == 3 and cfg.sampling.top_p == 0.9 and cfg.train.betas == [0.8, 0.99]
    assert cfg.model.name == "smollm2-135m"  # untouched preset values stay
    assert load_config("baseline-off", []).spec.mode == "off"
    assert load_config("ablation-no-refit", []).refit.schedule == "never"


def test_preset_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  steps: 7\n")
    assert load_config(str(path), []).train.steps == 7


def test_unknown_key_names_the_path_and_the_close_key():
    message = _error(["sampling.top_pp=0.9"])
    assert message.startswith("sampling.top_pp:") and "sampling.top_p" in message
    message = _error(["trian.steps=3"])
    assert message.startswith("trian:") and "train" in message


def test_unknown_key_in_a_preset_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("refit:\n  schedul: never\n")
    message = _error([], preset=str(path))
    assert str(path) in message and "refit.schedul" in message and "refit.schedule" in message


@pytest.mark.parametrize("override, key, hint", [
    ("train.steps=abc", "train.steps", "int"),
    ("ray.enabled=maybe", "ray.enabled", "bool"),
    ("sampling.temperature=hot", "sampling.temperature", "float"),
])
def test_wrong_type_names_the_key_and_the_type(override, key, hint):
    message = _error([override])
    assert message.startswith(f"{key}:") and hint in message


@pytest.mark.parametrize("overrides, prefix", [
    (["train.prompts_per_step=-4"], "train.prompts_per_step:"),
    (["train.micro_batch_size=0"], "train.micro_batch_size:"),
    (["sampling.top_p=1.5"], "sampling.top_p:"),
    (["spec.mode=sometimes"], "spec.mode:"),
    (["algo.group_size=1"], "algo.group_size:"),  # a GRPO group of one has no advantage
    (["refit.schedule=sometimes"], "refit.schedule:"),
    (["model.dtype=fp8"], "model.dtype:"),
    (["sampling=3"], "sampling:"),
    (["rollout.max_seq_len=16"], "rollout.max_seq_len:"),  # cannot hold max_new_tokens=64
    (["rollout.num_workers=2", "ray.enabled=false"], "rollout.num_workers:"),
    (["rollout.schedule=round_robin"], "rollout.schedule:"),
    (["rollout.placement_strategy=spread"], "rollout.placement_strategy:"),
    (["rollout.worker_timeout_s=-1"], "rollout.worker_timeout_s:"),
    (["train.max_staleness=-1"], "train.max_staleness:"),
    (["algo.tis_cap=-2"], "algo.tis_cap:"),
    (["refit.schedule=idle", "rollout.num_workers=1"], "refit.schedule:"),  # nobody idles alone
    (["rollout.num_workers=2", "rollout.max_batch_per_worker=[8]"], "rollout.max_batch_per_worker:"),
])
def test_impossible_values_name_the_dotted_path(overrides, prefix):
    assert _error(overrides).startswith(prefix)


def test_fixed_depth_deeper_than_the_heads_says_how_to_fix_it():
    message = _error(["spec.mode=fixed", "spec.k=6", "heads.num_depths=4"])
    assert message.startswith("spec.k:") and "spec.k <= 4" in message and "heads.num_depths" in message
    assert load_config("default", ["spec.mode=fixed", "spec.k=6", "heads.num_depths=6"]).spec.k == 6


def test_bad_override_syntax_and_unknown_preset():
    assert "key=value" in _error(["train.steps"])
    message = _error([], preset="defualt")
    assert "defualt" in message and "default" in message


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config("smollm2-gsm8k", ["train.steps=4", "seed=3", "sampling.stop_token_ids=[2,7]"])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert config_from_yaml(path) == cfg
    assert config_from_yaml(path.parent) == cfg  # a run directory works too
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left behind
    assert "steps: 4" in format_config(cfg)


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_preset_loads(name):
    assert isinstance(load_config(name, []), Config)


def test_presets_are_found():
    assert {"default", "smollm2-gsm8k", "ablation-no-refit", "baseline-off"} <= set(list_presets())
    assert PRESET_DIR == Path(__file__).resolve().parents[2] / "configs"


def test_tiny_policy_needs_the_arith_task():
    message = _error(["task.name=gsm8k", "task.path=x.jsonl"])
    assert message.startswith("task.name:") and "model.name" in message
    assert load_config("default", ["task.name=gsm8k", "task.path=x.jsonl", "model.name=smollm2-135m"])


def test_string_fields_take_yaml_keywords_as_text():
    # YAML 1.1 reads off/on/yes/no as booleans; a string field must keep the word
    from experiments.config import load_config
    cfg = load_config("default", ["spec.mode=off", "name=on", "refit.schedule=never"])
    assert cfg.spec.mode == "off" and cfg.name == "on" and cfg.refit.schedule == "never"


def _float_keys():
    """Every float setting of the root config (and list-of-float ones), found from the dataclasses."""
    import dataclasses
    import typing

    def walk(cls, path):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                yield from walk(hint, f"{path}{f.name}.")
            elif float in (hint, *typing.get_args(hint)):
                yield f"{path}{f.name}", isinstance(f.default_factory(), list) if f.default is dataclasses.MISSING else False

    return list(walk(Config, ""))


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_every_float_setting_must_be_finite(bad):
    keys = _float_keys()
    assert {"sampling.temperature", "train.lr", "refit.lr", "train.betas", "fit.temperature"} <= {k for k, _ in keys}
    for key, is_list in keys:
        value = f"[0.9,{bad}]" if is_list else bad
        message = _error([f"{key}={value}"])
        assert message.startswith(f"{key}: must be a finite number"), (key, message)


def test_a_non_finite_value_in_a_preset_file_is_refused(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("sampling:\n  temperature: .nan\n")
    assert _error([], preset=str(preset)).startswith("sampling.temperature: must be a finite number")


def test_a_preset_cannot_construct_python_objects(tmp_path):
    """YAML is read with a safe loader: a tag naming a Python callable is an error, never a call."""
    marker = tmp_path / "ran"
    preset = tmp_path / "p.yaml"
    preset.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    assert "not valid YAML" in _error([], preset=str(preset))
    assert not marker.exists()


def test_library_dataclasses_refuse_non_finite_values_too():
    import math

    from learner.config import RefitConfig, TrainConfig
    from rollout.types import SamplingParams

    for make in (lambda: SamplingParams(temperature=math.nan), lambda: TrainConfig(lr=math.inf),
                 lambda: TrainConfig(grad_clip=math.inf), lambda: TrainConfig(lr=1e6), lambda: TrainConfig(betas=[0.9, math.nan]),
                 lambda: RefitConfig(lr=math.inf)):
        with pytest.raises(ValueError, match="finite|in \\(0, 1\\)"):
            make()
