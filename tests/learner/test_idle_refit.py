"""refit.schedule=idle in the RL loop: a head fit handed to an idle worker never holds up the
learner; a step takes it only once it has finished (it then goes out with that step's version),
and without speculation none is handed out."""
import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from learner.loop import RLLoop
from learner.trainer import cpu_state
from rollout.types import RolloutConfig, SpecParams
from rollout.worker import RolloutClient
from test_trainer import FIXED, make_learner, make_policy, toy_prompts, toy_reward


class IdleClient(RolloutClient):
    """The coordinator's idle-time work in process: each step's fit runs on a thread, on copies of
    the worker's policy and heads, and only starts once the test sets `release`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fn, self.release, self.pool = None, threading.Event(), ThreadPoolExecutor(1)

    def set_idle_work(self, fn):
        self.fn = fn

    def generate(self, prompts, ids, sampling, spec, seed):
        batch = super().generate(prompts, ids, sampling, spec, seed)
        if self.fn is not None:
            fn, args = self.fn(batch.sequences, seed + 1)
            policy, heads = copy.deepcopy(self.worker.engine.model), copy.deepcopy(self.worker.engine.heads)
            batch.report["idle_work"] = self.pool.submit(lambda: self.release.wait() and fn(policy, heads, *args))
        return batch

    def idle_ready(self, fut):
        return fut.done()

    def idle_result(self, fut):
        return fut.result()


def make(spec):
    model, heads = make_policy()
    learner = make_learner(model, heads, refit="idle")
    client = IdleClient(learner.policy.config, cpu_state(learner.policy), learner.heads.config,
                        cpu_state(learner.heads), RolloutConfig(max_batch=8), version=learner.policy_version)
    loop = RLLoop(learner, client, prompt_fn=lambda s: toy_prompts(s, 2), reward_fn=toy_reward, task_name="toy",
                  sampling=learner.sampling, spec=spec, group_size=4, seed=0)
    return learner, client, loop


def test_an_unfinished_idle_fit_does_not_hold_up_the_step_and_a_later_step_takes_it():
    learner, client, loop = make(FIXED)
    before = cpu_state(learner.heads)
    first = loop.step(1)  # the fit cannot finish before release: the step goes on without it
    assert not first["refit"] and first["policy_version"] == 1 and len(loop._idle) == 1
    assert all(torch.equal(before[k], v) for k, v in cpu_state(learner.heads).items())
    client.release.set()
    loop._idle[0].result()
    second = loop.step(2)
    assert second["refit"] and second["refit_where"] == "idle" and second["policy_version"] == 2
    assert len(second["refit_accept_after"]) == learner.heads.config.num_depths
    changed = any(not torch.equal(before[k], v) for k, v in cpu_state(learner.heads).items())
    assert changed == second["refit_kept"]
    # what went out with version 2 is what the learner holds: heads and policy together
    assert client.worker.versions() == {"policy": 2, "heads": 2}
    assert all(torch.equal(client.worker.engine.heads.state_dict()[k], v)
               for k, v in cpu_state(learner.heads).items())
    client.pool.shutdown()


def test_without_speculation_no_idle_fit_is_handed_out():
    _, client, loop = make(SpecParams(mode="off"))
    assert client.fn is None
    assert "idle_work" not in loop.step(1) and not loop._idle
