"""Run checkpoints are data, never code: a crafted trainer.pt is refused before anything in it runs,
and everything a real checkpoint holds (optimiser state, torch / python / numpy RNG states)
round-trips through the weights-only loader."""
import copy
import os
import random

import numpy as np
import pytest
import torch

from learner.checkpointing import latest_checkpoint, load_run_checkpoint, save_run_checkpoint
from learner.config import RefitConfig, TrainConfig
from learner.losses import AlgoConfig
from learner.trainer import Learner
from rollout.model import ModelConfig, Transformer
from rollout.types import SamplingParams
from spec_heads.heads import DraftHeads, HeadConfig

MC = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1)


def make_learner(seed=0):
    torch.manual_seed(seed)
    model, heads = Transformer(MC), DraftHeads(HeadConfig("parallel", 2), MC)
    return Learner(model, heads, algo=AlgoConfig(name="grpo", group_size=2), train=TrainConfig(lr=1e-3),
                   sampling=SamplingParams(max_new_tokens=4), refit=RefitConfig(schedule="never"))


def take_a_step(learner):
    """One optimiser step, so the optimiser holds state (exp_avg, step, ...) to round-trip."""
    ids = torch.randint(0, MC.vocab_size, (2, 6))
    loss = learner.policy.logits(learner.policy(ids)).logsumexp(-1).mean()
    loss.backward()
    learner.optimizer.step()
    learner.optimizer.zero_grad()


class RunsAShellCommand:
    """Unpickling this runs `os.system(command)`: what a crafted trainer.pt would do."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_crafted_trainer_state_is_refused_and_runs_nothing(tmp_path):
    learner = make_learner()
    folder = save_run_checkpoint(tmp_path / "run", 1, learner)
    marker = tmp_path / "pwned"
    state = torch.load(folder / "trainer.pt", weights_only=True)
    state["learner"]["payload"] = RunsAShellCommand(f"touch {marker}")
    torch.save(state, folder / "trainer.pt")
    with pytest.raises(ValueError) as err:
        load_run_checkpoint(latest_checkpoint(tmp_path / "run"), make_learner())
    assert not marker.exists()
    message = str(err.value)
    assert str(folder / "trainer.pt") in message and "specroll train" in message


def test_trainer_state_that_is_not_ours_is_refused(tmp_path):
    folder = save_run_checkpoint(tmp_path, 1, make_learner())
    torch.save({"weights": torch.zeros(2)}, folder / "trainer.pt")
    with pytest.raises(ValueError, match="not a specroll trainer state"):
        load_run_checkpoint(folder, make_learner())


def test_optimizer_and_every_rng_state_round_trip_weights_only(tmp_path):
    learner = make_learner()
    take_a_step(learner)
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    save_run_checkpoint(tmp_path, 3, learner)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    fresh = make_learner(seed=5)
    state = load_run_checkpoint(latest_checkpoint(tmp_path), fresh)
    assert state["step"] == 3
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    saved, loaded = learner.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    assert saved["state"].keys() == loaded["state"].keys() and saved["state"]
    for i, entry in saved["state"].items():
        for k, v in entry.items():
            assert torch.equal(v, loaded["state"][i][k]), (i, k)
    for k, v in learner.policy.state_dict().items():
        assert torch.equal(v, fresh.policy.state_dict()[k]), k
    # the resumed optimiser keeps stepping exactly as the saved one would
    other = copy.deepcopy(learner)
    torch.manual_seed(1)
    take_a_step(other)
    torch.manual_seed(1)
    take_a_step(fresh)
    for k, v in other.policy.state_dict().items():
        assert torch.equal(v, fresh.policy.state_dict()[k]), k
