"""rollout.backend: the config key that moves rollouts to vLLM (runs without vLLM installed)."""
import importlib.util

import pytest
import torch

from experiments.config import ConfigError, load_config
from learner.trainer import cpu_state
from rollout.model import ModelConfig, Transformer
from rollout.types import RolloutConfig
from rollout.worker import RolloutClient, RolloutWorker


def test_backend_key_is_validated_with_its_path():
    cfg = load_config("default", ["rollout.backend=vllm", "rollout.vllm.fallback_plain=true",
                                  "rollout.vllm.check_draws=500"])
    assert cfg.rollout.backend == "vllm" and cfg.rollout.vllm.fallback_plain and cfg.rollout.vllm.check_draws == 500
    assert load_config("default", []).rollout.backend == "specroll"
    with pytest.raises(ConfigError, match=r"rollout\.backend: must be specroll or vllm"):
        load_config("default", ["rollout.backend=sglang"])
    with pytest.raises(ConfigError, match=r"rollout\.vllm\.check_draws"):
        load_config("default", ["rollout.vllm.check_draws=10"])


def test_default_backend_builds_specroll_workers():
    mc = ModelConfig()
    client = RolloutClient(mc, cpu_state(Transformer(mc)), None, None, RolloutConfig(max_batch=2))
    assert type(client.workers[0]) is RolloutWorker


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_without_vllm_names_the_fix():
    mc = ModelConfig()
    torch.manual_seed(0)
    with pytest.raises(ImportError, match=r"rollout\.backend=vllm.*specroll\[vllm\]"):
        RolloutClient(mc, cpu_state(Transformer(mc)), None, None, RolloutConfig(backend="vllm"))


def test_idle_refits_are_refused_for_vllm_workers():
    """refit.schedule=idle trains the worker's own engine copy, which a vLLM worker does not hold."""
    from types import SimpleNamespace

    pytest.importorskip("ray")
    from rollout.coordinator import Coordinator

    with pytest.raises(ValueError, match=r"refit\.schedule: idle .*rollout\.backend=vllm"):
        Coordinator.set_idle_work(SimpleNamespace(rollout=RolloutConfig(backend="vllm")), lambda s, seed: None)
    accepting = SimpleNamespace(rollout=RolloutConfig(), idle_work=None)
    Coordinator.set_idle_work(accepting, print)
    assert accepting.idle_work is print
