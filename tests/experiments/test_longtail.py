import random

import pytest

from experiments.config import load_config
from experiments.longtail import LONGTAIL_ALPHABET, LongTailTask, worked_chain
from experiments.pretrain import TINY_TASKS, PretrainConfig, tiny_policy_dir, train_tiny_policy
from experiments.tasks import Example, TaskConfig, make_task

TASK = TaskConfig(name="longtail", eval_size=32)


@pytest.fixture(scope="module")
def task():
    return LongTailTask(TASK)


def _quantile(values, q):
    values = sorted(values)
    return values[int(q * (len(values) - 1))]


def test_worked_chain_counts_down_and_ends_in_the_result():
    assert worked_chain(37, "+", 4, 5) == "5:37+4=41,4:41+4=45,3:45+4=49,2:49+4=53,1:53+4=57>57"
    assert worked_chain(3, "-", 2, 3) == "3:3-2=1,2:1-2=-1,1:-1-2=-3>-3"
    for start, op, d, n in ((0, "+", 9, 30), (99, "-", 1, 1), (50, "-", 7, 12)):
        assert worked_chain(start, op, d, n).rsplit(">", 1)[1] == str(start + (d if op == "+" else -d) * n)


def test_answer_lengths_are_long_tailed_on_a_fixed_seed(task):
    examples = task.train_prompts(4000, seed=0)
    lengths = [len(ex.target) + 1 for ex in examples]  # + EOS: tokens of a char-level policy
    steps = [ex.target.count(",") + 1 for ex in examples]
    assert min(steps) == 1 and max(steps) == 30
    # most answers are short, a few are several hundred tokens: the median is far below the mean
    # and the top percentile is >10x the median
    assert 15 <= _quantile(lengths, 0.5) <= 35
    assert _quantile(lengths, 0.9) >= 100
    assert _quantile(lengths, 0.99) >= 250
    assert sum(lengths) / len(lengths) > 1.8 * _quantile(lengths, 0.5)
    # the longest tenth of the answers holds over a third of all answer tokens
    top = sorted(lengths)[-len(lengths) // 10:]
    assert sum(top) > 0.35 * sum(lengths)


def test_worked_solutions_get_full_reward(task):
    for ex in task.train_prompts(300, seed=1) + task.eval_prompts():
        assert set(ex.prompt + ex.target) <= set(LONGTAIL_ALPHABET)
        assert task.reward_parts(ex.target, ex) == {"correct": 1.0, "format": 1.0}
        assert task.reward(ex.target, ex) == 1.0
        assert task.reward(f" {ex.target}\n", ex) == 1.0


def test_wrong_solutions_get_format_reward_or_nothing(task):
    ex = Example("37+4*5=", "57", worked_chain(37, "+", 4, 5))
    steps, answer = ex.target.rsplit(">", 1)
    assert task.reward(f"{steps}>58", ex) == pytest.approx(0.1)  # wrong result, well formed
    assert task.reward(f"{steps}>057", ex) == 1.0  # leading zeros are the same number
    short = worked_chain(37, "+", 20, 1)  # "1:37+20=57>57": right number, one step instead of five
    assert task.reward_parts(short.replace("+20", "+2"), ex)["correct"] == 0.0
    four = worked_chain(41, "+", 4, 4)  # four steps ending in 57: the count is wrong
    assert task.reward_parts(four, ex) == {"correct": 0.0, "format": 1.0}
    assert task.reward(">57", ex) == 0.0  # no working
    assert task.reward(f"{ex.target},1:57+4=61", ex) == 0.0  # text after the answer
    assert task.reward(f"{steps}>", ex) == 0.0


def test_garbage_gets_zero_and_never_raises(task):
    rng = random.Random(0)
    ex = task.train_prompts(1, seed=3)[0]
    for _ in range(400):
        s = "".join(rng.choice(LONGTAIL_ALPHABET + " #\n\x00é<") for _ in range(rng.randint(0, 80)))
        assert task.reward(s, ex) in (0.0, 0.1)
    assert task.reward(None, ex) == 0.0
    assert task.reward("1:1+1=2>" + "9" * 200_000, ex) == pytest.approx(0.1)


def test_eval_prompts_are_held_out_and_fixed(task):
    train = {ex.prompt for ex in task.train_prompts(3000, seed=0)}
    evals = task.eval_prompts()
    assert len(evals) == 32 and len({ex.prompt for ex in evals}) == 32
    assert not train & {ex.prompt for ex in evals}
    assert [ex.prompt for ex in LongTailTask(TASK).eval_prompts()] == [ex.prompt for ex in evals]


def test_make_task_and_the_tiny_policy_know_the_task(tmp_path):
    assert isinstance(make_task(TASK), LongTailTask)
    assert set(TINY_TASKS["longtail"]) == set(LONGTAIL_ALPHABET)
    pcfg = PretrainConfig()
    folder = tiny_policy_dir(pcfg, TASK, 0, cache_dir=str(tmp_path))
    assert "tiny-longtail-" in folder
    assert folder != tiny_policy_dir(pcfg, TaskConfig(name="longtail", chain_max=10), 0, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="^chain_max:"):
        TaskConfig(name="longtail", chain_max=0)


def test_short_pretrain_on_longtail_lowers_loss():
    # short chains keep the test cheap; the length-grouped micro-batches are exercised all the same
    pcfg = PretrainConfig(steps=100, target_accuracy=1.0, hidden_size=64, layers=2, heads=4, kv_heads=2,
                          intermediate=176, batch_size=32, micro_batch_size=8, warmup=10, lr=3e-3,
                          eval_every=0, probe_size=16, max_len=80)
    task_cfg = TaskConfig(name="longtail", chain_max=4, eval_size=8)
    _, _, metrics = train_tiny_policy(pcfg, task_cfg, seed=0, progress=False)
    assert metrics["steps_run"] == 100
    assert metrics["final_loss"] < 0.5 * metrics["initial_loss"]


def test_longtail_preset_loads():
    cfg = load_config("longtail", [])
    assert cfg.task.name == "longtail" and cfg.model.name == "tiny"
    longest = max(len(ex.prompt) + len(ex.target) + 1 for ex in make_task(cfg.task).train_prompts(4000, seed=0))
    assert cfg.pretrain.max_len >= longest
    assert cfg.sampling.max_new_tokens >= longest


def test_the_arith_policy_keeps_its_cache_folder(tmp_path):
    # micro_batch_size=0 (one pass per batch, as before the field existed) leaves the key alone,
    # so an existing cache of the default tiny policy is not rebuilt
    folder = tiny_policy_dir(PretrainConfig(), TaskConfig(), 0, cache_dir=str(tmp_path))
    assert folder.endswith("tiny-arith-6053fb823ebd")
    assert tiny_policy_dir(PretrainConfig(micro_batch_size=16), TaskConfig(), 0, cache_dir=str(tmp_path)) != folder


def test_bench_setup_refuses_other_tasks():
    from experiments.longtail import bench_setup

    with pytest.raises(ValueError, match="^task.name:"):
        bench_setup(load_config("default", []), 4)
