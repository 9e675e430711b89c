"""Run metrics (jsonl + TensorBoard, resume truncation), `specroll plot` and `specroll compare`."""
from __future__ import annotations

import json
import math

import pytest

from experiments import compare, plots
from experiments.metrics import MetricsLogger, load_runs, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_PANELS = ["reward.png", "accepted_len.png", "acceptance.png", "tokens_per_s.png", "time_split.png",
              "logprob_diff.png"]


def _record(step: int, rollout_s: float, refit: bool = False, depth: int = 3) -> dict:
    return {
        "step": step, "reward_mean": 0.1 * step, "reward_std": 0.05, "mean_accepted_len": 2.0 + 0.1 * step,
        "accept_rate_per_pos": [0.9 - 0.2 * d for d in range(depth)], "rollout_tokens_per_s": 100.0 + step,
        "time_rollout_s": rollout_s, "time_train_s": 0.5, "time_refit_s": 0.3 if refit else 0.0,
        "policy_version": step, "logprob_diff_max": 1e-6, "refit": refit, "spec_mode": "fixed",
    }


def _write_run(root, name, records, config: str | None = None):
    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        (run / "config.yaml").write_text(config)
    return run


@pytest.fixture
def two_runs(tmp_path):
    """spec: 8 steps, re-fits at steps 3 and 6, rollout 1 s/step; off: 8 steps, no spec, rollout 2.5 s/step."""
    spec = _write_run(tmp_path / "runs", "spec", [_record(s, 1.0, refit=s in (3, 6)) for s in range(1, 9)],
                      config="spec:\n  mode: fixed\n  k: 3\nrefit:\n  schedule: every\n  every: 3\n")
    off_records = [dict(_record(s, 2.5), mean_accepted_len=1.0, accept_rate_per_pos=[]) for s in range(1, 9)]
    off = _write_run(tmp_path / "runs", "off", off_records,
                     config="spec:\n  mode: \"off\"\nrefit:\n  schedule: never\n")
    return str(spec), str(off)


def _assert_png(path):
    from matplotlib.image import imread

    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    pixels = imread(path)
    height, width = pixels.shape[:2]
    assert 300 <= width <= 3000 and 200 <= height <= 3000
    assert pixels.std() > 0.01  # something is drawn, not a blank canvas


# ---- plots ----------------------------------------------------------------------------------------

def test_plot_one_run_writes_every_panel_as_png_in_run_plots(two_runs):
    spec, _ = two_runs
    paths = plots.plot_runs([spec])
    assert [p.replace("\\", "/").rsplit("/", 1)[1] for p in paths] == ALL_PANELS
    for path in paths:
        assert path.startswith(spec + "/plots/")
        _assert_png(path)


def test_plot_overlays_two_runs_into_out_dir(two_runs, tmp_path):
    out = tmp_path / "cmp"
    paths = plots.plot_runs(list(two_runs), str(out))
    assert sorted(p.name for p in out.iterdir()) == sorted(ALL_PANELS)
    assert len(paths) == len(ALL_PANELS)
    for path in paths:
        _assert_png(path)


def test_plot_skips_panels_of_absent_metrics_and_handles_one_step(tmp_path):
    record = _record(1, 1.0)
    for key in ("accept_rate_per_pos", "logprob_diff_max", "rollout_tokens_per_s"):
        del record[key]
    run = _write_run(tmp_path, "one-step", [record])
    paths = plots.plot_runs([str(run)], str(tmp_path / "out"))
    names = [p.rsplit("/", 1)[1] for p in paths]
    assert names == ["reward.png", "accepted_len.png", "time_split.png"]
    for path in paths:
        _assert_png(path)


def test_worker_panels_follow_each_worker_of_a_coordinator_run(tmp_path):
    records = [dict(_record(s, 1.0), rollout_worker_tokens_per_s=[100.0 * s, 50.0 * s],
                    rollout_worker_idle_frac=[0.1, 0.4 / s]) for s in (1, 2, 3)]
    run = _write_run(tmp_path, "two-workers", records)
    paths = plots.plot_runs([str(run)], str(tmp_path / "out"))
    assert [p.rsplit("/", 1)[1] for p in paths] == ALL_PANELS + ["workers.png"]
    _assert_png(paths[-1])
    loaded = load_runs([str(run)])[0]
    assert plots.worker_series(loaded, "rollout_worker_tokens_per_s") == {
        0: ([1, 2, 3], [100.0, 200.0, 300.0]), 1: ([1, 2, 3], [50.0, 100.0, 150.0])}
    assert plots.worker_series(loaded, "rollout_worker_idle_frac")[1] == ([1, 2, 3], [0.4, 0.2, 0.4 / 3])


def test_plot_missing_run_dir_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert plots.main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and err.count("\n") == 1


def test_plot_run_without_metrics_exits_2_naming_the_file(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert plots.main([str(tmp_path / "empty")]) == 2
    assert str(tmp_path / "empty" / "metrics.jsonl") in capsys.readouterr().err


# ---- metrics logger -------------------------------------------------------------------------------

def test_logger_jsonl_roundtrip_and_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = [_record(s, 1.0 + s, refit=s == 2) for s in range(3)]
    with MetricsLogger(tmp_path) as logger:
        for r in logged:
            logger.log(r["step"], {k: v for k, v in r.items() if k != "step"})
    assert read_metrics(tmp_path) == logged

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"reward_mean", "accept_rate_per_pos/0", "accept_rate_per_pos/2", "refit"} <= set(tags)
    assert "spec_mode" not in tags  # strings stay in the jsonl only
    rollout = {e.step: e.value for e in events.Scalars("time_rollout_s")}
    assert rollout == pytest.approx({0: 1.0, 1: 2.0, 2: 3.0})
    depth2 = events.Scalars("accept_rate_per_pos/1")
    assert depth2[-1].value == pytest.approx(0.7)
    assert [e.value for e in events.Scalars("refit")] == [0.0, 0.0, 1.0]


def test_logger_resume_drops_steps_after_checkpoint(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(6):
            logger.log(step, {"reward_mean": float(step)})
    # A crash mid-write leaves a half line too; resume must drop it along with steps > 3.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "rew')
    with MetricsLogger(tmp_path, resume_step=3) as logger:
        for step in range(4, 6):
            logger.log(step, {"reward_mean": 10.0 + step})
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]
    assert [r["reward_mean"] for r in records] == [0.0, 1.0, 2.0, 3.0, 14.0, 15.0]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".metrics")]  # no temp file left


def test_read_metrics_skips_truncated_last_line_and_reports_it(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "reward_mean": 1.0}\n{"step": 1, "rew')
    assert read_metrics(tmp_path) == [{"step": 0, "reward_mean": 1.0}]
    assert "truncated" in capsys.readouterr().err


# ---- compare --------------------------------------------------------------------------------------

def test_compare_numbers_and_json_rows(two_runs, tmp_path, capsys):
    spec, off = two_runs
    out = tmp_path / "rows.json"
    assert compare.main([off, spec, "--last", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == ["off", "spec"]
    by_name = {r["name"]: r for r in rows}
    # final reward = mean of reward_mean (0.1 * step) over the last 3 steps (6, 7, 8)
    assert by_name["spec"]["final_reward"] == pytest.approx(0.7)
    assert by_name["spec"]["best_reward"] == pytest.approx(0.8)
    assert by_name["spec"]["accepted_len_first"] == pytest.approx(2.2)  # steps 1..3
    assert by_name["spec"]["accepted_len_last"] == pytest.approx(2.7)  # steps 6..8
    # speedup vs the first run (off): 2.5 s / 1.0 s rollout per step
    assert by_name["spec"]["rollout_speedup"] == pytest.approx(2.5)
    assert by_name["off"]["rollout_speedup"] == pytest.approx(1.0)
    assert by_name["spec"]["total_refit_s"] == pytest.approx(0.6) and by_name["spec"]["refits"] == 2
    assert by_name["spec"]["spec_mode"] == "fixed k=3" and by_name["spec"]["refit_schedule"] == "every 3"
    assert by_name["off"]["spec_mode"] == "off" and by_name["off"]["refit_schedule"] == "never"
    table = capsys.readouterr().out
    spec_line = next(line for line in table.splitlines() if "spec" in line and "fixed k=3" in line)
    assert "0.700" in spec_line and "2.50x" in spec_line and "2.20 → 2.70" in spec_line


def test_compare_baseline_by_name_and_unknown_baseline(two_runs, tmp_path, capsys):
    spec, off = two_runs
    rows = compare.compare_rows([off, spec], last=5, baseline="spec")
    assert rows[0]["rollout_speedup"] == pytest.approx(0.4)
    assert compare.main([off, spec, "--baseline", "nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "off, spec" in err


def test_compare_missing_run_dir_names_it(two_runs, tmp_path, capsys):
    missing = tmp_path / "runs" / "gone"
    assert compare.main([two_runs[0], str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_compare_without_config_falls_back_to_metrics_spec_mode(tmp_path):
    run = _write_run(tmp_path, "bare", [_record(1, 1.0)])
    (row,) = compare.compare_rows([str(run)])
    assert row["spec_mode"] == "fixed" and row["refit_schedule"] == "?"
    assert math.isclose(row["rollout_speedup"], 1.0)


def test_compare_reads_config_yaml_written_by_save_config(tmp_path):
    from experiments.config import load_config, save_config

    run = _write_run(tmp_path, "base", [_record(1, 1.0)])
    save_config(load_config("baseline-off", ["refit.schedule=every", "refit.every=7"]), run / "config.yaml")
    (row,) = compare.compare_rows([str(run)])
    assert row["spec_mode"] == "off" and row["refit_schedule"] == "every 7"
