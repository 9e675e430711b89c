import json
import os
from types import SimpleNamespace

import pytest
import torch

from experiments import pretrain
from experiments.pretrain import (PretrainConfig, ensure_tiny_policy, save_tiny_policy, sft_batch,
                                  tiny_policy_dir, train_tiny_policy)
from experiments.tasks import ArithmeticTask, TaskConfig
from experiments.tokenizer import TextTokenizer, build_char_tokenizer
from rollout.checkpoint import load_checkpoint

TINY = dict(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate=176, batch_size=32,
            warmup=10, lr=3e-3, eval_every=0, probe_size=32)
TASK = TaskConfig(digits=2, eval_size=16)


def test_sft_batch_masks_exactly_the_completion():
    tok = TextTokenizer(build_char_tokenizer(pretrain.ARITH_ALPHABET))
    ex = ArithmeticTask(TASK).train_prompts(3, seed=0)
    ids, mask = sft_batch(ex, tok, max_len=64)
    for i, e in enumerate(ex):
        p, c = len(e.prompt), len(e.target) + 1  # + EOS
        row = ids[i, :p + c].tolist()
        assert tok.decode(row) == e.prompt + e.target and row[-1] == tok.eos_id
        # mask[t] == 1 iff token t+1 is a completion token
        assert mask[i].tolist() == [0.0] * (p - 1) + [1.0] * c + [0.0] * (ids.shape[1] - p - c + 1)
    with pytest.raises(ValueError, match="^max_len:"):
        sft_batch(ex, tok, max_len=8)


def test_short_pretrain_lowers_loss_and_checkpoint_round_trips(tmp_path):
    pcfg = PretrainConfig(steps=100, target_accuracy=1.0, **TINY)
    model, tok, metrics = train_tiny_policy(pcfg, TASK, seed=0, progress=False)
    assert metrics["steps_run"] == 100
    assert metrics["final_loss"] < 0.5 * metrics["initial_loss"]
    for k in ("eval_accuracy", "eval_format_rate", "eval_reward", "probe_match"):
        assert 0.0 <= metrics[k] <= 1.0
    out = tmp_path / "tiny"
    save_tiny_policy(model, tok, str(out), metrics, pcfg, TASK, seed=0)
    assert json.loads((out / "pretrain_metrics.json").read_text())["steps_run"] == 100
    back = load_checkpoint(str(out), "cpu", torch.float32)
    ids, _ = sft_batch(ArithmeticTask(TASK).eval_prompts(), tok, max_len=64)
    with torch.no_grad():
        assert torch.equal(model.logits(model(ids)), back.logits(back(ids)))
    tok_back = TextTokenizer.from_dir(str(out))
    assert (tok_back.eos_id, tok_back.pad_id) == (back.config.eos_token_id, back.config.pad_token_id)


def test_early_stop_at_target_accuracy(monkeypatch):
    calls = []

    def fake_match(model, ids, mask):  # the probe "reaches" 0.6 at its third check
        calls.append(1)
        return 0.2 * len(calls)

    monkeypatch.setattr(pretrain, "teacher_forced_match", fake_match)
    pcfg = PretrainConfig(steps=50, target_accuracy=0.6, **{**TINY, "eval_every": 5})
    _, _, metrics = train_tiny_policy(pcfg, TASK, seed=0, progress=False)
    assert metrics["steps_run"] == 15


def test_ensure_tiny_policy_builds_once_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECROLL_CACHE", str(tmp_path))
    cfg = SimpleNamespace(pretrain=PretrainConfig(steps=3, target_accuracy=1.0, **TINY), task=TASK, seed=0)
    built = []
    real = pretrain.build_tiny_policy
    monkeypatch.setattr(pretrain, "build_tiny_policy", lambda *a, **k: built.append(1) or real(*a, **k))
    folder = ensure_tiny_policy(cfg)
    assert folder == tiny_policy_dir(cfg.pretrain, TASK, 0) and folder.startswith(str(tmp_path))
    assert built == [1] and os.path.isfile(os.path.join(folder, "model.safetensors"))
    mtime = os.path.getmtime(os.path.join(folder, "model.safetensors"))
    assert ensure_tiny_policy(cfg) == folder
    assert built == [1] and os.path.getmtime(os.path.join(folder, "model.safetensors")) == mtime
    # A different config is a different model, in a different folder.
    other = SimpleNamespace(pretrain=cfg.pretrain, task=TaskConfig(digits=3, eval_size=16), seed=0)
    assert tiny_policy_dir(other.pretrain, other.task, 0) != folder
    assert tiny_policy_dir(cfg.pretrain, TASK, 1) != folder


def test_tiny_policy_refuses_other_tasks(tmp_path):
    cfg = SimpleNamespace(pretrain=PretrainConfig(), task=TaskConfig(name="gsm8k", path="x.jsonl"), seed=0)
    with pytest.raises(ValueError, match="^task.name:"):
        ensure_tiny_policy(cfg)


@pytest.mark.parametrize("kw, field", [({"steps": 0}, "steps"), ({"target_accuracy": 0.0}, "target_accuracy"),
                                       ({"kv_heads": 3}, "kv_heads"), ({"lr": 0.0}, "lr")])
def test_pretrain_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        PretrainConfig(**kw)
