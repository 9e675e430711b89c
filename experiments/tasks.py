"""Verifiable-reward tasks: prompts, reference answers and rewards.

Two tasks:
- `arith` (built in, synthetic): multi-digit addition / subtraction with a short worked format
  that a character-level model of ~1M parameters learns on a CPU in minutes. Its completions
  are highly predictable token by token, which is also what lets speculative drafting pay.
- `gsm8k`: grade-school math word problems from a local JSONL / Parquet file whose answers end
  in "#### <number>" (read by experiments.data.load_qa_file).

Rewards never raise, whatever the model wrote (garbage, empty, numbers of a million digits):
answers are compared as strings or exact Fractions (experiments.data.parse_number), never
through int().

This module knows nothing about models or tokenizers; a chat template reaches it as a plain
`str -> str` function.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from experiments.data import (NUMBER, NUMBER_RE, DataError, QARecord, describe_skipped, load_qa_file,
                              parse_number)

# Data files shipped with the project (data/arith_gsm8k.jsonl) sit next to the packages, like
# configs/ (see experiments.config.PRESET_DIR), so a preset's relative task.path also works
# when `specroll` runs from another directory.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class TaskConfig:
    name: str = "arith"  # arith | longtail (built-in synthetic) | gsm8k (local GSM8K-style file)
    path: str = ""  # gsm8k: a JSONL or Parquet file with question / answer ("... #### number")
    skip_malformed: bool = False  # gsm8k: skip records without a "#### number" instead of failing
    digits: int = 3  # arith: max digits per operand (each operand draws 1..digits digits)
    ops: str = "+"  # arith, longtail: operators to draw from, any of "+-"
    chain_max: int = 30  # longtail: most steps in a chain (answers up to ~12 characters a step)
    chain_skew: float = 1.4  # longtail: P(steps = n) ~ n^-skew; 1.4 puts the median answer near 27 characters
    eval_size: int = 128  # held-out prompts for evaluation
    format_reward: float = 0.1  # reward for a well-formed answer even if wrong

    def __post_init__(self):
        if self.name not in ("arith", "longtail", "gsm8k"):
            raise ValueError(f"name: must be arith, longtail or gsm8k, got {self.name!r}")
        if self.chain_max < 1:
            raise ValueError(f"chain_max: must be >= 1, got {self.chain_max}")
        if self.chain_skew < 0:
            raise ValueError(f"chain_skew: must be >= 0 (0 draws chain lengths uniformly), got {self.chain_skew}")
        if self.name == "gsm8k" and not self.path:
            raise ValueError("path: task gsm8k needs a JSONL or Parquet file with question/answer fields; "
                             "set task.path=/path/to/gsm8k_train.jsonl")
        if not 1 <= self.digits <= 9:
            raise ValueError(f"digits: must be in 1..9, got {self.digits}")
        if not self.ops or set(self.ops) - set("+-"):
            raise ValueError(f"ops: must be a non-empty string of operators from '+-', got {self.ops!r}")
        if self.eval_size < 1:
            raise ValueError(f"eval_size: must be >= 1, got {self.eval_size}")
        if not 0.0 <= self.format_reward < 1.0:
            raise ValueError(f"format_reward: must be in [0, 1) (below the reward of a correct answer), "
                             f"got {self.format_reward}")


@dataclass
class Example:
    prompt: str
    answer: str  # the reference final answer
    target: str = ""  # a full worked completion (for SFT), without the EOS token


class Task:
    """A source of prompts and a reward. Subclasses implement the four methods below."""

    name: str = ""
    format_reward: float = 0.1

    def train_prompts(self, n: int, seed: int) -> list[Example]:
        raise NotImplementedError

    def eval_prompts(self) -> list[Example]:
        raise NotImplementedError

    def reward_parts(self, completion: str, ex: Example) -> dict:
        """{"correct": 0/1, "format": 0/1} for one decoded completion (special tokens removed)."""
        raise NotImplementedError

    def reward(self, completion: str, ex: Example) -> float:
        """1.0 if correct, else `format_reward` if well-formed, else 0.0."""
        parts = self.reward_parts(completion, ex)
        if parts["correct"]:
            return 1.0
        return self.format_reward if parts["format"] else 0.0


def _held_out(key: str) -> bool:
    """Stable train/eval split by content hash (Python's hash() is salted per process)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 8 == 0


# ---------------------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------------------
_COLUMN = r"\d{1,2}[+-]\d(?:[+-]1)?=\d{1,2}"
_WORKED = re.compile(rf"{_COLUMN}(?:,{_COLUMN})*>(-?\d+)")
_FINAL = re.compile(r">(-?\d+)\s*\Z")


def _norm_int(s: str) -> str:
    """Canonical decimal string of an integer literal, without int() (no digit limit)."""
    neg = s.startswith("-")
    digits = s.lstrip("-").lstrip("0") or "0"
    return ("-" if neg and digits != "0" else "") + digits


def worked_solution(a: int, b: int, op: str) -> str:
    """Column-by-column working, right to left, then '>' and the result.

    Addition: "347+58=" -> "7+8=15,4+5+1=10,3+0+1=4>405" (each column's full sum, "+1" when a
    carry comes in; the result's digits are the columns' last digits, read back, plus a final
    carry). Subtraction (a >= b): "347-58=" -> "17-8=9,14-5-1=8,3-0-1=2>289" (a borrowed ten
    shows on the top digit, "-1" when a borrow goes out of the previous column).
    """
    width = max(len(str(a)), len(str(b)))
    xs, ys = str(a)[::-1].ljust(width, "0"), str(b)[::-1].ljust(width, "0")
    steps, digits, carry = [], [], 0
    for x, y in zip(xs, ys):
        x, y = int(x), int(y)
        tail = f"{op}1" if carry else ""
        if op == "+":
            s = x + y + carry
            steps.append(f"{x}+{y}{tail}={s}")
            digits.append(s % 10)
            carry = s // 10
        else:
            d = x - y - carry
            top = x + 10 if d < 0 else x
            steps.append(f"{top}-{y}{tail}={d % 10}")
            digits.append(d % 10)
            carry = 1 if d < 0 else 0
    if carry:
        digits.append(carry)
    result = _norm_int("".join(str(d) for d in reversed(digits)))
    return ",".join(steps) + ">" + result


class GeneratedTask(Task):
    """A task that draws its problems from a seeded generator (`_draw`): training prompts are
    the draws not hashed out, eval prompts a fixed set of distinct held-out draws."""

    _EVAL_SEED = 0
    eval_size: int
    _eval: list[Example] | None

    def _draw(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def _exhausted(self, found: int) -> str:
        """The error when fewer than eval_size held-out problems turn up."""
        raise NotImplementedError

    def train_prompts(self, n: int, seed: int) -> list[Example]:
        rng, out = random.Random(seed), []
        while len(out) < n:
            ex = self._draw(rng)
            if not _held_out(ex.prompt):
                out.append(ex)
        return out

    def eval_prompts(self) -> list[Example]:
        if self._eval is None:
            rng, seen, out = random.Random(self._EVAL_SEED), set(), []
            for _ in range(200 * self.eval_size):  # ample: 1 in 8 problems is held out
                ex = self._draw(rng)
                if _held_out(ex.prompt) and ex.prompt not in seen:
                    seen.add(ex.prompt)
                    out.append(ex)
                    if len(out) == self.eval_size:
                        break
            else:
                raise ValueError(self._exhausted(len(out)))
            self._eval = out
        return list(self._eval)


class ArithmeticTask(GeneratedTask):
    """Multi-digit addition (and subtraction) with a short worked format.

    Prompt "347+58=", target "7+8=15,4+5+1=10,3+0+1=4>405" (see `worked_solution`); each
    operand has 1..digits digits (uniform), so easy and hard problems mix and a small model
    reaches a partial accuracy that RL can raise. Subtraction keeps a >= b.

    Reward (from `Task.reward`): 1.0 if the number after the final '>' at the very end of the
    completion equals the result exactly (leading zeros ignored); `format_reward` if the
    whole completion is well-formed worked arithmetic (comma-separated columns, '>' and a
    number) but the result is wrong; 0.0 otherwise (including text after the answer).
    Eval problems are a fixed set, hashed out of the training distribution.
    """

    name = "arith"
    _EVAL_SEED = 0x5EED

    def __init__(self, cfg: TaskConfig):
        self.digits, self.ops = cfg.digits, cfg.ops
        self.eval_size, self.format_reward = cfg.eval_size, cfg.format_reward
        self._eval: list[Example] | None = None

    def _draw(self, rng: random.Random) -> Example:
        op = rng.choice(self.ops)
        a, b = (rng.randrange(10 ** (n - 1) if n > 1 else 0, 10 ** n)
                for n in (rng.randint(1, self.digits), rng.randint(1, self.digits)))
        if op == "-" and a < b:
            a, b = b, a
        target = worked_solution(a, b, op)
        return Example(prompt=f"{a}{op}{b}=", answer=target.rsplit(">", 1)[1], target=target)

    def _exhausted(self, found: int) -> str:
        return (f"eval_size: only {found} held-out problems exist with digits={self.digits}, "
                f"ops={self.ops!r}; lower task.eval_size or raise task.digits")

    def reward_parts(self, completion: str, ex: Example) -> dict:
        if not isinstance(completion, str):
            return {"correct": 0.0, "format": 0.0}
        m = _FINAL.search(completion)
        correct = m is not None and _norm_int(m.group(1)) == _norm_int(ex.answer)
        well_formed = _WORKED.fullmatch(completion.strip()) is not None
        return {"correct": float(correct), "format": float(well_formed or correct)}


# ---------------------------------------------------------------------------------------
# GSM8K
# ---------------------------------------------------------------------------------------
# One grammar of numbers for the reference answers (experiments.data) and the model's answers.
_HASH_ANSWER = re.compile(rf"####\s*({NUMBER})")
GSM8K_INSTRUCTION = 'Solve the problem step by step, then give the final answer on its own line as "#### <number>".'
log = logging.getLogger(__name__)


def load_task_records(cfg: TaskConfig) -> list[QARecord]:
    """The gsm8k task's records, checked: a missing, empty or malformed file, or one with too few
    rows for task.eval_size, is a DataError naming the file and the fix. Rows dropped by
    task.skip_malformed are printed and logged (how many, and the first few lines)."""
    path = resolve_data_path(cfg.path)
    stat = path.stat() if path.is_file() else None
    records = _read_records(path, stat and (stat.st_size, stat.st_mtime_ns), cfg.skip_malformed)
    if len(records) <= cfg.eval_size:
        raise DataError(f"task.eval_size: {cfg.eval_size} held-out prompts leave none for training in {path} "
                        f"({len(records)} usable rows); lower task.eval_size below {len(records)} or use a "
                        "larger file")
    return records


def resolve_data_path(path: str) -> Path:
    """`path` as given if it exists (absolute, or relative to the cwd); else, for a relative path,
    the project's copy (PROJECT_ROOT / path) if that exists; else `path` as given, so the
    "no such file" error names what the user wrote."""
    given = Path(path).expanduser()
    if given.exists() or given.is_absolute():
        return given
    shipped = PROJECT_ROOT / given
    return shipped if shipped.is_file() else given


@functools.lru_cache(maxsize=4)
def _read_records(path: Path, version, skip_malformed: bool) -> tuple[QARecord, ...]:
    """One read per file version per process: the CLI checks the data before loading the model,
    and the run reads it again; the skipped rows are reported once."""
    records, skipped = load_qa_file(path, skip_malformed=skip_malformed)
    if skipped:
        message = describe_skipped(path, len(records), skipped)
        print(f"warning: {message}", file=sys.stderr)
        log.info(message)  # into the run's log where one is configured; the print is for the user
    return tuple(records)


class Gsm8kTask(Task):
    """GSM8K-style word problems from a local file.

    Prompt: `chat(question + instruction)` (the model's chat template when one is given).
    Reward: 1.0 if the last "#### x" in the completion (or, without any, its last number)
    equals the reference final answer numerically ("1,000" == "1000.00"); `format_reward`
    if a "#### <number>" is present but wrong; 0.0 otherwise. Eval prompts are a fixed
    `eval_size` records chosen by content hash order; training prompts are the rest.
    A relative `task.path` missing from the cwd is read from the project's copy (resolve_data_path).
    """

    name = "gsm8k"

    def __init__(self, cfg: TaskConfig, chat: Callable[[str], str] | None = None):
        records = load_task_records(cfg)
        chat = chat or (lambda s: s)
        examples = [Example(prompt=chat(f"{r.question.strip()}\n{GSM8K_INSTRUCTION}"),
                            answer=str(r.final).strip(), target=str(r.answer)) for r in records]
        # Held-out set by content hash, independent of file order and of any seed.
        order = sorted(range(len(examples)),
                       key=lambda i: hashlib.sha256(records[i].question.encode()).hexdigest())
        held = set(order[:cfg.eval_size])
        self._eval = [examples[i] for i in sorted(held)]
        self._train = [examples[i] for i in range(len(examples)) if i not in held]
        self.format_reward = cfg.format_reward

    def train_prompts(self, n: int, seed: int) -> list[Example]:
        """n examples: seeded shuffles of the training records, concatenated as needed."""
        rng, out = random.Random(seed), []
        while len(out) < n:
            perm = list(self._train)
            rng.shuffle(perm)
            out.extend(perm[:n - len(out)])
        return out

    def eval_prompts(self) -> list[Example]:
        return list(self._eval)

    def reward_parts(self, completion: str, ex: Example) -> dict:
        if not isinstance(completion, str):
            return {"correct": 0.0, "format": 0.0}
        tagged = _HASH_ANSWER.findall(completion)
        candidates = tagged or NUMBER_RE.findall(completion)
        got = parse_number(candidates[-1]) if candidates else None
        ref = parse_number(ex.answer)
        correct = got is not None and ref is not None and got == ref
        return {"correct": float(correct), "format": float(bool(tagged))}


def make_task(cfg: TaskConfig, chat: Callable[[str], str] | None = None) -> Task:
    """The task named by cfg.name. `chat` formats a gsm8k prompt (e.g. TextTokenizer.apply_chat)."""
    if cfg.name == "arith":
        return ArithmeticTask(cfg)
    if cfg.name == "longtail":
        from experiments.longtail import LongTailTask  # it imports this module

        return LongTailTask(cfg)
    return Gsm8kTask(cfg, chat)
