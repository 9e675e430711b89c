"""GSM8K-style arithmetic word problems, generated, so the smollm2-gsm8k preset runs offline.

Each record is `{"question", "answer"}` in the GSM8K file format read by experiments.data:
a short templated word problem over small integers that takes 2-3 arithmetic steps, and a
worked answer with one equation per line ending in "#### <number>":

    Mia has 12 apples. She buys 3 bags with 4 apples each. How many apples does she have now?
    3 * 4 = 12
    12 + 12 = 24
    #### 24

Every operand of an equation is a number written in the question or the result of an earlier
line, every result is a non-negative integer (divisions come out even), and the problems are
deterministic by seed. The shipped file data/arith_gsm8k.jsonl is `make_records(500, 0)`:

    python -m experiments.gsm8k_style data/arith_gsm8k.jsonl --n 500 --seed 0

This module knows nothing about tasks, prompts or models (experiments/tasks.py reads the file).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Callable

# (name, subject pronoun, possessive pronoun)
PEOPLE = [("Mia", "she", "her"), ("Liam", "he", "his"), ("Ava", "she", "her"), ("Noah", "he", "his"),
          ("Zoe", "she", "her"), ("Omar", "he", "his"), ("Lena", "she", "her"), ("Ravi", "he", "his"),
          ("Sara", "she", "her"), ("Tom", "he", "his"), ("Yuki", "she", "her"), ("Ben", "he", "his")]
ITEMS = ["apples", "marbles", "stickers", "cookies", "pencils", "shells", "cards", "buttons", "stamps", "beads"]
GOODS = ["notebook", "pen", "toy car", "comic book", "ball", "cupcake", "puzzle", "kite"]  # things with a price
PLANTS = ["tulips", "carrots", "tomato plants", "sunflowers", "cabbages"]

_OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                                               "*": lambda a, b: a * b, "/": lambda a, b: a // b}


class _Steps:
    """Builds the worked answer: `do(a, op, b)` appends "a op b = c" and returns c."""

    def __init__(self):
        self.lines: list[str] = []

    def do(self, a: int, op: str, b: int) -> int:
        if op == "/" and a % b:
            raise AssertionError(f"{a} / {b} is not whole; the template must draw divisible numbers")
        c = _OPS[op](a, b)
        if c < 0:
            raise AssertionError(f"{a} {op} {b} < 0; the template must draw numbers that stay >= 0")
        self.lines.append(f"{a} {op} {b} = {c}")
        return c

    def answer(self, final: int) -> str:
        return "\n".join(self.lines + [f"#### {final}"])


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


# Each template draws its numbers from `rng` and returns (question, worked answer).

def _buy_bags(rng: random.Random) -> tuple[str, str]:
    (name, he, _), item = rng.choice(PEOPLE), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 30), rng.randint(2, 9), rng.randint(2, 12)
    s = _Steps()
    total = s.do(a, "+", s.do(b, "*", c))
    q = (f"{name} has {a} {item}. {_cap(he)} buys {b} bags with {c} {item} each. "
         f"How many {item} does {he} have now?")
    return q, s.answer(total)


def _give_then_buy(rng: random.Random) -> tuple[str, str]:
    (name, he, _), (friend, _, _), item = rng.choice(PEOPLE), rng.choice(PEOPLE), rng.choice(ITEMS)
    a = rng.randint(10, 60)
    b, c = rng.randint(1, a - 1), rng.randint(2, 25)
    if friend == name:
        friend = "a friend"
    s = _Steps()
    total = s.do(s.do(a, "-", b), "+", c)
    q = (f"{name} has {a} {item}. {_cap(he)} gives {b} of them to {friend} and then buys {c} more. "
         f"How many {item} does {name} have now?")
    return q, s.answer(total)


def _two_prices(rng: random.Random) -> tuple[str, str]:
    (name, he, _), (g1, g2) = rng.choice(PEOPLE), rng.sample(GOODS, 2)
    a, p, b, r = rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 9), rng.randint(2, 15)
    s = _Steps()
    total = s.do(s.do(a, "*", p), "+", s.do(b, "*", r))
    q = (f"{name} buys {a} {g1}s at ${p} each and {b} {g2}s at ${r} each. "
         f"How many dollars does {he} spend in total?")
    return q, s.answer(total)


def _change_left(rng: random.Random) -> tuple[str, str]:
    (name, he, _), good = rng.choice(PEOPLE), rng.choice(GOODS)
    a, p = rng.randint(2, 9), rng.randint(2, 12)
    m = a * p + rng.randint(0, 40)
    s = _Steps()
    left = s.do(m, "-", s.do(a, "*", p))
    q = (f"{name} has ${m}. {_cap(he)} buys {a} {good}s that cost ${p} each. "
         f"How many dollars does {he} have left?")
    return q, s.answer(left)


def _pack_boxes(rng: random.Random) -> tuple[str, str]:
    (name, he, _), item = rng.choice(PEOPLE), rng.choice(ITEMS)
    c, k = rng.randint(2, 10), rng.randint(2, 12)
    a = rng.randint(1, c * k - 1)
    b = c * k - a
    s = _Steps()
    boxes = s.do(s.do(a, "+", b), "/", c)
    q = (f"{name} collects {a} {item} in the morning and {b} {item} in the afternoon. "
         f"{_cap(he)} packs them into boxes of {c}. How many boxes does {he} fill?")
    return q, s.answer(boxes)


def _two_paces(rng: random.Random) -> tuple[str, str]:
    name, he, _ = rng.choice(PEOPLE)
    a, d, b, e = rng.randint(5, 30), rng.randint(2, 7), rng.randint(5, 30), rng.randint(2, 7)
    s = _Steps()
    total = s.do(s.do(a, "*", d), "+", s.do(b, "*", e))
    q = (f"{name} reads {a} pages a day for {d} days, then {b} pages a day for {e} days. "
         f"How many pages does {he} read in all?")
    return q, s.answer(total)


def _boxes_then_eat(rng: random.Random) -> tuple[str, str]:
    (name, he, _), item = rng.choice(PEOPLE), rng.choice(["cookies", "crackers", "candies", "dumplings"])
    a, b = rng.randint(4, 20), rng.randint(2, 6)
    c = rng.randint(1, a * b - 1)
    s = _Steps()
    left = s.do(s.do(a, "*", b), "-", c)
    q = (f"A box holds {a} {item}. {name} buys {b} boxes and {he} eats {c} of the {item}. "
         f"How many {item} are left?")
    return q, s.answer(left)


def _ages(rng: random.Random) -> tuple[str, str]:
    (name, _, _), (friend, _, _) = rng.sample(PEOPLE, 2)
    a, b, c = rng.randint(5, 40), rng.randint(1, 15), rng.randint(2, 20)
    s = _Steps()
    age = s.do(s.do(a, "+", b), "+", c)
    q = f"{name} is {a} years old. {friend} is {b} years older than {name}. How old will {friend} be in {c} years?"
    return q, s.answer(age)


def _save_then_spend(rng: random.Random) -> tuple[str, str]:
    (name, he, _), good = rng.choice(PEOPLE), rng.choice(GOODS)
    a, b = rng.randint(3, 20), rng.randint(2, 10)
    c = rng.randint(1, a * b)
    s = _Steps()
    left = s.do(s.do(a, "*", b), "-", c)
    q = (f"{name} saves ${a} each week for {b} weeks. Then {he} spends ${c} on a {good}. "
         f"How many dollars does {he} have left?")
    return q, s.answer(left)


def _garden_rows(rng: random.Random) -> tuple[str, str]:
    (name, he, _), plant = rng.choice(PEOPLE), rng.choice(PLANTS)
    a, b, c = rng.randint(2, 12), rng.randint(3, 15), rng.randint(1, 8)
    s = _Steps()
    total = s.do(s.do(a, "+", c), "*", b)
    q = (f"A garden has {a} rows of {plant} with {b} in each row. {name} plants {c} more rows "
         f"of the same size. How many {plant} are in the garden now?")
    return q, s.answer(total)


def _times_as_many(rng: random.Random) -> tuple[str, str]:
    (name, _, _), (friend, _, _) = rng.sample(PEOPLE, 2)
    item = rng.choice(ITEMS)
    a, b = rng.randint(2, 25), rng.randint(2, 6)
    s = _Steps()
    total = s.do(a, "+", s.do(a, "*", b))
    q = (f"{name} has {a} {item}. {friend} has {b} times as many {item} as {name}. "
         f"How many {item} do they have together?")
    return q, s.answer(total)


def _three_steps(rng: random.Random) -> tuple[str, str]:
    (name, he, his), item = rng.choice(PEOPLE), rng.choice(ITEMS)
    a, b, d = rng.randint(3, 9), rng.randint(3, 12), rng.randint(2, 6)
    c = d - (a * b) % d + d * rng.randint(0, 3)  # 1..4d, and a * b + c divides evenly by d
    s = _Steps()
    each = s.do(s.do(s.do(a, "*", b), "+", c), "/", d)
    q = (f"{name} has {a} packs of {b} {item} and {c} loose {item}. {_cap(he)} splits all of them "
         f"equally among {d} jars. How many {item} go in each jar?")
    return q, s.answer(each)


TEMPLATES: list[Callable[[random.Random], tuple[str, str]]] = [
    _buy_bags, _give_then_buy, _two_prices, _change_left, _pack_boxes, _two_paces,
    _boxes_then_eat, _ages, _save_then_spend, _garden_rows, _times_as_many, _three_steps,
]


def make_records(n: int, seed: int) -> list[dict]:
    """n distinct problems `{"question", "answer"}`, the same for the same (n, seed)."""
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    rng, seen, out = random.Random(seed), set(), []
    for _ in range(100 * n):  # ample: the templates hold far more distinct problems than asked for
        question, answer = rng.choice(TEMPLATES)(rng)
        if question not in seen:  # a duplicate could land in both the train and the eval split
            seen.add(question)
            out.append({"question": question, "answer": answer})
            if len(out) == n:
                return out
    raise ValueError(f"n: only {len(out)} distinct problems were drawn; ask for fewer")


def write_jsonl(path: str | os.PathLike, n: int, seed: int) -> Path:
    """Write make_records(n, seed) as JSONL, atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make_records(n, seed))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a data file is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.gsm8k_style",
                                     description="Write GSM8K-style arithmetic word problems as JSONL.")
    parser.add_argument("out", help="output .jsonl path, e.g. data/arith_gsm8k.jsonl")
    parser.add_argument("--n", type=int, default=500, help="number of problems (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        path = write_jsonl(args.out, args.n, args.seed)
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {args.n} problems to {path}")


if __name__ == "__main__":
    main()
