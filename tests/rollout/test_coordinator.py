"""The coordinator: the pull queue and the fixed split give the in-process worker's tokens for the
same seed; a publish reaches every worker (policy and heads under one version); a worker that
exits, hangs or is killed mid-rollout loses no group and returns none twice; asking for more
than the cluster has fails at start and says what is missing."""
import dataclasses
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from rollout.types import RolloutConfig
from rollout.worker import RolloutClient, RolloutWorker, cpu_state
from test_worker import FIXED, HC, MC, SAMPLED, make_model

ray = pytest.importorskip("ray")
from fleet import IDS, KEYS, ROWS, local_ray  # noqa: E402
from rollout.coordinator import Coordinator, ResourceError  # noqa: E402

pytestmark = pytest.mark.ray

ALL_KEYS = set(KEYS)


def faulty_worker(plan_dir: str):
    """A worker class that misbehaves once per plan: plan_dir/plan.json = {"key", "kind"}; the
    first call that serves group `key` writes plan_dir/fired (its actor id) and then exits the
    process (kind exit), holds the group until plan_dir/idle exists (kind slow: the other worker
    ran out of work) or sleeps (kind hang / wait, until
the coordinator or the test kills it). Defined in a function,
    so Ray ships the class by value."""

    class FaultyWorker(RolloutWorker):
        def serve(self, item):
            plan_file, fired = Path(plan_dir) / "plan.json", Path(plan_dir) / "fired"
            if plan_file.is_file():
                plan = json.loads(plan_file.read_text())
                if item.key == plan["key"] and not fired.exists():
                    fired.write_text(ray.get_runtime_context().get_actor_id())
                    if plan["kind"] == "exit":
                        os._exit(1)
                    if plan["kind"] == "slow":  # until the other worker went idle (or 20 s)
                        deadline = time.monotonic() + 20
                        while not (Path(plan_dir) / "idle").exists() and time.monotonic() < deadline:
                            time.sleep(0.05)
                    else:
                        time.sleep(600)
            return super().serve(item)

    return FaultyWorker


@pytest.fixture(scope="module")
def cluster():
    with local_ray():
        yield


@pytest.fixture(scope="module")
def weights():
    model, heads = make_model(0)
    return cpu_state(model), cpu_state(heads)


@pytest.fixture(scope="module")
def reference(weights):
    local = RolloutClient(MC, weights[0], HC, weights[1], RolloutConfig(max_batch=4))
    return {s.prompt_id: s.tokens for s in local.generate(ROWS, IDS, SAMPLED, FIXED, seed=7).sequences}


@pytest.fixture(scope="module")
def faulty(cluster, weights, tmp_path_factory):
    plan_dir = tmp_path_factory.mktemp("faults")
    co = Coordinator(MC, weights[0], HC, weights[1],
                     RolloutConfig(max_batch=4, num_workers=2, max_restarts=3, worker_timeout_s=3.0,
                                   start_timeout_s=60.0),
                     worker_cls=faulty_worker(str(plan_dir)))
    yield co, plan_dir
    co.close()


def arm(plan_dir: Path, key: int, kind: str) -> None:
    (plan_dir / "fired").unlink(missing_ok=True)
    (plan_dir / "plan.json").write_text(json.dumps({"key": key, "kind": kind}))


def assert_complete(batch, reference, version):
    ids = [s.prompt_id for s in batch.sequences]
    assert ids == IDS  # every row once, in prompt order: none lost, none twice
    assert {s.prompt_id: s.tokens for s in batch.sequences} == reference
    assert {s.policy_version for s in batch.sequences} == {version}


@pytest.mark.parametrize("schedule", ["pull", "fixed"])
def test_schedules_match_the_in_process_worker_and_report_per_worker(faulty, weights, reference, schedule):
    co, _ = faulty
    co.rollout = dataclasses.replace(co.rollout, schedule=schedule)
    try:
        batch = co.generate(ROWS, IDS, SAMPLED, FIXED, seed=7)
        assert_complete(batch, reference, co.version)
        rep = co.report()
        assert len(rep["rollout_worker_tokens_per_s"]) == 2 and all(t > 0 for t in rep["rollout_worker_tokens_per_s"])
        assert all(0.0 <= f <= 1.0 for f in rep["rollout_worker_idle_frac"])
        assert rep["rollout_tail_s"] >= 0 and rep["rollout_faults"] == 0 and rep["rollout_workers_alive"] == 2
        # acceptance counters merge over both workers: they equal the rows' own records
        assert batch.stats.row_steps == sum(len(s.draft_lengths) for s in batch.sequences)
        assert batch.stats.sequences == len(ROWS)
        assert batch.stats.tokens == sum(len(s.tokens) for s in batch.sequences)
        assert sum(batch.stats.accepted_per_pos) == sum(sum(s.accepted) for s in batch.sequences)

        new, new_heads = make_model(1)
        v = co.version
        co.publish(v + 1, cpu_state(new), cpu_state(new_heads))
        assert co.versions() == [{"policy": v + 1, "heads": v + 1}] * 2
        after = co.generate_async(ROWS, IDS, SAMPLED, FIXED, seed=7).result()
        assert {s.policy_version for s in after.sequences} == {v + 1}
        local = RolloutClient(MC, cpu_state(new), HC, cpu_state(new_heads), RolloutConfig(max_batch=4))
        assert [s.tokens for s in after.sequences] == \
            [s.tokens for s in local.generate(ROWS, IDS, SAMPLED, FIXED, seed=7).sequences]
        with pytest.raises(ValueError, match="policy-only"):
            co.publish(v + 2, cpu_state(new), None)
    finally:
        co.publish(co.version + 1, *weights)  # back to the weights the reference was made with
        co.rollout = dataclasses.replace(co.rollout, schedule="pull")


def test_more_than_the_cluster_has_fails_at_start_naming_what_is_missing(cluster, weights):
    with pytest.raises(ResourceError, match=r"missing \{'CPU': 4\.0\}.*rollout.num_workers"):
        Coordinator(MC, weights[0], HC, weights[1], RolloutConfig(num_workers=8, num_cpus=1.0))
    with pytest.raises(ResourceError, match=r"missing \{'GPU': 1\.0\}"):
        Coordinator(MC, weights[0], HC, weights[1], RolloutConfig(num_workers=1, num_gpus=1.0))
    t0 = time.perf_counter()
    with pytest.raises(ResourceError, match="STRICT_SPREAD.*the nodes have"):  # one node, two bundles
        Coordinator(MC, weights[0], HC, weights[1], RolloutConfig(num_workers=2, placement_strategy="STRICT_SPREAD",
                                                                  start_timeout_s=1.0))
    assert time.perf_counter() - t0 < 10  # never waits silently


def test_a_fleet_without_heads_publishes_policy_only_updates(cluster, weights):
    """spec.mode=off runs workers without heads: a publish carries no heads and must not be
    mistaken for a policy-only update of a fleet that drafts."""
    from rollout.types import SpecParams

    co = Coordinator(MC, weights[0], None, None, RolloutConfig(max_batch=4, num_workers=1, start_timeout_s=60.0))
    try:
        co.publish(1, weights[0], None)
        batch = co.generate(ROWS[:2], IDS[:2], SAMPLED, SpecParams(mode="off"), seed=7)
        assert {s.policy_version for s in batch.sequences} == {1}
        assert [v["policy"] for v in co.versions()] == [1]
    finally:
        co.close()
    with_heads = Coordinator(MC, weights[0], HC, weights[1], RolloutConfig(max_batch=4, num_workers=1, start_timeout_s=60.0))
    try:
        with pytest.raises(ValueError, match="heads_state"):
            with_heads.publish(1, weights[0], None)
    finally:
        with_heads.close()


def test_a_worker_that_exits_mid_rollout_is_restarted_and_republished(faulty, reference, weights):
    co, plan_dir = faulty
    co.publish(co.version + 1, *weights)  # same weights, new version: the restarted worker must get it again
    v = co.version
    arm(plan_dir, key=4, kind="exit")
    batch = co.generate(ROWS, IDS, SAMPLED, FIXED, seed=7)
    assert (plan_dir / "fired").exists()
    assert_complete(batch, reference, v)
    assert [e["event"] for e in co.events] == ["failed", "restarted", "republished"], co.events
    assert co.report()["rollout_faults"] == 3 and co.report()["rollout_workers_alive"] == 2
    assert co.versions() == [{"policy": v, "heads": v}] * 2


def test_a_hung_worker_is_killed_after_the_timeout_and_its_groups_requeued(faulty, reference):
    co, plan_dir = faulty
    before = len(co.events)
    arm(plan_dir, key=6, kind="hang")
    batch = co.generate(ROWS, IDS, SAMPLED, FIXED, seed=7)
    assert_complete(batch, reference, co.version)
    assert [e["event"] for e in co.events[before:before + 3]] == ["hung", "failed", "restarted"], co.events


def test_an_idle_worker_refits_the_heads_in_the_tail_and_they_go_out_with_the_next_version(faulty, reference,
                                                                                           weights):
    """Group 10 is slow on its worker: the other one runs out of work first and fits a copy of
    its heads on the rows finished so far; the learner side publishes them with the next version."""
    from learner.config import RefitConfig
    from learner.trainer import idle_refit

    co, plan_dir = faulty
    refit = RefitConfig(steps=3, micro_batch_size=4)
    got = {}

    def idle_work(sequences, seed):
        got["rows"] = sorted(s.prompt_id for s in sequences)
        (plan_dir / "idle").write_text("1")  # the slow group may go on
        return idle_refit, (sequences, refit, 1.0, seed)

    co.set_idle_work(idle_work)
    (plan_dir / "idle").unlink(missing_ok=True)
    timeout = co.rollout.worker_timeout_s  # the slow group waits on the other worker, however loaded the machine
    co.rollout = dataclasses.replace(co.rollout, worker_timeout_s=60.0)
    try:
        arm(plan_dir, key=10, kind="slow")
        batch = co.generate(ROWS, IDS, SAMPLED, FIXED, seed=7)
        assert_complete(batch, reference, co.version)
        assert 2 <= len(got["rows"]) < len(ROWS) and not {10, 11} & set(got["rows"])  # the tail was not done
        result = co.idle_result(batch.report["idle_work"])
    finally:
        co.set_idle_work(None)
        co.rollout = dataclasses.replace(co.rollout, worker_timeout_s=timeout)
    assert result["refit_where"] == "idle" and len(result["refit_accept_after"]) == HC.num_depths
    fitted = result["state"]
    _, heads = make_model(0)
    assert fitted.keys() == heads.state_dict().keys()
    # the weights change iff the fit was kept; the acceptance buffer records the measurement either way
    weights_changed = any(not torch.equal(fitted[k], v) for k, v in heads.state_dict().items() if k != "acceptance")
    assert weights_changed == result["refit_kept"]
    policy = make_model(0)[0]
    v = co.version + 1
    co.publish(v, cpu_state(policy), fitted)
    assert co.versions() == [{"policy": v, "heads": v}] * 2
    after = co.generate(ROWS, IDS, SAMPLED, FIXED, seed=7)
    assert {s.policy_version for s in after.sequences} == {v}
    co.publish(v + 1, *weights)  # the reference's heads again: drafts decide which draws a row uses


def test_a_worker_killed_for_good_is_dropped_and_the_step_completes(faulty, reference):
    co, plan_dir = faulty
    before = len(co.events)
    arm(plan_dir, key=0, kind="wait")

    def kill_when_fired():
        fired = plan_dir / "fired"
        while not fired.exists():
            time.sleep(0.02)
        actor = fired.read_text()
        for w in co.workers:
            if w._actor_id.hex() == actor:
                ray.kill(w, no_restart=True)

    killer = threading.Thread(target=kill_when_fired)
    killer.start()
    batch = co.generate(ROWS, IDS, SAMPLED, FIXED, seed=7)
    killer.join()
    assert_complete(batch, reference, co.version)
    assert [e["event"] for e in co.events[before:]] == ["failed", "dropped"], co.events
    assert sum(co.alive) == 1 and co.report()["rollout_workers_alive"] == 1
    again = co.generate(ROWS, IDS, SAMPLED, FIXED, seed=7)  # the survivor carries on alone
    assert_complete(again, reference, co.version)
    assert co.report()["rollout_worker_idle_frac"][co.alive.index(False)] == 1.0
    assert torch.tensor(co.report()["rollout_worker_tokens_per_s"]).gt(0).sum() == 1
