import pytest

from experiments.config import ConfigError
from experiments.sweep import expand, main, parse_grid, trial_name


def test_grid_expands_to_the_product_in_order():
    grid = parse_grid(["spec.mode=off,entropy", "refit.schedule=never,on_drop,every"])
    points = expand(grid)
    assert len(points) == 6
    assert points[0] == {"spec.mode": "off", "refit.schedule": "never"}
    assert points[-1] == {"spec.mode": "entropy", "refit.schedule": "every"}
    assert trial_name(points[1]) == "mode=off_schedule=on_drop"


@pytest.mark.parametrize("bad", ["spec.mode", "=a,b", "spec.mode=", "spec.mode=,"])
def test_bad_grid_items_name_themselves(bad):
    with pytest.raises(ConfigError, match="--grid"):
        parse_grid([bad])


def test_duplicate_key_is_refused():
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["a.b=1", "a.b=2"])


def test_bad_value_fails_before_any_trial(capsys):
    assert main(["--grid", "spec.mode=off,sometimes", "train.steps=1"]) == 2
    err = capsys.readouterr().err
    assert "spec.mode" in err and "sometimes" in err


def test_grid_values_may_hold_commas_inside_brackets_and_quotes():
    grid = parse_grid(["train.betas=[0.9,0.99],[0.8,0.9]", "sampling.stop_token_ids=[1,2],[]", "name='a,b',c"])
    assert grid == {"train.betas": ["[0.9,0.99]", "[0.8,0.9]"], "sampling.stop_token_ids": ["[1,2]", "[]"],
                    "name": ["'a,b'", "c"]}
    with pytest.raises(ConfigError, match="not closed"):
        parse_grid(["train.betas=[0.9,0.99"])


def test_bracketed_grid_values_reach_the_trial_configs(capsys, tmp_path):
    """Every grid point is loaded before any trial starts: a bracketed list is one value."""
    from experiments.config import load_config

    points = expand(parse_grid(["train.betas=[0.9,0.99],[0.8,0.9]"]))
    assert [load_config("default", [f"{k}={v}" for k, v in p.items()]).train.betas for p in points] == \
        [[0.9, 0.99], [0.8, 0.9]]


def test_a_rerun_under_an_existing_sweep_name_is_refused_before_any_trial(tmp_path, capsys, monkeypatch):
    import experiments.sweep as sweep

    (tmp_path / "s" / "mode=off").mkdir(parents=True)
    (tmp_path / "s" / "mode=off" / "metrics.jsonl").write_text("{}\n")
    monkeypatch.setattr(sweep, "_trainable", lambda params: pytest.fail("a trial started"))
    assert main(["--name", "s", "--grid", "spec.mode=off,fixed", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --name s:") and "already holds a sweep (mode=off)" in err and "another --name" in err


def _fake_run(run_dir, rewards):
    import json

    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("spec:\n  mode: fixed\nrefit:\n  schedule: never\n")
    with (run_dir / "metrics.jsonl").open("w") as f:
        for step, reward in enumerate(rewards, start=1):
            f.write(json.dumps({"step": step, "reward_mean": reward, "time_rollout_s": 1.0}) + "\n")


def test_a_failed_trial_shows_as_failed_and_its_error_line_names_it(tmp_path, capsys):
    from experiments.sweep import report

    _fake_run(tmp_path / "lr=1e-4", [0.1, 0.2, 0.3])
    _fake_run(tmp_path / "lr=0.5", [0.1, 0.0])  # stopped after two steps
    code = report(tmp_path, ["lr=1e-4", "lr=0.5", "lr=0.9"],
                  {"lr=0.5": "TrialFailed: specroll train exited with code 1", "lr=0.9": "ValueError: boom"})
    out, err = capsys.readouterr()
    assert code == 1
    assert "lr=0.5 (FAILED)" in out and "lr=1e-4 (FAILED)" not in out and "lr=1e-4" in out
    assert "error: trial lr=0.5: TrialFailed: specroll train exited with code 1" in err
    assert "error: trial lr=0.9: ValueError: boom" in err and "lr=0.9 (FAILED): no step finished" in err
    assert report(tmp_path, ["lr=1e-4"], {}) == 0


def test_error_lines_and_trial_names():
    from experiments.sweep import error_line, trial_of

    class Wrapped(Exception):
        cause = ValueError("sampling.top_p: must be in (0, 1]\nmore")

    assert error_line(Wrapped("ray::ImplicitFunc ...\nTraceback ...")) == "ValueError: sampling.top_p: must be in (0, 1]"
    assert error_line(RuntimeError("Traceback (most recent call last):\n  File x\nRuntimeError: last words\n")) == \
        "RuntimeError: last words"
    assert trial_of(["train.steps=2", "name=a", "out_dir=/x", "name=mode=off"]) == "mode=off"


def test_a_bad_data_file_fails_the_sweep_before_any_trial(tmp_path, capsys, monkeypatch):
    import experiments.sweep as sweep

    (tmp_path / "d.jsonl").write_text('{"question": "q", "answer": "#### 1 2"}\n')
    monkeypatch.setattr(sweep, "_trainable", lambda params: pytest.fail("a trial started"))
    assert main(["--grid", "algo.clip_high=0.2,0.28", "model.name=smollm2-135m", "task.name=gsm8k",
                 f"task.path={tmp_path / 'd.jsonl'}", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "line 1" in err and "not one number" in err


def test_trial_resources_follow_each_trials_config():
    import argparse

    from experiments.sweep import trial_resources

    args = argparse.Namespace(cpus_per_trial=1.0, gpus_per_trial=0.0)
    assert trial_resources({"preset": "default", "overrides": ["ray.enabled=false"]}, args) == {"cpu": 1.0, "gpu": 0.0}
    pgf = trial_resources({"preset": "default", "overrides": ["rollout.num_workers=3", "rollout.num_cpus=2",
                                                              "rollout.device=cpu"]}, args)
    assert pgf.bundles == [{"CPU": 1.0}, {"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 2.0}]  # the learner, then each worker
    gpu = trial_resources({"preset": "default", "overrides": ["rollout.num_workers=2", "rollout.num_gpus=0.5"]}, args)
    assert gpu.bundles[1:] == [{"CPU": 1.0, "GPU": 0.5}] * 2


def test_sweep_plot_draws_every_trial_on_one_figure(tmp_path):
    import json

    from experiments.plots import plot_sweep

    dirs = []
    for name, slope in (("a", 0.1), ("b", 0.2)):
        run = tmp_path / name
        run.mkdir()
        lines = [{"step": s, "reward_mean": slope * s, "mean_accepted_len": 1.0 + slope * s} for s in (1, 2, 3)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        dirs.append(str(run))
    path = plot_sweep(dirs, str(tmp_path / "curves.png"))
    assert path.endswith("curves.png") and (tmp_path / "curves.png").stat().st_size > 10_000
