"""A short training on a two-node Ray cluster on this machine (ray.cluster_utils.Cluster): one
rollout worker per node (placement_strategy=STRICT_SPREAD), policy and heads shipped to them
through the object store; the run equals the in-process run token for token."""
import pytest

import experiments.train as train
from experiments.metrics import read_metrics

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

import rollout.coordinator as coordinator_mod  # noqa: E402
from test_train import comparable, small_config  # noqa: E402

pytestmark = pytest.mark.ray


def test_two_node_cluster_runs_one_worker_per_node_and_matches_in_process(policy_dir, tmp_path, monkeypatch):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()  # both registered before the placement group is asked for
    seen = []

    class Watched(coordinator_mod.Coordinator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self)

    monkeypatch.setattr(coordinator_mod, "Coordinator", Watched)
    try:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        remote = small_config(policy_dir, tmp_path, "cluster", "train.steps=2", "ray.enabled=true",
                              "rollout.num_workers=2", "rollout.placement_strategy=STRICT_SPREAD")
        train.run(remote)
        [co] = seen
        assert len(set(co.node_ids)) == 2  # a worker on each node
        assert set(co.node_ids) == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()
    local = small_config(policy_dir, tmp_path, "local", "train.steps=2")
    train.run(local)
    a, b = comparable(read_metrics(remote.run_dir)), comparable(read_metrics(local.run_dir))
    assert [r["reward_mean"] for r in a] == pytest.approx([r["reward_mean"] for r in b], abs=1e-6)
    assert [r["response_len_mean"] for r in a] == [r["response_len_mean"] for r in b]
    assert [r["policy_version"] for r in a] == [1, 2]
