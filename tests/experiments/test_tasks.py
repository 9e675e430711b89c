import json
import random

import pytest

from experiments.data import DataError
from experiments.tasks import ArithmeticTask, Example, Gsm8kTask, TaskConfig, make_task, worked_solution
from experiments.tokenizer import TextTokenizer, build_char_tokenizer
from rollout.checkpoint import load_tokenizer

ALPHABET = "0123456789+-=,>"


@pytest.fixture(scope="module")
def arith():
    return ArithmeticTask(TaskConfig(digits=3, ops="+-", eval_size=64, format_reward=0.1))


def test_worked_solution_is_right_for_every_pair_of_small_operands():
    for a in range(0, 1000, 7):
        for b in range(0, 1000, 11):
            assert worked_solution(a, b, "+").rsplit(">", 1)[1] == str(a + b)
            hi, lo = max(a, b), min(a, b)
            assert worked_solution(hi, lo, "-").rsplit(">", 1)[1] == str(hi - lo)
    assert worked_solution(347, 58, "+") == "7+8=15,4+5+1=10,3+0+1=4>405"
    assert worked_solution(347, 58, "-") == "17-8=9,14-5-1=8,3-0-1=2>289"


def test_worked_targets_get_full_reward(arith):
    examples = arith.train_prompts(300, seed=1) + arith.eval_prompts()
    for ex in examples:
        assert arith.reward(ex.target, ex) == 1.0
        assert arith.reward_parts(ex.target, ex) == {"correct": 1.0, "format": 1.0}
    assert arith.reward(" 7+8=15,4+5+1=10,3+0+1=4>0405\n", Example("347+58=", "405")) == 1.0  # leading zero, spaces


def test_wrong_but_well_formed_answer_gets_format_reward(arith):
    for ex in arith.train_prompts(100, seed=2):
        steps, answer = ex.target.rsplit(">", 1)
        wrong = f"{steps}>{int(answer) + 1}"
        assert arith.reward(wrong, ex) == pytest.approx(0.1)
        assert arith.reward_parts(wrong, ex) == {"correct": 0.0, "format": 1.0}
    ex = Example("347+58=", "405")
    assert arith.reward("7+8=15>405,3+4=7", ex) == 0.0  # text after the answer: no credit
    assert arith.reward("405", ex) == 0.0  # no '>': not an answer


def test_garbage_gets_zero_and_never_raises(arith):
    rng = random.Random(0)
    ex = Example("347+58=", "405", worked_solution(347, 58, "+"))
    chars = ALPHABET + " #abc\n\x00é∑<>-" + "9" * 5
    for _ in range(400):
        s = "".join(rng.choice(chars) for _ in range(rng.randint(0, 80)))
        r = arith.reward(s, ex)
        assert r in (0.0, 0.1, 1.0)
        if ">405" not in s and ">0405" not in s:
            assert r < 1.0
    assert arith.reward("", ex) == 0.0
    assert arith.reward("<eos><pad>", ex) == 0.0
    huge = "1+2=3>" + "9" * 200_000  # int() would refuse this many digits
    assert arith.reward(huge, ex) == pytest.approx(0.1)
    assert arith.reward(">" + "0" * 100_000 + "405", ex) == 1.0


def test_train_and_eval_prompts_are_disjoint_and_eval_is_fixed(arith):
    train = {ex.prompt for ex in arith.train_prompts(5000, seed=3)}
    evals = [ex.prompt for ex in arith.eval_prompts()]
    assert len(evals) == 64 == len(set(evals))
    assert not train & set(evals)
    again = ArithmeticTask(TaskConfig(digits=3, ops="+-", eval_size=64))
    assert [ex.prompt for ex in again.eval_prompts()] == evals


def test_train_prompts_are_deterministic_by_seed(arith):
    a = arith.train_prompts(50, seed=7)
    assert a == arith.train_prompts(50, seed=7)
    assert a != arith.train_prompts(50, seed=8)
    assert {ex.prompt[-1] for ex in a} == {"="}
    assert {op for ex in arith.train_prompts(200, seed=9) for op in "+-" if op in ex.prompt} == {"+", "-"}


def test_eval_size_larger_than_the_problem_space_is_a_config_error():
    task = ArithmeticTask(TaskConfig(digits=1, ops="+", eval_size=100))
    with pytest.raises(ValueError, match="^eval_size:"):
        task.eval_prompts()


@pytest.mark.parametrize("kw, field", [({"name": "math"}, "name"), ({"ops": "*"}, "ops"), ({"digits": 0}, "digits"),
                                       ({"format_reward": 1.0}, "format_reward"), ({"name": "gsm8k"}, "path"),
                                       ({"eval_size": 0}, "eval_size")])
def test_task_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        TaskConfig(**kw)


def test_char_tokenizer_round_trips_every_target_and_saves_as_tokenizer_json(arith, tmp_path):
    tok = TextTokenizer(build_char_tokenizer(ALPHABET))
    assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 3 + len(ALPHABET))
    for ex in arith.train_prompts(300, seed=4) + arith.eval_prompts():
        text = ex.prompt + ex.target
        ids = tok.encode(text)
        assert len(ids) == len(text) and min(ids) >= 3  # one id per character, no specials
        assert tok.decode(ids) == text
        assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == text
    tok.save(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    back = TextTokenizer.from_dir(str(tmp_path))
    assert (back.eos_id, back.pad_id, back.vocab_size) == (tok.eos_id, tok.pad_id, tok.vocab_size)
    text = "347+58=7+8=15,4+5+1=10,3+0+1=4>405"
    assert back.encode(text) == tok.encode(text)
    assert load_tokenizer(str(tmp_path)).encode(text).ids == tok.encode(text)  # the product's loader too
    assert back.apply_chat("12+3=") == "12+3="  # no template: unchanged


def test_chat_template_from_tokenizer_config(tmp_path):
    tok = TextTokenizer(build_char_tokenizer("abc"),
                        chat_template="{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                                      "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok.save(str(tmp_path))
    back = TextTokenizer.from_dir(str(tmp_path))
    assert back.apply_chat("hi") == "<user>hi<assistant>"


def _write_gsm8k(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"question": f"Tom has {i} apples and buys {i + 1000} more. How many?",
                                "answer": f"{i} + {i + 1000} = {2 * i + 1000}\n#### {2 * i + 1000:,}"}) + "\n")


def test_gsm8k_task_rewards_gsm8k_style_answers(tmp_path):
    path = tmp_path / "gsm.jsonl"
    _write_gsm8k(path, 20)
    task = make_task(TaskConfig(name="gsm8k", path=str(path), eval_size=5, format_reward=0.2),
                     chat=lambda s: f"<user>{s}<assistant>")
    assert isinstance(task, Gsm8kTask)
    evals, train = task.eval_prompts(), task.train_prompts(30, seed=0)
    assert len(evals) == 5 and len(train) == 30
    assert not {e.prompt for e in evals} & {e.prompt for e in train}
    assert train == task.train_prompts(30, seed=0) and train != task.train_prompts(30, seed=1)
    ex = evals[0]
    assert ex.prompt.startswith("<user>Tom has") and "####" in ex.prompt and ex.prompt.endswith("<assistant>")
    ref = ex.answer  # e.g. "1008" (commas stripped by the loader)
    assert task.reward(ex.target, ex) == 1.0  # the reference solution itself
    assert task.reward(f"so the total is\n#### {int(ref):,}", ex) == 1.0
    assert task.reward(f"#### {ref}.00", ex) == 1.0
    assert task.reward(f"#### 3\nwait, #### ${ref}", ex) == 1.0  # the last '####' counts
    assert task.reward(f"#### {ref}\nno, #### 3", ex) == pytest.approx(0.2)
    assert task.reward(f"The answer is {ref}.", ex) == 1.0  # no '####': the last number
    assert task.reward_parts(f"The answer is {ref}.", ex) == {"correct": 1.0, "format": 0.0}
    assert task.reward("#### 12345", ex) == pytest.approx(0.2)
    assert task.reward("I don't know", ex) == 0.0
    rng = random.Random(1)
    for _ in range(300):
        s = "".join(rng.choice("0123456789#,.$- e\nabc") for _ in range(rng.randint(0, 60)))
        assert task.reward(s, ex) in (0.0, 0.2, 1.0)
    assert task.reward("#### " + "9" * 100_000, ex) == pytest.approx(0.2)
    assert task.reward("#### 1e999999999", ex) in (0.0, 0.2)


def test_gsm8k_eval_size_must_leave_training_prompts(tmp_path):
    path = tmp_path / "gsm.jsonl"
    _write_gsm8k(path, 4)
    with pytest.raises(DataError, match=r"^task\.eval_size: 4 held-out prompts leave none .* \(4 usable rows\); lower"):
        make_task(TaskConfig(name="gsm8k", path=str(path), eval_size=4))


@pytest.mark.parametrize("reference, equal_forms, wrong", [
    ("1/2", ["1/2", "0.5", "2/4", "5e-1"], "1"),
    ("1 000", ["1000", "1,000", "1 000", "1e3", "1000.0"], "1"),
    ("1e3", ["1000", "1,000", "1e3"], "1"),
    ("-2,500.5", ["-2500.5", "-2,500.50", "-5001/2"], "-2"),
])
def test_the_reward_and_the_loader_agree_on_what_a_number_is(tmp_path, reference, equal_forms, wrong):
    """A reference the loader accepts is matched by the reward in any way of writing the same value,
    and never by its first digits alone."""
    path = tmp_path / "gsm.jsonl"
    _write_gsm8k(path, 3)
    with path.open("a") as f:
        f.write(json.dumps({"question": "The odd one?", "answer": f"work\n#### {reference}"}) + "\n")
    task = make_task(TaskConfig(name="gsm8k", path=str(path), eval_size=1, format_reward=0.2))
    ex = next(e for e in task.eval_prompts() + task.train_prompts(50, seed=0) if e.prompt.startswith("The odd one?"))
    assert task.reward(ex.target, ex) == 1.0
    for form in equal_forms:
        assert task.reward(f"so\n#### {form}", ex) == 1.0, form
        assert task.reward(f"The answer is {form}", ex) == 1.0, form
    assert task.reward(f"#### {wrong}", ex) == pytest.approx(0.2)


def test_skipped_rows_are_reported_with_their_lines(tmp_path, capsys, caplog):
    import logging

    path = tmp_path / "gsm.jsonl"
    _write_gsm8k(path, 6)
    with path.open("a") as f:
        f.write("{broken\n" + json.dumps({"question": "q", "answer": "#### 3 apples"}) + "\n")
    with caplog.at_level(logging.INFO, logger="experiments.tasks"):
        make_task(TaskConfig(name="gsm8k", path=str(path), eval_size=2, skip_malformed=True))
    err = capsys.readouterr().err
    assert "skipped 2 malformed rows" in err and "line 7: invalid JSON" in err and "line 8" in err
    assert any("skipped 2 malformed rows" in r.getMessage() for r in caplog.records)
