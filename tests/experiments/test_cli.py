"""The `specroll` command line, run in-process through main(argv)."""
import sys
import types

import pytest

from experiments import cli


def _run(argv, capsys):
    """(exit code, stdout, stderr) of main(argv), whether it returns or raises SystemExit."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_subcommand(capsys):
    code, out, _ = _run(["--help"], capsys)
    assert code == 0
    for name in ["train", "pretrain", "fit-heads", "bench", "plot", "compare", "sweep", "config"]:
        assert name in out
    assert set(cli.COMMANDS) == {"train", "pretrain", "fit-heads", "bench", "plot", "compare", "sweep", "config"}


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_subcommand_help_exits_zero_with_examples(command, capsys):
    code, out, _ = _run([command, "--help"], capsys)
    assert code == 0
    assert "examples:" in out and f"specroll {command}" in out


def test_config_prints_the_resolved_config(capsys):
    code, out, _ = _run(["config", "--config", "baseline-off", "train.steps=5"], capsys)
    assert code == 0 and "steps: 5" in out and "mode: 'off'" in out


def test_bad_config_exits_2_with_the_dotted_path_and_no_traceback(capsys):
    code, out, err = _run(["config", "sampling.top_p=2"], capsys)
    assert code == 2
    assert err.startswith("error: sampling.top_p:") and "Traceback" not in err + out
    code, _, err = _run(["train", "sampling.top_pp=0.9"], capsys)  # fails before train is imported
    assert code == 2 and "sampling.top_p" in err


def test_config_commands_dispatch_a_loaded_config(monkeypatch, capsys):
    seen = {}
    fake = types.ModuleType("experiments.fit_heads")
    fake.run = lambda cfg: seen.setdefault("cfg", cfg) and 0
    monkeypatch.setitem(sys.modules, "experiments.fit_heads", fake)
    code, _, _ = _run(["fit-heads", "--config", "ablation-no-refit", "refit.steps=7"], capsys)
    assert code == 0 and seen["cfg"].refit.steps == 7 and seen["cfg"].refit.schedule == "never"


def test_passthrough_commands_get_the_rest_of_the_argv(monkeypatch, capsys):
    seen = {}
    fake = types.ModuleType("experiments.compare")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "experiments.compare", fake)
    code, _, _ = _run(["compare", "runs/a", "runs/b", "--metric", "reward"], capsys)
    assert code == 0 and seen["argv"] == ["runs/a", "runs/b", "--metric", "reward"]


def test_missing_module_is_a_clear_message(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "plot", cli.Command("experiments.no_such_module", "main", "s", "d", "e"))
    code, out, err = _run(["plot", "runs/x"], capsys)
    assert code == cli.EXIT_MISSING
    assert "experiments.no_such_module" in err and "Traceback" not in err + out


@pytest.mark.parametrize("override, key", [
    ("sampling.stop_token_ids=[1,", "sampling.stop_token_ids"),
    ("sampling.temperature=nan", "sampling.temperature"),
    ("train.lr=inf", "train.lr"),
])
def test_malformed_and_non_finite_overrides_exit_2_naming_the_key(override, key, capsys):
    for command in ("config", "train"):
        code, out, err = _run([command, override], capsys)
        assert code == 2 and err.startswith(f"error: {key}: ") and "Traceback" not in err + out


def _fail_if_run(monkeypatch, module, func):
    fake = types.ModuleType(module)
    setattr(fake, func, lambda *a: pytest.fail("the command ran despite bad data"))
    monkeypatch.setitem(sys.modules, module, fake)


@pytest.mark.parametrize("content, problem", [
    ("", "no usable question/answer rows"),
    ('{"question": "q", "answer": "#### 1/2 cup"}\n', "line 1: 'answer': the final answer"),
    ('{"question": "q", "answer": "#### 7"}\n', "task.eval_size: 128 held-out prompts"),
])
def test_bad_data_exits_2_before_any_model_is_loaded(tmp_path, monkeypatch, capsys, content, problem):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    _fail_if_run(monkeypatch, "experiments.train", "run")
    for command in ("config", "train"):
        code, out, err = _run([command, "model.name=smollm2-135m", "task.name=gsm8k", f"task.path={path}"], capsys)
        assert code == 2 and err.startswith("error: ") and problem in err and "Traceback" not in err + out


def test_missing_data_file_exits_2_before_any_model_is_loaded(tmp_path, monkeypatch, capsys):
    _fail_if_run(monkeypatch, "experiments.train", "run")
    code, _, err = _run(["train", "model.name=smollm2-135m", "task.name=gsm8k",
                         f"task.path={tmp_path / 'nope.jsonl'}"], capsys)
    assert code == 2 and "nope.jsonl: no such file" in err


def test_a_request_longer_than_the_engine_allows_exits_2(monkeypatch, capsys):
    from rollout.types import LengthError

    fake = types.ModuleType("experiments.train")

    def train(cfg, overrides):
        raise LengthError("sampling.max_new_tokens: prompt length + max_new_tokens + draft depth = 5009 "
                          "exceeds the engine's max_len=512; lower sampling.max_new_tokens")

    fake.run = train
    monkeypatch.setitem(sys.modules, "experiments.train", fake)
    code, out, err = _run(["train", "sampling.max_new_tokens=5000"], capsys)
    assert code == 2 and err.startswith("error: sampling.max_new_tokens: ") and "Traceback" not in err + out
