"""`specroll fit-heads` end to end on a tiny random policy saved in tmp_path: heads are written
where the config says, load back, `ensure_heads` reuses them, user errors say what to fix."""
import json
from pathlib import Path

import pytest

import experiments.fit_heads as fh
from experiments.config import ConfigError, load_config
from rollout.model import ModelConfig
from spec_heads.heads import DraftHeads


def small_config(policy, *overrides):
    return load_config("default", [f"model.name={policy}", "fit.num_sequences=24", "fit.steps=8",
                                   "fit.kl_warmup_steps=4", "fit.micro_batch_size=8", "fit.eval_every=4",
                                   "fit.holdout=0.25", "sampling.max_new_tokens=12", "heads.num_depths=3",
                                   "rollout.max_batch=24", *overrides])


@pytest.mark.parametrize("kind", ["parallel", "sequential"])
def test_fit_heads_writes_loadable_heads(policy_dir, tmp_path, capsys, kind):
    out = tmp_path / "heads"
    cfg = small_config(policy_dir, f"heads.kind={kind}", f"heads_path={out}")
    assert fh.run(cfg) == 0
    model_cfg = ModelConfig.from_hf(json.loads((Path(policy_dir) / "config.json").read_text()))
    heads, version = DraftHeads.load(str(out), model_cfg)
    assert (heads.kind, heads.num_depths, version) == (kind, 3, 0)
    meta = json.loads((out / "heads_config.json").read_text())["extra"]
    assert meta["num_fit_sequences"] == 18 and meta["num_eval_sequences"] == 6
    assert len(meta["acceptance_after"]) == 3 and all(0 <= a <= 1 for a in meta["acceptance_after"])
    assert meta["fit"]["temperature"] == cfg.sampling.temperature  # null follows sampling.temperature
    printed = capsys.readouterr()
    assert "acceptance" in printed.out + printed.err


def test_ensure_heads_fits_once_then_reuses(policy_dir, tmp_path, monkeypatch):
    import shutil

    model_dir = tmp_path / "policy"
    shutil.copytree(policy_dir, model_dir)
    cfg = small_config(str(model_dir))
    calls = []
    real = fh.fit_and_save
    monkeypatch.setattr(fh, "fit_and_save", lambda *a: calls.append(a) or real(*a))
    first = fh.ensure_heads(cfg, str(model_dir))
    assert first == fh.default_heads_dir(str(model_dir), cfg)
    assert Path(first).name.startswith("policy-heads-sequential-3-")
    assert Path(first).parent == tmp_path  # next to the policy
    stamp = (Path(first) / "heads.safetensors").stat().st_mtime_ns
    assert fh.ensure_heads(cfg, str(model_dir)) == first
    assert len(calls) == 1 and (Path(first) / "heads.safetensors").stat().st_mtime_ns == stamp
    # anything that shapes the fit names another folder, so stale heads are never reused
    assert fh.default_heads_dir(str(model_dir), small_config(str(model_dir), "sampling.temperature=0.5")) != first
    assert fh.default_heads_dir(str(model_dir), small_config(str(model_dir), f"fit.init={first}")) != first


def test_heads_folder_of_the_default_config_is_stable():
    """Users' fitted heads are found by this hash: a new config field that is left at its
    default must not change it (fit.init did once, which would have re-fitted every cached
    head). Change the expected value only with a deliberate _FIT_VERSION bump."""
    cfg = load_config("default", ["heads.num_depths=8"])
    assert fh.default_heads_dir("/m/tiny", cfg) == "/m/tiny-heads-sequential-8-8628b73ebb"


def test_user_errors_name_the_key_and_fix(policy_dir, tmp_path):
    with pytest.raises(ConfigError, match="^model.name: .*no such checkpoint folder"):
        fh.policy_dir(small_config(str(tmp_path / "missing")))
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    with pytest.raises(ConfigError, match="^heads_path: .*is a file"):
        fh.ensure_heads(small_config(policy_dir, f"heads_path={not_a_folder}"), policy_dir)
    with pytest.raises(ConfigError, match="^heads_path: .*holds no draft heads"):
        fh.ensure_heads(small_config(policy_dir, f"heads_path={policy_dir}"), policy_dir)
    with pytest.raises(ConfigError, match="^model.name: .*config.json"):
        fh.policy_dir(small_config(str(tmp_path)))


def test_ensure_heads_refuses_heads_of_another_shape(policy_dir, tmp_path):
    out = tmp_path / "heads"
    fh.run(small_config(policy_dir, f"heads_path={out}", "fit.steps=1", "fit.kl_warmup_steps=0"))
    with pytest.raises(ConfigError, match="^heads_path: .*holds sequential heads with 3 depths but heads.kind=parallel"):
        fh.ensure_heads(small_config(policy_dir, f"heads_path={out}", "heads.kind=parallel"), policy_dir)


def test_fit_heads_with_a_draft_vocabulary_picks_it_from_the_samples(policy_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "heads"
    cfg = small_config(policy_dir, "heads.kind=sequential", "heads.draft_vocab=8", f"heads_path={out}")
    assert fh.run(cfg) == 0
    model_cfg = ModelConfig.from_hf(json.loads((Path(policy_dir) / "config.json").read_text()))
    heads, _ = DraftHeads.load(str(out), model_cfg)
    vocab = heads.draft_tokens.tolist()
    assert heads.config.draft_vocab == 8 and len(set(vocab)) == 8 and vocab == sorted(vocab)
    meta = json.loads((out / "heads_config.json").read_text())["extra"]
    assert 0 < meta["draft_vocab_coverage"] <= 1
    # the recorded acceptance is that of the restricted drafts, the one the engine will see
    assert heads.measured_acceptance() == pytest.approx(meta["acceptance_after"], abs=1e-6)
    assert "draft vocabulary" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="draft_vocab"):
        small_config(policy_dir, "heads.draft_vocab=-3")
    sampled = []
    monkeypatch.setattr(fh, "_sample", lambda *a: sampled.append(a) or ([], []))
    with pytest.raises(ConfigError, match="heads.draft_vocab: 5000 is not below the policy's vocabulary"):
        fh.run(small_config(policy_dir, "heads.draft_vocab=5000", f"heads_path={tmp_path / 'h2'}"))
    assert sampled == []  # refused before sampling


def test_fit_continues_from_saved_heads(policy_dir, tmp_path):
    """fit.init starts from saved heads: on the same samples (same seed) the continued fit's
    starting acceptance is exactly where the first fit ended, its draft vocabulary is kept, and
    heads of another shape are refused with the keys to change."""
    first, second = tmp_path / "first", tmp_path / "second"
    fh.run(small_config(policy_dir, "heads.draft_vocab=8", f"heads_path={first}"))
    fh.run(small_config(policy_dir, "heads.draft_vocab=8", f"heads_path={second}", f"fit.init={first}",
                        "fit.kl_warmup_steps=0"))
    meta = lambda d: json.loads((d / "heads_config.json").read_text())
    assert meta(second)["extra"]["acceptance_before"] == pytest.approx(meta(first)["extra"]["acceptance_after"])
    model_cfg = ModelConfig.from_hf(json.loads((Path(policy_dir) / "config.json").read_text()))
    a, b = (DraftHeads.load(str(d), model_cfg)[0] for d in (first, second))
    assert a.draft_tokens.tolist() == b.draft_tokens.tolist()
    assert any((pa - pb).abs().max() > 0 for pa, pb in zip(a.parameters(), b.parameters()))  # it trained on
    with pytest.raises(ConfigError, match=r"^fit.init: .*heads.num_depths=3 \(config: 2\)"):
        fh.run(small_config(policy_dir, "heads.draft_vocab=8", "heads.num_depths=2", f"fit.init={first}",
                            f"heads_path={tmp_path / 'third'}"))
    with pytest.raises(ConfigError, match="^fit.init: .*holds no"):
        fh.run(small_config(policy_dir, f"fit.init={tmp_path / 'nothing'}", f"heads_path={tmp_path / 'fourth'}"))
