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
