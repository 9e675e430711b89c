import json
import operator
import random
import re

import pytest

from experiments import gsm8k_style
from experiments.config import load_config
from experiments.data import DataError, load_qa_file
from experiments.gsm8k_style import TEMPLATES, make_records, write_jsonl
from experiments.tasks import PROJECT_ROOT, Gsm8kTask, TaskConfig, make_task

SHIPPED = PROJECT_ROOT / "data" / "arith_gsm8k.jsonl"
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_LINE = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")

# Each template's answer recomputed independently from the numbers in its question, in order.
_FORMULAS = {
    "_buy_bags": lambda a, b, c: a + b * c,
    "_give_then_buy": lambda a, b, c: a - b + c,
    "_two_prices": lambda a, p, b, r: a * p + b * r,
    "_change_left": lambda m, a, p: m - a * p,
    "_pack_boxes": lambda a, b, c: (a + b) / c,
    "_two_paces": lambda a, d, b, e: a * d + b * e,
    "_boxes_then_eat": lambda a, b, c: a * b - c,
    "_ages": lambda a, b, c: a + b + c,
    "_save_then_spend": lambda a, b, c: a * b - c,
    "_garden_rows": lambda a, b, c: (a + c) * b,
    "_times_as_many": lambda a, b: a + a * b,
    "_three_steps": lambda a, b, c, d: (a * b + c) / d,
}


def _numbers(question):
    return [int(x) for x in re.findall(r"\d+", question)]


def _check_worked_answer(question, answer, final):
    """Every line is correct arithmetic on numbers from the question or earlier lines; the final is the last."""
    *lines, tail = answer.split("\n")
    assert 2 <= len(lines) <= 3 and tail == f"#### {final}"
    given, known, used = _numbers(question), set(_numbers(question)), set()
    for line in lines:
        m = _LINE.fullmatch(line)
        assert m, f"not an equation line: {line!r}"
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        assert a in known and b in known, f"{line!r} uses a number not in {question!r} or earlier lines"
        assert _OPS[op](a, b) == c and c >= 0
        known.add(c)
        used |= {a, b}
    assert set(given) <= used, f"a number in {question!r} is never used"
    assert int(final) == c


def test_each_template_computes_what_its_question_asks():
    assert len(TEMPLATES) >= 8
    rng = random.Random(0)
    for template in TEMPLATES:
        for _ in range(40):
            question, answer = template(rng)
            final = answer.rsplit("#### ", 1)[1]
            expected = _FORMULAS[template.__name__](*_numbers(question))
            assert expected == int(expected) >= 0 and int(final) == expected, (question, answer)
            _check_worked_answer(question, answer, final)


def test_records_load_as_gsm8k_and_their_steps_check_out(tmp_path):
    path = write_jsonl(tmp_path / "sub" / "arith.jsonl", 200, seed=3)
    assert [p.name for p in path.parent.iterdir()] == ["arith.jsonl"]  # no temp file left behind
    records, skipped = load_qa_file(path)
    assert skipped == [] and len(records) == 200
    assert len({r.question for r in records}) == 200  # distinct: none can sit in both train and eval
    for r in records:
        _check_worked_answer(r.question, r.answer, r.final)
    # varied: most templates show up (the leading equation shapes differ between templates)
    shapes = {re.sub(r"\d+", "n", r.answer.split("\n####")[0]) for r in records}
    assert len(shapes) >= 7


def test_records_are_deterministic_by_seed():
    assert make_records(60, 7) == make_records(60, 7)
    assert make_records(60, 7) != make_records(60, 8)
    with pytest.raises(ValueError, match="^n: "):
        make_records(0, 0)


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "arith.jsonl"
    gsm8k_style.main([str(path), "--n", "5", "--seed", "1"])
    before = path.read_text()
    assert [json.loads(line) for line in before.splitlines()] == make_records(5, 1)
    with pytest.raises(ValueError):
        write_jsonl(path, 0, 0)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["arith.jsonl"]


def test_shipped_file_is_the_generator_output():
    # Regenerate with: python -m experiments.gsm8k_style data/arith_gsm8k.jsonl --n 500 --seed 0
    text = SHIPPED.read_text(encoding="utf-8")
    assert len(text.encode()) < 150_000
    assert [json.loads(line) for line in text.splitlines()] == make_records(500, 0)


def test_preset_task_rewards_reference_answers_from_any_directory(tmp_path, monkeypatch):
    cfg = load_config("smollm2-gsm8k", [])
    assert cfg.task.name == "gsm8k" and not cfg.task.path.startswith("/")
    monkeypatch.chdir(tmp_path)  # the relative task.path resolves to the project's copy
    task = make_task(cfg.task)
    assert isinstance(task, Gsm8kTask)
    evals, train = task.eval_prompts(), task.train_prompts(500 - cfg.task.eval_size, seed=0)
    assert len(evals) == cfg.task.eval_size
    assert not {e.prompt for e in evals} & {e.prompt for e in train}
    for ex in evals + train:
        assert task.reward(ex.target, ex) == 1.0
        assert task.reward(f"#### {int(ex.answer) + 1}", ex) == pytest.approx(cfg.task.format_reward)


def test_missing_relative_path_error_names_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data/nope\.jsonl: no such file; set task\.path"):
        make_task(TaskConfig(name="gsm8k", path="data/nope.jsonl"))
