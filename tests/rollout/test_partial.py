"""rollout.partial (over-provisioning): a worker with nothing left of its step starts the next
submitted step's groups at that step's version; they come back in their own step, once each,
stamped with their step's version; a worker that dies holding one loses nothing.

(Tokens are not compared with the in-process worker here: under load the engines' timed kernel
choices may differ between processes; test_coordinator.py compares them.)"""
import json
import os
import time
from pathlib import Path

import pytest

from rollout.types import RolloutConfig
from rollout.worker import RolloutWorker, cpu_state
from test_worker import FIXED, HC, MC, SAMPLED, make_model

ray = pytest.importorskip("ray")
from fleet import IDS, KEYS, ROWS, local_ray  # noqa: E402
from rollout.coordinator import Coordinator  # noqa: E402

pytestmark = pytest.mark.ray


def planned_worker(plan_dir: str):
    """A worker that misbehaves as plan_dir/plan.json says: a list of {"seed", "key", "kind"};
    the first call serving group `key` of the step with `seed` exits the process (kind exit) or
    holds the group until a group of the step with seed 8 has been served, then 5 s more (kind
    hold: the tail that lets the other worker start the next step, however loaded the machine).
    Each plan fires once (plan_dir/fired_<i>); each served step leaves plan_dir/served_<seed>."""

    class PlannedWorker(RolloutWorker):
        def serve(self, item):
            (Path(plan_dir) / f"served_{item.seed}").write_text("1")
            plan_file = Path(plan_dir) / "plan.json"
            for i, plan in enumerate(json.loads(plan_file.read_text()) if plan_file.is_file() else []):
                fired = Path(plan_dir) / f"fired_{i}"
                if (item.seed, item.key) == (plan["seed"], plan["key"]) and not fired.exists():
                    fired.write_text("1")
                    if plan["kind"] == "exit":
                        os._exit(1)
                    deadline = time.monotonic() + 120
                    while not (Path(plan_dir) / "served_8").exists() and time.monotonic() < deadline:
                        time.sleep(0.05)
                    time.sleep(5.0)
            return super().serve(item)

    return PlannedWorker


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    plan_dir = tmp_path_factory.mktemp("plans")
    model, heads = make_model(0)
    with local_ray():
        co = Coordinator(MC, cpu_state(model), HC, cpu_state(heads),
                         RolloutConfig(max_batch=4, num_workers=2, partial=True, max_restarts=3,
                                       worker_timeout_s=30.0, start_timeout_s=60.0),
                         worker_cls=planned_worker(str(plan_dir)))
        yield co, plan_dir
        co.close()


def arm(plan_dir: Path, plans: list[dict]) -> None:
    for f in [*plan_dir.glob("fired_*"), *plan_dir.glob("served_*")]:
        f.unlink()
    (plan_dir / "plan.json").write_text(json.dumps(plans))


def two_steps(co, model_seed: int):
    """Step A (seed 7, the current version) and, submitted right after a publish, step B (seed 8,
    the new version): the async loop's order. Returns (batch A, batch B, version A, step B)."""
    v = co.version
    first = co.generate_async(ROWS, IDS, SAMPLED, FIXED, seed=7)
    model, heads = make_model(model_seed)
    co.publish(v + 1, cpu_state(model), cpu_state(heads))
    second = co.generate_async(ROWS, IDS, SAMPLED, FIXED, seed=8)
    step_b = co._step
    return first.result(), second.result(), v, step_b


def assert_step(batch, version):
    assert [s.prompt_id for s in batch.sequences] == IDS  # every row once, in prompt order
    assert [s.prompt for s in batch.sequences] == ROWS
    assert {s.policy_version for s in batch.sequences} == {version}
    assert all(s.tokens for s in batch.sequences)


def test_an_idle_worker_starts_the_next_steps_groups_and_they_return_in_their_own_step(fleet):
    co, plan_dir = fleet
    arm(plan_dir, [{"seed": 7, "key": 10, "kind": "hold"}])  # step A's last group holds one worker
    a, b, v, step_b = two_steps(co, model_seed=1)
    assert_step(a, v)
    assert_step(b, v + 1)
    assert a.stats.sequences == b.stats.sequences == len(ROWS)  # every worker's engine stats, merged per step
    early = co.early_keys[step_b]
    # the other worker started step B's groups while group 10 of step A was held: at least one,
    # each once, and every one of them came back with step B (not A) at B's version
    assert early and len(set(early)) == len(early) and set(early) <= set(KEYS)
    assert b.report["rollout_early_groups"] == len(early)
    assert a.report["rollout_early_groups"] == 0 and step_b - 1 not in co.early_keys
    assert co.versions() == [{"policy": v + 1, "heads": v + 1}] * 2
    assert not co.upcoming and not co.early and not co.early_done  # nothing left on the books


def test_a_worker_that_dies_holding_a_next_step_group_loses_nothing(fleet):
    co, plan_dir = fleet
    before = len(co.events)
    arm(plan_dir, [{"seed": 7, "key": 10, "kind": "hold"}, {"seed": 8, "key": 0, "kind": "exit"}])
    a, b, v, step_b = two_steps(co, model_seed=2)
    assert (plan_dir / "fired_1").exists()
    assert_step(a, v)
    assert_step(b, v + 1)
    events = co.events[before:]
    assert [e["event"] for e in events] == ["failed", "restarted", "republished"], events
    # it failed during step A, holding step B's groups (0 and the one beside it), and came back
    # with B's version
    assert events[0]["step"] == step_b - 1 and f"of step {step_b} in flight" in events[0]["detail"]
    assert events[2]["detail"] == f"version {v + 1}"
    assert not co.upcoming and not co.early and not co.early_done


def test_partial_needs_the_pull_queue_and_async_steps():
    from experiments.config import ConfigError, load_config

    with pytest.raises(ValueError, match="partial: .*rollout.schedule=pull"):
        RolloutConfig(partial=True, schedule="fixed")
    with pytest.raises(ConfigError, match="rollout.partial: .*train.max_staleness>=1"):
        load_config("default", ["rollout.partial=true", "train.max_staleness=0"])
    with pytest.raises(ConfigError, match="rollout.partial: .*ray.enabled=true"):
        load_config("default", ["rollout.partial=true", "train.max_staleness=1", "ray.enabled=false"])
    assert load_config("default", ["rollout.partial=true", "train.max_staleness=1"]).rollout.partial
