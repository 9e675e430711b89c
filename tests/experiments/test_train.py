"""`specroll train` end to end on a tiny random policy: the run directory holds the config, every
required metric per step, TensorBoard events, checkpoints and plots; a crashed run resumed from
its checkpoint reproduces the uninterrupted run's metrics; Ray and in-process runs agree."""
import json
from pathlib import Path

import pytest

import experiments.train as train
from experiments.config import ConfigError, load_config
from experiments.metrics import read_metrics
from learner.loop import RLLoop

REQUIRED = ("step", "reward_mean", "reward_std", "accuracy", "response_len_mean", "mean_accepted_len",
            "accept_rate_per_pos", "rollout_tokens_per_s", "time_rollout_s", "time_train_s", "time_refit_s",
            "policy_version", "logprob_diff_max", "loss", "grad_norm", "kl", "clipfrac", "entropy_mean",
            "refit", "spec_mode", "depth_hist", "speedup_vs_off_est")
TIMING = ("time_", "rollout_", "speedup_vs_off_est")  # rollout_*: timings and per-worker lists


def small_config(policy, out_dir, name, *overrides):
    return load_config("default", [
        f"model.name={policy}", f"out_dir={out_dir}", f"name={name}", "task.digits=2", "task.eval_size=8",
        "fit.num_sequences=16", "fit.steps=4", "fit.kl_warmup_steps=2", "fit.micro_batch_size=8",
        "fit.eval_every=0", "heads.num_depths=2", "spec.mode=fixed", "spec.k=2", "sampling.max_new_tokens=24",
        "rollout.max_batch=8", "train.steps=3", "train.prompts_per_step=2", "algo.group_size=2",
        "train.micro_batch_size=2", "train.checkpoint_every=1", "refit.schedule=every", "refit.every=2",
        "refit.steps=2", "refit.micro_batch_size=4", "ray.enabled=false", *overrides])


def comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in records]


def assert_same_run(a, b):
    """Same keys and values, step for step; floats up to their last bits (Ray actors run other
    batch shapes and threads than the driver, and than another run's actors)."""
    a, b = comparable(a), comparable(b)
    assert [r.keys() for r in a] == [r.keys() for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-5), k
            else:
                assert ra[k] == rb[k], k


def test_train_writes_config_metrics_events_checkpoints_and_plots(policy_dir, tmp_path):
    cfg = small_config(policy_dir, tmp_path, "run")
    summary = train.run(cfg)
    run_dir = Path(cfg.run_dir)
    saved = load_config(str(run_dir / "config.yaml"), [])
    assert saved == cfg
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        assert len(r["accept_rate_per_pos"]) == 2 and r["spec_mode"] == "fixed"
        assert r["logprob_diff_max"] <= 1e-4
    assert [r["policy_version"] for r in records] == [1, 2, 3]
    assert [r["refit"] for r in records] == [False, True, False]
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    ck = run_dir / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_3"
    assert (ck / "step_3" / "policy" / "config.json").is_file()
    assert (ck / "step_3" / "policy" / "tokenizer.json").is_file()
    assert (ck / "step_3" / "heads" / "heads.safetensors").is_file()
    assert json.loads((ck / "step_3" / "state.json").read_text())["policy_version"] == 3
    assert summary["plots"] and all(Path(p).is_file() for p in summary["plots"])
    with pytest.raises(ConfigError, match=f"resume={run_dir}"):  # never overwrite a run
        train.run(small_config(policy_dir, tmp_path, "run"))


PARTIAL = ("ray.enabled=true", "ray.num_cpus=2", "rollout.num_workers=2", "rollout.partial=true")


@pytest.mark.parametrize("staleness,extra", [(0, ()), (1, ()), pytest.param(1, PARTIAL, marks=pytest.mark.ray)],
                         ids=["sync", "async", "async-partial"])
def test_crash_then_resume_reproduces_the_uninterrupted_run(policy_dir, tmp_path, monkeypatch, staleness, extra):
    """Async too: the checkpoint carries the rollouts already submitted for the next steps (with
    rollout.partial, the groups idle workers started early are part of them)."""
    straight = small_config(policy_dir, tmp_path, "straight", f"train.max_staleness={staleness}", *extra)
    train.run(straight)
    assert [r["staleness_max"] for r in read_metrics(straight.run_dir)] == [0] + [staleness] * 2

    real_step = RLLoop.step

    def crash_at_3(self, step):
        if step == 3:
            raise RuntimeError("simulated crash")
        return real_step(self, step)

    crashed = small_config(policy_dir, tmp_path, "crashed", f"train.max_staleness={staleness}", *extra)
    monkeypatch.setattr(RLLoop, "step", crash_at_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.run(crashed)
    monkeypatch.setattr(RLLoop, "step", real_step)
    assert [r["step"] for r in read_metrics(crashed.run_dir)] == [1, 2]
    assert (Path(crashed.run_dir) / "checkpoints" / "step_2" / "async_rollouts.pt").is_file() == bool(staleness)

    # the saved config is the base; the command line only names the run to resume
    train.run(load_config("default", [f"resume={crashed.run_dir}"]))
    if extra:  # Ray workers: the same tokens, floats up to their last bits
        assert_same_run(read_metrics(crashed.run_dir), read_metrics(straight.run_dir))
    else:
        assert comparable(read_metrics(crashed.run_dir)) == comparable(read_metrics(straight.run_dir))


def test_resume_applies_command_line_overrides(policy_dir, tmp_path):
    cfg = small_config(policy_dir, tmp_path, "short", "train.steps=1")
    train.run(cfg)
    train.run(load_config("default", [f"resume={cfg.run_dir}", "train.steps=2"]))
    assert [r["step"] for r in read_metrics(cfg.run_dir)] == [1, 2]
    assert load_config(str(Path(cfg.run_dir) / "config.yaml"), []).train.steps == 2


@pytest.mark.ray
@pytest.mark.parametrize("partial", [False, True])
def test_train_with_ray_workers_matches_in_process(policy_dir, tmp_path, partial):
    """Two coordinator workers with async rollouts (the next step generated while the learner
    trains; with rollout.partial, started by idle workers in the step before's tail) give the
    in-process run's tokens, step for step, and the same staleness: nothing lost, nothing twice."""
    local = small_config(policy_dir, tmp_path, "local", "train.steps=3", "train.max_staleness=1")
    remote = small_config(policy_dir, tmp_path, "remote", "train.steps=3", "ray.enabled=true",
                          "ray.num_cpus=2", "rollout.num_workers=2", "train.max_staleness=1",
                          f"rollout.partial={str(partial).lower()}")
    train.run(local)
    train.run(remote)
    assert_same_run(read_metrics(remote.run_dir), read_metrics(local.run_dir))  # same tokens, nothing lost or twice
    assert [r["staleness_max"] for r in read_metrics(remote.run_dir)] == [0, 1, 1]
    assert (Path(remote.run_dir) / "checkpoints" / "step_3" / "state.json").is_file()


def test_a_run_killed_before_its_first_checkpoint_restarts_from_step_0(policy_dir, tmp_path, monkeypatch, capsys):
    real_step = RLLoop.step

    def crash_at_2(self, step):
        if step == 2:
            raise KeyboardInterrupt  # killed by the user between step 1 and the first checkpoint
        return real_step(self, step)

    cfg = small_config(policy_dir, tmp_path, "early", "train.checkpoint_every=2")
    monkeypatch.setattr(RLLoop, "step", crash_at_2)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg)
    monkeypatch.setattr(RLLoop, "step", real_step)
    run_dir = Path(cfg.run_dir)
    assert [r["step"] for r in read_metrics(run_dir)] == [1] and not (run_dir / "checkpoints" / "latest").exists()
    capsys.readouterr()
    train.run(load_config("default", [f"resume={run_dir}"]))
    out = capsys.readouterr().out
    assert f"resuming {run_dir}: it stopped before its first checkpoint, so it restarts from step 0" in out
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert [r["policy_version"] for r in read_metrics(run_dir)] == [1, 2, 3]
